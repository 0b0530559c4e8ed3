//! Crash safety: a writer doing random writes followed by fsync runs against `live.raw`
//! when the snapfs server is killed with SIGKILL at a random moment (the loop, the kill and the
//! `qemu-img check` are the shared harness, `tests/common/crash.rs`). Afterwards `qemu-img check`
//! must find no corruption (leaked clusters are allowed) and every write whose fsync returned
//! must be in the image (read with `qemu-img convert`). Bytes that a write without a completed
//! fsync touched may hold either content and are not compared. Each iteration continues on the
//! image the previous kill left behind.

use std::fs::{self, OpenOptions};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::common::crash::{CrashOptions, CrashWorkload, Kill, crash_loop};
use crate::common::write_support::*;
use crate::common::*;

/// What the writer thread hands back.
struct WriterResult {
    /// The disk as it must be: the baseline plus every write whose fsync returned.
    expected: Vec<u8>,
    /// Ranges touched by writes whose fsync did not return (may or may not be in the image).
    unsynced: Vec<(u64, u64)>,
    synced_writes: u64,
    synced_bytes: u64,
    /// How the writer stopped (the first failed call).
    stopped_by: String,
}

/// Random writes with an fsync after every `sync_every` writes, until a call fails.
fn writer(
    live: &Path,
    mut expected: Vec<u8>,
    mut rng: Rng,
    g: Geometry,
    sync_every: usize,
    stop: &AtomicBool,
) -> WriterResult {
    let mut r = WriterResult {
        expected: Vec::new(),
        unsynced: Vec::new(),
        synced_writes: 0,
        synced_bytes: 0,
        stopped_by: String::new(),
    };
    let f = match OpenOptions::new().read(true).write(true).open(live) {
        Ok(f) => f,
        Err(e) => {
            r.stopped_by = format!("open: {e}");
            r.expected = expected;
            return r;
        }
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    // writes since the last completed fsync: their ranges are uncertain until the next one
    let mut pending: Vec<(u64, Vec<u8>)> = Vec::new();
    loop {
        let (off, len) = random_extent(&mut rng, &g);
        let data = random_data(&mut rng, len);
        if let Err(e) = pwrite_all(&f, &data, off) {
            r.unsynced.push((off, off + len));
            r.stopped_by = format!("write {len} bytes at {off:#x}: {e}");
            break;
        }
        pending.push((off, data));
        if pending.len() < sync_every {
            continue;
        }
        if let Err(e) = f.sync_all() {
            r.stopped_by = format!("fsync after a write of {len} bytes at {off:#x}: {e}");
            break;
        }
        for (off, data) in pending.drain(..) {
            expected[off as usize..off as usize + data.len()].copy_from_slice(&data);
            r.synced_writes += 1;
            r.synced_bytes += data.len() as u64;
        }
        if stop.load(Ordering::SeqCst) {
            r.stopped_by = "told to stop after the kill".into();
            break;
        }
        if Instant::now() > deadline {
            r.stopped_by = "writer time limit (the server was never killed?)".into();
            break;
        }
    }
    r.unsynced
        .extend(pending.iter().map(|(o, d)| (*o, o + d.len() as u64)));
    r.expected = expected;
    r
}

/// The write workload of [`crash_loop`]: one image, remounted after every kill; the writer starts
/// from the content the previous kill left.
struct Writes {
    img: PathBuf,
    g: Geometry,
    sync_every: usize,
    /// Internal snapshots that must survive every kill unchanged, with their content.
    snaps: Vec<(String, Vec<u8>)>,
    /// The disk as the last check found it (the next writer's starting point).
    baseline: Vec<u8>,
    synced_writes: u64,
    synced_bytes: u64,
    bytes_skipped: u64,
}

impl CrashWorkload for Writes {
    type Outcome = WriterResult;

    fn image(&mut self, _it: u64) -> PathBuf {
        self.img.clone()
    }

    fn kill_delay(&mut self, _it: u64, rng: &mut Rng) -> Duration {
        Duration::from_millis(rng.range(50, 500))
    }

    fn start(
        &mut self,
        _it: u64,
        mp: &Path,
        seed: u64,
        stop: Arc<AtomicBool>,
    ) -> Box<dyn FnOnce() -> WriterResult + Send> {
        let live = mp.join("live.raw");
        let base = std::mem::take(&mut self.baseline);
        let (g, sync_every) = (self.g, self.sync_every);
        Box::new(move || writer(&live, base, Rng::new(seed), g, sync_every, &stop))
    }

    /// Every byte outside the ranges of unsynced writes must be as the fsynced writes left it;
    /// the snapshots must not have changed.
    fn verify(&mut self, img: &Path, kill: &Kill, r: WriterResult) -> Result<u64, String> {
        self.synced_writes += r.synced_writes;
        self.synced_bytes += r.synced_bytes;
        let actual = fs::read(convert_to_raw(img, None)).map_err(|e| e.to_string())?;
        if actual.len() != r.expected.len() {
            return Err(format!(
                "disk size changed: {} bytes, expected {}",
                actual.len(),
                r.expected.len()
            ));
        }
        let skip = merge_ranges(r.unsynced.clone());
        let whole: Ranges = vec![(0, actual.len() as u64)];
        let mut verified = 0;
        let mut problems = Vec::new();
        for &(s, e) in &ranges_minus(&whole, &skip) {
            let (s, e) = (s as usize, e as usize);
            if let Some(d) = first_diff(&actual[s..e], &r.expected[s..e], s as u64) {
                problems.push(d);
            }
            verified += (e - s) as u64;
        }
        self.bytes_skipped += ranges_total(&skip);
        if !problems.is_empty() {
            return Err(format!(
                "fsynced data missing from the image ({} fsynced writes; unsynced ranges \
                 {skip:x?}; writer stopped by: {}):\n- {}\nsnapfs stderr before the kill:\n{}",
                r.synced_writes,
                r.stopped_by,
                problems.join("\n- "),
                kill.stderr_before
            ));
        }
        for (tag, want) in &self.snaps {
            let got = fs::read(convert_to_raw(img, Some(tag))).map_err(|e| e.to_string())?;
            if let Some(d) = first_diff(&got, want, 0) {
                return Err(format!("snapshot {tag} changed: {d}"));
            }
            verified += want.len() as u64;
        }
        eprintln!(
            "{}: {} fsynced writes ({} bytes), writer stopped by: {}",
            kill.context(),
            r.synced_writes,
            r.synced_bytes,
            r.stopped_by
        );
        self.baseline = actual;
        Ok(verified)
    }

    fn summary(&self) -> String {
        format!(
            "{} fsynced writes ({} bytes), {} bytes of unsynced writes not compared",
            self.synced_writes, self.synced_bytes, self.bytes_skipped
        )
    }
}

/// `iterations` kills of a random writer (see [`Writes`]), then a clean mount, write and unmount
/// of the crashed image, which must add no corruption.
fn crash_test(
    test: &str,
    img: &Path,
    g: Geometry,
    iterations: u64,
    sync_every: usize,
    snaps: Vec<(String, Vec<u8>)>,
) {
    let mut w = Writes {
        img: img.to_path_buf(),
        g,
        sync_every,
        snaps,
        baseline: fs::read(convert_to_raw(img, None)).unwrap(),
        synced_writes: 0,
        synced_bytes: 0,
        bytes_skipped: 0,
    };
    let opts = CrashOptions {
        iterations,
        budget: Duration::from_secs(60),
        min_kills: iterations,
        ..Default::default()
    };
    crash_loop(test, &opts, &mut w);
    {
        let m = Mount::new(img);
        let f = OpenOptions::new().write(true).open(m.live()).unwrap();
        pwrite_all(&f, &[0x42u8; 4096], 0).unwrap();
        f.sync_all().unwrap();
    }
    let c = qemu_check(img);
    assert!(
        c.corruptions() == 0 && c.check_errors() == 0,
        "{test}: after a clean remount: {}\n{}",
        c.stdout,
        qemu_check_text(img)
    );
    assert!(
        w.synced_writes > 0,
        "{test}: no write completed in any iteration"
    );
}

/// 4 KiB clusters (many L2 tables and refcount updates), 32 MiB, 16 kills.
#[test]
fn kill9_cluster4k() {
    let dir = workdir();
    let size = 32 * MIB;
    let img = dir.path().join("crash.qcow2");
    create_qcow2(&img, size, "cluster_size=4096", None);
    crate::common::images::fill(&img, 4 * KIB, size, 1, None);
    crash_test(
        "kill9_cluster4k",
        &img,
        Geometry::new(size, 4 * KIB, None),
        16,
        1,
        Vec::new(),
    );
}

/// 64 KiB clusters with an internal snapshot (copy-on-write of shared clusters and L2 tables at
/// the moment of the kill); the snapshot must survive unchanged. 12 kills.
#[test]
fn kill9_with_snapshot_64k() {
    let dir = workdir();
    let size = 32 * MIB;
    let img = dir.path().join("crash.qcow2");
    create_qcow2(&img, size, "cluster_size=65536", None);
    crate::common::images::fill(&img, 64 * KIB, size, 1, None);
    qemu_io_s(&img, &[format!("write -P 0x33 {} {}", 4 * MIB, 8 * MIB)]);
    snapshot_create(&img, "before");
    crate::common::images::fill(&img, 64 * KIB, size, 2, None);
    let snap = fs::read(convert_to_raw(&img, Some("before"))).unwrap();
    crash_test(
        "kill9_with_snapshot_64k",
        &img,
        Geometry::new(size, 64 * KIB, None),
        12,
        1,
        vec![("before".to_string(), snap)],
    );
}

/// Extended L2 (subcluster allocation bitmaps updated in place), 12 kills; an fsync after
/// every 4th write, so that more allocating writes are in flight when the server dies.
#[test]
fn kill9_extended_l2() {
    let dir = workdir();
    let size = 32 * MIB;
    let img = dir.path().join("crash.qcow2");
    create_qcow2(&img, size, "cluster_size=65536,extended_l2=on", None);
    crate::common::images::fill(&img, 64 * KIB, size, 1, Some(2 * KIB));
    crash_test(
        "kill9_extended_l2",
        &img,
        Geometry::new(size, 64 * KIB, Some(2 * KIB)),
        12,
        4,
        Vec::new(),
    );
}
