//! Marking the image corrupt, as QEMU's `qcow2_signal_corruption` does: when the write side finds
//! that metadata cannot be right (today: a write that would overlap metadata), it sets the
//! `corrupt` incompatible bit in the header and refuses every further change. QEMU then refuses
//! to open the image read-write until `qemu-img check -r all` repaired it; snapfs mounts it
//! read-only (see [`super::write::Writer::open`]).

use crate::qcow2::header::{FieldWrite, incompatible};
use crate::qcow2::image::Qcow2Image;
use crate::qcow2::write::Writer;

impl Qcow2Image {
    /// Sets the corrupt bit (best effort: the image is already in trouble, and the in-memory flag
    /// stops further writes whatever the file says) and flushes it, so that no later open trusts
    /// the image.
    pub(super) fn mark_corrupt(&self, w: &mut Writer, reason: &str) {
        log::error!(
            "{}: Marking image as corrupt: {reason}",
            self.path.display()
        );
        w.corrupt = true;
        let flags = self.header.incompatible_features | incompatible::CORRUPT;
        if let Err(e) = self.write_header(
            FieldWrite::IncompatibleFeatures(flags),
            "header (corrupt bit)",
        ) {
            log::error!("{}: {e}", self.path.display());
        }
        if let Err(e) = self.sync() {
            log::error!("{}: {e}", self.path.display());
        }
    }
}
