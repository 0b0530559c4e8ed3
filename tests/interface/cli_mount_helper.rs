//! snapfs as mount(8) and an administrator meet it: `mount -t snapfs` and /etc/fstab-style
//! entries through mount-helper/mount.snapfs, `umount`, signals to the daemon, a daemon that
//! died, and where the daemon logs (a log file, syslog).
//!
//! Needs root, /dev/fuse, qemu-img, qemu-io and util-linux's mount (with --fstab and -N).
//! mount(8) runs helpers from /sbin only, so the tests point /sbin/mount.snapfs at a copy of the
//! helper in a temporary directory (next to a `snapfs` symlink to the binary under test) while
//! they run, one test at a time (a file lock), and put back whatever was there before.
//!
//! The test process makes itself a child subreaper, so that the background daemon, orphaned when
//! `snapfs mount` returns, becomes its child and its exit status can be checked.

use std::fs::{self, File};
use std::io::Read;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::common::{
    force_unmount, is_mounted, mount_fstype, qemu_img, qemu_io, run_timeout, snapfs_bin,
    snapfs_cmd, workdir,
};

const HELPER: &str = "/sbin/mount.snapfs";
const UMOUNT_HELPER: &str = "/sbin/umount.fuse.snapfs";
/// What umount(8) as root runs for every FUSE mount (it takes the type from statfs: "fuse").
const UMOUNT_FUSE_HELPER: &str = "/sbin/umount.fuse";
const HELPER_LOCK: &str = "/tmp/snapfs-test-mount-helper.lock";

// ---------------------------------------------------------------------------------------------
// The helper installed for mount(8)
// ---------------------------------------------------------------------------------------------

/// `/sbin/mount.snapfs` -> `TMP/bin/mount.snapfs` and `/sbin/umount.fuse.snapfs` ->
/// `TMP/bin/umount.fuse.snapfs` (copies of mount-helper/'s), with `TMP/bin/snapfs` -> the binary
/// under test. Held under an exclusive lock; undone on drop.
struct HelperInstall {
    _lock: File,
    bin: tempfile::TempDir,
    /// (installed path, the file that was there before, moved aside).
    installed: Vec<(PathBuf, Option<PathBuf>)>,
}

impl HelperInstall {
    fn new() -> HelperInstall {
        crate::common::require_env();
        let lock = File::create(HELPER_LOCK).expect("create the helper lock file");
        // SAFETY: flock on a descriptor we own.
        let r = unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) };
        assert_eq!(r, 0, "flock {HELPER_LOCK}");
        let bin = tempfile::Builder::new()
            .prefix("snapfs-helper-test-")
            .tempdir()
            .expect("temp dir");
        symlink(snapfs_bin(), bin.path().join("snapfs")).unwrap();
        let mut installed = Vec::new();
        for (name, sbin) in [
            ("mount.snapfs", HELPER),
            ("umount.fuse.snapfs", UMOUNT_HELPER),
            ("umount.fuse", UMOUNT_FUSE_HELPER),
        ] {
            let helper = bin.path().join(name);
            let source = Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("mount-helper")
                .join(name);
            let out = run_timeout(
                Command::new("install")
                    .args(["-m", "0755"])
                    .arg(&source)
                    .arg(&helper),
                Duration::from_secs(20),
            );
            assert_eq!(
                out.status.map(|s| s.success()),
                Some(true),
                "install: {}",
                out.stderr
            );
            let sbin = Path::new(sbin);
            let mut backup = None;
            if let Ok(meta) = fs::symlink_metadata(sbin) {
                let target = fs::read_link(sbin).unwrap_or_default();
                if meta.file_type().is_symlink()
                    && target.to_string_lossy().contains("snapfs-helper-test-")
                {
                    // Left behind by a test run that was killed.
                    fs::remove_file(sbin).unwrap();
                } else {
                    let saved = PathBuf::from(format!("{}.snapfs-test-backup", sbin.display()));
                    fs::rename(sbin, &saved).unwrap();
                    backup = Some(saved);
                }
            }
            symlink(&helper, sbin).unwrap();
            installed.push((sbin.to_path_buf(), backup));
        }
        HelperInstall {
            _lock: lock,
            bin,
            installed,
        }
    }
}

impl Drop for HelperInstall {
    fn drop(&mut self) {
        for (sbin, backup) in &self.installed {
            let _ = fs::remove_file(sbin);
            if let Some(saved) = backup {
                let _ = fs::rename(saved, sbin);
            }
        }
        let _ = &self.bin;
    }
}

// ---------------------------------------------------------------------------------------------
// The daemon
// ---------------------------------------------------------------------------------------------

fn become_subreaper() {
    // SAFETY: prctl with integer arguments.
    let r = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    assert_eq!(r, 0, "prctl(PR_SET_CHILD_SUBREAPER)");
}

fn cmdline(pid: i32) -> Vec<String> {
    fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| {
            b.split(|&c| c == 0)
                .filter(|s| !s.is_empty())
                .map(|s| String::from_utf8_lossy(s).into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// The snapfs process serving `mp` (its command line is `.../snapfs mount ... MP`).
fn daemon_pid(mp: &Path) -> i32 {
    let want = mp.to_string_lossy();
    let mut found = Vec::new();
    for entry in fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let args = cmdline(pid);
        if args.first().is_some_and(|a| a.ends_with("snapfs"))
            && args.get(1).is_some_and(|a| a == "mount")
            && args.iter().any(|a| *a == want)
        {
            found.push(pid);
        }
    }
    assert_eq!(found.len(), 1, "snapfs processes serving {want}: {found:?}");
    found[0]
}

/// How a reaped process ended.
#[derive(Debug, PartialEq, Eq)]
enum End {
    Exited(i32),
    Signaled(i32),
}

/// Waits for our child (the daemon, reparented to us) `pid` to end; None after `limit`.
fn reap(pid: i32, limit: Duration) -> Option<End> {
    let start = Instant::now();
    loop {
        let mut status = 0;
        // SAFETY: waitpid on a pid, with a valid status pointer.
        let r = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
        if r == pid {
            return Some(if libc::WIFEXITED(status) {
                End::Exited(libc::WEXITSTATUS(status))
            } else {
                End::Signaled(libc::WTERMSIG(status))
            });
        }
        assert!(
            r == 0,
            "waitpid({pid}): {} (is the daemon not our child? subreaper missing)",
            std::io::Error::last_os_error()
        );
        if start.elapsed() > limit {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The kernel's FUSE connection number of the mount at `mp` (the minor of its device, as in
/// /sys/fs/fuse/connections/), read from /proc/self/mountinfo without touching the mount.
fn fuse_connection(mp: &Path) -> Option<String> {
    let info = fs::read_to_string("/proc/self/mountinfo").ok()?;
    let want = mp.to_string_lossy();
    info.lines().find_map(|l| {
        let f: Vec<&str> = l.split(' ').collect();
        (f.len() > 4 && f[4] == want)
            .then(|| f[2].split_once(':').map(|(_, minor)| minor.to_owned()))
            .flatten()
    })
}

/// Aborts a FUSE connection through fusectl (mounted first if needed): the last resort for a
/// daemon that cannot die because one of its threads waits for its own file system.
fn abort_fuse_connection(conn: &str) {
    let dir = Path::new("/sys/fs/fuse/connections");
    if !dir.join(conn).exists() {
        let _ = Command::new("mount")
            .args(["-t", "fusectl", "fusectl"])
            .arg(dir)
            .output();
    }
    let _ = fs::write(dir.join(conn).join("abort"), "1");
}

/// The state of each thread of `pid` and where it waits, for failure messages.
fn threads(pid: i32) -> String {
    let mut out = String::new();
    if let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) {
        for t in tasks.flatten() {
            let p = t.path();
            let stat = fs::read_to_string(p.join("stat")).unwrap_or_default();
            let state = stat
                .rsplit_once(')')
                .and_then(|(_, r)| r.split_whitespace().next())
                .unwrap_or("?")
                .to_owned();
            let wchan = fs::read_to_string(p.join("wchan")).unwrap_or_default();
            let stack = fs::read_to_string(p.join("stack")).unwrap_or_default();
            let stack: Vec<&str> = stack.lines().take(4).collect();
            out.push_str(&format!(
                "\n  thread {}: {state} {wchan} {}",
                t.file_name().to_string_lossy(),
                stack.join(" < ")
            ));
        }
    }
    out
}

/// Reaps the daemon `pid` within `limit`, or fails saying what its threads wait for.
fn expect_end(pid: i32, limit: Duration, expected: End) {
    let end = reap(pid, limit);
    assert!(
        end.is_some(),
        "daemon {pid} did not end within {limit:?}:{}",
        threads(pid)
    );
    assert_eq!(end, Some(expected), "daemon {pid}");
}

/// Whatever a test mounted at `mp` is unmounted and its daemon killed and reaped on drop, also
/// when the test failed; never blocks for long.
struct Cleanup {
    mp: PathBuf,
    daemon: Option<i32>,
    connection: Option<String>,
}

impl Cleanup {
    fn new(mp: &Path) -> Cleanup {
        Cleanup {
            mp: mp.to_path_buf(),
            daemon: None,
            connection: None,
        }
    }

    /// Records the daemon now serving the mount, and its FUSE connection.
    fn mounted(&mut self) -> i32 {
        let pid = daemon_pid(&self.mp);
        self.daemon = Some(pid);
        self.connection = fuse_connection(&self.mp);
        pid
    }

    /// The daemon was reaped by the test.
    fn reaped(&mut self) {
        self.daemon = None;
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        force_unmount(&self.mp);
        let Some(pid) = self.daemon else {
            return;
        };
        // SAFETY: signalling our own child.
        unsafe { libc::kill(pid, libc::SIGKILL) };
        if reap(pid, Duration::from_secs(10)).is_none() {
            if let Some(conn) = &self.connection {
                abort_fuse_connection(conn);
            }
            if reap(pid, Duration::from_secs(10)).is_none() {
                eprintln!("cleanup: daemon {pid} does not end:{}", threads(pid));
            }
        }
        force_unmount(&self.mp);
    }
}

// ---------------------------------------------------------------------------------------------
// Fixtures
// ---------------------------------------------------------------------------------------------

/// A 64 MiB qcow2 image: 1 MiB of 0x5a at 0, 64 KiB of 0xa5 at 32 MiB.
fn image(dir: &Path) -> PathBuf {
    let img = dir.join("disk.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", img.to_str().unwrap(), "64M"]);
    qemu_io(&img, &["write -P 0x5a 0 1M", "write -P 0xa5 32M 64k"]);
    img
}

fn mountpoint(dir: &Path) -> PathBuf {
    let mp = dir.join("mnt");
    fs::create_dir(&mp).unwrap();
    mp.canonicalize().unwrap()
}

fn check_data(mp: &Path) {
    let mut f = File::open(mp.join("live.raw")).expect("open live.raw");
    let mut head = vec![0; 1 << 20];
    f.read_exact(&mut head).unwrap();
    assert!(head.iter().all(|&b| b == 0x5a), "live.raw: wrong data at 0");
    let mut buf = vec![0; 64 << 10];
    std::os::unix::fs::FileExt::read_exact_at(&f, &mut buf, 32 << 20).unwrap();
    assert!(
        buf.iter().all(|&b| b == 0xa5),
        "live.raw: wrong data at 32M"
    );
}

/// The /proc/mounts line of `mp`: (source, type, options).
fn proc_mounts_entry(mp: &Path) -> Option<(String, String, String)> {
    let mounts = fs::read_to_string("/proc/mounts").unwrap();
    let want = mp.to_string_lossy();
    mounts.lines().find_map(|l| {
        let f: Vec<&str> = l.split(' ').collect();
        (f.len() >= 4 && f[1] == want).then(|| (f[0].into(), f[2].into(), f[3].into()))
    })
}

fn wait_unmounted(mp: &Path, limit: Duration) -> bool {
    let start = Instant::now();
    while is_mounted(mp) {
        if start.elapsed() > limit {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    true
}

/// Processes with a file, working directory or root inside `mp`: who keeps a mount busy.
fn holders(mp: &Path) -> Vec<String> {
    let mut found = Vec::new();
    for entry in fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let mut links = vec![format!("/proc/{pid}/cwd"), format!("/proc/{pid}/root")];
        if let Ok(fds) = fs::read_dir(format!("/proc/{pid}/fd")) {
            links.extend(
                fds.flatten()
                    .map(|f| f.path().to_string_lossy().into_owned()),
            );
        }
        for link in links {
            if fs::read_link(&link).is_ok_and(|t| t.starts_with(mp)) {
                found.push(format!("{link} ({:?})", cmdline(pid)));
            }
        }
    }
    found
}

/// `umount MP`, which must succeed (says who keeps the mount busy if not).
fn umount(mp: &Path) {
    let out = run_timeout(Command::new("umount").arg(mp), Duration::from_secs(60));
    if out.status.map(|s| s.code()) != Some(Some(0)) {
        panic!(
            "umount {}: {:?}\n{}\nholders: {:?}",
            mp.display(),
            out.status,
            out.stderr,
            holders(mp)
        );
    }
}

/// Runs a command that must succeed within a minute; returns its stdout.
fn ok(cmd: &mut Command) -> String {
    let what = format!("{cmd:?}");
    let out = run_timeout(cmd, Duration::from_secs(60));
    assert_eq!(
        out.status.map(|s| s.code()),
        Some(Some(0)),
        "{what}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        out.stdout,
        out.stderr
    );
    out.stdout
}

fn snapshot_create_works(img: &Path) -> bool {
    Command::new("qemu-img")
        .args(["snapshot", "-c", "after-umount"])
        .arg(img)
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

#[test]
fn mount_t_snapfs_and_umount() {
    let _helper = HelperInstall::new();
    become_subreaper();
    let dir = workdir();
    let img = image(dir.path());
    let mp = mountpoint(dir.path());
    let mut cleanup = Cleanup::new(&mp);

    ok(Command::new("mount")
        .args(["-t", "snapfs"])
        .arg(&img)
        .arg(&mp)
        .args(["-o", "ro"]));
    let pid = cleanup.mounted();
    check_data(&mp);

    let (source, fstype, options) = proc_mounts_entry(&mp).expect("in /proc/mounts");
    assert_eq!(source, img.to_string_lossy(), "/proc/mounts source");
    assert_eq!(fstype, "fuse.snapfs", "/proc/mounts type");
    assert!(
        options.split(',').any(|o| o == "ro"),
        "not read-only: {options}"
    );
    let listing = ok(&mut Command::new("mount"));
    let line = listing
        .lines()
        .find(|l| l.contains(&format!(" on {} ", mp.display())))
        .unwrap_or_else(|| panic!("mount does not list {}:\n{listing}", mp.display()));
    assert!(line.contains("type fuse.snapfs"), "mount lists: {line}");
    assert!(
        !snapshot_create_works(&img),
        "qemu-img could write-lock the mounted image"
    );

    umount(&mp);
    assert!(wait_unmounted(&mp, Duration::from_secs(10)));
    expect_end(pid, Duration::from_secs(30), End::Exited(0));
    cleanup.reaped();
    assert!(
        snapshot_create_works(&img),
        "the image is still locked after umount"
    );
}

/// `umount DIR` (through /sbin/umount.fuse.snapfs) returns only once the serving process has
/// exited, so the image is free at once: qemu-img write-locks it right after, with no wait.
#[test]
fn umount_returns_once_the_image_is_free() {
    let _helper = HelperInstall::new();
    become_subreaper();
    let dir = workdir();
    let img = image(dir.path());
    let mp = mountpoint(dir.path());
    let mut cleanup = Cleanup::new(&mp);
    ok(Command::new("mount")
        .args(["-t", "snapfs"])
        .arg(&img)
        .arg(&mp));
    let pid = cleanup.mounted();
    fs::write(mp.join("control/create"), "before-umount").unwrap();
    // Data the daemon still has to flush to the image when the kernel lets the mount go.
    std::io::Write::write_all(
        &mut fs::OpenOptions::new()
            .write(true)
            .open(mp.join("live.raw"))
            .unwrap(),
        &vec![0x77u8; 48 << 20],
    )
    .unwrap();
    umount(&mp);
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let state = stat
        .rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().next().map(str::to_owned));
    assert!(
        state.as_deref().is_none_or(|s| s == "Z"),
        "umount returned while the daemon {pid} still runs (state {state:?})"
    );
    assert!(
        snapshot_create_works(&img),
        "the image is still locked right after umount returned"
    );
    expect_end(pid, Duration::from_secs(30), End::Exited(0));
    cleanup.reaped();
}

#[test]
fn fstab_entry() {
    let _helper = HelperInstall::new();
    become_subreaper();
    let dir = workdir();
    let img = image(dir.path());
    let mp = mountpoint(dir.path());
    let mut cleanup = Cleanup::new(&mp);
    let fstab = dir.path().join("fstab");
    fs::write(
        &fstab,
        format!(
            "# snapfs test\n{}  {}  snapfs  ro,noauto,nofail,_netdev,x-systemd.automount,allow_other  0 0\n",
            img.display(),
            mp.display()
        ),
    )
    .unwrap();

    ok(Command::new("mount").arg("--fstab").arg(&fstab).arg(&mp));
    let pid = cleanup.mounted();
    assert_eq!(mount_fstype(&mp).as_deref(), Some("fuse.snapfs"));
    let (_, _, options) = proc_mounts_entry(&mp).expect("in /proc/mounts");
    assert!(
        options.split(',').any(|o| o == "ro"),
        "not read-only: {options}"
    );
    assert!(
        options.split(',').any(|o| o == "allow_other"),
        "allow_other not applied: {options}"
    );
    check_data(&mp);
    let args = cmdline(pid);
    assert!(
        !args
            .iter()
            .any(|a| a.contains("noauto") || a.contains("x-systemd")),
        "mount(8)'s options reached snapfs: {args:?}"
    );

    umount(&mp);
    assert!(wait_unmounted(&mp, Duration::from_secs(10)));
    expect_end(pid, Duration::from_secs(30), End::Exited(0));
    cleanup.reaped();
}

/// An fstab line for a whole libvirt domain (`domain=NAME`; the source field is the domain's
/// name): the domain file's two disks are `vda/` and `vdb/` under one mount, a top-level create
/// takes the tag in both images and writes one snapshot file, `umount` ends it.
#[test]
fn fstab_entry_for_a_domain() {
    let _helper = HelperInstall::new();
    become_subreaper();
    let dir = workdir();
    let (a, b) = (dir.path().join("a.qcow2"), dir.path().join("b.qcow2"));
    for img in [&a, &b] {
        qemu_img(&["create", "-q", "-f", "qcow2", img.to_str().unwrap(), "4M"]);
    }
    let domain_file = dir.path().join("vm.xml");
    let disk = |img: &Path, dev: &str| {
        format!(
            "<disk type='file' device='disk'><driver name='qemu' type='qcow2'/>\
             <source file='{}'/><target dev='{dev}' bus='virtio'/></disk>",
            img.display()
        )
    };
    fs::write(
        &domain_file,
        format!(
            "<domain type='kvm'>\n  <name>vm</name>\n  <devices>{}{}</devices>\n</domain>\n",
            disk(&a, "vda"),
            disk(&b, "vdb")
        ),
    )
    .unwrap();
    // libvirt's snapshot folder exists; the domain's own folder comes with its first snapshot.
    fs::create_dir(dir.path().join("snapshot")).unwrap();
    let snapshots = dir.path().join("snapshot/vm");
    let mp = mountpoint(dir.path());
    let mut cleanup = Cleanup::new(&mp);
    let fstab = dir.path().join("fstab");
    // No daemon answers at this URI: the disks come from the domain file.
    let options = format!(
        "domain=vm,libvirt={},libvirt-domain={},libvirt-uri=qemu:///system?socket={},noauto",
        snapshots.display(),
        domain_file.display(),
        dir.path().join("no-libvirtd.sock").display()
    );
    fs::write(
        &fstab,
        format!("vm  {}  snapfs  {options}  0 0\n", mp.display()),
    )
    .unwrap();
    ok(Command::new("mount").arg("--fstab").arg(&fstab).arg(&mp));
    let pid = cleanup.mounted();
    let mut top: Vec<String> = fs::read_dir(&mp)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    top.sort();
    assert_eq!(top, ["control", "vda", "vdb"]);
    fs::write(mp.join("control/create"), "s1").unwrap();
    umount(&mp);
    assert!(wait_unmounted(&mp, Duration::from_secs(10)));
    expect_end(pid, Duration::from_secs(30), End::Exited(0));
    cleanup.reaped();
    for img in [&a, &b] {
        let listed = ok(Command::new("qemu-img").args(["snapshot", "-l"]).arg(img));
        assert!(
            listed
                .lines()
                .any(|l| l.split_whitespace().nth(1) == Some("s1")),
            "{}: {listed}",
            img.display()
        );
    }
    let xml = fs::read_to_string(snapshots.join("s1.xml")).unwrap();
    assert!(
        xml.contains("<disk name='vda' snapshot='internal'/>")
            && xml.contains("<disk name='vdb' snapshot='internal'/>"),
        "{xml}"
    );
}

fn signal_unmounts(signal: i32) {
    let _helper = HelperInstall::new();
    become_subreaper();
    let dir = workdir();
    let img = image(dir.path());
    let mp = mountpoint(dir.path());
    let mut cleanup = Cleanup::new(&mp);
    ok(Command::new("mount")
        .args(["-t", "snapfs"])
        .arg(&img)
        .arg(&mp));
    let pid = cleanup.mounted();
    check_data(&mp);

    // SAFETY: signalling our own child.
    assert_eq!(unsafe { libc::kill(pid, signal) }, 0);
    assert!(
        wait_unmounted(&mp, Duration::from_secs(20)),
        "{} still mounted 20 s after signal {signal}",
        mp.display()
    );
    expect_end(pid, Duration::from_secs(30), End::Exited(0));
    cleanup.reaped();
    assert!(proc_mounts_entry(&mp).is_none(), "stale mount left");
    assert!(fs::read_dir(&mp).is_ok(), "the mount point is unusable");
    assert!(
        snapshot_create_works(&img),
        "the image is still locked after the daemon exited"
    );
}

#[test]
fn sigterm_unmounts_cleanly() {
    signal_unmounts(libc::SIGTERM);
}

#[test]
fn sigint_unmounts_cleanly() {
    signal_unmounts(libc::SIGINT);
}

#[test]
fn umount_cleans_up_after_a_killed_daemon() {
    let _helper = HelperInstall::new();
    become_subreaper();
    let dir = workdir();
    let img = image(dir.path());
    let mp = mountpoint(dir.path());
    let mut cleanup = Cleanup::new(&mp);
    ok(Command::new("mount")
        .args(["-t", "snapfs", "-o", "ro"])
        .arg(&img)
        .arg(&mp));
    let pid = cleanup.mounted();

    // SAFETY: signalling our own child.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
    expect_end(pid, Duration::from_secs(30), End::Signaled(libc::SIGKILL));
    cleanup.reaped();
    assert!(
        is_mounted(&mp),
        "the kernel dropped the dead mount by itself"
    );

    let out = run_timeout(snapfs_cmd().arg("umount").arg(&mp), Duration::from_secs(30));
    assert_eq!(
        out.status.map(|s| s.code()),
        Some(Some(0)),
        "snapfs umount of a dead mount: {}",
        out.stderr
    );
    assert!(
        out.stderr.contains("died"),
        "snapfs umount does not report the dead process: {:?}",
        out.stderr
    );
    assert!(!is_mounted(&mp), "the stale mount is still there");
    assert!(fs::read_dir(&mp).is_ok(), "the mount point is unusable");
    assert!(
        snapshot_create_works(&img),
        "the image is still locked after the dead mount was cleaned up"
    );
}

/// Mounts read-write with `how` (a command that takes IMAGE and MP last), makes a control
/// command fail, unmounts, and returns the log file's text.
fn failed_command_is_logged(mut how: Command, log: &Path, img: &Path, mp: &Path) -> String {
    let mut cleanup = Cleanup::new(mp);
    ok(how.arg(img).arg(mp));
    let pid = cleanup.mounted();
    let written = fs::write(mp.join("control/delete"), "no-such-snapshot\n");
    assert!(written.is_err(), "deleting a missing snapshot succeeded");
    umount(mp);
    expect_end(pid, Duration::from_secs(30), End::Exited(0));
    cleanup.reaped();

    let text = fs::read_to_string(log).expect("the log file");
    let line = text
        .lines()
        .find(|l| l.contains("control/delete"))
        .unwrap_or_else(|| panic!("no line about control/delete in the log:\n{text}"));
    // 2026-11-02T10:31:12.345Z WARN  [4242] snapfs::fs: control/delete: ...
    let mut fields = line.split_whitespace();
    let time = fields.next().unwrap();
    assert!(
        crate::common::parse_rfc3339(time).is_some(),
        "not an RFC 3339 time: {line}"
    );
    assert_eq!(fields.next(), Some("WARN"), "{line}");
    assert_eq!(fields.next(), Some(format!("[{pid}]").as_str()), "{line}");
    assert!(
        fields.next().is_some_and(|t| t.starts_with("snapfs")),
        "{line}"
    );
    assert!(line.contains("no-such-snapshot"), "{line}");
    assert!(
        !text.contains("Failed to umount"),
        "a clean umount logged a warning:\n{text}"
    );
    text
}

#[test]
fn log_file_option() {
    let _helper = HelperInstall::new();
    become_subreaper();
    let dir = workdir();
    let img = image(dir.path());
    let mp = mountpoint(dir.path());

    // Through mount(8): -o log=FILE.
    let log = dir.path().join("mount-o.log");
    let mut how = Command::new("mount");
    how.args(["-t", "snapfs", "-o"])
        .arg(format!("rw,log={}", log.display()));
    failed_command_is_logged(how, &log, &img, &mp);
    let mode = fs::metadata(&log).unwrap().permissions().mode() & 0o777;
    assert_eq!(
        mode & 0o007,
        0,
        "the log file is world-accessible: {mode:o}"
    );

    // snapfs mount --log FILE; an existing file is appended to.
    let log2 = dir.path().join("flag.log");
    fs::write(&log2, "earlier line\n").unwrap();
    let mut how = Command::new(snapfs_bin());
    how.arg("mount").arg("--log").arg(&log2);
    let text = failed_command_is_logged(how, &log2, &img, &mp);
    assert!(text.starts_with("earlier line\n"), "not appended:\n{text}");
}

/// Without a log file the background daemon logs to syslog (/dev/log). Checked by listening on
/// /dev/log when no syslog daemon does.
#[test]
fn background_daemon_logs_to_syslog() {
    let _helper = HelperInstall::new(); // also serializes the use of /dev/log
    become_subreaper();
    let dev_log = Path::new("/dev/log");
    if fs::symlink_metadata(dev_log).is_ok() {
        eprintln!(
            "NOTE: /dev/log exists (a syslog daemon or journald listens there): this test cannot \
             intercept it; check 'journalctl -t snapfs' by hand"
        );
        return;
    }
    struct Listener(std::os::unix::net::UnixDatagram);
    impl Drop for Listener {
        fn drop(&mut self) {
            let _ = fs::remove_file("/dev/log");
        }
    }
    let listener =
        Listener(std::os::unix::net::UnixDatagram::bind(dev_log).expect("bind /dev/log"));
    listener
        .0
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();

    let dir = workdir();
    let img = image(dir.path());
    let mp = mountpoint(dir.path());
    let mut cleanup = Cleanup::new(&mp);
    ok(snapfs_cmd().arg("mount").arg(&img).arg(&mp));
    let pid = cleanup.mounted();
    assert!(fs::write(mp.join("control/delete"), "no-such-snapshot\n").is_err());

    let mut buf = vec![0; 4096];
    let n = listener
        .0
        .recv(&mut buf)
        .expect("no syslog message within 20 s");
    let message = String::from_utf8_lossy(&buf[..n]).into_owned();
    // <PRI>TIMESTAMP snapfs[PID]: MESSAGE; PRI = LOG_DAEMON (3 << 3) | LOG_WARNING (4) = 28
    assert!(message.starts_with("<28>"), "{message}");
    assert!(message.contains(&format!("snapfs[{pid}]: ")), "{message}");
    assert!(message.contains("control/delete"), "{message}");
    assert!(message.contains("no-such-snapshot"), "{message}");

    umount(&mp);
    expect_end(pid, Duration::from_secs(30), End::Exited(0));
    cleanup.reaped();
}

/// `mount -N NAMESPACE -t snapfs ...`: the helper mounts in that mount namespace.
#[test]
fn mount_in_another_namespace() {
    let _helper = HelperInstall::new();
    become_subreaper();
    let dir = workdir();
    let img = image(dir.path());
    let mp = mountpoint(dir.path());

    let mut holder = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sleep", "300"])
        .spawn()
        .expect("unshare");
    struct Holder<'a>(&'a mut std::process::Child);
    impl Drop for Holder<'_> {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let holder_pid = holder.id() as i32;
    let holder = Holder(&mut holder);
    let ours = fs::read_link("/proc/self/ns/mnt").unwrap();
    let start = Instant::now();
    while fs::read_link(format!("/proc/{holder_pid}/ns/mnt"))
        .ok()
        .as_ref()
        == Some(&ours)
        || cmdline(holder_pid).first().map(String::as_str) != Some("sleep")
    {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "unshare did not start"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let ns_mounts = format!("/proc/{holder_pid}/mountinfo");
    let in_ns = || {
        fs::read_to_string(&ns_mounts)
            .unwrap_or_default()
            .lines()
            .any(|l| l.split(' ').nth(4) == Some(&*mp.to_string_lossy()))
    };

    ok(Command::new("mount")
        .arg("-N")
        .arg(holder_pid.to_string())
        .args(["-t", "snapfs", "-o", "ro"])
        .arg(&img)
        .arg(&mp));
    // Not mounted here: the daemon is recorded by hand.
    let pid = daemon_pid(&mp);
    let mut cleanup = Cleanup::new(&mp);
    cleanup.daemon = Some(pid);
    assert!(in_ns(), "not mounted in the target namespace");
    assert!(!is_mounted(&mp), "mounted in the caller's namespace");

    ok(Command::new("nsenter")
        .arg(format!("--mount=/proc/{holder_pid}/ns/mnt"))
        .arg("umount")
        .arg(&mp));
    expect_end(pid, Duration::from_secs(30), End::Exited(0));
    cleanup.reaped();
    assert!(!in_ns());
    drop(holder);
}

/// The helper's own argument handling, with a stand-in `snapfs` that records what it was given
/// (no mount; also checks the exit statuses mount(8) expects).
#[test]
fn helper_arguments() {
    // Not for /sbin/mount.snapfs: the lock keeps this test from starting processes while another
    // one has a file open in its mount (a child forked then would hold that file for a moment,
    // and the mount would be busy).
    let _helper = HelperInstall::new();
    let dir = tempfile::tempdir().unwrap();
    let helper = dir.path().join("mount.snapfs");
    fs::copy(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("mount-helper/mount.snapfs"),
        &helper,
    )
    .unwrap();
    let record = dir.path().join("args");
    let fake = dir.path().join("snapfs");
    fs::write(
        &fake,
        format!(
            "#!/bin/sh\nfor a; do printf '%s\\n' \"$a\"; done > '{}'\n[ -z \"$FAIL\" ]\n",
            record.display()
        ),
    )
    .unwrap();
    for f in [&helper, &fake] {
        fs::set_permissions(f, fs::Permissions::from_mode(0o755)).unwrap();
    }
    let run = |args: &[&str], fail: bool| {
        let _ = fs::remove_file(&record);
        let mut c = Command::new(&helper);
        c.args(args);
        if fail {
            c.env("FAIL", "1");
        }
        let out = c.output().unwrap();
        let got = fs::read_to_string(&record).ok();
        (
            out.status.code(),
            got,
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };

    let (code, got, _) = run(
        &[
            "/vm/disk.qcow2",
            "/mnt/disk",
            "-s",
            "-n",
            "-o",
            "ro,defaults,noauto,nofail,_netdev,x-systemd.automount,comment=x,noatime,allow_other,libvirt=/var/lib/libvirt/qemu/snapshot/vm,log=/var/log/s.log,*",
            "-t",
            "snapfs",
        ],
        false,
    );
    assert_eq!(code, Some(0));
    assert_eq!(
        got.as_deref(),
        Some(
            "mount\n-o\nro,allow_other,libvirt=/var/lib/libvirt/qemu/snapshot/vm,log=/var/log/s.log,*\n--\n/vm/disk.qcow2\n/mnt/disk\n"
        )
    );

    // Options first, no -o left, a dash-leading image name.
    let (code, got, _) = run(&["-o", "defaults", "--", "-odd.qcow2", "/mnt/x"], false);
    assert_eq!(code, Some(0));
    assert_eq!(got.as_deref(), Some("mount\n--\n-odd.qcow2\n/mnt/x\n"));

    // -r and -w become ro and rw.
    let (_, got, _) = run(&["-r", "i", "d"], false);
    assert_eq!(got.as_deref(), Some("mount\n-o\nro\n--\ni\nd\n"));

    // -f: nothing is run; -v: the command line is shown.
    let (code, got, stderr) = run(&["i", "d", "-fv", "-o", "ro"], false);
    assert_eq!((code, got), (Some(0), None));
    assert!(stderr.contains("mount -o ro -- i d"), "{stderr}");

    // -N runs snapfs through nsenter (shown with -f -v, not run).
    let (code, _, stderr) = run(&["i", "d", "-f", "-v", "-N", "1234"], false);
    assert_eq!(code, Some(0));
    assert!(
        stderr.contains("nsenter --mount=/proc/1234/ns/mnt -- "),
        "{stderr}"
    );

    // Wrong invocations exit 1; a failed mount exits 32, like mount(8).
    assert_eq!(run(&["only-one"], false).0, Some(1));
    assert_eq!(run(&["i", "d", "-x"], false).0, Some(1));
    assert_eq!(run(&["i", "d", "extra"], false).0, Some(1));
    let (code, _, stderr) = run(&["i", "d", "-o", "remount"], false);
    assert_eq!(code, Some(1));
    assert!(stderr.contains("cannot be remounted"), "{stderr}");
    assert_eq!(run(&["i", "d"], true).0, Some(32));

    // No snapfs next to the helper, in PATH or the usual places.
    let lonely = tempfile::tempdir().unwrap();
    let alone = lonely.path().join("mount.snapfs");
    fs::copy(&helper, &alone).unwrap();
    if !Path::new("/usr/local/bin/snapfs").exists() && !Path::new("/usr/bin/snapfs").exists() {
        let out = Command::new(&alone)
            .args(["i", "d"])
            .env("PATH", "/nonexistent")
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1));
        assert!(String::from_utf8_lossy(&out.stderr).contains("snapfs not found"));
    }
}
