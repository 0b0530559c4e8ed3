//! The domain definition a snapshot records: libvirt keeps it in `/etc/libvirt/qemu/DOMAIN.xml`
//! (the inactive definition) and copies it, two spaces in, into every snapshot file as the
//! `<domain>` element, which `virsh snapshot-revert` restores and `snapshot-create --redefine`
//! requires. Its `<devices><disk>` entries say which guest disk (`<target dev>`) a file is.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};

use quick_xml::events::{BytesStart, Event};
use quick_xml::reader::Reader;

use super::{LibvirtError, parse::malformed_at};

/// One `<devices><disk>` of a domain definition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DomainDisk {
    /// `<target dev=...>`: the guest disk's name (`vda`, `sdb`).
    pub target: String,
    /// `device=`: `disk`, `cdrom`, `floppy`, `lun`.
    pub device: String,
    /// `<source file=...>` (or `dev=` for a block device); none for an empty drive.
    pub source: Option<PathBuf>,
    /// `<readonly/>`.
    pub readonly: bool,
    /// Where the `<source>` tag lies in the text scanned (bytes, from `<` to `>`).
    pub source_tag: Option<(usize, usize)>,
}

impl DomainDisk {
    /// Whether libvirt leaves the disk out of every snapshot (`snapshot='no'`): an empty drive, or
    /// a read-only one (a CD-ROM above all), which nothing writes.
    pub fn never_snapshotted(&self) -> bool {
        self.source.is_none() || self.readonly || self.device == "cdrom" || self.device == "floppy"
    }
}

/// A domain's inactive definition as a snapshot holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DomainDefinition {
    /// The `<domain>` element, indented as in a snapshot file (every line after the first two
    /// spaces further in than in the domain's own file).
    pub text: String,
    /// Its disks, in order (libvirt matches a snapshot's `<disk>` entries to them by position).
    pub disks: Vec<DomainDisk>,
}

impl DomainDefinition {
    /// The definition a snapshot's `<domain>` text holds (already indented as in a snapshot).
    pub fn from_snapshot_text(text: &str, source: &Path) -> Result<Self, LibvirtError> {
        let (_, disks) = scan(text, source)?;
        Ok(DomainDefinition {
            text: text.to_owned(),
            disks,
        })
    }

    /// The definition in a domain file such as `/etc/libvirt/qemu/DOMAIN.xml`, read as untrusted
    /// input (no symlink followed, a regular file with one name, at most
    /// [`super::MAX_XML_SIZE`] bytes).
    pub fn load_file(path: &Path) -> Result<Self, LibvirtError> {
        let (dir, name) = match (path.parent(), path.file_name()) {
            (Some(d), Some(n)) => (d, n),
            _ => {
                return Err(LibvirtError::NotADomain {
                    path: path.to_owned(),
                });
            }
        };
        let folder = super::open_folder(dir)?;
        let (text, _) = super::read_capped(&folder, OsStr::new(name), path)?.ok_or_else(|| {
            LibvirtError::NotADomain {
                path: path.to_owned(),
            }
        })?;
        Self::from_domain_text(&text, path)
    }

    /// The definition in `text`, a domain's XML as its file holds it or as libvirtd gives it
    /// (`virDomainGetXMLDesc`); `source` names where it came from in errors.
    pub fn from_domain_text(text: &str, source: &Path) -> Result<Self, LibvirtError> {
        let ((start, end), disks) = scan(text, source)?;
        let element = &text[start..end];
        Ok(DomainDefinition {
            text: element.replace('\n', "\n  "),
            disks,
        })
    }
}

/// `text` (a domain definition file) with the `file=` of the `<source>` of the disk whose source
/// is `old` set to `new`, every other byte kept, as `virsh snapshot-create-as --disk-only` moves
/// a shut-off domain's disk to the new overlay. `None` when no disk has `old` as its source file.
pub fn with_disk_source(
    text: &str,
    source: &Path,
    old: &Path,
    new: &Path,
) -> Result<Option<String>, LibvirtError> {
    let (_, disks) = scan(text, source)?;
    let canonical = |p: &Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_owned());
    let want = canonical(old);
    let Some((start, end)) = disks
        .iter()
        .filter(|d| d.source.as_deref().is_some_and(|s| canonical(s) == want))
        .find_map(|d| d.source_tag)
    else {
        return Ok(None);
    };
    let tag = &text[start..end];
    let Some((value_start, value_end)) = attribute_value_span(tag, "file") else {
        return Ok(None);
    };
    let escaped = quick_xml::escape::escape(new.to_string_lossy().as_ref()).into_owned();
    Ok(Some(format!(
        "{}{escaped}{}",
        &text[..start + value_start],
        &text[start + value_end..]
    )))
}

/// Where the value of attribute `name` lies in the start tag `tag` (bytes, between the quotes).
fn attribute_value_span(tag: &str, name: &str) -> Option<(usize, usize)> {
    let bytes = tag.as_bytes();
    let mut from = 0;
    while let Some(found) = tag[from..].find(name) {
        let at = from + found;
        from = at + name.len();
        // A whole attribute name: white space before it.
        if at == 0 || !bytes[at - 1].is_ascii_whitespace() {
            continue;
        }
        let mut i = at + name.len();
        while i < bytes.len() && bytes[i].is_ascii_whitespace() {
            i += 1;
        }
        if bytes.get(i) != Some(&b'=') {
            continue;
        }
        i += 1;
        while i < bytes.len() && bytes[i].is_ascii_whitespace() {
            i += 1;
        }
        let quote = *bytes.get(i)?;
        if quote != b'\'' && quote != b'"' {
            return None;
        }
        let value_start = i + 1;
        let value_end = value_start + tag[value_start..].find(quote as char)?;
        return Some((value_start, value_end));
    }
    None
}

/// Where the root `<domain>` element lies in `text` (bytes), and its disks. Fails on XML that is
/// not well formed or whose root is not `<domain>`.
fn scan(text: &str, source: &Path) -> Result<((usize, usize), Vec<DomainDisk>), LibvirtError> {
    let mut reader = Reader::from_str(text);
    let mut depth = 0usize;
    // The open elements below the root that matter: devices (1), disk (2).
    let mut path: Vec<Vec<u8>> = Vec::new();
    let mut start = None;
    let mut disks: Vec<DomainDisk> = Vec::new();
    loop {
        let before = reader.buffer_position() as usize;
        let event = reader.read_event().map_err(|_| {
            malformed_at(
                text,
                source,
                reader.error_position(),
                "XML that is not well formed",
            )
        })?;
        let (e, empty) = match event {
            Event::Start(e) => (e, false),
            Event::Empty(e) => (e, true),
            Event::End(_) => {
                depth = depth.saturating_sub(1);
                path.pop();
                if depth == 0 {
                    let end = reader.buffer_position() as usize;
                    return Ok(((start.unwrap_or(before), end), disks));
                }
                continue;
            }
            Event::Eof => {
                return Err(LibvirtError::NotADomain {
                    path: source.to_owned(),
                });
            }
            _ => continue,
        };
        let name = e.name().as_ref().to_vec();
        if depth == 0 {
            if name != b"domain" {
                return Err(LibvirtError::NotADomain {
                    path: source.to_owned(),
                });
            }
            start = Some(before);
            if empty {
                return Ok(((before, reader.buffer_position() as usize), disks));
            }
        } else {
            let at: Vec<&[u8]> = path.iter().map(Vec::as_slice).collect();
            match (at.as_slice(), name.as_slice()) {
                ([b"devices"], b"disk") => disks.push(DomainDisk {
                    target: String::new(),
                    device: attr(&e, b"device").unwrap_or_else(|| "disk".into()),
                    source: None,
                    readonly: false,
                    source_tag: None,
                }),
                ([b"devices", b"disk"], b"source") => {
                    if let Some(d) = disks.last_mut() {
                        d.source = attr(&e, b"file")
                            .or_else(|| attr(&e, b"dev"))
                            .map(Into::into);
                        d.source_tag = Some((before, reader.buffer_position() as usize));
                    }
                }
                ([b"devices", b"disk"], b"target") => {
                    if let Some(d) = disks.last_mut() {
                        d.target = attr(&e, b"dev").unwrap_or_default();
                    }
                }
                ([b"devices", b"disk"], b"readonly") => {
                    if let Some(d) = disks.last_mut() {
                        d.readonly = true;
                    }
                }
                _ => {}
            }
        }
        if !empty {
            depth += 1;
            if depth > 1 {
                path.push(name);
            }
        }
    }
}

/// The unescaped value of attribute `key`, if present and well formed.
fn attr(e: &BytesStart<'_>, key: &[u8]) -> Option<String> {
    e.attributes()
        .flatten()
        .find(|a| a.key.as_ref() == key)
        .and_then(|a| a.unescape_value().ok().map(|v| v.into_owned()))
}
