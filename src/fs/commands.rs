//! The command queue: commands written to the control files run one at a time on a worker
//! thread of their own, never on the threads that serve requests. A write to a command file
//! hands its command (and its reply) to the queue and returns to serving at once; the worker
//! replies when the command has finished, so the writer's `write` still returns only then.
//! While a long commit runs and more commands wait behind it, reads, `stat` and
//! `control/status` go on being answered.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::mpsc;
use std::thread::JoinHandle;

use fuser::{Errno, ReplyWrite};
use parking_lot::Mutex;

use crate::control::{CommandError, CommandKind};

/// Queues the command `input` written to `control/KIND` and answers that write once `run` has
/// run it: with the bytes written, or with the errno of its failure, of a refusal to queue it,
/// or of the mount going away first. `queue` is `None` until the mount serves.
pub fn submit_write(
    queue: Option<&CommandQueue>,
    kind: CommandKind,
    input: Vec<u8>,
    reply: ReplyWrite,
    run: impl FnOnce(&[u8]) -> Result<(), CommandError> + Send + 'static,
) {
    let label = format!(
        "{} {}",
        kind.file_name(),
        String::from_utf8_lossy(&input).trim()
    );
    let job: Job = Box::new(move |refused| {
        if let Some(errno) = refused {
            return reply.error(errno);
        }
        match run(&input) {
            Ok(()) => reply.written(input.len() as u32),
            Err(e) => {
                log::warn!("control/{}: {}", kind.file_name(), e.message);
                reply.error(Errno::from_i32(e.errno))
            }
        }
    });
    let Some(queue) = queue else {
        return job(Some(Errno::ENOTCONN));
    };
    if let Err((errno, job)) = queue.submit(label, job) {
        log::warn!("control/{}: not queued: {errno:?}", kind.file_name());
        job(Some(errno));
    }
}

/// Commands that may wait at once; more are refused (EAGAIN) rather than held in memory.
pub const MAX_WAITING: usize = 64;

/// A command to run: called with `None` to run it, or with the errno its writer gets when it
/// will not run (the mount is going away before its turn came, or too many wait).
pub type Job = Box<dyn FnOnce(Option<Errno>) + Send>;

pub struct CommandQueue {
    sender: Mutex<Option<mpsc::Sender<(u64, Job)>>>,
    worker: Mutex<Option<JoinHandle<()>>>,
    /// The commands waiting for their turn (not the running one), with their ids.
    waiting: Arc<Mutex<VecDeque<(u64, String)>>>,
    next_id: Mutex<u64>,
}

impl CommandQueue {
    pub fn start() -> std::io::Result<CommandQueue> {
        let (sender, receiver) = mpsc::channel::<(u64, Job)>();
        let waiting: Arc<Mutex<VecDeque<(u64, String)>>> = Arc::default();
        let shared = waiting.clone();
        let worker = std::thread::Builder::new()
            .name("commands".into())
            .spawn(move || {
                while let Ok((id, job)) = receiver.recv() {
                    let still_queued = {
                        let mut waiting = shared.lock();
                        let position = waiting.iter().position(|(i, _)| *i == id);
                        position.and_then(|p| waiting.remove(p)).is_some()
                    };
                    // A job no longer listed was dropped by `shutdown`.
                    job((!still_queued).then_some(Errno::ENOTCONN));
                }
            })?;
        Ok(CommandQueue {
            sender: Mutex::new(Some(sender)),
            worker: Mutex::new(Some(worker)),
            waiting,
            next_id: Mutex::new(0),
        })
    }

    /// Queues `job` (shown as `label` while it waits). EAGAIN when [`MAX_WAITING`] commands
    /// wait already, ENOTCONN once the queue is shut down; the job is then not run and the
    /// caller answers its writer.
    pub fn submit(&self, label: String, job: Job) -> Result<(), (Errno, Job)> {
        let sender = self.sender.lock();
        let Some(sender) = sender.as_ref() else {
            return Err((Errno::ENOTCONN, job));
        };
        let id = {
            let mut waiting = self.waiting.lock();
            if waiting.len() >= MAX_WAITING {
                return Err((Errno::EAGAIN, job));
            }
            let mut next = self.next_id.lock();
            *next += 1;
            waiting.push_back((*next, label));
            *next
        };
        sender
            .send((id, job))
            .map_err(|mpsc::SendError((id, job))| {
                self.waiting.lock().retain(|(i, _)| *i != id);
                (Errno::ENOTCONN, job)
            })
    }

    /// One `waiting: LABEL` line per command waiting for its turn, oldest first.
    pub fn waiting_text(&self) -> String {
        self.waiting
            .lock()
            .iter()
            .map(|(_, label)| format!("waiting: {label}\n"))
            .collect()
    }

    /// Lets the running command finish, answers the waiting ones without running them, and
    /// stops the worker. Returns once it has stopped.
    pub fn shutdown(&self) {
        drop(self.sender.lock().take());
        self.waiting.lock().clear();
        if let Some(worker) = self.worker.lock().take()
            && worker.join().is_err()
        {
            log::error!("the command thread panicked");
        }
    }
}

impl Drop for CommandQueue {
    fn drop(&mut self) {
        self.shutdown();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc::{Receiver, Sender, channel};

    /// A job that waits for `go`, then reports (its number, whether it was skipped).
    fn job(n: u32, go: Option<Receiver<()>>, done: Sender<(u32, bool)>) -> Job {
        Box::new(move |refused| {
            let skipped = refused.is_some();
            if let Some(go) = go {
                let _ = go.recv();
            }
            let _ = done.send((n, skipped));
        })
    }

    #[test]
    fn a_running_command_blocks_neither_submitting_nor_status() {
        let queue = CommandQueue::start().unwrap();
        let (done, results) = channel();
        let (go, wait) = channel();
        queue
            .submit("commit (top)".into(), job(1, Some(wait), done.clone()))
            .unwrap_or_else(|_| panic!("submit"));
        for n in 2..5 {
            queue
                .submit(format!("create s{n}"), job(n, None, done.clone()))
                .unwrap_or_else(|_| panic!("submit"));
        }
        // Job 1 runs (and waits); the others wait behind it, and say so.
        let text = loop {
            let t = queue.waiting_text();
            if !t.contains("commit") {
                break t;
            }
            std::thread::yield_now();
        };
        assert_eq!(
            text,
            "waiting: create s2\nwaiting: create s3\nwaiting: create s4\n"
        );
        assert!(results.try_recv().is_err(), "nothing finished yet");
        go.send(()).unwrap();
        let order: Vec<(u32, bool)> = (0..4).map(|_| results.recv().unwrap()).collect();
        assert_eq!(order, [(1, false), (2, false), (3, false), (4, false)]);
        assert_eq!(queue.waiting_text(), "");
    }

    #[test]
    fn shutdown_finishes_the_running_command_and_skips_the_rest() {
        let queue = CommandQueue::start().unwrap();
        let (done, results) = channel();
        let (go, wait) = channel();
        queue
            .submit("a".into(), job(1, Some(wait), done.clone()))
            .unwrap_or_else(|_| panic!("submit"));
        queue
            .submit("b".into(), job(2, None, done.clone()))
            .unwrap_or_else(|_| panic!("submit"));
        while queue.waiting_text().contains("waiting: a") {
            std::thread::yield_now();
        }
        let queue = Arc::new(queue);
        let stopping = queue.clone();
        let stopper = std::thread::spawn(move || stopping.shutdown());
        // Job 1 runs (waiting for `go`) until shutdown has dropped job 2 from the list.
        while !queue.waiting_text().is_empty() {
            std::thread::yield_now();
        }
        go.send(()).unwrap();
        stopper.join().unwrap();
        let got: Vec<(u32, bool)> = results.try_iter().collect();
        assert_eq!(got, [(1, false), (2, true)]);
        let refused = queue.submit("c".into(), job(3, None, done));
        assert!(matches!(refused, Err((Errno::ENOTCONN, _))));
    }

    #[test]
    fn too_many_waiting_are_refused() {
        let queue = CommandQueue::start().unwrap();
        let (done, _results) = channel();
        let (go, wait) = channel();
        queue
            .submit("first".into(), job(0, Some(wait), done.clone()))
            .unwrap_or_else(|_| panic!("submit"));
        while queue.waiting_text().contains("first") {
            std::thread::yield_now();
        }
        for n in 0..MAX_WAITING as u32 {
            queue
                .submit(format!("c{n}"), job(n, None, done.clone()))
                .unwrap_or_else(|_| panic!("submit {n}"));
        }
        let refused = queue.submit("one too many".into(), job(99, None, done));
        assert!(matches!(refused, Err((Errno::EAGAIN, _))));
        go.send(()).unwrap();
    }
}
