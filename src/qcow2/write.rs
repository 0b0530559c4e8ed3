//! The write side of an image: allocating writes, copy-on-write of clusters and L2 tables shared
//! with internal snapshots, discard, growing the disk, and flushing.
//!
//! Every metadata change is written through at once, in QEMU's order, so that a process killed at
//! any point leaves at most leaked clusters:
//! - a cluster's refcount is raised before any L1/L2 entry points at it;
//! - guest data (and the copied-on-write rest of its cluster) is written before the L2 entry that
//!   maps it; a new L2 table is written before the L1 entry that points at it;
//! - a refcount is lowered only after the entry that referenced the cluster is gone.
//!
//! COPIED (bit 63 of L1 and L2 entries) is set exactly on entries whose cluster has refcount 1:
//! only those are written in place; anything else is copied to a new cluster first.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use crate::qcow2::cache::CacheKey;
use crate::qcow2::error::{Error, Result};
use crate::qcow2::header::{FieldWrite, autoclear, incompatible};
use crate::qcow2::image::Qcow2Image;
use crate::qcow2::l1::{L1Entry, L1Table};
use crate::qcow2::l2::{L2Entry, L2Table, Reference};
use crate::qcow2::limits::{L1_ENTRY_SIZE, MAX_L1_BYTES};
use crate::qcow2::mapping::L2Source;
use crate::qcow2::offsets::{Geometry, GuestOffset, HostCluster, HostOffset};
use crate::qcow2::refcount::{RefcountError, Refcounts};

/// What supplies the guest data below this image (the backing chain), for copy-on-write.
pub type BackingRead<'a> = &'a dyn Fn(&mut [u8], u64) -> Result<()>;

/// Kinds of metadata whose clusters a data write must never touch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum MetadataKind {
    Header,
    ActiveL1,
    ActiveL2,
    SnapshotTable,
    SnapshotL1,
}

/// State of the write side, behind the image's writer mutex.
pub struct Writer {
    pub(super) refcounts: Refcounts,
    pub(super) l1_offset: u64,
    /// Where the snapshot table is and how many bytes it takes.
    pub(super) snapshot_table: (u64, u64),
    /// Clusters holding metadata, by cluster index (QEMU's overlap checks, all of them but the
    /// inactive L2 tables).
    pub(super) metadata: std::collections::HashMap<HostCluster, MetadataKind>,
    corrupt: bool,
    /// Autoclear feature bits still set in the file's header. We maintain none of them (e.g.
    /// persistent bitmaps would not follow our writes), so they are cleared before the first
    /// change to the image; not at open, so that a read-write mount nobody writes to leaves the
    /// file exactly as it was.
    pending_autoclear: u64,
}

impl Writer {
    /// Sets up writing: refuses images QEMU would repair first, notes the autoclear bits that we
    /// do not maintain (cleared at the first write, see [`Qcow2Image::writer`]), and indexes the
    /// metadata clusters.
    pub(super) fn open(image: &Qcow2Image) -> Result<Writer> {
        let h = &image.header;
        let path = image.path.clone();
        if h.is_corrupt() {
            return Err(Error::NeedsReadOnly {
                path,
                reason: "the image is marked corrupt; mounting read-only (repair it with `qemu-img check -r all`)".into(),
            });
        }
        if h.is_dirty() {
            return Err(Error::NeedsReadOnly {
                path,
                reason: "the image is dirty (lazy refcounts were not written back); mounting read-only (repair it with `qemu-img check -r all`)".into(),
            });
        }
        let cache_blocks = (image.caches.l2_budget() / 16 / image.geometry.cluster_size()) as usize;
        let refcounts = Refcounts::load(image.storage(), h, image.file_len(), cache_blocks)
            .map_err(|source| Error::Refcount {
                path: path.clone(),
                source,
            })?;
        let mut writer = Writer {
            refcounts,
            l1_offset: h.l1_table_offset,
            snapshot_table: (
                h.snapshots_offset,
                image
                    .snapshots()
                    .iter()
                    .map(|s| s.encoded_len() as u64)
                    .sum(),
            ),
            metadata: Default::default(),
            corrupt: false,
            pending_autoclear: if h.version >= 3 {
                h.autoclear_features
            } else {
                0
            },
        };
        writer.index_metadata(image);
        Ok(writer)
    }

    fn index_metadata(&mut self, image: &Qcow2Image) {
        let g = image.geometry;
        let cs = g.cluster_size();
        let h = &image.header;
        let mut add = |offset: u64, len: u64, kind| {
            for c in g.clusters_touched(offset, len) {
                self.metadata.insert(c, kind);
            }
        };
        add(0, cs, MetadataKind::Header);
        let l1 = image.active_l1();
        add(
            h.l1_table_offset,
            l1.declared_len() * L1_ENTRY_SIZE,
            MetadataKind::ActiveL1,
        );
        // The refcount table and blocks move and multiply on their own: `check_overlap` asks
        // the refcounts about them directly.
        for l2 in l1.iter().filter_map(L1Entry::l2_offset) {
            add(l2.0, cs, MetadataKind::ActiveL2);
        }
        if h.nb_snapshots > 0 {
            let len: u64 = image
                .snapshots()
                .iter()
                .map(|s| s.encoded_len() as u64)
                .sum();
            add(h.snapshots_offset, len, MetadataKind::SnapshotTable);
            for s in image.snapshots().iter() {
                add(
                    s.l1_table_offset,
                    u64::from(s.l1_size) * L1_ENTRY_SIZE,
                    MetadataKind::SnapshotL1,
                );
            }
        }
    }

    /// Re-reads which clusters hold active L2 tables (after an operation replaced or emptied
    /// the active L1 table).
    pub(super) fn reindex_active_l2(&mut self, l1: &L1Table, geometry: &Geometry) {
        self.metadata
            .retain(|_, kind| *kind != MetadataKind::ActiveL2);
        for l2 in l1.iter().filter_map(L1Entry::l2_offset) {
            self.metadata
                .insert(geometry.cluster_of(l2), MetadataKind::ActiveL2);
        }
    }

    /// Notes that `count` clusters from `first` hold metadata of `kind`.
    pub(super) fn add_metadata(&mut self, first: HostCluster, count: u64, kind: MetadataKind) {
        for c in first.run(count) {
            self.metadata.insert(c, kind);
        }
    }

    pub(super) fn remove_metadata(&mut self, first: HostCluster, count: u64) {
        for c in first.run(count) {
            self.metadata.remove(&c);
        }
    }
}

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
    /// The write side, locked. Every change to the image (guest writes, discards, resizes,
    /// snapshot and chain operations) goes through here, so this is where the autoclear bits are
    /// cleared, once, before the caller changes anything.
    pub fn writer(&self) -> Result<parking_lot::MutexGuard<'_, Writer>> {
        let mut w = self
            .writer
            .get()
            .ok_or_else(|| Error::ReadOnly {
                path: self.path.clone(),
            })?
            .lock();
        if w.corrupt {
            return Err(Error::MarkedCorrupt {
                path: self.path.clone(),
            });
        }
        if w.pending_autoclear != 0 {
            self.clear_autoclear(&mut w)?;
        }
        Ok(w)
    }

    /// Zeroes the header's autoclear features field (offset 88). Bitmaps would not follow our
    /// writes; a cleared bit tells QEMU they are stale.
    fn clear_autoclear(&self, w: &mut Writer) -> Result<()> {
        let bits = w.pending_autoclear;
        self.write_header(
            FieldWrite::AutoclearFeatures(0),
            "header autoclear features",
        )?;
        // Durable before the change it guards: a kill after the caller's first write must not
        // leave bitmaps that claim to be in step with the data.
        self.flush()?;
        w.pending_autoclear = 0;
        log::info!(
            "{}: cleared autoclear features {bits:#x}{}",
            self.path.display(),
            if bits & autoclear::BITMAPS != 0 {
                " (persistent bitmaps are now marked inconsistent)"
            } else {
                ""
            }
        );
        Ok(())
    }

    pub(super) fn refcount_err(&self) -> impl Fn(RefcountError) -> Error + '_ {
        |source| Error::Refcount {
            path: self.path.clone(),
            source,
        }
    }

    /// Rewrites a group of header fields in one write.
    pub(super) fn write_header(&self, fields: FieldWrite, what: &str) -> Result<()> {
        let (offset, bytes) = fields.encode();
        self.write_file(&bytes, offset, what)
    }

    pub(super) fn write_file(&self, buf: &[u8], offset: u64, what: &str) -> Result<()> {
        self.storage.write_at(buf, offset).map_err(|e| {
            Error::io(
                format!("{}: writing {what} at {offset:#x}", self.path.display()),
                e,
            )
        })
    }

    /// QEMU's overlap check: refuses (and marks the image corrupt) a write of `len` bytes at
    /// `offset` that would land on metadata.
    pub(super) fn check_overlap(
        &self,
        w: &mut Writer,
        what: &'static str,
        offset: u64,
        len: u64,
    ) -> Result<()> {
        for c in self.geometry.clusters_touched(offset, len) {
            let found = w
                .metadata
                .get(&c)
                .map(|kind| format!("{kind:?} metadata"))
                .or_else(|| w.refcounts.metadata_at(c).map(str::to_owned));
            if let Some(what_is_there) = found {
                let metadata = format!(
                    "{what_is_there} (cluster {:#x})",
                    self.geometry.offset_of(c).0
                );
                log::error!(
                    "{}: Marking image as corrupt: {what} at {offset:#x} overlaps {metadata}",
                    self.path.display()
                );
                w.corrupt = true;
                let flags = self.header.incompatible_features | incompatible::CORRUPT;
                let _ = self.write_header(
                    FieldWrite::IncompatibleFeatures(flags),
                    "header (corrupt bit)",
                );
                let _ = self.storage.flush();
                return Err(Error::Overlap {
                    path: self.path.clone(),
                    what,
                    offset,
                    metadata,
                });
            }
        }
        Ok(())
    }

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
        let new = w
            .refcounts
            .allocate(self.storage(), 1)
            .map_err(self.refcount_err())?;
        self.check_overlap(w, "new L2 table", new.0, cs)?;
        let bytes: Vec<u8> = words.iter().flat_map(|v| v.to_be_bytes()).collect();
        self.write_file(&bytes, new.0, "L2 table")?;
        w.add_metadata(g.cluster_of(new), 1, MetadataKind::ActiveL2);
        self.publish_l2(new, words.clone());
        self.set_l1_entry(w, l1_index, L1Entry::new(new, true))?;
        if let Some(old) = old {
            // The old table now belongs to snapshots only (or to nobody).
            w.remove_metadata(g.cluster_of(old), 1);
            w.refcounts
                .update(self.storage(), old, -1)
                .map_err(self.refcount_err())?;
        }
        Ok(L2Edit {
            offset: new,
            words,
            geometry: g,
            changed: None,
        })
    }

    /// Writes the changed entries of `edit` and makes them visible to readers.
    fn commit_l2(&self, edit: L2Edit) -> Result<()> {
        let Some((first, last)) = edit.changed else {
            return Ok(());
        };
        let w = edit.geometry.l2_entry_words();
        let bytes: Vec<u8> = edit.words[first * w..(last + 1) * w]
            .iter()
            .flat_map(|v| v.to_be_bytes())
            .collect();
        self.write_file(&bytes, edit.offset.0 + (first * w * 8) as u64, "L2 entries")?;
        self.publish_l2(edit.offset, edit.words);
        Ok(())
    }

    /// Drops references held by entries that were just overwritten.
    pub(super) fn release(&self, w: &mut Writer, old: Vec<Reference>) -> Result<()> {
        if old.is_empty() {
            return Ok(());
        }
        // Wait for reads that may still use the old mapping before a cluster can be reused.
        let _quiet = self.reclaim.write();
        for r in old {
            for cluster in r.clusters(&self.geometry) {
                w.refcounts
                    .update(self.storage(), cluster, -1)
                    .map_err(self.refcount_err())?;
            }
        }
        Ok(())
    }

    /// Writes `data` at guest `offset` of the active disk.
    pub fn write_at(&self, data: &[u8], offset: u64, backing: BackingRead) -> Result<()> {
        let mut w = self.writer()?;
        self.check_not_retired()?;
        self.write_locked(&mut w, data, offset, backing)?;
        drop(w);
        self.write_behind.wrote(self.storage(), data.len() as u64);
        Ok(())
    }

    fn check_not_retired(&self) -> Result<()> {
        if self.retired.load(Ordering::Acquire) {
            return Err(Error::Retired {
                path: self.path.clone(),
            });
        }
        Ok(())
    }

    /// [`Qcow2Image::write_at`] for a caller that holds the writer.
    pub fn write_locked(
        &self,
        w: &mut Writer,
        data: &[u8],
        offset: u64,
        backing: BackingRead,
    ) -> Result<()> {
        let size = self.virtual_size();
        if offset
            .checked_add(data.len() as u64)
            .is_none_or(|end| end > size)
        {
            return Err(Error::PastEnd { offset, size });
        }
        let coverage = self.geometry.l2_coverage();
        let mut done = 0usize;
        while done < data.len() {
            let pos = offset + done as u64;
            let table_end = (pos / coverage + 1) * coverage;
            let n = ((table_end - pos) as usize).min(data.len() - done);
            self.write_in_table(w, &data[done..done + n], pos, backing)?;
            done += n;
        }
        Ok(())
    }

    /// Writes a range that lies within one L2 table.
    fn write_in_table(
        &self,
        w: &mut Writer,
        data: &[u8],
        offset: u64,
        backing: BackingRead,
    ) -> Result<()> {
        let g = self.geometry;
        let cs = g.cluster_size();
        let mut edit = self.writable_l2(w, g.l1_index(GuestOffset(offset)))?;
        let mut old_refs = Vec::new();
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
                    self.write_subclusters_in_place(
                        w,
                        &mut edit,
                        (index, host),
                        pos,
                        chunk,
                        backing,
                    )?;
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
            // Only the first and last cluster can be partly written: fill them from what the disk
            // shows now.
            let first_partial = write_from > 0;
            let last_partial = write_to < run_len as usize;
            let guest = &data[done..done + (write_to - write_from)];
            // Whole clusters are written straight from the request; only a run with a partly
            // written cluster at an end is assembled in a buffer (a 1 MiB buffer costs a memset
            // and a copy per 1 MiB write).
            let mut buf = Vec::new();
            if first_partial || last_partial {
                buf = vec![0u8; run_len as usize];
                if first_partial {
                    self.read_current(&mut buf[..cs as usize], run_start, backing)?;
                }
                if last_partial && !(count == 1 && first_partial) {
                    let last_start = (run_len - cs) as usize;
                    self.read_current(
                        &mut buf[last_start..],
                        run_start + last_start as u64,
                        backing,
                    )?;
                }
                buf[write_from..write_to].copy_from_slice(guest);
            }
            // Where the file ends before the allocation: nothing was ever written past it.
            let unwritten_from = if buf.is_empty() {
                None
            } else {
                self.regular_file_len()
            };
            let host = w
                .refcounts
                .allocate(self.storage(), count)
                .map_err(self.refcount_err())?;
            self.check_overlap(w, "new data cluster", host.0, run_len)?;
            if buf.is_empty() {
                self.write_file(guest, host.0, "guest data")?;
            } else {
                self.write_new_run(&buf, host.0, write_from, write_to, unwritten_from)?;
            }
            for i in 0..count as usize {
                old_refs.extend(edit.entry(index + i).reference(&g));
                let new_host = HostOffset(host.0 + i as u64 * cs);
                edit.set(index + i, L2Entry::data(new_host, &g));
            }
            done += write_to - write_from;
        }
        self.commit_l2(edit)?;
        self.release(w, old_refs)
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
        let written = entry.with_allocated_subclusters(first_sub..last_sub);
        if written != entry {
            edit.set(index, written);
        }
        Ok(())
    }

    /// The file's length if it is growable (None for a block device, whose unused space holds
    /// whatever was there before).
    fn regular_file_len(&self) -> Option<u64> {
        if self.storage.fixed_size() {
            return None;
        }
        self.storage.len().ok()
    }

    /// Writes the newly allocated run `buf` at `host`, of which `write_from..write_to` is guest
    /// data and the rest the copied-on-write fill. A fill that is all zeros and lies wholly at or
    /// past `unwritten_from` (the file's end before the run was allocated) is not written: those
    /// bytes were never written and already read as zeros (a hole, or past the end of the file,
    /// which is then extended over the whole run). A 4 KiB write into a fresh 64 KiB cluster then
    /// writes 4 KiB, not 64 KiB, as QEMU does by zeroing the cluster without writing it. The
    /// order is unchanged: all of this happens before the L2 entry is written.
    fn write_new_run(
        &self,
        buf: &[u8],
        host: u64,
        write_from: usize,
        write_to: usize,
        unwritten_from: Option<u64>,
    ) -> Result<()> {
        // OR-folding 4 KiB at a time vectorises; a byte-wise `all` that may stop early does not.
        let zero = |part: &[u8]| {
            part.chunks(4096)
                .all(|c| c.iter().fold(0u8, |acc, &b| acc | b) == 0)
        };
        let (from, to) = match unwritten_from {
            Some(eof) => (
                if host >= eof && zero(&buf[..write_from]) {
                    write_from
                } else {
                    0
                },
                if host + write_to as u64 >= eof && zero(&buf[write_to..]) {
                    write_to
                } else {
                    buf.len()
                },
            ),
            None => (0, buf.len()),
        };
        self.write_file(&buf[from..to], host + from as u64, "guest data")?;
        let run_end = host + buf.len() as u64;
        if to < buf.len() && self.regular_file_len().is_some_and(|len| len < run_end) {
            // The skipped tail lies past the end: extend the file so that the whole cluster is
            // inside it (a hole), as a full write would have.
            self.storage.set_len(run_end).map_err(|e| {
                Error::io(
                    format!(
                        "{}: extending the file to {run_end:#x}",
                        self.path.display()
                    ),
                    e,
                )
            })?;
        }
        Ok(())
    }

    /// Reads what the active disk shows at `offset` now (for copy-on-write).
    fn read_current(&self, buf: &mut [u8], offset: u64, backing: BackingRead) -> Result<()> {
        let l1 = self.active_l1();
        self.read_through(&l1, buf, offset, backing)
    }

    /// Makes the range read as zeros (discard, `fallocate` PUNCH_HOLE / ZERO_RANGE): whole
    /// clusters become zero clusters (or unallocated where nothing shows through) and their host
    /// clusters are released; partial clusters at the edges are written with zeros.
    pub fn zero_range(
        &self,
        offset: u64,
        len: u64,
        backing: BackingRead,
        has_backing: bool,
    ) -> Result<()> {
        let mut w = self.writer()?;
        self.check_not_retired()?;
        self.zero_locked(&mut w, offset, len, backing, has_backing)
    }

    /// [`Qcow2Image::zero_range`] for a caller that holds the writer.
    pub fn zero_locked(
        &self,
        w: &mut Writer,
        offset: u64,
        len: u64,
        backing: BackingRead,
        has_backing: bool,
    ) -> Result<()> {
        let size = self.virtual_size();
        let end = offset.saturating_add(len).min(size);
        if offset >= end {
            return Ok(());
        }
        let g = self.geometry;
        let cs = g.cluster_size();
        let first_full = offset.div_ceil(cs) * cs;
        let last_full = end / cs * cs;
        let zero_flag_ok = self.header.version >= 3;
        if first_full >= last_full || (!zero_flag_ok && has_backing) {
            // No whole cluster, or no way to mark one as zero over a backing file (v2).
            return self.write_zeros(w, offset, end - offset, backing);
        }
        if offset < first_full {
            self.write_zeros(w, offset, first_full - offset, backing)?;
        }
        {
            let coverage = g.l2_coverage();
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
                let zero = L2Entry::zero(&g, self.header.version);
                while pos < table_end {
                    let index = g.l2_index(GuestOffset(pos));
                    let entry = edit.entry(index);
                    if entry != zero {
                        old_refs.extend(entry.reference(&g));
                        edit.set(index, zero);
                    }
                    pos += cs;
                }
                self.commit_l2(edit)?;
                self.release(w, old_refs)?;
            }
        }
        if last_full < end {
            self.write_zeros(w, last_full, end - last_full, backing)?;
        }
        Ok(())
    }

    fn write_zeros(
        &self,
        w: &mut Writer,
        offset: u64,
        len: u64,
        backing: BackingRead,
    ) -> Result<()> {
        const CHUNK: u64 = 1 << 20;
        let zeros = vec![0u8; CHUNK.min(len) as usize];
        let mut pos = offset;
        while pos < offset + len {
            let n = CHUNK.min(offset + len - pos);
            self.write_locked(w, &zeros[..n as usize], pos, backing)?;
            pos += n;
        }
        Ok(())
    }

    /// Grows the virtual disk to `new_size` bytes (like `qemu-img resize`): the L1 table grows
    /// first if it must, then the size field changes. Shrinking is refused.
    pub fn grow(&self, new_size: u64) -> Result<()> {
        let invalid = |reason: String| Error::Invalid {
            path: self.path.clone(),
            reason,
        };
        let size = self.virtual_size();
        if new_size < size {
            return Err(invalid(format!(
                "shrinking the disk from {size} to {new_size} bytes is not supported"
            )));
        }
        if new_size % 512 != 0 {
            return Err(invalid(format!(
                "the new size {new_size} is not a multiple of 512"
            )));
        }
        if new_size == size {
            return Ok(());
        }
        if self.header.version < 3 && !self.snapshots().is_empty() {
            return Err(invalid(
                "a version 2 image with snapshots cannot be resized".into(),
            ));
        }
        let mut w = self.writer()?;
        self.check_not_retired()?;
        self.resize_locked(&mut w, new_size)
    }

    /// Sets the virtual size, growing the L1 table if needed. Callers check that shrinking is
    /// safe (nothing allocated past the new end).
    pub fn resize_locked(&self, w: &mut Writer, new_size: u64) -> Result<()> {
        let needed = self.geometry.l1_entries_for(new_size);
        if needed > self.active_l1().declared_len() {
            self.grow_l1(w, needed)?;
        }
        self.write_header(FieldWrite::Size(new_size), "header size")?;
        self.size.store(new_size, Ordering::Release);
        Ok(())
    }

    /// Moves the active L1 table to new clusters with room for `needed` entries: write the copy,
    /// flush, switch `l1_size` (36) and `l1_table_offset` (40) in one header write, free the old.
    pub(super) fn grow_l1(&self, w: &mut Writer, needed: u64) -> Result<()> {
        let g = self.geometry;
        let l1 = self.active_l1();
        if needed * L1_ENTRY_SIZE > MAX_L1_BYTES {
            return Err(Error::Invalid {
                path: self.path.clone(),
                reason: format!(
                    "{needed} L1 entries need a table larger than {} MiB",
                    MAX_L1_BYTES >> 20
                ),
            });
        }
        let cs = g.cluster_size();
        let clusters = (needed * L1_ENTRY_SIZE).div_ceil(cs);
        let new_offset = w
            .refcounts
            .allocate(self.storage(), clusters)
            .map_err(self.refcount_err())?;
        self.check_overlap(w, "new L1 table", new_offset.0, clusters * cs)?;
        let bytes = l1.to_be_bytes((clusters * cs) as usize);
        self.write_file(&bytes, new_offset.0, "L1 table")?;
        self.flush()?;
        // `needed` fits: MAX_L1_BYTES holds fewer than 2^32 entries.
        let fields = FieldWrite::L1Table {
            entries: needed as u32,
            offset: new_offset.0,
        };
        self.write_header(fields, "header L1 fields")?;
        let old_offset = HostOffset(w.l1_offset);
        let old_clusters = (l1.declared_len() * L1_ENTRY_SIZE).div_ceil(cs);
        w.l1_offset = new_offset.0;
        *self.active_l1.write() = Arc::new(l1.with_declared_len(needed));
        w.remove_metadata(g.cluster_of(old_offset), old_clusters);
        w.add_metadata(g.cluster_of(new_offset), clusters, MetadataKind::ActiveL1);
        w.refcounts
            .free(self.storage(), old_offset, old_clusters)
            .map_err(self.refcount_err())
    }

    /// Makes everything written so far durable.
    pub fn flush(&self) -> Result<()> {
        self.storage
            .flush()
            .map_err(|e| Error::io(format!("{}: flush", self.path.display()), e))
    }
}
