//! Self-tests of the test helpers (no mount): a helper that silently passed would make every
//! oracle test worthless.

use std::fs;

use crate::common::*;

#[test]
fn compare_files_finds_the_first_difference() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a");
    let b = dir.path().join("b");
    let mut data = vec![7u8; 3 << 20];
    fs::write(&a, &data).unwrap();
    fs::write(&b, &data).unwrap();
    assert!(compare_files(&a, &b).is_ok());
    data[(1 << 20) + 5] = 8;
    data[(2 << 20) + 9] = 9;
    fs::write(&b, &data).unwrap();
    let e = compare_files(&a, &b).unwrap_err();
    assert!(e.contains("0x100005"), "{e}");
    fs::write(&b, &data[..100]).unwrap();
    assert!(compare_files(&a, &b).unwrap_err().contains("sizes differ"));
}

#[test]
fn ranges_merge_and_subtract() {
    let r = merge_ranges(vec![(10, 20), (0, 5), (5, 8), (15, 30), (40, 40)]);
    assert_eq!(r, vec![(0, 8), (10, 30)]);
    assert_eq!(ranges_total(&r), 28);
    assert_eq!(ranges_minus(&r, &vec![(2, 12)]), vec![(0, 2), (12, 30)]);
    assert!(describe_ranges_diff("a", &r, "b", &r).is_none());
    assert!(describe_ranges_diff("a", &r, "b", &vec![(0, 8)]).is_some());
}

#[test]
fn seek_walk_and_qemu_map_agree_on_a_sparse_file() {
    let dir = workdir();
    let f = dir.path().join("sparse.raw");
    let file = fs::File::create(&f).unwrap();
    file.set_len(64 * MIB).unwrap();
    drop(file);
    qemu_io(&f, &["write -P 0x11 1M 1M", "write -P 0x22 40M 64k"]);
    let seek = seek_data_ranges(&f);
    let map = qemu_map_data(&f);
    assert_eq!(seek, map);
    assert_eq!(ranges_total(&seek), MIB + 64 * KIB);
}

#[test]
fn rfc3339_parsing() {
    assert_eq!(
        parse_rfc3339("2001-09-09T01:46:40Z"),
        Some((1_000_000_000, 0))
    );
    assert_eq!(
        parse_rfc3339("2001-09-09T03:46:40.5+02:00"),
        Some((1_000_000_000, 500_000_000))
    );
    assert_eq!(parse_rfc3339("1970-01-01T00:00:00Z"), Some((0, 0)));
    assert_eq!(parse_rfc3339("2001-09-09 01:46:40"), None);
}

#[test]
fn oracle_snapshot_size_follows_the_snapshot() {
    let dir = workdir();
    let img = dir.path().join("r.qcow2");
    create_qcow2(&img, 16 * MIB, "", None);
    snapshot_create(&img, "small");
    qemu_img(&["resize", "-q", img.to_str().unwrap(), "32M"]);
    let s = snapshot_by_name(&img, "small");
    let raw = convert_snapshot_to_raw(&img, &s.id);
    assert_eq!(fs::metadata(raw).unwrap().len(), 16 * MIB);
}
