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
//! The persistent bitmaps' clusters are: their directory (as QEMU's `bitmap-directory` check),
//! and beyond QEMU their tables and the data clusters of the bitmaps snapfs loaded, all
//! re-indexed whenever the bitmaps are stored to new clusters.

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
    /// The persistent bitmaps' directory, tables and data.
    Bitmap,
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
        if let Some(Ok(bitmaps)) = image.bitmaps.get() {
            for (offset, len) in bitmaps.state.lock().stored_ranges(cs) {
                add(offset, len, MetadataKind::Bitmap);
            }
        }
    }

    /// Indexes the clusters the persistent bitmaps occupy now (`ranges`, as bytes), in place
    /// of those indexed before (a store moved them).
    pub(super) fn reindex_bitmaps(&mut self, ranges: &[(u64, u64)], geometry: &Geometry) {
        self.metadata
            .retain(|_, kind| *kind != MetadataKind::Bitmap);
        for &(offset, len) in ranges {
            for c in geometry.clusters_touched(offset, len) {
                self.metadata.insert(c, MetadataKind::Bitmap);
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

#[cfg(test)]
mod tests {

    use super::*;
    use crate::qcow2::bitmap::DirtyBitmap;
    use crate::qcow2::bitmap_chain::RecordingBitmap;
    use crate::qcow2::offsets::HostOffset;
    use crate::qcow2::testing::memory_image;

    const MIB: u64 = 1 << 20;
    const NOTHING_BELOW: &dyn Fn(&mut [u8], u64) -> Result<()> = &|buf, _| {
        buf.fill(0);
        Ok(())
    };

    /// A new 4 MiB image with 64 KiB clusters in memory, written at 0, with a recording bitmap
    /// that marks a write at 1 MiB, stored (directory, table and one data cluster).
    fn image_with_a_stored_bitmap() -> Qcow2Image {
        let image = memory_image(4 * MIB);
        image
            .write_at(&[1u8; 65536], 0, NOTHING_BELOW)
            .expect("writing");
        let bitmap = RecordingBitmap {
            name: b"b1".to_vec(),
            bitmap: DirtyBitmap::new(4 * MIB, 16).expect("a bitmap"),
        };
        image.add_bitmaps_like(&[bitmap]).expect("adding a bitmap");
        image
            .write_at(&[2u8; 4096], MIB, NOTHING_BELOW)
            .expect("writing");
        image.store_bitmaps().expect("storing the bitmaps");
        image
    }

    fn bitmap_ranges(image: &Qcow2Image) -> Vec<(u64, u64)> {
        let Some(Ok(bitmaps)) = image.bitmaps.get() else {
            panic!("the bitmaps are loaded");
        };
        bitmaps
            .state
            .lock()
            .stored_ranges(image.geometry.cluster_size())
    }

    /// A write of data or new metadata that would land on a bitmap's directory, table or data
    /// is stopped (as QEMU stops one on the directory), and the clusters of the bitmaps as
    /// stored before the last store are no longer protected once they are free.
    #[test]
    fn writes_onto_the_bitmaps_clusters_are_stopped_and_the_index_follows_a_store() {
        let image = image_with_a_stored_bitmap();
        let first = bitmap_ranges(&image);
        // Directory, table and the data cluster of the marked range.
        assert_eq!(first.len(), 3, "{first:x?}");
        image
            .write_at(&[3u8; 4096], 2 * MIB, NOTHING_BELOW)
            .expect("writing");
        image.store_bitmaps().expect("storing again");
        let now = bitmap_ranges(&image);
        assert_ne!(first, now, "a store writes new clusters");
        let g = image.geometry;
        let clusters: std::collections::HashSet<HostCluster> = now
            .iter()
            .flat_map(|&(offset, len)| g.clusters_touched(offset, len))
            .collect();
        let mut w = image.writer().expect("the write side");
        let freed = first
            .iter()
            .filter(|(offset, _)| !clusters.contains(&g.cluster_of(HostOffset(*offset))));
        for &(offset, _) in freed {
            // Freed by the store: the index let go of it. (No refcount claims it either.)
            image
                .check_overlap(&mut w, "a test write", offset, 512)
                .expect("a freed cluster of the old bitmaps is not metadata");
        }
        for (offset, len) in now {
            let stopped = image.check_overlap(&mut w, "a test write", offset, len.min(512));
            match stopped {
                Err(Error::Overlap { metadata, .. }) => {
                    assert!(metadata.starts_with("Bitmap metadata"), "{metadata}")
                }
                other => panic!("a write at {offset:#x} onto the bitmaps: {other:?}"),
            }
        }
    }
}
