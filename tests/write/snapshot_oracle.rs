//! Internal snapshots through snapfs against qemu-img on a copy (issue 4, "How it is checked",
//! first point). The same sequence of writes, creates, reverts and deletes is done on image A
//! through a snapfs mount (pwrite/fallocate on `live.raw`, `echo ... > control/...`) and on a
//! copy B with `qemu-io` and `qemu-img snapshot -c/-a/-d`. At every checkpoint:
//! - while A is still mounted, `live.raw` and every `snapshots/NAME.raw` equal B's live disk and
//!   B's snapshot NAME (size and bytes), and `snapshots/` lists exactly the expected names;
//! - after unmounting, `qemu-img compare A B` finds the live disks identical, `qemu-img snapshot
//!   -l` lists the same snapshots (names and ids, in order) in A and B, every snapshot's content
//!   (`qemu-img convert -l snapshot.name=NAME`) is the same in A and B, and `qemu-img check` finds
//!   A clean (no corruption, no leak).
//!
//! One test per image variety: v2, v3 with 16-bit refcounts, 64-bit refcounts, 1-bit refcounts
//! (where creating a snapshot must fail cleanly), extended L2, compressed, backed, 120 snapshots,
//! and growing the disk then reverting to a smaller snapshot.

use std::fs::{self, OpenOptions};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::common::images::pattern_cmds;
use crate::common::snapshot_support::*;
use crate::common::*;

/// Per-segment time limit for the work on the mount.
const SEGMENT_LIMIT: Duration = Duration::from_secs(120);

#[derive(Debug, Clone)]
enum Op {
    /// `write -P PAT OFF LEN` / pwrite of LEN bytes PAT.
    Write { off: u64, len: u64, pat: u8 },
    /// `write -z OFF LEN` / zeroing through live.raw.
    Zero { off: u64, len: u64, how: ZeroHow },
    /// `qemu-img snapshot -c NAME` / `echo "NAME [DESCRIPTION]" > control/create`.
    Create { name: String, desc: Option<String> },
    /// `qemu-img snapshot -a NAME` / `echo NAME > control/revert`.
    Revert(String),
    /// `qemu-img snapshot -d NAME` / `echo NAME > control/delete`.
    Delete(String),
    /// `qemu-img resize +N` / `truncate -s +N live.raw`.
    Grow(u64),
    /// Unmount and compare everything.
    Check,
}

fn create(name: &str) -> Op {
    Op::Create {
        name: name.to_string(),
        desc: None,
    }
}

fn create_desc(name: &str, desc: &str) -> Op {
    Op::Create {
        name: name.to_string(),
        desc: Some(desc.to_string()),
    }
}

fn revert(name: &str) -> Op {
    Op::Revert(name.to_string())
}

fn delete(name: &str) -> Op {
    Op::Delete(name.to_string())
}

/// Generation `generation` of the shared data pattern ([`pattern_cmds`]) as ops; the zeroing
/// method through snapfs rotates with the generation (punch hole, zero range, written zeros).
fn pattern_ops(cs: u64, size: u64, generation: u64, sub: Option<u64>) -> Vec<Op> {
    let how = match generation % 3 {
        0 => ZeroHow::Punch,
        1 => ZeroHow::ZeroRange,
        _ => ZeroHow::Write,
    };
    pattern_cmds(cs, size, generation, sub, true)
        .iter()
        .map(|c| {
            let w: Vec<&str> = c.split_whitespace().collect();
            match w.as_slice() {
                ["write", "-P", pat, off, len] => Op::Write {
                    off: off.parse().unwrap(),
                    len: len.parse().unwrap(),
                    pat: u8::from_str_radix(pat.trim_start_matches("0x"), 16).unwrap(),
                },
                ["write", "-z", off, len] => Op::Zero {
                    off: off.parse().unwrap(),
                    len: len.parse().unwrap(),
                    how,
                },
                _ => panic!("unexpected pattern command {c:?}"),
            }
        })
        .collect()
}

/// The sequence every variety runs: data generations `g0+1..`, snapshots taken over written data,
/// data rewritten after each (copy-on-write of shared clusters), reverts with writes before and
/// after, deletes of the snapshot the live disk came from and of others, and a name used again
/// after its snapshot was deleted (in a later mount).
fn standard_sequence(cs: u64, size: u64, sub: Option<u64>, g0: u64) -> Vec<Op> {
    let g = |k: u64| pattern_ops(cs, size, g0 + k, sub);
    let mut v = Vec::new();
    v.extend(g(1));
    v.push(Op::Check);
    v.push(create("s1"));
    v.push(Op::Check);
    v.extend(g(2));
    v.push(create_desc("s2", "after generation two"));
    v.push(Op::Check);
    v.extend(g(3));
    v.push(revert("s1"));
    v.push(Op::Check);
    v.extend(g(4));
    v.push(create("s3"));
    v.push(delete("s1"));
    v.push(Op::Check);
    v.push(revert("s2"));
    v.push(delete("s2"));
    v.extend(g(5));
    v.push(Op::Check);
    v.push(create("s1"));
    v.extend(g(6));
    v.push(delete("s3"));
    v.push(revert("s1"));
    v.push(Op::Check);
    // writes before and after reverts within one mount (L2 tables copied on write, then
    // dropped by the revert, then new ones allocated)
    v.extend(g(7));
    v.push(revert("s1"));
    v.extend(g(8));
    v.push(create("s4"));
    v.extend(g(9));
    v.push(revert("s1"));
    v.extend(g(10));
    v.push(delete("s4"));
    v.push(Op::Check);
    v
}

/// Image A (through snapfs) and its copy B (through qemu-img), with the snapshot names expected
/// in both, in table order.
struct Pair {
    a: PathBuf,
    b: PathBuf,
    tags: Vec<String>,
    /// Other names `snapshots/` shows (backing layers).
    layers: Vec<String>,
    /// When set, only these snapshots' contents are compared (large snapshot counts).
    sample: Option<Vec<String>>,
    checkpoints: usize,
    what: String,
    /// The disk size changes (snapshots of different sizes).
    sizes_vary: bool,
    /// Compare `snapshots/NAME.raw` with live.raw right after each create.
    check_each_create: bool,
}

impl Pair {
    /// B is a copy of A made now (in the same directory, so relative backing names resolve).
    fn new(a: &Path, what: &str) -> Pair {
        let b = a.with_file_name(format!(
            "{}-qemu.qcow2",
            a.file_stem().unwrap().to_string_lossy()
        ));
        fs::copy(a, &b).unwrap();
        let tags = snapshot_tags(a);
        Pair {
            a: a.to_path_buf(),
            b,
            tags,
            layers: Vec::new(),
            sample: None,
            checkpoints: 0,
            what: what.to_string(),
            sizes_vary: false,
            check_each_create: true,
        }
    }

    fn run(&mut self, ops: &[Op]) {
        let mut seg: Vec<Op> = Vec::new();
        for op in ops {
            if let Op::Check = op {
                self.segment(&seg);
                seg.clear();
            } else {
                seg.push(op.clone());
            }
        }
        if !seg.is_empty() {
            self.segment(&seg);
        }
    }

    fn compared_tags(&self) -> Vec<String> {
        match &self.sample {
            None => self.tags.clone(),
            Some(s) => self
                .tags
                .iter()
                .filter(|t| s.contains(t))
                .cloned()
                .collect(),
        }
    }

    fn segment(&mut self, ops: &[Op]) {
        self.checkpoints += 1;
        let ctx = format!("{} checkpoint {}", self.what, self.checkpoints);
        apply_qemu(&self.b, ops);
        {
            let m = Mount::new(&self.a);
            let _deadline = Deadline::new(m.path(), SEGMENT_LIMIT, &ctx);
            for (i, op) in ops.iter().enumerate() {
                let tags = &mut self.tags;
                let each = self.check_each_create;
                let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    apply_snapfs(&m, op, tags, each, &ctx)
                }));
                if let Err(e) = r {
                    panic!(
                        "{ctx}: step {i} of the segment, {op:?}, failed through snapfs: {}\n\
                         control/status:\n{}\nsnapfs stderr:\n{}",
                        panic_text(&*e),
                        status_text(m.path()),
                        m.stderr_text()
                    );
                }
            }
            let problems = self.check_mounted(&m);
            if !problems.is_empty() {
                panic!(
                    "{ctx}: the mount of A differs from qemu-img's B:\n- {}\ncontrol/status:\n{}\nsnapfs stderr:\n{}",
                    problems.join("\n- "),
                    status_text(m.path()),
                    m.stderr_text()
                );
            }
        }
        self.check_images(&ctx);
    }

    /// The mounted views of A against B's content.
    fn check_mounted(&self, m: &Mount) -> Vec<String> {
        let mut problems = Vec::new();
        let want_live = qemu_content(&self.b, None);
        let got_live = read_whole(&m.live());
        if file_size(&m.live()) != want_live.len() as u64 {
            problems.push(format!(
                "live.raw st_size {} but B's disk is {} bytes",
                file_size(&m.live()),
                want_live.len()
            ));
        }
        if let Some(d) = diff_bytes(&got_live, &want_live) {
            problems.push(format!("live.raw vs B: {d}"));
        }
        let names = snapshot_dir_names(m.path());
        let want: std::collections::BTreeSet<String> =
            self.tags.iter().chain(&self.layers).cloned().collect();
        if names != want {
            problems.push(format!("snapshots/ lists {names:?}, expected {want:?}"));
        }
        for tag in self.compared_tags() {
            let f = m.snapshot(&format!("{tag}.raw"));
            let want = qemu_snapshot_content(&self.b, &tag);
            match fs::metadata(&f) {
                Err(e) => {
                    problems.push(format!("{}: {e}", f.display()));
                    continue;
                }
                Ok(md) => {
                    use std::os::unix::fs::MetadataExt;
                    if md.mode() & 0o222 != 0 {
                        problems.push(format!("{}: has write bits", f.display()));
                    }
                    if md.len() != want.len() as u64 {
                        problems.push(format!(
                            "snapshots/{tag}.raw st_size {} but B's snapshot is {} bytes",
                            md.len(),
                            want.len()
                        ));
                    }
                }
            }
            if let Some(d) = diff_bytes(&read_whole(&f), &want) {
                problems.push(format!("snapshots/{tag}.raw vs B's snapshot {tag}: {d}"));
            }
        }
        problems
    }

    /// After unmounting: qemu-img compare, snapshot lists, snapshot contents, check.
    fn check_images(&self, ctx: &str) {
        let mut problems = Vec::new();
        let (sa, sb) = (virtual_size(&self.a), virtual_size(&self.b));
        if sa != sb {
            problems.push(format!("virtual size of A {sa} but B {sb}"));
        }
        let out = run_status(
            Command::new("qemu-img")
                .args(["compare", "-f", "qcow2", "-F", "qcow2"])
                .arg(&self.a)
                .arg(&self.b),
        );
        if !out.status.success() {
            problems.push(format!(
                "qemu-img compare A B: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        let la: Vec<(String, String)> = snapshots(&self.a)
            .into_iter()
            .map(|s| (s.id, s.name))
            .collect();
        let lb: Vec<(String, String)> = snapshots(&self.b)
            .into_iter()
            .map(|s| (s.id, s.name))
            .collect();
        let names_a: Vec<String> = la.iter().map(|(_, n)| n.clone()).collect();
        if names_a != self.tags {
            problems.push(format!(
                "qemu-img snapshot -l A lists {names_a:?}, expected {:?}",
                self.tags
            ));
        }
        if la != lb {
            problems.push(format!(
                "snapshot tables differ (id, name): A {la:?}, B {lb:?}"
            ));
        }
        for s in snapshots(&self.a) {
            if s.vm_state_size != 0 {
                problems.push(format!(
                    "snapshot {} has vm-state-size {}",
                    s.name, s.vm_state_size
                ));
            }
        }
        for tag in self.compared_tags() {
            let ca = qemu_content(&self.a, Some(&tag));
            let cb = qemu_content(&self.b, Some(&tag));
            if let Some(d) = diff_bytes(&ca, &cb) {
                problems.push(format!(
                    "qemu-img convert -l snapshot.name={tag}: A vs B: {d}"
                ));
            }
            if self.sizes_vary {
                // the whole snapshot at its own size (qemu-img snapshot -a on copies); convert -l
                // reads only the current disk size
                let ca = qemu_snapshot_content(&self.a, &tag);
                let cb = qemu_snapshot_content(&self.b, &tag);
                if let Some(d) = diff_bytes(&ca, &cb) {
                    problems.push(format!("snapshot {tag} applied with qemu-img: A vs B: {d}"));
                }
            }
        }
        let r = check_json(&self.a);
        if !r.clean() {
            problems.push(format!(
                "qemu-img check A: exit {:?}, {} corruptions, {} leaks, {} errors:\n{}",
                r.exit, r.corruptions, r.leaks, r.check_errors, r.text
            ));
        }
        let rb = check_json(&self.b);
        assert!(
            rb.clean(),
            "{ctx}: the oracle B itself is not clean: {}",
            rb.text
        );
        if !problems.is_empty() {
            panic!(
                "{ctx}: A (snapfs) and B (qemu-img) differ:\n- {}",
                problems.join("\n- ")
            );
        }
    }
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// Runs `ops` on B with qemu-io / qemu-img (consecutive writes in one qemu-io call).
fn apply_qemu(b: &Path, ops: &[Op]) {
    let mut io: Vec<String> = Vec::new();
    let flush = |io: &mut Vec<String>| {
        if !io.is_empty() {
            qemu_io_s(b, io);
            io.clear();
        }
    };
    for op in ops {
        match op {
            Op::Write { off, len, pat } => io.push(format!("write -P {pat:#04x} {off} {len}")),
            Op::Zero { off, len, .. } => io.push(format!("write -z {off} {len}")),
            Op::Create { name, .. } => {
                flush(&mut io);
                qemu_snapshot(b, "-c", name);
            }
            Op::Revert(name) => {
                flush(&mut io);
                qemu_snapshot(b, "-a", name);
            }
            Op::Delete(name) => {
                flush(&mut io);
                qemu_snapshot(b, "-d", name);
            }
            Op::Grow(n) => {
                flush(&mut io);
                qemu_img(&["resize", "-q", "-f", "qcow2", p(b), &format!("+{n}")]);
            }
            Op::Check => unreachable!(),
        }
    }
    flush(&mut io);
}

/// Runs one op through the mount, checking each command's status line and its effect on
/// `snapshots/` at once.
fn apply_snapfs(m: &Mount, op: &Op, tags: &mut Vec<String>, check_create: bool, ctx: &str) {
    let mp = m.path();
    let live = m.live();
    match op {
        Op::Write { off, len, pat } => pwrite(&live, *off, &vec![*pat; *len as usize]),
        Op::Zero { off, len, how } => zero_range(&live, *off, *len, *how),
        Op::Create { name, desc } => {
            let text = match desc {
                Some(d) => format!("{name} {d}"),
                None => name.clone(),
            };
            control_ok(mp, "create", &text);
            assert_status_ok(mp, &format!("create {name}"));
            let f = m.snapshot(&format!("{name}.raw"));
            assert!(
                f.exists(),
                "{ctx}: snapshots/{name}.raw does not exist right after create (snapshots/: {:?})",
                snapshot_dir_names(mp)
            );
            if check_create {
                let (s, l) = (read_whole(&f), read_whole(&live));
                if let Some(d) = diff_bytes(&s, &l) {
                    panic!(
                        "{ctx}: snapshots/{name}.raw right after create differs from live.raw: {d}"
                    );
                }
            }
            tags.push(name.clone());
        }
        Op::Revert(name) => {
            control_ok(mp, "revert", name);
            assert_status_ok(mp, &format!("revert {name}"));
        }
        Op::Delete(name) => {
            control_ok(mp, "delete", name);
            assert_status_ok(mp, &format!("delete {name}"));
            assert!(
                !m.snapshot(&format!("{name}.raw")).exists(),
                "{ctx}: snapshots/{name}.raw still exists after delete"
            );
            tags.retain(|t| t != name);
        }
        Op::Grow(n) => {
            let f = OpenOptions::new().write(true).open(&live).unwrap();
            let cur = f.metadata().unwrap().len();
            f.set_len(cur + n)
                .unwrap_or_else(|e| panic!("{ctx}: truncate -s +{n} live.raw: {e}"));
        }
        Op::Check => unreachable!(),
    }
}

const SIZE: u64 = 16 * MIB;

fn timed(what: &str, f: impl FnOnce()) {
    let t = Instant::now();
    f();
    eprintln!("{what}: {:.1} s", t.elapsed().as_secs_f64());
}

fn variety(what: &str, opts: &str, cs: u64, sub: Option<u64>) {
    timed(what, || {
        let dir = workdir();
        let a = dir.path().join("a.qcow2");
        create_qcow2(&a, SIZE, opts, None);
        let mut pair = Pair::new(&a, what);
        pair.run(&standard_sequence(cs, SIZE, sub, 0));
    });
}

#[test]
fn v2_compat_0_10() {
    variety("v2", "compat=0.10", 64 * KIB, None);
}

#[test]
fn v3_refcount_bits_16() {
    variety(
        "v3 refcount_bits=16",
        "compat=1.1,cluster_size=65536,refcount_bits=16",
        64 * KIB,
        None,
    );
}

#[test]
fn v3_refcount_bits_64() {
    variety("v3 refcount_bits=64", "refcount_bits=64", 64 * KIB, None);
}

#[test]
fn extended_l2() {
    variety(
        "extended_l2",
        "extended_l2=on,cluster_size=65536",
        64 * KIB,
        Some(2 * KIB),
    );
}

#[test]
fn compressed_image() {
    timed("compressed", || {
        let dir = workdir();
        let src = dir.path().join("src.qcow2");
        create_qcow2(&src, SIZE, "", None);
        images::fill(&src, 64 * KIB, SIZE, 1, None);
        images::fill(&src, 64 * KIB, SIZE, 2, None);
        qemu_io(&src, &["write -P 0x3c 0 4M"]);
        let a = dir.path().join("a.qcow2");
        qemu_img(&["convert", "-q", "-c", "-O", "qcow2", p(&src), p(&a)]);
        let mut pair = Pair::new(&a, "compressed");
        // a snapshot over purely compressed data first, then the standard sequence
        pair.run(&[create("packed"), Op::Check]);
        pair.run(&standard_sequence(64 * KIB, SIZE, None, 2));
    });
}

#[test]
fn backed_image() {
    timed("backed", || {
        let dir = workdir();
        let base = dir.path().join("base.qcow2");
        create_qcow2(&base, SIZE, "", None);
        images::fill(&base, 64 * KIB, SIZE, 1, None);
        qemu_io(&base, &["write -P 0x5b 0 3M"]);
        let a = dir.path().join("a.qcow2");
        create_qcow2(&a, SIZE, "", Some(("base.qcow2", "qcow2")));
        let base_before = read_all(&base);
        let mut pair = Pair::new(&a, "backed");
        pair.layers = vec!["base".to_string()];
        // a snapshot of the empty overlay (all reads go to the backing file)
        pair.run(&[create("empty"), Op::Check]);
        pair.run(&standard_sequence(64 * KIB, SIZE, None, 2));
        pair.run(&[revert("empty"), Op::Check]);
        assert!(read_all(&base) == base_before, "the backing file changed");
    });
}

#[test]
fn refcount_bits_1_create_fails_cleanly() {
    timed("refcount_bits=1", || {
        let dir = workdir();
        let a = dir.path().join("a.qcow2");
        create_qcow2(&a, SIZE, "refcount_bits=1", None);
        images::fill(&a, 64 * KIB, SIZE, 1, None);
        let b = dir.path().join("b.qcow2");
        fs::copy(&a, &b).unwrap();

        // 1. The create fails, and nothing visible changes.
        let errno;
        let message;
        {
            let m = Mount::new(&a);
            let mp = m.path();
            let _deadline = Deadline::new(mp, SEGMENT_LIMIT, "refcount_bits=1");
            let live_before = read_whole(&m.live());
            match control(mp, "create", "s1") {
                Ok(()) => panic!(
                    "create on a refcount_bits=1 image succeeded (1-bit refcounts cannot count \
                     two references); status:\n{}",
                    status_text(mp)
                ),
                Err(e) => errno = e,
            }
            message = assert_status_error(mp, "create s1");
            assert!(
                snapshot_dir_names(mp).is_empty(),
                "a failed create left {:?} in snapshots/",
                snapshot_dir_names(mp)
            );
            if let Some(d) = diff_bytes(&read_whole(&m.live()), &live_before) {
                panic!("live.raw changed by the failed create: {d}");
            }
            control_err(mp, "revert", "s1", libc::ENOENT);
            control_err(mp, "delete", "s1", libc::ENOENT);
        }
        let qemu = run_status(
            Command::new("qemu-img")
                .args(["snapshot", "-c", "s1"])
                .arg(&b),
        );
        assert!(
            !qemu.status.success(),
            "qemu-img snapshot -c succeeded on refcount_bits=1"
        );
        let ra = assert_check_no_corruption(&a, "refcount_bits=1 right after the failed create");
        let rb = check_json(&b);
        eprintln!(
            "refcount_bits=1: snapfs refused create with {} ({message}); qemu-img check: snapfs image \
             {} leaks, qemu-img's copy {} leaks",
            errno_name(errno),
            ra.leaks,
            rb.leaks
        );
        let corrupt = info_json(&a)["format-specific"]["data"]["corrupt"].as_bool();
        assert_ne!(
            corrupt,
            Some(true),
            "the failed create marked the image corrupt"
        );
        assert!(
            snapshot_tags(&a).is_empty(),
            "A lists snapshots {:?}",
            snapshot_tags(&a)
        );
        let out = run_status(Command::new("qemu-img").arg("compare").arg(&a).arg(&b));
        assert!(
            out.status.success(),
            "live disk after the failed create differs from qemu-img's: {}",
            String::from_utf8_lossy(&out.stdout)
        );

        // 2. The disk still takes writes afterwards (a new mount).
        {
            let m = Mount::new(&a);
            let _deadline = Deadline::new(m.path(), SEGMENT_LIMIT, "refcount_bits=1 writes");
            for op in pattern_ops(64 * KIB, SIZE, 2, None) {
                let mut tags = Vec::new();
                let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    apply_snapfs(&m, &op, &mut tags, true, "refcount_bits=1")
                }));
                if let Err(e) = r {
                    panic!(
                        "refcount_bits=1: {op:?} after the failed create: {}\nsnapfs stderr:\n{}",
                        panic_text(&*e),
                        m.stderr_text()
                    );
                }
            }
        }
        apply_qemu(&b, &pattern_ops(64 * KIB, SIZE, 2, None));
        assert_check_no_corruption(
            &a,
            "refcount_bits=1 after writes that followed the failed create",
        );
        let out = run_status(Command::new("qemu-img").arg("compare").arg(&a).arg(&b));
        assert!(
            out.status.success(),
            "live disk differs from qemu-img's: {}",
            String::from_utf8_lossy(&out.stdout)
        );
    });
}

#[test]
fn many_snapshots() {
    timed("120 snapshots", || {
        const N: usize = 120;
        let size = 8 * MIB;
        let cs = 4 * KIB;
        let dir = workdir();
        let a = dir.path().join("a.qcow2");
        create_qcow2(&a, size, "cluster_size=4096", None);
        qemu_io(&a, &["write -P 0x11 0 8M"]);
        let name = |i: usize| format!("snap-{i:03}");
        let mut pair = Pair::new(&a, "120 snapshots");
        pair.sample = Some([0, 1, 60, 61, 118, 119].iter().map(|&i| name(i)).collect());
        pair.check_each_create = false;
        let mut ops = Vec::new();
        for i in 0..N {
            // one cluster (and the next one's first half) that differs per snapshot
            let off = ((i as u64 * 37) % (size / cs - 2)) * cs;
            ops.push(Op::Write {
                off,
                len: cs + cs / 2,
                pat: (i as u8).wrapping_mul(7) | 1,
            });
            ops.push(create(&name(i)));
        }
        ops.push(Op::Check);
        for i in (0..N).step_by(2) {
            ops.push(delete(&name(i)));
        }
        ops.push(Op::Check);
        ops.push(Op::Write {
            off: 0,
            len: 64 * KIB,
            pat: 0xee,
        });
        ops.push(revert(&name(61)));
        ops.push(Op::Write {
            off: 3 * MIB,
            len: 100 * KIB,
            pat: 0xef,
        });
        ops.push(Op::Check);
        pair.run(&ops);
        assert!(pair.tags.len() == N / 2);
    });
}

#[test]
fn grow_then_revert_to_smaller_snapshot() {
    timed("grow/revert", || {
        let dir = workdir();
        let a = dir.path().join("a.qcow2");
        create_qcow2(&a, SIZE, "", None);
        let mut pair = Pair::new(&a, "grow/revert");
        pair.sizes_vary = true;
        let mut ops = pattern_ops(64 * KIB, SIZE, 1, None);
        ops.extend([
            create("small"),
            Op::Grow(8 * MIB),
            Op::Write {
                off: 20 * MIB,
                len: MIB,
                pat: 0x77,
            },
            Op::Write {
                off: 24 * MIB - 512,
                len: 512,
                pat: 0x78,
            },
            Op::Write {
                off: SIZE - 4096,
                len: 8192,
                pat: 0x79,
            },
            create("big"),
            Op::Check,
            revert("small"),
            Op::Check,
            Op::Write {
                off: 0,
                len: MIB,
                pat: 0x7a,
            },
            revert("big"),
            Op::Check,
            revert("small"),
            delete("big"),
            Op::Grow(4 * MIB),
            Op::Write {
                off: 19 * MIB,
                len: 64 * KIB,
                pat: 0x7b,
            },
            Op::Check,
        ]);
        pair.run(&ops);
        assert_eq!(virtual_size(&a), 20 * MIB);
    });
}

/// Small sequences in one mount where clusters that held active L2 tables are freed and then
/// allocated again: a snapshot taken, data rewritten (the L2 table is copied; the old one now
/// belongs to the snapshot only), then the snapshot deleted (the old L2 table is freed) and a
/// new snapshot taken (its metadata may land in the freed cluster).
#[test]
fn create_after_deleting_a_snapshot_whose_l2_was_copied() {
    timed("delete/create reuse", || {
        let dir = workdir();
        let a = dir.path().join("a.qcow2");
        create_qcow2(&a, SIZE, "", None);
        let mut pair = Pair::new(&a, "delete/create reuse");
        let mut ops = pattern_ops(64 * KIB, SIZE, 1, None);
        ops.push(Op::Check);
        ops.push(create("a"));
        ops.extend(pattern_ops(64 * KIB, SIZE, 2, None));
        ops.push(delete("a"));
        ops.push(create("b"));
        ops.push(create("c"));
        ops.extend(pattern_ops(64 * KIB, SIZE, 3, None));
        ops.push(Op::Check);
        pair.run(&ops);
    });
}

/// A snapshot taken, data rewritten (L2 tables copied), the snapshot reverted to (the copies are
/// freed), then data written again in the same mount (new L2 tables allocated).
#[test]
fn write_after_revert_in_one_mount() {
    timed("revert/write", || {
        let dir = workdir();
        let a = dir.path().join("a.qcow2");
        create_qcow2(&a, SIZE, "", None);
        let mut pair = Pair::new(&a, "revert/write");
        let mut ops = pattern_ops(64 * KIB, SIZE, 1, None);
        ops.push(Op::Check);
        ops.push(create("a"));
        ops.extend(pattern_ops(64 * KIB, SIZE, 2, None));
        ops.push(revert("a"));
        ops.extend(pattern_ops(64 * KIB, SIZE, 3, None));
        ops.push(Op::Check);
        pair.run(&ops);
    });
}

/// A history written by QEMU in which a snapshot's L2 table carries COPIED flags: S and T share
/// the tables, the live disk is rewritten (its tables are copied), then `qemu-img snapshot -d T`
/// drops the data only S and T held to refcount 1 and sets COPIED on those entries of the table
/// S now owns alone. Reverting to S must not take that table as it is (its flags are wrong for a
/// table the live disk shares): snapfs gives the live disk a corrected copy. Then writes, and S
/// deleted, which leaves the live disk the table's only owner.
#[test]
fn revert_to_a_snapshot_whose_tables_qemu_flagged_copied() {
    timed("qemu-flagged tables", || {
        let dir = workdir();
        let a = dir.path().join("a.qcow2");
        create_qcow2(&a, SIZE, "", None);
        qemu_io(&a, &[&format!("write -P 0x41 0 {}", SIZE / 2)]);
        qemu_snapshot(&a, "-c", "S");
        qemu_snapshot(&a, "-c", "T");
        qemu_io(&a, &[&format!("write -P 0x42 0 {}", SIZE / 4)]);
        qemu_snapshot(&a, "-d", "T");
        assert_check_clean(&a, "the history qemu wrote");
        let mut pair = Pair::new(&a, "qemu-flagged tables");
        let mut ops = vec![revert("S"), Op::Check];
        ops.extend(pattern_ops(64 * KIB, SIZE, 4, None));
        ops.push(Op::Check);
        ops.push(delete("S"));
        ops.extend(pattern_ops(64 * KIB, SIZE, 5, None));
        ops.push(Op::Check);
        pair.run(&ops);
    });
}
