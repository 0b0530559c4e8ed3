//! Why a bitmap directory, table or bitmap was refused, naming the field and the value.

use super::constraints::EntryProblem;
use super::table::TableEntryProblem;

/// Why bitmap metadata was refused or a bitmap operation failed.
#[derive(Debug, thiserror::Error)]
pub enum BitmapError {
    #[error(
        "bitmap directory: bitmap_directory_size = 0 (\"Requested bitmap directory size is zero\")"
    )]
    EmptyDirectory,

    #[error(
        "bitmap directory: bitmap_directory_size = {size} exceeds the maximum of {max} bytes (\"Requested bitmap directory size is too big\")"
    )]
    DirectoryTooLarge { size: u64, max: u64 },

    #[error(
        "bitmap directory at {offset:#x} ({size} bytes) runs past the end of the file ({file_len} bytes)"
    )]
    DirectoryOutsideFile {
        offset: u64,
        size: u64,
        file_len: u64,
    },

    #[error("broken bitmap directory: entry {index} at byte {at} of {size}: {reason}")]
    BrokenDirectory {
        index: u32,
        at: usize,
        size: usize,
        reason: String,
    },

    #[error(
        "bitmap directory: more bitmaps found than the header extension's nb_bitmaps = {nb_bitmaps}"
    )]
    MoreEntriesThanHeader { nb_bitmaps: u32 },

    #[error(
        "bitmap directory: {found} bitmaps found, fewer than the header extension's nb_bitmaps = {nb_bitmaps}"
    )]
    FewerEntriesThanHeader { found: u32, nb_bitmaps: u32 },

    #[error(
        "bitmap directory: entries {first} and {second} are both named {name:?} (names must be unique)"
    )]
    DuplicateName {
        name: String,
        first: usize,
        second: usize,
    },

    #[error("bitmap {name:?} doesn't satisfy the constraints: {problem}")]
    Entry { name: String, problem: EntryProblem },

    #[error("bitmap {name:?}: bitmap table entry {index} = {raw:#018x}: {problem}")]
    TableEntry {
        name: String,
        index: u64,
        raw: u64,
        problem: TableEntryProblem,
    },

    #[error("bitmap {name:?} cannot be loaded: {reason}")]
    NotLoadable { name: String, reason: String },

    #[error("bitmap {name:?}: cannot read {what} at {offset:#x} ({len} bytes): {source}")]
    Read {
        name: String,
        what: &'static str,
        offset: u64,
        len: u64,
        #[source]
        source: std::io::Error,
    },

    #[error(
        "bitmaps are of different sizes (destination size is {dest}, source size is {src}) and can't be merged"
    )]
    SizeMismatch { dest: u64, src: u64 },

    #[error("a bitmap of granularity 2^{granularity_bits} for {disk_size} bytes: {reason}")]
    Unstorable {
        disk_size: u64,
        granularity_bits: u32,
        reason: String,
    },

    #[error("bitmap directory cannot be encoded: {field} = {value} (at most {max})")]
    Unencodable {
        field: &'static str,
        value: u64,
        max: u64,
    },
}
