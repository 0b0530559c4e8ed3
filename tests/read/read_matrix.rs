//! The oracle matrix: images of every variety, built with qemu-img / qemu-io, mounted with
//! snapfs; every view must equal what `qemu-img convert` produces, byte for byte, with the right
//! name, size and (for snapshots) no write bits. One test per variety.

use std::collections::BTreeSet;
use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::time::Duration;

use crate::common::images::{self, fill};
use crate::common::*;

fn simple_case(name: &str, size: u64, cs: u64, opts: &str, tags: &[&str], sub: Option<u64>) {
    let dir = workdir();
    let (top, exp) = images::simple(dir.path(), name, size, cs, opts, tags, sub);
    verify_mount(&top, &exp, &[]);
}

// ----- qcow2 versions and cluster sizes ------------------------------------------------------

#[test]
fn v2_cluster64k_backing_and_snapshots() {
    let dir = workdir();
    let (top, exp) = images::v2_with_backing(dir.path());
    verify_mount(&top, &exp, &[]);
}

#[test]
fn v2_cluster512() {
    simple_case(
        "v2c512",
        16 * MIB,
        512,
        "compat=0.10,cluster_size=512",
        &["a", "b"],
        None,
    );
}

#[test]
fn v3_cluster512() {
    simple_case(
        "v3c512",
        16 * MIB,
        512,
        "compat=1.1,cluster_size=512",
        &["a", "b"],
        None,
    );
}

#[test]
fn v3_cluster4k() {
    simple_case(
        "v3c4k",
        32 * MIB,
        4 * KIB,
        "compat=1.1,cluster_size=4096",
        &["a", "b"],
        None,
    );
}

#[test]
fn v3_cluster64k() {
    simple_case(
        "v3c64k",
        64 * MIB,
        64 * KIB,
        "compat=1.1,cluster_size=65536",
        &["a", "b"],
        None,
    );
}

#[test]
fn v3_cluster2m() {
    simple_case(
        "v3c2m",
        64 * MIB,
        2 * MIB,
        "compat=1.1,cluster_size=2M",
        &["a", "b"],
        None,
    );
}

// ----- refcount widths -----------------------------------------------------------------------

/// refcount_bits=1: qemu can only snapshot while no cluster is shared, so the snapshot is taken
/// on the empty image (an all-zero view) and data is written afterwards.
#[test]
fn refcount_bits_1() {
    let dir = workdir();
    let img = dir.path().join("r1.qcow2");
    create_qcow2(&img, 32 * MIB, "refcount_bits=1", None);
    snapshot_create(&img, "empty");
    fill(&img, 64 * KIB, 32 * MIB, 1, None);
    fill(&img, 64 * KIB, 32 * MIB, 2, None);
    let exp: Expected = vec![
        ("live.raw".into(), View::live(&img)),
        ("snapshots/empty.raw".into(), View::internal(&img, "empty")),
    ];
    verify_mount(&img, &exp, &[]);
}

#[test]
fn refcount_bits_16() {
    simple_case(
        "r16",
        32 * MIB,
        64 * KIB,
        "refcount_bits=16",
        &["a", "b"],
        None,
    );
}

#[test]
fn refcount_bits_64() {
    simple_case(
        "r64",
        32 * MIB,
        64 * KIB,
        "refcount_bits=64",
        &["a", "b"],
        None,
    );
}

// ----- compression ---------------------------------------------------------------------------

fn compressed_case(kind: &str, cs: u64) {
    let dir = workdir();
    let (top, exp) = images::compressed(dir.path(), kind, cs);
    verify_mount(&top, &exp, &[]);
}

#[test]
fn compressed_zlib_cluster64k() {
    compressed_case("zlib", 64 * KIB);
}

#[test]
fn compressed_zstd_cluster64k() {
    compressed_case("zstd", 64 * KIB);
}

#[test]
fn compressed_zlib_cluster4k() {
    compressed_case("zlib", 4 * KIB);
}

#[test]
fn compressed_zlib_cluster512() {
    compressed_case("zlib", 512);
}

#[test]
fn compressed_zstd_cluster2m() {
    compressed_case("zstd", 2 * MIB);
}

// ----- extended L2 ---------------------------------------------------------------------------

#[test]
fn extended_l2_cluster64k_over_backing() {
    let dir = workdir();
    let (top, exp) = images::extended_l2(dir.path(), 64 * KIB, true);
    verify_mount(&top, &exp, &[]);
}

#[test]
fn extended_l2_cluster2m() {
    let dir = workdir();
    let (top, exp) = images::extended_l2(dir.path(), 2 * MIB, false);
    verify_mount(&top, &exp, &[]);
}

// ----- backing chains ------------------------------------------------------------------------

#[test]
fn raw_backing_file() {
    let dir = workdir();
    let (top, exp) = images::raw_backing(dir.path());
    verify_mount(&top, &exp, &[]);
}

#[test]
fn chain_of_four_layers_with_internal_snapshots() {
    let dir = workdir();
    let (top, exp) = images::chain4(dir.path());
    verify_mount(&top, &exp, &[]);
}

// ----- sizes ---------------------------------------------------------------------------------

/// A snapshot taken before `qemu-img resize` keeps the old size (st_size 32 MiB); one taken after
/// has the new size.
#[test]
fn snapshot_before_resize_keeps_old_size() {
    let dir = workdir();
    let img = dir.path().join("grow.qcow2");
    create_qcow2(&img, 32 * MIB, "", None);
    fill(&img, 64 * KIB, 32 * MIB, 1, None);
    snapshot_create(&img, "small");
    qemu_img(&[
        "resize",
        "-q",
        img.to_str().unwrap(),
        &(64 * MIB).to_string(),
    ]);
    fill(&img, 64 * KIB, 64 * MIB, 2, None);
    snapshot_create(&img, "big");
    fill(&img, 64 * KIB, 64 * MIB, 3, None);
    let exp: Expected = vec![
        ("live.raw".into(), View::live(&img)),
        ("snapshots/small.raw".into(), View::internal(&img, "small")),
        ("snapshots/big.raw".into(), View::internal(&img, "big")),
    ];
    // the oracle itself: the old snapshot is 32 MiB
    let small = View::internal(&img, "small").oracle_raw();
    assert_eq!(
        fs::metadata(&small).unwrap().len(),
        32 * MIB,
        "oracle sanity"
    );
    verify_mount(&img, &exp, &[]);
}

// ----- naming --------------------------------------------------------------------------------

/// Writes a distinct marker (pattern `pat` at `i` MiB and at offset 0) and takes a snapshot.
fn marked_snapshot(img: &std::path::Path, i: u64, pat: u8, tag: &str) {
    qemu_io_s(
        img,
        &[
            format!("write -P {pat:#04x} 0 64k"),
            format!("write -P {pat:#04x} {} 64k", i * MIB),
        ],
    );
    snapshot_create(img, tag);
}

/// Tags that cannot be file names: empty (id 1), containing '/' (id 2), duplicated (ids 3, 4),
/// "." (5) and ".." (6) all get `id-ID.raw`; "ok" (7) keeps its tag; the valid tag "id-2" (8)
/// clashes with the name given to snapshot 2, so one of the two gets a `~N` suffix.
#[test]
fn renamed_snapshot_tags() {
    let dir = workdir();
    let img = dir.path().join("tags.qcow2");
    create_qcow2(&img, 16 * MIB, "", None);
    let tags = ["", "a/b", "dup", "dup", ".", "..", "ok", "id-2"];
    for (i, tag) in tags.iter().enumerate() {
        marked_snapshot(&img, i as u64 + 1, 0x20 + i as u8, tag);
    }
    qemu_io(&img, &["write -P 0x7e 0 64k"]);
    let ids: Vec<String> = snapshots(&img).into_iter().map(|s| s.id).collect();
    assert_eq!(
        ids,
        ["1", "2", "3", "4", "5", "6", "7", "8"],
        "qemu-img assigned ids"
    );

    let fixed: Expected = vec![
        ("live.raw".into(), View::live(&img)),
        ("snapshots/id-1.raw".into(), View::internal_id(&img, "1")),
        ("snapshots/id-3.raw".into(), View::internal_id(&img, "3")),
        ("snapshots/id-4.raw".into(), View::internal_id(&img, "4")),
        ("snapshots/id-5.raw".into(), View::internal_id(&img, "5")),
        ("snapshots/id-6.raw".into(), View::internal_id(&img, "6")),
        ("snapshots/ok.raw".into(), View::internal_id(&img, "7")),
    ];
    let fixed = oracles(&fixed);
    let pair: Vec<(View, PathBuf)> = ["2", "8"]
        .iter()
        .map(|id| {
            let v = View::internal_id(&img, id);
            let o = v.oracle_raw();
            (v, o)
        })
        .collect();

    let mut problems = Vec::new();
    {
        let m = Mount::new(&img);
        let names = m.snapshot_names();
        let mut rest: BTreeSet<String> = names.clone();
        for (n, _, _) in &fixed {
            if let Some(s) = n.strip_prefix("snapshots/") {
                if !rest.remove(s) {
                    problems.push(format!("missing snapshots/{s}"));
                }
            }
        }
        if !rest.remove("id-2.raw") {
            problems.push("missing snapshots/id-2.raw".into());
        }
        let suffixed: Vec<String> = rest
            .iter()
            .filter(|n| {
                n.strip_prefix("id-2~")
                    .and_then(|t| t.strip_suffix(".raw"))
                    .map(|d| !d.is_empty() && d.bytes().all(|c| c.is_ascii_digit()))
                    .unwrap_or(false)
            })
            .cloned()
            .collect();
        if suffixed.len() != 1 {
            problems.push(format!(
                "expected exactly one id-2~N.raw for the clash, got {suffixed:?}"
            ));
        }
        for s in &suffixed {
            rest.remove(s);
        }
        if !rest.is_empty() {
            problems.push(format!(
                "unexpected names in snapshots/: {rest:?} (all: {names:?})"
            ));
        }
        for (n, v, o) in &fixed {
            problems.extend(check_view_file(&m.path().join(n), v, o));
        }
        if suffixed.len() == 1 {
            let files = vec![m.snapshot("id-2.raw"), m.snapshot(&suffixed[0])];
            problems.extend(match_by_content(&files, &pair));
        }
    }
    assert!(
        problems.is_empty(),
        "problems:\n- {}",
        problems.join("\n- ")
    );
}

/// qemu-img accepts tags of up to 255 bytes; `TAG.raw` would then exceed NAME_MAX (255), so it
/// is not a valid file name and the snapshot must appear as `id-ID.raw`.
#[test]
fn tag_too_long_for_a_file_name() {
    let dir = workdir();
    let img = dir.path().join("long.qcow2");
    create_qcow2(&img, 16 * MIB, "", None);
    let long = "x".repeat(253);
    marked_snapshot(&img, 1, 0x31, "short");
    marked_snapshot(&img, 2, 0x32, &long);
    let snaps = snapshots(&img);
    assert_eq!(snaps[1].name, long, "qemu-img kept the long tag");
    let exp: Expected = vec![
        ("live.raw".into(), View::live(&img)),
        ("snapshots/short.raw".into(), View::internal_id(&img, "1")),
        ("snapshots/id-2.raw".into(), View::internal_id(&img, "2")),
    ];
    verify_mount(&img, &exp, &[]);
}

/// Three views that all want the name `disk.raw`: layer `d1/disk.qcow2`, layer `d2/disk.qcow2`
/// and the top's internal snapshot tagged `disk`. One keeps `disk.raw`, the other two get
/// `disk~N.raw`; each file must still show the right view.
#[test]
fn layer_and_tag_name_clashes() {
    let dir = workdir();
    let d1 = dir.path().join("d1");
    let d2 = dir.path().join("d2");
    fs::create_dir_all(&d1).unwrap();
    fs::create_dir_all(&d2).unwrap();
    let l1 = d1.join("disk.qcow2");
    let l2 = d2.join("disk.qcow2");
    let top = dir.path().join("top.qcow2");
    create_qcow2(&l1, 32 * MIB, "", None);
    fill(&l1, 64 * KIB, 32 * MIB, 1, None);
    create_qcow2(&l2, 32 * MIB, "", Some(("../d1/disk.qcow2", "qcow2")));
    fill(&l2, 64 * KIB, 32 * MIB, 2, None);
    create_qcow2(&top, 32 * MIB, "", Some(("d2/disk.qcow2", "qcow2")));
    fill(&top, 64 * KIB, 32 * MIB, 3, None);
    snapshot_create(&top, "disk");
    fill(&top, 64 * KIB, 32 * MIB, 4, None);

    let live = vec![("live.raw".to_string(), View::live(&top))];
    let live = oracles(&live);
    let group: Vec<(View, PathBuf)> = [
        View::layer(&l1),
        View::layer(&l2),
        View::internal(&top, "disk"),
    ]
    .into_iter()
    .map(|v| {
        let o = v.oracle_raw();
        (v, o)
    })
    .collect();
    let mut problems = Vec::new();
    {
        let m = Mount::new(&top);
        let names = m.snapshot_names();
        let ok_name = |n: &str| {
            n == "disk.raw"
                || n.strip_prefix("disk~")
                    .and_then(|t| t.strip_suffix(".raw"))
                    .map(|d| !d.is_empty() && d.bytes().all(|c| c.is_ascii_digit()))
                    .unwrap_or(false)
        };
        if !names.contains("disk.raw") || names.len() != 3 || !names.iter().all(|n| ok_name(n)) {
            problems.push(format!(
                "expected disk.raw and two disk~N.raw in snapshots/, got {names:?}"
            ));
        }
        for (n, v, o) in &live {
            problems.extend(check_view_file(&m.path().join(n), v, o));
        }
        let files: Vec<PathBuf> = names.iter().map(|n| m.snapshot(n)).collect();
        problems.extend(match_by_content(&files, &group));
    }
    assert!(
        problems.is_empty(),
        "problems:\n- {}",
        problems.join("\n- ")
    );
}

// ----- mount modes and options ---------------------------------------------------------------

/// `snapfs mount` without -f returns once the mount is ready; `snapfs umount` unmounts it and the
/// daemon exits.
#[test]
fn background_mount_and_snapfs_umount() {
    let dir = workdir();
    let (top, exp) = images::simple(dir.path(), "bg", 32 * MIB, 64 * KIB, "", &["a"], None);
    let with = oracles(&exp);
    let mut m = Mount::background(&top, &[]);
    let mut problems = Vec::new();
    for (n, v, o) in &with {
        problems.extend(check_view_file(&m.path().join(n), v, o));
    }
    let (out, _) = m.snapfs_umount();
    match out.status {
        Some(s) if s.success() => {}
        other => problems.push(format!(
            "snapfs umount: status {other:?}, stderr {:?}",
            out.stderr
        )),
    }
    if is_mounted(m.path()) {
        problems.push("still mounted after snapfs umount".into());
    }
    if !m.wait_daemon_exit(Duration::from_secs(10)) {
        problems.push("the background daemon did not exit within 10 s of snapfs umount".into());
    }
    assert!(
        problems.is_empty(),
        "problems:\n- {}",
        problems.join("\n- ")
    );
}

/// A foreground server exits with status 0 after `snapfs umount`.
#[test]
fn foreground_server_exits_after_umount() {
    let dir = workdir();
    let (top, _) = images::simple(dir.path(), "fg", 16 * MIB, 64 * KIB, "", &[], None);
    let mut m = Mount::new(&top);
    let (out, status) = m.snapfs_umount();
    assert_eq!(
        out.status.map(|s| s.success()),
        Some(true),
        "snapfs umount failed: {}",
        out.stderr
    );
    assert!(!is_mounted(m.path()), "still mounted after snapfs umount");
    match status {
        Some(s) => assert!(s.success(), "server exited with {s}: {}", m.stderr_text()),
        None => panic!("server still running 20 s after snapfs umount"),
    }
}

/// Plain `umount MP` also works (the server exits).
#[test]
fn plain_umount_works() {
    let dir = workdir();
    let (top, _) = images::simple(dir.path(), "pu", 16 * MIB, 64 * KIB, "", &[], None);
    let m = Mount::new(&top);
    let out = run_timeout(
        std::process::Command::new("umount").arg(m.path()),
        Duration::from_secs(20),
    );
    assert_eq!(
        out.status.map(|s| s.success()),
        Some(true),
        "umount: {}",
        out.stderr
    );
    assert!(!is_mounted(m.path()));
}

/// `-r`: live.raw cannot be written and the image file is not modified by the mount.
#[test]
fn read_only_flag_refuses_writes_and_leaves_image_untouched() {
    let dir = workdir();
    let (top, exp) = images::simple(dir.path(), "ro", 32 * MIB, 64 * KIB, "", &["a"], None);
    let with = oracles(&exp);
    let before = read_all(&top);
    let mut problems = Vec::new();
    {
        let m = Mount::with_args(&top, &["-r"]);
        for (n, v, o) in &with {
            problems.extend(check_view_file(&m.path().join(n), v, o));
        }
        match OpenOptions::new().write(true).open(m.live()) {
            Err(_) => {}
            Ok(f) => {
                let r = f.write_at(b"must not land", 0).and_then(|_| f.sync_all());
                if r.is_ok() {
                    problems.push("writing live.raw of a -r mount succeeded".into());
                }
            }
        }
    }
    if read_all(&top) != before {
        problems.push("the image file changed during a read-only mount".into());
    }
    assert!(
        problems.is_empty(),
        "problems:\n- {}",
        problems.join("\n- ")
    );
}

/// `-o cache=64M,threads=4` on the four-layer chain.
#[test]
fn mount_options_cache_and_threads() {
    let dir = workdir();
    let (top, exp) = images::chain4(dir.path());
    verify_mount(&top, &exp, &["-o", "cache=64M,threads=4"]);
}

/// A metadata cache far smaller than the L2 tables of a 512-byte-cluster image: every read must
/// still be right.
#[test]
fn tiny_cache_budget() {
    let dir = workdir();
    let (top, exp) = images::simple(
        dir.path(),
        "tiny",
        16 * MIB,
        512,
        "cluster_size=512",
        &["a"],
        None,
    );
    verify_mount(&top, &exp, &["--cache", "1M", "--threads", "2"]);
}

// ----- read patterns -------------------------------------------------------------------------

/// Several threads read the same views at unaligned offsets and lengths (including reads that
/// cross the end of the file and reads past it); every byte must match the oracle.
#[test]
fn parallel_unaligned_reads() {
    let dir = workdir();
    let (top, exp) = images::chain4(dir.path());
    let with = oracles(&exp);
    let m = Mount::with_args(&top, &["-o", "threads=4"]);
    let mut handles = Vec::new();
    for t in 0..4u64 {
        let jobs: Vec<(PathBuf, PathBuf)> = with
            .iter()
            .map(|(n, _, o)| (m.path().join(n), o.clone()))
            .collect();
        handles.push(std::thread::spawn(move || -> Vec<String> {
            let mut problems = Vec::new();
            let mut x: u64 = 0x9e3779b97f4a7c15 ^ (t + 1);
            let mut next = || {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x
            };
            for (file, oracle) in &jobs {
                let f = File::open(file).unwrap();
                let o = File::open(oracle).unwrap();
                let size = o.metadata().unwrap().len();
                for i in 0..150 {
                    let off = match i {
                        0 => size - 100,
                        1 => size,
                        2 => size + 4096,
                        _ => next() % size,
                    };
                    let len = (next() % (300 * 1024)) as usize + 1;
                    let mut a = vec![0u8; len];
                    let mut b = vec![0u8; len];
                    let na = read_at_full(&f, &mut a, off);
                    let nb = read_at_full(&o, &mut b, off).unwrap();
                    match na {
                        Err(e) => {
                            problems.push(format!("{}: pread({off}, {len}): {e}", file.display()))
                        }
                        Ok(na) if na != nb || a[..na] != b[..nb] => problems.push(format!(
                            "{}: pread({off:#x}, {len}) gave {na} bytes, oracle {nb}, equal: {}",
                            file.display(),
                            a[..na.min(nb)] == b[..na.min(nb)]
                        )),
                        Ok(_) => {}
                    }
                    if problems.len() > 10 {
                        return problems;
                    }
                }
            }
            problems
        }));
    }
    let mut problems = Vec::new();
    for h in handles {
        problems.extend(h.join().expect("reader thread panicked"));
    }
    drop(m);
    assert!(
        problems.is_empty(),
        "problems:\n- {}",
        problems.join("\n- ")
    );
}

fn read_at_full(f: &File, buf: &mut [u8], off: u64) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read_at(&mut buf[n..], off + n as u64) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

// ----- more chain shapes ---------------------------------------------------------------------

/// An overlay smaller than its backing file: live.raw has the overlay's size, the layer view the
/// backing file's.
#[test]
fn overlay_smaller_than_backing() {
    let dir = workdir();
    let base = dir.path().join("big-base.qcow2");
    let top = dir.path().join("small-top.qcow2");
    create_qcow2(&base, 64 * MIB, "", None);
    fill(&base, 64 * KIB, 64 * MIB, 1, None);
    create_qcow2(&top, 16 * MIB, "", Some(("big-base.qcow2", "qcow2")));
    fill(&top, 64 * KIB, 16 * MIB, 2, None);
    let exp: Expected = vec![
        ("live.raw".into(), View::live(&top)),
        ("snapshots/big-base.raw".into(), View::layer(&base)),
    ];
    verify_mount(&top, &exp, &[]);
}

/// Backing names written as absolute paths.
#[test]
fn absolute_backing_path() {
    let dir = workdir();
    let sub = dir.path().join("elsewhere");
    fs::create_dir(&sub).unwrap();
    let base = sub.join("golden.qcow2");
    let top = dir.path().join("vm.qcow2");
    create_qcow2(&base, 32 * MIB, "", None);
    fill(&base, 64 * KIB, 32 * MIB, 1, None);
    create_qcow2(&top, 32 * MIB, "", Some((base.to_str().unwrap(), "qcow2")));
    fill(&top, 64 * KIB, 32 * MIB, 2, None);
    snapshot_create(&top, "s");
    let exp: Expected = vec![
        ("live.raw".into(), View::live(&top)),
        ("snapshots/s.raw".into(), View::internal(&top, "s")),
        ("snapshots/golden.raw".into(), View::layer(&base)),
    ];
    verify_mount(&top, &exp, &[]);
}

/// Replaces the backing-format header extension of `img` by an unknown extension type, so the
/// backing file's format must be probed (qcow2 magic, else raw); also checks that an unknown
/// extension is tolerated.
fn drop_backing_format_extension(img: &std::path::Path) {
    let hl = read_be_u32(img, 100) as u64;
    assert_eq!(
        read_be_u32(img, hl),
        0xe279_2aca,
        "backing format extension first"
    );
    write_be_u32(img, hl, 0x1234_5678);
}

/// raw `disk.img` <- `mid.qcow2` <- `top.qcow2`, neither overlay naming its backing format.
#[test]
fn backing_format_probed_without_extension() {
    let dir = workdir();
    let raw = dir.path().join("disk.img");
    let f = File::create(&raw).unwrap();
    f.set_len(16 * MIB).unwrap();
    drop(f);
    images::fill_no_zeros(&raw, 64 * KIB, 16 * MIB, 1);
    let mid = dir.path().join("mid.qcow2");
    let top = dir.path().join("top.qcow2");
    create_qcow2(&mid, 32 * MIB, "", Some(("disk.img", "raw")));
    fill(&mid, 64 * KIB, 32 * MIB, 2, None);
    create_qcow2(&top, 32 * MIB, "", Some(("mid.qcow2", "qcow2")));
    fill(&top, 64 * KIB, 32 * MIB, 3, None);
    drop_backing_format_extension(&mid);
    drop_backing_format_extension(&top);
    let info = qemu_img(&["info", "--backing-chain", top.to_str().unwrap()]);
    assert!(
        !info.contains("backing file format"),
        "oracle sanity: {info}"
    );
    let exp: Expected = vec![
        ("live.raw".into(), View::live(&top)),
        ("snapshots/mid.raw".into(), View::layer(&mid)),
        ("snapshots/disk.raw".into(), View::layer(&raw)),
    ];
    verify_mount(&top, &exp, &[]);
}

/// 16 layers, each writing its own 64 KiB and zeroing part of the layer below's.
#[test]
fn deep_chain_of_16_layers() {
    let dir = workdir();
    let mut exp: Expected = Vec::new();
    let mut prev: Option<String> = None;
    let mut path = PathBuf::new();
    for i in 0..16u64 {
        let name = format!("l{i:02}.qcow2");
        path = dir.path().join(&name);
        create_qcow2(&path, 16 * MIB, "", prev.as_deref().map(|p| (p, "qcow2")));
        let mut cmds = vec![format!("write -P {:#04x} {} 64k", 0x40 + i, i * MIB)];
        if i > 0 && i % 2 == 0 {
            cmds.push(format!("write -z {} 32k", (i - 1) * MIB));
        }
        if i % 3 == 0 {
            cmds.push(format!(
                "write -P {:#04x} {} 4k",
                0x80 + i,
                16 * MIB - 4 * KIB
            ));
        }
        qemu_io_s(&path, &cmds);
        if i < 15 {
            exp.push((format!("snapshots/l{i:02}.raw"), View::layer(&path)));
        }
        prev = Some(name);
    }
    exp.push(("live.raw".into(), View::live(&path)));
    verify_mount(&path, &exp, &[]);
}

/// A 2 TiB disk with data near 0, 1 TiB and the end: sizes, the data ranges and sampled reads
/// (the whole view is far too big to read).
#[test]
fn huge_sparse_disk_2t() {
    let dir = workdir();
    let img = dir.path().join("huge.qcow2");
    let size = 2 * 1024 * GIB;
    create_qcow2(&img, size, "", None);
    qemu_io_s(
        &img,
        &[
            "write -P 0x11 0 1M".to_string(),
            format!("write -P 0x22 {} 1024", 1024 * GIB + 64 * KIB - 512),
            format!("write -P 0x33 {} 1M", size - MIB),
        ],
    );
    snapshot_create(&img, "s");
    qemu_io_s(&img, &[format!("write -P 0x44 {} 64k", 1536 * GIB)]);
    let views = [
        ("live.raw", View::live(&img)),
        ("snapshots/s.raw", View::internal(&img, "s")),
    ];
    let mut problems = Vec::new();
    let prepared: Vec<(String, PathBuf, Ranges)> = views
        .iter()
        .map(|(n, v)| (n.to_string(), v.oracle_raw(), v.oracle_data()))
        .collect();
    {
        let m = Mount::new(&img);
        for (name, oracle, data) in &prepared {
            let file = m.path().join(name);
            let got = fs::metadata(&file).map(|md| md.len());
            if got.as_ref().ok() != Some(&size) {
                problems.push(format!("{name}: size {got:?}, want {size}"));
                continue;
            }
            let f = File::open(&file).unwrap();
            let o = File::open(oracle).unwrap();
            let mut spots: Vec<(u64, usize)> = data
                .iter()
                .map(|&(s, e)| (s.saturating_sub(64 * KIB), (e - s + 128 * KIB) as usize))
                .collect();
            let mut x: u64 = 0x1234_5678_9abc_def1;
            for _ in 0..64 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                spots.push((x % size, 64 * 1024));
            }
            spots.push((size - 3 * MIB, 3 * MIB as usize));
            for (off, len) in spots {
                let mut a = vec![0u8; len];
                let mut b = vec![0u8; len];
                let na = read_at_full(&f, &mut a, off);
                let nb = read_at_full(&o, &mut b, off).unwrap();
                match na {
                    Ok(na) if na == nb && a[..na] == b[..nb] => {}
                    other => problems.push(format!(
                        "{name}: read at {off:#x} len {len} differs from the oracle ({other:?} vs {nb})"
                    )),
                }
            }
            if let Some(d) = describe_ranges_diff(
                &format!("SEEK_DATA on {name}"),
                &seek_data_ranges(&file),
                "qemu-img map",
                data,
            ) {
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

// ----- mmap ----------------------------------------------------------------------------------

/// mmap (shared for snapshot files, which are page-cached; private for live.raw) gives the same
/// bytes as the oracle.
#[test]
fn mmap_reads_match() {
    let dir = workdir();
    let (top, exp) = images::chain4(dir.path());
    let with = oracles(&exp);
    let mut problems = Vec::new();
    {
        let m = Mount::new(&top);
        for (name, view, oracle) in &with {
            let file = m.path().join(name);
            let f = File::open(&file).unwrap();
            let len = f.metadata().unwrap().len() as usize;
            let flags = if matches!(view, View::Live { .. }) {
                libc::MAP_PRIVATE
            } else {
                libc::MAP_SHARED
            };
            let map = match Mapped::new(&f, len, flags) {
                Ok(m) => m,
                Err(e) => {
                    problems.push(format!("mmap {name}: {e}"));
                    continue;
                }
            };
            let mapped = map.bytes();
            let o = File::open(oracle).unwrap();
            let mut buf = vec![0u8; 1 << 20];
            let mut off = 0usize;
            while off < len {
                let n = (len - off).min(buf.len());
                o.read_exact_at(&mut buf[..n], off as u64).unwrap();
                if mapped[off..off + n] != buf[..n] {
                    let i = (0..n).find(|&i| mapped[off + i] != buf[i]).unwrap();
                    problems.push(format!(
                        "mmap {name}: differs from the oracle at {:#x}",
                        off + i
                    ));
                    break;
                }
                off += n;
            }
        }
    }
    assert!(
        problems.is_empty(),
        "problems:\n- {}",
        problems.join("\n- ")
    );
}

// ----- locks and read-only -------------------------------------------------------------------

/// While snapfs has an image mounted read-write, qemu-io cannot open it for writing (QEMU's own
/// image locks); after unmounting it can.
#[test]
fn rw_mount_locks_out_qemu_writers() {
    let dir = workdir();
    let (top, _) = images::simple(dir.path(), "locked", 16 * MIB, 64 * KIB, "", &[], None);
    {
        let _m = Mount::new(&top);
        let r = run_timeout(
            std::process::Command::new("qemu-io")
                .args(["-f", "qcow2", "-c", "write -P 0x99 0 512"])
                .arg(&top),
            Duration::from_secs(30),
        );
        assert_ne!(
            r.status.map(|s| s.success()),
            Some(true),
            "qemu-io wrote to an image that snapfs has mounted read-write:\n{}",
            r.stdout
        );
    }
    qemu_io(&top, &["write -P 0x99 0 512"]);
}

/// While qemu-io holds the image open for writing, a read-write mount is either refused (one
/// line on stderr, no panic) or comes up with live.raw refusing writes.
#[test]
fn mount_while_qemu_writes_the_image() {
    let dir = workdir();
    let (top, _) = images::simple(dir.path(), "busy", 16 * MIB, 64 * KIB, "", &[], None);
    let mut holder = std::process::Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", "sleep 20000"])
        .arg(&top)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start qemu-io");
    std::thread::sleep(Duration::from_millis(1500));
    let mut problems = Vec::new();
    let mpdir = tempfile::Builder::new()
        .prefix("snapfs-busy-")
        .tempdir()
        .unwrap();
    let mp = mpdir.path().join("mnt");
    fs::create_dir(&mp).unwrap();
    let out = run_timeout(
        snapfs_cmd().arg("mount").arg(&top).arg(&mp),
        Duration::from_secs(30),
    );
    match out.status {
        None => problems.push("snapfs mount did not return within 30 s".into()),
        Some(s) if !s.success() => {
            let err = out.stderr.strip_suffix('\n').unwrap_or(&out.stderr);
            if err.is_empty() || err.contains('\n') || err.contains("panicked") {
                problems.push(format!(
                    "refused mount: want one stderr line, got {:?}",
                    out.stderr
                ));
            }
        }
        Some(_) => match OpenOptions::new().write(true).open(mp.join("live.raw")) {
            Err(_) => {}
            Ok(f) => {
                if f.write_at(b"clash", 0).and_then(|_| f.sync_all()).is_ok() {
                    problems.push(
                        "snapfs wrote live.raw of an image that qemu-io holds open for writing"
                            .into(),
                    );
                }
            }
        },
    }
    if !force_unmount(&mp) {
        let _ = mpdir.keep();
    }
    let _ = holder.kill();
    let _ = holder.wait();
    assert!(
        problems.is_empty(),
        "problems:\n- {}",
        problems.join("\n- ")
    );
}

/// `-o ro` (as mount(8) passes it) is the same as -r.
#[test]
fn o_ro_option_is_read_only() {
    let dir = workdir();
    let (top, exp) = images::simple(dir.path(), "oro", 16 * MIB, 64 * KIB, "", &["a"], None);
    let with = oracles(&exp);
    let before = read_all(&top);
    let mut problems = Vec::new();
    {
        let m = Mount::with_args(&top, &["-o", "ro"]);
        for (n, v, o) in &with {
            problems.extend(check_view_file(&m.path().join(n), v, o));
        }
        if let Ok(f) = OpenOptions::new().write(true).open(m.live()) {
            if f.write_at(b"must not land", 0)
                .and_then(|_| f.sync_all())
                .is_ok()
            {
                problems.push("writing live.raw of an -o ro mount succeeded".into());
            }
        }
    }
    if read_all(&top) != before {
        problems.push("the image file changed during an -o ro mount".into());
    }
    assert!(
        problems.is_empty(),
        "problems:\n- {}",
        problems.join("\n- ")
    );
}

/// Rewrites the snapshot table of `img` in place with no extra data in any entry (as QEMU before
/// 1.x wrote v2 images): the snapshots then have no recorded disk size and take the image's.
fn strip_snapshot_extra_data(img: &std::path::Path) {
    let entries = snapshot_entry_offsets(img);
    let start = read_be_u64(img, 64);
    let f = File::open(img).unwrap();
    let mut table = Vec::new();
    let mut old_end = start;
    for e in entries {
        let mut head = [0u8; 40];
        f.read_exact_at(&mut head, e).unwrap();
        let id_len = u16::from_be_bytes([head[12], head[13]]) as usize;
        let name_len = u16::from_be_bytes([head[14], head[15]]) as usize;
        let extra = u32::from_be_bytes([head[36], head[37], head[38], head[39]]) as u64;
        let mut names = vec![0u8; id_len + name_len];
        f.read_exact_at(&mut names, e + 40 + extra).unwrap();
        old_end = e + (40 + extra + names.len() as u64).div_ceil(8) * 8;
        head[36..40].copy_from_slice(&0u32.to_be_bytes());
        table.extend_from_slice(&head);
        table.extend_from_slice(&names);
        while table.len() % 8 != 0 {
            table.push(0);
        }
    }
    table.resize((old_end - start) as usize, 0);
    write_bytes_at(img, start, &table);
}

/// A v2 image whose snapshot entries carry no extra data (old QEMU).
#[test]
fn v2_snapshots_without_extra_data() {
    let dir = workdir();
    let (img, exp) = images::simple(
        dir.path(),
        "oldv2",
        32 * MIB,
        64 * KIB,
        "compat=0.10",
        &["a", "b"],
        None,
    );
    strip_snapshot_extra_data(&img);
    for e in snapshot_entry_offsets(&img) {
        assert_eq!(read_be_u32(&img, e + 36), 0, "oracle sanity: no extra data");
    }
    assert_eq!(
        snapshots(&img).len(),
        2,
        "oracle sanity: qemu-img still lists both"
    );
    qemu_img_check(&img).unwrap();
    verify_mount(&img, &exp, &[]);
}
