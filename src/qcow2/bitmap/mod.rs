//! Persistent dirty bitmaps (qcow2's `bitmaps` header extension): the bitmap directory, bitmap
//! tables, the in-memory dirty bitmap and the rules for which bitmaps a writer maintains.
//!
//! From the spec (`docs/interop/qcow2.rst`, "Bitmaps"): "All stored bitmaps are related to the
//! virtual disk stored in the same image, so each bitmap size is equal to the virtual disk size.
//! ... For bit number bit_nr the corresponding range (in bytes) will be
//! `[bit_nr * bitmap_granularity .. (bit_nr + 1) * bitmap_granularity - 1]`." The header
//! extension points at a *bitmap directory* (one variable-length entry per bitmap); each entry
//! points at a *bitmap table* (one u64 per cluster of bitmap data); each table entry is a data
//! cluster, or a cluster that reads as all zeros or all ones.
//!
//! The parts, one job each:
//! - `directory`: the directory's entries, parsed with QEMU's checks and encoded back;
//! - `constraints`: what QEMU's `check_dir_entry` and loading demand of one entry;
//! - `flags`: the entry flags, and which bitmaps snapfs maintains and which it leaves alone;
//! - `table`: bitmap table entries, read and encoded;
//! - `dirty`: the in-memory bitmap (set ranges, dirty ranges, merge, resize);
//! - `load`, `store`: between the in-memory bitmap and bitmap-table clusters;
//! - `read`: the one read-only trait through which this module reads the image file;
//! - `error`: what was refused, naming the field and the value.
//!
//! Nothing here writes to an image: storing produces the bytes to write and the table entries that
//! point at them; allocating clusters and ordering the writes is the write path's job (see
//! docs/bitmaps.md).

mod constraints;
mod directory;
mod dirty;
mod error;
mod flags;
mod load;
mod read;
mod store;
mod table;

pub use constraints::{EntryProblem, table_size_for};
pub use directory::{BitmapEntry, Directory, extension_data};
pub use dirty::{DirtyBitmap, DirtyRanges};
pub use error::BitmapError;
pub use flags::{Flags, Role};
pub use load::load_bitmap;
pub use read::ReadAt;
pub use store::{StoredChunk, stored_chunks};
pub use table::{TableEntry, TableEntryProblem, encode_table, read_table};

use super::header::Header;

/// QEMU's limits for bitmaps (`block/qcow2-bitmap.c`, `BME_*`, and `block/qcow2.h`).
pub mod limits {
    /// `BME_MAX_TABLE_SIZE`: entries of one bitmap table.
    pub const MAX_TABLE_SIZE: u32 = 0x0800_0000;
    /// `BME_MAX_PHYS_SIZE`: bytes of one bitmap's data, "restrict BdrvDirtyBitmap size in RAM".
    pub const MAX_PHYS_SIZE: u64 = 0x2000_0000;
    /// `BME_MIN_GRANULARITY_BITS`: the spec allows 0..=63, "QEMU currently supports only values
    /// 9 - 31".
    pub const MIN_GRANULARITY_BITS: u8 = 9;
    /// `BME_MAX_GRANULARITY_BITS`.
    pub const MAX_GRANULARITY_BITS: u8 = 31;
    /// `BME_MAX_NAME_SIZE`: "QEMU currently doesn't support values greater than 1023".
    pub const MAX_NAME_SIZE: u16 = 1023;
    /// `QCOW2_MAX_BITMAPS`.
    pub const MAX_BITMAPS: u32 = crate::qcow2::header::limits::MAX_BITMAPS;
    /// `QCOW2_MAX_BITMAP_DIRECTORY_SIZE`.
    pub const MAX_DIRECTORY_SIZE: u64 = crate::qcow2::header::limits::MAX_BITMAP_DIRECTORY_SIZE;
    /// The fixed part of a directory entry, before the extra data and the name.
    pub const ENTRY_HEADER_SIZE: usize = 24;
    /// `type` 1: "Dirty tracking bitmap"; "Values 0, 2 - 255 are reserved."
    pub const TYPE_DIRTY_TRACKING: u8 = 1;
}

/// What the bitmap checks need to know of the image: its cluster size, the virtual disk size the
/// bitmaps must cover and the file's real length (nothing is read, or sized in memory, from past
/// the end of the file).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageLayout {
    pub cluster_bits: u32,
    /// The disk size QEMU uses (`bdrv_getlength`): the header's size rounded down to 512 bytes.
    pub virtual_size: u64,
    pub file_len: u64,
}

impl ImageLayout {
    /// The layout of an image with this header and file length.
    pub fn of(header: &Header, file_len: u64) -> ImageLayout {
        ImageLayout {
            cluster_bits: header.cluster_bits,
            virtual_size: header.virtual_size(),
            file_len,
        }
    }

    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// Whether `len` bytes at `offset` lie inside the file (without overflow).
    pub fn inside_file(&self, offset: u64, len: u64) -> bool {
        offset
            .checked_add(len)
            .is_some_and(|end| end <= self.file_len)
    }
}
