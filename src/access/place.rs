//! Where `create NAME --external FILE` may put a new file: only where the caller could create
//! it. The folder is reached without following any symlink, the caller needs search permission
//! on every folder on the way and write and search permission on the last (checked for the
//! caller, on the folders' descriptors, not for snapfs's own root), and the name must be free.
//! The file is then created inside the folder's descriptor (`qcow2::create::create_in`), never
//! over an existing file.

use std::ffi::OsString;
use std::path::{Component, Path, PathBuf};

use super::{Caller, EXEC, FilePerms, WRITE};
use crate::folder::{Folder, FolderError};

/// A place for a new file: the open folder and the name in it.
#[derive(Debug)]
pub struct NewFile {
    pub folder: Folder,
    pub name: OsString,
}

impl NewFile {
    /// The new file's path (the folder as it was reached, without symlinks).
    pub fn path(&self) -> PathBuf {
        self.folder.path().join(&self.name)
    }
}

/// Why a new file may not go where asked.
#[derive(Debug, thiserror::Error)]
pub enum PlaceError {
    #[error("{} does not end in a file name", .0.display())]
    NotAName(PathBuf),
    #[error("{0}")]
    Folder(#[from] FolderError),
    #[error("you may not create files in {}", .0.display())]
    NoWrite(PathBuf),
    #[error("{} already exists", .0.display())]
    Exists(PathBuf),
    #[error("{}: {source}", .at.display())]
    Io {
        at: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl PlaceError {
    pub fn errno(&self) -> i32 {
        match self {
            PlaceError::NotAName(_) => libc::EINVAL,
            PlaceError::Folder(e) => e.errno(),
            PlaceError::NoWrite(_) => libc::EACCES,
            PlaceError::Exists(_) => libc::EEXIST,
            PlaceError::Io { source, .. } => source.raw_os_error().unwrap_or(libc::EIO),
        }
    }
}

fn may(folder: &std::fs::File, who: &Caller, want: u16) -> Result<bool, String> {
    FilePerms::of(folder)
        .map(|p| p.allows(who, want))
        .map_err(|e| e.to_string())
}

/// Checks that `who` may create `path` (absolute) and opens its folder.
pub fn place_new_file(path: &Path, who: &Caller) -> Result<NewFile, PlaceError> {
    let name = match path.components().next_back() {
        Some(Component::Normal(n)) => n.to_owned(),
        _ => return Err(PlaceError::NotAName(path.to_owned())),
    };
    let parent = path.parent().unwrap_or(Path::new("/"));
    let folder = Folder::open_checked(parent, &mut |_, dir| match may(dir, who, EXEC) {
        Ok(true) => Ok(()),
        Ok(false) => Err(format!(
            "you may not search this folder (reaching {})",
            path.display()
        )),
        Err(e) => Err(e),
    })?;
    let at = folder.path().to_owned();
    match may(folder.as_file(), who, WRITE | EXEC) {
        Ok(true) => {}
        Ok(false) => return Err(PlaceError::NoWrite(at)),
        Err(reason) => return Err(FolderError::Refused { at, reason }.into()),
    }
    let new = NewFile { folder, name };
    match new.folder.lstat(&new.name) {
        Ok(None) => Ok(new),
        Ok(Some(_)) => Err(PlaceError::Exists(new.path())),
        Err(source) => Err(PlaceError::Io {
            at: new.path(),
            source,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_free_name_in_a_real_folder() {
        let dir = tempfile::tempdir().unwrap();
        let top = std::fs::canonicalize(dir.path()).unwrap();
        let place = place_new_file(&top.join("new.qcow2"), &Caller::root()).unwrap();
        assert_eq!(place.path(), top.join("new.qcow2"));
        std::fs::write(top.join("taken"), b"").unwrap();
        assert!(matches!(
            place_new_file(&top.join("taken"), &Caller::root()),
            Err(PlaceError::Exists(_))
        ));
        std::os::unix::fs::symlink("/nonexistent", top.join("dangling")).unwrap();
        assert!(matches!(
            place_new_file(&top.join("dangling"), &Caller::root()),
            Err(PlaceError::Exists(_))
        ));
        assert!(matches!(
            place_new_file(&top.join(".."), &Caller::root()),
            Err(PlaceError::NotAName(_))
        ));
        std::os::unix::fs::symlink("/etc", top.join("etc-link")).unwrap();
        let e = place_new_file(&top.join("etc-link/nologin"), &Caller::root()).unwrap_err();
        assert!(
            matches!(e, PlaceError::Folder(FolderError::Symlink { .. })),
            "{e}"
        );
    }

    #[test]
    fn the_callers_permissions_decide_not_roots() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let top = std::fs::canonicalize(dir.path()).unwrap();
        let shut = top.join("shut");
        std::fs::create_dir(&shut).unwrap();
        std::fs::set_permissions(&shut, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::set_permissions(&top, std::fs::Permissions::from_mode(0o755)).unwrap();
        // SAFETY: getuid has no preconditions.
        let me = unsafe { libc::getuid() };
        let stranger = Caller {
            uid: me.wrapping_add(4242),
            gid: u32::MAX - 1,
            groups: Vec::new(),
        };
        let e = place_new_file(&shut.join("x"), &stranger).unwrap_err();
        assert!(matches!(e, PlaceError::NoWrite(_)), "{e}");
        assert_eq!(e.errno(), libc::EACCES);
        std::fs::set_permissions(&shut, std::fs::Permissions::from_mode(0o700)).unwrap();
        let e = place_new_file(&shut.join("inner/x"), &stranger).unwrap_err();
        assert!(
            matches!(e, PlaceError::Folder(FolderError::Refused { .. })),
            "{e}"
        );
        std::fs::set_permissions(&shut, std::fs::Permissions::from_mode(0o777)).unwrap();
        assert!(place_new_file(&shut.join("x"), &stranger).is_ok());
    }
}
