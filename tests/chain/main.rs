//! Chain operations (commit, external create, layer delete, revert to a layer) and QEMU's image locks.
//!
//! One test binary per area (link time): each file is a module.

#[path = "../common/mod.rs"]
mod common;

mod chain_busy;
mod chain_crash;
mod chain_oracle;
mod chain_progress;
mod locks;
mod vmstate;
