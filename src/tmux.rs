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

/// `TIME NUM FLAGS` of a `%begin`/`%end`/`%error` line. tmux 1.8 prints `TIME NUM` only, and only
/// for lines the control client wrote (the command on its command line runs before it has a
/// session, which is when 1.8 prints guards): those count as flags 1.
fn guard_args(rest: &[u8]) -> Option<(u64, u64, u32)> {
    let s = std::str::from_utf8(rest).ok()?;
    let mut it = s.split(' ');
    let t = it.next()?.parse().ok()?;
    let n = it.next()?.parse().ok()?;
    let f = match it.next() {
        None => 1,
        Some(f) => f.parse().ok()?,
    };
    if it.next().is_some() {
        return None;
    }
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

/// A tmux feature we use, or an old behaviour we work around.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Feat {
    /// `new-session -c DIR`.
    NewSessionCwd,
    /// Option values (`#{@linbit-status}`, `#{@linbit-role}`) in formats.
    OptionFormats,
    /// `if-shell -F`.
    IfShellFormat,
    /// Named paste buffers (before: numbered, a stack).
    NamedBuffers,
    /// `=NAME` as an exact session/window target.
    ExactTarget,
    /// `bind-key -T TABLE`, `switch-client -T`, `list-keys` printing `-T`.
    KeyTables,
    /// Keys above 0x7f given to `send-keys` are Unicode code points (before: single bytes).
    UnicodeKeys,
    /// `break-pane -s SRC` (before: `break-pane -t SRC`).
    BreakPaneSource,
    /// `pane-border-status` / `pane-border-format`.
    PaneBorderStatus,
    /// `break-pane -n NAME`; `#{==:}`/`#{&&:}` comparisons in formats.
    BreakPaneName,
    /// Control clients do not size windows until `refresh-client -C`.
    ControlWithoutSize,
    /// `command-prompt -1` (one key).
    PromptOneKey,
    /// `%%%` in a `command-prompt` template: the answer with `"`, `\`, `$` escaped, `;` kept.
    PromptQuoteEscape,
    /// The panes go on drawing while a status-line prompt or message is up (1.8 freezes the
    /// client's terminal until it is gone).
    PromptWithoutFreeze,
    /// `default-size` and `window-size` options, `resize-window`.
    DefaultSize,
    /// A status line too long for the terminal is cut (before: left and right that do not fit
    /// together blank the whole line).
    StatusCut,
    /// The yacc command parser (`\ooo`, `{ }`, `%if`), and `'` inside `"..."` unchanged.
    NewParser,
    /// `send-keys -H` (keys as hex bytes, exact).
    SendKeysHex,
    /// `display-menu`.
    Menu,
    /// Pane options (`set-option -p`, per-pane `@user` options and `remain-on-exit`).
    PaneOptions,
    /// `display-popup`; `display-menu -x C -y C`; `refresh-client -f pause-after`, `%pause`,
    /// `%extended-output`; client flag `ignore-size`.
    Popup,
    /// `unbind-key -q`.
    UnbindQuiet,
    /// `remain-on-exit-format`.
    RemainOnExitFormat,
}

/// Every feature with the first release that has it, from tmux's CHANGES and the sources of the
/// tags in `../shared/vendor` (1.8, 2.7, 3.0a, 3.2a, 3.5a). Where CHANGES is silent the entry is the
/// first of those tags that has it, and the code keeps the older behaviour for the versions between.
pub const TABLE: &[(Feat, (u32, u32), &str)] = &[
    (Feat::NewSessionCwd, (1, 9), "new-session -c (1.9 CHANGES; 1.8 starts in the client's cwd)"),
    (Feat::IfShellFormat, (2, 0), "if-shell -F (2.0 CHANGES)"),
    (Feat::NamedBuffers, (2, 0), "set-buffer names buffers (2.0 CHANGES)"),
    (Feat::ExactTarget, (2, 1), "=name exact targets (2.1 CHANGES)"),
    (Feat::KeyTables, (2, 1), "bind -T, switch-client -T (2.1 CHANGES)"),
    (Feat::UnicodeKeys, (2, 2), "keys above 0x7f are code points (2.2 UTF-8 rework; 1.8 writes bytes)"),
    (Feat::BreakPaneSource, (2, 2), "break-pane -s/-t split (tmux issue #318, released in 2.2)"),
    (Feat::PaneBorderStatus, (2, 3), "pane-border-status (2.3 CHANGES)"),
    (Feat::BreakPaneName, (2, 4), "break-pane -n, #{==:} comparisons (2.4 CHANGES)"),
    (Feat::ControlWithoutSize, (2, 6), "control clients do not size windows (2.6 CHANGES)"),
    (Feat::OptionFormats, (2, 7), "#{@option} in formats (1.8's format_find has no options; 2.7 has)"),
    (Feat::PromptOneKey, (2, 7), "command-prompt -1 (not in 1.8; in 2.7)"),
    (Feat::PromptQuoteEscape, (2, 7), "%%% in prompt templates (not in 1.8's cmd_template_replace; in 2.7's)"),
    (
        Feat::PromptWithoutFreeze,
        (2, 7),
        "panes drawn under a prompt (1.8's status_prompt_set sets TTY_FREEZE; 2.7's not)",
    ),
    (Feat::DefaultSize, (2, 9), "default-size, window-size (2.9 CHANGES)"),
    (Feat::StatusCut, (2, 9), "status line drawn by format_draw, cut to fit (2.9 CHANGES; 2.7's status.c blanks it)"),
    (Feat::NewParser, (3, 0), "yacc command parser (3.0 CHANGES)"),
    (Feat::SendKeysHex, (3, 0), "send-keys -H (3.0 CHANGES)"),
    (Feat::Menu, (3, 0), "display-menu (3.0 CHANGES)"),
    (Feat::PaneOptions, (3, 0), "pane options (3.0 CHANGES)"),
    (Feat::Popup, (3, 2), "display-popup, menu -x C, pause-after, ignore-size (3.2 CHANGES)"),
    (Feat::UnbindQuiet, (3, 2), "unbind-key -q (3.2 CHANGES)"),
    (Feat::RemainOnExitFormat, (3, 3), "remain-on-exit-format (3.3 CHANGES)"),
];

/// The release that brought `f`.
pub fn since(f: Feat) -> (u32, u32) {
    TABLE.iter().find(|(g, _, _)| *g == f).map(|(_, v, _)| *v).unwrap_or((u32::MAX, 0))
}

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
    /// The yacc command parser (3.0).
    pub new_parser: bool,
}

impl Features {
    pub fn from_version(v: Option<(u32, u32)>) -> Features {
        let version = v.unwrap_or(OLDEST);
        let at = |f: Feat| version >= since(f);
        Features {
            version,
            menu: at(Feat::Menu),
            popup: at(Feat::Popup),
            flow_control: at(Feat::Popup),
            ignore_size: at(Feat::Popup),
            send_keys_hex: at(Feat::SendKeysHex),
            pane_options: at(Feat::PaneOptions),
            pane_border_status: at(Feat::PaneBorderStatus),
            key_tables: at(Feat::KeyTables),
            new_parser: at(Feat::NewParser),
        }
    }

    /// Does this tmux have `f`?
    pub fn has(&self, f: Feat) -> bool {
        self.version >= since(f)
    }

    /// Of the `tmux` on PATH, asked once (`tmux -V`, bounded); an unreadable answer counts as the
    /// oldest.
    /// tmux 3.2 and 3.2a crash when a `remain-on-exit` pane dies with output queued for a control
    /// client: there the shell pane's first process is our keeper (`keeper.rs`), which never lets
    /// the pane die.
    pub fn keeps_shell_alive(&self) -> bool {
        ((3, 2)..(3, 3)).contains(&self.version)
    }

    pub fn installed() -> Features {
        let mut c = std::process::Command::new("tmux");
        c.arg("-V").env_remove("TMUX");
        let out = crate::proc::run_with_timeout(&mut c, std::time::Duration::from_secs(5))
            .map(|f| f.stdout)
            .unwrap_or_default();
        Features::from_version_output(&String::from_utf8_lossy(&out))
    }

    /// From the text `tmux -V` printed.
    pub fn from_version_output(s: &str) -> Features {
        Features::from_version(parse_version(s))
    }

    /// `=NAME` where tmux matches names exactly, plain `NAME` before 2.1.
    pub fn exact(&self, name: &str) -> String {
        if self.has(Feat::ExactTarget) { format!("={name}") } else { name.to_string() }
    }
}

/// Quote one argument for a tmux command line (control mode, configuration file, key binding body),
/// so that every tmux parser reads it the same way: cmd-string.c before 3.0 and cmd-parse.y after.
///
/// Text goes inside single quotes, where neither parser treats anything specially (not `\`, `$`,
/// `#`, `;`, `~`); a `'` closes the quotes, is written as `"'"` and the quotes reopen (the old parser
/// reads `\'` outside quotes as a backslash and a new quoted string: review finding F18). Two things
/// no quoting carries the same way in both: control characters (they end a control-mode line; the
/// old parser has no escape for most of them) become U+FFFD, and a final `;` (the old parser splits
/// the command at any argument ending in `;`, quoted or not) gets a space after it. Callers pass
/// neutralised display text, shell commands and paths, where neither matters; keystrokes never go
/// through here (see `send_keys`).
pub fn quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('\'');
    for c in s.chars() {
        match c {
            '\'' => out.push_str("'\"'\"'"),
            c if c.is_control() => out.push('\u{fffd}'),
            c => out.push(c),
        }
    }
    if s.ends_with(';') {
        out.push(' ');
    }
    out.push('\'');
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

/// The commands that save pane `pane`'s screen (with attributes) to `file`, one per control-mode
/// line, and which of them answers when the file is complete (its index). The screen never travels
/// in a reply block: a line on screen that looks like the block's `%end` guard would end the block
/// early and desynchronise every later reply (review finding F22). Named buffers arrived in 2.0;
/// 1.8 pushes the capture as buffer 0.
pub fn snap_commands(f: &Features, pane: u32, file: &str) -> (Vec<String>, usize) {
    let file = quote(file);
    let cmds = if f.has(Feat::NamedBuffers) {
        vec![
            format!("capture-pane -e -b linbit-snap -t %{pane}"),
            format!("save-buffer -b linbit-snap {file}"),
            "delete-buffer -b linbit-snap".to_string(),
        ]
    } else {
        vec![
            format!("capture-pane -e -t %{pane}"),
            format!("save-buffer -b 0 {file}"),
            "delete-buffer -b 0".to_string(),
        ]
    };
    (cmds, 1)
}

/// The screen `snap_commands` saved, as terminal lines (`\r\n` between them).
pub fn snap_screen(saved: &[u8]) -> Vec<u8> {
    let saved = saved.strip_suffix(b"\n").unwrap_or(saved);
    let mut screen = Vec::with_capacity(saved.len() + saved.len() / 40);
    for (i, line) in saved.split(|&b| b == b'\n').enumerate() {
        if i > 0 {
            screen.extend_from_slice(b"\r\n");
        }
        screen.extend_from_slice(line);
    }
    screen
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

/// `send-keys -t %N 0x61 0x27 ...` commands for tmux < 3.0, which has no `-H`: every key is a
/// hexadecimal key number (a word of `0x` and hex digits, which no parser, quoting or key-name
/// lookup can read as anything else). Before 2.2 tmux writes a key number below 0x100 to the pane as
/// that byte, so every byte arrives exactly; from 2.2 a number above 0x7f is a Unicode code point,
/// so UTF-8 text is sent as code points and a byte that is not valid UTF-8 arrives as U+FFFD.
pub fn send_keys_numbers(pane: u32, bytes: &[u8], unicode_keys: bool) -> Vec<String> {
    let keys: Vec<u32> = if unicode_keys {
        String::from_utf8_lossy(bytes).chars().map(|c| c as u32).collect()
    } else {
        bytes.iter().map(|&b| u32::from(b)).collect()
    };
    keys.chunks(KEYS_PER_COMMAND / 2)
        .map(|chunk| {
            let mut s = format!("send-keys -t %{pane}");
            for k in chunk {
                s.push_str(&format!(" 0x{k:x}"));
            }
            s
        })
        .collect()
}

/// The right `send-keys` flavour for this tmux; no byte of `bytes` is ever parsed by tmux.
pub fn send_keys(features: &Features, pane: u32, bytes: &[u8]) -> Vec<String> {
    if features.send_keys_hex {
        send_keys_hex(pane, bytes)
    } else {
        send_keys_numbers(pane, bytes, features.has(Feat::UnicodeKeys))
    }
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
    fn tmux_1_8_guards_have_no_flags() {
        let mut p = ControlParser::new();
        p.push(b"%session-changed $0 t\n%begin 1795696305 2\n%0 80\n%end 1795696305 2\n%begin 1 3 1 x\n");
        let evs = all(&mut p);
        assert_eq!(evs[1], Event::Begin { time: 1795696305, num: 2, flags: 1 });
        assert_eq!(evs[2], Event::End { time: 1795696305, num: 2, flags: 1, body: vec![b"%0 80".to_vec()] });
        assert_eq!(evs[3], Event::Other(b"%begin 1 3 1 x".to_vec()));
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
        assert_eq!(Features::from_version_output("tmux 1.8").version, (1, 8));
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
        assert_eq!(quote("it's"), "'it'\"'\"'s'");
        assert_eq!(quote("a\nb"), "'a\u{fffd}b'");
        assert_eq!(quote("$HOME ~ \\ \" ; #{x}"), "'$HOME ~ \\ \" ; #{x}'");
        assert_eq!(quote("x;"), "'x; '");
        assert_eq!(fmt_escape("a#b"), "a##b");
        assert_eq!(sh_quote("a'b"), "'a'\\''b'");
    }

    #[test]
    fn snap_file_lines() {
        assert_eq!(snap_screen(b"a\n\x1b[1mb\n\n"), b"a\r\n\x1b[1mb\r\n");
        assert_eq!(snap_screen(b""), b"");
        let (c, i) = snap_commands(&Features::from_version(Some((3, 2))), 4, "/tmp/d/snap");
        assert_eq!(c[i], "save-buffer -b linbit-snap '/tmp/d/snap'");
        let (c, _) = snap_commands(&Features::from_version(Some((1, 8))), 4, "/tmp/d/snap");
        assert_eq!(c[0], "capture-pane -e -t %4");
    }

    #[test]
    fn feature_table_is_ordered_and_complete() {
        for w in TABLE.windows(2) {
            assert!(w[0].1 <= w[1].1, "{:?} after {:?}", w[1].0, w[0].0);
        }
        let f18 = Features::from_version(Some((1, 8)));
        assert!(!f18.has(Feat::NewSessionCwd) && !f18.has(Feat::BreakPaneSource) && !f18.has(Feat::ExactTarget));
        let f27 = Features::from_version(Some((2, 7)));
        assert!(f27.has(Feat::BreakPaneSource) && f27.has(Feat::PromptOneKey) && !f27.menu && !f27.pane_options);
        assert!(Features::from_version(Some((3, 2))).has(Feat::UnbindQuiet));
        assert!(!Features::from_version(Some((3, 0))).has(Feat::UnbindQuiet));
        assert_eq!(f18.exact("tunl"), "tunl");
        assert_eq!(f27.exact("tunl"), "=tunl");
    }

    #[test]
    fn send_keys_forms() {
        assert_eq!(send_keys_hex(3, b"\x1b[A\xc3"), vec!["send-keys -H -t %3 1b 5b 41 c3".to_string()]);
        assert_eq!(send_keys_hex(1, &[b'a'; 1025]).len(), 3);
        assert_eq!(
            send_keys_numbers(2, b"a'; \r\xc3\xa4", false),
            vec!["send-keys -t %2 0x61 0x27 0x3b 0x20 0xd 0xc3 0xa4"]
        );
        assert_eq!(send_keys_numbers(2, b"a\xc3\xa4\xff", true), vec!["send-keys -t %2 0x61 0xe4 0xfffd"]);
        assert_eq!(send_keys_numbers(1, &[b'a'; 600], false).len(), 3);
        // No word of a key command is anything but a command name, a flag, a pane or a key number.
        for f in [(1, 8), (2, 7), (3, 0)] {
            let f = Features::from_version(Some(f));
            for cmd in send_keys(&f, 4, b"x' ; run-shell 'touch /tmp/x' #\";\\") {
                assert!(
                    cmd.split(' ').skip(2).all(|w| w == "-H"
                        || w == "-t"
                        || w == "%4"
                        || w.bytes().all(|b| b.is_ascii_hexdigit() || b == b'x')),
                    "{cmd}"
                );
            }
        }
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
        // The pane prints only after the control client has attached: the client's first command
        // makes the file the pane waits for (tmux 1.8 drops a wait-for signal nobody waits for yet).
        let go = srv.dir.join("go");
        let st = std::process::Command::new("tmux")
            .arg("-S")
            .arg(srv.sock())
            .args(["-f", "/dev/null", "new-session", "-d", "-s", "t", "-x", "80", "-y", "24"])
            .arg(format!(
                "while [ ! -e {go} ]; do sleep 0.02; done; printf 'a\\033b\\\\c\\n'; sleep 5",
                go = sh_quote(&go.to_string_lossy())
            ))
            .status()
            .unwrap();
        assert!(st.success());
        let input = format!("run-shell {}\n", quote(&format!("touch {}", sh_quote(&go.to_string_lossy()))));
        let evs = control_session(&srv, &input, |evs| outputs(evs).ends_with(b"\r\n"));
        assert_eq!(outputs(&evs), b"a\x1bb\\c\r\n", "{evs:?}");
        // The reply to the attach on the command line (not on 1.8, which prints no guards before the
        // client has a session) and to our wait-for: %end blocks, in order.
        let ends: Vec<u64> =
            evs.iter().filter_map(|e| if let Event::End { num, .. } = e { Some(*num) } else { None }).collect();
        assert!(!ends.is_empty() && ends.windows(2).all(|w| w[1] > w[0]), "{evs:?}");
    }

    /// Every tmux expands the client's activity in the daemon's `list-clients` (1.8 expands the
    /// names it does not know to nothing): without it a dismissed Grant/Deny popup would come back
    /// in the middle of the customer's typing.
    #[test]
    fn real_tmux_tells_each_client_activity() {
        if !tmux_available() {
            return;
        }
        let srv = private_server("clients");
        let st = std::process::Command::new("tmux")
            .arg("-S")
            .arg(srv.sock())
            .args(["-f", "/dev/null", "new-session", "-d", "-s", "t", "sleep 30"])
            .status()
            .unwrap();
        assert!(st.success());
        let input = format!("{}\n", crate::ui::list_clients_command());
        let listed = |evs: &[Event]| {
            evs.iter().find_map(|e| match e {
                Event::End { body, .. } if body.len() == 1 && body[0].split(|&b| b == b' ').count() >= 3 => {
                    Some(body[0].clone())
                }
                _ => None,
            })
        };
        let evs = control_session(&srv, &input, |evs| listed(evs).is_some());
        let line = listed(&evs).unwrap_or_else(|| panic!("no list-clients reply: {evs:?}"));
        let line = String::from_utf8_lossy(&line).into_owned();
        let activity: u64 = line.split(' ').nth(3).and_then(|a| a.parse().ok()).unwrap_or(0);
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
        assert!(activity + 60 >= now && activity <= now + 1, "no activity time in {line:?}");
        // Only the control client is attached: it is never taken for the customer's.
        assert_eq!(crate::ui::customer_client(&[line.into_bytes()]), None);
    }

    /// Review finding F18: keystrokes from the relay reach the pane as keystrokes on every tmux
    /// (run it with an old tmux first on PATH, as `just compat` does); payloads that split a command
    /// line or open a comment in any tmux parser run nothing.
    #[test]
    fn real_tmux_keys_are_typed_never_parsed() {
        if !tmux_available() {
            return;
        }
        let f = Features::from_version_output(&tmux_version());
        let srv = private_server("keys");
        let out = srv.dir.join("got");
        let mark = |n: u32| srv.dir.join(format!("ran-{n}"));
        let mut keys: Vec<u8> = b"\x01\x03\x04\x1b[A\x7f\r\n\t'\"\\ ;#{x} \xc3\xa4\xe2\x82\xac end".to_vec();
        for (i, attack) in [
            "a' ; run-shell 'touch {}' ; '",
            "a'\\'' ; run-shell '\\''touch {}'\\'' #",
            "x \\; run-shell \"touch {}\" \\;",
            "y; run-shell -b touch {};",
            "z\" ; run-shell \"touch {}\" #",
        ]
        .iter()
        .enumerate()
        {
            keys.extend_from_slice(attack.replace("{}", &mark(i as u32).to_string_lossy()).as_bytes());
        }
        if !f.has(Feat::UnicodeKeys) || f.send_keys_hex {
            keys.push(0xff); // a byte that is not UTF-8 arrives exactly where tmux can carry it
        }
        // Keys are sent only once the pane's tty is raw, so the line discipline passes every byte.
        // (tmux before 3.0 lets no attached client `wait-for`: the pane says so with a file.)
        let ready = srv.dir.join("ready");
        let script = format!(
            "stty raw -echo; touch {}; head -c {} > {}",
            sh_quote(&ready.to_string_lossy()),
            keys.len(),
            sh_quote(&out.to_string_lossy()),
        );
        let st = std::process::Command::new("tmux")
            .arg("-S")
            .arg(srv.sock())
            .args(["-f", "/dev/null", "new-session", "-d", "-s", "t", "-x", "80", "-y", "24"])
            .arg(script)
            .status()
            .unwrap();
        assert!(st.success());
        let pane = std::process::Command::new("tmux")
            .arg("-S")
            .arg(srv.sock())
            .args(["display-message", "-p", "-t", "t", "#{pane_id}"])
            .output()
            .unwrap();
        let pane: u32 = String::from_utf8_lossy(&pane.stdout).trim().trim_start_matches('%').parse().unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !ready.exists() && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        let mut input = String::new();
        for c in send_keys(&f, pane, &keys) {
            input.push_str(&c);
            input.push('\n');
        }
        // A `%end` for `wait-for` comes before the wait is over (tmux prints the guard when the command
        // returns), so completion is seen as the pane ending: its last command, then `%exit`.
        let evs = control_session(&srv, &input, |evs| evs.iter().any(|e| matches!(e, Event::Exit(_))));
        assert!(!evs.iter().any(|e| matches!(e, Event::Error { .. })), "{evs:?}");
        assert_eq!(std::fs::read(&out).ok(), Some(keys), "{evs:?}");
        for i in 0..5 {
            assert!(!mark(i).exists(), "a keystroke payload ran a tmux command ({:?})", f.version);
        }
    }

    /// Review finding F22: screen text that forges the `%end` guard of the snapshot's reply cannot
    /// cut a reply short, because the screen never travels in a reply (`snap_commands`). Shown
    /// first with the old way (`capture-pane -p`), which the forged guard does cut.
    #[test]
    fn real_tmux_screen_text_cannot_end_a_reply() {
        use std::io::{Read, Write};
        use std::process::{Command, Stdio};
        if !tmux_available() {
            return;
        }
        let f = Features::from_version_output(&tmux_version());
        let srv = private_server("guard");
        let forged = srv.dir.join("forged");
        let snap = srv.dir.join("snap");
        let st = Command::new("tmux")
            .arg("-S")
            .arg(srv.sock())
            .args(["-f", "/dev/null", "new-session", "-d", "-s", "t", "-x", "80", "-y", "24"])
            .arg(format!(
                "while [ ! -e {f}.done ]; do sleep 0.02; done; cat {f}; sleep 30",
                f = sh_quote(&forged.to_string_lossy())
            ))
            .status()
            .unwrap();
        assert!(st.success());
        let mut child = Command::new("tmux")
            .arg("-S")
            .arg(srv.sock())
            .args(["-C", "attach", "-t", "t"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut stdin = child.stdin.take().unwrap();
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
        let mut evs: Vec<Event> = Vec::new();
        let mut wait = |evs: &mut Vec<Event>, done: &dyn Fn(&[Event]) -> bool| {
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
            while !done(evs) {
                let left = deadline.saturating_duration_since(std::time::Instant::now());
                let Ok(chunk) = rx.recv_timeout(left) else { break };
                p.push(&chunk);
                evs.extend(std::iter::from_fn(|| p.next_event()));
            }
        };
        let ends = |evs: &[Event]| -> Vec<(u64, u64, Vec<Vec<u8>>)> {
            evs.iter()
                .filter_map(|e| match e {
                    Event::End { time, num, flags: 1, body } | Event::Error { time, num, flags: 1, body } => {
                        Some((*time, *num, body.clone()))
                    }
                    _ => None,
                })
                .collect()
        };
        wait(&mut evs, &|e| e.iter().any(|e| matches!(e, Event::SessionChanged { .. })));
        let pane = "display-message -p '#{pane_id}'\n";
        stdin.write_all(pane.as_bytes()).unwrap();
        wait(&mut evs, &|e| ends(e).len() == 1);
        let (t, n, body) = ends(&evs)[0].clone();
        let pane: u32 = String::from_utf8_lossy(&body[0]).trim_start_matches('%').parse().unwrap();
        // The screen holds every guard the next commands could get (this second or the next).
        let mut text = String::new();
        for dt in 0..2 {
            for dn in 1..12 {
                text.push_str(&format!("%end {} {} 1\n", t + dt, n + dn));
            }
        }
        std::fs::write(&forged, &text).unwrap();
        std::fs::write(srv.dir.join("forged.done"), "").unwrap();
        wait(&mut evs, &|e| {
            e.iter()
                .filter_map(|e| if let Event::Output { data, .. } = e { Some(data.len()) } else { None })
                .sum::<usize>()
                >= text.len()
        });
        // The old way: the forged guard ends the capture's reply early; its rest is misread.
        let before = ends(&evs).len();
        stdin.write_all(format!("capture-pane -p -t %{pane}\n").as_bytes()).unwrap();
        wait(&mut evs, &|e| ends(e).len() > before);
        let cut = ends(&evs)[before].2.len();
        assert!(cut < 2 * 11, "the forged guard did not cut the old reply ({cut} lines)");
        // The new way: every reply is whole and in order, the screen is in the file.
        let (cmds, _) = snap_commands(&f, pane, &snap.to_string_lossy());
        let mut lines: String = cmds.iter().map(|c| format!("{c}\n")).collect();
        lines.push_str("display-message -p AFTER\n");
        let marker = ends(&evs).len();
        stdin.write_all(lines.as_bytes()).unwrap();
        wait(&mut evs, &|e| ends(e).iter().any(|(_, _, b)| b == &vec![b"AFTER".to_vec()]));
        let saved = std::fs::read_to_string(&snap).unwrap_or_default();
        drop(stdin);
        let _ = child.kill();
        let _ = child.wait();
        assert!(saved.contains(text.lines().last().unwrap()), "{saved}");
        let tail: Vec<(u64, u64, Vec<Vec<u8>>)> = ends(&evs).into_iter().skip(marker).collect();
        let after = tail.iter().position(|(_, _, b)| b == &vec![b"AFTER".to_vec()]);
        assert!(after.is_some(), "{evs:?}");
        assert!(tail[..after.unwrap()].iter().all(|(_, _, b)| b.iter().all(|l| !l.starts_with(b"%end"))), "{tail:?}");
    }

    fn tmux_version() -> String {
        std::process::Command::new("tmux")
            .arg("-V")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default()
    }
}

/// Properties over random control-mode output (issue 13): tmux's stdout arrives in reads of any
/// size, so every split of a stream must give the same events as the whole of it.
#[cfg(test)]
mod props {
    use super::*;
    use proptest::prelude::*;

    fn events_of(chunks: &[&[u8]]) -> Vec<Event> {
        let mut p = ControlParser::new();
        let mut evs = Vec::new();
        for c in chunks {
            p.push(c);
            evs.extend(std::iter::from_fn(|| p.next_event()));
        }
        evs
    }

    fn stream() -> impl Strategy<Value = Vec<u8>> {
        let line = prop_oneof![
            "%output %[0-9]{1,3} [ -~]{0,20}",
            "%output %[0-9]{1,3} (\\\\[0-7]{3}|[a-z\\\\]){0,8}",
            "%extended-output %[0-9] [0-9]{1,3} : [ -~]{0,10}",
            "%(begin|end|error) [0-9]{1,10} [0-9]{1,4} [01]",
            "%(window-add|unlinked-window-close) @[0-9]{1,3}",
            "%(pause|continue) %[0-9]{1,2}",
            "%session-changed \\$[0-9] [a-z]{1,6}",
            "%layout-change @[0-9] [a-z0-9,x]{1,20}",
            "%(sessions-changed|exit|exit server exited)",
            "[ -~]{0,30}",
            prop::collection::vec(any::<u8>(), 0..30).prop_map(|b| String::from_utf8_lossy(&b).into_owned()),
        ];
        prop::collection::vec(line, 0..12)
            .prop_map(|ls| ls.iter().flat_map(|l| format!("{l}\n").into_bytes()).collect())
    }

    proptest! {
        #[test]
        fn split_at_every_boundary_gives_the_same_events(s in stream()) {
            let whole = events_of(&[&s]);
            for i in 0..=s.len() {
                prop_assert_eq!(&events_of(&[&s[..i], &s[i..]]), &whole, "split at {}", i);
            }
            let bytewise: Vec<&[u8]> = s.chunks(1).collect();
            prop_assert_eq!(&events_of(&bytewise), &whole);
        }

        #[test]
        fn any_bytes_never_panic(b in prop::collection::vec(any::<u8>(), 0..300)) {
            let _ = events_of(&[&b]);
        }

        #[test]
        fn unescape_inverts_tmux_escaping(data in prop::collection::vec(any::<u8>(), 0..64)) {
            // tmux escapes bytes below 0x20 and the backslash as `\ooo`.
            let mut esc = Vec::new();
            for &b in &data {
                if b < 0x20 || b == b'\\' {
                    esc.extend_from_slice(format!("\\{b:03o}").as_bytes());
                } else {
                    esc.push(b);
                }
            }
            prop_assert_eq!(unescape(&esc), data);
        }
    }
}
