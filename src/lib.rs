//! snapfs: every point in time of a qcow2 disk image chain as an ordinary file.

pub mod access;
pub mod catalog;
pub mod chain;
pub mod changes;
pub mod checkpoints;
pub mod cli;
pub mod control;
pub mod domain_mount;
pub mod driver;
pub mod error;
pub mod folder;
pub mod fs;
pub mod info;
pub mod libvirt;
pub mod logging;
pub mod metadata;
pub mod mount;
pub mod ops;
pub mod qcow2;
pub mod report;
pub mod sharing;
pub mod view;
