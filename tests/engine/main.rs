//! The engine tier: the format engine on images in memory (`MemoryStorage`), with no root, no
//! FUSE mount and no QEMU, so that plain `cargo test` checks it. Each module is a property run
//! on every geometry of `support::SHAPES`; the tiers above (tests/read, write, chain,
//! interface) check the same behaviour through a mount, with qemu-img as the oracle.

mod ops;
mod snapshot_model;
mod support;
mod write_properties;
