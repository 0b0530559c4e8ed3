//! Which pairs `changes/` lists (issue 17 point 2, docs/changes.md): for each snapshot the pair
//! from its parent, and the pair from the current snapshot to `live`. With a libvirt folder the
//! parent is libvirt's `<parent>` and the current snapshot libvirt's; a snapshot libvirt does
//! not know falls back to the previous snapshot of its layer by date, and then to the layer
//! below. The fixture is the libvirt folder tests' chain (base <- mid <- vm, internal snapshots
//! in mid and vm, a tree with branches). Every listed pair reads right: TO's bytes where it
//! reports a change, zeros elsewhere, every differing byte reported, zero ranges reading zeros.

use std::collections::BTreeSet;
use std::fs;
use std::os::unix::fs::MetadataExt;

use crate::common::libvirt_support::*;
use crate::common::*;

#[derive(serde::Deserialize)]
struct JsonRange {
    start: u64,
    length: u64,
    zero: bool,
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

/// The file of a view in the mount: `live.raw` or `snapshots/NAME.raw`.
fn view_file(m: &Mount, name: &str) -> std::path::PathBuf {
    match name {
        "live" => m.live(),
        _ => m.snapshot(&format!("{name}.raw")),
    }
}

/// Checks one listed pair against the two views' own files in the mount.
fn pair_problems(m: &Mount, from: &str, to: &str) -> Vec<String> {
    let mut problems = Vec::new();
    let label = format!("{from}..{to}");
    let changes = m.path().join("changes");
    let list: Vec<JsonRange> =
        serde_json::from_str(&fs::read_to_string(changes.join(format!("{label}.json"))).unwrap())
            .unwrap_or_else(|e| panic!("{label}.json: {e}"));
    let reported = merge_ranges(list.iter().map(|r| (r.start, r.start + r.length)).collect());
    let raw_path = changes.join(format!("{label}.raw"));
    let raw = fs::read(&raw_path).unwrap();
    let a = fs::read(view_file(m, from)).unwrap();
    let b = fs::read(view_file(m, to)).unwrap();
    if raw.len() != b.len()
        || fs::metadata(&raw_path).unwrap().blocks() * 512 != ranges_total(&reported)
    {
        problems.push(format!(
            "{label}.raw: size or st_blocks do not match TO and the ranges"
        ));
    }
    let mut expected = vec![0u8; b.len()];
    for &(s, e) in &reported {
        expected[s as usize..e as usize].copy_from_slice(&b[s as usize..e as usize]);
    }
    if raw != expected {
        problems.push(format!(
            "{label}.raw: not TO's bytes in the ranges and zeros elsewhere"
        ));
    }
    let differ: Vec<(u64, u64)> = (0..b.len())
        .filter(|&i| a.get(i).copied().unwrap_or(0) != b[i])
        .map(|i| (i as u64, i as u64 + 1))
        .collect();
    let missed = ranges_minus(&merge_ranges(differ), &reported);
    if !missed.is_empty() {
        problems.push(format!(
            "{label}: differing bytes not reported: {missed:x?}"
        ));
    }
    for r in list.iter().filter(|r| r.zero) {
        if b[r.start as usize..(r.start + r.length) as usize]
            .iter()
            .any(|&x| x != 0)
        {
            problems.push(format!(
                "{label}: {:#x} is marked zero but TO has data",
                r.start
            ));
        }
    }
    problems
}

fn check_pairs(m: &Mount, pairs: &[&str]) {
    let problems: Vec<String> = pairs
        .iter()
        .flat_map(|p| {
            let (from, to) = p.split_once("..").unwrap();
            pair_problems(m, from, to)
        })
        .collect();
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn changes_lists_parents_from_libvirt_else_by_date_else_the_layer_below() {
    let wd = workdir();
    let fx = folder_fixture(wd.path());
    let dir = fx.dir.to_str().unwrap();

    // libvirt's tree: bare-os-install has no parent; 1270477159 and experiment are its children,
    // pkg-updated is 1270477159's child and libvirt's current snapshot (so live's parent, though
    // `untracked` is newer); untracked is unknown to libvirt: the previous snapshot of its layer
    // by date, pkg-updated. libvirt's name wins where the snapshot is stored (experiment lives
    // in a backing layer, which snapfs names 1270477159@experiment without libvirt).
    let m = Mount::with_args(&fx.top, &["-r", "--libvirt", dir]);
    let with_libvirt = [
        "bare-os-install..1270477159",
        "bare-os-install..experiment",
        "1270477159..pkg-updated",
        "pkg-updated..untracked",
        "pkg-updated..live",
    ];
    assert_eq!(listing(&m), listed(&with_libvirt), "{}", m.stderr_text());
    check_pairs(&m, &with_libvirt);
    drop(m);

    // Without libvirt: the previous snapshot of the layer by date (a layer's own state comes
    // after its snapshots), else the layer below.
    let m = Mount::with_args(&fx.top, &["-r"]);
    let names = m.snapshot_names();
    let without = [
        "base..mid@experiment",
        "mid@experiment..mid",
        "mid..pkg-updated",
        "pkg-updated..untracked",
        "untracked..live",
    ];
    assert_eq!(listing(&m), listed(&without), "snapshots/: {names:?}");
    check_pairs(&m, &without);
}
