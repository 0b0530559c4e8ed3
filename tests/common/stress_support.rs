//! Helpers for the stress, permission and degradation tests (`tests/stress_*.rs`,
//! `tests/perm_*.rs`, `tests/degrade_*.rs`): running a probe as another user (errno exactly),
//! a small loop-mounted ext4 file system for ENOSPC, and small byte utilities.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use super::run_timeout;
use super::write_support::{KernelMount, LoopDev};

// ---------------------------------------------------------------------------------------------
// Acting as another user
// ---------------------------------------------------------------------------------------------

/// Who a probe runs as: `setpriv --reuid=UID --regid=GID` with exactly `groups` as
/// supplementary groups (none: `--clear-groups`).
#[derive(Debug, Clone)]
pub struct User {
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<u32>,
}

impl User {
    pub const fn nobody() -> User {
        User {
            uid: 65534,
            gid: 65534,
            groups: Vec::new(),
        }
    }

    pub fn new(uid: u32, gid: u32, groups: &[u32]) -> User {
        User {
            uid,
            gid,
            groups: groups.to_vec(),
        }
    }
}

/// A file operation a probe performs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// stat(2)
    Stat,
    /// open O_RDONLY and read one block
    Read,
    /// open O_WRONLY
    OpenWrite,
    /// open O_RDWR
    OpenRdWr,
    /// open O_WRONLY and write the given text in one write(2)
    Write,
    /// opendir + readdir
    List,
    /// truncate(2) by path to the size given as text
    Truncate,
    /// chmod(2) to the octal mode given as text
    Chmod,
    /// chown(2) to the `UID:GID` given as text
    Chown,
    /// utime(2) to a fixed time (what `touch -d` does)
    Utime,
    /// access(2) with the mode given as text: `r`, `w` or `x`
    Access,
}

const PROBE: &str = r#"
use strict; use Fcntl;
my ($op, $p, $text) = @ARGV;
my $r = 0;
if ($op eq "stat") { $r = (stat($p)) ? 0 : $!+0; }
elsif ($op eq "read") {
  if (sysopen(my $f, $p, O_RDONLY)) { my $b; my $n = sysread($f, $b, 4096); $r = defined($n) ? 0 : $!+0; }
  else { $r = $!+0; }
}
elsif ($op eq "openw") { $r = sysopen(my $f, $p, O_WRONLY) ? 0 : $!+0; }
elsif ($op eq "openrw") { $r = sysopen(my $f, $p, O_RDWR) ? 0 : $!+0; }
elsif ($op eq "write") {
  if (sysopen(my $f, $p, O_WRONLY)) { my $n = syswrite($f, $text); $r = defined($n) ? 0 : $!+0; }
  else { $r = $!+0; }
}
elsif ($op eq "list") {
  if (opendir(my $d, $p)) { $! = 0; my @e = readdir($d); $r = (@e || $! == 0) ? 0 : $!+0; }
  else { $r = $!+0; }
}
elsif ($op eq "truncate") { $r = truncate($p, $text) ? 0 : $!+0; }
elsif ($op eq "chmod") { $r = chmod(oct($text), $p) ? 0 : $!+0; }
elsif ($op eq "chown") { my ($u, $g) = split(/:/, $text); $r = chown($u, $g, $p) ? 0 : $!+0; }
elsif ($op eq "utime") { $r = utime(1000000000, 1000000000, $p) ? 0 : $!+0; }
elsif ($op eq "access") {
  use filetest 'access';
  my $ok = $text eq "r" ? -r $p : $text eq "w" ? -w $p : -x $p;
  $r = $ok ? 0 : ($!+0 || 13);
}
else { $r = -1; }
print "$r\n";
"#;

/// Runs `op` on `path` as `user` (via setpriv + perl); returns 0 on success, else the errno.
pub fn probe_as(user: &User, op: Op, path: &Path, text: &str) -> i32 {
    let op_name = match op {
        Op::Stat => "stat",
        Op::Read => "read",
        Op::OpenWrite => "openw",
        Op::OpenRdWr => "openrw",
        Op::Write => "write",
        Op::List => "list",
        Op::Truncate => "truncate",
        Op::Chmod => "chmod",
        Op::Chown => "chown",
        Op::Utime => "utime",
        Op::Access => "access",
    };
    let mut c = Command::new("setpriv");
    c.arg(format!("--reuid={}", user.uid))
        .arg(format!("--regid={}", user.gid));
    if user.groups.is_empty() {
        c.arg("--clear-groups");
    } else {
        let g: Vec<String> = user.groups.iter().map(|g| g.to_string()).collect();
        c.arg(format!("--groups={}", g.join(",")));
    }
    c.args(["perl", "-e", PROBE, op_name])
        .arg(path)
        .arg(text)
        .env("LC_ALL", "C");
    let out = run_timeout(&mut c, Duration::from_secs(30));
    assert!(
        out.status.is_some_and(|s| s.success()),
        "probe {op_name} {} as {user:?} did not run: {:?}\nstdout: {}\nstderr: {}",
        path.display(),
        out.status,
        out.stdout,
        out.stderr
    );
    out.stdout
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("probe printed {:?} ({})", out.stdout, out.stderr))
}

/// chmod
pub fn chmod(path: &Path, mode: u32) {
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .unwrap_or_else(|e| panic!("chmod {mode:o} {}: {e}", path.display()));
}

/// chown (numeric)
pub fn chown(path: &Path, uid: u32, gid: u32) {
    std::os::unix::fs::chown(path, Some(uid), Some(gid))
        .unwrap_or_else(|e| panic!("chown {uid}:{gid} {}: {e}", path.display()));
}

/// Makes every directory from `path` up to `/` searchable by everyone (temp dirs are 0700), so
/// that another user can reach a mount point. The mount point itself is left alone: its mode
/// is the mount's own (chmod there is EPERM, as on any file whose mode is not the caller's to set).
pub fn open_path_to(path: &Path) {
    let mut p = path.parent();
    while let Some(d) = p {
        if d == Path::new("/") || d.as_os_str().is_empty() {
            break;
        }
        if let Ok(md) = fs::metadata(d) {
            let mode = md.permissions().mode() & 0o7777;
            if mode & 0o011 != 0o011 {
                chmod(d, mode | 0o011);
            }
        }
        p = d.parent();
    }
}

// ---------------------------------------------------------------------------------------------
// A small file system (ENOSPC)
// ---------------------------------------------------------------------------------------------

/// An ext4 file system of `size` bytes in a file, on a loop device, mounted on a temp dir.
/// Dropping it unmounts, detaches the loop device and removes the backing file, in that order.
pub struct SmallFs {
    // Field order is drop order.
    mount: KernelMount,
    dev: LoopDev,
    _backing: tempfile::TempDir,
}

impl SmallFs {
    pub fn new(size: u64) -> SmallFs {
        let backing = tempfile::Builder::new()
            .prefix("snapfs-smallfs-")
            .tempdir()
            .unwrap();
        let file = backing.path().join("fs.img");
        let f = fs::File::create(&file).unwrap();
        f.set_len(size).unwrap();
        drop(f);
        let out = run_timeout(
            Command::new("mkfs.ext4")
                .args(["-q", "-F", "-m", "0", "-E", "nodiscard"])
                .arg(&file),
            Duration::from_secs(60),
        );
        assert!(
            out.status.is_some_and(|s| s.success()),
            "mkfs.ext4 {}: {}",
            file.display(),
            out.stderr
        );
        let dev = LoopDev::attach(&file);
        let mount = KernelMount::mount(dev.path(), &[]);
        SmallFs {
            mount,
            dev,
            _backing: backing,
        }
    }

    pub fn path(&self) -> &Path {
        self.mount.path()
    }

    /// Free bytes for root (statvfs f_bfree * f_frsize).
    pub fn free_bytes(&self) -> u64 {
        statvfs_free(self.path())
    }

    pub fn device(&self) -> PathBuf {
        self.dev.path().to_path_buf()
    }
}

/// statvfs: bytes free for root.
pub fn statvfs_free(path: &Path) -> u64 {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    let c = CString::new(path.as_os_str().as_bytes()).unwrap();
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    let r = unsafe { libc::statvfs(c.as_ptr(), &mut s) };
    assert_eq!(
        r,
        0,
        "statvfs {}: {}",
        path.display(),
        std::io::Error::last_os_error()
    );
    s.f_bfree as u64 * s.f_frsize as u64
}

// ---------------------------------------------------------------------------------------------
// Small utilities
// ---------------------------------------------------------------------------------------------

/// The errno of an io::Error (-1 when it has none).
pub fn err_no(e: &std::io::Error) -> i32 {
    e.raw_os_error().unwrap_or(-1)
}

/// FNV-1a 64 of a buffer (a cheap content fingerprint for messages).
pub fn fnv64(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ *b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

/// The time budget of a stress test: `SNAPFS_STRESS_SECS` if set, else `default`.
pub fn stress_secs(default: u64) -> u64 {
    std::env::var("SNAPFS_STRESS_SECS")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(default)
}

/// posix_fadvise(DONTNEED) over the whole file: drops its clean cached pages, so that the next
/// reads go to the file system's server.
pub fn drop_file_cache(f: &fs::File) {
    use std::os::unix::io::AsRawFd;
    unsafe {
        libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED);
    }
}

/// posix_fadvise(RANDOM): no readahead on this descriptor.
pub fn no_readahead(f: &fs::File) {
    use std::os::unix::io::AsRawFd;
    unsafe {
        libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_RANDOM);
    }
}
