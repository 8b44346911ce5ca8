//! The chat pane of `tunl join` (`tunl __chat DIR`): two pinned status rows, the chat history and
//! the `you> ` prompt, as the customer's chat pane has them. Lines typed here become control words
//! for the view (`ctl.fifo`); status rows and messages arrive from it (`chat.fifo`: `S1 B64`,
//! `S2 B64`, `M B64`) and are neutralised again before they are drawn.

use crate::term::{Saved, Signals, write_all};
use rustix::event::{PollFd, PollFlags, poll};
use rustix::fs::{Mode, OFlags};
use std::collections::VecDeque;
use std::path::Path;
use tunl_wire::{b64, b64_decode, neutralize};

const HISTORY: usize = 500;
/// Longest line the editor takes.
pub const MAX_INPUT: usize = crate::cli::MAX_CHAT;

/// What the engineer typed, as the control word for the view, or a line to show locally.
#[derive(Debug, PartialEq, Eq)]
pub enum Typed {
    Ctl(String),
    Local(Vec<String>),
}

pub const HELP: &[&str] = &[
    "text             a chat line to the customer and the other engineers",
    "/note TEXT       pin TEXT in the customer's status rows (/note alone clears it)",
    "/upgrade         ask the customer for the tunnel with your ~/.ssh/id_ed25519.pub",
    "/revoke          close the tunnel (the customer's side removes your keys)",
    "/detach          leave; the session goes on",
    "/close [REASON]  end the session for the customer, with REASON shown to them",
    "Ctrl-b c         toggle between the customer's shell and this chat",
];

/// A line typed in the chat pane.
pub fn typed(line: &str) -> Option<Typed> {
    let t = line.trim();
    if t.is_empty() {
        return None;
    }
    let (cmd, arg) = t.split_once(' ').map(|(c, a)| (c, a.trim())).unwrap_or((t, ""));
    Some(match cmd {
        "/note" => Typed::Ctl(format!("note {}", b64(arg.as_bytes()))),
        "/upgrade" if arg.is_empty() => Typed::Ctl("upgrade".into()),
        "/revoke" if arg.is_empty() => Typed::Ctl("revoke".into()),
        "/detach" if arg.is_empty() => Typed::Ctl("detach".into()),
        "/refresh" if arg.is_empty() => Typed::Ctl("refresh".into()),
        "/close" => Typed::Ctl(format!("close {}", b64(arg.as_bytes()))),
        "/help" => Typed::Local(HELP.iter().map(|s| s.to_string()).collect()),
        c if c.starts_with('/') && !c.starts_with("//") => {
            Typed::Local(vec![format!("unknown command {} (/help lists them)", neutralize(c))])
        }
        // `//text` sends a chat line that starts with '/'.
        _ => Typed::Ctl(format!(
            "chat {}",
            b64(t.strip_prefix('/').filter(|s| s.starts_with('/')).unwrap_or(t).as_bytes())
        )),
    })
}

/// A fifo line from the view.
#[derive(Debug, PartialEq, Eq)]
pub enum FromView {
    Status1(String),
    Status2(String),
    Message(String),
}

pub fn parse_fifo_line(line: &[u8]) -> Option<FromView> {
    let s = std::str::from_utf8(line).ok()?;
    let (kind, data) = s.split_once(' ')?;
    let text = if data.is_empty() { String::new() } else { String::from_utf8(b64_decode(data)?).ok()? };
    let text = neutralize(&text);
    match kind {
        "S1" => Some(FromView::Status1(text)),
        "S2" => Some(FromView::Status2(text)),
        "M" => Some(FromView::Message(text)),
        _ => None,
    }
}

/// A small line editor: printable text, Backspace, Ctrl-U, Enter; escape sequences are skipped.
#[derive(Default)]
pub struct LineEditor {
    pub text: String,
    utf8: Vec<u8>,
    esc: u8,
}

impl LineEditor {
    pub fn feed(&mut self, bytes: &[u8]) -> Vec<String> {
        let mut done = Vec::new();
        for &b in bytes {
            match self.esc {
                1 => {
                    self.esc = match b {
                        b'[' => 2,
                        b'O' => 3,
                        _ => 0,
                    };
                    continue;
                }
                2 => {
                    if (0x40..=0x7e).contains(&b) {
                        self.esc = 0;
                    }
                    continue;
                }
                3 => {
                    self.esc = 0;
                    continue;
                }
                _ => {}
            }
            match b {
                0x1b => {
                    self.utf8.clear();
                    self.esc = 1;
                }
                b'\r' | b'\n' => {
                    self.utf8.clear();
                    done.push(std::mem::take(&mut self.text));
                }
                0x7f | 0x08 => {
                    self.utf8.clear();
                    self.text.pop();
                }
                0x15 => {
                    self.utf8.clear();
                    self.text.clear();
                }
                0..=0x1f => {}
                _ => {
                    self.utf8.push(b);
                    match std::str::from_utf8(&self.utf8) {
                        Ok(s) => {
                            if self.text.len() + s.len() <= MAX_INPUT {
                                self.text.push_str(&neutralize(s));
                            }
                            self.utf8.clear();
                        }
                        Err(e) if e.error_len().is_some() || self.utf8.len() >= 4 => self.utf8.clear(),
                        Err(_) => {}
                    }
                }
            }
        }
        done
    }
}

fn wrap(s: &str, width: usize) -> Vec<String> {
    let chars: Vec<char> = s.chars().collect();
    if chars.is_empty() {
        return vec![String::new()];
    }
    chars.chunks(width.max(1)).map(|c| c.iter().collect()).collect()
}

fn fit(s: &str, width: usize) -> String {
    s.chars().take(width).collect()
}

pub struct Screen {
    pub rows: u16,
    pub cols: u16,
    pub status1: String,
    pub status2: String,
    pub history: VecDeque<String>,
    pub editor: LineEditor,
}

const PROMPT: &str = "you> ";

impl Screen {
    pub fn full(&self) -> String {
        let (rows, cols) = (self.rows as usize, self.cols as usize);
        let mut o = String::from("\x1b[r\x1b[0m\x1b[H\x1b[2J");
        if rows >= 5 {
            o.push_str(&format!("\x1b[3;{}r", rows - 1));
            let region = rows - 3;
            let lines: Vec<String> = self.history.iter().flat_map(|l| wrap(l, cols)).collect();
            // Bottom-aligned, as `add` writes new lines at the bottom of the region.
            let start = lines.len().saturating_sub(region);
            let top = 3 + region - (lines.len() - start);
            for (i, l) in lines[start..].iter().enumerate() {
                o.push_str(&format!("\x1b[{};1H{l}", top + i));
            }
        }
        o.push_str(&self.status());
        o.push_str(&self.prompt());
        o
    }

    pub fn status(&self) -> String {
        let cols = self.cols as usize;
        let s1 = fit(&self.status1, cols);
        let pad = cols.saturating_sub(s1.chars().count());
        let mut o = format!("\x1b7\x1b[1;1H\x1b[2K\x1b[7m{s1}{}\x1b[0m", " ".repeat(pad));
        if self.rows >= 3 {
            o.push_str(&format!("\x1b[2;1H\x1b[2K\x1b[1m{}\x1b[0m", fit(&self.status2, cols)));
        }
        o.push_str("\x1b8");
        o
    }

    pub fn prompt(&self) -> String {
        let cols = self.cols as usize;
        let room = cols.saturating_sub(PROMPT.len() + 1).max(1);
        let chars: Vec<char> = self.editor.text.chars().collect();
        let shown: String = chars[chars.len().saturating_sub(room)..].iter().collect();
        format!("\x1b[{};1H\x1b[2K{PROMPT}{shown}", self.rows)
    }

    pub fn add(&mut self, line: String) -> String {
        let cols = self.cols as usize;
        let pieces = wrap(&line, cols);
        self.history.push_back(line);
        if self.history.len() > HISTORY {
            self.history.pop_front();
        }
        if self.rows < 5 {
            return self.prompt();
        }
        let mut o = String::new();
        for p in pieces {
            // Bottom of the scroll region, then a line feed scrolls only the region.
            o.push_str(&format!("\x1b[{};1H\n\r{p}", self.rows - 1));
        }
        o.push_str(&self.prompt());
        o
    }
}

/// `tunl __chat DIR`.
pub fn run(dir: &Path) -> i32 {
    let stdin = rustix::stdio::stdin();
    let stdout = rustix::stdio::stdout();
    let saved = Saved::stdin();
    if let Some(s) = &saved {
        s.raw();
    }
    let size =
        || rustix::termios::tcgetwinsize(stdout).map(|w| (w.ws_row, w.ws_col)).ok().filter(|&(r, c)| r > 0 && c > 0);
    let (rows, cols) = size().unwrap_or((crate::join::CHAT_HEIGHT, 80));
    let mut sc = Screen {
        rows,
        cols,
        status1: "tunl: joining...".into(),
        status2: String::new(),
        history: VecDeque::new(),
        editor: LineEditor::default(),
    };
    let fifo =
        rustix::fs::open(dir.join("chat.fifo"), OFlags::RDWR | OFlags::NONBLOCK | OFlags::CLOEXEC, Mode::empty()).ok();
    if fifo.is_none() {
        sc.history.push_back("(chat.fifo missing: status and messages will not show)".into());
    }
    let _ = write_all(stdout, sc.full().as_bytes());
    let sig = Signals::install().ok();
    let mut fifo_buf: Vec<u8> = Vec::new();
    let mut inbuf = [0u8; 4096];
    loop {
        let mut fds = vec![PollFd::new(&stdin, PollFlags::IN)];
        if let Some(f) = &fifo {
            fds.push(PollFd::new(f, PollFlags::IN));
        }
        if let Some(s) = &sig {
            fds.push(PollFd::from_borrowed_fd(s.fd(), PollFlags::IN));
        }
        let _ = poll(&mut fds, None);
        let rev: Vec<PollFlags> = fds.iter().map(|f| f.revents()).collect();
        drop(fds);
        let mut out = String::new();
        if let Some(s) = &sig
            && !rev[rev.len() - 1].is_empty()
        {
            let sigs = s.drain();
            if sigs.iter().any(|&s| matches!(s, crate::term::SIGINT | crate::term::SIGTERM | crate::term::SIGHUP)) {
                break;
            }
            // tmux resets the pane's scroll region on every resize: redraw.
            if let Some((r, c)) = size() {
                (sc.rows, sc.cols) = (r, c);
            }
            out.push_str(&sc.full());
        }
        if rev[0].intersects(PollFlags::IN | PollFlags::HUP | PollFlags::ERR) {
            match rustix::io::read(stdin, &mut inbuf) {
                Ok(0) => break,
                Ok(n) => {
                    for line in sc.editor.feed(&inbuf[..n]) {
                        match typed(&line) {
                            None => {}
                            Some(Typed::Local(lines)) => {
                                for l in lines {
                                    out.push_str(&sc.add(l));
                                }
                            }
                            Some(Typed::Ctl(word)) => {
                                if let Err(e) = crate::join::send_ctl(dir, &word) {
                                    out.push_str(&sc.add(format!("(not sent: {e})")));
                                }
                            }
                        }
                    }
                    out.push_str(&sc.prompt());
                }
                Err(rustix::io::Errno::INTR) | Err(rustix::io::Errno::AGAIN) => {}
                Err(_) => break,
            }
        }
        if let Some(f) = &fifo
            && rev[1].contains(PollFlags::IN)
        {
            let mut b = [0u8; 16384];
            if let Ok(n) = rustix::io::read(f, &mut b) {
                fifo_buf.extend_from_slice(&b[..n]);
            }
            while let Some(i) = fifo_buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = fifo_buf.drain(..=i).collect();
                match parse_fifo_line(&line[..line.len() - 1]) {
                    Some(FromView::Status1(s)) => {
                        sc.status1 = s;
                        out.push_str(&sc.status());
                    }
                    Some(FromView::Status2(s)) => {
                        sc.status2 = s;
                        out.push_str(&sc.status());
                    }
                    Some(FromView::Message(m)) => out.push_str(&sc.add(m)),
                    None => {}
                }
            }
            if fifo_buf.len() > 65536 {
                fifo_buf.clear();
            }
            out.push_str(&sc.prompt());
        }
        if !out.is_empty() {
            let _ = write_all(stdout, out.as_bytes());
        }
    }
    let _ = write_all(stdout, b"\x1b[r\x1b[0m\r\n");
    0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn typed_lines() {
        assert_eq!(typed("  "), None);
        assert_eq!(typed("hello"), Some(Typed::Ctl(format!("chat {}", b64(b"hello")))));
        assert_eq!(typed("//etc is full"), Some(Typed::Ctl(format!("chat {}", b64(b"/etc is full")))));
        assert_eq!(typed("/note  disk check "), Some(Typed::Ctl(format!("note {}", b64(b"disk check")))));
        assert_eq!(typed("/note"), Some(Typed::Ctl("note ".into())));
        assert_eq!(typed("/upgrade"), Some(Typed::Ctl("upgrade".into())));
        assert_eq!(typed("/revoke"), Some(Typed::Ctl("revoke".into())));
        assert_eq!(typed("/detach"), Some(Typed::Ctl("detach".into())));
        assert_eq!(typed("/close all fixed"), Some(Typed::Ctl(format!("close {}", b64(b"all fixed")))));
        assert!(matches!(typed("/help"), Some(Typed::Local(l)) if l.len() == HELP.len()));
        assert!(matches!(typed("/frob"), Some(Typed::Local(l)) if l[0].contains("unknown command /frob")));
        assert!(matches!(typed("/upgrade now"), Some(Typed::Local(_))));
    }

    #[test]
    fn fifo_lines() {
        assert_eq!(
            parse_fifo_line(format!("M {}", b64(b"eve> \x1b[2J")).as_bytes()),
            Some(FromView::Message("eve> ^[[2J".into()))
        );
        assert_eq!(parse_fifo_line(b"S1 "), Some(FromView::Status1(String::new())));
        assert_eq!(parse_fifo_line(b"S2 !!"), None);
        assert_eq!(parse_fifo_line(b"X aGk="), None);
    }

    #[test]
    fn editor() {
        let mut e = LineEditor::default();
        assert!(e.feed(b"hel").is_empty());
        assert_eq!(e.feed(b"lo\x7f\x7fp!\r"), vec!["help!".to_string()]);
        assert_eq!(e.feed(b"x\x15ab\x1b[Dc\x1bOPd\x03\r"), vec!["abcd".to_string()]);
        assert!(e.feed(&[0xc3]).is_empty());
        assert_eq!(e.feed(&[0xa4, b'\n']), vec!["ä".to_string()]);
    }

    #[test]
    fn screen_stays_in_its_rows() {
        let mut sc = Screen {
            rows: 9,
            cols: 20,
            status1: "s1 ".repeat(20),
            status2: "note".into(),
            history: VecDeque::new(),
            editor: LineEditor::default(),
        };
        assert!(sc.full().contains("\x1b[3;8r"));
        assert_eq!(sc.add("x".repeat(45)).matches("\x1b[8;1H\n\r").count(), 3);
        assert!(sc.prompt().starts_with("\x1b[9;1H\x1b[2Kyou> "));
    }
}
