//! `commit [LAYER]`: merge a layer into its backing file, as `qemu-img commit` does.

use std::sync::Arc;

use super::{
    LayerWriter, Progress, Run, WriteAccess, allocated_runs, backing_name, format_name, read_own,
    run_bytes, valid_bitmap_chains, without,
};
use crate::chain::{Chain, Layer};
use crate::error::{Error, Result};

/// Commits layer `index` of `chain` into the layer below it. For the top (index 0) the top is
/// emptied afterwards and the chain stays as it is; for an inner layer, the layer above is
/// re-pointed at the layer below and the committed layer leaves the chain (returned chain).
pub fn commit(chain: &Arc<Chain>, index: usize, progress: Progress) -> Result<Arc<Chain>> {
    let Some(Layer::Qcow2(source)) = chain.layers.get(index).map(|l| l.as_ref()) else {
        return Err(invalid(
            chain,
            index,
            "a raw layer has no backing file to commit into",
        ));
    };
    let target = index + 1;
    let Some(target_layer) = chain.layers.get(target) else {
        return Err(invalid(
            chain,
            index,
            "the layer has no backing file to commit into",
        ));
    };
    let _access = WriteAccess::acquire(chain, target)?;
    // Guest writes wait while the top is committed and emptied. Writers are taken top first.
    let mut hold = if index == 0 {
        Some(source.writer()?)
    } else {
        None
    };
    // The target may be an image that was the top once (an external create made it a backing
    // layer): its own writer, never the guest's entry points that refuse it.
    let mut into = LayerWriter::take(chain, target)?;
    let (layer_name, target_name) = (
        source.path().display().to_string(),
        target_layer.path().display().to_string(),
    );

    let mut copied = Copied::default();
    if let Err(e) = copy_into(chain, index, &mut into, progress, &mut copied) {
        let state = format!(
            "{layer_name} still holds all its data, so live.raw reads as before; \
             {target_name} holds part of it now (up to {} of {} copied), so {target_name} \
             on its own, and any other image backed by it, no longer reads as it did. \
             Free space (or fix the error) and run the commit again to finish it; until then \
             {layer_name} must stay in the chain",
            crate::report::human(copied.done),
            crate::report::human(copied.total)
        );
        return Err(stopped(e, state));
    }
    drop(into);
    let done = format!("{target_name} holds all of {layer_name}'s data (committed and flushed)");

    if let Some(w) = hold.as_mut() {
        source.empty_locked(w).map_err(|e| {
            stopped(
                e,
                format!(
                    "{done}; emptying {layer_name} failed, so it still holds its data too and \
                     live.raw reads as before. Run the commit again to empty it"
                ),
            )
        })?;
        return Ok(chain.clone());
    }
    // An inner layer: the layer above now skips it.
    let above = index - 1;
    let Layer::Qcow2(above_image) = chain.layers[above].as_ref() else {
        return Err(invalid(
            chain,
            above,
            "a raw layer cannot have a backing file",
        ));
    };
    let _above_access = WriteAccess::acquire(chain, above)?;
    let mut w = above_image.writer()?;
    let name = backing_name(
        above_image.path(),
        above_image.backing_file().as_deref(),
        target_layer.path(),
    );
    let above_name = above_image.path().display().to_string();
    above_image
        .set_backing_locked(&mut w, Some(name), Some(format_name(target_layer).into()))
        .map_err(|e| {
            stopped(
                e,
                format!(
                    "{done}; re-pointing {above_name} at {target_name} failed, so it still reads \
                     through {layer_name} and the disk reads as before. Run the commit again to \
                     finish it"
                ),
            )
        })?;
    // Taking its writer marked its bitmaps in_use: a backing layer stores them before the
    // operation lets go of it (the top's are stored at unmount).
    if above > 0 {
        above_image.store_bitmaps_locked(&mut w).map_err(|e| {
            stopped(
                e,
                format!(
                    "{done}, and {above_name} reads through {target_name} now (the commit is \
                     done on disk), but storing {above_name}'s bitmaps failed: they stay marked \
                     in use. Remount to see the new chain"
                ),
            )
        })?;
    }
    Ok(without(chain, index))
}

/// How far a copy got, for the message of a commit that stopped.
#[derive(Default)]
struct Copied {
    done: u64,
    total: u64,
}

/// The copy of layer `index`'s data into the layer below (`into`), flushed.
fn copy_into(
    chain: &Chain,
    index: usize,
    into: &mut LayerWriter,
    progress: Progress,
    copied: &mut Copied,
) -> Result<()> {
    let Some(Layer::Qcow2(source)) = chain.layers.get(index).map(|l| l.as_ref()) else {
        return Err(invalid(chain, index, "a raw layer has no data to commit"));
    };
    if chain.layers[index + 1].virtual_size() < source.virtual_size() {
        into.grow(source.virtual_size())?;
    }
    let runs = allocated_runs(source)?;
    copied.total = run_bytes(&runs);
    let mut buf = Vec::new();
    for run in runs {
        match run {
            Run::Data { offset, len } => {
                buf.resize(len as usize, 0);
                read_own(source, &mut buf, offset)?;
                into.write(&buf, offset)?;
                copied.done += len;
            }
            Run::Zero { offset, len } => {
                into.zero(offset, len)?;
                copied.done += len;
            }
        }
        progress(copied.done, copied.total);
    }
    // libvirt's rule for commit: the committed layer's valid bitmaps merge into the base's.
    into.merge_bitmaps(&valid_bitmap_chains(chain, index))?;
    into.flush()
}

fn stopped(source: Error, state: String) -> Error {
    Error::Stopped {
        source: Box::new(source),
        state,
    }
}

fn invalid(chain: &Chain, index: usize, reason: &str) -> Error {
    Error::Invalid {
        path: chain.layers[index].path().to_owned(),
        reason: reason.into(),
    }
}
