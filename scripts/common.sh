# shellcheck shell=bash
# Shared helpers for scripts/*.sh. Source it; do not run it.
#
#   ensure_tools TOOL...   install (apt-get) the Debian packages providing any missing TOOL
#   ensure_rust            check cargo, rustfmt and clippy; add missing components with rustup
#   ensure_fuse            make sure /dev/fuse exists (modprobe fuse, else mknod)
#   ensure_libvirt         libvirtd (QEMU driver) and virsh, a libvirt-qemu user, a test qemu.conf
#   ensure_qemu_system     QEMU's x86 system emulator unpacked under a cache dir (tests that need
#                          real VM state); exports SNAPFS_QEMU_SYSTEM_ROOT
#   section TITLE          print a section header
#   note / warn / die MSG  messages on stderr (die exits 1)

REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export REPO_ROOT

if [[ -t 1 && -z ${NO_COLOR:-} ]]; then
    _bold=$'\e[1m' _red=$'\e[31m' _yellow=$'\e[33m' _reset=$'\e[0m'
else
    _bold='' _red='' _yellow='' _reset=''
fi

section() { printf '\n%s==> %s%s\n' "$_bold" "$*" "$_reset"; }
note() { printf '%s\n' "$*" >&2; }
warn() { printf '%swarning:%s %s\n' "$_yellow" "$_reset" "$*" >&2; }
die() {
    printf '%serror:%s %s\n' "$_red" "$_reset" "$*" >&2
    exit 1
}

need_root() {
    [[ $(id -u) -eq 0 ]] || die "$(basename "$0") needs root (FUSE mounts, loop devices, apt-get): run it with sudo"
}

# The Debian package(s) providing a command, best first. Verified on Debian 12
# with `dpkg -S "$(command -v TOOL)"`. qemu-storage-daemon is in qemu-utils from
# QEMU 8 on (bookworm-backports), in qemu-system-common in bookworm's QEMU 7.2.
_packages_for() {
    case $1 in
    qemu-img | qemu-io | qemu-nbd) echo qemu-utils ;;
    qemu-storage-daemon) echo qemu-utils qemu-system-common ;;
    fusermount3) echo fuse3 ;;
    mkfs.ext4 | e2fsck | debugfs) echo e2fsprogs ;;
    fio) echo fio ;;
    getfattr | setfattr) echo attr ;;
    losetup | mount | umount) echo mount ;;
    findmnt | fincore | lsblk | flock) echo util-linux ;;
    modprobe) echo kmod ;;
    cc) echo gcc ;;
    make) echo make ;;
    pkg-config) echo pkg-config ;;
    shellcheck) echo shellcheck ;;
    xmllint) echo libxml2-utils ;;
    *) echo "$1" ;;
    esac
}

_apt_updated=
_apt() {
    local log
    log=$(mktemp)
    if ! DEBIAN_FRONTEND=noninteractive apt-get "$@" </dev/null >"$log" 2>&1; then
        cat "$log" >&2
        rm -f "$log"
        return 1
    fi
    rm -f "$log"
}

_apt_install() {
    if [[ -z $_apt_updated ]]; then
        _apt update -q || die "apt-get update failed"
        _apt_updated=1
    fi
    _apt install -y -q --no-install-recommends "$@"
}

_have() { command -v "$1" >/dev/null 2>&1; }

# ensure_tools TOOL... : quiet when nothing is missing.
ensure_tools() {
    local tool pkg missing=()
    for tool in "$@"; do
        _have "$tool" || missing+=("$tool")
    done
    [[ ${#missing[@]} -eq 0 ]] && return 0
    need_root
    _have apt-get || die "missing ${missing[*]} and no apt-get to install them with"
    for tool in "${missing[@]}"; do
        _have "$tool" && continue # an earlier package brought it
        for pkg in $(_packages_for "$tool"); do
            note "installing $pkg (for $tool)"
            _apt_install "$pkg" || die "apt-get install $pkg failed"
            _have "$tool" && break
        done
        _have "$tool" || die "$tool is still missing after installing $(_packages_for "$tool")"
    done
    hash -r
}

ensure_rust() {
    _have cargo || die "cargo is missing: install Rust (https://rustup.rs) first"
    local comp sub
    for comp in rustfmt clippy; do
        sub=$comp
        [[ $comp == rustfmt ]] && sub=fmt
        if ! cargo "$sub" --version >/dev/null 2>&1; then
            _have rustup || die "cargo $comp is missing and rustup is not there to add it"
            note "adding rust component $comp"
            rustup component add "$comp" >/dev/null || die "rustup component add $comp failed"
        fi
    done
    # zstd-sys compiles C code
    ensure_tools cc
}

ensure_fuse() {
    [[ -e /etc/fuse.conf ]] || ensure_tools_pkg_fuse3
    [[ -c /dev/fuse ]] && return 0
    need_root
    if _have modprobe; then modprobe fuse 2>/dev/null || true; fi
    if [[ ! -c /dev/fuse ]] && grep -qw fuse /proc/filesystems 2>/dev/null; then
        mknod -m 0666 /dev/fuse c 10 229 2>/dev/null || true
    fi
    [[ -c /dev/fuse ]] || die "/dev/fuse is missing and 'modprobe fuse' did not create it: this kernel or container has no FUSE; run on a host with the fuse module (or pass --device /dev/fuse to the container)"
}

# /etc/fuse.conf comes with fuse3 even when fusermount3 is already somewhere.
ensure_tools_pkg_fuse3() {
    need_root
    note "installing fuse3 (for /etc/fuse.conf)"
    _apt_install fuse3 || die "apt-get install fuse3 failed"
}

# The libvirt packages the tests drive (libvirtd with its QEMU driver, virsh). Recommends stay
# out: with them apt would replace qemu-utils 10 (backports) by bookworm's QEMU 7.2 packages.
_libvirt_packages=(libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients)

# The test qemu.conf: QEMU runs as root, without seccomp, namespaces, cgroups, a security driver
# or virtlogd, so libvirtd works in a container. Written only over the packaged file (kept
# beside it as qemu.conf.snapfs-orig) or our own; a qemu.conf someone edited is left alone.
_snapfs_qemu_conf_marker='# snapfs test configuration (scripts/common.sh ensure_libvirt)'
_write_test_qemu_conf() {
    local conf=/etc/libvirt/qemu.conf
    if [[ -e $conf ]] && ! grep -qF "$_snapfs_qemu_conf_marker" "$conf"; then
        if dpkg --verify libvirt-daemon-driver-qemu 2>/dev/null | grep -q " $conf\$"; then
            warn "$conf was edited locally: left as it is (libvirt tests may need QEMU as root)"
            return 0
        fi
        cp -p "$conf" "$conf.snapfs-orig"
    fi
    cat >"$conf.snapfs-tmp" <<CONF
$_snapfs_qemu_conf_marker
user = "root"
group = "root"
dynamic_ownership = 0
remember_owner = 0
security_driver = "none"
seccomp_sandbox = 0
namespaces = [ ]
cgroup_controllers = [ ]
stdio_handler = "file"
CONF
    chmod 0600 "$conf.snapfs-tmp"
    mv -f "$conf.snapfs-tmp" "$conf"
}

ensure_libvirt() {
    local qemu_driver
    qemu_driver=$(find /usr/lib -name libvirt_driver_qemu.so -print -quit 2>/dev/null)
    if ! _have libvirtd || ! _have virsh || [[ -z $qemu_driver ]]; then
        need_root
        _have apt-get || die "libvirt is missing and no apt-get to install it with"
        if [[ -z $_apt_updated ]]; then
            _apt update -q || die "apt-get update failed"
            _apt_updated=1
        fi
        # Simulate first: never let apt remove anything (qemu-utils above all) for libvirt.
        local plan
        plan=$(DEBIAN_FRONTEND=noninteractive apt-get install --simulate --no-install-recommends \
            "${_libvirt_packages[@]}" </dev/null 2>&1) || {
            printf '%s\n' "$plan" >&2
            die "apt-get cannot install ${_libvirt_packages[*]}"
        }
        if grep -q '^Remv ' <<<"$plan"; then
            grep '^Remv ' <<<"$plan" >&2
            die "installing ${_libvirt_packages[*]} would remove the packages above: refused"
        fi
        note "installing ${_libvirt_packages[*]}"
        _apt install -y -q --no-install-recommends "${_libvirt_packages[@]}" ||
            die "apt-get install ${_libvirt_packages[*]} failed"
        hash -r
    fi
    # The QEMU driver refuses to load without its built-in user and group (libvirt-qemu, both),
    # even when qemu.conf says root.
    getent group libvirt-qemu >/dev/null || groupadd --system libvirt-qemu ||
        die "groupadd libvirt-qemu failed"
    if ! getent passwd libvirt-qemu >/dev/null; then
        need_root
        getent group kvm >/dev/null || groupadd --system kvm
        useradd --system --no-create-home --home-dir /var/lib/libvirt --shell /usr/sbin/nologin \
            --gid kvm libvirt-qemu || die "useradd libvirt-qemu failed"
    fi
    # libvirtd -d (no systemd here) logs to /var/log/libvirt and fails to start without it.
    mkdir -p /var/log/libvirt/qemu /var/lib/libvirt/qemu/snapshot
    _write_test_qemu_conf
}

# QEMU's system emulator, for tests that need real VM state (savevm/loadvm). It cannot be
# installed as a package here: Debian 12's qemu-system-x86 is QEMU 7.2, and apt would replace the
# QEMU 10 qemu-utils from backports that the other tests use as their oracle. The emulator runs
# unpacked, though: download the .debs, `dpkg -x` them into one directory, and install only the
# plain shared libraries its Depends list names that are not installed yet (never an upgrade, never
# a removal: the plan is simulated first and refused if it removes anything).
# The directory: $SNAPFS_QEMU_SYSTEM_ROOT (default /var/cache/snapfs-test/qemu-system); the
# emulator is $SNAPFS_QEMU_SYSTEM_ROOT/usr/bin/qemu-system-x86_64, its firmware under usr/share
# and usr/lib/ipxe (the tests pass them with -L).
QEMU_SYSTEM_PACKAGES=(qemu-system-x86 qemu-system-common qemu-system-data seabios ipxe-qemu)
ensure_qemu_system() {
    local root=${SNAPFS_QEMU_SYSTEM_ROOT:-/var/cache/snapfs-test/qemu-system}
    export SNAPFS_QEMU_SYSTEM_ROOT=$root
    local bin=$root/usr/bin/qemu-system-x86_64
    if [[ -x $bin ]] && "$bin" -version >/dev/null 2>&1; then
        return 0
    fi
    need_root
    _have apt-get || die "QEMU's system emulator is missing and there is no apt-get to fetch it with"
    note "unpacking QEMU's system emulator into $root"
    local debs pkg deps missing=() plan
    debs=$(mktemp -d)
    # apt-get download needs package lists; a fresh machine may have none yet.
    if ! (cd "$debs" && _apt download "${QEMU_SYSTEM_PACKAGES[@]}"); then
        if [[ -z $_apt_updated ]]; then
            _apt update -q || die "apt-get update failed"
            _apt_updated=1
        fi
        (cd "$debs" && _apt download "${QEMU_SYSTEM_PACKAGES[@]}") ||
            die "apt-get download ${QEMU_SYSTEM_PACKAGES[*]} failed"
    fi
    rm -rf "$root.new"
    mkdir -p "$root.new"
    for pkg in "$debs"/*.deb; do
        dpkg-deb -x "$pkg" "$root.new" || die "dpkg-deb -x $pkg failed"
    done
    # The libraries: every "lib*"/"zlib*" name in the emulator's Depends (alternatives: the first)
    # that dpkg does not list as installed.
    deps=$(dpkg-deb -f "$debs"/qemu-system-x86_*.deb Depends | tr ',' '\n' |
        sed 's/(.*)//; s/|.*//; s/[[:space:]]//g' | grep -E '^(lib|zlib)' || true)
    for pkg in $deps; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' ||
            missing+=("$pkg")
    done
    rm -rf "$debs"
    if [[ ${#missing[@]} -gt 0 ]]; then
        note "installing the emulator's libraries: ${missing[*]}"
        if [[ -z $_apt_updated ]]; then
            _apt update -q || die "apt-get update failed"
            _apt_updated=1
        fi
        plan=$(DEBIAN_FRONTEND=noninteractive apt-get install --simulate --no-install-recommends \
            "${missing[@]}" </dev/null 2>&1) || die "apt-get install --simulate ${missing[*]} failed: $plan"
        if grep -q '^Remv' <<<"$plan"; then
            die "installing ${missing[*]} would remove packages (refused): $(grep '^Remv' <<<"$plan" | tr '\n' ' ')"
        fi
        _apt install -y -q --no-install-recommends "${missing[@]}" ||
            die "apt-get install ${missing[*]} failed"
    fi
    rm -rf "$root"
    mv "$root.new" "$root"
    "$bin" -version >/dev/null 2>&1 || die "$bin does not run after unpacking: $(ldd "$bin" 2>&1 | grep 'not found' | tr '\n' ' ')"
}
