//! libvirt snapshot metadata: the `<domainsnapshot>` XML files libvirt keeps per domain in
//! `/var/lib/libvirt/qemu/snapshot/DOMAIN/NAME.xml` (see DESIGN.md section 4).
//!
//! Reading is tolerant: elements may come in any order, unknown elements are ignored, and the
//! (large) `<domain>`, `<inactiveDomain>` and `<cookie>` elements are skipped entirely, so that the
//! `<name>`, `<description>` and `<disk>` elements of the *domain* are never mistaken for the
//! snapshot's. Only a missing `<name>`, a root element other than `<domainsnapshot>`, or XML that is
//! not well formed makes a file fail, and [`load_dir`] reports such a file and goes on with the rest.
//!
//! Writing ([`to_xml`], [`write_atomically`]) produces libvirt's own layout, so that
//! `parse_snapshot_xml(&to_xml(s), p) == s` holds for every snapshot whose `source_file` is `p`
//! (strings must not contain NUL, which XML cannot carry; names and other one-word fields are
//! read trimmed, so they must not begin or end with white space).

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsStr;
use std::fmt::Write as _;
use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use quick_xml::events::{BytesRef, BytesStart, Event};
use quick_xml::reader::Reader;

/// Largest snapshot XML file [`load_dir`] reads (a `<domain>` is a few tens of KiB in practice).
pub const MAX_XML_SIZE: u64 = 16 * 1024 * 1024;

/// One libvirt snapshot, as described by one `NAME.xml` file.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct DomainSnapshot {
    /// `<name>`: the snapshot's name; for internal snapshots also the qcow2 snapshot tag.
    pub name: String,
    /// `<description>`, verbatim (not trimmed).
    pub description: Option<String>,
    /// `<state>`: running | paused | shutoff | disk-snapshot | ...
    pub state: Option<String>,
    /// `<parent><name>`: the snapshot this one was taken on top of.
    pub parent: Option<String>,
    /// `<creationTime>` (seconds since the epoch), or the older `<creationdate>`.
    pub creation_time: Option<i64>,
    /// `<active>1</active>`: this is the domain's current snapshot.
    pub current: bool,
    /// `<memory snapshot='no|internal|external'/>`.
    pub memory: Option<String>,
    /// `<disks><disk .../></disks>`, in file order.
    pub disks: Vec<SnapshotDisk>,
    /// The XML file this snapshot was read from.
    pub source_file: PathBuf,
}

/// One `<disks><disk>` entry of a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct SnapshotDisk {
    /// The guest disk (`<target dev=...>` of the domain), e.g. `vda`.
    pub name: String,
    /// The `snapshot=` attribute.
    pub snapshot: DiskSnapshotKind,
    /// `<source file=.../>` (or `dev=` for block devices): for an external snapshot the NEW overlay
    /// created at snapshot time.
    pub source_file: Option<PathBuf>,
    /// `<driver type=.../>`, e.g. `qcow2`.
    pub driver_type: Option<String>,
}

/// The `snapshot=` attribute of a snapshot `<disk>`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub enum DiskSnapshotKind {
    /// `no`: the disk is not part of the snapshot.
    No,
    /// `internal`: the state is a snapshot inside the qcow2 image, tagged with the snapshot name.
    Internal,
    /// `external`: the old image became read-only and a new overlay (`source_file`) was created.
    External,
    /// `manual`: the snapshot of this disk was taken by the user outside libvirt.
    Manual,
    /// Any other value. `Other("")` stands for an absent attribute (the domain's default); libvirt
    /// treats such a disk with a `<source>` as external, see [`SnapshotDisk::is_external`].
    Other(String),
}

impl DiskSnapshotKind {
    /// Reads the attribute's value.
    pub fn parse(value: &str) -> Self {
        match value {
            "no" => DiskSnapshotKind::No,
            "internal" => DiskSnapshotKind::Internal,
            "external" => DiskSnapshotKind::External,
            "manual" => DiskSnapshotKind::Manual,
            other => DiskSnapshotKind::Other(other.to_string()),
        }
    }

    /// The attribute's value (`""` when absent).
    pub fn as_str(&self) -> &str {
        match self {
            DiskSnapshotKind::No => "no",
            DiskSnapshotKind::Internal => "internal",
            DiskSnapshotKind::External => "external",
            DiskSnapshotKind::Manual => "manual",
            DiskSnapshotKind::Other(s) => s,
        }
    }
}

impl SnapshotDisk {
    /// Whether the disk was snapshotted externally: `snapshot='external'`, or no `snapshot=`
    /// attribute but a `<source>` (libvirt's rule: a source implies an external snapshot).
    pub fn is_external(&self) -> bool {
        match &self.snapshot {
            DiskSnapshotKind::External => true,
            DiskSnapshotKind::Other(s) => s.is_empty() && self.source_file.is_some(),
            _ => false,
        }
    }
}

impl DomainSnapshot {
    /// `virsh snapshot-info`'s "Location": `external` if any disk was snapshotted externally (or
    /// the memory state is external), else `internal` if any disk or the memory is internal, else
    /// `none`.
    pub fn location(&self) -> &'static str {
        if self.disks.iter().any(SnapshotDisk::is_external)
            || self.memory.as_deref() == Some("external")
        {
            "external"
        } else if self
            .disks
            .iter()
            .any(|d| d.snapshot == DiskSnapshotKind::Internal)
            || self.memory.as_deref() == Some("internal")
        {
            "internal"
        } else {
            "none"
        }
    }
}

/// Why a snapshot XML file (or the folder) could not be used. Every message is one line that names
/// the file and what is wrong with it.
#[derive(Debug, thiserror::Error)]
pub enum LibvirtError {
    /// The file or folder could not be read.
    #[error("{}: cannot read: {}", one_line_path(.path), one_line(&.source.to_string()))]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The file is larger than [`MAX_XML_SIZE`].
    #[error("{}: file is larger than {limit} bytes, not read", one_line_path(.path))]
    TooLarge { path: PathBuf, limit: u64 },
    /// The file is not UTF-8 text.
    #[error("{}: not UTF-8 text (invalid byte at offset {offset})", one_line_path(.path))]
    NotUtf8 { path: PathBuf, offset: usize },
    /// The XML is not well formed.
    #[error("{}: malformed XML at byte {position}: {}", one_line_path(.path), one_line(.message))]
    Malformed {
        path: PathBuf,
        position: u64,
        message: String,
    },
    /// The root element is not `<domainsnapshot>`.
    #[error("{}: root element is <{}>, not <domainsnapshot>", one_line_path(.path), one_line(.found))]
    NotASnapshot { path: PathBuf, found: String },
    /// `<domainsnapshot>` has no (or an empty) `<name>`.
    #[error("{}: <domainsnapshot> has no <name>", one_line_path(.path))]
    MissingName { path: PathBuf },
    /// `<domainsnapshot>` has more than one `<name>`.
    #[error("{}: <domainsnapshot> has more than one <name> ({:?} and {:?})", one_line_path(.path), .first, .second)]
    DuplicateName {
        path: PathBuf,
        first: String,
        second: String,
    },
}

impl LibvirtError {
    /// The file (or folder) the error is about.
    pub fn path(&self) -> &Path {
        match self {
            LibvirtError::Io { path, .. }
            | LibvirtError::TooLarge { path, .. }
            | LibvirtError::NotUtf8 { path, .. }
            | LibvirtError::Malformed { path, .. }
            | LibvirtError::NotASnapshot { path, .. }
            | LibvirtError::MissingName { path }
            | LibvirtError::DuplicateName { path, .. } => path,
        }
    }
}

/// Text with control characters (newlines included) escaped, so that it stays on one line.
fn one_line(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

fn one_line_path(p: &Path) -> String {
    one_line(&p.to_string_lossy())
}

// ---------------------------------------------------------------------------------------------
// Parsing
// ---------------------------------------------------------------------------------------------

/// Where the parser is; one entry per open element.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ctx {
    /// `<domainsnapshot>`.
    Root,
    /// A direct child of the root whose text is a field.
    Field(Field),
    /// `<parent>`.
    Parent,
    /// `<parent><name>`.
    ParentName,
    /// `<disks>`.
    Disks,
    /// `<disks><disk>`.
    Disk,
    /// Anything else (including everything inside `<domain>`): ignored.
    Skip,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Field {
    Name,
    Description,
    State,
    CreationTime,
    CreationDate,
    Active,
}

#[derive(Default)]
struct Partial {
    name: Option<String>,
    description: Option<String>,
    state: Option<String>,
    parent: Option<String>,
    creation_time: Option<i64>,
    creation_date: Option<i64>,
    current: bool,
    memory: Option<String>,
    disks: Vec<SnapshotDisk>,
}

/// Parses one `<domainsnapshot>` document; `source` is the file it came from (used in errors and
/// stored in [`DomainSnapshot::source_file`]).
pub fn parse_snapshot_xml(text: &str, source: &Path) -> Result<DomainSnapshot, LibvirtError> {
    let mut reader = Reader::from_str(text);
    let malformed = |reader: &Reader<&[u8]>, message: String| LibvirtError::Malformed {
        path: source.to_path_buf(),
        position: reader.error_position().max(reader.buffer_position()),
        message,
    };

    let mut stack: Vec<Ctx> = Vec::new();
    let mut seen_root = false;
    let mut done = false;
    let mut part = Partial::default();
    // Text of the field being read (the innermost `Ctx::Field`/`Ctx::ParentName`), if any.
    let mut text_buf: Option<String> = None;

    loop {
        let event = match reader.read_event() {
            Ok(ev) => ev,
            Err(e) => {
                let pos = reader.error_position();
                return Err(LibvirtError::Malformed {
                    path: source.to_path_buf(),
                    position: pos,
                    message: e.to_string(),
                });
            }
        };
        match event {
            Event::Start(e) | Event::Empty(e) if done => {
                let name = String::from_utf8_lossy(e.name().as_ref()).into_owned();
                return Err(malformed(
                    &reader,
                    format!("second root element <{name}> after </domainsnapshot>"),
                ));
            }
            Event::Start(e) => {
                let ctx = open_element(&e, &stack, &mut seen_root, &mut part, &reader, source)?;
                if matches!(ctx, Ctx::Field(_) | Ctx::ParentName) {
                    text_buf = Some(String::new());
                }
                stack.push(ctx);
            }
            Event::Empty(e) => {
                let ctx = open_element(&e, &stack, &mut seen_root, &mut part, &reader, source)?;
                // An empty element is opened and closed at once.
                if matches!(ctx, Ctx::Field(_) | Ctx::ParentName) {
                    close_text(ctx, String::new(), &mut part, source)?;
                }
                if ctx == Ctx::Root {
                    done = true;
                }
            }
            Event::End(_) => {
                let Some(ctx) = stack.pop() else {
                    return Err(malformed(
                        &reader,
                        "closing tag without an opening tag".into(),
                    ));
                };
                if matches!(ctx, Ctx::Field(_) | Ctx::ParentName) {
                    let text = text_buf.take().unwrap_or_default();
                    close_text(ctx, text, &mut part, source)?;
                }
                if stack.is_empty() {
                    done = true;
                }
            }
            Event::Text(t) => {
                let s = t
                    .xml_content()
                    .map_err(|e| malformed(&reader, e.to_string()))?;
                if stack.is_empty() {
                    if !s.trim().is_empty() {
                        return Err(malformed(&reader, "text outside the root element".into()));
                    }
                } else if collecting(&stack) {
                    if let Some(buf) = text_buf.as_mut() {
                        buf.push_str(&s);
                    }
                }
            }
            Event::CData(t) => {
                if stack.is_empty() {
                    return Err(malformed(&reader, "CDATA outside the root element".into()));
                }
                let s = t
                    .xml_content()
                    .map_err(|e| malformed(&reader, e.to_string()))?;
                if collecting(&stack) {
                    if let Some(buf) = text_buf.as_mut() {
                        buf.push_str(&s);
                    }
                }
            }
            Event::GeneralRef(r) => {
                if stack.is_empty() {
                    return Err(malformed(
                        &reader,
                        "reference outside the root element".into(),
                    ));
                }
                let resolved = resolve_reference(&r).map_err(|m| malformed(&reader, m))?;
                if collecting(&stack) {
                    if let Some(buf) = text_buf.as_mut() {
                        buf.push_str(&resolved);
                    }
                }
            }
            Event::Comment(_) | Event::Decl(_) | Event::PI(_) | Event::DocType(_) => {}
            Event::Eof => break,
        }
    }

    if !stack.is_empty() {
        return Err(malformed(
            &reader,
            format!("end of file inside an element ({} not closed)", stack.len()),
        ));
    }
    if !seen_root {
        return Err(malformed(&reader, "no root element".into()));
    }

    let name = match part.name {
        Some(n) if !n.is_empty() => n,
        _ => {
            return Err(LibvirtError::MissingName {
                path: source.to_path_buf(),
            });
        }
    };
    Ok(DomainSnapshot {
        name,
        description: part.description,
        state: part.state,
        parent: part.parent,
        creation_time: part.creation_time.or(part.creation_date),
        current: part.current,
        memory: part.memory,
        disks: part.disks,
        source_file: source.to_path_buf(),
    })
}

/// Whether text at the current position belongs to the field being read (only text that is a direct
/// child of the field element counts).
fn collecting(stack: &[Ctx]) -> bool {
    matches!(stack.last(), Some(Ctx::Field(_) | Ctx::ParentName))
}

/// Classifies a newly opened element and records its attributes.
fn open_element(
    e: &BytesStart<'_>,
    stack: &[Ctx],
    seen_root: &mut bool,
    part: &mut Partial,
    reader: &Reader<&[u8]>,
    source: &Path,
) -> Result<Ctx, LibvirtError> {
    let qname = e.name();
    let name = qname.as_ref();
    let Some(&parent) = stack.last() else {
        // A root element.
        if name != b"domainsnapshot" {
            return Err(LibvirtError::NotASnapshot {
                path: source.to_path_buf(),
                found: String::from_utf8_lossy(name).into_owned(),
            });
        }
        *seen_root = true;
        return Ok(Ctx::Root);
    };
    let ctx = match (parent, name) {
        (Ctx::Root, b"name") => Ctx::Field(Field::Name),
        (Ctx::Root, b"description") => Ctx::Field(Field::Description),
        (Ctx::Root, b"state") => Ctx::Field(Field::State),
        (Ctx::Root, b"creationTime") => Ctx::Field(Field::CreationTime),
        (Ctx::Root, b"creationdate") => Ctx::Field(Field::CreationDate),
        (Ctx::Root, b"active") => Ctx::Field(Field::Active),
        (Ctx::Root, b"parent") => Ctx::Parent,
        (Ctx::Root, b"disks") => Ctx::Disks,
        (Ctx::Root, b"memory") => {
            if let Some(v) = attribute(e, b"snapshot", reader, source)? {
                let v = v.trim();
                part.memory = (!v.is_empty()).then(|| v.to_string());
            }
            Ctx::Skip
        }
        (Ctx::Parent, b"name") => Ctx::ParentName,
        (Ctx::Disks, b"disk") => {
            let name = attribute(e, b"name", reader, source)?.unwrap_or_default();
            let kind = attribute(e, b"snapshot", reader, source)?.unwrap_or_default();
            part.disks.push(SnapshotDisk {
                name,
                snapshot: DiskSnapshotKind::parse(&kind),
                source_file: None,
                driver_type: None,
            });
            Ctx::Disk
        }
        (Ctx::Disk, b"source") => {
            let file = match attribute(e, b"file", reader, source)? {
                Some(f) => Some(f),
                None => attribute(e, b"dev", reader, source)?,
            };
            if let (Some(f), Some(disk)) = (file, part.disks.last_mut()) {
                disk.source_file = Some(PathBuf::from(f));
            }
            Ctx::Skip
        }
        (Ctx::Disk, b"driver") => {
            if let (Some(t), Some(disk)) = (
                attribute(e, b"type", reader, source)?,
                part.disks.last_mut(),
            ) {
                disk.driver_type = Some(t);
            }
            Ctx::Skip
        }
        // <domain>, <inactiveDomain>, <cookie> and everything unknown, with all they contain.
        _ => Ctx::Skip,
    };
    Ok(ctx)
}

/// The unescaped value of attribute `key`, if present.
fn attribute(
    e: &BytesStart<'_>,
    key: &[u8],
    reader: &Reader<&[u8]>,
    source: &Path,
) -> Result<Option<String>, LibvirtError> {
    let malformed = |message: String| LibvirtError::Malformed {
        path: source.to_path_buf(),
        position: reader.buffer_position(),
        message,
    };
    let mut found = None;
    // All attributes are looked at, so that malformed ones (e.g. duplicates) are noticed.
    for attr in e.attributes() {
        let attr = attr.map_err(|err| malformed(format!("bad attribute: {err}")))?;
        if found.is_none() && attr.key.as_ref() == key {
            let value = attr
                .decode_and_unescape_value(reader.decoder())
                .map_err(|err| malformed(format!("bad attribute value: {err}")))?;
            found = Some(value.into_owned());
        }
    }
    Ok(found)
}

/// Resolves `&name;` / `&#N;` to its text.
fn resolve_reference(r: &BytesRef<'_>) -> Result<String, String> {
    match r.resolve_char_ref() {
        Ok(Some(c)) => return Ok(c.to_string()),
        Ok(None) => {}
        Err(e) => return Err(e.to_string()),
    }
    let name = r.decode().map_err(|e| e.to_string())?;
    match quick_xml::escape::resolve_xml_entity(&name) {
        Some(s) => Ok(s.to_string()),
        None => Err(format!("unknown entity &{name};")),
    }
}

/// Stores the text of a closed field element.
fn close_text(
    ctx: Ctx,
    text: String,
    part: &mut Partial,
    source: &Path,
) -> Result<(), LibvirtError> {
    let trimmed = || {
        let t = text.trim();
        (!t.is_empty()).then(|| t.to_string())
    };
    match ctx {
        Ctx::Field(Field::Name) => {
            let new = text.trim().to_string();
            if let Some(old) = &part.name {
                return Err(LibvirtError::DuplicateName {
                    path: source.to_path_buf(),
                    first: old.clone(),
                    second: new,
                });
            }
            part.name = Some(new);
        }
        Ctx::Field(Field::Description) => part.description = Some(text),
        Ctx::Field(Field::State) => part.state = trimmed(),
        Ctx::ParentName => part.parent = trimmed(),
        Ctx::Field(Field::CreationTime) => part.creation_time = parse_time(&text, source),
        Ctx::Field(Field::CreationDate) => part.creation_date = parse_time(&text, source),
        Ctx::Field(Field::Active) => {
            part.current = matches!(text.trim(), "1" | "yes" | "true");
        }
        _ => {}
    }
    Ok(())
}

/// Seconds since the epoch, as libvirt writes them; tolerated too: an RFC 3339 date
/// (`2024-01-26T11:50:54Z`, `2024-01-26 11:50:54`). Anything else is ignored with a warning.
fn parse_time(text: &str, source: &Path) -> Option<i64> {
    let t = text.trim();
    if t.is_empty() {
        return None;
    }
    if let Ok(n) = t.parse::<i64>() {
        return Some(n);
    }
    if let Ok(time) = humantime::parse_rfc3339_weak(t) {
        return Some(match time.duration_since(std::time::UNIX_EPOCH) {
            Ok(d) => i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
            Err(e) => i64::try_from(e.duration().as_secs()).map_or(i64::MIN, |s| -s),
        });
    }
    log::warn!(
        "{}: creation time {:?} is not a number of seconds, ignored",
        one_line_path(source),
        t
    );
    None
}

// ---------------------------------------------------------------------------------------------
// Loading a folder
// ---------------------------------------------------------------------------------------------

/// Reads every `*.xml` file of `dir`, in file-name order. Returns the snapshots that parsed and one
/// error per file that did not (or a single error if the folder itself cannot be read). Never fails
/// as a whole. Files larger than [`MAX_XML_SIZE`] are reported and not read.
pub fn load_dir(dir: &Path) -> (Vec<DomainSnapshot>, Vec<LibvirtError>) {
    let mut snapshots = Vec::new();
    let mut errors = Vec::new();
    let entries = match fs::read_dir(dir) {
        Ok(it) => it,
        Err(source) => {
            errors.push(LibvirtError::Io {
                path: dir.to_path_buf(),
                source,
            });
            return (snapshots, errors);
        }
    };
    let mut files: Vec<PathBuf> = Vec::new();
    for entry in entries {
        match entry {
            Ok(entry) => {
                let path = entry.path();
                if path.extension() == Some(OsStr::new("xml")) {
                    files.push(path);
                }
            }
            Err(source) => errors.push(LibvirtError::Io {
                path: dir.to_path_buf(),
                source,
            }),
        }
    }
    files.sort_by(|a, b| a.file_name().cmp(&b.file_name()));
    for path in files {
        // Sub-folders named *.xml are not snapshots; skip them silently.
        if fs::metadata(&path).is_ok_and(|m| m.is_dir()) {
            continue;
        }
        match read_capped(&path).and_then(|text| parse_snapshot_xml(&text, &path)) {
            Ok(s) => snapshots.push(s),
            Err(e) => errors.push(e),
        }
    }
    (snapshots, errors)
}

/// The file's text, refusing files larger than [`MAX_XML_SIZE`].
fn read_capped(path: &Path) -> Result<String, LibvirtError> {
    let io_err = |source| LibvirtError::Io {
        path: path.to_path_buf(),
        source,
    };
    let file = fs::File::open(path).map_err(io_err)?;
    let too_large = || LibvirtError::TooLarge {
        path: path.to_path_buf(),
        limit: MAX_XML_SIZE,
    };
    if file.metadata().map_err(io_err)?.len() > MAX_XML_SIZE {
        return Err(too_large());
    }
    let mut bytes = Vec::new();
    // The file may grow while being read: never read more than the limit (+1 to notice).
    file.take(MAX_XML_SIZE + 1)
        .read_to_end(&mut bytes)
        .map_err(io_err)?;
    if bytes.len() as u64 > MAX_XML_SIZE {
        return Err(too_large());
    }
    String::from_utf8(bytes).map_err(|e| LibvirtError::NotUtf8 {
        path: path.to_path_buf(),
        offset: e.utf8_error().valid_up_to(),
    })
}

// ---------------------------------------------------------------------------------------------
// Writing
// ---------------------------------------------------------------------------------------------

/// Escapes text for XML element content or a quoted attribute value: the five special characters,
/// and control characters (including tab, CR and LF, which attribute values and EOL normalization
/// would not keep) as character references. NUL cannot be represented in XML and is dropped.
fn xml_escape(s: &str, attribute: bool) -> String {
    let base = quick_xml::escape::escape(s);
    if !base.chars().any(char::is_control) {
        return base.into_owned();
    }
    let mut out = String::with_capacity(base.len() + 8);
    for c in base.chars() {
        match c {
            '\0' => {}
            '\n' | '\t' if !attribute => out.push(c),
            c if c.is_control() => {
                let _ = write!(out, "&#x{:X};", c as u32);
            }
            c => out.push(c),
        }
    }
    out
}

/// The snapshot in libvirt's `<domainsnapshot>` format (without a `<domain>` element).
pub fn to_xml(s: &DomainSnapshot) -> String {
    let mut out = String::new();
    let text = |t: &str| xml_escape(t, false);
    let attr = |t: &str| xml_escape(t, true);
    out.push_str("<domainsnapshot>\n");
    let _ = writeln!(out, "  <name>{}</name>", text(&s.name));
    if let Some(d) = &s.description {
        let _ = writeln!(out, "  <description>{}</description>", text(d));
    }
    if let Some(st) = &s.state {
        let _ = writeln!(out, "  <state>{}</state>", text(st));
    }
    if let Some(p) = &s.parent {
        let _ = writeln!(out, "  <parent>\n    <name>{}</name>\n  </parent>", text(p));
    }
    if let Some(t) = s.creation_time {
        let _ = writeln!(out, "  <creationTime>{t}</creationTime>");
    }
    if let Some(m) = &s.memory {
        let _ = writeln!(out, "  <memory snapshot='{}'/>", attr(m));
    }
    if !s.disks.is_empty() {
        out.push_str("  <disks>\n");
        for d in &s.disks {
            let _ = write!(out, "    <disk name='{}'", attr(&d.name));
            let kind = d.snapshot.as_str();
            if !kind.is_empty() {
                let _ = write!(out, " snapshot='{}'", attr(kind));
            }
            if d.driver_type.is_none() && d.source_file.is_none() {
                out.push_str("/>\n");
                continue;
            }
            out.push_str(">\n");
            if let Some(t) = &d.driver_type {
                let _ = writeln!(out, "      <driver type='{}'/>", attr(t));
            }
            if let Some(f) = &d.source_file {
                let _ = writeln!(out, "      <source file='{}'/>", attr(&f.to_string_lossy()));
            }
            out.push_str("    </disk>\n");
        }
        out.push_str("  </disks>\n");
    }
    let _ = writeln!(out, "  <active>{}</active>", u8::from(s.current));
    out.push_str("</domainsnapshot>\n");
    out
}

/// Refuses snapshot names that are not a single safe file-name component.
fn check_name(name: &str) -> io::Result<()> {
    if name.is_empty() || name == "." || name == ".." || name.contains('/') || name.contains('\0') {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("snapshot name {:?} is not usable as a file name", name),
        ));
    }
    Ok(())
}

/// Makes a rename or unlink in `dir` durable.
fn sync_dir(dir: &Path) -> io::Result<()> {
    fs::File::open(dir)?.sync_all()
}

/// Writes `DIR/NAME.xml` (replacing an existing file of that name) atomically: a temporary file in
/// the same folder, written, fsynced and renamed, then the folder fsynced. The file has mode 0600,
/// like libvirt's. Fails with `InvalidInput` if the name is empty, `.`, `..`, or contains `/` or
/// NUL. Returns the path written.
pub fn write_atomically(dir: &Path, s: &DomainSnapshot) -> io::Result<PathBuf> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    check_name(&s.name)?;
    let target = dir.join(format!("{}.xml", s.name));
    let xml = to_xml(s);
    // The temporary name does not end in ".xml", so a concurrent load_dir never sees it.
    let tmp = loop {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let candidate = dir.join(format!(".snapfs-{}-{}.tmp", std::process::id(), n));
        match fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&candidate)
        {
            Ok(f) => break (candidate, f),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    };
    let (tmp_path, mut file) = tmp;
    let result = (|| {
        // The umask may have removed bits; make it exactly 0600.
        file.set_permissions(fs::Permissions::from_mode(0o600))?;
        file.write_all(xml.as_bytes())?;
        file.sync_all()?;
        drop(file);
        fs::rename(&tmp_path, &target)?;
        sync_dir(dir)
    })();
    if let Err(e) = result {
        let _ = fs::remove_file(&tmp_path);
        return Err(e);
    }
    Ok(target)
}

/// Removes `DIR/NAME.xml` (same name rules as [`write_atomically`]) and fsyncs the folder.
pub fn remove(dir: &Path, name: &str) -> io::Result<()> {
    check_name(name)?;
    fs::remove_file(dir.join(format!("{name}.xml")))?;
    sync_dir(dir)
}

// ---------------------------------------------------------------------------------------------
// The snapshot tree
// ---------------------------------------------------------------------------------------------

/// The parent/child relations of a set of snapshots (`<parent><name>`).
///
/// Snapshots whose parent is absent, unknown or themselves are roots. Names are unique: of several
/// snapshots with the same name the first one counts. Cycles in the parent links (which libvirt
/// never writes) do not make any method loop: [`SnapshotTree::render_tree`] shows every snapshot
/// once, starting a cycle at its smallest name.
#[derive(Debug, Clone, Default)]
pub struct SnapshotTree {
    parents: BTreeMap<String, Option<String>>,
    children: BTreeMap<String, Vec<String>>,
    roots: Vec<String>,
}

impl SnapshotTree {
    /// Builds the tree; roots and children are sorted by name, as virsh shows them.
    pub fn new(snapshots: &[DomainSnapshot]) -> Self {
        let mut parents: BTreeMap<String, Option<String>> = BTreeMap::new();
        for s in snapshots {
            parents
                .entry(s.name.clone())
                .or_insert_with(|| s.parent.clone());
        }
        let mut children: BTreeMap<String, Vec<String>> = BTreeMap::new();
        let mut roots = Vec::new();
        // BTreeMap iteration is by name, so every list comes out sorted.
        for (name, parent) in &parents {
            match parent {
                Some(p) if p != name && parents.contains_key(p) => {
                    children.entry(p.clone()).or_default().push(name.clone());
                }
                _ => roots.push(name.clone()),
            }
        }
        SnapshotTree {
            parents,
            children,
            roots,
        }
    }

    /// Number of snapshots.
    pub fn len(&self) -> usize {
        self.parents.len()
    }

    /// Whether there are no snapshots.
    pub fn is_empty(&self) -> bool {
        self.parents.is_empty()
    }

    /// Whether a snapshot of that name is in the tree.
    pub fn contains(&self, name: &str) -> bool {
        self.parents.contains_key(name)
    }

    /// The snapshots without a (known) parent, sorted by name.
    pub fn roots(&self) -> &[String] {
        &self.roots
    }

    /// The direct children of `name`, sorted by name (empty if none or unknown).
    pub fn children(&self, name: &str) -> &[String] {
        self.children.get(name).map_or(&[], Vec::as_slice)
    }

    /// The parent `name` declares (`<parent><name>`), whether or not that snapshot is known.
    pub fn parent(&self, name: &str) -> Option<&str> {
        self.parents.get(name)?.as_deref()
    }

    /// Number of snapshots below `name` (children, their children, ...), like virsh's
    /// "Descendants".
    pub fn descendants(&self, name: &str) -> usize {
        let mut seen: BTreeSet<&str> = BTreeSet::new();
        seen.insert(name);
        let mut todo: Vec<&str> = vec![name];
        let mut count = 0;
        while let Some(n) = todo.pop() {
            for c in self.children(n) {
                if seen.insert(c) {
                    count += 1;
                    todo.push(c);
                }
            }
        }
        count
    }

    /// The tree drawn like `virsh snapshot-list --tree` (trailing blanks of each line and the final
    /// empty line removed):
    ///
    /// ```text
    /// bare-os-install
    ///   |
    ///   +- pkg-updated
    ///   |   |
    ///   |   +- 1270477159
    ///   |
    ///   +- other
    /// ```
    ///
    /// Control characters in names are escaped so that every snapshot takes one line.
    pub fn render_tree(&self) -> String {
        // First a spanning forest (each snapshot drawn once, even with cycles), then the drawing.
        let mut seen: BTreeSet<&str> = BTreeSet::new();
        let mut forest: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
        let mut tops: Vec<&str> = Vec::new();
        let starts = self
            .roots
            .iter()
            .map(String::as_str)
            .chain(self.parents.keys().map(String::as_str));
        for start in starts {
            if !seen.insert(start) {
                continue;
            }
            tops.push(start);
            let mut todo = vec![start];
            while let Some(n) = todo.pop() {
                for c in self.children(n) {
                    if seen.insert(c) {
                        forest.entry(n).or_default().push(c);
                        todo.push(c);
                    }
                }
            }
        }
        for kids in forest.values_mut() {
            kids.sort_unstable();
        }

        // virsh's algorithm (vshTreePrint), made iterative.
        struct Frame<'a> {
            name: &'a str,
            last: bool,
            root: bool,
            indent: String,
        }
        let mut lines: Vec<String> = Vec::new();
        for top in tops {
            let mut stack = vec![Frame {
                name: top,
                last: true,
                root: true,
                indent: String::new(),
            }];
            while let Some(f) = stack.pop() {
                let prefix = if f.root { "" } else { "+- " };
                lines.push(format!("{}{}{}", f.indent, prefix, one_line(f.name)));
                let mut indent = f.indent;
                if !f.root {
                    indent.push_str(if f.last { "  " } else { "| " });
                }
                let kids = forest.get(f.name).map_or(&[][..], Vec::as_slice);
                if kids.is_empty() {
                    if f.last {
                        lines.push(indent);
                    }
                    continue;
                }
                lines.push(format!("{indent}  |"));
                let child_indent = format!("{indent}  ");
                for (i, kid) in kids.iter().enumerate().rev() {
                    stack.push(Frame {
                        name: kid,
                        last: i + 1 == kids.len(),
                        root: false,
                        indent: child_indent.clone(),
                    });
                }
            }
        }
        while lines.last().is_some_and(|l| l.trim_end().is_empty()) {
            lines.pop();
        }
        let mut out = String::new();
        for l in lines {
            out.push_str(l.trim_end());
            out.push('\n');
        }
        out
    }
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

/// Where the `<domain>` element of a snapshot file lies (its text is libvirt's domain definition
/// and may hold elements of the same names as the snapshot's own).
fn domain_span(text: &str) -> Option<(usize, usize)> {
    let start = ["<domain ", "<domain>", "<domain\n", "<domain\t"]
        .iter()
        .filter_map(|tag| text.find(tag))
        .min()?;
    let end = text[start..]
        .find("</domain>")
        .map_or(text.len(), |e| start + e + "</domain>".len());
    Some((start, end))
}

/// The last occurrence of `needle` outside the `<domain>` element.
fn find_outside_domain(text: &str, needle: &str) -> Option<usize> {
    let span = domain_span(text);
    text.match_indices(needle)
        .map(|(at, _)| at)
        .filter(|at| span.is_none_or(|(s, e)| *at < s || *at >= e))
        .last()
}

/// Replaces a snapshot file atomically with `text`, keeping its mode.
fn replace_file(path: &Path, text: &str) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = dir.join(format!(".snapfs-{}-edit.tmp", std::process::id()));
    let mode = std::fs::metadata(path)?.permissions().mode();
    std::fs::write(&tmp, text)?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode))?;
    std::fs::File::open(&tmp)?.sync_all()?;
    std::fs::rename(&tmp, path)
}

/// Marks the snapshot in `path` as libvirt's current one or not, changing only its top-level
/// `<active>` element and keeping every other byte of libvirt's file (its `<domain>` above all).
/// The file is replaced atomically and keeps its mode.
pub fn set_active_in_file(path: &Path, current: bool) -> io::Result<()> {
    let text = std::fs::read_to_string(path)?;
    let wanted = if current {
        "<active>1</active>"
    } else {
        "<active>0</active>"
    };
    let other = if current {
        "<active>0</active>"
    } else {
        "<active>1</active>"
    };
    let new_text = match find_outside_domain(&text, other) {
        Some(at) => format!("{}{wanted}{}", &text[..at], &text[at + other.len()..]),
        None if find_outside_domain(&text, wanted).is_some() => return Ok(()),
        None => match text.rfind("</domainsnapshot>") {
            Some(at) => format!("{}  {wanted}\n{}", &text[..at], &text[at..]),
            None => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("{}: no </domainsnapshot> element", path.display()),
                ));
            }
        },
    };
    replace_file(path, &new_text)
}

/// Gives the snapshot in `path` another parent (or none), changing only its top-level
/// `<parent>` element, as libvirt does to the children of a deleted snapshot.
pub fn set_parent_in_file(path: &Path, parent: Option<&str>) -> io::Result<()> {
    let text = std::fs::read_to_string(path)?;
    let element = parent.map(|p| {
        format!(
            "<parent>\n    <name>{}</name>\n  </parent>",
            quick_xml::escape::escape(p)
        )
    });
    let new_text = match find_outside_domain(&text, "<parent>") {
        Some(start) => {
            let end = text[start..]
                .find("</parent>")
                .map(|e| start + e + "</parent>".len())
                .ok_or_else(|| {
                    io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("{}: unterminated <parent>", path.display()),
                    )
                })?;
            format!(
                "{}{}{}",
                &text[..start],
                element.unwrap_or_default(),
                &text[end..]
            )
        }
        None => match (element, text.find("</name>")) {
            (None, _) => return Ok(()),
            (Some(el), Some(at)) => {
                let at = at + "</name>".len();
                format!("{}\n  {el}{}", &text[..at], &text[at..])
            }
            (Some(_), None) => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("{}: no <name> element", path.display()),
                ));
            }
        },
    };
    replace_file(path, &new_text)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

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
        let xml = "<domainsnapshot><name>a</name><creationdate>1270477159</creationdate></domainsnapshot>";
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
        assert!(matches!(err, LibvirtError::NotASnapshot { ref found, .. } if found == "domain"));
        assert_eq!(
            err.to_string(),
            "/snap/test.xml: root element is <domain>, not <domainsnapshot>"
        );
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
        s.description = Some(" \u{e9}\t<x>\r\n\u{1}end ".into());
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
  <active>0</active>
</domainsnapshot>
"
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
            name in "[^\\x00]*".prop_map(|s| s.trim().to_string()).prop_filter("empty", |s| !s.is_empty()),
            description in proptest::option::of("[^\\x00]*"),
            state in proptest::option::of("[a-z-]{1,12}"),
            parent in proptest::option::of("[^\\x00]*".prop_map(|s| s.trim().to_string()).prop_filter("empty", |s| !s.is_empty())),
            creation_time in proptest::option::of(any::<i64>()),
            current in any::<bool>(),
            memory in proptest::option::of(prop_oneof![Just("no"), Just("internal"), Just("external")]),
            disks in proptest::collection::vec(
                (
                    "[^\\x00]*",
                    prop_oneof![
                        Just(DiskSnapshotKind::No),
                        Just(DiskSnapshotKind::Internal),
                        Just(DiskSnapshotKind::External),
                        Just(DiskSnapshotKind::Manual),
                        Just(DiskSnapshotKind::Other(String::new())),
                        Just(DiskSnapshotKind::Other("foo".into())),
                    ],
                    proptest::option::of("[^\\x00]*"),
                    proptest::option::of("[^\\x00]*"),
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
                source_file: p(),
            };
            let xml = to_xml(&s);
            prop_assert_eq!(parse_snapshot_xml(&xml, &p()).unwrap(), s);
        }
    }
}
