//! The status log `control/status` shows: the outcome of recent commands (and reports such as
//! skipped libvirt files), then the progress line of the command running now.

use std::collections::VecDeque;

use parking_lot::Mutex;

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
}
