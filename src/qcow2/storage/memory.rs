//! Bytes in memory as a [`Storage`]: an image file for tests that need no root, no FUSE and no
//! file system. It behaves as a regular file would: it grows on writes past its end, reads past
//! the end as zeros, and punched holes read as zeros. Flushes count but do nothing else: memory
//! cannot lose writes (a power-cut simulator wraps a storage to decide what a crash keeps).
//!
//! The bytes are sparse, as in a file system: fixed-size pages in a map, a page never written
//! (or punched whole, or cut off by a truncation) is absent and reads as zeros, and the length
//! is kept apart from the pages. So growing the file (the engine extends an image a cluster at a
//! time, 2 MiB with the largest clusters) costs nothing, and a write of zeros to a hole keeps it
//! a hole. It answers [`Storage::allocation`] as storages that do not know do (data everywhere),
//! as it always did: the holes are its own economy, not a claim about the image.

use std::collections::BTreeMap;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::RwLock;

use super::Storage;

/// Bytes per page: small enough that small-cluster images stay small, large enough that a
/// 2 MiB cluster is a few dozen pages.
const PAGE_SIZE: usize = 64 << 10;

/// A page of zeros, copied from to zero a buffer (a copy is a memcpy even in a debug build,
/// where a fill loops byte by byte).
static ZEROS: [u8; PAGE_SIZE] = [0; PAGE_SIZE];

/// The pages and the length. Every byte at or past `len` reads as zeros: no page lies wholly
/// past it, and the page holding it is zero from it on.
#[derive(Debug, Default)]
struct Pages {
    len: u64,
    /// Page index to its `PAGE_SIZE` bytes.
    pages: BTreeMap<u64, Box<[u8]>>,
}

/// One page's part of a byte range: the page, where in it the part starts, and its length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Part {
    page: u64,
    start: usize,
    len: usize,
}

/// The parts of `[offset, end)` page by page.
fn parts(offset: u64, end: u64) -> impl Iterator<Item = Part> {
    let page_size = PAGE_SIZE as u64;
    let mut at = offset;
    std::iter::from_fn(move || {
        if at >= end {
            return None;
        }
        let start = at % page_size;
        let len = (page_size - start).min(end - at);
        let part = Part {
            page: at / page_size,
            start: start as usize,
            len: len as usize,
        };
        at += len;
        Some(part)
    })
}

fn zero(buf: &mut [u8]) {
    for chunk in buf.chunks_mut(PAGE_SIZE) {
        chunk.copy_from_slice(&ZEROS[..chunk.len()]);
    }
}

fn is_zero(bytes: &[u8]) -> bool {
    bytes.chunks(PAGE_SIZE).all(|c| c == &ZEROS[..c.len()])
}

impl Pages {
    fn from_bytes(bytes: &[u8]) -> Self {
        let pages = bytes
            .chunks(PAGE_SIZE)
            .enumerate()
            .filter(|(_, chunk)| !is_zero(chunk))
            .map(|(i, chunk)| {
                let mut page = new_page();
                page[..chunk.len()].copy_from_slice(chunk);
                (i as u64, page)
            })
            .collect();
        Pages {
            len: bytes.len() as u64,
            pages,
        }
    }

    /// Zeros `[offset, end)` (within the length): whole pages dropped, parts of pages zeroed.
    fn clear(&mut self, offset: u64, end: u64) {
        // Past the length a page holds zeros already: a range to the end takes its last page's
        // tail with it, so that page goes whole if the range starts it.
        let end = if end >= self.len {
            end.next_multiple_of(PAGE_SIZE as u64)
        } else {
            end
        };
        for part in parts(offset, end) {
            if part.len == PAGE_SIZE {
                self.pages.remove(&part.page);
            } else if let Some(page) = self.pages.get_mut(&part.page) {
                zero(&mut page[part.start..part.start + part.len]);
            }
        }
    }
}

fn new_page() -> Box<[u8]> {
    vec![0u8; PAGE_SIZE].into_boxed_slice()
}

/// An image file in memory.
#[derive(Debug, Default)]
pub struct MemoryStorage {
    bytes: RwLock<Pages>,
    read_only: bool,
    flushes: AtomicU64,
}

impl MemoryStorage {
    /// A writable storage holding `bytes`.
    pub fn new(bytes: Vec<u8>) -> Self {
        MemoryStorage {
            bytes: RwLock::new(Pages::from_bytes(&bytes)),
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
        let pages = self.bytes.read();
        // Within the address space: every write and length change was checked by `end_of`.
        let mut out = vec![0u8; pages.len as usize];
        for (&index, page) in &pages.pages {
            let start = index as usize * PAGE_SIZE;
            let n = PAGE_SIZE.min(out.len() - start);
            out[start..start + n].copy_from_slice(&page[..n]);
        }
        out
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

/// `offset + len`, or the error a file would give for a range it cannot hold (one past what a
/// copy of the bytes in memory could index).
fn end_of(offset: u64, len: usize) -> io::Result<u64> {
    offset
        .checked_add(len as u64)
        .filter(|&end| usize::try_from(end).is_ok())
        .ok_or_else(|| io::Error::from_raw_os_error(libc::EFBIG))
}

impl Storage for MemoryStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let pages = self.bytes.read();
        let end = offset.saturating_add(buf.len() as u64).min(pages.len);
        let mut done = 0;
        for part in parts(offset, end) {
            let out = &mut buf[done..done + part.len];
            match pages.pages.get(&part.page) {
                Some(page) => out.copy_from_slice(&page[part.start..part.start + part.len]),
                None => zero(out),
            }
            done += part.len;
        }
        zero(&mut buf[done..]);
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.check_writable()?;
        let end = end_of(offset, buf.len())?;
        let mut pages = self.bytes.write();
        let mut done = 0;
        for part in parts(offset, end) {
            let bytes = &buf[done..done + part.len];
            done += part.len;
            let page = match pages.pages.get_mut(&part.page) {
                Some(page) => page,
                // Zeros in a hole: it reads so already.
                None if is_zero(bytes) => continue,
                None => pages.pages.entry(part.page).or_insert_with(new_page),
            };
            page[part.start..part.start + part.len].copy_from_slice(bytes);
        }
        pages.len = pages.len.max(end);
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        self.flushes.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.bytes.read().len)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.check_writable()?;
        end_of(len, 0)?;
        let mut pages = self.bytes.write();
        if len < pages.len {
            // What lies past the new end must read as zeros if the file grows again.
            let old = pages.len;
            pages.clear(len, old);
        }
        pages.len = len;
        Ok(())
    }

    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        self.check_writable()?;
        let mut pages = self.bytes.write();
        let size = pages.len;
        pages.clear(offset.min(size), offset.saturating_add(len).min(size));
        Ok(())
    }

    fn is_writable(&self) -> bool {
        !self.read_only
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: u64 = PAGE_SIZE as u64;

    impl MemoryStorage {
        /// How many bytes the pages hold (the space a sparse file would take).
        fn allocated_bytes(&self) -> u64 {
            self.bytes.read().pages.len() as u64 * P
        }
    }

    fn read(s: &MemoryStorage, offset: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0xa5u8; len];
        s.read_at(&mut buf, offset).expect("read");
        buf
    }

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
        assert!(ro.set_len(0).is_err() && ro.punch_hole(0, 1).is_err());
        assert_eq!(ro.contents(), [1, 2]);
    }

    #[test]
    fn a_write_across_pages_reads_back_and_holes_read_as_zeros() {
        let s = MemoryStorage::new(Vec::new());
        let data: Vec<u8> = (0..P as usize + 100).map(|i| (i % 251 + 1) as u8).collect();
        // From 50 bytes before the end of page 2 into page 4.
        let at = 3 * P - 50;
        s.write_at(&data, at).expect("write");
        assert_eq!(s.len().expect("len"), at + data.len() as u64);
        assert_eq!(read(&s, at, data.len()), data);
        // Pages 0 and 1 were never written: zeros, and no memory.
        assert_eq!(read(&s, 0, 2 * P as usize), vec![0; 2 * P as usize]);
        assert_eq!(s.allocated_bytes(), 3 * P);
        // A read across the hole, the data and past the end.
        let got = read(&s, at - 10, data.len() + 30);
        assert_eq!(&got[..10], &[0; 10]);
        assert_eq!(&got[10..10 + data.len()], &data[..]);
        assert_eq!(&got[10 + data.len()..], &[0; 20]);
        // Far past the end, even past what an offset can reach.
        assert_eq!(read(&s, u64::MAX - 3, 8), vec![0; 8]);
        let mut want = vec![0u8; at as usize];
        want.extend_from_slice(&data);
        assert_eq!(s.contents(), want);
    }

    #[test]
    fn zeros_written_into_a_hole_take_no_page_and_zeros_over_data_read_as_zeros() {
        let s = MemoryStorage::new(Vec::new());
        s.write_at(&vec![0; 3 * P as usize], 0)
            .expect("write zeros");
        assert_eq!(s.len().expect("len"), 3 * P);
        assert_eq!(s.allocated_bytes(), 0);
        s.write_at(&[7; 10], P + 5).expect("write");
        s.write_at(&[0; 4], P + 6).expect("zeros over data");
        assert_eq!(read(&s, P + 4, 12), [0, 7, 0, 0, 0, 0, 7, 7, 7, 7, 7, 0]);
        assert_eq!(s.allocated_bytes(), P);
        // Bytes given at creation: pages of zeros are holes.
        let mut bytes = vec![0u8; 3 * P as usize];
        bytes[2 * P as usize] = 9;
        let s = MemoryStorage::new(bytes.clone());
        assert_eq!(s.allocated_bytes(), P);
        assert_eq!(s.contents(), bytes);
    }

    #[test]
    fn punch_drops_whole_pages_zeroes_parts_and_keeps_the_length() {
        let len = 4 * P + 100;
        let s = MemoryStorage::new(vec![1; len as usize]);
        // Part of page 0, pages 1 and 2 whole, part of page 3.
        s.punch_hole(P - 10, 2 * P + 30).expect("punch");
        assert_eq!(s.len().expect("len"), len);
        assert_eq!(s.allocated_bytes(), 3 * P);
        let got = s.contents();
        assert!(got[..(P - 10) as usize].iter().all(|&b| b == 1));
        assert!(
            got[(P - 10) as usize..(3 * P + 20) as usize]
                .iter()
                .all(|&b| b == 0)
        );
        assert!(got[(3 * P + 20) as usize..].iter().all(|&b| b == 1));
        // A punch over the end: the length stays, and only the bytes inside go.
        s.punch_hole(4 * P + 50, 1 << 40).expect("punch at the end");
        assert_eq!(s.len().expect("len"), len);
        assert_eq!(read(&s, 4 * P + 48, 4), [1, 1, 0, 0]);
        // Entirely past the end: nothing changes.
        s.punch_hole(len + 10, 5).expect("punch past the end");
        assert_eq!(s.len().expect("len"), len);
    }

    #[test]
    fn truncating_inside_a_page_then_growing_reads_zeros_past_the_cut() {
        let s = MemoryStorage::new(vec![3; 3 * P as usize]);
        s.set_len(P + 7).expect("truncate");
        assert_eq!(s.len().expect("len"), P + 7);
        assert_eq!(s.allocated_bytes(), 2 * P);
        assert_eq!(read(&s, P + 5, 4), [3, 3, 0, 0]);
        // Growing again, by length and by a write past the end: the cut bytes stay zeros.
        s.set_len(3 * P).expect("extend");
        assert_eq!(s.len().expect("len"), 3 * P);
        assert_eq!(s.allocated_bytes(), 2 * P);
        s.write_at(&[4], 3 * P + 1).expect("write past the end");
        assert_eq!(s.len().expect("len"), 3 * P + 2);
        let got = s.contents();
        assert!(got[..(P + 7) as usize].iter().all(|&b| b == 3));
        assert!(
            got[(P + 7) as usize..(3 * P + 1) as usize]
                .iter()
                .all(|&b| b == 0)
        );
        assert_eq!(got[(3 * P + 1) as usize], 4);
        // To a page boundary, and to nothing.
        s.set_len(P).expect("truncate to a page boundary");
        assert_eq!(s.allocated_bytes(), P);
        s.set_len(0).expect("truncate to nothing");
        assert_eq!((s.len().expect("len"), s.allocated_bytes()), (0, 0));
        assert_eq!(read(&s, 0, 4), [0; 4]);
    }

    #[test]
    fn a_range_past_the_address_space_is_refused_and_changes_nothing() {
        let s = MemoryStorage::new(vec![1; 4]);
        let err = s.write_at(b"ab", u64::MAX - 1).expect_err("past u64");
        assert_eq!(err.raw_os_error(), Some(libc::EFBIG));
        assert_eq!(s.contents(), [1; 4]);
    }
}
