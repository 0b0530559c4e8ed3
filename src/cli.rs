//! The command line: `snapfs mount | umount | info`.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// Mount a qcow2 disk image chain so that every snapshot is an ordinary file.
#[derive(Debug, Parser)]
#[command(name = "snapfs", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Mount the chain whose top (active) file is IMAGE.
    #[command(
        after_help = "Example:\n  snapfs mount /var/lib/libvirt/images/vm.qcow2 /mnt/vm\n  \
                            ls -l /mnt/vm/snapshots/"
    )]
    Mount(MountArgs),
    /// Flush and unmount a snapfs mount.
    #[command(after_help = "Example:\n  snapfs umount /mnt/vm")]
    Umount { mountpoint: PathBuf },
    /// Create, revert to or delete a snapshot of a mounted disk (writes control/create,
    /// control/revert or control/delete).
    #[command(
        after_help = "Examples:\n  snapfs snapshot create /mnt/vm pkg-updated \"after apt upgrade\"\n  \
                            snapfs snapshot revert /mnt/vm pkg-updated\n  \
                            snapfs snapshot delete /mnt/vm pkg-updated"
    )]
    Snapshot {
        #[command(subcommand)]
        action: SnapshotAction,
    },
    /// Merge a layer (default: the top image) into its backing file (writes control/commit).
    #[command(after_help = "Example:\n  snapfs commit /mnt/vm")]
    Commit {
        mountpoint: PathBuf,
        layer: Option<String>,
    },
    /// Show the chain and every snapshot of IMAGE.
    #[command(after_help = "Example:\n  snapfs info --json vm.qcow2")]
    Info {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
        image: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
pub enum SnapshotAction {
    /// Take an internal snapshot of the live disk.
    Create {
        mountpoint: PathBuf,
        name: String,
        /// Free text kept with the snapshot.
        description: Vec<String>,
    },
    /// Make the live disk equal to snapshot NAME (live.raw must not be open).
    Revert { mountpoint: PathBuf, name: String },
    /// Remove snapshot NAME (its file must not be open).
    Delete { mountpoint: PathBuf, name: String },
}

#[derive(Debug, Args)]
pub struct MountArgs {
    /// Stay in the foreground (default: return once the mount is ready).
    #[arg(short, long)]
    pub foreground: bool,
    /// Mount read-only: live.raw cannot be written and control commands are refused.
    #[arg(short, long)]
    pub read_only: bool,
    /// Mount options, as mount(8) passes them (ro, rw, allow_other, allow_root,
    /// default_permissions, uid=N, gid=N, libvirt=DIR, cache=SIZE, threads=N).
    #[arg(short = 'o', value_name = "OPT[,OPT...]")]
    pub options: Vec<String>,
    /// libvirt snapshot metadata folder.
    #[arg(long, value_name = "DIR")]
    pub libvirt: Option<PathBuf>,
    /// Metadata cache budget (L2 tables, decompressed clusters), e.g. 64M.
    #[arg(long, value_name = "SIZE")]
    pub cache: Option<String>,
    /// FUSE worker threads.
    #[arg(long, value_name = "N")]
    pub threads: Option<usize>,
    pub image: PathBuf,
    pub mountpoint: PathBuf,
}

/// Parses sizes such as `64M`, `1G`, `4096`, `512k`.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, unit) = t.split_at(split);
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("invalid size {text:?} (expected e.g. 64M)"))?;
    let shift = match unit
        .to_ascii_lowercase()
        .trim_end_matches("ib")
        .trim_end_matches('b')
    {
        "" => 0,
        "k" => 10,
        "m" => 20,
        "g" => 30,
        "t" => 40,
        _ => return Err(format!("invalid size unit in {text:?} (use K, M, G or T)")),
    };
    n.checked_mul(1 << shift)
        .ok_or_else(|| format!("size {text:?} is too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("64M"), Ok(64 << 20));
        assert_eq!(parse_size("1g"), Ok(1 << 30));
        assert_eq!(parse_size("512KiB"), Ok(512 << 10));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(parse_size("x").is_err());
        assert!(parse_size("5Q").is_err());
        assert!(parse_size("99999999999999T").is_err());
    }
}
