//! Error types of the engine. Every error names the field or structure at fault and the value found,
//! so that the one line a user sees tells what is wrong.
//!
//! The engine's errors say what went wrong with which file; what a caller of the file system
//! sees (an errno) is the FUSE adapter's business (`crate::fs::errno`). Nothing here imports
//! from outside the engine.

use std::path::PathBuf;

use super::bitmap::BitmapError;
use super::header::HeaderError;
use super::lock::LockError;
use super::refcount::RefcountError;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The image header or its extensions are invalid or unsupported.
    #[error("{path}: {source}")]
    Header {
        path: PathBuf,
        #[source]
        source: HeaderError,
    },

    /// Metadata deeper in the image (L1/L2 tables, snapshot table, compressed data) is inconsistent.
    #[error("{path}: {source}")]
    Metadata {
        path: PathBuf,
        #[source]
        source: MetadataError,
    },

    /// The persistent bitmaps (bitmap directory, tables or data) are invalid, or could not be
    /// stored.
    #[error("{path}: {source}")]
    Bitmap {
        path: PathBuf,
        #[source]
        source: BitmapError,
    },

    /// The backing chain cannot be assembled.
    #[error("{0}")]
    Chain(#[from] ChainError),

    /// Refcount metadata could not be updated.
    #[error("{path}: {source}")]
    Refcount {
        path: PathBuf,
        #[source]
        source: RefcountError,
    },

    /// A write would have overwritten metadata: the image is marked corrupt, as QEMU does.
    #[error(
        "{path}: {what} at {offset:#x} would overwrite {metadata}; the image is now marked corrupt (run `qemu-img check -r all`)"
    )]
    Overlap {
        path: PathBuf,
        what: &'static str,
        offset: u64,
        metadata: String,
    },

    /// The image is marked corrupt: nothing more is written to it.
    #[error(
        "{path}: the image is marked corrupt; writes are refused (run `qemu-img check -r all`)"
    )]
    MarkedCorrupt { path: PathBuf },

    /// The image can only be opened read-only.
    #[error("{path}: {reason}")]
    NeedsReadOnly { path: PathBuf, reason: String },

    /// A request that the image cannot carry out (EINVAL).
    #[error("{path}: {reason}")]
    Invalid { path: PathBuf, reason: String },

    /// A write past the end of the disk (ENOSPC, as a block device answers).
    #[error("write at {offset:#x} is past the end of the disk ({size} bytes)")]
    PastEnd { offset: u64, size: u64 },

    /// The image stopped being the top of the chain while a write was on its way (the caller
    /// retries on the new top).
    #[error("{path}: no longer the active image")]
    Retired { path: PathBuf },

    /// The mount or image is read-only.
    #[error("{path}: read-only")]
    ReadOnly { path: PathBuf },

    /// Another process has the image open in a way that conflicts.
    #[error(transparent)]
    Locked(#[from] LockError),

    /// A chain operation stopped part-way (a commit that ran out of space): `state` says what
    /// each layer holds now and what the user can do.
    #[error("{source}. {state}")]
    Stopped {
        #[source]
        source: Box<Error>,
        state: String,
    },

    /// An operating-system error, with what was being done.
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

impl Error {
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }
}

/// Inconsistent metadata found while mapping or reading.
#[derive(Debug, thiserror::Error)]
pub enum MetadataError {
    #[error("{table} entry {index}: offset {offset:#x} is not aligned to the cluster size")]
    Unaligned {
        table: &'static str,
        index: u64,
        offset: u64,
    },
    #[error("{table} entry {index}: offset {offset:#x} points into the image header")]
    PointsAtHeader {
        table: &'static str,
        index: u64,
        offset: u64,
    },
    #[error("{what} at {offset:#x} (+{len} bytes) lies past the maximum host offset")]
    OffsetTooLarge {
        what: &'static str,
        offset: u64,
        len: u64,
    },
    #[error(
        "L2 entry for guest offset {guest:#x}: subcluster {subcluster} is marked both allocated and zero (bitmap {bitmap:#018x})"
    )]
    SubclusterAllocatedAndZero {
        guest: u64,
        subcluster: u32,
        bitmap: u64,
    },
    #[error(
        "L2 entry for guest offset {guest:#x}: subclusters are marked allocated (bitmap {bitmap:#018x}) but the cluster has no host offset"
    )]
    SubclusterWithoutCluster { guest: u64, bitmap: u64 },
    #[error(
        "L2 entry for guest offset {guest:#x}: compressed cluster has a non-zero subcluster bitmap {bitmap:#018x}"
    )]
    CompressedWithBitmap { guest: u64, bitmap: u64 },
    #[error("compressed cluster at host offset {offset:#x} ({len} bytes): {reason}")]
    Compressed {
        offset: u64,
        len: u64,
        reason: String,
    },
    #[error("cannot read {what} at {offset:#x}: {reason}")]
    Read {
        what: &'static str,
        offset: u64,
        reason: String,
    },
    #[error(
        "{table} entries {first} and {second} both point at the L2 table at {offset:#x} (every L1 entry needs its own)"
    )]
    SharedL2 {
        table: &'static str,
        first: u64,
        second: u64,
        offset: u64,
    },
    #[error("snapshot table: {0}")]
    SnapshotTable(String),
    #[error("snapshot {id:?}: L1 table: {reason}")]
    SnapshotL1 { id: String, reason: String },
}

/// Errors assembling a backing chain.
#[derive(Debug, thiserror::Error)]
pub enum ChainError {
    #[error("{path}: the backing chain loops back to {again}, which would be an infinite loop")]
    Loop { path: PathBuf, again: PathBuf },
    #[error("{path}: backing chain is deeper than {max} layers")]
    TooDeep { path: PathBuf, max: usize },
    #[error("{path}: backing file {backing:?} cannot be opened: {source}")]
    BackingMissing {
        path: PathBuf,
        backing: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: backing file {backing:?} is not a regular file")]
    BackingNotRegular { path: PathBuf, backing: String },
    #[error("{path}: backing format {format:?} is not supported (only qcow2 and raw)")]
    UnsupportedBackingFormat { path: PathBuf, format: String },
    #[error(
        "{path}: is not in qcow2 format (snapfs mounts qcow2 images only; raw files can only be backing files)"
    )]
    NotQcow2 { path: PathBuf },
    #[error("{path}: is not a regular file or block device")]
    NotAFile { path: PathBuf },
}
