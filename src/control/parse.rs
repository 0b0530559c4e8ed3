//! Parsing what was written to a control file: one write is one command.

use super::CommandError;

/// Largest command accepted: a name, a description, maybe a path.
pub const MAX_COMMAND_LEN: usize = 4096;
/// The control files that take commands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommandKind {
    Create,
    Revert,
    Delete,
    Commit,
    Pull,
}

impl CommandKind {
    pub const ALL: [CommandKind; 5] = [
        CommandKind::Create,
        CommandKind::Revert,
        CommandKind::Delete,
        CommandKind::Commit,
        CommandKind::Pull,
    ];

    pub fn file_name(self) -> &'static str {
        match self {
            CommandKind::Create => "create",
            CommandKind::Revert => "revert",
            CommandKind::Delete => "delete",
            CommandKind::Commit => "commit",
            CommandKind::Pull => "pull",
        }
    }
}

/// A parsed command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Create {
        name: String,
        description: Option<String>,
    },
    CreateExternal {
        name: String,
        file: Option<String>,
    },
    Revert {
        name: String,
    },
    Delete {
        name: String,
    },
    Commit {
        layer: Option<String>,
    },
    /// Copy into the top what it reads from the layers above `base` (default: every layer),
    /// then make `base` (default: none) its backing file.
    Pull {
        base: Option<String>,
    },
}

/// Parses what was written to control file `kind`.
pub fn parse(kind: CommandKind, input: &[u8]) -> Result<Command, CommandError> {
    let invalid = |m: String| CommandError::new(libc::EINVAL, m);
    if input.len() > MAX_COMMAND_LEN {
        return Err(invalid(format!(
            "command is {} bytes long; at most {MAX_COMMAND_LEN} are accepted",
            input.len()
        )));
    }
    let text =
        std::str::from_utf8(input).map_err(|_| invalid("command is not valid UTF-8".into()))?;
    let text = text.strip_suffix('\n').unwrap_or(text);
    let text = text.strip_suffix('\r').unwrap_or(text);
    if text.chars().any(|c| c.is_control() && c != '\t') {
        return Err(invalid(
            "command contains a line break or control character; write one command per write"
                .into(),
        ));
    }
    let text = text.trim();
    let (first, rest) = match text.split_once(char::is_whitespace) {
        Some((a, b)) => (a, b.trim()),
        None => (text, ""),
    };
    let need_name = |what: &str| -> Result<String, CommandError> {
        if first.is_empty() {
            Err(invalid(format!("{what} needs a snapshot name")))
        } else {
            Ok(first.to_owned())
        }
    };
    match kind {
        CommandKind::Create => {
            let name = need_name("create")?;
            let mut words = rest.split_whitespace();
            if words.next() == Some("--external") {
                let file = words.next().map(str::to_owned);
                if words.next().is_some() {
                    return Err(invalid("usage: NAME --external [FILE]".into()));
                }
                return Ok(Command::CreateExternal { name, file });
            }
            Ok(Command::Create {
                name,
                description: (!rest.is_empty()).then(|| rest.to_owned()),
            })
        }
        CommandKind::Revert | CommandKind::Delete => {
            let name = need_name(kind.file_name())?;
            if !rest.is_empty() {
                return Err(invalid(format!(
                    "usage: echo NAME > control/{} (one name only)",
                    kind.file_name()
                )));
            }
            Ok(if kind == CommandKind::Revert {
                Command::Revert { name }
            } else {
                Command::Delete { name }
            })
        }
        CommandKind::Commit => {
            if !rest.is_empty() {
                return Err(invalid("usage: echo [LAYER] > control/commit".into()));
            }
            Ok(Command::Commit {
                layer: (!first.is_empty()).then(|| first.to_owned()),
            })
        }
        CommandKind::Pull => {
            if !rest.is_empty() {
                return Err(invalid("usage: echo [BASE] > control/pull".into()));
            }
            Ok(Command::Pull {
                base: (!first.is_empty()).then(|| first.to_owned()),
            })
        }
    }
}

/// The words `control/status` names a command by: `create NAME`, `commit (top)`, or the file's
/// name for a command that did not parse.
pub fn label(kind: CommandKind, command: &Result<Command, CommandError>) -> String {
    match command {
        Ok(Command::Create { name, .. } | Command::CreateExternal { name, .. })
        | Ok(Command::Revert { name } | Command::Delete { name }) => {
            format!("{} {name}", kind.file_name())
        }
        Ok(Command::Commit { layer }) => {
            format!("commit {}", layer.as_deref().unwrap_or("(top)"))
        }
        Ok(Command::Pull { base }) => {
            format!("pull {}", base.as_deref().unwrap_or("(all)"))
        }
        Err(_) => kind.file_name().to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_commands() {
        assert_eq!(
            parse(CommandKind::Create, b"pkg-updated after apt upgrade\n"),
            Ok(Command::Create {
                name: "pkg-updated".into(),
                description: Some("after apt upgrade".into())
            })
        );
        assert_eq!(
            parse(CommandKind::Create, b"s1\n"),
            Ok(Command::Create {
                name: "s1".into(),
                description: None
            })
        );
        assert_eq!(
            parse(CommandKind::Create, b"s2 --external /vm/new.qcow2"),
            Ok(Command::CreateExternal {
                name: "s2".into(),
                file: Some("/vm/new.qcow2".into())
            })
        );
        assert_eq!(
            parse(CommandKind::Revert, b"s1\n"),
            Ok(Command::Revert { name: "s1".into() })
        );
        assert_eq!(
            parse(CommandKind::Commit, b"\n"),
            Ok(Command::Commit { layer: None })
        );
        assert_eq!(
            parse(CommandKind::Commit, b"base"),
            Ok(Command::Commit {
                layer: Some("base".into())
            })
        );
        assert_eq!(
            parse(CommandKind::Pull, b"\n"),
            Ok(Command::Pull { base: None })
        );
        assert_eq!(
            parse(CommandKind::Pull, b"base\n"),
            Ok(Command::Pull {
                base: Some("base".into())
            })
        );
    }

    #[test]
    fn refuses_bad_input() {
        for (kind, input) in [
            (CommandKind::Create, &b"\n"[..]),
            (CommandKind::Create, b""),
            (CommandKind::Delete, b"a b"),
            (CommandKind::Revert, b"a\nb\n"),
            (CommandKind::Create, b"\xff\xfe"),
            (CommandKind::Create, b"a\0b"),
            (CommandKind::Commit, b"a b"),
            (CommandKind::Pull, b"a b"),
        ] {
            let e = parse(kind, input).unwrap_err();
            assert_eq!(e.errno, libc::EINVAL, "{input:?}: {}", e.message);
        }
        let long = vec![b'a'; MAX_COMMAND_LEN + 1];
        assert_eq!(
            parse(CommandKind::Create, &long).unwrap_err().errno,
            libc::EINVAL
        );
    }
}
