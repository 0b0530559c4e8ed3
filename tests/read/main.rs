//! Read paths: every view against the oracle, holes, attributes, direct I/O, ext4 inside a snapshot, and images snapfs must refuse (bad headers, hostile tables and chains).
//!
//! One test binary per area (link time): each file is a module.

#[path = "../common/mod.rs"]
mod common;

mod attrs;
mod bad_images;
mod bitmap_format;
mod direct_io;
mod ext4_snapshot;
mod harness;
mod header_format;
mod holes;
mod hostile_chain;
mod hostile_regressions;
mod hostile_snapshots;
mod hostile_tables;
mod read_matrix;
