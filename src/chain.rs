//! Opening a backing chain: the top qcow2 image, then each backing file in turn, qcow2 or raw.
//!
//! A relative backing file name is resolved against the directory of the image that names it
//! (not the current directory). The format comes from the backing-format header extension, else
//! from the qcow2 magic. A file that appears twice is a loop; a chain deeper than [`MAX_DEPTH`]
//! is refused.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::error::{ChainError, Error, Result};
use crate::qcow2::lock::LockMode;
use crate::qcow2::storage::{FileStorage, Storage};
use crate::qcow2::{Caches, OpenOptions, Qcow2Image};

/// The deepest chain snapfs opens. Real chains are a handful of layers; thousands are an attack.
pub const MAX_DEPTH: usize = 256;

const QCOW2_MAGIC: [u8; 4] = *b"QFI\xfb";

/// A raw backing file: every byte is guest data.
#[derive(Debug)]
pub struct RawImage {
    pub path: PathBuf,
    storage: Box<dyn Storage>,
    size: std::sync::atomic::AtomicU64,
}

impl RawImage {
    pub fn new(path: PathBuf, storage: Box<dyn Storage>, size: u64) -> Self {
        RawImage {
            path,
            storage,
            size: size.into(),
        }
    }

    pub fn storage(&self) -> &dyn Storage {
        self.storage.as_ref()
    }

    pub fn size(&self) -> u64 {
        self.size.load(std::sync::atomic::Ordering::Acquire)
    }

    pub fn read(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.storage
            .read_at(buf, offset)
            .map_err(|e| Error::io(format!("{}: read at {offset:#x}", self.path.display()), e))
    }

    /// Writes guest data (used when a commit lands in a raw backing file).
    pub fn write(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.storage
            .write_at(buf, offset)
            .map_err(|e| Error::io(format!("{}: write at {offset:#x}", self.path.display()), e))
    }

    /// Makes a range read as zeros, deallocating it where the file system can.
    pub fn zero(&self, offset: u64, len: u64) -> Result<()> {
        if self.storage.punch_hole(offset, len).is_ok() {
            return Ok(());
        }
        // No hole punching here (a block device, an old file system): write zeros.
        let zeros = vec![0u8; (1u64 << 20).min(len) as usize];
        let mut pos = offset;
        while pos < offset + len {
            let n = (offset + len - pos).min(zeros.len() as u64) as usize;
            self.write(&zeros[..n], pos)?;
            pos += n as u64;
        }
        Ok(())
    }

    /// Grows the file (a commit of a larger overlay into a smaller raw base).
    pub fn grow(&self, size: u64) -> Result<()> {
        self.storage
            .set_len(size)
            .map_err(|e| Error::io(format!("{}: resize to {size}", self.path.display()), e))?;
        self.size.store(size, std::sync::atomic::Ordering::Release);
        Ok(())
    }

    pub fn flush(&self) -> Result<()> {
        self.storage
            .flush()
            .map_err(|e| Error::io(format!("{}: flush", self.path.display()), e))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    Qcow2,
    Raw,
}

/// One file of the chain.
#[derive(Debug)]
pub enum Layer {
    Qcow2(Box<Qcow2Image>),
    Raw(RawImage),
}

impl Layer {
    pub fn path(&self) -> &Path {
        match self {
            Layer::Qcow2(q) => q.path(),
            Layer::Raw(r) => &r.path,
        }
    }

    pub fn virtual_size(&self) -> u64 {
        match self {
            Layer::Qcow2(q) => q.virtual_size(),
            Layer::Raw(r) => r.size(),
        }
    }

    pub fn format(&self) -> Format {
        match self {
            Layer::Qcow2(_) => Format::Qcow2,
            Layer::Raw(_) => Format::Raw,
        }
    }

    /// The layer's format driver: what the chain walker asks of it.
    pub fn driver(&self) -> &dyn crate::driver::FormatDriver {
        match self {
            Layer::Qcow2(q) => q.as_ref(),
            Layer::Raw(r) => r,
        }
    }

    /// The layer's storage: every read and write of the file's bytes goes through it.
    pub fn storage(&self) -> &dyn Storage {
        match self {
            Layer::Qcow2(q) => q.storage(),
            Layer::Raw(r) => r.storage(),
        }
    }

    /// The open host file behind the layer, for `fstat` and extended attributes of the image file
    /// (owner, mode, times, allocated size); `None` for a storage that is no host file. Never
    /// for reading or writing its bytes: those go through [`Layer::storage`].
    pub fn host_file(&self) -> Option<&File> {
        self.storage().host_file()
    }

    /// `fstat` of the host file behind the layer (`Unsupported` if there is none).
    pub fn host_metadata(&self) -> std::io::Result<std::fs::Metadata> {
        match self.host_file() {
            Some(file) => file.metadata(),
            None => Err(std::io::ErrorKind::Unsupported.into()),
        }
    }
}

/// Wraps the storage of every file a chain opens, and of the overlays chain operations create
/// for it (`create --external`): how a test records every write and flush, or fails chosen
/// ones, without any change to the engine. It gets the file's path and its [`FileStorage`].
pub type Interpose = Arc<dyn Fn(&Path, Box<dyn Storage>) -> Box<dyn Storage> + Send + Sync>;

/// The layers of a chain, top (the active image) first.
pub struct Chain {
    pub layers: Vec<Arc<Layer>>,
    interpose: Option<Interpose>,
}

impl std::fmt::Debug for Chain {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Chain")
            .field("layers", &self.layers)
            .field("interposed", &self.interpose.is_some())
            .finish()
    }
}

impl Chain {
    /// Opens the chain whose top is `top`, which must be a qcow2 image. Backing files that are not
    /// regular files are opened read-only (see [`Chain::open_with`]).
    pub fn open(top: &Path, caches: Arc<Caches>, options: OpenOptions) -> Result<Chain> {
        Self::open_layers(top, caches, options, false, None)
    }

    /// As [`Chain::open`]. On a writable mount, a backing file is opened for writing (commands
    /// that rearrange the chain write it) only if the open file is a regular file, or a block
    /// device when `write_devices` says so (`-o write_devices`); anything else stays read-only.
    pub fn open_with(
        top: &Path,
        caches: Arc<Caches>,
        options: OpenOptions,
        write_devices: bool,
    ) -> Result<Chain> {
        Self::open_layers(top, caches, options, write_devices, None)
    }

    /// [`Chain::open`], with every file's storage wrapped by `interpose` (see [`Interpose`]).
    pub fn open_interposed(
        top: &Path,
        caches: Arc<Caches>,
        options: OpenOptions,
        interpose: Interpose,
    ) -> Result<Chain> {
        Self::open_layers(top, caches, options, false, Some(interpose))
    }

    /// A chain of layers the caller opened itself (on storages of its choice).
    pub fn from_layers(layers: Vec<Arc<Layer>>) -> Chain {
        Chain {
            layers,
            interpose: None,
        }
    }

    /// Another arrangement of this chain's layers (after a chain operation), keeping how its
    /// files are reached.
    pub fn with_layers(&self, layers: Vec<Arc<Layer>>) -> Chain {
        Chain {
            layers,
            interpose: self.interpose.clone(),
        }
    }

    /// The storage a new file of this chain is reached through.
    pub fn interpose(&self, path: &Path, storage: Box<dyn Storage>) -> Box<dyn Storage> {
        match &self.interpose {
            Some(wrap) => wrap(path, storage),
            None => storage,
        }
    }

    fn open_layers(
        top: &Path,
        caches: Arc<Caches>,
        options: OpenOptions,
        write_devices: bool,
        interpose: Option<Interpose>,
    ) -> Result<Chain> {
        let wrap = |path: &Path, storage: FileStorage| -> Box<dyn Storage> {
            match &interpose {
                Some(wrap) => wrap(path, Box::new(storage)),
                None => Box::new(storage),
            }
        };
        let top_path = absolute(top)?;
        let mut seen = vec![canonical(&top_path)?];
        // The type first: opening a FIFO would wait for a writer forever.
        {
            use std::os::unix::fs::FileTypeExt;
            let kind = std::fs::metadata(&top_path)
                .map_err(|e| Error::io(format!("cannot open {}", top_path.display()), e))?
                .file_type();
            if !(kind.is_file() || kind.is_block_device()) {
                return Err(ChainError::NotAFile { path: top_path }.into());
            }
        }
        let file = open_file(&top_path, options.writable)
            .and_then(|file| FileStorage::new(file, &top_path))
            .map_err(|e| Error::io(format!("cannot open {}", top_path.display()), e))?;
        if !has_qcow2_magic(&file) {
            return Err(ChainError::NotQcow2 { path: top_path }.into());
        }
        let top_mode = if options.share {
            LockMode::SharedRead
        } else if options.writable {
            LockMode::ReadWrite
        } else {
            LockMode::ReadOnly
        };
        take_lock(&file, top_mode, options.lock)?;
        let storage = wrap(&top_path, file);
        let image = Qcow2Image::from_storage(&top_path, storage, caches.clone(), options)?;
        let mut layers = vec![Arc::new(Layer::Qcow2(Box::new(image)))];

        while let Some(Layer::Qcow2(overlay)) = layers.last().map(|l| l.as_ref()) {
            let Some(name) = overlay.header().backing_file.clone() else {
                break;
            };
            let overlay_path = overlay.path().to_owned();
            let format = overlay.header().backing_format.clone();
            if layers.len() >= MAX_DEPTH {
                return Err(ChainError::TooDeep {
                    path: top_path,
                    max: MAX_DEPTH,
                }
                .into());
            }
            let path = resolve_backing(&overlay_path, &name)?;
            let missing = |source| ChainError::BackingMissing {
                path: overlay_path.clone(),
                backing: name.clone(),
                source,
            };
            let real = std::fs::canonicalize(&path).map_err(missing)?;
            if seen.contains(&real) {
                return Err(ChainError::Loop {
                    path: overlay_path,
                    again: real,
                }
                .into());
            }
            seen.push(real);
            // The type first: opening a FIFO would wait for a writer forever.
            {
                use std::os::unix::fs::FileTypeExt;
                let kind = std::fs::metadata(&path).map_err(missing)?.file_type();
                if !(kind.is_file() || kind.is_block_device()) {
                    return Err(ChainError::BackingNotRegular {
                        path: overlay_path,
                        backing: name,
                    }
                    .into());
                }
            }
            // Backing files are read, and written only by commands that rearrange the chain (with
            // their locks upgraded for the time): a writable mount opens them read-write where the
            // file permits it.
            let file = open_backing(&path, options.writable, write_devices).map_err(missing)?;
            let meta = file.metadata().map_err(missing)?;
            {
                use std::os::unix::fs::FileTypeExt;
                let kind = meta.file_type();
                if !(kind.is_file() || kind.is_block_device()) {
                    return Err(ChainError::BackingNotRegular {
                        path: overlay_path,
                        backing: name,
                    }
                    .into());
                }
            }
            let file = FileStorage::new(file, &path).map_err(missing)?;
            let mode = if options.share {
                LockMode::SharedRead
            } else {
                LockMode::ReadOnly
            };
            take_lock(&file, mode, options.lock)?;
            let is_qcow2 = match format.as_deref() {
                Some("qcow2") => true,
                Some("raw") => false,
                None => has_qcow2_magic(&file),
                Some(other) => {
                    return Err(ChainError::UnsupportedBackingFormat {
                        path: overlay_path,
                        format: other.to_owned(),
                    }
                    .into());
                }
            };
            let size = file
                .len()
                .map_err(|e| Error::io(format!("{}: size", path.display()), e))?;
            let storage = wrap(&path, file);
            let layer = if is_qcow2 {
                Layer::Qcow2(Box::new(Qcow2Image::from_storage(
                    &path,
                    storage,
                    caches.clone(),
                    OpenOptions {
                        writable: false,
                        ..options
                    },
                )?))
            } else {
                Layer::Raw(RawImage::new(path, storage, size))
            };
            layers.push(Arc::new(layer));
        }
        Ok(Chain { layers, interpose })
    }

    pub fn top(&self) -> &Arc<Layer> {
        &self.layers[0]
    }

    /// Stores the persistent bitmaps of every image written to (a clean close; see
    /// `qcow2/bitmaps.rs`). Every image is tried; the first error is returned.
    pub fn store_bitmaps(&self) -> Result<()> {
        let mut first = Ok(());
        for layer in &self.layers {
            if let Layer::Qcow2(image) = layer.as_ref()
                && let Err(e) = image.store_bitmaps()
            {
                log::error!(
                    "{}: storing persistent bitmaps: {e}",
                    image.path().display()
                );
                if first.is_ok() {
                    first = Err(e);
                }
            }
        }
        first
    }

    /// libvirt's rule for a bitmap chain (`qemuBlockBitmapChainIsValid`), below layer `index`:
    /// the layers that have a bitmap of the name follow each other right under it (once a
    /// layer lacks it, a raw layer included, none further down has it), and each of them has
    /// it usable. `lookup` says what one qcow2 layer has: `Ok(None)` no bitmap of the name,
    /// `Ok(Some(_))` a usable one, `Err(reason)` one that is not (disabled, inconsistent).
    /// Returns what `lookup` found, top first, or why the chain is not valid.
    pub fn bitmap_chain_below<T>(
        &self,
        index: usize,
        mut lookup: impl FnMut(&Qcow2Image) -> std::result::Result<Option<T>, String>,
    ) -> std::result::Result<Vec<T>, String> {
        let mut found = Vec::new();
        let mut ended = false;
        for layer in self.layers.iter().skip(index + 1) {
            let Layer::Qcow2(image) = layer.as_ref() else {
                ended = true;
                continue;
            };
            match lookup(image)? {
                None => ended = true,
                Some(_) if ended => {
                    return Err(format!(
                        "{} has the bitmap, but a layer above it lacks it (a gap in the bitmap \
                         chain)",
                        image.path().display()
                    ));
                }
                Some(bitmap) => found.push(bitmap),
            }
        }
        Ok(found)
    }

    /// The top image (a chain's top is always qcow2: [`Chain::open`] refuses anything else).
    pub fn top_image(&self) -> &Qcow2Image {
        match self.layers[0].as_ref() {
            Layer::Qcow2(image) => image,
            Layer::Raw(_) => unreachable!("Chain::open only accepts a qcow2 top image"),
        }
    }
}

/// Takes QEMU's locks on an image file; they last as long as the file stays open.
fn take_lock(file: &FileStorage, mode: LockMode, wanted: bool) -> Result<()> {
    if !wanted {
        return Ok(());
    }
    let lock = file.lock(mode)?;
    if let Some(warning) = lock.warning() {
        log::warn!("{warning}");
    }
    Ok(())
}

/// Opens a backing file read-only, without blocking (a FIFO swapped in after the type check
/// would wait for a writer forever); then, if `writable` and the open file is a regular file (or
/// a block device and `write_devices`), reopens that same file read-write through its
/// descriptor, so that what the path names by then does not matter. Stays read-only where the
/// file's permissions refuse writing.
fn open_backing(path: &Path, writable: bool, write_devices: bool) -> std::io::Result<File> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)?;
    // SAFETY: fcntl on our own descriptor, clearing O_NONBLOCK for the reads to come.
    unsafe {
        let flags = libc::fcntl(file.as_raw_fd(), libc::F_GETFL);
        if flags >= 0 {
            libc::fcntl(file.as_raw_fd(), libc::F_SETFL, flags & !libc::O_NONBLOCK);
        }
    }
    let kind = file.metadata()?.file_type();
    if !(writable && (kind.is_file() || (write_devices && kind.is_block_device()))) {
        return Ok(file);
    }
    match open_file(
        Path::new(&format!("/proc/self/fd/{}", file.as_raw_fd())),
        true,
    ) {
        Ok(rw) => Ok(rw),
        Err(e) => {
            log::debug!("{}: stays read-only: {e}", path.display());
            Ok(file)
        }
    }
}

fn open_file(path: &Path, writable: bool) -> std::io::Result<File> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(writable)
        .open(path)
}

fn has_qcow2_magic(file: &FileStorage) -> bool {
    let mut magic = [0u8; 4];
    file.read_at(&mut magic, 0).is_ok() && magic == QCOW2_MAGIC
}

fn absolute(path: &Path) -> Result<PathBuf> {
    std::path::absolute(path)
        .map_err(|e| Error::io(format!("cannot resolve {}", path.display()), e))
}

fn canonical(path: &Path) -> Result<PathBuf> {
    std::fs::canonicalize(path).map_err(|e| Error::io(format!("cannot open {}", path.display()), e))
}

/// Resolves a backing file name as QEMU does for plain file names: relative to the directory of
/// the overlay. Protocol and `json:` names are refused.
fn resolve_backing(overlay: &Path, name: &str) -> Result<PathBuf> {
    if name.starts_with("json:") || (name.contains("://") && !name.starts_with('/')) {
        return Err(ChainError::UnsupportedBackingFormat {
            path: overlay.to_owned(),
            format: format!("protocol in backing file name {name:?}"),
        }
        .into());
    }
    let name = Path::new(name.strip_prefix("file:").unwrap_or(name));
    if name.is_absolute() {
        return Ok(name.to_owned());
    }
    let dir = overlay.parent().unwrap_or(Path::new("/"));
    Ok(dir.join(name))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_backing_names_resolve_against_the_overlay() {
        let p = resolve_backing(Path::new("/vm/disks/top.qcow2"), "base.qcow2").unwrap();
        assert_eq!(p, Path::new("/vm/disks/base.qcow2"));
        let p = resolve_backing(Path::new("/vm/disks/top.qcow2"), "../b/base.raw").unwrap();
        assert_eq!(p, Path::new("/vm/disks/../b/base.raw"));
        let p = resolve_backing(Path::new("/vm/top.qcow2"), "/abs/base").unwrap();
        assert_eq!(p, Path::new("/abs/base"));
        let p = resolve_backing(Path::new("/vm/top.qcow2"), "file:base").unwrap();
        assert_eq!(p, Path::new("/vm/base"));
        assert!(resolve_backing(Path::new("/vm/top.qcow2"), "json:{}").is_err());
        assert!(resolve_backing(Path::new("/vm/top.qcow2"), "nbd://host/x").is_err());
    }
}
