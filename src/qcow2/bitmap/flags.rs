//! The flags of a directory entry and what they let snapfs do with the bitmap.
//!
//! From the spec: bit 0 `in_use`: "The bitmap was not saved correctly and may be inconsistent";
//! bit 1 `auto`: "The bitmap must reflect all changes of the virtual disk by any application that
//! would write to this qcow2 file (including writes, snapshot switching, etc.)"; bit 2
//! `extra_data_compatible`; "Bits 3 - 31 are reserved and must be 0". QEMU's
//! `BME_RESERVED_FLAGS` is `0xfffffffc`: it treats bit 2 as reserved too.

use super::ImageLayout;
use super::constraints::{self, EntryProblem};
use super::directory::BitmapEntry;

/// The `flags` field of a directory entry, as stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Flags(pub u32);

impl Flags {
    pub const IN_USE: u32 = 1 << 0;
    pub const AUTO: u32 = 1 << 1;
    /// Meaningful only with extra data; QEMU refuses it (reserved to QEMU).
    pub const EXTRA_DATA_COMPATIBLE: u32 = 1 << 2;
    /// QEMU's `BME_RESERVED_FLAGS`: every bit but `in_use` and `auto`.
    pub const RESERVED: u32 = !(Self::IN_USE | Self::AUTO);

    pub fn in_use(self) -> bool {
        self.0 & Self::IN_USE != 0
    }

    /// Enabled: "the software must consider the bitmap as enabled and start tracking virtual disk
    /// changes to this bitmap from the first write".
    pub fn auto(self) -> bool {
        self.0 & Self::AUTO != 0
    }

    /// The bits QEMU does not know.
    pub fn unknown(self) -> u32 {
        self.0 & Self::RESERVED
    }

    pub fn with_in_use(self, in_use: bool) -> Flags {
        if in_use {
            Flags(self.0 | Self::IN_USE)
        } else {
            Flags(self.0 & !Self::IN_USE)
        }
    }
}

/// What snapfs may do with one bitmap of the image it writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Role {
    /// `auto`, consistent, well formed: loaded at a read-write open, given the bits of every
    /// change, stored at a clean close with `in_use` clear. `in_use` is set on disk while it is
    /// not stored.
    Recording,
    /// Consistent but not `auto`: "If this flag is not set then the bitmap is disabled." Its
    /// content stays valid however the disk changes, so it stays as it is: data, table and flags
    /// (resizing the disk is the exception; see docs/bitmaps.md).
    Disabled,
    /// `in_use` already: QEMU loads it as inconsistent and never stores it. It is left as it is,
    /// never loaded and never made consistent again.
    Inconsistent,
    /// The entry breaks a rule (unknown flags, extra data, bad table, wrong size, ...): its data is
    /// never used and the entry is kept byte for byte, except that a writer sets `in_use` on it
    /// if it claims to be `auto` and consistent ([`Role::flags_at_first_change`]).
    Unusable(EntryProblem),
}

impl Role {
    /// The role of `entry` in an image of this layout.
    pub fn of(entry: &BitmapEntry, layout: &ImageLayout) -> Role {
        if let Err(problem) = constraints::check(entry, layout) {
            return Role::Unusable(problem);
        }
        if entry.flags.in_use() {
            Role::Inconsistent
        } else if entry.flags.auto() {
            Role::Recording
        } else {
            Role::Disabled
        }
    }

    /// Whether the bitmap's data may be read (recording and disabled bitmaps).
    pub fn loadable(&self) -> bool {
        matches!(self, Role::Recording | Role::Disabled)
    }

    /// The flags a writer puts on disk before the first change to the disk reaches the file:
    /// `in_use` on every bitmap that would otherwise claim, wrongly after the change, to be `auto`
    /// and consistent. A recording bitmap is being maintained; an unusable one cannot be, and
    /// `in_use` is the one statement about it that stays true ("may be inconsistent").
    pub fn flags_at_first_change(&self, flags: Flags) -> Flags {
        match self {
            Role::Recording => flags.with_in_use(true),
            Role::Unusable(_) if flags.auto() && !flags.in_use() => flags.with_in_use(true),
            Role::Unusable(_) | Role::Disabled | Role::Inconsistent => flags,
        }
    }

    /// The flags stored at a clean close for a bitmap whose flags were `at_open` when it was
    /// loaded: a recording bitmap is written consistent again, as QEMU writes it (`auto`, nothing
    /// else); every other bitmap keeps what it had once the first change was made.
    pub fn flags_at_clean_close(&self, at_open: Flags) -> Flags {
        match self {
            Role::Recording => Flags(Flags::AUTO),
            Role::Disabled | Role::Inconsistent | Role::Unusable(_) => {
                self.flags_at_first_change(at_open)
            }
        }
    }
}
