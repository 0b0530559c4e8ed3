//! One open qcow2 file: its header, active L1 table and snapshot table, and the read side of the
//! format (mapping guest offsets and reading data, compressed or not).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use parking_lot::{Mutex, RwLock, RwLockReadGuard};

use crate::qcow2::cache::{ByteLru, CacheKey};
use crate::qcow2::compress;
use crate::qcow2::error::{Error, MetadataError, Result};
use crate::qcow2::header::{Header, HeaderField};
use crate::qcow2::l1::L1Table;
use crate::qcow2::l2::{CompressedCluster, L2Table};
use crate::qcow2::limits::{
    MAX_BACKING_FILE_NAME, MAX_CLUSTER_BITS, MAX_L1_BYTES, MAX_SNAPSHOT_TABLE_BYTES,
    MIN_CLUSTER_BITS,
};
use crate::qcow2::mapping::{self, L2Source, Mapping};
use crate::qcow2::offsets::{Geometry, GuestOffset, HostOffset};
use crate::qcow2::recent_l2;
use crate::qcow2::snapshot::{self, Snapshot};
use crate::qcow2::storage::{FileStorage, Storage};
use crate::qcow2::write::Writer;

/// Bytes read from the start of the file for the header of an image of `cluster_bits`: cluster 0
/// plus room for the longest backing file name, which may start at its end.
fn header_read_len(cluster_bits: u32) -> u64 {
    (1 << cluster_bits) + u64::from(MAX_BACKING_FILE_NAME) + 1
}

/// The caches every image of a mount shares.
pub struct Caches {
    budget: u64,
    pub l2: ByteLru<L2Table>,
    /// Decompressed clusters, so that small reads of one compressed cluster decode it once.
    pub clusters: ByteLru<Arc<[u8]>>,
}

impl Caches {
    /// Caches within `budget` bytes in all: 7/8 for L2 tables, 1/8 for decompressed clusters.
    pub fn new(budget: u64) -> Arc<Self> {
        Arc::new(Caches {
            budget,
            l2: ByteLru::new(budget - budget / 8),
            clusters: ByteLru::new(budget / 8),
        })
    }

    /// The L2 part of the budget (refcount blocks of writable images take a share of it too).
    pub fn l2_budget(&self) -> u64 {
        self.budget - self.budget / 8
    }
}

/// How to open an image.
#[derive(Debug, Clone, Copy, Default)]
pub struct OpenOptions {
    pub writable: bool,
    /// Take QEMU's image locks (a short look such as `snapfs info` does without, like
    /// `qemu-img info -U`).
    pub lock: bool,
    /// Read-only beside a process that may write the image (`--force-share`): the locks taken
    /// are QEMU's shared ones (`force-share=on`), which keep nobody out.
    pub share: bool,
}

static NEXT_IMAGE_ID: AtomicU64 = AtomicU64::new(1);

pub struct Qcow2Image {
    pub(super) id: u64,
    pub(super) path: PathBuf,
    /// The image file: every read and write of its bytes goes through here.
    pub(super) storage: Box<dyn Storage>,
    pub(super) header: Header,
    pub(super) geometry: Geometry,
    /// The virtual size now (it changes when the disk grows).
    pub(super) size: AtomicU64,
    pub(super) active_l1: RwLock<Arc<L1Table>>,
    pub(super) snapshots: RwLock<Arc<Vec<Snapshot>>>,
    pub(super) caches: Arc<Caches>,
    /// Bumped whenever an L2 table of this image is rewritten, so that a concurrent load of the
    /// old contents is not cached over the new ones.
    pub(super) l2_generation: AtomicU64,
    /// The backing file name and format as the header says now (they change when the chain is
    /// rearranged).
    pub(super) backing: RwLock<(Option<String>, Option<String>)>,
    /// Set once the image stopped being the top of the mounted chain: writes that still reach
    /// it are refused so that they go to the new top.
    pub(super) retired: std::sync::atomic::AtomicBool,
    /// The write side, set up when the image is opened writable or when an operation across
    /// the chain first writes to it.
    pub(super) writer: OnceLock<Mutex<Writer>>,
    /// Readers of the active state hold this shared; freeing clusters takes it exclusively, so
    /// that no read still in flight can see a freed cluster reused.
    pub(super) reclaim: RwLock<()>,
    /// L2 tables changed in memory, written at the next flush (`l2_writeback.rs`).
    pub(super) unwritten_l2: super::l2_writeback::UnwrittenL2,
    /// Starts the write-back of guest data during long runs of writes.
    pub(super) write_behind: super::write_behind::WriteBehind,
    /// The persistent dirty bitmaps, loaded when first needed (`bitmaps.rs`).
    pub(super) bitmaps: OnceLock<std::result::Result<super::bitmaps::PersistentBitmaps, String>>,
}

impl std::fmt::Debug for Qcow2Image {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Qcow2Image")
            .field("path", &self.path)
            .field("size", &self.header.size)
            .finish_non_exhaustive()
    }
}

impl Qcow2Image {
    /// Opens and validates `path`. The file must start with the qcow2 magic.
    pub fn open(path: &Path, caches: Arc<Caches>, options: OpenOptions) -> Result<Self> {
        let storage = FileStorage::open(path, options.writable)
            .map_err(|e| Error::io(format!("cannot open {}", path.display()), e))?;
        Self::from_storage(path, Box::new(storage), caches, options)
    }

    /// Validates `storage` as a qcow2 image named `path` (the name is for messages and for
    /// resolving a relative backing file name); with `options.writable` the storage must be
    /// writable and the write side is set up.
    pub fn from_storage(
        path: &Path,
        storage: Box<dyn Storage>,
        caches: Arc<Caches>,
        options: OpenOptions,
    ) -> Result<Self> {
        let io = |what: &str, e| Error::io(format!("{}: {what}", path.display()), e);
        let file_len = storage
            .len()
            .map_err(|e| io("cannot get the file size", e))?;
        // Cluster 0 and a backing name at its end are all the header can use: read the cluster
        // size first rather than always the largest cluster.
        let mut bits = [0u8; 4];
        storage
            .read_at(&mut bits, HeaderField::ClusterBits.offset())
            .map_err(|e| io("cannot read the header", e))?;
        let cluster_bits = u32::from_be_bytes(bits);
        let header_len = header_read_len(match cluster_bits {
            MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS => cluster_bits,
            // Not a valid size: parsing says so, from the most a header can use.
            _ => MAX_CLUSTER_BITS,
        });
        let mut start = vec![0u8; file_len.min(header_len) as usize];
        storage
            .read_at(&mut start, 0)
            .map_err(|e| io("cannot read the header", e))?;
        let header = Header::parse(&start, file_len).map_err(|source| Error::Header {
            path: path.to_owned(),
            source,
        })?;
        let geometry = Geometry::new(header.cluster_bits, header.extended_l2());
        let size = AtomicU64::new(header.size);
        let backing = RwLock::new((header.backing_file.clone(), header.backing_format.clone()));
        let mut image = Qcow2Image {
            id: NEXT_IMAGE_ID.fetch_add(1, Ordering::Relaxed),
            path: path.to_owned(),
            storage,
            header,
            geometry,
            size,
            backing,
            active_l1: RwLock::new(Arc::new(L1Table::default())),
            snapshots: RwLock::new(Arc::new(Vec::new())),
            caches,
            l2_generation: AtomicU64::new(0),
            writer: OnceLock::new(),
            retired: false.into(),
            reclaim: RwLock::new(()),
            unwritten_l2: Default::default(),
            write_behind: Default::default(),
            bitmaps: OnceLock::new(),
        };
        let active = image
            .read_l1(
                image.header.l1_table_offset,
                image.header.l1_size as u64,
                "active L1 table",
            )
            .map_err(|e| image.metadata_error(e))?;
        *image.active_l1.get_mut() = Arc::new(active);
        *image.snapshots.get_mut() = Arc::new(image.read_snapshot_table()?);
        if options.writable {
            image.enable_writes()?;
        }
        Ok(image)
    }

    /// Sets up the write side (the storage must be writable).
    pub fn enable_writes(&self) -> Result<()> {
        if self.writer.get().is_some() {
            return Ok(());
        }
        if !self.storage.is_writable() {
            return Err(Error::ReadOnly {
                path: self.path.clone(),
            });
        }
        let writer = Writer::open(self)?;
        let _ = self.writer.set(Mutex::new(writer));
        Ok(())
    }

    /// Marks the image as no longer the top: guest writes to it fail with [`Error::Retired`].
    pub fn retire(&self) {
        self.retired.store(true, Ordering::Release);
    }

    pub fn is_writable(&self) -> bool {
        self.writer.get().is_some()
    }

    /// Held while reading the active state (see `reclaim`).
    pub fn read_guard(&self) -> Option<RwLockReadGuard<'_, ()>> {
        self.writer.get().map(|_| self.reclaim.read())
    }

    /// Reads guest bytes at `offset` as this image shows them through `l1`; `backing` supplies
    /// what unallocated ranges show.
    pub fn read_through(
        &self,
        l1: &L1Table,
        buf: &mut [u8],
        offset: u64,
        backing: &dyn Fn(&mut [u8], u64) -> Result<()>,
    ) -> Result<()> {
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let mapping = self.map(l1, pos, (buf.len() - done) as u64)?;
            let chunk = &mut buf[done..done + mapping.len() as usize];
            match mapping {
                Mapping::Data { host, .. } => self.read_data(host, chunk)?,
                Mapping::Compressed { cluster, skip, .. } => {
                    self.read_compressed(cluster, skip, chunk)?
                }
                Mapping::Zero { .. } => chunk.fill(0),
                Mapping::Unallocated { .. } => backing(chunk, pos)?,
            }
            done += chunk.len();
        }
        Ok(())
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn header(&self) -> &Header {
        &self.header
    }

    /// The caches this image uses (new images of the same mount share them).
    pub fn caches(&self) -> Arc<Caches> {
        self.caches.clone()
    }

    /// The backing file name as stored in the header (not resolved), if any.
    pub fn backing_file(&self) -> Option<String> {
        self.backing.read().0.clone()
    }

    /// The backing format the header records, if any.
    pub fn backing_format(&self) -> Option<String> {
        self.backing.read().1.clone()
    }

    pub fn geometry(&self) -> &Geometry {
        &self.geometry
    }

    pub fn virtual_size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    /// The image file's length now (a writable image grows while it is open).
    pub fn file_len(&self) -> u64 {
        self.storage.len().unwrap_or(0)
    }

    /// The image file's storage.
    pub fn storage(&self) -> &dyn Storage {
        self.storage.as_ref()
    }

    /// The internal snapshots now (the list is replaced as a whole when it changes).
    pub fn snapshots(&self) -> Arc<Vec<Snapshot>> {
        self.snapshots.read().clone()
    }

    pub fn active_l1(&self) -> Arc<L1Table> {
        self.active_l1.read().clone()
    }

    /// Reads an L1 table of `entries` entries at `offset`. Only the part inside the file is read:
    /// memory follows the file's real size, not the declared one.
    pub(super) fn read_l1(
        &self,
        offset: u64,
        entries: u64,
        what: &'static str,
    ) -> Result<L1Table, MetadataError> {
        let bytes = entries
            .checked_mul(8)
            .filter(|&b| b <= MAX_L1_BYTES)
            .ok_or(MetadataError::OffsetTooLarge {
                what,
                offset,
                len: entries.saturating_mul(8),
            })?;
        if self.geometry.in_cluster(offset) != 0 {
            return Err(MetadataError::Unaligned {
                table: what,
                index: 0,
                offset,
            });
        }
        if entries > 0 && offset == 0 {
            return Err(MetadataError::PointsAtHeader {
                table: what,
                index: 0,
                offset,
            });
        }
        let in_file = self.file_len().saturating_sub(offset).min(bytes);
        let mut buf = vec![0u8; in_file as usize];
        self.storage
            .read_at(&mut buf, offset)
            .map_err(|e| MetadataError::Read {
                what,
                offset,
                reason: e.to_string(),
            })?;
        let table = L1Table::from_be_bytes(&buf, entries);
        // Two ranges of the disk sharing one L2 table would change together on a write.
        if let Some((first, second, offset)) = table.find_shared_l2() {
            return Err(MetadataError::SharedL2 {
                table: what,
                first,
                second,
                offset,
            });
        }
        Ok(table)
    }

    /// Whether the header on disk no longer says what it said when the image was opened about
    /// the backing file, the disk size or the snapshot table: another process (a running VM's
    /// `savevm`, `delvm`, block job or resize) changed the image, and what was read from those
    /// fields is out of date. Reads the first 72 bytes. Only meaningful for an image this
    /// process does not write itself (its own changes do not update the header read at open).
    pub fn header_changed_on_disk(&self) -> Result<bool> {
        let mut now = [0u8; 72];
        self.storage.read_at(&mut now, 0).map_err(|e| {
            Error::io(
                format!("{}: cannot read the header", self.path.display()),
                e,
            )
        })?;
        let be64 = |at: usize| u64::from_be_bytes(now[at..at + 8].try_into().unwrap_or([0; 8]));
        let be32 = |at: usize| u32::from_be_bytes(now[at..at + 4].try_into().unwrap_or([0; 4]));
        let h = &self.header;
        Ok(be64(8) != h.backing_file_offset
            || be32(16) != h.backing_file_size
            || be64(24) != h.size
            || be32(60) != h.nb_snapshots
            || be64(64) != h.snapshots_offset)
    }

    fn read_snapshot_table(&self) -> Result<Vec<Snapshot>> {
        let count = self.header.nb_snapshots;
        if count == 0 {
            return Ok(Vec::new());
        }
        let offset = self.header.snapshots_offset;
        let limit = self
            .file_len()
            .saturating_sub(offset)
            .min(MAX_SNAPSHOT_TABLE_BYTES);
        // Entries are about 100 bytes: start with a generous guess and read more only if the
        // table is longer, rather than everything up to the limit (64 MiB) at every open.
        let mut want = (count as u64 * 256).max(64 << 10).min(limit);
        loop {
            let mut buf = vec![0u8; want as usize];
            self.storage.read_at(&mut buf, offset).map_err(|e| {
                Error::io(
                    format!("{}: cannot read the snapshot table", self.path.display()),
                    e,
                )
            })?;
            if want >= limit || snapshot::table_len(&buf, count).is_some() {
                return snapshot::parse_table(&buf, count).map_err(|e| self.metadata_error(e));
            }
            want = (want * 4).min(limit);
        }
    }

    /// Loads the L1 table of an internal snapshot, checking it as QEMU does before using it.
    pub fn snapshot_l1(&self, snap: &Snapshot) -> Result<L1Table> {
        let err = |reason: String| {
            self.metadata_error(MetadataError::SnapshotL1 {
                id: snap.id_str(),
                reason,
            })
        };
        let size = snap.disk_size.unwrap_or(self.header.size);
        let needed = self.geometry.l1_entries_for(size);
        if (snap.l1_size as u64) < needed {
            return Err(err(format!(
                "l1_size {} is too small for a disk of {size} bytes (needs {needed})",
                snap.l1_size
            )));
        }
        self.read_l1(
            snap.l1_table_offset,
            snap.l1_size as u64,
            "snapshot L1 table",
        )
        .map_err(|e| err(e.to_string()))
    }

    /// The disk size an internal snapshot had.
    pub fn snapshot_size(&self, snap: &Snapshot) -> u64 {
        snap.disk_size.unwrap_or(self.header.size)
    }

    pub(crate) fn metadata_error(&self, source: MetadataError) -> Error {
        Error::Metadata {
            path: self.path.clone(),
            source,
        }
    }

    /// Maps the guest range at `guest` (at most `max_len` bytes) through `l1`.
    pub fn map(&self, l1: &L1Table, guest: u64, max_len: u64) -> Result<Mapping> {
        mapping::map_range(self, &self.geometry, l1, GuestOffset(guest), max_len)
    }

    /// Reads uncompressed data at `host`.
    pub fn read_data(&self, host: HostOffset, buf: &mut [u8]) -> Result<()> {
        self.storage.read_at(buf, host.0).map_err(|e| {
            Error::io(
                format!(
                    "{}: reading {} bytes at {host}",
                    self.path.display(),
                    buf.len()
                ),
                e,
            )
        })
    }

    /// Copies `buf.len()` bytes starting `skip` bytes into the decompressed `cluster`.
    pub fn read_compressed(
        &self,
        cluster: CompressedCluster,
        skip: u64,
        buf: &mut [u8],
    ) -> Result<()> {
        let data = self.decompressed(cluster)?;
        let start = skip as usize;
        let src = data.get(start..start + buf.len()).ok_or_else(|| {
            self.metadata_error(MetadataError::Compressed {
                offset: cluster.host.0,
                len: cluster.len,
                reason: format!("read of {} bytes at {skip} exceeds the cluster", buf.len()),
            })
        })?;
        buf.copy_from_slice(src);
        Ok(())
    }

    fn decompressed(&self, cluster: CompressedCluster) -> Result<Arc<[u8]>> {
        let key = CacheKey {
            image: self.id,
            offset: cluster.host.0,
        };
        let cluster_size = self.geometry.cluster_size();
        self.caches.clusters.get_or_load(key, || {
            let bad = |reason: String| {
                self.metadata_error(MetadataError::Compressed {
                    offset: cluster.host.0,
                    len: cluster.len,
                    reason,
                })
            };
            let file_len = self.file_len();
            if cluster.host.0 >= file_len {
                return Err(bad(format!(
                    "data starts past the end of the file ({file_len} bytes)"
                )));
            }
            let mut input = vec![0u8; cluster.len as usize];
            self.read_data(cluster.host, &mut input)?;
            let mut out = vec![0u8; cluster_size as usize];
            compress::decompress(self.header.compression_type, &input, &mut out).map_err(bad)?;
            Ok((Arc::from(out), cluster_size))
        })
    }

    fn load_l2(&self, offset: HostOffset) -> Result<L2Table> {
        // A changed table the cache let go of before it was written: the file holds it stale.
        if let Some(table) = self.unwritten_l2.get(offset) {
            return Ok(table);
        }
        let size = self.geometry.cluster_size() as usize;
        let mut bytes = vec![0u8; size];
        self.read_data(offset, &mut bytes)?;
        let words: Vec<u64> = bytes
            .chunks_exact(8)
            .map(|c| u64::from_be_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
            .collect();
        Ok(Arc::from(words))
    }
}

impl Qcow2Image {
    fn check_l2_offset(&self, l1_index: u64, offset: HostOffset) -> Result<()> {
        if offset.0 < self.geometry.cluster_size() {
            return Err(self.metadata_error(MetadataError::PointsAtHeader {
                table: "L1",
                index: l1_index,
                offset: offset.0,
            }));
        }
        Ok(())
    }

    /// The table through the shared cache, loaded on a miss; `generation` is the image's L2
    /// generation read before the lookup.
    fn shared_l2_table(&self, offset: HostOffset, generation: u64) -> Result<L2Table> {
        let key = CacheKey {
            image: self.id,
            offset: offset.0,
        };
        let cost = self.geometry.cluster_size();
        self.caches.l2.get_or_load_checked(
            key,
            || self.load_l2(offset).map(|t| (t, cost)),
            || self.l2_generation.load(Ordering::Acquire) == generation,
        )
    }
}

impl L2Source for Qcow2Image {
    fn l2_table(&self, l1_index: u64, offset: HostOffset) -> Result<L2Table> {
        self.check_l2_offset(l1_index, offset)?;
        let generation = self.l2_generation.load(Ordering::Acquire);
        self.shared_l2_table(offset, generation)
    }

    fn with_l2_table<R>(
        &self,
        l1_index: u64,
        offset: HostOffset,
        f: impl FnOnce(&[u64]) -> R,
    ) -> Result<R> {
        self.check_l2_offset(l1_index, offset)?;
        let generation = self.l2_generation.load(Ordering::Acquire);
        let f = match recent_l2::with(self.id, offset.0, generation, f) {
            Ok(result) => return Ok(result),
            Err(f) => f,
        };
        let table = self.shared_l2_table(offset, generation)?;
        recent_l2::remember(
            self.id,
            offset.0,
            generation,
            &table,
            self.caches.l2_budget() / 8,
        );
        Ok(f(&table))
    }

    fn metadata_error(&self, error: MetadataError) -> Error {
        Qcow2Image::metadata_error(self, error)
    }
}
