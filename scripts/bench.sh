#!/usr/bin/env bash
# snapfs benchmark against its natural peer, qemu-storage-daemon's FUSE export of the same image.
#
# usage: scripts/bench.sh [--quick] [--runs N] [--keep]
#   --quick    1 run per workload and 5 s fio runs (a smoke run; numbers are rough)
#   --runs N   runs per workload (default 3); the table shows the median
#   --keep     keep the work directory (images) afterwards
# env: SNAPFS_BENCH_DIR   work directory (default /tmp/snapfs-bench; must not be on tmpfs for
#                         the copy workload to mean anything); emptied of its images on exit
#      SNAPFS_BENCH_RUNS  same as --runs;  SNAPFS_BENCH_FIO_SECONDS  fio run time (default 10)
#      SNAPFS_BENCH_PEER_MEMORY=1  also read the 64 GiB image through the peer for its peak RSS
#                         (about 5 minutes; the memory row shows "-" for the peer without it)
#      SNAPFS_BENCH_WORKLOADS  which workloads, in order
#                         (default "mount seqread randread chain write copy manysnap memory diff")
#
# Test image: 4 GiB virtual qcow2 (64 KiB clusters), 1 GiB of incompressible data (4 x 256 MiB at
# 0, 1, 2, 3 GiB), then 3 internal snapshots s1, s2, s3, each followed by a 64 MiB overwrite
# (at 0, 1 GiB, 2 GiB). So every view holds 1 GiB of data and 3 GiB of holes.
# Further images, built by the workloads that need them:
#   chain:    a 5-layer external chain (chain0 <- ... <- chain4.qcow2, 4 GiB virtual): the base
#             holds 1 GiB as above; each overlay overwrites 64 MiB of scattered 64 KiB pieces, so
#             a read of the top falls through up to 4 layers. Random reads of its live view, and
#             mount time of its top.
#   write:    a fresh empty 4 GiB qcow2 per run (same for both), mounted read-write; fio writes
#             to live.raw (snapfs) or to the writable export (peer), end_fsync=1; the same
#             jobs again with an fsync every 64 writes.
#   manysnap: a 1 GiB qcow2 with 16 MiB of data and 1000 internal snapshots; mount time.
#   memory:   a 64 GiB qcow2 with one 64 KiB cluster written every 256 MiB (so every L2 table
#             exists); dd bs=1M of the whole live view with snapfs --cache 32M, peak RSS (VmHWM)
#             of the daemon (and of the peer with SNAPFS_BENCH_PEER_MEMORY=1). One run.
#   diff:     a 64 GiB qcow2 (64 KiB clusters) with one cluster written every 256 MiB (every L2
#             table exists), snapshot s1, one cluster rewritten in every 512 MiB (every L2 table
#             copied), snapshot s2: the change list s1..s2 compares every entry of all 128 L2
#             tables (the worst case; tables the two share are skipped whole). `snapfs diff
#             --json` without a mount, and `cat changes/s1..s2.json` on a mount. No peer: no
#             qemu tool lists what changed between two internal snapshots from the metadata.
#
# What is compared with what:
#   snapfs is mounted read-only (-r) and measured on snapshots/s1.raw AND on live.raw.
#   The sequential read also runs on a second snapfs mount of the same image with --direct-io
#   (no page cache for the disk files, as the peer's export), rows marked "--direct-io".
#   The peer can only export the live disk (qemu-storage-daemon opens no internal snapshot), so
#   both snapfs rows are compared with the peer's export of the live disk; rows say which file.
#   Two indented "ceiling" rows compare snapfs with the machine instead of the peer: the warm
#   read with the same bytes read from tmpfs (every page present), and the sequential write with
#   the same fio job on a plain file in $SNAPFS_BENCH_DIR.
#   The copy workload compares like with like: cp --sparse=always of snapshots/s1.raw versus
#   qemu-img convert -O raw -l snapshot.name=s1 (both followed by an fsync of the output), at
#   least 5 runs; an indented row shows the copy phase alone (up to the output's fsync).
#
# Sequential reads start with one unmeasured pass over each file: on a VM that reports free
# memory to its host, the first page cache fill after memory sat free pays for host page faults
# (see wl_seqread).
# Cold cache: before each cold run the page cache of the file being read (the FUSE file) is
# dropped with posix_fadvise(DONTNEED) (dd iflag=nocache count=0), checked with fincore; the
# host image file stays in the page cache (it is read once with cat beforehand and checked with
# fincore). So "cold" measures the FUSE round trips and the format engine, not the disk.
# (echo 1 > /proc/sys/vm/drop_caches would drop the host image too, and then measure the disk.)
# If fadvise does not empty the FUSE file's cache, the script falls back to drop_caches followed
# by re-reading the host image, and says so. The peer's export bypasses the page cache (after a
# full read, fincore shows 0 pages of it cached), so its warm figures are cold ones too.
#
# Adding a workload: write a function wl_NAME that measures with `alternate` (or by hand) and
# calls `row LABEL SNAPFS PEER UNIT BETTER`, and add NAME to the default WORKLOADS list below.
# Workloads other than "mount" run with both snapfs and the peer mounted; a workload that needs
# its own image (writes, a 5-layer chain, 1000 snapshots) builds it in $WORK and mounts it itself.
set -euo pipefail
export LC_ALL=C

# shellcheck source=scripts/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

RUNS=${SNAPFS_BENCH_RUNS:-3}
FIO_SECONDS=${SNAPFS_BENCH_FIO_SECONDS:-10}
PEER_MEMORY=${SNAPFS_BENCH_PEER_MEMORY:-0}
WORK=${SNAPFS_BENCH_DIR:-/tmp/snapfs-bench}
keep=0
while [[ $# -gt 0 ]]; do
    case $1 in
    --quick) RUNS=1 FIO_SECONDS=5 ;;
    --runs)
        [[ $# -ge 2 && $2 =~ ^[1-9][0-9]*$ ]] || die "--runs needs a positive number"
        RUNS=$2
        shift
        ;;
    --keep) keep=1 ;;
    -h | --help)
        awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "$0"
        exit 0
        ;;
    *) die "unknown argument '$1' (try --help)" ;;
    esac
    shift
done

read -ra WORKLOADS <<<"${SNAPFS_BENCH_WORKLOADS:-mount seqread randread chain write copy manysnap memory diff}"

need_root
ensure_rust
ensure_tools qemu-img qemu-io qemu-storage-daemon fio fincore findmnt fusermount3
ensure_fuse

SNAPFS=$REPO_ROOT/target/release/snapfs

mkdir -p "$WORK"
WORK=$(cd "$WORK" && pwd)
IMG=$WORK/bench.qcow2
MNT=$WORK/mnt          # snapfs mount point
PEER=$WORK/peer.raw    # qemu-storage-daemon FUSE export (a regular file as mount point)
SNAP=s1                # the snapshot measured
SNAPFILE=$MNT/snapshots/$SNAP.raw
LIVEFILE=$MNT/live.raw
DMNT=$WORK/mnt-direct  # a second snapfs mount of the same image, with --direct-io
DSNAPFILE=$DMNT/snapshots/$SNAP.raw
OUT=$WORK/out.raw      # copy target
snapfs_mounted=0
direct_mounted=0
peer_pid=
# What start_snapfs / start_peer serve: the image, snapfs's extra options, whether the peer
# export is writable. Workloads with their own image set these and restore them.
S_IMG=$IMG
S_OPTS=(-r)
# A copy of the snapshot's bytes in tmpfs, for the page cache ceiling of the warm read.
CEILING_FILE=/dev/shm/snapfs-bench-ceiling.$$
P_WRITABLE=off

# ---------------------------------------------------------------- cleanup
cleanup() {
    local rc=$?
    set +e
    stop_snapfs
    stop_direct
    stop_peer
    rm -f "$OUT" "$WORK"/rand.* "$WORK"/plain.raw "$CEILING_FILE"
    if [[ $keep -eq 0 ]]; then
        rm -f "$IMG" "$PEER" "$WORK"/chain*.qcow2 "$WORK"/write.qcow2 "$WORK"/many.qcow2 \
            "$WORK"/big.qcow2 "$WORK"/diff.qcow2 "$WORK"/qsd.pid
        rmdir "$MNT" "$DMNT" "$WORK" 2>/dev/null
    else
        note "work directory kept: $WORK"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---------------------------------------------------------------- helpers
now() { echo "$EPOCHREALTIME"; }
elapsed() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.6f", b - a }'; }
median() {
    printf '%s\n' "$@" | sort -g | awk '{ v[NR] = $1 }
        END { if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}
wait_readable() { # FILE: wait up to 30 s until its first 4 KiB can be read
    local i
    for ((i = 0; i < 6000; i++)); do
        head -c 4096 "$1" >/dev/null 2>&1 && return 0
        sleep 0.005
    done
    return 1
}
wait_gone() { # PID (not our child)
    local i
    for ((i = 0; i < 300; i++)); do
        kill -0 "$1" 2>/dev/null || return 0
        sleep 0.1
    done
    return 1
}
resident_pages() { fincore -n -b -o PAGES "$1" 2>/dev/null | awk '{ print $1 }'; }
file_pages() { echo $((($(stat -c %s "$1") + 4095) / 4096)); }

# Keep the host image files in the page cache (cold runs measure snapfs/the peer, not the disk).
# Called before every measured read: the kernel may reclaim pages it has not seen used for a
# while (this machine kind runs DAMON-based reclaim), and a random read run touches few of them.
HOST_FILES=("$IMG")
warm_host_image() {
    local f res all
    for f in "${HOST_FILES[@]}"; do
        cat "$f" >/dev/null
        res=$(resident_pages "$f")
        all=$(file_pages "$f")
        if [[ -n $res && $res -lt $((all * 95 / 100)) ]]; then
            warn "only $res of $all pages of $f stay in the page cache (low memory?): figures include disk reads"
        fi
    done
}

drop_cache_method=fadvise
# Drop the page cache of one FUSE file (a view, or the peer's export).
drop_view_cache() {
    local f=$1 res
    if [[ $drop_cache_method == fadvise ]]; then
        dd if="$f" iflag=nocache count=0 status=none
        res=$(resident_pages "$f")
        [[ -z $res || $res -eq 0 ]] && return 0
        warn "posix_fadvise(DONTNEED) left $res pages of $f cached: using drop_caches (and re-reading the host image) instead"
        drop_cache_method=drop_caches
    fi
    sync
    echo 1 >/proc/sys/vm/drop_caches
    warm_host_image
}

# ---------------------------------------------------------------- the two servers
# mount_snapfs MOUNTPOINT FILE OPTIONS...: mounts $S_IMG and waits until FILE is readable
mount_snapfs() {
    local mp=$1 file=$2
    shift 2
    mkdir -p "$mp"
    "$SNAPFS" mount "$@" "$S_IMG" "$mp"
    wait_readable "$file" || die "snapfs $* mounted $S_IMG but $file is not readable"
}
unmount_snapfs() {
    "$SNAPFS" umount "$1" 2>/dev/null || fusermount3 -u "$1" 2>/dev/null || umount -l "$1"
}
start_snapfs() {
    snapfs_mounted=1
    mount_snapfs "$MNT" "$LIVEFILE" "${S_OPTS[@]}"
}
stop_snapfs() {
    [[ $snapfs_mounted -eq 1 ]] || return 0
    unmount_snapfs "$MNT"
    snapfs_mounted=0
}
# The same image mounted a second time with --direct-io (no page cache for the disk files).
start_direct() {
    direct_mounted=1
    mount_snapfs "$DMNT" "$DSNAPFILE" -r --direct-io
}
stop_direct() {
    [[ $direct_mounted -eq 1 ]] || return 0
    unmount_snapfs "$DMNT"
    direct_mounted=0
}
start_peer() {
    : >"$PEER"
    local ro=on
    [[ $P_WRITABLE == on ]] && ro=off
    # The qcow2 driver opens the backing chain named in the header by itself.
    qemu-storage-daemon --daemonize --pidfile "$WORK/qsd.pid" \
        --blockdev "driver=file,node-name=f,filename=$S_IMG,locking=off,read-only=$ro" \
        --blockdev "driver=qcow2,node-name=q,file=f,read-only=$ro" \
        --export "type=fuse,id=e,node-name=q,mountpoint=$PEER,writable=$P_WRITABLE"
    peer_pid=$(<"$WORK/qsd.pid")
    wait_readable "$PEER" || die "qemu-storage-daemon export $PEER is not readable"
}
stop_peer() {
    [[ -n $peer_pid ]] || return 0
    kill "$peer_pid" 2>/dev/null
    wait_gone "$peer_pid" || warn "qemu-storage-daemon $peer_pid did not exit"
    # a daemon that died without unmounting leaves a dead FUSE mount behind
    if findmnt "$PEER" >/dev/null 2>&1; then umount -l "$PEER"; fi
    peer_pid=
}

# ---------------------------------------------------------------- results
ROWS=()
# row LABEL SNAPFS PEER UNIT BETTER(lower|higher); ratio > 1 means snapfs is better
row() {
    local ratio
    ratio=$(awk -v s="$2" -v p="$3" -v b="$5" 'BEGIN {
        if (s <= 0 || p <= 0) { print "-"; exit }
        printf "%.2fx", (b == "lower") ? p / s : s / p }')
    ROWS+=("$1"$'\t'"$(fmt_value "$2" "$4")"$'\t'"$(fmt_value "$3" "$4")"$'\t'"$ratio")
    printf '  %-52s snapfs %-12s peer %-12s %s\n' "$1" "$(fmt_value "$2" "$4")" "$(fmt_value "$3" "$4")" "$ratio"
}
fmt_value() {
    case $2 in
    s) awk -v v="$1" 'BEGIN { printf "%.2f s", v }' ;;
    ms) awk -v v="$1" 'BEGIN { if (v > 0) printf "%.0f ms", v * 1000; else print "-" }' ;;
    iops) awk -v v="$1" 'BEGIN { printf "%.0f IOPS", v }' ;;
    mibs) awk -v v="$1" 'BEGIN { printf "%.0f MiB/s", v }' ;;
    mib) awk -v v="$1" 'BEGIN { if (v > 0) printf "%.1f MiB", v; else print "-" }' ;;
    *) echo "$1 $2" ;;
    esac
}

# alternate A B: run A then B, RUNS times; each sets RESULT to one number. Sets A_MED, B_MED.
# (Measuring functions set globals instead of printing, so that they run in this shell and
# the cleanup trap knows about everything they mount.)
alternate() {
    local a=$1 b=$2 i
    local as=() bs=()
    for ((i = 0; i < RUNS; i++)); do
        "$a"
        as+=("$RESULT")
        "$b"
        bs+=("$RESULT")
    done
    A_MED=$(median "${as[@]}")
    B_MED=$(median "${bs[@]}")
}

# ---------------------------------------------------------------- workloads
# mount: command start until the first 4 KiB of the live disk can be read
time_snapfs_mount() {
    local t0 t1
    t0=$(now)
    start_snapfs
    t1=$(now)
    stop_snapfs
    RESULT=$(elapsed "$t0" "$t1")
}
time_peer_mount() {
    local t0 t1
    t0=$(now)
    start_peer
    t1=$(now)
    stop_peer
    RESULT=$(elapsed "$t0" "$t1")
}
wl_mount() {
    section "mount time"
    alternate time_snapfs_mount time_peer_mount
    row "mount: command start -> live disk readable" "$A_MED" "$B_MED" ms lower
}

# seqread: dd bs=1M of the whole file; cold (view cache dropped) then warm (read again at once)
seq_pair() { # FILE -> COLD, WARM (seconds)
    local f=$1 t0 t1 t2
    warm_host_image
    drop_view_cache "$f"
    t0=$(now)
    dd if="$f" of=/dev/null bs=1M status=none
    t1=$(now)
    dd if="$f" of=/dev/null bs=1M status=none
    t2=$(now)
    COLD=$(elapsed "$t0" "$t1")
    WARM=$(elapsed "$t1" "$t2")
}
wl_seqread() {
    section "sequential read, dd bs=1M of the whole 4 GiB file"
    local i f sc=() sw=() lc=() lw=() pc=() pw=() dc=() dw=()
    start_direct
    # One pass of each, not measured. This machine kind's VM reports free memory to its host
    # ("Free page reporting enabled" at boot), which takes those pages away; the first use of
    # such a page faults in the host. A page cache read allocates a page per 4 KiB, so the
    # first cold read after memory sat free took 4.2 s to 8.2 s where the next took 1.5 s (the
    # peer and --direct-io, which allocate no pages, did not change).
    for f in "$SNAPFILE" "$PEER" "$LIVEFILE" "$DSNAPFILE"; do seq_pair "$f"; done
    for ((i = 0; i < RUNS; i++)); do
        seq_pair "$SNAPFILE"
        sc+=("$COLD") sw+=("$WARM")
        seq_pair "$PEER"
        pc+=("$COLD") pw+=("$WARM")
        seq_pair "$LIVEFILE"
        lc+=("$COLD") lw+=("$WARM")
        seq_pair "$DSNAPFILE"
        dc+=("$COLD") dw+=("$WARM")
    done
    stop_direct
    local pcm pwm
    pcm=$(median "${pc[@]}")
    pwm=$(median "${pw[@]}")
    row "seq read, cold [snapshots/$SNAP.raw vs live]" "$(median "${sc[@]}")" "$pcm" s lower
    row "seq read, cold [live.raw vs live]" "$(median "${lc[@]}")" "$pcm" s lower
    row "seq read again, warm [snapshots/$SNAP.raw vs live]" "$(median "${sw[@]}")" "$pwm" s lower
    row "seq read again, warm [live.raw vs live]" "$(median "${lw[@]}")" "$pwm" s lower
    row "seq read, --direct-io [snapshots/$SNAP.raw vs live]" "$(median "${dc[@]}")" "$pcm" s lower
    row "seq read again, --direct-io [snapshots/$SNAP.raw vs live]" "$(median "${dw[@]}")" "$pwm" s lower
    if ceiling_read; then
        row "  page cache ceiling: warm snapfs vs tmpfs [same bytes, all pages present]" \
            "$(median "${sw[@]}")" "$CEILING" s lower
    fi
}
# The machine's ceiling for a warm read: the same 4 GiB read with dd from tmpfs, every page
# present (dd writes the holes out as zeros), so copying out of the page cache is all there is
# to it. A warm read through any FUSE file system is this copy plus the system calls, plus on
# the first pass after the pages were read in, the kernel moving each 4 KiB page to its active
# list (the median of these passes reads pages already active). Sets CEILING (seconds); fails
# if /dev/shm has no room for the copy.
ceiling_read() {
    local avail i t0 t1 runs=()
    avail=$(df --output=avail -B1 /dev/shm 2>/dev/null | tail -n 1)
    if [[ ! $avail =~ ^[0-9]+$ ]] || ((avail < 5 * 1024 * 1024 * 1024)); then
        warn "no 5 GiB free in /dev/shm: no page cache ceiling row"
        return 1
    fi
    dd if="$SNAPFILE" of="$CEILING_FILE" bs=1M status=none
    for ((i = 0; i < RUNS; i++)); do
        t0=$(now)
        dd if="$CEILING_FILE" of=/dev/null bs=1M status=none
        t1=$(now)
        runs+=("$(elapsed "$t0" "$t1")")
    done
    rm -f "$CEILING_FILE"
    CEILING=$(median "${runs[@]}")
}

# randread: fio 4 KiB random reads, psync, time-based; prints IOPS. O_DIRECT, so that every read
# goes to the daemon: the peer's export has no page cache at all, and buffered runs measured the
# pages that a 10 s run over a 4 GiB file had already brought in (from one run to the next the
# same mount gave 35k to 140k IOPS as those accumulated), not FUSE and the format engine.
fio_iops() { # FILE JOBS
    warm_host_image
    fio --name=randread --filename="$1" --readonly --rw=randread --bs=4k --ioengine=psync \
        --direct=1 --numjobs="$2" --time_based --runtime="$FIO_SECONDS" \
        --group_reporting --output-format=terse --terse-version=3 |
        awk -F';' '{ print $8 }'
}
wl_randread() {
    local jobs i
    for jobs in 1 2; do
        section "random 4 KiB reads, fio psync O_DIRECT, $jobs job(s), ${FIO_SECONDS}s"
        local s=() l=() p=()
        for ((i = 0; i < RUNS; i++)); do
            s+=("$(fio_iops "$SNAPFILE" "$jobs")")
            p+=("$(fio_iops "$PEER" "$jobs")")
            l+=("$(fio_iops "$LIVEFILE" "$jobs")")
        done
        local pm
        pm=$(median "${p[@]}")
        row "rand 4K read, $jobs job(s) [snapshots/$SNAP.raw vs live]" "$(median "${s[@]}")" "$pm" iops higher
        row "rand 4K read, $jobs job(s) [live.raw vs live]" "$(median "${l[@]}")" "$pm" iops higher
        [[ $jobs -eq 2 ]] && SINGLE_LIVE_RR2=$(median "${l[@]}")
    done
}

# copy: a snapshot to a sparse raw file, output fsynced. Both sides write the same 1 GiB to the
# same disk, so the output's fsync is most of either figure and moves with the disk; the copy
# phase before it (COPY_PHASE_S, COPY_PHASE_P) is where the two differ, and gets its own row.
COPY_PHASE_S=() COPY_PHASE_P=()
# The previous copy's output is deleted, and the deletion made durable, before the clock starts:
# on a file system mounted with discard, freeing 1 GiB sends discards the next run would pay for.
clear_copy_target() {
    rm -f "$OUT"
    sync -f "$WORK"
}
copy_snapfs() {
    local t0 t1 t2
    clear_copy_target
    warm_host_image
    drop_view_cache "$SNAPFILE"
    t0=$(now)
    cp --sparse=always "$SNAPFILE" "$OUT"
    t1=$(now)
    sync "$OUT"
    t2=$(now)
    COPY_PHASE_S+=("$(elapsed "$t0" "$t1")")
    RESULT=$(elapsed "$t0" "$t2")
}
copy_peer() {
    local t0 t1 t2
    clear_copy_target
    warm_host_image
    t0=$(now)
    qemu-img convert -U -O raw -l "snapshot.name=$SNAP" "$IMG" "$OUT"
    t1=$(now)
    sync "$OUT"
    t2=$(now)
    COPY_PHASE_P+=("$(elapsed "$t0" "$t1")")
    RESULT=$(elapsed "$t0" "$t2")
}
check_copies_equal() {
    local a b
    copy_snapfs
    a=$(sha256sum <"$OUT")
    copy_peer
    b=$(sha256sum <"$OUT")
    [[ $a == "$b" ]] || die "cp of $SNAPFILE and qemu-img convert -l snapshot.name=$SNAP differ"
}
wl_copy() {
    section "copy snapshot $SNAP to a raw file"
    check_copies_equal
    COPY_PHASE_S=() COPY_PHASE_P=()
    # the output's fsync makes this the noisiest row: at least 5 runs unless --quick
    local RUNS=$RUNS
    ((RUNS >= 3 && RUNS < 5)) && RUNS=5
    alternate copy_snapfs copy_peer
    row "copy snapshot $SNAP: cp --sparse=always vs qemu-img convert -l" "$A_MED" "$B_MED" s lower
    row "  copy phase only, before the output's fsync" "$(median "${COPY_PHASE_S[@]}")" \
        "$(median "${COPY_PHASE_P[@]}")" s lower
    rm -f "$OUT"
}

# ---------------------------------------------------------------- own-image workloads
# with_image IMG SNAPFS_OPTS... -- CMD...: runs CMD with start_snapfs/start_peer serving IMG
with_image() {
    local img=$1
    shift
    local opts=()
    while [[ $1 != -- ]]; do
        opts+=("$1")
        shift
    done
    shift
    local saved_img=$S_IMG saved_opts=("${S_OPTS[@]}")
    S_IMG=$img
    S_OPTS=("${opts[@]}")
    "$@"
    S_IMG=$saved_img
    S_OPTS=("${saved_opts[@]}")
}

# chain: 5 layers; random reads of the top's live view, and mount time
make_chain() {
    [[ -e $WORK/chain4.qcow2 ]] && return 0
    section "5-layer chain: $WORK/chain0.qcow2 <- ... <- chain4.qcow2"
    cp --sparse=always "$IMG" "$WORK/chain0.qcow2"
    # the base keeps its data but not its internal snapshots (they do not matter here)
    local i j cmds
    for i in 1 2 3; do qemu-img snapshot -d "s$i" "$WORK/chain0.qcow2"; done
    for i in 1 2 3 4; do
        qemu-img create -q -f qcow2 -F qcow2 -b "chain$((i - 1)).qcow2" "$WORK/chain$i.qcow2"
        head -c 64k /dev/urandom >"$WORK/rand.$i"
        cmds=()
        # 1024 pieces of 64 KiB, one per 4 MiB, at a different phase per layer
        for ((j = 0; j < 1024; j++)); do
            cmds+=(-c "write -q -s $WORK/rand.$i $(((j * 4 + i - 1) << 20)) 64k")
        done
        qemu-io -f qcow2 "${cmds[@]}" "$WORK/chain$i.qcow2" >/dev/null
        rm -f "$WORK/rand.$i"
    done
    qemu-img check -q "$WORK/chain4.qcow2"
}
chain_randread() {
    local jobs=2 i s=() p=()
    start_snapfs
    start_peer
    for ((i = 0; i < RUNS; i++)); do
        s+=("$(fio_iops "$LIVEFILE" "$jobs")")
        p+=("$(fio_iops "$PEER" "$jobs")")
    done
    stop_peer
    stop_snapfs
    CHAIN_S=$(median "${s[@]}")
    CHAIN_P=$(median "${p[@]}")
}
wl_chain() {
    make_chain
    # like the main image: the layers stay in the host page cache (reads measure snapfs/the peer)
    HOST_FILES=("$WORK"/chain?.qcow2)
    warm_host_image
    section "5-layer chain: random 4 KiB reads of the live view, 2 jobs; mount time"
    with_image "$WORK/chain4.qcow2" -r -- chain_randread
    row "rand 4K read, 2 jobs, 5-layer chain [live.raw vs live]" "$CHAIN_S" "$CHAIN_P" iops higher
    if [[ -n ${SINGLE_LIVE_RR2:-} ]]; then
        row "  same, snapfs: 5-layer chain vs single image (target >= 0.77x)" "$CHAIN_S" "$SINGLE_LIVE_RR2" iops higher
    fi
    with_image "$WORK/chain4.qcow2" -r -- alternate time_snapfs_mount time_peer_mount
    row "mount: 5-layer chain, command start -> live disk readable" "$A_MED" "$B_MED" ms lower
    HOST_FILES=("$IMG")
}

# write: fio on live.raw of a fresh image; MiB/s (sequential) and IOPS (random)
WIMG=$WORK/write.qcow2
fresh_write_image() { rm -f "$WIMG" && qemu-img create -q -f qcow2 "$WIMG" 4G; }
fio_write() { # FILE seq|rand [FSYNC_EVERY] -> RESULT (MiB/s or IOPS)
    local args sync=()
    # An fsync every N writes: the guest that flushes often, where write ordering costs most.
    [[ -n ${3:-} ]] && sync=(--fsync="$3")
    if [[ $2 == seq ]]; then
        args=(--rw=write --bs=1M --size=1G)
    else
        args=(--rw=randwrite --bs=4k --size=4G --time_based --runtime="$FIO_SECONDS")
    fi
    RESULT=$(fio --name=write --filename="$1" "${args[@]}" "${sync[@]}" --ioengine=psync --direct=0 \
        --end_fsync=1 --output-format=terse --terse-version=3 |
        awk -F';' -v kind="$2" '{ print (kind == "seq") ? $48 / 1024 : $49 }')
}
write_snapfs() { # seq|rand [FSYNC_EVERY]
    fresh_write_image
    with_image "$WIMG" -- start_snapfs
    fio_write "$LIVEFILE" "$1" "${2:-}"
    stop_snapfs
    qemu-img check -q "$WIMG" || die "qemu-img check of the image snapfs wrote failed"
}
write_peer() { # seq|rand [FSYNC_EVERY]
    fresh_write_image
    P_WRITABLE=on
    with_image "$WIMG" -- start_peer
    P_WRITABLE=off
    fio_write "$PEER" "$1" "${2:-}"
    stop_peer
}
# The same job on a sparse plain file next to the images: what this file system and disk take
# when nothing stands between fio and the page cache.
seqwrite_plain() {
    local plain=$WORK/plain.raw
    rm -f "$plain"
    truncate -s 4G "$plain"
    fio_write "$plain" seq
    rm -f "$plain"
}
seqwrite_snapfs() { write_snapfs seq; }
seqwrite_peer() { write_peer seq; }
randwrite_snapfs() { write_snapfs rand; }
randwrite_peer() { write_peer rand; }
seqwrite64_snapfs() { write_snapfs seq 64; }
seqwrite64_peer() { write_peer seq 64; }
randwrite64_snapfs() { write_snapfs rand 64; }
randwrite64_peer() { write_peer rand 64; }
wl_write() {
    section "writes to live.raw of a fresh 4 GiB image: fio psync, end_fsync=1"
    alternate seqwrite_snapfs seqwrite_peer
    row "seq write 1 MiB, 1 GiB [live.raw vs live]" "$A_MED" "$B_MED" mibs higher
    local i plain=()
    for ((i = 0; i < RUNS; i++)); do
        seqwrite_plain
        plain+=("$RESULT")
    done
    row "  disk ceiling: snapfs vs the same fio job on a plain file in $WORK" \
        "$A_MED" "$(median "${plain[@]}")" mibs higher
    alternate randwrite_snapfs randwrite_peer
    row "rand 4K write, ${FIO_SECONDS}s [live.raw vs live]" "$A_MED" "$B_MED" iops higher
    alternate seqwrite64_snapfs seqwrite64_peer
    row "seq write 1 MiB, 1 GiB, fsync every 64 writes [live.raw vs live]" "$A_MED" "$B_MED" mibs higher
    alternate randwrite64_snapfs randwrite64_peer
    row "rand 4K write, ${FIO_SECONDS}s, fsync every 64 writes [live.raw vs live]" "$A_MED" "$B_MED" iops higher
    rm -f "$WIMG"
}

# manysnap: mount time of an image with 1000 internal snapshots
make_many() {
    local many=$WORK/many.qcow2
    [[ -e $many ]] && return 0
    section "1000-snapshot image: $many (this takes a while)"
    qemu-img create -q -f qcow2 "$many.tmp" 1G
    head -c 16M /dev/urandom >"$WORK/rand.m"
    qemu-io -f qcow2 -c "write -q -s $WORK/rand.m 0 16M" "$many.tmp"
    rm -f "$WORK/rand.m"
    local i
    for ((i = 1; i <= 1000; i++)); do
        qemu-img snapshot -c "snap$i" "$many.tmp"
    done
    mv "$many.tmp" "$many"
    qemu-img check -q "$many"
}
wl_manysnap() {
    make_many
    section "mount time, 1000 internal snapshots"
    with_image "$WORK/many.qcow2" -r -- alternate time_snapfs_mount time_peer_mount
    row "mount: 1000 snapshots, command start -> live disk readable" "$A_MED" "$B_MED" ms lower
    with_image "$WORK/many.qcow2" -r -- count_snapshot_files
    [[ $RESULT -eq 1000 ]] || die "the snapfs mount of many.qcow2 shows $RESULT snapshot files, not 1000"
}
count_snapshot_files() {
    start_snapfs
    RESULT=$(find "$MNT/snapshots" -name '*.raw' | wc -l)
    stop_snapfs
}

# memory: peak RSS while reading a 64 GiB sparse image end to end
BIG=$WORK/big.qcow2
make_big() {
    [[ -e $BIG ]] && return 0
    section "64 GiB image: $BIG"
    qemu-img create -q -f qcow2 "$BIG.tmp" 64G
    local i cmds=()
    for ((i = 0; i < 256; i++)); do
        cmds+=(-c "write -q -P $((i % 250 + 1)) $((i << 28)) 64k")
    done
    qemu-io -f qcow2 "${cmds[@]}" "$BIG.tmp" >/dev/null
    mv "$BIG.tmp" "$BIG"
}
peak_kib() { awk '/^VmHWM:/ { print $2 }' "/proc/$1/status"; }
wl_memory() {
    make_big
    section "peak memory: dd bs=1M of a 64 GiB image (256 clusters of data), snapfs --cache 32M"
    local pid t0 t1 s_kib p_kib
    mkdir -p "$MNT"
    # foreground, so that $! is the daemon itself
    "$SNAPFS" mount -f -r --cache 32M "$BIG" "$MNT" 2>"$WORK/snapfs.log" &
    pid=$!
    snapfs_mounted=1
    wait_readable "$LIVEFILE" || die "snapfs mounted $BIG but $LIVEFILE is not readable"
    t0=$(now)
    dd if="$LIVEFILE" of=/dev/null bs=1M status=none
    t1=$(now)
    s_kib=$(peak_kib "$pid")
    note "snapfs: read 64 GiB in $(elapsed "$t0" "$t1") s"
    stop_snapfs
    wait "$pid" || warn "snapfs mount -f exited with status $?"
    p_kib=0
    if [[ $PEER_MEMORY -eq 1 ]]; then
        with_image "$BIG" -r -- start_peer
        t0=$(now)
        dd if="$PEER" of=/dev/null bs=1M status=none
        t1=$(now)
        p_kib=$(peak_kib "$peer_pid")
        note "peer: read 64 GiB in $(elapsed "$t0" "$t1") s"
        stop_peer
    fi
    row "peak RSS reading 64 GiB end to end [--cache 32M vs peer]" "$(awk -v k="$s_kib" 'BEGIN { print k / 1024 }')" \
        "$(awk -v k="$p_kib" 'BEGIN { print k / 1024 }')" mib lower
}

# diff: the change list of two snapshots of a 64 GiB image, from the metadata alone
DIFFIMG=$WORK/diff.qcow2
make_diff_image() {
    [[ -e $DIFFIMG ]] && return 0
    section "64 GiB image with two snapshots, every L2 table different: $DIFFIMG"
    qemu-img create -q -f qcow2 "$DIFFIMG.tmp" 64G
    local i cmds=()
    for ((i = 0; i < 256; i++)); do
        cmds+=(-c "write -q -P $((i % 250 + 1)) $((i << 28)) 64k")
    done
    qemu-io -f qcow2 "${cmds[@]}" "$DIFFIMG.tmp" >/dev/null
    qemu-img snapshot -c s1 "$DIFFIMG.tmp"
    cmds=()
    for ((i = 0; i < 128; i++)); do
        cmds+=(-c "write -q -P 251 $(((i << 29) + (1 << 20))) 64k")
    done
    qemu-io -f qcow2 "${cmds[@]}" "$DIFFIMG.tmp" >/dev/null
    qemu-img snapshot -c s2 "$DIFFIMG.tmp"
    mv "$DIFFIMG.tmp" "$DIFFIMG"
}
time_diff_command() {
    local t0 t1 ranges
    t0=$(now)
    ranges=$("$SNAPFS" diff --json "$DIFFIMG" s1 s2 | grep -c '"start"')
    t1=$(now)
    [[ $ranges -eq 128 ]] || die "snapfs diff s1 s2 listed $ranges ranges, not 128"
    RESULT=$(elapsed "$t0" "$t1")
}
time_diff_mounted() {
    local t0 t1 ranges
    t0=$(now)
    ranges=$(grep -c '"start"' "$MNT/changes/s1..s2.json")
    t1=$(now)
    [[ $ranges -eq 128 ]] || die "changes/s1..s2.json lists $ranges ranges, not 128"
    RESULT=$(elapsed "$t0" "$t1")
}
no_peer() { RESULT=0; }
wl_diff() {
    make_diff_image
    section "change list s1..s2 of a 64 GiB image, every L2 table different (metadata only)"
    alternate time_diff_command no_peer
    row "diff 64 GiB s1..s2, 128 L2 tables: snapfs diff --json [no peer]" "$A_MED" 0 ms lower
    with_image "$DIFFIMG" -r -- start_snapfs
    alternate time_diff_mounted no_peer
    row "  same on a mount: read changes/s1..s2.json" "$A_MED" 0 ms lower
    stop_snapfs
}

# ---------------------------------------------------------------- test image
make_image() {
    section "Test image: $IMG"
    rm -f "$IMG"
    qemu-img create -q -f qcow2 "$IMG" 4G
    local i cmds=()
    for i in 0 1 2 3; do
        head -c 256M /dev/urandom >"$WORK/rand.$i"
        cmds+=(-c "write -q -s $WORK/rand.$i $((i << 30)) $((256 << 20))")
    done
    qemu-io -f qcow2 "${cmds[@]}" "$IMG"
    rm -f "$WORK"/rand.*
    for i in 1 2 3; do
        qemu-img snapshot -c "s$i" "$IMG"
        head -c 64M /dev/urandom >"$WORK/rand.$i"
        qemu-io -f qcow2 -c "write -q -s $WORK/rand.$i $(((i - 1) << 30)) $((64 << 20))" "$IMG"
        rm -f "$WORK/rand.$i"
    done
    qemu-img check -q "$IMG"
    qemu-img snapshot -l "$IMG"
    echo "image file: $(du -h --apparent-size "$IMG" | cut -f1)"
}

for w in "${WORKLOADS[@]}"; do
    declare -F "wl_$w" >/dev/null || die "unknown workload '$w' (known: $(declare -F | awk '/ wl_/ { sub("wl_", "", $3); print $3 }' | xargs))"
done

section "Building snapfs: cargo build --release"
(cd "$REPO_ROOT" && cargo build --release --quiet)

make_image
warm_host_image
# mount once (also checks the mount works) before timing anything
start_snapfs
stop_snapfs

for w in "${WORKLOADS[@]}"; do
    case $w in
    mount | chain | write | manysnap | memory | diff) "wl_$w" ;;
    *)
        start_snapfs
        start_peer
        [[ -e $SNAPFILE ]] || die "$SNAPFILE is missing from the snapfs mount"
        "wl_$w"
        stop_peer
        stop_snapfs
        ;;
    esac
done

# ---------------------------------------------------------------- report
section "Results"
echo "snapfs $(git -C "$REPO_ROOT" describe --always --dirty 2>/dev/null || echo '?') vs $(qemu-storage-daemon --version | head -1)"
echo "$(nproc) CPUs, $(awk '/MemTotal/ { printf "%.0f GiB", $2 / 1048576 }' /proc/meminfo) RAM, Linux $(uname -r); median of $RUNS run(s)"
echo
printf '| %s | %s | %s | %s |\n' workload snapfs peer "ratio (>1: snapfs better)"
printf '|---|---:|---:|---:|\n'
for r in "${ROWS[@]}"; do
    IFS=$'\t' read -r label s p ratio <<<"$r"
    printf '| %s | %s | %s | %s |\n' "$label" "$s" "$p" "$ratio"
done
echo
echo "snapfs: snapfs mount -r; peer: qemu-storage-daemon FUSE export of the same image (read-only, locking=off),"
echo "which can only show the live disk. [A vs B]: the file read through snapfs vs through the peer."
echo "Each view: 4 GiB, of which 1 GiB data. cold: that file's page cache dropped first ($drop_cache_method),"
echo "host image kept in the page cache. The peer's export bypasses the page cache (warm = cold)."
echo "Times: lower is better; IOPS: higher is better."
