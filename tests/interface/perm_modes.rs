//! Permissions (issue 8, docs/design.md sections 2 and 3, docs/security.md): the owner of every
//! file is the top image's (or `-o uid=,gid=`), its mode what the files behind it give each class;
//! snapshot files have no write bit and nobody, not even root,
//! opens them for writing; control command files are 0200, `status` 0444 (for a 0644 image);
//! `-r` makes live.raw read-only; without `allow_other` no other user reaches the mount, with it
//! the mode bits decide who reads and writes what.
//!
//! Other users are played with `setpriv --reuid --regid [--groups|--clear-groups]`; the probes
//! report the exact errno.

use std::collections::BTreeSet;
use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::common::snapshot_support::{control, errno_name, status_text};
use crate::common::stress_support::*;
use crate::common::*;

const EACCES: i32 = libc::EACCES;

/// A top image `top.qcow2` over `base.qcow2`, with internal snapshot `s1` in the top: the mount
/// shows live.raw, snapshots/s1.raw and snapshots/base.raw.
fn small_chain(dir: &Path) -> PathBuf {
    let base = dir.join("base.qcow2");
    create_qcow2(&base, 4 * MIB, "", None);
    qemu_io(&base, &["write -P 0x61 0 256k"]);
    let top = dir.join("top.qcow2");
    create_qcow2(&top, 4 * MIB, "", Some(("base.qcow2", "qcow2")));
    qemu_io(&top, &["write -P 0x62 1M 128k"]);
    snapshot_create(&top, "s1");
    qemu_io(&top, &["write -P 0x63 2M 64k"]);
    top
}

fn perm(path: &Path) -> u32 {
    fs::metadata(path)
        .unwrap_or_else(|e| panic!("stat {}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o7777
}

fn command_files(mp: &Path) -> Vec<PathBuf> {
    ["create", "revert", "delete", "commit", "pull"]
        .iter()
        .map(|f| mp.join("control").join(f))
        .collect()
}

fn view_files(mp: &Path) -> Vec<PathBuf> {
    let mut v = vec![mp.join("live.raw")];
    v.extend(snapshot_files(mp));
    v
}

fn snapshot_files(mp: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = fs::read_dir(mp.join("snapshots"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    v.sort();
    v
}

fn open_errno(path: &Path, opts: &OpenOptions) -> i32 {
    match opts.open(path) {
        Ok(_) => 0,
        Err(e) => err_no(&e),
    }
}

fn wronly() -> OpenOptions {
    let mut o = OpenOptions::new();
    o.write(true);
    o
}

fn rdwr() -> OpenOptions {
    let mut o = OpenOptions::new();
    o.read(true).write(true);
    o
}

fn rdonly() -> OpenOptions {
    let mut o = OpenOptions::new();
    o.read(true);
    o
}

#[test]
fn perm_modes_follow_the_image_and_snapshots_have_no_write_bits() {
    let dir = workdir();
    let top = small_chain(dir.path());
    chmod(&top, 0o644);
    let m = Mount::new(&top);
    let mp = m.path();
    let mut problems = Vec::new();
    let names: BTreeSet<String> = m.snapshot_names();
    assert_eq!(
        names,
        ["base.raw", "s1.raw"]
            .iter()
            .map(|s| s.to_string())
            .collect()
    );
    let want = |p: &Path, mode: u32, problems: &mut Vec<String>| {
        let got = perm(p);
        if got != mode {
            problems.push(format!(
                "{}: mode {got:04o}, expected {mode:04o}",
                p.display()
            ));
        }
        let md = fs::metadata(p).unwrap();
        if (md.uid(), md.gid()) != (0, 0) {
            problems.push(format!(
                "{}: owner {}:{}, the image's is 0:0",
                p.display(),
                md.uid(),
                md.gid()
            ));
        }
    };
    want(&mp.join("live.raw"), 0o644, &mut problems);
    for s in snapshot_files(mp) {
        want(&s, 0o444, &mut problems);
    }
    for c in command_files(mp) {
        want(&c, 0o200, &mut problems);
    }
    want(&mp.join("control").join("status"), 0o444, &mut problems);
    if perm(&mp.join("info.json")) & 0o222 != 0 {
        problems.push(format!(
            "info.json has write bits: {:04o}",
            perm(&mp.join("info.json"))
        ));
    }
    for d in [mp.to_path_buf(), mp.join("snapshots"), mp.join("control")] {
        let md = fs::metadata(&d).unwrap();
        if !md.is_dir() {
            problems.push(format!("{} is not a directory", d.display()));
        }
    }

    // Root reads snapshots but cannot open them for writing.
    for s in snapshot_files(mp) {
        if let Err(e) = fs::read(&s) {
            problems.push(format!("root cannot read {}: {e}", s.display()));
        }
        for (what, o) in [("O_WRONLY", wronly()), ("O_RDWR", rdwr())] {
            let e = open_errno(&s, &o);
            if e != EACCES {
                problems.push(format!(
                    "root: open({}, {what}) gave {}, EACCES expected",
                    s.display(),
                    if e == 0 {
                        "success".into()
                    } else {
                        errno_name(e)
                    }
                ));
            }
        }
    }
    // Command files are write-only, status and info.json read-only, also for root.
    for c in command_files(mp) {
        let e = open_errno(&c, &rdonly());
        if e != EACCES {
            problems.push(format!(
                "root: open({}, O_RDONLY) gave {}, EACCES expected",
                c.display(),
                if e == 0 {
                    "success".into()
                } else {
                    errno_name(e)
                }
            ));
        }
    }
    for f in [mp.join("control").join("status"), mp.join("info.json")] {
        let e = open_errno(&f, &wronly());
        if e != EACCES {
            problems.push(format!(
                "root: open({}, O_WRONLY) gave {}, EACCES expected",
                f.display(),
                if e == 0 {
                    "success".into()
                } else {
                    errno_name(e)
                }
            ));
        }
    }
    // live.raw is writable for root.
    if open_errno(&mp.join("live.raw"), &rdwr()) != 0 {
        problems.push("root cannot open live.raw O_RDWR".into());
    }
    if !problems.is_empty() {
        panic!(
            "{} problem(s):\n- {}",
            problems.len(),
            problems.join("\n- ")
        );
    }
}

/// chmod, chown, truncate, unlink, rename, create and mkdir in the mount never give a snapshot a
/// write bit, change its content, or add or remove a file.
#[test]
fn perm_metadata_changes_never_make_snapshots_writable() {
    let dir = workdir();
    let top = small_chain(dir.path());
    let m = Mount::new(&top);
    let mp = m.path();
    let s1 = mp.join("snapshots").join("s1.raw");
    let before = fs::read(&s1).unwrap();
    let names = m.snapshot_names();
    let mut problems = Vec::new();

    let _ = fs::set_permissions(&s1, fs::Permissions::from_mode(0o666));
    if perm(&s1) & 0o222 != 0 {
        problems.push(format!(
            "after chmod 0666 s1.raw has mode {:04o}",
            perm(&s1)
        ));
    }
    let e = open_errno(&s1, &rdwr());
    if e != EACCES {
        problems.push(format!(
            "after chmod 0666, open(s1.raw, O_RDWR) gave {}, EACCES expected",
            if e == 0 {
                "success".into()
            } else {
                errno_name(e)
            }
        ));
    }
    let _ = std::os::unix::fs::chown(&s1, Some(1234), Some(1234));
    let c = std::ffi::CString::new(s1.to_str().unwrap()).unwrap();
    let r = unsafe { libc::truncate(c.as_ptr(), 0) };
    if r == 0 {
        problems.push("truncate(s1.raw, 0) succeeded".into());
    }
    if fs::remove_file(&s1).is_ok() {
        problems.push("unlink(s1.raw) succeeded".into());
    }
    if fs::rename(&s1, mp.join("snapshots").join("renamed.raw")).is_ok() {
        problems.push("rename(s1.raw) succeeded".into());
    }
    if File::create(mp.join("snapshots").join("new.raw")).is_ok() {
        problems.push("creating snapshots/new.raw succeeded".into());
    }
    if File::create(mp.join("control").join("extra")).is_ok() {
        problems.push("creating control/extra succeeded".into());
    }
    if File::create(mp.join("escape.raw")).is_ok() {
        problems.push("creating escape.raw at the root succeeded".into());
    }
    if fs::create_dir(mp.join("snapshots").join("d")).is_ok() {
        problems.push("mkdir snapshots/d succeeded".into());
    }
    if fs::hard_link(&s1, mp.join("snapshots").join("link.raw")).is_ok() {
        problems.push("link(s1.raw) succeeded".into());
    }
    if std::os::unix::fs::symlink("/etc/passwd", mp.join("snapshots").join("sym.raw")).is_ok() {
        problems.push("symlink in snapshots/ succeeded".into());
    }
    if m.snapshot_names() != names {
        problems.push(format!(
            "snapshots/ changed: {:?} -> {:?}",
            names,
            m.snapshot_names()
        ));
    }
    match fs::read(&s1) {
        Ok(after) if after == before => {}
        Ok(_) => problems.push("s1.raw content changed".into()),
        Err(e) => problems.push(format!("s1.raw no longer reads: {e}")),
    }
    let md = fs::metadata(&s1).unwrap();
    if md.uid() != 0 {
        problems.push(format!("chown changed s1.raw's owner to {}", md.uid()));
    }
    if !problems.is_empty() {
        panic!(
            "{} problem(s):\n- {}",
            problems.len(),
            problems.join("\n- ")
        );
    }
}

#[test]
fn perm_read_only_mount_makes_live_read_only() {
    let dir = workdir();
    let top = small_chain(dir.path());
    chmod(&top, 0o644);
    for args in [&["-r"][..], &["-o", "ro"][..]] {
        let m = Mount::with_args(&top, args);
        let mp = m.path();
        let live = mp.join("live.raw");
        assert_eq!(
            perm(&live) & 0o222,
            0,
            "{args:?}: live.raw has write bits: {:04o}",
            perm(&live)
        );
        assert_eq!(perm(&live), 0o444, "{args:?}: live.raw mode");
        let e = open_errno(&live, &rdwr());
        assert!(
            e == libc::EROFS || e == EACCES,
            "{args:?}: open(live.raw, O_RDWR) gave {}, EROFS or EACCES expected",
            if e == 0 {
                "success".into()
            } else {
                errno_name(e)
            }
        );
        fs::read(&live).expect("live.raw reads on a read-only mount");
        match control(mp, "create", "nope") {
            Err(e) if e == libc::EROFS => {}
            other => panic!(
                "{args:?}: create on a read-only mount gave {other:?}, EROFS expected; status:\n{}",
                status_text(mp)
            ),
        }
        for s in snapshot_files(mp) {
            assert_eq!(perm(&s) & 0o222, 0, "{}", s.display());
        }
    }
}

#[test]
fn perm_owner_follows_the_image_file_and_uid_gid_override_it() {
    let dir = workdir();
    let top = small_chain(dir.path());
    chown(&top, 1234, 2345);
    chmod(&top, 0o640);
    // The modes are what the files behind give the owner and group shown (docs/security.md):
    // `uid=`/`gid=` change who is shown, never what anyone may do.
    let check = |mp: &Path, uid: u32, gid: u32, what: &str, modes: [u32; 3]| {
        let mut files = vec![
            mp.to_path_buf(),
            mp.join("snapshots"),
            mp.join("control"),
            mp.join("control").join("status"),
            mp.join("info.json"),
        ];
        files.extend(view_files(mp));
        files.extend(command_files(mp));
        let mut problems = Vec::new();
        for f in files {
            let md = fs::metadata(&f).unwrap();
            if (md.uid(), md.gid()) != (uid, gid) {
                problems.push(format!(
                    "{}: owner {}:{}, expected {uid}:{gid}",
                    f.display(),
                    md.uid(),
                    md.gid()
                ));
            }
        }
        // s1.raw reads the 0640 top and the 0644 base, base.raw only the base.
        let [live, s1, base] = modes;
        assert_eq!(perm(&mp.join("live.raw")), live, "{what}: live.raw mode");
        assert_eq!(
            perm(&mp.join("snapshots/s1.raw")),
            s1,
            "{what}: s1.raw mode"
        );
        assert_eq!(
            perm(&mp.join("snapshots/base.raw")),
            base,
            "{what}: base.raw mode"
        );
        assert!(problems.is_empty(), "{what}:\n- {}", problems.join("\n- "));
    };
    {
        let m = Mount::new(&top);
        check(
            m.path(),
            1234,
            2345,
            "image owned by 1234:2345",
            [0o640, 0o440, 0o444],
        );
    }
    {
        let m = Mount::with_args(&top, &["-o", "uid=4321,gid=5432"]);
        // Neither the top's owner nor in its group: nothing of the top.
        check(m.path(), 4321, 5432, "-o uid=4321,gid=5432", [0, 0, 0o444]);
    }
    {
        let m = Mount::with_args(&top, &["-o", "uid=77"]);
        // The top's group still reads.
        check(m.path(), 77, 2345, "-o uid=77", [0o040, 0o040, 0o444]);
    }
}

#[test]
fn perm_without_allow_other_no_other_user_reaches_the_mount() {
    let dir = workdir();
    let top = small_chain(dir.path());
    chown(&top, 1234, 1234);
    chmod(&top, 0o644);
    let m = Mount::new(&top);
    open_path_to(m.path());
    let mp = m.path();
    let mut problems = Vec::new();
    for user in [User::nobody(), User::new(1234, 1234, &[])] {
        for (op, path) in [
            (Op::Stat, mp.to_path_buf()),
            (Op::Stat, mp.join("live.raw")),
            (Op::Read, mp.join("live.raw")),
            (Op::Read, mp.join("snapshots").join("s1.raw")),
            (Op::List, mp.join("snapshots")),
            (Op::Write, mp.join("control").join("create")),
        ] {
            let e = probe_as(&user, op, &path, "intruder\n");
            if e != EACCES {
                problems.push(format!(
                    "uid {}: {op:?} {} gave {}, EACCES expected (no allow_other)",
                    user.uid,
                    path.display(),
                    if e == 0 {
                        "success".into()
                    } else {
                        errno_name(e)
                    }
                ));
            }
        }
    }
    // Root still can.
    fs::metadata(mp.join("live.raw")).unwrap();
    assert_eq!(m.snapshot_names().len(), 2);
    assert!(
        problems.is_empty(),
        "{} problem(s):\n- {}",
        problems.len(),
        problems.join("\n- ")
    );
}

const OWNER: u32 = 1234;
const GROUP: u32 = 4242;

/// Image 0640, owner 1234, group 4242, `-o allow_other`.
fn shared_mount(dir: &Path) -> Mount {
    let top = small_chain(dir);
    chown(&top, OWNER, GROUP);
    chmod(&top, 0o640);
    let m = Mount::with_args(&top, &["-o", "allow_other"]);
    open_path_to(m.path());
    m
}

fn expect(
    problems: &mut Vec<String>,
    user: &User,
    who: &str,
    op: Op,
    path: &Path,
    text: &str,
    want: i32,
) {
    let e = probe_as(user, op, path, text);
    if e != want {
        let show = |e: i32| {
            if e == 0 {
                "success".to_string()
            } else {
                errno_name(e)
            }
        };
        problems.push(format!(
            "{who} (uid {} gid {} groups {:?}): {op:?} {} gave {}, expected {}",
            user.uid,
            user.gid,
            user.groups,
            path.display(),
            show(e),
            show(want)
        ));
    }
}

#[test]
fn perm_allow_other_mode_bits_decide_for_owner_group_and_others() {
    let dir = workdir();
    let m = shared_mount(dir.path());
    let mp = m.path();
    let live = mp.join("live.raw");
    let s1 = mp.join("snapshots").join("s1.raw");
    let base = mp.join("snapshots").join("base.raw");
    let status = mp.join("control").join("status");
    let create = mp.join("control").join("create");
    let delete = mp.join("control").join("delete");
    let mut p = Vec::new();

    let nobody = User::nobody();
    let w = "others";
    expect(&mut p, &nobody, w, Op::Stat, mp, "", 0);
    expect(&mut p, &nobody, w, Op::Read, &live, "", EACCES);
    expect(&mut p, &nobody, w, Op::OpenWrite, &live, "", EACCES);
    expect(&mut p, &nobody, w, Op::Read, &s1, "", EACCES);
    expect(&mut p, &nobody, w, Op::Read, &base, "", EACCES);
    expect(&mut p, &nobody, w, Op::Read, &status, "", EACCES);
    expect(
        &mut p,
        &nobody,
        w,
        Op::Write,
        &create,
        "by-nobody\n",
        EACCES,
    );
    expect(&mut p, &nobody, w, Op::Write, &delete, "s1\n", EACCES);

    let member = User::new(2000, GROUP, &[]);
    let w = "group member";
    expect(&mut p, &member, w, Op::Read, &live, "", 0);
    expect(&mut p, &member, w, Op::OpenWrite, &live, "", EACCES);
    expect(&mut p, &member, w, Op::OpenRdWr, &live, "", EACCES);
    expect(&mut p, &member, w, Op::Read, &s1, "", 0);
    expect(&mut p, &member, w, Op::Read, &base, "", 0);
    expect(&mut p, &member, w, Op::OpenRdWr, &s1, "", EACCES);
    expect(&mut p, &member, w, Op::Read, &status, "", 0);
    expect(
        &mut p,
        &member,
        w,
        Op::Write,
        &create,
        "by-member\n",
        EACCES,
    );
    expect(&mut p, &member, w, Op::Write, &delete, "s1\n", EACCES);

    let owner = User::new(OWNER, OWNER, &[]);
    let w = "owner";
    expect(&mut p, &owner, w, Op::Read, &live, "", 0);
    expect(&mut p, &owner, w, Op::OpenRdWr, &live, "", 0);
    expect(&mut p, &owner, w, Op::Read, &s1, "", 0);
    expect(&mut p, &owner, w, Op::OpenWrite, &s1, "", EACCES);
    expect(&mut p, &owner, w, Op::Write, &create, "by-owner\n", 0);

    let root = User::new(0, 0, &[]);
    let w = "root";
    expect(&mut p, &root, w, Op::Read, &s1, "", 0);
    expect(&mut p, &root, w, Op::OpenWrite, &s1, "", EACCES);
    expect(&mut p, &root, w, Op::OpenRdWr, &base, "", EACCES);

    // Only the owner's command took effect.
    let names = m.snapshot_names();
    let want: BTreeSet<String> = ["base.raw", "by-owner.raw", "s1.raw"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    if names != want {
        p.push(format!("snapshots/ lists {names:?}, expected {want:?}"));
    }
    assert!(
        p.is_empty(),
        "{} problem(s):\n- {}\nstatus:\n{}",
        p.len(),
        p.join("\n- "),
        status_text(mp)
    );
}

/// A user whose membership of the image's group is a supplementary group counts as a group
/// member, as with the kernel's own permission checks.
#[test]
fn perm_allow_other_supplementary_group_counts_as_group() {
    let dir = workdir();
    let m = shared_mount(dir.path());
    let mp = m.path();
    let member = User::new(2001, 100, &[GROUP]);
    let w = "member by supplementary group";
    let mut p = Vec::new();
    expect(&mut p, &member, w, Op::Read, &mp.join("live.raw"), "", 0);
    expect(
        &mut p,
        &member,
        w,
        Op::Read,
        &mp.join("snapshots").join("s1.raw"),
        "",
        0,
    );
    expect(
        &mut p,
        &member,
        w,
        Op::OpenRdWr,
        &mp.join("live.raw"),
        "",
        EACCES,
    );
    // Not in the group at all: others.
    let outsider = User::new(2002, 100, &[100]);
    expect(
        &mut p,
        &outsider,
        "outsider",
        Op::Read,
        &mp.join("live.raw"),
        "",
        EACCES,
    );
    assert!(
        p.is_empty(),
        "{} problem(s):\n- {}",
        p.len(),
        p.join("\n- ")
    );
}

/// The directories' modes follow the image as well; a user with no bits on `snapshots/`
/// (others, image 0640) cannot list it or look names up in it.
#[test]
fn perm_allow_other_directory_bits_apply() {
    let dir = workdir();
    let m = shared_mount(dir.path());
    let mp = m.path();
    let snaps = mp.join("snapshots");
    let mode = perm(&snaps);
    assert_eq!(mode & 0o007, 0, "snapshots/ gives others bits: {mode:04o}");
    let mut p = Vec::new();
    let nobody = User::nobody();
    expect(&mut p, &nobody, "others", Op::List, &snaps, "", EACCES);
    expect(
        &mut p,
        &nobody,
        "others",
        Op::Stat,
        &snaps.join("s1.raw"),
        "",
        EACCES,
    );
    let member = User::new(2000, GROUP, &[]);
    expect(&mut p, &member, "group member", Op::List, &snaps, "", 0);
    expect(
        &mut p,
        &member,
        "group member",
        Op::Stat,
        &snaps.join("s1.raw"),
        "",
        0,
    );
    assert!(
        p.is_empty(),
        "snapshots/ has mode {mode:04o}:\n- {}",
        p.join("\n- ")
    );
}
