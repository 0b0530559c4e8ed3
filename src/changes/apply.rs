//! `snapfs apply INCREMENT TARGET`: brings a restored disk from FROM to TO with an increment
//! (a copy of `changes/FROM..TO.raw`) and its range list (a copy of `changes/FROM..TO.json`).
//!
//! The list says exactly what changed, so it is what the copy follows: every range marked
//! `"zero": false` is copied from the increment (a hole there reads zeros, which is then what
//! TO holds, so the increment may have been copied with or without `--sparse=always`), every
//! range marked `"zero": true` is made to read zeros on the target (a hole punched in a file,
//! zeroed blocks on a block device), and nothing else is touched. The increment's own data
//! ranges (`SEEK_DATA`) must lie inside the listed ranges: data elsewhere means the two files
//! are not of the same pair, and nothing is written. A regular target is cut or extended to
//! TO's size (the increment's size); a block device must be at least that large.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::{Path, PathBuf};

use super::ChangeRange;

/// Why an increment could not be applied.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{}: no range list (copy the .json file of the increment next to it, or name it with --ranges)",
        .path.display()
    )]
    NoRanges { path: PathBuf },
    #[error("{}: not a list of changed ranges: {reason}", .path.display())]
    BadRanges { path: PathBuf, reason: String },
    #[error(
        "{}: data at {offset:#x} outside every range of {}: the increment and the range list are not of the same pair",
        .increment.display(), .ranges.display()
    )]
    Mismatch {
        increment: PathBuf,
        ranges: PathBuf,
        offset: u64,
    },
    #[error(
        "{}: {size} bytes, smaller than the increment ({needed} bytes)",
        .target.display()
    )]
    TargetTooSmall {
        target: PathBuf,
        size: u64,
        needed: u64,
    },
}

/// What an apply did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Applied {
    /// TO's size.
    pub size: u64,
    pub ranges: usize,
    pub copied: u64,
    pub zeroed: u64,
    /// A block device larger than TO: the bytes past TO's size were left as they were.
    pub device_tail: u64,
}

/// The range list that goes with `increment` by default: `X.raw` -> `X.json`.
pub fn default_ranges_path(increment: &Path) -> PathBuf {
    let name = increment
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let stem = name.strip_suffix(".raw").unwrap_or(&name);
    increment.with_file_name(format!("{stem}.json"))
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> ApplyError {
    let what = what.into();
    move |source| ApplyError::Io { what, source }
}

/// Reads and checks a range list: in order, not overlapping, inside `size` bytes.
pub fn read_ranges(path: &Path, size: u64) -> Result<Vec<ChangeRange>, ApplyError> {
    let text = match std::fs::read(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(ApplyError::NoRanges {
                path: path.to_owned(),
            });
        }
        Err(e) => return Err(io(format!("{}: read", path.display()))(e)),
    };
    let bad = |reason: String| ApplyError::BadRanges {
        path: path.to_owned(),
        reason,
    };
    let ranges: Vec<ChangeRange> = serde_json::from_slice(&text).map_err(|e| bad(e.to_string()))?;
    let mut end = 0u64;
    for r in &ranges {
        let r_end = r.start.checked_add(r.length).filter(|&e| e <= size);
        match r_end {
            _ if r.start < end => {
                return Err(bad(format!(
                    "range at {:#x} overlaps or precedes the one before it",
                    r.start
                )));
            }
            None => {
                return Err(bad(format!(
                    "range at {:#x} of {} bytes runs past the increment's {size} bytes",
                    r.start, r.length
                )));
            }
            Some(e) => end = e,
        }
    }
    Ok(ranges)
}

/// `lseek` for `SEEK_DATA` / `SEEK_HOLE`; `None` at the end (ENXIO).
fn seek(file: &File, offset: u64, whence: libc::c_int) -> std::io::Result<Option<u64>> {
    // SAFETY: lseek on a descriptor we own; nothing else uses its file position.
    let r = unsafe { libc::lseek(file.as_raw_fd(), offset as libc::off_t, whence) };
    if r >= 0 {
        return Ok(Some(r as u64));
    }
    let e = std::io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::ENXIO) {
        Ok(None)
    } else {
        Err(e)
    }
}

/// The first offset where the increment holds data outside `ranges`, if any.
fn data_outside(file: &File, size: u64, ranges: &[ChangeRange]) -> std::io::Result<Option<u64>> {
    let mut pos = 0;
    let mut next = 0; // the first range that may contain `pos`
    while pos < size {
        let Some(data) = seek(file, pos, libc::SEEK_DATA)? else {
            return Ok(None);
        };
        let hole = seek(file, data, libc::SEEK_HOLE)?.unwrap_or(size).min(size);
        // Walk [data, hole) through the ranges.
        let mut at = data;
        while at < hole {
            while next < ranges.len() && ranges[next].end() <= at {
                next += 1;
            }
            match ranges.get(next) {
                Some(r) if r.start <= at => at = r.end(),
                _ => return Ok(Some(at)),
            }
        }
        pos = hole;
    }
    Ok(None)
}

fn fallocate(file: &File, mode: libc::c_int, offset: u64, len: u64) -> std::io::Result<()> {
    // SAFETY: fallocate on a descriptor we own, with a range and mode the kernel checks.
    let r = unsafe {
        libc::fallocate(
            file.as_raw_fd(),
            mode,
            offset as libc::off_t,
            len as libc::off_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Makes `[offset, offset + len)` of the target read zeros: a punched hole (a file stays
/// sparse; a block device discards with zeroing guaranteed), else zeroed blocks, else written
/// zeros.
fn zero(target: &File, offset: u64, len: u64) -> std::io::Result<()> {
    let punch = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
    if fallocate(target, punch, offset, len).is_ok()
        || fallocate(target, libc::FALLOC_FL_ZERO_RANGE, offset, len).is_ok()
    {
        return Ok(());
    }
    let zeros = vec![0u8; CHUNK.min(len) as usize];
    let mut pos = offset;
    while pos < offset + len {
        let n = (offset + len - pos).min(zeros.len() as u64) as usize;
        target.write_all_at(&zeros[..n], pos)?;
        pos += n as u64;
    }
    Ok(())
}

const CHUNK: u64 = 1 << 20;

/// Applies `increment` with the range list at `ranges` onto `target`.
pub fn apply(increment: &Path, ranges: &Path, target: &Path) -> Result<Applied, ApplyError> {
    let inc_name = increment.display().to_string();
    let source = File::open(increment).map_err(io(format!("{inc_name}: open")))?;
    let size = source
        .metadata()
        .map_err(io(format!("{inc_name}: stat")))?
        .len();
    let list = read_ranges(ranges, size)?;
    if let Some(offset) =
        data_outside(&source, size, &list).map_err(io(format!("{inc_name}: lseek")))?
    {
        return Err(ApplyError::Mismatch {
            increment: increment.to_owned(),
            ranges: ranges.to_owned(),
            offset,
        });
    }

    let target_name = target.display().to_string();
    let out = OpenOptions::new()
        .read(true)
        .write(true)
        .open(target)
        .map_err(io(format!("{target_name}: open")))?;
    let meta = out.metadata().map_err(io(format!("{target_name}: stat")))?;
    let mut applied = Applied {
        size,
        ranges: list.len(),
        ..Applied::default()
    };
    if meta.file_type().is_block_device() {
        let device = seek_end(&out).map_err(io(format!("{target_name}: size")))?;
        if device < size {
            return Err(ApplyError::TargetTooSmall {
                target: target.to_owned(),
                size: device,
                needed: size,
            });
        }
        applied.device_tail = device - size;
    } else if meta.len() != size {
        out.set_len(size)
            .map_err(io(format!("{target_name}: resize to {size}")))?;
    }

    let mut buf = vec![0u8; CHUNK as usize];
    for r in &list {
        if r.zero {
            zero(&out, r.start, r.length).map_err(io(format!(
                "{target_name}: zero {} bytes at {:#x}",
                r.length, r.start
            )))?;
            applied.zeroed += r.length;
            continue;
        }
        let mut pos = r.start;
        while pos < r.end() {
            let n = (r.end() - pos).min(CHUNK) as usize;
            source
                .read_exact_at(&mut buf[..n], pos)
                .map_err(io(format!("{inc_name}: read {n} bytes at {pos:#x}")))?;
            out.write_all_at(&buf[..n], pos)
                .map_err(io(format!("{target_name}: write {n} bytes at {pos:#x}")))?;
            pos += n as u64;
        }
        applied.copied += r.length;
    }
    out.sync_all()
        .map_err(io(format!("{target_name}: flush")))?;
    Ok(applied)
}

fn seek_end(file: &File) -> std::io::Result<u64> {
    use std::io::Seek;
    let mut f = file;
    f.seek(std::io::SeekFrom::End(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_range_list_is_checked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a..b.json");
        let check = |text: &str| {
            std::fs::write(&path, text).unwrap();
            read_ranges(&path, 100)
        };
        assert!(check(r#"[{"start":0,"length":10,"zero":false}]"#).is_ok());
        for bad in [
            r#"[{"start":0,"length":10,"zero":false},{"start":5,"length":1,"zero":true}]"#,
            r#"[{"start":90,"length":11,"zero":false}]"#,
            r#"[{"start":18446744073709551615,"length":2,"zero":false}]"#,
            r#"{"start":0}"#,
        ] {
            let err = check(bad).unwrap_err();
            assert!(err.to_string().contains("a..b.json"), "{err}");
        }
        assert!(matches!(
            read_ranges(&dir.path().join("missing.json"), 1),
            Err(ApplyError::NoRanges { .. })
        ));
        assert_eq!(
            default_ranges_path(Path::new("/b/mon..tue.raw")),
            Path::new("/b/mon..tue.json")
        );
    }
}
