//! The FUSE adapter of a domain mount (`snapfs mount --domain NAME`): one session whose root
//! holds `control/` (`create`, `revert`, `delete`, `status`: one snapshot of every disk, see
//! [`crate::control::DomainController`]) and one directory per mounted disk, named after its
//! `<target dev>`, each the whole tree of a one-image mount ([`SnapFs`]).
//!
//! The inode space is partitioned: disk `i`'s tree is its own inode numbers plus
//! `(i + 1) << DISK_SHIFT` (every number a tree uses is below `1 << DISK_SHIFT`); the numbers
//! below `1 << DISK_SHIFT` are the domain's own nodes. A request is routed by its inode number and
//! handed, with the tree's own number, to that disk's [`SnapFs`], which adds its base to every
//! number it replies with; file handles stay with the tree that made them.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::sync::Arc;
use std::time::SystemTime;

use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo,
    KernelConfig, OpenAccMode, OpenFlags, ReplyAttr, ReplyData, ReplyDirectory, ReplyEmpty,
    ReplyEntry, ReplyLseek, ReplyOpen, ReplyStatfs, ReplyXattr, Request,
};
use parking_lot::Mutex;

use super::commands::{self, CommandQueue};
use super::nodes::TTL;
use super::{SnapFs, caller};
use crate::access::Caller;
use crate::control::{CommandKind, DomainController, Target};

/// Disk trees start at `1 << DISK_SHIFT`: above every inode number a tree uses (its checkpoint
/// files start at `1 << 56`), with room for 63 disks.
pub const DISK_SHIFT: u32 = 58;
/// The most disks a domain mount holds.
pub const MAX_DISKS: usize = (1 << (64 - DISK_SHIFT)) - 1;

const ROOT: u64 = 1;
const CONTROL_DIR: u64 = 2;
const CREATE: u64 = 3;
const REVERT: u64 = 4;
const DELETE: u64 = 5;
const STATUS: u64 = 6;

/// The command a top-level control file takes.
fn command_kind(ino: u64) -> Option<CommandKind> {
    match ino {
        CREATE => Some(CommandKind::Create),
        REVERT => Some(CommandKind::Revert),
        DELETE => Some(CommandKind::Delete),
        _ => None,
    }
}

/// The inode base of disk `index`'s tree.
pub fn disk_base(index: usize) -> u64 {
    (index as u64 + 1) << DISK_SHIFT
}

/// Where a request for inode `ino` goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Route {
    /// One of the domain's own nodes.
    Top(u64),
    /// Disk `index`'s tree, with the tree's own inode number.
    Disk(usize, u64),
}

fn route(ino: u64) -> Route {
    match (ino >> DISK_SHIFT) as usize {
        0 => Route::Top(ino),
        n => Route::Disk(n - 1, ino & ((1 << DISK_SHIFT) - 1)),
    }
}

/// A mounted disk: its directory's name and its tree.
pub struct DiskTree {
    pub name: String,
    pub fs: SnapFs,
}

pub struct DomainFs {
    disks: Vec<DiskTree>,
    controller: Arc<DomainController>,
    /// Owner and time of the domain's own nodes.
    uid: u32,
    gid: u32,
    mtime: SystemTime,
    writable: bool,
    /// Who opened each handle of a command file (a command runs with its opener's rights).
    openers: Mutex<HashMap<u64, Caller>>,
    next_handle: Mutex<u64>,
    commands: Option<CommandQueue>,
}

impl DomainFs {
    /// The domain's tree over `disks` (each [`SnapFs`] built with [`disk_base`] of its index).
    pub fn new(
        disks: Vec<DiskTree>,
        controller: Arc<DomainController>,
        uid: u32,
        gid: u32,
        writable: bool,
    ) -> Self {
        DomainFs {
            disks,
            controller,
            uid,
            gid,
            mtime: SystemTime::now(),
            writable,
            openers: Mutex::default(),
            next_handle: Mutex::new(1),
            commands: None,
        }
    }

    fn top_attr(&self, ino: u64) -> Option<FileAttr> {
        let (kind, perm, size) = match ino {
            ROOT | CONTROL_DIR => (FileType::Directory, 0o555, 0),
            CREATE | REVERT | DELETE => (
                FileType::RegularFile,
                if self.writable { 0o200 } else { 0 },
                0,
            ),
            STATUS => (
                FileType::RegularFile,
                0o444,
                self.controller.status_text().len() as u64,
            ),
            _ => return None,
        };
        Some(FileAttr {
            ino: INodeNo(ino),
            size,
            blocks: 0,
            atime: self.mtime,
            mtime: self.mtime,
            ctime: self.mtime,
            crtime: self.mtime,
            kind,
            perm,
            nlink: if kind == FileType::Directory { 2 } else { 1 },
            uid: self.uid,
            gid: self.gid,
            rdev: 0,
            blksize: 4096,
            flags: 0,
        })
    }

    fn disk(&self, index: usize) -> Result<&SnapFs, Errno> {
        self.disks.get(index).map(|d| &d.fs).ok_or(Errno::ENOENT)
    }

    /// The domain's own directory entries of `dir` (after `.` and `..`).
    fn top_children(&self, dir: u64) -> Vec<(u64, FileType, String)> {
        match dir {
            ROOT => std::iter::once((CONTROL_DIR, FileType::Directory, "control".to_owned()))
                .chain(self.disks.iter().enumerate().map(|(i, d)| {
                    (
                        disk_base(i) + super::nodes::ROOT,
                        FileType::Directory,
                        d.name.clone(),
                    )
                }))
                .collect(),
            CONTROL_DIR => vec![
                (CREATE, FileType::RegularFile, "create".to_owned()),
                (REVERT, FileType::RegularFile, "revert".to_owned()),
                (DELETE, FileType::RegularFile, "delete".to_owned()),
                (STATUS, FileType::RegularFile, "status".to_owned()),
            ],
            _ => Vec::new(),
        }
    }

    /// Hands a top-level command to the command thread; it replies when it has run and tells
    /// each disk's tree what changed in it.
    fn submit(&self, kind: CommandKind, data: &[u8], who: Caller, reply: fuser::ReplyWrite) {
        let controller = self.controller.clone();
        let announcers: Vec<_> = self.disks.iter().map(|d| d.fs.announcer.clone()).collect();
        let handles: Vec<_> = self.disks.iter().map(|d| d.fs.handles.clone()).collect();
        let run = move |input: &[u8]| {
            let checks: Vec<Box<dyn Fn(Target) -> bool>> = handles
                .iter()
                .map(|h| {
                    let h = h.clone();
                    Box::new(move |t| super::is_open_else_claim(&h, t))
                        as Box<dyn Fn(Target) -> bool>
                })
                .collect();
            let is_open: Vec<&dyn Fn(Target) -> bool> = checks.iter().map(|c| c.as_ref()).collect();
            let result = controller.run(kind, input, &who, &is_open);
            for h in &handles {
                h.lock().end_claims();
            }
            for (announcer, effect) in announcers.iter().zip(&result?) {
                announcer.announce(effect);
            }
            Ok(())
        };
        commands::submit_write(self.commands.as_ref(), kind, data.to_vec(), reply, run);
    }
}

impl Filesystem for DomainFs {
    fn init(&mut self, req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        for disk in &mut self.disks {
            disk.fs.init(req, config)?;
        }
        self.commands = Some(CommandQueue::start()?);
        Ok(())
    }

    fn destroy(&mut self) {
        if let Some(commands) = &self.commands {
            commands.shutdown();
        }
        for disk in &mut self.disks {
            disk.fs.destroy();
        }
    }

    fn lookup(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        match route(parent.0) {
            Route::Disk(i, ino) => match self.disk(i) {
                Ok(fs) => fs.lookup(req, INodeNo(ino), name, reply),
                Err(e) => reply.error(e),
            },
            Route::Top(dir) => {
                let found = self
                    .top_children(dir)
                    .into_iter()
                    .find(|(_, _, n)| OsStr::new(n) == name);
                let attr = match found {
                    Some((ino, _, _)) => match route(ino) {
                        Route::Top(top) => self.top_attr(top).ok_or(Errno::ENOENT),
                        Route::Disk(i, _) => self.disk(i).and_then(SnapFs::root_attr),
                    },
                    None => Err(Errno::ENOENT),
                };
                match attr {
                    Ok(attr) => reply.entry(&TTL, &attr, Generation(0)),
                    Err(e) => reply.error(e),
                }
            }
        }
    }

    fn getattr(&self, req: &Request, ino: INodeNo, fh: Option<FileHandle>, reply: ReplyAttr) {
        match route(ino.0) {
            Route::Disk(i, ino) => match self.disk(i) {
                Ok(fs) => fs.getattr(req, INodeNo(ino), fh, reply),
                Err(e) => reply.error(e),
            },
            Route::Top(top) => match self.top_attr(top) {
                Some(attr) => reply.attr(&TTL, &attr),
                None => reply.error(Errno::ENOENT),
            },
        }
    }

    fn open(&self, req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let top = match route(ino.0) {
            Route::Disk(i, ino) => {
                return match self.disk(i) {
                    Ok(fs) => fs.open(req, INodeNo(ino), flags, reply),
                    Err(e) => reply.error(e),
                };
            }
            Route::Top(top) => top,
        };
        let writes = flags.acc_mode() != OpenAccMode::O_RDONLY;
        let reads = flags.acc_mode() != OpenAccMode::O_WRONLY;
        match top {
            ROOT | CONTROL_DIR => reply.error(Errno::EISDIR),
            CREATE | REVERT | DELETE if reads => reply.error(Errno::EACCES),
            CREATE | REVERT | DELETE if !self.writable => reply.error(Errno::EROFS),
            CREATE | REVERT | DELETE => {
                let handle = {
                    let mut next = self.next_handle.lock();
                    *next += 1;
                    *next
                };
                self.openers.lock().insert(handle, caller(req));
                reply.opened(FileHandle(handle), FopenFlags::FOPEN_DIRECT_IO);
            }
            STATUS if writes => reply.error(Errno::EACCES),
            STATUS => reply.opened(FileHandle(0), FopenFlags::FOPEN_DIRECT_IO),
            _ => reply.error(Errno::ENOENT),
        }
    }

    fn release(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        flags: OpenFlags,
        lock_owner: Option<fuser::LockOwner>,
        flush: bool,
        reply: ReplyEmpty,
    ) {
        match route(ino.0) {
            Route::Disk(i, ino) => match self.disk(i) {
                Ok(fs) => fs.release(req, INodeNo(ino), fh, flags, lock_owner, flush, reply),
                Err(e) => reply.error(e),
            },
            Route::Top(_) => {
                self.openers.lock().remove(&fh.0);
                reply.ok();
            }
        }
    }

    fn read(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        flags: OpenFlags,
        lock_owner: Option<fuser::LockOwner>,
        reply: ReplyData,
    ) {
        match route(ino.0) {
            Route::Disk(i, ino) => match self.disk(i) {
                Ok(fs) => fs.read(
                    req,
                    INodeNo(ino),
                    fh,
                    offset,
                    size,
                    flags,
                    lock_owner,
                    reply,
                ),
                Err(e) => reply.error(e),
            },
            Route::Top(STATUS) => {
                let text = self.controller.status_text().into_bytes();
                let start = (offset as usize).min(text.len());
                let end = start.saturating_add(size as usize).min(text.len());
                reply.data(&text[start..end]);
            }
            Route::Top(_) => reply.error(Errno::EBADF),
        }
    }

    fn write(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        write_flags: fuser::WriteFlags,
        flags: OpenFlags,
        lock_owner: Option<fuser::LockOwner>,
        reply: fuser::ReplyWrite,
    ) {
        match route(ino.0) {
            Route::Disk(i, ino) => match self.disk(i) {
                Ok(fs) => fs.write(
                    req,
                    INodeNo(ino),
                    fh,
                    offset,
                    data,
                    write_flags,
                    flags,
                    lock_owner,
                    reply,
                ),
                Err(e) => reply.error(e),
            },
            Route::Top(top) if let Some(kind) = command_kind(top) => {
                let opener = self.openers.lock().get(&fh.0).cloned();
                self.submit(kind, data, opener.unwrap_or_else(|| caller(req)), reply);
            }
            Route::Top(_) => reply.error(Errno::EBADF),
        }
    }

    fn flush(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        lock_owner: fuser::LockOwner,
        reply: ReplyEmpty,
    ) {
        match route(ino.0) {
            Route::Disk(i, ino) => match self.disk(i) {
                Ok(fs) => fs.flush(req, INodeNo(ino), fh, lock_owner, reply),
                Err(e) => reply.error(e),
            },
            Route::Top(_) => reply.ok(),
        }
    }

    fn fsync(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        match route(ino.0) {
            Route::Disk(i, ino) => match self.disk(i) {
                Ok(fs) => fs.fsync(req, INodeNo(ino), fh, datasync, reply),
                Err(e) => reply.error(e),
            },
            Route::Top(_) => reply.ok(),
        }
    }

    fn setattr(
        &self,
        req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<fuser::TimeOrNow>,
        mtime: Option<fuser::TimeOrNow>,
        ctime: Option<SystemTime>,
        fh: Option<FileHandle>,
        crtime: Option<SystemTime>,
        chgtime: Option<SystemTime>,
        bkuptime: Option<SystemTime>,
        flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let top = match route(ino.0) {
            Route::Disk(i, ino) => {
                return match self.disk(i) {
                    Ok(fs) => fs.setattr(
                        req,
                        INodeNo(ino),
                        mode,
                        uid,
                        gid,
                        size,
                        atime,
                        mtime,
                        ctime,
                        fh,
                        crtime,
                        chgtime,
                        bkuptime,
                        flags,
                        reply,
                    ),
                    Err(e) => reply.error(e),
                };
            }
            Route::Top(top) => top,
        };
        // `echo NAME > control/create` truncates before it writes: nothing to truncate. Nothing
        // else of the domain's own nodes changes.
        let only_truncate =
            mode.is_none() && uid.is_none() && gid.is_none() && atime.is_none() && mtime.is_none();
        match self.top_attr(top) {
            Some(attr) if command_kind(top).is_some() && only_truncate => reply.attr(&TTL, &attr),
            Some(_) => reply.error(Errno::EPERM),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn fallocate(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        match route(ino.0) {
            Route::Disk(i, ino) => match self.disk(i) {
                Ok(fs) => fs.fallocate(req, INodeNo(ino), fh, offset, length, mode, reply),
                Err(e) => reply.error(e),
            },
            Route::Top(_) => reply.error(Errno::EOPNOTSUPP),
        }
    }

    fn opendir(&self, req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        match route(ino.0) {
            Route::Disk(i, ino) => match self.disk(i) {
                Ok(fs) => fs.opendir(req, INodeNo(ino), flags, reply),
                Err(e) => reply.error(e),
            },
            Route::Top(ROOT | CONTROL_DIR) => reply.opened(FileHandle(0), FopenFlags::empty()),
            Route::Top(_) => reply.error(Errno::ENOTDIR),
        }
    }

    fn readdir(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let dir = match route(ino.0) {
            Route::Disk(i, ino) => {
                return match self.disk(i) {
                    Ok(fs) => fs.readdir(req, INodeNo(ino), fh, offset, reply),
                    Err(e) => reply.error(e),
                };
            }
            Route::Top(dir @ (ROOT | CONTROL_DIR)) => dir,
            Route::Top(_) => return reply.error(Errno::ENOTDIR),
        };
        let mut entries = vec![
            (dir, FileType::Directory, ".".to_owned()),
            (ROOT, FileType::Directory, "..".to_owned()),
        ];
        entries.extend(self.top_children(dir));
        for (i, (ino, kind, name)) in entries.iter().enumerate().skip(offset as usize) {
            if reply.add(INodeNo(*ino), (i + 1) as u64, *kind, name) {
                break;
            }
        }
        reply.ok();
    }

    fn statfs(&self, req: &Request, ino: INodeNo, reply: ReplyStatfs) {
        match (route(ino.0), self.disks.first()) {
            (Route::Disk(i, ino), _) => match self.disk(i) {
                Ok(fs) => fs.statfs(req, INodeNo(ino), reply),
                Err(e) => reply.error(e),
            },
            (Route::Top(_), Some(first)) => {
                first.fs.statfs(req, INodeNo(super::nodes::ROOT), reply)
            }
            (Route::Top(_), None) => reply.statfs(0, 0, 0, 4, 0, 4096, 255, 4096),
        }
    }

    fn getxattr(&self, req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        match route(ino.0) {
            Route::Disk(i, ino) => match self.disk(i) {
                Ok(fs) => fs.getxattr(req, INodeNo(ino), name, size, reply),
                Err(e) => reply.error(e),
            },
            Route::Top(_) => reply.error(Errno::NO_XATTR),
        }
    }

    fn listxattr(&self, req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        match route(ino.0) {
            Route::Disk(i, ino) => match self.disk(i) {
                Ok(fs) => fs.listxattr(req, INodeNo(ino), size, reply),
                Err(e) => reply.error(e),
            },
            Route::Top(_) => super::xattrs::reply(reply, size, &[]),
        }
    }

    fn access(&self, req: &Request, ino: INodeNo, mask: fuser::AccessFlags, reply: ReplyEmpty) {
        match route(ino.0) {
            Route::Disk(i, ino) => match self.disk(i) {
                Ok(fs) => fs.access(req, INodeNo(ino), mask, reply),
                Err(e) => reply.error(e),
            },
            Route::Top(top) => {
                let Some(attr) = self.top_attr(top) else {
                    return reply.error(Errno::ENOENT);
                };
                let who = caller(req);
                // The mode bits of the owner class apply to everyone: the domain's own nodes
                // hold nothing of the images, whose rights each disk's command checks.
                let want = super::access_want(mask);
                let bits = (attr.perm >> 6) & 0o7;
                if (who.is_root() && command_kind(top).is_none()) || want & !bits == 0 {
                    reply.ok();
                } else {
                    reply.error(Errno::EACCES);
                }
            }
        }
    }

    fn lseek(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: i64,
        whence: i32,
        reply: ReplyLseek,
    ) {
        match route(ino.0) {
            Route::Disk(i, ino) => match self.disk(i) {
                Ok(fs) => fs.lseek(req, INodeNo(ino), fh, offset, whence, reply),
                Err(e) => reply.error(e),
            },
            Route::Top(_) => reply.error(Errno::EINVAL),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inode_numbers_route_to_the_domain_or_to_one_disk_tree() {
        assert_eq!(route(ROOT), Route::Top(ROOT));
        assert_eq!(route(STATUS), Route::Top(STATUS));
        for index in [0, 1, MAX_DISKS - 1] {
            let base = disk_base(index);
            assert_eq!(route(base + 1), Route::Disk(index, 1));
            // The largest numbers a tree uses: its checkpoint files, from 1 << 56.
            let checkpoint = (1 << 56) + 2 * 1_000_000 + 1;
            assert_eq!(route(base + checkpoint), Route::Disk(index, checkpoint));
        }
        assert_ne!(disk_base(0), 0);
    }
}
