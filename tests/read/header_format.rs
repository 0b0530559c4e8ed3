//! The qcow2 header parser and encoder against images qemu-img makes, the rows of
//! reference/bad-inputs.md, and random mutations.

use proptest::prelude::*;
use snapfs::qcow2::header::*;
use std::path::Path;
use std::process::Command;
use std::sync::OnceLock;

const MIB: u64 = 1 << 20;
/// What the caller passes as `start`: the first 2 MiB + 1024 bytes.
const START_LEN: u64 = 2 * MIB + 1024;

fn qemu_img(dir: &Path, args: &[&str]) {
    let output = Command::new("qemu-img")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("qemu-img must be installed");
    assert!(
        output.status.success(),
        "qemu-img {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

fn qemu_img_json(dir: &Path, args: &[&str]) -> serde_json::Value {
    let output = Command::new("qemu-img")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("qemu-img must be installed");
    assert!(
        output.status.success(),
        "qemu-img {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).unwrap()
}

/// The whole file, as tests patch it; `parse_bytes` passes the first START_LEN bytes.
fn read(dir: &Path, name: &str) -> Vec<u8> {
    std::fs::read(dir.join(name)).unwrap()
}

fn parse_bytes(bytes: &[u8]) -> Result<Header, HeaderError> {
    let start = &bytes[..bytes.len().min(START_LEN as usize)];
    Header::parse(start, bytes.len() as u64)
}

/// Creates a 64 MiB image with `qemu-img create -f qcow2 -o <options>` and returns its bytes.
fn create(options: &str, extra: &[&str]) -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let mut args = vec!["create", "-q", "-f", "qcow2"];
    if !options.is_empty() {
        args.extend(["-o", options]);
    }
    args.extend(extra);
    args.extend(["img.qcow2", "64M"]);
    qemu_img(dir.path(), &args);
    read(dir.path(), "img.qcow2")
}

/// The base image of bad-inputs.md: 64 MiB, 64 KiB clusters, v3.
fn base() -> &'static [u8] {
    static BASE: OnceLock<Vec<u8>> = OnceLock::new();
    BASE.get_or_init(|| create("", &[]))
}

/// An overlay of a v3 image: backing "base.qcow2", backing format "qcow2".
fn overlay() -> &'static [u8] {
    static OVERLAY: OnceLock<Vec<u8>> = OnceLock::new();
    OVERLAY.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        qemu_img(
            dir.path(),
            &["create", "-q", "-f", "qcow2", "base.qcow2", "64M"],
        );
        qemu_img(
            dir.path(),
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-b",
                "base.qcow2",
                "-F",
                "qcow2",
                "top.qcow2",
            ],
        );
        read(dir.path(), "top.qcow2")
    })
}

fn patched(bytes: &[u8], offset: usize, with: &[u8]) -> Vec<u8> {
    let mut out = bytes.to_vec();
    out[offset..offset + with.len()].copy_from_slice(with);
    out
}

fn with_u32(bytes: &[u8], offset: usize, value: u32) -> Vec<u8> {
    patched(bytes, offset, &value.to_be_bytes())
}

fn with_u64(bytes: &[u8], offset: usize, value: u64) -> Vec<u8> {
    patched(bytes, offset, &value.to_be_bytes())
}

fn parse_err(bytes: &[u8]) -> HeaderError {
    let error = parse_bytes(bytes).expect_err("the header must be refused");
    let message = error.to_string();
    assert!(
        !message.contains('\n'),
        "message must be one line: {message}"
    );
    error
}

/// The feature-name table QEMU 10 writes for clusters larger than 4 KiB.
fn qemu_feature_names() -> Vec<FeatureName> {
    [
        (0, 0, "dirty bit"),
        (0, 1, "corrupt bit"),
        (0, 2, "external data file"),
        (0, 3, "compression type"),
        (0, 4, "extended L2 entries"),
        (1, 0, "lazy refcounts"),
        (2, 0, "bitmaps"),
        (2, 1, "raw external data"),
    ]
    .into_iter()
    .map(|(kind, bit, name)| FeatureName {
        kind,
        bit,
        name: name.to_string(),
    })
    .collect()
}

fn qemu_feature_table() -> HeaderExtension {
    let mut data = Vec::new();
    for feature in qemu_feature_names() {
        let mut entry = [0u8; 48];
        entry[0] = feature.kind;
        entry[1] = feature.bit;
        entry[2..2 + feature.name.len()].copy_from_slice(feature.name.as_bytes());
        data.extend_from_slice(&entry);
    }
    HeaderExtension {
        magic: ext::FEATURE_NAMES,
        data,
    }
}

/// What `qemu-img create -f qcow2 img 64M` writes.
fn expected_v3() -> Header {
    Header {
        version: 3,
        backing_file_offset: 0,
        backing_file_size: 0,
        cluster_bits: 16,
        size: 64 * MIB,
        crypt_method: 0,
        l1_size: 1,
        l1_table_offset: 0x30000,
        refcount_table_offset: 0x10000,
        refcount_table_clusters: 1,
        nb_snapshots: 0,
        snapshots_offset: 0,
        incompatible_features: 0,
        compatible_features: 0,
        autoclear_features: 0,
        refcount_order: 4,
        header_length: 112,
        compression_type: CompressionType::Deflate,
        unknown_header_bytes: Vec::new(),
        extensions: vec![qemu_feature_table()],
        backing_file: None,
        backing_format: None,
        feature_names: qemu_feature_names(),
        bitmaps: None,
    }
}

/// encode() gives back exactly what QEMU wrote, and the rest of cluster 0 is zero.
fn assert_encodes_like_qemu(bytes: &[u8]) {
    let header = parse_bytes(bytes).unwrap();
    let encoded = header.encode().unwrap();
    assert_eq!(encoded, bytes[..encoded.len()]);
    let cluster = header.cluster_size() as usize;
    assert!(bytes[encoded.len()..cluster].iter().all(|&b| b == 0));
    assert_eq!(parse_bytes(&encoded).unwrap(), header);
}

// ---- Real headers from qemu-img ----

#[test]
fn v3_default() {
    let header = parse_bytes(base()).unwrap();
    assert_eq!(header, expected_v3());
    assert_eq!(header.cluster_size(), 65536);
    assert_eq!(header.refcount_bits(), 16);
    assert_eq!(header.l2_entries(), 8192);
    assert_eq!(header.subcluster_size(), 65536);
    assert!(!header.is_dirty() && !header.is_corrupt() && !header.extended_l2());
    assert_encodes_like_qemu(base());
}

#[test]
fn v2_compat_0_10() {
    let bytes = create("compat=0.10", &[]);
    let header = parse_bytes(&bytes).unwrap();
    let expected = Header {
        version: 2,
        header_length: 72,
        extensions: Vec::new(),
        feature_names: Vec::new(),
        ..expected_v3()
    };
    assert_eq!(header, expected);
    assert_encodes_like_qemu(&bytes);
}

#[test]
fn v2_with_backing_file() {
    let dir = tempfile::tempdir().unwrap();
    qemu_img(
        dir.path(),
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "compat=0.10",
            "b.qcow2",
            "64M",
        ],
    );
    qemu_img(
        dir.path(),
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "compat=0.10",
            "-b",
            "b.qcow2",
            "-F",
            "qcow2",
            "t.qcow2",
        ],
    );
    let bytes = read(dir.path(), "t.qcow2");
    let header = parse_bytes(&bytes).unwrap();
    let expected = Header {
        version: 2,
        header_length: 72,
        // 72 + backing format extension (8 + 8) + end marker (8).
        backing_file_offset: 96,
        backing_file_size: 7,
        extensions: vec![HeaderExtension {
            magic: ext::BACKING_FORMAT,
            data: b"qcow2".to_vec(),
        }],
        backing_file: Some("b.qcow2".to_string()),
        backing_format: Some("qcow2".to_string()),
        feature_names: Vec::new(),
        ..expected_v3()
    };
    assert_eq!(header, expected);
    assert_encodes_like_qemu(&bytes);
}

#[test]
fn cluster_size_512() {
    let bytes = create("cluster_size=512", &[]);
    let header = parse_bytes(&bytes).unwrap();
    // 64 L2 entries of 512 bytes: one L1 entry maps 32 KiB, so 64 MiB needs 2048 entries.
    // QEMU omits the feature table for clusters of 4 KiB and less.
    let expected = Header {
        cluster_bits: 9,
        l1_size: 2048,
        l1_table_offset: 0x600,
        refcount_table_offset: 0x200,
        extensions: Vec::new(),
        feature_names: Vec::new(),
        ..expected_v3()
    };
    assert_eq!(header, expected);
    assert_eq!(header.l1_entries_for(header.size), 2048);
    assert_encodes_like_qemu(&bytes);
}

#[test]
fn cluster_size_2m() {
    let bytes = create("cluster_size=2M", &[]);
    let header = parse_bytes(&bytes).unwrap();
    let expected = Header {
        cluster_bits: 21,
        l1_table_offset: 0x60_0000,
        refcount_table_offset: 0x20_0000,
        ..expected_v3()
    };
    assert_eq!(header, expected);
    assert_encodes_like_qemu(&bytes);
}

#[test]
fn refcount_bits_1_and_64() {
    for (bits, order) in [(1, 0), (64, 6)] {
        let bytes = create(&format!("refcount_bits={bits}"), &[]);
        let header = parse_bytes(&bytes).unwrap();
        let expected = Header {
            refcount_order: order,
            ..expected_v3()
        };
        assert_eq!(header, expected);
        assert_eq!(header.refcount_bits(), bits);
        assert_encodes_like_qemu(&bytes);
    }
}

#[test]
fn extended_l2() {
    let bytes = create("extended_l2=on", &[]);
    let header = parse_bytes(&bytes).unwrap();
    let expected = Header {
        incompatible_features: incompatible::EXTENDED_L2,
        ..expected_v3()
    };
    assert_eq!(header, expected);
    assert!(header.extended_l2());
    assert_eq!(header.l2_entry_size(), 16);
    assert_eq!(header.l2_entries(), 4096);
    assert_eq!(header.subcluster_size(), 2048);
    assert_encodes_like_qemu(&bytes);
}

#[test]
fn compression_type_zstd() {
    let bytes = create("compression_type=zstd", &[]);
    let header = parse_bytes(&bytes).unwrap();
    let expected = Header {
        incompatible_features: incompatible::COMPRESSION_TYPE,
        compression_type: CompressionType::Zstd,
        ..expected_v3()
    };
    assert_eq!(header, expected);
    assert_encodes_like_qemu(&bytes);
}

#[test]
fn backing_file_and_format() {
    let header = parse_bytes(overlay()).unwrap();
    let expected = Header {
        // 112 + backing format (16) + feature table (8 + 384) + end marker (8).
        backing_file_offset: 0x210,
        backing_file_size: 10,
        extensions: vec![
            HeaderExtension {
                magic: ext::BACKING_FORMAT,
                data: b"qcow2".to_vec(),
            },
            qemu_feature_table(),
        ],
        backing_file: Some("base.qcow2".to_string()),
        backing_format: Some("qcow2".to_string()),
        ..expected_v3()
    };
    assert_eq!(header, expected);
    assert_encodes_like_qemu(overlay());
}

#[test]
fn bitmaps_extension() {
    let dir = tempfile::tempdir().unwrap();
    qemu_img(
        dir.path(),
        &["create", "-q", "-f", "qcow2", "img.qcow2", "64M"],
    );
    qemu_img(dir.path(), &["bitmap", "--add", "img.qcow2", "b0"]);
    let bytes = read(dir.path(), "img.qcow2");
    let header = parse_bytes(&bytes).unwrap();
    assert_eq!(header.autoclear_features, autoclear::BITMAPS);
    let bitmaps = header.bitmaps.unwrap();
    assert_eq!(bitmaps.nb_bitmaps, 1);
    assert_eq!(bitmaps.directory_offset % 65536, 0);
    assert!(bitmaps.directory_offset > 0);
    assert!(bitmaps.directory_size > 0);
    let magics: Vec<u32> = header.extensions.iter().map(|e| e.magic).collect();
    assert_eq!(magics, [ext::FEATURE_NAMES, ext::BITMAPS]);
    assert_encodes_like_qemu(&bytes);

    // Without the autoclear bit QEMU considers the extension stale and ignores its contents.
    let stale = with_u64(&bytes, 88, 0);
    let stale = with_u32(&stale, 0x200, 0); // nb_bitmaps = 0 would be an error otherwise
    let header = parse_bytes(&stale).unwrap();
    assert_eq!(header.bitmaps, None);
    assert_eq!(header.extensions.len(), 2);
}

#[test]
fn luks_is_refused() {
    let bytes = create(
        "encrypt.format=luks,encrypt.key-secret=sec0",
        &["--object", "secret,id=sec0,data=secret"],
    );
    assert_eq!(
        parse_err(&bytes),
        HeaderError::Encrypted {
            method: 2,
            name: "LUKS"
        }
    );
}

#[test]
fn external_data_file_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    qemu_img(
        dir.path(),
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "data_file=data.raw",
            "img.qcow2",
            "64M",
        ],
    );
    let bytes = read(dir.path(), "img.qcow2");
    let error = parse_err(&bytes);
    assert_eq!(
        error,
        HeaderError::ExternalDataFile {
            name: Some("data.raw".to_string())
        }
    );
    assert!(error.to_string().contains("not support"));
}

#[test]
fn header_length_105_is_accepted() {
    // 105 is not a multiple of 8, but QEMU accepts it. The compression type byte is present;
    // extensions start at 105, where the padding reads as the end marker.
    let bytes = create("compression_type=zstd", &[]);
    let header = parse_bytes(&with_u32(&bytes, 100, 105)).unwrap();
    assert_eq!(header.header_length, 105);
    assert_eq!(header.compression_type, CompressionType::Zstd);
    assert!(header.unknown_header_bytes.is_empty());
    assert!(header.extensions.is_empty());

    // With header_length 104 the compression type is absent, so bit 3 must be clear.
    assert_eq!(
        parse_err(&with_u32(&bytes, 100, 104)),
        HeaderError::CompressionBit {
            compression_type: 0,
            bit_set: true
        }
    );
}

/// Inserts `insert` at `at` and adds its length to header_length.
fn with_header_bytes(bytes: &[u8], at: usize, insert: &[u8]) -> Vec<u8> {
    let mut out = bytes[..at].to_vec();
    out.extend_from_slice(insert);
    out.extend_from_slice(&bytes[at..]);
    let length = u32::from_be_bytes(out[100..104].try_into().unwrap());
    with_u32(&out, 100, length + insert.len() as u32)
}

#[test]
fn unknown_header_bytes_are_kept() {
    let bytes = with_header_bytes(base(), 112, &[1, 2, 3, 4, 5, 6, 7, 8]);
    let header = parse_bytes(&bytes).unwrap();
    assert_eq!(header.header_length, 120);
    assert_eq!(header.unknown_header_bytes, [1, 2, 3, 4, 5, 6, 7, 8]);
    assert_eq!(header.extensions, [qemu_feature_table()]);
    let encoded = header.encode().unwrap();
    assert_eq!(encoded, bytes[..encoded.len()]);
    assert_eq!(parse_bytes(&encoded).unwrap(), header);
}

/// Appends one header extension as the spec lays it out: `u32 magic, u32 len, data`, the data
/// zero-padded to a multiple of 8 bytes. Built here, not with the encoder under test.
fn extension_bytes(out: &mut Vec<u8>, magic: u32, data: &[u8]) {
    out.extend_from_slice(&magic.to_be_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
    out.resize(out.len() + data.len().next_multiple_of(8) - data.len(), 0);
}

/// The base image with an unknown extension after the feature table (where QEMU puts them).
fn with_unknown_extension() -> Vec<u8> {
    // Feature table: 112 + 8 + 384 = 504; the end marker follows.
    let mut unknown = Vec::new();
    extension_bytes(&mut unknown, 0x1234_5678, b"hello");
    patched(base(), 504, &unknown)
}

#[test]
fn unknown_extension_round_trip() {
    let bytes = with_unknown_extension();
    let header = parse_bytes(&bytes).unwrap();
    let unknown = HeaderExtension {
        magic: 0x1234_5678,
        data: b"hello".to_vec(),
    };
    assert_eq!(header.extensions, [qemu_feature_table(), unknown.clone()]);
    let encoded = header.encode().unwrap();
    assert_eq!(encoded, bytes[..encoded.len()]);
    assert_eq!(parse_bytes(&encoded).unwrap(), header);

    // Adding a backing file keeps the unknown extension, after the QEMU-ordered known ones.
    let mut header = header;
    header.set_backing(Some("b.qcow2".to_string()), Some("raw".to_string()));
    let reparsed = parse_bytes(&header.encode().unwrap()).unwrap();
    assert_eq!(reparsed, header);
    let magics: Vec<u32> = reparsed.extensions.iter().map(|e| e.magic).collect();
    assert_eq!(
        magics,
        [ext::BACKING_FORMAT, ext::FEATURE_NAMES, 0x1234_5678]
    );
    assert_eq!(reparsed.backing_file.as_deref(), Some("b.qcow2"));
    assert_eq!(reparsed.backing_format.as_deref(), Some("raw"));
}

/// Writes `header` over cluster 0 of a copy of `image` and returns QEMU's view of the result.
fn qemu_info_after_rewrite(image: &[u8], header: &Header) -> serde_json::Value {
    let dir = tempfile::tempdir().unwrap();
    let mut bytes = image.to_vec();
    let encoded = header.encode().unwrap();
    bytes[..header.cluster_size() as usize].fill(0);
    bytes[..encoded.len()].copy_from_slice(&encoded);
    std::fs::write(dir.path().join("img.qcow2"), &bytes).unwrap();
    // `check` opens the backing file.
    qemu_img(
        dir.path(),
        &["create", "-q", "-f", "qcow2", "other.qcow2", "64M"],
    );
    qemu_img(dir.path(), &["check", "-q", "img.qcow2"]);
    qemu_img_json(dir.path(), &["info", "--output=json", "img.qcow2"])
}

/// Found by the `header` fuzz target: with a `header_length` that is not a multiple of 8,
/// extensions are padded from their own start (QEMU's layout), not to absolute 8-byte
/// boundaries; the rewrite used to leave every extension after the first where no reader
/// looks.
#[test]
fn odd_header_length_round_trip() {
    let bytes = with_header_bytes(&with_unknown_extension(), 112, &[1, 2, 3]);
    let header = parse_bytes(&bytes).unwrap();
    assert_eq!(header.header_length, 115);
    assert_eq!(header.unknown_header_bytes, [1, 2, 3]);
    assert_eq!(header.extensions.len(), 2, "{:?}", header.extensions);
    let encoded = header.encode().unwrap();
    assert_eq!(encoded, bytes[..encoded.len()]);
    assert_eq!(parse_bytes(&encoded).unwrap(), header);
    // QEMU reads the rewritten header the same way: the backing format (the first extension)
    // and the backing name, after the feature table and the unknown extension.
    let mut header = header;
    header.set_backing(Some("other.qcow2".to_string()), Some("qcow2".to_string()));
    assert_eq!(parse_bytes(&header.encode().unwrap()).unwrap(), header);
    // (Over the image without the inserted bytes, whose clusters are where its tables say.)
    let info = qemu_info_after_rewrite(&with_unknown_extension(), &header);
    assert_eq!(info["backing-filename"], "other.qcow2");
    assert_eq!(info["backing-filename-format"], "qcow2");
}

#[test]
fn qemu_reads_rewritten_headers() {
    let mut header = parse_bytes(&with_unknown_extension()).unwrap();
    header.set_backing(Some("other.qcow2".to_string()), Some("qcow2".to_string()));
    let info = qemu_info_after_rewrite(&with_unknown_extension(), &header);
    assert_eq!(info["backing-filename"], "other.qcow2");
    assert_eq!(info["backing-filename-format"], "qcow2");
    assert_eq!(info["virtual-size"], 64 * MIB);

    let mut header = parse_bytes(overlay()).unwrap();
    header.set_backing(None, None);
    assert_eq!(
        (header.backing_file_offset, header.backing_file_size),
        (0, 0)
    );
    let info = qemu_info_after_rewrite(overlay(), &header);
    assert!(info.get("backing-filename").is_none());
}

#[test]
fn encode_refuses_what_does_not_fit() {
    let bytes = create("cluster_size=512", &[]);
    let mut header = parse_bytes(&bytes).unwrap();
    header.set_backing(Some("x".repeat(1000)), None);
    assert_eq!(
        header.encode(),
        Err(HeaderError::DoesNotFit {
            needed: 112 + 8 + 1000,
            cluster_size: 512
        })
    );
    let mut header = parse_bytes(base()).unwrap();
    header.set_backing(Some("x".repeat(1024)), None);
    assert!(matches!(
        header.encode(),
        Err(HeaderError::BackingFileNameTooLong {
            size: 1024,
            max: 1023,
            ..
        })
    ));
    header.set_backing(
        Some("x".to_string()),
        Some("a-very-long-format".to_string()),
    );
    assert!(matches!(
        header.encode(),
        Err(HeaderError::BackingFormat { len: 18, .. })
    ));
}

#[test]
fn encode_refuses_v3_fields_in_v2() {
    let mut header = parse_bytes(&create("compat=0.10", &[])).unwrap();
    header.compatible_features = compatible::LAZY_REFCOUNTS;
    assert_eq!(
        header.encode(),
        Err(HeaderError::NotInVersion2 {
            field: "compatible_features",
            value: 1
        })
    );
}

// ---- bad-inputs.md, rows 1 to 23 ----

#[test]
fn row01_magic() {
    assert_eq!(
        parse_err(&patched(base(), 0, b"QFI\0")),
        HeaderError::BadMagic { found: 0x5146_4900 }
    );
    assert_eq!(parse_err(&[]), HeaderError::BadMagic { found: 0 });
}

#[test]
fn row02_version() {
    for version in [1, 4] {
        let error = parse_err(&with_u32(base(), 4, version));
        assert_eq!(error, HeaderError::UnsupportedVersion { version });
        assert_eq!(
            error.to_string(),
            format!("unsupported qcow2 version {version} (snapfs reads versions 2 and 3)")
        );
    }
}

#[test]
fn row03_cluster_bits() {
    for bits in [8, 22] {
        assert_eq!(
            parse_err(&with_u32(base(), 20, bits)),
            HeaderError::ClusterBits { bits }
        );
    }
}

#[test]
fn row04_header_length() {
    let error = parse_err(&with_u32(base(), 100, 0xffff_ffff));
    assert!(
        matches!(&error, HeaderError::HeaderLength { length: 0xffff_ffff, reason } if reason.contains("exceeds"))
    );
    let error = parse_err(&with_u32(base(), 100, 100));
    assert!(
        matches!(&error, HeaderError::HeaderLength { length: 100, reason } if reason.contains("too short"))
    );
}

#[test]
fn row05_unknown_incompatible_bit() {
    let error = parse_err(&with_u64(base(), 72, 1 << 63));
    assert_eq!(
        error,
        HeaderError::UnknownIncompatible {
            mask: 1 << 63,
            names: Vec::new(),
            unnamed: 1 << 63
        }
    );
    assert!(
        error
            .to_string()
            .contains("unknown incompatible feature: 8000000000000000")
    );

    // A feature table entry naming the bit gives the name instead. Entry 0 (dirty bit) becomes
    // incompatible bit 40, "time travel".
    let mut entry = [0u8; 48];
    entry[1] = 40;
    entry[2..13].copy_from_slice(b"time travel");
    let bytes = patched(base(), 120, &entry);
    let error = parse_err(&with_u64(&bytes, 72, 1 << 40 | 1 << 41));
    assert_eq!(
        error,
        HeaderError::UnknownIncompatible {
            mask: 1 << 40 | 1 << 41,
            names: vec!["time travel".to_string()],
            unnamed: 1 << 41
        }
    );
    assert_eq!(
        error.to_string(),
        "unsupported qcow2 feature(s): time travel, unknown incompatible feature: 20000000000"
    );
}

#[test]
fn row06_corrupt_bit_is_not_a_parse_error() {
    let header = parse_bytes(&with_u64(base(), 72, incompatible::CORRUPT)).unwrap();
    assert!(header.is_corrupt());
    assert!(!header.is_dirty());
    let header = parse_bytes(&with_u64(base(), 72, incompatible::DIRTY)).unwrap();
    assert!(header.is_dirty());
}

#[test]
fn row07_compression_type() {
    assert_eq!(
        parse_err(&patched(base(), 104, &[1])),
        HeaderError::CompressionBit {
            compression_type: 1,
            bit_set: false
        }
    );
    assert_eq!(
        parse_err(&patched(base(), 104, &[7])),
        HeaderError::UnknownCompressionType { value: 7 }
    );
    let error = parse_err(&with_u64(base(), 72, incompatible::COMPRESSION_TYPE));
    assert_eq!(
        error,
        HeaderError::CompressionBit {
            compression_type: 0,
            bit_set: true
        }
    );
    assert!(error.to_string().contains("must not be set"));
}

#[test]
fn row08_extended_l2_with_512_byte_clusters() {
    let bytes = create("cluster_size=512", &[]);
    assert_eq!(
        parse_err(&with_u64(&bytes, 72, incompatible::EXTENDED_L2)),
        HeaderError::SubclusterSize {
            cluster_size: 512,
            subcluster_size: 16
        }
    );
}

#[test]
fn row09_refcount_order() {
    assert_eq!(
        parse_err(&with_u32(base(), 96, 7)),
        HeaderError::RefcountOrder { order: 7 }
    );
}

#[test]
fn row10_backing_file_offset() {
    assert_eq!(
        parse_err(&with_u64(base(), 8, u64::MAX)),
        HeaderError::BackingFileOffset {
            offset: u64::MAX,
            cluster_size: 65536
        }
    );
}

#[test]
fn row11_backing_file_name_too_long() {
    let bytes = with_u64(base(), 8, 0x1000);
    assert_eq!(
        parse_err(&with_u32(&bytes, 16, 0xffff_ffff)),
        HeaderError::BackingFileNameTooLong {
            offset: 0x1000,
            size: 0xffff_ffff,
            max: 1023
        }
    );
}

#[test]
fn row12_extension_too_large() {
    assert_eq!(
        parse_err(&with_u32(base(), 116, 0x7fff_ffff)),
        HeaderError::ExtensionTooLarge {
            magic: ext::FEATURE_NAMES,
            offset: 112,
            len: 0x7fff_ffff,
            area_end: 65536
        }
    );
    // The area ends at the backing file name.
    let bytes = with_u32(overlay(), 0x74, 0x210);
    assert!(matches!(
        parse_err(&bytes),
        HeaderError::ExtensionTooLarge {
            area_end: 0x210,
            ..
        }
    ));
}

#[test]
fn row13_backing_format_too_long() {
    let error = parse_err(&with_u32(overlay(), 0x74, 64));
    assert!(matches!(error, HeaderError::BackingFormat { len: 64, .. }));
    assert!(error.to_string().contains("length 64"));
}

#[test]
fn row14_refcount_table_clusters() {
    assert_eq!(
        parse_err(&with_u32(base(), 56, 0xffff_ffff)),
        HeaderError::TableTooLarge {
            table: "reference count table",
            field: "refcount_table_clusters",
            value: 0xffff_ffff,
            max: 128
        }
    );
    assert_eq!(
        parse_err(&with_u32(base(), 56, 0)),
        HeaderError::NoRefcountTable
    );
}

#[test]
fn row15_refcount_table_offset() {
    assert_eq!(
        parse_err(&with_u64(base(), 48, 0x1234_5678_90ab_cdef)),
        HeaderError::TableOffset {
            table: "reference count table",
            offset: 0x1234_5678_90ab_cdef,
            reason: "it is not aligned to the cluster size"
        }
    );
    // Aligned, but the table would end past i64::MAX.
    let offset = 0x7fff_ffff_ffff_0000;
    assert!(matches!(
        parse_err(&with_u64(base(), 48, offset)),
        HeaderError::TableOffset { table: "reference count table", offset: o, .. } if o == offset
    ));
}

#[test]
fn row16_nb_snapshots() {
    assert_eq!(
        parse_err(&with_u32(base(), 60, 0xffff_ffff)),
        HeaderError::TableTooLarge {
            table: "snapshot table",
            field: "nb_snapshots",
            value: 0xffff_ffff,
            max: 65536
        }
    );
    // 65536 snapshots are allowed (at a place other than the header).
    let many = with_u32(base(), 60, 65536);
    assert!(parse_bytes(&with_u64(&many, 64, 0x50000)).is_ok());
}

#[test]
fn row17_snapshots_offset_unaligned() {
    assert!(matches!(
        parse_err(&with_u64(base(), 64, 0x1234)),
        HeaderError::TableOffset {
            table: "snapshot table",
            offset: 0x1234,
            ..
        }
    ));
}

#[test]
fn row18_l1_size() {
    assert_eq!(
        parse_err(&with_u32(base(), 36, 0xffff_ffff)),
        HeaderError::TableTooLarge {
            table: "active L1 table",
            field: "l1_size",
            value: 0xffff_ffff,
            max: 4 * MIB
        }
    );
    assert_eq!(
        parse_err(&with_u32(base(), 36, 0)),
        HeaderError::L1TooSmall {
            l1_size: 0,
            size: 64 * MIB,
            needed: 1
        }
    );
}

#[test]
fn row18_l1_size_with_extended_l2() {
    // 16-byte L2 entries: one L1 entry maps 256 MiB instead of 512 MiB.
    let bytes = with_u64(&create("extended_l2=on", &[]), 24, 512 * MIB);
    assert_eq!(
        parse_err(&bytes),
        HeaderError::L1TooSmall {
            l1_size: 1,
            size: 512 * MIB,
            needed: 2
        }
    );
    assert!(parse_bytes(&with_u64(base(), 24, 512 * MIB)).is_ok());
}

#[test]
fn row19_l1_table_offset_unaligned() {
    assert!(matches!(
        parse_err(&with_u64(base(), 40, 0x30001)),
        HeaderError::TableOffset {
            table: "active L1 table",
            offset: 0x30001,
            ..
        }
    ));
}

#[test]
fn tables_at_the_header_are_refused() {
    for (at, table) in [(40, "active L1 table"), (48, "reference count table")] {
        let e = parse_err(&with_u64(base(), at, 0));
        assert!(
            matches!(e, HeaderError::TableOffset { table: t, offset: 0, .. } if t == table),
            "{e:?}"
        );
        assert!(e.to_string().contains("header (cluster 0)"), "{e}");
    }
    // The snapshot table only when it has entries (nb_snapshots = 0 at offset 0 is normal).
    let with_snapshots = with_u32(base(), 60, 1);
    let e = parse_err(&with_u64(&with_snapshots, 64, 0));
    assert!(e.to_string().contains("snapshot table offset 0x0"), "{e}");
    assert!(parse_bytes(&with_u64(base(), 64, 0)).is_ok());
    // An empty active L1 table may be anywhere aligned (a 0-byte disk).
    let empty = with_u64(&with_u32(base(), 36, 0), 24, 0);
    assert!(parse_bytes(&with_u64(&empty, 40, 0)).is_ok());
}

#[test]
fn row20_image_too_big() {
    // 64 KiB clusters: one L1 entry maps 2^29 bytes, so 2^62 needs 2^33 entries.
    assert_eq!(
        parse_err(&with_u64(base(), 24, 1 << 62)),
        HeaderError::ImageTooBig {
            size: 1 << 62,
            l1_entries: 1 << 33
        }
    );
    assert!(matches!(
        parse_err(&with_u64(&create("cluster_size=2M", &[]), 24, u64::MAX)),
        HeaderError::ImageTooBig { size: u64::MAX, .. }
    ));
}

#[test]
fn row21_crypt_method() {
    assert_eq!(
        parse_err(&with_u32(base(), 32, 2)),
        HeaderError::MissingCryptoHeader { method: 2 }
    );
    assert_eq!(
        parse_err(&with_u32(base(), 32, 9)),
        HeaderError::EncryptionMethod { method: 9 }
    );
    assert_eq!(
        parse_err(&with_u32(base(), 32, 1)),
        HeaderError::Encrypted {
            method: 1,
            name: "AES"
        }
    );
}

#[test]
fn row22_external_data_file() {
    let error = parse_err(&with_u64(base(), 72, incompatible::EXTERNAL_DATA_FILE));
    assert_eq!(error, HeaderError::ExternalDataFile { name: None });
    assert!(error.to_string().contains("'data-file' is required"));
    assert_eq!(
        parse_err(&with_u64(base(), 88, autoclear::DATA_FILE_RAW)),
        HeaderError::DataFileRawWithoutDataFile {
            autoclear: autoclear::DATA_FILE_RAW
        }
    );
}

#[test]
fn row23_bitmaps_extension_with_zero_bitmaps() {
    let dir = tempfile::tempdir().unwrap();
    qemu_img(
        dir.path(),
        &["create", "-q", "-f", "qcow2", "img.qcow2", "64M"],
    );
    qemu_img(dir.path(), &["bitmap", "--add", "img.qcow2", "b0"]);
    let bytes = read(dir.path(), "img.qcow2");
    // Feature table ends at 504: the bitmaps extension's data starts at 512.
    assert_eq!(
        u32::from_be_bytes(bytes[504..508].try_into().unwrap()),
        ext::BITMAPS
    );
    let error = parse_err(&with_u32(&bytes, 512, 0));
    assert!(matches!(
        error,
        HeaderError::BitmapsExtension {
            field: "nb_bitmaps",
            value: 0,
            ..
        }
    ));
    assert!(error.to_string().contains("zero bitmaps"));
    assert!(matches!(
        parse_err(&with_u64(&bytes, 528, 0x1234)),
        HeaderError::BitmapsExtension {
            field: "bitmap_directory_offset",
            ..
        }
    ));
    assert!(matches!(
        parse_err(&with_u32(&bytes, 516, 1)),
        HeaderError::BitmapsExtension {
            field: "reserved",
            ..
        }
    ));
}

// ---- Backing file name ----

#[test]
fn backing_file_name_must_be_utf8_without_nul() {
    let error = parse_err(&patched(overlay(), 0x210, &[0xff]));
    assert!(
        matches!(&error, HeaderError::BackingFileName { offset: 0x210, size: 10, reason } if reason.contains("UTF-8"))
    );
    let error = parse_err(&patched(overlay(), 0x211, &[0]));
    assert!(
        matches!(&error, HeaderError::BackingFileName { reason, .. } if reason.contains("NUL"))
    );
}

#[test]
fn backing_file_name_past_end_of_file() {
    let bytes = &overlay()[..0x215];
    assert!(matches!(
        parse_err(bytes),
        HeaderError::BackingFileName {
            offset: 0x210,
            size: 10,
            ..
        }
    ));
}

#[test]
fn crypto_extension_without_luks() {
    let mut fde = Vec::new();
    extension_bytes(&mut fde, ext::FULL_DISK_ENCRYPTION, &[0; 16]);
    let bytes = patched(base(), 504, &fde);
    assert!(matches!(
        parse_err(&bytes),
        HeaderError::CryptoExtension { .. }
    ));
}

#[test]
fn every_message_is_one_line() {
    let errors = [
        HeaderError::UnknownIncompatible {
            mask: 3 << 5,
            names: vec!["a".into(), "b".into()],
            unnamed: 0,
        },
        HeaderError::ExternalDataFile {
            name: Some("d".into()),
        },
        HeaderError::CompressionBit {
            compression_type: 1,
            bit_set: false,
        },
    ];
    for error in errors {
        assert!(!error.to_string().contains('\n'));
    }
}

// ---- Hostile input never panics ----

/// Offsets and widths of the header fields, for targeted mutations.
const FIELDS: [(usize, usize); 19] = [
    (0, 4),
    (4, 4),
    (8, 8),
    (16, 4),
    (20, 4),
    (24, 8),
    (32, 4),
    (36, 4),
    (40, 8),
    (48, 8),
    (56, 4),
    (60, 4),
    (64, 8),
    (72, 8),
    (80, 8),
    (88, 8),
    (96, 4),
    (100, 4),
    (104, 1),
];

fn exercise(bytes: &[u8]) {
    if let Ok(header) = parse_bytes(bytes) {
        if let Ok(encoded) = header.encode() {
            parse_bytes(&encoded).unwrap();
        }
    }
}

proptest! {
    #[test]
    fn random_byte_mutations_never_panic(
        use_overlay in any::<bool>(),
        bytes in proptest::collection::vec((0usize..1024, any::<u8>()), 1..16),
    ) {
        let mut image = if use_overlay { overlay() } else { base() }[..65536].to_vec();
        for (offset, value) in bytes {
            image[offset] = value;
        }
        exercise(&image);
    }

    #[test]
    fn random_field_values_never_panic(
        fields in proptest::collection::vec((0usize..FIELDS.len(), any::<u64>()), 1..6),
        truncate in prop_oneof![Just(usize::MAX), 0usize..1024],
    ) {
        let mut image = overlay()[..65536].to_vec();
        for (field, value) in fields {
            let (offset, width) = FIELDS[field];
            image[offset..offset + width].copy_from_slice(&value.to_be_bytes()[8 - width..]);
        }
        image.truncate(truncate);
        exercise(&image);
    }

    #[test]
    fn random_extension_area_never_panics(
        area in proptest::collection::vec(any::<u8>(), 0..600),
        backing_offset in prop_oneof![Just(0u64), 0u64..2048],
        backing_size in 0u32..2048,
    ) {
        let mut image = base()[..65536].to_vec();
        image[112..112 + area.len()].copy_from_slice(&area);
        image[8..16].copy_from_slice(&backing_offset.to_be_bytes());
        image[16..20].copy_from_slice(&backing_size.to_be_bytes());
        exercise(&image);
    }
}
