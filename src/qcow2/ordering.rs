//! The order in which metadata reaches the disk, so that a power cut (not only a killed process)
//! leaves at most leaked clusters, and every write a completed flush acknowledged.
//!
//! A write to the image file is durable only once a flush completes after it (the contract of
//! [`crate::qcow2::storage`]); writes between two flushes may reach the disk in any order, and a
//! write may be torn into its 512-byte sectors. QEMU's rules for qcow2 (`block/qcow2-cache.c`,
//! `qcow2-cluster.c`, `qcow2-refcount.c`), which this engine follows:
//!
//! 1. **A refcount is raised, and flushed, before any L1/L2 entry points at its cluster.** Data
//!    clusters come from a *reservation*: a run of clusters whose refcounts are set to 1 and
//!    flushed together, with the file extended over the run in the same flush (an entry naming
//!    a cluster past the end of the file is an error to `qemu-img check`, and the data write
//!    that would extend the file is not ordered before the entry), before any of them is handed
//!    out. One flush then covers many allocating
//!    writes, as QEMU's write-back refcount cache does (its L2 cache depends on the refcount
//!    cache: `qcow2_cache_set_dependency`). A new L2 table is allocated from the refcounts
//!    directly, written, and flushed before the L1 entry names it (`l2_allocate` +
//!    `qcow2_cache_flush`); so is a new L1 table before the header names it.
//! 2. **Copied-on-write data is flushed before the L2 entry that maps it.** When a new cluster
//!    gets bytes the guest did not write in this request (the rest of a partly written cluster,
//!    from the old cluster or the backing file), a crash must not keep the entry and lose those
//!    bytes: they were acknowledged long ago. QEMU: `qcow2_cache_depends_on_flush` after
//!    `perform_cow`. Bytes the guest writes itself are not ordered (as in QEMU): until the guest
//!    flushes they may read as anything. A zero fill in clusters the reservation made (a hole
//!    past the file's old end, never written) is not written at all, so it needs no flush. A
//!    chain operation that copies what the disk shows into a layer that read through to it
//!    there (a layer delete) orders all its data this way ([`Writer::order_as_copy`]).
//! 3. **A refcount drops only once the entry that referenced the cluster is durably gone.** The
//!    references that overwritten or discarded entries held are *deferred* and dropped at the
//!    next flush, after the flush that made the new entries durable (QEMU: the refcount cache
//!    depends on the L2 cache when freeing). Until then the clusters stay in use (a crash leaks
//!    them, never hands them to two owners).
//! 4. **A header write is the commit point** of anything that moves a table (L1 growth, the
//!    refcount table, the snapshot operations of [`crate::qcow2::snapshot_ops`]): the new table
//!    is written and flushed first, the header fields that switch to it are one write within one
//!    sector, and what the old table held is freed only after that write is durable.
//! 5. **A completed flush makes everything before it durable:** [`Qcow2Image::flush`] (an
//!    `fsync`/`fdatasync` of `live.raw`, the end of every command, unmount) flushes, then drops
//!    the deferred references and gives back what is left of the reservation (both only lower
//!    refcounts of clusters nothing points at on disk: unordered, leak-only writes), so that a
//!    clean unmount leaves no leaked cluster.
//!
//! The flushes are few: one per reservation (up to [`MAX_RESERVATION_BYTES`] and
//! [`MAX_RESERVATION_CLUSTERS`] of new clusters),
//! one per new L2 table, one per request that copies on write, one per guest flush.

use crate::qcow2::error::{Error, Result};
use crate::qcow2::image::Qcow2Image;
use crate::qcow2::offsets::HostOffset;
use crate::qcow2::write::Writer;

/// The first reservation after a flush, in clusters; each following one doubles, up to
/// [`MAX_RESERVATION_BYTES`].
const FIRST_RESERVATION: u64 = 16;

/// The largest reservation: what a power cut can leak at most, besides the requests in flight.
pub const MAX_RESERVATION_BYTES: u64 = 32 << 20;

/// The largest reservation in clusters (32 MiB of the default 64 KiB clusters): with small
/// clusters a reservation of 32 MiB would cost thousands of refcount entries and blocks to set
/// and give back for writes that may never come.
pub const MAX_RESERVATION_CLUSTERS: u64 = 512;

/// The ordering state of one image's write side.
#[derive(Debug, Default)]
pub(super) struct WriteOrder {
    /// Clusters with a durable refcount of 1 that nothing points at yet: the next one's offset
    /// and how many are left.
    reserved: Option<(HostOffset, u64)>,
    /// Where the reservation's part that extended the file starts: clusters from there on
    /// were never written (a hole the reservation's flushed `set_len` made), so a zero fill
    /// there need not be written (nor flushed).
    fresh_from: Option<u64>,
    /// Clusters the next reservation takes.
    next_reservation: u64,
    /// Clusters whose reference the entries written since the last flush dropped (one element
    /// per reference; dropped by `release.rs` after the next flush).
    pub(super) deferred: Vec<HostOffset>,
    /// Copied-on-write bytes were written into new clusters since the last flush.
    fill_unflushed: bool,
    /// Every byte written is a copy of data the disk already shows (a layer delete pulling
    /// data up): all of it is ordered as a fill (rule 2).
    copying: bool,
}

impl Writer {
    /// Orders every following write as copied data (rule 2) until turned off: for a chain
    /// operation that copies what the disk shows into a layer that shows something else there
    /// until the new entries land (a layer delete, `ops::layers`).
    pub fn order_as_copy(&mut self, on: bool) {
        self.order.copying = on;
    }

    /// Whether a flush would still settle something (deferred references, a reservation): a
    /// layer a failed chain operation wrote into is settled before it is let go, since nothing
    /// else flushes a backing layer (unmount flushes the top).
    pub fn has_unsettled(&self) -> bool {
        !self.order.deferred.is_empty() || self.order.reserved.is_some()
    }
}

impl Qcow2Image {
    /// Flushes the image file (nothing else).
    pub(super) fn sync(&self) -> Result<()> {
        self.storage
            .flush()
            .map_err(|e| Error::io(format!("{}: flush", self.path.display()), e))
    }

    /// Flushes, for a write that depends on everything written before it.
    pub(super) fn barrier(&self, w: &mut Writer) -> Result<()> {
        self.sync()?;
        w.order.fill_unflushed = false;
        Ok(())
    }

    /// `count` contiguous clusters for guest data, with refcounts already durable (rule 1), and
    /// whether they were never written (holes past the file's old end: see `fresh_from`).
    pub(super) fn allocate_data(&self, w: &mut Writer, count: u64) -> Result<(HostOffset, bool)> {
        let first = self.take_reserved(w, count)?;
        let fresh = w.order.fresh_from.is_some_and(|f| first.0 >= f);
        Ok((first, fresh))
    }

    fn take_reserved(&self, w: &mut Writer, count: u64) -> Result<HostOffset> {
        let cs = self.geometry.cluster_size();
        if let Some((next, left)) = w.order.reserved
            && left >= count
        {
            w.order.reserved =
                (left > count).then_some((HostOffset(next.0 + count * cs), left - count));
            return Ok(next);
        }
        self.return_reservation(w)?;
        let max = (MAX_RESERVATION_BYTES / cs).clamp(1, MAX_RESERVATION_CLUSTERS);
        let size = w
            .order
            .next_reservation
            .clamp(FIRST_RESERVATION, max)
            .max(count);
        let first = w
            .refcounts
            .allocate(self.storage(), size)
            .map_err(self.refcount_err())?;
        // The file covers the reservation, durably with its refcounts, before any entry names
        // one of its clusters: an entry naming a cluster past the end of the file is an error
        // `qemu-img check` reports (the data write that would extend the file is not ordered
        // before the entry).
        if let Err(e) = self.cover_and_flush(w, first, size) {
            // Nothing points at the run: a failed reservation gives its clusters back.
            self.give_back(w, first, size);
            return Err(e);
        }
        w.order.next_reservation = (size * 2).min(max);
        w.order.reserved =
            (size > count).then_some((HostOffset(first.0 + count * cs), size - count));
        Ok(first)
    }

    /// Makes a new reservation of `size` clusters at `first` usable: the file covers it, durably
    /// with its refcounts, before any entry names one of its clusters (an entry naming a cluster
    /// past the end of the file is an error `qemu-img check` reports, and the data write that
    /// would extend the file is not ordered before the entry).
    fn cover_and_flush(&self, w: &mut Writer, first: HostOffset, size: u64) -> Result<()> {
        let end = first.0 + size * self.geometry.cluster_size();
        w.order.fresh_from = None;
        if let Some(len) = self.regular_file_len()
            && len < end
        {
            self.storage.set_len(end).map_err(|e| {
                Error::io(
                    format!("{}: extending the file to {end:#x}", self.path.display()),
                    e,
                )
            })?;
            w.order.fresh_from = Some(len.max(first.0));
        }
        self.barrier(w)
    }

    /// Gives back `count` clusters from `first` that were allocated for a change that failed
    /// before any entry named them (a failed write, a full disk): nothing on disk points at them,
    /// so their refcounts drop at once, unordered (a lost write leaks them at worst). They are
    /// not fresh any more (a failed write may have written part of them).
    pub(super) fn give_back(&self, w: &mut Writer, first: HostOffset, count: u64) {
        if let Err(e) = w.refcounts.free(self.storage(), first, count) {
            log::warn!(
                "{}: {count} clusters at {:#x} stay allocated after a failed change: {e}",
                self.path.display(),
                first.0
            );
        }
    }

    /// Notes that copied-on-write bytes went into a new cluster (rule 2).
    pub(super) fn wrote_fill(&self, w: &mut Writer) {
        w.order.fill_unflushed = true;
    }

    /// Before L2 entries that map new clusters are written: the fill they need is durable.
    pub(super) fn before_l2_update(&self, w: &mut Writer) -> Result<()> {
        if w.order.fill_unflushed || w.order.copying {
            self.barrier(w)?;
        }
        Ok(())
    }

    /// Gives back the reserved clusters nothing uses: their refcounts drop to 0. Nothing on disk
    /// points at them, so the write needs no order.
    fn return_reservation(&self, w: &mut Writer) -> Result<()> {
        w.order.fresh_from = None;
        if let Some((next, left)) = w.order.reserved.take() {
            w.refcounts
                .free(self.storage(), next, left)
                .map_err(self.refcount_err())?;
        }
        Ok(())
    }

    /// Rule 5 for a caller that holds the writer: everything written so far becomes durable,
    /// then the deferred references drop and the reservation goes back.
    pub fn flush_locked(&self, w: &mut Writer) -> Result<()> {
        self.barrier(w)?;
        w.order.next_reservation = FIRST_RESERVATION;
        self.drop_deferred(w)?;
        self.return_reservation(w)
    }

    /// Makes everything written so far durable (`fsync` of `live.raw`, the end of a command,
    /// unmount); see rule 5.
    pub fn flush(&self) -> Result<()> {
        match self.writer.get() {
            // Not `writer()`: a flush is no change, and must not clear the autoclear bits.
            Some(writer) => self.flush_locked(&mut writer.lock()),
            None => self.sync(),
        }
    }
}
