//! `kill -9` during chain operations (issue 5: "a kill -9 at any moment of a commit, pull or
//! external create leaves every file consistent for qemu-img check, and the live disk's content
//! is never lost"; DESIGN.md section 5).
//!
//! For each operation the test first runs it once to completion (to time it), then on fresh
//! copies of the chain kills the `snapfs mount -f` server with SIGKILL at points spread over that
//! time, unmounts (`umount`, `umount -l`), and checks:
//! - `qemu-img check` finds no corruption and no errors in any file (leaked clusters are allowed);
//! - the live content — `qemu-img convert` of the top through whatever chain its header now
//!   names — equals the content before the operation (commit and pull never change it; an
//!   external create either happened or not, and the new overlay, if present, reads the same);
//! - once per operation, snapfs mounts the result again and live.raw reads the same.
//!
//! Every kill is reported on stderr (`--nocapture` shows them).

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::chain_support::*;
use common::snapshot_support::{Daemon, assert_check_no_corruption, control, errno_name};
use common::*;

const SIZE: u64 = 256 * MIB;

/// One kill: when, and what the command had done by then.
#[derive(Debug)]
struct Kill {
    delay: Duration,
    /// The write to the control file returned before the kill (Some(result)), or was cut off.
    returned_before_kill: Option<Result<(), String>>,
    /// What the write returned after the kill, if it had not returned before.
    after_kill: Option<Result<(), String>>,
}

/// Runs `echo COMMAND > control/FILE` on a mount of `top` and kills the server `delay` after
/// the write started. Returns what happened. The mount is gone when this returns.
fn kill_during(top: &Path, file: &str, command: &str, delay: Duration) -> Kill {
    let mut d = Daemon::start(top, &[]);
    let mp = d.mp.clone();
    let (tx, rx) = mpsc::channel();
    let (file_s, command_s) = (file.to_string(), command.to_string());
    let writer = std::thread::spawn(move || {
        let r = control(&mp, &file_s, &command_s).map_err(errno_name);
        let _ = tx.send((Instant::now(), r));
    });
    let t0 = Instant::now();
    if let Some(rest) = delay.checked_sub(t0.elapsed()) {
        std::thread::sleep(rest);
    }
    let early = rx.try_recv().ok();
    // anything that returns from now on may have been cut off by the kill
    let killed_at = Instant::now();
    d.kill9();
    let freed = d.finish();
    assert!(
        freed,
        "the mount point is still busy after kill -9 and umount -l"
    );
    let late = if early.is_none() {
        match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(v) => Some(v),
            Err(_) => panic!(
                "the write to control/{file} did not return within 30 s of killing the server"
            ),
        }
    } else {
        None
    };
    writer.join().unwrap();
    let (returned_before_kill, after_kill) = match (early, late) {
        (Some((_, r)), _) => (Some(r), None),
        (None, Some((t, r))) if t < killed_at => (Some(r), None),
        (None, Some((_, r))) => (None, Some(r)),
        (None, None) => (None, None),
    };
    Kill {
        delay,
        returned_before_kill,
        after_kill,
    }
}

/// Kill points spread over an operation that takes `full`: just after it starts, then fractions
/// of it, and a little past the end.
fn kill_points(full: Duration) -> Vec<Duration> {
    let mut v = vec![Duration::ZERO, Duration::from_millis(2)];
    for f in [0.05, 0.2, 0.4, 0.6, 0.8, 0.95] {
        v.push(full.mul_f64(f));
    }
    v.push(full + Duration::from_millis(50));
    v.sort();
    v.dedup();
    v
}

/// Times one uninterrupted run of the command on a copy of `template`, checking it succeeds.
fn time_once(template: &Path, work: &Path, top_rel: &str, file: &str, command: &str) -> Duration {
    let dir = work.join("timed");
    copy_dir(template, &dir);
    let m = Mount::new(&dir.join(top_rel));
    let t0 = Instant::now();
    common::snapshot_support::control_ok(m.path(), file, command);
    let full = t0.elapsed();
    drop(m);
    assert_all_clean(&dir, "after the uninterrupted run");
    fs::remove_dir_all(&dir).ok();
    full
}

/// Checks one crashed copy: no corruption anywhere, live content as before.
fn check_crashed(dir: &Path, top: &Path, before: &Path, what: &str) -> Result<(), String> {
    for f in qcow2_files(dir) {
        assert_check_no_corruption(&f, what);
    }
    let got = convert_to_raw(top, None);
    let r = compare_files(&got, before);
    fs::remove_file(&got).ok();
    r.map_err(|e| {
        format!(
            "{what}: the live content (qemu-img convert of {}, chain {:?}) changed: {e}",
            top.display(),
            chain_files(top, dir)
        )
    })
}

/// Mounts `top` again with snapfs: live.raw must equal `before`.
fn check_remount(top: &Path, before: &Path, what: &str) {
    let m = Mount::new(top);
    if let Err(e) = compare_files(&m.live(), before) {
        panic!("{what}: after remounting, live.raw differs from before: {e}");
    }
}

/// The common loop: time the operation, then kill at each point; returns the kill reports.
fn crash_loop(
    template: &Path,
    work: &Path,
    top_rel: &str,
    file: &str,
    command: &str,
    extra_check: &dyn Fn(&Path, &Path, &str) -> Result<(), String>,
) -> Vec<String> {
    let before = convert_to_raw(&template.join(top_rel), None);
    let full = time_once(template, work, top_rel, file, command);
    let points = kill_points(full);
    eprintln!("`{command}` > control/{file}: uninterrupted run {full:?}; kill points {points:?}");
    let mut reports = Vec::new();
    let mut failures = Vec::new();
    let budget = Instant::now();
    for (i, delay) in points.iter().enumerate() {
        if budget.elapsed() > Duration::from_secs(120) {
            reports.push(format!("stopped after {i} kills: time budget used up"));
            break;
        }
        let dir = work.join(format!("kill{i}"));
        copy_dir(template, &dir);
        let top = dir.join(top_rel);
        let k = kill_during(&top, file, command, *delay);
        let what = format!("kill -9 at {:?} of `{command}` > control/{file}", k.delay);
        let line = format!(
            "{what}: {}",
            match (&k.returned_before_kill, &k.after_kill) {
                (Some(r), _) => format!("the command had returned ({r:?})"),
                (None, Some(r)) => format!("cut off, the write then got {r:?}"),
                (None, None) => "?".to_string(),
            }
        );
        eprintln!("{line}");
        reports.push(line);
        if let Some(Err(e)) = &k.returned_before_kill {
            failures.push(format!("{what}: the command failed before the kill: {e}"));
        }
        if let Err(e) = check_crashed(&dir, &top, &before, &what) {
            failures.push(e);
        }
        if let Err(e) = extra_check(&dir, &before, &what) {
            failures.push(e);
        }
        if i == points.len() / 2 && failures.is_empty() {
            check_remount(&top, &before, &what);
        }
        fs::remove_dir_all(&dir).ok();
    }
    assert!(
        failures.is_empty(),
        "{} failure(s):\n- {}\nkills:\n{}",
        failures.len(),
        failures.join("\n- "),
        reports.join("\n")
    );
    reports
}

fn no_extra(_: &Path, _: &Path, _: &str) -> Result<(), String> {
    Ok(())
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
    let reports = crash_loop(&template, w.path(), "top.qcow2", "commit", "", &no_extra);
    eprintln!("{} kills during commit", reports.len());
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
    let reports = crash_loop(&template, w.path(), "top.qcow2", "delete", "mid", &no_extra);
    eprintln!("{} kills during the pull", reports.len());
}

/// After a kill during `create e --external`: the new overlay, if it was left on disk, must be a
/// sound qcow2 image over the old top that reads the same (nothing was written to it).
fn overlay_check(dir: &Path, before: &Path, what: &str) -> Result<(), String> {
    let overlay = dir.join("top.e.qcow2");
    if !overlay.exists() {
        return Ok(());
    }
    let len = fs::metadata(&overlay).unwrap().len();
    if image_format(&overlay) != "qcow2" {
        return Err(format!(
            "{what}: a partly written overlay was left behind: {} ({len} bytes, no qcow2 header); \
             a retry of the same create now fails with EEXIST",
            overlay.display()
        ));
    }
    check_crashed(dir, &overlay, before, what).map_err(|e| format!("{e} (the new overlay)"))?;
    let chain = chain_files(&overlay, dir);
    if chain.first().map(String::as_str) != Some("top.e.qcow2")
        || chain.get(1).map(String::as_str) != Some("top.qcow2")
    {
        return Err(format!(
            "{what}: the overlay's chain is {chain:?}, expected top.e.qcow2 over top.qcow2"
        ));
    }
    Ok(())
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

    let before = convert_to_raw(&top, None);
    let full = time_once(&template, w.path(), "top.qcow2", "create", "e --external");
    // the create is quick: kill points in the first milliseconds, and around its duration
    let mut points: Vec<Duration> = [0u64, 100, 300, 700, 1500, 3000, 8000]
        .iter()
        .map(|&us| Duration::from_micros(us))
        .collect();
    points.extend(kill_points(full).into_iter().skip(2));
    points.sort();
    points.dedup();
    eprintln!("create --external: uninterrupted run {full:?}; kill points {points:?}");
    let mut failures = Vec::new();
    let mut reports = Vec::new();
    let mut created = 0;
    for (i, delay) in points.iter().enumerate() {
        let dir = w.path().join(format!("kill{i}"));
        copy_dir(&template, &dir);
        let top = dir.join("top.qcow2");
        let k = kill_during(&top, "create", "e --external", *delay);
        let what = format!("kill -9 at {delay:?} of create e --external");
        let exists = dir.join("top.e.qcow2").exists();
        created += exists as usize;
        let line = format!(
            "{what}: returned before the kill: {:?}, after: {:?}; overlay on disk: {exists}",
            k.returned_before_kill, k.after_kill
        );
        eprintln!("{line}");
        reports.push(line);
        if let Err(e) = check_crashed(&dir, &top, &before, &what) {
            failures.push(e);
        }
        if let Err(e) = overlay_check(&dir, &before, &what) {
            failures.push(e);
        }
        if i == points.len() / 2 && failures.is_empty() {
            check_remount(&top, &before, &what);
        }
        fs::remove_dir_all(&dir).ok();
    }
    eprintln!(
        "{} kills during create --external; the overlay existed after {created}",
        points.len()
    );
    assert!(
        failures.is_empty(),
        "{} failure(s):\n- {}\nkills:\n{}",
        failures.len(),
        failures.join("\n- "),
        reports.join("\n")
    );
}
