//! Chain operations in any order (issue 21).
//!
//! First the user's sequence from the issue, mounted for real and driven through the control
//! files: base.qcow2 <- top.qcow2; write, `commit`, write, `create e1 --external`, write,
//! `commit`. The second commit writes into top.qcow2, which was the top before the external
//! create; it failed with EIO ("top.qcow2: no longer the active image").

use std::path::Path;

use crate::common::chain_support::*;
use crate::common::snapshot_support::*;
use crate::common::*;

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn commit_after_external_create_writes_into_the_old_top() {
    let work = workdir();
    let dir = work.path();
    let base = dir.join("base.qcow2");
    let top = dir.join("top.qcow2");
    let size = 4 * MIB;
    create_qcow2(&base, size, "cluster_size=65536", None);
    qemu_io(&base, &["write -P 0x11 0 4M"]);
    create_qcow2(
        &top,
        size,
        "cluster_size=65536",
        Some(("base.qcow2", "qcow2")),
    );
    let mut want = vec![0x11u8; size as usize];
    let write = |mp: &Path, want: &mut Vec<u8>, pat: u8, off: u64, len: usize| {
        let data = pattern(pat, len);
        pwrite(&mp.join("live.raw"), off, &data);
        want[off as usize..off as usize + len].copy_from_slice(&data);
    };
    let e1 = dir.join("top.e1.qcow2");
    let committed;
    {
        let m = Mount::new(&top);
        let mp = m.path();
        write(mp, &mut want, 0x21, 0, 128 * KIB as usize);
        control_ok(mp, "commit", "");
        assert_outcome_ok(mp, "commit (top)");
        write(mp, &mut want, 0x22, 64 * KIB, 200 * KIB as usize);
        control_ok(mp, "create", "e1 --external");
        assert_outcome_ok(mp, "create e1");
        let at_e1 = want.clone();
        write(mp, &mut want, 0x23, MIB, 300 * KIB as usize);
        // The commit of the new top lands in top.qcow2, the image that was the top.
        control_ok(mp, "commit", "");
        assert_outcome_ok(mp, "commit (top)");
        if let Some(d) = diff_bytes(&read_whole(&m.live()), &want) {
            panic!("live.raw after the second commit: {d}");
        }
        // top.qcow2 is external snapshot e1: it now holds the committed writes too.
        if let Some(d) = diff_bytes(&read_whole(&m.snapshot("e1.raw")), &want) {
            panic!("snapshots/e1.raw (top.qcow2) after the second commit: {d}");
        }
        assert_ne!(at_e1, want, "the last write must change the disk");
        committed = want.clone();
        // And the live disk stays writable, into the new top.
        write(mp, &mut want, 0x24, 3 * MIB, 4 * KIB as usize);
        fsync(&m.live());
        if let Some(d) = diff_bytes(&read_whole(&m.live()), &want) {
            panic!("live.raw after writing past the second commit: {d}");
        }
    }
    assert_all_clean(dir, "after unmount");
    assert_eq!(
        chain_files(&e1, dir),
        ["top.e1.qcow2", "top.qcow2", "base.qcow2"],
        "the chain after the sequence"
    );
    let got = qemu_content(&e1, None);
    if let Some(d) = diff_bytes(&got, &want) {
        panic!("qemu-img convert of {} vs the writes: {d}", s(&e1));
    }
    // top.qcow2 holds everything up to the second commit (the last write went to the new top).
    if let Some(d) = diff_bytes(&qemu_content(&top, None), &committed) {
        panic!("qemu-img convert of top.qcow2 (the committed writes over base): {d}");
    }
}
