//! `changes/`: one file per pair of views, `FROM..TO.raw` and `FROM..TO.json`. The ranges come
//! from [`crate::changes`]; this module gives the pairs inode numbers and answers the requests.
//!
//! Each open computes the list afresh and keeps it with the handle, so one copy (`cp`, a backup
//! agent) sees one consistent list from its first `SEEK_DATA` to its last read. `stat` shows the
//! list of the last open (or computes one): for pairs of snapshots that is always current (a
//! snapshot changes only when the catalog rebuilds its views, which is noticed); for pairs with
//! `live` it is the state of the last open. What `stat` keeps holds the views only weakly: a
//! view that left the chain (a commit, a layer delete, a chain switch) must not keep its layers'
//! files open, and their image locks, through a list nobody reads.

use std::collections::HashMap;
use std::sync::{Arc, Weak};
use std::time::SystemTime;

use fuser::{Errno, FileHandle, FopenFlags, ReplyData, ReplyLseek, ReplyOpen, Request};
use parking_lot::Mutex;

use super::DataCaching;
use super::access::{self, Guard};
use super::nodes::Node;
use super::zeros::zeros;
use crate::access::READ;
use crate::catalog::{Catalog, ViewEntry, ViewKind};
use crate::changes::pairs::{self, Form, PairName, ViewRef};
use crate::changes::{ChangeList, changed_ranges};
use crate::error::Result;
use crate::view::View;

/// Change file inodes start here, far above the snapshot inodes (100 + catalog key).
pub const FIRST_CHANGE: u64 = 1 << 48;

/// The ranges of one pair at one moment, and their JSON text.
pub struct Listing {
    pub list: ChangeList,
    pub json: Vec<u8>,
}

/// The list of one pair at one moment, with the views it was computed from (an open handle
/// reads TO through it).
pub struct Computed {
    pub to: Arc<ViewEntry>,
    pub listing: Arc<Listing>,
}

/// The last list of a pair, for `stat`: the views it was computed from, held weakly.
struct Last {
    from: Weak<View>,
    to: Weak<View>,
    listing: Arc<Listing>,
}

impl Last {
    /// Whether this is still the list of the pair's views as the catalog has them now.
    fn current(&self, from: &Arc<ViewEntry>, to: &Arc<ViewEntry>) -> bool {
        Weak::as_ptr(&self.from) == Arc::as_ptr(&from.view)
            && Weak::as_ptr(&self.to) == Arc::as_ptr(&to.view)
    }
}

/// An open change file.
pub struct Opened {
    pub form: Form,
    pub computed: Arc<Computed>,
}

#[derive(Default)]
struct Registry {
    by_pair: HashMap<PairName, u64>,
    files: HashMap<u64, (PairName, Option<Last>)>,
    /// The list each open handle reads, by the handle [`super::handles::Handles`] gave out.
    opened: HashMap<u64, Arc<Opened>>,
    /// Every name the kernel was given (by a lookup or a listing), with its inode: when a view
    /// goes, the kernel is told to forget the names of its pairs.
    names: HashMap<String, u64>,
}

/// The change files a mount has handed out inode numbers for, and the lists of their open
/// handles.
#[derive(Default)]
pub struct ChangeFiles {
    registry: Mutex<Registry>,
}

fn compute(from: &ViewEntry, to: &ViewEntry) -> Result<Listing> {
    let list = changed_ranges(&from.view, &to.view)?;
    let json = list.to_json().into_bytes();
    Ok(Listing { list, json })
}

impl ChangeFiles {
    /// The inode of `pair`, handed out on first use.
    /// The inode of `pair`, handed out on first use, given to the kernel under `name`.
    fn ino_of(&self, pair: PairName, name: &str) -> u64 {
        let mut r = self.registry.lock();
        let ino = match r.by_pair.get(&pair) {
            Some(&ino) => ino,
            None => {
                let ino = FIRST_CHANGE + r.files.len() as u64;
                r.by_pair.insert(pair, ino);
                r.files.insert(ino, (pair, None));
                ino
            }
        };
        if !r.names.contains_key(name) {
            r.names.insert(name.to_owned(), ino);
        }
        ino
    }

    /// The names given to the kernel whose pair lost a view (a delete, a commit, a revert to a
    /// layer), forgotten here: the kernel is to forget them too.
    pub fn gone_names(&self, catalog: &Catalog) -> Vec<String> {
        let names: Vec<(String, u64)> = self
            .registry
            .lock()
            .names
            .iter()
            .map(|(n, i)| (n.clone(), *i))
            .collect();
        let gone: Vec<String> = names
            .into_iter()
            .filter(|(_, ino)| self.pair(catalog, *ino).is_none())
            .map(|(n, _)| n)
            .collect();
        let mut r = self.registry.lock();
        for name in &gone {
            r.names.remove(name);
        }
        gone
    }

    /// The pair behind `ino`, if both its views still exist, taken from one state of the
    /// chain (a command that switches the chain between the two look-ups is waited out).
    pub fn pair(
        &self,
        catalog: &Catalog,
        ino: u64,
    ) -> Option<(PairName, Arc<ViewEntry>, Arc<ViewEntry>)> {
        let pair = self.registry.lock().files.get(&ino)?.0;
        for _ in 0..100 {
            let from = pairs::entry(catalog, pair.from)?;
            let to = pairs::entry(catalog, pair.to)?;
            if Arc::ptr_eq(from.view.chain(), to.view.chain()) {
                return Some((pair, from, to));
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        None
    }

    /// What it takes to read `ino`: read permission on every file either view reads. A view
    /// reads its own layer and every layer below it, so the two together read the layers from
    /// the upper one's down (docs/security.md: a change file shows bytes of TO and, through
    /// where they differ, something of FROM). A pair that is gone reads nothing.
    pub fn guard(&self, catalog: &Catalog, ino: u64) -> Guard {
        let from = self
            .pair(catalog, ino)
            .map_or(usize::MAX, |(_, from, to)| from.layer.min(to.layer));
        Guard::View {
            from,
            writable: false,
        }
    }

    /// Looks a name up: any pair of existing views.
    /// `live_shown`: whether the mount shows the live disk (else pairs with `live` are hidden).
    pub fn lookup(&self, catalog: &Catalog, name: &str, live_shown: bool) -> Option<u64> {
        pairs::parse(catalog, name)
            .filter(|pair| live_shown || !pair.involves_live())
            .map(|pair| self.ino_of(pair, name))
    }

    /// The listing: for each listed pair its `.raw` and `.json` file.
    pub fn list(&self, catalog: &Catalog, live_shown: bool) -> Vec<(u64, String)> {
        let mut out = Vec::new();
        for (from, to) in pairs::listed(catalog) {
            for form in [Form::Raw, Form::Json] {
                let pair = PairName { from, to, form };
                if !live_shown && pair.involves_live() {
                    continue;
                }
                if let Some(name) = pairs::file_name(catalog, pair) {
                    out.push((self.ino_of(pair, &name), name));
                }
            }
        }
        out
    }

    /// The list for `stat`: the last one if it is still current, else a new one.
    /// Also TO's entry (for the file's time).
    #[allow(clippy::type_complexity)]
    pub fn for_stat(
        &self,
        catalog: &Catalog,
        ino: u64,
    ) -> Option<Result<(Form, Arc<ViewEntry>, Arc<Listing>)>> {
        let (pair, from, to) = self.pair(catalog, ino)?;
        let last = self.registry.lock().files.get(&ino).and_then(|f| {
            let last = f.1.as_ref()?;
            last.current(&from, &to).then(|| last.listing.clone())
        });
        if let Some(listing) = last {
            return Some(Ok((pair.form, to, listing)));
        }
        Some(self.refresh(ino, &from, &to).map(|l| (pair.form, to, l)))
    }

    fn refresh(
        &self,
        ino: u64,
        from: &Arc<ViewEntry>,
        to: &Arc<ViewEntry>,
    ) -> Result<Arc<Listing>> {
        let listing = Arc::new(compute(from, to)?);
        if let Some(file) = self.registry.lock().files.get_mut(&ino) {
            file.1 = Some(Last {
                from: Arc::downgrade(&from.view),
                to: Arc::downgrade(&to.view),
                listing: listing.clone(),
            });
        }
        Ok(listing)
    }

    /// Computes the list of `ino` now, for a handle about to be opened.
    pub fn compute_for_open(&self, catalog: &Catalog, ino: u64) -> Option<Result<Opened>> {
        let (pair, from, to) = self.pair(catalog, ino)?;
        Some(self.refresh(ino, &from, &to).map(|listing| Opened {
            form: pair.form,
            computed: Arc::new(Computed { to, listing }),
        }))
    }

    /// Keeps `opened` with handle `fh` until [`ChangeFiles::release`].
    pub fn keep(&self, fh: u64, opened: Arc<Opened>) {
        self.registry.lock().opened.insert(fh, opened);
    }

    pub fn handle(&self, fh: u64) -> Option<Arc<Opened>> {
        self.registry.lock().opened.get(&fh).cloned()
    }

    /// Forgets handle `fh` (handles of other files are not here: nothing happens).
    pub fn release(&self, fh: u64) {
        self.registry.lock().opened.remove(&fh);
    }
}

impl Opened {
    /// The file's size: TO's size, or the length of the JSON text.
    pub fn size(&self) -> u64 {
        match self.form {
            Form::Raw => self.computed.listing.list.size,
            Form::Json => self.computed.listing.json.len() as u64,
        }
    }

    /// Fills `buf` (at `offset`, already cut to the file's end) with the file's bytes: TO's
    /// bytes in changed ranges, zeros elsewhere; or the JSON text.
    pub fn read(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let to: &View = &self.computed.to.view;
        if self.form == Form::Json {
            let text = &self.computed.listing.json;
            let start = (offset as usize).min(text.len());
            let n = buf.len().min(text.len() - start);
            buf[..n].copy_from_slice(&text[start..start + n]);
            buf[n..].fill(0);
            return Ok(());
        }
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let (changed, until) = self.computed.listing.list.extent_at(pos);
            let n = (until.saturating_sub(pos).max(1)).min((buf.len() - done) as u64) as usize;
            let chunk = &mut buf[done..done + n];
            if changed {
                to.read_at(chunk, pos)?;
            } else {
                chunk.fill(0);
            }
            done += n;
        }
        Ok(())
    }

    /// Whether `[offset, offset + len)` is one unchanged stretch (reads as zeros).
    pub fn is_hole(&self, offset: u64, len: u64) -> bool {
        self.form == Form::Raw && {
            let (changed, until) = self.computed.listing.list.extent_at(offset);
            !changed && until >= offset + len
        }
    }
}

/// The inode a control command knows a view's file by.
fn view_ino(view: ViewRef) -> u64 {
    match view {
        ViewRef::Live => super::nodes::LIVE,
        ViewRef::Snapshot(key) => super::nodes::FIRST_SNAPSHOT + key,
    }
}

/// The requests on change files, answered for [`super::SnapFs`].
impl super::SnapFs {
    /// Size, allocated bytes and time of a change file, as `stat` shows them.
    pub(super) fn change_sizes(
        &self,
        ino: u64,
    ) -> std::result::Result<(u64, u64, Option<SystemTime>), Errno> {
        let (form, to, listing) = match self.changes.for_stat(&self.catalog, ino) {
            None => return Err(Errno::ENOENT),
            Some(Err(e)) => {
                log::error!("changes/: computing the ranges of inode {ino}: {e}");
                return Err(super::errno(&e));
            }
            Some(Ok(c)) => c,
        };
        let (size, allocated) = match form {
            Form::Json => (listing.json.len() as u64, listing.json.len() as u64),
            Form::Raw => (listing.list.size, listing.list.changed_bytes()),
        };
        let mtime = match to.kind {
            ViewKind::Live => None,
            _ => to.created,
        };
        Ok((size, allocated, mtime))
    }

    pub(super) fn lookup_change(&self, name: &str) -> Option<Node> {
        self.changes
            .lookup(&self.catalog, name, !self.live_hidden())
            .map(Node::Change)
    }

    pub(super) fn list_changes(&self) -> Vec<(Node, String)> {
        self.changes
            .list(&self.catalog, !self.live_hidden())
            .into_iter()
            .map(|(ino, name)| (Node::Change(ino), name))
            .collect()
    }

    /// Opens a change file: read permission on both views' files, a list computed now and kept
    /// with the handle, and both views held open while it is (a command may not delete or
    /// revert them under a copy).
    pub(super) fn open_change(&self, req: &Request, ino: u64, write: bool, reply: ReplyOpen) {
        if write {
            return reply.error(Errno::EACCES);
        }
        let Some((pair, _, _)) = self
            .changes
            .pair(&self.catalog, ino)
            .filter(|(pair, _, _)| !(pair.involves_live() && self.live_hidden()))
        else {
            return reply.error(Errno::ESTALE);
        };
        let who = super::caller(req);
        if !access::allows(
            self.guard(Node::Change(ino)),
            &self.layer_perms(),
            &who,
            READ,
        ) {
            return reply.error(Errno::EACCES);
        }
        let opened = match self.changes.compute_for_open(&self.catalog, ino) {
            None => return reply.error(Errno::ESTALE),
            Some(Err(e)) => {
                log::error!("changes/: computing the ranges of inode {ino}: {e}");
                return reply.error(super::errno(&e));
            }
            Some(Ok(o)) => Arc::new(o),
        };
        let inos = [ino, view_ino(pair.from), view_ino(pair.to)];
        let fh = match self.handles.lock().open_with(&inos, who) {
            Ok(fh) => fh,
            // A command is changing or removing one of the views right now.
            Err(e) => return reply.error(e),
        };
        self.changes.keep(fh, opened.clone());
        // The text of a .json file is fixed per handle and its length may differ from the last
        // stat; the .raw bytes of a pair with `live` move with the disk: neither keeps pages.
        let flags = if opened.form == Form::Json || self.caching == DataCaching::Bypass {
            FopenFlags::FOPEN_DIRECT_IO
        } else {
            FopenFlags::empty()
        };
        reply.opened(FileHandle(fh), flags);
    }

    pub(super) fn read_change(&self, fh: u64, offset: u64, size: u32, reply: ReplyData) {
        let Some(opened) = self.changes.handle(fh) else {
            return reply.error(Errno::EBADF);
        };
        let len = opened.size().saturating_sub(offset).min(size as u64) as usize;
        if len <= zeros().len() && opened.is_hole(offset, len as u64) {
            return self.reply_read(reply, &zeros()[..len]);
        }
        super::READ_BUF.with_borrow_mut(|buf| {
            if buf.len() < len {
                buf.resize(len, 0);
            }
            match opened.read(&mut buf[..len], offset) {
                Ok(()) => self.reply_read(reply, &buf[..len]),
                Err(e) => {
                    log::error!("changes/: read {len} bytes at {offset:#x}: {e}");
                    reply.error(super::errno(&e));
                }
            }
        });
    }

    pub(super) fn lseek_change(&self, fh: u64, offset: u64, whence: i32, reply: ReplyLseek) {
        let Some(opened) = self.changes.handle(fh) else {
            return reply.error(Errno::EBADF);
        };
        let list = &opened.computed.listing.list;
        let size = opened.size();
        let found = match (whence, opened.form) {
            (libc::SEEK_DATA, Form::Raw) => list.seek_data(offset),
            (libc::SEEK_HOLE, Form::Raw) => list.seek_hole(offset),
            // The JSON text is all data.
            (libc::SEEK_DATA, Form::Json) => (offset < size).then_some(offset),
            (libc::SEEK_HOLE, Form::Json) => (offset < size).then_some(size),
            _ => return reply.error(Errno::EINVAL),
        };
        match found {
            Some(pos) => reply.offset(pos as i64),
            None => reply.error(Errno::ENXIO),
        }
    }
}
