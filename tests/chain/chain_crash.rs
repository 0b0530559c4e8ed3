//! `kill -9` during chain operations (issue 5: "a kill -9 at any moment of a commit, pull or
//! external create leaves every file consistent for qemu-img check, and the live disk's content
//! is never lost"; docs/design.md section 5): commit of the top, delete of a layer (pulled into
//! the layer above), `pull` into the top, external create.
//!
//! For each operation the test first runs it once to completion (to time it), then on fresh
//! copies of the chain kills the `snapfs mount -f` server with SIGKILL at random moments, one in
//! each of a series of windows spread over that time (the shared crash harness,
//! `tests/common/crash.rs`, with its seeded generator), unmounts (`umount`, `umount -l`), and
//! checks:
//! - `qemu-img check` finds no corruption and no errors in any file (leaked clusters are allowed);
//! - the live content — `qemu-img convert` of the top through whatever chain its header now
//!   names — equals the content before the operation (commit and pull never change it; an
//!   external create either happened or not, and the new overlay, if present, reads the same);
//! - once per operation, snapfs mounts the result again and live.raw reads the same.
//!
//! Every kill is reported on stderr (`--nocapture` shows them).

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use crate::common::chain_support::*;
use crate::common::crash::{CrashOptions, CrashWorkload, Kill, crash_loop};
use crate::common::snapshot_support::{control, errno_name};
use crate::common::write_support::Rng;
use crate::common::*;

const SIZE: u64 = 256 * MIB;

/// Times one uninterrupted run of the command on a copy of `template`, checking it succeeds.
fn time_once(template: &Path, work: &Path, top_rel: &str, file: &str, command: &str) -> Duration {
    let dir = work.join("timed");
    copy_dir(template, &dir);
    let m = Mount::new(&dir.join(top_rel));
    let t0 = Instant::now();
    crate::common::snapshot_support::control_ok(m.path(), file, command);
    let full = t0.elapsed();
    drop(m);
    assert_all_clean(&dir, "after the uninterrupted run");
    fs::remove_dir_all(&dir).ok();
    full
}

/// Kill windows spread over an operation that takes `full`: the first milliseconds, then equal
/// slices of the run and a little past its end. One kill per window, at a random moment in it.
fn kill_windows(full: Duration, slices: u32) -> Vec<(Duration, Duration)> {
    let mut v = vec![(Duration::ZERO, Duration::from_millis(2))];
    let span = full + Duration::from_millis(50);
    for i in 0..slices {
        v.push((span * i / slices, span * (i + 1) / slices));
    }
    v
}

/// The live content: `qemu-img convert` of `top` through whatever chain its header now names
/// must equal `before`.
fn check_content(dir: &Path, top: &Path, before: &Path) -> Result<u64, String> {
    let got = convert_to_raw(top, None);
    let r = compare_files(&got, before);
    fs::remove_file(&got).ok();
    r.map_err(|e| {
        format!(
            "the live content (qemu-img convert of {}, chain {:?}) changed: {e}",
            top.display(),
            chain_files(top, dir)
        )
    })?;
    Ok(fs::metadata(before).map(|m| m.len()).unwrap_or(0))
}

/// Mounts `top` again with snapfs: live.raw must equal `before`.
fn check_remount(top: &Path, before: &Path) -> Result<(), String> {
    let m = Mount::new(top);
    compare_files(&m.live(), before)
        .map_err(|e| format!("after remounting, live.raw differs from before: {e}"))
}

/// A further check of a crashed copy (the directory, the content before): e.g. the overlay an
/// external create may have left.
type ExtraCheck = fn(&Path, &Path) -> Result<u64, String>;

/// One chain operation, killed once per window on a fresh copy of the template: `echo COMMAND >
/// control/FILE`, the write's return time and result handed back.
struct ChainOp {
    template: PathBuf,
    work: PathBuf,
    top_rel: String,
    file: String,
    command: String,
    /// The live content before (and, as commit and pull never change it, after) the operation.
    before: PathBuf,
    windows: Vec<(Duration, Duration)>,
    extra: ExtraCheck,
    /// The copy of the current iteration.
    dir: PathBuf,
    reports: Vec<String>,
    /// Kills after which the command had returned / was cut off.
    returned: u64,
    cut_off: u64,
    /// Kills after which an external create's overlay was on disk.
    overlays: u64,
}

impl ChainOp {
    fn new(
        template: &Path,
        work: &Path,
        top_rel: &str,
        file: &str,
        command: &str,
        windows: Vec<(Duration, Duration)>,
        extra: ExtraCheck,
    ) -> ChainOp {
        ChainOp {
            template: template.to_path_buf(),
            work: work.to_path_buf(),
            top_rel: top_rel.to_string(),
            file: file.to_string(),
            command: command.to_string(),
            before: convert_to_raw(&template.join(top_rel), None),
            windows,
            extra,
            dir: PathBuf::new(),
            reports: Vec::new(),
            returned: 0,
            cut_off: 0,
            overlays: 0,
        }
    }

    fn options(&self) -> CrashOptions {
        CrashOptions {
            iterations: self.windows.len() as u64,
            budget: Duration::from_secs(100),
            min_kills: 3,
            ..Default::default()
        }
    }
}

impl CrashWorkload for ChainOp {
    type Outcome = (Instant, Result<(), String>);

    fn image(&mut self, it: u64) -> PathBuf {
        self.dir = self.work.join(format!("kill{it}"));
        copy_dir(&self.template, &self.dir);
        self.dir.join(&self.top_rel)
    }

    /// Every qcow2 file of the copy: the chain, and an overlay an external create left.
    fn check_files(&self, _top: &Path) -> Vec<PathBuf> {
        qcow2_files(&self.dir)
    }

    fn kill_delay(&mut self, it: u64, rng: &mut Rng) -> Duration {
        let (lo, hi) = self.windows[it as usize];
        let us = rng.range(lo.as_micros() as u64, hi.as_micros() as u64);
        Duration::from_micros(us)
    }

    fn start(
        &mut self,
        _it: u64,
        mp: &Path,
        _seed: u64,
        _stop: Arc<AtomicBool>,
    ) -> Box<dyn FnOnce() -> Self::Outcome + Send> {
        let (mp, file, command) = (mp.to_path_buf(), self.file.clone(), self.command.clone());
        Box::new(move || {
            let r = control(&mp, &file, &command).map_err(errno_name);
            (Instant::now(), r)
        })
    }

    fn verify(
        &mut self,
        top: &Path,
        kill: &Kill,
        (returned_at, result): Self::Outcome,
    ) -> Result<u64, String> {
        let before_kill = returned_at < kill.at;
        let line = format!(
            "{}: `{}` > control/{}: {}; overlay on disk: {}",
            kill.context(),
            self.command,
            self.file,
            if before_kill {
                format!("the command had returned ({result:?})")
            } else {
                format!("cut off, the write then got {result:?}")
            },
            self.dir.join("top.e.qcow2").exists()
        );
        eprintln!("{line}");
        self.reports.push(line);
        if before_kill {
            self.returned += 1;
            if let Err(e) = &result {
                return Err(format!("the command failed before the kill: {e}"));
            }
        } else {
            self.cut_off += 1;
        }
        self.overlays += self.dir.join("top.e.qcow2").exists() as u64;
        let mut bytes = check_content(&self.dir, top, &self.before)?;
        bytes += (self.extra)(&self.dir, &self.before)?;
        // Once per operation, snapfs itself reads the crashed result.
        if kill.iteration == self.windows.len() as u64 / 2 {
            check_remount(top, &self.before)?;
            bytes += fs::metadata(&self.before).map(|m| m.len()).unwrap_or(0);
        }
        fs::remove_dir_all(&self.dir).ok();
        Ok(bytes)
    }

    fn summary(&self) -> String {
        format!(
            "`{}` > control/{}: returned before the kill {}, cut off {}, overlay left {}",
            self.command, self.file, self.returned, self.cut_off, self.overlays
        )
    }
}

/// Times the operation, then kills it once per window of [`kill_windows`].
fn crash_test(test: &str, template: &Path, work: &Path, top_rel: &str, file: &str, command: &str) {
    let full = time_once(template, work, top_rel, file, command);
    let windows = kill_windows(full, 8);
    eprintln!("`{command}` > control/{file}: uninterrupted run {full:?}; kill windows {windows:?}");
    let mut w = ChainOp::new(template, work, top_rel, file, command, windows, no_extra);
    crash_loop(test, &w.options(), &mut w);
}

fn no_extra(_: &Path, _: &Path) -> Result<u64, String> {
    Ok(0)
}

/// base.qcow2 (data, 256 MiB) <- top.qcow2 with 96 MiB of data, zero clusters over base data,
/// scattered writes.
fn commit_template(dir: &Path) -> PathBuf {
    let base = dir.join("base.qcow2");
    create_qcow2(&base, SIZE, "", None);
    qemu_io_s(
        &base,
        &[
            format!("write -P 0x11 0 {}", 32 * MIB),
            format!("write -P 0x12 {} {}", 100 * MIB, 32 * MIB),
        ],
    );
    let top = dir.join("top.qcow2");
    create_qcow2(&top, SIZE, "", Some(("base.qcow2", "qcow2")));
    qemu_io_s(
        &top,
        &[
            format!("write -P 0xab {} {}", 16 * MIB, 96 * MIB),
            format!("write -z {} {}", 104 * MIB, 8 * MIB),
            format!("write -P 0xac {} {}", 200 * MIB + 512, 3 * MIB),
            format!("write -P 0xad {} 4096", SIZE - 4096),
        ],
    );
    top
}

#[test]
fn kill9_during_commit_of_the_top() {
    let w = workdir();
    let template = w.path().join("template");
    fs::create_dir_all(&template).unwrap();
    commit_template(&template);
    crash_test(
        "kill9_during_commit_of_the_top",
        &template,
        w.path(),
        "top.qcow2",
        "commit",
        "",
    );
}

/// base.qcow2 <- mid.qcow2 (64 MiB of data, zero clusters) <- top.qcow2 (no snapshots, a little
/// data): `delete mid` pulls mid into top.
fn pull_template(dir: &Path) -> PathBuf {
    let base = dir.join("base.qcow2");
    create_qcow2(&base, SIZE, "", None);
    qemu_io_s(
        &base,
        &[
            format!("write -P 0x11 0 {}", 32 * MIB),
            format!("write -P 0x12 {} {}", 100 * MIB, 32 * MIB),
        ],
    );
    let mid = dir.join("mid.qcow2");
    create_qcow2(&mid, SIZE, "", Some(("base.qcow2", "qcow2")));
    qemu_io_s(
        &mid,
        &[
            format!("write -P 0x21 {} {}", 8 * MIB, 64 * MIB),
            format!("write -z {} {}", 104 * MIB, 8 * MIB),
            format!("write -P 0x22 {} 4096", SIZE - 4096),
        ],
    );
    let top = dir.join("top.qcow2");
    create_qcow2(&top, SIZE, "", Some(("mid.qcow2", "qcow2")));
    qemu_io_s(
        &top,
        &[
            format!("write -P 0x31 {} {}", 20 * MIB, 2 * MIB),
            format!("write -P 0x32 {} {}", 106 * MIB, MIB),
        ],
    );
    top
}

#[test]
fn kill9_during_pull_of_a_layer() {
    let w = workdir();
    let template = w.path().join("template");
    fs::create_dir_all(&template).unwrap();
    pull_template(&template);
    crash_test(
        "kill9_during_pull_of_a_layer",
        &template,
        w.path(),
        "top.qcow2",
        "delete",
        "mid",
    );
}

/// `pull` (every layer) into the top of the same chain: the top copies mid's and base's data,
/// then stands alone.
#[test]
fn kill9_during_pull_into_the_top() {
    let w = workdir();
    let template = w.path().join("template");
    fs::create_dir_all(&template).unwrap();
    pull_template(&template);
    crash_test(
        "kill9_during_pull_into_the_top",
        &template,
        w.path(),
        "top.qcow2",
        "pull",
        "",
    );
}

/// After a kill during `create e --external`: the new overlay, if it was left on disk, must be a
/// sound qcow2 image (the harness checked it) over the old top that reads the same (nothing was
/// written to it).
fn overlay_check(dir: &Path, before: &Path) -> Result<u64, String> {
    let overlay = dir.join("top.e.qcow2");
    if !overlay.exists() {
        return Ok(0);
    }
    let len = fs::metadata(&overlay).map(|m| m.len()).unwrap_or(0);
    if image_format(&overlay) != "qcow2" {
        return Err(format!(
            "a partly written overlay was left behind: {} ({len} bytes, no qcow2 header); \
             a retry of the same create now fails with EEXIST",
            overlay.display()
        ));
    }
    let bytes =
        check_content(dir, &overlay, before).map_err(|e| format!("{e} (the new overlay)"))?;
    let chain = chain_files(&overlay, dir);
    if chain.first().map(String::as_str) != Some("top.e.qcow2")
        || chain.get(1).map(String::as_str) != Some("top.qcow2")
    {
        return Err(format!(
            "the overlay's chain is {chain:?}, expected top.e.qcow2 over top.qcow2"
        ));
    }
    Ok(bytes)
}

#[test]
fn kill9_during_external_create() {
    let w = workdir();
    let template = w.path().join("template");
    fs::create_dir_all(&template).unwrap();
    let base = template.join("base.qcow2");
    create_qcow2(&base, SIZE, "", None);
    qemu_io_s(&base, &[format!("write -P 0x11 0 {}", 8 * MIB)]);
    let top = template.join("top.qcow2");
    create_qcow2(&top, SIZE, "", Some(("base.qcow2", "qcow2")));
    snapshot_create(&top, "s");
    qemu_io_s(&top, &[format!("write -P 0xab {} {}", 4 * MIB, 8 * MIB)]);

    let full = time_once(&template, w.path(), "top.qcow2", "create", "e --external");
    // The create is quick: most kills in its first milliseconds, the rest over its duration.
    let mut windows: Vec<(Duration, Duration)> = [0u64, 100, 300, 700, 1500, 3000, 8000]
        .windows(2)
        .map(|p| (Duration::from_micros(p[0]), Duration::from_micros(p[1])))
        .collect();
    windows.extend(kill_windows(full, 6).into_iter().skip(1));
    eprintln!("create --external: uninterrupted run {full:?}; kill windows {windows:?}");
    let mut op = ChainOp::new(
        &template,
        w.path(),
        "top.qcow2",
        "create",
        "e --external",
        windows,
        overlay_check,
    );
    crash_loop("kill9_during_external_create", &op.options(), &mut op);
}
