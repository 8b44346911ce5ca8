//! The daemon: one thread, one poll loop over the ssh master's pipes, the tmux control client, the
//! control fifo and the signal pipe, with timers for heartbeat, liveness and reconnect.
//!
//! Everything the relay says is parsed strictly and checked against the customer-side allowlist
//! before it can act; nothing from the relay reaches a terminal without being neutralised.

use std::collections::VecDeque;
use std::io::Read;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use rustix::event::{PollFd, PollFlags};

use crate::cli::Config;
use crate::console::Console;
use crate::marks::{self, Answer, Mark, Who};
use crate::mux::{self, Mux};
use crate::proc::{self, Proc};
use crate::protocol::{self, RelayMsg, Verdict};
use crate::sessiondir::{Log, SessionDir};
use crate::signals::{self, SignalPipe};
use crate::tunnel::{self, Tunnel};
use crate::{auth, authkeys, recording, ssh, text, tmux, ui};

const PING_AFTER: Duration = Duration::from_secs(15);
const SILENCE_LIMIT: Duration = Duration::from_secs(45);
const WELCOME_TIMEOUT: Duration = Duration::from_secs(30);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// Stop reading the shell pane while this much is queued for the relay: a slow link must cost
/// memory in tmux (which pauses or buffers), never unbounded memory here.
const OUTQ_HIGH: usize = 4 << 20;
/// How far (seconds) the control client may fall behind a pane before tmux pauses it (tmux >= 3.2).
const PAUSE_AFTER_SECS: u32 = 30;
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
/// At most one screen capture in flight and one SNAP per this interval, however many REFRESH lines
/// the relay sends (F3): 8 bytes in must not buy 256 KiB out each.
const SNAP_EVERY: Duration = Duration::from_secs(1);
/// What one poll wake-up reads from one pipe at most (F4): the other pipes, timers and signals get
/// their turn even when a producer refills the pipe as fast as we empty it.
const READ_BUDGET: usize = 256 << 10;
/// A relay that takes nothing from us for this long is as dead as one that says nothing (F3): it may
/// keep the link "alive" with PING while our queue towards it stands still.
const STALL_LIMIT: Duration = SILENCE_LIMIT;
/// While this much waits for the tmux control client unwritten, or this many commands wait for
/// their reply, support's keystrokes are dropped (`dropped K reason=tmux-busy`) and the status rows
/// wait: a tmux that stopped reading must not make our queue grow with each relay line (F3).
const TMUX_QUEUE_MAX: usize = 1 << 20;
const TMUX_PENDING_MAX: usize = 4096;

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

#[derive(Debug, PartialEq, Eq)]
enum LinkState {
    Connecting,
    Up,
    Down,
}

struct Link {
    p: Proc,
    outq: Vec<u8>,
    out_off: usize,
    split: protocol::LineSplitter,
    errbuf: Vec<u8>,
    last_tx: Instant,
    last_rx: Instant,
    /// When we last sent a PING.
    last_ping: Instant,
    started: Instant,
    /// Since when bytes wait for ssh's stdin without any being taken (F3).
    stalled_since: Option<Instant>,
    stdout_eof: bool,
    stderr_eof: bool,
}

/// What a reply block from the tmux control client answers, in the order the commands were sent.
#[derive(Debug)]
enum Pending {
    Ignore,
    Panes,
    Snap,
    /// The popup command for this tunnel request, to be sent to the customer's client; `again`: a
    /// repeat, shown only if the customer is idle.
    Clients {
        req: String,
        cmd: String,
        again: bool,
    },
}

struct TmuxSide {
    p: Proc,
    parser: tmux::ControlParser,
    outq: Vec<u8>,
    out_off: usize,
    pending: VecDeque<Pending>,
    shell: Option<u32>,
    chat: Option<u32>,
    size: (u16, u16),
    features: tmux::Features,
    eof: bool,
}

/// Who asked for a tunnel request, and with which keys, for what the customer is shown.
struct Requester {
    req: String,
    n: u32,
    from: String,
    /// The keys as `ssh-keygen -lf` prints them.
    keys: Vec<String>,
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
    link: Option<Link>,
    state: LinkState,
    ever_welcomed: bool,
    attempts: u32,
    retry_at: Option<Instant>,
    panes_retry_at: Option<Instant>,
    popup_again_at: Option<Instant>,
    /// Status rows not sent while tmux was not keeping up; sent once it is.
    status_behind: bool,
    /// Screen captures: one in flight, the next one wanted, when the last SNAP went out.
    snap_in_flight: bool,
    snap_at: Option<Instant>,
    last_snap: Option<Instant>,
    ping_n: u64,
    tmux: Option<TmuxSide>,
    ctl: Option<OwnedFd>,
    ctlbuf: Vec<u8>,
    chat_out: Option<OwnedFd>,
    tunnel: Tunnel,
    forward_port: Option<u16>,
    /// The `ssh -O` clients, run as children of the loop (F20).
    mux: Mux,
    /// Granted requests waiting for the forward: their keys are written only once it is up (F7).
    awaiting: Vec<(String, Vec<String>)>,
    viewers: u32,
    note: String,
    rec: Option<recording::Recorder>,
    rec_path: Option<PathBuf>,
    /// Who asked for which tunnel request, for the customer's messages.
    requesters: Vec<Requester>,
    /// The daemon's own number for the next tunnel request (F2).
    next_ask: u32,
    /// The support keys in our authorized_keys block (all granted requests of this session).
    installed: Vec<String>,
    /// The block in the authorized_keys file: options, renewal, verified removal.
    keys: authkeys::KeyBlock,
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
        let tunnel = Tunnel::new(cfg.mode);
        let mux = Mux::new(&dir.path, &cfg.target_host, cfg.target_port);
        let keys = authkeys::KeyBlock::for_session(&cfg.authkeys_file, &cfg.session_id, &cfg.target_host, &dir.path);
        Ok(Daemon {
            cfg,
            dir,
            console: foreground.then(Console::stderr),
            auth,
            log,
            sshlog,
            sig,
            link: None,
            state: LinkState::Down,
            ever_welcomed: false,
            attempts: 0,
            retry_at: None,
            panes_retry_at: None,
            popup_again_at: None,
            status_behind: false,
            snap_in_flight: false,
            snap_at: None,
            last_snap: None,
            ping_n: 0,
            tmux: None,
            ctl: None,
            ctlbuf: Vec::new(),
            chat_out: None,
            tunnel,
            forward_port: None,
            mux,
            awaiting: Vec::new(),
            viewers: 0,
            note: String::new(),
            rec: None,
            rec_path: None,
            requesters: Vec::new(),
            next_ask: 1,
            installed: Vec::new(),
            keys,
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
        let link = match self.state {
            LinkState::Up => "connected",
            LinkState::Connecting if self.ever_welcomed => "reconnecting",
            LinkState::Connecting => "connecting",
            LinkState::Down if self.ever_welcomed => "reconnecting",
            LinkState::Down => "disconnected",
        };
        // Both rows fit 80 columns (F1): the session ID is on the status line's left, not here.
        let asking = if self.tunnel.on_screen().is_some() { ", request waiting" } else { "" };
        let row = format!(
            "relay: {} | viewers: {} | mode: {} | tunnel: {}{asking}{}",
            link,
            self.viewers,
            self.cfg.mode.as_str(),
            self.tunnel.state().wire(),
            if self.tunnel.brb() { " | BRB" } else { "" }
        );
        self.chat_send("S1", row.as_bytes());
        if self.tmux_busy() {
            self.status_behind = true;
        } else if self.tmux.is_some() {
            self.status_behind = false;
            let brb = if self.tunnel.brb() { " | BRB" } else { "" };
            let short = format!("{link} | viewers {} | tunnel {}{brb}", self.viewers, self.tunnel.state().wire());
            let f = self.tmux.as_ref().map(|t| t.features).unwrap_or_else(|| tmux::Features::from_version(None));
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

    fn mark_answer(&mut self, req: &str, answer: Answer) {
        let from = self.requester(req);
        self.mark(Mark::Answer { req, from: &from, answer });
    }

    // ---- the relay link -------------------------------------------------------------------

    fn connect(&mut self) {
        let resume = self.ever_welcomed;
        let size = self.tmux.as_ref().map(|t| t.size).unwrap_or((0, 0));
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
                let now = Instant::now();
                self.link = Some(Link {
                    p,
                    outq: Vec::new(),
                    out_off: 0,
                    split: protocol::LineSplitter::new(),
                    errbuf: Vec::new(),
                    last_tx: now,
                    last_ping: now,
                    last_rx: now,
                    started: now,
                    stalled_since: None,
                    stdout_eof: false,
                    stderr_eof: false,
                });
                self.state = LinkState::Connecting;
                self.tell(if resume { "reconnecting to the relay" } else { "connecting to the relay" });
            }
            Err(e) => {
                self.fatal(&format!("cannot start ssh: {e}"));
            }
        }
        self.status_row();
    }

    /// The queue towards the relay, when the link is up (nothing is queued for a link that is down:
    /// the SNAP after the next WELCOME resynchronises support).
    fn out(&mut self) -> Option<&mut Vec<u8>> {
        if self.state != LinkState::Up {
            return None;
        }
        let l = self.link.as_mut()?;
        l.last_tx = Instant::now();
        Some(&mut l.outq)
    }

    /// The link is gone (ssh ended, silence, or a refused hello): decide between fatal and retry.
    fn link_lost(&mut self, why: &str) {
        // ssh closed its end: it is exiting, and its last words (why it failed) may still be in the
        // stderr pipe. Let it finish (briefly) and read them before judging the failure.
        if let Some(l) = self.link.as_mut().filter(|l| l.stdout_eof) {
            proc::wait_exit(&mut l.p.child, Duration::from_secs(2));
        }
        self.on_link_stderr();
        let Some(mut l) = self.link.take() else { return };
        let _ = l.p.child.kill();
        let _ = l.p.child.wait();
        let was_up = self.state == LinkState::Up;
        self.state = LinkState::Down;
        self.forward_port = None;
        // Grants waiting for a forward of the old master cannot get one: refused, nothing written.
        self.fail_awaiting();
        self.mux.reset();
        self.tunnel.link_lost();
        if self.end.is_some() {
            return;
        }
        if was_up {
            self.mark(Mark::Disconnected { why });
        }
        self.sshlog.line(&format!("link lost: {why}"));
        if !self.ever_welcomed {
            let reason = last_ssh_error(&self.dir.file("ssh.log")).unwrap_or_else(|| why.to_string());
            self.fatal(&format!("cannot connect to the relay {}:{}: {reason}", self.cfg.relay, self.cfg.relay_port));
            return;
        }
        if was_up {
            self.attempts = 0;
        }
        self.schedule_retry();
        self.tell(&format!("link to the relay lost ({why}); reconnecting"));
        self.status_row();
    }

    fn schedule_retry(&mut self) {
        let base = Duration::from_secs(1) * 2u32.saturating_pow(self.attempts.min(5));
        let base = base.min(BACKOFF_MAX);
        // Jitter of up to a quarter, so many customers behind one outage do not return in step.
        let jitter = base.mul_f64(random_fraction() * 0.25);
        self.attempts += 1;
        self.retry_at = Some(Instant::now() + base + jitter);
    }

    fn on_link_stdout(&mut self) {
        let Some(l) = &mut self.link else { return };
        let fd = l.p.stdout.as_ref().unwrap().as_fd();
        let mut buf = Vec::new();
        let eof = proc::read_budget(fd, &mut buf, READ_BUDGET);
        l.split.push(&buf);
        if !buf.is_empty() {
            l.last_rx = Instant::now();
        }
        l.stdout_eof = eof;
        loop {
            let Some(l) = &mut self.link else { return };
            let item = match l.split.next_line() {
                None => break,
                Some(Ok(line)) => Ok(line.to_vec()),
                Some(Err(e)) => Err(e),
            };
            match item {
                Ok(line) => self.on_relay_line(&line),
                Err(_) => self.sshlog.line("dropped ? reason=line too long"),
            }
            if self.end.is_some() {
                return;
            }
        }
        if eof {
            self.link_lost("the relay closed the connection");
        }
    }

    fn on_link_stderr(&mut self) {
        let Some(l) = &mut self.link else { return };
        let fd = l.p.stderr.as_ref().unwrap().as_fd();
        let mut buf = std::mem::take(&mut l.errbuf);
        let eof = proc::read_budget(fd, &mut buf, READ_BUDGET);
        l.stderr_eof = eof;
        let mut rest = &buf[..];
        while let Some(i) = rest.iter().position(|&b| b == b'\n') {
            let raw = &rest[..i];
            let line = text::neutralize(raw.strip_suffix(b"\r").unwrap_or(raw), 2000);
            self.sshlog.line(&format!("ssh: {line}"));
            rest = &rest[i + 1..];
        }
        let keep = if eof && !rest.is_empty() {
            let line = text::neutralize(rest, 2000);
            self.sshlog.line(&format!("ssh: {line}"));
            Vec::new()
        } else {
            rest.to_vec()
        };
        if let Some(l) = &mut self.link {
            l.errbuf = keep;
        }
    }

    fn on_relay_line(&mut self, line: &[u8]) {
        let welcomed = self.state == LinkState::Up;
        let parsed = protocol::parse_relay_line(line);
        let msg = match parsed {
            Ok(m) => m,
            Err(_) => {
                self.sshlog.line(&protocol::log_line(&parsed, None));
                return;
            }
        };
        let verdict = protocol::allowed(&msg, self.cfg.mode, self.tunnel.brb(), welcomed);
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
            RelayMsg::Upgrade { req, from, keys } => self.on_upgrade(req, from, keys),
            RelayMsg::Revoke => {
                let fx = self.tunnel.relay_revoke();
                self.apply(fx, protocol::CloseReason::Relay);
                self.send_state();
            }
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
        self.state = LinkState::Up;
        self.viewers = viewers;
        self.attempts = 0;
        let first = !self.ever_welcomed;
        self.ever_welcomed = true;
        self.tell(&format!("connected to the relay (support viewers: {viewers})"));
        self.mark(if first { Mark::Connected { viewers } } else { Mark::Reconnected { viewers } });
        if first {
            let _ = crate::sessiondir::publish(&self.dir.file("state"), "ready\n");
        }
        if let Some((c, r)) = self.tmux.as_ref().map(|t| t.size) {
            if let Some(o) = self.out() {
                protocol::push_size(o, c, r);
            }
        }
        self.send_state();
        self.request_snap();
        // The forward died with the old master: a tunnel that was open, or --tunnel mode, opens again.
        // Open tunnels are announced again once the new forward is up (`on_mux`).
        let fx = if first { self.tunnel.connect() } else { self.tunnel.resume() };
        self.apply(fx, protocol::CloseReason::Ended);
        self.status_row();
    }

    fn on_error(&mut self, code: protocol::ErrorCode, msg: &str) {
        let text = text::neutralize(msg.as_bytes(), 300);
        if code.retryable() {
            self.tell(&format!("relay is busy ({}): {text}; retrying", code.as_str()));
            if let Some(mut l) = self.link.take() {
                let _ = l.p.child.kill();
                let _ = l.p.child.wait();
            }
            self.state = LinkState::Down;
            self.schedule_retry();
            return;
        }
        self.fatal(&format!("the relay refused the session ({}): {text}", code.as_str()));
    }

    fn send_state(&mut self) {
        let (t, brb, mode) = (self.tunnel.state(), self.tunnel.brb(), self.cfg.mode);
        if let Some(o) = self.out() {
            protocol::push_state(o, t, brb, mode);
        }
    }

    // ---- the shared pane ------------------------------------------------------------------

    fn tmux_cmd(&mut self, cmd: &str, pending: Pending) {
        if let Some(t) = &mut self.tmux {
            t.outq.extend_from_slice(cmd.as_bytes());
            t.outq.push(b'\n');
            t.pending.push_back(pending);
        }
    }

    /// Whether tmux is behind on our commands (F3): it has not read `TMUX_QUEUE_MAX` bytes of them, or
    /// not answered `TMUX_PENDING_MAX` of them.
    fn tmux_busy(&self) -> bool {
        self.tmux
            .as_ref()
            .is_some_and(|t| t.outq.len() - t.out_off >= TMUX_QUEUE_MAX || t.pending.len() >= TMUX_PENDING_MAX)
    }

    fn keys_to_shell(&mut self, bytes: &[u8]) {
        if self.tmux_busy() {
            // Typing is interactive: keys that cannot be delivered now are dropped, never hoarded.
            self.sshlog.line("dropped K reason=tmux-busy");
            return;
        }
        let Some(t) = &self.tmux else {
            self.sshlog.line("dropped K reason=no-shared-terminal");
            return;
        };
        let Some(pane) = t.shell else { return };
        for cmd in tmux::send_keys(&t.features, pane, bytes) {
            self.tmux_cmd(&cmd, Pending::Ignore);
        }
    }

    /// A SNAP is due. Coalesced (F3): while a capture is in flight or the last SNAP is recent, the
    /// request only marks one more capture as wanted, taken when its time comes.
    fn request_snap(&mut self) {
        let now = Instant::now();
        let due = self.last_snap.map_or(now, |t| t + SNAP_EVERY);
        if self.snap_in_flight || due > now {
            self.snap_at = Some(due);
            return;
        }
        if let Some(pane) = self.tmux.as_ref().and_then(|t| t.shell) {
            self.snap_in_flight = true;
            self.snap_at = None;
            let f = self.tmux.as_ref().map(|t| t.features).unwrap_or_else(|| tmux::Features::from_version(None));
            let (cmds, done) = tmux::snap_commands(&f, pane, &self.dir.file("snap").to_string_lossy());
            for (i, c) in cmds.iter().enumerate() {
                self.tmux_cmd(c, if i == done { Pending::Snap } else { Pending::Ignore });
            }
        }
    }

    fn snap_done(&mut self) {
        self.snap_in_flight = false;
        self.last_snap = Some(Instant::now());
    }

    fn list_panes(&mut self) {
        self.tmux_cmd(&ui::list_panes_command(), Pending::Panes);
    }

    fn on_tmux_stdout(&mut self) {
        let Some(t) = &mut self.tmux else { return };
        let fd = t.p.stdout.as_ref().unwrap().as_fd();
        let mut buf = Vec::new();
        let eof = proc::read_budget(fd, &mut buf, READ_BUDGET);
        t.parser.push(&buf);
        t.eof = eof;
        loop {
            let Some(t) = &mut self.tmux else { return };
            let Some(ev) = t.parser.next_event() else { break };
            self.on_tmux_event(ev);
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

    fn on_tmux_event(&mut self, ev: tmux::Event) {
        match ev {
            tmux::Event::Output { pane, data } => {
                if Some(pane) != self.tmux.as_ref().and_then(|t| t.shell) {
                    return;
                }
                if let Some(Err(e)) = self.rec.as_mut().map(|r| r.output(&data)) {
                    self.recording_failed(&e);
                }
                if let Some(o) = self.out() {
                    protocol::push_o(o, &data);
                }
            }
            // Replies to the command on tmux's own command line, not to lines we wrote.
            tmux::Event::End { flags, .. } | tmux::Event::Error { flags, .. } if flags & 1 == 0 => {}
            ev @ (tmux::Event::End { .. } | tmux::Event::Error { .. }) => {
                let (ok, body) = match ev {
                    tmux::Event::End { body, .. } => (true, body),
                    tmux::Event::Error { body, .. } => (false, body),
                    _ => unreachable!(),
                };
                let pending = self.tmux.as_mut().and_then(|t| t.pending.pop_front()).unwrap_or(Pending::Ignore);
                if matches!(pending, Pending::Snap) {
                    self.snap_done();
                }
                if !ok {
                    let b: Vec<String> = body.iter().map(|l| text::neutralize(l, 300)).collect();
                    self.log.line(&format!("tmux refused a command ({pending:?}): {}", b.join(" / ")));
                    return;
                }
                self.on_tmux_reply(pending, body);
            }
            tmux::Event::LayoutChange { .. } => self.list_panes(),
            tmux::Event::Pause(pane) => {
                // Output was held back while we were behind: support gets a fresh screen instead.
                self.log.line(&format!("tmux paused pane %{pane}: the link is slower than the shell"));
                self.tmux_cmd(&format!("refresh-client -A '%{pane}:continue'"), Pending::Ignore);
                if Some(pane) == self.tmux.as_ref().and_then(|t| t.shell) {
                    self.request_snap();
                }
            }
            tmux::Event::Exit(_) => self.begin_end(End::TmuxGone),
            _ => {}
        }
    }

    fn on_tmux_reply(&mut self, pending: Pending, body: Vec<Vec<u8>>) {
        match pending {
            Pending::Ignore => {}
            Pending::Panes => {
                let ui::Panes { shell: found, chat } = ui::parse_panes(&body);
                let Some(t) = &mut self.tmux else { return };
                t.chat = chat;
                let Some((id, w, h)) = found else {
                    // The launcher may still be tagging the panes: ask again shortly.
                    if t.shell.is_none() {
                        self.panes_retry_at = Some(Instant::now() + Duration::from_millis(50));
                    }
                    return;
                };
                let first = t.shell.is_none();
                let changed = t.size != (w, h);
                t.shell = Some(id);
                t.size = (w, h);
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
                    if self.link.is_none() && !self.ever_welcomed && self.end.is_none() {
                        self.retry_at = None;
                        self.connect();
                    }
                }
            }
            Pending::Snap => {
                let Some((c, r)) = self.tmux.as_ref().map(|t| t.size) else { return };
                // The screen comes in a file, not in the reply (see tmux::snap_commands).
                let file = self.dir.file("snap");
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
                        let fx = self.tunnel.abandon(&req);
                        self.apply(fx, protocol::CloseReason::Revoked);
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

    fn on_upgrade(&mut self, req: String, from: String, keys: Vec<u8>) {
        let from_shown = text::neutralize(from.as_bytes(), 64);
        let shown = fingerprints(&keys);
        self.mark_request(&req, &from_shown, &shown);
        // Keys are checked before anyone is asked: a request we could never honour needs no popup.
        if let Err(e) = authkeys::validate_keys(&keys) {
            self.log.line(&format!("tunnel request {req} from {from_shown} refused: {e}"));
            self.mark(Mark::Answer {
                req: &req,
                from: &from_shown,
                answer: Answer::Rejected(protocol::RejectReason::InvalidKey),
            });
            if let Some(o) = self.out() {
                protocol::push_tunnel_rejected(o, &req, protocol::RejectReason::InvalidKey);
            }
            return;
        }
        let n = self.next_ask;
        self.next_ask = self.next_ask % 999_999_999 + 1;
        self.requesters.push(Requester { req: req.clone(), n, from: from_shown.clone(), keys: shown });
        if self.requesters.len() > 64 {
            self.requesters.remove(0);
        }
        let fx = self.tunnel.upgrade(&req, &from_shown, keys);
        self.apply(fx, protocol::CloseReason::Revoked);
    }

    fn requester(&self, req: &str) -> String {
        self.requesters.iter().rev().find(|r| r.req == req).map(|r| r.from.clone()).unwrap_or_default()
    }

    /// What the customer is asked for request `req`.
    fn ask(&self, req: &str) -> Option<ui::Ask> {
        let r = self.requesters.iter().rev().find(|r| r.req == req)?;
        Some(ui::Ask {
            n: r.n,
            from: r.from.clone(),
            user: self.cfg.user.clone(),
            target: format!("{}:{}", self.cfg.target_host, self.cfg.target_port),
            keys: r.keys.clone(),
        })
    }

    /// Carry out what the tunnel state machine decided. `closed_as` names who closed the tunnel.
    fn apply(&mut self, effects: Vec<tunnel::Effect>, closed_as: protocol::CloseReason) {
        for fx in effects {
            match fx {
                tunnel::Effect::Popup { req, from } => self.popup(&req, &from),
                tunnel::Effect::Install { req, keys } => self.install(&req, &keys),
                tunnel::Effect::Reject { req, reason } => {
                    self.mark_answer(&req, Answer::Rejected(reason));
                    if reason == protocol::RejectReason::Denied {
                        let from = self.requester(&req);
                        self.chat_show(&format!("tunnel request from {from} denied"));
                    }
                    if let Some(o) = self.out() {
                        protocol::push_tunnel_rejected(o, &req, reason);
                    }
                }
                tunnel::Effect::OpenForward => {
                    if self.forward_port.is_none() {
                        let out = self.mux.request(mux::Op::Open);
                        self.on_mux(out);
                    }
                }
                tunnel::Effect::CancelForward => {
                    if self.forward_port.take().is_some() || self.mux.opening() {
                        let out = self.mux.request(mux::Op::Cancel);
                        self.on_mux(out);
                    }
                }
                tunnel::Effect::RemoveKeys => {
                    if self.remove_keys() {
                        self.chat_show("tunnel closed: support keys removed");
                    }
                }
                tunnel::Effect::Closed(reason) => {
                    let reason = if reason == protocol::CloseReason::Revoked { closed_as } else { reason };
                    self.mark(Mark::Closed(reason));
                    if let Some(o) = self.out() {
                        protocol::push_tunnel_closed(o, reason);
                    }
                }
            }
        }
        self.status_row();
    }

    fn popup(&mut self, req: &str, from: &str) {
        let (Some(features), Some(ask)) = (self.tmux.as_ref().map(|t| t.features), self.ask(req)) else {
            // No terminal to ask on (foreground --tunnel after a revoke): nobody can say yes.
            self.tell(&format!("tunnel request from {from} denied: no terminal to confirm it on"));
            let fx = self.tunnel.answer(req, false);
            self.apply(fx, protocol::CloseReason::Revoked);
            return;
        };
        // The chat pane says the same as the popup, so a dismissed popup loses nothing.
        let width =
            self.tmux.as_ref().map_or(ui::SCREEN_COLS, |t| usize::from(t.size.0)).clamp(40, ui::SCREEN_COLS) - 2;
        self.chat_show(&format!("tunnel request {}:", ask.n));
        for line in ui::ask_lines(&ask, width) {
            self.chat_show(&format!("  {line}"));
        }
        self.chat_show(&format!("  {}", ui::answer_hint(&features)));
        let cmd = self.popup_command(&ask, &features);
        self.show_popup(req, cmd, false);
    }

    fn popup_command(&self, ask: &ui::Ask, features: &tmux::Features) -> String {
        let exe = std::env::current_exe().unwrap_or_else(|_| PathBuf::from("linbit-tunl"));
        ui::upgrade_prompt_command(&exe, &self.dir.path, ask, features)
    }

    fn show_popup(&mut self, req: &str, cmd: String, again: bool) {
        self.popup_again_at = Some(Instant::now() + POPUP_AGAIN);
        self.tmux_cmd(&ui::list_clients_command(), Pending::Clients { req: req.to_string(), cmd, again });
    }

    /// A granted request. Transactional (F7): the forward comes first, the keys are written only once
    /// it is up, and `installed` changes only after the file did; a failure at any step leaves the
    /// file as it was and answers the request `error`.
    fn install(&mut self, req: &str, keys: &[u8]) {
        let keys = match authkeys::validate_keys(keys) {
            Ok(k) => k,
            Err(_) => {
                let fx = self.tunnel.failed(req, protocol::RejectReason::InvalidKey);
                return self.apply(fx, protocol::CloseReason::Revoked);
            }
        };
        if self.forward_port.is_some() {
            return self.commit_keys(vec![(req.to_string(), keys)]);
        }
        if self.state != LinkState::Up || self.awaiting.len() >= tunnel::MAX_QUEUED {
            // No master to forward through (the link is down), or too many grants in flight.
            self.log.line(&format!("tunnel request {req}: no forward can be opened now"));
            let fx = self.tunnel.failed(req, protocol::RejectReason::Error);
            return self.apply(fx, protocol::CloseReason::Revoked);
        }
        self.awaiting.push((req.to_string(), keys));
        let out = self.mux.request(mux::Op::Open);
        self.on_mux(out);
    }

    /// Write the block with the keys of `batch` added, then announce each request.
    fn commit_keys(&mut self, batch: Vec<(String, Vec<String>)>) {
        if batch.is_empty() {
            return;
        }
        let Some(port) = self.forward_port else { return self.fail_batch(batch) };
        let mut all = self.installed.clone();
        for k in batch.iter().flat_map(|(_, keys)| keys) {
            // A key granted again (a second request of the same engineer) is in the block once.
            if !all.contains(k) {
                all.push(k.clone());
            }
        }
        if let Err(e) = self.keys.write(&all) {
            self.tell(&format!("cannot install support keys: {e}"));
            return self.fail_batch(batch);
        }
        self.installed = all;
        let user = self.cfg.user.clone();
        for (req, _) in batch {
            self.tunnel.opened(&req);
            self.mark_answer(&req, Answer::Granted { port });
            let from = self.requester(&req);
            self.chat_show(&format!("tunnel granted to {from}: support can log in as {user}"));
            if let Some(o) = self.out() {
                protocol::push_tunnel_open(o, &req, port, &user);
            }
        }
        self.send_state();
        self.status_row();
    }

    fn fail_batch(&mut self, batch: Vec<(String, Vec<String>)>) {
        for (req, _) in batch {
            let fx = self.tunnel.failed(&req, protocol::RejectReason::Error);
            self.apply(fx, protocol::CloseReason::Revoked);
        }
    }

    fn fail_awaiting(&mut self) {
        let batch = std::mem::take(&mut self.awaiting);
        self.fail_batch(batch);
    }

    /// What the finished `ssh -O` clients did.
    fn on_mux(&mut self, outcomes: Vec<mux::Outcome>) {
        for o in outcomes {
            match o {
                mux::Outcome::Opened(port) if self.mux.cancel_ahead() => {
                    // Revoked while it was opening: the queued cancel closes it; nothing waits for it.
                    self.log.line(&format!("reverse tunnel on relay port {port} opened after a revoke: closing"));
                    self.fail_awaiting();
                }
                mux::Outcome::Opened(port) => {
                    self.forward_port = Some(port);
                    self.tunnel.forward_opened();
                    self.mark(Mark::ForwardOpen { port });
                    self.tell(&format!("reverse tunnel open on relay port {port}"));
                    // After a reconnect: the tunnels that were open are open again, on the new port.
                    let user = self.cfg.user.clone();
                    for req in self.tunnel.open_reqs().to_vec() {
                        if let Some(o) = self.out() {
                            protocol::push_tunnel_open(o, &req, port, &user);
                        }
                    }
                    let batch = std::mem::take(&mut self.awaiting);
                    self.commit_keys(batch);
                }
                mux::Outcome::OpenFailed(why) => {
                    self.log.line(&why);
                    self.fail_awaiting();
                    let fx = self.tunnel.forward_failed();
                    if !fx.is_empty() {
                        self.tell("the reverse tunnel could not be opened again: support keys removed");
                    }
                    self.apply(fx, protocol::CloseReason::Relay);
                    self.send_state();
                }
                mux::Outcome::Cancelled(Some(e)) => self.log.line(&format!("ssh -O cancel failed: {e}")),
                mux::Outcome::Cancelled(None) => self.log.line("reverse tunnel closed"),
            }
        }
    }

    /// Whether the keys are gone (verified by reading the file again).
    fn remove_keys(&mut self) -> bool {
        let had = !std::mem::take(&mut self.installed).is_empty();
        // On failure the journal stays in the session directory: the launcher tries again at the
        // end and, if the keys are still there, tells the customer which lines to delete (F12).
        match self.keys.remove() {
            Ok(()) => {
                if had {
                    self.mark(Mark::KeysRemoved);
                }
                true
            }
            Err(left) => {
                self.mark(Mark::KeysLeft);
                for line in left.message() {
                    self.log.line(&line);
                    self.chat_show(&line);
                }
                false
            }
        }
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
            ["grant"] => {
                let r = self.tunnel.grant();
                self.customer_tunnel("grant", r, |t| match t.state() {
                    tunnel::State::Allowed => "tunnel requests will be granted without asking (Ctrl-b U to undo)",
                    tunnel::State::Confirm => "tunnel requests unblocked: you will be asked for each",
                    _ => "tunnel already open",
                });
            }
            ["revoke"] => {
                let r = self.tunnel.revoke();
                self.customer_tunnel("revoke", r, |_| "tunnel revoked: each request will be asked for again");
            }
            ["block"] => {
                let r = self.tunnel.block();
                self.customer_tunnel("block", r, |_| "tunnel requests blocked (Ctrl-b u to unblock)");
            }
            ["brb"] => match self.tunnel.set_brb(true) {
                Ok(()) => {
                    self.mark(Mark::Brb(true));
                    self.chat_show("BRB: support keystrokes are paused; /back to resume");
                    self.send_state();
                    self.status_row();
                }
                Err(e) => self.chat_show(e),
            },
            ["back"] => {
                if self.tunnel.brb() {
                    let _ = self.tunnel.set_brb(false);
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
                let req = self.requesters.iter().rev().find(|r| Some(r.n) == n).map(|r| r.req.clone());
                let Some(req) = req else {
                    return self.log.line("ctl: answer for an unknown request dropped");
                };
                let fx = self.tunnel.answer(&req, *verdict == "grant");
                self.apply(fx, protocol::CloseReason::Revoked);
                self.send_state();
            }
            ["respawn"] => {
                // Ctrl-b L: tmux already re-applied the layout; bring back a chat pane that died.
                if let Some((shell, chat, f)) = self.tmux.as_ref().and_then(|t| Some((t.shell?, t.chat, t.features))) {
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

    /// Carry out the customer's tunnel decision (Ctrl-b u/U/X or the menu) and tell them what it did.
    fn customer_tunnel(
        &mut self,
        word: &str,
        r: Result<Vec<tunnel::Effect>, &'static str>,
        said: fn(&Tunnel) -> &'static str,
    ) {
        match r {
            Ok(fx) => {
                self.mark(Mark::Decision { word, state: self.tunnel.state() });
                self.apply(fx, protocol::CloseReason::Revoked);
                self.chat_show(said(&self.tunnel));
                self.send_state();
            }
            Err(e) => self.chat_show(e),
        }
    }

    // ---- ending -------------------------------------------------------------------------------

    fn fatal(&mut self, msg: &str) {
        self.tell(msg);
        if self.end_why.is_empty() {
            self.end_why = msg.to_string();
        }
        if !self.ever_welcomed {
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
        if self.tunnel.state() == tunnel::State::Active {
            self.mark(Mark::Closed(protocol::CloseReason::Ended));
            if let Some(o) = self.out() {
                protocol::push_tunnel_closed(o, protocol::CloseReason::Ended);
            }
        }
        let _ = self.remove_keys();
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
        self.mux.reset();
        self.flush_link(deadline.saturating_duration_since(Instant::now()).min(Duration::from_secs(2)));
        if let Some(mut l) = self.link.take() {
            // BYE is out: the master may go. Closing its stdin ends it; a master that lingers (a
            // relay that keeps the channel open) gets SIGTERM, then SIGKILL, within the budget.
            drop(l.p.stdin.take());
            let left = || deadline.saturating_duration_since(Instant::now());
            if proc::wait_exit(&mut l.p.child, left().min(Duration::from_secs(1))).is_none() {
                if let Some(pid) = rustix::process::Pid::from_raw(l.p.child.id() as i32) {
                    let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
                }
                proc::wait_exit(&mut l.p.child, left().min(Duration::from_secs(1)));
            }
            let _ = l.p.child.kill();
            let _ = l.p.child.wait();
        }
        let why = std::mem::take(&mut self.end_why);
        self.mark(Mark::End { end, why: &why });
        if let Some(r) = self.rec.take() {
            let _ = r.finish();
        }
        if !self.ever_welcomed {
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
        if let Some(mut t) = self.tmux.take() {
            drop(t.p.stdin.take());
            let _ = t.p.child.kill();
            let _ = t.p.child.wait();
        }
        if let Some(c) = &mut self.console {
            // What the terminal has not taken by then is lost: the budget is for the keys, not for it.
            c.flush_until(deadline.min(Instant::now() + Duration::from_secs(1)));
        }
        end
    }

    fn flush_link(&mut self, limit: Duration) {
        let deadline = Instant::now() + limit;
        while let Some(l) = &mut self.link {
            if l.out_off >= l.outq.len() || Instant::now() >= deadline {
                break;
            }
            let Some(stdin) = &l.p.stdin else { break };
            if proc::write_some(stdin.as_fd(), &l.outq, &mut l.out_off).is_err() {
                break;
            }
            if l.out_off < l.outq.len() {
                let fd = stdin.as_fd();
                let mut pfd = [PollFd::new(&fd, PollFlags::OUT)];
                let _ = rustix::event::poll(&mut pfd, Some(&ts(Duration::from_millis(50))));
            }
        }
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
        let mut cmd = Command::new("tmux");
        cmd.arg("-S").arg(sock).env_remove("TMUX").args(["-C", "attach-session"]);
        if features.ignore_size {
            // A control client has no screen: it must never shrink the customer's windows.
            cmd.args(["-f", "ignore-size"]);
        }
        cmd.args(["-t", &features.exact(session)]);
        let p = proc::spawn(&mut cmd, false).map_err(|e| format!("cannot start the tmux control client: {e}"))?;
        let t = TmuxSide {
            p,
            parser: tmux::ControlParser::new(),
            outq: Vec::new(),
            out_off: 0,
            pending: VecDeque::new(),
            shell: None,
            chat: None,
            size: (80, 24),
            features,
            eof: false,
        };
        self.tmux = Some(t);
        for c in first {
            self.tmux_cmd(c, Pending::Ignore);
        }
        if features.flow_control {
            // tmux >= 3.2 pauses a pane whose output this client is more than this many seconds
            // behind on, instead of buffering without bound; we resume it and resynchronise.
            self.tmux_cmd(&format!("refresh-client -f pause-after={PAUSE_AFTER_SECS}"), Pending::Ignore);
        }
        self.list_panes();
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
            self.retry_at = Some(Instant::now() + Duration::from_secs(5));
        } else {
            self.connect();
        }
        self.status_row();
        while self.end.is_none() {
            self.step();
        }
        (self.shutdown(), self.ever_welcomed)
    }

    pub fn into_dir(self) -> SessionDir {
        self.dir
    }

    fn next_timeout(&self) -> Option<Duration> {
        let now = Instant::now();
        let mut next: Option<Instant> = None;
        let mut at = |t: Instant| next = Some(next.map_or(t, |n| n.min(t)));
        if let Some(r) = self.retry_at {
            at(r);
        }
        if let Some(r) = self.panes_retry_at {
            at(r);
        }
        if let Some(r) = self.mux.deadline() {
            at(r);
        }
        if let Some(r) = self.snap_at.filter(|_| !self.snap_in_flight) {
            at(r);
        }
        if let Some(r) = self.popup_again_at {
            at(r);
        }
        if let Some(r) = self.keys.renew_at() {
            at(r);
        }
        if let Some(l) = &self.link {
            match self.state {
                LinkState::Up => {
                    if let Some(s) = l.stalled_since {
                        at(s + STALL_LIMIT);
                    }
                    at(l.last_tx + PING_AFTER);
                    at(l.last_rx.max(l.last_ping) + PING_AFTER);
                    at(l.last_rx + SILENCE_LIMIT);
                }
                LinkState::Connecting => at(l.started + WELCOME_TIMEOUT),
                LinkState::Down => {}
            }
        }
        next.map(|n| n.saturating_duration_since(now))
    }

    fn on_timers(&mut self) {
        let now = Instant::now();
        if !self.snap_in_flight && self.snap_at.is_some_and(|r| now >= r) {
            self.snap_at = None;
            self.request_snap();
        }
        if self.mux.deadline().is_some_and(|d| now >= d) {
            let out = self.mux.poll(now);
            self.on_mux(out);
        }
        if self.keys.renew_at().is_some_and(|r| now >= r) {
            if let Err(e) = self.keys.renew() {
                self.log.line(&format!("cannot renew the expiry of the support keys: {e}"));
            }
        }
        if self.panes_retry_at.is_some_and(|r| now >= r) {
            self.panes_retry_at = None;
            self.list_panes();
        }
        if self.popup_again_at.is_some_and(|r| now >= r) {
            self.popup_again_at = None;
            let f = self.tmux.as_ref().map(|t| t.features);
            if let (Some((req, _)), Some(f)) = (self.tunnel.on_screen(), f) {
                if let Some(ask) = self.ask(&req) {
                    let cmd = self.popup_command(&ask, &f);
                    self.show_popup(&req, cmd, true);
                }
            }
        }
        if let Some(r) = self.retry_at {
            if now >= r {
                self.retry_at = None;
                self.connect();
            }
        }
        let Some(l) = &self.link else { return };
        match self.state {
            LinkState::Up if now >= l.last_rx + SILENCE_LIMIT => self.link_lost("no answer from the relay for 45 s"),
            LinkState::Up if l.stalled_since.is_some_and(|s| now >= s + STALL_LIMIT) => {
                self.link_lost("the relay took nothing from us for 45 s")
            }
            // A PING after 15 s of not sending (the contract), and also after 15 s of hearing
            // nothing while we send a lot: a relay that only answers must get something to answer
            // before the 45 s silence limit, or a busy shell would look like a dead link.
            LinkState::Up if now >= l.last_tx + PING_AFTER || now >= l.last_rx.max(l.last_ping) + PING_AFTER => {
                if let Some(l) = &mut self.link {
                    l.last_ping = now;
                }
                self.ping_n += 1;
                let n = self.ping_n;
                if let Some(o) = self.out() {
                    protocol::push_ping(o, n);
                }
            }
            LinkState::Connecting if now >= l.started + WELCOME_TIMEOUT => {
                self.link_lost("the relay did not answer the hello")
            }
            _ => {}
        }
    }

    fn step(&mut self) {
        // Write what we can before sleeping: most of the time the pipes take everything at once.
        self.pump_writes();
        let timeout = self.next_timeout();
        let sigfd = self.sig.fd();
        let mut fds: Vec<PollFd<'_>> = vec![PollFd::new(&sigfd, PollFlags::IN)];
        let mut roles: Vec<Role> = vec![Role::Signal];
        let backlog = self.link.as_ref().map(|l| l.outq.len() - l.out_off).unwrap_or(0);
        let link = self.link.as_ref();
        let tmux = self.tmux.as_ref();
        let cands: [(Option<BorrowedFd<'_>>, Role, PollFlags); 7] = [
            (
                link.filter(|l| !l.stdout_eof).and_then(|l| l.p.stdout.as_ref()).map(|f| f.as_fd()),
                Role::LinkOut,
                PollFlags::IN,
            ),
            (
                link.filter(|l| !l.stderr_eof).and_then(|l| l.p.stderr.as_ref()).map(|f| f.as_fd()),
                Role::LinkErr,
                PollFlags::IN,
            ),
            (
                link.filter(|l| l.out_off < l.outq.len()).and_then(|l| l.p.stdin.as_ref()).map(|f| f.as_fd()),
                Role::LinkIn,
                PollFlags::OUT,
            ),
            // A full queue towards the relay stops us reading the pane: backpressure, not memory.
            (
                tmux.filter(|t| !t.eof && backlog < OUTQ_HIGH).and_then(|t| t.p.stdout.as_ref()).map(|f| f.as_fd()),
                Role::TmuxOut,
                PollFlags::IN,
            ),
            (
                tmux.filter(|t| t.out_off < t.outq.len()).and_then(|t| t.p.stdin.as_ref()).map(|f| f.as_fd()),
                Role::TmuxIn,
                PollFlags::OUT,
            ),
            (self.ctl.as_ref().map(|f| f.as_fd()), Role::Ctl, PollFlags::IN),
            (self.console.as_ref().filter(|c| c.waiting() > 0).map(|c| c.fd()), Role::Console, PollFlags::OUT),
        ];
        for (fd, role, flags) in cands {
            if let Some(fd) = fd {
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
        let mut broken = false;
        if let Some(l) = &mut self.link {
            let before = l.out_off;
            if l.out_off < l.outq.len() {
                if let Some(stdin) = &l.p.stdin {
                    broken = proc::write_some(stdin.as_fd(), &l.outq, &mut l.out_off).is_err();
                }
            }
            // A relay that stopped reading shows as a queue that does not move (F3).
            if l.out_off > before || l.out_off == l.outq.len() {
                l.stalled_since = None;
            } else if l.stalled_since.is_none() {
                l.stalled_since = Some(Instant::now());
            }
            if l.out_off == l.outq.len() {
                l.outq.clear();
                l.out_off = 0;
            } else if l.out_off > (1 << 20) {
                l.outq.drain(..l.out_off);
                l.out_off = 0;
            }
        }
        if broken {
            self.link_lost("ssh stopped reading");
        }
        if let Some(t) = &mut self.tmux {
            if t.out_off < t.outq.len() {
                if let Some(stdin) = &t.p.stdin {
                    let _ = proc::write_some(stdin.as_fd(), &t.outq, &mut t.out_off);
                }
            }
            if t.out_off == t.outq.len() {
                t.outq.clear();
                t.out_off = 0;
            } else if t.out_off > (1 << 20) {
                t.outq.drain(..t.out_off);
                t.out_off = 0;
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
        let out = self.mux.poll(Instant::now());
        self.on_mux(out);
        let exited = self.link.as_mut().map(|l| matches!(l.p.child.try_wait(), Ok(Some(_)))).unwrap_or(false);
        if exited {
            // Read what is left first: an ERROR line may be waiting in the pipe.
            self.on_link_stderr();
            self.on_link_stdout();
            if self.link.is_some() {
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

/// The keys of a tunnel request as `ssh-keygen -lf` prints them; none if they are not valid.
fn fingerprints(keys: &[u8]) -> Vec<String> {
    authkeys::validate_keys(keys)
        .unwrap_or_default()
        .iter()
        .map(|k| ui::fingerprint(k).unwrap_or_else(|| "(a key ssh-keygen would not fingerprint)".into()))
        .collect()
}

fn ts(d: Duration) -> rustix::event::Timespec {
    rustix::event::Timespec { tv_sec: d.as_secs() as i64, tv_nsec: d.subsec_nanos() as i64 }
}

pub fn now_unix() -> u64 {
    crate::sessiondir::now().0
}

/// A fraction in [0, 1) for back-off jitter; not security relevant.
fn random_fraction() -> f64 {
    let mut b = [0u8; 4];
    let _ = rand_core::RngCore::try_fill_bytes(&mut rand_core::OsRng, &mut b);
    u32::from_le_bytes(b) as f64 / (u32::MAX as f64 + 1.0)
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
