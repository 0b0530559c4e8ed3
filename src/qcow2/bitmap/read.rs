//! The one way this module reads the image: whole byte ranges at host offsets.
//!
//! Kept to a single method so that the engine's storage boundary can implement it as it is; a
//! file and a byte slice (tests, fuzzing) implement it here.

use std::io;
use std::os::unix::fs::FileExt;

use crate::qcow2::storage::Storage;

/// Reads host bytes of an image file.
pub trait ReadAt {
    /// Fills `buf` with the bytes at `offset`; a range that runs past the end of the file is an
    /// error (`UnexpectedEof`), never a short read.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
}

impl ReadAt for std::fs::File {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.read_exact_at(buf, offset)
    }
}

/// The engine's storage boundary. [`Storage::read_at`] reads past the end as zeros; bitmap
/// metadata past the end is refused instead (QEMU checks every bitmap offset against the file).
impl ReadAt for dyn Storage + '_ {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let len = self.len()?;
        if offset
            .checked_add(buf.len() as u64)
            .is_none_or(|end| end > len)
        {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!(
                    "{} bytes at {offset:#x} run past the end ({len} bytes)",
                    buf.len()
                ),
            ));
        }
        Storage::read_at(self, buf, offset)
    }
}

impl ReadAt for [u8] {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let src = usize::try_from(offset)
            .ok()
            .and_then(|start| Some(start..start.checked_add(buf.len())?))
            .and_then(|range| self.get(range))
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!(
                        "{} bytes at {offset:#x} run past the end ({} bytes)",
                        buf.len(),
                        self.len()
                    ),
                )
            })?;
        buf.copy_from_slice(src);
        Ok(())
    }
}

impl<T: ReadAt + ?Sized> ReadAt for &T {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        (**self).read_at(buf, offset)
    }
}
