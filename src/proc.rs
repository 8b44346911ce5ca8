//! Child processes with non-blocking pipes, for the single poll loop.

use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::process::CommandExt;
use std::process::{Child, ChildStderr, ChildStdin, ChildStdout, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use rustix::event::{PollFd, PollFlags};

pub struct Proc {
    pub child: Child,
    pub stdin: Option<ChildStdin>,
    pub stdout: Option<ChildStdout>,
    pub stderr: Option<ChildStderr>,
}

/// Spawn with all three pipes, our ends non-blocking. `setsid` detaches the child from any
/// controlling terminal (ssh must not find one to prompt on: its askpass is the only way in).
///
/// Every child dies with the process that started it (`PR_SET_PDEATHSIG`, F19): a child in its own
/// session gets no SIGHUP, and an ssh master that outlived a killed daemon would keep the relay's
/// path to this host open.
pub fn spawn(cmd: &mut Command, setsid: bool) -> io::Result<Proc> {
    cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let parent = rustix::process::getpid();
    // SAFETY: the closure only calls async-signal-safe functions (signal, setsid, prctl, getppid,
    // _exit) and allocates nothing.
    unsafe {
        cmd.pre_exec(move || {
            crate::signals::reset_in_child();
            if setsid {
                let _ = rustix::process::setsid();
            }
            rustix::process::set_parent_process_death_signal(Some(rustix::process::Signal::KILL))?;
            // The parent may have died before the prctl: then nobody will send the signal.
            if rustix::process::getppid() != Some(parent) {
                libc::_exit(1);
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn()?;
    let stdin = child.stdin.take();
    let stdout = child.stdout.take();
    let stderr = child.stderr.take();
    for fd in
        [stdin.as_ref().map(|f| f.as_fd()), stdout.as_ref().map(|f| f.as_fd()), stderr.as_ref().map(|f| f.as_fd())]
            .into_iter()
            .flatten()
    {
        set_nonblocking(fd)?;
    }
    Ok(Proc { child, stdin, stdout, stderr })
}

pub fn set_nonblocking(fd: BorrowedFd<'_>) -> io::Result<()> {
    let fl = rustix::fs::fcntl_getfl(fd)?;
    rustix::fs::fcntl_setfl(fd, fl | rustix::fs::OFlags::NONBLOCK)?;
    Ok(())
}

pub enum Read {
    Data(usize),
    Eof,
    WouldBlock,
}

pub fn read_some(fd: BorrowedFd<'_>, buf: &mut [u8]) -> Read {
    match rustix::io::read(fd, buf) {
        Ok(0) => Read::Eof,
        Ok(n) => Read::Data(n),
        Err(rustix::io::Errno::AGAIN) | Err(rustix::io::Errno::INTR) => Read::WouldBlock,
        Err(_) => Read::Eof,
    }
}

/// Append everything readable now to `out`; true at end of file.
pub fn read_available(fd: BorrowedFd<'_>, out: &mut Vec<u8>) -> bool {
    let mut buf = [0u8; 65536];
    loop {
        match read_some(fd, &mut buf) {
            Read::Data(n) => out.extend_from_slice(&buf[..n]),
            Read::Eof => return true,
            Read::WouldBlock => return false,
        }
    }
}

/// Like `read_available`, but stop after about `budget` bytes: the rest stays in the pipe for the
/// next wake-up of the poll loop, which is level-triggered (F4). True at end of file.
pub fn read_budget(fd: BorrowedFd<'_>, out: &mut Vec<u8>, budget: usize) -> bool {
    let mut buf = [0u8; 65536];
    let start = out.len();
    while out.len() - start < budget {
        match read_some(fd, &mut buf) {
            Read::Data(n) => out.extend_from_slice(&buf[..n]),
            Read::Eof => return true,
            Read::WouldBlock => return false,
        }
    }
    false
}

/// Write as much of `buf[*off..]` as the pipe takes now; Err on a broken pipe.
pub fn write_some(fd: BorrowedFd<'_>, buf: &[u8], off: &mut usize) -> io::Result<()> {
    while *off < buf.len() {
        match rustix::io::write(fd, &buf[*off..]) {
            Ok(n) => *off += n,
            Err(rustix::io::Errno::AGAIN) => return Ok(()),
            Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Wait (bounded, without blocking forever) for a child to exit; its status if it did in time.
pub fn wait_exit(child: &mut Child, limit: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + limit;
    loop {
        if let Ok(Some(st)) = child.try_wait() {
            return Some(st);
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return None;
        }
        std::thread::sleep(left.min(Duration::from_millis(5)));
    }
}

// The daemon's mux clients moved into the loop (mux.rs); what is left reads these fields in tests.
#[allow(dead_code)]
pub struct Finished {
    pub status: Option<ExitStatus>,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

/// Run a short helper command (an ssh mux request, a tmux query) with a deadline; on timeout it is
/// killed and `status` is None. Stdin is closed.
pub fn run_with_timeout(cmd: &mut Command, timeout: Duration) -> io::Result<Finished> {
    let mut p = spawn(cmd, false)?;
    drop(p.stdin.take());
    let deadline = Instant::now() + timeout;
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let (mut out_eof, mut err_eof) = (false, false);
    while !(out_eof && err_eof) {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            let _ = p.child.kill();
            let _ = p.child.wait();
            return Ok(Finished { status: None, stdout: out, stderr: err });
        }
        let so = p.stdout.as_ref().unwrap().as_fd();
        let se = p.stderr.as_ref().unwrap().as_fd();
        let mut fds = [PollFd::new(&so, PollFlags::IN), PollFd::new(&se, PollFlags::IN)];
        let ts = rustix::event::Timespec { tv_sec: left.as_secs() as i64, tv_nsec: left.subsec_nanos() as i64 };
        let _ = rustix::event::poll(&mut fds, Some(&ts));
        if !out_eof && !fds[0].revents().is_empty() {
            out_eof = read_available(so, &mut out);
        }
        if !err_eof && !fds[1].revents().is_empty() {
            err_eof = read_available(se, &mut err);
        }
    }
    // Both pipes closed: the child has exited or is about to; wait, bounded.
    let status = wait_exit(&mut p.child, deadline.saturating_duration_since(Instant::now()));
    if status.is_none() {
        let _ = p.child.kill();
        let _ = p.child.wait();
    }
    Ok(Finished { status, stdout: out, stderr: err })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn collects_output_and_status() {
        let f =
            run_with_timeout(Command::new("sh").args(["-c", "echo out; echo err >&2; exit 3"]), Duration::from_secs(5))
                .unwrap();
        assert_eq!(f.stdout, b"out\n");
        assert_eq!(f.stderr, b"err\n");
        assert_eq!(f.status.unwrap().code(), Some(3));
    }

    #[test]
    fn kills_on_timeout() {
        let t = Instant::now();
        let f = run_with_timeout(Command::new("sleep").arg("30"), Duration::from_millis(200)).unwrap();
        assert!(f.status.is_none());
        assert!(t.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn a_read_stops_at_its_budget_and_leaves_the_rest() {
        let (r, w) = rustix::pipe::pipe().unwrap();
        set_nonblocking(r.as_fd()).unwrap();
        rustix::pipe::fcntl_setpipe_size(&w, 1 << 20).unwrap();
        let data = vec![7u8; 512 << 10];
        let mut off = 0;
        write_some(w.as_fd(), &data, &mut off).unwrap();
        assert_eq!(off, data.len());
        let mut out = Vec::new();
        assert!(!read_budget(r.as_fd(), &mut out, 100 << 10));
        // The budget, plus at most one buffer: never everything there is.
        assert!(out.len() >= 100 << 10 && out.len() < (100 << 10) + 65536, "{}", out.len());
        let mut rest = Vec::new();
        assert!(!read_available(r.as_fd(), &mut rest));
        assert_eq!(out.len() + rest.len(), data.len());
    }
}
