//! Control-file input is bounded and parsed strictly (issue 8, docs/design.md section 3): one write is
//! one command; an oversized write, two commands in one write, NUL or invalid UTF-8, and names
//! that are not valid file names are refused with EINVAL and change nothing; the refusal is
//! reported in `control/status` in one bounded line.

use std::collections::BTreeSet;
use std::fs::{self, OpenOptions};
use std::io::Write;
use std::path::Path;

use crate::common::snapshot_support::{control, control_ok, control_raw, errno_name, status_text};
use crate::common::*;

fn image(dir: &Path) -> std::path::PathBuf {
    let top = dir.join("ctl.qcow2");
    create_qcow2(&top, 4 * MIB, "", None);
    qemu_io(&top, &["write -P 0x5a 0 128k"]);
    snapshot_create(&top, "keep");
    top
}

fn show(r: Result<(), i32>) -> String {
    match r {
        Ok(()) => "success".into(),
        Err(e) => errno_name(e),
    }
}

#[test]
fn perm_control_input_is_bounded_and_strict() {
    let dir = workdir();
    let top = image(dir.path());
    let m = Mount::new(&top);
    let mp = m.path();
    let names_before = m.snapshot_names();
    let live_before = fs::read(mp.join("live.raw")).unwrap();
    let mut problems = Vec::new();

    let mut long_name = b"big".to_vec();
    long_name.extend(std::iter::repeat_n(b'a', 4997));
    let mut long_desc = b"big2 ".to_vec();
    long_desc.extend(std::iter::repeat_n(b'd', 70_000));
    let mut huge = b"big3 ".to_vec();
    huge.extend(std::iter::repeat_n(b'h', (2 << 20) + 5));
    let cases: Vec<(&str, &str, Vec<u8>)> = vec![
        ("5000-byte name", "create", long_name),
        ("70 KB description", "create", long_desc),
        ("2 MiB write (several FUSE requests)", "create", huge),
        ("two commands in one write", "create", b"a\nb".to_vec()),
        (
            "two commands, trailing newline",
            "create",
            b"a\nb\n".to_vec(),
        ),
        ("two newlines", "create", b"c\n\n".to_vec()),
        ("invalid UTF-8", "create", b"\xff\xfe\xfd".to_vec()),
        (
            "name with invalid UTF-8",
            "create",
            b"ok\xc3\x28name".to_vec(),
        ),
        ("NUL inside", "create", b"nu\0l".to_vec()),
        ("only a newline", "create", b"\n".to_vec()),
        ("only spaces", "create", b"   \n".to_vec()),
        ("escape sequence", "create", b"x\x1b[2Jy\n".to_vec()),
        ("name with a slash", "create", b"a/b\n".to_vec()),
        ("path escape", "create", b"../../etc/evil\n".to_vec()),
        ("dot", "create", b".\n".to_vec()),
        ("dot dot", "create", b"..\n".to_vec()),
        (
            "252-byte name",
            "create",
            [vec![b'n'; 252], b"\n".to_vec()].concat(),
        ),
        ("delete with two names", "delete", b"keep other\n".to_vec()),
        ("delete two lines", "delete", b"keep\nkeep\n".to_vec()),
        ("revert with two names", "revert", b"keep keep\n".to_vec()),
        ("commit with two words", "commit", b"a b\n".to_vec()),
        ("pull with two words", "pull", b"a b\n".to_vec()),
        ("delete with NUL", "delete", b"keep\0\n".to_vec()),
    ];
    for (what, file, bytes) in &cases {
        let lines_before = status_text(mp).lines().count();
        let r = control_raw(mp, file, bytes);
        if r != Err(libc::EINVAL) {
            problems.push(format!(
                "{what} to control/{file}: {}, EINVAL expected",
                show(r)
            ));
        }
        let status = status_text(mp);
        let new: Vec<&str> = status.lines().skip(lines_before).collect();
        let last = status.lines().last().unwrap_or("");
        if !last.contains("error") {
            problems.push(format!(
                "{what}: control/status does not report the refusal (last line {last:?})"
            ));
        }
        if new.iter().any(|l| l.len() > 1024) {
            problems.push(format!(
                "{what}: control/status line of {} bytes (not bounded)",
                new.iter().map(|l| l.len()).max().unwrap()
            ));
        }
    }
    // A 251-byte name is the longest allowed (NAME.raw is 255 bytes); with a newline it is one
    // command.
    let longest = "n".repeat(251);
    let r = control(mp, "create", &longest);
    if r.is_err() {
        problems.push(format!("251-byte name: {}, success expected", show(r)));
    }
    // "NAME\r\n" and a description are fine.
    control_ok(mp, "create", "crlf\r");
    control_ok(mp, "create", "described  with a description\tand a tab");

    let names = m.snapshot_names();
    let want: BTreeSet<String> = names_before
        .iter()
        .cloned()
        .chain([
            format!("{longest}.raw"),
            "crlf.raw".to_string(),
            "described.raw".to_string(),
        ])
        .collect();
    if names != want {
        problems.push(format!(
            "snapshots/ lists {names:?}; expected {want:?} (refused commands must change nothing)"
        ));
    }
    if fs::read(mp.join("live.raw")).unwrap() != live_before {
        problems.push("live.raw changed".into());
    }
    let status = status_text(mp);
    drop(m);
    let tags: BTreeSet<String> = snapshots(&top).into_iter().map(|s| s.name).collect();
    let want_tags: BTreeSet<String> = ["keep", "crlf", "described", longest.as_str()]
        .iter()
        .map(|s| s.to_string())
        .collect();
    if tags != want_tags {
        problems.push(format!(
            "qemu-img snapshot -l: {tags:?}, expected {want_tags:?}"
        ));
    }
    if let Some(p) = crate::common::write_support::check_problems(&top, false) {
        problems.push(p);
    }
    assert!(
        problems.is_empty(),
        "{} problem(s):\n- {}\ncontrol/status:\n{}",
        problems.len(),
        problems.join("\n- "),
        status
    );
}

/// A command written with O_APPEND, at an offset, or after O_TRUNC (as `echo NAME > file` does)
/// is still exactly one command; reads of a command file are refused.
#[test]
fn perm_control_input_write_modes() {
    let dir = workdir();
    let top = image(dir.path());
    let m = Mount::new(&top);
    let mp = m.path();
    let create = mp.join("control").join("create");
    {
        let mut f = OpenOptions::new().append(true).open(&create).unwrap();
        f.write_all(b"appended\n").unwrap();
    }
    {
        use std::os::unix::fs::FileExt;
        let f = OpenOptions::new().write(true).open(&create).unwrap();
        f.write_all_at(b"at-offset\n", 12345).unwrap();
    }
    {
        let mut f = OpenOptions::new()
            .write(true)
            .truncate(true)
            .open(&create)
            .unwrap();
        f.write_all(b"truncated\n").unwrap();
    }
    let names = m.snapshot_names();
    for n in ["appended.raw", "at-offset.raw", "truncated.raw"] {
        assert!(
            names.contains(n),
            "{n} missing: {names:?}\n{}",
            status_text(mp)
        );
    }
    assert_eq!(names.len(), 4, "{names:?}");
    assert_eq!(
        fs::metadata(&create).unwrap().len(),
        0,
        "command files stay empty"
    );
    let e = fs::read(&create).unwrap_err();
    assert_eq!(
        e.raw_os_error(),
        Some(libc::EACCES),
        "reading control/create: {e}"
    );
}
