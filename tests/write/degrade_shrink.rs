//! Graceful degradation (issue 8): the image file shrinks under a read-only mount (a half-copied
//! backup being replaced, a truncating tool). Reads of ranges whose tables or data now lie past
//! the end of the file return zeros or fail with EIO — never wrong data from elsewhere, never a
//! hang or a crash; ranges whose tables and data are still in the file read as before; the
//! daemon stays alive, unmounting works, and the image's bytes are not touched.

use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::Duration;

use crate::common::hostile_support::{COMPRESSED, Layout, OFFSET_MASK};
use crate::common::stress_support::*;
use crate::common::write_support::{assert_no_problems, mount_context, with_watchdog};
use crate::common::*;

const DISK: u64 = 8 * MIB;
const CS: u64 = 4 * KIB;

/// For each guest cluster of a view: whether it must still read exactly as before once the file
/// is `len` bytes long (its L1 table, L2 table and data cluster all lie before `len`).
fn intact_clusters(path: &Path, l1_offset: u64, l1_size: u32, len: u64) -> Vec<bool> {
    let lay = Layout::read(path);
    let per_l2 = lay.l2_coverage() / CS;
    let n = DISK / CS;
    let l1_ok = l1_offset + l1_size as u64 * 8 <= len;
    (0..n)
        .map(|c| {
            if !l1_ok {
                return false;
            }
            let l1e = read_be_u64(path, l1_offset + (c / per_l2) * 8) & OFFSET_MASK;
            if l1e == 0 {
                return true; // unallocated: reads as zero, from no table at all
            }
            if l1e + CS > len {
                return false;
            }
            let l2e = read_be_u64(path, l1e + (c % per_l2) * 8);
            assert_eq!(
                l2e & COMPRESSED,
                0,
                "test images have no compressed clusters"
            );
            let host = l2e & OFFSET_MASK;
            host == 0 || host + CS <= len
        })
        .collect()
}

struct Outcome {
    exact: u64,
    zeros: u64,
    eio: u64,
}

/// Reads every cluster of `file` (bypassing cached pages) and checks it against `oracle`.
fn read_view(file: &Path, oracle: &[u8], intact: &[bool], problems: &mut Vec<String>) -> Outcome {
    let mut out = Outcome {
        exact: 0,
        zeros: 0,
        eio: 0,
    };
    let f = match File::open(file) {
        Ok(f) => f,
        Err(e) => {
            problems.push(format!("open {}: {e}", file.display()));
            return out;
        }
    };
    drop_file_cache(&f);
    no_readahead(&f);
    let mut buf = vec![0u8; CS as usize];
    for (c, &must) in intact.iter().enumerate() {
        let off = c as u64 * CS;
        let want = &oracle[off as usize..(off + CS) as usize];
        match f.read_exact_at(&mut buf, off) {
            Ok(()) if buf == want => out.exact += 1,
            Ok(()) if !must && buf.iter().all(|&b| b == 0) => out.zeros += 1,
            Ok(()) => problems.push(format!(
                "{} cluster {c} ({off:#x}): wrong data ({}){}",
                file.display(),
                crate::common::write_support::first_diff(&buf, want, off).unwrap_or_default(),
                if must {
                    " although its tables and data are still in the file"
                } else {
                    "; an affected range must read as zeros or fail with EIO"
                }
            )),
            Err(e) if !must && e.raw_os_error() == Some(libc::EIO) => out.eio += 1,
            Err(e) => problems.push(format!(
                "{} cluster {c} ({off:#x}): {e}{}",
                file.display(),
                if must {
                    " although its tables and data are still in the file"
                } else {
                    " (zeros or EIO expected)"
                }
            )),
        }
    }
    out
}

#[test]
fn degrade_image_shrinks_under_a_read_only_mount() {
    let dir = workdir();
    let image = dir.path().join("shrink.qcow2");
    // Small clusters: one L2 table covers 2 MiB, so a cut spares some tables and not others.
    create_qcow2(&image, DISK, "cluster_size=4096", None);
    // The first half of the disk, a snapshot (its L1 copy lands mid-file), the second half, then
    // changes to the first 2 MiB (copy-on-write puts a new L2 table and data at the end).
    let mut cmds = Vec::new();
    for i in 0..DISK / MIB / 2 {
        cmds.push(format!("write -P {} {} 1M", 0x10 + i, i * MIB));
    }
    qemu_io_s(&image, &cmds);
    snapshot_create(&image, "s1");
    let mut cmds = Vec::new();
    for i in DISK / MIB / 2..DISK / MIB {
        cmds.push(format!("write -P {} {} 1M", 0x10 + i, i * MIB));
    }
    cmds.push("write -P 0xa1 1M 512k".into());
    qemu_io_s(&image, &cmds);
    let live_oracle = read_all(&convert_to_raw(&image, None));
    let s1_id = snapshot_by_name(&image, "s1").id;
    let s1_oracle = read_all(&convert_snapshot_to_raw(&image, &s1_id));
    let file_len = fs::metadata(&image).unwrap().len();
    let half = (file_len / 2) & !511;

    // Which clusters must stay intact once the file is cut to `half`.
    let lay = Layout::read(&image);
    let live_intact = intact_clusters(&image, lay.l1_offset, lay.l1_size, half);
    let entry = snapshot_entry_offsets(&image)[0];
    let s1_l1 = read_be_u64(&image, entry);
    let s1_l1_size = read_be_u32(&image, entry + 8);
    let s1_intact = intact_clusters(&image, s1_l1, s1_l1_size, half);
    let count = |v: &[bool]| v.iter().filter(|b| **b).count();
    eprintln!(
        "file {file_len} bytes cut to {half}; clusters that must stay intact: live {}/{}, s1 {}/{}",
        count(&live_intact),
        live_intact.len(),
        count(&s1_intact),
        s1_intact.len()
    );
    assert!(
        count(&live_intact) > 0 && count(&live_intact) < live_intact.len(),
        "test setup: the cut must affect some clusters of live.raw and spare others"
    );

    let mut m = Mount::with_args(&image, &["-r"]);
    let mp = m.path().to_path_buf();
    let live = mp.join("live.raw");
    let s1 = mp.join("snapshots").join("s1.raw");
    let context = mount_context(&mp);
    let mut problems = Vec::new();
    with_watchdog(
        &mp,
        Duration::from_secs(30),
        Duration::from_secs(120),
        "reads of a shrinking image",
        &context,
        |_| {
            // Before: everything reads right (and the metadata cache is warm).
            let all = vec![true; (DISK / CS) as usize];
            read_view(&live, &live_oracle, &all, &mut problems);
            read_view(&s1, &s1_oracle, &all, &mut problems);
            assert!(problems.is_empty(), "before the cut: {problems:?}");

            OpenOptions::new()
                .write(true)
                .open(&image)
                .unwrap()
                .set_len(half)
                .unwrap();
            let after = read_all(&image);

            for round in 0..2 {
                let a = read_view(&live, &live_oracle, &live_intact, &mut problems);
                let b = read_view(&s1, &s1_oracle, &s1_intact, &mut problems);
                eprintln!(
                    "round {round}: live.raw {} exact, {} zeros, {} EIO; s1.raw {} exact, {} \
                     zeros, {} EIO",
                    a.exact, a.zeros, a.eio, b.exact, b.zeros, b.eio
                );
                // Other requests still work.
                if let Err(e) = fs::metadata(&live) {
                    problems.push(format!("stat live.raw after the cut: {e}"));
                }
                if let Err(e) = fs::read_to_string(mp.join("control").join("status")) {
                    problems.push(format!("read control/status after the cut: {e}"));
                }
                let _ = fs::read(mp.join("info.json"))
                    .map_err(|e| problems.push(format!("read info.json after the cut: {e}")));
            }
            if read_all(&image) != after {
                problems.push("the read-only mount wrote to the image after the cut".into());
            }
        },
    );
    let (out, status) = m.snapfs_umount();
    let log = m.stderr_text();
    if out.status.is_none_or(|s| !s.success()) {
        problems.push(format!("snapfs umount: {:?}: {}", out.status, out.stderr));
    }
    match status {
        Some(s) if s.success() => {}
        other => problems.push(format!(
            "the server ended with {other:?} (clean exit expected)"
        )),
    }
    if log.contains("panicked") {
        problems.push("the server panicked".into());
    }
    drop(m);
    assert_eq!(fs::metadata(&image).unwrap().len(), half, "image length");
    assert_no_problems(&problems, log);
}
