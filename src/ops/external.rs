//! `create NAME --external [FILE]`: a new qcow2 overlay becomes the live top and the old top
//! becomes a read-only layer, as `virsh snapshot-create-as --disk-only` does.

use std::ffi::OsStr;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::chain::{Chain, Layer};
use crate::error::Result;
use crate::qcow2::create::{NewImage, create_in};
use crate::qcow2::lock::LockMode;
use crate::qcow2::storage::FileStorage;
use crate::qcow2::{OpenOptions, Qcow2Image};

/// Where the overlay goes: FILE (relative to the top's folder), else `TOP-DIR/TOP-STEM.NAME.qcow2`.
pub fn overlay_path(top: &Path, name: &str, file: Option<&str>) -> PathBuf {
    let dir = top.parent().unwrap_or(Path::new("/"));
    match file {
        Some(f) => dir.join(f),
        None => {
            let stem = top
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default();
            dir.join(format!("{stem}.{name}.qcow2"))
        }
    }
}

/// Creates the overlay `name` inside the open folder `dir` (its path is `path`) over the top of
/// `chain` and returns the new chain; an existing file of that name is never replaced (EEXIST).
/// Guest writes wait during the switch; any that still reach the old top afterwards are refused
/// there and retried on the new one.
pub fn create_external(
    chain: &Arc<Chain>,
    dir: &File,
    name: &OsStr,
    path: &Path,
) -> Result<Arc<Chain>> {
    let top = chain.top_image();
    let mut writes_wait = top.writer()?;
    // libvirt's rule: the overlay gets an empty recording bitmap for each recording, consistent
    // bitmap of the old top; the old top, read-only from here on, stores its bitmaps now (and
    // they are durable with everything else it holds before the overlay is made).
    let carried = top.recording_bitmaps();
    top.store_bitmaps_locked(&mut writes_wait)?;
    top.flush_locked(&mut writes_wait)?;
    let top_path = top.path();
    let backing = super::backing_name(path, None, top_path);
    let new = NewImage {
        size: top.virtual_size(),
        cluster_bits: top.geometry().cluster_bits,
        backing_file: Some(backing),
        backing_format: Some("qcow2".into()),
    };
    // The new file is written through the storage it is opened with (locked first, as QEMU
    // locks an image it creates; interposed like every file of the chain).
    let wrap = |file| {
        let storage = FileStorage::new(file, path).map_err(|e| {
            crate::qcow2::error::Error::io(format!("{}: cannot open", path.display()), e)
        })?;
        let lock = storage.lock(LockMode::ReadWrite)?;
        if let Some(warning) = lock.warning() {
            log::warn!("{warning}");
        }
        Ok(chain.interpose(path, Box::new(storage)))
    };
    let storage = create_in(dir, name, path, &new, &wrap)?;
    let opened = {
        let options = OpenOptions {
            writable: true,
            lock: true,
            share: false,
        };
        Qcow2Image::from_storage(path, storage, top.caches(), options).and_then(|image| {
            image.add_bitmaps_like(&carried)?;
            // Durable before the overlay joins the chain.
            image.flush()?;
            Ok(image)
        })
    };
    let overlay = match opened {
        Ok(image) => image,
        Err(e) => {
            // Nothing points at the new file yet: take it away again.
            if let Ok(c_name) = std::ffi::CString::new(name.as_bytes()) {
                // SAFETY: unlinkat of a NUL-terminated name in the open folder.
                unsafe { libc::unlinkat(dir.as_raw_fd(), c_name.as_ptr(), 0) };
            }
            return Err(e);
        }
    };
    let mut layers = vec![Arc::new(Layer::Qcow2(Box::new(overlay)))];
    layers.extend(chain.layers.iter().cloned());
    // From here the old top is a backing layer: guest writes that resolved the old chain are
    // refused on it and retried on the new top; chain operations still write into it through
    // its writer (see `Controller::switch_chain` for what outlives the switch).
    top.retire();
    if let Err(e) = top.storage().unlock_writing() {
        log::warn!("{e}");
    }
    drop(writes_wait);
    Ok(Arc::new(chain.with_layers(layers)))
}
