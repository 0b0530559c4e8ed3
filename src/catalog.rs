//! The catalog of views a mount shows: the live disk and every snapshot, with their file names and
//! metadata.
//!
//! Naming (DESIGN.md section 2): an internal snapshot of the top image is `TAG.raw`; a backing
//! layer is named after its file without the extension (`base.qcow2` -> `base.raw`); an internal
//! snapshot inside a backing layer `B` is `B@TAG.raw`. A tag that is empty, repeated within its
//! image, not UTF-8, or not a valid file name gets `id-ID.raw`; any remaining clash gets `~N`.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::chain::{Chain, Layer};
use crate::error::Result;
use crate::view::{StartTable, View};

/// File name length limit of Linux file systems.
const NAME_MAX: usize = 255;
const SUFFIX: &str = ".raw";

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

/// One view with its name and metadata.
#[derive(Debug, Clone)]
pub struct ViewEntry {
    /// The file name (`live.raw`, `NAME.raw`).
    pub file_name: String,
    pub kind: ViewKind,
    /// The qcow2 snapshot id for internal snapshots; the layer's depth in the chain otherwise.
    pub id: String,
    /// The snapshot's tag as stored (lossy UTF-8), or the layer's file name.
    pub tag: String,
    pub created: Option<SystemTime>,
    pub parent: Option<String>,
    pub description: Option<String>,
    /// The file that holds this view's own clusters.
    pub layer_path: PathBuf,
    pub vm_state_size: u64,
    pub view: Arc<View>,
}

/// Every view of a chain.
#[derive(Debug)]
pub struct Catalog {
    pub chain: Arc<Chain>,
    pub live: ViewEntry,
    pub snapshots: Vec<ViewEntry>,
}

impl Catalog {
    pub fn build(chain: Arc<Chain>) -> Result<Catalog> {
        let top = chain.top().clone();
        let live = ViewEntry {
            file_name: "live.raw".into(),
            kind: ViewKind::Live,
            id: "0".into(),
            tag: file_name_of(&top),
            created: file_mtime(&top),
            parent: None,
            description: None,
            layer_path: top.path().to_owned(),
            vm_state_size: 0,
            view: Arc::new(View::new(
                chain.clone(),
                0,
                StartTable::Active,
                top.virtual_size(),
            )),
        };

        let mut names = Names::default();
        let mut snapshots = Vec::new();
        for (depth, layer) in chain.layers.iter().enumerate() {
            let prefix = if depth == 0 {
                String::new()
            } else {
                let stem = layer_stem(layer);
                let name = names.claim(&stem, || format!("layer-{depth}"));
                let below = chain.layers.get(depth + 1).map(file_name_of);
                snapshots.push(ViewEntry {
                    file_name: format!("{name}{SUFFIX}"),
                    kind: ViewKind::External,
                    id: depth.to_string(),
                    tag: file_name_of(layer),
                    created: file_mtime(layer),
                    parent: below,
                    description: None,
                    layer_path: layer.path().to_owned(),
                    vm_state_size: 0,
                    view: Arc::new(View::new(
                        chain.clone(),
                        depth,
                        StartTable::Active,
                        layer.virtual_size(),
                    )),
                });
                format!("{name}@")
            };
            let Layer::Qcow2(image) = layer.as_ref() else {
                continue;
            };
            let tags: Vec<&[u8]> = image.snapshots().iter().map(|s| &s.name[..]).collect();
            for snap in image.snapshots() {
                let id = snap.id_str();
                let repeated = tags.iter().filter(|t| **t == &snap.name[..]).count() > 1;
                let wanted = match snap.name_str() {
                    Some(tag) if !repeated => format!("{prefix}{tag}"),
                    _ => format!("{prefix}id-{id}"),
                };
                let name = names.claim(&wanted, || format!("{prefix}id-{id}"));
                let l1 = image.snapshot_l1(snap)?;
                snapshots.push(ViewEntry {
                    file_name: format!("{name}{SUFFIX}"),
                    kind: ViewKind::Internal,
                    id: id.clone(),
                    tag: String::from_utf8_lossy(&snap.name).into_owned(),
                    created: Some(UNIX_EPOCH + Duration::new(snap.date_sec.into(), snap.date_nsec)),
                    parent: None,
                    description: None,
                    layer_path: image.path().to_owned(),
                    vm_state_size: snap.vm_state_size,
                    view: Arc::new(View::new(
                        chain.clone(),
                        depth,
                        StartTable::Snapshot(Arc::new(l1)),
                        image.snapshot_size(snap),
                    )),
                });
            }
        }
        Ok(Catalog {
            chain,
            live,
            snapshots,
        })
    }

    pub fn find(&self, file_name: &str) -> Option<&ViewEntry> {
        self.snapshots.iter().find(|v| v.file_name == file_name)
    }
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
    layer.file().metadata().and_then(|m| m.modified()).ok()
}

/// Names handed out so far in `snapshots/`.
#[derive(Default)]
struct Names {
    taken: HashSet<String>,
    counters: HashMap<String, u32>,
}

impl Names {
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
