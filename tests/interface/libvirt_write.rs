//! `-o libvirt-write`: `control/create` writes `DIR/NAME.xml` in libvirt's format (mode 0600,
//! atomically, parent = the previous current snapshot, which loses its `<active>1</active>` and
//! keeps every other byte, its `<domain>` above all) and `control/delete` removes it, so that the
//! folder reads back (with snapfs's own parser, `snapfs::libvirt::load_dir`) as the tree the
//! commands made, the way libvirt keeps it (on delete, children move to the deleted snapshot's
//! parent and a deleted current snapshot passes "current" to its parent, as
//! `virsh snapshot-delete` does). Every file snapfs wrote survives a quick-xml round trip. Without
//! `libvirt-write` (or on a read-only mount) the folder never changes.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::common::libvirt_support::*;
use crate::common::snapshot_support::{control_err, control_ok, status_text};
use crate::common::*;

use snapfs::libvirt::{DiskSnapshotKind, SnapshotDisk, parse_snapshot_xml};

struct Fixture {
    _wd: tempfile::TempDir,
    img: PathBuf,
    dir: PathBuf,
    top: PathBuf,
    /// installed.xml as written: libvirt's current snapshot, with a big `<domain>`.
    installed: String,
    /// old-branch.xml as written.
    old_branch: String,
    /// The domain definition file (`/etc/libvirt/qemu/DOMAIN.xml`): disk `sda` on vm.qcow2.
    domain: PathBuf,
}

impl Fixture {
    /// `-o libvirt=DIR,libvirt-write,libvirt-domain=FILE`.
    fn write_options(&self) -> String {
        format!(
            "libvirt={},libvirt-write,libvirt-domain={}",
            self.dir.display(),
            self.domain.display()
        )
    }
}

const T_INSTALLED: i64 = 1700000000;

/// base.qcow2 <- vm.qcow2, and a folder where libvirt knows `installed` (external: the overlay
/// created was vm.qcow2, so base.qcow2 holds it; guest disk `sda`; current) and `old-branch`
/// (an internal snapshot of a branch this chain no longer holds, child of `installed`).
fn fixture() -> Fixture {
    let wd = workdir();
    let img = wd.path().join("img");
    let dir = wd.path().join("snap");
    fs::create_dir(&img).unwrap();
    fs::create_dir(&dir).unwrap();
    let base = img.join("base.qcow2");
    let top = img.join("vm.qcow2");
    create_qcow2(&base, DISK, "", None);
    qemu_io(&base, &["write -P 0x51 0 256k"]);
    create_qcow2(&top, DISK, "", Some((base.to_str().unwrap(), "qcow2")));
    qemu_io(&top, &["write -P 0x52 64k 64k"]);
    let installed = format!(
        "<?xml version='1.0' encoding='UTF-8'?>\n<!--\nWARNING: THIS IS AN AUTO-GENERATED FILE. CHANGES TO IT ARE LIKELY TO BE\n\
         OVERWRITTEN AND LOST.\n-->\n{}",
        SnapXml {
            name: "installed",
            description: Some("OS installed"),
            state: Some("shutoff"),
            creation_time: Some(T_INSTALLED),
            memory: Some("no"),
            disks: vec![("sda", "external", Some(top.to_str().unwrap().to_string()))],
            domain: Some(big_domain(&[("sda", base.to_str().unwrap())])),
            active: Some(true),
            ..SnapXml::default()
        }
        .render()
    );
    let old_branch = SnapXml {
        name: "old-branch",
        state: Some("running"),
        parent: Some("installed"),
        creation_time: Some(T_INSTALLED + 100),
        memory: Some("internal"),
        disks: vec![("sda", "internal", None)],
        active: Some(false),
        ..SnapXml::default()
    }
    .render();
    write_file_mode(&dir.join("installed.xml"), &installed, 0o600);
    write_file_mode(&dir.join("old-branch.xml"), &old_branch, 0o600);
    let domain = wd.path().join("vm-domain.xml");
    write_file_mode(
        &domain,
        &big_domain(&[("sda", top.to_str().unwrap())]),
        0o600,
    );
    Fixture {
        _wd: wd,
        img,
        dir,
        top,
        installed,
        old_branch,
        domain,
    }
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn read(path: &Path) -> String {
    fs::read_to_string(path).unwrap_or_else(|e| format!("<cannot read {}: {e}>", path.display()))
}

fn mode_of(path: &Path) -> Option<u32> {
    fs::symlink_metadata(path).ok().map(|m| m.mode() & 0o7777)
}

/// `text` with its top-level `<active>1</active>` (the last one: libvirt writes it after the
/// `<domain>`, which may contain that text too) turned into `<active>0</active>`.
fn set_active_0(text: &str) -> String {
    match text.rfind("<active>1</active>") {
        Some(at) => format!("{}<active>0</active>{}", &text[..at], &text[at + 18..]),
        None => text.to_string(),
    }
}

fn file_names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// `NAME.xml` as snapfs must have written it: a regular file of mode 0600 that parses into the
/// expected snapshot (its creation time within [t0, t1]). Returns the file's text.
#[allow(clippy::too_many_arguments)]
fn check_written(
    problems: &mut Vec<String>,
    dir: &Path,
    name: &str,
    description: Option<&str>,
    parent: Option<&str>,
    disk: SnapshotDisk,
    t0: i64,
    t1: i64,
) -> String {
    let path = dir.join(format!("{name}.xml"));
    let text = read(&path);
    match fs::symlink_metadata(&path) {
        Err(e) => {
            problems.push(format!("{name}.xml was not written: {e}"));
            return text;
        }
        Ok(md) => {
            if !md.is_file() {
                problems.push(format!("{name}.xml is not a regular file"));
            }
            if md.mode() & 0o7777 != 0o600 {
                problems.push(format!(
                    "{name}.xml has mode {:o}, expected 600",
                    md.mode() & 0o7777
                ));
            }
        }
    }
    let s = match parse_snapshot_xml(&text, &path) {
        Ok(s) => s,
        Err(e) => {
            problems.push(format!("{name}.xml does not parse: {e}\n{text}"));
            return text;
        }
    };
    let mut want = |field: &str, ok: bool, have: String| {
        if !ok {
            problems.push(format!("{name}.xml: {field} is {have}\n{text}"));
        }
    };
    want("<name>", s.name == name, format!("{:?}", s.name));
    want(
        "<description>",
        s.description.as_deref() == description,
        format!("{:?}, expected {description:?}", s.description),
    );
    want(
        "<state>",
        // What virsh writes for a snapshot of a shut-off domain, internal or disk-only.
        s.state.as_deref() == Some("shutoff"),
        format!("{:?}, expected shutoff", s.state),
    );
    want(
        "<parent>",
        s.parent.as_deref() == parent,
        format!("{:?}, expected {parent:?}", s.parent),
    );
    want(
        "<creationTime>",
        s.creation_time.is_some_and(|t| t0 <= t && t <= t1),
        format!("{:?}, expected within [{t0}, {t1}]", s.creation_time),
    );
    want(
        "<memory snapshot=>",
        s.memory.as_deref() == Some("no"),
        format!("{:?}, expected no", s.memory),
    );
    want("<active>", s.current, "0, expected 1".to_string());
    want(
        "<disks>",
        s.disks == vec![disk.clone()],
        format!("{:?}, expected [{disk:?}]", s.disks),
    );
    text
}

fn internal_disk() -> SnapshotDisk {
    SnapshotDisk {
        name: "sda".into(),
        snapshot: DiskSnapshotKind::Internal,
        source_file: None,
        driver_type: None,
    }
}

fn external_disk(file: &Path) -> SnapshotDisk {
    SnapshotDisk {
        name: "sda".into(),
        snapshot: DiskSnapshotKind::External,
        source_file: Some(file.to_path_buf()),
        driver_type: Some("qcow2".into()),
    }
}

/// Where two texts first differ, with a little context of each.
fn first_difference(want: &str, have: &str) -> String {
    let (a, b) = (want.as_bytes(), have.as_bytes());
    let i = a.iter().zip(b).take_while(|(x, y)| x == y).count();
    let ctx = |t: &[u8]| {
        String::from_utf8_lossy(&t[i.saturating_sub(60)..(i + 60).min(t.len())]).into_owned()
    };
    format!(
        "expected {} bytes, found {}; first difference at byte {i}:\n--- expected ---\n...{}...\n--- found ---\n...{}...",
        a.len(),
        b.len(),
        ctx(a),
        ctx(b)
    )
}

fn expect_text(problems: &mut Vec<String>, dir: &Path, file: &str, want: &str, why: &str) {
    let have = read(&dir.join(file));
    if have != want {
        problems.push(format!("{file}: {why}; {}", first_difference(want, &have)));
    }
}

fn xattr_expect(problems: &mut Vec<String>, file: &Path, name: &str, want: Option<&str>) {
    let have = getxattr_str(file, name);
    if have.as_deref() != want {
        problems.push(format!(
            "{}: {name} is {have:?}, expected {want:?}",
            file.display()
        ));
    }
}

fn finish(problems: Vec<String>, m: Option<&Mount>) {
    if problems.is_empty() {
        return;
    }
    let (status, err) = m.map_or((String::new(), String::new()), |m| {
        (status_text(m.path()), m.stderr_text())
    });
    panic!(
        "{} problem(s):\n- {}\n--- control/status ---\n{status}\n--- snapfs stderr ---\n{err}",
        problems.len(),
        problems.join("\n- ")
    );
}

#[test]
fn create_writes_libvirt_xml_for_internal_and_external_snapshots() {
    let fx = fixture();
    let opt = fx.write_options();
    let m = Mount::with_args(&fx.top, &["-o", &opt]);
    let mut problems = Vec::new();
    if !m.snapshot_names().contains("installed.raw") {
        problems.push(format!(
            "before any command: snapshots/ lists {:?}, expected installed.raw",
            m.snapshot_names()
        ));
    }

    // 1. An internal snapshot with a description.
    let t0 = now();
    control_ok(m.path(), "create", "snap1 first snapshot, with words");
    let t1 = now();
    let names = file_names(&fx.dir);
    if names != ["installed.xml", "old-branch.xml", "snap1.xml"] {
        problems.push(format!(
            "after create snap1 the folder holds {names:?} (temporary files left, or a file missing?)"
        ));
    }
    let snap1 = check_written(
        &mut problems,
        &fx.dir,
        "snap1",
        Some("first snapshot, with words"),
        Some("installed"),
        internal_disk(),
        t0,
        t1,
    );
    let installed_now = set_active_0(&fx.installed);
    expect_text(
        &mut problems,
        &fx.dir,
        "installed.xml",
        &installed_now,
        "the previous current snapshot must change only <active>1</active> to 0, every other byte kept",
    );
    if mode_of(&fx.dir.join("installed.xml")) != Some(0o600) {
        problems.push(format!(
            "installed.xml mode is {:?}, was 600",
            mode_of(&fx.dir.join("installed.xml")).map(|m| format!("{m:o}"))
        ));
    }
    expect_text(
        &mut problems,
        &fx.dir,
        "old-branch.xml",
        &fx.old_branch,
        "a snapshot the command does not concern must not change",
    );
    problems.extend(tree_problems(
        "after create snap1",
        &fx.dir,
        &[
            ("installed", None),
            ("old-branch", Some("installed")),
            ("snap1", Some("installed")),
        ],
        Some("snap1"),
    ));
    problems.extend(round_trip_problems(&fx.dir.join("snap1.xml"), true));
    problems.extend(round_trip_problems(&fx.dir.join("installed.xml"), true));
    let v = m.snapshot("snap1.raw");
    xattr_expect(&mut problems, &v, "user.snapfs.current", Some("true"));
    xattr_expect(&mut problems, &v, "user.snapfs.state", Some("shutoff"));
    xattr_expect(&mut problems, &v, "user.snapfs.parent", Some("installed"));
    xattr_expect(
        &mut problems,
        &v,
        "user.snapfs.description",
        Some("first snapshot, with words"),
    );
    xattr_expect(
        &mut problems,
        &m.snapshot("installed.raw"),
        "user.snapfs.current",
        Some("false"),
    );
    match serde_json::from_str::<serde_json::Value>(&read(&m.path().join("info.json"))) {
        Ok(info) => {
            let list = info["libvirt"].as_array().cloned().unwrap_or_default();
            let cur: Vec<&str> = list
                .iter()
                .filter(|e| e["current"] == serde_json::json!(true))
                .filter_map(|e| e["name"].as_str())
                .collect();
            if cur != ["snap1"] {
                problems.push(format!(
                    "info.json after create snap1: current snapshot(s) {cur:?}, expected [\"snap1\"]"
                ));
            }
        }
        Err(e) => problems.push(format!("info.json is not JSON: {e}")),
    }

    // 2. An external snapshot: the top becomes read-only layer ext1.
    let overlay = fx.img.join("vm.ext1.qcow2");
    let t0 = now();
    control_ok(m.path(), "create", "ext1 --external");
    let t1 = now();
    let names = file_names(&fx.dir);
    if names != ["ext1.xml", "installed.xml", "old-branch.xml", "snap1.xml"] {
        problems.push(format!(
            "after create ext1 --external the folder holds {names:?}"
        ));
    }
    check_written(
        &mut problems,
        &fx.dir,
        "ext1",
        None,
        Some("snap1"),
        external_disk(&overlay),
        t0,
        t1,
    );
    expect_text(
        &mut problems,
        &fx.dir,
        "snap1.xml",
        &set_active_0(&snap1),
        "the previous current snapshot must change only <active>1</active> to 0",
    );
    expect_text(
        &mut problems,
        &fx.dir,
        "installed.xml",
        &installed_now,
        "must not change again",
    );
    expect_text(
        &mut problems,
        &fx.dir,
        "old-branch.xml",
        &fx.old_branch,
        "must not change",
    );
    problems.extend(tree_problems(
        "after create ext1 --external",
        &fx.dir,
        &[
            ("installed", None),
            ("old-branch", Some("installed")),
            ("snap1", Some("installed")),
            ("ext1", Some("snap1")),
        ],
        Some("ext1"),
    ));
    for f in ["ext1.xml", "snap1.xml"] {
        problems.extend(round_trip_problems(&fx.dir.join(f), true));
    }
    problems.extend(round_trip_problems(&fx.dir.join("installed.xml"), true));
    if !overlay.exists() {
        problems.push(format!(
            "the new overlay {} does not exist",
            overlay.display()
        ));
    }
    let e = m.snapshot("ext1.raw");
    if e.exists() {
        xattr_expect(&mut problems, &e, "user.snapfs.kind", Some("external"));
        xattr_expect(
            &mut problems,
            &e,
            "user.snapfs.layer",
            Some(fx.top.to_str().unwrap()),
        );
        xattr_expect(&mut problems, &e, "user.snapfs.current", Some("true"));
        xattr_expect(&mut problems, &e, "user.snapfs.parent", Some("snap1"));
    } else {
        problems.push(format!(
            "no snapshots/ext1.raw after create ext1 --external: {:?}",
            m.snapshot_names()
        ));
    }
    finish(std::mem::take(&mut problems), Some(&m));
    drop(m);

    // 3. After a "restart": a fresh mount of the new top with the folder sees the same names.
    if let Err(e) = qemu_img_check(&overlay) {
        panic!("after unmount: {e}");
    }
    let before = folder_state(&fx.dir);
    let m = Mount::with_args(&overlay, &["--libvirt", fx.dir.to_str().unwrap()]);
    let want: std::collections::BTreeSet<String> = ["installed.raw", "ext1.raw", "snap1.raw"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    if m.snapshot_names() != want {
        problems.push(format!(
            "remounting {} with the folder: snapshots/ lists {:?}, expected {want:?}",
            overlay.display(),
            m.snapshot_names()
        ));
    } else {
        xattr_expect(
            &mut problems,
            &m.snapshot("ext1.raw"),
            "user.snapfs.current",
            Some("true"),
        );
        xattr_expect(
            &mut problems,
            &m.snapshot("snap1.raw"),
            "user.snapfs.description",
            Some("first snapshot, with words"),
        );
    }
    let diff = folder_diff(&before, &folder_state(&fx.dir));
    if !diff.is_empty() {
        problems.push(format!(
            "a mount without libvirt-write changed the folder: {diff:?}"
        ));
    }
    finish(problems, Some(&m));
}

/// Elements may come in any order: the previous current snapshot's top-level `<active>` is found
/// even when it precedes a `<domain>` whose application metadata holds `<active>1</active>`
/// too; only the top-level one changes.
#[test]
fn previous_current_is_unmarked_whatever_the_element_order() {
    let fx = fixture();
    let top = fx.top.to_str().unwrap();
    let installed = format!(
        "<domainsnapshot>\n  <name>installed</name>\n  <active>1</active>\n  <state>shutoff</state>\n  \
         <creationTime>{T_INSTALLED}</creationTime>\n  <disks>\n    <disk name='sda' snapshot='external'>\n      \
         <source file='{top}'/>\n    </disk>\n  </disks>\n  <domain type='kvm'>\n    <name>vm</name>\n    \
         <metadata>\n      <app:sync xmlns:app='http://example.org/sync'>\n        <active>1</active>\n      \
         </app:sync>\n    </metadata>\n  </domain>\n</domainsnapshot>\n"
    );
    write_file_mode(&fx.dir.join("installed.xml"), &installed, 0o600);
    let opt = fx.write_options();
    let m = Mount::with_args(&fx.top, &["-o", &opt]);
    let mut problems = Vec::new();
    control_ok(m.path(), "create", "s1");
    let want = installed.replacen("<active>1</active>", "<active>0</active>", 1);
    expect_text(
        &mut problems,
        &fx.dir,
        "installed.xml",
        &want,
        "only the top-level <active> (the first one here) may change",
    );
    problems.extend(tree_problems(
        "after create s1",
        &fx.dir,
        &[
            ("installed", None),
            ("old-branch", Some("installed")),
            ("s1", Some("installed")),
        ],
        Some("s1"),
    ));
    finish(problems, Some(&m));
}

#[test]
fn delete_removes_xml_and_keeps_the_libvirt_tree_consistent() {
    let fx = fixture();
    snapshot_create(&fx.top, "untracked");
    let m = Mount::with_args(
        &fx.top,
        &["--libvirt", fx.dir.to_str().unwrap(), "-o", "libvirt-write"],
    );
    let mut problems = Vec::new();
    let mp = m.path();
    let mut tree: Vec<(&str, Option<&str>)> =
        vec![("installed", None), ("old-branch", Some("installed"))];
    for (name, parent) in [("s1", "installed"), ("s2", "s1"), ("s3", "s2")] {
        let t0 = now();
        control_ok(mp, "create", name);
        let t1 = now();
        check_written(
            &mut problems,
            &fx.dir,
            name,
            None,
            Some(parent),
            internal_disk(),
            t0,
            t1,
        );
        tree.push((name, Some(parent)));
        problems.extend(tree_problems(
            &format!("after create {name}"),
            &fx.dir,
            &tree,
            Some(name),
        ));
    }

    // A snapshot libvirt does not know: the folder does not change.
    let before = folder_state(&fx.dir);
    control_ok(mp, "delete", "untracked");
    let diff = folder_diff(&before, &folder_state(&fx.dir));
    if !diff.is_empty() {
        problems.push(format!(
            "delete of a snapshot libvirt does not know changed the folder: {diff:?}"
        ));
    }

    // s2 has a child (s3) and is not current: s3 moves up to s1, as virsh snapshot-delete does.
    control_ok(mp, "delete", "s2");
    if fx.dir.join("s2.xml").exists() {
        problems.push("delete s2 left s2.xml".into());
    }
    problems.extend(tree_problems(
        "after delete s2 (s3's parent)",
        &fx.dir,
        &[
            ("installed", None),
            ("old-branch", Some("installed")),
            ("s1", Some("installed")),
            ("s3", Some("s1")),
        ],
        Some("s3"),
    ));

    // s3 is current: deleting it makes its parent (s1) current, as virsh snapshot-delete does.
    control_ok(mp, "delete", "s3");
    if fx.dir.join("s3.xml").exists() {
        problems.push("delete s3 left s3.xml".into());
    }
    problems.extend(tree_problems(
        "after delete s3 (the current snapshot)",
        &fx.dir,
        &[
            ("installed", None),
            ("old-branch", Some("installed")),
            ("s1", Some("installed")),
        ],
        Some("s1"),
    ));

    // The next snapshot hangs below the current one.
    let t0 = now();
    control_ok(mp, "create", "s4 after the deletes");
    let t1 = now();
    check_written(
        &mut problems,
        &fx.dir,
        "s4",
        Some("after the deletes"),
        Some("s1"),
        internal_disk(),
        t0,
        t1,
    );
    problems.extend(tree_problems(
        "after create s4",
        &fx.dir,
        &[
            ("installed", None),
            ("old-branch", Some("installed")),
            ("s1", Some("installed")),
            ("s4", Some("s1")),
        ],
        Some("s4"),
    ));

    // Files snapfs wrote are well formed and round trip; no temporary files are left.
    for f in file_names(&fx.dir) {
        if !f.ends_with(".xml") {
            problems.push(format!("unexpected file left in the folder: {f}"));
            continue;
        }
        let with_domain = f == "installed.xml";
        if f != "old-branch.xml" {
            problems.extend(round_trip_problems(&fx.dir.join(&f), with_domain));
        }
        if mode_of(&fx.dir.join(&f)) != Some(0o600) {
            problems.push(format!(
                "{f}: mode {:?}, expected 600",
                mode_of(&fx.dir.join(&f)).map(|m| format!("{m:o}"))
            ));
        }
    }
    // installed.xml: only <active> may have changed.
    let inst = read(&fx.dir.join("installed.xml"));
    if inst != fx.installed && inst != set_active_0(&fx.installed) {
        problems.push(format!(
            "installed.xml changed beyond its <active> element; {}",
            first_difference(&set_active_0(&fx.installed), &inst)
        ));
    }
    finish(problems, Some(&m));
}

#[test]
fn deleting_external_snapshots_removes_their_xml() {
    let fx = fixture();
    let opt = fx.write_options();
    let m = Mount::with_args(&fx.top, &["-o", &opt]);
    let mp = m.path();
    let mut problems = Vec::new();
    let overlay = fx.img.join("vm.e1.qcow2");
    control_ok(mp, "create", "e1 --external");
    problems.extend(tree_problems(
        "after create e1 --external",
        &fx.dir,
        &[
            ("installed", None),
            ("old-branch", Some("installed")),
            ("e1", Some("installed")),
        ],
        Some("e1"),
    ));
    if !m.snapshot_names().contains("e1.raw") {
        problems.push(format!(
            "no snapshots/e1.raw after create e1 --external: {:?}",
            m.snapshot_names()
        ));
    }

    // e1 (vm.qcow2) leaves the chain; e1 was current, so its parent becomes current.
    control_ok(mp, "delete", "e1");
    if fx.dir.join("e1.xml").exists() {
        problems.push("delete e1 left e1.xml".into());
    }
    problems.extend(tree_problems(
        "after delete e1 (current, external)",
        &fx.dir,
        &[("installed", None), ("old-branch", Some("installed"))],
        Some("installed"),
    ));

    // installed (base.qcow2) leaves the chain; its child old-branch becomes a root.
    control_ok(mp, "delete", "installed");
    if fx.dir.join("installed.xml").exists() {
        problems.push("delete installed left installed.xml".into());
    }
    problems.extend(tree_problems(
        "after delete installed (external, with a child)",
        &fx.dir,
        &[("old-branch", None)],
        None,
    ));
    let names = file_names(&fx.dir);
    if names != ["old-branch.xml"] {
        problems.push(format!(
            "the folder holds {names:?}, expected [old-branch.xml]"
        ));
    }
    finish(problems, Some(&m));
    drop(m);
    if let Err(e) = qemu_img_check(&overlay) {
        panic!("after unmount: {e}");
    }
}

/// Without `libvirt-write`, and on a read-only mount even with it, commands never touch the
/// folder: every file's content and mode, and the list of files, are the same afterwards.
#[test]
fn without_libvirt_write_the_folder_never_changes() {
    let fx = fixture();
    let dir = fx.dir.to_str().unwrap();
    let before = folder_state(&fx.dir);

    {
        let m = Mount::with_args(&fx.top, &["--libvirt", dir]);
        let mp = m.path();
        control_ok(mp, "create", "s1 a description");
        control_ok(mp, "delete", "s1");
        control_ok(mp, "create", "e1 --external");
        control_ok(mp, "delete", "e1");
        control_ok(mp, "create", "s2");
        let diff = folder_diff(&before, &folder_state(&fx.dir));
        let mut problems = Vec::new();
        if !diff.is_empty() {
            problems.push(format!(
                "commands on a mount without libvirt-write changed the folder: {diff:?}"
            ));
        }
        if !m.snapshot_names().contains("installed.raw") {
            problems.push(format!(
                "the folder's names are no longer applied: {:?}",
                m.snapshot_names()
            ));
        }
        finish(problems, Some(&m));
    }

    let opt = format!("libvirt={dir},libvirt-write");
    let m = Mount::with_args(&fx.top, &["-r", "-o", &opt]);
    control_err(m.path(), "create", "s3", libc::EROFS);
    control_err(m.path(), "delete", "s2", libc::EROFS);
    let diff = folder_diff(&before, &folder_state(&fx.dir));
    let problems = if diff.is_empty() {
        Vec::new()
    } else {
        vec![format!(
            "refused commands on a read-only libvirt-write mount changed the folder: {diff:?}"
        )]
    };
    finish(problems, Some(&m));
}
