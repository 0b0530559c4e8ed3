//! Internal snapshot operations on a writable image, in QEMU's order (`block/qcow2-snapshot.c`):
//!
//! - create: copy the active L1 table to new clusters; raise the refcount of everything it
//!   references (clearing COPIED, which now is false everywhere); write the new snapshot table and
//!   switch the header to it. A crash before the switch leaks clusters, nothing more.
//! - apply (revert): raise the refcounts of everything the snapshot references; overwrite the
//!   active L1 table with the snapshot's; lower the refcounts of what the old table referenced;
//!   recompute COPIED.
//! - delete: write the table without the entry first (the commit point), then lower the
//!   refcounts of what the snapshot referenced, free its L1 table, recompute COPIED.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::error::{Error, Result};
use crate::qcow2::image::Qcow2Image;
use crate::qcow2::l1::{COPIED, L1_OFFSET_MASK, L1Table};
use crate::qcow2::mapping::{
    CompressedCluster, L2_COMPRESSED, L2_COPIED, L2_OFFSET_MASK, L2Source,
};
use crate::qcow2::offsets::HostOffset;
use crate::qcow2::snapshot::{self, MAX_SNAPSHOTS, Snapshot};
use crate::qcow2::write::{MetadataKind, Writer};

impl Qcow2Image {
    /// QEMU's `qcow2_update_snapshot_refcount`: adds `delta` to the refcount of every L2 table and
    /// data cluster that `l1` references. With `fix_copied` (the active table) COPIED is recomputed
    /// on its L2 entries, which are written back where they changed; the returned L1 entries carry
    /// recomputed COPIED flags too.
    fn update_l1_refcounts(
        &self,
        w: &mut Writer,
        l1: &[u64],
        delta: i64,
        fix_copied: bool,
    ) -> Result<Vec<u64>> {
        let bits = self.geometry.cluster_bits;
        let words_per_entry = self.geometry.l2_entry_words();
        let refcount_err = self.refcount_err();
        let mut out = l1.to_vec();
        for (i, &entry) in l1.iter().enumerate() {
            let l2_offset = entry & L1_OFFSET_MASK;
            if l2_offset == 0 {
                continue;
            }
            let table = self.l2_table(i as u64, HostOffset(l2_offset))?;
            let mut words = table.to_vec();
            // Every data cluster the table references, once per entry (compressed ones by the
            // host clusters their bytes touch).
            let mut clusters = Vec::new();
            let mut owners = Vec::new();
            for e in (0..words.len()).step_by(words_per_entry) {
                let l2 = words[e];
                if l2 & L2_COMPRESSED != 0 {
                    let c = CompressedCluster::from_entry(l2, &self.geometry);
                    for cluster in (c.host.0 >> bits)..=((c.host.0 + c.len - 1) >> bits) {
                        clusters.push(cluster << bits);
                        owners.push(None);
                    }
                } else if l2 & L2_OFFSET_MASK != 0 {
                    clusters.push(l2 & L2_OFFSET_MASK);
                    owners.push(Some(e));
                }
            }
            let refcounts = if delta != 0 {
                w.refcounts.update_batch(&self.file, &clusters, delta)
            } else {
                clusters
                    .iter()
                    .map(|&c| w.refcounts.get(&self.file, c >> bits))
                    .collect()
            }
            .map_err(&refcount_err)?;
            let mut changed = false;
            if fix_copied {
                for (owner, refcount) in owners.iter().zip(&refcounts) {
                    let Some(e) = *owner else {
                        continue;
                    };
                    let l2 = words[e];
                    let fixed = if *refcount == 1 {
                        l2 | L2_COPIED
                    } else {
                        l2 & !L2_COPIED
                    };
                    if fixed != l2 {
                        words[e] = fixed;
                        changed = true;
                    }
                }
            }
            if changed {
                let bytes: Vec<u8> = words.iter().flat_map(|v| v.to_be_bytes()).collect();
                self.write_file(&bytes, l2_offset, "L2 table")?;
                self.publish_l2(l2_offset, Arc::from(words));
            }
            let refcount = if delta != 0 {
                w.refcounts.update(&self.file, l2_offset, delta)
            } else {
                w.refcounts.get(&self.file, l2_offset >> bits)
            }
            .map_err(&refcount_err)?;
            if fix_copied {
                out[i] = if refcount == 1 {
                    entry | COPIED
                } else {
                    entry & !COPIED
                };
                // `fix_copied` is only asked for the active table: its entry follows the
                // refcount at once, so that a crash finds the two out of step only briefly.
                if out[i] != entry {
                    let at = w.l1_offset + i as u64 * 8;
                    self.write_file(&out[i].to_be_bytes(), at, "L1 entry")?;
                }
            }
        }
        Ok(out)
    }

    /// Writes the whole active L1 table in place and makes it the in-memory one.
    pub(super) fn write_active_l1(
        &self,
        w: &mut Writer,
        entries: Vec<u64>,
        declared: u64,
    ) -> Result<()> {
        let mut bytes = vec![0u8; (declared * 8) as usize];
        for (i, e) in entries.iter().enumerate().take(declared as usize) {
            bytes[i * 8..i * 8 + 8].copy_from_slice(&e.to_be_bytes());
        }
        self.write_file(&bytes, w.l1_offset, "active L1 table")?;
        self.flush()?;
        let table = L1Table::new(entries, declared);
        w.reindex_active_l2(&table, self.geometry.cluster_bits);
        *self.active_l1.write() = Arc::new(table);
        Ok(())
    }

    /// Writes `snapshots` as the new snapshot table: new clusters, flush, then one header write
    /// of `nb_snapshots` (60) and `snapshots_offset` (64), then the old table is freed.
    fn write_snapshot_table(&self, w: &mut Writer, snapshots: Vec<Snapshot>) -> Result<()> {
        let cs = self.geometry.cluster_size();
        let bits = self.geometry.cluster_bits;
        let bytes = snapshot::encode_table(&snapshots);
        let len = bytes.len() as u64;
        let (new_offset, clusters) = if snapshots.is_empty() {
            (0, 0)
        } else {
            let clusters = len.div_ceil(cs);
            let offset = w
                .refcounts
                .allocate(&self.file, clusters)
                .map_err(self.refcount_err())?;
            self.check_overlap(w, "new snapshot table", offset, clusters * cs)?;
            let mut padded = bytes;
            padded.resize((clusters * cs) as usize, 0);
            if let Err(e) = self.write_file(&padded, offset, "snapshot table") {
                let _ = w.refcounts.free(&self.file, offset, clusters);
                return Err(e);
            }
            (offset, clusters)
        };
        self.flush()?;
        let mut field = [0u8; 12];
        field[..4].copy_from_slice(&(snapshots.len() as u32).to_be_bytes());
        field[4..].copy_from_slice(&new_offset.to_be_bytes());
        self.write_file(&field, 60, "header snapshot fields")?;
        self.flush()?;
        let (old_offset, old_len) = w.snapshot_table;
        w.snapshot_table = (new_offset, len);
        *self.snapshots.write() = Arc::new(snapshots);
        if clusters > 0 {
            w.add_metadata(new_offset, clusters, bits, MetadataKind::SnapshotTable);
        }
        if old_len > 0 {
            let old_clusters = ((old_offset + old_len).div_ceil(cs)) - (old_offset >> bits);
            w.remove_metadata(old_offset, old_clusters, bits);
            w.refcounts
                .free(&self.file, old_offset - old_offset % cs, old_clusters)
                .map_err(self.refcount_err())?;
        }
        Ok(())
    }

    /// Creates an internal snapshot of the active state named `name`; returns it.
    pub fn create_snapshot(&self, name: &str) -> Result<Snapshot> {
        let invalid = |reason: String| Error::Invalid {
            path: self.path.clone(),
            reason,
        };
        let mut w = self.writer()?;
        let existing = self.snapshots();
        if existing.len() as u32 >= MAX_SNAPSHOTS {
            return Err(invalid(format!(
                "the image already has {MAX_SNAPSHOTS} snapshots"
            )));
        }
        let cs = self.geometry.cluster_size();
        let bits = self.geometry.cluster_bits;
        let l1 = self.active_l1();
        let declared = l1.declared_len();

        // 0. Every refcount must have room for one more reference (1-bit refcounts never do):
        // refuse before anything changes.
        self.check_room_for_reference(&mut w, &l1)?;

        // 1. A copy of the active L1 table.
        let l1_clusters = (declared * 8).div_ceil(cs).max(1);
        let l1_copy = w
            .refcounts
            .allocate(&self.file, l1_clusters)
            .map_err(self.refcount_err())?;
        self.check_overlap(&mut w, "snapshot L1 table", l1_copy, l1_clusters * cs)?;
        let mut bytes = vec![0u8; (l1_clusters * cs) as usize];
        for (i, e) in l1.entries().iter().enumerate() {
            bytes[i * 8..i * 8 + 8].copy_from_slice(&e.to_be_bytes());
        }
        self.write_file(&bytes, l1_copy, "snapshot L1 table")?;
        w.add_metadata(l1_copy, l1_clusters, bits, MetadataKind::SnapshotL1);

        // 2. Everything the active table references gains a reference; COPIED goes. (A failure
        // partway leaves references raised that nothing uses: leaks, nothing worse.)
        let fixed = self.update_l1_refcounts(&mut w, l1.entries(), 1, true)?;
        self.write_active_l1(&mut w, fixed, declared)?;

        // 3. The new table, with the new entry at its end.
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let next_id = existing
            .iter()
            .filter_map(|s| s.id_str().parse::<u64>().ok())
            .max()
            .unwrap_or(0)
            + 1;
        let size = self.virtual_size();
        let mut extra = Vec::with_capacity(24);
        extra.extend_from_slice(&0u64.to_be_bytes());
        extra.extend_from_slice(&size.to_be_bytes());
        extra.extend_from_slice(&u64::MAX.to_be_bytes());
        let snap = Snapshot {
            l1_table_offset: l1_copy,
            l1_size: declared as u32,
            id: next_id.to_string().into_bytes(),
            name: name.as_bytes().to_vec(),
            date_sec: now.as_secs() as u32,
            date_nsec: now.subsec_nanos(),
            vm_clock_nsec: 0,
            vm_state_size: 0,
            disk_size: Some(size),
            icount: None,
            extra,
        };
        let mut table = existing.as_ref().clone();
        table.push(snap.clone());
        if let Err(e) = self.write_snapshot_table(&mut w, table) {
            // Nothing points at the copy yet: give back what step 2 took, so that a refused
            // command changes nothing (what cannot be written back stays as leaks).
            self.undo_create(&mut w, &l1, l1_copy, l1_clusters);
            return Err(e);
        }
        Ok(snap)
    }

    /// Fails with the refcount overflow a create would meet, without changing anything.
    fn check_room_for_reference(&self, w: &mut Writer, l1: &L1Table) -> Result<()> {
        let bits = self.geometry.cluster_bits;
        let max = w.refcounts.max_refcount();
        let words_per_entry = self.geometry.l2_entry_words();
        let overflow = |offset| Error::Refcount {
            path: self.path.clone(),
            source: crate::qcow2::refcount::RefcountError::Overflow {
                offset,
                max,
                bits: max.count_ones(),
            },
        };
        for (i, &entry) in l1.entries().iter().enumerate() {
            let l2_offset = entry & L1_OFFSET_MASK;
            if l2_offset == 0 {
                continue;
            }
            let refcount = |w: &mut Writer, offset: u64| {
                w.refcounts
                    .get(&self.file, offset >> bits)
                    .map_err(self.refcount_err())
            };
            if refcount(w, l2_offset)? >= max {
                return Err(overflow(l2_offset));
            }
            let table = self.l2_table(i as u64, HostOffset(l2_offset))?;
            for e in (0..table.len()).step_by(words_per_entry) {
                let l2 = table[e];
                let hosts: Vec<u64> = if l2 & L2_COMPRESSED != 0 {
                    let c = CompressedCluster::from_entry(l2, &self.geometry);
                    ((c.host.0 >> bits)..=((c.host.0 + c.len - 1) >> bits))
                        .map(|c| c << bits)
                        .collect()
                } else if l2 & L2_OFFSET_MASK != 0 {
                    vec![l2 & L2_OFFSET_MASK]
                } else {
                    Vec::new()
                };
                for host in hosts {
                    if refcount(w, host)? >= max {
                        return Err(overflow(host));
                    }
                }
            }
        }
        Ok(())
    }

    /// Takes back a create that failed before the new table was in place: the references it
    /// raised, COPIED, and the L1 copy. Best effort: on a full disk what fails stays leaked.
    fn undo_create(&self, w: &mut Writer, l1: &L1Table, l1_copy: u64, l1_clusters: u64) {
        let bits = self.geometry.cluster_bits;
        let undone = self
            .update_l1_refcounts(w, l1.entries(), -1, false)
            .and_then(|_| {
                let current = self.active_l1();
                self.update_l1_refcounts(w, current.entries(), 0, true)
            })
            .and_then(|fixed| self.write_active_l1(w, fixed, l1.declared_len()));
        if let Err(e) = undone {
            log::warn!("{}: undoing a failed snapshot: {e}", self.path.display());
        }
        w.remove_metadata(l1_copy, l1_clusters, bits);
        if let Err(e) = w.refcounts.free(&self.file, l1_copy, l1_clusters) {
            log::warn!(
                "{}: freeing a failed snapshot's L1 copy: {e}",
                self.path.display()
            );
        }
    }

    /// Makes the active state equal to snapshot `id` (QEMU's snapshot goto), resizing the disk
    /// to the snapshot's size.
    pub fn apply_snapshot(&self, id: &[u8]) -> Result<()> {
        let mut w = self.writer()?;
        let snap = self.find_snapshot(id)?;
        let sn_l1 = self.snapshot_l1(&snap)?;
        let target_size = self.snapshot_size(&snap);

        // The active table must hold the whole snapshot table.
        let needed = (snap.l1_size as u64).max(self.geometry.l1_entries_for(target_size));
        if needed > self.active_l1().declared_len() {
            self.grow_l1(&mut w, needed)?;
        }
        let old = self.active_l1();
        let declared = old.declared_len();

        self.update_l1_refcounts(&mut w, sn_l1.entries(), 1, false)?;
        {
            // No read of the live disk may be in flight while clusters it maps are released.
            let _quiet = self.reclaim.write();
            let mut entries = sn_l1.entries().to_vec();
            entries.truncate(declared as usize);
            self.write_active_l1(&mut w, entries, declared)?;
            self.update_l1_refcounts(&mut w, old.entries(), -1, false)?;
        }
        let current = self.active_l1();
        let fixed = self.update_l1_refcounts(&mut w, current.entries(), 0, true)?;
        if fixed != current.entries() {
            self.write_active_l1(&mut w, fixed, declared)?;
        }
        if target_size != self.virtual_size() {
            self.write_file(&target_size.to_be_bytes(), 24, "header size")?;
            self.size
                .store(target_size, std::sync::atomic::Ordering::Release);
        }
        self.flush()
    }

    /// Deletes snapshot `id` and frees what only it used.
    pub fn delete_snapshot(&self, id: &[u8]) -> Result<()> {
        let mut w = self.writer()?;
        let snap = self.find_snapshot(id)?;
        let sn_l1 = self.snapshot_l1(&snap)?;
        let bits = self.geometry.cluster_bits;
        let cs = self.geometry.cluster_size();
        let table: Vec<Snapshot> = self
            .snapshots()
            .iter()
            .filter(|s| s.id != snap.id)
            .cloned()
            .collect();
        self.write_snapshot_table(&mut w, table)?;
        self.update_l1_refcounts(&mut w, sn_l1.entries(), -1, false)?;
        let l1_clusters = (snap.l1_size as u64 * 8).div_ceil(cs);
        if l1_clusters > 0 {
            w.remove_metadata(snap.l1_table_offset, l1_clusters, bits);
            w.refcounts
                .free(&self.file, snap.l1_table_offset, l1_clusters)
                .map_err(self.refcount_err())?;
        }
        let current = self.active_l1();
        let fixed = self.update_l1_refcounts(&mut w, current.entries(), 0, true)?;
        if fixed != current.entries() {
            self.write_active_l1(&mut w, fixed, current.declared_len())?;
        }
        self.flush()
    }

    fn find_snapshot(&self, id: &[u8]) -> Result<Snapshot> {
        self.snapshots()
            .iter()
            .find(|s| s.id == id)
            .cloned()
            .ok_or_else(|| Error::Invalid {
                path: self.path.clone(),
                reason: format!("no snapshot with id {}", String::from_utf8_lossy(id)),
            })
    }
}

impl Qcow2Image {
    /// Drops every reference the active state holds, so that the whole disk shows the backing
    /// file (what `qemu-img commit` does to the top afterwards). The zeroed L1 table is written
    /// first, then the refcounts are lowered: a crash in between leaks clusters only.
    pub fn empty_locked(&self, w: &mut Writer) -> Result<()> {
        let old = self.active_l1();
        let declared = old.declared_len();
        let _quiet = self.reclaim.write();
        self.write_active_l1(w, Vec::new(), declared)?;
        self.update_l1_refcounts(w, old.entries(), -1, false)?;
        self.flush()
    }

    /// Points the image at another backing file (or none), rewriting the header in one write.
    /// The header is re-read from disk first so that fields changed since opening are kept.
    pub fn set_backing_locked(
        &self,
        _w: &mut Writer,
        file: Option<String>,
        format: Option<String>,
    ) -> Result<()> {
        let cs = self.geometry.cluster_size() as usize;
        let mut start = vec![0u8; cs];
        crate::qcow2::image::read_or_zero(&self.file, &mut start, 0)
            .map_err(|e| Error::io(format!("{}: reading the header", self.path.display()), e))?;
        let header_error = |source| Error::Header {
            path: self.path.clone(),
            source,
        };
        let mut header =
            crate::qcow2::header::Header::parse(&start, self.file_len()).map_err(header_error)?;
        let old_len = (header.backing_file_offset + header.backing_file_size as u64) as usize;
        header.set_backing(file.clone(), format.clone());
        let mut bytes = header.encode().map_err(header_error)?;
        // Clear what the old, longer layout left behind (a longer old backing name).
        if bytes.len() < old_len.min(cs) {
            bytes.resize(old_len.min(cs), 0);
        }
        self.write_file(&bytes, 0, "header")?;
        self.flush()?;
        *self.backing.write() = (file, format);
        Ok(())
    }
}
