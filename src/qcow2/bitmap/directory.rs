//! The bitmap directory: "a contiguous area in the image file, whose starting offset and length
//! are given by the header extension fields `bitmap_directory_offset` and
//! `bitmap_directory_size`". Each entry, from the spec:
//! ```text
//!  0 -  7: bitmap_table_offset   8 - 11: bitmap_table_size (entries)   12 - 15: flags
//!      16: type                      17: granularity_bits               18 - 19: name_size
//! 20 - 23: extra_data_size       then extra_data, the name (not NUL-terminated), zero padding
//!          to a multiple of 8
//! ```
//!
//! Parsing refuses, for the whole directory, what QEMU's `bitmap_list_load` calls a broken
//! directory, a count that disagrees with the header extension, and repeated names (QEMU fails to
//! create the second bitmap, and the open fails). What QEMU refuses in a single entry
//! (`check_dir_entry`, extra data) is kept, and reported by `constraints::check` and `Role`:
//! snapfs leaves such a bitmap alone rather than refusing the whole image.

use std::collections::HashMap;

use super::error::BitmapError;
use super::flags::Flags;
use super::read::ReadAt;
use super::{ImageLayout, constraints, limits};
use crate::qcow2::header::BitmapsExtension;

/// One directory entry, as stored (the padding is not kept: the spec requires zeros there, and
/// QEMU ignores it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BitmapEntry {
    pub table_offset: u64,
    /// Number of u64 entries of the bitmap table.
    pub table_size: u32,
    pub flags: Flags,
    /// `type`: 1 for a dirty tracking bitmap.
    pub kind: u8,
    pub granularity_bits: u8,
    /// The name's bytes (not necessarily UTF-8).
    pub name: Vec<u8>,
    /// Type-specific extra data, kept for a rewrite ("extra data must be left as is").
    pub extra_data: Vec<u8>,
}

impl BitmapEntry {
    /// The name for messages (invalid UTF-8 replaced).
    pub fn name_lossy(&self) -> String {
        String::from_utf8_lossy(&self.name).into_owned()
    }

    /// Bytes per bit.
    pub fn granularity(&self) -> u64 {
        1u64 << self.granularity_bits.min(63)
    }

    /// The entry's length in the directory, padding included.
    pub fn encoded_len(&self) -> usize {
        entry_len(self.name.len(), self.extra_data.len())
    }

    /// QEMU's constraints on this entry in an image of this layout.
    pub fn check(&self, layout: &ImageLayout) -> Result<(), constraints::EntryProblem> {
        constraints::check(self, layout)
    }

    fn encode_into(&self, out: &mut Vec<u8>) -> Result<(), BitmapError> {
        let name_size = u16::try_from(self.name.len()).map_err(|_| BitmapError::Unencodable {
            field: "name_size",
            value: self.name.len() as u64,
            max: u16::MAX.into(),
        })?;
        let extra_size =
            u32::try_from(self.extra_data.len()).map_err(|_| BitmapError::Unencodable {
                field: "extra_data_size",
                value: self.extra_data.len() as u64,
                max: u32::MAX.into(),
            })?;
        let start = out.len();
        out.extend_from_slice(&self.table_offset.to_be_bytes());
        out.extend_from_slice(&self.table_size.to_be_bytes());
        out.extend_from_slice(&self.flags.0.to_be_bytes());
        out.push(self.kind);
        out.push(self.granularity_bits);
        out.extend_from_slice(&name_size.to_be_bytes());
        out.extend_from_slice(&extra_size.to_be_bytes());
        out.extend_from_slice(&self.extra_data);
        out.extend_from_slice(&self.name);
        out.resize(start + self.encoded_len(), 0);
        Ok(())
    }
}

/// QEMU's `calc_dir_entry_size`: the fixed part, the extra data and the name, rounded up to 8.
fn entry_len(name_len: usize, extra_len: usize) -> usize {
    (limits::ENTRY_HEADER_SIZE + extra_len + name_len).next_multiple_of(8)
}

/// Every entry of a bitmap directory, in file order.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Directory {
    pub entries: Vec<BitmapEntry>,
}

impl Directory {
    /// Reads and parses the directory the header extension points at. The directory must lie
    /// inside the file: its size is bounded by the file and by QEMU's maximum before anything is
    /// allocated.
    pub fn read(
        reader: &impl ReadAt,
        extension: &BitmapsExtension,
        layout: &ImageLayout,
    ) -> Result<Directory, BitmapError> {
        let size = extension.directory_size;
        let offset = extension.directory_offset;
        if size == 0 {
            return Err(BitmapError::EmptyDirectory);
        }
        if size > limits::MAX_DIRECTORY_SIZE {
            return Err(BitmapError::DirectoryTooLarge {
                size,
                max: limits::MAX_DIRECTORY_SIZE,
            });
        }
        if !layout.inside_file(offset, size) {
            return Err(BitmapError::DirectoryOutsideFile {
                offset,
                size,
                file_len: layout.file_len,
            });
        }
        // size <= MAX_DIRECTORY_SIZE (64 MiB), so it fits in usize.
        let mut bytes = vec![0u8; size as usize];
        reader
            .read_at(&mut bytes, offset)
            .map_err(|source| BitmapError::Read {
                name: String::new(),
                what: "the bitmap directory",
                offset,
                len: size,
                source,
            })?;
        Directory::parse(&bytes, extension.nb_bitmaps)
    }

    /// Parses directory bytes that the header extension says hold `nb_bitmaps` entries, walking
    /// them as QEMU's `bitmap_list_load` does: each entry's fixed part and then the whole entry
    /// must fit, there must be exactly `nb_bitmaps` of them, and they must end exactly at the end.
    pub fn parse(bytes: &[u8], nb_bitmaps: u32) -> Result<Directory, BitmapError> {
        // The header extension holds at least one bitmap, so a directory is never empty.
        if bytes.is_empty() {
            return Err(BitmapError::EmptyDirectory);
        }
        let mut entries = Vec::new();
        let mut names: HashMap<Vec<u8>, usize> = HashMap::new();
        let mut at = 0usize;
        let broken = |index: u32, at: usize, reason: String| BitmapError::BrokenDirectory {
            index,
            at,
            size: bytes.len(),
            reason,
        };
        while at < bytes.len() {
            let index = entries.len() as u32;
            let Some(fixed) = bytes
                .get(at..)
                .and_then(<[u8]>::first_chunk::<{ limits::ENTRY_HEADER_SIZE }>)
            else {
                return Err(broken(
                    index,
                    at,
                    format!(
                        "the {}-byte entry header runs past the end",
                        limits::ENTRY_HEADER_SIZE
                    ),
                ));
            };
            if index >= nb_bitmaps {
                return Err(BitmapError::MoreEntriesThanHeader { nb_bitmaps });
            }
            let name_size = usize::from(u16::from_be_bytes(field(fixed, 18)));
            let extra_size = u32::from_be_bytes(field(fixed, 20));
            // extra_size is at most 2^32 - 1, so the sum cannot overflow a 64-bit usize; it is
            // compared with the directory (at most 64 MiB) before anything is allocated.
            let len = entry_len(name_size, extra_size as usize);
            if len > bytes.len() - at {
                return Err(broken(
                    index,
                    at,
                    format!(
                        "the entry (name_size = {name_size}, extra_data_size = {extra_size}: {len} bytes) runs past the end"
                    ),
                ));
            }
            let extra_start = at + limits::ENTRY_HEADER_SIZE;
            let name_start = extra_start + extra_size as usize;
            let entry = BitmapEntry {
                table_offset: u64::from_be_bytes(field(fixed, 0)),
                table_size: u32::from_be_bytes(field(fixed, 8)),
                flags: Flags(u32::from_be_bytes(field(fixed, 12))),
                kind: fixed[16],
                granularity_bits: fixed[17],
                extra_data: bytes[extra_start..name_start].to_vec(),
                name: bytes[name_start..name_start + name_size].to_vec(),
            };
            if let Some(&first) = names.get(&entry.name) {
                return Err(BitmapError::DuplicateName {
                    name: entry.name_lossy(),
                    first,
                    second: entries.len(),
                });
            }
            names.insert(entry.name.clone(), entries.len());
            entries.push(entry);
            at += len;
        }
        let found = entries.len() as u32;
        if found != nb_bitmaps {
            return Err(BitmapError::FewerEntriesThanHeader { found, nb_bitmaps });
        }
        Ok(Directory { entries })
    }

    /// The directory's bytes: each entry with zero padding (QEMU's `bitmap_list_store` layout;
    /// extra data kept). Refuses what the header extension cannot describe or QEMU would not
    /// read: no entries, more than 65535, more than 64 MiB, or a field that does not fit.
    pub fn encode(&self) -> Result<Vec<u8>, BitmapError> {
        let count = self.entries.len() as u64;
        if count == 0 {
            return Err(BitmapError::Unencodable {
                field: "nb_bitmaps",
                value: 0,
                max: limits::MAX_BITMAPS.into(),
            });
        }
        if count > u64::from(limits::MAX_BITMAPS) {
            return Err(BitmapError::Unencodable {
                field: "nb_bitmaps",
                value: count,
                max: limits::MAX_BITMAPS.into(),
            });
        }
        let size = self.encoded_len();
        if size > limits::MAX_DIRECTORY_SIZE {
            return Err(BitmapError::Unencodable {
                field: "bitmap_directory_size",
                value: size,
                max: limits::MAX_DIRECTORY_SIZE,
            });
        }
        let mut out = Vec::with_capacity(size as usize);
        for entry in &self.entries {
            entry.encode_into(&mut out)?;
        }
        Ok(out)
    }

    /// The encoded directory's length in bytes.
    pub fn encoded_len(&self) -> u64 {
        self.entries.iter().map(|e| e.encoded_len() as u64).sum()
    }

    /// The header extension for this directory stored at `offset`.
    pub fn extension_at(&self, offset: u64) -> BitmapsExtension {
        BitmapsExtension {
            nb_bitmaps: self.entries.len() as u32,
            directory_size: self.encoded_len(),
            directory_offset: offset,
        }
    }

    /// The entry named `name`.
    pub fn find(&self, name: &[u8]) -> Option<&BitmapEntry> {
        self.entries.iter().find(|e| e.name == name)
    }

    /// The first entry QEMU would refuse (it then refuses the whole image), as the error QEMU's
    /// check would give.
    pub fn first_problem(&self, layout: &ImageLayout) -> Option<BitmapError> {
        self.entries.iter().find_map(|entry| {
            entry.check(layout).err().map(|problem| BitmapError::Entry {
                name: entry.name_lossy(),
                problem,
            })
        })
    }
}

/// The 24 bytes of the bitmaps header extension: `nb_bitmaps` u32, reserved u32 (zero),
/// `bitmap_directory_size` u64, `bitmap_directory_offset` u64.
pub fn extension_data(extension: &BitmapsExtension) -> [u8; 24] {
    let mut out = [0u8; 24];
    out[0..4].copy_from_slice(&extension.nb_bitmaps.to_be_bytes());
    out[8..16].copy_from_slice(&extension.directory_size.to_be_bytes());
    out[16..24].copy_from_slice(&extension.directory_offset.to_be_bytes());
    out
}

/// `N` bytes of an entry's fixed part at `at` (callers pass in-bounds constant offsets).
fn field<const N: usize>(fixed: &[u8; limits::ENTRY_HEADER_SIZE], at: usize) -> [u8; N] {
    let mut out = [0u8; N];
    if let Some(src) = fixed.get(at..at + N) {
        out.copy_from_slice(src);
    }
    out
}
