//! The crash harness shared by the `kill -9` tests (`tests/write_crash.rs`,
//! `tests/snapshot_crash.rs`, `tests/chain_crash.rs`; docs/design.md section 5: "every image snapfs
//! writes passes `qemu-img check` with no errors ... after `kill -9` at any moment").
//!
//! One iteration: the workload names the image to mount (the image the previous kill left, or a
//! fresh copy), `snapfs mount -f` serves it, the workload starts on its own thread, the server is
//! killed with SIGKILL after a delay drawn from the seeded generator (or chosen by the workload
//! from it), the workload thread is joined (its calls fail with ENOTCONN once the server is gone),
//! the dead mount is taken down, and then:
//! - `qemu-img check --output=json` of every image file must find no corruption and no check
//!   errors (leaked clusters are allowed after a kill), and no image may be marked corrupt;
//! - the workload's own verification runs (fsynced data present, each snapshot whole or absent,
//!   live content not lost) and says how many bytes it compared.
//!
//! Any failure ends the loop (a damaged image would only make later iterations fail for the same
//! reason) and fails the test after the summary line is printed. The seed comes from
//! `SNAPFS_TEST_SEED` or the test's name ([`seed_for`]) and is printed, so a failure replays.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::snapshot_support::{Daemon, check_json};
use super::write_support::{Rng, seed_for};
use super::{image_format, info_json, unique};

/// How long the loop runs and what it accepts.
#[derive(Debug, Clone)]
pub struct CrashOptions {
    /// At most this many iterations (one kill each).
    pub iterations: u64,
    /// No new iteration starts once this much time has passed since the loop began ...
    pub budget: Duration,
    /// ... but at least this many run, or the test fails.
    pub min_kills: u64,
    /// Extra `snapfs mount -f` arguments.
    pub mount_args: Vec<String>,
}

impl Default for CrashOptions {
    fn default() -> CrashOptions {
        CrashOptions {
            iterations: 10,
            budget: Duration::from_secs(30),
            min_kills: 3,
            mount_args: Vec::new(),
        }
    }
}

/// What the harness knows about one kill, for the workload's verification.
#[derive(Debug, Clone)]
pub struct Kill {
    pub iteration: u64,
    /// From the start of the workload to the SIGKILL.
    pub delay: Duration,
    /// When the SIGKILL was sent (a call that returned before it completed before the kill).
    pub at: Instant,
    /// What the server had logged by then.
    pub stderr_before: String,
}

impl Kill {
    /// "iteration N (kill -9 after D)", for messages.
    pub fn context(&self) -> String {
        format!(
            "iteration {} (kill -9 after {:?})",
            self.iteration, self.delay
        )
    }
}

/// A workload the harness kills. `Outcome` is what its thread hands back.
pub trait CrashWorkload {
    type Outcome: Send + 'static;

    /// The image to mount in iteration `it` (and whose files are checked afterwards).
    fn image(&mut self, it: u64) -> PathBuf;

    /// Every file `qemu-img check` must pass after the kill (default: the mounted image).
    fn check_files(&self, image: &Path) -> Vec<PathBuf> {
        vec![image.to_path_buf()]
    }

    /// How long after the workload starts the server is killed; `rng` is the harness's seeded
    /// generator. Default: uniform in 20..700 ms.
    fn kill_delay(&mut self, _it: u64, rng: &mut Rng) -> Duration {
        Duration::from_millis(rng.range(20, 700))
    }

    /// The work to run against the mount at `mp` on its own thread: it runs until a call fails
    /// (the kill) or `stop` is set, and returns what it knows. `seed` seeds its own choices.
    fn start(
        &mut self,
        it: u64,
        mp: &Path,
        seed: u64,
        stop: Arc<AtomicBool>,
    ) -> Box<dyn FnOnce() -> Self::Outcome + Send>;

    /// The workload's checks after the kill (the image passed `qemu-img check` already):
    /// `Ok(bytes compared)` or a description of what is wrong.
    fn verify(&mut self, image: &Path, kill: &Kill, outcome: Self::Outcome) -> Result<u64, String>;

    /// The workload's own counters, for the summary line.
    fn summary(&self) -> String {
        String::new()
    }
}

/// The counters of one run of the loop.
#[derive(Debug, Clone, Default)]
pub struct CrashSummary {
    pub seed: u64,
    pub iterations: u64,
    pub kills: u64,
    pub bytes_verified: u64,
    pub failures: u64,
    /// The most leaked clusters one check reported.
    pub max_leaks: u64,
    pub elapsed: Duration,
}

/// Runs the loop (see the module documentation); prints one summary line; panics with every
/// failure. Returns the counters for further assertions.
pub fn crash_loop<W: CrashWorkload>(name: &str, opts: &CrashOptions, w: &mut W) -> CrashSummary {
    let t0 = Instant::now();
    let seed = seed_for(name);
    let mut rng = Rng::new(seed);
    let mut s = CrashSummary {
        seed,
        ..Default::default()
    };
    let mut failures: Vec<String> = Vec::new();
    let args: Vec<&str> = opts.mount_args.iter().map(String::as_str).collect();
    for it in 0..opts.iterations {
        if t0.elapsed() > opts.budget && s.kills >= opts.min_kills {
            break;
        }
        s.iterations += 1;
        match one_iteration(it, &args, &mut rng, w, &mut s) {
            Ok(bytes) => s.bytes_verified += bytes,
            Err(e) => failures.push(e),
        }
        if !failures.is_empty() {
            break;
        }
    }
    s.failures = failures.len() as u64;
    s.elapsed = t0.elapsed();
    let extra = w.summary();
    eprintln!(
        "crash harness [{name}]: seed {seed:#x}, {} iterations, {} kills, {} bytes verified, \
         {} failures, most leaked clusters {}, {:.1} s{}{extra}",
        s.iterations,
        s.kills,
        s.bytes_verified,
        s.failures,
        s.max_leaks,
        s.elapsed.as_secs_f64(),
        if extra.is_empty() { "" } else { "; " },
    );
    assert!(
        failures.is_empty(),
        "{name} (seed {seed:#x}; SNAPFS_TEST_SEED={seed:#x} replays it): {}",
        failures.join("\n")
    );
    assert!(
        s.kills >= opts.min_kills,
        "{name}: only {} kills (at least {} wanted)",
        s.kills,
        opts.min_kills
    );
    s
}

fn one_iteration<W: CrashWorkload>(
    it: u64,
    args: &[&str],
    rng: &mut Rng,
    w: &mut W,
    s: &mut CrashSummary,
) -> Result<u64, String> {
    let image = w.image(it);
    let mut daemon = Daemon::start(&image, args);
    let stop = Arc::new(AtomicBool::new(false));
    let delay = w.kill_delay(it, rng);
    let work = w.start(it, &daemon.mp, rng.next_u64(), stop.clone());
    let started = Instant::now();
    let handle = std::thread::spawn(work);
    if let Some(rest) = delay.checked_sub(started.elapsed()) {
        std::thread::sleep(rest);
    }
    let stderr_before = daemon.stderr();
    let at = Instant::now();
    daemon.kill9();
    s.kills += 1;
    stop.store(true, Ordering::SeqCst);
    let kill = Kill {
        iteration: it,
        delay,
        at,
        stderr_before,
    };
    // The server is gone, so every call in flight fails (ENOTCONN) and the workload stops. Join
    // before taking the mount down: after `umount -l` a new call would find the empty mount
    // point (ENOENT) instead of the dead connection.
    let joined = join_within(handle, Duration::from_secs(30));
    let freed = daemon.finish();
    drop(daemon);
    let outcome = match joined {
        Joined::Done(o) => o,
        Joined::Panicked(p) => {
            return Err(format!("{}: the workload panicked: {p}", kill.context()));
        }
        Joined::Hung(h) => {
            // Taking the mount down makes any call still waiting fail; give it another moment.
            match join_within(h, Duration::from_secs(30)) {
                Joined::Done(_) | Joined::Panicked(_) => {
                    return Err(format!(
                        "{}: a workload call did not return within 30 s of the kill",
                        kill.context()
                    ));
                }
                Joined::Hung(_) => {
                    return Err(format!(
                        "{}: the workload is still blocked 60 s after the kill (thread left \
                         behind)",
                        kill.context()
                    ));
                }
            }
        }
    };
    if !freed {
        return Err(format!(
            "{}: the mount point is still busy after the kill and umount -l",
            kill.context()
        ));
    }
    for file in w.check_files(&image) {
        check_after_kill(&file, &kill, s)?;
    }
    w.verify(&image, &kill, outcome)
        .map_err(|e| format!("{}: {e}", kill.context()))
}

enum Joined<T> {
    Done(T),
    Panicked(String),
    Hung(JoinHandle<T>),
}

fn join_within<T>(h: JoinHandle<T>, limit: Duration) -> Joined<T> {
    let t = Instant::now();
    while !h.is_finished() && t.elapsed() < limit {
        std::thread::sleep(Duration::from_millis(10));
    }
    if !h.is_finished() {
        return Joined::Hung(h);
    }
    match h.join() {
        Ok(o) => Joined::Done(o),
        Err(p) => Joined::Panicked(super::snapshot_support::panic_text(p.as_ref())),
    }
}

/// `qemu-img check` of one file after a kill: leaks allowed; corruption and check errors fail;
/// a qcow2 image must not be marked corrupt.
fn check_after_kill(file: &Path, kill: &Kill, s: &mut CrashSummary) -> Result<(), String> {
    if image_format(file) != "qcow2" {
        return Ok(());
    }
    let ctx = kill.context();
    let check = check_json(file);
    s.max_leaks = s.max_leaks.max(check.leaks);
    if !check.no_corruption() {
        return Err(format!(
            "{ctx}: qemu-img check {} finds corruption (exit {:?}, {} corruptions, {} check \
                 errors; 'Leaked cluster' lines left out):\n{}\n{}\nsnapfs stderr before the \
                 kill:\n{}",
            file.display(),
            check.exit,
            check.corruptions,
            check.check_errors,
            check
                .text
                .lines()
                .filter(|l| !l.starts_with("Leaked cluster"))
                .collect::<Vec<_>>()
                .join("\n"),
            keep_copy(file),
            kill.stderr_before
        ));
    }
    let info = info_json(file);
    if info["format-specific"]["data"]["corrupt"].as_bool() == Some(true) {
        return Err(format!(
            "{ctx}: {} is marked corrupt after the kill\nsnapfs stderr before the kill:\n{}",
            file.display(),
            kill.stderr_before
        ));
    }
    Ok(())
}

/// Keeps a copy of a failing image for inspection (the first one of the process only); says
/// where.
pub fn keep_copy(img: &Path) -> String {
    static KEPT: AtomicBool = AtomicBool::new(false);
    if KEPT.swap(true, Ordering::SeqCst) {
        return "(a copy of an earlier corrupt image was kept)".to_string();
    }
    let dst = std::env::temp_dir().join(format!("snapfs-crash-failure-{}.qcow2", unique()));
    match std::fs::copy(img, &dst) {
        Ok(_) => format!("(image kept as {})", dst.display()),
        Err(e) => format!("(could not keep a copy of the image: {e})"),
    }
}

/// `key value, key value` of a counter map, for summaries.
pub fn counters<K: std::fmt::Debug, V: std::fmt::Display>(
    m: impl IntoIterator<Item = (K, V)>,
) -> String {
    let mut out = String::new();
    for (k, v) in m {
        if !out.is_empty() {
            out.push_str(", ");
        }
        let _ = write!(out, "{k:?} {v}");
    }
    out
}
