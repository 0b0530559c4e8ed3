#!/usr/bin/env bash
# Set up a fresh Debian machine and run every check and test of snapfs:
#   a lint of the shell scripts (shellcheck), cargo fmt --check, cargo clippy -D warnings, cargo nextest.
# Installs what is missing with apt-get (needs root then; quiet when nothing is missing).
# Extra arguments go to `cargo nextest run` (e.g. a test filter).
# Env: SNAPFS_TEST_THREADS (default 4; FUSE tests are IO-bound).
# Exit status: 0 only if every step passed; every step runs even if an earlier one failed.
set -euo pipefail

# shellcheck source=scripts/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
cd "$REPO_ROOT"

ensure_rust
# tests use qemu-img / qemu-io / qemu-storage-daemon as oracles, mount FUSE, loop devices, ext4
ensure_tools qemu-img qemu-io qemu-nbd qemu-storage-daemon fusermount3 mkfs.ext4 \
    losetup mount findmnt getfattr fio shellcheck
ensure_fuse

threads=${SNAPFS_TEST_THREADS:-4}
failed=()

section "shellcheck"
if shellcheck -x scripts/*.sh .ci/run mount-helper/mount.snapfs; then
    echo "ok"
else
    failed+=(shellcheck)
    echo "FAILED: shellcheck"
fi

section "cargo fmt --all -- --check"
if cargo fmt --all -- --check; then
    echo "ok"
else
    failed+=(fmt)
    echo "FAILED: cargo fmt (run 'cargo fmt --all' to fix)"
fi

section "cargo clippy --all-targets -- -D warnings"
if cargo clippy --all-targets --quiet -- -D warnings; then
    echo "ok"
else
    failed+=(clippy)
    echo "FAILED: cargo clippy"
fi

if [[ ${#failed[@]} -gt 0 ]]; then
    echo "already failed: ${failed[*]}; running the tests anyway"
fi

if cargo nextest --version >/dev/null 2>&1; then
    section "cargo nextest run --no-fail-fast --test-threads $threads"
    test_cmd=(cargo nextest run --no-fail-fast --test-threads "$threads" "$@")
else
    section "cargo test --no-fail-fast (cargo-nextest is not installed)"
    test_cmd=(cargo test --no-fail-fast "$@" -- --test-threads "$threads")
fi
# The test runner's summary is the last thing printed.
if "${test_cmd[@]}" && [[ ${#failed[@]} -eq 0 ]]; then
    exit 0
fi
exit 1
