//! Bitmaps across the images of a chain, as libvirt keeps them (libvirt's kbase page
//! "Internals of incremental backup handling in qemu", `qemuBlockBitmapChainIsValid` and
//! `qemuBlockGetBitmapMergeActions` in `src/qemu/qemu_block.c`):
//!
//! - an external snapshot gives the new overlay an empty recording bitmap, of the same name and
//!   granularity, for each recording, consistent bitmap of the old top ("create RECORDING bitmap
//!   named BITMAP in OVERLAY with GRANULARITY");
//! - a commit merges each bitmap of the committed layer whose chain is valid into the bitmap of
//!   the same name in the base, created recording there if the base lacks it;
//! - a bitmap chain is valid when the bitmap is in the image where the chain starts, in
//!   consecutive images below it and nowhere further down, and every one of them is recording and
//!   consistent.
//!
//! Only the names, granularities and bits travel; each image stores its own bitmaps (see
//! `bitmaps.rs`).

use std::sync::Arc;

use parking_lot::RwLock;

use crate::qcow2::bitmap::{BitmapEntry, DirtyBitmap, Flags, Role, limits};
use crate::qcow2::error::Result;
use crate::qcow2::image::Qcow2Image;
use crate::qcow2::write::Writer;

use super::bitmaps::Tracked;

/// A recording, consistent bitmap of one image, as it is now.
#[derive(Debug, Clone)]
pub struct RecordingBitmap {
    pub name: Vec<u8>,
    pub bitmap: DirtyBitmap,
}

impl Qcow2Image {
    /// The image's recording, consistent bitmaps (with the changes marked so far), in directory
    /// order. A bitmap of another role is not listed; an image whose bitmaps cannot be loaded has
    /// none.
    pub fn recording_bitmaps(&self) -> Vec<RecordingBitmap> {
        let Ok(b) = self.persistent_bitmaps() else {
            return Vec::new();
        };
        let state = b.state.lock();
        state
            .directory
            .entries
            .iter()
            .zip(&state.tracked)
            .filter(|(_, t)| t.role == Role::Recording)
            .filter_map(|(entry, t)| {
                Some(RecordingBitmap {
                    name: entry.name.clone(),
                    bitmap: t.bitmap.as_ref()?.read().clone(),
                })
            })
            .collect()
    }

    /// Whether this image has a bitmap named `name`, whatever its state.
    pub fn has_bitmap(&self, name: &[u8]) -> bool {
        self.persistent_bitmaps()
            .is_ok_and(|b| b.state.lock().directory.find(name).is_some())
    }

    /// Merges each of `from` into this image's bitmap of the same name; a name the image lacks
    /// gets a new recording bitmap with the source's granularity. A bitmap of the image that is
    /// inconsistent or unusable is left alone (it can never be made consistent again). The
    /// bitmaps are written at the next [`Qcow2Image::store_bitmaps_locked`].
    pub fn merge_bitmaps_locked(&self, _w: &mut Writer, from: &[RecordingBitmap]) -> Result<()> {
        let b = self.persistent_bitmaps()?;
        let size = self.virtual_size();
        let mut state = b.state.lock();
        for source in from {
            let mut bits = source.bitmap.clone();
            if bits.disk_size() != size {
                bits.resize(size).map_err(|e| self.bitmap_err(e))?;
            }
            let position = state
                .directory
                .entries
                .iter()
                .position(|e| e.name == source.name);
            match position {
                Some(i) => {
                    let t = &mut state.tracked[i];
                    let Some(bitmap) = t.bitmap.as_ref() else {
                        log::warn!(
                            "{}: bitmap {:?} is not consistent; nothing merged into it",
                            self.path.display(),
                            String::from_utf8_lossy(&source.name)
                        );
                        continue;
                    };
                    bitmap
                        .write()
                        .merge(&bits)
                        .map_err(|e| self.bitmap_err(e))?;
                    t.modified = true;
                }
                None => {
                    if state.directory.entries.len() >= limits::MAX_BITMAPS as usize {
                        log::warn!(
                            "{}: already {} bitmaps; {:?} not added",
                            self.path.display(),
                            limits::MAX_BITMAPS,
                            String::from_utf8_lossy(&source.name)
                        );
                        continue;
                    }
                    let granularity_bits = bits.granularity_bits();
                    let bitmap = Arc::new(RwLock::new(bits));
                    state.directory.entries.push(BitmapEntry {
                        table_offset: 0,
                        table_size: 0,
                        flags: Flags(Flags::AUTO),
                        kind: limits::TYPE_DIRTY_TRACKING,
                        granularity_bits: granularity_bits as u8,
                        name: source.name.clone(),
                        extra_data: Vec::new(),
                    });
                    state.tracked.push(Tracked {
                        role: Role::Recording,
                        flags_at_open: Flags(Flags::AUTO),
                        table: Vec::new(),
                        bitmap: Some(bitmap.clone()),
                        modified: true,
                    });
                    b.recording.write().push(bitmap);
                }
            }
            state.changed = true;
        }
        Ok(())
    }

    /// Adds an empty recording bitmap to this image for each of `like` (names and granularities
    /// only), as libvirt does for a new overlay, and stores the bitmaps at once so that they are
    /// in the file before any guest write reaches it.
    pub fn add_bitmaps_like(&self, like: &[RecordingBitmap]) -> Result<()> {
        if like.is_empty() {
            return Ok(());
        }
        let size = self.virtual_size();
        let mut empty = Vec::with_capacity(like.len());
        for b in like {
            empty.push(RecordingBitmap {
                name: b.name.clone(),
                bitmap: DirtyBitmap::new(size, b.bitmap.granularity_bits())
                    .map_err(|e| self.bitmap_err(e))?,
            });
        }
        let mut w = self.writer()?;
        self.merge_bitmaps_locked(&mut w, &empty)?;
        self.store_bitmaps_locked(&mut w)
    }
}
