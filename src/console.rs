//! The customer's terminal in the foreground `--tunnel` mode: `linbit-tunl: ...` lines on stderr,
//! written without ever blocking the poll loop (F24).
//!
//! A terminal stopped with Ctrl-S, a slow serial or IPMI console, or a pipe nobody reads would
//! otherwise stop the only thread in `write(2)`: no heartbeat, no signal, no Ctrl-C. Lines wait in a
//! bounded queue and go out when the terminal takes them; what does not fit is dropped and counted,
//! and the count is said once the terminal takes output again.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

/// What may wait for a terminal that takes nothing: a few screens, not a chat flood.
const QUEUE_MAX: usize = 64 << 10;

enum Sink {
    /// Our own open file description of the terminal or pipe, non-blocking. Setting `O_NONBLOCK` on
    /// fd 2 itself would change it for every process sharing the terminal (the customer's shell).
    Own(OwnedFd),
    /// A socket (journald, a supervisor): fd 2 with `MSG_DONTWAIT` on each send.
    Socket,
    /// A regular file or something we cannot reopen: fd 2 as it is; a write waits for the disk at
    /// most, or (a tty we could not reopen) is cut to what `poll` promises fits.
    Plain,
}

pub struct Console {
    sink: Sink,
    queue: Vec<u8>,
    off: usize,
    dropped: u64,
}

impl Console {
    /// The process's stderr.
    pub fn stderr() -> Console {
        let fd2 = stderr_fd();
        let sink = match rustix::fs::fstat(fd2) {
            Ok(st) => {
                let kind = rustix::fs::FileType::from_raw_mode(st.st_mode);
                match kind {
                    rustix::fs::FileType::CharacterDevice | rustix::fs::FileType::Fifo => {
                        reopen().map_or(Sink::Plain, Sink::Own)
                    }
                    rustix::fs::FileType::Socket => Sink::Socket,
                    _ => Sink::Plain,
                }
            }
            Err(_) => Sink::Plain,
        };
        Console { sink, queue: Vec::new(), off: 0, dropped: 0 }
    }

    /// Queue `linbit-tunl: TEXT` and write what the terminal takes now; dropped (and counted) when
    /// the terminal has not taken the lines before it.
    pub fn line(&mut self, text: &str) {
        let line = format!("linbit-tunl: {text}\n");
        // Room the terminal made since the last line counts.
        self.flush();
        if self.waiting() + line.len() > QUEUE_MAX {
            self.dropped += 1;
            return;
        }
        if self.dropped > 0 {
            let n = std::mem::take(&mut self.dropped);
            let note = format!("linbit-tunl: ({n} lines not shown: the terminal took no output)\n");
            self.queue.extend_from_slice(note.as_bytes());
        }
        self.queue.extend_from_slice(line.as_bytes());
        self.flush();
    }

    /// Bytes waiting for the terminal.
    pub fn waiting(&self) -> usize {
        self.queue.len() - self.off
    }

    /// The descriptor to poll for `POLLOUT` while lines wait.
    pub fn fd(&self) -> BorrowedFd<'_> {
        match &self.sink {
            Sink::Own(fd) => fd.as_fd(),
            Sink::Socket | Sink::Plain => stderr_fd(),
        }
    }

    /// Write what the terminal takes now, never waiting.
    pub fn flush(&mut self) {
        while self.off < self.queue.len() {
            let rest = &self.queue[self.off..];
            let r = match &self.sink {
                Sink::Own(fd) => rustix::io::write(fd, rest),
                Sink::Socket => rustix::net::send(stderr_fd(), rest, rustix::net::SendFlags::DONTWAIT),
                Sink::Plain => {
                    // Only what poll promises: a pipe takes PIPE_BUF without blocking once it is
                    // writable, a tty at least its wake-up mark.
                    let fd = stderr_fd();
                    let mut p = [rustix::event::PollFd::new(&fd, rustix::event::PollFlags::OUT)];
                    let zero = rustix::event::Timespec { tv_sec: 0, tv_nsec: 0 };
                    match rustix::event::poll(&mut p, Some(&zero)) {
                        Ok(n) if n > 0 => rustix::io::write(fd, &rest[..rest.len().min(256)]),
                        _ => Err(rustix::io::Errno::AGAIN),
                    }
                }
            };
            match r {
                Ok(n) if n > 0 => self.off += n,
                Err(rustix::io::Errno::INTR) => {}
                // Full, or gone (a closed terminal): the lines wait or are dropped with the queue.
                Ok(_) | Err(_) => break,
            }
        }
        if self.off == self.queue.len() {
            self.queue.clear();
            self.off = 0;
        }
    }

    /// At the end: give the terminal until `deadline` to take what waits.
    pub fn flush_until(&mut self, deadline: std::time::Instant) {
        loop {
            self.flush();
            let now = std::time::Instant::now();
            if self.waiting() == 0 || now >= deadline {
                return;
            }
            let left = (deadline - now).min(std::time::Duration::from_millis(50));
            let fd = self.fd();
            let mut p = [rustix::event::PollFd::new(&fd, rustix::event::PollFlags::OUT)];
            let t = rustix::event::Timespec { tv_sec: 0, tv_nsec: left.subsec_nanos() as i64 };
            let _ = rustix::event::poll(&mut p, Some(&t));
        }
    }
}

fn stderr_fd() -> BorrowedFd<'static> {
    // SAFETY: fd 2 is open for the life of the process (std's own stderr relies on that too); we
    // never close it.
    unsafe { BorrowedFd::borrow_raw(2) }
}

/// A second, non-blocking open file description of whatever fd 2 is (a tty or a pipe).
fn reopen() -> Option<OwnedFd> {
    use rustix::fs::{Mode, OFlags};
    let flags = OFlags::WRONLY | OFlags::NONBLOCK | OFlags::CLOEXEC | OFlags::NOCTTY;
    rustix::fs::open("/proc/self/fd/2", flags, Mode::empty()).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_queue_drops_and_counts_and_says_so_later() {
        let (r, w) = rustix::pipe::pipe().unwrap();
        crate::proc::set_nonblocking(w.as_fd()).unwrap();
        let mut c = Console { sink: Sink::Own(w), queue: Vec::new(), off: 0, dropped: 0 };
        let long = "y".repeat(1000);
        // The pipe (64 KiB) and the queue (64 KiB) fill; the rest is counted, never blocks.
        for _ in 0..300 {
            c.line(&long);
        }
        assert!(c.dropped > 0);
        assert!(c.waiting() <= QUEUE_MAX);
        let mut got = Vec::new();
        crate::proc::set_nonblocking(r.as_fd()).unwrap();
        crate::proc::read_available(r.as_fd(), &mut got);
        c.line("next");
        loop {
            crate::proc::read_available(r.as_fd(), &mut got);
            if c.waiting() == 0 {
                break;
            }
            c.flush();
        }
        crate::proc::read_available(r.as_fd(), &mut got);
        let text = String::from_utf8_lossy(&got);
        assert!(text.contains("lines not shown"), "{}", &text[text.len().saturating_sub(200)..]);
        assert!(text.ends_with("linbit-tunl: next\n"));
        assert_eq!(text.matches(&long).count() as u64 + text_dropped(&text), 300);
    }

    fn text_dropped(t: &str) -> u64 {
        let i = t.find("linbit-tunl: (").unwrap() + "linbit-tunl: (".len();
        t[i..].split(' ').next().unwrap().parse().unwrap()
    }
}
