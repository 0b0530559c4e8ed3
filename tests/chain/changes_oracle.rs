//! `changes/FROM..TO.raw` and `.json` and `snapfs diff` against qemu-img (issue 17, point 2 and
//! 4). For each pair of views, on a real mount:
//! - the `.raw` file has TO's size; in the reported ranges it reads TO's bytes
//!   (`qemu-img convert -O raw`, `-l snapshot.id=` for internal snapshots), elsewhere zeros;
//!   `SEEK_DATA`/`SEEK_HOLE` and `st_blocks` show exactly the reported ranges; ranges marked
//!   zero read zeros in TO;
//! - the ranges cover every byte where the two qemu-img conversions differ;
//! - the ranges are exactly the bytes whose resolved mapping differs per `qemu-img map
//!   --output=json` of both views (layer and host offset, or zero/unallocated). qemu-img map
//!   gives no offset for compressed clusters: where both sides are compressed in the same
//!   layer, the test's own write log says what changed;
//! - `snapfs diff --json IMAGE FROM TO` prints the same list, without a mount.
//!
//! Images: internal snapshots of one image with compressed, zero, discarded, rewritten and
//! same-content clusters; a chain of three cluster sizes (4 KiB, 16 KiB, 64 KiB) with internal
//! snapshots in two layers and a snapshot smaller than the grown live disk; qcow2 over a sparse
//! raw file.

use std::collections::BTreeSet;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use crate::common::*;

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// One view of the chain under test: its name in pair names, how qemu-img reaches it, and the
/// index in the chain of the layer it starts at (qemu-img map's depth counts from there).
#[derive(Clone)]
struct Point {
    name: &'static str,
    view: View,
    start: usize,
}

/// Where the bytes of a range come from, per qemu-img map.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Key {
    Zero,
    /// Layer and host offset at the range's start.
    Data(usize, u64),
    /// A compressed cluster of this layer (qemu-img map gives no offset).
    Compressed(usize),
}

/// `qemu-img map --output=json` of a view as (start, end, key at start).
fn resolved_map(point: &Point) -> Vec<(u64, u64, Key)> {
    let (file, copy) = match &point.view {
        View::Internal { image, id } => {
            let c = applied_snapshot_copy(image, id);
            (c.clone(), Some(c))
        }
        other => (other.file().to_owned(), None),
    };
    let out = qemu_img(&["map", "-U", "--output=json", s(&file)]);
    if let Some(c) = copy {
        fs::remove_file(c).ok();
    }
    let v: serde_json::Value = serde_json::from_str(&out).expect("qemu-img map JSON");
    v.as_array()
        .expect("map is a list")
        .iter()
        .map(|e| {
            let start = e["start"].as_u64().unwrap();
            let end = start + e["length"].as_u64().unwrap();
            let layer = point.start + e["depth"].as_u64().unwrap() as usize;
            let key = if e["zero"].as_bool() == Some(true) || e["present"].as_bool() != Some(true) {
                Key::Zero
            } else if e["compressed"].as_bool() == Some(true) {
                Key::Compressed(layer)
            } else {
                Key::Data(layer, e["offset"].as_u64().expect("offset of a data range"))
            };
            (start, end, key)
        })
        .collect()
}

fn key_at(map: &[(u64, u64, Key)], pos: u64) -> (Key, u64) {
    match map.iter().find(|(s, e, _)| *s <= pos && pos < *e) {
        Some(&(s, e, Key::Data(l, off))) => (Key::Data(l, off + (pos - s)), e),
        Some(&(_, e, k)) => (k, e),
        // Past FROM's end: zeros.
        None => (Key::Zero, u64::MAX),
    }
}

/// The bytes whose resolved mapping differs, and the bytes compressed in the same layer on
/// both sides (undecided by qemu-img map).
fn metadata_diff(from: &[(u64, u64, Key)], to: &[(u64, u64, Key)], size: u64) -> (Ranges, Ranges) {
    let (mut differ, mut compressed) = (Vec::new(), Vec::new());
    let mut pos = 0;
    while pos < size {
        let (a, ea) = key_at(from, pos);
        let (b, eb) = key_at(to, pos);
        let end = ea.min(eb).min(size);
        match (a, b) {
            (Key::Compressed(x), Key::Compressed(y)) if x == y => compressed.push((pos, end)),
            _ if a != b => differ.push((pos, end)),
            _ => {}
        }
        pos = end;
    }
    (merge_ranges(differ), merge_ranges(compressed))
}

fn ranges_and(a: &Ranges, b: &Ranges) -> Ranges {
    ranges_minus(a, &ranges_minus(a, b))
}

/// Byte ranges where two raw files differ, the shorter one read as zeros past its end, over
/// `size` bytes.
fn content_diff(a: &[u8], b: &[u8], size: u64) -> Ranges {
    let mut out = Vec::new();
    let at = |v: &[u8], i: usize| v.get(i).copied().unwrap_or(0);
    let mut i = 0usize;
    while (i as u64) < size {
        let n = (64usize << 10).min(size as usize - i);
        let same = a.get(i..i + n) == b.get(i..i + n);
        if !same || a.len() < i + n || b.len() < i + n {
            for j in i..i + n {
                if at(a, j) != at(b, j) {
                    out.push((j as u64, j as u64 + 1));
                }
            }
        }
        i += n;
    }
    merge_ranges(out)
}

#[derive(serde::Deserialize, Debug, PartialEq)]
struct JsonRange {
    start: u64,
    length: u64,
    zero: bool,
}

/// Checks `changes/FROM..TO` on the mount against the oracles; returns the problems found.
/// `log`: what the test wrote between the two points, for ranges qemu-img map cannot decide.
fn pair_problems(m: &Mount, top: &Path, from: &Point, to: &Point, log: &Ranges) -> Vec<String> {
    let mut problems = Vec::new();
    let label = format!("{}..{}", from.name, to.name);
    let raw_path = m.path().join(format!("changes/{label}.raw"));
    let json_path = m.path().join(format!("changes/{label}.json"));
    let json_text = fs::read_to_string(&json_path).unwrap_or_else(|e| panic!("{label}.json: {e}"));
    let listed: Vec<JsonRange> = serde_json::from_str(&json_text).expect("changes JSON");
    let reported = merge_ranges(
        listed
            .iter()
            .map(|r| (r.start, r.start + r.length))
            .collect(),
    );

    // The same list without mounting.
    let out = run(snapfs_cmd().args(["diff", "--json", s(top), from.name, to.name]));
    if out.stdout != json_text.as_bytes() {
        problems.push(format!(
            "{label}: snapfs diff --json printed {} but the mount's .json is {json_text}",
            String::from_utf8_lossy(&out.stdout)
        ));
    }

    let from_raw = fs::read(from.view.oracle_raw()).unwrap();
    let to_raw = fs::read(to.view.oracle_raw()).unwrap();
    let size = to_raw.len() as u64;
    let meta = fs::metadata(&raw_path).unwrap();
    if meta.len() != size {
        problems.push(format!(
            "{label}.raw: size {} but TO has {size} bytes",
            meta.len()
        ));
    }
    if meta.blocks() * 512 != ranges_total(&reported) {
        problems.push(format!(
            "{label}.raw: st_blocks {} but the ranges hold {} bytes",
            meta.blocks(),
            ranges_total(&reported)
        ));
    }
    if let Some(d) = describe_ranges_diff(
        "SEEK_DATA",
        &seek_data_ranges(&raw_path),
        "the .json",
        &reported,
    ) {
        problems.push(format!("{label}.raw: {d}"));
    }

    // Content: TO's bytes in the ranges, zeros elsewhere; zero ranges read zeros in TO.
    let file = fs::read(&raw_path).unwrap();
    let mut expected = vec![0u8; size as usize];
    for &(a, b) in &reported {
        expected[a as usize..b as usize].copy_from_slice(&to_raw[a as usize..b as usize]);
    }
    if file != expected {
        let at = file.iter().zip(&expected).position(|(x, y)| x != y);
        problems.push(format!(
            "{label}.raw: content differs from TO's bytes in the ranges at {at:?}"
        ));
    }
    for r in listed.iter().filter(|r| r.zero) {
        if to_raw[r.start as usize..(r.start + r.length) as usize]
            .iter()
            .any(|&b| b != 0)
        {
            problems.push(format!(
                "{label}: range at {:#x} is marked zero but TO has data there",
                r.start
            ));
        }
    }

    // Every byte that differs is reported.
    let changed = content_diff(&from_raw, &to_raw, size);
    let missed = ranges_minus(&changed, &reported);
    if !missed.is_empty() {
        problems.push(format!(
            "{label}: bytes that differ but are not reported: {missed:x?}"
        ));
    }

    // Exactly the bytes whose mapping differs.
    let to_map = resolved_map(to);
    let (differ, compressed) = metadata_diff(&resolved_map(from), &to_map, size);
    let want = merge_ranges([differ, ranges_and(&compressed, log)].concat());
    if let Some(d) = describe_ranges_diff("snapfs", &reported, "qemu-img map", &want) {
        problems.push(format!("{label}: {d}"));
    }

    // Marked zero exactly where TO reads zeros by its mapping (a zero cluster, a discarded or
    // unallocated range, a hole of a raw layer), through the whole chain.
    let to_zeros = merge_ranges(
        to_map
            .iter()
            .filter(|(_, _, k)| *k == Key::Zero)
            .map(|&(a, b, _)| (a, b.min(size)))
            .collect(),
    );
    let marked_zero = merge_ranges(
        listed
            .iter()
            .filter(|r| r.zero)
            .map(|r| (r.start, r.start + r.length))
            .collect(),
    );
    if let Some(d) = describe_ranges_diff(
        "zero: true",
        &marked_zero,
        "changed ranges TO maps as zeros",
        &ranges_and(&reported, &to_zeros),
    ) {
        problems.push(format!("{label}: {d}"));
    }
    problems
}

fn assert_pairs(m: &Mount, top: &Path, pairs: &[(&Point, &Point, Ranges)]) {
    let mut problems = Vec::new();
    for (from, to, log) in pairs {
        problems.extend(pair_problems(m, top, from, to, log));
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

fn listing(m: &Mount) -> BTreeSet<String> {
    fs::read_dir(m.path().join("changes"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect()
}

fn listed(pairs: &[&str]) -> BTreeSet<String> {
    pairs
        .iter()
        .flat_map(|p| [format!("{p}.raw"), format!("{p}.json")])
        .collect()
}

const K: u64 = KIB;
const M: u64 = MIB;

/// Internal snapshots of one image (64 KiB clusters): rewritten, compressed, zeroed, discarded,
/// partly written, zero-byte and same-content clusters between the points.
#[test]
fn internal_snapshots_match_qemu_img() {
    let work = workdir();
    let img = work.path().join("vm.qcow2");
    create_qcow2(&img, 64 * M, "cluster_size=65536", None);
    qemu_io(
        &img,
        &[
            "write -P 1 0 4M",
            "write -c -P 2 8M 256k",
            "write -P 3 16M 1M",
        ],
    );
    snapshot_create(&img, "s1");
    qemu_io(
        &img,
        &[
            "write -P 4 64k 64k",
            "write -c -P 5 9M 64k",
            "write -z 16M 128k",
            "discard 16896k 64k",
            "write -P 6 40M 4k",
            "write -P 0 2M 64k",
            "write -P 1 3M 64k",
        ],
    );
    snapshot_create(&img, "s2");
    qemu_io(
        &img,
        &[
            "write -P 7 60M 64k",
            "write -z 0 64k",
            "discard 8M 64k",
            "write -c -P 8 8M 64k",
        ],
    );

    let p = |name, view| Point {
        name,
        view,
        start: 0,
    };
    let s1 = p("s1", View::internal(&img, "s1"));
    let s2 = p("s2", View::internal(&img, "s2"));
    let live = p("live", View::live(&img));
    // What was written, for the compressed clusters qemu-img map cannot tell apart.
    let log_12 = Vec::new();
    let log_2l = vec![(8 * M, 8 * M + 64 * K)];
    let log_1l = log_2l.clone();

    let m = Mount::with_args(&img, &["-r"]);
    assert_eq!(listing(&m), listed(&["s1..s2", "s2..live"]));
    assert_pairs(
        &m,
        &img,
        &[
            (&s1, &s2, log_12.clone()),
            (&s2, &s1, log_12.clone()),
            (&s2, &live, log_2l),
            (&s1, &live, log_1l.clone()),
            (&live, &s1, log_1l),
            (&s1, &s1, Vec::new()),
        ],
    );
}

/// A chain of three cluster sizes with internal snapshots in the top and a middle layer, the
/// live disk grown after the top's snapshot; pairs across layers in both directions.
#[test]
fn chain_with_cluster_sizes_and_sizes_matches_qemu_img() {
    let work = workdir();
    let dir = work.path();
    let (base, mid, top) = (
        dir.join("base.qcow2"),
        dir.join("mid.qcow2"),
        dir.join("top.qcow2"),
    );
    create_qcow2(&base, 32 * M, "cluster_size=65536", None);
    qemu_io(&base, &["write -P 1 0 8M", "write -c -P 9 12M 128k"]);
    create_qcow2(
        &mid,
        32 * M,
        "cluster_size=4096",
        Some(("base.qcow2", "qcow2")),
    );
    qemu_io(&mid, &["write -P 2 1M 4k", "write -P 2 5M 12k"]);
    snapshot_create(&mid, "m1");
    qemu_io(
        &mid,
        &["write -z 2M 64k", "discard 1M 4k", "write -P 3 12M 4k"],
    );
    create_qcow2(
        &top,
        32 * M,
        "cluster_size=16384",
        Some(("mid.qcow2", "qcow2")),
    );
    qemu_io(&top, &["write -P 4 6M 16k", "write -z 7M 32k"]);
    snapshot_create(&top, "t1");
    qemu_img(&["resize", "-q", s(&top), "48M"]);
    qemu_io(
        &top,
        &["write -P 5 40M 64k", "write -P 6 5M 4k", "discard 6M 16k"],
    );

    let base_p = Point {
        name: "base",
        view: View::layer(&base),
        start: 2,
    };
    let mid_p = Point {
        name: "mid",
        view: View::layer(&mid),
        start: 1,
    };
    let m1 = Point {
        name: "mid@m1",
        view: View::internal(&mid, "m1"),
        start: 1,
    };
    let t1 = Point {
        name: "t1",
        view: View::internal(&top, "t1"),
        start: 0,
    };
    let live = Point {
        name: "live",
        view: View::live(&top),
        start: 0,
    };

    let m = Mount::with_args(&top, &["-r"]);
    assert_eq!(
        listing(&m),
        listed(&["base..mid@m1", "mid@m1..mid", "mid..t1", "t1..live"])
    );
    let none = Vec::new;
    assert_pairs(
        &m,
        &top,
        &[
            (&base_p, &m1, none()),
            (&m1, &mid_p, none()),
            (&mid_p, &m1, none()),
            (&mid_p, &t1, none()),
            (&t1, &live, none()),
            (&live, &t1, none()),
            (&base_p, &live, none()),
            (&m1, &live, none()),
        ],
    );
}

/// qcow2 over a sparse raw file: the raw file's holes read zeros like zero clusters do.
#[test]
fn qcow2_over_sparse_raw_matches_qemu_img() {
    let work = workdir();
    let dir = work.path();
    let base = dir.join("base.raw");
    let f = fs::File::create(&base).unwrap();
    f.set_len(16 * M).unwrap();
    drop(f);
    qemu_io(&base, &["write -P 1 0 1M", "write -P 2 4M 1M"]);
    let top = dir.join("top.qcow2");
    create_qcow2(
        &top,
        16 * M,
        "cluster_size=65536",
        Some(("base.raw", "raw")),
    );
    qemu_io(
        &top,
        &[
            "write -z 0 64k",
            "write -z 8M 64k",
            "write -P 3 4M 4k",
            "write -P 4 10M 64k",
        ],
    );

    let base_p = Point {
        name: "base",
        view: View::layer(&base),
        start: 1,
    };
    let live = Point {
        name: "live",
        view: View::live(&top),
        start: 0,
    };
    let m = Mount::with_args(&top, &["-r"]);
    assert_eq!(listing(&m), listed(&["base..live"]));
    assert_pairs(
        &m,
        &top,
        &[(&base_p, &live, Vec::new()), (&live, &base_p, Vec::new())],
    );
    // A zero cluster over a hole of the raw file is no change.
    let text = fs::read_to_string(m.path().join("changes/base..live.json")).unwrap();
    assert!(!text.contains(&format!("\"start\": {}", 8 * M)), "{text}");
}

/// Names that are not two views of the mount are not there; any two views are, listed or not.
#[test]
fn pairs_by_name() {
    let work = workdir();
    let img = work.path().join("vm.qcow2");
    create_qcow2(&img, 8 * M, "", None);
    snapshot_create(&img, "a..b");
    qemu_io(&img, &["write -P 1 0 64k"]);
    snapshot_create(&img, "c");
    let m = Mount::with_args(&img, &["-r"]);
    let changes = m.path().join("changes");
    for missing in [
        "c..x.raw",
        "x..c.raw",
        "c..raw",
        "c.live.raw",
        "c..live.txt",
        "..c.raw",
    ] {
        assert!(!changes.join(missing).exists(), "{missing} exists");
    }
    // A snapshot name holding `..` still pairs.
    let json = fs::read_to_string(changes.join("a..b..c.json")).unwrap();
    let ranges: Vec<JsonRange> = serde_json::from_str(&json).unwrap();
    assert_eq!(
        ranges,
        vec![JsonRange {
            start: 0,
            length: 64 * K,
            zero: false
        }]
    );
    assert_eq!(
        fs::read_to_string(changes.join("c..c.json")).unwrap(),
        "[]\n"
    );
    assert_eq!(listing(&m), listed(&["a..b..c", "c..live"]));
    // The table for people: one line per range, and a total.
    let out = run(snapfs_cmd().args(["diff", s(&img), "a..b", "c"]));
    let table = String::from_utf8_lossy(&out.stdout).into_owned();
    let lines: Vec<Vec<&str>> = table
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(lines.len(), 3, "{table}");
    assert_eq!(lines[0], ["start", "length", "kind"], "{table}");
    assert_eq!(lines[1], ["0x0", "0x10000", "data"], "{table}");
    assert_eq!(
        lines[2].join(" "),
        format!("1 range(s), 65536 of {} bytes changed", 8 * M),
        "{table}"
    );
    let out = run_status(snapfs_cmd().args(["diff", s(&img), "c", "nope"]));
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no view \"nope\""), "{err}");
}

/// Change files on a read-write mount follow the commands: a pair's views are held open while a
/// change file is (a delete of one fails with EBUSY), and after `create NAME --external` the
/// former top's snapshot and the new live disk still pair, across two layers, exactly on what
/// was written since.
#[test]
fn pairs_follow_commands_on_a_mount() {
    use crate::common::snapshot_support::{control, control_ok};
    use std::os::unix::fs::FileExt;
    let work = workdir();
    let img = work.path().join("vm.qcow2");
    create_qcow2(&img, 8 * M, "cluster_size=65536", None);
    qemu_io(&img, &["write -P 1 0 1M"]);
    let m = Mount::new(&img);
    let write = |byte: u8, at: u64| {
        let live = fs::OpenOptions::new().write(true).open(m.live()).unwrap();
        live.write_all_at(&vec![byte; 64 << 10], at).unwrap();
        live.sync_all().unwrap();
    };
    write(2, M);
    control_ok(m.path(), "create", "s1");
    write(3, 2 * M);
    let changes = m.path().join("changes");
    control_ok(m.path(), "create", "s2");
    let held = fs::File::open(changes.join("s1..s2.raw")).unwrap();
    assert_eq!(control(m.path(), "delete", "s2"), Err(libc::EBUSY));
    drop(held);
    // Once nothing holds it, it may go, and its pairs with it.
    control_ok(m.path(), "delete", "s2");
    assert!(!changes.join("s1..s2.json").exists());
    control_ok(m.path(), "create", "ext1 --external");
    write(4, 3 * M);

    // Names stay for the life of the mount: s1 keeps its name in the layer below.
    let names = m.snapshot_names();
    assert!(
        names.contains("ext1.raw") && names.contains("s1.raw"),
        "{names:?}"
    );
    assert_eq!(listing(&m), listed(&["s1..ext1", "ext1..live"]));
    let live = fs::read(m.live()).unwrap();
    for (pair, want) in [
        (
            "s1..live",
            vec![(2 * M, 2 * M + 64 * K), (3 * M, 3 * M + 64 * K)],
        ),
        ("ext1..live", vec![(3 * M, 3 * M + 64 * K)]),
        ("s1..ext1", vec![(2 * M, 2 * M + 64 * K)]),
    ] {
        let json = fs::read_to_string(changes.join(format!("{pair}.json"))).unwrap();
        let ranges: Vec<JsonRange> = serde_json::from_str(&json).unwrap();
        let got: Ranges = ranges
            .iter()
            .map(|r| (r.start, r.start + r.length))
            .collect();
        assert_eq!(got, want, "{pair}: {json}");
        assert!(ranges.iter().all(|r| !r.zero), "{pair}: {json}");
        if pair.ends_with("..live") {
            let raw = fs::read(changes.join(format!("{pair}.raw"))).unwrap();
            for &(a, b) in &want {
                assert!(
                    raw[a as usize..b as usize] == live[a as usize..b as usize],
                    "{pair}"
                );
            }
        }
    }
}

/// A view that leaves the chain takes its pairs with it at once: after `delete mid` (the
/// layer's data pulled into the layer above) the names of mid's pairs, which the kernel had
/// looked up, are gone (the kernel is told to forget them), and the pairs that remain list what
/// the new chain holds.
#[test]
fn pairs_of_a_layer_that_left_the_chain_disappear_at_once() {
    use crate::common::snapshot_support::control_ok;
    let work = workdir();
    let dir = work.path();
    let (base, mid, top) = (
        dir.join("base.qcow2"),
        dir.join("mid.qcow2"),
        dir.join("top.qcow2"),
    );
    create_qcow2(&base, 4 * M, "", None);
    qemu_io(&base, &["write -P 1 0 1M"]);
    create_qcow2(&mid, 4 * M, "", Some(("base.qcow2", "qcow2")));
    qemu_io(&mid, &["write -P 2 1M 64k"]);
    create_qcow2(&top, 4 * M, "", Some(("mid.qcow2", "qcow2")));
    qemu_io(&top, &["write -P 3 2M 64k"]);
    let m = Mount::new(&top);
    let changes = m.path().join("changes");
    for pair in ["base..mid.raw", "mid..live.raw", "base..live.json"] {
        fs::metadata(changes.join(pair)).unwrap();
    }
    let text = fs::read_to_string(changes.join("base..mid.json")).unwrap();
    assert!(text.contains(&format!("\"start\": {}", M)), "{text}");
    control_ok(m.path(), "delete", "mid");
    assert!(!changes.join("base..mid.raw").exists());
    let text = fs::read_to_string(changes.join("base..live.json")).unwrap();
    let ranges: Vec<JsonRange> = serde_json::from_str(&text).unwrap();
    let got: Ranges = ranges
        .iter()
        .map(|r| (r.start, r.start + r.length))
        .collect();
    assert_eq!(
        got,
        vec![(M, M + 64 * K), (2 * M, 2 * M + 64 * K)],
        "{text}"
    );
}
