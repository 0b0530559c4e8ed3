//! `snapfs diff` and `snapfs apply`: the change list of two views without mounting, and an
//! increment applied onto a restored disk.

use std::path::Path;
use std::sync::Arc;

use crate::catalog::Catalog;
use crate::chain::Chain;
use crate::metadata::Metadata;
use crate::qcow2::{Caches, OpenOptions};

use super::pairs;

/// `snapfs diff [--json] [--libvirt DIR] IMAGE FROM TO`.
pub fn diff(
    image: &Path,
    from: &str,
    to: &str,
    json: bool,
    libvirt: Option<&Path>,
) -> Result<(), String> {
    // Like `snapfs info`: no locks, so it works on images in use (a running VM's live disk
    // then moves under the walk; snapshots do not).
    let chain = Chain::open(image, Caches::new(32 << 20), OpenOptions::default())
        .map_err(|e| e.to_string())?;
    let meta = match libvirt {
        Some(dir) => Metadata::load(dir, &chain),
        None => Metadata::default(),
    };
    for problem in &meta.problems {
        eprintln!("snapfs: libvirt metadata: {problem}");
    }
    let catalog = Catalog::with_metadata(Arc::new(chain), meta).map_err(|e| e.to_string())?;
    let view = |name: &str| {
        pairs::resolve(&catalog, name)
            .and_then(|r| pairs::entry(&catalog, r))
            .ok_or_else(|| {
                let mut known: Vec<String> = catalog
                    .snapshots()
                    .iter()
                    .map(|(_, e)| e.file_name.trim_end_matches(".raw").to_owned())
                    .collect();
                known.push(pairs::LIVE.to_owned());
                format!(
                    "{}: no view {name:?} (views: {})",
                    image.display(),
                    known.join(", ")
                )
            })
    };
    let (from_entry, to_entry) = (view(from)?, view(to)?);
    let list =
        super::changed_ranges(&from_entry.view, &to_entry.view).map_err(|e| e.to_string())?;
    let text = if json {
        list.to_json()
    } else {
        let mut text = format!("{:<20} {:<20} kind\n", "start", "length");
        for r in &list.ranges {
            text.push_str(&format!(
                "{:<20} {:<20} {}\n",
                format!("{:#x}", r.start),
                format!("{:#x}", r.length),
                if r.zero { "zero" } else { "data" }
            ));
        }
        text.push_str(&format!(
            "{} range(s), {} of {} bytes changed\n",
            list.ranges.len(),
            list.changed_bytes(),
            list.size
        ));
        text
    };
    print(&text)
}

/// `snapfs apply [--ranges FILE] INCREMENT TARGET`.
pub fn apply(increment: &Path, ranges: Option<&Path>, target: &Path) -> Result<(), String> {
    let ranges = ranges
        .map(Path::to_owned)
        .unwrap_or_else(|| super::apply::default_ranges_path(increment));
    let done = super::apply::apply(increment, &ranges, target).map_err(|e| e.to_string())?;
    let mut text = format!(
        "{}: {} range(s) applied: {} bytes copied, {} bytes zeroed; size {}\n",
        target.display(),
        done.ranges,
        done.copied,
        done.zeroed,
        done.size
    );
    if done.device_tail > 0 {
        text.push_str(&format!(
            "{}: the device is {} bytes larger than the disk; those bytes were left as they were\n",
            target.display(),
            done.device_tail
        ));
    }
    print(&text)
}

fn print(text: &str) -> Result<(), String> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
            Err(format!("writing the list: {e}"))
        }
        _ => Ok(()),
    }
}
