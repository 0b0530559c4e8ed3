//! Giving back the references that overwritten or dropped entries held (QEMU's
//! `qcow2_free_any_cluster`, `block/qcow2-refcount.c`), and the refcount error glue of the write
//! side.
//!
//! Ordering: a reference is dropped only after the entry that held it is gone from the file (the
//! callers write the new L2 entries first, see `cluster.rs`); and, in memory, only once no read
//! that may still use the old mapping runs (the `reclaim` lock), so that a freed cluster handed out
//! again is never read as the old data.

use crate::qcow2::error::{Error, Result};
use crate::qcow2::image::Qcow2Image;
use crate::qcow2::l2::Reference;
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
}
