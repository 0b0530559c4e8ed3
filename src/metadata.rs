//! libvirt's snapshot metadata applied to a chain: which layer an external snapshot names, and
//! the description, parent, state, date and "current" mark of every snapshot libvirt knows.
//!
//! An external snapshot's `<disk snapshot='external'><source file='NEW'/>` names the overlay that
//! was created at snapshot time, so the snapshot's state is the layer NEW is backed by. An
//! internal snapshot's tag equals its `<name>`. XML that does not parse, or whose external disks
//! are all outside the mounted chain, is reported and skipped; the mount never fails over it.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use crate::chain::Chain;
use crate::libvirt::{self, DomainSnapshot};

/// What libvirt says about the snapshots of one chain.
#[derive(Debug, Default, Clone)]
pub struct Metadata {
    /// The folder the XML came from.
    pub dir: Option<PathBuf>,
    /// Every snapshot libvirt knows that concerns this chain, by name.
    pub snapshots: HashMap<String, DomainSnapshot>,
    /// Layer file (canonical) -> the external snapshot whose state it holds.
    pub layer_names: HashMap<PathBuf, String>,
    /// The guest disk name (`vda`) the chain is, when the XML says.
    pub disk_name: Option<String>,
    /// One line per file that was skipped, and why.
    pub problems: Vec<String>,
}

fn canonical(path: &Path) -> PathBuf {
    std::fs::canonicalize(path).unwrap_or_else(|_| path.to_owned())
}

impl Metadata {
    /// Reads `dir` and matches its snapshots to `chain`.
    pub fn load(dir: &Path, chain: &Chain) -> Metadata {
        let (snapshots, errors) = libvirt::load_dir(dir);
        let mut meta = Metadata {
            dir: Some(dir.to_owned()),
            problems: errors.iter().map(|e| format!("skipped: {e}")).collect(),
            ..Metadata::default()
        };
        let layers: Vec<PathBuf> = chain.layers.iter().map(|l| canonical(l.path())).collect();
        for snap in snapshots {
            let external: Vec<&libvirt::SnapshotDisk> =
                snap.disks.iter().filter(|d| d.is_external()).collect();
            let mut in_chain = false;
            for disk in &external {
                let Some(source) = &disk.source_file else {
                    continue;
                };
                let source = canonical(source);
                if let Some(i) = layers.iter().position(|l| *l == source) {
                    in_chain = true;
                    meta.disk_name.get_or_insert_with(|| disk.name.clone());
                    if let Some(layer) = layers.get(i + 1) {
                        meta.layer_names.insert(layer.clone(), snap.name.clone());
                    }
                }
            }
            if !external.is_empty() && !in_chain {
                // Names no snapshot: a file in the folder may be anyone's (docs/security.md).
                meta.problems.push(format!(
                    "skipped: {}: its disks name files that are not in the mounted chain",
                    snap.source_file.display(),
                ));
                continue;
            }
            if meta.disk_name.is_none()
                && let Some(disk) = snap
                    .disks
                    .iter()
                    .find(|d| d.snapshot == libvirt::DiskSnapshotKind::Internal)
            {
                meta.disk_name = Some(disk.name.clone());
            }
            if let Some(first) = meta.snapshots.get(&snap.name) {
                meta.problems.push(format!(
                    "skipped: {}: names the snapshot {:?} that {} names too (the first file counts)",
                    snap.source_file.display(),
                    snap.name,
                    first.source_file.display(),
                ));
                continue;
            }
            meta.snapshots.insert(snap.name.clone(), snap);
        }
        meta.report_external_named_like_tags(chain);
        meta
    }

    /// A status line for every external snapshot whose name is also an internal snapshot's tag
    /// in the chain: the layer's view and the tag's view each keep what is theirs.
    fn report_external_named_like_tags(&mut self, chain: &Chain) {
        let mut lines = Vec::new();
        for snap in self.snapshots.values() {
            if snap.location() != "external" {
                continue;
            }
            for layer in &chain.layers {
                let crate::chain::Layer::Qcow2(image) = layer.as_ref() else {
                    continue;
                };
                if image
                    .snapshots()
                    .iter()
                    .any(|t| t.name == snap.name.as_bytes())
                {
                    lines.push(format!(
                        "{}: the external snapshot {:?} has the name of an internal snapshot in {}; \
                         its description and state stay the layer's",
                        snap.source_file.display(),
                        snap.name,
                        layer.path().display()
                    ));
                }
            }
        }
        lines.sort();
        self.problems.extend(lines);
    }

    /// The snapshot libvirt marks current, if any.
    pub fn current(&self) -> Option<&DomainSnapshot> {
        self.snapshots.values().find(|s| s.current)
    }
}
