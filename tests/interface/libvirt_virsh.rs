//! What a real libvirtd and virsh make of the snapshot XML snapfs writes with `-o libvirt-write`
//! (tests/common/libvirtd.rs: a daemon per test, in a private root). Without a running daemon
//! snapfs writes the folder as libvirt would; the daemon started afterwards reads it, and
//! `virsh snapshot-list`, `-current`, `-dumpxml`, `-revert`, `-delete`, `snapshot-create
//! --redefine` act on it as on a snapshot virsh made itself.

use std::fs;
use std::path::{Path, PathBuf};

use crate::common::libvirt_support::xml_tree;
use crate::common::libvirtd::Libvirtd;
use crate::common::snapshot_support::{control_ok, qemu_content, snapshot_tags, status_text};
use crate::common::*;

const DISK: u64 = 4 * MIB;

fn image(dir: &Path, name: &str, pattern: u8) -> PathBuf {
    let img = dir.join(name);
    create_qcow2(&img, DISK, "", None);
    qemu_io(&img, &[&format!("write -P {pattern} 0 256k")]);
    img
}

/// `-o libvirt=DIR,libvirt-write,libvirt-domain=FILE` for `domain` of `daemon`.
fn libvirt_options(daemon: &Libvirtd, domain: &str) -> String {
    format!(
        "libvirt={},libvirt-write,libvirt-domain={}",
        daemon.snapshot_dir(domain).display(),
        daemon.domain_file(domain).display()
    )
}

/// The `<domain>...</domain>` text of a snapshot file.
fn domain_text(xml: &str) -> &str {
    let start = xml.find("<domain ").expect("a <domain> element");
    let end = xml.rfind("</domain>").expect("a </domain>") + "</domain>".len();
    &xml[start..end]
}

/// The names of the top-level elements of a snapshot file, in order.
fn element_order(xml: &str) -> Vec<String> {
    xml_tree(xml)
        .expect("well-formed XML")
        .children
        .iter()
        .map(|c| c.name.clone())
        .collect()
}

fn read(path: &Path) -> String {
    fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

/// A one-disk domain with a snapshot virsh made (`first`); snapfs, with no daemon running, takes
/// `second` in the mounted image. The file it writes is virsh's own layout (the header comment,
/// the elements in virsh's order, `<state>shutoff</state>`, the domain's inactive definition
/// byte for byte as virsh copied it into `first`); the daemon started afterwards lists it as
/// current with `first` as parent, reverts to it (the image's content comes back) and accepts its
/// `snapshot-dumpxml` with `snapshot-create --redefine` after its metadata was dropped.
#[test]
fn virsh_reverts_and_redefines_what_snapfs_wrote() {
    let wd = workdir();
    let vda = image(wd.path(), "vda.qcow2", 0x11);
    let mut daemon = Libvirtd::start();
    daemon.define("one", &[("vda", &vda)]);
    daemon.virsh(&["snapshot-create-as", "one", "first", "made by virsh"]);
    daemon.stop();

    qemu_io(&vda, &["write -P 0x22 0 256k"]);
    let at_second = qemu_content(&vda, None);
    {
        let m = Mount::with_args(&vda, &["-o", &libvirt_options(&daemon, "one")]);
        control_ok(m.path(), "create", "second taken by snapfs");
        assert!(
            !status_text(m.path()).contains("libvirt:"),
            "create reported a libvirt problem:\n{}",
            status_text(m.path())
        );
    }
    let dir = daemon.snapshot_dir("one");
    let first = read(&dir.join("first.xml"));
    let second = read(&dir.join("second.xml"));
    // virsh's `first` has no parent; a snapshot with one has it right after <state>.
    let mut want_order = element_order(&first);
    let state_at = want_order
        .iter()
        .position(|e| e == "state")
        .expect("<state>");
    want_order.insert(state_at + 1, "parent".into());
    assert_eq!(
        element_order(&second),
        want_order,
        "snapfs's file does not have virsh's elements in virsh's order:\n{second}"
    );
    assert!(
        second.starts_with("<!--\nWARNING: THIS IS AN AUTO-GENERATED FILE."),
        "no libvirt header comment:\n{second}"
    );
    assert!(second.contains("<state>shutoff</state>"), "{second}");
    assert!(
        second.contains("<disk name='vda' snapshot='internal'/>"),
        "{second}"
    );
    assert_eq!(
        domain_text(&second),
        domain_text(&first),
        "the <domain> snapfs wrote is not the one virsh wrote for the same definition"
    );

    daemon.restart();
    let list = daemon.virsh(&["snapshot-list", "one", "--name"]);
    assert_eq!(
        list.split_whitespace().collect::<Vec<_>>(),
        ["first", "second"]
    );
    assert_eq!(
        daemon.virsh(&["snapshot-current", "one", "--name"]).trim(),
        "second"
    );
    assert_eq!(
        daemon.virsh(&["snapshot-parent", "one", "second"]).trim(),
        "first"
    );
    let info = daemon.virsh(&["snapshot-info", "one", "second"]);
    assert!(
        info.lines()
            .any(|l| l.starts_with("State:") && l.ends_with("shutoff")),
        "{info}"
    );
    assert!(
        info.lines()
            .any(|l| l.starts_with("Location:") && l.ends_with("internal")),
        "{info}"
    );

    // Revert: the image's content at `second` comes back.
    qemu_io(&vda, &["write -P 0x33 0 256k"]);
    daemon.virsh(&["snapshot-revert", "one", "second"]);
    assert!(
        qemu_content(&vda, None) == at_second,
        "virsh snapshot-revert to snapfs's snapshot did not bring its content back"
    );

    // Redefine: the metadata goes, the dumped XML brings it back.
    let dumped = wd.path().join("second-dump.xml");
    fs::write(
        &dumped,
        daemon.virsh(&["snapshot-dumpxml", "one", "second", "--security-info"]),
    )
    .unwrap();
    daemon.virsh(&["snapshot-delete", "one", "second", "--metadata"]);
    daemon.virsh(&[
        "snapshot-create",
        "one",
        dumped.to_str().unwrap(),
        "--redefine",
    ]);
    assert_eq!(
        daemon.virsh(&["snapshot-parent", "one", "second"]).trim(),
        "first"
    );

    // Delete: the tag leaves the image.
    daemon.virsh(&["snapshot-delete", "one", "second"]);
    assert_eq!(snapshot_tags(&vda), ["first"]);
}

/// A two-disk domain; snapfs mounts the image of `vdb`. The snapshot it records names `vdb` (the
/// disk whose source is the mounted image) as internal and `vda` as left out (`snapshot='no'`,
/// as `--diskspec vda,snapshot=no` records it); `virsh snapshot-revert` reverts `vdb` only and
/// `snapshot-delete` removes the tag from `vdb`'s image, leaving `vda`'s image alone. With the
/// domain file unreadable, the `<domain>` of the parent snapshot is recorded.
#[test]
fn multi_disk_domain_records_the_mounted_disk() {
    let wd = workdir();
    let vda = image(wd.path(), "a.qcow2", 0x11);
    let vdb = image(wd.path(), "b.qcow2", 0x44);
    let mut daemon = Libvirtd::start();
    daemon.define("two", &[("vda", &vda), ("vdb", &vdb)]);
    daemon.virsh(&["snapshot-create-as", "two", "both"]);
    daemon.stop();

    let at_snap = qemu_content(&vdb, None);
    let vda_before = qemu_content(&vda, None);
    {
        let m = Mount::with_args(&vdb, &["-o", &libvirt_options(&daemon, "two")]);
        control_ok(m.path(), "create", "b-only");
        // The domain file gone: the parent's <domain> is recorded.
        let opts = format!(
            "libvirt={},libvirt-write,libvirt-domain={}",
            daemon.snapshot_dir("two").display(),
            wd.path().join("no-such-domain.xml").display()
        );
        drop(m);
        let m = Mount::with_args(&vdb, &["-o", &opts]);
        control_ok(m.path(), "create", "b-again");
        let status = status_text(m.path());
        assert!(
            status.contains("the domain definition of the parent snapshot is used"),
            "{status}"
        );
    }
    let dir = daemon.snapshot_dir("two");
    let both = read(&dir.join("both.xml"));
    for name in ["b-only", "b-again"] {
        let xml = read(&dir.join(format!("{name}.xml")));
        assert!(
            xml.contains(
                "  <disks>\n    <disk name='vda' snapshot='no'/>\n    <disk name='vdb' snapshot='internal'/>\n  </disks>\n"
            ),
            "{name}.xml:\n{xml}"
        );
        assert_eq!(
            domain_text(&xml),
            domain_text(&both),
            "{name}.xml's <domain>"
        );
    }
    assert_eq!(snapshot_tags(&vdb), ["both", "b-only", "b-again"]);

    daemon.restart();
    let dumped = daemon.virsh(&["snapshot-dumpxml", "two", "b-only"]);
    assert!(
        dumped.contains("<disk name='vda' snapshot='no'/>")
            && dumped.contains("<disk name='vdb' snapshot='internal'/>"),
        "{dumped}"
    );
    qemu_io(&vdb, &["write -P 0x55 0 256k"]);
    qemu_io(&vda, &["write -P 0x66 0 256k"]);
    let vda_changed = qemu_content(&vda, None);
    assert!(vda_changed != vda_before);
    daemon.virsh(&["snapshot-revert", "two", "b-only"]);
    assert!(qemu_content(&vdb, None) == at_snap, "vdb not reverted");
    assert!(
        qemu_content(&vda, None) == vda_changed,
        "vda was changed by a revert to a snapshot that left it out"
    );
    daemon.virsh(&["snapshot-delete", "two", "b-only"]);
    assert_eq!(snapshot_tags(&vdb), ["both", "b-again"]);
    assert_eq!(snapshot_tags(&vda), ["both"]);
}

/// `snapfs snapshot ACTION MOUNTPOINT ARGS...`; panics unless it succeeds.
fn wrapper(action: &str, mp: &Path, args: &[&str]) {
    run(snapfs_cmd().arg("snapshot").arg(action).arg(mp).args(args));
}

/// The case: virsh took internal snapshot `snapA`, then a disk-only snapshot `ext1`
/// (the domain now runs on the overlay `a.ext1`, `snapA` stays in `a.qcow2` below it). snapfs
/// mounts the overlay and shows `snapA` under libvirt's name, not `ext1@snapA`; every command
/// takes that name: a revert to it works as virsh's does (the live disk becomes `snapA`, libvirt's
/// current snapshot moves to it), a create after the revert gets `snapA` as its parent, a
/// delete removes the tag from the backing file. Names with white space go through the wrappers
/// and through quoted commands. virsh, started after each round, agrees with all of it.
#[test]
fn libvirt_names_work_in_backing_layers_with_spaces_and_after_revert() {
    let wd = workdir();
    let a = image(wd.path(), "a.qcow2", 0x11);
    let overlay = wd.path().join("a.ext1");
    let mut daemon = Libvirtd::start();
    daemon.define("lay", &[("vda", &a)]);
    daemon.virsh(&["snapshot-create-as", "lay", "snapA"]);
    let at_snap_a = qemu_content(&a, None);
    qemu_io(&a, &["write -P 0x22 0 256k"]);
    let spec = format!("vda,snapshot=external,file={}", overlay.display());
    daemon.virsh(&[
        "snapshot-create-as",
        "lay",
        "ext1",
        "--disk-only",
        "--diskspec",
        &spec,
    ]);
    daemon.stop();

    {
        let m = Mount::with_args(&overlay, &["-o", &libvirt_options(&daemon, "lay")]);
        let names = m.snapshot_names();
        assert!(
            names.contains("snapA.raw") && !names.iter().any(|n| n.contains('@')),
            "snapshots/ lists {names:?}: snapA must carry libvirt's name"
        );
        assert_files_equal_bytes(&m.snapshot("snapA.raw"), &at_snap_a, "snapA.raw");
        wrapper("revert", m.path(), &["snapA"]);
        assert_files_equal_bytes(&m.live(), &at_snap_a, "live.raw after revert to snapA");
        wrapper(
            "create",
            m.path(),
            &["before upgrade", "after", "the revert"],
        );
        wrapper("create", m.path(), &["two words"]);
        let names = m.snapshot_names();
        assert!(
            names.contains("before upgrade.raw") && names.contains("two words.raw"),
            "{names:?}"
        );
        assert_eq!(
            getxattr_str(&m.snapshot("before upgrade.raw"), "user.snapfs.description").as_deref(),
            Some("after the revert")
        );
        assert_eq!(
            getxattr_str(&m.snapshot("two words.raw"), "user.snapfs.description"),
            None,
            "\"two words\" is one name, not a name and a description"
        );
        control_ok(m.path(), "delete", "\"two words\"");
    }
    daemon.restart();
    assert_eq!(
        daemon.virsh(&["snapshot-current", "lay", "--name"]).trim(),
        "before upgrade"
    );
    assert_eq!(
        daemon
            .virsh(&["snapshot-parent", "lay", "before upgrade"])
            .trim(),
        "snapA",
        "a create after a revert to snapA must get snapA as its parent"
    );
    let list = daemon.virsh(&["snapshot-list", "lay", "--name"]);
    assert_eq!(
        list.lines().filter(|l| !l.is_empty()).collect::<Vec<_>>(),
        ["before upgrade", "ext1", "snapA"]
    );
    daemon.stop();

    {
        let m = Mount::with_args(&overlay, &["-o", &libvirt_options(&daemon, "lay")]);
        control_ok(m.path(), "delete", "snapA");
        wrapper("delete", m.path(), &["before upgrade"]);
        assert!(
            !status_text(m.path()).contains("libvirt:"),
            "{}",
            status_text(m.path())
        );
    }
    assert!(snapshot_tags(&a).is_empty(), "snapA left in a.qcow2");
    assert!(snapshot_tags(&overlay).is_empty());
    daemon.restart();
    let list = daemon.virsh(&["snapshot-list", "lay", "--name"]);
    assert_eq!(
        list.lines().filter(|l| !l.is_empty()).collect::<Vec<_>>(),
        ["ext1"]
    );
}

fn assert_files_equal_bytes(file: &Path, want: &[u8], what: &str) {
    let got = fs::read(file).unwrap_or_else(|e| panic!("read {}: {e}", file.display()));
    assert!(got == want, "{what}: content differs from qemu-img's");
}

/// `create NAME --external` with `-o libvirt-write` moves the domain's disk to the new overlay,
/// as `virsh snapshot-create-as --disk-only` does: the daemon started afterwards lists the disk
/// on the overlay (`domblklist`), shows the snapshot as external with the overlay as its source,
/// and takes a disk-only snapshot of its own on top of it. Without a domain definition that has
/// the mounted image as a disk, the command is refused and no overlay is made.
#[test]
fn external_create_moves_the_domain_disk() {
    let wd = workdir();
    let a = image(wd.path(), "a.qcow2", 0x11);
    let mut daemon = Libvirtd::start();
    daemon.define("ext", &[("vda", &a)]);
    daemon.stop();

    let overlay = wd.path().join("a.e1.qcow2");
    {
        let m = Mount::with_args(&a, &["-o", &libvirt_options(&daemon, "ext")]);
        control_ok(
            m.path(),
            "create",
            &format!("e1 --external {}", overlay.display()),
        );
        // (The folder is missing until the first snapshot: the mount says so, the create makes it.)
        let status = status_text(m.path());
        let create = status
            .lines()
            .find(|l| l.contains("create e1"))
            .unwrap_or("");
        assert!(!create.contains("libvirt:"), "{status}");
    }
    daemon.restart();
    let blk = daemon.virsh(&["domblklist", "ext"]);
    assert!(
        blk.lines()
            .any(|l| l.split_whitespace().collect::<Vec<_>>() == ["vda", overlay.to_str().unwrap()]),
        "the domain's disk was not moved to the overlay:\n{blk}"
    );
    let info = daemon.virsh(&["snapshot-info", "ext", "e1"]);
    assert!(
        info.lines()
            .any(|l| l.starts_with("Location:") && l.ends_with("external")),
        "{info}"
    );
    let second = wd.path().join("a.e2.qcow2");
    let spec = format!("vda,snapshot=external,file={}", second.display());
    daemon.virsh(&[
        "snapshot-create-as",
        "ext",
        "e2",
        "--disk-only",
        "--diskspec",
        &spec,
    ]);
    assert_eq!(daemon.virsh(&["snapshot-parent", "ext", "e2"]).trim(), "e1");
    // virsh's own disk-only snapshot of the shut-off domain has the state snapfs wrote for its
    // external one (snapfs writes images only while no QEMU holds them: the domain is shut off).
    let state = |name: &str| {
        let xml = daemon.virsh(&["snapshot-dumpxml", "ext", name]);
        crate::common::libvirt_support::element_text(&xml, "state")
    };
    assert_eq!(state("e1"), state("e2"));
    assert_eq!(state("e1").as_deref(), Some("shutoff"));
    let backing = info_json(&second);
    assert_eq!(
        backing["backing-filename"].as_str(),
        overlay.to_str(),
        "virsh's overlay must sit on snapfs's"
    );
    daemon.stop();

    // No usable domain definition: refused, nothing made.
    let b = image(wd.path(), "b.qcow2", 0x22);
    let opts = format!(
        "libvirt={},libvirt-write,libvirt-domain={}",
        daemon.snapshot_dir("ext").display(),
        wd.path().join("missing.xml").display()
    );
    let m = Mount::with_args(&b, &["-o", &opts]);
    let refused = wd.path().join("b.x.qcow2");
    crate::common::snapshot_support::control_err(
        m.path(),
        "create",
        &format!("x --external {}", refused.display()),
        libc::EINVAL,
    );
    assert!(
        !refused.exists(),
        "a refused external create left {}",
        refused.display()
    );
}

fn names(list: &str) -> Vec<&str> {
    list.lines().filter(|l| !l.is_empty()).collect()
}

/// With libvirtd running, snapfs goes through its API (`-o libvirt-uri=URI`): virsh lists a
/// snapshot snapfs made at once, follows a revert's move of the current snapshot and a delete,
/// and sees the domain's disk on the overlay after an external create, all without a daemon
/// restart; after a restart (the daemon reads the folder it wrote) everything is the same, with
/// one current snapshot.
#[test]
fn with_a_running_daemon_snapfs_goes_through_libvirt() {
    let wd = workdir();
    let a = image(wd.path(), "a.qcow2", 0x11);
    let mut daemon = Libvirtd::start();
    daemon.define("run", &[("vda", &a)]);
    daemon.virsh(&["snapshot-create-as", "run", "first"]);
    let opts = format!(
        "{},libvirt-uri={}",
        libvirt_options(&daemon, "run"),
        daemon.uri()
    );
    let overlay = wd.path().join("a.s2.qcow2");
    {
        let m = Mount::with_args(&a, &["-o", &opts]);
        control_ok(m.path(), "create", "s1 made while libvirtd runs");
        assert_eq!(
            names(&daemon.virsh(&["snapshot-list", "run", "--name"])),
            ["first", "s1"]
        );
        assert_eq!(
            daemon.virsh(&["snapshot-current", "run", "--name"]).trim(),
            "s1"
        );
        assert_eq!(
            daemon.virsh(&["snapshot-parent", "run", "s1"]).trim(),
            "first"
        );
        control_ok(m.path(), "revert", "first");
        assert_eq!(
            daemon.virsh(&["snapshot-current", "run", "--name"]).trim(),
            "first"
        );
        control_ok(m.path(), "delete", "s1");
        assert_eq!(
            names(&daemon.virsh(&["snapshot-list", "run", "--name"])),
            ["first"]
        );
        control_ok(
            m.path(),
            "create",
            &format!("s2 --external {}", overlay.display()),
        );
        let blk = daemon.virsh(&["domblklist", "run"]);
        assert!(blk.contains(overlay.to_str().unwrap()), "{blk}");
        let status = status_text(m.path());
        assert!(!status.lines().any(|l| l.contains("libvirt")), "{status}");
    }
    assert_eq!(
        names(&daemon.virsh(&["snapshot-list", "run", "--name"])),
        ["first", "s2"]
    );
    daemon.restart();
    assert_eq!(
        names(&daemon.virsh(&["snapshot-list", "run", "--name"])),
        ["first", "s2"]
    );
    assert_eq!(
        daemon.virsh(&["snapshot-current", "run", "--name"]).trim(),
        "s2"
    );
    assert_eq!(
        daemon.virsh(&["snapshot-parent", "run", "s2"]).trim(),
        "first"
    );
    let blk = daemon.virsh(&["domblklist", "run"]);
    assert!(blk.contains(overlay.to_str().unwrap()), "{blk}");
}
