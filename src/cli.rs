//! The command line: `snapfs mount | umount | snapshot | commit | pull | info | diff | apply`, and the hidden
//! `completions` and `man` commands that generate shell completions and manual pages from these
//! definitions.

use std::io::{self, Write};
use std::path::{Path, PathBuf};

use clap::{Args, CommandFactory, Parser, Subcommand, ValueHint};
use clap_complete::Shell;
use clap_mangen::roff::{Roff, roman};

/// Mount a qcow2 disk image chain so that every snapshot is an ordinary file.
#[derive(Debug, Parser)]
#[command(
    name = "snapfs",
    version,
    about,
    long_about = "Mount a qcow2 disk image chain so that every snapshot is an ordinary file.\n\n\
                  snapfs mounts the backing chain whose top (active) file is IMAGE as a directory: \
                  the live disk is the writable raw file live.raw, every internal snapshot and \
                  every backing layer is a read-only raw file under snapshots/, and the files \
                  under control/ take create, revert, delete, commit and pull commands.",
    after_help = "Examples:\n  \
                  snapfs info vm.qcow2\n  \
                  snapfs mount vm.qcow2 /mnt/vm\n  \
                  cp --sparse=always /mnt/vm/snapshots/before-upgrade.raw /backup/\n  \
                  snapfs snapshot create /mnt/vm before-upgrade\n  \
                  snapfs umount /mnt/vm\n\n\
                  Run 'snapfs COMMAND --help' for the options and examples of each command.",
    after_long_help = "Examples:\n  \
                  snapfs info vm.qcow2\n  \
                  snapfs mount vm.qcow2 /mnt/vm\n  \
                  cp --sparse=always /mnt/vm/snapshots/before-upgrade.raw /backup/\n  \
                  snapfs snapshot create /mnt/vm before-upgrade\n  \
                  snapfs umount /mnt/vm\n  \
                  mount -t snapfs -o ro vm.qcow2 /mnt/vm\n\n\
                  Logging:\n\
                  A mount logs to standard error with -f; in the background, to the file given\n\
                  with --log FILE or -o log=FILE, else to syslog (ident snapfs, facility daemon:\n\
                  journalctl -t snapfs shows it). RUST_LOG sets the level: error, warn (the\n\
                  default), info, debug or trace, also per module (RUST_LOG=snapfs=debug).\n\n\
                  Mount helper:\n\
                  With mount.snapfs installed as /sbin/mount.snapfs, 'mount -t snapfs IMAGE DIR'\n\
                  and /etc/fstab lines of type snapfs work; the mount is listed as fuse.snapfs\n\
                  and 'umount DIR' ends it."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Mount the chain whose top (active) file is IMAGE.
    #[command(
        long_about = "Mount the chain whose top (active) file is IMAGE on MOUNTPOINT.\n\n\
                      With --domain NAME (-o domain=NAME), mount every disk of the libvirt \
                      domain NAME instead, each under MOUNTPOINT/TARGET/ (vda/, vdb/, ...: the \
                      disk's <target dev>) with libvirt metadata on; MOUNTPOINT/control/create \
                      takes one libvirt snapshot of every mounted disk, all or none, and \
                      control/revert and control/delete act on every disk. The disks \
                      come from the running libvirtd (-o libvirt-uri=URI, default \
                      qemu:///system), else from /etc/libvirt/qemu/NAME.xml (-o \
                      libvirt-domain=FILE). Read-only disks, CD-ROMs, floppies, empty drives and \
                      network disks are not mounted; snapshots record them as snapshot='no', as \
                      virsh does.\n\n\
                      Returns once the mount is ready and keeps serving it in the background \
                      (with -f, stays in the foreground until unmounted). SIGTERM, SIGINT and \
                      SIGHUP flush the live disk and unmount.",
        after_help = "Examples:\n  \
                      snapfs mount /var/lib/libvirt/images/vm.qcow2 /mnt/vm\n  \
                      ls -l /mnt/vm/snapshots/\n  \
                      snapfs mount -r -o allow_other,libvirt=/var/lib/libvirt/qemu/snapshot/vm vm.qcow2 /mnt/vm\n  \
                      snapfs mount --log /var/log/snapfs.log vm.qcow2 /mnt/vm\n  \
                      snapfs mount --force-share running-vm.qcow2 /mnt/vm\n  \
                      snapfs mount --domain vm /mnt/vm\n  \
                      echo before-upgrade > /mnt/vm/control/create\n  \
                      RUST_LOG=debug snapfs mount -f vm.qcow2 /mnt/vm\n\n\
                      Logging:\n\
                      With -f, log records go to standard error; in the background, to the file\n\
                      given with --log FILE or -o log=FILE, else to syslog. RUST_LOG sets the\n\
                      level (default warn)."
    )]
    Mount(MountArgs),
    /// Flush and unmount a snapfs mount.
    #[command(
        long_about = "Flush and unmount a snapfs mount, and wait until the process serving it \
                      has exited. A mount whose process died is detached and reported. \
                      'umount MOUNTPOINT' and 'fusermount3 -u MOUNTPOINT' work too.",
        after_help = "Example:\n  snapfs umount /mnt/vm"
    )]
    Umount {
        /// Where the image is mounted.
        #[arg(value_name = "MOUNTPOINT", value_hint = ValueHint::DirPath)]
        mountpoint: PathBuf,
    },
    /// Create, revert to or delete a snapshot of a mounted disk.
    #[command(
        long_about = "Create, revert to or delete a snapshot of a mounted disk: writes the \
                      command to MOUNTPOINT/control/create, control/revert or control/delete \
                      and prints the outcome.",
        after_help = "Examples:\n  \
                      snapfs snapshot create /mnt/vm pkg-updated \"after apt upgrade\"\n  \
                      snapfs snapshot revert /mnt/vm pkg-updated\n  \
                      snapfs snapshot delete /mnt/vm pkg-updated"
    )]
    Snapshot {
        #[command(subcommand)]
        action: SnapshotAction,
    },
    /// Merge a layer (default: the top image) into its backing file.
    #[command(
        long_about = "Merge a layer (default: the top image) into its backing file: writes \
                      MOUNTPOINT/control/commit and shows the progress.",
        after_help = "Examples:\n  \
                      snapfs commit /mnt/vm\n  \
                      snapfs commit /mnt/vm overlay-1"
    )]
    Commit {
        /// Where the image is mounted.
        #[arg(value_name = "MOUNTPOINT", value_hint = ValueHint::DirPath)]
        mountpoint: PathBuf,
        /// The layer to merge, as named under snapshots/ (default: the top image).
        #[arg(value_name = "LAYER")]
        layer: Option<String>,
    },
    /// Copy into the top image the data of the layers above BASE, then drop those layers.
    #[command(
        long_about = "Copy into the top image all data it reads from the layers above BASE \
                      (default: every layer), then make BASE (default: nothing) the top's \
                      backing file, like 'virsh blockpull --base' and 'qemu-img rebase -b'. \
                      The live disk reads the same; the layers that leave the chain stay on \
                      disk as they are. Refused if an internal snapshot of the top reads data \
                      from those layers. Writes MOUNTPOINT/control/pull and shows the progress.",
        after_help = "Examples:\n  \
                      snapfs pull /mnt/vm\n  \
                      snapfs pull /mnt/vm base"
    )]
    Pull {
        /// Where the image is mounted.
        #[arg(value_name = "MOUNTPOINT", value_hint = ValueHint::DirPath)]
        mountpoint: PathBuf,
        /// The layer that becomes the top's backing file, as named under snapshots/ (default:
        /// none; the top then holds the whole disk).
        #[arg(value_name = "BASE")]
        base: Option<String>,
    },
    /// Show the chain and every snapshot of IMAGE.
    #[command(
        long_about = "Show the backing chain and every snapshot of IMAGE, like \
                      'qemu-img info --backing-chain' and 'virsh snapshot-list --tree'. Works on \
                      images in use: it takes no locks.",
        after_help = "Examples:\n  \
                      snapfs info vm.qcow2\n  \
                      snapfs info --json vm.qcow2\n  \
                      snapfs info --libvirt /var/lib/libvirt/qemu/snapshot/vm vm.qcow2"
    )]
    Info {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
        /// libvirt snapshot metadata folder (names, descriptions, the snapshot tree).
        #[arg(long, value_name = "DIR", value_hint = ValueHint::DirPath)]
        libvirt: Option<PathBuf>,
        /// The top (active) file of the chain.
        #[arg(value_name = "IMAGE", value_hint = ValueHint::FilePath)]
        image: PathBuf,
    },
    /// List the ranges where view TO differs from view FROM, without mounting.
    #[command(
        long_about = "List the ranges where view TO of IMAGE's chain may differ from view FROM, \
                      as changes/FROM..TO.json of a mount shows them: computed from the mapping \
                      metadata alone (no guest data is read), every cluster whose mapping differs \
                      through the whole chain, including ranges that became zero. FROM and TO are \
                      named as under snapshots/ without .raw; live is the live disk. Takes no \
                      locks, like info.",
        after_help = "Examples:\n  \
                      snapfs diff vm.qcow2 mon tue\n  \
                      snapfs diff --json vm.qcow2 tue live > tue..live.json\n  \
                      snapfs diff vm.qcow2 base live"
    )]
    Diff {
        /// Print the list as JSON ([{"start":..,"length":..,"zero":..}, ...]).
        #[arg(long)]
        json: bool,
        /// libvirt snapshot metadata folder (snapshot names of external layers).
        #[arg(long, value_name = "DIR", value_hint = ValueHint::DirPath)]
        libvirt: Option<PathBuf>,
        /// The top (active) file of the chain.
        #[arg(value_name = "IMAGE", value_hint = ValueHint::FilePath)]
        image: PathBuf,
        /// The earlier view.
        #[arg(value_name = "FROM")]
        from: String,
        /// The later view.
        #[arg(value_name = "TO")]
        to: String,
    },
    /// Apply an incremental backup (a copy of changes/FROM..TO.raw) onto a restored disk.
    #[command(
        long_about = "Bring TARGET, a raw disk image or block device holding view FROM, to view \
                      TO: copies the changed ranges from INCREMENT (a copy of \
                      changes/FROM..TO.raw) and zeroes the ranges that became zero, as the range \
                      list (a copy of changes/FROM..TO.json, by default next to INCREMENT with \
                      .json for .raw) says; nothing else is written. A regular file is resized \
                      to TO's size; a block device must be at least that large.",
        after_help = "Examples:\n  \
                      cp --sparse=always /backup/full-mon.raw /restore/vm.raw\n  \
                      snapfs apply /backup/mon..tue.raw /restore/vm.raw\n  \
                      snapfs apply /backup/tue..wed.raw /restore/vm.raw\n  \
                      snapfs apply --ranges /backup/wed..thu.json /backup/wed..thu.raw /dev/vg0/vm"
    )]
    Apply {
        /// The range list (default: INCREMENT with .json in place of .raw).
        #[arg(long, value_name = "FILE", value_hint = ValueHint::FilePath)]
        ranges: Option<PathBuf>,
        /// The increment: a copy of changes/FROM..TO.raw.
        #[arg(value_name = "INCREMENT", value_hint = ValueHint::FilePath)]
        increment: PathBuf,
        /// The disk to bring from FROM to TO: a raw image file or a block device.
        #[arg(value_name = "TARGET", value_hint = ValueHint::FilePath)]
        target: PathBuf,
    },
    /// Print a shell completion script.
    #[command(
        hide = true,
        after_help = "Examples:\n  \
                      snapfs completions bash > /etc/bash_completion.d/snapfs\n  \
                      snapfs completions zsh > /usr/local/share/zsh/site-functions/_snapfs\n  \
                      snapfs completions fish > ~/.config/fish/completions/snapfs.fish"
    )]
    Completions {
        /// The shell to complete for.
        #[arg(value_name = "SHELL")]
        shell: Shell,
    },
    /// Print the manual page, or write one page per command into a directory.
    #[command(
        hide = true,
        after_help = "Examples:\n  \
                      snapfs man | man -l -\n  \
                      snapfs man --dir /usr/local/share/man/man1"
    )]
    Man {
        /// Write snapfs.1 and snapfs-COMMAND.1 into DIR instead of printing snapfs.1.
        #[arg(long, value_name = "DIR", value_hint = ValueHint::DirPath)]
        dir: Option<PathBuf>,
    },
}

#[derive(Debug, Subcommand)]
pub enum SnapshotAction {
    /// Take an internal snapshot of the live disk.
    #[command(after_help = "Examples:\n  \
                      snapfs snapshot create /mnt/vm before-upgrade\n  \
                      snapfs snapshot create /mnt/vm pkg-updated after apt upgrade of 2026-11\n  \
                      snapfs snapshot create /mnt/vm 'before upgrade' apt upgrade of 2026-11\n\n\
                      NAME is one argument, whatever it holds (white space, quotes): the wrapper \
                      quotes it for control/create. Written by hand, a name with white space or a \
                      leading quote is quoted: echo '\"before upgrade\" apt upgrade' > \
                      /mnt/vm/control/create (inside the quotes \\\" is a quote, \\\\ a backslash).")]
    Create {
        /// Where the image is mounted.
        #[arg(value_name = "MOUNTPOINT", value_hint = ValueHint::DirPath)]
        mountpoint: PathBuf,
        /// The snapshot's name (its file is snapshots/NAME.raw).
        #[arg(value_name = "NAME")]
        name: String,
        /// Free text kept with the snapshot.
        #[arg(value_name = "DESCRIPTION")]
        description: Vec<String>,
    },
    /// Make the live disk equal to snapshot NAME (live.raw must not be open).
    #[command(
        after_help = "Examples:\n  snapfs snapshot revert /mnt/vm before-upgrade\n  \
                      snapfs snapshot revert /mnt/vm 'before upgrade'   # echo '\"before upgrade\"' > control/revert"
    )]
    Revert {
        /// Where the image is mounted.
        #[arg(value_name = "MOUNTPOINT", value_hint = ValueHint::DirPath)]
        mountpoint: PathBuf,
        /// The snapshot to go back to.
        #[arg(value_name = "NAME")]
        name: String,
    },
    /// Remove snapshot NAME (its file must not be open).
    #[command(
        after_help = "Examples:\n  snapfs snapshot delete /mnt/vm before-upgrade\n  \
                      snapfs snapshot delete /mnt/vm 'before upgrade'   # echo '\"before upgrade\"' > control/delete"
    )]
    Delete {
        /// Where the image is mounted.
        #[arg(value_name = "MOUNTPOINT", value_hint = ValueHint::DirPath)]
        mountpoint: PathBuf,
        /// The snapshot to remove.
        #[arg(value_name = "NAME")]
        name: String,
    },
}

#[derive(Debug, Args)]
pub struct MountArgs {
    /// Stay in the foreground and log to standard error (default: return once the mount is
    /// ready and keep serving it in the background).
    #[arg(short, long)]
    pub foreground: bool,
    /// Mount read-only: live.raw cannot be written and control commands are refused.
    #[arg(short, long)]
    pub read_only: bool,
    /// Mount read-only beside a running VM (same as -o force_share, like qemu-img -U): takes no
    /// lock that keeps QEMU from writing or restarting; backing layers and internal snapshots
    /// are readable, live.raw of an image another process writes is not shown, and each view's
    /// user.snapfs.consistency says frozen or best-effort.
    #[arg(long)]
    pub force_share: bool,
    /// Mount options, as mount(8) passes them (ro, rw, allow_other, allow_root,
    /// default_permissions, uid=N, gid=N, libvirt=DIR, libvirt-write, libvirt-domain=FILE,
    /// libvirt-uri=URI, domain=NAME, cache=SIZE, threads=N, direct_io, write_devices,
    /// force_share, log=FILE).
    #[arg(short = 'o', value_name = "OPT[,OPT...]")]
    pub options: Vec<String>,
    /// libvirt snapshot metadata folder.
    #[arg(long, value_name = "DIR", value_hint = ValueHint::DirPath)]
    pub libvirt: Option<PathBuf>,
    /// Metadata cache budget (L2 tables, decompressed clusters), e.g. 64M.
    #[arg(long, value_name = "SIZE")]
    pub cache: Option<String>,
    /// FUSE worker threads.
    #[arg(long, value_name = "N")]
    pub threads: Option<usize>,
    /// Bypass the kernel page cache for live.raw and the snapshot files (same as -o direct_io):
    /// a single pass over a file (cp, a backup) reads about twice as fast and leaves no copy
    /// of the disk in memory, but a second read goes to the image again.
    #[arg(long)]
    pub direct_io: bool,
    /// Append log records to FILE instead of syslog when in the background (same as -o log=FILE).
    #[arg(long, value_name = "FILE", value_hint = ValueHint::FilePath)]
    pub log: Option<PathBuf>,
    /// Mount every disk of libvirt domain NAME, each under MOUNTPOINT/TARGET/ (same as
    /// -o domain=NAME); IMAGE is then left out (or, for mount(8), any word: the domain's name).
    #[arg(long, value_name = "NAME")]
    pub domain: Option<String>,
    /// The top (active) file of the chain (with --domain: the mount point, when MOUNTPOINT is
    /// not given).
    #[arg(value_name = "IMAGE", value_hint = ValueHint::FilePath)]
    pub image: PathBuf,
    /// An existing directory to mount on.
    #[arg(value_name = "MOUNTPOINT", value_hint = ValueHint::DirPath)]
    pub mountpoint: Option<PathBuf>,
}

impl MountArgs {
    /// Removes `log=FILE` from the `-o` options and returns where to log: `--log` if given, else
    /// the last `log=FILE` option.
    pub fn take_log_option(&mut self) -> Result<Option<PathBuf>, String> {
        let mut from_options = None;
        let mut kept = Vec::with_capacity(self.options.len());
        for group in &self.options {
            let mut rest = Vec::new();
            for opt in group.split(',') {
                match opt.split_once('=') {
                    Some(("log", "")) => {
                        return Err("mount option log needs a value (log=FILE)".into());
                    }
                    Some(("log", file)) => from_options = Some(PathBuf::from(file)),
                    None if opt == "log" => {
                        return Err("mount option log needs a value (log=FILE)".into());
                    }
                    _ => rest.push(opt),
                }
            }
            if !rest.iter().all(|o| o.is_empty()) {
                kept.push(rest.join(","));
            }
        }
        self.options = kept;
        Ok(self.log.clone().or(from_options))
    }
}

/// The whole command line as clap sees it, built (subcommands know their full names), without
/// clap's `help` subcommands, which need no page of their own.
fn built_command() -> clap::Command {
    fn no_help(cmd: clap::Command) -> clap::Command {
        cmd.disable_help_subcommand(true).mut_subcommands(no_help)
    }
    let mut cmd = no_help(Cli::command());
    cmd.build();
    cmd
}

/// The completion script for `shell` (`snapfs completions SHELL`).
pub fn completions(shell: Shell) -> Vec<u8> {
    let mut cmd = Cli::command();
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut cmd, "snapfs", &mut script);
    script
}

/// Writes snapfs(1), the page of the top-level command (`snapfs man`).
pub fn write_man_page(out: &mut dyn Write) -> io::Result<()> {
    render_man(&built_command(), true, out)
}

/// Writes `snapfs.1` and one `snapfs-COMMAND[-SUBCOMMAND].1` per visible command into `dir`
/// (`snapfs man --dir DIR`); returns the files written.
pub fn write_man_pages(dir: &Path) -> io::Result<Vec<PathBuf>> {
    fn walk(
        cmd: &clap::Command,
        top: bool,
        dir: &Path,
        written: &mut Vec<PathBuf>,
    ) -> io::Result<()> {
        let name = cmd.get_display_name().unwrap_or_else(|| cmd.get_name());
        let path = dir.join(format!("{name}.1"));
        let mut page = Vec::new();
        render_man(cmd, top, &mut page)?;
        std::fs::write(&path, page)?;
        written.push(path);
        for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
            walk(sub, false, dir, written)?;
        }
        Ok(())
    }
    std::fs::create_dir_all(dir)?;
    let mut written = Vec::new();
    walk(&built_command(), true, dir, &mut written)?;
    Ok(written)
}

/// One manual page: clap_mangen's sections, then the text after the help (examples and notes)
/// as sections of their own, then SEE ALSO. The page starts with `.TH`.
fn render_man(cmd: &clap::Command, top: bool, out: &mut dyn Write) -> io::Result<()> {
    let man = clap_mangen::Man::new(cmd.clone())
        .source(format!("snapfs {}", env!("CARGO_PKG_VERSION")))
        .manual("snapfs manual");
    let render = |f: &dyn Fn(&mut dyn Write) -> io::Result<()>| -> io::Result<String> {
        let mut buf = Vec::new();
        f(&mut buf)?;
        String::from_utf8(buf).map_err(io::Error::other)
    };
    // Every rendered piece begins with roff's apostrophe preamble (`.ie \n(.g .ds Aq ...`):
    // keep one copy, right after the title.
    let title = render(&|w| man.render_title(w))?;
    let split = title.find(".TH").unwrap_or(0);
    let (preamble, title) = title.split_at(split);
    let piece = |text: String| -> String {
        match text.strip_prefix(preamble) {
            Some(rest) => rest.to_owned(),
            None => text,
        }
    };
    let mut page = String::new();
    page.push_str(title);
    page.push_str(preamble);
    page.push_str(&piece(render(&|w| man.render_name_section(w))?));
    page.push_str(&piece(render(&|w| man.render_synopsis_section(w))?));
    page.push_str(&piece(render(&|w| man.render_description_section(w))?));
    if cmd.get_arguments().any(|a| !a.is_hide_set()) {
        page.push_str(&piece(render(&|w| man.render_options_section(w))?));
    }
    if cmd.get_subcommands().any(|s| !s.is_hide_set()) {
        page.push_str(&piece(render(&|w| man.render_subcommands_section(w))?));
    }
    let mut roff = Roff::default();
    if let Some(text) = cmd.get_after_long_help().or_else(|| cmd.get_after_help()) {
        after_help_sections(&mut roff, &text.to_string());
    }
    roff.control("SH", ["SEE ALSO"]);
    let mut see_also: Vec<String> = Vec::new();
    if top {
        for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
            let name = sub.get_display_name().unwrap_or_else(|| sub.get_name());
            see_also.push(format!("{name}(1)"));
        }
    } else {
        see_also.push("snapfs(1)".into());
    }
    for other in ["mount(8)", "fstab(5)", "qemu-img(1)", "virsh(1)"] {
        see_also.push(other.into());
    }
    roff.text([roman(see_also.join(", "))]);
    page.push_str(&piece(roff.render()));
    if cmd.get_version().is_some() {
        page.push_str(&piece(render(&|w| man.render_version_section(w))?));
    }
    out.write_all(page.as_bytes())
}

/// The text after a command's help, as manual sections: blocks separated by blank lines; a
/// block whose first line is `Heading:` starts section HEADING ("Example(s)" becomes EXAMPLES,
/// shown as typed); other blocks are paragraphs of the current section.
fn after_help_sections(roff: &mut Roff, text: &str) {
    for block in text.split("\n\n") {
        let mut lines: Vec<&str> = block.lines().collect();
        let heading = lines
            .first()
            .filter(|first| first.ends_with(':') && !first.starts_with(' '))
            .map(|first| first.trim_end_matches(':').to_owned());
        let examples = heading.as_ref().is_some_and(|h| h.starts_with("Example"));
        match heading {
            Some(heading) => {
                let heading = if examples {
                    "EXAMPLES".to_owned()
                } else {
                    heading.to_uppercase()
                };
                roff.control("SH", [heading.as_str()]);
                lines.remove(0);
            }
            None => {
                roff.control("PP", []);
            }
        }
        if lines.is_empty() {
            continue;
        }
        if examples || lines.iter().any(|l| l.starts_with(' ')) {
            roff.control("RS", ["4"]);
            roff.control("nf", []);
            for line in lines {
                roff.text([roman(line.strip_prefix("  ").unwrap_or(line))]);
            }
            roff.control("fi", []);
            roff.control("RE", []);
        } else {
            roff.text([roman(lines.join(" "))]);
        }
    }
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
    fn definitions_are_consistent() {
        Cli::command().debug_assert();
    }

    fn mount_args(argv: &[&str]) -> MountArgs {
        let mut full = vec!["snapfs", "mount"];
        full.extend_from_slice(argv);
        full.extend_from_slice(&["img.qcow2", "/mnt/x"]);
        match Cli::try_parse_from(full).expect("parses").command {
            Command::Mount(args) => args,
            other => panic!("not a mount: {other:?}"),
        }
    }

    #[test]
    fn log_file_from_options() {
        let mut a = mount_args(&["-o", "ro,log=/var/log/s.log,allow_other", "-o", "log=/x"]);
        assert_eq!(a.take_log_option(), Ok(Some(PathBuf::from("/x"))));
        assert_eq!(a.options, vec!["ro,allow_other".to_string()]);

        let mut a = mount_args(&["--log", "/flag.log", "-o", "log=/opt.log"]);
        assert_eq!(a.take_log_option(), Ok(Some(PathBuf::from("/flag.log"))));
        assert!(a.options.is_empty());

        let mut a = mount_args(&["-o", "ro"]);
        assert_eq!(a.take_log_option(), Ok(None));
        assert_eq!(a.options, vec!["ro".to_string()]);

        assert!(mount_args(&["-o", "ro,log="]).take_log_option().is_err());
        assert!(mount_args(&["-o", "log"]).take_log_option().is_err());
    }

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
