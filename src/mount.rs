//! Mounting: options, the FUSE session, running in the background, and clean shutdown on
//! SIGTERM/SIGINT or unmount.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use fuser::{Config, MountOption, SessionACL};

use crate::access::DeviceWrites;
use crate::catalog::Catalog;
use crate::chain::Chain;
use crate::cli::{MountArgs, parse_size};
use crate::control::Controller;
use crate::error::Error;
use crate::fs::{DataCaching, Ownership, SnapFs};
use crate::metadata::Metadata;
use crate::qcow2::{Caches, OpenOptions};
use crate::sharing::Sharing;

/// Default metadata cache budget: 32 MiB of L2 tables covers 256 GiB of a 64 KiB-cluster disk.
const DEFAULT_CACHE: u64 = 32 << 20;

/// Everything `mount` was asked for, after merging `-o` options with flags.
#[derive(Debug, Clone)]
pub struct MountSettings {
    pub image: PathBuf,
    pub mountpoint: PathBuf,
    pub foreground: bool,
    pub read_only: bool,
    pub acl: SessionACL,
    pub default_permissions: bool,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub cache: u64,
    pub threads: usize,
    pub libvirt: Option<PathBuf>,
    pub libvirt_write: bool,
    /// The domain definition `-o libvirt-write` records in snapshots (`-o libvirt-domain=FILE`).
    pub libvirt_domain: Option<PathBuf>,
    /// Where a running libvirtd answers (`-o libvirt-uri=URI`).
    pub libvirt_uri: Option<String>,
    /// Commands may write backing files that are block devices (`-o write_devices`).
    pub write_devices: bool,
    /// Reads and writes of live.raw and the snapshot files bypass the kernel page cache.
    pub direct_io: bool,
    /// Read-only beside another process that writes the image (`--force-share`).
    pub force_share: bool,
    /// Every disk of this libvirt domain (`--domain NAME`, `-o domain=NAME`).
    pub domain: Option<String>,
}

impl MountSettings {
    pub fn from_args(args: &MountArgs) -> Result<Self, String> {
        let mut s = MountSettings {
            image: args.image.clone(),
            mountpoint: args.mountpoint.clone().unwrap_or_default(),
            foreground: args.foreground,
            read_only: args.read_only,
            acl: SessionACL::Owner,
            default_permissions: false,
            uid: None,
            gid: None,
            cache: DEFAULT_CACHE,
            threads: std::thread::available_parallelism().map_or(2, |n| n.get().clamp(2, 8)),
            libvirt: args.libvirt.clone(),
            libvirt_write: false,
            libvirt_domain: None,
            libvirt_uri: None,
            write_devices: false,
            direct_io: args.direct_io,
            force_share: args.force_share,
            domain: args.domain.clone(),
        };
        let mut read_write_asked = false;
        for opt in args.options.iter().flat_map(|o| o.split(',')) {
            let (key, value) = match opt.split_once('=') {
                Some((k, v)) => (k, Some(v)),
                None => (opt, None),
            };
            let need = || value.ok_or_else(|| format!("mount option {key} needs a value"));
            let number = || -> Result<u32, String> {
                need()?
                    .parse()
                    .map_err(|_| format!("mount option {opt}: not a number"))
            };
            match key {
                "" | "defaults" | "auto" | "noauto" | "nofail" | "_netdev" | "user" | "users"
                | "nouser" | "exec" | "noexec" | "suid" | "nosuid" | "dev" | "nodev" | "atime"
                | "noatime" | "relatime" => {}
                k if k.starts_with("x-") || k == "comment" => {}
                "ro" => s.read_only = true,
                "rw" => {
                    s.read_only = false;
                    read_write_asked = true;
                }
                "allow_other" => s.acl = SessionACL::All,
                "allow_root" => s.acl = SessionACL::RootAndOwner,
                "default_permissions" => s.default_permissions = true,
                "uid" => s.uid = Some(number()?),
                "gid" => s.gid = Some(number()?),
                "cache" => s.cache = parse_size(need()?)?,
                "threads" => s.threads = number()? as usize,
                "libvirt" => s.libvirt = Some(PathBuf::from(need()?)),
                "libvirt-write" => s.libvirt_write = true,
                "libvirt-domain" => s.libvirt_domain = Some(PathBuf::from(need()?)),
                "libvirt-uri" => s.libvirt_uri = Some(need()?.to_owned()),
                "write_devices" => s.write_devices = true,
                "direct_io" => s.direct_io = true,
                "force_share" => s.force_share = true,
                "domain" => s.domain = Some(need()?.to_owned()),
                _ => return Err(format!("unknown mount option {opt:?}")),
            }
        }
        match (&s.domain, &args.mountpoint) {
            // `snapfs mount --domain NAME MOUNTPOINT`; mount(8) passes a source word too.
            (Some(_), None) => s.mountpoint = std::mem::take(&mut s.image),
            (Some(_), Some(_)) => s.image = PathBuf::new(),
            (None, None) => {
                return Err("MOUNTPOINT is needed (snapfs mount IMAGE MOUNTPOINT)".into());
            }
            (None, Some(_)) => {}
        }
        if let Some(c) = &args.cache {
            s.cache = parse_size(c)?;
        }
        if let Some(t) = args.threads {
            s.threads = t;
        }
        if s.threads == 0 || s.threads > 64 {
            return Err(format!("threads={} is out of range (1 to 64)", s.threads));
        }
        s.cache = s.cache.max(1 << 20);
        if s.force_share {
            if read_write_asked {
                return Err("force_share mounts read-only; it cannot be combined with rw".into());
            }
            s.read_only = true;
        }
        Ok(s)
    }
}

/// The one line a failed open prints. Beside a writer (a running VM), says what `--force-share`
/// would give and what it would not.
fn refusal(e: &Error, force_share: bool) -> String {
    use crate::qcow2::lock::{Conflict, Perm};
    let writer = matches!(
        e,
        Error::Locked(l) if matches!(
            l.conflict(),
            Some(Conflict::Holds(Perm::Write | Perm::Resize))
        )
    );
    if !writer || force_share {
        return e.to_string();
    }
    format!(
        "{e}; or mount with --force-share (-o force_share) to read beside it: the backing \
         layers and internal snapshots (best-effort while it writes), never live.raw, which \
         changes under a reader"
    )
}

/// Opens the chain (every disk's, with `--domain`), then mounts; returns when the file system is
/// unmounted.
pub fn mount(settings: MountSettings) -> Result<(), String> {
    if settings.domain.is_some() {
        return crate::domain_mount::mount(settings);
    }
    if !settings.mountpoint.is_dir() {
        return Err(format!(
            "mount point {} is not a directory",
            settings.mountpoint.display()
        ));
    }
    let disk = open_disk(&settings, 0)?;
    let config = fuse_config(&settings, &disk.top.display().to_string(), !disk.writable);
    run_session(disk.fs, &settings, &config, &[disk.notifier])
}

/// Forks into the background unless `-f`, then serves `fs` until unmounted.
pub(crate) fn run_session(
    fs: impl fuser::Filesystem,
    settings: &MountSettings,
    config: &Config,
    notifiers: &[Arc<OnceLock<fuser::Notifier>>],
) -> Result<(), String> {
    let ready = if settings.foreground {
        None
    } else {
        Some(daemonize()?)
    };
    let result = serve(fs, &settings.mountpoint, config, ready, notifiers);
    if let Err(e) = &result {
        log::error!("{e}");
    }
    result
}

/// One image chain opened and its tree built, ready to serve.
pub(crate) struct OpenedDisk {
    pub fs: SnapFs,
    pub controller: Arc<Controller>,
    pub notifier: Arc<OnceLock<fuser::Notifier>>,
    /// The top image.
    pub top: PathBuf,
    /// Whether live.raw (and the commands) may write.
    pub writable: bool,
}

/// Opens the chain of `settings.image` and builds its tree, with inode numbers from `ino_base`
/// up (see [`crate::fs::domain`]).
pub(crate) fn open_disk(settings: &MountSettings, ino_base: u64) -> Result<OpenedDisk, String> {
    let caches = Caches::new(settings.cache);
    let writable = !settings.read_only;
    let options = OpenOptions {
        writable,
        lock: true,
        share: settings.force_share,
    };
    let devices = if settings.write_devices {
        DeviceWrites::Allowed
    } else {
        DeviceWrites::Refused
    };
    let write_devices = devices == DeviceWrites::Allowed;
    let caches_for_reopen = caches.clone();
    let options_for_reopen = OpenOptions {
        writable: false,
        ..options
    };
    let chain = match Chain::open_with(&settings.image, caches.clone(), options, write_devices) {
        Err(Error::NeedsReadOnly { path, reason }) => {
            eprintln!("snapfs: {}: {reason}", path.display());
            let read_only = OpenOptions {
                writable: false,
                ..options
            };
            Chain::open_with(&settings.image, caches, read_only, write_devices)
        }
        other => other,
    }
    .map_err(|e| refusal(&e, settings.force_share))?;
    let chain = Arc::new(chain);
    let meta = match &settings.libvirt {
        Some(dir) => Metadata::load(dir, &chain),
        None => Metadata::default(),
    };
    let problems = meta.problems.clone();
    let catalog = Arc::new(Catalog::with_metadata(chain.clone(), meta).map_err(|e| e.to_string())?);
    let meta = chain
        .top()
        .host_metadata()
        .map_err(|e| format!("{}: {e}", settings.image.display()))?;
    let owner = Ownership {
        uid: settings.uid,
        gid: settings.gid,
        image_mtime: meta.modified().unwrap_or(std::time::UNIX_EPOCH),
        writable: catalog.live().view.is_writable(),
    };
    let libvirt_write = settings
        .libvirt
        .clone()
        .filter(|_| settings.libvirt_write)
        .map(|dir| {
            let mut lv = crate::control::LibvirtWrite::new(
                dir,
                settings.libvirt_domain.clone(),
                settings.libvirt_uri.clone(),
            );
            if let Some(domain) = &settings.domain {
                lv.domain = domain.clone();
            }
            lv
        });
    let controller = Arc::new(Controller::new(
        catalog.clone(),
        owner.writable,
        libvirt_write,
        devices,
    ));
    for problem in problems {
        log::warn!("libvirt metadata: {problem}");
        controller.note(format!(
            "{} libvirt: {problem}",
            crate::info::rfc3339(std::time::SystemTime::now())
        ));
    }
    let notifier = Arc::new(OnceLock::new());
    let caching = if settings.direct_io {
        DataCaching::Bypass
    } else {
        DataCaching::PageCache
    };
    let sharing = if settings.force_share {
        Sharing::beside_writers(
            chain.top().path().to_owned(),
            caches_for_reopen,
            options_for_reopen,
            write_devices,
        )
    } else {
        Sharing::exclusive()
    };
    let fs = SnapFs::new(
        catalog,
        controller.clone(),
        owner,
        devices,
        notifier.clone(),
        caching,
        settings.threads,
        Arc::new(sharing),
    )
    .with_ino_base(ino_base);
    Ok(OpenedDisk {
        fs,
        controller,
        notifier,
        top: chain.top().path().to_owned(),
        writable: owner.writable,
    })
}

pub(crate) fn fuse_config(settings: &MountSettings, source: &str, read_only: bool) -> Config {
    let mut options = vec![
        MountOption::FSName(source.to_owned()),
        MountOption::Subtype("snapfs".into()),
        MountOption::NoDev,
        MountOption::NoSuid,
    ];
    options.push(if read_only {
        MountOption::RO
    } else {
        MountOption::RW
    });
    if settings.default_permissions {
        options.push(MountOption::DefaultPermissions);
    }
    let mut config = Config::default();
    config.mount_options = options;
    config.acl = settings.acl;
    config.n_threads = Some(settings.threads);
    config.clone_fd = true;
    config
}

/// Mounts and serves. `ready` is the pipe to the waiting parent of a background mount: it learns
/// that the mount is up (or why it failed) through it.
fn serve(
    fs: impl fuser::Filesystem,
    mountpoint: &Path,
    config: &Config,
    ready: Option<File>,
    notifiers: &[Arc<OnceLock<fuser::Notifier>>],
) -> Result<(), String> {
    let signals = block_shutdown_signals();
    let session = match mount_fuse_snapfs(mountpoint, config) {
        Ok(fd) => fuser::Session::from_fd(fs, fd, config.acl, config.clone()),
        // Not root: fusermount3 mounts for us (as type "fuse").
        Err(e) if e.raw_os_error() == Some(libc::EPERM) => {
            fuser::Session::new(fs, mountpoint, config)
        }
        Err(e) => Err(e),
    };
    let mut session = match session {
        Ok(s) => s,
        Err(e) => {
            let msg = format!("cannot mount on {}: {e}", mountpoint.display());
            if let Some(mut pipe) = ready {
                let _ = pipe.write_all(msg.as_bytes());
            }
            return Err(msg);
        }
    };
    for notifier in notifiers {
        let _ = notifier.set(session.notifier());
    }
    raise_readahead(mountpoint);
    let mut unmounter = session.unmount_callable();
    let unmount_path = mountpoint.to_owned();
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            if wait_for_signal(&signals) {
                log::info!("signal received: unmounting");
                // A mount made here is unmounted here; one made by fusermount3 through it.
                if unmount_directly(&unmount_path).is_err()
                    && let Err(e) = unmounter.unmount()
                {
                    log::error!("unmount: {e}");
                }
            }
        })
        .map_err(|e| format!("cannot start the signal thread: {e}"))?;
    let pid_file = PidFile::create(mountpoint);
    if let Some(mut pipe) = ready {
        let _ = pipe.write_all(b"ok");
        redirect_stdio_to_null();
    }
    let result = session
        .run()
        .map_err(|e| format!("FUSE session ended with an error: {e}"));
    // The session's end flushed the live disk (destroy); the locks go with the process.
    drop(pid_file);
    result
}

/// Readahead of the mount, in KiB. The kernel offers FUSE only 128 KiB at INIT; a larger window
/// lets sequential readers (cp, backups, dd) keep several 1 MiB requests in flight.
const READAHEAD_KB: u32 = 4096;

/// Raises the mount's readahead through its backing device info (root only; best effort).
/// The device number comes from /proc/self/mountinfo: looking at the mount point itself would be
/// a request to this very process, which a kill at the wrong moment leaves unanswerable.
fn raise_readahead(mountpoint: &Path) {
    let Some(device) = mount_device(mountpoint) else {
        return;
    };
    let knob = format!("/sys/class/bdi/{device}/read_ahead_kb");
    if let Err(e) = std::fs::write(&knob, READAHEAD_KB.to_string()) {
        log::debug!("cannot raise readahead through {knob}: {e}");
    }
}

/// `MAJOR:MINOR` of the mount at `mountpoint`, from /proc/self/mountinfo (the last mount there).
fn mount_device(mountpoint: &Path) -> Option<String> {
    let absolute = std::path::absolute(mountpoint).ok()?;
    let wanted = match (absolute.parent(), absolute.file_name()) {
        (Some(parent), Some(name)) => std::fs::canonicalize(parent).ok()?.join(name),
        _ => absolute,
    };
    let table = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    table.lines().rev().find_map(|line| {
        let fields: Vec<&str> = line.split(' ').collect();
        let (device, point) = (fields.get(2)?, fields.get(4)?);
        (Path::new(&unescape_mountinfo(point)) == wanted).then(|| (*device).to_owned())
    })
}

/// Undoes mountinfo's octal escapes (`\040` for a space).
fn unescape_mountinfo(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 3 < bytes.len()
            && let Ok(v) = u8::from_str_radix(&field[i + 1..i + 4], 8)
        {
            out.push(v);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `RUNTIME/snapfs/MOUNTPOINT.pid` names the process serving a mount, so that `snapfs umount`
/// can wait for it to finish and tell a dead one from a live one.
struct PidFile(Option<PathBuf>);

impl PidFile {
    fn path_for(mountpoint: &Path) -> Option<PathBuf> {
        // Lexical only: looking at a mount point whose server died fails (ENOTCONN).
        let canonical = std::path::absolute(mountpoint).ok()?;
        let dir = std::env::var_os("XDG_RUNTIME_DIR")
            .filter(|_| !nix_is_root())
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("/run"))
            .join("snapfs");
        let mut name = String::new();
        for b in canonical.as_os_str().as_encoded_bytes() {
            match b {
                b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'.' | b'-' | b'_' => {
                    name.push(*b as char)
                }
                _ => name.push_str(&format!("%{b:02X}")),
            }
        }
        Some(dir.join(format!("{name}.pid")))
    }

    fn create(mountpoint: &Path) -> PidFile {
        let Some(path) = Self::path_for(mountpoint) else {
            return PidFile(None);
        };
        match Self::write(&path) {
            Ok(()) => PidFile(Some(path)),
            Err(e) => {
                log::warn!("cannot write {}: {e}", path.display());
                PidFile(None)
            }
        }
    }

    /// Writes this process's pid to `path`. The folder is made private to us and must be ours
    /// and no symlink; the file is never reached through a symlink (a planted one fails
    /// ELOOP), so the write lands nowhere else.
    fn write(path: &Path) -> std::io::Result<()> {
        use std::io::Write;
        use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
        let Some(dir) = path.parent() else {
            return Err(std::io::Error::from_raw_os_error(libc::EINVAL));
        };
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?;
        let meta = std::fs::symlink_metadata(dir)?;
        // SAFETY: geteuid has no preconditions.
        if !meta.is_dir() || meta.uid() != unsafe { libc::geteuid() } {
            return Err(std::io::Error::other(format!(
                "{} is not a folder of ours",
                dir.display()
            )));
        }
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o644)
            .custom_flags(libc::O_NOFOLLOW)
            .open(path)?;
        file.write_all(format!("{}\n", std::process::id()).as_bytes())
    }

    fn read(mountpoint: &Path) -> Option<(PathBuf, i32)> {
        let path = Self::path_for(mountpoint)?;
        let pid = std::fs::read_to_string(&path).ok()?.trim().parse().ok()?;
        Some((path, pid))
    }
}

impl Drop for PidFile {
    fn drop(&mut self) {
        if let Some(path) = &self.0 {
            let _ = std::fs::remove_file(path);
        }
    }
}

fn nix_is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Whether `pid` is a running process (a zombie, killed but not yet reaped, is not).
fn process_alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the command name, which is in parentheses and may contain spaces.
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}

/// Mounts /dev/fuse on `mountpoint` as file system type `fuse.snapfs` (what `mount` and
/// /proc/mounts show), as fusermount would but with our type; needs root (EPERM otherwise).
fn mount_fuse_snapfs(mountpoint: &Path, config: &Config) -> std::io::Result<OwnedFd> {
    use std::ffi::CString;
    use std::os::fd::AsRawFd;
    use std::os::unix::ffi::OsStrExt;
    let device = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/fuse")?;
    let mut source = "snapfs".to_owned();
    let mut flags = libc::MS_NOSUID | libc::MS_NODEV;
    // SAFETY: geteuid and getegid have no preconditions.
    let (uid, gid) = unsafe { (libc::geteuid(), libc::getegid()) };
    let mut options = format!(
        "fd={},rootmode=40000,user_id={uid},group_id={gid}",
        device.as_raw_fd()
    );
    for option in &config.mount_options {
        match option {
            MountOption::FSName(name) => source = name.clone(),
            MountOption::RO => flags |= libc::MS_RDONLY,
            MountOption::DefaultPermissions => options.push_str(",default_permissions"),
            _ => {}
        }
    }
    if config.acl != SessionACL::Owner {
        // The kernel lets others in; fuser's own check narrows "allow_root" to root.
        options.push_str(",allow_other");
    }
    let invalid = |_| std::io::Error::from_raw_os_error(libc::EINVAL);
    let c_source = CString::new(source.replace(',', "_")).map_err(invalid)?;
    let c_target = CString::new(mountpoint.as_os_str().as_bytes()).map_err(invalid)?;
    let c_type = CString::new("fuse.snapfs").map_err(invalid)?;
    let c_options = CString::new(options).map_err(invalid)?;
    // SAFETY: mount(2) with valid C strings; the options name a descriptor we hold open.
    let r = unsafe {
        libc::mount(
            c_source.as_ptr(),
            c_target.as_ptr(),
            c_type.as_ptr(),
            flags,
            c_options.as_ptr().cast(),
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(OwnedFd::from(device))
}

/// Unmounts a mount this process made with [`mount_fuse_snapfs`].
fn unmount_directly(mountpoint: &Path) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(mountpoint.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: umount2 with a valid C string.
    if unsafe { libc::umount2(path.as_ptr(), 0) } == 0 {
        return Ok(());
    }
    let err = std::io::Error::last_os_error();
    if err.raw_os_error() == Some(libc::EBUSY) {
        // Files are still open (a VM, a loop device): detach now, finish when they close.
        // SAFETY: as above.
        if unsafe { libc::umount2(path.as_ptr(), libc::MNT_DETACH) } == 0 {
            return Ok(());
        }
    }
    Err(err)
}

/// Forks. The parent waits until the child reports that the mount is ready and exits with its
/// outcome; the child returns the pipe to report on.
fn daemonize() -> Result<File, String> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills two descriptors that we then own.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(format!("pipe: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: the descriptors are fresh and owned by nothing else.
    let (read_end, write_end) = unsafe {
        (
            File::from(OwnedFd::from_raw_fd(fds[0])),
            File::from(OwnedFd::from_raw_fd(fds[1])),
        )
    };
    // SAFETY: no other thread exists yet (the FUSE threads start after this), so the child
    // inherits a consistent process.
    match unsafe { libc::fork() } {
        -1 => Err(format!("fork: {}", std::io::Error::last_os_error())),
        0 => {
            drop(read_end);
            // SAFETY: setsid has no memory-safety preconditions.
            unsafe { libc::setsid() };
            Ok(write_end)
        }
        _child => {
            drop(write_end);
            let mut answer = String::new();
            let mut read_end = read_end;
            let _ = read_end.read_to_string(&mut answer);
            if answer == "ok" {
                std::process::exit(0);
            }
            if answer.is_empty() {
                answer = "the mount process exited before the mount was ready".into();
            }
            eprintln!("snapfs: {answer}");
            std::process::exit(1);
        }
    }
}

fn redirect_stdio_to_null() {
    if let Ok(null) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")
    {
        use std::os::fd::AsRawFd;
        for fd in 0..3 {
            // SAFETY: dup2 onto the standard descriptors; /dev/null stays open until then.
            unsafe { libc::dup2(null.as_raw_fd(), fd) };
        }
    }
}

/// Blocks SIGTERM, SIGINT and SIGHUP in this thread and every thread started after it, so that
/// only the signal thread receives them.
fn block_shutdown_signals() -> libc::sigset_t {
    // SAFETY: sigset manipulation on a local set, then pthread_sigmask on the calling thread.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGHUP);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    }
}

fn wait_for_signal(set: &libc::sigset_t) -> bool {
    let mut sig = 0;
    // SAFETY: sigwait on a valid, initialised set.
    unsafe { libc::sigwait(set, &mut sig) == 0 }
}

/// `snapfs umount`: unmounts MOUNTPOINT and waits until the process serving it has flushed and
/// exited. A mount whose process died is detached and reported.
pub fn umount(mountpoint: &Path) -> Result<(), String> {
    use std::os::unix::ffi::OsStrExt;
    let server = PidFile::read(mountpoint);
    let path = std::ffi::CString::new(mountpoint.as_os_str().as_bytes())
        .map_err(|_| format!("invalid mount point {}", mountpoint.display()))?;
    if let Some((pid_path, pid)) = &server
        && !process_alive(*pid)
    {
        // SAFETY: umount2 with a valid C string.
        unsafe { libc::umount2(path.as_ptr(), libc::MNT_DETACH) };
        let _ = std::fs::remove_file(pid_path);
        eprintln!(
            "snapfs: the process serving {} (pid {pid}) had died; its stale mount was removed",
            mountpoint.display()
        );
        return Ok(());
    }
    // SAFETY: umount2 with a valid C string.
    if unsafe { libc::umount2(path.as_ptr(), 0) } == 0 {
        if let Some((_, pid)) = server {
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
            while process_alive(pid) && std::time::Instant::now() < deadline {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
        }
        return Ok(());
    }
    let err = std::io::Error::last_os_error();
    if err.raw_os_error() == Some(libc::ENOTCONN) {
        // The serving process is gone (the kernel says the transport is not connected).
        // SAFETY: umount2 with a valid C string.
        unsafe { libc::umount2(path.as_ptr(), libc::MNT_DETACH) };
        eprintln!(
            "snapfs: the process serving {} had died; its stale mount was removed",
            mountpoint.display()
        );
        return Ok(());
    }
    if err.raw_os_error() == Some(libc::EPERM) {
        // Not root: the setuid helper may unmount a FUSE mount its user owns.
        let status = std::process::Command::new("fusermount3")
            .arg("-u")
            .arg(mountpoint)
            .status();
        if let Ok(s) = status
            && s.success()
        {
            return Ok(());
        }
    }
    let hint = match err.raw_os_error() {
        Some(libc::EBUSY) => " (a file in it is still open; close it and retry)",
        Some(libc::EINVAL) => " (it is not a mount point)",
        _ => "",
    };
    Err(format!(
        "cannot unmount {}: {err}{hint}",
        mountpoint.display()
    ))
}

#[cfg(test)]
mod tests {
    use super::PidFile;

    #[test]
    fn pid_file_is_written_in_a_private_folder_and_never_through_a_symlink() {
        let dir = tempfile::tempdir().unwrap();
        let folder = dir.path().join("snapfs");
        let path = folder.join("mnt.pid");
        PidFile::write(&path).unwrap();
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            format!("{}\n", std::process::id())
        );
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&folder).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700, "{mode:o}");
        // A symlink planted where the pid file goes: the write fails, the target is untouched.
        let victim = dir.path().join("victim");
        std::fs::write(&victim, b"precious").unwrap();
        std::fs::remove_file(&path).unwrap();
        std::os::unix::fs::symlink(&victim, &path).unwrap();
        let err = PidFile::write(&path).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ELOOP), "{err}");
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
        // A folder that is a symlink is refused too.
        let elsewhere = dir.path().join("elsewhere");
        std::fs::create_dir(&elsewhere).unwrap();
        let linked = dir.path().join("linked");
        std::os::unix::fs::symlink(&elsewhere, &linked).unwrap();
        assert!(PidFile::write(&linked.join("mnt.pid")).is_err());
        assert!(!elsewhere.join("mnt.pid").exists());
    }
}
