//! `snapfs mount --domain NAME`: every disk of a libvirt domain in one mount, against a real
//! libvirtd and virsh (tests/common/libvirtd.rs). The disks come from the daemon (or the domain
//! file without one), each under `MP/TARGET/`; the top-level `control/create` takes one libvirt
//! snapshot of every disk, all or none, which virsh lists, dumps, reverts and deletes as one of
//! its own.

use std::fs;
use std::path::{Path, PathBuf};

use crate::common::libvirtd::{Libvirtd, domain_xml};
use crate::common::snapshot_support::{
    control_err, control_ok, qemu_content, qemu_snapshot, snapshot_tags, status_text,
};
use crate::common::*;

const DISK: u64 = 4 * MIB;

fn image(dir: &Path, name: &str, pattern: u8) -> PathBuf {
    let img = dir.join(name);
    create_qcow2(&img, DISK, "", None);
    qemu_io(&img, &[&format!("write -P {pattern} 0 256k")]);
    img
}

/// Defines domain `name` with qcow2 disks `vda` = `a`, `vdb` = `b`, a read-only CD-ROM `sda`
/// whose medium is `iso` between them, and a read-only qcow2 disk `vdc` (`ro.qcow2` beside `a`).
fn define_two_disks_and_a_cdrom(daemon: &Libvirtd, name: &str, a: &Path, b: &Path, iso: &Path) {
    let two = domain_xml(name, &[("vda", a), ("vdb", b)]);
    let read_only = a.with_file_name("ro.qcow2");
    if !read_only.exists() {
        create_qcow2(&read_only, DISK, "", None);
    }
    let cdrom = format!(
        "    <disk type='file' device='cdrom'>\n      <driver name='qemu' type='raw'/>\n      \
         <source file='{}'/>\n      <target dev='sda' bus='sata'/>\n      <readonly/>\n    \
         </disk>\n    <disk type='file' device='disk'>\n      <driver name='qemu' type='qcow2'/>\n      \
         <source file='{}'/>\n      <target dev='vdc' bus='virtio'/>\n      <readonly/>\n    \
         </disk>\n",
        iso.display(),
        read_only.display()
    );
    // The CD-ROM between the two disks in the file given; libvirt keeps disks sorted by bus
    // (vda, vdb, sda) and pairs a snapshot's disks with the domain's by position: snapfs records
    // them in the definition's order.
    let at = two.find("    <disk type='file' device='disk'>\n      <driver name='qemu' type='qcow2'/>\n      <source file='")
        .and_then(|first| two[first + 1..].find("    <disk ").map(|second| first + 1 + second))
        .expect("two disks in the domain XML");
    let xml = format!("{}{cdrom}{}", &two[..at], &two[at..]);
    let file = daemon.root().join(format!("define-{name}.xml"));
    fs::write(&file, xml).unwrap();
    daemon.virsh(&["define", file.to_str().unwrap()]);
}

/// `-o libvirt=DIR,libvirt-domain=FILE[,libvirt-uri=URI]` for `domain` of `daemon`.
fn domain_options(daemon: &Libvirtd, domain: &str, through_daemon: bool) -> String {
    let mut o = format!(
        "libvirt={},libvirt-domain={}",
        daemon.snapshot_dir(domain).display(),
        daemon.domain_file(domain).display()
    );
    if through_daemon {
        o.push_str(&format!(",libvirt-uri={}", daemon.uri()));
    }
    o
}

fn names(list: &str) -> Vec<&str> {
    list.lines().filter(|l| !l.is_empty()).collect()
}

fn entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("read_dir {}: {e}", dir.display()))
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// The `<disks>` of a snapshot's XML, one `NAME=KIND` per disk, in order.
fn snapshot_disks(xml: &str) -> Vec<String> {
    let start = xml.find("<disks>").expect("<disks>");
    let end = xml.find("</disks>").expect("</disks>");
    xml[start..end]
        .match_indices("<disk name='")
        .map(|(at, _)| {
            let rest = &xml[start + at + "<disk name='".len()..];
            let name = &rest[..rest.find('\'').unwrap()];
            let kind = rest
                .find("snapshot='")
                .map(|k| {
                    let v = &rest[k + "snapshot='".len()..];
                    &v[..v.find('\'').unwrap()]
                })
                .unwrap_or("");
            format!("{name}={kind}")
        })
        .collect()
}

/// With libvirtd running: the domain's two writable qcow2 disks are `vda/` and `vdb/`; the CD-ROM
/// and the read-only disk are not mounted (control/status says why). A top-level create (a name
/// with a space, through the wrapper; then a plain one) is one snapshot for virsh at once, with
/// both disks internal and the other two `snapshot='no'`, and the tag in both images. A create
/// that fails on `vdb` (the name is taken there) leaves neither a tag in `vda` nor any XML. The
/// top-level revert and delete act on both disks and move libvirt's current snapshot / drop its
/// metadata; virsh reverts both disks to what snapfs recorded and deletes it from both images.
#[test]
fn domain_mount_snapshots_every_disk_at_once_through_libvirtd() {
    let wd = workdir();
    let a = image(wd.path(), "a.qcow2", 0x11);
    let b = image(wd.path(), "b.qcow2", 0x44);
    let iso = wd.path().join("install.iso");
    fs::write(&iso, vec![0u8; 1 << 20]).unwrap();
    // A tag only vdb's image has, unknown to libvirt: a create of that name fails on vdb.
    qemu_snapshot(&b, "-c", "taken");
    let daemon = Libvirtd::start();
    define_two_disks_and_a_cdrom(&daemon, "two", &a, &b, &iso);
    let (a_at_snap, b_at_snap) = (qemu_content(&a, None), qemu_content(&b, None));
    {
        // In the background: snapfs asked the daemon for the disks before it forked.
        let m = Mount::domain_background("two", &["-o", &domain_options(&daemon, "two", true)]);
        assert_eq!(entries(m.path()), ["control", "vda", "vdb"]);
        assert_eq!(
            entries(&m.path().join("control")),
            ["create", "delete", "revert", "status"]
        );
        assert!(m.path().join("vda/live.raw").is_file());
        assert_eq!(
            fs::read(m.path().join("vdb/live.raw")).unwrap(),
            b_at_snap,
            "vdb/live.raw is b.qcow2's disk"
        );
        let status = status_text(m.path());
        assert!(
            status.contains("sda: not mounted: a cdrom")
                && status.contains("vdc: not mounted: read-only"),
            "control/status:\n{status}"
        );

        run(snapfs_cmd()
            .args(["snapshot", "create"])
            .arg(m.path())
            .args(["before upgrade", "apt upgrade of 2026-12"]));
        assert_eq!(
            names(&daemon.virsh(&["snapshot-list", "two", "--name"])),
            ["before upgrade"],
            "virsh lists the snapshot at once"
        );
        control_ok(m.path(), "create", "second");
        assert_eq!(
            names(&daemon.virsh(&["snapshot-list", "two", "--name"])),
            ["before upgrade", "second"]
        );
        assert_eq!(
            daemon.virsh(&["snapshot-current", "two", "--name"]).trim(),
            "second"
        );
        assert_eq!(
            daemon.virsh(&["snapshot-parent", "two", "second"]).trim(),
            "before upgrade"
        );
        let xml = daemon.virsh(&["snapshot-dumpxml", "two", "before upgrade"]);
        assert_eq!(
            snapshot_disks(&xml),
            ["vda=internal", "vdb=internal", "vdc=no", "sda=no"],
            "{xml}"
        );
        assert!(xml.contains("<state>shutoff</state>"), "{xml}");
        assert!(
            xml.contains("<description>apt upgrade of 2026-12</description>"),
            "{xml}"
        );
        for (disk, img) in [("vda", &a), ("vdb", &b)] {
            let tags = snapshot_tags(img);
            assert!(
                tags.iter().any(|t| t == "before upgrade") && tags.iter().any(|t| t == "second"),
                "{disk}: {tags:?}"
            );
            let views = entries(&m.path().join(disk).join("snapshots"));
            assert!(
                views.contains(&"before upgrade.raw".to_owned()),
                "{disk}/snapshots: {views:?}"
            );
        }

        // vda takes the tag, vdb refuses (EEXIST): vda's tag goes again, no XML is left.
        control_err(m.path(), "create", "taken", libc::EEXIST);
        let status = status_text(m.path());
        assert!(status.contains("vdb: a snapshot named"), "{status}");
        assert!(status.contains("rolled back"), "{status}");
        assert_eq!(snapshot_tags(&a), ["before upgrade", "second"]);
        assert_eq!(snapshot_tags(&b), ["taken", "before upgrade", "second"]);
        assert!(!entries(&m.path().join("vda/snapshots")).contains(&"taken.raw".to_owned()));
        assert_eq!(
            names(&daemon.virsh(&["snapshot-list", "two", "--name"])),
            ["before upgrade", "second"]
        );
        assert!(!daemon.snapshot_dir("two").join("taken.xml").exists());
        let dumped = daemon.virsh(&["snapshot-dumpxml", "two", "second"]);
        assert_eq!(
            snapshot_disks(&dumped),
            ["vda=internal", "vdb=internal", "vdc=no", "sda=no"]
        );

        // The top-level revert and delete act on every disk and tell libvirt once.
        for disk in ["vda", "vdb"] {
            let live = fs::OpenOptions::new()
                .write(true)
                .open(m.path().join(disk).join("live.raw"))
                .unwrap();
            std::os::unix::fs::FileExt::write_all_at(&live, &[0x77u8; 256 << 10], 0).unwrap();
        }
        control_ok(m.path(), "revert", "\"before upgrade\"");
        assert!(fs::read(m.path().join("vda/live.raw")).unwrap() == a_at_snap);
        assert!(fs::read(m.path().join("vdb/live.raw")).unwrap() == b_at_snap);
        assert_eq!(
            daemon.virsh(&["snapshot-current", "two", "--name"]).trim(),
            "before upgrade"
        );
        control_ok(m.path(), "delete", "second");
        assert_eq!(snapshot_tags(&a), ["before upgrade"]);
        assert_eq!(snapshot_tags(&b), ["taken", "before upgrade"]);
        assert_eq!(
            names(&daemon.virsh(&["snapshot-list", "two", "--name"])),
            ["before upgrade"]
        );
        // A name one disk lacks: refused before anything is done.
        control_err(m.path(), "delete", "taken", libc::ENOENT);
        assert_eq!(snapshot_tags(&b), ["taken", "before upgrade"]);
    }
    // virsh acts on what snapfs recorded, on both disks.
    qemu_io(&a, &["write -P 0x55 0 256k"]);
    qemu_io(&b, &["write -P 0x66 0 256k"]);
    daemon.virsh(&["snapshot-revert", "two", "before upgrade"]);
    assert!(qemu_content(&a, None) == a_at_snap, "vda not reverted");
    assert!(qemu_content(&b, None) == b_at_snap, "vdb not reverted");
    daemon.virsh(&["snapshot-delete", "two", "before upgrade"]);
    assert!(snapshot_tags(&a).is_empty());
    assert_eq!(snapshot_tags(&b), ["taken"]);
}

/// Without a daemon the disks come from the domain file and the snapshot is written to the
/// folder as libvirt writes it; the daemon started afterwards lists it with both disks and
/// reverts both. A read-only mount (`-r`) refuses the top-level create with EROFS.
#[test]
fn domain_mount_without_a_daemon_writes_the_folder() {
    let wd = workdir();
    let a = image(wd.path(), "a.qcow2", 0x21);
    let b = image(wd.path(), "b.qcow2", 0x22);
    let iso = wd.path().join("install.iso");
    fs::write(&iso, vec![0u8; 1 << 20]).unwrap();
    let mut daemon = Libvirtd::start();
    define_two_disks_and_a_cdrom(&daemon, "off", &a, &b, &iso);
    daemon.virsh(&["snapshot-create-as", "off", "by-virsh"]);
    daemon.stop();
    let (a_at_snap, b_at_snap) = (qemu_content(&a, None), qemu_content(&b, None));
    {
        let m = Mount::domain("off", &["-r", "-o", &domain_options(&daemon, "off", false)]);
        assert_eq!(entries(m.path()), ["control", "vda", "vdb"]);
        control_err(m.path(), "create", "nope", libc::EROFS);
    }
    {
        let m = Mount::domain("off", &["-o", &domain_options(&daemon, "off", false)]);
        assert!(m.path().join("vda/snapshots/by-virsh.raw").is_file());
        // One disk's delete of a snapshot libvirt records for both would drop vdb's record too.
        control_err(&m.path().join("vda"), "delete", "by-virsh", libc::EBUSY);
        let status = status_text(&m.path().join("vda"));
        assert!(
            status.contains("for disk(s) vdb too") && status.contains("virsh snapshot-delete"),
            "vda/control/status:\n{status}"
        );
        assert_eq!(snapshot_tags(&a), ["by-virsh"]);
        assert!(daemon.snapshot_dir("off").join("by-virsh.xml").is_file());
        control_ok(m.path(), "create", "by-snapfs");
    }
    let dir = daemon.snapshot_dir("off");
    let xml = fs::read_to_string(dir.join("by-snapfs.xml")).unwrap();
    assert_eq!(
        snapshot_disks(&xml),
        ["vda=internal", "vdb=internal", "vdc=no", "sda=no"]
    );
    assert!(xml.contains("<parent>\n    <name>by-virsh</name>"), "{xml}");
    assert!(
        fs::read_to_string(dir.join("by-virsh.xml"))
            .unwrap()
            .contains("<active>0</active>")
    );
    daemon.restart();
    // The state virsh wrote for its own internal snapshot of the shut-off domain.
    let state = |name: &str| {
        let xml = daemon.virsh(&["snapshot-dumpxml", "off", name]);
        crate::common::libvirt_support::element_text(&xml, "state")
    };
    assert_eq!(state("by-snapfs"), state("by-virsh"));
    assert_eq!(
        names(&daemon.virsh(&["snapshot-list", "off", "--name"])),
        ["by-snapfs", "by-virsh"],
        "virsh lists by name"
    );
    assert_eq!(
        daemon.virsh(&["snapshot-current", "off", "--name"]).trim(),
        "by-snapfs"
    );
    qemu_io(&a, &["write -P 0x55 0 256k"]);
    qemu_io(&b, &["write -P 0x66 0 256k"]);
    daemon.virsh(&["snapshot-revert", "off", "by-snapfs"]);
    assert!(qemu_content(&a, None) == a_at_snap, "vda not reverted");
    assert!(qemu_content(&b, None) == b_at_snap, "vdb not reverted");
    daemon.virsh(&["snapshot-delete", "off", "by-snapfs"]);
    assert_eq!(snapshot_tags(&a), ["by-virsh"]);
    assert_eq!(snapshot_tags(&b), ["by-virsh"]);
}
