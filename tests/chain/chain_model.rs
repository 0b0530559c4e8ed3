//! Chain operations in any order (issue 21).
//!
//! First the user's sequence from the issue, mounted for real and driven through the control
//! files: base.qcow2 <- top.qcow2; write, `commit`, write, `create e1 --external`, write,
//! `commit`. The second commit writes into top.qcow2, which was the top before the external
//! create; it failed with EIO ("top.qcow2: no longer the active image").

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::common::chain_support::*;
use crate::common::snapshot_support::*;
use crate::common::*;

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn commit_after_external_create_writes_into_the_old_top() {
    let work = workdir();
    let dir = work.path();
    let base = dir.join("base.qcow2");
    let top = dir.join("top.qcow2");
    let size = 4 * MIB;
    create_qcow2(&base, size, "cluster_size=65536", None);
    qemu_io(&base, &["write -P 0x11 0 4M"]);
    create_qcow2(
        &top,
        size,
        "cluster_size=65536",
        Some(("base.qcow2", "qcow2")),
    );
    let mut want = vec![0x11u8; size as usize];
    let write = |mp: &Path, want: &mut Vec<u8>, pat: u8, off: u64, len: usize| {
        let data = pattern(pat, len);
        pwrite(&mp.join("live.raw"), off, &data);
        want[off as usize..off as usize + len].copy_from_slice(&data);
    };
    let e1 = dir.join("top.e1.qcow2");
    let committed;
    {
        let m = Mount::new(&top);
        let mp = m.path();
        write(mp, &mut want, 0x21, 0, 128 * KIB as usize);
        control_ok(mp, "commit", "");
        assert_outcome_ok(mp, "commit (top)");
        write(mp, &mut want, 0x22, 64 * KIB, 200 * KIB as usize);
        control_ok(mp, "create", "e1 --external");
        assert_outcome_ok(mp, "create e1");
        let at_e1 = want.clone();
        write(mp, &mut want, 0x23, MIB, 300 * KIB as usize);
        // The commit of the new top lands in top.qcow2, the image that was the top.
        control_ok(mp, "commit", "");
        assert_outcome_ok(mp, "commit (top)");
        if let Some(d) = diff_bytes(&read_whole(&m.live()), &want) {
            panic!("live.raw after the second commit: {d}");
        }
        // top.qcow2 is external snapshot e1: it now holds the committed writes too.
        if let Some(d) = diff_bytes(&read_whole(&m.snapshot("e1.raw")), &want) {
            panic!("snapshots/e1.raw (top.qcow2) after the second commit: {d}");
        }
        assert_ne!(at_e1, want, "the last write must change the disk");
        committed = want.clone();
        // And the live disk stays writable, into the new top.
        write(mp, &mut want, 0x24, 3 * MIB, 4 * KIB as usize);
        fsync(&m.live());
        if let Some(d) = diff_bytes(&read_whole(&m.live()), &want) {
            panic!("live.raw after writing past the second commit: {d}");
        }
    }
    assert_all_clean(dir, "after unmount");
    assert_eq!(
        chain_files(&e1, dir),
        ["top.e1.qcow2", "top.qcow2", "base.qcow2"],
        "the chain after the sequence"
    );
    let got = qemu_content(&e1, None);
    if let Some(d) = diff_bytes(&got, &want) {
        panic!("qemu-img convert of {} vs the writes: {d}", s(&e1));
    }
    // top.qcow2 holds everything up to the second commit (the last write went to the new top).
    if let Some(d) = diff_bytes(&qemu_content(&top, None), &committed) {
        panic!("qemu-img convert of top.qcow2 (the committed writes over base): {d}");
    }
}

/// Guest requests on their way while `create --external` switches the top: every write, hole
/// punch and resize that resolved the old chain must land on the new top (the old top refuses
/// them once retired; the request is retried), never fail. One thread writes, punches holes and
/// grows `live.raw` through one descriptor while the test runs external creates; then the live
/// disk must hold exactly what the thread did, mounted and per qemu-img.
#[test]
fn guest_requests_across_external_creates() {
    use std::os::unix::fs::FileExt;
    use std::os::unix::io::AsRawFd;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    const CREATES: usize = 20;

    let work = workdir();
    let dir = work.path();
    let base = dir.join("base.qcow2");
    let top = dir.join("top.qcow2");
    create_qcow2(&base, 4 * MIB, "cluster_size=65536", None);
    qemu_io(&base, &["write -P 0x31 0 4M"]);
    create_qcow2(
        &top,
        4 * MIB,
        "cluster_size=65536",
        Some(("base.qcow2", "qcow2")),
    );
    let m = Mount::new(&top);
    let _deadline = Deadline::new(m.path(), Duration::from_secs(120), "external creates");
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let live = m.live();
    let guest = {
        let stop = stop.clone();
        let done = done.clone();
        std::thread::spawn(move || {
            let f = fs::OpenOptions::new().write(true).open(&live).unwrap();
            let mut want = vec![0x31u8; 4 * MIB as usize];
            let mut rng = Rng::new(21);
            let mut errors = Vec::new();
            let mut ops = 0u64;
            while !stop.load(Ordering::Acquire) && errors.len() < 5 {
                ops += 1;
                let size = want.len() as u64;
                match rng.below(10) {
                    0..=5 => {
                        let len = rng.range(1, 16 * KIB);
                        let off = rng.below(size - len);
                        let data = rng.bytes(len as usize);
                        match f.write_all_at(&data, off) {
                            Ok(()) => {
                                want[off as usize..(off + len) as usize].copy_from_slice(&data)
                            }
                            Err(e) => errors.push(format!("pwrite {len} at {off:#x}: {e}")),
                        }
                    }
                    6..=8 => {
                        let len = rng.range(1, 128 * KIB);
                        let off = rng.below(size - len);
                        let mode = libc::FALLOC_FL_KEEP_SIZE | libc::FALLOC_FL_PUNCH_HOLE;
                        let r =
                            unsafe { libc::fallocate(f.as_raw_fd(), mode, off as i64, len as i64) };
                        if r == 0 {
                            want[off as usize..(off + len) as usize].fill(0);
                        } else {
                            errors.push(format!(
                                "fallocate(PUNCH_HOLE) {len} at {off:#x}: {}",
                                std::io::Error::last_os_error()
                            ));
                        }
                    }
                    _ => {
                        let new = size + 64 * KIB;
                        match f.set_len(new) {
                            Ok(()) => want.resize(new as usize, 0),
                            Err(e) => errors.push(format!("ftruncate to {new}: {e}")),
                        }
                    }
                }
                done.store(ops, Ordering::Release);
            }
            (want, errors, ops)
        })
    };
    for i in 0..CREATES {
        // Requests run between the creates too, not only during them.
        let seen = done.load(Ordering::Acquire);
        while done.load(Ordering::Acquire) < seen + 3 && !guest.is_finished() {
            std::thread::sleep(Duration::from_millis(1));
        }
        control_ok(m.path(), "create", &format!("x{i} --external o{i}.qcow2"));
    }
    stop.store(true, Ordering::Release);
    let (want, errors, ops) = guest.join().unwrap();
    eprintln!("{ops} guest requests across {CREATES} external creates");
    assert!(
        errors.is_empty(),
        "guest requests failed while external creates switched the top ({ops} requests):\n{}\ncontrol/status:\n{}\nsnapfs stderr:\n{}",
        errors.join("\n"),
        status_text(m.path()),
        m.stderr_text()
    );
    if let Some(d) = diff_bytes(&read_whole(&m.live()), &want) {
        panic!("live.raw after {ops} guest requests across external creates: {d}");
    }
    drop(m);
    assert_all_clean(dir, "after unmount");
    let last = dir.join(format!("o{}.qcow2", CREATES - 1));
    assert_eq!(
        chain_files(&last, dir).len(),
        CREATES + 2,
        "the overlays over top and base"
    );
    if let Some(d) = diff_bytes(&qemu_content(&last, None), &want) {
        panic!("qemu-img convert of the last overlay vs the guest's requests: {d}");
    }
}

// =============================================================================================
// The model
// =============================================================================================
//
// Seeded random sequences of chain operations on chains of 1 to 5 layers (qcow2 or raw base),
// each done twice: by snapfs, mounted, through `live.raw` and the control files, and by
// qemu-img and qemu-io on a copy of the files (the model). After every step:
// - `snapshots/` lists exactly the model's views (names as snapfs gives them: a layer is named
//   by `create NAME --external` during a mount, else by its file's stem; a view keeps its name
//   while it stays in the chain; an internal snapshot of a backing layer is `LAYER@TAG`);
// - `live.raw` and every view equal the model's (`qemu-img convert -O raw` of the model's file,
//   `-l snapshot.name=TAG` for internal snapshots, or the snapshot applied on a copy when its
//   size is not the image's);
// - `qemu-img check -U` is clean on every qcow2 file of snapfs's chain that changed;
// - a refused command (the model knows which ones snapfs must refuse) changes nothing.
// - a file that left the chain stays byte for byte as it was (checked when unmounted).
// Every REMOUNT_EVERY steps, and at the end: unmount; `qemu-img check` is clean on every file
// of the chain in both folders; snapfs's files per qemu-img (chain, internal snapshots, and the
// content of every view) equal the model's; a fresh mount shows the model's views under their
// file names.
//
// Steps per seed: STEPS; `SNAPFS_CHAIN_MODEL_SEED=N` makes every seed test run seed N instead
// (run one of them to replay a failure), `SNAPFS_CHAIN_MODEL_STEPS=N` changes the length.
// `commands_are_modelled` fails when control/ gains a command the model does not know: add a
// `Step` for it (picked in `Run::pick`, applied in `Run::apply`).

const STEPS: usize = 60;
const REMOUNT_EVERY: usize = 10;
/// The longest a chain gets (an external create is not picked on a chain this deep).
const MAX_LAYERS: usize = 5;
/// Internal snapshots at most in the top.
const MAX_TOP_SNAPSHOTS: usize = 3;
const LIMIT: Duration = Duration::from_secs(240);
/// The control files the model knows. A new one must be added to the model first.
const MODELLED_COMMANDS: [&str; 6] = ["commit", "create", "delete", "pull", "revert", "status"];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fmt {
    Qcow2,
    Raw,
}

impl Fmt {
    fn name(self) -> &'static str {
        match self {
            Fmt::Qcow2 => "qcow2",
            Fmt::Raw => "raw",
        }
    }
}

/// One file of the chain (the same name in both folders).
#[derive(Debug, Clone)]
struct ModelLayer {
    file: String,
    fmt: Fmt,
    /// Virtual size.
    size: u64,
    cluster_size: u64,
    /// Internal snapshots: tag and the disk size they were taken at, in table order.
    snapshots: Vec<(String, u64)>,
}

impl ModelLayer {
    fn stem(&self) -> String {
        Path::new(&self.file)
            .file_stem()
            .unwrap()
            .to_string_lossy()
            .into_owned()
    }
}

/// A view: a layer (`tag: None`) or an internal snapshot of one.
type Identity = (String, Option<String>);

#[derive(Debug, Clone)]
struct ViewSpec {
    /// The path under the mount: `live.raw` or `snapshots/NAME.raw`.
    path: String,
    depth: usize,
    tag: Option<String>,
}

#[derive(Debug, Clone)]
enum Step {
    Write {
        off: u64,
        len: u64,
        pat: u64,
    },
    Zero {
        off: u64,
        len: u64,
        how: ZeroHow,
    },
    CommitTop,
    CommitLayer {
        depth: usize,
        name: String,
    },
    /// `NAME --external FILE`, or with `named` false `NAME --external` (FILE is then the
    /// default snapfs must pick).
    External {
        name: String,
        file: String,
        named: bool,
    },
    DeleteLayer {
        depth: usize,
        name: String,
    },
    RevertLayer {
        depth: usize,
        name: String,
    },
    /// `pull [BASE]`: `base` is the depth and view name of the layer that becomes the top's
    /// backing file (`None`: every layer is pulled, the top stands alone).
    Pull {
        base: Option<(usize, String)>,
    },
    CreateInternal(String),
    /// Internal snapshot `tag` of layer `depth` (a backing layer's too, as virsh reverts to
    /// and deletes a snapshot it took before a disk-only snapshot put a layer above it).
    RevertInternal {
        depth: usize,
        tag: String,
        name: String,
    },
    DeleteInternal {
        depth: usize,
        tag: String,
        name: String,
    },
    /// A command snapfs must refuse, changing nothing.
    Refused {
        file: &'static str,
        text: String,
        why: &'static str,
    },
}

struct Run {
    seed: u64,
    rng: Rng,
    prod: PathBuf,
    model: PathBuf,
    layers: Vec<ModelLayer>,
    /// Names given by `create NAME --external` in this mount, by file.
    session_names: HashMap<String, String>,
    /// The name of every view in `snapshots/` (without `.raw`).
    names: BTreeMap<Identity, String>,
    /// The model's content of each view, by its path under the mount (dropped when the model's
    /// files change).
    content: HashMap<String, Vec<u8>>,
    /// Hash of each of snapfs's qcow2 files when `qemu-img check` last found it clean.
    checked: HashMap<String, u64>,
    /// Files that left the chain, with their hash when they left: they must stay as they were.
    left: BTreeMap<String, u64>,
    counter: u64,
    log: Vec<String>,
}

fn env_number(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.trim().parse().ok())
}

fn run_in(dir: &Path, program: &str, args: &[&str]) {
    run(Command::new(program).current_dir(dir).args(args));
}

fn file_hash(path: &Path) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    read_all(path).hash(&mut h);
    h.finish()
}

/// `qemu-img check -U --output=json` (the file may be in use by the mount): clean or a message.
fn check_shared(path: &Path) -> Result<(), String> {
    let out = run_status(
        Command::new("qemu-img")
            .args(["check", "-U", "--output=json"])
            .arg(path),
    );
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .map_err(|e| format!("qemu-img check printed no JSON ({e}): {text}"))?;
    let num = |k: &str| v[k].as_u64().unwrap_or(0);
    if out.status.success() && num("corruptions") + num("leaks") + num("check-errors") == 0 {
        Ok(())
    } else {
        Err(format!("exit {}: {text}", out.status))
    }
}

impl Run {
    // -----------------------------------------------------------------------------------------
    // The starting chain
    // -----------------------------------------------------------------------------------------

    /// Seed N's chain: (N - 1) % 5 + 1 layers; a raw base for even seeds (a chain of one layer
    /// is one qcow2 image); cluster sizes, extended L2 entries, version 2 layers below the top,
    /// sizes (a base smaller than the layers above, so that commits grow it), data, zero and
    /// compressed clusters and internal snapshots from the seed.
    fn build(&mut self) {
        let depth = ((self.seed.wrapping_sub(1)) % MAX_LAYERS as u64) as usize + 1;
        let raw_base = depth > 1 && self.seed % 2 == 0;
        let size = 2 * MIB;
        let mut below: Option<ModelLayer> = None;
        let mut bottom_up = Vec::new();
        for k in 0..depth {
            let fmt = if k == 0 && raw_base {
                Fmt::Raw
            } else {
                Fmt::Qcow2
            };
            let layer_size = if k == 0 && depth > 1 && self.rng.chance(50) {
                size / 2
            } else {
                size
            };
            let cs = *self.rng.pick(&[4 * KIB, 16 * KIB, 64 * KIB]);
            let file = match fmt {
                Fmt::Qcow2 => format!("l{k}.qcow2"),
                Fmt::Raw => format!("l{k}.img"),
            };
            let path = self.prod.join(&file);
            let mut v2 = false;
            let mut layer = ModelLayer {
                file: file.clone(),
                fmt,
                size: layer_size,
                cluster_size: cs,
                snapshots: Vec::new(),
            };
            match fmt {
                Fmt::Raw => {
                    qemu_img(&[
                        "create",
                        "-q",
                        "-f",
                        "raw",
                        s(&path),
                        &layer_size.to_string(),
                    ]);
                }
                Fmt::Qcow2 => {
                    // A version 2 image only below the top (snapfs keeps the top, and QEMU
                    // cannot resize a v2 image with snapshots: v2 layers get none).
                    v2 = k + 1 < depth && self.rng.chance(25);
                    let extended = !v2 && cs >= 16 * KIB && self.rng.chance(30);
                    let opts = format!(
                        "cluster_size={cs}{}{}",
                        if extended { ",extended_l2=on" } else { "" },
                        if v2 { ",compat=0.10" } else { "" }
                    );
                    let backing = below.as_ref().map(|b| (b.file.as_str(), b.fmt.name()));
                    create_qcow2(&path, layer_size, &opts, backing);
                }
            }
            let mut cmds = Vec::new();
            if fmt == Fmt::Qcow2 && self.rng.chance(40) {
                // Compressed clusters, for commits and deletes to read.
                let off = self.rng.below(layer_size / cs) * cs;
                cmds.push(format!("write -c -P {} {off} {cs}", self.rng.range(1, 255)));
            }
            for _ in 0..self.rng.range(1, 4) {
                let len = self.rng.range(1, 64) * 4 * KIB;
                let off = self.rng.below(layer_size - len) / 512 * 512;
                cmds.push(format!("write -P {} {off} {len}", self.rng.range(1, 255)));
            }
            if fmt == Fmt::Qcow2 && below.is_some() {
                let off = self.rng.below(layer_size / cs) * cs;
                cmds.push(format!("write -z {off} {cs}"));
            }
            qemu_io_s(&path, &cmds);
            if fmt == Fmt::Qcow2 && !v2 && self.rng.chance(40) {
                let tag = format!("s{k}");
                snapshot_create(&path, &tag);
                layer.snapshots.push((tag, layer_size));
                let off = self.rng.below(layer_size - 64 * KIB) / 512 * 512;
                qemu_io_s(
                    &path,
                    &[format!("write -P {} {off} 64k", self.rng.range(1, 255))],
                );
            }
            below = Some(layer.clone());
            bottom_up.push(layer);
        }
        bottom_up.reverse();
        self.layers = bottom_up;
        copy_dir(&self.prod, &self.model);
    }

    fn top_path(&self) -> PathBuf {
        self.prod.join(&self.layers[0].file)
    }

    fn describe_chain(&self) -> String {
        self.layers
            .iter()
            .map(|l| {
                let snaps: Vec<&str> = l.snapshots.iter().map(|(t, _)| t.as_str()).collect();
                format!(
                    "{}({}, {} KiB, cs {} KiB, {snaps:?})",
                    l.file,
                    l.fmt.name(),
                    l.size / KIB,
                    l.cluster_size / KIB
                )
            })
            .collect::<Vec<_>>()
            .join(" -> ")
    }

    // -----------------------------------------------------------------------------------------
    // Names and views
    // -----------------------------------------------------------------------------------------

    /// Names the views of the chain as it is now, the way snapfs's catalog does: a view that
    /// was there before keeps its name; a new layer view takes its `create --external` name or
    /// its file's stem; a new internal snapshot takes its tag, prefixed with `LAYER@` below the
    /// top. (Every file, tag and external name in the model is unique, so no name collides.)
    fn rename(&mut self) {
        let mut next = BTreeMap::new();
        for (depth, layer) in self.layers.iter().enumerate() {
            let prefix = if depth == 0 {
                String::new()
            } else {
                let id = (layer.file.clone(), None);
                let name = self.names.get(&id).cloned().unwrap_or_else(|| {
                    self.session_names
                        .get(&layer.file)
                        .cloned()
                        .unwrap_or_else(|| layer.stem())
                });
                next.insert(id, name.clone());
                format!("{name}@")
            };
            for (tag, _) in &layer.snapshots {
                let id = (layer.file.clone(), Some(tag.clone()));
                let name = self
                    .names
                    .get(&id)
                    .cloned()
                    .unwrap_or_else(|| format!("{prefix}{tag}"));
                next.insert(id, name);
            }
        }
        self.names = next;
    }

    fn views(&self) -> Vec<ViewSpec> {
        let mut v = vec![ViewSpec {
            path: "live.raw".into(),
            depth: 0,
            tag: None,
        }];
        for (depth, layer) in self.layers.iter().enumerate() {
            let ids = std::iter::once(None)
                .filter(|_| depth > 0)
                .chain(layer.snapshots.iter().map(|(t, _)| Some(t.clone())));
            for tag in ids {
                let name = &self.names[&(layer.file.clone(), tag.clone())];
                v.push(ViewSpec {
                    path: format!("snapshots/{name}.raw"),
                    depth,
                    tag,
                });
            }
        }
        v
    }

    fn view_name(&self, depth: usize, tag: Option<&str>) -> String {
        self.names[&(self.layers[depth].file.clone(), tag.map(str::to_owned))].clone()
    }

    /// What a view holds per qemu-img, read from the files under `root`.
    fn qemu_view(&self, root: &Path, view: &ViewSpec) -> Vec<u8> {
        let layer = &self.layers[view.depth];
        let path = root.join(&layer.file);
        let raw = match &view.tag {
            None => convert_to_raw(&path, None),
            Some(tag) => {
                let taken_at = layer.snapshots.iter().find(|(t, _)| t == tag).unwrap().1;
                if taken_at == layer.size {
                    convert_to_raw(&path, Some(tag))
                } else {
                    applied_snapshot_raw(&path, tag)
                }
            }
        };
        let v = read_all(&raw);
        fs::remove_file(&raw).ok();
        v
    }

    fn model_view(&mut self, view: &ViewSpec) -> Vec<u8> {
        if let Some(v) = self.content.get(&view.path) {
            return v.clone();
        }
        let v = self.qemu_view(&self.model, view);
        self.content.insert(view.path.clone(), v.clone());
        v
    }

    // -----------------------------------------------------------------------------------------
    // Picking a step
    // -----------------------------------------------------------------------------------------

    fn pick(&mut self) -> Step {
        let n = self.layers.len();
        let size = self.layers[0].size;
        let top_snaps: Vec<String> = self.layers[0]
            .snapshots
            .iter()
            .map(|(t, _)| t.clone())
            .collect();
        loop {
            return match self.rng.below(100) {
                0..=29 => {
                    let len = match self.rng.below(3) {
                        0 => self.rng.range(1, 4) * self.layers[0].cluster_size,
                        1 => self.rng.range(1, 192 * KIB),
                        _ => self.rng.range(1, 600),
                    };
                    let off = self.rng.below(size - len);
                    Step::Write {
                        off,
                        len,
                        pat: self.rng.next_u64(),
                    }
                }
                30..=34 => {
                    let len = self.rng.range(1, 256 * KIB);
                    let off = self.rng.below(size - len);
                    let how = if self.rng.chance(50) {
                        ZeroHow::Punch
                    } else {
                        ZeroHow::ZeroRange
                    };
                    Step::Zero { off, len, how }
                }
                35..=42 if n >= 2 => Step::CommitTop,
                43..=49 if n >= 3 => {
                    let depth = self.rng.range(1, n as u64 - 2) as usize;
                    Step::CommitLayer {
                        depth,
                        name: self.view_name(depth, None),
                    }
                }
                50..=59 if n < MAX_LAYERS => {
                    self.counter += 1;
                    let name = format!("x{}", self.counter);
                    // Named by the command, or where snapfs puts it by default.
                    let (file, named) = if self.rng.chance(70) {
                        (format!("n{}.qcow2", self.counter), true)
                    } else {
                        (format!("{}.{name}.qcow2", self.layers[0].stem()), false)
                    };
                    Step::External { name, file, named }
                }
                60..=62 if n >= 2 => {
                    let base = if n >= 3 && self.rng.chance(50) {
                        let depth = self.rng.range(2, n as u64 - 1) as usize;
                        Some((depth, self.view_name(depth, None)))
                    } else {
                        None
                    };
                    Step::Pull { base }
                }
                63..=67 if n >= 2 => {
                    let depth = self.rng.range(1, n as u64 - 1) as usize;
                    Step::DeleteLayer {
                        depth,
                        name: self.view_name(depth, None),
                    }
                }
                68..=73 if n >= 2 => {
                    let depth = self.rng.range(1, n as u64 - 1) as usize;
                    Step::RevertLayer {
                        depth,
                        name: self.view_name(depth, None),
                    }
                }
                74..=83 if top_snaps.len() < MAX_TOP_SNAPSHOTS => {
                    self.counter += 1;
                    Step::CreateInternal(format!("i{}", self.counter))
                }
                84..=89 if !top_snaps.is_empty() => {
                    let tag = self.rng.pick(&top_snaps).clone();
                    let name = self.view_name(0, Some(&tag));
                    Step::RevertInternal {
                        depth: 0,
                        tag,
                        name,
                    }
                }
                90..=95 if !top_snaps.is_empty() => {
                    let tag = self.rng.pick(&top_snaps).clone();
                    let name = self.view_name(0, Some(&tag));
                    Step::DeleteInternal {
                        depth: 0,
                        tag,
                        name,
                    }
                }
                96..=99 => {
                    let below: Vec<(usize, String)> = (1..n)
                        .flat_map(|d| {
                            self.layers[d]
                                .snapshots
                                .iter()
                                .map(move |(t, _)| (d, t.clone()))
                        })
                        .collect();
                    if !below.is_empty() && self.rng.chance(60) {
                        let (depth, tag) = self.rng.pick(&below).clone();
                        let name = self.view_name(depth, Some(&tag));
                        if self.rng.chance(50) {
                            Step::RevertInternal { depth, tag, name }
                        } else {
                            Step::DeleteInternal { depth, tag, name }
                        }
                    } else if n >= 2 {
                        Step::Refused {
                            file: "commit",
                            text: self.view_name(n - 1, None),
                            why: "the bottom layer has no backing file",
                        }
                    } else {
                        continue;
                    }
                }
                _ => continue,
            };
        }
    }

    // -----------------------------------------------------------------------------------------
    // Applying a step to snapfs and to the model
    // -----------------------------------------------------------------------------------------

    fn command(&self, m: &Mount, file: &str, text: &str, label: &str) {
        control_ok(m.path(), file, text);
        assert_outcome_ok(m.path(), label);
    }

    fn qemu_io_top(&self, cmd: &str) {
        let top = self.layers[0].file.clone();
        run_in(&self.model, "qemu-io", &["-f", "qcow2", "-c", cmd, &top]);
    }

    fn apply(&mut self, m: &Mount, step: &Step) {
        let leaving: Vec<usize> = match step {
            Step::CommitLayer { depth, .. } | Step::DeleteLayer { depth, .. } => vec![*depth],
            Step::RevertLayer { depth, .. } | Step::RevertInternal { depth, .. } => {
                (1..*depth).collect()
            }
            Step::Pull { base } => (1..base.as_ref().map_or(self.layers.len(), |b| b.0)).collect(),
            _ => Vec::new(),
        };
        let leaving: Vec<(String, u64)> = leaving
            .into_iter()
            .map(|d| {
                let file = self.layers[d].file.clone();
                let hash = file_hash(&self.prod.join(&file));
                (file, hash)
            })
            .collect();
        let mp = m.path().to_owned();
        let Some(kept) = self.guarded_command(m, step) else {
            return;
        };
        self.left.extend(leaving);
        let model = self.model.clone();
        let top = self.layers[0].file.clone();
        match step {
            Step::Write { off, len, pat } => {
                let data = Rng::new(*pat).bytes(*len as usize);
                pwrite(&m.live(), *off, &data);
                let data_file = model.join(".data");
                fs::write(&data_file, &data).unwrap();
                self.qemu_io_top(&format!("write -s {} {off} {len}", s(&data_file)));
                self.content.remove("live.raw");
                return;
            }
            Step::Zero { off, len, how } => {
                zero_range(&m.live(), *off, *len, *how);
                self.qemu_io_top(&format!("write -z {off} {len}"));
                self.content.remove("live.raw");
                return;
            }
            Step::CommitTop => {
                self.command(m, "commit", "", "commit (top)");
                run_in(&model, "qemu-img", &["commit", "-q", "-f", "qcow2", &top]);
                let size = self.layers[0].size;
                let target = &mut self.layers[1];
                target.size = target.size.max(size);
            }
            Step::CommitLayer { depth, name } => {
                self.command(m, "commit", name, &format!("commit {name}"));
                let d = *depth;
                let source = self.layers[d].clone();
                run_in(
                    &model,
                    "qemu-img",
                    &["commit", "-q", "-d", "-f", "qcow2", &source.file],
                );
                let target = self.layers[d + 1].clone();
                rebase(
                    &model,
                    Rebase::Unsafe,
                    &self.layers[d - 1].file,
                    Some(&target),
                );
                self.layers[d + 1].size = target.size.max(source.size);
                self.layers.remove(d);
            }
            Step::External { name, file, named } => {
                let text = if *named {
                    format!("{name} --external {file}")
                } else {
                    format!("{name} --external")
                };
                self.command(m, "create", &text, &format!("create {name}"));
                assert!(
                    self.prod.join(file).exists(),
                    "`create {text}` should have made {file}"
                );
                let old = self.layers[0].clone();
                run_in(
                    &model,
                    "qemu-img",
                    &[
                        "create",
                        "-q",
                        "-f",
                        "qcow2",
                        "-o",
                        &format!("cluster_size={}", old.cluster_size),
                        "-b",
                        &old.file,
                        "-F",
                        "qcow2",
                        file,
                        &old.size.to_string(),
                    ],
                );
                self.session_names.insert(old.file.clone(), name.clone());
                self.layers.insert(
                    0,
                    ModelLayer {
                        file: file.clone(),
                        fmt: Fmt::Qcow2,
                        size: old.size,
                        cluster_size: old.cluster_size,
                        snapshots: Vec::new(),
                    },
                );
            }
            Step::DeleteLayer { depth, name } => {
                if kept.is_none() {
                    self.command(m, "delete", name, &format!("delete {name}"));
                }
                let d = *depth;
                let above = self.layers[d - 1].file.clone();
                rebase(&model, Rebase::Safe, &above, self.layers.get(d + 1));
                self.layers.remove(d);
            }
            Step::RevertLayer { depth, name } => {
                self.command(m, "revert", name, &format!("revert {name}"));
                self.model_revert_to_layer(*depth);
            }
            Step::Pull { base } => {
                let (text, label) = match base {
                    Some((_, name)) => (name.clone(), format!("pull {name}")),
                    None => (String::new(), "pull (all)".to_owned()),
                };
                if kept.is_none() {
                    self.command(m, "pull", &text, &label);
                }
                // `qemu-img rebase` in safe mode copies into the top what the guest would read
                // differently over the new backing file (nothing at all: everything it reads).
                let until = base.as_ref().map_or(self.layers.len(), |b| b.0);
                rebase(&model, Rebase::Safe, &top, self.layers.get(until));
                self.layers.drain(1..until);
            }
            Step::CreateInternal(tag) => {
                self.command(m, "create", tag, &format!("create {tag}"));
                run_in(&model, "qemu-img", &["snapshot", "-c", tag, &top]);
                let size = self.layers[0].size;
                self.layers[0].snapshots.push((tag.clone(), size));
            }
            Step::RevertInternal { depth, tag, name } => {
                self.command(m, "revert", name, &format!("revert {name}"));
                // The snapshot becomes its file's active state; a backing layer's file is then
                // the disk again, as virsh points the domain at it: the top is emptied over it.
                let d = *depth;
                let file = self.layers[d].file.clone();
                run_in(&model, "qemu-img", &["snapshot", "-a", tag, &file]);
                let taken_at = self.layers[d]
                    .snapshots
                    .iter()
                    .find(|(t, _)| t == tag)
                    .unwrap()
                    .1;
                self.layers[d].size = taken_at;
                if d > 0 {
                    self.model_revert_to_layer(d);
                }
            }
            Step::DeleteInternal { depth, tag, name } => {
                self.command(m, "delete", name, &format!("delete {name}"));
                let file = self.layers[*depth].file.clone();
                run_in(&model, "qemu-img", &["snapshot", "-d", tag, &file]);
                self.layers[*depth].snapshots.retain(|(t, _)| t != tag);
            }
            Step::Refused { file, text, why } => {
                let label = match *file {
                    "commit" => format!("commit {text}"),
                    verb => format!("{verb} {text}"),
                };
                if control(&mp, file, text).is_ok() {
                    panic!(
                        "`echo {text} > control/{file}` succeeded; snapfs must refuse it ({why})"
                    );
                }
                assert_outcome_error(&mp, &label);
                return;
            }
        }
        if let Some((owner, before)) = kept {
            for (tag, content) in before {
                let view = ViewSpec {
                    path: String::new(),
                    depth: owner,
                    tag: Some(tag.clone()),
                };
                if self.qemu_view(&model, &view) != content {
                    panic!(
                        "{step:?} succeeded, but internal snapshot {tag:?} of {} now reads \
                         differently (through its new backing file): snapfs must refuse it",
                        self.layers[owner].file
                    );
                }
            }
        }
        self.content.clear();
        self.rename();
    }

    /// The model of a revert to layer `d`: the top emptied as `qemu-img commit` empties an image
    /// (its internal snapshots stay), at layer `d`'s size, over layer `d`; the layers between
    /// leave.
    fn model_revert_to_layer(&mut self, d: usize) {
        let model = self.model.clone();
        let top = self.layers[0].file.clone();
        let target = self.layers[d].clone();
        let old_size = self.layers[0].size;
        // Emptied as `qemu-img commit` empties an image (its internal snapshots stay):
        // committed into a scratch image put under it; resized over the scratch image
        // (so that growing does not zero the new end, as it would over a larger
        // backing file), then pointed at the layer.
        let scratch = ".scratch.qcow2";
        run_in(
            &model,
            "qemu-img",
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                scratch,
                &old_size.to_string(),
            ],
        );
        run_in(
            &model,
            "qemu-img",
            &[
                "rebase", "-u", "-f", "qcow2", "-b", scratch, "-F", "qcow2", &top,
            ],
        );
        run_in(&model, "qemu-img", &["commit", "-q", "-f", "qcow2", &top]);
        if target.size != old_size {
            run_in(
                &model,
                "qemu-img",
                &[
                    "resize",
                    "-q",
                    "--shrink",
                    "-f",
                    "qcow2",
                    &top,
                    &target.size.to_string(),
                ],
            );
        }
        rebase(&model, Rebase::Unsafe, &top, Some(&target));
        fs::remove_file(model.join(scratch)).unwrap();
        self.layers[0].size = target.size;
        self.layers.drain(1..d);
    }

    /// A `delete` of a layer or a `pull` removes layers under a layer that may have internal
    /// snapshots; snapfs refuses it when one of them reads through the layers that leave (it
    /// judges by their mappings, which the model does not track). Such a command is issued
    /// here. `None`: it was refused, with a message naming the reason, and changed nothing (the
    /// next check proves that). `Some(None)`: no snapshot to guard, the step issues its command
    /// itself. `Some(Some((owner, contents)))`: it succeeded; the snapshots of layer `owner`
    /// must still read `contents` in the model afterwards.
    #[allow(clippy::type_complexity)]
    fn guarded_command(
        &mut self,
        m: &Mount,
        step: &Step,
    ) -> Option<Option<(usize, Vec<(String, Vec<u8>)>)>> {
        let (owner, file, text, label) = match step {
            Step::DeleteLayer { depth, name } => {
                (depth - 1, "delete", name.clone(), format!("delete {name}"))
            }
            Step::Pull {
                base: Some((_, name)),
            } => (0, "pull", name.clone(), format!("pull {name}")),
            Step::Pull { base: None } => (0, "pull", String::new(), "pull (all)".to_owned()),
            _ => return Some(None),
        };
        let tags: Vec<String> = self.layers[owner]
            .snapshots
            .iter()
            .map(|(t, _)| t.clone())
            .collect();
        if tags.is_empty() {
            return Some(None);
        }
        let before: Vec<(String, Vec<u8>)> = tags
            .into_iter()
            .map(|tag| {
                let view = ViewSpec {
                    path: format!("snapshots/{}.raw", self.view_name(owner, Some(&tag))),
                    depth: owner,
                    tag: Some(tag.clone()),
                };
                let content = self.model_view(&view);
                (tag, content)
            })
            .collect();
        if control(m.path(), file, &text).is_ok() {
            assert_outcome_ok(m.path(), &label);
            return Some(Some((owner, before)));
        }
        let why = assert_outcome_error(m.path(), &label);
        assert!(
            why.contains("content would change"),
            "`{label}` was refused for another reason than the snapshots reading through: {why}"
        );
        None
    }

    // -----------------------------------------------------------------------------------------
    // Checking
    // -----------------------------------------------------------------------------------------

    /// The mount against the model; returns every difference.
    fn verify(&mut self, m: &Mount) -> Vec<String> {
        let mut problems = Vec::new();
        let views = self.views();
        let want: BTreeSet<String> = views
            .iter()
            .filter_map(|v| v.path.strip_prefix("snapshots/").map(str::to_owned))
            .collect();
        let got = m.snapshot_names();
        if got != want {
            problems.push(format!("snapshots/ lists {got:?}, the model {want:?}"));
        }
        for view in &views {
            let file = m.path().join(&view.path);
            // A missing view is reported above.
            if let Some(name) = view.path.strip_prefix("snapshots/")
                && !got.contains(name)
            {
                continue;
            }
            let expect = self.model_view(view);
            if let Some(d) = diff_bytes(&read_whole(&file), &expect) {
                problems.push(format!(
                    "{} (layer {}, {:?}): {d}",
                    view.path, self.layers[view.depth].file, view.tag
                ));
            }
        }
        // The files as QEMU reads them while mounted (snapfs writes its metadata through).
        fsync(&m.live());
        for layer in &self.layers {
            if layer.fmt != Fmt::Qcow2 {
                continue;
            }
            let path = self.prod.join(&layer.file);
            let hash = file_hash(&path);
            if self.checked.get(&layer.file) == Some(&hash) {
                continue;
            }
            match check_shared(&path) {
                Ok(()) => {
                    self.checked.insert(layer.file.clone(), hash);
                }
                Err(e) => problems.push(format!("qemu-img check -U {}: {e}", layer.file)),
            }
        }
        problems
    }

    /// Unmounted: both folders clean, snapfs's chain and files per qemu-img equal the model's.
    fn verify_files(&mut self, when: &str) {
        let context = format!("seed {} {when}", self.seed);
        for (file, hash) in &self.left {
            assert_eq!(
                file_hash(&self.prod.join(file)),
                *hash,
                "{context}: {file} left the chain and must stay byte for byte as it was"
            );
        }
        // The chain's files (those that left were clean when they left, and stay as they were).
        for layer in self.layers.iter().filter(|l| l.fmt == Fmt::Qcow2) {
            assert_check_clean(
                &self.prod.join(&layer.file),
                &format!("{context} (snapfs's files)"),
            );
            assert_check_clean(
                &self.model.join(&layer.file),
                &format!("{context} (the model's files)"),
            );
        }
        let want: Vec<String> = self.layers.iter().map(|l| l.file.clone()).collect();
        assert_eq!(
            chain_files(&self.top_path(), &self.prod),
            want,
            "{context}: the chain of snapfs's files per qemu-img vs the model"
        );
        for layer in &self.layers {
            if layer.fmt == Fmt::Qcow2 {
                let tags = snapshot_tags(&self.prod.join(&layer.file));
                let want: Vec<String> = layer.snapshots.iter().map(|(t, _)| t.clone()).collect();
                assert_eq!(
                    tags, want,
                    "{context}: internal snapshots of {}",
                    layer.file
                );
            }
        }
        for view in self.views() {
            let got = self.qemu_view(&self.prod, &view);
            let want = self.model_view(&view);
            if let Some(d) = diff_bytes(&got, &want) {
                panic!(
                    "{context}: {} per qemu-img on snapfs's {} vs the model: {d}\nsteps:\n{}",
                    view.path,
                    self.layers[view.depth].file,
                    self.log.join("\n")
                );
            }
        }
    }

    fn fail(&self, i: usize, what: &str, m: &Mount) -> ! {
        panic!(
            "seed {}: step {i}: {what}\nchain now: {}\nsteps:\n{}\ncontrol/status:\n{}\nsnapfs stderr:\n{}",
            self.seed,
            self.describe_chain(),
            self.log.join("\n"),
            status_text(m.path()),
            m.stderr_text()
        );
    }
}

/// Every control file is one the model drives (see [`MODELLED_COMMANDS`]).
/// How `qemu-img rebase` changes the backing file: `Safe` copies into the image what its guest
/// would read differently over the new one; `Unsafe` (`-u`) only rewrites the header.
#[derive(Clone, Copy)]
enum Rebase {
    Safe,
    Unsafe,
}

/// `qemu-img rebase` of `file` (a qcow2 image in `dir`) onto `onto` (`None`: no backing file).
fn rebase(dir: &Path, how: Rebase, file: &str, onto: Option<&ModelLayer>) {
    let mode = match how {
        Rebase::Safe => "-q",
        Rebase::Unsafe => "-u",
    };
    let mut args = vec!["rebase", mode, "-f", "qcow2", "-b"];
    match onto {
        Some(layer) => args.extend([layer.file.as_str(), "-F", layer.fmt.name()]),
        None => args.push(""),
    }
    args.push(file);
    run_in(dir, "qemu-img", &args);
}

fn commands_are_modelled(m: &Mount) -> Result<(), String> {
    let dir = m.path().join("control");
    let got: BTreeSet<String> = fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    let want: BTreeSet<String> = MODELLED_COMMANDS.iter().map(|s| s.to_string()).collect();
    if got == want {
        Ok(())
    } else {
        Err(format!(
            "control/ holds {got:?}, the chain model knows {want:?}: add the new command to the model (Step::Pull)"
        ))
    }
}

fn run_seed(default_seed: u64) {
    let seed = env_number("SNAPFS_CHAIN_MODEL_SEED").unwrap_or(default_seed);
    let steps = env_number("SNAPFS_CHAIN_MODEL_STEPS").map_or(STEPS, |n| n as usize);
    eprintln!("chain model: seed {seed} (replay: SNAPFS_CHAIN_MODEL_SEED={seed}), {steps} steps");
    let t = Instant::now();
    let work = workdir();
    let prod = work.path().join("prod");
    let model = work.path().join("model");
    fs::create_dir_all(&prod).unwrap();
    let mut run = Run {
        seed,
        rng: Rng::new(seed),
        prod,
        model,
        layers: Vec::new(),
        session_names: HashMap::new(),
        names: BTreeMap::new(),
        content: HashMap::new(),
        checked: HashMap::new(),
        left: BTreeMap::new(),
        counter: 0,
        log: Vec::new(),
    };
    run.build();
    run.rename();
    run.log.push(format!("start: {}", run.describe_chain()));
    let mut kinds: BTreeMap<String, u64> = BTreeMap::new();
    let mut mount = Some(Mount::new(&run.top_path()));
    let mut deadline = Some(Deadline::new(
        mount.as_ref().unwrap().path(),
        LIMIT,
        "chain model",
    ));
    if let Err(e) = commands_are_modelled(mount.as_ref().unwrap()) {
        panic!("{e}");
    }
    let mut remounts = 0;
    for i in 0..steps {
        let step = run.pick();
        run.log.push(format!("{i}: {step:?}"));
        let kind = format!("{step:?}");
        let kind = kind.split([' ', '(', '{']).next().unwrap().to_owned();
        *kinds.entry(kind).or_insert(0) += 1;
        {
            let m = mount.as_ref().unwrap();
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run.apply(m, &step)));
            if let Err(e) = r {
                run.fail(i, &format!("{step:?} failed: {}", panic_text(&*e)), m);
            }
            let problems = run.verify(m);
            if !problems.is_empty() {
                run.fail(
                    i,
                    &format!(
                        "after {step:?} the mount differs from the model:\n- {}",
                        problems.join("\n- ")
                    ),
                    m,
                );
            }
        }
        if (i + 1) % REMOUNT_EVERY == 0 || i + 1 == steps {
            deadline.take();
            mount.take();
            run.verify_files(&format!("after step {i}, unmounted"));
            // A fresh mount knows no `create --external` names: layers go by their files.
            run.session_names.clear();
            run.names.clear();
            run.rename();
            let m = Mount::new(&run.top_path());
            deadline = Some(Deadline::new(m.path(), LIMIT, "chain model"));
            let problems = run.verify(&m);
            if !problems.is_empty() {
                run.fail(
                    i,
                    &format!(
                        "after remounting the mount differs from the model:\n- {}",
                        problems.join("\n- ")
                    ),
                    &m,
                );
            }
            mount = Some(m);
            remounts += 1;
        }
    }
    deadline.take();
    mount.take();
    eprintln!(
        "chain model: seed {seed}: {steps} steps {kinds:?}, {remounts} remounts, chain at the end: {}; {:.1} s",
        run.describe_chain(),
        t.elapsed().as_secs_f64()
    );
}

#[test]
fn model_seed_1_one_qcow2_image() {
    run_seed(1);
}

#[test]
fn model_seed_2_qcow2_over_raw() {
    run_seed(2);
}

#[test]
fn model_seed_3_three_qcow2_layers() {
    run_seed(3);
}

#[test]
fn model_seed_4_three_qcow2_over_raw() {
    run_seed(4);
}

#[test]
fn model_seed_5_five_qcow2_layers() {
    run_seed(5);
}
