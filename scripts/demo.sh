#!/usr/bin/env bash
# snapfs demo, from a fresh Debian machine:
#   1. installs what is missing (apt-get) and builds snapfs (cargo build --release);
#   2. builds a small qcow2 chain holding an ext4 file system that changes over time:
#        base.qcow2  internal snapshots "fresh-install" and "pkg-updated", then more changes
#        vm.qcow2    an overlay on base.qcow2 (an external snapshot), with further changes
#      (changes are written through qemu-storage-daemon's FUSE export + a loop device, as a VM would);
#   3. mounts vm.qcow2 with snapfs and reads an old snapshot's files next to the live ones,
#      with nothing but losetup and mount.
# Everything it mounts is unmounted on exit, also on failure or Ctrl-C.
#
# usage: scripts/demo.sh [--keep] [--images-only]
#   --keep         keep the work directory (the images) and print where it is
#   --images-only  only build the demo chain (no snapfs build, no mount); implies --keep
set -euo pipefail

# shellcheck source=scripts/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

keep=0
images_only=0
for arg in "$@"; do
    case $arg in
    --keep) keep=1 ;;
    --images-only) images_only=1 keep=1 ;;
    -h | --help)
        awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "$0"
        exit 0
        ;;
    *) die "unknown argument '$arg' (try --help)" ;;
    esac
done

need_root
ensure_tools qemu-img qemu-storage-daemon mkfs.ext4 losetup mount umount findmnt fusermount3 getfattr
ensure_fuse

SNAPFS=$REPO_ROOT/target/release/snapfs
if [[ $images_only -eq 0 ]]; then
    ensure_rust
    section "Building snapfs: cargo build --release"
    (cd "$REPO_ROOT" && cargo build --release)
fi

WORK=$(mktemp -d /tmp/snapfs-demo.XXXXXX)
cd "$WORK"

# ---- cleanup stack: every mount / loop device / daemon pushes its undo; run in reverse on exit ----
_undo=()
push_undo() { _undo+=("$1"); }
# run the newest undo action now (normal path: failures are errors); -v: print it first
pop_undo() {
    local i=$((${#_undo[@]} - 1))
    local cmd=${_undo[$i]}
    unset "_undo[$i]"
    [[ ${1:-} == -v ]] && printf '%s$ %s%s\n' "$_bold" "$cmd" "$_reset"
    eval "$cmd"
}
# forget the newest undo action (it has been done by hand)
drop_undo() { unset "_undo[$((${#_undo[@]} - 1))]"; }
on_exit() {
    local rc=$?
    set +e
    if [[ ${#_undo[@]} -gt 0 ]]; then
        note "cleaning up"
        while [[ ${#_undo[@]} -gt 0 ]]; do pop_undo; done
    fi
    cd /
    if [[ $keep -eq 1 ]]; then
        note "work directory kept: $WORK"
    else
        rm -rf "$WORK"
    fi
    [[ $rc -eq 0 ]] || note "demo FAILED (exit $rc)"
    exit "$rc"
}
trap on_exit EXIT
trap 'exit 130' INT TERM

q() { printf '%q' "$1"; }

# show a command line; show_run: show it and run it
show() { printf '%s$ %s%s\n' "$_bold" "$*" "$_reset"; }
show_run() {
    show "$@"
    "$@"
}

wait_gone() { # PID: wait up to 30 s for a process that is not our child to exit
    local i
    for ((i = 0; i < 300; i++)); do
        kill -0 "$1" 2>/dev/null || return 0
        sleep 0.1
    done
    warn "process $1 did not exit within 30 s"
    return 1
}

# with_disk IMAGE FUNC: export IMAGE (qcow2, with its backing chain) writable through
# qemu-storage-daemon's FUSE export, attach a loop device, mount its ext4 and run FUNC DIR in it;
# then unmount, detach and stop the daemon so the image is closed and consistent again.
with_disk() {
    local image=$1 func=$2 export=$WORK/export.raw dir=$WORK/edit dev pid
    : >"$export"
    mkdir -p "$dir"
    qemu-storage-daemon --daemonize --pidfile "$WORK/qsd.pid" \
        --blockdev "driver=file,node-name=f,filename=$image" \
        --blockdev driver=qcow2,node-name=q,file=f \
        --export "type=fuse,id=e,node-name=q,mountpoint=$export,writable=on"
    pid=$(<"$WORK/qsd.pid")
    push_undo "kill $pid 2>/dev/null; wait_gone $pid; if findmnt $(q "$export") >/dev/null; then umount -l $(q "$export"); fi"
    dev=$(losetup -f --show "$export")
    push_undo "losetup -d $(q "$dev")"
    mount "$dev" "$dir"
    push_undo "umount $(q "$dir")"
    "$func" "$dir"
    pop_undo # umount
    pop_undo # losetup -d
    pop_undo # stop qemu-storage-daemon
}

# ---- the guest file system at three points in time ----
install_os() {
    local d=$1
    mkdir -p "$d/etc" "$d/var/log" "$d/home/user"
    echo demo-vm >"$d/etc/hostname"
    printf 'package = webapp\nversion = 1.0\nworkers = 2\n' >"$d/etc/webapp.conf"
    echo "$(date -u +%FT%TZ) installed webapp 1.0" >"$d/var/log/install.log"
    printf 'Fresh install. Nothing changed yet.\n' >"$d/home/user/notes.txt"
}
update_packages() {
    local d=$1
    printf 'package = webapp\nversion = 1.1\nworkers = 4\n' >"$d/etc/webapp.conf"
    echo "$(date -u +%FT%TZ) upgraded webapp 1.0 -> 1.1" >>"$d/var/log/install.log"
    printf 'Upgraded webapp to 1.1, 4 workers.\n' >>"$d/home/user/notes.txt"
}
daily_use() {
    local d=$1
    printf 'package = webapp\nversion = 1.1\nworkers = 8\ndebug = true\n' >"$d/etc/webapp.conf"
    printf 'Tried 8 workers and debug mode - the box is slow now.\n' >>"$d/home/user/notes.txt"
    printf 'roll back webapp.conf?\n' >"$d/home/user/todo.txt"
}

section "Building the demo chain in $WORK"
echo "1 GiB raw disk with ext4, files written through a loop mount"
truncate -s 1G disk.raw
mkfs.ext4 -q -F -L demo disk.raw
mkdir -p edit
mount -o loop disk.raw edit
push_undo "umount $(q "$WORK/edit")"
install_os edit
pop_undo
show_run qemu-img convert -O qcow2 disk.raw base.qcow2
rm disk.raw
show_run qemu-img snapshot -c fresh-install base.qcow2
echo "upgrading packages inside base.qcow2 (qemu-storage-daemon FUSE export + losetup + mount)"
with_disk "$WORK/base.qcow2" update_packages
show_run qemu-img snapshot -c pkg-updated base.qcow2
show_run qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 vm.qcow2
echo "daily use, written into the overlay vm.qcow2"
with_disk "$WORK/vm.qcow2" daily_use
show_run qemu-img snapshot -l base.qcow2
show "qemu-img info --backing-chain vm.qcow2 | grep ..."
qemu-img info --backing-chain vm.qcow2 | grep -E '^(image|file format|virtual size|disk size|backing file):'

if [[ $images_only -eq 1 ]]; then
    section "Done: the demo chain is in $WORK (base.qcow2 <- vm.qcow2)"
    exit 0
fi

MNT=$WORK/mnt
mkdir -p "$MNT" old live

section "snapfs info vm.qcow2"
show_run "$SNAPFS" info vm.qcow2

section "snapfs mount vm.qcow2 $MNT"
show_run "$SNAPFS" mount vm.qcow2 "$MNT"
push_undo "$(q "$SNAPFS") umount $(q "$MNT") 2>/dev/null || fusermount3 -u $(q "$MNT") 2>/dev/null || umount -l $(q "$MNT")"
for _ in $(seq 50); do [[ -e $MNT/live.raw ]] && break; sleep 0.1; done
[[ -e $MNT/live.raw ]] || die "snapfs mounted but $MNT/live.raw is not there"

section "What the mount shows"
show_run ls -l "$MNT" "$MNT/snapshots/"
show_run head -n 25 "$MNT/info.json"
# internal snapshots stored in a backing layer are named LAYER@TAG.raw (docs/design.md section 2)
OLD=$MNT/snapshots/base@fresh-install.raw
show_run getfattr -d "$OLD"

section "The fresh-install snapshot is an ordinary file: loop-mount it read-only"
show losetup -r -f --show "$OLD"
old_dev=$(losetup -r -f --show "$OLD")
echo "$old_dev"
push_undo "losetup -d $(q "$old_dev")"
show_run mount -o ro,noload "$old_dev" old
push_undo "umount $(q "$WORK/old")"
show losetup -r -f --show "$MNT/live.raw"
live_dev=$(losetup -r -f --show "$MNT/live.raw")
echo "$live_dev"
push_undo "losetup -d $(q "$live_dev")"
show_run mount -o ro,noload "$live_dev" live
push_undo "umount $(q "$WORK/live")"

section "The same files: fresh-install snapshot and live disk"
for f in etc/webapp.conf home/user/notes.txt; do
    echo "--- fresh-install: $f"
    cat "old/$f"
    echo "--- live:          $f"
    cat "live/$f"
done
section "Everything that changed since fresh-install"
show_run diff -r old live || true

section "Cleaning up"
pop_undo -v # umount live
pop_undo -v # losetup -d live_dev
pop_undo -v # umount old
pop_undo -v # losetup -d old_dev
show_run "$SNAPFS" umount "$MNT"
drop_undo
section "Demo complete"
