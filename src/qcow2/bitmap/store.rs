//! From the in-memory bitmap to what is written (QEMU's `store_bitmap_data`): one bitmap-table
//! entry per cluster of serialized data; a cluster without a set bit is not written at all
//! (table entry 0, "read as all zeros"), every other one is written to a cluster of its own.
//! QEMU never writes the all-ones form, and neither does snapfs.
//!
//! Allocating the clusters and ordering the writes is the write path's job.

use super::dirty::DirtyBitmap;
use super::error::BitmapError;
use super::limits;

/// One cluster of a bitmap's serialized data, as it is to be stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoredChunk<'a> {
    /// No bit set: table entry 0, no cluster.
    Zeros,
    /// Bytes to write to a newly allocated cluster (the last chunk may be shorter than a
    /// cluster: the rest of the cluster is written as zeros).
    Data(&'a [u8]),
}

/// The chunks of `bitmap` for clusters of `cluster_bits`, one per bitmap-table entry; refuses a
/// bitmap whose table QEMU would not load (more than `BME_MAX_TABLE_SIZE` entries).
pub fn stored_chunks(
    bitmap: &DirtyBitmap,
    cluster_bits: u32,
) -> Result<Vec<StoredChunk<'_>>, BitmapError> {
    let table_size =
        super::table_size_for(bitmap.disk_size(), bitmap.granularity_bits(), cluster_bits);
    if table_size > u64::from(limits::MAX_TABLE_SIZE) || table_size == 0 {
        return Err(BitmapError::Unstorable {
            disk_size: bitmap.disk_size(),
            granularity_bits: bitmap.granularity_bits(),
            reason: format!(
                "its table would have {table_size} entries (QEMU accepts 1..={})",
                limits::MAX_TABLE_SIZE
            ),
        });
    }
    let cluster_size = 1usize << cluster_bits.min(31);
    let bytes = bitmap.bytes();
    Ok((0..table_size as usize)
        .map(|index| {
            let start = (index * cluster_size).min(bytes.len());
            let end = (start + cluster_size).min(bytes.len());
            let chunk = &bytes[start..end];
            if chunk.iter().all(|b| *b == 0) {
                StoredChunk::Zeros
            } else {
                StoredChunk::Data(chunk)
            }
        })
        .collect())
}
