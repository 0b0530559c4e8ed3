//! The file tree a mount shows, as inode numbers.

use std::sync::Arc;
use std::time::Duration;

use fuser::FileType;

use crate::catalog::{Catalog, ViewEntry};
use crate::checkpoints;
use crate::control::CommandKind;

pub const ROOT: u64 = 1;
pub const SNAPSHOTS_DIR: u64 = 2;
pub const LIVE: u64 = 3;
pub const INFO_JSON: u64 = 4;
pub const CONTROL_DIR: u64 = 5;
pub const STATUS: u64 = 6;
pub const CHECKPOINTS_DIR: u64 = 7;
pub const CHANGES_DIR: u64 = 8;
/// `control/create` .. `control/pull` are 10..14.
const FIRST_COMMAND: u64 = 10;
/// Snapshot view with catalog key `k` is inode `FIRST_SNAPSHOT + k`; keys are never reused
/// during a mount, so neither are inode numbers.
pub const FIRST_SNAPSHOT: u64 = 100;
/// Checkpoint `k`'s files are inodes `FIRST_CHECKPOINT + 2k` (`.raw`) and `+ 2k + 1` (`.json`),
/// far above any snapshot key and any change file (`changes.rs`: from `1 << 48`).
pub const FIRST_CHECKPOINT: u64 = 1 << 56;

/// What an inode number stands for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Node {
    Root,
    SnapshotsDir,
    Live,
    InfoJson,
    ControlDir,
    Status,
    Command(CommandKind),
    Snapshot(u64),
    CheckpointsDir,
    /// A checkpoint's file: its key, and whether it is the `.json` list (else `.raw`).
    Checkpoint {
        key: u64,
        json: bool,
    },
    ChangesDir,
    /// A file of `changes/`, by its inode number (see `changes.rs`).
    Change(u64),
}

impl Node {
    pub fn from_ino(ino: u64, catalog: &Catalog) -> Option<Node> {
        Some(match ino {
            ROOT => Node::Root,
            SNAPSHOTS_DIR => Node::SnapshotsDir,
            LIVE => Node::Live,
            INFO_JSON => Node::InfoJson,
            CONTROL_DIR => Node::ControlDir,
            STATUS => Node::Status,
            CHECKPOINTS_DIR => Node::CheckpointsDir,
            CHANGES_DIR => Node::ChangesDir,
            n if n >= FIRST_CHECKPOINT => {
                let key = (n - FIRST_CHECKPOINT) / 2;
                catalog.checkpoint_name(key)?;
                Node::Checkpoint {
                    key,
                    json: (n - FIRST_CHECKPOINT) % 2 == 1,
                }
            }
            n if (FIRST_COMMAND..FIRST_COMMAND + CommandKind::ALL.len() as u64).contains(&n) => {
                Node::Command(CommandKind::ALL[(n - FIRST_COMMAND) as usize])
            }
            n if n >= super::changes::FIRST_CHANGE => Node::Change(n),
            n if n >= FIRST_SNAPSHOT && catalog.get(n - FIRST_SNAPSHOT).is_some() => {
                Node::Snapshot(n - FIRST_SNAPSHOT)
            }
            _ => return None,
        })
    }

    pub fn ino(self) -> u64 {
        match self {
            Node::Root => ROOT,
            Node::SnapshotsDir => SNAPSHOTS_DIR,
            Node::Live => LIVE,
            Node::InfoJson => INFO_JSON,
            Node::ControlDir => CONTROL_DIR,
            Node::Status => STATUS,
            Node::Command(kind) => {
                FIRST_COMMAND
                    + CommandKind::ALL
                        .iter()
                        .position(|k| *k == kind)
                        .unwrap_or(0) as u64
            }
            Node::Snapshot(key) => FIRST_SNAPSHOT + key,
            Node::CheckpointsDir => CHECKPOINTS_DIR,
            Node::Checkpoint { key, json } => FIRST_CHECKPOINT + 2 * key + u64::from(json),
            Node::ChangesDir => CHANGES_DIR,
            Node::Change(ino) => ino,
        }
    }

    pub fn kind(self) -> FileType {
        match self {
            Node::Root
            | Node::SnapshotsDir
            | Node::ControlDir
            | Node::CheckpointsDir
            | Node::ChangesDir => FileType::Directory,
            _ => FileType::RegularFile,
        }
    }

    /// The children of a directory, with their names.
    pub fn children(self, catalog: &Catalog) -> Vec<(Node, String)> {
        match self {
            Node::Root => vec![
                (Node::Live, "live.raw".into()),
                (Node::SnapshotsDir, "snapshots".into()),
                (Node::CheckpointsDir, "checkpoints".into()),
                (Node::ControlDir, "control".into()),
                (Node::ChangesDir, "changes".into()),
                (Node::InfoJson, "info.json".into()),
            ],
            Node::SnapshotsDir => catalog
                .snapshots()
                .into_iter()
                .map(|(key, v)| (Node::Snapshot(key), v.file_name.clone()))
                .collect(),
            Node::CheckpointsDir => checkpoints::list(&catalog.chain())
                .0
                .into_iter()
                .flat_map(|c| {
                    let key = catalog.checkpoint_key(&c.name);
                    [
                        (
                            Node::Checkpoint { key, json: false },
                            format!("{}{}", c.name, checkpoints::RAW_SUFFIX),
                        ),
                        (
                            Node::Checkpoint { key, json: true },
                            format!("{}{}", c.name, checkpoints::JSON_SUFFIX),
                        ),
                    ]
                })
                .collect(),
            Node::ControlDir => CommandKind::ALL
                .iter()
                .map(|k| (Node::Command(*k), k.file_name().to_owned()))
                .chain([(Node::Status, "status".to_owned())])
                .collect(),
            _ => Vec::new(),
        }
    }

    /// Looks a name up in a directory without listing it whole.
    pub fn child(self, catalog: &Catalog, name: &str) -> Option<Node> {
        match self {
            Node::SnapshotsDir => catalog.find(name).map(|(key, _)| Node::Snapshot(key)),
            Node::CheckpointsDir => {
                let (base, json) = if let Some(b) = name.strip_suffix(checkpoints::RAW_SUFFIX) {
                    (b, false)
                } else {
                    (name.strip_suffix(checkpoints::JSON_SUFFIX)?, true)
                };
                checkpoints::find(&catalog.chain(), base)?;
                Some(Node::Checkpoint {
                    key: catalog.checkpoint_key(base),
                    json,
                })
            }
            _ => self
                .children(catalog)
                .into_iter()
                .find(|(_, n)| n == name)
                .map(|(node, _)| node),
        }
    }

    pub fn parent(self) -> Node {
        match self {
            Node::Snapshot(_) => Node::SnapshotsDir,
            Node::Checkpoint { .. } => Node::CheckpointsDir,
            Node::Command(_) | Node::Status => Node::ControlDir,
            Node::Change(_) => Node::ChangesDir,
            _ => Node::Root,
        }
    }

    /// The checkpoint a checkpoint file shows, if it is still listed.
    pub fn checkpoint(self, catalog: &Catalog) -> Option<checkpoints::Checkpoint> {
        match self {
            Node::Checkpoint { key, .. } => {
                checkpoints::find(&catalog.chain(), &catalog.checkpoint_name(key)?)
            }
            _ => None,
        }
    }

    pub fn view(self, catalog: &Catalog) -> Option<Arc<ViewEntry>> {
        match self {
            Node::Live => Some(catalog.live()),
            Node::Snapshot(key) => catalog.get(key),
            _ => None,
        }
    }
}

/// How long the kernel may keep names and attributes. Changes made through control commands are
/// announced to the kernel, so a longer time would be safe; one second bounds any missed case.
pub const TTL: Duration = Duration::from_secs(1);

impl Node {
    /// How long the kernel may keep this node's name and attributes. A checkpoint file's size
    /// and `st_blocks` follow every write to the live disk (each marks its bitmaps), which
    /// nothing announces, so they are asked for afresh each time; the rest keeps [`TTL`].
    pub fn ttl(self) -> Duration {
        match self {
            Node::Checkpoint { .. } => Duration::ZERO,
            _ => TTL,
        }
    }
}
