use clap::Parser;

use snapfs::cli::{Cli, Command, SnapshotAction};

fn main() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn"))
        .format_timestamp(None)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Mount(args) => {
            snapfs::mount::MountSettings::from_args(&args).and_then(snapfs::mount::mount)
        }
        Command::Umount { mountpoint } => snapfs::mount::umount(&mountpoint),
        Command::Info { json, image } => snapfs::report::info(&image, json),
        Command::Snapshot { action } => {
            let (mountpoint, file, command) = match action {
                SnapshotAction::Create {
                    mountpoint,
                    name,
                    description,
                } => {
                    let mut command = name;
                    for word in description {
                        command.push(' ');
                        command.push_str(&word);
                    }
                    (mountpoint, "create", command)
                }
                SnapshotAction::Revert { mountpoint, name } => (mountpoint, "revert", name),
                SnapshotAction::Delete { mountpoint, name } => (mountpoint, "delete", name),
            };
            snapfs::report::control_command(&mountpoint, file, &command)
        }
        Command::Commit { mountpoint, layer } => {
            snapfs::report::control_command(&mountpoint, "commit", layer.as_deref().unwrap_or(""))
        }
    };
    if let Err(message) = result {
        eprintln!("snapfs: {message}");
        std::process::exit(1);
    }
}
