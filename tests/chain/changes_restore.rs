//! A full and incremental backup and restore cycle as README shows it (issue 17, point 5):
//! `cp --sparse=always` of a snapshot, then of `changes/PARENT..SNAPSHOT.raw` and `.json` for
//! three later snapshots, restored with `cp` and `snapfs apply`, byte for byte equal to
//! `qemu-img convert -l snapshot.name=` after each increment. Between the points: data written,
//! ranges discarded (`qemu-io discard`), zeroed (`write -z`), overwritten with zero bytes (which
//! `cp --sparse=always` turns into holes of the increment) and the disk grown. Restored onto a
//! file and onto a loop block device.

use std::fs;
use std::path::Path;
use std::process::Command;

use crate::common::write_support::LoopDev;
use crate::common::*;

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

const M: u64 = MIB;

#[test]
fn full_and_three_increments_restore_byte_exact() {
    let work = workdir();
    let dir = work.path();
    let img = dir.join("vm.qcow2");
    create_qcow2(&img, 32 * M, "cluster_size=65536", None);
    qemu_io(
        &img,
        &["write -P 1 0 6M", "write -P 2 10M 2M", "write -P 3 20M 1M"],
    );
    snapshot_create(&img, "b0");
    qemu_io(
        &img,
        &[
            "write -P 4 1M 64k",
            "discard 2M 1M",
            "write -z 10M 512k",
            "write -P 5 25M 100k",
        ],
    );
    snapshot_create(&img, "b1");
    qemu_io(
        &img,
        &[
            "write -P 0 4M 256k",
            "write -P 6 2M 64k",
            "discard 20M 64k",
            "write -z 25M 64k",
        ],
    );
    snapshot_create(&img, "b2");
    qemu_img(&["resize", "-q", s(&img), "40M"]);
    qemu_io(
        &img,
        &[
            "write -P 7 36M 1M",
            "discard 0 64k",
            "write -z 11M 64k",
            "write -P 8 5M 4k",
        ],
    );
    snapshot_create(&img, "b3");
    let points = ["b0", "b1", "b2", "b3"];

    let backup = dir.join("backup");
    fs::create_dir(&backup).unwrap();
    {
        let m = Mount::with_args(&img, &["-r"]);
        let changes = m.path().join("changes");
        run(Command::new("cp").args([
            "--sparse=always",
            s(&m.snapshot("b0.raw")),
            s(&backup.join("full-b0.raw")),
        ]));
        for pair in points.windows(2) {
            let name = format!("{}..{}", pair[0], pair[1]);
            for ext in ["raw", "json"] {
                run(Command::new("cp").args([
                    "--sparse=always",
                    s(&changes.join(format!("{name}.{ext}"))),
                    s(&backup.join(format!("{name}.{ext}"))),
                ]));
            }
        }
    }

    let oracle = |point: &str| {
        fs::read(convert_snapshot_to_raw(
            &img,
            &snapshot_by_name(&img, point).id,
        ))
        .unwrap()
    };
    let restored = dir.join("restore.raw");
    run(Command::new("cp").args([
        "--sparse=always",
        s(&backup.join("full-b0.raw")),
        s(&restored),
    ]));
    // The device is larger than every point: apply leaves its tail alone.
    let device_file = dir.join("device.img");
    fs::copy(&restored, &device_file).unwrap();
    fs::OpenOptions::new()
        .write(true)
        .open(&device_file)
        .unwrap()
        .set_len(48 * M)
        .unwrap();
    let device = LoopDev::attach(&device_file);

    for pair in points.windows(2) {
        let increment = backup.join(format!("{}..{}.raw", pair[0], pair[1]));
        run(snapfs_cmd().args(["apply", s(&increment), s(&restored)]));
        run(snapfs_cmd().args(["apply", s(&increment), s(device.path())]));
        let want = oracle(pair[1]);
        let got = fs::read(&restored).unwrap();
        assert!(
            got == want,
            "restored file after {} differs from qemu-img convert (sizes {} and {})",
            pair[1],
            got.len(),
            want.len()
        );
        let on_device = fs::read(device.path()).unwrap();
        assert!(
            on_device[..want.len()] == want[..],
            "device after {} differs from qemu-img convert",
            pair[1]
        );
    }
    // An increment with another pair's list is refused, and nothing is written.
    let before = fs::read(&restored).unwrap();
    let out = run_status(snapfs_cmd().args([
        "apply",
        "--ranges",
        s(&backup.join("b0..b1.json")),
        s(&backup.join("b2..b3.raw")),
        s(&restored),
    ]));
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not of the same pair"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(fs::read(&restored).unwrap() == before);
}
