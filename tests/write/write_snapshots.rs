//! Writing the live disk never changes an internal snapshot: an image with qemu-img-created
//! snapshots (and data written by qemu-io between them) gets random writes through `live.raw`;
//! every snapshot, read through the mount during and after the writes and converted by
//! `qemu-img convert -l snapshot.name=X` after unmounting, still equals what qemu-img gave
//! before the writes. The live disk equals a mirror of the writes, and `qemu-img check` finds no
//! corruption and no leak (copy-on-write of clusters and L2 tables shared with snapshots).

use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::common::write_support::*;
use crate::common::*;

const IO_LIMIT: Duration = Duration::from_secs(150);
const STALL: Duration = Duration::from_secs(30);
const ROUNDS: u64 = 3;
const WRITES_PER_ROUND: u64 = 150;

/// Compares each snapshot file of the mount with its oracle.
fn snapshot_problems(m: &Mount, oracles: &[(String, PathBuf)], when: &str) -> Vec<String> {
    let mut problems = Vec::new();
    for (tag, oracle) in oracles {
        if let Err(e) = compare_uncached(&m.snapshot(&format!("{tag}.raw")), oracle) {
            problems.push(format!(
                "{when}: snapshots/{tag}.raw differs from its oracle: {e}"
            ));
        }
    }
    problems
}

/// `tags` must already exist in `img`. Random writes in rounds, snapshots checked after each.
fn exercise(test: &str, img: &Path, g: Geometry, tags: &[&str]) {
    let before: Vec<(String, PathBuf)> = tags
        .iter()
        .map(|t| (t.to_string(), convert_to_raw(img, Some(t))))
        .collect();
    let n_snapshots = snapshots(img).len();
    let mirror = Mirror::of_image(img);
    let mut rng = Rng::new(seed_for(test));
    let t = Instant::now();
    let mut total = SeqStats::default();
    {
        let m = Mount::new(img);
        let mp = m.path().to_path_buf();
        let log = || server_log(m.stderr_text());
        let problems = with_deadline(&mp, IO_LIMIT, &format!("{test}: check"), &log, || {
            snapshot_problems(&m, &before, "before any write")
        });
        assert!(problems.is_empty(), "{}\n{}", problems.join("\n"), log());
        for round in 0..ROUNDS {
            let what = format!("{test}: writes, round {round}");
            let st = with_watchdog(&mp, STALL, IO_LIMIT, &what, &log, |progress| {
                let live = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(m.live())
                    .expect("open live.raw for writing");
                let st = random_writes(
                    &live,
                    &mirror,
                    &mut rng,
                    &g,
                    WRITES_PER_ROUND,
                    16 * MIB,
                    Some(progress),
                );
                if round == ROUNDS - 1 {
                    live.sync_all().expect("fsync live.raw");
                }
                st
            });
            total.writes += st.writes;
            total.bytes += st.bytes;
            total.fsyncs += st.fsyncs;
            total.readbacks += st.readbacks;
            let what = format!("{test}: compare after round {round}");
            let problems = with_deadline(&mp, IO_LIMIT, &what, &log, || {
                let mut p = snapshot_problems(&m, &before, &format!("after round {round}"));
                if round == ROUNDS - 1 {
                    if let Err(e) = compare_uncached(&m.live(), &mirror.path) {
                        p.push(format!("live.raw vs mirror: {e}"));
                    }
                }
                p
            });
            assert!(
                problems.is_empty(),
                "{test}:\n- {}\n{}",
                problems.join("\n- "),
                log()
            );
        }
    }
    eprintln!("{test}: {total:?} in {:?}", t.elapsed());
    let mut problems = Vec::new();
    for (tag, oracle) in &before {
        let after = convert_to_raw(img, Some(tag));
        if let Err(e) = compare_files(&after, oracle) {
            problems.push(format!(
                "qemu-img convert -l snapshot.name={tag} after the writes differs from before: {e}"
            ));
        }
    }
    if snapshots(img).len() != n_snapshots {
        problems.push(format!(
            "qemu-img lists {} snapshots after the writes, {n_snapshots} before",
            snapshots(img).len()
        ));
    }
    if let Err(e) = qemu_compare(img, &mirror.path) {
        problems.push(e);
    }
    if let Some(p) = check_problems(img, false) {
        problems.push(p);
    }
    assert!(
        problems.is_empty(),
        "{test}: after unmount:\n- {}",
        problems.join("\n- ")
    );
}

/// Three snapshots with data written by qemu-io before, between and after them (the standard
/// pattern: data, zero clusters, cluster edges, subclusters with extended L2), plus a larger
/// area rewritten in every generation so that many clusters are shared with several snapshots.
fn three_snapshots(dir: &Path, size: u64, cs: u64, opts: &str, sub: Option<u64>) -> PathBuf {
    let img = dir.join("snap.qcow2");
    create_qcow2(&img, size, opts, None);
    let tags = ["s1", "s2", "s3"];
    crate::common::images::fill(&img, cs, size, 1, sub);
    qemu_io_s(&img, &[format!("write -P 0x41 {} {}", 2 * MIB, 4 * MIB)]);
    for (i, tag) in tags.iter().enumerate() {
        snapshot_create(&img, tag);
        let generation = 2 + i as u64;
        crate::common::images::fill(&img, cs, size, generation, sub);
        qemu_io_s(
            &img,
            &[format!(
                "write -P 0x{:02x} {} {}",
                0x50 + generation,
                2 * MIB + generation * 512 * KIB,
                MIB + 512
            )],
        );
    }
    img
}

fn case(test: &str, cs: u64, opts: &str, sub: Option<u64>) {
    let dir = workdir();
    let size = 32 * MIB;
    let img = three_snapshots(dir.path(), size, cs, opts, sub);
    exercise(
        test,
        &img,
        Geometry::new(size, cs, sub),
        &["s1", "s2", "s3"],
    );
}

#[test]
fn snapshots_refcount16_64k() {
    case(
        "snapshots_refcount16_64k",
        64 * KIB,
        "cluster_size=65536,refcount_bits=16",
        None,
    );
}

#[test]
fn snapshots_refcount64_64k() {
    case(
        "snapshots_refcount64_64k",
        64 * KIB,
        "cluster_size=65536,refcount_bits=64",
        None,
    );
}

#[test]
fn snapshots_extended_l2_64k() {
    case(
        "snapshots_extended_l2_64k",
        64 * KIB,
        "cluster_size=65536,extended_l2=on",
        Some(2 * KIB),
    );
}

/// Small clusters: many L2 tables shared with the snapshots, each copied on first write.
#[test]
fn snapshots_refcount16_4k() {
    case(
        "snapshots_refcount16_4k",
        4 * KIB,
        "cluster_size=4096,refcount_bits=16",
        None,
    );
}

/// Compressed clusters shared with a snapshot (`images::compressed`: convert -c, snapshot
/// `packed`, then partial overwrites, zero clusters and qemu-io compressed writes on top).
#[test]
fn snapshots_compressed_zlib() {
    let dir = workdir();
    let (img, _) = crate::common::images::compressed(dir.path(), "zlib", 64 * KIB);
    let size = virtual_size(&img);
    exercise(
        "snapshots_compressed_zlib",
        &img,
        Geometry::new(size, 64 * KIB, None),
        &["packed"],
    );
}
