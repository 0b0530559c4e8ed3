//! QEMU image locking (`snapfs::qcow2::lock`) checked against the real QEMU 10 tools: snapfs must
//! keep out of images QEMU writes, QEMU must keep out of images snapfs writes, and both must take
//! the same lock bytes for the same kind of open.
//!
//! Needs qemu-img, qemu-io and qemu-storage-daemon 10 (its FUSE export needs /dev/fuse and, to
//! clean up after a crash, fusermount3 or umount) and a tmpfs on /dev/shm. Nothing is skipped: a
//! missing requirement fails the test and says so. Helpers are local to this file on purpose.

use std::collections::BTreeSet;
use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

use snapfs::qcow2::lock::{Conflict, ImageLock, LockError, LockMode, Perm, held_by_others};

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

fn tool(name: &str) -> Command {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(name).is_file()))
        .unwrap_or(false);
    assert!(
        found,
        "{name} is required by this test and was not found in PATH"
    );
    Command::new(name)
}

fn run(mut cmd: Command) -> Output {
    let shown = format!("{cmd:?}");
    cmd.stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {shown}: {e}"))
}

fn text(out: &Output) -> String {
    format!(
        "status {}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn qemu_img(args: &[&str], image: &Path) -> Output {
    let mut cmd = tool("qemu-img");
    cmd.args(args).arg(image);
    run(cmd)
}

/// Runs `qemu-img ARGS IMAGE` and asserts that it fails with QEMU's lock message `expected`.
fn assert_qemu_img_refused(args: &[&str], image: &Path, expected: &str) {
    let out = qemu_img(args, image);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains(expected),
        "qemu-img {args:?} should fail with {expected:?}:\n{}",
        text(&out)
    );
    assert!(
        stderr.contains("Is another process using the image"),
        "{}",
        text(&out)
    );
}

fn assert_qemu_img_ok(args: &[&str], image: &Path) -> Output {
    let out = qemu_img(args, image);
    assert!(
        out.status.success(),
        "qemu-img {args:?} should succeed:\n{}",
        text(&out)
    );
    out
}

/// A new qcow2 image made by qemu-img, optionally over a qcow2 backing file.
fn create_qcow2(dir: &Path, name: &str, backing: Option<&Path>) -> PathBuf {
    let path = dir.join(name);
    let mut cmd = tool("qemu-img");
    cmd.args(["create", "-q", "-f", "qcow2"]);
    if let Some(b) = backing {
        cmd.arg("-b").arg(b).args(["-F", "qcow2"]);
    }
    cmd.arg(&path).arg("16M");
    let out = run(cmd);
    assert!(out.status.success(), "qemu-img create: {}", text(&out));
    path
}

fn open_rw(path: &Path) -> File {
    File::options()
        .read(true)
        .write(true)
        .open(path)
        .unwrap_or_else(|e| panic!("open {}: {e}", path.display()))
}

fn open_ro(path: &Path) -> File {
    File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()))
}

fn acquire(file: &File, path: &Path, mode: LockMode) -> ImageLock {
    let lock = ImageLock::acquire(file, path, mode)
        .unwrap_or_else(|e| panic!("{mode} lock on {} refused: {e}", path.display()));
    assert!(lock.is_locked(), "not locked: {:?}", lock.warning());
    assert_eq!(lock.warning(), None);
    lock
}

fn refused(file: &File, path: &Path, mode: LockMode) -> LockError {
    match ImageLock::acquire(file, path, mode) {
        Ok(lock) => panic!("{mode} lock on {} was granted: {lock:?}", path.display()),
        Err(e) => {
            let msg = e.to_string();
            assert!(!msg.contains('\n'), "error is not one line: {msg}");
            assert!(msg.contains(&path.display().to_string()), "{msg}");
            assert!(msg.contains("in use by another process"), "{msg}");
            e
        }
    }
}

/// The OFD lock entries (first and last byte) of `path` in /proc/locks, of all holders (the
/// pid of an OFD lock is shown as -1, so holders cannot be told apart; the kernel merges
/// adjacent ranges of one holder).
fn ofd_lock_entries(path: &Path) -> Vec<(i64, i64)> {
    let meta = std::fs::metadata(path).unwrap();
    let dev = meta.dev();
    let id = format!(
        "{:02x}:{:02x}:{}",
        libc::major(dev),
        libc::minor(dev),
        meta.ino()
    );
    let locks = std::fs::read_to_string("/proc/locks").unwrap();
    let mut entries = Vec::new();
    for line in locks.lines() {
        // "47: OFDLCK ADVISORY  READ -1 fe:00:10011417 100 101"; waiters carry "->".
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 8 || f[1] != "OFDLCK" || f[5] != id {
            continue;
        }
        let start: i64 = f[6].parse().unwrap();
        let end: i64 = f[7].parse().unwrap_or(start);
        entries.push((start, end));
    }
    entries.sort();
    entries
}

/// The bytes of `path` that carry OFD locks, of all holders together.
fn ofd_locked_bytes(path: &Path) -> BTreeSet<i64> {
    ofd_lock_entries(path)
        .into_iter()
        .flat_map(|(start, end)| start..=end)
        .collect()
}

fn set(bytes: Vec<i64>) -> BTreeSet<i64> {
    bytes.into_iter().collect()
}

fn wait_until(what: &str, timeout: Duration, mut ok: impl FnMut() -> bool) {
    let start = Instant::now();
    while !ok() {
        assert!(start.elapsed() < timeout, "timed out waiting for {what}");
        sleep(Duration::from_millis(50));
    }
}

fn is_fuse_mount(mountpoint: &Path) -> bool {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    let want = mountpoint.to_string_lossy();
    mounts.lines().any(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        f.len() > 2 && f[1] == want && f[2].starts_with("fuse")
    })
}

/// A background QEMU process that always goes away: SIGTERM, then SIGKILL, then the FUSE
/// mount it may have left is unmounted.
struct QemuProcess {
    child: Child,
    mountpoint: Option<PathBuf>,
    stderr: PathBuf,
}

impl QemuProcess {
    fn spawn(mut cmd: Command, stderr: PathBuf, mountpoint: Option<PathBuf>) -> QemuProcess {
        let err = File::create(&stderr).unwrap();
        let shown = format!("{cmd:?}");
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {shown}: {e}"));
        QemuProcess {
            child,
            mountpoint,
            stderr,
        }
    }

    /// Waits until `ready()`, failing with the process's stderr if it exits first.
    fn wait_ready(&mut self, what: &str, mut ready: impl FnMut() -> bool) {
        let start = Instant::now();
        loop {
            if ready() {
                return;
            }
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!(
                    "{what}: the QEMU process exited with {status}: {}",
                    std::fs::read_to_string(&self.stderr).unwrap_or_default()
                );
            }
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "timed out waiting for {what}"
            );
            sleep(Duration::from_millis(50));
        }
    }

    /// Waits for the process to exit by itself (within 20 s) and returns its status and stderr.
    fn wait_exit(&mut self) -> (std::process::ExitStatus, String) {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return (
                    status,
                    std::fs::read_to_string(&self.stderr).unwrap_or_default(),
                );
            }
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "the QEMU process did not exit"
            );
            sleep(Duration::from_millis(50));
        }
    }

    fn stop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            if let Ok(pid) = libc::pid_t::try_from(self.child.id()) {
                // SAFETY: plain kill(2) of our own, not yet reaped, child.
                unsafe { libc::kill(pid, libc::SIGTERM) };
            }
            let start = Instant::now();
            while self.child.try_wait().ok().flatten().is_none()
                && start.elapsed() < Duration::from_secs(10)
            {
                sleep(Duration::from_millis(50));
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if let Some(m) = &self.mountpoint {
            if is_fuse_mount(m) {
                let _ = Command::new("fusermount3").arg("-u").arg(m).status();
            }
            if is_fuse_mount(m) {
                let _ = Command::new("umount").arg("-l").arg(m).status();
            }
            assert!(!is_fuse_mount(m), "{} is still mounted", m.display());
        }
    }
}

impl Drop for QemuProcess {
    fn drop(&mut self) {
        self.stop();
    }
}

/// `qemu-storage-daemon` writing `image` through a writable FUSE export, as a running VM would.
fn storage_daemon(dir: &Path, image: &Path) -> QemuProcess {
    let mountpoint = dir.join("export");
    File::create(&mountpoint).unwrap();
    let mut cmd = tool("qemu-storage-daemon");
    cmd.arg("--blockdev")
        .arg(format!(
            "driver=file,node-name=f,filename={}",
            image.display()
        ))
        .args(["--blockdev", "driver=qcow2,node-name=q,file=f"])
        .arg("--export")
        .arg(format!(
            "type=fuse,id=e,node-name=q,mountpoint={},writable=on",
            mountpoint.display()
        ));
    let mut daemon = QemuProcess::spawn(cmd, dir.join("qsd.stderr"), Some(mountpoint.clone()));
    daemon.wait_ready("the qemu-storage-daemon FUSE export", || {
        is_fuse_mount(&mountpoint)
    });
    daemon
}

fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("snapfs-locks-")
        .tempdir()
        .unwrap()
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

/// snapfs read-write: QEMU writers are refused ("write" lock), so is a plain `qemu-img info`
/// (a qcow2 reader does not share write: "shared \"write\"" lock), `-U` gets through, and the
/// image is free again once the `File` is closed.
#[test]
fn read_write_lock_keeps_qemu_out() {
    let dir = tempdir();
    let img = create_qcow2(dir.path(), "a.qcow2", None);
    let file = open_rw(&img);
    let lock = acquire(&file, &img, LockMode::ReadWrite);
    assert_eq!(lock.locked_bytes(), vec![100, 101, 103, 201, 203]);
    assert_eq!(ofd_locked_bytes(&img), set(vec![100, 101, 103, 201, 203]));

    assert_qemu_img_refused(
        &["snapshot", "-c", "x"],
        &img,
        "Failed to get \"write\" lock",
    );
    // QEMU 10: a plain read-only qemu-img info refuses an image that somebody writes.
    assert_qemu_img_refused(&["info"], &img, "Failed to get shared \"write\" lock");
    let out = assert_qemu_img_ok(&["info", "-U"], &img);
    assert!(String::from_utf8_lossy(&out.stdout).contains("file format: qcow2"));

    // A writable qemu-storage-daemon cannot even start on it.
    let mountpoint = dir.path().join("export");
    File::create(&mountpoint).unwrap();
    let mut cmd = tool("qemu-storage-daemon");
    cmd.arg("--blockdev")
        .arg(format!(
            "driver=file,node-name=f,filename={}",
            img.display()
        ))
        .args(["--blockdev", "driver=qcow2,node-name=q,file=f"])
        .arg("--export")
        .arg(format!(
            "type=fuse,id=e,node-name=q,mountpoint={},writable=on",
            mountpoint.display()
        ));
    let mut qsd = QemuProcess::spawn(cmd, dir.path().join("qsd.stderr"), Some(mountpoint));
    let (status, stderr) = qsd.wait_exit();
    assert!(!status.success(), "qemu-storage-daemon started: {stderr}");
    assert!(stderr.contains("Failed to get \"write\" lock"), "{stderr}");
    drop(qsd);

    // Closing the File is what releases the locks; the ImageLock owns nothing.
    drop(file);
    assert!(ofd_locked_bytes(&img).is_empty());
    assert_eq!(lock.mode(), LockMode::ReadWrite);
    assert_qemu_img_ok(&["snapshot", "-c", "x"], &img);
    let out = assert_qemu_img_ok(&["snapshot", "-l"], &img);
    assert!(String::from_utf8_lossy(&out.stdout).contains(" x "));
}

/// `release()` unlocks without closing the file.
#[test]
fn release_frees_the_image_while_the_file_stays_open() {
    let dir = tempdir();
    let img = create_qcow2(dir.path(), "a.qcow2", None);
    let file = open_rw(&img);
    let lock = acquire(&file, &img, LockMode::ReadWrite);
    assert_qemu_img_refused(
        &["snapshot", "-c", "x"],
        &img,
        "Failed to get \"write\" lock",
    );
    lock.release(&file).unwrap();
    assert!(ofd_locked_bytes(&img).is_empty());
    assert_qemu_img_ok(&["snapshot", "-c", "x"], &img);
    drop(file);
}

/// snapfs read-only, like a long-lived QEMU reader: `qemu-img info` coexists, QEMU writers are
/// refused ("write" lock), exactly as they are while `qemu-io -r` holds the image.
#[test]
fn read_only_lock_admits_readers_but_not_writers() {
    let dir = tempdir();
    let img = create_qcow2(dir.path(), "a.qcow2", None);
    let file = open_ro(&img);
    let lock = acquire(&file, &img, LockMode::ReadOnly);
    assert_eq!(lock.locked_bytes(), vec![100, 201, 203]);
    assert_eq!(ofd_locked_bytes(&img), set(vec![100, 201, 203]));

    assert_qemu_img_ok(&["info"], &img);
    assert_qemu_img_ok(&["check"], &img);
    assert_qemu_img_refused(
        &["snapshot", "-c", "x"],
        &img,
        "Failed to get \"write\" lock",
    );

    drop(file);
    assert_qemu_img_ok(&["snapshot", "-c", "x"], &img);
}

/// A running writer (qemu-storage-daemon with a writable export, standing in for a VM) keeps
/// snapfs out in both modes, as it keeps `qemu-img info` out; its backing file, which QEMU
/// opens read-only, may be mounted read-only but not read-write. QEMU's own locks are the
/// bytes snapfs takes for the same kind of open.
#[test]
fn qemu_writer_keeps_snapfs_out() {
    let dir = tempdir();
    let base = create_qcow2(dir.path(), "base.qcow2", None);
    let top = create_qcow2(dir.path(), "top.qcow2", Some(&base));
    let daemon = storage_daemon(dir.path(), &top);

    // QEMU 10's bytes for a writable qcow2 image and for its backing file. QEMU may still be
    // updating its permissions when the export shows (it unlocks and locks byte by byte; a busy
    // run once caught the backing file at {100, 201}), so wait for them to settle.
    let settled = |image: &Path, mode: LockMode| ofd_locked_bytes(image) == set(mode.lock_bytes());
    wait_until(
        "QEMU's lock bytes on the image",
        Duration::from_secs(10),
        || settled(&top, LockMode::ReadWrite),
    );
    wait_until(
        "QEMU's lock bytes on the backing file",
        Duration::from_secs(10),
        || settled(&base, LockMode::ReadOnly),
    );

    let rw = open_rw(&top);
    let e = refused(&rw, &top, LockMode::ReadWrite);
    assert_eq!(e.conflict(), Some(Conflict::Holds(Perm::Write)));
    let msg = e.to_string();
    assert!(msg.contains("open for writing"), "{msg}");
    assert!(msg.contains("qemu-storage-daemon"), "{msg}");
    // A read-only mount is refused beside a writer too: the advice must not send users there.
    assert!(!msg.contains("mount read-only"), "{msg}");
    assert!(msg.contains("stop it first"), "{msg}");
    match &e {
        LockError::InUse { conflicts, .. } => {
            // Every conflict QEMU would also see: it holds write and resize, shares neither.
            let all: BTreeSet<String> = conflicts.iter().map(|c| c.to_string()).collect();
            assert!(
                all.contains("Failed to get shared \"write\" lock"),
                "{all:?}"
            );
            assert!(all.contains("Failed to get \"write\" lock"), "{all:?}");
        }
        other => panic!("{other:?}"),
    }

    // Read-only is refused too, as QEMU's read-only open is (without -U).
    let entries = ofd_lock_entries(&top);
    let ro = open_ro(&top);
    let e = refused(&ro, &top, LockMode::ReadOnly);
    assert_eq!(e.conflict(), Some(Conflict::Holds(Perm::Write)));
    assert!(e.to_string().contains("open for writing"), "{e}");
    assert!(!e.to_string().contains("mount read-only"), "{e}");
    assert_qemu_img_refused(&["info"], &top, "Failed to get shared \"write\" lock");
    // The refused attempts left none of their bytes behind.
    refused(&rw, &top, LockMode::ReadWrite);
    assert_eq!(ofd_lock_entries(&top), entries);

    // Shared read-only (--force-share) coexists with the writer, sees it, and takes byte 100
    // only, as `qemu-img -U` does.
    assert_eq!(held_by_others(&ro, Perm::Write).unwrap(), Some(true));
    let shared = acquire(&ro, &top, LockMode::SharedRead);
    assert_eq!(shared.locked_bytes(), vec![100]);
    assert_eq!(held_by_others(&ro, Perm::Write).unwrap(), Some(true));
    shared.release(&ro).unwrap();

    // The backing file: readers welcome, writers not (QEMU agrees on both counts).
    let base_ro = open_ro(&base);
    let base_lock = acquire(&base_ro, &base, LockMode::ReadOnly);
    assert_qemu_img_ok(&["info"], &base);
    let base_rw = open_rw(&base);
    let e = refused(&base_rw, &base, LockMode::ReadWrite);
    assert_eq!(e.conflict(), Some(Conflict::Unshares(Perm::Write)));
    assert!(e.to_string().contains("does not share write"), "{e}");
    assert_qemu_img_refused(
        &["snapshot", "-c", "x"],
        &base,
        "Failed to get \"write\" lock",
    );
    base_lock.release(&base_ro).unwrap();
    drop(base_ro);

    drop(daemon);
    let lock = acquire(&rw, &top, LockMode::ReadWrite);
    assert_eq!(lock.mode(), LockMode::ReadWrite);
}

/// Read-only locks coexist, with each other and with QEMU readers; a read-write lock is then
/// refused because readers do not share write, just as QEMU refuses a writer while
/// `qemu-img info`/`qemu-io -r` (or a VM's read-only disk) has the image open.
#[test]
fn readers_coexist_and_keep_writers_out() {
    let dir = tempdir();
    let img = create_qcow2(dir.path(), "a.qcow2", None);

    let f1 = open_ro(&img);
    let f2 = open_ro(&img);
    let l1 = acquire(&f1, &img, LockMode::ReadOnly);
    let _l2 = acquire(&f2, &img, LockMode::ReadOnly);
    assert_qemu_img_ok(&["info"], &img);

    let w = open_rw(&img);
    let e = refused(&w, &img, LockMode::ReadWrite);
    assert_eq!(e.conflict(), Some(Conflict::Unshares(Perm::Write)));
    assert!(e.to_string().contains("does not share write"), "{e}");
    assert!(e.to_string().contains("mount read-only"), "{e}");

    // One reader left: still refused. None left: granted.
    l1.release(&f1).unwrap();
    drop(f1);
    refused(&w, &img, LockMode::ReadWrite);
    drop(f2);
    let wl = acquire(&w, &img, LockMode::ReadWrite);
    wl.release(&w).unwrap();
    drop(w);

    // The same against a long-lived QEMU reader.
    let mut cmd = tool("qemu-io");
    cmd.args(["-r", "-f", "qcow2", "-c", "sleep 60000"])
        .arg(&img);
    let mut reader = QemuProcess::spawn(cmd, dir.path().join("qemu-io.stderr"), None);
    reader.wait_ready("qemu-io -r to lock the image", || {
        ofd_locked_bytes(&img) == set(LockMode::ReadOnly.lock_bytes())
    });
    let ro = open_ro(&img);
    let _ro_lock = acquire(&ro, &img, LockMode::ReadOnly);
    let w = open_rw(&img);
    let e = refused(&w, &img, LockMode::ReadWrite);
    assert_eq!(e.conflict(), Some(Conflict::Unshares(Perm::Write)));
    drop(ro);
    drop(reader);
    wait_until("qemu-io's locks to go", Duration::from_secs(10), || {
        ofd_locked_bytes(&img).is_empty()
    });
    let _wl = acquire(&w, &img, LockMode::ReadWrite);
}

/// OFD locks work, and QEMU sees them, on tmpfs and on the disk file system under target/.
#[test]
fn locks_work_on_tmpfs_and_on_disk() {
    const TMPFS_MAGIC: i64 = 0x0102_1994;
    let fs_type = |p: &Path| -> i64 {
        let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: zeroed statfs is valid plain data; statfs writes it on success.
        let mut st: libc::statfs = unsafe { std::mem::zeroed() };
        // SAFETY: `c` is a NUL-terminated path and `st` a writable statfs.
        let ret = unsafe { libc::statfs(c.as_ptr(), &mut st) };
        assert_eq!(ret, 0, "statfs {}", p.display());
        #[allow(clippy::unnecessary_cast)]
        let t = st.f_type as i64;
        t
    };

    let shm = Path::new("/dev/shm");
    assert!(
        shm.is_dir() && fs_type(shm) == TMPFS_MAGIC,
        "/dev/shm must be a tmpfs for this test"
    );
    let on_tmpfs = tempfile::Builder::new()
        .prefix("snapfs-locks-")
        .tempdir_in(shm)
        .unwrap();
    let on_disk = tempfile::Builder::new()
        .prefix("snapfs-locks-")
        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
        .unwrap();
    assert_ne!(
        fs_type(on_disk.path()),
        TMPFS_MAGIC,
        "CARGO_TARGET_TMPDIR should be on a disk file system"
    );

    for dir in [on_tmpfs.path(), on_disk.path()] {
        let img = create_qcow2(dir, "a.qcow2", None);
        let file = open_rw(&img);
        let lock = acquire(&file, &img, LockMode::ReadWrite);
        assert_eq!(ofd_locked_bytes(&img), set(lock.locked_bytes()));
        let other = open_ro(&img);
        let e = refused(&other, &img, LockMode::ReadOnly);
        assert_eq!(e.conflict(), Some(Conflict::Holds(Perm::Write)));
        assert_qemu_img_refused(
            &["snapshot", "-c", "x"],
            &img,
            "Failed to get \"write\" lock",
        );
        drop(file);
        let _ro = acquire(&other, &img, LockMode::ReadOnly);
        assert_qemu_img_ok(&["info"], &img);
    }
}
