//! The top pane of `tunl join` (`tunl __view DIR`): it holds the join stream (the engineer's ssh
//! through the launcher's ControlMaster), draws the customer's screen (a `SNAP` at once, then the
//! `O` stream) into its pane, sends the engineer's keystrokes as `K` unless typing is not allowed
//! (read-only, restricted, BRB: the engineer is told why), feeds the chat pane its status rows and
//! messages, and takes the chat pane's commands from `ctl.fifo`.
//!
//! [`View`] is the pure part: lines, keys and control words in, [`Effect`]s out, so a recorded
//! stream drives it in tests. [`run`] is the poll loop around it.

use crate::proto::{Event, Joined, parse_event, rejected_words};
use crate::term::{Saved, Signals, write_all};
use rustix::event::{PollFd, PollFlags, poll};
use rustix::fs::{Mode, OFlags};
use std::io::Write;
use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use tunl_wire::{Piece, Splitter, b64, b64_decode, neutralize, pct_encode};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    /// Bytes for the pane: the customer's screen.
    Screen(Vec<u8>),
    /// A line for the relay.
    Send(Vec<u8>),
    /// The status rows changed.
    Status,
    /// A line for the chat history (neutralised).
    Message(String),
    /// Make the window fit the customer's pane.
    Resize { cols: u16, rows: u16 },
    /// The view joined: the launcher may attach.
    Ready,
    /// The view ends with this status and message.
    End { status: i32, message: String },
    /// A line for ssh.log.
    Log(String),
}

/// Every this often at most, a keystroke that is not sent says why.
const NOTICE_EVERY: Duration = Duration::from_secs(4);

pub struct View {
    pub sid: String,
    pub ro: bool,
    pub joined: Option<Joined>,
    pub mode: String,
    pub tunnel: String,
    pub brb: bool,
    pub link_up: bool,
    pub size: (u16, u16),
    pub viewers: Vec<String>,
    pub note: String,
    pub port: Option<(u16, String)>,
    /// The terminal of the engineer (tmux's client), to tell a mismatch.
    pub client: Option<(u16, u16)>,
    next_req: u32,
    pending_req: Option<String>,
    last_notice: Option<Instant>,
    closing: bool,
    recent_sent: Vec<String>,
}

/// Draw a `SNAP` (`capture-pane -p -e` lines joined by CRLF) into a pane of the customer's size:
/// cleared, one line per row, the cursor left after the last line with text (the snapshot does not
/// carry the cursor; a shell waits at its prompt, which is there).
pub fn draw_snap(rows: u16, screen: &[u8]) -> Vec<u8> {
    let mut lines: Vec<&[u8]> = screen.split(|&b| b == b'\n').map(|l| l.strip_suffix(b"\r").unwrap_or(l)).collect();
    if lines.len() > rows as usize {
        lines.drain(..lines.len() - rows as usize);
    }
    let last = lines.iter().rposition(|l| !l.is_empty()).unwrap_or(0);
    let mut o = b"\x1b[0m\x1b[H\x1b[2J".to_vec();
    for (i, l) in lines.iter().enumerate().take(last + 1) {
        o.extend_from_slice(format!("\x1b[{};1H", i + 1).as_bytes());
        o.extend_from_slice(l);
        if i != last {
            o.extend_from_slice(b"\x1b[0m");
        }
    }
    o
}

/// Remove what tmux answers on the pane's behalf when the customer's programs query the terminal
/// (device attributes, cursor position, OSC colour and DCS replies): the customer's own terminal
/// answers them already, and ours would arrive in their shell as typing.
pub fn strip_terminal_replies(keys: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(keys.len());
    let mut i = 0;
    while i < keys.len() {
        if keys[i] == 0x1b && i + 1 < keys.len() {
            match keys[i + 1] {
                b'[' => {
                    let mut j = i + 2;
                    while j < keys.len() && (0x20..=0x3f).contains(&keys[j]) {
                        j += 1;
                    }
                    if j < keys.len() {
                        let params = &keys[i + 2..j];
                        let fin = keys[j];
                        let reply = match fin {
                            b'c' => params.first().is_some_and(|&p| p == b'?' || p == b'>'),
                            // Cursor position report: row;col. (A modified F3 is `1;5R`: row 1 is
                            // also what a CPR at the top says; both are dropped.)
                            b'R' => params.contains(&b';') && params.iter().all(|b| b.is_ascii_digit() || *b == b';'),
                            b'y' => params.ends_with(b"$"),
                            b'n' => true,
                            _ => false,
                        };
                        if reply {
                            i = j + 1;
                            continue;
                        }
                    }
                }
                b']' | b'P' | b'_' | b'^' => {
                    // OSC / DCS / APC / PM up to BEL or ST.
                    let mut j = i + 2;
                    let mut end = None;
                    while j < keys.len() {
                        if keys[j] == 0x07 {
                            end = Some(j + 1);
                            break;
                        }
                        if keys[j] == 0x1b && keys.get(j + 1) == Some(&b'\\') {
                            end = Some(j + 2);
                            break;
                        }
                        j += 1;
                    }
                    if let Some(e) = end {
                        i = e;
                        continue;
                    }
                }
                _ => {}
            }
        }
        out.push(keys[i]);
        i += 1;
    }
    out
}

impl View {
    pub fn new(sid: &str, ro: bool) -> View {
        View {
            sid: sid.into(),
            ro,
            joined: None,
            mode: String::new(),
            tunnel: "-".into(),
            brb: false,
            link_up: true,
            size: (80, 24),
            viewers: Vec::new(),
            note: String::new(),
            port: None,
            client: None,
            next_req: 0,
            pending_req: None,
            last_notice: None,
            closing: false,
            recent_sent: Vec::new(),
        }
    }

    pub fn me(&self) -> &str {
        self.joined.as_ref().map(|j| j.me.as_str()).unwrap_or("")
    }

    /// Why the engineer's keys do not go to the customer now, if they do not.
    pub fn blocked(&self) -> Option<String> {
        if self.ro || self.joined.as_ref().is_some_and(|j| j.ro) {
            Some("read-only: you joined with --read-only, your keys are not sent".into())
        } else if self.mode == "restricted" {
            Some("watch-only: the customer started a restricted session, your keys are not sent".into())
        } else if self.brb {
            Some("BRB: the customer is away and paused typing, your keys are not sent".into())
        } else if !self.link_up {
            Some("the customer's link is down (reconnecting): your keys are not sent".into())
        } else {
            None
        }
    }

    /// The two status rows of the chat pane.
    pub fn status_rows(&self) -> (String, String) {
        let Some(j) = &self.joined else {
            return (format!("tunl {}: joining...", self.sid), String::new());
        };
        let dash = |s: &str| if s.is_empty() { "-".to_string() } else { s.to_string() };
        let mut s1 = format!(
            "{} | host {} ({}) | case {} | mode {} | tunnel {}",
            self.sid,
            dash(&j.host),
            dash(&j.user),
            dash(&j.case),
            dash(&self.mode),
            match &self.port {
                Some((p, _)) if self.tunnel == "active" => format!("active :{p}"),
                _ => self.tunnel.clone(),
            }
        );
        if self.brb {
            s1.push_str(" | BRB");
        }
        if !self.link_up {
            s1.push_str(" | LINK DOWN");
        }
        let others: Vec<&String> = self.viewers.iter().filter(|v| v.as_str() != j.me).collect();
        let mut s2 = format!(
            "you: {}{} | others: {}",
            dash(&j.me),
            if self.ro || j.ro { " (read-only)" } else { "" },
            if others.is_empty() {
                "none".to_string()
            } else {
                others.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", ")
            }
        );
        if let Some(m) = self.mismatch() {
            s2 = format!("{m} | {s2}");
        }
        if !self.note.is_empty() {
            s2.push_str(&format!(" | note: {}", self.note));
        }
        (s1, s2)
    }

    /// The engineer's terminal is smaller than the customer's pane plus the chat.
    pub fn mismatch(&self) -> Option<String> {
        let (cw, ch) = self.client?;
        let (c, r) = self.size;
        // The window: a border row above each pane, the chat, and tmux's own status line.
        let need_h = r + crate::join::CHAT_HEIGHT + 3;
        (cw < c || ch < need_h).then(|| {
            format!("TERMINAL TOO SMALL: yours {cw}x{ch}, the customer's pane {c}x{r} needs {c}x{need_h}; the view is clipped")
        })
    }

    fn notice(&mut self, now: Instant, text: String) -> Vec<Effect> {
        if self.last_notice.is_some_and(|t| now.duration_since(t) < NOTICE_EVERY) {
            return Vec::new();
        }
        self.last_notice = Some(now);
        vec![Effect::Message(format!("(not sent) {text}"))]
    }

    /// The engineer typed in the top pane.
    pub fn on_keys(&mut self, keys: &[u8], now: Instant) -> Vec<Effect> {
        let keys = strip_terminal_replies(keys);
        if keys.is_empty() || self.joined.is_none() || self.closing {
            return Vec::new();
        }
        if let Some(why) = self.blocked() {
            return self.notice(now, why);
        }
        keys.chunks(16384).map(|k| Effect::Send(crate::proto::send("K", &[], Some(k)))).collect()
    }

    /// A line from the relay.
    pub fn on_line(&mut self, line: &[u8], now: Instant) -> Vec<Effect> {
        let ev = match parse_event(line) {
            Ok(ev) => ev,
            Err(m) => return vec![Effect::Log(format!("dropped {} ({})", m.verb, m.reason))],
        };
        if self.joined.is_none()
            && let Event::Refused { what, reason } = &ev
        {
            return vec![Effect::End {
                status: 1,
                message: format!("{}: the relay refused to let us join ({what}: {reason})", self.sid),
            }];
        }
        if self.joined.is_none() && !matches!(ev, Event::Joined(_) | Event::Err(_) | Event::Closed { .. }) {
            return vec![Effect::Log("dropped a line before JOINED".into())];
        }
        match ev {
            Event::Joined(j) => {
                if self.joined.is_some() || j.id != self.sid {
                    return vec![Effect::Log("dropped JOINED (repeated or another session)".into())];
                }
                self.mode = j.mode.clone();
                self.size = (j.cols, j.rows);
                let (c, r) = self.size;
                let who = if j.customer.is_empty() { String::new() } else { format!(" ({})", j.customer) };
                let intro = format!(
                    "joined {} as {}{}: {}@{}{who}, case {}. Ctrl-b c toggles shell/chat; /help lists commands.",
                    self.sid,
                    if j.me.is_empty() { "you" } else { &j.me },
                    if self.ro || j.ro { ", read-only" } else { "" },
                    if j.user.is_empty() { "?" } else { &j.user },
                    if j.host.is_empty() { "?" } else { &j.host },
                    if j.case.is_empty() { "-" } else { &j.case },
                );
                self.joined = Some(j);
                let mut out =
                    vec![Effect::Resize { cols: c, rows: r }, Effect::Status, Effect::Ready, Effect::Message(intro)];
                if let Some(why) = self.blocked() {
                    out.push(Effect::Message(why));
                }
                out
            }
            Event::Snap { cols, rows, screen } => {
                let mut out = Vec::new();
                if (cols, rows) != self.size {
                    self.size = (cols, rows);
                    out.push(Effect::Resize { cols, rows });
                    out.push(Effect::Status);
                }
                out.push(Effect::Screen(draw_snap(rows, &screen)));
                out
            }
            Event::Output(o) => vec![Effect::Screen(o)],
            Event::Size { cols, rows } => {
                self.size = (cols, rows);
                vec![Effect::Resize { cols, rows }, Effect::Status]
            }
            Event::State { tunnel, brb, mode } => {
                let mut out = vec![Effect::Status];
                if brb != self.brb {
                    out.push(Effect::Message(if brb {
                        "the customer is away (BRB): typing is paused".into()
                    } else {
                        "the customer is back: typing works again".into()
                    }));
                }
                if tunnel != "active" {
                    self.port = None;
                }
                (self.tunnel, self.brb, self.mode) = (tunnel, brb, mode);
                out
            }
            Event::Note(n) => {
                self.note = n;
                vec![Effect::Status]
            }
            Event::Chat { from, text } => {
                if from == self.me()
                    && let Some(i) = self.recent_sent.iter().position(|t| *t == text)
                {
                    self.recent_sent.remove(i);
                    return Vec::new();
                }
                vec![Effect::Message(format!("{from}> {text}"))]
            }
            Event::Viewers { n, names } => {
                let old = std::mem::replace(&mut self.viewers, names);
                let mut out = vec![Effect::Status];
                for v in self.viewers.iter().filter(|v| !old.contains(v) && v.as_str() != self.me()) {
                    out.push(Effect::Message(format!("{v} joined")));
                }
                for v in old.iter().filter(|v| !self.viewers.contains(v) && v.as_str() != self.me()) {
                    out.push(Effect::Message(format!("{v} left")));
                }
                if self.viewers.is_empty() && n > 0 {
                    self.viewers = (0..n).map(|i| format!("viewer{}", i + 1)).collect();
                }
                out
            }
            Event::Link { up } => {
                self.link_up = up;
                vec![
                    Effect::Status,
                    Effect::Message(if up {
                        "the customer's link is back".into()
                    } else {
                        "the customer's link is down; they are reconnecting".into()
                    }),
                ]
            }
            Event::TunnelOpen { req, port, user } => {
                let mine = self.pending_req.as_deref() == Some(req.as_str());
                if mine {
                    self.pending_req = None;
                }
                self.tunnel = "active".into();
                self.port = Some((port, user.clone()));
                let msg = if mine {
                    format!("tunnel granted: relay port {port}, user {user}; log in with: tunl ssh {}", self.sid)
                } else {
                    format!("a tunnel is open (relay port {port}, user {user})")
                };
                vec![Effect::Status, Effect::Message(msg)]
            }
            Event::TunnelRejected { req, reason } => {
                if self.pending_req.as_deref() == Some(req.as_str()) {
                    self.pending_req = None;
                    vec![Effect::Message(format!("upgrade: {}", rejected_words(&reason)))]
                } else {
                    Vec::new()
                }
            }
            Event::TunnelClosed { reason } => {
                self.port = None;
                vec![Effect::Status, Effect::Message(format!("the tunnel closed ({reason})"))]
            }
            Event::Refused { what, reason } => {
                let text = match reason.as_str() {
                    "read-only" => "the relay holds you read-only".to_string(),
                    "restricted" => "the session is watch-only".to_string(),
                    "brb" => "the customer is away (BRB)".to_string(),
                    "slow" => "you fell too far behind; the relay drops this view".to_string(),
                    "limit" => "you typed faster than the relay allows".to_string(),
                    r => format!("refused ({r})"),
                };
                if what == "K" {
                    let t = format!("{text}: your keys are not sent");
                    self.notice(now, t)
                } else {
                    vec![Effect::Message(format!("(relay refused {what}) {text}"))]
                }
            }
            Event::Closed { reason } => {
                let message = if reason.is_empty() {
                    format!("the session {} has ended", self.sid)
                } else {
                    format!("the session {} has ended: {reason}", self.sid)
                };
                vec![Effect::End { status: 0, message }]
            }
            Event::Ping(n) => vec![Effect::Send(format!("PONG {n}\n").into_bytes())],
            Event::Pong(_) => Vec::new(),
            Event::Err(e) => {
                let message = format!("{}: {}", self.sid, e.explain());
                vec![Effect::End { status: 1, message }]
            }
        }
    }

    /// A control word from the chat pane, a key binding or a hook. `keys` are the engineer's
    /// public key lines for `upgrade` (read by the caller).
    pub fn on_ctl(&mut self, line: &str, keys: impl FnOnce() -> Result<String, String>) -> Vec<Effect> {
        let (word, arg) = line.split_once(' ').unwrap_or((line, ""));
        let text = || b64_decode(arg).and_then(|b| String::from_utf8(b).ok());
        match word {
            "chat" => match text() {
                Some(t) if !t.trim().is_empty() => {
                    self.recent_sent.push(t.clone());
                    if self.recent_sent.len() > 16 {
                        self.recent_sent.remove(0);
                    }
                    let me = if self.me().is_empty() { "you".to_string() } else { self.me().to_string() };
                    vec![
                        Effect::Send(crate::proto::send("CHAT", &[], Some(t.as_bytes()))),
                        Effect::Message(format!("{me}> {}", neutralize(&t))),
                    ]
                }
                _ => Vec::new(),
            },
            "note" => match text() {
                Some(t) => {
                    let msg =
                        if t.is_empty() { "note cleared".to_string() } else { format!("note set: {}", neutralize(&t)) };
                    vec![Effect::Send(crate::proto::send("NOTE", &[], Some(t.as_bytes()))), Effect::Message(msg)]
                }
                None => Vec::new(),
            },
            "upgrade" => {
                if self.pending_req.is_some() {
                    return vec![Effect::Message("upgrade: already waiting for the customer's answer".into())];
                }
                if self.ro || self.joined.as_ref().is_some_and(|j| j.ro) {
                    return vec![Effect::Message("upgrade: not from a read-only view".into())];
                }
                if self.mode == "restricted" {
                    return vec![Effect::Message("upgrade: the session is watch-only (restricted): no tunnel".into())];
                }
                match keys() {
                    Ok(k) => {
                        self.next_req += 1;
                        let req = format!("e{}", self.next_req);
                        self.pending_req = Some(req.clone());
                        vec![
                            Effect::Send(crate::proto::send("UPGRADE", &[("req", &req)], Some(k.as_bytes()))),
                            Effect::Message("upgrade: asked the customer (they see a Grant/Deny popup)...".into()),
                        ]
                    }
                    Err(e) => vec![Effect::Message(format!("upgrade: {}", neutralize(&e)))],
                }
            }
            "revoke" => vec![
                Effect::Send(b"REVOKE\n".to_vec()),
                Effect::Message("revoke: asked the customer's side to close the tunnel".into()),
            ],
            "refresh" => vec![Effect::Send(b"REFRESH\n".to_vec())],
            "close" => {
                let reason = text().unwrap_or_default();
                if reason.len() > crate::cli::MAX_REASON {
                    return vec![Effect::Message(format!(
                        "close: the reason is longer than {} bytes",
                        crate::cli::MAX_REASON
                    ))];
                }
                self.closing = true;
                vec![
                    Effect::Send(crate::proto::send("CLOSE", &[("reason", &pct_encode(&reason))], None)),
                    Effect::Message("closing the session...".into()),
                ]
            }
            "detach" => vec![
                Effect::Send(b"BYE\n".to_vec()),
                Effect::End {
                    status: 0,
                    message: format!(
                        "detached from {}; the session goes on (tunl join {} comes back)",
                        self.sid, self.sid
                    ),
                },
            ],
            "quit" => {
                let sig: i32 = arg.parse().ok().filter(|s| (1..=64).contains(s)).unwrap_or(15);
                vec![Effect::Send(b"BYE\n".to_vec()), Effect::End { status: 128 + sig, message: String::new() }]
            }
            "resized" => vec![Effect::Status],
            _ => vec![Effect::Log("dropped an unknown control word".into())],
        }
    }
}

/// The chat pane's fifo line for a status row or a message.
pub fn chat_fifo_line(kind: &str, text: &str) -> String {
    format!("{kind} {}\n", b64(text.as_bytes()))
}

fn tmux_cmd(dir: &Path, args: &[&str]) -> Option<String> {
    let out = crate::join::tmux(&dir.join("tmux.sock"))
        .args(args)
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()?;
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

fn client_size(dir: &Path) -> Option<(u16, u16)> {
    let s = tmux_cmd(dir, &["list-clients", "-F", "#{client_width} #{client_height}"])?;
    let (w, h) = s.lines().next()?.split_once(' ')?;
    Some((w.trim().parse().ok()?, h.trim().parse().ok()?))
}

fn read_conf(dir: &Path) -> Option<(String, bool)> {
    let s = std::fs::read_to_string(dir.join("join.conf")).ok()?;
    let mut sid = None;
    let mut ro = false;
    for l in s.lines() {
        match l.split_once('=') {
            Some(("sid", v)) if crate::cli::valid_session_id(v) => sid = Some(v.to_string()),
            Some(("ro", v)) => ro = v == "1",
            _ => {}
        }
    }
    Some((sid?, ro))
}

fn log_line(log: &mut Option<std::fs::File>, s: &str) {
    if let Some(f) = log {
        let _ = writeln!(f, "{} {}", crate::commands::now(), neutralize(s));
    }
}

fn open_fifo(dir: &Path, name: &str) -> Option<OwnedFd> {
    // Read-write: never blocks on open, never sees EOF when a writer goes away.
    rustix::fs::open(dir.join(name), OFlags::RDWR | OFlags::NONBLOCK | OFlags::CLOEXEC, Mode::empty()).ok()
}

/// `tunl __view DIR`.
pub fn run(dir: &Path) -> i32 {
    let Some((sid, ro)) = read_conf(dir) else {
        crate::join::publish(dir, "state", "failed the join directory has no session\n");
        return 1;
    };
    let relay = match crate::relay::Relay::from_process_env() {
        Ok(r) => r,
        Err(e) => {
            crate::join::publish(dir, "state", &format!("failed {e}\n"));
            return 1;
        }
    };
    let mut log = std::fs::OpenOptions::new().create(true).append(true).open(dir.join("ssh.log")).ok();
    let sig = Signals::install().ok();
    let saved = Saved::stdin();
    if let Some(s) = &saved {
        s.raw();
    }
    let stdout = rustix::stdio::stdout();
    let _ = write_all(stdout, b"\x1b[H\x1b[2Jjoining...\r\n");
    let cmd = crate::proto::command("join", &[("id", &sid), ("ro", if ro { "1" } else { "0" })], None);
    let stderr_log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("ssh.log"))
        .map(Stdio::from)
        .unwrap_or(Stdio::null());
    let child = Command::new(crate::relay::ssh_program())
        .args(relay.command_args(&cmd, Some(&dir.join("ssh.sock"))))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(stderr_log)
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) => {
            crate::join::publish(dir, "state", &format!("failed cannot run ssh: {e}\n"));
            return 1;
        }
    };
    let ssh_in: OwnedFd = child.stdin.take().expect("piped").into();
    let ssh_out: OwnedFd = child.stdout.take().expect("piped").into();
    let _ = rustix::fs::fcntl_setfl(&ssh_in, OFlags::NONBLOCK);
    let _ = rustix::fs::fcntl_setfl(&ssh_out, OFlags::NONBLOCK);
    let ctl = open_fifo(dir, "ctl.fifo");
    let chat = open_fifo(dir, "chat.fifo");
    let chat_send = |s: &str| {
        if let Some(c) = &chat {
            // A chat pane that stops reading costs a dropped line, never a stuck view.
            let _ = rustix::io::write(c, s.as_bytes());
        }
    };

    let mut view = View::new(&sid, ro);
    let mut split = Splitter::default();
    let mut ctl_buf: Vec<u8> = Vec::new();
    let mut outq: Vec<u8> = Vec::new();
    let mut ssh_open = true;
    let mut ready = false;
    let mut end: Option<(i32, String)> = None;
    let stdin = rustix::stdio::stdin();
    let mut buf = vec![0u8; 65536];
    let push_status = |v: &View| {
        let (s1, s2) = v.status_rows();
        chat_send(&chat_fifo_line("S1", &s1));
        chat_send(&chat_fifo_line("S2", &s2));
        // The size warning leads the status line's left end, which tmux never cuts off.
        let warn = match v.mismatch() {
            Some(_) => {
                let (c, r) = v.size;
                format!("TERMINAL TOO SMALL: need {c}x{} |", r + crate::join::CHAT_HEIGHT + 3)
            }
            None => String::new(),
        };
        let _ = tmux_cmd(dir, &["set-option", "-g", "@tunl-warn", &warn]);
        let tag = match (v.blocked(), v.mismatch()) {
            (_, Some(_)) => "view clipped",
            (Some(_), _) if v.ro => "READ-ONLY",
            (Some(_), _) if v.brb => "BRB: not typing",
            (Some(_), _) => "not typing",
            _ => "typing: on",
        };
        let _ = tmux_cmd(dir, &["set-option", "-g", "@tunl-status", tag]);
    };
    chat_send(&chat_fifo_line("S1", &view.status_rows().0));
    let mut close_deadline: Option<Instant> = None;

    while end.is_none() {
        let now = Instant::now();
        let mut effects = Vec::new();
        {
            let mut fds = vec![
                PollFd::new(&stdin, PollFlags::IN),
                PollFd::new(&ssh_out, if ssh_open { PollFlags::IN } else { PollFlags::empty() }),
                PollFd::new(&ssh_in, if outq.is_empty() { PollFlags::empty() } else { PollFlags::OUT }),
            ];
            if let Some(c) = &ctl {
                fds.push(PollFd::new(c, PollFlags::IN));
            }
            if let Some(s) = &sig {
                fds.push(PollFd::from_borrowed_fd(s.fd(), PollFlags::IN));
            }
            let ts = rustix::event::Timespec { tv_sec: 1, tv_nsec: 0 };
            let _ = poll(&mut fds, Some(&ts));
            let rev: Vec<PollFlags> = fds.iter().map(|f| f.revents()).collect();
            drop(fds);
            let ready_in = |f: PollFlags| f.intersects(PollFlags::IN | PollFlags::HUP | PollFlags::ERR);
            if ready_in(rev[0]) {
                match rustix::io::read(stdin, &mut buf) {
                    Ok(0) => effects.extend(view.on_ctl("quit 1", || Err(String::new()))),
                    Ok(n) => effects.extend(view.on_keys(&buf[..n], now)),
                    Err(_) => {}
                }
            }
            if ssh_open && ready_in(rev[1]) {
                loop {
                    match rustix::io::read(&ssh_out, &mut buf) {
                        Ok(0) => {
                            ssh_open = false;
                            break;
                        }
                        Ok(n) => {
                            for piece in split.push(&buf[..n]) {
                                match piece {
                                    Piece::Line(l) => effects.extend(view.on_line(&l, now)),
                                    Piece::TooLong => effects.push(Effect::Log("dropped an over-long line".into())),
                                }
                            }
                        }
                        Err(rustix::io::Errno::AGAIN) | Err(rustix::io::Errno::INTR) => break,
                        Err(_) => {
                            ssh_open = false;
                            break;
                        }
                    }
                    if effects.iter().any(|e| matches!(e, Effect::End { .. })) {
                        break;
                    }
                }
                if !ssh_open && !effects.iter().any(|e| matches!(e, Effect::End { .. })) {
                    let why = std::fs::read(dir.join("ssh.log")).ok().and_then(|b| crate::relay::last_stderr_line(&b));
                    effects.push(Effect::End {
                        status: 1,
                        message: format!(
                            "the connection to the relay ended{}",
                            why.map(|w| format!(" ({w})")).unwrap_or_default()
                        ),
                    });
                }
            }
            if !outq.is_empty() && rev[2].intersects(PollFlags::OUT | PollFlags::ERR | PollFlags::HUP) {
                match rustix::io::write(&ssh_in, &outq) {
                    Ok(n) => {
                        outq.drain(..n);
                    }
                    Err(rustix::io::Errno::AGAIN) | Err(rustix::io::Errno::INTR) => {}
                    Err(_) => outq.clear(),
                }
            }
            let mut k = 3;
            if let Some(c) = &ctl {
                if ready_in(rev[k]) {
                    let mut b = [0u8; 8192];
                    if let Ok(n) = rustix::io::read(c, &mut b) {
                        ctl_buf.extend_from_slice(&b[..n]);
                    }
                    while let Some(i) = ctl_buf.iter().position(|&b| b == b'\n') {
                        let line: Vec<u8> = ctl_buf.drain(..=i).collect();
                        let line = String::from_utf8_lossy(&line[..line.len() - 1]).into_owned();
                        if line == "resized" {
                            view.client = client_size(dir);
                        }
                        effects.extend(view.on_ctl(&line, || crate::keys::load(&[])));
                    }
                    if ctl_buf.len() > 8192 {
                        ctl_buf.clear();
                    }
                }
                k += 1;
            }
            if let Some(s) = &sig
                && ready_in(rev[k])
            {
                for n in s.drain() {
                    if matches!(n, crate::term::SIGINT | crate::term::SIGTERM | crate::term::SIGHUP) {
                        effects.extend(view.on_ctl(&format!("quit {n}"), || Err(String::new())));
                    }
                }
            }
        }
        if view.closing && close_deadline.is_none() {
            close_deadline = Some(now + Duration::from_secs(10));
        }
        if close_deadline.is_some_and(|d| now > d) {
            effects.push(Effect::End { status: 1, message: "the relay did not confirm the close within 10 s".into() });
        }
        let mut out: Vec<u8> = Vec::new();
        let mut status = false;
        for e in effects {
            match e {
                Effect::Screen(b) => out.extend_from_slice(&b),
                Effect::Send(l) => outq.extend_from_slice(&l),
                Effect::Status => status = true,
                Effect::Message(m) => chat_send(&chat_fifo_line("M", &m)),
                Effect::Resize { cols, rows } => {
                    let h = (rows + crate::join::CHAT_HEIGHT + 2).to_string();
                    let _ = tmux_cmd(dir, &["resize-window", "-t", "tunl:0", "-x", &cols.to_string(), "-y", &h]);
                    if let Ok(p) = std::env::var("TMUX_PANE") {
                        let _ = tmux_cmd(dir, &["resize-pane", "-t", &p, "-y", &rows.to_string()]);
                    }
                    view.client = client_size(dir);
                }
                Effect::Ready => {
                    ready = true;
                    crate::join::publish(dir, "state", "ready\n");
                }
                Effect::End { status, message } => {
                    if end.is_none() {
                        end = Some((status, message));
                    }
                }
                Effect::Log(l) => log_line(&mut log, &l),
            }
        }
        if !out.is_empty() {
            let _ = write_all(stdout, &out);
        }
        if status {
            push_status(&view);
        }
    }

    // Orderly end: the last lines (BYE, CLOSE) out within 2 s, ssh's stdin closed, ssh gone.
    let (status, message) = end.unwrap_or((1, String::new()));
    let deadline = Instant::now() + Duration::from_secs(2);
    while !outq.is_empty() && Instant::now() < deadline {
        let mut fds = [PollFd::new(&ssh_in, PollFlags::OUT)];
        let _ = poll(&mut fds, Some(&rustix::event::Timespec { tv_sec: 0, tv_nsec: 100_000_000 }));
        match rustix::io::write(&ssh_in, &outq) {
            Ok(n) => {
                outq.drain(..n);
            }
            Err(rustix::io::Errno::AGAIN) | Err(rustix::io::Errno::INTR) => {}
            Err(_) => break,
        }
    }
    drop(ssh_in);
    let deadline = Instant::now() + Duration::from_secs(2);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
    log_line(&mut log, &format!("view ends: {status} {message}"));
    if ready {
        crate::join::publish(dir, "exit", &format!("{status}\n{}\n", neutralize(&message)));
    } else {
        crate::join::publish(dir, "state", &format!("failed {}\n", neutralize(&message)));
        crate::join::publish(dir, "exit", &format!("{status}\n{}\n", neutralize(&message)));
    }
    if let Some(s) = &saved {
        s.restore();
    }
    drop(saved);
    let _ = stdout.as_fd();
    // Ending tmux ends the launcher's attach; it ends this pane too, so it comes last.
    let _ = crate::join::tmux(&dir.join("tmux.sock"))
        .arg("kill-server")
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .status();
    status
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "swift-fox-jumps-barrel";

    fn joined(v: &mut View, extra: &str) -> Vec<Effect> {
        v.on_line(
            format!("JOINED id={ID} mode=share host=db1 user=root case=4711 customer=ACME size=100x30 viewers=1 ro=0 me=alice{extra}")
                .as_bytes(),
            Instant::now(),
        )
    }

    fn sends(e: &[Effect]) -> Vec<String> {
        e.iter()
            .filter_map(|e| match e {
                Effect::Send(l) => Some(String::from_utf8_lossy(l).into_owned()),
                _ => None,
            })
            .collect()
    }

    fn messages(e: &[Effect]) -> Vec<String> {
        e.iter()
            .filter_map(|e| match e {
                Effect::Message(m) => Some(m.clone()),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn recorded_stream_draws_and_types() {
        let mut v = View::new(ID, false);
        let t = Instant::now();
        // Nothing before JOINED reaches the screen.
        assert!(matches!(v.on_line(format!("O {}", b64(b"early")).as_bytes(), t)[0], Effect::Log(_)));
        let e = joined(&mut v, "");
        assert!(e.contains(&Effect::Resize { cols: 100, rows: 30 }));
        assert!(e.contains(&Effect::Ready));
        let e = v.on_line(format!("SNAP size=100x30 {}", b64(b"$ ls\r\na  b\r\n$ \r\n\r\n")).as_bytes(), t);
        assert_eq!(
            e,
            vec![Effect::Screen(b"\x1b[0m\x1b[H\x1b[2J\x1b[1;1H$ ls\x1b[0m\x1b[2;1Ha  b\x1b[0m\x1b[3;1H$ ".to_vec())]
        );
        let e = v.on_line(format!("O {}", b64(b"\x1b[31mred")).as_bytes(), t);
        assert_eq!(e, vec![Effect::Screen(b"\x1b[31mred".to_vec())]);
        assert_eq!(sends(&v.on_keys(b"ls\r", t)), ["K bHMN\n"]);
        assert_eq!(sends(&v.on_line(b"PING 3", t)), ["PONG 3\n"]);
        // A SNAP of another size resizes first.
        let e = v.on_line(format!("SNAP size=90x20 {}", b64(b"x")).as_bytes(), t);
        assert_eq!(e[0], Effect::Resize { cols: 90, rows: 20 });
        assert!(matches!(v.on_line(b"CLOSED reason=done", t)[0], Effect::End { status: 0, .. }));
    }

    #[test]
    fn keys_blocked_with_a_reason() {
        let t = Instant::now();
        let mut v = View::new(ID, true);
        joined(&mut v, "");
        let e = v.on_keys(b"x", t);
        assert!(sends(&e).is_empty());
        assert!(messages(&e)[0].contains("read-only"), "{e:?}");
        // Said once per few seconds, not per key.
        assert!(v.on_keys(b"y", t).is_empty());
        assert!(!v.on_keys(b"z", t + Duration::from_secs(5)).is_empty());

        let mut v = View::new(ID, false);
        joined(&mut v, "");
        v.on_line(b"STATE tunnel=confirm brb=1 mode=share", t);
        assert!(messages(&v.on_keys(b"x", t))[0].contains("BRB"));
        v.on_line(b"STATE tunnel=confirm brb=0 mode=share", t);
        assert_eq!(sends(&v.on_keys(b"x", t)), ["K eA==\n"]);
        v.on_line(b"STATE tunnel=off brb=0 mode=restricted", t);
        assert!(messages(&v.on_keys(b"x", t + Duration::from_secs(10)))[0].contains("watch-only"));
    }

    #[test]
    fn chat_commands_and_echo() {
        let t = Instant::now();
        let mut v = View::new(ID, false);
        joined(&mut v, "");
        let e = v.on_ctl(&format!("chat {}", b64(b"hello")), || unreachable!());
        assert_eq!(sends(&e), [format!("CHAT {}\n", b64(b"hello"))]);
        assert_eq!(messages(&e), ["alice> hello"]);
        // Our own line coming back is not shown twice; the customer's is.
        assert!(v.on_line(format!("CHAT from=alice {}", b64(b"hello")).as_bytes(), t).is_empty());
        assert_eq!(
            messages(&v.on_line(format!("CHAT from=customer {}", b64(b"hi\x1b]0;x\x07")).as_bytes(), t)),
            ["customer> hi^[]0;x^G"]
        );
        assert_eq!(
            sends(&v.on_ctl(&format!("note {}", b64(b"brb 5 min")), || unreachable!())),
            [format!("NOTE {}\n", b64(b"brb 5 min"))]
        );
        assert_eq!(sends(&v.on_ctl("note ", || unreachable!())), ["NOTE\n"]);
        assert_eq!(
            sends(&v.on_ctl(&format!("close {}", b64(b"all done")), || unreachable!())),
            ["CLOSE reason=all%20done\n"]
        );
        assert_eq!(sends(&v.on_ctl("revoke", || unreachable!())), ["REVOKE\n"]);
        let e = v.on_ctl("detach", || unreachable!());
        assert_eq!(sends(&e), ["BYE\n"]);
        assert!(matches!(e[1], Effect::End { status: 0, .. }));
        assert!(matches!(v.on_ctl("quit 15", || unreachable!())[1], Effect::End { status: 143, .. }));
        assert!(matches!(v.on_ctl("bogus", || unreachable!())[0], Effect::Log(_)));
    }

    #[test]
    fn upgrade_round_trip() {
        let t = Instant::now();
        let mut v = View::new(ID, false);
        joined(&mut v, "");
        let e = v.on_ctl("upgrade", || Ok("ssh-ed25519 AAAA x\n".into()));
        assert_eq!(sends(&e), [format!("UPGRADE req=e1 {}\n", b64(b"ssh-ed25519 AAAA x\n"))]);
        assert!(messages(&v.on_ctl("upgrade", || unreachable!()))[0].contains("already waiting"));
        let e = v.on_line(b"TUNNEL_OPEN req=e1 port=40001 user=root", t);
        assert!(messages(&e)[0].contains("tunl ssh swift-fox-jumps-barrel"));
        assert!(v.status_rows().0.contains("tunnel active :40001"));
        let e = v.on_line(b"TUNNEL_CLOSED reason=revoked", t);
        assert!(messages(&e)[0].contains("revoked"));
        let e = v.on_ctl("upgrade", || Ok("k\n".into()));
        assert!(sends(&e)[0].starts_with("UPGRADE req=e2 "));
        assert_eq!(
            messages(&v.on_line(b"TUNNEL_REJECTED req=e2 reason=denied", t)),
            ["upgrade: the customer denied the tunnel"]
        );
        // Someone else's rejection is not ours to report.
        assert!(v.on_line(b"TUNNEL_REJECTED req=e9 reason=denied", t).is_empty());
        let mut ro = View::new(ID, true);
        joined(&mut ro, "");
        assert!(messages(&ro.on_ctl("upgrade", || unreachable!()))[0].contains("read-only"));
    }

    #[test]
    fn status_rows_and_mismatch() {
        let t = Instant::now();
        let mut v = View::new(ID, false);
        assert!(v.status_rows().0.contains("joining"));
        joined(&mut v, "");
        v.on_line(b"VIEWERS 2 names=alice%2Cbob", t);
        v.on_line(b"STATE tunnel=confirm brb=1 mode=share", t);
        v.on_line(format!("NOTE {}", b64(b"looking at drbd")).as_bytes(), t);
        let (s1, s2) = v.status_rows();
        assert_eq!(s1, "swift-fox-jumps-barrel | host db1 (root) | case 4711 | mode share | tunnel confirm | BRB");
        assert_eq!(s2, "you: alice | others: bob | note: looking at drbd");
        v.client = Some((200, 60));
        assert!(v.mismatch().is_none());
        v.client = Some((80, 24));
        assert!(v.status_rows().1.starts_with("TERMINAL TOO SMALL: yours 80x24, the customer's pane 100x30"));
        let e = v.on_line(b"LINK state=down", t);
        assert!(messages(&e)[0].contains("reconnecting"));
        assert!(v.status_rows().0.ends_with("LINK DOWN"));
    }

    #[test]
    fn terminal_replies_are_not_typing() {
        assert_eq!(strip_terminal_replies(b"a\x1b[?1;2cb\x1b[>41;330;0cc"), b"abc");
        assert_eq!(strip_terminal_replies(b"\x1b[12;40R"), b"");
        assert_eq!(strip_terminal_replies(b"\x1b]11;rgb:0000/0000/0000\x1b\\x\x1bP>|tmux\x1b\\"), b"x");
        // Real keys stay: arrows, function keys, Escape alone, Alt-x.
        for k in [&b"\x1b[A"[..], b"\x1bOP", b"\x1b", b"\x1bx", b"\x1b[15~", b"\x1b[1;5A"] {
            assert_eq!(strip_terminal_replies(k), k);
        }
    }

    #[test]
    fn hostile_lines_are_dropped() {
        let t = Instant::now();
        let mut v = View::new(ID, false);
        joined(&mut v, "");
        for l in [
            &b"O !!"[..],
            b"K aGk=",
            b"CHAT from=x",
            b"JOINED id=swift-fox-jumps-barrel mode=share size=1x1 viewers=0 ro=0",
            b"\x1b[2J",
        ] {
            let e = v.on_line(l, t);
            assert!(e.iter().all(|e| matches!(e, Effect::Log(_))), "{l:?}: {e:?}");
        }
        // A JOINED for another session is refused before joining.
        let mut w = View::new(ID, false);
        assert!(matches!(w.on_line(b"REFUSED what=JOIN reason=limit", t)[0], Effect::End { status: 1, .. }));
        assert!(matches!(w.on_line(b"JOINED id=a-b-c-d mode=share size=80x24 viewers=0 ro=0", t)[0], Effect::Log(_)));
        assert!(matches!(w.on_line(b"ERR code=unknown-session msg=", t)[0], Effect::End { status: 1, .. }));
    }
}
