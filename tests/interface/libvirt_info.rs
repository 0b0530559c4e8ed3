//! `snapfs info`: `--json` on a chain agrees with `qemu-img info --backing-chain --output=json` on
//! every field both report (per layer: filename, format, virtual-size, cluster-size,
//! backing-filename, full-backing-filename, backing-filename-format, dirty-flag, the qcow2
//! format-specific data, and every internal snapshot's id, name, vm-state-size, date and VM clock,
//! icount when present), over chains with unusual header fields (compat 0.10, lazy refcounts,
//! 64-bit refcounts, 4 KiB and 128 KiB clusters, extended L2, zstd, a dirty and a corrupt layer,
//! a raw base, snapshots with a VM clock, VM state size and icount). With `--libvirt DIR` the text
//! shows the snapshot tree like `virsh snapshot-list --tree` and the facts of
//! `virsh snapshot-info`, and the JSON has the `libvirt` array.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::common::libvirt_support::*;
use crate::common::*;

use serde_json::Value;

fn ps(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Runs `snapfs info ARGS...` (time-limited); panics unless it exits 0. Returns stdout.
fn snapfs_info(args: &[&str]) -> String {
    let mut c = snapfs_cmd();
    c.arg("info").args(args);
    let out = run_timeout(&mut c, Duration::from_secs(60));
    match out.status {
        Some(s) if s.success() => out.stdout,
        other => panic!(
            "snapfs info {args:?} ended with {other:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            out.stdout, out.stderr
        ),
    }
}

fn qemu_chain(top: &Path) -> Vec<Value> {
    let out = qemu_img(&["info", "-U", "--backing-chain", "--output=json", ps(top)]);
    serde_json::from_str::<Value>(&out)
        .expect("qemu-img info JSON")
        .as_array()
        .expect("an array")
        .clone()
}

const LAYER_FIELDS: &[&str] = &[
    "filename",
    "format",
    "virtual-size",
    "cluster-size",
    "backing-filename",
    "full-backing-filename",
    "backing-filename-format",
    "dirty-flag",
];
const QCOW2_FIELDS: &[&str] = &[
    "compat",
    "lazy-refcounts",
    "refcount-bits",
    "corrupt",
    "extended-l2",
    "compression-type",
];
const SNAPSHOT_FIELDS: &[&str] = &[
    "id",
    "name",
    "vm-state-size",
    "date-sec",
    "date-nsec",
    "vm-clock-sec",
    "vm-clock-nsec",
    "icount",
];

/// Every field `qemu-img info` reports that snapfs must report the same. A field qemu-img leaves
/// out must be left out by snapfs too, except `dirty-flag` and the qcow2 fields qemu-img omits for
/// compat 0.10 images (where `false` is still true).
fn compare_with_qemu(top: &Path) -> Vec<String> {
    let qemu = qemu_chain(top);
    let text = snapfs_info(&["--json", ps(top)]);
    let ours: Value = match serde_json::from_str(&text) {
        Ok(v) => v,
        Err(e) => return vec![format!("snapfs info --json is not JSON: {e}\n{text}")],
    };
    let mut problems = Vec::new();
    let Some(chain) = ours["chain"].as_array() else {
        return vec![format!("snapfs info --json has no `chain` array:\n{text}")];
    };
    if chain.len() != qemu.len() {
        problems.push(format!(
            "snapfs lists {} layers, qemu-img {}",
            chain.len(),
            qemu.len()
        ));
    }
    for (i, (q, o)) in qemu.iter().zip(chain).enumerate() {
        let layer = q["filename"].as_str().unwrap_or("?").to_string();
        let at = |what: &str| format!("layer {i} ({layer}): {what}");
        for f in LAYER_FIELDS {
            let (qv, ov) = (q.get(*f), o.get(*f));
            if qv.is_none() && *f == "dirty-flag" {
                continue;
            }
            if qv != ov {
                problems.push(format!("{}: qemu-img {qv:?}, snapfs {ov:?}", at(f)));
            }
        }
        // format-specific: {"type": "qcow2", "data": {...}} in qemu-img's schema.
        match (q.get("format-specific"), o.get("format-specific")) {
            (Some(qf), Some(of)) if qf["type"] == "qcow2" => {
                if of.get("type") != qf.get("type") {
                    problems.push(format!(
                        "{}: qemu-img {:?}, snapfs {:?}",
                        at("format-specific.type"),
                        qf.get("type"),
                        of.get("type")
                    ));
                }
                let od = of.get("data");
                if od.is_none() {
                    problems.push(format!(
                        "{}: snapfs has no `data` object (qemu-img: {{\"type\": \"qcow2\", \"data\": {{...}}}}), \
                         snapfs: {of}",
                        at("format-specific")
                    ));
                }
                // Compare the values where snapfs has them, nested or (schema problem reported
                // above) flat, so that a wrong value is reported as such.
                let od = od.unwrap_or(of);
                for f in QCOW2_FIELDS {
                    let (qv, ov) = (qf["data"].get(*f), od.get(*f));
                    if qv.is_none() {
                        continue;
                    }
                    if qv != ov {
                        problems.push(format!(
                            "{}: qemu-img {qv:?}, snapfs {ov:?}",
                            at(&format!("format-specific.data.{f}"))
                        ));
                    }
                }
            }
            (Some(qf), of) if qf["type"] == "qcow2" => problems.push(format!(
                "{}: qemu-img {qf}, snapfs {of:?}",
                at("format-specific")
            )),
            _ => {}
        }
        let qs = q["snapshots"].as_array().cloned().unwrap_or_default();
        let os = o["snapshots"].as_array().cloned().unwrap_or_default();
        if qs.len() != os.len() {
            problems.push(format!(
                "{}: qemu-img lists {}, snapfs {}",
                at("snapshots"),
                qs.len(),
                os.len()
            ));
        }
        for (j, (qsn, osn)) in qs.iter().zip(&os).enumerate() {
            for f in SNAPSHOT_FIELDS {
                let (qv, ov) = (qsn.get(*f), osn.get(*f));
                if qv != ov {
                    problems.push(format!(
                        "{}: qemu-img {qv:?}, snapfs {ov:?}",
                        at(&format!("snapshots[{j}].{f}"))
                    ));
                }
            }
        }
    }
    problems
}

fn report(what: &str, problems: Vec<String>) {
    if !problems.is_empty() {
        panic!(
            "{what}: snapfs info --json differs from qemu-img info --backing-chain --output=json \
             in {} field(s):\n- {}",
            problems.len(),
            problems.join("\n- ")
        );
    }
}

/// Sets fields of internal snapshot `index` of `image` in place: VM clock (ns), VM state size
/// (both the 32-bit field and the 64-bit extra field) and icount (`u64::MAX` = none).
fn patch_snapshot(image: &Path, index: usize, vm_clock_ns: u64, vm_state: u64, icount: u64) {
    let off = snapshot_entry_offsets(image)[index];
    let extra = read_be_u32(image, off + 36);
    assert!(extra >= 24, "snapshot extra data too small ({extra})");
    write_be_u64(image, off + 24, vm_clock_ns);
    write_be_u32(image, off + 32, vm_state as u32);
    write_be_u64(image, off + 40, vm_state);
    write_be_u64(image, off + 56, icount);
}

/// Sets bits of the incompatible-features header field (v3 images).
fn set_incompatible(image: &Path, bits: u64) {
    let v = read_be_u64(image, 72);
    write_be_u64(image, 72, v | bits);
}

#[test]
fn info_json_matches_qemu_img_on_unusual_qcow2_headers() {
    let wd = workdir();
    let d = wd.path();
    let base = d.join("base.qcow2");
    let mid = d.join("mid.qcow2");
    let top = d.join("vm.qcow2");
    create_qcow2(&base, DISK, "compat=0.10", None);
    qemu_io(&base, &["write -P 0x61 0 128k"]);
    snapshot_create(&base, "b1");
    create_qcow2(
        &mid,
        DISK,
        "lazy_refcounts=on,refcount_bits=64,cluster_size=4096",
        Some(("base.qcow2", "qcow2")),
    );
    qemu_io(&mid, &["write -P 0x62 64k 64k"]);
    create_qcow2(
        &top,
        DISK + MIB,
        "extended_l2=on,compression_type=zstd,cluster_size=131072",
        Some((ps(&mid), "qcow2")),
    );
    qemu_io(&top, &["write -P 0x63 1M 128k"]);
    snapshot_create(&top, "s1");
    snapshot_create(&top, "s2");
    patch_snapshot(&top, 0, 12_345_678_901, 65536, 777);
    patch_snapshot(&top, 1, 5, 0, u64::MAX);
    // mid: lazy refcounts in use, left dirty.
    set_incompatible(&mid, 1);
    report(
        "chain base(0.10) <- mid(dirty) <- vm",
        compare_with_qemu(&top),
    );
}

#[test]
fn info_json_matches_qemu_img_on_raw_base_and_corrupt_top() {
    let wd = workdir();
    let d = wd.path();
    let raw = d.join("disk.img");
    std::fs::write(&raw, vec![0x5au8; 2 * MIB as usize]).unwrap();
    let top: PathBuf = d.join("top.qcow2");
    create_qcow2(&top, 2 * MIB, "", Some(("disk.img", "raw")));
    snapshot_create(&top, "t1");
    set_incompatible(&top, 2);
    report(
        "chain disk.img(raw) <- top(corrupt)",
        compare_with_qemu(&top),
    );
}

#[test]
fn info_text_with_libvirt_shows_the_snapshot_tree() {
    let wd = workdir();
    let fx = folder_fixture(wd.path());
    let text = snapfs_info(&["--libvirt", ps(&fx.dir), ps(&fx.top)]);
    let mut problems = Vec::new();
    match section_after(&text, "Snapshot tree (libvirt):") {
        Some(lines) => {
            if lines != EXPECTED_TREE {
                problems.push(format!(
                    "the tree is\n{}\nexpected (virsh snapshot-list --tree)\n{}",
                    lines.join("\n"),
                    EXPECTED_TREE.join("\n")
                ));
            }
        }
        None => problems.push("no \"Snapshot tree (libvirt):\" section".into()),
    }
    let blocks = fact_blocks(&text);
    for e in expected_snapshots() {
        let Some(b) = blocks.get(e.name) else {
            problems.push(format!("no `Name: {}` block", e.name));
            continue;
        };
        let mut field = |k: &str, want: String| match b.get(k) {
            Some(v) if *v == want => {}
            other => problems.push(format!(
                "snapshot {}: {k}: {other:?}, expected {want:?}",
                e.name
            )),
        };
        field("State", e.state.into());
        field("Location", e.location.into());
        field("Parent", e.parent.unwrap_or("-").into());
        field("Children", e.children.len().to_string());
        field("Descendants", e.descendants.to_string());
        field("Current", if e.current { "yes" } else { "no" }.into());
        match b.get("Date").map(|d| rfc3339_secs("Date", d)) {
            Some(Ok(t)) if t == e.created => {}
            other => problems.push(format!(
                "snapshot {}: Date: {other:?}, expected {}",
                e.name,
                epoch_rfc3339(e.created)
            )),
        }
        match (b.get("View"), e.file) {
            (Some(v), Some(f)) if v.starts_with(f) => {}
            (Some(v), None) if v.starts_with('-') => {}
            (v, f) => problems.push(format!(
                "snapshot {}: View: {v:?}, expected {}",
                e.name,
                f.unwrap_or("- (not in this chain)")
            )),
        }
    }
    for skipped in ["broken", "foreign"] {
        if blocks.contains_key(skipped) {
            problems.push(format!("the skipped snapshot {skipped:?} is listed"));
        }
    }
    if !problems.is_empty() {
        panic!(
            "snapfs info --libvirt: {} problem(s):\n- {}\n--- output ---\n{text}",
            problems.len(),
            problems.join("\n- ")
        );
    }
}

#[test]
fn info_json_with_libvirt_lists_the_snapshots() {
    let wd = workdir();
    let fx = folder_fixture(wd.path());
    let text = snapfs_info(&["--json", "--libvirt", ps(&fx.dir), ps(&fx.top)]);
    let v: Value = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("snapfs info --json --libvirt is not JSON: {e}\n{text}"));
    let mut problems = Vec::new();
    match v.get("libvirt") {
        Some(a) => problems.extend(libvirt_array_problems("info --json --libvirt", a, DISK)),
        None => problems.push("no `libvirt` array".into()),
    }
    problems.extend(info_views_problems(
        "info --json --libvirt",
        &v,
        &expected_views(&fx),
    ));
    if !problems.is_empty() {
        panic!(
            "{} problem(s):\n- {}\n--- output ---\n{text}",
            problems.len(),
            problems.join("\n- ")
        );
    }
}
