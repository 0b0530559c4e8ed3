//! Name safety (issue 8, docs/design.md section 2 "Names"): however a snapshot tag or a layer file
//! name is spelled in the image (slashes, `.`, `..`, empty, repeated, NUL, not UTF-8, control
//! characters, very long, clashing with another view's name or with a fallback name), every entry
//! of `snapshots/` is a plain file name inside `snapshots/`, unique, and opens to exactly the
//! content of its view (oracle: `qemu-img convert [-l snapshot.id=N]`).
//!
//! Tags qemu-img cannot write (NUL, invalid UTF-8) are made by patching the name bytes of the
//! snapshot table in place.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsString;
use std::fs;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};

use crate::common::*;

const DISK: u64 = 8 * MIB;
const SLOT: u64 = 64 * KIB;

/// Writes a distinct pattern into the next free 64 KiB slot, so that every view differs.
struct Slots(u64);

impl Slots {
    fn next(&mut self, image: &Path) {
        let i = self.0;
        self.0 += 1;
        assert!(i * SLOT < DISK, "out of slots");
        let cmd = format!("write -P {} {} {}", (i % 250) + 1, i * SLOT, SLOT);
        qemu_io(image, &[&cmd]);
    }
}

/// What a view's file name must look like.
#[derive(Debug, Clone)]
enum Want {
    /// This name, or this name with a `~N` clash suffix.
    OrSuffix(String),
    /// `PREFIXid-ID.raw` (optionally `~N`): the fallback for an unusable tag.
    Fallback { prefix: String, id: String },
    /// Any valid unique name.
    Any,
}

impl Want {
    fn accepts(&self, name: &[u8]) -> bool {
        let Ok(name) = std::str::from_utf8(name) else {
            return matches!(self, Want::Any);
        };
        let Some(stem) = name.strip_suffix(".raw") else {
            return false;
        };
        let strip = |s: &str, base: &str| -> bool {
            s == base
                || s.strip_prefix(base)
                    .and_then(|r| r.strip_prefix('~'))
                    .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
        };
        match self {
            Want::OrSuffix(n) => strip(stem, n.strip_suffix(".raw").unwrap()),
            Want::Fallback { prefix, id } => strip(stem, &format!("{prefix}id-{id}")),
            Want::Any => true,
        }
    }
}

struct Case {
    what: String,
    view: View,
    want: Want,
}

/// Builds the chain and returns (top, the views of snapshots/ with their name rules).
fn build(dir: &Path) -> (PathBuf, Vec<Case>) {
    let mut slots = Slots(0);
    let mut cases = Vec::new();

    // Bottom layer: a name with a space, and internal snapshots with bad and good tags.
    let weird = dir.join("weird name.qcow2");
    create_qcow2(&weird, DISK, "", None);
    let weird_tags = ["snap/x", "..", "ok", ""];
    for (i, tag) in weird_tags.iter().enumerate() {
        slots.next(&weird);
        snapshot_create(&weird, tag);
        let id = (i + 1).to_string();
        let want = match *tag {
            "ok" => Want::OrSuffix("weird name@ok.raw".into()),
            _ => Want::Fallback {
                prefix: "weird name@".into(),
                id: id.clone(),
            },
        };
        cases.push(Case {
            what: format!("{tag:?} inside 'weird name.qcow2'"),
            view: View::internal_id(&weird, &id),
            want,
        });
    }
    slots.next(&weird);
    cases.push(Case {
        what: "layer 'weird name.qcow2'".into(),
        view: View::layer(&weird),
        want: Want::OrSuffix("weird name.raw".into()),
    });

    // "..qcow2": its stem is "." (not a usable name).
    let dotdot = dir.join("..qcow2");
    create_qcow2(&dotdot, DISK, "", Some(("weird name.qcow2", "qcow2")));
    slots.next(&dotdot);
    cases.push(Case {
        what: "layer '..qcow2' (stem '.')".into(),
        view: View::layer(&dotdot),
        want: Want::Any,
    });

    // "..x.qcow2": stem "..x" is a valid name, but the top has a tag "..x" too.
    let dotx = dir.join("..x.qcow2");
    create_qcow2(&dotx, DISK, "", Some(("..qcow2", "qcow2")));
    slots.next(&dotx);
    cases.push(Case {
        what: "layer '..x.qcow2'".into(),
        view: View::layer(&dotx),
        want: Want::OrSuffix("..x.raw".into()),
    });

    // A layer whose name is as long as a file name may be (255 bytes with ".qcow2"): its own view
    // fits, its snapshot's "LAYER@TAG" does not.
    let long_stem = "L".repeat(249);
    let long = dir.join(format!("{long_stem}.qcow2"));
    create_qcow2(&long, DISK, "", Some(("..x.qcow2", "qcow2")));
    slots.next(&long);
    snapshot_create(&long, &"t".repeat(100));
    cases.push(Case {
        what: "100-byte tag inside a 255-byte layer name".into(),
        view: View::internal_id(&long, "1"),
        want: Want::Any,
    });
    slots.next(&long);
    cases.push(Case {
        what: "layer with a 249-byte stem".into(),
        view: View::layer(&long),
        want: Want::OrSuffix(format!("{long_stem}.raw")),
    });

    // The top: every kind of awkward tag.
    let top = dir.join("top.qcow2");
    create_qcow2(
        &top,
        DISK,
        "",
        Some((long.file_name().unwrap().to_str().unwrap(), "qcow2")),
    );
    let tags: Vec<String> = vec![
        "a/b".into(),
        "..".into(),
        ".".into(),
        "y".repeat(300),
        "id-1".into(),
        "line\nbreak".into(),
        "".into(),
        "dup".into(),
        "dup".into(),
        "nonutf8".into(),
        "nul-tag".into(),
        "..x".into(),
        "x.raw".into(),
        "z".repeat(251),
        "w".repeat(252),
        " spaced ".into(),
        "-dash".into(),
        "weird name@ok".into(),
        "../../../etc/passwd".into(),
        "tab\there".into(),
    ];
    for (i, tag) in tags.iter().enumerate() {
        slots.next(&top);
        snapshot_create(&top, tag);
        let id = (i + 1).to_string();
        let fallback = Want::Fallback {
            prefix: String::new(),
            id: id.clone(),
        };
        let want = match tag.as_str() {
            "id-1" | "..x" | "x.raw" | " spaced " | "-dash" | "weird name@ok" => {
                Want::OrSuffix(format!("{tag}.raw"))
            }
            t if t == "z".repeat(251) => Want::OrSuffix(format!("{tag}.raw")),
            // Control characters: a valid file name, but snapfs may refuse it.
            "line\nbreak" | "tab\there" => Want::Any,
            // The fallback of tag 1 ("a/b") is "id-1", which the real tag "id-1" also wants.
            _ => fallback,
        };
        cases.push(Case {
            what: format!("top tag {:?}", shorten(tag)),
            view: View::internal_id(&top, &id),
            want,
        });
    }
    slots.next(&top);
    // Patch two tags into what qemu-img cannot write: NUL inside, and invalid UTF-8.
    let mut patched = 0;
    for off in snapshot_entry_offsets(&top) {
        let lens = read_be_u32(&top, off + 12);
        let (id_len, name_len) = ((lens >> 16) as u64, (lens & 0xffff) as u64);
        let extra = read_be_u32(&top, off + 36) as u64;
        let name_off = off + 40 + extra + id_len;
        let mut name = vec![0u8; name_len as usize];
        {
            use std::os::unix::fs::FileExt;
            fs::File::open(&top)
                .unwrap()
                .read_exact_at(&mut name, name_off)
                .unwrap();
        }
        let new: Option<&[u8]> = match name.as_slice() {
            b"nonutf8" => Some(b"no\xff\xfe\x80t8"),
            b"nul-tag" => Some(b"nul\0tag"),
            _ => None,
        };
        if let Some(new) = new {
            write_bytes_at(&top, name_off, new);
            patched += 1;
        }
    }
    assert_eq!(patched, 2, "patching the snapshot table");
    (top, cases)
}

/// The content of a view per qemu-img (every view of these images is DISK bytes long). Output
/// names stay short whatever the image is called.
fn oracle(dir: &Path, view: &View) -> Vec<u8> {
    let out = dir.join(format!("oracle-{}.raw", unique()));
    let mut args: Vec<String> = ["convert", "-U", "-f", "qcow2", "-O", "raw"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    if let View::Internal { id, .. } = view {
        args.push("-l".into());
        args.push(format!("snapshot.id={id}"));
    }
    args.push(view.file().to_str().unwrap().to_string());
    args.push(out.to_str().unwrap().to_string());
    let a: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
    qemu_img(&a);
    let v = read_all(&out);
    fs::remove_file(&out).ok();
    assert_eq!(v.len() as u64, DISK, "oracle of {view:?}");
    v
}

fn shorten(s: &str) -> String {
    if s.len() > 24 {
        format!("{}...({} bytes)", &s[..12], s.len())
    } else {
        s.to_string()
    }
}

#[test]
fn perm_names_every_view_name_is_safe_unique_and_opens_its_view() {
    let dir = workdir();
    let (top, cases) = build(dir.path());
    // Oracles, loaded in memory (each 8 MiB).
    let oracles: Vec<Vec<u8>> = cases.iter().map(|c| oracle(dir.path(), &c.view)).collect();
    for i in 0..oracles.len() {
        for j in 0..i {
            assert_ne!(
                oracles[i], oracles[j],
                "test setup: {} and {} have the same content",
                cases[i].what, cases[j].what
            );
        }
    }
    let image_bytes_before = read_all(&top);

    let m = Mount::with_args(&top, &["-r"]);
    let mp = m.path();
    let snapdir = mp.join("snapshots");
    let canon_dir = fs::canonicalize(&snapdir).unwrap();
    let raw_names: Vec<OsString> = fs::read_dir(&snapdir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    let mut problems = Vec::new();

    let unique: BTreeSet<&OsString> = raw_names.iter().collect();
    if unique.len() != raw_names.len() {
        problems.push(format!(
            "readdir lists a name twice: {} entries, {} distinct",
            raw_names.len(),
            unique.len()
        ));
    }
    if raw_names.len() != cases.len() {
        problems.push(format!(
            "snapshots/ has {} entries for {} views: {:?}",
            raw_names.len(),
            cases.len(),
            raw_names
        ));
    }
    // Which view each file holds.
    let mut matched: BTreeMap<usize, OsString> = BTreeMap::new();
    for name in &raw_names {
        let b = name.as_bytes();
        let shown = String::from_utf8_lossy(b).into_owned();
        if b.is_empty()
            || b == b"."
            || b == b".."
            || b.contains(&b'/')
            || b.contains(&0)
            || b.len() > 255
        {
            problems.push(format!("unsafe name in snapshots/: {shown:?}"));
            continue;
        }
        if !b.ends_with(b".raw") {
            problems.push(format!("{shown:?} does not end in .raw"));
        }
        let path = snapdir.join(name);
        match fs::canonicalize(&path) {
            Ok(c) if c.parent() == Some(canon_dir.as_path()) => {}
            Ok(c) => problems.push(format!("{shown:?} resolves outside snapshots/: {c:?}")),
            Err(e) => problems.push(format!("{shown:?}: canonicalize: {e}")),
        }
        let md = match fs::metadata(&path) {
            Ok(md) => md,
            Err(e) => {
                problems.push(format!("{shown:?}: stat: {e}"));
                continue;
            }
        };
        if !md.is_file() {
            problems.push(format!("{shown:?} is not a regular file"));
        }
        let content = match fs::read(&path) {
            Ok(c) => c,
            Err(e) => {
                problems.push(format!("{shown:?}: read: {e}"));
                continue;
            }
        };
        match oracles.iter().position(|o| *o == content) {
            None => problems.push(format!(
                "{shown:?} ({} bytes) holds none of the views' contents",
                content.len()
            )),
            Some(i) => {
                if let Some(other) = matched.insert(i, name.clone()) {
                    problems.push(format!(
                        "{shown:?} and {other:?} both hold {}",
                        cases[i].what
                    ));
                }
                if !cases[i].want.accepts(b) {
                    problems.push(format!(
                        "{} is named {shown:?}, expected {:?}",
                        cases[i].what, cases[i].want
                    ));
                }
            }
        }
    }
    for (i, c) in cases.iter().enumerate() {
        if !matched.contains_key(&i) {
            problems.push(format!("no file in snapshots/ holds {}", c.what));
        }
    }
    // Nothing outside snapshots/ appeared; the other folders hold what they should.
    let root: BTreeSet<OsString> = fs::read_dir(mp)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    let want_root: BTreeSet<OsString> = ["control", "info.json", "live.raw", "snapshots"]
        .iter()
        .map(OsString::from)
        .collect();
    if root != want_root {
        problems.push(format!("the mount's root lists {root:?}"));
    }
    let control: BTreeSet<OsString> = fs::read_dir(mp.join("control"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    let want_control: BTreeSet<OsString> =
        ["commit", "create", "delete", "pull", "revert", "status"]
            .iter()
            .map(OsString::from)
            .collect();
    if control != want_control {
        problems.push(format!("control/ lists {control:?}"));
    }
    // Names that are not there do not resolve to anything (lookups are exact).
    for bogus in [
        &b"a/b.raw"[..],
        b"...raw",
        b"..raw",
        b".raw",
        b"nul\0tag.raw",
        b"no\xff\xfe\x80t8.raw",
    ] {
        if bogus.contains(&b'/') || bogus.contains(&0) {
            continue;
        }
        let p = snapdir.join(OsString::from_vec(bogus.to_vec()));
        if p.exists() && !raw_names.iter().any(|n| n.as_bytes() == bogus) {
            problems.push(format!(
                "{:?} resolves although readdir does not list it",
                String::from_utf8_lossy(bogus)
            ));
        }
    }
    // info.json stays valid JSON whatever the tags are.
    match fs::read(mp.join("info.json")) {
        Ok(b) => {
            if let Err(e) = serde_json::from_slice::<serde_json::Value>(&b) {
                problems.push(format!("info.json is not valid JSON: {e}"));
            }
        }
        Err(e) => problems.push(format!("info.json: {e}")),
    }
    drop(m);
    if read_all(&top) != image_bytes_before {
        problems.push("a read-only mount changed the top image's bytes".into());
    }
    assert!(
        problems.is_empty(),
        "{} problem(s):\n- {}\nsnapshots/ lists: {:?}",
        problems.len(),
        problems.join("\n- "),
        raw_names
    );
}

/// The same chain mounted read-write: names are the same (no rewrite of the image's tags), and
/// control commands can address the views by the names `snapshots/` shows.
#[test]
fn perm_names_commands_address_views_by_their_shown_names() {
    let dir = workdir();
    let (top, cases) = build(dir.path());
    let m = Mount::new(&top);
    let mp = m.path();
    let names = m.snapshot_names();
    // Delete the view of top tag "a/b" by its shown name.
    let i = cases
        .iter()
        .position(|c| c.what == "top tag \"a/b\"")
        .unwrap();
    let oracle = oracle(dir.path(), &cases[i].view);
    let shown = names
        .iter()
        .find(|n| fs::read(mp.join("snapshots").join(n)).ok().as_deref() == Some(&oracle[..]))
        .cloned()
        .expect("a file for tag a/b");
    let stem = shown.strip_suffix(".raw").unwrap();
    crate::common::snapshot_support::control_ok(mp, "delete", stem);
    let after = m.snapshot_names();
    let gone: Vec<&String> = names.difference(&after).collect();
    assert_eq!(gone, vec![&shown], "delete {stem} removed {gone:?}");
    assert!(after.is_subset(&names));
    drop(m);
    let tags: Vec<String> = snapshots(&top).into_iter().map(|s| s.id).collect();
    assert!(
        !tags.contains(&"1".to_string()),
        "snapshot id 1 (tag a/b) still in the image: {tags:?}"
    );
    if let Some(p) = crate::common::write_support::check_problems(&top, false) {
        panic!("{p}");
    }
}
