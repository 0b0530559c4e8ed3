//! The errno rules of the snapshot control files (docs/design.md section 3, issue 4): one test per
//! rule. Every refused command must leave the image file byte-identical (read with std::fs
//! while mounted) and put `TIME LABEL: error: MESSAGE` in `control/status`. Also: the
//! `snapfs snapshot` wrapper's exit codes and output, `snapshots/` updating at once, and
//! `live.raw` showing reverted content although its pages were cached before the revert.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::common::snapshot_support::*;
use crate::common::*;

const SIZE: u64 = 8 * MIB;
const LIMIT: Duration = Duration::from_secs(60);

/// An 8 MiB image with data, and snapshot `pre` taken by qemu-img before mounting.
fn image(dir: &Path) -> PathBuf {
    let img = dir.join("disk.qcow2");
    create_qcow2(&img, SIZE, "", None);
    qemu_io(&img, &["write -P 0x21 0 1M", "write -P 0x22 4M 64k"]);
    snapshot_create(&img, "pre");
    qemu_io(&img, &["write -P 0x23 512k 1M"]);
    img
}

/// Runs `text` against `control/FILE`, expects `errno`, and checks that the image file did not
/// change, that `snapshots/` did not change, and that the status shows the error with `label`.
fn refused(m: &Mount, file: &str, text: &[u8], errno: i32, label: &str) -> String {
    let mp = m.path();
    fsync(&m.live());
    let before = read_all(m.image());
    let names = snapshot_dir_names(mp);
    let lines_before = status_lines(mp).len();
    match control_raw(mp, file, text) {
        Err(e) if e == errno => {}
        Err(e) => panic!(
            "control/{file} <- {:?}: {} but {} was expected; status:\n{}",
            String::from_utf8_lossy(text),
            errno_name(e),
            errno_name(errno),
            status_text(mp)
        ),
        Ok(()) => panic!(
            "control/{file} <- {:?} succeeded but {} was expected; status:\n{}",
            String::from_utf8_lossy(text),
            errno_name(errno),
            status_text(mp)
        ),
    }
    let after = read_all(m.image());
    if let Some(d) = diff_bytes(&after, &before) {
        panic!(
            "control/{file} <- {:?} was refused with {} but changed the image file: {d}",
            String::from_utf8_lossy(text),
            errno_name(errno)
        );
    }
    assert_eq!(
        snapshot_dir_names(mp),
        names,
        "refused command control/{file} <- {:?} changed snapshots/",
        String::from_utf8_lossy(text)
    );
    let lines = status_lines(mp);
    assert!(
        lines.len() > lines_before || lines.len() == 64,
        "control/{file} <- {:?}: no new status line; status:\n{}",
        String::from_utf8_lossy(text),
        lines.join("\n")
    );
    assert_status_error(mp, label)
}

fn mount(img: &Path) -> (Mount, Deadline) {
    let m = Mount::new(img);
    let d = Deadline::new(m.path(), LIMIT, "snapshot_errors");
    (m, d)
}

fn finish(img: &Path) {
    assert_check_clean(img, "after unmount");
}

#[test]
fn eexist_for_a_taken_name() {
    let dir = workdir();
    let img = image(dir.path());
    {
        let (m, _d) = mount(&img);
        let mp = m.path();
        control_ok(mp, "create", "s1");
        assert_status_ok(mp, "create s1");
        let msg = refused(&m, "create", b"s1\n", libc::EEXIST, "create s1");
        assert!(
            msg.contains("s1"),
            "the message should name the snapshot: {msg:?}"
        );
        refused(
            &m,
            "create",
            b"s1 with a description\n",
            libc::EEXIST,
            "create s1",
        );
        // a snapshot that was in the image before the mount
        refused(&m, "create", b"pre\n", libc::EEXIST, "create pre");
        // written without the trailing newline too
        refused(&m, "create", b"pre", libc::EEXIST, "create pre");
    }
    assert_eq!(snapshot_tags(&img), ["pre", "s1"]);
    finish(&img);
}

#[test]
fn enoent_for_revert_of_an_unknown_name() {
    let dir = workdir();
    let img = image(dir.path());
    {
        let (m, _d) = mount(&img);
        let live = read_whole(&m.live());
        let msg = refused(&m, "revert", b"nosuch\n", libc::ENOENT, "revert nosuch");
        assert!(msg.contains("nosuch"), "message {msg:?}");
        // case matters, and the prefix of an existing name is not that name
        refused(&m, "revert", b"PRE\n", libc::ENOENT, "revert PRE");
        refused(&m, "revert", b"pr\n", libc::ENOENT, "revert pr");
        assert!(read_whole(&m.live()) == live, "live.raw changed");
    }
    finish(&img);
}

#[test]
fn enoent_for_delete_of_an_unknown_name() {
    let dir = workdir();
    let img = image(dir.path());
    {
        let (m, _d) = mount(&img);
        let msg = refused(&m, "delete", b"nosuch\n", libc::ENOENT, "delete nosuch");
        assert!(msg.contains("nosuch"), "message {msg:?}");
        // deleted once: gone, the second delete is ENOENT
        control_ok(m.path(), "create", "once");
        control_ok(m.path(), "delete", "once");
        refused(&m, "delete", b"once\n", libc::ENOENT, "delete once");
        refused(&m, "revert", b"once\n", libc::ENOENT, "revert once");
    }
    assert_eq!(snapshot_tags(&img), ["pre"]);
    finish(&img);
}

#[test]
fn einval_for_bad_syntax() {
    let dir = workdir();
    let img = image(dir.path());
    {
        let (m, _d) = mount(&img);
        for (file, text) in [
            ("delete", &b"pre other\n"[..]),
            ("revert", b"pre other\n"),
            ("delete", b"\n"),
            ("revert", b"\n"),
            ("create", b"\n"),
            ("create", b"   \n"),
            ("create", b"\t\n"),
            // two commands in one write
            ("create", b"a\nb\n"),
            ("delete", b"pre\npre\n"),
            // not UTF-8
            ("create", b"\xff\xfe\n"),
        ] {
            refused(&m, file, text, libc::EINVAL, file);
        }
    }
    assert_eq!(snapshot_tags(&img), ["pre"]);
    finish(&img);
}

#[test]
fn einval_for_invalid_names() {
    let dir = workdir();
    let img = image(dir.path());
    let long = "x".repeat(252);
    let ok_long = "y".repeat(251);
    {
        let (m, _d) = mount(&img);
        for name in [".", "..", "/", "a/b", "/abs", "dir/", long.as_str()] {
            refused(
                &m,
                "create",
                format!("{name}\n").as_bytes(),
                libc::EINVAL,
                &format!("create {name}"),
            );
        }
        // control characters in the name: refused (by the parser or the name rule)
        for text in [&b"a\x01b\n"[..], b"\x7f\n", b"bell\x07\n", b"esc\x1b[0m\n"] {
            let mp = m.path();
            fsync(&m.live());
            let before = read_all(m.image());
            let r = control_raw(mp, "create", text);
            assert_eq!(
                r,
                Err(libc::EINVAL),
                "create {:?}: expected EINVAL; status:\n{}",
                String::from_utf8_lossy(text),
                status_text(mp)
            );
            assert!(
                read_all(m.image()) == before,
                "refused create changed the image"
            );
            let s = last_status(mp);
            assert!(
                s.label.starts_with("create") && s.error.is_some(),
                "status after create {:?}: {s:?}",
                String::from_utf8_lossy(text)
            );
        }
        assert_eq!(snapshot_dir_names(m.path()), ["pre".to_string()].into());
        // the longest valid name (251 bytes + ".raw" = 255) is accepted and shown
        control_ok(m.path(), "create", &ok_long);
        assert!(m.snapshot(&format!("{ok_long}.raw")).exists());
        // a name with non-ASCII letters and a dot is fine
        control_ok(m.path(), "create", "snäp.1");
        assert!(m.snapshot("snäp.1.raw").exists());
    }
    assert_eq!(
        snapshot_tags(&img),
        ["pre".to_string(), ok_long, "snäp.1".to_string()]
    );
    finish(&img);
}

#[test]
fn ebusy_delete_while_a_backup_reads_the_snapshot() {
    let dir = workdir();
    let img = image(dir.path());
    {
        let (m, _d) = mount(&img);
        let mp = m.path();
        control_ok(mp, "create", "x");
        pwrite(&m.live(), 0, &vec![0x99; 2 * MIB as usize]);
        let path = m.snapshot("x.raw");
        let want = read_whole(&path);
        // the backup: opened and half read, kept open
        let mut backup = File::open(&path).unwrap();
        let mut half = vec![0u8; want.len() / 2];
        backup.read_exact(&mut half).unwrap();
        let msg = refused(&m, "delete", b"x\n", libc::EBUSY, "delete x");
        assert!(
            msg.contains("x.raw") || msg.contains("open"),
            "message {msg:?}"
        );
        refused(&m, "delete", b"x.raw\n", libc::EBUSY, "delete x.raw");
        assert!(path.exists(), "x.raw disappeared");
        // the backup goes on reading the same data, and a fresh reader too
        let mut rest = Vec::new();
        backup.read_to_end(&mut rest).unwrap();
        half.extend(rest);
        assert!(
            half == want,
            "the open x.raw reads differently after the refused delete"
        );
        backup.seek(SeekFrom::Start(0)).unwrap();
        assert!(read_whole(&path) == want, "x.raw reads differently");
        // also refused while opened by another process
        let mut holder = Command::new("sh")
            .args(["-c", "exec 3<\"$1\"; echo ready; read _", "sh"])
            .arg(&path)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        drop(backup);
        let mut line = [0u8; 6];
        holder
            .stdout
            .as_mut()
            .unwrap()
            .read_exact(&mut line)
            .unwrap();
        refused(&m, "delete", b"x\n", libc::EBUSY, "delete x");
        drop(holder.stdin.take());
        holder.wait().unwrap();
        // closed by everyone: the delete goes through
        control_ok(mp, "delete", "x");
        assert_status_ok(mp, "delete x");
        assert!(!path.exists());
    }
    assert_eq!(snapshot_tags(&img), ["pre"]);
    finish(&img);
}

#[test]
fn ebusy_revert_while_live_is_open() {
    let dir = workdir();
    let img = image(dir.path());
    {
        let (m, _d) = mount(&img);
        let mp = m.path();
        let live = m.live();
        let before = read_whole(&live);
        for (what, opts) in [
            ("read-only", OpenOptions::new().read(true).clone()),
            (
                "read-write",
                OpenOptions::new().read(true).write(true).clone(),
            ),
            ("write-only", OpenOptions::new().write(true).clone()),
        ] {
            let f = opts.open(&live).unwrap();
            let msg = refused(&m, "revert", b"pre\n", libc::EBUSY, "revert pre");
            assert!(msg.contains("live.raw"), "{what}: message {msg:?}");
            drop(f);
            assert!(read_whole(&live) == before, "{what}: live.raw changed");
        }
        // a memory mapping keeps the file in use after close
        {
            let f = File::open(&live).unwrap();
            let mapped = Mapped::new(&f, 4096, libc::MAP_SHARED)
                .unwrap_or_else(|e| panic!("mmap live.raw: {e}"));
            drop(f);
            refused(&m, "revert", b"pre\n", libc::EBUSY, "revert pre");
            drop(mapped);
        }
        // closed: the revert goes through
        control_ok(mp, "revert", "pre");
        assert_status_ok(mp, "revert pre");
        assert!(read_whole(&live) != before);
    }
    let dir2 = workdir();
    let pre = dir2.path().join("pre.qcow2");
    fs::copy(&img, &pre).unwrap();
    qemu_snapshot(&pre, "-a", "pre");
    let out = run_status(Command::new("qemu-img").arg("compare").arg(&img).arg(&pre));
    assert!(
        out.status.success(),
        "live after revert differs from qemu's snapshot -a"
    );
    finish(&img);
}

#[test]
fn erofs_for_every_command_on_a_read_only_mount() {
    let dir = workdir();
    let img = image(dir.path());
    let before = read_all(&img);
    {
        let m = Mount::with_args(&img, &["-r"]);
        let _d = Deadline::new(m.path(), LIMIT, "erofs");
        for (file, text, label) in [
            ("create", "new", "create new"),
            ("create", "new with description", "create new"),
            ("create", "pre", "create pre"),
            ("revert", "pre", "revert pre"),
            ("delete", "pre", "delete pre"),
            ("revert", "nosuch", "revert nosuch"),
            ("delete", "nosuch", "delete nosuch"),
        ] {
            let n_before = status_lines(m.path()).len();
            let r = control(m.path(), file, text);
            assert_eq!(
                r,
                Err(libc::EROFS),
                "{file} {text:?} on a read-only mount: expected EROFS; status:\n{}",
                status_text(m.path())
            );
            // the open for writing may already fail with EROFS; if the command reached snapfs,
            // its status line says so
            let lines = status_lines(m.path());
            if lines.len() > n_before {
                let last = lines.last().unwrap();
                let s = parse_status_line(last).unwrap_or_else(|| panic!("status {last:?}"));
                assert!(
                    s.label == label && s.error.is_some(),
                    "status after a refused {label}: {s:?}"
                );
            }
            assert!(read_all(&img) == before, "{file} {text}: image changed");
        }
        assert_eq!(snapshot_dir_names(m.path()), ["pre".to_string()].into());
    }
    assert!(
        read_all(&img) == before,
        "the image changed under a read-only mount"
    );
}

fn cli(args: &[&str]) -> TimedOutput {
    run_timeout(snapfs_cmd().args(args), Duration::from_secs(30))
}

#[test]
fn cli_wrapper_exit_codes_and_output() {
    let dir = workdir();
    let img = image(dir.path());
    {
        let (m, _d) = mount(&img);
        let mp = m.path().to_str().unwrap();
        let ok = |out: &TimedOutput, label: &str| {
            assert_eq!(
                out.status.and_then(|s| s.code()),
                Some(0),
                "{label}: exit status; stderr {:?}",
                out.stderr
            );
            let lines: Vec<&str> = out.stdout.lines().collect();
            assert_eq!(lines.len(), 1, "{label}: stdout {:?}", out.stdout);
            let s = parse_status_line(lines[0])
                .unwrap_or_else(|| panic!("{label}: stdout {:?} is not a status line", lines[0]));
            assert!(s.label == label && s.error.is_none(), "{label}: {s:?}");
            assert_eq!(lines[0], status_lines(m.path()).last().unwrap());
        };
        let fail = |out: &TimedOutput, what: &str, needle: &str| {
            let code = out.status.and_then(|s| s.code());
            assert!(
                code.is_some() && code != Some(0),
                "{what}: exit status {:?}, expected a failure; stdout {:?}",
                out.status,
                out.stdout
            );
            assert!(
                out.stderr.contains(needle),
                "{what}: stderr {:?} should contain {needle:?}",
                out.stderr
            );
        };
        let out = cli(&["snapshot", "create", mp, "c1", "before", "the", "upgrade"]);
        ok(&out, "create c1");
        assert!(m.snapshot("c1.raw").exists());
        let out = cli(&["snapshot", "create", mp, "c1"]);
        fail(&out, "create c1 again", "already exists");
        let out = cli(&["snapshot", "revert", mp, "nosuch"]);
        fail(&out, "revert nosuch", "nosuch");
        let out = cli(&["snapshot", "delete", mp, "nosuch"]);
        fail(&out, "delete nosuch", "nosuch");
        let out = cli(&["snapshot", "create", mp, "a/b"]);
        fail(&out, "create a/b", "a/b");
        {
            let _open = File::open(m.live()).unwrap();
            let out = cli(&["snapshot", "revert", mp, "c1"]);
            fail(&out, "revert c1 with live.raw open", "live.raw");
        }
        let out = cli(&["snapshot", "delete", mp, "c1"]);
        ok(&out, "delete c1");
        assert!(!m.snapshot("c1.raw").exists());
        let before = read_whole(&m.live());
        let out = cli(&["snapshot", "revert", mp, "pre"]);
        ok(&out, "revert pre");
        assert!(
            read_whole(&m.live()) != before,
            "revert pre did not change live.raw"
        );
        // not a snapfs mount
        let out = cli(&["snapshot", "create", dir.path().to_str().unwrap(), "zz"]);
        let code = out.status.and_then(|s| s.code());
        assert!(
            code.is_some() && code != Some(0) && !out.stderr.trim().is_empty(),
            "create on a plain directory: {out:?}"
        );
        // missing arguments: usage error
        let out = cli(&["snapshot", "delete", mp]);
        assert_ne!(out.status.and_then(|s| s.code()), Some(0), "{out:?}");
    }
    assert_eq!(snapshot_tags(&img), ["pre"]);
    finish(&img);
}

#[test]
fn echo_into_control_files_from_a_shell() {
    let dir = workdir();
    let img = image(dir.path());
    {
        let (m, _d) = mount(&img);
        let mp = m.path();
        let sh = |cmd: &str| run_status(Command::new("bash").arg("-c").arg(cmd).arg("sh").arg(mp));
        let out = sh("echo 'via-shell some words' > \"$1/control/create\"");
        assert!(
            out.status.success(),
            "{out:?}\nstatus:\n{}\nsnapfs stderr:\n{}",
            status_text(mp),
            m.stderr_text()
        );
        assert_status_ok(mp, "create via-shell");
        let out = sh("echo via-shell > \"$1/control/create\"");
        assert!(!out.status.success());
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("File exists"),
            "{out:?}"
        );
        let out = sh("echo via-shell > \"$1/control/delete\"");
        assert!(
            out.status.success(),
            "{out:?}\nstatus:\n{}\nsnapfs stderr:\n{}",
            status_text(mp),
            m.stderr_text()
        );
        assert_status_ok(mp, "delete via-shell");
    }
    finish(&img);
}

#[test]
fn snapshots_dir_shows_a_new_snapshot_at_once_and_not_a_deleted_one() {
    let dir = workdir();
    let img = image(dir.path());
    {
        let (m, _d) = mount(&img);
        let mp = m.path();
        let ls = || {
            let out = run(Command::new("ls").arg("-1").arg(mp.join("snapshots")));
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .map(str::to_owned)
                .collect::<Vec<_>>()
        };
        let path = m.snapshot("fresh.raw");
        // cache the directory and a negative lookup first
        assert_eq!(ls(), ["pre.raw"]);
        assert!(fs::metadata(&path).is_err());
        control_ok(mp, "create", "fresh");
        assert_eq!(ls(), ["fresh.raw", "pre.raw"]);
        let md = fs::metadata(&path).expect("stat snapshots/fresh.raw right after create");
        assert_eq!(md.len(), SIZE);
        assert!(read_whole(&path) == read_whole(&m.live()));
        // cache a positive lookup, then delete
        let _ = fs::metadata(&path).unwrap();
        control_ok(mp, "delete", "fresh");
        assert_eq!(ls(), ["pre.raw"]);
        match fs::metadata(&path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            other => panic!("stat of a deleted snapshot: {other:?}"),
        }
        match File::open(&path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            other => panic!("open of a deleted snapshot: {other:?}"),
        }
        // The kernel drops its cached entry before the command's write returns, every time
        // (not only when the daemon's invalidation happens to win the race with the next stat).
        for round in 0..40 {
            control_ok(mp, "create", "fresh");
            fs::metadata(&path).unwrap_or_else(|e| panic!("round {round}: stat after create: {e}"));
            control_ok(mp, "delete", "fresh");
            assert!(
                fs::metadata(&path).is_err(),
                "round {round}: snapshots/fresh.raw still there right after its delete"
            );
        }
    }
    finish(&img);
}

#[test]
fn recreating_a_deleted_name_in_the_same_mount_shows_that_name() {
    let dir = workdir();
    let img = image(dir.path());
    {
        let (m, _d) = mount(&img);
        let mp = m.path();
        control_ok(mp, "create", "again");
        control_ok(mp, "delete", "again");
        pwrite(&m.live(), 0, &[0x55; 4096]);
        control_ok(mp, "create", "again");
        assert_eq!(
            snapshot_dir_names(mp),
            ["again".to_string(), "pre".to_string()].into(),
            "a snapshot created under a name deleted earlier in the same mount"
        );
        assert!(read_whole(&m.snapshot("again.raw"))[..4096] == [0x55; 4096]);
        control_ok(mp, "delete", "again");
        assert_status_ok(mp, "delete again");
        // the same for a name that existed before the mount
        control_ok(mp, "delete", "pre");
        control_ok(mp, "create", "pre");
        assert!(
            m.snapshot("pre.raw").exists(),
            "snapshots/: {:?}",
            snapshot_dir_names(mp)
        );
    }
    assert_eq!(snapshot_tags(&img), ["pre"]);
    finish(&img);
}

#[test]
fn revert_shows_new_content_although_live_pages_were_cached() {
    let dir = workdir();
    let img = image(dir.path());
    {
        let (m, _d) = mount(&img);
        let mp = m.path();
        let live = m.live();
        pwrite(&live, 0, &vec![0xa1; SIZE as usize]);
        control_ok(mp, "create", "a");
        let want = read_whole(&live);
        pwrite(&live, 0, &vec![0xb2; SIZE as usize]);
        // read it all (into the page cache), close, revert, read again
        let cached = read_whole(&live);
        assert!(cached.iter().all(|&b| b == 0xb2));
        control_ok(mp, "revert", "a");
        let got = read_whole(&live);
        if let Some(d) = diff_bytes(&got, &want) {
            panic!("live.raw after revert (pages cached before): {d}");
        }
        // a mapping made after the revert sees it too
        let f = File::open(&live).unwrap();
        let mut buf = vec![0u8; 65536];
        use std::os::unix::fs::FileExt;
        f.read_exact_at(&mut buf, SIZE - 65536).unwrap();
        assert!(buf.iter().all(|&b| b == 0xa1));
        drop(f);
        // the size is not cached either: grow, stat, revert, stat
        let f = OpenOptions::new().write(true).open(&live).unwrap();
        f.set_len(SIZE + 4 * MIB).unwrap();
        drop(f);
        assert_eq!(file_size(&live), SIZE + 4 * MIB);
        let _ = read_whole(&live);
        control_ok(mp, "revert", "a");
        assert_eq!(
            file_size(&live),
            SIZE,
            "live.raw size after reverting to a smaller snapshot"
        );
        let got = read_whole(&live);
        if let Some(d) = diff_bytes(&got, &want) {
            panic!("live.raw after revert to the smaller snapshot: {d}");
        }
    }
    finish(&img);
}

#[test]
fn status_lines_have_the_documented_shape() {
    let dir = workdir();
    let img = image(dir.path());
    {
        let (m, _d) = mount(&img);
        let mp = m.path();
        control_ok(mp, "create", "st1 some description");
        let _ = control(mp, "create", "st1");
        let _ = control(mp, "revert", "nosuch");
        control_ok(mp, "delete", "st1");
        let lines = status_lines(mp);
        assert!(lines.len() >= 4, "status:\n{}", lines.join("\n"));
        let last4: Vec<StatusLine> = lines[lines.len() - 4..]
            .iter()
            .map(|l| parse_status_line(l).unwrap_or_else(|| panic!("malformed status line {l:?}")))
            .collect();
        assert_eq!(last4[0].label, "create st1");
        assert!(last4[0].error.is_none());
        assert_eq!(last4[1].label, "create st1");
        assert!(last4[1].error.as_deref().unwrap().contains("exists"));
        assert_eq!(last4[2].label, "revert nosuch");
        assert!(last4[2].error.is_some());
        assert_eq!(last4[3].label, "delete st1");
        assert!(last4[3].error.is_none());
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        for s in &last4 {
            assert!(
                (s.time.0 - now).abs() < 120,
                "status time {:?} is not now ({now})",
                s.time
            );
        }
    }
    finish(&img);
}
