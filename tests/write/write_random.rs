//! Random writes through `live.raw`, mirrored into a plain raw file: afterwards `live.raw` (read
//! through the mount) equals the mirror, and after unmounting `qemu-img compare` finds the image
//! identical to the mirror and `qemu-img check` finds no corruption and no leak. One test per
//! image variety (format version, cluster size, refcount width, extended L2, compression,
//! backing files), and one that grows the image past many L2 tables and refcount blocks.

use std::fs::{self, OpenOptions};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::common::write_support::*;
use crate::common::*;

/// Per-test time limit for the I/O against the mount.
const IO_LIMIT: Duration = Duration::from_secs(150);
/// Longest time one write may take before the server counts as hung.
const STALL: Duration = Duration::from_secs(30);

struct Plan {
    /// Number of random writes.
    writes: u64,
    /// Byte budget of the random writes.
    budget: u64,
}

const PLAN: Plan = Plan {
    writes: 400,
    budget: 40 * MIB,
};

/// Mounts `img`, runs the random writes mirrored into `mirror`, checks live.raw against the
/// mirror (and each `(snapshot file, oracle)` against its oracle), unmounts, then checks the
/// image with qemu-img compare and qemu-img check.
fn exercise(test: &str, img: &Path, g: Geometry, plan: Plan, snaps: &[(String, PathBuf)]) {
    let mirror = Mirror::of_image(img);
    let mut rng = Rng::new(seed_for(test));
    let t = Instant::now();
    let stats;
    {
        let m = Mount::new(img);
        let mp = m.path().to_path_buf();
        let what = format!("{test}: random writes");
        let log = || server_log(m.stderr_text());
        stats = with_watchdog(&mp, STALL, IO_LIMIT, &what, &log, |progress| {
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
                plan.writes,
                plan.budget,
                Some(progress),
            );
            live.sync_all().expect("final fsync of live.raw");
            drop(live);
            st
        });
        let mut problems = Vec::new();
        with_deadline(&mp, IO_LIMIT, &format!("{test}: compare"), &log, || {
            if let Err(e) = compare_uncached(&m.live(), &mirror.path) {
                problems.push(format!("live.raw vs mirror: {e}"));
            }
            for (name, oracle) in snaps {
                if let Err(e) = compare_uncached(&m.snapshot(name), oracle) {
                    problems.push(format!("snapshots/{name} changed by the writes: {e}"));
                }
            }
        });
        if !problems.is_empty() {
            panic!(
                "{test}: after {stats:?}:\n- {}\nsnapfs stderr:\n{}",
                problems.join("\n- "),
                m.stderr_text()
            );
        }
    }
    eprintln!("{test}: {stats:?} in {:?}", t.elapsed());
    let mut problems = Vec::new();
    if let Err(e) = qemu_compare(img, &mirror.path) {
        problems.push(e);
    }
    if let Some(p) = check_problems(img, false) {
        problems.push(p);
    }
    assert!(
        problems.is_empty(),
        "{test}: after unmount ({stats:?}):\n- {}",
        problems.join("\n- ")
    );
}

/// A fresh image with `opts`, holding the standard pattern (data, zero clusters, subcluster
/// writes), so that the random writes land on every kind of cluster.
fn fresh(dir: &Path, size: u64, cs: u64, opts: &str, sub: Option<u64>) -> PathBuf {
    let img = dir.join("disk.qcow2");
    create_qcow2(&img, size, opts, None);
    crate::common::images::fill(&img, cs, size, 1, sub);
    img
}

fn simple_case(test: &str, size: u64, cs: u64, opts: &str, sub: Option<u64>) {
    let dir = workdir();
    let img = fresh(dir.path(), size, cs, opts, sub);
    exercise(test, &img, Geometry::new(size, cs, sub), PLAN, &[]);
}

#[test]
fn v2_compat010_64k() {
    simple_case(
        "v2_compat010_64k",
        32 * MIB,
        64 * KIB,
        "compat=0.10,cluster_size=65536",
        None,
    );
}

#[test]
fn v3_cluster512() {
    simple_case("v3_cluster512", 16 * MIB, 512, "cluster_size=512", None);
}

#[test]
fn v3_64k_refcount16() {
    simple_case(
        "v3_64k_refcount16",
        32 * MIB,
        64 * KIB,
        "cluster_size=65536,refcount_bits=16",
        None,
    );
}

#[test]
fn v3_cluster2m() {
    simple_case(
        "v3_cluster2m",
        64 * MIB,
        2 * MIB,
        "cluster_size=2097152",
        None,
    );
}

#[test]
fn refcount_bits1() {
    simple_case(
        "refcount_bits1",
        32 * MIB,
        4 * KIB,
        "cluster_size=4096,refcount_bits=1",
        None,
    );
}

#[test]
fn refcount_bits64() {
    simple_case(
        "refcount_bits64",
        32 * MIB,
        4 * KIB,
        "cluster_size=4096,refcount_bits=64",
        None,
    );
}

#[test]
fn extended_l2_64k() {
    simple_case(
        "extended_l2_64k",
        32 * MIB,
        64 * KIB,
        "extended_l2=on,cluster_size=65536",
        Some(2 * KIB),
    );
}

#[test]
fn extended_l2_2m() {
    simple_case(
        "extended_l2_2m",
        64 * MIB,
        2 * MIB,
        "extended_l2=on,cluster_size=2097152",
        Some(64 * KIB),
    );
}

/// `qemu-img convert -c` of a filled image: every cluster compressed (refcount 1, several
/// compressed clusters sharing host clusters), then random writes over them.
fn compressed_case(test: &str, compression_type: &str) {
    let dir = workdir();
    let size = 32 * MIB;
    let cs = 64 * KIB;
    let src = fresh(dir.path(), size, cs, "cluster_size=65536", None);
    qemu_io_s(
        &src,
        &[
            format!("write -P 0x6b {} {}", 4 * MIB, 3 * MIB),
            format!("write -P 0x21 {} {}", 20 * MIB + 512, 2 * MIB),
        ],
    );
    let img = dir.path().join("packed.qcow2");
    let o = format!("cluster_size=65536,compression_type={compression_type}");
    qemu_img(&[
        "convert",
        "-q",
        "-c",
        "-O",
        "qcow2",
        "-o",
        &o,
        src.to_str().unwrap(),
        img.to_str().unwrap(),
    ]);
    let info = qemu_check(&img);
    assert!(
        info.count("compressed-clusters") > 0,
        "convert -c gave no compressed clusters: {}",
        info.stdout
    );
    exercise(test, &img, Geometry::new(size, cs, None), PLAN, &[]);
}

#[test]
fn compressed_zlib() {
    compressed_case("compressed_zlib", "zlib");
}

#[test]
fn compressed_zstd() {
    compressed_case("compressed_zstd", "zstd");
}

/// An overlay (4 KiB clusters, so that partial-cluster writes need the backing data, and
/// 64 KiB clusters) over a qcow2 base with data everywhere the pattern puts it and a large
/// contiguous data area.
#[test]
fn overlay_on_qcow2_backing() {
    let dir = workdir();
    let size = 32 * MIB;
    let base = dir.path().join("base.qcow2");
    create_qcow2(&base, size, "cluster_size=65536", None);
    crate::common::images::fill(&base, 64 * KIB, size, 1, None);
    qemu_io_s(&base, &[format!("write -P 0x3c {} {}", 2 * MIB, 6 * MIB)]);
    let top = dir.path().join("top.qcow2");
    create_qcow2(
        &top,
        size,
        "cluster_size=16384",
        Some(("base.qcow2", "qcow2")),
    );
    crate::common::images::fill(&top, 16 * KIB, size, 2, None);
    exercise(
        "overlay_on_qcow2_backing",
        &top,
        Geometry::new(size, 16 * KIB, None),
        PLAN,
        &[],
    );
}

/// An overlay (64 KiB clusters, 32 MiB) over a sparse raw file of 16 MiB: partial-cluster
/// writes pull the rest of the cluster from the raw file, and past its end read zeros.
#[test]
fn overlay_on_raw_backing() {
    let dir = workdir();
    let size = 32 * MIB;
    let base = dir.path().join("base.img");
    let f = fs::File::create(&base).unwrap();
    f.set_len(16 * MIB).unwrap();
    drop(f);
    crate::common::images::fill_no_zeros(&base, 64 * KIB, 16 * MIB, 1);
    qemu_io_s(&base, &[format!("write -P 0x77 {} {}", MIB, 5 * MIB)]);
    let top = dir.path().join("top.qcow2");
    create_qcow2(&top, size, "cluster_size=65536", Some(("base.img", "raw")));
    crate::common::images::fill(&top, 64 * KIB, size, 2, None);
    exercise(
        "overlay_on_raw_backing",
        &top,
        Geometry::new(size, 64 * KIB, None),
        PLAN,
        &[],
    );
}

/// Writes the whole disk of a fresh image with `opts` (in chunks of varying sizes, 1 MiB areas
/// in shuffled order so that allocation order differs from guest order), then random overwrites;
/// checks live.raw, qemu-img compare and check, and that the refcount table grew.
fn dense_case(test: &str, size: u64, opts: &str) {
    let dir = workdir();
    let img = dir.path().join("dense.qcow2");
    create_qcow2(&img, size, opts, None);
    let cs = cluster_size(&img).unwrap();
    let reftable_before = read_be_u32(&img, 56);
    let mirror = Mirror::of_image(&img);
    let mut rng = Rng::new(seed_for(test));
    let g = Geometry::new(size, cs, None);
    let t = Instant::now();
    let stats;
    {
        let m = Mount::new(&img);
        let mp = m.path().to_path_buf();
        let what = format!("{test}: dense writes");
        let log = || server_log(m.stderr_text());
        stats = with_watchdog(
            &mp,
            STALL,
            Duration::from_secs(400),
            &what,
            &log,
            |progress| {
                let live = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(m.live())
                    .expect("open live.raw for writing");
                let mut areas: Vec<u64> = (0..size / MIB).collect();
                for i in (1..areas.len()).rev() {
                    let j = rng.below(i as u64 + 1) as usize;
                    areas.swap(i, j);
                }
                let mut dense = 0u64;
                for a in areas {
                    let mut pos = a * MIB;
                    let end = pos + MIB;
                    while pos < end {
                        let len = rng
                            .pick(&[512, 4096, 33 * 512, 64 * KIB, 128 * KIB])
                            .min(end - pos);
                        let mut data = vec![0u8; len as usize];
                        rng.fill(&mut data);
                        pwrite_all(&live, &data, pos).unwrap_or_else(|e| {
                            panic!(
                                "dense write of {len} bytes at {pos:#x} (after {dense} bytes): {e}"
                            )
                        });
                        mirror.write(pos, &data);
                        progress.tick();
                        dense += len;
                        pos += len;
                    }
                }
                let st = random_writes(&live, &mirror, &mut rng, &g, 200, 8 * MIB, Some(progress));
                live.sync_all().expect("fsync");
                (dense, st)
            },
        );
        with_deadline(&mp, IO_LIMIT, &format!("{test}: compare"), &log, || {
            if let Err(e) = compare_uncached(&m.live(), &mirror.path) {
                panic!(
                    "live.raw vs mirror: {e}\nsnapfs stderr:\n{}",
                    m.stderr_text()
                );
            }
        });
    }
    let reftable_after = read_be_u32(&img, 56);
    eprintln!(
        "{test}: {} dense bytes, then {:?}, in {:?}; refcount table clusters {reftable_before} -> {reftable_after}",
        stats.0,
        stats.1,
        t.elapsed()
    );
    let mut problems = Vec::new();
    if let Err(e) = qemu_compare(&img, &mirror.path) {
        problems.push(e);
    }
    if let Some(p) = check_problems(&img, false) {
        problems.push(p);
    }
    if reftable_after <= reftable_before {
        problems.push(format!(
            "the refcount table did not grow ({reftable_before} -> {reftable_after} clusters)"
        ));
    }
    assert!(problems.is_empty(), "{test}:\n- {}", problems.join("\n- "));
}

/// 512-byte clusters with 64-bit refcounts (64 entries per refcount block, 64 entries per L2
/// table): a 64 MiB disk written densely needs 2048 L2 tables, over 2000 refcount blocks and a
/// refcount table that grows many times (one table cluster covers 64 blocks = 2 MiB of file).
#[test]
fn dense_cluster512_refcount64_grows_tables() {
    dense_case(
        "dense_cluster512_refcount64_grows_tables",
        64 * MIB,
        "cluster_size=512,refcount_bits=64",
    );
}

/// 512-byte clusters, 16-bit refcounts: one refcount table cluster covers 8 MiB of file, so a
/// densely written 16 MiB disk moves the refcount table at least once.
#[test]
fn dense_cluster512_refcount16_grows_table() {
    dense_case(
        "dense_cluster512_refcount16_grows_table",
        16 * MIB,
        "cluster_size=512,refcount_bits=16",
    );
}
