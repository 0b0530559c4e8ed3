//! Images for the crate's unit tests: laid out by `create::layout` and held in memory, so a
//! test of the engine or of the request logic above it needs no file, root or mount.

use std::path::Path;

use crate::qcow2::create::{NewImage, Variant, layout};
use crate::qcow2::storage::MemoryStorage;
use crate::qcow2::{Caches, OpenOptions, Qcow2Image};

/// A new empty, writable qcow2 v3 image of `size` bytes with 64 KiB clusters and 16-bit
/// refcounts, in memory, with a 1 MiB metadata cache and no lock.
pub(crate) fn memory_image(size: u64) -> Qcow2Image {
    let path = Path::new("/memory/disk.qcow2");
    let new = NewImage {
        size,
        cluster_bits: 16,
        backing_file: None,
        backing_format: None,
    };
    let variant = Variant {
        version: 3,
        extended_l2: false,
        refcount_order: 4,
    };
    let bytes = layout(path, &new, variant).expect("laying out the image");
    let options = OpenOptions {
        writable: true,
        lock: false,
        share: false,
    };
    let storage = Box::new(MemoryStorage::new(bytes));
    Qcow2Image::from_storage(path, storage, Caches::new(1 << 20), options)
        .expect("opening the image")
}
