//! The snapshot model, on the engine alone: random sequences of writes, discards, growing the
//! disk, snapshot creates, reverts and deletes, and reopening the image, checked after every
//! step against a model of the guest's content kept as plain byte arrays (one for the live
//! disk, one per snapshot). Every view (the live disk and each snapshot) must read the model's
//! bytes, size and holes; after every step that ends with a flush the image's bytes must pass
//! [`check_image`] (refcounts recomputed from the tables equal the stored ones, COPIED exact).
//! The same model, through a mount and checked by qemu-img, is `tests/write/snapshot_model.rs`.

use std::collections::BTreeMap;

use proptest::prelude::*;

use crate::ops::{Fill, Span, base_content, fill, on_every_shape, span};
use crate::support::{MemChain, Shape, check_view};

#[derive(Debug, Clone)]
enum Op {
    Write(Span, Fill),
    Zero(Span),
    /// Grows the disk by this many clusters (1 to 3), up to twice its first size.
    Grow(u64),
    Create,
    /// Reverts to the n-th snapshot (modulo how many there are).
    Revert(usize),
    Delete(usize),
    /// Flushes and opens the image afresh from its bytes.
    Reopen,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (span(), fill()).prop_map(|(s, f)| Op::Write(s, f)),
        2 => span().prop_map(Op::Zero),
        1 => (1u64..4).prop_map(Op::Grow),
        3 => Just(Op::Create),
        2 => any::<usize>().prop_map(Op::Revert),
        2 => any::<usize>().prop_map(Op::Delete),
        1 => Just(Op::Reopen),
    ]
}

/// At most this many snapshots at a time (a create beyond it is skipped).
const MAX_SNAPSHOTS: usize = 4;
/// Cases per geometry and backing.
const CASES: u32 = 12;

struct Model {
    live: Vec<u8>,
    snapshots: BTreeMap<String, Vec<u8>>,
    next_name: u32,
}

fn check_all(disk: &MemChain, model: &Model) -> Result<(), String> {
    check_view("live", &disk.live(), &model.live)?;
    let snapshots = disk.snapshots();
    let names: Vec<&String> = snapshots.keys().collect();
    let want: Vec<&String> = model.snapshots.keys().collect();
    if names != want {
        return Err(format!("the image lists {names:?}, the model {want:?}"));
    }
    for (name, snap) in &snapshots {
        let view = disk.snapshot_view(snap)?;
        check_view(&format!("snapshot {name}"), &view, &model.snapshots[name])?;
    }
    Ok(())
}

fn run(shape: Shape, base: Option<u64>, ops: &[Op]) -> Result<(), String> {
    let base = base.map(|seed| base_content(shape.size, shape.cluster_size(), seed));
    let mut disk = MemChain::new(shape, base.clone());
    let mut model = Model {
        live: base.unwrap_or_else(|| vec![0; shape.size as usize]),
        snapshots: BTreeMap::new(),
        next_name: 0,
    };
    for (i, op) in ops.iter().enumerate() {
        let step = |e: String| format!("step {i} ({op:?}): {e}");
        let size = model.live.len() as u64;
        // Snapshot operations flush and settle everything they do: check the bytes after them.
        let mut settled = false;
        match *op {
            Op::Write(span, fill) => {
                let (offset, len) = span.place(&shape, size);
                let data = fill.bytes(len as usize);
                disk.live()
                    .write_at(&data, offset)
                    .map_err(|e| step(format!("write: {e}")))?;
                model.live[offset as usize..(offset + len) as usize].copy_from_slice(&data);
            }
            Op::Zero(span) => {
                let (offset, len) = span.place(&shape, size);
                disk.live()
                    .zero_range(offset, len)
                    .map_err(|e| step(format!("zero: {e}")))?;
                model.live[offset as usize..(offset + len) as usize].fill(0);
            }
            Op::Grow(clusters) => {
                let new_size = size + clusters * shape.cluster_size();
                if new_size <= 2 * shape.size {
                    let grown = disk.live().grow(new_size);
                    if shape.variant.version == 2 && !model.snapshots.is_empty() {
                        // A version 2 snapshot has no size of its own (QEMU refuses too).
                        if grown.is_ok() {
                            return Err(step("a v2 image with snapshots grew".into()));
                        }
                    } else {
                        grown.map_err(|e| step(format!("grow: {e}")))?;
                        model.live.resize(new_size as usize, 0);
                    }
                }
            }
            Op::Create => {
                if model.snapshots.len() < MAX_SNAPSHOTS {
                    let name = format!("s{}", model.next_name);
                    model.next_name += 1;
                    disk.image()
                        .create_snapshot(&name)
                        .map_err(|e| step(format!("create: {e}")))?;
                    model.snapshots.insert(name, model.live.clone());
                    settled = true;
                }
            }
            Op::Revert(n) | Op::Delete(n) if !model.snapshots.is_empty() => {
                let name = model
                    .snapshots
                    .keys()
                    .nth(n % model.snapshots.len())
                    .cloned()
                    .ok_or("no snapshot")?;
                let id = disk.snapshots()[&name].id.clone();
                if let Op::Revert(_) = op {
                    disk.image()
                        .apply_snapshot(&id)
                        .map_err(|e| step(format!("revert to {name}: {e}")))?;
                    model.live = model.snapshots[&name].clone();
                } else {
                    disk.image()
                        .delete_snapshot(&id)
                        .map_err(|e| step(format!("delete {name}: {e}")))?;
                    model.snapshots.remove(&name);
                }
                settled = true;
            }
            Op::Revert(_) | Op::Delete(_) => {}
            Op::Reopen => {
                disk.flush_and_check().map_err(step)?;
                disk = disk.reopen().map_err(step)?;
            }
        }
        if settled {
            disk.flush_and_check().map_err(step)?;
        }
        check_all(&disk, &model).map_err(step)?;
    }
    disk.flush_and_check()
        .map_err(|e| format!("at the end: {e}"))?;
    check_all(&disk.reopen()?, &model).map_err(|e| format!("reopened at the end: {e}"))
}

fn property(with_base: bool) {
    let ops = proptest::collection::vec(op(), 1..50);
    on_every_shape(CASES, with_base, ops, run);
}

#[test]
fn snapshots_keep_what_the_disk_held() {
    property(false);
}

#[test]
fn snapshots_over_a_backing_file_keep_what_the_disk_held() {
    property(true);
}
