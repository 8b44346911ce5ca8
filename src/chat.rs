//! The chat pane (`__chat DIR`) and the control word sender (`__ctl DIR WORD [ARG...]`).
//!
//! The chat pane pins two status rows at the top (row 1: session, relay, viewers, mode, tunnel, BRB;
//! row 2: support's NOTE), scrolls the chat history in a DECSTBM region below them and keeps the
//! `customer> ` prompt on the last row. It reads `DIR/chat.fifo` (`S1 B64`, `S2 B64`, `M B64`,
//! `A B64`) and writes control lines to `DIR/ctl.fifo`. One poll loop over stdin and the fifo; the window size is
//! re-checked on every wake-up and at least every 500 ms (no signal handler needed for SIGWINCH).
//! Bad input of any kind is ignored; the pane only ends when its terminal goes away.

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use rustix::event::{PollFd, PollFlags, poll};
use rustix::fs::{Mode, OFlags, open};
use rustix::io::Errno;
use std::os::fd::OwnedFd;
use std::path::Path;

/// Longest chat line the customer can type, in bytes: its `chat B64` line stays under PIPE_BUF (4096),
/// so the write into the fifo is atomic.
pub const MAX_INPUT: usize = 3000;
/// Lines of chat history kept for redraws.
const HISTORY: usize = 500;
/// Longest line accepted from chat.fifo.
const MAX_FIFO_LINE: usize = 64 * 1024;

/// Remove everything that could drive the terminal: control characters (C0, DEL, C1) and bidi
/// overrides. Tabs become a space.
pub fn neutralise(s: &str) -> String {
    s.chars()
        .filter_map(|c| match c {
            '\t' => Some(' '),
            c if c.is_control() => None,
            '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}' | '\u{200e}' | '\u{200f}' => None,
            c => Some(c),
        })
        .collect()
}

/// A line from chat.fifo.
#[derive(Debug, PartialEq, Eq)]
pub enum ChatLine {
    Status1(String),
    Status2(String),
    Message(String),
    /// `A N`: say `shown N` on the control fifo once everything before it is on the screen.
    Ack(u64),
}

pub fn parse_chat_line(line: &[u8]) -> Option<ChatLine> {
    let line = std::str::from_utf8(line).ok()?;
    let (verb, arg) = line.split_once(' ').unwrap_or((line, ""));
    let text = neutralise(&String::from_utf8_lossy(&B64.decode(arg.trim_end()).ok()?));
    Some(match verb {
        "S1" => ChatLine::Status1(text),
        "S2" => ChatLine::Status2(text),
        "M" => ChatLine::Message(text),
        "A" => ChatLine::Ack(text.parse().ok()?),
        _ => return None,
    })
}

/// The control line for the words of `__ctl` (or an error message).
pub fn ctl_line(words: &[String]) -> Result<String, String> {
    let w: Vec<&str> = words.iter().map(String::as_str).collect();
    // The daemon's own request number (F2): relay request IDs never travel through tmux or a shell.
    let valid_req = |r: &str| !r.is_empty() && r.len() <= 9 && r.bytes().all(|b| b.is_ascii_digit());
    match w.as_slice() {
        [word @ ("quit" | "grant" | "revoke" | "block" | "brb" | "back" | "respawn")] => Ok(format!("{word}\n")),
        ["answer", req, answer @ ("grant" | "deny")] if valid_req(req) => Ok(format!("answer {req} {answer}\n")),
        ["chat", b64] if b64.len() <= 4 * MAX_INPUT.div_ceil(3) && B64.decode(b64).is_ok() => {
            Ok(format!("chat {b64}\n"))
        }
        _ => Err(format!("unknown control command '{}'", crate::cli::printable(&w.join(" ")))),
    }
}

/// Write one control line into `DIR/ctl.fifo` without blocking.
pub fn send_ctl(dir: &Path, line: &str) -> Result<(), String> {
    let fd = match open(dir.join("ctl.fifo"), OFlags::WRONLY | OFlags::NONBLOCK | OFlags::CLOEXEC, Mode::empty()) {
        Ok(fd) => fd,
        Err(Errno::NXIO) | Err(Errno::NOENT) => return Err("daemon not running".into()),
        Err(e) => return Err(format!("cannot open the control fifo: {e}")),
    };
    match rustix::io::write(&fd, line.as_bytes()) {
        Ok(n) if n == line.len() => Ok(()),
        Ok(_) => Err("control line cut short".into()),
        Err(Errno::AGAIN) => Err("daemon busy, not sent".into()),
        Err(e) => Err(format!("cannot write the control fifo: {e}")),
    }
}

/// `answer N typed` (the Grant prompt, `ui::typed_answer_command`) becomes `answer N grant` only
/// when tmux's `LINBIT_ANSWER_N` holds exactly the grant word; anything else, or nothing, denies.
fn resolve_typed(words: &[String], typed: Option<&str>) -> Vec<String> {
    match words {
        [a, n, t] if a == "answer" && t == "typed" => {
            let verdict = if typed == Some(crate::ui::GRANT_WORD) { "grant" } else { "deny" };
            vec![a.clone(), n.clone(), verdict.to_string()]
        }
        _ => words.to_vec(),
    }
}

/// The `__ctl` role.
pub fn ctl(dir: &Path, words: &[String]) -> i32 {
    let typed = words.get(1).and_then(|n| std::env::var(format!("LINBIT_ANSWER_{n}")).ok());
    let words = resolve_typed(words, typed.as_deref());
    match ctl_line(&words).and_then(|l| send_ctl(dir, &l)) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("linbit-tunl: {e}");
            1
        }
    }
}

/// A tiny line editor: printable characters, Backspace, Ctrl-U, Enter; escape sequences are skipped.
#[derive(Default)]
pub struct LineEditor {
    pub text: String,
    utf8: Vec<u8>,
    esc: u8, // 0 none, 1 after ESC, 2 inside CSI, 3 inside SS3/other (one more byte)
}

impl LineEditor {
    /// Feed keyboard bytes; returns the lines submitted with Enter.
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
                                self.text.push_str(&neutralise(s));
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

/// What starts every row after a message's first: a relay that knows the pane's width could
/// otherwise pad a chat line so that its second row reads like one of our own messages (F5).
const CONTINUATION: &str = "  ";

/// Split text into rows of at most `width` characters (at least one row); every row after the
/// first starts with [`CONTINUATION`], so only a message's first row begins at column 1.
fn wrap(s: &str, width: usize) -> Vec<String> {
    let chars: Vec<char> = s.chars().collect();
    let width = width.max(CONTINUATION.len() + 1);
    if chars.len() <= width {
        return vec![chars.iter().collect()];
    }
    let mut rows = vec![chars[..width].iter().collect::<String>()];
    for c in chars[width..].chunks(width - CONTINUATION.len()) {
        rows.push(format!("{CONTINUATION}{}", c.iter().collect::<String>()));
    }
    rows
}

fn fit(s: &str, width: usize) -> String {
    s.chars().take(width).collect()
}

struct Screen {
    rows: u16,
    cols: u16,
    status1: String,
    status2: String,
    history: std::collections::VecDeque<String>,
    editor: LineEditor,
}

impl Screen {
    fn full(&self) -> String {
        let (rows, cols) = (self.rows as usize, self.cols as usize);
        let mut o = String::from("\x1b[r\x1b[H\x1b[2J");
        if rows >= 5 {
            o.push_str(&format!("\x1b[3;{}r", rows - 1));
            let region = rows - 3;
            let lines: Vec<String> = self.history.iter().flat_map(|l| wrap(l, cols)).collect();
            let start = lines.len().saturating_sub(region);
            for (i, l) in lines[start..].iter().enumerate() {
                o.push_str(&format!("\x1b[{};1H{l}", 3 + i));
            }
        }
        o.push_str(&self.status());
        o.push_str(&self.prompt());
        o
    }

    fn status(&self) -> String {
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

    fn prompt(&self) -> String {
        let cols = self.cols as usize;
        let p = "customer> ";
        let room = cols.saturating_sub(p.len() + 1).max(1);
        let chars: Vec<char> = self.editor.text.chars().collect();
        let shown: String = chars[chars.len().saturating_sub(room)..].iter().collect();
        format!("\x1b[{};1H\x1b[2K{p}{shown}", self.rows)
    }

    fn add(&mut self, line: String) -> String {
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

/// Put the terminal on stdin into raw mode; what it was, for `restore_stdin`.
pub fn raw_stdin() -> Option<rustix::termios::Termios> {
    let stdin = rustix::stdio::stdin();
    let saved = rustix::termios::tcgetattr(stdin).ok();
    if let Some(t) = &saved {
        let mut raw = t.clone();
        raw.make_raw();
        let _ = rustix::termios::tcsetattr(stdin, rustix::termios::OptionalActions::Now, &raw);
    }
    saved
}

pub fn restore_stdin(saved: &Option<rustix::termios::Termios>) {
    if let Some(t) = saved {
        let _ = rustix::termios::tcsetattr(rustix::stdio::stdin(), rustix::termios::OptionalActions::Now, t);
    }
}

pub fn write_all(s: &str) {
    let mut b = s.as_bytes();
    while !b.is_empty() {
        match rustix::io::write(rustix::stdio::stdout(), b) {
            Ok(n) => b = &b[n..],
            Err(Errno::INTR) | Err(Errno::AGAIN) => continue,
            Err(_) => return,
        }
    }
}

fn open_fifo(dir: &Path) -> Option<(OwnedFd, OwnedFd)> {
    let path = dir.join("chat.fifo");
    let r = open(&path, OFlags::RDONLY | OFlags::NONBLOCK | OFlags::CLOEXEC, Mode::empty()).ok()?;
    // Our own writer keeps the fifo from reporting EOF when the daemon restarts.
    let w = open(&path, OFlags::WRONLY | OFlags::NONBLOCK | OFlags::CLOEXEC, Mode::empty()).ok()?;
    Some((r, w))
}

/// The `__chat` role.
pub fn run(dir: &Path) -> i32 {
    let stdin = rustix::stdio::stdin();
    let saved = raw_stdin();
    let size = || rustix::termios::tcgetwinsize(rustix::stdio::stdout()).map(|w| (w.ws_row, w.ws_col)).ok();
    let (rows, cols) = size().filter(|&(r, c)| r > 0 && c > 0).unwrap_or((8, 80));
    let mut sc = Screen {
        rows,
        cols,
        status1: "linbit-tunl: starting...".into(),
        status2: String::new(),
        history: Default::default(),
        editor: LineEditor::default(),
    };
    let fifo = open_fifo(dir);
    if fifo.is_none() {
        sc.history.push_back("(chat.fifo missing: status and messages will not show)".into());
    }
    write_all(&sc.full());
    let mut fifo_buf: Vec<u8> = Vec::new();
    let mut skipping = false;
    let mut inbuf = [0u8; 4096];
    // Resizes arrive as SIGWINCH; nothing else wakes this pane, so an idle chat costs nothing.
    let sig = crate::signals::SignalPipe::install().ok();
    loop {
        let mut fds = vec![PollFd::new(&stdin, PollFlags::IN)];
        if let Some((r, _)) = &fifo {
            fds.push(PollFd::new(r, PollFlags::IN));
        }
        if let Some(sp) = &sig {
            fds.push(PollFd::from_borrowed_fd(sp.fd(), PollFlags::IN));
        }
        match poll(&mut fds, None) {
            Ok(_) | Err(Errno::INTR) => {}
            Err(_) => std::thread::sleep(std::time::Duration::from_millis(100)),
        }
        let stdin_ev = fds[0].revents();
        let fifo_ev = if fifo.is_some() { fds[1].revents() } else { PollFlags::empty() };
        let sig_ev = fds.last().map(|f| f.revents()).unwrap_or(PollFlags::empty());
        drop(fds);
        if let (Some(sp), false) = (&sig, sig_ev.is_empty()) {
            let sigs = sp.drain();
            if sigs.iter().any(|&s| s != crate::signals::SIGWINCH && s != crate::signals::SIGCHLD) {
                break;
            }
            // tmux resets the pane's scroll region on every resize, even one that ends at the
            // same size, so redraw whenever it says the size changed.
            if let Some((r, c)) = size().filter(|&(r, c)| r > 0 && c > 0) {
                (sc.rows, sc.cols) = (r, c);
            }
            write_all(&sc.full());
        }
        if stdin_ev.intersects(PollFlags::IN | PollFlags::HUP | PollFlags::ERR) {
            match rustix::io::read(stdin, &mut inbuf) {
                Ok(0) => break,
                Ok(n) => {
                    let lines = sc.editor.feed(&inbuf[..n]);
                    let mut out = String::new();
                    for line in lines {
                        let text = line.trim();
                        if text.is_empty() {
                            continue;
                        }
                        let ctl = match text {
                            "/brb" => "brb\n".to_string(),
                            "/back" => "back\n".to_string(),
                            t => format!("chat {}\n", B64.encode(t)),
                        };
                        out.push_str(&sc.add(format!("customer> {text}")));
                        if let Err(e) = send_ctl(dir, &ctl) {
                            out.push_str(&sc.add(format!("(not sent: {e})")));
                        }
                    }
                    out.push_str(&sc.prompt());
                    write_all(&out);
                }
                Err(Errno::INTR) | Err(Errno::AGAIN) => {}
                Err(_) => break,
            }
        }
        if let Some((r, _)) = &fifo {
            if fifo_ev.contains(PollFlags::IN) {
                let mut buf = [0u8; 16384];
                if let Ok(n) = rustix::io::read(r, &mut buf) {
                    fifo_buf.extend_from_slice(&buf[..n]);
                }
                let mut out = String::new();
                while let Some(i) = fifo_buf.iter().position(|&b| b == b'\n') {
                    let line: Vec<u8> = fifo_buf.drain(..=i).collect();
                    if std::mem::take(&mut skipping) {
                        continue;
                    }
                    match parse_chat_line(&line[..line.len() - 1]) {
                        Some(ChatLine::Status1(s)) => {
                            sc.status1 = s;
                            out.push_str(&sc.status());
                        }
                        Some(ChatLine::Status2(s)) => {
                            sc.status2 = s;
                            out.push_str(&sc.status());
                        }
                        Some(ChatLine::Message(m)) => out.push_str(&sc.add(m)),
                        // Written to the terminal first: the daemon waits for this before a
                        // prompt freezes the screen (tmux 1.8).
                        Some(ChatLine::Ack(n)) => {
                            write_all(&std::mem::take(&mut out));
                            let _ = send_ctl(dir, &format!("shown {n}\n"));
                        }
                        None => {}
                    }
                }
                if fifo_buf.len() > MAX_FIFO_LINE {
                    fifo_buf.clear();
                    skipping = true;
                }
                if !out.is_empty() {
                    write_all(&out);
                }
            }
        }
    }
    write_all("\x1b[r\x1b[0m\r\n");
    restore_stdin(&saved);
    0
}

#[cfg(test)]
mod tests {

    #[test]
    fn only_a_messages_first_row_starts_at_column_one() {
        // A relay pads its chat so that a row would read like our own message (F5).
        let forged = format!("support (x): {}tunnel closed: support keys removed", "a".repeat(7));
        let rows = wrap(&forged, 20);
        assert!(rows.len() > 1);
        assert!(rows[1..].iter().all(|r| r.starts_with(CONTINUATION)), "{rows:?}");
        assert!(rows.iter().all(|r| r.chars().count() <= 20), "{rows:?}");
        let back: String = rows.iter().enumerate().map(|(i, r)| if i == 0 { &r[..] } else { &r[2..] }).collect();
        assert_eq!(back, forged);
        assert_eq!(wrap("", 20), [""]);
        assert_eq!(wrap("short", 20), ["short"]);
    }
    use super::*;

    #[test]
    fn editor() {
        let mut e = LineEditor::default();
        assert!(e.feed(b"hel").is_empty());
        assert_eq!(e.feed(b"lo\x7f\x7fp!\r"), vec!["help!".to_string()]);
        assert_eq!(e.feed(b"x\x15ab\x1b[Dc\x1bOPd\x03\r"), vec!["abcd".to_string()]);
        // UTF-8 split across reads, backspace removes a whole character.
        assert!(e.feed(&[0xc3]).is_empty());
        assert_eq!(e.feed(&[0xa4, b'x', 0x7f, b'\n']), vec!["ä".to_string()]);
        // Invalid bytes are dropped.
        assert_eq!(e.feed(&[0xff, b'o', b'k', b'\r']), vec!["ok".to_string()]);
        let long = vec![b'a'; MAX_INPUT + 10];
        e.feed(&long);
        assert_eq!(e.text.len(), MAX_INPUT);
    }

    #[test]
    fn fifo_lines() {
        let m = |s: &str| format!("M {}", B64.encode(s));
        assert_eq!(
            parse_chat_line(m("eve> hi\x1b[2J\u{9b}31m\u{202e}x").as_bytes()),
            Some(ChatLine::Message("eve> hi[2J31mx".into()))
        );
        assert_eq!(parse_chat_line(b"S1 "), Some(ChatLine::Status1(String::new())));
        assert_eq!(parse_chat_line(b"S2 !!"), None);
        assert_eq!(parse_chat_line(b"X aGk="), None);
        // The daemon's draw-acknowledgement request: a number, nothing else.
        assert_eq!(parse_chat_line(format!("A {}", B64.encode("17")).as_bytes()), Some(ChatLine::Ack(17)));
        assert_eq!(parse_chat_line(format!("A {}", B64.encode("17; rm")).as_bytes()), None);
    }

    #[test]
    fn only_the_typed_word_grants() {
        let w = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let typed = w(&["answer", "7", "typed"]);
        assert_eq!(resolve_typed(&typed, Some("GRANT")), w(&["answer", "7", "grant"]));
        for other in [None, Some(""), Some("grant"), Some("GRANT "), Some(" GRANT"), Some("yes"), Some("GRANTGRANT")] {
            assert_eq!(resolve_typed(&typed, other), w(&["answer", "7", "deny"]), "{other:?}");
        }
        assert_eq!(resolve_typed(&w(&["quit"]), Some("GRANT")), w(&["quit"]));
        assert_eq!(resolve_typed(&w(&["answer", "7", "grant"]), None), w(&["answer", "7", "grant"]));
    }

    #[test]
    fn ctl_words() {
        let w = |s: &str| s.split(' ').map(String::from).collect::<Vec<_>>();
        assert_eq!(ctl_line(&w("quit")).unwrap(), "quit\n");
        assert_eq!(ctl_line(&w("answer 12 deny")).unwrap(), "answer 12 deny\n");
        assert_eq!(ctl_line(&w("chat aGk=")).unwrap(), "chat aGk=\n");
        for bad in [
            "quit now",
            "answer r;1 grant",
            "answer r-12 deny",
            "answer a:b grant",
            "answer 1234567890 grant",
            "answer 1 maybe",
            "chat !!",
            "bogus",
            "",
        ] {
            assert!(ctl_line(&w(bad)).is_err(), "{bad}");
        }
        let max = B64.encode(vec![b'a'; MAX_INPUT]);
        assert!(format!("chat {max}\n").len() < 4096);
        assert!(ctl_line(&["chat".into(), max]).is_ok());
    }

    #[test]
    fn ctl_writes_one_line_to_the_fifo() {
        let dir = std::env::temp_dir().join(format!("tunl-chat-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir(&dir).unwrap();
        // No fifo / no reader: a clear error, exit 1.
        assert_eq!(send_ctl(&dir, "quit\n"), Err("daemon not running".into()));
        rustix::fs::mknodat(
            rustix::fs::CWD,
            dir.join("ctl.fifo"),
            rustix::fs::FileType::Fifo,
            Mode::from_raw_mode(0o600),
            0,
        )
        .unwrap();
        assert_eq!(ctl(&dir, &["grant".into()]), 1);
        let r = open(dir.join("ctl.fifo"), OFlags::RDONLY | OFlags::NONBLOCK, Mode::empty()).unwrap();
        assert_eq!(ctl(&dir, &["answer".into(), "1".into(), "grant".into()]), 0);
        let mut buf = [0u8; 64];
        let n = rustix::io::read(&r, &mut buf).unwrap();
        assert_eq!(&buf[..n], b"answer 1 grant\n");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn screen_draws_within_bounds() {
        let mut sc = Screen {
            rows: 8,
            cols: 20,
            status1: "s1 ".repeat(20),
            status2: "note".into(),
            history: Default::default(),
            editor: LineEditor::default(),
        };
        let full = sc.full();
        assert!(full.contains("\x1b[3;7r"));
        let add = sc.add("x".repeat(45));
        assert_eq!(add.matches("\x1b[7;1H\n\r").count(), 3);
        assert!(sc.status().contains(&"s1 ".repeat(7)[..20]));
    }
}

/// Properties over random keyboard input (issue 13): however the bytes arrive, the editor gives the
/// same lines, never a control character, never more than `MAX_INPUT` bytes.
#[cfg(test)]
mod props {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn editor_is_split_invariant_and_clean(
            bytes in prop::collection::vec(any::<u8>(), 0..400),
            cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..6),
        ) {
            let mut whole = LineEditor::default();
            let want = whole.feed(&bytes);
            let mut at: Vec<usize> = cuts.iter().map(|c| c.index(bytes.len() + 1)).collect();
            at.extend([0, bytes.len()]);
            at.sort();
            let mut parts = LineEditor::default();
            let mut got = Vec::new();
            for w in at.windows(2) {
                got.extend(parts.feed(&bytes[w[0]..w[1]]));
            }
            prop_assert_eq!(&got, &want);
            prop_assert_eq!(&parts.text, &whole.text);
            for l in want.iter().chain([&whole.text]) {
                prop_assert!(l.len() <= MAX_INPUT);
                prop_assert_eq!(neutralise(l), l.clone());
            }
        }

        #[test]
        fn fifo_lines_never_panic_and_come_out_clean(line in prop::collection::vec(any::<u8>(), 0..200)) {
            if let Some(ChatLine::Status1(t) | ChatLine::Status2(t) | ChatLine::Message(t)) = parse_chat_line(&line) {
                prop_assert_eq!(neutralise(&t), t);
            }
        }
    }
}
