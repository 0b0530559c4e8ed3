//! Format limits, each defined once, with the names QEMU gives them (`block/qcow2.h`). What the
//! spec fixes and what QEMU's implementation adds are both here: snapfs refuses what QEMU refuses.

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
/// `QCOW_MAX_REFTABLE_SIZE`.
pub const MAX_REFTABLE_BYTES: u64 = 8 << 20;
/// `QCOW_MAX_L1_SIZE`: an L1 table larger than 32 MiB is refused, in the header, in a
/// snapshot, and when the disk grows.
pub const MAX_L1_BYTES: u64 = 32 << 20;
/// [`MAX_L1_BYTES`] in entries ("Snapshot L1 table too large" beyond it).
pub const MAX_L1_ENTRIES: u32 = (MAX_L1_BYTES / L1_ENTRY_SIZE) as u32;
/// Size of one L1 (and standard L2) entry.
pub const L1_ENTRY_SIZE: u64 = 8;
/// Size of one refcount table entry.
pub const REFTABLE_ENTRY_SIZE: u64 = 8;
/// `QCOW_MAX_SNAPSHOTS`.
pub const MAX_SNAPSHOTS: u32 = 65536;
/// `QCOW_MAX_SNAPSHOTS_SIZE`: the snapshot table is at most 64 MiB.
pub const MAX_SNAPSHOT_TABLE_BYTES: u64 = 64 << 20;
/// `QCOW_MAX_SNAPSHOT_EXTRA_DATA`: more extra data per snapshot stops the open.
pub const MAX_SNAPSHOT_EXTRA_DATA: u32 = 1024;
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
