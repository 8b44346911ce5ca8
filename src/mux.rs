//! `ssh -O forward` / `-O cancel` as children of the poll loop (F20): one mux client at a time,
//! each with a deadline, never waited for inline. A relay that answers `tcpip-forward` slowly or never
//! costs a timer, not the loop: Ctrl-b Q, signals, heartbeats and the shared pane go on meanwhile.
//!
//! The daemon learns of the end of a client through SIGCHLD (or the deadline) and calls `poll`. A mux
//! client prints one port number or one error line: both fit in a pipe buffer, so the output is read
//! once the child has exited, never while it runs.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::proc::{self, Proc};
use crate::{ssh, text};

/// How long `ssh -O forward` may take: the relay's answer to `tcpip-forward` included.
const OPEN_LIMIT: Duration = Duration::from_secs(10);
const CANCEL_LIMIT: Duration = Duration::from_secs(5);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Open,
    Cancel,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The relay allocated this port for the reverse forward.
    Opened(u16),
    /// The forward could not be opened; the text is for the log.
    OpenFailed(String),
    /// `-O cancel` finished; `Some(text)` if it failed.
    Cancelled(Option<String>),
}

struct Running {
    op: Op,
    p: Proc,
    deadline: Instant,
}

pub struct Mux {
    dir: PathBuf,
    host: String,
    port: u16,
    running: Option<Running>,
    queue: VecDeque<Op>,
}

impl Mux {
    pub fn new(dir: &Path, target_host: &str, target_port: u16) -> Mux {
        Mux {
            dir: dir.to_path_buf(),
            host: target_host.to_string(),
            port: target_port,
            running: None,
            queue: VecDeque::new(),
        }
    }

    /// Queue an operation; it starts at once when no other client runs. An `Open` already running or
    /// queued is not asked for twice.
    pub fn request(&mut self, op: Op) -> Vec<Outcome> {
        if op == Op::Open && self.opening() {
            return Vec::new();
        }
        self.queue.push_back(op);
        self.start_next()
    }

    /// An `Open` is running or queued (and no `Cancel` after it).
    pub fn opening(&self) -> bool {
        let last = self.queue.back().copied().or(self.running.as_ref().map(|r| r.op));
        last == Some(Op::Open)
    }

    /// A `Cancel` is queued or running: an `Opened` that arrives now is of no use.
    pub fn cancel_ahead(&self) -> bool {
        self.queue.contains(&Op::Cancel)
    }

    /// The nearest deadline, for the poll timeout.
    pub fn deadline(&self) -> Option<Instant> {
        self.running.as_ref().map(|r| r.deadline)
    }

    /// Collect a finished (or overdue, then killed) client and start the next one.
    pub fn poll(&mut self, now: Instant) -> Vec<Outcome> {
        let mut out = Vec::new();
        if let Some(r) = &mut self.running {
            let exited = matches!(r.p.child.try_wait(), Ok(Some(_)));
            if exited || now >= r.deadline {
                let mut r = self.running.take().expect("checked");
                out.push(finish(&mut r, exited));
                out.extend(self.start_next());
            }
        }
        out
    }

    /// Forget everything: the master these clients talk to is gone (link lost, shutdown).
    pub fn reset(&mut self) {
        self.queue.clear();
        if let Some(mut r) = self.running.take() {
            let _ = r.p.child.kill();
            let _ = r.p.child.wait();
        }
    }

    fn start_next(&mut self) -> Vec<Outcome> {
        let mut out = Vec::new();
        while self.running.is_none() {
            let Some(op) = self.queue.pop_front() else { break };
            let (mut cmd, limit) = match op {
                Op::Open => (ssh::forward_command(&self.dir, &self.host, self.port), OPEN_LIMIT),
                Op::Cancel => (ssh::cancel_command(&self.dir, &self.host, self.port), CANCEL_LIMIT),
            };
            match proc::spawn(&mut cmd, false) {
                Ok(mut p) => {
                    drop(p.stdin.take());
                    self.running = Some(Running { op, p, deadline: Instant::now() + limit });
                }
                Err(e) => out.push(match op {
                    Op::Open => Outcome::OpenFailed(format!("cannot run ssh -O forward: {e}")),
                    Op::Cancel => Outcome::Cancelled(Some(format!("cannot run ssh -O cancel: {e}"))),
                }),
            }
        }
        out
    }
}

impl Drop for Mux {
    fn drop(&mut self) {
        self.reset();
    }
}

fn finish(r: &mut Running, exited: bool) -> Outcome {
    let status = if exited {
        r.p.child.try_wait().ok().flatten()
    } else {
        let _ = r.p.child.kill();
        let _ = r.p.child.wait();
        None
    };
    let (mut out, mut err) = (Vec::new(), Vec::new());
    if let Some(f) = &r.p.stdout {
        use std::os::fd::AsFd;
        proc::read_available(f.as_fd(), &mut out);
    }
    if let Some(f) = &r.p.stderr {
        use std::os::fd::AsFd;
        proc::read_available(f.as_fd(), &mut err);
    }
    let what = match r.op {
        Op::Open => "ssh -O forward",
        Op::Cancel => "ssh -O cancel",
    };
    let Some(status) = status else {
        let msg = format!("{what} did not finish in time: killed");
        return match r.op {
            Op::Open => Outcome::OpenFailed(msg),
            Op::Cancel => Outcome::Cancelled(Some(msg)),
        };
    };
    match r.op {
        Op::Open => match (status.success(), ssh::parse_forward_port(&out)) {
            (true, Some(port)) => Outcome::Opened(port),
            (true, None) => Outcome::OpenFailed(format!("{what} printed no port: {}", text::neutralize(&err, 300))),
            (false, _) => Outcome::OpenFailed(format!("{what} failed: {}", text::neutralize(&err, 300))),
        },
        Op::Cancel => Outcome::Cancelled(ssh::mux_error(status, &err)),
    }
}
