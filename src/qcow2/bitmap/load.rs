//! From bitmap-table clusters to the in-memory bitmap (QEMU's `load_bitmap_data`).
//!
//! "If bits 9 - 55 are zero, then the cluster is unallocated ... bit 0 ... 0: the cluster
//! should be read as all zeros, 1: the cluster should be read as all ones." Only a bitmap that is
//! well formed and consistent ([`Role::loadable`]) is loaded: the data of an `in_use` bitmap
//! "may be inconsistent" and QEMU never reads it.

use super::ImageLayout;
use super::directory::BitmapEntry;
use super::dirty::DirtyBitmap;
use super::error::BitmapError;
use super::flags::Role;
use super::read::ReadAt;
use super::table::{TableEntry, read_table};

/// Loads the data of `entry` into a bitmap over the layout's disk.
pub fn load_bitmap(
    reader: &impl ReadAt,
    entry: &BitmapEntry,
    layout: &ImageLayout,
) -> Result<DirtyBitmap, BitmapError> {
    let role = Role::of(entry, layout);
    if !role.loadable() {
        let reason = match role {
            Role::Unusable(problem) => problem.to_string(),
            _ => "it is in_use: it was not saved correctly and may be inconsistent".to_string(),
        };
        return Err(BitmapError::NotLoadable {
            name: entry.name_lossy(),
            reason,
        });
    }
    let table = read_table(reader, entry, layout)?;
    let granularity_bits = u32::from(entry.granularity_bits);
    // Bounded by the constraints: at most 512 MiB, and table_size clusters cover it.
    let len = DirtyBitmap::serialized_len(layout.virtual_size, granularity_bits) as usize;
    let mut bytes = vec![0u8; len];
    let cluster_size = layout.cluster_size() as usize;
    for (index, table_entry) in table.iter().enumerate() {
        let start = index.saturating_mul(cluster_size).min(len);
        let end = start.saturating_add(cluster_size).min(len);
        let chunk = &mut bytes[start..end];
        if chunk.is_empty() {
            break;
        }
        match *table_entry {
            TableEntry::Zeros => {}
            TableEntry::Ones => chunk.fill(0xff),
            TableEntry::Data(offset) => {
                reader
                    .read_at(chunk, offset.0)
                    .map_err(|source| BitmapError::Read {
                        name: entry.name_lossy(),
                        what: "a bitmap data cluster",
                        offset: offset.0,
                        len: chunk.len() as u64,
                        source,
                    })?;
            }
        }
    }
    DirtyBitmap::from_bytes(layout.virtual_size, granularity_bits, bytes)
}
