use clap::Parser;

use snapfs::cli::{Cli, Command};

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
    };
    if let Err(message) = result {
        eprintln!("snapfs: {message}");
        std::process::exit(1);
    }
}
