//! `--direct-io` (`-o direct_io`): live.raw and the snapshot files bypass the kernel page cache.
//! Every view still equals its oracle byte for byte (read with 1 MiB and odd-sized reads), a
//! read leaves no page of the file cached (where a default mount keeps them), memory maps
//! still work, and writes through live.raw verify and leave a clean image.

use std::fs::{self, File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use crate::common::images;
use crate::common::write_support::{assert_check_clean, run_fio};
use crate::common::*;

const LIMIT: Duration = Duration::from_secs(150);

/// Pages of `file` in the page cache, as `fincore` counts them.
fn cached_pages(file: &Path) -> u64 {
    let out = run_timeout(
        Command::new("fincore")
            .args(["-n", "-b", "-o", "PAGES"])
            .arg(file),
        Duration::from_secs(30),
    );
    assert!(
        out.status.is_some_and(|s| s.success()),
        "fincore {}: {}",
        file.display(),
        out.stderr
    );
    out.stdout.trim().parse().unwrap_or_else(|_| {
        panic!(
            "fincore {}: unexpected output {:?}",
            file.display(),
            out.stdout
        )
    })
}

/// Reads `file` to the end in `chunk`-byte reads.
fn read_all(file: &Path, chunk: usize) -> Vec<u8> {
    let mut f = File::open(file).unwrap_or_else(|e| panic!("open {}: {e}", file.display()));
    let mut out = Vec::new();
    let mut buf = vec![0u8; chunk];
    loop {
        let n = f
            .read(&mut buf)
            .unwrap_or_else(|e| panic!("read {}: {e}", file.display()));
        if n == 0 {
            return out;
        }
        out.extend_from_slice(&buf[..n]);
    }
}

/// Every view of a 4-layer chain with internal snapshots, zero clusters and 4 KiB and 64 KiB
/// clusters equals `qemu-img convert`; with `-o direct_io` too.
#[test]
fn views_match_the_oracle() {
    let dir = workdir();
    let (top, exp) = images::chain4(dir.path());
    verify_mount(&top, &exp, &["--direct-io"]);
    verify_mount(&top, &exp, &["-o", "direct_io"]);
}

/// Compressed clusters (zstd) read through direct I/O with an odd read size, which splits
/// requests across cluster and hole boundaries.
#[test]
fn compressed_odd_reads_match() {
    let dir = workdir();
    let (top, exp) = images::compressed(dir.path(), "zstd", 64 * KIB);
    let m = Mount::with_args(&top, &["--direct-io"]);
    for (name, _view, oracle) in oracles(&exp) {
        let got = read_all(&m.path().join(&name), 777 * 1024 + 13);
        let want = fs::read(&oracle).unwrap();
        assert!(got == want, "{name}: differs from {}", oracle.display());
    }
}

/// A full read leaves no page of a snapshot or of live.raw in the page cache with
/// `--direct-io`; the same read on a default mount leaves (nearly) every page (the contrast
/// shows that the count means something).
#[test]
fn reads_leave_no_page_cache() {
    let dir = workdir();
    let (top, _exp) = images::chain4(dir.path());
    let files = ["snapshots/t1.raw", "snapshots/base.raw", "live.raw"];
    {
        let m = Mount::with_args(&top, &["-r", "--direct-io"]);
        for name in files {
            let file = m.path().join(name);
            let len = read_all(&file, 1 << 20).len() as u64;
            assert!(len > 0, "{name}: empty");
            assert_eq!(cached_pages(&file), 0, "{name}: pages cached after a read");
        }
    }
    {
        let m = Mount::with_args(&top, &["-r"]);
        let file = m.path().join("snapshots/t1.raw");
        let pages = (read_all(&file, 1 << 20).len() as u64).div_ceil(4096);
        // Nearly whole: reclaim may take pages back before fincore counts them. This machine
        // kind runs DAMON pageout over physical memory (regions idle for 60 s): a page filled
        // into such a region can go before DAMON sees it used (1 of 16384 did, in a busy run).
        let cached = cached_pages(&file);
        assert!(
            cached * 10 >= pages * 9 && cached <= pages,
            "default mount: a snapshot read once should stay cached, {cached} of {pages} pages are"
        );
    }
}

/// Shared read-only maps of every view give the oracle's bytes.
#[test]
fn mmap_still_works() {
    let dir = workdir();
    let (top, exp) = images::chain4(dir.path());
    let m = Mount::with_args(&top, &["--direct-io"]);
    for (name, _view, oracle) in oracles(&exp) {
        let f = File::open(m.path().join(&name)).unwrap();
        let len = f.metadata().unwrap().len() as usize;
        let mapped =
            Mapped::new(&f, len, libc::MAP_SHARED).unwrap_or_else(|e| panic!("mmap {name}: {e}"));
        let same = mapped.bytes() == fs::read(&oracle).unwrap().as_slice();
        assert!(same, "mmap {name}: differs from {}", oracle.display());
    }
}

/// fio random 4 KiB writes with crc32c verification, then 1 MiB writes read back after a
/// remount: both pass through direct I/O, and the image is clean after each.
#[test]
fn writes_verify_and_leave_a_clean_image() {
    let dir = workdir();
    let img = dir.path().join("disk.qcow2");
    create_qcow2(&img, 64 * MIB, "cluster_size=65536", None);
    {
        let m = Mount::with_args(&img, &["--direct-io"]);
        let live = m.live();
        let mut args: Vec<String> = [
            "--name=v",
            "--rw=randwrite",
            "--bs=4k",
            "--size=16M",
            "--verify=crc32c",
            "--do_verify=1",
            "--ioengine=psync",
            "--end_fsync=1",
            "--randseed=7",
        ]
        .map(String::from)
        .to_vec();
        args.push(format!("--filename={}", live.display()));
        run_fio(&m, &args, "fio", LIMIT);
        let f = OpenOptions::new().write(true).open(&live).unwrap();
        let block: Vec<u8> = (0..MIB).map(|i| (i * 7 + i / 4093) as u8).collect();
        for at in [32 * MIB, 40 * MIB + 512, 63 * MIB] {
            f.write_all_at(&block, at)
                .unwrap_or_else(|e| panic!("write at {at:#x}: {e}"));
        }
        f.sync_all().unwrap();
    }
    assert_check_clean(&img, false);
    let m = Mount::with_args(&img, &["--direct-io"]);
    let f = File::open(m.live()).unwrap();
    let block: Vec<u8> = (0..MIB).map(|i| (i * 7 + i / 4093) as u8).collect();
    for at in [32 * MIB, 40 * MIB + 512, 63 * MIB] {
        let mut got = vec![0u8; MIB as usize];
        f.read_exact_at(&mut got, at).unwrap();
        assert!(
            got == block,
            "1 MiB written at {at:#x} reads back different"
        );
    }
}
