//! L1 tables: the first level of the two-level cluster map. Each 8-byte entry holds the host offset
//! of an L2 table (bits 9–55) and the COPIED flag (bit 63); 0 means the whole range it covers is
//! unallocated in this image. [`L1Entry`] is the only code that knows those bits.

use crate::qcow2::offsets::HostOffset;

/// Bits 9–55 of an L1 entry: "Bits 9-55 of an L1 table entry hold the offset into the image file at
/// which the L2 table starts. Must be aligned to a cluster boundary."
const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// "0 for an L2 table that is unused or requires COW, 1 if its refcount is exactly one."
const COPIED: u64 = 1 << 63;

/// One L1 entry. Reserved bits (56–62 and 0–8) are kept as read and ignored, as QEMU ignores
/// them (only `qemu-img check` flags them).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct L1Entry(u64);

impl L1Entry {
    /// No L2 table: the range reads from the backing file (or as zeros).
    pub const UNALLOCATED: L1Entry = L1Entry(0);

    /// The entry as stored (host byte order).
    pub fn from_raw(raw: u64) -> Self {
        L1Entry(raw)
    }

    pub fn raw(self) -> u64 {
        self.0
    }

    /// An entry pointing at the L2 table at `l2`; `copied` when the table's refcount is 1.
    pub fn new(l2: HostOffset, copied: bool) -> Self {
        L1Entry((l2.0 & OFFSET_MASK) | if copied { COPIED } else { 0 })
    }

    /// Where its L2 table is, if it has one.
    pub fn l2_offset(self) -> Option<HostOffset> {
        match self.0 & OFFSET_MASK {
            0 => None,
            offset => Some(HostOffset(offset)),
        }
    }

    /// COPIED: the L2 table is this L1 table's alone (refcount 1) and may be changed in place.
    pub fn is_copied(self) -> bool {
        self.0 & COPIED != 0
    }
}

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

    /// A table of `entries` (more may be declared: they are unallocated).
    pub fn from_entries(entries: impl IntoIterator<Item = L1Entry>, declared_len: u64) -> Self {
        let mut entries: Vec<u64> = entries.into_iter().map(L1Entry::raw).collect();
        while entries.last() == Some(&0) {
            entries.pop();
        }
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

    /// The entry at `index`, unallocated past the end.
    pub fn entry(&self, index: u64) -> L1Entry {
        usize::try_from(index)
            .ok()
            .and_then(|i| self.entries.get(i))
            .map_or(L1Entry::UNALLOCATED, |&raw| L1Entry(raw))
    }

    /// Host offset of the L2 table for `index`, if any.
    pub fn l2_offset(&self, index: u64) -> Option<HostOffset> {
        self.entry(index).l2_offset()
    }

    /// The entries present, in order (see [`L1Table::len_present`]).
    pub fn iter(&self) -> impl Iterator<Item = L1Entry> + '_ {
        self.entries.iter().map(|&raw| L1Entry(raw))
    }

    /// How many entries are present (trailing unallocated ones may be omitted).
    pub fn len_present(&self) -> usize {
        self.entries.len()
    }

    /// A copy with entry `index` set to `entry` (the table grows to hold it).
    pub fn with_entry(&self, index: usize, entry: L1Entry) -> L1Table {
        let mut entries = self.entries.clone();
        if entries.len() <= index {
            entries.resize(index + 1, 0);
        }
        entries[index] = entry.0;
        L1Table::new(entries, self.declared_len)
    }

    /// The same entries, `declared_len` of them declared (a table that grew).
    pub fn with_declared_len(&self, declared_len: u64) -> L1Table {
        L1Table::new(self.entries.clone(), declared_len)
    }

    /// The table as stored: its entries big-endian, then zeros up to `len` bytes.
    pub fn to_be_bytes(&self, len: usize) -> Vec<u8> {
        let mut bytes = vec![0u8; len];
        for (slot, e) in bytes.chunks_exact_mut(8).zip(&self.entries) {
            slot.copy_from_slice(&e.to_be_bytes());
        }
        bytes
    }

    pub fn declared_len(&self) -> u64 {
        self.declared_len
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
            .filter_map(|(i, &e)| L1Entry(e).l2_offset().map(|o| (o.0, i)))
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
        assert_eq!(t.len_present(), 2, "trailing zero entry dropped");
        assert!(t.entry(0).is_copied() && !t.entry(1).is_copied());
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
            assert_eq!(t.len_present(), len / 8);
            assert_eq!(t.entry(u64::MAX), L1Entry::UNALLOCATED);
        }
    }
}
