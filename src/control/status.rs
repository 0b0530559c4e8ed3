//! The status log `control/status` shows: the outcome of recent commands (and reports such as
//! skipped libvirt files), then the progress line of the command running now.

use std::collections::VecDeque;
use std::time::SystemTime;

use parking_lot::Mutex;

use super::{Command, CommandError, CommandKind, label, parse};
use crate::info::rfc3339;

/// Lines of history `control/status` keeps.
const STATUS_LINES: usize = 64;

#[derive(Debug, Default)]
pub struct StatusLog {
    lines: Mutex<VecDeque<String>>,
    /// The progress line of the command running now.
    progress: Mutex<Option<String>>,
}

impl StatusLog {
    /// Adds a line, dropping the oldest beyond [`STATUS_LINES`].
    pub fn note(&self, line: String) {
        let mut lines = self.lines.lock();
        if lines.len() == STATUS_LINES {
            lines.pop_front();
        }
        lines.push_back(line);
    }

    pub fn set_progress(&self, line: Option<String>) {
        *self.progress.lock() = line;
    }

    /// The history, then the progress line, one per line.
    pub fn text(&self) -> String {
        let mut text = String::new();
        for line in self.lines.lock().iter() {
            text.push_str(line);
            text.push('\n');
        }
        if let Some(line) = self.progress.lock().as_ref() {
            text.push_str(line);
            text.push('\n');
        }
        text
    }
}

/// A command as the status log records it: what was written (its label) and when.
pub struct LoggedCommand {
    label: String,
    started: SystemTime,
}

impl LoggedCommand {
    /// Parses `input`, written to `kind`: the command (or why it is refused), and its record.
    pub fn parse(kind: CommandKind, input: &[u8]) -> (Result<Command, CommandError>, Self) {
        let started = SystemTime::now();
        let command = parse(kind, input);
        let label = label(kind, &command);
        (command, LoggedCommand { label, started })
    }

    pub fn label(&self) -> &str {
        &self.label
    }

    /// The status line of the command once it ended: `TIME LABEL SCOPE: ok (DETAIL)` (without
    /// the parentheses when there is no detail) or `TIME LABEL SCOPE: error: MESSAGE`.
    pub fn line(&self, scope: &str, outcome: Result<Option<&str>, &CommandError>) -> String {
        let outcome = match outcome {
            Ok(Some(detail)) => format!("ok ({detail})"),
            Ok(None) => "ok".to_owned(),
            Err(e) => format!("error: {}", e.message),
        };
        format!("{} {}{scope}: {outcome}", rfc3339(self.started), self.label)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_last_lines_then_the_progress() {
        let log = StatusLog::default();
        for i in 0..STATUS_LINES + 3 {
            log.note(format!("line {i}"));
        }
        log.set_progress(Some("commit: 50%".into()));
        let text = log.text();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), STATUS_LINES + 1);
        assert_eq!(lines[0], "line 3");
        assert_eq!(lines[STATUS_LINES], "commit: 50%");
        log.set_progress(None);
        assert!(!log.text().contains("commit"));
    }

    #[test]
    fn a_status_line_names_the_command_and_its_outcome() {
        let (command, logged) = LoggedCommand::parse(CommandKind::Delete, b"\"a b\"\n");
        assert!(matches!(command, Ok(Command::Delete { name }) if name == "a b"));
        let line = logged.line(" (domain)", Ok(Some("on vda")));
        assert!(
            line.ends_with(" delete \"a b\" (domain): ok (on vda)"),
            "{line}"
        );
        assert!(logged.line("", Ok(None)).ends_with(" delete \"a b\": ok"));
        let refused = CommandError::new(libc::ENOENT, "no snapshot \"a b\"");
        let line = logged.line("", Err(&refused));
        assert!(line.ends_with(": error: no snapshot \"a b\""), "{line}");
    }
}
