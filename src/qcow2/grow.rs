//! Growing the virtual disk (`qemu-img resize` to a larger size) and the L1 table it may need
//! (QEMU's `qcow2_grow_l1_table`, `block/qcow2-cluster.c`).

use std::sync::Arc;
use std::sync::atomic::Ordering;

use crate::qcow2::error::{Error, Result};
use crate::qcow2::header::FieldWrite;
use crate::qcow2::image::Qcow2Image;
use crate::qcow2::limits::{L1_ENTRY_SIZE, MAX_L1_BYTES};
use crate::qcow2::offsets::HostOffset;
use crate::qcow2::overlap::MetadataKind;
use crate::qcow2::write::Writer;

impl Qcow2Image {
    /// Grows the virtual disk to `new_size` bytes (like `qemu-img resize`): the L1 table grows
    /// first if it must, then the size field changes. Shrinking is refused. This is the guest's
    /// entry point (`truncate` of `live.raw`): an image that is no longer the top refuses it
    /// ([`Error::Retired`]) so that the caller retries on the new top.
    pub fn grow(&self, new_size: u64) -> Result<()> {
        // Refused before the writer is taken: taking it clears the autoclear bits, and a refused
        // resize must leave the file as it was.
        if !self.check_grow(new_size)? {
            return Ok(());
        }
        let mut w = self.writer()?;
        self.check_not_retired()?;
        self.grow_locked(&mut w, new_size)
    }

    /// [`Qcow2Image::grow`] for a caller that holds the writer: a chain operation that grows the
    /// layer it writes into (a commit of a larger overlay), whether or not the layer is the top.
    pub fn grow_locked(&self, w: &mut Writer, new_size: u64) -> Result<()> {
        if self.check_grow(new_size)? {
            self.resize_locked(w, new_size)?;
        }
        Ok(())
    }

    /// Whether growing to `new_size` changes anything (false: it is the size already); an error
    /// if it is not allowed.
    fn check_grow(&self, new_size: u64) -> Result<bool> {
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
            return Ok(false);
        }
        if self.header.version < 3 && !self.snapshots().is_empty() {
            return Err(invalid(
                "a version 2 image with snapshots cannot be resized".into(),
            ));
        }
        Ok(true)
    }

    /// Sets the virtual size, growing the L1 table if needed. Callers check that shrinking is
    /// safe (nothing allocated past the new end).
    pub fn resize_locked(&self, w: &mut Writer, new_size: u64) -> Result<()> {
        let needed = self.geometry.l1_entries_for(new_size);
        // The L1 table covers the new size before the header says the disk is that large.
        if needed > self.active_l1().declared_len() {
            self.grow_l1(w, needed)?;
        }
        self.bitmaps_resized(self.virtual_size(), new_size)?;
        self.write_header(FieldWrite::Size(new_size), "header size")?;
        self.size.store(new_size, Ordering::Release);
        Ok(())
    }

    /// Moves the active L1 table to new clusters with room for `needed` entries (QEMU's
    /// `qcow2_grow_l1_table`).
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
        // Ordering (rule 4 of `ordering.rs`): the new table's refcount and the copy are written
        // and flushed before the header names it, so that a crash leaves the old table or the
        // whole new one; the header switch is flushed before the size that needs it is written,
        // and the old table is freed only once the switch is durable (deferred: `release.rs`).
        let bytes = l1.to_be_bytes((clusters * cs) as usize);
        self.write_file(&bytes, new_offset.0, "L1 table")?;
        self.barrier(w)?;
        // One header write switches l1_size and l1_table_offset together. `needed` fits: MAX_L1_BYTES holds fewer than 2^32 entries.
        let fields = FieldWrite::L1Table {
            entries: needed as u32,
            offset: new_offset.0,
        };
        self.write_header(fields, "header L1 fields")?;
        self.barrier(w)?;
        let old_offset = HostOffset(w.l1_offset);
        let old_clusters = (l1.declared_len() * L1_ENTRY_SIZE).div_ceil(cs);
        w.l1_offset = new_offset.0;
        *self.active_l1.write() = Arc::new(l1.with_declared_len(needed));
        w.remove_metadata(g.cluster_of(old_offset), old_clusters);
        w.add_metadata(g.cluster_of(new_offset), clusters, MetadataKind::ActiveL1);
        self.release_clusters(w, old_offset, old_clusters);
        Ok(())
    }
}
