#!/usr/bin/env bash
# Fuzzes the qcow2 engine: runs every cargo-fuzz target of fuzz/ for SECONDS each (default 60).
#   scripts/fuzz.sh [SECONDS]
# scripts/test.sh runs it for a short while (SNAPFS_TEST_FUZZ_SECONDS); longer runs are by hand.
# All targets are built first, in one cargo invocation (one instrumented build of the engine and
# its dependencies, shared by the targets).
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
# -a: debug assertions, so that integer overflows panic as in tests. Build and run take the same
# flags, so that `cargo fuzz run` finds the build up to date.
build_flags=(--fuzz-dir fuzz -a -s "$sanitizer")

section "cargo fuzz build (${targets[*]})"
start=$SECONDS
if [[ -n ${SNAPFS_FUZZ_TARGETS:-} ]]; then
    for target in "${targets[@]}"; do
        cargo fuzz build "${build_flags[@]}" "$target"
    done
else
    cargo fuzz build "${build_flags[@]}"
fi
echo "built in $((SECONDS - start))s"

failed=()
# Files older than this are earlier findings, not this run's.
marker=$(mktemp "$SNAPFS_FUZZ_WORKDIR/marker.XXXXXX")
for target in "${targets[@]}"; do
    section "fuzz $target for ${seconds}s"
    mkdir -p "fuzz/corpus/$target" "fuzz/artifacts/$target"
    # -timeout: one input taking longer is a hang; -rss_limit_mb: memory must stay bounded.
    if cargo fuzz run "${build_flags[@]}" "$target" \
        "fuzz/corpus/$target" "fuzz/corpus-seeds/$target" -- \
        -max_total_time="$seconds" -timeout=10 -rss_limit_mb=1024 -print_final_stats=1; then
        echo "ok: $target"
    else
        failed+=("$target")
        echo "FAILED: $target"
        found=0
        while IFS= read -r -d '' input; do
            echo "  input that fails $target: $input"
            found=1
        done < <(find "fuzz/artifacts/$target" -type f -newer "$marker" -print0)
        [[ $found -eq 1 ]] || echo "  (no new input in fuzz/artifacts/$target/: see the output above)"
        echo "  replay: RUSTC_BOOTSTRAP=1 cargo fuzz run ${build_flags[*]} $target INPUT"
    fi
done

if [[ ${#failed[@]} -gt 0 ]]; then
    echo "fuzz targets with findings: ${failed[*]}"
    exit 1
fi
echo "all fuzz targets ran ${seconds}s each without findings"
