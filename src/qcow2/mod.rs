//! The qcow2 format engine. It knows nothing of FUSE: it opens images, maps guest offsets to host
//! offsets and reads data.

pub mod header;
