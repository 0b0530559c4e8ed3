//! What changed between two points in time of a disk: the guest ranges where view TO may differ
//! from view FROM, computed from the mapping metadata alone (no guest data is read).
//!
//! Two views of one chain read the same bytes wherever they resolve a guest offset to the same
//! place: the same host offset in the same layer (qcow2 clusters are shared between internal
//! snapshots and the active state until a write copies them), the same position of the same raw
//! layer, or zeros (a zero cluster, unallocated through every layer, or past a layer's end). So
//! each guest offset is resolved through the whole chain on both sides, and every range whose
//! resolution differs is a change. The ranges follow the units of whichever side is finer
//! (clusters, or subclusters with extended L2 entries; layers may have different cluster sizes),
//! so no more than the units that differ is reported, and nothing that differs is missed: bytes
//! that resolve to the same place are the same bytes.
//!
//! Where both sides read through the same layer and its L1 entries for a range name the same L2
//! table, the whole range of that table is the same on both sides without looking at its entries
//! (an L2 table is shared until a write copies it), which makes two snapshots that differ in a
//! few tables cheap to compare however large the disk.
//!
//! Past FROM's end, FROM counts as zeros (`qemu-img compare` treats the tail of the longer image
//! the same way): a grown disk reports only the parts of its new tail that hold data.

pub mod apply;
pub mod command;
pub mod pairs;

use std::sync::Arc;

use crate::chain::{Chain, Layer};
use crate::driver::Stored;
use crate::error::Result;
use crate::qcow2::l1::L1Table;
use crate::view::View;
use crate::view::{Piece, Tables, resolve};

/// One range where TO may differ from FROM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ChangeRange {
    pub start: u64,
    pub length: u64,
    /// TO reads zeros here (a zero cluster, a discarded or unallocated range).
    pub zero: bool,
}

impl ChangeRange {
    pub fn end(&self) -> u64 {
        self.start + self.length
    }
}

/// The changes from one view to another: TO's size and the ranges, in order, not overlapping,
/// neighbours of the same kind merged.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ChangeList {
    pub size: u64,
    pub ranges: Vec<ChangeRange>,
}

impl ChangeList {
    /// Bytes inside changed ranges.
    pub fn changed_bytes(&self) -> u64 {
        self.ranges.iter().map(|r| r.length).sum()
    }

    /// The range containing `offset`, else the index of the first range after it.
    fn locate(&self, offset: u64) -> std::result::Result<usize, usize> {
        self.ranges.binary_search_by(|r| {
            if r.end() <= offset {
                std::cmp::Ordering::Less
            } else if r.start > offset {
                std::cmp::Ordering::Greater
            } else {
                std::cmp::Ordering::Equal
            }
        })
    }

    /// Whether `offset` lies in a changed range, and how far that state goes (to the end of
    /// the range, or to the next range or TO's end).
    pub fn extent_at(&self, offset: u64) -> (bool, u64) {
        match self.locate(offset) {
            Ok(i) => (true, self.ranges[i].end()),
            Err(i) => (
                false,
                self.ranges
                    .get(i)
                    .map_or(self.size, |r| r.start)
                    .max(offset),
            ),
        }
    }

    /// `SEEK_DATA`: the first changed offset at or after `offset`.
    pub fn seek_data(&self, offset: u64) -> Option<u64> {
        match self.locate(offset) {
            Ok(_) => Some(offset),
            Err(i) => self.ranges.get(i).map(|r| r.start),
        }
    }

    /// `SEEK_HOLE`: the first unchanged offset at or after `offset` (TO's end counts as one);
    /// `None` past the end.
    pub fn seek_hole(&self, offset: u64) -> Option<u64> {
        if offset >= self.size {
            return None;
        }
        Some(match self.locate(offset) {
            Ok(i) => self.ranges[i].end(),
            Err(_) => offset,
        })
    }

    /// The list as `changes/FROM..TO.json` shows it: one range per line.
    pub fn to_json(&self) -> String {
        let mut text = String::from("[");
        for (i, r) in self.ranges.iter().enumerate() {
            text.push_str(if i == 0 { "\n" } else { ",\n" });
            text.push_str(&format!(
                "{{\"start\": {}, \"length\": {}, \"zero\": {}}}",
                r.start, r.length, r.zero
            ));
        }
        text.push_str(if self.ranges.is_empty() {
            "]\n"
        } else {
            "\n]\n"
        });
        text
    }
}

/// Where the bytes at one guest offset come from, as far as telling two views apart needs.
/// Offsets are those of the guest offset the value was resolved for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    /// Reads zeros: a zero cluster, unallocated through every layer, or past a layer's end.
    Zeros,
    /// Uncompressed data of layer `layer` at host offset `host`.
    Data { layer: usize, host: u64 },
    /// `skip` bytes into the compressed cluster stored at `host` in layer `layer`.
    Compressed { layer: usize, host: u64, skip: u64 },
    /// The same offset of raw layer `layer`, where its file holds data.
    Raw { layer: usize },
}

impl Source {
    /// The source of the guest offset `by` bytes further on, inside the same run.
    fn advanced(self, by: u64) -> Source {
        match self {
            Source::Data { layer, host } => Source::Data {
                layer,
                host: host + by,
            },
            Source::Compressed { layer, host, skip } => Source::Compressed {
                layer,
                host,
                skip: skip + by,
            },
            other => other,
        }
    }
}

/// One view, ready to resolve offsets: the tables of its layers taken once, so that the whole
/// comparison sees one state of each.
struct Side<'a> {
    chain: &'a Chain,
    depth: usize,
    size: u64,
    /// The L1 table each layer from `depth` down is read through (None: a raw layer).
    tables: Vec<Option<Arc<L1Table>>>,
}

impl<'a> Side<'a> {
    fn of(view: &'a View) -> Side<'a> {
        let chain: &Chain = view.chain();
        let depth = view.layer_index();
        let tables = (depth..chain.layers.len())
            .map(|d| match chain.layers[d].as_ref() {
                Layer::Raw(_) => None,
                Layer::Qcow2(image) => Some(match view.start_l1() {
                    Some(table) if d == depth => table,
                    _ => image.active_l1(),
                }),
            })
            .collect();
        Side {
            chain,
            depth,
            size: view.size(),
            tables,
        }
    }

    fn table(&self, depth: usize) -> Option<&L1Table> {
        self.tables.get(depth - self.depth)?.as_deref()
    }

    /// Where the bytes at `pos` come from, and for how many bytes (at most `max_len`) that
    /// stays one run: the chain walker's answer ([`crate::view::resolve`]) through this side's
    /// tables.
    fn resolve(&self, pos: u64, max_len: u64) -> Result<(Source, u64)> {
        let tables = Tables::Fixed {
            first: self.depth,
            tables: &self.tables,
        };
        let (piece, len) = resolve(self.chain, self.depth, tables, self.size, pos, max_len)?;
        let source = match piece {
            Piece::Zeros => Source::Zeros,
            Piece::Stored { layer, stored } => match stored {
                Stored::Data { host } => Source::Data {
                    layer,
                    host: host.0,
                },
                Stored::Compressed { cluster, skip } => Source::Compressed {
                    layer,
                    host: cluster.host.0,
                    skip,
                },
                Stored::Raw => Source::Raw { layer },
            },
        };
        Ok((source, len))
    }
}

/// Where both sides read the range at `pos` through the same L2 table of the same layer (or
/// both find no table there), the end of that table's range: everything up to it is the same.
fn shared_table_end(a: &Side, b: &Side, pos: u64) -> Option<u64> {
    if a.depth != b.depth || pos >= a.size {
        return None;
    }
    let Layer::Qcow2(image) = a.chain.layers[a.depth].as_ref() else {
        return None;
    };
    let (ta, tb) = (a.table(a.depth)?, b.table(b.depth)?);
    let geometry = image.geometry();
    let index = geometry.l1_index(crate::qcow2::offsets::GuestOffset(pos));
    if ta.l2_offset(index) != tb.l2_offset(index) {
        return None;
    }
    let table_end = (index + 1).saturating_mul(geometry.l2_coverage());
    Some(table_end.min(a.size).min(b.size))
}

/// The run one side is in: its source at `start`, up to `end`.
#[derive(Clone, Copy)]
struct Run {
    source: Source,
    start: u64,
    end: u64,
}

impl Run {
    fn at(&self, pos: u64) -> Option<Source> {
        (self.start <= pos && pos < self.end).then(|| self.source.advanced(pos - self.start))
    }
}

fn next_run(side: &Side, current: &mut Option<Run>, pos: u64, end: u64) -> Result<(Source, u64)> {
    if let Some(run) = current
        && let Some(source) = run.at(pos)
    {
        return Ok((source, run.end));
    }
    let (source, len) = side.resolve(pos, end - pos)?;
    let len = len.max(1);
    *current = Some(Run {
        source,
        start: pos,
        end: pos + len,
    });
    Ok((source, pos + len))
}

/// The ranges where `to` may differ from `from`, over `to`'s size.
pub fn changed_ranges(from: &View, to: &View) -> Result<ChangeList> {
    // Layers are compared by their index in the chain: two views of different chains (one
    // taken before an external create switched the chain, one after) cannot be compared.
    if !Arc::ptr_eq(from.chain(), to.chain()) {
        let path = from.chain().layers.first().map(|l| l.path().to_owned());
        return Err(crate::error::Error::Invalid {
            path: path.unwrap_or_default(),
            reason: "the two views belong to different states of the chain".into(),
        });
    }
    // Freeing clusters of the live image waits while this runs (see `Qcow2Image::read_guard`),
    // so that no cluster is reused under the walk.
    let _guard = match from.chain().layers.first().map(|l| l.as_ref()) {
        Some(Layer::Qcow2(image)) => image.read_guard(),
        _ => None,
    };
    let a = Side::of(from);
    let b = Side::of(to);
    let end = b.size;
    let mut list = ChangeList {
        size: end,
        ranges: Vec::new(),
    };
    let (mut run_a, mut run_b) = (None, None);
    let mut pos = 0;
    while pos < end {
        if let Some(same_to) = shared_table_end(&a, &b, pos)
            && same_to > pos
        {
            pos = same_to.min(end);
            continue;
        }
        let (source_a, end_a) = next_run(&a, &mut run_a, pos, end)?;
        let (source_b, end_b) = next_run(&b, &mut run_b, pos, end)?;
        let next = end_a.min(end_b).min(end);
        if source_a != source_b {
            push(&mut list.ranges, pos, next - pos, source_b == Source::Zeros);
        }
        pos = next;
    }
    Ok(list)
}

/// Appends a range, merging it into the last one when they touch and are of the same kind.
fn push(ranges: &mut Vec<ChangeRange>, start: u64, length: u64, zero: bool) {
    if let Some(last) = ranges.last_mut()
        && last.end() == start
        && last.zero == zero
    {
        last.length += length;
        return;
    }
    ranges.push(ChangeRange {
        start,
        length,
        zero,
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list(size: u64, ranges: &[(u64, u64, bool)]) -> ChangeList {
        ChangeList {
            size,
            ranges: ranges
                .iter()
                .map(|&(start, length, zero)| ChangeRange {
                    start,
                    length,
                    zero,
                })
                .collect(),
        }
    }

    #[test]
    fn seeks_follow_the_ranges() {
        let l = list(100, &[(10, 10, false), (20, 5, true), (50, 10, false)]);
        assert_eq!(l.seek_data(0), Some(10));
        assert_eq!(l.seek_data(12), Some(12));
        assert_eq!(l.seek_data(25), Some(50));
        assert_eq!(l.seek_data(60), None);
        assert_eq!(l.seek_hole(0), Some(0));
        assert_eq!(l.seek_hole(10), Some(20));
        assert_eq!(l.seek_hole(20), Some(25));
        assert_eq!(l.seek_hole(55), Some(60));
        assert_eq!(l.seek_hole(99), Some(99));
        assert_eq!(l.seek_hole(100), None);
        assert_eq!(l.extent_at(0), (false, 10));
        assert_eq!(l.extent_at(12), (true, 20));
        assert_eq!(l.extent_at(70), (false, 100));
    }

    #[test]
    fn neighbours_of_one_kind_merge() {
        let mut r = Vec::new();
        push(&mut r, 0, 10, false);
        push(&mut r, 10, 10, false);
        push(&mut r, 20, 10, true);
        push(&mut r, 40, 10, true);
        assert_eq!(
            r,
            list(0, &[(0, 20, false), (20, 10, true), (40, 10, true)]).ranges
        );
    }

    #[test]
    fn json_is_a_list_of_ranges() {
        let l = list(100, &[(0, 4096, false), (8192, 4096, true)]);
        let parsed: Vec<ChangeRange> = serde_json::from_str(&l.to_json()).unwrap();
        assert_eq!(parsed, l.ranges);
        assert_eq!(list(5, &[]).to_json(), "[]\n");
    }
}
