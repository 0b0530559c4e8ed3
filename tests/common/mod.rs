//! Shared helpers for the integration tests: running qemu-img / qemu-io (the oracles), mounting
//! snapfs under a guard that always unmounts, comparing files and data/hole maps.
//!
//! The tests need root, /dev/fuse, qemu-img and qemu-io. They never skip silently: a missing
//! requirement fails the test with a message saying what is missing.

#![allow(dead_code)]

pub mod images;
pub mod libvirtd;
pub mod qemu_vm;

use std::collections::BTreeSet;
use std::ffi::CString;
use std::fs::{self, File};
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Once, mpsc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

pub const KIB: u64 = 1024;
pub const MIB: u64 = 1024 * KIB;
pub const GIB: u64 = 1024 * MIB;

/// Path of the binary under test: `SNAPFS_TEST_BIN` if set (e.g. a release build), else the
/// crate's own `snapfs`.
pub fn snapfs_bin() -> PathBuf {
    match std::env::var_os("SNAPFS_TEST_BIN") {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => PathBuf::from(env!("CARGO_BIN_EXE_snapfs")),
    }
}

// ---------------------------------------------------------------------------------------------
// Environment
// ---------------------------------------------------------------------------------------------

static ENV_CHECK: Once = Once::new();

/// Fails (never skips) when the machine lacks what the tests need.
pub fn require_env() {
    ENV_CHECK.call_once(|| {
        let mut missing = Vec::new();
        if unsafe { libc::geteuid() } != 0 {
            missing.push("root (euid 0)".to_string());
        }
        if !Path::new("/dev/fuse").exists() {
            missing.push("/dev/fuse".to_string());
        }
        for tool in ["qemu-img", "qemu-io", "umount"] {
            let ok = Command::new(tool)
                .arg("--version")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            if !ok {
                missing.push(tool.to_string());
            }
        }
        assert!(
            missing.is_empty(),
            "the snapfs integration tests need: {} (missing on this machine)",
            missing.join(", ")
        );
    });
}

/// A fresh temporary directory for one test's images. Removed when dropped.
pub fn workdir() -> tempfile::TempDir {
    require_env();
    tempfile::Builder::new()
        .prefix("snapfs-test-")
        .tempdir()
        .expect("create temp dir")
}

static UNIQUE: AtomicU64 = AtomicU64::new(0);

/// A process-unique suffix for file names.
pub fn unique() -> String {
    format!(
        "{}-{}",
        std::process::id(),
        UNIQUE.fetch_add(1, Ordering::Relaxed)
    )
}

// ---------------------------------------------------------------------------------------------
// Running commands
// ---------------------------------------------------------------------------------------------

fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// Runs `cmd` to completion; panics (with its stderr) if it cannot start or exits non-zero.
pub fn run(cmd: &mut Command) -> Output {
    let out = run_status(cmd);
    if !out.status.success() {
        panic!(
            "command failed ({}): {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            out.status,
            describe(cmd),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    out
}

/// Runs `cmd` to completion and returns its output whatever the exit status.
pub fn run_status(cmd: &mut Command) -> Output {
    cmd.stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", describe(cmd)))
}

/// Result of [`run_timeout`].
#[derive(Debug)]
pub struct TimedOutput {
    /// `None` when the command did not finish in time (it was killed).
    pub status: Option<ExitStatus>,
    pub stdout: String,
    pub stderr: String,
}

/// Runs `cmd` with a time limit; a command still running at the limit is killed (SIGKILL) and
/// reaped, and `status` is `None`. Output goes through anonymous files, so no pipe can fill up.
pub fn run_timeout(cmd: &mut Command, limit: Duration) -> TimedOutput {
    let mut out = tempfile::tempfile().expect("tempfile");
    let mut err = tempfile::tempfile().expect("tempfile");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(out.try_clone().expect("dup"))
        .stderr(err.try_clone().expect("dup"))
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", describe(cmd)));
    let start = Instant::now();
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break Some(s),
            Ok(None) => {}
            Err(e) => panic!("wait for {}: {e}", describe(cmd)),
        }
        if start.elapsed() >= limit {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stdout = String::new();
    let mut stderr = String::new();
    out.seek(SeekFrom::Start(0)).unwrap();
    err.seek(SeekFrom::Start(0)).unwrap();
    let mut buf = Vec::new();
    out.read_to_end(&mut buf).unwrap();
    stdout.push_str(&String::from_utf8_lossy(&buf));
    buf.clear();
    err.read_to_end(&mut buf).unwrap();
    stderr.push_str(&String::from_utf8_lossy(&buf));
    TimedOutput {
        status,
        stdout,
        stderr,
    }
}

/// A `Command` for the snapfs binary, with logging variables removed so that its stderr is
/// exactly what a user sees.
pub fn snapfs_cmd() -> Command {
    let mut c = Command::new(snapfs_bin());
    c.env_remove("RUST_LOG").env_remove("RUST_BACKTRACE");
    c
}

// ---------------------------------------------------------------------------------------------
// qemu-img / qemu-io
// ---------------------------------------------------------------------------------------------

/// Runs `qemu-img ARGS`; panics with its stderr on failure; returns stdout.
pub fn qemu_img(args: &[&str]) -> String {
    require_env();
    let out = run(Command::new("qemu-img").args(args));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// "qcow2" when the file starts with the qcow2 magic, else "raw".
pub fn image_format(path: &Path) -> &'static str {
    let mut magic = [0u8; 4];
    let ok = File::open(path)
        .and_then(|mut f| f.read_exact(&mut magic))
        .is_ok();
    if ok && magic == *b"QFI\xfb" {
        "qcow2"
    } else {
        "raw"
    }
}

/// Runs `qemu-io -f FMT -c CMD... IMAGE`; panics with its output if any command fails.
pub fn qemu_io(image: &Path, cmds: &[&str]) {
    require_env();
    if cmds.is_empty() {
        return;
    }
    let mut c = Command::new("qemu-io");
    c.arg("-f").arg(image_format(image));
    for cmd in cmds {
        c.arg("-c").arg(cmd);
    }
    c.arg(image);
    let out = run(&mut c);
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    for line in text.lines() {
        let l = line.to_ascii_lowercase();
        if l.contains("failed") || l.contains("error") {
            panic!(
                "qemu-io on {} reported a failure: {line}\ncommands: {cmds:?}\n{text}",
                image.display()
            );
        }
    }
}

/// Same as [`qemu_io`] with owned strings.
pub fn qemu_io_s(image: &Path, cmds: &[String]) {
    let v: Vec<&str> = cmds.iter().map(|s| s.as_str()).collect();
    qemu_io(image, &v);
}

fn p(path: &Path) -> &str {
    path.to_str().expect("test paths are UTF-8")
}

/// `qemu-img create -f qcow2 [-o OPTS] [-b BACKING -F FMT] PATH SIZE`. `backing` is written into
/// the image as given (relative names are relative to the image's directory).
pub fn create_qcow2(path: &Path, size: u64, opts: &str, backing: Option<(&str, &str)>) {
    let size = size.to_string();
    let mut args: Vec<&str> = vec!["create", "-q", "-f", "qcow2"];
    if !opts.is_empty() {
        args.push("-o");
        args.push(opts);
    }
    if let Some((b, fmt)) = backing {
        args.extend(["-b", b, "-F", fmt]);
    }
    args.push(p(path));
    args.push(&size);
    qemu_img(&args);
}

/// `qemu-img snapshot -c TAG IMAGE`.
pub fn snapshot_create(image: &Path, tag: &str) {
    qemu_img(&["snapshot", "-c", tag, p(image)]);
}

/// `qemu-img info -U --output=json IMAGE` (force-share, so it also works while mounted).
pub fn info_json(image: &Path) -> serde_json::Value {
    let out = qemu_img(&["info", "-U", "--output=json", p(image)]);
    serde_json::from_str(&out).expect("qemu-img info JSON")
}

/// The image's virtual size per qemu-img.
pub fn virtual_size(image: &Path) -> u64 {
    info_json(image)["virtual-size"]
        .as_u64()
        .expect("virtual-size")
}

/// The image's cluster size per qemu-img (None for raw).
pub fn cluster_size(image: &Path) -> Option<u64> {
    info_json(image)["cluster-size"].as_u64()
}

/// One internal snapshot as qemu-img reports it.
#[derive(Debug, Clone)]
pub struct SnapInfo {
    pub id: String,
    pub name: String,
    pub date_sec: i64,
    pub date_nsec: i64,
    pub vm_state_size: u64,
}

/// The internal snapshots of `image`, in table order.
pub fn snapshots(image: &Path) -> Vec<SnapInfo> {
    let v = info_json(image);
    let Some(list) = v["snapshots"].as_array() else {
        return Vec::new();
    };
    list.iter()
        .map(|s| SnapInfo {
            id: s["id"].as_str().expect("id").to_string(),
            name: s["name"].as_str().expect("name").to_string(),
            date_sec: s["date-sec"].as_i64().expect("date-sec"),
            date_nsec: s["date-nsec"].as_i64().unwrap_or(0),
            vm_state_size: s["vm-state-size"].as_u64().unwrap_or(0),
        })
        .collect()
}

/// The snapshot of `image` whose tag is `tag` (the first, as qemu-img resolves names).
pub fn snapshot_by_name(image: &Path, tag: &str) -> SnapInfo {
    snapshots(image)
        .into_iter()
        .find(|s| s.name == tag)
        .unwrap_or_else(|| panic!("no snapshot {tag:?} in {}", image.display()))
}

/// Runs `qemu-img check` and panics unless it reports a clean image (exit 0).
pub fn qemu_img_check(image: &Path) -> Result<(), String> {
    let out = run_status(Command::new("qemu-img").args(["check", "-U", p(image)]));
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "qemu-img check {} exited {}: {}{}",
            image.display(),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

fn oracle_dir(image: &Path) -> PathBuf {
    let d = image
        .parent()
        .expect("image has a directory")
        .join(".oracle");
    fs::create_dir_all(&d).expect("create oracle dir");
    d
}

fn stem(image: &Path) -> String {
    image
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// `qemu-img convert -O raw [-l snapshot.name=SNAP] IMAGE OUT`; OUT is a fresh file in a temp
/// directory next to the image (removed with the test's work directory).
pub fn convert_to_raw(image: &Path, snapshot: Option<&str>) -> PathBuf {
    let out = oracle_dir(image).join(format!("{}-{}.raw", stem(image), unique()));
    let fmt = image_format(image);
    let mut args = vec!["convert", "-U", "-f", fmt, "-O", "raw"];
    let l;
    if let Some(s) = snapshot {
        l = format!("snapshot.name={s}");
        args.push("-l");
        args.push(&l);
    }
    args.push(p(image));
    args.push(p(&out));
    qemu_img(&args);
    out
}

/// A copy of `image` (next to it, so relative backing names still resolve) with snapshot `id`
/// applied by `qemu-img snapshot -a`. This is the oracle for a snapshot's size and allocation
/// map: `qemu-img convert -l` keeps the current size, while applying resizes the disk to the
/// snapshot's own size.
pub fn applied_snapshot_copy(image: &Path, id: &str) -> PathBuf {
    let dir = image.parent().unwrap();
    let copy = dir.join(format!(".{}.apply-{}.qcow2", stem(image), unique()));
    fs::copy(image, &copy).expect("copy image");
    qemu_img(&["snapshot", "-a", id, p(&copy)]);
    copy
}

/// The content of internal snapshot `id` of `image` as a raw file:
/// `qemu-img convert -O raw -l snapshot.id=ID`, cut (or extended) to the snapshot's own disk size.
pub fn convert_snapshot_to_raw(image: &Path, id: &str) -> PathBuf {
    let out = oracle_dir(image).join(format!("{}@{}-{}.raw", stem(image), id, unique()));
    let l = format!("snapshot.id={id}");
    qemu_img(&[
        "convert",
        "-U",
        "-f",
        "qcow2",
        "-O",
        "raw",
        "-l",
        &l,
        p(image),
        p(&out),
    ]);
    let copy = applied_snapshot_copy(image, id);
    let size = virtual_size(&copy);
    fs::remove_file(&copy).ok();
    let f = fs::OpenOptions::new().write(true).open(&out).unwrap();
    f.set_len(size).unwrap();
    out
}

// ---------------------------------------------------------------------------------------------
// Data ranges
// ---------------------------------------------------------------------------------------------

/// Sorted, merged, half-open byte ranges `[start, end)`.
pub type Ranges = Vec<(u64, u64)>;

/// Sorts and merges overlapping or touching ranges; drops empty ones.
pub fn merge_ranges(mut v: Vec<(u64, u64)>) -> Ranges {
    v.retain(|r| r.1 > r.0);
    v.sort();
    let mut out: Ranges = Vec::new();
    for (s, e) in v {
        if let Some(last) = out.last_mut() {
            if s <= last.1 {
                last.1 = last.1.max(e);
                continue;
            }
        }
        out.push((s, e));
    }
    out
}

/// Total bytes covered.
pub fn ranges_total(r: &Ranges) -> u64 {
    r.iter().map(|(s, e)| e - s).sum()
}

/// Ranges in `a` and not in `b`.
pub fn ranges_minus(a: &Ranges, b: &Ranges) -> Ranges {
    let mut out = Vec::new();
    for &(s, e) in a {
        let mut cur = s;
        for &(bs, be) in b {
            if be <= cur || bs >= e {
                continue;
            }
            if bs > cur {
                out.push((cur, bs));
            }
            cur = cur.max(be);
            if cur >= e {
                break;
            }
        }
        if cur < e {
            out.push((cur, e));
        }
    }
    merge_ranges(out)
}

fn fmt_ranges(r: &Ranges) -> String {
    let shown: Vec<String> = r
        .iter()
        .take(12)
        .map(|(s, e)| format!("[{s:#x}, {e:#x})"))
        .collect();
    let more = if r.len() > 12 {
        format!(" ... ({} ranges)", r.len())
    } else {
        String::new()
    };
    format!("{}{}", shown.join(" "), more)
}

/// None if equal, else a description of what differs.
pub fn describe_ranges_diff(what_a: &str, a: &Ranges, what_b: &str, b: &Ranges) -> Option<String> {
    if a == b {
        return None;
    }
    let only_a = ranges_minus(a, b);
    let only_b = ranges_minus(b, a);
    Some(format!(
        "data ranges differ: {what_a} has {} bytes of data, {what_b} has {}; \
         data only in {what_a}: {}; data only in {what_b}: {}",
        ranges_total(a),
        ranges_total(b),
        fmt_ranges(&only_a),
        fmt_ranges(&only_b)
    ))
}

/// The data ranges of an image per `qemu-img map --output=json` (entries with `"data": true`);
/// qemu-img merges the whole backing chain.
pub fn qemu_map_data(image: &Path) -> Ranges {
    let fmt = image_format(image);
    let out = qemu_img(&["map", "-U", "-f", fmt, "--output=json", p(image)]);
    let v: serde_json::Value = serde_json::from_str(&out).expect("qemu-img map JSON");
    let mut r = Vec::new();
    for e in v.as_array().expect("map is an array") {
        if e["data"].as_bool() == Some(true) {
            let s = e["start"].as_u64().unwrap();
            let l = e["length"].as_u64().unwrap();
            r.push((s, s + l));
        }
    }
    merge_ranges(r)
}

fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

/// Walks `path` with lseek(SEEK_DATA) / lseek(SEEK_HOLE) and returns its data ranges.
/// Panics on an lseek error other than ENXIO (no more data).
pub fn seek_data_ranges(path: &Path) -> Ranges {
    let f = File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    let size = f.metadata().unwrap().len();
    let fd = f.as_raw_fd();
    let mut out = Vec::new();
    let mut pos: u64 = 0;
    while pos < size {
        let d = unsafe { libc::lseek(fd, pos as libc::off_t, libc::SEEK_DATA) };
        if d < 0 {
            let e = errno();
            if e == libc::ENXIO {
                break;
            }
            panic!(
                "lseek({}, {pos}, SEEK_DATA) failed: {}",
                path.display(),
                std::io::Error::from_raw_os_error(e)
            );
        }
        let d = d as u64;
        assert!(
            d >= pos && d < size,
            "lseek({}, {pos}, SEEK_DATA) returned {d} (size {size})",
            path.display()
        );
        let h = unsafe { libc::lseek(fd, d as libc::off_t, libc::SEEK_HOLE) };
        if h < 0 {
            panic!(
                "lseek({}, {d}, SEEK_HOLE) failed: {}",
                path.display(),
                std::io::Error::last_os_error()
            );
        }
        let h = h as u64;
        assert!(
            h > d && h <= size,
            "lseek({}, {d}, SEEK_HOLE) returned {h} (size {size})",
            path.display()
        );
        out.push((d, h));
        pos = h;
    }
    merge_ranges(out)
}

// ---------------------------------------------------------------------------------------------
// File comparison
// ---------------------------------------------------------------------------------------------

const CHUNK: usize = 1 << 20;

fn read_full(f: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

fn hex(b: &[u8]) -> String {
    b.iter()
        .map(|x| format!("{x:02x}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Compares two files in 1 MiB chunks. `Ok(())` when equal; otherwise a description of the first
/// difference (size, first differing offset with the bytes there, or a read error).
pub fn compare_files(a: &Path, b: &Path) -> Result<(), String> {
    let mut fa = File::open(a).map_err(|e| format!("open {}: {e}", a.display()))?;
    let mut fb = File::open(b).map_err(|e| format!("open {}: {e}", b.display()))?;
    let la = fa.metadata().map_err(|e| e.to_string())?.len();
    let lb = fb.metadata().map_err(|e| e.to_string())?.len();
    if la != lb {
        return Err(format!(
            "sizes differ: {} is {la} bytes, {} is {lb} bytes",
            a.display(),
            b.display()
        ));
    }
    let mut ba = vec![0u8; CHUNK];
    let mut bb = vec![0u8; CHUNK];
    let mut off: u64 = 0;
    loop {
        let na = read_full(&mut fa, &mut ba)
            .map_err(|e| format!("read {} at {off:#x}: {e}", a.display()))?;
        let nb = read_full(&mut fb, &mut bb)
            .map_err(|e| format!("read {} at {off:#x}: {e}", b.display()))?;
        if na != nb {
            return Err(format!(
                "short read at {off:#x}: {} gave {na} bytes, {} gave {nb}",
                a.display(),
                b.display()
            ));
        }
        if na == 0 {
            return Ok(());
        }
        if ba[..na] != bb[..nb] {
            let i = (0..na).find(|&i| ba[i] != bb[i]).unwrap();
            let s = i.saturating_sub(8);
            let e = (i + 8).min(na);
            let last_diff = (0..na).rev().find(|&i| ba[i] != bb[i]).unwrap();
            return Err(format!(
                "contents differ first at offset {:#x} ({}): {} has [{}], {} has [{}] \
                 (bytes from {:#x}); within this 1 MiB chunk the last difference is at {:#x}",
                off + i as u64,
                off + i as u64,
                a.display(),
                hex(&ba[s..e]),
                b.display(),
                hex(&bb[s..e]),
                off + s as u64,
                off + last_diff as u64
            ));
        }
        off += na as u64;
    }
}

/// Panics unless the two files are equal (see [`compare_files`]).
pub fn assert_files_equal(a: &Path, b: &Path) {
    if let Err(e) = compare_files(a, b) {
        panic!("{e}");
    }
}

// ---------------------------------------------------------------------------------------------
// Mounts
// ---------------------------------------------------------------------------------------------

fn unescape_mountinfo(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 4 <= b.len() {
            if let Ok(v) =
                u8::from_str_radix(std::str::from_utf8(&b[i + 1..i + 4]).unwrap_or(""), 8)
            {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Whether something is mounted exactly at `path` (per /proc/self/mountinfo). Never touches the
/// mount itself, so it cannot hang on a stuck FUSE server.
pub fn is_mounted(path: &Path) -> bool {
    let Ok(info) = fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    let want = path.to_string_lossy();
    info.lines().any(|l| {
        l.split(' ')
            .nth(4)
            .map(|mp| unescape_mountinfo(mp) == want)
            .unwrap_or(false)
    })
}

/// The filesystem type mounted at `path` (e.g. "fuse.snapfs"), if any.
pub fn mount_fstype(path: &Path) -> Option<String> {
    let info = fs::read_to_string("/proc/self/mountinfo").ok()?;
    let want = path.to_string_lossy();
    for l in info.lines() {
        let fields: Vec<&str> = l.split(' ').collect();
        if fields.len() > 4 && unescape_mountinfo(fields[4]) == want {
            let dash = fields.iter().position(|f| *f == "-")?;
            return fields.get(dash + 1).map(|s| s.to_string());
        }
    }
    None
}

/// Unmounts `mp` if mounted: `umount MP`, then `umount -l MP`. Each attempt is time-limited.
/// Returns whether the path is unmounted afterwards. Never panics.
pub fn force_unmount(mp: &Path) -> bool {
    for args in [&[][..], &["-l"][..]] {
        if !is_mounted(mp) {
            return true;
        }
        let mut c = Command::new("umount");
        c.args(args).arg(mp);
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            run_timeout(&mut c, Duration::from_secs(20))
        }));
        if r.is_err() {
            continue;
        }
        // umount of a FUSE fs returns once the kernel detached it; give mountinfo a moment.
        let t = Instant::now();
        while is_mounted(mp) && t.elapsed() < Duration::from_secs(2) {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    !is_mounted(mp)
}

fn process_alive(pid: i32) -> bool {
    // A zombie still has a /proc entry; treat "Z" as dead.
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => {
            let state = s
                .rsplit(')')
                .next()
                .and_then(|r| r.split_whitespace().next());
            state != Some("Z")
        }
        Err(_) => false,
    }
}

fn cmdline(pid: i32) -> Vec<String> {
    fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| {
            b.split(|&c| c == 0)
                .filter(|s| !s.is_empty())
                .map(|s| String::from_utf8_lossy(s).into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// Processes (other than us) whose command line names the snapfs binary and `mp`: the daemon a
/// background mount left serving `mp`. Temp mount points are unique, so only our own daemon
/// can match.
fn find_daemon_pids(mp: &Path) -> Vec<i32> {
    let me = std::process::id() as i32;
    let mps = mp.to_string_lossy().into_owned();
    let mut out = Vec::new();
    if let Ok(rd) = fs::read_dir("/proc") {
        for e in rd.flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            if pid == me {
                continue;
            }
            let args = cmdline(pid);
            let bin = snapfs_bin().to_string_lossy().into_owned();
            let is_snapfs = args
                .iter()
                .take(2)
                .any(|a| *a == bin || a.ends_with("snapfs"));
            if is_snapfs && args.contains(&mps) {
                out.push(pid);
            }
        }
    }
    out
}

fn watchdog_limit() -> Duration {
    let secs = std::env::var("SNAPFS_TEST_MOUNT_TIMEOUT")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(900);
    Duration::from_secs(secs)
}

/// A snapfs mount for the duration of a test. Created by [`Mount::new`] (foreground child,
/// `snapfs mount -f`) or [`Mount::background`] (`snapfs mount`, which returns once ready).
/// Dropping it always unmounts (`umount`, then `umount -l`, then killing the server) and reaps
/// the server, also when the test panicked. A watchdog kills the server if the mount lives longer
/// than `SNAPFS_TEST_MOUNT_TIMEOUT` seconds (default 900), so that a hung FUSE server makes the
/// test fail (reads get ENOTCONN) instead of hanging the suite.
/// A read-only memory map of the first `len` bytes of a file, unmapped on drop.
pub struct Mapped {
    ptr: *mut libc::c_void,
    len: usize,
}

impl Mapped {
    /// Maps `file` read-only with `flags` (`MAP_SHARED` or `MAP_PRIVATE`).
    pub fn new(file: &File, len: usize, flags: libc::c_int) -> std::io::Result<Mapped> {
        // SAFETY: a fresh read-only map of an open file; no existing memory is touched.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                flags,
                file.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Mapped { ptr, len })
    }

    pub fn bytes(&self) -> &[u8] {
        // SAFETY: `ptr` maps `len` readable bytes until drop, which the borrow outlives not.
        unsafe { std::slice::from_raw_parts(self.ptr as *const u8, self.len) }
    }
}

impl Drop for Mapped {
    fn drop(&mut self) {
        // SAFETY: the map made in `new`, unmapped once; no borrow of it outlives `self`.
        unsafe { libc::munmap(self.ptr, self.len) };
    }
}

pub struct Mount {
    dir: PathBuf,
    mp: PathBuf,
    image: PathBuf,
    child: Option<Child>,
    daemon_pids: Vec<i32>,
    stderr_path: PathBuf,
    watchdog: Option<(mpsc::Sender<()>, JoinHandle<()>)>,
    cleaned: bool,
}

impl Mount {
    /// `snapfs mount -f IMAGE MP` with no options.
    pub fn new(image: &Path) -> Mount {
        Self::with_args(image, &[])
    }

    /// `snapfs mount -f ARGS... IMAGE MP`.
    pub fn with_args(image: &Path, args: &[&str]) -> Mount {
        let mut m = Self::prepare(image);
        let stderr = File::create(&m.stderr_path).expect("create stderr log");
        let stdout = File::create(m.dir.join("stdout.log")).expect("create stdout log");
        let mut cmd = Command::new(snapfs_bin());
        cmd.arg("mount")
            .arg("-f")
            .args(args)
            .arg(image)
            .arg(&m.mp)
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", describe(&cmd)));
        let pid = child.id() as i32;
        m.child = Some(child);
        m.start_watchdog(vec![pid]);
        m.wait_ready(&describe(&cmd));
        m
    }

    /// `snapfs mount -f --domain NAME ARGS... NAME MP`: every disk of libvirt domain NAME.
    pub fn domain(name: &str, args: &[&str]) -> Mount {
        let mut all = vec!["--domain", name];
        all.extend_from_slice(args);
        Self::with_args(Path::new(name), &all)
    }

    /// `snapfs mount ARGS... IMAGE MP` (no -f): must exit 0 once the mount is ready.
    pub fn background(image: &Path, args: &[&str]) -> Mount {
        let mut m = Self::prepare(image);
        let mut cmd = Command::new(snapfs_bin());
        cmd.arg("mount").args(args).arg(image).arg(&m.mp);
        let out = run_timeout(&mut cmd, Duration::from_secs(60));
        fs::write(&m.stderr_path, &out.stderr).ok();
        m.daemon_pids = find_daemon_pids(&m.mp);
        m.start_watchdog(m.daemon_pids.clone());
        match out.status {
            None => panic!(
                "{} did not return within 60 s\n--- stderr ---\n{}",
                describe(&cmd),
                out.stderr
            ),
            Some(s) if !s.success() => panic!(
                "{} exited {s}\n--- stderr ---\n{}",
                describe(&cmd),
                out.stderr
            ),
            Some(_) => {}
        }
        assert!(
            is_mounted(&m.mp),
            "{} exited 0 but nothing is mounted at {}\n--- stderr ---\n{}",
            describe(&cmd),
            m.mp.display(),
            out.stderr
        );
        // A domain mount has no live.raw at the top; its control/ is there.
        let ready = match args.contains(&"--domain") {
            true => m.mp.join("control/status"),
            false => m.live(),
        };
        assert!(
            ready.exists(),
            "{} exited 0 but {} does not exist yet (the mount must be ready when it returns)",
            describe(&cmd),
            ready.display()
        );
        m
    }

    /// [`Mount::domain`] in the background (no -f): `snapfs mount --domain NAME ARGS... NAME MP`.
    pub fn domain_background(name: &str, args: &[&str]) -> Mount {
        let mut all = vec!["--domain", name];
        all.extend_from_slice(args);
        Self::background(Path::new(name), &all)
    }

    fn prepare(image: &Path) -> Mount {
        require_env();
        let dir = tempfile::Builder::new()
            .prefix("snapfs-mnt-")
            .tempdir()
            .expect("temp dir")
            .keep();
        let dir = dir.canonicalize().unwrap();
        let mp = dir.join("mnt");
        fs::create_dir(&mp).unwrap();
        Mount {
            stderr_path: dir.join("stderr.log"),
            dir,
            mp,
            image: image.to_path_buf(),
            child: None,
            daemon_pids: Vec::new(),
            watchdog: None,
            cleaned: false,
        }
    }

    fn start_watchdog(&mut self, pids: Vec<i32>) {
        let (tx, rx) = mpsc::channel::<()>();
        let mp = self.mp.clone();
        let limit = watchdog_limit();
        let h = std::thread::spawn(move || {
            if let Err(mpsc::RecvTimeoutError::Timeout) = rx.recv_timeout(limit) {
                eprintln!(
                    "test watchdog: mount at {} alive for more than {:?}; killing snapfs {:?}",
                    mp.display(),
                    limit,
                    pids
                );
                for pid in &pids {
                    unsafe {
                        libc::kill(*pid, libc::SIGKILL);
                    }
                }
                force_unmount(&mp);
            }
        });
        self.watchdog = Some((tx, h));
    }

    fn wait_ready(&mut self, what: &str) {
        let start = Instant::now();
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    panic!(
                        "{what} exited before the mount was ready ({status})\n--- stderr ---\n{}",
                        self.stderr_text()
                    );
                }
            }
            // control/ is in every mount, a domain's too (live.raw is not, beside a running
            // VM; snapshots/ is not at the top of a domain mount).
            if is_mounted(&self.mp) && self.mp.join("control").join("status").is_file() {
                return;
            }
            if start.elapsed() > Duration::from_secs(20) {
                panic!(
                    "{what}: {} did not appear within 20 s (mounted: {})\n--- stderr ---\n{}",
                    self.mp.join("control/status").display(),
                    is_mounted(&self.mp),
                    self.stderr_text()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The mount point.
    pub fn path(&self) -> &Path {
        &self.mp
    }

    /// The image this mount serves.
    pub fn image(&self) -> &Path {
        &self.image
    }

    /// MP/live.raw
    pub fn live(&self) -> PathBuf {
        self.mp.join("live.raw")
    }

    /// MP/snapshots/NAME
    pub fn snapshot(&self, name: &str) -> PathBuf {
        self.mp.join("snapshots").join(name)
    }

    /// The entries of MP/snapshots/, sorted.
    pub fn snapshot_names(&self) -> BTreeSet<String> {
        let dir = self.mp.join("snapshots");
        fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("read_dir {}: {e}", dir.display()))
            .map(|e| {
                e.expect("dir entry")
                    .file_name()
                    .to_string_lossy()
                    .into_owned()
            })
            .collect()
    }

    /// What the server wrote on stderr so far.
    pub fn stderr_text(&self) -> String {
        fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    /// Unmounts with `snapfs umount MP` and waits for the server to exit; returns the outcome of
    /// `snapfs umount` and (foreground mounts) the server's exit status. Cleanup still happens on
    /// drop whatever this returns.
    pub fn snapfs_umount(&mut self) -> (TimedOutput, Option<ExitStatus>) {
        let out = run_timeout(
            snapfs_cmd().arg("umount").arg(&self.mp),
            Duration::from_secs(30),
        );
        let mut status = None;
        if let Some(child) = self.child.as_mut() {
            let t = Instant::now();
            while t.elapsed() < Duration::from_secs(20) {
                if let Ok(Some(s)) = child.try_wait() {
                    status = Some(s);
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        (out, status)
    }

    /// Waits up to `limit` for the background daemon(s) to exit. True when none is left.
    pub fn wait_daemon_exit(&self, limit: Duration) -> bool {
        let t = Instant::now();
        loop {
            let alive: Vec<i32> = self
                .daemon_pids
                .iter()
                .copied()
                .filter(|&p| process_alive(p) && cmdline(p).iter().any(|a| Path::new(a) == self.mp))
                .collect();
            if alive.is_empty() {
                return true;
            }
            if t.elapsed() > limit {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn cleanup(&mut self) {
        if self.cleaned {
            return;
        }
        self.cleaned = true;
        let unmounted = force_unmount(&self.mp);
        if let Some(mut child) = self.child.take() {
            let t = Instant::now();
            let mut done = false;
            while t.elapsed() < Duration::from_secs(10) {
                if let Ok(Some(_)) = child.try_wait() {
                    done = true;
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            if !done {
                eprintln!(
                    "snapfs server for {} still running 10 s after unmount; killing it",
                    self.mp.display()
                );
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        if !self.daemon_pids.is_empty() && !self.wait_daemon_exit(Duration::from_secs(10)) {
            for &pid in &self.daemon_pids {
                if process_alive(pid) && cmdline(pid).iter().any(|a| Path::new(a) == self.mp) {
                    eprintln!(
                        "snapfs daemon {pid} for {} still running after unmount; killing it",
                        self.mp.display()
                    );
                    unsafe {
                        libc::kill(pid, libc::SIGKILL);
                    }
                }
            }
            self.wait_daemon_exit(Duration::from_secs(5));
        }
        if let Some((tx, h)) = self.watchdog.take() {
            let _ = tx.send(());
            let _ = h.join();
        }
        let unmounted = unmounted || force_unmount(&self.mp);
        if unmounted {
            let _ = fs::remove_dir_all(&self.dir);
        } else {
            eprintln!(
                "could not unmount {}; leaving {} in place",
                self.mp.display(),
                self.dir.display()
            );
        }
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        self.cleanup();
    }
}

// ---------------------------------------------------------------------------------------------
// Views and whole-mount verification
// ---------------------------------------------------------------------------------------------

/// What a file of the mount should be, in terms of the oracle.
#[derive(Debug, Clone)]
pub enum View {
    /// live.raw: the top image's active state through the chain.
    Live { top: PathBuf },
    /// An internal snapshot (by qcow2 id) of `image` (the top or a backing layer).
    Internal { image: PathBuf, id: String },
    /// A backing layer (qcow2 or raw) as a whole.
    Layer { image: PathBuf },
}

impl View {
    pub fn live(top: &Path) -> View {
        View::Live {
            top: top.to_path_buf(),
        }
    }
    /// Internal snapshot with tag `tag` of `image` (the first with that tag).
    pub fn internal(image: &Path, tag: &str) -> View {
        View::Internal {
            image: image.to_path_buf(),
            id: snapshot_by_name(image, tag).id,
        }
    }
    pub fn internal_id(image: &Path, id: &str) -> View {
        View::Internal {
            image: image.to_path_buf(),
            id: id.to_string(),
        }
    }
    pub fn layer(image: &Path) -> View {
        View::Layer {
            image: image.to_path_buf(),
        }
    }

    /// The file behind the view.
    pub fn file(&self) -> &Path {
        match self {
            View::Live { top } => top,
            View::Internal { image, .. } => image,
            View::Layer { image } => image,
        }
    }

    /// user.snapfs.kind
    pub fn kind(&self) -> &'static str {
        match self {
            View::Live { .. } => "live",
            View::Internal { .. } => "internal",
            View::Layer { .. } => "external",
        }
    }

    /// A raw file with the view's expected content (and size).
    pub fn oracle_raw(&self) -> PathBuf {
        match self {
            View::Live { top } => convert_to_raw(top, None),
            View::Internal { image, id } => convert_snapshot_to_raw(image, id),
            View::Layer { image } => {
                if image_format(image) == "raw" {
                    image.clone()
                } else {
                    convert_to_raw(image, None)
                }
            }
        }
    }

    /// The view's data ranges per `qemu-img map`.
    pub fn oracle_data(&self) -> Ranges {
        match self {
            View::Live { top } => qemu_map_data(top),
            View::Layer { image } => qemu_map_data(image),
            View::Internal { image, id } => {
                let copy = applied_snapshot_copy(image, id);
                let r = qemu_map_data(&copy);
                fs::remove_file(&copy).ok();
                r
            }
        }
    }

    /// The largest cluster size in the chain behind the view (for rounding tolerances).
    pub fn max_cluster(&self) -> u64 {
        let v = qemu_img(&[
            "info",
            "-U",
            "--backing-chain",
            "--output=json",
            p(self.file()),
        ]);
        let v: serde_json::Value = serde_json::from_str(&v).unwrap();
        v.as_array()
            .unwrap()
            .iter()
            .filter_map(|i| i["cluster-size"].as_u64())
            .max()
            .unwrap_or(512)
    }
}

/// An expected file of the mount: path relative to the mount point, and its view.
pub type Expected = Vec<(String, View)>;

/// For each expected file, (relative path, view, oracle raw file). Computed before mounting.
pub fn oracles(expected: &Expected) -> Vec<(String, View, PathBuf)> {
    expected
        .iter()
        .map(|(name, v)| (name.clone(), v.clone(), v.oracle_raw()))
        .collect()
}

/// Checks one file of the mount against its oracle: size, write bits (snapshot files have none),
/// content. Returns the problems found.
pub fn check_view_file(file: &Path, view: &View, oracle: &Path) -> Vec<String> {
    let mut problems = Vec::new();
    let name = file.display();
    let md = match fs::metadata(file) {
        Ok(m) => m,
        Err(e) => {
            problems.push(format!("{name}: stat failed: {e}"));
            return problems;
        }
    };
    let want = fs::metadata(oracle).unwrap().len();
    if md.len() != want {
        problems.push(format!(
            "{name}: st_size {} but the oracle's size is {want}",
            md.len()
        ));
    }
    if !md.is_file() {
        problems.push(format!("{name}: not a regular file ({:?})", md.file_type()));
    }
    if !matches!(view, View::Live { .. }) && md.mode() & 0o222 != 0 {
        problems.push(format!(
            "{name}: snapshot file has write bits (mode {:o})",
            md.mode() & 0o7777
        ));
    }
    if let Err(e) = compare_files(file, oracle) {
        problems.push(format!("{name} vs oracle: {e}"));
    }
    problems
}

/// The full read check of one image: compute every view's oracle, mount `top`, check that
/// snapshots/ holds exactly the expected names, and that every view matches its oracle (size,
/// no write bits on snapshots, content). After unmounting, `qemu-img check` must still pass.
/// Collects all problems and panics with the list.
pub fn verify_mount(top: &Path, expected: &Expected, mount_args: &[&str]) {
    let expected_names: BTreeSet<String> = expected
        .iter()
        .filter_map(|(n, _)| n.strip_prefix("snapshots/").map(|s| s.to_string()))
        .collect();
    let with_oracles = oracles(expected);
    let mut problems = Vec::new();
    {
        let m = Mount::with_args(top, mount_args);
        let names = m.snapshot_names();
        if names != expected_names {
            problems.push(format!(
                "snapshots/ lists {names:?}, expected {expected_names:?} \
                 (missing: {:?}, unexpected: {:?})",
                expected_names.difference(&names).collect::<Vec<_>>(),
                names.difference(&expected_names).collect::<Vec<_>>()
            ));
        }
        for (name, view, oracle) in &with_oracles {
            let file = m.path().join(name);
            problems.extend(check_view_file(&file, view, oracle));
        }
        if !problems.is_empty() {
            let err = m.stderr_text();
            if !err.trim().is_empty() {
                problems.push(format!("snapfs stderr:\n{err}"));
            }
        }
    }
    if let Err(e) = qemu_img_check(top) {
        problems.push(format!("after unmount: {e}"));
    }
    if !problems.is_empty() {
        panic!(
            "{} problem(s) with the mount of {}:\n- {}",
            problems.len(),
            top.display(),
            problems.join("\n- ")
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Extended attributes, times
// ---------------------------------------------------------------------------------------------

/// getxattr(2); None when the attribute does not exist (ENODATA), panics on other errors.
pub fn getxattr(path: &Path, name: &str) -> Option<Vec<u8>> {
    let cp = CString::new(path.as_os_str().as_bytes()).unwrap();
    let cn = CString::new(name).unwrap();
    let mut buf = vec![0u8; 4096];
    let n = unsafe {
        libc::getxattr(
            cp.as_ptr(),
            cn.as_ptr(),
            buf.as_mut_ptr() as *mut libc::c_void,
            buf.len(),
        )
    };
    if n < 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::ENODATA) {
            return None;
        }
        panic!("getxattr({}, {name}): {e}", path.display());
    }
    buf.truncate(n as usize);
    Some(buf)
}

/// getxattr as a string with any trailing NUL removed.
pub fn getxattr_str(path: &Path, name: &str) -> Option<String> {
    getxattr(path, name).map(|mut v| {
        while v.last() == Some(&0) {
            v.pop();
        }
        String::from_utf8_lossy(&v).into_owned()
    })
}

/// listxattr(2)
pub fn listxattr(path: &Path) -> Vec<String> {
    let cp = CString::new(path.as_os_str().as_bytes()).unwrap();
    let mut buf = vec![0u8; 65536];
    let n = unsafe {
        libc::listxattr(
            cp.as_ptr(),
            buf.as_mut_ptr() as *mut libc::c_char,
            buf.len(),
        )
    };
    if n < 0 {
        panic!(
            "listxattr({}): {}",
            path.display(),
            std::io::Error::last_os_error()
        );
    }
    buf.truncate(n as usize);
    buf.split(|&c| c == 0)
        .filter(|s| !s.is_empty())
        .map(|s| String::from_utf8_lossy(s).into_owned())
        .collect()
}

fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146097 + doe - 719468
}

/// Parses an RFC 3339 timestamp (`YYYY-MM-DDTHH:MM:SS[.frac](Z|±HH:MM)`, 'T' or ' ' or 't') into
/// (seconds since the epoch, nanoseconds). None when malformed.
pub fn parse_rfc3339(s: &str) -> Option<(i64, u32)> {
    let b = s.as_bytes();
    if b.len() < 20 {
        return None;
    }
    let num = |r: std::ops::Range<usize>| -> Option<i64> {
        let t = std::str::from_utf8(b.get(r)?).ok()?;
        if !t.bytes().all(|c| c.is_ascii_digit()) {
            return None;
        }
        t.parse().ok()
    };
    let (y, mo, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    if b[4] != b'-' || b[7] != b'-' || !matches!(b[10], b'T' | b't' | b' ') {
        return None;
    }
    let (h, mi, se) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if b[13] != b':' || b[16] != b':' {
        return None;
    }
    let mut i = 19;
    let mut nanos: u32 = 0;
    if b.get(i) == Some(&b'.') {
        i += 1;
        let start = i;
        while i < b.len() && b[i].is_ascii_digit() {
            i += 1;
        }
        if i == start {
            return None;
        }
        let mut frac = std::str::from_utf8(&b[start..i]).ok()?.to_string();
        frac.truncate(9);
        while frac.len() < 9 {
            frac.push('0');
        }
        nanos = frac.parse().ok()?;
    }
    let offset = match b.get(i)? {
        b'Z' | b'z' if i + 1 == b.len() => 0,
        c @ (b'+' | b'-') if i + 6 == b.len() && b[i + 3] == b':' => {
            let oh = num(i + 1..i + 3)?;
            let om = num(i + 4..i + 6)?;
            let o = oh * 3600 + om * 60;
            if *c == b'+' { o } else { -o }
        }
        _ => return None,
    };
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || se > 60 {
        return None;
    }
    let secs = days_from_civil(y, mo, d) * 86400 + h * 3600 + mi * 60 + se - offset;
    Some((secs, nanos))
}

// ---------------------------------------------------------------------------------------------
// Raw patching of qcow2 files
// ---------------------------------------------------------------------------------------------

pub fn read_be_u32(path: &Path, off: u64) -> u32 {
    use std::os::unix::fs::FileExt;
    let mut b = [0u8; 4];
    File::open(path)
        .unwrap()
        .read_exact_at(&mut b, off)
        .unwrap();
    u32::from_be_bytes(b)
}

pub fn read_be_u64(path: &Path, off: u64) -> u64 {
    use std::os::unix::fs::FileExt;
    let mut b = [0u8; 8];
    File::open(path)
        .unwrap()
        .read_exact_at(&mut b, off)
        .unwrap();
    u64::from_be_bytes(b)
}

pub fn write_bytes_at(path: &Path, off: u64, bytes: &[u8]) {
    use std::os::unix::fs::FileExt;
    let f = fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(bytes, off).unwrap();
    f.sync_all().unwrap();
}

pub fn write_be_u32(path: &Path, off: u64, v: u32) {
    write_bytes_at(path, off, &v.to_be_bytes());
}

pub fn write_be_u64(path: &Path, off: u64, v: u64) {
    write_bytes_at(path, off, &v.to_be_bytes());
}

/// File offsets of the snapshot table entries of a qcow2 image, in table order.
pub fn snapshot_entry_offsets(path: &Path) -> Vec<u64> {
    let nb = read_be_u32(path, 60) as u64;
    let mut off = read_be_u64(path, 64);
    let mut v = Vec::new();
    for _ in 0..nb {
        v.push(off);
        let id_len = (read_be_u32(path, off + 12) >> 16) as u64;
        let name_len = (read_be_u32(path, off + 12) & 0xffff) as u64;
        let extra = read_be_u32(path, off + 36) as u64;
        let len = 40 + extra + id_len + name_len;
        off += len.div_ceil(8) * 8;
    }
    v
}

/// For files whose names are only known up to a clash suffix: every file must equal exactly one
/// of the oracles, one-to-one. Also checks sizes and (for non-live views) write bits.
pub fn match_by_content(files: &[PathBuf], views: &[(View, PathBuf)]) -> Vec<String> {
    let mut problems = Vec::new();
    if files.len() != views.len() {
        problems.push(format!(
            "{} files {:?} for {} views",
            files.len(),
            files,
            views.len()
        ));
    }
    let mut used = vec![false; views.len()];
    for f in files {
        let hits: Vec<usize> = views
            .iter()
            .enumerate()
            .filter(|(_, (_, o))| compare_files(f, o).is_ok())
            .map(|(i, _)| i)
            .collect();
        match hits.as_slice() {
            [] => {
                let why: Vec<String> = views
                    .iter()
                    .map(|(v, o)| {
                        format!("{v:?}: {}", compare_files(f, o).err().unwrap_or_default())
                    })
                    .collect();
                problems.push(format!(
                    "{} matches none of the expected views: {}",
                    f.display(),
                    why.join("; ")
                ))
            }
            [i] => {
                if used[*i] {
                    problems.push(format!(
                        "{} has the same content as another file ({:?})",
                        f.display(),
                        views[*i].0
                    ));
                }
                used[*i] = true;
                problems.extend(check_view_file(f, &views[*i].0, &views[*i].1));
            }
            _ => problems.push(format!(
                "{} matches several views (test images must differ)",
                f.display()
            )),
        }
    }
    problems
}

/// The whole content of a file (small files only: images before/after checks).
pub fn read_all(path: &Path) -> Vec<u8> {
    fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

pub mod bitmap_support;
pub mod chain_support;
pub mod crash;
pub mod hostile_support;
pub mod libvirt_support;
pub mod powercut;
pub mod snapshot_support;
pub mod stress_support;
pub mod write_support;
