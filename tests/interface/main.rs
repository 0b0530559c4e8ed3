//! What users and other programs meet: the command line and mount helper, libvirt metadata, permissions and control-file input.
//!
//! One test binary per area (link time): each file is a module.

#[path = "../common/mod.rs"]
mod common;

mod cli_help;
mod cli_mount_helper;
mod libvirt_changes;
mod libvirt_domain;
mod libvirt_folder;
mod libvirt_info;
mod libvirt_model;
mod libvirt_virsh;
mod libvirt_write;
mod perm_control_input;
mod perm_modes;
mod perm_names;
mod trust;
