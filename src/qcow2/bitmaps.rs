//! Persistent dirty bitmaps of an open image, maintained as QEMU maintains them (docs/bitmaps.md).
//!
//! - Loading (QEMU's `qcow2_load_dirty_bitmaps`): a writable image loads every bitmap when its
//!   write side is set up; a read-only one when its checkpoints are first asked for. A directory
//!   QEMU would refuse makes the image read-only, naming the field.
//! - Before the first change (QEMU does it at a read-write open; snapfs at the first change, so
//!   that a mount nobody writes to leaves the file as it was): `in_use` on every recording bitmap,
//!   the directory rewritten in place between a clear and a set of autoclear bit 0 (QEMU's
//!   `update_ext_header_and_dir_in_place`), and the autoclear bits snapfs does not know cleared.
//! - Every change marks the recording (`auto`) bitmaps: writes, discards, zero writes, a revert
//!   (the clusters whose mapping differs), a resize (the grown part).
//! - At a clean close (QEMU's `qcow2_store_persistent_dirty_bitmaps`): each recording bitmap
//!   goes to new data clusters and a new table, then a new directory; a flush; the header
//!   extension switches to the new directory; only then are the old directory, tables and data
//!   freed. A kill at any point leaves `in_use` set (inconsistent, as QEMU reads it) or the whole
//!   new state; at worst clusters leak.
//!
//! Disabled bitmaps keep their data, table and flags (a resize aside: they follow the disk's
//! size and are stored again, as QEMU stores every loaded bitmap). Bitmaps already `in_use` and
//! bitmaps that break a rule are never loaded nor made consistent.

use std::sync::Arc;

use parking_lot::{Mutex, RwLock};

use crate::qcow2::bitmap::{
    BitmapError, Directory, DirtyBitmap, Flags, ImageLayout, Role, StoredChunk, TableEntry,
    encode_table, extension_data, load_bitmap, read_table, stored_chunks,
};
use crate::qcow2::error::{Error, Result};
use crate::qcow2::header::{BitmapsExtension, FieldWrite, Header, HeaderExtension, autoclear, ext};
use crate::qcow2::image::Qcow2Image;
use crate::qcow2::l1::L1Table;
use crate::qcow2::l2::L2Entry;
use crate::qcow2::mapping::L2Source;
use crate::qcow2::offsets::HostOffset;
use crate::qcow2::write::Writer;

/// The bitmaps of one image and what snapfs does with each.
pub struct PersistentBitmaps {
    /// The recording bitmaps, which every change marks (bitmaps added by a chain operation join
    /// them).
    pub(super) recording: RwLock<Vec<Arc<RwLock<DirtyBitmap>>>>,
    pub(super) state: Mutex<State>,
}

/// The bitmaps as the file holds them now.
pub(super) struct State {
    /// The header extension in the file (`None`: the image has no bitmaps yet).
    pub(super) extension: Option<BitmapsExtension>,
    pub(super) directory: Directory,
    /// One per directory entry, in the same order.
    pub(super) tracked: Vec<Tracked>,
    /// The autoclear field as the file holds it now.
    pub(super) autoclear: u64,
    /// A bitmap was added or merged into since the bitmaps were last stored.
    pub(super) changed: bool,
}

impl State {
    /// The byte ranges the bitmaps occupy in the file, for the overlap index: the directory,
    /// every bitmap table, and the data clusters of the tables snapfs loaded (those of a bitmap
    /// it could not load are not known; QEMU's own check covers the directory alone).
    pub(super) fn stored_ranges(&self, cluster_size: u64) -> Vec<(u64, u64)> {
        let mut ranges = Vec::new();
        if let Some(extension) = &self.extension {
            ranges.push((extension.directory_offset, extension.directory_size));
        }
        for entry in self
            .directory
            .entries
            .iter()
            .filter(|e| e.table_offset != 0)
        {
            let len = u64::from(entry.table_size) * 8;
            ranges.push((entry.table_offset, len));
        }
        for t in &self.tracked {
            for e in &t.table {
                if let TableEntry::Data(at) = e {
                    ranges.push((at.0, cluster_size));
                }
            }
        }
        ranges
    }
}

pub(super) struct Tracked {
    pub(super) role: Role,
    pub(super) flags_at_open: Flags,
    /// The bitmap table in the file (loaded bitmaps only), freed once a new one replaces it.
    pub(super) table: Vec<TableEntry>,
    pub(super) bitmap: Option<Arc<RwLock<DirtyBitmap>>>,
    /// A disabled bitmap that changed (a resize, a merge) and must be stored again.
    pub(super) modified: bool,
}

/// One bitmap as a checkpoint: usable (its dirty bitmap) or why not.
pub struct Checkpoint {
    pub name: String,
    pub granularity: u64,
    /// Recording (`auto`) or disabled.
    pub recording: bool,
    pub bitmap: std::result::Result<Arc<RwLock<DirtyBitmap>>, String>,
}

impl PersistentBitmaps {
    /// Reads the directory and loads every loadable bitmap of `image` (none: an empty set).
    fn load(image: &Qcow2Image) -> std::result::Result<PersistentBitmaps, BitmapError> {
        let header = &image.header;
        let Some(extension) = header.bitmaps else {
            return Ok(PersistentBitmaps {
                recording: RwLock::new(Vec::new()),
                state: Mutex::new(State {
                    extension: None,
                    directory: Directory::default(),
                    tracked: Vec::new(),
                    autoclear: header.autoclear_features,
                    changed: false,
                }),
            });
        };
        let layout = ImageLayout::of(header, image.file_len());
        let directory = Directory::read(&image.storage(), &extension, &layout)?;
        let mut tracked = Vec::with_capacity(directory.entries.len());
        let mut recording = Vec::new();
        for entry in &directory.entries {
            let role = Role::of(entry, &layout);
            let (table, bitmap) = if role.loadable() {
                let table = read_table(&image.storage(), entry, &layout)?;
                let bitmap = Arc::new(RwLock::new(load_bitmap(&image.storage(), entry, &layout)?));
                if role == Role::Recording {
                    recording.push(bitmap.clone());
                }
                (table, Some(bitmap))
            } else {
                (Vec::new(), None)
            };
            tracked.push(Tracked {
                role,
                flags_at_open: entry.flags,
                table,
                bitmap,
                modified: false,
            });
        }
        Ok(PersistentBitmaps {
            recording: RwLock::new(recording),
            state: Mutex::new(State {
                extension: Some(extension),
                directory,
                tracked,
                autoclear: header.autoclear_features,
                changed: false,
            }),
        })
    }
}

impl Qcow2Image {
    /// The image's persistent bitmaps, loaded at the first call.
    pub fn persistent_bitmaps(&self) -> Result<&PersistentBitmaps> {
        let loaded = self.bitmaps.get_or_init(|| {
            PersistentBitmaps::load(self).map_err(|e| format!("persistent bitmaps: {e}"))
        });
        match loaded {
            Ok(b) => Ok(b),
            Err(reason) => Err(Error::Invalid {
                path: self.path.clone(),
                reason: reason.clone(),
            }),
        }
    }

    /// Loads the bitmaps for writing: an image whose bitmaps QEMU would refuse to open is
    /// mounted read-only (QEMU refuses it altogether).
    pub(super) fn load_bitmaps_for_writing(&self) -> Result<()> {
        match self.persistent_bitmaps() {
            Ok(_) => Ok(()),
            Err(Error::Invalid { path, reason }) => Err(Error::NeedsReadOnly {
                path,
                reason: format!("{reason}; mounting read-only"),
            }),
            Err(e) => Err(e),
        }
    }

    /// The bitmaps as checkpoints, in directory order.
    pub fn checkpoints(&self) -> Result<Vec<Checkpoint>> {
        let bitmaps = self.persistent_bitmaps()?;
        let state = bitmaps.state.lock();
        Ok(state
            .directory
            .entries
            .iter()
            .zip(&state.tracked)
            .map(|(entry, t)| Checkpoint {
                name: entry.name_lossy(),
                granularity: entry.granularity(),
                recording: t.role == Role::Recording,
                bitmap: match (&t.role, &t.bitmap) {
                    (_, Some(b)) => Ok(b.clone()),
                    (Role::Inconsistent, _) => Err(
                        "in_use: it was not saved correctly (a program was killed, or QEMU has the image open) and may be inconsistent".to_string(),
                    ),
                    (Role::Unusable(problem), _) => Err(problem.to_string()),
                    _ => Err("not loaded".to_string()),
                },
            })
            .collect())
    }

    /// Everything snapfs does before the first change of a writer: `in_use` on the bitmaps it
    /// maintains, and the autoclear bits it does not know cleared (at once, durably, before the
    /// change they guard).
    pub(super) fn prepare_first_change(&self, w: &mut Writer) -> Result<()> {
        let b = self.persistent_bitmaps()?;
        let mut state = b.state.lock();
        let unknown = state.autoclear & !autoclear::KNOWN;
        let kept = state.autoclear & autoclear::KNOWN;
        let mut directory = state.directory.clone();
        for (entry, t) in directory.entries.iter_mut().zip(&state.tracked) {
            entry.flags = t.role.flags_at_first_change(entry.flags);
        }
        match state.extension {
            // Flags change in place only: the directory keeps its length.
            Some(extension)
                if directory != state.directory
                    && directory.encoded_len() == extension.directory_size =>
            {
                let bytes = self.encode_directory(&directory)?;
                // QEMU's order: autoclear bit 0 off (the directory is not to be trusted while
                // it is rewritten), the directory in place, the bit back on; flushed between.
                self.write_autoclear(kept & !autoclear::BITMAPS)?;
                self.write_file(&bytes, extension.directory_offset, "bitmap directory")?;
                self.sync()?;
                self.write_autoclear(kept)?;
                state.directory = directory;
            }
            _ if unknown != 0 => self.write_autoclear(kept)?,
            _ => {}
        }
        if unknown != 0 {
            log::info!(
                "{}: cleared autoclear features {unknown:#x} (not maintained by snapfs)",
                self.path.display()
            );
        }
        state.autoclear = kept;
        w.before_first_change = false;
        Ok(())
    }

    pub(super) fn bitmap_err(&self, source: BitmapError) -> Error {
        Error::Bitmap {
            path: self.path.clone(),
            source,
        }
    }

    /// Writes the autoclear field and makes it durable before anything that depends on it.
    fn write_autoclear(&self, value: u64) -> Result<()> {
        self.write_header(
            FieldWrite::AutoclearFeatures(value),
            "header autoclear features",
        )?;
        self.sync()
    }

    fn encode_directory(&self, directory: &Directory) -> Result<Vec<u8>> {
        directory.encode().map_err(|source| self.bitmap_err(source))
    }

    /// Marks a change that a chain operation makes to what the guest reads (a revert to a layer),
    /// for a caller that holds the writer.
    pub fn mark_changed_locked(&self, _w: &mut Writer, offset: u64, len: u64) {
        self.mark_changed(offset, len);
    }

    /// Marks `len` bytes at guest `offset` in every recording bitmap.
    pub(super) fn mark_changed(&self, offset: u64, len: u64) {
        if let Some(Ok(b)) = self.bitmaps.get() {
            for bitmap in b.recording.read().iter() {
                bitmap.write().set_range(offset, len);
            }
        }
    }

    /// Follows a change of the disk's size: every loaded bitmap takes the new size; the recording
    /// ones mark the grown part (it changed from "no disk" to zeros).
    pub(super) fn bitmaps_resized(&self, old_size: u64, new_size: u64) -> Result<()> {
        let b = self.persistent_bitmaps()?;
        let mut state = b.state.lock();
        for t in &mut state.tracked {
            if let Some(bitmap) = &t.bitmap {
                let mut bitmap = bitmap.write();
                bitmap
                    .resize(new_size)
                    .map_err(|source| self.bitmap_err(source))?;
                if t.role == Role::Recording && new_size > old_size {
                    bitmap.set_range(old_size, new_size - old_size);
                }
                t.modified |= t.role == Role::Disabled;
            }
        }
        Ok(())
    }

    /// What a revert from `active` to `snapshot` changes, when a bitmap records it.
    pub(super) fn changed_by_revert(
        &self,
        active: &L1Table,
        snapshot: &L1Table,
    ) -> Result<Vec<(u64, u64)>> {
        match self.bitmaps.get() {
            Some(Ok(b)) if !b.recording.read().is_empty() => self.changed_between(active, snapshot),
            _ => Ok(Vec::new()),
        }
    }

    /// Marks what a revert changed: the size first, then the clusters whose mapping changed.
    pub(super) fn bitmaps_reverted(
        &self,
        old_size: u64,
        new_size: u64,
        changed: &[(u64, u64)],
    ) -> Result<()> {
        if old_size != new_size {
            self.bitmaps_resized(old_size, new_size)?;
        }
        for &(offset, len) in changed {
            self.mark_changed(offset, len);
        }
        Ok(())
    }

    /// The guest ranges where the disk mapped by `a` and by `b` may differ: every cluster whose
    /// L2 entry differs (COPIED aside), every cluster of an L2 table that one side lacks and the
    /// other maps. Read from metadata only.
    fn changed_between(&self, a: &L1Table, b: &L1Table) -> Result<Vec<(u64, u64)>> {
        let g = self.geometry;
        let coverage = g.l2_coverage();
        let cs = g.cluster_size();
        let count = a.len_present().max(b.len_present()) as u64;
        let mut ranges: Vec<(u64, u64)> = Vec::new();
        let table = |l1: &L1Table, index: u64| -> Result<Option<Vec<u64>>> {
            match l1.l2_offset(index) {
                None => Ok(None),
                Some(offset) => Ok(Some(self.l2_table(index, offset)?.to_vec())),
            }
        };
        let entries_per_table = (coverage / cs) as usize;
        for index in 0..count {
            let (ea, eb) = (a.entry(index), b.entry(index));
            if ea.l2_offset() == eb.l2_offset() {
                continue;
            }
            let (ta, tb) = (table(a, index)?, table(b, index)?);
            let entry = |t: &Option<Vec<u64>>, i: usize| {
                t.as_ref().map_or(L2Entry::UNALLOCATED, |t| {
                    L2Entry::read(t, i, &g).with_copied(false)
                })
            };
            for i in 0..entries_per_table {
                if entry(&ta, i) != entry(&tb, i) {
                    let start = index * coverage + i as u64 * cs;
                    match ranges.last_mut() {
                        Some((s, l)) if *s + *l == start => *l += cs,
                        _ => ranges.push((start, cs)),
                    }
                }
            }
        }
        Ok(ranges)
    }

    /// Stores every bitmap that changed and clears `in_use` on those snapfs maintains (QEMU's
    /// `qcow2_store_persistent_dirty_bitmaps`), at a clean close. Nothing is written when the
    /// image was not changed since the bitmaps were last stored.
    pub fn store_bitmaps(&self) -> Result<()> {
        let Some(writer) = self.writer.get() else {
            return Ok(());
        };
        let mut w = writer.lock();
        self.store_bitmaps_locked(&mut w)
    }

    /// [`Qcow2Image::store_bitmaps`] for a caller that holds the writer.
    pub fn store_bitmaps_locked(&self, w: &mut Writer) -> Result<()> {
        let Some(Ok(b)) = self.bitmaps.get() else {
            return Ok(());
        };
        let mut state = b.state.lock();
        let modified = state.tracked.iter().any(|t| t.modified);
        if state.directory.entries.is_empty()
            || (w.before_first_change && !modified && !state.changed)
        {
            return Ok(());
        }
        let g = self.geometry;
        let cs = g.cluster_size();
        let refcount_err = self.refcount_err();
        let invalid = |e: BitmapError| self.bitmap_err(e);
        let mut directory = state.directory.clone();
        let mut old_tables = Vec::new();
        let mut new_tables = Vec::new();
        for (index, (entry, t)) in directory.entries.iter_mut().zip(&state.tracked).enumerate() {
            entry.flags = t.role.flags_at_clean_close(t.flags_at_open);
            let store = match t.role {
                Role::Recording => true,
                Role::Disabled => t.modified,
                Role::Inconsistent | Role::Unusable(_) => false,
            };
            let Some(bitmap) = t.bitmap.as_ref().filter(|_| store) else {
                continue;
            };
            let bitmap = bitmap.read();
            let chunks = stored_chunks(&bitmap, g.cluster_bits).map_err(invalid)?;
            let mut table = Vec::with_capacity(chunks.len());
            for chunk in chunks {
                table.push(match chunk {
                    StoredChunk::Zeros => TableEntry::Zeros,
                    StoredChunk::Data(bytes) => {
                        let at = w
                            .refcounts
                            .allocate(self.storage(), 1)
                            .map_err(&refcount_err)?;
                        let mut cluster = bytes.to_vec();
                        cluster.resize(cs as usize, 0);
                        self.check_overlap(w, "bitmap data", at.0, cs)?;
                        self.write_file(&cluster, at.0, "bitmap data")?;
                        TableEntry::Data(at)
                    }
                });
            }
            let mut bytes = encode_table(&table);
            let clusters = (bytes.len() as u64).div_ceil(cs);
            bytes.resize((clusters * cs) as usize, 0);
            let at = w
                .refcounts
                .allocate(self.storage(), clusters)
                .map_err(&refcount_err)?;
            self.check_overlap(w, "bitmap table", at.0, bytes.len() as u64)?;
            self.write_file(&bytes, at.0, "bitmap table")?;
            if entry.table_offset != 0 {
                old_tables.push((entry.table_offset, entry.table_size, t.table.clone()));
            }
            entry.table_offset = at.0;
            entry.table_size = table.len() as u32;
            new_tables.push((index, table));
        }
        let mut bytes = self.encode_directory(&directory)?;
        let dir_clusters = (bytes.len() as u64).div_ceil(cs);
        bytes.resize((dir_clusters * cs) as usize, 0);
        let dir_at = w
            .refcounts
            .allocate(self.storage(), dir_clusters)
            .map_err(&refcount_err)?;
        self.check_overlap(w, "bitmap directory", dir_at.0, bytes.len() as u64)?;
        self.write_file(&bytes, dir_at.0, "bitmap directory")?;
        // Data, tables and directory durable before the header points at them.
        self.sync()?;
        let extension = directory.extension_at(dir_at.0);
        self.write_bitmaps_extension(&extension, state.autoclear)?;
        state.autoclear |= autoclear::BITMAPS;
        // Only now is the old state unreferenced.
        if let Some(old) = state.extension {
            w.refcounts
                .free(
                    self.storage(),
                    HostOffset(old.directory_offset),
                    old.directory_size.div_ceil(cs),
                )
                .map_err(&refcount_err)?;
        }
        for (offset, size, table) in old_tables {
            for e in table {
                if let TableEntry::Data(data) = e {
                    w.refcounts
                        .free(self.storage(), data, 1)
                        .map_err(&refcount_err)?;
                }
            }
            w.refcounts
                .free(
                    self.storage(),
                    HostOffset(offset),
                    (u64::from(size) * 8).div_ceil(cs),
                )
                .map_err(&refcount_err)?;
        }
        self.sync()?;
        state.extension = Some(extension);
        state.directory = directory;
        state.changed = false;
        for (index, table) in new_tables {
            state.tracked[index].table = table;
            state.tracked[index].modified = false;
        }
        w.reindex_bitmaps(&state.stored_ranges(cs), &g);
        // The next change sets in_use again.
        w.before_first_change = true;
        log::info!(
            "{}: stored {} persistent bitmap(s)",
            self.path.display(),
            state.tracked.len()
        );
        Ok(())
    }

    /// Points the header at the bitmap directory `extension` describes and sets autoclear bit 0
    /// (QEMU's `update_ext_header_and_dir`): the header is read back, the extension replaced or
    /// added, and the header rewritten in one write, then flushed. Rewritten whole because the
    /// extension area moves when another extension changes (a backing format added or removed).
    fn write_bitmaps_extension(
        &self,
        extension: &BitmapsExtension,
        autoclear_now: u64,
    ) -> Result<()> {
        let cs = self.geometry.cluster_size() as usize;
        let mut start = vec![0u8; cs];
        self.storage
            .read_at(&mut start, 0)
            .map_err(|e| Error::io(format!("{}: reading the header", self.path.display()), e))?;
        let header_error = |source| Error::Header {
            path: self.path.clone(),
            source,
        };
        let mut header = Header::parse(&start, self.file_len()).map_err(header_error)?;
        let old_len = header.encode().map_err(header_error)?.len();
        header.extensions.retain(|e| e.magic != ext::BITMAPS);
        header.extensions.push(HeaderExtension {
            magic: ext::BITMAPS,
            data: extension_data(extension).to_vec(),
        });
        header.bitmaps = Some(*extension);
        header.autoclear_features = autoclear_now | autoclear::BITMAPS;
        header.sync_layout();
        let mut bytes = header.encode().map_err(header_error)?;
        // Clear what a longer old layout left behind.
        if bytes.len() < old_len {
            bytes.resize(old_len, 0);
        }
        self.write_file(&bytes, 0, "header with the bitmaps extension")?;
        self.sync()
    }
}
