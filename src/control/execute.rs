//! Running a parsed command against the catalog: the checks (the mount is writable, the caller
//! may write what the command writes and read what it reads, nothing it changes is open), the
//! operation, and what changed.

use std::sync::Arc;

use super::{Command, CommandError, Controller, Effect, Target};
use crate::access::{self, Caller, READ, WRITE};
use crate::catalog::{Catalog, ViewEntry, ViewKind};
use crate::chain::Chain;

/// Whether a command records what it did in libvirt's metadata itself, or leaves that to a
/// domain-wide command that records once for every disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Record {
    InLibvirt,
    Not,
}

/// Who runs a command and how to ask whether a file is open.
pub struct Context<'a> {
    pub caller: &'a Caller,
    pub is_open: &'a dyn Fn(Target) -> bool,
}

/// Whether `target` is open, allowing a moment for a close that is on its way: the kernel tells
/// the file system about a close after `close()` has returned, so `cat X; echo X > delete` would
/// otherwise race.
fn still_open(target: Target, is_open: &dyn Fn(Target) -> bool) -> bool {
    for _ in 0..50 {
        if !is_open(target) {
            return false;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    is_open(target)
}

impl Controller {
    pub(super) fn execute(
        &self,
        command: Command,
        label: &str,
        cx: &Context,
    ) -> Result<Effect, CommandError> {
        self.may_change(cx.caller)?;
        match command {
            Command::Create { name, description } => self.create(&name, description),
            Command::CreateExternal { name, file } => {
                self.create_external(&name, file.as_deref(), cx.caller)
            }
            Command::Revert { name } => self.revert(&name, cx, Record::InLibvirt),
            Command::Delete { name } => self.delete(&name, label, cx, Record::InLibvirt),
            Command::Commit { layer } => self.commit(layer.as_deref(), label, cx),
            Command::Pull { base } => self.pull(base.as_deref(), label, cx),
        }
    }

    /// Refuses every command on a read-only mount, and to a caller who may not write the top
    /// image: every command changes it (its snapshots, its content, or its role).
    pub(super) fn may_change(&self, who: &Caller) -> Result<(), CommandError> {
        if !self.writable {
            return Err(CommandError::new(
                libc::EROFS,
                "the mount is read-only; remount read-write to change snapshots",
            ));
        }
        self.require(&self.catalog.chain(), who, &[(0, WRITE)])
    }

    /// Undoes [`Controller::create_tag`] of `name` (a domain snapshot that another disk could not
    /// take): the tag leaves the top image, its views go. Nothing was recorded in libvirt.
    pub(super) fn remove_created_tag(&self, name: &str) -> Result<Effect, CommandError> {
        let (key, entry) = self.find(name)?;
        let (ViewKind::Internal, Some(id), 0) =
            (entry.kind, entry.snapshot_id.clone(), entry.layer)
        else {
            return Err(CommandError::new(
                libc::EINVAL,
                format!("{name:?} is not an internal snapshot of the top image"),
            ));
        };
        let mut views = vec![(key, entry.clone())];
        views.extend(self.catalog.siblings(key));
        crate::ops::delete_internal(&self.catalog.chain(), 0, &id)?;
        for (k, _) in &views {
            self.catalog.remove(*k);
        }
        Ok(Effect {
            removed: views
                .iter()
                .map(|(k, v)| (*k, v.file_name.clone()))
                .collect(),
            ..Effect::default()
        })
    }

    /// Checks that `who` may do `want` to layer `index` of `chain`, for each `(index, want)`:
    /// EACCES naming the file if not, EROFS for a file snapfs does not write (a device).
    fn require(
        &self,
        chain: &Chain,
        who: &Caller,
        needs: &[(usize, u16)],
    ) -> Result<(), CommandError> {
        let perms = access::chain_perms(chain, self.devices);
        for &(index, want) in needs {
            if let (Some(layer), Some(file)) = (perms.get(index), chain.layers.get(index)) {
                access::require(layer, file.path(), who, want)
                    .map_err(|e| CommandError::new(e.errno(), e.to_string()))?;
            }
        }
        Ok(())
    }

    /// What a command that moves the data of layer `index` into `written` needs: reading every
    /// layer the moved data can come from (the layer's view: it and all below), writing each
    /// written layer.
    fn moves_data(chain: &Chain, index: usize, written: &[usize]) -> Vec<(usize, u16)> {
        (index..chain.layers.len())
            .map(|i| (i, READ))
            .chain(written.iter().map(|&w| (w, WRITE)))
            .collect()
    }

    /// A progress reporter that keeps `control/status`'s last line current.
    fn reporter<'a>(&'a self, label: &'a str) -> impl Fn(u64, u64) + 'a {
        move |done, total| {
            let percent = (done * 100).checked_div(total).unwrap_or(100);
            self.status.set_progress(Some(format!(
                "{label}: {percent}% ({} of {})",
                crate::report::human(done),
                crate::report::human(total)
            )));
        }
    }

    /// Switches the catalog to `chain` and says what changed.
    ///
    /// What may outlive a switch, and why commands still act on the right files:
    /// - The layers themselves. A chain is only an arrangement of shared `Arc<Layer>`s: the new
    ///   chain holds the same image objects (their writer, tables and caches) as the old one,
    ///   and an image may change role across a switch. After `create --external` the old top
    ///   is a backing layer but the same object, marked retired (`Qcow2Image::retire`): a
    ///   *guest* entry point (`write_at`, `zero_range`, `grow`) refuses it so that a guest
    ///   request still on its way to it is run again on the new top (`SnapFs::on_live`). A
    ///   retired image stays writable for chain operations (issue 21: a later commit writes
    ///   into it as the layer below).
    /// - The old chain, for as long as a request that resolved its view before the switch runs
    ///   (a FUSE read or write holds its `ViewEntry`, hence its chain). Open file handles hold
    ///   no view: every request looks its view up afresh by inode, so it sees the new chain.
    ///
    /// How each command resolves the layers it acts on: commands run one at a time (`running`),
    /// and only commands switch the chain, so the chain a command reads from the catalog at its
    /// start (`catalog.chain()`, and the layer indexes of the views it names, from the same
    /// catalog state) is the current arrangement for all of its run. Within it, `crate::ops`
    /// takes each layer it changes by index and writes it through that image's own writer
    /// (`ops::LayerWriter`: the `*_locked` entry points, `grow_locked`), never through the
    /// guest's entry points, so no mark left by an earlier arrangement can refuse it. Nothing
    /// keeps a layer from one command to the next.
    fn switch_chain(&self, chain: Arc<crate::chain::Chain>) -> Result<Effect, CommandError> {
        let changes = self.catalog.rebuild(chain)?;
        // Which views a chain change alters is the command's business; dropping the cached pages
        // of every surviving view is cheap and never wrong.
        let changed = self
            .catalog
            .snapshots()
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        Ok(Effect {
            added: changes.added,
            removed: changes.removed,
            changed,
            ..Effect::default()
        })
    }

    /// EBUSY if any of `targets` is open.
    fn refuse_if_open(
        &self,
        targets: &[(Target, String)],
        is_open: &dyn Fn(Target) -> bool,
    ) -> Result<(), CommandError> {
        match targets.iter().find(|(t, _)| still_open(*t, is_open)) {
            Some((_, name)) => Err(CommandError::new(
                libc::EBUSY,
                format!(
                    "{name} is open and this command would change or remove it; close it first"
                ),
            )),
            None => Ok(()),
        }
    }

    /// Views whose content depends on layer `index` of the chain at or below it: its own view
    /// (unless it is the top) and its internal snapshots.
    fn views_of_layer(&self, index: usize) -> Vec<(Target, String)> {
        self.catalog
            .snapshots()
            .into_iter()
            .filter(|(_, v)| v.layer == index)
            .map(|(k, v)| (Target::Snapshot(k), v.file_name.clone()))
            .collect()
    }

    fn layer_index(&self, name: &str) -> Result<usize, CommandError> {
        let (_, entry) = self.find(name)?;
        match entry.kind {
            ViewKind::External => Ok(entry.layer),
            _ => Err(CommandError::new(
                libc::EINVAL,
                format!("{name} is not a layer of the chain (an external snapshot)"),
            )),
        }
    }

    fn commit(
        &self,
        layer: Option<&str>,
        label: &str,
        cx: &Context,
    ) -> Result<Effect, CommandError> {
        let index = match layer {
            None => 0,
            Some(name) => self.layer_index(name)?,
        };
        let chain = self.catalog.chain();
        if index + 1 >= chain.layers.len() {
            return Err(CommandError::new(
                libc::EINVAL,
                format!(
                    "{} has no backing file to commit into",
                    chain.layers[index].path().display()
                ),
            ));
        }
        // The layer below changes content; the committed layer's views change (the top's
        // snapshots read a changed backing file) or leave the chain (an inner layer).
        let busy: Vec<(Target, String)> = self
            .catalog
            .snapshots()
            .into_iter()
            .filter(|(_, v)| {
                v.layer == index || (v.layer == index + 1 && v.kind == ViewKind::External)
            })
            .map(|(k, v)| (Target::Snapshot(k), v.file_name.clone()))
            .collect();
        // The data goes into the layer below; an inner layer's upper neighbour is re-pointed.
        let mut written = vec![index + 1];
        written.extend(index.checked_sub(1));
        self.require(
            &chain,
            cx.caller,
            &Self::moves_data(&chain, index, &written),
        )?;
        self.refuse_if_open(&busy, cx.is_open)?;
        let report = self.reporter(label);
        let new_chain = crate::ops::commit(&chain, index, &report)?;
        self.switch_chain(new_chain)
    }

    /// `pull [BASE]`: the top copies what it reads from the layers above BASE, which then leave
    /// the chain. The live disk and the top's snapshots read the same (or the pull is refused);
    /// the views of the layers that leave go away, so none of them may be open.
    fn pull(&self, base: Option<&str>, label: &str, cx: &Context) -> Result<Effect, CommandError> {
        let base = base.map(|name| self.layer_index(name)).transpose()?;
        let chain = self.catalog.chain();
        let until = base.unwrap_or(chain.layers.len());
        if until == 1 {
            return Ok(Effect {
                detail: Some(format!(
                    "nothing to pull: {} is already the top's backing file",
                    chain.layers[1].path().display()
                )),
                ..Effect::default()
            });
        }
        let mut busy = Vec::new();
        for leaving in 1..until {
            busy.extend(self.views_of_layer(leaving));
        }
        // Reads every layer the top reads through; writes the top.
        self.require(&chain, cx.caller, &Self::moves_data(&chain, 1, &[0]))?;
        self.refuse_if_open(&busy, cx.is_open)?;
        let report = self.reporter(label);
        let new_chain = crate::ops::pull(&chain, base, &report)?;
        let left: Vec<String> = chain.layers[1..until]
            .iter()
            .map(|l| l.path().display().to_string())
            .collect();
        let mut effect = self.switch_chain(new_chain)?;
        effect.detail = Some(format!(
            "left the chain, files kept: {}; the top's backing file is now {}",
            left.join(", "),
            chain
                .layers
                .get(until)
                .map_or("none".to_owned(), |l| l.path().display().to_string())
        ));
        Ok(effect)
    }

    fn create_external(
        &self,
        name: &str,
        file: Option<&str>,
        who: &Caller,
    ) -> Result<Effect, CommandError> {
        if !Catalog::is_valid_name(name) {
            return Err(CommandError::new(
                libc::EINVAL,
                format!(
                    "{name:?} is not a valid snapshot name (no '/', not '.' or '..', at most 251 bytes)"
                ),
            ));
        }
        if self.catalog.find_by_name(name).is_some() {
            return Err(CommandError::new(
                libc::EEXIST,
                format!("a snapshot named {name:?} already exists"),
            ));
        }
        let chain = self.catalog.chain();
        let top_path = chain.top().path().to_owned();
        // A relative FILE (and the default name) goes beside the top, in its real folder.
        let real_top = match (top_path.parent(), top_path.file_name()) {
            (Some(dir), Some(file_name)) => std::fs::canonicalize(dir)
                .map(|d| d.join(file_name))
                .map_err(|e| {
                CommandError::new(
                    e.raw_os_error().unwrap_or(libc::EIO),
                    format!("{}: its folder: {e}", top_path.display()),
                )
            })?,
            _ => top_path.clone(),
        };
        self.check_domain_disk(&top_path)?;
        let wanted = crate::ops::external::overlay_path(&real_top, name, file);
        let place = access::place_new_file(&wanted, who)
            .map_err(|e| CommandError::new(e.errno(), e.to_string()))?;
        let path = place.path();
        let new_chain =
            crate::ops::create_external(&chain, place.folder.as_file(), &place.name, &path)?;
        if let (Some(new), Some(old)) = (
            new_chain.top().storage().host_file(),
            chain.top().storage().host_file(),
        ) {
            adopt(new, old, who, &path);
        }
        self.catalog.name_layer(top_path.clone(), name.to_owned());
        let mut effect = self.switch_chain(new_chain)?;
        let mut detail = format!("the live disk is now {}", path.display());
        // The snapshot records the definition before the move, as virsh's does.
        let problems = [
            self.record_in_libvirt(name, None, &top_path, Some(&path)),
            self.move_domain_disk(&top_path, &path),
        ];
        for problem in problems.into_iter().flatten() {
            detail.push_str("; ");
            detail.push_str(&problem);
        }
        effect.detail = Some(detail);
        Ok(effect)
    }

    pub(super) fn find(&self, name: &str) -> Result<(u64, Arc<ViewEntry>), CommandError> {
        self.catalog
            .find_by_name(name)
            .ok_or_else(|| CommandError::new(libc::ENOENT, format!("no snapshot named {name:?}")))
    }

    fn create(&self, name: &str, description: Option<String>) -> Result<Effect, CommandError> {
        let mut effect = self.create_tag(name, description.clone())?;
        let top = self.catalog.chain().top().path().to_owned();
        effect.detail = self.record_in_libvirt(name, description, &top, None);
        Ok(effect)
    }

    /// Takes internal snapshot `name` of the top image and shows its view, recording nothing in
    /// libvirt's folder.
    pub(super) fn create_tag(
        &self,
        name: &str,
        description: Option<String>,
    ) -> Result<Effect, CommandError> {
        if !Catalog::is_valid_name(name) {
            return Err(CommandError::new(
                libc::EINVAL,
                format!(
                    "{name:?} is not a valid snapshot name (no '/', not '.' or '..', at most 251 bytes)"
                ),
            ));
        }
        let chain = self.catalog.chain();
        let image = chain.top_image();
        let taken = self.catalog.find_by_name(name).is_some()
            || image.snapshots().iter().any(|s| s.name == name.as_bytes());
        if taken {
            return Err(CommandError::new(
                libc::EEXIST,
                format!("a snapshot named {name:?} already exists"),
            ));
        }
        let snap = image.create_snapshot(name)?;
        let (key, entry) = self.catalog.add_internal(&snap, description)?;
        Ok(Effect {
            added: vec![(key, entry.file_name.clone())],
            ..Effect::default()
        })
    }

    /// Reverts the live disk to snapshot `name`; with [`Record::InLibvirt`], `name` becomes
    /// libvirt's current snapshot.
    pub(super) fn revert(
        &self,
        name: &str,
        cx: &Context,
        record: Record,
    ) -> Result<Effect, CommandError> {
        let is_open = cx.is_open;
        let (_, entry) = self.find(name)?;
        let live_open = || {
            CommandError::new(
                libc::EBUSY,
                "live.raw is open; close it (stop the VM, detach loop devices) before reverting",
            )
        };
        if entry.kind == ViewKind::External {
            if still_open(Target::Live, is_open) {
                return Err(live_open());
            }
            // The top's snapshots will read through another backing file; the layers between
            // leave the chain.
            let mut busy = self.views_of_layer(0);
            for between in 1..entry.layer {
                busy.extend(self.views_of_layer(between));
            }
            self.refuse_if_open(&busy, is_open)?;
            let chain = self.catalog.chain();
            let new_chain = crate::ops::revert_to_layer(&chain, entry.layer)?;
            let removed: Vec<String> = chain.layers[1..entry.layer]
                .iter()
                .map(|l| l.path().display().to_string())
                .collect();
            let mut effect = self.switch_chain(new_chain)?;
            effect.live_changed = true;
            self.catalog.live().view.invalidate();
            if !removed.is_empty() {
                effect.detail = Some(format!(
                    "left the chain, files kept: {}",
                    removed.join(", ")
                ));
            }
            return Ok(effect);
        }
        let (ViewKind::Internal, Some(id)) = (entry.kind, entry.snapshot_id.clone()) else {
            return Err(CommandError::new(
                libc::EINVAL,
                format!("{} is not a snapshot; cannot revert to it", entry.file_name),
            ));
        };
        if still_open(Target::Live, is_open) {
            return Err(live_open());
        }
        let mut effect = if entry.layer == 0 {
            self.catalog.chain().top_image().apply_snapshot(&id)?;
            Effect {
                live_changed: true,
                ..Effect::default()
            }
        } else {
            self.revert_in_layer(&entry, &id, cx)?
        };
        self.catalog.live().view.invalidate();
        if record == Record::InLibvirt
            && let Some(problem) = self.make_current_in_libvirt(entry.libvirt_name.as_deref())
        {
            effect.detail = Some(match effect.detail.take() {
                Some(d) => format!("{d}; {problem}"),
                None => problem,
            });
        }
        Ok(effect)
    }

    /// Reverts to internal snapshot `id` of backing layer `entry.layer`, as virsh does (the
    /// snapshot becomes that file's active state, and the disk is that file again): the top is
    /// emptied and pointed at the layer, the layers between leave the chain (their files stay),
    /// and the layer's active state becomes the snapshot. What the layer's own view showed (an
    /// external snapshot's state) is replaced, as with virsh.
    fn revert_in_layer(
        &self,
        entry: &ViewEntry,
        id: &[u8],
        cx: &Context,
    ) -> Result<Effect, CommandError> {
        let chain = self.catalog.chain();
        self.require(&chain, cx.caller, &[(entry.layer, WRITE)])?;
        let mut busy = Vec::new();
        for layer in 0..entry.layer {
            busy.extend(self.views_of_layer(layer));
        }
        busy.extend(
            self.views_of_layer(entry.layer)
                .into_iter()
                .filter(|(t, _)| {
                    let Target::Snapshot(k) = t else { return false };
                    self.catalog
                        .get(*k)
                        .is_some_and(|v| v.kind == ViewKind::External)
                }),
        );
        self.refuse_if_open(&busy, cx.is_open)?;
        let removed: Vec<String> = chain.layers[1..entry.layer]
            .iter()
            .map(|l| l.path().display().to_string())
            .collect();
        let new_chain = crate::ops::revert_to_layer(&chain, entry.layer)?;
        crate::ops::apply_internal(&new_chain, 1, id)?;
        let mut effect = self.switch_chain(new_chain)?;
        effect.live_changed = true;
        if !removed.is_empty() {
            effect.detail = Some(format!(
                "left the chain, files kept: {}",
                removed.join(", ")
            ));
        }
        Ok(effect)
    }

    /// Deletes snapshot `name`; with [`Record::InLibvirt`], its libvirt metadata goes too.
    pub(super) fn delete(
        &self,
        name: &str,
        label: &str,
        cx: &Context,
        record: Record,
    ) -> Result<Effect, CommandError> {
        let is_open = cx.is_open;
        let (key, entry) = self.find(name)?;
        if entry.kind == ViewKind::External {
            let chain = self.catalog.chain();
            // The layer's data goes into the layer above it.
            if let Some(above) = entry.layer.checked_sub(1) {
                self.require(
                    &chain,
                    cx.caller,
                    &Self::moves_data(&chain, entry.layer, &[above]),
                )?;
            }
            self.refuse_if_open(&self.views_of_layer(entry.layer), is_open)?;
            if record == Record::InLibvirt {
                self.refuse_partial_delete(entry.libvirt_name.as_deref())?;
            }
            let report = self.reporter(label);
            let new_chain = crate::ops::pull_into_above(&chain, entry.layer, &report)?;
            let mut effect = self.switch_chain(new_chain)?;
            effect.detail = Some(format!(
                "{} left the chain; the file stays on disk",
                entry.layer_path.display()
            ));
            if record == Record::InLibvirt {
                self.forget_in_libvirt(entry.libvirt_name.as_deref());
            }
            return Ok(effect);
        }
        let (ViewKind::Internal, Some(id)) = (entry.kind, entry.snapshot_id.clone()) else {
            return Err(CommandError::new(
                libc::EINVAL,
                format!("{} is not a snapshot; cannot delete it", entry.file_name),
            ));
        };
        let chain = self.catalog.chain();
        // A snapshot in a backing layer is deleted there, as virsh does: that file is written.
        self.require(&chain, cx.caller, &[(entry.layer, WRITE)])?;
        // The snapshot's VM state file goes with it.
        let mut views = vec![(key, entry.clone())];
        views.extend(self.catalog.siblings(key));
        if let Some((_, open)) = views
            .iter()
            .find(|(k, _)| still_open(Target::Snapshot(*k), is_open))
        {
            return Err(CommandError::new(
                libc::EBUSY,
                format!(
                    "{} is open (a backup may be reading it); close it first",
                    open.file_name
                ),
            ));
        }
        if record == Record::InLibvirt {
            self.refuse_partial_delete(entry.libvirt_name.as_deref())?;
        }
        crate::ops::delete_internal(&chain, entry.layer, &id)?;
        for (k, _) in &views {
            self.catalog.remove(*k);
        }
        if record == Record::InLibvirt {
            self.forget_in_libvirt(entry.libvirt_name.as_deref());
        }
        self.catalog.live().view.invalidate();
        Ok(Effect {
            removed: views
                .iter()
                .map(|(k, v)| (*k, v.file_name.clone()))
                .collect(),
            ..Effect::default()
        })
    }
}

/// Gives a new overlay the owner it would have had if the caller had made it: the caller's
/// uid and gid (root: the old top's, as an administrator keeps a VM's files the VM's), and the
/// old top's read and write bits. Best effort: a snapfs that is not root cannot give files away.
fn adopt(new: &std::fs::File, old_top: &std::fs::File, who: &Caller, path: &std::path::Path) {
    use std::os::fd::AsRawFd;
    let Ok(old) = crate::folder::fstat(old_top) else {
        return;
    };
    let (uid, gid) = if who.is_root() {
        (old.st_uid, old.st_gid)
    } else {
        (who.uid, who.gid)
    };
    // SAFETY: fchown on an open descriptor.
    if unsafe { libc::fchown(new.as_raw_fd(), uid, gid) } != 0 {
        log::debug!(
            "{}: chown {uid}:{gid}: {}",
            path.display(),
            std::io::Error::last_os_error()
        );
    }
    if let Err(e) = crate::folder::fchmod(new, old.st_mode & 0o666) {
        log::debug!("{}: chmod: {e}", path.display());
    }
}
