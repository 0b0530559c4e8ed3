//! Removing a layer from the middle of the chain: `delete` of an external snapshot pulls its data
//! into the layer above (`qemu-img rebase -b`, `virsh blockpull`), and `revert` to a layer empties
//! the top and points it at that layer.

use std::sync::Arc;

use super::dependents::{refusal, snapshots_reading_through};
use super::{
    LayerWriter, Progress, Run, WriteAccess, allocated_runs, backing_name, format_name, run_bytes,
    valid_bitmap_chains, without,
};
use crate::chain::{Chain, Layer};
use crate::driver::{FormatDriver, LayerMap, Precision};
use crate::error::{Error, Result};
use crate::qcow2::Mapping;

/// Pulls layer `index` (≥ 1) into the layer above it: every range the layer maps itself and the
/// layer above does not is copied up, then the layer above is pointed at the layer's own backing
/// file. Returns the chain without the layer; its file stays as it is.
pub fn pull_into_above(chain: &Arc<Chain>, index: usize, progress: Progress) -> Result<Arc<Chain>> {
    let above = index.checked_sub(1).ok_or_else(|| {
        invalid(
            chain,
            index,
            "the top image is not a layer that can be deleted",
        )
    })?;
    let Layer::Qcow2(above_image) = chain.layers[above].as_ref() else {
        return Err(invalid(
            chain,
            above,
            "a raw layer cannot have a backing file",
        ));
    };
    let changed = snapshots_reading_through(chain, above, index..index + 1)?;
    if !changed.is_empty() {
        return Err(refusal(
            chain,
            above,
            &changed,
            "delete those snapshots first, or commit the layer instead",
        ));
    }
    let _access = WriteAccess::acquire(chain, above)?;
    let mut into = LayerWriter::take(chain, above)?;
    // Ordering: the layer above reads through to this one where it gets the data, so the data
    // is durable before each entry that maps it (a crash leaves the old mapping or the copy);
    // all of it before the header names the new backing file (`set_backing_locked`).
    into.order_as_copy();
    let runs = source_runs(chain, index)?;
    let total = run_bytes(&runs);
    let above_l1 = above_image.active_l1();
    let mut done = 0;
    let mut buf = Vec::new();
    for run in runs {
        let (offset, len, zero) = match run {
            Run::Data { offset, len } => (offset, len, false),
            Run::Zero { offset, len } => (offset, len, true),
        };
        // Only where the layer above shows through to this one.
        let mut pos = offset;
        while pos < offset + len {
            let mapping = above_image.map(&above_l1, pos, offset + len - pos)?;
            let n = mapping.len().max(1);
            if let Mapping::Unallocated { .. } = mapping {
                // What the layer above reads there already: no bitmap changes.
                if zero {
                    into.zero_unchanged(pos, n)?;
                } else {
                    buf.resize(n as usize, 0);
                    crate::view::read_chain(chain, index, &mut buf, pos)?;
                    into.write_unchanged(&buf, pos)?;
                }
            }
            pos += n;
        }
        done += len;
        progress(done, total);
    }
    // The layer's part of each bitmap chain that runs through it moves up with its data: merged
    // into the same bitmap of the layer above, where the chain is valid from there (none is
    // created: a bitmap the layer above lacks starts no chain).
    let through: Vec<_> = valid_bitmap_chains(chain, index)
        .into_iter()
        .filter(|b| {
            valid_bitmap_chains(chain, above)
                .iter()
                .any(|a| a.name == b.name)
        })
        .collect();
    into.merge_bitmaps(&through)?;
    into.flush()?;
    let (name, format) = match chain.layers.get(index + 1) {
        Some(below) => (
            Some(backing_name(
                above_image.path(),
                above_image.backing_file().as_deref(),
                below.path(),
            )),
            Some(format_name(below).to_owned()),
        ),
        None => (None, None),
    };
    let (_, w) = into
        .qcow2()
        .ok_or_else(|| invalid(chain, above, "a raw layer cannot have a backing file"))?;
    above_image.set_backing_locked(w, name, format)?;
    Ok(without(chain, index))
}

/// What layer `index` maps itself: for qcow2 its data and zero clusters; for a raw file (always
/// the bottom) its data, as holes read as zeros with or without it.
fn source_runs(chain: &Chain, index: usize) -> Result<Vec<Run>> {
    match chain.layers[index].as_ref() {
        Layer::Qcow2(image) => allocated_runs(image),
        Layer::Raw(raw) => {
            let mut runs = Vec::new();
            let mut pos = 0;
            while pos < raw.size() {
                let (map, len) = raw.map(None, pos, raw.size() - pos, Precision::Holes)?;
                if let LayerMap::Stored(_) = map {
                    let mut at = pos;
                    while at < pos + len {
                        let n = super::STEP.min(pos + len - at);
                        runs.push(Run::Data { offset: at, len: n });
                        at += n;
                    }
                }
                pos += len.max(1);
            }
            Ok(runs)
        }
    }
}

/// Reverts the live disk to layer `index` (≥ 1): the top is emptied, resized to the layer's
/// size and pointed at the layer; the layers between leave the chain (their files stay).
pub fn revert_to_layer(chain: &Arc<Chain>, index: usize) -> Result<Arc<Chain>> {
    if index == 0 || index >= chain.layers.len() {
        return Err(invalid(chain, 0, "not a layer below the top"));
    }
    let top = chain.top_image();
    let target = chain.layers[index].clone();
    // What the live disk stops reading: everything the top and the layers that leave map
    // themselves (the bitmaps record it as changed, as for an internal revert).
    let mut changed = Vec::new();
    for layer in &chain.layers[..index] {
        if let Layer::Qcow2(image) = layer.as_ref() {
            changed.extend(allocated_runs(image)?);
        }
    }
    let mut w = top.writer()?;
    for run in changed {
        let (Run::Data { offset, len } | Run::Zero { offset, len }) = run;
        top.mark_changed_locked(&mut w, offset, len);
    }
    top.empty_locked(&mut w)?;
    let size = target.virtual_size();
    if size != top.virtual_size() {
        if top.header().version < 3 && !top.snapshots().is_empty() {
            return Err(invalid(
                chain,
                0,
                "a version 2 image with snapshots cannot be resized",
            ));
        }
        // The top holds nothing now, so a smaller size loses nothing.
        top.resize_locked(&mut w, size)?;
    }
    let name = backing_name(top.path(), top.backing_file().as_deref(), target.path());
    top.set_backing_locked(&mut w, Some(name), Some(format_name(&target).to_owned()))?;
    let mut layers = vec![chain.layers[0].clone()];
    layers.extend(chain.layers[index..].iter().cloned());
    Ok(Arc::new(chain.with_layers(layers)))
}

fn invalid(chain: &Chain, index: usize, reason: &str) -> Error {
    Error::Invalid {
        path: chain.layers[index].path().to_owned(),
        reason: reason.into(),
    }
}
