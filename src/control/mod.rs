//! The control files' commands: parsing what was written (`parse`), running it against the
//! catalog (`execute`), recording it in libvirt's folder (`libvirt`), and the status log that
//! `control/status` shows (`status`). No FUSE here: the file system passes the bytes and the
//! caller in and gets an outcome (or an errno with a message) back.

mod domain;
mod execute;
mod libvirt;
mod parse;
mod status;

use std::sync::Arc;

use parking_lot::Mutex;

use crate::access::{Caller, DeviceWrites};
use crate::catalog::Catalog;
use status::LoggedCommand;

pub use domain::{DomainController, MountedDisk};
pub use execute::Context;
pub use libvirt::{LibvirtWrite, default_domain_file};

pub use parse::{Command, CommandKind, MAX_COMMAND_LEN, label, parse, quote_name};

/// A refused or failed command: the errno the writer gets and the message `status` shows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandError {
    pub errno: i32,
    pub message: String,
}

impl CommandError {
    pub(crate) fn new(errno: i32, message: impl Into<String>) -> Self {
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

/// Runs commands one at a time and keeps their outcomes.
pub struct Controller {
    catalog: Arc<Catalog>,
    writable: bool,
    /// With `-o libvirt-write`: where snapshot XML is written and removed.
    libvirt: Option<LibvirtWrite>,
    /// Whether commands may write backing files that are block devices.
    devices: DeviceWrites,
    running: Mutex<()>,
    status: status::StatusLog,
}

impl Controller {
    pub fn new(
        catalog: Arc<Catalog>,
        writable: bool,
        libvirt: Option<LibvirtWrite>,
        devices: DeviceWrites,
    ) -> Self {
        Controller {
            catalog,
            writable,
            libvirt,
            devices,
            running: Mutex::new(()),
            status: status::StatusLog::default(),
        }
    }

    /// Keeps every other command of this controller waiting while held: a domain-wide command
    /// holds the controllers of all its disks.
    pub(crate) fn hold(&self) -> parking_lot::MutexGuard<'_, ()> {
        self.running.lock()
    }

    pub fn catalog(&self) -> &Arc<Catalog> {
        &self.catalog
    }

    /// Adds a line to the status log (also used for reports such as unreadable metadata).
    pub fn note(&self, line: String) {
        self.status.note(line);
    }

    /// What `control/status` shows.
    pub fn status_text(&self) -> String {
        self.status.text()
    }

    /// Parses and runs one command written to `kind` by `caller`; `is_open` tells whether a
    /// file is open.
    pub fn run(
        &self,
        kind: CommandKind,
        input: &[u8],
        caller: &Caller,
        is_open: &dyn Fn(Target) -> bool,
    ) -> Result<Effect, CommandError> {
        let _one_at_a_time = self.running.lock();
        let (command, logged) = LoggedCommand::parse(kind, input);
        let context = Context { caller, is_open };
        let result = command.and_then(|c| self.execute(c, logged.label(), &context));
        self.status.set_progress(None);
        self.note(logged.line("", result.as_ref().map(|e| e.detail.as_deref())));
        result
    }
}
