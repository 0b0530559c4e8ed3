//! Helpers for the chain-operation tests (`tests/chain_*.rs`): the test chains, copies of a chain
//! for the qemu-img oracle, `qemu-img info --backing-chain` comparisons, `qemu-img check` on every
//! file, file digests, the `ok (detail)` status lines, a poller of `control/status`, and a
//! pseudo-terminal to run the `snapfs` CLI in (its progress bar is drawn on terminals only).

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File};
use std::io::Read;
use std::os::unix::io::{AsRawFd, FromRawFd};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::images::{fill, fill_no_zeros};
use super::snapshot_support::{assert_check_clean, status_text};
use super::{
    KIB, MIB, Mount, View, check_view_file, compare_files, create_qcow2, qemu_img, qemu_io_s, run,
    snapshot_create,
};

fn s(p: &Path) -> &str {
    p.to_str().expect("test paths are UTF-8")
}

// ---------------------------------------------------------------------------------------------
// Test chains
// ---------------------------------------------------------------------------------------------

/// Chain A: four qcow2 layers, relative backing names through a subfolder, mixed cluster sizes,
/// internal snapshots in the bottom, in an inner layer and in the top:
///
/// ```text
/// base.qcow2 (32 MiB, 64k; snapshot bs)
///   <- sub/mid.qcow2 (64 MiB, 64k, backing "../base.qcow2"; snapshot ms; zero clusters over base)
///   <- upper.qcow2 (64 MiB, 32k, backing "sub/mid.qcow2"; zero clusters; no snapshots)
///   <- top.qcow2 (64 MiB, 128k, backing "upper.qcow2"; snapshot t1)
/// ```
/// Views: live, t1, upper, mid, mid@ms, base, base@bs. Returns the top.
pub fn chain_a(dir: &Path) -> PathBuf {
    let sub = dir.join("sub");
    fs::create_dir_all(&sub).unwrap();
    let base = dir.join("base.qcow2");
    let mid = sub.join("mid.qcow2");
    let upper = dir.join("upper.qcow2");
    let top = dir.join("top.qcow2");

    create_qcow2(&base, 32 * MIB, "cluster_size=65536", None);
    fill(&base, 64 * KIB, 32 * MIB, 1, None);
    snapshot_create(&base, "bs");
    fill(&base, 64 * KIB, 32 * MIB, 2, None);

    create_qcow2(
        &mid,
        64 * MIB,
        "cluster_size=65536",
        Some(("../base.qcow2", "qcow2")),
    );
    fill(&mid, 64 * KIB, 64 * MIB, 3, None);
    snapshot_create(&mid, "ms");
    fill(&mid, 64 * KIB, 64 * MIB, 4, None);
    qemu_io_s(
        &mid,
        &[
            format!("write -z {} {}", 64 * KIB, 128 * KIB),
            // zero clusters that straddle the end of the smaller base
            format!("write -z {} {}", 31 * MIB, 2 * MIB),
        ],
    );

    create_qcow2(
        &upper,
        64 * MIB,
        "cluster_size=32768",
        Some(("sub/mid.qcow2", "qcow2")),
    );
    fill(&upper, 32 * KIB, 64 * MIB, 5, None);
    qemu_io_s(
        &upper,
        &[
            format!("write -z {} {}", 4 * MIB, 96 * KIB),
            format!("write -P 0x5e {} {}", 12 * MIB + 4 * KIB, 3 * MIB),
        ],
    );

    create_qcow2(
        &top,
        64 * MIB,
        "cluster_size=131072",
        Some(("upper.qcow2", "qcow2")),
    );
    fill(&top, 128 * KIB, 64 * MIB, 6, None);
    snapshot_create(&top, "t1");
    fill(&top, 128 * KIB, 64 * MIB, 7, None);
    qemu_io_s(&top, &[format!("write -z {} {}", 2 * MIB, 256 * KIB)]);
    top
}

/// Chain R: qcow2 over qcow2 over raw.
///
/// ```text
/// base.img (raw, 16 MiB, sparse)
///   <- mid.qcow2 (32 MiB, backing "base.img" raw; zero clusters over raw data and past its end)
///   <- top.qcow2 (32 MiB, backing "mid.qcow2"; snapshot s)
/// ```
/// Views: live, s, mid, base. Returns the top.
pub fn chain_r(dir: &Path) -> PathBuf {
    let base = dir.join("base.img");
    let f = File::create(&base).unwrap();
    f.set_len(16 * MIB).unwrap();
    drop(f);
    fill_no_zeros(&base, 64 * KIB, 16 * MIB, 1);
    let mid = dir.join("mid.qcow2");
    create_qcow2(&mid, 32 * MIB, "", Some(("base.img", "raw")));
    fill(&mid, 64 * KIB, 32 * MIB, 2, None);
    qemu_io_s(
        &mid,
        &[
            format!("write -z {} {}", 10 * 64 * KIB, 128 * KIB),
            format!("write -z {} {}", 15 * MIB, 2 * MIB),
        ],
    );
    let top = dir.join("top.qcow2");
    create_qcow2(&top, 32 * MIB, "", Some(("mid.qcow2", "qcow2")));
    fill(&top, 64 * KIB, 32 * MIB, 3, None);
    snapshot_create(&top, "s");
    fill(&top, 64 * KIB, 32 * MIB, 4, None);
    top
}

/// `cp -a --sparse=always SRC/. DST/`: a copy of a chain folder (relative backing names keep
/// working in the copy).
pub fn copy_dir(src: &Path, dst: &Path) {
    fs::create_dir_all(dst).unwrap();
    run(Command::new("cp")
        .arg("-a")
        .arg("--sparse=always")
        .arg(format!("{}/.", src.display()))
        .arg(dst));
}

/// Every regular file under `dir` (recursively), skipping the oracle folders (`.oracle`) and
/// hidden files the helpers leave next to images.
pub fn image_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).unwrap_or_else(|e| panic!("read_dir {}: {e}", d.display())) {
            let e = e.unwrap();
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') {
                continue;
            }
            let ft = e.file_type().unwrap();
            if ft.is_dir() {
                stack.push(e.path());
            } else if ft.is_file() {
                out.push(e.path());
            }
        }
    }
    out.sort();
    out
}

/// The qcow2 files among [`image_files`].
pub fn qcow2_files(dir: &Path) -> Vec<PathBuf> {
    image_files(dir)
        .into_iter()
        .filter(|p| super::image_format(p) == "qcow2")
        .collect()
}

/// `qemu-img check` must be clean (no errors, no corruption, no leaks) on every qcow2 file under
/// `dir`. The files must not be in use.
pub fn assert_all_clean(dir: &Path, context: &str) {
    for f in qcow2_files(dir) {
        assert_check_clean(&f, context);
    }
}

// ---------------------------------------------------------------------------------------------
// Digests
// ---------------------------------------------------------------------------------------------

/// sha256 of a file's bytes (`sha256sum`).
pub fn digest(path: &Path) -> String {
    let out = run(Command::new("sha256sum").arg(path));
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string()
}

/// Digest and size of every file under `dir` ([`image_files`]), by path relative to `dir`.
pub fn digests(dir: &Path) -> BTreeMap<String, String> {
    image_files(dir)
        .into_iter()
        .map(|p| {
            let rel = p.strip_prefix(dir).unwrap().display().to_string();
            (rel, digest(&p))
        })
        .collect()
}

/// Panics with the files that differ between two [`digests`] maps.
pub fn assert_digests_equal(
    before: &BTreeMap<String, String>,
    after: &BTreeMap<String, String>,
    context: &str,
) {
    if before == after {
        return;
    }
    let mut diffs = Vec::new();
    let keys: BTreeSet<&String> = before.keys().chain(after.keys()).collect();
    for k in keys {
        match (before.get(k), after.get(k)) {
            (Some(a), Some(b)) if a == b => {}
            (Some(_), Some(_)) => diffs.push(format!("{k} changed")),
            (Some(_), None) => diffs.push(format!("{k} disappeared")),
            (None, Some(_)) => diffs.push(format!("{k} appeared")),
            (None, None) => {}
        }
    }
    panic!("{context}: files changed: {}", diffs.join(", "));
}

// ---------------------------------------------------------------------------------------------
// qemu-img info --backing-chain
// ---------------------------------------------------------------------------------------------

/// One layer of `qemu-img info --backing-chain --output=json`, with paths made relative to the
/// chain's folder so that a chain and its copy compare equal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainLayer {
    /// The file, relative to the root folder (canonical: `sub/../base.qcow2` is `base.qcow2`).
    pub file: String,
    pub format: String,
    pub virtual_size: u64,
    pub cluster_size: Option<u64>,
    /// The backing file name as stored in the header.
    pub backing_name: Option<String>,
    /// The backing file it resolves to, relative to the root folder.
    pub backing_file: Option<String>,
    /// The backing format recorded in the header.
    pub backing_format: Option<String>,
}

fn rel_canonical(path: &str, root: &Path) -> String {
    let root = root.canonicalize().unwrap();
    let p = Path::new(path);
    match p.canonicalize() {
        Ok(c) => match c.strip_prefix(&root) {
            Ok(r) => r.display().to_string(),
            Err(_) => c.display().to_string(),
        },
        Err(_) => format!("<missing: {path}>"),
    }
}

/// The chain of `top` per `qemu-img info -U --backing-chain --output=json`.
pub fn chain_of(top: &Path, root: &Path) -> Vec<ChainLayer> {
    let out = qemu_img(&["info", "-U", "--backing-chain", "--output=json", s(top)]);
    let v: serde_json::Value = serde_json::from_str(&out).expect("qemu-img info JSON");
    v.as_array()
        .expect("--backing-chain gives an array")
        .iter()
        .map(|l| {
            let st = |k: &str| l[k].as_str().map(str::to_owned);
            ChainLayer {
                file: rel_canonical(l["filename"].as_str().expect("filename"), root),
                format: st("format").unwrap_or_default(),
                virtual_size: l["virtual-size"].as_u64().expect("virtual-size"),
                cluster_size: l["cluster-size"].as_u64(),
                backing_name: st("backing-filename"),
                backing_file: st("full-backing-filename").map(|f| rel_canonical(&f, root)),
                backing_format: st("backing-filename-format"),
            }
        })
        .collect()
}

/// The product's chain must equal the oracle's: same files (relative to their folders), formats,
/// sizes, cluster sizes, backing formats, resolved backing files, and (with `exact_names`) the
/// backing names stored in the headers.
pub fn assert_same_chain(
    got_top: &Path,
    got_root: &Path,
    want_top: &Path,
    want_root: &Path,
    exact_names: bool,
) {
    let mut got = chain_of(got_top, got_root);
    let mut want = chain_of(want_top, want_root);
    if !exact_names {
        for l in got.iter_mut().chain(want.iter_mut()) {
            l.backing_name = None;
        }
    }
    assert!(
        got == want,
        "qemu-img info --backing-chain of the result differs from the qemu-img oracle:\n\
         snapfs: {got:#?}\noracle: {want:#?}"
    );
}

/// The files of `top`'s chain, relative to `root`, top first.
pub fn chain_files(top: &Path, root: &Path) -> Vec<String> {
    chain_of(top, root).into_iter().map(|l| l.file).collect()
}

/// The ranges the image's active state maps itself (data or zero clusters; `qemu-img map`
/// entries at depth 0 that are present).
pub fn top_own_ranges(top: &Path) -> super::Ranges {
    let out = qemu_img(&["map", "-U", "--output=json", s(top)]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let mut r = Vec::new();
    for e in v.as_array().unwrap() {
        if e["depth"].as_u64() == Some(0) && e["present"].as_bool() == Some(true) {
            let st = e["start"].as_u64().unwrap();
            r.push((st, st + e["length"].as_u64().unwrap()));
        }
    }
    super::merge_ranges(r)
}

/// Whether the top image's active state maps nothing itself (per `qemu-img map`: every range
/// comes from a backing file or is unallocated all the way down).
pub fn top_is_empty(top: &Path) -> Result<(), String> {
    let out = qemu_img(&["map", "-U", "--output=json", s(top)]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    for e in v.as_array().unwrap() {
        if e["depth"].as_u64() == Some(0) && e["present"].as_bool() == Some(true) {
            return Err(format!(
                "{} still maps [{:#x}, +{:#x}) itself: {e}",
                top.display(),
                e["start"].as_u64().unwrap_or(0),
                e["length"].as_u64().unwrap_or(0)
            ));
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Views
// ---------------------------------------------------------------------------------------------

/// Expected files of a mount: name relative to the mount point (`live.raw`,
/// `snapshots/base.raw`) and a raw file with the expected content.
pub type Oracles = Vec<(String, View, PathBuf)>;

/// Builds [`Oracles`] from views of the oracle chain.
pub fn oracles_of(views: &[(&str, View)]) -> Oracles {
    views
        .iter()
        .map(|(n, v)| (n.to_string(), v.clone(), v.oracle_raw()))
        .collect()
}

/// `snapshots/` must list exactly the oracles' snapshot names, and every file must equal its
/// oracle (size, content, no write bits on snapshots). Panics with every problem found.
pub fn assert_views(m: &Mount, oracles: &Oracles, context: &str) {
    let mut problems = Vec::new();
    let want: BTreeSet<String> = oracles
        .iter()
        .filter_map(|(n, _, _)| n.strip_prefix("snapshots/").map(str::to_owned))
        .collect();
    let got = m.snapshot_names();
    if got != want {
        problems.push(format!(
            "snapshots/ lists {got:?}, expected {want:?} (missing: {:?}, unexpected: {:?})",
            want.difference(&got).collect::<Vec<_>>(),
            got.difference(&want).collect::<Vec<_>>()
        ));
    }
    for (name, view, oracle) in oracles {
        problems.extend(check_view_file(&m.path().join(name), view, oracle));
    }
    if !problems.is_empty() {
        panic!(
            "{context}: {} problem(s):\n- {}\ncontrol/status:\n{}\nsnapfs stderr:\n{}",
            problems.len(),
            problems.join("\n- "),
            status_text(m.path()),
            m.stderr_text()
        );
    }
}

/// `qemu-img convert` of `image` (the active disk through its chain) must equal `want`.
pub fn assert_content(image: &Path, want: &Path, context: &str) {
    let got = super::convert_to_raw(image, None);
    let r = compare_files(&got, want);
    fs::remove_file(&got).ok();
    if let Err(e) = r {
        panic!(
            "{context}: qemu-img convert of {} differs from the expected content: {e}",
            image.display()
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Status lines with details
// ---------------------------------------------------------------------------------------------

/// A finished command's line in `control/status`: `TIME LABEL: ok`, `TIME LABEL: ok (DETAIL)`
/// or `TIME LABEL: error: MESSAGE`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub label: String,
    /// `Ok(detail)` or `Err(message)`.
    pub result: Result<Option<String>, String>,
}

/// Parses a finished command's status line (`None` for progress lines and other shapes).
pub fn parse_outcome(line: &str) -> Option<Outcome> {
    let (ts, rest) = line.split_once(' ')?;
    if !ts.ends_with('Z') || super::parse_rfc3339(ts).is_none() {
        return None;
    }
    if let Some((label, msg)) = rest.split_once(": error: ") {
        return Some(Outcome {
            label: label.to_string(),
            result: Err(msg.to_string()),
        });
    }
    if let Some(label) = rest.strip_suffix(": ok") {
        return Some(Outcome {
            label: label.to_string(),
            result: Ok(None),
        });
    }
    let (label, detail) = rest.split_once(": ok (")?;
    let detail = detail.strip_suffix(')')?;
    Some(Outcome {
        label: label.to_string(),
        result: Ok(Some(detail.to_string())),
    })
}

/// The last finished command's outcome in `control/status` (panics if there is none).
pub fn last_outcome(mp: &Path) -> Outcome {
    let text = status_text(mp);
    text.lines()
        .rev()
        .find_map(parse_outcome)
        .unwrap_or_else(|| panic!("no command outcome in control/status:\n{text}"))
}

/// The last outcome must be `LABEL: ok` or `LABEL: ok (DETAIL)`; returns the detail.
pub fn assert_outcome_ok(mp: &Path, label: &str) -> Option<String> {
    let o = last_outcome(mp);
    match (&o.label, &o.result) {
        (l, Ok(d)) if l == label => d.clone(),
        _ => panic!(
            "the last control/status outcome should be `{label}: ok`, got {o:?}; all:\n{}",
            status_text(mp)
        ),
    }
}

/// The last outcome must be `LABEL: error: MESSAGE`; returns the message.
pub fn assert_outcome_error(mp: &Path, label: &str) -> String {
    let o = last_outcome(mp);
    match (&o.label, &o.result) {
        (l, Err(m)) if l == label && !m.trim().is_empty() => m.clone(),
        _ => panic!(
            "the last control/status outcome should be `{label}: error: MESSAGE`, got {o:?}; all:\n{}",
            status_text(mp)
        ),
    }
}

/// A progress line `LABEL: P% (A of B)`: label and percentage.
pub fn parse_progress(line: &str) -> Option<(String, u64)> {
    let (label, rest) = line.rsplit_once(": ")?;
    let (pct, rest) = rest.split_once("% (")?;
    let pct: u64 = pct.trim().parse().ok()?;
    let inner = rest.strip_suffix(')')?;
    if !inner.contains(" of ") {
        return None;
    }
    Some((label.to_string(), pct))
}

/// Reads `control/status` every `interval` in a thread, keeping every line seen (in order, with
/// the time it was first seen), until stopped.
pub struct StatusPoller {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<Vec<(Instant, String)>>>,
}

impl StatusPoller {
    pub fn start(mp: &Path, interval: Duration) -> StatusPoller {
        let stop = Arc::new(AtomicBool::new(false));
        let path = mp.join("control").join("status");
        let flag = stop.clone();
        let handle = std::thread::spawn(move || {
            let mut seen: Vec<(Instant, String)> = Vec::new();
            let mut known = BTreeSet::new();
            while !flag.load(Ordering::Acquire) {
                if let Ok(text) = fs::read_to_string(&path) {
                    for l in text.lines() {
                        if known.insert(l.to_string()) {
                            seen.push((Instant::now(), l.to_string()));
                        }
                    }
                }
                std::thread::sleep(interval);
            }
            seen
        });
        StatusPoller {
            stop,
            handle: Some(handle),
        }
    }

    /// Stops polling; returns the distinct lines seen, in the order first seen.
    pub fn finish(mut self) -> Vec<(Instant, String)> {
        self.stop.store(true, Ordering::Release);
        self.handle.take().unwrap().join().expect("status poller")
    }
}

impl Drop for StatusPoller {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// A pseudo-terminal
// ---------------------------------------------------------------------------------------------

/// What [`run_in_pty`] saw.
#[derive(Debug)]
pub struct PtyOutput {
    /// `None` when the command did not finish in time (it was killed).
    pub status: Option<ExitStatus>,
    /// Everything written to the terminal (stdout and stderr), control sequences included.
    pub output: String,
}

/// Runs `cmd` with stdout and stderr on a new pseudo-terminal (120x40) and collects what it
/// writes there. Killed (SIGKILL) after `limit`.
pub fn run_in_pty(mut cmd: Command, limit: Duration) -> PtyOutput {
    // SAFETY: plain libc calls on descriptors this function owns.
    let master = unsafe { libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY) };
    assert!(
        master >= 0,
        "posix_openpt: {}",
        std::io::Error::last_os_error()
    );
    let master = unsafe { File::from_raw_fd(master) };
    let mfd = master.as_raw_fd();
    assert_eq!(unsafe { libc::grantpt(mfd) }, 0, "grantpt");
    assert_eq!(unsafe { libc::unlockpt(mfd) }, 0, "unlockpt");
    let mut name = [0 as libc::c_char; 128];
    assert_eq!(
        unsafe { libc::ptsname_r(mfd, name.as_mut_ptr(), name.len()) },
        0,
        "ptsname_r"
    );
    let slave_path = unsafe { std::ffi::CStr::from_ptr(name.as_ptr()) }
        .to_string_lossy()
        .into_owned();
    let ws = libc::winsize {
        ws_row: 40,
        ws_col: 120,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    unsafe {
        libc::ioctl(mfd, libc::TIOCSWINSZ, &ws);
    }
    let slave = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags_noctty()
        .open(&slave_path)
        .unwrap_or_else(|e| panic!("open {slave_path}: {e}"));
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(slave.try_clone().unwrap())
        .stderr(slave.try_clone().unwrap())
        .spawn()
        .expect("spawn command on the pty");
    // Only the child may keep the terminal open: the master reads EOF (EIO) when it exits.
    drop(cmd);
    drop(slave);
    let mut reader = master.try_clone().unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let stop_reader = stop.clone();
    let collector = std::thread::spawn(move || {
        let mut all = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            let mut pfd = libc::pollfd {
                fd: reader.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd.
            let n = unsafe { libc::poll(&mut pfd, 1, 100) };
            if n == 0 {
                if stop_reader.load(Ordering::Acquire) {
                    break;
                }
                continue;
            }
            match reader.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => all.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                // EIO once the last slave descriptor is closed
                Err(_) => break,
            }
        }
        all
    });
    let t0 = Instant::now();
    let status = loop {
        if let Ok(Some(st)) = child.try_wait() {
            break Some(st);
        }
        if t0.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    // whatever is still buffered arrives within moments; a descendant holding the terminal
    // open must not hang the test
    std::thread::sleep(Duration::from_millis(200));
    stop.store(true, Ordering::Release);
    let output = collector.join().unwrap();
    drop(master);
    PtyOutput {
        status,
        output: String::from_utf8_lossy(&output).into_owned(),
    }
}

trait NoCtty {
    fn custom_flags_noctty(&mut self) -> &mut Self;
}

impl NoCtty for fs::OpenOptions {
    fn custom_flags_noctty(&mut self) -> &mut Self {
        use std::os::unix::fs::OpenOptionsExt;
        self.custom_flags(libc::O_NOCTTY)
    }
}

// ---------------------------------------------------------------------------------------------
// Misc
// ---------------------------------------------------------------------------------------------

/// The bytes `qemu-io -c "write -P PAT OFF LEN"` writes.
pub fn pattern(pat: u8, len: usize) -> Vec<u8> {
    vec![pat; len]
}

/// The content of internal snapshot `snapshot` (id or tag) of `image` as qemu reads it after `qemu-img snapshot
/// -a` on a copy (next to the image, so relative backing names resolve): the snapshot's own size
/// and clusters over the image's current backing chain. Unlike `qemu-img convert -l`, this stays
/// right when the image was shrunk after the snapshot was taken.
pub fn applied_snapshot_raw(image: &Path, snapshot: &str) -> PathBuf {
    let copy = super::applied_snapshot_copy(image, snapshot);
    let raw = super::convert_to_raw(&copy, None);
    fs::remove_file(&copy).ok();
    raw
}
