//! Graceful degradation (issue 8): the host file system fills up.
//!
//! - Writes through live.raw to an image on a small ext4 file system (64 MiB, loop-mounted) fail
//!   with ENOSPC (or EIO) once it is full; the daemon stays alive, data written before is intact,
//!   writes work again once space is freed, and after unmounting `qemu-img check` finds no
//!   corruption and no leaked cluster (a failed allocation gives its clusters back).
//! - A commit of a large top (on the roomy file system) into a base on the small one fails with an
//!   error in `control/status`; live.raw is unchanged, before and after unmounting.
//!
//! Loop devices and kernel mounts are cleaned up by guards, also when a test fails.

use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::Duration;

use crate::common::snapshot_support::{control, errno_name, status_text};
use crate::common::stress_support::*;
use crate::common::write_support::{
    Rng, assert_no_problems, check_problems, mount_context, qemu_check, qemu_compare,
    umount_noting_problems, with_watchdog,
};
use crate::common::*;

const FS_SIZE: u64 = 64 * MIB;
const CHUNK: u64 = MIB;

fn chunk_data(seed: u64, i: u64) -> Vec<u8> {
    let mut rng = Rng::new(seed ^ i.wrapping_mul(0x9e37_79b9_7f4a_7c15));
    let mut v = vec![0u8; CHUNK as usize];
    rng.fill(&mut v);
    v
}

fn read_fresh(f: &File, off: u64, len: usize) -> std::io::Result<Vec<u8>> {
    drop_file_cache(f);
    let mut v = vec![0u8; len];
    f.read_exact_at(&mut v, off)?;
    Ok(v)
}

#[test]
fn degrade_enospc_on_write_fails_cleanly_and_recovers() {
    let small = SmallFs::new(FS_SIZE);
    let filler = small.path().join("filler");
    fs::write(&filler, vec![0x77u8; 8 * MIB as usize]).unwrap();
    let image = small.path().join("disk.qcow2");
    create_qcow2(&image, 256 * MIB, "", None);
    let free = small.free_bytes();
    eprintln!("small fs: {} MiB free", free / MIB);
    assert!(free < 200 * MIB);
    let seed = 0x5eed_0001;

    let mut m = Mount::new(&image);
    let mp = m.path().to_path_buf();
    let context = mount_context(&mp);
    let mut problems = Vec::new();
    // Chunk index -> whether its write returned success.
    let mut written: Vec<u64> = Vec::new();
    let mut synced: Vec<u64> = Vec::new();
    let mut failed_errno = None;
    let mut late_chunk = None;
    with_watchdog(
        &mp,
        Duration::from_secs(60),
        Duration::from_secs(150),
        "ENOSPC on write",
        &context,
        |progress| {
            let live = OpenOptions::new()
                .read(true)
                .write(true)
                .open(mp.join("live.raw"))
                .unwrap();
            for i in 0..200u64 {
                let data = chunk_data(seed, i);
                match live.write_all_at(&data, i * CHUNK) {
                    Ok(()) => written.push(i),
                    Err(e) => {
                        failed_errno = Some(err_no(&e));
                        eprintln!("write of chunk {i} failed: {e}");
                        break;
                    }
                }
                progress.tick();
                if i % 4 == 3 {
                    match live.sync_all() {
                        Ok(()) => synced = written.clone(),
                        Err(e) => {
                            failed_errno = Some(err_no(&e));
                            eprintln!("fsync after chunk {i} failed: {e}");
                            break;
                        }
                    }
                }
            }
            match failed_errno {
                None => problems.push(format!(
                    "200 MiB written to a {} MiB file system without an error",
                    FS_SIZE / MIB
                )),
                Some(e) if e == libc::ENOSPC || e == libc::EIO => {}
                Some(e) => problems.push(format!(
                    "the full file system gave {}, ENOSPC or EIO expected",
                    errno_name(e)
                )),
            }
            // The daemon is alive and what was fsynced reads back.
            if let Err(e) = fs::metadata(mp.join("live.raw")) {
                problems.push(format!("stat live.raw when full: {e}"));
            }
            for &i in &synced {
                match read_fresh(&live, i * CHUNK, CHUNK as usize) {
                    Ok(got) if got == chunk_data(seed, i) => {}
                    Ok(_) => problems.push(format!("fsynced chunk {i} reads wrong when full")),
                    Err(e) => problems.push(format!("fsynced chunk {i} when full: {e}")),
                }
            }
            // A snapshot on a full file system: works, or is refused and leaves nothing behind.
            let before = m.snapshot_names();
            match control(&mp, "create", "when-full") {
                Ok(()) => {
                    if !m.snapshot_names().contains("when-full.raw") {
                        problems.push("create when-full succeeded but is not listed".into());
                    }
                }
                Err(e) => {
                    eprintln!("create when full: {}", errno_name(e));
                    if m.snapshot_names() != before {
                        problems.push(format!(
                            "a refused create changed snapshots/: {:?}",
                            m.snapshot_names()
                        ));
                    }
                    if !status_text(&mp)
                        .lines()
                        .last()
                        .is_some_and(|l| l.contains("error"))
                    {
                        problems.push("refused create not reported in control/status".into());
                    }
                }
            }
            // Free space: writing works again.
            fs::remove_file(&filler).unwrap();
            let i = 230u64;
            let data = chunk_data(seed, i);
            match live
                .write_all_at(&data, i * CHUNK)
                .and_then(|()| live.sync_all())
            {
                Ok(()) => late_chunk = Some(i),
                Err(e) => problems.push(format!(
                    "after freeing {} MiB, a 1 MiB write still fails: {e}",
                    8
                )),
            }
            if late_chunk.is_some() {
                match read_fresh(&live, i * CHUNK, CHUNK as usize) {
                    Ok(got) if got == data => {}
                    Ok(_) => {
                        problems.push("the chunk written after freeing space reads wrong".into())
                    }
                    Err(e) => problems.push(format!(
                        "reading the chunk written after freeing space: {e}"
                    )),
                }
            }
        },
    );
    eprintln!(
        "ENOSPC write: {} chunks written ({} fsynced) before {:?}",
        written.len(),
        synced.len(),
        failed_errno.map(errno_name)
    );
    let log = umount_noting_problems(&mut m, &mut problems);
    drop(m);

    // A clean unmount after ENOSPC leaks nothing (issue 16 point 4): a failed allocation gives
    // its clusters back.
    if let Some(p) = check_problems(&image, false) {
        problems.push(format!("after ENOSPC and a clean unmount: {p}"));
    }
    let info = info_json(&image);
    if info["format-specific"]["data"]["corrupt"].as_bool() == Some(true) {
        problems.push("the image is marked corrupt after ENOSPC".into());
    }
    // Every write that returned success is in the image (a clean unmount flushed them).
    // (Converted to the roomy file system: the small one has no space for it.)
    let scratch = workdir();
    let raw = convert_to_raw_elsewhere(&image, scratch.path());
    let f = File::open(&raw).unwrap();
    for i in written.iter().copied().chain(late_chunk) {
        let mut got = vec![0u8; CHUNK as usize];
        f.read_exact_at(&mut got, i * CHUNK).unwrap();
        if got != chunk_data(seed, i) {
            problems.push(format!(
                "chunk {i} (write returned success{}) is not in the image after unmounting",
                if synced.contains(&i) { ", fsynced" } else { "" }
            ));
        }
    }
    drop(f);
    fs::remove_file(&raw).ok();
    assert_no_problems(&problems, log);
}

#[test]
fn degrade_enospc_during_commit_fails_and_changes_no_view_of_live() {
    let small = SmallFs::new(FS_SIZE);
    let dir = workdir();
    let base = small.path().join("base.qcow2");
    create_qcow2(&base, 128 * MIB, "", None);
    qemu_io(&base, &["write -P 0x11 0 1M", "write -P 0x12 100M 1M"]);
    let top = dir.path().join("top.qcow2");
    create_qcow2(&top, 128 * MIB, "", Some((base.to_str().unwrap(), "qcow2")));
    // 80 MiB of data in the top: more than the small file system holds.
    let cmds: Vec<String> = (0..10)
        .map(|i| format!("write -P {} {} 8M", 0x40 + i, i * 8 * MIB + 512 * KIB))
        .collect();
    qemu_io_s(&top, &cmds);
    let free = small.free_bytes();
    assert!(
        free < 80 * MIB,
        "test setup: the small fs has {} MiB free",
        free / MIB
    );
    let oracle = convert_to_raw(&top, None);
    let base_before = read_all(&base);

    let mut m = Mount::new(&top);
    let mp = m.path().to_path_buf();
    let context = mount_context(&mp);
    let names_before = m.snapshot_names();
    let mut problems = Vec::new();
    with_watchdog(
        &mp,
        Duration::from_secs(60),
        Duration::from_secs(150),
        "commit into a full file system",
        &context,
        |_| {
            let last = refused_for_lack_of_space(&mp, "commit", "", &mut problems);
            // ... and says which layer holds what, and what to do (issue 16 point 4).
            let (top_name, base_name) = (top.display().to_string(), base.display().to_string());
            for (what, needle) in [
                (
                    "that the top keeps its data",
                    format!("{top_name} still holds all its data"),
                ),
                (
                    "that live.raw is unchanged",
                    "live.raw reads as before".to_string(),
                ),
                (
                    "what the base holds",
                    format!("{base_name} holds part of it"),
                ),
                ("what to do", "run the commit again".to_string()),
            ] {
                if !last.contains(&needle) {
                    problems.push(format!(
                        "control/status does not say {what} ({needle:?}): {last:?}"
                    ));
                }
            }
            if m.snapshot_names() != names_before {
                problems.push(format!(
                    "snapshots/ changed after a failed commit: {:?} -> {:?}",
                    names_before,
                    m.snapshot_names()
                ));
            }
            let live = mp.join("live.raw");
            if let Ok(f) = File::open(&live) {
                drop_file_cache(&f);
            }
            if let Err(e) = compare_files(&live, &oracle) {
                problems.push(format!("live.raw after the failed commit: {e}"));
            }
            // The mount still takes writes.
            let f = OpenOptions::new().write(true).open(&live).unwrap();
            if let Err(e) = f.write_all_at(&[0x99; 4096], 0).and_then(|()| f.sync_all()) {
                problems.push(format!("write to live.raw after the failed commit: {e}"));
            }
        },
    );
    let log = umount_noting_problems(&mut m, &mut problems);
    drop(m);
    // Live content: the oracle plus the 4 KiB written afterwards.
    {
        let f = OpenOptions::new().write(true).open(&oracle).unwrap();
        f.write_all_at(&[0x99; 4096], 0).unwrap();
    }
    if let Err(e) = qemu_compare(&top, &oracle) {
        problems.push(format!("after unmounting: {e}"));
    }
    eprintln!(
        "base after the failed commit: {} bytes (was {})",
        fs::metadata(&base).unwrap().len(),
        base_before.len()
    );
    // A failed commit leaves no residue in the base (issue 16 point 4): what it allocated there
    // is given back or mapped, never leaked.
    for image in [&top, &base] {
        if let Some(p) = check_problems(image, false) {
            problems.push(format!("after the failed commit and a clean unmount: {p}"));
        }
    }
    assert_no_problems(&problems, log);
}

/// Writes `arg` to `control/FILE` of the mount at `mp`, a command that needs more space than the
/// file system under the image it writes has: it must fail with ENOSPC (or EIO) and say so in
/// `control/status`. Returns the status line.
fn refused_for_lack_of_space(
    mp: &Path,
    file: &str,
    arg: &str,
    problems: &mut Vec<String>,
) -> String {
    let r = control(mp, file, arg);
    let last = status_text(mp).lines().last().unwrap_or("").to_string();
    eprintln!("{file} {arg} needing more space than there is: {r:?}; status: {last}");
    match r {
        Ok(()) => problems.push(format!(
            "{file} {arg} succeeded, needing more space than the file system has"
        )),
        Err(e) if e == libc::ENOSPC || e == libc::EIO => {}
        Err(e) => problems.push(format!(
            "{file} {arg} gave {}, ENOSPC or EIO expected",
            errno_name(e)
        )),
    }
    if !(last.contains(file) && last.contains("error")) {
        problems.push(format!(
            "control/status does not report the failed {file} {arg}: {last:?}"
        ));
    }
    last
}

/// Fills the file system at `dir` with a file of zeros until a write fails; returns its path.
fn fill_up(dir: &Path) -> std::path::PathBuf {
    use std::io::Write;
    let path = dir.join("fill");
    let mut f = File::create(&path).unwrap();
    for size in [256 * KIB, 4 * KIB, 512] {
        let block = vec![0u8; size as usize];
        while f.write_all(&block).is_ok() {}
    }
    let _ = f.sync_all();
    path
}

/// A snapshot create that fails for lack of space is a refused command: it changes nothing —
/// in particular it does not leave every data cluster's refcount raised (which would leak the
/// whole disk and make each later overwrite copy-on-write, doubling the space used).
#[test]
fn degrade_enospc_refused_create_leaves_refcounts_unchanged() {
    let small = SmallFs::new(FS_SIZE);
    let image = small.path().join("disk.qcow2");
    create_qcow2(&image, 64 * MIB, "", None);
    qemu_io(&image, &["write -P 0x21 0 16M"]);
    let scratch = workdir();
    let before = read_all(&convert_to_raw_elsewhere(&image, scratch.path()));
    let mut m = Mount::new(&image);
    let mp = m.path().to_path_buf();
    // Full, but for 64 KiB: room for the snapshot's L1 copy, not for the new snapshot table
    // (the failure then comes after the refcounts were raised).
    let fill = fill_up(small.path());
    {
        let f = OpenOptions::new().write(true).open(&fill).unwrap();
        let len = f.metadata().unwrap().len();
        f.set_len(len - 64 * KIB).unwrap();
        f.sync_all().unwrap();
    }
    let r = control(&mp, "create", "no-room");
    eprintln!(
        "create on a full file system: {}; status: {}",
        match r {
            Ok(()) => "ok".to_string(),
            Err(e) => errno_name(e),
        },
        status_text(&mp).lines().last().unwrap_or("")
    );
    fs::remove_file(&fill).unwrap();
    let refused = r.is_err();
    if refused {
        assert!(
            !m.snapshot_names().contains("no-room.raw"),
            "a refused create is listed"
        );
    }
    let mut problems = Vec::new();
    let log = umount_noting_problems(&mut m, &mut problems);
    assert_no_problems(&problems, log);
    drop(m);
    let c = qemu_check(&image);
    assert!(
        c.corruptions() == 0 && c.check_errors() == 0,
        "qemu-img check: {}",
        c.stdout
    );
    assert_eq!(
        read_all(&convert_to_raw_elsewhere(&image, scratch.path())),
        before,
        "live content changed"
    );
    if refused {
        assert!(
            snapshots(&image).is_empty(),
            "a refused create left a snapshot in the image"
        );
        assert!(
            c.leaks() <= 8,
            "the refused create left {} leaked clusters (16 MiB of data = 256 clusters): \
             refcounts raised for the snapshot were not put back; qemu-img check:\n{}",
            c.leaks(),
            crate::common::write_support::qemu_check_text(&image)
        );
    }
}

/// `qemu-img convert -O raw` into a temp dir on the roomy file system.
fn convert_to_raw_elsewhere(image: &Path, scratch: &Path) -> std::path::PathBuf {
    let out = scratch.join(format!("out-{}.raw", unique()));
    qemu_img(&[
        "convert",
        "-U",
        "-O",
        "raw",
        image.to_str().unwrap(),
        out.to_str().unwrap(),
    ]);
    out
}

/// Deleting a snapshot is how users get out of a full disk (issue 16 point 4): on a file system
/// without one free block, deleting a snapshot that is not the last in the table works, gives the space
/// back, and leaves an image `qemu-img check` finds clean, without a leak. (`qemu-img snapshot
/// -d` fails on the same disk: it rewrites a refcount block whose unwritten part needs space.)
#[test]
fn degrade_enospc_snapshot_delete_on_a_full_disk_frees_space() {
    let small = SmallFs::new(24 * MIB);
    let image = small.path().join("disk.qcow2");
    create_qcow2(&image, 64 * MIB, "", None);
    // "old" holds 4 MiB that nothing else uses (0x11 at 0..4M, overwritten since), and shares
    // 4..8M with "later" and the live disk: its delete frees 4 MiB and must set COPIED there.
    qemu_io(&image, &["write -P 0x11 0 8M"]);
    qemu_img(&["snapshot", "-c", "old", image.to_str().unwrap()]);
    qemu_io(&image, &["write -P 0x22 0 4M"]);
    qemu_img(&["snapshot", "-c", "later", image.to_str().unwrap()]);
    qemu_io(&image, &["write -P 0x33 8M 8M"]);
    let seed = 0x5eed_0016;

    let mut m = Mount::new(&image);
    let mp = m.path().to_path_buf();
    let context = mount_context(&mp);
    let mut problems = Vec::new();
    let mut written: Vec<u64> = Vec::new();
    let late = 40u64;
    let mut fill = None;
    with_watchdog(
        &mp,
        Duration::from_secs(60),
        Duration::from_secs(150),
        "snapshot delete on a full disk",
        &context,
        |progress| {
            progress.tick();
            let live = OpenOptions::new()
                .read(true)
                .write(true)
                .open(mp.join("live.raw"))
                .unwrap();
            // A filler takes what the image left, to the last block (the image was written by
            // qemu-io, so no cluster the refcounts call free holds a host block: the delete
            // finds no room at all for a new snapshot table).
            fill = Some(fill_up(small.path()));
            eprintln!("free before the delete: {} bytes", small.free_bytes());
            match control(&mp, "delete", "old") {
                Ok(()) => {}
                Err(e) => problems.push(format!(
                    "delete on a full disk: {}; status: {}",
                    errno_name(e),
                    status_text(&mp).lines().last().unwrap_or("")
                )),
            }
            let free = small.free_bytes();
            eprintln!("free after the delete: {} KiB", free / KIB);
            if free < 3 * MIB {
                problems.push(format!(
                    "deleting a snapshot that alone held 4 MiB freed {} KiB",
                    free / KIB
                ));
            }
            if m.snapshot_names().contains("old.raw") {
                problems.push("old.raw is still listed after its delete".into());
            }
            // The freed space takes new data.
            match live
                .write_all_at(&chunk_data(seed, late), late * CHUNK)
                .and_then(|()| live.sync_all())
            {
                Ok(()) => written.push(late),
                Err(e) => problems.push(format!(
                    "a 1 MiB write to live.raw after the delete freed space: {e}"
                )),
            }
        },
    );
    let log = umount_noting_problems(&mut m, &mut problems);
    if !log.contains("emptying snapshot") {
        problems.push("the delete did not need the in-place path: the disk was not full".into());
    }
    drop(m);
    if let Some(fill) = fill {
        fs::remove_file(fill).unwrap();
    }
    if let Some(p) = check_problems(&image, false) {
        problems.push(format!("after a delete on a full disk: {p}"));
    }
    let names: Vec<String> = snapshots(&image).into_iter().map(|s| s.name).collect();
    if names != ["later"] {
        problems.push(format!("snapshots after the delete: {names:?}"));
    }
    // The live disk and the remaining snapshot read as written.
    let scratch = workdir();
    let raw = convert_to_raw_elsewhere(&image, scratch.path());
    let f = File::open(&raw).unwrap();
    let mut want = vec![0x22u8; 4 * MIB as usize];
    want.resize(8 * MIB as usize, 0x11);
    let mut got = vec![0u8; 16 * MIB as usize];
    f.read_exact_at(&mut got, 0).unwrap();
    if got[..8 * MIB as usize] != want[..] || got[8 * MIB as usize..].iter().any(|&b| b != 0x33) {
        problems.push("live 0..16M changed".into());
    }
    for &i in &written {
        let mut got = vec![0u8; CHUNK as usize];
        f.read_exact_at(&mut got, i * CHUNK).unwrap();
        if got != chunk_data(seed, i) {
            problems.push(format!("live chunk {i} (fsynced) reads wrong"));
        }
    }
    let later = scratch.path().join("later.raw");
    qemu_img(&[
        "convert",
        "-U",
        "-l",
        "snapshot.name=later",
        "-O",
        "raw",
        image.to_str().unwrap(),
        later.to_str().unwrap(),
    ]);
    let later_bytes = read_all(&later);
    if later_bytes[..8 * MIB as usize] != want[..]
        || later_bytes[8 * MIB as usize..].iter().any(|&b| b != 0)
    {
        problems.push("snapshot later changed".into());
    }
    assert_no_problems(&problems, log);
}

/// A pull (`pull`, and the delete of a layer, which pulls it into the layer above) that runs out
/// of space in the top fails, changes nothing the disk reads, and leaves no residue: after a
/// clean unmount `qemu-img check` of the top finds no leaked cluster (what the pull allocated is
/// mapped, or given back), and the top still reads through its backing file as before
/// (issue 16 point 4).
#[test]
fn degrade_enospc_during_pull_leaves_no_leak() {
    let small = SmallFs::new(FS_SIZE);
    let dir = workdir();
    let base = dir.path().join("base.qcow2");
    create_qcow2(&base, 128 * MIB, "", None);
    // 80 MiB in the base: more than the small file system holds.
    let cmds: Vec<String> = (0..10)
        .map(|i| format!("write -P {} {} 8M", 0x50 + i, i * 8 * MIB + 256 * KIB))
        .collect();
    qemu_io_s(&base, &cmds);
    let top = small.path().join("top.qcow2");
    create_qcow2(&top, 128 * MIB, "", Some((base.to_str().unwrap(), "qcow2")));
    qemu_io(&top, &["write -P 0x61 4M 1M", "write -P 0x62 100M 1M"]);
    let scratch = workdir();
    let oracle = convert_to_raw_elsewhere(&top, scratch.path());

    let mut m = Mount::new(&top);
    let mp = m.path().to_path_buf();
    let context = mount_context(&mp);
    let mut problems = Vec::new();
    with_watchdog(
        &mp,
        Duration::from_secs(60),
        Duration::from_secs(150),
        "pull into a full file system",
        &context,
        |progress| {
            for (file, arg) in [("pull", ""), ("delete", "base")] {
                progress.tick();
                refused_for_lack_of_space(&mp, file, arg, &mut problems);
                let live = mp.join("live.raw");
                if let Ok(f) = File::open(&live) {
                    drop_file_cache(&f);
                }
                if let Err(e) = compare_files(&live, &oracle) {
                    problems.push(format!("live.raw after the failed {file} {arg}: {e}"));
                }
            }
        },
    );
    let log = umount_noting_problems(&mut m, &mut problems);
    drop(m);
    if let Err(e) = qemu_compare(&top, &oracle) {
        problems.push(format!("after unmounting: {e}"));
    }
    if let Some(p) = check_problems(&top, false) {
        problems.push(format!("after the failed pulls and a clean unmount: {p}"));
    }
    if backing_of(&top).as_deref() != Some(base.to_str().unwrap()) {
        problems.push(format!(
            "the top's backing file changed: {:?}",
            backing_of(&top)
        ));
    }
    assert_no_problems(&problems, log);
}

/// The backing file the header of `image` names.
fn backing_of(image: &Path) -> Option<String> {
    info_json(image)["backing-filename"]
        .as_str()
        .map(str::to_owned)
}
