//! The qcow2 format engine. It knows nothing of FUSE: it opens images, maps guest offsets to host
//! offsets and reads data.

pub mod bitmap;
pub mod bitmap_chain;
pub mod bitmaps;
pub mod cache;
mod cluster;
pub mod compress;
mod corrupt;
mod cow;
pub mod create;
pub mod error;
mod grow;
pub mod header;
pub mod image;
pub mod l1;
pub mod l2;
mod l2_writeback;
pub mod limits;
pub mod lock;
pub mod mapping;
pub mod offsets;
pub mod ordering;
mod overlap;
mod recent_l2;
pub mod refcount;
mod release;
pub mod snapshot;
pub mod snapshot_ops;
pub mod storage;
#[cfg(test)]
pub(crate) mod testing;
pub mod vm_state;
pub mod write;
mod write_behind;

pub use image::{Caches, OpenOptions, Qcow2Image};
pub use mapping::Mapping;
pub use offsets::{Geometry, GuestOffset, HostOffset};
