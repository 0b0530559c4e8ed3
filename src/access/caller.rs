//! Who asks: the ids a request carries and the caller's supplementary groups.

/// A process asking snapfs for something: its file-system uid and gid and its supplementary
/// groups.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<u32>,
}

impl Caller {
    pub fn root() -> Caller {
        Caller {
            uid: 0,
            gid: 0,
            groups: Vec::new(),
        }
    }

    /// The caller of a FUSE request: the request carries the fs uid and gid of thread `pid`;
    /// the supplementary groups come from `/proc/PID/status`. When that cannot be read (the
    /// request came from the kernel itself, pid 0, or the thread is gone) the caller has no
    /// supplementary groups, which can only refuse more, but for a file whose group has fewer
    /// bits than others (`0604`), where it can only be given what others are.
    pub fn of_request(uid: u32, gid: u32, pid: u32) -> Caller {
        let groups = match pid {
            0 => Vec::new(),
            _ => std::fs::read_to_string(format!("/proc/{pid}/status"))
                .map(|s| groups_of_status(&s))
                .unwrap_or_default(),
        };
        Caller { uid, gid, groups }
    }

    /// Someone who is nobody in particular: no file's owner, in no group (what a file gives its
    /// "others").
    pub fn anyone() -> Caller {
        Caller {
            uid: u32::MAX,
            gid: u32::MAX,
            groups: Vec::new(),
        }
    }

    /// A member of group `gid` who owns nothing (what a file gives its group class).
    pub fn member_of(gid: u32) -> Caller {
        Caller {
            uid: u32::MAX,
            gid,
            groups: Vec::new(),
        }
    }

    pub fn is_root(&self) -> bool {
        self.uid == 0
    }

    /// Whether the caller is in `gid`, as primary or supplementary group.
    pub fn in_group(&self, gid: u32) -> bool {
        self.gid == gid || self.groups.contains(&gid)
    }
}

/// The `Groups:` line of a `/proc/PID/status` text.
pub fn groups_of_status(status: &str) -> Vec<u32> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("Groups:"))
        .map(|g| {
            g.split_whitespace()
                .filter_map(|n| n.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_groups_line() {
        let status =
            "Name:\tcat\nUid:\t1000\t1000\t1000\t1000\nGroups:\t4 24 27 1000 \nVmPeak:\t1 kB\n";
        assert_eq!(groups_of_status(status), [4, 24, 27, 1000]);
        assert_eq!(groups_of_status("Groups:\t\n"), Vec::<u32>::new());
        assert_eq!(groups_of_status("Name:\tx\n"), Vec::<u32>::new());
    }

    #[test]
    fn this_process_has_its_own_groups() {
        let me = Caller::of_request(0, 0, std::process::id());
        // SAFETY: getgroups with a zero size only counts.
        let n = unsafe { libc::getgroups(0, std::ptr::null_mut()) };
        assert_eq!(me.groups.len(), n as usize);
        assert!(Caller::of_request(5, 6, 0).groups.is_empty());
    }
}
