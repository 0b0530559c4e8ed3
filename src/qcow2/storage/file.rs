//! A host file or block device as a [`Storage`]: positioned reads and writes (`pread`/`pwrite`,
//! so that threads never share a file position), `fdatasync`, `fallocate` and
//! `sync_file_range`, and QEMU's image locks, which are OFD locks on this file's open file
//! description (see [`crate::qcow2::lock`]) and so belong with it.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::{Allocation, Storage};
use crate::qcow2::lock::{
    ImageLock, LockError, LockMode, Perm, downgrade_to_read_only, held_by_others,
    upgrade_to_read_write,
};

/// An open image file.
#[derive(Debug)]
pub struct FileStorage {
    file: File,
    /// For lock messages only.
    path: PathBuf,
    writable: bool,
    block_device: bool,
}

impl FileStorage {
    /// Wraps an open file (or block device) whose name is `path`.
    pub fn new(file: File, path: &Path) -> io::Result<Self> {
        let block_device = !file.metadata()?.is_file();
        // SAFETY: F_GETFL only reads the descriptor's flags.
        let flags = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GETFL) };
        if flags < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(FileStorage {
            file,
            path: path.to_owned(),
            writable: flags & libc::O_ACCMODE != libc::O_RDONLY,
            block_device,
        })
    }

    /// Opens `path` for reading, and for writing too if `writable`.
    pub fn open(path: &Path, writable: bool) -> io::Result<Self> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(writable)
            .open(path)?;
        Self::new(file, path)
    }

    /// Takes QEMU's locks for `mode` on the file; they last as long as the file stays open.
    pub fn lock(&self, mode: LockMode) -> Result<ImageLock, LockError> {
        ImageLock::acquire(&self.file, &self.path, mode)
    }
}

impl Storage for FileStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let mut done = 0;
        while done < buf.len() {
            match self.file.read_at(&mut buf[done..], offset + done as u64) {
                Ok(0) => {
                    buf[done..].fill(0);
                    return Ok(());
                }
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.file.write_all_at(buf, offset)
    }

    fn flush(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    fn len(&self) -> io::Result<u64> {
        if !self.block_device {
            return Ok(self.file.metadata()?.len());
        }
        // Block devices report 0 in st_size; their size is where the end is.
        // SAFETY: lseek on a descriptor we own; no code relies on the file position (every read
        // and write is positioned).
        let end = unsafe { libc::lseek(self.file.as_raw_fd(), 0, libc::SEEK_END) };
        if end < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(end as u64)
        }
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.file.set_len(len)
    }

    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        // SAFETY: fallocate on a descriptor we own, with a range and mode the kernel checks.
        let r = unsafe {
            libc::fallocate(
                self.file.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                offset as libc::off_t,
                len as libc::off_t,
            )
        };
        if r == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }

    fn start_writeback(&self) {
        // SAFETY: a plain syscall on an open descriptor; offset 0 and length 0 mean "to the end
        // of the file". SYNC_FILE_RANGE_WRITE submits and does not wait. A failure (a file system
        // without write-back, say) only loses the head start.
        let rc = unsafe {
            libc::sync_file_range(self.file.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE)
        };
        if rc != 0 {
            log::debug!(
                "{}: sync_file_range: {} (write-back not started early)",
                self.path.display(),
                io::Error::last_os_error()
            );
        }
    }

    fn allocation(&self, offset: u64, max_len: u64) -> io::Result<(Allocation, u64)> {
        let fd = self.file.as_raw_fd();
        let seek = |whence| {
            // SAFETY: lseek on a descriptor we own; it only moves the file position, which no
            // code relies on (every read and write is positioned).
            let r = unsafe { libc::lseek(fd, offset as libc::off_t, whence) };
            if r < 0 {
                Err(io::Error::last_os_error())
            } else {
                Ok(r as u64)
            }
        };
        match seek(libc::SEEK_DATA) {
            Ok(data) if data == offset => {
                let hole = seek(libc::SEEK_HOLE)?;
                Ok((Allocation::Data, (hole - offset).clamp(1, max_len)))
            }
            Ok(data) => Ok((Allocation::Hole, (data - offset).min(max_len))),
            Err(e) if e.raw_os_error() == Some(libc::ENXIO) => Ok((Allocation::Hole, max_len)),
            // A file system without SEEK_DATA support: everything is data.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Ok((Allocation::Data, max_len)),
            Err(e) => Err(e),
        }
    }

    fn is_writable(&self) -> bool {
        self.writable
    }

    fn fixed_size(&self) -> bool {
        self.block_device
    }

    fn lock_for_writing(&self) -> Result<(), LockError> {
        upgrade_to_read_write(&self.file, &self.path)
    }

    fn unlock_writing(&self) -> Result<(), LockError> {
        downgrade_to_read_only(&self.file, &self.path)
    }

    fn written_by_others(&self) -> io::Result<Option<bool>> {
        held_by_others(&self.file, Perm::Write)
    }

    fn host_file(&self) -> Option<&File> {
        Some(&self.file)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_past_the_end_are_zeros_and_holes_are_found() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("f");
        let s = FileStorage::new(
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(&path)
                .expect("create"),
            &path,
        )
        .expect("storage");
        assert!(s.is_writable() && !s.fixed_size());
        s.write_at(b"abc", 1 << 20).expect("write");
        let mut buf = [0xffu8; 8];
        s.read_at(&mut buf, (1 << 20) + 1).expect("read");
        assert_eq!(&buf, b"bc\0\0\0\0\0\0");
        assert_eq!(s.len().expect("len"), (1 << 20) + 3);
        // The first MiB was never written: a hole where the file system keeps holes.
        let (kind, len) = s.allocation(0, 1 << 20).expect("allocation");
        if kind == Allocation::Hole {
            assert_eq!(len, 1 << 20);
        }
        let (kind, _) = s.allocation(1 << 20, 3).expect("allocation");
        assert_eq!(kind, Allocation::Data);
        s.flush().expect("flush");
        assert_eq!(s.host_file().map(|f| f.metadata().is_ok()), Some(true));
    }
}
