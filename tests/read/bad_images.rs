//! Bad images (shared/reference/bad-inputs.md): `snapfs info` and `snapfs mount -f` must exit
//! non-zero with exactly one line on stderr, no panic, and never write to the image.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::common::*;

/// The base image of bad-inputs.md: 64 MiB, 64 KiB clusters, v3, one data cluster, so that the
/// layout is reftable 0x10000, refblock 0x20000, L1 0x30000, L2 0x40000, data 0x50000.
fn base(dir: &Path, name: &str) -> PathBuf {
    let img = dir.join(name);
    create_qcow2(&img, 64 * MIB, "cluster_size=65536", None);
    qemu_io(&img, &["write -P 0x11 0 64k"]);
    assert_eq!(read_be_u64(&img, 48), 0x10000, "reftable offset");
    assert_eq!(read_be_u64(&img, 40), 0x30000, "L1 offset");
    assert_eq!(
        read_be_u64(&img, 0x30000) & 0x00ff_ffff_ffff_fe00,
        0x40000,
        "L2 offset"
    );
    assert_eq!(read_be_u32(&img, 100), 112, "header_length");
    img
}

/// Offset of the first header extension with `magic`, or of the end marker when `magic` is 0.
fn find_extension(img: &Path, magic: u32) -> u64 {
    let mut off = read_be_u32(img, 100) as u64;
    loop {
        let m = read_be_u32(img, off);
        if m == magic {
            return off;
        }
        assert_ne!(m, 0, "extension {magic:#x} not found");
        let len = read_be_u32(img, off + 4) as u64;
        off += 8 + len.div_ceil(8) * 8;
    }
}

fn set_bits_u64(img: &Path, off: u64, bits: u64) {
    let v = read_be_u64(img, off);
    write_be_u64(img, off, v | bits);
}

/// Outcome of running one command on a bad image.
fn check_refused(
    what: &str,
    img: &Path,
    cmd: &mut std::process::Command,
    problems: &mut Vec<String>,
) {
    let out = run_timeout(cmd, Duration::from_secs(20));
    let tag = format!("{what}: {}", img.display());
    match out.status {
        None => problems.push(format!("{tag}: did not exit within 20 s (killed)")),
        Some(s) if s.success() => problems.push(format!("{tag}: exit status 0, want non-zero")),
        Some(_) => {}
    }
    let err = out.stderr.strip_suffix('\n').unwrap_or(&out.stderr);
    if err.is_empty() {
        problems.push(format!("{tag}: nothing on stderr"));
    } else if err.contains('\n') {
        problems.push(format!(
            "{tag}: stderr has {} lines, want one:\n{}",
            err.lines().count(),
            out.stderr
        ));
    }
    if out.stderr.contains("panicked") || out.stderr.contains("RUST_BACKTRACE") {
        problems.push(format!("{tag}: panic on stderr:\n{}", out.stderr));
    }
}

/// Runs `snapfs info IMAGE` and `snapfs mount -f IMAGE MP` on `img`; both must be refused cleanly
/// and leave the file unchanged.
fn refused(img: &Path) -> Vec<String> {
    let before = read_all(img);
    let mut problems = Vec::new();
    // oracle sanity: QEMU refuses the image too (else the patch missed its target)
    // (qemu-img info catches backing loops; qemu-io the rest, e.g. a missing data file; qemu-io
    // spins on backing loops, hence the time limit)
    let info = run_status(
        std::process::Command::new("qemu-img")
            .args(["info", "-U", "-f", "qcow2", "--backing-chain"])
            .arg(img),
    );
    if info.status.success() {
        let io = run_timeout(
            std::process::Command::new("qemu-io")
                .args(["-r", "-U", "-f", "qcow2", "-c", "read 0 512"])
                .arg(img),
            Duration::from_secs(10),
        );
        assert!(
            io.status.map(|s| s.success()) != Some(true),
            "test bug: qemu-io opens {}:\n{}",
            img.display(),
            io.stdout
        );
    }
    check_refused(
        "snapfs info",
        img,
        snapfs_cmd().arg("info").arg(img),
        &mut problems,
    );
    let mpdir = tempfile::Builder::new()
        .prefix("snapfs-bad-")
        .tempdir()
        .unwrap();
    let mp = mpdir.path().join("mnt");
    fs::create_dir(&mp).unwrap();
    check_refused(
        "snapfs mount -f",
        img,
        snapfs_cmd().arg("mount").arg("-f").arg(img).arg(&mp),
        &mut problems,
    );
    if is_mounted(&mp) {
        problems.push(format!("{}: left a mount behind", img.display()));
    }
    if !force_unmount(&mp) {
        // never let TempDir's cleanup walk into a live mount
        let _ = mpdir.keep();
    }
    if read_all(img) != before {
        problems.push(format!("{}: the image file was modified", img.display()));
    }
    problems
}

/// Builds one variant per closure from the base image and checks each is refused.
/// A labelled patch applied to a fresh base image.
type Variant<'a> = (&'a str, &'a dyn Fn(&Path));

fn row(variants: &[Variant]) {
    let dir = workdir();
    let mut problems = Vec::new();
    for (i, (label, patch)) in variants.iter().enumerate() {
        let img = base(dir.path(), &format!("bad{i}.qcow2"));
        patch(&img);
        for p in refused(&img) {
            problems.push(format!("[{label}] {p}"));
        }
    }
    assert!(
        problems.is_empty(),
        "problems:\n- {}",
        problems.join("\n- ")
    );
}

#[test]
fn row01_bad_magic() {
    row(&[("magic QFI\\0", &|p| write_bytes_at(p, 3, &[0]))]);
}

#[test]
fn row02_version() {
    row(&[
        ("version 1", &|p| write_be_u32(p, 4, 1)),
        ("version 4", &|p| write_be_u32(p, 4, 4)),
    ]);
}

#[test]
fn row03_cluster_bits() {
    row(&[
        ("cluster_bits 8", &|p| write_be_u32(p, 20, 8)),
        ("cluster_bits 22", &|p| write_be_u32(p, 20, 22)),
    ]);
}

#[test]
fn row04_header_length() {
    row(&[
        ("header_length 0xffffffff", &|p| {
            write_be_u32(p, 100, 0xffff_ffff)
        }),
        ("header_length 100", &|p| write_be_u32(p, 100, 100)),
    ]);
}

#[test]
fn row05_unknown_incompatible_bit() {
    row(&[("incompatible bit 63", &|p| set_bits_u64(p, 72, 1 << 63))]);
}

/// Row 6: the corrupt bit. `snapfs info` succeeds; the image mounts read-only (live.raw cannot be
/// written) with the right content, and the file is not modified.
#[test]
fn row06_corrupt_bit_info_ok_and_mounts_read_only() {
    let dir = workdir();
    let img = base(dir.path(), "corrupt.qcow2");
    let oracle = convert_to_raw(&img, None);
    set_bits_u64(&img, 72, 1 << 1);
    let before = read_all(&img);
    let mut problems = Vec::new();
    let out = run_timeout(snapfs_cmd().arg("info").arg(&img), Duration::from_secs(20));
    if out.status.map(|s| s.success()) != Some(true) {
        problems.push(format!("snapfs info: {:?}\n{}", out.status, out.stderr));
    }
    if out.stderr.contains("panicked") {
        problems.push(format!("snapfs info panicked: {}", out.stderr));
    }
    {
        let m = Mount::new(&img);
        if let Err(e) = compare_files(&m.live(), &oracle) {
            problems.push(format!("live.raw: {e}"));
        }
        if let Ok(f) = fs::OpenOptions::new().write(true).open(m.live()) {
            use std::os::unix::fs::FileExt;
            if f.write_at(b"x", 0).and_then(|_| f.sync_all()).is_ok() {
                problems.push("live.raw of a corrupt image accepted a write".into());
            }
        }
    }
    if read_all(&img) != before {
        problems.push("the image file was modified".into());
    }
    assert!(
        problems.is_empty(),
        "problems:\n- {}",
        problems.join("\n- ")
    );
}

#[test]
fn row07_compression_type() {
    row(&[
        ("compression_type 1, bit 3 clear", &|p| {
            write_bytes_at(p, 104, &[1])
        }),
        ("compression_type 7", &|p| {
            write_bytes_at(p, 104, &[7]);
            set_bits_u64(p, 72, 1 << 3);
        }),
        ("bit 3 with type 0", &|p| set_bits_u64(p, 72, 1 << 3)),
    ]);
}

#[test]
fn row08_extended_l2_with_512_byte_clusters() {
    let dir = workdir();
    let img = dir.path().join("el2.qcow2");
    create_qcow2(&img, 64 * MIB, "cluster_size=512", None);
    qemu_io(&img, &["write -P 0x11 0 64k"]);
    set_bits_u64(&img, 72, 1 << 4);
    let problems = refused(&img);
    assert!(
        problems.is_empty(),
        "problems:\n- {}",
        problems.join("\n- ")
    );
}

#[test]
fn row09_refcount_order() {
    row(&[("refcount_order 7", &|p| write_be_u32(p, 96, 7))]);
}

#[test]
fn row10_backing_file_offset() {
    row(&[("backing_file_offset 2^64-1", &|p| {
        write_be_u64(p, 8, u64::MAX)
    })]);
}

#[test]
fn row11_backing_file_name_too_long() {
    row(&[("backing offset 0x1000, size 0xffffffff", &|p| {
        write_be_u64(p, 8, 0x1000);
        write_be_u32(p, 16, 0xffff_ffff);
    })]);
}

#[test]
fn row12_extension_too_large() {
    row(&[("extension len 0x7fffffff", &|p| {
        let hl = read_be_u32(p, 100) as u64;
        assert_ne!(read_be_u32(p, hl), 0, "an extension follows the header");
        write_be_u32(p, hl + 4, 0x7fff_ffff);
    })]);
}

#[test]
fn row13_backing_format_extension_too_long() {
    let dir = workdir();
    let b = base(dir.path(), "backing.qcow2");
    let img = dir.path().join("overlay.qcow2");
    create_qcow2(
        &img,
        64 * MIB,
        "cluster_size=65536",
        Some(("backing.qcow2", "qcow2")),
    );
    let ext = find_extension(&img, 0xe279_2aca);
    write_be_u32(&img, ext + 4, 64);
    let b_before = read_all(&b);
    let problems = refused(&img);
    assert!(
        problems.is_empty(),
        "problems:\n- {}",
        problems.join("\n- ")
    );
    assert_eq!(read_all(&b), b_before, "the backing file was modified");
}

#[test]
fn row14_reftable_clusters() {
    row(&[
        ("reftable clusters 0xffffffff", &|p| {
            write_be_u32(p, 56, 0xffff_ffff)
        }),
        ("reftable clusters 0", &|p| write_be_u32(p, 56, 0)),
    ]);
}

#[test]
fn row15_reftable_offset() {
    row(&[("reftable offset 0x1234567890abcdef", &|p| {
        write_be_u64(p, 48, 0x1234_5678_90ab_cdef)
    })]);
}

#[test]
fn row16_nb_snapshots() {
    row(&[("nb_snapshots 0xffffffff", &|p| {
        write_be_u32(p, 60, 0xffff_ffff)
    })]);
}

#[test]
fn row17_snapshots_offset_unaligned() {
    row(&[("snapshots_offset unaligned, nb 0", &|p| {
        write_be_u32(p, 60, 0);
        write_be_u64(p, 64, 0x10001);
    })]);
}

#[test]
fn row18_l1_size() {
    row(&[
        ("l1_size 0xffffffff", &|p| write_be_u32(p, 36, 0xffff_ffff)),
        ("l1_size 0", &|p| write_be_u32(p, 36, 0)),
    ]);
}

#[test]
fn row19_l1_offset_unaligned() {
    row(&[("l1_table_offset unaligned", &|p| {
        write_be_u64(p, 40, 0x30001)
    })]);
}

#[test]
fn row20_size_too_big() {
    row(&[("size 2^62", &|p| write_be_u64(p, 24, 1 << 62))]);
}

#[test]
fn row21_crypt_method() {
    row(&[
        ("crypt_method 2 without FDE extension", &|p| {
            write_be_u32(p, 32, 2)
        }),
        ("crypt_method 9", &|p| write_be_u32(p, 32, 9)),
    ]);
}

#[test]
fn row22_external_data_file() {
    row(&[
        ("incompatible bit 2 without data-file extension", &|p| {
            set_bits_u64(p, 72, 1 << 2)
        }),
        ("autoclear bit 1 alone", &|p| set_bits_u64(p, 88, 1 << 1)),
    ]);
}

/// A bitmaps extension (with the autoclear bit that makes it valid) announcing zero bitmaps.
#[test]
fn row23_bitmaps_extension_with_zero_bitmaps() {
    row(&[("bitmaps extension nb 0", &|p| {
        let end = find_extension(p, 0);
        let mut ext = Vec::new();
        ext.extend_from_slice(&0x2385_2875u32.to_be_bytes());
        ext.extend_from_slice(&24u32.to_be_bytes());
        ext.extend_from_slice(&0u32.to_be_bytes()); // nb_bitmaps
        ext.extend_from_slice(&0u32.to_be_bytes()); // reserved
        ext.extend_from_slice(&0u64.to_be_bytes()); // directory size
        ext.extend_from_slice(&0u64.to_be_bytes()); // directory offset
        ext.extend_from_slice(&[0u8; 8]); // end marker
        write_bytes_at(p, end, &ext);
        set_bits_u64(p, 88, 1);
    })]);
}

/// Row 40: an image whose backing file is itself.
#[test]
fn row40_image_is_its_own_backing_file() {
    let dir = workdir();
    let img = base(dir.path(), "self.qcow2");
    qemu_img(&[
        "rebase",
        "-u",
        "-b",
        "self.qcow2",
        "-F",
        "qcow2",
        img.to_str().unwrap(),
    ]);
    let problems = refused(&img);
    assert!(
        problems.is_empty(),
        "problems:\n- {}",
        problems.join("\n- ")
    );
}

/// Row 40, two files: a -> b -> a.
#[test]
fn row40_backing_loop_of_two_images() {
    let dir = workdir();
    let b = base(dir.path(), "b.qcow2");
    let a = dir.path().join("a.qcow2");
    create_qcow2(
        &a,
        64 * MIB,
        "cluster_size=65536",
        Some(("b.qcow2", "qcow2")),
    );
    qemu_img(&[
        "rebase",
        "-u",
        "-b",
        "a.qcow2",
        "-F",
        "qcow2",
        b.to_str().unwrap(),
    ]);
    let b_before = read_all(&b);
    let mut problems = refused(&a);
    problems.extend(refused(&b));
    if read_all(&b) != b_before {
        problems.push("b.qcow2 was modified".into());
    }
    assert!(
        problems.is_empty(),
        "problems:\n- {}",
        problems.join("\n- ")
    );
}

/// Not in the table but in the contract: a file without the qcow2 magic is refused, never taken
/// for raw; a missing file is refused.
#[test]
fn raw_file_and_missing_file_are_refused() {
    let dir = workdir();
    let raw = dir.path().join("disk.raw");
    fs::write(&raw, vec![0x5au8; 1 << 20]).unwrap();
    let mut problems = refused(&raw);
    let missing = dir.path().join("missing.qcow2");
    let mut p = Vec::new();
    check_refused(
        "snapfs info",
        &missing,
        snapfs_cmd().arg("info").arg(&missing),
        &mut p,
    );
    problems.extend(p);
    assert!(
        problems.is_empty(),
        "problems:\n- {}",
        problems.join("\n- ")
    );
}

/// The backing file of a good overlay is missing: refused with one line.
#[test]
fn missing_backing_file_is_refused() {
    let dir = workdir();
    let b = base(dir.path(), "gone.qcow2");
    let img = dir.path().join("overlay.qcow2");
    create_qcow2(&img, 64 * MIB, "", Some(("gone.qcow2", "qcow2")));
    fs::remove_file(&b).unwrap();
    let problems = refused(&img);
    assert!(
        problems.is_empty(),
        "problems:\n- {}",
        problems.join("\n- ")
    );
}

/// A dirty image (lazy refcounts, qemu-io aborted after a write): mounts read-only with the right
/// content, live.raw refuses writes, the file is not modified (no repair on a read-only mount).
#[test]
fn dirty_image_mounts_read_only() {
    let dir = workdir();
    let img = dir.path().join("dirty.qcow2");
    create_qcow2(&img, 64 * MIB, "lazy_refcounts=on", None);
    qemu_io(&img, &["write -P 0x21 0 1M"]);
    let _ = run_status(
        std::process::Command::new("qemu-io")
            .args(["-f", "qcow2", "-c", "write -P 0x22 2M 1M", "-c", "abort"])
            .arg(&img),
    );
    assert_ne!(
        read_be_u64(&img, 72) & 1,
        0,
        "oracle sanity: the dirty bit is set"
    );
    let oracle = convert_to_raw(&img, None);
    let before = read_all(&img);
    let mut problems = Vec::new();
    {
        let m = Mount::new(&img);
        if let Err(e) = compare_files(&m.live(), &oracle) {
            problems.push(format!("live.raw: {e}"));
        }
        if let Ok(f) = fs::OpenOptions::new().write(true).open(m.live()) {
            use std::os::unix::fs::FileExt;
            if f.write_at(b"x", 0).and_then(|_| f.sync_all()).is_ok() {
                problems.push("live.raw of a dirty image accepted a write".into());
            }
        }
    }
    if read_all(&img) != before {
        problems.push("the image file was modified".into());
    }
    assert!(
        problems.is_empty(),
        "problems:\n- {}",
        problems.join("\n- ")
    );
}
