//! `tunl-relay broker SID`: one process per live session, one poll loop, no threads.
//!
//! It listens on `customer.sock` (the session's `produce`, one at a time) and `support.sock`
//! (engineers' `tunl-relay support`: viewers and one-shot commands), fans the customer's output out
//! to every viewer in order, routes the engineers' lines to the customer, records and audits.
//!
//! Why one loop and bounded queues: the customer's shell must never wait for a viewer (upterm's
//! writer fans out synchronously, so one stalled viewer stalls the host; tmate leaves it to tmux's
//! per-client buffers). Here every peer has its own bounded [`OutQueue`]; the broker reads the
//! customer as fast as it writes, shares each line between queues, and drops a viewer whose queue
//! is full (`REFUSED what=O reason=slow`). Nothing in the loop blocks: sockets are non-blocking,
//! files are written through a buffer.

use std::collections::{BTreeMap, HashMap};
use std::io::{self, Read};
use std::os::fd::AsFd;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::{Duration, Instant};

use rustix::event::{PollFd, PollFlags, Timespec, poll};
use serde_json::json;
use tunl_wire::{self as wire, Piece, Splitter};

use crate::audit::Audit;
use crate::conn::Conn;
use crate::from_customer::{self, CustomerMsg};
use crate::from_viewer::{self, Opening, ViewerMsg};
use crate::hello::{self, Hello, Mode};
use crate::outq::OutQueue;
use crate::recording::Recording;

/// Each viewer's output queue (docs/architecture.md, "Bounds").
pub const VIEWER_QUEUE: usize = 4 << 20;
/// The customer's queue: keystrokes are rate-limited, so a full one means the customer's link is
/// stuck; the customer is then disconnected and reconnects.
const CUSTOMER_QUEUE: usize = 4 << 20;
/// A one-shot command's or a not yet identified peer's queue.
const SMALL_QUEUE: usize = 64 << 10;
/// Keystrokes from one viewer, bytes per second (and burst).
pub const KEY_RATE: f64 = 64.0 * 1024.0;
const MAX_VIEWERS: usize = 64;
const MAX_OPENING: usize = 32;
const MAX_UPGRADES: usize = 16;
/// How long a peer may take for its first line.
const OPENING_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a closing peer gets to take its last lines.
const CLOSE_GRACE: Duration = Duration::from_secs(2);
/// A REFRESH not answered within this is asked again on the next join.
const REFRESH_WAIT: Duration = Duration::from_secs(5);
/// How long a one-shot `upgrade` waits for the customer's answer.
const UPGRADE_WAIT: Duration = Duration::from_secs(300);
const KEYS_AUDIT_EVERY: Duration = Duration::from_secs(10);
const ALIVE_EVERY: Duration = Duration::from_secs(60);
const READ_CHUNK: usize = 64 << 10;

/// What the broker writes to the session registry. A narrow interface of the broker's own so the
/// registry's backend does not matter here; failures are the implementation's to log.
pub trait SessionSink {
    /// The customer is connected: host, user, the session's state word, and how (`connected`,
    /// `reconnected`, `takeover` of a link presumed dead).
    fn connected(&mut self, hello: &Hello, state: &str, how: &str);
    /// A customer's hello was refused by the broker (`busy`: another customer holds the session).
    fn refused(&mut self, hello: &Hello, code: &str);
    /// The state word changed (`share`, `restricted`, `share+tunnel`, `tunnel`).
    fn state(&mut self, state: &str);
    fn viewers(&mut self, names: &[String]);
    fn tunnel_port(&mut self, port: Option<u16>);
    /// The session ended: `word` is `closed` (by support), `customer` (the customer ended it) or
    /// `expired`; `why` is for people.
    fn ended(&mut self, word: &str, why: &str);
    /// Once a minute: a sign of life while the customer is connected (idle expiry counts from
    /// it). False when the session has ended elsewhere (`expire`, `cancel`): the broker ends too.
    fn alive(&mut self, customer_connected: bool) -> bool;
}

/// A sink that records nothing (for tests that do not look at the registry).
pub struct NoSink;
impl SessionSink for NoSink {
    fn connected(&mut self, _: &Hello, _: &str, _: &str) {}
    fn refused(&mut self, _: &Hello, _: &str) {}
    fn state(&mut self, _: &str) {}
    fn viewers(&mut self, _: &[String]) {}
    fn tunnel_port(&mut self, _: Option<u16>) {}
    fn ended(&mut self, _: &str, _: &str) {}
    fn alive(&mut self, _: bool) -> bool {
        true
    }
}

pub struct BrokerConfig {
    pub sid: String,
    /// `RUN/s/SID`: the sockets and the lock.
    pub run_dir: PathBuf,
    pub recording: PathBuf,
    pub audit: PathBuf,
    /// The group of the support accounts, owner group of `support.sock`.
    pub support_gid: Option<u32>,
    /// The session was created restricted: only `mode=restricted` is served.
    pub restricted_only: bool,
    pub case: String,
    pub customer: String,
    /// With no customer and no viewer for this long, the broker exits (the session stays; the next
    /// `produce` starts a new broker).
    pub linger: Duration,
}

pub fn customer_sock(run_dir: &Path) -> PathBuf {
    run_dir.join("customer.sock")
}
pub fn support_sock(run_dir: &Path) -> PathBuf {
    run_dir.join("support.sock")
}

struct Viewer {
    name: String,
    ro: bool,
    tokens: f64,
    refilled: Instant,
    keys: u64,
    keys_logged: u64,
}

enum Role {
    /// On `customer.sock`, before the hello.
    CustomerHello,
    Customer,
    /// On `support.sock`, before `HELLO role=...`; the name is from `SO_PEERCRED`.
    Opening {
        name: String,
    },
    Viewer(Viewer),
    /// A one-shot command; `waiting` is set while its upgrade is pending.
    Command {
        name: String,
        done: bool,
        waiting: bool,
    },
}

struct Peer {
    stream: Conn,
    split: Splitter,
    out: OutQueue,
    role: Role,
    since: Instant,
    /// Set when the peer is on its way out: no more reading, flush then drop at the deadline.
    closing: Option<Instant>,
    /// Its socket took less than was queued: no write is tried until poll says it can take more
    /// (fifty stalled viewers would otherwise cost fifty failed writes per customer line).
    full: bool,
}

impl Peer {
    fn new(stream: Conn, cap: usize, role: Role) -> Peer {
        Peer {
            stream,
            split: Splitter::default(),
            out: OutQueue::new(cap),
            role,
            since: Instant::now(),
            closing: None,
            full: false,
        }
    }
    fn name(&self) -> &str {
        match &self.role {
            Role::Viewer(v) => &v.name,
            Role::Opening { name } | Role::Command { name, .. } => name,
            Role::Customer | Role::CustomerHello => "customer",
        }
    }
}

fn line(s: String) -> Rc<[u8]> {
    let mut v = s.into_bytes();
    v.push(b'\n');
    Rc::from(v)
}

fn raw_line(bytes: &[u8]) -> Rc<[u8]> {
    let mut v = Vec::with_capacity(bytes.len() + 1);
    v.extend_from_slice(bytes);
    v.push(b'\n');
    Rc::from(v)
}

/// One operational event on stderr (`crate::log`: one structured line; journald's stream in
/// production, `STATE/audit/SID.log` otherwise, see `produce`). The audit log is the session's
/// record; these are for whoever runs the relay.
fn warn(sid: &str, ev: &str, fields: &[(&str, &str)]) {
    let mut f = vec![("id", sid)];
    f.extend_from_slice(fields);
    crate::log::warn(ev, &f);
}

fn info(sid: &str, ev: &str, fields: &[(&str, &str)]) {
    let mut f = vec![("id", sid)];
    f.extend_from_slice(fields);
    crate::log::info(ev, &f);
}

pub struct Broker {
    cfg: BrokerConfig,
    sink: Box<dyn SessionSink>,
    customer_listener: UnixListener,
    support_listener: UnixListener,
    _lock: std::fs::File,
    peers: BTreeMap<u64, Peer>,
    next_id: u64,
    customer: Option<u64>,
    hello: Option<Hello>,
    mode: Mode,
    brb: bool,
    tunnel: String,
    state_word: String,
    size: (u16, u16),
    last_snap: Option<Rc<[u8]>>,
    last_state: Option<Rc<[u8]>>,
    note: Option<Rc<[u8]>>,
    refresh_asked: Option<Instant>,
    /// Broker request ID (`u1`, ...) -> (peer, the engineer's own request ID).
    upgrades: HashMap<String, (u64, String, Instant)>,
    next_upgrade: u64,
    audit: Audit,
    recording: Option<Recording>,
    ended: Option<Instant>,
    idle_since: Instant,
    keys_audited: Instant,
    alive_told: Instant,
    viewer_names: Vec<String>,
    /// The customer's ssh channel (this process is its `produce`) has gone: see [`Broker::detach`].
    detach: bool,
}

impl Broker {
    /// Takes the session's lock (a second broker for the same session exits here), binds both
    /// sockets, opens the audit log.
    pub fn bind(cfg: BrokerConfig, sink: Box<dyn SessionSink>) -> io::Result<Broker> {
        // Born 0750 so that no chmod is needed below (see there); setgid comes from RUN/s.
        std::fs::DirBuilder::new().recursive(true).mode(0o750).create(&cfg.run_dir)?;
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(cfg.run_dir.join("broker.lock"))?;
        rustix::fs::flock(&lock, rustix::fs::FlockOperation::NonBlockingLockExclusive)
            .map_err(|_| io::Error::new(io::ErrorKind::AddrInUse, "another broker serves this session"))?;
        // The holder's pid, for operators (and tests) who must find the broker.
        write_pid(&lock)?;
        let bind = |path: PathBuf, mode: u32, gid: Option<u32>| -> io::Result<UnixListener> {
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
            let l = UnixListener::bind(&path)
                .map_err(|e| io::Error::new(e.kind(), format!("binding {}: {e}", path.display())))?;
            if let Some(g) = gid {
                rustix::fs::chown(&path, None, Some(rustix::fs::Gid::from_raw(g)))?;
            }
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode))?;
            l.set_nonblocking(true)?;
            Ok(l)
        };
        let customer_listener = bind(customer_sock(&cfg.run_dir), 0o600, None)?;
        let support_listener = bind(support_sock(&cfg.run_dir), 0o660, cfg.support_gid)?;
        if let Some(g) = cfg.support_gid {
            // Engineers reach support.sock through this directory.
            let _ = rustix::fs::chown(&cfg.run_dir, None, Some(rustix::fs::Gid::from_raw(g)));
            // A chmod by the customers' account (not in the support group) clears the setgid bit
            // the directory inherited from RUN/s; without it the sockets of the session's next
            // broker (a resume after a relay restart) are born in the customers' group and
            // their chown to the support group fails with EPERM: the customer could never come
            // back. Change the mode only when it is wrong (a chmod cannot keep setgid for us).
            let mode = std::fs::metadata(&cfg.run_dir)?.permissions().mode();
            if mode & 0o777 != 0o750 {
                std::fs::set_permissions(&cfg.run_dir, std::fs::Permissions::from_mode(0o750 | (mode & 0o2000)))?;
            }
        }
        let audit = Audit::open(&cfg.audit)?;
        give_group(&cfg.audit, cfg.support_gid);
        let now = Instant::now();
        Ok(Broker {
            mode: if cfg.restricted_only { Mode::Restricted } else { Mode::Share },
            cfg,
            sink,
            customer_listener,
            support_listener,
            _lock: lock,
            peers: BTreeMap::new(),
            next_id: 1,
            customer: None,
            hello: None,
            brb: false,
            tunnel: "off".into(),
            state_word: "pending".into(),
            size: (0, 0),
            last_snap: None,
            last_state: None,
            note: None,
            refresh_asked: None,
            upgrades: HashMap::new(),
            next_upgrade: 1,
            audit,
            recording: None,
            ended: None,
            idle_since: now,
            keys_audited: now,
            alive_told: now,
            viewer_names: Vec::new(),
            detach: false,
        })
    }

    fn audit(&mut self, ev: &str, fields: serde_json::Value) {
        if let Err(e) = self.audit.record(ev, fields) {
            warn(
                &self.cfg.sid,
                "audit-failed",
                &[("path", &self.cfg.audit.display().to_string()), ("error", &e.to_string())],
            );
        }
    }

    /// Runs until the session ends or the broker has lingered idle.
    pub fn run(mut self) -> io::Result<()> {
        loop {
            let now = Instant::now();
            self.timers(now);
            if self.finished(now) {
                break;
            }
            let ids: Vec<u64> = self.peers.keys().copied().collect();
            let mut fds = Vec::with_capacity(ids.len() + 2);
            let listen = if self.ended.is_some() { PollFlags::empty() } else { PollFlags::IN };
            fds.push(PollFd::new(&self.customer_listener, listen));
            fds.push(PollFd::new(&self.support_listener, listen));
            // Per peer: the index of its read descriptor, and of its write descriptor when separate.
            let mut at = Vec::with_capacity(ids.len());
            for id in &ids {
                let p = &self.peers[id];
                let mut f = PollFlags::empty();
                if p.closing.is_none() {
                    f |= PollFlags::IN;
                }
                let out = if p.out.is_empty() { PollFlags::empty() } else { PollFlags::OUT };
                let r = fds.len();
                match p.stream.separate_write_fd() {
                    None => fds.push(PollFd::from_borrowed_fd(p.stream.read_fd(), f | out)),
                    Some(w) => {
                        fds.push(PollFd::from_borrowed_fd(p.stream.read_fd(), f));
                        fds.push(PollFd::from_borrowed_fd(w, out));
                    }
                }
                at.push((r, p.stream.separate_write_fd().map(|_| r + 1)));
            }
            let timeout = Timespec { tv_sec: 1, tv_nsec: 0 };
            match poll(&mut fds, Some(&timeout)) {
                Ok(_) => {}
                Err(rustix::io::Errno::INTR) => continue,
                Err(e) => return Err(e.into()),
            }
            let ready: Vec<PollFlags> = fds.iter().map(|f| f.revents()).collect();
            drop(fds);
            if !ready[0].is_empty() {
                self.accept_customer();
            }
            if !ready[1].is_empty() {
                self.accept_support();
            }
            for (id, (r, w)) in ids.iter().zip(at) {
                if ready[w.unwrap_or(r)].intersects(PollFlags::OUT | PollFlags::HUP | PollFlags::ERR)
                    && let Some(p) = self.peers.get_mut(id)
                {
                    p.full = false;
                }
                if ready[r].intersects(PollFlags::IN | PollFlags::HUP | PollFlags::ERR) {
                    self.read_peer(*id);
                }
                // The reader of the ssh channel's stdout is gone: so is the customer.
                if w.is_some_and(|w| ready[w].intersects(PollFlags::HUP | PollFlags::ERR)) {
                    self.peer_eof(*id);
                }
            }
            self.flush_all();
            if let Some(rec) = &mut self.recording
                && let Err(e) = rec.flush()
            {
                warn(&self.cfg.sid, "recording-failed", &[("error", &e.to_string())]);
            }
            if std::mem::take(&mut self.detach) {
                self.detach()?;
            }
        }
        self.audit_keys();
        if let Some(rec) = &mut self.recording {
            let _ = rec.flush();
        }
        let _ = std::fs::remove_file(customer_sock(&self.cfg.run_dir));
        let _ = std::fs::remove_file(support_sock(&self.cfg.run_dir));
        Ok(())
    }

    /// Serves the customer whose `produce` is this process: `conn` is its ssh channel, `hello` the
    /// line it sent (which `produce` has checked against the registry). One process per session
    /// instead of a `produce` copying lines to a broker (docs/architecture.md, "One process").
    pub fn adopt_customer(&mut self, conn: Conn, hello: &[u8]) {
        let id = self.insert_peer(conn, SMALL_QUEUE, Role::CustomerHello);
        self.on_customer_hello(id, hello);
    }

    /// sshd ends a customer's connection only when its child, this process, exits: with the
    /// channel gone the broker goes on in a child of its own (the viewers stay joined for the
    /// reconnect) and the process sshd knows exits. Single-threaded, so fork is safe here.
    fn detach(&mut self) -> io::Result<()> {
        // SAFETY: fork in a single-threaded process; the parent only calls _exit.
        match unsafe { libc::fork() } {
            -1 => Err(io::Error::last_os_error()),
            0 => {
                // SAFETY: setsid has no preconditions; it fails harmlessly if already a leader.
                unsafe { libc::setsid() };
                write_pid(&self._lock)
            }
            // SAFETY: _exit skips destructors: the sockets and the lock belong to the child now.
            _ => unsafe { libc::_exit(0) },
        }
    }

    fn finished(&self, now: Instant) -> bool {
        if let Some(at) = self.ended {
            return self.peers.values().all(|p| p.out.is_empty()) || now.duration_since(at) > CLOSE_GRACE;
        }
        self.customer.is_none()
            && self.viewer_names.is_empty()
            && !self.peers.values().any(|p| matches!(p.role, Role::Command { .. } | Role::CustomerHello))
            && now.duration_since(self.idle_since) > self.cfg.linger
    }

    fn timers(&mut self, now: Instant) {
        let mut gone = Vec::new();
        for (id, p) in &self.peers {
            let first_line_late =
                matches!(p.role, Role::CustomerHello | Role::Opening { .. } | Role::Command { done: false, .. })
                    && now.duration_since(p.since) > OPENING_TIMEOUT;
            let grace_over = p.closing.is_some_and(|d| now > d);
            if first_line_late || grace_over {
                gone.push(*id);
            }
        }
        for id in gone {
            self.remove_peer(id, "timeout");
        }
        let late: Vec<String> = self
            .upgrades
            .iter()
            .filter(|(_, (_, _, at))| now.duration_since(*at) > UPGRADE_WAIT)
            .map(|(k, _)| k.clone())
            .collect();
        for u in late {
            if let Some((peer, req, _)) = self.upgrades.remove(&u) {
                self.answer_upgrade(peer, &req, "TUNNEL_REJECTED", &format!("reason=timeout req={req}"));
            }
        }
        if self.refresh_asked.is_some_and(|at| now.duration_since(at) > REFRESH_WAIT) {
            self.refresh_asked = None;
        }
        if now.duration_since(self.keys_audited) > KEYS_AUDIT_EVERY {
            self.audit_keys();
        }
        if now.duration_since(self.alive_told) > ALIVE_EVERY && self.ended.is_none() {
            self.alive_told = now;
            if !self.sink.alive(self.customer.is_some()) {
                if let Some(c) = self.customer {
                    self.send(c, line("CLOSE reason=the%20session%20has%20ended".into()));
                }
                self.end_session("expired", "the session ended in the registry");
            }
        }
    }

    fn audit_keys(&mut self) {
        self.keys_audited = Instant::now();
        let mut recs = Vec::new();
        for p in self.peers.values_mut() {
            if let Role::Viewer(v) = &mut p.role
                && v.keys > v.keys_logged
            {
                recs.push((v.name.clone(), v.keys - v.keys_logged));
                v.keys_logged = v.keys;
            }
        }
        for (who, bytes) in recs {
            self.audit("keys", json!({"who": who, "bytes": bytes}));
        }
    }

    fn add_peer(&mut self, stream: UnixStream, cap: usize, role: Role) -> Option<u64> {
        let stream = Conn::socket(stream).ok()?;
        Some(self.insert_peer(stream, cap, role))
    }

    fn insert_peer(&mut self, stream: Conn, cap: usize, role: Role) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        self.peers.insert(id, Peer::new(stream, cap, role));
        id
    }

    fn accept_customer(&mut self) {
        while let Ok((s, _)) = self.customer_listener.accept() {
            if self.peers.values().filter(|p| matches!(p.role, Role::CustomerHello)).count() >= MAX_OPENING {
                continue; // dropped: produce answers `internal` and the client retries
            }
            self.add_peer(s, SMALL_QUEUE, Role::CustomerHello);
        }
    }

    fn accept_support(&mut self) {
        while let Ok((s, _)) = self.support_listener.accept() {
            let uid = match rustix::net::sockopt::socket_peercred(s.as_fd()) {
                Ok(c) => c.uid.as_raw(),
                Err(_) => continue,
            };
            if self.peers.values().filter(|p| matches!(p.role, Role::Opening { .. })).count() >= MAX_OPENING {
                continue;
            }
            let name = crate::identity::user_name(uid);
            self.add_peer(s, SMALL_QUEUE, Role::Opening { name });
        }
    }

    fn read_peer(&mut self, id: u64) {
        let mut buf = vec![0u8; READ_CHUNK];
        // A few reads per turn: a busy customer is served promptly, but cannot starve the others.
        for _ in 0..4 {
            let Some(p) = self.peers.get_mut(&id) else { return };
            if p.closing.is_some() {
                return;
            }
            match p.stream.read(&mut buf) {
                Ok(0) => {
                    self.peer_eof(id);
                    return;
                }
                Ok(n) => {
                    let pieces = p.split.push(&buf[..n]);
                    for piece in pieces {
                        match piece {
                            Piece::Line(l) => self.on_line(id, &l),
                            Piece::TooLong => self.dropped(id, "-", "too long"),
                        }
                        if self.peers.get(&id).is_none_or(|p| p.closing.is_some()) {
                            return;
                        }
                    }
                    if n < buf.len() {
                        return;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => {
                    self.peer_eof(id);
                    return;
                }
            }
        }
    }

    fn dropped(&mut self, id: u64, verb: &str, reason: &str) {
        let who = self.peers.get(&id).map(|p| p.name().to_string()).unwrap_or_default();
        warn(&self.cfg.sid, "line-dropped", &[("from", &who), ("verb", verb), ("reason", reason)]);
    }

    fn on_line(&mut self, id: u64, l: &[u8]) {
        let Some(p) = self.peers.get(&id) else { return };
        match &p.role {
            Role::CustomerHello => self.on_customer_hello(id, l),
            Role::Customer => match from_customer::parse(l) {
                Ok(m) => self.on_customer(id, l, m),
                Err(e) => self.dropped(id, &e.verb, e.reason),
            },
            Role::Opening { .. } => match from_viewer::parse_opening(l) {
                Ok(o) => self.on_opening(id, o),
                Err(e) => {
                    self.dropped(id, &e.verb, e.reason);
                    self.send(id, line("ERR code=proto msg=expected%20HELLO".into()));
                    self.close_peer(id);
                }
            },
            Role::Viewer(_) | Role::Command { .. } => match from_viewer::parse(l) {
                Ok(m) => self.on_viewer(id, m),
                Err(e) => {
                    self.dropped(id, &e.verb, e.reason);
                    if let Some(Peer { role: Role::Command { .. }, .. }) = self.peers.get(&id) {
                        self.send(id, line(format!("ERR code=proto msg={}", wire::pct_encode(e.reason))));
                        self.close_peer(id);
                    }
                }
            },
        }
    }

    // ----- the customer -----

    fn on_customer_hello(&mut self, id: u64, l: &[u8]) {
        let refuse = |b: &mut Broker, code: &str, msg: &str| {
            warn(&b.cfg.sid, "customer-refused", &[("code", code), ("why", msg)]);
            b.send(id, line(format!("ERROR code={code} msg={}", wire::pct_encode(msg))));
            b.close_peer(id);
        };
        let text = std::str::from_utf8(l).unwrap_or("");
        let h = match hello::parse(text) {
            Ok(h) => h,
            Err(r) => return refuse(self, r.code, &r.msg),
        };
        if h.id != self.cfg.sid {
            return refuse(self, "unknown-session", "this connection reached another session's broker");
        }
        if self.ended.is_some() {
            return refuse(self, "closed", "the session has ended");
        }
        if self.cfg.restricted_only && h.mode != Mode::Restricted {
            return refuse(self, "mode-refused", "support opened this session restricted; run with --restricted");
        }
        let how = if let Some(old) = self.customer {
            if !h.resume {
                // Two customers claiming one session: the second is refused, the first goes on.
                self.sink.refused(&h, "busy");
                self.audit("refused", json!({"code": "busy", "host": h.host, "user": h.user}));
                return refuse(self, "busy", "another client is connected to this session");
            }
            // resume=1: the old link is presumed dead (the client only resumes after losing it).
            self.audit("takeover", json!({}));
            self.remove_peer(old, "replaced by a reconnect");
            "takeover"
        } else if h.resume {
            "reconnected"
        } else {
            "connected"
        };
        if let Some(p) = self.peers.get_mut(&id) {
            p.role = Role::Customer;
            p.out = OutQueue::new(CUSTOMER_QUEUE);
        }
        self.customer = Some(id);
        self.mode = if self.cfg.restricted_only { Mode::Restricted } else { h.mode };
        self.size = (h.cols, h.rows);
        if self.recording.is_none() {
            match Recording::open(&self.cfg.recording, h.cols, h.rows, &self.cfg.sid) {
                Ok(r) => {
                    give_group(&self.cfg.recording, self.cfg.support_gid);
                    self.recording = Some(r)
                }
                Err(e) => warn(
                    &self.cfg.sid,
                    "recording-failed",
                    &[("path", &self.cfg.recording.display().to_string()), ("error", &e.to_string())],
                ),
            }
        } else if let Some(r) = &mut self.recording {
            let _ = r.resize(h.cols, h.rows);
        }
        let n = self.viewer_names.len();
        self.send(id, line(format!("WELCOME proto=1 viewers={n}")));
        self.audit(
            "link-up",
            json!({"host": h.host, "user": h.user, "ips": h.ips, "mode": h.mode.as_str(), "client": h.client, "resume": h.resume}),
        );
        self.state_word = state_word(self.mode, &self.tunnel);
        info(&self.cfg.sid, "customer-connected", &[("how", how), ("host", &h.host), ("mode", h.mode.as_str())]);
        self.sink.connected(&h, &self.state_word.clone(), how);
        self.hello = Some(h);
        self.broadcast(line("LINK state=up".into()));
    }

    fn on_customer(&mut self, id: u64, raw: &[u8], m: CustomerMsg) {
        match m {
            CustomerMsg::O(data) => {
                if let Some(r) = &mut self.recording
                    && let Err(e) = r.output(&data)
                {
                    warn(&self.cfg.sid, "recording-failed", &[("error", &e.to_string())]);
                }
                self.broadcast(raw_line(raw));
            }
            CustomerMsg::Snap { cols, rows, .. } => {
                self.size = (cols, rows);
                let l = raw_line(raw);
                self.last_snap = Some(l.clone());
                self.refresh_asked = None;
                self.broadcast(l);
            }
            CustomerMsg::Size { cols, rows } => {
                self.size = (cols, rows);
                if let Some(r) = &mut self.recording {
                    let _ = r.resize(cols, rows);
                }
                self.broadcast(raw_line(raw));
            }
            CustomerMsg::Chat(text) => {
                self.audit("chat", json!({"from": "customer", "text": String::from_utf8_lossy(&text)}));
                self.broadcast(line(format!("CHAT from=customer {}", wire::b64(&text))));
            }
            CustomerMsg::State { tunnel, brb, mode } => {
                self.brb = brb;
                self.tunnel = tunnel;
                if !self.cfg.restricted_only {
                    self.mode = Mode::parse(&mode).unwrap_or(self.mode);
                }
                // Restricted is one-way on the client; the broker holds it for the session.
                if mode == "restricted" {
                    self.mode = Mode::Restricted;
                }
                let l = line(format!("STATE tunnel={} brb={} mode={}", self.tunnel, u8::from(brb), self.mode.as_str()));
                self.last_state = Some(l.clone());
                self.broadcast(l);
                let w = state_word(self.mode, &self.tunnel);
                if w != self.state_word {
                    self.sink.state(&w);
                    self.state_word = w;
                }
            }
            CustomerMsg::TunnelOpen { req, port, user } => {
                self.sink.tunnel_port(Some(port));
                let asker = self.upgrades.remove(&req);
                let who = asker.as_ref().and_then(|(p, _, _)| self.peers.get(p)).map(|p| p.name().to_string());
                self.audit("tunnel-open", json!({"req": req, "port": port, "user": user, "for": who}));
                if let Some((peer, theirs, _)) = asker {
                    let f = format!("req={theirs} port={port} user={}", wire::pct_encode(&user));
                    self.answer_upgrade(peer, &theirs, "TUNNEL_OPEN", &f);
                }
            }
            CustomerMsg::TunnelRejected { req, reason } => {
                self.audit("tunnel-rejected", json!({"req": req, "reason": reason}));
                if let Some((peer, theirs, _)) = self.upgrades.remove(&req) {
                    self.answer_upgrade(peer, &theirs, "TUNNEL_REJECTED", &format!("req={theirs} reason={reason}"));
                }
            }
            CustomerMsg::TunnelClosed { reason } => {
                self.sink.tunnel_port(None);
                self.audit("tunnel-closed", json!({"reason": reason}));
                self.broadcast(line(format!("TUNNEL_CLOSED reason={reason}")));
            }
            CustomerMsg::Ping(n) => self.send(id, line(format!("PONG {n}"))),
            CustomerMsg::Pong(_) => {}
            CustomerMsg::Bye { reason } => {
                self.audit("bye", json!({"reason": reason}));
                self.end_session("customer", &format!("customer ended the session ({reason})"));
            }
        }
    }

    /// The answer to an upgrade goes to the engineer who asked; a one-shot command then gets `OK`.
    fn answer_upgrade(&mut self, peer: u64, _theirs: &str, verb: &str, fields: &str) {
        self.send(peer, line(format!("{verb} {fields}")));
        if let Some(Peer { role: Role::Command { waiting, .. }, .. }) = self.peers.get_mut(&peer) {
            *waiting = false;
            self.send(peer, line("OK".into()));
            self.close_peer(peer);
        }
    }

    fn customer_lost(&mut self) {
        self.customer = None;
        self.idle_since = Instant::now();
        if self.ended.is_some() {
            return;
        }
        self.audit("link-down", json!({}));
        self.broadcast(line("LINK state=down".into()));
        // The client forgets pending requests with its link: answer them now.
        let pending: Vec<(String, (u64, String, Instant))> = self.upgrades.drain().collect();
        for (_, (peer, theirs, _)) in pending {
            self.answer_upgrade(peer, &theirs, "TUNNEL_REJECTED", &format!("req={theirs} reason=error"));
        }
    }

    // ----- engineers -----

    fn on_opening(&mut self, id: u64, o: Opening) {
        let Some(p) = self.peers.get_mut(&id) else { return };
        let name = p.name().to_string();
        match o {
            Opening::Who => {
                let mut lines = Vec::new();
                for q in self.peers.values() {
                    if let (Role::Viewer(v), None) = (&q.role, q.closing) {
                        lines.push(line(format!("VIEWER name={} ro={}", wire::pct_encode(&v.name), u8::from(v.ro))));
                    }
                }
                lines.push(line("OK".into()));
                for l in lines {
                    self.send(id, l);
                }
                self.close_peer(id);
            }
            Opening::Command => {
                p.role = Role::Command { name, done: false, waiting: false };
                p.since = Instant::now();
            }
            Opening::Join { ro } => {
                if self.viewer_names.len() >= MAX_VIEWERS {
                    self.send(id, line("REFUSED what=JOIN reason=limit".into()));
                    self.close_peer(id);
                    return;
                }
                p.role = Role::Viewer(Viewer {
                    name: name.clone(),
                    ro,
                    tokens: KEY_RATE,
                    refilled: Instant::now(),
                    keys: 0,
                    keys_logged: 0,
                });
                p.out = OutQueue::new(VIEWER_QUEUE);
                self.audit("join", json!({"who": name, "ro": ro}));
                let h = self.hello.clone();
                let pct = |s: Option<&str>| wire::pct_encode(s.unwrap_or(""));
                let joined = format!(
                    "JOINED id={} mode={} host={} user={} case={} customer={} size={}x{} viewers={} ro={} me={}",
                    self.cfg.sid,
                    self.mode.as_str(),
                    pct(h.as_ref().map(|h| h.host.as_str())),
                    pct(h.as_ref().map(|h| h.user.as_str())),
                    wire::pct_encode(if self.cfg.case.is_empty() {
                        h.as_ref().map_or("", |h| h.case.as_str())
                    } else {
                        &self.cfg.case
                    }),
                    wire::pct_encode(&self.cfg.customer),
                    // The join stream's size is at least 1x1 (`size=0x0` is a client without tmux).
                    self.size.0.max(1),
                    self.size.1.max(1),
                    self.viewer_names.len() + 1,
                    u8::from(ro),
                    wire::pct_encode(&name),
                );
                self.send(id, line(joined));
                for l in [self.last_snap.clone(), self.last_state.clone(), self.note.clone()].into_iter().flatten() {
                    self.send(id, l);
                }
                if self.customer.is_none() {
                    self.send(id, line("LINK state=down".into()));
                }
                self.viewers_changed(Some(&name), None);
                self.ask_refresh();
            }
        }
    }

    fn ask_refresh(&mut self) {
        if let Some(c) = self.customer
            && self.refresh_asked.is_none()
        {
            self.refresh_asked = Some(Instant::now());
            self.send(c, line("REFRESH".into()));
        }
    }

    fn refuse(&mut self, id: u64, what: &str, reason: &str) {
        self.send(id, line(format!("REFUSED what={what} reason={reason}")));
        if let Some(Peer { role: Role::Command { .. }, .. }) = self.peers.get(&id) {
            self.send(
                id,
                line(format!("ERR code=denied msg={}", wire::pct_encode(&format!("{what} refused: {reason}")))),
            );
            self.close_peer(id);
        }
    }

    fn on_viewer(&mut self, id: u64, m: ViewerMsg) {
        let Some(p) = self.peers.get_mut(&id) else { return };
        let (name, ro) = match &mut p.role {
            Role::Viewer(v) => (v.name.clone(), v.ro),
            Role::Command { name, done, .. } => {
                if *done {
                    return; // one line per command connection
                }
                *done = true;
                if matches!(m, ViewerMsg::K(_) | ViewerMsg::Refresh) {
                    self.send(id, line("ERR code=proto msg=not%20a%20command".into()));
                    self.close_peer(id);
                    return;
                }
                (name.clone(), false)
            }
            _ => return,
        };
        let restricted = self.mode == Mode::Restricted || self.cfg.restricted_only;
        let is_command = matches!(self.peers.get(&id).map(|p| &p.role), Some(Role::Command { .. }));
        match m {
            ViewerMsg::K(data) => {
                if ro {
                    return self.refuse(id, "K", "read-only");
                }
                if restricted {
                    return self.refuse(id, "K", "restricted");
                }
                if self.brb {
                    return self.refuse(id, "K", "brb");
                }
                let Some(c) = self.customer else { return };
                if let Some(Peer { role: Role::Viewer(v), .. }) = self.peers.get_mut(&id) {
                    let now = Instant::now();
                    v.tokens = (v.tokens + now.duration_since(v.refilled).as_secs_f64() * KEY_RATE).min(KEY_RATE);
                    v.refilled = now;
                    if (data.len() as f64) > v.tokens {
                        return self.refuse(id, "K", "limit");
                    }
                    v.tokens -= data.len() as f64;
                    v.keys += data.len() as u64;
                }
                if !self.try_send(c, line(format!("K {}", wire::b64(&data)))) {
                    self.refuse(id, "K", "slow");
                }
            }
            ViewerMsg::Chat(text) => {
                self.audit("chat", json!({"from": name, "text": String::from_utf8_lossy(&text)}));
                let l = line(format!("CHAT from={} {}", wire::pct_encode(&name), wire::b64(&text)));
                if let Some(c) = self.customer {
                    self.send(c, l.clone());
                }
                self.broadcast_except(l, id);
                self.command_ok(id);
            }
            ViewerMsg::Note(text) => {
                self.audit("note", json!({"from": name, "text": String::from_utf8_lossy(&text)}));
                let l = line(if text.is_empty() { "NOTE".into() } else { format!("NOTE {}", wire::b64(&text)) });
                self.note = if text.is_empty() { None } else { Some(l.clone()) };
                if let Some(c) = self.customer {
                    self.send(c, l.clone());
                }
                self.broadcast(l);
                self.command_ok(id);
            }
            ViewerMsg::Upgrade { req, keys } => {
                if ro {
                    return self.refuse(id, "UPGRADE", "read-only");
                }
                if restricted {
                    // Answered at once: the customer never sees it.
                    self.audit("upgrade", json!({"who": name, "refused": "restricted"}));
                    self.answer_upgrade(id, &req, "TUNNEL_REJECTED", &format!("req={req} reason=restricted"));
                    if !is_command {
                        self.send(id, line("REFUSED what=UPGRADE reason=restricted".into()));
                    }
                    return;
                }
                if self.upgrades.len() >= MAX_UPGRADES {
                    return self.refuse(id, "UPGRADE", "limit");
                }
                let Some(c) = self.customer else {
                    return self.refuse(id, "UPGRADE", "offline");
                };
                let u = format!("u{}", self.next_upgrade);
                self.next_upgrade += 1;
                self.audit("upgrade", json!({"who": name, "req": u, "keys": String::from_utf8_lossy(&keys)}));
                self.upgrades.insert(u.clone(), (id, req, Instant::now()));
                if let Some(Peer { role: Role::Command { waiting, .. }, .. }) = self.peers.get_mut(&id) {
                    *waiting = true;
                }
                self.send(c, line(format!("UPGRADE req={u} from={} {}", wire::pct_encode(&name), wire::b64(&keys))));
            }
            ViewerMsg::Revoke => {
                if ro {
                    return self.refuse(id, "REVOKE", "read-only");
                }
                self.audit("revoke", json!({"who": name}));
                if let Some(c) = self.customer {
                    self.send(c, line("REVOKE".into()));
                }
                self.command_ok(id);
            }
            ViewerMsg::Close { reason } => {
                if ro {
                    return self.refuse(id, "CLOSE", "read-only");
                }
                self.audit("close", json!({"who": name, "reason": reason}));
                if let Some(c) = self.customer {
                    self.send(c, line(format!("CLOSE reason={}", wire::pct_encode(&reason))));
                }
                self.command_ok(id);
                self.end_session("closed", &format!("closed by {name}: {reason}"));
            }
            ViewerMsg::Refresh => self.ask_refresh(),
            ViewerMsg::Ping(n) => self.send(id, line(format!("PONG {n}"))),
            ViewerMsg::Pong(_) => {}
            ViewerMsg::Bye => {
                if !is_command {
                    self.close_peer(id);
                }
            }
        }
    }

    fn command_ok(&mut self, id: u64) {
        if let Some(Peer { role: Role::Command { .. }, .. }) = self.peers.get(&id) {
            self.send(id, line("OK".into()));
            self.close_peer(id);
        }
    }

    fn viewers_changed(&mut self, joined: Option<&str>, left: Option<&str>) {
        if let Some(n) = joined {
            self.viewer_names.push(n.to_string());
        }
        if let Some(n) = left
            && let Some(i) = self.viewer_names.iter().position(|v| v == n)
        {
            self.viewer_names.remove(i);
        }
        if self.viewer_names.is_empty() {
            self.idle_since = Instant::now();
        }
        if self.ended.is_some() {
            return;
        }
        let n = self.viewer_names.len();
        if let Some(c) = self.customer {
            self.send(c, line(format!("VIEWERS {n}")));
        }
        let names = wire::pct_encode(&self.viewer_names.join(","));
        self.broadcast(line(format!("VIEWERS {n} names={names}")));
        let v = self.viewer_names.clone();
        self.sink.viewers(&v);
    }

    fn end_session(&mut self, word: &str, why: &str) {
        if self.ended.is_some() {
            return;
        }
        info(&self.cfg.sid, "session-ended", &[("end", word), ("why", why)]);
        self.ended = Some(Instant::now());
        self.sink.ended(word, why);
        self.audit("end", json!({"reason": why}));
        self.broadcast(line(format!("CLOSED reason={}", wire::pct_encode(why))));
        let ids: Vec<u64> = self.peers.keys().copied().collect();
        for id in ids {
            self.close_peer(id);
        }
    }

    // ----- queues -----

    fn send(&mut self, id: u64, l: Rc<[u8]>) {
        if !self.try_send(id, l) {
            self.drop_slow(id);
        }
    }

    fn try_send(&mut self, id: u64, l: Rc<[u8]>) -> bool {
        match self.peers.get_mut(&id) {
            Some(p) if p.closing.is_none() => p.out.push(l).is_ok(),
            _ => true,
        }
    }

    /// To every viewer, in order; a viewer that cannot take it is dropped, nobody waits for it.
    fn broadcast(&mut self, l: Rc<[u8]>) {
        self.broadcast_except(l, 0);
    }

    fn broadcast_except(&mut self, l: Rc<[u8]>, except: u64) {
        let mut slow = Vec::new();
        for (id, p) in self.peers.iter_mut() {
            if *id != except
                && matches!(p.role, Role::Viewer(_))
                && p.closing.is_none()
                && p.out.push(l.clone()).is_err()
            {
                slow.push(*id);
            }
        }
        for id in slow {
            self.drop_slow(id);
        }
    }

    fn drop_slow(&mut self, id: u64) {
        if Some(id) == self.customer {
            warn(&self.cfg.sid, "customer-dropped", &[("reason", "slow")]);
            self.remove_peer(id, "slow");
            return;
        }
        let Some(name) = self.peers.get(&id).map(|p| p.name().to_string()) else { return };
        warn(&self.cfg.sid, "viewer-dropped", &[("who", &name), ("reason", "slow")]);
        let Some(p) = self.peers.get_mut(&id) else { return };
        p.out.discard_unsent();
        p.out.push_last(line("REFUSED what=O reason=slow".into()));
        self.close_peer(id);
    }

    /// Stops reading from a peer; it is dropped once its queue is written, or after a grace period.
    fn close_peer(&mut self, id: u64) {
        let was_viewer = {
            let Some(p) = self.peers.get_mut(&id) else { return };
            if p.closing.is_some() {
                return;
            }
            p.closing = Some(Instant::now() + CLOSE_GRACE);
            matches!(p.role, Role::Viewer(_))
        };
        if was_viewer {
            self.viewer_left(id);
        }
        if Some(id) == self.customer {
            self.customer_lost();
        }
    }

    fn viewer_left(&mut self, id: u64) {
        let Some(Peer { role: Role::Viewer(v), .. }) = self.peers.get(&id) else { return };
        let (name, extra) = (v.name.clone(), v.keys - v.keys_logged);
        if let Some(Peer { role: Role::Viewer(v), .. }) = self.peers.get_mut(&id) {
            v.keys_logged = v.keys;
        }
        if extra > 0 {
            self.audit("keys", json!({"who": name, "bytes": extra}));
        }
        self.audit("leave", json!({"who": name}));
        // The role changes so that a closing viewer gets no more fan-out and is not counted twice.
        if let Some(p) = self.peers.get_mut(&id) {
            p.role = Role::Command { name: name.clone(), done: true, waiting: false };
        }
        self.viewers_changed(None, Some(&name));
    }

    fn remove_peer(&mut self, id: u64, _why: &str) {
        self.close_peer(id);
        if let Some(p) = self.peers.remove(&id) {
            p.stream.shutdown();
            if p.stream.separate_write_fd().is_some() {
                // The ssh channel of a `produce` that became the broker: see `detach`.
                self.detach = true;
            }
        }
    }

    fn peer_eof(&mut self, id: u64) {
        // Whatever the peer had queued for it is of no use now.
        self.remove_peer(id, "eof");
    }

    fn flush_all(&mut self) {
        let mut dead = Vec::new();
        let mut done = Vec::new();
        for (id, p) in self.peers.iter_mut() {
            if p.out.is_empty() {
                if p.closing.is_some() {
                    done.push(*id);
                }
                continue;
            }
            if p.full {
                continue;
            }
            match p.out.flush_to(&mut p.stream) {
                Ok(()) => {
                    p.full = !p.out.is_empty();
                    if p.out.is_empty() && p.closing.is_some() {
                        done.push(*id);
                    }
                }
                Err(_) => dead.push(*id),
            }
        }
        for id in dead.into_iter().chain(done) {
            self.remove_peer(id, "done");
        }
    }
}

/// The lock file names its holder, for operators (and tests) who must find the broker.
fn write_pid(lock: &std::fs::File) -> io::Result<()> {
    use std::os::unix::fs::FileExt;
    lock.set_len(0)?;
    lock.write_all_at(format!("{}\n", std::process::id()).as_bytes(), 0)
}

/// Engineers read a session's audit log and recording through `tunl-relay support`, which runs
/// as their own account (group of the support accounts).
fn give_group(path: &Path, gid: Option<u32>) {
    if let Some(g) = gid
        && let Err(e) = rustix::fs::chown(path, None, Some(rustix::fs::Gid::from_raw(g)))
    {
        crate::log::warn("chown-failed", &[("path", &path.display().to_string()), ("error", &e.to_string())]);
    }
}

/// The registry's state word for a live session.
fn state_word(mode: Mode, tunnel: &str) -> String {
    match (mode, tunnel) {
        (Mode::Restricted, _) => "restricted",
        (Mode::Tunnel, _) => "tunnel",
        (Mode::Share, "active") => "share+tunnel",
        (Mode::Share, _) => "share",
    }
    .to_string()
}
