//! The control files' commands: parsing what was written, running it against the catalog, and the
//! status log that `control/status` shows. No FUSE here: the file system passes the bytes in and
//! gets an outcome (or an errno with a message) back.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::SystemTime;

use parking_lot::Mutex;

use crate::catalog::{Catalog, ViewEntry, ViewKind};
use crate::info::rfc3339;

/// Largest command accepted: a name, a description, maybe a path.
pub const MAX_COMMAND_LEN: usize = 4096;
/// Lines of history `control/status` keeps.
const STATUS_LINES: usize = 64;

/// The control files that take commands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommandKind {
    Create,
    Revert,
    Delete,
    Commit,
}

impl CommandKind {
    pub const ALL: [CommandKind; 4] = [
        CommandKind::Create,
        CommandKind::Revert,
        CommandKind::Delete,
        CommandKind::Commit,
    ];

    pub fn file_name(self) -> &'static str {
        match self {
            CommandKind::Create => "create",
            CommandKind::Revert => "revert",
            CommandKind::Delete => "delete",
            CommandKind::Commit => "commit",
        }
    }
}

/// A parsed command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Create {
        name: String,
        description: Option<String>,
    },
    CreateExternal {
        name: String,
        file: Option<String>,
    },
    Revert {
        name: String,
    },
    Delete {
        name: String,
    },
    Commit {
        layer: Option<String>,
    },
}

/// A refused or failed command: the errno the writer gets and the message `status` shows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandError {
    pub errno: i32,
    pub message: String,
}

impl CommandError {
    fn new(errno: i32, message: impl Into<String>) -> Self {
        CommandError {
            errno,
            message: message.into(),
        }
    }
}

impl From<crate::error::Error> for CommandError {
    fn from(e: crate::error::Error) -> Self {
        CommandError::new(e.errno(), e.to_string())
    }
}

/// Parses what was written to control file `kind`.
pub fn parse(kind: CommandKind, input: &[u8]) -> Result<Command, CommandError> {
    let invalid = |m: String| CommandError::new(libc::EINVAL, m);
    if input.len() > MAX_COMMAND_LEN {
        return Err(invalid(format!(
            "command is {} bytes long; at most {MAX_COMMAND_LEN} are accepted",
            input.len()
        )));
    }
    let text =
        std::str::from_utf8(input).map_err(|_| invalid("command is not valid UTF-8".into()))?;
    let text = text.strip_suffix('\n').unwrap_or(text);
    let text = text.strip_suffix('\r').unwrap_or(text);
    if text.chars().any(|c| c.is_control() && c != '\t') {
        return Err(invalid(
            "command contains a line break or control character; write one command per write"
                .into(),
        ));
    }
    let text = text.trim();
    let (first, rest) = match text.split_once(char::is_whitespace) {
        Some((a, b)) => (a, b.trim()),
        None => (text, ""),
    };
    let need_name = |what: &str| -> Result<String, CommandError> {
        if first.is_empty() {
            Err(invalid(format!("{what} needs a snapshot name")))
        } else {
            Ok(first.to_owned())
        }
    };
    match kind {
        CommandKind::Create => {
            let name = need_name("create")?;
            let mut words = rest.split_whitespace();
            if words.next() == Some("--external") {
                let file = words.next().map(str::to_owned);
                if words.next().is_some() {
                    return Err(invalid("usage: NAME --external [FILE]".into()));
                }
                return Ok(Command::CreateExternal { name, file });
            }
            Ok(Command::Create {
                name,
                description: (!rest.is_empty()).then(|| rest.to_owned()),
            })
        }
        CommandKind::Revert | CommandKind::Delete => {
            let name = need_name(kind.file_name())?;
            if !rest.is_empty() {
                return Err(invalid(format!(
                    "usage: echo NAME > control/{} (one name only)",
                    kind.file_name()
                )));
            }
            Ok(if kind == CommandKind::Revert {
                Command::Revert { name }
            } else {
                Command::Delete { name }
            })
        }
        CommandKind::Commit => {
            if !rest.is_empty() {
                return Err(invalid("usage: echo [LAYER] > control/commit".into()));
            }
            Ok(Command::Commit {
                layer: (!first.is_empty()).then(|| first.to_owned()),
            })
        }
    }
}

/// What a command changed, so that the file system can tell the kernel.
#[derive(Debug, Default)]
pub struct Effect {
    /// Views that appeared: key and file name.
    pub added: Vec<(u64, String)>,
    /// Views that disappeared.
    pub removed: Vec<(u64, String)>,
    /// The live disk's content or size changed.
    pub live_changed: bool,
    /// Said after "ok" in the status line (files that left the chain, the new top).
    pub detail: Option<String>,
    /// Snapshot views whose content may have changed under the same name: their cached pages
    /// must go.
    pub changed: Vec<u64>,
}

/// Which file a command would change or remove; the file system answers whether it is open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    Live,
    Snapshot(u64),
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

/// Runs commands one at a time and keeps their outcomes.
pub struct Controller {
    catalog: Arc<Catalog>,
    writable: bool,
    /// With `-o libvirt-write`: the folder where snapshot XML is written and removed.
    libvirt_dir: Option<std::path::PathBuf>,
    running: Mutex<()>,
    status: Mutex<VecDeque<String>>,
    /// The progress line of the command running now.
    progress: Mutex<Option<String>>,
}

impl Controller {
    pub fn new(
        catalog: Arc<Catalog>,
        writable: bool,
        libvirt_dir: Option<std::path::PathBuf>,
    ) -> Self {
        Controller {
            catalog,
            writable,
            libvirt_dir,
            running: Mutex::new(()),
            status: Mutex::new(VecDeque::new()),
            progress: Mutex::new(None),
        }
    }

    /// Adds a line to the status log (also used for reports such as unreadable metadata).
    pub fn note(&self, line: String) {
        let mut status = self.status.lock();
        if status.len() == STATUS_LINES {
            status.pop_front();
        }
        status.push_back(line);
    }

    /// What `control/status` shows.
    pub fn status_text(&self) -> String {
        let mut text = String::new();
        for line in self.status.lock().iter() {
            text.push_str(line);
            text.push('\n');
        }
        if let Some(line) = self.progress.lock().as_ref() {
            text.push_str(line);
            text.push('\n');
        }
        text
    }

    /// Parses and runs one command written to `kind`; `is_open` tells whether a file is open.
    pub fn run(
        &self,
        kind: CommandKind,
        input: &[u8],
        is_open: &dyn Fn(Target) -> bool,
    ) -> Result<Effect, CommandError> {
        let _one_at_a_time = self.running.lock();
        let started = SystemTime::now();
        let command = parse(kind, input);
        let label = match &command {
            Ok(Command::Create { name, .. } | Command::CreateExternal { name, .. })
            | Ok(Command::Revert { name } | Command::Delete { name }) => {
                format!("{} {name}", kind.file_name())
            }
            Ok(Command::Commit { layer }) => {
                format!("commit {}", layer.as_deref().unwrap_or("(top)"))
            }
            Err(_) => kind.file_name().to_owned(),
        };
        let result = command.and_then(|c| self.execute(c, &label, is_open));
        *self.progress.lock() = None;
        let outcome = match &result {
            Ok(Effect {
                detail: Some(detail),
                ..
            }) => format!("ok ({detail})"),
            Ok(_) => "ok".to_owned(),
            Err(e) => format!("error: {}", e.message),
        };
        self.note(format!("{} {label}: {outcome}", rfc3339(started)));
        result
    }

    fn execute(
        &self,
        command: Command,
        label: &str,
        is_open: &dyn Fn(Target) -> bool,
    ) -> Result<Effect, CommandError> {
        if !self.writable {
            return Err(CommandError::new(
                libc::EROFS,
                "the mount is read-only; remount read-write to change snapshots",
            ));
        }
        match command {
            Command::Create { name, description } => self.create(&name, description),
            Command::CreateExternal { name, file } => self.create_external(&name, file.as_deref()),
            Command::Revert { name } => self.revert(&name, is_open),
            Command::Delete { name } => self.delete(&name, label, is_open),
            Command::Commit { layer } => self.commit(layer.as_deref(), label, is_open),
        }
    }

    /// With `-o libvirt-write`, writes `NAME.xml` for a snapshot just created (external when
    /// `overlay` names the new top) and makes it libvirt's current snapshot. Returns a problem to
    /// report; the snapshot itself stands either way.
    fn record_in_libvirt(
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
    fn forget_in_libvirt(&self, name: Option<&str>) {
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
            self.note(format!(
                "{} libvirt: {problem}",
                crate::info::rfc3339(SystemTime::now())
            ));
        }
        self.catalog.set_metadata(meta);
        if let Err(e) = self.catalog.refresh() {
            log::warn!("refreshing views after removing libvirt XML: {e}");
        }
    }

    /// A progress reporter that keeps `control/status`'s last line current.
    fn reporter<'a>(&'a self, label: &'a str) -> impl Fn(u64, u64) + 'a {
        move |done, total| {
            let percent = (done * 100).checked_div(total).unwrap_or(100);
            *self.progress.lock() = Some(format!(
                "{label}: {percent}% ({} of {})",
                crate::report::human(done),
                crate::report::human(total)
            ));
        }
    }

    /// Switches the catalog to `chain` and says what changed.
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
        is_open: &dyn Fn(Target) -> bool,
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
        self.refuse_if_open(&busy, is_open)?;
        let report = self.reporter(label);
        let new_chain = crate::ops::commit(&chain, index, &report)?;
        self.switch_chain(new_chain)
    }

    fn create_external(&self, name: &str, file: Option<&str>) -> Result<Effect, CommandError> {
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
        let path = crate::ops::external::overlay_path(&top_path, name, file);
        let new_chain = crate::ops::create_external(&chain, &path)?;
        self.catalog.name_layer(top_path, name.to_owned());
        let mut effect = self.switch_chain(new_chain)?;
        let mut detail = format!("the live disk is now {}", path.display());
        if let Some(problem) = self.record_in_libvirt(name, None, Some(&path)) {
            detail.push_str("; ");
            detail.push_str(&problem);
        }
        effect.detail = Some(detail);
        Ok(effect)
    }

    fn find(&self, name: &str) -> Result<(u64, Arc<ViewEntry>), CommandError> {
        self.catalog
            .find_by_name(name)
            .ok_or_else(|| CommandError::new(libc::ENOENT, format!("no snapshot named {name:?}")))
    }

    /// The view must be an internal snapshot of the top image.
    fn internal_of_top(&self, entry: &ViewEntry, verb: &str) -> Result<Vec<u8>, CommandError> {
        match (&entry.kind, entry.layer, &entry.snapshot_id) {
            (ViewKind::Internal, 0, Some(id)) => Ok(id.clone()),
            (ViewKind::Internal, _, _) => Err(CommandError::new(
                libc::EROFS,
                format!(
                    "{} is stored in backing file {}, which snapfs does not write; cannot {verb} it",
                    entry.file_name,
                    entry.layer_path.display()
                ),
            )),
            _ => Err(CommandError::new(
                libc::EINVAL,
                format!(
                    "{} is not an internal snapshot; cannot {verb} it",
                    entry.file_name
                ),
            )),
        }
    }

    fn create(&self, name: &str, description: Option<String>) -> Result<Effect, CommandError> {
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
        let (key, entry) = self.catalog.add_internal(&snap, description.clone())?;
        let mut effect = Effect {
            added: vec![(key, entry.file_name.clone())],
            ..Effect::default()
        };
        effect.detail = self.record_in_libvirt(name, description, None);
        Ok(effect)
    }

    fn revert(&self, name: &str, is_open: &dyn Fn(Target) -> bool) -> Result<Effect, CommandError> {
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
        let id = self.internal_of_top(&entry, "revert to")?;
        if still_open(Target::Live, is_open) {
            return Err(live_open());
        }
        self.catalog.chain().top_image().apply_snapshot(&id)?;
        self.catalog.live().view.invalidate();
        Ok(Effect {
            live_changed: true,
            ..Effect::default()
        })
    }

    fn delete(
        &self,
        name: &str,
        label: &str,
        is_open: &dyn Fn(Target) -> bool,
    ) -> Result<Effect, CommandError> {
        let (key, entry) = self.find(name)?;
        if entry.kind == ViewKind::External {
            self.refuse_if_open(&self.views_of_layer(entry.layer), is_open)?;
            let chain = self.catalog.chain();
            let report = self.reporter(label);
            let new_chain = crate::ops::pull_into_above(&chain, entry.layer, &report)?;
            let mut effect = self.switch_chain(new_chain)?;
            effect.detail = Some(format!(
                "{} left the chain; the file stays on disk",
                entry.layer_path.display()
            ));
            self.forget_in_libvirt(entry.libvirt_name.as_deref());
            return Ok(effect);
        }
        let id = self.internal_of_top(&entry, "delete")?;
        if still_open(Target::Snapshot(key), is_open) {
            return Err(CommandError::new(
                libc::EBUSY,
                format!(
                    "{} is open (a backup may be reading it); close it first",
                    entry.file_name
                ),
            ));
        }
        self.catalog.chain().top_image().delete_snapshot(&id)?;
        self.catalog.remove(key);
        self.forget_in_libvirt(entry.libvirt_name.as_deref());
        self.catalog.live().view.invalidate();
        Ok(Effect {
            removed: vec![(key, entry.file_name.clone())],
            ..Effect::default()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_commands() {
        assert_eq!(
            parse(CommandKind::Create, b"pkg-updated after apt upgrade\n"),
            Ok(Command::Create {
                name: "pkg-updated".into(),
                description: Some("after apt upgrade".into())
            })
        );
        assert_eq!(
            parse(CommandKind::Create, b"s1\n"),
            Ok(Command::Create {
                name: "s1".into(),
                description: None
            })
        );
        assert_eq!(
            parse(CommandKind::Create, b"s2 --external /vm/new.qcow2"),
            Ok(Command::CreateExternal {
                name: "s2".into(),
                file: Some("/vm/new.qcow2".into())
            })
        );
        assert_eq!(
            parse(CommandKind::Revert, b"s1\n"),
            Ok(Command::Revert { name: "s1".into() })
        );
        assert_eq!(
            parse(CommandKind::Commit, b"\n"),
            Ok(Command::Commit { layer: None })
        );
        assert_eq!(
            parse(CommandKind::Commit, b"base"),
            Ok(Command::Commit {
                layer: Some("base".into())
            })
        );
    }

    #[test]
    fn refuses_bad_input() {
        for (kind, input) in [
            (CommandKind::Create, &b"\n"[..]),
            (CommandKind::Create, b""),
            (CommandKind::Delete, b"a b"),
            (CommandKind::Revert, b"a\nb\n"),
            (CommandKind::Create, b"\xff\xfe"),
            (CommandKind::Create, b"a\0b"),
            (CommandKind::Commit, b"a b"),
        ] {
            let e = parse(kind, input).unwrap_err();
            assert_eq!(e.errno, libc::EINVAL, "{input:?}: {}", e.message);
        }
        let long = vec![b'a'; MAX_COMMAND_LEN + 1];
        assert_eq!(
            parse(CommandKind::Create, &long).unwrap_err().errno,
            libc::EINVAL
        );
    }
}
