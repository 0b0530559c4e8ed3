//! Builders for the test images, shared by several test files. Every builder writes its images
//! with qemu-img / qemu-io into a directory the test owns and returns the top image and the
//! files the mount must show (see [`super::View`]).

use std::fs;
use std::path::{Path, PathBuf};

use super::{Expected, KIB, MIB, View, create_qcow2, qemu_img, qemu_io_s, snapshot_create};

/// qemu-io commands that write generation `gen` of the standard data pattern into a disk of
/// `size` bytes with `cs`-byte clusters:
/// - two clusters of pattern at cluster `gen` (aligned), of which the second is then zeroed
///   (`write -z`: a zero cluster in v3) and the first 512 bytes too;
/// - 1 KiB straddling the boundary between clusters `gen+8` and `gen+9` (cluster edge);
/// - with `sub` (extended L2 subcluster size): 1 KiB straddling subclusters 0/1 of cluster
///   `gen+12`, 512 bytes inside subcluster 5, and zeroes over subclusters 8..10;
/// - 1 MiB in the middle of the disk, shifted by 256 KiB per generation;
/// - the last 512 bytes of the disk.
///
/// With `zeros == false` no `write -z` is issued (for raw files, where zeroing goes through the
/// host file system's own hole handling).
pub fn pattern_cmds(
    cs: u64,
    size: u64,
    generation: u64,
    sub: Option<u64>,
    zeros: bool,
) -> Vec<String> {
    let pat = |k: u64| format!("0x{:02x}", ((generation * 0x10 + k * 0x3) & 0xff) | 0x01);
    let mut v = Vec::new();
    let a = generation * cs;
    v.push(format!("write -P {} {} {}", pat(1), a, 2 * cs));
    let edge = (generation + 9) * cs - 512;
    v.push(format!("write -P {} {} 1024", pat(2), edge));
    if let Some(sc) = sub {
        let base = (generation + 12) * cs;
        v.push(format!("write -P {} {} 1024", pat(3), base + sc - 512));
        v.push(format!("write -P {} {} 512", pat(4), base + 5 * sc + 512));
        if zeros {
            v.push(format!("write -z {} {}", base + 8 * sc, 2 * sc));
        }
    }
    if zeros {
        v.push(format!("write -z {} {}", a + cs, cs));
        v.push(format!("write -z {} 512", a));
    }
    let mid = size / 2 + generation * 256 * KIB;
    v.push(format!("write -P {} {} {}", pat(5), mid, MIB));
    v.push(format!("write -P {} {} 512", pat(6), size - 512));
    for c in &v {
        // every offset must be inside the disk
        let nums: Vec<u64> = c
            .split_whitespace()
            .filter_map(|w| w.parse().ok())
            .collect();
        if let [off, len] = nums[..] {
            assert!(
                off + len <= size,
                "pattern command {c:?} beyond size {size}"
            );
        }
    }
    v
}

/// Writes generation `gen` of the standard pattern (see [`pattern_cmds`]) into `image`.
pub fn fill(image: &Path, cs: u64, size: u64, generation: u64, sub: Option<u64>) {
    qemu_io_s(image, &pattern_cmds(cs, size, generation, sub, true));
}

/// Writes generation `gen` without any `write -z` (for raw images).
pub fn fill_no_zeros(image: &Path, cs: u64, size: u64, generation: u64) {
    qemu_io_s(image, &pattern_cmds(cs, size, generation, None, false));
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// One qcow2 image `dir/NAME.qcow2` created with `opts`: generation 1 is written, then for each
/// tag a snapshot is taken and the next generation written. Views: live.raw and one
/// `snapshots/TAG.raw` per tag.
pub fn simple(
    dir: &Path,
    name: &str,
    size: u64,
    cs: u64,
    opts: &str,
    tags: &[&str],
    sub: Option<u64>,
) -> (PathBuf, Expected) {
    let img = dir.join(format!("{name}.qcow2"));
    create_qcow2(&img, size, opts, None);
    fill(&img, cs, size, 1, sub);
    for (i, tag) in tags.iter().enumerate() {
        snapshot_create(&img, tag);
        fill(&img, cs, size, 2 + i as u64, sub);
    }
    let mut exp: Expected = vec![("live.raw".into(), View::live(&img))];
    for tag in tags {
        exp.push((format!("snapshots/{tag}.raw"), View::internal(&img, tag)));
    }
    (img, exp)
}

/// A chain of four qcow2 layers, with relative backing names through a subdirectory and mixed
/// cluster sizes, and internal snapshots in the top and in a backing layer:
///
/// ```text
/// base.qcow2 (32 MiB, 64k)  <-  sub/l1.qcow2 (64 MiB, 64k, backing "../base.qcow2", snapshot s-l1)
///   <-  l2.qcow2 (64 MiB, 4k, backing "sub/l1.qcow2"; zeroes over base data)
///   <-  top.qcow2 (64 MiB, 64k; snapshots t1 (taken while empty) and t2)
/// ```
/// The backing file is smaller than the overlays (reads past its end are zeros).
pub fn chain4(dir: &Path) -> (PathBuf, Expected) {
    let base = dir.join("base.qcow2");
    let sub = dir.join("sub");
    fs::create_dir_all(&sub).unwrap();
    let l1 = sub.join("l1.qcow2");
    let l2 = dir.join("l2.qcow2");
    let top = dir.join("top.qcow2");
    let c64 = "cluster_size=65536";

    create_qcow2(&base, 32 * MIB, c64, None);
    fill(&base, 64 * KIB, 32 * MIB, 1, None);

    create_qcow2(&l1, 64 * MIB, c64, Some(("../base.qcow2", "qcow2")));
    fill(&l1, 64 * KIB, 64 * MIB, 2, None);
    snapshot_create(&l1, "s-l1");
    fill(&l1, 64 * KIB, 64 * MIB, 3, None);

    create_qcow2(
        &l2,
        64 * MIB,
        "cluster_size=4096",
        Some(("sub/l1.qcow2", "qcow2")),
    );
    fill(&l2, 4 * KIB, 64 * MIB, 4, None);
    // zero clusters over data that the layers below hold
    qemu_io_s(
        &l2,
        &[
            format!("write -z {} {}", 64 * KIB, 192 * KIB),
            format!("write -z {} {}", 32 * MIB - 4 * KIB, 8 * KIB),
        ],
    );

    create_qcow2(&top, 64 * MIB, c64, Some(("l2.qcow2", "qcow2")));
    snapshot_create(&top, "t1");
    fill(&top, 64 * KIB, 64 * MIB, 5, None);
    snapshot_create(&top, "t2");
    fill(&top, 64 * KIB, 64 * MIB, 6, None);

    let exp: Expected = vec![
        ("live.raw".into(), View::live(&top)),
        ("snapshots/t1.raw".into(), View::internal(&top, "t1")),
        ("snapshots/t2.raw".into(), View::internal(&top, "t2")),
        ("snapshots/base.raw".into(), View::layer(&base)),
        ("snapshots/l1.raw".into(), View::layer(&l1)),
        ("snapshots/l1@s-l1.raw".into(), View::internal(&l1, "s-l1")),
        ("snapshots/l2.raw".into(), View::layer(&l2)),
    ];
    (top, exp)
}

/// A qcow2 overlay (32 MiB) over a sparse raw backing file `base.img` (16 MiB, shorter than the
/// overlay), with one internal snapshot `s` in the overlay.
pub fn raw_backing(dir: &Path) -> (PathBuf, Expected) {
    let base = dir.join("base.img");
    let f = fs::File::create(&base).unwrap();
    f.set_len(16 * MIB).unwrap();
    drop(f);
    fill_no_zeros(&base, 64 * KIB, 16 * MIB, 1);
    let top = dir.join("overlay.qcow2");
    create_qcow2(&top, 32 * MIB, "", Some(("base.img", "raw")));
    fill(&top, 64 * KIB, 32 * MIB, 2, None);
    snapshot_create(&top, "s");
    fill(&top, 64 * KIB, 32 * MIB, 3, None);
    // zero clusters over raw data
    qemu_io_s(&top, &[format!("write -z {} {}", 10 * 64 * KIB, 128 * KIB)]);
    let exp: Expected = vec![
        ("live.raw".into(), View::live(&top)),
        ("snapshots/s.raw".into(), View::internal(&top, "s")),
        ("snapshots/base.raw".into(), View::layer(&base)),
    ];
    (top, exp)
}

/// A compressed image: two generations of data written, then `qemu-img convert -c -O qcow2` with
/// `compression_type` (zlib or zstd) and cluster size `cs` into `disk.qcow2`. Then snapshot
/// `packed`, and on top: a partial overwrite inside a compressed cluster, a zero cluster over a
/// compressed one, compressed writes with `qemu-io write -c`, and another generation.
pub fn compressed(dir: &Path, compression_type: &str, cs: u64) -> (PathBuf, Expected) {
    let size = 64 * MIB;
    let src = dir.join("src.qcow2");
    create_qcow2(&src, size, &format!("cluster_size={cs}"), None);
    fill(&src, cs, size, 1, None);
    fill(&src, cs, size, 2, None);
    let img = dir.join("disk.qcow2");
    let o = format!("cluster_size={cs},compression_type={compression_type}");
    qemu_img(&[
        "convert",
        "-q",
        "-c",
        "-O",
        "qcow2",
        "-o",
        &o,
        s(&src),
        s(&img),
    ]);
    fs::remove_file(&src).unwrap();
    snapshot_create(&img, "packed");
    // clusters 24 and 25 are untouched so far (qemu writes compressed clusters only there)
    let q = 24 * cs;
    qemu_io_s(
        &img,
        &[
            // partial overwrite inside compressed cluster 1 (copy-on-write of compressed data)
            format!("write -P 0xc3 {} 512", cs + 1024),
            // zero a compressed cluster (cluster 2, written by generation 2)
            format!("write -z {} {}", 2 * cs, cs),
            // compressed writes straight from qemu-io
            format!("write -c -P 0xd4 {} {}", q, cs),
            format!("write -c -P 0xd5 {} {}", q + cs, cs),
        ],
    );
    fill(&img, cs, size, 3, None);
    let exp: Expected = vec![
        ("live.raw".into(), View::live(&img)),
        (
            "snapshots/packed.raw".into(),
            View::internal(&img, "packed"),
        ),
    ];
    (img, exp)
}

/// Extended L2 (`extended_l2=on`, cluster `cs`), writes at subcluster edges and zeroed
/// subclusters. With `over_backing`, the image is an overlay over `base.qcow2` holding data in
/// the first 2 MiB, so unallocated subclusters of an allocated cluster must read the backing file.
/// One snapshot `x`.
pub fn extended_l2(dir: &Path, cs: u64, over_backing: bool) -> (PathBuf, Expected) {
    let size = 64 * MIB;
    let sub = cs / 32;
    let top = dir.join("ext.qcow2");
    let mut exp: Expected = vec![("live.raw".into(), View::live(&top))];
    let o = format!("extended_l2=on,cluster_size={cs}");
    if over_backing {
        let base = dir.join("base.qcow2");
        create_qcow2(&base, size, "cluster_size=65536", None);
        qemu_io_s(&base, &[format!("write -P 0x5a 0 {}", 2 * MIB)]);
        create_qcow2(&top, size, &o, Some(("base.qcow2", "qcow2")));
        exp.push(("snapshots/base.raw".into(), View::layer(&base)));
    } else {
        create_qcow2(&top, size, &o, None);
    }
    fill(&top, cs, size, 1, Some(sub));
    snapshot_create(&top, "x");
    fill(&top, cs, size, 2, Some(sub));
    exp.push(("snapshots/x.raw".into(), View::internal(&top, "x")));
    (top, exp)
}

/// A v2 (compat=0.10) overlay over a v2 base, both 64k clusters, with snapshots s1, s2 in the
/// top. In v2 `write -z` over backing data must write real zeros.
pub fn v2_with_backing(dir: &Path) -> (PathBuf, Expected) {
    let size = 64 * MIB;
    let base = dir.join("base.qcow2");
    let top = dir.join("top.qcow2");
    create_qcow2(&base, size, "compat=0.10,cluster_size=65536", None);
    fill(&base, 64 * KIB, size, 1, None);
    create_qcow2(
        &top,
        size,
        "compat=0.10,cluster_size=65536",
        Some(("base.qcow2", "qcow2")),
    );
    fill(&top, 64 * KIB, size, 2, None);
    snapshot_create(&top, "s1");
    fill(&top, 64 * KIB, size, 3, None);
    snapshot_create(&top, "s2");
    fill(&top, 64 * KIB, size, 4, None);
    let exp: Expected = vec![
        ("live.raw".into(), View::live(&top)),
        ("snapshots/s1.raw".into(), View::internal(&top, "s1")),
        ("snapshots/s2.raw".into(), View::internal(&top, "s2")),
        ("snapshots/base.raw".into(), View::layer(&base)),
    ];
    (top, exp)
}
