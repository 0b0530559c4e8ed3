//! What one directory entry must satisfy: QEMU's `check_dir_entry`, the extra-data rule and the
//! table-size rule of loading (`bitmap_list_load`, `load_bitmap_data`), the spec's non-empty
//! name, and snapfs's own rule that the bitmap table lies inside the file.
//!
//! QEMU refuses to open an image with any such entry ("Bitmap '%s' doesn't satisfy the
//! constraints"). snapfs keeps the entry as it is and never uses its data (see `Role`).

use super::ImageLayout;
use super::directory::BitmapEntry;
use super::flags::Flags;
use super::limits;

/// Why an entry's bitmap cannot be used, naming the field and the value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EntryProblem {
    #[error(
        "extra_data_size = {size}: bitmap extra data is not supported (QEMU refuses any; the spec leaves its meaning to extra_data_compatible)"
    )]
    ExtraData { size: u32 },

    #[error("bitmap_table_size = 0")]
    TableSizeZero,

    #[error("bitmap_table_offset = 0")]
    TableOffsetZero,

    #[error(
        "bitmap_table_offset = {offset:#x} is not a multiple of the cluster size {cluster_size}"
    )]
    TableOffsetUnaligned { offset: u64, cluster_size: u64 },

    #[error("bitmap_table_size = {size} exceeds the maximum of {max} entries", max = limits::MAX_TABLE_SIZE)]
    TableSizeTooLarge { size: u32 },

    #[error(
        "granularity_bits = {bits}: QEMU supports {}..={}",
        limits::MIN_GRANULARITY_BITS,
        limits::MAX_GRANULARITY_BITS
    )]
    Granularity { bits: u8 },

    #[error(
        "flags = {flags:#010x}: reserved bits {reserved:#010x} are set (QEMU reserves every bit but in_use and auto, extra_data_compatible included)"
    )]
    ReservedFlags { flags: u32, reserved: u32 },

    #[error("name_size = {size} exceeds the maximum of {}", limits::MAX_NAME_SIZE)]
    NameTooLong { size: u16 },

    #[error("name_size = 0 (the name must be non-empty)")]
    EmptyName,

    #[error("type = {kind}: only 1 (dirty tracking bitmap) is defined")]
    Type { kind: u8 },

    #[error(
        "bitmap_table_size = {table_size} clusters of {cluster_size} bytes is {bytes} bytes of bitmap data, more than the maximum of {max}",
        max = limits::MAX_PHYS_SIZE
    )]
    PhysicalSize {
        table_size: u32,
        cluster_size: u64,
        bytes: u64,
    },

    #[error(
        "bitmap_table_size = {table_size} with granularity_bits = {granularity_bits} covers {covers} bytes, less than the disk's {virtual_size}"
    )]
    TooSmall {
        table_size: u32,
        granularity_bits: u8,
        covers: u64,
        virtual_size: u64,
    },

    #[error(
        "bitmap_table_size = {table_size}, but a bitmap of granularity_bits = {granularity_bits} over {virtual_size} bytes needs exactly {expected}"
    )]
    TableSizeMismatch {
        table_size: u32,
        granularity_bits: u8,
        virtual_size: u64,
        expected: u64,
    },

    #[error(
        "the bitmap table at {offset:#x} ({bytes} bytes) runs past the end of the file ({file_len} bytes)"
    )]
    TableOutsideFile {
        offset: u64,
        bytes: u64,
        file_len: u64,
    },
}

/// The first problem of `entry`, in QEMU's order: extra data (checked before `check_dir_entry`),
/// then `check_dir_entry`'s conditions in field order, then the table size that loading demands
/// of a bitmap that is not `in_use`, then the file bounds.
///
/// QEMU applies every condition to `in_use` bitmaps too, except the two about the disk size: "it's
/// OK to have an invalid bitmap with invalid size due to a bitmap that was not correctly saved
/// after image resize", and `load_bitmap` skips the data of an `in_use` bitmap.
pub fn check(entry: &BitmapEntry, layout: &ImageLayout) -> Result<(), EntryProblem> {
    let cluster_size = layout.cluster_size();
    if !entry.extra_data.is_empty() {
        return Err(EntryProblem::ExtraData {
            size: entry.extra_data.len() as u32,
        });
    }
    if entry.table_size == 0 {
        return Err(EntryProblem::TableSizeZero);
    }
    if entry.table_offset == 0 {
        return Err(EntryProblem::TableOffsetZero);
    }
    if entry.table_offset % cluster_size != 0 {
        return Err(EntryProblem::TableOffsetUnaligned {
            offset: entry.table_offset,
            cluster_size,
        });
    }
    if entry.table_size > limits::MAX_TABLE_SIZE {
        return Err(EntryProblem::TableSizeTooLarge {
            size: entry.table_size,
        });
    }
    if !(limits::MIN_GRANULARITY_BITS..=limits::MAX_GRANULARITY_BITS)
        .contains(&entry.granularity_bits)
    {
        return Err(EntryProblem::Granularity {
            bits: entry.granularity_bits,
        });
    }
    let reserved = entry.flags.0 & Flags::RESERVED;
    if reserved != 0 {
        return Err(EntryProblem::ReservedFlags {
            flags: entry.flags.0,
            reserved,
        });
    }
    // name_size is u16 in the entry; the parser and the encoder keep names within it.
    let name_size = u16::try_from(entry.name.len()).unwrap_or(u16::MAX);
    if name_size > limits::MAX_NAME_SIZE {
        return Err(EntryProblem::NameTooLong { size: name_size });
    }
    if name_size == 0 {
        return Err(EntryProblem::EmptyName);
    }
    if entry.kind != limits::TYPE_DIRTY_TRACKING {
        return Err(EntryProblem::Type { kind: entry.kind });
    }
    // table_size <= 2^27 and cluster_size <= 2^21: the product fits easily.
    let bytes = u64::from(entry.table_size) * cluster_size;
    if bytes > limits::MAX_PHYS_SIZE {
        return Err(EntryProblem::PhysicalSize {
            table_size: entry.table_size,
            cluster_size,
            bytes,
        });
    }
    if !entry.flags.in_use() {
        // bytes <= 2^29, so bytes * 8 << 31 <= 2^63.
        let covers = (bytes * 8) << entry.granularity_bits;
        if layout.virtual_size > covers {
            return Err(EntryProblem::TooSmall {
                table_size: entry.table_size,
                granularity_bits: entry.granularity_bits,
                covers,
                virtual_size: layout.virtual_size,
            });
        }
        let expected = table_size_for(
            layout.virtual_size,
            entry.granularity_bits.into(),
            layout.cluster_bits,
        );
        if u64::from(entry.table_size) != expected {
            return Err(EntryProblem::TableSizeMismatch {
                table_size: entry.table_size,
                granularity_bits: entry.granularity_bits,
                virtual_size: layout.virtual_size,
                expected,
            });
        }
    }
    let table_bytes = u64::from(entry.table_size) * 8;
    if !layout.inside_file(entry.table_offset, table_bytes) {
        return Err(EntryProblem::TableOutsideFile {
            offset: entry.table_offset,
            bytes: table_bytes,
            file_len: layout.file_len,
        });
    }
    Ok(())
}

/// The bitmap table size QEMU computes for a bitmap (`size_to_clusters` of the serialization
/// size): one bit per granule of the disk, eight bits a byte, one table entry per cluster of
/// bytes. The serialization's rounding to 8-byte words never changes the cluster count, as
/// clusters are whole words.
pub fn table_size_for(virtual_size: u64, granularity_bits: u32, cluster_bits: u32) -> u64 {
    let bits = virtual_size.div_ceil(1u64 << granularity_bits.min(63));
    bits.div_ceil(8).div_ceil(1u64 << cluster_bits.min(63))
}
