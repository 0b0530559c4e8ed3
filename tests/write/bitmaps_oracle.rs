//! Persistent dirty bitmaps kept as QEMU keeps them, with QEMU as the oracle: a read-write mount
//! marks every change in the enabled bitmaps, `in_use` while mounted, stored and consistent again
//! at a clean unmount (`qemu-img check` clean, `qemu-img info` not in_use), exactly the changed
//! granules dirty through `qemu-nbd -B`; a kill leaves `in_use`; disabled and broken bitmaps are
//! left alone.

use std::fs::{self, File, OpenOptions};
use std::process::Command;

use crate::common::bitmap_support::{
    add_bitmap, assert_check_clean, bitmaps_extension, flags_of, granules, qemu_dirty_ranges,
};
use crate::common::snapshot_support::{Daemon, control_ok};
use crate::common::write_support::{fallocate, pwrite_all};
use crate::common::{
    self, Mount, Ranges, create_qcow2, merge_ranges, qemu_io, run_status, snapshot_create,
};

fn open_live(m: &Mount) -> File {
    OpenOptions::new()
        .read(true)
        .write(true)
        .open(m.live())
        .unwrap()
}

/// Writes, a discard, a zero write and a grow through live.raw, at several cluster sizes and
/// granularities: after the unmount QEMU reads exactly the touched granules as dirty (on top of
/// what was dirty before), the disabled bitmap unchanged, and a clean image.
#[test]
fn unmount_stores_exactly_the_changed_ranges() {
    common::require_env();
    let dir = common::workdir();
    let size: u64 = 32 << 20;
    for (cluster, granularity) in [
        (65536u64, 65536u64),
        (4096, 512),
        (512, 16384),
        (2 << 20, 65536),
    ] {
        let image = dir.path().join(format!("vm-{cluster}-{granularity}.qcow2"));
        create_qcow2(&image, size, &format!("cluster_size={cluster}"), None);
        add_bitmap(&image, "chk1", granularity, true);
        add_bitmap(&image, "frozen", 4096, false);
        // Dirty before the mount: QEMU's own write, which must stay dirty.
        qemu_io(&image, &["write -P 0x11 1M 8k"]);
        let before = qemu_dirty_ranges(&image, "chk1");
        assert_eq!(
            before,
            granules(&[(1 << 20, (1 << 20) + 8192)], granularity, size)
        );
        let frozen_before = qemu_dirty_ranges(&image, "frozen");

        let writes: Ranges = vec![
            (3 << 20, (3 << 20) + 4096),
            (5_000_000, 5_000_003),
            (size - 512, size),
        ];
        let discard = (10 << 20, (12 << 20) + 4096);
        let zeroed = (20 << 20, (20 << 20) + 100_000);
        {
            let m = Mount::with_args(&image, &[]);
            let f = open_live(&m);
            for &(s, e) in &writes {
                pwrite_all(&f, &vec![0xab; (e - s) as usize], s).unwrap();
            }
            fallocate(
                &f,
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                discard.0,
                discard.1 - discard.0,
            )
            .unwrap();
            fallocate(
                &f,
                libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
                zeroed.0,
                zeroed.1 - zeroed.0,
            )
            .unwrap();
            f.sync_all().unwrap();
            // While mounted: in_use on the enabled bitmap only, as QEMU shows it while it runs.
            assert_eq!(flags_of(&image, "chk1"), ["in-use", "auto"]);
            assert!(flags_of(&image, "frozen").is_empty());
            drop(f);
        }
        assert_check_clean(&image);
        assert_eq!(flags_of(&image, "chk1"), ["auto"], "{}", image.display());
        assert!(flags_of(&image, "frozen").is_empty());
        let mut expected = before.clone();
        expected.extend(granules(&writes, granularity, size));
        expected.extend(granules(&[discard, zeroed], granularity, size));
        let expected = merge_ranges(expected);
        assert_eq!(
            qemu_dirty_ranges(&image, "chk1"),
            expected,
            "cluster {cluster}, granularity {granularity}"
        );
        assert_eq!(qemu_dirty_ranges(&image, "frozen"), frozen_before);

        // A second mount keeps the stored bits and adds its own; growing the disk marks the new part.
        {
            let m = Mount::with_args(&image, &[]);
            let f = open_live(&m);
            f.set_len(size + (4 << 20)).unwrap();
            f.sync_all().unwrap();
        }
        assert_check_clean(&image);
        let mut grown = expected.clone();
        grown.push((size, size + (4 << 20)));
        assert_eq!(qemu_dirty_ranges(&image, "chk1"), merge_ranges(grown));
        // The disabled bitmap followed the size (QEMU would refuse a wrong table size) and
        // kept its bits.
        assert_eq!(qemu_dirty_ranges(&image, "frozen"), frozen_before);
        assert!(flags_of(&image, "frozen").is_empty());
    }
}

/// A mount nobody writes to leaves the file byte for byte as it was.
#[test]
fn mount_without_changes_leaves_the_file_alone() {
    common::require_env();
    let dir = common::workdir();
    let image = dir.path().join("vm.qcow2");
    create_qcow2(&image, 8 << 20, "", None);
    add_bitmap(&image, "chk1", 65536, true);
    let before = fs::read(&image).unwrap();
    {
        let m = Mount::with_args(&image, &[]);
        let mut buf = vec![0u8; 4096];
        std::os::unix::fs::FileExt::read_exact_at(&File::open(m.live()).unwrap(), &mut buf, 0)
            .unwrap();
    }
    assert!(fs::read(&image).unwrap() == before, "the image changed");
}

/// After a kill the enabled bitmap stays in_use: QEMU reads it as inconsistent (correct), and
/// the next mount leaves it so and never makes it consistent again.
#[test]
fn kill_leaves_in_use() {
    common::require_env();
    let dir = common::workdir();
    let image = dir.path().join("vm.qcow2");
    create_qcow2(&image, 8 << 20, "", None);
    add_bitmap(&image, "chk1", 65536, true);
    add_bitmap(&image, "chk2", 65536, false);
    let mut d = Daemon::start(&image, &[]);
    let f = OpenOptions::new()
        .write(true)
        .open(d.mp.join("live.raw"))
        .unwrap();
    pwrite_all(&f, &[1; 4096], 0).unwrap();
    f.sync_all().unwrap();
    drop(f);
    d.kill9();
    assert!(d.finish());
    assert_eq!(flags_of(&image, "chk1"), ["in-use", "auto"]);
    assert!(flags_of(&image, "chk2").is_empty());
    {
        let m = Mount::with_args(&image, &[]);
        let f = open_live(&m);
        pwrite_all(&f, &[2; 4096], 65536).unwrap();
        f.sync_all().unwrap();
    }
    assert_eq!(flags_of(&image, "chk1"), ["in-use", "auto"]);
    assert!(flags_of(&image, "chk2").is_empty());
    // qemu-img check repairs nothing here: an in_use bitmap is QEMU's own state after a crash.
    let out = run_status(Command::new("qemu-img").args(["check"]).arg(&image));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

/// A revert is allowed with bitmaps (QEMU refuses it) and marks every cluster whose content it
/// changed: those written since the snapshot, and those the snapshot had and the live disk lost.
#[test]
fn revert_marks_what_it_changed() {
    common::require_env();
    let dir = common::workdir();
    let image = dir.path().join("vm.qcow2");
    let size = 16u64 << 20;
    create_qcow2(&image, size, "", None);
    qemu_io(&image, &["write -P 1 0 1M", "write -P 2 8M 64k"]);
    snapshot_create(&image, "s1");
    qemu_io(&image, &["write -P 3 4M 64k", "write -z 8M 64k"]);
    add_bitmap(&image, "chk1", 65536, true);
    {
        let m = Mount::with_args(&image, &[]);
        control_ok(m.path(), "revert", "s1");
    }
    assert_check_clean(&image);
    assert_eq!(flags_of(&image, "chk1"), ["auto"]);
    assert_eq!(
        qemu_dirty_ranges(&image, "chk1"),
        vec![(4 << 20, (4 << 20) + 65536), (8 << 20, (8 << 20) + 65536)]
    );
}

/// The autoclear field loses only the bits snapfs does not know.
#[test]
fn unknown_autoclear_bits_are_cleared_bitmaps_bit_kept() {
    common::require_env();
    let dir = common::workdir();
    let image = dir.path().join("vm.qcow2");
    create_qcow2(&image, 8 << 20, "", None);
    add_bitmap(&image, "chk1", 65536, true);
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&image)
        .unwrap();
    let autoclear = |f: &File| {
        let mut b = [0u8; 8];
        std::os::unix::fs::FileExt::read_exact_at(f, &mut b, 88).unwrap();
        u64::from_be_bytes(b)
    };
    assert_eq!(autoclear(&f), 1);
    std::os::unix::fs::FileExt::write_all_at(&f, &(1u64 | 1 << 40).to_be_bytes(), 88).unwrap();
    {
        let m = Mount::with_args(&image, &[]);
        pwrite_all(&open_live(&m), &[7; 512], 0).unwrap();
    }
    assert_eq!(autoclear(&f), 1);
    assert_check_clean(&image);
    assert_eq!(qemu_dirty_ranges(&image, "chk1"), vec![(0, 65536)]);
}

/// A bitmap directory QEMU would refuse makes the mount read-only, naming the field; a bitmap
/// with unknown flags is left as it is (with in_use once the disk changes: it claims auto).
#[test]
fn hostile_directories_are_refused_by_name() {
    common::require_env();
    let dir = common::workdir();
    let image = dir.path().join("vm.qcow2");
    create_qcow2(&image, 8 << 20, "", None);
    add_bitmap(&image, "chk1", 65536, true);
    add_bitmap(&image, "chk2", 65536, true);
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&image)
        .unwrap();
    let put = |bytes: &[u8], offset: u64| {
        std::os::unix::fs::FileExt::write_all_at(&f, bytes, offset).unwrap()
    };

    // The header says 3 bitmaps, the directory holds 2.
    let (nb_at, dir_offset) = bitmaps_extension(&image);
    put(&3u32.to_be_bytes(), nb_at);
    {
        let m = Mount::with_args(&image, &[]);
        assert!(
            OpenOptions::new().write(true).open(m.live()).is_err(),
            "mounted read-write"
        );
        let stderr = m.stderr_text();
        assert!(stderr.contains("nb_bitmaps = 3"), "{stderr}");
    }
    put(&2u32.to_be_bytes(), nb_at);

    // Unknown flag bit 7 on chk1: left alone, in_use added once the disk changes.
    let flags_at = dir_offset + 12;
    put(&(2u32 | 1 << 7).to_be_bytes(), flags_at);
    {
        let m = Mount::with_args(&image, &[]);
        pwrite_all(&open_live(&m), &[7; 512], 0).unwrap();
    }
    // The directory moved at the unmount (stored anew, as QEMU stores it).
    let (_, moved) = bitmaps_extension(&image);
    assert_ne!(moved, dir_offset);
    let flags_at = moved + 12;
    let mut b = [0u8; 4];
    std::os::unix::fs::FileExt::read_exact_at(&f, &mut b, flags_at).unwrap();
    assert_eq!(u32::from_be_bytes(b), 3 | 1 << 7);
    // chk2 was maintained all the same (chk1 given flags QEMU accepts, in_use kept).
    put(&3u32.to_be_bytes(), flags_at);
    assert_eq!(flags_of(&image, "chk1"), ["in-use", "auto"]);
    assert_eq!(flags_of(&image, "chk2"), ["auto"]);
    assert_eq!(qemu_dirty_ranges(&image, "chk2"), vec![(0, 65536)]);
}
