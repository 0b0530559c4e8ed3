//! Folders that other users may write (the libvirt folder, an image's folder, a folder named
//! in `create NAME --external FILE`), handled so that nothing they put there redirects snapfs:
//!
//! - a folder is reached from `/` one component at a time, each opened with
//!   `O_DIRECTORY | O_NOFOLLOW`: a symlink anywhere on the way is refused, never followed, and
//!   a component swapped for a symlink after a check cannot redirect what follows, because
//!   everything after the walk goes through the descriptor the walk ended with;
//! - a file in it is opened with `O_NOFOLLOW | O_NONBLOCK` (a symlink is refused, a FIFO does not
//!   block) and used only when `fstat` on the open descriptor says it is a regular file;
//! - a file is replaced by writing a new one under a random name with
//!   `O_CREAT | O_EXCL | O_NOFOLLOW` (nothing that exists, a symlink included, is ever opened
//!   for writing), setting its mode and owner on the open descriptor (`fchmod`, `fchown`), and
//!   renaming it over the old name, which replaces a name and never writes through it.

use std::ffi::{CString, OsStr, OsString};
use std::fs::File;
use std::io::{self, Write};
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Component, Path, PathBuf};

/// An open folder and the path it was reached by (without symlinks, so it is the real path
/// unless a folder on the way was renamed since).
#[derive(Debug)]
pub struct Folder {
    dir: File,
    path: PathBuf,
}

/// Why a folder could not be reached.
#[derive(Debug, thiserror::Error)]
pub enum FolderError {
    /// A component of the path is a symlink, which is not followed.
    #[error("{} is a symlink; snapfs follows no symlink here (give the real path: realpath {})", .at.display(), .at.display())]
    Symlink { at: PathBuf },
    /// A component could not be opened as a folder (missing, not a folder, no permission).
    #[error("{}: {source}", .at.display())]
    Io {
        at: PathBuf,
        #[source]
        source: io::Error,
    },
    /// `visit` refused a folder on the way (see [`Folder::open_checked`]).
    #[error("{}: {reason}", .at.display())]
    Refused { at: PathBuf, reason: String },
}

impl FolderError {
    /// The errno a caller should see: the I/O error's, EACCES when refused, ELOOP for a symlink.
    pub fn errno(&self) -> i32 {
        match self {
            FolderError::Symlink { .. } => libc::ELOOP,
            FolderError::Io { source, .. } => source.raw_os_error().unwrap_or(libc::EIO),
            FolderError::Refused { .. } => libc::EACCES,
        }
    }
}

/// Why a file in a folder could not be opened for reading.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("a symlink, not followed")]
    Symlink,
    #[error("not a regular file but {0}")]
    NotRegular(&'static str),
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// What kind of file `mode` (an `st_mode`) is, in words.
pub fn kind_name(mode: u32) -> &'static str {
    match mode & libc::S_IFMT {
        libc::S_IFREG => "a regular file",
        libc::S_IFDIR => "a folder",
        libc::S_IFLNK => "a symlink",
        libc::S_IFIFO => "a FIFO",
        libc::S_IFSOCK => "a socket",
        libc::S_IFBLK => "a block device",
        libc::S_IFCHR => "a character device",
        _ => "a file of unknown type",
    }
}

fn last_error() -> io::Error {
    io::Error::last_os_error()
}

/// One name inside a folder: not empty, `.` or `..`, no `/` or NUL.
fn component(name: &OsStr) -> io::Result<CString> {
    let bytes = name.as_bytes();
    if bytes.is_empty() || bytes == b"." || bytes == b".." || bytes.contains(&b'/') {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{:?} is not a single file name", name),
        ));
    }
    CString::new(bytes).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))
}

/// `fstat` of an open descriptor.
pub fn fstat(file: &File) -> io::Result<libc::stat> {
    // SAFETY: fstat fills the zeroed struct; the descriptor is open for the call.
    unsafe {
        let mut st: libc::stat = std::mem::zeroed();
        if libc::fstat(file.as_raw_fd(), &mut st) != 0 {
            return Err(last_error());
        }
        Ok(st)
    }
}

/// `openat(dir, name, flags | O_CLOEXEC, mode)`.
fn openat(dir: &File, name: &CString, flags: i32, mode: libc::mode_t) -> io::Result<File> {
    // SAFETY: a valid descriptor and a NUL-terminated name; the result is a fresh descriptor
    // that we own.
    let fd = unsafe {
        libc::openat(
            dir.as_raw_fd(),
            name.as_ptr(),
            flags | libc::O_CLOEXEC,
            mode as libc::c_uint,
        )
    };
    if fd < 0 {
        return Err(last_error());
    }
    // SAFETY: fd is a new descriptor nothing else owns.
    Ok(unsafe { File::from_raw_fd(fd) })
}

/// `fstatat(dir, name, AT_SYMLINK_NOFOLLOW)`: what `name` is, without following it.
fn lstat_at(dir: &File, name: &CString) -> io::Result<libc::stat> {
    // SAFETY: as for fstat, with a NUL-terminated name.
    unsafe {
        let mut st: libc::stat = std::mem::zeroed();
        if libc::fstatat(
            dir.as_raw_fd(),
            name.as_ptr(),
            &mut st,
            libc::AT_SYMLINK_NOFOLLOW,
        ) != 0
        {
            return Err(last_error());
        }
        Ok(st)
    }
}

/// Opens folder `name` in `dir` without following a symlink.
fn open_subfolder(dir: &File, name: &CString, at: &Path) -> Result<File, FolderError> {
    match openat(
        dir,
        name,
        libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW,
        0,
    ) {
        Ok(f) => Ok(f),
        Err(e) if matches!(e.raw_os_error(), Some(libc::ELOOP | libc::ENOTDIR)) => {
            let is_link =
                lstat_at(dir, name).is_ok_and(|st| st.st_mode & libc::S_IFMT == libc::S_IFLNK);
            if is_link {
                Err(FolderError::Symlink { at: at.to_owned() })
            } else {
                Err(FolderError::Io {
                    at: at.to_owned(),
                    source: e,
                })
            }
        }
        Err(source) => Err(FolderError::Io {
            at: at.to_owned(),
            source,
        }),
    }
}

/// A random hexadecimal word for temporary names (a name others cannot guess ahead).
fn random_word() -> String {
    let mut bytes = [0u8; 12];
    // SAFETY: getrandom writes at most the buffer's length into it.
    let n = unsafe { libc::getrandom(bytes.as_mut_ptr().cast(), bytes.len(), 0) };
    if n != bytes.len() as isize {
        // No getrandom (very old kernels): the clock and a counter still differ per call; the
        // exclusive create below is what keeps it safe, the randomness only avoids collisions.
        static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        let c = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        bytes[..8].copy_from_slice(&now.to_le_bytes());
        bytes[8..].copy_from_slice(&(c as u32 ^ std::process::id()).to_le_bytes());
    }
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl Folder {
    /// Opens the folder at `path` (made absolute against the current folder, lexically) with
    /// no symlink followed on the way.
    pub fn open(path: &Path) -> Result<Folder, FolderError> {
        Self::open_checked(path, &mut |_, _| Ok(()))
    }

    /// As [`Folder::open`], calling `visit(path, dir)` for every folder a name is looked up in
    /// on the way (every folder but the last), before the lookup; an error from it stops the
    /// walk (as [`FolderError::Refused`]). `..` goes to the parent of the folder reached so far.
    pub fn open_checked(
        path: &Path,
        visit: &mut dyn FnMut(&Path, &File) -> Result<(), String>,
    ) -> Result<Folder, FolderError> {
        let absolute = std::path::absolute(path).map_err(|source| FolderError::Io {
            at: path.to_owned(),
            source,
        })?;
        let root = PathBuf::from("/");
        let mut dir = File::open(&root).map_err(|source| FolderError::Io {
            at: root.clone(),
            source,
        })?;
        let mut at = root;
        for part in absolute.components() {
            let name = match part {
                Component::RootDir | Component::CurDir | Component::Prefix(_) => continue,
                Component::ParentDir => OsStr::new(".."),
                Component::Normal(n) => n,
            };
            visit(&at, &dir).map_err(|reason| FolderError::Refused {
                at: at.clone(),
                reason,
            })?;
            let next_at = if name == ".." {
                at.parent().map_or_else(|| at.clone(), Path::to_owned)
            } else {
                at.join(name)
            };
            let c_name = CString::new(name.as_bytes()).map_err(|_| FolderError::Io {
                at: next_at.clone(),
                source: io::Error::from(io::ErrorKind::InvalidInput),
            })?;
            dir = open_subfolder(&dir, &c_name, &next_at)?;
            at = next_at;
        }
        Ok(Folder { dir, path: at })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The folder's own descriptor.
    pub fn as_file(&self) -> &File {
        &self.dir
    }

    /// The names in the folder (without `.` and `..`), in no particular order.
    pub fn names(&self) -> io::Result<Vec<OsString>> {
        let mut names = Vec::new();
        // SAFETY: fdopendir takes over a duplicate of our descriptor (closed by closedir);
        // readdir's entries are read before the next call; closedir ends the stream.
        unsafe {
            let fd = libc::fcntl(self.dir.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 0);
            if fd < 0 {
                return Err(last_error());
            }
            let stream = libc::fdopendir(fd);
            if stream.is_null() {
                let e = last_error();
                libc::close(fd);
                return Err(e);
            }
            // The duplicate shares the offset with our descriptor: start from the beginning.
            libc::rewinddir(stream);
            loop {
                *libc::__errno_location() = 0;
                let entry = libc::readdir(stream);
                if entry.is_null() {
                    let errno = *libc::__errno_location();
                    libc::closedir(stream);
                    if errno != 0 {
                        return Err(io::Error::from_raw_os_error(errno));
                    }
                    break;
                }
                let name = std::ffi::CStr::from_ptr((*entry).d_name.as_ptr()).to_bytes();
                if name != b"." && name != b".." {
                    names.push(OsString::from_vec(name.to_vec()));
                }
            }
        }
        Ok(names)
    }

    /// Opens `name` for reading if it is a regular file: never through a symlink, never
    /// blocking on a FIFO. Returns the file and its `fstat`.
    pub fn open_regular(&self, name: &OsStr) -> Result<(File, libc::stat), OpenError> {
        let c_name = component(name)?;
        let file = match openat(
            &self.dir,
            &c_name,
            libc::O_RDONLY | libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY,
            0,
        ) {
            Ok(f) => f,
            Err(e) if e.raw_os_error() == Some(libc::ELOOP) => return Err(OpenError::Symlink),
            Err(e) => return Err(e.into()),
        };
        let st = fstat(&file)?;
        if st.st_mode & libc::S_IFMT != libc::S_IFREG {
            return Err(OpenError::NotRegular(kind_name(st.st_mode)));
        }
        Ok((file, st))
    }

    /// What `name` is, without following it; `None` if there is nothing by that name.
    pub fn lstat(&self, name: &OsStr) -> io::Result<Option<libc::stat>> {
        match lstat_at(&self.dir, &component(name)?) {
            Ok(st) => Ok(Some(st)),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Creates a new file under a random name that starts with `prefix` and ends with `suffix`,
    /// exclusively (never opening anything that exists). Returns it, read-write, and its name.
    pub fn create_temporary(
        &self,
        prefix: &str,
        suffix: &str,
        mode: u32,
    ) -> io::Result<(File, OsString)> {
        for _ in 0..16 {
            let name = OsString::from(format!("{prefix}{}{suffix}", random_word()));
            match openat(
                &self.dir,
                &component(&name)?,
                libc::O_RDWR | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW,
                mode as libc::mode_t,
            ) {
                Ok(file) => return Ok((file, name)),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(e),
            }
        }
        Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            "no free temporary name after 16 tries",
        ))
    }

    /// Replaces (or creates) `name` with `bytes`, atomically: a new file under a random
    /// temporary name, given exactly `mode` and (if given and allowed) `owner` on its open
    /// descriptor, written, synced, renamed over `name`, and the folder synced. What was at
    /// `name` (a symlink included) is replaced, never written through.
    pub fn replace(
        &self,
        name: &OsStr,
        bytes: &[u8],
        mode: u32,
        owner: Option<(u32, u32)>,
    ) -> io::Result<()> {
        let target = component(name)?;
        let (mut file, tmp_name) = self.create_temporary(".snapfs-", ".tmp", 0o600)?;
        let tmp = component(&tmp_name)?;
        let result = (|| {
            if let Some((uid, gid)) = owner {
                // SAFETY: fchown on our open descriptor.
                if unsafe { libc::fchown(file.as_raw_fd(), uid, gid) } != 0 {
                    let e = last_error();
                    // Only root may give a file away; anyone else keeps their own.
                    if e.raw_os_error() != Some(libc::EPERM) {
                        return Err(e);
                    }
                }
            }
            // After the chown, which may clear set-id bits; the umask is not applied.
            fchmod(&file, mode)?;
            file.write_all(bytes)?;
            file.sync_all()?;
            // SAFETY: renameat with our folder descriptor and two NUL-terminated names.
            let rc = unsafe {
                libc::renameat(
                    self.dir.as_raw_fd(),
                    tmp.as_ptr(),
                    self.dir.as_raw_fd(),
                    target.as_ptr(),
                )
            };
            if rc != 0 {
                return Err(last_error());
            }
            self.sync()
        })();
        if result.is_err() {
            // SAFETY: unlinkat of the temporary name in our folder.
            unsafe { libc::unlinkat(self.dir.as_raw_fd(), tmp.as_ptr(), 0) };
        }
        result
    }

    /// Removes `name` (a symlink is removed, not followed).
    pub fn remove(&self, name: &OsStr) -> io::Result<()> {
        let c_name = component(name)?;
        // SAFETY: unlinkat with our folder descriptor and a NUL-terminated name.
        if unsafe { libc::unlinkat(self.dir.as_raw_fd(), c_name.as_ptr(), 0) } != 0 {
            return Err(last_error());
        }
        Ok(())
    }

    /// Makes renames and removals in the folder durable.
    pub fn sync(&self) -> io::Result<()> {
        self.dir.sync_all()
    }
}

/// Sets exactly `mode` (permission bits) on an open file.
pub fn fchmod(file: &File, mode: u32) -> io::Result<()> {
    // SAFETY: fchmod on an open descriptor.
    if unsafe { libc::fchmod(file.as_raw_fd(), (mode & 0o7777) as libc::mode_t) } != 0 {
        return Err(last_error());
    }
    Ok(())
}

/// Writes `bytes` to `path`, replacing what is there without following a symlink at the last
/// component: for files snapfs writes on the command line's behalf (manual pages, its PID
/// file) in folders the user chose. The folder itself is reached as the path says.
pub fn replace_file(path: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
    let (dir, name) = match (path.parent(), path.file_name()) {
        (Some(d), Some(n)) => (
            if d.as_os_str().is_empty() {
                Path::new(".")
            } else {
                d
            },
            n,
        ),
        _ => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{} is not a file path", path.display()),
            ));
        }
    };
    let folder = Folder {
        dir: File::open(dir)?,
        path: dir.to_owned(),
    };
    folder.replace(name, bytes, mode, None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    #[test]
    fn symlinks_on_the_way_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let real = dir.path().join("real");
        std::fs::create_dir(&real).unwrap();
        std::os::unix::fs::symlink(&real, dir.path().join("link")).unwrap();
        let top = std::fs::canonicalize(dir.path()).unwrap();
        let folder = Folder::open(&top.join("real")).unwrap();
        assert_eq!(folder.path(), top.join("real"));
        let e = Folder::open(&top.join("link")).unwrap_err();
        assert!(
            matches!(e, FolderError::Symlink { ref at } if *at == top.join("link")),
            "{e}"
        );
        assert_eq!(e.errno(), libc::ELOOP);
        let e = Folder::open(&top.join("link/x")).unwrap_err();
        assert!(matches!(e, FolderError::Symlink { .. }), "{e}");
        // `..` is the parent of the folder reached, not of a link's target.
        let back = Folder::open(&top.join("real/..")).unwrap();
        assert_eq!(back.path(), top);
    }

    #[test]
    fn visit_sees_every_folder_looked_up_in_and_can_refuse() {
        let dir = tempfile::tempdir().unwrap();
        let top = std::fs::canonicalize(dir.path()).unwrap();
        std::fs::create_dir_all(top.join("a/b")).unwrap();
        let mut seen = Vec::new();
        Folder::open_checked(&top.join("a/b"), &mut |p, _| {
            seen.push(p.to_owned());
            Ok(())
        })
        .unwrap();
        assert_eq!(seen.last().unwrap(), &top.join("a"));
        assert_eq!(seen.first().unwrap(), Path::new("/"));
        let e = Folder::open_checked(&top.join("a/b"), &mut |p, _| {
            if p.ends_with("a") {
                Err("no".into())
            } else {
                Ok(())
            }
        })
        .unwrap_err();
        assert!(matches!(e, FolderError::Refused { .. }), "{e}");
    }

    #[test]
    fn only_regular_files_open_and_never_through_a_link() {
        let dir = tempfile::tempdir().unwrap();
        let folder = Folder::open(dir.path()).unwrap();
        std::fs::write(dir.path().join("plain"), b"x").unwrap();
        std::os::unix::fs::symlink(dir.path().join("plain"), dir.path().join("link")).unwrap();
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        let fifo = CString::new(dir.path().join("fifo").as_os_str().as_bytes()).unwrap();
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o644) }, 0);
        assert!(folder.open_regular(OsStr::new("plain")).is_ok());
        assert!(matches!(
            folder.open_regular(OsStr::new("link")),
            Err(OpenError::Symlink)
        ));
        assert!(matches!(
            folder.open_regular(OsStr::new("fifo")),
            Err(OpenError::NotRegular("a FIFO"))
        ));
        assert!(matches!(
            folder.open_regular(OsStr::new("sub")),
            Err(OpenError::NotRegular("a folder"))
        ));
        assert!(folder.open_regular(OsStr::new("../x")).is_err());
        let mut names = folder.names().unwrap();
        names.sort();
        assert_eq!(names, ["fifo", "link", "plain", "sub"]);
    }

    #[test]
    fn replace_never_writes_through_a_symlink() {
        let dir = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let victim = outside.path().join("victim");
        std::fs::write(&victim, b"precious").unwrap();
        std::fs::set_permissions(&victim, std::fs::Permissions::from_mode(0o600)).unwrap();
        std::os::unix::fs::symlink(&victim, dir.path().join("a.xml")).unwrap();
        let folder = Folder::open(dir.path()).unwrap();
        folder
            .replace(OsStr::new("a.xml"), b"new", 0o640, None)
            .unwrap();
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
        assert_eq!(
            std::fs::metadata(&victim).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let md = std::fs::symlink_metadata(dir.path().join("a.xml")).unwrap();
        assert!(md.is_file());
        assert_eq!(md.mode() & 0o777, 0o640);
        assert_eq!(std::fs::read(dir.path().join("a.xml")).unwrap(), b"new");
        // Nothing but the file is left behind.
        assert_eq!(folder.names().unwrap(), ["a.xml"]);
    }

    #[test]
    fn temporary_names_are_fresh_and_exclusive() {
        let dir = tempfile::tempdir().unwrap();
        let folder = Folder::open(dir.path()).unwrap();
        let (_, a) = folder.create_temporary(".t-", ".tmp", 0o600).unwrap();
        let (_, b) = folder.create_temporary(".t-", ".tmp", 0o600).unwrap();
        assert_ne!(a, b);
        assert!(a.to_string_lossy().starts_with(".t-") && a.to_string_lossy().ends_with(".tmp"));
    }
}
