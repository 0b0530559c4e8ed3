//! The command line as a user meets it, without mounting anything (no root needed): every
//! command's `--help` with an example, the shell completions and the manual pages generated from
//! the clap definitions, and the log options' errors.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use clap::CommandFactory;
use snapfs::cli::Cli;

fn snapfs_bin() -> PathBuf {
    match std::env::var_os("SNAPFS_TEST_BIN") {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => PathBuf::from(env!("CARGO_BIN_EXE_snapfs")),
    }
}

fn snapfs(args: &[&str]) -> Output {
    Command::new(snapfs_bin())
        .args(args)
        .env_remove("RUST_LOG")
        .env_remove("RUST_BACKTRACE")
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run snapfs {args:?}: {e}"))
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Every command path (`[]`, `["mount"]`, `["snapshot", "create"]`, ...), hidden ones included,
/// clap's own `help` excluded.
fn command_paths() -> Vec<Vec<String>> {
    fn walk(cmd: &clap::Command, prefix: Vec<String>, out: &mut Vec<Vec<String>>) {
        out.push(prefix.clone());
        for sub in cmd.get_subcommands().filter(|s| s.get_name() != "help") {
            let mut path = prefix.clone();
            path.push(sub.get_name().to_owned());
            walk(sub, path, out);
        }
    }
    let mut out = Vec::new();
    walk(&Cli::command(), Vec::new(), &mut out);
    out
}

#[test]
fn every_command_has_help_with_an_example() {
    let paths = command_paths();
    for expected in [
        &["mount"][..],
        &["umount"],
        &["snapshot"],
        &["snapshot", "create"],
        &["snapshot", "revert"],
        &["snapshot", "delete"],
        &["commit"],
        &["pull"],
        &["info"],
        &["completions"],
        &["man"],
    ] {
        assert!(
            paths.iter().any(|p| p == expected),
            "command {expected:?} is missing from the definitions: {paths:?}"
        );
    }
    let mut problems = Vec::new();
    for path in &paths {
        for flag in ["--help", "-h"] {
            let mut args: Vec<&str> = path.iter().map(String::as_str).collect();
            args.push(flag);
            let out = snapfs(&args);
            let stdout = text(&out.stdout);
            if !out.status.success() {
                problems.push(format!("snapfs {}: exit {}", args.join(" "), out.status));
            }
            if !stdout.contains("Example") {
                problems.push(format!(
                    "snapfs {}: no example in\n{stdout}",
                    args.join(" ")
                ));
            }
            if !stdout.contains("Usage: snapfs") {
                problems.push(format!("snapfs {}: no usage line", args.join(" ")));
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn help_lists_the_visible_commands_only() {
    let out = snapfs(&["--help"]);
    assert!(out.status.success());
    let help = text(&out.stdout);
    for name in ["mount", "umount", "snapshot", "commit", "pull", "info"] {
        assert!(
            help.contains(&format!("  {name} ")),
            "{name} missing:\n{help}"
        );
    }
    for hidden in ["completions", "man "] {
        assert!(
            !help.contains(&format!("  {hidden}")),
            "{hidden} shown:\n{help}"
        );
    }
    assert!(help.contains("RUST_LOG"), "logging not explained:\n{help}");
}

#[test]
fn info_takes_a_libvirt_folder() {
    let out = snapfs(&["info", "--help"]);
    assert!(text(&out.stdout).contains("--libvirt <DIR>"));
    // Parsed (the missing image is what fails, not the option).
    let out = snapfs(&[
        "info",
        "--libvirt",
        "/nonexistent-libvirt",
        "/nonexistent/vm.qcow2",
    ]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    assert!(!stderr.contains("unexpected argument"), "{stderr}");
    assert!(stderr.starts_with("snapfs: "), "{stderr}");
}

#[test]
fn completions() {
    let bash = snapfs(&["completions", "bash"]);
    assert!(bash.status.success(), "{}", text(&bash.stderr));
    let script = text(&bash.stdout);
    assert!(script.contains("_snapfs()"), "{script}");
    assert!(script.contains("complete -F _snapfs"), "{script}");
    for word in [
        "mount",
        "umount",
        "snapshot",
        "create",
        "--libvirt",
        "--log",
    ] {
        assert!(script.contains(word), "bash completion lacks {word}");
    }
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("snapfs.bash");
    std::fs::write(&file, &bash.stdout).unwrap();
    let check = Command::new("bash").arg("-n").arg(&file).output();
    if let Ok(check) = check {
        assert!(
            check.status.success(),
            "bash -n rejects the completion script: {}",
            text(&check.stderr)
        );
    }

    let zsh = snapfs(&["completions", "zsh"]);
    assert!(zsh.status.success());
    assert!(text(&zsh.stdout).starts_with("#compdef snapfs"));

    let fish = snapfs(&["completions", "fish"]);
    assert!(fish.status.success());
    assert!(text(&fish.stdout).contains("complete -c snapfs"));

    let bad = snapfs(&["completions", "tcsh"]);
    assert_eq!(bad.status.code(), Some(2));
    assert!(text(&bad.stderr).contains("possible values"));
}

/// Runs groff over a page with warnings on, when groff is installed (it is not a requirement of
/// the tests).
fn groff_warnings(page: &Path) -> Option<String> {
    let out = Command::new("groff")
        .args(["-man", "-Tutf8", "-ww", "-z"])
        .arg(page)
        .output()
        .ok()?;
    Some(text(&out.stderr))
}

#[test]
fn man_page() {
    let out = snapfs(&["man"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let page = text(&out.stdout);
    assert!(page.starts_with(".TH snapfs 1 "), "{page}");
    assert_eq!(page.matches(".TH ").count(), 1);
    assert_eq!(page.matches(".ds Aq").count(), 2, "one apostrophe preamble");
    for section in [
        ".SH NAME",
        ".SH SYNOPSIS",
        ".SH DESCRIPTION",
        ".SH SUBCOMMANDS",
        ".SH EXAMPLES",
        ".SH LOGGING",
        ".SH \"SEE ALSO\"",
    ] {
        assert!(page.contains(section), "{section} missing:\n{page}");
    }
    assert!(page.contains("snapfs\\-mount(1)"));
    assert!(!page.contains("completions"), "hidden command documented");

    // Like `snapfs man | head`: a reader that goes away early is no error.
    let mut child = Command::new(snapfs_bin())
        .arg("man")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let done = child.wait_with_output().unwrap();
    assert!(done.status.success(), "{}", text(&done.stderr));
    assert!(!text(&done.stderr).contains("panicked"));
}

#[test]
fn man_pages_into_a_directory() {
    let dir = tempfile::tempdir().unwrap();
    let out = snapfs(&["man", "--dir", dir.path().to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let mut names: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            "snapfs-commit.1",
            "snapfs-info.1",
            "snapfs-mount.1",
            "snapfs-pull.1",
            "snapfs-snapshot-create.1",
            "snapfs-snapshot-delete.1",
            "snapfs-snapshot-revert.1",
            "snapfs-snapshot.1",
            "snapfs-umount.1",
            "snapfs.1",
        ]
    );
    assert_eq!(text(&out.stdout).lines().count(), names.len());
    for name in &names {
        let path = dir.path().join(name);
        let page = std::fs::read_to_string(&path).unwrap();
        let title = name.trim_end_matches(".1");
        assert!(
            page.starts_with(&format!(".TH {title} 1 ")),
            "{name}:\n{page}"
        );
        assert!(page.contains(".SH EXAMPLES"), "{name} has no examples");
        assert!(page.contains("\"snapfs 0."), "{name}: source is not snapfs");
        if let Some(warnings) = groff_warnings(&path) {
            assert!(warnings.trim().is_empty(), "groff on {name}: {warnings}");
        }
    }
    let mount = std::fs::read_to_string(dir.path().join("snapfs-mount.1")).unwrap();
    assert!(mount.contains("\\-\\-log"), "--log undocumented");
    assert!(mount.contains(".SH LOGGING"));
}

#[test]
fn log_option_errors() {
    let out = snapfs(&[
        "mount",
        "-o",
        "ro,log=",
        "/nonexistent.qcow2",
        "/nonexistent",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        text(&out.stderr).trim_end(),
        "snapfs: mount option log needs a value (log=FILE)"
    );

    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("missing-dir").join("snapfs.log");
    let out = snapfs(&[
        "mount",
        "--log",
        bad.to_str().unwrap(),
        "/nonexistent.qcow2",
        "/nonexistent",
    ]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    assert!(
        stderr.starts_with("snapfs: cannot open the log file") && stderr.lines().count() == 1,
        "{stderr}"
    );
}
