//! The engine tier's fixtures: images laid out in memory ([`MemoryStorage`]) in every format
//! variant, opened as a chain (over an optional raw backing layer, also in memory) and read
//! through the views the mount serves; and an independent check of an image's bytes (the
//! refcounts recomputed from the tables, as `qemu-img check` does, and the COPIED flags).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use snapfs::chain::{Chain, Layer, RawImage};
use snapfs::qcow2::create::{NewImage, Variant, layout};
use snapfs::qcow2::header::Header;
use snapfs::qcow2::refcount::read_entry;
use snapfs::qcow2::snapshot::{Snapshot, parse_table, table_len};
use snapfs::qcow2::storage::{MemoryStorage, Storage};
use snapfs::qcow2::{Caches, OpenOptions, Qcow2Image};
use snapfs::view::{Extent, StartTable, View};

/// One image format: cluster size, L2 entry kind, version, refcount width.
#[derive(Debug, Clone, Copy)]
pub struct Shape {
    pub cluster_bits: u32,
    pub variant: Variant,
    /// Virtual size of the disk.
    pub size: u64,
}

impl Shape {
    const fn new(cluster_bits: u32, version: u32, extended_l2: bool, refcount_order: u32) -> Self {
        let cluster = 1u64 << cluster_bits;
        // Small clusters: many L2 tables; large ones: a few clusters, and no more bytes than a
        // debug build reads quickly after every step.
        let size = if cluster >= 1 << 20 {
            cluster * 2
        } else if cluster * 24 > (1 << 20) {
            cluster * 4
        } else {
            1 << 20
        };
        Shape {
            cluster_bits,
            variant: Variant {
                version,
                extended_l2,
                refcount_order,
            },
            size,
        }
    }

    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// How many of `cases` to run on this shape: a sixth on the largest clusters, whose
    /// every allocation moves megabytes (slow in a debug build) and whose few clusters give
    /// fewer different cases anyway.
    pub fn cases(&self, cases: u32) -> u32 {
        if self.cluster_bits >= 20 {
            (cases / 6).max(2)
        } else {
            cases
        }
    }
}

/// The geometries every property runs on: the smallest and largest clusters, QEMU's default,
/// version 2 (no zero clusters), extended L2 entries (subclusters), and refcount widths other
/// than 16 bits.
pub const SHAPES: [Shape; 8] = [
    Shape::new(9, 3, false, 4),
    Shape::new(9, 2, false, 4),
    Shape::new(12, 3, false, 3),
    Shape::new(16, 3, false, 4),
    Shape::new(16, 2, false, 4),
    Shape::new(14, 3, true, 4),
    Shape::new(16, 3, true, 6),
    Shape::new(21, 3, false, 4),
];

/// A chain in memory: a qcow2 top, writable, over an optional raw base, with handles on the
/// bytes of both.
pub struct MemChain {
    pub chain: Arc<Chain>,
    pub top: Arc<MemoryStorage>,
    pub shape: Shape,
    pub base: Option<Vec<u8>>,
}

const TOP: &str = "/engine/top.qcow2";
const BASE: &str = "/engine/base.raw";

/// Opens the image held in `top` (writable, no locks) over `base`.
fn open(top: Arc<MemoryStorage>, base: Option<&[u8]>) -> Result<Arc<Chain>, String> {
    let image = Qcow2Image::from_storage(
        Path::new(TOP),
        Box::new(top),
        Caches::new(8 << 20),
        OpenOptions {
            writable: true,
            lock: false,
            share: false,
        },
    )
    .map_err(|e| format!("open: {e}"))?;
    let mut layers = vec![Arc::new(Layer::Qcow2(Box::new(image)))];
    if let Some(base) = base {
        let storage = MemoryStorage::read_only(base.to_vec());
        layers.push(Arc::new(Layer::Raw(RawImage::new(
            PathBuf::from(BASE),
            Box::new(storage),
            base.len() as u64,
        ))));
    }
    Ok(Arc::new(Chain::from_layers(layers)))
}

impl MemChain {
    /// A new empty image of `shape`, over a raw base holding `base` if given (its length is the
    /// disk's).
    pub fn new(shape: Shape, base: Option<Vec<u8>>) -> Self {
        let new = NewImage {
            size: shape.size,
            cluster_bits: shape.cluster_bits,
            backing_file: base.as_ref().map(|_| "base.raw".to_string()),
            backing_format: base.as_ref().map(|_| "raw".to_string()),
        };
        let bytes = layout(Path::new(TOP), &new, shape.variant).expect("laying out the image");
        let top = Arc::new(MemoryStorage::new(bytes));
        let chain = open(top.clone(), base.as_deref()).expect("opening a new image");
        MemChain {
            chain,
            top,
            shape,
            base,
        }
    }

    pub fn image(&self) -> &Qcow2Image {
        self.chain.top_image()
    }

    /// The live disk.
    pub fn live(&self) -> View {
        View::new(self.chain.clone(), 0, StartTable::Active, 0)
    }

    /// The view of an internal snapshot.
    pub fn snapshot_view(&self, snap: &Snapshot) -> Result<View, String> {
        let image = self.image();
        let l1 = image
            .snapshot_l1(snap)
            .map_err(|e| format!("snapshot {}: {e}", snap.id_str()))?;
        Ok(View::new(
            self.chain.clone(),
            0,
            StartTable::Snapshot(Arc::new(l1)),
            image.snapshot_size(snap),
        ))
    }

    /// The internal snapshots by name.
    pub fn snapshots(&self) -> BTreeMap<String, Snapshot> {
        self.image()
            .snapshots()
            .iter()
            .map(|s| (s.name_str().unwrap_or_default().to_string(), s.clone()))
            .collect()
    }

    /// Flushes, then checks the bytes of the image as they are now (see [`check_image`]).
    pub fn flush_and_check(&self) -> Result<(), String> {
        self.image().flush().map_err(|e| format!("flush: {e}"))?;
        check_image(self.top.as_ref())
    }

    /// The same image opened afresh from its bytes, as the next mount would find it.
    pub fn reopen(&self) -> Result<MemChain, String> {
        let top = Arc::new(MemoryStorage::new(self.top.contents()));
        Ok(MemChain {
            chain: open(top.clone(), self.base.as_deref())?,
            top,
            shape: self.shape,
            base: self.base.clone(),
        })
    }
}

/// Checks that `view` reads `want`, byte for byte, and that its map of data and holes agrees
/// with it: no byte that is not zero lies in a hole, `SEEK_DATA` lands on the first data
/// extent, and the allocated size (`st_blocks`) is the sum of the data extents.
pub fn check_view(what: &str, view: &View, want: &[u8]) -> Result<(), String> {
    if view.size() != want.len() as u64 {
        return Err(format!(
            "{what}: size {} where the model has {}",
            view.size(),
            want.len()
        ));
    }
    let mut got = vec![0u8; want.len()];
    view.read_at(&mut got, 0)
        .map_err(|e| format!("{what}: read: {e}"))?;
    // Compared slice against slice (memcmp), and byte by byte only to name the first difference:
    // a debug build iterates slowly.
    if got != want {
        let at = got.iter().zip(want).position(|(g, w)| g != w).unwrap_or(0);
        return Err(format!(
            "{what}: byte {at:#x} reads {:#04x}, the model has {:#04x}",
            got[at], want[at]
        ));
    }
    let mut pos = 0u64;
    let mut data = 0u64;
    let mut first_data = None;
    while pos < want.len() as u64 {
        let (extent, len) = view
            .extent_at(pos, want.len() as u64 - pos)
            .map_err(|e| format!("{what}: extent at {pos:#x}: {e}"))?;
        if len == 0 {
            return Err(format!("{what}: an empty extent at {pos:#x}"));
        }
        let end = (pos + len).min(want.len() as u64);
        match extent {
            Extent::Data => {
                data += end - pos;
                first_data.get_or_insert(pos);
            }
            Extent::Hole => {
                let part = &want[pos as usize..end as usize];
                if !is_zero(part) {
                    let at = part.iter().position(|&b| b != 0).unwrap_or(0);
                    return Err(format!(
                        "{what}: byte {:#x} holds data but lies in a hole [{pos:#x}, {end:#x})",
                        pos + at as u64
                    ));
                }
            }
        }
        pos = end;
    }
    let seek = view
        .seek_data(0)
        .map_err(|e| format!("{what}: SEEK_DATA: {e}"))?;
    if seek != first_data {
        return Err(format!(
            "{what}: SEEK_DATA from 0 gives {seek:?}, the extents {first_data:?}"
        ));
    }
    let allocated = view
        .allocated_bytes()
        .map_err(|e| format!("{what}: allocated bytes: {e}"))?;
    if allocated != data {
        return Err(format!(
            "{what}: {allocated} bytes allocated (st_blocks), the extents hold {data}"
        ));
    }
    Ok(())
}

/// Whether `bytes` are all zeros (compared a page at a time, as memcmp).
fn is_zero(bytes: &[u8]) -> bool {
    const PAGE: [u8; 4096] = [0; 4096];
    bytes.chunks(PAGE.len()).all(|c| c == &PAGE[..c.len()])
}

const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
const COPIED: u64 = 1 << 63;
const COMPRESSED: u64 = 1 << 62;

/// `len` bytes of `storage` at `offset` (past its end: zeros, as QEMU reads it).
fn read(storage: &dyn Storage, offset: u64, len: u64) -> Result<Vec<u8>, String> {
    let mut buf = vec![0u8; len as usize];
    storage
        .read_at(&mut buf, offset)
        .map_err(|e| format!("read {len} bytes at {offset:#x}: {e}"))?;
    Ok(buf)
}

fn be64(bytes: &[u8], at: u64) -> u64 {
    let at = at as usize;
    u64::from_be_bytes(bytes[at..at + 8].try_into().expect("8 bytes"))
}

/// The image's bytes checked as `qemu-img check` would, without QEMU: every reference the
/// tables hold (header, refcount table and blocks, active and snapshot L1 tables, each L2 table
/// once, the clusters their entries map, the snapshot table) counted from the bytes, and the
/// result compared with the stored refcount of every cluster (a difference either way is an
/// error: a leak after a flush is one too); no reference past the end of the file; COPIED set
/// on an active L1 or L2 entry exactly when its cluster's refcount is 1; entries valid for the
/// format (no zero flag in version 2 or with extended L2, no subcluster both allocated and
/// zero, none allocated without a host cluster).
pub fn check_image(storage: &dyn Storage) -> Result<(), String> {
    let file_len = storage.len().map_err(|e| format!("length: {e}"))?;
    let start = read(storage, 0, file_len.min(2 << 20))?;
    let header = Header::parse(&start, file_len).map_err(|e| format!("header: {e}"))?;
    let cs = header.cluster_size();
    let clusters = file_len.div_ceil(cs);
    let extended = header.extended_l2();
    let entry_size = if extended { 16 } else { 8 };
    let l2_entries = cs / entry_size;
    let mut refs = References {
        cluster_size: cs,
        clusters,
        counts: HashMap::new(),
        errors: Vec::new(),
    };
    refs.add(0, cs, "header");
    refs.add(
        header.refcount_table_offset,
        header.refcount_table_clusters as u64 * cs,
        "refcount table",
    );
    let reftable_entries = header.refcount_table_clusters as u64 * cs / 8;
    let reftable = read(storage, header.refcount_table_offset, reftable_entries * 8)?;
    let blocks: Vec<u64> = (0..reftable_entries)
        .map(|i| be64(&reftable, i * 8))
        .collect();
    for &block in blocks.iter().filter(|&&b| b != 0) {
        refs.add(block, cs, "refcount block");
    }
    let mut l1_tables = vec![(
        "active L1".to_string(),
        header.l1_table_offset,
        header.l1_size,
    )];
    if header.nb_snapshots > 0 {
        let table = read(
            storage,
            header.snapshots_offset,
            // Enough for the few snapshots of these tests, whatever follows the table.
            file_len
                .saturating_sub(header.snapshots_offset)
                .min(1 << 20),
        )?;
        let table = &table[..];
        let len = table_len(table, header.nb_snapshots).ok_or("the snapshot table is cut short")?;
        refs.add(header.snapshots_offset, len as u64, "snapshot table");
        let snapshots =
            parse_table(table, header.nb_snapshots).map_err(|e| format!("snapshot table: {e}"))?;
        for s in &snapshots {
            if s.vm_state_size != 0 {
                return Err(format!(
                    "snapshot {} has VM state: not modelled",
                    s.id_str()
                ));
            }
            l1_tables.push((
                format!("snapshot {} L1", s.id_str()),
                s.l1_table_offset,
                s.l1_size,
            ));
        }
    }
    // L2 tables by offset: how many L1 entries name each, and whether the active L1 does. As in
    // QEMU (`qcow2_update_snapshot_refcount`, and `qemu-img check` counting each L1 table's L2
    // tables in full), a data cluster holds one reference per L1 entry that reaches it: an L2
    // table shared by two L1 tables counts its clusters twice.
    let mut l2_tables: BTreeMap<u64, (u64, bool)> = BTreeMap::new();
    let mut active_l1_entries = Vec::new();
    for (i, (what, offset, size)) in l1_tables.iter().enumerate() {
        if *size > 0 {
            refs.add(*offset, *size as u64 * 8, what);
        }
        let table = read(storage, *offset, *size as u64 * 8)?;
        for e in 0..*size as u64 {
            let entry = be64(&table, e * 8);
            let l2 = entry & OFFSET_MASK;
            if l2 == 0 {
                continue;
            }
            refs.add(l2, cs, "L2 table");
            let (named, active) = l2_tables.entry(l2).or_insert((0, false));
            *named += 1;
            if i == 0 {
                *active = true;
                active_l1_entries.push((e, entry));
            }
        }
    }
    let x = 62 - (header.cluster_bits - 8);
    let mut active_data = Vec::new();
    for (&l2, &(named, active)) in &l2_tables {
        let table = read(storage, l2, cs)?;
        for i in 0..l2_entries {
            let at = l2 + i * entry_size;
            let entry = be64(&table, i * entry_size);
            let bitmap = if extended {
                be64(&table, i * entry_size + 8)
            } else {
                0
            };
            if entry & COMPRESSED != 0 {
                let host = entry & ((1 << x) - 1);
                let sectors = ((entry & !COPIED) >> x) + 1;
                let len = sectors * 512 - (host & 511);
                refs.add_times(host, len, "compressed data", named);
                continue;
            }
            let host = entry & OFFSET_MASK;
            if entry & 1 != 0 && (header.version < 3 || extended) {
                refs.errors.push(format!(
                    "L2 entry at {at:#x}: the zero flag, not in this format"
                ));
            }
            if extended {
                let (allocated, zero) = (bitmap as u32, (bitmap >> 32) as u32);
                if allocated & zero != 0 {
                    refs.errors.push(format!(
                        "L2 entry at {at:#x}: subclusters both allocated and zero"
                    ));
                }
                if allocated != 0 && host == 0 {
                    refs.errors.push(format!(
                        "L2 entry at {at:#x}: subclusters allocated, no cluster"
                    ));
                }
            }
            if host != 0 {
                refs.add_times(host, cs, "data cluster", named);
                if active {
                    active_data.push((at, entry, host));
                }
            }
        }
    }
    let References {
        counts: refs,
        mut errors,
        ..
    } = refs;
    let order = header.refcount_order;
    let per_block = (cs * 8) >> order;
    let mut block_bytes = HashMap::new();
    for &block in blocks.iter().filter(|&&b| b != 0) {
        block_bytes.insert(block, read(storage, block, cs)?);
    }
    let stored = |cluster: u64| -> u64 {
        let block = blocks
            .get((cluster / per_block) as usize)
            .copied()
            .unwrap_or(0);
        match block_bytes.get(&block) {
            Some(b) => read_entry(b, (cluster % per_block) as usize, order),
            None => 0,
        }
    };
    let last = refs.keys().copied().max().unwrap_or(0).max(clusters);
    for c in 0..last {
        let want = refs.get(&c).copied().unwrap_or(0);
        let have = stored(c);
        if want != have {
            errors.push(format!(
                "cluster {c} (at {:#x}): refcount {have}, the tables reference it {want} times",
                c * cs
            ));
        }
    }
    for (e, entry) in active_l1_entries {
        let sole = stored((entry & OFFSET_MASK) / cs) == 1;
        if (entry & COPIED != 0) != sole {
            errors.push(format!(
                "active L1 entry {e}: COPIED is {}, the refcount {}",
                entry & COPIED != 0,
                stored((entry & OFFSET_MASK) / cs)
            ));
        }
    }
    for (at, entry, host) in active_data {
        let sole = stored(host / cs) == 1;
        if (entry & COPIED != 0) != sole {
            errors.push(format!(
                "active L2 entry at {at:#x}: COPIED is {}, the refcount {}",
                entry & COPIED != 0,
                stored(host / cs)
            ));
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        let n = errors.len();
        errors.truncate(8);
        Err(format!("{n} errors: {}", errors.join("; ")))
    }
}

/// References counted from the tables, and what was wrong with them.
struct References {
    cluster_size: u64,
    clusters: u64,
    counts: HashMap<u64, u64>,
    errors: Vec<String>,
}

impl References {
    /// One reference to each cluster of `[offset, offset + len)`.
    fn add(&mut self, offset: u64, len: u64, what: &str) {
        self.add_times(offset, len, what, 1);
    }

    /// `times` references to each cluster of `[offset, offset + len)`.
    fn add_times(&mut self, offset: u64, len: u64, what: &str, times: u64) {
        let cs = self.cluster_size;
        if offset % cs != 0 && what != "compressed data" {
            self.errors
                .push(format!("{what} at {offset:#x} is not cluster-aligned"));
        }
        for c in offset / cs..(offset + len).div_ceil(cs) {
            if c >= self.clusters {
                self.errors.push(format!(
                    "{what} at {offset:#x} lies past the end of the file"
                ));
            }
            *self.counts.entry(c).or_default() += times;
        }
    }
}
