//! The in-memory dirty bitmap: one bit per granule of the virtual disk, in the spec's order.
//!
//! "Given an offset (in bytes) into the bitmap data, the offset into the virtual disk (in bytes)
//! can be computed as `(bit_nr * 8 + bit) * granularity`": bit `b` of byte `n` stands for
//! granule `n * 8 + b` (least significant bit first). The bytes are kept exactly as they are
//! serialized, so loading and storing copy them as they are. Bits past the end of the disk are
//! always zero (the spec: "unused bits ... must be zero").

use std::ops::Range;

use super::error::BitmapError;
use super::limits;

/// A dirty bitmap over a disk of `disk_size` bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirtyBitmap {
    disk_size: u64,
    granularity_bits: u32,
    bytes: Vec<u8>,
}

impl DirtyBitmap {
    /// An empty (all clean) bitmap. Refuses a granularity QEMU does not support and a bitmap
    /// larger than QEMU's 512 MiB.
    pub fn new(disk_size: u64, granularity_bits: u32) -> Result<DirtyBitmap, BitmapError> {
        let len = Self::checked_len(disk_size, granularity_bits)?;
        Ok(DirtyBitmap {
            disk_size,
            granularity_bits,
            bytes: vec![0; len],
        })
    }

    /// A bitmap with these serialized bytes (at least [`DirtyBitmap::serialized_len`] of them;
    /// more are ignored). Bits past the end of the disk are cleared.
    pub fn from_bytes(
        disk_size: u64,
        granularity_bits: u32,
        mut bytes: Vec<u8>,
    ) -> Result<DirtyBitmap, BitmapError> {
        let len = Self::checked_len(disk_size, granularity_bits)?;
        if bytes.len() < len {
            return Err(BitmapError::Unstorable {
                disk_size,
                granularity_bits,
                reason: format!("{} bytes of bitmap data, {len} needed", bytes.len()),
            });
        }
        bytes.truncate(len);
        let mut bitmap = DirtyBitmap {
            disk_size,
            granularity_bits,
            bytes,
        };
        bitmap.clear_tail();
        Ok(bitmap)
    }

    /// Bytes of serialized data for a disk of `disk_size` bytes: one bit per granule, rounded up
    /// to whole bytes.
    pub fn serialized_len(disk_size: u64, granularity_bits: u32) -> u64 {
        disk_size
            .div_ceil(1u64 << granularity_bits.min(63))
            .div_ceil(8)
    }

    fn checked_len(disk_size: u64, granularity_bits: u32) -> Result<usize, BitmapError> {
        let unstorable = |reason: String| BitmapError::Unstorable {
            disk_size,
            granularity_bits,
            reason,
        };
        let supported =
            u32::from(limits::MIN_GRANULARITY_BITS)..=u32::from(limits::MAX_GRANULARITY_BITS);
        if !supported.contains(&granularity_bits) {
            return Err(unstorable(format!(
                "granularity_bits must be in {}..={}",
                supported.start(),
                supported.end()
            )));
        }
        let len = Self::serialized_len(disk_size, granularity_bits);
        if len > limits::MAX_PHYS_SIZE {
            return Err(unstorable(format!(
                "{len} bytes of bitmap data, more than the maximum of {}",
                limits::MAX_PHYS_SIZE
            )));
        }
        // At most 512 MiB.
        Ok(len as usize)
    }

    pub fn disk_size(&self) -> u64 {
        self.disk_size
    }

    pub fn granularity_bits(&self) -> u32 {
        self.granularity_bits
    }

    /// Bytes per bit.
    pub fn granularity(&self) -> u64 {
        1 << self.granularity_bits
    }

    /// The serialized bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    fn granules(&self) -> u64 {
        self.disk_size.div_ceil(self.granularity())
    }

    fn bit(&self, granule: u64) -> bool {
        self.bytes[(granule / 8) as usize] & (1 << (granule % 8)) != 0
    }

    /// Marks every granule that `len` bytes at `offset` touch (clipped to the disk).
    pub fn set_range(&mut self, offset: u64, len: u64) {
        let end = offset.saturating_add(len).min(self.disk_size);
        if offset >= end {
            return;
        }
        let first = offset >> self.granularity_bits;
        let last = (end - 1) >> self.granularity_bits;
        self.set_granules(first, last + 1);
    }

    /// Sets granules `first..end`: whole bytes at once, single bits at the edges.
    fn set_granules(&mut self, first: u64, end: u64) {
        let mut g = first;
        while g < end && g % 8 != 0 {
            self.bytes[(g / 8) as usize] |= 1 << (g % 8);
            g += 1;
        }
        let whole_end = end / 8 * 8;
        if g < whole_end {
            self.bytes[(g / 8) as usize..(whole_end / 8) as usize].fill(0xff);
            g = whole_end;
        }
        while g < end {
            self.bytes[(g / 8) as usize] |= 1 << (g % 8);
            g += 1;
        }
    }

    /// Whether the granule holding byte `offset` is dirty (false past the end of the disk).
    pub fn is_dirty(&self, offset: u64) -> bool {
        offset < self.disk_size && self.bit(offset >> self.granularity_bits)
    }

    /// The first dirty byte at or after `from`, if any.
    pub fn next_dirty(&self, from: u64) -> Option<u64> {
        if from >= self.disk_size {
            return None;
        }
        let granules = self.granules();
        let mut g = from >> self.granularity_bits;
        while g < granules {
            if g % 8 == 0 {
                // Skip clean bytes whole.
                let start = (g / 8) as usize;
                let skip = self.bytes[start..].iter().take_while(|b| **b == 0).count();
                g += skip as u64 * 8;
                if g >= granules {
                    return None;
                }
            }
            if self.bit(g) {
                return Some((g << self.granularity_bits).max(from));
            }
            g += 1;
        }
        None
    }

    /// The first clean byte at or after `from` (the disk size if the rest is dirty).
    pub fn next_clean(&self, from: u64) -> u64 {
        let granules = self.granules();
        let mut g = from >> self.granularity_bits;
        while g < granules {
            if g % 8 == 0 {
                let start = (g / 8) as usize;
                let skip = self.bytes[start..]
                    .iter()
                    .take_while(|b| **b == 0xff)
                    .count();
                g += skip as u64 * 8;
                if g >= granules {
                    break;
                }
            }
            if !self.bit(g) {
                return (g << self.granularity_bits).max(from).min(self.disk_size);
            }
            g += 1;
        }
        self.disk_size.max(from.min(self.disk_size))
    }

    /// The dirty byte ranges, in order, adjacent granules joined, clipped to the disk.
    pub fn dirty_ranges(&self) -> DirtyRanges<'_> {
        DirtyRanges {
            bitmap: self,
            at: 0,
        }
    }

    /// Bytes of the disk in dirty granules (clipped to the disk).
    pub fn dirty_bytes(&self) -> u64 {
        self.dirty_ranges().map(|r| r.end - r.start).sum()
    }

    /// Whether no granule is dirty.
    pub fn is_clean(&self) -> bool {
        self.bytes.iter().all(|b| *b == 0)
    }

    /// Marks everything `other` marks (QEMU's `block-dirty-bitmap-merge`). The disks must be of
    /// the same size; granularities may differ (a coarser destination marks whole granules).
    pub fn merge(&mut self, other: &DirtyBitmap) -> Result<(), BitmapError> {
        if self.disk_size != other.disk_size {
            return Err(BitmapError::SizeMismatch {
                dest: self.disk_size,
                src: other.disk_size,
            });
        }
        if self.granularity_bits == other.granularity_bits {
            for (d, s) in self.bytes.iter_mut().zip(&other.bytes) {
                *d |= *s;
            }
        } else {
            for range in other.dirty_ranges() {
                self.set_range(range.start, range.end - range.start);
            }
        }
        Ok(())
    }

    /// Follows the disk to `new_size` bytes: bits of a shrunk part are dropped, a grown part
    /// starts clean (as QEMU's `bdrv_dirty_bitmap_truncate`; a writer that grows the disk marks
    /// the new part itself).
    pub fn resize(&mut self, new_size: u64) -> Result<(), BitmapError> {
        let len = Self::checked_len(new_size, self.granularity_bits)?;
        self.disk_size = new_size;
        self.bytes.resize(len, 0);
        self.clear_tail();
        Ok(())
    }

    /// Clears the bits past the last granule of the disk.
    fn clear_tail(&mut self) {
        let granules = self.granules();
        let used_bits = granules % 8;
        if used_bits != 0
            && let Some(last) = self.bytes.get_mut((granules / 8) as usize)
        {
            *last &= (1u8 << used_bits) - 1;
        }
    }
}

/// The dirty ranges of a bitmap ([`DirtyBitmap::dirty_ranges`]).
pub struct DirtyRanges<'a> {
    bitmap: &'a DirtyBitmap,
    at: u64,
}

impl Iterator for DirtyRanges<'_> {
    type Item = Range<u64>;

    fn next(&mut self) -> Option<Range<u64>> {
        let start = self.bitmap.next_dirty(self.at)?;
        let end = self.bitmap.next_clean(start);
        self.at = end;
        Some(start..end)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bits_are_least_significant_first() {
        // The wave-2 observation of QEMU: writes at 3 MiB and 10 MiB with 64 KiB granularity
        // set bits 48 and 160, i.e. byte 6 = 0x01 and byte 20 = 0x01.
        let mut b = DirtyBitmap::new(16 << 20, 16).unwrap();
        b.set_range(3 << 20, 4096);
        b.set_range(10 << 20, 1);
        assert_eq!(b.bytes()[6], 0x01);
        assert_eq!(b.bytes()[20], 0x01);
        assert_eq!(b.bytes().iter().filter(|x| **x != 0).count(), 2);
    }

    #[test]
    fn tail_bits_stay_clear() {
        // 3 granules of 512 bytes: bits 3..8 of the only byte are past the end.
        let b = DirtyBitmap::from_bytes(1536, 9, vec![0xff]).unwrap();
        assert_eq!(b.bytes(), &[0x07]);
        let mut b = DirtyBitmap::new(1536, 9).unwrap();
        b.set_range(0, u64::MAX);
        assert_eq!(b.bytes(), &[0x07]);
        assert_eq!(b.dirty_ranges().collect::<Vec<_>>(), vec![0..1536]);
    }

    #[test]
    fn no_empty_range_at_a_partial_last_granule() {
        // 1536 bytes in granules of 1024: the last granule ends past the disk.
        let mut b = DirtyBitmap::new(1536, 10).unwrap();
        b.set_range(1500, 10);
        assert_eq!(b.dirty_ranges().collect::<Vec<_>>(), vec![1024..1536]);
        assert_eq!(b.next_dirty(1536), None);
    }

    #[test]
    fn ranges_join_and_clip() {
        let mut b = DirtyBitmap::new(100_000, 12).unwrap();
        b.set_range(5000, 10);
        b.set_range(8192, 1);
        b.set_range(99_999, 1);
        assert_eq!(
            b.dirty_ranges().collect::<Vec<_>>(),
            vec![4096..12288, 98304..100_000]
        );
        assert_eq!(b.next_dirty(6000), Some(6000));
        assert_eq!(b.next_dirty(12288), Some(98304));
        assert_eq!(b.next_clean(4096), 12288);
    }
}
