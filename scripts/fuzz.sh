#!/usr/bin/env bash
# Fuzzes the qcow2 engine: runs every cargo-fuzz target of fuzz/ for SECONDS each (default 60).
#   scripts/fuzz.sh [SECONDS]
# Installs what is missing (g++ for libFuzzer, cargo-fuzz from crates.io). cargo-fuzz needs
# nightly-only rustc flags (-Zsanitizer, -Cpasses=sancov...); RUSTC_BOOTSTRAP=1 lets the stable
# toolchain accept them, so no nightly toolchain is needed.
# Corpus: fuzz/corpus/TARGET (grows, gitignored) plus the committed seeds in
# fuzz/corpus-seeds/TARGET. Crashes land in fuzz/artifacts/TARGET/; turn each into a regression
# test (see fuzz/README.md).
# Env: SNAPFS_FUZZ_SANITIZER (none | address; default none: the engine is safe Rust, and without
# ASan the 2-CPU CI machines run several times more inputs), SNAPFS_FUZZ_TARGETS (default: all).
# Exit status: 0 when no target found anything.
set -euo pipefail

# shellcheck source=scripts/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
cd "$REPO_ROOT"

seconds=${1:-60}
[[ $seconds =~ ^[0-9]+$ && $seconds -gt 0 ]] || die "usage: scripts/fuzz.sh [SECONDS] (a positive number)"
sanitizer=${SNAPFS_FUZZ_SANITIZER:-none}

ensure_rust
ensure_tools g++
if ! cargo fuzz --version >/dev/null 2>&1; then
    section "cargo install cargo-fuzz"
    cargo install --locked cargo-fuzz
fi
export RUSTC_BOOTSTRAP=1
# Where the image_read target writes its input files (removed at the end).
shm=/dev/shm
[[ -d $shm && -w $shm ]] || shm=${TMPDIR:-/tmp}
SNAPFS_FUZZ_WORKDIR=$(mktemp -d "$shm/snapfs-fuzz.XXXXXX")
export SNAPFS_FUZZ_WORKDIR
trap 'rm -rf "$SNAPFS_FUZZ_WORKDIR"' EXIT

read -r -a targets <<<"${SNAPFS_FUZZ_TARGETS:-$(cargo fuzz list --fuzz-dir fuzz | tr '\n' ' ')}"
failed=()
for target in "${targets[@]}"; do
    section "fuzz $target for ${seconds}s"
    mkdir -p "fuzz/corpus/$target"
    # -a: debug assertions, so that integer overflows panic as in tests.
    # -timeout: one input taking longer is a hang; -rss_limit_mb: memory must stay bounded.
    if cargo fuzz run --fuzz-dir fuzz -a -s "$sanitizer" "$target" \
        "fuzz/corpus/$target" "fuzz/corpus-seeds/$target" -- \
        -max_total_time="$seconds" -timeout=10 -rss_limit_mb=1024 -print_final_stats=1; then
        echo "ok: $target"
    else
        failed+=("$target")
        echo "FAILED: $target (inputs in fuzz/artifacts/$target/)"
    fi
done

if [[ ${#failed[@]} -gt 0 ]]; then
    echo "fuzz targets with findings: ${failed[*]}"
    exit 1
fi
echo "all fuzz targets ran ${seconds}s each without findings"
