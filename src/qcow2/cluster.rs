//! Changing the cluster map (QEMU's `block/qcow2-cluster.c`): the L2 table a write goes through,
//! made writable (allocated, or copied when it is shared with a snapshot); guest writes mapped
//! onto clusters, in place where the cluster is ours alone, else onto new clusters filled by
//! copy-on-write (`cow.rs`); whole clusters made zero; and the changed L2 entries written and
//! handed to readers.
//!
//! Ordering, written beside each step below; in short (QEMU's, the rules in `ordering.rs`): a
//! cluster's refcount is raised and flushed before any entry points at it; the copy-on-write
//! fill of new data clusters is flushed before the L2 entry that maps it, a new L2 table before
//! the L1 entry that points at it; a refcount is lowered only after the entry that referenced the
//! cluster is durably gone (at the next flush: `release.rs`).
//!
//! COPIED (bit 63 of L1 and L2 entries) is set exactly on entries whose cluster has refcount 1:
//! only those are written in place; anything else is copied to a new cluster first.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use crate::qcow2::cache::CacheKey;
use crate::qcow2::cow::CowRun;
use crate::qcow2::error::Result;
use crate::qcow2::image::Qcow2Image;
use crate::qcow2::l1::L1Entry;
use crate::qcow2::l2::{L2Entry, L2Table, Unit};
use crate::qcow2::limits::L1_ENTRY_SIZE;
use crate::qcow2::mapping::L2Source;
use crate::qcow2::offsets::{Geometry, GuestOffset, HostOffset};
use crate::qcow2::overlap::MetadataKind;
use crate::qcow2::write::{BackingRead, Writer};

/// One L2 table being changed: its entries, where it lives, and which entries changed.
///
/// `words` starts as the very table the cache holds; the first change copies it (copy on write,
/// `Arc::make_mut`), so readers keep the old table until [`Qcow2Image::commit_l2`] publishes the
/// new one, and an edit costs one copy of the table rather than one to edit and one to publish.
struct L2Edit {
    offset: HostOffset,
    words: L2Table,
    geometry: Geometry,
    changed: Option<(usize, usize)>,
}

impl L2Edit {
    fn entry(&self, index: usize) -> L2Entry {
        L2Entry::read(&self.words, index, &self.geometry)
    }

    fn set(&mut self, index: usize, entry: L2Entry) {
        entry.store(Arc::make_mut(&mut self.words), index, &self.geometry);
        self.changed = Some(match self.changed {
            None => (index, index),
            Some((a, b)) => (a.min(index), b.max(index)),
        });
    }
}

impl Qcow2Image {
    /// Hands a changed L2 table to readers: the generation moves first, so that no thread's
    /// recent-table list keeps the old one (see `recent_l2.rs`).
    pub(super) fn publish_l2(&self, offset: HostOffset, table: L2Table) {
        let key = CacheKey {
            image: self.id,
            offset: offset.0,
        };
        self.caches
            .l2
            .publish(key, table, self.geometry.cluster_size(), || {
                self.l2_generation.fetch_add(1, Ordering::AcqRel);
            });
    }

    /// Writes L1 entry `index` and hands the changed table to readers.
    pub(super) fn set_l1_entry(&self, w: &mut Writer, index: u64, entry: L1Entry) -> Result<()> {
        self.write_file(
            &entry.raw().to_be_bytes(),
            w.l1_offset + index * L1_ENTRY_SIZE,
            "L1 entry",
        )?;
        let mut l1 = self.active_l1.write();
        *l1 = Arc::new(l1.with_entry(index as usize, entry));
        Ok(())
    }

    /// The L2 table for `l1_index`, ready to be changed in place: allocated if missing, copied if
    /// shared with a snapshot (COPIED clear).
    fn writable_l2(&self, w: &mut Writer, l1_index: u64) -> Result<L2Edit> {
        let g = self.geometry;
        let entry = self.active_l1().entry(l1_index);
        let old = entry.l2_offset();
        let cs = g.cluster_size();
        if let Some(old) = old.filter(|_| entry.is_copied()) {
            return Ok(L2Edit {
                offset: old,
                words: self.l2_table(l1_index, old)?,
                geometry: g,
                changed: None,
            });
        }
        let words: L2Table = match old {
            None => std::iter::repeat_n(0u64, (cs / 8) as usize).collect(),
            Some(old) => self.l2_table(l1_index, old)?,
        };
        // Ordering (QEMU's `l2_allocate`): the new table's refcount (allocate) and the table are
        // written and flushed before the L1 entry points at it; the old table loses the active
        // path's reference only once the L1 entry's move is durable (deferred: `release.rs`).
        let new = w
            .refcounts
            .allocate(self.storage(), 1)
            .map_err(self.refcount_err())?;
        let bytes: Vec<u8> = words.iter().flat_map(|v| v.to_be_bytes()).collect();
        let written = self
            .check_overlap(w, "new L2 table", new.0, cs)
            .and_then(|()| self.write_file(&bytes, new.0, "L2 table"))
            .and_then(|()| self.barrier(w));
        if let Err(e) = written {
            // Nothing names the table yet: its cluster goes back (a full disk leaks nothing).
            self.give_back(w, new, 1);
            return Err(e);
        }
        w.add_metadata(g.cluster_of(new), 1, MetadataKind::ActiveL2);
        self.publish_l2(new, words.clone());
        self.set_l1_entry(w, l1_index, L1Entry::new(new, true))?;
        if let Some(old) = old {
            // The old table now belongs to snapshots only (or to nobody).
            w.remove_metadata(g.cluster_of(old), 1);
            self.release_clusters(w, old, 1);
        }
        Ok(L2Edit {
            offset: new,
            words,
            geometry: g,
            changed: None,
        })
    }

    /// Makes the changed entries of `edit` visible to readers; they reach the file at the next
    /// write-back (`l2_writeback.rs`), after what they depend on is durable.
    fn commit_l2(&self, w: &mut Writer, edit: L2Edit) -> Result<()> {
        let Some(changed) = edit.changed else {
            return Ok(());
        };
        // Noted before it is published: a reader that misses the cache from then on loads the
        // new table from the unwritten ones, never the old one from the file.
        let too_many = self.note_unwritten_l2(edit.offset, edit.words.clone(), changed);
        self.publish_l2(edit.offset, edit.words);
        if too_many {
            self.write_back_l2(w)?;
        }
        Ok(())
    }

    /// Writes a range that lies within one L2 table.
    pub(super) fn write_in_table(
        &self,
        w: &mut Writer,
        data: &[u8],
        offset: u64,
        backing: BackingRead,
    ) -> Result<()> {
        let g = self.geometry;
        let mut edit = self.writable_l2(w, g.l1_index(GuestOffset(offset)))?;
        let mut old_refs = Vec::new();
        // Runs allocated by this call: given back if it fails before the entries are written.
        let mut new_runs = Vec::new();
        let mapped = self
            .map_into_table(
                w,
                &mut edit,
                data,
                offset,
                backing,
                &mut old_refs,
                &mut new_runs,
            )
            .map(|()| {
                // Ordering: while copying a layer's data, all of it is ordered like a fill.
                self.before_l2_update(w)
            });
        if let Err(e) = mapped {
            for (host, count) in new_runs {
                self.give_back(w, host, count);
            }
            return Err(e);
        }
        // Ordering: the new entries are durable (next flush) before the clusters they replaced
        // lose their reference.
        self.commit_l2(w, edit)?;
        self.release(w, old_refs);
        Ok(())
    }

    /// The guest writes of [`Qcow2Image::write_in_table`]: in place where the cluster is ours,
    /// else into new runs (noted in `new_runs`) whose entries are set in `edit`, the references
    /// they replace in `old_refs`.
    #[allow(clippy::too_many_arguments)]
    fn map_into_table(
        &self,
        w: &mut Writer,
        edit: &mut L2Edit,
        data: &[u8],
        offset: u64,
        backing: BackingRead,
        old_refs: &mut Vec<crate::qcow2::l2::Reference>,
        new_runs: &mut Vec<(HostOffset, u64)>,
    ) -> Result<()> {
        let g = self.geometry;
        let cs = g.cluster_size();
        let mut done = 0usize;
        while done < data.len() {
            let pos = offset + done as u64;
            let index = g.l2_index(GuestOffset(pos));
            if let Some(HostOffset(host)) = edit.entry(index).writable_in_place(&g) {
                // In place: extend over following clusters whose host data is contiguous.
                let mut end = ((pos / cs) + 1) * cs;
                let mut next = index + 1;
                while end < offset + data.len() as u64 && next < g.l2_entries() as usize {
                    match edit.entry(next).writable_in_place(&g) {
                        Some(HostOffset(h)) if h == host + (next - index) as u64 * cs => {
                            end += cs;
                            next += 1;
                        }
                        _ => break,
                    }
                }
                let end = end.min(offset + data.len() as u64);
                let chunk = &data[done..(end - offset) as usize];
                let host_pos = host + g.in_cluster(pos);
                if g.extended_l2 {
                    self.write_subclusters_in_place(w, edit, (index, host), pos, chunk, backing)?;
                    done += ((pos / cs + 1) * cs).min(end).saturating_sub(pos) as usize;
                    continue;
                }
                self.check_overlap(w, "guest data", host_pos, chunk.len() as u64)?;
                self.write_file(chunk, host_pos, "guest data")?;
                done += chunk.len();
                continue;
            }
            // A run of clusters that need a new home, allocated together so one write fills them.
            let mut count = 1;
            let last = (offset + data.len() as u64 - 1) / cs;
            while pos / cs + count <= last
                && index + (count as usize) < g.l2_entries() as usize
                && edit
                    .entry(index + count as usize)
                    .writable_in_place(&g)
                    .is_none()
            {
                count += 1;
            }
            let run_start = pos - g.in_cluster(pos);
            let run_len = count * cs;
            let write_from = (pos - run_start) as usize;
            let write_to =
                ((offset + data.len() as u64).min(run_start + run_len) - run_start) as usize;
            let guest = &data[done..done + (write_to - write_from)];
            let run = CowRun {
                guest_start: run_start,
                len: run_len,
                write_from,
                write_to,
            };
            let old_reads_zero = self.reads_zero(edit, index, write_from > 0)
                && self.reads_zero(
                    edit,
                    index + count as usize - 1,
                    write_to < run_len as usize,
                );
            let fill = self.cow_fill(&run, guest, backing, old_reads_zero)?;
            // Ordering: the clusters come from a reservation whose refcounts (and the file
            // length covering them) are written; the entries that map them wait for the
            // write-back, whose first flush makes those and the copied-on-write fill durable
            // before the entries are written (rules 1 and 2).
            let (host, fresh) = self.allocate_data(w, count)?;
            new_runs.push((host, count));
            self.check_overlap(w, "new data cluster", host.0, run_len)?;
            if self.write_cow_run(&run, host, guest, fill, fresh)? {
                self.wrote_fill(w);
            }
            for i in 0..count as usize {
                old_refs.extend(edit.entry(index + i).reference(&g));
                let new_host = HostOffset(host.0 + i as u64 * cs);
                edit.set(index + i, L2Entry::data(new_host, &g));
            }
            done += write_to - write_from;
        }
        Ok(())
    }

    /// Whether the cluster of entry `index` reads as zeros now (a zero cluster, or unallocated
    /// in an image with no backing file), or needs no fill (`partial` false). Extended entries
    /// are not looked into: their fill is read.
    fn reads_zero(&self, edit: &L2Edit, index: usize, partial: bool) -> bool {
        if !partial {
            return true;
        }
        let g = self.geometry;
        if g.extended_l2 {
            return false;
        }
        let entry = edit.entry(index);
        match entry.unit_at(&g, GuestOffset(0)) {
            Ok(Unit::Zero) => true,
            Ok(Unit::Unallocated) => self.backing.read().0.is_none(),
            _ => false,
        }
    }

    /// Extended L2, cluster ours (entry `index` of `edit`, its data at host offset `host`):
    /// writes the subclusters touched by `data` at `pos` in place, filling the unwritten parts of
    /// newly allocated subclusters from what they showed before.
    fn write_subclusters_in_place(
        &self,
        w: &mut Writer,
        edit: &mut L2Edit,
        (index, host): (usize, u64),
        pos: u64,
        data: &[u8],
        backing: BackingRead,
    ) -> Result<()> {
        let g = self.geometry;
        let cs = g.cluster_size();
        let sc = g.subcluster_size();
        let cluster_start = pos - g.in_cluster(pos);
        let end = (pos + data.len() as u64).min(cluster_start + cs);
        let entry = edit.entry(index);
        let span_start = pos - pos % sc;
        let span_end = end.div_ceil(sc) * sc;
        let mut buf = vec![0u8; (span_end - span_start) as usize];
        let first_sub = ((span_start - cluster_start) / sc) as u32;
        let last_sub = ((span_end - cluster_start) / sc) as u32;
        let needs_fill = pos != span_start || end != span_end;
        if needs_fill {
            self.read_current(&mut buf, span_start, backing)?;
        }
        let from = (pos - span_start) as usize;
        buf[from..from + (end - pos) as usize].copy_from_slice(&data[..(end - pos) as usize]);
        let host_pos = host + (span_start - cluster_start);
        self.check_overlap(w, "guest data", host_pos, buf.len() as u64)?;
        self.write_file(&buf, host_pos, "guest data")?;
        if needs_fill {
            // The subcluster's other bytes were copied: durable before its bitmap bit (rule 2).
            self.wrote_fill(w);
        }
        let written = entry.with_allocated_subclusters(first_sub..last_sub);
        if written != entry {
            edit.set(index, written);
        }
        Ok(())
    }

    /// Makes the whole clusters of `first_full..last_full` read as zeros: zero entries (or
    /// unallocated ones, see [`L2Entry::zero`]), their host clusters released (QEMU's
    /// `zero_in_l2_slice` / `discard_in_l2_slice`).
    pub(super) fn zero_clusters(
        &self,
        w: &mut Writer,
        first_full: u64,
        last_full: u64,
        has_backing: bool,
    ) -> Result<()> {
        let g = self.geometry;
        let cs = g.cluster_size();
        let coverage = g.l2_coverage();
        let zero = L2Entry::zero(&g, self.header.version);
        let mut pos = first_full;
        while pos < last_full {
            let table_end = ((pos / coverage + 1) * coverage).min(last_full);
            let l1_index = g.l1_index(GuestOffset(pos));
            if self.active_l1().l2_offset(l1_index).is_none() && !has_backing {
                pos = table_end; // Unallocated with nothing below: already reads as zeros.
                continue;
            }
            let mut edit = self.writable_l2(w, l1_index)?;
            let mut old_refs = Vec::new();
            while pos < table_end {
                let index = g.l2_index(GuestOffset(pos));
                let entry = edit.entry(index);
                if entry != zero {
                    old_refs.extend(entry.reference(&g));
                    edit.set(index, zero);
                }
                pos += cs;
            }
            // Ordering: the entries stop naming the clusters, durably (next flush), before the
            // clusters lose their reference (a crash in between leaks them, never hands them
            // out twice).
            self.commit_l2(w, edit)?;
            self.release(w, old_refs);
        }
        Ok(())
    }
}
