//! The FUSE adapter: presents a [`Catalog`] of views and the control files as a file tree. All
//! format knowledge stays in the engine and all command logic in [`crate::control`]; this module
//! translates requests and tells the kernel what changed.

mod gate;
mod nodes;

use std::cell::RefCell;
use std::collections::HashMap;
use std::ffi::OsStr;
use std::os::fd::FromRawFd;
use std::sync::{Arc, OnceLock};

use fuser::{
    Errno, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, InitFlags,
    KernelConfig, Notifier, OpenAccMode, OpenFlags, ReplyAttr, ReplyData, ReplyDirectory,
    ReplyEmpty, ReplyEntry, ReplyLseek, ReplyOpen, ReplyStatfs, ReplyXattr, Request,
};
use parking_lot::Mutex;

use crate::catalog::{Catalog, ViewEntry};
use crate::control::{Controller, Effect, Target};
use crate::info;
pub use nodes::Ownership;
use nodes::{Node, TTL};

/// Largest request we ask the kernel for (reads and writes): 1 MiB, FUSE's `max_pages` of 256.
pub const MAX_REQUEST: u32 = 1 << 20;

pub struct SnapFs {
    catalog: Arc<Catalog>,
    controller: Arc<Controller>,
    owner: Ownership,
    /// Open handles per inode, and the inodes a running command has claimed: a command may
    /// not change or remove a file that is open, and a claimed file cannot be opened.
    open_handles: Mutex<Handles>,
    /// Set once the session exists; used to tell the kernel about changes.
    notifier: Arc<OnceLock<Notifier>>,
    /// Bounds the threads answering large reads at once.
    large_reads: gate::Gate,
    /// Whether the disk files (live.raw, snapshots) go through the kernel page cache.
    caching: DataCaching,
    /// How many threads answer requests (see [`SnapFs::announce`]).
    worker_threads: usize,
}

/// How the kernel caches the contents of the disk files (live.raw and the snapshots).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataCaching {
    /// Pages are kept across opens: a second read of a file is a copy out of memory. Each first
    /// read pays for a page cache page per 4 KiB (FUSE in Linux 6.18 has no large folios) and a
    /// second copy, into the reader's buffer.
    PageCache,
    /// Every read and write goes to snapfs, which copies straight into or out of the caller's
    /// buffer (`FOPEN_DIRECT_IO`, as qemu-storage-daemon's export does): one pass over a file
    /// costs about half as much, nothing is kept, a second pass costs as much as the first.
    /// Memory maps still work (through the page cache) where the kernel allows them on such
    /// files (Linux 6.6 and later).
    Bypass,
}

/// See [`SnapFs::open_handles`].
#[derive(Default)]
struct Handles {
    open: HashMap<u64, u32>,
    claimed: std::collections::HashSet<u64>,
}

thread_local! {
    /// Each FUSE worker thread reuses one read buffer instead of allocating per request.
    static READ_BUF: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// The reply to a read that lies wholly in a hole: `MAX_REQUEST` zero bytes, read-only, made of
/// one 64 KiB piece of zeroed memory mapped over and over. No memset per request, and the
/// kernel's copy out of it reads the same 64 KiB again and again, from the CPU cache.
///
/// The piece is a memory file's own pages: the kernel's one shared zero page (what an untouched
/// anonymous mapping would give) is a "special" page that the kernel's fast lookup of a
/// sender's pages refuses, so every reply out of it took the slow path (the process's mapping
/// lock and a tree walk per page); measured on a sequential read of a sparse snapshot with
/// `--direct-io`: ~8% of all CPU. (A zeroed static would land in .rodata: 256 pages of the
/// binary.)
fn zeros() -> &'static [u8] {
    static ZEROS: OnceLock<&'static [u8]> = OnceLock::new();
    ZEROS.get_or_init(|| {
        map_repeated_zeros(MAX_REQUEST as usize).unwrap_or_else(|e| {
            log::debug!("zero buffer from one repeated piece: {e}; using a plain one");
            Box::leak(vec![0u8; MAX_REQUEST as usize].into_boxed_slice())
        })
    })
}

/// Maps `len` bytes (a multiple of the piece) read-only, every 64 KiB of it the same zeroed
/// pages of a memory file.
fn map_repeated_zeros(len: usize) -> std::io::Result<&'static [u8]> {
    const PIECE: usize = 64 << 10;
    let last_error = || std::io::Error::last_os_error();
    // SAFETY: plain syscalls. The memory file is closed at the end (its mappings keep it
    // alive). The reserved range is fresh and ours; each fixed mapping replaces part of it and
    // nothing else. The result is never unmapped, so the slice lives for 'static, and every
    // byte of it reads as zero: a new memory file is all zeros, and its pages are allocated
    // (fallocate) before it is mapped.
    unsafe {
        let fd = libc::memfd_create(c"snapfs-zeros".as_ptr(), libc::MFD_CLOEXEC);
        if fd < 0 {
            return Err(last_error());
        }
        let file = std::fs::File::from_raw_fd(fd);
        if libc::fallocate(fd, 0, 0, PIECE as libc::off_t) != 0 {
            return Err(last_error());
        }
        let base = libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_NONE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        );
        if base == libc::MAP_FAILED {
            return Err(last_error());
        }
        for at in (0..len).step_by(PIECE) {
            let p = libc::mmap(
                base.cast::<u8>().add(at).cast(),
                PIECE.min(len - at),
                libc::PROT_READ,
                libc::MAP_SHARED | libc::MAP_FIXED,
                fd,
                0,
            );
            if p == libc::MAP_FAILED {
                let e = last_error();
                libc::munmap(base, len);
                return Err(e);
            }
        }
        drop(file);
        Ok(std::slice::from_raw_parts(base as *const u8, len))
    }
}

/// Reads at least this long ask first whether they lie in a hole (a mapping walk, cheap next to
/// copying the bytes); shorter ones just read.
const HOLE_CHECK_MIN: usize = 64 << 10;

fn errno(e: &crate::error::Error) -> Errno {
    Errno::from_i32(e.errno())
}

impl SnapFs {
    pub fn new(
        catalog: Arc<Catalog>,
        controller: Arc<Controller>,
        owner: Ownership,
        notifier: Arc<OnceLock<Notifier>>,
        caching: DataCaching,
        worker_threads: usize,
    ) -> Self {
        SnapFs {
            catalog,
            controller,
            owner,
            open_handles: Mutex::new(Handles::default()),
            notifier,
            large_reads: gate::Gate::for_this_machine(),
            caching,
            worker_threads,
        }
    }

    /// Sends the data of a read. Large replies into the page cache pass the gate first: their
    /// cost is the kernel's copy into the page cache, made in this call, while the reader needs
    /// a core of its own to allocate those pages and copy them out. (The pread before it does
    /// not pass: disk reads of a host image out of the page cache still overlap.) Replies with
    /// `--direct-io` go straight into a reader that waits for them, so they take no pass: two
    /// readers at once read 8 GiB in 1.0 s without the gate and 1.8 s with it.
    fn reply_read(&self, reply: ReplyData, data: &[u8]) {
        let gated = data.len() >= gate::LARGE_READ && self.caching == DataCaching::PageCache;
        let _pass = gated.then(|| self.large_reads.enter());
        reply.data(data);
    }

    fn node(&self, ino: INodeNo) -> Result<Node, Errno> {
        Node::from_ino(ino.0, &self.catalog).ok_or(Errno::ENOENT)
    }

    fn info_json(&self) -> Vec<u8> {
        let mut json = serde_json::to_vec_pretty(&info::catalog_info(&self.catalog))
            .unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}").into_bytes());
        json.push(b'\n');
        json
    }

    fn attr(&self, node: Node) -> Result<fuser::FileAttr, Errno> {
        Ok(match node.view(&self.catalog) {
            Some(entry) => {
                // Damaged metadata fails the reads that meet it, not every stat of the file.
                let allocated = entry.view.allocated_bytes().unwrap_or_else(|e| {
                    log::error!("{}: counting allocated bytes: {e}", entry.file_name);
                    0
                });
                let mtime = match node {
                    Node::Live => Some(self.owner.image_mtime),
                    _ => entry.created,
                };
                self.owner.attr(node, entry.view.size(), allocated, mtime)
            }
            None if node == Node::InfoJson => {
                let len = self.info_json().len() as u64;
                self.owner.attr(node, len, len, None)
            }
            None => self.owner.attr(node, 0, 0, None),
        })
    }

    /// Whether `target` is open; if it is not, it stays closed (claimed) until the running
    /// command ends, so that an open cannot slip in between the check and the change.
    fn is_open_else_claim(&self, target: Target) -> bool {
        let ino = match target {
            Target::Live => nodes::LIVE,
            Target::Snapshot(key) => nodes::FIRST_SNAPSHOT + key,
        };
        let mut handles = self.open_handles.lock();
        if handles.open.contains_key(&ino) {
            return true;
        }
        handles.claimed.insert(ino);
        false
    }

    /// Tells the kernel what a command changed: dropped names, new names, stale live pages.
    /// Returns once the kernel has dropped the names, or after [`TTL`] at the most (when its
    /// cached entries would have expired anyway), so that a `stat` right after the command's
    /// `write` returns sees the new names. (Not with one worker thread: see below.)
    fn announce(&self, effect: &Effect) {
        let Some(notifier) = self.notifier.get() else {
            return;
        };
        if effect.live_changed
            && let Err(e) = notifier.inval_inode(INodeNo(nodes::LIVE), 0, 0)
        {
            log::debug!("invalidating live.raw: {e}");
        }
        for key in &effect.changed {
            let _ = notifier.inval_inode(INodeNo(nodes::FIRST_SNAPSHOT + key), 0, 0);
        }
        let names: Vec<(u64, String)> = effect
            .removed
            .iter()
            .chain(&effect.added)
            .cloned()
            .collect();
        if names.is_empty() {
            return;
        }
        // Entry invalidation takes the directory's lock, which a lookup or readdir in snapshots/
        // holds while it waits for a reply from this daemon: it runs on its own thread, and the
        // wait for it is bounded. With a single worker thread (the one that would wait here) a
        // concurrent `ls` would hold every command up for the whole bound, so that mount does not
        // wait, and a name may show for a moment after its command.
        let notifier = notifier.clone();
        let (done, finished) = std::sync::mpsc::channel::<()>();
        std::thread::spawn(move || {
            for (_, name) in names {
                let _ = notifier.inval_entry(INodeNo(nodes::SNAPSHOTS_DIR), OsStr::new(&name));
            }
            let _ = notifier.inval_inode(INodeNo(nodes::SNAPSHOTS_DIR), 0, 0);
            let _ = done.send(());
        });
        if self.worker_threads > 1 && finished.recv_timeout(TTL).is_err() {
            log::debug!("snapshots/: the kernel took longer than {TTL:?} to drop changed names");
        }
    }

    /// The mode bits decide, as the kernel's `default_permissions` would: the owner's, the
    /// group's (primary or supplementary) or the others' bits by who asks. Root may do anything
    /// except write what has no write bit (snapshot files: not even root writes them).
    fn permitted(&self, req: &Request, node: Node, read: bool, write: bool, search: bool) -> bool {
        let attr = self.owner.attr(node, 0, 0, None);
        let perm = attr.perm as u32;
        if req.uid() == 0 {
            return !write || perm & 0o222 != 0;
        }
        let bits = if req.uid() == attr.uid {
            perm >> 6
        } else if req.gid() == attr.gid || in_group(req.pid(), attr.gid) {
            perm >> 3
        } else {
            perm
        } & 0o7;
        (!read || bits & 0o4 != 0) && (!write || bits & 0o2 != 0) && (!search || bits & 0o1 != 0)
    }

    fn xattrs(entry: &ViewEntry) -> Vec<(&'static str, String)> {
        let mut list = vec![
            ("user.snapfs.kind", entry.kind.as_str().to_owned()),
            ("user.snapfs.id", entry.id.clone()),
            ("user.snapfs.layer", entry.layer_path.display().to_string()),
            ("user.snapfs.vm-state-size", entry.vm_state_size.to_string()),
        ];
        if let Some(t) = entry.created.filter(|t| *t >= std::time::UNIX_EPOCH) {
            list.push(("user.snapfs.created", info::rfc3339(t)));
        }
        if let Some(p) = &entry.parent {
            list.push(("user.snapfs.parent", p.clone()));
        }
        if let Some(d) = &entry.description {
            list.push(("user.snapfs.description", d.clone()));
        }
        if let Some(state) = &entry.state {
            list.push(("user.snapfs.state", state.clone()));
        }
        if entry.libvirt_name.is_some() {
            list.push(("user.snapfs.current", entry.current.to_string()));
        }
        list
    }
}

/// Whether process `pid` has `gid` among its supplementary groups (FUSE passes only the primary
/// group; /proc has the rest).
fn in_group(pid: u32, gid: u32) -> bool {
    let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
        return false;
    };
    status
        .lines()
        .find_map(|l| l.strip_prefix("Groups:"))
        .is_some_and(|groups| {
            groups
                .split_whitespace()
                .any(|g| g.parse::<u32>() == Ok(gid))
        })
}

/// Answers an xattr request: the size when `size` is 0, ERANGE when the buffer is too small.
fn reply_xattr(reply: ReplyXattr, size: u32, data: &[u8]) {
    if size == 0 {
        reply.size(data.len() as u32);
    } else if (size as usize) < data.len() {
        reply.error(Errno::ERANGE);
    } else {
        reply.data(data);
    }
}

impl Filesystem for SnapFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        let _ = config.set_max_write(MAX_REQUEST);
        let _ = config.set_max_readahead(MAX_REQUEST);
        // Without this the kernel asks for `security.capability` (a GETXATTR round trip) before
        // every write, to know whether the write must drop privileges: two requests per write.
        // With it, the kernel leaves that to us and marks the file system "nosec", so it asks
        // at most once per inode. There is nothing for us to drop: no file of ours ever has
        // set-user-ID or set-group-ID bits (modes are masked with 0o777) or file capabilities.
        let _ = config.add_capabilities(InitFlags::FUSE_HANDLE_KILLPRIV_V2);
        if self.caching == DataCaching::Bypass {
            // Lets a program map a file opened for direct I/O (the map goes through the page
            // cache). Kernels without it refuse such maps with ENODEV.
            let _ = config.add_capabilities(InitFlags::FUSE_DIRECT_IO_ALLOW_MMAP);
        }
        Ok(())
    }

    fn destroy(&mut self) {
        if let Err(e) = self.catalog.live().view.flush() {
            log::error!("flushing live.raw at unmount: {e}");
        }
    }

    fn lookup(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let result = self.node(parent).and_then(|dir| {
            // Looking a name up in a directory needs its search (x) bit.
            if !self.permitted(req, dir, false, false, true) {
                return Err(Errno::EACCES);
            }
            let name = name.to_str().ok_or(Errno::ENOENT)?;
            let child = dir.child(&self.catalog, name).ok_or(Errno::ENOENT)?;
            self.attr(child)
        });
        match result {
            Ok(attr) => reply.entry(&TTL, &attr, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.node(ino).and_then(|n| self.attr(n)) {
            Ok(attr) => reply.attr(&TTL, &attr),
            Err(e) => reply.error(e),
        }
    }

    fn open(&self, req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let node = match self.node(ino) {
            Ok(n) => n,
            // A view that a command removed, reached through a name the kernel still caches:
            // ESTALE makes the kernel look the name up again (and find a newer view, if any).
            Err(_) => return reply.error(Errno::ESTALE),
        };
        let wants_write = flags.acc_mode() != OpenAccMode::O_RDONLY;
        let wants_read = flags.acc_mode() != OpenAccMode::O_WRONLY;
        if !self.permitted(req, node, wants_read, wants_write, false) {
            return reply.error(Errno::EACCES);
        }
        let open_flags = match node {
            Node::Root | Node::SnapshotsDir | Node::ControlDir => {
                return reply.error(Errno::EISDIR);
            }
            Node::Live if wants_write && !self.catalog.live().view.is_writable() => {
                return reply.error(Errno::EROFS);
            }
            Node::Snapshot(_) if wants_write => return reply.error(Errno::EACCES),
            Node::Live | Node::Snapshot(_) if self.caching == DataCaching::Bypass => {
                FopenFlags::FOPEN_DIRECT_IO
            }
            // Every change of the live disk goes through the kernel (or is announced to it), so
            // its page cache stays valid across opens.
            Node::Live => FopenFlags::FOPEN_KEEP_CACHE,
            // Each write to a command file is one command: no caching, no merging.
            Node::Command(_) if wants_read => return reply.error(Errno::EACCES),
            Node::Command(_) => FopenFlags::FOPEN_DIRECT_IO,
            Node::Status | Node::InfoJson if wants_write => return reply.error(Errno::EACCES),
            Node::Status | Node::InfoJson => FopenFlags::FOPEN_DIRECT_IO,
            // Snapshot files never change while they exist: keep their pages across opens.
            Node::Snapshot(_) => FopenFlags::FOPEN_KEEP_CACHE,
        };
        {
            let mut handles = self.open_handles.lock();
            if handles.claimed.contains(&ino.0) {
                // A command is changing or removing this very file right now.
                return reply.error(Errno::EBUSY);
            }
            *handles.open.entry(ino.0).or_insert(0) += 1;
        }
        reply.opened(FileHandle(0), open_flags);
    }

    fn release(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<fuser::LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        let mut handles = self.open_handles.lock();
        if let Some(n) = handles.open.get_mut(&ino.0) {
            *n -= 1;
            if *n == 0 {
                handles.open.remove(&ino.0);
            }
        }
        reply.ok();
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<fuser::LockOwner>,
        reply: ReplyData,
    ) {
        let node = match self.node(ino) {
            Ok(n) => n,
            Err(e) => return reply.error(e),
        };
        let text = match node {
            Node::InfoJson => Some(self.info_json()),
            Node::Status => Some(self.controller.status_text().into_bytes()),
            _ => None,
        };
        if let Some(text) = text {
            let start = (offset as usize).min(text.len());
            let end = start.saturating_add(size as usize).min(text.len());
            return reply.data(&text[start..end]);
        }
        let Some(entry) = node.view(&self.catalog) else {
            return reply.error(Errno::EISDIR);
        };
        let view = &entry.view;
        let len = view.size().saturating_sub(offset).min(size as u64) as usize;
        if len >= HOLE_CHECK_MIN && len <= zeros().len() {
            // An error here is left to the read below, which reports it.
            if let Ok((crate::view::Extent::Hole, hole)) = view.extent_at(offset, len as u64)
                && hole >= len as u64
            {
                return self.reply_read(reply, &zeros()[..len]);
            }
        }
        READ_BUF.with_borrow_mut(|buf| {
            // Every byte is overwritten by the read, so a reused buffer needs no clearing.
            if buf.len() < len {
                buf.resize(len, 0);
            }
            match view.read_at(&mut buf[..len], offset) {
                Ok(()) => self.reply_read(reply, &buf[..len]),
                Err(e) => {
                    log::error!("{}: read {len} bytes at {offset:#x}: {e}", entry.file_name);
                    reply.error(errno(&e));
                }
            }
        });
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: fuser::WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<fuser::LockOwner>,
        reply: fuser::ReplyWrite,
    ) {
        match self.node(ino) {
            Ok(Node::Live) => {}
            Ok(Node::Command(kind)) => {
                let result = self
                    .controller
                    .run(kind, data, &|t| self.is_open_else_claim(t));
                self.open_handles.lock().claimed.clear();
                return match result {
                    Ok(effect) => {
                        self.announce(&effect);
                        reply.written(data.len() as u32)
                    }
                    Err(e) => {
                        log::warn!("control/{}: {}", kind.file_name(), e.message);
                        reply.error(Errno::from_i32(e.errno))
                    }
                };
            }
            Ok(_) => return reply.error(Errno::EBADF),
            Err(e) => return reply.error(e),
        }
        // An external snapshot may switch the top while this write is on its way: the old top
        // refuses it, and it goes to the new one.
        for _ in 0..1000 {
            let live = self.catalog.live();
            let size = live.view.size();
            if offset >= size && !data.is_empty() {
                return reply.error(Errno::ENOSPC);
            }
            // A write that runs past the end is cut short, as a block device does.
            let len = (size - offset).min(data.len() as u64) as usize;
            match live.view.write_at(&data[..len], offset) {
                Ok(()) => return reply.written(len as u32),
                Err(crate::error::Error::Retired { .. }) => {
                    std::thread::sleep(std::time::Duration::from_millis(1));
                }
                Err(e) => {
                    log::error!("live.raw: write {len} bytes at {offset:#x}: {e}");
                    return reply.error(errno(&e));
                }
            }
        }
        reply.error(Errno::EIO)
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: fuser::LockOwner,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        if ino.0 != nodes::LIVE {
            return reply.ok();
        }
        match self.catalog.live().view.flush() {
            Ok(()) => reply.ok(),
            Err(e) => {
                log::error!("live.raw: fsync: {e}");
                reply.error(errno(&e));
            }
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        _mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<fuser::TimeOrNow>,
        _mtime: Option<fuser::TimeOrNow>,
        _ctime: Option<std::time::SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<std::time::SystemTime>,
        _chgtime: Option<std::time::SystemTime>,
        _bkuptime: Option<std::time::SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let node = match self.node(ino) {
            Ok(n) => n,
            Err(e) => return reply.error(e),
        };
        match (node, size) {
            (Node::Live, Some(new_size)) => {
                let view = &self.catalog.live().view;
                if new_size != view.size()
                    && let Err(e) = view.grow(new_size)
                {
                    log::warn!("live.raw: resize to {new_size}: {e}");
                    return reply.error(errno(&e));
                }
            }
            // `echo NAME > control/create` truncates before it writes: nothing to truncate.
            (Node::Command(_), Some(_)) => {}
            (_, Some(_)) => return reply.error(Errno::EACCES),
            // Owner, mode and times follow the image file; changes are accepted and ignored, as
            // on file systems without such metadata.
            (_, None) => {}
        }
        match self.attr(node) {
            Ok(attr) => reply.attr(&TTL, &attr),
            Err(e) => reply.error(e),
        }
    }

    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        if ino.0 != nodes::LIVE {
            return reply.error(Errno::EOPNOTSUPP);
        }
        let view = &self.catalog.live().view;
        let known =
            libc::FALLOC_FL_KEEP_SIZE | libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_ZERO_RANGE;
        if mode & !known != 0 {
            return reply.error(Errno::EOPNOTSUPP);
        }
        let zeroing = mode & (libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_ZERO_RANGE) != 0;
        let end = offset.saturating_add(length);
        let result = if zeroing {
            view.zero_range(offset, length)
        } else if end <= view.size() || mode & libc::FALLOC_FL_KEEP_SIZE != 0 {
            // Plain preallocation inside the disk: every block already exists.
            Ok(())
        } else {
            view.grow(end.next_multiple_of(512))
        };
        match result {
            Ok(()) => reply.ok(),
            Err(e) => {
                log::error!(
                    "live.raw: fallocate mode {mode:#x} {length} bytes at {offset:#x}: {e}"
                );
                reply.error(errno(&e));
            }
        }
    }

    fn opendir(&self, req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.node(ino) {
            Ok(dir) if dir.kind() == FileType::Directory => {
                if self.permitted(req, dir, true, false, false) {
                    reply.opened(FileHandle(0), FopenFlags::empty());
                } else {
                    reply.error(Errno::EACCES);
                }
            }
            Ok(_) => reply.error(Errno::ENOTDIR),
            Err(e) => reply.error(e),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let dir = match self.node(ino) {
            Ok(n) if n.kind() == FileType::Directory => n,
            Ok(_) => return reply.error(Errno::ENOTDIR),
            Err(e) => return reply.error(e),
        };
        let mut entries = vec![(dir, ".".to_owned()), (dir.parent(), "..".to_owned())];
        entries.extend(dir.children(&self.catalog));
        for (i, (node, name)) in entries.iter().enumerate().skip(offset as usize) {
            if reply.add(INodeNo(node.ino()), (i + 1) as u64, node.kind(), name) {
                break;
            }
        }
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let snapshots = self.catalog.snapshots();
        let used: u64 = snapshots.iter().map(|(_, v)| v.view.size()).sum::<u64>()
            + self.catalog.live().view.size();
        let files = snapshots.len() as u64 + 10;
        reply.statfs(used.div_ceil(4096), 0, 0, files, 0, 4096, 255, 4096);
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        // Only our own names exist; the kernel's own questions (security.capability, ACLs)
        // are answered without building the list.
        if !name.as_encoded_bytes().starts_with(b"user.snapfs.") {
            return reply.error(Errno::NO_XATTR);
        }
        let Some(entry) = self.node(ino).ok().and_then(|n| n.view(&self.catalog)) else {
            return reply.error(Errno::NO_XATTR);
        };
        match Self::xattrs(&entry)
            .into_iter()
            .find(|(n, _)| OsStr::new(n) == name)
        {
            Some((_, value)) => reply_xattr(reply, size, value.as_bytes()),
            None => reply.error(Errno::NO_XATTR),
        }
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        let mut names = Vec::new();
        if let Some(entry) = self.node(ino).ok().and_then(|n| n.view(&self.catalog)) {
            for (name, _) in Self::xattrs(&entry) {
                names.extend_from_slice(name.as_bytes());
                names.push(0);
            }
        }
        reply_xattr(reply, size, &names);
    }

    fn access(&self, req: &Request, ino: INodeNo, mask: fuser::AccessFlags, reply: ReplyEmpty) {
        let node = match self.node(ino) {
            Ok(n) => n,
            Err(e) => return reply.error(e),
        };
        let bits = mask.bits();
        let read = bits & libc::R_OK != 0;
        let write = bits & libc::W_OK != 0;
        let search = bits & libc::X_OK != 0 && node.kind() == FileType::Directory;
        if self.permitted(req, node, read, write, search) {
            reply.ok();
        } else {
            reply.error(Errno::EACCES);
        }
    }

    fn lseek(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: i64,
        whence: i32,
        reply: ReplyLseek,
    ) {
        let Some(entry) = self.node(ino).ok().and_then(|n| n.view(&self.catalog)) else {
            return reply.error(Errno::EINVAL);
        };
        let Ok(offset) = u64::try_from(offset) else {
            return reply.error(Errno::ENXIO);
        };
        let found = match whence {
            libc::SEEK_DATA => entry.view.seek_data(offset),
            libc::SEEK_HOLE => entry.view.seek_hole(offset),
            _ => return reply.error(Errno::EINVAL),
        };
        match found {
            Ok(Some(pos)) => reply.offset(pos as i64),
            Ok(None) => reply.error(Errno::ENXIO),
            Err(e) => {
                log::error!("{}: lseek at {offset:#x}: {e}", entry.file_name);
                reply.error(errno(&e));
            }
        }
    }
}
