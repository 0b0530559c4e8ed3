//! Refused chain commands (issue 5; docs/design.md section 3, "Errors"): EBUSY while a view that the
//! command would change or remove is open, EINVAL for impossible commands, ENOENT for unknown
//! names, EEXIST for an external snapshot onto an existing file or a taken name, EROFS on
//! read-only mounts. A refused command changes nothing: every file keeps its bytes, snapshots/
//! keeps its names, the status log has an error line, and the same command succeeds once the
//! reason is gone.

use std::collections::BTreeSet;
use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::common::chain_support::*;
use crate::common::snapshot_support::{control, control_err, control_ok, errno_name, status_text};
use crate::common::*;

/// Chain A (see [`chain_a`]) in a fresh folder.
fn setup() -> (tempfile::TempDir, PathBuf) {
    let w = workdir();
    let top = chain_a(w.path());
    (w, top)
}

/// The state a refused command must not change: file digests, snapshot names, live content.
struct Snapshot {
    digests: std::collections::BTreeMap<String, String>,
    names: BTreeSet<String>,
    live: Vec<u8>,
}

fn state(root: &Path, m: &Mount) -> Snapshot {
    Snapshot {
        digests: digests(root),
        names: m.snapshot_names(),
        live: fs::read(m.live()).unwrap(),
    }
}

fn assert_unchanged(root: &Path, m: &Mount, before: &Snapshot, context: &str) {
    let after = state(root, m);
    assert_digests_equal(&before.digests, &after.digests, context);
    assert_eq!(
        before.names, after.names,
        "{context}: snapshots/ changed after a refused command"
    );
    assert!(
        before.live == after.live,
        "{context}: live.raw changed after a refused command"
    );
}

/// Runs a command that must succeed now that the files are closed. The kernel tells a FUSE
/// server about a close (RELEASE) asynchronously, so an EBUSY within moments of the close is
/// retried for up to 5 s.
fn ok_after_close(mp: &Path, file: &str, text: &str) {
    let t0 = Instant::now();
    loop {
        match control(mp, file, text) {
            Err(e) if e == libc::EBUSY && t0.elapsed() < Duration::from_secs(5) => {
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => panic!(
                "`{text}` > control/{file} failed with {} although nothing is open any more; \
                 status:\n{}",
                errno_name(e),
                status_text(mp)
            ),
            Ok(()) => return,
        }
    }
}

/// Runs a command that must be refused with `errno` and leave everything as it was; the status
/// log must show `LABEL: error: ...`.
fn refused(root: &Path, m: &Mount, file: &str, text: &str, errno: i32, label: &str) -> String {
    let before = state(root, m);
    control_err(m.path(), file, text, errno);
    let msg = assert_outcome_error(m.path(), label);
    assert_unchanged(root, m, &before, &format!("`{text}` > control/{file}"));
    msg
}

#[test]
fn commit_refused_while_the_target_view_is_open() {
    let (w, top) = setup();
    let root = w.path();
    let m = Mount::new(&top);

    // commit of the top writes into upper: upper.raw open -> EBUSY
    let f = File::open(m.snapshot("upper.raw")).unwrap();
    refused(root, &m, "commit", "", libc::EBUSY, "commit (top)");
    drop(f);

    // commit of mid writes into base: base.raw open -> EBUSY (and mid.raw would go away)
    let f = File::open(m.snapshot("base.raw")).unwrap();
    let msg = refused(root, &m, "commit", "mid", libc::EBUSY, "commit mid");
    assert!(
        msg.contains("base"),
        "the message should name the open view: {msg:?}"
    );
    drop(f);
    let f = File::open(m.snapshot("mid.raw")).unwrap();
    refused(root, &m, "commit", "mid", libc::EBUSY, "commit mid");
    drop(f);

    // closed again: both succeed
    ok_after_close(m.path(), "commit", "mid");
    assert_outcome_ok(m.path(), "commit mid");
    ok_after_close(m.path(), "commit", "");
    assert_outcome_ok(m.path(), "commit (top)");
    let names = m.snapshot_names();
    assert!(
        !names.contains("mid.raw") && names.contains("base.raw"),
        "{names:?}"
    );
}

#[test]
fn delete_refused_while_the_layer_view_is_open() {
    let (w, top) = setup();
    let root = w.path();
    let m = Mount::new(&top);
    for view in ["mid.raw", "mid@ms.raw"] {
        let f = File::open(m.snapshot(view)).unwrap();
        let msg = refused(root, &m, "delete", "mid", libc::EBUSY, "delete mid");
        assert!(msg.contains("mid"), "{msg:?}");
        drop(f);
    }
    ok_after_close(m.path(), "delete", "mid");
    assert_outcome_ok(m.path(), "delete mid");
    assert!(!m.snapshot_names().contains("mid.raw"));
}

/// What QEMU says when it opens `image` itself, without `-U` (so that any lock snapfs still
/// holds on it refuses it): a reader (`qemu-img info`) and a writer (`qemu-io` opens read-write
/// and takes QEMU's "write" lock, which snapfs's lock on a backing file does not share).
/// `None` when both got in.
fn qemu_refuses(image: &Path) -> Option<String> {
    let info = run_status(Command::new("qemu-img").arg("info").arg(image));
    let writer = run_status(Command::new("qemu-io").args(["-c", "flush"]).arg(image));
    let refused: Vec<String> = [("qemu-img info", info), ("qemu-io (read-write)", writer)]
        .into_iter()
        .filter(|(_, out)| !out.status.success())
        .map(|(what, out)| format!("{what}: {}", String::from_utf8_lossy(&out.stderr).trim()))
        .collect();
    (!refused.is_empty()).then(|| refused.join("; "))
}

/// A layer that leaves the chain leaves snapfs: after `delete mid`, QEMU opens sub/mid.qcow2
/// again (reader and writer: no lock of snapfs is left on it) while the mount stays up. A
/// change file opened before the delete still reads through the chain it was opened on, so the
/// file is let go once that last reader is closed (the kernel tells snapfs of a close
/// asynchronously: up to 5 s).
#[test]
fn a_deleted_layer_is_unlocked_once_no_reader_uses_it() {
    let (w, top) = setup();
    let mid = w.path().join("sub").join("mid.qcow2");
    let m = Mount::new(&top);
    // A reader of the old chain: base..live reads live.raw's view, which reads through mid.
    let mut reader = File::open(m.path().join("changes").join("base..live.raw")).unwrap();
    let mut head = [0u8; 4096];
    std::io::Read::read_exact(&mut reader, &mut head).unwrap();
    control_ok(m.path(), "delete", "mid");
    assert_outcome_ok(m.path(), "delete mid");
    drop(reader);
    let t0 = Instant::now();
    while let Some(refused) = qemu_refuses(&mid) {
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "{} left the chain and nothing reads it any more, yet QEMU is kept out of it: \
             {refused}",
            mid.display()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(is_mounted(m.path()), "the mount went away");
    assert!(
        !m.snapshot_names().contains("mid.raw"),
        "mid.raw is still listed after its delete"
    );
}

/// `pull`: the top's snapshot t1 reads through every layer, so any pull that drops a layer is
/// refused naming it (EINVAL); once t1 is gone, an open view of a layer that would leave the
/// chain refuses it (EBUSY); closed, it runs. Nothing changes while refused.
#[test]
fn pull_refused_for_a_snapshot_that_reads_through_or_an_open_layer_view() {
    let (w, top) = setup();
    let root = w.path();
    let m = Mount::new(&top);
    for (text, label) in [
        ("", "pull (all)"),
        ("base", "pull base"),
        ("mid", "pull mid"),
    ] {
        let msg = refused(root, &m, "pull", text, libc::EINVAL, label);
        assert!(
            msg.contains("\"t1\"") && msg.matches("top.qcow2").count() == 1,
            "the refusal should name t1 and the top once: {msg}"
        );
    }
    // not a layer: an internal snapshot, the top itself, an unknown name
    refused(root, &m, "pull", "mid@ms", libc::EINVAL, "pull mid@ms");
    refused(root, &m, "pull", "nosuch", libc::ENOENT, "pull nosuch");
    // BASE is already the top's backing file: nothing to do, nothing changes
    let before = state(root, &m);
    control_ok(m.path(), "pull", "upper");
    let detail = assert_outcome_ok(m.path(), "pull upper").unwrap_or_default();
    assert!(detail.contains("nothing to pull"), "{detail:?}");
    assert_unchanged(root, &m, &before, "pull upper");

    control_ok(m.path(), "delete", "t1");
    for view in ["upper.raw", "mid.raw", "mid@ms.raw"] {
        let f = File::open(m.snapshot(view)).unwrap();
        let msg = refused(root, &m, "pull", "base", libc::EBUSY, "pull base");
        assert!(
            msg.contains(view),
            "the message should name {view}: {msg:?}"
        );
        drop(f);
    }
    // base's views stay in the chain: open, they do not stop the pull
    let f = File::open(m.snapshot("base@bs.raw")).unwrap();
    ok_after_close(m.path(), "pull", "base");
    assert_outcome_ok(m.path(), "pull base");
    drop(f);
    let names = m.snapshot_names();
    assert_eq!(
        names,
        ["base.raw", "base@bs.raw"]
            .iter()
            .map(|n| n.to_string())
            .collect::<BTreeSet<_>>()
    );
}

#[test]
fn revert_to_a_layer_refused_while_live_raw_is_open() {
    let (w, top) = setup();
    let root = w.path();
    let m = Mount::new(&top);
    let f = File::open(m.live()).unwrap();
    refused(root, &m, "revert", "mid", libc::EBUSY, "revert mid");
    drop(f);
    let f = fs::OpenOptions::new().write(true).open(m.live()).unwrap();
    refused(root, &m, "revert", "mid", libc::EBUSY, "revert mid");
    drop(f);
    ok_after_close(m.path(), "revert", "mid");
    assert_outcome_ok(m.path(), "revert mid");
    assert!(!m.snapshot_names().contains("upper.raw"));
}

#[test]
fn impossible_and_unknown_commands_are_clean_errors() {
    let (w, top) = setup();
    let root = w.path();
    let m = Mount::new(&top);

    // the bottom layer has no backing file to commit into
    refused(root, &m, "commit", "base", libc::EINVAL, "commit base");
    // the layer above upper (the top) has an internal snapshot that reads through upper: the
    // message names it, and the top's path once
    let msg = refused(root, &m, "delete", "upper", libc::EINVAL, "delete upper");
    assert!(msg.contains("\"t1\""), "the refusal should name t1: {msg}");
    assert_eq!(
        msg.matches("top.qcow2").count(),
        1,
        "the refusal should name the top once: {msg}"
    );
    // an internal snapshot is not a layer that can be committed
    refused(root, &m, "commit", "t1", libc::EINVAL, "commit t1");
    // unknown names
    refused(root, &m, "commit", "nosuch", libc::ENOENT, "commit nosuch");
    refused(root, &m, "delete", "nosuch", libc::ENOENT, "delete nosuch");
    refused(root, &m, "revert", "nosuch", libc::ENOENT, "revert nosuch");

    // the top is not a snapshot: "live" and the top's file stem are no view names
    for name in ["live", "live.raw", "top"] {
        let before = state(root, &m);
        match control(m.path(), "delete", name) {
            Err(e) if e == libc::ENOENT || e == libc::EINVAL => {}
            Err(e) => panic!(
                "delete {name}: refused with {} (ENOENT or EINVAL expected); status:\n{}",
                errno_name(e),
                status_text(m.path())
            ),
            Ok(()) => panic!(
                "delete {name} succeeded; the top is not a deletable snapshot; status:\n{}",
                status_text(m.path())
            ),
        }
        assert_outcome_error(m.path(), &format!("delete {name}"));
        assert_unchanged(root, &m, &before, &format!("delete {name}"));
    }
}

#[test]
fn external_create_onto_an_existing_file_or_name() {
    let (w, top) = setup();
    let root = w.path();
    // a file already at the default place of snapshot "y"
    let squatter = root.join("top.y.qcow2");
    create_qcow2(&squatter, MIB, "", None);
    let m = Mount::new(&top);

    refused(
        root,
        &m,
        "create",
        "x --external upper.qcow2",
        libc::EEXIST,
        "create x",
    );
    refused(
        root,
        &m,
        "create",
        "x --external sub/mid.qcow2",
        libc::EEXIST,
        "create x",
    );
    refused(root, &m, "create", "y --external", libc::EEXIST, "create y");
    // names taken by an internal snapshot and by a layer
    refused(
        root,
        &m,
        "create",
        "t1 --external",
        libc::EEXIST,
        "create t1",
    );
    refused(
        root,
        &m,
        "create",
        "base --external fresh.qcow2",
        libc::EEXIST,
        "create base",
    );
    assert!(!root.join("fresh.qcow2").exists());
    assert!(!root.join("top.t1.qcow2").exists());

    // with a free name and file it works
    control_ok(m.path(), "create", "x --external");
    assert_outcome_ok(m.path(), "create x");
    assert!(root.join("top.x.qcow2").is_file());
}

#[test]
fn read_only_mount_refuses_chain_commands() {
    let (w, top) = setup();
    let root = w.path();
    let m = Mount::with_args(&top, &["-r"]);
    for (file, text) in [
        ("commit", ""),
        ("commit", "mid"),
        ("create", "e --external"),
        ("create", "e --external other.qcow2"),
        ("delete", "mid"),
        ("revert", "mid"),
        ("pull", ""),
        ("pull", "base"),
    ] {
        let before = state(root, &m);
        match control(m.path(), file, text) {
            Err(e) if e == libc::EROFS => {}
            Err(e) => panic!(
                "`{text}` > control/{file} on a -r mount: {} (EROFS expected); status:\n{}",
                errno_name(e),
                status_text(m.path())
            ),
            Ok(()) => panic!("`{text}` > control/{file} succeeded on a read-only mount"),
        }
        // A read-only FUSE mount may refuse the open in the kernel, before snapfs sees the
        // command; a status line is required only if snapfs got to log one.
        let status = status_text(m.path());
        if let Some(o) = status.lines().rev().find_map(parse_outcome) {
            assert!(
                o.result.is_err(),
                "`{text}` > control/{file} (-r): the status log shows {o:?}, not an error:\n{status}"
            );
        }
        assert_unchanged(
            root,
            &m,
            &before,
            &format!("`{text}` > control/{file} (-r)"),
        );
    }
    assert!(!root.join("top.e.qcow2").exists() && !root.join("other.qcow2").exists());
}

#[test]
fn cli_errors_are_one_line() {
    let (w, top) = setup();
    let root = w.path();
    let m = Mount::new(&top);
    let before = state(root, &m);
    for (args, what) in [
        (vec!["commit", "MP", "base"], "commit of the bottom layer"),
        (vec!["commit", "MP", "nosuch"], "commit of an unknown layer"),
        (
            vec!["snapshot", "delete", "MP", "nosuch"],
            "delete of an unknown snapshot",
        ),
    ] {
        let mut c = snapfs_cmd();
        for a in &args {
            if *a == "MP" {
                c.arg(m.path());
            } else {
                c.arg(a);
            }
        }
        let out = run_timeout(&mut c, Duration::from_secs(60));
        let status = out.status.expect("the CLI finished");
        assert!(
            !status.success(),
            "{what}: snapfs {args:?} exited 0\nstdout: {}\nstderr: {}",
            out.stdout,
            out.stderr
        );
        let err = out.stderr.trim();
        assert!(
            !err.is_empty() && err.lines().count() == 1 && !err.contains("panicked"),
            "{what}: snapfs {args:?} should print one line on stderr, printed:\n{}",
            out.stderr
        );
    }
    assert_unchanged(root, &m, &before, "refused CLI commands");
}
