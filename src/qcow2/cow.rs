//! Copy-on-write of data clusters (QEMU's `perform_cow`, `block/qcow2-cluster.c`): a write into
//! a cluster that is not ours alone (shared with a snapshot, compressed, a zero cluster, or not
//! allocated) goes to a newly allocated run of clusters; the parts of its first and last cluster
//! that the write does not cover are filled with what the disk showed there before (the old
//! cluster, the backing file, or zeros).
//!
//! Ordering: the whole run, fill included, is written before the L2 entries that map it
//! (`cluster.rs`); when a fill was written it is also flushed before them (`ordering.rs` rule 2,
//! QEMU's `qcow2_cache_depends_on_flush` after `perform_cow`), so that a power cut leaves either
//! the old mapping or the new one with the bytes it showed before. The guest's own bytes are not
//! ordered (as in QEMU): until the guest flushes they may read as anything.

use crate::qcow2::error::Result;
use crate::qcow2::image::Qcow2Image;
use crate::qcow2::offsets::HostOffset;
use crate::qcow2::write::BackingRead;

/// A run of newly allocated clusters at guest offset `guest_start`, `len` bytes, of which
/// `write_from..write_to` (relative) is written by the guest.
pub(super) struct CowRun {
    pub guest_start: u64,
    pub len: u64,
    pub write_from: usize,
    pub write_to: usize,
}

/// The run as it will be written, when it is more than the guest's bytes.
pub(super) enum CowFill {
    /// The guest data with the old contents around it.
    Assembled(Vec<u8>),
    /// The guest data with zeros around it (the old contents read as zeros): built only if the
    /// clusters may hold something else (not fresh), so that a 4 KiB write into a new cluster
    /// of an empty disk costs no 64 KiB buffer.
    Zeros,
}

impl Qcow2Image {
    /// What a run needs besides the guest's bytes: nothing when the guest writes whole clusters
    /// (written straight from the request: a 1 MiB buffer would cost a memset and a copy per
    /// 1 MiB write), else the run assembled with the old contents of its partly written first
    /// and last cluster. `old_reads_zero`: those clusters read as zeros now (zero clusters,
    /// or unallocated with nothing below). Called before the run is allocated, so that a
    /// failed read allocates nothing.
    pub(super) fn cow_fill(
        &self,
        run: &CowRun,
        guest: &[u8],
        backing: BackingRead,
        old_reads_zero: bool,
    ) -> Result<Option<CowFill>> {
        let cs = self.geometry.cluster_size();
        let first_partial = run.write_from > 0;
        let last_partial = run.write_to < run.len as usize;
        if !first_partial && !last_partial {
            return Ok(None);
        }
        if old_reads_zero {
            return Ok(Some(CowFill::Zeros));
        }
        let mut buf = vec![0u8; run.len as usize];
        if first_partial {
            self.read_current(&mut buf[..cs as usize], run.guest_start, backing)?;
        }
        if last_partial && !(run.len == cs && first_partial) {
            let last_start = (run.len - cs) as usize;
            self.read_current(
                &mut buf[last_start..],
                run.guest_start + last_start as u64,
                backing,
            )?;
        }
        buf[run.write_from..run.write_to].copy_from_slice(guest);
        Ok(Some(CowFill::Assembled(buf)))
    }

    /// Writes the run at `host`: the guest's bytes alone, or the assembled run. `fresh`: the
    /// run's clusters were never written (a hole the reservation made, `ordering.rs`). Returns
    /// whether any fill was written (it must then be flushed before the L2 entries).
    pub(super) fn write_cow_run(
        &self,
        run: &CowRun,
        host: HostOffset,
        guest: &[u8],
        fill: Option<CowFill>,
        fresh: bool,
    ) -> Result<bool> {
        match fill {
            None => self.write_file(guest, host.0, "guest data").map(|()| false),
            // A fresh run is a hole: it reads as zeros without being written.
            Some(CowFill::Zeros) if fresh => self
                .write_file(guest, host.0 + run.write_from as u64, "guest data")
                .map(|()| false),
            Some(CowFill::Zeros) => {
                let mut buf = vec![0u8; run.len as usize];
                buf[run.write_from..run.write_to].copy_from_slice(guest);
                self.write_new_run(&buf, host.0, run.write_from, run.write_to, fresh)
            }
            Some(CowFill::Assembled(buf)) => {
                self.write_new_run(&buf, host.0, run.write_from, run.write_to, fresh)
            }
        }
    }

    /// The file's length if it is growable (None for a block device, whose unused space holds
    /// whatever was there before).
    pub(super) fn regular_file_len(&self) -> Option<u64> {
        if self.storage.fixed_size() {
            return None;
        }
        self.storage.len().ok()
    }

    /// Writes the newly allocated run `buf` at `host`, of which `write_from..write_to` is guest
    /// data and the rest the copied-on-write fill. In a `fresh` run (never written: a hole of
    /// the file that reads as zeros, durably) a fill that is all zeros is not written: a 4 KiB
    /// write into a fresh 64 KiB cluster then writes 4 KiB, not 64 KiB, as QEMU does by zeroing
    /// the cluster without writing it, and no fill needs a flush before the L2 entry. Returns
    /// whether any fill was written.
    fn write_new_run(
        &self,
        buf: &[u8],
        host: u64,
        write_from: usize,
        write_to: usize,
        fresh: bool,
    ) -> Result<bool> {
        // OR-folding 4 KiB at a time vectorises; a byte-wise `all` that may stop early does not.
        let zero = |part: &[u8]| {
            part.chunks(4096)
                .all(|c| c.iter().fold(0u8, |acc, &b| acc | b) == 0)
        };
        let from = if fresh && zero(&buf[..write_from]) {
            write_from
        } else {
            0
        };
        let to = if fresh && zero(&buf[write_to..]) {
            write_to
        } else {
            buf.len()
        };
        self.write_file(&buf[from..to], host + from as u64, "guest data")?;
        Ok(from < write_from || to > write_to)
    }

    /// Reads what the active disk shows at `offset` now (for copy-on-write).
    pub(super) fn read_current(
        &self,
        buf: &mut [u8],
        offset: u64,
        backing: BackingRead,
    ) -> Result<()> {
        let l1 = self.active_l1();
        self.read_through(&l1, buf, offset, backing)
    }
}
