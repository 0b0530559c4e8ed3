use std::io::Write;

use clap::Parser;

use snapfs::cli::{Cli, Command, MountArgs, SnapshotAction};
use snapfs::logging::{self, Destination};

fn main() {
    logging::init();
    let cli = Cli::parse();
    if let Err(message) = run(cli.command) {
        eprintln!("snapfs: {message}");
        std::process::exit(1);
    }
}

fn run(command: Command) -> Result<(), String> {
    match command {
        Command::Mount(args) => mount(args),
        Command::Umount { mountpoint } => snapfs::mount::umount(&mountpoint),
        Command::Info {
            json,
            libvirt,
            image,
        } => snapfs::report::info_with_libvirt(&image, json, libvirt.as_deref()),
        Command::Snapshot { action } => {
            let (mountpoint, file, command) = match action {
                SnapshotAction::Create {
                    mountpoint,
                    name,
                    description,
                } => {
                    // The name is always one word of the command, whatever it holds.
                    let mut command = snapfs::control::quote_name(&name);
                    for word in description {
                        command.push(' ');
                        command.push_str(&word);
                    }
                    (mountpoint, "create", command)
                }
                SnapshotAction::Revert { mountpoint, name } => {
                    (mountpoint, "revert", snapfs::control::quote_name(&name))
                }
                SnapshotAction::Delete { mountpoint, name } => {
                    (mountpoint, "delete", snapfs::control::quote_name(&name))
                }
            };
            snapfs::report::control_command(&mountpoint, file, &command)
        }
        Command::Commit { mountpoint, layer } => {
            snapfs::report::control_command(&mountpoint, "commit", layer.as_deref().unwrap_or(""))
        }
        Command::Pull { mountpoint, base } => {
            snapfs::report::control_command(&mountpoint, "pull", base.as_deref().unwrap_or(""))
        }
        Command::Diff {
            json,
            libvirt,
            image,
            from,
            to,
        } => snapfs::changes::command::diff(&image, &from, &to, json, libvirt.as_deref()),
        Command::Apply {
            ranges,
            increment,
            target,
        } => snapfs::changes::command::apply(&increment, ranges.as_deref(), &target),
        Command::Completions { shell } => {
            print_or_fail("the completions", &snapfs::cli::completions(shell))
        }
        Command::Man { dir: None } => {
            let mut page = Vec::new();
            snapfs::cli::write_man_page(&mut page)
                .map_err(|e| format!("rendering the manual page: {e}"))?;
            print_or_fail("the manual page", &page)
        }
        Command::Man { dir: Some(dir) } => {
            let written = snapfs::cli::write_man_pages(&dir)
                .map_err(|e| format!("writing manual pages into {}: {e}", dir.display()))?;
            for path in written {
                println!("{}", path.display());
            }
            Ok(())
        }
    }
}

/// Writes `bytes` to standard output. A reader that went away (`snapfs man | head`) is no
/// error.
fn print_or_fail(what: &str, bytes: &[u8]) -> Result<(), String> {
    let mut out = std::io::stdout().lock();
    match out.write_all(bytes).and_then(|()| out.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(format!("writing {what}: {e}")),
        _ => Ok(()),
    }
}

/// `snapfs mount`: the log destination is settled here, before the mount code forks into the
/// background (a log file opened now stays open in the daemon).
fn mount(mut args: MountArgs) -> Result<(), String> {
    let log_file = args.take_log_option()?;
    let settings = snapfs::mount::MountSettings::from_args(&args)?;
    logging::set_destination(&Destination::for_mount(
        settings.foreground,
        log_file.as_deref(),
    ))?;
    snapfs::mount::mount(settings)
}
