//! The commands of a domain mount (`snapfs mount --domain NAME`): `MOUNTPOINT/control/create`
//! takes one libvirt snapshot of every mounted disk of the domain, all or none; `revert` and
//! `delete` act on every disk and record once, as `virsh snapshot-revert` / `snapshot-delete`
//! do. Each disk's tag
//! is taken by that disk's own [`Controller`] (its checks, its catalog), then one
//! `<domainsnapshot>` naming every disk is recorded, through the running libvirtd if there is one
//! (libvirt 9.0 refuses, while it runs, an internal snapshot of one disk of a multi-disk domain:
//! only a snapshot of every writable disk is accepted), else as a file in libvirt's folder. If one
//! disk fails, or libvirt refuses the record, the tags already taken are removed again and no XML
//! is left.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::SystemTime;

use super::execute::Record;
use super::status::{LoggedCommand, StatusLog};
use super::{
    Command, CommandError, CommandKind, Context, Controller, Effect, LibvirtWrite, Target,
};
use crate::access::Caller;
use crate::info::rfc3339;
use crate::libvirt::{DiskSnapshotKind, DomainDefinition, DomainSnapshot, SnapshotDisk};

/// A disk of the domain that is mounted: its directory's name (the `<target dev>`), its image
/// and the controller of its tree.
pub struct MountedDisk {
    pub target: String,
    pub image: PathBuf,
    pub controller: Arc<Controller>,
}

/// Runs the domain-wide commands, one at a time, and keeps their outcomes.
pub struct DomainController {
    disks: Vec<MountedDisk>,
    /// The domain's inactive definition when mounted: which disks it has, in libvirt's order.
    definition: DomainDefinition,
    libvirt: LibvirtWrite,
    writable: bool,
    running: parking_lot::Mutex<()>,
    status: StatusLog,
}

impl DomainController {
    pub fn new(
        disks: Vec<MountedDisk>,
        definition: DomainDefinition,
        libvirt: LibvirtWrite,
        writable: bool,
    ) -> Self {
        DomainController {
            disks,
            definition,
            libvirt,
            writable,
            running: parking_lot::Mutex::new(()),
            status: StatusLog::default(),
        }
    }

    pub fn disks(&self) -> &[MountedDisk] {
        &self.disks
    }

    /// Adds a line to the domain's status log.
    pub fn note(&self, line: String) {
        self.status.note(line);
    }

    /// What the top-level `control/status` shows.
    pub fn status_text(&self) -> String {
        self.status.text()
    }

    /// Parses and runs a command written to the top-level `control/KIND` (`create`, `revert` or
    /// `delete`) by `caller`; `is_open[i]` tells whether a file of disk `i`'s tree is open.
    /// Returns what changed in each disk's tree, in the order of [`DomainController::disks`].
    pub fn run(
        &self,
        kind: CommandKind,
        input: &[u8],
        caller: &Caller,
        is_open: &[&dyn Fn(Target) -> bool],
    ) -> Result<Vec<Effect>, CommandError> {
        let _one_at_a_time = self.running.lock();
        let (command, logged) = LoggedCommand::parse(kind, input);
        let result = command.and_then(|c| match c {
            Command::Revert { name } => self.on_every_disk(&name, caller, is_open, Action::Revert),
            Command::Delete { name } => self.on_every_disk(&name, caller, is_open, Action::Delete),
            c => self.create_everywhere(c, caller),
        });
        let targets: Vec<&str> = self.disks.iter().map(|d| d.target.as_str()).collect();
        let on = format!("on {}", targets.join(", "));
        let outcome = result.as_ref().map(|_| Some(on.as_str()));
        for disk in &self.disks {
            disk.controller.note(logged.line(" (domain)", outcome));
        }
        self.note(logged.line("", outcome));
        result
    }

    /// Reverts every disk to snapshot `name`, or deletes it from every disk, then records that
    /// once in libvirt (its current snapshot moved, or its metadata gone). Every disk must have
    /// the snapshot and pass its checks first; neither can be undone, so a disk that fails after
    /// others succeeded is reported with the disks already done.
    fn on_every_disk(
        &self,
        name: &str,
        caller: &Caller,
        is_open: &[&dyn Fn(Target) -> bool],
        action: Action,
    ) -> Result<Vec<Effect>, CommandError> {
        if !self.writable {
            return Err(CommandError::new(
                libc::EROFS,
                "the mount is read-only; remount read-write to change snapshots",
            ));
        }
        let mut libvirt_name = None;
        for disk in &self.disks {
            disk.controller
                .may_change(caller)
                .map_err(|e| on_disk(&disk.target, e))?;
            let (_, entry) = disk
                .controller
                .find(name)
                .map_err(|e| on_disk(&disk.target, e))?;
            libvirt_name = libvirt_name.or(entry.libvirt_name.clone());
        }
        let _held: Vec<_> = self.disks.iter().map(|d| d.controller.hold()).collect();
        let mut effects = Vec::with_capacity(self.disks.len());
        let label = format!("delete {}", super::quote_name(name));
        for (i, disk) in self.disks.iter().enumerate() {
            let never_open = |_: Target| false;
            let cx = Context {
                caller,
                is_open: is_open.get(i).copied().unwrap_or(&never_open),
            };
            let done = match action {
                Action::Revert => disk.controller.revert(name, &cx, Record::Not),
                Action::Delete => disk.controller.delete(name, &label, &cx, Record::Not),
            };
            match done {
                Ok(effect) => effects.push(effect),
                Err(e) => {
                    let done: Vec<&str> =
                        self.disks[..i].iter().map(|d| d.target.as_str()).collect();
                    let e = on_disk(&disk.target, e);
                    return Err(match done.is_empty() {
                        true => e,
                        false => CommandError::new(
                            e.errno,
                            format!("{}; already done on {}", e.message, done.join(", ")),
                        ),
                    });
                }
            }
        }
        let first = &self.disks[0].controller;
        match action {
            Action::Revert => {
                if let Some(problem) = first.make_current_in_libvirt(libvirt_name.as_deref()) {
                    self.note(format!("{} {problem}", rfc3339(SystemTime::now())));
                }
            }
            Action::Delete => first.forget_in_libvirt(libvirt_name.as_deref()),
        }
        for disk in &self.disks[1..] {
            disk.controller.reload_metadata(&self.libvirt);
        }
        Ok(effects)
    }

    fn create_everywhere(
        &self,
        command: Command,
        caller: &Caller,
    ) -> Result<Vec<Effect>, CommandError> {
        let (name, description) = match command {
            Command::Create { name, description } => (name, description),
            Command::CreateExternal { .. } => {
                return Err(CommandError::new(
                    libc::EINVAL,
                    "--external is not taken at the top of a domain mount; write it to a \
                     disk's control/create",
                ));
            }
            _ => return Err(CommandError::new(libc::EINVAL, "not a create command")),
        };
        if !self.writable {
            return Err(CommandError::new(
                libc::EROFS,
                "the mount is read-only; remount read-write to change snapshots",
            ));
        }
        if self.disks.is_empty() {
            return Err(CommandError::new(
                libc::EINVAL,
                "the domain has no mounted disk to take a snapshot of",
            ));
        }
        // Every disk's checks first, so that a refusal changes nothing at all.
        for disk in &self.disks {
            disk.controller
                .may_change(caller)
                .map_err(|e| on_disk(&disk.target, e))?;
        }
        let _held: Vec<_> = self.disks.iter().map(|d| d.controller.hold()).collect();
        let mut effects = Vec::with_capacity(self.disks.len());
        for disk in &self.disks {
            match disk.controller.create_tag(&name, description.clone()) {
                Ok(effect) => effects.push(effect),
                Err(e) => {
                    let e = on_disk(&disk.target, e);
                    return Err(self.roll_back(&name, effects, e));
                }
            }
        }
        if let Err(e) = self.record(&name, description) {
            return Err(self.roll_back(&name, effects, e));
        }
        for disk in &self.disks {
            disk.controller.reload_metadata(&self.libvirt);
        }
        Ok(effects)
    }

    /// Removes tag `name` from the disks that took it (the first `taken.len()`), and returns
    /// `error`, with what could not be undone added to it.
    fn roll_back(&self, name: &str, taken: Vec<Effect>, error: CommandError) -> CommandError {
        let mut left = Vec::new();
        for (disk, _) in self.disks.iter().zip(&taken) {
            if let Err(e) = disk.controller.remove_created_tag(name) {
                left.push(format!("{}: {}", disk.target, e.message));
            }
        }
        if left.is_empty() {
            let undone = taken.len();
            return CommandError::new(
                error.errno,
                format!(
                    "{}; nothing was kept ({undone} disk{} rolled back)",
                    error.message,
                    if undone == 1 { "" } else { "s" }
                ),
            );
        }
        CommandError::new(
            error.errno,
            format!(
                "{}; the snapshot could not be removed again from {}",
                error.message,
                left.join("; ")
            ),
        )
    }

    /// The definition to record: the daemon's or the domain file's now, else the one read at
    /// mount time.
    fn current_definition(&self, daemon: Option<&crate::libvirt::Daemon>) -> DomainDefinition {
        let now = match daemon {
            Some(d) => d.domain_xml().ok().and_then(|xml| {
                DomainDefinition::from_domain_text(&xml, std::path::Path::new("libvirtd")).ok()
            }),
            None => DomainDefinition::load_file(&self.libvirt.domain_file).ok(),
        };
        now.unwrap_or_else(|| self.definition.clone())
    }

    /// Records snapshot `name` of every mounted disk as libvirt's current one.
    fn record(&self, name: &str, description: Option<String>) -> Result<(), CommandError> {
        let meta = self.disks[0].controller.catalog().metadata();
        let previous = meta.current().cloned();
        let daemon = self.libvirt.daemon();
        let definition = self.current_definition(daemon.as_ref());
        let mounted = |target: &str| self.disks.iter().any(|d| d.target == target);
        let snap = DomainSnapshot {
            name: name.to_owned(),
            description,
            // snapfs writes images only while no QEMU holds them: the domain is shut off.
            state: Some("shutoff".into()),
            parent: previous.as_ref().map(|p| p.name.clone()),
            creation_time: Some(
                SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs() as i64),
            ),
            current: true,
            memory: Some("no".into()),
            disks: snapshot_disks(&definition, &mounted),
            domain: Some(definition.text.clone()),
            source_file: self.libvirt.dir.join(format!("{name}.xml")),
        };
        let failed = |e: String| CommandError::new(libc::EIO, format!("libvirt: {e}"));
        crate::libvirt::check_writable(&snap).map_err(|e| failed(e.to_string()))?;
        if let Some(daemon) = daemon {
            // libvirtd writes the file and moves "current" itself.
            return daemon
                .redefine(&crate::libvirt::to_xml(&snap), true)
                .map_err(failed);
        }
        crate::libvirt::write_atomically(&self.libvirt.dir, &snap)
            .map_err(|e| failed(format!("{name}.xml not written: {e}")))?;
        if let Some(old) = previous
            && let Err(e) = crate::libvirt::set_active_in_file(&old.source_file, false)
        {
            self.note(format!(
                "{} libvirt: {} not marked as no longer current: {e}",
                rfc3339(SystemTime::now()),
                old.name
            ));
        }
        Ok(())
    }
}

/// What [`DomainController::on_every_disk`] does.
#[derive(Debug, Clone, Copy)]
enum Action {
    Revert,
    Delete,
}

/// A command error with the disk it happened on in front.
fn on_disk(target: &str, e: CommandError) -> CommandError {
    CommandError::new(e.errno, format!("{target}: {}", e.message))
}

/// The `<disks>` of a snapshot of every disk `mounted` says is mounted: `internal` for those, and
/// for the others (read-only disks, CD-ROMs, empty drives, network disks) `snapshot='no'`, as
/// virsh records a disk it leaves out; in the definition's order (libvirt pairs them by
/// position).
pub fn snapshot_disks(
    definition: &DomainDefinition,
    mounted: &dyn Fn(&str) -> bool,
) -> Vec<SnapshotDisk> {
    definition
        .disks
        .iter()
        .map(|d| SnapshotDisk {
            name: d.target.clone(),
            snapshot: if mounted(&d.target) {
                DiskSnapshotKind::Internal
            } else {
                DiskSnapshotKind::No
            },
            source_file: None,
            driver_type: None,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_mounted_disk_is_internal_the_others_are_left_out_in_order() {
        let text = "<domain type='kvm'>\n  <name>vm</name>\n  <devices>\n    \
            <disk type='file' device='disk'><source file='/a.qcow2'/><target dev='vda'/></disk>\n    \
            <disk type='file' device='cdrom'><source file='/x.iso'/><target dev='sda'/><readonly/></disk>\n    \
            <disk type='file' device='disk'><source file='/b.qcow2'/><target dev='vdb'/></disk>\n  \
            </devices>\n</domain>\n";
        let def = DomainDefinition::from_domain_text(text, std::path::Path::new("t")).unwrap();
        let disks = snapshot_disks(&def, &|t| t != "sda");
        let got: Vec<(&str, &str)> = disks
            .iter()
            .map(|d| (d.name.as_str(), d.snapshot.as_str()))
            .collect();
        assert_eq!(
            got,
            [("vda", "internal"), ("sda", "no"), ("vdb", "internal")]
        );
        assert!(disks.iter().all(|d| d.source_file.is_none()));
    }
}
