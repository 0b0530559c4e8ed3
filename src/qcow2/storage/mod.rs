//! The storage boundary: every byte the engine reads from or writes to an image file, every
//! flush, truncation, hole punch and write-back hint, goes through one [`Storage`]. The engine
//! holds a `Box<dyn Storage>` per image file (qcow2 and raw layers alike, and the overlays it
//! creates), never a `File`.
//!
//! Two implementations: [`FileStorage`], a host file or block device (pread/pwrite, fdatasync,
//! fallocate, sync_file_range, and QEMU's OFD image locks, which live on the file's open file
//! description and so stay with it), and [`MemoryStorage`], bytes in memory, for tests that need
//! neither root nor a file system. Anything else wraps one of them: a storage that records every
//! write and flush in order (to build the states a power cut could leave), or one that fails
//! chosen writes, is a `Storage` holding another, and needs no change to the engine (see
//! [`crate::qcow2::Qcow2Image::from_storage`] and [`crate::chain::Chain::open_interposed`]).
//!
//! # The contract
//!
//! What the engine relies on, and what a wrapper may rely on in turn:
//!
//! - **Writes complete or fail.** [`Storage::write_at`] returns once all of its bytes are
//!   accepted (or with an error, having written any part of them). Reads issued after a write
//!   returned see its bytes. Nothing more: a completed write is not durable.
//! - **A completed flush is the only durability promise.** Once [`Storage::flush`] returns `Ok`,
//!   every write, length change and hole punch that completed before the flush was called
//!   survives a crash or power cut. (For a file: `fdatasync`, which covers the data and the
//!   metadata needed to read it back, the file's length included.)
//! - **Between two flushes, anything goes.** A crash may keep any subset of the writes
//!   completed since the last completed flush, in any order, and may tear a write: keep some of
//!   its 512-byte sectors and not others. So the engine orders dependent writes by flushing
//!   between them where a wrong order would corrupt the image (QEMU's rules: a refcount before
//!   the L2 entry that uses it, an L2 entry cleared before the refcount drops, a new table before
//!   the header field that switches to it). A recorder that models a crash as "everything before
//!   the last completed flush, plus any subset of the writes after it, some torn" models exactly
//!   what this contract allows.
//! - **Bytes never written read as zeros** on a growable storage (a regular file: past its end,
//!   and in holes). A [`Storage::fixed_size`] storage (a block device) has a fixed length and its
//!   unused space holds whatever was written there before.
//! - **Hints promise nothing.** [`Storage::start_writeback`] may start writing data back early
//!   (or do nothing); it changes neither ordering nor durability.
//! - **Concurrency.** Calls come from several threads at once. Writes to one image are issued
//!   under its writer lock, one at a time, in the order the rules above need; reads run beside
//!   them (a guest read racing its own write of the same bytes may see old or new bytes, as on
//!   any disk).
//!
//! The hot read path is one `read_at` per mapped run: a virtual call in front of a `pread`, no
//! allocation and no lock.

use std::fs::File;
use std::io;

mod file;
mod memory;

pub use file::FileStorage;
pub use memory::MemoryStorage;

use crate::qcow2::lock::LockError;

/// Whether a range of a storage holds data, as the storage itself allocates it (for a raw file:
/// `SEEK_DATA`/`SEEK_HOLE`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Allocation {
    Data,
    /// Reads as zeros and takes no space.
    Hole,
}

/// An image file as the engine sees it. See the module documentation for the contract.
pub trait Storage: Send + Sync + std::fmt::Debug {
    /// Fills `buf` with the bytes at `offset`; what lies past the end reads as zeros (QEMU reads
    /// past the end of an image file as zeros, metadata included).
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;

    /// Writes all of `buf` at `offset`; a growable storage grows to hold it.
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;

    /// Makes every write, length change and hole punch completed before the call durable
    /// (`fdatasync`).
    fn flush(&self) -> io::Result<()>;

    /// The length in bytes (for a block device, its size).
    fn len(&self) -> io::Result<u64>;

    /// Whether the storage holds no bytes at all.
    fn is_empty(&self) -> io::Result<bool> {
        Ok(self.len()? == 0)
    }

    /// Truncates or extends to `len` bytes; new bytes read as zeros.
    fn set_len(&self, len: u64) -> io::Result<()>;

    /// Deallocates `len` bytes at `offset`, keeping the length: they read as zeros afterwards.
    /// Fails (and changes nothing) where the storage cannot deallocate.
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()>;

    /// Asks for the write-back of written data to start now rather than later. A hint: it
    /// promises nothing and may do nothing.
    fn start_writeback(&self) {}

    /// Whether the range at `offset` holds data or a hole, and for how many bytes (at least 1,
    /// at most `max_len`). Storages that do not know say data.
    fn allocation(&self, offset: u64, max_len: u64) -> io::Result<(Allocation, u64)> {
        let _ = offset;
        Ok((Allocation::Data, max_len))
    }

    /// Whether writes are possible (the file was opened for writing).
    fn is_writable(&self) -> bool;

    /// A storage of fixed length whose unused space holds old bytes (a block device), rather
    /// than a growable one whose unwritten bytes read as zeros (a regular file).
    fn fixed_size(&self) -> bool {
        false
    }

    /// This process is about to write the image although it opened it as a backing file: take
    /// QEMU's write locks on it, so that QEMU refuses to open it meanwhile (refused if another
    /// process uses it; the read-only locks stay then). Storages without locks do nothing.
    fn lock_for_writing(&self) -> Result<(), LockError> {
        Ok(())
    }

    /// The writes are done: go back to QEMU's read-only locks.
    fn unlock_writing(&self) -> Result<(), LockError> {
        Ok(())
    }

    /// Whether another process holds QEMU's "write" permission on the file now (a running VM
    /// writes it). `None` where nobody can tell (no locks: a storage without them, a file
    /// system without OFD locks).
    fn written_by_others(&self) -> io::Result<Option<bool>> {
        Ok(None)
    }

    /// The host file behind this storage, if there is one: for `fstat` and extended attributes
    /// of the image file (its owner, mode and times), never for its bytes.
    fn host_file(&self) -> Option<&File> {
        None
    }
}

/// A shared storage is a storage: a test can keep a handle on the bytes an image writes, and a
/// wrapper can be handed around.
impl<S: Storage + ?Sized> Storage for std::sync::Arc<S> {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        (**self).read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        (**self).write_at(buf, offset)
    }
    fn flush(&self) -> io::Result<()> {
        (**self).flush()
    }
    fn len(&self) -> io::Result<u64> {
        (**self).len()
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        (**self).set_len(len)
    }
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        (**self).punch_hole(offset, len)
    }
    fn start_writeback(&self) {
        (**self).start_writeback()
    }
    fn allocation(&self, offset: u64, max_len: u64) -> io::Result<(Allocation, u64)> {
        (**self).allocation(offset, max_len)
    }
    fn is_writable(&self) -> bool {
        (**self).is_writable()
    }
    fn fixed_size(&self) -> bool {
        (**self).fixed_size()
    }
    fn lock_for_writing(&self) -> Result<(), LockError> {
        (**self).lock_for_writing()
    }
    fn unlock_writing(&self) -> Result<(), LockError> {
        (**self).unlock_writing()
    }
    fn written_by_others(&self) -> io::Result<Option<bool>> {
        (**self).written_by_others()
    }
    fn host_file(&self) -> Option<&File> {
        (**self).host_file()
    }
}
