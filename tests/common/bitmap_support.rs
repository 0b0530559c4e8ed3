//! Persistent bitmaps through QEMU's tools: add one with qemu-img, read its dirty ranges back
//! through qemu-nbd's dirty-bitmap export, its flags from `qemu-img info`.

use std::path::Path;
use std::process::Command;

use super::{Ranges, merge_ranges, qemu_img, run, run_status};

/// `qemu-img bitmap --add [-g GRANULARITY] [--disable] IMAGE NAME`.
pub fn add_bitmap(image: &Path, name: &str, granularity: u64, enabled: bool) {
    let g = granularity.to_string();
    let mut args = vec!["bitmap", "--add", "-g", &g];
    if !enabled {
        args.push("--disable");
    }
    args.push(image.to_str().unwrap());
    args.push(name);
    qemu_img(&args);
}

/// The dirty ranges of bitmap `name` as QEMU reads them: `qemu-nbd -B NAME` and `qemu-img map`
/// with `x-dirty-bitmap`, which shows dirty ranges as `"data": false`.
pub fn qemu_dirty_ranges(image: &Path, name: &str) -> Ranges {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("nbd.sock");
    let pid_file = dir.path().join("nbd.pid");
    // --fork returns once the server listens; it serves one client and exits.
    run(Command::new("qemu-nbd")
        .args(["-r", "-f", "qcow2", "--fork", "-B", name, "-k"])
        .arg(&sock)
        .arg("--pid-file")
        .arg(&pid_file)
        .arg(image));
    let pid: i32 = std::fs::read_to_string(&pid_file)
        .expect("qemu-nbd pid file")
        .trim()
        .parse()
        .expect("a pid");
    let opts = format!(
        "driver=nbd,server.type=unix,server.path={},x-dirty-bitmap=qemu:dirty-bitmap:{name}",
        sock.display()
    );
    let out = run(Command::new("qemu-img").args(["map", "--output=json", "--image-opts", &opts]));
    // The server's image locks go with it: wait until it is gone (it exits after its client).
    let start = std::time::Instant::now();
    // Dead once it is gone or a zombie (its files, and so its locks, are closed then).
    let alive = || {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| {
                s.rsplit(')')
                    .next()
                    .and_then(|r| r.split_whitespace().next())
                    != Some("Z")
            })
            .unwrap_or(false)
    };
    while alive() {
        assert!(
            start.elapsed() < std::time::Duration::from_secs(20),
            "qemu-nbd {pid} did not exit"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let map: serde_json::Value = serde_json::from_slice(&out.stdout).expect("qemu-img map JSON");
    let ranges = map
        .as_array()
        .expect("a JSON list")
        .iter()
        .filter(|e| e["data"] == false)
        .map(|e| {
            let start = e["start"].as_u64().unwrap();
            (start, start + e["length"].as_u64().unwrap())
        })
        .collect();
    merge_ranges(ranges)
}

/// Name → flags of every bitmap, from `qemu-img info --output=json`.
pub fn bitmap_flags(image: &Path) -> Vec<(String, Vec<String>)> {
    let out = run(Command::new("qemu-img")
        .args(["info", "-U", "--output=json"])
        .arg(image));
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    info["format-specific"]["data"]["bitmaps"]
        .as_array()
        .map(|list| {
            list.iter()
                .map(|b| {
                    let flags = b["flags"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|f| f.as_str().unwrap().to_string())
                        .collect();
                    (b["name"].as_str().unwrap().to_string(), flags)
                })
                .collect()
        })
        .unwrap_or_default()
}

/// The granules (of `granularity` bytes) that `ranges` touch, clipped to `size`.
pub fn granules(ranges: &[(u64, u64)], granularity: u64, size: u64) -> Ranges {
    merge_ranges(
        ranges
            .iter()
            .filter(|(s, e)| e > s)
            .map(|&(s, e)| {
                (
                    s / granularity * granularity,
                    e.div_ceil(granularity) * granularity,
                )
            })
            .map(|(s, e)| (s, e.min(size)))
            .collect(),
    )
}

/// `qemu-img check` with nothing to say about bitmaps, leaks or corruption.
pub fn assert_check_clean(image: &Path) {
    let out = run_status(Command::new("qemu-img").args(["check"]).arg(image));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && !text.contains("arning") && !text.contains("leak"),
        "qemu-img check {}: {}\n{text}",
        image.display(),
        out.status
    );
}

pub fn flags_of(image: &Path, name: &str) -> Vec<String> {
    bitmap_flags(image)
        .into_iter()
        .find(|(n, _)| n == name)
        .unwrap_or_else(|| panic!("no bitmap {name} in {}", image.display()))
        .1
}

/// Where the bitmaps extension's `nb_bitmaps` is in the file, and the directory's offset.
pub fn bitmaps_extension(image: &Path) -> (u64, u64) {
    let data = std::fs::read(image).unwrap();
    let word = |at: usize| u32::from_be_bytes(data[at..at + 4].try_into().unwrap());
    let mut at = word(100) as usize;
    loop {
        let (magic, len) = (word(at), word(at + 4) as usize);
        assert_ne!(magic, 0, "no bitmaps extension in {}", image.display());
        if magic == 0x2385_2875 {
            let offset = u64::from_be_bytes(data[at + 24..at + 32].try_into().unwrap());
            return (at as u64 + 8, offset);
        }
        at += 8 + len.next_multiple_of(8);
    }
}
