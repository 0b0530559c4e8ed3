//! Recording what commands did in libvirt's snapshot folder (`-o libvirt-write`), as libvirt
//! itself would: a new `NAME.xml` for a snapshot created, the current mark moved, the children
//! of a deleted snapshot re-parented. The folder is untrusted input: every file is read and
//! written through `crate::libvirt`, which follows no symlink and creates files exclusively.

use std::time::SystemTime;

use super::Controller;
use crate::info::rfc3339;

impl Controller {
    /// With `-o libvirt-write`, writes `NAME.xml` for a snapshot just created (external when
    /// `overlay` names the new top) and makes it libvirt's current snapshot. Returns a problem to
    /// report; the snapshot itself stands either way.
    pub(super) fn record_in_libvirt(
        &self,
        name: &str,
        description: Option<String>,
        overlay: Option<&std::path::Path>,
    ) -> Option<String> {
        use crate::libvirt::{DiskSnapshotKind, DomainSnapshot, SnapshotDisk};
        let dir = self.libvirt_dir.as_ref()?;
        let mut meta = self.catalog.metadata();
        let previous = meta.current().cloned();
        let now = SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        let disk = SnapshotDisk {
            name: meta.disk_name.clone().unwrap_or_else(|| "vda".into()),
            snapshot: if overlay.is_some() {
                DiskSnapshotKind::External
            } else {
                DiskSnapshotKind::Internal
            },
            source_file: overlay.map(|p| p.to_owned()),
            driver_type: overlay.map(|_| "qcow2".to_owned()),
        };
        let snap = DomainSnapshot {
            name: name.to_owned(),
            description,
            state: Some("disk-snapshot".into()),
            parent: previous.as_ref().map(|p| p.name.clone()),
            creation_time: Some(now),
            current: true,
            memory: Some("no".into()),
            disks: vec![disk],
            source_file: dir.join(format!("{name}.xml")),
        };
        let mut problem = None;
        if let Some(mut old) = previous {
            old.current = false;
            if let Err(e) = crate::libvirt::set_active_in_file(&old.source_file, false) {
                problem = Some(format!("libvirt XML of {} not updated: {e}", old.name));
            }
            meta.snapshots.insert(old.name.clone(), old);
        }
        if let Err(e) = crate::libvirt::write_atomically(dir, &snap) {
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
        problem
    }

    /// With `-o libvirt-write`, removes the XML of a deleted snapshot the way libvirt does: its
    /// children take its parent, and if it was current, its parent becomes current.
    pub(super) fn forget_in_libvirt(&self, name: Option<&str>) {
        let (Some(dir), Some(name)) = (self.libvirt_dir.as_ref(), name) else {
            return;
        };
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
