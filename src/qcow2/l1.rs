//! L1 tables: the first level of the two-level cluster map. Each 8-byte entry holds the host offset
//! of an L2 table (bits 9–55) and the COPIED flag (bit 63); 0 means the whole range it covers is
//! unallocated in this image.

use crate::qcow2::offsets::HostOffset;

/// Bits 9–55 of an L1 entry: "Bits 9-55 of an L1 table entry hold the offset into the image file at
/// which the L2 table starts. Must be aligned to a cluster boundary."
pub const L1_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// "0 for an L2 table that is unused or requires COW, 1 if its refcount is exactly one."
pub const COPIED: u64 = 1 << 63;

/// An L1 table as loaded from the image (entries in host byte order).
///
/// Only the entries that exist in the file are held: QEMU reads a table that runs past the end of
/// the file as zeros, and holding the zeros would let a hostile `l1_size` decide our memory use.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct L1Table {
    entries: Vec<u64>,
    /// The number of entries the header or snapshot table declares.
    declared_len: u64,
}

impl L1Table {
    pub fn new(entries: Vec<u64>, declared_len: u64) -> Self {
        L1Table {
            entries,
            declared_len,
        }
    }

    /// Decodes big-endian bytes read from the image. `declared_len` may exceed what `bytes` holds.
    pub fn from_be_bytes(bytes: &[u8], declared_len: u64) -> Self {
        let mut entries: Vec<u64> = bytes
            .chunks_exact(8)
            .map(|c| u64::from_be_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
            .collect();
        // Trailing zero entries carry no information; dropping them keeps sparse tables small.
        while entries.last() == Some(&0) {
            entries.pop();
        }
        L1Table {
            entries,
            declared_len,
        }
    }

    /// The raw entry at `index`, 0 (unallocated) past the end.
    pub fn entry(&self, index: u64) -> u64 {
        usize::try_from(index)
            .ok()
            .and_then(|i| self.entries.get(i))
            .copied()
            .unwrap_or(0)
    }

    /// Host offset of the L2 table for `index`, if any.
    pub fn l2_offset(&self, index: u64) -> Option<HostOffset> {
        match self.entry(index) & L1_OFFSET_MASK {
            0 => None,
            offset => Some(HostOffset(offset)),
        }
    }

    pub fn declared_len(&self) -> u64 {
        self.declared_len
    }

    /// Entries actually present (trailing unallocated ones may be omitted).
    pub fn entries(&self) -> &[u64] {
        &self.entries
    }

    /// The first two entries that name the same L2 table: `(index, other index, L2 offset)`.
    ///
    /// Every L1 entry owns its L2 table (QEMU's `check` reports a shared one as a refcount error).
    /// A table repeated across the L1 makes a small file describe a huge disk full of data, so that
    /// anything walking the whole disk (`st_blocks`, SEEK_DATA/SEEK_HOLE scans) does work
    /// unrelated to the file's size; loading code can refuse such tables with this.
    pub fn find_shared_l2(&self) -> Option<(u64, u64, u64)> {
        let mut used: Vec<(u64, usize)> = self
            .entries
            .iter()
            .enumerate()
            .filter_map(|(i, e)| match e & L1_OFFSET_MASK {
                0 => None,
                offset => Some((offset, i)),
            })
            .collect();
        used.sort_unstable();
        used.windows(2)
            .find(|w| w[0].0 == w[1].0)
            .map(|w| (w[0].1 as u64, w[1].1 as u64, w[0].0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_and_masks() {
        let mut bytes = vec![0u8; 24];
        bytes[0..8].copy_from_slice(&(COPIED | 0x30000).to_be_bytes());
        bytes[8..16].copy_from_slice(&0x50000u64.to_be_bytes());
        let t = L1Table::from_be_bytes(&bytes, 100);
        assert_eq!(t.entries().len(), 2, "trailing zero entry dropped");
        assert_eq!(t.l2_offset(0), Some(HostOffset(0x30000)));
        assert_eq!(t.l2_offset(1), Some(HostOffset(0x50000)));
        assert_eq!(t.l2_offset(2), None);
        assert_eq!(t.l2_offset(99), None);
        assert_eq!(t.l2_offset(u64::MAX), None);
        assert_eq!(t.declared_len(), 100);
    }

    #[test]
    fn shared_l2_tables_are_found() {
        let t = L1Table::new(vec![0x30000, 0, COPIED | 0x40000, 0x50000], 4);
        assert_eq!(t.find_shared_l2(), None);
        // The COPIED flag and reserved bits do not hide a repeat.
        let t = L1Table::new(
            vec![0x30000, 0, COPIED | 0x40000, 0x50000, 0x40000 | 0x1ff],
            5,
        );
        assert_eq!(t.find_shared_l2(), Some((2, 4, 0x40000)));
        assert_eq!(L1Table::default().find_shared_l2(), None);
    }

    #[test]
    fn hostile_bytes_never_panic() {
        // Lengths that are not a multiple of 8, declared sizes far beyond the bytes held.
        for len in [0usize, 1, 7, 9, 15] {
            let t = L1Table::from_be_bytes(&vec![0xff; len], u64::MAX);
            assert_eq!(t.entries().len(), len / 8);
            assert_eq!(t.entry(u64::MAX), 0);
        }
    }
}
