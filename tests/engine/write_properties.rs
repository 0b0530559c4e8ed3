//! Write properties of the engine, on every geometry of [`SHAPES`](crate::support::SHAPES), with and without a raw
//! backing layer: any sequence of writes, discards (the range made to read as zeros, clusters
//! released) and flushes reads back as a plain byte array would, through the live view, its
//! data/hole map and its allocated size; after a flush the image's bytes pass the refcount and
//! COPIED check of [`check_image`], and the image opened afresh from them reads the same.

use proptest::prelude::*;

use crate::ops::{Fill, Span, base_content, fill, on_every_shape, span};
use crate::support::{MemChain, Shape, check_image, check_view};

#[derive(Debug, Clone)]
enum Op {
    Write(Span, Fill),
    Zero(Span),
    Flush,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (span(), fill()).prop_map(|(s, f)| Op::Write(s, f)),
        3 => span().prop_map(Op::Zero),
        1 => Just(Op::Flush),
    ]
}

/// Cases per geometry and backing (each a fresh image and up to 40 operations).
const CASES: u32 = 24;

fn run(shape: Shape, base: Option<u64>, ops: &[Op]) -> Result<(), String> {
    let base = base.map(|seed| base_content(shape.size, shape.cluster_size(), seed));
    let disk = MemChain::new(shape, base.clone());
    let mut model = base.unwrap_or_else(|| vec![0; shape.size as usize]);
    let live = disk.live();
    for (i, op) in ops.iter().enumerate() {
        let step = |e: String| format!("step {i} ({op:?}): {e}");
        match *op {
            Op::Write(span, fill) => {
                let (offset, len) = span.place(&shape, shape.size);
                let data = fill.bytes(len as usize);
                live.write_at(&data, offset)
                    .map_err(|e| step(format!("write: {e}")))?;
                model[offset as usize..(offset + len) as usize].copy_from_slice(&data);
            }
            Op::Zero(span) => {
                let (offset, len) = span.place(&shape, shape.size);
                live.zero_range(offset, len)
                    .map_err(|e| step(format!("zero: {e}")))?;
                model[offset as usize..(offset + len) as usize].fill(0);
            }
            Op::Flush => {
                disk.flush_and_check().map_err(step)?;
            }
        }
        check_view("live", &live, &model).map_err(step)?;
    }
    disk.flush_and_check()
        .map_err(|e| format!("at the end: {e}"))?;
    let again = disk.reopen()?;
    check_view("live, reopened", &again.live(), &model)?;
    check_image(again.top.as_ref()).map_err(|e| format!("reopened: {e}"))
}

fn property(with_base: bool) {
    let ops = proptest::collection::vec(op(), 1..40);
    on_every_shape(CASES, with_base, ops, run);
}

#[test]
fn writes_and_discards_read_back_as_written() {
    property(false);
}

#[test]
fn writes_and_discards_over_a_backing_file_read_back_as_written() {
    property(true);
}
