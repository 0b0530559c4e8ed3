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

use std::fmt::Write as _;

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

/// Format limits, with the names QEMU gives them (`block/qcow2.h`).
pub mod limits {
    /// `MIN_CLUSTER_BITS`: 512-byte clusters.
    pub const MIN_CLUSTER_BITS: u32 = 9;
    /// `MAX_CLUSTER_BITS`: "QEMU as of today has an implementation limit of 2 MB as the maximum
    /// cluster size and won't be able to open images with larger cluster sizes."
    pub const MAX_CLUSTER_BITS: u32 = 21;
    /// "For version 2, the header is exactly 72 bytes in length".
    pub const V2_HEADER_LENGTH: u32 = 72;
    /// "For version 3 or higher, the header length is at least 104 bytes".
    pub const V3_MIN_HEADER_LENGTH: u32 = 104;
    /// `sizeof(QCowHeader)`: the known v3 fields, compression type and its padding included. QEMU
    /// always writes v3 headers of at least this length.
    pub const V3_HEADER_LENGTH: u32 = 112;
    /// Offset of the compression type byte, present only when `header_length` is larger.
    pub const COMPRESSION_TYPE_OFFSET: u32 = 104;
    /// `QCOW_MAX_REFTABLE_SIZE`.
    pub const MAX_REFTABLE_BYTES: u64 = 8 << 20;
    /// `QCOW_MAX_L1_SIZE`.
    pub const MAX_L1_BYTES: u64 = 32 << 20;
    /// Size of one L1 (and standard L2) entry.
    pub const L1_ENTRY_SIZE: u64 = 8;
    /// `QCOW_MAX_SNAPSHOTS`.
    pub const MAX_SNAPSHOTS: u64 = 65536;
    /// `sizeof(QCowSnapshotHeader)`: the fixed part of a snapshot table entry.
    pub const SNAPSHOT_HEADER_SIZE: u64 = 40;
    /// "Must not be longer than 1023 bytes."
    pub const MAX_BACKING_FILE_NAME: u32 = 1023;
    /// QEMU keeps the backing format in `char[16]` and rejects `len >= 16`.
    pub const MAX_BACKING_FORMAT_LEN: u32 = 15;
    /// `QCOW2_MAX_BITMAPS`.
    pub const MAX_BITMAPS: u32 = 65535;
    /// `QCOW2_MAX_BITMAP_DIRECTORY_SIZE` (1024 × 65535 bytes, just under 64 MiB).
    pub const MAX_BITMAP_DIRECTORY_SIZE: u64 = 1024 * 65535;
    /// Size of a feature name table entry: type u8, bit u8, name[46].
    pub const FEATURE_NAME_ENTRY_SIZE: usize = 48;
    /// `QCOW_EXTL2_SUBCLUSTERS_PER_CLUSTER`.
    pub const SUBCLUSTERS_PER_CLUSTER: u64 = 32;
    /// The largest index into the L1 table QEMU accepts (`INT_MAX`): beyond it "Image is too big".
    pub const MAX_L1_INDEX: u64 = i32::MAX as u64;
}

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

    /// Refcount entries per refcount block.
    pub fn refcount_block_entries(&self) -> u64 {
        self.cluster_size() * 8 / u64::from(self.refcount_bits())
    }

    /// Number of L1 entries needed to map `size` bytes (QEMU's `size_to_l1`). Needs a valid
    /// `cluster_bits`, as `parse` guarantees.
    pub fn l1_entries_for(&self, size: u64) -> u64 {
        l1_entries_for(size, self.cluster_bits, self.extended_l2())
    }

    /// The autoclear bits this implementation does not know; a writer must clear them first.
    pub fn unknown_autoclear(&self) -> u64 {
        self.autoclear_features & !autoclear::KNOWN
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

/// Why a header was refused. Each variant names the field and the value found.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    #[error("image is not in qcow2 format (magic {found:#010x}, expected 0x514649fb \"QFI\\xfb\")")]
    BadMagic { found: u32 },

    #[error("unsupported qcow2 version {version} (snapfs reads versions 2 and 3)")]
    UnsupportedVersion { version: u32 },

    #[error(
        "unsupported cluster size 2^{bits} (cluster_bits = {bits}; it must be between 9 for 512 bytes and 21 for 2 MiB)"
    )]
    ClusterBits { bits: u32 },

    #[error("invalid header_length {length}: {reason}")]
    HeaderLength { length: u32, reason: String },

    #[error(
        "invalid backing_file_offset {offset:#x}: the backing file name must start inside the first cluster ({cluster_size} bytes)"
    )]
    BackingFileOffset { offset: u64, cluster_size: u64 },

    #[error(
        "unknown compression type {value} (compression_type byte at offset 104; known: 0 deflate, 1 zstd)"
    )]
    UnknownCompressionType { value: u8 },

    #[error("{}", compression_bit_message(*.compression_type, *.bit_set))]
    CompressionBit { compression_type: u8, bit_set: bool },

    #[error("unsupported qcow2 feature(s): {}", feature_list(.names, *.unnamed))]
    UnknownIncompatible {
        /// Every unknown bit of `incompatible_features`.
        mask: u64,
        /// The feature-name table's names for some of those bits.
        names: Vec<String>,
        /// The unknown bits the feature-name table does not name.
        unnamed: u64,
    },

    #[error(
        "unsupported subcluster size {subcluster_size}: extended L2 entries split the {cluster_size}-byte clusters into 32 subclusters, which must be at least 512 bytes (16 KiB clusters)"
    )]
    SubclusterSize {
        cluster_size: u64,
        subcluster_size: u64,
    },

    #[error(
        "refcount_order {order} is too large: reference count entries may not exceed 64 bits (order 6)"
    )]
    RefcountOrder { order: u32 },

    #[error("image does not contain a reference count table (refcount_table_clusters = 0)")]
    NoRefcountTable,

    #[error("{table} too large: {field} = {value} (at most {max})")]
    TableTooLarge {
        table: &'static str,
        field: &'static str,
        value: u64,
        max: u64,
    },

    #[error("{table} offset {offset:#x} invalid: {reason}")]
    TableOffset {
        table: &'static str,
        offset: u64,
        reason: &'static str,
    },

    #[error(
        "image is too big: virtual size {size} bytes would need {l1_entries} L1 entries (QEMU's limit is 2147483647 and 2^63 bytes)"
    )]
    ImageTooBig { size: u64, l1_entries: u64 },

    #[error(
        "active L1 table too small: l1_size = {l1_size}, but the virtual size of {size} bytes needs {needed} entries"
    )]
    L1TooSmall {
        l1_size: u32,
        size: u64,
        needed: u64,
    },

    #[error("unsupported encryption method {method} (crypt_method; known: 0 none, 1 AES, 2 LUKS)")]
    EncryptionMethod { method: u32 },

    #[error(
        "the image is encrypted ({name}, crypt_method = {method}); snapfs does not read encrypted images"
    )]
    Encrypted { method: u32, name: &'static str },

    #[error(
        "missing CRYPTO header for crypt method {method}: LUKS encryption needs the full disk encryption header extension"
    )]
    MissingCryptoHeader { method: u32 },

    #[error("invalid full disk encryption header extension: {reason}")]
    CryptoExtension { reason: String },

    #[error(
        "header extension {magic:#010x} at offset {offset} is too large: {len} data bytes do not fit before the end of the extension area at offset {area_end}"
    )]
    ExtensionTooLarge {
        magic: u32,
        offset: u64,
        len: u32,
        area_end: u64,
    },

    #[error("invalid backing format extension (length {len}): {reason}")]
    BackingFormat { len: u32, reason: String },

    #[error("invalid bitmaps extension: {field} = {value}: {reason}")]
    BitmapsExtension {
        field: &'static str,
        value: u64,
        reason: &'static str,
    },

    #[error("{}", data_file_message(.name.as_deref()))]
    ExternalDataFile { name: Option<String> },

    #[error(
        "autoclear feature bit 1 (raw external data) is set (autoclear_features = {autoclear:#x}) but the image has no external data file: data-file-raw requires a data file"
    )]
    DataFileRawWithoutDataFile { autoclear: u64 },

    #[error(
        "backing file name too long: backing_file_size = {size} at offset {offset:#x} (at most {max} bytes here)"
    )]
    BackingFileNameTooLong { offset: u64, size: u32, max: u64 },

    #[error("invalid backing file name ({size} bytes at offset {offset:#x}): {reason}")]
    BackingFileName {
        offset: u64,
        size: u32,
        reason: String,
    },

    #[error("cannot write the header: version 2 images cannot store {field} = {value:#x}")]
    NotInVersion2 { field: &'static str, value: u64 },

    #[error(
        "cannot write the header: {needed} bytes do not fit in the first cluster ({cluster_size} bytes)"
    )]
    DoesNotFit { needed: u64, cluster_size: u64 },
}

fn compression_bit_message(compression_type: u8, bit_set: bool) -> String {
    if bit_set {
        format!(
            "incompatible feature bit 3 (compression type) is set, but compression_type is {compression_type} (deflate): the bit must not be set"
        )
    } else {
        format!(
            "compression_type is {compression_type} (not deflate), but incompatible feature bit 3 (compression type) is clear: the bit must be set"
        )
    }
}

/// QEMU's `report_unsupported_feature`: the names the feature table gives, then the bits it does not
/// name as a hex mask.
fn feature_list(names: &[String], unnamed: u64) -> String {
    let mut out = names.join(", ");
    if unnamed != 0 {
        if !out.is_empty() {
            out.push_str(", ");
        }
        // Writing to a String cannot fail.
        let _ = write!(out, "unknown incompatible feature: {unnamed:x}");
    }
    out
}

fn data_file_message(name: Option<&str>) -> String {
    match name {
        Some(name) => format!(
            "the image keeps its data in the external data file {name:?} (incompatible feature bit 2); snapfs does not support external data files"
        ),
        None => "'data-file' is required for this image: incompatible feature bit 2 (external data file) is set but no data file name is recorded; snapfs does not support external data files".to_string(),
    }
}

/// Big-endian reads of the start of the file. Bytes past the end read as zeros, as QEMU reads past
/// the end of the file.
#[derive(Clone, Copy)]
struct BeReader<'a>(&'a [u8]);

impl BeReader<'_> {
    fn array<const N: usize>(&self, offset: u64) -> [u8; N] {
        let mut out = [0; N];
        let available = usize::try_from(offset)
            .ok()
            .and_then(|start| self.0.get(start..))
            .unwrap_or_default();
        let n = available.len().min(N);
        out[..n].copy_from_slice(&available[..n]);
        out
    }

    fn u8(&self, offset: u64) -> u8 {
        self.array::<1>(offset)[0]
    }

    fn u32(&self, offset: u64) -> u32 {
        u32::from_be_bytes(self.array(offset))
    }

    fn u64(&self, offset: u64) -> u64 {
        u64::from_be_bytes(self.array(offset))
    }

    /// `len` bytes at `offset`, zero-filled past the end. Callers bound `len` by the cluster size.
    fn bytes(&self, offset: u64, len: u64) -> Vec<u8> {
        let len = usize::try_from(len).unwrap_or(0);
        let mut out = vec![0; len];
        if let Some(available) = usize::try_from(offset)
            .ok()
            .and_then(|start| self.0.get(start..))
        {
            let n = available.len().min(len);
            out[..n].copy_from_slice(&available[..n]);
        }
        out
    }
}

/// Header field offsets.
mod off {
    pub const MAGIC: u64 = 0;
    pub const VERSION: u64 = 4;
    pub const BACKING_FILE_OFFSET: u64 = 8;
    pub const BACKING_FILE_SIZE: u64 = 16;
    pub const CLUSTER_BITS: u64 = 20;
    pub const SIZE: u64 = 24;
    pub const CRYPT_METHOD: u64 = 32;
    pub const L1_SIZE: u64 = 36;
    pub const L1_TABLE_OFFSET: u64 = 40;
    pub const REFCOUNT_TABLE_OFFSET: u64 = 48;
    pub const REFCOUNT_TABLE_CLUSTERS: u64 = 56;
    pub const NB_SNAPSHOTS: u64 = 60;
    pub const SNAPSHOTS_OFFSET: u64 = 64;
    pub const INCOMPATIBLE_FEATURES: u64 = 72;
    pub const COMPATIBLE_FEATURES: u64 = 80;
    pub const AUTOCLEAR_FEATURES: u64 = 88;
    pub const REFCOUNT_ORDER: u64 = 96;
    pub const HEADER_LENGTH: u64 = 100;
    pub const COMPRESSION_TYPE: u64 = 104;
}

impl Header {
    /// Parses and validates the header from the first bytes of the file.
    ///
    /// `start` holds the first `min(file_len, 2 MiB + 1024)` bytes of the file (enough for the largest
    /// cluster 0 and a backing file name that starts at its end); `file_len` is the file's length.
    ///
    /// The checks run in the order of QEMU's `qcow2_do_open`, so the first problem reported is the
    /// one QEMU reports. The dirty and corrupt bits are not errors: the caller decides whether the
    /// image may be written.
    pub fn parse(start: &[u8], file_len: u64) -> Result<Header, HeaderError> {
        let r = BeReader(start);
        let mut header = Self::parse_fixed_fields(r)?;
        let compression_byte = header.check_header_length_and_backing_offset(r)?;
        header.compression_type =
            check_compression_type(compression_byte, header.incompatible_features)?;
        header.check_incompatible_features(r)?;
        header.check_subclusters()?;
        if header.refcount_order > 6 {
            return Err(HeaderError::RefcountOrder {
                order: header.refcount_order,
            });
        }
        header.check_tables()?;
        header.check_crypt_method()?;
        header.read_extensions(r)?;
        header.check_data_file()?;
        header.check_crypto_header()?;
        header.backing_file = header.read_backing_file_name(start, file_len)?;
        Ok(header)
    }

    /// Magic, version, cluster size, and every fixed field; the v3 fields take their implied values
    /// for v2 ("For version 2 images, the order is always assumed to be 4", header length 72).
    fn parse_fixed_fields(r: BeReader) -> Result<Header, HeaderError> {
        let magic = r.u32(off::MAGIC);
        if magic != QCOW_MAGIC {
            return Err(HeaderError::BadMagic { found: magic });
        }
        let version = r.u32(off::VERSION);
        if !(2..=3).contains(&version) {
            return Err(HeaderError::UnsupportedVersion { version });
        }
        let cluster_bits = r.u32(off::CLUSTER_BITS);
        if !(limits::MIN_CLUSTER_BITS..=limits::MAX_CLUSTER_BITS).contains(&cluster_bits) {
            return Err(HeaderError::ClusterBits { bits: cluster_bits });
        }
        let v3 = version == 3;
        let v3_u64 = |offset| if v3 { r.u64(offset) } else { 0 };
        Ok(Header {
            version,
            backing_file_offset: r.u64(off::BACKING_FILE_OFFSET),
            backing_file_size: r.u32(off::BACKING_FILE_SIZE),
            cluster_bits,
            size: r.u64(off::SIZE),
            crypt_method: r.u32(off::CRYPT_METHOD),
            l1_size: r.u32(off::L1_SIZE),
            l1_table_offset: r.u64(off::L1_TABLE_OFFSET),
            refcount_table_offset: r.u64(off::REFCOUNT_TABLE_OFFSET),
            refcount_table_clusters: r.u32(off::REFCOUNT_TABLE_CLUSTERS),
            nb_snapshots: r.u32(off::NB_SNAPSHOTS),
            snapshots_offset: r.u64(off::SNAPSHOTS_OFFSET),
            incompatible_features: v3_u64(off::INCOMPATIBLE_FEATURES),
            compatible_features: v3_u64(off::COMPATIBLE_FEATURES),
            autoclear_features: v3_u64(off::AUTOCLEAR_FEATURES),
            refcount_order: if v3 { r.u32(off::REFCOUNT_ORDER) } else { 4 },
            header_length: if v3 {
                r.u32(off::HEADER_LENGTH)
            } else {
                limits::V2_HEADER_LENGTH
            },
            compression_type: CompressionType::Deflate,
            unknown_header_bytes: Vec::new(),
            extensions: Vec::new(),
            backing_file: None,
            backing_format: None,
            feature_names: Vec::new(),
            bitmaps: None,
        })
    }

    /// Checks `header_length` and `backing_file_offset`, keeps the unknown header bytes, and returns
    /// the raw compression type byte ("A field is considered not present when header_length is less
    /// than or equal to the field's offset", and an absent compression type means deflate).
    fn check_header_length_and_backing_offset(&mut self, r: BeReader) -> Result<u8, HeaderError> {
        let length = self.header_length;
        if self.version == 3 && length < limits::V3_MIN_HEADER_LENGTH {
            return Err(HeaderError::HeaderLength {
                length,
                reason: "a version 3 header is at least 104 bytes (header too short)".to_string(),
            });
        }
        if u64::from(length) > self.cluster_size() {
            return Err(HeaderError::HeaderLength {
                length,
                reason: format!(
                    "the header exceeds the cluster size of {} bytes",
                    self.cluster_size()
                ),
            });
        }
        if length > limits::V3_HEADER_LENGTH {
            let known = u64::from(limits::V3_HEADER_LENGTH);
            self.unknown_header_bytes = r.bytes(known, u64::from(length) - known);
        }
        if self.backing_file_offset > self.cluster_size() {
            return Err(HeaderError::BackingFileOffset {
                offset: self.backing_file_offset,
                cluster_size: self.cluster_size(),
            });
        }
        Ok(if length > limits::COMPRESSION_TYPE_OFFSET {
            r.u8(off::COMPRESSION_TYPE)
        } else {
            0
        })
    }

    /// End of the header extension area: the backing file name, or the end of the first cluster.
    fn extension_area_end(&self) -> u64 {
        if self.backing_file_offset != 0 {
            self.backing_file_offset
        } else {
            self.cluster_size()
        }
    }

    /// "An implementation must fail to open an image if an unknown bit is set." Like QEMU, the error
    /// names the bits the image's feature-name table describes.
    fn check_incompatible_features(&self, r: BeReader) -> Result<(), HeaderError> {
        let mask = self.incompatible_features & !incompatible::KNOWN;
        if mask == 0 {
            return Ok(());
        }
        // QEMU reads the extensions ignoring errors, just to find the feature-name table.
        let scan = scan_extensions(r, u64::from(self.header_length), self.extension_area_end());
        let table = scan
            .extensions
            .iter()
            .rev()
            .find(|e| e.magic == ext::FEATURE_NAMES)
            .map(|e| parse_feature_table(&e.data))
            .unwrap_or_default();
        let mut names = Vec::new();
        let mut unnamed = mask;
        for feature in table.iter().filter(|f| f.kind == 0 && f.bit < 64) {
            let bit = 1u64 << feature.bit;
            if unnamed & bit != 0 {
                names.push(feature.name.clone());
                unnamed &= !bit;
            }
        }
        Err(HeaderError::UnknownIncompatible {
            mask,
            names,
            unnamed,
        })
    }

    /// Extended L2 entries need subclusters (cluster_size / 32) of at least 512 bytes: "if the image
    /// has Extended L2 Entries then cluster_bits must be at least 14".
    fn check_subclusters(&self) -> Result<(), HeaderError> {
        if self.subcluster_size() < 1 << limits::MIN_CLUSTER_BITS {
            return Err(HeaderError::SubclusterSize {
                cluster_size: self.cluster_size(),
                subcluster_size: self.subcluster_size(),
            });
        }
        Ok(())
    }

    /// The refcount table, snapshot table and active L1 table checks of `qcow2_do_open`, then the
    /// virtual size against the L1 table.
    fn check_tables(&self) -> Result<(), HeaderError> {
        let cluster_size = self.cluster_size();
        if self.refcount_table_clusters == 0 {
            return Err(HeaderError::NoRefcountTable);
        }
        TableCheck {
            table: "reference count table",
            field: "refcount_table_clusters",
            offset: self.refcount_table_offset,
            entries: self.refcount_table_clusters.into(),
            entry_size: cluster_size,
            max_bytes: limits::MAX_REFTABLE_BYTES,
        }
        .run(cluster_size)?;
        TableCheck {
            table: "snapshot table",
            field: "nb_snapshots",
            offset: self.snapshots_offset,
            entries: self.nb_snapshots.into(),
            entry_size: limits::SNAPSHOT_HEADER_SIZE,
            max_bytes: limits::SNAPSHOT_HEADER_SIZE * limits::MAX_SNAPSHOTS,
        }
        .run(cluster_size)?;
        TableCheck {
            table: "active L1 table",
            field: "l1_size",
            offset: self.l1_table_offset,
            entries: self.l1_size.into(),
            entry_size: limits::L1_ENTRY_SIZE,
            max_bytes: limits::MAX_L1_BYTES,
        }
        .run(cluster_size)?;
        self.check_size_against_l1()
    }

    /// QEMU: `size_to_l1(size) > INT_MAX` is "Image is too big" (QEMU computes in `int64_t`, so a size
    /// of 2^63 or more is too big as well); then "the L1 table must contain at least enough entries
    /// to put header.size bytes".
    fn check_size_against_l1(&self) -> Result<(), HeaderError> {
        let needed = self.l1_entries_for(self.size);
        if needed > limits::MAX_L1_INDEX || self.size > i64::MAX as u64 {
            return Err(HeaderError::ImageTooBig {
                size: self.size,
                l1_entries: needed,
            });
        }
        if u64::from(self.l1_size) < needed {
            return Err(HeaderError::L1TooSmall {
                l1_size: self.l1_size,
                size: self.size,
                needed,
            });
        }
        Ok(())
    }

    /// Refuses unknown encryption methods (as QEMU does) and AES (which snapfs does not read). LUKS is
    /// refused after the extensions are read, so that a missing FDE extension is reported as QEMU
    /// reports it.
    fn check_crypt_method(&self) -> Result<(), HeaderError> {
        match self.crypt_method {
            crypt::NONE | crypt::LUKS => Ok(()),
            crypt::AES => Err(HeaderError::Encrypted {
                method: crypt::AES,
                name: "AES",
            }),
            method => Err(HeaderError::EncryptionMethod { method }),
        }
    }

    /// Reads and checks the header extensions (QEMU's `qcow2_read_extensions`).
    fn read_extensions(&mut self, r: BeReader) -> Result<(), HeaderError> {
        let scan = scan_extensions(r, u64::from(self.header_length), self.extension_area_end());
        for extension in &scan.extensions {
            self.apply_extension(extension)?;
        }
        if let Some(error) = scan.error {
            return Err(error);
        }
        self.extensions = scan.extensions;
        Ok(())
    }

    fn apply_extension(&mut self, extension: &HeaderExtension) -> Result<(), HeaderError> {
        let data = &extension.data;
        match extension.magic {
            ext::BACKING_FORMAT => self.backing_format = Some(parse_backing_format(data)?),
            ext::FEATURE_NAMES => self.feature_names = parse_feature_table(data),
            ext::FULL_DISK_ENCRYPTION => {
                check_crypto_extension(data, self.crypt_method, self.cluster_size())?
            }
            ext::BITMAPS => {
                self.bitmaps = parse_bitmaps(data, self.autoclear_features, self.cluster_size())?
            }
            _ => {}
        }
        Ok(())
    }

    /// External data files are not supported; "data-file-raw requires a data file".
    fn check_data_file(&self) -> Result<(), HeaderError> {
        if self.incompatible_features & incompatible::EXTERNAL_DATA_FILE != 0 {
            let name = self
                .extension(ext::EXTERNAL_DATA_FILE)
                .map(|e| String::from_utf8_lossy(&e.data).into_owned());
            return Err(HeaderError::ExternalDataFile { name });
        }
        if self.autoclear_features & autoclear::DATA_FILE_RAW != 0 {
            return Err(HeaderError::DataFileRawWithoutDataFile {
                autoclear: self.autoclear_features,
            });
        }
        Ok(())
    }

    /// "The full disk encryption header must be present if, and only if, the crypt_method header
    /// requires metadata" (LUKS). snapfs refuses LUKS images either way.
    fn check_crypto_header(&self) -> Result<(), HeaderError> {
        if self.crypt_method != crypt::LUKS {
            return Ok(());
        }
        if self.extension(ext::FULL_DISK_ENCRYPTION).is_none() {
            return Err(HeaderError::MissingCryptoHeader {
                method: self.crypt_method,
            });
        }
        Err(HeaderError::Encrypted {
            method: crypt::LUKS,
            name: "LUKS",
        })
    }

    /// Reads the backing file name. QEMU: the name must fit in the first cluster and in 1023 bytes;
    /// an offset of 0 means no backing file, and so does an empty name.
    fn read_backing_file_name(
        &self,
        start: &[u8],
        file_len: u64,
    ) -> Result<Option<String>, HeaderError> {
        let offset = self.backing_file_offset;
        let size = self.backing_file_size;
        if offset == 0 {
            return Ok(None);
        }
        // offset <= cluster_size was checked before.
        let max = u64::from(limits::MAX_BACKING_FILE_NAME).min(self.cluster_size() - offset);
        if u64::from(size) > max {
            return Err(HeaderError::BackingFileNameTooLong { offset, size, max });
        }
        let name_error = |reason: String| HeaderError::BackingFileName {
            offset,
            size,
            reason,
        };
        let end = offset + u64::from(size);
        let bytes = usize::try_from(offset)
            .ok()
            .zip(usize::try_from(end).ok())
            .and_then(|(from, to)| start.get(from..to))
            .ok_or_else(|| {
                name_error(format!(
                    "it lies past the end of the file ({file_len} bytes)"
                ))
            })?;
        if bytes.contains(&0) {
            return Err(name_error("it contains a NUL byte".to_string()));
        }
        let name = std::str::from_utf8(bytes).map_err(|_| {
            name_error(format!(
                "it is not valid UTF-8 ({:?})",
                String::from_utf8_lossy(bytes)
            ))
        })?;
        Ok((!name.is_empty()).then(|| name.to_string()))
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

/// One table of QEMU's `qcow2_validate_table`.
struct TableCheck {
    table: &'static str,
    field: &'static str,
    offset: u64,
    entries: u64,
    entry_size: u64,
    max_bytes: u64,
}

impl TableCheck {
    /// "Use signed INT64_MAX as the maximum even for uint64_t header fields, because values will be
    /// passed to qemu functions taking int64_t."
    fn run(&self, cluster_size: u64) -> Result<(), HeaderError> {
        let max = self.max_bytes / self.entry_size;
        if self.entries > max {
            return Err(HeaderError::TableTooLarge {
                table: self.table,
                field: self.field,
                value: self.entries,
                max,
            });
        }
        let offset_error = |reason| HeaderError::TableOffset {
            table: self.table,
            offset: self.offset,
            reason,
        };
        if self.offset % cluster_size != 0 {
            return Err(offset_error("it is not aligned to the cluster size"));
        }
        // Cluster 0 is the header. QEMU does not check this here (it reads the header as the
        // table and fails later, or reads garbage), but no valid image has a table there.
        if self.entries > 0 && self.offset == 0 {
            return Err(offset_error("it points at the header (cluster 0)"));
        }
        // entries * entry_size <= max_bytes, so no overflow.
        if self.offset > i64::MAX as u64 - self.entries * self.entry_size {
            return Err(offset_error("the table would end beyond 2^63 bytes"));
        }
        Ok(())
    }
}

/// The extensions found between `start` and `end`, and the structural error that stopped the scan.
struct ExtensionScan {
    extensions: Vec<HeaderExtension>,
    error: Option<HeaderError>,
}

/// Walks the extension area like QEMU: stop at the end marker or at `end`; an extension whose data
/// runs past `end` is "Header extension too large".
fn scan_extensions(r: BeReader, start: u64, end: u64) -> ExtensionScan {
    let mut extensions = Vec::new();
    let mut offset = start;
    while offset < end {
        let magic = r.u32(offset);
        let len = r.u32(offset + 4);
        let data_offset = offset + 8;
        if data_offset > end || u64::from(len) > end - data_offset {
            let error = HeaderError::ExtensionTooLarge {
                magic,
                offset,
                len,
                area_end: end,
            };
            return ExtensionScan {
                extensions,
                error: Some(error),
            };
        }
        if magic == ext::END {
            break;
        }
        extensions.push(HeaderExtension {
            magic,
            data: r.bytes(data_offset, len.into()),
        });
        offset = data_offset + u64::from(len).next_multiple_of(8);
    }
    ExtensionScan {
        extensions,
        error: None,
    }
}

/// The backing format: "just a single string ... the string is not \0 terminated". QEMU keeps it in a
/// 16-byte buffer and rejects `len >= 16`.
fn parse_backing_format(data: &[u8]) -> Result<String, HeaderError> {
    let len = u32::try_from(data.len()).unwrap_or(u32::MAX);
    let error = |reason: String| HeaderError::BackingFormat { len, reason };
    if len > limits::MAX_BACKING_FORMAT_LEN {
        return Err(error("it must be shorter than 16 bytes".to_string()));
    }
    if data.contains(&0) {
        return Err(error(format!(
            "it contains a NUL byte ({:?})",
            String::from_utf8_lossy(data)
        )));
    }
    std::str::from_utf8(data).map(str::to_string).map_err(|_| {
        error(format!(
            "it is not valid UTF-8 ({:?})",
            String::from_utf8_lossy(data)
        ))
    })
}

/// The feature-name table: 48-byte entries `type u8, bit u8, name[46]`, the name "padded with zeros,
/// but not necessarily null terminated if it has full length". Like QEMU, a partial last entry is
/// zero-padded and the table ends at the first entry with an empty name.
fn parse_feature_table(data: &[u8]) -> Vec<FeatureName> {
    let mut features = Vec::new();
    for chunk in data.chunks(limits::FEATURE_NAME_ENTRY_SIZE) {
        let mut entry = [0u8; limits::FEATURE_NAME_ENTRY_SIZE];
        entry[..chunk.len()].copy_from_slice(chunk);
        let name = &entry[2..];
        let name = &name[..name.iter().position(|&b| b == 0).unwrap_or(name.len())];
        if name.is_empty() {
            break;
        }
        features.push(FeatureName {
            kind: entry[0],
            bit: entry[1],
            name: String::from_utf8_lossy(name).into_owned(),
        });
    }
    features
}

/// The full disk encryption header pointer: offset u64 (cluster aligned) and length u64, only with
/// LUKS.
fn check_crypto_extension(
    data: &[u8],
    crypt_method: u32,
    cluster_size: u64,
) -> Result<(), HeaderError> {
    let error = |reason: String| HeaderError::CryptoExtension { reason };
    if crypt_method != crypt::LUKS {
        return Err(error(format!(
            "it is only expected with LUKS encryption, but crypt_method = {crypt_method}"
        )));
    }
    let fields: [u8; 16] = data
        .try_into()
        .map_err(|_| error(format!("its length is {}, expected 16", data.len())))?;
    let offset = u64::from_be_bytes(array_at(&fields, 0));
    if offset % cluster_size != 0 {
        return Err(error(format!(
            "the encryption header offset {offset:#x} is not a multiple of the cluster size {cluster_size}"
        )));
    }
    Ok(())
}

/// The bitmaps extension: nb_bitmaps u32, reserved u32, directory size u64, directory offset u64.
/// "The data of the extension should be considered consistent only if the corresponding auto-clear
/// feature bit is set": without it QEMU ignores the contents (after checking the length).
fn parse_bitmaps(
    data: &[u8],
    autoclear_features: u64,
    cluster_size: u64,
) -> Result<Option<BitmapsExtension>, HeaderError> {
    let error = |field, value, reason| HeaderError::BitmapsExtension {
        field,
        value,
        reason,
    };
    let fields: [u8; 24] = data.try_into().map_err(|_| {
        error(
            "length",
            data.len() as u64,
            "the extension must be 24 bytes",
        )
    })?;
    if autoclear_features & autoclear::BITMAPS == 0 {
        return Ok(None);
    }
    let nb_bitmaps = u32::from_be_bytes(array_at(&fields, 0));
    let reserved = u32::from_be_bytes(array_at(&fields, 4));
    let directory_size = u64::from_be_bytes(array_at(&fields, 8));
    let directory_offset = u64::from_be_bytes(array_at(&fields, 16));
    if reserved != 0 {
        return Err(error(
            "reserved",
            reserved.into(),
            "the reserved field must be zero",
        ));
    }
    if nb_bitmaps > limits::MAX_BITMAPS {
        return Err(error(
            "nb_bitmaps",
            nb_bitmaps.into(),
            "more than the supported maximum of 65535 bitmaps",
        ));
    }
    if nb_bitmaps == 0 {
        return Err(error(
            "nb_bitmaps",
            0,
            "found bitmaps extension with zero bitmaps",
        ));
    }
    if directory_offset % cluster_size != 0 {
        return Err(error(
            "bitmap_directory_offset",
            directory_offset,
            "the bitmap directory offset is not aligned to the cluster size",
        ));
    }
    if directory_size > limits::MAX_BITMAP_DIRECTORY_SIZE {
        return Err(error(
            "bitmap_directory_size",
            directory_size,
            "the bitmap directory exceeds the supported maximum of 67107840 bytes",
        ));
    }
    Ok(Some(BitmapsExtension {
        nb_bitmaps,
        directory_size,
        directory_offset,
    }))
}

/// `N` bytes of a fixed-size array at `at` (callers pass in-bounds constant offsets).
fn array_at<const N: usize, const M: usize>(bytes: &[u8; M], at: usize) -> [u8; N] {
    let mut out = [0; N];
    if let Some(src) = bytes.get(at..at + N) {
        out.copy_from_slice(src);
    }
    out
}

/// The rank of an extension in the order QEMU's `qcow2_update_header` writes them: backing format,
/// external data file, full disk encryption, feature names, bitmaps, then the unknown ones.
fn extension_rank(magic: u32) -> u8 {
    match magic {
        ext::BACKING_FORMAT => 0,
        ext::EXTERNAL_DATA_FILE => 1,
        ext::FULL_DISK_ENCRYPTION => 2,
        ext::FEATURE_NAMES => 3,
        ext::BITMAPS => 4,
        _ => 5,
    }
}

/// Appends `u32 magic, u32 len, data`, zero-padded to 8 bytes.
fn push_extension(out: &mut Vec<u8>, magic: u32, data: &[u8]) {
    out.extend_from_slice(&magic.to_be_bytes());
    // Extension data comes from cluster 0, so its length fits in a u32; a larger one is cut off by
    // `encode`'s fit check anyway.
    out.extend_from_slice(&u32::try_from(data.len()).unwrap_or(u32::MAX).to_be_bytes());
    out.extend_from_slice(data);
    // The data is padded to a multiple of 8 bytes counted from the extension's own start, as
    // QEMU writes and reads it: with a `header_length` that is not a multiple of 8 (unknown header
    // bytes of odd length, which QEMU keeps), the extensions are not 8-aligned in the file, and
    // aligning them absolutely would put every extension after the first where no reader looks
    // (found by the `header` fuzz target).
    out.resize(out.len() + (8 - data.len() % 8) % 8, 0);
}

/// Cluster 0 as `encode` lays it out, before the checks.
struct Encoded {
    bytes: Vec<u8>,
    header_length: u32,
    extensions: Vec<HeaderExtension>,
    backing_file_offset: u64,
    backing_file_size: u32,
}

impl Header {
    /// Serializes the header, its extensions and the backing file name: the used part of cluster 0.
    ///
    /// The layout is QEMU's (`qcow2_update_header`): the fixed fields (72 bytes for v2, 112 for v3,
    /// compression type at 104 and zero padding), the unknown header bytes (so `header_length` is
    /// 112 + their length), the extensions in QEMU's order — backing format (taken from
    /// `backing_format`), external data file, full disk encryption, feature names, bitmaps, then the
    /// unknown ones in file order —, the end marker and the backing file name (from `backing_file`).
    /// The written `header_length`, `backing_file_offset` and `backing_file_size` are computed from
    /// that layout, not taken from the fields; [`Header::sync_layout`] sets the fields to match.
    ///
    /// Fails if the result does not fit in one cluster, or if a field cannot be represented.
    pub fn encode(&self) -> Result<Vec<u8>, HeaderError> {
        self.check_encodable()?;
        let encoded = self.layout();
        if let Some(name) = &self.backing_file {
            let offset = encoded.backing_file_offset;
            let max = u64::from(limits::MAX_BACKING_FILE_NAME);
            if name.len() as u64 > max {
                return Err(HeaderError::BackingFileNameTooLong {
                    offset,
                    size: encoded.backing_file_size,
                    max,
                });
            }
        }
        let needed = encoded.bytes.len() as u64;
        if needed > self.cluster_size() {
            return Err(HeaderError::DoesNotFit {
                needed,
                cluster_size: self.cluster_size(),
            });
        }
        Ok(encoded.bytes)
    }

    /// Sets the backing file name and format (both stored as given, the name not resolved), and
    /// updates the layout fields (see [`Header::sync_layout`]). A name that is too long is reported
    /// by [`Header::encode`].
    pub fn set_backing(&mut self, file: Option<String>, format: Option<String>) {
        self.backing_file = file;
        self.backing_format = format;
        self.sync_layout();
    }

    /// Makes `header_length`, `extensions` (order, and the backing format entry),
    /// `backing_file_offset` and `backing_file_size` what [`Header::encode`] writes, so that parsing
    /// the encoded bytes gives back this header.
    pub fn sync_layout(&mut self) {
        let encoded = self.layout();
        self.header_length = encoded.header_length;
        self.extensions = encoded.extensions;
        self.backing_file_offset = encoded.backing_file_offset;
        self.backing_file_size = encoded.backing_file_size;
    }

    /// Refuses what cannot be written (or what QEMU would refuse to read back).
    fn check_encodable(&self) -> Result<(), HeaderError> {
        if !(2..=3).contains(&self.version) {
            return Err(HeaderError::UnsupportedVersion {
                version: self.version,
            });
        }
        if !(limits::MIN_CLUSTER_BITS..=limits::MAX_CLUSTER_BITS).contains(&self.cluster_bits) {
            return Err(HeaderError::ClusterBits {
                bits: self.cluster_bits,
            });
        }
        if self.version == 2 {
            self.check_version2_fields()?;
        }
        check_compression_type(self.compression_type.to_byte(), self.incompatible_features)?;
        if let Some(format) = &self.backing_format {
            parse_backing_format(format.as_bytes())?;
        }
        if let Some(name) = self.backing_file.as_ref().filter(|n| n.contains('\0')) {
            return Err(HeaderError::BackingFileName {
                offset: 0,
                size: u32::try_from(name.len()).unwrap_or(u32::MAX),
                reason: "it contains a NUL byte".to_string(),
            });
        }
        Ok(())
    }

    /// Version 2 headers end at byte 72: the v3 fields must have their implied values.
    fn check_version2_fields(&self) -> Result<(), HeaderError> {
        let v3_only = [
            ("incompatible_features", self.incompatible_features),
            ("compatible_features", self.compatible_features),
            ("autoclear_features", self.autoclear_features),
            ("compression_type", self.compression_type.to_byte().into()),
            (
                "unknown header bytes",
                self.unknown_header_bytes.len() as u64,
            ),
        ];
        if let Some((field, value)) = v3_only.into_iter().find(|&(_, value)| value != 0) {
            return Err(HeaderError::NotInVersion2 { field, value });
        }
        if self.refcount_order != 4 {
            return Err(HeaderError::NotInVersion2 {
                field: "refcount_order",
                value: self.refcount_order.into(),
            });
        }
        Ok(())
    }

    /// The extensions in the order `encode` writes them, the backing format one from
    /// `backing_format`.
    fn ordered_extensions(&self) -> Vec<HeaderExtension> {
        let backing_format = self.backing_format.iter().map(|format| HeaderExtension {
            magic: ext::BACKING_FORMAT,
            data: format.as_bytes().to_vec(),
        });
        let mut others: Vec<HeaderExtension> = self
            .extensions
            .iter()
            .filter(|e| e.magic != ext::BACKING_FORMAT && e.magic != ext::END)
            .cloned()
            .collect();
        // A stable sort keeps the file order within a rank.
        others.sort_by_key(|e| extension_rank(e.magic));
        backing_format.chain(others).collect()
    }

    fn layout(&self) -> Encoded {
        let header_length = if self.version == 2 {
            limits::V2_HEADER_LENGTH
        } else {
            let unknown = u32::try_from(self.unknown_header_bytes.len()).unwrap_or(u32::MAX);
            limits::V3_HEADER_LENGTH.saturating_add(unknown)
        };
        let mut bytes = self.encode_fixed_fields(header_length);
        let extensions = self.ordered_extensions();
        for extension in &extensions {
            push_extension(&mut bytes, extension.magic, &extension.data);
        }
        push_extension(&mut bytes, ext::END, &[]);
        // An empty name means no backing file, to QEMU as to `parse`.
        let (backing_file_offset, backing_file_size) =
            match self.backing_file.as_deref().filter(|n| !n.is_empty()) {
                Some(name) => {
                    let location = (
                        bytes.len() as u64,
                        u32::try_from(name.len()).unwrap_or(u32::MAX),
                    );
                    bytes.extend_from_slice(name.as_bytes());
                    location
                }
                None => (0, 0),
            };
        bytes[8..16].copy_from_slice(&backing_file_offset.to_be_bytes());
        bytes[16..20].copy_from_slice(&backing_file_size.to_be_bytes());
        Encoded {
            bytes,
            header_length,
            extensions,
            backing_file_offset,
            backing_file_size,
        }
    }

    /// The fixed fields (backing file offset and size left zero) and the unknown header bytes.
    fn encode_fixed_fields(&self, header_length: u32) -> Vec<u8> {
        let mut out = Vec::with_capacity(header_length as usize);
        out.extend_from_slice(&QCOW_MAGIC.to_be_bytes());
        out.extend_from_slice(&self.version.to_be_bytes());
        out.extend_from_slice(&[0; 12]); // backing_file_offset, backing_file_size
        out.extend_from_slice(&self.cluster_bits.to_be_bytes());
        out.extend_from_slice(&self.size.to_be_bytes());
        out.extend_from_slice(&self.crypt_method.to_be_bytes());
        out.extend_from_slice(&self.l1_size.to_be_bytes());
        out.extend_from_slice(&self.l1_table_offset.to_be_bytes());
        out.extend_from_slice(&self.refcount_table_offset.to_be_bytes());
        out.extend_from_slice(&self.refcount_table_clusters.to_be_bytes());
        out.extend_from_slice(&self.nb_snapshots.to_be_bytes());
        out.extend_from_slice(&self.snapshots_offset.to_be_bytes());
        if self.version >= 3 {
            out.extend_from_slice(&self.incompatible_features.to_be_bytes());
            out.extend_from_slice(&self.compatible_features.to_be_bytes());
            out.extend_from_slice(&self.autoclear_features.to_be_bytes());
            out.extend_from_slice(&self.refcount_order.to_be_bytes());
            out.extend_from_slice(&header_length.to_be_bytes());
            out.push(self.compression_type.to_byte());
            out.resize(limits::V3_HEADER_LENGTH as usize, 0);
            out.extend_from_slice(&self.unknown_header_bytes);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::path::Path;
    use std::process::Command;
    use std::sync::OnceLock;

    const MIB: u64 = 1 << 20;
    /// What the caller passes as `start`: the first 2 MiB + 1024 bytes.
    const START_LEN: u64 = 2 * MIB + 1024;

    fn qemu_img(dir: &Path, args: &[&str]) {
        let output = Command::new("qemu-img")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("qemu-img must be installed");
        assert!(
            output.status.success(),
            "qemu-img {args:?} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }

    fn qemu_img_json(dir: &Path, args: &[&str]) -> serde_json::Value {
        let output = Command::new("qemu-img")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("qemu-img must be installed");
        assert!(
            output.status.success(),
            "qemu-img {args:?} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        serde_json::from_slice(&output.stdout).unwrap()
    }

    /// The whole file, as tests patch it; `parse_bytes` passes the first START_LEN bytes.
    fn read(dir: &Path, name: &str) -> Vec<u8> {
        std::fs::read(dir.join(name)).unwrap()
    }

    fn parse_bytes(bytes: &[u8]) -> Result<Header, HeaderError> {
        let start = &bytes[..bytes.len().min(START_LEN as usize)];
        Header::parse(start, bytes.len() as u64)
    }

    /// Creates a 64 MiB image with `qemu-img create -f qcow2 -o <options>` and returns its bytes.
    fn create(options: &str, extra: &[&str]) -> Vec<u8> {
        let dir = tempfile::tempdir().unwrap();
        let mut args = vec!["create", "-q", "-f", "qcow2"];
        if !options.is_empty() {
            args.extend(["-o", options]);
        }
        args.extend(extra);
        args.extend(["img.qcow2", "64M"]);
        qemu_img(dir.path(), &args);
        read(dir.path(), "img.qcow2")
    }

    /// The base image of bad-inputs.md: 64 MiB, 64 KiB clusters, v3.
    fn base() -> &'static [u8] {
        static BASE: OnceLock<Vec<u8>> = OnceLock::new();
        BASE.get_or_init(|| create("", &[]))
    }

    /// An overlay of a v3 image: backing "base.qcow2", backing format "qcow2".
    fn overlay() -> &'static [u8] {
        static OVERLAY: OnceLock<Vec<u8>> = OnceLock::new();
        OVERLAY.get_or_init(|| {
            let dir = tempfile::tempdir().unwrap();
            qemu_img(
                dir.path(),
                &["create", "-q", "-f", "qcow2", "base.qcow2", "64M"],
            );
            qemu_img(
                dir.path(),
                &[
                    "create",
                    "-q",
                    "-f",
                    "qcow2",
                    "-b",
                    "base.qcow2",
                    "-F",
                    "qcow2",
                    "top.qcow2",
                ],
            );
            read(dir.path(), "top.qcow2")
        })
    }

    fn patched(bytes: &[u8], offset: usize, with: &[u8]) -> Vec<u8> {
        let mut out = bytes.to_vec();
        out[offset..offset + with.len()].copy_from_slice(with);
        out
    }

    fn with_u32(bytes: &[u8], offset: usize, value: u32) -> Vec<u8> {
        patched(bytes, offset, &value.to_be_bytes())
    }

    fn with_u64(bytes: &[u8], offset: usize, value: u64) -> Vec<u8> {
        patched(bytes, offset, &value.to_be_bytes())
    }

    fn parse_err(bytes: &[u8]) -> HeaderError {
        let error = parse_bytes(bytes).expect_err("the header must be refused");
        let message = error.to_string();
        assert!(
            !message.contains('\n'),
            "message must be one line: {message}"
        );
        error
    }

    /// The feature-name table QEMU 10 writes for clusters larger than 4 KiB.
    fn qemu_feature_names() -> Vec<FeatureName> {
        [
            (0, 0, "dirty bit"),
            (0, 1, "corrupt bit"),
            (0, 2, "external data file"),
            (0, 3, "compression type"),
            (0, 4, "extended L2 entries"),
            (1, 0, "lazy refcounts"),
            (2, 0, "bitmaps"),
            (2, 1, "raw external data"),
        ]
        .into_iter()
        .map(|(kind, bit, name)| FeatureName {
            kind,
            bit,
            name: name.to_string(),
        })
        .collect()
    }

    fn qemu_feature_table() -> HeaderExtension {
        let mut data = Vec::new();
        for feature in qemu_feature_names() {
            let mut entry = [0u8; 48];
            entry[0] = feature.kind;
            entry[1] = feature.bit;
            entry[2..2 + feature.name.len()].copy_from_slice(feature.name.as_bytes());
            data.extend_from_slice(&entry);
        }
        HeaderExtension {
            magic: ext::FEATURE_NAMES,
            data,
        }
    }

    /// What `qemu-img create -f qcow2 img 64M` writes.
    fn expected_v3() -> Header {
        Header {
            version: 3,
            backing_file_offset: 0,
            backing_file_size: 0,
            cluster_bits: 16,
            size: 64 * MIB,
            crypt_method: 0,
            l1_size: 1,
            l1_table_offset: 0x30000,
            refcount_table_offset: 0x10000,
            refcount_table_clusters: 1,
            nb_snapshots: 0,
            snapshots_offset: 0,
            incompatible_features: 0,
            compatible_features: 0,
            autoclear_features: 0,
            refcount_order: 4,
            header_length: 112,
            compression_type: CompressionType::Deflate,
            unknown_header_bytes: Vec::new(),
            extensions: vec![qemu_feature_table()],
            backing_file: None,
            backing_format: None,
            feature_names: qemu_feature_names(),
            bitmaps: None,
        }
    }

    /// encode() gives back exactly what QEMU wrote, and the rest of cluster 0 is zero.
    fn assert_encodes_like_qemu(bytes: &[u8]) {
        let header = parse_bytes(bytes).unwrap();
        let encoded = header.encode().unwrap();
        assert_eq!(encoded, bytes[..encoded.len()]);
        let cluster = header.cluster_size() as usize;
        assert!(bytes[encoded.len()..cluster].iter().all(|&b| b == 0));
        assert_eq!(parse_bytes(&encoded).unwrap(), header);
    }

    // ---- Real headers from qemu-img ----

    #[test]
    fn v3_default() {
        let header = parse_bytes(base()).unwrap();
        assert_eq!(header, expected_v3());
        assert_eq!(header.cluster_size(), 65536);
        assert_eq!(header.refcount_bits(), 16);
        assert_eq!(header.l2_entries(), 8192);
        assert_eq!(header.subcluster_size(), 65536);
        assert!(!header.is_dirty() && !header.is_corrupt() && !header.extended_l2());
        assert_encodes_like_qemu(base());
    }

    #[test]
    fn v2_compat_0_10() {
        let bytes = create("compat=0.10", &[]);
        let header = parse_bytes(&bytes).unwrap();
        let expected = Header {
            version: 2,
            header_length: 72,
            extensions: Vec::new(),
            feature_names: Vec::new(),
            ..expected_v3()
        };
        assert_eq!(header, expected);
        assert_encodes_like_qemu(&bytes);
    }

    #[test]
    fn v2_with_backing_file() {
        let dir = tempfile::tempdir().unwrap();
        qemu_img(
            dir.path(),
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-o",
                "compat=0.10",
                "b.qcow2",
                "64M",
            ],
        );
        qemu_img(
            dir.path(),
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-o",
                "compat=0.10",
                "-b",
                "b.qcow2",
                "-F",
                "qcow2",
                "t.qcow2",
            ],
        );
        let bytes = read(dir.path(), "t.qcow2");
        let header = parse_bytes(&bytes).unwrap();
        let expected = Header {
            version: 2,
            header_length: 72,
            // 72 + backing format extension (8 + 8) + end marker (8).
            backing_file_offset: 96,
            backing_file_size: 7,
            extensions: vec![HeaderExtension {
                magic: ext::BACKING_FORMAT,
                data: b"qcow2".to_vec(),
            }],
            backing_file: Some("b.qcow2".to_string()),
            backing_format: Some("qcow2".to_string()),
            feature_names: Vec::new(),
            ..expected_v3()
        };
        assert_eq!(header, expected);
        assert_encodes_like_qemu(&bytes);
    }

    #[test]
    fn cluster_size_512() {
        let bytes = create("cluster_size=512", &[]);
        let header = parse_bytes(&bytes).unwrap();
        // 64 L2 entries of 512 bytes: one L1 entry maps 32 KiB, so 64 MiB needs 2048 entries.
        // QEMU omits the feature table for clusters of 4 KiB and less.
        let expected = Header {
            cluster_bits: 9,
            l1_size: 2048,
            l1_table_offset: 0x600,
            refcount_table_offset: 0x200,
            extensions: Vec::new(),
            feature_names: Vec::new(),
            ..expected_v3()
        };
        assert_eq!(header, expected);
        assert_eq!(header.l1_entries_for(header.size), 2048);
        assert_encodes_like_qemu(&bytes);
    }

    #[test]
    fn cluster_size_2m() {
        let bytes = create("cluster_size=2M", &[]);
        let header = parse_bytes(&bytes).unwrap();
        let expected = Header {
            cluster_bits: 21,
            l1_table_offset: 0x60_0000,
            refcount_table_offset: 0x20_0000,
            ..expected_v3()
        };
        assert_eq!(header, expected);
        assert_encodes_like_qemu(&bytes);
    }

    #[test]
    fn refcount_bits_1_and_64() {
        for (bits, order) in [(1, 0), (64, 6)] {
            let bytes = create(&format!("refcount_bits={bits}"), &[]);
            let header = parse_bytes(&bytes).unwrap();
            let expected = Header {
                refcount_order: order,
                ..expected_v3()
            };
            assert_eq!(header, expected);
            assert_eq!(header.refcount_bits(), bits);
            assert_encodes_like_qemu(&bytes);
        }
    }

    #[test]
    fn extended_l2() {
        let bytes = create("extended_l2=on", &[]);
        let header = parse_bytes(&bytes).unwrap();
        let expected = Header {
            incompatible_features: incompatible::EXTENDED_L2,
            ..expected_v3()
        };
        assert_eq!(header, expected);
        assert!(header.extended_l2());
        assert_eq!(header.l2_entry_size(), 16);
        assert_eq!(header.l2_entries(), 4096);
        assert_eq!(header.subcluster_size(), 2048);
        assert_encodes_like_qemu(&bytes);
    }

    #[test]
    fn compression_type_zstd() {
        let bytes = create("compression_type=zstd", &[]);
        let header = parse_bytes(&bytes).unwrap();
        let expected = Header {
            incompatible_features: incompatible::COMPRESSION_TYPE,
            compression_type: CompressionType::Zstd,
            ..expected_v3()
        };
        assert_eq!(header, expected);
        assert_encodes_like_qemu(&bytes);
    }

    #[test]
    fn backing_file_and_format() {
        let header = parse_bytes(overlay()).unwrap();
        let expected = Header {
            // 112 + backing format (16) + feature table (8 + 384) + end marker (8).
            backing_file_offset: 0x210,
            backing_file_size: 10,
            extensions: vec![
                HeaderExtension {
                    magic: ext::BACKING_FORMAT,
                    data: b"qcow2".to_vec(),
                },
                qemu_feature_table(),
            ],
            backing_file: Some("base.qcow2".to_string()),
            backing_format: Some("qcow2".to_string()),
            ..expected_v3()
        };
        assert_eq!(header, expected);
        assert_encodes_like_qemu(overlay());
    }

    #[test]
    fn bitmaps_extension() {
        let dir = tempfile::tempdir().unwrap();
        qemu_img(
            dir.path(),
            &["create", "-q", "-f", "qcow2", "img.qcow2", "64M"],
        );
        qemu_img(dir.path(), &["bitmap", "--add", "img.qcow2", "b0"]);
        let bytes = read(dir.path(), "img.qcow2");
        let header = parse_bytes(&bytes).unwrap();
        assert_eq!(header.autoclear_features, autoclear::BITMAPS);
        let bitmaps = header.bitmaps.unwrap();
        assert_eq!(bitmaps.nb_bitmaps, 1);
        assert_eq!(bitmaps.directory_offset % 65536, 0);
        assert!(bitmaps.directory_offset > 0);
        assert!(bitmaps.directory_size > 0);
        let magics: Vec<u32> = header.extensions.iter().map(|e| e.magic).collect();
        assert_eq!(magics, [ext::FEATURE_NAMES, ext::BITMAPS]);
        assert_encodes_like_qemu(&bytes);

        // Without the autoclear bit QEMU considers the extension stale and ignores its contents.
        let stale = with_u64(&bytes, 88, 0);
        let stale = with_u32(&stale, 0x200, 0); // nb_bitmaps = 0 would be an error otherwise
        let header = parse_bytes(&stale).unwrap();
        assert_eq!(header.bitmaps, None);
        assert_eq!(header.extensions.len(), 2);
    }

    #[test]
    fn luks_is_refused() {
        let bytes = create(
            "encrypt.format=luks,encrypt.key-secret=sec0",
            &["--object", "secret,id=sec0,data=secret"],
        );
        assert_eq!(
            parse_err(&bytes),
            HeaderError::Encrypted {
                method: 2,
                name: "LUKS"
            }
        );
    }

    #[test]
    fn external_data_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        qemu_img(
            dir.path(),
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-o",
                "data_file=data.raw",
                "img.qcow2",
                "64M",
            ],
        );
        let bytes = read(dir.path(), "img.qcow2");
        let error = parse_err(&bytes);
        assert_eq!(
            error,
            HeaderError::ExternalDataFile {
                name: Some("data.raw".to_string())
            }
        );
        assert!(error.to_string().contains("not support"));
    }

    #[test]
    fn header_length_105_is_accepted() {
        // 105 is not a multiple of 8, but QEMU accepts it. The compression type byte is present;
        // extensions start at 105, where the padding reads as the end marker.
        let bytes = create("compression_type=zstd", &[]);
        let header = parse_bytes(&with_u32(&bytes, 100, 105)).unwrap();
        assert_eq!(header.header_length, 105);
        assert_eq!(header.compression_type, CompressionType::Zstd);
        assert!(header.unknown_header_bytes.is_empty());
        assert!(header.extensions.is_empty());

        // With header_length 104 the compression type is absent, so bit 3 must be clear.
        assert_eq!(
            parse_err(&with_u32(&bytes, 100, 104)),
            HeaderError::CompressionBit {
                compression_type: 0,
                bit_set: true
            }
        );
    }

    /// Inserts `insert` at `at` and adds its length to header_length.
    fn with_header_bytes(bytes: &[u8], at: usize, insert: &[u8]) -> Vec<u8> {
        let mut out = bytes[..at].to_vec();
        out.extend_from_slice(insert);
        out.extend_from_slice(&bytes[at..]);
        let length = u32::from_be_bytes(out[100..104].try_into().unwrap());
        with_u32(&out, 100, length + insert.len() as u32)
    }

    #[test]
    fn unknown_header_bytes_are_kept() {
        let bytes = with_header_bytes(base(), 112, &[1, 2, 3, 4, 5, 6, 7, 8]);
        let header = parse_bytes(&bytes).unwrap();
        assert_eq!(header.header_length, 120);
        assert_eq!(header.unknown_header_bytes, [1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(header.extensions, [qemu_feature_table()]);
        let encoded = header.encode().unwrap();
        assert_eq!(encoded, bytes[..encoded.len()]);
        assert_eq!(parse_bytes(&encoded).unwrap(), header);
    }

    /// The base image with an unknown extension after the feature table (where QEMU puts them).
    fn with_unknown_extension() -> Vec<u8> {
        // Feature table: 112 + 8 + 384 = 504; the end marker follows.
        let mut unknown = Vec::new();
        push_extension(&mut unknown, 0x1234_5678, b"hello");
        patched(base(), 504, &unknown)
    }

    #[test]
    fn unknown_extension_round_trip() {
        let bytes = with_unknown_extension();
        let header = parse_bytes(&bytes).unwrap();
        let unknown = HeaderExtension {
            magic: 0x1234_5678,
            data: b"hello".to_vec(),
        };
        assert_eq!(header.extensions, [qemu_feature_table(), unknown.clone()]);
        let encoded = header.encode().unwrap();
        assert_eq!(encoded, bytes[..encoded.len()]);
        assert_eq!(parse_bytes(&encoded).unwrap(), header);

        // Adding a backing file keeps the unknown extension, after the QEMU-ordered known ones.
        let mut header = header;
        header.set_backing(Some("b.qcow2".to_string()), Some("raw".to_string()));
        let reparsed = parse_bytes(&header.encode().unwrap()).unwrap();
        assert_eq!(reparsed, header);
        let magics: Vec<u32> = reparsed.extensions.iter().map(|e| e.magic).collect();
        assert_eq!(
            magics,
            [ext::BACKING_FORMAT, ext::FEATURE_NAMES, 0x1234_5678]
        );
        assert_eq!(reparsed.backing_file.as_deref(), Some("b.qcow2"));
        assert_eq!(reparsed.backing_format.as_deref(), Some("raw"));
    }

    /// Writes `header` over cluster 0 of a copy of `image` and returns QEMU's view of the result.
    fn qemu_info_after_rewrite(image: &[u8], header: &Header) -> serde_json::Value {
        let dir = tempfile::tempdir().unwrap();
        let mut bytes = image.to_vec();
        let encoded = header.encode().unwrap();
        bytes[..header.cluster_size() as usize].fill(0);
        bytes[..encoded.len()].copy_from_slice(&encoded);
        std::fs::write(dir.path().join("img.qcow2"), &bytes).unwrap();
        // `check` opens the backing file.
        qemu_img(
            dir.path(),
            &["create", "-q", "-f", "qcow2", "other.qcow2", "64M"],
        );
        qemu_img(dir.path(), &["check", "-q", "img.qcow2"]);
        qemu_img_json(dir.path(), &["info", "--output=json", "img.qcow2"])
    }

    /// Found by the `header` fuzz target: with a `header_length` that is not a multiple of 8,
    /// extensions are padded from their own start (QEMU's layout), not to absolute 8-byte
    /// boundaries; the rewrite used to leave every extension after the first where no reader
    /// looks.
    #[test]
    fn odd_header_length_round_trip() {
        let bytes = with_header_bytes(&with_unknown_extension(), 112, &[1, 2, 3]);
        let header = parse_bytes(&bytes).unwrap();
        assert_eq!(header.header_length, 115);
        assert_eq!(header.unknown_header_bytes, [1, 2, 3]);
        assert_eq!(header.extensions.len(), 2, "{:?}", header.extensions);
        let encoded = header.encode().unwrap();
        assert_eq!(encoded, bytes[..encoded.len()]);
        assert_eq!(parse_bytes(&encoded).unwrap(), header);
        // QEMU reads the rewritten header the same way: the backing format (the first extension)
        // and the backing name, after the feature table and the unknown extension.
        let mut header = header;
        header.set_backing(Some("other.qcow2".to_string()), Some("qcow2".to_string()));
        assert_eq!(parse_bytes(&header.encode().unwrap()).unwrap(), header);
        // (Over the image without the inserted bytes, whose clusters are where its tables say.)
        let info = qemu_info_after_rewrite(&with_unknown_extension(), &header);
        assert_eq!(info["backing-filename"], "other.qcow2");
        assert_eq!(info["backing-filename-format"], "qcow2");
    }

    #[test]
    fn qemu_reads_rewritten_headers() {
        let mut header = parse_bytes(&with_unknown_extension()).unwrap();
        header.set_backing(Some("other.qcow2".to_string()), Some("qcow2".to_string()));
        let info = qemu_info_after_rewrite(&with_unknown_extension(), &header);
        assert_eq!(info["backing-filename"], "other.qcow2");
        assert_eq!(info["backing-filename-format"], "qcow2");
        assert_eq!(info["virtual-size"], 64 * MIB);

        let mut header = parse_bytes(overlay()).unwrap();
        header.set_backing(None, None);
        assert_eq!(
            (header.backing_file_offset, header.backing_file_size),
            (0, 0)
        );
        let info = qemu_info_after_rewrite(overlay(), &header);
        assert!(info.get("backing-filename").is_none());
    }

    #[test]
    fn encode_refuses_what_does_not_fit() {
        let bytes = create("cluster_size=512", &[]);
        let mut header = parse_bytes(&bytes).unwrap();
        header.set_backing(Some("x".repeat(1000)), None);
        assert_eq!(
            header.encode(),
            Err(HeaderError::DoesNotFit {
                needed: 112 + 8 + 1000,
                cluster_size: 512
            })
        );
        let mut header = parse_bytes(base()).unwrap();
        header.set_backing(Some("x".repeat(1024)), None);
        assert!(matches!(
            header.encode(),
            Err(HeaderError::BackingFileNameTooLong {
                size: 1024,
                max: 1023,
                ..
            })
        ));
        header.set_backing(
            Some("x".to_string()),
            Some("a-very-long-format".to_string()),
        );
        assert!(matches!(
            header.encode(),
            Err(HeaderError::BackingFormat { len: 18, .. })
        ));
    }

    #[test]
    fn encode_refuses_v3_fields_in_v2() {
        let mut header = parse_bytes(&create("compat=0.10", &[])).unwrap();
        header.compatible_features = compatible::LAZY_REFCOUNTS;
        assert_eq!(
            header.encode(),
            Err(HeaderError::NotInVersion2 {
                field: "compatible_features",
                value: 1
            })
        );
    }

    // ---- bad-inputs.md, rows 1 to 23 ----

    #[test]
    fn row01_magic() {
        assert_eq!(
            parse_err(&patched(base(), 0, b"QFI\0")),
            HeaderError::BadMagic { found: 0x5146_4900 }
        );
        assert_eq!(parse_err(&[]), HeaderError::BadMagic { found: 0 });
    }

    #[test]
    fn row02_version() {
        for version in [1, 4] {
            let error = parse_err(&with_u32(base(), 4, version));
            assert_eq!(error, HeaderError::UnsupportedVersion { version });
            assert_eq!(
                error.to_string(),
                format!("unsupported qcow2 version {version} (snapfs reads versions 2 and 3)")
            );
        }
    }

    #[test]
    fn row03_cluster_bits() {
        for bits in [8, 22] {
            assert_eq!(
                parse_err(&with_u32(base(), 20, bits)),
                HeaderError::ClusterBits { bits }
            );
        }
    }

    #[test]
    fn row04_header_length() {
        let error = parse_err(&with_u32(base(), 100, 0xffff_ffff));
        assert!(
            matches!(&error, HeaderError::HeaderLength { length: 0xffff_ffff, reason } if reason.contains("exceeds"))
        );
        let error = parse_err(&with_u32(base(), 100, 100));
        assert!(
            matches!(&error, HeaderError::HeaderLength { length: 100, reason } if reason.contains("too short"))
        );
    }

    #[test]
    fn row05_unknown_incompatible_bit() {
        let error = parse_err(&with_u64(base(), 72, 1 << 63));
        assert_eq!(
            error,
            HeaderError::UnknownIncompatible {
                mask: 1 << 63,
                names: Vec::new(),
                unnamed: 1 << 63
            }
        );
        assert!(
            error
                .to_string()
                .contains("unknown incompatible feature: 8000000000000000")
        );

        // A feature table entry naming the bit gives the name instead. Entry 0 (dirty bit) becomes
        // incompatible bit 40, "time travel".
        let mut entry = [0u8; 48];
        entry[1] = 40;
        entry[2..13].copy_from_slice(b"time travel");
        let bytes = patched(base(), 120, &entry);
        let error = parse_err(&with_u64(&bytes, 72, 1 << 40 | 1 << 41));
        assert_eq!(
            error,
            HeaderError::UnknownIncompatible {
                mask: 1 << 40 | 1 << 41,
                names: vec!["time travel".to_string()],
                unnamed: 1 << 41
            }
        );
        assert_eq!(
            error.to_string(),
            "unsupported qcow2 feature(s): time travel, unknown incompatible feature: 20000000000"
        );
    }

    #[test]
    fn row06_corrupt_bit_is_not_a_parse_error() {
        let header = parse_bytes(&with_u64(base(), 72, incompatible::CORRUPT)).unwrap();
        assert!(header.is_corrupt());
        assert!(!header.is_dirty());
        let header = parse_bytes(&with_u64(base(), 72, incompatible::DIRTY)).unwrap();
        assert!(header.is_dirty());
    }

    #[test]
    fn row07_compression_type() {
        assert_eq!(
            parse_err(&patched(base(), 104, &[1])),
            HeaderError::CompressionBit {
                compression_type: 1,
                bit_set: false
            }
        );
        assert_eq!(
            parse_err(&patched(base(), 104, &[7])),
            HeaderError::UnknownCompressionType { value: 7 }
        );
        let error = parse_err(&with_u64(base(), 72, incompatible::COMPRESSION_TYPE));
        assert_eq!(
            error,
            HeaderError::CompressionBit {
                compression_type: 0,
                bit_set: true
            }
        );
        assert!(error.to_string().contains("must not be set"));
    }

    #[test]
    fn row08_extended_l2_with_512_byte_clusters() {
        let bytes = create("cluster_size=512", &[]);
        assert_eq!(
            parse_err(&with_u64(&bytes, 72, incompatible::EXTENDED_L2)),
            HeaderError::SubclusterSize {
                cluster_size: 512,
                subcluster_size: 16
            }
        );
    }

    #[test]
    fn row09_refcount_order() {
        assert_eq!(
            parse_err(&with_u32(base(), 96, 7)),
            HeaderError::RefcountOrder { order: 7 }
        );
    }

    #[test]
    fn row10_backing_file_offset() {
        assert_eq!(
            parse_err(&with_u64(base(), 8, u64::MAX)),
            HeaderError::BackingFileOffset {
                offset: u64::MAX,
                cluster_size: 65536
            }
        );
    }

    #[test]
    fn row11_backing_file_name_too_long() {
        let bytes = with_u64(base(), 8, 0x1000);
        assert_eq!(
            parse_err(&with_u32(&bytes, 16, 0xffff_ffff)),
            HeaderError::BackingFileNameTooLong {
                offset: 0x1000,
                size: 0xffff_ffff,
                max: 1023
            }
        );
    }

    #[test]
    fn row12_extension_too_large() {
        assert_eq!(
            parse_err(&with_u32(base(), 116, 0x7fff_ffff)),
            HeaderError::ExtensionTooLarge {
                magic: ext::FEATURE_NAMES,
                offset: 112,
                len: 0x7fff_ffff,
                area_end: 65536
            }
        );
        // The area ends at the backing file name.
        let bytes = with_u32(overlay(), 0x74, 0x210);
        assert!(matches!(
            parse_err(&bytes),
            HeaderError::ExtensionTooLarge {
                area_end: 0x210,
                ..
            }
        ));
    }

    #[test]
    fn row13_backing_format_too_long() {
        let error = parse_err(&with_u32(overlay(), 0x74, 64));
        assert!(matches!(error, HeaderError::BackingFormat { len: 64, .. }));
        assert!(error.to_string().contains("length 64"));
    }

    #[test]
    fn row14_refcount_table_clusters() {
        assert_eq!(
            parse_err(&with_u32(base(), 56, 0xffff_ffff)),
            HeaderError::TableTooLarge {
                table: "reference count table",
                field: "refcount_table_clusters",
                value: 0xffff_ffff,
                max: 128
            }
        );
        assert_eq!(
            parse_err(&with_u32(base(), 56, 0)),
            HeaderError::NoRefcountTable
        );
    }

    #[test]
    fn row15_refcount_table_offset() {
        assert_eq!(
            parse_err(&with_u64(base(), 48, 0x1234_5678_90ab_cdef)),
            HeaderError::TableOffset {
                table: "reference count table",
                offset: 0x1234_5678_90ab_cdef,
                reason: "it is not aligned to the cluster size"
            }
        );
        // Aligned, but the table would end past i64::MAX.
        let offset = 0x7fff_ffff_ffff_0000;
        assert!(matches!(
            parse_err(&with_u64(base(), 48, offset)),
            HeaderError::TableOffset { table: "reference count table", offset: o, .. } if o == offset
        ));
    }

    #[test]
    fn row16_nb_snapshots() {
        assert_eq!(
            parse_err(&with_u32(base(), 60, 0xffff_ffff)),
            HeaderError::TableTooLarge {
                table: "snapshot table",
                field: "nb_snapshots",
                value: 0xffff_ffff,
                max: 65536
            }
        );
        // 65536 snapshots are allowed (at a place other than the header).
        let many = with_u32(base(), 60, 65536);
        assert!(parse_bytes(&with_u64(&many, 64, 0x50000)).is_ok());
    }

    #[test]
    fn row17_snapshots_offset_unaligned() {
        assert!(matches!(
            parse_err(&with_u64(base(), 64, 0x1234)),
            HeaderError::TableOffset {
                table: "snapshot table",
                offset: 0x1234,
                ..
            }
        ));
    }

    #[test]
    fn row18_l1_size() {
        assert_eq!(
            parse_err(&with_u32(base(), 36, 0xffff_ffff)),
            HeaderError::TableTooLarge {
                table: "active L1 table",
                field: "l1_size",
                value: 0xffff_ffff,
                max: 4 * MIB
            }
        );
        assert_eq!(
            parse_err(&with_u32(base(), 36, 0)),
            HeaderError::L1TooSmall {
                l1_size: 0,
                size: 64 * MIB,
                needed: 1
            }
        );
    }

    #[test]
    fn row18_l1_size_with_extended_l2() {
        // 16-byte L2 entries: one L1 entry maps 256 MiB instead of 512 MiB.
        let bytes = with_u64(&create("extended_l2=on", &[]), 24, 512 * MIB);
        assert_eq!(
            parse_err(&bytes),
            HeaderError::L1TooSmall {
                l1_size: 1,
                size: 512 * MIB,
                needed: 2
            }
        );
        assert!(parse_bytes(&with_u64(base(), 24, 512 * MIB)).is_ok());
    }

    #[test]
    fn row19_l1_table_offset_unaligned() {
        assert!(matches!(
            parse_err(&with_u64(base(), 40, 0x30001)),
            HeaderError::TableOffset {
                table: "active L1 table",
                offset: 0x30001,
                ..
            }
        ));
    }

    #[test]
    fn tables_at_the_header_are_refused() {
        for (at, table) in [(40, "active L1 table"), (48, "reference count table")] {
            let e = parse_err(&with_u64(base(), at, 0));
            assert!(
                matches!(e, HeaderError::TableOffset { table: t, offset: 0, .. } if t == table),
                "{e:?}"
            );
            assert!(e.to_string().contains("header (cluster 0)"), "{e}");
        }
        // The snapshot table only when it has entries (nb_snapshots = 0 at offset 0 is normal).
        let with_snapshots = with_u32(base(), 60, 1);
        let e = parse_err(&with_u64(&with_snapshots, 64, 0));
        assert!(e.to_string().contains("snapshot table offset 0x0"), "{e}");
        assert!(parse_bytes(&with_u64(base(), 64, 0)).is_ok());
        // An empty active L1 table may be anywhere aligned (a 0-byte disk).
        let empty = with_u64(&with_u32(base(), 36, 0), 24, 0);
        assert!(parse_bytes(&with_u64(&empty, 40, 0)).is_ok());
    }

    #[test]
    fn row20_image_too_big() {
        // 64 KiB clusters: one L1 entry maps 2^29 bytes, so 2^62 needs 2^33 entries.
        assert_eq!(
            parse_err(&with_u64(base(), 24, 1 << 62)),
            HeaderError::ImageTooBig {
                size: 1 << 62,
                l1_entries: 1 << 33
            }
        );
        assert!(matches!(
            parse_err(&with_u64(&create("cluster_size=2M", &[]), 24, u64::MAX)),
            HeaderError::ImageTooBig { size: u64::MAX, .. }
        ));
    }

    #[test]
    fn row21_crypt_method() {
        assert_eq!(
            parse_err(&with_u32(base(), 32, 2)),
            HeaderError::MissingCryptoHeader { method: 2 }
        );
        assert_eq!(
            parse_err(&with_u32(base(), 32, 9)),
            HeaderError::EncryptionMethod { method: 9 }
        );
        assert_eq!(
            parse_err(&with_u32(base(), 32, 1)),
            HeaderError::Encrypted {
                method: 1,
                name: "AES"
            }
        );
    }

    #[test]
    fn row22_external_data_file() {
        let error = parse_err(&with_u64(base(), 72, incompatible::EXTERNAL_DATA_FILE));
        assert_eq!(error, HeaderError::ExternalDataFile { name: None });
        assert!(error.to_string().contains("'data-file' is required"));
        assert_eq!(
            parse_err(&with_u64(base(), 88, autoclear::DATA_FILE_RAW)),
            HeaderError::DataFileRawWithoutDataFile {
                autoclear: autoclear::DATA_FILE_RAW
            }
        );
    }

    #[test]
    fn row23_bitmaps_extension_with_zero_bitmaps() {
        let dir = tempfile::tempdir().unwrap();
        qemu_img(
            dir.path(),
            &["create", "-q", "-f", "qcow2", "img.qcow2", "64M"],
        );
        qemu_img(dir.path(), &["bitmap", "--add", "img.qcow2", "b0"]);
        let bytes = read(dir.path(), "img.qcow2");
        // Feature table ends at 504: the bitmaps extension's data starts at 512.
        assert_eq!(
            u32::from_be_bytes(bytes[504..508].try_into().unwrap()),
            ext::BITMAPS
        );
        let error = parse_err(&with_u32(&bytes, 512, 0));
        assert!(matches!(
            error,
            HeaderError::BitmapsExtension {
                field: "nb_bitmaps",
                value: 0,
                ..
            }
        ));
        assert!(error.to_string().contains("zero bitmaps"));
        assert!(matches!(
            parse_err(&with_u64(&bytes, 528, 0x1234)),
            HeaderError::BitmapsExtension {
                field: "bitmap_directory_offset",
                ..
            }
        ));
        assert!(matches!(
            parse_err(&with_u32(&bytes, 516, 1)),
            HeaderError::BitmapsExtension {
                field: "reserved",
                ..
            }
        ));
    }

    // ---- Backing file name ----

    #[test]
    fn backing_file_name_must_be_utf8_without_nul() {
        let error = parse_err(&patched(overlay(), 0x210, &[0xff]));
        assert!(
            matches!(&error, HeaderError::BackingFileName { offset: 0x210, size: 10, reason } if reason.contains("UTF-8"))
        );
        let error = parse_err(&patched(overlay(), 0x211, &[0]));
        assert!(
            matches!(&error, HeaderError::BackingFileName { reason, .. } if reason.contains("NUL"))
        );
    }

    #[test]
    fn backing_file_name_past_end_of_file() {
        let bytes = &overlay()[..0x215];
        assert!(matches!(
            parse_err(bytes),
            HeaderError::BackingFileName {
                offset: 0x210,
                size: 10,
                ..
            }
        ));
    }

    #[test]
    fn crypto_extension_without_luks() {
        let mut fde = Vec::new();
        push_extension(&mut fde, ext::FULL_DISK_ENCRYPTION, &[0; 16]);
        let bytes = patched(base(), 504, &fde);
        assert!(matches!(
            parse_err(&bytes),
            HeaderError::CryptoExtension { .. }
        ));
    }

    #[test]
    fn every_message_is_one_line() {
        let errors = [
            HeaderError::UnknownIncompatible {
                mask: 3 << 5,
                names: vec!["a".into(), "b".into()],
                unnamed: 0,
            },
            HeaderError::ExternalDataFile {
                name: Some("d".into()),
            },
            HeaderError::CompressionBit {
                compression_type: 1,
                bit_set: false,
            },
        ];
        for error in errors {
            assert!(!error.to_string().contains('\n'));
        }
    }

    // ---- Hostile input never panics ----

    /// Offsets and widths of the header fields, for targeted mutations.
    const FIELDS: [(usize, usize); 19] = [
        (0, 4),
        (4, 4),
        (8, 8),
        (16, 4),
        (20, 4),
        (24, 8),
        (32, 4),
        (36, 4),
        (40, 8),
        (48, 8),
        (56, 4),
        (60, 4),
        (64, 8),
        (72, 8),
        (80, 8),
        (88, 8),
        (96, 4),
        (100, 4),
        (104, 1),
    ];

    fn exercise(bytes: &[u8]) {
        if let Ok(header) = parse_bytes(bytes) {
            if let Ok(encoded) = header.encode() {
                parse_bytes(&encoded).unwrap();
            }
        }
    }

    proptest! {
        #[test]
        fn random_byte_mutations_never_panic(
            use_overlay in any::<bool>(),
            bytes in proptest::collection::vec((0usize..1024, any::<u8>()), 1..16),
        ) {
            let mut image = if use_overlay { overlay() } else { base() }[..65536].to_vec();
            for (offset, value) in bytes {
                image[offset] = value;
            }
            exercise(&image);
        }

        #[test]
        fn random_field_values_never_panic(
            fields in proptest::collection::vec((0usize..FIELDS.len(), any::<u64>()), 1..6),
            truncate in prop_oneof![Just(usize::MAX), 0usize..1024],
        ) {
            let mut image = overlay()[..65536].to_vec();
            for (field, value) in fields {
                let (offset, width) = FIELDS[field];
                image[offset..offset + width].copy_from_slice(&value.to_be_bytes()[8 - width..]);
            }
            image.truncate(truncate);
            exercise(&image);
        }

        #[test]
        fn random_extension_area_never_panics(
            area in proptest::collection::vec(any::<u8>(), 0..600),
            backing_offset in prop_oneof![Just(0u64), 0u64..2048],
            backing_size in 0u32..2048,
        ) {
            let mut image = base()[..65536].to_vec();
            image[112..112 + area.len()].copy_from_slice(&area);
            image[8..16].copy_from_slice(&backing_offset.to_be_bytes());
            image[16..20].copy_from_slice(&backing_size.to_be_bytes());
            exercise(&image);
        }
    }
}
