//! Operations across the layers of a chain, as `qemu-img commit`, `qemu-img rebase`,
//! `virsh blockcommit`/`blockpull` and `virsh snapshot-create-as --disk-only` do them.
//!
//! Each works on the mounted chain and returns the chain as it is afterwards. Data always moves
//! before any header changes, and a header change is one write: a process killed halfway leaves
//! every file consistent, and the live disk's content is never lost (a commit interrupted halfway
//! leaves the top still holding its data).

mod commit;
pub mod external;
mod layers;

use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

pub use commit::commit;
pub use external::create_external;
pub use layers::{pull_into_above, revert_to_layer};

use crate::chain::{Chain, Layer};
use crate::error::{Error, Result};
use crate::qcow2::lock::{downgrade_to_read_only, upgrade_to_read_write};
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
        upgrade_to_read_write(layer.file(), layer.path())?;
        let access = WriteAccess {
            layer,
            restore: true,
        };
        if let Layer::Qcow2(image) = layer {
            image.enable_writes()?;
        } else if !is_open_for_writing(layer.file()) {
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
            && let Err(e) = downgrade_to_read_only(self.layer.file(), self.layer.path())
        {
            log::warn!("{e}");
        }
    }
}

fn is_open_for_writing(file: &std::fs::File) -> bool {
    // SAFETY: F_GETFL only reads the descriptor's flags.
    let flags = unsafe { libc::fcntl(std::os::fd::AsRawFd::as_raw_fd(file), libc::F_GETFL) };
    flags >= 0 && flags & libc::O_ACCMODE != libc::O_RDONLY
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

/// Writes data into layer `index` of `chain` (COW data comes from the layers below it).
fn write_into(
    chain: &Chain,
    index: usize,
    w: Option<&mut crate::qcow2::write::Writer>,
    data: &[u8],
    offset: u64,
) -> Result<()> {
    match chain.layers[index].as_ref() {
        Layer::Qcow2(image) => {
            let below =
                |buf: &mut [u8], pos: u64| crate::view::read_chain(chain, index + 1, buf, pos);
            match w {
                Some(w) => image.write_locked(w, data, offset, &below),
                None => image.write_at(data, offset, &below),
            }
        }
        Layer::Raw(raw) => raw.write(data, offset),
    }
}

/// Makes a range of layer `index` read as zeros.
fn zero_into(
    chain: &Chain,
    index: usize,
    w: Option<&mut crate::qcow2::write::Writer>,
    offset: u64,
    len: u64,
) -> Result<()> {
    match chain.layers[index].as_ref() {
        Layer::Qcow2(image) => {
            let below =
                |buf: &mut [u8], pos: u64| crate::view::read_chain(chain, index + 1, buf, pos);
            let has_backing = chain.layers.len() > index + 1;
            match w {
                Some(w) => image.zero_locked(w, offset, len, &below, has_backing),
                None => image.zero_range(offset, len, &below, has_backing),
            }
        }
        Layer::Raw(raw) => raw.zero(offset, len),
    }
}

fn flush_layer(layer: &Layer) -> Result<()> {
    match layer {
        Layer::Qcow2(image) => image.flush(),
        Layer::Raw(raw) => raw.flush(),
    }
}

/// The chain without layer `index`.
fn without(chain: &Chain, index: usize) -> Arc<Chain> {
    let mut layers = chain.layers.clone();
    layers.remove(index);
    Arc::new(Chain { layers })
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
