//! Real VM state (QEMU's `savevm`) in internal snapshots: `snapshots/NAME.vmstate` shows it byte
//! for byte, and every snapfs operation keeps it loadable (`loadvm`). Uses QEMU's system emulator
//! with no guest OS (tests/common/qemu_vm.rs).

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::common::qemu_vm::Vm;
use crate::common::snapshot_support::{control_ok, pwrite};
use crate::common::*;

fn new_image(dir: &Path, name: &str, backing: Option<&Path>) -> PathBuf {
    let img = dir.join(name);
    let b = backing.map(|b| b.display().to_string());
    create_qcow2(&img, 64 * MIB, "", b.as_deref().map(|b| (b, "qcow2")));
    qemu_io(&img, &["write -P 0x5a 0 1M", "write -P 0xa5 32M 64k"]);
    img
}

/// A running VM's checkpoint: `savevm NAME` on `image`, then the VM quits.
fn savevm(image: &Path, names: &[&str]) -> Vm {
    let mut vm = Vm::start(image);
    for name in names {
        vm.savevm(name);
    }
    vm
}

/// What QEMU itself reads as snapshot `tag`'s VM state, found without snapfs: on a copy of the
/// image, `qemu-img snapshot -a` makes the snapshot's L1 table (VM state entries included) the
/// active one, `qemu-img resize` grows the disk past the state (an image without a backing file
/// is not zeroed when it grows), and `qemu-img convert` reads those guest bytes through QEMU's
/// own mapping code. The state starts at QEMU's `qcow2_vm_state_offset`: the disk size rounded up
/// to whole L1 entries (512 MiB for a 64 MiB disk with 64 KiB clusters).
fn qemu_vm_state(image: &Path, tag: &str, work: &Path) -> Vec<u8> {
    let snap = snapshot_by_name(image, tag);
    let cluster = cluster_size(image).expect("cluster size");
    let per_l1 = cluster * (cluster / 8);
    let offset = virtual_size(image).div_ceil(per_l1) * per_l1;
    let copy = work.join(format!("oracle-{tag}.qcow2"));
    fs::copy(image, &copy).unwrap();
    qemu_img(&["snapshot", "-a", tag, copy.to_str().unwrap()]);
    let grown = (offset + snap.vm_state_size).div_ceil(cluster) * cluster;
    qemu_img(&["resize", copy.to_str().unwrap(), &grown.to_string()]);
    let raw = work.join(format!("oracle-{tag}.raw"));
    qemu_img(&[
        "convert",
        "-O",
        "raw",
        copy.to_str().unwrap(),
        raw.to_str().unwrap(),
    ]);
    let all = fs::read(&raw).unwrap();
    fs::remove_file(&raw).unwrap();
    fs::remove_file(&copy).unwrap();
    all[offset as usize..(offset + snap.vm_state_size) as usize].to_vec()
}

/// `NAME.vmstate` must be QEMU's saved state itself, read-only, with its snapshot's time and
/// extended attributes.
fn assert_vm_state_file(m: &Mount, disk: &str, state: &str, want: &[u8]) {
    let disk_file = m.snapshot(disk);
    let file = m.snapshot(state);
    let got = fs::read(&file).unwrap_or_else(|e| panic!("read {}: {e}", file.display()));
    assert_eq!(
        &got[..4],
        b"QEVM",
        "{state} does not start with QEMU's magic"
    );
    assert_eq!(
        got.len(),
        want.len(),
        "{state}: size differs from vm-state-size"
    );
    if let Some(i) = got.iter().zip(want).position(|(a, b)| a != b) {
        panic!("{state} differs from what QEMU saved, first at byte {i}");
    }
    let md = fs::metadata(&file).unwrap();
    let disk_md = fs::metadata(&disk_file).unwrap();
    assert_eq!(md.permissions().mode() & 0o222, 0, "{state} is writable");
    assert_eq!(
        (md.mtime(), md.mtime_nsec()),
        (disk_md.mtime(), disk_md.mtime_nsec())
    );
    let names = listxattr(&disk_file);
    assert_eq!(listxattr(&file), names, "{state}: xattr names");
    for name in &names {
        assert_eq!(
            getxattr(&file, name),
            getxattr(&disk_file, name),
            "{state}: {name}"
        );
    }
    let err = fs::OpenOptions::new().write(true).open(&file).unwrap_err();
    assert!(
        matches!(err.raw_os_error(), Some(libc::EACCES) | Some(libc::EROFS)),
        "opening {state} for writing: {err}"
    );
}

/// `snapshots/NAME.vmstate` beside `NAME.raw` for the top's snapshot taken by a running VM, and
/// `LAYER@TAG.vmstate` for one inside a backing file; snapshots without VM state get none.
#[test]
fn vm_state_files_hold_what_qemu_saved() {
    let dir = workdir();
    let base = new_image(dir.path(), "base.qcow2", None);
    let vm = savevm(&base, &["boot"]);
    eprintln!("timings: {}", vm.timings_line());
    vm.quit();
    let top = new_image(dir.path(), "top.qcow2", Some(&base));
    snapshot_create(&top, "disk-only");
    let vm = savevm(&top, &["running"]);
    vm.quit();

    let want_top = qemu_vm_state(&top, "running", dir.path());
    let want_base = qemu_vm_state(&base, "boot", dir.path());
    assert_eq!(&want_top[..4], b"QEVM", "the oracle found no VM state");

    let m = Mount::with_args(&top, &["-r"]);
    let names = m.snapshot_names();
    assert!(
        names.contains("running.vmstate") && names.contains("base@boot.vmstate"),
        "{names:?}"
    );
    assert!(!names.contains("disk-only.vmstate"), "{names:?}");
    assert_vm_state_file(&m, "running.raw", "running.vmstate", &want_top);
    assert_vm_state_file(&m, "base@boot.raw", "base@boot.vmstate", &want_base);
    let info: serde_json::Value =
        serde_json::from_slice(&fs::read(m.path().join("info.json")).unwrap()).unwrap();
    let view = info["views"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["file"] == "snapshots/running.raw")
        .expect("running.raw in info.json");
    assert_eq!(view["vm-state-file"], "snapshots/running.vmstate", "{view}");
}

/// After snapfs wrote the disk, created and deleted other snapshots, reverted and committed,
/// `loadvm` still restores the checkpoint and the VM runs; the image checks clean and the VM
/// state file reads the same bytes as before.
#[test]
fn loadvm_works_after_every_snapfs_operation() {
    let dir = workdir();
    let base = new_image(dir.path(), "base.qcow2", None);
    let top = new_image(dir.path(), "top.qcow2", Some(&base));
    let vm = savevm(&top, &["cp1", "cp2"]);
    vm.quit();
    let want = qemu_vm_state(&top, "cp1", dir.path());

    {
        let m = Mount::new(&top);
        let live = m.live();
        pwrite(&live, 0, &vec![0x11; 256 * 1024]);
        pwrite(&live, 64 * MIB - 4096, &[0x22; 4096]);
        control_ok(m.path(), "create", "other");
        pwrite(&live, 8 * MIB, &vec![0x33; 128 * 1024]);
        control_ok(m.path(), "delete", "cp2");
        control_ok(m.path(), "delete", "other");
        control_ok(m.path(), "revert", "cp1");
        pwrite(&live, 16 * MIB, &vec![0x44; 64 * 1024]);
        control_ok(m.path(), "commit", "");
        let names = m.snapshot_names();
        assert!(
            !names.contains("cp2.vmstate"),
            "deleted with cp2: {names:?}"
        );
        assert_vm_state_file(&m, "cp1.raw", "cp1.vmstate", &want);
    }
    qemu_img_check(&top).unwrap();
    qemu_img_check(&base).unwrap();
    assert_eq!(qemu_vm_state(&top, "cp1", dir.path()), want);

    let mut vm = Vm::start(&top);
    vm.assert_loadvm_runs("cp1", "after snapfs operations");
    eprintln!("timings: {}", vm.timings_line());
    vm.quit();
    qemu_img_check(&top).unwrap();
}
