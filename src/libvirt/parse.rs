//! Reading one `<domainsnapshot>` file.

use std::path::{Path, PathBuf};

use quick_xml::events::{BytesRef, BytesStart, Event};
use quick_xml::reader::Reader;

use super::{DiskSnapshotKind, DomainSnapshot, LibvirtError, SnapshotDisk, one_line_path};

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
                // libvirt writes XML 1.0 (libxml2): only CR and CR LF are line ends. XML 1.1's
                // rules would also turn U+0085 and U+2028 in a name into LF.
                let s = t
                    .xml10_content()
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
                    .xml10_content()
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
