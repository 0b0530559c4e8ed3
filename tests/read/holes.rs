//! Holes: lseek(SEEK_DATA / SEEK_HOLE) on every view must report exactly the data that
//! `qemu-img map` reports (compared as sets of bytes, not entry lists), st_blocks must count the
//! data bytes, and `cp` of a mostly empty multi-GiB view must give a sparse, identical copy.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use crate::common::images;
use crate::common::*;

/// Every view's SEEK_DATA/SEEK_HOLE map equals its qemu-img map data set.
fn check_seek(top: &std::path::Path, exp: &Expected) {
    let want: Vec<(String, Ranges)> = exp
        .iter()
        .map(|(n, v)| (n.clone(), v.oracle_data()))
        .collect();
    let mut problems = Vec::new();
    {
        let m = Mount::new(top);
        for (name, want) in &want {
            let file = m.path().join(name);
            let got = seek_data_ranges(&file);
            if let Some(d) =
                describe_ranges_diff(&format!("SEEK_DATA on {name}"), &got, "qemu-img map", want)
            {
                problems.push(d);
            }
        }
    }
    assert!(
        problems.is_empty(),
        "problems:\n- {}",
        problems.join("\n- ")
    );
}

/// Every view's st_blocks * 512 equals the qemu-img map data bytes, within one cluster (the
/// largest in the chain).
fn check_blocks(top: &std::path::Path, exp: &Expected) {
    let want: Vec<(String, u64, u64)> = exp
        .iter()
        .map(|(n, v)| (n.clone(), ranges_total(&v.oracle_data()), v.max_cluster()))
        .collect();
    let mut problems = Vec::new();
    {
        let m = Mount::new(top);
        for (name, bytes, cluster) in &want {
            let md = fs::metadata(m.path().join(name)).unwrap();
            let got = md.blocks() * 512;
            let diff = got.abs_diff(*bytes);
            if diff > *cluster {
                problems.push(format!(
                    "{name}: st_blocks*512 = {got} but qemu-img map counts {bytes} data bytes \
                     (tolerance {cluster})"
                ));
            }
        }
    }
    assert!(
        problems.is_empty(),
        "problems:\n- {}",
        problems.join("\n- ")
    );
}

/// A v3 image with data, zero clusters (over nothing and over older data), unallocated ranges
/// and a snapshot.
fn v3_image(dir: &std::path::Path) -> (PathBuf, Expected) {
    images::simple(dir, "v3", 64 * MIB, 64 * KIB, "", &["s"], None)
}

#[test]
fn seek_v3_data_zero_unallocated() {
    let dir = workdir();
    let (top, exp) = v3_image(dir.path());
    check_seek(&top, &exp);
}

#[test]
fn seek_v2_with_backing() {
    let dir = workdir();
    let (top, exp) = images::v2_with_backing(dir.path());
    check_seek(&top, &exp);
}

#[test]
fn seek_compressed_and_zero_clusters() {
    let dir = workdir();
    let (top, exp) = images::compressed(dir.path(), "zlib", 64 * KIB);
    check_seek(&top, &exp);
}

#[test]
fn seek_compressed_zstd_cluster4k() {
    let dir = workdir();
    let (top, exp) = images::compressed(dir.path(), "zstd", 4 * KIB);
    check_seek(&top, &exp);
}

#[test]
fn seek_chain_of_four_layers() {
    let dir = workdir();
    let (top, exp) = images::chain4(dir.path());
    check_seek(&top, &exp);
}

#[test]
fn seek_raw_backing_file() {
    let dir = workdir();
    let (top, exp) = images::raw_backing(dir.path());
    check_seek(&top, &exp);
}

#[test]
fn seek_extended_l2_over_backing() {
    let dir = workdir();
    let (top, exp) = images::extended_l2(dir.path(), 64 * KIB, true);
    check_seek(&top, &exp);
}

#[test]
fn seek_extended_l2_cluster2m() {
    let dir = workdir();
    let (top, exp) = images::extended_l2(dir.path(), 2 * MIB, false);
    check_seek(&top, &exp);
}

#[test]
fn st_blocks_v3() {
    let dir = workdir();
    let (top, exp) = v3_image(dir.path());
    check_blocks(&top, &exp);
}

#[test]
fn st_blocks_compressed_and_zero_clusters() {
    let dir = workdir();
    let (top, exp) = images::compressed(dir.path(), "zstd", 64 * KIB);
    check_blocks(&top, &exp);
}

#[test]
fn st_blocks_chain_of_four_layers() {
    let dir = workdir();
    let (top, exp) = images::chain4(dir.path());
    check_blocks(&top, &exp);
}

#[test]
fn st_blocks_extended_l2() {
    let dir = workdir();
    let (top, exp) = images::extended_l2(dir.path(), 64 * KIB, true);
    check_blocks(&top, &exp);
}

/// A 4 GiB disk holding 100 MiB of data (1 MiB every 40 MiB), with a snapshot after half of it.
/// `cp --sparse=always` of live.raw and plain `cp` of the snapshot view give copies that use
/// less than 200 MiB and equal the oracle.
#[test]
fn cp_of_a_4g_view_stays_sparse() {
    let dir = workdir();
    let img = dir.path().join("big.qcow2");
    create_qcow2(&img, 4 * GIB, "", None);
    let writes = |range: std::ops::Range<u64>| -> Vec<String> {
        range
            .map(|i| {
                format!(
                    "write -P {:#04x} {} {}",
                    (i % 250) + 1,
                    i * 40 * MIB + (i % 7) * 64 * KIB,
                    MIB
                )
            })
            .collect()
    };
    qemu_io_s(&img, &writes(0..50));
    snapshot_create(&img, "half");
    qemu_io_s(&img, &writes(50..100));
    let live_oracle = View::live(&img).oracle_raw();
    let half_oracle = View::internal(&img, "half").oracle_raw();

    let out = dir.path().join("out");
    fs::create_dir(&out).unwrap();
    let live_copy = out.join("live.raw");
    let half_copy = out.join("half.raw");
    let mut problems = Vec::new();
    {
        let m = Mount::new(&img);
        let r = run_timeout(
            Command::new("cp")
                .arg("--sparse=always")
                .arg(m.live())
                .arg(&live_copy),
            Duration::from_secs(900),
        );
        if r.status.map(|s| s.success()) != Some(true) {
            problems.push(format!(
                "cp --sparse=always live.raw: {:?} {}",
                r.status, r.stderr
            ));
        }
        let r = run_timeout(
            Command::new("cp")
                .arg(m.snapshot("half.raw"))
                .arg(&half_copy),
            Duration::from_secs(900),
        );
        if r.status.map(|s| s.success()) != Some(true) {
            problems.push(format!(
                "cp snapshots/half.raw: {:?} {}",
                r.status, r.stderr
            ));
        }
    }
    for (copy, oracle) in [(&live_copy, &live_oracle), (&half_copy, &half_oracle)] {
        let Ok(md) = fs::metadata(copy) else {
            continue;
        };
        let used = md.blocks() * 512;
        if used >= 200 * MIB {
            problems.push(format!(
                "{} uses {} MiB on disk (st_blocks), want < 200 MiB",
                copy.display(),
                used / MIB
            ));
        }
        if let Err(e) = compare_files(copy, oracle) {
            problems.push(format!("{} vs oracle: {e}", copy.display()));
        }
    }
    assert!(
        problems.is_empty(),
        "problems:\n- {}",
        problems.join("\n- ")
    );
}
