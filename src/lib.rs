//! snapfs: every point in time of a qcow2 disk image chain as an ordinary file.

pub mod error;
pub mod qcow2;
