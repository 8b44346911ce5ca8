//! The terminal and signals: raw mode with a guaranteed restore, and signals as bytes on a pipe so
//! a poll loop sees them like any other input (the handlers only `write(2)` one byte).

use rustix::termios::{OptionalActions, Termios, tcgetattr, tcsetattr};
use std::os::fd::{AsFd, BorrowedFd, IntoRawFd, OwnedFd};
use std::sync::atomic::{AtomicI32, Ordering};

static PIPE_WR: AtomicI32 = AtomicI32::new(-1);

extern "C" fn on_signal(sig: libc::c_int) {
    let fd = PIPE_WR.load(Ordering::Relaxed);
    if fd >= 0 {
        let b = sig as u8;
        // SAFETY: write(2) is async-signal-safe; the fd stays open for the process lifetime.
        unsafe {
            libc::write(fd, &b as *const u8 as *const libc::c_void, 1);
        }
    }
}

pub struct Signals {
    read: OwnedFd,
}

pub const SIGINT: i32 = libc::SIGINT;
pub const SIGTERM: i32 = libc::SIGTERM;
pub const SIGHUP: i32 = libc::SIGHUP;
pub const SIGWINCH: i32 = libc::SIGWINCH;
pub const SIGCHLD: i32 = libc::SIGCHLD;

impl Signals {
    /// Route SIGINT, SIGTERM, SIGHUP, SIGWINCH and SIGCHLD into a non-blocking pipe; ignore SIGPIPE
    /// (a dead ssh shows as EPIPE on write instead of killing us).
    pub fn install() -> std::io::Result<Signals> {
        let (r, w) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC | rustix::pipe::PipeFlags::NONBLOCK)?;
        PIPE_WR.store(w.into_raw_fd(), Ordering::Relaxed);
        for s in [SIGINT, SIGTERM, SIGHUP, SIGWINCH, SIGCHLD] {
            // SAFETY: a zeroed sigaction with a valid handler and an empty mask is a valid argument.
            unsafe {
                let mut sa: libc::sigaction = std::mem::zeroed();
                sa.sa_sigaction = on_signal as *const () as usize;
                sa.sa_flags = libc::SA_RESTART;
                libc::sigemptyset(&mut sa.sa_mask);
                libc::sigaction(s, &sa, std::ptr::null_mut());
            }
        }
        // SAFETY: setting SIGPIPE to SIG_IGN is always valid.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_IGN);
        }
        Ok(Signals { read: r })
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        self.read.as_fd()
    }

    pub fn drain(&self) -> Vec<i32> {
        let mut buf = [0u8; 64];
        let mut out = Vec::new();
        while let Ok(n) = rustix::io::read(&self.read, &mut buf) {
            if n == 0 {
                break;
            }
            out.extend(buf[..n].iter().map(|&b| b as i32));
        }
        out
    }
}

/// The terminal settings at start, put back on drop: every way out of raw mode restores them.
pub struct Saved {
    fd: BorrowedFd<'static>,
    termios: Termios,
}

impl Saved {
    pub fn stdin() -> Option<Saved> {
        let fd = rustix::stdio::stdin();
        let termios = tcgetattr(fd).ok()?;
        Some(Saved { fd, termios })
    }
    pub fn raw(&self) {
        let mut raw = self.termios.clone();
        raw.make_raw();
        let _ = tcsetattr(self.fd, OptionalActions::Now, &raw);
    }
    pub fn restore(&self) {
        let _ = tcsetattr(self.fd, OptionalActions::Now, &self.termios);
    }
}

impl Drop for Saved {
    fn drop(&mut self) {
        self.restore();
    }
}

/// Write all of `data` to `fd`, retrying on EINTR/EAGAIN (a pane that is slow to read makes us
/// wait, never lose output).
pub fn write_all(fd: BorrowedFd<'_>, mut data: &[u8]) -> bool {
    while !data.is_empty() {
        match rustix::io::write(fd, data) {
            Ok(0) => return false,
            Ok(n) => data = &data[n..],
            Err(rustix::io::Errno::INTR) => {}
            Err(rustix::io::Errno::AGAIN) => {
                let mut p = [rustix::event::PollFd::new(&fd, rustix::event::PollFlags::OUT)];
                let _ = rustix::event::poll(&mut p, None);
            }
            Err(_) => return false,
        }
    }
    true
}

pub fn is_tty(fd: BorrowedFd<'_>) -> bool {
    rustix::termios::isatty(fd)
}
