//! The qcow2 header (cluster 0): fixed fields, v3 additions, header extensions and the backing file name.
//!
//! All fields are big-endian. Version 2 headers are 72 bytes; version 3 headers are `header_length`
//! bytes (at least 104). Header extensions follow the header, each `u32 magic, u32 len, data`, padded
//! to 8 bytes, up to an end marker (magic 0) — they must end before the backing file name and inside
//! the first cluster.
//!
//! [`Header::parse`] performs the checks of QEMU 10's `qcow2_do_open` and `qcow2_read_extensions`, in
//! the same order, so that snapfs refuses exactly what QEMU refuses (and a little more: encrypted images
//! and external data files, which snapfs does not support). [`Header::encode`] writes cluster 0 back
//! the way QEMU's `qcow2_update_header` does.
//!
//! Like QEMU, bytes past the end of the file read as zeros, except for the backing file name, which
//! must lie inside the file.
//!
//! The parts: this module holds the header's fields and the format's constants; `fields` where
//! each fixed field lies (the only place that knows header byte offsets) and the field groups a
//! running image rewrites; `parse` reads and checks cluster 0, `extensions` the extension area,
//! `encode` writes cluster 0 back, and `error` says what was refused.

mod encode;
mod error;
mod extensions;
mod fields;
mod parse;

pub use error::HeaderError;
pub use fields::{FieldWrite, HeaderField};

/// Feature bits of the `incompatible_features` field.
pub mod incompatible {
    pub const DIRTY: u64 = 1 << 0;
    pub const CORRUPT: u64 = 1 << 1;
    pub const EXTERNAL_DATA_FILE: u64 = 1 << 2;
    pub const COMPRESSION_TYPE: u64 = 1 << 3;
    pub const EXTENDED_L2: u64 = 1 << 4;
    pub const KNOWN: u64 = DIRTY | CORRUPT | EXTERNAL_DATA_FILE | COMPRESSION_TYPE | EXTENDED_L2;
}

/// Feature bits of the `compatible_features` field.
pub mod compatible {
    pub const LAZY_REFCOUNTS: u64 = 1 << 0;
}

/// Feature bits of the `autoclear_features` field.
pub mod autoclear {
    pub const BITMAPS: u64 = 1 << 0;
    pub const DATA_FILE_RAW: u64 = 1 << 1;
    pub const KNOWN: u64 = BITMAPS | DATA_FILE_RAW;
}

/// Header extension magics.
pub mod ext {
    pub const END: u32 = 0;
    pub const BACKING_FORMAT: u32 = 0xe279_2aca;
    pub const FEATURE_NAMES: u32 = 0x6803_f857;
    pub const BITMAPS: u32 = 0x2385_2875;
    pub const FULL_DISK_ENCRYPTION: u32 = 0x0537_be77;
    pub const EXTERNAL_DATA_FILE: u32 = 0x4441_5441;
}

pub use super::limits;

/// `crypt_method` values.
pub mod crypt {
    pub const NONE: u32 = 0;
    pub const AES: u32 = 1;
    pub const LUKS: u32 = 2;
}

const QCOW_MAGIC: u32 = 0x5146_49fb;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CompressionType {
    Deflate,
    Zstd,
}

impl CompressionType {
    /// The value of the header's `compression_type` byte.
    pub fn to_byte(self) -> u8 {
        match self {
            CompressionType::Deflate => 0,
            CompressionType::Zstd => 1,
        }
    }

    fn from_byte(value: u8) -> Option<Self> {
        match value {
            0 => Some(CompressionType::Deflate),
            1 => Some(CompressionType::Zstd),
            _ => None,
        }
    }
}

/// QEMU's `validate_compression_type`: known type first, then its agreement with incompatible bit 3.
fn check_compression_type(
    value: u8,
    incompatible_features: u64,
) -> Result<CompressionType, HeaderError> {
    let compression_type =
        CompressionType::from_byte(value).ok_or(HeaderError::UnknownCompressionType { value })?;
    let bit_set = incompatible_features & incompatible::COMPRESSION_TYPE != 0;
    if bit_set != (compression_type != CompressionType::Deflate) {
        return Err(HeaderError::CompressionBit {
            compression_type: value,
            bit_set,
        });
    }
    Ok(compression_type)
}

/// One header extension as found in the file, kept whole so that a rewrite can preserve unknown ones.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeaderExtension {
    pub magic: u32,
    pub data: Vec<u8>,
}

/// An entry of the feature-name table extension.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FeatureName {
    /// 0 incompatible, 1 compatible, 2 autoclear.
    pub kind: u8,
    pub bit: u8,
    pub name: String,
}

/// The contents of a valid bitmaps extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BitmapsExtension {
    pub nb_bitmaps: u32,
    pub directory_size: u64,
    pub directory_offset: u64,
}

/// The parsed and validated header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub version: u32,
    pub backing_file_offset: u64,
    pub backing_file_size: u32,
    pub cluster_bits: u32,
    /// Virtual disk size in bytes, as stored (QEMU rounds it down to 512 bytes: see
    /// [`Header::virtual_size`]).
    pub size: u64,
    pub crypt_method: u32,
    pub l1_size: u32,
    pub l1_table_offset: u64,
    pub refcount_table_offset: u64,
    pub refcount_table_clusters: u32,
    pub nb_snapshots: u32,
    pub snapshots_offset: u64,
    pub incompatible_features: u64,
    pub compatible_features: u64,
    pub autoclear_features: u64,
    /// log2 of the refcount width in bits (v2: always 4).
    pub refcount_order: u32,
    /// 72 for v2.
    pub header_length: u32,
    pub compression_type: CompressionType,
    /// Bytes between the known fields and `header_length` (kept for a rewrite): exactly the bytes
    /// `112..header_length` of a v3 header, empty when `header_length <= 112` and for v2.
    ///
    /// This is QEMU's `unknown_header_fields`. Bytes 105..112 are not kept: the spec calls them
    /// padding that "must be zeroed", QEMU ignores them on reading and writes zeros there.
    pub unknown_header_bytes: Vec<u8>,
    /// Every extension in file order, the known ones included (not the end marker).
    pub extensions: Vec<HeaderExtension>,
    /// The backing file name as stored (not resolved), if any.
    pub backing_file: Option<String>,
    /// The backing format extension, if present (e.g. "qcow2", "raw").
    pub backing_format: Option<String>,
    pub feature_names: Vec<FeatureName>,
    /// The bitmaps extension, when present and valid (QEMU ignores the extension, as stale, when the
    /// autoclear bitmaps bit is clear; it stays in `extensions` then but this is `None`).
    pub bitmaps: Option<BitmapsExtension>,
}

impl Header {
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    pub fn extended_l2(&self) -> bool {
        self.incompatible_features & incompatible::EXTENDED_L2 != 0
    }

    pub fn is_dirty(&self) -> bool {
        self.incompatible_features & incompatible::DIRTY != 0
    }

    pub fn is_corrupt(&self) -> bool {
        self.incompatible_features & incompatible::CORRUPT != 0
    }

    pub fn refcount_bits(&self) -> u32 {
        1 << self.refcount_order
    }

    /// Whether the lazy refcounts compatible feature is set.
    pub fn lazy_refcounts(&self) -> bool {
        self.compatible_features & compatible::LAZY_REFCOUNTS != 0
    }

    /// The virtual disk size QEMU uses: `size` rounded down to 512 bytes (QEMU counts in sectors).
    pub fn virtual_size(&self) -> u64 {
        self.size & !511
    }

    /// Bytes per L2 entry: 8, or 16 with extended L2 entries.
    pub fn l2_entry_size(&self) -> u64 {
        l2_entry_size(self.extended_l2())
    }

    /// Entries per L2 table (an L2 table is one cluster).
    pub fn l2_entries(&self) -> u64 {
        self.cluster_size() / self.l2_entry_size()
    }

    /// Subclusters per cluster: 32 with extended L2 entries, else 1.
    pub fn subclusters_per_cluster(&self) -> u64 {
        if self.extended_l2() {
            limits::SUBCLUSTERS_PER_CLUSTER
        } else {
            1
        }
    }

    pub fn subcluster_size(&self) -> u64 {
        self.cluster_size() / self.subclusters_per_cluster()
    }

    /// Number of L1 entries needed to map `size` bytes (QEMU's `size_to_l1`). Needs a valid
    /// `cluster_bits`, as `parse` guarantees.
    pub fn l1_entries_for(&self, size: u64) -> u64 {
        l1_entries_for(size, self.cluster_bits, self.extended_l2())
    }

    /// The first extension with this magic, if any.
    pub fn extension(&self, magic: u32) -> Option<&HeaderExtension> {
        self.extensions.iter().find(|e| e.magic == magic)
    }
}

fn l2_entry_size(extended_l2: bool) -> u64 {
    if extended_l2 { 16 } else { 8 }
}

/// QEMU's `size_to_l1`: one L1 entry maps `cluster_size * l2_entries` bytes.
fn l1_entries_for(size: u64, cluster_bits: u32, extended_l2: bool) -> u64 {
    let l2_bits = cluster_bits - l2_entry_size(extended_l2).trailing_zeros();
    let shift = cluster_bits + l2_bits;
    // cluster_bits + l2_bits <= 21 + 18, so the quotient of a u64 by 2^shift fits in a u64.
    size.div_ceil(1 << shift)
}
