//! Crash safety: a writer doing random writes followed by fsync runs against `live.raw`
//! when the snapfs server is killed with SIGKILL at a random moment. Afterwards `qemu-img check`
//! must find no corruption (leaked clusters are allowed) and every write whose fsync returned
//! must be in the image (read with `qemu-img convert`). Bytes that a write without a completed
//! fsync touched may hold either content and are not compared. Each iteration continues on the
//! image the previous kill left behind.

mod common;

use std::fs::{self, OpenOptions};
use std::path::Path;
use std::time::{Duration, Instant};

use common::write_support::*;
use common::*;

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

#[derive(Debug, Default)]
struct Totals {
    iterations: u64,
    kills: u64,
    synced_writes: u64,
    synced_bytes: u64,
    bytes_verified: u64,
    bytes_skipped: u64,
    max_leaks: u64,
}

/// `iterations` rounds of: mount, writer, kill -9 after a random delay, detach the dead mount,
/// check (leaks allowed), compare the image with the expected content.
fn crash_loop(
    test: &str,
    img: &Path,
    g: Geometry,
    iterations: u64,
    sync_every: usize,
    snaps: &[(String, Vec<u8>)],
) {
    let mut rng = Rng::new(seed_for(test));
    let mut baseline = fs::read(convert_to_raw(img, None)).unwrap();
    let mut t = Totals::default();
    for it in 0..iterations {
        let mut server = Server::start(img, &[]);
        let live = server.live();
        let delay = Duration::from_millis(rng.range(50, 500));
        let wrng = Rng::new(rng.next_u64());
        let base = std::mem::take(&mut baseline);
        let h = std::thread::spawn(move || writer(&live, base, wrng, g, sync_every));
        std::thread::sleep(delay);
        let log_before_kill = server.stderr_text();
        server.kill9();
        t.kills += 1;
        // The connection is aborted: the writer's calls in flight fail; wait for it to stop.
        let r = h.join().expect("writer thread panicked");
        server.detach();
        drop(server);
        t.iterations += 1;
        t.synced_writes += r.synced_writes;
        t.synced_bytes += r.synced_bytes;

        let c = qemu_check(img);
        if c.corruptions() > 0 || c.check_errors() > 0 {
            panic!(
                "{test}: iteration {it}: kill -9 after {delay:?} ({} fsynced writes; writer stopped by: {}) \
                 left a corrupt image:\n{}\n{}\nsnapfs stderr before the kill:\n{log_before_kill}",
                r.synced_writes,
                r.stopped_by,
                c.stdout,
                qemu_check_text(img)
            );
        }
        t.max_leaks = t.max_leaks.max(c.leaks());

        let actual = fs::read(convert_to_raw(img, None)).unwrap();
        assert_eq!(
            actual.len(),
            r.expected.len(),
            "{test}: iteration {it}: disk size changed"
        );
        let skip = merge_ranges(r.unsynced.clone());
        let whole: Ranges = vec![(0, actual.len() as u64)];
        let verify = ranges_minus(&whole, &skip);
        let mut problems = Vec::new();
        for &(s, e) in &verify {
            let (s, e) = (s as usize, e as usize);
            if let Some(d) = first_diff(&actual[s..e], &r.expected[s..e], s as u64) {
                problems.push(d);
            }
            t.bytes_verified += (e - s) as u64;
        }
        t.bytes_skipped += ranges_total(&skip);
        assert!(
            problems.is_empty(),
            "{test}: iteration {it}: kill -9 after {delay:?}: fsynced data missing from the image \
             ({} fsynced writes; unsynced ranges {skip:x?}; writer stopped by: {}):\n- {}",
            r.synced_writes,
            r.stopped_by,
            problems.join("\n- ")
        );
        for (tag, want) in snaps {
            let got = fs::read(convert_to_raw(img, Some(tag))).unwrap();
            if let Some(d) = first_diff(&got, want, 0) {
                panic!("{test}: iteration {it}: snapshot {tag} changed: {d}");
            }
        }
        eprintln!(
            "{test}: iteration {it}: killed after {delay:?}: {} fsynced writes ({} bytes), leaks {}, \
             writer stopped by: {}",
            r.synced_writes,
            r.synced_bytes,
            c.leaks(),
            r.stopped_by
        );
        baseline = actual;
    }
    // A clean mount and unmount of the crashed image works and adds no corruption.
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
    eprintln!("{test}: {t:?}");
    assert!(
        t.synced_writes > 0,
        "{test}: no write completed in any iteration"
    );
}

/// 4 KiB clusters (many L2 tables and refcount updates), 32 MiB, 8 kill points.
#[test]
fn kill9_cluster4k() {
    let dir = workdir();
    let size = 32 * MIB;
    let img = dir.path().join("crash.qcow2");
    create_qcow2(&img, size, "cluster_size=4096", None);
    common::images::fill(&img, 4 * KIB, size, 1, None);
    crash_loop(
        "kill9_cluster4k",
        &img,
        Geometry::new(size, 4 * KIB, None),
        8,
        1,
        &[],
    );
}

/// 64 KiB clusters with an internal snapshot (copy-on-write of shared clusters and L2 tables at
/// the moment of the kill); the snapshot must survive unchanged. 6 kill points.
#[test]
fn kill9_with_snapshot_64k() {
    let dir = workdir();
    let size = 32 * MIB;
    let img = dir.path().join("crash.qcow2");
    create_qcow2(&img, size, "cluster_size=65536", None);
    common::images::fill(&img, 64 * KIB, size, 1, None);
    qemu_io_s(&img, &[format!("write -P 0x33 {} {}", 4 * MIB, 8 * MIB)]);
    snapshot_create(&img, "before");
    common::images::fill(&img, 64 * KIB, size, 2, None);
    let snap = fs::read(convert_to_raw(&img, Some("before"))).unwrap();
    crash_loop(
        "kill9_with_snapshot_64k",
        &img,
        Geometry::new(size, 64 * KIB, None),
        6,
        1,
        &[("before".to_string(), snap)],
    );
}

/// Extended L2 (subcluster allocation bitmaps updated in place), 6 kill points; an fsync after
/// every 4th write, so that more allocating writes are in flight when the server dies.
#[test]
fn kill9_extended_l2() {
    let dir = workdir();
    let size = 32 * MIB;
    let img = dir.path().join("crash.qcow2");
    create_qcow2(&img, size, "cluster_size=65536,extended_l2=on", None);
    common::images::fill(&img, 64 * KIB, size, 1, Some(2 * KIB));
    crash_loop(
        "kill9_extended_l2",
        &img,
        Geometry::new(size, 64 * KIB, Some(2 * KIB)),
        6,
        4,
        &[],
    );
}
