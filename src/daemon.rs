//! The daemon: one thread, one poll loop, and the dispatcher between the session's conversations.
//!
//! Each conversation has its own module and owns its state: the relay link (`link.rs`: the ssh
//! master, its queues, liveness and reconnect), the tmux control client (`control.rs`: commands,
//! replies, the shell pane, screen captures), the tunnel's effects (`grants.rs` over the state
//! machine in `tunnel.rs`: forward, keys, who asked), the customer's terminal in the foreground
//! (`console.rs`). The daemon polls their descriptors, the control fifo and the signal pipe, runs
//! their timers, and carries what one says to the others: a relay line to tmux or the tunnel, a
//! tmux reply to the relay, what the tunnel says (`Said`) to the relay, the chat pane and the record.
//!
//! Everything the relay says is parsed strictly and checked against the customer-side allowlist
//! before it can act; nothing from the relay reaches a terminal without being neutralised.

use std::io::Read;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use rustix::event::{PollFd, PollFlags};

use crate::cli::Config;
use crate::console::Console;
use crate::control::{Control, Happening, PanesSeen, Pending};
use crate::grants::{Grants, Said};
use crate::link::{self, Link};
use crate::marks::{self, Answer, Mark, Who};
use crate::proc;
use crate::protocol::{self, RelayMsg, Verdict};
use crate::sessiondir::{Log, SessionDir};
use crate::signals::{self, SignalPipe};
use crate::{auth, authkeys, recording, ssh, text, tmux, ui};

/// Stop reading the shell pane while this much is queued for the relay: a slow link must cost
/// memory in tmux (which pauses or buffers), never unbounded memory here.
const OUTQ_HIGH: usize = 4 << 20;
/// The orderly end must finish within this, or the watchdog kills us.
pub const WATCHDOG_SECS: u32 = 10;
/// Every wait of the orderly end draws from this one budget, well inside the watchdog (F21).
const SHUTDOWN_LIMIT: Duration = Duration::from_secs(7);
/// A Grant/Deny popup dismissed without an answer (Escape, a click outside) is offered again at this
/// interval, but only to a customer who has not typed for `POPUP_IDLE`: it never lands in the middle
/// of their typing (F1). tmux gives no notice of the dismissal, and a request must be answered, not
/// lost. While the menu is still on screen tmux ignores the repeated display-menu.
const POPUP_AGAIN: Duration = Duration::from_secs(5);
const POPUP_IDLE_SECS: u64 = 5;
/// How long a prompt waits for the chat pane to draw its request (tmux 1.8, `popup_held`).
const POPUP_HOLD: Duration = Duration::from_secs(3);
/// What one poll wake-up reads from one pipe at most (F4): the other pipes, timers and signals get
/// their turn even when a producer refills the pipe as fast as we empty it.
const READ_BUDGET: usize = 256 << 10;

/// A Grant/Deny prompt waiting for the chat pane to draw request `n` (the daemon's own number).
struct HeldPopup {
    n: u32,
    req: String,
    cmd: String,
    until: Instant,
}

/// How the session ended, for the exit status and the BYE reason.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum End {
    Customer,
    RelayClose,
    Signal(i32),
    TmuxGone,
    Fatal,
}

impl End {
    pub fn status(self) -> u8 {
        match self {
            End::Customer | End::RelayClose | End::TmuxGone => 0,
            End::Signal(s) if s == signals::SIGINT => 130,
            End::Signal(s) if s == signals::SIGTERM => 143,
            End::Signal(_) => 0,
            End::Fatal => 1,
        }
    }
}

pub struct Daemon {
    cfg: Config,
    dir: SessionDir,
    /// The customer's terminal in the foreground mode, never written blocking (F24).
    console: Option<Console>,
    auth: ssh::AuthPath,
    log: Log,
    sshlog: Log,
    sig: SignalPipe,
    /// The relay link (`link.rs`).
    link: Link,
    /// The tmux control client (`control.rs`), in the share modes.
    tmux: Option<Control>,
    popup_again_at: Option<Instant>,
    /// A Grant/Deny prompt held back until the chat pane has drawn the request (`A N` / `shown N`):
    /// on tmux 1.8 the prompt freezes the terminal, and the question's details (target, keys) are
    /// only in the chat pane. Shown anyway at the deadline.
    popup_held: Option<HeldPopup>,
    /// Status rows not sent while tmux was not keeping up; sent once it is.
    status_behind: bool,
    /// Shell output not queued for the relay while the link was backlogged (tmux before 3.2, which
    /// cannot pause a pane for us); support gets a fresh screen once the queue has drained.
    relay_behind: bool,
    ctl: Option<OwnedFd>,
    ctlbuf: Vec<u8>,
    chat_out: Option<OwnedFd>,
    /// The tunnel's state machine and its effects: forward, keys, who asked (`grants.rs`).
    grants: Grants,
    viewers: u32,
    note: String,
    rec: Option<recording::Recorder>,
    rec_path: Option<PathBuf>,
    end: Option<End>,
    /// Why the session ended, for the launcher to print once the customer's terminal is back.
    farewell: String,
    /// Why the session ended, in the recording's last marker (support's CLOSE reason, a fatal error).
    end_why: String,
    host: String,
    ips: Vec<String>,
}

impl Daemon {
    pub fn new(cfg: Config, dir: SessionDir, auth: ssh::AuthPath, foreground: bool) -> Result<Daemon, String> {
        let sig = SignalPipe::install().map_err(|e| format!("cannot set up signal handling: {e}"))?;
        let log = Log::open(&dir.file("debug.log"));
        let sshlog = Log::open(&dir.file("ssh.log"));
        let (host, ips) = ssh::host_context();
        let grants = Grants::new(&cfg, &dir.path);
        Ok(Daemon {
            cfg,
            dir,
            console: foreground.then(Console::stderr),
            auth,
            log,
            sshlog,
            sig,
            link: Link::new(),
            tmux: None,
            popup_again_at: None,
            popup_held: None,
            status_behind: false,
            relay_behind: false,
            ctl: None,
            ctlbuf: Vec::new(),
            chat_out: None,
            grants,
            viewers: 0,
            note: String::new(),
            rec: None,
            rec_path: None,
            end: None,
            farewell: String::new(),
            end_why: String::new(),
            host,
            ips,
        })
    }

    /// Say something to the customer: a plain line in the foreground, the status row under tmux.
    fn tell(&mut self, msg: &str) {
        self.log.line(msg);
        if let Some(c) = &mut self.console {
            c.line(msg);
        }
    }

    fn status_row(&mut self) {
        let link = match self.link.state() {
            link::State::Up => "connected",
            link::State::Connecting | link::State::Down if self.link.ever_welcomed() => "reconnecting",
            link::State::Connecting => "connecting",
            link::State::Down => "disconnected",
        };
        // Both rows fit 80 columns (F1): the session ID is on the status line's left, not here.
        let tunnel = self.grants.tunnel();
        let asking = if tunnel.on_screen().is_some() { ", request waiting" } else { "" };
        let (wire, brb) = (tunnel.state().wire(), tunnel.brb());
        let row = format!(
            "relay: {} | viewers: {} | mode: {} | tunnel: {}{asking}{}",
            link,
            self.viewers,
            self.cfg.mode.as_str(),
            wire,
            if brb { " | BRB" } else { "" }
        );
        self.chat_send("S1", row.as_bytes());
        if self.tmux_busy() {
            self.status_behind = true;
        } else if self.tmux.is_some() {
            self.status_behind = false;
            let brb = if brb { " | BRB" } else { "" };
            let short = format!("{link} | viewers {} | tunnel {wire}{brb}", self.viewers);
            let f = self.tmux.as_ref().map(|t| t.features()).unwrap_or_else(|| tmux::Features::from_version(None));
            for cmd in ui::status_commands(&f, &self.cfg, &short) {
                self.tmux_cmd(&cmd, Pending::Ignore);
            }
        }
    }

    fn chat_send(&mut self, kind: &str, payload: &[u8]) {
        if let Some(fd) = &self.chat_out {
            for line in fifo_lines(kind, payload) {
                // A full fifo means the chat pane is not reading: drop rather than block the loop.
                // Each line is at most PIPE_BUF, so it goes in whole or not at all (F23).
                let _ = rustix::io::write(fd, line.as_bytes());
            }
        }
    }

    fn chat_show(&mut self, line: &str) {
        if let Some(c) = &mut self.console {
            c.line(line);
        }
        self.chat_send("M", line.as_bytes());
    }

    /// Put a session event into the customer's record: a marker in the recording, and a chat line
    /// or note also into the transcript beside it.
    fn mark(&mut self, m: Mark) {
        let Some(r) = &mut self.rec else { return };
        let mut done = r.mark(&marks::label(&m));
        if let (Ok(()), Some(line)) = (&done, marks::transcript_line(now_unix(), &m)) {
            done = r.transcript(&line);
        }
        if let Err(e) = done {
            self.recording_failed(&e);
        }
    }

    /// A write to the recording or the transcript failed (a full disk): the session goes on without
    /// them, and the customer is told, once (no recorder is left to fail again).
    fn recording_failed(&mut self, e: &std::io::Error) {
        self.rec = None;
        let path = self.rec_path.as_ref().map(|p| p.display().to_string()).unwrap_or_default();
        let msg = format!("recording stopped: cannot write {path}: {e}; the session goes on unrecorded");
        self.log.line(&msg);
        self.chat_show(&msg);
    }

    /// A tunnel request for the record: who, as whom, where, which keys.
    fn mark_request(&mut self, req: &str, from: &str, keys: &[String]) {
        let target = format!("{}:{}", self.cfg.target_host, self.cfg.target_port);
        let user = self.cfg.user.clone();
        self.mark(Mark::Request { req, from, user: &user, target: &target, keys });
    }

    // ---- the relay link -------------------------------------------------------------------

    fn connect(&mut self) {
        let resume = self.link.ever_welcomed();
        let size = self.tmux.as_ref().map(|t| t.size()).unwrap_or((0, 0));
        let hello = match ssh::hello(&self.cfg, &self.host, &self.ips, size, resume) {
            Ok(h) => h,
            Err(e) => return self.fatal(&e),
        };
        let cert = self.dir.file("sharekey").join(auth::CERT_FILE);
        if let Some(why) = auth::reconnect_with_session_id(resume, self.auth, &cert, now_unix()) {
            // The relay remembers a resumed session: the session ID is enough, never the token again
            // (a token is spent once, also when it answered keyboard-interactive the first time).
            if let Err(e) = auth::write_askpass(&self.dir.path, &self.cfg.session_id) {
                self.log.line(&e);
            }
            self.auth = ssh::AuthPath::KeyboardInteractive;
            self.log.line(&format!("{why}: reconnecting with keyboard-interactive and the session ID"));
        }
        let mut cmd = match ssh::master_command(&self.cfg, &self.dir.path, self.auth, &hello) {
            Ok(c) => c,
            Err(e) => return self.fatal(&e),
        };
        let _ = std::fs::remove_file(self.dir.file("ssh-ctl.sock"));
        self.sshlog.line(&format!("connect {}:{} resume={}", self.cfg.relay, self.cfg.relay_port, resume as u8));
        match proc::spawn(&mut cmd, true) {
            Ok(p) => {
                // For the launcher's fallback, should this daemon die without its orderly end (F19).
                let _ = crate::sessiondir::publish(&self.dir.file("ssh.pid"), &format!("{}\n", p.child.id()));
                self.link.start(p);
                self.tell(if resume { "reconnecting to the relay" } else { "connecting to the relay" });
            }
            Err(e) => {
                self.fatal(&format!("cannot start ssh: {e}"));
            }
        }
        self.status_row();
    }

    /// The queue towards the relay, when the link is up (see `Link::out`).
    fn out(&mut self) -> Option<&mut Vec<u8>> {
        self.link.out()
    }

    /// The link is gone (ssh ended, silence, or a refused hello): decide between fatal and retry.
    fn link_lost(&mut self, why: &str) {
        // Read ssh's last words (why it failed) before judging the failure.
        self.link.let_ssh_finish();
        self.on_link_stderr();
        if !self.link.exists() {
            return;
        }
        let was_up = self.link.drop_master();
        self.with_grants(|g| g.link_lost());
        if self.end.is_some() {
            return;
        }
        if was_up {
            self.mark(Mark::Disconnected { why });
        }
        self.sshlog.line(&format!("link lost: {why}"));
        if !self.link.ever_welcomed() {
            let reason = last_ssh_error(&self.dir.file("ssh.log")).unwrap_or_else(|| why.to_string());
            self.fatal(&format!("cannot connect to the relay {}:{}: {reason}", self.cfg.relay, self.cfg.relay_port));
            return;
        }
        self.link.lost(was_up);
        self.tell(&format!("link to the relay lost ({why}); reconnecting"));
        self.status_row();
    }

    fn on_link_stdout(&mut self) {
        let read = self.link.read(READ_BUDGET);
        for item in read.lines {
            match item {
                Ok(line) => self.on_relay_line(&line),
                Err(()) => self.sshlog.line("dropped ? reason=line too long"),
            }
            // A line may have ended the session or the link (ERROR): the rest went with it.
            if self.end.is_some() || !self.link.exists() {
                return;
            }
        }
        if read.eof {
            self.link_lost("the relay closed the connection");
        }
    }

    fn on_link_stderr(&mut self) {
        self.link.read_stderr(&mut self.sshlog, READ_BUDGET);
    }

    fn on_relay_line(&mut self, line: &[u8]) {
        let welcomed = self.link.is_up();
        let parsed = protocol::parse_relay_line(line);
        let msg = match parsed {
            Ok(m) => m,
            Err(_) => {
                self.sshlog.line(&protocol::log_line(&parsed, None));
                return;
            }
        };
        let verdict = protocol::allowed(&msg, self.cfg.mode, self.grants.tunnel().brb(), welcomed);
        let msg_ok = Ok(msg);
        self.sshlog.line(&protocol::log_line(&msg_ok, if verdict == Verdict::Accept { None } else { Some(verdict) }));
        let Ok(msg) = msg_ok else { return };
        match verdict {
            Verdict::Accept => {}
            Verdict::Drop(_) => return,
            Verdict::Reject(reason) => {
                if let RelayMsg::Upgrade { req, from, keys } = &msg {
                    let from = text::neutralize(from.as_bytes(), 64);
                    self.mark_request(req, &from, &fingerprints(keys));
                    self.mark(Mark::Answer { req, from: &from, answer: Answer::Rejected(reason) });
                    if let Some(o) = self.out() {
                        protocol::push_tunnel_rejected(o, req, reason);
                    }
                }
                return;
            }
        }
        match msg {
            RelayMsg::Welcome { viewers } => self.on_welcome(viewers),
            RelayMsg::Error { code, msg } => self.on_error(code, &msg),
            RelayMsg::K(bytes) => self.keys_to_shell(&bytes),
            RelayMsg::Chat { from, text: t } => {
                let line =
                    format!("support ({}): {}", text::neutralize(from.as_bytes(), 64), text::neutralize(&t, 4000));
                self.chat_show(&line);
                self.mark(Mark::Chat { who: Who::Support(&from), text: &t });
            }
            RelayMsg::Viewers(n) => {
                if n != self.viewers {
                    self.mark(Mark::Viewers { before: self.viewers, now: n });
                }
                self.viewers = n;
                if let Some(c) = &mut self.console {
                    c.line(&format!("support viewers: {n}"));
                }
                self.status_row();
            }
            RelayMsg::Note(t) => {
                self.mark(Mark::Note(&t));
                self.note = text::neutralize(&t, 200);
                let note = self.note.clone();
                self.chat_send("S2", note.as_bytes());
                if let (Some(c), false) = (&mut self.console, note.is_empty()) {
                    c.line(&format!("note from support: {note}"));
                }
            }
            RelayMsg::Upgrade { req, from, keys } => {
                let from = text::neutralize(from.as_bytes(), 64);
                self.mark_request(&req, &from, &fingerprints(&keys));
                self.with_grants(|g| g.upgrade(req, from, keys));
            }
            RelayMsg::Revoke => self.with_grants(|g| g.relay_revoke()),
            RelayMsg::Refresh => self.request_snap(),
            RelayMsg::Close { reason } => {
                let r = text::neutralize(reason.as_bytes(), 200);
                self.farewell = format!("support ended the session: {r}");
                self.end_why = r;
                self.tell(&self.farewell.clone());
                self.begin_end(End::RelayClose);
            }
            RelayMsg::Ping(n) => {
                if let Some(o) = self.out() {
                    protocol::push_pong(o, n);
                }
            }
            RelayMsg::Pong(_) => {}
        }
    }

    fn on_welcome(&mut self, viewers: u32) {
        let first = self.link.welcomed();
        self.viewers = viewers;
        self.tell(&format!("connected to the relay (support viewers: {viewers})"));
        self.mark(if first { Mark::Connected { viewers } } else { Mark::Reconnected { viewers } });
        if first {
            let _ = crate::sessiondir::publish(&self.dir.file("state"), "ready\n");
        }
        if let Some((c, r)) = self.tmux.as_ref().map(|t| t.size()) {
            if let Some(o) = self.out() {
                protocol::push_size(o, c, r);
            }
        }
        self.send_state();
        self.request_snap();
        // The forward died with the old master: a tunnel that was open, or --tunnel mode, opens again.
        self.with_grants(|g| g.welcomed(first));
        self.status_row();
    }

    fn on_error(&mut self, code: protocol::ErrorCode, msg: &str) {
        let text = text::neutralize(msg.as_bytes(), 300);
        if code.retryable() {
            self.tell(&format!("relay is busy ({}): {text}; retrying", code.as_str()));
            self.link.drop_master();
            self.link.schedule_retry();
            return;
        }
        self.fatal(&format!("the relay refused the session ({}): {text}", code.as_str()));
    }

    fn send_state(&mut self) {
        let (t, brb) = (self.grants.tunnel().state(), self.grants.tunnel().brb());
        self.push_state(t, brb);
    }

    fn push_state(&mut self, t: crate::tunnel::State, brb: bool) {
        let mode = self.cfg.mode;
        if let Some(o) = self.out() {
            protocol::push_state(o, t, brb, mode);
        }
    }

    // ---- the shared pane ------------------------------------------------------------------

    fn tmux_cmd(&mut self, cmd: &str, pending: Pending) {
        if let Some(t) = &mut self.tmux {
            t.cmd(cmd, pending);
        }
    }

    /// Whether tmux is behind on our commands (F3, see `Control::busy`).
    fn tmux_busy(&self) -> bool {
        self.tmux.as_ref().is_some_and(|t| t.busy())
    }

    fn keys_to_shell(&mut self, bytes: &[u8]) {
        match self.tmux.as_mut().map(|t| t.keys(bytes)) {
            None => self.sshlog.line("dropped K reason=no-shared-terminal"),
            Some(false) => self.sshlog.line("dropped K reason=tmux-busy"),
            Some(true) => {}
        }
    }

    /// Whether tmux pauses a pane we fall behind on (3.2+), so that we may stop reading it.
    fn tmux_paces(&self) -> bool {
        self.tmux.as_ref().is_none_or(|t| t.flow_control())
    }

    fn request_snap(&mut self) {
        if let Some(t) = &mut self.tmux {
            t.want_snap();
        }
    }

    fn list_panes(&mut self) {
        if let Some(t) = &mut self.tmux {
            t.list_panes();
        }
    }

    fn on_tmux_stdout(&mut self) {
        let Some(t) = &mut self.tmux else { return };
        let eof = t.read(READ_BUDGET);
        while let Some(h) = self.tmux.as_mut().and_then(|t| t.next()) {
            self.on_tmux(h);
        }
        // The recorder gathers this read's output; one write(2) for all of it (see recording.rs).
        if let Some(Err(e)) = self.rec.as_mut().map(|r| r.flush()) {
            self.recording_failed(&e);
        }
        if eof && self.end.is_none() {
            self.log.line("tmux control client ended: the tmux server is gone");
            self.begin_end(End::TmuxGone);
        }
    }

    fn on_tmux(&mut self, h: Happening) {
        match h {
            Happening::Shell(data) => {
                if let Some(Err(e)) = self.rec.as_mut().map(|r| r.output(&data)) {
                    self.recording_failed(&e);
                }
                // 3.2+ pauses the pane instead (we stop reading it); only an older tmux is read on.
                if !self.tmux_paces() && self.link.backlog() >= OUTQ_HIGH {
                    if !self.relay_behind {
                        self.log.line(
                            "the relay link is backlogged: shell output is recorded, support gets a fresh screen later",
                        );
                    }
                    self.relay_behind = true;
                } else if let Some(o) = self.out() {
                    protocol::push_o(o, &data);
                }
            }
            Happening::Refused(pending, body) => {
                let b: Vec<String> = body.iter().map(|l| text::neutralize(l, 300)).collect();
                self.log.line(&format!("tmux refused a command ({pending:?}): {}", b.join(" / ")));
            }
            Happening::Reply(pending, body) => self.on_tmux_reply(pending, body),
            Happening::Paused(pane) => {
                self.log.line(&format!("tmux paused pane %{pane}: the link is slower than the shell"))
            }
            Happening::Exit => self.begin_end(End::TmuxGone),
        }
    }

    fn on_tmux_reply(&mut self, pending: Pending, body: Vec<Vec<u8>>) {
        match pending {
            Pending::Ignore => {}
            Pending::Panes => {
                let Some(t) = &mut self.tmux else { return };
                // Not yet: the launcher may still be tagging the panes; asked again shortly.
                let PanesSeen::Shell { first, changed, size: (w, h) } = t.panes(&body) else { return };
                if first || changed {
                    if let Some(r) = &mut self.rec {
                        if !first {
                            let _ = r.resize(w, h);
                        }
                    }
                    if let Some(o) = self.out() {
                        protocol::push_size(o, w, h);
                    }
                }
                if first {
                    self.start_recording(w, h);
                    if !self.link.exists() && !self.link.ever_welcomed() && self.end.is_none() {
                        self.link.connect_at(None);
                        self.connect();
                    }
                }
            }
            Pending::Snap => {
                let Some((c, r, file)) =
                    self.tmux.as_ref().map(|t| (t.size().0, t.size().1, t.snap_file().to_path_buf()))
                else {
                    return;
                };
                // The screen comes in a file, not in the reply (see tmux::snap_commands).
                let mut saved = Vec::new();
                let read = std::fs::File::open(&file).and_then(|f| f.take(1 << 20).read_to_end(&mut saved));
                let _ = std::fs::remove_file(&file);
                if read.is_err() {
                    self.log.line("tmux saved no screen for a snapshot");
                    return;
                }
                let screen = tmux::snap_screen(&saved);
                if let Some(o) = self.out() {
                    if protocol::push_snap(o, c, r, &screen).is_err() {
                        // An attribute-heavy screen over the line limit: plain text still resynchronises.
                        let plain: Vec<u8> = strip_escapes(&screen);
                        let _ = protocol::push_snap(o, c, r, &plain);
                    }
                }
            }
            Pending::Clients { req, cmd: cmd_tail, again } => {
                // The popup goes to the customer's own client, not to our control client.
                let client = ui::customer_client(&body);
                match client {
                    // Shown again only to a customer who stopped typing: never mid-word (F1).
                    Some((_, activity)) if again && now_unix().saturating_sub(activity) < POPUP_IDLE_SECS => {}
                    Some((c, _)) => {
                        // display-menu names its client with -c, command-prompt with -t.
                        let flag = if cmd_tail.starts_with("command-prompt") { "-t" } else { "-c" };
                        let target = format!("{flag} {} ", tmux::quote(&c));
                        let cmd = match cmd_tail.split_once(' ') {
                            Some((verb, rest)) => format!("{verb} {target}{rest}"),
                            None => cmd_tail,
                        };
                        self.tmux_cmd(&cmd, Pending::Ignore);
                    }
                    None => {
                        // Nobody to ask: answer the request rather than leave it (and the queue) hanging.
                        self.log.line("no customer client attached to show the tunnel request");
                        self.with_grants(|g| g.abandon(&req));
                    }
                }
            }
        }
    }

    fn start_recording(&mut self, w: u16, h: u16) {
        let header = recording::Header {
            width: w,
            height: h,
            term: std::env::var("TERM").unwrap_or_else(|_| "xterm-256color".into()),
            shell: std::env::var("SHELL").unwrap_or_else(|_| "/bin/sh".into()),
            session_id: self.cfg.session_id.clone(),
        };
        let home = std::env::var_os("HOME").map(PathBuf::from);
        let dir = self.cfg.recording_dir.clone();
        match recording::Recorder::create(
            dir.as_deref(),
            home.as_deref(),
            &self.host,
            std::time::SystemTime::now(),
            &header,
        ) {
            Ok((r, path)) => {
                self.log.line(&format!("recording to {}", path.display()));
                self.rec = Some(r);
                self.rec_path = Some(path);
            }
            Err(e) => self.log.line(&format!("no recording: {e}")),
        }
    }

    // ---- the tunnel -------------------------------------------------------------------------

    /// Call into the tunnel's effects and deliver what they said, in order.
    fn with_grants<R>(&mut self, f: impl FnOnce(&mut Grants) -> R) -> R {
        self.grants.set_link_up(self.link.is_up());
        let r = f(&mut self.grants);
        for said in self.grants.said() {
            self.deliver(said);
        }
        r
    }

    fn deliver(&mut self, said: Said) {
        match said {
            Said::Log(line) => self.log.line(&line),
            Said::Tell(line) => self.tell(&line),
            Said::Chat(line) => self.chat_show(&line),
            Said::Ask { req, from } => self.popup(&req, &from),
            Said::Decision { word, state } => self.mark(Mark::Decision { word: &word, state }),
            Said::Granted { req, from, port } => {
                self.mark(Mark::Answer { req: &req, from: &from, answer: Answer::Granted { port } });
                let user = self.cfg.user.clone();
                self.chat_show(&format!("tunnel granted to {from}: support can log in as {user}"));
                if let Some(o) = self.out() {
                    protocol::push_tunnel_open(o, &req, port, &user);
                }
            }
            Said::TunnelOpen { req, port } => {
                let user = self.cfg.user.clone();
                if let Some(o) = self.out() {
                    protocol::push_tunnel_open(o, &req, port, &user);
                }
            }
            Said::TunnelRejected { req, from, reason } => {
                self.mark(Mark::Answer { req: &req, from: &from, answer: Answer::Rejected(reason) });
                if let Some(o) = self.out() {
                    protocol::push_tunnel_rejected(o, &req, reason);
                }
            }
            Said::TunnelClosed(reason) => {
                self.mark(Mark::Closed(reason));
                if let Some(o) = self.out() {
                    protocol::push_tunnel_closed(o, reason);
                }
            }
            Said::ForwardOpen(port) => {
                self.mark(Mark::ForwardOpen { port });
                self.tell(&format!("reverse tunnel open on relay port {port}"));
            }
            Said::KeysRemoved => self.mark(Mark::KeysRemoved),
            Said::KeysLeft => self.mark(Mark::KeysLeft),
            Said::State { tunnel, brb } => self.push_state(tunnel, brb),
            Said::Status => self.status_row(),
        }
    }

    fn popup(&mut self, req: &str, from: &str) {
        let (Some(features), Some(ask)) = (self.tmux.as_ref().map(|t| t.features()), self.grants.ask(req)) else {
            // No terminal to ask on (foreground --tunnel after a revoke): nobody can say yes.
            self.tell(&format!("tunnel request from {from} denied: no terminal to confirm it on"));
            self.with_grants(|g| g.deny_unasked(req));
            return;
        };
        // The chat pane says the same as the popup, so a dismissed popup loses nothing.
        let width =
            self.tmux.as_ref().map_or(ui::SCREEN_COLS, |t| usize::from(t.size().0)).clamp(40, ui::SCREEN_COLS) - 2;
        self.chat_show(&format!("tunnel request {}:", ask.n));
        for line in ui::ask_lines(&ask, width) {
            self.chat_show(&format!("  {line}"));
        }
        self.chat_show(&format!("  {}", ui::answer_hint(&features)));
        let cmd = self.popup_command(&ask, &features);
        if features.has(tmux::Feat::PromptWithoutFreeze) {
            self.show_popup(req, cmd, false);
            return;
        }
        if let Some(h) = self.popup_held.take() {
            self.show_held(h);
        }
        self.chat_send("A", ask.n.to_string().as_bytes());
        let until = Instant::now() + POPUP_HOLD;
        self.popup_held = Some(HeldPopup { n: ask.n, req: req.to_string(), cmd, until });
    }

    /// The chat pane has drawn up to `A n`: a held prompt may go up now.
    fn on_shown(&mut self, n: u32) {
        if let Some(h) = self.popup_held.take_if(|h| h.n == n) {
            self.show_held(h);
        }
    }

    /// A held prompt goes up if its request still waits for the customer's answer.
    fn show_held(&mut self, h: HeldPopup) {
        if self.grants.on_screen().is_some_and(|(req, _)| req == h.req) {
            self.show_popup(&h.req, h.cmd, false);
        }
    }

    fn popup_command(&self, ask: &ui::Ask, features: &tmux::Features) -> String {
        let exe = std::env::current_exe().unwrap_or_else(|_| PathBuf::from("linbit-tunl"));
        ui::upgrade_prompt_command(&exe, &self.dir.path, ask, features)
    }

    fn show_popup(&mut self, req: &str, cmd: String, again: bool) {
        self.popup_again_at = Some(Instant::now() + POPUP_AGAIN);
        self.tmux_cmd(&ui::list_clients_command(), Pending::Clients { req: req.to_string(), cmd, again });
    }

    // ---- control fifo ------------------------------------------------------------------------

    fn on_ctl(&mut self) {
        let Some(fd) = &self.ctl else { return };
        let mut buf = std::mem::take(&mut self.ctlbuf);
        proc::read_budget(fd.as_fd(), &mut buf, READ_BUDGET);
        let mut start = 0;
        while let Some(i) = buf[start..].iter().position(|&b| b == b'\n') {
            let line = String::from_utf8_lossy(&buf[start..start + i]).into_owned();
            start += i + 1;
            self.on_ctl_line(&line);
        }
        buf.drain(..start);
        if buf.len() > 65536 {
            buf.clear();
        }
        self.ctlbuf = buf;
    }

    fn on_ctl_line(&mut self, line: &str) {
        let words: Vec<&str> = line.split(' ').collect();
        match words.as_slice() {
            ["quit"] => self.begin_end(End::Customer),
            ["shown", n] => {
                if let Ok(n) = n.parse() {
                    self.on_shown(n);
                }
            }
            [word @ ("grant" | "revoke" | "block")] => {
                // The customer's tunnel decision (Ctrl-b u/U/X or the menu): done, and said.
                match self.with_grants(|g| g.decide(word)) {
                    Ok(said) => {
                        self.chat_show(said);
                        self.send_state();
                    }
                    Err(e) => self.chat_show(e),
                }
            }
            ["brb"] => match self.grants.set_brb(true) {
                Ok(()) => {
                    self.mark(Mark::Brb(true));
                    self.chat_show("BRB: support keystrokes are paused; /back to resume");
                    self.send_state();
                    self.status_row();
                }
                Err(e) => self.chat_show(e),
            },
            ["back"] => {
                if self.grants.tunnel().brb() {
                    let _ = self.grants.set_brb(false);
                    self.mark(Mark::Brb(false));
                    self.chat_show("back: support can type again");
                    self.send_state();
                    self.status_row();
                }
            }
            ["chat", b64] => match B64.decode(b64) {
                Ok(t) if !t.is_empty() && t.len() <= 4096 => {
                    let delivered = match self.out() {
                        Some(o) => protocol::push_chat(o, &t).is_ok(),
                        None => false,
                    };
                    self.mark(Mark::Chat { who: Who::Customer { delivered }, text: &t });
                }
                _ => self.log.line("ctl: bad chat line dropped"),
            },
            ["answer", n, verdict @ ("grant" | "deny")] => {
                // The popup names the request by our own number (F2); an unknown number does nothing.
                let n = n.parse::<u32>().ok();
                self.with_grants(|g| g.answer(n, *verdict == "grant"));
            }
            ["respawn"] => {
                // Ctrl-b L: tmux already re-applied the layout; bring back a chat pane that died.
                if let Some((shell, chat, f)) =
                    self.tmux.as_ref().and_then(|t| Some((t.shell()?, t.chat(), t.features())))
                {
                    let exe = std::env::current_exe().unwrap_or_else(|_| PathBuf::from("linbit-tunl"));
                    for cmd in ui::reset_layout_commands(shell, chat, &exe, &self.dir.path, &f) {
                        self.tmux_cmd(&cmd, Pending::Ignore);
                    }
                    self.list_panes();
                }
            }
            _ => self.log.line(&format!("ctl: unknown line dropped: {}", text::neutralize(line.as_bytes(), 80))),
        }
    }

    // ---- ending -------------------------------------------------------------------------------

    fn fatal(&mut self, msg: &str) {
        self.tell(msg);
        if self.end_why.is_empty() {
            self.end_why = msg.to_string();
        }
        if !self.link.ever_welcomed() {
            let _ = crate::sessiondir::publish(&self.dir.file("state"), &format!("failed {msg}\n"));
        }
        self.begin_end(End::Fatal);
    }

    fn begin_end(&mut self, end: End) {
        if self.end.is_none() {
            self.end = Some(end);
        }
    }

    /// The orderly end: keys out first (the one thing that must never be left behind), then BYE.
    fn shutdown(&mut self) -> End {
        let end = self.end.unwrap_or(End::Fatal);
        signals::arm_watchdog(WATCHDOG_SECS);
        let deadline = Instant::now() + SHUTDOWN_LIMIT;
        self.log.line(&format!("ending: {end:?}"));
        self.with_grants(|g| g.end());
        let bye = match end {
            End::RelayClose => Some(protocol::ByeReason::RelayClose),
            End::Signal(_) | End::TmuxGone => Some(protocol::ByeReason::Signal),
            End::Customer => Some(protocol::ByeReason::Customer),
            End::Fatal => None,
        };
        if let Some(b) = bye {
            if let Some(o) = self.out() {
                protocol::push_bye(o, b);
            }
        }
        // The forward dies with the master: no `-O cancel`, and a mux client still running goes.
        self.grants.stop_mux();
        self.link.flush(deadline.saturating_duration_since(Instant::now()).min(Duration::from_secs(2)));
        // BYE is out: the master may go.
        self.link.close(deadline);
        let why = std::mem::take(&mut self.end_why);
        self.mark(Mark::End { end, why: &why });
        if let Some(r) = self.rec.take() {
            let _ = r.finish();
        }
        if !self.link.ever_welcomed() {
            // A session that never connected showed nobody anything: no recording of it stays.
            if let Some(p) = self.rec_path.take() {
                let _ = std::fs::remove_file(&p);
                let _ = std::fs::remove_file(recording::transcript_path(&p));
                self.log.line("recording removed: the session never connected");
            }
        }
        let rec = self.rec_path.as_ref().map(|p| p.display().to_string()).unwrap_or_default();
        let _ = crate::sessiondir::publish(
            &self.dir.file("exit"),
            &format!("{}\n{}\n{}\n", end.status(), rec, self.farewell),
        );
        if let Some(t) = self.tmux.take() {
            t.close();
        }
        if let Some(c) = &mut self.console {
            // What the terminal has not taken by then is lost: the budget is for the keys, not for it.
            c.flush_until(deadline.min(Instant::now() + Duration::from_secs(1)));
        }
        end
    }

    // ---- the loop -------------------------------------------------------------------------------

    /// Attach the tmux control client (share modes).
    pub fn attach_tmux(
        &mut self,
        sock: &std::path::Path,
        session: &str,
        features: tmux::Features,
        first: &[String],
    ) -> Result<(), String> {
        self.tmux = Some(Control::attach(sock, session, features, first, self.dir.file("snap"))?);
        Ok(())
    }

    pub fn open_fifos(&mut self) -> Result<(), String> {
        use rustix::fs::{Mode as FMode, OFlags};
        // O_RDWR on a fifo never blocks and never sees EOF: the daemon is its own writer.
        let flags = OFlags::RDWR | OFlags::NONBLOCK | OFlags::CLOEXEC;
        let ctl = rustix::fs::open(self.dir.file("ctl.fifo"), flags, FMode::empty())
            .map_err(|e| format!("cannot open ctl.fifo: {e}"))?;
        let chat = rustix::fs::open(self.dir.file("chat.fifo"), flags, FMode::empty())
            .map_err(|e| format!("cannot open chat.fifo: {e}"))?;
        self.ctl = Some(ctl);
        self.chat_out = Some(chat);
        Ok(())
    }

    /// Run until the session ends; returns how, and whether the relay ever welcomed us.
    pub fn run_to_end(&mut self) -> (End, bool) {
        if self.tmux.is_some() {
            // Connect once the shell pane is known, so the hello carries its real size; the timer
            // is a fallback should tmux never answer.
            self.link.connect_at(Some(Instant::now() + Duration::from_secs(5)));
        } else {
            self.connect();
        }
        self.status_row();
        while self.end.is_none() {
            self.step();
        }
        (self.shutdown(), self.link.ever_welcomed())
    }

    pub fn into_dir(self) -> SessionDir {
        self.dir
    }

    fn next_timeout(&self) -> Option<Duration> {
        let now = Instant::now();
        let next = [
            self.link.deadline(),
            self.tmux.as_ref().and_then(|t| t.deadline()),
            self.grants.deadline(),
            self.popup_again_at,
            self.popup_held.as_ref().map(|h| h.until),
        ]
        .into_iter()
        .flatten()
        .min();
        next.map(|n| n.saturating_duration_since(now))
    }

    fn on_timers(&mut self) {
        let now = Instant::now();
        if let Some(t) = &mut self.tmux {
            t.on_timers(now);
        }
        self.with_grants(|g| g.on_timers(now));
        if let Some(h) = self.popup_held.take_if(|h| now >= h.until) {
            self.log.line("the chat pane did not draw the tunnel request in time; asking all the same");
            self.show_held(h);
        }
        if self.popup_again_at.is_some_and(|r| now >= r) {
            self.popup_again_at = None;
            let f = self.tmux.as_ref().map(|t| t.features());
            if let (Some((req, _)), Some(f)) = (self.grants.on_screen(), f) {
                if let Some(ask) = self.grants.ask(&req) {
                    let cmd = self.popup_command(&ask, &f);
                    self.show_popup(&req, cmd, true);
                }
            }
        }
        match self.link.on_timers(now) {
            Some(link::Due::Connect) => self.connect(),
            Some(link::Due::Lost(why)) => self.link_lost(why),
            None => {}
        }
    }

    fn step(&mut self) {
        // Write what we can before sleeping: most of the time the pipes take everything at once.
        self.pump_writes();
        let timeout = self.next_timeout();
        let sigfd = self.sig.fd();
        let mut fds: Vec<PollFd<'_>> = vec![PollFd::new(&sigfd, PollFlags::IN)];
        let mut roles: Vec<Role> = vec![Role::Signal];
        // A full queue towards the relay stops us reading the pane: backpressure, not memory. A
        // tmux before 3.2 cannot pause a pane; it would buffer the shell's output for us without a
        // bound and replay all of it, long stale, once the link recovers. That one we keep reading,
        // and its output beyond the bound goes to the recording only (see on_tmux).
        let read_pane = self.link.backlog() < OUTQ_HIGH || !self.tmux_paces();
        let [link_out, link_err, link_in] = self.link.poll_fds();
        let [tmux_out, tmux_in] = self.tmux.as_ref().map_or([None, None], |t| t.poll_fds(read_pane));
        let cands: [(Option<(BorrowedFd<'_>, PollFlags)>, Role); 7] = [
            (link_out, Role::LinkOut),
            (link_err, Role::LinkErr),
            (link_in, Role::LinkIn),
            (tmux_out, Role::TmuxOut),
            (tmux_in, Role::TmuxIn),
            (self.ctl.as_ref().map(|f| (f.as_fd(), PollFlags::IN)), Role::Ctl),
            (self.console.as_ref().filter(|c| c.waiting() > 0).map(|c| (c.fd(), PollFlags::OUT)), Role::Console),
        ];
        for (fd, role) in cands {
            if let Some((fd, flags)) = fd {
                fds.push(PollFd::from_borrowed_fd(fd, flags));
                roles.push(role);
            }
        }
        let t = timeout.map(ts);
        match rustix::event::poll(&mut fds, t.as_ref()) {
            Ok(_) | Err(rustix::io::Errno::INTR) => {}
            Err(e) => {
                self.log.line(&format!("poll failed: {e}"));
            }
        }
        let ready: Vec<Role> =
            fds.iter().zip(roles.iter()).filter(|(f, _)| !f.revents().is_empty()).map(|(_, r)| *r).collect();
        drop(fds);
        for role in ready {
            match role {
                Role::Signal => self.on_signals(),
                Role::LinkOut => self.on_link_stdout(),
                Role::LinkErr => self.on_link_stderr(),
                Role::LinkIn | Role::TmuxIn | Role::Console => {}
                Role::TmuxOut => self.on_tmux_stdout(),
                Role::Ctl => self.on_ctl(),
            }
            if self.end.is_some() {
                return;
            }
        }
        self.on_timers();
    }

    fn pump_writes(&mut self) {
        if !self.link.pump() {
            self.link_lost("ssh stopped reading");
        }
        if let Some(t) = &mut self.tmux {
            t.pump();
        }
        // Output was dropped for the relay: once the queue has drained, a SNAP makes support's
        // screen whole again. A lost link needs none (every WELCOME brings its own SNAP).
        if self.relay_behind && self.link.backlog() < OUTQ_HIGH / 4 {
            self.relay_behind = false;
            if self.link.exists() {
                self.request_snap();
            }
        }
        if self.status_behind && !self.tmux_busy() {
            self.status_row();
        }
        if let Some(c) = &mut self.console {
            c.flush();
        }
    }

    fn on_signals(&mut self) {
        for s in self.sig.drain() {
            match s {
                s if s == signals::SIGINT || s == signals::SIGTERM => self.begin_end(End::Signal(s)),
                s if s == signals::SIGHUP => self.begin_end(End::TmuxGone),
                s if s == signals::SIGCHLD => self.reap(),
                _ => {}
            }
        }
    }

    fn reap(&mut self) {
        self.with_grants(|g| g.reap(Instant::now()));
        if self.link.exited() {
            // Read what is left first: an ERROR line may be waiting in the pipe.
            self.on_link_stderr();
            self.on_link_stdout();
            if self.link.exists() {
                self.link_lost("ssh ended");
            }
        }
    }
}

#[derive(Clone, Copy)]
enum Role {
    Signal,
    LinkOut,
    LinkErr,
    LinkIn,
    TmuxOut,
    TmuxIn,
    Ctl,
    Console,
}

/// The keys of a tunnel request as `ssh-keygen -lf` prints them; none if they are not valid.
fn fingerprints(keys: &[u8]) -> Vec<String> {
    authkeys::validate_keys(keys)
        .unwrap_or_default()
        .iter()
        .map(|k| ui::fingerprint(k).unwrap_or_else(|| "(a key ssh-keygen would not fingerprint)".into()))
        .collect()
}

/// The chat-fifo lines for one message: `KIND B64\n`, each at most PIPE_BUF (4096) bytes, so that a
/// non-blocking write of one is atomic (F23). A long chat message becomes several lines, cut at
/// character boundaries; a status row is cut to one.
fn fifo_lines(kind: &str, payload: &[u8]) -> Vec<String> {
    // 4096 bytes: kind, space, newline, and base64 of up to 3000 bytes (4000 characters).
    const CHUNK: usize = 3000;
    let text = String::from_utf8_lossy(payload);
    let mut out = Vec::new();
    let mut rest: &str = &text;
    loop {
        let mut cut = rest.len().min(CHUNK);
        while !rest.is_char_boundary(cut) {
            cut -= 1;
        }
        let (piece, tail) = rest.split_at(cut);
        // A continuation is indented like a wrapped row, so it cannot pass for a message of ours (F5).
        let piece = if out.is_empty() { piece.to_string() } else { format!("  {piece}") };
        out.push(format!("{kind} {}\n", B64.encode(piece.as_bytes())));
        rest = tail;
        if rest.is_empty() || kind != "M" {
            return out;
        }
    }
}

pub fn ts(d: Duration) -> rustix::event::Timespec {
    rustix::event::Timespec { tv_sec: d.as_secs() as i64, tv_nsec: d.subsec_nanos() as i64 }
}

pub fn now_unix() -> u64 {
    crate::sessiondir::now().0
}

/// The most telling line ssh logged, for a customer-facing failure message.
fn last_ssh_error(path: &std::path::Path) -> Option<String> {
    let text = std::fs::read_to_string(path).ok()?;
    let keys = [
        "Permission denied",
        "Host key verification failed",
        "certificate",
        "Connection refused",
        "Could not resolve",
        "timed out",
        "No route",
        "Connection closed",
    ];
    text.lines()
        .filter(|l| l.contains(" ssh: "))
        .rfind(|l| keys.iter().any(|k| l.contains(k)))
        .map(|l| l.split_once(" ssh: ").map(|x| x.1).unwrap_or(l).to_string())
}

/// Drop escape sequences (CSI/OSC and single ESC pairs) from a captured screen.
fn strip_escapes(b: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == 0x1b {
            i += 1;
            match b.get(i) {
                Some(b'[') => {
                    i += 1;
                    while i < b.len() && !(0x40..=0x7e).contains(&b[i]) {
                        i += 1;
                    }
                    i += 1;
                }
                Some(b']') => {
                    while i < b.len() && b[i] != 0x07 && !(b[i] == 0x1b && b.get(i + 1) == Some(&b'\\')) {
                        i += 1;
                    }
                    i += 1;
                }
                Some(_) => i += 1,
                None => {}
            }
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chat_fifo_lines_fit_pipe_buf_and_keep_every_character() {
        // A relay CHAT line neutralised to 4000 characters, many of them multi-byte.
        let text: String = "ä€x".repeat(1400);
        let lines = fifo_lines("M", text.as_bytes());
        assert!(lines.len() > 1);
        let mut back = String::new();
        for (i, l) in lines.iter().enumerate() {
            assert!(l.len() <= 4096, "{} bytes", l.len());
            let b64 = l.strip_prefix("M ").and_then(|l| l.strip_suffix('\n')).unwrap();
            let piece = String::from_utf8(B64.decode(b64).unwrap()).unwrap();
            // Every piece after the first is indented, so it cannot pass for a message of ours (F5).
            back.push_str(if i == 0 { &piece } else { piece.strip_prefix("  ").expect("continuation indented") });
        }
        assert_eq!(back, text);
        // A status row is one line, cut if it had to be.
        assert_eq!(fifo_lines("S1", "x".repeat(5000).as_bytes()).len(), 1);
        assert_eq!(fifo_lines("M", b""), vec!["M \n".to_string()]);
    }
}
