//! What `snapfs info` prints and `info.json` holds: the chain (field names as
//! `qemu-img info --backing-chain --output=json` spells them) and every view.

use std::collections::HashMap;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;

use crate::catalog::{Catalog, Part, ViewEntry};
use crate::chain::{Chain, Layer};
use crate::qcow2::header::CompressionType;

#[derive(Debug, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct ChainInfo {
    pub chain: Vec<LayerInfo>,
    pub views: Vec<ViewInfo>,
    /// libvirt's snapshot tree, when metadata was given.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub libvirt: Option<Vec<LibvirtSnapshotInfo>>,
}

/// What `virsh snapshot-info` reports about one snapshot, and the view that holds it.
#[derive(Debug, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct LibvirtSnapshotInfo {
    pub name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub state: Option<String>,
    /// internal | external | none
    pub location: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
    pub children: Vec<String>,
    pub descendants: usize,
    pub current: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub created: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// The view in the mount (`snapshots/NAME.raw`), when the chain holds the snapshot.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub file: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct LayerInfo {
    pub filename: String,
    pub format: &'static str,
    pub virtual_size: u64,
    pub actual_size: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cluster_size: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backing_filename: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub full_backing_filename: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backing_filename_format: Option<String>,
    pub dirty_flag: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub format_specific: Option<FormatSpecific>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub snapshots: Vec<SnapshotInfo>,
}

/// `format-specific` as qemu-img nests it: `{"type": "qcow2", "data": {...}}`.
#[derive(Debug, Serialize)]
pub struct FormatSpecific {
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub data: Qcow2Specific,
}

/// The qcow2 facts; version 2 images have no feature bits, and qemu-img leaves those out.
#[derive(Debug, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct Qcow2Specific {
    pub compat: &'static str,
    pub compression_type: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lazy_refcounts: Option<bool>,
    pub refcount_bits: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub corrupt: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub extended_l2: Option<bool>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct SnapshotInfo {
    pub id: String,
    pub name: String,
    pub vm_state_size: u64,
    pub date_sec: u32,
    pub date_nsec: u32,
    pub vm_clock_sec: u64,
    pub vm_clock_nsec: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub icount: Option<u64>,
    pub disk_size: u64,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct ViewInfo {
    /// Path inside the mount (`live.raw`, `snapshots/NAME.raw`).
    pub file: String,
    pub kind: &'static str,
    pub id: String,
    pub name: String,
    pub size: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub created: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    pub layer: String,
    pub vm_state_size: u64,
    /// The file with the snapshot's VM state (`snapshots/NAME.vmstate`), if it has any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vm_state_file: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub state: Option<String>,
    /// libvirt's current snapshot.
    pub current: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub libvirt_name: Option<String>,
}

/// RFC 3339 in UTC, to the second.
pub fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

pub fn layer_info(layer: &Layer) -> LayerInfo {
    use std::os::unix::fs::MetadataExt;
    let actual_size = layer.host_metadata().map(|m| m.blocks() * 512).unwrap_or(0);
    let mut info = LayerInfo {
        filename: layer.path().display().to_string(),
        format: match layer {
            Layer::Qcow2(_) => "qcow2",
            Layer::Raw(_) => "raw",
        },
        virtual_size: layer.virtual_size(),
        actual_size,
        cluster_size: None,
        backing_filename: None,
        full_backing_filename: None,
        backing_filename_format: None,
        dirty_flag: false,
        format_specific: None,
        snapshots: Vec::new(),
    };
    let Layer::Qcow2(image) = layer else {
        return info;
    };
    let h = image.header();
    info.cluster_size = Some(h.cluster_size());
    info.backing_filename = image.backing_file();
    info.backing_filename_format = image.backing_format();
    info.dirty_flag = h.is_dirty();
    let v3 = h.version >= 3;
    info.format_specific = Some(FormatSpecific {
        kind: "qcow2",
        data: Qcow2Specific {
            compat: if v3 { "1.1" } else { "0.10" },
            compression_type: match h.compression_type {
                CompressionType::Deflate => "zlib",
                CompressionType::Zstd => "zstd",
            },
            lazy_refcounts: v3.then_some(
                h.compatible_features & crate::qcow2::header::compatible::LAZY_REFCOUNTS != 0,
            ),
            refcount_bits: h.refcount_bits(),
            corrupt: v3.then_some(h.is_corrupt()),
            extended_l2: v3.then_some(h.extended_l2()),
        },
    });
    info.snapshots = image
        .snapshots()
        .iter()
        .map(|s| SnapshotInfo {
            id: s.id_str(),
            name: String::from_utf8_lossy(&s.name).into_owned(),
            vm_state_size: s.vm_state_size,
            date_sec: s.date_sec,
            date_nsec: s.date_nsec,
            vm_clock_sec: s.vm_clock_nsec / 1_000_000_000,
            vm_clock_nsec: s.vm_clock_nsec % 1_000_000_000,
            icount: s.icount,
            disk_size: image.snapshot_size(s),
        })
        .collect();
    info
}

pub fn chain_layers(chain: &Chain) -> Vec<LayerInfo> {
    let mut layers: Vec<LayerInfo> = chain.layers.iter().map(|l| layer_info(l)).collect();
    for i in 1..layers.len() {
        layers[i - 1].full_backing_filename = Some(layers[i].filename.clone());
    }
    layers
}

fn view_info(entry: &ViewEntry, dir: &str) -> ViewInfo {
    ViewInfo {
        file: format!("{dir}{}", entry.file_name),
        kind: entry.kind.as_str(),
        id: entry.id.clone(),
        name: entry.tag.clone(),
        size: entry.view.size(),
        created: entry.created.filter(|t| *t >= UNIX_EPOCH).map(rfc3339),
        parent: entry.parent.clone(),
        description: entry.description.clone(),
        layer: entry.layer_path.display().to_string(),
        vm_state_size: entry.vm_state_size,
        vm_state_file: None,
        state: entry.state.clone(),
        current: entry.current,
        libvirt_name: entry.libvirt_name.clone(),
    }
}

/// `live_shown`: whether the mount shows `live.raw` (a `--force-share` mount hides the live disk
/// of an image another process writes; its listing then leaves it out too).
pub fn catalog_info(catalog: &Catalog, live_shown: bool) -> ChainInfo {
    let mut views = Vec::new();
    if live_shown {
        views.push(view_info(&catalog.live(), ""));
    }
    let snapshots = catalog.snapshots();
    // A VM state file is listed with its snapshot's view, not as a view of its own. One pass
    // finds them all: an image may have 65535 snapshots.
    let vm_state_files: HashMap<(&Path, &[u8]), String> = snapshots
        .iter()
        .filter(|(_, v)| v.part == Part::VmState)
        .filter_map(|(_, v)| {
            let id = v.snapshot_id.as_deref()?;
            Some((
                (v.layer_path.as_path(), id),
                format!("snapshots/{}", v.file_name),
            ))
        })
        .collect();
    views.extend(
        snapshots
            .iter()
            .filter(|(_, v)| v.part == Part::Disk)
            .map(|(_, v)| ViewInfo {
                vm_state_file: v
                    .snapshot_id
                    .as_deref()
                    .and_then(|id| vm_state_files.get(&(v.layer_path.as_path(), id)))
                    .cloned(),
                ..view_info(v, "snapshots/")
            }),
    );
    let meta = catalog.metadata();
    let libvirt = meta.dir.is_some().then(|| libvirt_info(&meta, &views));
    ChainInfo {
        chain: chain_layers(&catalog.chain()),
        views,
        libvirt,
    }
}

fn libvirt_info(meta: &crate::metadata::Metadata, views: &[ViewInfo]) -> Vec<LibvirtSnapshotInfo> {
    let mut snapshots: Vec<&crate::libvirt::DomainSnapshot> = meta.snapshots.values().collect();
    snapshots.sort_by(|a, b| (a.creation_time, &a.name).cmp(&(b.creation_time, &b.name)));
    let owned: Vec<crate::libvirt::DomainSnapshot> =
        snapshots.iter().map(|s| (*s).clone()).collect();
    let tree = crate::libvirt::SnapshotTree::new(&owned);
    snapshots
        .iter()
        .map(|s| {
            let view = views
                .iter()
                .find(|v| v.libvirt_name.as_deref() == Some(s.name.as_str()));
            LibvirtSnapshotInfo {
                name: s.name.clone(),
                state: s.state.clone(),
                location: s.location(),
                parent: tree.parent(&s.name).map(str::to_owned),
                children: tree.children(&s.name).to_vec(),
                descendants: tree.descendants(&s.name),
                current: s.current,
                created: s
                    .creation_time
                    .and_then(|t| u64::try_from(t).ok())
                    .map(|t| rfc3339(UNIX_EPOCH + std::time::Duration::from_secs(t))),
                description: s.description.clone(),
                file: view.map(|v| v.file.clone()),
                size: view.map(|v| v.size),
            }
        })
        .collect()
}
