//! Why a header is refused, in words that name the field and the value.

use std::fmt::Write as _;

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
