//! Recording what commands did in libvirt's snapshot folder (`-o libvirt-write`), as libvirt
//! itself would (docs/libvirt.md): a new `NAME.xml` for a snapshot created, with the state, the
//! domain's inactive definition and a `<disk>` for every disk of the domain, the current mark
//! moved, the children of a deleted snapshot re-parented. The folder is untrusted input: every
//! file is read and written through `crate::libvirt`, which follows no symlink and creates files
//! exclusively.

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use super::{CommandError, Controller};
use crate::info::rfc3339;
use crate::libvirt::{Daemon, DiskSnapshotKind, DomainDefinition, DomainSnapshot, SnapshotDisk};
use crate::metadata::Metadata;

/// Where `-o libvirt-write` records: the snapshot folder and the domain's definition file.
#[derive(Debug, Clone)]
pub struct LibvirtWrite {
    /// `/var/lib/libvirt/qemu/snapshot/DOMAIN`.
    pub dir: PathBuf,
    /// `/etc/libvirt/qemu/DOMAIN.xml` unless `-o libvirt-domain=FILE` says otherwise.
    pub domain_file: PathBuf,
    /// The domain's name: the snapshot folder's.
    pub domain: String,
    /// Where a running libvirtd answers (`-o libvirt-uri=URI`, default `qemu:///system`).
    pub uri: String,
}

impl LibvirtWrite {
    /// The folder `dir`, and `domain_file` or else libvirt's place for the definition of the
    /// domain the folder is named after.
    pub fn new(dir: PathBuf, domain_file: Option<PathBuf>, uri: Option<String>) -> Self {
        let domain_file = domain_file.unwrap_or_else(|| default_domain_file(&dir));
        let domain = dir
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
        LibvirtWrite {
            dir,
            domain_file,
            domain,
            uri: uri.unwrap_or_else(|| "qemu:///system".into()),
        }
    }

    /// The running daemon that knows the domain, if any.
    pub(super) fn daemon(&self) -> Option<Daemon> {
        Daemon::connect(&self.uri, &self.domain)
    }
}

fn same_file(a: &Path, b: &Path) -> bool {
    let canonical = |p: &Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_owned());
    canonical(a) == canonical(b)
}

/// `/etc/libvirt/qemu/DOMAIN.xml` for the snapshot folder `.../snapshot/DOMAIN`.
pub fn default_domain_file(dir: &Path) -> PathBuf {
    let domain = dir.file_name().unwrap_or_default().to_string_lossy();
    Path::new("/etc/libvirt/qemu").join(format!("{domain}.xml"))
}

impl Controller {
    /// The domain's inactive definition: its file, else the `<domain>` of `parent` (the snapshot
    /// the new one is taken on top of). The second value says what was not found.
    fn domain_definition(
        &self,
        lv: &LibvirtWrite,
        parent: Option<&DomainSnapshot>,
    ) -> (Option<DomainDefinition>, Option<String>) {
        let from_file = match DomainDefinition::load_file(&lv.domain_file) {
            Ok(def) => return (Some(def), None),
            Err(e) => e,
        };
        let from_parent = parent.and_then(|p| {
            let text = p.domain.as_deref()?;
            DomainDefinition::from_snapshot_text(text, &p.source_file).ok()
        });
        match from_parent {
            Some(def) => (
                Some(def),
                Some(format!(
                    "{from_file}; the domain definition of the parent snapshot is used"
                )),
            ),
            None => (None, Some(from_file.to_string())),
        }
    }

    /// With `-o libvirt-write`, writes `NAME.xml` for a snapshot just created of the disk whose
    /// source is `image` (internal; external when `overlay` names the new top) and makes it
    /// libvirt's current snapshot. Returns a problem to report; the snapshot itself stands either
    /// way.
    pub(super) fn record_in_libvirt(
        &self,
        name: &str,
        description: Option<String>,
        image: &Path,
        overlay: Option<&Path>,
    ) -> Option<String> {
        let lv = self.libvirt.as_ref()?;
        let mut meta = self.catalog.metadata();
        let previous = meta.current().cloned();
        let now = SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        let kind = if overlay.is_some() {
            DiskSnapshotKind::External
        } else {
            DiskSnapshotKind::Internal
        };
        let this_disk = |name: String| SnapshotDisk {
            name,
            snapshot: kind.clone(),
            source_file: overlay.map(|p| p.to_owned()),
            driver_type: overlay.map(|_| "qcow2".to_owned()),
        };
        let (domain, mut problem) = self.domain_definition(lv, previous.as_ref());
        // The definition and the disk in it whose source is the mounted image.
        let matched = domain.and_then(|def| {
            let index = def
                .disks
                .iter()
                .position(|d| d.source.as_deref().is_some_and(|s| same_file(s, image)))?;
            Some((def, index))
        });
        let disks = match &matched {
            Some((def, mounted)) => {
                meta.disk_name = Some(def.disks[*mounted].target.clone());
                // libvirt pairs a snapshot's disks with the domain's by position; every disk but
                // the mounted one is left out of this snapshot, as `--diskspec DISK,snapshot=no`
                // records it.
                def.disks
                    .iter()
                    .enumerate()
                    .map(|(i, d)| {
                        if i == *mounted {
                            this_disk(d.target.clone())
                        } else {
                            SnapshotDisk {
                                name: d.target.clone(),
                                snapshot: DiskSnapshotKind::No,
                                source_file: None,
                                driver_type: None,
                            }
                        }
                    })
                    .collect()
            }
            None => {
                let why = problem.take().unwrap_or_else(|| {
                    format!(
                        "the domain definition has no disk whose source is {}",
                        image.display()
                    )
                });
                problem = Some(format!(
                    "{why}; written without <domain>, which virsh snapshot-revert refuses"
                ));
                vec![this_disk(
                    meta.disk_name.clone().unwrap_or_else(|| "vda".into()),
                )]
            }
        };
        let snap = DomainSnapshot {
            name: name.to_owned(),
            description,
            // snapfs writes an image only when no QEMU holds it: the domain is shut off.
            state: Some("shutoff".into()),
            parent: previous.as_ref().map(|p| p.name.clone()),
            creation_time: Some(now),
            current: true,
            memory: Some("no".into()),
            disks,
            domain: matched.map(|(def, _)| def.text),
            source_file: lv.dir.join(format!("{name}.xml")),
        };
        if let Some(daemon) = lv.daemon() {
            // libvirtd holds the metadata: it writes the file and moves "current" itself.
            if let Err(e) = crate::libvirt::check_writable(&snap)
                .map_err(|e| e.to_string())
                .and_then(|()| daemon.redefine(&crate::libvirt::to_xml(&snap), true))
            {
                return Some(format!("libvirt XML not recorded: {e}"));
            }
            drop(daemon);
            if overlay.is_some()
                && let Some(old_top) = self.catalog.chain().layers.get(1)
            {
                self.catalog
                    .name_layer(old_top.path().to_owned(), name.to_owned());
            }
            self.reload_metadata(lv);
            return problem.map(|p| format!("libvirt: {p}"));
        }
        if let Some(mut old) = previous {
            old.current = false;
            if let Err(e) = crate::libvirt::set_active_in_file(&old.source_file, false) {
                problem = Some(format!("libvirt XML of {} not updated: {e}", old.name));
            }
            meta.snapshots.insert(old.name.clone(), old);
        }
        if let Err(e) = crate::libvirt::write_atomically(&lv.dir, &snap) {
            return Some(format!("libvirt XML not written: {e}"));
        }
        if overlay.is_some()
            && let Some(old_top) = self.catalog.chain().layers.get(1)
        {
            let path = old_top.path();
            let key = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_owned());
            meta.layer_names.insert(key, name.to_owned());
        }
        meta.snapshots.insert(name.to_owned(), snap);
        self.catalog.set_metadata(meta);
        if let Err(e) = self.catalog.refresh() {
            log::warn!("refreshing views after writing libvirt XML: {e}");
        }
        problem.map(|p| format!("libvirt: {p}"))
    }

    /// Reads the folder again (after libvirtd wrote it) and applies it to the views.
    pub(super) fn reload_metadata(&self, lv: &LibvirtWrite) {
        let mut meta = Metadata::load(&lv.dir, &self.catalog.chain());
        meta.disk_name = meta.disk_name.or(self.catalog.metadata().disk_name);
        self.catalog.set_metadata(meta);
        if let Err(e) = self.catalog.refresh() {
            log::warn!("refreshing views after libvirtd wrote its metadata: {e}");
        }
    }

    /// With `-o libvirt-write`, refuses an external snapshot of `image` unless the domain
    /// definition file can be read and has a disk whose source is `image`: after the snapshot
    /// that disk must point at the new overlay (as `virsh snapshot-create-as --disk-only` does),
    /// or the domain would boot, read-write, the file that is now the overlay's backing file.
    pub(super) fn check_domain_disk(&self, image: &Path) -> Result<(), CommandError> {
        let Some(lv) = self.libvirt.as_ref() else {
            return Ok(());
        };
        let refuse = |why: String| {
            CommandError::new(
                libc::EINVAL,
                format!(
                    "{why}; an external snapshot must move the domain's disk to the new overlay \
                     (give the domain definition with -o libvirt-domain=FILE)"
                ),
            )
        };
        let def =
            DomainDefinition::load_file(&lv.domain_file).map_err(|e| refuse(e.to_string()))?;
        if def
            .disks
            .iter()
            .any(|d| d.source.as_deref().is_some_and(|s| same_file(s, image)))
        {
            Ok(())
        } else {
            Err(refuse(format!(
                "{}: no disk has {} as its source",
                lv.domain_file.display(),
                image.display()
            )))
        }
    }

    /// With `-o libvirt-write`, points the domain's disk whose source is `old` at `new` (the
    /// overlay an external snapshot made). Returns a problem to report.
    pub(super) fn move_domain_disk(&self, old: &Path, new: &Path) -> Option<String> {
        let lv = self.libvirt.as_ref()?;
        let moved = match lv.daemon() {
            Some(daemon) => daemon.domain_xml().and_then(|xml| {
                match crate::libvirt::with_disk_source(&xml, Path::new("libvirtd"), old, new) {
                    Ok(Some(text)) => daemon.define(&text),
                    Ok(None) => Err(format!(
                        "libvirtd: no disk has {} as its source",
                        old.display()
                    )),
                    Err(e) => Err(e.to_string()),
                }
            }),
            None => crate::libvirt::set_disk_source_in_file(&lv.domain_file, old, new)
                .map_err(|e| e.to_string()),
        };
        moved.err().map(|e| {
            format!(
                "libvirt: the domain's disk still points at {}: {e}",
                old.display()
            )
        })
    }

    /// With `-o libvirt-write`, makes `name` libvirt's current snapshot (after a revert to it, as
    /// `virsh snapshot-revert` does): the previous current one gets `<active>0</active>`, `name`
    /// `<active>1</active>`, nothing else in either file changes. Returns a problem to report.
    pub(super) fn make_current_in_libvirt(&self, name: Option<&str>) -> Option<String> {
        let (Some(lv), Some(name)) = (self.libvirt.as_ref(), name) else {
            return None;
        };
        if let Some(daemon) = lv.daemon() {
            let moved = daemon
                .snapshot_xml(name)
                .and_then(|xml| daemon.redefine(&xml, true));
            drop(daemon);
            self.reload_metadata(lv);
            return moved
                .err()
                .map(|e| format!("libvirt: current snapshot not moved: {e}"));
        }
        let mut meta = self.catalog.metadata();
        let mut problems = Vec::new();
        for snap in meta.snapshots.values_mut() {
            let want = snap.name == name;
            if snap.current != want {
                match crate::libvirt::set_active_in_file(&snap.source_file, want) {
                    Ok(()) => snap.current = want,
                    Err(e) => problems.push(format!("{}: {e}", snap.name)),
                }
            }
        }
        self.catalog.set_metadata(meta);
        if let Err(e) = self.catalog.refresh() {
            log::warn!("refreshing views after moving libvirt's current snapshot: {e}");
        }
        (!problems.is_empty()).then(|| {
            format!(
                "libvirt: current snapshot not moved: {}",
                problems.join("; ")
            )
        })
    }

    /// With `-o libvirt-write`, refuses a delete of snapshot `name` here when libvirt records
    /// it for other disks of the domain too: libvirt has one record for all of them (`virsh
    /// snapshot-delete` deletes every disk's part), and removing it for this disk's delete
    /// would leave the other disks' snapshots without it, unseen by virsh and in the way of the
    /// next snapshot of that name.
    pub(super) fn refuse_partial_delete(&self, name: Option<&str>) -> Result<(), CommandError> {
        let (Some(lv), Some(name)) = (self.libvirt.as_ref(), name) else {
            return Ok(());
        };
        let meta = self.catalog.metadata();
        let Some(snapshot) = meta.snapshots.get(name) else {
            return Ok(());
        };
        let others = self.other_disks_of(snapshot, meta.disk_name.as_deref());
        if others.is_empty() {
            return Ok(());
        }
        Err(CommandError::new(
            libc::EBUSY,
            format!(
                "libvirt records snapshot {name:?} of domain {} for disk(s) {} too; delete it for \
                 every disk at once: `virsh snapshot-delete {} {name:?}`, or \
                 control/delete at the top of `snapfs mount --domain {}`",
                lv.domain,
                others.join(", "),
                lv.domain,
                lv.domain
            ),
        ))
    }

    /// The disks other than this chain's that `snapshot` holds a snapshot of (internal or
    /// external). This chain's disk is the one whose source in the snapshot's domain
    /// definition is a file of the chain, else `known` (what the metadata says); if neither
    /// tells, a snapshot of one disk is taken as this one's.
    fn other_disks_of(&self, snapshot: &DomainSnapshot, known: Option<&str>) -> Vec<String> {
        let canonical = |p: &Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_owned());
        let chain = self.catalog.chain();
        let files: Vec<PathBuf> = chain.layers.iter().map(|l| canonical(l.path())).collect();
        let from_definition = snapshot
            .domain
            .as_deref()
            .and_then(|text| DomainDefinition::from_domain_text(text, &snapshot.source_file).ok())
            .and_then(|definition| {
                definition.disks.into_iter().find(|d| {
                    d.source
                        .as_deref()
                        .is_some_and(|source| files.contains(&canonical(source)))
                })
            })
            .map(|d| d.target);
        let taken: Vec<&SnapshotDisk> = snapshot
            .disks
            .iter()
            .filter(|d| {
                matches!(
                    d.snapshot,
                    DiskSnapshotKind::Internal | DiskSnapshotKind::External
                )
            })
            .collect();
        match from_definition.as_deref().or(known) {
            Some(this) => taken
                .iter()
                .filter(|d| d.name != this)
                .map(|d| d.name.clone())
                .collect(),
            None if taken.len() > 1 => taken.iter().map(|d| d.name.clone()).collect(),
            None => Vec::new(),
        }
    }

    /// With `-o libvirt-write`, removes the XML of a deleted snapshot the way libvirt does: its
    /// children take its parent, and if it was current, its parent becomes current.
    pub(super) fn forget_in_libvirt(&self, name: Option<&str>) {
        let (Some(lv), Some(name)) = (self.libvirt.as_ref(), name) else {
            return;
        };
        let dir = &lv.dir;
        if let Some(daemon) = lv.daemon() {
            // libvirtd re-parents the children and moves "current" as virsh does.
            if let Err(e) = daemon.forget(name) {
                self.note(format!("{} libvirt: {e}", rfc3339(SystemTime::now())));
            }
            drop(daemon);
            self.reload_metadata(lv);
            return;
        }
        let mut meta = self.catalog.metadata();
        let gone = meta.snapshots.remove(name);
        let parent = gone.as_ref().and_then(|g| g.parent.clone());
        let mut problems = Vec::new();
        if let Err(e) = crate::libvirt::remove(dir, name) {
            problems.push(format!("{name}.xml not removed: {e}"));
        }
        for child in meta.snapshots.values_mut() {
            if child.parent.as_deref() == Some(name) {
                child.parent = parent.clone();
                if let Err(e) =
                    crate::libvirt::set_parent_in_file(&child.source_file, parent.as_deref())
                {
                    problems.push(format!("{} not re-parented: {e}", child.name));
                }
            }
        }
        if gone.is_some_and(|g| g.current)
            && let Some(p) = parent.as_ref().and_then(|p| meta.snapshots.get_mut(p))
        {
            p.current = true;
            if let Err(e) = crate::libvirt::set_active_in_file(&p.source_file, true) {
                problems.push(format!("{} not made current: {e}", p.name));
            }
        }
        for problem in problems {
            self.note(format!("{} libvirt: {problem}", rfc3339(SystemTime::now())));
        }
        self.catalog.set_metadata(meta);
        if let Err(e) = self.catalog.refresh() {
            log::warn!("refreshing views after removing libvirt XML: {e}");
        }
    }
}
