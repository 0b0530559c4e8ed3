//! Which internal snapshots of a layer would change if some of the layers below it left the
//! chain: a snapshot's unallocated clusters read through its image's backing chain, so removing
//! a layer that provides data there (`delete` of a layer pulls it into the layer above; `pull`
//! makes a lower layer the top's backing file) would change the snapshot's content. Such an
//! operation is refused, naming the snapshots, and changes nothing.

use crate::chain::{Chain, Layer};
use crate::driver::{FormatDriver, LayerMap, Precision};
use crate::error::{Error, Result};
use crate::qcow2::snapshot::Snapshot;
use crate::qcow2::vm_state::vm_state_range;
use crate::qcow2::{Mapping, Qcow2Image};

/// The internal snapshots of layer `owner` that read anything from layers `gone.start ..
/// gone.end` (which would leave the chain, layer `gone.end` becoming `owner`'s backing file).
/// Conservative: a position counts if any of those layers maps it (data or zeros), or if one of
/// them is too small to reach it while the new backing file does, even where the new backing
/// file would happen to show the same bytes.
pub fn snapshots_reading_through(
    chain: &Chain,
    owner: usize,
    gone: std::ops::Range<usize>,
) -> Result<Vec<Snapshot>> {
    let Some(Layer::Qcow2(image)) = chain.layers.get(owner).map(|l| l.as_ref()) else {
        return Ok(Vec::new());
    };
    let mut found = Vec::new();
    for snap in image.snapshots().iter() {
        if reads_through(chain, image, snap, &gone)? {
            found.push(snap.clone());
        }
    }
    Ok(found)
}

/// The refusal for an operation that would change `snapshots` of layer `owner`.
pub fn refusal(chain: &Chain, owner: usize, snapshots: &[Snapshot], remedy: &str) -> Error {
    let names: Vec<String> = snapshots
        .iter()
        .map(|s| match s.name_str() {
            Some(tag) if !tag.is_empty() => format!("{tag:?}"),
            _ => format!("id {}", s.id_str()),
        })
        .collect();
    let (noun, verb, their) = if names.len() == 1 {
        ("internal snapshot", "reads", "its")
    } else {
        ("internal snapshots", "read", "their")
    };
    Error::Invalid {
        path: chain.layers[owner].path().to_owned(),
        reason: format!(
            "{noun} {} {verb} data from the layers that would leave the chain, so {their} \
             content would change; nothing was changed ({remedy})",
            names.join(", ")
        ),
    }
}

/// Whether `snap` of `image` reads anything (disk or VM state) from layers `gone`.
fn reads_through(
    chain: &Chain,
    image: &Qcow2Image,
    snap: &Snapshot,
    gone: &std::ops::Range<usize>,
) -> Result<bool> {
    let l1 = image.snapshot_l1(snap)?;
    let disk = image.snapshot_size(snap);
    let mut ranges = vec![(0, disk)];
    ranges.extend(vm_state_range(image.geometry(), snap, disk));
    for (start, len) in ranges {
        let end = start.saturating_add(len);
        let mut pos = start;
        while pos < end {
            let mapping = image.map(&l1, pos, end - pos)?;
            let n = mapping.len().clamp(1, end - pos);
            if let Mapping::Unallocated { .. } = mapping
                && provides(chain, gone.start, gone, pos, n)?
            {
                return Ok(true);
            }
            pos += n;
        }
    }
    Ok(false)
}

/// Whether layer `depth` or one below it, before `gone.end`, decides what guest range `pos ..
/// pos + len` reads (read falls through unallocated clusters; past a layer's end it reads zeros).
fn provides(
    chain: &Chain,
    depth: usize,
    gone: &std::ops::Range<usize>,
    pos: u64,
    len: u64,
) -> Result<bool> {
    if depth >= gone.end || depth >= chain.layers.len() {
        return Ok(false);
    }
    let layer = &chain.layers[depth];
    let size = layer.virtual_size();
    let end = pos.saturating_add(len);
    // Past this layer's end it reads zeros; without it, the new backing file shows there.
    let new_size = chain.layers.get(gone.end).map_or(0, |l| l.virtual_size());
    if end > size && size.max(pos) < new_size {
        return Ok(true);
    }
    let end = end.min(size);
    let mut at = pos;
    while at < end {
        let (mine, n) = match layer.as_ref() {
            Layer::Qcow2(image) => {
                let m = image.map(&image.active_l1(), at, end - at)?;
                (!matches!(m, Mapping::Unallocated { .. }), m.len())
            }
            Layer::Raw(raw) => {
                // A raw layer is the bottom: its holes read as zeros with or without it.
                let (map, n) = raw.map(None, at, end - at, Precision::Holes)?;
                (matches!(map, LayerMap::Stored(_)), n)
            }
        };
        let n = n.clamp(1, end - at);
        if mine || provides(chain, depth + 1, gone, at, n)? {
            return Ok(true);
        }
        at += n;
    }
    Ok(false)
}
