//! Copies the ssh channel (stdin/stdout) to and from a broker socket, for `produce` and `join`.
//! One poll loop, one 64 KiB buffer a direction, blocking writes: a peer that does not read
//! stalls only its own copy, and the broker drops a socket that stops reading.

use std::io::{self, Write};
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;

use rustix::event::{PollFd, PollFlags, poll};

/// Which side ended the copy.
#[derive(Debug, PartialEq, Eq)]
pub enum End {
    /// The ssh channel's input closed (the client or engineer went away).
    Channel,
    /// The broker closed the socket (session ended, or this peer was dropped).
    Broker,
}

pub fn splice(sock: &UnixStream) -> io::Result<End> {
    let stdin = io::stdin();
    let mut stdout = io::stdout().lock();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let mut fds = [PollFd::new(&stdin, PollFlags::IN), PollFd::new(sock, PollFlags::IN)];
        match poll(&mut fds, None) {
            Ok(_) => {}
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
        }
        let (a, b) = (fds[0].revents(), fds[1].revents());
        if !b.is_empty() {
            match rustix::io::read(sock.as_fd(), &mut buf) {
                Ok(0) => return Ok(End::Broker),
                Ok(n) => {
                    stdout.write_all(&buf[..n])?;
                    stdout.flush()?;
                }
                Err(rustix::io::Errno::INTR | rustix::io::Errno::AGAIN) => {}
                Err(_) => return Ok(End::Broker),
            }
        }
        if !a.is_empty() {
            match rustix::io::read(stdin.as_fd(), &mut buf) {
                Ok(0) => return Ok(End::Channel),
                Ok(n) => {
                    if (&*sock).write_all(&buf[..n]).is_err() {
                        return Ok(End::Broker);
                    }
                }
                Err(rustix::io::Errno::INTR | rustix::io::Errno::AGAIN) => {}
                Err(_) => return Ok(End::Channel),
            }
        }
    }
}

/// Reads from `sock` up to and including the first newline (at most `max` bytes), for the one
/// answer line that decides what happens next.
pub fn read_first_line(sock: &UnixStream, max: usize) -> io::Result<Vec<u8>> {
    let mut out = Vec::new();
    let mut b = [0u8; 1];
    while out.len() < max {
        match rustix::io::read(sock.as_fd(), &mut b) {
            Ok(0) => break,
            Ok(_) => {
                out.push(b[0]);
                if b[0] == b'\n' {
                    break;
                }
            }
            Err(rustix::io::Errno::INTR) => {}
            Err(rustix::io::Errno::AGAIN) => return Err(io::ErrorKind::TimedOut.into()),
            Err(e) => return Err(e.into()),
        }
    }
    Ok(out)
}
