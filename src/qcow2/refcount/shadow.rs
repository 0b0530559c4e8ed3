//! A second, private view of the refcounts for an update that must happen all at once.
//!
//! Snapshot operations change the refcounts of many clusters together with the COPIED flags of
//! the active L1/L2 entries that point at them. `qemu-img check` counts any moment in which the
//! two disagree as corruption, and no order of in-place writes avoids such moments. So the
//! operation is built beside the image instead: every refcount block it changes is copied, the
//! copies and a new refcount table go into clusters that the current refcounts call free, and the
//! caller switches the header to the new table (together with its new L1 table and snapshot
//! table) in one write. Until that write the image on disk is the old one, untouched; after it,
//! the new one, whole. What the old state used and the new one does not is simply unreferenced
//! with refcount 0: not even a leak.
//!
//! A cluster handed out here must be free in both views: free in the current one, so that the
//! image a crash leaves behind is intact, and not yet taken in the new one.

use std::collections::BTreeMap;

use super::{REFTABLE_OFFSET_MASK, RefcountError, Refcounts, Result, read_entry, write_entry};
use crate::qcow2::storage::Storage;

/// A refcount block of the new view.
struct ShadowBlock {
    data: Vec<u8>,
    /// Where the block lived in the current view (0: the range had no block).
    old: u64,
    /// The cluster index the copy goes to, once chosen.
    home: Option<u64>,
}

/// The refcounts as they will be once the caller's operation is switched in.
pub struct Shadow<'a> {
    base: &'a mut Refcounts,
    storage: &'a dyn Storage,
    /// Changed blocks, by block index.
    blocks: BTreeMap<usize, ShadowBlock>,
    /// Where the search for free clusters goes on from.
    hint: u64,
    /// The lowest cluster that the new view frees, for the allocator afterwards.
    lowest_freed: u64,
    /// Clusters in use now that the new view frees (some may be taken again before the end).
    freed: Vec<u64>,
    /// Clusters the current view must not lose to an allocation although their refcount says
    /// free (metadata that a damaged refcount forgot).
    is_metadata: &'a dyn Fn(u64) -> bool,
}

/// A new view written to the file, to be installed once the header points at it.
pub struct ShadowCommit {
    table: Vec<u64>,
    table_offset: u64,
    table_clusters: u64,
    blocks: Vec<(u64, Vec<u8>)>,
    replaced_blocks: Vec<u64>,
    lowest_freed: u64,
    freed: Vec<u64>,
}

impl ShadowCommit {
    /// The header fields `refcount_table_offset` and `refcount_table_clusters`.
    pub fn table_location(&self) -> (u64, u32) {
        (self.table_offset, self.table_clusters as u32)
    }

    /// The host ranges (offset, length) that the current state uses and the new one does not,
    /// merged where they touch: once the new state is in, their bytes are of no use.
    pub fn freed_ranges(&self, cluster_bits: u32) -> Vec<(u64, u64)> {
        let mut ranges: Vec<(u64, u64)> = Vec::new();
        for &c in &self.freed {
            match ranges.last_mut() {
                Some((start, len)) if *start + *len == c => *len += 1,
                _ => ranges.push((c, 1)),
            }
        }
        ranges
            .into_iter()
            .map(|(c, n)| (c << cluster_bits, n << cluster_bits))
            .collect()
    }
}

impl<'a> Shadow<'a> {
    pub fn new(
        base: &'a mut Refcounts,
        storage: &'a dyn Storage,
        is_metadata: &'a dyn Fn(u64) -> bool,
    ) -> Self {
        let hint = base.free_hint.max(1);
        Shadow {
            base,
            storage,
            blocks: BTreeMap::new(),
            hint,
            lowest_freed: u64::MAX,
            freed: Vec::new(),
            is_metadata,
        }
    }

    pub fn cluster_bits(&self) -> u32 {
        self.base.cluster_bits
    }

    /// The refcount of the cluster at host `offset` in the new view.
    pub fn get(&mut self, offset: u64) -> Result<u64> {
        self.get_cluster(offset >> self.base.cluster_bits)
    }

    fn get_cluster(&mut self, cluster: u64) -> Result<u64> {
        let (b, i) = self.base.block_of(cluster);
        match self.blocks.get(&b) {
            Some(block) => Ok(read_entry(&block.data, i, self.base.order)),
            None => self.base.get(self.storage, cluster),
        }
    }

    fn set_cluster(&mut self, cluster: u64, value: u64) -> Result<()> {
        let (b, i) = self.base.block_of(cluster);
        if !self.blocks.contains_key(&b) {
            let old = self.base.block_entry(b);
            let data = if old == 0 {
                vec![0u8; self.base.cluster_size() as usize]
            } else {
                self.base.block(self.storage, old)?.clone()
            };
            self.blocks.insert(
                b,
                ShadowBlock {
                    data,
                    old,
                    home: None,
                },
            );
        }
        let order = self.base.order;
        if let Some(block) = self.blocks.get_mut(&b) {
            write_entry(&mut block.data, i, order, value);
        }
        if value == 0 {
            self.lowest_freed = self.lowest_freed.min(cluster);
            if self.base.get(self.storage, cluster)? != 0 {
                self.freed.push(cluster);
            }
        }
        Ok(())
    }

    /// Adds `delta` to the refcount of the cluster at host `offset`; returns the new value.
    pub fn add(&mut self, offset: u64, delta: i64) -> Result<u64> {
        let cluster = offset >> self.base.cluster_bits;
        let old = self.get_cluster(cluster)?;
        let max = self.base.max_refcount();
        let new = if delta >= 0 {
            old.checked_add(delta as u64)
                .filter(|&v| v <= max)
                .ok_or(RefcountError::Overflow {
                    offset,
                    max,
                    bits: self.base.bits(),
                })?
        } else {
            old.checked_sub(delta.unsigned_abs())
                .ok_or(RefcountError::Underflow { offset })?
        };
        if new != old {
            self.set_cluster(cluster, new)?;
        }
        Ok(new)
    }

    /// Whether `cluster` is free in both views.
    fn is_free(&mut self, cluster: u64) -> Result<bool> {
        if self.base.get(self.storage, cluster)? != 0 || self.get_cluster(cluster)? != 0 {
            return Ok(false);
        }
        if self.base.metadata_at(cluster).is_some() || (self.is_metadata)(cluster) {
            log::warn!(
                "cluster {:#x} holds metadata but its refcount is 0; not reusing it",
                cluster << self.base.cluster_bits
            );
            return Ok(false);
        }
        Ok(true)
    }

    /// Takes `count` contiguous clusters that are free in both views, with refcount 1 in the new
    /// one; returns the host offset of the first.
    pub fn allocate(&mut self, count: u64) -> Result<u64> {
        let mut start = self.hint;
        let mut first_free = None;
        let mut cluster = start;
        while cluster - start < count {
            let free = self.is_free(cluster)?;
            cluster += 1;
            if free {
                first_free.get_or_insert(cluster - 1);
            } else {
                start = cluster;
            }
        }
        for c in start..start + count {
            self.set_cluster(c, 1)?;
        }
        self.hint = match first_free {
            Some(f) if f < start => f,
            _ => start + count,
        };
        Ok(start << self.base.cluster_bits)
    }

    /// Places the changed blocks and a new refcount table, and writes them into their (free)
    /// clusters. Nothing refers to them until the caller switches the header.
    pub fn finish(mut self) -> Result<ShadowCommit> {
        let cs = self.base.cluster_size();
        let per_cluster = cs / 8;
        // The current table goes with the current view.
        let old_table = self.base.table_offset;
        for c in 0..self.base.table_clusters() {
            self.add(old_table + c * cs, -1)?;
        }
        let mut table_home: Option<(u64, u64)> = None;
        let (table_offset, table_clusters) = loop {
            // Each changed block moves to a cluster of its own; choosing it may change (and so
            // move) further blocks, but every block moves once, so this ends.
            let unplaced: Vec<usize> = self
                .blocks
                .iter()
                .filter(|(_, b)| b.home.is_none())
                .map(|(&i, _)| i)
                .collect();
            if !unplaced.is_empty() {
                for index in unplaced {
                    let home = self.allocate(1)? >> self.base.cluster_bits;
                    let old = match self.blocks.get_mut(&index) {
                        Some(block) => {
                            block.home = Some(home);
                            block.old
                        }
                        None => 0,
                    };
                    if old != 0 {
                        self.add(old, -1)?;
                    }
                }
                continue;
            }
            let last_block = self.blocks.keys().next_back().copied().unwrap_or(0);
            let entries = (self.base.table.len().max(last_block + 1) as u64)
                .max(self.base.table_capacity)
                .next_multiple_of(per_cluster);
            let clusters = entries / per_cluster;
            match table_home {
                Some((at, have)) if have >= clusters => break (at, have),
                Some((at, have)) => {
                    // Too small after all: give the clusters back and take a larger run.
                    for c in 0..have {
                        self.add(at + c * cs, -1)?;
                    }
                }
                None => {}
            }
            table_home = Some((self.allocate(clusters)?, clusters));
        };

        // (Read before the changed blocks are taken out below.)
        let mut freed = std::mem::take(&mut self.freed);
        freed.sort_unstable();
        freed.dedup();
        let mut still_free = Vec::with_capacity(freed.len());
        for c in freed {
            if self.get_cluster(c)? == 0 {
                still_free.push(c);
            }
        }
        let mut table = self.base.table.clone();
        let mut blocks = Vec::with_capacity(self.blocks.len());
        let mut replaced_blocks = Vec::new();
        for (index, block) in std::mem::take(&mut self.blocks) {
            let Some(home) = block.home else {
                continue;
            };
            let offset = home << self.base.cluster_bits;
            super::write_all(self.storage, &block.data, offset)?;
            if table.len() <= index {
                table.resize(index + 1, 0);
            }
            table[index] = offset;
            if block.old != 0 {
                replaced_blocks.push(block.old);
            }
            blocks.push((offset, block.data));
        }
        let mut bytes = vec![0u8; (table_clusters * cs) as usize];
        for (i, e) in table.iter().enumerate() {
            bytes[i * 8..i * 8 + 8].copy_from_slice(&(e & REFTABLE_OFFSET_MASK).to_be_bytes());
        }
        super::write_all(self.storage, &bytes, table_offset)?;
        Ok(ShadowCommit {
            table,
            table_offset,
            table_clusters,
            blocks,
            replaced_blocks,
            lowest_freed: self.lowest_freed,
            freed: still_free,
        })
    }
}

impl Refcounts {
    /// Makes a shadow view current, once the header points at its table.
    pub fn install(&mut self, commit: &ShadowCommit) {
        let per_cluster = self.cluster_size() / 8;
        for old in &commit.replaced_blocks {
            self.blocks.pop(old);
        }
        for (offset, data) in &commit.blocks {
            self.blocks.put(*offset, data.clone());
        }
        self.block_clusters = commit
            .table
            .iter()
            .filter(|&&b| b != 0)
            .map(|b| b >> self.cluster_bits)
            .collect();
        self.table = commit.table.clone();
        self.table_offset = commit.table_offset;
        self.table_capacity = commit.table_clusters * per_cluster;
        self.free_hint = self.free_hint.min(commit.lowest_freed);
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;
    use crate::qcow2::create::{NewImage, create};
    use crate::qcow2::header::Header;
    use crate::qcow2::storage::FileStorage;

    fn header_of(storage: &dyn Storage) -> Header {
        let len = storage.len().expect("length");
        let mut start = vec![0u8; 4096.min(len as usize)];
        storage.read_at(&mut start, 0).expect("reading the header");
        Header::parse(&start, len).expect("a valid header")
    }

    /// 512-byte clusters and 16-bit refcounts: a block counts 256 clusters and the one-cluster
    /// table 64 blocks, so 20000 new clusters need new blocks and a larger table.
    #[test]
    fn a_shadow_leaves_the_file_alone_and_describes_itself() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("shadow.qcow2");
        let file = create(
            &path,
            &NewImage {
                size: 64 << 20,
                cluster_bits: 9,
                backing_file: None,
                backing_format: None,
            },
        )
        .expect("creating the image");
        let file = FileStorage::new(file, &path).expect("storage");
        let header = header_of(&file);
        let before = std::fs::read(&path).expect("reading the image");
        let mut base = Refcounts::load(&file, &header, before.len() as u64, 16).expect("load");
        let old_table = (base.table_offset, base.table_clusters());
        let old_blocks: Vec<u64> = base.table.iter().copied().filter(|&b| b != 0).collect();

        let no_metadata = |_: u64| false;
        let mut tx = Shadow::new(&mut base, &file, &no_metadata);
        let mut allocated = BTreeSet::new();
        for _ in 0..4 {
            let first = tx.allocate(5000).expect("allocate") >> 9;
            allocated.extend(first..first + 5000);
        }
        // A cluster that gains and loses a reference ends where it was.
        assert_eq!(tx.add(0, 1).expect("add"), 2);
        assert_eq!(tx.add(0, -1).expect("add"), 1);
        let commit = tx.finish().expect("finish");

        let after = std::fs::read(&path).expect("reading the image");
        assert_eq!(
            &after[..before.len()],
            &before[..],
            "the shadow wrote into clusters the current state uses"
        );
        assert_eq!(
            header_of(&file).refcount_table_offset,
            old_table.0,
            "the header is the caller's to switch"
        );

        // The new view, loaded from the file as a reopened image would.
        let (table_offset, table_clusters) = commit.table_location();
        let mut switched = header.clone();
        switched.refcount_table_offset = table_offset;
        switched.refcount_table_clusters = table_clusters;
        let mut view = Refcounts::load(&file, &switched, after.len() as u64, 16).expect("reload");
        let mut expected_used: BTreeSet<u64> = BTreeSet::new();
        expected_used.insert(0);
        let l1_first = header.l1_table_offset >> 9;
        expected_used.extend(l1_first..l1_first + (header.l1_size as u64 * 8).div_ceil(512));
        expected_used.extend(allocated.iter().copied());
        expected_used.extend((table_offset >> 9)..(table_offset >> 9) + table_clusters as u64);
        expected_used.extend(view.table.iter().filter(|&&b| b != 0).map(|b| b >> 9));
        let clusters = after.len() as u64 >> 9;
        for c in 0..clusters {
            let want = u64::from(expected_used.contains(&c));
            assert_eq!(view.get(&file, c).expect("get"), want, "cluster {c}");
        }
        for c in old_table.0 >> 9..(old_table.0 >> 9) + old_table.1 {
            assert!(
                !expected_used.contains(&c),
                "old table cluster {c} still in use"
            );
        }
        for b in old_blocks {
            assert!(
                !view.table.contains(&b),
                "block {b:#x} was changed in place instead of moved"
            );
        }
        assert!(view.table.len() > 64, "the table grew");
        let freed = commit.freed_ranges(9);
        assert!(
            freed.iter().any(|&(o, _)| o == old_table.0),
            "the old table is reported freed: {freed:?}"
        );
    }
}
