//! The connection to the relay: the engineer's own `ssh` to the relay's support account, one command
//! string per connection (`ssh -p $TUNL_RELAY_PORT $TUNL_SUPPORT_USER@$TUNL_RELAY -- 'tunl-support/1
//! ...'`). We have no SSH stack of our own: keys, agent, known_hosts and the engineer's ssh_config
//! are ssh's business.

use crate::proto::{ErrReply, Reply, parse_reply};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use tunl_wire::{Piece, Splitter, neutralize};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Relay {
    pub host: String,
    pub port: u16,
    pub user: String,
    /// `TUNL_SSH_CONFIG`: an ssh_config for every ssh we run (`-F`), instead of ~/.ssh/config.
    pub ssh_config: Option<PathBuf>,
}

fn valid_host(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && !s.starts_with('-')
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-' || b == b':' || b == b'_')
}

fn valid_user(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 32
        && !s.starts_with('-')
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.' || b == b'-')
}

impl Relay {
    /// From the environment, as `get` reads it (`std::env::var` outside tests).
    pub fn from_env(get: impl Fn(&str) -> Option<String>) -> Result<Relay, String> {
        let host = get("TUNL_RELAY").filter(|s| !s.is_empty()).unwrap_or_else(|| "tunl.linbit.com".into());
        if !valid_host(&host) {
            return Err(format!("TUNL_RELAY '{}' is not a host name", neutralize(&host)));
        }
        let port = match get("TUNL_RELAY_PORT").filter(|s| !s.is_empty()) {
            None => 22,
            Some(p) => match tunl_wire::parse_u64(&p) {
                Some(n) if (1..=65535).contains(&n) => n as u16,
                _ => return Err(format!("TUNL_RELAY_PORT '{}' is not a port (1-65535)", neutralize(&p))),
            },
        };
        let user = get("TUNL_SUPPORT_USER")
            .filter(|s| !s.is_empty())
            .or_else(|| get("USER").filter(|s| !s.is_empty()))
            .or_else(|| get("LOGNAME").filter(|s| !s.is_empty()))
            .ok_or("TUNL_SUPPORT_USER is not set and neither is USER")?;
        if !valid_user(&user) {
            return Err(format!("TUNL_SUPPORT_USER '{}' is not a user name", neutralize(&user)));
        }
        let ssh_config = match get("TUNL_SSH_CONFIG").filter(|s| !s.is_empty()) {
            None => None,
            Some(p) => {
                let p = PathBuf::from(p);
                if !p.is_file() {
                    return Err(format!("TUNL_SSH_CONFIG {} is not a readable file", neutralize(&p.to_string_lossy())));
                }
                Some(p)
            }
        };
        Ok(Relay { host, port, user, ssh_config })
    }

    pub fn from_process_env() -> Result<Relay, String> {
        Relay::from_env(|k| std::env::var(k).ok())
    }

    /// `user@host` for ssh.
    pub fn destination(&self) -> String {
        format!("{}@{}", self.user, self.host)
    }

    /// Options every ssh to the relay gets: the config file, no agent or X11 forwarding to the
    /// relay, keep-alives so a dead link is noticed.
    pub fn base_args(&self) -> Vec<String> {
        let mut a = Vec::new();
        if let Some(f) = &self.ssh_config {
            a.push("-F".into());
            a.push(f.to_string_lossy().into_owned());
        }
        for o in ["ForwardAgent=no", "ForwardX11=no", "ServerAliveInterval=15", "ServerAliveCountMax=3"] {
            a.push("-o".into());
            a.push(o.into());
        }
        a.push("-p".into());
        a.push(self.port.to_string());
        a
    }

    /// The argv (after `ssh`) that runs one command string on the relay. With `mux`, the command
    /// goes through an existing ControlMaster socket (`tunl join` opens one so ssh can ask for a
    /// passphrase in the engineer's terminal before tmux takes it over).
    pub fn command_args(&self, command: &str, mux: Option<&Path>) -> Vec<String> {
        let mut a = self.base_args();
        if let Some(sock) = mux {
            a.push("-S".into());
            a.push(sock.to_string_lossy().into_owned());
            a.push("-o".into());
            a.push("ControlMaster=no".into());
        }
        a.push("-T".into());
        a.push(self.destination());
        a.push("--".into());
        a.push(command.into());
        a
    }
}

/// The ssh program: `ssh` on PATH.
pub fn ssh_program() -> String {
    "ssh".into()
}

/// Why a request did not give an answer.
#[derive(Debug)]
pub enum Failure {
    /// The relay answered `ERR`.
    Err(ErrReply),
    /// ssh could not run, or the connection ended without `OK`/`ERR`.
    Link(String),
}

impl Failure {
    pub fn message(&self) -> String {
        match self {
            Failure::Err(e) => e.explain(),
            Failure::Link(s) => s.clone(),
        }
    }
}

/// The last meaningful line ssh printed on stderr, neutralised: its own explanation of a failed
/// login or connection is better than any we could write.
pub fn last_stderr_line(stderr: &[u8]) -> Option<String> {
    String::from_utf8_lossy(stderr)
        .lines()
        .map(str::trim)
        .rfind(|l| !l.is_empty() && !l.starts_with("Warning: Permanently added"))
        .map(|l| neutralize(l).chars().take(300).collect())
}

/// Collects answer lines: everything before `OK` or `ERR`, which ends the answer. Malformed lines
/// are dropped and counted, as the contract says.
#[derive(Default)]
pub struct Answer {
    split: Splitter,
    pub lines: Vec<Reply>,
    pub end: Option<Result<(), ErrReply>>,
    pub dropped: usize,
}

impl Answer {
    /// Feed bytes from ssh's stdout; returns the lines completed by them (the end line too).
    pub fn push(&mut self, data: &[u8]) -> Vec<Reply> {
        let mut got = Vec::new();
        for piece in self.split.push(data) {
            if self.end.is_some() {
                self.dropped += 1;
                continue;
            }
            match piece {
                Piece::TooLong => self.dropped += 1,
                Piece::Line(l) => match parse_reply(&l) {
                    Ok(Reply::Ok) => {
                        self.end = Some(Ok(()));
                        got.push(Reply::Ok);
                    }
                    Ok(Reply::Err(e)) => {
                        self.end = Some(Err(e.clone()));
                        got.push(Reply::Err(e));
                    }
                    Ok(r) => {
                        self.lines.push(r.clone());
                        got.push(r);
                    }
                    Err(_) => self.dropped += 1,
                },
            }
        }
        got
    }
}

/// Run one request and collect its answer. `on_line` sees each answer line as it arrives (for
/// commands that wait, like `upgrade`, to say what is happening).
pub fn request(
    relay: &Relay,
    verb: &str,
    fields: &[(&str, &str)],
    payload: Option<&[u8]>,
    mut on_line: impl FnMut(&Reply),
) -> Result<Vec<Reply>, Failure> {
    let cmd = crate::proto::command(verb, fields, payload);
    if cmd.len() + 1 > tunl_wire::MAX_LINE {
        return Err(Failure::Link("the request is too long for one line".into()));
    }
    let mut child = Command::new(ssh_program())
        .args(relay.command_args(&cmd, None))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| Failure::Link(format!("cannot run ssh: {e}")))?;
    // stderr on its own thread so a chatty ssh never blocks on a full pipe while we read stdout.
    let mut err_pipe = child.stderr.take().expect("piped");
    let err_thread = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = err_pipe.read_to_end(&mut v);
        v
    });
    let mut out = child.stdout.take().expect("piped");
    let mut answer = Answer::default();
    let mut buf = vec![0u8; 65536];
    loop {
        match out.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                for r in answer.push(&buf[..n]) {
                    on_line(&r);
                }
                if answer.end.is_some() {
                    break;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(Failure::Link(format!("reading from ssh: {e}"))),
        }
    }
    drop(out);
    let status = child.wait().map_err(|e| Failure::Link(format!("waiting for ssh: {e}")))?;
    let stderr = err_thread.join().unwrap_or_default();
    match answer.end {
        Some(Ok(())) => Ok(answer.lines),
        Some(Err(e)) => Err(Failure::Err(e)),
        None => {
            let why = last_stderr_line(&stderr).unwrap_or_else(|| match status.code() {
                Some(255) => "ssh failed".into(),
                Some(c) => format!("ssh exited with status {c}"),
                None => "ssh was killed".into(),
            });
            Err(Failure::Link(format!("no answer from the relay {}:{} ({why})", neutralize(&relay.host), relay.port)))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let m: HashMap<String, String> = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        move |k| m.get(k).cloned()
    }

    #[test]
    fn environment() {
        let r = Relay::from_env(env(&[("USER", "alice")])).unwrap();
        assert_eq!((r.host.as_str(), r.port, r.user.as_str()), ("tunl.linbit.com", 22, "alice"));
        let r = Relay::from_env(env(&[
            ("TUNL_RELAY", "127.0.0.1"),
            ("TUNL_RELAY_PORT", "2222"),
            ("TUNL_SUPPORT_USER", "bob"),
            ("USER", "x"),
        ]))
        .unwrap();
        assert_eq!(r.destination(), "bob@127.0.0.1");
        assert_eq!(
            r.command_args("tunl-support/1 list", None),
            [
                "-o",
                "ForwardAgent=no",
                "-o",
                "ForwardX11=no",
                "-o",
                "ServerAliveInterval=15",
                "-o",
                "ServerAliveCountMax=3",
                "-p",
                "2222",
                "-T",
                "bob@127.0.0.1",
                "--",
                "tunl-support/1 list"
            ]
        );
        for (k, v, want) in [
            ("TUNL_RELAY_PORT", "0", "TUNL_RELAY_PORT"),
            ("TUNL_RELAY_PORT", "x", "TUNL_RELAY_PORT"),
            ("TUNL_RELAY", "-oProxyCommand=x", "TUNL_RELAY"),
            ("TUNL_SUPPORT_USER", "-l", "TUNL_SUPPORT_USER"),
            ("TUNL_SSH_CONFIG", "/nonexistent/cfg", "TUNL_SSH_CONFIG"),
        ] {
            let e = Relay::from_env(env(&[(k, v), ("USER", "a")])).unwrap_err();
            assert!(e.contains(want), "{e}");
        }
        assert!(Relay::from_env(env(&[])).is_err());
    }

    #[test]
    fn answer_collects_until_ok_or_err() {
        let mut a = Answer::default();
        a.push(b"ITEM id=swift-fox-jumps-barrel state=pending host= user= case= customer= viewers=0 created=1 expires=2 port=-\nGARBAGE\x1b\n");
        assert_eq!(a.lines.len(), 1);
        assert_eq!(a.dropped, 1);
        assert!(a.end.is_none());
        a.push(b"OK\nITEM late\n");
        assert_eq!(a.end, Some(Ok(())));
        assert_eq!(a.dropped, 2);
        let mut a = Answer::default();
        a.push(b"ERR code=expired msg=");
        assert!(a.end.is_none());
        a.push(b"\n");
        assert!(matches!(a.end, Some(Err(ErrReply { .. }))));
    }

    #[test]
    fn stderr_line() {
        assert_eq!(
            last_stderr_line(b"Warning: Permanently added 'x' (ED25519) to the list of known hosts.\r\nbob@127.0.0.1: Permission denied (publickey).\r\n")
                .as_deref(),
            Some("bob@127.0.0.1: Permission denied (publickey).")
        );
        assert_eq!(last_stderr_line(b"bad \x1b[2J\n").as_deref(), Some("bad ^[[2J"));
        assert_eq!(last_stderr_line(b""), None);
    }
}
