//! Operations across the layers of a chain, as `qemu-img commit`, `qemu-img rebase`,
//! `virsh blockcommit`/`blockpull` and `virsh snapshot-create-as --disk-only` do them: commit
//! (commit.rs), delete and revert of a layer (layers.rs), pull into the top (pull.rs), external
//! snapshots (external.rs); which internal snapshots an operation would change (dependents.rs).
//!
//! Each works on the mounted chain and returns the chain as it is afterwards. Data always moves
//! before any header changes, and a header change is one write: a process killed halfway leaves
//! every file consistent, and the live disk's content is never lost (a commit interrupted halfway
//! leaves the top still holding its data).

mod commit;
mod dependents;
pub mod external;
mod layers;
mod pull;

use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

pub use commit::commit;
pub use external::create_external;
pub use layers::{pull_into_above, revert_to_layer};
pub use pull::pull;

use crate::chain::{Chain, Layer, RawImage};
use crate::error::{Error, Result};
use crate::qcow2::bitmap_chain::RecordingBitmap;
use crate::qcow2::write::Writer;
use crate::qcow2::{Mapping, Qcow2Image};

/// Bytes moved per step (and between progress reports).
const STEP: u64 = 1 << 20;

/// Reports progress: bytes done, bytes in all.
pub type Progress<'a> = &'a dyn Fn(u64, u64);

/// A backing layer opened for writing for the time of one operation: its locks become
/// read-write (refused if another process uses the file) and go back to read-only afterwards.
/// The top image is always writable and needs none of this.
struct WriteAccess<'a> {
    layer: &'a Layer,
    restore: bool,
}

impl<'a> WriteAccess<'a> {
    fn acquire(chain: &'a Chain, index: usize) -> Result<Self> {
        let layer = chain.layers[index].as_ref();
        if index == 0 {
            return Ok(WriteAccess {
                layer,
                restore: false,
            });
        }
        layer.storage().lock_for_writing()?;
        let access = WriteAccess {
            layer,
            restore: true,
        };
        if let Layer::Qcow2(image) = layer {
            image.enable_writes()?;
        } else if !layer.storage().is_writable() {
            return Err(Error::ReadOnly {
                path: layer.path().to_owned(),
            });
        }
        Ok(access)
    }
}

impl Drop for WriteAccess<'_> {
    fn drop(&mut self) {
        if self.restore
            && let Err(e) = self.layer.storage().unlock_writing()
        {
            log::warn!("{e}");
        }
    }
}

/// The qcow2 image of layer `index`, for an operation on its internal snapshots.
fn qcow2_layer(chain: &Chain, index: usize) -> Result<&Qcow2Image> {
    let layer = chain.layers.get(index).ok_or_else(|| Error::Invalid {
        path: chain.top().path().to_owned(),
        reason: format!("the chain has no layer {index}"),
    })?;
    match layer.as_ref() {
        Layer::Qcow2(image) => Ok(image),
        _ => Err(Error::Invalid {
            path: layer.path().to_owned(),
            reason: "a raw layer has no internal snapshots".into(),
        }),
    }
}

/// Deletes internal snapshot `id` of layer `index` (a backing layer too, as
/// `virsh snapshot-delete` deletes a snapshot virsh took before a disk-only snapshot put a layer
/// above it): the layer's guest-visible content, and so every view reading through it, stays
/// as it was.
pub fn delete_internal(chain: &Chain, index: usize, id: &[u8]) -> Result<()> {
    let image = qcow2_layer(chain, index)?;
    let _access = WriteAccess::acquire(chain, index)?;
    image.delete_snapshot(id)
}

/// Makes internal snapshot `id` the active state of layer `index` (`qemu-img snapshot -a` on
/// that file, as `virsh snapshot-revert` does to a snapshot stored in a backing file).
pub fn apply_internal(chain: &Chain, index: usize, id: &[u8]) -> Result<()> {
    let image = qcow2_layer(chain, index)?;
    let _access = WriteAccess::acquire(chain, index)?;
    image.apply_snapshot(id)
}

/// A run of guest bytes that a layer maps itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Run {
    Data { offset: u64, len: u64 },
    Zero { offset: u64, len: u64 },
}

/// The runs `image` maps in its active state (data and zero clusters; unallocated ranges are
/// skipped), in guest order, data split into steps of at most [`STEP`] bytes.
fn allocated_runs(image: &Qcow2Image) -> Result<Vec<Run>> {
    let l1 = image.active_l1();
    let size = image.virtual_size();
    let mut runs = Vec::new();
    let mut pos = 0;
    while pos < size {
        let mapping = image.map(&l1, pos, size - pos)?;
        let len = mapping.len().max(1);
        match mapping {
            Mapping::Data { .. } | Mapping::Compressed { .. } => {
                let mut at = pos;
                while at < pos + len {
                    let n = STEP.min(pos + len - at);
                    match runs.last_mut() {
                        Some(Run::Data { offset, len })
                            if *offset + *len == at && *len + n <= STEP =>
                        {
                            *len += n
                        }
                        _ => runs.push(Run::Data { offset: at, len: n }),
                    }
                    at += n;
                }
            }
            Mapping::Zero { .. } => runs.push(Run::Zero { offset: pos, len }),
            Mapping::Unallocated { .. } => {}
        }
        pos += len;
    }
    Ok(runs)
}

fn run_bytes(runs: &[Run]) -> u64 {
    runs.iter()
        .map(|r| match r {
            Run::Data { len, .. } | Run::Zero { len, .. } => *len,
        })
        .sum()
}

/// Reads a layer's own bytes for a data run (data runs never fall through).
fn read_own(image: &Qcow2Image, buf: &mut [u8], offset: u64) -> Result<()> {
    let l1 = image.active_l1();
    image.read_through(&l1, buf, offset, &|chunk, _| {
        chunk.fill(0);
        Ok(())
    })
}

/// Layer `index` of a chain, held for writing by a chain operation for as long as it writes:
/// a qcow2 layer's writer is taken once and every change goes through the `*_locked` entry
/// points. Never the guest's entry points (`write_at`, `zero_range`, `grow`): those refuse an
/// image that is no longer the top (see [`external`]), and a chain operation writes into such
/// images by design (a commit of the top into the old top after an external create).
struct LayerWriter<'a> {
    chain: &'a Chain,
    index: usize,
    held: Held<'a>,
}

enum Held<'a> {
    Qcow2(&'a Qcow2Image, parking_lot::MutexGuard<'a, Writer>),
    Raw(&'a RawImage),
}

impl<'a> LayerWriter<'a> {
    /// Takes the writer of layer `index`. A backing layer must have been made writable first
    /// ([`WriteAccess`]).
    fn take(chain: &'a Chain, index: usize) -> Result<Self> {
        let held = match chain.layers[index].as_ref() {
            Layer::Qcow2(image) => Held::Qcow2(image, image.writer()?),
            Layer::Raw(raw) => Held::Raw(raw),
        };
        Ok(LayerWriter { chain, index, held })
    }

    /// The qcow2 image and its writer; `None` for a raw layer.
    fn qcow2(&mut self) -> Option<(&'a Qcow2Image, &mut Writer)> {
        match &mut self.held {
            Held::Qcow2(image, w) => Some((*image, &mut **w)),
            Held::Raw(_) => None,
        }
    }

    /// Writes data at guest `offset` (copy-on-write data comes from the layers below).
    fn write(&mut self, data: &[u8], offset: u64) -> Result<()> {
        let (chain, index) = (self.chain, self.index);
        let below = |buf: &mut [u8], pos: u64| crate::view::read_chain(chain, index + 1, buf, pos);
        match &mut self.held {
            Held::Qcow2(image, w) => image.write_locked(w, data, offset, &below),
            Held::Raw(raw) => raw.write(data, offset),
        }
    }

    /// Makes a range read as zeros.
    fn zero(&mut self, offset: u64, len: u64) -> Result<()> {
        let (chain, index) = (self.chain, self.index);
        let below = |buf: &mut [u8], pos: u64| crate::view::read_chain(chain, index + 1, buf, pos);
        let has_backing = chain.layers.len() > index + 1;
        match &mut self.held {
            Held::Qcow2(image, w) => image.zero_locked(w, offset, len, &below, has_backing),
            Held::Raw(raw) => raw.zero(offset, len),
        }
    }

    /// Writes bytes the layer's view already reads (a pull): no bitmap is marked.
    fn write_unchanged(&mut self, data: &[u8], offset: u64) -> Result<()> {
        let (chain, index) = (self.chain, self.index);
        let below = |buf: &mut [u8], pos: u64| crate::view::read_chain(chain, index + 1, buf, pos);
        match &mut self.held {
            Held::Qcow2(image, w) => image.write_unchanged_locked(w, data, offset, &below),
            Held::Raw(raw) => raw.write(data, offset),
        }
    }

    /// Makes a range that the layer's view already reads as zeros read as zeros itself (a pull).
    fn zero_unchanged(&mut self, offset: u64, len: u64) -> Result<()> {
        let (chain, index) = (self.chain, self.index);
        let below = |buf: &mut [u8], pos: u64| crate::view::read_chain(chain, index + 1, buf, pos);
        let has_backing = chain.layers.len() > index + 1;
        match &mut self.held {
            Held::Qcow2(image, w) => {
                image.zero_unchanged_locked(w, offset, len, &below, has_backing)
            }
            Held::Raw(raw) => raw.zero(offset, len),
        }
    }

    /// Merges `from` into the layer's bitmaps (see `qcow2/bitmap_chain.rs`) and, for a backing
    /// layer, stores its bitmaps now, while the operation still holds it for writing (the top's
    /// are stored at unmount). A raw layer has no bitmaps.
    fn merge_bitmaps(&mut self, from: &[RecordingBitmap]) -> Result<()> {
        let index = self.index;
        let Some((image, w)) = self.qcow2() else {
            return Ok(());
        };
        image.merge_bitmaps_locked(w, from)?;
        if index > 0 {
            image.store_bitmaps_locked(w)?;
        }
        Ok(())
    }

    /// Orders every write as a copy of what the disk shows (`Writer::order_as_copy`): the data
    /// is durable before the entries that map it, for a layer that shows other data there
    /// until then (a layer delete pulls data into the layer above the one deleted, whose view
    /// read through to it: a crash must leave either).
    fn order_as_copy(&mut self) {
        if let Held::Qcow2(_, w) = &mut self.held {
            w.order_as_copy(true);
        }
    }

    /// Makes everything written into the layer durable (with the writer held: the image's
    /// `flush_locked`, which also settles the deferred references and the reservation).
    fn flush(&mut self) -> Result<()> {
        match &mut self.held {
            Held::Qcow2(image, w) => Ok(image.flush_locked(w)?),
            Held::Raw(raw) => raw.flush(),
        }
    }

    /// Grows the layer's virtual disk to `size` (a commit of a larger overlay).
    fn grow(&mut self, size: u64) -> Result<()> {
        match &mut self.held {
            Held::Qcow2(image, w) => image.grow_locked(w, size),
            Held::Raw(raw) => raw.grow(size),
        }
    }
}

/// The bitmaps of layer `index` whose chain is valid as libvirt counts it
/// ([`Chain::bitmap_chain_below`]): recording and consistent in layer `index` and in every
/// layer below that continues its chain.
fn valid_bitmap_chains(chain: &Chain, index: usize) -> Vec<RecordingBitmap> {
    let Some(Layer::Qcow2(image)) = chain.layers.get(index).map(|l| l.as_ref()) else {
        return Vec::new();
    };
    let mut valid = image.recording_bitmaps();
    valid.retain(|b| {
        let below = chain.bitmap_chain_below(index, |below| {
            if !below.has_bitmap(&b.name) {
                Ok(None)
            } else if below.recording_bitmaps().iter().any(|r| r.name == b.name) {
                Ok(Some(()))
            } else {
                Err("not recording or not consistent".into())
            }
        });
        below.is_ok()
    });
    valid
}

fn flush_layer(layer: &Layer) -> Result<()> {
    match layer {
        Layer::Qcow2(image) => image.flush(),
        Layer::Raw(raw) => raw.flush(),
    }
}

impl Drop for LayerWriter<'_> {
    /// The writer goes back to ordinary ordering (the guest's, once the layer is the top), and
    /// a layer left unsettled by a failed operation is settled: its deferred references drop
    /// and its reservation goes back, so that a failed commit or layer delete leaks nothing
    /// (nothing else flushes a backing layer).
    fn drop(&mut self) {
        if let Held::Qcow2(image, w) = &mut self.held {
            w.order_as_copy(false);
            if image.has_unsettled(w)
                && let Err(e) = image.flush_locked(w)
            {
                log::warn!(
                    "{}: settling after a failed operation: {e}",
                    image.path().display()
                );
            }
        }
    }
}

/// The chain without layer `index`.
fn without(chain: &Chain, index: usize) -> Arc<Chain> {
    let mut layers = chain.layers.clone();
    layers.remove(index);
    Arc::new(chain.with_layers(layers))
}

/// The name to store in `overlay`'s header for backing file `target`: relative to the overlay's
/// folder when the old name was relative (as QEMU users keep chains movable), absolute otherwise.
fn backing_name(overlay: &Path, old_name: Option<&str>, target: &Path) -> String {
    let absolute = old_name.is_some_and(|n| Path::new(n).is_absolute());
    if !absolute
        && let (Some(from), Some(to_dir)) = (overlay.parent(), target.parent())
        && let Ok(from) = std::fs::canonicalize(from)
        && let Ok(to_dir) = std::fs::canonicalize(to_dir)
        && let Some(file) = target.file_name()
    {
        return relative_path(&from, &to_dir)
            .join(file)
            .display()
            .to_string();
    }
    target.display().to_string()
}

/// The path that leads from folder `from` to folder `to` (both absolute and canonical).
fn relative_path(from: &Path, to: &Path) -> PathBuf {
    let from: Vec<Component> = from.components().collect();
    let to: Vec<Component> = to.components().collect();
    let common = from.iter().zip(&to).take_while(|(a, b)| a == b).count();
    let mut path = PathBuf::new();
    for _ in common..from.len() {
        path.push("..");
    }
    for c in &to[common..] {
        path.push(c);
    }
    path
}

fn format_name(layer: &Layer) -> &'static str {
    match layer {
        Layer::Qcow2(_) => "qcow2",
        Layer::Raw(_) => "raw",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_paths() {
        assert_eq!(
            relative_path(Path::new("/vm"), Path::new("/vm")),
            PathBuf::new()
        );
        assert_eq!(
            relative_path(Path::new("/vm/a"), Path::new("/vm/b/c")),
            PathBuf::from("../b/c")
        );
        assert_eq!(
            relative_path(Path::new("/"), Path::new("/x")),
            PathBuf::from("x")
        );
    }

    #[test]
    fn backing_names_follow_the_old_style() {
        let dir = tempfile::tempdir().unwrap();
        let sub = dir.path().join("sub");
        std::fs::create_dir(&sub).unwrap();
        let overlay = dir.path().join("top.qcow2");
        let target = sub.join("base.qcow2");
        assert_eq!(
            backing_name(&overlay, Some("x.qcow2"), &target),
            "sub/base.qcow2"
        );
        assert_eq!(
            backing_name(&overlay, Some("/abs/x.qcow2"), &target),
            target.display().to_string()
        );
    }
}
