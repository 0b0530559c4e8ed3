//! What a request on a file of the tree does, in the engine's terms: the flags, bytes, offsets
//! and errnos that the adapter ([`super::SnapFs`]) sends back. Nothing here talks to the
//! kernel, so all of it is tested on images in memory, without a mount. Who may do what is
//! [`super::access`]'s question; which file an inode is, [`super::nodes`]'.

use fuser::{Errno, FopenFlags};

use super::DataCaching;
use super::nodes::Node;
use super::zeros::zeros;
use crate::checkpoints::Checkpoint;
use crate::error::Result;
use crate::view::{Filled, View};

/// What an open asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Wants {
    pub read: bool,
    pub write: bool,
}

/// How the kernel is to cache `node` opened for `wants`, or why it cannot be opened so.
/// `live_writable`: whether the live disk takes writes (a read-only mount's does not). Files of
/// `changes/` are opened by [`super::changes`], which knows their pair.
pub fn open_flags(
    node: Node,
    wants: Wants,
    live_writable: bool,
    caching: DataCaching,
) -> std::result::Result<FopenFlags, Errno> {
    let bypass = caching == DataCaching::Bypass;
    match node {
        Node::Root
        | Node::SnapshotsDir
        | Node::ControlDir
        | Node::CheckpointsDir
        | Node::ChangesDir => Err(Errno::EISDIR),
        Node::Change(_) | Node::Checkpoint { .. } | Node::Snapshot(_) if wants.write => {
            Err(Errno::EACCES)
        }
        Node::Live if wants.write && !live_writable => Err(Errno::EROFS),
        // Its bytes and its holes follow the live disk: nothing may be cached.
        Node::Checkpoint { .. } | Node::Change(_) => Ok(FopenFlags::FOPEN_DIRECT_IO),
        Node::Live | Node::Snapshot(_) if bypass => Ok(FopenFlags::FOPEN_DIRECT_IO),
        // Every change of the live disk goes through the kernel (or is announced to it), so its
        // page cache stays valid across opens; snapshot files never change while they exist.
        Node::Live | Node::Snapshot(_) => Ok(FopenFlags::FOPEN_KEEP_CACHE),
        // Each write to a command file is one command: no caching, no merging.
        Node::Command(_) if wants.read => Err(Errno::EACCES),
        Node::Command(_) => Ok(FopenFlags::FOPEN_DIRECT_IO),
        Node::Status | Node::InfoJson if wants.write => Err(Errno::EACCES),
        // Made afresh for each read.
        Node::Status | Node::InfoJson => Ok(FopenFlags::FOPEN_DIRECT_IO),
    }
}

/// The part of a generated text (`info.json`, `control/status`) that a read of `size` bytes at
/// `offset` gets.
pub fn text_at(text: &[u8], offset: u64, size: u32) -> &[u8] {
    let start = usize::try_from(offset).map_or(text.len(), |o| o.min(text.len()));
    let end = start.saturating_add(size as usize).min(text.len());
    &text[start..end]
}

/// The answer to a read of `size` bytes at `offset` of `view`, in one walk of the chain: read
/// into `buf` (grown as needed and never cleared, as the read writes every byte it returns), or,
/// when the whole range reads as zeros, a slice of the shared [`zeros`]: no memset, no page of
/// its own. A read at or past the end gets nothing.
pub fn read_view<'a>(
    view: &View,
    offset: u64,
    size: u32,
    buf: &'a mut Vec<u8>,
) -> Result<&'a [u8]> {
    let len = view.size().saturating_sub(offset).min(u64::from(size)) as usize;
    if buf.len() < len {
        buf.resize(len, 0);
    }
    let filled = view.read_unless_zeros(&mut buf[..len], offset)?;
    match filled {
        Filled::Bytes => Ok(&buf[..len]),
        Filled::Zeros if len <= zeros().len() => Ok(&zeros()[..len]),
        Filled::Zeros => {
            buf[..len].fill(0);
            Ok(&buf[..len])
        }
    }
}

/// How many of `len` bytes written at `offset` land on a disk of `size` bytes: a write that
/// runs past the end is cut short, as a block device does; `None` for one that starts at or
/// past the end (ENOSPC). A write of nothing lands anywhere.
pub fn write_len(size: u64, offset: u64, len: usize) -> Option<usize> {
    if len == 0 {
        return Some(0);
    }
    let room = size.checked_sub(offset).filter(|&room| room > 0)?;
    Some(usize::try_from(room).map_or(len, |room| room.min(len)))
}

/// `truncate(2)` of the live disk: it grows; the same size changes nothing; shrinking is
/// refused by the engine (it would drop guest data).
pub fn resize(view: &View, new_size: u64) -> Result<()> {
    if new_size == view.size() {
        return Ok(());
    }
    view.grow(new_size)
}

/// An `fallocate(2)` on the live disk, as its mode asks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fallocate {
    /// `FALLOC_FL_PUNCH_HOLE` or `FALLOC_FL_ZERO_RANGE`: the range reads as zeros after.
    zeroing: bool,
    /// `FALLOC_FL_KEEP_SIZE`: the disk does not grow.
    keep_size: bool,
}

impl Fallocate {
    /// The modes a disk file can honour; `EOPNOTSUPP` for any other bit (collapse, insert,
    /// unshare), as a file system without them answers.
    pub fn from_mode(mode: i32) -> std::result::Result<Self, Errno> {
        let known =
            libc::FALLOC_FL_KEEP_SIZE | libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_ZERO_RANGE;
        if mode & !known != 0 {
            return Err(Errno::EOPNOTSUPP);
        }
        Ok(Fallocate {
            zeroing: mode & (libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_ZERO_RANGE) != 0,
            keep_size: mode & libc::FALLOC_FL_KEEP_SIZE != 0,
        })
    }

    /// Does it to `length` bytes at `offset` of the live disk `view`.
    pub fn apply(self, view: &View, offset: u64, length: u64) -> Result<()> {
        let end = offset.saturating_add(length);
        if self.zeroing {
            view.zero_range(offset, length)
        } else if end <= view.size() || self.keep_size {
            // Plain preallocation inside the disk: every block already exists.
            Ok(())
        } else {
            // A disk is a whole number of sectors.
            view.grow(end.next_multiple_of(512))
        }
    }
}

/// What an `lseek(2)` looks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seek {
    Data,
    Hole,
}

impl Seek {
    /// `SEEK_DATA` or `SEEK_HOLE`; others are answered by the kernel itself, never asked.
    pub fn from_whence(whence: i32) -> std::result::Result<Self, Errno> {
        match whence {
            libc::SEEK_DATA => Ok(Seek::Data),
            libc::SEEK_HOLE => Ok(Seek::Hole),
            _ => Err(Errno::EINVAL),
        }
    }

    /// The offset found in `view` from `offset`; `None` (ENXIO) when there is none.
    pub fn in_view(self, view: &View, offset: u64) -> Result<Option<u64>> {
        match self {
            Seek::Data => view.seek_data(offset),
            Seek::Hole => view.seek_hole(offset),
        }
    }

    /// The offset found in a checkpoint's file of `size` bytes: the `.raw` file holds data
    /// exactly where the checkpoint marks a change; the `.json` list (`marks: None`) is data
    /// throughout.
    pub fn in_marks(self, marks: Option<&dyn Marks>, offset: u64, size: u64) -> Option<u64> {
        if offset >= size {
            return None;
        }
        match (self, marks) {
            (Seek::Data, None) => Some(offset),
            (Seek::Hole, None) => Some(size),
            (Seek::Data, Some(marks)) => marks.next_dirty(offset, size),
            (Seek::Hole, Some(marks)) => Some(marks.next_clean(offset, size)),
        }
    }
}

/// The ranges of the disk a checkpoint marks as changed.
pub trait Marks {
    /// The first marked byte at or after `from`, if any before `size`.
    fn next_dirty(&self, from: u64, size: u64) -> Option<u64>;
    /// The first unmarked byte at or after `from` (`size` at the most).
    fn next_clean(&self, from: u64, size: u64) -> u64;
}

impl Marks for Checkpoint {
    fn next_dirty(&self, from: u64, size: u64) -> Option<u64> {
        Checkpoint::next_dirty(self, from, size)
    }

    fn next_clean(&self, from: u64, size: u64) -> u64 {
        Checkpoint::next_clean(self, from, size)
    }
}

/// A read of `checkpoints/NAME.raw`: the live disk's bytes where the checkpoint marks a change,
/// zeros elsewhere.
pub fn read_marked(marks: &dyn Marks, live: &View, offset: u64, size: u32) -> Result<Vec<u8>> {
    let disk = live.size();
    let end = offset.saturating_add(u64::from(size)).min(disk);
    let mut buf = vec![0u8; end.saturating_sub(offset) as usize];
    let mut at = offset;
    while let Some(start) = marks.next_dirty(at, end) {
        let stop = marks.next_clean(start, end);
        let range = (start - offset) as usize..(stop - offset) as usize;
        live.read_at(&mut buf[range], start)?;
        at = stop;
    }
    Ok(buf)
}

#[cfg(test)]
pub(super) mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::chain::{Chain, Layer};
    use crate::control::CommandKind;
    use crate::qcow2::testing::memory_image;
    use crate::view::StartTable;

    const MIB: u64 = 1 << 20;

    /// The live view of a new empty 4 MiB image with 64 KiB clusters, in memory.
    pub(in crate::fs) fn memory_disk() -> View {
        let image = memory_image(4 * MIB);
        let chain = Arc::new(Chain::from_layers(vec![Arc::new(Layer::Qcow2(Box::new(
            image,
        )))]));
        View::new(chain, 0, StartTable::Active, 4 * MIB)
    }

    fn is_shared_zeros(data: &[u8]) -> bool {
        data.as_ptr() == zeros().as_ptr()
    }

    #[test]
    fn a_read_of_a_hole_answers_from_the_shared_zeros_and_a_read_of_data_from_the_buffer() {
        let disk = memory_disk();
        disk.write_at(&[7u8; 4096], MIB + 8192).expect("writing");
        let mut buf = vec![0xeeu8; 16];
        let hole = read_view(&disk, 0, 128 << 10, &mut buf).expect("reading a hole");
        assert_eq!(hole.len(), 128 << 10);
        assert!(is_shared_zeros(hole), "a hole is answered without a buffer");
        // The stale bytes of a reused buffer never show: the zeros before the data are written.
        let mut buf = vec![0xeeu8; MIB as usize];
        let mixed = read_view(&disk, MIB, 64 << 10, &mut buf).expect("reading data");
        assert!(!is_shared_zeros(mixed));
        let mut expected = vec![0u8; 64 << 10];
        expected[8192..8192 + 4096].fill(7);
        assert_eq!(mixed, &expected[..]);
        // Data first, then a hole: the hole's part is zeroed too.
        let mut buf = vec![0xeeu8; MIB as usize];
        let tail = read_view(&disk, MIB + 8192, 128 << 10, &mut buf).expect("reading");
        assert!(tail[..4096].iter().all(|&b| b == 7));
        assert!(tail[4096..].iter().all(|&b| b == 0));
    }

    #[test]
    fn a_read_stops_at_the_end_of_the_disk() {
        let disk = memory_disk();
        disk.write_at(&[1u8; 512], 4 * MIB - 512).expect("writing");
        let mut buf = Vec::new();
        let end = read_view(&disk, 4 * MIB - 512, 4096, &mut buf).expect("reading");
        assert_eq!(end, &[1u8; 512][..]);
        assert!(
            read_view(&disk, 4 * MIB, 4096, &mut buf)
                .expect("past")
                .is_empty()
        );
        assert!(
            read_view(&disk, u64::MAX, 4096, &mut buf)
                .expect("far")
                .is_empty()
        );
    }

    #[test]
    fn a_zeroed_range_reads_as_a_hole_again() {
        let disk = memory_disk();
        disk.write_at(&[3u8; 65536], 0).expect("writing");
        let zero = Fallocate::from_mode(libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE)
            .expect("a known mode");
        zero.apply(&disk, 0, 65536).expect("punching");
        let mut buf = Vec::new();
        assert!(is_shared_zeros(
            read_view(&disk, 0, 65536, &mut buf).expect("reading")
        ));
        assert_eq!(disk.size(), 4 * MIB);
    }

    #[test]
    fn fallocate_grows_to_whole_sectors_unless_told_to_keep_the_size() {
        let disk = memory_disk();
        let keep = Fallocate::from_mode(libc::FALLOC_FL_KEEP_SIZE).expect("a known mode");
        keep.apply(&disk, 4 * MIB, 1000).expect("keeping the size");
        assert_eq!(disk.size(), 4 * MIB);
        let grow = Fallocate::from_mode(0).expect("a known mode");
        grow.apply(&disk, 0, MIB).expect("inside the disk");
        assert_eq!(disk.size(), 4 * MIB);
        grow.apply(&disk, 4 * MIB, 1000).expect("growing");
        assert_eq!(disk.size(), 4 * MIB + 1024);
        for mode in [
            libc::FALLOC_FL_COLLAPSE_RANGE,
            libc::FALLOC_FL_INSERT_RANGE,
            libc::FALLOC_FL_UNSHARE_RANGE,
        ] {
            assert_eq!(Fallocate::from_mode(mode), Err(Errno::EOPNOTSUPP));
        }
    }

    #[test]
    fn truncate_grows_keeps_or_refuses_to_shrink() {
        let disk = memory_disk();
        resize(&disk, 4 * MIB).expect("the same size");
        resize(&disk, 8 * MIB).expect("growing");
        assert_eq!(disk.size(), 8 * MIB);
        assert!(resize(&disk, MIB).is_err(), "shrinking drops guest data");
        assert_eq!(disk.size(), 8 * MIB);
    }

    #[test]
    fn writes_are_cut_at_the_end_and_refused_past_it() {
        assert_eq!(write_len(4096, 0, 512), Some(512));
        assert_eq!(write_len(4096, 4000, 512), Some(96));
        assert_eq!(write_len(4096, 4096, 512), None);
        assert_eq!(write_len(4096, u64::MAX, 512), None);
        assert_eq!(write_len(4096, 8192, 0), Some(0));
    }

    #[test]
    fn text_reads_take_the_asked_slice() {
        let text = b"hello, world\n";
        assert_eq!(text_at(text, 0, 5), b"hello");
        assert_eq!(text_at(text, 7, 100), b"world\n");
        assert_eq!(text_at(text, 13, 10), b"");
        assert_eq!(text_at(text, u64::MAX, u32::MAX), b"");
    }

    /// Marks on a few ranges, as a checkpoint's bitmaps would.
    struct Ranges(Vec<(u64, u64)>);

    impl Marks for Ranges {
        fn next_dirty(&self, from: u64, size: u64) -> Option<u64> {
            self.0
                .iter()
                .filter(|(start, end)| *end > from && *start < size)
                .map(|(start, _)| (*start).max(from))
                .min()
        }

        fn next_clean(&self, from: u64, size: u64) -> u64 {
            let inside = self
                .0
                .iter()
                .find(|(start, end)| *start <= from && from < *end);
            inside.map_or(from, |(_, end)| *end).min(size)
        }
    }

    #[test]
    fn a_checkpoint_file_shows_the_disk_where_it_marks_and_zeros_elsewhere() {
        let disk = memory_disk();
        disk.write_at(&[5u8; 8192], 0).expect("writing");
        let marks = Ranges(vec![(4096, 6144), (MIB, MIB + 512)]);
        let bytes = read_marked(&marks, &disk, 0, 8192).expect("reading");
        let mut expected = vec![0u8; 8192];
        expected[4096..6144].fill(5);
        assert_eq!(bytes, expected);
        assert_eq!(Seek::Data.in_marks(Some(&marks), 0, 4 * MIB), Some(4096));
        assert_eq!(Seek::Hole.in_marks(Some(&marks), 4096, 4 * MIB), Some(6144));
        assert_eq!(Seek::Data.in_marks(Some(&marks), MIB + 512, 4 * MIB), None);
        assert_eq!(Seek::Hole.in_marks(None, 10, 100), Some(100));
        assert_eq!(Seek::Data.in_marks(None, 100, 100), None);
        assert_eq!(Seek::from_whence(libc::SEEK_END), Err(Errno::EINVAL));
    }

    #[test]
    fn open_refuses_what_a_file_cannot_do() {
        let read = Wants {
            read: true,
            write: false,
        };
        let write = Wants {
            read: false,
            write: true,
        };
        let both = Wants {
            read: true,
            write: true,
        };
        let cache = DataCaching::PageCache;
        let open = |node, wants| open_flags(node, wants, true, cache);
        assert_eq!(open(Node::SnapshotsDir, read), Err(Errno::EISDIR));
        assert_eq!(open(Node::Snapshot(1), both), Err(Errno::EACCES));
        assert_eq!(
            open(Node::Snapshot(1), read),
            Ok(FopenFlags::FOPEN_KEEP_CACHE)
        );
        assert_eq!(open(Node::Live, both), Ok(FopenFlags::FOPEN_KEEP_CACHE));
        assert_eq!(
            open_flags(Node::Live, write, false, cache),
            Err(Errno::EROFS),
            "the live disk of a read-only mount"
        );
        assert_eq!(
            open_flags(Node::Live, read, true, DataCaching::Bypass),
            Ok(FopenFlags::FOPEN_DIRECT_IO)
        );
        let create = Node::Command(CommandKind::Create);
        assert_eq!(open(create, write), Ok(FopenFlags::FOPEN_DIRECT_IO));
        assert_eq!(open(create, both), Err(Errno::EACCES));
        assert_eq!(open(Node::Status, write), Err(Errno::EACCES));
        let checkpoint = Node::Checkpoint {
            key: 0,
            json: false,
        };
        assert_eq!(open(checkpoint, read), Ok(FopenFlags::FOPEN_DIRECT_IO));
        assert_eq!(open(checkpoint, write), Err(Errno::EACCES));
    }
}
