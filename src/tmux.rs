//! tmux control mode (`tmux -C`): an incremental parser for what the server writes, the version check
//! that decides which tmux features we may use, and helpers to build command lines we send back.
//!
//! The parser is pure: the daemon feeds it whatever `read(2)` returned (`push`) and takes events out
//! (`next_event`) until it returns `None`. Replies to commands come as `%begin`/`%end` (or `%error`)
//! blocks in the order the commands were sent. Blocks with `flags` 1 answer lines we wrote on the
//! control client's stdin; a block with `flags` 0 answers the command given on the `tmux -C` command
//! line, and it may come *after* replies to early stdin lines, so match replies to sent commands in
//! FIFO order among the `flags & 1` blocks only. A `%end` for a command that waits (`wait-for`) is
//! printed when the command returns, before the wait is over. Pane output (`%output`) is unescaped in one pass into one buffer per
//! line, which is the hot path (benchmarked on 40 MB of shell output).

/// A line longer than this is dropped (reported as `Event::Other` with a short description).
pub const MAX_LINE: usize = 4 << 20;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// `%output %N VALUE` or `%extended-output %N AGE ... : VALUE`, with VALUE unescaped.
    Output {
        pane: u32,
        data: Vec<u8>,
    },
    /// A reply block starts. Informational: the whole reply comes with `End`/`Error`.
    Begin {
        time: u64,
        num: u64,
        flags: u32,
    },
    /// A command succeeded; `body` holds its output lines (without the newline).
    End {
        time: u64,
        num: u64,
        flags: u32,
        body: Vec<Vec<u8>>,
    },
    /// A command failed; `body` holds the error message lines.
    Error {
        time: u64,
        num: u64,
        flags: u32,
        body: Vec<Vec<u8>>,
    },
    /// `%exit [reason]`: the control client is going away.
    Exit(Option<String>),
    LayoutChange {
        window: u32,
        layout: String,
    },
    WindowAdd(u32),
    WindowClose(u32),
    WindowRenamed {
        window: u32,
        name: String,
    },
    UnlinkedWindowClose(u32),
    WindowPaneChanged {
        window: u32,
        pane: u32,
    },
    SessionChanged {
        session: u32,
        name: String,
    },
    SessionsChanged,
    /// `%pause %N` (flow control, tmux >= 3.2): output of the pane is held until we continue it.
    Pause(u32),
    /// `%continue %N`.
    Continue(u32),
    /// Any other notification, or a description of a dropped over-long line.
    Other(Vec<u8>),
}

struct Block {
    time: u64,
    num: u64,
    flags: u32,
    body: Vec<Vec<u8>>,
}

/// Incremental control-mode parser; see the module documentation.
#[derive(Default)]
pub struct ControlParser {
    buf: Vec<u8>,
    /// Start of the unparsed data in `buf` (consumed bytes are dropped lazily, in bulk).
    pos: usize,
    /// How far `buf[pos..]` has already been searched for a newline.
    scanned: usize,
    block: Option<Block>,
    /// Inside an over-long line: skip until the next newline.
    skipping: bool,
    skipped: usize,
    first_line: bool,
}

impl ControlParser {
    pub fn new() -> ControlParser {
        ControlParser { first_line: true, ..Default::default() }
    }

    /// Append bytes read from the control client's stdout.
    pub fn push(&mut self, data: &[u8]) {
        if self.pos > 0 && (self.pos >= self.buf.len() || self.pos > 64 * 1024) {
            self.buf.drain(..self.pos);
            self.pos = 0;
        }
        self.buf.extend_from_slice(data);
    }

    /// Bytes buffered but not yet parsed (an incomplete line).
    #[cfg(test)]
    pub fn pending(&self) -> usize {
        self.buf.len() - self.pos
    }

    /// The next complete event, or `None` when more input is needed.
    pub fn next_event(&mut self) -> Option<Event> {
        loop {
            let start = self.pos + self.scanned;
            let nl = match self.buf[start..].iter().position(|&b| b == b'\n') {
                Some(i) => start + i,
                None => {
                    self.scanned = self.buf.len() - self.pos;
                    if self.scanned > MAX_LINE {
                        self.skipping = true;
                        self.skipped += self.scanned;
                        self.pos = self.buf.len();
                        self.scanned = 0;
                    }
                    return None;
                }
            };
            let line_start = self.pos;
            self.pos = nl + 1;
            self.scanned = 0;
            if self.skipping || nl - line_start > MAX_LINE {
                let n = self.skipped + (nl - line_start);
                self.skipping = false;
                self.skipped = 0;
                return Some(Event::Other(format!("dropped an over-long line of {n} bytes").into_bytes()));
            }
            // Split borrows: take the line out by range to keep `self` usable.
            let (a, b) = (line_start, nl);
            if let Some(ev) = self.line(a, b) {
                return Some(ev);
            }
        }
    }

    fn line(&mut self, a: usize, b: usize) -> Option<Event> {
        let mut a = a;
        if self.first_line {
            self.first_line = false;
            // `tmux -CC` starts with a DCS introducer; tolerate it.
            if self.buf[a..b].starts_with(b"\x1bP1000p") {
                a += 7;
            }
        }
        let line = &self.buf[a..b];
        if let Some(block) = &mut self.block {
            for (tag, is_end) in [(&b"%end "[..], true), (&b"%error "[..], false)] {
                if let Some(rest) = line.strip_prefix(tag) {
                    if let Some((t, n, f)) = guard_args(rest) {
                        if t == block.time && n == block.num && f == block.flags {
                            let blk = self.block.take().unwrap();
                            let (time, num, flags, body) = (blk.time, blk.num, blk.flags, blk.body);
                            return Some(if is_end {
                                Event::End { time, num, flags, body }
                            } else {
                                Event::Error { time, num, flags, body }
                            });
                        }
                    }
                }
            }
            block.body.push(line.to_vec());
            return None;
        }
        if let Some(rest) = line.strip_prefix(b"%output ") {
            if let Some((pane, value)) = pane_and_rest(rest) {
                return Some(Event::Output { pane, data: unescape(value) });
            }
        } else if let Some(rest) = line.strip_prefix(b"%extended-output ") {
            if let Some((pane, rest)) = pane_and_rest(rest) {
                // AGE and any future arguments up to a single ':' are ignored.
                if let Some(i) = find_colon_arg(rest) {
                    return Some(Event::Output { pane, data: unescape(&rest[i..]) });
                }
            }
        } else if let Some(rest) = line.strip_prefix(b"%begin ") {
            if let Some((time, num, flags)) = guard_args(rest) {
                self.block = Some(Block { time, num, flags, body: Vec::new() });
                return Some(Event::Begin { time, num, flags });
            }
        } else if line == b"%exit" || line.starts_with(b"%exit ") {
            let reason = line.get(6..).map(|r| String::from_utf8_lossy(r).into_owned()).filter(|r| !r.is_empty());
            return Some(Event::Exit(reason));
        } else if let Some(ev) = notification(line) {
            return Some(ev);
        }
        Some(Event::Other(line.to_vec()))
    }
}

/// `TIME NUM FLAGS` of a `%begin`/`%end`/`%error` line.
fn guard_args(rest: &[u8]) -> Option<(u64, u64, u32)> {
    let s = std::str::from_utf8(rest).ok()?;
    let mut it = s.split(' ');
    let t = it.next()?.parse().ok()?;
    let n = it.next()?.parse().ok()?;
    let f = it.next()?.parse().ok()?;
    Some((t, n, f))
}

fn id_with(sigil: u8, s: &[u8]) -> Option<u32> {
    let digits = s.strip_prefix(&[sigil])?;
    if digits.is_empty() || digits.len() > 9 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(digits).ok()?.parse().ok()
}

/// `%N REST` -> (N, REST); REST may be empty.
fn pane_and_rest(s: &[u8]) -> Option<(u32, &[u8])> {
    let (id, rest) = match s.iter().position(|&b| b == b' ') {
        Some(i) => (&s[..i], &s[i + 1..]),
        None => (s, &s[s.len()..]),
    };
    Some((id_with(b'%', id)?, rest))
}

/// Index just after the `: ` that ends the argument list of `%extended-output`.
fn find_colon_arg(s: &[u8]) -> Option<usize> {
    let mut i = 0;
    loop {
        let end = s[i..].iter().position(|&b| b == b' ').map(|p| i + p);
        let word = &s[i..end.unwrap_or(s.len())];
        if word == b":" {
            return Some(end.map_or(s.len(), |e| e + 1));
        }
        i = end? + 1;
    }
}

fn notification(line: &[u8]) -> Option<Event> {
    let s = std::str::from_utf8(line).ok()?;
    let (verb, rest) = s.split_once(' ').unwrap_or((s, ""));
    let one = |sigil: u8| id_with(sigil, rest.split(' ').next()?.as_bytes());
    let two = |sigil: u8| -> Option<(u32, &str)> {
        let (id, tail) = rest.split_once(' ').unwrap_or((rest, ""));
        Some((id_with(sigil, id.as_bytes())?, tail))
    };
    Some(match verb {
        "%layout-change" => {
            let (window, tail) = two(b'@')?;
            Event::LayoutChange { window, layout: tail.split(' ').next()?.to_string() }
        }
        "%window-add" => Event::WindowAdd(one(b'@')?),
        "%window-close" => Event::WindowClose(one(b'@')?),
        "%unlinked-window-close" => Event::UnlinkedWindowClose(one(b'@')?),
        "%window-renamed" => {
            let (window, name) = two(b'@')?;
            Event::WindowRenamed { window, name: name.to_string() }
        }
        "%window-pane-changed" => {
            let (window, tail) = two(b'@')?;
            Event::WindowPaneChanged { window, pane: id_with(b'%', tail.as_bytes())? }
        }
        "%session-changed" => {
            let (session, name) = two(b'$')?;
            Event::SessionChanged { session, name: name.to_string() }
        }
        "%sessions-changed" => Event::SessionsChanged,
        "%pause" => Event::Pause(one(b'%')?),
        "%continue" => Event::Continue(one(b'%')?),
        _ => return None,
    })
}

/// Undo tmux's `%output` escaping: `\ooo` (three octal digits) is one byte; everything else is literal.
pub fn unescape(v: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(v.len());
    let mut i = 0;
    while i < v.len() {
        // Copy the run up to the next backslash in one go.
        match v[i..].iter().position(|&b| b == b'\\') {
            None => {
                out.extend_from_slice(&v[i..]);
                break;
            }
            Some(p) => {
                out.extend_from_slice(&v[i..i + p]);
                i += p;
            }
        }
        let d = &v[i + 1..v.len().min(i + 4)];
        if d.len() == 3 && d.iter().all(|&c| (b'0'..=b'7').contains(&c)) {
            out.push(((d[0] - b'0') << 6) | ((d[1] - b'0') << 3) | (d[2] - b'0'));
            i += 4;
        } else {
            out.push(b'\\');
            i += 1;
        }
    }
    out
}

/// `tmux -V` output -> (major, minor). `None` for anything we cannot read (a distribution's own
/// naming such as `openbsd-7.1`, `master`): the caller then assumes the oldest tmux we support.
/// Development builds (`next-3.4`) and letters/rc suffixes (`3.3a`, `3.4-rc`) count as that release.
pub fn parse_version(s: &str) -> Option<(u32, u32)> {
    let v = s.trim().strip_prefix("tmux ")?.trim();
    let v = v.strip_prefix("next-").unwrap_or(v);
    let (major, rest) = v.split_once('.')?;
    let major: u32 = major.parse().ok()?;
    let minor_digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    let minor: u32 = minor_digits.parse().ok()?;
    Some((major, minor))
}

/// The oldest tmux the manual promises to work with.
pub const OLDEST: (u32, u32) = (1, 8);

/// What the installed tmux can do, decided once from `tmux -V`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Features {
    pub version: (u32, u32),
    /// `display-menu` (3.0).
    pub menu: bool,
    /// `display-popup` (3.2).
    pub popup: bool,
    /// `refresh-client -f pause-after=N`, `%pause`/`%continue`, `%extended-output` (3.2).
    pub flow_control: bool,
    /// Client flag `ignore-size`, so the control client never shrinks the window (3.2, `-f`).
    pub ignore_size: bool,
    /// `send-keys -H` (3.0).
    pub send_keys_hex: bool,
    /// Pane options (`set-option -p`, per-pane `@user` options, per-pane `remain-on-exit`) (3.0).
    pub pane_options: bool,
    /// `pane-border-status` / `pane-border-format` (2.3).
    pub pane_border_status: bool,
    /// `bind -T table`, `if-shell -F` (2.1).
    pub key_tables: bool,
    /// `set-hook` with `pane-died` (2.4 is where hooks settled; earlier is skipped).
    pub hooks: bool,
    /// The yacc command parser with `\ooo` escapes and `{ }` blocks (2.9 had it, 3.0 for safety).
    pub new_parser: bool,
}

impl Features {
    pub fn from_version(v: Option<(u32, u32)>) -> Features {
        let version = v.unwrap_or(OLDEST);
        let at = |m: u32, n: u32| version >= (m, n);
        Features {
            version,
            menu: at(3, 0),
            popup: at(3, 2),
            flow_control: at(3, 2),
            ignore_size: at(3, 2),
            send_keys_hex: at(3, 0),
            pane_options: at(3, 0),
            pane_border_status: at(2, 3),
            key_tables: at(2, 1),
            hooks: at(2, 4),
            new_parser: at(3, 0),
        }
    }

    /// Of the `tmux` on PATH, asked once (`tmux -V`); an unreadable answer counts as the oldest.
    pub fn installed() -> Features {
        let out = std::process::Command::new("tmux").arg("-V").output().map(|o| o.stdout).unwrap_or_default();
        Features::from_version_output(&String::from_utf8_lossy(&out))
    }

    /// From the text `tmux -V` printed.
    pub fn from_version_output(s: &str) -> Features {
        Features::from_version(parse_version(s))
    }
}

/// Quote one argument for a tmux command line (control mode, configuration file, key binding body).
///
/// Printable text goes inside single quotes (nothing is special there); a `'` becomes `\'` outside
/// the quotes; control bytes (which would end a control-mode command line) become `\ooo` outside the
/// quotes, which the tmux >= 3.0 parser understands. Older tmux cannot carry control bytes in an
/// argument at all; callers avoid that (see `send_keys`).
pub fn quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    let mut open = false;
    for c in s.chars() {
        if c == '\'' || c.is_control() {
            if open {
                out.push('\'');
                open = false;
            }
            if c == '\'' {
                out.push_str("\\'");
            } else {
                let mut b = [0u8; 4];
                for byte in c.encode_utf8(&mut b).bytes() {
                    out.push_str(&format!("\\{byte:03o}"));
                }
            }
        } else {
            if !open {
                out.push('\'');
                open = true;
            }
            out.push(c);
        }
    }
    if open {
        out.push('\'');
    }
    if out.is_empty() {
        out.push_str("''");
    }
    out
}

/// Escape text for a place where tmux expands formats (menu names and titles, `run-shell`,
/// `display-message`, status line): `#` starts a format, `##` is a literal `#`.
pub fn fmt_escape(s: &str) -> String {
    s.replace('#', "##")
}

/// Quote one word for `/bin/sh` (used inside `run-shell` commands).
pub fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// How many key bytes one `send-keys` command carries (keeps control-mode lines short).
pub const KEYS_PER_COMMAND: usize = 512;

/// `send-keys -H -t %N 1b 5b 41 ...` commands, one per chunk of `KEYS_PER_COMMAND` bytes. Every byte
/// reaches the pane unchanged (tmux >= 3.0).
pub fn send_keys_hex(pane: u32, bytes: &[u8]) -> Vec<String> {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    bytes
        .chunks(KEYS_PER_COMMAND)
        .map(|chunk| {
            let mut s = String::with_capacity(24 + chunk.len() * 3);
            s.push_str("send-keys -H -t %");
            s.push_str(&pane.to_string());
            for &b in chunk {
                s.push(' ');
                s.push(HEX[(b >> 4) as usize] as char);
                s.push(HEX[(b & 15) as usize] as char);
            }
            s
        })
        .collect()
}

/// tmux key name for a control byte (what the older `send-keys` understands).
fn control_key_name(b: u8) -> Option<&'static str> {
    const NAMES: [&str; 32] = [
        "C-Space", "C-a", "C-b", "C-c", "C-d", "C-e", "C-f", "C-g", "C-h", "Tab", "C-j", "C-k", "C-l", "Enter", "C-n",
        "C-o", "C-p", "C-q", "C-r", "C-s", "C-t", "C-u", "C-v", "C-w", "C-x", "C-y", "C-z", "Escape", "C-\\", "C-]",
        "C-^", "C-_",
    ];
    match b {
        0..=31 => Some(NAMES[b as usize]),
        0x7f => Some("BSpace"),
        _ => None,
    }
}

/// `send-keys` commands for tmux < 3.0: printable runs as `-l` literals, control bytes as key names.
/// Invalid UTF-8 is sent as U+FFFD (old tmux cannot inject raw bytes).
pub fn send_keys_literal(pane: u32, bytes: &[u8]) -> Vec<String> {
    let text = String::from_utf8_lossy(bytes);
    let mut cmds = Vec::new();
    let mut lit = String::new();
    let mut names: Vec<&str> = Vec::new();
    let flush_lit = |lit: &mut String, cmds: &mut Vec<String>| {
        if !lit.is_empty() {
            cmds.push(format!("send-keys -t %{pane} -l {}", quote(lit)));
            lit.clear();
        }
    };
    let flush_names = |names: &mut Vec<&str>, cmds: &mut Vec<String>| {
        if !names.is_empty() {
            let quoted: Vec<String> = names.iter().map(|n| quote(n)).collect();
            cmds.push(format!("send-keys -t %{pane} {}", quoted.join(" ")));
            names.clear();
        }
    };
    for c in text.chars() {
        match u8::try_from(c as u32).ok().and_then(control_key_name) {
            Some(name) => {
                flush_lit(&mut lit, &mut cmds);
                names.push(name);
                if names.len() >= 64 {
                    flush_names(&mut names, &mut cmds);
                }
            }
            None => {
                flush_names(&mut names, &mut cmds);
                lit.push(c);
                if lit.len() >= KEYS_PER_COMMAND {
                    flush_lit(&mut lit, &mut cmds);
                }
            }
        }
    }
    flush_lit(&mut lit, &mut cmds);
    flush_names(&mut names, &mut cmds);
    cmds
}

/// The right `send-keys` flavour for this tmux.
pub fn send_keys(features: &Features, pane: u32, bytes: &[u8]) -> Vec<String> {
    if features.send_keys_hex { send_keys_hex(pane, bytes) } else { send_keys_literal(pane, bytes) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all(p: &mut ControlParser) -> Vec<Event> {
        std::iter::from_fn(|| p.next_event()).collect()
    }

    #[test]
    fn captured_session() {
        // Shape of a real `tmux -C new-session` start (tmux 3.3a), split at awkward places.
        let sample: &[u8] = b"%begin 1700000000 270 0\n%end 1700000000 270 0\n%window-add @0\n\
%sessions-changed\n%session-changed $0 tunl\n%output %0 a\\033b\\134c\\015\\012\n\
%layout-change @0 b25f,80x24,0,0,2 b25f,80x24,0,0,2 *\n%begin 1700000001 271 1\n\
0: ksh* (1 panes) [80x24]\n%end looks like a guard but is not\n%end 1700000001 271 1\n\
%begin 1700000001 272 1\nparse error: unknown command: bogus\n%error 1700000001 272 1\n\
%extended-output %3 12 : x\\\\y\n%pause %3\n%continue %3\n%window-pane-changed @1 %4\n\
%window-renamed @1 my name\n%unlinked-window-close @7\n%client-detached /dev/pts/3\n%exit\n%exit server exited\n";
        for split in [1, 2, 3, 7, 64, sample.len()] {
            let mut p = ControlParser::new();
            let mut evs = Vec::new();
            for chunk in sample.chunks(split) {
                p.push(chunk);
                evs.extend(all(&mut p));
            }
            assert_eq!(p.pending(), 0);
            let expect = vec![
                Event::Begin { time: 1700000000, num: 270, flags: 0 },
                Event::End { time: 1700000000, num: 270, flags: 0, body: vec![] },
                Event::WindowAdd(0),
                Event::SessionsChanged,
                Event::SessionChanged { session: 0, name: "tunl".into() },
                Event::Output { pane: 0, data: b"a\x1bb\\c\r\n".to_vec() },
                Event::LayoutChange { window: 0, layout: "b25f,80x24,0,0,2".into() },
                Event::Begin { time: 1700000001, num: 271, flags: 1 },
                Event::End {
                    time: 1700000001,
                    num: 271,
                    flags: 1,
                    body: vec![b"0: ksh* (1 panes) [80x24]".to_vec(), b"%end looks like a guard but is not".to_vec()],
                },
                Event::Begin { time: 1700000001, num: 272, flags: 1 },
                Event::Error {
                    time: 1700000001,
                    num: 272,
                    flags: 1,
                    body: vec![b"parse error: unknown command: bogus".to_vec()],
                },
                // Not an octal escape: a lone backslash stays literal.
                Event::Output { pane: 3, data: b"x\\\\y".to_vec() },
                Event::Pause(3),
                Event::Continue(3),
                Event::WindowPaneChanged { window: 1, pane: 4 },
                Event::WindowRenamed { window: 1, name: "my name".into() },
                Event::UnlinkedWindowClose(7),
                Event::Other(b"%client-detached /dev/pts/3".to_vec()),
                Event::Exit(None),
                Event::Exit(Some("server exited".into())),
            ];
            assert_eq!(evs, expect, "split {split}");
        }
    }

    #[test]
    fn unescape_edges() {
        assert_eq!(unescape(b""), b"");
        assert_eq!(unescape(b"\\000\\377\\"), b"\x00\xff\\");
        assert_eq!(unescape(b"\\12"), b"\\12");
        assert_eq!(unescape(b"\\89x"), b"\\89x");
        assert_eq!(unescape("ä\\011".as_bytes()), "ä\t".as_bytes());
        let mut p = ControlParser::new();
        p.push(b"%output %12\n%output %x bad\n");
        assert_eq!(p.next_event(), Some(Event::Output { pane: 12, data: vec![] }));
        assert_eq!(p.next_event(), Some(Event::Other(b"%output %x bad".to_vec())));
    }

    #[test]
    fn over_long_lines_are_dropped() {
        let mut p = ControlParser::new();
        let big = vec![b'x'; 1 << 20];
        p.push(b"%output %1 ");
        for _ in 0..5 {
            p.push(&big);
            assert_eq!(p.next_event(), None);
        }
        p.push(b"tail\n%output %1 ok\n");
        match p.next_event() {
            Some(Event::Other(m)) => assert!(String::from_utf8(m).unwrap().starts_with("dropped")),
            e => panic!("{e:?}"),
        }
        assert_eq!(p.next_event(), Some(Event::Output { pane: 1, data: b"ok".to_vec() }));
        assert!(p.buf.capacity() < 16 << 20);
    }

    #[test]
    fn versions() {
        assert_eq!(parse_version("tmux 3.3a\n"), Some((3, 3)));
        assert_eq!(parse_version("tmux 1.8"), Some((1, 8)));
        assert_eq!(parse_version("tmux next-3.4"), Some((3, 4)));
        assert_eq!(parse_version("tmux 3.4-rc"), Some((3, 4)));
        assert_eq!(parse_version("tmux openbsd-7.1"), None);
        assert_eq!(parse_version("tmux master"), None);
        assert_eq!(parse_version(""), None);
        let old = Features::from_version_output("tmux openbsd-7.1");
        assert_eq!(old.version, OLDEST);
        assert!(!old.menu && !old.send_keys_hex && !old.pane_border_status);
        let f = Features::from_version_output("tmux 3.2a");
        assert!(f.menu && f.popup && f.flow_control && f.send_keys_hex);
        let f = Features::from_version_output("tmux 3.1c");
        assert!(f.menu && !f.popup);
    }

    #[test]
    fn quoting() {
        assert_eq!(quote(""), "''");
        assert_eq!(quote("a b"), "'a b'");
        assert_eq!(quote("it's"), "'it'\\''s'");
        assert_eq!(quote("a\nb"), "'a'\\012'b'");
        assert_eq!(quote("$HOME ~ \\ \" ; #{x}"), "'$HOME ~ \\ \" ; #{x}'");
        assert_eq!(fmt_escape("a#b"), "a##b");
        assert_eq!(sh_quote("a'b"), "'a'\\''b'");
    }

    #[test]
    fn send_keys_forms() {
        assert_eq!(send_keys_hex(3, b"\x1b[A\xc3"), vec!["send-keys -H -t %3 1b 5b 41 c3".to_string()]);
        assert_eq!(send_keys_hex(1, &[b'a'; 1025]).len(), 3);
        assert_eq!(
            send_keys_literal(2, b"ls -l\r\x03it's"),
            vec!["send-keys -t %2 -l 'ls -l'", "send-keys -t %2 'Enter' 'C-c'", "send-keys -t %2 -l 'it'\\''s'",]
        );
    }

    /// A private tmux server on a socket in a temporary directory; killed on drop (also on panic).
    struct Server {
        dir: std::path::PathBuf,
    }
    impl Server {
        fn sock(&self) -> std::path::PathBuf {
            self.dir.join("s")
        }
    }
    impl Drop for Server {
        fn drop(&mut self) {
            let _ = std::process::Command::new("tmux")
                .arg("-S")
                .arg(self.sock())
                .arg("kill-server")
                .stderr(std::process::Stdio::null())
                .status();
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    fn tmux_available() -> bool {
        std::process::Command::new("tmux").arg("-V").output().map(|o| o.status.success()).unwrap_or(false)
    }

    fn private_server(tag: &str) -> Server {
        let dir = std::env::temp_dir().join(format!("tunl-tmux-test-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir(&dir).unwrap();
        Server { dir }
    }

    /// Run a control client on the private server, feed `input` lines, collect events until `done`.
    fn control_session(srv: &Server, input: &str, mut done: impl FnMut(&[Event]) -> bool) -> Vec<Event> {
        use std::io::{Read, Write};
        use std::process::{Command, Stdio};
        let mut child = Command::new("tmux")
            .arg("-S")
            .arg(srv.sock())
            .args(["-f", "/dev/null", "-C", "attach", "-t", "t"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut stdin = child.stdin.take().unwrap();
        let mut sent = false;
        let mut out = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = out.read(&mut buf) {
                if n == 0 || tx.send(buf[..n].to_vec()).is_err() {
                    break;
                }
            }
        });
        let mut p = ControlParser::new();
        let mut evs = Vec::new();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !done(&evs) {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match rx.recv_timeout(left) {
                Ok(chunk) => {
                    p.push(&chunk);
                    evs.extend(std::iter::from_fn(|| p.next_event()));
                    // Lines written before the attach completes may run before it: wait until attached.
                    if !sent && evs.iter().any(|e| matches!(e, Event::SessionChanged { .. })) {
                        stdin.write_all(input.as_bytes()).unwrap();
                        sent = true;
                    }
                }
                Err(_) => break,
            }
        }
        drop(stdin);
        let _ = child.kill();
        let _ = child.wait();
        evs
    }

    fn outputs(evs: &[Event]) -> Vec<u8> {
        evs.iter()
            .filter_map(|e| if let Event::Output { data, .. } = e { Some(data.as_slice()) } else { None })
            .flatten()
            .copied()
            .collect()
    }

    #[test]
    fn real_tmux_output_is_exact() {
        if !tmux_available() {
            eprintln!("tmux not installed; skipping");
            return;
        }
        let srv = private_server("out");
        // The pane prints only after the control client has attached (it waits for a wait-for signal).
        let st = std::process::Command::new("tmux")
            .arg("-S")
            .arg(srv.sock())
            .args(["-f", "/dev/null", "new-session", "-d", "-s", "t", "-x", "80", "-y", "24"])
            .arg(format!(
                "tmux -S {} wait-for go; printf 'a\\033b\\\\c\\n'; sleep 5",
                sh_quote(&srv.sock().to_string_lossy())
            ))
            .status()
            .unwrap();
        assert!(st.success());
        let evs = control_session(&srv, "wait-for -S go\n", |evs| outputs(evs).ends_with(b"\r\n"));
        assert_eq!(outputs(&evs), b"a\x1bb\\c\r\n", "{evs:?}");
        // The reply to the attach on the command line and to our wait-for: two %end blocks, in order.
        let ends: Vec<u64> =
            evs.iter().filter_map(|e| if let Event::End { num, .. } = e { Some(*num) } else { None }).collect();
        assert!(ends.len() >= 2 && ends[1] > ends[0], "{evs:?}");
    }

    #[test]
    fn real_tmux_send_keys_hex_is_exact() {
        if !tmux_available() || !Features::from_version_output(&tmux_version()).send_keys_hex {
            return;
        }
        let srv = private_server("keys");
        let out = srv.dir.join("got");
        let keys: Vec<u8> = b"\x01\x03\x04\x1b[A\x7f\r\n\t'\"\\ ;#{x} \xc3\xa4\xe2\x82\xac\xff end".to_vec();
        let script = format!(
            "stty raw -echo; tmux -S {sock} wait-for -S ready; head -c {} > {}",
            keys.len(),
            sh_quote(&out.to_string_lossy()),
            sock = sh_quote(&srv.sock().to_string_lossy())
        );
        let st = std::process::Command::new("tmux")
            .arg("-S")
            .arg(srv.sock())
            .args(["-f", "/dev/null", "new-session", "-d", "-s", "t", "-x", "80", "-y", "24"])
            .arg(script)
            .status()
            .unwrap();
        assert!(st.success());
        // Keys are sent only once the pane's tty is raw, so the line discipline passes every byte.
        let mut input = String::from("wait-for ready\n");
        for c in send_keys_hex(0, &keys) {
            input.push_str(&c);
            input.push('\n');
        }
        // A `%end` for `wait-for` comes before the wait is over (tmux prints the guard when the command
        // returns), so completion is seen as the pane ending: its last command, then `%exit`.
        let evs = control_session(&srv, &input, |evs| evs.iter().any(|e| matches!(e, Event::Exit(_))));
        assert!(!evs.iter().any(|e| matches!(e, Event::Error { .. })), "{evs:?}");
        assert_eq!(std::fs::read(&out).ok(), Some(keys), "{evs:?}");
    }

    fn tmux_version() -> String {
        std::process::Command::new("tmux")
            .arg("-V")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default()
    }
}
