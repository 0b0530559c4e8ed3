//! Crash consistency of the snapshot commands (issue 4, "How it is checked", third point):
//! `snapfs mount -f` runs as a child; a worker thread issues creates, deletes, reverts and
//! writes in a loop; the daemon is killed with SIGKILL at a random moment; the mount is taken
//! down (`umount`, then `umount -l`). Then `qemu-img check` must find no corruption (leaks are
//! allowed: a crash may leave unreferenced clusters), the image must not be marked corrupt, and
//! every snapshot `qemu-img snapshot -l` lists must be whole: its content equals what the live
//! disk held when its create was issued (a create that was in flight may or may not exist, but if
//! it does it is complete; a snapshot whose create completed must exist unless a delete of it
//! completed or was in flight). The next iteration mounts the same image again. The loop, the
//! kill and the `qemu-img check` are the shared crash harness (`tests/common/crash.rs`), strict:
//! any corruption fails, COPIED flags out of step with refcounts included (the snapshot commands
//! are switched in by one header write, see `src/qcow2/snapshot_ops.rs`).
//!
//! Unflushed live writes may be lost in a crash, so after each kill the model takes the live disk
//! as qemu-img reads it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use crate::common::crash::{CrashOptions, CrashWorkload, Kill, counters, crash_loop};
use crate::common::snapshot_support::{
    Rng, control, diff_bytes, errno_name, qemu_content, snapshot_tags,
};
use crate::common::*;

const SIZE: u64 = 8 * MIB;
const MAX_SNAPS: usize = 8;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    Create,
    Delete,
    Revert,
    Write,
}

#[derive(Debug, Clone)]
enum Op {
    Create(String),
    Delete(String),
    Revert(String),
    Write { off: u64, len: usize },
}

impl Op {
    fn kind(&self) -> Kind {
        match self {
            Op::Create(_) => Kind::Create,
            Op::Delete(_) => Kind::Delete,
            Op::Revert(_) => Kind::Revert,
            Op::Write { .. } => Kind::Write,
        }
    }
}

/// What the worker knows when it stops.
struct WorkerResult {
    /// Snapshots that must exist (completed creates, no completed delete), with their content.
    snaps: BTreeMap<String, Vec<u8>>,
    /// The op that was interrupted by the kill (failed with ENOTCONN/ECONNABORTED), with the
    /// content a create would have captured.
    interrupted: Option<(Op, Option<Vec<u8>>)>,
    /// An op that failed for another reason (a product error), with its errno.
    unexpected: Option<(Op, i32)>,
    completed: BTreeMap<Kind, u64>,
}

fn interrupted_errno(e: i32) -> bool {
    e == libc::ENOTCONN || e == libc::ECONNABORTED
}

fn worker(
    mp: PathBuf,
    mut live: Vec<u8>,
    mut snaps: BTreeMap<String, Vec<u8>>,
    mut rng: Rng,
    prefix: String,
    stop: Arc<AtomicBool>,
) -> WorkerResult {
    let live_path = mp.join("live.raw");
    let mut completed = BTreeMap::new();
    let mut k = 0u64;
    while !stop.load(Ordering::SeqCst) {
        let names: Vec<String> = snaps.keys().cloned().collect();
        let r = rng.below(100);
        let op = if r < 35 && snaps.len() < MAX_SNAPS {
            k += 1;
            Op::Create(format!("{prefix}-{k}"))
        } else if r < 60 && !names.is_empty() {
            Op::Delete(rng.pick(&names).clone())
        } else if r < 72 && !names.is_empty() {
            Op::Revert(rng.pick(&names).clone())
        } else {
            let len = rng.range(1, 192 * KIB) as usize;
            Op::Write {
                off: rng.below(SIZE - len as u64),
                len,
            }
        };
        let result = match &op {
            Op::Create(n) => control(&mp, "create", n),
            Op::Delete(n) => control(&mp, "delete", n),
            Op::Revert(n) => control(&mp, "revert", n),
            Op::Write { off, len } => {
                let data = rng.bytes(*len);
                let r = std::fs::OpenOptions::new()
                    .write(true)
                    .open(&live_path)
                    .and_then(|f| {
                        use std::os::unix::fs::FileExt;
                        f.write_all_at(&data, *off)
                    })
                    .map_err(|e| e.raw_os_error().unwrap_or(-1));
                if r.is_ok() {
                    live[*off as usize..*off as usize + len].copy_from_slice(&data);
                }
                r
            }
        };
        match result {
            Ok(()) => {
                *completed.entry(op.kind()).or_insert(0) += 1;
                match &op {
                    Op::Create(n) => {
                        snaps.insert(n.clone(), live.clone());
                    }
                    Op::Delete(n) => {
                        snaps.remove(n);
                    }
                    Op::Revert(n) => live = snaps[n].clone(),
                    Op::Write { .. } => {}
                }
            }
            Err(e) if interrupted_errno(e) => {
                let content = matches!(op, Op::Create(_)).then(|| live.clone());
                return WorkerResult {
                    snaps,
                    interrupted: Some((op, content)),
                    unexpected: None,
                    completed,
                };
            }
            Err(e) => {
                return WorkerResult {
                    snaps,
                    interrupted: None,
                    unexpected: Some((op, e)),
                    completed,
                };
            }
        }
    }
    WorkerResult {
        snaps,
        interrupted: None,
        unexpected: None,
        completed,
    }
}

#[derive(Default, Debug)]
struct Stats {
    /// What was in flight at each kill (None: between operations / stopped).
    killed_during: BTreeMap<String, u64>,
    completed: BTreeMap<Kind, u64>,
    snapshots_verified: u64,
    inflight_create_present: u64,
    inflight_create_absent: u64,
    inflight_delete_present: u64,
    inflight_delete_absent: u64,
}

/// The snapshot-command workload of the crash harness: one image, remounted after every kill;
/// the worker starts from the snapshots the previous check found and the live disk as qemu-img
/// reads it (unflushed writes may be lost in a crash).
struct Commands {
    img: PathBuf,
    snaps: BTreeMap<String, Vec<u8>>,
    /// The live disk read before this iteration's mount.
    live: Vec<u8>,
    stats: Stats,
}

impl CrashWorkload for Commands {
    type Outcome = WorkerResult;

    fn image(&mut self, _it: u64) -> PathBuf {
        self.live = qemu_content(&self.img, None);
        self.img.clone()
    }

    fn start(
        &mut self,
        it: u64,
        mp: &Path,
        seed: u64,
        stop: Arc<AtomicBool>,
    ) -> Box<dyn FnOnce() -> WorkerResult + Send> {
        let live = std::mem::take(&mut self.live);
        let (mp, snaps) = (mp.to_path_buf(), self.snaps.clone());
        let prefix = format!("i{it}");
        Box::new(move || worker(mp, live, snaps, Rng::new(seed), prefix, stop))
    }

    fn verify(&mut self, img: &Path, kill: &Kill, res: WorkerResult) -> Result<u64, String> {
        for (k, n) in &res.completed {
            *self.stats.completed.entry(*k).or_insert(0) += n;
        }
        let during = match &res.interrupted {
            Some((op, _)) => format!("{:?}", op.kind()),
            None => "between operations".to_string(),
        };
        *self.stats.killed_during.entry(during).or_insert(0) += 1;
        if let Some((op, e)) = &res.unexpected {
            return Err(format!(
                "{op:?} failed with {} before the kill (a product error, not the crash); snapfs \
                 stderr:\n{}",
                errno_name(*e),
                kill.stderr_before
            ));
        }
        let (now, bytes) = verify_after_kill(img, &res, &mut self.stats)?;
        self.snaps = now;
        Ok(bytes)
    }

    fn summary(&self) -> String {
        let s = &self.stats;
        format!(
            "killed during: {}; completed ops: {}; {} snapshots verified whole; in-flight creates \
             present/absent {}/{}; in-flight deletes present/absent {}/{}",
            counters(&s.killed_during),
            counters(&s.completed),
            s.snapshots_verified,
            s.inflight_create_present,
            s.inflight_create_absent,
            s.inflight_delete_present,
            s.inflight_delete_absent
        )
    }
}

/// Checks the image after a kill (`qemu-img check` passed already) against what the worker
/// knew: every snapshot whole, none missing or invented. Returns the snapshots now in the image
/// (with their contents) for the next iteration and the bytes compared.
fn verify_after_kill(
    img: &Path,
    res: &WorkerResult,
    stats: &mut Stats,
) -> Result<(BTreeMap<String, Vec<u8>>, u64), String> {
    let ctx = match &res.interrupted {
        Some((op, _)) => format!("killed during {op:?}"),
        None => "killed between operations".to_string(),
    };
    let tags = snapshot_tags(img);
    let mut seen = std::collections::BTreeSet::new();
    for t in &tags {
        if !seen.insert(t) {
            return Err(format!(
                "{ctx}: snapshot name {t:?} appears twice: {tags:?}"
            ));
        }
    }
    let (pending_create, pending_delete) = match &res.interrupted {
        Some((Op::Create(n), Some(c))) => (Some((n.clone(), c.clone())), None),
        Some((Op::Delete(n), _)) => (None, Some(n.clone())),
        _ => (None, None),
    };
    let mut now = BTreeMap::new();
    let mut bytes = 0;
    for t in &tags {
        let want = match (res.snaps.get(t), &pending_create) {
            (Some(c), _) => c,
            (None, Some((n, c))) if n == t => c,
            _ => {
                return Err(format!(
                    "{ctx}: snapshot {t:?} exists but no create of it was issued (or its delete \
                     completed); expected {:?}",
                    res.snaps.keys().collect::<Vec<_>>()
                ));
            }
        };
        let got = qemu_content(img, Some(t));
        if let Some(d) = diff_bytes(&got, want) {
            return Err(format!(
                "{ctx}: snapshot {t:?} is not whole (content per qemu-img vs the live disk when \
                 its create was issued): {d}"
            ));
        }
        stats.snapshots_verified += 1;
        bytes += got.len() as u64;
        now.insert(t.clone(), got);
    }
    for n in res.snaps.keys() {
        let present = tags.contains(n);
        if pending_delete.as_deref() == Some(n.as_str()) {
            if present {
                stats.inflight_delete_present += 1;
            } else {
                stats.inflight_delete_absent += 1;
            }
        } else if !present {
            return Err(format!(
                "{ctx}: snapshot {n:?} (its create completed, no delete of it was issued) is \
                 missing after the kill; the image lists {tags:?}"
            ));
        }
    }
    if let Some((n, _)) = &pending_create {
        if tags.contains(n) {
            stats.inflight_create_present += 1;
        } else {
            stats.inflight_create_absent += 1;
        }
    }
    Ok((now, bytes))
}

fn crash_test(name: &str, opts: &str) {
    let dir = workdir();
    let img = dir.path().join("crash.qcow2");
    create_qcow2(&img, SIZE, opts, None);
    qemu_io(&img, &["write -P 0x31 0 2M", "write -P 0x32 6M 1M"]);
    let mut w = Commands {
        img,
        snaps: BTreeMap::new(),
        live: Vec::new(),
        stats: Stats::default(),
    };
    let opts = CrashOptions {
        iterations: 25,
        budget: Duration::from_secs(30),
        min_kills: 3,
        ..Default::default()
    };
    crash_loop(name, &opts, &mut w);
}

#[test]
fn kill_9_during_snapshot_commands_64k_clusters() {
    crash_test("kill_9_during_snapshot_commands_64k_clusters", "");
}

#[test]
fn kill_9_during_snapshot_commands_4k_clusters() {
    crash_test(
        "kill_9_during_snapshot_commands_4k_clusters",
        "cluster_size=4096",
    );
}
