//! Chain operations against qemu-img (issue 5, "How it is checked"): on two copies of the same
//! chain, snapfs runs `commit` (of the top and of an inner layer), `create NAME --external`,
//! `delete LAYER` and `revert LAYER` through its control files, and qemu-img does the same by
//! hand (`qemu-img commit`, `qemu-img rebase`, `qemu-img create -b` + qemu-io). Then:
//! - every file of the mount (live.raw and each view in snapshots/) equals the oracle's
//!   (`qemu-img convert` of the layer, `-l snapshot.name=` for internal snapshots), while mounted
//!   and again after a remount;
//! - `qemu-img info --backing-chain` shows the same chain (files, backing names, backing formats,
//!   sizes, cluster sizes);
//! - `qemu-img check` is clean (no errors, no leaks) on every file;
//! - files that left the chain are byte for byte what they were.
//!
//! Chains: four qcow2 layers with internal snapshots in the bottom, an inner layer and the top
//! ([`chain_a`]); qcow2 over qcow2 over raw ([`chain_r`]); qcow2 over raw.

use std::fs;
use std::path::{Path, PathBuf};

use crate::common::chain_support::*;
use crate::common::images;
use crate::common::snapshot_support::{control_ok, file_size};
use crate::common::*;

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A chain built by `build` in `W/prod` (for snapfs) and an identical copy in `W/oracle` (for
/// qemu-img).
struct Pair {
    _work: tempfile::TempDir,
    prod: PathBuf,
    orc: PathBuf,
}

impl Pair {
    fn new(build: fn(&Path) -> PathBuf) -> Pair {
        let work = workdir();
        let prod = work.path().join("prod");
        let orc = work.path().join("oracle");
        fs::create_dir_all(&prod).unwrap();
        build(&prod);
        copy_dir(&prod, &orc);
        Pair {
            prod,
            orc,
            _work: work,
        }
    }
    fn p(&self, rel: &str) -> PathBuf {
        self.prod.join(rel)
    }
    fn o(&self, rel: &str) -> PathBuf {
        self.orc.join(rel)
    }
}

/// What one operation must leave behind.
struct Expect<'a> {
    /// The product's top after the operation (relative to the chain folder).
    top: &'a str,
    /// The oracle's top for the chain comparison.
    oracle_top: PathBuf,
    /// Compare the backing names stored in headers literally.
    exact_names: bool,
    /// The views after the operation.
    views: Oracles,
    /// The views after unmounting and mounting `top` again (names follow the files then).
    remount_views: Option<Oracles>,
    /// Files that left the chain, relative: their bytes must not change.
    left: &'a [&'a str],
    /// The top must map nothing itself (commit of the top, revert to a layer).
    top_empty: bool,
}

/// Digests of the files that will leave the chain.
fn digests_of(root: &Path, rels: &[&str]) -> Vec<(String, String)> {
    rels.iter()
        .map(|r| (r.to_string(), digest(&root.join(r))))
        .collect()
}

/// Everything after the command ran and the views were checked: unmount (done by the caller),
/// chain, check, content, untouched files, remount.
fn check_after_unmount(pair: &Pair, exp: &Expect, before: &[(String, String)]) {
    let top = pair.p(exp.top);
    assert_same_chain(
        &top,
        &pair.prod,
        &exp.oracle_top,
        &pair.orc,
        exp.exact_names,
    );
    assert_all_clean(&pair.prod, "after unmount");
    let live = &exp
        .views
        .iter()
        .find(|(n, _, _)| n == "live.raw")
        .expect("live.raw oracle")
        .2;
    assert_content(&top, live, "after unmount");
    for (rel, d) in before {
        assert_eq!(
            &digest(&pair.p(rel)),
            d,
            "{rel} left the chain and must stay byte for byte as it was, but it changed"
        );
    }
    if let Some(views) = &exp.remount_views {
        let m = Mount::new(&top);
        assert_views(&m, views, "after remounting the result");
    }
}

/// Mounts `top`, runs `echo COMMAND > control/FILE`, expects `LABEL: ok`, checks the views, then
/// unmounts and checks the files. Returns the status detail.
/// Then writes [`WRITES_AFTER`] through live.raw (and with qemu-io into the oracle's live image):
/// the disk stays in use after the operation, so the live disk must stay writable and the written
/// data must reach the files.
fn run_case(
    pair: &Pair,
    top: &str,
    file: &str,
    command: &str,
    label: &str,
    mut exp: Expect,
) -> String {
    let before = digests_of(&pair.prod, exp.left);
    let detail;
    {
        let m = Mount::new(&pair.p(top));
        control_ok(m.path(), file, command);
        detail = assert_outcome_ok(m.path(), label).unwrap_or_default();
        let context = format!("after `{command}` > control/{file}");
        assert_views(&m, &exp.views, &context);

        let live_image = match &exp.views[0] {
            (n, View::Live { top }, _) if n == "live.raw" => top.clone(),
            other => panic!("the first oracle must be live.raw, got {other:?}"),
        };
        if let Err(e) = write_both(&m.live(), &live_image, WRITES_AFTER) {
            panic!(
                "{context}: writing to live.raw failed: {e}\nsnapfs stderr:\n{}",
                m.stderr_text()
            );
        }
        exp.views[0].2 = convert_to_raw(&live_image, None);
        assert_views(&m, &exp.views, &format!("{context} and writes to live.raw"));
        if let Some(r) = exp.remount_views.as_mut() {
            r[0].2 = exp.views[0].2.clone();
        }
    }
    if exp.top_empty {
        // only what was written after the operation
        let own = top_own_ranges(&pair.p(exp.top));
        let written: Ranges = merge_ranges(
            WRITES_AFTER
                .iter()
                .map(|&(_, o, l)| (o / MIB * MIB, (o + l).div_ceil(MIB) * MIB))
                .collect(),
        );
        let extra = ranges_minus(&own, &written);
        assert!(
            extra.is_empty(),
            "the top should have been emptied by `{command}` > control/{file}, but maps {extra:?} \
             besides the later writes"
        );
    }
    check_after_unmount(pair, &exp, &before);
    detail
}

/// Written through live.raw after each operation (pattern, offset, length): below 16 MiB, the
/// smallest disk of the test chains.
const WRITES_AFTER: &[(u8, u64, u64)] = &[
    (0x91, 0, 4096),
    (0x92, 5 * MIB + 512, 70_000),
    (0x93, 16 * MIB - 128 * KIB, 128 * KIB),
];

fn chain_a_views(pair: &Pair, top: &Path, with: &[&str]) -> Vec<(String, View)> {
    let mut v = vec![("live.raw".to_string(), View::live(top))];
    let o = |r: &str| pair.o(r);
    for name in with {
        let view = match *name {
            "t1" => View::internal(&o("top.qcow2"), "t1"),
            "upper" => View::layer(&o("upper.qcow2")),
            "mid" => View::layer(&o("sub/mid.qcow2")),
            "mid@ms" => View::internal(&o("sub/mid.qcow2"), "ms"),
            "base" => View::layer(&o("base.qcow2")),
            "base@bs" => View::internal(&o("base.qcow2"), "bs"),
            other => panic!("unknown view {other}"),
        };
        v.push((format!("snapshots/{name}.raw"), view));
    }
    v
}

/// The oracle files of `v`. Internal snapshots are read as qemu reads them once applied (see
/// [`applied_snapshot_raw`]), which also holds for an image shrunk after the snapshot.
fn to_oracles(v: Vec<(String, View)>) -> Oracles {
    v.into_iter()
        .map(|(n, view)| {
            let raw = match &view {
                View::Internal { image, id } => applied_snapshot_raw(image, id),
                _ => view.oracle_raw(),
            };
            (n, view, raw)
        })
        .collect()
}

#[test]
fn commit_of_the_top_of_a_qcow2_chain() {
    let pair = Pair::new(chain_a);
    let otop = pair.o("top.qcow2");
    qemu_img(&["commit", "-q", s(&otop)]);
    let views = to_oracles(chain_a_views(
        &pair,
        &otop,
        &["t1", "upper", "mid", "mid@ms", "base", "base@bs"],
    ));
    // the live disk reads the same before and after
    let before = convert_to_raw(&pair.p("top.qcow2"), None);
    assert_files_equal(&before, &views[0].2);
    run_case(
        &pair,
        "top.qcow2",
        "commit",
        "",
        "commit (top)",
        Expect {
            top: "top.qcow2",
            oracle_top: otop,
            exact_names: true,
            remount_views: Some(views.clone()),
            views,
            left: &[],
            top_empty: true,
        },
    );
    // the top's internal snapshot survives
    assert_eq!(
        crate::common::snapshot_support::snapshot_tags(&pair.p("top.qcow2")),
        vec!["t1".to_string()]
    );
}

#[test]
fn commit_of_an_inner_layer_into_a_smaller_base_with_snapshots() {
    let pair = Pair::new(chain_a);
    // qemu-img: commit mid into base (grows base; keeps base's snapshot), then point upper at base
    qemu_img(&["commit", "-q", "-d", s(&pair.o("sub/mid.qcow2"))]);
    qemu_img(&[
        "rebase",
        "-u",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        s(&pair.o("upper.qcow2")),
    ]);
    let otop = pair.o("top.qcow2");
    let views = to_oracles(chain_a_views(
        &pair,
        &otop,
        &["t1", "upper", "base", "base@bs"],
    ));
    assert_eq!(
        file_size(
            &views
                .iter()
                .find(|v| v.0 == "snapshots/base.raw")
                .unwrap()
                .2
        ),
        64 * MIB,
        "oracle: qemu-img commit grows the base"
    );
    run_case(
        &pair,
        "top.qcow2",
        "commit",
        "mid",
        "commit mid",
        Expect {
            top: "top.qcow2",
            oracle_top: otop,
            exact_names: true,
            remount_views: Some(views.clone()),
            views,
            left: &["sub/mid.qcow2"],
            top_empty: false,
        },
    );
    assert_eq!(
        chain_files(&pair.p("top.qcow2"), &pair.prod),
        vec!["top.qcow2", "upper.qcow2", "base.qcow2"]
    );
}

#[test]
fn commit_of_an_inner_layer_into_a_layer_with_snapshots() {
    let pair = Pair::new(chain_a);
    qemu_img(&["commit", "-q", "-d", s(&pair.o("upper.qcow2"))]);
    qemu_img(&[
        "rebase",
        "-u",
        "-b",
        "sub/mid.qcow2",
        "-F",
        "qcow2",
        s(&pair.o("top.qcow2")),
    ]);
    let otop = pair.o("top.qcow2");
    let views = to_oracles(chain_a_views(
        &pair,
        &otop,
        &["t1", "mid", "mid@ms", "base", "base@bs"],
    ));
    run_case(
        &pair,
        "top.qcow2",
        "commit",
        "upper",
        "commit upper",
        Expect {
            top: "top.qcow2",
            oracle_top: otop,
            exact_names: true,
            remount_views: Some(views.clone()),
            views,
            left: &["upper.qcow2"],
            top_empty: false,
        },
    );
}

/// Writes through live.raw (then fsync) and the same writes with qemu-io on the oracle's top.
fn write_both(live: &Path, oracle_top: &Path, writes: &[(u8, u64, u64)]) -> Result<(), String> {
    use std::os::unix::fs::FileExt;
    let mut cmds = Vec::new();
    let f = fs::OpenOptions::new()
        .write(true)
        .open(live)
        .map_err(|e| format!("open {}: {e}", live.display()))?;
    for &(pat, off, len) in writes {
        f.write_all_at(&pattern(pat, len as usize), off)
            .map_err(|e| format!("pwrite of {len} bytes at {off:#x}: {e}"))?;
        cmds.push(format!("write -P {pat:#04x} {off} {len}"));
    }
    f.sync_all().map_err(|e| format!("fsync: {e}"))?;
    qemu_io_s(oracle_top, &cmds);
    Ok(())
}

#[test]
fn external_create_then_writes() {
    let pair = Pair::new(chain_a);
    let top = pair.p("top.qcow2");
    let size = 64 * MIB;
    let w1: &[(u8, u64, u64)] = &[
        (0x61, 0, 4096),
        (0x62, 3 * MIB + 512, 70_000),
        (0x63, 32 * MIB - 64 * KIB, 256 * KIB),
        (0x64, size - 4096, 4096),
    ];
    let w2: &[(u8, u64, u64)] = &[
        (0x71, 128 * KIB - 512, 1024),
        (0x72, 20 * MIB, MIB + 3),
        (0x73, 3 * MIB + 4096, 4096),
    ];
    let e1 = pair.o("top.e1.qcow2");
    let e2 = pair.o("sub/e2.qcow2");
    let m = Mount::new(&top);

    // 1. default file name: TOP-DIR/TOP-STEM.NAME.qcow2
    control_ok(m.path(), "create", "e1 --external");
    assert_outcome_ok(m.path(), "create e1");
    assert!(
        pair.p("top.e1.qcow2").is_file(),
        "create e1 --external should have made {}",
        pair.p("top.e1.qcow2").display()
    );
    create_qcow2(
        &e1,
        size,
        "cluster_size=131072",
        Some(("top.qcow2", "qcow2")),
    );
    write_both(&m.live(), &e1, w1).unwrap();
    let mut v = chain_a_views(
        &pair,
        &e1,
        &["t1", "upper", "mid", "mid@ms", "base", "base@bs"],
    );
    // the old top keeps its internal snapshot t1 under its stable name
    v.push(("snapshots/e1.raw".into(), View::layer(&pair.o("top.qcow2"))));
    let views1 = to_oracles(v.clone());
    assert_views(&m, &views1, "after create e1 --external and writes");

    // 2. FILE relative to the top's folder
    control_ok(m.path(), "create", "e2 --external sub/e2.qcow2");
    assert_outcome_ok(m.path(), "create e2");
    create_qcow2(
        &e2,
        size,
        "cluster_size=131072",
        Some(("../top.e1.qcow2", "qcow2")),
    );
    write_both(&m.live(), &e2, w2).unwrap();
    v[0].1 = View::live(&e2);
    v.push(("snapshots/e2.raw".into(), View::layer(&e1)));
    let views2 = to_oracles(v);
    assert_views(
        &m,
        &views2,
        "after create e2 --external sub/e2.qcow2 and writes",
    );
    drop(m);

    // after the unmount: the new top is sub/e2.qcow2, its chain is e2 -> top.e1 -> top -> ...
    let new_top = pair.p("sub/e2.qcow2");
    assert_same_chain(&new_top, &pair.prod, &e2, &pair.orc, false);
    for (f, want) in [
        ("top.e1.qcow2", "top.qcow2"),
        ("sub/e2.qcow2", "top.e1.qcow2"),
    ] {
        let info = &chain_of(&pair.p(f), &pair.prod)[0];
        assert_eq!(
            info.backing_format.as_deref(),
            Some("qcow2"),
            "{f}: {info:?}"
        );
        assert_eq!(info.backing_file.as_deref(), Some(want), "{f}: {info:?}");
        assert_eq!(
            info.cluster_size,
            Some(128 * KIB),
            "{f}: same cluster size as the old top"
        );
    }
    assert_all_clean(&pair.prod, "after unmount");
    assert_content(&new_top, &views2[0].2, "after unmount");

    // mounted again from the new top: the layers are named after their files now
    let renamed: Oracles = views2
        .iter()
        .map(|(n, view, raw)| {
            let n = match n.as_str() {
                "snapshots/e1.raw" => "snapshots/top.raw".to_string(),
                "snapshots/e2.raw" => "snapshots/top.e1.raw".to_string(),
                "snapshots/t1.raw" => "snapshots/top@t1.raw".to_string(),
                other => other.to_string(),
            };
            (n, view.clone(), raw.clone())
        })
        .collect();
    let m = Mount::new(&new_top);
    assert_views(&m, &renamed, "after remounting the new top");
}

#[test]
fn delete_of_an_inner_layer_pulls_it_into_the_layer_above() {
    let pair = Pair::new(chain_a);
    // qemu-img: safe rebase of upper onto base (copies what mid provided into upper)
    qemu_img(&[
        "rebase",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        s(&pair.o("upper.qcow2")),
    ]);
    let otop = pair.o("top.qcow2");
    let views = to_oracles(chain_a_views(
        &pair,
        &otop,
        &["t1", "upper", "base", "base@bs"],
    ));
    // every remaining view keeps its content
    let upper_before = convert_to_raw(&pair.p("upper.qcow2"), None);
    assert_files_equal(&upper_before, &views[2].2);
    let detail = run_case(
        &pair,
        "top.qcow2",
        "delete",
        "mid",
        "delete mid",
        Expect {
            top: "top.qcow2",
            oracle_top: otop,
            exact_names: true,
            remount_views: Some(views.clone()),
            views,
            left: &["sub/mid.qcow2"],
            top_empty: false,
        },
    );
    assert!(
        detail.contains("mid.qcow2"),
        "the status line of delete should name the file that left the chain (and say it stays): {detail:?}"
    );
    assert!(pair.p("sub/mid.qcow2").is_file());
}

#[test]
fn revert_to_an_inner_layer() {
    let pair = Pair::new(chain_a);
    // qemu-img: a fresh overlay over mid is what the live disk must read; the top keeps t1,
    // which now reads through mid (unsafe rebase keeps the snapshot's own clusters)
    let fresh = pair.o("fresh.qcow2");
    create_qcow2(&fresh, 64 * MIB, "", Some(("sub/mid.qcow2", "qcow2")));
    let otop = pair.o("top.qcow2");
    qemu_img(&[
        "rebase",
        "-u",
        "-b",
        "sub/mid.qcow2",
        "-F",
        "qcow2",
        s(&otop),
    ]);
    let mut v = chain_a_views(&pair, &otop, &["t1", "mid", "mid@ms", "base", "base@bs"]);
    v[0].1 = View::live(&fresh);
    let views = to_oracles(v);
    let detail = run_case(
        &pair,
        "top.qcow2",
        "revert",
        "mid",
        "revert mid",
        Expect {
            top: "top.qcow2",
            oracle_top: otop,
            exact_names: true,
            remount_views: Some(views.clone()),
            views,
            left: &["upper.qcow2"],
            top_empty: true,
        },
    );
    assert!(
        detail.contains("upper.qcow2"),
        "the status line of revert should list the layers that left the chain: {detail:?}"
    );
}

#[test]
fn revert_to_the_smaller_bottom_layer_resizes_the_top() {
    let pair = Pair::new(chain_a);
    let fresh = pair.o("fresh.qcow2");
    create_qcow2(&fresh, 32 * MIB, "", Some(("base.qcow2", "qcow2")));
    let otop = pair.o("top.qcow2");
    qemu_img(&["rebase", "-u", "-b", "base.qcow2", "-F", "qcow2", s(&otop)]);
    qemu_img(&["resize", "-q", "--shrink", s(&otop), "32M"]);
    let mut v = chain_a_views(&pair, &otop, &["t1", "base", "base@bs"]);
    v[0].1 = View::live(&fresh);
    let views = to_oracles(v);
    assert_eq!(file_size(&views[0].2), 32 * MIB);
    let detail = run_case(
        &pair,
        "top.qcow2",
        "revert",
        "base",
        "revert base",
        Expect {
            top: "top.qcow2",
            oracle_top: otop,
            exact_names: true,
            remount_views: Some(views.clone()),
            views,
            left: &["upper.qcow2", "sub/mid.qcow2"],
            top_empty: true,
        },
    );
    assert!(
        detail.contains("upper.qcow2") && detail.contains("mid.qcow2"),
        "the status line of revert should list the layers that left the chain: {detail:?}"
    );
}

fn chain_r_views(pair: &Pair, top: &Path, with: &[&str]) -> Vec<(String, View)> {
    let mut v = vec![("live.raw".to_string(), View::live(top))];
    for name in with {
        let view = match *name {
            "s" => View::internal(top, "s"),
            "mid" => View::layer(&pair.o("mid.qcow2")),
            "base" => View::layer(&pair.o("base.img")),
            other => panic!("unknown view {other}"),
        };
        v.push((format!("snapshots/{name}.raw"), view));
    }
    v
}

#[test]
fn commit_of_an_inner_layer_into_a_raw_base() {
    let pair = Pair::new(chain_r);
    qemu_img(&["commit", "-q", "-d", s(&pair.o("mid.qcow2"))]);
    let otop = pair.o("top.qcow2");
    qemu_img(&["rebase", "-u", "-b", "base.img", "-F", "raw", s(&otop)]);
    assert_eq!(
        file_size(&pair.o("base.img")),
        32 * MIB,
        "oracle: the raw base grows"
    );
    let views = to_oracles(chain_r_views(&pair, &otop, &["s", "base"]));
    run_case(
        &pair,
        "top.qcow2",
        "commit",
        "mid",
        "commit mid",
        Expect {
            top: "top.qcow2",
            oracle_top: otop,
            exact_names: true,
            remount_views: Some(views.clone()),
            views,
            left: &["mid.qcow2"],
            top_empty: false,
        },
    );
    assert_eq!(file_size(&pair.p("base.img")), 32 * MIB);
}

#[test]
fn commit_of_the_top_into_a_raw_base() {
    let pair = Pair::new(|d| images::raw_backing(d).0);
    let otop = pair.o("overlay.qcow2");
    qemu_img(&["commit", "-q", s(&otop)]);
    let views = to_oracles(vec![
        ("live.raw".into(), View::live(&otop)),
        ("snapshots/s.raw".into(), View::internal(&otop, "s")),
        (
            "snapshots/base.raw".into(),
            View::layer(&pair.o("base.img")),
        ),
    ]);
    run_case(
        &pair,
        "overlay.qcow2",
        "commit",
        "",
        "commit (top)",
        Expect {
            top: "overlay.qcow2",
            oracle_top: otop,
            exact_names: true,
            remount_views: Some(views.clone()),
            views,
            left: &[],
            top_empty: true,
        },
    );
    assert_eq!(file_size(&pair.p("base.img")), 32 * MIB);
}

#[test]
fn delete_of_a_raw_bottom_layer() {
    let pair = Pair::new(chain_r);
    qemu_img(&["rebase", "-b", "", s(&pair.o("mid.qcow2"))]);
    let otop = pair.o("top.qcow2");
    let views = to_oracles(chain_r_views(&pair, &otop, &["s", "mid"]));
    let detail = run_case(
        &pair,
        "top.qcow2",
        "delete",
        "base",
        "delete base",
        Expect {
            top: "top.qcow2",
            oracle_top: otop,
            exact_names: true,
            remount_views: Some(views.clone()),
            views,
            left: &["base.img"],
            top_empty: false,
        },
    );
    assert!(detail.contains("base.img"), "{detail:?}");
    assert_eq!(
        chain_files(&pair.p("top.qcow2"), &pair.prod),
        vec!["top.qcow2", "mid.qcow2"]
    );
}

#[test]
fn revert_to_a_raw_layer() {
    let pair = Pair::new(chain_r);
    let fresh = pair.o("fresh.qcow2");
    create_qcow2(&fresh, 16 * MIB, "", Some(("base.img", "raw")));
    let otop = pair.o("top.qcow2");
    qemu_img(&["rebase", "-u", "-b", "base.img", "-F", "raw", s(&otop)]);
    qemu_img(&["resize", "-q", "--shrink", s(&otop), "16M"]);
    let mut v = chain_r_views(&pair, &otop, &["s", "base"]);
    v[0].1 = View::live(&fresh);
    let views = to_oracles(v);
    let detail = run_case(
        &pair,
        "top.qcow2",
        "revert",
        "base",
        "revert base",
        Expect {
            top: "top.qcow2",
            oracle_top: otop,
            exact_names: true,
            remount_views: Some(views.clone()),
            views,
            left: &["mid.qcow2"],
            top_empty: true,
        },
    );
    assert!(detail.contains("mid.qcow2"), "{detail:?}");
}

/// Chain A without the top's snapshot t1 (which reads through every layer, so no pull could
/// keep it).
fn chain_a_without_t1(dir: &Path) -> PathBuf {
    let top = chain_a(dir);
    qemu_img(&["snapshot", "-d", "t1", s(&top)]);
    top
}

#[test]
fn pull_of_every_layer_makes_the_top_stand_alone() {
    let pair = Pair::new(chain_a_without_t1);
    let otop = pair.o("top.qcow2");
    // qemu-img: safe rebase onto no backing file copies everything the top reads from below
    qemu_img(&["rebase", "-b", "", s(&otop)]);
    let views = to_oracles(chain_a_views(&pair, &otop, &[]));
    let before = convert_to_raw(&pair.p("top.qcow2"), None);
    assert_files_equal(&before, &views[0].2);
    let detail = run_case(
        &pair,
        "top.qcow2",
        "pull",
        "",
        "pull (all)",
        Expect {
            top: "top.qcow2",
            oracle_top: otop,
            exact_names: true,
            remount_views: Some(views.clone()),
            views,
            left: &["upper.qcow2", "sub/mid.qcow2", "base.qcow2"],
            top_empty: false,
        },
    );
    assert!(
        detail.contains("upper.qcow2")
            && detail.contains("mid.qcow2")
            && detail.contains("base.qcow2"),
        "the status line of pull should list the layers that left the chain: {detail:?}"
    );
    assert_eq!(
        chain_files(&pair.p("top.qcow2"), &pair.prod),
        vec!["top.qcow2"]
    );
}

#[test]
fn pull_onto_a_base_keeps_the_layers_below_it() {
    let pair = Pair::new(chain_a_without_t1);
    let otop = pair.o("top.qcow2");
    qemu_img(&["rebase", "-b", "base.qcow2", "-F", "qcow2", s(&otop)]);
    let views = to_oracles(chain_a_views(&pair, &otop, &["base", "base@bs"]));
    run_case(
        &pair,
        "top.qcow2",
        "pull",
        "base",
        "pull base",
        Expect {
            top: "top.qcow2",
            oracle_top: otop,
            exact_names: true,
            remount_views: Some(views.clone()),
            views,
            left: &["upper.qcow2", "sub/mid.qcow2"],
            top_empty: false,
        },
    );
    assert_eq!(
        chain_files(&pair.p("top.qcow2"), &pair.prod),
        vec!["top.qcow2", "base.qcow2"]
    );
}

#[test]
fn pull_of_a_chain_over_a_raw_base() {
    let pair = Pair::new(|d| {
        let top = chain_r(d);
        qemu_img(&["snapshot", "-d", "s", s(&top)]);
        top
    });
    let otop = pair.o("top.qcow2");
    qemu_img(&["rebase", "-b", "", s(&otop)]);
    let views = to_oracles(chain_r_views(&pair, &otop, &[]));
    run_case(
        &pair,
        "top.qcow2",
        "pull",
        "",
        "pull (all)",
        Expect {
            top: "top.qcow2",
            oracle_top: otop,
            exact_names: true,
            remount_views: Some(views.clone()),
            views,
            left: &["mid.qcow2", "base.img"],
            top_empty: false,
        },
    );
}

/// base.qcow2 (64 MiB of data) <- small.qcow2 (16 MiB, a little data) <- top.qcow2 (64 MiB):
/// past small's end the live disk reads zeros although base has data there.
fn chain_with_a_small_middle(dir: &Path) -> PathBuf {
    let base = dir.join("base.qcow2");
    create_qcow2(&base, 64 * MIB, "", None);
    qemu_io_s(&base, &[format!("write -P 0x11 0 {}", 64 * MIB)]);
    let small = dir.join("small.qcow2");
    create_qcow2(&small, 16 * MIB, "", Some(("base.qcow2", "qcow2")));
    qemu_io_s(&small, &[format!("write -P 0x22 {} {}", MIB, 2 * MIB)]);
    let top = dir.join("top.qcow2");
    create_qcow2(&top, 64 * MIB, "", Some(("small.qcow2", "qcow2")));
    qemu_io_s(
        &top,
        &[format!("write -P 0x33 {} {}", 40 * MIB + 512, 3 * MIB)],
    );
    top
}

/// Past the end of a layer that leaves the chain the live disk read zeros: it still does,
/// although the new backing file has data there.
#[test]
fn pull_past_the_end_of_a_smaller_layer_keeps_the_zeros() {
    let pair = Pair::new(chain_with_a_small_middle);
    let otop = pair.o("top.qcow2");
    qemu_img(&["rebase", "-b", "base.qcow2", "-F", "qcow2", s(&otop)]);
    let views = to_oracles(vec![
        ("live.raw".into(), View::live(&otop)),
        (
            "snapshots/base.raw".into(),
            View::layer(&pair.o("base.qcow2")),
        ),
    ]);
    run_case(
        &pair,
        "top.qcow2",
        "pull",
        "base",
        "pull base",
        Expect {
            top: "top.qcow2",
            oracle_top: otop,
            exact_names: true,
            remount_views: Some(views.clone()),
            views,
            left: &["small.qcow2"],
            top_empty: false,
        },
    );
}

/// base.qcow2 <- mid.qcow2 (data in the first 4 MiB only) <- top.qcow2 (its own data over those
/// 4 MiB, then snapshot `covered`, then more data): `covered` reads nothing from mid.
fn chain_with_a_covering_snapshot(dir: &Path) -> PathBuf {
    let base = dir.join("base.qcow2");
    create_qcow2(&base, 32 * MIB, "", None);
    images::fill(&base, 64 * KIB, 32 * MIB, 1, None);
    let mid = dir.join("mid.qcow2");
    create_qcow2(&mid, 32 * MIB, "", Some(("base.qcow2", "qcow2")));
    qemu_io_s(&mid, &[format!("write -P 0x21 0 {}", 4 * MIB)]);
    let top = dir.join("top.qcow2");
    create_qcow2(&top, 32 * MIB, "", Some(("mid.qcow2", "qcow2")));
    qemu_io_s(&top, &[format!("write -P 0x31 0 {}", 4 * MIB)]);
    snapshot_create(&top, "covered");
    qemu_io_s(&top, &[format!("write -P 0x32 {} {}", 8 * MIB, MIB)]);
    top
}

/// An internal snapshot of the top that reads nothing from the layers leaving the chain does
/// not stop a pull, nor a delete of such a layer, and keeps its content.
#[test]
fn pull_and_delete_of_a_layer_keep_a_snapshot_that_does_not_read_it() {
    for (file, command, label) in [
        ("pull", "base", "pull base"),
        ("delete", "mid", "delete mid"),
    ] {
        let pair = Pair::new(chain_with_a_covering_snapshot);
        let otop = pair.o("top.qcow2");
        let covered_before = applied_snapshot_raw(&pair.p("top.qcow2"), "covered");
        qemu_img(&["rebase", "-b", "base.qcow2", "-F", "qcow2", s(&otop)]);
        let views = to_oracles(vec![
            ("live.raw".into(), View::live(&otop)),
            (
                "snapshots/covered.raw".into(),
                View::internal(&otop, "covered"),
            ),
            (
                "snapshots/base.raw".into(),
                View::layer(&pair.o("base.qcow2")),
            ),
        ]);
        assert_files_equal(&covered_before, &views[1].2);
        run_case(
            &pair,
            "top.qcow2",
            file,
            command,
            label,
            Expect {
                top: "top.qcow2",
                oracle_top: otop,
                exact_names: true,
                remount_views: Some(views.clone()),
                views,
                left: &["mid.qcow2"],
                top_empty: false,
            },
        );
    }
}
