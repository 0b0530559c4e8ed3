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
    let text = text.trim_start();
    let (first, rest) = first_word(text).map_err(invalid)?;
    let rest = rest.trim();
    let need_name = |what: &str| -> Result<String, CommandError> {
        if first.is_empty() {
            Err(invalid(format!("{what} needs a snapshot name")))
        } else {
            Ok(first.clone())
        }
    };
    match kind {
        CommandKind::Create => {
            let name = need_name("create")?;
            if let Some(after) = rest.strip_prefix("--external")
                && (after.is_empty() || after.starts_with(char::is_whitespace))
            {
                let (file, tail) = first_word(after.trim_start()).map_err(invalid)?;
                if !tail.trim().is_empty() {
                    return Err(invalid("usage: NAME --external [FILE]".into()));
                }
                return Ok(Command::CreateExternal {
                    name,
                    file: (!file.is_empty()).then_some(file),
                });
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
                    "usage: echo NAME > control/{} (one name; a name with white space is quoted: \"before upgrade\")",
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
                layer: (!first.is_empty()).then_some(first),
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

/// The first word of `text` (which starts with it, or is empty) and what follows it (white space
/// included). A word is a run of characters up to white space, or a quoted name: `"` up to the
/// next `"` that is not escaped, in which `\"` stands for `"` and `\\` for `\` (any other `\`
/// is refused); the closing quote must end the text or be followed by white space.
fn first_word(text: &str) -> Result<(String, &str), String> {
    let Some(quoted) = text.strip_prefix('"') else {
        let end = text.find(char::is_whitespace).unwrap_or(text.len());
        return Ok((text[..end].to_owned(), &text[end..]));
    };
    let mut word = String::new();
    let mut chars = quoted.char_indices();
    while let Some((i, c)) = chars.next() {
        match c {
            '"' => {
                let rest = &quoted[i + 1..];
                if !rest.is_empty() && !rest.starts_with(char::is_whitespace) {
                    return Err("a quoted name must be followed by white space or the end".into());
                }
                return Ok((word, rest));
            }
            '\\' => match chars.next() {
                Some((_, e @ ('"' | '\\'))) => word.push(e),
                _ => {
                    return Err(
                        "in a quoted name only \\\" and \\\\ are escapes (a quote and a backslash)"
                            .into(),
                    );
                }
            },
            c => word.push(c),
        }
    }
    Err("a quoted name has no closing quote".into())
}

/// `name` as a command carries it: as it is when it is one word that does not start with a
/// quote, else quoted (see [`parse`]). `parse` of the result gives `name` back.
pub fn quote_name(name: &str) -> String {
    if !name.is_empty() && !name.starts_with('"') && !name.contains(char::is_whitespace) {
        return name.to_owned();
    }
    let mut out = String::with_capacity(name.len() + 2);
    out.push('"');
    for c in name.chars() {
        if c == '"' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
    out
}

/// The words `control/status` names a command by: `create NAME`, `commit (top)`, or the file's
/// name for a command that did not parse.
pub fn label(kind: CommandKind, command: &Result<Command, CommandError>) -> String {
    match command {
        Ok(Command::Create { name, .. } | Command::CreateExternal { name, .. })
        | Ok(Command::Revert { name } | Command::Delete { name }) => {
            format!("{} {}", kind.file_name(), quote_name(name))
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
    fn quoted_names() {
        assert_eq!(
            parse(CommandKind::Create, b"\"before upgrade\" apt upgrade\n"),
            Ok(Command::Create {
                name: "before upgrade".into(),
                description: Some("apt upgrade".into())
            })
        );
        assert_eq!(
            parse(CommandKind::Delete, b"\"before upgrade\"\n"),
            Ok(Command::Delete {
                name: "before upgrade".into()
            })
        );
        assert_eq!(
            parse(
                CommandKind::Create,
                br#""a \"q\" \\ b" --external "/vm/new file.qcow2""#
            ),
            Ok(Command::CreateExternal {
                name: r#"a "q" \ b"#.into(),
                file: Some("/vm/new file.qcow2".into())
            })
        );
        for name in [
            "plain",
            "two words",
            " lead",
            "trail ",
            "\"q",
            "a\\b",
            "tab\there",
            "x\"",
        ] {
            let quoted = quote_name(name);
            assert_eq!(
                parse(CommandKind::Revert, quoted.as_bytes()),
                Ok(Command::Revert { name: name.into() }),
                "{quoted}"
            );
        }
        for bad in [&b"\"open"[..], b"\"a\"b", b"\"a\\x\"", b"two words"] {
            assert_eq!(
                parse(CommandKind::Delete, bad).unwrap_err().errno,
                libc::EINVAL
            );
        }
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
