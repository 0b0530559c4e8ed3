//! What a caller may do to each file of the mount, from what they may do to the files behind
//! it (docs/security.md): reading a view needs read permission on every layer it reads, writing
//! `live.raw` (and every command) write permission on the top image; `info.json`, `status` and
//! `snapshots/` describe the whole chain and need read permission on every layer; the mount's
//! root and `control/` hold fixed names and are open to whoever may read or write the top. The
//! same rule gives the mode bits `stat` shows, class by class (owner, group, others), so that
//! they never show more than the files give. No FUSE calls here: the adapter asks, these
//! functions answer with bits or an errno.

use fuser::Errno;

use crate::access::{Caller, EXEC, LayerPerms, READ, WRITE};

/// Which files a node's content comes from, and so what it takes to read or write it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Guard {
    /// A view that reads layers `from..` of the chain; `writable` for `live.raw` on a
    /// read-write mount (it writes the top only).
    View { from: usize, writable: bool },
    /// `info.json` and `control/status`: text about every file of the chain.
    ChainText,
    /// `control/create` .. `commit`: a command changes the top image.
    Command,
    /// The mount's root and `control/`: fixed names.
    Entry,
    /// `snapshots/`: names that come from every file of the chain.
    SnapshotsDir,
}

/// The rwx bits a node gives someone who has `layers[i]` (rwx bits) on layer `i` (top first).
pub fn node_bits(guard: Guard, layers: &[u16]) -> u16 {
    let reads_from = |from: usize| {
        let files = layers.get(from..).unwrap_or_default();
        !files.is_empty() && files.iter().all(|b| b & READ != 0)
    };
    let top = layers.first().copied().unwrap_or(0);
    let read = |from| if reads_from(from) { READ } else { 0 };
    match guard {
        Guard::View { from, writable } => read(from) | if writable { top & WRITE } else { 0 },
        Guard::ChainText => read(0),
        Guard::Command => top & WRITE,
        Guard::Entry if top & (READ | WRITE) != 0 => READ | EXEC,
        Guard::Entry => 0,
        Guard::SnapshotsDir if reads_from(0) => READ | EXEC,
        Guard::SnapshotsDir => 0,
    }
}

/// Whether `who` may do all of `want` to a node whose content comes from `layers`.
pub fn allows(guard: Guard, layers: &[LayerPerms], who: &Caller, want: u16) -> bool {
    let bits: Vec<u16> = layers.iter().map(|l| l.rights(who)).collect();
    node_bits(guard, &bits) & want == want
}

/// The permission bits `stat` shows for a node owned (as shown) by `uid`:`gid`: for each class
/// what the mode bits of the layers give it (the owner as that user, the group as a member who
/// owns nothing, others as anyone), so that `stat` never shows more access than the files give.
pub fn mode(guard: Guard, layers: &[LayerPerms], uid: u32, gid: u32) -> u16 {
    let class = |who: &Caller| {
        let bits: Vec<u16> = layers.iter().map(|l| l.bits(who)).collect();
        node_bits(guard, &bits)
    };
    // The owner shown as that user in no group: their groups are unknown here, and the owner
    // class must not show what only a group membership would give.
    let owner = Caller {
        uid,
        gid: u32::MAX,
        groups: Vec::new(),
    };
    class(&owner) << 6 | class(&Caller::member_of(gid)) << 3 | class(&Caller::anyone())
}

/// What `chmod`, `chown` or `utimes` asks for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MetadataChange {
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    /// atime or mtime (to a time or to now).
    pub times: bool,
}

impl MetadataChange {
    pub fn is_empty(&self) -> bool {
        *self == MetadataChange::default()
    }
}

/// Decides a metadata change on a node shown as `uid`:`gid` with permission bits `perm`. Modes,
/// owners and times of the mount's files are computed from the image files, so snapfs cannot
/// keep a change: a non-owner gets EPERM as on any file system, and so does the owner (or root)
/// for anything that would change what `stat` shows (a success that changed nothing would
/// mislead `cp -p`, `rsync` and backup tools). A change to what is shown already succeeds.
pub fn metadata_change(
    change: &MetadataChange,
    who: &Caller,
    uid: u32,
    gid: u32,
    perm: u16,
) -> Result<(), Errno> {
    if change.is_empty() {
        return Ok(());
    }
    if !who.is_root() && who.uid != uid {
        return Err(Errno::EPERM);
    }
    let unchanged = !change.times
        && change.mode.is_none_or(|m| m & 0o7777 == perm as u32)
        && change.uid.is_none_or(|u| u == uid)
        && change.gid.is_none_or(|g| g == gid);
    if unchanged { Ok(()) } else { Err(Errno::EPERM) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::access::FilePerms;

    const RW: u16 = READ | WRITE;

    #[test]
    fn a_view_needs_every_layer_it_reads() {
        let live = Guard::View {
            from: 0,
            writable: true,
        };
        assert_eq!(node_bits(live, &[RW, READ]), RW);
        assert_eq!(node_bits(live, &[RW, 0]), WRITE, "writes only the top");
        assert_eq!(node_bits(live, &[READ, READ]), READ);
        let base = Guard::View {
            from: 1,
            writable: false,
        };
        assert_eq!(node_bits(base, &[0, READ]), READ, "the top is not read");
        assert_eq!(node_bits(base, &[RW, 0]), 0);
        assert_eq!(
            node_bits(base, &[RW]),
            0,
            "a layer past the end reads nothing"
        );
    }

    #[test]
    fn commands_directories_and_texts() {
        assert_eq!(node_bits(Guard::Command, &[RW, 0]), WRITE);
        assert_eq!(node_bits(Guard::Command, &[READ, RW]), 0);
        assert_eq!(node_bits(Guard::ChainText, &[RW, 0]), 0);
        assert_eq!(node_bits(Guard::ChainText, &[READ, READ]), READ);
        assert_eq!(node_bits(Guard::Entry, &[WRITE, 0]), READ | EXEC);
        assert_eq!(node_bits(Guard::Entry, &[0, RW]), 0);
        assert_eq!(node_bits(Guard::SnapshotsDir, &[READ, 0]), 0);
        assert_eq!(node_bits(Guard::SnapshotsDir, &[READ, READ]), READ | EXEC);
    }

    fn layer(uid: u32, gid: u32, mode: u32) -> LayerPerms {
        crate::access::tests_support::layer(FilePerms {
            uid,
            gid,
            mode: libc::S_IFREG | mode,
            acl: None,
        })
    }

    #[test]
    fn modes_are_the_intersection_class_by_class() {
        // A root 0644 overlay over a root 0600 base: nobody but root reads the base.
        let chain = [layer(0, 0, 0o644), layer(0, 0, 0o600)];
        let base = Guard::View {
            from: 1,
            writable: false,
        };
        assert_eq!(mode(base, &chain, 0, 0), 0o400);
        let live = Guard::View {
            from: 0,
            writable: true,
        };
        assert_eq!(mode(live, &chain, 0, 0), 0o600);
        // A user's 0644 overlay over root's 0600 base: the user may write live.raw, not read it.
        let chain = [layer(1000, 1000, 0o644), layer(0, 0, 0o600)];
        assert_eq!(mode(live, &chain, 1000, 1000), 0o200);
        // uid= shows another owner; the bits are what that user has, not the top's owner bits.
        let chain = [layer(0, 0, 0o644)];
        assert_eq!(mode(live, &chain, 1000, 1000), 0o444);
        assert_eq!(mode(live, &chain, 0, 0), 0o644);
        assert_eq!(mode(Guard::Command, &chain, 0, 0), 0o200);
        assert_eq!(mode(Guard::Entry, &chain, 0, 0), 0o555);
    }

    #[test]
    fn callers_get_what_the_files_give_them() {
        let chain = [layer(1000, 1000, 0o644), layer(0, 0, 0o600)];
        let u = Caller {
            uid: 1000,
            gid: 1000,
            groups: vec![],
        };
        let live = Guard::View {
            from: 0,
            writable: true,
        };
        assert!(!allows(live, &chain, &u, READ));
        assert!(allows(live, &chain, &u, WRITE));
        assert!(allows(live, &chain, &Caller::root(), READ | WRITE));
        assert!(!allows(live, &chain, &Caller::root(), EXEC));
    }

    #[test]
    fn metadata_changes() {
        let owner = Caller {
            uid: 1000,
            gid: 1000,
            groups: vec![],
        };
        let other = Caller {
            uid: 2000,
            ..owner.clone()
        };
        let chmod = MetadataChange {
            mode: Some(0o100666),
            ..Default::default()
        };
        let same = MetadataChange {
            mode: Some(0o100644),
            uid: Some(1000),
            ..Default::default()
        };
        let touch = MetadataChange {
            times: true,
            ..Default::default()
        };
        assert_eq!(
            metadata_change(&chmod, &other, 1000, 1000, 0o644),
            Err(Errno::EPERM)
        );
        assert_eq!(
            metadata_change(&same, &other, 1000, 1000, 0o644),
            Err(Errno::EPERM)
        );
        assert_eq!(
            metadata_change(&chmod, &owner, 1000, 1000, 0o644),
            Err(Errno::EPERM)
        );
        assert_eq!(metadata_change(&same, &owner, 1000, 1000, 0o644), Ok(()));
        assert_eq!(
            metadata_change(&touch, &Caller::root(), 1000, 1000, 0o644),
            Err(Errno::EPERM)
        );
        assert_eq!(
            metadata_change(&MetadataChange::default(), &other, 1000, 1000, 0o644),
            Ok(())
        );
    }
}
