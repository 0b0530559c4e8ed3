//! `pull [BASE]`: copy into the top all data it reads from the layers above BASE, then make BASE
//! (default: nothing) the top's backing file, as `virsh blockpull --base BASE` and
//! `qemu-img rebase -b BASE` do.
//!
//! Order, for a process killed at any moment: the data moves first (the top then holds copies of
//! what it read through anyway, so the live disk reads the same), then one header write switches
//! the backing file. The layers that leave the chain are never written. Guest writes go on
//! between steps: each step takes the top's writer and copies only what the top still leaves
//! unallocated, so a guest write is never overwritten by older data from below.

use std::sync::Arc;

use super::dependents::{refusal, snapshots_reading_through};
use super::{
    LayerWriter, Progress, Run, STEP, backing_name, flush_layer, format_name, run_bytes,
    valid_bitmap_chains,
};
use crate::chain::{Chain, Layer};
use crate::driver::{FormatDriver, LayerMap, Precision};
use crate::error::{Error, Result};
use crate::qcow2::Mapping;

/// Pulls layers `1 .. base` (`base`: the index of the layer that becomes the top's backing file;
/// `None`: every layer, the top then stands alone) into the top. Returns the chain afterwards:
/// the top over `base` and the layers below it.
pub fn pull(chain: &Arc<Chain>, base: Option<usize>, progress: Progress) -> Result<Arc<Chain>> {
    let count = chain.layers.len();
    let until = base.unwrap_or(count);
    if until == 0 || until > count {
        return Err(Error::Invalid {
            path: chain.top().path().to_owned(),
            reason: format!("layer {until} is not below the top (the chain has {count} files)"),
        });
    }
    if until == 1 {
        progress(0, 0);
        return Ok(chain.clone());
    }
    let changed = snapshots_reading_through(chain, 0, 1..until)?;
    if !changed.is_empty() {
        return Err(refusal(
            chain,
            0,
            &changed,
            "delete those snapshots first, or pull onto a lower BASE that leaves them unchanged",
        ));
    }
    let top = chain.top_image();
    let runs = pulled_runs(chain, until)?;
    let total = run_bytes(&runs);
    let mut done = 0;
    let mut buf = Vec::new();
    for run in runs {
        let (offset, len, zero) = match run {
            Run::Data { offset, len } => (offset, len, false),
            Run::Zero { offset, len } => (offset, len, true),
        };
        let mut into = LayerWriter::take(chain, 0)?;
        // The top's view reads these ranges through to the pulled layers until its entries
        // map them: the copied data must be durable before those entries (a crash leaves
        // either), as for a delete of a layer.
        into.order_as_copy();
        // What the top still leaves to the layers below (a guest write may have filled some).
        let l1 = top.active_l1();
        let mut pos = offset;
        while pos < offset + len {
            let mapping = top.map(&l1, pos, offset + len - pos)?;
            let n = mapping.len().clamp(1, offset + len - pos);
            if let Mapping::Unallocated { .. } = mapping {
                if zero {
                    into.zero_unchanged(pos, n)?;
                } else {
                    buf.resize(n as usize, 0);
                    crate::view::read_chain(chain, 1, &mut buf, pos)?;
                    into.write_unchanged(&buf, pos)?;
                }
            }
            pos += n;
        }
        drop(into);
        done += len;
        progress(done, total);
    }
    flush_layer(chain.top())?;
    // What the guest reads did not change, so no bitmap of the top is marked; the pulled layers'
    // parts of each bitmap chain the top continues move up with their data (as for a delete of
    // a layer), so that no change a checkpoint recorded is lost.
    let continued = valid_bitmap_chains(chain, 0);
    let moved: Vec<_> = (1..until)
        .flat_map(|k| valid_bitmap_chains(chain, k))
        .filter(|b| continued.iter().any(|t| t.name == b.name))
        .collect();
    LayerWriter::take(chain, 0)?.merge_bitmaps(&moved)?;
    let (name, format) = match chain.layers.get(until) {
        Some(new_backing) => (
            Some(backing_name(
                top.path(),
                top.backing_file().as_deref(),
                new_backing.path(),
            )),
            Some(format_name(new_backing).to_owned()),
        ),
        None => (None, None),
    };
    let mut w = top.writer()?;
    top.set_backing_locked(&mut w, name, format)?;
    let mut layers = vec![chain.layers[0].clone()];
    layers.extend(chain.layers[until..].iter().cloned());
    Ok(Arc::new(chain.with_layers(layers)))
}

/// What the top must copy: the guest ranges it leaves unallocated where layers `1 .. until`
/// decide what it reads. Data the top reads from them becomes `Data` runs (at most [`STEP`]
/// bytes each); zeros they decide (zero clusters, or the end of a layer smaller than the disk)
/// become `Zero` runs where the new backing file could show something else.
fn pulled_runs(chain: &Chain, until: usize) -> Result<Vec<Run>> {
    let top = chain.top_image();
    let size = top.virtual_size();
    let l1 = top.active_l1();
    let mut runs = Vec::new();
    let mut pos = 0;
    while pos < size {
        let mapping = top.map(&l1, pos, size - pos)?;
        let n = mapping.len().clamp(1, size - pos);
        if let Mapping::Unallocated { .. } = mapping {
            decided_below(chain, 1, until, pos, n, &mut runs)?;
        }
        pos += n;
    }
    Ok(runs)
}

/// Adds the runs that layer `depth` (or one below it, before `until`) decides in `pos .. pos +
/// len`, as a read through the chain falls through unallocated clusters.
fn decided_below(
    chain: &Chain,
    depth: usize,
    until: usize,
    pos: u64,
    len: u64,
    runs: &mut Vec<Run>,
) -> Result<()> {
    if depth >= until {
        return Ok(());
    }
    let layer = &chain.layers[depth];
    let size = layer.virtual_size();
    let end = pos + len;
    let mut at = pos;
    while at < end.min(size) {
        let end = end.min(size);
        let (decided, n) = match layer.as_ref() {
            Layer::Qcow2(image) => {
                let m = image.map(&image.active_l1(), at, end - at)?;
                let n = m.len().clamp(1, end - at);
                let decided = match m {
                    Mapping::Data { .. } | Mapping::Compressed { .. } => Some(false),
                    Mapping::Zero { .. } => Some(true),
                    Mapping::Unallocated { .. } => None,
                };
                (decided, n)
            }
            Layer::Raw(raw) => {
                // Always the bottom (until is past it): its holes read as zeros either way.
                let (map, n) = raw.map(None, at, end - at, Precision::Holes)?;
                (
                    matches!(map, LayerMap::Stored(_)).then_some(false),
                    n.clamp(1, end - at),
                )
            }
        };
        match decided {
            Some(false) => push_data(runs, at, n),
            // Zeros decided here matter only where a backing file stays below.
            Some(true) if until < chain.layers.len() => push_zero(runs, at, n),
            Some(true) => {}
            None => decided_below(chain, depth + 1, until, at, n, runs)?,
        }
        at += n;
    }
    // Past this layer's end the old chain reads zeros; the new backing file may not.
    let new_size = chain.layers.get(until).map_or(0, |l| l.virtual_size());
    let zeros_from = size.max(pos);
    if end > zeros_from && zeros_from < new_size {
        push_zero(runs, zeros_from, end.min(new_size) - zeros_from);
    }
    Ok(())
}

fn push_data(runs: &mut Vec<Run>, offset: u64, len: u64) {
    let mut at = offset;
    while at < offset + len {
        let n = STEP.min(offset + len - at);
        match runs.last_mut() {
            Some(Run::Data { offset, len }) if *offset + *len == at && *len + n <= STEP => {
                *len += n
            }
            _ => runs.push(Run::Data { offset: at, len: n }),
        }
        at += n;
    }
}

fn push_zero(runs: &mut Vec<Run>, offset: u64, len: u64) {
    match runs.last_mut() {
        Some(Run::Zero { offset: o, len: l }) if *o + *l == offset => *l += len,
        _ => runs.push(Run::Zero { offset, len }),
    }
}
