//! Signals as bytes on a pipe, so the single poll loop sees them like any other input.
//!
//! The handlers only `write(2)` one byte (async-signal-safe); everything else happens in the loop.
//! The shutdown watchdog is `alarm(2)` with a handler that SIGKILLs the process: if an orderly end
//! ever hangs, nothing outside needs to rescue the customer's terminal.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicI32, Ordering};

static PIPE_WR: AtomicI32 = AtomicI32::new(-1);
/// The daemon's pid, for the launcher's forwarding handler.
static FORWARD_TO: AtomicI32 = AtomicI32::new(0);
/// A signal the launcher received before there was a daemon to pass it to.
static HELD: AtomicI32 = AtomicI32::new(0);

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

extern "C" fn on_alarm(_: libc::c_int) {
    // SAFETY: kill(2) and getpid(2) are async-signal-safe.
    unsafe {
        libc::kill(libc::getpid(), libc::SIGKILL);
    }
}

extern "C" fn forward(sig: libc::c_int) {
    let pid = FORWARD_TO.load(Ordering::Relaxed);
    if pid <= 0 {
        HELD.store(sig, Ordering::Relaxed);
    } else {
        // SAFETY: kill(2) is async-signal-safe.
        unsafe {
            libc::kill(pid, sig);
        }
    }
}

fn install(sig: libc::c_int, handler: extern "C" fn(libc::c_int)) {
    // SAFETY: a zeroed sigaction with a valid handler and an empty mask is a valid argument.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = handler as usize;
        sa.sa_flags = libc::SA_RESTART;
        libc::sigemptyset(&mut sa.sa_mask);
        libc::sigaction(sig, &sa, std::ptr::null_mut());
    }
}

pub struct SignalPipe {
    read: OwnedFd,
}

impl SignalPipe {
    /// Route SIGINT, SIGTERM, SIGHUP, SIGCHLD and SIGWINCH into a non-blocking pipe; ignore SIGPIPE
    /// (a dead ssh must show as EPIPE on write, not kill us).
    pub fn install() -> std::io::Result<SignalPipe> {
        let (r, w) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC | rustix::pipe::PipeFlags::NONBLOCK)?;
        PIPE_WR.store(std::os::fd::IntoRawFd::into_raw_fd(w), Ordering::Relaxed);
        for s in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGCHLD, libc::SIGWINCH] {
            install(s, on_signal);
        }
        ignore_sigpipe();
        Ok(SignalPipe { read: r })
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        self.read.as_fd()
    }

    /// Drain pending signal numbers.
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

pub fn ignore_sigpipe() {
    // SAFETY: setting SIG_IGN for SIGPIPE is always valid.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_IGN);
    }
}

/// Arm the shutdown watchdog: SIGKILL ourselves after `secs` seconds.
pub fn arm_watchdog(secs: u32) {
    install(libc::SIGALRM, on_alarm);
    // SAFETY: alarm(2) has no memory-safety preconditions.
    unsafe {
        libc::alarm(secs);
    }
}

/// In the launcher: pass SIGINT, SIGTERM and SIGHUP on to `pid` (the daemon) instead of dying.
pub fn forward_to(pid: i32) {
    FORWARD_TO.store(pid, Ordering::Relaxed);
    for s in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        install(s, forward);
    }
}

/// In the launcher, until there is a daemon: hold SIGINT, SIGTERM and SIGHUP instead of dying, so
/// the launcher can undo what it set up (the key, the certificate, a tmux server) before it exits.
pub fn hold() {
    forward_to(0);
}

/// The signal held since `hold`, if any.
pub fn held() -> Option<i32> {
    Some(HELD.load(Ordering::Relaxed)).filter(|&s| s != 0)
}

/// Send `sig` to a process of ours.
pub fn send(pid: i32, sig: i32) {
    // SAFETY: kill(2) has no memory-safety preconditions.
    unsafe {
        libc::kill(pid, sig);
    }
}

/// Catch SIGQUIT and SIGTSTP (into the signal pipe, where they are dropped): a process sharing the
/// terminal's foreground with a shell that has no job control must neither quit nor stop with it.
pub fn catch_job_signals() {
    for s in [libc::SIGQUIT, libc::SIGTSTP] {
        install(s, on_signal);
    }
}

/// Make our process group the terminal's foreground again (stdin). From the background that takes
/// SIGTTOU out of the way for the call: blocked, then unblocked, so no child inherits it blocked.
pub fn take_terminal() {
    // SAFETY: sigprocmask and tcsetpgrp have no memory-safety preconditions beyond valid pointers.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        let mut old: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTTOU);
        libc::sigprocmask(libc::SIG_BLOCK, &set, &mut old);
        libc::tcsetpgrp(0, libc::getpgrp());
        libc::sigprocmask(libc::SIG_SETMASK, &old, std::ptr::null_mut());
    }
}

/// Restore default dispositions in a child between fork and exec.
pub fn reset_in_child() {
    // SAFETY: signal(2) is async-signal-safe and valid between fork and exec.
    unsafe {
        for s in [
            libc::SIGINT,
            libc::SIGTERM,
            libc::SIGHUP,
            libc::SIGCHLD,
            libc::SIGWINCH,
            libc::SIGPIPE,
            libc::SIGQUIT,
            libc::SIGTSTP,
        ] {
            libc::signal(s, libc::SIG_DFL);
        }
    }
}

pub const SIGINT: i32 = libc::SIGINT;
pub const SIGTERM: i32 = libc::SIGTERM;
pub const SIGHUP: i32 = libc::SIGHUP;
pub const SIGCHLD: i32 = libc::SIGCHLD;
pub const SIGWINCH: i32 = libc::SIGWINCH;
