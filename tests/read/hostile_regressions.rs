//! Fuzzing regressions: every committed fuzz input — the seeds (fuzz/corpus-seeds/TARGET/) and
//! the inputs that once crashed a target (fuzz/regressions/TARGET/) — replayed through the very
//! checks the cargo-fuzz targets run (fuzz/checks.rs), so that `cargo test` guards what fuzzing
//! found without cargo-fuzz or nightly features. Crash inputs also get a named test below that
//! asserts the error snapfs now gives.

#[path = "../../fuzz/checks.rs"]
mod checks;

use std::path::{Path, PathBuf};

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz")
}

/// The files of `fuzz/KIND/TARGET/`, sorted.
fn inputs(kind: &str, target: &str) -> Vec<PathBuf> {
    let dir = fuzz_dir().join(kind).join(target);
    let mut files: Vec<PathBuf> = match std::fs::read_dir(&dir) {
        Ok(d) => d
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.is_file())
            .collect(),
        Err(_) => Vec::new(),
    };
    files.sort();
    files
}

/// Runs every committed input of every target; a panic names the input.
#[test]
fn replay_seeds_and_regressions() {
    let work = tempfile::tempdir().unwrap();
    checks::prepare_image_dir(work.path());
    let mut ran = 0;
    for (target, check) in checks::TARGETS {
        for kind in ["corpus-seeds", "regressions"] {
            for file in inputs(kind, target) {
                let data = std::fs::read(&file).unwrap();
                let outcome = std::panic::catch_unwind(|| {
                    if target == "image_read" {
                        checks::image_read_in(work.path(), &data)
                    } else {
                        check(&data)
                    }
                });
                assert!(
                    outcome.is_ok(),
                    "fuzz target {target} panics on {}",
                    file.display()
                );
                ran += 1;
            }
        }
    }
    assert!(
        inputs("corpus-seeds", "header").len() >= 5,
        "the seed corpus is missing from {}",
        fuzz_dir().display()
    );
    eprintln!("replayed {ran} fuzz inputs");
}

/// Found by `l2_decode` (a timeout): mapping a range of 2^62 bytes over 512-byte clusters walked
/// the missing L1 entries past the end of the table one by one, 2^47 steps. Now the rest of the
/// range is unallocated in one step (`mapping.rs`, test `huge_unallocated_ranges_map_in_one_step`).
#[test]
fn l2_decode_huge_unallocated_range_is_quick() {
    let data =
        std::fs::read(fuzz_dir().join("regressions/l2_decode/timeout-huge-unallocated-range"))
            .unwrap();
    let start = std::time::Instant::now();
    checks::l2_decode(&data);
    assert!(
        start.elapsed() < std::time::Duration::from_secs(5),
        "took {:?}",
        start.elapsed()
    );
}

/// Found by `l2_decode` (a timeout): a run of 2^18 unallocated entries followed by an unaligned
/// L1 entry failed as a whole, so walking the disk re-walked the run at every step. Now the run is
/// returned and the next call fails at the damage (`mapping.rs`, test
/// `damage_ends_a_run_and_fails_where_it_starts`).
#[test]
fn l2_decode_damage_after_a_long_run_is_quick() {
    let data = std::fs::read(fuzz_dir().join("regressions/l2_decode/timeout-rewalk-before-damage"))
        .unwrap();
    let start = std::time::Instant::now();
    checks::l2_decode(&data);
    assert!(
        start.elapsed() < std::time::Duration::from_secs(5),
        "took {:?}",
        start.elapsed()
    );
}

/// Found by `header`: with unknown header bytes of odd length (header_length 145), the rewritten
/// header put every extension after the first at an absolute 8-byte boundary, where QEMU and
/// snapfs do not look (`header.rs`, test `odd_header_length_round_trip`).
#[test]
fn header_with_odd_header_length_round_trips() {
    let data =
        std::fs::read(fuzz_dir().join("regressions/header/crash-odd-header-length-extensions"))
            .unwrap();
    checks::header(&data);
    let header = snapfs::qcow2::header::Header::parse(&data, data.len() as u64).unwrap();
    assert_eq!(header.header_length, 145);
    let encoded = header.encode().unwrap();
    let again = snapfs::qcow2::header::Header::parse(&encoded, encoded.len() as u64).unwrap();
    assert_eq!(again.extensions, header.extensions);
}

/// Found by `bitmap_directory`: an empty directory with nb_bitmaps = 0 parsed into no entries,
/// which the encoder (rightly) refuses; parsing now refuses it as the header extension does.
#[test]
fn empty_bitmap_directory_is_refused() {
    let data =
        std::fs::read(fuzz_dir().join("regressions/bitmap_directory/empty-directory")).unwrap();
    checks::bitmap_directory(&data);
    let err = snapfs::qcow2::bitmap::Directory::parse(&[], 0).unwrap_err();
    assert!(
        matches!(err, snapfs::qcow2::bitmap::BitmapError::EmptyDirectory),
        "{err}"
    );
}
