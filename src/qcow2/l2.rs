//! L2 tables and their entries: the second level of the cluster map, and the only code that knows
//! the bits of an L2 entry. The mapper, the write path and the snapshot operations all decode
//! entries here.
//!
//! From the spec ("Cluster mapping"), a standard L2 entry (64 bits):
//!
//! ```text
//! Bit  0 -  61: Cluster descriptor
//!          62:  0 for standard clusters, 1 for compressed clusters
//!          63:  0 for clusters that are unused, compressed or require COW.
//!               1 for standard clusters whose refcount is exactly one.
//! ```
//!
//! Standard cluster descriptor: bit 0 "if set to 1, the cluster reads as all zeros" (version 3;
//! never with extended L2 entries); bits 9–55 "bits 9-55 of host cluster offset. Must be aligned
//! to a cluster boundary. If the offset is 0 and bit 63 is clear, the cluster is unallocated."
//! (0 with COPIED set is unallocated too, as QEMU reads it.)
//!
//! Compressed cluster descriptor, with `x = 62 - (cluster_bits - 8)`: bits `0 .. x-1` the host
//! byte offset of the compressed data, bits `x .. 61` the number of additional 512-byte sectors
//! it takes.
//!
//! Extended L2 entries (incompatible bit 4) are 128 bits: the entry above, then a subcluster
//! bitmap: bits 0–31 "subcluster x is allocated" (its data at host offset + x × subcluster
//! size), bits 32–63 "subcluster x reads as zeros"; neither means it falls through to the
//! backing file. Both set, or allocated subclusters without a host offset, is invalid.

use std::ops::Range;
use std::sync::Arc;

use crate::qcow2::error::MetadataError;
use crate::qcow2::offsets::{Geometry, GuestOffset, HostOffset};

/// One L2 table, entries decoded to host byte order. Extended L2 tables hold two words per entry.
pub type L2Table = Arc<[u64]>;

const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
const COPIED: u64 = 1 << 63;
const COMPRESSED: u64 = 1 << 62;
/// The standard "reads as zero" flag.
const ZERO: u64 = 1;
/// Extended L2 bitmap: the "allocated" half.
const ALLOCATED_BITS: u64 = 0x0000_0000_ffff_ffff;
/// Extended L2 bitmap: every subcluster reads as zero, none allocated.
const ALL_ZERO: u64 = 0xffff_ffff_0000_0000;

/// Where the data of a compressed cluster lies in the image file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CompressedCluster {
    /// Byte offset of the compressed stream (not aligned).
    pub host: HostOffset,
    /// Bytes to read: `(n + 1) * 512 - (offset & 511)`.
    pub len: u64,
}

impl CompressedCluster {
    /// Decodes a compressed cluster descriptor (the entry's first word).
    pub fn from_entry(entry: u64, geometry: &Geometry) -> Self {
        let x = geometry.compressed_offset_bits();
        let offset = entry & ((1u64 << x) - 1);
        let extra_sectors = (entry & ((1u64 << 62) - 1)) >> x;
        CompressedCluster {
            host: HostOffset(offset),
            len: (extra_sectors + 1) * 512 - (offset & 511),
        }
    }
}

/// The host clusters an entry holds a reference on (what refcounts count for it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reference {
    /// A data cluster (also a preallocated zero cluster).
    Cluster(HostOffset),
    /// Every host cluster the compressed bytes touch.
    Compressed(CompressedCluster),
}

impl Reference {
    /// The host clusters referenced, by offset (a compressed cluster may span two).
    pub fn clusters(self, geometry: &Geometry) -> impl Iterator<Item = HostOffset> + '_ {
        let (offset, len) = match self {
            Reference::Cluster(host) => (host.0, 1),
            Reference::Compressed(c) => (c.host.0, c.len),
        };
        geometry
            .clusters_touched(offset, len)
            .map(|c| geometry.offset_of(c))
    }
}

/// What a guest cluster or subcluster reads as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unit {
    /// Data at this host offset (already including the subcluster's offset).
    Data(HostOffset),
    Compressed(CompressedCluster),
    Zero,
    Unallocated,
}

/// One L2 entry: the descriptor word and, for extended L2 entries, the subcluster bitmap (0 for
/// standard entries).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct L2Entry {
    descriptor: u64,
    bitmap: u64,
}

impl L2Entry {
    /// Nothing allocated: the cluster falls through to the backing file.
    pub const UNALLOCATED: L2Entry = L2Entry {
        descriptor: 0,
        bitmap: 0,
    };

    /// Entry `index` of `table` (unallocated if the table is shorter, as a truncated table reads).
    #[inline]
    pub fn read(table: &[u64], index: usize, geometry: &Geometry) -> L2Entry {
        if geometry.extended_l2 {
            L2Entry {
                descriptor: table.get(index * 2).copied().unwrap_or(0),
                bitmap: table.get(index * 2 + 1).copied().unwrap_or(0),
            }
        } else {
            L2Entry {
                descriptor: table.get(index).copied().unwrap_or(0),
                bitmap: 0,
            }
        }
    }

    /// Stores the entry as entry `index` of `table`.
    pub fn store(self, table: &mut [u64], index: usize, geometry: &Geometry) {
        if geometry.extended_l2 {
            table[index * 2] = self.descriptor;
            table[index * 2 + 1] = self.bitmap;
        } else {
            table[index] = self.descriptor;
        }
    }

    /// An entry from its words as stored.
    pub fn from_words(descriptor: u64, bitmap: u64) -> Self {
        L2Entry { descriptor, bitmap }
    }

    /// A cluster of data at `host`, ours alone (COPIED), every subcluster allocated.
    pub fn data(host: HostOffset, geometry: &Geometry) -> Self {
        L2Entry {
            descriptor: (host.0 & OFFSET_MASK) | COPIED,
            bitmap: if geometry.extended_l2 {
                ALLOCATED_BITS
            } else {
                0
            },
        }
    }

    /// A cluster that reads as zeros and holds no host cluster, as this image can say it:
    /// version 3 has a zero flag (a bitmap with extended L2), version 2 has none, and then only
    /// an unallocated entry (reading zeros only without a backing file) is possible.
    pub fn zero(geometry: &Geometry, version: u32) -> Self {
        match (version >= 3, geometry.extended_l2) {
            (true, false) => L2Entry {
                descriptor: ZERO,
                bitmap: 0,
            },
            (true, true) => L2Entry {
                descriptor: 0,
                bitmap: ALL_ZERO,
            },
            (false, _) => L2Entry::UNALLOCATED,
        }
    }

    pub fn is_compressed(self) -> bool {
        self.descriptor & COMPRESSED != 0
    }

    /// The compressed cluster, if the entry describes one.
    pub fn compressed(self, geometry: &Geometry) -> Option<CompressedCluster> {
        self.is_compressed()
            .then(|| CompressedCluster::from_entry(self.descriptor, geometry))
    }

    /// The host cluster of a standard entry (none for compressed or unallocated entries).
    pub fn host(self) -> Option<HostOffset> {
        if self.is_compressed() {
            return None;
        }
        match self.descriptor & OFFSET_MASK {
            0 => None,
            offset => Some(HostOffset(offset)),
        }
    }

    /// COPIED: the cluster's refcount is 1, so it may be written in place.
    pub fn is_copied(self) -> bool {
        self.descriptor & COPIED != 0
    }

    /// The same entry with COPIED set or clear (compressed entries never carry it).
    pub fn with_copied(self, copied: bool) -> Self {
        let descriptor = if copied && !self.is_compressed() {
            self.descriptor | COPIED
        } else {
            self.descriptor & !COPIED
        };
        L2Entry { descriptor, ..self }
    }

    /// What the entry holds a reference on.
    pub fn reference(self, geometry: &Geometry) -> Option<Reference> {
        match self.compressed(geometry) {
            Some(c) => Some(Reference::Compressed(c)),
            None => self.host().map(Reference::Cluster),
        }
    }

    /// The host cluster a write may change in place: a standard cluster of this image alone
    /// (COPIED) that holds its data there. Not a compressed cluster, nor a standard cluster with
    /// the zero flag (a preallocated zero cluster is rewritten into a new one, as QEMU does).
    pub fn writable_in_place(self, geometry: &Geometry) -> Option<HostOffset> {
        let zero_flag = !geometry.extended_l2 && self.descriptor & ZERO != 0;
        self.host().filter(|_| self.is_copied() && !zero_flag)
    }

    /// The subclusters that read as allocated data (extended L2 only), as a 32-bit mask.
    pub fn allocated_subclusters(self) -> u32 {
        (self.bitmap & ALLOCATED_BITS) as u32
    }

    /// An extended entry with subclusters `range` allocated (no longer zero), the rest as they
    /// were.
    pub fn with_allocated_subclusters(self, range: Range<u32>) -> Self {
        let mut alloc = self.bitmap & ALLOCATED_BITS;
        let mut zero = self.bitmap >> 32;
        for s in range {
            alloc |= 1 << s;
            zero &= !(1u64 << s);
        }
        L2Entry {
            bitmap: alloc | (zero << 32),
            ..self
        }
    }

    /// The words as stored: the descriptor and the bitmap (0 for standard entries).
    pub fn words(self) -> (u64, u64) {
        (self.descriptor, self.bitmap)
    }

    /// What the cluster or subcluster at `guest` reads as. This is the decoder the mapper uses;
    /// it refuses what QEMU refuses: an unaligned host offset (EIO), compressed data starting in
    /// cluster 0 (the header), an extended bitmap with a subcluster both allocated and zero, or
    /// allocated subclusters without a host offset. Reserved bits are ignored, as QEMU ignores
    /// them (only `qemu-img check` flags them); so is the bitmap of a compressed entry.
    #[inline]
    pub fn unit_at(self, geometry: &Geometry, guest: GuestOffset) -> Result<Unit, MetadataError> {
        let index = geometry.l2_index(guest) as u64;
        if let Some(cluster) = self.compressed(geometry) {
            // Cluster 0 is the header: QEMU would feed the header to the decompressor and fail;
            // saying so is clearer.
            if cluster.host.0 < geometry.cluster_size() {
                return Err(MetadataError::PointsAtHeader {
                    table: "L2 (compressed cluster)",
                    index,
                    offset: cluster.host.0,
                });
            }
            return Ok(Unit::Compressed(cluster));
        }
        let host = self.descriptor & OFFSET_MASK;
        if host != 0 && geometry.in_cluster(host) != 0 {
            return Err(MetadataError::Unaligned {
                table: "L2",
                index,
                offset: host,
            });
        }
        if !geometry.extended_l2 {
            return Ok(if self.descriptor & ZERO != 0 {
                Unit::Zero
            } else if host == 0 {
                Unit::Unallocated
            } else {
                Unit::Data(HostOffset(host))
            });
        }
        let allocated = self.bitmap & ALLOCATED_BITS;
        let zero = self.bitmap >> 32;
        if allocated & zero != 0 {
            return Err(MetadataError::SubclusterAllocatedAndZero {
                guest: guest.0,
                subcluster: (allocated & zero).trailing_zeros(),
                bitmap: self.bitmap,
            });
        }
        if host == 0 && allocated != 0 {
            return Err(MetadataError::SubclusterWithoutCluster {
                guest: guest.0,
                bitmap: self.bitmap,
            });
        }
        let sub = (geometry.in_cluster(guest.0) >> geometry.subcluster_bits()) as u32;
        Ok(if zero & (1 << sub) != 0 {
            Unit::Zero
        } else if allocated & (1 << sub) != 0 {
            Unit::Data(HostOffset(
                host + ((sub as u64) << geometry.subcluster_bits()),
            ))
        } else {
            Unit::Unallocated
        })
    }

    /// Whether `unit` (decoded from this entry) holds for every subcluster of the cluster: an
    /// extended entry whose bitmap marks all of them unallocated, or all of them zero. (A
    /// standard entry's unit is a whole cluster already; this says no, as there is nothing to
    /// skip.)
    #[inline]
    pub fn is_uniform(self, geometry: &Geometry, unit: Unit) -> bool {
        if !geometry.extended_l2 {
            return false;
        }
        match unit {
            Unit::Unallocated => self.bitmap == 0,
            Unit::Zero => self.bitmap == ALL_ZERO,
            Unit::Data(_) | Unit::Compressed(_) => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn standard_entries() {
        let g = Geometry::new(16, false);
        let data = L2Entry::data(HostOffset(0x50000), &g);
        assert_eq!(data.words(), (COPIED | 0x50000, 0));
        assert_eq!(data.writable_in_place(&g), Some(HostOffset(0x50000)));
        assert_eq!(
            data.with_copied(false).writable_in_place(&g),
            None,
            "shared: copy first"
        );
        assert_eq!(
            data.reference(&g),
            Some(Reference::Cluster(HostOffset(0x50000)))
        );
        // A preallocated zero cluster reads as zero, still references its cluster, and is not
        // written in place.
        let prealloc = L2Entry::from_words(COPIED | 0x50000 | ZERO, 0);
        assert_eq!(prealloc.unit_at(&g, GuestOffset(0)).ok(), Some(Unit::Zero));
        assert!(prealloc.reference(&g).is_some());
        assert_eq!(prealloc.writable_in_place(&g), None);
        assert_eq!(L2Entry::zero(&g, 3).words(), (ZERO, 0));
        assert_eq!(L2Entry::zero(&g, 2), L2Entry::UNALLOCATED);
        let mut table = vec![0u64; 4];
        data.store(&mut table, 2, &g);
        assert_eq!(L2Entry::read(&table, 2, &g), data);
        assert_eq!(L2Entry::read(&table, 99, &g), L2Entry::UNALLOCATED);
    }

    #[test]
    fn compressed_entries_reference_every_cluster_they_touch() {
        let g = Geometry::new(12, false);
        let x = g.compressed_offset_bits();
        // 3 sectors from 0x1f00: the bytes run into the next cluster.
        let e = L2Entry::from_words(COMPRESSED | (2 << x) | 0x1f00, 0);
        let c = e.compressed(&g).expect("compressed");
        assert_eq!(c.len, 3 * 512 - 0x100);
        assert_eq!(e.host(), None);
        assert!(!e.with_copied(true).is_copied(), "never COPIED");
        let clusters: Vec<HostOffset> =
            e.reference(&g).expect("a reference").clusters(&g).collect();
        assert_eq!(clusters, [HostOffset(0x1000), HostOffset(0x2000)]);
    }

    #[test]
    fn extended_entries() {
        let g = Geometry::new(16, true);
        let e = L2Entry::data(HostOffset(0x100000), &g);
        assert_eq!(e.allocated_subclusters(), u32::MAX);
        let partial = L2Entry::from_words(COPIED | 0x100000, 1 << 32 | 1 << 33)
            .with_allocated_subclusters(1..3);
        assert_eq!(partial.words().1, 0b110 | 1 << 32);
        assert_eq!(
            partial.unit_at(&g, GuestOffset(2048)).ok(),
            Some(Unit::Data(HostOffset(0x100000 + 2048)))
        );
        assert_eq!(partial.unit_at(&g, GuestOffset(0)).ok(), Some(Unit::Zero));
        assert_eq!(
            partial.unit_at(&g, GuestOffset(6144)).ok(),
            Some(Unit::Unallocated)
        );
        let zero = L2Entry::zero(&g, 3);
        assert!(zero.is_uniform(&g, Unit::Zero));
        assert!(L2Entry::UNALLOCATED.is_uniform(&g, Unit::Unallocated));
        assert!(
            L2Entry::from_words(0x100000, 1 | 1 << 32)
                .unit_at(&g, GuestOffset(0))
                .is_err()
        );
    }
}
