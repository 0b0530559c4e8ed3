//! libvirt snapshot metadata: the `<domainsnapshot>` XML files libvirt keeps per domain in
//! `/var/lib/libvirt/qemu/snapshot/DOMAIN/NAME.xml` (see docs/design.md section 4).
//!
//! Reading is tolerant: elements may come in any order, unknown elements are ignored, and the
//! (large) `<domain>`, `<inactiveDomain>` and `<cookie>` elements are skipped (the `<domain>` kept
//! as text), so that the `<name>`, `<description>` and `<disk>` elements of the *domain* are never
//! mistaken for the snapshot's. Only a missing `<name>`, a root element other than `<domainsnapshot>`, or XML that is
//! not well formed makes a file fail, and [`load_dir`] reports such a file and goes on with the rest.
//!
//! Writing ([`to_xml`], [`write_atomically`]) produces libvirt's own layout, so that
//! `parse_snapshot_xml(&to_xml(s), p) == s` holds for every snapshot whose `source_file` is `p`
//! (strings must not contain NUL, which XML cannot carry; names and other one-word fields are
//! read trimmed, so they must not begin or end with white space).
//!
//! The parts: this module holds the model and its errors and reads a folder; `parse` reads one
//! file, `write` writes and edits files, `tree` relates snapshots by their parents, `domain` reads
//! a domain definition (its disks, and its text as a snapshot holds it).

mod client;
mod domain;
mod parse;
mod tree;
mod write;

pub use client::Daemon;
pub use domain::{DomainDefinition, DomainDisk, with_disk_source};
pub use parse::parse_snapshot_xml;
pub use tree::SnapshotTree;
pub use write::{
    check_writable, remove, set_active_in_file, set_disk_source_in_file, set_parent_in_file,
    to_xml, write_atomically,
};

use std::ffi::OsStr;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use crate::folder::{Folder, FolderError, OpenError};

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
    /// The top-level `<domain>` element (the domain's inactive definition when the snapshot was
    /// taken), verbatim from `<domain` to `</domain>`: what `virsh snapshot-revert` restores and
    /// `snapshot-create --redefine` requires.
    pub domain: Option<String>,
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
/// the file and what is wrong with it, and quotes nothing of the file: the file may be a way to
/// a secret (docs/security.md), and `control/status` shows these lines.
#[derive(Debug, thiserror::Error)]
pub enum LibvirtError {
    /// The file or folder could not be read.
    #[error("{}: cannot read: {}", one_line_path(.path), one_line(&.source.to_string()))]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The folder, or a folder on the way to it, is a symlink (or cannot be reached).
    #[error("libvirt folder: {}", one_line(&.source.to_string()))]
    Folder {
        path: PathBuf,
        #[source]
        source: FolderError,
    },
    /// A symlink named `*.xml`: never followed.
    #[error("{}: a symlink, not followed", one_line_path(.path))]
    Symlink { path: PathBuf },
    /// A FIFO, socket or device named `*.xml`: never read.
    #[error("{}: {kind}, not a regular file; not read", one_line_path(.path))]
    NotRegular { path: PathBuf, kind: &'static str },
    /// A file with more than one name: it may be a hard link to a file outside the folder.
    #[error("{}: has {links} hard links; only files with one name are read", one_line_path(.path))]
    Linked { path: PathBuf, links: u64 },
    /// The file is larger than [`MAX_XML_SIZE`].
    #[error("{}: file is larger than {limit} bytes, not read", one_line_path(.path))]
    TooLarge { path: PathBuf, limit: u64 },
    /// The file is not UTF-8 text.
    #[error("{}: not UTF-8 text (invalid byte at offset {offset})", one_line_path(.path))]
    NotUtf8 { path: PathBuf, offset: usize },
    /// The XML is not well formed; `message` is snapfs's own words, never the file's text.
    #[error("{}: malformed XML at line {line}, column {column} (byte {position}): {message}", one_line_path(.path))]
    Malformed {
        path: PathBuf,
        position: u64,
        line: u64,
        column: u64,
        message: String,
    },
    /// The root element is not `<domainsnapshot>`.
    #[error("{}: the root element (line {line}, column {column}) is not <domainsnapshot>", one_line_path(.path))]
    NotASnapshot {
        path: PathBuf,
        line: u64,
        column: u64,
    },
    /// `<domainsnapshot>` has no (or an empty) `<name>`.
    #[error("{}: <domainsnapshot> has no <name>", one_line_path(.path))]
    MissingName { path: PathBuf },
    /// A domain definition file whose root element is not `<domain>`.
    #[error("{}: not a libvirt domain definition (no <domain> root element)", one_line_path(.path))]
    NotADomain { path: PathBuf },
    /// `<domainsnapshot>` has more than one `<name>`.
    #[error("{}: <domainsnapshot> has a second <name> (ending at line {line}, column {column})", one_line_path(.path))]
    DuplicateName {
        path: PathBuf,
        line: u64,
        column: u64,
    },
}

impl LibvirtError {
    /// The file (or folder) the error is about.
    pub fn path(&self) -> &Path {
        match self {
            LibvirtError::Io { path, .. }
            | LibvirtError::Folder { path, .. }
            | LibvirtError::Symlink { path }
            | LibvirtError::NotRegular { path, .. }
            | LibvirtError::Linked { path, .. }
            | LibvirtError::TooLarge { path, .. }
            | LibvirtError::NotUtf8 { path, .. }
            | LibvirtError::Malformed { path, .. }
            | LibvirtError::NotASnapshot { path, .. }
            | LibvirtError::MissingName { path }
            | LibvirtError::NotADomain { path }
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

/// Opens the libvirt folder `dir` without following a symlink anywhere on its path (see
/// [`crate::folder`]): the folder is untrusted input, and a symlink swapped in for it or for a
/// folder above it would point snapfs's reads and writes somewhere else.
pub fn open_folder(dir: &Path) -> Result<Folder, LibvirtError> {
    Folder::open(dir).map_err(|source| match source {
        FolderError::Io { source, .. } => LibvirtError::Io {
            path: dir.to_path_buf(),
            source,
        },
        source => LibvirtError::Folder {
            path: dir.to_path_buf(),
            source,
        },
    })
}

/// Reads every `*.xml` file of `dir`, in file-name order. Returns the snapshots that parsed and one
/// error per file that did not (or a single error if the folder itself cannot be read). Never fails
/// as a whole. The folder is untrusted input: no symlink is followed (neither to it nor in it),
/// only regular files with one name are read (a FIFO, socket or device is reported, never
/// opened in a way that could block), files larger than [`MAX_XML_SIZE`] are reported and not
/// read, and no error quotes a file's content.
pub fn load_dir(dir: &Path) -> (Vec<DomainSnapshot>, Vec<LibvirtError>) {
    let mut snapshots = Vec::new();
    let mut errors = Vec::new();
    let folder = match open_folder(dir) {
        Ok(f) => f,
        Err(e) => {
            errors.push(e);
            return (snapshots, errors);
        }
    };
    let mut names = match folder.names() {
        Ok(n) => n,
        Err(source) => {
            errors.push(LibvirtError::Io {
                path: dir.to_path_buf(),
                source,
            });
            return (snapshots, errors);
        }
    };
    names.retain(|n| Path::new(n).extension() == Some(OsStr::new("xml")));
    names.sort();
    for name in names {
        let path = dir.join(&name);
        match read_capped(&folder, &name, &path) {
            Ok(Some((text, _))) => match parse_snapshot_xml(&text, &path) {
                Ok(s) => snapshots.push(s),
                Err(e) => errors.push(e),
            },
            // Sub-folders named *.xml are not snapshots; skipped silently.
            Ok(None) => {}
            Err(e) => errors.push(e),
        }
    }
    (snapshots, errors)
}

/// The text of `name` in `folder` and its `fstat`, refusing what is not a regular file with one
/// name or is larger than [`MAX_XML_SIZE`]; `None` for a folder.
fn read_capped(
    folder: &Folder,
    name: &OsStr,
    path: &Path,
) -> Result<Option<(String, libc::stat)>, LibvirtError> {
    let io_err = |source| LibvirtError::Io {
        path: path.to_path_buf(),
        source,
    };
    let (file, st) = match folder.open_regular(name) {
        Ok(opened) => opened,
        Err(OpenError::Symlink) => {
            return Err(LibvirtError::Symlink {
                path: path.to_path_buf(),
            });
        }
        Err(OpenError::NotRegular("a folder")) => return Ok(None),
        Err(OpenError::NotRegular(kind)) => {
            return Err(LibvirtError::NotRegular {
                path: path.to_path_buf(),
                kind,
            });
        }
        Err(OpenError::Io(e)) => return Err(io_err(e)),
    };
    if st.st_nlink != 1 {
        return Err(LibvirtError::Linked {
            path: path.to_path_buf(),
            links: st.st_nlink,
        });
    }
    let too_large = || LibvirtError::TooLarge {
        path: path.to_path_buf(),
        limit: MAX_XML_SIZE,
    };
    if st.st_size as u64 > MAX_XML_SIZE {
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
    String::from_utf8(bytes)
        .map(|text| Some((text, st)))
        .map_err(|e| LibvirtError::NotUtf8 {
            path: path.to_path_buf(),
            offset: e.utf8_error().valid_up_to(),
        })
}
