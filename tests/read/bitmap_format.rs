//! The bitmap format module (src/qcow2/bitmap) through its public API: directory parsing with
//! QEMU's rules, the entry constraints, table entries, the in-memory bitmap against a simple
//! model (property tests), and loading what qemu-img wrote.

use std::ops::Range;

use proptest::prelude::*;
use snapfs::qcow2::bitmap::{
    BitmapEntry, BitmapError, Directory, DirtyBitmap, EntryProblem, Flags, ImageLayout, Role,
    StoredChunk, TableEntry, TableEntryProblem, load_bitmap, stored_chunks, table_size_for,
};
use snapfs::qcow2::header::Header;

use crate::common::{self, qemu_img, qemu_io};

fn entry(name: &str) -> BitmapEntry {
    BitmapEntry {
        table_offset: 0x10000,
        table_size: 1,
        flags: Flags(Flags::AUTO),
        kind: 1,
        granularity_bits: 16,
        name: name.as_bytes().to_vec(),
        extra_data: Vec::new(),
    }
}

fn layout() -> ImageLayout {
    ImageLayout {
        cluster_bits: 16,
        virtual_size: 1 << 30,
        file_len: 1 << 20,
    }
}

#[test]
fn directory_refusals_name_the_problem() {
    let dir = Directory {
        entries: vec![entry("a"), entry("bb")],
    };
    let bytes = dir.encode().unwrap();
    assert_eq!(Directory::parse(&bytes, 2).unwrap(), dir);
    // Fewer and more entries than the header extension says.
    assert!(matches!(
        Directory::parse(&bytes, 3),
        Err(BitmapError::FewerEntriesThanHeader {
            found: 2,
            nb_bitmaps: 3
        })
    ));
    assert!(matches!(
        Directory::parse(&bytes, 1),
        Err(BitmapError::MoreEntriesThanHeader { nb_bitmaps: 1 })
    ));
    // A truncated entry.
    let err = Directory::parse(&bytes[..bytes.len() - 8], 2).unwrap_err();
    assert!(
        matches!(err, BitmapError::BrokenDirectory { index: 1, .. }),
        "{err}"
    );
    // A name_size that runs past the end.
    let mut long = bytes.clone();
    long[18..20].copy_from_slice(&1000u16.to_be_bytes());
    let err = Directory::parse(&long, 2).unwrap_err();
    assert!(err.to_string().contains("name_size = 1000"), "{err}");
    // Two entries of the same name.
    let same = Directory {
        entries: vec![entry("x"), entry("x")],
    };
    let err = Directory::parse(&same.encode().unwrap(), 2).unwrap_err();
    assert!(matches!(err, BitmapError::DuplicateName { .. }), "{err}");
}

/// A change that breaks one rule.
type EntryChange = dyn Fn(&mut BitmapEntry);

#[test]
fn constraints_follow_qemu() {
    let l = layout();
    // 1 GiB at 64 KiB granularity: 16384 bits, 2048 bytes, one 64 KiB cluster.
    assert_eq!(table_size_for(l.virtual_size, 16, l.cluster_bits), 1);
    assert_eq!(entry("ok").check(&l), Ok(()));
    assert_eq!(Role::of(&entry("ok"), &l), Role::Recording);
    let cases: Vec<(Box<EntryChange>, &str)> = vec![
        (Box::new(|e| e.table_size = 0), "bitmap_table_size = 0"),
        (Box::new(|e| e.table_offset = 0), "bitmap_table_offset = 0"),
        (Box::new(|e| e.table_offset = 0x10200), "not a multiple"),
        (Box::new(|e| e.granularity_bits = 8), "granularity_bits = 8"),
        (
            Box::new(|e| e.granularity_bits = 32),
            "granularity_bits = 32",
        ),
        (
            Box::new(|e| e.flags = Flags(Flags::AUTO | Flags::EXTRA_DATA_COMPATIBLE)),
            "reserved bits",
        ),
        (Box::new(|e| e.kind = 2), "type = 2"),
        (Box::new(|e| e.name = vec![b'n'; 1024]), "name_size = 1024"),
        (Box::new(|e| e.name.clear()), "name_size = 0"),
        (
            Box::new(|e| e.extra_data = vec![0; 8]),
            "extra_data_size = 8",
        ),
        (Box::new(|e| e.table_size = 2), "needs exactly 1"),
        (Box::new(|e| e.granularity_bits = 9), "less than the disk"),
        (
            Box::new(|e| e.table_offset = 1 << 20),
            "past the end of the file",
        ),
    ];
    for (change, expected) in cases {
        let mut e = entry("bad");
        change(&mut e);
        let problem = e.check(&l).unwrap_err();
        assert!(
            problem.to_string().contains(expected),
            "{problem} / {expected}"
        );
        assert_eq!(Role::of(&e, &l), Role::Unusable(problem));
    }
    // An in_use bitmap need not match the disk size (QEMU: "not correctly saved after resize").
    let mut e = entry("stale");
    e.flags = Flags(Flags::AUTO | Flags::IN_USE);
    e.table_size = 2;
    assert_eq!(e.check(&l), Ok(()));
    assert_eq!(Role::of(&e, &l), Role::Inconsistent);
    // Disabled.
    let mut e = entry("off");
    e.flags = Flags(0);
    assert_eq!(Role::of(&e, &l), Role::Disabled);
}

#[test]
fn roles_decide_the_flags_written() {
    let l = layout();
    let auto = Flags(Flags::AUTO);
    assert_eq!(
        Role::Recording.flags_at_first_change(auto),
        Flags(Flags::AUTO | Flags::IN_USE)
    );
    assert_eq!(Role::Recording.flags_at_clean_close(auto), auto);
    assert_eq!(Role::Disabled.flags_at_first_change(Flags(0)), Flags(0));
    let mut odd = entry("odd");
    odd.flags = Flags(Flags::AUTO | 1 << 7);
    let role = Role::of(&odd, &l);
    assert!(matches!(
        role,
        Role::Unusable(EntryProblem::ReservedFlags { .. })
    ));
    // Unknown flags: left as they are, except that the claim "auto and consistent" is withdrawn.
    assert_eq!(
        role.flags_at_clean_close(odd.flags),
        Flags(Flags::AUTO | Flags::IN_USE | 1 << 7)
    );
}

#[test]
fn table_entries_are_checked() {
    let l = layout();
    let decode = |raw| TableEntry::decode(raw, &l);
    assert_eq!(decode(0), Ok(TableEntry::Zeros));
    assert_eq!(decode(1), Ok(TableEntry::Ones));
    assert!(matches!(decode(0x10000), Ok(TableEntry::Data(_))));
    assert!(matches!(
        decode(1 << 60),
        Err(TableEntryProblem::ReservedBits { .. })
    ));
    assert!(matches!(
        decode(2),
        Err(TableEntryProblem::ReservedBits { .. })
    ));
    assert_eq!(decode(0x10001), Err(TableEntryProblem::OnesWithOffset));
    assert!(matches!(
        decode(0x10200),
        Err(TableEntryProblem::Unaligned { .. })
    ));
    assert!(matches!(
        decode(0x100000),
        Err(TableEntryProblem::OutsideFile { .. })
    ));
    for raw in [0u64, 1, 0x10000] {
        assert_eq!(decode(raw).unwrap().encode(), raw);
    }
}

/// The model: one bool per granule.
fn model_ranges(bits: &[bool], granularity: u64, disk_size: u64) -> Vec<Range<u64>> {
    let mut out: Vec<Range<u64>> = Vec::new();
    for (g, set) in bits.iter().enumerate() {
        if !set {
            continue;
        }
        let start = g as u64 * granularity;
        let end = (start + granularity).min(disk_size);
        match out.last_mut() {
            Some(last) if last.end == start => last.end = end,
            _ => out.push(start..end),
        }
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    /// set_range, dirty_ranges, next_dirty/next_clean, resize and the stored chunks agree with a
    /// per-granule model.
    #[test]
    fn bitmap_matches_model(
        sectors in 1u64..5000,
        granularity_bits in 9u32..14,
        ops in prop::collection::vec((0u64..3_000_000, 0u64..40_000), 0..20),
        new_sectors in 1u64..6000,
        cluster_bits in 9u32..13,
        probe in 0u64..3_000_000,
    ) {
        let disk = sectors * 512;
        let gran = 1u64 << granularity_bits;
        let mut b = DirtyBitmap::new(disk, granularity_bits).unwrap();
        let mut model = vec![false; disk.div_ceil(gran) as usize];
        for (offset, len) in ops {
            b.set_range(offset, len);
            let end = (offset + len).min(disk);
            if offset < end {
                for g in offset / gran..=(end - 1) / gran {
                    model[g as usize] = true;
                }
            }
        }
        let expected = model_ranges(&model, gran, disk);
        prop_assert_eq!(b.dirty_ranges().collect::<Vec<_>>(), expected.clone());
        prop_assert_eq!(b.dirty_bytes(), expected.iter().map(|r| r.end - r.start).sum::<u64>());
        let next = expected.iter().find(|r| r.end > probe).map(|r| r.start.max(probe));
        prop_assert_eq!(b.next_dirty(probe), next);
        if b.is_dirty(probe) {
            let r = expected.iter().find(|r| r.contains(&probe)).unwrap();
            prop_assert_eq!(b.next_clean(probe), r.end);
        }

        // Stored chunks give back exactly the bytes, and clean clusters are not written.
        let chunks = stored_chunks(&b, cluster_bits).unwrap();
        prop_assert_eq!(chunks.len() as u64, table_size_for(disk, granularity_bits, cluster_bits));
        let mut bytes = Vec::new();
        for c in &chunks {
            match c {
                StoredChunk::Zeros => {
                    let n = (1usize << cluster_bits).min(b.bytes().len() - bytes.len());
                    bytes.resize(bytes.len() + n, 0);
                }
                StoredChunk::Data(d) => {
                    prop_assert!(d.iter().any(|x| *x != 0));
                    bytes.extend_from_slice(d);
                }
            }
        }
        prop_assert_eq!(&bytes[..], b.bytes());

        // Resize: the kept part stays, a grown part is clean.
        let new_disk = new_sectors * 512;
        let mut resized = b.clone();
        resized.resize(new_disk).unwrap();
        model.resize(new_disk.div_ceil(gran) as usize, false);
        // A granule that straddled the old end keeps its bit.
        prop_assert_eq!(resized.dirty_ranges().collect::<Vec<_>>(), model_ranges(&model, gran, new_disk));

        // Merge into a coarser bitmap marks whole coarse granules.
        let mut coarse = DirtyBitmap::new(disk, granularity_bits + 1).unwrap();
        coarse.merge(&b).unwrap();
        for r in b.dirty_ranges() {
            prop_assert!(coarse.is_dirty(r.start) && coarse.is_dirty(r.end - 1));
        }
        prop_assert!(coarse.dirty_bytes() >= b.dirty_bytes());
        let other = DirtyBitmap::new(disk + 512, granularity_bits).unwrap();
        let merged = coarse.merge(&other);
        let mismatch = matches!(merged, Err(BitmapError::SizeMismatch { .. }));
        prop_assert!(mismatch);
    }

    /// What encodes parses back equal, whatever the names, flags and extra data.
    #[test]
    fn directory_round_trip(
        entries in prop::collection::vec(
            (any::<u64>(), any::<u32>(), any::<u32>(), any::<u8>(), any::<u8>(),
             prop::collection::vec(any::<u8>(), 1..40), prop::collection::vec(any::<u8>(), 0..20)),
            1..8),
    ) {
        let mut seen = std::collections::HashSet::new();
        let entries: Vec<BitmapEntry> = entries
            .into_iter()
            .filter(|e| seen.insert(e.5.clone()))
            .map(|(table_offset, table_size, flags, kind, granularity_bits, name, extra_data)| {
                BitmapEntry { table_offset, table_size, flags: Flags(flags), kind, granularity_bits, name, extra_data }
            })
            .collect();
        let dir = Directory { entries };
        let bytes = dir.encode().unwrap();
        prop_assert_eq!(bytes.len() % 8, 0);
        prop_assert_eq!(bytes.len() as u64, dir.encoded_len());
        prop_assert_eq!(Directory::parse(&bytes, dir.entries.len() as u32).unwrap(), dir);
    }
}

/// Loads the bitmap qemu-img and qemu-io wrote: the granules of the writes are set, nothing else.
#[test]
fn loads_what_qemu_wrote() {
    common::require_env();
    let dir = common::workdir();
    for (cluster_size, granularity) in [(65536u64, 65536u64), (512, 4096), (4096, 512)] {
        let image = dir
            .path()
            .join(format!("bm-{cluster_size}-{granularity}.qcow2"));
        common::create_qcow2(
            &image,
            16 << 20,
            &format!("cluster_size={cluster_size}"),
            None,
        );
        qemu_img(&[
            "bitmap",
            "--add",
            "-g",
            &granularity.to_string(),
            image.to_str().unwrap(),
            "chk",
        ]);
        qemu_io(&image, &["write 3M 4k", "write 10M 1", "write 15M 1M"]);
        let file = std::fs::File::open(&image).unwrap();
        let len = file.metadata().unwrap().len();
        let mut head = vec![0u8; len.min(1 << 20) as usize];
        std::os::unix::fs::FileExt::read_exact_at(&file, &mut head, 0).unwrap();
        let header = Header::parse(&head, len).unwrap();
        let ext = header.bitmaps.expect("qemu-img wrote a bitmaps extension");
        let layout = ImageLayout::of(&header, len);
        let directory = Directory::read(&file, &ext, &layout).unwrap();
        assert_eq!(directory.entries.len(), 1);
        let e = &directory.entries[0];
        assert_eq!(Role::of(e, &layout), Role::Recording);
        let bitmap = load_bitmap(&file, e, &layout).unwrap();
        let g = granularity;
        let up = |x: u64| x.div_ceil(g) * g;
        let down = |x: u64| x / g * g;
        let expected = vec![
            down(3 << 20)..up((3 << 20) + 4096),
            down(10 << 20)..up((10 << 20) + 1),
            down(15 << 20)..(16 << 20),
        ];
        assert_eq!(
            bitmap.dirty_ranges().collect::<Vec<_>>(),
            expected,
            "{image:?}"
        );
    }
}
