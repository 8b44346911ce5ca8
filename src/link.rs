//! The relay link: the ssh master that carries `linbit-tunl/1`, the queue of our lines for the relay,
//! the splitter for its lines, ssh's stderr for `ssh.log`, and the liveness rules of protocol.md
//! section 7: PING after 15 s, the link dead after 45 s of silence or of a queue the relay does not
//! take from (F3), reconnect with back-off. It never decides what a line means: the daemon reads the
//! lines it returns and dispatches them.

use std::os::fd::{AsFd, BorrowedFd};
use std::time::{Duration, Instant};

use rustix::event::{PollFd, PollFlags};

use crate::proc::{self, Proc};
use crate::protocol;
use crate::sessiondir::Log;
use crate::text;

const PING_AFTER: Duration = Duration::from_secs(15);
const SILENCE_LIMIT: Duration = Duration::from_secs(45);
const WELCOME_TIMEOUT: Duration = Duration::from_secs(30);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// A relay that takes nothing from us for this long is as dead as one that says nothing (F3): it may
/// keep the link "alive" with PING while our queue towards it stands still.
const STALL_LIMIT: Duration = SILENCE_LIMIT;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    Connecting,
    Up,
    Down,
}

/// One ssh master and its pipes.
struct Master {
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

/// What a timer of the link asks the daemon to do.
pub enum Due {
    /// The back-off is over: connect again.
    Connect,
    /// The link is dead, for this reason.
    Lost(&'static str),
}

/// The relay link across reconnects.
pub struct Link {
    master: Option<Master>,
    state: State,
    ever_welcomed: bool,
    attempts: u32,
    retry_at: Option<Instant>,
    ping_n: u64,
}

/// Lines read from the relay in one wake-up; `Err` for a line over the length limit.
pub struct Read {
    pub lines: Vec<Result<Vec<u8>, ()>>,
    pub eof: bool,
}

impl Link {
    pub fn new() -> Link {
        Link { master: None, state: State::Down, ever_welcomed: false, attempts: 0, retry_at: None, ping_n: 0 }
    }

    pub fn state(&self) -> State {
        self.state
    }

    pub fn is_up(&self) -> bool {
        self.state == State::Up
    }

    /// Whether a master is running (connecting or up).
    pub fn exists(&self) -> bool {
        self.master.is_some()
    }

    /// Whether the relay ever welcomed this session: a reconnect resumes it.
    pub fn ever_welcomed(&self) -> bool {
        self.ever_welcomed
    }

    /// Connect at `at` (a fallback timer, or none).
    pub fn connect_at(&mut self, at: Option<Instant>) {
        self.retry_at = at;
    }

    /// A new ssh master carries the link from now on.
    pub fn start(&mut self, p: Proc) {
        let now = Instant::now();
        self.master = Some(Master {
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
        self.state = State::Connecting;
    }

    /// The relay's WELCOME; true the first time.
    pub fn welcomed(&mut self) -> bool {
        self.state = State::Up;
        self.attempts = 0;
        let first = !self.ever_welcomed;
        self.ever_welcomed = true;
        first
    }

    /// The queue towards the relay, when the link is up (nothing is queued for a link that is down:
    /// the SNAP after the next WELCOME resynchronises support).
    pub fn out(&mut self) -> Option<&mut Vec<u8>> {
        if self.state != State::Up {
            return None;
        }
        let m = self.master.as_mut()?;
        m.last_tx = Instant::now();
        Some(&mut m.outq)
    }

    /// Bytes queued for the relay and not yet taken by ssh.
    pub fn backlog(&self) -> usize {
        self.master.as_ref().map(|m| m.outq.len() - m.out_off).unwrap_or(0)
    }

    /// The descriptors to poll: ssh's stdout and stderr (until their end), its stdin while we have
    /// something for it.
    pub fn poll_fds(&self) -> [Option<(BorrowedFd<'_>, PollFlags)>; 3] {
        let Some(m) = &self.master else { return [None, None, None] };
        [
            m.p.stdout.as_ref().filter(|_| !m.stdout_eof).map(|f| (f.as_fd(), PollFlags::IN)),
            m.p.stderr.as_ref().filter(|_| !m.stderr_eof).map(|f| (f.as_fd(), PollFlags::IN)),
            m.p.stdin.as_ref().filter(|_| m.out_off < m.outq.len()).map(|f| (f.as_fd(), PollFlags::OUT)),
        ]
    }

    /// Read up to `budget` bytes from ssh's stdout; the complete lines in them.
    pub fn read(&mut self, budget: usize) -> Read {
        let mut out = Read { lines: Vec::new(), eof: false };
        let Some(m) = &mut self.master else { return out };
        let Some(fd) = m.p.stdout.as_ref().map(|f| f.as_fd()) else { return out };
        let mut buf = Vec::new();
        let eof = proc::read_budget(fd, &mut buf, budget);
        m.split.push(&buf);
        if !buf.is_empty() {
            m.last_rx = Instant::now();
        }
        m.stdout_eof = eof;
        out.eof = eof;
        while let Some(item) = m.split.next_line() {
            out.lines.push(item.map(|l| l.to_vec()).map_err(|_| ()));
        }
        out
    }

    /// Copy what ssh said on stderr into `log`, one line each, neutralised.
    pub fn read_stderr(&mut self, log: &mut Log, budget: usize) {
        let Some(m) = &mut self.master else { return };
        let Some(fd) = m.p.stderr.as_ref().map(|f| f.as_fd()) else { return };
        let mut buf = std::mem::take(&mut m.errbuf);
        let eof = proc::read_budget(fd, &mut buf, budget);
        m.stderr_eof = eof;
        let mut rest = &buf[..];
        while let Some(i) = rest.iter().position(|&b| b == b'\n') {
            let raw = &rest[..i];
            let line = text::neutralize(raw.strip_suffix(b"\r").unwrap_or(raw), 2000);
            log.line(&format!("ssh: {line}"));
            rest = &rest[i + 1..];
        }
        m.errbuf = if eof && !rest.is_empty() {
            let line = text::neutralize(rest, 2000);
            log.line(&format!("ssh: {line}"));
            Vec::new()
        } else {
            rest.to_vec()
        };
    }

    /// Write what ssh takes now; false if it stopped reading for good (a broken pipe).
    pub fn pump(&mut self) -> bool {
        let Some(m) = &mut self.master else { return true };
        let before = m.out_off;
        let mut ok = true;
        if m.out_off < m.outq.len() {
            if let Some(stdin) = &m.p.stdin {
                ok = proc::write_some(stdin.as_fd(), &m.outq, &mut m.out_off).is_ok();
            }
        }
        // A relay that stopped reading shows as a queue that does not move (F3).
        if m.out_off > before || m.out_off == m.outq.len() {
            m.stalled_since = None;
        } else if m.stalled_since.is_none() {
            m.stalled_since = Some(Instant::now());
        }
        if m.out_off == m.outq.len() {
            m.outq.clear();
            m.out_off = 0;
        } else if m.out_off > (1 << 20) {
            m.outq.drain(..m.out_off);
            m.out_off = 0;
        }
        ok
    }

    /// Whether ssh has exited.
    pub fn exited(&mut self) -> bool {
        self.master.as_mut().is_some_and(|m| matches!(m.p.child.try_wait(), Ok(Some(_))))
    }

    /// ssh closed its end: it is exiting, and its last words (why it failed) may still be in the
    /// stderr pipe. Let it finish, briefly, so they can be read.
    pub fn let_ssh_finish(&mut self) {
        if let Some(m) = self.master.as_mut().filter(|m| m.stdout_eof) {
            proc::wait_exit(&mut m.p.child, Duration::from_secs(2));
        }
    }

    /// End the master (the link is lost or refused); whether the link was up.
    pub fn drop_master(&mut self) -> bool {
        let was_up = self.state == State::Up;
        if let Some(mut m) = self.master.take() {
            let _ = m.p.child.kill();
            let _ = m.p.child.wait();
        }
        self.state = State::Down;
        was_up
    }

    /// The link was lost: the back-off starts over after a link that was up.
    pub fn lost(&mut self, was_up: bool) {
        if was_up {
            self.attempts = 0;
        }
        self.schedule_retry();
    }

    pub fn schedule_retry(&mut self) {
        let base = Duration::from_secs(1) * 2u32.saturating_pow(self.attempts.min(5));
        let base = base.min(BACKOFF_MAX);
        // Jitter of up to a quarter, so many customers behind one outage do not return in step.
        let jitter = base.mul_f64(random_fraction() * 0.25);
        self.attempts += 1;
        self.retry_at = Some(Instant::now() + base + jitter);
    }

    /// The link's next timer.
    pub fn deadline(&self) -> Option<Instant> {
        let mut next = self.retry_at;
        let mut at = |t: Instant| next = Some(next.map_or(t, |n: Instant| n.min(t)));
        if let Some(m) = &self.master {
            match self.state {
                State::Up => {
                    if let Some(s) = m.stalled_since {
                        at(s + STALL_LIMIT);
                    }
                    at(m.last_tx + PING_AFTER);
                    at(m.last_rx.max(m.last_ping) + PING_AFTER);
                    at(m.last_rx + SILENCE_LIMIT);
                }
                State::Connecting => at(m.started + WELCOME_TIMEOUT),
                State::Down => {}
            }
        }
        next
    }

    /// Run the link's timers: a PING goes out by itself; a reconnect or a dead link is returned.
    pub fn on_timers(&mut self, now: Instant) -> Option<Due> {
        if self.retry_at.is_some_and(|r| now >= r) {
            self.retry_at = None;
            return Some(Due::Connect);
        }
        let m = self.master.as_mut()?;
        match self.state {
            State::Up if now >= m.last_rx + SILENCE_LIMIT => Some(Due::Lost("no answer from the relay for 45 s")),
            State::Up if m.stalled_since.is_some_and(|s| now >= s + STALL_LIMIT) => {
                Some(Due::Lost("the relay took nothing from us for 45 s"))
            }
            // A PING after 15 s of not sending (the contract), and also after 15 s of hearing
            // nothing while we send a lot: a relay that only answers must get something to answer
            // before the 45 s silence limit, or a busy shell would look like a dead link.
            State::Up if now >= m.last_tx + PING_AFTER || now >= m.last_rx.max(m.last_ping) + PING_AFTER => {
                m.last_ping = now;
                m.last_tx = now;
                self.ping_n += 1;
                protocol::push_ping(&mut m.outq, self.ping_n);
                None
            }
            State::Connecting if now >= m.started + WELCOME_TIMEOUT => {
                Some(Due::Lost("the relay did not answer the hello"))
            }
            _ => None,
        }
    }

    /// At the end: give ssh until `limit` to take what is queued (BYE last).
    pub fn flush(&mut self, limit: Duration) {
        let deadline = Instant::now() + limit;
        while let Some(m) = &mut self.master {
            if m.out_off >= m.outq.len() || Instant::now() >= deadline {
                break;
            }
            let Some(stdin) = &m.p.stdin else { break };
            if proc::write_some(stdin.as_fd(), &m.outq, &mut m.out_off).is_err() {
                break;
            }
            if m.out_off < m.outq.len() {
                let fd = stdin.as_fd();
                let mut pfd = [PollFd::new(&fd, PollFlags::OUT)];
                let _ = rustix::event::poll(&mut pfd, Some(&crate::daemon::ts(Duration::from_millis(50))));
            }
        }
    }

    /// At the end, BYE being out: close ssh's stdin, which ends it; a master that lingers (a relay
    /// that keeps the channel open) gets SIGTERM, then SIGKILL, before `deadline`.
    pub fn close(&mut self, deadline: Instant) {
        let Some(mut m) = self.master.take() else { return };
        drop(m.p.stdin.take());
        let left = || deadline.saturating_duration_since(Instant::now());
        if proc::wait_exit(&mut m.p.child, left().min(Duration::from_secs(1))).is_none() {
            if let Some(pid) = rustix::process::Pid::from_raw(m.p.child.id() as i32) {
                let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
            }
            proc::wait_exit(&mut m.p.child, left().min(Duration::from_secs(1)));
        }
        let _ = m.p.child.kill();
        let _ = m.p.child.wait();
    }
}

/// A fraction in [0, 1) for back-off jitter; not security relevant.
fn random_fraction() -> f64 {
    let mut b = [0u8; 4];
    let _ = rand_core::RngCore::try_fill_bytes(&mut rand_core::OsRng, &mut b);
    u32::from_le_bytes(b) as f64 / (u32::MAX as f64 + 1.0)
}
