//! The write side of an image: its state behind the writer mutex, and the entry points every
//! change goes through (guest writes, discards and zero writes, resizes; snapshot and chain
//! operations take the same writer).
//!
//! The work is done where QEMU and imago do it:
//! - `cluster.rs`: L2 tables made writable, guest writes mapped onto clusters, zero clusters,
//!   changed entries written and published (QEMU's `qcow2-cluster.c`);
//! - `cow.rs`: copy-on-write of partly written new clusters (`perform_cow`);
//! - `overlap.rs`: the metadata index and the overlap check (`qcow2_check_metadata_overlap`);
//! - `corrupt.rs`: marking the image corrupt (`qcow2_signal_corruption`);
//! - `release.rs`: dropping the references of replaced entries (`qcow2_free_any_cluster`), deferred
//!   to the next flush;
//! - `ordering.rs`: what must be durable before what (the power-loss rules), the reservation
//!   data clusters come from, and the flush that settles deferred work;
//! - `l2_writeback.rs`: changed L2 tables kept for the next flush (QEMU's write-back L2 cache);
//! - `grow.rs`: growing the disk and its L1 table (`qcow2_grow_l1_table`);
//! - `refcount.rs`: refcounts and allocation; `snapshot_ops.rs`: internal snapshot operations.
//!
//! Metadata reaches the file in QEMU's order, so that a power cut (not only a killed process)
//! leaves at most leaked clusters:
//! - a cluster's refcount is raised before any L1/L2 entry points at it (data clusters come from
//!   a reservation) and is durable before that entry is written: changed L2 tables wait in
//!   memory (`l2_writeback.rs`) and are written at the next flush, right after a flush of what
//!   they depend on (refcounts, the file length, copied-on-write data);
//! - a new L2 table is written and flushed before the L1 entry that points at it;
//! - a refcount is lowered only after the entry that referenced the cluster is durably gone (the
//!   references are dropped at the next flush).
//!
//! The rules, and why each holds: `ordering.rs`.

use std::sync::atomic::Ordering;

use crate::qcow2::error::{Error, Result};
use crate::qcow2::header::FieldWrite;
use crate::qcow2::image::Qcow2Image;
use crate::qcow2::offsets::HostCluster;
use crate::qcow2::ordering::WriteOrder;
use crate::qcow2::overlap::MetadataKind;
use crate::qcow2::refcount::Refcounts;

/// What supplies the guest data below this image (the backing chain), for copy-on-write.
pub type BackingRead<'a> = &'a dyn Fn(&mut [u8], u64) -> Result<()>;

/// Whether a write changes what the guest reads (and so marks the recording bitmaps).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Change {
    Guest,
    Unchanged,
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
    /// Set once the image was marked corrupt: every later change is refused.
    pub(super) corrupt: bool,
    /// Set until the first change to the image since it was opened (or since its persistent
    /// bitmaps were last stored): before it, the bitmaps snapfs maintains are marked `in_use` and
    /// the autoclear bits it does not know are cleared (`bitmaps.rs`); not at open, so that a
    /// read-write mount nobody writes to leaves the file exactly as it was.
    pub(super) before_first_change: bool,
    /// What must reach the disk before what (see `ordering.rs`).
    pub(super) order: WriteOrder,
}

impl Writer {
    /// Sets up writing: refuses images QEMU would repair first, loads the persistent bitmaps
    /// (prepared for the first change, see [`Qcow2Image::writer`]), and indexes the metadata
    /// clusters.
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
        image.load_bitmaps_for_writing()?;
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
            before_first_change: h.version >= 3,
            order: WriteOrder::default(),
        };
        writer.index_metadata(image);
        Ok(writer)
    }
}

impl Qcow2Image {
    /// The write side, locked. Every change to the image (guest writes, discards, resizes,
    /// snapshot and chain operations) goes through here, so this is where the image is prepared
    /// for its first change (bitmaps `in_use`, unknown autoclear bits cleared), once, before the
    /// caller changes anything.
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
        if w.before_first_change {
            self.prepare_first_change(&mut w)?;
        }
        Ok(w)
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

    /// Writes `data` at guest `offset` of the active disk.
    pub fn write_at(&self, data: &[u8], offset: u64, backing: BackingRead) -> Result<()> {
        let mut w = self.writer()?;
        self.check_not_retired()?;
        self.write_locked(&mut w, data, offset, backing)?;
        drop(w);
        self.write_behind.wrote(self.storage(), data.len() as u64);
        Ok(())
    }

    pub(super) fn check_not_retired(&self) -> Result<()> {
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
        self.write_marked(w, data, offset, backing, Change::Guest)
    }

    /// Writes bytes the disk already reads at `offset` (data pulled up from a layer below): the
    /// guest sees no change, so no bitmap is marked (QEMU's `BDRV_REQ_WRITE_UNCHANGED`, as a
    /// `block-stream` writes).
    pub fn write_unchanged_locked(
        &self,
        w: &mut Writer,
        data: &[u8],
        offset: u64,
        backing: BackingRead,
    ) -> Result<()> {
        self.write_marked(w, data, offset, backing, Change::Unchanged)
    }

    fn write_marked(
        &self,
        w: &mut Writer,
        data: &[u8],
        offset: u64,
        backing: BackingRead,
        change: Change,
    ) -> Result<()> {
        let size = self.virtual_size();
        if offset
            .checked_add(data.len() as u64)
            .is_none_or(|end| end > size)
        {
            return Err(Error::PastEnd { offset, size });
        }
        if change == Change::Guest {
            self.mark_changed(offset, data.len() as u64);
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
        self.zero_marked(w, offset, len, backing, has_backing, Change::Guest)
    }

    /// [`Qcow2Image::zero_locked`] of a range that already reads as zeros (pulled up from a
    /// layer below): no bitmap is marked.
    pub fn zero_unchanged_locked(
        &self,
        w: &mut Writer,
        offset: u64,
        len: u64,
        backing: BackingRead,
        has_backing: bool,
    ) -> Result<()> {
        self.zero_marked(w, offset, len, backing, has_backing, Change::Unchanged)
    }

    fn zero_marked(
        &self,
        w: &mut Writer,
        offset: u64,
        len: u64,
        backing: BackingRead,
        has_backing: bool,
        change: Change,
    ) -> Result<()> {
        let size = self.virtual_size();
        let end = offset.saturating_add(len).min(size);
        if offset >= end {
            return Ok(());
        }
        if change == Change::Guest {
            self.mark_changed(offset, end - offset);
        }
        let g = self.geometry;
        let cs = g.cluster_size();
        let first_full = offset.div_ceil(cs) * cs;
        let last_full = end / cs * cs;
        let zero_flag_ok = self.header.version >= 3;
        if first_full >= last_full || (!zero_flag_ok && has_backing) {
            // No whole cluster, or no way to mark one as zero over a backing file (v2).
            return self.write_zeros(w, offset, end - offset, backing, change);
        }
        if offset < first_full {
            self.write_zeros(w, offset, first_full - offset, backing, change)?;
        }
        self.zero_clusters(w, first_full, last_full, has_backing)?;
        if last_full < end {
            self.write_zeros(w, last_full, end - last_full, backing, change)?;
        }
        Ok(())
    }

    fn write_zeros(
        &self,
        w: &mut Writer,
        offset: u64,
        len: u64,
        backing: BackingRead,
        change: Change,
    ) -> Result<()> {
        const CHUNK: u64 = 1 << 20;
        let zeros = vec![0u8; CHUNK.min(len) as usize];
        let mut pos = offset;
        while pos < offset + len {
            let n = CHUNK.min(offset + len - pos);
            self.write_marked(w, &zeros[..n as usize], pos, backing, change)?;
            pos += n;
        }
        Ok(())
    }
}
