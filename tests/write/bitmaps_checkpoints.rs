//! `checkpoints/` (issue 17 point 3): for each consistent persistent bitmap of the top image,
//! `NAME.raw` reads the live disk where the bitmap is set and holes elsewhere, with
//! `SEEK_DATA`/`SEEK_HOLE` and `st_blocks` telling exactly those ranges, and `NAME.json` lists
//! them. QEMU is the oracle for the ranges (`qemu-nbd -B` after the unmount); `live.raw` for the
//! bytes. An `in_use` bitmap is not listed and `control/status` says why.

use std::fs::{self, File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;

use crate::common::bitmap_support::{add_bitmap, bitmaps_extension, qemu_dirty_ranges};
use crate::common::snapshot_support::{control_ok, status_text};
use crate::common::write_support::{fallocate, pwrite_all};
use crate::common::{self, Mount, Ranges, create_qcow2, merge_ranges, qemu_io};

/// The data ranges of `file` as `SEEK_DATA`/`SEEK_HOLE` report them.
fn seek_ranges(file: &File, size: u64) -> Ranges {
    let fd = file.as_raw_fd();
    let mut ranges = Vec::new();
    let mut at = 0i64;
    while (at as u64) < size {
        // SAFETY: lseek on an open descriptor.
        let data = unsafe { libc::lseek(fd, at, libc::SEEK_DATA) };
        if data < 0 {
            break;
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
        assert!(hole > data, "SEEK_HOLE after {data} gave {hole}");
        ranges.push((data as u64, hole as u64));
        at = hole;
    }
    ranges
}

fn json_ranges(path: &Path) -> Ranges {
    let v: serde_json::Value = serde_json::from_slice(&fs::read(path).unwrap()).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .map(|e| {
            let start = e["start"].as_u64().unwrap();
            (start, start + e["length"].as_u64().unwrap())
        })
        .collect()
}

/// Checks `NAME.raw` and `NAME.json` of checkpoint `name` against `expected` and live.raw.
fn assert_checkpoint(m: &Mount, name: &str, expected: &Ranges) {
    let dir = m.path().join("checkpoints");
    let raw_path = dir.join(format!("{name}.raw"));
    let live = fs::read(m.live()).unwrap();
    let size = live.len() as u64;
    let md = fs::metadata(&raw_path).unwrap();
    assert_eq!(md.len(), size, "{name}.raw has the live disk's size");
    let dirty: u64 = expected.iter().map(|(s, e)| e - s).sum();
    assert_eq!(md.blocks() * 512, dirty, "{name}.raw: st_blocks");
    let raw = File::open(&raw_path).unwrap();
    assert_eq!(
        &seek_ranges(&raw, size),
        expected,
        "{name}.raw: SEEK_DATA/SEEK_HOLE"
    );
    assert_eq!(&json_ranges(&dir.join(format!("{name}.json"))), expected);
    let bytes = fs::read(&raw_path).unwrap();
    assert_eq!(bytes.len(), live.len());
    let mut want = vec![0u8; live.len()];
    for &(s, e) in expected {
        want[s as usize..e as usize].copy_from_slice(&live[s as usize..e as usize]);
    }
    assert!(
        bytes == want,
        "{name}.raw: live bytes where dirty, zeros elsewhere"
    );
}

fn listing(m: &Mount) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(m.path().join("checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    names
}

#[test]
fn checkpoint_files_show_what_changed_since_the_bitmap() {
    common::require_env();
    let dir = common::workdir();
    let image = dir.path().join("vm.qcow2");
    let size: u64 = 16 << 20;
    create_qcow2(&image, size, "cluster_size=65536", None);
    qemu_io(&image, &["write -P 0x01 0 16M"]);
    add_bitmap(&image, "stale", 65536, true);
    add_bitmap(&image, "chk1", 65536, true);
    qemu_io(&image, &["write -P 0x22 1M 64k"]);
    add_bitmap(&image, "chk2", 4096, true);
    qemu_io(&image, &["write -P 0x33 3M 4k"]);
    add_bitmap(&image, "frozen", 65536, false);
    // "stale" (the first entry) as a killed QEMU leaves it: in_use.
    let (_, dir_offset) = bitmaps_extension(&image);
    let f = OpenOptions::new().write(true).open(&image).unwrap();
    f.write_all_at(&3u32.to_be_bytes(), dir_offset + 12)
        .unwrap();
    drop(f);

    let (chk1, chk2);
    {
        let m = Mount::new(&image);
        assert_eq!(
            listing(&m),
            [
                "chk1.json",
                "chk1.raw",
                "chk2.json",
                "chk2.raw",
                "frozen.json",
                "frozen.raw"
            ]
        );
        let status = status_text(m.path());
        assert!(
            status.contains("checkpoint \"stale\" not listed") && status.contains("in_use"),
            "{status}"
        );
        assert_checkpoint(
            &m,
            "chk1",
            &vec![(1 << 20, (1 << 20) + 65536), (3 << 20, (3 << 20) + 65536)],
        );
        assert_checkpoint(&m, "chk2", &vec![(3 << 20, (3 << 20) + 4096)]);
        assert_checkpoint(&m, "frozen", &Vec::new());

        // Changes through live.raw show at once: a write, a discard, a zero write.
        let live = OpenOptions::new()
            .read(true)
            .write(true)
            .open(m.live())
            .unwrap();
        pwrite_all(&live, &[0x44; 5000], 7 << 20).unwrap();
        fallocate(
            &live,
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            9 << 20,
            65536,
        )
        .unwrap();
        fallocate(
            &live,
            libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
            11 << 20,
            8192,
        )
        .unwrap();
        chk1 = merge_ranges(vec![
            (1 << 20, (1 << 20) + 65536),
            (3 << 20, (3 << 20) + 65536),
            (7 << 20, (7 << 20) + 65536),
            (9 << 20, (9 << 20) + 65536),
            (11 << 20, (11 << 20) + 65536),
        ]);
        chk2 = merge_ranges(vec![
            (3 << 20, (3 << 20) + 4096),
            (7 << 20, (7 << 20) + 8192),
            (9 << 20, (9 << 20) + 65536),
            (11 << 20, (11 << 20) + 8192),
        ]);
        assert_checkpoint(&m, "chk1", &chk1);
        assert_checkpoint(&m, "chk2", &chk2);
        assert_checkpoint(&m, "frozen", &Vec::new());
        // Checkpoint files are read-only.
        assert!(
            OpenOptions::new()
                .write(true)
                .open(m.path().join("checkpoints/chk1.raw"))
                .is_err()
        );
        // After an external create the top is the overlay: its bitmaps start empty.
        control_ok(m.path(), "create", "e1 --external");
        assert_eq!(
            listing(&m),
            ["chk1.json", "chk1.raw", "chk2.json", "chk2.raw"]
        );
        // The chain's bitmaps together: what changed since each checkpoint, across the layers.
        pwrite_all(&live, &[0x55; 512], 13 << 20).unwrap();
        drop(live);
        let mut both = chk1.clone();
        both.push((13 << 20, (13 << 20) + 65536));
        assert_checkpoint(&m, "chk1", &merge_ranges(both));
    }
    // QEMU agrees with what the files showed.
    assert_eq!(qemu_dirty_ranges(&image, "chk1"), chk1);
    assert_eq!(qemu_dirty_ranges(&image, "chk2"), chk2);
}
