//! The tmux control client (`tmux -C attach-session`): our commands to it, queued and bounded (F3)
//! and matched with their replies in order; its events, parsed by `tmux::ControlParser`, turned into
//! what the daemon acts on; which pane is the shell and its size; screen captures, coalesced (one in
//! flight, one SNAP a second, F3). What the replies mean for the relay, the recording or a tunnel
//! request is the daemon's business.

use std::collections::VecDeque;
use std::os::fd::{AsFd, BorrowedFd};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use rustix::event::PollFlags;

use crate::proc::{self, Proc};
use crate::{tmux, ui};

/// How far (seconds) the control client may fall behind a pane before tmux pauses it (tmux >= 3.2).
const PAUSE_AFTER_SECS: u32 = 30;
/// At most one screen capture in flight and one SNAP per this interval, however many REFRESH lines
/// the relay sends (F3): 8 bytes in must not buy 256 KiB out each.
const SNAP_EVERY: Duration = Duration::from_secs(1);
/// While this much waits for the tmux control client unwritten, or this many commands wait for
/// their reply, tmux is behind: support's keystrokes are dropped (`dropped K reason=tmux-busy`) and
/// the status rows wait. A tmux that stopped reading must not make our queue grow with each relay
/// line (F3).
const QUEUE_MAX: usize = 1 << 20;
const PENDING_MAX: usize = 4096;

/// What a reply block from the tmux control client answers, in the order the commands were sent.
#[derive(Debug)]
pub enum Pending {
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

/// What the control client reported, for the daemon to act on.
pub enum Happening {
    /// Output of the shell pane.
    Shell(Vec<u8>),
    /// The reply to one of our commands.
    Reply(Pending, Vec<Vec<u8>>),
    /// tmux refused one of our commands; the reply's lines.
    Refused(Pending, Vec<Vec<u8>>),
    /// tmux paused a pane while we were behind (tmux >= 3.2); it is resumed already. For the shell
    /// pane a fresh screen has been asked for.
    Paused(u32),
    /// The control client says the server is going.
    Exit,
}

/// What a `list-panes` reply said about the shell pane.
pub enum PanesSeen {
    /// Not tagged yet (the launcher may still be tagging): asked again shortly.
    NotYet,
    /// The shell pane; `first` when it was not known before, `changed` when its size changed.
    Shell { first: bool, changed: bool, size: (u16, u16) },
}

pub struct Control {
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
    panes_retry_at: Option<Instant>,
    /// Screen captures: one in flight, the next one wanted, when the last SNAP went out.
    snap_file: PathBuf,
    snap_in_flight: bool,
    snap_at: Option<Instant>,
    last_snap: Option<Instant>,
}

impl Control {
    /// Attach to `session` on the server at `sock` and send `first`; screens are captured into
    /// `snap_file`.
    pub fn attach(
        sock: &Path,
        session: &str,
        features: tmux::Features,
        first: &[String],
        snap_file: PathBuf,
    ) -> Result<Control, String> {
        let mut cmd = Command::new("tmux");
        cmd.arg("-S").arg(sock).env_remove("TMUX").args(["-C", "attach-session"]);
        if features.ignore_size {
            // A control client has no screen: it must never shrink the customer's windows.
            cmd.args(["-f", "ignore-size"]);
        }
        cmd.args(["-t", &features.exact(session)]);
        let p = proc::spawn(&mut cmd, false).map_err(|e| format!("cannot start the tmux control client: {e}"))?;
        let mut c = Control {
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
            panes_retry_at: None,
            snap_file,
            snap_in_flight: false,
            snap_at: None,
            last_snap: None,
        };
        for cmd in first {
            c.cmd(cmd, Pending::Ignore);
        }
        if features.flow_control {
            // tmux >= 3.2 pauses a pane whose output this client is more than this many seconds
            // behind on, instead of buffering without bound; we resume it and resynchronise.
            c.cmd(&format!("refresh-client -f pause-after={PAUSE_AFTER_SECS}"), Pending::Ignore);
        }
        c.list_panes();
        Ok(c)
    }

    pub fn features(&self) -> tmux::Features {
        self.features
    }

    /// The shell pane, once known.
    pub fn shell(&self) -> Option<u32> {
        self.shell
    }

    pub fn chat(&self) -> Option<u32> {
        self.chat
    }

    /// Whether this tmux pauses a pane that we fall behind on (3.2+).
    pub fn flow_control(&self) -> bool {
        self.features.flow_control
    }

    /// The shell pane's size (80x24 until known).
    pub fn size(&self) -> (u16, u16) {
        self.size
    }

    /// Queue one command; its reply will be matched with `pending`.
    pub fn cmd(&mut self, cmd: &str, pending: Pending) {
        self.outq.extend_from_slice(cmd.as_bytes());
        self.outq.push(b'\n');
        self.pending.push_back(pending);
    }

    /// Whether tmux is behind on our commands (F3): it has not read `QUEUE_MAX` bytes of them, or not
    /// answered `PENDING_MAX` of them.
    pub fn busy(&self) -> bool {
        self.outq.len() - self.out_off >= QUEUE_MAX || self.pending.len() >= PENDING_MAX
    }

    /// Type `bytes` into the shell pane; false (nothing queued) while tmux is behind. Typing is
    /// interactive: keys that cannot be delivered now are dropped, never hoarded.
    pub fn keys(&mut self, bytes: &[u8]) -> bool {
        if self.busy() {
            return false;
        }
        if let Some(pane) = self.shell {
            for cmd in tmux::send_keys(&self.features, pane, bytes) {
                self.cmd(&cmd, Pending::Ignore);
            }
        }
        true
    }

    pub fn list_panes(&mut self) {
        self.cmd(&ui::list_panes_command(), Pending::Panes);
    }

    /// A SNAP is due. Coalesced (F3): while a capture is in flight or the last SNAP is recent, the
    /// request only marks one more capture as wanted, taken when its time comes.
    pub fn want_snap(&mut self) {
        let now = Instant::now();
        let due = self.last_snap.map_or(now, |t| t + SNAP_EVERY);
        if self.snap_in_flight || due > now {
            self.snap_at = Some(due);
            return;
        }
        if let Some(pane) = self.shell {
            self.snap_in_flight = true;
            self.snap_at = None;
            let (cmds, done) = tmux::snap_commands(&self.features, pane, &self.snap_file.to_string_lossy());
            for (i, c) in cmds.iter().enumerate() {
                self.cmd(c, if i == done { Pending::Snap } else { Pending::Ignore });
            }
        }
    }

    /// The file the last capture was saved to.
    pub fn snap_file(&self) -> &Path {
        &self.snap_file
    }

    /// A `list-panes` reply: remember the shell and chat panes and the shell's size.
    pub fn panes(&mut self, body: &[Vec<u8>]) -> PanesSeen {
        let ui::Panes { shell: found, chat } = ui::parse_panes(body);
        self.chat = chat;
        let Some((id, w, h)) = found else {
            if self.shell.is_none() {
                self.panes_retry_at = Some(Instant::now() + Duration::from_millis(50));
            }
            return PanesSeen::NotYet;
        };
        let first = self.shell.is_none();
        let changed = self.size != (w, h);
        self.shell = Some(id);
        self.size = (w, h);
        PanesSeen::Shell { first, changed, size: (w, h) }
    }

    /// The descriptors to poll: its stdout while `read` (the daemon stops reading while the relay is
    /// far behind: backpressure), its stdin while commands wait.
    pub fn poll_fds(&self, read: bool) -> [Option<(BorrowedFd<'_>, PollFlags)>; 2] {
        [
            self.p.stdout.as_ref().filter(|_| read && !self.eof).map(|f| (f.as_fd(), PollFlags::IN)),
            self.p.stdin.as_ref().filter(|_| self.out_off < self.outq.len()).map(|f| (f.as_fd(), PollFlags::OUT)),
        ]
    }

    /// Read up to `budget` bytes of events; true at the end (the server is gone).
    pub fn read(&mut self, budget: usize) -> bool {
        let Some(fd) = self.p.stdout.as_ref().map(|f| f.as_fd()) else { return true };
        let mut buf = Vec::new();
        let eof = proc::read_budget(fd, &mut buf, budget);
        self.parser.push(&buf);
        self.eof = eof;
        eof
    }

    /// The next thing the daemon must act on from what was read; what only concerns the control
    /// client itself (replies to tmux's own command line, other panes' output, layout changes) is
    /// handled here.
    pub fn next(&mut self) -> Option<Happening> {
        loop {
            let ev = self.parser.next_event()?;
            match ev {
                tmux::Event::Output { pane, data } if Some(pane) == self.shell => return Some(Happening::Shell(data)),
                // Replies to the command on tmux's own command line, not to lines we wrote.
                tmux::Event::End { flags, .. } | tmux::Event::Error { flags, .. } if flags & 1 == 0 => {}
                tmux::Event::End { body, .. } => return Some(Happening::Reply(self.answered(), body)),
                tmux::Event::Error { body, .. } => return Some(Happening::Refused(self.answered(), body)),
                tmux::Event::LayoutChange { .. } => self.list_panes(),
                tmux::Event::Pause(pane) => {
                    // Output was held back while we were behind: support gets a fresh screen instead.
                    self.cmd(&format!("refresh-client -A '%{pane}:continue'"), Pending::Ignore);
                    if Some(pane) == self.shell {
                        self.want_snap();
                    }
                    return Some(Happening::Paused(pane));
                }
                tmux::Event::Exit(_) => return Some(Happening::Exit),
                _ => {}
            }
        }
    }

    /// The command a reply block answers.
    fn answered(&mut self) -> Pending {
        let pending = self.pending.pop_front().unwrap_or(Pending::Ignore);
        if matches!(pending, Pending::Snap) {
            self.snap_in_flight = false;
            self.last_snap = Some(Instant::now());
        }
        pending
    }

    /// Write what tmux takes now.
    pub fn pump(&mut self) {
        if self.out_off < self.outq.len() {
            if let Some(stdin) = &self.p.stdin {
                let _ = proc::write_some(stdin.as_fd(), &self.outq, &mut self.out_off);
            }
        }
        if self.out_off == self.outq.len() {
            self.outq.clear();
            self.out_off = 0;
        } else if self.out_off > (1 << 20) {
            self.outq.drain(..self.out_off);
            self.out_off = 0;
        }
    }

    /// The next timer: asking for the panes again, or a wanted capture.
    pub fn deadline(&self) -> Option<Instant> {
        let snap = self.snap_at.filter(|_| !self.snap_in_flight);
        match (snap, self.panes_retry_at) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    pub fn on_timers(&mut self, now: Instant) {
        if !self.snap_in_flight && self.snap_at.is_some_and(|r| now >= r) {
            self.snap_at = None;
            self.want_snap();
        }
        if self.panes_retry_at.is_some_and(|r| now >= r) {
            self.panes_retry_at = None;
            self.list_panes();
        }
    }

    /// At the end: close its stdin and end it.
    pub fn close(mut self) {
        drop(self.p.stdin.take());
        let _ = self.p.child.kill();
        let _ = self.p.child.wait();
    }
}
