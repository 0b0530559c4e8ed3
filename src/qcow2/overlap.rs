//! QEMU's overlap checks (`qcow2_check_metadata_overlap`, `block/qcow2-refcount.c`): before a
//! write of guest data or new metadata lands in a cluster, the write side checks that the cluster
//! holds no metadata. A refcount that forgot a metadata cluster would otherwise let the allocator
//! hand it out and the next data write destroy it; the check stops that write and marks the image
//! corrupt instead (see `corrupt.rs`).
//!
//! The index: every cluster of the header, the active L1 table, the active L2 tables, the snapshot
//! table and the snapshot L1 tables, by host cluster; the refcount table and blocks are asked of
//! the refcounts themselves (they move and multiply on their own). As in QEMU's default
//! (`overlap-check=cached`), the inactive L2 tables (those of snapshots only) are not indexed.

use crate::qcow2::error::{Error, Result};
use crate::qcow2::image::Qcow2Image;
use crate::qcow2::l1::{L1Entry, L1Table};
use crate::qcow2::limits::L1_ENTRY_SIZE;
use crate::qcow2::offsets::{Geometry, HostCluster};
use crate::qcow2::write::Writer;

/// Kinds of metadata whose clusters a data write must never touch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum MetadataKind {
    Header,
    ActiveL1,
    ActiveL2,
    SnapshotTable,
    SnapshotL1,
}

impl Writer {
    /// Indexes the metadata clusters of the image as opened.
    pub(super) fn index_metadata(&mut self, image: &Qcow2Image) {
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

impl Qcow2Image {
    /// QEMU's overlap check: refuses (and marks the image corrupt) a write of `len` bytes at
    /// `offset` that would land on metadata. Called before every write of guest data and of
    /// new metadata into freshly allocated clusters, before anything is written.
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
                self.mark_corrupt(w, &format!("{what} at {offset:#x} overlaps {metadata}"));
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
}
