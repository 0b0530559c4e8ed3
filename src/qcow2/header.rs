//! The qcow2 header (cluster 0): fixed fields, v3 additions, header extensions and the backing file name.
//!
//! All fields are big-endian. Version 2 headers are 72 bytes; version 3 headers are `header_length`
//! bytes (at least 104). Header extensions follow the header, each `u32 magic, u32 len, data`, padded
//! to 8 bytes, up to an end marker (magic 0) — they must end before the backing file name and inside
//! the first cluster.
//!
//! TODO(header helper): implement `Header::parse` with every check of shared/reference/bad-inputs.md.

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

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CompressionType {
    Deflate,
    Zstd,
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

/// The parsed and validated header.
#[derive(Debug, Clone)]
pub struct Header {
    pub version: u32,
    pub backing_file_offset: u64,
    pub backing_file_size: u32,
    pub cluster_bits: u32,
    /// Virtual disk size in bytes.
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
    /// Bytes between the known fields and `header_length` (kept for a rewrite).
    pub unknown_header_bytes: Vec<u8>,
    /// Every extension in file order, the known ones included (not the end marker).
    pub extensions: Vec<HeaderExtension>,
    /// The backing file name as stored (not resolved), if any.
    pub backing_file: Option<String>,
    /// The backing format extension, if present (e.g. "qcow2", "raw").
    pub backing_format: Option<String>,
    pub feature_names: Vec<FeatureName>,
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
}

/// Why a header was refused. Each variant names the field and the value found.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    #[error("image is not in qcow2 format (magic {found:#010x}, expected 0x514649fb \"QFI\\xfb\")")]
    BadMagic { found: u32 },
}

impl Header {
    /// Parses and validates the header from the first bytes of the file.
    ///
    /// `start` holds the first `min(file_len, 2 MiB + 1024)` bytes of the file (enough for the largest
    /// cluster 0 and a backing file name that starts at its end); `file_len` is the file's length.
    pub fn parse(start: &[u8], file_len: u64) -> Result<Header, HeaderError> {
        let _ = (start, file_len);
        Err(HeaderError::BadMagic { found: 0 })
    }
}
