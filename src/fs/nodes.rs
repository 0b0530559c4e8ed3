//! The file tree a mount shows, as inode numbers, and the attributes of each node.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{FileAttr, FileType, INodeNo};

use crate::catalog::{Catalog, ViewEntry};

pub const ROOT: u64 = 1;
pub const SNAPSHOTS_DIR: u64 = 2;
pub const LIVE: u64 = 3;
pub const INFO_JSON: u64 = 4;
/// Snapshot view `i` of the catalog is inode `FIRST_SNAPSHOT + i`.
pub const FIRST_SNAPSHOT: u64 = 100;

/// What an inode number stands for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Node {
    Root,
    SnapshotsDir,
    Live,
    InfoJson,
    Snapshot(usize),
}

impl Node {
    pub fn from_ino(ino: u64, catalog: &Catalog) -> Option<Node> {
        Some(match ino {
            ROOT => Node::Root,
            SNAPSHOTS_DIR => Node::SnapshotsDir,
            LIVE => Node::Live,
            INFO_JSON => Node::InfoJson,
            n if n >= FIRST_SNAPSHOT && ((n - FIRST_SNAPSHOT) as usize) < catalog.snapshots.len() => {
                Node::Snapshot((n - FIRST_SNAPSHOT) as usize)
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
            Node::Snapshot(i) => FIRST_SNAPSHOT + i as u64,
        }
    }

    pub fn kind(self) -> FileType {
        match self {
            Node::Root | Node::SnapshotsDir => FileType::Directory,
            _ => FileType::RegularFile,
        }
    }

    /// The children of a directory, with their names.
    pub fn children(self, catalog: &Catalog) -> Vec<(Node, String)> {
        match self {
            Node::Root => vec![
                (Node::Live, "live.raw".into()),
                (Node::SnapshotsDir, "snapshots".into()),
                (Node::InfoJson, "info.json".into()),
            ],
            Node::SnapshotsDir => catalog
                .snapshots
                .iter()
                .enumerate()
                .map(|(i, v)| (Node::Snapshot(i), v.file_name.clone()))
                .collect(),
            _ => Vec::new(),
        }
    }

    pub fn parent(self) -> Node {
        match self {
            Node::Snapshot(_) => Node::SnapshotsDir,
            _ => Node::Root,
        }
    }

    pub fn view(self, catalog: &Catalog) -> Option<&ViewEntry> {
        match self {
            Node::Live => Some(&catalog.live),
            Node::Snapshot(i) => catalog.snapshots.get(i),
            _ => None,
        }
    }
}

/// Owner, permissions and times that the mount's nodes take from the image file.
#[derive(Debug, Clone, Copy)]
pub struct Ownership {
    pub uid: u32,
    pub gid: u32,
    /// Permission bits of the top image file.
    pub mode: u16,
    pub image_mtime: SystemTime,
    pub writable: bool,
}

impl Ownership {
    pub fn attr(&self, node: Node, size: u64, allocated: u64, mtime: Option<SystemTime>) -> FileAttr {
        let read_bits = self.mode & 0o444;
        let perm = match node {
            Node::Root | Node::SnapshotsDir => read_bits | (read_bits >> 2) | 0o200 & self.mode,
            Node::Live if self.writable => self.mode & 0o666,
            _ => read_bits,
        };
        let time = mtime.unwrap_or(self.image_mtime).max(UNIX_EPOCH);
        FileAttr {
            ino: INodeNo(node.ino()),
            size,
            blocks: allocated.div_ceil(512),
            atime: time,
            mtime: time,
            ctime: time,
            crtime: time,
            kind: node.kind(),
            perm,
            nlink: if node.kind() == FileType::Directory { 2 } else { 1 },
            uid: self.uid,
            gid: self.gid,
            rdev: 0,
            blksize: 65536,
            flags: 0,
        }
    }
}

/// How long the kernel may keep names and attributes: views never change while they exist, and the
/// live view's size changes only through this file system, which tells the kernel.
pub const TTL: Duration = Duration::from_secs(1);
