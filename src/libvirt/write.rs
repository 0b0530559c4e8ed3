//! Writing snapshot files in libvirt's own layout, and editing the fields snapfs changes in
//! files libvirt wrote.

use std::ffi::OsStr;
use std::fmt::Write as _;
use std::io;
use std::path::{Path, PathBuf};

use super::DomainSnapshot;

/// Whether XML 1.0 can hold `c` at all, raw or as a character reference (its `Char`
/// production). libvirt's files are XML 1.0 and libxml2 refuses a file with any other character.
fn is_xml10_char(c: char) -> bool {
    matches!(c, '\t' | '\n' | '\r' | '\u{20}'..='\u{D7FF}' | '\u{E000}'..='\u{FFFD}')
        || c >= '\u{10000}'
}

/// The first character of `s` that no XML 1.0 file can hold.
fn first_non_xml10_char(s: &str) -> Option<char> {
    s.chars().find(|&c| !is_xml10_char(c))
}

/// Escapes text for XML element content or a quoted attribute value: the five special characters,
/// and control characters as character references where a reader would not keep them raw (CR
/// anywhere, tab and LF in attribute values, which the reader's line-end and attribute
/// normalization would change). Characters XML 1.0 cannot hold are dropped, as libvirt's own
/// writer drops them; [`check_writable`] refuses such text.
fn xml_escape(s: &str, attribute: bool) -> String {
    let base = quick_xml::escape::escape(s);
    if !base.chars().any(|c| c.is_control() || !is_xml10_char(c)) {
        return base.into_owned();
    }
    let mut out = String::with_capacity(base.len() + 8);
    for c in base.chars() {
        match c {
            c if !is_xml10_char(c) => {}
            '\n' | '\t' if !attribute => out.push(c),
            c if c.is_control() => {
                let _ = write!(out, "&#x{:X};", c as u32);
            }
            c => out.push(c),
        }
    }
    out
}

/// Refuses (with `InvalidInput`, naming the field and the character) a snapshot whose text holds
/// a character XML 1.0 cannot hold (a C0 control other than tab, LF and CR, U+FFFE or U+FFFF):
/// libvirt could not read the file written. What [`to_xml`] writes of a snapshot that passes
/// reads back equal, but for the outer white space the reader trims (names, state).
pub fn check_writable(s: &DomainSnapshot) -> io::Result<()> {
    let check = |field: &str, text: Option<&str>| match text.and_then(first_non_xml10_char) {
        Some(c) => Err(non_xml10_error(&s.name, field, c)),
        None => Ok(()),
    };
    check("name", Some(&s.name))?;
    check("description", s.description.as_deref())?;
    check("state", s.state.as_deref())?;
    check("parent", s.parent.as_deref())?;
    check("memory", s.memory.as_deref())?;
    for d in &s.disks {
        check("disk name", Some(&d.name))?;
        check("disk snapshot kind", Some(d.snapshot.as_str()))?;
        check("disk driver type", d.driver_type.as_deref())?;
        let source = d.source_file.as_ref().map(|f| f.to_string_lossy());
        check("disk source file", source.as_deref())?;
    }
    Ok(())
}

fn non_xml10_error(snapshot: &str, field: &str, c: char) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidInput,
        format!(
            "snapshot {}: its {field} holds U+{:04X}, which libvirt's XML cannot hold",
            snapshot.escape_debug(),
            c as u32
        ),
    )
}

/// The snapshot in libvirt's `<domainsnapshot>` format, elements in libvirt's order (its
/// `virDomainSnapshotDefFormat`): the `<domain>` text verbatim after `<disks>`, two spaces in.
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
    if let Some(domain) = &s.domain {
        let _ = writeln!(out, "  {domain}");
    }
    let _ = writeln!(out, "  <active>{}</active>", u8::from(s.current));
    out.push_str("</domainsnapshot>\n");
    out
}

/// The comment libvirt puts at the top of every snapshot file it writes (`virXMLSaveFile` with
/// the command `snapshot-edit`).
pub const LIBVIRT_HEADER: &str = "<!--\nWARNING: THIS IS AN AUTO-GENERATED FILE. CHANGES TO IT ARE LIKELY TO BE\n\
OVERWRITTEN AND LOST. Changes to this xml configuration should be made using:\n  \
virsh snapshot-edit\nor other application using the libvirt API.\n-->\n\n";

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

/// Writes `DIR/NAME.xml` (replacing an existing file of that name) atomically: a new file under a
/// random name in the same folder, created exclusively and never through a symlink, given mode
/// 0600 (like libvirt's) on its descriptor, written, fsynced and renamed, then the folder
/// fsynced (see [`crate::folder`]). The folder is reached without following any symlink. Fails
/// with `InvalidInput` if the name is empty, `.`, `..`, or contains `/` or NUL, or if any text
/// holds a character XML 1.0 cannot hold. Returns the path written.
pub fn write_atomically(dir: &Path, s: &DomainSnapshot) -> io::Result<PathBuf> {
    check_name(&s.name)?;
    check_writable(s)?;
    let name = format!("{}.xml", s.name);
    // libvirt makes a domain's snapshot folder with its first snapshot; so does snapfs (mkdir
    // does not follow a symlink in the last component; the open below checks the whole path).
    if let Err(e) = std::fs::create_dir(dir)
        && e.kind() != io::ErrorKind::AlreadyExists
    {
        return Err(e);
    }
    let folder = super::open_folder(dir).map_err(io::Error::other)?;
    let text = format!("{LIBVIRT_HEADER}{}", to_xml(s));
    folder.replace(OsStr::new(&name), text.as_bytes(), 0o600, None)?;
    Ok(dir.join(name))
}

/// Removes `DIR/NAME.xml` (same name rules as [`write_atomically`]; a symlink of that name is
/// removed, not followed) and fsyncs the folder.
pub fn remove(dir: &Path, name: &str) -> io::Result<()> {
    check_name(name)?;
    let folder = super::open_folder(dir).map_err(io::Error::other)?;
    folder.remove(OsStr::new(&format!("{name}.xml")))?;
    folder.sync()
}

/// Rewrites the snapshot file `path` with `edit` of its text (`None`: nothing to change),
/// atomically, keeping its mode and (where snapfs may) its owner. The file is read as
/// [`super::load_dir`] reads (no symlink, a regular file with one name) and replaced as
/// [`write_atomically`] writes, so a symlink put in its place is never followed.
fn edit_file(path: &Path, edit: impl FnOnce(&str) -> io::Result<Option<String>>) -> io::Result<()> {
    let (dir, name) = match (path.parent(), path.file_name()) {
        (Some(d), Some(n)) => (d, n),
        _ => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{} is not a file path", path.display()),
            ));
        }
    };
    let folder = super::open_folder(dir).map_err(io::Error::other)?;
    let (text, st) = super::read_capped(&folder, name, path)
        .map_err(io::Error::other)?
        .ok_or_else(|| io::Error::other(format!("{} is a folder", path.display())))?;
    match edit(&text)? {
        Some(new_text) => folder.replace(
            name,
            new_text.as_bytes(),
            st.st_mode & 0o7777,
            Some((st.st_uid, st.st_gid)),
        ),
        None => Ok(()),
    }
}

/// Points the disk of the domain definition file `path` whose source is `old` at `new`, changing
/// only that attribute (the file replaced atomically, keeping its mode and owner). Fails with
/// `NotFound` when no disk has `old` as its source.
pub fn set_disk_source_in_file(path: &Path, old: &Path, new: &Path) -> io::Result<()> {
    edit_file(path, |text| {
        match super::domain::with_disk_source(text, path, old, new).map_err(io::Error::other)? {
            Some(new_text) => Ok(Some(new_text)),
            None => Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!(
                    "{}: no disk has {} as its source",
                    path.display(),
                    old.display()
                ),
            )),
        }
    })
}

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

/// Marks the snapshot in `path` as libvirt's current one or not, changing only its top-level
/// `<active>` element and keeping every other byte of libvirt's file (its `<domain>` above all).
/// The file is replaced atomically and keeps its mode.
pub fn set_active_in_file(path: &Path, current: bool) -> io::Result<()> {
    edit_file(path, |text| set_active_in_text(text, path, current))
}

fn set_active_in_text(text: &str, path: &Path, current: bool) -> io::Result<Option<String>> {
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
    let new_text = match find_outside_domain(text, other) {
        Some(at) => format!("{}{wanted}{}", &text[..at], &text[at + other.len()..]),
        None if find_outside_domain(text, wanted).is_some() => return Ok(None),
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
    Ok(Some(new_text))
}

/// Gives the snapshot in `path` another parent (or none), changing only its top-level
/// `<parent>` element, as libvirt does to the children of a deleted snapshot.
pub fn set_parent_in_file(path: &Path, parent: Option<&str>) -> io::Result<()> {
    if let Some(c) = parent.and_then(first_non_xml10_char) {
        let child = path.file_stem().unwrap_or_default().to_string_lossy();
        return Err(non_xml10_error(&child, "parent", c));
    }
    edit_file(path, |text| set_parent_in_text(text, path, parent))
}

fn set_parent_in_text(text: &str, path: &Path, parent: Option<&str>) -> io::Result<Option<String>> {
    let element = parent.map(|p| {
        format!(
            "<parent>\n    <name>{}</name>\n  </parent>",
            xml_escape(p, false)
        )
    });
    let new_text = match find_outside_domain(text, "<parent>") {
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
            (None, _) => return Ok(None),
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
    Ok(Some(new_text))
}
