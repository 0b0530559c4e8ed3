//! Header feature bits and read-only mounts: an image with the dirty or the corrupt bit mounts
//! read-only (with a message saying why) and is left untouched; `-r` refuses writes and leaves
//! the image byte-identical; unknown autoclear bits are cleared by the first write of a
//! read-write mount (QEMU clears them at a read-write open; snapfs waits for a write, so that a
//! mount that only reads changes nothing) and kept by a read-only one.

use std::fs::{self, OpenOptions};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::common::write_support::*;
use crate::common::*;

const IO_LIMIT: Duration = Duration::from_secs(60);

/// Header offsets (qcow2 v3).
const INCOMPATIBLE: u64 = 72;
const AUTOCLEAR: u64 = 88;

fn image_with_data(dir: &Path, opts: &str) -> PathBuf {
    let img = dir.join("flags.qcow2");
    create_qcow2(&img, 16 * MIB, opts, None);
    crate::common::images::fill(&img, 64 * KIB, 16 * MIB, 1, None);
    img
}

fn set_bits(img: &Path, field: u64, bits: u64) {
    let v = read_be_u64(img, field);
    write_be_u64(img, field, v | bits);
}

fn errno_of(r: std::io::Result<fs::File>) -> Option<i32> {
    r.err().and_then(|e| e.raw_os_error())
}

/// What a mount that must be read-only does wrong: opening live.raw for writing (O_WRONLY,
/// O_RDWR) and truncate(2) must fail with EROFS; live.raw reads the image's content.
fn read_only_problems(m: &Mount, oracle: &Path) -> Vec<String> {
    let live = m.live();
    let mut problems = Vec::new();
    for (what, r) in [
        ("O_WRONLY", OpenOptions::new().write(true).open(&live)),
        (
            "O_RDWR",
            OpenOptions::new().read(true).write(true).open(&live),
        ),
    ] {
        match errno_of(r) {
            Some(libc::EROFS) => {}
            other => problems.push(format!(
                "open(live.raw, {what}): errno {other:?}, expected EROFS ({})",
                libc::EROFS
            )),
        }
    }
    let c = std::ffi::CString::new(live.to_str().unwrap()).unwrap();
    let size = fs::metadata(&live).map(|md| md.len()).unwrap_or(0);
    let r = unsafe { libc::truncate(c.as_ptr(), (size + MIB) as libc::off_t) };
    let e = std::io::Error::last_os_error().raw_os_error();
    if r == 0 || e != Some(libc::EROFS) {
        problems.push(format!(
            "truncate(live.raw): returned {r}, errno {e:?}, expected EROFS"
        ));
    }
    if let Err(e) = compare_uncached(&live, oracle) {
        problems.push(format!("live.raw vs qemu-img convert: {e}"));
    }
    problems
}

/// Mounts `img` read-write (no -r) and expects a read-only mount with a message on stderr that
/// contains each of `words`; the image must be byte-identical afterwards.
fn expect_forced_read_only(img: &Path, words: &[&str]) {
    let oracle = convert_to_raw(img, None);
    let before = read_all(img);
    {
        let m = Mount::new(img);
        let log = || server_log(m.stderr_text());
        let mut problems = with_deadline(m.path(), IO_LIMIT, "read-only checks", &log, || {
            read_only_problems(&m, &oracle)
        });
        let err = m.stderr_text().to_lowercase();
        for w in words {
            if !err.contains(&w.to_lowercase()) {
                problems.push(format!("stderr does not mention {w:?}"));
            }
        }
        assert!(
            problems.is_empty(),
            "{}:\n- {}\n{}",
            img.display(),
            problems.join("\n- "),
            log()
        );
    }
    assert!(
        read_all(img) == before,
        "the image file changed during a mount that had to be read-only"
    );
}

#[test]
fn dirty_bit_mounts_read_only() {
    let dir = workdir();
    let img = image_with_data(dir.path(), "cluster_size=65536");
    set_bits(&img, INCOMPATIBLE, 1);
    expect_forced_read_only(&img, &["dirty", "qemu-img check"]);
    assert_eq!(read_be_u64(&img, INCOMPATIBLE) & 1, 1, "dirty bit cleared");
}

#[test]
fn corrupt_bit_mounts_read_only() {
    let dir = workdir();
    let img = image_with_data(dir.path(), "cluster_size=65536");
    set_bits(&img, INCOMPATIBLE, 2);
    expect_forced_read_only(&img, &["corrupt", "qemu-img check"]);
    assert_eq!(
        read_be_u64(&img, INCOMPATIBLE) & 2,
        2,
        "corrupt bit cleared"
    );
}

/// `-r`: writes refused with EROFS, image byte-identical (v3 and v2).
#[test]
fn read_only_option_refuses_writes() {
    let dir = workdir();
    for opts in ["cluster_size=65536", "compat=0.10,cluster_size=65536"] {
        let img = image_with_data(dir.path(), opts);
        let oracle = convert_to_raw(&img, None);
        let before = read_all(&img);
        {
            let m = Mount::with_args(&img, &["-r"]);
            let log = || server_log(m.stderr_text());
            let problems = with_deadline(m.path(), IO_LIMIT, "-r checks", &log, || {
                read_only_problems(&m, &oracle)
            });
            assert!(
                problems.is_empty(),
                "-r mount of a {opts} image:\n- {}\n{}",
                problems.join("\n- "),
                log()
            );
        }
        assert!(
            read_all(&img) == before,
            "the image file ({opts}) changed during a -r mount"
        );
        fs::remove_file(&img).unwrap();
    }
}

/// An unknown autoclear bit (bit 5) is kept by a read-only mount and by a read-write mount that
/// nobody writes to (the file stays byte-identical), cleared by the first write of a read-write
/// mount, and the image stays clean with its content.
#[test]
fn unknown_autoclear_bit() {
    let dir = workdir();
    let img = image_with_data(dir.path(), "cluster_size=65536");
    let oracle = convert_to_raw(&img, None);
    set_bits(&img, AUTOCLEAR, 1 << 5);
    let before = read_all(&img);
    // read-only, then read-write with reads only: kept, file untouched
    for args in [&["-r"][..], &[][..]] {
        {
            let m = Mount::with_args(&img, args);
            let log = || server_log(m.stderr_text());
            with_deadline(m.path(), IO_LIMIT, "mount", &log, || {
                if let Err(e) = compare_uncached(&m.live(), &oracle) {
                    panic!("live.raw vs qemu-img convert: {e}");
                }
            });
        }
        assert!(
            read_all(&img) == before,
            "a mount {args:?} that only read changed the image file"
        );
    }
    // read-write with a write (of the bytes already there): cleared
    {
        let m = Mount::new(&img);
        let log = || server_log(m.stderr_text());
        with_deadline(m.path(), IO_LIMIT, "rw mount", &log, || {
            let f = OpenOptions::new()
                .read(true)
                .write(true)
                .open(m.live())
                .unwrap_or_else(|e| panic!("live.raw not writable: {e}"));
            let block = pread_exact(&f, 0, 4096).expect("read live.raw");
            pwrite_all(&f, &block, 0).expect("write live.raw");
            f.sync_all().expect("fsync live.raw");
        });
    }
    let autoclear = read_be_u64(&img, AUTOCLEAR);
    assert_eq!(
        autoclear & (1 << 5),
        0,
        "the unknown autoclear bit 5 is still set after a write (autoclear = {autoclear:#x})"
    );
    qemu_compare(&img, &oracle).unwrap();
    assert_check_clean(&img, false);
}
