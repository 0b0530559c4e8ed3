//! Real programs writing `live.raw`: fio with crc32c verification, an ext4 file system made on
//! a loop device over it, discard (`fallocate --punch-hole` / `--zero-range`, `blkdiscard`),
//! growing with `truncate`, and writes past the end. Afterwards the image always passes
//! `qemu-img check` with no errors and no leaks.

use std::collections::BTreeMap;
use std::fs::{self, OpenOptions};
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::common::write_support::*;
use crate::common::*;

const IO_LIMIT: Duration = Duration::from_secs(150);
const CMD_LIMIT: Duration = Duration::from_secs(150);

fn fresh_image(dir: &Path, size: u64, opts: &str) -> PathBuf {
    let img = dir.join("disk.qcow2");
    create_qcow2(&img, size, opts, None);
    img
}

// ---------------------------------------------------------------------------------------------
// (a) fio
// ---------------------------------------------------------------------------------------------

fn fio_args(live: &Path, verify_only: bool) -> Vec<String> {
    let mut v: Vec<String> = [
        "--name=v",
        "--rw=randwrite",
        "--bs=4k",
        "--size=32M",
        "--verify=crc32c",
        "--do_verify=1",
        "--ioengine=psync",
        "--end_fsync=1",
        "--randseed=1234",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    v.push(format!("--filename={}", live.display()));
    if verify_only {
        v.push("--verify_only".into());
    }
    v
}

/// fio random 4 KiB writes with crc32c verification pass; after unmount the image is clean, and
/// after remounting, fio's verify-only pass over the same offsets still finds every block.
#[test]
fn fio_randwrite_verify() {
    let dir = workdir();
    let img = fresh_image(dir.path(), 48 * MIB, "cluster_size=65536");
    {
        let m = Mount::new(&img);
        run_fio(&m, &fio_args(&m.live(), false), "fio", IO_LIMIT);
    }
    assert_check_clean(&img, false);
    {
        let m = Mount::new(&img);
        run_fio(
            &m,
            &fio_args(&m.live(), true),
            "fio --verify_only after remount",
            IO_LIMIT,
        );
    }
    assert_check_clean(&img, false);
}

// ---------------------------------------------------------------------------------------------
// (b) ext4 through a loop device
// ---------------------------------------------------------------------------------------------

/// The files copied into the file system: name -> content (seeded, so reproducible).
fn ext4_files() -> BTreeMap<String, Vec<u8>> {
    let mut rng = Rng::new(seed_for("ext4_files"));
    let mut files = BTreeMap::new();
    let mut big = vec![0u8; (6 * MIB) as usize];
    rng.fill(&mut big);
    files.insert("big.bin".to_string(), big);
    files.insert("pattern.bin".to_string(), vec![0xa5u8; (2 * MIB) as usize]);
    files.insert("zeros.bin".to_string(), vec![0u8; MIB as usize]);
    let mut odd = vec![0u8; 3 * 65536 + 1234];
    rng.fill(&mut odd);
    files.insert("odd-size.bin".to_string(), odd);
    for i in 0..40 {
        let len = rng.range(1, 20_000) as usize;
        let mut v = vec![0u8; len];
        rng.fill(&mut v);
        files.insert(format!("dir/small-{i:02}.bin"), v);
    }
    files
}

fn write_tree(root: &Path, files: &BTreeMap<String, Vec<u8>>) {
    for (name, data) in files {
        let p = root.join(name);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(&p, data).unwrap_or_else(|e| panic!("write {}: {e}", p.display()));
    }
}

fn tree_problems(root: &Path, files: &BTreeMap<String, Vec<u8>>) -> Vec<String> {
    let mut problems = Vec::new();
    for (name, want) in files {
        match fs::read(root.join(name)) {
            Ok(got) => {
                if let Some(d) = first_diff(&got, want, 0) {
                    problems.push(format!("{name}: {d}"));
                }
            }
            Err(e) => problems.push(format!("{name}: {e}")),
        }
    }
    problems
}

/// mkfs.ext4 on a loop device over live.raw, files copied in, `e2fsck -fn` clean, qemu-img
/// check clean after unmount; after remounting snapfs the files read back identical.
#[test]
fn ext4_on_loop_device() {
    let dir = workdir();
    let img = fresh_image(dir.path(), 64 * MIB, "cluster_size=65536");
    let files = ext4_files();
    {
        let m = Mount::new(&img);
        let log = || server_log(m.stderr_text());
        with_deadline(m.path(), IO_LIMIT, "ext4: mkfs, copy, e2fsck", &log, || {
            let mut lo = LoopDev::attach(&m.live());
            run_ok(
                Command::new("mkfs.ext4").args(["-q", "-F"]).arg(lo.path()),
                CMD_LIMIT,
            );
            {
                let mut km = KernelMount::mount(lo.path(), &[]);
                write_tree(km.path(), &files);
                run_ok(
                    Command::new("sync")
                        .arg("-f")
                        .arg(km.path().join("big.bin")),
                    CMD_LIMIT,
                );
                assert!(km.unmount(), "umount of the ext4 file system failed");
            }
            assert!(lo.detach(), "losetup -d failed");
            let out = run_timeout(
                Command::new("e2fsck").args(["-f", "-n"]).arg(m.live()),
                CMD_LIMIT,
            );
            assert!(
                out.status.is_some_and(|s| s.success()),
                "e2fsck -fn live.raw: {:?}\n{}\n{}",
                out.status,
                out.stdout,
                out.stderr
            );
        });
    }
    assert_check_clean(&img, false);
    {
        let m = Mount::new(&img);
        let log = || server_log(m.stderr_text());
        let problems = with_deadline(m.path(), IO_LIMIT, "ext4: read back", &log, || {
            let lo = LoopDev::attach(&m.live());
            let km = KernelMount::mount(lo.path(), &["-o", "ro"]);
            let p = tree_problems(km.path(), &files);
            drop(km);
            drop(lo);
            p
        });
        assert!(
            problems.is_empty(),
            "files read back after remounting differ:\n- {}",
            problems.join("\n- ")
        );
    }
    assert_check_clean(&img, false);
}

// ---------------------------------------------------------------------------------------------
// (c) discard
// ---------------------------------------------------------------------------------------------

/// The whole clusters inside `[off, off+len)`.
fn whole_clusters(off: u64, len: u64, cs: u64) -> Option<(u64, u64)> {
    let s = off.next_multiple_of(cs);
    let e = (off + len) / cs * cs;
    (e > s).then_some((s, e))
}

/// Data written, then punched / zeroed with util-linux fallocate (aligned and unaligned ranges)
/// and blkdiscard on a loop device: the ranges read zero, the disk equals a mirror with the same
/// ranges zeroed; after unmount qemu-img map shows no data in the whole clusters of the ranges,
/// fewer clusters are allocated than before, and check is clean.
#[test]
fn discard_punch_zero_blkdiscard() {
    let dir = workdir();
    let size = 32 * MIB;
    let cs = 64 * KIB;
    let img = fresh_image(dir.path(), size, "cluster_size=65536");
    let mirror = Mirror::of_image(&img);
    // 1. data nearly everywhere
    {
        let m = Mount::new(&img);
        let log = || server_log(m.stderr_text());
        with_deadline(m.path(), IO_LIMIT, "discard: fill", &log, || {
            let live = OpenOptions::new().write(true).open(m.live()).unwrap();
            let mut rng = Rng::new(seed_for("discard_fill"));
            let mut buf = vec![0u8; MIB as usize];
            for i in 0..size / MIB {
                if i == 30 {
                    continue; // one MiB left unallocated
                }
                rng.fill(&mut buf);
                pwrite_all(&live, &buf, i * MIB).unwrap();
                mirror.write(i * MIB, &buf);
            }
            live.sync_all().unwrap();
        });
    }
    assert_check_clean(&img, false);
    let allocated_before = qemu_check(&img).count("allocated-clusters");

    // 2. discards
    // (tool, offset, length)
    let ranges: Vec<(&str, u64, u64)> = vec![
        ("punch", 4 * cs, 3 * cs),                 // aligned, whole clusters
        ("punch", 10 * cs + 1000, 2 * cs + 5000),  // unaligned both ends
        ("punch", 20 * cs + 512, 1024),            // inside one cluster
        ("punch", 40 * cs - 1, 2),                 // straddles a cluster edge
        ("zero", 50 * cs, 2 * cs),                 // aligned
        ("zero", 60 * cs + 4096, 3 * cs - 8192),   // unaligned, one whole cluster inside
        ("zero", 70 * cs + 1, 511),                // tiny
        ("punch", 8 * MIB - cs, 2 * MIB + 2 * cs), // large, over MiB boundaries
        ("zero", 29 * MIB + 4096, 2 * MIB),        // over the unallocated MiB 30
        ("blkdiscard", 16 * MIB, 2 * MIB),         // loop device, aligned
        ("blkdiscard", 20 * MIB + 4 * cs, 5 * cs), // loop device, cluster-aligned
    ];
    {
        let m = Mount::new(&img);
        let log = || server_log(m.stderr_text());
        let problems = with_deadline(m.path(), IO_LIMIT, "discard", &log, || {
            let live = m.live();
            let mut problems = Vec::new();
            for &(tool, off, len) in &ranges {
                match tool {
                    "punch" | "zero" => {
                        let flag = if tool == "punch" {
                            "--punch-hole"
                        } else {
                            "--zero-range"
                        };
                        let mut c = Command::new("fallocate");
                        if tool == "punch" {
                            c.arg("--keep-size");
                        }
                        c.args([flag, "-o", &off.to_string(), "-l", &len.to_string()])
                            .arg(&live);
                        run_ok(&mut c, CMD_LIMIT);
                    }
                    _ => {
                        let lo = LoopDev::attach(&live);
                        run_ok(
                            Command::new("blkdiscard")
                                .args(["-o", &off.to_string(), "-l", &len.to_string()])
                                .arg(lo.path()),
                            CMD_LIMIT,
                        );
                        drop(lo);
                    }
                }
                mirror.zero(off, len);
                let f = fs::File::open(&live).unwrap();
                drop_cache_fd(&f, 0, 0);
                let got = pread_exact(&f, off, len as usize).unwrap();
                if got.iter().any(|&b| b != 0) {
                    let i = got.iter().position(|&b| b != 0).unwrap();
                    problems.push(format!(
                        "{tool} {len} bytes at {off:#x}: byte {:#x} reads {:#04x}, not zero",
                        off + i as u64,
                        got[i]
                    ));
                }
            }
            if let Err(e) = compare_uncached(&live, &mirror.path) {
                problems.push(format!("live.raw vs mirror after the discards: {e}"));
            }
            problems
        });
        assert!(
            problems.is_empty(),
            "- {}\n{}",
            problems.join("\n- "),
            log()
        );
    }
    // 3. after unmount
    let mut problems = Vec::new();
    if let Err(e) = qemu_compare(&img, &mirror.path) {
        problems.push(e);
    }
    let map = qemu_map(&img);
    let data: Ranges = merge_ranges(
        map.iter()
            .filter(|e| e["data"].as_bool() == Some(true))
            .map(|e| {
                let st = e["start"].as_u64().unwrap();
                (st, st + e["length"].as_u64().unwrap())
            })
            .collect(),
    );
    let mut freed = 0;
    for &(tool, off, len) in &ranges {
        if let Some((s, e)) = whole_clusters(off, len, cs) {
            freed += (e - s) / cs;
            let whole: Ranges = vec![(s, e)];
            let overlap = ranges_minus(&whole, &ranges_minus(&whole, &data));
            if !overlap.is_empty() {
                problems.push(format!(
                    "{tool} {len} bytes at {off:#x}: qemu-img map still shows data in whole clusters {overlap:x?}"
                ));
            }
        }
    }
    let allocated_after = qemu_check(&img).count("allocated-clusters");
    eprintln!(
        "discard: allocated clusters {allocated_before} -> {allocated_after}; \
         {freed} whole clusters in the ranges ({} never allocated)",
        MIB / cs
    );
    // MiB 30 was never allocated: the zero-range over it frees at most the clusters outside it
    let never = MIB / cs;
    if allocated_after + freed - never > allocated_before {
        problems.push(format!(
            "allocated clusters {allocated_before} before the discards, {allocated_after} after; \
             expected at most {} (about {} whole clusters discarded)",
            allocated_before + never - freed,
            freed - never
        ));
    }
    if let Some(p) = check_problems(&img, false) {
        problems.push(p);
    }
    assert!(
        problems.is_empty(),
        "after unmount:\n- {}\nmap: {}",
        problems.join("\n- "),
        serde_json::to_string(&map).unwrap()
    );
}

// ---------------------------------------------------------------------------------------------
// (d) grow with truncate
// ---------------------------------------------------------------------------------------------

/// `truncate -s +16M` grows the disk (st_size, zeros in the new area, writable there), qemu-img
/// info shows the new size after unmount and check is clean; `truncate -s -1M` fails with
/// EINVAL and changes nothing.
#[test]
fn truncate_grows_refuses_shrink() {
    let dir = workdir();
    let size = 32 * MIB;
    let img = fresh_image(dir.path(), size, "cluster_size=65536");
    qemu_io_s(&img, &[format!("write -P 0x61 {} {}", size - MIB, MIB)]);
    let mirror = Mirror::of_image(&img);
    let grown = size + 16 * MIB;
    {
        let m = Mount::new(&img);
        let log = || server_log(m.stderr_text());
        let problems = with_deadline(m.path(), IO_LIMIT, "truncate", &log, || {
            let live = m.live();
            let mut problems = Vec::new();
            run_ok(
                Command::new("truncate").args(["-s", "+16M"]).arg(&live),
                CMD_LIMIT,
            );
            let st = fs::metadata(&live).unwrap().len();
            if st != grown {
                problems.push(format!(
                    "after truncate -s +16M st_size is {st}, expected {grown}"
                ));
            }
            mirror.set_len(grown);
            let f = OpenOptions::new()
                .read(true)
                .write(true)
                .open(&live)
                .unwrap();
            drop_cache_fd(&f, 0, 0);
            let tail = pread_exact(&f, size - 4096, (16 * MIB + 4096) as usize).unwrap();
            if tail[..4096].iter().any(|&b| b != 0x61) {
                problems.push("the old last 4 KiB changed by growing".into());
            }
            if let Some(i) = tail[4096..].iter().position(|&b| b != 0) {
                problems.push(format!(
                    "grown area reads non-zero at {:#x}",
                    size + i as u64
                ));
            }
            // the new area is writable, to its last byte
            for (off, len) in [(size, 512u64), (size + 5 * MIB + 7, 70_000), (grown - 1, 1)] {
                let data = vec![0x7eu8; len as usize];
                if let Err(e) = f.write_all_at(&data, off) {
                    problems.push(format!(
                        "write {len} bytes at {off:#x} in the grown area: {e}"
                    ));
                }
                mirror.write(off, &data);
            }
            f.sync_all().unwrap();
            // shrinking is refused: the CLI and ftruncate(2) itself
            let out = run_timeout(
                Command::new("truncate").args(["-s", "-1M"]).arg(&live),
                CMD_LIMIT,
            );
            if out.status.is_none_or(|s| s.success()) || !out.stderr.contains("Invalid argument") {
                problems.push(format!(
                    "truncate -s -1M: expected a failure with EINVAL, got {:?}: {}",
                    out.status, out.stderr
                ));
            }
            match f.set_len(grown - MIB) {
                Ok(()) => problems.push("ftruncate to a smaller size succeeded".into()),
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {}
                Err(e) => {
                    problems.push(format!("ftruncate to a smaller size: {e}, expected EINVAL"))
                }
            }
            let st = fs::metadata(&live).unwrap().len();
            if st != grown {
                problems.push(format!(
                    "after the refused shrink st_size is {st}, expected {grown}"
                ));
            }
            if let Err(e) = compare_uncached(&live, &mirror.path) {
                problems.push(format!("live.raw vs mirror: {e}"));
            }
            problems
        });
        assert!(
            problems.is_empty(),
            "- {}\n{}",
            problems.join("\n- "),
            log()
        );
    }
    let mut problems = Vec::new();
    let vs = virtual_size(&img);
    if vs != grown {
        problems.push(format!(
            "qemu-img info: virtual size {vs}, expected {grown}"
        ));
    }
    if let Err(e) = qemu_compare(&img, &mirror.path) {
        problems.push(e);
    }
    if let Some(p) = check_problems(&img, false) {
        problems.push(p);
    }
    assert!(
        problems.is_empty(),
        "after unmount:\n- {}",
        problems.join("\n- ")
    );
}

// ---------------------------------------------------------------------------------------------
// (e) writes past the end
// ---------------------------------------------------------------------------------------------

fn raw_pwrite(f: &fs::File, data: &[u8], off: u64) -> std::io::Result<usize> {
    let n = unsafe {
        libc::pwrite(
            f.as_raw_fd(),
            data.as_ptr() as *const libc::c_void,
            data.len(),
            off as libc::off_t,
        )
    };
    if n < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// A write that starts at or beyond the end fails with ENOSPC; one that straddles the end is
/// cut short at the end. The size never changes; check is clean.
#[test]
fn write_past_end() {
    let dir = workdir();
    let size = 16 * MIB;
    let img = fresh_image(dir.path(), size, "cluster_size=65536");
    let mirror = Mirror::of_image(&img);
    {
        let m = Mount::new(&img);
        let log = || server_log(m.stderr_text());
        let problems = with_deadline(m.path(), IO_LIMIT, "past end", &log, || {
            let mut problems = Vec::new();
            let f = OpenOptions::new()
                .read(true)
                .write(true)
                .open(m.live())
                .unwrap();
            let data = vec![0x5au8; 8192];
            for off in [size, size + 1, size + 4096, size + 10 * MIB] {
                match raw_pwrite(&f, &data, off) {
                    Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => {}
                    other => problems.push(format!(
                        "pwrite 8192 bytes at {off:#x} (end {size:#x}): {other:?}, expected ENOSPC"
                    )),
                }
            }
            for (off, len) in [(size - 100, 8192usize), (size - 4096, 8192), (size - 1, 2)] {
                match raw_pwrite(&f, &data[..len], off) {
                    Ok(n) if n as u64 == size - off => mirror.write(off, &data[..n]),
                    other => problems.push(format!(
                        "pwrite {len} bytes at {off:#x} (end {size:#x}): {other:?}, expected a short write of {}",
                        size - off
                    )),
                }
            }
            // a write_all across the end ends in ENOSPC after the short write
            match f.write_all_at(&data, size - 512) {
                Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => {
                    mirror.write(size - 512, &data[..512])
                }
                other => problems.push(format!(
                    "write_all_at across the end: {other:?}, expected ENOSPC"
                )),
            }
            f.sync_all().unwrap();
            let st = fs::metadata(m.live()).unwrap().len();
            if st != size {
                problems.push(format!("st_size {st} after the writes, expected {size}"));
            }
            if let Err(e) = compare_uncached(&m.live(), &mirror.path) {
                problems.push(format!("live.raw vs mirror: {e}"));
            }
            problems
        });
        assert!(
            problems.is_empty(),
            "- {}\n{}",
            problems.join("\n- "),
            log()
        );
    }
    assert_eq!(virtual_size(&img), size, "virtual size changed");
    qemu_compare(&img, &mirror.path).unwrap();
    assert_check_clean(&img, false);
}

/// After a few small writes and a clean unmount the file ends where its last cluster ends, as
/// QEMU's do: the clusters snapfs reserved ahead of the writes and did not use are given back,
/// the file's end with them (`qemu-img check` reports that end as "image-end-offset").
#[test]
fn unused_reserved_clusters_leave_no_tail() {
    let dir = workdir();
    let img = fresh_image(dir.path(), 64 * MIB, "cluster_size=65536");
    {
        let m = Mount::new(&img);
        let log = || server_log(m.stderr_text());
        with_deadline(m.path(), IO_LIMIT, "small writes", &log, || {
            let f = OpenOptions::new().write(true).open(m.live()).unwrap();
            for i in 0..3u64 {
                f.write_all_at(&[0x5a; 4096], i * 8 * MIB).unwrap();
            }
            f.sync_all().unwrap();
        });
    }
    qemu_img_check(&img).unwrap();
    let check: serde_json::Value = serde_json::from_str(&qemu_img(&[
        "check",
        "--output=json",
        img.to_str().unwrap(),
    ]))
    .unwrap();
    let end = check["image-end-offset"].as_u64().unwrap();
    let len = fs::metadata(&img).unwrap().len();
    assert_eq!(
        len, end,
        "the image file is {len} bytes, its last cluster ends at {end}"
    );
}
