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

use super::{Refcount, Refcounts, Result, encode_table, read_entry, write_entry};
use crate::qcow2::offsets::{HostCluster, HostOffset};
use crate::qcow2::storage::Storage;

/// A refcount block of the new view.
struct ShadowBlock {
    data: Vec<u8>,
    /// Where the block lived in the current view (None: the range had no block).
    old: Option<HostOffset>,
    /// The cluster the copy goes to, once chosen.
    home: Option<HostCluster>,
}

/// The refcounts as they will be once the caller's operation is switched in.
pub struct Shadow<'a> {
    base: &'a mut Refcounts,
    storage: &'a dyn Storage,
    /// Changed blocks, by block index.
    blocks: BTreeMap<usize, ShadowBlock>,
    /// Where the search for free clusters goes on from.
    hint: HostCluster,
    /// The lowest cluster that the new view frees, for the allocator afterwards.
    lowest_freed: HostCluster,
    /// Clusters in use now that the new view frees (some may be taken again before the end).
    freed: Vec<HostCluster>,
    /// Clusters the current view must not lose to an allocation although their refcount says
    /// free (metadata that a damaged refcount forgot).
    is_metadata: &'a dyn Fn(HostCluster) -> bool,
}

/// A new view written to the file, to be installed once the header points at it.
pub struct ShadowCommit {
    table: Vec<Option<HostOffset>>,
    table_offset: HostOffset,
    table_clusters: u64,
    blocks: Vec<(HostOffset, Vec<u8>)>,
    replaced_blocks: Vec<HostOffset>,
    lowest_freed: HostCluster,
    freed: Vec<HostCluster>,
}

impl ShadowCommit {
    /// The header fields `refcount_table_offset` and `refcount_table_clusters`.
    pub fn table_location(&self) -> (u64, u32) {
        // At most QEMU's 8 MiB of table: the cluster count fits the header's 32 bits.
        (self.table_offset.0, self.table_clusters as u32)
    }

    /// The host ranges (offset, length) that the current state uses and the new one does not,
    /// merged where they touch: once the new state is in, their bytes are of no use.
    pub fn freed_ranges(&self, cluster_bits: u32) -> Vec<(u64, u64)> {
        let mut ranges: Vec<(u64, u64)> = Vec::new();
        for &HostCluster(c) in &self.freed {
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
        is_metadata: &'a dyn Fn(HostCluster) -> bool,
    ) -> Self {
        let hint = base.free_hint.max(HostCluster(1));
        Shadow {
            base,
            storage,
            blocks: BTreeMap::new(),
            hint,
            lowest_freed: HostCluster(u64::MAX),
            freed: Vec::new(),
            is_metadata,
        }
    }

    pub fn cluster_bits(&self) -> u32 {
        self.base.cluster_bits
    }

    /// The refcount of the cluster at host `offset` in the new view.
    pub fn get(&mut self, offset: HostOffset) -> Result<Refcount> {
        let cluster = self.base.cluster_of(offset);
        self.get_cluster(cluster)
    }

    fn get_cluster(&mut self, cluster: HostCluster) -> Result<Refcount> {
        let (b, i) = self.base.block_of(cluster);
        match self.blocks.get(&b) {
            Some(block) => Ok(Refcount(read_entry(&block.data, i, self.base.order))),
            None => self.base.get(self.storage, cluster),
        }
    }

    fn set_cluster(&mut self, cluster: HostCluster, value: u64) -> Result<()> {
        let (b, i) = self.base.block_of(cluster);
        if !self.blocks.contains_key(&b) {
            let old = self.base.block_entry(b);
            let data = match old {
                None => vec![0u8; self.base.cluster_size() as usize],
                Some(old) => self.base.block(self.storage, old)?.clone(),
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
            if self.base.get(self.storage, cluster)? != Refcount::FREE {
                self.freed.push(cluster);
            }
        }
        Ok(())
    }

    /// Adds `delta` to the refcount of the cluster at host `offset`; returns the new value.
    pub fn add(&mut self, offset: HostOffset, delta: i64) -> Result<Refcount> {
        let cluster = self.base.cluster_of(offset);
        let old = self.get_cluster(cluster)?;
        let new = self.base.add_delta(old.0, delta, offset)?;
        if new != old.0 {
            self.set_cluster(cluster, new)?;
        }
        Ok(Refcount(new))
    }

    /// Adds `delta` to each of `count` clusters from `first`.
    fn add_run(&mut self, first: HostOffset, count: u64, delta: i64) -> Result<()> {
        for cluster in self.base.cluster_of(first).run(count) {
            let at = self.base.offset_of(cluster);
            self.add(at, delta)?;
        }
        Ok(())
    }

    /// Whether `cluster` is free in both views.
    fn is_free(&mut self, cluster: HostCluster) -> Result<bool> {
        if self.base.get(self.storage, cluster)? != Refcount::FREE
            || self.get_cluster(cluster)? != Refcount::FREE
        {
            return Ok(false);
        }
        if self.base.metadata_at(cluster).is_some() || (self.is_metadata)(cluster) {
            log::warn!(
                "cluster {:#x} holds metadata but its refcount is 0; not reusing it",
                self.base.offset_of(cluster).0
            );
            return Ok(false);
        }
        Ok(true)
    }

    /// Takes `count` contiguous clusters that are free in both views, with refcount 1 in the new
    /// one; returns the host offset of the first.
    pub fn allocate(&mut self, count: u64) -> Result<HostOffset> {
        let mut start = self.hint;
        let mut first_free = None;
        let mut cluster = start;
        while cluster.0 - start.0 < count {
            let free = self.is_free(cluster)?;
            if free {
                first_free.get_or_insert(cluster);
            }
            cluster = cluster.plus(1);
            if !free {
                start = cluster;
            }
        }
        for c in start.run(count) {
            self.set_cluster(c, 1)?;
        }
        self.hint = match first_free {
            Some(f) if f < start => f,
            _ => start.plus(count),
        };
        Ok(self.base.offset_of(start))
    }

    /// Places the changed blocks and a new refcount table, and writes them into their (free)
    /// clusters. Nothing refers to them until the caller switches the header.
    pub fn finish(mut self) -> Result<ShadowCommit> {
        let cs = self.base.cluster_size();
        let per_cluster = cs / crate::qcow2::limits::REFTABLE_ENTRY_SIZE;
        // The current table goes with the current view.
        let old_table = self.base.table_offset;
        let old_table_clusters = self.base.table_clusters();
        self.add_run(old_table, old_table_clusters, -1)?;
        let mut table_home: Option<(HostOffset, u64)> = None;
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
                    let home = self.allocate(1)?;
                    let home = self.base.cluster_of(home);
                    let old = match self.blocks.get_mut(&index) {
                        Some(block) => {
                            block.home = Some(home);
                            block.old
                        }
                        None => None,
                    };
                    if let Some(old) = old {
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
                    self.add_run(at, have, -1)?;
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
            if self.get_cluster(c)? == Refcount::FREE {
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
            let offset = self.base.offset_of(home);
            super::write_all(self.storage, &block.data, offset)?;
            if table.len() <= index {
                table.resize(index + 1, None);
            }
            table[index] = Some(offset);
            if let Some(old) = block.old {
                replaced_blocks.push(old);
            }
            blocks.push((offset, block.data));
        }
        let bytes = encode_table(&table, table_clusters * cs);
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
        let per_cluster = self.cluster_size() / crate::qcow2::limits::REFTABLE_ENTRY_SIZE;
        for old in &commit.replaced_blocks {
            self.blocks.pop(old);
        }
        for (offset, data) in &commit.blocks {
            self.blocks.put(*offset, data.clone());
        }
        self.block_clusters = commit
            .table
            .iter()
            .flatten()
            .map(|&b| self.cluster_of(b))
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
        let storage = create(
            &path,
            &NewImage {
                size: 64 << 20,
                cluster_bits: 9,
                backing_file: None,
                backing_format: None,
            },
        )
        .expect("creating the image");
        let file = storage.as_ref();
        let header = header_of(file);
        let before = std::fs::read(&path).expect("reading the image");
        let mut base = Refcounts::load(file, &header, before.len() as u64, 16).expect("load");
        let old_table = (base.table_offset, base.table_clusters());
        let old_blocks: Vec<HostOffset> = base.table.iter().flatten().copied().collect();

        let no_metadata = |_: HostCluster| false;
        let mut tx = Shadow::new(&mut base, file, &no_metadata);
        let mut allocated = BTreeSet::new();
        for _ in 0..4 {
            let first = tx.allocate(5000).expect("allocate").0 >> 9;
            allocated.extend(first..first + 5000);
        }
        // A cluster that gains and loses a reference ends where it was.
        assert_eq!(tx.add(HostOffset(0), 1).expect("add"), Refcount(2));
        assert_eq!(tx.add(HostOffset(0), -1).expect("add"), Refcount(1));
        let commit = tx.finish().expect("finish");

        let after = std::fs::read(&path).expect("reading the image");
        assert_eq!(
            &after[..before.len()],
            &before[..],
            "the shadow wrote into clusters the current state uses"
        );
        assert_eq!(
            header_of(file).refcount_table_offset,
            old_table.0.0,
            "the header is the caller's to switch"
        );

        // The new view, loaded from the file as a reopened image would.
        let (table_offset, table_clusters) = commit.table_location();
        let mut switched = header.clone();
        switched.refcount_table_offset = table_offset;
        switched.refcount_table_clusters = table_clusters;
        let mut view = Refcounts::load(file, &switched, after.len() as u64, 16).expect("reload");
        let mut expected_used: BTreeSet<u64> = BTreeSet::new();
        expected_used.insert(0);
        let l1_first = header.l1_table_offset >> 9;
        expected_used.extend(l1_first..l1_first + (header.l1_size as u64 * 8).div_ceil(512));
        expected_used.extend(allocated.iter().copied());
        expected_used.extend((table_offset >> 9)..(table_offset >> 9) + table_clusters as u64);
        expected_used.extend(view.table.iter().flatten().map(|b| b.0 >> 9));
        let clusters = after.len() as u64 >> 9;
        for c in 0..clusters {
            let want = u64::from(expected_used.contains(&c));
            assert_eq!(
                view.get(file, HostCluster(c)).expect("get"),
                Refcount(want),
                "cluster {c}"
            );
        }
        for c in old_table.0.0 >> 9..(old_table.0.0 >> 9) + old_table.1 {
            assert!(
                !expected_used.contains(&c),
                "old table cluster {c} still in use"
            );
        }
        for b in old_blocks {
            assert!(
                !view.table.contains(&Some(b)),
                "block {:#x} was changed in place instead of moved",
                b.0
            );
        }
        assert!(view.table.len() > 64, "the table grew");
        let freed = commit.freed_ranges(9);
        assert!(
            freed.iter().any(|&(o, _)| o == old_table.0.0),
            "the old table is reported freed: {freed:?}"
        );
    }
}
