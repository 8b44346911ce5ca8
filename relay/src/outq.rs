//! A bounded output queue for one peer of the broker. Lines are shared (`Rc`) so that fanning one
//! `O` line out to fifty viewers costs fifty pointers, not fifty copies; writes are non-blocking, and
//! a queue that would exceed its bound refuses the line (the caller drops that peer).

use std::collections::VecDeque;
use std::io::{self, IoSlice, Write};
use std::rc::Rc;

pub struct OutQueue {
    lines: VecDeque<Rc<[u8]>>,
    /// Bytes of the front line already written.
    offset: usize,
    bytes: usize,
    cap: usize,
}

#[derive(Debug, PartialEq, Eq)]
pub struct Full;

impl OutQueue {
    pub fn new(cap: usize) -> OutQueue {
        OutQueue { lines: VecDeque::new(), offset: 0, bytes: 0, cap }
    }

    pub fn push(&mut self, line: Rc<[u8]>) -> Result<(), Full> {
        if self.bytes + line.len() > self.cap {
            return Err(Full);
        }
        self.bytes += line.len();
        self.lines.push_back(line);
        Ok(())
    }

    /// Pushes past the bound: for the one last line (`REFUSED ... reason=slow`) before a close.
    pub fn push_last(&mut self, line: Rc<[u8]>) {
        self.bytes += line.len();
        self.lines.push_back(line);
    }

    /// Forgets every line not yet started, keeping a partly written front line whole so that the
    /// peer never sees half a line followed by another.
    pub fn discard_unsent(&mut self) {
        let keep = if self.offset > 0 { 1 } else { 0 };
        while self.lines.len() > keep {
            let l = self.lines.pop_back().unwrap();
            self.bytes -= l.len();
        }
    }

    pub fn is_empty(&self) -> bool {
        self.lines.is_empty()
    }

    pub fn bytes(&self) -> usize {
        self.bytes - self.offset
    }

    /// Writes as much as the (non-blocking) writer takes, several lines a system call (fifty
    /// viewers each taking one line per call would be most of the broker's time). `Ok(())` also
    /// when it would block.
    pub fn flush_to(&mut self, w: &mut impl Write) -> io::Result<()> {
        while !self.lines.is_empty() {
            let mut slices = Vec::with_capacity(MAX_SLICES);
            for (i, l) in self.lines.iter().take(MAX_SLICES).enumerate() {
                slices.push(IoSlice::new(if i == 0 { &l[self.offset..] } else { l }));
            }
            match w.write_vectored(&slices) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(mut n) => {
                    while n > 0 {
                        let front = self.lines.front().expect("written bytes belong to queued lines");
                        let left = front.len() - self.offset;
                        if n < left {
                            self.offset += n;
                            break;
                        }
                        n -= left;
                        self.bytes -= front.len();
                        self.offset = 0;
                        self.lines.pop_front();
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

/// Lines handed to one `writev`.
const MAX_SLICES: usize = 64;

#[cfg(test)]
mod tests {
    use super::*;

    struct Trickle(Vec<u8>, usize);
    impl Write for Trickle {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            if self.1 == 0 {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            let n = b.len().min(self.1).min(3);
            self.1 -= n;
            self.0.extend_from_slice(&b[..n]);
            Ok(n)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn bounded_and_whole_lines() {
        let mut q = OutQueue::new(10);
        q.push(Rc::from(&b"abcd\n"[..])).unwrap();
        q.push(Rc::from(&b"efgh\n"[..])).unwrap();
        assert_eq!(q.push(Rc::from(&b"x\n"[..])), Err(Full));
        let mut w = Trickle(Vec::new(), 4);
        q.flush_to(&mut w).unwrap();
        assert_eq!(w.0, b"abcd");
        q.discard_unsent();
        q.push_last(Rc::from(&b"END\n"[..]));
        w.1 = 100;
        q.flush_to(&mut w).unwrap();
        assert_eq!(w.0, b"abcd\nEND\n");
        assert!(q.is_empty() && q.bytes() == 0);
    }
}
