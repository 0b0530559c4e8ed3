//! POSIX access ACLs as the kernel stores them in the `system.posix_acl_access` extended
//! attribute (`include/uapi/linux/posix_acl_xattr.h`): a little-endian header `a_version = 2`,
//! then entries of `{ u16 e_tag, u16 e_perm, u32 e_id }`, sorted by tag (owner, named users,
//! owning group, named groups, mask, others), ids by value within a tag.

/// `ACL_USER_OBJ`: the file's owner.
pub const USER_OBJ: u16 = 0x01;
/// `ACL_USER`: a named user.
pub const USER: u16 = 0x02;
/// `ACL_GROUP_OBJ`: the file's group.
pub const GROUP_OBJ: u16 = 0x04;
/// `ACL_GROUP`: a named group.
pub const GROUP: u16 = 0x08;
/// `ACL_MASK`: the most any named entry or the owning group gets.
pub const MASK: u16 = 0x10;
/// `ACL_OTHER`: everyone else.
pub const OTHER: u16 = 0x20;

const VERSION: u32 = 2;

/// One entry: a tag, rwx bits (4, 2, 1) and, for named entries, the uid or gid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    pub tag: u16,
    pub perm: u16,
    pub id: u32,
}

/// An access ACL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Acl {
    pub entries: Vec<Entry>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AclError {
    #[error("ACL of {0} bytes is not a 4-byte header and 8-byte entries")]
    Length(usize),
    #[error("ACL version {0}, not 2")]
    Version(u32),
    #[error("ACL entry {index} has unknown tag {tag:#x}")]
    Tag { index: usize, tag: u16 },
    #[error("ACL lacks its owner, group or other entry")]
    Incomplete,
}

impl Acl {
    /// Reads the xattr's value.
    pub fn parse(bytes: &[u8]) -> Result<Acl, AclError> {
        if bytes.len() < 4 || (bytes.len() - 4) % 8 != 0 {
            return Err(AclError::Length(bytes.len()));
        }
        let version = u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
        if version != VERSION {
            return Err(AclError::Version(version));
        }
        let mut entries = Vec::with_capacity((bytes.len() - 4) / 8);
        for (index, e) in bytes[4..].chunks_exact(8).enumerate() {
            let tag = u16::from_le_bytes([e[0], e[1]]);
            if ![USER_OBJ, USER, GROUP_OBJ, GROUP, MASK, OTHER].contains(&tag) {
                return Err(AclError::Tag { index, tag });
            }
            entries.push(Entry {
                tag,
                perm: u16::from_le_bytes([e[2], e[3]]) & 0o7,
                id: u32::from_le_bytes([e[4], e[5], e[6], e[7]]),
            });
        }
        for needed in [USER_OBJ, GROUP_OBJ, OTHER] {
            if !entries.iter().any(|e| e.tag == needed) {
                return Err(AclError::Incomplete);
            }
        }
        Ok(Acl { entries })
    }

    fn mask(&self) -> Option<u16> {
        self.entries.iter().find(|e| e.tag == MASK).map(|e| e.perm)
    }

    fn perm(&self, tag: u16) -> u16 {
        self.entries
            .iter()
            .find(|e| e.tag == tag)
            .map_or(0, |e| e.perm)
    }

    /// Whether the ACL grants all of `want` (rwx bits) to a caller, by the kernel's
    /// `posix_acl_permission`: the owner entry for the owner; else a named user entry (through
    /// the mask); else, if the caller is in the owning group or a named group, any such entry
    /// that grants all of `want` (through the mask), and nothing if none does; else the others
    /// entry.
    pub fn allows(
        &self,
        want: u16,
        is_owner: bool,
        uid: u32,
        in_group: &dyn Fn(u32) -> bool,
        file_gid: u32,
    ) -> bool {
        let mask = self.mask().unwrap_or(0o7);
        if is_owner {
            return self.perm(USER_OBJ) & want == want;
        }
        if let Some(named) = self.entries.iter().find(|e| e.tag == USER && e.id == uid) {
            return named.perm & mask & want == want;
        }
        let mut found = false;
        for e in &self.entries {
            let member = match e.tag {
                GROUP_OBJ => in_group(file_gid),
                GROUP => in_group(e.id),
                _ => false,
            };
            if member {
                found = true;
                if e.perm & want == want {
                    return e.perm & mask & want == want;
                }
            }
        }
        !found && self.perm(OTHER) & want == want
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encode(entries: &[(u16, u16, u32)]) -> Vec<u8> {
        let mut v = VERSION.to_le_bytes().to_vec();
        for (tag, perm, id) in entries {
            v.extend_from_slice(&tag.to_le_bytes());
            v.extend_from_slice(&perm.to_le_bytes());
            v.extend_from_slice(&id.to_le_bytes());
        }
        v
    }

    /// owner rw-, user 1001 rw- (masked to r--), group r--, group 50 rw-, mask r--, other ---
    fn sample() -> Acl {
        Acl::parse(&encode(&[
            (USER_OBJ, 6, u32::MAX),
            (USER, 6, 1001),
            (GROUP_OBJ, 4, u32::MAX),
            (GROUP, 6, 50),
            (MASK, 4, u32::MAX),
            (OTHER, 0, u32::MAX),
        ]))
        .unwrap()
    }

    #[test]
    fn parses_what_setfacl_writes_and_refuses_the_rest() {
        let acl = sample();
        assert_eq!(acl.entries.len(), 6);
        assert_eq!(Acl::parse(&[2, 0, 0]), Err(AclError::Length(3)));
        assert_eq!(
            Acl::parse(&[1, 0, 0, 0]),
            Err(AclError::Version(1)),
            "version 1"
        );
        assert_eq!(
            Acl::parse(&encode(&[(0x40, 7, 0)])),
            Err(AclError::Tag {
                index: 0,
                tag: 0x40
            })
        );
        assert_eq!(
            Acl::parse(&encode(&[(USER_OBJ, 7, 0)])),
            Err(AclError::Incomplete)
        );
    }

    #[test]
    fn decides_as_the_kernel_does() {
        let acl = sample();
        let none = |_: u32| false;
        let in_50 = |g: u32| g == 50;
        let in_file_group = |g: u32| g == 7;
        // The owner: its own entry, not the mask.
        assert!(acl.allows(6, true, 1000, &none, 7));
        // A named user: its entry through the mask (r only).
        assert!(acl.allows(4, false, 1001, &none, 7));
        assert!(!acl.allows(2, false, 1001, &none, 7));
        // A member of a named group: rw- masked to r--.
        assert!(acl.allows(4, false, 2000, &in_50, 7));
        assert!(!acl.allows(2, false, 2000, &in_50, 7));
        // A member of the owning group.
        assert!(acl.allows(4, false, 2000, &in_file_group, 7));
        // Others: nothing.
        assert!(!acl.allows(4, false, 2000, &none, 7));
    }

    #[test]
    fn a_matching_group_without_the_bits_denies_even_if_others_have_them() {
        let acl = Acl::parse(&encode(&[
            (USER_OBJ, 6, 0),
            (GROUP_OBJ, 0, 0),
            (OTHER, 4, 0),
        ]))
        .unwrap();
        assert!(!acl.allows(4, false, 5, &|g| g == 9, 9));
        assert!(acl.allows(4, false, 5, &|_| false, 9));
    }
}
