//! Reading beside processes that write the chain's files: a `--force-share` mount (QEMU's
//! `force-share=on`, `qemu-img -U`) takes shared locks that keep no running VM out, so the files
//! can change under it. What that means for each view:
//!
//! - A view reads its own layer and every layer below it. If no other process holds QEMU's
//!   "write" permission on any of those files, nobody can change them: the view is `frozen`.
//!   Otherwise it is `best-effort`: an internal snapshot's clusters stay as they are while the
//!   snapshot exists (QEMU copies on write), but the VM may delete it and reuse its clusters.
//! - `live.raw` of a top that another process writes changes under every reader: not shown.
//! - The header of an image another process writes can move its snapshot table (`savevm`,
//!   `delvm`), its backing file (block jobs) or its size: the mount then opens the chain again
//!   and rebuilds its views (views that survive keep their names and inode numbers; a view that
//!   is gone answers ESTALE through a name the kernel still caches).
//!
//! Whether another process writes a file is asked of its QEMU lock bytes at the moment of the
//! question: a VM may start or stop while the mount stays.

use std::path::PathBuf;
use std::sync::Arc;

use parking_lot::Mutex;

use crate::catalog::{Catalog, Changes};
use crate::chain::{Chain, Layer};
use crate::error::Result;
use crate::qcow2::{Caches, OpenOptions};

/// Whether a view's bytes can change under a reader (`user.snapfs.consistency`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Consistency {
    /// No other process can write the files the view reads.
    Frozen,
    /// Another process writes (or may write) one of them.
    BestEffort,
}

impl Consistency {
    pub fn as_str(self) -> &'static str {
        match self {
            Consistency::Frozen => "frozen",
            Consistency::BestEffort => "best-effort",
        }
    }
}

/// Whether another process holds QEMU's write permission on `layer`'s file now; `None` where
/// the file system has no OFD locks, or the question failed.
pub fn written_by_others(layer: &Layer) -> Option<bool> {
    match layer.storage().written_by_others() {
        Ok(answer) => answer,
        Err(e) => {
            log::debug!(
                "{}: asking for QEMU's write lock: {e}",
                layer.path().display()
            );
            None
        }
    }
}

/// How to open the chain again when another process changed it.
#[derive(Clone)]
struct Reopen {
    image: PathBuf,
    caches: Arc<Caches>,
    options: OpenOptions,
    write_devices: bool,
}

impl std::fmt::Debug for Reopen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reopen")
            .field("image", &self.image)
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

/// What a mount knows about other processes using its files.
#[derive(Debug)]
pub struct Sharing {
    /// Set for a `--force-share` mount.
    reopen: Option<Reopen>,
    /// One reopening at a time.
    following: Mutex<()>,
}

impl Sharing {
    /// A mount whose locks keep every other writer out (read-write, or read-only without
    /// `--force-share`).
    pub fn exclusive() -> Sharing {
        Sharing {
            reopen: None,
            following: Mutex::new(()),
        }
    }

    /// A `--force-share` mount of the chain whose top is `image`, opened with `options`.
    pub fn beside_writers(
        image: PathBuf,
        caches: Arc<Caches>,
        options: OpenOptions,
        write_devices: bool,
    ) -> Sharing {
        Sharing {
            reopen: Some(Reopen {
                image,
                caches,
                options,
                write_devices,
            }),
            following: Mutex::new(()),
        }
    }

    pub fn is_force_share(&self) -> bool {
        self.reopen.is_some()
    }

    /// Whether live.raw is left out: the top of a `--force-share` mount that another process
    /// writes (or may write: a file system without locks cannot tell).
    pub fn live_hidden(&self, chain: &Chain) -> bool {
        self.is_force_share() && written_by_others(chain.top()) != Some(false)
    }

    /// The consistency of a view that reads layer `from` of `chain` and the layers below it.
    pub fn consistency(&self, chain: &Chain, from: usize) -> Consistency {
        let unknown_is_written = self.is_force_share();
        let written = chain
            .layers
            .iter()
            .skip(from)
            .any(|l| written_by_others(l).unwrap_or(unknown_is_written));
        if written {
            Consistency::BestEffort
        } else {
            Consistency::Frozen
        }
    }

    /// On a `--force-share` mount: if another process changed the header of one of the chain's
    /// images (its snapshot table, backing file or size), opens the chain again and switches
    /// the catalog to it. Returns what changed, `None` when nothing did (or on other mounts).
    pub fn follow(&self, catalog: &Catalog) -> Result<Option<Changes>> {
        let Some(reopen) = &self.reopen else {
            return Ok(None);
        };
        let _one = self.following.lock();
        let chain = catalog.chain();
        if !header_changed(&chain) {
            return Ok(None);
        }
        let fresh = Chain::open_with(
            &reopen.image,
            reopen.caches.clone(),
            reopen.options,
            reopen.write_devices,
        )?;
        log::info!(
            "{}: another process changed the image; its views were read again",
            reopen.image.display()
        );
        Ok(Some(catalog.rebuild(Arc::new(fresh))?))
    }
}

/// Whether any qcow2 layer's header changed on disk since it was opened. A header that cannot be
/// read counts as changed: opening again says what is wrong.
fn header_changed(chain: &Chain) -> bool {
    chain.layers.iter().any(|l| match l.as_ref() {
        Layer::Qcow2(image) => image.header_changed_on_disk().unwrap_or(true),
        Layer::Raw(_) => false,
    })
}
