//! The extended attributes of a view's file (`user.snapfs.*`): what a backup agent reads to
//! know what a file is (its kind, libvirt name and state, whether its bytes can change under
//! it), and the answers to `getxattr`/`listxattr` as the calls define them.

use fuser::Errno;

use crate::catalog::ViewEntry;
use crate::info;
use crate::sharing::Consistency;

/// Every name this file system answers starts so; no others exist.
pub const PREFIX: &[u8] = b"user.snapfs.";

/// The attributes of `entry`, in the order `listxattr` lists them. `consistency`: whether the
/// view's bytes can change under a reader.
pub fn of_view(entry: &ViewEntry, consistency: Consistency) -> Vec<(&'static str, String)> {
    let mut list = vec![
        ("user.snapfs.kind", entry.kind.as_str().to_owned()),
        ("user.snapfs.consistency", consistency.as_str().to_owned()),
        ("user.snapfs.id", entry.id.clone()),
        ("user.snapfs.layer", entry.layer_path.display().to_string()),
        ("user.snapfs.vm-state-size", entry.vm_state_size.to_string()),
    ];
    // A time before the epoch is a snapshot without one (QEMU writes 0).
    if let Some(t) = entry.created.filter(|t| *t >= std::time::UNIX_EPOCH) {
        list.push(("user.snapfs.created", info::rfc3339(t)));
    }
    if let Some(p) = &entry.parent {
        list.push(("user.snapfs.parent", p.clone()));
    }
    if let Some(d) = &entry.description {
        list.push(("user.snapfs.description", d.clone()));
    }
    if let Some(state) = &entry.state {
        list.push(("user.snapfs.state", state.clone()));
    }
    if entry.libvirt_name.is_some() {
        list.push(("user.snapfs.current", entry.current.to_string()));
    }
    list
}

/// The `listxattr` buffer: the names, each ended by a NUL.
pub fn names(list: &[(&'static str, String)]) -> Vec<u8> {
    let mut names = Vec::new();
    for (name, _) in list {
        names.extend_from_slice(name.as_bytes());
        names.push(0);
    }
    names
}

/// What an xattr call answers for `data` when the caller's buffer holds `size` bytes.
#[derive(Debug, PartialEq, Eq)]
pub enum Answer<'a> {
    /// `size` 0 asks how large the buffer must be.
    Size(u32),
    Data(&'a [u8]),
    /// The buffer is too small (ERANGE).
    TooSmall,
}

impl Answer<'_> {
    pub fn to(size: u32, data: &[u8]) -> Answer<'_> {
        if size == 0 {
            Answer::Size(data.len() as u32)
        } else if (size as usize) < data.len() {
            Answer::TooSmall
        } else {
            Answer::Data(data)
        }
    }
}

/// Sends an [`Answer`].
pub fn reply(reply: fuser::ReplyXattr, size: u32, data: &[u8]) {
    match Answer::to(size, data) {
        Answer::Size(n) => reply.size(n),
        Answer::Data(data) => reply.data(data),
        Answer::TooSmall => reply.error(Errno::ERANGE),
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;
    use std::sync::Arc;
    use std::time::{Duration, UNIX_EPOCH};

    use super::*;
    use crate::catalog::{Part, ViewKind};

    fn entry(created: Option<std::time::SystemTime>, libvirt: bool) -> ViewEntry {
        ViewEntry {
            file_name: "before-upgrade.raw".into(),
            kind: ViewKind::Internal,
            id: "1".into(),
            state: libvirt.then(|| "shutoff".into()),
            current: true,
            libvirt_name: libvirt.then(|| "before-upgrade".into()),
            tag: "before-upgrade".into(),
            created,
            parent: None,
            description: Some("a description".into()),
            layer_path: PathBuf::from("/images/vm.qcow2"),
            layer: 0,
            snapshot_id: Some(b"1".to_vec()),
            vm_state_size: 0,
            part: Part::Disk,
            view: Arc::new(super::super::files::tests::memory_disk()),
        }
    }

    #[test]
    fn a_snapshot_lists_what_it_is_and_libvirt_state_only_when_libvirt_knows_it() {
        let at = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let list = of_view(&entry(Some(at), true), Consistency::Frozen);
        let get = |name: &str| {
            list.iter()
                .find(|(n, _)| *n == name)
                .map(|(_, v)| v.as_str())
        };
        assert_eq!(get("user.snapfs.kind"), Some("internal"));
        assert_eq!(get("user.snapfs.consistency"), Some("frozen"));
        assert_eq!(get("user.snapfs.layer"), Some("/images/vm.qcow2"));
        assert_eq!(get("user.snapfs.created"), Some("2023-11-14T22:13:20Z"));
        assert_eq!(get("user.snapfs.state"), Some("shutoff"));
        assert_eq!(get("user.snapfs.current"), Some("true"));
        assert!(list.iter().all(|(n, _)| n.as_bytes().starts_with(PREFIX)));

        let bare = of_view(&entry(None, false), Consistency::BestEffort);
        let names: Vec<_> = bare.iter().map(|(n, _)| *n).collect();
        assert!(!names.contains(&"user.snapfs.state"));
        assert!(!names.contains(&"user.snapfs.current"));
        assert!(!names.contains(&"user.snapfs.created"));
        assert!(names.contains(&"user.snapfs.description"));
    }

    #[test]
    fn list_names_end_in_nul_and_a_small_buffer_gets_erange() {
        let list = vec![
            ("user.snapfs.kind", "live".to_owned()),
            ("user.snapfs.id", "0".into()),
        ];
        let names = names(&list);
        assert_eq!(names, b"user.snapfs.kind\0user.snapfs.id\0");
        assert_eq!(Answer::to(0, &names), Answer::Size(names.len() as u32));
        assert_eq!(Answer::to(4, &names), Answer::TooSmall);
        assert_eq!(Answer::to(4096, &names), Answer::Data(&names[..]));
    }
}
