//! Bytes in memory as a [`Storage`]: an image file for tests that need no root, no FUSE and no
//! file system. It behaves as a regular file would: it grows on writes past its end, reads past
//! the end as zeros, and punched holes read as zeros. Flushes count but do nothing else: memory
//! cannot lose writes (a power-cut simulator wraps a storage to decide what a crash keeps).

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::RwLock;

use super::Storage;

/// An image file in memory.
#[derive(Debug, Default)]
pub struct MemoryStorage {
    bytes: RwLock<Vec<u8>>,
    read_only: bool,
    flushes: AtomicU64,
}

impl MemoryStorage {
    /// A writable storage holding `bytes`.
    pub fn new(bytes: Vec<u8>) -> Self {
        MemoryStorage {
            bytes: RwLock::new(bytes),
            read_only: false,
            flushes: AtomicU64::new(0),
        }
    }

    /// A storage holding `bytes` that refuses writes, as a file opened read-only does.
    pub fn read_only(bytes: Vec<u8>) -> Self {
        MemoryStorage {
            read_only: true,
            ..Self::new(bytes)
        }
    }

    /// A copy of the bytes now.
    pub fn contents(&self) -> Vec<u8> {
        self.bytes.read().clone()
    }

    /// How many flushes completed so far.
    pub fn flushes(&self) -> u64 {
        self.flushes.load(Ordering::Relaxed)
    }

    fn check_writable(&self) -> io::Result<()> {
        if self.read_only {
            Err(io::Error::from_raw_os_error(libc::EBADF))
        } else {
            Ok(())
        }
    }
}

/// `offset + len` as an index, or the error a file would give for a range it cannot hold.
fn end_of(offset: u64, len: usize) -> io::Result<usize> {
    offset
        .checked_add(len as u64)
        .and_then(|end| usize::try_from(end).ok())
        .ok_or_else(|| io::Error::from_raw_os_error(libc::EFBIG))
}

impl Storage for MemoryStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let bytes = self.bytes.read();
        let start = usize::try_from(offset)
            .unwrap_or(usize::MAX)
            .min(bytes.len());
        let n = (bytes.len() - start).min(buf.len());
        buf[..n].copy_from_slice(&bytes[start..start + n]);
        buf[n..].fill(0);
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.check_writable()?;
        let end = end_of(offset, buf.len())?;
        let mut bytes = self.bytes.write();
        if bytes.len() < end {
            bytes.resize(end, 0);
        }
        bytes[end - buf.len()..end].copy_from_slice(buf);
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        self.flushes.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.bytes.read().len() as u64)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.check_writable()?;
        let len = end_of(len, 0)?;
        self.bytes.write().resize(len, 0);
        Ok(())
    }

    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        self.check_writable()?;
        let mut bytes = self.bytes.write();
        let size = bytes.len() as u64;
        let start = offset.min(size) as usize;
        let end = offset.saturating_add(len).min(size) as usize;
        bytes[start..end].fill(0);
        Ok(())
    }

    fn is_writable(&self) -> bool {
        !self.read_only
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn behaves_as_a_sparse_file() {
        let s = MemoryStorage::new(Vec::new());
        s.write_at(b"xyz", 10).expect("write");
        assert_eq!(s.len().expect("len"), 13);
        let mut buf = [0xffu8; 6];
        s.read_at(&mut buf, 9).expect("read");
        assert_eq!(&buf, b"\0xyz\0\0");
        s.punch_hole(11, 100).expect("punch");
        assert_eq!(s.contents(), b"\0\0\0\0\0\0\0\0\0\0x\0\0");
        s.set_len(4).expect("truncate");
        assert_eq!(s.contents(), vec![0; 4]);
        s.flush().expect("flush");
        assert_eq!(s.flushes(), 1);
        let ro = MemoryStorage::read_only(vec![1, 2]);
        assert!(ro.write_at(b"a", 0).is_err() && !ro.is_writable());
        assert_eq!(ro.contents(), [1, 2]);
    }
}
