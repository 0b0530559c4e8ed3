//! Reading one `<domainsnapshot>` file.

use std::path::{Path, PathBuf};

use quick_xml::events::{BytesRef, BytesStart, Event};
use quick_xml::reader::Reader;

use super::{DiskSnapshotKind, DomainSnapshot, LibvirtError, SnapshotDisk};

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
    /// The top-level `<domain>`: kept as text, everything in it ignored.
    Domain,
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
    /// Byte offset of the first top-level `<domain` while it is open, then its text.
    domain_start: Option<usize>,
    domain: Option<String>,
}

/// Line and column (both from 1, the column in characters) of byte `position` of `text`.
fn line_and_column(text: &str, position: u64) -> (u64, u64) {
    let mut end = (position as usize).min(text.len());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    let before = &text[..end];
    let line = before.matches('\n').count() as u64 + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    (line, before[line_start..].chars().count() as u64 + 1)
}

/// A [`LibvirtError::Malformed`] at byte `position` of `text`. `message` says what is wrong in
/// words of its own: it never holds text of the file (whose content may be someone else's
/// secret; see docs/security.md).
pub(super) fn malformed_at(
    text: &str,
    source: &Path,
    position: u64,
    message: impl Into<String>,
) -> LibvirtError {
    let (line, column) = line_and_column(text, position);
    LibvirtError::Malformed {
        path: source.to_path_buf(),
        position,
        line,
        column,
        message: message.into(),
    }
}

/// What is wrong, in words that quote nothing of the document (quick-xml's own messages name
/// elements and entities).
fn describe(e: &quick_xml::Error) -> String {
    use quick_xml::Error as X;
    use quick_xml::errors::IllFormedError as I;
    use quick_xml::escape::EscapeError as E;
    match e {
        // These messages are fixed texts.
        X::Syntax(s) => s.to_string(),
        X::IllFormed(I::MissingDeclVersion(_)) => "an XML declaration without a version".into(),
        X::IllFormed(I::MissingDoctypeName) => "a DOCTYPE without a name".into(),
        X::IllFormed(I::MissingEndTag(_)) => "an element that is not closed".into(),
        X::IllFormed(I::UnmatchedEndTag(_)) => "an end tag without a start tag".into(),
        X::IllFormed(I::MismatchedEndTag { .. }) => {
            "an end tag that does not match its start tag".into()
        }
        X::IllFormed(I::DoubleHyphenInComment) => "`--` inside a comment".into(),
        X::IllFormed(_) => "XML that is not well formed".into(),
        X::InvalidAttr(_) => "a malformed attribute".into(),
        X::Encoding(_) => "text that is not valid in its encoding".into(),
        X::Escape(E::UnrecognizedEntity(..)) => "an unknown entity reference".into(),
        X::Escape(E::UnterminatedEntity(_)) => "an unterminated entity reference".into(),
        X::Escape(E::InvalidCharRef(_)) => "an invalid character reference".into(),
        X::Namespace(_) => "a namespace error".into(),
        X::Io(_) => "a read error".into(),
    }
}

/// Parses one `<domainsnapshot>` document; `source` is the file it came from (used in errors and
/// stored in [`DomainSnapshot::source_file`]). Errors name the file and the line, column and
/// byte, and never quote the document.
pub fn parse_snapshot_xml(text: &str, source: &Path) -> Result<DomainSnapshot, LibvirtError> {
    let mut reader = Reader::from_str(text);
    let malformed = |reader: &Reader<&[u8]>, message: &str| {
        malformed_at(
            text,
            source,
            reader.error_position().max(reader.buffer_position()),
            message,
        )
    };

    let mut stack: Vec<Ctx> = Vec::new();
    let mut seen_root = false;
    let mut done = false;
    let mut part = Partial::default();
    // Text of the field being read (the innermost `Ctx::Field`/`Ctx::ParentName`), if any.
    let mut text_buf: Option<String> = None;

    loop {
        let before = reader.buffer_position() as usize;
        let event = match reader.read_event() {
            Ok(ev) => ev,
            Err(e) => {
                return Err(malformed_at(
                    text,
                    source,
                    reader.error_position(),
                    describe(&e),
                ));
            }
        };
        match event {
            Event::Start(_) | Event::Empty(_) if done => {
                return Err(malformed(
                    &reader,
                    "a second root element after </domainsnapshot>",
                ));
            }
            Event::Start(e) => {
                let ctx =
                    open_element(&e, &stack, &mut seen_root, &mut part, &reader, text, source)?;
                if matches!(ctx, Ctx::Field(_) | Ctx::ParentName) {
                    text_buf = Some(String::new());
                }
                if ctx == Ctx::Domain {
                    part.domain_start = Some(before);
                }
                stack.push(ctx);
            }
            Event::Empty(e) => {
                let ctx =
                    open_element(&e, &stack, &mut seen_root, &mut part, &reader, text, source)?;
                // An empty element is opened and closed at once.
                if matches!(ctx, Ctx::Field(_) | Ctx::ParentName) {
                    close_text(ctx, String::new(), &mut part, &reader, text, source)?;
                }
                if ctx == Ctx::Root {
                    done = true;
                }
                if ctx == Ctx::Domain {
                    let end = reader.buffer_position() as usize;
                    part.domain = text.get(before..end).map(str::to_owned);
                }
            }
            Event::End(_) => {
                let Some(ctx) = stack.pop() else {
                    return Err(malformed(&reader, "a closing tag without an opening tag"));
                };
                if matches!(ctx, Ctx::Field(_) | Ctx::ParentName) {
                    let field_text = text_buf.take().unwrap_or_default();
                    close_text(ctx, field_text, &mut part, &reader, text, source)?;
                }
                if ctx == Ctx::Domain
                    && let Some(start) = part.domain_start.take()
                {
                    let end = reader.buffer_position() as usize;
                    part.domain = text.get(start..end).map(str::to_owned);
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
                    .map_err(|e| malformed(&reader, &describe(&e.into())))?;
                if stack.is_empty() {
                    if !s.trim().is_empty() {
                        return Err(malformed(&reader, "text outside the root element"));
                    }
                } else if collecting(&stack) {
                    if let Some(buf) = text_buf.as_mut() {
                        buf.push_str(&s);
                    }
                }
            }
            Event::CData(t) => {
                if stack.is_empty() {
                    return Err(malformed(&reader, "CDATA outside the root element"));
                }
                let s = t
                    .xml10_content()
                    .map_err(|e| malformed(&reader, &describe(&e.into())))?;
                if collecting(&stack) {
                    if let Some(buf) = text_buf.as_mut() {
                        buf.push_str(&s);
                    }
                }
            }
            Event::GeneralRef(r) => {
                if stack.is_empty() {
                    return Err(malformed(&reader, "a reference outside the root element"));
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
        let open = format!("end of file inside an element ({} not closed)", stack.len());
        return Err(malformed(&reader, &open));
    }
    if !seen_root {
        return Err(malformed(&reader, "no root element"));
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
        domain: part.domain,
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
    text: &str,
    source: &Path,
) -> Result<Ctx, LibvirtError> {
    let qname = e.name();
    let name = qname.as_ref();
    let Some(&parent) = stack.last() else {
        // A root element.
        if name != b"domainsnapshot" {
            let (line, column) = line_and_column(text, reader.buffer_position());
            return Err(LibvirtError::NotASnapshot {
                path: source.to_path_buf(),
                line,
                column,
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
        // The first one only: a second is skipped like anything unknown.
        (Ctx::Root, b"domain") if part.domain.is_none() && part.domain_start.is_none() => {
            Ctx::Domain
        }
        (Ctx::Root, b"memory") => {
            if let Some(v) = attribute(e, b"snapshot", reader, text, source)? {
                let v = v.trim();
                part.memory = (!v.is_empty()).then(|| v.to_string());
            }
            Ctx::Skip
        }
        (Ctx::Parent, b"name") => Ctx::ParentName,
        (Ctx::Disks, b"disk") => {
            let name = attribute(e, b"name", reader, text, source)?.unwrap_or_default();
            let kind = attribute(e, b"snapshot", reader, text, source)?.unwrap_or_default();
            part.disks.push(SnapshotDisk {
                name,
                snapshot: DiskSnapshotKind::parse(&kind),
                source_file: None,
                driver_type: None,
            });
            Ctx::Disk
        }
        (Ctx::Disk, b"source") => {
            let file = match attribute(e, b"file", reader, text, source)? {
                Some(f) => Some(f),
                None => attribute(e, b"dev", reader, text, source)?,
            };
            if let (Some(f), Some(disk)) = (file, part.disks.last_mut()) {
                disk.source_file = Some(PathBuf::from(f));
            }
            Ctx::Skip
        }
        (Ctx::Disk, b"driver") => {
            if let (Some(t), Some(disk)) = (
                attribute(e, b"type", reader, text, source)?,
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
    text: &str,
    source: &Path,
) -> Result<Option<String>, LibvirtError> {
    let malformed = |message: String| malformed_at(text, source, reader.buffer_position(), message);
    let mut found = None;
    // All attributes are looked at, so that malformed ones (e.g. duplicates) are noticed.
    for attr in e.attributes() {
        let attr = attr.map_err(|_| malformed("a malformed attribute".into()))?;
        if found.is_none() && attr.key.as_ref() == key {
            let value = attr
                .decode_and_unescape_value(reader.decoder())
                .map_err(|err| malformed(format!("an attribute value with {}", describe(&err))))?;
            found = Some(value.into_owned());
        }
    }
    Ok(found)
}

/// Resolves `&name;` / `&#N;` to its text; the error says what is wrong without quoting it.
fn resolve_reference(r: &BytesRef<'_>) -> Result<String, &'static str> {
    match r.resolve_char_ref() {
        Ok(Some(c)) => return Ok(c.to_string()),
        Ok(None) => {}
        Err(_) => return Err("an invalid character reference"),
    }
    let name = r
        .decode()
        .map_err(|_| "a reference that is not valid text")?;
    match quick_xml::escape::resolve_xml_entity(&name) {
        Some(s) => Ok(s.to_string()),
        None => Err("an unknown entity reference"),
    }
}

/// Stores the text of a closed field element.
fn close_text(
    ctx: Ctx,
    text: String,
    part: &mut Partial,
    reader: &Reader<&[u8]>,
    document: &str,
    source: &Path,
) -> Result<(), LibvirtError> {
    let trimmed = || {
        let t = text.trim();
        (!t.is_empty()).then(|| t.to_string())
    };
    match ctx {
        Ctx::Field(Field::Name) => {
            let new = text.trim().to_string();
            if part.name.is_some() {
                let (line, column) = line_and_column(document, reader.buffer_position());
                return Err(LibvirtError::DuplicateName {
                    path: source.to_path_buf(),
                    line,
                    column,
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
        "{}: a creation time that is not a number of seconds or a date, ignored",
        super::one_line_path(source)
    );
    None
}
