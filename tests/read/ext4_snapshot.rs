//! A real file system through snapfs: an ext4 disk converted to qcow2, snapshot `before`, files
//! changed afterwards. The snapshot view, attached read-only to a loop device and mounted, must
//! show the old files; live.raw must show the new ones. Both must pass `e2fsck -fn`.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::common::*;

/// A file system mounted by the test; unmounted on drop (then lazily if busy).
struct FsMount {
    dir: PathBuf,
}

impl FsMount {
    fn new(source: &Path, dir: &Path, opts: &str) -> FsMount {
        fs::create_dir_all(dir).unwrap();
        run(Command::new("mount")
            .arg("-o")
            .arg(opts)
            .arg(source)
            .arg(dir));
        FsMount {
            dir: dir.to_path_buf(),
        }
    }
}

impl Drop for FsMount {
    fn drop(&mut self) {
        if !force_unmount(&self.dir) {
            eprintln!("could not unmount {}", self.dir.display());
        }
    }
}

/// A loop device attached by the test; detached on drop.
struct LoopDev {
    dev: String,
}

impl LoopDev {
    fn attach_read_only(file: &Path) -> LoopDev {
        let out = run(Command::new("losetup")
            .args(["-r", "-f", "--show"])
            .arg(file));
        let dev = String::from_utf8_lossy(&out.stdout).trim().to_string();
        assert!(dev.starts_with("/dev/loop"), "losetup printed {dev:?}");
        LoopDev { dev }
    }
}

impl Drop for LoopDev {
    fn drop(&mut self) {
        for _ in 0..50 {
            let r = run_timeout(
                Command::new("losetup").arg("-d").arg(&self.dev),
                Duration::from_secs(20),
            );
            if r.status.map(|s| s.success()) == Some(true) {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        eprintln!("could not detach {}", self.dev);
    }
}

/// Deterministic, incompressible-looking bytes.
fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e3779b97f4a7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

const OLD_HELLO: &str = "hello from before the snapshot\n";
const NEW_HELLO: &str = "hello from after the snapshot, longer than before\n";

fn state1_files(root: &Path) {
    fs::write(root.join("hello.txt"), OLD_HELLO).unwrap();
    fs::write(root.join("keep.txt"), "unchanged\n").unwrap();
    fs::write(root.join("gone.txt"), "deleted after the snapshot\n").unwrap();
    fs::write(root.join("big.bin"), noise(3 * MIB as usize, 1)).unwrap();
    fs::create_dir(root.join("dir")).unwrap();
    fs::write(root.join("dir/nested.txt"), "nested, old\n").unwrap();
}

fn state2_changes(root: &Path) {
    fs::write(root.join("hello.txt"), NEW_HELLO).unwrap();
    fs::remove_file(root.join("gone.txt")).unwrap();
    fs::write(root.join("new.txt"), "created after the snapshot\n").unwrap();
    fs::write(root.join("big.bin"), noise(2 * MIB as usize + 12345, 2)).unwrap();
    fs::write(root.join("dir/nested.txt"), "nested, new\n").unwrap();
}

/// Builds `disk.qcow2`: the ext4 file system in state 1, snapshot `before`, then state 2 written
/// over it with `qemu-img convert -n`. Checks the oracle: the snapshot equals state 1 and the
/// live disk equals state 2.
fn build(dir: &Path) -> PathBuf {
    let raw1 = dir.join("state1.raw");
    let raw2 = dir.join("state2.raw");
    let f = fs::File::create(&raw1).unwrap();
    f.set_len(64 * MIB).unwrap();
    drop(f);
    run(Command::new("mkfs.ext4")
        .args(["-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0"])
        .arg(&raw1));
    {
        let m = FsMount::new(&raw1, &dir.join("m1"), "loop");
        state1_files(&m.dir);
        run(Command::new("sync").arg("-f").arg(m.dir.join("hello.txt")));
    }
    let img = dir.join("disk.qcow2");
    qemu_img(&[
        "convert",
        "-q",
        "-f",
        "raw",
        "-O",
        "qcow2",
        raw1.to_str().unwrap(),
        img.to_str().unwrap(),
    ]);
    snapshot_create(&img, "before");
    fs::copy(&raw1, &raw2).unwrap();
    {
        let m = FsMount::new(&raw2, &dir.join("m2"), "loop");
        state2_changes(&m.dir);
    }
    qemu_img(&[
        "convert",
        "-q",
        "-n",
        "-f",
        "raw",
        "-O",
        "qcow2",
        raw2.to_str().unwrap(),
        img.to_str().unwrap(),
    ]);
    // oracle sanity
    qemu_img(&[
        "compare",
        "-q",
        "-f",
        "qcow2",
        "-F",
        "raw",
        img.to_str().unwrap(),
        raw2.to_str().unwrap(),
    ]);
    assert_files_equal(&convert_to_raw(&img, Some("before")), &raw1);
    qemu_img_check(&img).unwrap();
    img
}

fn e2fsck(dev: &str) -> Result<(), String> {
    let r = run_timeout(
        Command::new("e2fsck").args(["-f", "-n", dev]),
        Duration::from_secs(300),
    );
    match r.status {
        Some(s) if s.success() => Ok(()),
        s => Err(format!("e2fsck -fn {dev}: {s:?}\n{}{}", r.stdout, r.stderr)),
    }
}

fn read(path: &Path) -> Result<Vec<u8>, String> {
    fs::read(path).map_err(|e| format!("read {}: {e}", path.display()))
}

#[test]
fn ext4_in_snapshot_view_has_the_old_files() {
    let dir = workdir();
    let img = build(dir.path());
    let m = Mount::new(&img);
    let view = m.snapshot("before.raw");
    let lo = LoopDev::attach_read_only(&view);
    if let Err(e) = e2fsck(&lo.dev) {
        panic!("the snapshot's file system is not clean: {e}");
    }
    let fsm = FsMount::new(Path::new(&lo.dev), &dir.path().join("snap"), "ro,noload");
    let root = &fsm.dir;
    let mut problems = Vec::new();
    let expect = |p: &str, want: Vec<u8>, problems: &mut Vec<String>| match read(&root.join(p)) {
        Ok(got) if got == want => {}
        Ok(got) => problems.push(format!(
            "{p}: {} bytes, not the old content ({} bytes)",
            got.len(),
            want.len()
        )),
        Err(e) => problems.push(e),
    };
    expect("hello.txt", OLD_HELLO.into(), &mut problems);
    expect("keep.txt", b"unchanged\n".to_vec(), &mut problems);
    expect(
        "gone.txt",
        b"deleted after the snapshot\n".to_vec(),
        &mut problems,
    );
    expect("big.bin", noise(3 * MIB as usize, 1), &mut problems);
    expect("dir/nested.txt", b"nested, old\n".to_vec(), &mut problems);
    if root.join("new.txt").exists() {
        problems.push("new.txt (created after the snapshot) exists in the snapshot".into());
    }
    assert!(
        problems.is_empty(),
        "problems:\n- {}",
        problems.join("\n- ")
    );
}

#[test]
fn ext4_in_live_view_has_the_new_files() {
    let dir = workdir();
    let img = build(dir.path());
    let m = Mount::new(&img);
    let lo = LoopDev::attach_read_only(&m.live());
    if let Err(e) = e2fsck(&lo.dev) {
        panic!("the live file system is not clean: {e}");
    }
    let fsm = FsMount::new(Path::new(&lo.dev), &dir.path().join("live"), "ro,noload");
    let root = &fsm.dir;
    let mut problems = Vec::new();
    let expect = |p: &str, want: Vec<u8>, problems: &mut Vec<String>| match read(&root.join(p)) {
        Ok(got) if got == want => {}
        Ok(got) => problems.push(format!(
            "{p}: {} bytes, not the new content ({} bytes)",
            got.len(),
            want.len()
        )),
        Err(e) => problems.push(e),
    };
    expect("hello.txt", NEW_HELLO.into(), &mut problems);
    expect("keep.txt", b"unchanged\n".to_vec(), &mut problems);
    expect(
        "new.txt",
        b"created after the snapshot\n".to_vec(),
        &mut problems,
    );
    expect("big.bin", noise(2 * MIB as usize + 12345, 2), &mut problems);
    expect("dir/nested.txt", b"nested, new\n".to_vec(), &mut problems);
    if root.join("gone.txt").exists() {
        problems.push("gone.txt (deleted after the snapshot) still exists in live".into());
    }
    assert!(
        problems.is_empty(),
        "problems:\n- {}",
        problems.join("\n- ")
    );
}
