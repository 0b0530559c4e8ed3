//! The errno a caller of the file system (or of a control file) sees for an engine error. The
//! engine's errors say what went wrong with which file; choosing the errno is the adapter's job,
//! so the mapping lives here, beside the FUSE side, and the engine knows nothing of errno.

use crate::error::Error;
use crate::qcow2::lock::LockError;
use crate::qcow2::refcount::RefcountError;

impl Error {
    /// The errno a file-system caller should see for this error.
    pub fn errno(&self) -> i32 {
        match self {
            Error::Io { source, .. } => os_errno(source),
            Error::Refcount { source, .. } => match source {
                RefcountError::Io { source, .. } => os_errno(source),
                // A refcount at its maximum (a snapshot on 1-bit refcounts): QEMU says EINVAL.
                RefcountError::Overflow { .. } => libc::EINVAL,
                _ => libc::EIO,
            },
            Error::Invalid { .. } => libc::EINVAL,
            // A write past the end of the disk, as a block device answers.
            Error::PastEnd { .. } => libc::ENOSPC,
            Error::ReadOnly { .. } | Error::NeedsReadOnly { .. } => libc::EROFS,
            Error::Locked(e) => lock_errno(e),
            Error::Stopped { source, .. } => source.errno(),
            _ => libc::EIO,
        }
    }
}

/// An image another process uses is busy; a failed lock call says why it failed.
fn lock_errno(e: &LockError) -> i32 {
    match e {
        LockError::InUse { .. } => libc::EBUSY,
        LockError::Io { source, .. } => os_errno(source),
    }
}

fn os_errno(e: &std::io::Error) -> i32 {
    e.raw_os_error().unwrap_or(libc::EIO)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_map_to_what_a_block_device_would_say() {
        let io = |errno| Error::io("x", std::io::Error::from_raw_os_error(errno));
        assert_eq!(io(libc::ENOSPC).errno(), libc::ENOSPC);
        assert_eq!(
            Error::PastEnd {
                offset: 10,
                size: 5
            }
            .errno(),
            libc::ENOSPC
        );
        assert_eq!(Error::ReadOnly { path: "x".into() }.errno(), libc::EROFS);
        assert_eq!(Error::Retired { path: "x".into() }.errno(), libc::EIO);
        let busy = LockError::InUse {
            path: "x".into(),
            mode: crate::qcow2::lock::LockMode::ReadOnly,
            conflicts: vec![crate::qcow2::lock::Conflict::Holds(
                crate::qcow2::lock::Perm::Write,
            )],
        };
        assert_eq!(Error::Locked(busy).errno(), libc::EBUSY);
    }
}
