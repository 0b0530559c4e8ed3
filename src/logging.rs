//! Where log records go: standard error, a log file or syslog; which records: `RUST_LOG`.
//!
//! `main` calls [`init`] first (records go to standard error), then, for a mount, picks the
//! destination with [`Destination::for_mount`] and [`set_destination`] *before* the mount code
//! forks into the background: a log file is opened then and its descriptor survives the fork;
//! syslog is opened lazily (`openlog` without `LOG_NDELAY`), so the daemon connects to it itself.
//!
//! While the process that chose a file or syslog runs (up to the fork, or for the whole life of a
//! foreground mount), its records also go to standard error, so that whoever runs `snapfs mount`
//! or `mount -t snapfs` sees the warnings of the start-up. The daemon, a different process, only
//! writes to the destination (its standard error is /dev/null by then).
//!
//! The level comes from `RUST_LOG` (default `warn`), in env_logger's syntax: `info`, `debug`,
//! `snapfs=debug`, `warn,snapfs::control=trace`, ...

use std::ffi::CString;
use std::fs::File;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};

use log::{Level, Log, Metadata, Record};
use parking_lot::Mutex;

/// The filter when `RUST_LOG` is unset or empty.
pub const DEFAULT_FILTER: &str = "warn";

/// Where log records go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Destination {
    /// Standard error: interactive commands and `snapfs mount -f`.
    Stderr,
    /// Appended to this file, one line per record (created mode 0640 if missing).
    File(PathBuf),
    /// syslog(3): ident `snapfs`, facility `LOG_DAEMON`, with the process id; the journal
    /// picks it up (`journalctl -t snapfs`).
    Syslog,
}

impl Destination {
    /// Where a mount logs: a log file when one was given (`--log FILE`, `-o log=FILE`; with
    /// `-f` too, and then also standard error), else standard error in the foreground, else
    /// syslog.
    pub fn for_mount(foreground: bool, log_file: Option<&Path>) -> Destination {
        match log_file {
            Some(file) => Destination::File(file.to_path_buf()),
            None if foreground => Destination::Stderr,
            None => Destination::Syslog,
        }
    }
}

enum Sink {
    Stderr,
    File(File),
    Syslog,
}

struct Logger {
    filter: env_logger::Logger,
    sink: Mutex<Sink>,
    /// The process whose records also go to standard error when the sink is not standard error
    /// (0: none). A forked daemon has another pid, so it stops echoing by itself.
    echo_pid: AtomicU32,
}

static LOGGER: OnceLock<Logger> = OnceLock::new();

/// Installs the logger, writing to standard error, with the level from `RUST_LOG`. Later calls
/// do nothing.
pub fn init() {
    let mut installed = false;
    let logger = LOGGER.get_or_init(|| {
        installed = true;
        // An empty RUST_LOG means the default, not "everything off".
        let spec = std::env::var("RUST_LOG")
            .ok()
            .filter(|v| !v.trim().is_empty())
            .unwrap_or_else(|| DEFAULT_FILTER.to_owned());
        let filter = env_logger::Builder::new().parse_filters(&spec).build();
        Logger {
            filter,
            sink: Mutex::new(Sink::Stderr),
            echo_pid: AtomicU32::new(0),
        }
    });
    if installed && log::set_logger(logger).is_ok() {
        log::set_max_level(logger.filter.filter());
    }
}

/// Sends records to `dest` from now on (installing the logger if [`init`] was not called).
/// A log file is opened here, so an unusable path is an error now, not a silent loss later.
pub fn set_destination(dest: &Destination) -> Result<(), String> {
    init();
    let Some(logger) = LOGGER.get() else {
        return Err("the logger could not be installed".into());
    };
    let (sink, echo) = match dest {
        Destination::Stderr => (Sink::Stderr, 0),
        Destination::File(path) => {
            let file = std::fs::OpenOptions::new()
                .append(true)
                .create(true)
                .mode(0o640)
                .open(path)
                .map_err(|e| {
                    format!(
                        "cannot open the log file {}: {e} (give a writable file with --log FILE or -o log=FILE)",
                        path.display()
                    )
                })?;
            (Sink::File(file), std::process::id())
        }
        Destination::Syslog => {
            // SAFETY: the ident is a static C string, as openlog requires (it keeps the
            // pointer); no LOG_NDELAY, so the socket is opened by the first syslog call, in the
            // process that makes it.
            unsafe { libc::openlog(c"snapfs".as_ptr(), libc::LOG_PID, libc::LOG_DAEMON) };
            (Sink::Syslog, std::process::id())
        }
    };
    *logger.sink.lock() = sink;
    logger.echo_pid.store(echo, Ordering::Relaxed);
    Ok(())
}

impl Log for Logger {
    fn enabled(&self, metadata: &Metadata) -> bool {
        self.filter.enabled(metadata)
    }

    fn log(&self, record: &Record) {
        if is_spurious_unmount_warning(record) {
            return self.emit(
                &Record::builder()
                    .level(Level::Debug)
                    .target(record.target())
                    .module_path(record.module_path())
                    .file(record.file())
                    .line(record.line())
                    .args(*record.args())
                    .build(),
            );
        }
        self.emit(record);
    }

    fn flush(&self) {}
}

impl Logger {
    fn emit(&self, record: &Record) {
        if !self.filter.matches(record) {
            return;
        }
        let message = one_line(&record.args().to_string());
        let sink = self.sink.lock();
        let echo = self.echo_pid.load(Ordering::Relaxed);
        match &*sink {
            Sink::Stderr => write_stderr(record, &message),
            Sink::File(file) => {
                let line = file_line(std::time::SystemTime::now(), record, &message);
                // One write per record: with O_APPEND, lines of several processes sharing the
                // file do not interleave.
                let _ = (&*file).write_all(line.as_bytes());
            }
            Sink::Syslog => {
                let text = CString::new(syslog_text(record, &message).replace('\0', "\\0"))
                    .unwrap_or_default();
                // SAFETY: a constant "%s" format with one valid C string argument.
                unsafe {
                    libc::syslog(
                        libc::LOG_DAEMON | syslog_priority(record.level()),
                        c"%s".as_ptr(),
                        text.as_ptr(),
                    )
                };
            }
        }
        drop(sink);
        if echo != 0 && echo == std::process::id() {
            write_stderr(record, &message);
        }
    }
}

/// fuser unmounts when its session ends; after `umount DIR` (the normal way to end a mount) the
/// file system is already gone and that second unmount fails with EINVAL, which fuser reports
/// as a warning. Nothing is wrong then: the record is demoted to debug.
fn is_spurious_unmount_warning(record: &Record) -> bool {
    record.level() == Level::Warn && record.target().starts_with("fuser") && {
        let text = record.args().to_string();
        text.starts_with("Failed to umount filesystem")
            && text.contains(&format!("(os error {})", libc::EINVAL))
    }
}

fn write_stderr(record: &Record, message: &str) {
    let _ = writeln!(std::io::stderr().lock(), "{}", stderr_line(record, message));
}

/// Whether a record's target says where it comes from better than its message does: records of
/// other crates (fuser, ...) and debugging records.
fn show_target(record: &Record) -> bool {
    let ours = record.target() == "snapfs" || record.target().starts_with("snapfs::");
    !ours || record.level() >= Level::Debug
}

/// `snapfs: warning: MESSAGE`, like the one-line errors of the commands; with the target for
/// debugging records and those of other crates.
fn stderr_line(record: &Record, message: &str) -> String {
    let level = match record.level() {
        Level::Error => "error",
        Level::Warn => "warning",
        Level::Info => "info",
        Level::Debug => "debug",
        Level::Trace => "trace",
    };
    if show_target(record) {
        format!("snapfs: {level}: {}: {message}", record.target())
    } else {
        format!("snapfs: {level}: {message}")
    }
}

/// `2026-11-02T10:31:12.345Z WARN  [4242] snapfs::fs: MESSAGE\n`: RFC 3339 time (UTC), level,
/// process id, target, message.
fn file_line(time: std::time::SystemTime, record: &Record, message: &str) -> String {
    format!(
        "{} {:<5} [{}] {}: {message}\n",
        humantime::format_rfc3339_millis(time),
        record.level(),
        std::process::id(),
        record.target()
    )
}

/// The syslog message: syslog adds the time, `snapfs[PID]:` and the priority.
fn syslog_text(record: &Record, message: &str) -> String {
    if show_target(record) {
        format!("{}: {message}", record.target())
    } else {
        message.to_owned()
    }
}

fn syslog_priority(level: Level) -> libc::c_int {
    match level {
        Level::Error => libc::LOG_ERR,
        Level::Warn => libc::LOG_WARNING,
        Level::Info => libc::LOG_INFO,
        Level::Debug | Level::Trace => libc::LOG_DEBUG,
    }
}

/// A message on one line: line breaks and other control characters escaped.
fn one_line(message: &str) -> String {
    let trimmed = message.trim_end_matches(['\n', '\r']);
    if !trimmed.chars().any(char::is_control) {
        return trimmed.to_owned();
    }
    let mut out = String::with_capacity(trimmed.len() + 8);
    for c in trimmed.chars() {
        match c {
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push('\t'),
            c if c.is_control() => out.push_str(&c.escape_unicode().to_string()),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_record<R>(level: Level, target: &str, f: impl FnOnce(&Record) -> R) -> R {
        f(&Record::builder()
            .level(level)
            .target(target)
            .args(format_args!("x"))
            .build())
    }

    #[test]
    fn destinations_for_mount() {
        assert_eq!(Destination::for_mount(true, None), Destination::Stderr);
        assert_eq!(Destination::for_mount(false, None), Destination::Syslog);
        let f = Path::new("/var/log/snapfs.log");
        assert_eq!(
            Destination::for_mount(false, Some(f)),
            Destination::File(f.into())
        );
        assert_eq!(
            Destination::for_mount(true, Some(f)),
            Destination::File(f.into())
        );
    }

    #[test]
    fn stderr_lines() {
        with_record(Level::Warn, "snapfs::fs", |r| {
            assert_eq!(
                stderr_line(r, "control/delete: no such snapshot"),
                "snapfs: warning: control/delete: no such snapshot"
            );
        });
        with_record(Level::Debug, "snapfs::fs", |r| {
            assert_eq!(stderr_line(r, "m"), "snapfs: debug: snapfs::fs: m");
        });
        with_record(Level::Error, "fuser::session", |r| {
            assert_eq!(stderr_line(r, "m"), "snapfs: error: fuser::session: m");
        });
    }

    #[test]
    fn file_lines() {
        let t = std::time::UNIX_EPOCH + std::time::Duration::from_millis(1_795_000_000_123);
        with_record(Level::Warn, "snapfs::fs", |r| {
            let line = file_line(t, r, "m");
            let pid = std::process::id();
            assert_eq!(
                line,
                format!("2026-11-18T11:06:40.123Z WARN  [{pid}] snapfs::fs: m\n")
            );
        });
    }

    #[test]
    fn syslog_texts_and_priorities() {
        with_record(Level::Warn, "snapfs::control", |r| {
            assert_eq!(syslog_text(r, "m"), "m");
        });
        with_record(Level::Info, "fuser", |r| {
            assert_eq!(syslog_text(r, "m"), "fuser: m");
        });
        assert_eq!(syslog_priority(Level::Error), libc::LOG_ERR);
        assert_eq!(syslog_priority(Level::Warn), libc::LOG_WARNING);
        assert_eq!(syslog_priority(Level::Info), libc::LOG_INFO);
        assert_eq!(syslog_priority(Level::Trace), libc::LOG_DEBUG);
    }

    #[test]
    fn spurious_unmount_warning() {
        let is = |level, target, text: &str| {
            is_spurious_unmount_warning(
                &Record::builder()
                    .level(level)
                    .target(target)
                    .args(format_args!("{text}"))
                    .build(),
            )
        };
        let einval = "Failed to umount filesystem: Invalid argument (os error 22)";
        assert!(is(Level::Warn, "fuser::session", einval));
        assert!(!is(Level::Error, "fuser::session", einval));
        assert!(!is(Level::Warn, "snapfs::mount", einval));
        assert!(!is(
            Level::Warn,
            "fuser::session",
            "Failed to umount filesystem: Device or resource busy (os error 16)"
        ));
    }

    #[test]
    fn messages_stay_on_one_line() {
        assert_eq!(one_line("a\nb\r\n"), "a\\nb");
        assert_eq!(one_line("plain"), "plain");
        assert_eq!(one_line("bell\u{7}"), "bell\\u{7}");
    }
}
