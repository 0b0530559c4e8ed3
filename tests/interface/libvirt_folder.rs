//! libvirt's snapshot folder names and describes the views (docs/design.md sections 2 and 4, issue 6):
//! a chain built by qemu-img (base.qcow2 <- mid.qcow2 <- vm.qcow2, internal snapshots in vm and
//! mid) and a libvirt-style folder written by the test (external and internal snapshots, a tree
//! with branches, a big `<domain>` with its own `<name>`/`<description>`/`<disk>`s, a disk of
//! another chain, the old `<creationdate>` spelling, one broken file, one naming a foreign disk).
//! The mount must name the layers after libvirt's external snapshots, carry description, parent,
//! state, current mark and creation time in the xattrs, mtimes and info.json, report the
//! broken and foreign files in control/status and skip them, and read every view right.

use std::collections::BTreeSet;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use crate::common::libvirt_support::*;
use crate::common::snapshot_support::status_text;
use crate::common::*;

fn names(list: &[&str]) -> BTreeSet<String> {
    list.iter().map(|s| s.to_string()).collect()
}

fn fail_if_any(problems: Vec<String>, m: &Mount) {
    if !problems.is_empty() {
        panic!(
            "{} problem(s):\n- {}\n--- control/status ---\n{}\n--- snapfs stderr ---\n{}",
            problems.len(),
            problems.join("\n- "),
            status_text(m.path()),
            m.stderr_text()
        );
    }
}

/// The lines of control/status that report a skipped libvirt file.
fn skipped_lines(mp: &Path) -> Vec<String> {
    status_text(mp)
        .lines()
        .filter(|l| l.contains("libvirt:") && l.contains("skipped"))
        .map(str::to_owned)
        .collect()
}

#[test]
fn libvirt_folder_names_and_describes_views() {
    let wd = workdir();
    let fx = folder_fixture(wd.path());
    let views = expected_views(&fx);
    // Oracles before mounting (qemu-img convert), one per file of the mount.
    let expected: Expected = vec![
        ("live.raw".into(), View::live(&fx.top)),
        (
            "snapshots/bare-os-install.raw".into(),
            View::layer(&fx.base),
        ),
        ("snapshots/1270477159.raw".into(), View::layer(&fx.mid)),
        (
            "snapshots/experiment.raw".into(),
            View::internal(&fx.mid, "experiment"),
        ),
        (
            "snapshots/pkg-updated.raw".into(),
            View::internal(&fx.top, "pkg-updated"),
        ),
        (
            "snapshots/untracked.raw".into(),
            View::internal(&fx.top, "untracked"),
        ),
    ];
    let with_oracles = oracles(&expected);
    let dir = fx.dir.to_str().unwrap();
    let folder_before = folder_state(&fx.dir);

    let m = Mount::with_args(&fx.top, &["--libvirt", dir]);
    let mut problems = Vec::new();

    // View names: the layers are named after libvirt's external snapshots.
    let want_names = names(&[
        "bare-os-install.raw",
        "1270477159.raw",
        "experiment.raw",
        "pkg-updated.raw",
        "untracked.raw",
    ]);
    let got_names = m.snapshot_names();
    if got_names != want_names {
        problems.push(format!(
            "snapshots/ lists {got_names:?}, expected {want_names:?}"
        ));
    }

    // Contents: every view reads as qemu-img converts it.
    for (name, view, oracle) in &with_oracles {
        problems.extend(check_view_file(&m.path().join(name), view, oracle));
    }

    // xattrs and mtimes.
    for v in &views {
        problems.extend(view_xattr_problems(m.path(), v));
    }
    let live = m.live();
    for name in ["user.snapfs.state", "user.snapfs.current"] {
        if let Some(v) = getxattr_str(&live, name) {
            problems.push(format!(
                "live.raw has {name}={v:?}; libvirt says nothing about the live disk"
            ));
        }
    }
    if getxattr_str(&live, "user.snapfs.kind").as_deref() != Some("live") {
        problems.push("live.raw: user.snapfs.kind is not \"live\"".into());
    }

    // info.json: the views' libvirt fields and the `libvirt` array.
    let info_text = fs::read_to_string(m.path().join("info.json")).unwrap_or_default();
    match serde_json::from_str::<serde_json::Value>(&info_text) {
        Ok(info) => {
            problems.extend(info_views_problems("info.json", &info, &views));
            match info.get("libvirt") {
                Some(a) => problems.extend(libvirt_array_problems("info.json", a, DISK)),
                None => problems.push("info.json has no `libvirt` array".into()),
            }
        }
        Err(e) => problems.push(format!("info.json is not JSON: {e}\n{info_text}")),
    }

    // control/status: exactly the broken and the foreign file are reported, with a reason.
    let skipped = skipped_lines(m.path());
    for bad in ["broken.xml", "foreign.xml"] {
        let path = fx.dir.join(bad);
        let marker = format!("libvirt: skipped: {}: ", path.display());
        let hits: Vec<&String> = skipped.iter().filter(|l| l.contains(&marker)).collect();
        match hits.as_slice() {
            [line] => {
                let reason = &line[line.find(&marker).unwrap() + marker.len()..];
                if reason.trim().is_empty() {
                    problems.push(format!("status line for {bad} gives no reason: {line:?}"));
                }
                if parse_rfc3339(line.split(' ').next().unwrap_or("")).is_none() {
                    problems.push(format!(
                        "status line for {bad} does not start with an RFC 3339 time: {line:?}"
                    ));
                }
            }
            [] => problems.push(format!(
                "control/status does not report {bad} as `... {marker}REASON`"
            )),
            more => problems.push(format!("control/status reports {bad} {} times", more.len())),
        }
        if !m.stderr_text().contains(bad) {
            problems.push(format!(
                "the log (foreground stderr) does not mention the skipped {bad}"
            ));
        }
    }
    for line in &skipped {
        if !line.contains("broken.xml") && !line.contains("foreign.xml") {
            problems.push(format!("a good file is reported as skipped: {line:?}"));
        }
    }

    // Reading metadata never writes the folder.
    let diff = folder_diff(&folder_before, &folder_state(&fx.dir));
    if !diff.is_empty() {
        problems.push(format!("mounting changed the libvirt folder: {diff:?}"));
    }
    fail_if_any(problems, &m);
    drop(m);
    for img in [&fx.base, &fx.mid, &fx.top] {
        if let Err(e) = qemu_img_check(img) {
            panic!("after unmount: {e}");
        }
    }
}

#[test]
fn libvirt_mount_option_spelling() {
    let wd = workdir();
    let fx = folder_fixture(wd.path());
    let opt = format!("libvirt={}", fx.dir.display());
    let m = Mount::with_args(&fx.top, &["-o", &opt]);
    let mut problems = Vec::new();
    let want = names(&[
        "bare-os-install.raw",
        "1270477159.raw",
        "experiment.raw",
        "pkg-updated.raw",
        "untracked.raw",
    ]);
    if m.snapshot_names() != want {
        problems.push(format!(
            "with -o {opt}: snapshots/ lists {:?}, expected {want:?}",
            m.snapshot_names()
        ));
    }
    let pkg = m.snapshot("pkg-updated.raw");
    if getxattr_str(&pkg, "user.snapfs.current").as_deref() != Some("true") {
        problems.push(format!(
            "with -o {opt}: pkg-updated.raw user.snapfs.current is {:?}",
            getxattr_str(&pkg, "user.snapfs.current")
        ));
    }
    if skipped_lines(m.path()).len() != 2 {
        problems.push(format!(
            "with -o {opt}: expected 2 skipped files in control/status, got {:?}",
            skipped_lines(m.path())
        ));
    }
    fail_if_any(problems, &m);
}

/// Metadata never fails the mount: a folder that does not exist, and a folder whose files are
/// all broken or about other disks, leave the views with their default names and no libvirt
/// attributes, and are reported.
#[test]
fn unusable_libvirt_folders_never_fail_the_mount() {
    let wd = workdir();
    let fx = folder_fixture(wd.path());
    let default_names = names(&[
        "base.raw",
        "mid.raw",
        "mid@experiment.raw",
        "pkg-updated.raw",
        "untracked.raw",
    ]);

    // Only the broken and the foreign file.
    let bad_dir = wd.path().join("bad-only");
    fs::create_dir(&bad_dir).unwrap();
    for f in ["broken.xml", "foreign.xml", "notes.txt"] {
        fs::copy(fx.dir.join(f), bad_dir.join(f)).unwrap();
    }
    let missing = wd.path().join("no-such-folder");
    for (what, folder, reports) in [
        ("a folder of bad files", &bad_dir, 2usize),
        ("a missing folder", &missing, 1usize),
    ] {
        let m = Mount::with_args(&fx.top, &["--libvirt", folder.to_str().unwrap()]);
        let mut problems = Vec::new();
        if m.snapshot_names() != default_names {
            problems.push(format!(
                "{what}: snapshots/ lists {:?}, expected the default names {default_names:?}",
                m.snapshot_names()
            ));
        }
        for name in &default_names {
            let p = m.snapshot(name);
            for x in ["user.snapfs.state", "user.snapfs.current"] {
                if let Some(v) = getxattr_str(&p, x) {
                    problems.push(format!("{what}: {name} has {x}={v:?}"));
                }
            }
        }
        let lines: Vec<String> = status_text(m.path())
            .lines()
            .filter(|l| l.contains("libvirt:"))
            .map(str::to_owned)
            .collect();
        if lines.len() != reports {
            problems.push(format!(
                "{what}: expected {reports} libvirt line(s) in control/status, got {lines:?}"
            ));
        }
        if what == "a missing folder"
            && !lines.iter().any(|l| l.contains(missing.to_str().unwrap()))
        {
            problems.push(format!(
                "{what}: control/status does not name {}: {lines:?}",
                missing.display()
            ));
        }
        // The views still read right.
        let oracle = convert_to_raw(&fx.mid, None);
        if let Err(e) = compare_files(&m.snapshot("mid.raw"), &oracle) {
            problems.push(format!("{what}: mid.raw: {e}"));
        }
        fail_if_any(problems, &m);
    }
}

/// libvirt records the path it used; the same file reached through a symlinked directory is
/// still the chain's file.
#[test]
fn external_source_through_a_symlink_names_the_layer() {
    let wd = workdir();
    let root = wd.path();
    let img = root.join("img");
    fs::create_dir(&img).unwrap();
    let base = img.join("base.qcow2");
    let top = img.join("vm.qcow2");
    create_qcow2(&base, DISK, "", None);
    qemu_io(&base, &["write -P 0x41 0 64k"]);
    create_qcow2(&top, DISK, "", Some((base.to_str().unwrap(), "qcow2")));
    let link = root.join("images-link");
    std::os::unix::fs::symlink(&img, &link).unwrap();
    let dir = root.join("snap");
    fs::create_dir(&dir).unwrap();
    let xml = SnapXml {
        name: "installed",
        state: Some("shutoff"),
        creation_time: Some(T_BARE),
        memory: Some("no"),
        disks: vec![(
            "vda",
            "external",
            Some(link.join("vm.qcow2").to_str().unwrap().to_string()),
        )],
        active: Some(true),
        ..SnapXml::default()
    }
    .render();
    write_file_mode(&dir.join("installed.xml"), &xml, 0o600);
    let m = Mount::with_args(&top, &["--libvirt", dir.to_str().unwrap()]);
    let want = names(&["installed.raw"]);
    let mut problems = Vec::new();
    if m.snapshot_names() != want {
        problems.push(format!(
            "the XML names {} (a symlink to the chain's folder): snapshots/ lists {:?}, expected {want:?}",
            link.join("vm.qcow2").display(),
            m.snapshot_names()
        ));
    } else {
        let p = m.snapshot("installed.raw");
        let md = fs::metadata(&p).unwrap();
        if md.mtime() != T_BARE {
            problems.push(format!(
                "installed.raw: mtime {} expected {T_BARE}",
                md.mtime()
            ));
        }
        if getxattr_str(&p, "user.snapfs.current").as_deref() != Some("true") {
            problems.push("installed.raw: user.snapfs.current is not \"true\"".into());
        }
    }
    fail_if_any(problems, &m);
}

/// Two files with the same `<name>`, and an external snapshot named like an internal tag: each
/// gets a status line, the first file of a name counts, and no two views share a description
/// (the tag's view keeps none of the external snapshot's, the layer's view gets it).
#[test]
fn clashing_libvirt_names_get_status_lines() {
    let wd = workdir();
    let dir = wd.path().join("snap");
    fs::create_dir(&dir).unwrap();
    let base = wd.path().join("base.qcow2");
    let top = wd.path().join("vm.qcow2");
    create_qcow2(&base, DISK, "", None);
    create_qcow2(&top, DISK, "", Some((base.to_str().unwrap(), "qcow2")));
    snapshot_create(&top, "twin");
    snapshot_create(&top, "dup");
    let external = SnapXml {
        name: "twin",
        description: Some("the layer below vm.qcow2"),
        state: Some("shutoff"),
        disks: vec![("vda", "external", Some(top.to_str().unwrap().to_string()))],
        ..SnapXml::default()
    };
    let dup = |description| SnapXml {
        name: "dup",
        description: Some(description),
        disks: vec![("vda", "internal", None)],
        ..SnapXml::default()
    };
    write_file_mode(&dir.join("twin.xml"), &external.render(), 0o600);
    write_file_mode(&dir.join("a-dup.xml"), &dup("first file").render(), 0o600);
    write_file_mode(&dir.join("b-dup.xml"), &dup("second file").render(), 0o600);
    let m = Mount::with_args(&top, &["--libvirt", dir.to_str().unwrap()]);
    let status = status_text(m.path());
    let mut problems = Vec::new();
    if !status
        .lines()
        .any(|l| l.contains("b-dup.xml") && l.contains("a-dup.xml"))
    {
        problems.push("no status line names the two files that claim \"dup\"".to_string());
    }
    if !status
        .lines()
        .any(|l| l.contains("twin.xml") && l.contains("internal snapshot"))
    {
        problems.push("no status line for the external snapshot named like a tag".to_string());
    }
    let desc = |view: &str| getxattr_str(&m.snapshot(view), "user.snapfs.description");
    if desc("dup.raw").as_deref() != Some("first file") {
        problems.push(format!("dup.raw describes itself as {:?}", desc("dup.raw")));
    }
    if desc("twin.raw").is_some() {
        problems.push(format!(
            "the tag twin.raw took the external snapshot's description {:?}",
            desc("twin.raw")
        ));
    }
    let layer_views: Vec<String> = m
        .snapshot_names()
        .into_iter()
        .filter(|n| n.starts_with("twin") && n != "twin.raw")
        .collect();
    match layer_views.as_slice() {
        [layer] if desc(layer).as_deref() == Some("the layer below vm.qcow2") => {}
        other => problems.push(format!(
            "the layer's view ({other:?}) does not carry the external snapshot's description"
        )),
    }
    fail_if_any(problems, &m);
}
