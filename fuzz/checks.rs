//! What each fuzz target checks, shared by the cargo-fuzz targets (fuzz/fuzz_targets/*.rs) and by
//! the regression test that replays the committed seeds and crash inputs
//! (tests/hostile_regressions.rs), so that both run exactly the same code. Depends only on
//! `snapfs` and std.
//!
//! Every function takes arbitrary bytes and must return normally: errors from the engine are
//! expected outcomes, a panic (failed assertion included) is a finding.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use snapfs::catalog::Catalog;
use snapfs::chain::Chain;
use snapfs::error::{Error, MetadataError, Result};
use snapfs::libvirt::{check_writable, parse_snapshot_xml, to_xml};
use snapfs::qcow2::compress::decompress as decompress_cluster;
use snapfs::qcow2::header::{CompressionType, Header};
use snapfs::qcow2::l1::L1Table;
use snapfs::qcow2::l2::{CompressedCluster, L2Table};
use snapfs::qcow2::mapping::{self, L2Source, Mapping};
use snapfs::qcow2::snapshot::{encode_table, parse_table};
use snapfs::qcow2::{Caches, Geometry, GuestOffset, HostOffset, OpenOptions};
use snapfs::view::View;

/// `header`: `Header::parse` on arbitrary bytes (the file's first bytes, as `Qcow2Image::open`
/// passes them); for every header that parses, `encode` (after `sync_layout`) must give bytes that
/// parse back to the same header, and encoding that again must give the same bytes.
pub fn header(data: &[u8]) {
    // The file length is the input's, or a much longer one (bytes past the input read as zeros,
    // as past the end of a file, but the backing file name must lie inside the file).
    for file_len in [data.len() as u64, u64::MAX] {
        let Ok(header) = Header::parse(data, file_len) else {
            continue;
        };
        let mut rewritten = header.clone();
        rewritten.sync_layout();
        let Ok(bytes) = rewritten.encode() else {
            continue;
        };
        let again = Header::parse(&bytes, bytes.len() as u64)
            .unwrap_or_else(|e| panic!("encoded header does not parse: {e}\n{rewritten:#?}"));
        assert_eq!(
            again, rewritten,
            "encode/parse round trip changed the header"
        );
        let twice = again.encode().expect("a re-parsed header encodes");
        assert_eq!(twice, bytes, "encoding is not stable");
    }
}

/// `snapshot_table`: `snapshot::parse_table` on arbitrary table bytes and counts (the first 4
/// bytes); what parses must encode and parse back to the same snapshots.
pub fn snapshot_table(data: &[u8]) {
    let (count, table) = match data.split_first_chunk::<4>() {
        Some((c, rest)) => (u32::from_be_bytes(*c), rest),
        None => (1, data),
    };
    // Small counts matter most; huge ones must fail fast.
    let count = if count > 0x0100_0000 {
        count
    } else {
        count % 64
    };
    let Ok(snapshots) = parse_table(table, count) else {
        return;
    };
    assert_eq!(snapshots.len(), count as usize);
    let bytes = encode_table(&snapshots);
    let again = parse_table(&bytes, count).expect("an encoded table parses");
    assert_eq!(again, snapshots);
}

/// Hands out the same L2 table (the input's tail) for every offset, except that offsets with bit
/// 40 set fail as an unreadable table would.
struct FakeImage {
    table: L2Table,
}

impl L2Source for FakeImage {
    fn l2_table(&self, l1_index: u64, offset: HostOffset) -> Result<L2Table> {
        if offset.0 & (1 << 40) != 0 {
            return Err(self.metadata_error(MetadataError::Read {
                what: "L2 table",
                offset: offset.0,
                reason: format!("fake read error (L1 index {l1_index})"),
            }));
        }
        Ok(self.table.clone())
    }

    fn metadata_error(&self, error: MetadataError) -> Error {
        Error::Metadata {
            path: "fuzz".into(),
            source: error,
        }
    }
}

fn take<const N: usize>(data: &mut &[u8]) -> [u8; N] {
    let mut out = [0u8; N];
    let n = data.len().min(N);
    out[..n].copy_from_slice(&data[..n]);
    *data = &data[n..];
    out
}

/// `l2_decode`: `mapping::map_range` over L1 and L2 tables made from the input, walking a guest
/// range the way a read does. Every mapping must be well formed: never empty, never longer than
/// asked, a compressed part inside its cluster, host offsets without overflow. Input: a shape
/// byte (cluster bits 9 + n % 13, 0x80 extended L2, 0x40 unbounded range), the L1 length, start
/// and length of the range (u64 each), the L1 entries, then the L2 table.
pub fn l2_decode(data: &[u8]) {
    let mut data = data;
    let [shape, l1_len] = take::<2>(&mut data);
    let cluster_bits = 9 + u32::from(shape % 13);
    let extended_l2 = shape & 0x80 != 0 && cluster_bits >= 14;
    let geometry = Geometry::new(cluster_bits, extended_l2);
    let start = u64::from_be_bytes(take(&mut data));
    let len = u64::from_be_bytes(take(&mut data));
    // Mostly small ranges near the start, sometimes anything.
    let (start, len) = if shape & 0x40 != 0 {
        (start, len)
    } else {
        (start % (1 << 32), len % (1 << 24))
    };
    let l1_entries: Vec<u64> = (0..l1_len % 8)
        .map(|_| u64::from_be_bytes(take(&mut data)))
        .collect();
    let l1 = L1Table::new(l1_entries, u64::from(l1_len));
    let words: Vec<u64> = data
        .chunks(8)
        .map(|c| {
            let mut w = [0u8; 8];
            w[..c.len()].copy_from_slice(c);
            u64::from_be_bytes(w)
        })
        .collect();
    for &entry in &words {
        let c = CompressedCluster::from_entry(entry, &geometry);
        assert!(
            c.len > 0 && c.len <= 2 * geometry.cluster_size(),
            "{c:?} for entry {entry:#x}"
        );
    }
    let _ = l1.find_shared_l2();
    let image = FakeImage {
        table: Arc::from(words),
    };

    let end = start.saturating_add(len);
    let mut pos = start;
    let mut steps = 0;
    while pos < end && steps < 4096 {
        steps += 1;
        let asked = end - pos;
        let m = match mapping::map_range(&image, &geometry, &l1, GuestOffset(pos), asked) {
            Ok(m) => m,
            Err(_) => {
                // Skip the failing cluster, as the rest of a disk must still read.
                pos = (pos | (geometry.cluster_size() - 1)).saturating_add(1);
                continue;
            }
        };
        let got = m.len();
        assert!(
            got > 0 && got <= asked,
            "{m:?} for {asked} bytes at {pos:#x}"
        );
        match m {
            Mapping::Data { host, len } => {
                assert!(host.0.checked_add(len).is_some(), "{m:?}");
            }
            Mapping::Compressed { skip, len, .. } => {
                assert!(skip + len <= geometry.cluster_size(), "{m:?}");
                assert_eq!(skip, geometry.in_cluster(pos), "{m:?}");
            }
            Mapping::Zero { .. } | Mapping::Unallocated { .. } => {}
        }
        pos += got;
    }
}

/// `decompress`: `compress::decompress` on arbitrary data, deflate or zstd (bit 0 of the first
/// byte), into clusters of 512 << (n % 13) bytes: an error or a full cluster.
pub fn decompress(data: &[u8]) {
    let Some((&shape, input)) = data.split_first() else {
        return;
    };
    let kind = if shape & 1 == 0 {
        CompressionType::Deflate
    } else {
        CompressionType::Zstd
    };
    let cluster_size = 512usize << ((shape >> 1) % 13);
    let mut out = vec![0u8; cluster_size];
    let _ = decompress_cluster(kind, input, &mut out);
}

/// `libvirt_xml`: `libvirt::parse_snapshot_xml` on arbitrary text; a snapshot that parses and
/// that XML 1.0 can hold (`check_writable`) must read back equal from what `to_xml` writes, and
/// writing it again must give the same text.
pub fn libvirt_xml(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let source = Path::new("/fuzz/snapshot.xml");
    let Ok(snapshot) = parse_snapshot_xml(text, source) else {
        return;
    };
    if check_writable(&snapshot).is_err() {
        return;
    }
    let written = to_xml(&snapshot);
    let again = parse_snapshot_xml(&written, source)
        .unwrap_or_else(|e| panic!("written XML does not parse: {e}\n{written}"));
    assert_eq!(
        again, snapshot,
        "to_xml/parse round trip changed the snapshot\n{written}"
    );
    assert_eq!(to_xml(&again), written, "writing is not stable");
}

/// The backing file names an `image_read` input may use: the files [`image_read_in`] provides.
pub const ALLOWED_BACKING: [&str; 3] = ["base.qcow2", "base.raw", "top.qcow2"];

/// Fills `dir` with the files an `image_read` input may name as its backing file.
pub fn prepare_image_dir(dir: &Path) {
    std::fs::write(
        dir.join("base.qcow2"),
        include_bytes!("corpus-seeds/image_read/v3.qcow2"),
    )
    .expect("write base.qcow2");
    std::fs::write(dir.join("base.raw"), vec![b'a'; 65536]).expect("write base.raw");
}

/// `image_read` in a per-process directory under `$SNAPFS_FUZZ_WORKDIR` (scripts/fuzz.sh makes
/// one and removes it afterwards), else under /dev/shm or the temp directory.
pub fn image_read(data: &[u8]) {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    let dir = DIR.get_or_init(|| {
        let base = match std::env::var_os("SNAPFS_FUZZ_WORKDIR") {
            Some(dir) => PathBuf::from(dir),
            None if Path::new("/dev/shm").is_dir() => PathBuf::from("/dev/shm"),
            None => std::env::temp_dir(),
        };
        let dir = base.join(format!("snapfs-fuzz-image-read-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("create the fuzz work directory");
        prepare_image_dir(&dir);
        dir
    });
    image_read_in(dir, data);
}

/// `image_read`: the input is written to `dir/top.qcow2` and opened as `snapfs info` opens an
/// image (read-only, no locks); its catalog is built, and every view is read a little and searched
/// for data and holes. Inputs naming a backing file other than [`ALLOWED_BACKING`] are skipped:
/// the fuzzer must not open files of the machine it runs on. `dir` must have been prepared with
/// [`prepare_image_dir`].
pub fn image_read_in(dir: &Path, data: &[u8]) {
    if let Ok(header) = Header::parse(data, data.len() as u64)
        && let Some(name) = &header.backing_file
        && !ALLOWED_BACKING.contains(&name.as_str())
    {
        return;
    }
    let path = dir.join("top.qcow2");
    std::fs::write(&path, data).expect("write the input");
    let options = OpenOptions {
        writable: false,
        lock: false,
        share: false,
    };
    let Ok(chain) = Chain::open(&path, Caches::new(1 << 20), options) else {
        return;
    };
    let Ok(catalog) = Catalog::build(Arc::new(chain)) else {
        return;
    };
    exercise(&catalog.live().view);
    for (_, entry) in catalog.snapshots().iter().take(16) {
        exercise(&entry.view);
    }
}

/// Reads a few places of `view` and runs SEEK_DATA/SEEK_HOLE from a few offsets.
fn exercise(view: &View) {
    let size = view.size();
    let mut buf = vec![0u8; 70000];
    for (offset, len) in [
        (0, 4096),
        (0, buf.len()),
        (size / 2, 1000),
        (size.saturating_sub(4096), 8192),
        (size.saturating_add(1), 10),
    ] {
        let _ = view.read_at(&mut buf[..len], offset);
    }
    for offset in [0, size / 3, size.saturating_sub(1)] {
        let _ = view.seek_data(offset);
        let _ = view.seek_hole(offset);
    }
}

/// The targets by name, for replaying inputs.
/// What a fuzz target checks about one input.
pub type Check = fn(&[u8]);

pub const TARGETS: [(&str, Check); 6] = [
    ("header", header),
    ("snapshot_table", snapshot_table),
    ("l2_decode", l2_decode),
    ("decompress", decompress),
    ("image_read", image_read),
    ("libvirt_xml", libvirt_xml),
];
