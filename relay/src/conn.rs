//! One peer's byte stream in the broker: a unix socket (viewers, commands, a `produce` that
//! splices), or the ssh channel itself (stdin and stdout) when the customer's `produce` became the
//! session's broker. Non-blocking both ways.

use std::io::{self, IoSlice, Read, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;

pub struct Conn {
    rd: OwnedFd,
    /// `None`: the same descriptor as `rd` (a socket).
    wr: Option<OwnedFd>,
}

impl Conn {
    pub fn socket(s: UnixStream) -> io::Result<Conn> {
        s.set_nonblocking(true)?;
        Ok(Conn { rd: s.into(), wr: None })
    }

    /// The ssh channel: `rd` and `wr` are copies of stdin and stdout (the caller points 0 and 1
    /// elsewhere, so that dropping this closes sshd's pipes and nothing else lands on them).
    pub fn pipes(rd: OwnedFd, wr: OwnedFd) -> io::Result<Conn> {
        for fd in [&rd, &wr] {
            let fl = rustix::fs::fcntl_getfl(fd)?;
            rustix::fs::fcntl_setfl(fd, fl | rustix::fs::OFlags::NONBLOCK)?;
        }
        Ok(Conn { rd, wr: Some(wr) })
    }

    pub fn read_fd(&self) -> BorrowedFd<'_> {
        self.rd.as_fd()
    }

    /// The descriptor to poll for writing, when it is not `read_fd`.
    pub fn separate_write_fd(&self) -> Option<BorrowedFd<'_>> {
        self.wr.as_ref().map(|w| w.as_fd())
    }

    fn write_fd(&self) -> BorrowedFd<'_> {
        self.wr.as_ref().unwrap_or(&self.rd).as_fd()
    }

    /// Ends both directions at once for a socket (the peer sees EOF even if a copy of the
    /// descriptor lives elsewhere); pipes close when dropped.
    pub fn shutdown(&self) {
        if self.wr.is_none() {
            let _ = rustix::net::shutdown(&self.rd, rustix::net::Shutdown::Both);
        }
    }
}

fn io_err(e: rustix::io::Errno) -> io::Error {
    io::Error::from_raw_os_error(e.raw_os_error())
}

impl Read for Conn {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        rustix::io::read(&self.rd, buf).map_err(io_err)
    }
}

impl Write for Conn {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        rustix::io::write(self.write_fd(), buf).map_err(io_err)
    }
    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        rustix::io::writev(self.write_fd(), bufs).map_err(io_err)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
