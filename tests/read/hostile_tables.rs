//! Hostile L1 and L2 tables, compressed descriptors and extended-L2 bitmaps (docs/design.md section 5,
//! shared/reference/bad-inputs.md): qemu-img-made images with one entry damaged on purpose.
//!
//! What snapfs does, entry by entry (and why):
//! - an entry that cannot be right — an L1 or L2 offset that is not cluster-aligned (including
//!   offsets inside cluster 0, the header), compressed data starting in the header, compressed data
//!   that is garbage, truncated or past the end of the file, an extended-L2 subcluster marked both
//!   allocated and zero, allocated subclusters without a host offset — makes the reads of the range
//!   it maps fail with EIO and a logged reason. The image still mounts and every other range reads
//!   as `qemu-img convert` of the undamaged image says. QEMU fails those reads with EIO too.
//! - an entry QEMU reads without complaint is read the same way, checked against `qemu-img convert`
//!   of the damaged image: reserved bits are ignored, COPIED without an offset is unallocated, and
//!   an L2 table or data cluster past the end of the file reads as zeros (so an L1 entry past EOF
//!   makes its whole range unallocated: the backing file shows through).
//!
//! - L1 entries sharing one L2 table are refused at open (a small file would otherwise describe a
//!   huge disk that every whole-disk walk — st_blocks, SEEK_DATA — must step through); a damaged
//!   refcount table refuses read-write mounts only (reads never use refcounts).
//!
//! Every case is mounted read-only (`-r`) and read-write; neither may change a byte of the file.

use std::path::{Path, PathBuf};

use crate::common::hostile_support::*;
use crate::common::*;

/// 4 KiB clusters: one L2 table covers 2 MiB, so the 8 MiB disk has four L1 entries.
const CS: u64 = 4096;
const SIZE: u64 = 8 * MIB;
const COVERAGE: u64 = 2 * MIB;

/// Writes a different pattern into each MiB (the last one stays unallocated) and a zero range.
fn fill(img: &Path) {
    let mut cmds: Vec<String> = (0..7u64)
        .map(|i| format!("write -P {:#x} {}M 1M", 0x11 + i * 0x11, i))
        .collect();
    cmds.push(format!("write -z {} 64k", 5 * MIB + 64 * KIB));
    qemu_io_s(img, &cmds);
}

fn base(dir: &Path, name: &str) -> PathBuf {
    let img = dir.join(name);
    create_qcow2(&img, SIZE, "cluster_size=4096", None);
    fill(&img);
    img
}

fn live<'a>(oracle: &'a Path, bad: &'a [(u64, u64)]) -> Vec<Expect<'a>> {
    vec![Expect {
        file: "live.raw",
        oracle,
        bad,
    }]
}

// ---------------------------------------------------------------------------------------------
// L1 entries
// ---------------------------------------------------------------------------------------------

/// An L1 entry whose L2 offset is not cluster-aligned: the 2 MiB it covers fail, the rest reads.
#[test]

fn l1_entry_unaligned() {
    let dir = workdir();
    let img = base(dir.path(), "l1-unaligned.qcow2");
    let oracle = convert_to_raw(&img, None);
    let layout = Layout::read(&img);
    let entry = layout.l1_entry(COVERAGE);
    layout.set_u64(layout.l1_entry_at(COVERAGE), entry + 0x200);
    let bad = [(COVERAGE, COVERAGE)];
    assert_no_problems(&mounts_with_eio(
        "L1 entry unaligned",
        &img,
        &live(&oracle, &bad),
        256 * KIB,
        "not aligned",
    ));
}

/// L1 entries pointing into cluster 0 (the header). Only offset 0 is aligned there, and 0 means "no
/// L2 table"; any other value inside the header is unaligned: EIO, like QEMU.
#[test]

fn l1_entry_pointing_at_the_header() {
    let dir = workdir();
    let img = base(dir.path(), "l1-header.qcow2");
    let oracle = convert_to_raw(&img, None);
    let layout = Layout::read(&img);
    layout.set_u64(layout.l1_entry_at(0), COPIED | 0x200);
    let bad = [(0, COVERAGE)];
    assert_no_problems(&mounts_with_eio(
        "L1 entry -> header",
        &img,
        &live(&oracle, &bad),
        256 * KIB,
        "L1 entry 0",
    ));
}

/// An L1 entry pointing past the end of the file. QEMU reads the L2 table there as zeros, so the
/// range is unallocated and the backing file shows through; snapfs does the same. Checked against
/// `qemu-img convert` of the damaged image, over a backing file so that "unallocated" is visible.
#[test]
fn l1_entry_past_end_of_file_reads_like_qemu() {
    let dir = workdir();
    let backing = base(dir.path(), "backing.qcow2");
    let img = dir.path().join("l1-past-eof.qcow2");
    create_qcow2(
        &img,
        SIZE,
        "cluster_size=4096",
        Some(("backing.qcow2", "qcow2")),
    );
    qemu_io(&img, &["write -P 0xa1 1M 2M", "write -P 0xa2 6M 512k"]);
    let layout = Layout::read(&img);
    let past = (layout.file_len() + 64 * MIB).next_multiple_of(CS);
    layout.set_u64(layout.l1_entry_at(COVERAGE), COPIED | past);
    // One L1 entry at the very end of what offsets can say (2^56 - cluster).
    layout.set_u64(layout.l1_entry_at(3 * COVERAGE), OFFSET_MASK & !(CS - 1));
    let oracle = convert_to_raw(&img, None);
    // The oracle itself shows the backing file in the damaged ranges.
    let want_backing = convert_to_raw(&backing, None);
    assert_eq!(
        read_range(&oracle, COVERAGE, COVERAGE),
        read_range(&want_backing, COVERAGE, COVERAGE),
        "test bug: qemu-img does not read an L1 entry past EOF as unallocated"
    );
    assert_no_problems(&mounts_with_eio(
        "L1 entry past EOF",
        &img,
        &live(&oracle, &[]),
        256 * KIB,
        "",
    ));
}

/// An L1 entry pointing at other metadata (the refcount table), read as an L2 table: whatever QEMU
/// makes of it, snapfs must make the same, or fail the range with EIO — and never write.
#[test]
fn l1_entry_pointing_at_the_refcount_table() {
    let dir = workdir();
    let img = base(dir.path(), "l1-reftable.qcow2");
    let layout = Layout::read(&img);
    layout.set_u64(
        layout.l1_entry_at(COVERAGE),
        COPIED | layout.refcount_table_offset,
    );
    let oracle = convert_to_raw(&img, None);
    assert_no_problems(&mounts_with_eio(
        "L1 entry -> refcount table",
        &img,
        &live(&oracle, &[]),
        256 * KIB,
        "",
    ));
}

/// Reserved bits in an L1 entry (0x7f000000000001ff) are ignored, as QEMU ignores them.
#[test]
fn l1_entry_reserved_bits_are_ignored() {
    let dir = workdir();
    let img = base(dir.path(), "l1-reserved.qcow2");
    let oracle = convert_to_raw(&img, None);
    let layout = Layout::read(&img);
    let at = layout.l1_entry_at(0);
    layout.set_u64(at, layout.l1_entry(0) | 0x7f00_0000_0000_01ff);
    let qemu = convert_to_raw(&img, None);
    assert_files_equal(&qemu, &oracle);
    assert_no_problems(&mounts_with_eio(
        "L1 reserved bits",
        &img,
        &live(&oracle, &[]),
        256 * KIB,
        "",
    ));
}

// ---------------------------------------------------------------------------------------------
// L2 entries
// ---------------------------------------------------------------------------------------------

/// L2 entries whose data offset is not cluster-aligned, with and without the zero flag, and one
/// pointing into the header: that cluster fails (QEMU: "Cluster allocation offset ... unaligned",
/// EIO), its neighbours read.
#[test]

fn l2_entry_unaligned() {
    let dir = workdir();
    let img = base(dir.path(), "l2-unaligned.qcow2");
    let oracle = convert_to_raw(&img, None);
    let layout = Layout::read(&img);
    let a = 3 * MIB + 5 * CS;
    let b = 4 * MIB + 9 * CS;
    let c = 6 * MIB + 2 * CS;
    layout.set_u64(layout.l2_entry_at(a), layout.l2_entry(a) + 0x200);
    layout.set_u64(layout.l2_entry_at(b), (layout.l2_entry(b) + 0x400) | 1);
    // Into cluster 0, the header (the only aligned offset there, 0, means unallocated).
    layout.set_u64(layout.l2_entry_at(c), COPIED | 0x200);
    let bad = [(a, CS), (b, CS), (c, CS)];
    assert_no_problems(&mounts_with_eio(
        "L2 entry unaligned",
        &img,
        &live(&oracle, &bad),
        CS,
        "not aligned",
    ));
}

/// L2 entries with reserved bits (0x3f000000000001fe) read as QEMU reads them: the bits are
/// ignored. COPIED without an offset is an unallocated cluster (QEMU: "unallocated plain").
#[test]
fn l2_entry_reserved_bits_and_bare_copied_flag() {
    let dir = workdir();
    let img = base(dir.path(), "l2-reserved.qcow2");
    let layout = Layout::read(&img);
    let a = 2 * CS;
    let b = MIB + 3 * CS;
    layout.set_u64(
        layout.l2_entry_at(a),
        layout.l2_entry(a) | 0x3f00_0000_0000_01fe,
    );
    layout.set_u64(layout.l2_entry_at(b), COPIED);
    let oracle = convert_to_raw(&img, None);
    assert!(
        read_range(&oracle, b, CS).iter().all(|&x| x == 0),
        "test bug: qemu-img does not read a bare COPIED entry as unallocated"
    );
    assert_no_problems(&mounts_with_eio(
        "L2 reserved bits",
        &img,
        &live(&oracle, &[]),
        256 * KIB,
        "",
    ));
}

/// A data cluster past the end of the file reads as zeros, in QEMU as in snapfs.
#[test]
fn l2_entry_past_end_of_file_reads_like_qemu() {
    let dir = workdir();
    let img = base(dir.path(), "l2-past-eof.qcow2");
    let layout = Layout::read(&img);
    let a = 6 * MIB + 7 * CS;
    let past = (layout.file_len() + 100 * MIB).next_multiple_of(CS);
    layout.set_u64(layout.l2_entry_at(a), COPIED | past);
    let oracle = convert_to_raw(&img, None);
    assert!(read_range(&oracle, a, CS).iter().all(|&x| x == 0));
    assert_no_problems(&mounts_with_eio(
        "L2 entry past EOF",
        &img,
        &live(&oracle, &[]),
        256 * KIB,
        "",
    ));
}

// ---------------------------------------------------------------------------------------------
// Compressed clusters
// ---------------------------------------------------------------------------------------------

/// An 8 MiB image of 4 KiB clusters, all compressed (`qemu-img convert -c` of a raw file whose
/// data compresses to about half, so that every stream is longer than a sector).
fn compressed_base(dir: &Path, name: &str, opts: &str) -> (PathBuf, PathBuf) {
    let raw = dir.join(format!("{name}.raw"));
    let mut data = vec![0u8; SIZE as usize];
    let mut x: u32 = 0x1234_5678;
    for (i, b) in data.iter_mut().enumerate() {
        // 7 MiB of 4-bit noise, then zeros.
        if i < 7 * MIB as usize {
            x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
            *b = (x >> 24) as u8 & 0x0f;
        }
    }
    std::fs::write(&raw, &data).unwrap();
    let img = dir.join(name);
    qemu_img(&[
        "convert",
        "-c",
        "-f",
        "raw",
        "-O",
        "qcow2",
        "-o",
        opts,
        raw.to_str().unwrap(),
        img.to_str().unwrap(),
    ]);
    (img, raw)
}

/// Compressed descriptors that are damaged: pointing at garbage, a stream cut short (its sector
/// count lowered to one sector), data starting past the end of the file, data starting in the
/// header. Each damaged cluster fails with EIO; the other compressed clusters read.
#[test]

fn compressed_descriptors() {
    for (kind, opts) in [
        ("deflate", "cluster_size=4096"),
        ("zstd", "cluster_size=4096,compression_type=zstd"),
    ] {
        let dir = workdir();
        let (img, oracle) = compressed_base(dir.path(), &format!("{kind}.qcow2"), opts);
        let layout = Layout::read(&img);
        // Every stream spans more than a sector, so a one-sector descriptor truncates it.
        assert!(layout.compressed(MIB).1 > 1024, "test bug: short stream");
        let with_offset = |guest: u64, offset: u64| {
            let (_, _, x) = layout.compressed(guest);
            let entry = layout.l2_entry(guest) & !((1u64 << x) - 1);
            layout.set_u64(layout.l2_entry_at(guest), entry | offset);
        };
        // Garbage: 4 KiB of 0xa5 appended to the file.
        let garbage = 3 * CS;
        let end = layout.file_len();
        write_bytes_at(&img, end, &[0xa5; 4096]);
        with_offset(garbage, end + 7);
        // Cut: the descriptor keeps its offset but claims a single sector.
        let cut = MIB + 5 * CS;
        let (off, _, _) = layout.compressed(cut);
        let entry = layout.l2_entry(cut) & !((1u64 << 62) - 1);
        layout.set_u64(layout.l2_entry_at(cut), entry | off);
        // Data past the end of the file (the sector count keeps its value).
        let past = 2 * MIB + 2 * CS;
        with_offset(past, layout.file_len() + 10 * MIB + 123);
        // Data starting in the header.
        let header = 4 * MIB + 5 * CS;
        with_offset(header, 0x68);
        let bad = [(garbage, CS), (cut, CS), (past, CS), (header, CS)];
        assert_no_problems(&mounts_with_eio(
            &format!("compressed {kind}"),
            &img,
            &live(&oracle, &bad),
            CS,
            "compressed",
        ));
    }
}

// ---------------------------------------------------------------------------------------------
// Extended L2 entries
// ---------------------------------------------------------------------------------------------

/// Extended L2 bitmaps QEMU calls invalid: a subcluster both allocated and zero, and allocated
/// subclusters without a host offset. That cluster fails with EIO; the rest reads.
#[test]

fn extended_l2_invalid_bitmaps() {
    let dir = workdir();
    let img = dir.path().join("extl2.qcow2");
    // 32 KiB clusters, 1 KiB subclusters; 16 MiB disk = one L2 table (2048 entries x 32 KiB = 64 MiB).
    create_qcow2(&img, 16 * MIB, "cluster_size=32768,extended_l2=on", None);
    qemu_io(
        &img,
        &[
            "write -P 0x11 0 1M",
            "write -P 0x22 1M 3k",
            "write -z 1040k 2k",
            "write -P 0x33 4M 1M",
        ],
    );
    let oracle = convert_to_raw(&img, None);
    let layout = Layout::read(&img);
    let cs = layout.cluster_size();
    // Both bits for subcluster 3 of the cluster at 64 KiB.
    let a = 2 * cs;
    let bitmap_a = layout.l2_entry_at(a) + 8;
    let v = read_be_u64(&img, bitmap_a);
    write_be_u64(&img, bitmap_a, v | (1 << 3) | (1 << (32 + 3)));
    // Allocated bits with no host offset: a cluster of the unallocated middle.
    let b = 8 * MIB;
    let entry_b = layout.l2_entry_at(b);
    write_be_u64(&img, entry_b, 0);
    write_be_u64(&img, entry_b + 8, 0b101);
    let bad = [(a, cs), (b, cs)];
    assert_no_problems(&mounts_with_eio(
        "extended L2 bitmaps",
        &img,
        &live(&oracle, &bad),
        cs,
        "subcluster",
    ));
}

/// `len` bytes at `offset` of a plain file.
fn read_range(path: &Path, offset: u64, len: u64) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let mut buf = vec![0u8; len as usize];
    std::fs::File::open(path)
        .unwrap()
        .read_exact_at(&mut buf, offset)
        .unwrap();
    buf
}

// ---------------------------------------------------------------------------------------------
// Refcount table
// ---------------------------------------------------------------------------------------------

/// Refcount table entries that are unaligned or point at the header. Reads never use refcounts:
/// `snapfs info` works and a read-only mount reads everything. A read-write mount needs them to
/// allocate clusters: it is refused with one line naming the refcount table, or (if snapfs falls
/// back) mounts read-only. Either way the file is not written.
#[test]
fn refcount_table_entry_unaligned_or_at_the_header() {
    let mut problems = Vec::new();
    for (label, value) in [("unaligned", None), ("at the header", Some(0x200u64))] {
        let dir = workdir();
        let img = base(dir.path(), "reftable.qcow2");
        let oracle = convert_to_raw(&img, None);
        let layout = Layout::read(&img);
        let at = layout.refcount_table_offset;
        let entry = read_be_u64(&img, at);
        layout.set_u64(at, value.unwrap_or(entry + 0x200));
        let before = read_all(&img);
        let label = format!("refcount table entry {label}");
        let info = run_measured(snapfs_cmd().arg("info").arg(&img), COMMAND_LIMIT);
        if info.status.map(|s| s.success()) != Some(true) {
            problems.push(format!("[{label}] snapfs info fails: {}", info.stderr));
        }
        match HostileMount::start(&img, &["-r"]) {
            Err(m) => problems.push(format!("[{label}] mount -r refused: {}", m.stderr)),
            Ok(mount) => {
                for p in check_reads(&mount, &live(&oracle, &[]), MIB) {
                    problems.push(format!("[{label}] mount -r: {p}"));
                }
            }
        }
        match HostileMount::start(&img, &[]) {
            Err(m) => problems.extend(
                refusal_problems("mount (read-write)", &m, &["refcount table"])
                    .into_iter()
                    .map(|p| format!("[{label}] {p}")),
            ),
            Ok(mount) => {
                let writable = std::fs::OpenOptions::new().write(true).open(mount.live());
                if writable.is_ok() {
                    problems.push(format!(
                        "[{label}] read-write mount with a damaged refcount table has a writable live.raw"
                    ));
                }
                for p in check_reads(&mount, &live(&oracle, &[]), MIB) {
                    problems.push(format!("[{label}] mount: {p}"));
                }
            }
        }
        if read_all(&img) != before {
            problems.push(format!("[{label}] the image file was modified"));
        }
    }
    assert_no_problems(&problems);
}

/// Every L1 entry naming the same L2 table: a 32 MiB file that describes a 2 PiB disk whose every
/// cluster is a zero cluster (or data). QEMU opens it, but anything that walks the disk — `stat`
/// (st_blocks), SEEK_DATA/SEEK_HOLE — then does work in proportion to the 2 PiB, not to the file:
/// `stat live.raw` spun for minutes. An L1 table whose entries share an L2 table is corruption
/// (`qemu-img check` reports the refcounts), so snapfs refuses the image, naming both entries.
#[test]
fn l1_entries_sharing_one_l2_table() {
    let dir = workdir();
    let img = dir.path().join("shared-l2.qcow2");
    // 64 KiB clusters: one L1 entry covers 512 MiB; 2 PiB needs 4 Mi entries (32 MiB, the limit).
    create_qcow2(&img, 1 << 51, "cluster_size=65536", None);
    let layout = Layout::read(&img);
    let l2 = layout.file_len().next_multiple_of(64 * KIB);
    let zero_clusters: Vec<u8> = (0..8192).flat_map(|_| 1u64.to_be_bytes()).collect();
    write_bytes_at(&img, l2, &zero_clusters);
    let l1: Vec<u8> = (0..layout.l1_size)
        .flat_map(|_| (COPIED | l2).to_be_bytes())
        .collect();
    write_bytes_at(&img, layout.l1_offset, &l1);
    assert_no_problems(&refused(
        "L1 entries sharing an L2 table",
        &img,
        &["both point at the L2 table", "entries 0 and 1"],
    ));
}

/// A read-write mount that nobody writes to must leave the file as it was, even when the image
/// carries autoclear features (here persistent bitmaps, which snapfs maintains: in_use is set
/// only once it writes).
#[test]
fn read_write_mount_with_bitmaps_writes_nothing_until_written() {
    let dir = workdir();
    let img = base(dir.path(), "bitmaps.qcow2");
    qemu_img(&["bitmap", "--add", img.to_str().unwrap(), "b0"]);
    assert_ne!(read_be_u64(&img, 88), 0, "test bug: no autoclear bit");
    let oracle = convert_to_raw(&img, None);
    assert_no_problems(&mounts_with_eio(
        "bitmaps",
        &img,
        &live(&oracle, &[]),
        MIB,
        "",
    ));
    // A write keeps the bitmaps extension bit (the bitmap follows the data) and the fields
    // before it; the unmount stores the bitmap, so nothing leaks.
    let before = read_all(&img);
    {
        let m = Mount::new(&img);
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(m.live())
            .expect("open live.raw for writing");
        std::os::unix::fs::FileExt::write_all_at(&f, &[0x5a; 4096], 0).expect("write live.raw");
        f.sync_all().expect("fsync live.raw");
    }
    assert_eq!(
        read_be_u64(&img, 88),
        1,
        "autoclear bit 0 (bitmaps) lost after a write through live.raw"
    );
    assert_eq!(
        read_all(&img)[..88],
        before[..88],
        "the header before the autoclear field changed"
    );
    if let Some(p) = crate::common::write_support::check_problems(&img, false) {
        panic!("after the write: {p}");
    }
}
