//! `snapfs mount --domain NAME MOUNTPOINT`: every disk of a libvirt domain in one mount. The
//! domain's definition comes from the running libvirtd (`-o libvirt-uri=URI`) or else from its
//! file (`-o libvirt-domain=FILE`, default `/etc/libvirt/qemu/NAME.xml`); each disk snapfs can
//! snapshot is opened as a one-image mount would open it, with libvirt metadata on (`-o
//! libvirt=DIR`, default `/var/lib/libvirt/qemu/snapshot/NAME`, written unless read-only), and
//! served under `MOUNTPOINT/TARGET/` by one FUSE session ([`crate::fs::domain`]).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::control::{DomainController, LibvirtWrite, MountedDisk};
use crate::fs::domain::{DiskTree, DomainFs, MAX_DISKS, disk_base};
use crate::libvirt::{Daemon, DomainDefinition, DomainDisk};
use crate::mount::{MountSettings, fuse_config, open_disk, run_session};

/// What a domain mount does with one disk of the definition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DiskPlan {
    /// Mounted under its target's name.
    Mount { target: String, image: PathBuf },
    /// Not mounted, and why (snapshots record it as `snapshot='no'`).
    Skip { target: String, why: String },
}

/// What a domain mount does with each disk of `definition`, in its order. Read-only disks,
/// CD-ROMs, floppies, empty drives and disks without a file or device source (network disks)
/// are left out, as libvirt leaves them out of every snapshot. Fails on a target that cannot be
/// a directory name or that two disks share.
pub fn plan(definition: &DomainDefinition) -> Result<Vec<DiskPlan>, String> {
    let mut seen = std::collections::HashSet::new();
    let mut out = Vec::new();
    for disk in &definition.disks {
        let target = disk.target.clone();
        let bad = target.is_empty()
            || target == "."
            || target == ".."
            || target == "control"
            || target.contains('/')
            || target.contains('\0');
        if bad {
            return Err(format!(
                "the domain has a disk whose <target dev> {target:?} cannot be a directory name"
            ));
        }
        if !seen.insert(target.clone()) {
            return Err(format!(
                "two disks of the domain have <target dev='{target}'>"
            ));
        }
        out.push(match (&disk.source, skip_reason(disk)) {
            (Some(image), None) => DiskPlan::Mount {
                target,
                image: image.clone(),
            },
            (_, Some(why)) => DiskPlan::Skip { target, why },
            (None, None) => DiskPlan::Skip {
                target,
                why: "no source".into(),
            },
        });
    }
    Ok(out)
}

fn skip_reason(disk: &DomainDisk) -> Option<String> {
    if !disk.never_snapshotted() {
        return None;
    }
    Some(match () {
        _ if disk.device == "cdrom" || disk.device == "floppy" => {
            format!("a {}, never part of a snapshot", disk.device)
        }
        _ if disk.source.is_none() => {
            "no file or block device source (an empty drive or a network disk)".into()
        }
        _ => "read-only, never part of a snapshot".into(),
    })
}

/// The domain's definition: from the daemon at `uri` if it knows the domain, else from `file`.
fn definition(name: &str, uri: &str, file: &Path) -> Result<DomainDefinition, String> {
    if let Some(daemon) = Daemon::connect(uri, name) {
        let xml = daemon.domain_xml()?;
        return DomainDefinition::from_domain_text(&xml, Path::new("libvirtd"))
            .map_err(|e| e.to_string());
    }
    DomainDefinition::load_file(file).map_err(|e| {
        format!("domain {name}: libvirtd at {uri} does not know it, and its definition: {e}")
    })
}

/// Mounts every disk of `settings.domain`; returns when the file system is unmounted.
pub fn mount(settings: MountSettings) -> Result<(), String> {
    let Some(name) = settings.domain.clone() else {
        return Err("no domain given".into());
    };
    if !settings.mountpoint.is_dir() {
        return Err(format!(
            "mount point {} is not a directory",
            settings.mountpoint.display()
        ));
    }
    let uri = settings
        .libvirt_uri
        .clone()
        .unwrap_or_else(|| "qemu:///system".into());
    let dir = settings
        .libvirt
        .clone()
        .unwrap_or_else(|| Path::new("/var/lib/libvirt/qemu/snapshot").join(&name));
    let domain_file = settings
        .libvirt_domain
        .clone()
        .unwrap_or_else(|| Path::new("/etc/libvirt/qemu").join(format!("{name}.xml")));
    let def = definition(&name, &uri, &domain_file)?;
    let plans = plan(&def)?;
    let mounted = plans
        .iter()
        .filter(|p| matches!(p, DiskPlan::Mount { .. }))
        .count();
    if mounted > MAX_DISKS {
        return Err(format!(
            "domain {name} has {mounted} disks to mount; at most {MAX_DISKS} are mounted at once"
        ));
    }
    let writable = !settings.read_only && !settings.force_share;
    let mut trees = Vec::new();
    let mut disks = Vec::new();
    let mut notifiers = Vec::new();
    let mut skipped = Vec::new();
    for p in plans {
        let (target, image) = match p {
            DiskPlan::Mount { target, image } => (target, image),
            DiskPlan::Skip { target, why } => {
                skipped.push(format!("{target}: not mounted: {why}"));
                continue;
            }
        };
        let disk_settings = MountSettings {
            image: image.clone(),
            libvirt: Some(dir.clone()),
            libvirt_write: writable,
            libvirt_domain: Some(domain_file.clone()),
            libvirt_uri: Some(uri.clone()),
            ..settings.clone()
        };
        let opened = open_disk(&disk_settings, disk_base(trees.len()))
            .map_err(|e| format!("{target} ({}): {e}", image.display()))?;
        if writable && !opened.writable {
            return Err(format!(
                "{target} ({}): can only be opened read-only; mount the domain with -r",
                image.display()
            ));
        }
        notifiers.push(opened.notifier);
        disks.push(MountedDisk {
            target: target.clone(),
            image,
            controller: opened.controller,
        });
        trees.push(DiskTree {
            name: target,
            fs: opened.fs,
        });
    }
    let mut lv = LibvirtWrite::new(dir, Some(domain_file), Some(uri));
    lv.domain = name.clone();
    let controller = Arc::new(DomainController::new(disks, def, lv, writable));
    let now = crate::info::rfc3339(std::time::SystemTime::now());
    for line in skipped {
        log::info!("domain {name}: {line}");
        controller.note(format!("{now} {line}"));
    }
    // SAFETY: geteuid and getegid have no preconditions.
    let (uid, gid) = unsafe { (libc::geteuid(), libc::getegid()) };
    let fs = DomainFs::new(
        trees,
        controller,
        settings.uid.unwrap_or(uid),
        settings.gid.unwrap_or(gid),
        writable,
    );
    let config = fuse_config(&settings, &name, !writable);
    run_session(fs, &settings, &config, &notifiers)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn def(disks: &str) -> DomainDefinition {
        let text = format!("<domain type='kvm'><name>vm</name><devices>{disks}</devices></domain>");
        DomainDefinition::from_domain_text(&text, Path::new("test")).unwrap()
    }

    #[test]
    fn writable_disks_are_mounted_the_others_skipped() {
        let d = def(
            "<disk type='file' device='disk'><source file='/a.qcow2'/><target dev='vda'/></disk>\
             <disk type='file' device='cdrom'><source file='/x.iso'/><target dev='sda'/><readonly/></disk>\
             <disk type='file' device='disk'><source file='/r.qcow2'/><target dev='vdc'/><readonly/></disk>\
             <disk type='network' device='disk'><source protocol='rbd' name='p/i'/><target dev='vdd'/></disk>\
             <disk type='file' device='cdrom'><target dev='sdb'/></disk>\
             <disk type='block' device='disk'><source dev='/dev/vg/b'/><target dev='vdb'/></disk>",
        );
        let p = plan(&d).unwrap();
        let mounted: Vec<&str> = p
            .iter()
            .filter_map(|p| match p {
                DiskPlan::Mount { target, .. } => Some(target.as_str()),
                DiskPlan::Skip { .. } => None,
            })
            .collect();
        assert_eq!(mounted, ["vda", "vdb"]);
        let skipped: Vec<&str> = p
            .iter()
            .filter_map(|p| match p {
                DiskPlan::Skip { target, .. } => Some(target.as_str()),
                DiskPlan::Mount { .. } => None,
            })
            .collect();
        assert_eq!(skipped, ["sda", "vdc", "vdd", "sdb"]);
        assert!(
            matches!(&p[1], DiskPlan::Skip { why, .. } if why.contains("cdrom")),
            "{p:?}"
        );
    }

    #[test]
    fn targets_that_cannot_be_directory_names_are_refused() {
        for target in ["control", "..", "a/b", ""] {
            let d = def(&format!(
                "<disk type='file' device='disk'><source file='/a'/><target dev='{target}'/></disk>"
            ));
            assert!(plan(&d).is_err(), "{target:?}");
        }
        let twice = def(
            "<disk device='disk'><source file='/a'/><target dev='vda'/></disk>\
             <disk device='disk'><source file='/b'/><target dev='vda'/></disk>",
        );
        assert!(plan(&twice).unwrap_err().contains("vda"));
    }
}
