//! Progress of a long commit (issue 5: "A 2 GiB commit shows progress lines in control/status
//! while it runs"; docs/design.md section 3), reads and writes of live.raw while it runs, and the
//! progress bars of `snapfs commit` and `snapfs pull`.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::common::chain_support::*;
use crate::common::snapshot_support::{Rng, control, errno_name, status_text};
use crate::common::*;

const SIZE: u64 = 2 * GIB;
/// Allocated in the top: `write -P 0xab 0 1G`.
const TOP_DATA: u64 = GIB;
/// In the base, under the top's data and beside it.
const BASE_UNDER: (u64, u64) = (0, 16 * MIB);
const BASE_BESIDE: (u64, u64) = (GIB, 32 * MIB);
/// Written through live.raw while the commit runs.
const LATE_WRITE: (u64, u64) = (512 * MIB + 4 * KIB, 64 * KIB);

/// What live.raw holds at `off` (before the late write).
fn expected_byte(off: u64) -> u8 {
    if off < TOP_DATA {
        0xab
    } else if off >= BASE_BESIDE.0 && off < BASE_BESIDE.0 + BASE_BESIDE.1 {
        0x11
    } else {
        0
    }
}

/// base.qcow2 with data under and beside the top's (`size` > 1 GiB + 32 MiB); top.qcow2 over it
/// with `top_data` bytes of 0xab from offset 0.
fn build(dir: &Path, top_data: u64, size: u64) -> std::path::PathBuf {
    let base = dir.join("base.qcow2");
    let top = dir.join("top.qcow2");
    create_qcow2(&base, size, "", None);
    qemu_io_s(
        &base,
        &[
            format!("write -P 0x22 {} {}", BASE_UNDER.0, BASE_UNDER.1),
            format!("write -P 0x11 {} {}", BASE_BESIDE.0, BASE_BESIDE.1),
        ],
    );
    create_qcow2(&top, size, "", Some(("base.qcow2", "qcow2")));
    qemu_io_s(&top, &[format!("write -P 0xab 0 {top_data}")]);
    top
}

#[test]
fn commit_of_a_2gib_disk_shows_progress_while_reads_and_writes_go_on() {
    let w = workdir();
    let top = build(w.path(), TOP_DATA, SIZE);
    let m = Mount::new(&top);
    let live = m.live();

    let poller = StatusPoller::start(m.path(), Duration::from_millis(20));
    let committing = Arc::new(AtomicBool::new(true));

    // a reader: random 64 KiB reads all over the disk, checked, counted while the commit runs
    let reader = {
        let live = live.clone();
        let committing = committing.clone();
        std::thread::spawn(move || {
            let f = File::open(&live).unwrap();
            let mut rng = Rng::new(5);
            let mut buf = vec![0u8; 64 * KIB as usize];
            let (mut during, mut errors) = (0u64, Vec::new());
            while committing.load(Ordering::Acquire) {
                let off = rng.below((BASE_BESIDE.0 + BASE_BESIDE.1 + 64 * MIB) / 4096) * 4096;
                let off = off.min(SIZE - buf.len() as u64);
                let t = Instant::now();
                match f.read_exact_at(&mut buf, off) {
                    Ok(()) => {
                        let lw = LATE_WRITE.0..LATE_WRITE.0 + LATE_WRITE.1;
                        for (i, b) in buf.iter().enumerate() {
                            let o = off + i as u64;
                            if lw.contains(&o) {
                                continue; // old or new content, depending on timing
                            }
                            if *b != expected_byte(o) {
                                errors.push(format!(
                                    "read at {off:#x}: byte {o:#x} is {b:#04x}, expected {:#04x}",
                                    expected_byte(o)
                                ));
                                break;
                            }
                        }
                    }
                    Err(e) => errors.push(format!("read at {off:#x} failed: {e}")),
                }
                if committing.load(Ordering::Acquire) {
                    during += 1;
                }
                if t.elapsed() > Duration::from_secs(20) {
                    errors.push(format!("a read at {off:#x} took {:?}", t.elapsed()));
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            (during, errors)
        })
    };

    // a writer: once the commit is under way, one write that must not be lost
    let writer = {
        let live = live.clone();
        let mp = m.path().to_path_buf();
        std::thread::spawn(move || {
            let t0 = Instant::now();
            while t0.elapsed() < Duration::from_secs(60) {
                if status_text(&mp)
                    .lines()
                    .any(|l| parse_progress(l).is_some_and(|(_, p)| p >= 5))
                {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let f = OpenOptions::new()
                .write(true)
                .open(&live)
                .map_err(|e| format!("open live.raw for writing: {e}"))?;
            f.write_all_at(&pattern(0xcd, LATE_WRITE.1 as usize), LATE_WRITE.0)
                .map_err(|e| format!("pwrite of 64 KiB at {:#x}: {e}", LATE_WRITE.0))?;
            f.sync_all().map_err(|e| format!("fsync: {e}"))
        })
    };

    let started = Instant::now();
    let result = control(m.path(), "commit", "");
    let returned = Instant::now();
    committing.store(false, Ordering::Release);
    let lines = poller.finish();
    let (reads_during, read_errors) = reader.join().unwrap();
    let written = writer.join().unwrap();
    if let Err(e) = result {
        panic!(
            "commit failed with {}; status:\n{}",
            errno_name(e),
            status_text(m.path())
        );
    }
    assert_outcome_ok(m.path(), "commit (top)");
    eprintln!(
        "commit of {} GiB took {:?}; {reads_during} reads of live.raw during it",
        TOP_DATA / GIB,
        returned - started
    );

    // progress lines: `commit (top): P% (A of B)`, seen before the write returned, rising
    let progress: Vec<(Instant, u64)> = lines
        .iter()
        .filter_map(|(t, l)| {
            parse_progress(l)
                .filter(|(label, _)| label.ends_with("commit (top)"))
                .map(|(_, p)| (*t, p))
        })
        .collect();
    let all: Vec<&String> = lines.iter().map(|(_, l)| l).collect();
    assert!(
        progress.iter().any(|&(t, p)| p < 100 && t < returned),
        "no progress line `commit (top): P% (A of B)` with P < 100 was seen in control/status \
         (polled every 20 ms) while the {:?} commit ran; lines seen: {all:#?}",
        returned - started
    );
    let pcts: Vec<u64> = progress.iter().map(|&(_, p)| p).collect();
    assert!(
        pcts.windows(2).all(|w| w[0] <= w[1]) && pcts.iter().all(|&p| p <= 100),
        "progress percentages should rise from 0 to 100: {pcts:?}"
    );
    let after = status_text(m.path());
    assert!(
        !after.lines().any(|l| parse_progress(l).is_some()),
        "a progress line is still shown after the commit finished:\n{after}"
    );

    assert!(
        read_errors.is_empty(),
        "reads of live.raw during the commit: {read_errors:#?}"
    );
    assert!(
        reads_during >= 3,
        "only {reads_during} reads of live.raw completed during the commit"
    );

    // the write made while the commit ran (it may wait for the commit) must succeed and stay
    if let Err(e) = written {
        panic!(
            "a write to live.raw issued during the commit failed: {e}\nsnapfs stderr:\n{}",
            m.stderr_text()
        );
    }
    let f = File::open(&live).unwrap();
    let mut buf = vec![0u8; LATE_WRITE.1 as usize];
    f.read_exact_at(&mut buf, LATE_WRITE.0).unwrap();
    assert!(
        buf.iter().all(|&b| b == 0xcd),
        "the write made during the commit is not in live.raw"
    );
    drop(f);
    drop(m);

    assert_all_clean(w.path(), "after the commit and unmount");
    // the top was emptied; it may hold the late write (if it waited for the commit), nothing else
    let (lw, ll) = LATE_WRITE;
    let cs = 64 * KIB;
    let allowed = vec![(lw / cs * cs, (lw + ll).div_ceil(cs) * cs)];
    let own = top_own_ranges(&top);
    let extra = ranges_minus(&own, &allowed);
    assert!(
        extra.is_empty(),
        "the top should be empty after the commit (except the late write), but maps {extra:?}"
    );
    qemu_io_s(
        &top,
        &[
            format!("read -P 0xab 0 {lw}"),
            format!("read -P 0xcd {lw} {ll}"),
            format!("read -P 0xab {} {}", lw + ll, TOP_DATA - lw - ll),
            format!("read -P 0x11 {} {}", BASE_BESIDE.0, BASE_BESIDE.1),
            format!(
                "read -P 0 {} {}",
                BASE_BESIDE.0 + BASE_BESIDE.1,
                SIZE - BASE_BESIDE.0 - BASE_BESIDE.1
            ),
        ],
    );
    // the data is in the base now
    qemu_io_s(
        &w.path().join("base.qcow2"),
        &[format!("read -P 0xab {} {}", lw + ll, TOP_DATA - lw - ll)],
    );
}

#[test]
fn snapfs_commit_shows_a_progress_bar_on_a_terminal() {
    let w = workdir();
    let data = 256 * MIB;
    let top = build(w.path(), data, GIB + 64 * MIB);
    let m = Mount::new(&top);
    let mut c = snapfs_cmd();
    c.arg("commit").arg(m.path());
    let t0 = Instant::now();
    let out = run_in_pty(c, Duration::from_secs(240));
    let took = t0.elapsed();
    let status = out.status.expect("snapfs commit finished");
    assert!(
        status.success(),
        "snapfs commit exited {status}; output:\n{}",
        out.output
    );
    assert_outcome_ok(m.path(), "commit (top)");
    // a percentage below 100 (bar or line) before the final outcome line
    let text = out.output.replace('\r', "\n");
    let mut pcts = Vec::new();
    let b = text.as_bytes();
    for (i, &c) in b.iter().enumerate() {
        if c == b'%' {
            let mut j = i;
            while j > 0 && b[j - 1].is_ascii_digit() {
                j -= 1;
            }
            if j < i
                && let Ok(p) = text[j..i].parse::<u64>()
            {
                pcts.push(p);
            }
        }
    }
    assert!(
        pcts.iter().any(|&p| p < 100),
        "snapfs commit ran {took:?} on a terminal but showed no progress (no percentage below \
         100 in its output); output:\n{:?}",
        out.output
    );
    assert!(
        text.lines().any(|l| l.contains("commit (top): ok")),
        "snapfs commit should print the outcome line; output:\n{:?}",
        out.output
    );
    drop(m);
    assert_all_clean(w.path(), "after snapfs commit");
    qemu_io_s(&top, &[format!("read -P 0xab 0 {data}")]);
}

/// `snapfs pull MOUNTPOINT` on a terminal: a top over 256 MiB of base data shows a bar (or
/// progress lines) while the data moves up, then the outcome; the top then stands alone and
/// holds the data, with the writes made through live.raw meanwhile.
#[test]
fn snapfs_pull_shows_a_progress_bar_on_a_terminal() {
    let w = workdir();
    let data = 256 * MIB;
    let base = w.path().join("base.qcow2");
    create_qcow2(&base, GIB, "", None);
    qemu_io_s(&base, &[format!("write -P 0x5b 0 {data}")]);
    let top = w.path().join("top.qcow2");
    create_qcow2(&top, GIB, "", Some(("base.qcow2", "qcow2")));
    qemu_io_s(&top, &[format!("write -P 0x7c {data} {}", MIB)]);
    let m = Mount::new(&top);
    // Guest writes go on while the data moves up (before, during or after the step that
    // reaches them): none may be overwritten by the older data from below.
    let live = OpenOptions::new().write(true).open(m.live()).unwrap();
    let writes: Vec<u64> = (0..16).map(|i| i * 16 * MIB + 12 * KIB).collect();
    let writer = {
        let writes = writes.clone();
        std::thread::spawn(move || {
            for off in writes {
                live.write_all_at(&[0xe1; 8192], off).unwrap();
                std::thread::sleep(Duration::from_millis(25));
            }
        })
    };
    let mut c = snapfs_cmd();
    c.arg("pull").arg(m.path());
    let out = run_in_pty(c, Duration::from_secs(240));
    writer.join().unwrap();
    let status = out.status.expect("snapfs pull finished");
    assert!(
        status.success(),
        "snapfs pull exited {status}; output:\n{}",
        out.output
    );
    assert_outcome_ok(m.path(), "pull (all)");
    let text = out.output.replace('\r', "\n");
    assert!(
        percentages(&text).iter().any(|&p| p < 100),
        "snapfs pull showed no progress (no percentage below 100 in its output); output:\n{:?}",
        out.output
    );
    assert!(
        text.lines().any(|l| l.contains("pull (all): ok")),
        "snapfs pull should print the outcome line; output:\n{:?}",
        out.output
    );
    drop(m);
    assert_all_clean(w.path(), "after snapfs pull");
    assert_eq!(chain_files(&top, w.path()), vec!["top.qcow2"]);
    let mut reads = vec![format!("read -P 0x7c {data} {}", MIB)];
    let mut at = 0;
    for off in &writes {
        reads.push(format!("read -P 0x5b {at} {}", off - at));
        reads.push(format!("read -P 0xe1 {off} 8192"));
        at = off + 8192;
    }
    reads.push(format!("read -P 0x5b {at} {}", data - at));
    qemu_io_s(&top, &reads);
}

/// Every `N%` in `text`.
fn percentages(text: &str) -> Vec<u64> {
    let b = text.as_bytes();
    let mut found = Vec::new();
    for (i, &c) in b.iter().enumerate() {
        if c == b'%' {
            let mut j = i;
            while j > 0 && b[j - 1].is_ascii_digit() {
                j -= 1;
            }
            if j < i
                && let Ok(p) = text[j..i].parse::<u64>()
            {
                found.push(p);
            }
        }
    }
    found
}
