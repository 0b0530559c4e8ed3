//! Trust (issue 15, docs/security.md): through a mount a caller gets at most what they have on
//! the files behind it. Root mounts images that an unprivileged user `u` owns or made; `u`
//! then tries, as an attacker would, to read root-only files through hostile backing files,
//! to make root write or create files, to resize, chmod or chown what is not theirs, to use the
//! libvirt folder against root, and to freeze the mount with queued commands. Every attempt is
//! refused with the errno a file system gives (or the view shows no access), nothing changes on
//! disk (the files are hashed), and root's and `u`'s legitimate uses still work.
//!
//! `u` is played with `setpriv --reuid/--regid --clear-groups` (a uid with no passwd entry:
//! nothing on this machine gives it anything but the "others" bits).

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::common::snapshot_support::{control, errno_name, status_text};
use crate::common::stress_support::*;
use crate::common::write_support::LoopDev;
use crate::common::*;

const EACCES: i32 = libc::EACCES;
const EPERM: i32 = libc::EPERM;

fn u() -> User {
    User::new(4242, 4242, &[])
}

/// A work folder everyone may traverse, a home folder of `u`'s, and a root-only folder holding
/// a root-only secret.
struct Scene {
    _wd: tempfile::TempDir,
    home: PathBuf,
    vault: PathBuf,
    secret: PathBuf,
}

const SECRET: &[u8] = b"root:$6$SECRET-HASH-OF-ROOT$:19000:0:99999:7:::\n";

fn scene() -> Scene {
    let wd = workdir();
    chmod(wd.path(), 0o755);
    let home = wd.path().join("home-u");
    fs::create_dir(&home).unwrap();
    chown(&home, u().uid, u().gid);
    let vault = wd.path().join("vault");
    fs::create_dir(&vault).unwrap();
    chmod(&vault, 0o700);
    let secret = vault.join("secret");
    let mut data = SECRET.to_vec();
    data.resize(1 << 20, b'#');
    fs::write(&secret, &data).unwrap();
    chmod(&secret, 0o600);
    Scene {
        _wd: wd,
        home,
        vault,
        secret,
    }
}

/// Runs a program as `u` (in `u`'s home folder); panics unless it succeeds.
fn as_u(program: &str, args: &[&str], cwd: &Path) {
    let mut c = Command::new("setpriv");
    c.arg(format!("--reuid={}", u().uid))
        .arg(format!("--regid={}", u().gid))
        .arg("--clear-groups")
        .arg(program)
        .args(args)
        .current_dir(cwd);
    let out = run_timeout(&mut c, Duration::from_secs(60));
    assert!(
        out.status.is_some_and(|s| s.success()),
        "as u: {program} {args:?}: {:?}\n{}{}",
        out.status,
        out.stdout,
        out.stderr
    );
}

fn hash(path: &Path) -> u64 {
    fnv64(&fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display())))
}

/// Mounts `image` with `args`, and lets everyone reach the mount point's folder.
fn mount(image: &Path, args: &[&str]) -> Mount {
    let m = Mount::with_args(image, args);
    if let Some(parent) = m.path().parent() {
        chmod(parent, 0o755);
    }
    m
}

fn name(e: i32) -> String {
    if e == 0 {
        "success".into()
    } else {
        errno_name(e)
    }
}

/// Ends the header extensions where the backing format extension (0xe2792aca) starts, as in an
/// image written by an old qemu-img: the backing file's format is then probed.
fn drop_backing_format(image: &Path) {
    let mut bytes = fs::read(image).unwrap();
    let header_end = bytes.len().min(64 << 10);
    let at = bytes[..header_end]
        .windows(4)
        .position(|w| w == [0xe2, 0x79, 0x2a, 0xca])
        .expect("a backing format extension");
    bytes[at..at + 4].fill(0);
    fs::write(image, &bytes).unwrap();
    assert!(!qemu_img(&["info", image.to_str().unwrap()]).contains("backing file format"));
}

/// Every view (live.raw and snapshots/*) must be unreadable for `u` and show no read bit to
/// the classes `u` falls in; root still reads them all.
fn assert_u_reads_nothing(m: &Mount, what: &str, problems: &mut Vec<String>) {
    let mut views = vec![m.live()];
    if let Ok(dir) = fs::read_dir(m.path().join("snapshots")) {
        views.extend(dir.map(|e| e.unwrap().path()));
    }
    for v in &views {
        let e = probe_as(&u(), Op::Read, v, "");
        if e != EACCES {
            problems.push(format!("{what}: u reads {}: {}", v.display(), name(e)));
        }
        if let Ok(md) = fs::metadata(v) {
            let mode = md.permissions().mode();
            let u_bits = if md.uid() == u().uid { mode >> 6 } else { mode } & 0o4;
            if u_bits != 0 {
                problems.push(format!(
                    "{what}: {} shows mode {:04o} (owner {}): a read bit u does not have",
                    v.display(),
                    mode & 0o7777,
                    md.uid()
                ));
            }
        }
        if let Err(e) = fs::read(v) {
            problems.push(format!("{what}: root cannot read {}: {e}", v.display()));
        }
    }
}

fn finish(problems: Vec<String>) {
    if !problems.is_empty() {
        panic!(
            "{} problem(s):\n- {}",
            problems.len(),
            problems.join("\n- ")
        );
    }
}

/// Case 1: `qemu-img create -f qcow2 -u -b SECRET ...` by `u`, mounted by root with
/// `allow_other`: neither live.raw nor the backing file's view gives `u` the secret, with
/// `-F raw`, without it, by a relative path, through a middle qcow2 layer `u` owns, with a
/// block device or a /sys file as backing; and with `default_permissions`, with `uid=`/`gid=`,
/// and without `allow_other`.
#[test]
fn hostile_backing_files_give_the_user_nothing_they_could_not_read() {
    let sc = scene();
    let secret = sc.secret.to_str().unwrap().to_owned();
    let before = hash(&sc.secret);
    let depth = sc.home.components().count();
    let relative = format!("{}{}", "../".repeat(depth), secret.trim_start_matches('/'));
    let loop_dev = LoopDev::attach(&sc.secret);
    let sys_file = [
        "/sys/kernel/slab/kmalloc-64/objects",
        "/sys/kernel/mm/page_idle/bitmap",
    ]
    .into_iter()
    .find(|p| Path::new(p).exists() && fs::metadata(p).unwrap().mode() & 0o004 == 0);
    let mut backings: Vec<(String, Vec<String>)> = vec![
        (
            "absolute, -F raw".into(),
            vec!["-b".into(), secret.clone(), "-F".into(), "raw".into()],
        ),
        // qemu-img 10 insists on -F; the format extension is cut out below.
        (
            "absolute, no -F".into(),
            vec!["-b".into(), secret.clone(), "-F".into(), "raw".into()],
        ),
        (
            "relative ../..".into(),
            vec!["-b".into(), relative, "-F".into(), "raw".into()],
        ),
        (
            "block device".into(),
            vec![
                "-b".into(),
                loop_dev.path().display().to_string(),
                "-F".into(),
                "raw".into(),
            ],
        ),
    ];
    if let Some(p) = sys_file {
        backings.push((
            "a /sys file".into(),
            vec!["-b".into(), p.into(), "-F".into(), "raw".into()],
        ));
    }
    let mut problems = Vec::new();
    for (i, (what, backing)) in backings.iter().enumerate() {
        let evil = format!("evil{i}.qcow2");
        let mut args = vec!["create", "-f", "qcow2", "-u"];
        args.extend(backing.iter().map(String::as_str));
        args.extend([evil.as_str(), "1M"]);
        as_u("qemu-img", &args, &sc.home);
        if what.contains("no -F") {
            drop_backing_format(&sc.home.join(&evil));
        }
        let m = mount(&sc.home.join(&evil), &["-o", "allow_other"]);
        assert_u_reads_nothing(&m, what, &mut problems);
        drop(m);
    }
    // Through a middle layer u owns.
    as_u(
        "qemu-img",
        &[
            "create",
            "-f",
            "qcow2",
            "-u",
            "-b",
            &secret,
            "-F",
            "raw",
            "middle.qcow2",
            "1M",
        ],
        &sc.home,
    );
    as_u(
        "qemu-img",
        &[
            "create",
            "-f",
            "qcow2",
            "-u",
            "-b",
            "middle.qcow2",
            "-F",
            "qcow2",
            "evil.qcow2",
            "1M",
        ],
        &sc.home,
    );
    let evil = sc.home.join("evil.qcow2");
    for (what, args) in [
        ("middle layer", vec!["-o", "allow_other"]),
        (
            "default_permissions",
            vec!["-o", "allow_other,default_permissions"],
        ),
        (
            "uid=/gid= of u",
            vec!["-o", "allow_other,uid=4242,gid=4242"],
        ),
        ("read-only", vec!["-r", "-o", "allow_other"]),
    ] {
        let m = mount(&evil, &args);
        assert_u_reads_nothing(&m, what, &mut problems);
    }
    // Without allow_other nobody but root reaches the mount at all.
    let m = mount(&evil, &[]);
    let e = probe_as(&u(), Op::Read, &m.live(), "");
    if e != EACCES {
        problems.push(format!(
            "without allow_other: u reads live.raw: {}",
            name(e)
        ));
    }
    drop(m);
    if hash(&sc.secret) != before {
        problems.push("the secret changed".into());
    }
    finish(problems);
}

/// Case 1 without a hostile file: a root-owned 0644 overlay (qemu-img's default) over a 0600
/// base shows the base (and live.raw, which reads it) to root only; `stat` says so.
#[test]
fn a_readable_overlay_does_not_open_a_private_base() {
    let sc = scene();
    let base = sc.vault.join("base.qcow2");
    create_qcow2(&base, 4 * MIB, "", None);
    qemu_io(&base, &["write -P 0x61 0 64k"]);
    chmod(&base, 0o600);
    chmod(&sc.vault, 0o755);
    let top = sc.vault.join("top.qcow2");
    create_qcow2(&top, 4 * MIB, "", Some(("base.qcow2", "qcow2")));
    chmod(&top, 0o644);
    let m = mount(&top, &["-o", "allow_other"]);
    let mut problems = Vec::new();
    assert_u_reads_nothing(&m, "0644 over 0600", &mut problems);
    for (file, want) in [(m.snapshot("base.raw"), 0o400), (m.live(), 0o600)] {
        let mode = fs::metadata(&file).unwrap().permissions().mode() & 0o777;
        if mode != want {
            problems.push(format!(
                "{}: mode {mode:04o}, expected {want:04o}",
                file.display()
            ));
        }
    }
    // The top alone is the user's to read when the base is too.
    drop(m);
    chmod(&base, 0o644);
    let m = mount(&top, &["-o", "allow_other"]);
    for v in [m.live(), m.snapshot("base.raw")] {
        let e = probe_as(&u(), Op::Read, &v, "");
        if e != 0 {
            problems.push(format!(
                "both 0644: u cannot read {}: {}",
                v.display(),
                name(e)
            ));
        }
    }
    finish(problems);
}

/// Case 2: `u` writes live.raw of their overlay (theirs to write) but cannot make root commit it
/// into, or pull it out of, a backing file `u` may not write (or read), nor pull the backing
/// file's data into the overlay; a device backing file
/// is never written without `-o write_devices`. `u`'s own chain still commits.
#[test]
fn commands_write_only_files_the_caller_may_write() {
    let sc = scene();
    let before = hash(&sc.secret);
    let secret = sc.secret.to_str().unwrap();
    as_u(
        "qemu-img",
        &[
            "create",
            "-f",
            "qcow2",
            "-u",
            "-b",
            secret,
            "-F",
            "raw",
            "evil.qcow2",
            "1M",
        ],
        &sc.home,
    );
    let evil = sc.home.join("evil.qcow2");
    let mut problems = Vec::new();
    {
        let m = mount(&evil, &["-o", "allow_other"]);
        let e = probe_as(
            &u(),
            Op::Write,
            &m.live(),
            "toor::0:0:root:/root:/bin/bash\n",
        );
        if e != 0 {
            problems.push(format!("u cannot write their own live.raw: {}", name(e)));
        }
        // (An empty write never reaches a file system: a command is at least a newline.)
        // pull would copy the secret into u's own overlay: u may not read it
        for (file, text) in [("commit", "\n"), ("delete", "secret\n"), ("pull", "\n")] {
            let e = probe_as(&u(), Op::Write, &m.path().join("control").join(file), text);
            if e != EACCES {
                problems.push(format!("u: {file} {text:?}: {}, EACCES expected", name(e)));
            }
        }
        if hash(&sc.secret) != before {
            problems.push("the secret changed after u's commands".into());
        }
        let status = status_text(m.path());
        if !status.contains("may not") {
            problems.push(format!("status does not say why: {status}"));
        }
    }
    // A block device under root's own overlay: root's commit is refused (EROFS) unless
    // -o write_devices.
    let dev_file = sc.vault.join("disk.img");
    fs::write(&dev_file, vec![0x11u8; 1 << 20]).unwrap();
    let dev_before = hash(&dev_file);
    let loop_dev = LoopDev::attach(&dev_file);
    let over = sc.vault.join("over.qcow2");
    let dev = loop_dev.path().display().to_string();
    create_qcow2(&over, 1 << 20, "", Some((dev.as_str(), "raw")));
    qemu_io(&over, &["write -P 0x22 0 4k"]);
    {
        let m = mount(&over, &[]);
        match control(m.path(), "commit", "") {
            Err(e) if e == libc::EROFS => {}
            other => problems.push(format!(
                "root commit into a device: {other:?}, EROFS expected"
            )),
        }
    }
    drop(loop_dev);
    if hash(&dev_file) != dev_before {
        problems.push("the device's content changed".into());
    }
    // u's own chain: u commits, as they could with qemu-img.
    as_u(
        "qemu-img",
        &["create", "-f", "qcow2", "mine-base.qcow2", "1M"],
        &sc.home,
    );
    as_u(
        "qemu-img",
        &[
            "create",
            "-f",
            "qcow2",
            "-b",
            "mine-base.qcow2",
            "-F",
            "qcow2",
            "mine.qcow2",
            "1M",
        ],
        &sc.home,
    );
    {
        let m = mount(&sc.home.join("mine.qcow2"), &["-o", "allow_other"]);
        let e = probe_as(&u(), Op::Write, &m.live(), "mine");
        let c = probe_as(&u(), Op::Write, &m.path().join("control/commit"), "\n");
        if (e, c) != (0, 0) {
            problems.push(format!(
                "u's own chain: write {}, commit {}",
                name(e),
                name(c)
            ));
        }
    }
    let base = fs::read(sc.home.join("mine-base.qcow2")).unwrap();
    if !base.windows(4).any(|w| w == b"mine") {
        problems.push("u's commit did not reach u's base".into());
    }
    finish(problems);
}

/// Case 3: `create NAME --external FILE` creates files only where the caller could: not at an
/// absolute path in a folder they cannot write, not through `../` into one, not through a
/// symlink, never over an existing file; a plain name beside the top works, owned by them.
#[test]
fn external_create_puts_files_only_where_the_caller_could() {
    let sc = scene();
    as_u(
        "qemu-img",
        &["create", "-f", "qcow2", "vm.qcow2", "1M"],
        &sc.home,
    );
    as_u("ln", &["-s", sc.vault.to_str().unwrap(), "link"], &sc.home);
    as_u("touch", &["taken.qcow2"], &sc.home);
    fs::create_dir(sc.home.join("sub")).unwrap();
    chown(&sc.home.join("sub"), u().uid, u().gid);
    let m = mount(&sc.home.join("vm.qcow2"), &["-o", "allow_other"]);
    let create = m.path().join("control/create");
    let nologin = sc.vault.join("nologin");
    let vault_rel = "../vault/evil.qcow2";
    let mut problems = Vec::new();
    for (text, want) in [
        (format!("a --external {}", nologin.display()), EACCES),
        (format!("b --external {vault_rel}"), EACCES),
        ("c --external link/evil.qcow2".to_string(), libc::ELOOP),
        ("d --external taken.qcow2".to_string(), libc::EEXIST),
    ] {
        let e = probe_as(&u(), Op::Write, &create, &text);
        if e != want {
            problems.push(format!(
                "u: create {text:?}: {}, {} expected",
                name(e),
                name(want)
            ));
        }
    }
    for p in [nologin, sc.vault.join("evil.qcow2")] {
        if p.exists() {
            problems.push(format!("{} was created", p.display()));
        }
    }
    for text in ["ok1 --external", "ok2 --external sub/ok2.qcow2"] {
        let e = probe_as(&u(), Op::Write, &create, text);
        if e != 0 {
            problems.push(format!("u: create {text:?}: {}", name(e)));
        }
    }
    for f in [sc.home.join("vm.ok1.qcow2"), sc.home.join("sub/ok2.qcow2")] {
        match fs::metadata(&f) {
            Ok(md) if (md.uid(), md.gid()) == (u().uid, u().gid) => {}
            Ok(md) => problems.push(format!(
                "{}: owned by {}:{}",
                f.display(),
                md.uid(),
                md.gid()
            )),
            Err(e) => problems.push(format!("{}: {e}", f.display())),
        }
    }
    finish(problems);
}

/// Case 4: truncate needs write permission as a write does; chmod, chown and times of a file
/// that is not yours: EPERM; access(2) tells the truth (no X on files).
#[test]
fn truncate_chmod_chown_utimes_and_access_as_the_kernel_decides() {
    let sc = scene();
    let img = sc.vault.join("root.qcow2");
    create_qcow2(&img, 4 * MIB, "", None);
    chmod(&sc.vault, 0o755);
    chmod(&img, 0o644);
    let m = mount(&img, &["-o", "allow_other"]);
    let live = m.live();
    let size = fs::metadata(&live).unwrap().len();
    let mut problems = Vec::new();
    let checks: &[(Op, &str, i32)] = &[
        (Op::Truncate, "1125899906842624", EACCES),
        (Op::Truncate, "0", EACCES),
        (Op::Chmod, "0666", EPERM),
        (Op::Chown, "4242:4242", EPERM),
        (Op::Utime, "", EPERM),
        (Op::Access, "r", 0),
        (Op::Access, "w", EACCES),
        (Op::Access, "x", EACCES),
    ];
    for &(op, text, want) in checks {
        let e = probe_as(&u(), op, &live, text);
        if e != want {
            problems.push(format!(
                "u: {op:?} {text:?} on live.raw: {}, {} expected",
                name(e),
                name(want)
            ));
        }
    }
    if fs::metadata(&live).unwrap().len() != size || virtual_size(&img) != size {
        problems.push("the disk size changed".into());
    }
    let e = probe_as(&User::new(0, 0, &[]), Op::Access, &live, "x");
    if e != EACCES {
        problems.push(format!("root: access(X_OK) on live.raw: {}", name(e)));
    }
    // The owner's own truncate still grows the disk.
    drop(m);
    finish(problems);
}

/// Cases 5 and 6: a libvirt folder `u` may write. Symlinked `*.xml` files are not followed
/// (their content shows nowhere), a FIFO does not hang the mount, and root's `-o libvirt-write`
/// replaces a symlink planted at the name it writes instead of writing through it.
#[test]
fn a_libvirt_folder_the_user_may_write_is_untrusted_input() {
    let sc = scene();
    let folder = sc.home.join("snapshots");
    fs::create_dir(&folder).unwrap();
    chown(&folder, u().uid, u().gid);
    let leak = sc.vault.join("leak.xml");
    fs::write(
        &leak,
        "<domainsnapshot><name>SECRETNAME</name><description>TOPSECRET</description>\
         <creationTime>1700000000</creationTime></domainsnapshot>",
    )
    .unwrap();
    chmod(&leak, 0o600);
    let garbage = sc.vault.join("garbage.xml");
    fs::write(&garbage, "<SECRETELEMENT attr='TOPSECRET'>").unwrap();
    chmod(&garbage, 0o600);
    let target = sc.vault.join("passwd");
    fs::write(&target, "root:x:0:0:root:/root:/bin/bash\n").unwrap();
    chmod(&target, 0o644);
    let target_before = hash(&target);
    as_u("ln", &["-s", leak.to_str().unwrap(), "a.xml"], &folder);
    as_u("ln", &["-s", garbage.to_str().unwrap(), "b.xml"], &folder);
    as_u("ln", &["-s", target.to_str().unwrap(), "s9.xml"], &folder);
    as_u("mkfifo", &["fifo.xml"], &folder);
    let img = sc.vault.join("vm.qcow2");
    create_qcow2(&img, 4 * MIB, "", None);
    chmod(&sc.vault, 0o755);
    let started = Instant::now();
    let m = mount(
        &img,
        &[
            "--libvirt",
            folder.to_str().unwrap(),
            "-o",
            "libvirt-write,allow_other",
        ],
    );
    let mut problems = Vec::new();
    if started.elapsed() > Duration::from_secs(30) {
        problems.push(format!("the mount took {:?}", started.elapsed()));
    }
    let status = status_text(m.path());
    let info = fs::read_to_string(m.path().join("info.json")).unwrap();
    for secret in ["SECRETNAME", "TOPSECRET", "SECRETELEMENT"] {
        if status.contains(secret) || info.contains(secret) {
            problems.push(format!(
                "{secret} shows through:\nstatus: {status}\ninfo.json: {info}"
            ));
        }
    }
    for skipped in ["a.xml", "b.xml", "fifo.xml"] {
        if !status.contains(skipped) {
            problems.push(format!("status does not name skipped {skipped}: {status}"));
        }
    }
    if let Err(e) = control(m.path(), "create", "s9") {
        problems.push(format!(
            "root: create s9: {}\n{}",
            name(e),
            status_text(m.path())
        ));
    }
    let written = folder.join("s9.xml");
    match fs::symlink_metadata(&written) {
        Ok(md) if md.file_type().is_file() => {}
        other => problems.push(format!(
            "{}: {other:?}, a regular file expected",
            written.display()
        )),
    }
    if hash(&target) != target_before
        || fs::metadata(&target).unwrap().permissions().mode() & 0o777 != 0o644
    {
        problems.push("the symlink's target was written or chmod-ed".into());
    }
    for e in fs::read_dir(&folder).unwrap() {
        let n = e.unwrap().file_name();
        if n.to_string_lossy().ends_with(".tmp") {
            problems.push(format!("a temporary file is left: {n:?}"));
        }
    }
    finish(problems);
}

/// Case 7: during a long commit, with another command waiting behind it, `control/status` and
/// reads of live.raw are answered (with the default number of threads).
#[test]
fn a_long_commit_with_commands_waiting_does_not_freeze_the_mount() {
    let sc = scene();
    chmod(&sc.vault, 0o755);
    let base = sc.vault.join("base.qcow2");
    let top = sc.vault.join("top.qcow2");
    create_qcow2(&base, 1 << 30, "", None);
    create_qcow2(&top, 1 << 30, "", Some(("base.qcow2", "qcow2")));
    qemu_io(&top, &["write -P 0x5a 0 768M"]);
    let m = mount(&top, &[]);
    let mp = m.path().to_path_buf();
    let commit = {
        let mp = mp.clone();
        std::thread::spawn(move || control(&mp, "commit", ""))
    };
    let waiter = {
        let mp = mp.clone();
        std::thread::spawn(move || {
            // Queued behind the commit once it runs.
            while !status_text(&mp).contains("commit") {
                std::thread::sleep(Duration::from_millis(2));
            }
            control(&mp, "create", "after-commit")
        })
    };
    let mut saw_waiting = false;
    let mut live_read_while_waiting = false;
    let deadline = Instant::now() + Duration::from_secs(120);
    while !commit.is_finished() && Instant::now() < deadline {
        let status = status_text(&mp);
        if status.contains("waiting: create after-commit") {
            saw_waiting = true;
            let mut buf = vec![0u8; 1 << 20];
            let f = fs::File::open(m.live()).unwrap();
            std::os::unix::fs::FileExt::read_exact_at(&f, &mut buf, 0).unwrap();
            assert!(
                buf.iter().all(|b| *b == 0x5a),
                "live.raw reads wrong during the commit"
            );
            live_read_while_waiting = status_text(&mp).contains("waiting: create after-commit");
            break;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    let committed = commit.join().unwrap();
    let created = waiter.join().unwrap();
    assert_eq!(committed, Ok(()), "{}", status_text(&mp));
    assert_eq!(created, Ok(()), "{}", status_text(&mp));
    assert!(
        saw_waiting,
        "status never showed the queued command while the commit ran:\n{}",
        status_text(&mp)
    );
    eprintln!("live.raw read while a command waited: {live_read_while_waiting}");
    assert!(m.snapshot_names().contains("after-commit.raw"));
}
