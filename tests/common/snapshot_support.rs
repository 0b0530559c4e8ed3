//! Helpers for the internal-snapshot tests (`tests/snapshot_*.rs`): the control files, the status
//! log, `qemu-img check --output=json`, the qemu-img oracle for snapshot commands, a seeded RNG,
//! a foreground daemon that a test can `kill -9`, and a deadline that aborts a hung mount.

use std::collections::BTreeSet;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::{
    force_unmount, is_mounted, parse_rfc3339, qemu_img, run_status, snapfs_bin, snapshots,
};

// ---------------------------------------------------------------------------------------------
// errno
// ---------------------------------------------------------------------------------------------

/// A readable name for an errno value (the ones these tests expect).
pub fn errno_name(e: i32) -> String {
    let n = match e {
        libc::EEXIST => "EEXIST",
        libc::ENOENT => "ENOENT",
        libc::EINVAL => "EINVAL",
        libc::EBUSY => "EBUSY",
        libc::EROFS => "EROFS",
        libc::ENOSPC => "ENOSPC",
        libc::EIO => "EIO",
        libc::ENOTCONN => "ENOTCONN",
        libc::ECONNABORTED => "ECONNABORTED",
        libc::EOPNOTSUPP => "EOPNOTSUPP",
        libc::EACCES => "EACCES",
        libc::EPERM => "EPERM",
        libc::ERANGE => "ERANGE",
        libc::EFBIG => "EFBIG",
        _ => return format!("errno {e}"),
    };
    n.to_string()
}

fn os_errno(e: &std::io::Error) -> i32 {
    e.raw_os_error().unwrap_or(-1)
}

// ---------------------------------------------------------------------------------------------
// Control files and status
// ---------------------------------------------------------------------------------------------

/// Writes `bytes` to `MP/control/FILE` in one write(2) (the file opened write-only, without
/// O_TRUNC). `Ok` when the whole write was accepted, else the errno of the open or the write.
pub fn control_raw(mp: &Path, file: &str, bytes: &[u8]) -> Result<(), i32> {
    let path = mp.join("control").join(file);
    let mut f = OpenOptions::new()
        .write(true)
        .open(&path)
        .map_err(|e| os_errno(&e))?;
    match f.write(bytes) {
        Ok(n) if n == bytes.len() => Ok(()),
        Ok(n) => panic!(
            "write to {} accepted {n} of {} bytes (a command is accepted whole or refused)",
            path.display(),
            bytes.len()
        ),
        Err(e) => Err(os_errno(&e)),
    }
}

/// `echo "TEXT" > MP/control/FILE`: the text plus a newline, in one write.
pub fn control(mp: &Path, file: &str, text: &str) -> Result<(), i32> {
    control_raw(mp, file, format!("{text}\n").as_bytes())
}

/// Runs a command that must succeed; panics with the errno and the status log otherwise.
pub fn control_ok(mp: &Path, file: &str, text: &str) {
    if let Err(e) = control(mp, file, text) {
        panic!(
            "`echo {text:?} > control/{file}` failed with {}; control/status:\n{}",
            errno_name(e),
            status_text(mp)
        );
    }
}

/// Runs a command that must be refused with `errno`.
pub fn control_err(mp: &Path, file: &str, text: &str, errno: i32) {
    match control(mp, file, text) {
        Err(e) if e == errno => {}
        Err(e) => panic!(
            "`echo {text:?} > control/{file}` failed with {} but {} was expected; control/status:\n{}",
            errno_name(e),
            errno_name(errno),
            status_text(mp)
        ),
        Ok(()) => panic!(
            "`echo {text:?} > control/{file}` succeeded but {} was expected; control/status:\n{}",
            errno_name(errno),
            status_text(mp)
        ),
    }
}

/// The whole of `MP/control/status`.
pub fn status_text(mp: &Path) -> String {
    fs::read_to_string(mp.join("control").join("status")).unwrap_or_else(|e| format!("<{e}>"))
}

/// The lines of `MP/control/status`.
pub fn status_lines(mp: &Path) -> Vec<String> {
    status_text(mp).lines().map(str::to_owned).collect()
}

/// One line of `control/status`: `TIMESTAMP LABEL: ok` or `TIMESTAMP LABEL: error: MESSAGE`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatusLine {
    pub time: (i64, u32),
    /// E.g. `create NAME` (or just `delete` for a command that could not be parsed).
    pub label: String,
    /// `None` for `ok`, else the error message.
    pub error: Option<String>,
}

/// Parses a status line; `None` when it does not have the documented shape (an RFC 3339 UTC
/// time ending in `Z`, a label, then `: ok` or `: error: MESSAGE` with a non-empty message).
pub fn parse_status_line(line: &str) -> Option<StatusLine> {
    let (ts, rest) = line.split_once(' ')?;
    if !ts.ends_with('Z') {
        return None;
    }
    let time = parse_rfc3339(ts)?;
    if let Some(label) = rest.strip_suffix(": ok") {
        if label.contains(": error: ") || label.is_empty() {
            return None;
        }
        return Some(StatusLine {
            time,
            label: label.to_string(),
            error: None,
        });
    }
    let (label, msg) = rest.split_once(": error: ")?;
    if label.is_empty() || msg.trim().is_empty() {
        return None;
    }
    Some(StatusLine {
        time,
        label: label.to_string(),
        error: Some(msg.to_string()),
    })
}

/// The last line of `control/status`, parsed; panics if there is none or it is malformed.
pub fn last_status(mp: &Path) -> StatusLine {
    let text = status_text(mp);
    let last = text
        .lines()
        .last()
        .unwrap_or_else(|| panic!("control/status is empty"));
    parse_status_line(last).unwrap_or_else(|| {
        panic!("control/status line {last:?} does not have the documented shape; all:\n{text}")
    })
}

/// The last status line must report `label` as successful.
pub fn assert_status_ok(mp: &Path, label: &str) {
    let s = last_status(mp);
    assert!(
        s.label == label && s.error.is_none(),
        "last control/status line should be `... {label}: ok`, got {s:?}; all:\n{}",
        status_text(mp)
    );
}

/// The last status line must report `label` as failed; returns the message.
pub fn assert_status_error(mp: &Path, label: &str) -> String {
    let s = last_status(mp);
    match (&s.label, &s.error) {
        (l, Some(m)) if l == label => m.clone(),
        _ => panic!(
            "last control/status line should be `... {label}: error: MESSAGE`, got {s:?}; all:\n{}",
            status_text(mp)
        ),
    }
}

/// The names shown in `MP/snapshots/` with `.raw` removed, sorted.
pub fn snapshot_dir_names(mp: &Path) -> BTreeSet<String> {
    let dir = mp.join("snapshots");
    fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("read_dir {}: {e}", dir.display()))
        .map(|e| {
            let n = e
                .expect("dir entry")
                .file_name()
                .to_string_lossy()
                .into_owned();
            n.strip_suffix(".raw").map(str::to_owned).unwrap_or(n)
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// File I/O on the mount
// ---------------------------------------------------------------------------------------------

/// pwrite `data` at `off` into `path` (opened write-only for this write, then closed).
pub fn pwrite(path: &Path, off: u64, data: &[u8]) {
    let f = OpenOptions::new()
        .write(true)
        .open(path)
        .unwrap_or_else(|e| panic!("open {} for writing: {e}", path.display()));
    f.write_all_at(data, off).unwrap_or_else(|e| {
        panic!(
            "pwrite {} bytes at {off:#x} to {}: {e}",
            data.len(),
            path.display()
        )
    });
}

/// How a range is zeroed through live.raw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ZeroHow {
    /// fallocate(PUNCH_HOLE | KEEP_SIZE)
    Punch,
    /// fallocate(ZERO_RANGE | KEEP_SIZE)
    ZeroRange,
    /// pwrite of zero bytes
    Write,
}

/// Zeroes `[off, off+len)` of `path` as `how` says.
pub fn zero_range(path: &Path, off: u64, len: u64, how: ZeroHow) {
    if how == ZeroHow::Write {
        pwrite(path, off, &vec![0u8; len as usize]);
        return;
    }
    let f = OpenOptions::new()
        .write(true)
        .open(path)
        .unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    let mode = libc::FALLOC_FL_KEEP_SIZE
        | if how == ZeroHow::Punch {
            libc::FALLOC_FL_PUNCH_HOLE
        } else {
            libc::FALLOC_FL_ZERO_RANGE
        };
    let r = unsafe { libc::fallocate(f.as_raw_fd(), mode, off as libc::off_t, len as libc::off_t) };
    if r != 0 {
        panic!(
            "fallocate({how:?}, {off:#x}, {len}) on {}: {}",
            path.display(),
            std::io::Error::last_os_error()
        );
    }
}

/// Reads a whole file (through the page cache, as a user would).
pub fn read_whole(path: &Path) -> Vec<u8> {
    let mut f = File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    let mut v = Vec::new();
    f.read_to_end(&mut v)
        .unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    v
}

/// st_size of a file.
pub fn file_size(path: &Path) -> u64 {
    fs::metadata(path)
        .unwrap_or_else(|e| panic!("stat {}: {e}", path.display()))
        .len()
}

/// `None` when equal, else where the first difference is (and the sizes).
pub fn diff_bytes(got: &[u8], want: &[u8]) -> Option<String> {
    if got == want {
        return None;
    }
    if got.len() != want.len() {
        let common = got.len().min(want.len());
        let first = (0..common).find(|&i| got[i] != want[i]);
        return Some(format!(
            "size {} but {} expected{}",
            got.len(),
            want.len(),
            first
                .map(|i| format!("; also differs first at {i:#x}"))
                .unwrap_or_default()
        ));
    }
    let first = (0..got.len()).find(|&i| got[i] != want[i]).unwrap();
    let last = (0..got.len()).rev().find(|&i| got[i] != want[i]).unwrap();
    let ndiff = got.iter().zip(want).filter(|(a, b)| a != b).count();
    Some(format!(
        "{ndiff} bytes differ, first at {first:#x} (got {:#04x}, want {:#04x}), last at {last:#x}",
        got[first], want[first]
    ))
}

/// fsync of a file (flushes snapfs's metadata for live.raw).
pub fn fsync(path: &Path) {
    let f = OpenOptions::new()
        .write(true)
        .open(path)
        .unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    f.sync_all()
        .unwrap_or_else(|e| panic!("fsync {}: {e}", path.display()));
}

// ---------------------------------------------------------------------------------------------
// qemu-img check and snapshot oracles
// ---------------------------------------------------------------------------------------------

/// What `qemu-img check --output=json` found.
#[derive(Debug, Clone)]
pub struct CheckReport {
    pub exit: Option<i32>,
    pub corruptions: u64,
    pub leaks: u64,
    pub check_errors: u64,
    pub text: String,
}

impl CheckReport {
    pub fn clean(&self) -> bool {
        self.exit == Some(0) && self.corruptions == 0 && self.leaks == 0 && self.check_errors == 0
    }
    pub fn no_corruption(&self) -> bool {
        matches!(self.exit, Some(0) | Some(3)) && self.corruptions == 0 && self.check_errors == 0
    }
}

/// `qemu-img check --output=json IMAGE` (no -U: the image must not be in use). Exit status 0 is
/// clean, 3 leaks only, 2 corruptions, 1 check errors.
pub fn check_json(image: &Path) -> CheckReport {
    let out = run_status(
        Command::new("qemu-img")
            .args(["check", "--output=json"])
            .arg(image),
    );
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let text = format!("{stdout}{stderr}");
    let v: serde_json::Value = serde_json::from_str(&stdout).unwrap_or_else(|e| {
        panic!(
            "qemu-img check --output=json {} printed no JSON ({e}; exit {}): {text}",
            image.display(),
            out.status
        )
    });
    let num = |k: &str| v[k].as_u64().unwrap_or(0);
    CheckReport {
        exit: out.status.code(),
        corruptions: num("corruptions"),
        leaks: num("leaks"),
        check_errors: num("check-errors"),
        text,
    }
}

/// Panics unless `qemu-img check` finds no corruption, no leak and no error.
pub fn assert_check_clean(image: &Path, context: &str) {
    let r = check_json(image);
    assert!(
        r.clean(),
        "{context}: qemu-img check {} is not clean (exit {:?}, {} corruptions, {} leaks, {} errors):\n{}",
        image.display(),
        r.exit,
        r.corruptions,
        r.leaks,
        r.check_errors,
        r.text
    );
}

/// Panics if `qemu-img check` finds corruptions or errors (leaks are allowed); returns the report.
pub fn assert_check_no_corruption(image: &Path, context: &str) -> CheckReport {
    let r = check_json(image);
    assert!(
        r.no_corruption(),
        "{context}: qemu-img check {} finds corruption (exit {:?}, {} corruptions, {} leaks, {} errors):\n{}",
        image.display(),
        r.exit,
        r.corruptions,
        r.leaks,
        r.check_errors,
        r.text
    );
    r
}

/// The snapshot tags of `image` in table order (`qemu-img info -U`).
pub fn snapshot_tags(image: &Path) -> Vec<String> {
    snapshots(image).into_iter().map(|s| s.name).collect()
}

/// `qemu-img snapshot FLAG TAG IMAGE` (FLAG is -c, -a or -d); panics on failure.
pub fn qemu_snapshot(image: &Path, flag: &str, tag: &str) {
    qemu_img(&["snapshot", flag, tag, image.to_str().unwrap()]);
}

/// The content of `image` (the active disk, or snapshot `tag` per `qemu-img convert -l
/// snapshot.name=TAG`) as bytes. The disk size is the image's current size.
pub fn qemu_content(image: &Path, tag: Option<&str>) -> Vec<u8> {
    let raw = super::convert_to_raw(image, tag);
    let v = fs::read(&raw).unwrap();
    fs::remove_file(&raw).ok();
    v
}

/// The content of snapshot `tag` of `image` at the snapshot's own disk size: a copy of the
/// image (next to it, so relative backing names resolve) with `qemu-img snapshot -a TAG`
/// applied, converted to raw. (`qemu-img convert -l` reads only the image's current size, so it
/// loses the end of a snapshot taken when the disk was larger.) `image` must not be in use.
pub fn qemu_snapshot_content(image: &Path, tag: &str) -> Vec<u8> {
    let stem = image.file_stem().unwrap().to_string_lossy().into_owned();
    let copy = image.with_file_name(format!(".{stem}.apply-{}.qcow2", super::unique()));
    fs::copy(image, &copy).unwrap();
    qemu_snapshot(&copy, "-a", tag);
    let v = qemu_content(&copy, None);
    fs::remove_file(&copy).ok();
    v
}

/// The message of a caught panic.
pub fn panic_text(e: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = e.downcast_ref::<String>() {
        s.clone()
    } else if let Some(s) = e.downcast_ref::<&str>() {
        s.to_string()
    } else {
        "(panic without a message)".to_string()
    }
}

// ---------------------------------------------------------------------------------------------
// Seeded RNG
// ---------------------------------------------------------------------------------------------

/// splitmix64: small, seedable, good enough for test plans.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed ^ 0x5eed_5eed_5eed_5eed)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform in `[0, n)` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
    /// Uniform in `[lo, hi]`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi - lo + 1)
    }
    /// True with probability `percent`/100.
    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
    pub fn pick<'a, T>(&mut self, v: &'a [T]) -> &'a T {
        &v[self.below(v.len() as u64) as usize]
    }
    /// `len` pseudo-random bytes.
    pub fn bytes(&mut self, len: usize) -> Vec<u8> {
        let mut v = Vec::with_capacity(len + 8);
        while v.len() < len {
            v.extend_from_slice(&self.next_u64().to_le_bytes());
        }
        v.truncate(len);
        v
    }
}

// ---------------------------------------------------------------------------------------------
// A foreground daemon the test can kill
// ---------------------------------------------------------------------------------------------

/// `snapfs mount -f IMAGE MP` as a child the test owns (for `kill -9`). Dropping it kills the
/// daemon if still running, unmounts (`umount`, then `umount -l`) and reaps it.
pub struct Daemon {
    pub child: Child,
    pub mp: PathBuf,
    dir: PathBuf,
    pub stderr_path: PathBuf,
}

impl Daemon {
    pub fn start(image: &Path, args: &[&str]) -> Daemon {
        super::require_env();
        let dir = tempfile::Builder::new()
            .prefix("snapfs-crash-")
            .tempdir()
            .expect("temp dir")
            .keep()
            .canonicalize()
            .unwrap();
        let mp = dir.join("mnt");
        fs::create_dir(&mp).unwrap();
        let stderr_path = dir.join("stderr.log");
        let child = Command::new(snapfs_bin())
            .arg("mount")
            .arg("-f")
            .args(args)
            .arg(image)
            .arg(&mp)
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(&stderr_path).unwrap())
            .spawn()
            .expect("start snapfs mount -f");
        let mut d = Daemon {
            child,
            mp,
            dir,
            stderr_path,
        };
        let t = Instant::now();
        loop {
            if let Ok(Some(s)) = d.child.try_wait() {
                panic!(
                    "snapfs mount -f {} exited early ({s}):\n{}",
                    image.display(),
                    d.stderr()
                );
            }
            if is_mounted(&d.mp) && d.mp.join("live.raw").exists() {
                break;
            }
            assert!(
                t.elapsed() < Duration::from_secs(20),
                "mount of {} not ready within 20 s:\n{}",
                image.display(),
                d.stderr()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        d
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn stderr(&self) -> String {
        fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    /// SIGKILL to the daemon, then reaps it.
    pub fn kill9(&mut self) {
        unsafe {
            libc::kill(self.pid(), libc::SIGKILL);
        }
        let _ = self.child.wait();
    }

    /// Unmounts (after a kill: the connection is gone, so `umount`/`umount -l` do it) and waits
    /// for the daemon to exit (killing it after 10 s). True when the mount point is free.
    pub fn finish(&mut self) -> bool {
        let ok = force_unmount(&self.mp);
        let t = Instant::now();
        loop {
            match self.child.try_wait() {
                Ok(Some(_)) | Err(_) => break,
                Ok(None) => {}
            }
            if t.elapsed() > Duration::from_secs(10) {
                let _ = self.child.kill();
                let _ = self.child.wait();
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        ok
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if self.finish() {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Deadline
// ---------------------------------------------------------------------------------------------

/// Aborts the FUSE connection of the mount at `mp` (through /sys/fs/fuse/connections/N/abort)
/// when not dropped within `limit`, so that a hung request fails (ENOTCONN) instead of hanging
/// the test. Says so on stderr.
pub struct Deadline {
    stop: Option<mpsc::Sender<()>>,
    handle: Option<JoinHandle<()>>,
}

impl Deadline {
    pub fn new(mp: &Path, limit: Duration, what: &str) -> Deadline {
        let dev = fs::metadata(mp).map(|m| m.dev()).unwrap_or(0);
        let minor = libc::minor(dev);
        let (tx, rx) = mpsc::channel::<()>();
        let what = what.to_string();
        let mp = mp.to_path_buf();
        let handle = std::thread::spawn(move || {
            if let Err(mpsc::RecvTimeoutError::Timeout) = rx.recv_timeout(limit) {
                eprintln!(
                    "deadline: {what} took more than {limit:?}; aborting the FUSE connection of {}",
                    mp.display()
                );
                let abort = format!("/sys/fs/fuse/connections/{minor}/abort");
                let _ = fs::write(abort, "1");
            }
        });
        Deadline {
            stop: Some(tx),
            handle: Some(handle),
        }
    }
}

impl Drop for Deadline {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}
