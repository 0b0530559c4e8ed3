//! Creating a new, empty qcow2 image (an overlay for an external snapshot), laid out as
//! `qemu-img create` lays it out: the header, the refcount table, refcount blocks covering the
//! metadata, then a zeroed L1 table.

use std::ffi::{CStr, CString, OsStr};
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use crate::qcow2::error::{Error, Result};
use crate::qcow2::header::{CompressionType, Header, incompatible};
use crate::qcow2::limits::{
    L1_ENTRY_SIZE, REFTABLE_ENTRY_SIZE, V2_HEADER_LENGTH, V3_HEADER_LENGTH,
};
use crate::qcow2::offsets::Geometry;
use crate::qcow2::refcount::write_entry;
use crate::qcow2::storage::{FileStorage, Storage};

/// Turns a newly created file into the storage its image is written through and then opened
/// with: a [`FileStorage`] (see [`plain_storage`]), locked, or wrapped by a caller (the
/// power-cut simulator records every write of the new file too).
pub type WrapNew<'a> = &'a dyn Fn(File) -> Result<Box<dyn Storage>>;

/// The plain [`WrapNew`]: the file as a [`FileStorage`] named `path`.
pub fn plain_storage(file: File, path: &Path) -> Result<Box<dyn Storage>> {
    FileStorage::new(file, path)
        .map(|s| Box::new(s) as Box<dyn Storage>)
        .map_err(|e| Error::io(format!("{}: cannot open", path.display()), e))
}

/// What a new image looks like.
#[derive(Debug, Clone)]
pub struct NewImage {
    pub size: u64,
    pub cluster_bits: u32,
    /// Backing file name as it is to be stored (relative to the new image's folder or absolute).
    pub backing_file: Option<String>,
    pub backing_format: Option<String>,
}

/// The format variant of a new image, as `qemu-img create -o compat=...,extended_l2=...,
/// refcount_bits=...` chooses it. Overlays are always the default (v3, standard L2 entries,
/// 16-bit refcounts: QEMU's defaults); the engine's own tests build the other variants in memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Variant {
    /// 2 (`compat=0.10`) or 3 (`compat=1.1`).
    pub version: u32,
    /// Extended L2 entries (incompatible bit 4): 32 subclusters per cluster. Version 3 only.
    pub extended_l2: bool,
    /// log2 of the refcount width in bits (`refcount_bits` = 1 << order); 4 in version 2.
    pub refcount_order: u32,
}

impl Default for Variant {
    fn default() -> Self {
        Variant {
            version: 3,
            extended_l2: false,
            // QEMU's default of 16 bits.
            refcount_order: 4,
        }
    }
}

/// Creates `path` (which must not exist) as an empty v3 qcow2 image, all or nothing (see
/// [`create_whole`]).
pub fn create(path: &Path, new: &NewImage) -> Result<Box<dyn Storage>> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let name = path.file_name().unwrap_or_default();
    let dir = File::open(dir)
        .map_err(|e| Error::io(format!("{}: cannot open its folder", path.display()), e))?;
    create_in(&dir, name, path, new, &|file| plain_storage(file, path))
}

/// Creates `name` in the open folder `dir` (`path` names it in messages) as [`create`] does:
/// only inside that folder, whatever its path names by now, and never over an existing file.
/// The image is written through the storage `wrap` makes of the new file, which is returned.
pub fn create_in(
    dir: &File,
    name: &OsStr,
    path: &Path,
    new: &NewImage,
    wrap: WrapNew,
) -> Result<Box<dyn Storage>> {
    let image = layout(path, new, Variant::default())?;
    create_whole(dir, name, path, &image, wrap)
}

/// The bytes of a new, empty image of `variant` (`path` names it in messages): the header, the
/// refcount table, refcount blocks covering the metadata, then a zeroed L1 table.
pub fn layout(path: &Path, new: &NewImage, variant: Variant) -> Result<Vec<u8>> {
    let cs = 1u64 << new.cluster_bits;
    let geometry = Geometry::new(new.cluster_bits, variant.extended_l2);
    let l1_entries = geometry.l1_entries_for(new.size).max(1);
    let l1_clusters = (l1_entries * L1_ENTRY_SIZE).div_ceil(cs);
    let per_block = (cs * 8) >> variant.refcount_order;
    // Metadata clusters: header, reftable, refblocks, L1. The refblocks must cover all of them,
    // the reftable all refblocks: grow the counts until they settle.
    let (mut reftable_clusters, mut refblocks) = (1u64, 1u64);
    loop {
        let total = 1 + reftable_clusters + refblocks + l1_clusters;
        let need_blocks = total.div_ceil(per_block);
        let need_table = (need_blocks * REFTABLE_ENTRY_SIZE).div_ceil(cs);
        if need_blocks == refblocks && need_table == reftable_clusters {
            break;
        }
        refblocks = need_blocks.max(refblocks);
        reftable_clusters = need_table.max(reftable_clusters);
    }
    let reftable_offset = cs;
    let refblocks_offset = reftable_offset + reftable_clusters * cs;
    let l1_offset = refblocks_offset + refblocks * cs;
    let total_clusters = 1 + reftable_clusters + refblocks + l1_clusters;

    let v3 = variant.version >= 3;
    let mut header = Header {
        version: variant.version,
        backing_file_offset: 0,
        backing_file_size: 0,
        cluster_bits: new.cluster_bits,
        size: new.size,
        crypt_method: 0,
        l1_size: l1_entries as u32,
        l1_table_offset: l1_offset,
        refcount_table_offset: reftable_offset,
        refcount_table_clusters: reftable_clusters as u32,
        nb_snapshots: 0,
        snapshots_offset: 0,
        incompatible_features: if variant.extended_l2 {
            incompatible::EXTENDED_L2
        } else {
            0
        },
        compatible_features: 0,
        autoclear_features: 0,
        refcount_order: variant.refcount_order,
        header_length: if v3 {
            V3_HEADER_LENGTH
        } else {
            V2_HEADER_LENGTH
        },
        compression_type: CompressionType::Deflate,
        unknown_header_bytes: Vec::new(),
        extensions: Vec::new(),
        backing_file: None,
        backing_format: None,
        feature_names: Vec::new(),
        bitmaps: None,
    };
    header.set_backing(new.backing_file.clone(), new.backing_format.clone());
    let mut image = header.encode().map_err(|source| Error::Header {
        path: path.to_owned(),
        source,
    })?;
    image.resize((total_clusters * cs) as usize, 0);
    for b in 0..refblocks {
        let entry = (reftable_offset + b * REFTABLE_ENTRY_SIZE) as usize;
        image[entry..entry + 8].copy_from_slice(&(refblocks_offset + b * cs).to_be_bytes());
    }
    for cluster in 0..total_clusters {
        let block = refblocks_offset + (cluster / per_block) * cs;
        let start = block as usize;
        let block_bytes = &mut image[start..start + cs as usize];
        write_entry(
            block_bytes,
            (cluster % per_block) as usize,
            variant.refcount_order,
            1,
        );
    }
    Ok(image)
}

/// Creates `path` holding `bytes`, all or nothing: the bytes are written (through the storage
/// `wrap` makes of the file) and flushed in a file without a name (`O_TMPFILE`), or under a
/// hidden temporary name where the file system has no such files, and only then linked to
/// `path`, which fails if `path` exists. A kill or power cut at any moment leaves no
/// half-written image under `path` (a retry would find the name taken and a file that is no
/// image); the fallback may leave its temporary file behind.
fn create_whole(
    dir: &File,
    name: &OsStr,
    path: &Path,
    bytes: &[u8],
    wrap: WrapNew,
) -> Result<Box<dyn Storage>> {
    let io = |what: &str, e| Error::io(format!("{}: {what}", path.display()), e);
    let unnamed = open_at(dir, c".", libc::O_RDWR | libc::O_TMPFILE);
    let storage = match unnamed {
        Ok(file) => {
            let storage = wrap(file)?;
            write_and_flush(storage.as_ref(), bytes).map_err(|e| io("cannot write", e))?;
            match link_unnamed(host_file(storage.as_ref())?, dir, name) {
                Ok(()) => storage,
                // No /proc to name the file by.
                Err(e)
                    if e.raw_os_error() == Some(libc::ENOENT)
                        && !Path::new("/proc/self/fd").exists() =>
                {
                    drop(storage);
                    create_via_temporary_name(dir, name, bytes, wrap)?
                }
                Err(e) => return Err(io("cannot create", e)),
            }
        }
        // No O_TMPFILE on this file system (or kernel): a temporary name.
        Err(e)
            if matches!(
                e.raw_os_error(),
                Some(libc::EOPNOTSUPP | libc::EISDIR | libc::EINVAL)
            ) =>
        {
            create_via_temporary_name(dir, name, bytes, wrap)?
        }
        Err(e) => return Err(io("cannot create", e)),
    };
    // The new name is durable before anything refers to it.
    dir.sync_all()
        .map_err(|e| io("cannot sync its folder", e))?;
    Ok(storage)
}

/// The host file of a new image's storage (to give it its name).
fn host_file(storage: &dyn Storage) -> Result<&File> {
    storage.host_file().ok_or_else(|| {
        Error::io(
            "a new image",
            std::io::Error::other("its storage has no host file to name"),
        )
    })
}

/// `openat(dir, name, flags | O_CLOEXEC, 0666)`.
fn open_at(dir: &File, name: &CStr, flags: i32) -> std::io::Result<File> {
    // SAFETY: a valid descriptor and a NUL-terminated name; the result is a new descriptor
    // that nothing else owns.
    let fd = unsafe {
        libc::openat(
            dir.as_raw_fd(),
            name.as_ptr(),
            flags | libc::O_CLOEXEC,
            0o666,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: see above.
    Ok(unsafe { File::from_raw_fd(fd) })
}

/// `linkat(from_dir, from, to_dir, to, flags)`, which fails with `EEXIST` if `to` exists.
fn link_at(
    from_dir: i32,
    from: &CStr,
    to_dir: &File,
    to: &CStr,
    flags: i32,
) -> std::io::Result<()> {
    // SAFETY: valid descriptors and NUL-terminated names that outlive the call.
    let rc = unsafe {
        libc::linkat(
            from_dir,
            from.as_ptr(),
            to_dir.as_raw_fd(),
            to.as_ptr(),
            flags,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// The image's bytes, made durable: the whole file is new, so one flush covers its data and
/// length (`fdatasync`); its name comes after, synced with its folder.
fn write_and_flush(storage: &dyn Storage, bytes: &[u8]) -> std::io::Result<()> {
    storage.write_at(bytes, 0)?;
    storage.flush()
}

/// Gives the `O_TMPFILE` file `file` the name `name` in `dir` (`EEXIST` if taken), through its
/// `/proc/self/fd` link, which needs no privilege (`AT_EMPTY_PATH` would).
fn link_unnamed(file: &File, dir: &File, name: &OsStr) -> std::io::Result<()> {
    let from = CString::new(format!("/proc/self/fd/{}", file.as_raw_fd()))?;
    let to = CString::new(name.as_bytes())?;
    link_at(libc::AT_FDCWD, &from, dir, &to, libc::AT_SYMLINK_FOLLOW)
}

/// The fallback of [`create_whole`]: a hidden file beside `name` in `dir`, created exclusively
/// (never through a symlink), written and flushed through `wrap`'s storage, hard-linked to
/// `name` (no-clobber), then removed.
fn create_via_temporary_name(
    dir: &File,
    name: &OsStr,
    bytes: &[u8],
    wrap: WrapNew,
) -> Result<Box<dyn Storage>> {
    let io = |what: &str, e| Error::io(format!("{}: {what}", name.to_string_lossy()), e);
    let stem = name.to_string_lossy();
    let temporary = CString::new(format!(".{stem}.snapfs-{}.tmp", std::process::id()))
        .map_err(|e| io("cannot create", e.into()))?;
    let unlink = || {
        // SAFETY: unlinkat of a NUL-terminated name in our folder.
        unsafe { libc::unlinkat(dir.as_raw_fd(), temporary.as_ptr(), 0) };
    };
    // One by this name can only be left by a killed process that had this process's id.
    unlink();
    let file = open_at(
        dir,
        &temporary,
        libc::O_RDWR | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW,
    )
    .map_err(|e| io("cannot create", e))?;
    let to = CString::new(name.as_bytes()).map_err(|e| io("cannot create", e.into()))?;
    let linked = wrap(file).and_then(|storage| {
        write_and_flush(storage.as_ref(), bytes).map_err(|e| io("cannot write", e))?;
        link_at(dir.as_raw_fd(), &temporary, dir, &to, 0).map_err(|e| io("cannot create", e))?;
        Ok(storage)
    });
    unlink();
    linked
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_image_parses_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("new.qcow2");
        let new = NewImage {
            size: 1 << 30,
            cluster_bits: 9,
            backing_file: Some("base.qcow2".into()),
            backing_format: Some("qcow2".into()),
        };
        create(&path, &new).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        let h = Header::parse(&bytes, bytes.len() as u64).unwrap();
        assert_eq!(h.size, 1 << 30);
        assert_eq!(h.backing_file.as_deref(), Some("base.qcow2"));
        assert_eq!(h.backing_format.as_deref(), Some("qcow2"));
        // 512-byte clusters: a 1 GiB disk needs 32768 L1 entries = 512 clusters of L1.
        assert_eq!(h.l1_size, 32768);
        assert!(
            create(&path, &new).is_err(),
            "an existing file is never overwritten"
        );
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["new.qcow2"], "nothing else is left in the folder");
    }

    /// The path for file systems without `O_TMPFILE`: the same result, no temporary file left,
    /// and a taken name refused without touching the file that has it.
    #[test]
    fn temporary_name_fallback() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("new.qcow2");
        let folder = File::open(dir.path()).unwrap();
        let name = OsStr::new("new.qcow2");
        let wrap = |file| plain_storage(file, &path);
        let storage = create_via_temporary_name(&folder, name, b"first", &wrap).unwrap();
        let mut read = vec![0u8; 5];
        storage.read_at(&mut read, 0).unwrap();
        assert_eq!(read, b"first");
        let taken = create_via_temporary_name(&folder, name, b"second", &wrap).unwrap_err();
        let Error::Io { source, .. } = taken else {
            panic!("not an I/O error: {taken}");
        };
        assert_eq!(source.raw_os_error(), Some(libc::EEXIST));
        assert_eq!(std::fs::read(&path).unwrap(), b"first");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}
