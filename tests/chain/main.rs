//! Chain operations (commit, pull, external create, layer delete, revert to a layer), QEMU's image
//! locks, VM state, and reading beside a running VM.
//!
//! One test binary per area (link time): each file is a module.

#[path = "../common/mod.rs"]
mod common;

mod chain_busy;
mod chain_crash;
mod chain_model;
mod chain_oracle;
mod chain_progress;
mod locks;
mod running_vm;
mod vmstate;
