//! Graceful degradation (issue 8): a backing file is removed (`rm base.qcow2`) while the chain is
//! mounted. snapfs holds it open, so every view keeps reading exactly as before, writes that
//! copy-on-write from the backing file still work, and a snapshot can still be created. A
//! command that needs the backing file by name (commit) either works on the open file or fails
//! with an error in `control/status`; either way live.raw is unchanged and, once the name is
//! back, qemu-img finds both images consistent and the live disk equal to the model.

use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::Duration;

use crate::common::snapshot_support::{control, errno_name, status_text};
use crate::common::stress_support::*;
use crate::common::write_support::{
    assert_no_problems, check_problems, mount_context, qemu_compare, umount_noting_problems,
    with_watchdog,
};
use crate::common::*;

const DISK: u64 = 8 * MIB;

fn read_fresh(path: &Path) -> Result<Vec<u8>, String> {
    let f = File::open(path).map_err(|e| format!("open {}: {e}", path.display()))?;
    drop_file_cache(&f);
    let len = f.metadata().unwrap().len();
    let mut v = vec![0u8; len as usize];
    f.read_exact_at(&mut v, 0)
        .map_err(|e| format!("read {}: {e}", path.display()))?;
    Ok(v)
}

#[test]
fn degrade_backing_file_removed_while_mounted() {
    let dir = workdir();
    let d = dir.path();
    let base = d.join("base.qcow2");
    create_qcow2(&base, DISK, "", None);
    qemu_io(&base, &["write -P 0x41 0 2M", "write -P 0x42 4M 1M"]);
    snapshot_create(&base, "bs");
    qemu_io(&base, &["write -P 0x43 6M 1M"]);
    let top = d.join("top.qcow2");
    create_qcow2(&top, DISK, "", Some(("base.qcow2", "qcow2")));
    qemu_io(&top, &["write -P 0x51 1M 256k"]);
    snapshot_create(&top, "ts");
    qemu_io(&top, &["write -P 0x52 5M 64k"]);

    let views: Vec<(&str, Vec<u8>)> = vec![
        ("live.raw", read_all(&convert_to_raw(&top, None))),
        (
            "snapshots/ts.raw",
            read_all(&convert_snapshot_to_raw(
                &top,
                &snapshot_by_name(&top, "ts").id,
            )),
        ),
        ("snapshots/base.raw", read_all(&convert_to_raw(&base, None))),
        (
            "snapshots/base@bs.raw",
            read_all(&convert_snapshot_to_raw(
                &base,
                &snapshot_by_name(&base, "bs").id,
            )),
        ),
    ];
    // A second name for the base keeps its inode reachable for the checks after unmounting.
    let keep = d.join("keep");
    fs::create_dir(&keep).unwrap();
    let kept = keep.join("base.qcow2");
    fs::hard_link(&base, &kept).unwrap();

    let mut m = Mount::new(&top);
    let mp = m.path().to_path_buf();
    let context = mount_context(&mp);
    let mut problems = Vec::new();
    let mut live_model = views[0].1.clone();
    with_watchdog(
        &mp,
        Duration::from_secs(30),
        Duration::from_secs(120),
        "backing file removed",
        &context,
        |_| {
            fs::remove_file(&base).unwrap();
            assert!(!base.exists());
            for (name, want) in &views {
                match read_fresh(&mp.join(name)) {
                    Ok(got) => {
                        if let Some(diff) = crate::common::write_support::first_diff(&got, want, 0)
                        {
                            problems.push(format!("{name} after rm base.qcow2: {diff}"));
                        }
                    }
                    Err(e) => problems.push(format!("after rm base.qcow2: {e}")),
                }
            }
            // Partial-cluster writes over ranges that only the base holds: copy-on-write reads
            // the removed file.
            let live = OpenOptions::new()
                .read(true)
                .write(true)
                .open(mp.join("live.raw"))
                .unwrap();
            for (off, len, b) in [
                (4096u64, 1000usize, 0x61u8),
                (4 * MIB + 65536 + 17, 3000, 0x62),
                (6 * MIB + 300, 70_000, 0x63),
            ] {
                let data = vec![b; len];
                match live.write_all_at(&data, off) {
                    Ok(()) => live_model[off as usize..off as usize + len].copy_from_slice(&data),
                    Err(e) => problems.push(format!(
                        "write {len} bytes at {off:#x} after rm base.qcow2: {e}"
                    )),
                }
            }
            if let Err(e) = live.sync_all() {
                problems.push(format!("fsync after rm base.qcow2: {e}"));
            }
            drop(live);
            match read_fresh(&mp.join("live.raw")) {
                Ok(got) => {
                    if let Some(diff) =
                        crate::common::write_support::first_diff(&got, &live_model, 0)
                    {
                        problems.push(format!("live.raw after writes: {diff}"));
                    }
                }
                Err(e) => problems.push(e),
            }
            // A snapshot of the live disk still works and holds the live content.
            match control(&mp, "create", "after-rm") {
                Ok(()) => match read_fresh(&mp.join("snapshots").join("after-rm.raw")) {
                    Ok(got) if got == live_model => {}
                    Ok(got) => problems.push(format!(
                        "after-rm.raw: {}",
                        crate::common::write_support::first_diff(&got, &live_model, 0).unwrap()
                    )),
                    Err(e) => problems.push(e),
                },
                Err(e) => problems.push(format!(
                    "create after rm base.qcow2: {}; status:\n{}",
                    errno_name(e),
                    status_text(&mp)
                )),
            }
            // Commit into the removed base: either works on the open file or is refused.
            let r = control(&mp, "commit", "");
            let status = status_text(&mp);
            let last = status.lines().last().unwrap_or("").to_string();
            eprintln!("commit into the removed base: {r:?}; status: {last}");
            match r {
                Ok(()) => {}
                Err(e) => {
                    if !(last.contains("commit") && last.contains("error")) {
                        problems.push(format!(
                            "commit failed with {} but status does not say so: {last:?}",
                            errno_name(e)
                        ));
                    }
                }
            }
            match read_fresh(&mp.join("live.raw")) {
                Ok(got) => {
                    if let Some(diff) =
                        crate::common::write_support::first_diff(&got, &live_model, 0)
                    {
                        problems.push(format!("live.raw after the commit attempt: {diff}"));
                    }
                }
                Err(e) => problems.push(format!("after the commit attempt: {e}")),
            }
        },
    );
    let log = umount_noting_problems(&mut m, &mut problems);
    drop(m);
    // The name back: both images consistent, the live disk equal to the model.
    fs::rename(&kept, &base).unwrap();
    for img in [&top, &base] {
        if let Some(p) = check_problems(img, true) {
            problems.push(p);
        }
    }
    let model = d.join("model.raw");
    fs::write(&model, &live_model).unwrap();
    if let Err(e) = qemu_compare(&top, &model) {
        problems.push(format!("after unmounting: {e}"));
    }
    assert_no_problems(&problems, log);
}
