//! Giving back the references that overwritten or dropped entries held (QEMU's
//! `qcow2_free_any_cluster`, `block/qcow2-refcount.c`), and the refcount error glue of the write
//! side.
//!
//! Ordering (rule 3 of `ordering.rs`): a reference is dropped only once the entry that held it is
//! durably gone from the file. The callers write the new entries first (`cluster.rs`, `grow.rs`)
//! and hand the old references here; they are *deferred*, and dropped by the next flush
//! ([`Qcow2Image::drop_deferred`]), after the flush that made the new entries durable (QEMU: the
//! refcount cache depends on the L2 cache when freeing). A crash before then leaks the clusters,
//! never hands them to two owners. In memory a reference drops only once no read that may still
//! use the old mapping runs (the `reclaim` lock), so that a freed cluster handed out again is
//! never read as the old data.

use crate::qcow2::error::{Error, Result};
use crate::qcow2::image::Qcow2Image;
use crate::qcow2::l2::Reference;
use crate::qcow2::offsets::HostOffset;
use crate::qcow2::refcount::RefcountError;
use crate::qcow2::write::Writer;

impl Qcow2Image {
    /// Names the image in a refcount error.
    pub(super) fn refcount_err(&self) -> impl Fn(RefcountError) -> Error + '_ {
        |source| Error::Refcount {
            path: self.path.clone(),
            source,
        }
    }

    /// Drops `references`, held by entries that were just overwritten, at the next flush.
    pub(super) fn release(&self, w: &mut Writer, references: Vec<Reference>) {
        for r in references {
            w.order.deferred.extend(r.clusters(&self.geometry));
        }
    }

    /// Drops a reference of `count` clusters from `offset` that a just written entry or header
    /// stopped using (an old L2 or L1 table), at the next flush.
    pub(super) fn release_clusters(&self, w: &mut Writer, offset: HostOffset, count: u64) {
        let cs = self.geometry.cluster_size();
        w.order
            .deferred
            .extend((0..count).map(|i| HostOffset(offset.0 + i * cs)));
    }

    /// Drops the deferred references; called right after a flush made the entries that replaced
    /// them durable. On an error what is left stays deferred (a crash then leaks it at worst).
    pub(super) fn drop_deferred(&self, w: &mut Writer) -> Result<()> {
        let deferred = std::mem::take(&mut w.order.deferred);
        if deferred.is_empty() {
            return Ok(());
        }
        // Reads still using the old mappings finish before a cluster can be reused.
        let _quiet = self.reclaim.write();
        for (i, &cluster) in deferred.iter().enumerate() {
            if let Err(source) = w.refcounts.update(self.storage(), cluster, -1) {
                w.order.deferred.extend_from_slice(&deferred[i + 1..]);
                return Err(self.refcount_err()(source));
            }
        }
        Ok(())
    }
}
