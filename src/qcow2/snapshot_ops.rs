//! Internal snapshot operations (create, revert, delete) and emptying the active state, each
//! switched in by one header write.
//!
//! QEMU (`block/qcow2-snapshot.c`) changes refcounts and then the COPIED flags of the active
//! L1/L2 entries in place; a crash between the two leaves entries whose COPIED flag disagrees
//! with the refcount, which `qemu-img check` counts as corruption, and no order of in-place
//! writes avoids that moment. Here an operation is built beside the image instead (see
//! [`Shadow`]): the refcount blocks it changes, the active L2 tables whose COPIED flags change,
//! the new active L1 table and the new snapshot table all go to clusters that the current state
//! calls free. After a flush, one write of header bytes 24..72 (size, l1_size, l1_table_offset,
//! refcount_table_offset and _clusters, nb_snapshots, snapshots_offset) switches to them, and a
//! second flush makes that durable. A crash before the switch leaves the old image intact (at
//! worst a longer file), a crash after it the new one, whole; neither leaks a cluster.
//!
//! The reference rule is QEMU's: a cluster counts one reference per path from an L1 table (the
//! active one or a snapshot's), so an L2 table shared by two L1 tables has refcount 2, and so
//! has every data cluster it maps. COPIED (refcount == 1) is kept exact on the active tables;
//! snapshot tables are never written in place, so their flags do not matter (QEMU ignores them).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::qcow2::error::{Error, Result};
use crate::qcow2::header::FieldWrite;
use crate::qcow2::image::Qcow2Image;
use crate::qcow2::l1::{L1Entry, L1Table};
use crate::qcow2::l2::{L2Entry, L2Table};
use crate::qcow2::limits::{L1_ENTRY_SIZE, MAX_L1_BYTES, MAX_SNAPSHOTS};
use crate::qcow2::mapping::L2Source;
use crate::qcow2::offsets::{HostCluster, HostOffset};
use crate::qcow2::overlap::MetadataKind;
use crate::qcow2::refcount::{Shadow, ShadowCommit};
use crate::qcow2::snapshot::{self, Snapshot};
use crate::qcow2::write::Writer;

mod delete;

/// Net reference changes by host cluster (named by its offset). Applied at once, so that a
/// cluster that gains and loses a reference in the same operation never passes through an
/// out-of-range count.
type Deltas = BTreeMap<HostOffset, i64>;

/// The L2 tables of an L1 table, by index (None where it has none).
type TableOffsets = Vec<Option<HostOffset>>;

/// What an operation switches the image to.
struct NewState {
    size: u64,
    l1_offset: u64,
    l1_declared: u64,
    l1_entries: Vec<L1Entry>,
    snapshot_table: SnapshotTable,
    /// L2 tables written for the active state, to hand to readers.
    copies: Vec<(HostOffset, L2Table)>,
}

/// A snapshot table as a state has it: where it is (0 when there is none), how many bytes it
/// takes, and its snapshots.
struct SnapshotTable {
    offset: u64,
    len: u64,
    snapshots: Arc<Vec<Snapshot>>,
}

impl Qcow2Image {
    /// Builds a new state with `build` beside the current one, then switches the header to it.
    /// Nothing on disk changes for the image until the switch; a failure before it takes back
    /// what the file grew by.
    fn transact<T>(
        &self,
        w: &mut Writer,
        build: impl FnOnce(&mut Shadow) -> Result<(NewState, T)>,
    ) -> Result<T> {
        // Deferred references drop first (their entries are durable after this flush), so that
        // the refcounts the new state is built from count only what points at clusters.
        self.flush_locked(w)?;
        let len_before = self.file_len();
        let built = {
            let Writer {
                refcounts,
                metadata,
                ..
            } = &mut *w;
            let is_metadata = |cluster: HostCluster| metadata.contains_key(&cluster);
            let mut tx = Shadow::new(refcounts, self.storage.as_ref(), &is_metadata);
            build(&mut tx).and_then(|(state, out)| {
                let commit = tx.finish().map_err(self.refcount_err())?;
                Ok((state, out, commit))
            })
        };
        let switched = built.and_then(|(state, out, commit)| {
            // Everything the new state consists of is durable before the header names it.
            self.sync()?;
            self.write_switch(&state, &commit)?;
            Ok((state, out, commit))
        });
        let (state, out, commit) = match switched {
            Ok(done) => done,
            Err(e) => {
                // Only clusters of the unfinished state lie past the old end.
                if self.file_len() > len_before {
                    let _ = self.storage.set_len(len_before);
                }
                return Err(e);
            }
        };
        // The header is written: whatever the flush says, the file now holds the new state.
        let durable = self.sync();
        self.install(w, state, &commit);
        if durable.is_ok() {
            // As QEMU discards what a snapshot operation frees, so that the host file system
            // gets the space back; only once the new state is durable.
            for (offset, len) in commit.freed_ranges(self.geometry.cluster_bits) {
                if let Err(e) = self.storage.punch_hole(offset, len) {
                    log::debug!(
                        "{}: no hole punched for {len} freed bytes at {offset:#x}: {e}",
                        self.path.display()
                    );
                }
            }
        }
        durable.map(|()| out)
    }

    /// The one header write that switches from the old state to the new one.
    fn write_switch(&self, state: &NewState, commit: &ShadowCommit) -> Result<()> {
        let (refcount_table_offset, refcount_table_clusters) = commit.table_location();
        // Both counts are bounded by the format's limits (32 MiB of L1, 65536 snapshots).
        let fields = FieldWrite::State {
            size: state.size,
            crypt_method: self.header.crypt_method,
            l1_entries: state.l1_declared as u32,
            l1_offset: state.l1_offset,
            refcount_table_offset,
            refcount_table_clusters,
            snapshots: state.snapshot_table.snapshots.len() as u32,
            snapshots_offset: state.snapshot_table.offset,
        };
        self.write_header(fields, "header (switch to the new state)")
    }

    /// Makes the switched-in state the one that reads and writes use.
    fn install(&self, w: &mut Writer, state: NewState, commit: &ShadowCommit) {
        let g = self.geometry;
        let cs = g.cluster_size();
        // Clusters the old state used are free now: no read of the old mapping may still run
        // when they are handed out again.
        let _quiet = self.reclaim.write();
        w.refcounts.install(commit);
        for (offset, table) in state.copies {
            self.publish_l2(offset, table);
        }
        w.metadata.retain(|_, kind| {
            !matches!(
                kind,
                MetadataKind::ActiveL1 | MetadataKind::SnapshotTable | MetadataKind::SnapshotL1
            )
        });
        let clusters = |len: u64| len.div_ceil(cs);
        let at = |offset: u64| g.cluster_of(HostOffset(offset));
        w.add_metadata(
            at(state.l1_offset),
            clusters(state.l1_declared * L1_ENTRY_SIZE),
            MetadataKind::ActiveL1,
        );
        let SnapshotTable {
            offset: snapshots_offset,
            len: snapshots_len,
            snapshots,
        } = state.snapshot_table;
        if snapshots_len > 0 {
            w.add_metadata(
                at(snapshots_offset),
                clusters(snapshots_len),
                MetadataKind::SnapshotTable,
            );
        }
        for s in snapshots.iter() {
            w.add_metadata(
                at(s.l1_table_offset),
                clusters(u64::from(s.l1_size) * L1_ENTRY_SIZE),
                MetadataKind::SnapshotL1,
            );
        }
        let table = L1Table::from_entries(state.l1_entries, state.l1_declared);
        w.reindex_active_l2(&table, &g);
        w.l1_offset = state.l1_offset;
        w.snapshot_table = (snapshots_offset, snapshots_len);
        *self.active_l1.write() = Arc::new(table);
        *self.snapshots.write() = snapshots;
        self.size.store(state.size, Ordering::Release);
    }

    /// The host clusters an L2 table's entries reference, once per entry: data clusters
    /// (preallocated zero ones too), and for compressed data every host cluster its bytes touch.
    fn referenced_clusters(&self, table: &[u64]) -> Vec<HostOffset> {
        let g = &self.geometry;
        let entries = table.len() / g.l2_entry_words();
        (0..entries)
            .filter_map(|i| L2Entry::read(table, i, g).reference(g))
            .flat_map(|r| r.clusters(g))
            .collect()
    }

    /// Adds `delta` references along every path from the L1 table `l1`: to each L2 table and to
    /// each cluster the tables reference.
    fn add_paths(&self, deltas: &mut Deltas, l1: &L1Table, delta: i64) -> Result<()> {
        for (i, entry) in l1.iter().enumerate() {
            let Some(l2_offset) = entry.l2_offset() else {
                continue;
            };
            *deltas.entry(l2_offset).or_default() += delta;
            let table = self.l2_table(i as u64, l2_offset)?;
            for cluster in self.referenced_clusters(&table) {
                *deltas.entry(cluster).or_default() += delta;
            }
        }
        Ok(())
    }

    fn apply_deltas(&self, tx: &mut Shadow, deltas: Deltas) -> Result<()> {
        for (offset, delta) in deltas {
            if delta != 0 {
                tx.add(offset, delta).map_err(self.refcount_err())?;
            }
        }
        Ok(())
    }

    /// Drops the reference of each cluster that `len` bytes at `offset` touch.
    fn release_range(&self, tx: &mut Shadow, offset: u64, len: u64) -> Result<()> {
        let g = &self.geometry;
        for cluster in g.clusters_touched(offset, len) {
            tx.add(g.offset_of(cluster), -1)
                .map_err(self.refcount_err())?;
        }
        Ok(())
    }

    /// Makes the active L2 tables (offsets, by L1 index) agree with the new refcounts: a table
    /// whose COPIED flags would change is copied, with the flags right, to a new cluster that
    /// only the active state uses (tables are never changed in place). Returns the copies.
    fn settle_active_tables(
        &self,
        tx: &mut Shadow,
        offsets: &mut TableOffsets,
    ) -> Result<Vec<(HostOffset, L2Table)>> {
        let g = &self.geometry;
        let mut copies = Vec::new();
        for (i, slot) in offsets.iter_mut().enumerate() {
            let Some(offset) = *slot else {
                continue;
            };
            let table = self.l2_table(i as u64, offset)?;
            let mut words = table.to_vec();
            let mut changed = false;
            for e in 0..words.len() / g.l2_entry_words() {
                let entry = L2Entry::read(&words, e, g);
                let Some(host) = entry.host() else {
                    continue;
                };
                let sole = tx.get(host).map_err(self.refcount_err())?.is_sole();
                let fixed = entry.with_copied(sole);
                if fixed != entry {
                    fixed.store(&mut words, e, g);
                    changed = true;
                }
            }
            if !changed {
                continue;
            }
            let copy = tx.allocate(1).map_err(self.refcount_err())?;
            let bytes: Vec<u8> = words.iter().flat_map(|v| v.to_be_bytes()).collect();
            self.write_file(&bytes, copy.0, "L2 table copy")?;
            // The active path moves from the table to its copy; the data keeps its count.
            tx.add(offset, -1).map_err(self.refcount_err())?;
            copies.push((copy, Arc::from(words)));
            *slot = Some(copy);
        }
        Ok(copies)
    }

    /// L1 entries for `offsets`, COPIED where the new refcount of the table is 1.
    fn with_copied_flags(
        &self,
        tx: &mut Shadow,
        offsets: &[Option<HostOffset>],
    ) -> Result<Vec<L1Entry>> {
        offsets
            .iter()
            .map(|&offset| {
                let Some(offset) = offset else {
                    return Ok(L1Entry::UNALLOCATED);
                };
                let sole = tx.get(offset).map_err(self.refcount_err())?.is_sole();
                Ok(L1Entry::new(offset, sole))
            })
            .collect()
    }

    /// Writes an L1 table of `declared` entries into new clusters; returns where.
    fn write_new_l1(
        &self,
        tx: &mut Shadow,
        entries: &[L1Entry],
        declared: u64,
        what: &str,
    ) -> Result<u64> {
        let cs = self.geometry.cluster_size();
        let bytes_len = declared * L1_ENTRY_SIZE;
        if bytes_len > MAX_L1_BYTES {
            return Err(Error::Invalid {
                path: self.path.clone(),
                reason: format!(
                    "{declared} L1 entries need a table larger than {} MiB",
                    MAX_L1_BYTES >> 20
                ),
            });
        }
        let clusters = bytes_len.div_ceil(cs).max(1);
        let offset = tx.allocate(clusters).map_err(self.refcount_err())?;
        let table =
            L1Table::from_entries(entries.iter().copied().take(declared as usize), declared);
        self.write_file(&table.to_be_bytes((clusters * cs) as usize), offset.0, what)?;
        Ok(offset.0)
    }

    /// Writes a snapshot table into new clusters; returns where and its length (0, 0 if empty).
    fn write_new_snapshot_table(&self, tx: &mut Shadow, table: &[Snapshot]) -> Result<(u64, u64)> {
        if table.is_empty() {
            return Ok((0, 0));
        }
        let cs = self.geometry.cluster_size();
        let mut bytes = snapshot::encode_table(table);
        let len = bytes.len() as u64;
        let clusters = len.div_ceil(cs);
        let offset = tx.allocate(clusters).map_err(self.refcount_err())?;
        bytes.resize((clusters * cs) as usize, 0);
        self.write_file(&bytes, offset.0, "snapshot table")?;
        Ok((offset.0, len))
    }

    /// Where the active L1 table goes: it stays where it is if its entries do not change, else
    /// it moves to new clusters and the old ones are released.
    fn replace_active_l1(
        &self,
        tx: &mut Shadow,
        (old_offset, old): (u64, &L1Table),
        entries: &[L1Entry],
        declared: u64,
    ) -> Result<u64> {
        if old
            .iter()
            .eq(L1Table::from_entries(entries.iter().copied(), declared).iter())
        {
            return Ok(old_offset);
        }
        self.release_range(tx, old_offset, declared * L1_ENTRY_SIZE)?;
        self.write_new_l1(tx, entries, declared, "active L1 table")
    }

    /// Writes `table` as the new snapshot table and releases the old one (offset, length).
    fn replace_snapshot_table(
        &self,
        tx: &mut Shadow,
        (old_offset, old_len): (u64, u64),
        table: &[Snapshot],
    ) -> Result<(u64, u64)> {
        self.release_range(tx, old_offset, old_len)?;
        self.write_new_snapshot_table(tx, table)
    }

    /// The L2 table offsets of an L1 table's entries.
    fn table_offsets(l1: &L1Table) -> TableOffsets {
        l1.iter().map(L1Entry::l2_offset).collect()
    }

    /// The snapshot table as it stands, for a state that keeps it.
    fn current_snapshot_table(&self, w: &Writer) -> SnapshotTable {
        let (offset, len) = w.snapshot_table;
        SnapshotTable {
            offset,
            len,
            snapshots: self.snapshots(),
        }
    }

    /// The state of an operation that changes the active tables only: the L2 tables of
    /// `offsets` settled with the new refcounts (see [`Self::settle_active_tables`]), their L1
    /// entries with COPIED flags, placed in an L1 table of `declared` entries by `place_l1`
    /// (which returns its offset), beside `snapshot_table`.
    fn active_state(
        &self,
        tx: &mut Shadow,
        (size, declared): (u64, u64),
        offsets: &mut TableOffsets,
        snapshot_table: SnapshotTable,
        place_l1: impl FnOnce(&mut Shadow, &[L1Entry]) -> Result<u64>,
    ) -> Result<NewState> {
        let copies = self.settle_active_tables(tx, offsets)?;
        let l1_entries = self.with_copied_flags(tx, offsets)?;
        let l1_offset = place_l1(tx, &l1_entries)?;
        Ok(NewState {
            size,
            l1_offset,
            l1_declared: declared,
            l1_entries,
            snapshot_table,
            copies,
        })
    }

    /// Creates an internal snapshot of the active state named `name`; returns it.
    pub fn create_snapshot(&self, name: &str) -> Result<Snapshot> {
        let mut w = self.writer()?;
        let existing = self.snapshots();
        if existing.len() as u32 >= MAX_SNAPSHOTS {
            return Err(Error::Invalid {
                path: self.path.clone(),
                reason: format!("the image already has {MAX_SNAPSHOTS} snapshots"),
            });
        }
        let l1 = self.active_l1();
        let declared = l1.declared_len();
        let (old_l1_offset, old_table) = (w.l1_offset, w.snapshot_table);
        let size = self.virtual_size();
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let next_id = existing
            .iter()
            .filter_map(|s| s.id_str().parse::<u64>().ok())
            .max()
            .unwrap_or(0)
            + 1;
        let mut extra = Vec::with_capacity(24);
        extra.extend_from_slice(&0u64.to_be_bytes());
        extra.extend_from_slice(&size.to_be_bytes());
        extra.extend_from_slice(&u64::MAX.to_be_bytes());
        let mut snap = Snapshot {
            l1_table_offset: 0,
            l1_size: declared as u32,
            id: next_id.to_string().into_bytes(),
            name: name.as_bytes().to_vec(),
            date_sec: now.as_secs() as u32,
            date_nsec: now.subsec_nanos(),
            vm_clock_nsec: 0,
            vm_state_size: 0,
            disk_size: Some(size),
            icount: None,
            extra,
        };
        self.transact(&mut w, |tx| {
            // The snapshot's paths: one more reference to every table and cluster (with 1-bit
            // refcounts this fails here, before anything is written).
            let mut deltas = Deltas::new();
            self.add_paths(&mut deltas, &l1, 1)?;
            self.apply_deltas(tx, deltas)?;
            // Everything is shared now, so COPIED goes: tables that carry it are copied ...
            let original = Self::table_offsets(&l1);
            let mut offsets = original.clone();
            let copies = self.settle_active_tables(tx, &mut offsets)?;
            // ... and the snapshot takes the copies too, sharing them with the active state as
            // it would have shared the originals.
            for (old, new) in original.iter().zip(&offsets) {
                if let (Some(old), Some(new)) = (*old, *new)
                    && old != new
                {
                    tx.add(new, 1).map_err(self.refcount_err())?;
                    tx.add(old, -1).map_err(self.refcount_err())?;
                }
            }
            let entries = self.with_copied_flags(tx, &offsets)?;
            snap.l1_table_offset =
                self.write_new_l1(tx, &entries, declared, "snapshot L1 table")?;
            let l1_offset = self.replace_active_l1(tx, (old_l1_offset, &l1), &entries, declared)?;
            let mut table = existing.as_ref().clone();
            table.push(snap.clone());
            let (offset, len) = self.replace_snapshot_table(tx, old_table, &table)?;
            let state = NewState {
                size,
                l1_offset,
                l1_declared: declared,
                l1_entries: entries,
                snapshot_table: SnapshotTable {
                    offset,
                    len,
                    snapshots: Arc::new(table),
                },
                copies,
            };
            Ok((state, snap))
        })
    }

    /// Makes the active state equal to snapshot `id` (QEMU's snapshot goto), resizing the disk
    /// to the snapshot's size.
    pub fn apply_snapshot(&self, id: &[u8]) -> Result<()> {
        let mut w = self.writer()?;
        let snap = self.find_snapshot(id)?;
        let sn_l1 = self.snapshot_l1(&snap)?;
        let size = self.snapshot_size(&snap);
        let old = self.active_l1();
        let old_l1_offset = w.l1_offset;
        let snapshot_table = self.current_snapshot_table(&w);
        // The active table never shrinks and must hold the whole snapshot table.
        let needed = (snap.l1_size as u64).max(self.geometry.l1_entries_for(size));
        let declared = old.declared_len().max(needed);
        // What the revert changes, for the recording bitmaps (read before the old tables go).
        let changed = self.changed_by_revert(&old, &sn_l1)?;
        let old_size = self.virtual_size();
        self.transact(&mut w, |tx| {
            let mut deltas = Deltas::new();
            self.add_paths(&mut deltas, &sn_l1, 1)?;
            self.add_paths(&mut deltas, &old, -1)?;
            self.apply_deltas(tx, deltas)?;
            self.release_range(tx, old_l1_offset, old.declared_len() * L1_ENTRY_SIZE)?;
            let mut offsets = Self::table_offsets(&sn_l1);
            offsets.truncate(declared as usize);
            let state = self.active_state(
                tx,
                (size, declared),
                &mut offsets,
                snapshot_table,
                |tx, entries| self.write_new_l1(tx, entries, declared, "active L1 table"),
            )?;
            Ok((state, ()))
        })?;
        self.bitmaps_reverted(old_size, size, &changed)
    }

    fn find_snapshot(&self, id: &[u8]) -> Result<Snapshot> {
        self.snapshots()
            .iter()
            .find(|s| s.id == id)
            .cloned()
            .ok_or_else(|| Error::Invalid {
                path: self.path.clone(),
                reason: format!("no snapshot with id {}", String::from_utf8_lossy(id)),
            })
    }

    /// Drops every reference the active state holds, so that the whole disk shows the backing
    /// file (what `qemu-img commit` does to the top afterwards): an empty L1 table switched in
    /// with the refcounts that go with it.
    pub fn empty_locked(&self, w: &mut Writer) -> Result<()> {
        let old = self.active_l1();
        let declared = old.declared_len();
        let old_l1_offset = w.l1_offset;
        let snapshot_table = self.current_snapshot_table(w);
        let size = self.virtual_size();
        self.transact(w, |tx| {
            let mut deltas = Deltas::new();
            self.add_paths(&mut deltas, &old, -1)?;
            self.apply_deltas(tx, deltas)?;
            self.release_range(tx, old_l1_offset, declared * L1_ENTRY_SIZE)?;
            let l1_offset = self.write_new_l1(tx, &[], declared, "active L1 table")?;
            let state = NewState {
                size,
                l1_offset,
                l1_declared: declared,
                l1_entries: Vec::new(),
                snapshot_table,
                copies: Vec::new(),
            };
            Ok((state, ()))
        })
    }
}

impl Qcow2Image {
    /// Points the image at another backing file (or none), rewriting the header in one write.
    /// The header is re-read from disk first so that fields changed since opening are kept.
    pub fn set_backing_locked(
        &self,
        w: &mut Writer,
        file: Option<String>,
        format: Option<String>,
    ) -> Result<()> {
        // What the new backing file must show (data copied into it or into this image) is
        // durable before the header switches to it.
        self.flush_locked(w)?;
        let cs = self.geometry.cluster_size() as usize;
        let mut start = vec![0u8; cs];
        self.storage
            .read_at(&mut start, 0)
            .map_err(|e| Error::io(format!("{}: reading the header", self.path.display()), e))?;
        let header_error = |source| Error::Header {
            path: self.path.clone(),
            source,
        };
        let mut header =
            crate::qcow2::header::Header::parse(&start, self.file_len()).map_err(header_error)?;
        let old_len = (header.backing_file_offset + header.backing_file_size as u64) as usize;
        header.set_backing(file.clone(), format.clone());
        let mut bytes = header.encode().map_err(header_error)?;
        // Clear what the old, longer layout left behind (a longer old backing name).
        if bytes.len() < old_len.min(cs) {
            bytes.resize(old_len.min(cs), 0);
        }
        // One write; atomic under a power cut while the header fits in one 512-byte sector (a
        // longer one can tear, as QEMU's header rewrite can).
        self.write_file(&bytes, 0, "header")?;
        self.sync()?;
        *self.backing.write() = (file, format);
        Ok(())
    }
}
