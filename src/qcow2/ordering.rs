//! The order in which metadata reaches the disk, so that a power cut (not only a killed process)
//! leaves at most leaked clusters, and every write a completed flush acknowledged.
//!
//! A write to the image file is durable only once a flush completes after it (the contract of
//! [`crate::qcow2::storage`]); writes between two flushes may reach the disk in any order, and a
//! write may be torn into its 512-byte sectors. QEMU's rules for qcow2 (`block/qcow2-cache.c`,
//! `qcow2-cluster.c`, `qcow2-refcount.c`), which this engine follows:
//!
//! 1. **A refcount is raised, and flushed, before any L1/L2 entry that points at its cluster is
//!    written.** Data clusters come from a *reservation*: a run of clusters whose refcounts are
//!    set to 1 (in memory until the flush below: `Refcounts::allocate_unwritten`, so that a
//!    killed process leaves neither the counts nor the entries), with the file extended over
//!    the run (an entry naming a cluster past the end of
//!    the file is an error to `qemu-img check`, and the data write that would extend the file
//!    is not ordered before the entry), before any of them is handed out. The L2 entries that
//!    name them are not written at once: they wait in memory for the next write-back
//!    (`l2_writeback.rs`), which flushes first. So one flush covers many allocating writes, as
//!    QEMU's write-back L2 cache depends on its refcount cache (`qcow2_cache_set_dependency`). A
//!    new L2 table is allocated from the refcounts directly, written, and flushed before the L1
//!    entry names it (`l2_allocate` + `qcow2_cache_flush`); so is a new L1 table before the
//!    header names it.
//! 2. **Copied-on-write data is flushed before the L2 entry that maps it is written.** When a
//!    new cluster gets bytes the guest did not write in this request (the rest of a partly
//!    written cluster, from the old cluster or the backing file), a crash must not keep the
//!    entry and lose those bytes: they were acknowledged long ago. The write-back's first flush
//!    covers them (QEMU: `qcow2_cache_depends_on_flush` after `perform_cow`). Bytes the guest
//!    writes itself are not ordered (as in QEMU): until the guest flushes they may read as
//!    anything. A zero fill in clusters the reservation made (a hole past the file's old end,
//!    never written) is not written at all. A chain operation that copies what the disk shows
//!    into a layer that read through to it there (a layer delete) orders all its data this way
//!    ([`Writer::order_as_copy`]).
//! 3. **A refcount drops only once the entry that referenced the cluster is durably gone.** The
//!    references that overwritten or discarded entries held are *deferred* and dropped at the
//!    next flush, after the write-back of the new entries and the flush that made them durable
//!    (QEMU: the refcount cache depends on the L2 cache when freeing). Until then the clusters
//!    stay in use (a crash leaks them, never hands them to two owners).
//! 4. **A header write is the commit point** of anything that moves a table (L1 growth, the
//!    refcount table, the snapshot operations of [`crate::qcow2::snapshot_ops`]): the new table
//!    is written and flushed first, the header fields that switch to it are one write within one
//!    sector, and what the old table held is freed only after that write is durable. Each of
//!    them starts with a full flush, so no L2 table waits in memory while the state moves.
//! 5. **A completed flush makes everything before it durable:** a guest flush (an
//!    `fsync`/`fdatasync` of `live.raw`, [`Qcow2Image::flush_writes`]), the end of every command
//!    and unmount ([`Qcow2Image::flush`]) write the waiting L2 tables back, flush, then drop the
//!    deferred references and give back what is left of the reservation (leak-only writes:
//!    nothing on disk points at those clusters), so that neither a clean unmount nor a process
//!    killed after a completed flush leaves a leaked cluster.
//!
//! The flushes are few: two per guest flush (what the entries depend on, then the entries), one
//! per new L2 table, and one per write-back when more tables wait than the cache affords
//! (`l2_writeback.rs`); none per allocating write.

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
    /// Since the last flush, something was written that L2 entries written from now on depend
    /// on: refcounts or a file length of a reservation, copied-on-write bytes in new clusters
    /// (rules 1 and 2).
    prerequisites_unflushed: bool,
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
}

impl WriteOrder {
    /// Whether L2 entries written now need a flush first (rules 1 and 2).
    pub(super) fn entries_wait_for_flush(&self) -> bool {
        self.prerequisites_unflushed
    }
}

impl Qcow2Image {
    /// Flushes the image file (nothing else).
    pub(super) fn sync(&self) -> Result<()> {
        self.storage
            .flush()
            .map_err(|e| Error::io(format!("{}: flush", self.path.display()), e))
    }

    /// Flushes, for a write that depends on everything written before it: the reservation's
    /// counts are written first (they stay in memory until something depends on them), and the
    /// L2 tables that wait are written right after (what they depend on is durable now), so
    /// that counts on disk are soon followed by the entries that name their clusters (a killed
    /// process leaks at most what was reserved between the two).
    pub(super) fn barrier(&self, w: &mut Writer) -> Result<()> {
        w.refcounts
            .write_unwritten(self.storage())
            .map_err(self.refcount_err())?;
        self.sync()?;
        w.order.prerequisites_unflushed = false;
        self.write_unwritten_l2(w)
    }

    /// Whether a flush would still settle something (L2 tables waiting to be written, deferred
    /// references, a reservation): a layer a failed chain operation wrote into is settled
    /// before it is let go, since nothing else flushes a backing layer (unmount flushes the
    /// top).
    pub fn has_unsettled(&self, w: &Writer) -> bool {
        !w.order.deferred.is_empty()
            || w.order.reserved.is_some()
            || !self.unwritten_l2.is_empty()
            || w.refcounts.has_unwritten()
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
        // The counts stay in memory until the first flush that something depends on
        // (`barrier`): a process killed before then leaves neither them nor the entries.
        let first = w
            .refcounts
            .allocate_unwritten(self.storage(), size)
            .map_err(self.refcount_err())?;
        if let Err(e) = self.cover(w, first, size) {
            // Nothing points at the run: a failed reservation gives its clusters back.
            self.give_back(w, first, size);
            return Err(e);
        }
        w.order.next_reservation = (size * 2).min(max);
        w.order.reserved =
            (size > count).then_some((HostOffset(first.0 + count * cs), size - count));
        Ok(first)
    }

    /// Makes a new reservation of `size` clusters at `first` usable: the file covers it, and
    /// both the length and the refcounts must be durable before any entry naming one of its
    /// clusters is written (an entry naming a cluster past the end of the file is an error
    /// `qemu-img check` reports, and the data write that would extend the file is not ordered
    /// before the entry): the write-back of the entries flushes first.
    fn cover(&self, w: &mut Writer, first: HostOffset, size: u64) -> Result<()> {
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
        w.order.prerequisites_unflushed = true;
        Ok(())
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
        w.order.prerequisites_unflushed = true;
    }

    /// Notes that L2 entries mapping the data just written are about to change: while the
    /// writer copies what the disk shows (a layer delete), that data is ordered before them
    /// (rule 2).
    pub(super) fn before_l2_update(&self, w: &mut Writer) {
        if w.order.copying {
            w.order.prerequisites_unflushed = true;
        }
    }

    /// Gives back the reserved clusters nothing uses: their refcounts drop to 0. Nothing on disk
    /// points at them, so the write needs no order. A reservation at the end of the file also
    /// gives the file its old end back (as QEMU's files end at their last cluster): a crash that
    /// keeps the shorter file but not the lower refcounts leaves counts past the end that
    /// nothing names, which `qemu-img check` does not look at, and a later allocation skips.
    fn return_reservation(&self, w: &mut Writer) -> Result<()> {
        w.order.fresh_from = None;
        if let Some((next, left)) = w.order.reserved.take() {
            w.refcounts
                .give_back(self.storage(), next, left)
                .map_err(self.refcount_err())?;
            let end = next.0 + left * self.geometry.cluster_size();
            if self.regular_file_len() == Some(end)
                && let Err(e) = self.storage.set_len(next.0)
            {
                log::debug!(
                    "{}: the file keeps {left} free clusters at its end: {e}",
                    self.path.display()
                );
            }
        }
        Ok(())
    }

    /// Rule 5 for a caller that holds the writer, at the end of a command: everything written
    /// so far becomes durable, then the deferred references drop and the reservation goes back;
    /// the next one starts small again.
    pub fn flush_locked(&self, w: &mut Writer) -> Result<()> {
        self.flush_writes_locked(w)?;
        w.order.next_reservation = FIRST_RESERVATION;
        Ok(())
    }

    /// A guest flush for a caller that holds the writer: the waiting L2 tables are written
    /// back, everything written so far becomes durable, then the deferred references drop and
    /// the reservation goes back (so that a process killed after a completed flush leaks
    /// nothing, as QEMU's does not). The next reservation keeps its size: a stream of writes
    /// with a flush every few of them does not start small each time.
    pub fn flush_writes_locked(&self, w: &mut Writer) -> Result<()> {
        // The unused part goes back first, so that its counts (still in memory, or zeroed with
        // the others) never reach the file between the two flushes.
        self.return_reservation(w)?;
        self.write_back_l2(w)?;
        self.barrier(w)?;
        self.drop_deferred(w)?;
        // Leak-only writes (nothing names those clusters): no flush needed.
        w.refcounts
            .write_unwritten(self.storage())
            .map_err(self.refcount_err())
    }

    /// Makes everything written so far durable and settles the write side (the end of a
    /// command, unmount); see rule 5.
    pub fn flush(&self) -> Result<()> {
        match self.writer.get() {
            // Not `writer()`: a flush is no change, and must not clear the autoclear bits.
            Some(writer) => self.flush_locked(&mut writer.lock()),
            None => self.sync(),
        }
    }

    /// Makes everything written so far durable: an `fsync`/`fdatasync` of the guest disk; see
    /// rule 5 (the same as [`Qcow2Image::flush`] but for the size of the next reservation).
    pub fn flush_writes(&self) -> Result<()> {
        match self.writer.get() {
            Some(writer) => self.flush_writes_locked(&mut writer.lock()),
            None => self.sync(),
        }
    }
}
