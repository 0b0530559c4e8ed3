//! Real VM state (QEMU's `savevm`) in internal snapshots: `snapshots/NAME.vmstate`, and every
//! snapfs operation keeps it loadable (`loadvm`). Uses QEMU's system emulator with no guest OS
//! (tests/common/qemu_vm.rs).

use std::path::Path;

use crate::common::qemu_vm::Vm;
use crate::common::*;

fn new_image(dir: &Path, name: &str) -> std::path::PathBuf {
    let img = dir.join(name);
    create_qcow2(&img, 64 * MIB, "", None);
    qemu_io(&img, &["write -P 0x5a 0 1M", "write -P 0xa5 32M 64k"]);
    img
}

/// The test platform itself: the unpacked emulator runs, `savevm` stores VM state that
/// `qemu-img` sees, `loadvm` restores it and the VM runs again.
#[test]
fn platform_savevm_loadvm() {
    let dir = workdir();
    let img = new_image(dir.path(), "vm.qcow2");
    let mut vm = Vm::start(&img);
    vm.savevm("s1");
    vm.assert_loadvm_runs("s1", "right after savevm");
    eprintln!("timings: {}", vm.timings_line());
    vm.quit();
    let s1 = snapshot_by_name(&img, "s1");
    assert!(s1.vm_state_size > 0, "savevm stored no VM state: {s1:?}");
    qemu_img_check(&img).unwrap();
}
