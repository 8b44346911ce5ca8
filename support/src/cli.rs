//! The command line: every `tunl` command and its options, parsed into a [`Command`] before anything
//! touches the network or the terminal. Bad input is one line naming the problem.

use std::ffi::OsString;
use std::path::PathBuf;

pub const USAGE: &str = "\
tunl: the support engineer's side of linbit-tunl

usage: tunl COMMAND [OPTIONS]

  create-session [--case CASE] [--customer NAME] [--expires-in MINUTES] [--restricted-only] [--join]
                          new session: prints its ID, the one-time token and the customer's command
  list                    sessions with their mode, host, case, viewers and age
  show ID                 everything the relay knows about a session, its recent chat
  pick                    choose a live session from a numbered menu, then join, ssh or info
  join [--read-only] ID   the customer's shell live on top, chat and status below (tmux)
  upgrade ID [--key FILE]...
                          ask the customer for the tunnel with your public key(s)
  revoke ID               close the tunnel: the customer's side removes your keys
  ssh ID [-- COMMAND...]  log in through the granted tunnel
  browser ID [--profile NAME] [--kill]
                          a SOCKS proxy through the tunnel and a browser that uses it
  chat ID TEXT...         send one chat line
  note ID TEXT...         set the note pinned in the customer's status rows (empty clears it)
  close ID [REASON...]    end the session; the customer sees the reason
  cancel ID               withdraw a session the customer has not joined yet
  expect ID [--timeout SECONDS]
                          wait until the customer connects (exit 0), 1 on expiry or timeout
  detach                  leave the join running in this terminal (or every join of yours)
  log ID                  the session's audit log, one JSON object a line
  help                    this text

In `tunl join`: Ctrl-b c toggles between the shell and the chat pane. The chat pane takes chat lines
and /note TEXT, /upgrade, /revoke, /detach, /close [REASON], /help.

Environment: TUNL_RELAY (default tunl.linbit.com), TUNL_RELAY_PORT (22), TUNL_SUPPORT_USER (your
user name), TUNL_SSH_CONFIG (an ssh_config file for every ssh tunl runs), TUNL_BROWSER.
Exit status: 0 done, 1 error (one line on stderr), 130/143 ended by SIGINT/SIGTERM; `tunl ssh`
passes ssh's status through.
";

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Create(Create),
    List,
    Show(String),
    Pick,
    Join {
        id: String,
        read_only: bool,
    },
    Upgrade {
        id: String,
        keys: Vec<PathBuf>,
    },
    Revoke(String),
    Ssh {
        id: String,
        command: Vec<OsString>,
    },
    Browser {
        id: String,
        profile: Option<String>,
        kill: bool,
    },
    Chat {
        id: String,
        text: String,
    },
    Note {
        id: String,
        text: String,
    },
    Close {
        id: String,
        reason: String,
    },
    Cancel(String),
    Expect {
        id: String,
        timeout: u64,
    },
    Detach,
    Log(String),
    Help,
    Version,
    /// Internal roles of `join`, started by its tmux: the mirrored shell, the chat pane, and one
    /// control word for the view (key bindings, hooks).
    View(PathBuf),
    ChatPane(PathBuf),
    Ctl(PathBuf, Vec<String>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Create {
    pub case: String,
    pub customer: String,
    pub expires_in: u32,
    pub restricted: bool,
    pub join: bool,
}

/// Minutes a pending session waits for its customer unless `--expires-in` says otherwise.
pub const DEFAULT_EXPIRES_IN: u32 = 60;
/// A week: longer is a session nobody will remember.
pub const MAX_EXPIRES_IN: u32 = 7 * 24 * 60;
/// How long `tunl expect` waits by default (the relay caps it at the session's expiry).
pub const DEFAULT_EXPECT_TIMEOUT: u64 = 3600;

/// A session ID is four lowercase ASCII words joined by single hyphens (as the client checks it).
pub fn valid_session_id(s: &str) -> bool {
    let words: Vec<&str> = s.split('-').collect();
    words.len() == 4
        && words.iter().all(|w| !w.is_empty() && w.len() <= 32 && w.bytes().all(|b| b.is_ascii_lowercase()))
}

/// Free text we send (case, customer name, chat, reasons): one line of printable text.
pub fn check_text(what: &str, s: &str, max: usize) -> Result<(), String> {
    if s.chars().any(|c| c.is_control()) {
        return Err(format!("{what} must not contain control characters"));
    }
    if s.len() > max {
        return Err(format!("{what} is longer than {max} bytes"));
    }
    Ok(())
}

/// Longest close reason the relay takes.
pub const MAX_REASON: usize = 256;
/// Longest chat line or note we send (the customer's chat pane takes 1024 bytes a line).
pub const MAX_CHAT: usize = 1024;

fn printable(s: &OsString) -> String {
    tunl_wire::neutralize(&s.to_string_lossy())
}

fn id_arg(v: OsString) -> Result<String, String> {
    let s = v.to_str().map(str::to_string).unwrap_or_default();
    if valid_session_id(&s) {
        Ok(s)
    } else {
        Err(format!("'{}' is not a session ID (four lowercase words, e.g. swift-fox-jumps-barrel)", printable(&v)))
    }
}

fn text_arg(v: OsString, what: &str) -> Result<String, String> {
    v.into_string().map_err(|_| format!("{what} is not valid UTF-8"))
}

fn number<T: std::str::FromStr>(v: OsString, what: &str) -> Result<T, String> {
    let s = v.to_string_lossy().to_string();
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("{what} must be a number, not '{}'", tunl_wire::neutralize(&s)));
    }
    s.parse().map_err(|_| format!("{what} is out of range: {s}"))
}

fn unexpected(cmd: &str, e: lexopt::Error) -> String {
    format!("{cmd}: {e} (see tunl help)")
}

/// Parse `tunl`'s arguments (without the program name).
pub fn parse(args: impl IntoIterator<Item = OsString>) -> Result<Command, String> {
    use lexopt::prelude::*;
    let mut args: Vec<OsString> = args.into_iter().collect();
    // `tunl ssh ID -- COMMAND...`: everything after the first `--` is the remote command, split off
    // here because lexopt does not say whether a positional came after `--`.
    let mut remote: Vec<OsString> = Vec::new();
    if args.first().is_some_and(|a| a == "ssh")
        && let Some(i) = args.iter().position(|a| a == "--")
    {
        remote = args.split_off(i + 1);
        args.pop();
    }
    let mut p = lexopt::Parser::from_args(args);
    let cmd = match p.next().map_err(|e| unexpected("tunl", e))? {
        None => return Ok(Command::Help),
        Some(Value(v)) => v.to_string_lossy().to_string(),
        Some(Long("help")) | Some(Short('h')) => return Ok(Command::Help),
        Some(Long("version")) | Some(Short('V')) => return Ok(Command::Version),
        Some(a) => return Err(unexpected("tunl", a.unexpected())),
    };
    let c = cmd.as_str();
    let mut ids: Vec<String> = Vec::new();
    let mut rest: Vec<OsString> = Vec::new();
    let mut create = Create {
        case: String::new(),
        customer: String::new(),
        expires_in: DEFAULT_EXPIRES_IN,
        restricted: false,
        join: false,
    };
    let mut read_only = false;
    let mut keys = Vec::new();
    let mut profile = None;
    let mut kill = false;
    let mut timeout = DEFAULT_EXPECT_TIMEOUT;
    // The first positional is the session ID for every command that takes one.
    let takes_id = matches!(
        c,
        "show"
            | "join"
            | "upgrade"
            | "revoke"
            | "ssh"
            | "browser"
            | "chat"
            | "note"
            | "close"
            | "cancel"
            | "expect"
            | "log"
    );
    while let Some(arg) = p.next().map_err(|e| unexpected(c, e))? {
        match (c, arg) {
            (_, Long("help")) | (_, Short('h')) => return Ok(Command::Help),
            ("create-session", Long("case")) => {
                create.case = text_arg(p.value().map_err(|e| unexpected(c, e))?, "--case")?;
                check_text("--case", &create.case, 200)?;
            }
            ("create-session", Long("customer")) => {
                create.customer = text_arg(p.value().map_err(|e| unexpected(c, e))?, "--customer")?;
                check_text("--customer", &create.customer, 200)?;
            }
            ("create-session", Long("expires-in")) => {
                let m: u32 = number(p.value().map_err(|e| unexpected(c, e))?, "--expires-in")?;
                if m == 0 || m > MAX_EXPIRES_IN {
                    return Err(format!("--expires-in must be 1 to {MAX_EXPIRES_IN} minutes, not {m}"));
                }
                create.expires_in = m;
            }
            ("create-session", Long("restricted-only")) => create.restricted = true,
            ("create-session", Long("join")) => create.join = true,
            ("join", Long("read-only")) | ("join", Short('r')) => read_only = true,
            ("upgrade", Long("key")) => keys.push(PathBuf::from(p.value().map_err(|e| unexpected(c, e))?)),
            ("browser", Long("profile")) => {
                let v = text_arg(p.value().map_err(|e| unexpected(c, e))?, "--profile")?;
                if v.is_empty()
                    || v.len() > 64
                    || !v.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
                    || v.starts_with('.')
                {
                    return Err(format!(
                        "--profile '{}' must be letters, digits, '.', '_' or '-' (at most 64)",
                        tunl_wire::neutralize(&v)
                    ));
                }
                profile = Some(v);
            }
            ("browser", Long("kill")) => kill = true,
            ("expect", Long("timeout")) => {
                timeout = number(p.value().map_err(|e| unexpected(c, e))?, "--timeout")?;
                if timeout == 0 || timeout > DEFAULT_EXPECT_TIMEOUT {
                    return Err(format!("--timeout must be 1 to {DEFAULT_EXPECT_TIMEOUT} seconds"));
                }
            }
            ("ssh", Value(v)) if ids.len() == 1 => {
                // `tunl ssh ID COMMAND` without `--` would be ambiguous with options of ours.
                return Err(format!("ssh: put the remote command after '--': tunl ssh ID -- {}", printable(&v)));
            }
            (_, Value(v)) if takes_id && ids.is_empty() => ids.push(id_arg(v)?),
            ("chat" | "note" | "close", Value(v)) => rest.push(v),
            ("help", Value(_)) => return Ok(Command::Help),
            (_, a) => return Err(unexpected(c, a.unexpected())),
        }
    }
    let id = || -> Result<String, String> {
        ids.first().cloned().ok_or_else(|| format!("{c}: which session? (tunl {c} ID; `tunl list` shows them)"))
    };
    let joined = |rest: &[OsString], what: &str| -> Result<String, String> {
        let parts: Result<Vec<String>, String> = rest.iter().map(|v| text_arg(v.clone(), what)).collect();
        let s = parts?.join(" ");
        check_text(what, &s, MAX_CHAT)?;
        Ok(s)
    };
    Ok(match c {
        "create-session" => Command::Create(create),
        "list" => Command::List,
        "show" => Command::Show(id()?),
        "pick" => Command::Pick,
        "join" => Command::Join { id: id()?, read_only },
        "upgrade" => Command::Upgrade { id: id()?, keys },
        "revoke" => Command::Revoke(id()?),
        "ssh" => Command::Ssh { id: id()?, command: remote },
        "browser" => Command::Browser { id: id()?, profile, kill },
        "chat" => {
            let id = id()?;
            let text = joined(&rest, "the chat text")?;
            if text.trim().is_empty() {
                return Err("chat: nothing to say (tunl chat ID TEXT)".into());
            }
            Command::Chat { id, text }
        }
        "note" => Command::Note { id: id()?, text: joined(&rest, "the note")? },
        "close" => {
            let id = id()?;
            let reason = joined(&rest, "the reason")?;
            check_text("the reason", &reason, MAX_REASON)?;
            Command::Close { id, reason }
        }
        "cancel" => Command::Cancel(id()?),
        "expect" => Command::Expect { id: id()?, timeout },
        "detach" => Command::Detach,
        "log" => Command::Log(id()?),
        "help" => Command::Help,
        _ => return Err(format!("unknown command '{}' (see tunl help)", tunl_wire::neutralize(c))),
    })
}

/// The internal roles, recognised before the ordinary parser so they never appear in `help`.
pub fn parse_internal(args: &[OsString]) -> Option<Command> {
    let role = args.first()?.to_str()?;
    let dir = || args.get(1).map(PathBuf::from);
    match role {
        "__view" if args.len() == 2 => Some(Command::View(dir()?)),
        "__chat" if args.len() == 2 => Some(Command::ChatPane(dir()?)),
        "__ctl" if args.len() >= 3 => {
            Some(Command::Ctl(dir()?, args[2..].iter().map(|a| a.to_string_lossy().into_owned()).collect()))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Result<Command, String> {
        parse(s.split_whitespace().map(OsString::from))
    }
    const ID: &str = "swift-fox-jumps-barrel";

    #[test]
    fn commands() {
        assert_eq!(p("").unwrap(), Command::Help);
        assert_eq!(p("--version").unwrap(), Command::Version);
        assert_eq!(p("list").unwrap(), Command::List);
        assert_eq!(p(&format!("show {ID}")).unwrap(), Command::Show(ID.into()));
        assert_eq!(p(&format!("join --read-only {ID}")).unwrap(), Command::Join { id: ID.into(), read_only: true });
        assert_eq!(p(&format!("join {ID}")).unwrap(), Command::Join { id: ID.into(), read_only: false });
        assert_eq!(
            p("create-session --case 4711 --customer ACME --expires-in 30 --restricted-only --join").unwrap(),
            Command::Create(Create {
                case: "4711".into(),
                customer: "ACME".into(),
                expires_in: 30,
                restricted: true,
                join: true
            })
        );
        assert_eq!(
            p("create-session").unwrap(),
            Command::Create(Create {
                case: String::new(),
                customer: String::new(),
                expires_in: DEFAULT_EXPIRES_IN,
                restricted: false,
                join: false
            })
        );
        assert_eq!(
            p(&format!("chat {ID} hello there")).unwrap(),
            Command::Chat { id: ID.into(), text: "hello there".into() }
        );
        assert_eq!(p(&format!("note {ID}")).unwrap(), Command::Note { id: ID.into(), text: String::new() });
        assert_eq!(
            p(&format!("close {ID} all done")).unwrap(),
            Command::Close { id: ID.into(), reason: "all done".into() }
        );
        assert_eq!(p(&format!("expect {ID} --timeout 5")).unwrap(), Command::Expect { id: ID.into(), timeout: 5 });
        assert_eq!(
            p(&format!("upgrade {ID} --key a.pub --key=b.pub")).unwrap(),
            Command::Upgrade { id: ID.into(), keys: vec!["a.pub".into(), "b.pub".into()] }
        );
        assert_eq!(
            p(&format!("browser {ID} --profile work --kill")).unwrap(),
            Command::Browser { id: ID.into(), profile: Some("work".into()), kill: true }
        );
        assert_eq!(p("detach").unwrap(), Command::Detach);
        assert_eq!(p(&format!("log {ID}")).unwrap(), Command::Log(ID.into()));
        assert_eq!(p(&format!("cancel {ID}")).unwrap(), Command::Cancel(ID.into()));
        assert_eq!(p(&format!("revoke {ID}")).unwrap(), Command::Revoke(ID.into()));
    }

    #[test]
    fn ssh_command_after_dashes() {
        assert_eq!(p(&format!("ssh {ID}")).unwrap(), Command::Ssh { id: ID.into(), command: vec![] });
        assert_eq!(
            p(&format!("ssh {ID} -- id -u --name")).unwrap(),
            Command::Ssh { id: ID.into(), command: vec!["id".into(), "-u".into(), "--name".into()] }
        );
        assert!(p(&format!("ssh {ID} id")).unwrap_err().contains("after '--'"));
    }

    #[test]
    fn bad_input_is_one_clear_line() {
        for (args, want) in [
            ("join", "which session"),
            ("join Swift-fox-jumps-barrel", "is not a session ID"),
            ("show a-b-c", "is not a session ID"),
            ("frobnicate", "unknown command"),
            ("list --bogus", "invalid option"),
            ("create-session --expires-in 0", "1 to"),
            ("create-session --expires-in 99999999", "1 to"),
            ("create-session --expires-in -3", "must be a number"),
            ("create-session --case", "missing argument"),
            ("browser swift-fox-jumps-barrel --profile ../x", "--profile"),
            ("chat swift-fox-jumps-barrel", "nothing to say"),
            ("expect swift-fox-jumps-barrel --timeout 0", "1 to 3600"),
            ("expect swift-fox-jumps-barrel --timeout 3601", "1 to 3600"),
            ("show swift-fox-jumps-barrel extra", "unexpected argument"),
        ] {
            let e = p(args).unwrap_err();
            assert!(e.contains(want), "{args}: {e}");
            assert!(!e.contains('\n'), "{args}: {e}");
        }
        let e = parse([OsString::from("show"), OsString::from("a\u{1b}[2J")]).unwrap_err();
        assert!(!e.contains('\u{1b}'), "{e}");
        let e =
            parse([OsString::from("create-session"), OsString::from("--case"), OsString::from("a\nb")]).unwrap_err();
        assert!(e.contains("control characters"), "{e}");
    }

    #[test]
    fn internal_roles() {
        let a = |s: &str| s.split(' ').map(OsString::from).collect::<Vec<_>>();
        assert_eq!(parse_internal(&a("__view /tmp/x")), Some(Command::View("/tmp/x".into())));
        assert_eq!(
            parse_internal(&a("__ctl /tmp/x detach")),
            Some(Command::Ctl("/tmp/x".into(), vec!["detach".into()]))
        );
        assert_eq!(parse_internal(&a("__view")), None);
        assert_eq!(parse_internal(&a("list")), None);
    }
}
