//! QEMU's image locks, so that snapfs and QEMU (a running VM, `qemu-img`, `qemu-io`,
//! `qemu-storage-daemon`) keep out of each other's way.
//!
//! # The protocol (QEMU `block/file-posix.c`)
//!
//! QEMU describes how a `file` node is used with four permission bits
//! (`include/block/block-common.h`; QEMU 10 has `BLK_PERM_ALL = 0x0f`, the old
//! `BLK_PERM_GRAPH_MOD = 0x10` was removed in 6.2 and no longer takes part):
//!
//! | bit | QEMU name         | constant                     |
//! |-----|-------------------|------------------------------|
//! | 0   | "consistent read" | `BLK_PERM_CONSISTENT_READ`   |
//! | 1   | "write"           | `BLK_PERM_WRITE`             |
//! | 2   | "write unchanged" | `BLK_PERM_WRITE_UNCHANGED`   |
//! | 3   | "resize"          | `BLK_PERM_RESIZE`            |
//!
//! Every opener publishes, with *shared* (`F_RDLCK`) open-file-description locks of one byte
//! (`qemu_lock_fd()` in `util/osdep.c`, `F_OFD_SETLK`):
//!
//! * byte `RAW_LOCK_PERM_BASE + i` = 100 + i for each permission `i` it **holds**;
//! * byte `RAW_LOCK_SHARED_BASE + i` = 200 + i for each permission `i` it does **not share**.
//!
//! It then checks for conflicts (`raw_check_lock_bytes()`), asking `F_OFD_GETLK` whether an
//! *exclusive* (`F_WRLCK`) lock could be placed (`qemu_lock_fd_test()`), which is refused exactly
//! when another open file description holds a shared lock there:
//!
//! * on byte 200 + i for each permission it holds (`Failed to get "write" lock`: somebody does
//!   not share what we need);
//! * on byte 100 + i for each permission it does not share (`Failed to get shared "write"
//!   lock`: somebody holds what we cannot tolerate).
//!
//! Locking before checking (as `raw_handle_perm_lock()` does) closes the race between two
//! openers: whichever checks second sees the other.
//!
//! # What snapfs locks
//!
//! A qcow2 format node always asks its `file` child for "consistent read" and, when writable,
//! for "write" and "resize" (metadata updates, growing the file), and never shares "write" or
//! "resize" of the file (`bdrv_default_perms_for_storage()` in `block.c`). snapfs takes exactly
//! the same bytes as QEMU 10 does for the image file of a qcow2 node; these were confirmed in
//! `/proc/locks` against `qemu-io`, `qemu-img` and `qemu-storage-daemon` 10.0:
//!
//! | mode                    | held (100 + i)          | unshared (200 + i) | QEMU equivalent                       |
//! |-------------------------|-------------------------|--------------------|---------------------------------------|
//! | [`LockMode::ReadOnly`]  | 100                     | 201, 203           | `qemu-io -r`, `qemu-img info`, a VM's backing file |
//! | [`LockMode::ReadWrite`] | 100, 101, 103           | 201, 203           | `qemu-img snapshot -c`, a VM's disk, a writable `qemu-storage-daemon` export |
//!
//! Consequences, identical to QEMU's own behaviour:
//!
//! * a read-write open fails while anybody else has the image open without `-U`/`force-share`
//!   (a writer holds 101; a reader, even `qemu-img info`, does not share write: 201);
//! * a read-only open fails while somebody writes the image (101 held): its contents and
//!   metadata would change under the mount. `qemu-img info` refuses the same way and suggests
//!   `-U`; snapfs refuses and says the image is in use. The backing files of a running VM are
//!   opened read-only by QEMU and so may be mounted read-only;
//! * read-only opens coexist with one another, and with `qemu-img info`;
//! * while snapfs holds an image, read-only or read-write, QEMU tools cannot open it for writing
//!   (`Failed to get "write" lock`); while it holds it read-write, even a plain
//!   `qemu-img info` fails (`Failed to get shared "write" lock`) but `qemu-img info -U` works.
//!
//! # Lifetime
//!
//! OFD locks belong to the open file description, not to the process or to a descriptor: they
//! last until [`ImageLock::release`] unlocks them or until the last descriptor of that open file
//! description is closed (dropping the [`File`] and all of its `try_clone()`s). An [`ImageLock`]
//! therefore owns nothing and dropping it does nothing; keep it next to the `File`. Two `File`s
//! opened separately on the same image, even in one process, are two openers and conflict
//! exactly like two processes would.

use std::fmt;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};

/// `RAW_LOCK_PERM_BASE` in QEMU's `block/file-posix.c`: byte 100 + i is locked by every opener
/// holding permission i.
pub const RAW_LOCK_PERM_BASE: i64 = 100;
/// `RAW_LOCK_SHARED_BASE` in QEMU's `block/file-posix.c`: byte 200 + i is locked by every opener
/// that does not share permission i.
pub const RAW_LOCK_SHARED_BASE: i64 = 200;

/// One of QEMU's block permissions (`BLK_PERM_*`), numbered by its bit.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Perm {
    /// `BLK_PERM_CONSISTENT_READ` = 0x01.
    ConsistentRead = 0,
    /// `BLK_PERM_WRITE` = 0x02.
    Write = 1,
    /// `BLK_PERM_WRITE_UNCHANGED` = 0x04.
    WriteUnchanged = 2,
    /// `BLK_PERM_RESIZE` = 0x08.
    Resize = 3,
}

impl Perm {
    /// Every permission QEMU 10 locks (`PERM_FOREACH`, bits up to `BLK_PERM_ALL` = 0x0f).
    pub const ALL: [Perm; 4] = [
        Perm::ConsistentRead,
        Perm::Write,
        Perm::WriteUnchanged,
        Perm::Resize,
    ];

    /// The bit index i.
    pub fn index(self) -> u32 {
        self as u32
    }

    /// The `BLK_PERM_*` mask.
    pub fn bit(self) -> u64 {
        1 << self.index()
    }

    /// The name QEMU prints (`bdrv_perm_names()`).
    pub fn qemu_name(self) -> &'static str {
        match self {
            Perm::ConsistentRead => "consistent read",
            Perm::Write => "write",
            Perm::WriteUnchanged => "write unchanged",
            Perm::Resize => "resize",
        }
    }

    /// The byte locked by openers that hold this permission: 100 + i.
    pub fn perm_byte(self) -> i64 {
        RAW_LOCK_PERM_BASE + i64::from(self.index())
    }

    /// The byte locked by openers that do not share this permission: 200 + i.
    pub fn shared_byte(self) -> i64 {
        RAW_LOCK_SHARED_BASE + i64::from(self.index())
    }
}

/// How snapfs opens an image.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum LockMode {
    /// A read-only mount: like QEMU's read-only qcow2 open (`qemu-io -r`, a VM's backing file).
    ReadOnly,
    /// snapfs will write the image: like QEMU's read-write qcow2 open (a VM's disk).
    ReadWrite,
    /// A read-only mount beside a process that may write the image (`--force-share`): like
    /// `qemu-img -U` / QEMU's `force-share=on` (confirmed in `/proc/locks` against `qemu-io -U
    /// -r` 10.0: byte 100 only). Holds "consistent read", shares everything, so a VM may keep
    /// writing, resize, and start again beside it.
    SharedRead,
}

impl LockMode {
    /// The permissions this mode holds, as a `BLK_PERM_*` mask.
    pub fn held(self) -> u64 {
        match self {
            LockMode::ReadOnly | LockMode::SharedRead => Perm::ConsistentRead.bit(),
            LockMode::ReadWrite => {
                Perm::ConsistentRead.bit() | Perm::Write.bit() | Perm::Resize.bit()
            }
        }
    }

    /// The permissions this mode does not let others have, as a `BLK_PERM_*` mask. A qcow2
    /// node never shares write or resize of its file: somebody else writing or truncating it
    /// would corrupt the metadata it reads.
    pub fn unshared(self) -> u64 {
        match self {
            LockMode::ReadOnly | LockMode::ReadWrite => Perm::Write.bit() | Perm::Resize.bit(),
            LockMode::SharedRead => 0,
        }
    }

    /// The bytes this mode locks (shared), in the order QEMU's `raw_apply_lock_bytes()` takes
    /// them.
    pub fn lock_bytes(self) -> Vec<i64> {
        let held = Perm::ALL
            .into_iter()
            .filter(|p| self.held() & p.bit() != 0)
            .map(Perm::perm_byte);
        let unshared = Perm::ALL
            .into_iter()
            .filter(|p| self.unshared() & p.bit() != 0)
            .map(Perm::shared_byte);
        held.chain(unshared).collect()
    }

    /// The bytes tested for another opener's lock, in the order of QEMU's
    /// `raw_check_lock_bytes()`, each with the conflict a lock found there means.
    pub fn test_bytes(self) -> Vec<(i64, Conflict)> {
        let held = Perm::ALL
            .into_iter()
            .filter(|p| self.held() & p.bit() != 0)
            .map(|p| (p.shared_byte(), Conflict::Unshares(p)));
        let unshared = Perm::ALL
            .into_iter()
            .filter(|p| self.unshared() & p.bit() != 0)
            .map(|p| (p.perm_byte(), Conflict::Holds(p)));
        held.chain(unshared).collect()
    }
}

impl fmt::Display for LockMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LockMode::ReadOnly => "read-only",
            LockMode::ReadWrite => "read-write",
            LockMode::SharedRead => "shared read-only",
        })
    }
}

/// Why another opener's locks forbid ours.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Conflict {
    /// Another opener holds a permission we do not share: its byte 100 + i is locked. QEMU says
    /// `Failed to get shared "<perm>" lock`.
    Holds(Perm),
    /// Another opener does not share a permission we hold: its byte 200 + i is locked. QEMU says
    /// `Failed to get "<perm>" lock`.
    Unshares(Perm),
}

impl Conflict {
    /// Lower is more telling to a user: "somebody writes it" explains more than "somebody does
    /// not share write", which every writer also does.
    fn rank(self) -> u8 {
        match self {
            Conflict::Holds(Perm::Write) => 0,
            Conflict::Holds(Perm::Resize) => 1,
            Conflict::Holds(Perm::WriteUnchanged) => 2,
            Conflict::Unshares(Perm::Write) => 3,
            Conflict::Unshares(Perm::Resize) => 4,
            Conflict::Unshares(Perm::ConsistentRead) => 5,
            Conflict::Unshares(Perm::WriteUnchanged) => 6,
            Conflict::Holds(Perm::ConsistentRead) => 7,
        }
    }

    /// The conflict a shared lock found on `byte` means, if it is one of QEMU's bytes.
    fn for_byte(byte: i64) -> Option<Conflict> {
        Perm::ALL.into_iter().find_map(|p| {
            if byte == p.perm_byte() {
                Some(Conflict::Holds(p))
            } else if byte == p.shared_byte() {
                Some(Conflict::Unshares(p))
            } else {
                None
            }
        })
    }

    /// What the conflict means and what to do, for the one-line error.
    fn explain(self, mode: LockMode) -> String {
        const WHO: &str = "a running VM, qemu-img or qemu-storage-daemon";
        // A read-only open fails beside a writer too: only a reader's conflict leaves read-only.
        let advice = match (mode, self) {
            (LockMode::ReadWrite, Conflict::Unshares(_)) => "stop it or mount read-only",
            _ => "stop it first",
        };
        match self {
            Conflict::Holds(Perm::Write) => match mode {
                LockMode::ReadWrite => {
                    format!("another process has it open for writing ({WHO}); {advice}")
                }
                LockMode::ReadOnly | LockMode::SharedRead => format!(
                    "another process has it open for writing ({WHO}), so it would change \
                     under a read-only mount too; {advice}"
                ),
            },
            Conflict::Holds(Perm::Resize) => {
                format!("another process has it open for resizing ({WHO}); {advice}")
            }
            Conflict::Unshares(Perm::Write) => format!(
                "another process has it open and does not share write access (a VM, \
                 qemu-img, qemu-storage-daemon or a read-only snapfs mount using it, perhaps as \
                 a backing file); {advice}"
            ),
            Conflict::Unshares(Perm::Resize) => format!(
                "another process has it open and does not share resizing (a VM, qemu-img, \
                 qemu-storage-daemon or a read-only snapfs mount using it); {advice}"
            ),
            Conflict::Unshares(Perm::ConsistentRead) => format!(
                "another process does not allow it to be read consistently (a QEMU block job \
                 such as commit may be running on it); {advice}"
            ),
            Conflict::Holds(p) => format!(
                "another process holds the QEMU \"{}\" permission on it; {advice}",
                p.qemu_name()
            ),
            Conflict::Unshares(p) => format!(
                "another process does not share the QEMU \"{}\" permission on it; {advice}",
                p.qemu_name()
            ),
        }
    }
}

impl fmt::Display for Conflict {
    /// QEMU's wording, for logs and tests.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Conflict::Holds(p) => write!(f, "Failed to get shared \"{}\" lock", p.qemu_name()),
            Conflict::Unshares(p) => write!(f, "Failed to get \"{}\" lock", p.qemu_name()),
        }
    }
}

/// Taking an image's locks failed.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// Another opener's locks conflict with the requested mode.
    #[error("{}: image is in use by another process: {}", path.display(), conflicts[0].explain(*mode))]
    InUse {
        path: PathBuf,
        mode: LockMode,
        /// Never empty; the most telling conflict first.
        conflicts: Vec<Conflict>,
    },

    /// `fcntl()` failed for another reason than a conflict or a file system without OFD locks.
    #[error("{}: cannot {op} byte {byte} of QEMU's image lock: {source}", path.display())]
    Io {
        path: PathBuf,
        /// "lock", "unlock" or "test".
        op: &'static str,
        byte: i64,
        #[source]
        source: io::Error,
    },
}

impl LockError {
    /// The most telling conflict, for an `InUse` error.
    pub fn conflict(&self) -> Option<Conflict> {
        match self {
            LockError::InUse { conflicts, .. } => conflicts.first().copied(),
            LockError::Io { .. } => None,
        }
    }

    fn in_use(path: &Path, mode: LockMode, mut conflicts: Vec<Conflict>) -> LockError {
        conflicts.sort_by_key(|c| c.rank());
        conflicts.dedup();
        LockError::InUse {
            path: path.to_owned(),
            mode,
            conflicts,
        }
    }
}

/// The QEMU locks taken on one open image file. It owns no descriptor: the locks live on the
/// `File`'s open file description (see the module documentation).
#[derive(Debug)]
#[must_use = "the lock may be unsupported; log ImageLock::warning()"]
pub struct ImageLock {
    path: PathBuf,
    mode: LockMode,
    /// Set when the file system cannot take OFD locks and the image is not protected.
    unsupported: Option<io::Error>,
}

impl ImageLock {
    /// Takes QEMU's locks on `file` (an OFD lock belongs to the open file description, so it
    /// lasts as long as the `File`) for `mode`. `file` must be open for reading; `path` is only
    /// used in messages.
    ///
    /// Fails with [`LockError::InUse`] when another opener's locks conflict, leaving no lock
    /// behind. If the file system does not support OFD locks (`EINVAL`, `ENOLCK`, `ENOTSUP`,
    /// `ENOSYS`), it succeeds without locking and [`ImageLock::warning`] says so, as QEMU
    /// proceeds with a warning. Call it once per `File`; to change modes, release first.
    pub fn acquire(file: &File, path: &Path, mode: LockMode) -> Result<ImageLock, LockError> {
        let fd = file.as_raw_fd();
        let locked = |unsupported| ImageLock {
            path: path.to_owned(),
            mode,
            unsupported,
        };

        let mut taken = Vec::new();
        for byte in mode.lock_bytes() {
            match ofd_lock(fd, byte, LockOp::Shared) {
                Ok(()) => taken.push(byte),
                Err(e) => {
                    unlock_quietly(fd, &taken);
                    return if is_unsupported(&e) {
                        Ok(locked(Some(e)))
                    } else if is_conflict(&e) {
                        // Only an exclusive lock (never QEMU's) refuses a shared one.
                        match Conflict::for_byte(byte) {
                            Some(c) => Err(LockError::in_use(path, mode, vec![c])),
                            None => Err(LockError::Io {
                                path: path.to_owned(),
                                op: "lock",
                                byte,
                                source: e,
                            }),
                        }
                    } else {
                        Err(LockError::Io {
                            path: path.to_owned(),
                            op: "lock",
                            byte,
                            source: e,
                        })
                    };
                }
            }
        }

        let mut conflicts = Vec::new();
        for (byte, conflict) in mode.test_bytes() {
            match ofd_test(fd, byte) {
                Ok(false) => {}
                Ok(true) => conflicts.push(conflict),
                Err(e) => {
                    unlock_quietly(fd, &taken);
                    return if is_unsupported(&e) {
                        Ok(locked(Some(e)))
                    } else {
                        Err(LockError::Io {
                            path: path.to_owned(),
                            op: "test",
                            byte,
                            source: e,
                        })
                    };
                }
            }
        }
        if !conflicts.is_empty() {
            unlock_quietly(fd, &taken);
            return Err(LockError::in_use(path, mode, conflicts));
        }
        Ok(locked(None))
    }

    /// Unlocks the bytes this lock took on `file`, which must be the `File` (or a clone of the
    /// `File`) it was acquired on. Closing the last descriptor of that `File` releases them too.
    pub fn release(self, file: &File) -> Result<(), LockError> {
        if self.unsupported.is_some() {
            return Ok(());
        }
        let fd = file.as_raw_fd();
        for byte in self.mode.lock_bytes() {
            ofd_lock(fd, byte, LockOp::Unlock).map_err(|source| LockError::Io {
                path: self.path.clone(),
                op: "unlock",
                byte,
                source,
            })?;
        }
        Ok(())
    }

    pub fn mode(&self) -> LockMode {
        self.mode
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether the bytes are really locked (false when the file system lacks OFD locks).
    pub fn is_locked(&self) -> bool {
        self.unsupported.is_none()
    }

    /// The bytes held on the file, empty when locking is unsupported.
    pub fn locked_bytes(&self) -> Vec<i64> {
        match self.unsupported {
            None => self.mode.lock_bytes(),
            Some(_) => Vec::new(),
        }
    }

    /// A line to log when the image could not be locked, `None` when it is locked.
    pub fn warning(&self) -> Option<String> {
        self.unsupported.as_ref().map(|e| {
            format!(
                "{}: the file system does not support OFD locks ({e}); the image is not locked \
                 and QEMU will not see that snapfs uses it",
                self.path.display()
            )
        })
    }
}

#[derive(Clone, Copy)]
enum LockOp {
    Shared,
    Unlock,
}

/// errnos meaning "this file system cannot do OFD locks", after which QEMU goes on unlocked.
fn is_unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EINVAL | libc::ENOLCK | libc::ENOTSUP | libc::ENOSYS)
    ) || e.raw_os_error() == Some(libc::EOPNOTSUPP)
}

/// errnos of `F_OFD_SETLK` meaning "a conflicting lock is held".
fn is_conflict(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EAGAIN | libc::EACCES))
}

fn unlock_quietly(fd: RawFd, bytes: &[i64]) {
    for &byte in bytes {
        // Unlocking does not fail on a file that could be locked; if it did, the lock goes
        // away with the File anyway, and the caller is already returning an error.
        let _ = ofd_lock(fd, byte, LockOp::Unlock);
    }
}

#[cfg(target_os = "linux")]
fn one_byte(byte: i64, l_type: libc::c_int) -> libc::flock {
    // SAFETY: `flock` is plain data; all-zero is a valid value (and l_pid must be 0 for OFD
    // locks).
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = l_type as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = byte as libc::off_t;
    fl.l_len = 1;
    fl
}

/// `qemu_lock_fd()` / `qemu_unlock_fd()`: `F_OFD_SETLK` on one byte, retried on `EINTR`.
#[cfg(target_os = "linux")]
fn ofd_lock(fd: RawFd, byte: i64, op: LockOp) -> io::Result<()> {
    let l_type = match op {
        LockOp::Shared => libc::F_RDLCK,
        LockOp::Unlock => libc::F_UNLCK,
    };
    let fl = one_byte(byte, l_type);
    loop {
        // SAFETY: `fl` is a valid `flock` that outlives the call; a bad `fd` gives EBADF.
        let ret = unsafe { libc::fcntl(fd, libc::F_OFD_SETLK, &fl as *const libc::flock) };
        if ret != -1 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// `qemu_lock_fd_test(fd, byte, 1, true)`: whether another open file description holds a lock
/// that an exclusive lock on `byte` would conflict with. Our own locks never count.
#[cfg(target_os = "linux")]
fn ofd_test(fd: RawFd, byte: i64) -> io::Result<bool> {
    let mut fl = one_byte(byte, libc::F_WRLCK);
    loop {
        // SAFETY: `fl` is a valid, writable `flock` that outlives the call.
        let ret = unsafe { libc::fcntl(fd, libc::F_OFD_GETLK, &mut fl as *mut libc::flock) };
        if ret != -1 {
            return Ok(fl.l_type != libc::F_UNLCK as libc::c_short);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Without OFD locks QEMU does not lock either (`locking=auto`).
#[cfg(not(target_os = "linux"))]
fn ofd_lock(_fd: RawFd, _byte: i64, _op: LockOp) -> io::Result<()> {
    Err(io::Error::from_raw_os_error(libc::ENOTSUP))
}

#[cfg(not(target_os = "linux"))]
fn ofd_test(_fd: RawFd, _byte: i64) -> io::Result<bool> {
    Err(io::Error::from_raw_os_error(libc::ENOTSUP))
}

/// Whether an opener other than `file`'s open file description holds permission `perm` on the
/// image (its byte 100 + i is locked): e.g. whether a running VM writes it. `None` where the file
/// system has no OFD locks (nobody can tell).
pub fn held_by_others(file: &File, perm: Perm) -> io::Result<Option<bool>> {
    match ofd_test(file.as_raw_fd(), perm.perm_byte()) {
        Ok(held) => Ok(Some(held)),
        Err(e) if is_unsupported(&e) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Gives up what a read-write open holds beyond a read-only one (QEMU drops the same
/// permissions when a node is reopened read-only), keeping the read-only locks.
pub fn downgrade_to_read_only(file: &File, path: &Path) -> Result<(), LockError> {
    let keep = LockMode::ReadOnly.lock_bytes();
    let fd = file.as_raw_fd();
    for byte in LockMode::ReadWrite.lock_bytes() {
        if keep.contains(&byte) {
            continue;
        }
        match ofd_lock(fd, byte, LockOp::Unlock) {
            Ok(()) => {}
            Err(e) if is_unsupported(&e) => return Ok(()),
            Err(source) => {
                return Err(LockError::Io {
                    path: path.to_owned(),
                    op: "unlock",
                    byte,
                    source,
                });
            }
        }
    }
    Ok(())
}

/// Takes read-write locks on a file that holds read-only ones; on a conflict the read-only locks
/// are restored and the conflict returned.
pub fn upgrade_to_read_write(file: &File, path: &Path) -> Result<(), LockError> {
    match ImageLock::acquire(file, path, LockMode::ReadWrite) {
        Ok(_) => Ok(()),
        Err(e) => {
            // A refused acquire undoes every byte it took, the read-only ones included.
            let _ = ImageLock::acquire(file, path, LockMode::ReadOnly);
            Err(e)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permission_bits_match_qemu() {
        assert_eq!(Perm::ConsistentRead.bit(), 0x01);
        assert_eq!(Perm::Write.bit(), 0x02);
        assert_eq!(Perm::WriteUnchanged.bit(), 0x04);
        assert_eq!(Perm::Resize.bit(), 0x08);
        let all = Perm::ALL.iter().fold(0, |m, p| m | p.bit());
        assert_eq!(all, 0x0f, "BLK_PERM_ALL in QEMU 10");
        assert_eq!(Perm::Write.perm_byte(), 101);
        assert_eq!(Perm::Write.shared_byte(), 201);
        assert_eq!(Perm::Resize.perm_byte(), 103);
        assert_eq!(Perm::ConsistentRead.shared_byte(), 200);
    }

    #[test]
    fn read_only_bytes() {
        assert_eq!(LockMode::ReadOnly.held(), 0x01);
        assert_eq!(LockMode::ReadOnly.unshared(), 0x0a);
        assert_eq!(LockMode::ReadOnly.lock_bytes(), vec![100, 201, 203]);
        assert_eq!(
            LockMode::ReadOnly.test_bytes(),
            vec![
                (200, Conflict::Unshares(Perm::ConsistentRead)),
                (101, Conflict::Holds(Perm::Write)),
                (103, Conflict::Holds(Perm::Resize)),
            ]
        );
    }

    #[test]
    fn read_write_bytes() {
        assert_eq!(LockMode::ReadWrite.held(), 0x0b);
        assert_eq!(LockMode::ReadWrite.unshared(), 0x0a);
        assert_eq!(
            LockMode::ReadWrite.lock_bytes(),
            vec![100, 101, 103, 201, 203]
        );
        assert_eq!(
            LockMode::ReadWrite.test_bytes(),
            vec![
                (200, Conflict::Unshares(Perm::ConsistentRead)),
                (201, Conflict::Unshares(Perm::Write)),
                (203, Conflict::Unshares(Perm::Resize)),
                (101, Conflict::Holds(Perm::Write)),
                (103, Conflict::Holds(Perm::Resize)),
            ]
        );
    }

    /// Our own locks as another opener sees them: each mode conflicts with a second opener
    /// exactly as QEMU's same-shaped opens conflict with each other.
    #[test]
    fn modes_against_each_other() {
        let conflicts = |ours: LockMode, theirs: LockMode| -> Vec<Conflict> {
            let locked = theirs.lock_bytes();
            ours.test_bytes()
                .into_iter()
                .filter(|(b, _)| locked.contains(b))
                .map(|(_, c)| c)
                .collect()
        };
        assert!(conflicts(LockMode::ReadOnly, LockMode::ReadOnly).is_empty());
        assert_eq!(
            conflicts(LockMode::ReadOnly, LockMode::ReadWrite),
            vec![Conflict::Holds(Perm::Write), Conflict::Holds(Perm::Resize)]
        );
        assert_eq!(
            conflicts(LockMode::ReadWrite, LockMode::ReadOnly),
            vec![
                Conflict::Unshares(Perm::Write),
                Conflict::Unshares(Perm::Resize)
            ]
        );
        assert_eq!(conflicts(LockMode::ReadWrite, LockMode::ReadWrite).len(), 4);
    }

    #[test]
    fn conflicts_by_byte() {
        assert_eq!(Conflict::for_byte(101), Some(Conflict::Holds(Perm::Write)));
        assert_eq!(
            Conflict::for_byte(203),
            Some(Conflict::Unshares(Perm::Resize))
        );
        assert_eq!(Conflict::for_byte(104), None, "GRAPH_MOD is gone");
        assert_eq!(Conflict::for_byte(0), None);
    }

    #[test]
    fn qemu_wording() {
        assert_eq!(
            Conflict::Unshares(Perm::Write).to_string(),
            "Failed to get \"write\" lock"
        );
        assert_eq!(
            Conflict::Holds(Perm::Write).to_string(),
            "Failed to get shared \"write\" lock"
        );
    }

    #[test]
    fn in_use_names_the_writer_first_on_one_line() {
        let e = LockError::in_use(
            Path::new("/img/top.qcow2"),
            LockMode::ReadWrite,
            vec![
                Conflict::Unshares(Perm::Write),
                Conflict::Unshares(Perm::Resize),
                Conflict::Holds(Perm::Write),
                Conflict::Holds(Perm::Resize),
            ],
        );
        assert_eq!(e.conflict(), Some(Conflict::Holds(Perm::Write)));
        let msg = e.to_string();
        assert!(!msg.contains('\n'), "{msg}");
        assert!(msg.starts_with("/img/top.qcow2: image is in use by another process"));
        assert!(msg.contains("open for writing"), "{msg}");
        // Beside a writer a read-only open fails too: no advice to try one.
        assert!(!msg.contains("mount read-only"), "{msg}");
        assert!(msg.contains("stop it first"), "{msg}");
        let reader = LockError::in_use(
            Path::new("x"),
            LockMode::ReadWrite,
            vec![Conflict::Unshares(Perm::Write)],
        );
        assert!(reader.to_string().contains("mount read-only"), "{reader}");

        let ro = LockError::in_use(
            Path::new("x"),
            LockMode::ReadOnly,
            vec![Conflict::Holds(Perm::Write)],
        );
        assert!(ro.to_string().contains("open for writing"));
        assert!(!ro.to_string().contains("mount read-only"));

        let reader = LockError::in_use(
            Path::new("x"),
            LockMode::ReadWrite,
            vec![Conflict::Unshares(Perm::Write)],
        );
        assert!(reader.to_string().contains("does not share write"));
        for c in [
            Conflict::Holds(Perm::ConsistentRead),
            Conflict::Holds(Perm::WriteUnchanged),
            Conflict::Unshares(Perm::ConsistentRead),
            Conflict::Unshares(Perm::WriteUnchanged),
        ] {
            let e = LockError::in_use(Path::new("x"), LockMode::ReadWrite, vec![c]);
            assert!(!e.to_string().contains('\n'));
        }
    }

    #[test]
    fn errno_classes() {
        for errno in [libc::EINVAL, libc::ENOLCK, libc::ENOTSUP, libc::ENOSYS] {
            assert!(is_unsupported(&io::Error::from_raw_os_error(errno)));
        }
        assert!(!is_unsupported(&io::Error::from_raw_os_error(libc::EAGAIN)));
        assert!(is_conflict(&io::Error::from_raw_os_error(libc::EAGAIN)));
        assert!(is_conflict(&io::Error::from_raw_os_error(libc::EACCES)));
        assert!(!is_conflict(&io::Error::from_raw_os_error(libc::EBADF)));
    }

    #[test]
    fn unsupported_lock_warns() {
        let lock = ImageLock {
            path: PathBuf::from("/nfs/a.qcow2"),
            mode: LockMode::ReadWrite,
            unsupported: Some(io::Error::from_raw_os_error(libc::ENOLCK)),
        };
        assert!(!lock.is_locked());
        assert!(lock.locked_bytes().is_empty());
        let w = lock.warning().unwrap();
        assert!(w.starts_with("/nfs/a.qcow2: "), "{w}");
        assert!(!w.contains('\n'));
    }

    #[test]
    fn same_file_twice_conflicts_with_itself_not_own_locks() {
        let dir = std::env::temp_dir().join(format!("snapfs-lock-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("img");
        std::fs::write(&path, [0u8; 512]).unwrap();
        let a = File::options().read(true).write(true).open(&path).unwrap();
        let lock = ImageLock::acquire(&a, &path, LockMode::ReadWrite).unwrap();
        assert!(lock.is_locked(), "{:?}", lock.warning());
        // A clone shares the open file description and its locks: no conflict with itself.
        let a2 = a.try_clone().unwrap();
        assert!(!ofd_test(a2.as_raw_fd(), 101).unwrap());
        // A second open is another opener.
        let b = File::open(&path).unwrap();
        let err = ImageLock::acquire(&b, &path, LockMode::ReadOnly).unwrap_err();
        assert_eq!(err.conflict(), Some(Conflict::Holds(Perm::Write)));
        // The failed attempt left nothing behind.
        for byte in [100, 201, 203] {
            assert!(!ofd_test(a.as_raw_fd(), byte).unwrap(), "byte {byte}");
        }
        lock.release(&a).unwrap();
        let lock_b = ImageLock::acquire(&b, &path, LockMode::ReadOnly).unwrap();
        drop(lock_b);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
