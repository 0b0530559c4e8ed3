//! Helpers for the libvirt-metadata tests (`tests/libvirt_*.rs`): a libvirt-style snapshot folder
//! next to a qcow2 chain built by qemu-img, what `virsh` would say about it, the folder's files
//! (content and mode) before and after, the snapshot tree read back with snapfs's own parser, and a
//! quick-xml element tree for semantic comparison of XML documents.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use quick_xml::events::Event;
use quick_xml::reader::Reader;

use snapfs::libvirt::{self, DomainSnapshot};

use super::{
    MIB, create_qcow2, getxattr_str, parse_rfc3339, qemu_io, snapshot_by_name, snapshot_create,
};

/// Size of every disk of the fixtures.
pub const DISK: u64 = 4 * MIB;

fn s(p: &Path) -> String {
    p.to_str().expect("test paths are UTF-8").to_string()
}

/// Writes `text` to `path` with exactly `mode`.
pub fn write_file_mode(path: &Path, text: &str, mode: u32) {
    fs::write(path, text).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
}

/// Seconds since the epoch as RFC 3339 UTC (`2010-04-05T14:19:19Z`).
pub fn epoch_rfc3339(secs: i64) -> String {
    let days = secs.div_euclid(86400);
    let rem = secs.rem_euclid(86400);
    // Howard Hinnant's civil_from_days.
    let z = days + 719468;
    let era = if z >= 0 { z } else { z - 146096 } / 146097;
    let doe = z - era * 146097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Seconds of an RFC 3339 time, or a description of why it is not one.
pub fn rfc3339_secs(what: &str, value: &str) -> Result<i64, String> {
    parse_rfc3339(value)
        .map(|(s, _)| s)
        .ok_or_else(|| format!("{what}: {value:?} is not an RFC 3339 time"))
}

// ---------------------------------------------------------------------------------------------
// XML texts
// ---------------------------------------------------------------------------------------------

/// A large `<domain>` element as libvirt stores it in a snapshot: its own `<name>`,
/// `<description>`, `<disk>`s with `<source file=...>` (`disks`: (target dev, file)), and a few
/// hundred lines of devices, so that a parser that mistakes the domain's elements for the
/// snapshot's, or that gives up on large input, is caught.
pub fn big_domain(disks: &[(&str, &str)]) -> String {
    let mut d = String::new();
    d.push_str("  <domain type='kvm'>\n");
    d.push_str("    <name>vm</name>\n");
    d.push_str("    <uuid>4dea22b3-1d52-d8f3-2516-782e98ab3fa0</uuid>\n");
    d.push_str("    <description>the DOMAIN's own description, not the snapshot's</description>\n");
    d.push_str("    <memory unit='KiB'>1048576</memory>\n");
    d.push_str("    <currentMemory unit='KiB'>1048576</currentMemory>\n");
    d.push_str("    <vcpu placement='static'>2</vcpu>\n");
    d.push_str("    <os>\n      <type arch='x86_64' machine='pc-q35-8.2'>hvm</type>\n      <boot dev='hd'/>\n    </os>\n");
    d.push_str("    <metadata>\n      <app:info xmlns:app='http://example.org/app'><![CDATA[<name>not-me</name> & <active>1</active>]]></app:info>\n    </metadata>\n");
    d.push_str("    <devices>\n      <emulator>/usr/bin/qemu-system-x86_64</emulator>\n");
    for (dev, file) in disks {
        d.push_str(&format!(
            "      <disk type='file' device='disk'>\n        <driver name='qemu' type='qcow2'/>\n        \
             <source file='{file}'/>\n        <target dev='{dev}' bus='virtio'/>\n      </disk>\n"
        ));
    }
    for i in 0..400 {
        d.push_str(&format!(
            "      <controller type='pci' index='{i}' model='pcie-root-port'>\n        \
             <target chassis='{i}' port='0x{i:x}'/>\n        \
             <address type='pci' domain='0x0000' bus='0x00' slot='0x02' function='0x{:x}'/>\n      \
             </controller>\n",
            i % 8
        ));
    }
    d.push_str("    </devices>\n  </domain>\n");
    d
}

/// One snapshot file in libvirt's layout. `disks`: (name, snapshot=, source file).
#[derive(Default, Clone)]
pub struct SnapXml<'a> {
    pub name: &'a str,
    pub description: Option<&'a str>,
    pub state: Option<&'a str>,
    pub parent: Option<&'a str>,
    pub creation_time: Option<i64>,
    /// Use the old `<creationdate>` spelling.
    pub old_date: bool,
    pub memory: Option<&'a str>,
    pub disks: Vec<(&'a str, &'a str, Option<String>)>,
    pub domain: Option<String>,
    pub active: Option<bool>,
}

impl SnapXml<'_> {
    pub fn render(&self) -> String {
        let mut x = String::from("<domainsnapshot>\n");
        x.push_str(&format!("  <name>{}</name>\n", self.name));
        if let Some(d) = self.description {
            x.push_str(&format!("  <description>{d}</description>\n"));
        }
        if let Some(st) = self.state {
            x.push_str(&format!("  <state>{st}</state>\n"));
        }
        if let Some(p) = self.parent {
            x.push_str(&format!("  <parent>\n    <name>{p}</name>\n  </parent>\n"));
        }
        if let Some(t) = self.creation_time {
            let tag = if self.old_date {
                "creationdate"
            } else {
                "creationTime"
            };
            x.push_str(&format!("  <{tag}>{t}</{tag}>\n"));
        }
        if let Some(m) = self.memory {
            x.push_str(&format!("  <memory snapshot='{m}'/>\n"));
        }
        if !self.disks.is_empty() {
            x.push_str("  <disks>\n");
            for (name, kind, source) in &self.disks {
                match source {
                    Some(f) => x.push_str(&format!(
                        "    <disk name='{name}' snapshot='{kind}'>\n      <driver type='qcow2'/>\n      \
                         <source file='{f}'/>\n    </disk>\n"
                    )),
                    None => x.push_str(&format!("    <disk name='{name}' snapshot='{kind}'/>\n")),
                }
            }
            x.push_str("  </disks>\n");
        }
        if let Some(d) = &self.domain {
            x.push_str(d);
        }
        if let Some(a) = self.active {
            x.push_str(&format!("  <active>{}</active>\n", u8::from(a)));
        }
        x.push_str("</domainsnapshot>\n");
        x
    }
}

// ---------------------------------------------------------------------------------------------
// The folder fixture: a chain with internal and external snapshots, and libvirt's XML for it
// ---------------------------------------------------------------------------------------------

/// base.qcow2 <- mid.qcow2 <- vm.qcow2 in `img/`, libvirt's snapshot folder in `snap/`.
///
/// libvirt's tree (creation times in brackets):
/// ```text
/// bare-os-install          external: the overlay created was mid.qcow2, so the state is base.qcow2 [old <creationdate>]
///   +- 1270477159          external: the overlay created was vm.qcow2, so the state is mid.qcow2 (big <domain>, a vdb disk elsewhere)
///   |   +- pkg-updated     internal, tag in vm.qcow2, libvirt's current snapshot
///   +- experiment          internal, tag in mid.qcow2
///       +- ghost           internal, no such tag anywhere
/// ```
/// plus `broken.xml` (not well formed), `foreign.xml` (an external snapshot of a disk elsewhere)
/// and `notes.txt` (not XML, ignored). vm.qcow2 also has an internal snapshot `untracked` that
/// libvirt does not know.
pub struct FolderFixture {
    pub img: PathBuf,
    pub dir: PathBuf,
    pub base: PathBuf,
    pub mid: PathBuf,
    pub top: PathBuf,
}

pub const T_BARE: i64 = 1262304000;
pub const T_1270: i64 = 1270477159;
pub const T_EXPERIMENT: i64 = 1275000000;
pub const T_PKG: i64 = 1706250054;
pub const T_GHOST: i64 = 1706300000;

pub fn folder_fixture(root: &Path) -> FolderFixture {
    let img = root.join("img");
    let dir = root.join("snap");
    fs::create_dir_all(&img).unwrap();
    fs::create_dir_all(&dir).unwrap();
    let base = img.join("base.qcow2");
    let mid = img.join("mid.qcow2");
    let top = img.join("vm.qcow2");

    create_qcow2(&base, DISK, "", None);
    qemu_io(&base, &["write -P 0x11 0 256k", "write -P 0x12 2M 64k"]);
    create_qcow2(&mid, DISK, "", Some((&s(&base), "qcow2")));
    qemu_io(&mid, &["write -P 0x22 128k 256k"]);
    snapshot_create(&mid, "experiment");
    qemu_io(&mid, &["write -P 0x23 512k 64k"]);
    create_qcow2(&top, DISK, "", Some((&s(&mid), "qcow2")));
    qemu_io(&top, &["write -P 0x33 256k 64k"]);
    snapshot_create(&top, "pkg-updated");
    qemu_io(&top, &["write -P 0x34 0 64k"]);
    snapshot_create(&top, "untracked");
    qemu_io(&top, &["write -P 0x35 1M 64k"]);

    let files: Vec<(&str, String)> = vec![
        (
            // Elements out of the usual order, entities in the description, the old date element.
            "bare-os-install.xml",
            format!(
                "<?xml version='1.0' encoding='UTF-8'?>\n<!-- written by an old libvirt -->\n<domainsnapshot>\n  \
                 <disks>\n    <disk name='vda' snapshot='external'>\n      <driver type='qcow2'/>\n      \
                 <source file='{}'/>\n    </disk>\n  </disks>\n  <state>shutoff</state>\n  \
                 <creationdate>{T_BARE}</creationdate>\n  <name>bare-os-install</name>\n  \
                 <description>fresh install &amp; &lt;tools&gt;</description>\n  <memory snapshot='no'/>\n  \
                 <active>0</active>\n</domainsnapshot>\n",
                s(&mid)
            ),
        ),
        (
            "1270477159.xml",
            SnapXml {
                name: "1270477159",
                state: Some("disk-snapshot"),
                parent: Some("bare-os-install"),
                creation_time: Some(T_1270),
                memory: Some("no"),
                disks: vec![
                    ("vda", "external", Some(s(&top))),
                    (
                        "vdb",
                        "external",
                        Some("/elsewhere/data.1270477159.qcow2".into()),
                    ),
                    ("hdc", "no", None),
                ],
                domain: Some(big_domain(&[
                    ("vda", &s(&mid)),
                    ("vdb", "/elsewhere/data.qcow2"),
                ])),
                active: Some(false),
                ..SnapXml::default()
            }
            .render(),
        ),
        (
            "experiment.xml",
            SnapXml {
                name: "experiment",
                description: Some("try things"),
                state: Some("running"),
                parent: Some("bare-os-install"),
                creation_time: Some(T_EXPERIMENT),
                memory: Some("internal"),
                disks: vec![("vda", "internal", None)],
                active: Some(false),
                ..SnapXml::default()
            }
            .render(),
        ),
        (
            "pkg-updated.xml",
            SnapXml {
                name: "pkg-updated",
                description: Some("after apt upgrade"),
                state: Some("shutoff"),
                parent: Some("1270477159"),
                creation_time: Some(T_PKG),
                memory: Some("no"),
                disks: vec![("vda", "internal", None)],
                domain: Some(big_domain(&[("vda", &s(&top))])),
                active: Some(true),
                ..SnapXml::default()
            }
            .render(),
        ),
        (
            "ghost.xml",
            SnapXml {
                name: "ghost",
                state: Some("shutoff"),
                parent: Some("experiment"),
                creation_time: Some(T_GHOST),
                memory: Some("no"),
                disks: vec![("vda", "internal", None)],
                active: Some(false),
                ..SnapXml::default()
            }
            .render(),
        ),
        (
            "broken.xml",
            "<domainsnapshot>\n  <name>broken</name>\n  <state>shutoff</sta\n".to_string(),
        ),
        (
            "foreign.xml",
            SnapXml {
                name: "foreign",
                state: Some("disk-snapshot"),
                parent: Some("pkg-updated"),
                creation_time: Some(1706400000),
                memory: Some("no"),
                disks: vec![("vda", "external", Some("/elsewhere/x.qcow2".into()))],
                active: Some(false),
                ..SnapXml::default()
            }
            .render(),
        ),
        ("notes.txt", "<<< not a snapshot, not XML".to_string()),
    ];
    for (name, text) in files {
        write_file_mode(&dir.join(name), &text, 0o600);
    }
    FolderFixture {
        img,
        dir,
        base,
        mid,
        top,
    }
}

/// What `virsh snapshot-info` says about one snapshot of the fixture, and the view holding it.
#[derive(Debug, Clone)]
pub struct ExpectedSnap {
    pub name: &'static str,
    pub state: &'static str,
    pub location: &'static str,
    pub parent: Option<&'static str>,
    pub children: Vec<&'static str>,
    pub descendants: u64,
    pub current: bool,
    pub created: i64,
    pub description: Option<&'static str>,
    /// `snapshots/NAME.raw` in the mount, when the chain holds the snapshot.
    pub file: Option<&'static str>,
}

/// The snapshots of [`folder_fixture`] that libvirt would list (broken.xml and foreign.xml are
/// not among them).
pub fn expected_snapshots() -> Vec<ExpectedSnap> {
    vec![
        ExpectedSnap {
            name: "bare-os-install",
            state: "shutoff",
            location: "external",
            parent: None,
            children: vec!["1270477159", "experiment"],
            descendants: 4,
            current: false,
            created: T_BARE,
            description: Some("fresh install & <tools>"),
            file: Some("snapshots/bare-os-install.raw"),
        },
        ExpectedSnap {
            name: "1270477159",
            state: "disk-snapshot",
            location: "external",
            parent: Some("bare-os-install"),
            children: vec!["pkg-updated"],
            descendants: 1,
            current: false,
            created: T_1270,
            description: None,
            file: Some("snapshots/1270477159.raw"),
        },
        ExpectedSnap {
            name: "experiment",
            state: "running",
            location: "internal",
            parent: Some("bare-os-install"),
            children: vec!["ghost"],
            descendants: 1,
            current: false,
            created: T_EXPERIMENT,
            description: Some("try things"),
            file: Some("snapshots/experiment.raw"),
        },
        ExpectedSnap {
            name: "pkg-updated",
            state: "shutoff",
            location: "internal",
            parent: Some("1270477159"),
            children: vec![],
            descendants: 0,
            current: true,
            created: T_PKG,
            description: Some("after apt upgrade"),
            file: Some("snapshots/pkg-updated.raw"),
        },
        ExpectedSnap {
            name: "ghost",
            state: "shutoff",
            location: "internal",
            parent: Some("experiment"),
            children: vec![],
            descendants: 0,
            current: false,
            created: T_GHOST,
            description: None,
            file: None,
        },
    ]
}

/// `virsh snapshot-list --tree` for the fixture (trailing blanks removed).
pub const EXPECTED_TREE: &[&str] = &[
    "bare-os-install",
    "  |",
    "  +- 1270477159",
    "  |   |",
    "  |   +- pkg-updated",
    "  |",
    "  +- experiment",
    "      |",
    "      +- ghost",
];

/// Compares a `libvirt` array (info.json, `snapfs info --json --libvirt`) with
/// [`expected_snapshots`]; `size` is the size of every view. Returns the problems.
pub fn libvirt_array_problems(what: &str, array: &serde_json::Value, size: u64) -> Vec<String> {
    let mut problems = Vec::new();
    let Some(list) = array.as_array() else {
        return vec![format!("{what}: `libvirt` is not an array: {array}")];
    };
    let mut by_name: BTreeMap<String, &serde_json::Value> = BTreeMap::new();
    for e in list {
        match e["name"].as_str() {
            Some(n) => {
                if by_name.insert(n.to_string(), e).is_some() {
                    problems.push(format!("{what}: snapshot {n:?} listed twice"));
                }
            }
            None => problems.push(format!("{what}: entry without a name: {e}")),
        }
    }
    let expected = expected_snapshots();
    let want: BTreeSet<String> = expected.iter().map(|e| e.name.to_string()).collect();
    let got: BTreeSet<String> = by_name.keys().cloned().collect();
    if want != got {
        problems.push(format!(
            "{what}: lists snapshots {got:?}, expected {want:?} (broken.xml and foreign.xml must be skipped)"
        ));
    }
    for e in &expected {
        let Some(v) = by_name.get(e.name) else {
            continue;
        };
        let mut field = |key: &str, want: serde_json::Value| {
            let have = v.get(key).cloned().unwrap_or(serde_json::Value::Null);
            if have != want {
                problems.push(format!(
                    "{what}: snapshot {}: {key} is {have}, expected {want}",
                    e.name
                ));
            }
        };
        field("state", e.state.into());
        field("location", e.location.into());
        field(
            "parent",
            e.parent.map_or(serde_json::Value::Null, Into::into),
        );
        field("children", serde_json::json!(e.children));
        field("descendants", e.descendants.into());
        field("current", e.current.into());
        field(
            "description",
            e.description.map_or(serde_json::Value::Null, Into::into),
        );
        field("file", e.file.map_or(serde_json::Value::Null, Into::into));
        field(
            "size",
            e.file
                .map_or(serde_json::Value::Null, |_| serde_json::json!(size)),
        );
        match v.get("created").and_then(|c| c.as_str()) {
            Some(c) => match rfc3339_secs("created", c) {
                Ok(t) if t == e.created => {}
                Ok(t) => problems.push(format!(
                    "{what}: snapshot {}: created {c:?} ({t}), expected {} ({})",
                    e.name,
                    epoch_rfc3339(e.created),
                    e.created
                )),
                Err(m) => problems.push(format!("{what}: snapshot {}: {m}", e.name)),
            },
            None => problems.push(format!(
                "{what}: snapshot {}: no `created`, expected {}",
                e.name,
                epoch_rfc3339(e.created)
            )),
        }
    }
    problems
}

/// The view facts of the fixture: (file, kind, libvirt name, state, current, description,
/// parent, created seconds). `created` of an internal snapshot is its qcow2 date (the image's
/// own date wins), of a layer libvirt's creationTime.
pub struct ExpectedView {
    pub file: &'static str,
    pub kind: &'static str,
    pub layer: PathBuf,
    pub libvirt_name: Option<&'static str>,
    pub state: Option<&'static str>,
    pub current: Option<bool>,
    pub description: Option<&'static str>,
    pub parent: Option<&'static str>,
    pub created: i64,
}

pub fn expected_views(fx: &FolderFixture) -> Vec<ExpectedView> {
    let date = |img: &Path, tag: &str| snapshot_by_name(img, tag).date_sec;
    vec![
        ExpectedView {
            file: "snapshots/bare-os-install.raw",
            kind: "external",
            layer: fx.base.clone(),
            libvirt_name: Some("bare-os-install"),
            state: Some("shutoff"),
            current: Some(false),
            description: Some("fresh install & <tools>"),
            parent: None,
            created: T_BARE,
        },
        ExpectedView {
            file: "snapshots/1270477159.raw",
            kind: "external",
            layer: fx.mid.clone(),
            libvirt_name: Some("1270477159"),
            state: Some("disk-snapshot"),
            current: Some(false),
            description: None,
            parent: Some("bare-os-install"),
            created: T_1270,
        },
        ExpectedView {
            file: "snapshots/experiment.raw",
            kind: "internal",
            layer: fx.mid.clone(),
            libvirt_name: Some("experiment"),
            state: Some("running"),
            current: Some(false),
            description: Some("try things"),
            parent: Some("bare-os-install"),
            created: date(&fx.mid, "experiment"),
        },
        ExpectedView {
            file: "snapshots/pkg-updated.raw",
            kind: "internal",
            layer: fx.top.clone(),
            libvirt_name: Some("pkg-updated"),
            state: Some("shutoff"),
            current: Some(true),
            description: Some("after apt upgrade"),
            parent: Some("1270477159"),
            created: date(&fx.top, "pkg-updated"),
        },
        ExpectedView {
            file: "snapshots/untracked.raw",
            kind: "internal",
            layer: fx.top.clone(),
            libvirt_name: None,
            state: None,
            current: None,
            description: None,
            parent: None,
            created: date(&fx.top, "untracked"),
        },
    ]
}

/// The `user.snapfs.*` attributes and the mtime of one view against its expectation.
pub fn view_xattr_problems(mp: &Path, v: &ExpectedView) -> Vec<String> {
    let path = mp.join(v.file);
    let mut problems = Vec::new();
    let md = match fs::metadata(&path) {
        Ok(m) => m,
        Err(e) => return vec![format!("{}: stat failed: {e}", v.file)],
    };
    let x = |name: &str| getxattr_str(&path, name);
    let mut check = |name: &str, want: Option<String>| {
        let have = x(name);
        if have != want {
            problems.push(format!(
                "{}: xattr {name} is {have:?}, expected {want:?}",
                v.file
            ));
        }
    };
    check("user.snapfs.kind", Some(v.kind.into()));
    check("user.snapfs.layer", Some(s(&v.layer)));
    check("user.snapfs.state", v.state.map(Into::into));
    check("user.snapfs.current", v.current.map(|c| c.to_string()));
    check("user.snapfs.description", v.description.map(Into::into));
    check("user.snapfs.parent", v.parent.map(Into::into));
    match x("user.snapfs.created") {
        Some(c) => match rfc3339_secs("user.snapfs.created", &c) {
            Ok(t) if t == v.created => {}
            Ok(t) => problems.push(format!(
                "{}: user.snapfs.created is {c:?} ({t}), expected {} ({})",
                v.file,
                epoch_rfc3339(v.created),
                v.created
            )),
            Err(m) => problems.push(format!("{}: {m}", v.file)),
        },
        None => problems.push(format!("{}: no user.snapfs.created", v.file)),
    }
    if md.mtime() != v.created {
        problems.push(format!(
            "{}: mtime is {} ({}), expected {} ({})",
            v.file,
            md.mtime(),
            epoch_rfc3339(md.mtime()),
            v.created,
            epoch_rfc3339(v.created)
        ));
    }
    problems
}

/// The views of info.json (`views` array) against [`expected_views`].
pub fn info_views_problems(
    what: &str,
    info: &serde_json::Value,
    views: &[ExpectedView],
) -> Vec<String> {
    let mut problems = Vec::new();
    let Some(list) = info["views"].as_array() else {
        return vec![format!("{what}: no `views` array")];
    };
    for v in views {
        let Some(j) = list.iter().find(|j| j["file"].as_str() == Some(v.file)) else {
            problems.push(format!(
                "{what}: no view {} (views: {:?})",
                v.file,
                list.iter().map(|j| j["file"].clone()).collect::<Vec<_>>()
            ));
            continue;
        };
        let mut field = |key: &str, want: serde_json::Value| {
            let have = j.get(key).cloned().unwrap_or(serde_json::Value::Null);
            if have != want {
                problems.push(format!(
                    "{what}: view {}: {key} is {have}, expected {want}",
                    v.file
                ));
            }
        };
        let opt = |o: Option<&str>| o.map_or(serde_json::Value::Null, Into::into);
        field("kind", v.kind.into());
        field("libvirt-name", opt(v.libvirt_name));
        field("state", opt(v.state));
        field("current", v.current.unwrap_or(false).into());
        field("description", opt(v.description));
        field("parent", opt(v.parent));
        match j["created"].as_str().map(|c| rfc3339_secs("created", c)) {
            Some(Ok(t)) if t == v.created => {}
            other => problems.push(format!(
                "{what}: view {}: created is {other:?}, expected {}",
                v.file,
                epoch_rfc3339(v.created)
            )),
        }
    }
    problems
}

// ---------------------------------------------------------------------------------------------
// The folder's files, before and after
// ---------------------------------------------------------------------------------------------

/// Every entry of `dir`: name -> (mode, content). Sub-directories have empty content.
pub type FolderState = BTreeMap<String, (u32, Vec<u8>)>;

pub fn folder_state(dir: &Path) -> FolderState {
    let mut out = BTreeMap::new();
    for e in fs::read_dir(dir).unwrap_or_else(|e| panic!("read_dir {}: {e}", dir.display())) {
        let e = e.unwrap();
        let md = fs::symlink_metadata(e.path()).unwrap();
        let content = if md.is_file() {
            fs::read(e.path()).unwrap()
        } else {
            Vec::new()
        };
        out.insert(
            e.file_name().to_string_lossy().into_owned(),
            (md.mode(), content),
        );
    }
    out
}

/// The differences between two [`folder_state`]s, one line each.
pub fn folder_diff(before: &FolderState, after: &FolderState) -> Vec<String> {
    let mut d = Vec::new();
    for (name, (mode, content)) in before {
        match after.get(name) {
            None => d.push(format!("{name} was removed")),
            Some((m, c)) => {
                if m != mode {
                    d.push(format!("{name}: mode {mode:o} became {m:o}"));
                }
                if c != content {
                    d.push(format!(
                        "{name}: content changed ({} -> {} bytes)",
                        content.len(),
                        c.len()
                    ));
                }
            }
        }
    }
    for name in after.keys() {
        if !before.contains_key(name) {
            d.push(format!("{name} appeared"));
        }
    }
    d
}

/// Reads the folder back with snapfs's own loader: snapshots by name, and the load errors.
pub fn read_back(dir: &Path) -> (BTreeMap<String, DomainSnapshot>, Vec<String>) {
    let (snaps, errors) = libvirt::load_dir(dir);
    let mut map = BTreeMap::new();
    for sn in snaps {
        map.insert(sn.name.clone(), sn);
    }
    (map, errors.iter().map(|e| e.to_string()).collect())
}

/// The tree as libvirt sees it after reading the folder: name -> parent, and the current ones.
/// Problems: load errors, parents that name no snapshot (libvirt: "inconsistent relations"),
/// and a tree that differs from `want` (name -> parent) or `want_current`.
pub fn tree_problems(
    what: &str,
    dir: &Path,
    want: &[(&str, Option<&str>)],
    want_current: Option<&str>,
) -> Vec<String> {
    let (snaps, errors) = read_back(dir);
    let mut problems: Vec<String> = errors
        .iter()
        .map(|e| format!("{what}: the folder does not read back: {e}"))
        .collect();
    let got: BTreeMap<String, Option<String>> = snaps
        .iter()
        .map(|(n, s)| (n.clone(), s.parent.clone()))
        .collect();
    let want_map: BTreeMap<String, Option<String>> = want
        .iter()
        .map(|(n, p)| (n.to_string(), p.map(str::to_string)))
        .collect();
    if got != want_map {
        problems.push(format!(
            "{what}: the folder reads back as the tree (name -> parent) {got:?}, expected {want_map:?}"
        ));
    }
    for (n, p) in &got {
        if let Some(p) = p {
            if !got.contains_key(p) {
                problems.push(format!(
                    "{what}: {n}.xml names parent {p:?}, which has no XML (libvirt: inconsistent relations)"
                ));
            }
        }
    }
    let current: Vec<&String> = snaps
        .iter()
        .filter(|(_, s)| s.current)
        .map(|(n, _)| n)
        .collect();
    let want_cur: Vec<String> = want_current.iter().map(|c| c.to_string()).collect();
    if current.iter().map(|c| c.as_str()).collect::<Vec<_>>()
        != want_cur.iter().map(|c| c.as_str()).collect::<Vec<_>>()
    {
        problems.push(format!(
            "{what}: the current snapshot (<active>1</active>) is {current:?}, expected {want_cur:?}"
        ));
    }
    problems
}

// ---------------------------------------------------------------------------------------------
// XML as an element tree (quick-xml), for semantic comparison
// ---------------------------------------------------------------------------------------------

/// An element: name, attributes, its own text (trimmed; empty when only white space), children.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    pub name: String,
    pub attrs: BTreeMap<String, String>,
    pub text: String,
    pub children: Vec<Node>,
}

/// Parses a whole document with quick-xml into its root element. Comments, declarations and
/// processing instructions are dropped; entity and character references are resolved.
pub fn xml_tree(text: &str) -> Result<Node, String> {
    let mut reader = Reader::from_str(text);
    let mut stack: Vec<Node> = Vec::new();
    let mut root: Option<Node> = None;
    let open =
        |e: &quick_xml::events::BytesStart<'_>, reader: &Reader<&[u8]>| -> Result<Node, String> {
            let mut attrs = BTreeMap::new();
            for a in e.attributes() {
                let a = a.map_err(|e| format!("bad attribute: {e}"))?;
                let v = a
                    .decode_and_unescape_value(reader.decoder())
                    .map_err(|e| format!("bad attribute value: {e}"))?;
                attrs.insert(
                    String::from_utf8_lossy(a.key.as_ref()).into_owned(),
                    v.into_owned(),
                );
            }
            Ok(Node {
                name: String::from_utf8_lossy(e.name().as_ref()).into_owned(),
                attrs,
                text: String::new(),
                children: Vec::new(),
            })
        };
    let close =
        |node: Node, stack: &mut Vec<Node>, root: &mut Option<Node>| -> Result<(), String> {
            let mut node = node;
            node.text = node.text.trim().to_string();
            match stack.last_mut() {
                Some(parent) => parent.children.push(node),
                None => {
                    if root.is_some() {
                        return Err("more than one root element".into());
                    }
                    *root = Some(node);
                }
            }
            Ok(())
        };
    loop {
        let ev = reader
            .read_event()
            .map_err(|e| format!("at byte {}: {e}", reader.error_position()))?;
        match ev {
            Event::Start(e) => {
                let n = open(&e, &reader)?;
                stack.push(n);
            }
            Event::Empty(e) => {
                let n = open(&e, &reader)?;
                close(n, &mut stack, &mut root)?;
            }
            Event::End(_) => {
                let n = stack.pop().ok_or("closing tag without opening tag")?;
                close(n, &mut stack, &mut root)?;
            }
            Event::Text(t) => {
                let s = t.xml_content().map_err(|e| e.to_string())?;
                match stack.last_mut() {
                    Some(n) => n.text.push_str(&s),
                    None if s.trim().is_empty() => {}
                    None => return Err("text outside the root element".into()),
                }
            }
            Event::CData(t) => {
                let s = t.xml_content().map_err(|e| e.to_string())?;
                if let Some(n) = stack.last_mut() {
                    n.text.push_str(&s);
                }
            }
            Event::GeneralRef(r) => {
                let resolved = match r.resolve_char_ref().map_err(|e| e.to_string())? {
                    Some(c) => c.to_string(),
                    None => {
                        let name = r.decode().map_err(|e| e.to_string())?;
                        quick_xml::escape::resolve_xml_entity(&name)
                            .ok_or_else(|| format!("unknown entity &{name};"))?
                            .to_string()
                    }
                };
                if let Some(n) = stack.last_mut() {
                    n.text.push_str(&resolved);
                }
            }
            Event::Comment(_) | Event::Decl(_) | Event::PI(_) | Event::DocType(_) => {}
            Event::Eof => break,
        }
    }
    if !stack.is_empty() {
        return Err(format!("{} element(s) not closed", stack.len()));
    }
    root.ok_or_else(|| "no root element".into())
}

/// The quick-xml round trip of one snapshot file: the file is well formed, parses with snapfs's
/// parser, `to_xml(parse(x))` is the same element tree as `x` (leaving out the
/// `<inactiveDomain>` and `<cookie>` elements `to_xml` does not write, when `allow_domain`; the
/// `<domain>` is written back verbatim), and parsing that again gives the same snapshot.
pub fn round_trip_problems(path: &Path, allow_domain: bool) -> Vec<String> {
    let name = path.file_name().unwrap().to_string_lossy().into_owned();
    let text = match fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) => return vec![format!("{name}: cannot read: {e}")],
    };
    let mut problems = Vec::new();
    let mut tree = match xml_tree(&text) {
        Ok(t) => t,
        Err(e) => return vec![format!("{name}: quick-xml cannot read it: {e}\n{text}")],
    };
    let parsed = match libvirt::parse_snapshot_xml(&text, path) {
        Ok(p) => p,
        Err(e) => return vec![format!("{name}: snapfs cannot parse it back: {e}")],
    };
    let again = libvirt::to_xml(&parsed);
    match xml_tree(&again) {
        Ok(t2) => {
            if allow_domain {
                tree.children
                    .retain(|c| !matches!(c.name.as_str(), "inactiveDomain" | "cookie"));
            } else if tree.children.iter().any(|c| c.name == "domain") {
                problems.push(format!("{name}: has a <domain> element, not expected here"));
            }
            if tree != t2 {
                problems.push(format!(
                    "{name}: to_xml(parse(x)) is not the same XML as x\n--- x ---\n{text}\n--- to_xml(parse(x)) ---\n{again}"
                ));
            }
        }
        Err(e) => problems.push(format!(
            "{name}: to_xml output is not well formed: {e}\n{again}"
        )),
    }
    match libvirt::parse_snapshot_xml(&again, path) {
        Ok(p2) if p2 == parsed => {}
        Ok(p2) => problems.push(format!(
            "{name}: parse(to_xml(parse(x))) differs from parse(x): {p2:?} vs {parsed:?}"
        )),
        Err(e) => problems.push(format!("{name}: to_xml output does not parse: {e}")),
    }
    problems
}

/// The lines of `snapfs info` text output after `header`, up to the first empty line, with the
/// first line's indentation removed from all (and trailing blanks trimmed).
pub fn section_after(text: &str, header: &str) -> Option<Vec<String>> {
    let mut lines = text.lines().skip_while(|l| l.trim() != header);
    lines.next()?;
    let body: Vec<&str> = lines.take_while(|l| !l.trim().is_empty()).collect();
    let indent = body
        .first()
        .map(|l| l.len() - l.trim_start().len())
        .unwrap_or(0);
    Some(
        body.iter()
            .map(|l| {
                let l = l.trim_end();
                l.get(indent..).unwrap_or(l.trim_start()).to_string()
            })
            .collect(),
    )
}

/// `Key: value` blocks of `snapfs info` text, each starting at a `Name:` line: name -> fields.
pub fn fact_blocks(text: &str) -> BTreeMap<String, BTreeMap<String, String>> {
    let mut out: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
    let mut current: Option<String> = None;
    for line in text.lines() {
        let t = line.trim();
        if t.is_empty() {
            current = None;
            continue;
        }
        let Some((k, v)) = t.split_once(':') else {
            continue;
        };
        let (k, v) = (k.trim().to_string(), v.trim().to_string());
        if k == "Name" {
            current = Some(v.clone());
            out.entry(v).or_default();
        } else if let Some(c) = &current {
            out.get_mut(c).unwrap().insert(k, v);
        }
    }
    out
}

/// The text of the first `<NAME>` element of `xml`, trimmed (`None` if there is none).
pub fn element_text(xml: &str, name: &str) -> Option<String> {
    let open = format!("<{name}>");
    let start = xml.find(&open)? + open.len();
    let end = start + xml[start..].find(&format!("</{name}>"))?;
    Some(xml[start..end].trim().to_owned())
}
