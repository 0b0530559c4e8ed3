//! The guest operations the properties generate, where they land on a given geometry, and the
//! runner that tries a property on every geometry.

use std::fmt::Debug;

use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};

use crate::support::{SHAPES, Shape};

/// Checks a property on every geometry of [`SHAPES`]: `run` gets the shape, the seed of a raw
/// backing layer's content (with `with_base`; else none) and a sequence drawn from `ops`, and
/// says what went wrong. `cases` sequences a geometry (fewer on the largest clusters, see
/// [`Shape::cases`]); each geometry's time goes to stderr; a failure panics with proptest's
/// smallest failing sequence.
pub fn on_every_shape<O: Clone + Debug>(
    cases: u32,
    with_base: bool,
    ops: impl Strategy<Value = Vec<O>>,
    run: impl Fn(Shape, Option<u64>, &[O]) -> Result<(), String>,
) {
    for shape in SHAPES {
        let started = std::time::Instant::now();
        let mut runner = TestRunner::new(Config {
            cases: shape.cases(cases),
            failure_persistence: None,
            ..Config::default()
        });
        let base = if with_base {
            any::<u64>().prop_map(Some).boxed()
        } else {
            Just(None).boxed()
        };
        let result = runner.run(&(base, &ops), |(base, ops)| {
            run(shape, base, &ops).map_err(TestCaseError::fail)
        });
        if let Err(e) = result {
            panic!("{shape:?}: {e}");
        }
        eprintln!(
            "{shape:?}: {} cases in {:.1?}",
            shape.cases(cases),
            started.elapsed()
        );
    }
}

/// How a generated range is aligned: to the byte, the sector, the subcluster (the cluster
/// without extended L2) or the cluster, so that partial and whole units both come up often.
#[derive(Debug, Clone, Copy)]
pub enum Grain {
    Byte,
    Sector,
    Subcluster,
    Cluster,
}

/// A range of the disk, as fractions of whatever geometry it is applied to.
#[derive(Debug, Clone, Copy)]
pub struct Span {
    grain: Grain,
    start: u64,
    units: u64,
}

impl Span {
    /// `[offset, offset + len)` on a disk of `size` bytes of `shape` (empty only if the disk is).
    pub fn place(self, shape: &Shape, size: u64) -> (u64, u64) {
        let cs = shape.cluster_size();
        let unit = match self.grain {
            Grain::Byte => 1,
            Grain::Sector => 512,
            Grain::Subcluster if shape.variant.extended_l2 => cs / 32,
            Grain::Subcluster | Grain::Cluster => cs,
        };
        let offset = (self.start % size.div_ceil(unit)) * unit;
        // Up to three clusters: within one cluster, across a boundary, across a whole one.
        let most = (3 * cs).div_ceil(unit);
        let len = (self.units % most + 1) * unit;
        (offset, len.min(size - offset))
    }
}

pub fn span() -> impl Strategy<Value = Span> {
    (
        prop_oneof![
            Just(Grain::Byte),
            Just(Grain::Sector),
            Just(Grain::Subcluster),
            Just(Grain::Cluster)
        ],
        any::<u64>(),
        any::<u64>(),
    )
        .prop_map(|(grain, start, units)| Span {
            grain,
            start,
            units,
        })
}

/// What a write puts on the disk: random bytes, or all zeros (which must read back as zeros
/// whatever the engine makes of them).
#[derive(Debug, Clone, Copy)]
pub enum Fill {
    Random(u64),
    Zeros,
}

impl Fill {
    pub fn bytes(self, len: usize) -> Vec<u8> {
        match self {
            Fill::Zeros => vec![0; len],
            Fill::Random(seed) => {
                // One 4 KiB block of splitmix64 output, repeated with the sector's index
                // stamped into each 512-byte sector, so that a sector that lands in the wrong
                // place reads differently; memcpy rather than a byte loop (debug builds).
                let mut state = seed;
                let mut block = Vec::with_capacity(4096);
                while block.len() < 4096 {
                    state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
                    let mut z = state;
                    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
                    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
                    block.extend_from_slice(&(z ^ (z >> 31)).to_le_bytes());
                }
                let mut out = vec![0u8; len];
                for (i, chunk) in out.chunks_mut(4096).enumerate() {
                    chunk.copy_from_slice(&block[..chunk.len()]);
                    for (s, sector) in chunk.chunks_mut(512).enumerate() {
                        let stamp = ((i * 8 + s) as u64 ^ seed).to_le_bytes();
                        let n = sector.len().min(8);
                        sector[..n].copy_from_slice(&stamp[..n]);
                    }
                }
                out
            }
        }
    }
}

pub fn fill() -> impl Strategy<Value = Fill> {
    prop_oneof![
        4 => any::<u64>().prop_map(Fill::Random),
        1 => Just(Fill::Zeros),
    ]
}

/// The content of a raw backing layer of `len` bytes: data in some clusters, zeros elsewhere.
pub fn base_content(len: u64, cluster: u64, seed: u64) -> Vec<u8> {
    let mut bytes = Fill::Random(seed).bytes(len as usize);
    for (i, chunk) in bytes.chunks_mut(cluster as usize).enumerate() {
        if (seed >> (i % 64)) & 1 == 0 {
            chunk.fill(0);
        }
    }
    bytes
}
