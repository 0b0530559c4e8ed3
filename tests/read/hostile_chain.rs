//! Hostile backing chains (docs/design.md section 5): loops, absurd depth, missing backing files, and
//! backing files that are not image files (a directory, character devices, a FIFO). Each is refused
//! with one line naming the file at fault, in bounded time and memory, and nothing is written;
//! a chain of exactly `chain::MAX_DEPTH` (256) layers is accepted and reads through every layer.

use std::path::{Path, PathBuf};

use crate::common::hostile_support::*;
use crate::common::*;

/// snapfs's `chain::MAX_DEPTH`: the deepest chain it opens.
const MAX_DEPTH: usize = 256;

fn small(dir: &Path, name: &str, backing: Option<(&str, &str)>) -> PathBuf {
    let img = dir.join(name);
    create_qcow2(&img, MIB, "cluster_size=4096", backing);
    img
}

/// Points `img`'s backing file name at `name` (format as given) without qemu-img checking it.
fn rebase_unsafe(img: &Path, name: &str, format: &str) {
    qemu_img(&[
        "rebase",
        "-u",
        "-f",
        "qcow2",
        "-b",
        name,
        "-F",
        format,
        img.to_str().unwrap(),
    ]);
}

#[test]
fn backing_loops() {
    let dir = workdir();
    let d = dir.path();
    let mut problems = Vec::new();
    // a -> b -> c -> a
    let a = small(d, "a.qcow2", None);
    small(d, "c.qcow2", Some(("a.qcow2", "qcow2")));
    small(d, "b.qcow2", Some(("c.qcow2", "qcow2")));
    rebase_unsafe(&a, "b.qcow2", "qcow2");
    problems.extend(refused("loop of three", &a, &["loop", "a.qcow2"]));
    // Through a symbolic link and a "../" detour: top -> sub/../link.qcow2 -> top.
    let top = small(d, "top.qcow2", None);
    std::fs::create_dir(d.join("sub")).unwrap();
    std::os::unix::fs::symlink(&top, d.join("link.qcow2")).unwrap();
    rebase_unsafe(&top, "sub/../link.qcow2", "qcow2");
    problems.extend(refused("loop through a symlink", &top, &["loop"]));
    // A symbolic link loop as the backing file.
    let s = small(d, "s.qcow2", None);
    std::os::unix::fs::symlink("self-link", d.join("self-link")).unwrap();
    rebase_unsafe(&s, "self-link", "raw");
    problems.extend(refused("symlink loop", &s, &["self-link"]));
    assert_no_problems(&problems);
}

/// Builds `depth` layers: base.qcow2 (with data) and overlays l1 .. l{depth-1}; returns the top.
fn chain_of(dir: &Path, depth: usize) -> PathBuf {
    let mut top = small(dir, "base.qcow2", None);
    qemu_io(&top, &["write -P 0x42 0 64k", "write -P 0x43 512k 4k"]);
    for i in 1..depth {
        let below = top.file_name().unwrap().to_str().unwrap().to_owned();
        let name = format!("l{i}.qcow2");
        let img = dir.join(&name);
        // -u: qemu-img would open the whole chain below each time.
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-u",
            "-o",
            "cluster_size=4096",
            "-b",
            &below,
            "-F",
            "qcow2",
            img.to_str().unwrap(),
            "1M",
        ]);
        top = img;
    }
    if depth > 1 {
        // One write in the middle of the chain.
        qemu_io(
            &dir.join(format!("l{}.qcow2", depth / 2)),
            &["write -P 0x44 128k 4k"],
        );
    }
    top
}

#[test]
fn chain_deeper_than_the_limit_is_refused() {
    let mut problems = Vec::new();
    for depth in [MAX_DEPTH + 1, 300] {
        let dir = workdir();
        let top = chain_of(dir.path(), depth);
        problems.extend(refused(
            &format!("depth {depth}"),
            &top,
            &["deeper than 256"],
        ));
    }
    assert_no_problems(&problems);
}

/// A chain of exactly MAX_DEPTH layers mounts, reads through all of them, and stays within the
/// memory limit; `snapfs info` lists it.
#[test]
fn chain_at_the_limit_is_accepted() {
    let dir = workdir();
    let top = chain_of(dir.path(), MAX_DEPTH);
    let info = run_measured(snapfs_cmd().arg("info").arg(&top), COMMAND_LIMIT);
    let mut problems = Vec::new();
    if info.status.map(|s| s.success()) != Some(true) {
        problems.push(format!("snapfs info: {:?}: {}", info.status, info.stderr));
    }
    if info.max_rss_kib > MEMORY_LIMIT_KIB {
        problems.push(format!("snapfs info peak memory {} KiB", info.max_rss_kib));
    }
    let oracle = convert_to_raw(&top, None);
    let before = read_all(&top);
    problems.extend(mounts_with_eio(
        "depth 256",
        &top,
        &[Expect {
            file: "live.raw",
            oracle: &oracle,
            bad: &[],
        }],
        256 * KIB,
        "",
    ));
    // The bottom layer's view reads through nothing; the middle one through half the chain.
    match HostileMount::start(&top, &["-r"]) {
        Err(m) => problems.push(format!("mount refused: {}", m.stderr)),
        Ok(mount) => {
            let n = std::fs::read_dir(mount.path().join("snapshots"))
                .map(|d| d.count())
                .unwrap_or(0);
            if n != MAX_DEPTH - 1 {
                problems.push(format!("{n} layer views, want {}", MAX_DEPTH - 1));
            }
            let base = mount.read(&mount.snapshot("base.raw"), 0, 4096);
            if !matches!(&base, Ok(d) if d.iter().all(|&b| b == 0x42)) {
                problems.push(format!("base.raw reads {base:?}"));
            }
            drop(mount);
        }
    }
    if read_all(&top) != before {
        problems.push("the top image was modified".into());
    }
    assert_no_problems(&problems);
}

#[test]
fn missing_backing_file_in_the_middle() {
    let dir = workdir();
    let d = dir.path();
    small(d, "gone.qcow2", None);
    small(d, "mid.qcow2", Some(("gone.qcow2", "qcow2")));
    let top = small(d, "top.qcow2", Some(("mid.qcow2", "qcow2")));
    std::fs::remove_file(d.join("gone.qcow2")).unwrap();
    assert_no_problems(&refused(
        "missing backing file",
        &top,
        &["mid.qcow2", "gone.qcow2"],
    ));
}

/// Backing files that are not image files: a directory, character devices (QEMU refuses those
/// too, unless told they are raw host devices), and a backing file whose own header is hostile.
#[test]
fn backing_files_that_are_not_images() {
    let dir = workdir();
    let d = dir.path();
    let mut problems = Vec::new();
    std::fs::create_dir(d.join("a-directory")).unwrap();
    for (i, (label, name, format)) in [
        ("directory", "a-directory", "qcow2"),
        ("directory as raw", "a-directory", "raw"),
        ("/dev/null", "/dev/null", "raw"),
        ("/dev/zero", "/dev/zero", "raw"),
        ("/dev/null as qcow2", "/dev/null", "qcow2"),
    ]
    .into_iter()
    .enumerate()
    {
        let img = small(d, &format!("over-{i}.qcow2"), None);
        rebase_unsafe(&img, name, format);
        problems.extend(refused(label, &img, &[name]));
    }
    // A backing qcow2 file with a bad header: the message names that file and the field.
    let bad = small(d, "bad-base.qcow2", None);
    let top = small(d, "top.qcow2", Some(("bad-base.qcow2", "qcow2")));
    write_be_u64(&bad, 40, read_be_u64(&bad, 40) + 0x200);
    problems.extend(refused(
        "hostile backing header",
        &top,
        &["bad-base.qcow2", "L1"],
    ));
    // Formats snapfs does not read, and protocol names.
    let img = small(d, "vmdk-backed.qcow2", None);
    rebase_unsafe(&img, "base.vmdk", "vmdk");
    problems.extend(refused("backing format vmdk", &img, &["vmdk"]));
    assert_no_problems(&problems);
}

/// A FIFO as the backing file (or as the image itself) must be refused, not opened: opening a FIFO
/// for reading blocks until a writer appears, so `snapfs info` and the mount would hang forever.
#[test]

fn fifo_backing_file_is_refused_without_hanging() {
    let dir = workdir();
    let d = dir.path();
    let fifo = d.join("a-fifo");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: mkfifo with a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let img = small(d, "over-fifo.qcow2", None);
    rebase_unsafe(&img, "a-fifo", "raw");
    let mut problems = refused("FIFO backing file", &img, &["a-fifo"]);
    // The FIFO itself as the image (not read back: that would block too).
    let info = run_measured(snapfs_cmd().arg("info").arg(&fifo), COMMAND_LIMIT);
    problems.extend(refusal_problems("snapfs info FIFO", &info, &["a-fifo"]));
    assert_no_problems(&problems);
}
