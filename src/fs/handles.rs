//! Open files and the files a running command has claimed. A command may not change or remove a
//! file that is open, and a claimed file cannot be opened until the command ends. Each open
//! gets a handle that remembers who opened it: a command written through it runs as the
//! opener, as a file descriptor carries its opener's rights (writes the kernel sends on its own,
//! such as the write-back of a mapped page, carry no caller at all).

use std::collections::{HashMap, HashSet};

use fuser::Errno;

use crate::access::Caller;

/// One open file.
#[derive(Debug, Clone)]
struct OpenFile {
    /// The inodes this handle holds open: the file's own, and for a file of `changes/` the two
    /// views it reads (a command may not remove or revert them under a copy).
    inos: Vec<u64>,
    opener: Caller,
}

#[derive(Debug, Default)]
pub struct Handles {
    /// Handle 0 is never given out (directories use it).
    next: u64,
    by_handle: HashMap<u64, OpenFile>,
    /// How many handles each inode has open.
    open: HashMap<u64, u32>,
    claimed: HashSet<u64>,
}

impl Handles {
    /// Opens `ino` for `opener`; EBUSY while a command has claimed it.
    pub fn open(&mut self, ino: u64, opener: Caller) -> Result<u64, Errno> {
        self.open_with(&[ino], opener)
    }

    /// Opens a file that reads the files `inos` (its own inode first): each of them counts as
    /// open until the handle is released; EBUSY while a command has claimed any.
    pub fn open_with(&mut self, inos: &[u64], opener: Caller) -> Result<u64, Errno> {
        if inos.iter().any(|ino| self.claimed.contains(ino)) {
            return Err(Errno::EBUSY);
        }
        self.next += 1;
        let handle = self.next;
        for ino in inos {
            *self.open.entry(*ino).or_insert(0) += 1;
        }
        let inos = inos.to_vec();
        self.by_handle.insert(handle, OpenFile { inos, opener });
        Ok(handle)
    }

    /// Closes a handle (unknown handles are ignored).
    pub fn release(&mut self, handle: u64) {
        let Some(file) = self.by_handle.remove(&handle) else {
            return;
        };
        for ino in file.inos {
            if let Some(n) = self.open.get_mut(&ino) {
                *n -= 1;
                if *n == 0 {
                    self.open.remove(&ino);
                }
            }
        }
    }

    /// Who opened `handle`.
    pub fn opener(&self, handle: u64) -> Option<&Caller> {
        self.by_handle.get(&handle).map(|f| &f.opener)
    }

    /// Whether `ino` is open; if it is not, it stays closed (claimed) until [`Handles::end_claims`],
    /// so that an open cannot slip in between a command's check and its change.
    pub fn is_open_else_claim(&mut self, ino: u64) -> bool {
        if self.open.contains_key(&ino) {
            return true;
        }
        self.claimed.insert(ino);
        false
    }

    /// The running command has ended: every claimed file may be opened again.
    pub fn end_claims(&mut self) {
        self.claimed.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn open_release_and_claims() {
        let mut h = Handles::default();
        let a = h.open(3, Caller::root()).unwrap();
        let b = h.open(3, Caller::anyone()).unwrap();
        assert_ne!(a, b);
        assert_ne!(a, 0);
        assert_eq!(h.opener(b), Some(&Caller::anyone()));
        assert!(h.is_open_else_claim(3));
        h.release(a);
        assert!(h.is_open_else_claim(3), "still open through b");
        h.release(b);
        h.release(b);
        assert!(!h.is_open_else_claim(3), "closed: now claimed");
        assert_eq!(h.open(3, Caller::root()), Err(Errno::EBUSY));
        assert!(h.opener(a).is_none());
        h.end_claims();
        assert!(h.open(3, Caller::root()).is_ok());
    }

    #[test]
    fn a_change_file_holds_its_views_open() {
        let mut h = Handles::default();
        let c = h.open_with(&[1 << 48, 3, 100], Caller::root()).unwrap();
        assert!(h.is_open_else_claim(3));
        assert!(h.is_open_else_claim(100));
        h.release(c);
        assert!(!h.is_open_else_claim(100), "closed: now claimed");
        assert_eq!(
            h.open_with(&[1 << 48, 3, 100], Caller::root()),
            Err(Errno::EBUSY)
        );
    }
}
