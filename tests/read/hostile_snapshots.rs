//! Hostile snapshot tables and snapshot L1 tables (docs/design.md section 5): absurd counts, offsets
//! and sizes, id and name lengths running past the table, extra data of absurd length, snapshot L1
//! tables that are unaligned, too large, too small, shared or past the end of the file.
//!
//! snapfs reads the whole snapshot table when it opens an image and loads every snapshot's L1
//! table to build the views, so a damaged entry refuses the image with one line that names the
//! field (`snapfs info`, `snapfs mount -f -r`, `snapfs mount -f`), within bounded memory — the
//! table read is bounded by the file's size, never by `nb_snapshots` or `l1_size`. The exception
//! is a snapshot L1 table past the end of the file: QEMU reads it as zeros (an empty snapshot), and
//! so does snapfs. Nothing ever writes to the file.

use std::path::{Path, PathBuf};

use crate::common::hostile_support::*;
use crate::common::*;

const CS: u64 = 4096;
const SIZE: u64 = 8 * MIB;

/// An 8 MiB image of 4 KiB clusters (four L1 entries) with snapshots "one" and "two" and different
/// data in each.
fn base(dir: &Path, name: &str) -> PathBuf {
    let img = dir.join(name);
    create_qcow2(&img, SIZE, "cluster_size=4096", None);
    qemu_io(&img, &["write -P 0x11 0 1M", "write -P 0x12 3M 64k"]);
    snapshot_create(&img, "one");
    qemu_io(&img, &["write -P 0x21 512k 1M", "write -P 0x22 6M 64k"]);
    snapshot_create(&img, "two");
    qemu_io(&img, &["write -P 0x31 0 64k"]);
    let layout = Layout::read(&img);
    assert_eq!(layout.nb_snapshots, 2);
    img
}

/// Builds a fresh base image, applies `patch` to it (given its layout and snapshot entry offsets)
/// and checks that snapfs refuses it with a message containing `needles`.
fn refuse(label: &str, needles: &[&str], patch: &dyn Fn(&Layout, &[u64])) -> Vec<String> {
    let dir = workdir();
    let img = base(dir.path(), "snap.qcow2");
    let layout = Layout::read(&img);
    let entries = layout.snapshot_entries();
    patch(&layout, &entries);
    refused(label, &img, needles)
}

/// Moves the snapshot table to the end of the file and cuts the file right after it, so that
/// anything reaching past the table reaches past the end of the file. Returns the new entry
/// offsets.
fn table_at_end(l: &Layout, entries: &[u64]) -> Vec<u64> {
    let last = *entries.last().unwrap();
    let last_len = 40
        + read_be_u32(&l.path, last + 36) as u64
        + (read_be_u32(&l.path, last + 12) >> 16) as u64
        + (read_be_u32(&l.path, last + 12) & 0xffff) as u64;
    let len = (last - entries[0] + last_len).next_multiple_of(8);
    let table = read_range(&l.path, entries[0], len);
    let at = l.file_len().next_multiple_of(CS);
    write_bytes_at(&l.path, at, &table);
    l.set_u64(64, at);
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&l.path)
        .unwrap();
    f.set_len(at + len).unwrap();
    entries.iter().map(|e| e - entries[0] + at).collect()
}

#[test]
fn snapshot_count_beyond_the_entries() {
    let mut problems = Vec::new();
    for nb in [3u32, 1000, 65536] {
        problems.extend(refuse(
            &format!("nb_snapshots {nb}"),
            &["snapshot table", "entry 2", &format!("nb_snapshots = {nb}")],
            &|l, e| {
                table_at_end(l, e);
                write_be_u32(&l.path, 60, nb);
            },
        ));
    }
    // With the table where qemu-img left it, the bytes after it are parsed as entries: whatever
    // they say, the image is refused cleanly.
    problems.extend(refuse(
        "nb_snapshots 65536 in place",
        &["snapshot"],
        &|l, _| write_be_u32(&l.path, 60, 65536),
    ));
    assert_no_problems(&problems);
}

#[test]
fn snapshot_table_offset_past_end_of_file_or_at_the_header() {
    let mut problems = refuse(
        "snapshots_offset past EOF",
        &["snapshot table", "entry 0", "runs past the end"],
        &|l, _| l.set_u64(64, (l.file_len() + 64 * MIB).next_multiple_of(CS)),
    );
    // At 0 the table would be the header itself.
    problems.extend(refuse(
        "snapshots_offset 0",
        &["snapshot table offset 0x0", "header"],
        &|l, _| l.set_u64(64, 0),
    ));
    assert_no_problems(&problems);
}

#[test]
fn id_and_name_lengths_running_past_the_table() {
    let mut problems = Vec::new();
    // The last entry's lengths: nothing follows the table in the file but other clusters or EOF.
    for (field, at) in [("id_str_size", 12u64), ("name_size", 14)] {
        problems.extend(refuse(
            &format!("{field} 0xffff"),
            &["snapshot table", "entry 1", field],
            &|l, e| {
                let e = table_at_end(l, e);
                write_bytes_at(&l.path, e[1] + at, &0xffffu16.to_be_bytes());
            },
        ));
    }
    assert_no_problems(&problems);
}

#[test]
fn extra_data_size_5000() {
    assert_no_problems(&refuse(
        "extra_data_size 5000",
        &["snapshot table", "entry 0", "extra_data_size 5000"],
        &|l, e| write_be_u32(&l.path, e[0] + 36, 5000),
    ));
}

#[test]
fn snapshot_l1_offset_unaligned() {
    let mut problems = refuse(
        "snapshot l1_table_offset + 0x200",
        &["snapshot", "not aligned"],
        &|l, e| {
            let v = read_be_u64(&l.path, e[0]);
            l.set_u64(e[0], v + 0x200);
        },
    );
    problems.extend(refuse(
        "snapshot l1_table_offset + 1",
        &[
            "snapshot table",
            "entry 1",
            "l1_table_offset",
            "not aligned",
        ],
        &|l, e| {
            let v = read_be_u64(&l.path, e[1]);
            l.set_u64(e[1], v + 1);
        },
    ));
    problems.extend(refuse(
        "snapshot l1_table_offset 0",
        &["snapshot table", "entry 0", "l1_table_offset 0", "header"],
        &|l, e| l.set_u64(e[0], 0),
    ));
    assert_no_problems(&problems);
}

#[test]
fn snapshot_l1_size_absurd_or_too_small() {
    let mut problems = Vec::new();
    for (size, needles) in [
        (
            0xffff_ffffu32,
            &["snapshot table", "entry 0", "l1_size 4294967295"][..],
        ),
        (
            (32 << 20) / 8 + 1,
            &["snapshot table", "l1_size 4194305"][..],
        ),
        (0, &["snapshot", "l1_size 0", "too small"][..]),
        (3, &["snapshot", "l1_size 3", "too small"][..]),
    ] {
        problems.extend(refuse(
            &format!("snapshot l1_size {size}"),
            needles,
            &|l, e| write_be_u32(&l.path, e[0] + 8, size),
        ));
    }
    // A disk size in the extra data that the L1 table cannot cover.
    problems.extend(refuse(
        "snapshot disk_size 2^62",
        &["snapshot", "l1_size", "too small"],
        &|l, e| l.set_u64(e[0] + 40 + 8, 1 << 62),
    ));
    assert_no_problems(&problems);
}

#[test]
fn snapshot_l1_tables_that_overlap() {
    assert_no_problems(&refuse(
        "two snapshots, one L1 table",
        &["snapshot table", "entries 0 and 1", "overlap"],
        &|l, e| {
            let v = read_be_u64(&l.path, e[0]);
            l.set_u64(e[1], v);
        },
    ));
}

/// A snapshot L1 table past the end of the file reads as zeros, in QEMU as in snapfs: that
/// snapshot shows an empty disk; the other snapshot and the live disk are intact.
#[test]
fn snapshot_l1_past_end_of_file_is_an_empty_snapshot() {
    let dir = workdir();
    let img = base(dir.path(), "snap.qcow2");
    let live_oracle = convert_to_raw(&img, None);
    let two = convert_snapshot_to_raw(&img, "2");
    let layout = Layout::read(&img);
    let entries = layout.snapshot_entries();
    layout.set_u64(
        entries[0],
        (layout.file_len() + 256 * MIB).next_multiple_of(CS),
    );
    let one = convert_snapshot_to_raw(&img, "1");
    assert!(
        std::fs::read(&one).unwrap().iter().all(|&b| b == 0),
        "test bug: qemu-img does not read a snapshot L1 past EOF as zeros"
    );
    let expect = [
        Expect {
            file: "live.raw",
            oracle: &live_oracle,
            bad: &[],
        },
        Expect {
            file: "snapshots/one.raw",
            oracle: &one,
            bad: &[],
        },
        Expect {
            file: "snapshots/two.raw",
            oracle: &two,
            bad: &[],
        },
    ];
    assert_no_problems(&mounts_with_eio(
        "snapshot L1 past EOF",
        &img,
        &expect,
        MIB,
        "",
    ));
}

/// The most snapshots QEMU allows (65536), each with its own L1 table: the image mounts, every
/// snapshot is listed, and memory stays bounded.
#[test]

fn sixty_five_thousand_snapshots_within_bounded_memory() {
    const N: u64 = 65536;
    let dir = workdir();
    let img = dir.path().join("many.qcow2");
    create_qcow2(&img, SIZE, "cluster_size=4096", None);
    qemu_io(&img, &["write -P 0x5a 0 64k"]);
    let layout = Layout::read(&img);
    let active_l1 = read_range(&img, layout.l1_offset, 8 * layout.l1_size as u64);
    // Snapshot L1 tables: one cluster each after the current end (a sparse file); each a copy of
    // the active L1, so every snapshot shares the active L2 tables, as fresh snapshots do.
    let first_l1 = layout.file_len().next_multiple_of(CS);
    let mut table = Vec::new();
    for i in 0..N {
        let l1 = first_l1 + i * CS;
        let id = format!("{}", i + 1);
        let name = format!("s{i}");
        table.extend_from_slice(&l1.to_be_bytes());
        table.extend_from_slice(&layout.l1_size.to_be_bytes());
        table.extend_from_slice(&(id.len() as u16).to_be_bytes());
        table.extend_from_slice(&(name.len() as u16).to_be_bytes());
        table.extend_from_slice(&[0u8; 16]); // date sec and nsec, vm clock
        table.extend_from_slice(&0u32.to_be_bytes()); // vm_state_size
        table.extend_from_slice(&24u32.to_be_bytes()); // extra_data_size
        table.extend_from_slice(&0u64.to_be_bytes());
        table.extend_from_slice(&SIZE.to_be_bytes());
        table.extend_from_slice(&u64::MAX.to_be_bytes());
        table.extend_from_slice(id.as_bytes());
        table.extend_from_slice(name.as_bytes());
        table.resize(table.len().next_multiple_of(8), 0);
        if i % 4096 == 0 || i == N - 1 {
            write_bytes_at(&img, l1, &active_l1);
        }
    }
    // Only some L1 copies are written: the others are holes, which read as empty tables.
    let table_at = (first_l1 + N * CS).next_multiple_of(CS);
    write_bytes_at(&img, table_at, &table);
    layout.set_u64(64, table_at);
    write_be_u32(&img, 60, N as u32);
    let before = read_all(&img);

    let info = run_measured(snapfs_cmd().arg("info").arg(&img), COMMAND_LIMIT);
    let mut problems = Vec::new();
    if info.status.map(|s| s.success()) != Some(true) {
        problems.push(format!(
            "snapfs info failed: {:?} {}",
            info.status, info.stderr
        ));
    }
    if info.max_rss_kib > MEMORY_LIMIT_KIB {
        problems.push(format!("snapfs info peak memory {} KiB", info.max_rss_kib));
    }
    match HostileMount::start(&img, &["-r"]) {
        Err(m) => problems.push(format!("mount refused: {}", m.stderr)),
        Ok(mount) => {
            let names = std::fs::read_dir(mount.path().join("snapshots"))
                .map(|d| d.count())
                .unwrap_or(0);
            if names as u64 != N {
                problems.push(format!("{names} snapshot files, want {N}"));
            }
            let first = mount.read(&mount.snapshot("s0.raw"), 0, 4096);
            if !matches!(&first, Ok(d) if d.iter().all(|&b| b == 0x5a)) {
                problems.push(format!("s0.raw reads {first:?}"));
            }
            let ended = mount.finish();
            if ended.max_rss_kib > MEMORY_LIMIT_KIB {
                problems.push(format!("mount peak memory {} KiB", ended.max_rss_kib));
            }
        }
    }
    if read_all(&img) != before {
        problems.push("the image file was modified".into());
    }
    assert_no_problems(&problems);
}

/// `len` bytes at `offset` of a plain file (zeros past its end).
fn read_range(path: &Path, offset: u64, len: u64) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let mut buf = vec![0u8; len as usize];
    let f = std::fs::File::open(path).unwrap();
    let mut done = 0;
    while done < buf.len() {
        match f.read_at(&mut buf[done..], offset + done as u64).unwrap() {
            0 => break,
            n => done += n,
        }
    }
    buf
}
