//! Reading beside a running VM (`--force-share`, `-o force_share`): a real QEMU holds the top's
//! write lock (tests/common/qemu_vm.rs). Plain mounts are refused with a message that says what
//! `--force-share` gives; a force-share mount takes no lock that keeps the VM from running,
//! writing its snapshots or restarting, hides live.raw (it changes under a reader), shows the
//! backing layers and internal snapshots as QEMU reads them, marks each view `frozen` or
//! `best-effort`, and follows the snapshot table as the VM changes it (ESTALE for a snapshot
//! that is gone).

use std::fs::{self, OpenOptions};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::common::chain_support::assert_all_clean;
use crate::common::qemu_vm::Vm;
use crate::common::*;

const CONSISTENCY: &str = "user.snapfs.consistency";

/// base.qcow2 (data at 0 and 32 MiB) <- top.qcow2 (data at 4 MiB), 64 MiB.
fn chain(dir: &Path) -> (PathBuf, PathBuf) {
    let base = dir.join("base.qcow2");
    create_qcow2(&base, 64 * MIB, "", None);
    qemu_io(&base, &["write -P 0x5a 0 1M", "write -P 0xa5 32M 64k"]);
    let top = dir.join("top.qcow2");
    create_qcow2(&top, 64 * MIB, "", Some(("base.qcow2", "qcow2")));
    qemu_io(&top, &["write -P 0x3c 4M 1M"]);
    (base, top)
}

/// `snapfs mount ARGS IMAGE MP` in the background; its exit status and standard error.
fn mount_attempt(image: &Path, args: &[&str], mp: &Path) -> (bool, String) {
    let out = run_timeout(
        snapfs_cmd().arg("mount").args(args).arg(image).arg(mp),
        Duration::from_secs(60),
    );
    let ok = out.status.map(|s| s.success()) == Some(true);
    if ok {
        force_unmount(mp);
    }
    (ok, out.stderr)
}

fn assert_same_bytes(got: &Path, want: &Path, what: &str) {
    if let Err(e) = compare_files(got, want) {
        panic!("{what}: {e}");
    }
}

fn names_in(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("read_dir {}: {e}", dir.display()))
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[test]
fn force_share_reads_the_frozen_parts_beside_a_running_vm() {
    let dir = workdir();
    let (base, top) = chain(dir.path());
    let mut vm = Vm::start(&top);
    vm.savevm("cp1");

    // Without the option: refused, read-write and read-only alike, saying what the option gives.
    let mp = dir.path().join("mp");
    fs::create_dir(&mp).unwrap();
    for args in [&[][..], &["-r"]] {
        let (ok, stderr) = mount_attempt(&top, args, &mp);
        assert!(!ok, "snapfs mount {args:?} beside a running VM succeeded");
        for words in ["--force-share", "live.raw", "backing"] {
            assert!(
                stderr.contains(words),
                "snapfs mount {args:?}: the refusal should say what --force-share gives \
                 ({words:?} missing): {stderr}"
            );
        }
        assert_eq!(
            stderr.trim().lines().count(),
            1,
            "one line, please: {stderr}"
        );
    }

    let m = Mount::with_args(&top, &["--force-share"]);
    assert_eq!(
        names_in(m.path()),
        [
            "changes",
            "checkpoints",
            "control",
            "info.json",
            "snapshots"
        ],
        "live.raw of an image the VM writes must not be shown"
    );
    let info: serde_json::Value =
        serde_json::from_slice(&fs::read(m.path().join("info.json")).unwrap()).unwrap();
    let mut listed: Vec<&str> = info["views"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|v| v["file"].as_str())
        .collect();
    listed.sort();
    assert_eq!(
        listed,
        ["snapshots/base.raw", "snapshots/cp1.raw"],
        "info.json must list the views the mount shows (no live.raw)"
    );
    // Nor a change file that reads the live disk.
    let changes = names_in(&m.path().join("changes"));
    assert!(
        changes.iter().any(|n| n == "base..cp1.raw") && !changes.iter().any(|n| n.contains("live")),
        "changes/ must list the frozen pairs only: {changes:?}"
    );
    assert_eq!(
        fs::metadata(m.path().join("changes/cp1..live.raw"))
            .map_err(|e| e.raw_os_error())
            .err(),
        Some(Some(libc::ENOENT)),
        "a pair with the hidden live disk must not be reachable by name"
    );
    assert_eq!(
        names_in(&m.path().join("snapshots")),
        ["base.raw", "cp1.raw", "cp1.vmstate"]
    );
    assert_same_bytes(
        &m.snapshot("base.raw"),
        &convert_to_raw(&base, None),
        "base.raw",
    );
    let cp1 = snapshot_by_name(&top, "cp1");
    assert_same_bytes(
        &m.snapshot("cp1.raw"),
        &convert_snapshot_to_raw(&top, &cp1.id),
        "cp1.raw",
    );
    let state = fs::read(m.snapshot("cp1.vmstate")).unwrap();
    assert_eq!(state.len() as u64, cp1.vm_state_size);
    assert_eq!(&state[..4], b"QEVM");
    assert_eq!(
        getxattr_str(&m.snapshot("base.raw"), CONSISTENCY).as_deref(),
        Some("frozen"),
        "nobody writes base.qcow2"
    );
    for name in ["cp1.raw", "cp1.vmstate"] {
        assert_eq!(
            getxattr_str(&m.snapshot(name), CONSISTENCY).as_deref(),
            Some("best-effort"),
            "{name}: the VM writes its image"
        );
    }

    // The VM goes on: it writes a new snapshot beside the mount, which follows its table.
    assert_eq!(vm.status(), "VM status: running");
    vm.savevm("cp2");
    assert_eq!(
        m.snapshot_names().into_iter().collect::<Vec<_>>(),
        [
            "base.raw",
            "cp1.raw",
            "cp1.vmstate",
            "cp2.raw",
            "cp2.vmstate"
        ],
        "the snapshot table moved: snapfs must re-read it"
    );
    assert_same_bytes(
        &m.snapshot("cp1.raw"),
        &convert_snapshot_to_raw(&top, &cp1.id),
        "cp1.raw after the table moved",
    );
    // A snapshot the VM deletes is gone from the mount; a name still cached is stale.
    let out = vm.hmp("delvm cp1");
    assert!(out.trim().is_empty(), "delvm cp1: {out}");
    match fs::File::open(m.snapshot("cp1.raw")) {
        Err(e) if matches!(e.raw_os_error(), Some(libc::ESTALE) | Some(libc::ENOENT)) => {}
        other => panic!("opening cp1.raw after delvm: {other:?}, ESTALE or ENOENT expected"),
    }
    assert!(!m.snapshot_names().contains("cp1.raw"));

    // The VM restarts while the mount stays, and loads its checkpoint.
    vm.quit();
    let mut vm = Vm::start(&top);
    vm.assert_loadvm_runs("cp2", "restarted beside a --force-share mount");
    // A second force-share mount beside both, through -o.
    let m2 = Mount::with_args(&top, &["-o", "force_share"]);
    assert!(m2.snapshot_names().contains("cp2.raw"));
    drop(m2);
    drop(m);
    eprintln!("timings: {}", vm.timings_line());
    vm.quit();
    assert_all_clean(dir.path(), "after the VM and the mounts");
}

/// With nobody writing the image, a force-share mount shows live.raw too, read-only, and every
/// view is frozen; `--force-share` cannot be combined with a read-write mount.
#[test]
fn force_share_without_a_writer_is_a_frozen_read_only_mount() {
    let dir = workdir();
    let (_base, top) = chain(dir.path());
    qemu_img(&["snapshot", "-c", "s1", top.to_str().unwrap()]);
    let mp = dir.path().join("mp");
    fs::create_dir(&mp).unwrap();
    let (ok, stderr) = mount_attempt(&top, &["--force-share", "-o", "rw"], &mp);
    assert!(!ok, "--force-share with -o rw mounted");
    assert!(stderr.contains("force"), "{stderr}");

    let m = Mount::with_args(&top, &["--force-share"]);
    assert_same_bytes(&m.live(), &convert_to_raw(&top, None), "live.raw");
    for file in [m.live(), m.snapshot("s1.raw"), m.snapshot("base.raw")] {
        assert_eq!(
            getxattr_str(&file, CONSISTENCY).as_deref(),
            Some("frozen"),
            "{}",
            file.display()
        );
    }
    let err = OpenOptions::new().write(true).open(m.live()).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EROFS), "{err}");
    // A VM may start meanwhile: the mount does not stand in its way.
    let vm = Vm::start(&top);
    vm.quit();
}
