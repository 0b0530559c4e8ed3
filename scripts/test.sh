#!/usr/bin/env bash
# Set up a fresh Debian machine and run every check and test of snapfs:
#   a lint of the shell scripts (shellcheck), cargo fmt --check, cargo clippy -D warnings, cargo nextest,
#   then a short run of every fuzz target (scripts/fuzz.sh).
# Installs what is missing with apt-get (needs root then; quiet when nothing is missing), and
# cargo-fuzz from crates.io (scripts/fuzz.sh).
# Extra arguments go to `cargo nextest run` (e.g. a test filter).
# Env: SNAPFS_TEST_THREADS (default 4; FUSE tests are IO-bound),
#      SNAPFS_TEST_FUZZ_SECONDS (seconds per fuzz target, default 25; 0 skips fuzzing).
# Time on a fresh 2-core machine (measured while other builds shared it, 2026-11-22): about 30
# minutes in all; the fuzz part 11.5 minutes (cold instrumented build 9 min, 7 targets x 25 s),
# plus 2.5 minutes to install cargo-fuzz.
# Exit status: 0 only if every step passed; every step runs even if an earlier one failed.
set -euo pipefail

# shellcheck source=scripts/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
cd "$REPO_ROOT"

ensure_rust
# tests use qemu-img / qemu-io / qemu-storage-daemon as oracles (xmllint, i.e. libxml2, for libvirt
# XML), mount FUSE, loop devices, ext4
ensure_tools qemu-img qemu-io qemu-nbd qemu-storage-daemon fusermount3 mkfs.ext4 \
    losetup mount findmnt getfattr fio shellcheck xmllint
ensure_fuse
# libvirt tests: libvirtd (QEMU driver) and virsh, started by the tests themselves
ensure_libvirt
# the VM state tests run QEMU's system emulator (unpacked: see common.sh)
ensure_qemu_system

threads=${SNAPFS_TEST_THREADS:-4}
failed=()

section "shellcheck"
if shellcheck -x scripts/*.sh .ci/run mount-helper/mount.snapfs mount-helper/umount.fuse.snapfs mount-helper/umount.fuse; then
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
# The output is kept so that the end of the log (all a CI summary may show) can name the failed
# tests and their panics again after the long fuzz output.
test_log=$(mktemp)
trap 'rm -f "$test_log"' EXIT
if ! "${test_cmd[@]}" 2>&1 | tee "$test_log"; then
    failed+=(tests)
fi

# Fuzzing after the tests: a bounded run of every target from the committed seeds; a finding
# fails the script and scripts/fuzz.sh prints the path of the input. Longer runs: by hand.
fuzz_seconds=${SNAPFS_TEST_FUZZ_SECONDS:-25}
[[ $fuzz_seconds =~ ^[0-9]+$ ]] || die "SNAPFS_TEST_FUZZ_SECONDS=$fuzz_seconds: not a number of seconds"
if [[ $fuzz_seconds -gt 0 ]]; then
    section "fuzz every target for ${fuzz_seconds}s (scripts/fuzz.sh)"
    fuzz_start=$SECONDS
    if scripts/fuzz.sh "$fuzz_seconds"; then
        echo "ok: fuzzing took $((SECONDS - fuzz_start))s"
    else
        failed+=(fuzz)
        echo "FAILED: fuzz (the failing inputs are listed above)"
    fi
fi

if [[ " ${failed[*]} " == *" tests "* ]]; then
    section "the failed tests again (their whole output is above)"
    grep -E '^ *(FAIL|SIGKILL|SIGSEGV|SIGABRT|SIGBUS|TIMEOUT|LEAK-FAIL) \[' "$test_log" | sort -u | head -20 || true
    grep -A1 -E 'panicked at' "$test_log" | cut -c1-300 | head -24 || true
fi

if [[ ${#failed[@]} -gt 0 ]]; then
    echo "FAILED: ${failed[*]}"
    exit 1
fi
echo "all checks, tests and fuzz targets passed"
