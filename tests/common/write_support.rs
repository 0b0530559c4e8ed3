//! Helpers for the write-path tests (`tests/write_*.rs`): a seeded RNG, random write extents at
//! cluster and subcluster edges, a raw mirror file, `qemu-img check --output=json` and
//! `qemu-img compare`, time limits that kill a hung server, guards for loop devices and kernel
//! mounts, and a snapfs server process that a test may `kill -9`.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use super::{
    KIB, MIB, convert_to_raw, force_unmount, is_mounted, run_status, run_timeout, snapfs_bin,
};

// ---------------------------------------------------------------------------------------------
// Random numbers
// ---------------------------------------------------------------------------------------------

/// A small seeded generator (SplitMix64): reproducible sequences without extra dependencies.
#[derive(Debug, Clone)]
pub struct Rng {
    state: u64,
}

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng { state: seed }
    }

    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (0 when `n == 0`).
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 { 0 } else { self.next_u64() % n }
    }

    /// Uniform in `lo..hi` (`lo` when the range is empty).
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi.saturating_sub(lo))
    }

    /// True with probability `percent`/100.
    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }

    pub fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len() as u64) as usize]
    }

    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let v = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

/// The seed for a test: `SNAPFS_TEST_SEED` (decimal or 0x-hex) if set, else a hash of the test's
/// name, so that every run is reproducible. Printed, so that a failure can be replayed.
pub fn seed_for(test: &str) -> u64 {
    let seed = match std::env::var("SNAPFS_TEST_SEED") {
        Ok(s) if !s.trim().is_empty() => {
            let s = s.trim();
            s.strip_prefix("0x")
                .map(|h| u64::from_str_radix(h, 16))
                .unwrap_or_else(|| s.parse())
                .unwrap_or_else(|e| panic!("SNAPFS_TEST_SEED={s:?}: {e}"))
        }
        _ => test.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
        }),
    };
    eprintln!("{test}: seed {seed:#x} (SNAPFS_TEST_SEED={seed:#x} replays it)");
    seed
}

// ---------------------------------------------------------------------------------------------
// Random writes
// ---------------------------------------------------------------------------------------------

/// What the random writes need to know about the disk.
#[derive(Debug, Clone, Copy)]
pub struct Geometry {
    /// Virtual disk size.
    pub size: u64,
    /// Cluster size of the top image.
    pub cluster: u64,
    /// Subcluster size (extended L2), if any.
    pub sub: Option<u64>,
    /// Largest single write.
    pub max_len: u64,
}

impl Geometry {
    pub fn new(size: u64, cluster: u64, sub: Option<u64>) -> Geometry {
        Geometry {
            size,
            cluster,
            sub,
            max_len: (3 * cluster + 4 * KIB).clamp(256 * KIB, 5 * MIB),
        }
    }
}

/// A random byte extent `(offset, len)` inside the disk, biased to cluster and subcluster edges:
/// offsets k*unit + {0, ±1, ±511, ±512, random}, lengths 1, 511, 512, 513, unit-1, unit, unit+1,
/// several units, or random.
pub fn random_extent(rng: &mut Rng, g: &Geometry) -> (u64, u64) {
    let cs = g.cluster;
    let sub = g.sub.unwrap_or(cs);
    let unit = rng.pick(&[cs, cs, sub, 512, 4 * KIB]);
    let k = rng.below(g.size / unit);
    let base = k * unit;
    let delta: i64 = rng.pick(&[0, 0, 1, -1, 511, -511, 512, -512, 4096, i64::MAX]);
    let off = if delta == i64::MAX {
        base + rng.below(unit)
    } else {
        base.saturating_add_signed(delta)
    };
    let off = off.min(g.size - 1);
    // With large clusters, most writes stay small (else a few writes use up the budget).
    let classes = if cs > 256 * KIB && rng.chance(60) {
        4
    } else {
        14
    };
    let len = match rng.below(classes) {
        0 if classes == 4 => rng.range(1, 128 * KIB),
        0 => 1,
        1 => 511,
        2 => 512,
        3 => 513,
        4 => cs - 1,
        5 => cs,
        6 => cs + 1,
        7 => 2 * cs,
        8 => 3 * cs + 17,
        9 => sub,
        10 => sub + 1,
        11 => 3 * sub - 1,
        _ => rng.range(1, 2 * cs.max(64 * KIB)),
    };
    let len = len.min(g.max_len).min(g.size - off).max(1);
    (off, len)
}

/// Data for one write: random bytes, a constant byte, all zeros (written as data, not a
/// discard), or random bytes with a zero run in the middle.
pub fn random_data(rng: &mut Rng, len: u64) -> Vec<u8> {
    let mut v = vec![0u8; len as usize];
    match rng.below(8) {
        0 => {
            let b = (rng.next_u64() as u8) | 1;
            v.fill(b);
        }
        1 => {}
        2 => {
            rng.fill(&mut v);
            let s = rng.below(len) as usize;
            let e = (s + rng.below(len) as usize).min(v.len());
            v[s..e].fill(0);
        }
        _ => rng.fill(&mut v),
    }
    v
}

/// `pwrite` of the whole buffer (retrying short writes); the error of the first failed call.
pub fn pwrite_all(f: &File, data: &[u8], off: u64) -> io::Result<()> {
    f.write_all_at(data, off)
}

/// `pread` of exactly `len` bytes.
pub fn pread_exact(f: &File, off: u64, len: usize) -> io::Result<Vec<u8>> {
    let mut v = vec![0u8; len];
    f.read_exact_at(&mut v, off)?;
    Ok(v)
}

/// `fallocate(2)` on an open file.
pub fn fallocate(f: &File, mode: i32, off: u64, len: u64) -> io::Result<()> {
    let r = unsafe { libc::fallocate(f.as_raw_fd(), mode, off as libc::off_t, len as libc::off_t) };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Drops the kernel's cached pages of `[off, off+len)` of an open file (`len` 0: to the end),
/// so that the next read of a FUSE file goes to the server instead of the page cache.
pub fn drop_cache_fd(f: &File, off: u64, len: u64) {
    let r = unsafe {
        libc::posix_fadvise(
            f.as_raw_fd(),
            off as libc::off_t,
            len as libc::off_t,
            libc::POSIX_FADV_DONTNEED,
        )
    };
    assert_eq!(r, 0, "posix_fadvise(DONTNEED) failed: errno {r}");
}

/// [`drop_cache_fd`] of a whole file by path.
pub fn drop_cache(path: &Path) {
    let f = File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    drop_cache_fd(&f, 0, 0);
}

/// [`super::compare_files`] after dropping the cached pages of `mounted`, so that its content
/// comes from the snapfs server, not from the page cache filled by earlier reads and writes.
pub fn compare_uncached(mounted: &Path, oracle: &Path) -> Result<(), String> {
    drop_cache(mounted);
    super::compare_files(mounted, oracle)
}

/// A plain raw file that receives the same changes as the disk under test.
pub struct Mirror {
    pub path: PathBuf,
    file: File,
}

impl Mirror {
    /// `qemu-img convert -O raw` of the image's current content.
    pub fn of_image(image: &Path) -> Mirror {
        Self::open(convert_to_raw(image, None))
    }

    pub fn open(path: PathBuf) -> Mirror {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap_or_else(|e| panic!("open mirror {}: {e}", path.display()));
        Mirror { path, file }
    }

    pub fn write(&self, off: u64, data: &[u8]) {
        self.file.write_all_at(data, off).expect("write mirror");
    }

    pub fn zero(&self, off: u64, len: u64) {
        let mut pos = off;
        let zeros = vec![0u8; MIB as usize];
        while pos < off + len {
            let n = (off + len - pos).min(MIB);
            self.write(pos, &zeros[..n as usize]);
            pos += n;
        }
    }

    pub fn read(&self, off: u64, len: usize) -> Vec<u8> {
        pread_exact(&self.file, off, len).expect("read mirror")
    }

    pub fn len(&self) -> u64 {
        self.file.metadata().unwrap().len()
    }

    pub fn set_len(&self, len: u64) {
        self.file.set_len(len).unwrap();
    }
}

/// Describes the first difference between two buffers that should be equal.
pub fn first_diff(got: &[u8], want: &[u8], base: u64) -> Option<String> {
    if got == want {
        return None;
    }
    if got.len() != want.len() {
        return Some(format!("length {} instead of {}", got.len(), want.len()));
    }
    let i = (0..got.len()).find(|&i| got[i] != want[i]).unwrap();
    let j = (0..got.len()).rev().find(|&i| got[i] != want[i]).unwrap();
    let s = i.saturating_sub(4);
    let e = (i + 8).min(got.len());
    Some(format!(
        "first difference at {:#x} (got {:02x?}, expected {:02x?} from {:#x}), last at {:#x}",
        base + i as u64,
        &got[s..e],
        &want[s..e],
        base + s as u64,
        base + j as u64
    ))
}

/// Outcome of a random write sequence.
#[derive(Debug, Default, Clone, Copy)]
pub struct SeqStats {
    pub writes: u64,
    pub bytes: u64,
    pub fsyncs: u64,
    pub readbacks: u64,
}

/// `n` random writes (at most `budget` bytes in all) to `live` and the mirror; every so often an
/// fsync, and a read-back of a just-written extent compared with the mirror. Panics on the first
/// failed call or differing read-back, naming the write.
pub fn random_writes(
    live: &File,
    mirror: &Mirror,
    rng: &mut Rng,
    g: &Geometry,
    n: u64,
    budget: u64,
    progress: Option<&Progress>,
) -> SeqStats {
    let mut st = SeqStats::default();
    for i in 0..n {
        if st.bytes >= budget {
            break;
        }
        let (off, len) = random_extent(rng, g);
        let data = random_data(rng, len);
        if let Err(e) = pwrite_all(live, &data, off) {
            panic!("write #{i} of {len} bytes at {off:#x} failed: {e}");
        }
        mirror.write(off, &data);
        if let Some(p) = progress {
            p.tick();
        }
        st.writes += 1;
        st.bytes += len;
        if rng.chance(5) {
            live.sync_all()
                .unwrap_or_else(|e| panic!("fsync after write #{i} failed: {e}"));
            st.fsyncs += 1;
        }
        if rng.chance(10) {
            // read back a window around the write (neighbours must be intact too)
            let s = off.saturating_sub(g.cluster.min(64 * KIB));
            let e = (off + len + g.cluster.min(64 * KIB)).min(g.size);
            drop_cache_fd(live, s, e - s);
            let got = pread_exact(live, s, (e - s) as usize)
                .unwrap_or_else(|e| panic!("read-back after write #{i} failed: {e}"));
            let want = mirror.read(s, (e - s) as usize);
            if let Some(d) = first_diff(&got, &want, s) {
                panic!(
                    "after write #{i} ({len} bytes at {off:#x}) live.raw differs from the mirror: {d}"
                );
            }
            st.readbacks += 1;
        }
    }
    st
}

// ---------------------------------------------------------------------------------------------
// qemu-img check / compare
// ---------------------------------------------------------------------------------------------

/// `qemu-img check --output=json` of an image.
#[derive(Debug, Clone)]
pub struct Check {
    pub exit: Option<i32>,
    pub json: serde_json::Value,
    pub stdout: String,
    pub stderr: String,
}

impl Check {
    /// A counter of the report (keys whose value is 0 are omitted by qemu-img).
    pub fn count(&self, key: &str) -> u64 {
        self.json[key].as_u64().unwrap_or(0)
    }
    pub fn corruptions(&self) -> u64 {
        self.count("corruptions")
    }
    pub fn leaks(&self) -> u64 {
        self.count("leaks")
    }
    pub fn check_errors(&self) -> u64 {
        self.count("check-errors")
    }
}

/// Runs `qemu-img check -U --output=json IMAGE`. Panics if no JSON comes back.
pub fn qemu_check(image: &Path) -> Check {
    let out = run_status(
        Command::new("qemu-img")
            .args(["check", "-U", "--output=json"])
            .arg(image),
    );
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let json = serde_json::from_str(&stdout).unwrap_or_else(|e| {
        panic!(
            "qemu-img check --output=json {} gave no JSON ({e}), exit {:?}\nstdout: {stdout}\nstderr: {stderr}",
            image.display(),
            out.status.code()
        )
    });
    Check {
        exit: out.status.code(),
        json,
        stdout,
        stderr,
    }
}

/// The human-readable `qemu-img check` report (lists each bad cluster), for failure messages.
pub fn qemu_check_text(image: &Path) -> String {
    let out = run_status(Command::new("qemu-img").args(["check", "-U"]).arg(image));
    let mut s = String::from_utf8_lossy(&out.stdout).into_owned();
    s.push_str(&String::from_utf8_lossy(&out.stderr));
    let lines: Vec<&str> = s.lines().collect();
    if lines.len() > 40 {
        format!(
            "{}\n... ({} more lines) ...\n{}",
            lines[..30].join("\n"),
            lines.len() - 36,
            lines[lines.len() - 6..].join("\n")
        )
    } else {
        s
    }
}

/// `None` when the image is clean (no corruptions, no check errors, and no leaks unless
/// `allow_leaks`), else a description with qemu-img's own report.
pub fn check_problems(image: &Path, allow_leaks: bool) -> Option<String> {
    let c = qemu_check(image);
    let bad = c.corruptions() > 0 || c.check_errors() > 0 || (!allow_leaks && c.leaks() > 0);
    let exit_ok = match c.exit {
        Some(0) => true,
        Some(3) => allow_leaks,
        _ => false,
    };
    if !bad && exit_ok {
        return None;
    }
    Some(format!(
        "qemu-img check {}: exit {:?}, corruptions {}, leaks {}, check-errors {}\nJSON: {}\nreport:\n{}",
        image.display(),
        c.exit,
        c.corruptions(),
        c.leaks(),
        c.check_errors(),
        c.stdout.trim(),
        qemu_check_text(image)
    ))
}

/// Panics unless `qemu-img check` finds the image clean (see [`check_problems`]).
pub fn assert_check_clean(image: &Path, allow_leaks: bool) {
    if let Some(p) = check_problems(image, allow_leaks) {
        panic!("{p}");
    }
}

/// `qemu-img compare -U -f qcow2 -F raw IMAGE RAW`: `Ok` when identical.
pub fn qemu_compare(image: &Path, raw: &Path) -> Result<(), String> {
    let out = run_status(
        Command::new("qemu-img")
            .args(["compare", "-U", "-f", "qcow2", "-F", "raw"])
            .arg(image)
            .arg(raw),
    );
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "qemu-img compare {} {} exited {:?}: {}{}",
            image.display(),
            raw.display(),
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

// ---------------------------------------------------------------------------------------------
// Processes serving a mount point; time limits
// ---------------------------------------------------------------------------------------------

fn cmdline_of(pid: i32) -> Vec<String> {
    fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| {
            b.split(|&c| c == 0)
                .filter(|s| !s.is_empty())
                .map(|s| String::from_utf8_lossy(s).into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// The snapfs processes whose command line names the mount point `mp`.
pub fn server_pids(mp: &Path) -> Vec<i32> {
    let me = std::process::id() as i32;
    let want = mp.to_string_lossy().into_owned();
    let bin = snapfs_bin().to_string_lossy().into_owned();
    let mut out = Vec::new();
    if let Ok(rd) = fs::read_dir("/proc") {
        for e in rd.flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            if pid == me {
                continue;
            }
            let args = cmdline_of(pid);
            let is_snapfs = args
                .first()
                .is_some_and(|a| *a == bin || a.ends_with("/snapfs") || a == "snapfs");
            if is_snapfs && args.contains(&want) {
                out.push(pid);
            }
        }
    }
    out
}

/// The threads' stacks of a process (gdb, if installed), snapfs frames only; for hang reports.
pub fn stacks(pid: i32) -> String {
    let mut c = Command::new("gdb");
    c.args([
        "-batch",
        "-p",
        &pid.to_string(),
        "-ex",
        "thread apply all bt 30",
    ]);
    let out = run_timeout(&mut c, Duration::from_secs(60));
    let frames: Vec<&str> = out
        .stdout
        .lines()
        .filter(|l| {
            l.starts_with("Thread ")
                || (l.starts_with('#')
                    && l.split(" in ")
                        .nth(1)
                        .is_some_and(|f| f.starts_with("snapfs::")))
        })
        .map(|l| l.char_indices().nth(200).map_or(l, |(i, _)| &l[..i]))
        .collect();
    if frames.is_empty() {
        "(no stacks: gdb missing or failed)".to_string()
    } else {
        frames.join("\n")
    }
}

/// Progress of a long I/O run, for [`with_watchdog`]: bump it after every completed call.
#[derive(Debug, Default)]
pub struct Progress(AtomicU64);

impl Progress {
    pub fn tick(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Runs `f` (which does I/O on the mount at `mp`) under a watchdog: when `f` runs longer than
/// `total`, or makes no [`Progress`] for `stall`, the server's stacks are captured, the server
/// is killed (so the blocked I/O fails with ENOTCONN) and the test panics, saying what hung.
pub fn with_watchdog<T: Send>(
    mp: &Path,
    stall: Duration,
    total: Duration,
    what: &str,
    context: &dyn Fn() -> String,
    f: impl FnOnce(&Progress) -> T + Send,
) -> T {
    let progress = Progress::default();
    std::thread::scope(|s| {
        let p = &progress;
        let h = s.spawn(move || f(p));
        let start = Instant::now();
        let mut last = (progress.get(), Instant::now());
        while !h.is_finished() {
            let now = progress.get();
            if now != last.0 {
                last = (now, Instant::now());
            }
            let why = if start.elapsed() > total {
                Some(format!("still running after {total:?}"))
            } else if last.1.elapsed() > stall {
                Some(format!(
                    "no progress for {stall:?} (after {now} completed calls)"
                ))
            } else {
                None
            };
            if let Some(why) = why {
                let pids = server_pids(mp);
                let st: Vec<String> = pids.iter().map(|&p| stacks(p)).collect();
                for &p in &pids {
                    unsafe {
                        libc::kill(p, libc::SIGKILL);
                    }
                }
                let _ = h.join();
                panic!(
                    "{what}: {why}: snapfs hung (killed server {pids:?}); its stacks:\n{}\n{}",
                    st.join("\n"),
                    context()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        match h.join() {
            Ok(v) => v,
            Err(p) => {
                let msg = p
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                panic!("{what}: {msg}\n{}", context())
            }
        }
    })
}

/// [`with_watchdog`] without progress tracking: `f` must finish within `limit`.
pub fn with_deadline<T: Send>(
    mp: &Path,
    limit: Duration,
    what: &str,
    context: &dyn Fn() -> String,
    f: impl FnOnce() -> T + Send,
) -> T {
    with_watchdog(mp, limit, limit, what, context, |_| f())
}

/// Runs fio with `args` under a deadline of `limit` (the mount is torn down if it hangs) and
/// fails the test, with fio's output and the server's log, unless fio succeeds.
pub fn run_fio(m: &super::Mount, args: &[String], what: &str, limit: Duration) {
    let out = with_deadline(
        m.path(),
        limit,
        what,
        &|| server_log(m.stderr_text()),
        || run_timeout(Command::new("fio").args(args), limit),
    );
    assert!(
        out.status.is_some_and(|s| s.success()),
        "{what} failed ({:?}):\n{}\n{}\n{}",
        out.status,
        out.stdout,
        out.stderr,
        server_log(m.stderr_text())
    );
}

/// What a failure message says about a mount: the server's stderr.
pub fn server_log(stderr: String) -> String {
    if stderr.trim().is_empty() {
        "(snapfs printed nothing on stderr)".to_string()
    } else {
        format!("snapfs stderr:\n{}", stderr.trim_end())
    }
}

/// What a watchdog names when the mount at `mp` hangs.
pub fn mount_context(mp: &Path) -> impl Fn() -> String + use<> {
    let mp = mp.to_path_buf();
    move || format!("mount {}", mp.display())
}

/// Unmounts `m` with `snapfs umount` and waits for its server: an unmount or a server exit that
/// fails, or a panic of the server, is one of the `problems`. Returns the server's stderr.
pub fn umount_noting_problems(m: &mut super::Mount, problems: &mut Vec<String>) -> String {
    let (out, status) = m.snapfs_umount();
    let log = m.stderr_text();
    if out.status.is_none_or(|s| !s.success()) || status.is_none_or(|s| !s.success()) {
        problems.push(format!(
            "unmount: {:?} {}; server exit {status:?}",
            out.status, out.stderr
        ));
    }
    if log.contains("panicked") {
        problems.push("the server panicked".into());
    }
    log
}

/// Panics listing the `problems` a test collected, with the server's stderr (`log`), unless
/// there are none.
pub fn assert_no_problems(problems: &[String], log: String) {
    assert!(
        problems.is_empty(),
        "{} problem(s):\n- {}\n{}",
        problems.len(),
        problems.join("\n- "),
        server_log(log)
    );
}

// ---------------------------------------------------------------------------------------------
// Loop devices, kernel mounts
// ---------------------------------------------------------------------------------------------

/// A loop device over a file; detached on drop.
pub struct LoopDev {
    pub dev: PathBuf,
}

impl LoopDev {
    pub fn attach(file: &Path) -> LoopDev {
        let out = run_timeout(
            Command::new("losetup").args(["-f", "--show"]).arg(file),
            Duration::from_secs(60),
        );
        assert!(
            out.status.is_some_and(|s| s.success()),
            "losetup -f --show {} failed: {}",
            file.display(),
            out.stderr
        );
        LoopDev {
            dev: PathBuf::from(out.stdout.trim()),
        }
    }

    pub fn path(&self) -> &Path {
        &self.dev
    }

    /// Detaches (`losetup -d`); true when done.
    pub fn detach(&mut self) -> bool {
        if self.dev.as_os_str().is_empty() {
            return true;
        }
        for _ in 0..50 {
            let out = run_timeout(
                Command::new("losetup").arg("-d").arg(&self.dev),
                Duration::from_secs(30),
            );
            if out.status.is_some_and(|s| s.success()) {
                self.dev = PathBuf::new();
                return true;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        eprintln!("could not detach {}", self.dev.display());
        false
    }
}

impl Drop for LoopDev {
    fn drop(&mut self) {
        self.detach();
    }
}

/// A kernel mount of a block device on a fresh directory; unmounted on drop.
pub struct KernelMount {
    dir: Option<tempfile::TempDir>,
    mp: PathBuf,
}

impl KernelMount {
    pub fn mount(dev: &Path, opts: &[&str]) -> KernelMount {
        let dir = tempfile::Builder::new()
            .prefix("snapfs-kmnt-")
            .tempdir()
            .unwrap();
        let mp = dir.path().to_path_buf();
        let out = run_timeout(
            Command::new("mount").args(opts).arg(dev).arg(&mp),
            Duration::from_secs(60),
        );
        assert!(
            out.status.is_some_and(|s| s.success()),
            "mount {} {}: {}",
            dev.display(),
            mp.display(),
            out.stderr
        );
        KernelMount { dir: Some(dir), mp }
    }

    pub fn path(&self) -> &Path {
        &self.mp
    }

    /// Unmounts; true when done.
    pub fn unmount(&mut self) -> bool {
        let ok = force_unmount(&self.mp);
        if ok {
            if let Some(d) = self.dir.take() {
                let _ = d.close();
            }
        }
        ok
    }
}

impl Drop for KernelMount {
    fn drop(&mut self) {
        if self.dir.is_some() {
            self.unmount();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// A snapfs server the test controls (for kill -9)
// ---------------------------------------------------------------------------------------------

/// `snapfs mount -f ARGS IMAGE MP` as a child the test may kill. On drop: if the server is still
/// alive it is unmounted cleanly (`umount`), else the dead mount is detached (`umount -l`); the
/// child is always reaped.
pub struct Server {
    child: Option<Child>,
    mp: PathBuf,
    dir: PathBuf,
    stderr_path: PathBuf,
}

impl Server {
    pub fn start(image: &Path, args: &[&str]) -> Server {
        let dir = tempfile::Builder::new()
            .prefix("snapfs-srv-")
            .tempdir()
            .unwrap()
            .keep()
            .canonicalize()
            .unwrap();
        let mp = dir.join("mnt");
        fs::create_dir(&mp).unwrap();
        let stderr_path = dir.join("stderr.log");
        let child = Command::new(snapfs_bin())
            .env_remove("RUST_LOG")
            .arg("mount")
            .arg("-f")
            .args(args)
            .arg(image)
            .arg(&mp)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(&stderr_path).unwrap())
            .spawn()
            .expect("start snapfs");
        let mut s = Server {
            child: Some(child),
            mp,
            dir,
            stderr_path,
        };
        let t = Instant::now();
        loop {
            if let Some(st) = s.child.as_mut().unwrap().try_wait().unwrap() {
                panic!(
                    "snapfs mount -f {} exited before the mount was ready ({st}): {}",
                    image.display(),
                    s.stderr_text()
                );
            }
            if is_mounted(&s.mp) && s.mp.join("live.raw").exists() {
                break;
            }
            assert!(
                t.elapsed() < Duration::from_secs(20),
                "mount of {} not ready after 20 s: {}",
                image.display(),
                s.stderr_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        s
    }

    pub fn path(&self) -> &Path {
        &self.mp
    }

    pub fn live(&self) -> PathBuf {
        self.mp.join("live.raw")
    }

    pub fn pid(&self) -> Option<i32> {
        self.child.as_ref().map(|c| c.id() as i32)
    }

    pub fn stderr_text(&self) -> String {
        fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    /// SIGKILL the server and reap it; the mount stays (dead) until [`Server::detach`].
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// `umount -l` of the (dead) mount.
    pub fn detach(&self) {
        if is_mounted(&self.mp) {
            let _ = run_timeout(
                Command::new("umount").arg("-l").arg(&self.mp),
                Duration::from_secs(20),
            );
        }
    }

    /// Clean unmount of a live server; waits for it to exit; returns its exit status.
    pub fn unmount(&mut self) -> Option<std::process::ExitStatus> {
        force_unmount(&self.mp);
        let mut c = self.child.take()?;
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(30) {
            if let Ok(Some(s)) = c.try_wait() {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = c.kill();
        let _ = c.wait();
        None
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if self.child.is_some() {
            self.unmount();
        }
        self.detach();
        force_unmount(&self.mp);
        if !is_mounted(&self.mp) {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Commands
// ---------------------------------------------------------------------------------------------

/// Runs `cmd` with a time limit and panics (with its output) unless it exits 0 in time.
pub fn run_ok(cmd: &mut Command, limit: Duration) -> super::TimedOutput {
    let what = format!(
        "{} {}",
        cmd.get_program().to_string_lossy(),
        cmd.get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(" ")
    );
    let out = run_timeout(cmd, limit);
    match out.status {
        Some(s) if s.success() => out,
        Some(s) => panic!(
            "{what} exited {s}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            out.stdout, out.stderr
        ),
        None => panic!(
            "{what} did not finish within {limit:?} (killed)\n--- stdout ---\n{}\n--- stderr ---\n{}",
            out.stdout, out.stderr
        ),
    }
}

/// The entries of `qemu-img map --output=json` (whole chain).
pub fn qemu_map(image: &Path) -> Vec<serde_json::Value> {
    let out = super::qemu_img(&["map", "-U", "--output=json", image.to_str().unwrap()]);
    let v: serde_json::Value = serde_json::from_str(&out).expect("qemu-img map JSON");
    v.as_array().expect("map is an array").clone()
}
