//! The attributes `stat` shows for each node: sizes from the view, owner and mode from the
//! image files (see [`super::access::mode`]), times from the snapshots.

use std::time::{SystemTime, UNIX_EPOCH};

use fuser::{FileAttr, FileType, INodeNo};

use super::nodes::Node;

/// What the mount's nodes take from the mount options and the top image at mount time.
#[derive(Debug, Clone, Copy)]
pub struct Ownership {
    /// `-o uid=`: the owner shown instead of the top image's.
    pub uid: Option<u32>,
    /// `-o gid=`: the group shown instead of the top image's.
    pub gid: Option<u32>,
    /// The top image's mtime at mount: live.raw's and the directories' times.
    pub image_mtime: SystemTime,
    /// Whether live.raw may be written (a read-write mount of a writable image).
    pub writable: bool,
}

/// Everything a node's attributes are made of.
#[derive(Debug, Clone, Copy)]
pub struct AttrParts {
    pub size: u64,
    /// Bytes the view maps to data (`st_blocks` counts only these).
    pub allocated: u64,
    pub mtime: SystemTime,
    pub uid: u32,
    pub gid: u32,
    /// Permission bits.
    pub perm: u16,
}

/// The node's attributes. Times before the epoch show as the epoch.
pub fn file_attr(node: Node, parts: &AttrParts) -> FileAttr {
    let time = parts.mtime.max(UNIX_EPOCH);
    FileAttr {
        ino: INodeNo(node.ino()),
        size: parts.size,
        blocks: parts.allocated.div_ceil(512),
        atime: time,
        mtime: time,
        ctime: time,
        crtime: time,
        kind: node.kind(),
        perm: parts.perm,
        nlink: if node.kind() == FileType::Directory {
            2
        } else {
            1
        },
        uid: parts.uid,
        gid: parts.gid,
        rdev: 0,
        // The "preferred I/O size" that cp, cat and backup tools size their buffers by: the
        // largest request the kernel passes to us in one piece.
        blksize: super::MAX_REQUEST,
        flags: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_times_and_links() {
        let parts = AttrParts {
            size: 4096,
            allocated: 513,
            mtime: UNIX_EPOCH - std::time::Duration::from_secs(5),
            uid: 7,
            gid: 8,
            perm: 0o440,
        };
        let a = file_attr(Node::Live, &parts);
        assert_eq!(a.blocks, 2);
        assert_eq!(a.mtime, UNIX_EPOCH);
        assert_eq!((a.uid, a.gid, a.perm, a.nlink), (7, 8, 0o440, 1));
        assert_eq!(a.kind, FileType::RegularFile);
        let d = file_attr(Node::SnapshotsDir, &parts);
        assert_eq!((d.kind, d.nlink), (FileType::Directory, 2));
    }
}
