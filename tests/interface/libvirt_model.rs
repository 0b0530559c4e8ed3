//! libvirt snapshot XML: parsing, writing, round trips, folder loading, the parent tree.

use proptest::prelude::*;
use snapfs::libvirt::*;
use std::fs;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

fn p() -> PathBuf {
    PathBuf::from("/snap/test.xml")
}

/// The internal example of reference/libvirt-snapshots.md, verbatim.
const INTERNAL: &str = r#"<!-- internal snapshot (seed 000) -->
<domainsnapshot>
  <name>pkg-updated</name>
  <description>after apt upgrade</description>      <!-- optional -->
  <state>shutoff</state>                             <!-- running | paused | shutoff | disk-snapshot ... -->
  <parent><name>bare-os-install</name></parent>      <!-- optional: the snapshot tree -->
  <creationTime>1706250054</creationTime>            <!-- seconds since the epoch -->
  <memory snapshot='no'/>
  <disks>
    <disk name='vda' snapshot='internal'/>
  </disks>
  <domain type='kvm'> ... the whole domain definition at that time ... </domain>
  <active>1</active>                                 <!-- 1 on the current snapshot -->
</domainsnapshot>
"#;

/// The external example of reference/libvirt-snapshots.md, verbatim.
const EXTERNAL: &str = r#"<!-- external disk-only snapshot (seed 002) -->
<domainsnapshot>
  <name>1270477159</name>
  <parent><name>bare-os-install</name></parent>
  <disks>
    <disk name='vda' snapshot='external'>
      <driver type='qcow2'/>
      <source file='/path/to/new'/>    <!-- the NEW overlay created at snapshot time -->
    </disk>
    <disk name='vdb' snapshot='no'/>
  </disks>
  <domain> ... <disk><source file='/path/to/old'/><target dev='vda'/></disk> ... </domain>
</domainsnapshot>
"#;

fn snap(name: &str, parent: Option<&str>) -> DomainSnapshot {
    DomainSnapshot {
        name: name.into(),
        description: None,
        state: None,
        parent: parent.map(Into::into),
        creation_time: None,
        current: false,
        memory: None,
        disks: vec![],
        domain: None,
        source_file: p(),
    }
}

#[test]
fn internal_example() {
    let s = parse_snapshot_xml(INTERNAL, &p()).unwrap();
    assert_eq!(
        s,
        DomainSnapshot {
            name: "pkg-updated".into(),
            description: Some("after apt upgrade".into()),
            state: Some("shutoff".into()),
            parent: Some("bare-os-install".into()),
            creation_time: Some(1706250054),
            current: true,
            memory: Some("no".into()),
            disks: vec![SnapshotDisk {
                name: "vda".into(),
                snapshot: DiskSnapshotKind::Internal,
                source_file: None,
                driver_type: None,
            }],
            domain: Some(
                "<domain type='kvm'> ... the whole domain definition at that time ... </domain>"
                    .into()
            ),
            source_file: p(),
        }
    );
    assert_eq!(s.location(), "internal");
}

#[test]
fn external_example() {
    let s = parse_snapshot_xml(EXTERNAL, &p()).unwrap();
    assert_eq!(s.name, "1270477159");
    assert_eq!(s.parent.as_deref(), Some("bare-os-install"));
    assert_eq!(s.description, None);
    assert_eq!(s.state, None);
    assert_eq!(s.creation_time, None);
    assert!(!s.current);
    assert_eq!(
        s.disks,
        vec![
            SnapshotDisk {
                name: "vda".into(),
                snapshot: DiskSnapshotKind::External,
                source_file: Some("/path/to/new".into()),
                driver_type: Some("qcow2".into()),
            },
            SnapshotDisk {
                name: "vdb".into(),
                snapshot: DiskSnapshotKind::No,
                source_file: None,
                driver_type: None,
            },
        ]
    );
    assert!(s.disks[0].is_external());
    assert!(!s.disks[1].is_external());
    assert_eq!(s.location(), "external");
}

#[test]
fn domain_contents_are_ignored() {
    let xml = r#"<?xml version="1.0"?>
<!--
WARNING: THIS IS AN AUTO-GENERATED FILE.
-->
<domainsnapshot>
  <domain type='kvm'>
    <name>centos76-client</name>
    <uuid>93a5c045-6457-2c09-e56c-927cdf34e178</uuid>
    <description>the domain's description</description>
    <memory unit='KiB'>1048576</memory>
    <devices>
      <disk type='file' device='disk' snapshot='external'>
        <driver name='qemu' type='raw'/>
        <source file='/path/to/old'/>
        <target dev='vda' bus='virtio'/>
      </disk>
      <disks><disk name='fake' snapshot='external'><source file='/x'/></disk></disks>
    </devices>
    <parent><name>not-the-parent</name></parent>
    <active>1</active>
  </domain>
  <inactiveDomain type='kvm'><name>inactive</name><devices><disk><source file='/y'/></disk></devices></inactiveDomain>
  <cookie><cpu mode='custom'><model>Skylake</model></cpu><name>cookie</name></cookie>
  <name>real-name</name>
  <unknownElement attr='1'><name>nope</name></unknownElement>
  <disks>
    <disk name='vda' snapshot='external'>
      <source file='/path/to/new'/>
    </disk>
  </disks>
</domainsnapshot>"#;
    let s = parse_snapshot_xml(xml, &p()).unwrap();
    assert_eq!(s.name, "real-name");
    assert_eq!(s.description, None);
    assert_eq!(s.parent, None);
    assert_eq!(s.memory, None);
    assert!(!s.current);
    assert_eq!(s.disks.len(), 1);
    assert_eq!(s.disks[0].name, "vda");
    assert_eq!(
        s.disks[0].source_file.as_deref(),
        Some(Path::new("/path/to/new"))
    );
    assert_eq!(s.disks[0].driver_type, None);
}

#[test]
fn any_element_order() {
    let xml = "<domainsnapshot><active>0</active>\
            <disks><disk snapshot='internal' name='hda'/></disks>\
            <memory snapshot='internal'/><creationTime> 1567455358 </creationTime>\
            <parent><name>root</name></parent><state>running</state>\
            <description>d</description><name> late </name></domainsnapshot>";
    let s = parse_snapshot_xml(xml, &p()).unwrap();
    assert_eq!(s.name, "late");
    assert_eq!(s.description.as_deref(), Some("d"));
    assert_eq!(s.state.as_deref(), Some("running"));
    assert_eq!(s.parent.as_deref(), Some("root"));
    assert_eq!(s.creation_time, Some(1567455358));
    assert_eq!(s.memory.as_deref(), Some("internal"));
    assert!(!s.current);
    assert_eq!(s.disks[0].name, "hda");
    assert_eq!(s.disks[0].snapshot, DiskSnapshotKind::Internal);
}

#[test]
fn old_creationdate_spelling() {
    let xml =
        "<domainsnapshot><name>a</name><creationdate>1270477159</creationdate></domainsnapshot>";
    assert_eq!(
        parse_snapshot_xml(xml, &p()).unwrap().creation_time,
        Some(1270477159)
    );
    // A date instead of seconds is tolerated too.
    let xml = "<domainsnapshot><name>a</name><creationdate>2010-04-05T14:19:19Z</creationdate></domainsnapshot>";
    assert_eq!(
        parse_snapshot_xml(xml, &p()).unwrap().creation_time,
        Some(1270477159)
    );
    // <creationTime> wins over <creationdate>; garbage is ignored, not fatal.
    let xml = "<domainsnapshot><creationdate>5</creationdate><name>a</name>\
            <creationTime>7</creationTime></domainsnapshot>";
    assert_eq!(
        parse_snapshot_xml(xml, &p()).unwrap().creation_time,
        Some(7)
    );
    let xml =
        "<domainsnapshot><name>a</name><creationTime>yesterday</creationTime></domainsnapshot>";
    assert_eq!(parse_snapshot_xml(xml, &p()).unwrap().creation_time, None);
}

#[test]
fn broken_xml_is_an_error() {
    let cases = [
        "",
        "   ",
        "not xml at all",
        "<domainsnapshot><name>a</name>",
        "<domainsnapshot><name>a</domainsnapshot>",
        "<domainsnapshot><name>a</name></domainsnapshot><domainsnapshot/>",
        "<domainsnapshot><name>a &bogus; b</name></domainsnapshot>",
        "<domainsnapshot><name>a</name></domainsnapshot>trailing",
        "<domainsnapshot><name>a</name><disks><disk name='a' name='b'/></disks></domainsnapshot>",
        "<domainsnapshot><name>a</name><disks><disk name='x></disks></domainsnapshot>",
        "</domainsnapshot>",
        "<domainsnapshot><name>&#0;</name></domainsnapshot>",
    ];
    for xml in cases {
        let err = parse_snapshot_xml(xml, &p()).expect_err(xml);
        let msg = err.to_string();
        assert!(msg.starts_with("/snap/test.xml: "), "{msg}");
        assert!(!msg.contains('\n'), "{msg}");
        assert_eq!(err.path(), p());
    }
}

#[test]
fn wrong_root_and_missing_name() {
    let err = parse_snapshot_xml("<domain><name>x</name></domain>", &p()).unwrap_err();
    // The position, never the file's own text (a symlinked root-only file must not leak).
    assert!(
        matches!(err, LibvirtError::NotASnapshot { line: 1, .. }),
        "{err:?}"
    );
    let msg = err.to_string();
    assert!(
        msg.starts_with("/snap/test.xml: the root element (line 1, column "),
        "{msg}"
    );
    assert!(msg.ends_with(") is not <domainsnapshot>"), "{msg}");
    for xml in [
        "<domainsnapshot/>",
        "<domainsnapshot><state>shutoff</state></domainsnapshot>",
        "<domainsnapshot><name>  </name></domainsnapshot>",
        "<domainsnapshot><name/></domainsnapshot>",
        "<domainsnapshot><domain><name>dom</name></domain></domainsnapshot>",
    ] {
        let err = parse_snapshot_xml(xml, &p()).unwrap_err();
        assert!(
            matches!(err, LibvirtError::MissingName { .. }),
            "{xml}: {err}"
        );
        assert_eq!(
            err.to_string(),
            "/snap/test.xml: <domainsnapshot> has no <name>"
        );
    }
    let err = parse_snapshot_xml(
        "<domainsnapshot><name>a</name><name>b</name></domainsnapshot>",
        &p(),
    )
    .unwrap_err();
    assert!(matches!(err, LibvirtError::DuplicateName { .. }), "{err}");
}

#[test]
fn error_messages_stay_on_one_line() {
    let path = PathBuf::from("/snap/evil\nname.xml");
    let err = parse_snapshot_xml("<root\n/>", &path).unwrap_err();
    let msg = err.to_string();
    assert!(!msg.contains('\n'), "{msg}");
    assert!(msg.contains("evil\\nname.xml"), "{msg}");
}

#[test]
fn escaped_and_unicode_text() {
    let xml = "\u{feff}<domainsnapshot><name>caf\u{e9} &#x1F600;</name>\
            <description>a &amp; b &lt;c&gt; &quot;d&quot; &apos;e&apos; \u{65e5}\u{672c}\n  second line<![CDATA[ <raw> & ]]></description>\
            <disks><disk name='v&amp;da' snapshot='external'><source file='/img/a&apos;b &lt;c&gt;.qcow2'/></disk></disks>\
            </domainsnapshot>";
    let s = parse_snapshot_xml(xml, &p()).unwrap();
    assert_eq!(s.name, "caf\u{e9} \u{1F600}");
    assert_eq!(
        s.description.as_deref(),
        Some("a & b <c> \"d\" 'e' \u{65e5}\u{672c}\n  second line <raw> & ")
    );
    assert_eq!(s.disks[0].name, "v&da");
    assert_eq!(
        s.disks[0].source_file.as_deref(),
        Some(Path::new("/img/a'b <c>.qcow2"))
    );
}

#[test]
fn text_only_from_the_field_itself() {
    // Markup nested in a field is ignored, its surrounding text kept; CRLF becomes LF.
    let xml = "<domainsnapshot><name>n</name><description>a<b>hidden</b>c\r\nd</description></domainsnapshot>";
    let s = parse_snapshot_xml(xml, &p()).unwrap();
    assert_eq!(s.description.as_deref(), Some("ac\nd"));
}

#[test]
fn disk_without_snapshot_attribute() {
    // The creation form of seed 002: a <source> without snapshot= means external.
    let xml = "<domainsnapshot><name>n</name><disks><disk name='vda'><source file='/path/to/new'/></disk>\
            <disk name='vdb'/><disk name='sdc' snapshot='external' type='block'><source dev='/dev/vg/lv'/></disk>\
            <disk name='vdd' snapshot='weird'/></disks></domainsnapshot>";
    let s = parse_snapshot_xml(xml, &p()).unwrap();
    assert_eq!(s.disks[0].snapshot, DiskSnapshotKind::Other(String::new()));
    assert!(s.disks[0].is_external());
    assert!(!s.disks[1].is_external());
    assert_eq!(
        s.disks[2].source_file.as_deref(),
        Some(Path::new("/dev/vg/lv"))
    );
    assert_eq!(s.disks[3].snapshot, DiskSnapshotKind::Other("weird".into()));
    assert_eq!(parse_snapshot_xml(&to_xml(&s), &p()).unwrap(), s);
}

#[test]
fn round_trip() {
    for xml in [INTERNAL, EXTERNAL] {
        let s = parse_snapshot_xml(xml, &p()).unwrap();
        assert_eq!(parse_snapshot_xml(&to_xml(&s), &p()).unwrap(), s);
    }
    let mut s = snap("a <b> & 'c' \"d\"", Some("p&q"));
    s.description = Some(" \u{e9}\t<x>\r\n\u{9f}end ".into());
    s.state = Some("disk-snapshot".into());
    s.creation_time = Some(-12);
    s.memory = Some("external".into());
    s.current = true;
    s.disks = vec![
        SnapshotDisk {
            name: "vda".into(),
            snapshot: DiskSnapshotKind::External,
            source_file: Some("/a b/'q'\n\t&.qcow2".into()),
            driver_type: Some("qcow2".into()),
        },
        SnapshotDisk {
            name: "vdb".into(),
            snapshot: DiskSnapshotKind::Manual,
            source_file: None,
            driver_type: None,
        },
    ];
    let xml = to_xml(&s);
    assert_eq!(parse_snapshot_xml(&xml, &p()).unwrap(), s, "{xml}");
    // U+0085 and U+2028 are line ends only in XML 1.1; libvirt's files are XML 1.0.
    let mut s = snap("0\u{2028}!", Some("p\u{85}q"));
    s.description = Some("a\u{2028}b\u{85}c".into());
    s.disks = vec![SnapshotDisk {
        name: "v\u{2028}da".into(),
        snapshot: DiskSnapshotKind::External,
        source_file: Some("/x\u{2028}\u{85}.qcow2".into()),
        driver_type: Some("qcow2".into()),
    }];
    assert_eq!(parse_snapshot_xml(&to_xml(&s), &p()).unwrap(), s);
    // Empty description survives.
    let mut s = snap("x", None);
    s.description = Some(String::new());
    assert_eq!(parse_snapshot_xml(&to_xml(&s), &p()).unwrap(), s);
}

#[test]
fn to_xml_layout() {
    let s = parse_snapshot_xml(EXTERNAL, &p()).unwrap();
    assert_eq!(
        to_xml(&s),
        "<domainsnapshot>
  <name>1270477159</name>
  <parent>
    <name>bare-os-install</name>
  </parent>
  <disks>
    <disk name='vda' snapshot='external'>
      <driver type='qcow2'/>
      <source file='/path/to/new'/>
    </disk>
    <disk name='vdb' snapshot='no'/>
  </disks>
  <domain> ... <disk><source file='/path/to/old'/><target dev='vda'/></disk> ... </domain>
  <active>0</active>
</domainsnapshot>
"
    );
}

/// What libxml2, the library libvirt reads its files with, finds at `xpath` (a string
/// expression) in the file `path`.
fn libxml2_reads(path: &Path, xpath: &str) -> String {
    let out = std::process::Command::new("xmllint")
        .arg("--xpath")
        .arg(xpath)
        .arg(path)
        .output()
        .expect("run xmllint (scripts/test.sh installs it)");
    assert!(
        out.status.success(),
        "xmllint --xpath {xpath} {}: {}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let mut text = String::from_utf8(out.stdout).expect("xmllint prints UTF-8");
    // xmllint ends a string result with a line break of its own.
    assert_eq!(text.pop(), Some('\n'));
    text
}

/// Every field snapfs writes reads back the same through libxml2: markup characters, tab, CR
/// and LF in element text and in attribute values (where a reader would normalize them), C1
/// controls, XML 1.1 line ends and characters beyond the BMP.
#[test]
fn libxml2_reads_what_snapfs_writes() {
    let dir = tempfile::tempdir().unwrap();
    let tricky = " a<b>&'\"\tc\r\nd\re\u{85}f\u{2028}g\u{9f}\u{e9}\u{10348} ";
    // Names are read trimmed (as libvirt compares them), so the parent's has no outer spaces.
    let mut s = snap(
        &format!("n{}", tricky.trim()),
        Some(&format!("p{}", tricky.trim())),
    );
    s.description = Some(tricky.into());
    s.state = Some("disk-snapshot".into());
    s.creation_time = Some(1_706_250_054);
    s.memory = Some("no".into());
    s.current = true;
    s.disks = vec![SnapshotDisk {
        name: format!("v{tricky}"),
        snapshot: DiskSnapshotKind::External,
        source_file: Some(format!("/img/{tricky}.qcow2").into()),
        driver_type: Some("qcow2".into()),
    }];
    let path = write_atomically(dir.path(), &s).unwrap();
    let read = |xpath: &str| libxml2_reads(&path, &format!("string({xpath})"));
    assert_eq!(read("/domainsnapshot/name"), s.name);
    assert_eq!(read("/domainsnapshot/description"), tricky);
    assert_eq!(
        read("/domainsnapshot/parent/name"),
        s.parent.clone().unwrap()
    );
    assert_eq!(read("/domainsnapshot/state"), "disk-snapshot");
    assert_eq!(read("/domainsnapshot/creationTime"), "1706250054");
    assert_eq!(read("/domainsnapshot/active"), "1");
    assert_eq!(read("/domainsnapshot/memory/@snapshot"), "no");
    assert_eq!(
        read("/domainsnapshot/disks/disk/@name"),
        format!("v{tricky}")
    );
    assert_eq!(read("/domainsnapshot/disks/disk/@snapshot"), "external");
    assert_eq!(read("/domainsnapshot/disks/disk/driver/@type"), "qcow2");
    assert_eq!(
        read("/domainsnapshot/disks/disk/source/@file"),
        format!("/img/{tricky}.qcow2")
    );
    // And snapfs's own reader agrees.
    let mut back = load_dir(dir.path());
    assert!(back.1.is_empty(), "{:?}", back.1);
    s.source_file = path;
    assert_eq!(back.0.pop(), Some(s));

    // A new parent for a child libvirt wrote keeps the same characters.
    let child = dir.path().join("child.xml");
    fs::write(&child, INTERNAL).unwrap();
    set_parent_in_file(&child, Some(&format!("q{tricky}"))).unwrap();
    assert_eq!(
        libxml2_reads(&child, "string(/domainsnapshot/parent/name)"),
        format!("q{tricky}")
    );
}

/// Text XML 1.0 cannot hold (C0 controls other than tab, LF and CR; U+FFFE; U+FFFF) is refused
/// before any file is written: libxml2 refuses a file holding it even as a character reference.
#[test]
fn text_xml_cannot_hold_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    type Spoil = fn(&mut DomainSnapshot);
    let cases: [(&str, Spoil); 4] = [
        ("description", |s| s.description = Some("a\u{1}b".into())),
        ("name", |s| s.name = "n\u{fffe}".into()),
        ("parent", |s| s.parent = Some("p\u{1b}".into())),
        ("disk source file", |s| {
            s.disks = vec![SnapshotDisk {
                name: "vda".into(),
                snapshot: DiskSnapshotKind::External,
                source_file: Some("/img/\u{ffff}.qcow2".into()),
                driver_type: Some("qcow2".into()),
            }]
        }),
    ];
    for (field, spoil) in cases {
        let mut s = snap("x", None);
        spoil(&mut s);
        let error = write_atomically(dir.path(), &s).unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::InvalidInput, "{field}");
        let message = error.to_string();
        assert!(
            message.contains(field) && message.contains("U+"),
            "{field}: {message}"
        );
        // What to_xml would write anyway (such characters dropped) is a file libxml2 reads.
        let written = dir.path().join("dropped.xml");
        fs::write(&written, to_xml(&s)).unwrap();
        libxml2_reads(&written, "string(/domainsnapshot/name)");
    }
    let child = dir.path().join("child.xml");
    fs::write(&child, INTERNAL).unwrap();
    let error = set_parent_in_file(&child, Some("p\u{7}")).unwrap_err();
    assert_eq!(error.kind(), io::ErrorKind::InvalidInput);
    assert_eq!(fs::read_to_string(&child).unwrap(), INTERNAL);
    fs::remove_file(&child).unwrap();
    fs::remove_file(dir.path().join("dropped.xml")).unwrap();
    assert_eq!(
        fs::read_dir(dir.path()).unwrap().count(),
        0,
        "a file was written"
    );
}

#[test]
fn write_and_load_dir() {
    let dir = tempfile::tempdir().unwrap();
    let mut a = parse_snapshot_xml(INTERNAL, &p()).unwrap();
    let mut b = parse_snapshot_xml(EXTERNAL, &p()).unwrap();
    let pa = write_atomically(dir.path(), &a).unwrap();
    let pb = write_atomically(dir.path(), &b).unwrap();
    assert_eq!(pa, dir.path().join("pkg-updated.xml"));
    for path in [&pa, &pb] {
        let mode = fs::metadata(path).unwrap().permissions().mode();
        assert_eq!(mode & 0o7777, 0o600, "{path:?}");
    }
    // Overwriting works and stays atomic (no temp files left behind).
    b.description = Some("changed".into());
    write_atomically(dir.path(), &b).unwrap();
    // A bad file, a non-XML file and a sub-folder named *.xml.
    fs::write(dir.path().join("0-broken.xml"), "<domainsnapshot><name>x").unwrap();
    fs::write(dir.path().join("notes.txt"), "not a snapshot").unwrap();
    fs::create_dir(dir.path().join("sub.xml")).unwrap();
    let names: Vec<_> = fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert!(!names.iter().any(|n| n.ends_with(".tmp")), "{names:?}");

    let (snaps, errors) = load_dir(dir.path());
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert_eq!(errors[0].path(), dir.path().join("0-broken.xml"));
    // Sorted by file name: "1270477159.xml" < "pkg-updated.xml".
    a.source_file = pa;
    b.source_file = pb;
    assert_eq!(snaps, vec![b, a]);

    remove(dir.path(), "pkg-updated").unwrap();
    assert!(!dir.path().join("pkg-updated.xml").exists());
    assert_eq!(
        remove(dir.path(), "pkg-updated").unwrap_err().kind(),
        io::ErrorKind::NotFound
    );
}

#[test]
fn unsafe_names_refused() {
    let dir = tempfile::tempdir().unwrap();
    for name in ["", ".", "..", "a/b", "../x", "a\0b"] {
        let s = snap(name, None);
        let err = write_atomically(dir.path(), &s).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput, "{name:?}");
        assert_eq!(
            remove(dir.path(), name).unwrap_err().kind(),
            io::ErrorKind::InvalidInput
        );
    }
    assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 0);
    // Dots elsewhere are fine.
    write_atomically(dir.path(), &snap(".hidden..v1", None)).unwrap();
    let (snaps, errors) = load_dir(dir.path());
    assert!(errors.is_empty());
    assert_eq!(snaps[0].name, ".hidden..v1");
}

#[test]
fn load_dir_missing_folder_and_big_file() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope");
    let (snaps, errors) = load_dir(&missing);
    assert!(snaps.is_empty());
    assert_eq!(errors.len(), 1);
    assert!(matches!(errors[0], LibvirtError::Io { .. }));
    assert!(
        errors[0]
            .to_string()
            .starts_with(&format!("{}: cannot read: ", missing.display()))
    );

    let big = dir.path().join("big.xml");
    let f = fs::File::create(&big).unwrap();
    f.set_len(MAX_XML_SIZE + 1).unwrap();
    fs::write(
        dir.path().join("latin1.xml"),
        b"<domainsnapshot><name>caf\xe9</name></domainsnapshot>",
    )
    .unwrap();
    let (snaps, errors) = load_dir(dir.path());
    assert!(snaps.is_empty());
    assert!(
        matches!(errors[0], LibvirtError::TooLarge { .. }),
        "{}",
        errors[0]
    );
    assert!(
        matches!(errors[1], LibvirtError::NotUtf8 { offset: 25, .. }),
        "{}",
        errors[1]
    );
}

#[test]
fn tree_rendering() {
    // The branching tree of seed 003, given in no particular order.
    let snaps = vec![
        snap("wordpress", Some("pkg-updated")),
        snap("nginx", Some("desktop-live")),
        snap("pkg-updated", None),
        snap("apache", Some("desktop-live")),
        snap("desktop-live", Some("pkg-updated")),
    ];
    let t = SnapshotTree::new(&snaps);
    assert_eq!(
        t.render_tree(),
        "pkg-updated
  |
  +- desktop-live
  |   |
  |   +- apache
  |   +- nginx
  |
  +- wordpress
"
    );
    assert_eq!(t.len(), 5);
    assert_eq!(t.roots(), ["pkg-updated"]);
    assert_eq!(t.children("pkg-updated"), ["desktop-live", "wordpress"]);
    assert_eq!(t.children("apache"), [] as [String; 0]);
    assert_eq!(t.children("unknown"), [] as [String; 0]);
    assert_eq!(t.parent("apache"), Some("desktop-live"));
    assert_eq!(t.parent("pkg-updated"), None);
    assert_eq!(t.descendants("pkg-updated"), 4);
    assert_eq!(t.descendants("desktop-live"), 2);
    assert_eq!(t.descendants("wordpress"), 0);
    assert!(t.contains("nginx") && !t.contains("x"));
}

#[test]
fn tree_like_the_brief() {
    let snaps = vec![
        snap("bare-os-install", None),
        snap("b-pkg-updated", Some("bare-os-install")),
        snap("c-other", Some("bare-os-install")),
        snap("1270477159", Some("b-pkg-updated")),
    ];
    assert_eq!(
        SnapshotTree::new(&snaps).render_tree(),
        "bare-os-install
  |
  +- b-pkg-updated
  |   |
  |   +- 1270477159
  |
  +- c-other
"
    );
}

#[test]
fn tree_several_roots_orphans_and_cycles() {
    let snaps = vec![
        snap("solo", None),
        snap("orphan", Some("deleted")),
        snap("self", Some("self")),
        snap("x", Some("y")),
        snap("y", Some("x")),
        snap("z", Some("y")),
        snap("solo", Some("ignored-duplicate")),
    ];
    let t = SnapshotTree::new(&snaps);
    assert_eq!(t.len(), 6);
    assert_eq!(t.roots(), ["orphan", "self", "solo"]);
    assert_eq!(t.parent("orphan"), Some("deleted"));
    assert_eq!(t.parent("solo"), None);
    assert_eq!(t.descendants("x"), 2);
    assert_eq!(t.descendants("self"), 0);
    assert_eq!(
        t.render_tree(),
        "orphan

self

solo

x
  |
  +- y
      |
      +- z
"
    );
    assert_eq!(SnapshotTree::new(&[]).render_tree(), "");
    let t = SnapshotTree::new(&[snap("line\nbreak", None)]);
    assert_eq!(t.render_tree(), "line\\nbreak\n");
}

/// Any text XML 1.0 can hold, half of its characters ones a reader treats specially (markup,
/// the line ends of XML 1.0 and 1.1, tab), so that those turn up in most cases.
fn xml_text() -> impl Strategy<Value = String> {
    let any_xml_char = proptest::char::ranges(
        vec![
            '\t'..='\t',
            '\n'..='\n',
            '\r'..='\r',
            ' '..='\u{D7FF}',
            '\u{E000}'..='\u{FFFD}',
            '\u{10000}'..=char::MAX,
        ]
        .into(),
    );
    let special = proptest::sample::select(vec![
        '\t', '\n', '\r', ' ', '<', '>', '&', '\'', '"', '\u{85}', '\u{2028}', '\u{2029}',
    ]);
    proptest::collection::vec(prop_oneof![any_xml_char, special], 0..24).prop_map(String::from_iter)
}

proptest! {
    #[test]
    fn parse_never_panics(text in ".*") {
        let _ = parse_snapshot_xml(&text, &p());
    }

    #[test]
    fn parse_never_panics_on_xmlish(text in "[<>/a-z='\"&;# \n!?\\[\\]-]{0,200}") {
        let _ = parse_snapshot_xml(&text, &p());
        let wrapped = format!("<domainsnapshot><name>n</name>{text}</domainsnapshot>");
        let _ = parse_snapshot_xml(&wrapped, &p());
    }

    #[test]
    fn round_trip_any(
        name in xml_text().prop_map(|s| s.trim().to_string()).prop_filter("empty", |s| !s.is_empty()),
        description in proptest::option::of(xml_text()),
        state in proptest::option::of("[a-z-]{1,12}"),
        parent in proptest::option::of(xml_text().prop_map(|s| s.trim().to_string()).prop_filter("empty", |s| !s.is_empty())),
        creation_time in proptest::option::of(any::<i64>()),
        current in any::<bool>(),
        memory in proptest::option::of(prop_oneof![Just("no"), Just("internal"), Just("external")]),
        disks in proptest::collection::vec(
            (
                xml_text(),
                prop_oneof![
                    Just(DiskSnapshotKind::No),
                    Just(DiskSnapshotKind::Internal),
                    Just(DiskSnapshotKind::External),
                    Just(DiskSnapshotKind::Manual),
                    Just(DiskSnapshotKind::Other(String::new())),
                    Just(DiskSnapshotKind::Other("foo".into())),
                ],
                proptest::option::of(xml_text()),
                proptest::option::of(xml_text()),
            ),
            0..4,
        ),
    ) {
        let s = DomainSnapshot {
            name,
            description,
            state,
            parent,
            creation_time,
            current,
            memory: memory.map(String::from),
            disks: disks
                .into_iter()
                .map(|(name, snapshot, source, driver_type)| SnapshotDisk {
                    name,
                    snapshot,
                    source_file: source.map(PathBuf::from),
                    driver_type,
                })
                .collect(),
            domain: None,
            source_file: p(),
        };
        let xml = to_xml(&s);
        prop_assert_eq!(parse_snapshot_xml(&xml, &p()).unwrap(), s);
    }
}
