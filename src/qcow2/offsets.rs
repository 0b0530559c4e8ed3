//! Newtypes that keep the two address spaces of a qcow2 image apart: offsets the guest sees
//! (positions in the virtual disk) and offsets in the image file (host offsets).

use std::fmt;

/// A byte position in the virtual disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct GuestOffset(pub u64);

/// A byte position in the image file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct HostOffset(pub u64);

/// The index of a cluster of the image file (its host offset divided by the cluster size): what
/// refcounts count and what the overlap checks index.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct HostCluster(pub u64);

impl HostCluster {
    /// `count` clusters from this one on.
    pub fn run(self, count: u64) -> impl Iterator<Item = HostCluster> {
        (self.0..self.0.saturating_add(count)).map(HostCluster)
    }

    /// The cluster `n` clusters further on.
    pub fn plus(self, n: u64) -> HostCluster {
        HostCluster(self.0 + n)
    }
}

impl fmt::Display for GuestOffset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "guest {:#x}", self.0)
    }
}

impl fmt::Display for HostCluster {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "host cluster {:#x}", self.0)
    }
}

impl fmt::Display for HostOffset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "host {:#x}", self.0)
    }
}

/// The sizes that follow from the header: how guest offsets split into L1 index, L2 index,
/// subcluster and offset within the cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    pub cluster_bits: u32,
    /// log2 of the number of entries in one L2 table.
    pub l2_bits: u32,
    /// Extended L2 entries: 128 bits each, with 32 subclusters per cluster.
    pub extended_l2: bool,
}

impl Geometry {
    pub fn new(cluster_bits: u32, extended_l2: bool) -> Self {
        // An L2 table fills one cluster; entries are 8 bytes, or 16 with extended L2.
        let entry_bits = if extended_l2 { 4 } else { 3 };
        Geometry {
            cluster_bits,
            l2_bits: cluster_bits - entry_bits,
            extended_l2,
        }
    }

    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    pub fn l2_entries(&self) -> u64 {
        1 << self.l2_bits
    }

    /// Words (u64) per L2 entry.
    pub fn l2_entry_words(&self) -> usize {
        if self.extended_l2 { 2 } else { 1 }
    }

    /// Guest bytes one L2 table covers.
    pub fn l2_coverage(&self) -> u64 {
        1 << (self.cluster_bits + self.l2_bits)
    }

    pub fn subcluster_bits(&self) -> u32 {
        if self.extended_l2 {
            self.cluster_bits - 5
        } else {
            self.cluster_bits
        }
    }

    pub fn subcluster_size(&self) -> u64 {
        1 << self.subcluster_bits()
    }

    pub fn l1_index(&self, guest: GuestOffset) -> u64 {
        guest.0 >> (self.cluster_bits + self.l2_bits)
    }

    pub fn l2_index(&self, guest: GuestOffset) -> usize {
        ((guest.0 >> self.cluster_bits) & (self.l2_entries() - 1)) as usize
    }

    pub fn in_cluster(&self, offset: u64) -> u64 {
        offset & (self.cluster_size() - 1)
    }

    /// The host cluster `offset` lies in.
    pub fn cluster_of(&self, offset: HostOffset) -> HostCluster {
        HostCluster(offset.0 >> self.cluster_bits)
    }

    /// Where host cluster `cluster` starts.
    pub fn offset_of(&self, cluster: HostCluster) -> HostOffset {
        HostOffset(cluster.0 << self.cluster_bits)
    }

    /// The host clusters that `len` bytes at `offset` touch (none for `len` 0).
    pub fn clusters_touched(&self, offset: u64, len: u64) -> impl Iterator<Item = HostCluster> {
        let first = offset >> self.cluster_bits;
        let end = match len {
            0 => first,
            _ => ((offset + len - 1) >> self.cluster_bits) + 1,
        };
        (first..end).map(HostCluster)
    }

    /// Number of L1 entries needed for a disk of `size` bytes.
    pub fn l1_entries_for(&self, size: u64) -> u64 {
        size.div_ceil(self.l2_coverage())
    }

    /// Bits of a compressed cluster descriptor that hold the host byte offset:
    /// `x = 62 - (cluster_bits - 8)`; above them, up to bit 61, the count of additional 512-byte sectors.
    pub fn compressed_offset_bits(&self) -> u32 {
        62 - (self.cluster_bits - 8)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn geometry_of_64k_clusters() {
        let g = Geometry::new(16, false);
        assert_eq!(g.l2_entries(), 8192);
        assert_eq!(g.l2_coverage(), 512 << 20);
        assert_eq!(g.l1_index(GuestOffset(512 << 20)), 1);
        assert_eq!(g.l2_index(GuestOffset((512 << 20) + 3 * 65536 + 5)), 3);
        assert_eq!(g.compressed_offset_bits(), 54);
    }

    #[test]
    fn geometry_of_extended_l2() {
        let g = Geometry::new(16, true);
        assert_eq!(g.l2_entries(), 4096);
        assert_eq!(g.subcluster_size(), 2048);
        assert_eq!(g.l2_entry_words(), 2);
    }

    #[test]
    fn l1_entries_round_up() {
        let g = Geometry::new(9, false);
        // 512-byte clusters: an L2 table has 64 entries and covers 32 KiB.
        assert_eq!(g.l2_coverage(), 32 << 10);
        assert_eq!(g.l1_entries_for(1), 1);
        assert_eq!(g.l1_entries_for(32 << 10), 1);
        assert_eq!(g.l1_entries_for((32 << 10) + 1), 2);
    }
}
