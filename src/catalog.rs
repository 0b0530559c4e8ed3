//! The catalog of views a mount shows: the live disk and every snapshot, with their file names and
//! metadata.
//!
//! Naming (docs/design.md section 2): an internal snapshot of the top image is `TAG.raw`; a backing
//! layer is named after its file without the extension (`base.qcow2` -> `base.raw`); an internal
//! snapshot inside a backing layer `B` is `B@TAG.raw`, or `TAG.raw` when libvirt knows `TAG` as an
//! internal snapshot (libvirt's name wins wherever the snapshot is stored). A tag that is empty, repeated within its
//! image, not UTF-8, or not a valid file name gets `id-ID.raw`; any remaining clash gets `~N`.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use parking_lot::{Mutex, RwLock};

use crate::chain::{Chain, Layer};
use crate::error::Result;
use crate::metadata::Metadata;
use crate::qcow2::snapshot::Snapshot;
use crate::qcow2::vm_state::vm_state_range;
use crate::view::{StartTable, View};

/// File name length limit of Linux file systems.
const NAME_MAX: usize = 255;
const SUFFIX: &str = ".raw";
/// The VM state file beside an internal snapshot's disk: `NAME.vmstate` beside `NAME.raw`.
const VM_STATE_SUFFIX: &str = ".vmstate";

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ViewKind {
    Live,
    Internal,
    External,
}

impl ViewKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ViewKind::Live => "live",
            ViewKind::Internal => "internal",
            ViewKind::External => "external",
        }
    }
}

/// What of a point in time a view shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Part {
    /// The disk (every view but one of VM state).
    Disk,
    /// The VM state QEMU's `savevm` stored with an internal snapshot (QEMU's migration stream).
    VmState,
}

/// One view with its name and metadata.
#[derive(Debug, Clone)]
pub struct ViewEntry {
    /// The file name (`live.raw`, `NAME.raw`).
    pub file_name: String,
    pub kind: ViewKind,
    /// The qcow2 snapshot id for internal snapshots; the layer's depth in the chain otherwise.
    pub id: String,
    /// libvirt's state of the domain when the snapshot was taken (`shutoff`, `running`, ...).
    pub state: Option<String>,
    /// Whether libvirt marks this snapshot as the domain's current one.
    pub current: bool,
    /// The snapshot's name in libvirt, when libvirt knows it.
    pub libvirt_name: Option<String>,
    /// The snapshot's tag as stored (lossy UTF-8), or the layer's file name.
    pub tag: String,
    pub created: Option<SystemTime>,
    pub parent: Option<String>,
    pub description: Option<String>,
    /// The file that holds this view's own clusters.
    pub layer_path: PathBuf,
    /// Index of that file in the chain.
    pub layer: usize,
    /// The raw qcow2 snapshot id, for internal snapshots.
    pub snapshot_id: Option<Vec<u8>>,
    pub vm_state_size: u64,
    /// The disk, or (`NAME.vmstate`) an internal snapshot's VM state.
    pub part: Part,
    pub view: Arc<View>,
}

/// The views of one chain, keyed by a number that stays theirs for the life of the mount.
#[derive(Debug, Clone)]
struct State {
    chain: Arc<Chain>,
    live: Arc<ViewEntry>,
    by_key: BTreeMap<u64, Arc<ViewEntry>>,
}

/// Identifies a view across chain changes: the file behind it, for an internal snapshot its id,
/// and which part of it the view shows.
type Identity = (PathBuf, Option<Vec<u8>>, Part);

/// The views of the chain being replaced, by identity, with their keys.
type Previous = BTreeMap<Identity, (u64, Arc<ViewEntry>)>;

fn identity(entry: &ViewEntry) -> Identity {
    (
        entry.layer_path.clone(),
        entry.snapshot_id.clone(),
        entry.part,
    )
}

/// Every view of a chain. The chain can change under a mount (commit, external snapshots): the
/// catalog then swaps in views of the new chain, keeping each surviving view's key and name.
#[derive(Debug)]
pub struct Catalog {
    state: RwLock<Arc<State>>,
    naming: Mutex<Naming>,
    /// Names of the checkpoints seen so far; a name's index is its key (its files' inode
    /// numbers), never reused during a mount.
    checkpoint_names: Mutex<Vec<String>>,
}

/// What names have been handed out, and which layers carry a snapshot name.
#[derive(Debug, Default)]
struct Naming {
    names: Names,
    next_key: u64,
    /// External snapshot names of layers given by `create --external` during this mount.
    layer_names: HashMap<PathBuf, String>,
    /// What libvirt says about the snapshots.
    meta: Metadata,
}

/// Which views a chain change added and removed.
#[derive(Debug, Default)]
pub struct Changes {
    pub added: Vec<(u64, String)>,
    pub removed: Vec<(u64, String)>,
}

impl Catalog {
    pub fn build(chain: Arc<Chain>) -> Result<Catalog> {
        Self::with_metadata(chain, Metadata::default())
    }

    /// Builds the catalog with libvirt's metadata naming and describing the views.
    pub fn with_metadata(chain: Arc<Chain>, meta: Metadata) -> Result<Catalog> {
        let mut naming = Naming {
            meta,
            ..Naming::default()
        };
        let state = build_state(chain, &BTreeMap::new(), &mut naming, &mut Vec::new())?;
        Ok(Catalog {
            state: RwLock::new(Arc::new(state)),
            naming: Mutex::new(naming),
            checkpoint_names: Mutex::new(Vec::new()),
        })
    }

    fn state(&self) -> Arc<State> {
        self.state.read().clone()
    }

    pub fn chain(&self) -> Arc<Chain> {
        self.state().chain.clone()
    }

    pub fn live(&self) -> Arc<ViewEntry> {
        self.state().live.clone()
    }

    /// The snapshot views with their keys, in key order.
    pub fn snapshots(&self) -> Vec<(u64, Arc<ViewEntry>)> {
        self.state()
            .by_key
            .iter()
            .map(|(k, v)| (*k, v.clone()))
            .collect()
    }

    pub fn get(&self, key: u64) -> Option<Arc<ViewEntry>> {
        self.state.read().by_key.get(&key).cloned()
    }

    pub fn find(&self, file_name: &str) -> Option<(u64, Arc<ViewEntry>)> {
        self.state
            .read()
            .by_key
            .iter()
            .find(|(_, v)| v.file_name == file_name)
            .map(|(k, v)| (*k, v.clone()))
    }

    /// The key of checkpoint `name` (given at its first sight, kept for the mount).
    pub fn checkpoint_key(&self, name: &str) -> u64 {
        let mut names = self.checkpoint_names.lock();
        match names.iter().position(|n| n == name) {
            Some(i) => i as u64,
            None => {
                names.push(name.to_owned());
                names.len() as u64 - 1
            }
        }
    }

    /// The checkpoint name with key `key`, if one was given it.
    pub fn checkpoint_name(&self, key: u64) -> Option<String> {
        let names = self.checkpoint_names.lock();
        usize::try_from(key)
            .ok()
            .and_then(|i| names.get(i).cloned())
    }

    /// The view a command names: `NAME` or `NAME.raw`.
    pub fn find_by_name(&self, name: &str) -> Option<(u64, Arc<ViewEntry>)> {
        self.find(&format!("{name}{SUFFIX}"))
            .or_else(|| self.find(name).filter(|_| name.ends_with(SUFFIX)))
    }

    /// The other views of the same point in time as view `key` (the VM state file of an
    /// internal snapshot), which go with it when it is deleted.
    pub fn siblings(&self, key: u64) -> Vec<(u64, Arc<ViewEntry>)> {
        let state = self.state.read();
        let Some(entry) = state.by_key.get(&key) else {
            return Vec::new();
        };
        state
            .by_key
            .iter()
            .filter(|(k, v)| {
                **k != key
                    && v.layer_path == entry.layer_path
                    && v.snapshot_id.is_some()
                    && v.snapshot_id == entry.snapshot_id
            })
            .map(|(k, v)| (*k, v.clone()))
            .collect()
    }

    /// Whether `NAME` would be a valid snapshot file name (`NAME.raw`).
    pub fn is_valid_name(name: &str) -> bool {
        is_valid_name(name)
    }

    /// Adds the view of a snapshot just created in the top image.
    pub fn add_internal(
        &self,
        snap: &Snapshot,
        description: Option<String>,
    ) -> Result<(u64, Arc<ViewEntry>)> {
        let mut naming = self.naming.lock();
        let mut state = self.state.write();
        let image = state.chain.top_image();
        let mut entry = internal_entry(&state.chain, 0, image, snap, "", false, &mut naming.names)?;
        entry.description = description;
        let key = naming.next_key;
        naming.next_key += 1;
        let entry = Arc::new(entry);
        let mut next = State::clone(&state);
        next.by_key.insert(key, entry.clone());
        *state = Arc::new(next);
        Ok((key, entry))
    }

    /// Removes a view; its name becomes free for a later snapshot (which gets a new inode).
    pub fn remove(&self, key: u64) -> Option<Arc<ViewEntry>> {
        let mut naming = self.naming.lock();
        let mut state = self.state.write();
        let mut next = State::clone(&state);
        let removed = next.by_key.remove(&key);
        if let Some(entry) = &removed
            && entry.part == Part::Disk
        {
            naming
                .names
                .release(entry.file_name.trim_end_matches(SUFFIX));
        }
        *state = Arc::new(next);
        removed
    }

    /// Gives a layer an external snapshot name (used for its view from the next rebuild on).
    pub fn name_layer(&self, path: PathBuf, name: String) {
        self.naming.lock().layer_names.insert(path, name);
    }

    /// libvirt's metadata as the catalog uses it.
    pub fn metadata(&self) -> Metadata {
        self.naming.lock().meta.clone()
    }

    /// Replaces libvirt's metadata (after snapfs wrote or removed XML); applied from the next
    /// rebuild on.
    pub fn set_metadata(&self, meta: Metadata) {
        self.naming.lock().meta = meta;
    }

    /// Re-creates every view of the current chain (after metadata or content changed).
    pub fn refresh(&self) -> Result<Changes> {
        self.rebuild(self.chain())
    }

    /// Switches to the views of `chain`. Views that still exist keep their keys and names (and
    /// descriptions); the rest are reported removed, new ones added.
    pub fn rebuild(&self, chain: Arc<Chain>) -> Result<Changes> {
        let mut naming = self.naming.lock();
        let mut state = self.state.write();
        let mut previous = Previous::new();
        for (k, v) in &state.by_key {
            previous.insert(identity(v), (*k, v.clone()));
        }
        let mut added = Vec::new();
        let next = build_state(chain, &previous, &mut naming, &mut added)?;
        let removed = state
            .by_key
            .iter()
            .filter(|(k, _)| !next.by_key.contains_key(k))
            .map(|(k, v)| (*k, v.file_name.clone()))
            .collect();
        *state = Arc::new(next);
        Ok(Changes { added, removed })
    }
}

/// Builds the views of `chain`. A view whose identity is in `previous` keeps its key, name and
/// description; others get fresh keys (reported in `added`).
fn build_state(
    chain: Arc<Chain>,
    previous: &Previous,
    naming: &mut Naming,
    added: &mut Vec<(u64, String)>,
) -> Result<State> {
    let top = chain.top().clone();
    let live = Arc::new(ViewEntry {
        file_name: "live.raw".into(),
        kind: ViewKind::Live,
        id: "0".into(),
        state: None,
        current: false,
        libvirt_name: None,
        tag: file_name_of(&top),
        created: file_mtime(&top),
        parent: None,
        description: None,
        layer_path: top.path().to_owned(),
        layer: 0,
        snapshot_id: None,
        vm_state_size: 0,
        part: Part::Disk,
        view: Arc::new(View::new(
            chain.clone(),
            0,
            StartTable::Active,
            top.virtual_size(),
        )),
    });
    let mut by_key = BTreeMap::new();
    // Places a view under a key and a name (its old ones if it survives from `previous`), and
    // the VM state view of the same snapshot, if any, under the same name with `.vmstate`.
    let mut place = |mut entry: ViewEntry,
                     vm_state: Option<ViewEntry>,
                     naming: &mut Naming,
                     wanted: &str,
                     fallback: String| {
        let (key, name) = match previous.get(&identity(&entry)) {
            Some((key, old)) => {
                entry.file_name = old.file_name.clone();
                entry.description = entry.description.take().or_else(|| old.description.clone());
                (*key, old.file_name.trim_end_matches(SUFFIX).to_owned())
            }
            None => {
                let name = naming.names.claim(wanted, || fallback.clone());
                entry.file_name = format!("{name}{SUFFIX}");
                let key = naming.next_key;
                naming.next_key += 1;
                added.push((key, entry.file_name.clone()));
                (key, name)
            }
        };
        if let Some(mut vm_state) = vm_state {
            // Named after its disk view, whatever name that got; never claimed in `Names` (no
            // `.raw` name can clash with it). Its metadata is the disk view's.
            vm_state.file_name = format!("{name}{VM_STATE_SUFFIX}");
            vm_state.description = entry.description.clone();
            let key = match previous.get(&identity(&vm_state)) {
                Some((key, _)) => *key,
                None => {
                    let key = naming.next_key;
                    naming.next_key += 1;
                    added.push((key, vm_state.file_name.clone()));
                    key
                }
            };
            by_key.insert(key, Arc::new(vm_state));
        }
        by_key.insert(key, Arc::new(entry));
        name
    };
    for (depth, layer) in chain.layers.iter().enumerate() {
        let prefix = if depth == 0 {
            String::new()
        } else {
            let libvirt_name = naming
                .meta
                .layer_names
                .get(&canonical(layer.path()))
                .cloned();
            let wanted = naming
                .layer_names
                .get(layer.path())
                .cloned()
                .or_else(|| libvirt_name.clone())
                .unwrap_or_else(|| layer_stem(layer));
            let mut entry = ViewEntry {
                file_name: String::new(),
                kind: ViewKind::External,
                id: depth.to_string(),
                state: None,
                current: false,
                libvirt_name: None,
                tag: file_name_of(layer),
                created: file_mtime(layer),
                parent: chain.layers.get(depth + 1).map(file_name_of),
                description: None,
                layer_path: layer.path().to_owned(),
                layer: depth,
                snapshot_id: None,
                vm_state_size: 0,
                part: Part::Disk,
                view: Arc::new(View::new(
                    chain.clone(),
                    depth,
                    StartTable::Active,
                    layer.virtual_size(),
                )),
            };
            let known = libvirt_name.or_else(|| naming.layer_names.get(layer.path()).cloned());
            if let Some(name) = known {
                apply_libvirt(&mut entry, &naming.meta, &name);
            }
            let name = place(entry, None, naming, &wanted, format!("layer-{depth}"));
            format!("{name}@")
        };
        let Layer::Qcow2(image) = layer.as_ref() else {
            continue;
        };
        let snapshots = image.snapshots();
        let mut tag_count: HashMap<&[u8], usize> = HashMap::new();
        for snap in snapshots.iter() {
            *tag_count.entry(&snap.name[..]).or_default() += 1;
        }
        for snap in snapshots.iter() {
            let repeated = tag_count.get(&snap.name[..]).is_some_and(|&n| n > 1);
            let id = snap.id_str();
            let fallback = match snap.name_str() {
                Some(tag) if !repeated && is_valid_name(tag) => format!("{prefix}{tag}"),
                _ => format!("{prefix}id-{id}"),
            };
            // libvirt's name wins wherever the snapshot is stored: an internal snapshot libvirt
            // knows keeps its name when a disk-only snapshot has put a layer above its image.
            let wanted = match snap.name_str() {
                Some(tag)
                    if !repeated
                        && is_valid_name(tag)
                        && libvirt_internal(naming, tag)
                        && !naming.names.taken.contains(tag) =>
                {
                    tag.to_owned()
                }
                _ => fallback.clone(),
            };
            let mut entry = snapshot_entry(&chain, depth, image, snap)?;
            if let Some(tag) = snap.name_str() {
                apply_libvirt(&mut entry, &naming.meta, tag);
            }
            let vm_state = vm_state_entry(&entry, image, snap);
            place(entry, vm_state, naming, &wanted, fallback);
        }
    }
    Ok(State {
        chain,
        live,
        by_key,
    })
}

/// Whether libvirt knows `tag` as an internal snapshot.
fn libvirt_internal(naming: &Naming, tag: &str) -> bool {
    naming
        .meta
        .snapshots
        .get(tag)
        .is_some_and(|s| s.location() == "internal")
}

/// Fills in what libvirt says about snapshot `name`. The image's own date wins over libvirt's
/// (internal snapshots carry one; layers only have their file's mtime).
fn apply_libvirt(entry: &mut ViewEntry, meta: &Metadata, name: &str) {
    let Some(snap) = meta.snapshots.get(name) else {
        return;
    };
    // An external snapshot named like an internal tag describes the layer, never the tag (and
    // the other way round): two views never share one description (metadata.rs reports it).
    let external = snap.location() == "external";
    if external != (entry.kind == ViewKind::External) {
        return;
    }
    entry.libvirt_name = Some(snap.name.clone());
    entry.description = entry
        .description
        .take()
        .or_else(|| snap.description.clone());
    entry.parent = snap.parent.clone().or(entry.parent.take());
    entry.state = snap.state.clone();
    entry.current = snap.current;
    if entry.kind == ViewKind::External
        && let Some(t) = snap.creation_time.and_then(|t| u64::try_from(t).ok())
    {
        entry.created = Some(UNIX_EPOCH + Duration::from_secs(t));
    }
}

fn canonical(path: &Path) -> PathBuf {
    std::fs::canonicalize(path).unwrap_or_else(|_| path.to_owned())
}

/// The view of internal snapshot `snap` of layer `depth` (its file name is set by the caller).
fn snapshot_entry(
    chain: &Arc<Chain>,
    depth: usize,
    image: &crate::qcow2::Qcow2Image,
    snap: &Snapshot,
) -> Result<ViewEntry> {
    let l1 = image.snapshot_l1(snap)?;
    Ok(ViewEntry {
        file_name: String::new(),
        kind: ViewKind::Internal,
        id: snap.id_str(),
        state: None,
        current: false,
        libvirt_name: None,
        tag: String::from_utf8_lossy(&snap.name).into_owned(),
        created: Some(
            UNIX_EPOCH + Duration::new(snap.date_sec.into(), snap.date_nsec.min(999_999_999)),
        ),
        parent: None,
        description: None,
        layer_path: image.path().to_owned(),
        layer: depth,
        snapshot_id: Some(snap.id.clone()),
        vm_state_size: snap.vm_state_size,
        part: Part::Disk,
        view: Arc::new(View::new(
            chain.clone(),
            depth,
            StartTable::Snapshot(Arc::new(l1)),
            image.snapshot_size(snap),
        )),
    })
}

/// The view of the VM state stored with the internal snapshot `disk` shows, if it has any: its
/// metadata is the snapshot's, its content the snapshot's guest address space past the disk
/// (see [`crate::qcow2::vm_state`]), read through the snapshot's own L1 table.
fn vm_state_entry(
    disk: &ViewEntry,
    image: &crate::qcow2::Qcow2Image,
    snap: &Snapshot,
) -> Option<ViewEntry> {
    // Most snapshots have none (disk-only ones, `qemu-img snapshot -c`): nothing to build.
    let (offset, len) = vm_state_range(image.geometry(), snap, image.snapshot_size(snap))?;
    let StartTable::Snapshot(l1) = disk.view.start_table() else {
        return None;
    };
    Some(ViewEntry {
        part: Part::VmState,
        view: Arc::new(View::window(
            disk.view.chain().clone(),
            disk.layer,
            l1.clone(),
            offset,
            len,
        )),
        ..disk.clone()
    })
}

fn internal_entry(
    chain: &Arc<Chain>,
    depth: usize,
    image: &crate::qcow2::Qcow2Image,
    snap: &Snapshot,
    prefix: &str,
    repeated: bool,
    names: &mut Names,
) -> Result<ViewEntry> {
    let id = snap.id_str();
    let wanted = match snap.name_str() {
        Some(tag) if !repeated && is_valid_name(tag) => format!("{prefix}{tag}"),
        _ => format!("{prefix}id-{id}"),
    };
    let name = names.claim(&wanted, || format!("{prefix}id-{id}"));
    let mut entry = snapshot_entry(chain, depth, image, snap)?;
    entry.file_name = format!("{name}{SUFFIX}");
    Ok(entry)
}

fn file_name_of(layer: &Arc<Layer>) -> String {
    layer
        .path()
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// The layer's file name without its extension (`base.qcow2` -> `base`).
fn layer_stem(layer: &Arc<Layer>) -> String {
    layer
        .path()
        .file_stem()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

fn file_mtime(layer: &Arc<Layer>) -> Option<SystemTime> {
    layer.host_metadata().and_then(|m| m.modified()).ok()
}

/// Names handed out so far in `snapshots/`.
#[derive(Debug, Default, Clone)]
struct Names {
    taken: HashSet<String>,
    counters: HashMap<String, u32>,
}

impl Names {
    fn release(&mut self, name: &str) {
        self.taken.remove(name);
    }

    /// Claims `wanted` (without the `.raw` suffix) if it is a valid, free name; otherwise
    /// `fallback()`, and if that is taken too, the first free `fallback~N`.
    fn claim(&mut self, wanted: &str, fallback: impl Fn() -> String) -> String {
        let base = if is_valid_name(wanted) {
            wanted.to_owned()
        } else {
            fallback()
        };
        let mut name = base.clone();
        if !is_valid_name(&name) {
            // Even the fallback is too long (a very long layer name as prefix): cut it.
            name = truncate_to(&base, NAME_MAX - SUFFIX.len() - 8);
        }
        let stem = name.clone();
        while self.taken.contains(&name) {
            let n = self.counters.entry(stem.clone()).or_insert(1);
            *n += 1;
            name = format!("{}~{n}", truncate_to(&stem, NAME_MAX - SUFFIX.len() - 8));
        }
        self.taken.insert(name.clone());
        name
    }
}

/// A name (without suffix) that can be a file in `snapshots/` as it is.
fn is_valid_name(name: &str) -> bool {
    !name.is_empty()
        && name != "."
        && name != ".."
        && !name.contains(['/', '\0'])
        && !name.chars().any(char::is_control)
        && name.len() + SUFFIX.len() <= NAME_MAX
}

fn truncate_to(s: &str, max: usize) -> String {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn valid_names() {
        assert!(is_valid_name("pkg-updated"));
        assert!(is_valid_name("a b"));
        assert!(!is_valid_name(""));
        assert!(!is_valid_name("."));
        assert!(!is_valid_name(".."));
        assert!(!is_valid_name("a/b"));
        assert!(!is_valid_name("a\0b"));
        assert!(!is_valid_name("line\nbreak"));
        assert!(!is_valid_name(&"x".repeat(252)));
        assert!(is_valid_name(&"x".repeat(251)));
    }

    #[test]
    fn clashes_get_suffixes_and_fallbacks() {
        let mut n = Names::default();
        assert_eq!(n.claim("base", || "id-1".into()), "base");
        assert_eq!(n.claim("base", || "id-2".into()), "base~2");
        assert_eq!(n.claim("base", || "id-3".into()), "base~3");
        assert_eq!(n.claim("a/b", || "id-4".into()), "id-4");
        assert_eq!(n.claim("..", || "id-4".into()), "id-4~2");
        let long = "é".repeat(200);
        let got = n.claim(&long, || long.clone());
        assert!(got.len() + 4 <= 255 && is_valid_name(&got));
    }
}
