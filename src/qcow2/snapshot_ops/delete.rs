//! Deleting an internal snapshot, so that it works on a full host disk: deleting a snapshot is
//! how users get out of one.
//!
//! The other snapshot operations build their new state beside the old one (see the parent
//! module), which needs free space for copies of refcount blocks, L2 tables, the L1 table and
//! the refcount table. QEMU (`qcow2_snapshot_delete`, `qcow2_update_snapshot_refcount`) needs
//! almost none: it writes the snapshot table without the entry, switches the header to it, then
//! lowers refcounts in place and sets COPIED flags in place. Lowering a refcount in place writes
//! bytes of a refcount block that is already on disk (a non-zero entry was written, so its
//! host block exists), and punching the freed clusters gives the host its space back. Setting
//! COPIED in place, though, cannot be ordered with the refcount that goes to 1: either order
//! leaves, for a moment, an active entry whose flag disagrees with its refcount, which
//! `qemu-img check` counts as corruption.
//!
//! So a delete goes in three steps, each leaving at most leaked clusters after a power cut:
//!
//! 1. **The entry leaves the table** (the commit point): the snapshot table without it is
//!    written to new clusters (refcounts raised first, rule 1 of `ordering.rs`), flushed, and one
//!    header write (bytes 24..72, one sector) switches to it, flushed. No new cluster is needed
//!    when no snapshot is left, or when the entry was the last one (the header then counts one
//!    entry fewer; the table stays where it is). From here on, everything the snapshot alone
//!    referenced is unreferenced: leaked, never corrupt.
//! 2. **What it alone used is freed in place**: every reference it held is dropped in the
//!    existing refcount blocks (a write of the entry's bytes only), except where a count would
//!    fall to 1 (the next step); flushed; the clusters now free are punched.
//! 3. **The counts that fall to 1** (clusters the active state, or one other snapshot, keeps
//!    using) change together with the COPIED flags, built beside the image as the other
//!    operations are (the parent module's `transact`), in the space step 2 gave back. If there is
//!    still no room, the snapshot stays deleted and those clusters stay counted once too often:
//!    leaks, which the next run of this step or `qemu-img check -r leaks` repairs; the active
//!    entries without COPIED are only copied on their next write.
//!
//! When the disk is so full that even step 1's table does not fit (the entry is not the last),
//! the snapshot is emptied first: its `l1_size` becomes 0, one 4-byte write in place (never torn:
//! 4-aligned), flushed; step 2 then frees what it alone used, and step 1 follows in that space.
//! A power cut between the two leaves the snapshot listed with no data (it reads as the backing
//! file, or zeros); deleting it again completes the delete.

use std::sync::Arc;

use super::Deltas;
use crate::qcow2::error::{Error, Result};
use crate::qcow2::header::FieldWrite;
use crate::qcow2::image::Qcow2Image;
use crate::qcow2::limits::L1_ENTRY_SIZE;
use crate::qcow2::offsets::HostOffset;
use crate::qcow2::overlap::MetadataKind;
use crate::qcow2::refcount::Refcount;
use crate::qcow2::snapshot::{self, Snapshot};
use crate::qcow2::write::Writer;

/// Where the snapshot table goes, and which of the old table's clusters it no longer uses.
struct ShorterTable {
    offset: u64,
    len: u64,
    /// Clusters newly allocated for it (given back if the switch fails before the header).
    allocated: Option<(HostOffset, u64)>,
    /// Clusters of the old table to drop once the header no longer names them.
    released: Vec<HostOffset>,
}

/// Whether `e` comes from a full host file system (ENOSPC, or a quota: EDQUOT).
pub(crate) fn is_out_of_space(e: &Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = source {
        if let Some(io) = err.downcast_ref::<std::io::Error>()
            && (io.kind() == std::io::ErrorKind::StorageFull
                || io.kind() == std::io::ErrorKind::QuotaExceeded
                || matches!(io.raw_os_error(), Some(libc::ENOSPC | libc::EDQUOT)))
        {
            return true;
        }
        source = err.source();
    }
    false
}

impl Qcow2Image {
    /// Deletes snapshot `id` and frees what only it used; see the module documentation.
    pub fn delete_snapshot(&self, id: &[u8]) -> Result<()> {
        let mut w = self.writer()?;
        let snap = self.find_snapshot(id)?;
        let sn_l1 = self.snapshot_l1(&snap)?;
        // Deferred references drop first, so that the counts below are what points at clusters.
        self.flush_locked(&mut w)?;
        let all = self.snapshots();
        let index = all.iter().position(|s| s.id == snap.id).unwrap_or(0);
        let remaining: Vec<Snapshot> = all.iter().filter(|s| s.id != snap.id).cloned().collect();
        // Every reference the snapshot holds: its L1 table, one path to each table and cluster.
        let mut deltas = Deltas::new();
        self.add_paths(&mut deltas, &sn_l1, -1)?;
        for cluster in self.geometry.clusters_touched(
            snap.l1_table_offset,
            u64::from(snap.l1_size) * L1_ENTRY_SIZE,
        ) {
            *deltas.entry(self.geometry.offset_of(cluster)).or_default() -= 1;
        }

        let table = match self.shorter_table(&mut w, index, &remaining) {
            Ok(table) => table,
            Err(e) if is_out_of_space(&e) => {
                log::warn!(
                    "{}: no room for a new snapshot table ({e}); emptying snapshot {} in place first",
                    self.path.display(),
                    snap.id_str()
                );
                self.empty_entry_in_place(&mut w, index, &snap, &remaining)?;
                let emptied = |e: Error| Error::Stopped {
                    source: Box::new(e),
                    state: format!(
                        "snapshot {} is emptied (its l1_size is 0, what it alone used is \
                         freed) but still in the snapshot table: free space and delete it \
                         again to finish",
                        snap.id_str()
                    ),
                };
                deltas = self.drop_in_place(&mut w, deltas).map_err(emptied)?;
                self.shorter_table(&mut w, index, &remaining)
                    .map_err(emptied)?
            }
            Err(e) => return Err(e),
        };
        for &cluster in &table.released {
            *deltas.entry(cluster).or_default() -= 1;
        }
        self.switch_snapshot_table(&mut w, &table, remaining)?;
        let to_one = self.drop_in_place(&mut w, deltas)?;
        if to_one.is_empty() {
            return Ok(());
        }
        let count = to_one.len();
        if let Err(e) = self.settle_to_one(&mut w, to_one) {
            log::warn!(
                "{}: snapshot {} is deleted, but {count} clusters stay counted once too often \
                 (leaked, not corrupt; `qemu-img check -r leaks` repairs it): {e}",
                self.path.display(),
                snap.id_str()
            );
        }
        Ok(())
    }

    /// Step 1's table: `remaining`, the table without entry `index`.
    fn shorter_table(
        &self,
        w: &mut Writer,
        index: usize,
        remaining: &[Snapshot],
    ) -> Result<ShorterTable> {
        let g = self.geometry;
        let cs = g.cluster_size();
        let (old_offset, old_len) = w.snapshot_table;
        let old_clusters: Vec<HostOffset> = g
            .clusters_touched(old_offset, old_len)
            .map(|c| g.offset_of(c))
            .collect();
        if remaining.is_empty() {
            return Ok(ShorterTable {
                offset: 0,
                len: 0,
                allocated: None,
                released: old_clusters,
            });
        }
        let bytes = snapshot::encode_table(remaining);
        let len = bytes.len() as u64;
        let clusters = len.div_ceil(cs);
        if index == remaining.len() && self.table_starts_with(old_offset, old_len, &bytes)? {
            // The deleted entry was the last: the header counts one fewer, the table stays.
            return Ok(ShorterTable {
                offset: old_offset,
                len,
                allocated: None,
                released: old_clusters.into_iter().skip(clusters as usize).collect(),
            });
        }
        let first = w
            .refcounts
            .allocate(self.storage(), clusters)
            .map_err(self.refcount_err())?;
        let mut padded = bytes;
        padded.resize((clusters * cs) as usize, 0);
        if let Err(e) = self.write_file(&padded, first.0, "snapshot table") {
            // Nothing names the clusters: they go back at once.
            self.give_back(w, first, clusters);
            return Err(e);
        }
        Ok(ShorterTable {
            offset: first.0,
            len,
            allocated: Some((first, clusters)),
            released: old_clusters,
        })
    }

    /// Whether the table on disk (`len` bytes at `offset`) begins with `bytes` exactly.
    fn table_starts_with(&self, offset: u64, len: u64, bytes: &[u8]) -> Result<bool> {
        if (bytes.len() as u64) > len {
            return Ok(false);
        }
        let mut on_disk = vec![0u8; bytes.len()];
        self.storage.read_at(&mut on_disk, offset).map_err(|e| {
            Error::io(
                format!(
                    "{}: reading the snapshot table at {offset:#x}",
                    self.path.display()
                ),
                e,
            )
        })?;
        Ok(on_disk == bytes)
    }

    /// The commit point: the header names `table` and counts `remaining`; durable on return.
    fn switch_snapshot_table(
        &self,
        w: &mut Writer,
        table: &ShorterTable,
        remaining: Vec<Snapshot>,
    ) -> Result<()> {
        let undo = |w: &mut Writer, e: Error| {
            if let Some((first, count)) = table.allocated {
                self.give_back(w, first, count);
            }
            e
        };
        // The new table and its refcounts are durable before the header names them (rule 1).
        self.sync().map_err(|e| undo(w, e))?;
        let l1 = self.active_l1();
        let fields = FieldWrite::State {
            size: self.virtual_size(),
            crypt_method: self.header.crypt_method,
            l1_entries: l1.declared_len() as u32,
            l1_offset: w.l1_offset,
            refcount_table_offset: w.refcounts.table_offset().0,
            refcount_table_clusters: w.refcounts.table_clusters() as u32,
            snapshots: remaining.len() as u32,
            snapshots_offset: table.offset,
        };
        // A failed header write may still have reached the file: the new table is then named,
        // so its clusters stay allocated (a leak at worst).
        self.write_header(fields, "header (snapshot table without the deleted entry)")?;
        let durable = self.sync();
        {
            let _quiet = self.reclaim.write();
            w.snapshot_table = (table.offset, table.len);
            self.reindex_snapshots(w, &remaining);
            *self.snapshots.write() = Arc::new(remaining);
        }
        durable
    }

    /// The overlap index of the snapshot table and the snapshots' L1 tables, after `snapshots`
    /// became the ones the table lists (at `w.snapshot_table`).
    fn reindex_snapshots(&self, w: &mut Writer, snapshots: &[Snapshot]) {
        let g = self.geometry;
        let cs = g.cluster_size();
        w.metadata.retain(|_, kind| {
            !matches!(kind, MetadataKind::SnapshotTable | MetadataKind::SnapshotL1)
        });
        let (offset, len) = w.snapshot_table;
        if len > 0 {
            w.add_metadata(
                g.cluster_of(HostOffset(offset)),
                len.div_ceil(cs),
                MetadataKind::SnapshotTable,
            );
        }
        for s in snapshots {
            w.add_metadata(
                g.cluster_of(HostOffset(s.l1_table_offset)),
                (u64::from(s.l1_size) * L1_ENTRY_SIZE).div_ceil(cs),
                MetadataKind::SnapshotL1,
            );
        }
    }

    /// Empties entry `index` (`snap`) of the table on disk in place: its `l1_size` becomes 0,
    /// durably, so that nothing it referenced is referenced any more. For a disk too full for
    /// step 1; the engine treats the snapshot as deleted from here on.
    fn empty_entry_in_place(
        &self,
        w: &mut Writer,
        index: usize,
        snap: &Snapshot,
        remaining: &[Snapshot],
    ) -> Result<()> {
        let (offset, len) = w.snapshot_table;
        let all = self.snapshots();
        let before = snapshot::encode_table(&all[..index]);
        let mut entry = snap.encode();
        let at = before.len() as u64;
        let mut expected = before;
        expected.append(&mut entry);
        if !self.table_starts_with(offset, len, &expected)? {
            return Err(Error::Invalid {
                path: self.path.clone(),
                reason: format!(
                    "the snapshot table at {offset:#x} is not as read; snapshot {} is not deleted",
                    snap.id_str()
                ),
            });
        }
        // l1_size: bytes 8..12 of the entry; entries are 8-aligned, so the write stays within
        // one 512-byte sector.
        self.write_file(&0u32.to_be_bytes(), offset + at + 8, "snapshot l1_size")?;
        self.sync()?;
        let _quiet = self.reclaim.write();
        self.reindex_snapshots(w, remaining);
        *self.snapshots.write() = Arc::new(remaining.to_vec());
        Ok(())
    }

    /// Step 2: applies `deltas` (all drops) in place where a count does not end at 1, flushes,
    /// and punches the clusters that became free. Returns the drops that would end at 1.
    fn drop_in_place(&self, w: &mut Writer, deltas: Deltas) -> Result<Deltas> {
        let g = self.geometry;
        let mut to_one = Deltas::new();
        let mut freed = Vec::new();
        {
            // No read that may still use the deleted snapshot's mapping runs while its
            // clusters are freed.
            let _quiet = self.reclaim.write();
            for (offset, delta) in deltas {
                if delta == 0 {
                    continue;
                }
                let now = w
                    .refcounts
                    .get(self.storage(), g.cluster_of(offset))
                    .map_err(self.refcount_err())?;
                if now.0.checked_add_signed(delta) == Some(1) {
                    to_one.insert(offset, delta);
                    continue;
                }
                let new = w
                    .refcounts
                    .update(self.storage(), offset, delta)
                    .map_err(self.refcount_err())?;
                if new == Refcount::FREE {
                    freed.push(offset.0);
                }
            }
        }
        self.sync()?;
        // As QEMU discards what a delete frees: the host gets the space back.
        let cs = g.cluster_size();
        let mut ranges: Vec<(u64, u64)> = Vec::new();
        for offset in freed {
            match ranges.last_mut() {
                Some((start, len)) if *start + *len == offset => *len += cs,
                _ => ranges.push((offset, cs)),
            }
        }
        for (offset, len) in ranges {
            if let Err(e) = self.storage.punch_hole(offset, len) {
                log::debug!(
                    "{}: no hole punched for {len} freed bytes at {offset:#x}: {e}",
                    self.path.display()
                );
            }
        }
        Ok(to_one)
    }

    /// Step 3: the counts that fall to 1, switched in with the COPIED flags of the active
    /// tables that go with them.
    fn settle_to_one(&self, w: &mut Writer, to_one: Deltas) -> Result<()> {
        let l1 = self.active_l1();
        let declared = l1.declared_len();
        let old_l1_offset = w.l1_offset;
        let snapshot_table = self.current_snapshot_table(w);
        let size = self.virtual_size();
        self.transact(w, |tx| {
            self.apply_deltas(tx, to_one)?;
            let mut offsets = Self::table_offsets(&l1);
            let state = self.active_state(
                tx,
                (size, declared),
                &mut offsets,
                snapshot_table,
                |tx, entries| self.replace_active_l1(tx, (old_l1_offset, &l1), entries, declared),
            )?;
            Ok((state, ()))
        })
    }
}
