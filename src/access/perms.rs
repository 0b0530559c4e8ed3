//! A file's owner, group, mode and access ACL, read from an open descriptor, and the kernel's
//! decision whether a caller may read, write or execute (search) it.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

use super::Caller;
use super::acl::Acl;

/// Read permission (`MAY_READ`).
pub const READ: u16 = 0o4;
/// Write permission (`MAY_WRITE`).
pub const WRITE: u16 = 0o2;
/// Execute or, for a folder, search permission (`MAY_EXEC`).
pub const EXEC: u16 = 0o1;

/// What the kernel decides a file's permissions by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FilePerms {
    pub uid: u32,
    pub gid: u32,
    /// `st_mode`: type and permission bits.
    pub mode: u32,
    /// The access ACL, where the file has one beyond its mode bits.
    pub acl: Option<Acl>,
}

/// Why a file's permissions could not be read.
#[derive(Debug, thiserror::Error)]
pub enum PermsError {
    #[error("fstat: {0}")]
    Stat(#[source] io::Error),
    #[error("reading its ACL: {0}")]
    AclRead(#[source] io::Error),
    #[error("its ACL: {0}")]
    Acl(#[from] super::acl::AclError),
}

const ACL_XATTR: &std::ffi::CStr = c"system.posix_acl_access";

impl FilePerms {
    /// Reads the permissions of the open file (not of any path: the descriptor is what snapfs
    /// reads and writes, whatever the path names now).
    pub fn of(file: &File) -> Result<FilePerms, PermsError> {
        let st = crate::folder::fstat(file).map_err(PermsError::Stat)?;
        Ok(FilePerms {
            uid: st.st_uid,
            gid: st.st_gid,
            mode: st.st_mode,
            acl: read_acl(file)?,
        })
    }

    pub fn is_regular(&self) -> bool {
        self.mode & libc::S_IFMT == libc::S_IFREG
    }

    pub fn is_dir(&self) -> bool {
        self.mode & libc::S_IFMT == libc::S_IFDIR
    }

    /// Whether `who` may do all of `want` ([`READ`], [`WRITE`], [`EXEC`] bits) to the file, as
    /// the kernel's `generic_permission` decides for a task with these ids: the mode bits (and
    /// ACL) first; then root may read and write anything and search any folder, and execute
    /// a file if it has any execute bit (`CAP_DAC_OVERRIDE`). Only uid 0 counts as privileged:
    /// capabilities of other callers are not looked at, which can only refuse more.
    pub fn allows(&self, who: &Caller, want: u16) -> bool {
        if self.bits_allow(who, want) {
            return true;
        }
        who.is_root() && (self.is_dir() || want & EXEC == 0 || self.mode & 0o111 != 0)
    }

    /// The mode-bit (and ACL) part of [`FilePerms::allows`], without root's override: what the
    /// bits give `who`.
    pub fn bits_allow(&self, who: &Caller, want: u16) -> bool {
        let want = want & 0o7;
        let mode = self.mode as u16;
        // acl_permission_check: the owner's bits for the owner, whatever the ACL says...
        if who.uid == self.uid {
            return (mode >> 6) & want == want;
        }
        // ...then the ACL, if the file has one and its group class (the mask) grants anything...
        if let Some(acl) = &self.acl
            && mode & 0o070 != 0
        {
            return acl.allows(want, false, who.uid, &|g| who.in_group(g), self.gid);
        }
        // ...then the group's bits for a member, the others' for everyone else.
        let bits = if who.in_group(self.gid) {
            mode >> 3
        } else {
            mode
        };
        bits & want == want
    }

    /// The rwx bits a caller has, as [`FilePerms::bits_allow`] grants them one by one.
    pub fn bits_for(&self, who: &Caller) -> u16 {
        [READ, WRITE, EXEC]
            .into_iter()
            .filter(|&b| self.bits_allow(who, b))
            .sum()
    }
}

/// The file's access ACL, `None` if it has none (or the file system keeps no ACLs).
fn read_acl(file: &File) -> Result<Option<Acl>, PermsError> {
    let mut buf = vec![0u8; 256];
    loop {
        // SAFETY: fgetxattr writes at most buf.len() bytes into buf.
        let n = unsafe {
            libc::fgetxattr(
                file.as_raw_fd(),
                ACL_XATTR.as_ptr(),
                buf.as_mut_ptr().cast(),
                buf.len(),
            )
        };
        if n >= 0 {
            buf.truncate(n as usize);
            return Ok(Some(Acl::parse(&buf)?));
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::ENODATA | libc::EOPNOTSUPP) => return Ok(None),
            Some(libc::ERANGE) if buf.len() < 1 << 20 => {
                let len = buf.len() * 4;
                buf.resize(len, 0);
            }
            _ => return Err(PermsError::AclRead(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(uid: u32, gid: u32, mode: u32) -> FilePerms {
        FilePerms {
            uid,
            gid,
            mode: libc::S_IFREG | mode,
            acl: None,
        }
    }

    fn caller(uid: u32, gid: u32, groups: &[u32]) -> Caller {
        Caller {
            uid,
            gid,
            groups: groups.to_vec(),
        }
    }

    #[test]
    fn owner_group_others_as_the_kernel_decides() {
        let f = file(1000, 100, 0o640);
        assert!(f.allows(&caller(1000, 5, &[]), READ | WRITE));
        assert!(f.allows(&caller(2000, 100, &[]), READ));
        assert!(!f.allows(&caller(2000, 100, &[]), WRITE));
        assert!(
            f.allows(&caller(2000, 5, &[100]), READ),
            "supplementary group"
        );
        assert!(!f.allows(&caller(2000, 5, &[6]), READ), "others: nothing");
        // The owner's bits decide for the owner even where others have more.
        let odd = file(1000, 100, 0o044);
        assert!(!odd.allows(&caller(1000, 100, &[]), READ));
        assert!(odd.allows(&caller(2000, 7, &[]), READ));
        // A member of the group gets the group's bits, not the others'.
        let excluded = file(0, 100, 0o604);
        assert!(!excluded.allows(&caller(2000, 100, &[]), READ));
        assert!(excluded.allows(&caller(2000, 5, &[]), READ));
    }

    #[test]
    fn root_reads_and_writes_anything_but_executes_only_with_an_x_bit() {
        let root = Caller::root();
        let f = file(1000, 100, 0o000);
        assert!(f.allows(&root, READ | WRITE));
        assert!(!f.allows(&root, EXEC));
        assert!(file(1000, 100, 0o001).allows(&root, EXEC));
        assert!(
            !f.bits_allow(&root, READ),
            "the bits alone give root nothing here"
        );
        let dir = FilePerms {
            mode: libc::S_IFDIR,
            ..f
        };
        assert!(dir.allows(&root, EXEC));
    }

    #[test]
    fn the_acl_decides_for_named_users_and_groups() {
        use super::super::acl::{Acl, Entry, GROUP, GROUP_OBJ, MASK, OTHER, USER, USER_OBJ};
        let e = |tag, perm, id| Entry { tag, perm, id };
        let f = FilePerms {
            acl: Some(Acl {
                entries: vec![
                    e(USER_OBJ, 6, 0),
                    e(USER, 4, 3000),
                    e(GROUP_OBJ, 0, 0),
                    e(GROUP, 6, 77),
                    e(MASK, 6, 0),
                    e(OTHER, 0, 0),
                ],
            }),
            ..file(1000, 100, 0o660)
        };
        assert!(f.allows(&caller(3000, 5, &[]), READ));
        assert!(!f.allows(&caller(3000, 5, &[]), WRITE));
        assert!(f.allows(&caller(4000, 5, &[77]), READ | WRITE));
        assert!(
            !f.allows(&caller(4000, 100, &[]), READ),
            "owning group: ---"
        );
        assert!(!f.allows(&caller(4000, 5, &[]), READ));
        assert_eq!(f.bits_for(&caller(3000, 5, &[])), READ);
        // A mask of nothing (group bits 0) turns the ACL off: the others' bits decide.
        let masked = FilePerms {
            mode: libc::S_IFREG | 0o604,
            ..f.clone()
        };
        assert!(masked.allows(&caller(3000, 5, &[]), READ));
    }
}
