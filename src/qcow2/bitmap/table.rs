//! Bitmap tables: "a one-level structure ... for the mapping of bitmap data to host clusters",
//! contiguous in the file, one big-endian u64 per cluster of bitmap data:
//! ```text
//! bit      0: reserved and zero if bits 9 - 55 are non-zero; if they are zero,
//!             0: the cluster reads as all zeros, 1: as all ones
//! bits  1- 8: reserved, zero
//! bits 9-55: the data cluster's host offset (cluster aligned; 0: unallocated)
//! bits 56-63: reserved, zero
//! ```
//! QEMU (`check_table_entry`) refuses reserved bits, bit 0 with an offset, and unaligned offsets;
//! snapfs also refuses a data cluster past the end of the file.

use std::collections::HashMap;

use super::constraints::EntryProblem;
use super::directory::BitmapEntry;
use super::error::BitmapError;
use super::read::ReadAt;
use super::{ImageLayout, limits};
use crate::qcow2::HostOffset;

/// QEMU's `BME_TABLE_ENTRY_RESERVED_MASK`: bits 1-8 and 56-63.
const RESERVED_MASK: u64 = 0xff00_0000_0000_01fe;
/// `BME_TABLE_ENTRY_OFFSET_MASK`: bits 9-55.
const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// `BME_TABLE_ENTRY_FLAG_ALL_ONES`.
const ALL_ONES: u64 = 1;

/// One bitmap table entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TableEntry {
    /// Offset 0, bit 0 clear: the cluster reads as all zeros (QEMU writes this for every cluster
    /// of bitmap data without a set bit).
    Zeros,
    /// Offset 0, bit 0 set: the cluster reads as all ones (QEMU reads it, never writes it).
    Ones,
    /// A data cluster.
    Data(HostOffset),
}

/// Why a table entry was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TableEntryProblem {
    #[error("reserved bits {bits:#018x} are set")]
    ReservedBits { bits: u64 },
    #[error("bit 0 (all ones) is set together with a data cluster offset")]
    OnesWithOffset,
    #[error(
        "the data cluster offset {offset:#x} is not a multiple of the cluster size {cluster_size}"
    )]
    Unaligned { offset: u64, cluster_size: u64 },
    #[error("the data cluster at {offset:#x} runs past the end of the file ({file_len} bytes)")]
    OutsideFile { offset: u64, file_len: u64 },
    #[error(
        "the data cluster at {offset:#x} is also entry {first}'s (each cluster holds one part of the bitmap)"
    )]
    Repeated { offset: u64, first: u64 },
}

impl TableEntry {
    /// Decodes a raw (host-order) entry of an image of this layout.
    pub fn decode(raw: u64, layout: &ImageLayout) -> Result<TableEntry, TableEntryProblem> {
        let reserved = raw & RESERVED_MASK;
        if reserved != 0 {
            return Err(TableEntryProblem::ReservedBits { bits: reserved });
        }
        let offset = raw & OFFSET_MASK;
        if offset == 0 {
            return Ok(if raw & ALL_ONES != 0 {
                TableEntry::Ones
            } else {
                TableEntry::Zeros
            });
        }
        if raw & ALL_ONES != 0 {
            return Err(TableEntryProblem::OnesWithOffset);
        }
        let cluster_size = layout.cluster_size();
        if offset % cluster_size != 0 {
            return Err(TableEntryProblem::Unaligned {
                offset,
                cluster_size,
            });
        }
        if !layout.inside_file(offset, cluster_size) {
            return Err(TableEntryProblem::OutsideFile {
                offset,
                file_len: layout.file_len,
            });
        }
        Ok(TableEntry::Data(HostOffset(offset)))
    }

    /// The raw (host-order) entry.
    pub fn encode(self) -> u64 {
        match self {
            TableEntry::Zeros => 0,
            TableEntry::Ones => ALL_ONES,
            TableEntry::Data(offset) => offset.0 & OFFSET_MASK,
        }
    }
}

/// Reads and decodes the bitmap table of `entry`. Every entry is checked, and no data cluster may
/// appear twice. The table must lie inside the file and within QEMU's size limit (512 MiB of
/// bitmap data: at most 8 MiB of table), and so must the data: a bitmap loaded from it takes no
/// more memory than the file's size.
pub fn read_table(
    reader: &impl ReadAt,
    entry: &BitmapEntry,
    layout: &ImageLayout,
) -> Result<Vec<TableEntry>, BitmapError> {
    let cluster_size = layout.cluster_size();
    let data_bytes = u64::from(entry.table_size) * cluster_size;
    if data_bytes > limits::MAX_PHYS_SIZE {
        return Err(BitmapError::Entry {
            name: entry.name_lossy(),
            problem: EntryProblem::PhysicalSize {
                table_size: entry.table_size,
                cluster_size,
                bytes: data_bytes,
            },
        });
    }
    let len = u64::from(entry.table_size) * 8;
    if !layout.inside_file(entry.table_offset, len) {
        return Err(BitmapError::Entry {
            name: entry.name_lossy(),
            problem: EntryProblem::TableOutsideFile {
                offset: entry.table_offset,
                bytes: len,
                file_len: layout.file_len,
            },
        });
    }
    // len <= 8 MiB (checked above).
    let mut bytes = vec![0u8; len as usize];
    reader
        .read_at(&mut bytes, entry.table_offset)
        .map_err(|source| BitmapError::Read {
            name: entry.name_lossy(),
            what: "the bitmap table",
            offset: entry.table_offset,
            len,
            source,
        })?;
    let mut seen: HashMap<u64, u64> = HashMap::new();
    let mut table = Vec::with_capacity(entry.table_size as usize);
    for (index, word) in bytes.chunks_exact(8).enumerate() {
        let index = index as u64;
        let mut raw = [0u8; 8];
        raw.copy_from_slice(word);
        let raw = u64::from_be_bytes(raw);
        let refused = |problem| BitmapError::TableEntry {
            name: entry.name_lossy(),
            index,
            raw,
            problem,
        };
        let decoded = TableEntry::decode(raw, layout).map_err(refused)?;
        if let TableEntry::Data(offset) = decoded
            && let Some(&first) = seen.get(&offset.0)
        {
            return Err(refused(TableEntryProblem::Repeated {
                offset: offset.0,
                first,
            }));
        }
        if let TableEntry::Data(offset) = decoded {
            seen.insert(offset.0, index);
        }
        table.push(decoded);
    }
    Ok(table)
}

/// The table's bytes as stored: big-endian entries.
pub fn encode_table(entries: &[TableEntry]) -> Vec<u8> {
    entries
        .iter()
        .flat_map(|e| e.encode().to_be_bytes())
        .collect()
}
