//! Reference counts and cluster allocation.
//!
//! From the spec: "qcow2 manages the allocation of host clusters by maintaining a reference count
//! for each host cluster ... The refcount table has a variable size and contains pointers to
//! refcount blocks. Each refcount block is one cluster and contains `cluster_size * 8 /
//! refcount_bits` entries." Entries of 8 bits or more are big-endian; narrower ones are packed into
//! bytes from the least significant bit up.
//!
//! Two kinds of numbers meet here and are kept apart by type: a [`HostCluster`] is what a
//! refcount counts (an index into the refcount blocks), a [`HostOffset`] is where bytes lie (a
//! block, the table, an allocated run). Callers speak offsets (they write there); the counting
//! is done on clusters.
//!
//! Every change is written to the file at once, but a write is durable only after a flush (see
//! [`crate::qcow2::storage`]). Inside the refcount structure this module orders what depends on
//! what with flushes of its own: a new refcount block (and its own refcount) before the table
//! entry that names it, a new table before the header switches to it, and that header write
//! before the old table is freed. Ordering refcounts against the L1/L2 entries that use them
//! is the callers' job ([`crate::qcow2::ordering`]): raised and flushed before anything points
//! at the cluster, lowered only after the pointer's removal is durable.
//!
//! Operations that must change many refcounts together with the entries that point at the
//! clusters (snapshot create, revert, delete) use a [`Shadow`] instead: a private copy of the
//! changed blocks that goes live with one header write.
//!
//! A range of clusters without a refcount block is entirely free. A new block goes, as in QEMU,
//! into a free cluster that some existing block can count, or into its own range, where it counts
//! itself; either way its own refcount is on disk before the table points at it.

use std::collections::{BTreeMap, HashSet};
use std::ops::Range;

use lru::LruCache;

use crate::qcow2::error::MetadataError;
use crate::qcow2::header::{FieldWrite, Header};
use crate::qcow2::limits::{MAX_REFTABLE_BYTES, REFTABLE_ENTRY_SIZE};
use crate::qcow2::offsets::{HostCluster, HostOffset};
use crate::qcow2::storage::Storage;

mod shadow;
pub use shadow::{Shadow, ShadowCommit};

/// Bits 9–63 of a refcount table entry: the offset of a refcount block.
const REFTABLE_OFFSET_MASK: u64 = 0xffff_ffff_ffff_fe00;

/// The number of references to a host cluster: one per L1 table path that reaches it (QEMU's
/// rule), 0 for a free cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Refcount(pub u64);

impl Refcount {
    pub const FREE: Refcount = Refcount(0);

    /// Exactly one reference: what an L1/L2 entry's COPIED flag says, and what allows a write
    /// in place.
    pub fn is_sole(self) -> bool {
        self.0 == 1
    }
}

/// Why a refcount operation failed.
#[derive(Debug, thiserror::Error)]
pub enum RefcountError {
    #[error(transparent)]
    Metadata(#[from] MetadataError),
    #[error(
        "refcount of cluster at {offset:#x} would exceed the maximum {max} of {bits}-bit refcounts"
    )]
    Overflow { offset: u64, max: u64, bits: u32 },
    #[error("refcount of cluster at {offset:#x} would drop below zero")]
    Underflow { offset: u64 },
    #[error(
        "the refcount table would need {clusters} clusters, more than QEMU's limit of {max_bytes} bytes"
    )]
    TableTooLarge { clusters: u64, max_bytes: u64 },
    /// Internal: a block had to go into a range the refcount table does not reach yet.
    #[error("refcount table too small for range {range}")]
    NeedsGrowth { range: u64 },
    #[error("writing refcount metadata at {offset:#x}: {source}")]
    Io {
        offset: u64,
        #[source]
        source: std::io::Error,
    },
}

type Result<T> = std::result::Result<T, RefcountError>;

/// The refcount table and a cache of refcount blocks.
pub struct Refcounts {
    cluster_bits: u32,
    /// log2 of the refcount width in bits.
    order: u32,
    /// log2 of the entries in one refcount block.
    block_bits: u32,
    table_offset: HostOffset,
    /// Refcount table entries, by block index (None = no block: the range is free).
    table: Vec<Option<HostOffset>>,
    /// The clusters that hold refcount blocks, for overlap checks.
    block_clusters: HashSet<HostCluster>,
    /// How many entries the on-disk table has room for.
    table_capacity: u64,
    /// Refcount blocks by where they lie.
    blocks: LruCache<HostOffset, Vec<u8>>,
    /// Byte ranges of cached blocks changed in memory and not yet written (the counts of a data
    /// reservation, [`Refcounts::allocate_unwritten`]): written before the block leaves the
    /// cache and by [`Refcounts::write_unwritten`].
    unwritten: BTreeMap<HostOffset, (usize, usize)>,
    /// No free cluster lies below this one.
    free_hint: HostCluster,
}

/// When [`Refcounts::set_run`] writes what it changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Write {
    Now,
    Later,
}

fn io_err(offset: HostOffset) -> impl FnOnce(std::io::Error) -> RefcountError {
    move |source| RefcountError::Io {
        offset: offset.0,
        source,
    }
}

fn write_all(storage: &dyn Storage, buf: &[u8], offset: HostOffset) -> Result<()> {
    storage.write_at(buf, offset.0).map_err(io_err(offset))
}

/// A refcount table as stored: its entries big-endian, then zeros up to `clusters` clusters.
fn encode_table(table: &[Option<HostOffset>], len: u64) -> Vec<u8> {
    let mut bytes = vec![0u8; len as usize];
    for (slot, e) in bytes.chunks_exact_mut(8).zip(table) {
        let raw = e.map_or(0, |o| o.0 & REFTABLE_OFFSET_MASK);
        slot.copy_from_slice(&raw.to_be_bytes());
    }
    bytes
}

impl Refcounts {
    /// Loads the refcount table described by `header`. `cache_blocks` bounds the blocks kept.
    pub fn load(
        storage: &dyn Storage,
        header: &Header,
        file_len: u64,
        cache_blocks: usize,
    ) -> Result<Self> {
        let cluster_size = header.cluster_size();
        let capacity = header.refcount_table_clusters as u64 * cluster_size / REFTABLE_ENTRY_SIZE;
        let offset = header.refcount_table_offset;
        // Memory follows what the file holds, not what the header claims.
        let in_file = file_len
            .saturating_sub(offset)
            .min(capacity * REFTABLE_ENTRY_SIZE);
        let mut bytes = vec![0u8; in_file as usize];
        storage
            .read_at(&mut bytes, offset)
            .map_err(|e| MetadataError::Read {
                what: "refcount table",
                offset,
                reason: e.to_string(),
            })?;
        let mut table = Vec::with_capacity(bytes.len() / 8);
        for (i, c) in bytes.chunks_exact(8).enumerate() {
            let entry = u64::from_be_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]);
            let block = entry & REFTABLE_OFFSET_MASK;
            if block & (cluster_size - 1) != 0 {
                return Err(MetadataError::Unaligned {
                    table: "refcount table",
                    index: i as u64,
                    offset: block,
                }
                .into());
            }
            if block != 0 && block < cluster_size {
                return Err(MetadataError::PointsAtHeader {
                    table: "refcount table",
                    index: i as u64,
                    offset: block,
                }
                .into());
            }
            table.push((block != 0).then_some(HostOffset(block)));
        }
        let order = header.refcount_order;
        let cluster_bits = header.cluster_bits;
        Ok(Refcounts {
            cluster_bits,
            order,
            block_bits: cluster_bits + 3 - order,
            table_offset: HostOffset(offset),
            block_clusters: table
                .iter()
                .flatten()
                .map(|b| HostCluster(b.0 >> cluster_bits))
                .collect(),
            table,
            table_capacity: capacity,
            blocks: LruCache::new(
                std::num::NonZeroUsize::new(cache_blocks.max(4))
                    .unwrap_or(std::num::NonZeroUsize::MIN),
            ),
            free_hint: HostCluster(0),
            unwritten: BTreeMap::new(),
        })
    }

    fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    fn cluster_of(&self, offset: HostOffset) -> HostCluster {
        HostCluster(offset.0 >> self.cluster_bits)
    }

    fn offset_of(&self, cluster: HostCluster) -> HostOffset {
        HostOffset(cluster.0 << self.cluster_bits)
    }

    fn bits(&self) -> u32 {
        1 << self.order
    }

    pub fn max_refcount(&self) -> u64 {
        if self.bits() == 64 {
            u64::MAX
        } else {
            (1 << self.bits()) - 1
        }
    }

    /// `old` changed by `delta`, within 0 ..= the largest refcount; `at` names the cluster in
    /// the error.
    fn add_delta(&self, old: u64, delta: i64, at: HostOffset) -> Result<u64> {
        if delta >= 0 {
            old.checked_add(delta as u64)
                .filter(|&v| v <= self.max_refcount())
                .ok_or(RefcountError::Overflow {
                    offset: at.0,
                    max: self.max_refcount(),
                    bits: self.bits(),
                })
        } else {
            old.checked_sub(delta.unsigned_abs())
                .ok_or(RefcountError::Underflow { offset: at.0 })
        }
    }

    /// What refcount metadata, if any, lives in `cluster`: the table or a block.
    pub fn metadata_at(&self, cluster: HostCluster) -> Option<&'static str> {
        let first = self.cluster_of(self.table_offset);
        if (first.0..first.0 + self.table_clusters()).contains(&cluster.0) {
            return Some("the refcount table");
        }
        self.block_clusters
            .contains(&cluster)
            .then_some("a refcount block")
    }

    pub fn table_offset(&self) -> HostOffset {
        self.table_offset
    }

    pub fn table_clusters(&self) -> u64 {
        (self.table_capacity * REFTABLE_ENTRY_SIZE).div_ceil(self.cluster_size())
    }

    /// The refcount block index of `cluster` and its entry in that block.
    fn block_of(&self, cluster: HostCluster) -> (usize, usize) {
        (
            (cluster.0 >> self.block_bits) as usize,
            (cluster.0 & ((1 << self.block_bits) - 1)) as usize,
        )
    }

    fn block_entry(&self, index: usize) -> Option<HostOffset> {
        self.table.get(index).copied().flatten()
    }

    /// The block at `offset`, loaded into the cache.
    fn block(&mut self, storage: &dyn Storage, offset: HostOffset) -> Result<&mut Vec<u8>> {
        if !self.blocks.contains(&offset) {
            let mut data = vec![0u8; self.cluster_size() as usize];
            storage
                .read_at(&mut data, offset.0)
                .map_err(|e| MetadataError::Read {
                    what: "refcount block",
                    offset: offset.0,
                    reason: e.to_string(),
                })?;
            self.make_room(storage)?;
            self.blocks.put(offset, data);
        }
        self.blocks
            .get_mut(&offset)
            .ok_or(RefcountError::Underflow { offset: offset.0 })
    }

    /// The refcount of `cluster`.
    pub fn get(&mut self, storage: &dyn Storage, cluster: HostCluster) -> Result<Refcount> {
        let (b, i) = self.block_of(cluster);
        let Some(block) = self.block_entry(b) else {
            return Ok(Refcount::FREE);
        };
        let order = self.order;
        Ok(Refcount(read_entry(self.block(storage, block)?, i, order)))
    }

    /// Sets entry `i` of the (existing) block `block` to `value` and writes the changed bytes.
    fn write_block_entry(
        &mut self,
        storage: &dyn Storage,
        block: HostOffset,
        i: usize,
        value: u64,
    ) -> Result<()> {
        let order = self.order;
        let data = self.block(storage, block)?;
        let (start, len) = write_entry(data, i, order, value);
        let bytes = data[start..start + len].to_vec();
        write_all(storage, &bytes, HostOffset(block.0 + start as u64))
    }

    /// Sets the refcount of `cluster`, creating its refcount block (and growing the table) if
    /// needed, and writes the change through.
    fn set(&mut self, storage: &dyn Storage, cluster: HostCluster, value: u64) -> Result<()> {
        let (b, i) = self.block_of(cluster);
        let block = self.ensure_block(storage, b)?;
        self.write_block_entry(storage, block, i, value)?;
        if value == 0 {
            self.free_hint = self.free_hint.min(cluster);
        }
        Ok(())
    }

    /// Adds `delta` to the refcount of the cluster at host `offset`; returns the new value.
    pub fn update(
        &mut self,
        storage: &dyn Storage,
        offset: HostOffset,
        delta: i64,
    ) -> Result<Refcount> {
        let cluster = self.cluster_of(offset);
        let old = self.get(storage, cluster)?;
        let new = self.add_delta(old.0, delta, offset)?;
        self.set(storage, cluster, new)?;
        Ok(Refcount(new))
    }

    /// Whether the cluster may be handed out (refcount 0; a range without a block is free).
    fn is_free(&mut self, storage: &dyn Storage, cluster: HostCluster) -> Result<bool> {
        Ok(self.get(storage, cluster)? == Refcount::FREE)
    }

    /// Finds `count` free clusters in a row; returns where the run starts and the first free
    /// cluster seen on the way (everything below it is in use: the next search can start there).
    /// Cluster 0 (the header) is never free.
    fn find_free_run(
        &mut self,
        storage: &dyn Storage,
        count: u64,
    ) -> Result<(HostCluster, HostCluster)> {
        let mut start = self.free_hint.max(HostCluster(1));
        let mut first_free = None;
        let mut cluster = start;
        while cluster.0 - start.0 < count {
            let free = self.is_free(storage, cluster)?;
            cluster = cluster.plus(1);
            if free {
                first_free.get_or_insert(HostCluster(cluster.0 - 1));
            } else {
                start = cluster;
            }
        }
        Ok((start, first_free.unwrap_or(start)))
    }

    /// Allocates `count` contiguous clusters with refcount 1; returns the host offset of the first.
    pub fn allocate(&mut self, storage: &dyn Storage, count: u64) -> Result<HostOffset> {
        self.allocate_run(storage, count, Write::Now)
    }

    /// [`Refcounts::allocate`] whose counts stay in memory until [`Refcounts::write_unwritten`]
    /// (or until their block leaves the cache): for data clusters that nothing names until
    /// entries are written after that (`ordering.rs`), so that a process killed before then
    /// leaves the file with neither the counts nor the entries (nothing leaks), as QEMU's
    /// write-back refcount cache does. New refcount blocks the run needs are written at once.
    pub fn allocate_unwritten(&mut self, storage: &dyn Storage, count: u64) -> Result<HostOffset> {
        self.allocate_run(storage, count, Write::Later)
    }

    fn allocate_run(
        &mut self,
        storage: &dyn Storage,
        count: u64,
        write: Write,
    ) -> Result<HostOffset> {
        'search: loop {
            let (first, first_free) = self.find_free_run(storage, count)?;
            let run = first.0..first.0 + count;
            let last_block = (run.end - 1) >> self.block_bits;
            if last_block >= self.table_capacity {
                self.grow_table(storage, last_block + 1)?;
                continue;
            }
            // Blocks for the run's ranges go elsewhere, so the run stays free.
            for b in (first.0 >> self.block_bits)..=last_block {
                if self.block_entry(b as usize).is_none() {
                    match self.place_block(storage, b as usize, run.clone(), self.table_capacity) {
                        Err(RefcountError::NeedsGrowth { range }) => {
                            self.grow_table(storage, range + 1)?;
                            continue 'search;
                        }
                        other => {
                            other?;
                        }
                    }
                }
            }
            self.set_run(storage, first, count, 1, write)?;
            self.free_hint = if first_free < first {
                first_free
            } else {
                first.plus(count)
            };
            return Ok(self.offset_of(first));
        }
    }

    /// Places refcount block `index` in a free cluster outside `exclude` (cluster indices): one
    /// that an existing block counts, or one in its own range (where the new block counts
    /// itself). A wholly free range met on the way gets its own block first, so that its
    /// clusters can be counted.
    fn place_block(
        &mut self,
        storage: &dyn Storage,
        index: usize,
        exclude: Range<u64>,
        disk_capacity: u64,
    ) -> Result<HostOffset> {
        let mut cluster = self.free_hint.max(HostCluster(1));
        loop {
            if exclude.contains(&cluster.0) {
                cluster = HostCluster(exclude.end);
                continue;
            }
            let range = cluster.0 >> self.block_bits;
            if range >= self.table_capacity {
                return Err(RefcountError::NeedsGrowth { range });
            }
            if self.block_entry(range as usize).is_some() {
                if self.is_free(storage, cluster)? {
                    return self.create_block(storage, index, cluster, disk_capacity);
                }
                cluster = cluster.plus(1);
            } else if range as usize == index {
                return self.create_block(storage, index, cluster, disk_capacity);
            } else {
                self.create_block(storage, range as usize, cluster, disk_capacity)?;
                cluster = cluster.plus(1);
            }
        }
    }

    /// Sets the refcounts of `count` clusters from `first` to `value`, one write per block.
    fn set_run(
        &mut self,
        storage: &dyn Storage,
        first: HostCluster,
        count: u64,
        value: u64,
        write: Write,
    ) -> Result<()> {
        let order = self.order;
        let end = first.0 + count;
        let mut cluster = first;
        while cluster.0 < end {
            let (b, i) = self.block_of(cluster);
            let block = self.ensure_block(storage, b)?;
            let in_block = ((1u64 << self.block_bits) - i as u64).min(end - cluster.0);
            let data = self.block(storage, block)?;
            let (start, _) = write_entry(data, i, order, value);
            let mut stop = start;
            for n in 0..in_block as usize {
                let (s, len) = write_entry(data, i + n, order, value);
                stop = stop.max(s + len);
            }
            match write {
                Write::Now => {
                    let bytes = data[start..stop].to_vec();
                    write_all(storage, &bytes, HostOffset(block.0 + start as u64))?;
                }
                Write::Later => {
                    self.unwritten
                        .entry(block)
                        .and_modify(|(a, b)| (*a, *b) = ((*a).min(start), (*b).max(stop)))
                        .or_insert((start, stop));
                }
            }
            cluster = cluster.plus(in_block);
        }
        if value == 0 {
            self.free_hint = self.free_hint.min(first);
        }
        Ok(())
    }

    /// Gives back `count` clusters from host `offset` that [`Refcounts::allocate_unwritten`]
    /// handed out and nothing names (each has refcount 1): their counts go to 0 in memory, to
    /// be written with the other unwritten counts (nothing names them: the write needs no
    /// order, and changes nothing if their raised counts were never written).
    pub fn give_back(
        &mut self,
        storage: &dyn Storage,
        offset: HostOffset,
        count: u64,
    ) -> Result<()> {
        let first = self.cluster_of(offset);
        self.set_run(storage, first, count, 0, Write::Later)
    }

    /// Drops one reference to each of `count` clusters from host `offset`.
    pub fn free(&mut self, storage: &dyn Storage, offset: HostOffset, count: u64) -> Result<()> {
        for cluster in self.cluster_of(offset).run(count) {
            let at = self.offset_of(cluster);
            self.update(storage, at, -1)?;
        }
        Ok(())
    }

    /// Refcount block `index`, created if it does not exist.
    fn ensure_block(&mut self, storage: &dyn Storage, index: usize) -> Result<HostOffset> {
        loop {
            if index as u64 >= self.table_capacity {
                self.grow_table(storage, index as u64 + 1)?;
            }
            if let Some(block) = self.block_entry(index) {
                return Ok(block);
            }
            match self.place_block(storage, index, 0..0, self.table_capacity) {
                Err(RefcountError::NeedsGrowth { range }) => self.grow_table(storage, range + 1)?,
                other => return other,
            }
        }
    }

    /// Moves the refcount table to a larger place holding at least `min_entries` entries:
    /// write the new table, flush, switch the header to it in one write, then free the old one.
    fn grow_table(&mut self, storage: &dyn Storage, min_entries: u64) -> Result<()> {
        let per_cluster = self.cluster_size() / REFTABLE_ENTRY_SIZE;
        let mut entries = min_entries
            .max(self.table_capacity * 2)
            .max(per_cluster)
            .next_multiple_of(per_cluster);
        let old_offset = self.table_offset;
        let old_clusters = self.table_clusters();
        let old_capacity = self.table_capacity;
        let (first, clusters) = 'place: loop {
            let clusters = entries / per_cluster;
            // QEMU refuses to open an image whose refcount table is larger (so it always fits
            // the header's 32-bit field). Checked before anything changes.
            if clusters << self.cluster_bits > MAX_REFTABLE_BYTES {
                return Err(RefcountError::TableTooLarge {
                    clusters,
                    max_bytes: MAX_REFTABLE_BYTES,
                });
            }
            let (first, _) = self.find_free_run(storage, clusters)?;
            let run = first.0..first.0 + clusters;
            let last_block = (run.end - 1) >> self.block_bits;
            if last_block + 2 > entries {
                entries = (last_block + 2).next_multiple_of(per_cluster);
                continue;
            }
            // New blocks are entered in the new table only (the old on-disk table keeps its
            // size); the blocks the new table's own clusters need are created now.
            self.table_capacity = entries;
            for b in (first.0 >> self.block_bits)..=last_block {
                if self.block_entry(b as usize).is_none() {
                    match self.place_block(storage, b as usize, run.clone(), old_capacity) {
                        Err(RefcountError::NeedsGrowth { range }) => {
                            entries = (range + 2).next_multiple_of(per_cluster).max(entries * 2);
                            continue 'place;
                        }
                        other => {
                            other?;
                        }
                    }
                }
            }
            break (first, clusters);
        };
        // The new table's own refcounts, before anything points at it.
        for cluster in first.run(clusters) {
            let (b, i) = self.block_of(cluster);
            let block = self
                .block_entry(b)
                .ok_or(RefcountError::NeedsGrowth { range: b as u64 })?;
            self.write_block_entry(storage, block, i, 1)?;
        }
        let new_offset = self.offset_of(first);
        let bytes = encode_table(&self.table, self.table_capacity * REFTABLE_ENTRY_SIZE);
        write_all(storage, &bytes, new_offset)?;
        // The table is on disk before the header names it.
        storage.flush().map_err(io_err(new_offset))?;
        // The switch: the table's offset and size in one write.
        let (at, header) = FieldWrite::RefcountTable {
            offset: new_offset.0,
            // At most MAX_REFTABLE_BYTES of clusters, checked above.
            clusters: clusters as u32,
        }
        .encode();
        write_all(storage, &header, HostOffset(at))?;
        // The header names the new table on disk before the old one's clusters can be freed
        // (and reused): a crash in between must not leave the header on a freed table.
        storage.flush().map_err(io_err(HostOffset(at)))?;
        self.table_offset = new_offset;
        self.free_hint = self.free_hint.min(self.cluster_of(old_offset));
        self.free(storage, old_offset, old_clusters)
    }

    /// Creates block `index` in cluster `at` (free); returns where it is. Its own refcount goes
    /// into itself when `at` lies in its range, else into the existing block of `at`'s range;
    /// then the table entry points at it — written to the on-disk table only where that table
    /// has room (`disk_capacity`: a table being replaced keeps its size).
    fn create_block(
        &mut self,
        storage: &dyn Storage,
        index: usize,
        at: HostCluster,
        disk_capacity: u64,
    ) -> Result<HostOffset> {
        let offset = self.offset_of(at);
        let (range, entry) = self.block_of(at);
        let mut data = vec![0u8; self.cluster_size() as usize];
        if range == index {
            write_entry(&mut data, entry, self.order, 1);
        }
        write_all(storage, &data, offset)?;
        if range != index {
            let counting = self.block_entry(range).ok_or(RefcountError::NeedsGrowth {
                range: range as u64,
            })?;
            self.write_block_entry(storage, counting, entry, 1)?;
        }
        if self.table.len() <= index {
            self.table.resize(index + 1, None);
        }
        self.table[index] = Some(offset);
        self.block_clusters.insert(at);
        if (index as u64) < disk_capacity {
            // The block and its own refcount are on disk before the table points at it: a table
            // entry naming a cluster that still reads as zeros would count nothing, its own
            // cluster included (QEMU's `alloc_refcount_block` flushes here too). A block for a
            // new table (`disk_capacity` too small) is made durable by that table's flush.
            storage.flush().map_err(io_err(offset))?;
            write_all(
                storage,
                &offset.0.to_be_bytes(),
                HostOffset(self.table_offset.0 + index as u64 * REFTABLE_ENTRY_SIZE),
            )?;
        }
        self.make_room(storage)?;
        self.blocks.put(offset, data);
        Ok(offset)
    }

    /// Before a block enters a full cache: the one it evicts is written first if it holds
    /// unwritten counts (evicted unwritten, they would be lost).
    fn make_room(&mut self, storage: &dyn Storage) -> Result<()> {
        if self.blocks.len() < self.blocks.cap().get() {
            return Ok(());
        }
        let Some((&offset, data)) = self.blocks.peek_lru() else {
            return Ok(());
        };
        if let Some(&(start, end)) = self.unwritten.get(&offset) {
            write_all(
                storage,
                &data[start..end],
                HostOffset(offset.0 + start as u64),
            )?;
            self.unwritten.remove(&offset);
        }
        Ok(())
    }

    /// Writes every count changed in memory and not yet written
    /// ([`Refcounts::allocate_unwritten`], [`Refcounts::give_back`]).
    pub fn write_unwritten(&mut self, storage: &dyn Storage) -> Result<()> {
        while let Some((&offset, &(start, end))) = self.unwritten.iter().next() {
            if let Some(data) = self.blocks.peek(&offset) {
                write_all(
                    storage,
                    &data[start..end],
                    HostOffset(offset.0 + start as u64),
                )?;
            }
            self.unwritten.remove(&offset);
        }
        Ok(())
    }

    /// Whether counts wait to be written.
    pub fn has_unwritten(&self) -> bool {
        !self.unwritten.is_empty()
    }
}

/// Reads entry `index` of a refcount block of 2^`order`-bit entries.
pub fn read_entry(block: &[u8], index: usize, order: u32) -> u64 {
    let bits = 1usize << order;
    if bits >= 8 {
        let bytes = bits / 8;
        block[index * bytes..(index + 1) * bytes]
            .iter()
            .fold(0u64, |acc, &b| (acc << 8) | b as u64)
    } else {
        let bit = index * bits;
        ((block[bit / 8] >> (bit % 8)) as u64) & ((1 << bits) - 1)
    }
}

/// Writes entry `index`; returns the byte range of the block that changed.
pub fn write_entry(block: &mut [u8], index: usize, order: u32, value: u64) -> (usize, usize) {
    let bits = 1usize << order;
    if bits >= 8 {
        let bytes = bits / 8;
        let start = index * bytes;
        let be = value.to_be_bytes();
        block[start..start + bytes].copy_from_slice(&be[8 - bytes..]);
        (start, bytes)
    } else {
        let bit = index * bits;
        let mask = (((1u16 << bits) - 1) as u8) << (bit % 8);
        let byte = &mut block[bit / 8];
        *byte = (*byte & !mask) | (((value as u8) << (bit % 8)) & mask);
        (bit / 8, 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_of_every_width() {
        for order in 0..=6u32 {
            let bits = 1u32 << order;
            let max = if bits == 64 {
                u64::MAX
            } else {
                (1 << bits) - 1
            };
            let mut block = vec![0u8; 512];
            let n = 512 * 8 / bits as usize;
            for i in 0..n {
                write_entry(&mut block, i, order, (i as u64 * 7) & max);
            }
            for i in 0..n {
                assert_eq!(
                    read_entry(&block, i, order),
                    (i as u64 * 7) & max,
                    "order {order} entry {i}"
                );
            }
        }
    }

    #[test]
    fn narrow_entries_pack_from_the_low_bit() {
        let mut block = vec![0u8; 8];
        write_entry(&mut block, 0, 0, 1);
        write_entry(&mut block, 3, 0, 1);
        assert_eq!(block[0], 0b1001);
        write_entry(&mut block, 1, 2, 0xf);
        assert_eq!(block[0], 0xf0 | 0b1001 & 0x0f);
        let mut block = vec![0u8; 8];
        write_entry(&mut block, 1, 4, 0x1234);
        assert_eq!(&block[..4], &[0, 0, 0x12, 0x34]);
    }
}
