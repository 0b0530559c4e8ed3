//! The header's fixed fields and where each lies in cluster 0: the one place that knows header
//! byte offsets. Parsing reads the fields at these offsets, encoding writes them there, and a
//! running image changes them with a [`FieldWrite`].
//!
//! From the spec ("Header"), all numbers big-endian:
//!
//! ```text
//!   0 -  3: magic                    36 - 39: l1_size
//!   4 -  7: version                  40 - 47: l1_table_offset
//!   8 - 15: backing_file_offset      48 - 55: refcount_table_offset
//!  16 - 19: backing_file_size        56 - 59: refcount_table_clusters
//!  20 - 23: cluster_bits             60 - 63: nb_snapshots
//!  24 - 31: size                     64 - 71: snapshots_offset
//!  32 - 35: crypt_method
//! version 3:
//!  72 - 79: incompatible_features    96 - 99: refcount_order
//!  80 - 87: compatible_features     100 -103: header_length
//!  88 - 95: autoclear_features           104: compression_type (if header_length > 104)
//! ```
//!
//! Fields that must change together lie side by side (l1_size and l1_table_offset; the refcount
//! table's offset and size; the snapshot count and offset), so that one write of at most one
//! sector changes both, and a crash leaves either the old pair or the new one. [`FieldWrite`]
//! offers exactly those groups.

/// A fixed field of the header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeaderField {
    Magic,
    Version,
    BackingFileOffset,
    BackingFileSize,
    ClusterBits,
    Size,
    CryptMethod,
    L1Size,
    L1TableOffset,
    RefcountTableOffset,
    RefcountTableClusters,
    NbSnapshots,
    SnapshotsOffset,
    IncompatibleFeatures,
    CompatibleFeatures,
    AutoclearFeatures,
    RefcountOrder,
    HeaderLength,
    CompressionType,
}

impl HeaderField {
    /// Where the field starts in cluster 0.
    pub const fn offset(self) -> u64 {
        match self {
            HeaderField::Magic => 0,
            HeaderField::Version => 4,
            HeaderField::BackingFileOffset => 8,
            HeaderField::BackingFileSize => 16,
            HeaderField::ClusterBits => 20,
            HeaderField::Size => 24,
            HeaderField::CryptMethod => 32,
            HeaderField::L1Size => 36,
            HeaderField::L1TableOffset => 40,
            HeaderField::RefcountTableOffset => 48,
            HeaderField::RefcountTableClusters => 56,
            HeaderField::NbSnapshots => 60,
            HeaderField::SnapshotsOffset => 64,
            HeaderField::IncompatibleFeatures => 72,
            HeaderField::CompatibleFeatures => 80,
            HeaderField::AutoclearFeatures => 88,
            HeaderField::RefcountOrder => 96,
            HeaderField::HeaderLength => 100,
            HeaderField::CompressionType => 104,
        }
    }

    /// The field's width in bytes.
    pub const fn width(self) -> usize {
        match self {
            HeaderField::CompressionType => 1,
            HeaderField::Magic
            | HeaderField::Version
            | HeaderField::BackingFileSize
            | HeaderField::ClusterBits
            | HeaderField::CryptMethod
            | HeaderField::L1Size
            | HeaderField::RefcountTableClusters
            | HeaderField::NbSnapshots
            | HeaderField::RefcountOrder
            | HeaderField::HeaderLength => 4,
            HeaderField::BackingFileOffset
            | HeaderField::Size
            | HeaderField::L1TableOffset
            | HeaderField::RefcountTableOffset
            | HeaderField::SnapshotsOffset
            | HeaderField::IncompatibleFeatures
            | HeaderField::CompatibleFeatures
            | HeaderField::AutoclearFeatures => 8,
        }
    }

    /// Stores `value` big-endian into `bytes` (cluster 0 from its start), which must reach past
    /// the field. Values wider than the field keep their low bytes; callers pass values of the
    /// field's type.
    pub fn put(self, bytes: &mut [u8], value: u64) {
        let at = self.offset() as usize;
        let width = self.width();
        bytes[at..at + width].copy_from_slice(&value.to_be_bytes()[8 - width..]);
    }
}

/// The header fields a running image changes, in the groups that must change together. Each is
/// one write of adjacent bytes (see the module documentation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FieldWrite {
    /// The virtual disk size (24).
    Size(u64),
    /// The active L1 table (36..48): where it is and how many entries it has.
    L1Table { entries: u32, offset: u64 },
    /// The refcount table (48..60).
    RefcountTable { offset: u64, clusters: u32 },
    /// The incompatible feature bits (72), e.g. to mark the image corrupt.
    IncompatibleFeatures(u64),
    /// The autoclear feature bits (88).
    AutoclearFeatures(u64),
    /// Everything a snapshot operation switches at once (24..72): size, crypt method (kept),
    /// the active L1 table, the refcount table and the snapshot table.
    State {
        size: u64,
        crypt_method: u32,
        l1_entries: u32,
        l1_offset: u64,
        refcount_table_offset: u64,
        refcount_table_clusters: u32,
        snapshots: u32,
        snapshots_offset: u64,
    },
}

impl FieldWrite {
    /// The fields and their values, in file order (and adjacent).
    fn fields(&self) -> Vec<(HeaderField, u64)> {
        use HeaderField as F;
        match *self {
            FieldWrite::Size(size) => vec![(F::Size, size)],
            FieldWrite::L1Table { entries, offset } => {
                vec![(F::L1Size, entries.into()), (F::L1TableOffset, offset)]
            }
            FieldWrite::RefcountTable { offset, clusters } => vec![
                (F::RefcountTableOffset, offset),
                (F::RefcountTableClusters, clusters.into()),
            ],
            FieldWrite::IncompatibleFeatures(bits) => vec![(F::IncompatibleFeatures, bits)],
            FieldWrite::AutoclearFeatures(bits) => vec![(F::AutoclearFeatures, bits)],
            FieldWrite::State {
                size,
                crypt_method,
                l1_entries,
                l1_offset,
                refcount_table_offset,
                refcount_table_clusters,
                snapshots,
                snapshots_offset,
            } => vec![
                (F::Size, size),
                (F::CryptMethod, crypt_method.into()),
                (F::L1Size, l1_entries.into()),
                (F::L1TableOffset, l1_offset),
                (F::RefcountTableOffset, refcount_table_offset),
                (F::RefcountTableClusters, refcount_table_clusters.into()),
                (F::NbSnapshots, snapshots.into()),
                (F::SnapshotsOffset, snapshots_offset),
            ],
        }
    }

    /// Where the write goes and its bytes.
    pub fn encode(&self) -> (u64, Vec<u8>) {
        let fields = self.fields();
        let start = fields.first().map_or(0, |(f, _)| f.offset());
        let end = fields
            .last()
            .map_or(0, |(f, _)| f.offset() + f.width() as u64);
        let mut cluster0 = vec![0u8; end as usize];
        for (field, value) in fields {
            field.put(&mut cluster0, value);
        }
        (start, cluster0.split_off(start as usize))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every group is contiguous: the bytes between its first and last field belong to its
    /// fields, so one write changes nothing else.
    #[test]
    fn groups_are_adjacent_fields() {
        let all = [
            FieldWrite::Size(1),
            FieldWrite::L1Table {
                entries: 1,
                offset: 2,
            },
            FieldWrite::RefcountTable {
                offset: 1,
                clusters: 2,
            },
            FieldWrite::IncompatibleFeatures(1),
            FieldWrite::AutoclearFeatures(1),
            FieldWrite::State {
                size: 1,
                crypt_method: 2,
                l1_entries: 3,
                l1_offset: 4,
                refcount_table_offset: 5,
                refcount_table_clusters: 6,
                snapshots: 7,
                snapshots_offset: 8,
            },
        ];
        for write in all {
            let fields = write.fields();
            for pair in fields.windows(2) {
                assert_eq!(
                    pair[0].0.offset() + pair[0].0.width() as u64,
                    pair[1].0.offset(),
                    "{write:?}"
                );
            }
        }
        let (at, bytes) = FieldWrite::L1Table {
            entries: 0x0102_0304,
            offset: 0x50000,
        }
        .encode();
        assert_eq!(at, 36);
        assert_eq!(bytes, [1, 2, 3, 4, 0, 0, 0, 0, 0, 5, 0, 0]);
        let (at, bytes) = FieldWrite::State {
            size: 1 << 30,
            crypt_method: 0,
            l1_entries: 2,
            l1_offset: 0x30000,
            refcount_table_offset: 0x10000,
            refcount_table_clusters: 1,
            snapshots: 3,
            snapshots_offset: 0x40000,
        }
        .encode();
        assert_eq!((at, bytes.len()), (24, 48));
    }
}
