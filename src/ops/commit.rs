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

    if target_layer.virtual_size() < source.virtual_size() {
        into.grow(source.virtual_size())?;
    }
    let runs = allocated_runs(source)?;
    let total = run_bytes(&runs);
    let mut done = 0;
    let mut buf = Vec::new();
    for run in runs {
        match run {
            Run::Data { offset, len } => {
                buf.resize(len as usize, 0);
                read_own(source, &mut buf, offset)?;
                into.write(&buf, offset)?;
                done += len;
            }
            Run::Zero { offset, len } => {
                into.zero(offset, len)?;
                done += len;
            }
        }
        progress(done, total);
    }
    // libvirt's rule for commit: the committed layer's valid bitmaps merge into the base's.
    into.merge_bitmaps(&valid_bitmap_chains(chain, index))?;
    into.flush()?;
    drop(into);

    if let Some(w) = hold.as_mut() {
        source.empty_locked(w)?;
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
    above_image.set_backing_locked(&mut w, Some(name), Some(format_name(target_layer).into()))?;
    // Taking its writer marked its bitmaps in_use: a backing layer stores them before the
    // operation lets go of it (the top's are stored at unmount).
    if above > 0 {
        above_image.store_bitmaps_locked(&mut w)?;
    }
    Ok(without(chain, index))
}

fn invalid(chain: &Chain, index: usize, reason: &str) -> Error {
    Error::Invalid {
        path: chain.layers[index].path().to_owned(),
        reason: reason.into(),
    }
}
