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

use crate::error::MetadataError;

/// QEMU's limits (`QCOW_MAX_SNAPSHOTS`, `QCOW_MAX_SNAPSHOTS_SIZE`, `QCOW_MAX_SNAPSHOT_EXTRA_DATA`).
pub const MAX_SNAPSHOTS: u32 = 65536;
pub const MAX_TABLE_SIZE: u64 = 64 << 20;
pub const MAX_EXTRA_DATA: u32 = 1024;
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
/// `table` holds what the file has there (at most [`MAX_TABLE_SIZE`]); an entry that runs past it
/// is an error, as is an entry whose fields are out of range.
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
                "runs past the end of the table or file (at byte {pos})"
            ))
        })?;
        let l1_table_offset = be_u64(fixed, 0);
        let l1_size = be_u32(fixed, 8);
        let id_len = be_u16(fixed, 12) as usize;
        let name_len = be_u16(fixed, 14) as usize;
        let extra_len = be_u32(fixed, 36);
        if extra_len > MAX_EXTRA_DATA {
            return Err(err(format!(
                "extra_data_size {extra_len} exceeds the maximum of {MAX_EXTRA_DATA}"
            )));
        }
        let extra_len = extra_len as usize;
        let body_start = pos + FIXED_LEN;
        let body_end = body_start + extra_len + id_len + name_len;
        let body = table.get(body_start..body_end).ok_or_else(|| {
            err(format!(
                "extra data, id and name ({} bytes) run past the end of the table",
                body_end - body_start
            ))
        })?;
        let extra = body[..extra_len].to_vec();
        let id = body[extra_len..extra_len + id_len].to_vec();
        let name = body[extra_len + id_len..].to_vec();
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
        if pos as u64 > MAX_TABLE_SIZE {
            return Err(err(format!(
                "the table exceeds the maximum size of {MAX_TABLE_SIZE} bytes"
            )));
        }
    }
    Ok(snapshots)
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
        Snapshot {
            l1_table_offset: 0x50000,
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

    #[test]
    fn v2_entry_without_extra_data() {
        let mut s = sample("1", "old");
        s.extra.clear();
        s.disk_size = None;
        let bytes = encode_table(&[s.clone()]);
        assert_eq!(parse_table(&bytes, 1).unwrap(), vec![s]);
    }
}
