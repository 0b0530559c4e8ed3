//! Concurrency stress (issue 8): for a bounded time (`SNAPFS_STRESS_SECS`, default 35 s), all at
//! once on one mount:
//!
//! - a writer doing random writes to `live.raw` (with an fsync now and then), mirrored into an
//!   in-memory model of the live disk;
//! - readers copying `live.raw` (each chunk compared with the model);
//! - readers copying snapshot files (each byte compared with the model of that snapshot, recorded
//!   from the live model at the moment its `create` returned);
//! - a thread running `control/create` and `control/delete` in a loop; a delete of a snapshot
//!   that a reader has open must be refused with EBUSY.
//!
//! The model is well defined because the test serialises (write + mirror) and (create + record)
//! with one lock; readers of live.raw hold the same lock shared while they read a chunk. Readers
//! of snapshots take no lock: snapshots never change.
//!
//! At the end: `snapshots/` lists exactly the model's snapshots, live.raw and every snapshot
//! equal their models, and after unmounting `qemu-img check` finds no corruption and no leak,
//! `qemu-img snapshot -l` lists the same snapshots and qemu-img reads the same content.
//!
//! A second test reuses one snapshot name (`daily`) many times: right after each `create`, the
//! file must open and hold the new content (no stale name or page from the deleted one).

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use crate::common::snapshot_support::{control, errno_name, status_text};
use crate::common::stress_support::*;
use crate::common::write_support::{
    Geometry, Progress, Rng, check_problems, mount_context, random_data, random_extent, seed_for,
    server_log, with_watchdog,
};
use crate::common::*;

/// Virtual size of the stressed disk.
const DISK: u64 = 24 * MIB;
/// Its cluster size (not the default, to vary the geometry across the suite).
const CLUSTER: u64 = 32 * KIB;
/// At most this many snapshots exist at a time (each model is a copy of the disk).
const MAX_SNAPSHOTS: usize = 8;
/// Readers of snapshot files and of live.raw.
const SNAP_READERS: usize = 3;
const LIVE_READERS: usize = 1;

#[derive(Default)]
struct Stats {
    writes: AtomicU64,
    write_bytes: AtomicU64,
    fsyncs: AtomicU64,
    live_copies: AtomicU64,
    live_bytes: AtomicU64,
    snap_copies: AtomicU64,
    snap_partial: AtomicU64,
    snap_bytes: AtomicU64,
    vanished: AtomicU64,
    creates: AtomicU64,
    deletes: AtomicU64,
    ebusy: AtomicU64,
}

fn get(a: &AtomicU64) -> u64 {
    a.load(Ordering::Relaxed)
}

fn add(a: &AtomicU64, n: u64) {
    a.fetch_add(n, Ordering::Relaxed);
}

struct SnapModel {
    data: Arc<Vec<u8>>,
    /// The create/delete thread is deleting it now (a reader may then see ENOENT).
    deleting: bool,
}

struct Shared {
    mp: PathBuf,
    /// The live disk. Held exclusively for (write + mirror) and (create + record), shared for a
    /// chunk read of live.raw.
    live: RwLock<Vec<u8>>,
    snaps: Mutex<BTreeMap<String, SnapModel>>,
    /// Snapshots deleted successfully, with the instant their delete command was issued.
    graveyard: Mutex<BTreeMap<String, Instant>>,
    stop: AtomicBool,
    failures: Mutex<Vec<String>>,
    stats: Stats,
}

impl Shared {
    fn fail(&self, msg: String) {
        eprintln!("stress failure: {msg}");
        let mut f = self.failures.lock().unwrap();
        if f.len() < 20 {
            f.push(msg);
        }
        self.stop.store(true, Ordering::SeqCst);
    }

    fn stopped(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    fn snap_path(&self, name: &str) -> PathBuf {
        self.mp.join("snapshots").join(format!("{name}.raw"))
    }
}

fn writer(sh: &Shared, seed: u64, progress: &Progress) {
    let mut rng = Rng::new(seed);
    let live = sh.mp.join("live.raw");
    let f = match OpenOptions::new().read(true).write(true).open(&live) {
        Ok(f) => f,
        Err(e) => return sh.fail(format!("writer: open live.raw: {e}")),
    };
    let mut g = Geometry::new(DISK, CLUSTER, None);
    g.max_len = 256 * KIB;
    let mut n = 0u64;
    while !sh.stopped() {
        let (off, len) = random_extent(&mut rng, &g);
        let data = random_data(&mut rng, len);
        {
            let mut model = sh.live.write().unwrap();
            if let Err(e) = f.write_all_at(&data, off) {
                drop(model);
                return sh.fail(format!(
                    "writer: write #{n} of {len} bytes at {off:#x} failed: {e}"
                ));
            }
            model[off as usize..(off + len) as usize].copy_from_slice(&data);
        }
        n += 1;
        add(&sh.stats.writes, 1);
        add(&sh.stats.write_bytes, len);
        progress.tick();
        if rng.chance(8) {
            if let Err(e) = f.sync_all() {
                return sh.fail(format!("writer: fsync after write #{n} failed: {e}"));
            }
            add(&sh.stats.fsyncs, 1);
        }
        // Leave the lock to the others now and then.
        if rng.chance(30) {
            std::thread::sleep(Duration::from_micros(rng.below(1500)));
        }
    }
}

fn live_reader(sh: &Shared, seed: u64, progress: &Progress) {
    let mut rng = Rng::new(seed);
    let live = sh.mp.join("live.raw");
    while !sh.stopped() {
        let f = match File::open(&live) {
            Ok(f) => f,
            Err(e) => return sh.fail(format!("live reader: open live.raw: {e}")),
        };
        let chunk = rng.range(64 * KIB, MIB + 1) as usize;
        let mut buf = vec![0u8; chunk];
        let mut off = 0u64;
        while off < DISK && !sh.stopped() {
            let n = chunk.min((DISK - off) as usize);
            let model = sh.live.read().unwrap();
            if let Err(e) = f.read_exact_at(&mut buf[..n], off) {
                drop(model);
                return sh.fail(format!(
                    "live reader: read {n} bytes at {off:#x} of live.raw: {e}"
                ));
            }
            let want = &model[off as usize..off as usize + n];
            if let Some(d) = crate::common::write_support::first_diff(&buf[..n], want, off) {
                drop(model);
                return sh.fail(format!(
                    "live reader: live.raw differs from the model (no write in flight): {d}"
                ));
            }
            drop(model);
            add(&sh.stats.live_bytes, n as u64);
            progress.tick();
            off += n as u64;
        }
        if off >= DISK {
            add(&sh.stats.live_copies, 1);
        }
    }
}

fn snap_reader(sh: &Shared, seed: u64, progress: &Progress) {
    let mut rng = Rng::new(seed);
    while !sh.stopped() {
        let picked = {
            let snaps = sh.snaps.lock().unwrap();
            let names: Vec<&String> = snaps
                .iter()
                .filter(|(_, s)| !s.deleting)
                .map(|(n, _)| n)
                .collect();
            if names.is_empty() {
                None
            } else {
                let name = names[rng.below(names.len() as u64) as usize].clone();
                let data = snaps[&name].data.clone();
                Some((name, data))
            }
        };
        let Some((name, want)) = picked else {
            std::thread::sleep(Duration::from_millis(5));
            continue;
        };
        let path = sh.snap_path(&name);
        let f = match File::open(&path) {
            Ok(f) => f,
            // ENOENT once the delete is done; EBUSY while the delete holds the file (a command
            // that changes or removes a file claims it, and opens of a claimed file are refused).
            Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT | libc::EBUSY)) => {
                let snaps = sh.snaps.lock().unwrap();
                match snaps.get(&name) {
                    None => {}
                    Some(s) if s.deleting => {}
                    Some(_) => {
                        drop(snaps);
                        return sh.fail(format!(
                            "snapshot reader: open {}: {e}, but the snapshot exists and \
                             nobody is deleting it",
                            path.display()
                        ));
                    }
                }
                add(&sh.stats.vanished, 1);
                continue;
            }
            Err(e) => {
                return sh.fail(format!("snapshot reader: open {}: {e}", path.display()));
            }
        };
        let opened = Instant::now();
        let size = match f.metadata() {
            Ok(m) => m.len(),
            Err(e) => return sh.fail(format!("snapshot reader: fstat {name}.raw: {e}")),
        };
        if size != want.len() as u64 {
            return sh.fail(format!(
                "snapshot reader: {name}.raw has st_size {size}, the model {}",
                want.len()
            ));
        }
        // Either a whole sequential copy (as cp does) or a few random preads.
        let whole = rng.chance(70);
        let mut ranges = Vec::new();
        if whole {
            let chunk = rng.range(4 * KIB, MIB + 1);
            let mut off = 0;
            while off < size {
                let n = chunk.min(size - off);
                ranges.push((off, n));
                off += n;
            }
        } else {
            for _ in 0..8 {
                let off = rng.below(size);
                let n = rng.range(1, 512 * KIB).min(size - off);
                ranges.push((off, n));
            }
        }
        let mut buf = Vec::new();
        for (off, n) in ranges {
            if sh.stopped() {
                break;
            }
            buf.resize(n as usize, 0);
            let r = f.read_exact_at(&mut buf, off);
            let deleted = sh.graveyard.lock().unwrap().get(&name).copied();
            if let Err(e) = r {
                return sh.fail(format!(
                    "snapshot reader: read {n} bytes at {off:#x} of {name}.raw (open since \
                     {:?}) failed: {e}; deleted meanwhile: {}",
                    opened.elapsed(),
                    deleted.is_some()
                ));
            }
            let w = &want[off as usize..(off + n) as usize];
            if let Some(d) = crate::common::write_support::first_diff(&buf, w, off) {
                return sh.fail(format!(
                    "snapshot reader: {name}.raw differs from its model (content at its create): \
                     {d}; deleted while open: {}",
                    deleted.is_some()
                ));
            }
            add(&sh.stats.snap_bytes, n);
            progress.tick();
        }
        // A delete issued after this open returned must have been refused (EBUSY).
        if let Some(issued) = sh.graveyard.lock().unwrap().get(&name).copied() {
            if issued > opened {
                return sh.fail(format!(
                    "delete of {name} succeeded although {name}.raw had been open since before \
                     the command was issued (EBUSY expected)"
                ));
            }
        }
        drop(f);
        if whole {
            add(&sh.stats.snap_copies, 1);
        } else {
            add(&sh.stats.snap_partial, 1);
        }
    }
}

fn snapshotter(sh: &Shared, seed: u64, progress: &Progress) {
    let mut rng = Rng::new(seed);
    let mut counter = 0u64;
    while !sh.stopped() {
        std::thread::sleep(Duration::from_millis(rng.range(5, 60)));
        let count = sh.snaps.lock().unwrap().len();
        let create = count < 2 || (count < MAX_SNAPSHOTS && rng.chance(55));
        if create {
            counter += 1;
            let name = format!("s{counter}");
            let text = if rng.chance(30) {
                format!("{name} stress snapshot number {counter}")
            } else {
                name.clone()
            };
            let model = sh.live.write().unwrap();
            match control(&sh.mp, "create", &text) {
                Ok(()) => {
                    let data = Arc::new(model.clone());
                    drop(model);
                    sh.snaps.lock().unwrap().insert(
                        name,
                        SnapModel {
                            data,
                            deleting: false,
                        },
                    );
                    add(&sh.stats.creates, 1);
                }
                Err(e) => {
                    drop(model);
                    return sh.fail(format!(
                        "create {name} failed: {}; status:\n{}",
                        errno_name(e),
                        status_text(&sh.mp)
                    ));
                }
            }
        } else {
            let name = {
                let mut snaps = sh.snaps.lock().unwrap();
                let names: Vec<String> = snaps.keys().cloned().collect();
                let name = names[rng.below(names.len() as u64) as usize].clone();
                snaps.get_mut(&name).unwrap().deleting = true;
                name
            };
            let issued = Instant::now();
            match control(&sh.mp, "delete", &name) {
                Ok(()) => {
                    sh.snaps.lock().unwrap().remove(&name);
                    sh.graveyard.lock().unwrap().insert(name, issued);
                    add(&sh.stats.deletes, 1);
                }
                Err(e) if e == libc::EBUSY => {
                    sh.snaps.lock().unwrap().get_mut(&name).unwrap().deleting = false;
                    add(&sh.stats.ebusy, 1);
                }
                Err(e) => {
                    return sh.fail(format!(
                        "delete {name} failed: {}; status:\n{}",
                        errno_name(e),
                        status_text(&sh.mp)
                    ));
                }
            }
        }
        progress.tick();
    }
}

/// Reads a whole file with a deadline-free plain read (the watchdog is off here; the final checks
/// run after the stress phase).
fn read_file(path: &Path) -> Result<Vec<u8>, String> {
    let mut f = File::open(path).map_err(|e| format!("open {}: {e}", path.display()))?;
    let mut v = Vec::new();
    f.read_to_end(&mut v)
        .map_err(|e| format!("read {}: {e}", path.display()))?;
    Ok(v)
}

#[test]
fn stress_readers_writer_and_snapshot_commands_at_once() {
    let secs = stress_secs(35);
    let seed = seed_for("stress_readers_writer_and_snapshot_commands_at_once");
    let dir = workdir();
    let image = dir.path().join("stress.qcow2");
    create_qcow2(&image, DISK, &format!("cluster_size={CLUSTER}"), None);
    // Some data and a snapshot made by qemu-img before the mount, so the model starts non-trivial.
    qemu_io(
        &image,
        &[
            "write -P 0x11 0 1M",
            "write -P 0x22 5M 3M",
            "write -z 6M 512k",
            "write -P 0x33 20M 96k",
        ],
    );
    snapshot_create(&image, "pre");
    qemu_io(&image, &["write -P 0x44 512k 1M", "write -P 0x55 23M 1M"]);
    let pre = read_all(&convert_snapshot_to_raw(
        &image,
        &snapshot_by_name(&image, "pre").id,
    ));
    let live0 = read_all(&convert_to_raw(&image, None));
    assert_eq!(live0.len() as u64, DISK);

    let mut m = Mount::new(&image);
    let mp = m.path().to_path_buf();
    let mut snaps = BTreeMap::new();
    snaps.insert(
        "pre".to_string(),
        SnapModel {
            data: Arc::new(pre),
            deleting: false,
        },
    );
    let sh = Shared {
        mp: mp.clone(),
        live: RwLock::new(live0),
        snaps: Mutex::new(snaps),
        graveyard: Mutex::new(BTreeMap::new()),
        stop: AtomicBool::new(false),
        failures: Mutex::new(Vec::new()),
        stats: Stats::default(),
    };
    let started = Instant::now();
    let context = mount_context(&mp);
    with_watchdog(
        &mp,
        Duration::from_secs(60),
        Duration::from_secs(secs + 120),
        "stress phase",
        &context,
        |progress| {
            std::thread::scope(|s| {
                let sh = &sh;
                s.spawn(move || writer(sh, seed ^ 1, progress));
                for i in 0..LIVE_READERS {
                    s.spawn(move || live_reader(sh, seed ^ (0x100 + i as u64), progress));
                }
                for i in 0..SNAP_READERS {
                    s.spawn(move || snap_reader(sh, seed ^ (0x200 + i as u64), progress));
                }
                s.spawn(move || snapshotter(sh, seed ^ 3, progress));
                let end = Instant::now() + Duration::from_secs(secs);
                while Instant::now() < end && !sh.stopped() {
                    std::thread::sleep(Duration::from_millis(100));
                }
                sh.stop.store(true, Ordering::SeqCst);
            });
        },
    );
    let elapsed = started.elapsed();
    let st = &sh.stats;
    let summary = format!(
        "stress summary: {:.1} s; writes {} ({} MiB, {} fsyncs); live.raw copies {} ({} MiB \
         verified); snapshot copies {} whole + {} partial ({} MiB verified); creates {}, \
         deletes {}, EBUSY {}, opens of a snapshot being deleted {}; failures {}",
        elapsed.as_secs_f64(),
        get(&st.writes),
        get(&st.write_bytes) / MIB,
        get(&st.fsyncs),
        get(&st.live_copies),
        get(&st.live_bytes) / MIB,
        get(&st.snap_copies),
        get(&st.snap_partial),
        get(&st.snap_bytes) / MIB,
        get(&st.creates),
        get(&st.deletes),
        get(&st.ebusy),
        get(&st.vanished),
        sh.failures.lock().unwrap().len()
    );
    eprintln!("{summary}");
    let failures = sh.failures.lock().unwrap().clone();
    assert!(
        failures.is_empty(),
        "{} failure(s) during the stress phase:\n- {}\n{summary}\n{}",
        failures.len(),
        failures.join("\n- "),
        server_log(m.stderr_text())
    );
    // Each class of activity must actually have happened.
    assert!(get(&st.writes) > 50, "too few writes: {summary}");
    assert!(get(&st.creates) >= 3, "too few creates: {summary}");
    assert!(get(&st.deletes) >= 1, "no delete succeeded: {summary}");
    assert!(
        get(&st.snap_copies) >= 3,
        "too few snapshot copies: {summary}"
    );
    assert!(
        get(&st.live_copies) >= 1,
        "no whole live.raw copy: {summary}"
    );

    // Final state through the mount.
    let live_model = sh.live.into_inner().unwrap();
    let snaps = sh.snaps.into_inner().unwrap();
    let mut problems = Vec::new();
    let listed: BTreeSet<String> = fs::read_dir(mp.join("snapshots"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    let want: BTreeSet<String> = snaps.keys().map(|n| format!("{n}.raw")).collect();
    if listed != want {
        problems.push(format!(
            "snapshots/ lists {listed:?}, the model has {want:?}"
        ));
    }
    match read_file(&mp.join("live.raw")) {
        Ok(got) => {
            if let Some(d) = crate::common::write_support::first_diff(&got, &live_model, 0) {
                problems.push(format!("live.raw at the end differs from the model: {d}"));
            }
        }
        Err(e) => problems.push(e),
    }
    let mut verified = DISK;
    for (name, s) in &snaps {
        match read_file(&sh.mp.join("snapshots").join(format!("{name}.raw"))) {
            Ok(got) => {
                verified += got.len() as u64;
                if let Some(d) = crate::common::write_support::first_diff(&got, &s.data, 0) {
                    problems.push(format!("{name}.raw at the end differs from its model: {d}"));
                }
            }
            Err(e) => problems.push(e),
        }
    }
    let (out, status) = m.snapfs_umount();
    if out.status.is_none_or(|s| !s.success()) || status.is_none_or(|s| !s.success()) {
        problems.push(format!(
            "snapfs umount: {:?} {}; server exit {status:?}",
            out.status, out.stderr
        ));
    }
    let log = m.stderr_text();
    drop(m);
    if log.contains("panicked") {
        problems.push(format!("the server panicked:\n{log}"));
    }
    if !problems.is_empty() {
        panic!(
            "{} problem(s) after the stress phase:\n- {}\n{summary}",
            problems.len(),
            problems.join("\n- ")
        );
    }

    // After unmounting: qemu-img agrees.
    if let Some(p) = check_problems(&image, false) {
        panic!("after the stress run: {p}\n{summary}");
    }
    let tags: BTreeSet<String> = snapshots(&image).into_iter().map(|s| s.name).collect();
    let names: BTreeSet<String> = snaps.keys().cloned().collect();
    assert_eq!(
        tags, names,
        "qemu-img snapshot -l differs from the model after the stress run"
    );
    let model_raw = dir.path().join("live-model.raw");
    fs::write(&model_raw, &live_model).unwrap();
    if let Err(e) = crate::common::write_support::qemu_compare(&image, &model_raw) {
        panic!("qemu-img reads another live disk than the model: {e}");
    }
    for (name, s) in &snaps {
        let id = snapshot_by_name(&image, name).id;
        let got = read_all(&convert_snapshot_to_raw(&image, &id));
        if let Some(d) = crate::common::write_support::first_diff(&got, &s.data, 0) {
            panic!("qemu-img reads snapshot {name} differently from the model: {d}");
        }
        verified += got.len() as u64;
    }
    eprintln!(
        "stress final: {} snapshots survive, {} MiB verified at the end (mount and qemu-img); \
         qemu-img check clean",
        snaps.len(),
        verified / MIB
    );
}

/// One name, deleted and created again and again (a nightly `daily` snapshot): each time, right
/// after `create` returns, `snapshots/daily.raw` opens, has a new inode and holds the new content;
/// while it is open, `delete` is refused with EBUSY.
#[test]
fn stress_reused_snapshot_name_shows_the_new_snapshot_at_once() {
    let dir = workdir();
    let image = dir.path().join("reuse.qcow2");
    create_qcow2(&image, 8 * MIB, "", None);
    let m = Mount::new(&image);
    let mp = m.path().to_path_buf();
    let context = mount_context(&mp);
    let rounds = 40u64;
    with_watchdog(
        &mp,
        Duration::from_secs(30),
        Duration::from_secs(120),
        "name reuse",
        &context,
        |progress| {
            let live = OpenOptions::new()
                .read(true)
                .write(true)
                .open(mp.join("live.raw"))
                .unwrap();
            let path = mp.join("snapshots").join("daily.raw");
            let mut inodes = BTreeSet::new();
            for i in 0..rounds {
                let pat = vec![(i as u8).wrapping_mul(7).wrapping_add(1); 64 * KIB as usize];
                live.write_all_at(&pat, 0).unwrap();
                live.write_all_at(&pat, 3 * MIB + 4096).unwrap();
                live.sync_all().unwrap();
                if i > 0 {
                    // Look the old one up and read it (fills the name, attribute and page caches).
                    let old =
                        fs::read(&path).unwrap_or_else(|e| panic!("round {i}: read old: {e}"));
                    assert_ne!(old[..4096], pat[..4096]);
                    // Open: delete refused.
                    let held = File::open(&path).unwrap();
                    match control(&mp, "delete", "daily") {
                        Err(e) if e == libc::EBUSY => {}
                        other => panic!(
                            "round {i}: delete daily while open gave {other:?}, EBUSY expected; \
                             status:\n{}",
                            status_text(&mp)
                        ),
                    }
                    drop(held);
                    if let Err(e) = control(&mp, "delete", "daily") {
                        panic!(
                            "round {i}: delete daily after close: {}; status:\n{}",
                            errno_name(e),
                            status_text(&mp)
                        );
                    }
                }
                if let Err(e) = control(&mp, "create", "daily") {
                    panic!(
                        "round {i}: create daily: {}; status:\n{}",
                        errno_name(e),
                        status_text(&mp)
                    );
                }
                let f = File::open(&path).unwrap_or_else(|e| {
                    panic!(
                        "round {i}: snapshots/daily.raw does not open right after create: {e} \
                         (listed: {:?})",
                        fs::read_dir(mp.join("snapshots"))
                            .map(|d| d.map(|e| e.unwrap().file_name()).collect::<Vec<_>>())
                            .ok()
                    )
                });
                let ino = f.metadata().unwrap().ino();
                assert!(
                    inodes.insert(ino),
                    "round {i}: the new daily.raw has inode {ino}, used by an earlier daily"
                );
                let mut got = vec![0u8; 64 * KIB as usize];
                f.read_exact_at(&mut got, 0).unwrap();
                if let Some(d) = crate::common::write_support::first_diff(&got, &pat, 0) {
                    panic!("round {i}: daily.raw right after create is not the new content: {d}");
                }
                f.read_exact_at(&mut got, 3 * MIB + 4096).unwrap();
                if let Some(d) =
                    crate::common::write_support::first_diff(&got, &pat, 3 * MIB + 4096)
                {
                    panic!("round {i}: daily.raw right after create is not the new content: {d}");
                }
                // And through a path lookup (stat) too.
                let st = fs::metadata(&path).unwrap();
                assert_eq!(
                    st.ino(),
                    ino,
                    "round {i}: stat of snapshots/daily.raw gives another inode than open"
                );
                progress.tick();
            }
        },
    );
    drop(m);
    if let Some(p) = check_problems(&image, false) {
        panic!("after {rounds} delete+create rounds: {p}");
    }
    let tags: Vec<String> = snapshots(&image).into_iter().map(|s| s.name).collect();
    assert_eq!(tags, vec!["daily".to_string()]);
}
