//! `snapfs info`: the chain and its snapshots, as text or JSON.

use std::path::Path;
use std::sync::Arc;

use crate::catalog::Catalog;
use crate::chain::Chain;
use crate::info;
use crate::libvirt::SnapshotTree;
use crate::metadata::Metadata;
use crate::qcow2::{Caches, OpenOptions};

pub fn info(image: &Path, json: bool) -> Result<(), String> {
    info_with_libvirt(image, json, None)
}

/// `snapfs info [--json] [--libvirt DIR] IMAGE`.
pub fn info_with_libvirt(image: &Path, json: bool, libvirt: Option<&Path>) -> Result<(), String> {
    // A short look, like `qemu-img info -U`: no locks, so it works on images in use.
    let chain = Chain::open(image, Caches::new(1 << 20), OpenOptions::default())
        .map_err(|e| e.to_string())?;
    let meta = match libvirt {
        Some(dir) => Metadata::load(dir, &chain),
        None => Metadata::default(),
    };
    for problem in &meta.problems {
        eprintln!("snapfs: libvirt metadata: {problem}");
    }
    let tree = libvirt.map(|_| {
        let snapshots: Vec<_> = meta.snapshots.values().cloned().collect();
        SnapshotTree::new(&snapshots).render_tree()
    });
    let catalog = Catalog::with_metadata(Arc::new(chain), meta).map_err(|e| e.to_string())?;
    let report = info::catalog_info(&catalog, true);
    if json {
        let text = serde_json::to_string_pretty(&report).map_err(|e| e.to_string())?;
        println!("{text}");
        return Ok(());
    }
    for (depth, layer) in report.chain.iter().enumerate() {
        let indent = "  ".repeat(depth);
        println!("{indent}image: {}", layer.filename);
        println!("{indent}file format: {}", layer.format);
        println!(
            "{indent}virtual size: {} ({} bytes)",
            human(layer.virtual_size),
            layer.virtual_size
        );
        println!("{indent}disk size: {}", human(layer.actual_size));
        if let Some(cs) = layer.cluster_size {
            println!("{indent}cluster_size: {cs}");
        }
        if let Some(b) = &layer.backing_filename {
            println!("{indent}backing file: {b}");
        }
        if !layer.snapshots.is_empty() {
            println!("{indent}Snapshot list:");
            println!(
                "{indent}{:<6} {:<24} {:>10} {:<20} {:>12}",
                "ID", "TAG", "VM SIZE", "DATE", "DISK SIZE"
            );
            for s in &layer.snapshots {
                let date = info::rfc3339(
                    std::time::UNIX_EPOCH + std::time::Duration::from_secs(s.date_sec.into()),
                );
                println!(
                    "{indent}{:<6} {:<24} {:>10} {:<20} {:>12}",
                    s.id,
                    s.name,
                    human(s.vm_state_size),
                    date,
                    human(s.disk_size)
                );
            }
        }
    }
    println!("Views:");
    for v in &report.views {
        println!("  {:<40} {:<9} {:>10}", v.file, v.kind, human(v.size));
        // The VM state QEMU's savevm stored with the snapshot, as a file of its own.
        if let Some(file) = &v.vm_state_file {
            println!(
                "  {:<40} {:<9} {:>10}",
                file,
                "vm-state",
                human(v.vm_state_size)
            );
        }
    }
    if let (Some(tree), Some(snapshots)) = (tree, &report.libvirt) {
        println!("\nSnapshot tree (libvirt):");
        for line in tree.lines() {
            println!("  {line}");
        }
        for s in snapshots {
            println!("\n  Name:        {}", s.name);
            println!("  State:       {}", s.state.as_deref().unwrap_or("-"));
            println!("  Location:    {}", s.location);
            println!("  Parent:      {}", s.parent.as_deref().unwrap_or("-"));
            println!("  Children:    {}", s.children.len());
            println!("  Descendants: {}", s.descendants);
            println!("  Current:     {}", if s.current { "yes" } else { "no" });
            println!("  Date:        {}", s.created.as_deref().unwrap_or("-"));
            match (&s.file, s.size) {
                (Some(file), Some(size)) => println!("  View:        {file} ({})", human(size)),
                _ => println!("  View:        - (not in this chain)"),
            }
        }
    }
    Ok(())
}

/// Sizes as qemu-img prints them: `64 MiB`, `1.5 GiB`.
pub fn human(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 || value.fract() == 0.0 {
        format!("{} {}", value as u64, UNITS[unit])
    } else {
        format!("{value:.3} {}", UNITS[unit]).replace(".000 ", " ")
    }
}

/// Runs one command through a mount's control file and prints its status line.
pub fn control_command(mountpoint: &Path, file: &str, command: &str) -> Result<(), String> {
    use std::io::Write;
    let control = mountpoint.join("control");
    let path = control.join(file);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .map_err(|e| {
            format!(
                "{}: {e} (is a snapfs file system mounted there?)",
                path.display()
            )
        })?;
    let done = std::sync::atomic::AtomicBool::new(false);
    let result = std::thread::scope(|scope| {
        scope.spawn(|| show_progress(&control.join("status"), &done));
        let result = f.write_all(format!("{command}\n").as_bytes());
        done.store(true, std::sync::atomic::Ordering::Release);
        result
    });
    drop(f);
    let status = std::fs::read_to_string(control.join("status")).unwrap_or_default();
    let last = status.lines().last().unwrap_or("").to_owned();
    match result {
        Ok(()) => {
            println!("{last}");
            Ok(())
        }
        Err(e) if last.contains(": error: ") => Err(last
            .split_once(": error: ")
            .map_or(e.to_string(), |(_, m)| m.to_owned())),
        Err(e) => Err(format!("{file} {command}: {e}")),
    }
}

/// Draws a progress bar from the `NAME: P% (A of B)` line of `control/status` until `done`.
fn show_progress(status: &Path, done: &std::sync::atomic::AtomicBool) {
    use std::sync::atomic::Ordering;
    let bar = indicatif::ProgressBar::hidden();
    bar.set_style(
        indicatif::ProgressStyle::with_template("{msg} [{bar:40}] {pos}%")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar.set_length(100);
    let mut shown = false;
    while !done.load(Ordering::Acquire) {
        std::thread::sleep(std::time::Duration::from_millis(100));
        let text = std::fs::read_to_string(status).unwrap_or_default();
        let Some(line) = text.lines().last() else {
            continue;
        };
        let Some((label, rest)) = line.rsplit_once(": ") else {
            continue;
        };
        let Some(percent) = rest.split('%').next().and_then(|p| p.parse::<u64>().ok()) else {
            continue;
        };
        if !shown {
            bar.set_draw_target(indicatif::ProgressDrawTarget::stderr());
            shown = true;
        }
        bar.set_message(label.to_owned());
        bar.set_position(percent);
    }
    if shown {
        bar.finish_and_clear();
    }
}
