//! Write paths: live.raw writes from real clients, internal snapshot commands, crashes during both, stress and degraded hosts (ENOSPC, a vanished backing file, a shrunk image).
//!
//! One test binary per area (link time): each file is a module.

#[path = "../common/mod.rs"]
mod common;

mod bitmaps_checkpoints;
mod bitmaps_oracle;
mod degrade_backing_gone;
mod degrade_enospc;
mod degrade_shrink;
mod powercut;
mod snapshot_crash;
mod snapshot_errors;
mod snapshot_model;
mod snapshot_oracle;
mod stress_concurrency;
mod write_clients;
mod write_crash;
mod write_flags;
mod write_random;
mod write_snapshots;
