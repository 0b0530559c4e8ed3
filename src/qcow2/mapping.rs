//! The cluster mapper: guest offset -> where its bytes are, through an L1 table and the L2
//! tables it names. Entries are decoded by [`L2Entry`] (`l2.rs`), the only code that knows their
//! bits.
//!
//! Hostile entries. An entry that cannot be right makes the mapping of its range fail (the read
//! gets EIO, the rest of the disk still reads): an L1 or L2 offset that is not cluster-aligned
//! (QEMU: "unaligned", EIO), an L1 entry or compressed descriptor pointing into cluster 0 (the
//! header), an extended-L2 bitmap with a subcluster both allocated and zero, or allocated
//! subclusters without a host offset (QEMU: `QCOW2_SUBCLUSTER_INVALID`, EIO). Entries QEMU reads
//! without complaint are read the same way: reserved bits are ignored (only `qemu-img check`
//! flags them), and tables or data past the end of the file read as zeros.

use crate::qcow2::error::MetadataError;
use crate::qcow2::l1::L1Table;
use crate::qcow2::l2::{CompressedCluster, L2Entry, L2Table, Unit};
use crate::qcow2::offsets::{Geometry, GuestOffset, HostOffset};

/// What a guest range maps to, for the length `len` starting at the offset asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mapping {
    /// Data stored uncompressed at `host`, contiguous for `len` bytes.
    Data { host: HostOffset, len: u64 },
    /// Part of one compressed cluster: `skip` bytes into the decompressed cluster, `len` bytes.
    Compressed {
        cluster: CompressedCluster,
        skip: u64,
        len: u64,
    },
    /// Reads as zeros.
    Zero { len: u64 },
    /// Not allocated in this image: the backing file (or zeros) shows through.
    Unallocated { len: u64 },
}

impl Mapping {
    pub fn len(&self) -> u64 {
        match *self {
            Mapping::Data { len, .. }
            | Mapping::Compressed { len, .. }
            | Mapping::Zero { len }
            | Mapping::Unallocated { len } => len,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Where the mapper gets L2 tables from (the image, through the cache).
pub trait L2Source {
    /// Loads the L2 table at `offset`, named by L1 entry `l1_index` (for error messages).
    fn l2_table(&self, l1_index: u64, offset: HostOffset) -> crate::qcow2::error::Result<L2Table>;
    /// Runs `f` on the L2 table at `offset`. An image may answer this without taking a
    /// reference to a shared table (see `recent_l2`); by default it borrows one.
    fn with_l2_table<R>(
        &self,
        l1_index: u64,
        offset: HostOffset,
        f: impl FnOnce(&[u64]) -> R,
    ) -> crate::qcow2::error::Result<R> {
        Ok(f(&self.l2_table(l1_index, offset)?))
    }
    /// Wraps a metadata error with the image's name.
    fn metadata_error(&self, error: MetadataError) -> crate::qcow2::error::Error;
}

/// Maps the guest range starting at `guest`, at most `max_len` bytes, through `l1`.
///
/// Returns the longest prefix of the range that maps the same way: contiguous host data, all zero,
/// or all unallocated. Compressed clusters are returned one at a time. Damaged metadata is an
/// error only where the range starts; further on it ends the prefix.
pub fn map_range(
    source: &impl L2Source,
    geometry: &Geometry,
    l1: &L1Table,
    guest: GuestOffset,
    max_len: u64,
) -> crate::qcow2::error::Result<Mapping> {
    let mut pos = guest.0;
    let end = guest.0.saturating_add(max_len);
    let mut run = Run {
        start: guest,
        first: None,
        first_skip: 0,
    };

    while pos < end {
        let l1_index = geometry.l1_index(GuestOffset(pos));
        let table_end = (l1_index + 1)
            .checked_mul(geometry.l2_coverage())
            .map_or(end, |e| e.min(end));
        let Some(l2_offset) = l1.l2_offset(l1_index) else {
            if !continues(run.first, Unit::Unallocated, 0) {
                break;
            }
            run.first.get_or_insert(Unit::Unallocated);
            // Past the last entry the table holds, everything is unallocated: jump to the end
            // rather than step through the (up to 2^55) missing entries one by one.
            pos = if l1_index >= l1.len_present() as u64 {
                end
            } else {
                table_end
            };
            continue;
        };
        // An error after a run has begun ends the run instead: the run maps fine, and the caller's
        // next call, starting at the damaged place, gets the error. (Failing the whole call made a
        // walk over a disk redo the run up to the damage at every step.)
        if geometry.in_cluster(l2_offset.0) != 0 {
            if run.first.is_some() {
                break;
            }
            return Err(source.metadata_error(MetadataError::Unaligned {
                table: "L1",
                index: l1_index,
                offset: l2_offset.0,
            }));
        }
        let walked = source.with_l2_table(l1_index, l2_offset, |table| {
            walk_table(geometry, table, &mut run, pos, table_end)
        });
        match walked {
            Ok(Ok(Walked::TableDone(next))) => pos = next,
            Ok(Ok(Walked::RunEnds(next))) => {
                pos = next;
                break;
            }
            Ok(Err(_)) | Err(_) if run.first.is_some() => break,
            Ok(Err(e)) => return Err(source.metadata_error(e)),
            Err(e) => return Err(e),
        }
    }

    let len = pos.min(end) - guest.0;
    Ok(match run.first.unwrap_or(Unit::Unallocated) {
        Unit::Data(host) => Mapping::Data {
            host: HostOffset(host.0 + run.first_skip),
            len,
        },
        Unit::Compressed(cluster) => Mapping::Compressed {
            cluster,
            skip: run.first_skip,
            len,
        },
        Unit::Zero => Mapping::Zero { len },
        Unit::Unallocated => Mapping::Unallocated { len },
    })
}

/// The run [`map_range`] is building.
struct Run {
    /// Where the caller's range starts.
    start: GuestOffset,
    /// The state of the run's first unit; `None` until one is decoded.
    first: Option<Unit>,
    /// How far into its first unit the run starts.
    first_skip: u64,
}

/// How a walk over one L2 table ended.
enum Walked {
    /// The run went on to `table_end`, the given position: it may go on in the next table.
    TableDone(u64),
    /// The run stops at the given position.
    RunEnds(u64),
}

/// Extends `run` over `table` from `pos` up to `table_end` (the end of the table's coverage or
/// of the caller's range, whichever is first). A damaged entry is an error; the caller decides
/// whether it ends the run or fails the call.
fn walk_table(
    geometry: &Geometry,
    table: &[u64],
    run: &mut Run,
    mut pos: u64,
    table_end: u64,
) -> Result<Walked, MetadataError> {
    let unit_size = geometry.subcluster_size();
    let run_base = run.start.0 - run.start.0 % unit_size;
    while pos < table_end {
        let entry = L2Entry::read(table, geometry.l2_index(GuestOffset(pos)), geometry);
        let unit = match entry.unit_at(geometry, GuestOffset(pos)) {
            Ok(unit) => unit,
            Err(_) if run.first.is_some() => return Ok(Walked::RunEnds(pos)),
            Err(e) => return Err(e),
        };
        // A cluster whose subclusters are all unallocated (or all zero) is stepped over at
        // once: walking a large hole subcluster by subcluster cost 32 steps per cluster.
        let step = if entry.is_uniform(geometry, unit) {
            geometry.cluster_size()
        } else {
            unit_size
        };
        // `step` is a power of two: the end of the unit without a division.
        let unit_end = (pos | (step - 1)).saturating_add(1).min(table_end);
        if run.first.is_none() {
            run.first_skip = match unit {
                Unit::Compressed(_) => geometry.in_cluster(pos),
                _ => pos % unit_size,
            };
        }
        if !continues(run.first, unit, pos - run_base) {
            return Ok(Walked::RunEnds(pos));
        }
        run.first.get_or_insert(unit);
        if let Unit::Compressed(_) = unit {
            // One compressed cluster per mapping: the caller decompresses it as a whole.
            let cluster_end = (pos | (geometry.cluster_size() - 1)).saturating_add(1);
            return Ok(Walked::RunEnds(cluster_end.min(table_end)));
        }
        pos = unit_end;
    }
    Ok(Walked::TableDone(pos))
}

/// Whether `next`, `distance` guest bytes after the start of the run's first unit, continues the
/// run that `first` started. Data continues only where the host data is contiguous too;
/// compressed clusters never continue a run.
fn continues(first: Option<Unit>, next: Unit, distance: u64) -> bool {
    match (first, next) {
        (None, _) => true,
        (Some(Unit::Zero), Unit::Zero) | (Some(Unit::Unallocated), Unit::Unallocated) => true,
        (Some(Unit::Data(start)), Unit::Data(h)) => start.0.checked_add(distance) == Some(h.0),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const L2_COPIED: u64 = 1 << 63;
    const L2_COMPRESSED: u64 = 1 << 62;
    const L2_ZERO: u64 = 1;
    const ALL_ZERO_BITMAP: u64 = 0xffff_ffff_0000_0000;
    use std::collections::HashMap;

    struct FakeImage {
        tables: HashMap<u64, L2Table>,
    }

    impl L2Source for FakeImage {
        fn l2_table(
            &self,
            _l1_index: u64,
            offset: HostOffset,
        ) -> crate::qcow2::error::Result<L2Table> {
            Ok(self.tables[&offset.0].clone())
        }
        fn metadata_error(&self, error: MetadataError) -> crate::qcow2::error::Error {
            crate::qcow2::error::Error::Metadata {
                path: "fake".into(),
                source: error,
            }
        }
    }

    /// 4 KiB clusters: 512 entries per L2 table, 2 MiB per table.
    fn setup(entries: &[(usize, u64)]) -> (FakeImage, Geometry, L1Table) {
        let g = Geometry::new(12, false);
        let mut t = vec![0u64; 512];
        for &(i, e) in entries {
            t[i] = e;
        }
        let img = FakeImage {
            tables: HashMap::from([(0x10000, t.into())]),
        };
        (img, g, L1Table::new(vec![0x10000], 4))
    }

    #[test]
    fn contiguous_data_merges_into_one_run() {
        let (img, g, l1) = setup(&[(0, 0x20000), (1, 0x21000), (2, 0x22000), (3, 0x40000)]);
        let m = map_range(&img, &g, &l1, GuestOffset(100), 1 << 20).unwrap();
        assert_eq!(
            m,
            Mapping::Data {
                host: HostOffset(0x20000 + 100),
                len: 3 * 4096 - 100
            }
        );
        let m = map_range(&img, &g, &l1, GuestOffset(3 * 4096), 1 << 20).unwrap();
        assert_eq!(
            m,
            Mapping::Data {
                host: HostOffset(0x40000),
                len: 4096
            }
        );
    }

    #[test]
    fn zero_and_unallocated_runs_cross_tables() {
        let (img, g, l1) = setup(&[(0, L2_ZERO), (1, L2_ZERO | 0x30000), (5, 0x50000)]);
        assert_eq!(
            map_range(&img, &g, &l1, GuestOffset(0), 1 << 30).unwrap(),
            Mapping::Zero { len: 8192 }
        );
        assert_eq!(
            map_range(&img, &g, &l1, GuestOffset(8192), 1 << 30).unwrap(),
            Mapping::Unallocated { len: 3 * 4096 }
        );
        // From entry 6 to the end of table 0 and then through unallocated L1 entries.
        assert_eq!(
            map_range(&img, &g, &l1, GuestOffset(6 * 4096), 10 << 20).unwrap(),
            Mapping::Unallocated { len: 10 << 20 }
        );
    }

    #[test]
    fn compressed_cluster_is_its_own_run() {
        let g = Geometry::new(12, false);
        let x = g.compressed_offset_bits();
        let entry = L2_COMPRESSED | (2 << x) | 0x12345;
        let (img, g, l1) = setup(&[(0, entry), (1, entry)]);
        let m = map_range(&img, &g, &l1, GuestOffset(10), 1 << 20).unwrap();
        assert_eq!(
            m,
            Mapping::Compressed {
                cluster: CompressedCluster {
                    host: HostOffset(0x12345),
                    len: 3 * 512 - 0x145
                },
                skip: 10,
                len: 4096 - 10
            }
        );
    }

    #[test]
    fn unaligned_data_offset_is_an_error() {
        let (img, g, l1) = setup(&[(0, 0x20200)]);
        let err = map_range(&img, &g, &l1, GuestOffset(0), 4096).unwrap_err();
        assert!(err.to_string().contains("not aligned"), "{err}");
    }

    #[test]
    fn extended_l2_subclusters() {
        // 64 KiB clusters with 2 KiB subclusters.
        let g = Geometry::new(16, true);
        let mut t = vec![0u64; 4096 * 2];
        // Cluster 0 at 0x100000: subclusters 0-1 allocated, 2 zero, 3.. unallocated.
        t[0] = 0x100000;
        t[1] = 0b11 | (0b100 << 32);
        let img = FakeImage {
            tables: HashMap::from([(0x10000, t.into())]),
        };
        let l1 = L1Table::new(vec![0x10000], 1);
        assert_eq!(
            map_range(&img, &g, &l1, GuestOffset(1000), 1 << 20).unwrap(),
            Mapping::Data {
                host: HostOffset(0x100000 + 1000),
                len: 4096 - 1000
            }
        );
        assert_eq!(
            map_range(&img, &g, &l1, GuestOffset(4096), 1 << 20).unwrap(),
            Mapping::Zero { len: 2048 }
        );
        assert_eq!(
            map_range(&img, &g, &l1, GuestOffset(6144), 1 << 20).unwrap(),
            Mapping::Unallocated { len: 1 << 20 }
        );
    }

    /// Clusters whose subclusters are all unallocated (or all zero) are stepped over whole, and
    /// the runs still end exactly where a subcluster differs.
    #[test]
    fn extended_l2_uniform_clusters_step_whole() {
        let g = Geometry::new(16, true);
        let cs = 1u64 << 16;
        let mut t = vec![0u64; 4096 * 2];
        // Clusters 0-2 unallocated; 3-4 all zero; 5: subcluster 0 zero, the rest unallocated;
        // 6: data at 0x200000 in subcluster 5 only.
        t[3 * 2 + 1] = ALL_ZERO_BITMAP;
        t[4 * 2 + 1] = ALL_ZERO_BITMAP;
        t[5 * 2 + 1] = 1 << 32;
        t[6 * 2] = 0x200000;
        t[6 * 2 + 1] = 1 << 5;
        let img = FakeImage {
            tables: HashMap::from([(0x10000, t.into())]),
        };
        let l1 = L1Table::new(vec![0x10000], 1);
        let at = |pos: u64| map_range(&img, &g, &l1, GuestOffset(pos), 1 << 30).unwrap();
        assert_eq!(at(100), Mapping::Unallocated { len: 3 * cs - 100 });
        assert_eq!(
            at(3 * cs + 7),
            Mapping::Zero {
                len: 2 * cs - 7 + 2048
            }
        );
        assert_eq!(
            at(5 * cs + 2048),
            Mapping::Unallocated {
                len: cs - 2048 + 5 * 2048
            }
        );
        assert_eq!(
            at(6 * cs + 5 * 2048),
            Mapping::Data {
                host: HostOffset(0x200000 + 5 * 2048),
                len: 2048
            }
        );
        assert_eq!(
            at(6 * cs + 6 * 2048),
            Mapping::Unallocated { len: (1 << 30) }
        );
    }

    #[test]
    fn pointers_into_the_header_are_errors() {
        // An L1 entry naming cluster 0 as its L2 table (aligned, it would be 0: no table).
        let g = Geometry::new(12, false);
        let img = FakeImage {
            tables: HashMap::from([(0x200, vec![0u64; 512].into())]),
        };
        for l2 in [0x200u64, 0x1000 - 0x200] {
            let l1 = L1Table::new(vec![l2], 1);
            let err = map_range(&img, &g, &l1, GuestOffset(0), 4096).unwrap_err();
            assert!(err.to_string().contains("L1 entry 0"), "{err}");
        }
        // A compressed descriptor whose data starts in cluster 0.
        let x = g.compressed_offset_bits();
        let (img, g, l1) = setup(&[(3, L2_COMPRESSED | (1 << x) | 0x68)]);
        let err = map_range(&img, &g, &l1, GuestOffset(3 * 4096), 4096).unwrap_err();
        assert!(err.to_string().contains("image header"), "{err}");
        // The entries before it still map.
        assert_eq!(
            map_range(&img, &g, &l1, GuestOffset(0), 3 * 4096).unwrap(),
            Mapping::Unallocated { len: 3 * 4096 }
        );
    }

    #[test]
    fn reserved_bits_are_ignored_like_qemu() {
        // L2 reserved bits 0x3f000000000001fe and L1 reserved bits 0x7f000000000001ff.
        let g = Geometry::new(12, false);
        let mut t = vec![0u64; 512];
        t[0] = 0x20000 | 0x3f00_0000_0000_01fe;
        t[1] = L2_COPIED | 0x21000 | 0x1fe;
        // COPIED without an offset is still unallocated (QEMU: "unallocated plain").
        t[2] = L2_COPIED;
        let img = FakeImage {
            tables: HashMap::from([(0x10000, t.into())]),
        };
        let l1 = L1Table::new(vec![0x10000 | 0x7f00_0000_0000_01ff], 1);
        assert_eq!(
            map_range(&img, &g, &l1, GuestOffset(0), 1 << 20).unwrap(),
            Mapping::Data {
                host: HostOffset(0x20000),
                len: 2 * 4096
            }
        );
        assert_eq!(
            map_range(&img, &g, &l1, GuestOffset(2 * 4096), 4096).unwrap(),
            Mapping::Unallocated { len: 4096 }
        );
    }

    #[test]
    fn short_l2_tables_read_as_unallocated() {
        // A source handing out fewer entries than a table holds (as a truncated table would).
        let g = Geometry::new(16, true);
        let img = FakeImage {
            tables: HashMap::from([(0x10000, vec![0x100000u64, 1].into())]),
        };
        let l1 = L1Table::new(vec![0x10000], 1);
        assert_eq!(
            map_range(&img, &g, &l1, GuestOffset(0), 1 << 20).unwrap(),
            Mapping::Data {
                host: HostOffset(0x100000),
                len: 2048
            }
        );
        assert_eq!(
            map_range(&img, &g, &l1, GuestOffset(2048), 1 << 30).unwrap(),
            Mapping::Unallocated { len: 1 << 30 }
        );
    }

    #[test]
    fn huge_unallocated_ranges_map_in_one_step() {
        // Found by fuzzing (l2_decode): a range of 2^62 bytes over 512-byte clusters used to be
        // walked one missing L1 entry (32 KiB) at a time, 2^47 steps.
        let g = Geometry::new(9, false);
        let img = FakeImage {
            tables: HashMap::from([(0x10000, vec![0u64; 64].into())]),
        };
        let l1 = L1Table::new(vec![0, 0x10000], 2);
        let len = 0x7e00_0000_0100_0080;
        let start = std::time::Instant::now();
        assert_eq!(
            map_range(&img, &g, &l1, GuestOffset(64 << 10), len).unwrap(),
            Mapping::Unallocated { len }
        );
        assert_eq!(
            map_range(&img, &g, &l1, GuestOffset(0), len).unwrap(),
            Mapping::Unallocated { len }
        );
        assert!(start.elapsed() < std::time::Duration::from_secs(1));
        // Past the end of the address space too.
        assert_eq!(
            map_range(&img, &g, &l1, GuestOffset(u64::MAX - 10), u64::MAX).unwrap(),
            Mapping::Unallocated { len: 10 }
        );
    }

    #[test]
    fn damage_ends_a_run_and_fails_where_it_starts() {
        // Found by fuzzing (l2_decode): a walk over 2 MiB clusters whose second L1 entry is
        // unaligned re-walked the 2^18 unallocated entries of the first table at every step.
        let g = Geometry::new(12, false);
        let mut t = vec![0u64; 512];
        t[3] = 0x1234; // unaligned data offset
        let img = FakeImage {
            tables: HashMap::from([(0x10000, t.into())]),
        };
        let l1 = L1Table::new(vec![0x10000, 0x20200], 2);
        assert_eq!(
            map_range(&img, &g, &l1, GuestOffset(0), 1 << 30).unwrap(),
            Mapping::Unallocated { len: 3 * 4096 }
        );
        let err = map_range(&img, &g, &l1, GuestOffset(3 * 4096), 1 << 30).unwrap_err();
        assert!(err.to_string().contains("L2 entry 3"), "{err}");
        assert_eq!(
            map_range(&img, &g, &l1, GuestOffset(4 * 4096), 1 << 30).unwrap(),
            Mapping::Unallocated {
                len: (2 << 20) - 4 * 4096
            }
        );
        let err = map_range(&img, &g, &l1, GuestOffset(2 << 20), 1 << 30).unwrap_err();
        assert!(err.to_string().contains("L1 entry 1"), "{err}");
    }

    #[test]
    fn extended_l2_invalid_bitmaps() {
        let g = Geometry::new(16, true);
        let mut t = vec![0u64; 4096 * 2];
        t[1] = 1; // allocated bit without a host offset
        t[2] = 0x200000;
        t[3] = 1 | (1 << 32); // allocated and zero
        let img = FakeImage {
            tables: HashMap::from([(0x10000, t.into())]),
        };
        let l1 = L1Table::new(vec![0x10000], 1);
        assert!(map_range(&img, &g, &l1, GuestOffset(0), 512).is_err());
        assert!(map_range(&img, &g, &l1, GuestOffset(65536), 512).is_err());
    }
}
