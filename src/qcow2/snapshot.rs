//! The internal snapshot table.
//!
//! Each entry (8-byte aligned) is, from the spec:
//! ```text
//!  0 -  7: l1_table_offset      8 - 11: l1_size
//! 12 - 13: id_str_size         14 - 15: name_size
//! 16 - 19: date_sec            20 - 23: date_nsec
//! 24 - 31: vm_clock_nsec       32 - 35: vm_state_size
//! 36 - 39: extra_data_size     40 -   : extra data, then the id, then the name, then padding
//! ```
//! Extra data (v3 requires at least 16 bytes): `vm_state_size_large` u64, `disk_size` u64,
//! `icount` u64 (-1 when record/replay was off). Unknown extra data is kept.

use crate::qcow2::error::MetadataError;
use crate::qcow2::limits::{
    MAX_L1_BYTES, MAX_L1_ENTRIES, MAX_SNAPSHOT_EXTRA_DATA, MAX_SNAPSHOT_TABLE_BYTES, MAX_SNAPSHOTS,
    MIN_CLUSTER_BITS,
};

/// The smallest cluster size: every L1 table offset is a multiple of it, whatever the cluster size.
const MIN_CLUSTER_SIZE: u64 = 1 << MIN_CLUSTER_BITS;
const FIXED_LEN: usize = 40;

/// One internal snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    pub l1_table_offset: u64,
    pub l1_size: u32,
    /// The unique id (decimal digits, as QEMU writes it; any bytes are kept).
    pub id: Vec<u8>,
    /// The name (tag). May be empty, repeated, or not UTF-8.
    pub name: Vec<u8>,
    pub date_sec: u32,
    pub date_nsec: u32,
    pub vm_clock_nsec: u64,
    /// VM state size in bytes (the large field of the extra data when present).
    pub vm_state_size: u64,
    /// The disk size when the snapshot was taken, if the extra data records it.
    pub disk_size: Option<u64>,
    /// Instruction count, if recorded (`None` for -1 or absent).
    pub icount: Option<u64>,
    /// The whole extra data as stored (kept for a rewrite).
    pub extra: Vec<u8>,
}

impl Snapshot {
    pub fn id_str(&self) -> String {
        String::from_utf8_lossy(&self.id).into_owned()
    }

    /// The name, if it is valid UTF-8.
    pub fn name_str(&self) -> Option<&str> {
        std::str::from_utf8(&self.name).ok()
    }

    /// Encoded size of this entry in the table (8-byte aligned).
    pub fn encoded_len(&self) -> usize {
        (FIXED_LEN + self.extra.len() + self.id.len() + self.name.len()).next_multiple_of(8)
    }

    /// Serializes the entry as the table stores it.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.encoded_len());
        out.extend_from_slice(&self.l1_table_offset.to_be_bytes());
        out.extend_from_slice(&self.l1_size.to_be_bytes());
        out.extend_from_slice(&(self.id.len() as u16).to_be_bytes());
        out.extend_from_slice(&(self.name.len() as u16).to_be_bytes());
        out.extend_from_slice(&self.date_sec.to_be_bytes());
        out.extend_from_slice(&self.date_nsec.to_be_bytes());
        out.extend_from_slice(&self.vm_clock_nsec.to_be_bytes());
        let small_vm_state = u32::try_from(self.vm_state_size).unwrap_or(0);
        out.extend_from_slice(&small_vm_state.to_be_bytes());
        out.extend_from_slice(&(self.extra.len() as u32).to_be_bytes());
        out.extend_from_slice(&self.extra);
        out.extend_from_slice(&self.id);
        out.extend_from_slice(&self.name);
        out.resize(self.encoded_len(), 0);
        out
    }
}

fn be_u16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}
fn be_u32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}
fn be_u64(b: &[u8], at: usize) -> u64 {
    let mut v = [0u8; 8];
    v.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(v)
}

/// Parses `count` entries from `table`, the bytes read at the snapshot table offset.
///
/// `table` holds what the file has there (at most [`MAX_SNAPSHOT_TABLE_BYTES`]); an entry that runs past it
/// is an error, as is an entry whose fields are out of range:
/// - `extra_data_size` above 1024 (QEMU stops the open too);
/// - an L1 table that cannot be one whatever the cluster size: `l1_size` above QEMU's 32 MiB limit,
///   an offset that is not a multiple of 512, at 0 (the header), or ending beyond 2^63;
/// - two snapshots whose L1 tables overlap. QEMU gives every snapshot its own copy, so an overlap
///   is corruption; refusing it also keeps memory bounded by the file's size, since each snapshot's
///   L1 table is loaded separately (65536 entries naming one 32 MiB table would otherwise need
///   2 TiB).
///
/// The check against the image's real cluster size is [`crate::qcow2::Qcow2Image::snapshot_l1`]'s.
pub fn parse_table(table: &[u8], count: u32) -> Result<Vec<Snapshot>, MetadataError> {
    if count > MAX_SNAPSHOTS {
        return Err(MetadataError::SnapshotTable(format!(
            "{count} snapshots exceed the maximum of {MAX_SNAPSHOTS}"
        )));
    }
    let mut snapshots = Vec::with_capacity(count.min(1024) as usize);
    let mut pos = 0usize;
    for n in 0..count {
        let err = |what: String| MetadataError::SnapshotTable(format!("entry {n}: {what}"));
        let fixed = table.get(pos..pos + FIXED_LEN).ok_or_else(|| {
            err(format!(
                "runs past the end of the table or file (at byte {pos} of the table; \
                 nb_snapshots = {count})"
            ))
        })?;
        let l1_table_offset = be_u64(fixed, 0);
        let l1_size = be_u32(fixed, 8);
        let id_len = be_u16(fixed, 12) as usize;
        let name_len = be_u16(fixed, 14) as usize;
        let extra_len = be_u32(fixed, 36);
        if extra_len > MAX_SNAPSHOT_EXTRA_DATA {
            return Err(err(format!(
                "extra_data_size {extra_len} exceeds the maximum of {MAX_SNAPSHOT_EXTRA_DATA}"
            )));
        }
        let extra_len = extra_len as usize;
        let body_start = pos + FIXED_LEN;
        let body_end = body_start + extra_len + id_len + name_len;
        let body = table.get(body_start..body_end).ok_or_else(|| {
            err(format!(
                "extra data, id and name (extra_data_size {extra_len}, id_str_size {id_len}, \
                 name_size {name_len}) run past the end of the table or file"
            ))
        })?;
        let extra = body[..extra_len].to_vec();
        let id = body[extra_len..extra_len + id_len].to_vec();
        let name = body[extra_len + id_len..].to_vec();
        check_l1(l1_table_offset, l1_size).map_err(|what| {
            MetadataError::SnapshotTable(format!(
                "entry {n} (id {:?}): {what}",
                String::from_utf8_lossy(&id)
            ))
        })?;
        let mut vm_state_size = be_u32(fixed, 32) as u64;
        if extra.len() >= 8 {
            vm_state_size = be_u64(&extra, 0);
        }
        let disk_size = (extra.len() >= 16).then(|| be_u64(&extra, 8));
        let icount = (extra.len() >= 24)
            .then(|| be_u64(&extra, 16))
            .filter(|&v| v != u64::MAX);
        snapshots.push(Snapshot {
            l1_table_offset,
            l1_size,
            id,
            name,
            date_sec: be_u32(fixed, 16),
            date_nsec: be_u32(fixed, 20),
            vm_clock_nsec: be_u64(fixed, 24),
            vm_state_size,
            disk_size,
            icount,
            extra,
        });
        pos = body_end.next_multiple_of(8);
        if pos as u64 > MAX_SNAPSHOT_TABLE_BYTES {
            return Err(err(format!(
                "the table exceeds the maximum size of {MAX_SNAPSHOT_TABLE_BYTES} bytes"
            )));
        }
    }
    check_l1_overlaps(&snapshots)?;
    Ok(snapshots)
}

/// How many bytes the `count` entries at the start of `table` take, or None if `table` ends
/// before the last of them does (a reader then reads more, up to what the file holds).
pub fn table_len(table: &[u8], count: u32) -> Option<usize> {
    let mut pos = 0usize;
    for _ in 0..count {
        let fixed = table.get(pos..pos + FIXED_LEN)?;
        let body = FIXED_LEN
            + be_u32(fixed, 36) as usize
            + be_u16(fixed, 12) as usize
            + be_u16(fixed, 14) as usize;
        pos = (pos + body).next_multiple_of(8);
    }
    (pos <= table.len()).then_some(pos)
}

/// The checks of a snapshot's `l1_table_offset` and `l1_size` that need no cluster size.
fn check_l1(offset: u64, l1_size: u32) -> Result<(), String> {
    if l1_size > MAX_L1_ENTRIES {
        return Err(format!(
            "l1_size {l1_size} exceeds the maximum of {MAX_L1_ENTRIES} entries ({} MiB)",
            MAX_L1_BYTES >> 20
        ));
    }
    if offset % MIN_CLUSTER_SIZE != 0 {
        return Err(format!(
            "l1_table_offset {offset:#x} is not aligned to a cluster boundary"
        ));
    }
    if l1_size > 0 && offset == 0 {
        return Err("l1_table_offset 0 points at the image header".into());
    }
    if offset > i64::MAX as u64 - u64::from(l1_size) * 8 {
        return Err(format!(
            "l1_table_offset {offset:#x} with l1_size {l1_size} ends beyond 2^63 bytes"
        ));
    }
    Ok(())
}

/// Refuses snapshot L1 tables that share bytes (see [`parse_table`]).
fn check_l1_overlaps(snapshots: &[Snapshot]) -> Result<(), MetadataError> {
    let mut ranges: Vec<(u64, u64, usize)> = snapshots
        .iter()
        .enumerate()
        .filter(|(_, s)| s.l1_size > 0)
        .map(|(n, s)| {
            let start = s.l1_table_offset;
            (start, start + u64::from(s.l1_size) * 8, n)
        })
        .collect();
    ranges.sort_unstable();
    // Sorted by start, each range only needs comparing with the one reaching furthest so far.
    let mut furthest: Option<(u64, usize)> = None;
    for &(start, end, n) in &ranges {
        if let Some((reach, m)) = furthest {
            if start < reach {
                let (a, b) = (m.min(n), m.max(n));
                return Err(MetadataError::SnapshotTable(format!(
                    "entries {a} and {b} (ids {:?} and {:?}): their L1 tables overlap at {start:#x} \
                     (l1_table_offset {:#x}, l1_size {} and l1_table_offset {:#x}, l1_size {})",
                    snapshots[a].id_str(),
                    snapshots[b].id_str(),
                    snapshots[a].l1_table_offset,
                    snapshots[a].l1_size,
                    snapshots[b].l1_table_offset,
                    snapshots[b].l1_size,
                )));
            }
        }
        if furthest.is_none_or(|(reach, _)| end > reach) {
            furthest = Some((end, n));
        }
    }
    Ok(())
}

/// Serializes a whole table.
pub fn encode_table(snapshots: &[Snapshot]) -> Vec<u8> {
    snapshots.iter().flat_map(|s| s.encode()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(id: &str, name: &str) -> Snapshot {
        let mut extra = Vec::new();
        extra.extend_from_slice(&0u64.to_be_bytes());
        extra.extend_from_slice(&(64u64 << 20).to_be_bytes());
        extra.extend_from_slice(&u64::MAX.to_be_bytes());
        // Each snapshot has its own L1 table, as QEMU writes them.
        let n: u64 = id.parse().unwrap_or(0);
        Snapshot {
            l1_table_offset: 0x50000 + n * 0x10000,
            l1_size: 1,
            id: id.into(),
            name: name.into(),
            date_sec: 1_700_000_000,
            date_nsec: 5,
            vm_clock_nsec: 0,
            vm_state_size: 0,
            disk_size: Some(64 << 20),
            icount: None,
            extra,
        }
    }

    #[test]
    fn table_len_says_when_a_prefix_holds_every_entry() {
        let table: Vec<Snapshot> = (0..50)
            .map(|i| sample(&i.to_string(), &"n".repeat(i * 3)))
            .collect();
        let bytes = encode_table(&table);
        assert_eq!(table_len(&bytes, 50), Some(bytes.len()));
        let mut longer = bytes.clone();
        longer.extend_from_slice(&[0xff; 100]);
        assert_eq!(table_len(&longer, 50), Some(bytes.len()));
        assert_eq!(table_len(&bytes[..bytes.len() - 1], 50), None);
        assert_eq!(table_len(&bytes[..39], 1), None);
        assert_eq!(table_len(&[], 0), Some(0));
    }

    #[test]
    fn round_trip() {
        let snaps = vec![sample("1", "first"), sample("2", "second-longer-name")];
        let bytes = encode_table(&snaps);
        assert_eq!(bytes.len() % 8, 0);
        assert_eq!(parse_table(&bytes, 2).unwrap(), snaps);
    }

    #[test]
    fn truncated_table_is_an_error() {
        let bytes = encode_table(&[sample("1", "first")]);
        for cut in [0, 10, 40, bytes.len() - 8] {
            let e = parse_table(&bytes[..cut], 1).unwrap_err();
            assert!(e.to_string().contains("entry 0"), "{e}");
        }
        assert!(parse_table(&bytes, 2).is_err());
    }

    #[test]
    fn huge_extra_data_is_refused() {
        let mut bytes = encode_table(&[sample("1", "first")]);
        bytes[36..40].copy_from_slice(&5000u32.to_be_bytes());
        let e = parse_table(&bytes, 1).unwrap_err();
        assert!(e.to_string().contains("extra_data_size 5000"), "{e}");
    }

    /// Overwrites bytes `at..` of entry 0 of `bytes`.
    fn patch(mut bytes: Vec<u8>, at: usize, with: &[u8]) -> Vec<u8> {
        bytes[at..at + with.len()].copy_from_slice(with);
        bytes
    }

    #[test]
    fn absurd_l1_size_is_refused_naming_the_field() {
        let bytes = encode_table(&[sample("1", "first")]);
        let e = parse_table(&patch(bytes, 8, &u32::MAX.to_be_bytes()), 1).unwrap_err();
        let e = e.to_string();
        assert!(
            e.contains("entry 0") && e.contains("l1_size 4294967295"),
            "{e}"
        );
        // QEMU's limit itself is fine.
        let mut s = sample("1", "first");
        s.l1_size = MAX_L1_ENTRIES;
        assert!(parse_table(&encode_table(&[s]), 1).is_ok());
    }

    #[test]
    fn impossible_l1_offsets_are_refused() {
        for (offset, needle) in [
            (0x50001u64, "not aligned"),
            (0x50100, "not aligned"),
            (0, "image header"),
            (0x8000_0000_0000_0000, "beyond 2^63"),
            (!511, "beyond 2^63"),
        ] {
            let bytes = encode_table(&[sample("1", "first")]);
            let e = parse_table(&patch(bytes, 0, &offset.to_be_bytes()), 1).unwrap_err();
            let e = e.to_string();
            assert!(
                e.contains("l1_table_offset") && e.contains(needle),
                "{offset:#x}: {e}"
            );
        }
        // An empty table may sit anywhere aligned, even at 0 (QEMU writes that for 0-byte disks).
        let mut s = sample("1", "first");
        s.l1_size = 0;
        s.l1_table_offset = 0;
        assert!(parse_table(&encode_table(&[s]), 1).is_ok());
    }

    #[test]
    fn shared_l1_tables_are_refused() {
        let mut a = sample("1", "a");
        let mut b = sample("2", "b");
        let c = sample("3", "c");
        a.l1_table_offset = 0x100000;
        a.l1_size = 8192; // 64 KiB: up to 0x110000
        b.l1_table_offset = 0x10fe00; // overlaps the last 512 bytes of a
        let e = parse_table(&encode_table(&[a.clone(), c.clone(), b.clone()]), 3).unwrap_err();
        let e = e.to_string();
        assert!(
            e.contains("entries 0 and 2") && e.contains("overlap"),
            "{e}"
        );
        // The same table twice.
        let e = parse_table(&encode_table(&[c.clone(), c.clone()]), 2).unwrap_err();
        assert!(e.to_string().contains("overlap"), "{e}");
        // Adjacent tables are fine, and so are several empty ones at one place.
        b.l1_table_offset = 0x110000;
        let mut d = sample("4", "d");
        let mut e4 = sample("5", "e");
        d.l1_size = 0;
        e4.l1_size = 0;
        e4.l1_table_offset = d.l1_table_offset;
        assert!(parse_table(&encode_table(&[a, b, c, d, e4]), 5).is_ok());
    }

    #[test]
    fn hostile_lengths_never_panic() {
        let good = encode_table(&[sample("1", "first"), sample("2", "second")]);
        // id/name lengths running past the table, counts beyond the entries present.
        for (at, value) in [(12usize, 0xffffu16), (14, 0xffff), (12, 0x8000)] {
            let bytes = patch(good.clone(), at, &value.to_be_bytes());
            let e = parse_table(&bytes, 2).unwrap_err();
            assert!(e.to_string().contains("run past the end"), "{e}");
        }
        for count in [3, 1000, MAX_SNAPSHOTS, MAX_SNAPSHOTS + 1, u32::MAX] {
            assert!(parse_table(&good, count).is_err());
        }
        assert!(parse_table(&[], 1).is_err());
        assert_eq!(parse_table(&[], 0).unwrap(), vec![]);
    }

    #[test]
    fn v2_entry_without_extra_data() {
        let mut s = sample("1", "old");
        s.extra.clear();
        s.disk_size = None;
        let bytes = encode_table(&[s.clone()]);
        assert_eq!(parse_table(&bytes, 1).unwrap(), vec![s]);
    }
}
