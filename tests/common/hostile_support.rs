//! Helpers for the hostile-image tests (tests/hostile_*.rs): find the tables of a qcow2 file with a
//! few lines of our own (independent of snapfs's parser), patch them, and run snapfs on the result
//! with a time limit while measuring its memory.
//!
//! What the tests hold snapfs to (docs/design.md section 5, shared/reference/bad-inputs.md): a hostile
//! image is either refused — exit status non-zero, exactly one line on stderr that names the field,
//! no panic — or it mounts and only the reads of the damaged range fail, with EIO and a logged
//! reason, while everything else reads as the oracle says. Either way no process grows beyond
//! [`MEMORY_LIMIT_KIB`], nothing hangs, and the image file's bytes never change: neither a
//! read-only (`-r`) nor a read-write mount writes to an image nobody wrote to.

// Children are reaped by pid (wait4) so that their peak memory can be measured.
#![allow(clippy::zombie_processes)]

use std::fs::{self, File};
use std::io;
use std::os::unix::fs::FileExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use super::{
    force_unmount, is_mounted, read_all, read_be_u32, read_be_u64, require_env, snapfs_bin,
    snapfs_cmd, write_be_u64,
};

/// The most memory (peak RSS, VmHWM) any snapfs process may use on a hostile image.
pub const MEMORY_LIMIT_KIB: u64 = 200 * 1024;

/// The address space every snapfs process runs under (RLIMIT_AS, with one malloc arena): about
/// 60 MiB of binary, libraries and stacks, plus [`MEMORY_LIMIT_KIB`], plus a margin. An allocation
/// beyond it fails, which aborts the process: an over-allocation cannot hide in untouched pages.
pub const ADDRESS_SPACE_LIMIT: u64 = 320 << 20;

/// How long one `snapfs info` or one mount attempt may take.
pub const COMMAND_LIMIT: Duration = Duration::from_secs(60);

/// Offset bits of L1 and standard L2 entries (9–55).
pub const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
pub const COPIED: u64 = 1 << 63;
pub const COMPRESSED: u64 = 1 << 62;

// ---------------------------------------------------------------------------------------------
// Where things are in a qcow2 file
// ---------------------------------------------------------------------------------------------

/// The header fields that locate the tables, read straight from the file.
#[derive(Debug, Clone)]
pub struct Layout {
    pub path: PathBuf,
    pub version: u32,
    pub cluster_bits: u32,
    pub size: u64,
    pub l1_size: u32,
    pub l1_offset: u64,
    pub refcount_table_offset: u64,
    pub nb_snapshots: u32,
    pub snapshots_offset: u64,
    pub extended_l2: bool,
}

impl Layout {
    pub fn read(path: &Path) -> Layout {
        let version = read_be_u32(path, 4);
        let incompatible = if version >= 3 {
            read_be_u64(path, 72)
        } else {
            0
        };
        Layout {
            path: path.to_owned(),
            version,
            cluster_bits: read_be_u32(path, 20),
            size: read_be_u64(path, 24),
            l1_size: read_be_u32(path, 36),
            l1_offset: read_be_u64(path, 40),
            refcount_table_offset: read_be_u64(path, 48),
            nb_snapshots: read_be_u32(path, 60),
            snapshots_offset: read_be_u64(path, 64),
            extended_l2: incompatible & (1 << 4) != 0,
        }
    }

    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// Bytes per L2 entry (16 with extended L2).
    pub fn l2_entry_bytes(&self) -> u64 {
        if self.extended_l2 { 16 } else { 8 }
    }

    /// Guest bytes one L2 table (one L1 entry) covers.
    pub fn l2_coverage(&self) -> u64 {
        self.cluster_size() / self.l2_entry_bytes() * self.cluster_size()
    }

    /// File offset of the L1 entry covering guest offset `guest`.
    pub fn l1_entry_at(&self, guest: u64) -> u64 {
        self.l1_offset + guest / self.l2_coverage() * 8
    }

    pub fn l1_entry(&self, guest: u64) -> u64 {
        read_be_u64(&self.path, self.l1_entry_at(guest))
    }

    /// File offset of the L2 table covering `guest` (panics if there is none).
    pub fn l2_table(&self, guest: u64) -> u64 {
        let l2 = self.l1_entry(guest) & OFFSET_MASK;
        assert_ne!(l2, 0, "test bug: no L2 table covers guest {guest:#x}");
        l2
    }

    /// File offset of the L2 entry (its first word) covering guest offset `guest`.
    pub fn l2_entry_at(&self, guest: u64) -> u64 {
        let index = guest % self.l2_coverage() / self.cluster_size();
        self.l2_table(guest) + index * self.l2_entry_bytes()
    }

    pub fn l2_entry(&self, guest: u64) -> u64 {
        read_be_u64(&self.path, self.l2_entry_at(guest))
    }

    /// The host offset of the data of the (uncompressed) cluster at `guest`.
    pub fn data_offset(&self, guest: u64) -> u64 {
        let off = self.l2_entry(guest) & OFFSET_MASK;
        assert_ne!(off, 0, "test bug: guest {guest:#x} has no data cluster");
        off
    }

    /// Where the compressed data of the cluster at `guest` is: (byte offset, bytes, sector field
    /// shift). Panics if the cluster is not compressed.
    pub fn compressed(&self, guest: u64) -> (u64, u64, u32) {
        let entry = self.l2_entry(guest);
        assert!(
            entry & COMPRESSED != 0,
            "test bug: guest {guest:#x} is not compressed"
        );
        let x = 62 - (self.cluster_bits - 8);
        let offset = entry & ((1 << x) - 1);
        let sectors = ((entry & ((1 << 62) - 1)) >> x) + 1;
        (offset, sectors * 512 - (offset & 511), x)
    }

    /// File offsets of the snapshot table entries, in table order.
    pub fn snapshot_entries(&self) -> Vec<u64> {
        super::snapshot_entry_offsets(&self.path)
    }

    /// Sets an 8-byte big-endian field.
    pub fn set_u64(&self, offset: u64, value: u64) {
        write_be_u64(&self.path, offset, value);
    }

    pub fn file_len(&self) -> u64 {
        fs::metadata(&self.path).unwrap().len()
    }
}

// ---------------------------------------------------------------------------------------------
// Running snapfs with a time limit and a memory measurement
// ---------------------------------------------------------------------------------------------

/// How a command ended.
#[derive(Debug)]
pub struct Measured {
    /// `None` when it was killed at the time limit.
    pub status: Option<ExitStatus>,
    pub stdout: String,
    pub stderr: String,
    /// Peak resident memory (VmHWM, sampled every few milliseconds while it ran), KiB.
    ///
    /// Not getrusage's ru_maxrss: Linux counts the parent's memory at fork/vfork time in it.
    pub max_rss_kib: u64,
}

/// Runs snapfs processes under [`ADDRESS_SPACE_LIMIT`], with the log variables removed so that
/// stderr is what a user sees.
fn limit_memory(cmd: &mut Command) {
    use std::os::unix::process::CommandExt;
    cmd.env("MALLOC_ARENA_MAX", "1")
        .env_remove("RUST_LOG")
        .env_remove("RUST_BACKTRACE");
    // SAFETY: setrlimit is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            let limit = libc::rlimit {
                rlim_cur: ADDRESS_SPACE_LIMIT,
                rlim_max: ADDRESS_SPACE_LIMIT,
            };
            if libc::setrlimit(libc::RLIMIT_AS, &limit) != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Peak resident memory of a running process (VmHWM), KiB; 0 once it is gone.
fn peak_rss_kib(pid: i32) -> u64 {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// Waits for `pid` (a child of ours) for at most `limit`, then kills it; returns its status (None
/// when killed) and its peak RSS as sampled meanwhile.
fn wait_measured(pid: i32, limit: Duration) -> (Option<ExitStatus>, u64) {
    let start = Instant::now();
    let mut killed = false;
    let mut peak = 0;
    loop {
        peak = peak.max(peak_rss_kib(pid));
        let mut status = 0;
        let flags = if killed { 0 } else { libc::WNOHANG };
        // SAFETY: waitpid on our own child with a valid out-pointer.
        let r = unsafe { libc::waitpid(pid, &mut status, flags) };
        if r == pid {
            let status = (!killed).then(|| ExitStatus::from_raw(status));
            return (status, peak);
        }
        if r < 0 && io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            panic!("waitpid({pid}): {}", io::Error::last_os_error());
        }
        if !killed && start.elapsed() > limit {
            // SAFETY: our own child, not yet reaped.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            killed = true;
            continue;
        }
        std::thread::sleep(Duration::from_millis(3));
    }
}

fn read_back(mut f: File) -> String {
    use std::io::{Read, Seek, SeekFrom};
    let mut s = Vec::new();
    f.seek(SeekFrom::Start(0)).unwrap();
    f.read_to_end(&mut s).unwrap();
    String::from_utf8_lossy(&s).into_owned()
}

/// Runs `cmd` (a snapfs command) to completion under the memory limits, killed at `limit`,
/// capturing its output and peak memory.
pub fn run_measured(cmd: &mut Command, limit: Duration) -> Measured {
    limit_memory(cmd);
    let out = tempfile::tempfile().unwrap();
    let err = tempfile::tempfile().unwrap();
    let child = cmd
        .stdin(Stdio::null())
        .stdout(out.try_clone().unwrap())
        .stderr(err.try_clone().unwrap())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    let (status, max_rss_kib) = wait_measured(child.id() as i32, limit);
    Measured {
        status,
        stdout: read_back(out),
        stderr: read_back(err),
        max_rss_kib,
    }
}

/// Problems with how a refused command ended: it must exit non-zero within the limit, print
/// exactly one line on stderr that contains every one of `needles` (case-insensitive), no panic,
/// and stay within the memory limit.
pub fn refusal_problems(what: &str, m: &Measured, needles: &[&str]) -> Vec<String> {
    let mut problems = Vec::new();
    match m.status {
        None => problems.push(format!("{what}: did not finish in time (killed)")),
        Some(s) if s.success() => problems.push(format!("{what}: exit status 0, want non-zero")),
        Some(s) if s.signal().is_some() => problems.push(format!(
            "{what}: crashed ({s}){}",
            if m.stderr.contains("memory allocation") {
                " allocating beyond the address space limit"
            } else {
                ""
            }
        )),
        Some(_) => {}
    }
    let err = m.stderr.trim_end_matches('\n');
    if err.is_empty() {
        problems.push(format!("{what}: nothing on stderr"));
    } else if err.contains('\n') {
        problems.push(format!(
            "{what}: stderr has {} lines, want one:\n{err}",
            err.lines().count()
        ));
    }
    if m.stderr.contains("panicked") || m.stderr.contains("RUST_BACKTRACE") {
        problems.push(format!("{what}: panic:\n{}", m.stderr));
    }
    let lower = err.to_lowercase();
    for needle in needles {
        if !lower.contains(&needle.to_lowercase()) {
            problems.push(format!(
                "{what}: the message does not mention {needle:?}: {err}"
            ));
        }
    }
    if m.max_rss_kib > MEMORY_LIMIT_KIB {
        problems.push(format!(
            "{what}: peak memory {} KiB exceeds {MEMORY_LIMIT_KIB} KiB",
            m.max_rss_kib
        ));
    }
    problems
}

/// `snapfs info IMG`, `snapfs mount -f -r IMG MP` and `snapfs mount -f IMG MP` must all refuse
/// `img` (see [`refusal_problems`]) and leave its bytes as they were. Returns the problems, each
/// prefixed with `label`; the info message is appended as a note for the test's output.
pub fn refused(label: &str, img: &Path, needles: &[&str]) -> Vec<String> {
    let before = read_all(img);
    let mut problems = Vec::new();
    let info = run_measured(snapfs_cmd().arg("info").arg(img), COMMAND_LIMIT);
    problems.extend(refusal_problems("snapfs info", &info, needles));
    for args in [&["-r"][..], &[][..]] {
        let mp = tempfile::Builder::new()
            .prefix("snapfs-hostile-")
            .tempdir()
            .unwrap();
        let what = format!("snapfs mount -f {}", args.join(" "));
        let mut cmd = snapfs_cmd();
        cmd.arg("mount")
            .arg("-f")
            .args(args)
            .arg(img)
            .arg(mp.path());
        let m = run_measured(&mut cmd, Duration::from_secs(20));
        if m.status.is_none() && is_mounted(mp.path()) {
            problems.push(format!("{what}: mounted the image, want a refusal"));
        }
        problems.extend(refusal_problems(&what, &m, needles));
        if !force_unmount(mp.path()) {
            let _ = mp.keep();
        }
    }
    if read_all(img) != before {
        problems.push("the image file was modified".to_string());
    }
    eprintln!("[{label}] snapfs info: {}", info.stderr.trim_end());
    problems
        .into_iter()
        .map(|p| format!("[{label}] {p}"))
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Mounting a hostile image
// ---------------------------------------------------------------------------------------------

/// A foreground snapfs mount of a hostile image, watched: its memory is measured when it ends.
/// Dropping it unmounts and reaps the server whatever happened.
pub struct HostileMount {
    mp: PathBuf,
    dir: Option<tempfile::TempDir>,
    pid: i32,
    stderr: File,
    /// Peak RSS seen so far, KiB.
    peak: u64,
    ended: Option<(Option<ExitStatus>, u64)>,
}

/// How a mount ended.
#[derive(Debug)]
pub struct Ended {
    pub status: Option<ExitStatus>,
    pub stderr: String,
    pub max_rss_kib: u64,
}

impl HostileMount {
    /// `snapfs mount -f ARGS IMG MP`. Returns `Err` with how it ended when the server exits before
    /// the mount is ready (a refusal).
    pub fn start(img: &Path, args: &[&str]) -> Result<HostileMount, Measured> {
        require_env();
        let dir = tempfile::Builder::new()
            .prefix("snapfs-hostile-")
            .tempdir()
            .unwrap();
        let mp = dir.path().join("mnt");
        fs::create_dir(&mp).unwrap();
        let stderr = tempfile::tempfile().unwrap();
        let mut cmd = Command::new(snapfs_bin());
        limit_memory(&mut cmd);
        let child = cmd
            .arg("mount")
            .arg("-f")
            .args(args)
            .arg(img)
            .arg(&mp)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr.try_clone().unwrap())
            .spawn()
            .expect("start snapfs");
        let mut m = HostileMount {
            mp,
            dir: Some(dir),
            pid: child.id() as i32,
            stderr,
            peak: 0,
            ended: None,
        };
        let start = Instant::now();
        loop {
            if let Some(ended) = m.try_reap() {
                let stderr = read_back(m.stderr.try_clone().unwrap());
                return Err(Measured {
                    status: ended.0,
                    stdout: String::new(),
                    stderr,
                    max_rss_kib: ended.1,
                });
            }
            // Ready when live.raw is listed (not stat'ed: a stat of a damaged view may fail, and
            // that is for the test to report).
            let listed = || {
                fs::read_dir(&m.mp)
                    .map(|d| d.flatten().any(|e| e.file_name() == "live.raw"))
                    .unwrap_or(false)
            };
            if is_mounted(&m.mp) && listed() {
                return Ok(m);
            }
            if start.elapsed() > COMMAND_LIMIT {
                panic!(
                    "snapfs mount of {} not ready within {COMMAND_LIMIT:?}:\n{}",
                    img.display(),
                    m.stderr_text()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn try_reap(&mut self) -> Option<(Option<ExitStatus>, u64)> {
        if self.ended.is_none() {
            self.peak = self.peak.max(peak_rss_kib(self.pid));
            let mut status = 0;
            // SAFETY: waitpid on our own child with a valid out-pointer.
            let r = unsafe { libc::waitpid(self.pid, &mut status, libc::WNOHANG) };
            if r == self.pid {
                self.ended = Some((Some(ExitStatus::from_raw(status)), self.peak));
            }
        }
        self.ended
    }

    pub fn path(&self) -> &Path {
        &self.mp
    }

    pub fn live(&self) -> PathBuf {
        self.mp.join("live.raw")
    }

    pub fn snapshot(&self, name: &str) -> PathBuf {
        self.mp.join("snapshots").join(name)
    }

    pub fn stderr_text(&self) -> String {
        read_back(self.stderr.try_clone().unwrap())
    }

    /// Peak resident memory of the server so far (VmHWM), KiB.
    pub fn peak_rss_kib(&self) -> u64 {
        peak_rss_kib(self.pid).max(self.peak)
    }

    /// `pread` of `len` bytes at `offset` of `file` under the mount, in a thread: a read that does
    /// not return within 30 s kills the server (which makes the read fail) and panics.
    pub fn read(&self, file: &Path, offset: u64, len: usize) -> io::Result<Vec<u8>> {
        let (tx, rx) = mpsc::channel();
        let path = file.to_owned();
        std::thread::spawn(move || {
            let r = File::open(&path).and_then(|f| {
                let mut buf = vec![0u8; len];
                f.read_exact_at(&mut buf, offset).map(|_| buf)
            });
            let _ = tx.send(r);
        });
        match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(r) => r,
            Err(_) => {
                // SAFETY: our own child.
                unsafe { libc::kill(self.pid, libc::SIGKILL) };
                panic!(
                    "read of {len} bytes at {offset:#x} of {} hung (server killed)",
                    file.display()
                );
            }
        }
    }

    /// Unmounts and waits for the server; its peak memory and everything it logged.
    pub fn finish(mut self) -> Ended {
        self.cleanup();
        let (status, max_rss_kib) = self.ended.unwrap_or((None, 0));
        Ended {
            status,
            stderr: self.stderr_text(),
            max_rss_kib,
        }
    }

    fn cleanup(&mut self) {
        self.peak = self.peak_rss_kib();
        let unmounted = force_unmount(&self.mp);
        if self.ended.is_none() {
            let limit = if unmounted {
                Duration::from_secs(20)
            } else {
                Duration::ZERO
            };
            let (status, peak) = wait_measured(self.pid, limit);
            self.ended = Some((status, peak.max(self.peak)));
        }
        if !force_unmount(&self.mp)
            && let Some(dir) = self.dir.take()
        {
            // Never let the temp dir's cleanup walk into a live mount.
            let _ = dir.keep();
        }
    }
}

impl Drop for HostileMount {
    fn drop(&mut self) {
        if self.ended.is_none() || is_mounted(&self.mp) {
            self.cleanup();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Checking what a mount shows
// ---------------------------------------------------------------------------------------------

/// What one file of a mount should show: the oracle's bytes, except `bad` ranges whose reads must
/// fail with EIO.
pub struct Expect<'a> {
    /// Path of the file under the mount, relative to the mount point (`live.raw`,
    /// `snapshots/x.raw`).
    pub file: &'a str,
    /// The oracle: what `qemu-img convert` makes of the view (of the undamaged image, for the
    /// parts that must still read).
    pub oracle: &'a Path,
    /// Guest ranges `(offset, len)` that must fail with EIO.
    pub bad: &'a [(u64, u64)],
}

/// Reads every file of `expect` under `mount` in `chunk`-byte pieces: pieces inside a bad range
/// must fail with EIO, every other piece must equal the oracle. Returns the problems.
pub fn check_reads(mount: &HostileMount, expect: &[Expect<'_>], chunk: u64) -> Vec<String> {
    let mut problems = Vec::new();
    for e in expect {
        let file = mount.path().join(e.file);
        let oracle = File::open(e.oracle).unwrap();
        let size = oracle.metadata().unwrap().len();
        match fs::metadata(&file) {
            Ok(m) if m.len() == size => {}
            Ok(m) => problems.push(format!("{}: size {} want {size}", e.file, m.len())),
            Err(err) => {
                problems.push(format!("{}: stat fails: {err}", e.file));
                continue;
            }
        }
        let mut offset = 0;
        while offset < size {
            let len = chunk.min(size - offset);
            let in_bad = e
                .bad
                .iter()
                .any(|&(b, l)| offset < b + l && b < offset + len);
            let got = mount.read(&file, offset, len as usize);
            match (in_bad, got) {
                (true, Err(err)) if err.raw_os_error() == Some(libc::EIO) => {}
                (true, Err(err)) => problems.push(format!(
                    "{}: read at {offset:#x} fails with {err}, want EIO",
                    e.file
                )),
                (true, Ok(_)) => problems.push(format!(
                    "{}: read at {offset:#x} (damaged range) succeeds, want EIO",
                    e.file
                )),
                (false, Err(err)) => problems.push(format!(
                    "{}: read at {offset:#x} (undamaged) fails: {err}",
                    e.file
                )),
                (false, Ok(data)) => {
                    let mut want = vec![0u8; len as usize];
                    oracle.read_exact_at(&mut want, offset).unwrap();
                    if data != want {
                        let at = data.iter().zip(&want).position(|(a, b)| a != b).unwrap();
                        problems.push(format!(
                            "{}: byte {:#x} is {:#04x}, the oracle has {:#04x}",
                            e.file,
                            offset + at as u64,
                            data[at],
                            want[at]
                        ));
                    }
                }
            }
            offset += len;
        }
    }
    problems
}

/// Mounts `img` read-only and read-write in turn; on each mount the files of `expect` must read as
/// [`check_reads`] says, the log must give a reason for the failed reads (containing `reason`),
/// nothing may panic, memory must stay bounded, and the image's bytes must not change.
pub fn mounts_with_eio(
    label: &str,
    img: &Path,
    expect: &[Expect<'_>],
    chunk: u64,
    reason: &str,
) -> Vec<String> {
    let before = read_all(img);
    let mut problems = Vec::new();
    for args in [&["-r"][..], &[][..]] {
        let what = format!("[{label}] mount {}", args.join(" "));
        let mount = match HostileMount::start(img, args) {
            Ok(m) => m,
            Err(m) => {
                problems.push(format!(
                    "{what}: refused, want a mount: {}",
                    m.stderr.trim_end()
                ));
                continue;
            }
        };
        for p in check_reads(&mount, expect, chunk) {
            problems.push(format!("{what}: {p}"));
        }
        let ended = mount.finish();
        let any_bad = expect.iter().any(|e| !e.bad.is_empty());
        if any_bad && !ended.stderr.to_lowercase().contains(&reason.to_lowercase()) {
            problems.push(format!(
                "{what}: the log does not give the reason {reason:?} for the failed reads:\n{}",
                ended.stderr
            ));
        }
        if ended.stderr.contains("panicked") {
            problems.push(format!("{what}: panic:\n{}", ended.stderr));
        }
        if ended.max_rss_kib > MEMORY_LIMIT_KIB {
            problems.push(format!("{what}: peak memory {} KiB", ended.max_rss_kib));
        }
        if read_all(img) != before {
            problems.push(format!("{what}: the image file was modified"));
            break;
        }
    }
    problems
}

/// Fails the test with every problem found.
pub fn assert_no_problems(problems: &[String]) {
    assert!(
        problems.is_empty(),
        "problems:\n- {}",
        problems.join("\n- ")
    );
}
