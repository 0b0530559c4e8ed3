//! Attributes of the views: mtime = snapshot date, extended attributes, owner and mode,
//! info.json, stable listings, and `snapfs info`.

use std::collections::BTreeMap;
use std::fs::{self, OpenOptions};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::common::images::fill;
use crate::common::*;

const DATE1: u32 = 1_000_000_000; // 2001-09-09T01:46:40Z
const NSEC1: u32 = 123_456_789;
const DATE2: u32 = 1_500_000_000; // 2017-07-14T02:40:00Z
const VMSTATE2: u64 = 12345;
const BASE_MTIME: i64 = 1_234_567_890;

/// base.qcow2 <- top.qcow2; top has snapshots `first` (date patched to DATE1.NSEC1) and `second`
/// (date DATE2, vm-state-size patched to VMSTATE2). base.qcow2's mtime is set to BASE_MTIME.
/// The patched values are checked against qemu-img (the oracle).
fn build(dir: &Path) -> (PathBuf, PathBuf) {
    let base = dir.join("base.qcow2");
    let top = dir.join("top.qcow2");
    create_qcow2(&base, 32 * MIB, "", None);
    fill(&base, 64 * KIB, 32 * MIB, 1, None);
    create_qcow2(&top, 32 * MIB, "", Some(("base.qcow2", "qcow2")));
    fill(&top, 64 * KIB, 32 * MIB, 2, None);
    snapshot_create(&top, "first");
    fill(&top, 64 * KIB, 32 * MIB, 3, None);
    snapshot_create(&top, "second");
    fill(&top, 64 * KIB, 32 * MIB, 4, None);

    let entries = snapshot_entry_offsets(&top);
    assert_eq!(entries.len(), 2);
    write_be_u32(&top, entries[0] + 16, DATE1);
    write_be_u32(&top, entries[0] + 20, NSEC1);
    write_be_u32(&top, entries[1] + 16, DATE2);
    write_be_u32(&top, entries[1] + 20, 0);
    write_be_u32(&top, entries[1] + 32, VMSTATE2 as u32);
    if read_be_u32(&top, entries[1] + 36) >= 8 {
        // extra data: vm_state_size_large
        write_be_u64(&top, entries[1] + 40, VMSTATE2);
    }
    let snaps = snapshots(&top);
    assert_eq!(
        snaps[0].date_sec, DATE1 as i64,
        "qemu-img sees the patched date"
    );
    assert_eq!(snaps[0].date_nsec, NSEC1 as i64);
    assert_eq!(snaps[1].date_sec, DATE2 as i64);
    assert_eq!(
        snaps[1].vm_state_size, VMSTATE2,
        "qemu-img sees the patched vm state size"
    );
    qemu_img_check(&top).unwrap();

    set_mtime(&base, BASE_MTIME);
    (top, base)
}

fn set_mtime(path: &Path, secs: i64) {
    let c = std::ffi::CString::new(path.to_str().unwrap()).unwrap();
    let t = libc::timespec {
        tv_sec: secs as libc::time_t,
        tv_nsec: 0,
    };
    let times = [t, t];
    let r = unsafe { libc::utimensat(libc::AT_FDCWD, c.as_ptr(), times.as_ptr(), 0) };
    assert_eq!(r, 0, "utimensat: {}", std::io::Error::last_os_error());
}

fn canon(p: &Path) -> PathBuf {
    p.canonicalize()
        .unwrap_or_else(|e| panic!("canonicalize {}: {e}", p.display()))
}

#[test]
fn internal_snapshot_mtime_is_the_qcow2_date() {
    let dir = workdir();
    let (top, _) = build(dir.path());
    let m = Mount::new(&top);
    let mut problems = Vec::new();
    for (name, want) in [("first.raw", DATE1 as i64), ("second.raw", DATE2 as i64)] {
        let md = fs::metadata(m.snapshot(name)).unwrap();
        if md.mtime() != want {
            problems.push(format!(
                "snapshots/{name}: mtime {} but the qcow2 date-sec is {want}",
                md.mtime()
            ));
        }
    }
    assert!(
        problems.is_empty(),
        "problems:\n- {}",
        problems.join("\n- ")
    );
}

/// A layer without libvirt metadata: mtime = the layer file's mtime.
#[test]
fn layer_mtime_is_the_layer_file_mtime() {
    let dir = workdir();
    let (top, _) = build(dir.path());
    let m = Mount::new(&top);
    let md = fs::metadata(m.snapshot("base.raw")).unwrap();
    assert_eq!(
        md.mtime(),
        BASE_MTIME,
        "snapshots/base.raw mtime should be base.qcow2's mtime"
    );
}

#[test]
fn xattrs_on_every_view() {
    let dir = workdir();
    let (top, base) = build(dir.path());
    let m = Mount::new(&top);
    let mut problems = Vec::new();
    let top_c = canon(&top);
    let base_c = canon(&base);

    let mut check = |file: PathBuf, want: &[(&str, Option<&str>)], layer: &Path| {
        let names = listxattr(&file);
        for (attr, value) in want {
            match getxattr_str(&file, attr) {
                None => problems.push(format!("{}: no {attr}", file.display())),
                Some(got) => {
                    if let Some(v) = value {
                        if got != *v {
                            problems
                                .push(format!("{}: {attr} = {got:?}, want {v:?}", file.display()));
                        }
                    }
                    if !names.iter().any(|n| n == attr) {
                        problems.push(format!(
                            "{}: {attr} readable but not in listxattr {names:?}",
                            file.display()
                        ));
                    }
                }
            }
        }
        // user.snapfs.layer names the file behind the view (absolute, or relative to the top
        // image's directory)
        if let Some(l) = getxattr_str(&file, "user.snapfs.layer") {
            let p = Path::new(&l);
            let p = if p.is_absolute() {
                p.to_path_buf()
            } else {
                top.parent().unwrap().join(p)
            };
            match p.canonicalize() {
                Ok(c) if c == layer => {}
                other => problems.push(format!(
                    "{}: user.snapfs.layer = {l:?} ({other:?}), want {}",
                    file.display(),
                    layer.display()
                )),
            }
        }
    };

    check(
        m.live(),
        &[
            ("user.snapfs.kind", Some("live")),
            ("user.snapfs.layer", None),
        ],
        &top_c,
    );
    check(
        m.snapshot("first.raw"),
        &[
            ("user.snapfs.kind", Some("internal")),
            ("user.snapfs.id", Some("1")),
            ("user.snapfs.created", None),
            ("user.snapfs.layer", None),
            ("user.snapfs.vm-state-size", Some("0")),
        ],
        &top_c,
    );
    check(
        m.snapshot("second.raw"),
        &[
            ("user.snapfs.kind", Some("internal")),
            ("user.snapfs.id", Some("2")),
            ("user.snapfs.created", None),
            ("user.snapfs.layer", None),
            ("user.snapfs.vm-state-size", Some("12345")),
        ],
        &top_c,
    );
    check(
        m.snapshot("base.raw"),
        &[
            ("user.snapfs.kind", Some("external")),
            ("user.snapfs.layer", None),
        ],
        &base_c,
    );

    // created: RFC 3339, the qcow2 date
    for (name, secs) in [("first.raw", DATE1 as i64), ("second.raw", DATE2 as i64)] {
        let f = m.snapshot(name);
        if let Some(c) = getxattr_str(&f, "user.snapfs.created") {
            match parse_rfc3339(&c) {
                Some((s, _)) if s == secs => {}
                Some((s, _)) => problems.push(format!(
                    "{name}: user.snapfs.created = {c:?} is {s}, want {secs}"
                )),
                None => problems.push(format!(
                    "{name}: user.snapfs.created = {c:?} is not RFC 3339"
                )),
            }
        }
    }
    assert!(
        problems.is_empty(),
        "problems:\n- {}",
        problems.join("\n- ")
    );
}

#[test]
fn info_json_parses() {
    let dir = workdir();
    let (top, _) = build(dir.path());
    let m = Mount::new(&top);
    let text = fs::read_to_string(m.path().join("info.json")).expect("read info.json");
    let v: serde_json::Value = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("info.json is not JSON: {e}\n{text}"));
    assert!(v.is_object(), "info.json is not a JSON object: {text}");
    let md = fs::metadata(m.path().join("info.json")).unwrap();
    assert_eq!(
        md.len(),
        text.len() as u64,
        "info.json st_size differs from the bytes read"
    );
}

/// Two listings of snapshots/ give the same names in the same order, with the same inode numbers;
/// a snapshot with VM state has its `.vmstate` file beside it, one without has none.
#[test]
fn snapshot_listing_is_stable() {
    let dir = workdir();
    let (top, _) = build(dir.path());
    let m = Mount::new(&top);
    let list = || -> Vec<(String, u64)> {
        fs::read_dir(m.path().join("snapshots"))
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                let name = e.file_name().to_string_lossy().into_owned();
                let ino = fs::metadata(e.path()).unwrap().ino();
                (name, ino)
            })
            .collect()
    };
    let a = list();
    let b = list();
    assert_eq!(a, b, "two listings of snapshots/ differ");
    let names: Vec<&str> = a.iter().map(|(n, _)| n.as_str()).collect();
    let mut sorted = names.clone();
    sorted.sort();
    // `second` has VM state (vm-state-size VMSTATE2), so its state file is listed beside it.
    assert_eq!(
        sorted,
        ["base.raw", "first.raw", "second.raw", "second.vmstate"]
    );
    let state = fs::metadata(m.snapshot("second.vmstate")).unwrap();
    assert_eq!(
        state.len(),
        VMSTATE2,
        "second.vmstate is vm-state-size long"
    );
}

/// Owner and mode follow the image file; snapshot files have no write bits.
#[test]
fn owner_and_mode_follow_the_image() {
    let dir = workdir();
    let (top, _) = build(dir.path());
    let c = std::ffi::CString::new(top.to_str().unwrap()).unwrap();
    assert_eq!(unsafe { libc::chown(c.as_ptr(), 4321, 4322) }, 0);
    fs::set_permissions(&top, fs::Permissions::from_mode(0o640)).unwrap();
    let m = Mount::new(&top);
    let mut problems = Vec::new();
    let live = fs::metadata(m.live()).unwrap();
    if (live.uid(), live.gid()) != (4321, 4322) {
        problems.push(format!(
            "live.raw owner {}:{}, image 4321:4322",
            live.uid(),
            live.gid()
        ));
    }
    if live.mode() & 0o777 != 0o640 {
        problems.push(format!(
            "live.raw mode {:o}, image 640",
            live.mode() & 0o777
        ));
    }
    for name in ["first.raw", "second.raw"] {
        let md = fs::metadata(m.snapshot(name)).unwrap();
        if (md.uid(), md.gid()) != (4321, 4322) {
            problems.push(format!(
                "{name} owner {}:{}, image 4321:4322",
                md.uid(),
                md.gid()
            ));
        }
        if md.mode() & 0o777 != 0o440 {
            problems.push(format!(
                "{name} mode {:o}, want 440 (image 640 without write bits)",
                md.mode() & 0o777
            ));
        }
    }
    assert!(
        problems.is_empty(),
        "problems:\n- {}",
        problems.join("\n- ")
    );
}

/// `-o uid=N,gid=N` overrides the owner.
#[test]
fn uid_gid_options_set_the_owner() {
    let dir = workdir();
    let (top, _) = build(dir.path());
    let m = Mount::with_args(&top, &["-o", "uid=777,gid=778"]);
    for f in [m.live(), m.snapshot("first.raw"), m.snapshot("base.raw")] {
        let md = fs::metadata(&f).unwrap();
        assert_eq!((md.uid(), md.gid()), (777, 778), "{}", f.display());
    }
}

/// Snapshot files cannot be opened for writing (even by root), and every view is read-only.
#[test]
fn snapshot_files_refuse_writes() {
    let dir = workdir();
    let (top, _) = build(dir.path());
    let before: BTreeMap<String, Vec<u8>> = [("top", &top)]
        .iter()
        .map(|(k, p)| (k.to_string(), read_all(p)))
        .collect();
    {
        let m = Mount::new(&top);
        for name in ["first.raw", "second.raw", "base.raw"] {
            let f = m.snapshot(name);
            let md = fs::metadata(&f).unwrap();
            assert_eq!(md.mode() & 0o222, 0, "{name} has write bits");
            let r = OpenOptions::new().write(true).open(&f);
            assert!(r.is_err(), "opening {name} for writing succeeded");
        }
    }
    assert_eq!(read_all(&top), before["top"], "mounting changed the image");
}

/// `snapfs info IMAGE` exits 0 and names every snapshot and layer; `--json` gives JSON.
#[test]
fn snapfs_info_lists_snapshots() {
    let dir = workdir();
    let (top, _) = build(dir.path());
    let out = run_timeout(snapfs_cmd().arg("info").arg(&top), Duration::from_secs(60));
    assert_eq!(
        out.status.map(|s| s.success()),
        Some(true),
        "snapfs info: {:?}\n{}",
        out.status,
        out.stderr
    );
    for word in ["first", "second", "base.qcow2", "top.qcow2"] {
        assert!(
            out.stdout.contains(word),
            "snapfs info does not mention {word}:\n{}",
            out.stdout
        );
    }
    // `second`'s VM state is a file of the mount: listed with its kind and size; `first` has none.
    let state_lines: Vec<Vec<&str>> = out
        .stdout
        .lines()
        .filter(|l| l.contains(".vmstate"))
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(
        state_lines,
        [["snapshots/second.vmstate", "vm-state", "12.056", "KiB"]],
        "VM state in snapfs info:\n{}",
        out.stdout
    );
    let out = run_timeout(
        snapfs_cmd().arg("info").arg("--json").arg(&top),
        Duration::from_secs(60),
    );
    assert_eq!(
        out.status.map(|s| s.success()),
        Some(true),
        "snapfs info --json: {:?}\n{}",
        out.status,
        out.stderr
    );
    let v: serde_json::Value = serde_json::from_str(&out.stdout)
        .unwrap_or_else(|e| panic!("snapfs info --json is not JSON: {e}\n{}", out.stdout));
    let second = v["views"]
        .as_array()
        .and_then(|views| views.iter().find(|w| w["file"] == "snapshots/second.raw"))
        .unwrap_or_else(|| panic!("no second.raw in snapfs info --json: {v}"));
    assert_eq!(
        second["vm-state-file"], "snapshots/second.vmstate",
        "{second}"
    );
    assert_eq!(second["vm-state-size"], VMSTATE2, "{second}");
    let text = v.to_string();
    for word in ["first", "second"] {
        assert!(
            text.contains(word),
            "snapfs info --json does not mention {word}: {text}"
        );
    }
}
