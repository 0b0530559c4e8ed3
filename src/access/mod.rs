//! Who may do what through a mount (docs/security.md). The rule: through snapfs a caller gets
//! at most what they have on the files behind it. A caller's rights on each file of the chain
//! are worked out as the kernel works them out (owner, group and supplementary groups, mode
//! bits, POSIX ACLs, root's override) on the descriptors snapfs holds, so that a path changed
//! after the mount changes nothing. snapfs writes only regular files among the backing files
//! (block devices too with `-o write_devices`).
//!
//! Nothing here knows FUSE or the image format: the FUSE adapter (`fs::access`) and the
//! control commands (`control::execute`) ask these questions and answer the kernel.

mod acl;
mod caller;
mod perms;
mod place;

use std::path::Path;

pub use caller::Caller;
pub use perms::{EXEC, FilePerms, PermsError, READ, WRITE};
pub use place::{NewFile, PlaceError, place_new_file};

use crate::chain::Chain;

/// Whether commands may write backing files that are block devices (`-o write_devices`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceWrites {
    /// Backing files that are not regular files are never written (the default).
    #[default]
    Refused,
    /// Block devices among the backing files may be written by commands.
    Allowed,
}

/// One file of the chain, as far as permissions go.
#[derive(Debug, Clone)]
pub struct LayerPerms {
    /// `None` when its permissions could not be read: then nobody but root gets anything.
    perms: Option<FilePerms>,
    /// Whether snapfs may write the file at all: the top always, a backing file only if it is a
    /// regular file (or a block device with `-o write_devices`).
    writable: bool,
}

impl LayerPerms {
    /// The rwx bits `who` has on this file (with root's override); `W` only where snapfs may
    /// write the file at all.
    pub fn rights(&self, who: &Caller) -> u16 {
        let bits = match &self.perms {
            Some(p) => [READ, WRITE, EXEC]
                .into_iter()
                .filter(|&b| p.allows(who, b))
                .sum(),
            None if who.is_root() => READ | WRITE,
            None => 0,
        };
        self.mask(bits)
    }

    /// The rwx bits the mode bits (and ACL) alone give `who`: for showing a mode.
    pub fn bits(&self, who: &Caller) -> u16 {
        self.mask(self.perms.as_ref().map_or(0, |p| p.bits_for(who)))
    }

    fn mask(&self, bits: u16) -> u16 {
        if self.writable { bits } else { bits & !WRITE }
    }

    pub fn owner(&self) -> Option<(u32, u32)> {
        self.perms.as_ref().map(|p| (p.uid, p.gid))
    }

    pub fn perms(&self) -> Option<&FilePerms> {
        self.perms.as_ref()
    }

    /// Whether the file is of a kind snapfs writes.
    pub fn writable_kind(&self) -> bool {
        self.writable
    }
}

/// The permissions of every file of a chain, top first, read now from the descriptors snapfs
/// holds.
pub fn chain_perms(chain: &Chain, devices: DeviceWrites) -> Vec<LayerPerms> {
    chain
        .layers
        .iter()
        .enumerate()
        .map(|(i, layer)| {
            // A storage with no host file (a test's memory) has no permissions to read.
            let perms = layer.storage().host_file().and_then(|file| {
                FilePerms::of(file)
                    .map_err(|e| log::warn!("{}: {e}", layer.path().display()))
                    .ok()
            });
            let regular = perms.as_ref().is_some_and(FilePerms::is_regular);
            let device = perms
                .as_ref()
                .is_some_and(|p| p.mode & libc::S_IFMT == libc::S_IFBLK);
            let writable = i == 0 || regular || (device && devices == DeviceWrites::Allowed);
            LayerPerms { perms, writable }
        })
        .collect()
}

/// Why a caller may not do something to a file of the chain.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Denied {
    #[error("you ({who}) may not {verb} {}", .path.display())]
    NoPermission {
        who: String,
        verb: &'static str,
        path: std::path::PathBuf,
    },
    #[error(
        "{} is not a regular file; snapfs writes only regular files (a block device only with -o write_devices)",
        .path.display()
    )]
    NotWritableKind { path: std::path::PathBuf },
}

impl Denied {
    pub fn errno(&self) -> i32 {
        match self {
            Denied::NoPermission { .. } => libc::EACCES,
            Denied::NotWritableKind { .. } => libc::EROFS,
        }
    }
}

/// Checks that `who` may do all of `want` to `layer` (whose file is `path`).
pub fn require(layer: &LayerPerms, path: &Path, who: &Caller, want: u16) -> Result<(), Denied> {
    if want & WRITE != 0 && !layer.writable {
        return Err(Denied::NotWritableKind {
            path: path.to_owned(),
        });
    }
    if layer.rights(who) & want == want {
        return Ok(());
    }
    let verb = match (want & READ != 0, want & WRITE != 0) {
        (true, true) => "read and write",
        (false, true) => "write",
        _ => "read",
    };
    Err(Denied::NoPermission {
        who: format!("uid {}", who.uid),
        verb,
        path: path.to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layer(uid: u32, mode: u32, writable: bool) -> LayerPerms {
        LayerPerms {
            perms: Some(FilePerms {
                uid,
                gid: uid,
                mode,
                acl: None,
            }),
            writable,
        }
    }

    #[test]
    fn devices_are_never_written_unless_allowed() {
        let dev = layer(0, libc::S_IFBLK | 0o660, false);
        let root = Caller::root();
        assert_eq!(dev.rights(&root), READ);
        let e = require(&dev, Path::new("/dev/sda"), &root, WRITE).unwrap_err();
        assert_eq!(e.errno(), libc::EROFS);
        assert!(require(&dev, Path::new("/dev/sda"), &root, READ).is_ok());
    }

    #[test]
    fn refusals_name_the_file_and_the_caller() {
        let secret = layer(0, libc::S_IFREG | 0o600, true);
        let u = Caller {
            uid: 1000,
            gid: 1000,
            groups: vec![],
        };
        let e = require(&secret, Path::new("/etc/shadow"), &u, READ).unwrap_err();
        assert_eq!(e.errno(), libc::EACCES);
        assert_eq!(e.to_string(), "you (uid 1000) may not read /etc/shadow");
        let unknown = LayerPerms {
            perms: None,
            writable: true,
        };
        assert_eq!(unknown.rights(&u), 0);
        assert_eq!(unknown.rights(&Caller::root()), READ | WRITE);
    }
}

/// Building [`LayerPerms`] by hand, for the unit tests of the modules that use them.
#[cfg(test)]
pub mod tests_support {
    use super::{FilePerms, LayerPerms};

    /// A layer with these permissions, of a kind snapfs writes if it is a regular file.
    pub fn layer(perms: FilePerms) -> LayerPerms {
        let writable = perms.is_regular();
        LayerPerms {
            perms: Some(perms),
            writable,
        }
    }
}
