//! The power-cut simulator (issue 16 point 3): a [`Storage`] that records every write, length
//! change, hole punch and flush of a real workload run through the engine, and the crash states
//! such a recording allows, built as dm-log-writes and CrashMonkey model a power cut.
//!
//! # The crash model
//!
//! The recording is one log of every file's operations in completion order. A crash happens
//! just before one of its flushes completes (or at its end). For each file, every operation
//! before that file's last completed flush survives; of the operations after it, any subset
//! survives (the host file system and the disk may reorder them freely), and one of those writes
//! may be torn: only some of its 512-byte sectors land. This is exactly what the storage
//! contract (`src/qcow2/storage/mod.rs`) allows, so an engine that follows its own rules must
//! come out of every such state consistent. A flush of one file orders nothing in another.
//! A file the workload creates (an external overlay) exists in a state only once its first
//! flush completed: the engine writes a new image whole and flushes it before it links the
//! name (`src/qcow2/create.rs`).
//!
//! # The checks
//!
//! Each state is written out (every file of the chain under its own name, so that relative
//! backing names resolve) and judged by the oracles:
//! - `qemu-img check --output=json` of every image file: no corruption and no check errors
//!   (leaked clusters are what a crash may cost, as with QEMU); an image that no longer opens is
//!   corrupt;
//! - the acknowledged data: the guest view of the top (`qemu-img convert -O raw`) must show, in
//!   every 512-byte sector the workload did not write since its last acknowledgement (a completed
//!   flush, or the end of a command), what that acknowledgement promised (or, where a command was
//!   under way, what the next one promises: a snapshot operation may have switched over);
//! - every internal snapshot that exists before and after the crash window reads back whole.
//!
//! A sector the guest wrote after its last flush may read as anything, as on QEMU (which writes
//! the data of an allocating write without ordering it before the L2 entry).
//!
//! The seed comes from `SNAPFS_TEST_SEED` (or the test's name) and is printed;
//! `SNAPFS_TEST_POWERCUT_KEEP=DIR` keeps the files of failing states there; the number of states
//! checked per workload is `SNAPFS_TEST_POWERCUT_STATES` (default in the caller).

use std::collections::{BTreeSet, HashMap, HashSet};
use std::hash::{Hash, Hasher};
use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use parking_lot::Mutex;
use snapfs::qcow2::storage::{Allocation, Storage};

use super::write_support::Rng;

/// The smallest unit a disk writes whole.
pub const SECTOR: u64 = 512;

/// One recorded operation.
#[derive(Debug, Clone)]
pub enum Op {
    Write {
        file: usize,
        offset: u64,
        bytes: Arc<[u8]>,
    },
    SetLen {
        file: usize,
        len: u64,
    },
    Punch {
        file: usize,
        offset: u64,
        len: u64,
    },
    Flush {
        file: usize,
    },
}

impl Op {
    pub fn file(&self) -> usize {
        match self {
            Op::Write { file, .. }
            | Op::SetLen { file, .. }
            | Op::Punch { file, .. }
            | Op::Flush { file } => *file,
        }
    }
}

/// What the workload promised at one acknowledgement.
#[derive(Debug, Clone)]
pub struct Ack {
    /// How many operations the log held when the acknowledgement was given.
    pub at: usize,
    /// What the guest reads from the top.
    pub disk: Arc<Vec<u8>>,
    /// The file (index) the guest view is read from: the top of the chain.
    pub top: usize,
    /// Internal snapshots of the top and their contents.
    pub snapshots: Arc<Vec<(String, Arc<Vec<u8>>)>>,
    /// Sectors the guest wrote between the previous acknowledgement and this one.
    pub written: Arc<BTreeSet<u64>>,
    /// What was done since the previous acknowledgement, for messages.
    pub what: String,
}

/// A recording of every file of one workload.
#[derive(Debug, Default)]
pub struct Recording {
    /// File name and the bytes it held when it was first opened (durable: the test made them
    /// with qemu-img and synced them, or the engine created them whole and synced).
    files: Mutex<Vec<(PathBuf, Arc<Vec<u8>>)>>,
    ops: Mutex<Vec<Op>>,
    acks: Mutex<Vec<Ack>>,
    /// A full host file system (see [`Recording::fill_disk`]): the bytes it has left for
    /// writes into holes or past the end of a file. `None`: room without limit.
    room: Mutex<Option<u64>>,
}

impl Recording {
    pub fn new() -> Arc<Recording> {
        Arc::new(Recording::default())
    }

    /// The `Interpose` for `Chain::open_interposed`: every file's storage is recorded.
    pub fn interpose(self: &Arc<Self>) -> snapfs::chain::Interpose {
        let rec = self.clone();
        Arc::new(move |path: &Path, storage: Box<dyn Storage>| {
            Box::new(Recorder::new(rec.clone(), path, storage)) as Box<dyn Storage>
        })
    }

    /// Index of the file named `path` (it must have been opened).
    pub fn file_index(&self, path: &Path) -> usize {
        self.files
            .lock()
            .iter()
            .position(|(p, _)| p.file_name() == path.file_name())
            .unwrap_or_else(|| panic!("{} was never opened through the recorder", path.display()))
    }

    pub fn ops(&self) -> usize {
        self.ops.lock().len()
    }

    /// Records an acknowledgement: everything logged so far must survive.
    pub fn ack(&self, ack: Ack) {
        self.acks.lock().push(ack);
    }

    pub fn acks(&self) -> Vec<Ack> {
        self.acks.lock().clone()
    }

    fn push(&self, op: Op) {
        self.ops.lock().push(op);
    }

    /// From now on the host file system is full: a write that needs new space (bytes in a hole
    /// or past the end of the file) fails with ENOSPC, as on a full disk, until holes punched
    /// since then gave that much space back. Growing a file's length costs nothing (sparse).
    pub fn fill_disk(&self) {
        *self.room.lock() = Some(0);
    }

    /// The writes logged from operation `at` on: (offset, length) each.
    pub fn writes_since(&self, at: usize) -> Vec<(u64, usize)> {
        self.ops.lock()[at..]
            .iter()
            .filter_map(|op| match op {
                Op::Write { offset, bytes, .. } => Some((*offset, bytes.len())),
                _ => None,
            })
            .collect()
    }

    /// Room without limit again.
    pub fn free_disk(&self) {
        *self.room.lock() = None;
    }
}

/// The bytes of `len` at `offset` of `storage` that are holes or lie past its end: what a
/// write there takes from the host file system.
fn new_space(storage: &dyn Storage, offset: u64, len: u64) -> io::Result<u64> {
    let end = offset + len;
    let file_len = storage.len()?;
    let mut need = end.saturating_sub(file_len.max(offset));
    let mut at = offset;
    while at < end.min(file_len) {
        let (kind, n) = storage.allocation(at, end.min(file_len) - at)?;
        if matches!(kind, Allocation::Hole) {
            need += n;
        }
        at += n.max(1);
    }
    Ok(need)
}

/// A storage that records what reaches the storage it wraps.
#[derive(Debug)]
pub struct Recorder {
    inner: Box<dyn Storage>,
    file: usize,
    rec: Arc<Recording>,
}

impl Recorder {
    fn new(rec: Arc<Recording>, path: &Path, inner: Box<dyn Storage>) -> Recorder {
        let len = inner.len().expect("length of a recorded file");
        let mut bytes = vec![0u8; len as usize];
        inner.read_at(&mut bytes, 0).expect("read a recorded file");
        let mut files = rec.files.lock();
        let file = match files.iter().position(|(p, _)| p == path) {
            Some(i) => i,
            None => {
                files.push((path.to_owned(), Arc::new(bytes)));
                files.len() - 1
            }
        };
        drop(files);
        Recorder { inner, file, rec }
    }
}

impl Storage for Recorder {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        {
            let mut room = self.rec.room.lock();
            if let Some(left) = *room {
                let need = new_space(self.inner.as_ref(), offset, buf.len() as u64)?;
                if need > left {
                    return Err(io::Error::from_raw_os_error(libc::ENOSPC));
                }
                *room = Some(left - need);
            }
        }
        self.inner.write_at(buf, offset)?;
        self.rec.push(Op::Write {
            file: self.file,
            offset,
            bytes: Arc::from(buf),
        });
        Ok(())
    }
    fn flush(&self) -> io::Result<()> {
        self.inner.flush()?;
        self.rec.push(Op::Flush { file: self.file });
        Ok(())
    }
    fn len(&self) -> io::Result<u64> {
        self.inner.len()
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.inner.set_len(len)?;
        self.rec.push(Op::SetLen {
            file: self.file,
            len,
        });
        Ok(())
    }
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        let mut room = self.rec.room.lock();
        let freed = match *room {
            Some(_) => len - new_space(self.inner.as_ref(), offset, len)?,
            None => 0,
        };
        self.inner.punch_hole(offset, len)?;
        if let Some(left) = *room {
            *room = Some(left + freed);
        }
        drop(room);
        self.rec.push(Op::Punch {
            file: self.file,
            offset,
            len,
        });
        Ok(())
    }
    fn start_writeback(&self) {
        self.inner.start_writeback()
    }
    fn allocation(&self, offset: u64, max_len: u64) -> io::Result<(Allocation, u64)> {
        self.inner.allocation(offset, max_len)
    }
    fn is_writable(&self) -> bool {
        self.inner.is_writable()
    }
    fn fixed_size(&self) -> bool {
        self.inner.fixed_size()
    }
    fn lock_for_writing(&self) -> Result<(), snapfs::qcow2::lock::LockError> {
        self.inner.lock_for_writing()
    }
    fn unlock_writing(&self) -> Result<(), snapfs::qcow2::lock::LockError> {
        self.inner.unlock_writing()
    }
    fn host_file(&self) -> Option<&std::fs::File> {
        self.inner.host_file()
    }
}

/// One crash state: a crash point and which of the operations pending there survive.
#[derive(Debug, Clone)]
struct StateSpec {
    /// Operations `0..at` completed before the crash.
    at: usize,
    /// Indices of pending operations that survive (sorted).
    kept: Vec<usize>,
    /// A kept write that lands torn: its index and which of its sectors land.
    torn: Option<(usize, Vec<bool>)>,
}

/// What the checks found.
#[derive(Debug, Default)]
pub struct Verdict {
    pub workload: String,
    pub crash_points: usize,
    pub states: usize,
    pub distinct: usize,
    pub corrupt: usize,
    pub data_lost: usize,
    pub leaky: usize,
    pub failures: Vec<String>,
}

impl Verdict {
    pub fn summary(&self) -> String {
        format!(
            "powercut {}: {} crash points, {} states ({} distinct): {} corrupt, {} with acknowledged data lost, {} with leaked clusters only",
            self.workload,
            self.crash_points,
            self.states,
            self.distinct,
            self.corrupt,
            self.data_lost,
            self.leaky
        )
    }
}

fn hash_of(parts: &[&[u8]]) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    for p in parts {
        p.len().hash(&mut h);
        p.hash(&mut h);
    }
    h.finish()
}

/// Applies `op` to the bytes of its file (`torn`: which sectors of a write land).
fn apply(file: &mut Vec<u8>, op: &Op, torn: Option<&[bool]>) {
    match op {
        Op::Write { offset, bytes, .. } => {
            let end = *offset as usize + bytes.len();
            if file.len() < end {
                file.resize(end, 0);
            }
            match torn {
                None => file[*offset as usize..end].copy_from_slice(bytes),
                Some(lands) => {
                    let mut pos = *offset;
                    let stop = *offset + bytes.len() as u64;
                    let mut i = 0;
                    while pos < stop {
                        let next = ((pos / SECTOR + 1) * SECTOR).min(stop);
                        if lands[i] {
                            let from = (pos - offset) as usize;
                            let to = (next - offset) as usize;
                            file[pos as usize..next as usize].copy_from_slice(&bytes[from..to]);
                        }
                        pos = next;
                        i += 1;
                    }
                }
            }
        }
        Op::SetLen { len, .. } => file.resize(*len as usize, 0),
        Op::Punch { offset, len, .. } => {
            let start = (*offset as usize).min(file.len());
            let end = (offset + len).min(file.len() as u64) as usize;
            file[start..end].fill(0);
        }
        Op::Flush { .. } => {}
    }
}

fn sectors_of(op: &Op) -> usize {
    match op {
        Op::Write { offset, bytes, .. } => {
            let end = offset + bytes.len() as u64;
            (end.div_ceil(SECTOR) - offset / SECTOR) as usize
        }
        _ => 0,
    }
}

/// How the states of a recording are chosen and judged.
pub struct Simulator {
    pub workload: String,
    pub rec: Arc<Recording>,
    pub seed: u64,
    /// About this many states are checked.
    pub states: usize,
    pub threads: usize,
}

/// Per-run caches shared by the checking threads.
struct Shared {
    seen: Mutex<HashSet<u64>>,
    checks: Mutex<HashMap<u64, CheckResult>>,
    verdict: Mutex<Verdict>,
}

#[derive(Debug, Clone)]
enum CheckResult {
    Clean,
    Leaks(u64),
    Bad(String),
}

impl Simulator {
    /// Builds the states and checks them; returns what was found.
    pub fn run(&self) -> Verdict {
        let ops: Vec<Op> = self.rec.ops.lock().clone();
        let files: Vec<(PathBuf, Arc<Vec<u8>>)> = self.rec.files.lock().clone();
        let acks = self.rec.acks();
        assert!(
            acks.len() >= 2,
            "{}: the workload acknowledged nothing",
            self.workload
        );
        // Crash points: before each flush completes, and the end of the log.
        let mut points: Vec<usize> = ops
            .iter()
            .enumerate()
            .filter(|(_, op)| matches!(op, Op::Flush { .. }))
            .map(|(i, _)| i)
            .collect();
        points.push(ops.len());
        points.dedup();
        let mut rng = Rng::new(self.seed);
        let per_point = self.states.div_ceil(points.len()).max(2);
        let mut specs = Vec::new();
        for &at in &points {
            let pending = pending_ops(&ops, at);
            // Everything, nothing, then random subsets (some with a torn write).
            for variant in 0..per_point {
                let kept: Vec<usize> = match variant {
                    0 => pending.clone(),
                    1 => Vec::new(),
                    _ => pending.iter().copied().filter(|_| rng.chance(50)).collect(),
                };
                let torn_candidates: Vec<usize> = kept
                    .iter()
                    .copied()
                    .filter(|&i| sectors_of(&ops[i]) > 1)
                    .collect();
                let torn = if variant >= 2 && !torn_candidates.is_empty() && rng.chance(40) {
                    let i = torn_candidates[rng.below(torn_candidates.len() as u64) as usize];
                    let lands: Vec<bool> =
                        (0..sectors_of(&ops[i])).map(|_| rng.chance(50)).collect();
                    Some((i, lands))
                } else {
                    None
                };
                specs.push(StateSpec { at, kept, torn });
                if pending.is_empty() {
                    break;
                }
            }
        }
        let shared = Shared {
            seen: Mutex::new(HashSet::new()),
            checks: Mutex::new(HashMap::new()),
            verdict: Mutex::new(Verdict {
                workload: self.workload.clone(),
                crash_points: points.len(),
                states: specs.len(),
                ..Verdict::default()
            }),
        };
        let next = AtomicUsize::new(0);
        let scratch_root = scratch_root();
        std::thread::scope(|s| {
            for _ in 0..self.threads.max(1) {
                s.spawn(|| {
                    let dir = tempfile::Builder::new()
                        .prefix("snapfs-powercut-")
                        .tempdir_in(&scratch_root)
                        .expect("scratch dir");
                    loop {
                        let n = next.fetch_add(1, Ordering::Relaxed);
                        let Some(spec) = specs.get(n) else { break };
                        self.check_state(n, spec, &ops, &files, &acks, dir.path(), &shared);
                    }
                });
            }
        });
        let v = shared.verdict.into_inner();
        eprintln!("{} (seed {:#x})", v.summary(), self.seed);
        v
    }

    #[allow(clippy::too_many_arguments)]
    fn check_state(
        &self,
        n: usize,
        spec: &StateSpec,
        ops: &[Op],
        files: &[(PathBuf, Arc<Vec<u8>>)],
        acks: &[Ack],
        dir: &Path,
        shared: &Shared,
    ) {
        // Build the files.
        let kept: HashSet<usize> = spec.kept.iter().copied().collect();
        let durable = durable_bounds(ops, spec.at, files.len());
        let mut contents: Vec<Vec<u8>> = files.iter().map(|(_, b)| b.as_ref().clone()).collect();
        // A file the workload creates gets its name only once its first flush completed (the
        // engine writes a new image whole, flushes it, then links it: `qcow2::create`); before
        // that the crash leaves no such file.
        let born: Vec<bool> = (0..files.len())
            .map(|f| {
                !files[f].1.is_empty()
                    || ops[..spec.at]
                        .iter()
                        .any(|op| matches!(op, Op::Flush { file } if *file == f))
            })
            .collect();
        for (i, op) in ops[..spec.at].iter().enumerate() {
            let f = op.file();
            if born[f] && (i < durable[f] || kept.contains(&i)) {
                let torn = spec
                    .torn
                    .as_ref()
                    .filter(|(t, _)| *t == i)
                    .map(|(_, l)| l.as_slice());
                apply(&mut contents[f], op, torn);
            }
        }
        let parts: Vec<&[u8]> = contents.iter().map(|c| c.as_slice()).collect();
        if !shared.seen.lock().insert(hash_of(&parts)) {
            return;
        }
        shared.verdict.lock().distinct += 1;
        // Which acknowledgements frame the crash.
        let j = acks.iter().rposition(|a| a.at <= spec.at).unwrap_or(0);
        let before = &acks[j];
        let after = acks.get(j + 1);
        let paths: Vec<PathBuf> = files
            .iter()
            .map(|(p, _)| dir.join(p.file_name().expect("file name")))
            .collect();
        for (p, c) in paths.iter().zip(&contents) {
            std::fs::write(p, c).expect("write a crash state");
        }
        let mut problems = Vec::new();
        let mut corrupt = false;
        let mut leaks = false;
        for (f, p) in paths.iter().enumerate() {
            if !is_qcow2(&contents[f]) {
                continue;
            }
            let key = hash_of(&[&contents[f]]);
            let cached = shared.checks.lock().get(&key).cloned();
            let result = cached.unwrap_or_else(|| {
                let r = qemu_check(p);
                shared.checks.lock().insert(key, r.clone());
                r
            });
            match result {
                CheckResult::Clean => {}
                CheckResult::Leaks(_) => leaks = true,
                CheckResult::Bad(why) => {
                    corrupt = true;
                    problems.push(format!("{}: {why}", p.display()));
                }
            }
        }
        let mut lost = false;
        if !corrupt {
            match self.check_data(before, after, &paths, dir) {
                Ok(()) => {}
                Err(why) => {
                    lost = true;
                    problems.push(why);
                }
            }
        }
        let mut v = shared.verdict.lock();
        if corrupt {
            v.corrupt += 1;
        } else if lost {
            v.data_lost += 1;
        } else if leaks {
            v.leaky += 1;
        }
        if !problems.is_empty() {
            let pending = pending_ops(ops, spec.at);
            let dropped: Vec<String> = pending
                .iter()
                .filter(|i| !kept.contains(i))
                .map(|&i| describe_op(&ops[i], files))
                .collect();
            let torn = spec
                .torn
                .as_ref()
                .map(|(i, l)| format!("{} torn ({:?})", describe_op(&ops[*i], files), l))
                .unwrap_or_default();
            let kept_at = self.keep_failure(n, &paths);
            if v.failures.len() < 5 {
                v.failures.push(format!(
                    "state {n}: crash before op {} of {} (after ack {j}: {}; next: {}); dropped {} of {} pending ops [{}] {torn}{kept_at}\n  {}",
                    spec.at,
                    ops.len(),
                    before.what,
                    after.map(|a| a.what.as_str()).unwrap_or("-"),
                    dropped.len(),
                    pending.len(),
                    dropped.join(", "),
                    problems.join("\n  ")
                ));
            }
        }
    }

    /// The guest view and the snapshots of the state in `dir` against the acknowledgements.
    fn check_data(
        &self,
        before: &Ack,
        after: Option<&Ack>,
        paths: &[PathBuf],
        dir: &Path,
    ) -> Result<(), String> {
        let top = &paths[before.top];
        let out = dir.join("view.raw");
        let got = convert(top, None, &out)?;
        let sizes: Vec<usize> = std::iter::once(before.disk.len())
            .chain(after.map(|a| a.disk.len()))
            .collect();
        if !sizes.contains(&got.len()) {
            return Err(format!(
                "{}: the disk reads {} bytes, acknowledged {:?}",
                top.display(),
                got.len(),
                sizes
            ));
        }
        let empty = BTreeSet::new();
        let written = after.map(|a| a.written.as_ref()).unwrap_or(&empty);
        let mut bad = Vec::new();
        for s in 0..(got.len() as u64).div_ceil(SECTOR) {
            if written.contains(&s) {
                continue;
            }
            let range = (s * SECTOR) as usize..(((s + 1) * SECTOR) as usize).min(got.len());
            let sector = &got[range.clone()];
            let matches = |disk: &Vec<u8>| disk.get(range.clone()).is_some_and(|d| d == sector);
            if !(matches(&before.disk) || after.is_some_and(|a| matches(&a.disk))) {
                bad.push(s);
            }
        }
        if !bad.is_empty() {
            return Err(format!(
                "{}: {} acknowledged sectors read otherwise (first at byte {:#x})",
                top.display(),
                bad.len(),
                bad[0] * SECTOR
            ));
        }
        // Snapshots that exist on both sides of the window are never touched.
        for (name, content) in before.snapshots.iter() {
            let stays = after.is_none_or(|a| a.snapshots.iter().any(|(n, _)| n == name));
            if !stays || before.top != after.map(|a| a.top).unwrap_or(before.top) {
                continue;
            }
            let got =
                convert(top, Some(name), &out).map_err(|e| format!("snapshot {name}: {e}"))?;
            if got != **content {
                let at = got
                    .iter()
                    .zip(content.iter())
                    .position(|(a, b)| a != b)
                    .unwrap_or(got.len().min(content.len()));
                return Err(format!(
                    "{}: snapshot {name} reads otherwise from byte {at:#x} ({} bytes, acknowledged {})",
                    top.display(),
                    got.len(),
                    content.len()
                ));
            }
        }
        Ok(())
    }

    fn keep_failure(&self, n: usize, paths: &[PathBuf]) -> String {
        let Some(keep) = std::env::var_os("SNAPFS_TEST_POWERCUT_KEEP") else {
            return String::new();
        };
        let dir = PathBuf::from(keep).join(format!("{}-{n}", self.workload));
        let _ = std::fs::create_dir_all(&dir);
        for p in paths {
            if let Some(name) = p.file_name() {
                let _ = std::fs::copy(p, dir.join(name));
            }
        }
        format!(" (kept in {})", dir.display())
    }
}

/// For each file, how many operations of the log (from the start) are durable at crash point
/// `at`: everything before its last flush there.
fn durable_bounds(ops: &[Op], at: usize, files: usize) -> Vec<usize> {
    let mut bounds = vec![0; files];
    for (i, op) in ops[..at].iter().enumerate() {
        if let Op::Flush { file } = op {
            bounds[*file] = i;
        }
    }
    bounds
}

/// The operations before `at` that no flush made durable yet (flushes themselves excluded).
fn pending_ops(ops: &[Op], at: usize) -> Vec<usize> {
    let files = ops.iter().map(Op::file).max().map_or(0, |m| m + 1);
    let bounds = durable_bounds(ops, at, files);
    (0..at)
        .filter(|&i| i >= bounds[ops[i].file()] && !matches!(ops[i], Op::Flush { .. }))
        .collect()
}

fn describe_op(op: &Op, files: &[(PathBuf, Arc<Vec<u8>>)]) -> String {
    let name = |f: usize| {
        files[f]
            .0
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    };
    match op {
        Op::Write {
            file,
            offset,
            bytes,
        } => format!("{}: write {:#x}+{}", name(*file), offset, bytes.len()),
        Op::SetLen { file, len } => format!("{}: set_len {len:#x}", name(*file)),
        Op::Punch { file, offset, len } => format!("{}: punch {offset:#x}+{len}", name(*file)),
        Op::Flush { file } => format!("{}: flush", name(*file)),
    }
}

fn is_qcow2(bytes: &[u8]) -> bool {
    bytes.starts_with(b"QFI\xfb")
}

/// Where states are written: memory when the machine has it.
fn scratch_root() -> PathBuf {
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        shm.to_owned()
    } else {
        std::env::temp_dir()
    }
}

fn qemu_check(image: &Path) -> CheckResult {
    let out = Command::new("qemu-img")
        .args(["check", "-U", "--output=json"])
        .arg(image)
        .output()
        .expect("run qemu-img check");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let Ok(json) = serde_json::from_str::<serde_json::Value>(&stdout) else {
        return CheckResult::Bad(format!(
            "qemu-img check cannot check it (exit {:?}): {}",
            out.status.code(),
            stderr.trim()
        ));
    };
    let count = |k: &str| json[k].as_u64().unwrap_or(0);
    let corrupt_bit = json["corruptions"].is_null() && out.status.code() == Some(2);
    if count("corruptions") > 0 || count("check-errors") > 0 || corrupt_bit {
        let text = Command::new("qemu-img")
            .args(["check", "-U"])
            .arg(image)
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        let lines: Vec<&str> = text.lines().take(6).collect();
        return CheckResult::Bad(format!(
            "{} corruptions, {} check errors: {}",
            count("corruptions"),
            count("check-errors"),
            lines.join(" | ")
        ));
    }
    match out.status.code() {
        Some(0) => CheckResult::Clean,
        Some(3) => CheckResult::Leaks(count("leaks")),
        other => CheckResult::Bad(format!("qemu-img check exit {other:?}: {}", stderr.trim())),
    }
}

/// The guest view of `image` (or of its internal snapshot `snapshot`) as raw bytes.
fn convert(image: &Path, snapshot: Option<&str>, out: &Path) -> Result<Vec<u8>, String> {
    let mut cmd = Command::new("qemu-img");
    cmd.args(["convert", "-U", "-O", "raw"]);
    if let Some(name) = snapshot {
        cmd.arg("-l").arg(format!("snapshot.name={name}"));
    }
    let o = cmd
        .arg(image)
        .arg(out)
        .output()
        .map_err(|e| format!("run qemu-img convert: {e}"))?;
    if !o.status.success() {
        return Err(format!(
            "qemu-img convert {}: {}",
            image.display(),
            String::from_utf8_lossy(&o.stderr).trim()
        ));
    }
    std::fs::read(out).map_err(|e| format!("read {}: {e}", out.display()))
}
