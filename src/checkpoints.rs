//! `checkpoints/`: one pair of files per consistent persistent bitmap of the top image (a libvirt
//! checkpoint, `virsh checkpoint-create`, `virsh backup-begin`): `NAME.raw` reads the live disk's
//! bytes where the bitmap is set and holes elsewhere (`SEEK_DATA`/`SEEK_HOLE` and `st_blocks`
//! say exactly which), `NAME.json` lists the same ranges as `{"start": ..., "length": ...}`.
//!
//! A checkpoint is the bitmap of that name in the top image together with the bitmaps of the
//! same name below it, as libvirt counts a bitmap chain valid (`qemuBlockBitmapChainIsValid`):
//! present from the top down in consecutive layers, and each of them recording and consistent; a
//! backup since the checkpoint needs every change recorded along that chain, so the ranges are
//! their union (libvirt merges them the same way for `backup-begin`). A bitmap that is `in_use`,
//! broken, or whose chain is not valid is not listed; [`list`] says why.
//!
//! The bits are the ones snapfs maintains in memory: a write to `live.raw` shows in the
//! checkpoint files at once.

use std::sync::Arc;

use parking_lot::RwLock;

use crate::chain::Chain;
use crate::qcow2::Qcow2Image;
use crate::qcow2::bitmap::DirtyBitmap;

/// File name suffixes of the two files of a checkpoint.
pub const RAW_SUFFIX: &str = ".raw";
pub const JSON_SUFFIX: &str = ".json";

/// One listed checkpoint.
pub struct Checkpoint {
    pub name: String,
    /// The bitmaps of the chain, top first.
    bits: Vec<Arc<RwLock<DirtyBitmap>>>,
}

/// A bitmap of the top image that is not listed, and why.
pub struct Unlisted {
    pub name: String,
    pub reason: String,
}

/// The checkpoints of the chain's top image, in directory order, and the bitmaps not listed.
pub fn list(chain: &Chain) -> (Vec<Checkpoint>, Vec<Unlisted>) {
    let top = chain.top_image();
    let (mut listed, mut unlisted) = (Vec::new(), Vec::new());
    let bitmaps = match top.checkpoints() {
        Ok(b) => b,
        Err(e) => {
            unlisted.push(Unlisted {
                name: "*".into(),
                reason: e.to_string(),
            });
            return (listed, unlisted);
        }
    };
    for b in bitmaps {
        let name = b.name.clone();
        if !is_file_name(&name) {
            unlisted.push(Unlisted {
                reason: "the name cannot be a file name (empty, `.`, `..`, or holds `/`)".into(),
                name,
            });
            continue;
        }
        let first = match b.bitmap {
            Ok(bits) => bits,
            Err(reason) => {
                unlisted.push(Unlisted { name, reason });
                continue;
            }
        };
        let mut bits = vec![first];
        if b.recording {
            match chain.bitmap_chain_below(0, |image| bitmap_of(image, name.as_bytes())) {
                Ok(below) => bits.extend(below),
                Err(reason) => {
                    unlisted.push(Unlisted { name, reason });
                    continue;
                }
            }
        }
        listed.push(Checkpoint { name, bits });
    }
    (listed, unlisted)
}

/// The checkpoint with this name, if it is listed now.
pub fn find(chain: &Chain, name: &str) -> Option<Checkpoint> {
    list(chain).0.into_iter().find(|c| c.name == name)
}

fn is_file_name(name: &str) -> bool {
    !name.is_empty() && name != "." && name != ".." && !name.contains(['/', '\0'])
}

/// Bitmap `name` of `image` if it has one; an error if it has one that is not recording and
/// consistent.
fn bitmap_of(image: &Qcow2Image, name: &[u8]) -> Result<Option<Arc<RwLock<DirtyBitmap>>>, String> {
    let checkpoints = image
        .checkpoints()
        .map_err(|e| format!("{}: {e}", image.path().display()))?;
    let Some(c) = checkpoints.into_iter().find(|c| c.name.as_bytes() == name) else {
        return Ok(None);
    };
    let bits = c
        .bitmap
        .map_err(|reason| format!("in {}: {reason}", image.path().display()))?;
    if !c.recording {
        return Err(format!(
            "in {}: the bitmap is disabled (not recording)",
            image.path().display()
        ));
    }
    Ok(Some(bits))
}

impl Checkpoint {
    /// The first byte at or after `from` (and before `size`) that some bitmap of the chain marks.
    pub fn next_dirty(&self, from: u64, size: u64) -> Option<u64> {
        self.bits
            .iter()
            .filter_map(|b| b.read().next_dirty(from))
            .min()
            .filter(|&at| at < size)
    }

    /// The first byte at or after `from` that no bitmap marks (`size` at the most).
    pub fn next_clean(&self, from: u64, size: u64) -> u64 {
        let mut at = from;
        loop {
            let mut moved = false;
            for b in &self.bits {
                let b = b.read();
                if b.is_dirty(at) {
                    at = b.next_clean(at);
                    moved = true;
                }
            }
            if !moved || at >= size {
                return at.min(size);
            }
        }
    }

    /// The marked ranges of a disk of `size` bytes, in order, adjacent ones joined.
    pub fn ranges(&self, size: u64) -> Vec<(u64, u64)> {
        let mut ranges = Vec::new();
        let mut at = 0;
        while let Some(start) = self.next_dirty(at, size) {
            let end = self.next_clean(start, size);
            ranges.push((start, end - start));
            at = end;
        }
        ranges
    }

    /// `NAME.json`: the ranges as a JSON list, one object a line.
    pub fn json(&self, size: u64) -> Vec<u8> {
        let ranges = self.ranges(size);
        let mut out = String::from("[");
        for (i, (start, length)) in ranges.iter().enumerate() {
            out.push_str(if i == 0 { "\n" } else { ",\n" });
            out.push_str(&format!("  {{\"start\": {start}, \"length\": {length}}}"));
        }
        out.push_str(if ranges.is_empty() { "]\n" } else { "\n]\n" });
        out.into_bytes()
    }
}

/// The lines `control/status` shows about the checkpoints: the bitmaps not listed and why.
pub fn status_lines(chain: &Chain) -> String {
    let (_, unlisted) = list(chain);
    unlisted
        .iter()
        .map(|u| format!("checkpoint {:?} not listed: {}\n", u.name, u.reason))
        .collect()
}
