//! The FUSE adapter: presents a [`Catalog`] of views and the control files as a file tree. All
//! format knowledge stays in the engine, all command logic in [`crate::control`], and what a
//! caller may do in [`access`] (answers, no FUSE calls); this module translates requests, asks,
//! and tells the kernel what changed.

mod access;
mod attrs;
mod changes;
mod commands;
pub mod domain;
mod errno;
mod files;
mod gate;
mod handles;
mod nodes;
mod xattrs;
mod zeros;

use std::cell::RefCell;
use std::ffi::OsStr;
use std::sync::{Arc, OnceLock};

use fuser::{
    Errno, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, InitFlags,
    KernelConfig, Notifier, OpenAccMode, OpenFlags, ReplyAttr, ReplyData, ReplyDirectory,
    ReplyEmpty, ReplyEntry, ReplyLseek, ReplyOpen, ReplyStatfs, ReplyXattr, Request,
};
use parking_lot::Mutex;

use crate::access::{Caller, DeviceWrites, EXEC, LayerPerms, READ, WRITE};
use crate::catalog::{Catalog, ViewEntry};
use crate::control::{CommandKind, Controller, Effect, Target};
use crate::info;
use crate::sharing::Sharing;
use access::{Guard, MetadataChange};
pub use attrs::Ownership;
use attrs::{AttrParts, file_attr};
use commands::CommandQueue;
use handles::Handles;
use nodes::{Node, TTL};

/// Largest request we ask the kernel for (reads and writes): 1 MiB, FUSE's `max_pages` of 256.
pub const MAX_REQUEST: u32 = 1 << 20;

pub struct SnapFs {
    catalog: Arc<Catalog>,
    controller: Arc<Controller>,
    owner: Ownership,
    /// Which backing files snapfs may write at all (shown in the modes).
    devices: DeviceWrites,
    /// Open files, who opened them, and the files a running command has claimed.
    handles: Arc<Mutex<Handles>>,
    /// Commands run here, one at a time, off the threads that answer requests. Started in
    /// `init`, in the process that serves (a background mount forks after `new`, and threads do
    /// not survive a fork).
    commands: Option<CommandQueue>,
    announcer: Announcer,
    /// Bounds the threads answering large reads at once.
    large_reads: gate::Gate,
    /// Whether the disk files (live.raw, snapshots) go through the kernel page cache.
    caching: DataCaching,
    /// Other processes that may write the chain's files (`--force-share`).
    sharing: Arc<Sharing>,
    /// The files of `changes/` and the lists their open handles read.
    changes: Arc<changes::ChangeFiles>,
    /// Added to every inode number this tree tells the kernel: on a domain mount each disk's
    /// tree has a range of its own (see [`domain`]); 0 on a mount of one image.
    ino_base: u64,
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

thread_local! {
    /// Each FUSE worker thread reuses one read buffer instead of allocating per request.
    static READ_BUF: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

fn errno(e: &crate::error::Error) -> Errno {
    Errno::from_i32(e.errno())
}

/// The caller of a request.
fn caller(req: &Request) -> Caller {
    Caller::of_request(req.uid(), req.gid(), req.pid())
}

/// What a node's content comes from, for [`access`].
fn guard(node: Node, catalog: &Catalog, writable: bool) -> Guard {
    match node {
        Node::Live => Guard::View { from: 0, writable },
        Node::Snapshot(key) => Guard::View {
            // A view that is gone reads nothing: past the end of any chain.
            from: catalog.get(key).map_or(usize::MAX, |e| e.layer),
            writable: false,
        },
        Node::InfoJson | Node::Status => Guard::ChainText,
        Node::Command(_) => Guard::Command,
        Node::Root | Node::ControlDir => Guard::Entry,
        // Names that come from every file of the chain, as in snapshots/.
        Node::SnapshotsDir | Node::CheckpointsDir | Node::ChangesDir => Guard::SnapshotsDir,
        // A checkpoint shows the live disk (and which parts of it changed): read as live.raw.
        Node::Checkpoint { .. } => Guard::View {
            from: 0,
            writable: false,
        },
        // Decided where the pair is known (`SnapFs::guard`); this is what a gone pair gets.
        Node::Change(_) => Guard::View {
            from: usize::MAX,
            writable: false,
        },
    }
}

/// Tells the kernel what a command changed. Cloned into the command thread.
#[derive(Clone)]
struct Announcer {
    /// Set once the session exists.
    notifier: Arc<OnceLock<Notifier>>,
    /// How many threads answer requests (see [`Announcer::announce`]).
    worker_threads: usize,
    /// The names of `changes/` the kernel knows, to drop those of removed views.
    changes: Arc<changes::ChangeFiles>,
    catalog: Arc<Catalog>,
    /// The tree's [`SnapFs::ino_base`].
    ino_base: u64,
}

impl Announcer {
    /// [`Announcer::announce`] without waiting for the kernel: for changes found while a
    /// request in snapshots/ is being answered (the kernel drops the names once it is).
    fn announce_later(&self, effect: Effect) {
        let announcer = Announcer {
            worker_threads: 1,
            ..self.clone()
        };
        std::thread::spawn(move || announcer.announce(&effect));
    }

    /// Drops dropped names, new names and stale pages from the kernel's caches. Returns once the
    /// kernel has dropped the names, or after [`TTL`] at the most (when its cached entries would
    /// have expired anyway), so that a `stat` right after the command's `write` returns sees the
    /// new names. (Not with one worker thread: see below.)
    fn announce(&self, effect: &Effect) {
        let Some(notifier) = self.notifier.get() else {
            return;
        };
        let base = self.ino_base;
        if effect.live_changed
            && let Err(e) = notifier.inval_inode(INodeNo(base + nodes::LIVE), 0, 0)
        {
            log::debug!("invalidating live.raw: {e}");
        }
        for key in &effect.changed {
            let _ = notifier.inval_inode(INodeNo(base + nodes::FIRST_SNAPSHOT + key), 0, 0);
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
        // wait for it is bounded. With a single worker thread (busy in that lookup) a concurrent
        // `ls` would hold every command up for the whole bound, so that mount does not wait,
        // and a name may show for a moment after its command.
        let notifier = notifier.clone();
        let (changes, catalog) = (self.changes.clone(), self.catalog.clone());
        let (done, finished) = std::sync::mpsc::channel::<()>();
        std::thread::spawn(move || {
            for (_, name) in names {
                let _ =
                    notifier.inval_entry(INodeNo(base + nodes::SNAPSHOTS_DIR), OsStr::new(&name));
            }
            for name in changes.gone_names(&catalog) {
                let _ = notifier.inval_entry(INodeNo(base + nodes::CHANGES_DIR), OsStr::new(&name));
            }
            let _ = notifier.inval_inode(INodeNo(base + nodes::SNAPSHOTS_DIR), 0, 0);
            // changes/ lists pairs of these names.
            let _ = notifier.inval_inode(INodeNo(base + nodes::CHANGES_DIR), 0, 0);
            let _ = done.send(());
        });
        if self.worker_threads > 1 && finished.recv_timeout(TTL).is_err() {
            log::debug!("snapshots/: the kernel took longer than {TTL:?} to drop changed names");
        }
    }
}

/// Whether `target` is open; if it is not, it stays closed (claimed) until the running command
/// ends, so that an open cannot slip in between the check and the change.
fn is_open_else_claim(handles: &Mutex<Handles>, target: Target) -> bool {
    let ino = match target {
        Target::Live => nodes::LIVE,
        Target::Snapshot(key) => nodes::FIRST_SNAPSHOT + key,
    };
    handles.lock().is_open_else_claim(ino)
}

impl SnapFs {
    /// Runs a guest change (write, hole punch, resize) on the live view. An external create may
    /// switch the top while the request is on its way: the request resolved the old chain, the
    /// old top refuses it once retired ([`crate::error::Error::Retired`]), and it runs again on
    /// the live view of the new chain (see `Controller::switch_chain`). The catalog switches
    /// right after the old top retires, so a retry finds the new top at once or after a
    /// moment.
    fn on_live<T>(
        &self,
        op: impl Fn(&crate::view::View) -> crate::error::Result<T>,
    ) -> crate::error::Result<T> {
        let mut tries = 0;
        loop {
            let live = self.catalog.live();
            match op(&live.view) {
                Err(crate::error::Error::Retired { .. }) if tries < 1000 => {
                    tries += 1;
                    std::thread::sleep(std::time::Duration::from_millis(1));
                }
                result => return result,
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    pub fn new(
        catalog: Arc<Catalog>,
        controller: Arc<Controller>,
        owner: Ownership,
        devices: DeviceWrites,
        notifier: Arc<OnceLock<Notifier>>,
        caching: DataCaching,
        worker_threads: usize,
        sharing: Arc<Sharing>,
    ) -> Self {
        let changes = Arc::new(changes::ChangeFiles::default());
        let announcer_catalog = catalog.clone();
        SnapFs {
            catalog,
            controller,
            owner,
            devices,
            handles: Arc::default(),
            commands: None,
            announcer: Announcer {
                notifier,
                worker_threads,
                changes: changes.clone(),
                catalog: announcer_catalog,
                ino_base: 0,
            },
            large_reads: gate::Gate::for_this_machine(),
            caching,
            sharing,
            changes,
            ino_base: 0,
        }
    }

    /// What `stat` shows of this tree's root (a disk's directory on a domain mount).
    pub(crate) fn root_attr(&self) -> Result<fuser::FileAttr, Errno> {
        self.attr(Node::Root)
    }

    /// This tree with its inode numbers moved up by `base` (a disk of a domain mount).
    pub fn with_ino_base(mut self, base: u64) -> Self {
        self.ino_base = base;
        self.announcer.ino_base = base;
        self
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
        match Node::from_ino(ino.0, &self.catalog) {
            Some(Node::Live) if self.live_hidden() => Err(Errno::ENOENT),
            Some(node) => Ok(node),
            None => Err(Errno::ENOENT),
        }
    }

    /// live.raw of a top another process writes is not shown (`--force-share`).
    fn live_hidden(&self) -> bool {
        self.sharing.is_force_share() && self.sharing.live_hidden(&self.catalog.chain())
    }

    /// On a `--force-share` mount, re-reads the chain if another process changed it (a VM's
    /// savevm or delvm) and tells the kernel which names changed, without waiting for it: this
    /// runs inside requests that hold the directory the names are in.
    fn follow_other_writers(&self) {
        match self.sharing.follow(&self.catalog) {
            Ok(Some(changes)) => self.announcer.announce_later(Effect {
                added: changes.added,
                removed: changes.removed,
                ..Effect::default()
            }),
            Ok(None) => {}
            Err(e) => log::warn!("re-reading the chain another process changed: {e}"),
        }
    }

    fn info_json(&self) -> Vec<u8> {
        let mut json =
            serde_json::to_vec_pretty(&info::catalog_info(&self.catalog, !self.live_hidden()))
                .unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}").into_bytes());
        json.push(b'\n');
        json
    }

    fn status_text(&self) -> String {
        let waiting = self.commands.as_ref().map(CommandQueue::waiting_text);
        self.controller.status_text()
            + &crate::checkpoints::status_lines(&self.catalog.chain())
            + &waiting.unwrap_or_default()
    }

    /// A read of `checkpoints/NAME.raw`: the live disk's bytes where the checkpoint marks a
    /// change, zeros elsewhere.
    fn read_checkpoint(
        &self,
        checkpoint: &crate::checkpoints::Checkpoint,
        offset: u64,
        size: u32,
        reply: ReplyData,
    ) {
        match files::read_marked(checkpoint, &self.catalog.live().view, offset, size) {
            Ok(bytes) => self.reply_read(reply, &bytes),
            Err(e) => {
                log::error!("checkpoint {}: read at {offset:#x}: {e}", checkpoint.name);
                reply.error(errno(&e));
            }
        }
    }

    /// The permissions of every file of the chain, read now.
    fn layer_perms(&self) -> Vec<LayerPerms> {
        crate::access::chain_perms(&self.catalog.chain(), self.devices)
    }

    fn guard(&self, node: Node) -> Guard {
        match node {
            Node::Change(ino) => self.changes.guard(&self.catalog, ino),
            _ => guard(node, &self.catalog, self.owner.writable),
        }
    }

    /// Whether the caller of `req` may do all of `want` to `node`.
    fn allows(&self, req: &Request, node: Node, want: u16) -> bool {
        access::allows(self.guard(node), &self.layer_perms(), &caller(req), want)
    }

    /// The owner `stat` shows (`-o uid=`/`gid=`, else the top image's) and the mode bits that
    /// the files behind `node` give each class.
    fn owner_and_mode(&self, node: Node) -> (u32, u32, u16) {
        let perms = self.layer_perms();
        let (top_uid, top_gid) = perms.first().and_then(LayerPerms::owner).unwrap_or((0, 0));
        let uid = self.owner.uid.unwrap_or(top_uid);
        let gid = self.owner.gid.unwrap_or(top_gid);
        (uid, gid, access::mode(self.guard(node), &perms, uid, gid))
    }

    fn attr(&self, node: Node) -> Result<fuser::FileAttr, Errno> {
        let (uid, gid, perm) = self.owner_and_mode(node);
        let (size, allocated, mtime) = match node.view(&self.catalog) {
            None if let Node::Change(ino) = node => self.change_sizes(ino)?,
            Some(entry) => {
                // Damaged metadata fails the reads that meet it, not every stat of the file.
                let allocated = entry.view.allocated_bytes().unwrap_or_else(|e| {
                    log::error!("{}: counting allocated bytes: {e}", entry.file_name);
                    0
                });
                let mtime = match node {
                    Node::Live => None,
                    _ => entry.created,
                };
                (entry.view.size(), allocated, mtime)
            }
            None if node == Node::InfoJson => {
                let len = self.info_json().len() as u64;
                (len, len, None)
            }
            None if matches!(node, Node::Checkpoint { .. }) => {
                let checkpoint = node.checkpoint(&self.catalog).ok_or(Errno::ENOENT)?;
                let size = self.catalog.live().view.size();
                match node {
                    Node::Checkpoint { json: true, .. } => {
                        let len = checkpoint.json(size).len() as u64;
                        (len, len, None)
                    }
                    _ => {
                        let dirty = checkpoint.ranges(size).iter().map(|r| r.1).sum();
                        (size, dirty, None)
                    }
                }
            }
            None => (0, 0, None),
        };
        let parts = AttrParts {
            size,
            allocated,
            mtime: mtime.unwrap_or(self.owner.image_mtime),
            uid,
            gid,
            perm,
        };
        let mut attr = file_attr(node, &parts);
        attr.ino = INodeNo(attr.ino.0 + self.ino_base);
        Ok(attr)
    }

    /// Hands a command to the command thread; it replies to the writer when it has run.
    fn submit_command(
        &self,
        kind: CommandKind,
        data: &[u8],
        who: Caller,
        reply: fuser::ReplyWrite,
    ) {
        let controller = self.controller.clone();
        let handles = self.handles.clone();
        let announcer = self.announcer.clone();
        let run = move |input: &[u8]| {
            let result = controller.run(kind, input, &who, &|t| is_open_else_claim(&handles, t));
            handles.lock().end_claims();
            announcer.announce(&result?);
            Ok(())
        };
        commands::submit_write(self.commands.as_ref(), kind, data.to_vec(), reply, run);
    }

    fn xattrs(&self, entry: &ViewEntry) -> Vec<(&'static str, String)> {
        let from = entry.view.layer_index();
        let consistency = self.sharing.consistency(entry.view.chain(), from);
        xattrs::of_view(entry, consistency)
    }
}

/// The rwx bits an `access(2)` mask asks for.
fn access_want(mask: fuser::AccessFlags) -> u16 {
    let bits = mask.bits();
    [(libc::R_OK, READ), (libc::W_OK, WRITE), (libc::X_OK, EXEC)]
        .into_iter()
        .filter(|(flag, _)| bits & flag != 0)
        .map(|(_, b)| b)
        .sum()
}

impl Filesystem for SnapFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        self.commands = Some(CommandQueue::start()?);
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
        // The running command finishes; waiting ones are answered without running.
        if let Some(commands) = &self.commands {
            commands.shutdown();
        }
        if let Err(e) = self.catalog.live().view.flush() {
            log::error!("flushing live.raw at unmount: {e}");
        }
        // A clean close: the bitmaps snapfs maintained are stored, in_use cleared.
        let _ = self.catalog.chain().store_bitmaps();
    }

    fn lookup(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let result = self.node(parent).and_then(|dir| {
            // Looking a name up in a directory needs its search (x) bit.
            if !self.allows(req, dir, EXEC) {
                return Err(Errno::EACCES);
            }
            let name = name.to_str().ok_or(Errno::ENOENT)?;
            if dir == Node::SnapshotsDir {
                self.follow_other_writers();
            }
            let child = match dir {
                Node::ChangesDir => self.lookup_change(name),
                _ => dir.child(&self.catalog, name),
            }
            .ok_or(Errno::ENOENT)?;
            if child == Node::Live && self.live_hidden() {
                return Err(Errno::ENOENT);
            }
            Ok((child.ttl(), self.attr(child)?))
        });
        match result {
            Ok((ttl, attr)) => reply.entry(&ttl, &attr, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.node(ino).and_then(|n| Ok((n.ttl(), self.attr(n)?))) {
            Ok((ttl, attr)) => reply.attr(&ttl, &attr),
            Err(e) => reply.error(e),
        }
    }

    fn open(&self, req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        // A snapshot another process may have deleted is checked before it is opened.
        if ino.0 >= nodes::FIRST_SNAPSHOT {
            self.follow_other_writers();
        }
        let node = match self.node(ino) {
            Ok(n) => n,
            // A view that a command removed, reached through a name the kernel still caches:
            // ESTALE makes the kernel look the name up again (and find a newer view, if any).
            Err(_) => return reply.error(Errno::ESTALE),
        };
        let wants = files::Wants {
            read: flags.acc_mode() != OpenAccMode::O_WRONLY,
            write: flags.acc_mode() != OpenAccMode::O_RDONLY,
        };
        if let Node::Change(ino) = node {
            return self.open_change(req, ino, wants.write, reply);
        }
        let live_writable = self.catalog.live().view.is_writable();
        let open_flags = match files::open_flags(node, wants, live_writable, self.caching) {
            Ok(flags) => flags,
            Err(e) => return reply.error(e),
        };
        let want = if wants.read { READ } else { 0 } | if wants.write { WRITE } else { 0 };
        let who = caller(req);
        if !access::allows(self.guard(node), &self.layer_perms(), &who, want) {
            return reply.error(Errno::EACCES);
        }
        match self.handles.lock().open(ino.0, who) {
            Ok(handle) => reply.opened(FileHandle(handle), open_flags),
            // A command is changing or removing this very file right now.
            Err(e) => reply.error(e),
        }
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<fuser::LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.handles.lock().release(fh.0);
        self.changes.release(fh.0);
        reply.ok();
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
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
        if let Node::Change(_) = node {
            return self.read_change(fh.0, offset, size, reply);
        }
        let text = match node {
            Node::InfoJson => Some(self.info_json()),
            Node::Status => Some(self.status_text().into_bytes()),
            Node::Checkpoint { json, .. } => {
                let Some(checkpoint) = node.checkpoint(&self.catalog) else {
                    return reply.error(Errno::ENOENT);
                };
                if !json {
                    return self.read_checkpoint(&checkpoint, offset, size, reply);
                }
                Some(checkpoint.json(self.catalog.live().view.size()))
            }
            _ => None,
        };
        if let Some(text) = text {
            return reply.data(files::text_at(&text, offset, size));
        }
        let Some(entry) = node.view(&self.catalog) else {
            return reply.error(Errno::EISDIR);
        };
        READ_BUF.with_borrow_mut(
            |buf| match files::read_view(&entry.view, offset, size, buf) {
                Ok(data) => self.reply_read(reply, data),
                Err(e) => {
                    log::error!("{}: read {size} bytes at {offset:#x}: {e}", entry.file_name);
                    reply.error(errno(&e));
                }
            },
        );
    }

    fn write(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
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
                // A command runs with the rights of whoever opened the file, as a descriptor
                // carries its opener's rights.
                let opener = self.handles.lock().opener(fh.0).cloned();
                let who = opener.unwrap_or_else(|| caller(req));
                return self.submit_command(kind, data, who, reply);
            }
            Ok(_) => return reply.error(Errno::EBADF),
            Err(e) => return reply.error(e),
        }
        let written =
            self.on_live(
                |view| match files::write_len(view.size(), offset, data.len()) {
                    Some(len) => view.write_at(&data[..len], offset).map(|()| Some(len)),
                    None => Ok(None),
                },
            );
        match written {
            Ok(Some(len)) => reply.written(len as u32),
            Ok(None) => reply.error(Errno::ENOSPC),
            Err(e) => {
                log::error!("live.raw: write {} bytes at {offset:#x}: {e}", data.len());
                reply.error(errno(&e))
            }
        }
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
        match self.catalog.live().view.flush_writes() {
            Ok(()) => reply.ok(),
            Err(e) => {
                log::error!("live.raw: fsync: {e}");
                reply.error(errno(&e));
            }
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
        let who = caller(req);
        let change = MetadataChange {
            mode,
            uid,
            gid,
            times: atime.is_some() || mtime.is_some(),
        };
        let (shown_uid, shown_gid, perm) = self.owner_and_mode(node);
        if let Err(e) = access::metadata_change(&change, &who, shown_uid, shown_gid, perm) {
            return reply.error(e);
        }
        if let Some(new_size) = size {
            // truncate(2) needs write permission, as a write does (open checked it for
            // ftruncate; a path truncate comes here without an open).
            if !access::allows(self.guard(node), &self.layer_perms(), &who, WRITE) {
                return reply.error(Errno::EACCES);
            }
            match node {
                Node::Live => {
                    let grown = self.on_live(|view| files::resize(view, new_size));
                    if let Err(e) = grown {
                        log::warn!("live.raw: resize to {new_size}: {e}");
                        return reply.error(errno(&e));
                    }
                }
                // `echo NAME > control/create` truncates before it writes: nothing to truncate.
                Node::Command(_) => {}
                _ => return reply.error(Errno::EACCES),
            }
        }
        match self.attr(node) {
            Ok(attr) => reply.attr(&node.ttl(), &attr),
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
        // Only on a descriptor open for writing (the kernel checks), so open checked the caller.
        if ino.0 != nodes::LIVE {
            return reply.error(Errno::EOPNOTSUPP);
        }
        let fallocate = match files::Fallocate::from_mode(mode) {
            Ok(f) => f,
            Err(e) => return reply.error(e),
        };
        let result = self.on_live(|view| fallocate.apply(view, offset, length));
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
                if self.allows(req, dir, READ) {
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
        if dir == Node::SnapshotsDir && offset == 0 {
            self.follow_other_writers();
        }
        let mut entries = vec![(dir, ".".to_owned()), (dir.parent(), "..".to_owned())];
        let hidden = dir == Node::Root && self.live_hidden();
        match dir {
            Node::ChangesDir => entries.extend(self.list_changes()),
            _ => entries.extend(
                dir.children(&self.catalog)
                    .into_iter()
                    .filter(|(node, _)| !(hidden && *node == Node::Live)),
            ),
        }
        for (i, (node, name)) in entries.iter().enumerate().skip(offset as usize) {
            // A disk tree's ".." is the domain mount's root.
            let ino = match (self.ino_base, i, dir) {
                (base, 1, Node::Root) if base != 0 => nodes::ROOT,
                (base, _, _) => base + node.ino(),
            };
            if reply.add(INodeNo(ino), (i + 1) as u64, node.kind(), name) {
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

    fn getxattr(&self, req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        // Only our own names exist; the kernel's own questions (security.capability, ACLs)
        // are answered without building the list.
        if !name.as_encoded_bytes().starts_with(xattrs::PREFIX) {
            return reply.error(Errno::NO_XATTR);
        }
        let Ok(node) = self.node(ino) else {
            return reply.error(Errno::NO_XATTR);
        };
        // user.* attributes are read with the file's read permission, as on any file system.
        if !self.allows(req, node, READ) {
            return reply.error(Errno::EACCES);
        }
        let Some(entry) = node.view(&self.catalog) else {
            return reply.error(Errno::NO_XATTR);
        };
        match self
            .xattrs(&entry)
            .into_iter()
            .find(|(n, _)| OsStr::new(n) == name)
        {
            Some((_, value)) => xattrs::reply(reply, size, value.as_bytes()),
            None => reply.error(Errno::NO_XATTR),
        }
    }

    fn listxattr(&self, req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        let mut names = Vec::new();
        if let Ok(node) = self.node(ino)
            && self.allows(req, node, READ)
            && let Some(entry) = node.view(&self.catalog)
        {
            names = xattrs::names(&self.xattrs(&entry));
        }
        xattrs::reply(reply, size, &names);
    }

    fn access(&self, req: &Request, ino: INodeNo, mask: fuser::AccessFlags, reply: ReplyEmpty) {
        match self.node(ino) {
            Ok(node) if self.allows(req, node, access_want(mask)) => reply.ok(),
            Ok(_) => reply.error(Errno::EACCES),
            Err(e) => reply.error(e),
        }
    }

    fn lseek(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: i64,
        whence: i32,
        reply: ReplyLseek,
    ) {
        if let Ok(Node::Change(_)) = self.node(ino) {
            let Ok(offset) = u64::try_from(offset) else {
                return reply.error(Errno::ENXIO);
            };
            return self.lseek_change(fh.0, offset, whence, reply);
        }
        let Ok(offset) = u64::try_from(offset) else {
            return reply.error(Errno::ENXIO);
        };
        if let Ok(node @ Node::Checkpoint { .. }) = self.node(ino) {
            return self.seek_checkpoint(node, offset, whence, reply);
        }
        let Some(entry) = self.node(ino).ok().and_then(|n| n.view(&self.catalog)) else {
            return reply.error(Errno::EINVAL);
        };
        let seek = match files::Seek::from_whence(whence) {
            Ok(seek) => seek,
            Err(e) => return reply.error(e),
        };
        match seek.in_view(&entry.view, offset) {
            Ok(Some(pos)) => reply.offset(pos as i64),
            Ok(None) => reply.error(Errno::ENXIO),
            Err(e) => {
                log::error!("{}: lseek at {offset:#x}: {e}", entry.file_name);
                reply.error(errno(&e));
            }
        }
    }
}

impl SnapFs {
    /// `SEEK_DATA`/`SEEK_HOLE` in a checkpoint file: data exactly where the checkpoint marks a
    /// change (`.raw`); a `.json` list is data throughout.
    fn seek_checkpoint(&self, node: Node, offset: u64, whence: i32, reply: ReplyLseek) {
        let Some(checkpoint) = node.checkpoint(&self.catalog) else {
            return reply.error(Errno::ENOENT);
        };
        let disk = self.catalog.live().view.size();
        let (marks, size): (Option<&dyn files::Marks>, u64) = match node {
            Node::Checkpoint { json: true, .. } => (None, checkpoint.json(disk).len() as u64),
            _ => (Some(&checkpoint), disk),
        };
        let found = match files::Seek::from_whence(whence) {
            Ok(seek) => seek.in_marks(marks, offset, size),
            Err(e) => return reply.error(e),
        };
        match found {
            Some(pos) => reply.offset(pos as i64),
            None => reply.error(Errno::ENXIO),
        }
    }
}
