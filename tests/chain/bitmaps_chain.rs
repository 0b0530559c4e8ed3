//! Persistent bitmaps across a chain, as libvirt keeps them (its kbase page "Internals of
//! incremental backup handling in qemu"), with qemu-img and qemu-nbd as the oracle: an external
//! create gives the new overlay an empty recording bitmap for each recording bitmap of the old
//! top (and leaves the old top's bitmaps stored and consistent); a layer delete moves the layer's
//! part of each bitmap chain into the layer above; a commit merges the committed layer's bitmaps
//! into the base. Every file is `qemu-img check` clean after each step.

use std::fs::OpenOptions;
use std::path::Path;

use crate::common::bitmap_support::{
    add_bitmap, assert_check_clean, bitmap_flags, flags_of, granules, qemu_dirty_ranges,
};
use crate::common::snapshot_support::control_ok;
use crate::common::write_support::pwrite_all;
use crate::common::{self, Mount, Ranges, create_qcow2, merge_ranges, qemu_io};

const SIZE: u64 = 32 << 20;
const G: u64 = 65536;

fn write_live(m: &Mount, offset: u64, len: u64, byte: u8) -> (u64, u64) {
    let f = OpenOptions::new().write(true).open(m.live()).unwrap();
    pwrite_all(&f, &vec![byte; len as usize], offset).unwrap();
    f.sync_all().unwrap();
    (offset, offset + len)
}

fn dirty(ranges: &[(u64, u64)]) -> Ranges {
    granules(ranges, G, SIZE)
}

fn names(image: &Path) -> Vec<String> {
    bitmap_flags(image).into_iter().map(|(n, _)| n).collect()
}

/// The virsh-like flow of a VM with checkpoint `chk1` (and a disabled bitmap `off`): two
/// external snapshots, a delete of the middle layer, a commit of the top, each through
/// snapfs's control files.
#[test]
fn external_create_delete_and_commit_keep_the_checkpoint() {
    common::require_env();
    let dir = common::workdir();
    let vm = dir.path().join("vm.qcow2");
    let e1 = dir.path().join("vm.e1.qcow2");
    let e2 = dir.path().join("vm.e1.e2.qcow2");
    create_qcow2(&vm, SIZE, "cluster_size=65536", None);
    add_bitmap(&vm, "chk1", G, true);
    add_bitmap(&vm, "off", G, false);
    qemu_io(&vm, &["write -P 0x10 1M 64k"]);
    let d0 = (1 << 20, (1 << 20) + G);

    // Two external creates, a write before each and one after.
    let (a, b, c);
    {
        let m = Mount::new(&vm);
        a = write_live(&m, 2 << 20, 4096, 0xa1);
        control_ok(m.path(), "create", "e1 --external");
        b = write_live(&m, 6 << 20, 4096, 0xb2);
        control_ok(m.path(), "create", "e2 --external");
        c = write_live(&m, 10 << 20, 4096, 0xc3);
    }
    for image in [&vm, &e1, &e2] {
        assert_check_clean(image);
    }
    assert_eq!(names(&vm), ["chk1", "off"]);
    assert_eq!(
        flags_of(&vm, "chk1"),
        ["auto"],
        "the old top is stored consistent"
    );
    assert_eq!(qemu_dirty_ranges(&vm, "chk1"), dirty(&[d0, a]));
    assert_eq!(qemu_dirty_ranges(&vm, "off"), Ranges::new());
    // Each overlay: chk1 only (the disabled bitmap is not carried), recording, its own writes.
    assert_eq!(names(&e1), ["chk1"]);
    assert_eq!(flags_of(&e1, "chk1"), ["auto"]);
    assert_eq!(qemu_dirty_ranges(&e1, "chk1"), dirty(&[b]));
    assert_eq!(names(&e2), ["chk1"]);
    assert_eq!(flags_of(&e2, "chk1"), ["auto"]);
    assert_eq!(qemu_dirty_ranges(&e2, "chk1"), dirty(&[c]));

    // Delete the middle layer (vm.e1.qcow2, the state at e2): its part of chk1 moves up.
    let d;
    {
        let m = Mount::new(&e2);
        control_ok(m.path(), "delete", "vm.e1");
        d = write_live(&m, 14 << 20, 4096, 0xd4);
    }
    for image in [&vm, &e1, &e2] {
        assert_check_clean(image);
    }
    assert_eq!(flags_of(&e2, "chk1"), ["auto"]);
    assert_eq!(qemu_dirty_ranges(&e2, "chk1"), dirty(&[b, c, d]));
    assert_eq!(qemu_dirty_ranges(&vm, "chk1"), dirty(&[d0, a]));

    // Commit the top into vm.qcow2: chk1 there covers everything since the checkpoint.
    {
        let m = Mount::new(&e2);
        control_ok(m.path(), "commit", "");
    }
    for image in [&vm, &e2] {
        assert_check_clean(image);
    }
    assert_eq!(flags_of(&vm, "chk1"), ["auto"]);
    assert_eq!(
        qemu_dirty_ranges(&vm, "chk1"),
        merge_ranges(dirty(&[d0, a, b, c, d]))
    );
    assert_eq!(qemu_dirty_ranges(&vm, "off"), Ranges::new());
    assert!(flags_of(&vm, "off").is_empty());
    // The emptied top keeps its bitmap as it was: the live disk did not change.
    assert_eq!(qemu_dirty_ranges(&e2, "chk1"), dirty(&[b, c, d]));
}

/// A commit into a base without the bitmap creates it there, recording, with the committed
/// layer's bits (libvirt: "if BITMAP is not present in COMMIT_BASE: create RECORDING bitmap").
#[test]
fn commit_creates_the_bitmap_in_a_base_without_it() {
    common::require_env();
    let dir = common::workdir();
    let base = dir.path().join("base.qcow2");
    let top = dir.path().join("top.qcow2");
    create_qcow2(&base, SIZE, "cluster_size=65536", None);
    qemu_io(&base, &["write -P 0x20 0 1M"]);
    create_qcow2(
        &top,
        SIZE,
        "cluster_size=65536",
        Some(("base.qcow2", "qcow2")),
    );
    add_bitmap(&top, "chk1", G, true);
    let w;
    {
        let m = Mount::new(&top);
        w = write_live(&m, 3 << 20, 8192, 0x31);
        control_ok(m.path(), "commit", "");
    }
    assert_check_clean(&base);
    assert_check_clean(&top);
    assert_eq!(names(&base), ["chk1"]);
    assert_eq!(flags_of(&base, "chk1"), ["auto"]);
    assert_eq!(qemu_dirty_ranges(&base, "chk1"), dirty(&[w]));
}

/// `pull BASE` moves the pulled layers' parts of each bitmap chain the top continues into the
/// top (their data moves there too), and marks nothing for the copy itself (the guest reads the
/// same); `pull` of every layer keeps them all in the top, standing alone.
#[test]
fn pull_moves_the_pulled_layers_bitmaps_into_the_top() {
    common::require_env();
    let dir = common::workdir();
    let vm = dir.path().join("vm.qcow2");
    let e2 = dir.path().join("vm.e1.e2.qcow2");
    create_qcow2(&vm, SIZE, "cluster_size=65536", None);
    // Data from before the checkpoint: pulled up, never marked.
    qemu_io(&vm, &["write -P 0x0f 20M 256k"]);
    add_bitmap(&vm, "chk1", G, true);
    qemu_io(&vm, &["write -P 0x10 1M 64k"]);
    let d0 = (1 << 20, (1 << 20) + G);
    let (a, b, c, d);
    {
        let m = Mount::new(&vm);
        a = write_live(&m, 2 << 20, 4096, 0xa1);
        control_ok(m.path(), "create", "e1 --external");
        b = write_live(&m, 6 << 20, 4096, 0xb2);
        control_ok(m.path(), "create", "e2 --external");
        c = write_live(&m, 10 << 20, 4096, 0xc3);
        // The state at e2 (vm.e1.qcow2) is pulled into the top; vm.qcow2 (the state at e1)
        // stays below it.
        control_ok(m.path(), "pull", "e1");
        d = write_live(&m, 14 << 20, 4096, 0xd4);
    }
    for image in [&vm, &e2] {
        assert_check_clean(image);
    }
    assert_eq!(flags_of(&e2, "chk1"), ["auto"]);
    assert_eq!(qemu_dirty_ranges(&e2, "chk1"), dirty(&[b, c, d]));
    assert_eq!(qemu_dirty_ranges(&vm, "chk1"), dirty(&[d0, a]));
    {
        let m = Mount::new(&e2);
        control_ok(m.path(), "pull", "");
    }
    assert_check_clean(&e2);
    assert_eq!(flags_of(&e2, "chk1"), ["auto"]);
    assert_eq!(
        qemu_dirty_ranges(&e2, "chk1"),
        merge_ranges(dirty(&[d0, a, b, c, d]))
    );
}
