//! The names of change files: `FROM..TO.raw` and `FROM..TO.json`, where FROM and TO are views
//! as `snapshots/` names them (without `.raw`) or `live`; and which pairs a listing shows.
//!
//! A listing shows, for every snapshot, the pair from its parent to it, and the pair from the
//! live disk's parent (the current snapshot) to `live`. The parent is, in this order:
//! 1. libvirt's: the snapshot's `<parent>` (for the live disk, the snapshot libvirt marks
//!    current), when the mount has libvirt metadata naming a view of the mount;
//! 2. the previous internal snapshot of the same layer by date (for a layer's active state,
//!    the live disk included: its newest internal snapshot);
//! 3. the layer below (its active state, the backing file's view).
//!
//! A view without any of these (the first snapshot of a lone image) has no listed pair. Every
//! other pair can still be looked up by name.

use std::sync::Arc;

use crate::catalog::{Catalog, Part, ViewEntry, ViewKind};

/// Longest file name a Linux file system (and so a lookup) takes.
const NAME_MAX: usize = 255;

/// A view a change file names: the live disk or a snapshot, by catalog key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ViewRef {
    Live,
    Snapshot(u64),
}

/// What a change file shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Form {
    /// `.raw`: TO's size; TO's bytes in the changed ranges, holes elsewhere.
    Raw,
    /// `.json`: the list of changed ranges.
    Json,
}

impl Form {
    pub fn suffix(self) -> &'static str {
        match self {
            Form::Raw => ".raw",
            Form::Json => ".json",
        }
    }
}

/// One change file's identity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PairName {
    pub from: ViewRef,
    pub to: ViewRef,
    pub form: Form,
}

impl PairName {
    /// Whether the pair reads the live disk (a `--force-share` mount hides those where it hides
    /// `live.raw`).
    pub fn involves_live(&self) -> bool {
        self.from == ViewRef::Live || self.to == ViewRef::Live
    }
}

/// The name of the live disk in pair names.
pub const LIVE: &str = "live";

/// The entry a reference stands for now, if it still exists.
pub fn entry(catalog: &Catalog, view: ViewRef) -> Option<Arc<ViewEntry>> {
    match view {
        ViewRef::Live => Some(catalog.live()),
        ViewRef::Snapshot(key) => catalog.get(key),
    }
}

/// A view's name in pair names: its `snapshots/` name without `.raw`, or `live`.
pub fn view_name(catalog: &Catalog, view: ViewRef) -> Option<String> {
    match view {
        ViewRef::Live => Some(LIVE.to_owned()),
        ViewRef::Snapshot(key) => catalog
            .get(key)
            .map(|e| e.file_name.trim_end_matches(".raw").to_owned()),
    }
}

/// The view a name in a pair stands for. `live` is the live disk (a snapshot named `live` is
/// not reachable in pair names).
pub fn resolve(catalog: &Catalog, name: &str) -> Option<ViewRef> {
    if name == LIVE {
        return Some(ViewRef::Live);
    }
    catalog
        .find(&format!("{name}.raw"))
        .map(|(key, _)| ViewRef::Snapshot(key))
}

/// Reads `FROM..TO.raw` or `FROM..TO.json`. Snapshot names may hold `..` themselves: every
/// split is tried, and the first (shortest FROM) that names two views wins.
pub fn parse(catalog: &Catalog, file_name: &str) -> Option<PairName> {
    let (stem, form) = if let Some(stem) = file_name.strip_suffix(".raw") {
        (stem, Form::Raw)
    } else {
        (file_name.strip_suffix(".json")?, Form::Json)
    };
    stem.match_indices("..").find_map(|(at, _)| {
        let from = resolve(catalog, &stem[..at])?;
        let to = resolve(catalog, &stem[at + 2..])?;
        Some(PairName { from, to, form })
    })
}

/// The file name of a pair, if both views exist and the name fits a directory entry.
pub fn file_name(catalog: &Catalog, pair: PairName) -> Option<String> {
    let name = format!(
        "{}..{}{}",
        view_name(catalog, pair.from)?,
        view_name(catalog, pair.to)?,
        pair.form.suffix()
    );
    (name.len() <= NAME_MAX).then_some(name)
}

/// The pairs a listing of `changes/` shows, as (parent, view): one per snapshot that has a
/// parent, then the live disk's.
pub fn listed(catalog: &Catalog) -> Vec<(ViewRef, ViewRef)> {
    let snapshots = catalog.snapshots();
    let meta = catalog.metadata();
    // Disk views only: a VM state file is no point in time of the disk.
    let mut views: Vec<(ViewRef, Arc<ViewEntry>)> = snapshots
        .iter()
        .filter(|(_, e)| e.part == Part::Disk)
        .map(|(k, e)| (ViewRef::Snapshot(*k), e.clone()))
        .collect();
    views.push((ViewRef::Live, catalog.live()));
    views
        .iter()
        .filter_map(|(r, e)| parent(&views, &meta, *r, e).map(|p| (p, *r)))
        .collect()
}

/// The parent of `view` (see the module documentation) among `views`.
fn parent(
    views: &[(ViewRef, Arc<ViewEntry>)],
    meta: &crate::metadata::Metadata,
    view: ViewRef,
    entry: &ViewEntry,
) -> Option<ViewRef> {
    let by_libvirt_name = |name: &str| {
        views
            .iter()
            .find(|(r, e)| *r != view && e.libvirt_name.as_deref() == Some(name))
            .map(|(r, _)| *r)
    };
    let libvirt_parent = match view {
        ViewRef::Live => meta.current().map(|s| s.name.clone()),
        ViewRef::Snapshot(_) => entry
            .libvirt_name
            .as_ref()
            .and_then(|n| meta.snapshots.get(n))
            .and_then(|s| s.parent.clone()),
    };
    if let Some(found) = libvirt_parent.as_deref().and_then(by_libvirt_name) {
        return Some(found);
    }
    // Snapshots of the same layer, ordered by date, then by table order (keys follow it).
    let order = |r: &ViewRef, e: &ViewEntry| (e.created, *r);
    let here = order(&view, entry);
    let earlier = views
        .iter()
        .filter(|(r, e)| {
            e.kind == ViewKind::Internal
                && e.layer == entry.layer
                && (entry.kind != ViewKind::Internal || order(r, e) < here)
        })
        .max_by_key(|(r, e)| order(r, e))
        .map(|(r, _)| *r);
    earlier.or_else(|| {
        views
            .iter()
            .find(|(_, e)| e.kind == ViewKind::External && e.layer == entry.layer + 1)
            .map(|(r, _)| *r)
    })
}
