//! How many threads may answer large reads at once.
//!
//! Answering a 1 MiB read of a file that keeps its page cache is mostly the kernel copying the
//! reply into page cache pages, in the daemon thread's `writev`; the reader then allocates and
//! copies those pages again on its side. With as many daemon threads copying as there are cores,
//! the readers wait for a core: on two cores a cold `dd` of a snapshot took 2.0 s with both
//! threads answering its readahead at once, 1.8 s with one (medians of 9). The gate is held for
//! the reply only, not for reading the data, so reads of a host image that is not in the page
//! cache still keep several disk reads in flight. Small reads pass freely: random 4 KiB reads
//! from two readers need both threads. So do replies with `--direct-io`: they go straight into
//! the buffer of a reader that has nothing to do but wait for them.

use parking_lot::{Condvar, Mutex};

/// Reads at least this long go through the gate (the kernel's readahead asks for up to 1 MiB).
pub const LARGE_READ: usize = 256 << 10;

pub struct Gate {
    free: Mutex<usize>,
    freed: Condvar,
}

/// A place in the gate, given back on drop.
pub struct Pass<'a>(&'a Gate);

impl Gate {
    /// A gate for half the cores (at least one thread): the other half is for the readers.
    pub fn for_this_machine() -> Gate {
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        Gate::new((cores / 2).max(1))
    }

    pub fn new(places: usize) -> Gate {
        Gate {
            free: Mutex::new(places.max(1)),
            freed: Condvar::new(),
        }
    }

    /// Waits for a free place.
    pub fn enter(&self) -> Pass<'_> {
        let mut free = self.free.lock();
        while *free == 0 {
            self.freed.wait(&mut free);
        }
        *free -= 1;
        Pass(self)
    }
}

impl Drop for Pass<'_> {
    fn drop(&mut self) {
        *self.0.free.lock() += 1;
        self.0.freed.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn never_lets_more_through_than_it_has_places() {
        let gate = Arc::new(Gate::new(2));
        let inside = Arc::new(AtomicUsize::new(0));
        let most = Arc::new(AtomicUsize::new(0));
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let (gate, inside, most) = (gate.clone(), inside.clone(), most.clone());
                std::thread::spawn(move || {
                    for _ in 0..200 {
                        let _pass = gate.enter();
                        let now = inside.fetch_add(1, Ordering::SeqCst) + 1;
                        most.fetch_max(now, Ordering::SeqCst);
                        std::thread::yield_now();
                        inside.fetch_sub(1, Ordering::SeqCst);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().expect("a test thread panicked");
        }
        assert_eq!(most.load(Ordering::SeqCst), 2);
        assert_eq!(*gate.free.lock(), 2);
    }
}
