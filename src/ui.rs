//! What the customer sees in tmux: our own configuration file (prefix, status line, pane labels, key
//! bindings, menu, cheat sheet), the commands that build and reset the layout, and the Grant/Deny
//! prompt for a tunnel request. Everything here only builds text; the launcher and daemon run it.
//!
//! Decisions (see docs/architecture.md):
//! - Detaching is disabled (`d`, `D` unbound): the launcher's `tmux attach` returning is how it notices
//!   the session ended; a detach would look like an end and orphan the daemon.
//! - Mouse mode stays off so the customer's terminal keeps its own selection and copy/paste.
//! - `c`/`C-c` toggle focus with `select-pane -t :.+` (window 0 holds exactly the shell and the chat).
//! - `L` re-applies the layout in tmux at once (`main-horizontal`, chat 8 rows) and asks the daemon
//!   (`respawn`) to respawn a dead chat pane and re-tag panes.
//! - Dead shell pane (3.2/3.2a: never dead, see `keeper.rs`): `remain-on-exit on`; root bindings for `Enter` and `q` act only on a dead pane
//!   (`if -F #{pane_dead}`), otherwise pass the key through with `send-keys`.
//! - The menu is `display-menu` on tmux >= 3.0; older tmux (>= 2.1) gets a one-shot key table
//!   `linbit-menu` announced with `display-message`. The cheat sheet is a menu of disabled lines
//!   (>= 3.0) or a `display-message` line.
//! - With `--attach` (inside the customer's own tmux) only the key bindings are installed; options
//!   like the prefix and the status line of the customer's server are left alone.
//! - The daemon publishes its state in the global user option `@linbit-status`; the status line shows it.

use crate::cli::{Config, Mode};
use crate::tmux::{Feat, Features, fmt_escape, quote, sh_quote};
use std::path::Path;

/// Height of the chat pane in rows (two pinned status rows, history, the prompt).
pub const CHAT_HEIGHT: u32 = 8;
/// The session name on the dedicated server.
pub const SESSION: &str = "tunl";

/// Arguments for `tmux` that fail when `prefix` is not a key tmux knows: run on a throwaway socket
/// (`sock`) before writing the configuration. On failure the launcher prints
/// `linbit-tunl: TUNL_PREFIX 'X' is not a tmux key; using C-b` on stderr and uses `C-b`.
pub fn prefix_check_args(sock: &Path, prefix: &str) -> Vec<String> {
    vec![
        "-S".into(),
        sock.to_string_lossy().into_owned(),
        "-f".into(),
        "/dev/null".into(),
        // A session, not a bare start-server: a server without sessions may exit before it has
        // judged the key, and a flaky check would wrongly fall back to C-b.
        "new-session".into(),
        "-d".into(),
        "sleep 30".into(),
        ";".into(),
        "set-option".into(),
        "-g".into(),
        "prefix".into(),
        prefix.into(),
    ]
}

/// The prefix as the customer reads it: `C-b` -> `Ctrl-b`, `M-Space` -> `Alt-Space`, `^A` -> `Ctrl-a`.
pub fn display_key(key: &str) -> String {
    if let Some(rest) = key.strip_prefix('^') {
        if rest.len() == 1 {
            return format!("Ctrl-{}", rest.to_ascii_lowercase());
        }
    }
    let mut out = String::new();
    let mut k = key;
    loop {
        if let Some(r) = k.strip_prefix("C-") {
            out.push_str("Ctrl-");
            k = r;
        } else if let Some(r) = k.strip_prefix("M-") {
            out.push_str("Alt-");
            k = r;
        } else if let Some(r) = k.strip_prefix("S-") {
            out.push_str("Shift-");
            k = r;
        } else {
            break;
        }
    }
    out.push_str(k);
    out
}

/// The `run-shell` command that sends one control word to the daemon via `EXE __ctl DIR WORDS`.
pub fn ctl_command(exe: &Path, dir: &Path, words: &[&str]) -> String {
    let mut sh = format!("{} __ctl {}", sh_quote(&exe.to_string_lossy()), sh_quote(&dir.to_string_lossy()));
    for w in words {
        sh.push(' ');
        sh.push_str(&sh_quote(w));
    }
    // run-shell expands formats in its argument: `#` must be doubled.
    format!("run-shell -b {}", quote(&fmt_escape(&sh)))
}

/// The main menu entries: (label, key, action words or None for the focus toggle / layout).
/// Every key the configuration binds, by table: with `--attach` these are the customer's keys that
/// the session borrows and gives back at its end.
pub const BOUND_KEYS: &[(&str, &str)] = &[
    ("prefix", "Q"),
    ("prefix", "c"),
    ("prefix", "C-c"),
    ("prefix", "u"),
    ("prefix", "U"),
    ("prefix", "X"),
    ("prefix", "L"),
    ("prefix", "C-l"),
    ("prefix", "Enter"),
    ("prefix", "?"),
    ("prefix", "z"),
    ("prefix", "K"),
    ("root", "F1"),
    ("root", "Enter"),
    ("root", "q"),
];

const MENU: [(&str, &str); 6] = [
    ("Go to chat", "c"),
    ("Reset layout", "L"),
    ("Grant tunnel (pre-grant / unblock)", "u"),
    ("Revoke tunnel", "U"),
    ("Block tunnel requests", "X"),
    ("End session for good", "Q"),
];

/// The menu in one line of at most 80 columns, for tmux without `display-menu` (before 3.0).
const MENU_SHORT: &str = "c chat | L layout | u grant | U revoke | X block | Q end";

const TOGGLE_FOCUS: &str = "select-pane -t :.+";

/// The `other-pane-height` that gives the chat pane `CHAT_HEIGHT` rows: before 3.0 main-horizontal
/// makes the other panes one row taller than the option says (tried on 1.8 and 2.7).
fn other_pane_height(f: &Features) -> u32 {
    if f.has(Feat::NewParser) { CHAT_HEIGHT } else { CHAT_HEIGHT - 1 }
}

fn layout_now(f: &Features) -> String {
    format!(
        "set-window-option other-pane-height {} ; set-window-option main-pane-height 1 ; select-layout main-horizontal",
        other_pane_height(f)
    )
}

/// The tmux command for a menu key (c, L, u, U, X, Q).
fn action(key: &str, exe: &Path, dir: &Path, f: &Features) -> String {
    match key {
        "c" => TOGGLE_FOCUS.into(),
        "L" => format!("{} ; {}", layout_now(f), ctl_command(exe, dir, &["respawn"])),
        "u" => ctl_command(exe, dir, &["grant"]),
        "U" => ctl_command(exe, dir, &["revoke"]),
        "X" => ctl_command(exe, dir, &["block"]),
        _ => ctl_command(exe, dir, &["quit"]),
    }
}

/// A command sequence as the body of a `bind-key` in the configuration file: there a bare ` ; ` would
/// end the `bind-key` itself and run the rest at load time, so the separators are escaped. A
/// `display-menu` carries its sequences inside quoted arguments and stays as it is.
fn bound(cmd: &str) -> String {
    if cmd.starts_with("display-menu") { cmd.to_string() } else { cmd.replace(" ; ", " \\; ") }
}

/// Where a menu opens: the middle of the terminal from 3.2 (`-x C -y C`); 3.0 and 3.1 know no
/// centre and read `C` as 0, so there it opens at the bottom left of the current pane.
fn menu_position(f: &Features) -> &'static str {
    if f.popup { " -x C -y C" } else { " -x P -y P" }
}

/// The command that opens the main menu.
pub fn menu_command(exe: &Path, dir: &Path, f: &Features) -> String {
    if f.menu {
        let mut s = format!("display-menu -T '#[align=centre]linbit-tunl'{}", menu_position(f));
        for (i, (label, key)) in MENU.iter().enumerate() {
            if i == MENU.len() - 1 {
                s.push_str(" ''"); // separator before the irreversible entry
            }
            s.push_str(&format!(" {} {} {}", quote(label), quote(key), quote(&action(key, exe, dir, f))));
        }
        s
    } else if f.key_tables {
        format!(
            "switch-client -T linbit-menu ; display-message {}",
            quote(&fmt_escape(&format!("linbit-tunl menu, press a key: {MENU_SHORT}")))
        )
    } else {
        // tmux 1.8: no menu, no key table for a one-shot key. A prompt takes the key, and the answer
        // only names one of our own files (`menu_files`): whatever else is typed names no file and
        // does nothing, so no typed text is ever run. (No comma: it would start a second prompt.)
        let file = quote(&dir.join("menu-").to_string_lossy());
        format!(
            "command-prompt -p {} {}",
            quote(&format!("menu: {MENU_SHORT}; key and Enter:")),
            quote(&format!("source-file {file}%%'.conf'"))
        )
    }
}

/// The files the tmux 1.8 menu prompt sources (`menu_command`): (file name in the session
/// directory, its content), one per menu key. Empty where tmux has a real menu or key tables.
pub fn menu_files(exe: &Path, dir: &Path, f: &Features) -> Vec<(String, String)> {
    if f.menu || f.key_tables {
        return Vec::new();
    }
    MENU.iter().map(|(_, key)| (format!("menu-{key}.conf"), format!("{}\n", action(key, exe, dir, f)))).collect()
}

/// The cheat sheet as lines of plain text, rendering the active prefix.
pub fn cheat_sheet(prefix: &str) -> Vec<String> {
    let p = display_key(prefix);
    [
        ("Q", "End session for good"),
        ("c", "Toggle focus chat <-> shell"),
        ("C-c", "Same as c"),
        ("u", "Pre-grant tunnel / unblock requests"),
        ("U", "Revoke tunnel"),
        ("X", "Block tunnel requests"),
        ("L", "Reset pane layout"),
        ("Enter", "Main menu (also F1)"),
        ("?", "This cheat sheet"),
        ("z", "Zoom the current pane"),
        ("K", "Kill the whole tmux session (same orderly end)"),
    ]
    .iter()
    .map(|(k, what)| format!("{:<14} {what}", format!("{p} {}", display_key(k))))
    .chain([
        format!("{:<14} Respawn the shell (on a dead shell pane)", "Enter"),
        format!("{:<14} End the session (on a dead shell pane)", "q"),
        "/brb, /back    In the chat pane: pause / resume support's typing".to_string(),
    ])
    .collect()
}

fn cheat_sheet_line(prefix: &str) -> String {
    let p = display_key(prefix);
    // One status line of at most 80 columns (F1).
    format!("{p} then: Q end | c chat/shell | u grant | U revoke | X block | L layout | z zoom")
}

/// The command that shows the cheat sheet.
pub fn cheat_sheet_command(prefix: &str, f: &Features) -> String {
    if f.menu {
        let mut s = format!("display-menu -T '#[align=centre]linbit-tunl keys'{} --", menu_position(f));
        for line in cheat_sheet(prefix) {
            // A leading '-' shows the line disabled: text only, nothing to choose.
            s.push_str(&format!(" {} '' ''", quote(&format!("-{}", fmt_escape(&line)))));
        }
        s
    } else {
        format!("display-message {}", quote(&fmt_escape(&cheat_sheet_line(prefix))))
    }
}

/// The right side of our status line. `#{@linbit-status}` is set by the daemon; tmux before 2.7
/// cannot read options in formats, so there the daemon rewrites the line with `status` in it.
fn status_right(prefix: &str, status: Option<&str>, f: &Features) -> String {
    // The whole line fits 80 columns (F1); the prefix is on the pane labels where tmux draws them.
    let right = if f.pane_border_status {
        " | F1 menu ".to_string()
    } else {
        format!(" | F1 menu | prefix {} ", fmt_escape(&display_key(prefix)))
    };
    match status {
        _ if f.has(Feat::OptionFormats) => format!("#{{@linbit-status}}{right}"),
        Some(s) => format!("{}{right}", fmt_escape(s)),
        None => right.trim_start_matches(" | ").to_string(),
    }
}

/// The left side: the session ID and, beyond share mode, the mode.
fn status_left(cfg: &Config) -> String {
    let mode = match cfg.mode {
        Mode::Share => return format!(" {} ", cfg.session_id),
        Mode::Restricted => "watch-only",
        Mode::Tunnel => "tunnel",
    };
    format!(" {} [{mode}] ", cfg.session_id)
}

/// The status line as (status-left, status-right). Before 2.9 tmux blanks the whole line when the
/// two sides do not fit the terminal together: there everything is on the left, in the order that
/// matters (the session, its state, F1), and `STATUS_OLD_WIDTH` cuts it instead.
fn status_sides(cfg: &Config, status: Option<&str>, f: &Features) -> (String, String) {
    let right = status_right(&cfg.prefix, status, f);
    if f.has(Feat::StatusCut) {
        return (fmt_escape(&status_left(cfg)), right);
    }
    let left = fmt_escape(status_left(cfg).trim_end());
    let right = right.trim_end();
    if right.starts_with(" | ") || right.is_empty() {
        (format!("{left}{right}"), String::new())
    } else {
        (format!("{left} | {right}"), String::new())
    }
}

/// status-left-length before 2.9: an 80-column terminal shows the line whole (one column spare).
const STATUS_OLD_WIDTH: usize = SCREEN_COLS - 2;

/// The daemon's commands that publish `status` (fixed words and numbers) in `@linbit-status` and,
/// on our own server with a tmux before 2.7, in the status line itself.
pub fn status_commands(f: &Features, cfg: &Config, status: &str) -> Vec<String> {
    let mut cmds = vec![format!("set-option -g @linbit-status {}", quote(status))];
    if !f.has(Feat::OptionFormats) && !cfg.attach {
        let (left, right) = status_sides(cfg, Some(status), f);
        cmds.push(format!("set-option -g status-left {}", quote(&left)));
        cmds.push(format!("set-option -g status-right {}", quote(&right)));
    }
    cmds
}

/// Our tmux configuration (`DIR/tmux.conf`). `cfg.prefix` must already be checked (`prefix_check_args`).
pub fn tmux_conf(cfg: &Config, dir: &Path, exe: &Path, f: &Features) -> String {
    let mut c =
        String::from("# linbit-tunl: generated for this session; the customer's ~/.tmux.conf does not apply.\n");
    let line = |c: &mut String, s: &str| {
        c.push_str(s);
        c.push('\n');
    };
    let prefix = cfg.prefix.as_str();
    if !cfg.attach {
        line(&mut c, &format!("set-option -g prefix {}", quote(prefix)));
        if prefix != "C-b" {
            // The customer's own tmux inside the shell pane keeps Ctrl-b.
            line(&mut c, "unbind-key C-b");
            line(&mut c, &format!("bind-key {} send-prefix", quote(prefix)));
        }
        line(&mut c, "set-option -g history-limit 50000");
        line(&mut c, "set-option -g escape-time 10");
        line(&mut c, "set-option -g base-index 0");
        if f.key_tables {
            line(&mut c, "set-option -g mouse off");
            line(&mut c, "set-option -g pane-base-index 0");
        }
        line(&mut c, "set-option -g status on");
        line(&mut c, "set-option -g status-interval 0");
        if !f.menu {
            // The menu and the cheat sheet are status-line messages there: long enough to read.
            line(&mut c, "set-option -g display-time 4000");
        }
        let (left, right) = status_sides(cfg, None, f);
        let left_len = if f.has(Feat::StatusCut) { 60 } else { STATUS_OLD_WIDTH };
        line(&mut c, &format!("set-option -g status-left-length {left_len}"));
        line(&mut c, "set-option -g status-right-length 100");
        // The whole line fits 80 columns (F1): the session ID, the daemon's state, where the menu is.
        // The prefix is on the pane labels where tmux draws them.
        line(&mut c, &format!("set-option -g status-left {}", quote(&left)));
        line(&mut c, &format!("set-option -g status-right {}", quote(&right)));
        // The window list would only show our hidden daemon window.
        line(&mut c, "set-window-option -g window-status-format ''");
        line(&mut c, "set-window-option -g window-status-current-format ''");
        // Before 2.9 the separators alone (one per window) would not fit beside a full-width left
        // side, and tmux then blanks the whole line.
        line(&mut c, "set-window-option -g window-status-separator ''");
        if let Ok(shell) = std::env::var("SHELL") {
            if !shell.is_empty() && Path::new(&shell).is_absolute() {
                line(&mut c, &format!("set-option -g default-shell {}", quote(&shell)));
            }
        }
        if f.pane_border_status {
            line(&mut c, "set-window-option -g pane-border-status top");
            let label = if f.pane_options {
                "#{?#{==:#{@linbit-role},chat},[CHAT],[SHELL]}"
            } else {
                "#{?pane_index,[CHAT],[SHELL]}"
            };
            let fmt = format!(" {label} {} ", fmt_escape(&format!("prefix {}", display_key(prefix))));
            line(&mut c, &format!("set-window-option -g pane-border-format {}", quote(&fmt)));
        }
        if f.has(Feat::RemainOnExitFormat) {
            // The line the keeper (3.2.x) prints itself: one text on every version.
            line(&mut c, &format!("set-window-option -g remain-on-exit-format {}", quote(crate::keeper::ENDED)));
        }
    }
    if !cfg.attach {
        // Detaching would look like the end of the session to the launcher.
        line(&mut c, "unbind-key d");
        line(&mut c, "unbind-key D");
    }
    let bind = |c: &mut String, key: &str, cmd: &str| line(c, &format!("bind-key {} {}", quote(key), bound(cmd)));
    bind(&mut c, "Q", &action("Q", exe, dir, f));
    bind(&mut c, "c", TOGGLE_FOCUS);
    bind(&mut c, "C-c", TOGGLE_FOCUS);
    bind(&mut c, "u", &action("u", exe, dir, f));
    bind(&mut c, "U", &action("U", exe, dir, f));
    bind(&mut c, "X", &action("X", exe, dir, f));
    bind(&mut c, "L", &action("L", exe, dir, f));
    bind(&mut c, "C-l", &action("L", exe, dir, f));
    bind(&mut c, "Enter", &menu_command(exe, dir, f));
    bind(&mut c, "?", &cheat_sheet_command(prefix, f));
    bind(&mut c, "z", "resize-pane -Z");
    // The manual's "Ctrl-b K kills the entire tmux session": the daemon sees its server go and runs
    // the same orderly end. Inside the customer's own tmux (--attach) K stays theirs.
    if !cfg.attach {
        bind(&mut c, "K", "kill-session");
    }
    // `-n` (no prefix) is as old as tmux 1.8; the root key table it became is 2.1's.
    line(&mut c, &format!("bind-key -n F1 {}", bound(&menu_command(exe, dir, f))));
    if f.key_tables {
        for (_, key) in MENU {
            line(&mut c, &format!("bind-key -T linbit-menu {} {}", quote(key), bound(&action(key, exe, dir, f))));
        }
    }
    if f.has(Feat::NewParser) {
        // Enter / q act on a dead shell pane only; otherwise the key goes to the pane unchanged.
        // (Not before 3.0: there the `send-keys` of the if-shell runs after keys typed next, and a
        // fast typist's Enter lands after the following letters.)
        let dead_shell = if f.pane_options { "#{&&:#{pane_dead},#{!=:#{@linbit-role},chat}}" } else { "#{pane_dead}" };
        line(&mut c, "bind-key -n Enter if-shell -F '#{pane_dead}' 'respawn-pane' 'send-keys Enter'");
        line(
            &mut c,
            &format!(
                "bind-key -n q if-shell -F {} {} 'send-keys q'",
                quote(dead_shell),
                quote(&action("Q", exe, dir, f))
            ),
        );
    }
    c
}

/// Where the panes go: the dedicated server's session `tunl`, or (with `--attach`) a new window of
/// the customer's current session.
#[derive(Clone, Debug)]
pub struct LayoutTarget {
    /// `None` on the dedicated server; with `--attach` the customer's session name.
    pub attach_session: Option<String>,
    /// The window name for our panes (unique per session directory with `--attach`).
    pub window: String,
    /// `pane-base-index` of the server (0 on ours; the customer's may differ).
    pub pane_base: u32,
    /// Initial size of the dedicated session (the customer's terminal size).
    pub width: u16,
    pub height: u16,
}

impl LayoutTarget {
    fn win_for(&self, f: &Features) -> String {
        match &self.attach_session {
            None => format!("{SESSION}:0"),
            Some(s) => format!("{}:{}", f.exact(s), self.window),
        }
    }
    fn pane(&self, i: u32, f: &Features) -> String {
        format!("{}.{}", self.win_for(f), self.pane_base + i)
    }
}

fn v(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| s.to_string()).collect()
}

/// The shell command of the chat pane (one string: tmux runs it with `sh -c`).
pub fn chat_command(exe: &Path, dir: &Path) -> String {
    format!("exec {} __chat {}", sh_quote(&exe.to_string_lossy()), sh_quote(&dir.to_string_lossy()))
}

/// The shell command of the hidden daemon pane.
pub fn daemon_command(exe: &Path, dir: &Path) -> String {
    format!("exec {} __daemon {}", sh_quote(&exe.to_string_lossy()), sh_quote(&dir.to_string_lossy()))
}

/// The shell pane's command on tmux 3.2/3.2a (`Features::keeps_shell_alive`): the keeper.
pub fn keeper_command(exe: &Path, dir: &Path) -> String {
    format!("exec {} __shell {}", sh_quote(&exe.to_string_lossy()), sh_quote(&dir.to_string_lossy()))
}

/// The commands (argument vectors after `tmux -S SOCK [-f CONF]`) that build the layout, in order.
/// The shell pane starts in `cwd` with the default shell (ours: `$SHELL`, else tmux's `/bin/sh`),
/// under our keeper on 3.2/3.2a.
pub fn layout_commands(t: &LayoutTarget, exe: &Path, dir: &Path, cwd: &Path, f: &Features) -> Vec<Vec<String>> {
    let cwd = cwd.to_string_lossy().into_owned();
    let (w, h) = (t.width.to_string(), t.height.to_string());
    let mut cmds = Vec::new();
    let mut first = match &t.attach_session {
        // tmux 1.8 starts a new session in the directory of the client that asks for it: ours.
        None if !f.has(Feat::NewSessionCwd) => {
            v(&["new-session", "-d", "-s", SESSION, "-n", &t.window, "-x", &w, "-y", &h])
        }
        None => v(&["new-session", "-d", "-s", SESSION, "-n", &t.window, "-x", &w, "-y", &h, "-c", &cwd]),
        Some(s) => v(&["new-window", "-d", "-t", &format!("{}:", f.exact(s)), "-n", &t.window, "-c", &cwd]),
    };
    if f.keeps_shell_alive() {
        first.push(keeper_command(exe, dir));
    }
    cmds.push(first);
    // Pane 1 is first the daemon's, broken out at once (hidden), then the chat's. (A second split
    // would not do: where it lands in the pane list differs between versions; 1.8 puts a new pane
    // after the active one, later tmux after the one split.)
    if t.attach_session.is_none() && f.has(Feat::DefaultSize) {
        // tmux 3.2a makes the first window 80x23 whatever -x/-y say: size it again, then let it
        // follow the customer's terminal as usual (resize-window would pin it).
        cmds.push(v(&["resize-window", "-t", &t.win_for(f), "-x", &w, "-y", &h]));
        cmds.push(v(&["set-window-option", "-t", &t.win_for(f), "-u", "window-size"]));
    }
    let (shell, second) = (t.pane(0, f), t.pane(1, f));
    let chat = second.clone();
    cmds.push(v(&["split-window", "-d", "-t", &shell, &daemon_command(exe, dir)]));
    // Before 2.2 break-pane's -t named the pane to break (later -s does, and -t the new window).
    let mut brk = v(&["break-pane", "-d", if f.has(Feat::BreakPaneSource) { "-s" } else { "-t" }, &second]);
    if f.has(Feat::BreakPaneName) {
        brk.extend(v(&["-n", "linbit-inner"]));
    }
    cmds.push(brk);
    let lines = CHAT_HEIGHT.to_string();
    cmds.push(v(&["split-window", "-d", "-v", "-l", &lines, "-t", &shell, "-c", &cwd, &chat_command(exe, dir)]));
    if f.pane_options {
        cmds.push(v(&["set-option", "-p", "-t", &shell, "@linbit-role", "shell"]));
        cmds.push(v(&["set-option", "-p", "-t", &chat, "@linbit-role", "chat"]));
        // (The keeper's pane never dies; were it killed, a pane kept dead would crash 3.2.x.)
        if !f.keeps_shell_alive() {
            cmds.push(v(&["set-option", "-p", "-t", &shell, "remain-on-exit", "on"]));
        }
    } else {
        cmds.push(v(&["set-window-option", "-t", &t.win_for(f), "remain-on-exit", "on"]));
    }
    cmds.push(v(&["set-window-option", "-t", &t.win_for(f), "@linbit-role", "main"]));
    // The broken-out window is the one named linbit-inner (or, before 2.4, the last one created).
    // (Before 2.4 in the customer's session it has no name of ours to find it by: left untagged;
    // nothing needs the tag, the daemon knows its panes by their commands there.)
    let inner = match &t.attach_session {
        None => Some(format!("{SESSION}:1")),
        Some(s) if f.has(Feat::BreakPaneName) => Some(format!("{}:linbit-inner", f.exact(s))),
        Some(_) => None,
    };
    if let Some(inner) = inner {
        cmds.push(v(&["set-window-option", "-t", &inner, "@linbit-role", "inner"]));
        if f.pane_options {
            cmds.push(v(&["set-option", "-p", "-t", &format!("{inner}.{}", t.pane_base), "@linbit-role", "inner"]));
        }
    }
    cmds.push(v(&["select-window", "-t", &t.win_for(f)]));
    cmds.push(v(&["select-pane", "-t", &shell]));
    cmds
}

/// What the daemon's control client says first. Before 2.6 a control client sizes the windows of
/// its session like a terminal (80x24 by default), so it takes the size of the customer's terminal
/// (`size`, the session's start size) and the layout is rebuilt at that size. The session then
/// follows a smaller terminal but not a larger one (tmux uses the smallest client).
pub fn control_client_commands(f: &Features, size: Option<(u16, u16)>, attach: bool) -> Vec<String> {
    let Some((w, h)) = size.filter(|_| !f.has(Feat::ControlWithoutSize)) else { return Vec::new() };
    // A terminal client gives up a row to the status line; a control client has none.
    let mut cmds = vec![format!("refresh-client -C {w},{}", h.saturating_sub(1).max(10))];
    if !attach {
        cmds.push(format!("set-window-option -t {SESSION}:0 other-pane-height {}", other_pane_height(f)));
        cmds.push(format!("set-window-option -t {SESSION}:0 main-pane-height 1"));
        cmds.push(format!("select-layout -t {SESSION}:0 main-horizontal"));
    }
    cmds
}

/// The daemon's `list-clients` command, for the client to show the Grant/Deny question on. (tmux
/// 1.8 has no `client_name` or `client_control_mode` and expands an unknown name to nothing: the
/// fields it lacks come last.)
pub fn list_clients_command() -> String {
    format!("list-clients -F {}", quote("#{client_tty} #{client_termname} #{client_control_mode} #{client_activity}"))
}

/// The customer's client in the reply to `list_clients_command` and its last activity (seconds):
/// the first that is not a control client (1.8: the one with a terminal type; a control client has
/// none).
pub fn customer_client(body: &[Vec<u8>]) -> Option<(String, u64)> {
    body.iter().map(|l| String::from_utf8_lossy(l).into_owned()).find_map(|l| {
        let f: Vec<&str> = l.split(' ').collect();
        let control = match f.get(2) {
            Some(m) if !m.is_empty() => *m != "0",
            _ => f.get(1).is_none_or(|t| t.is_empty() || *t == "(null)"),
        };
        let activity = f.get(3).and_then(|a| a.parse().ok()).unwrap_or(0);
        (!control && !f[0].is_empty()).then(|| (f[0].to_string(), activity))
    })
}

/// The daemon's `list-panes` command: every pane of the session with what tells its role.
pub fn list_panes_command() -> String {
    // Fields before the start command hold no spaces; `@linbit-role` is empty where unset.
    format!(
        "list-panes -s -F {}",
        quote("#{pane_id} #{pane_width} #{pane_height} #{window_id} #{@linbit-role} #{pane_start_command}")
    )
}

/// What `list_panes_command` found: the shell pane (id, columns, rows) and the chat pane's id.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Panes {
    pub shell: Option<(u32, u16, u16)>,
    pub chat: Option<u32>,
}

/// Read the reply to `list_panes_command`. With pane options (tmux >= 3.0) the launcher's
/// `@linbit-role` tags say it; before, options are per window, so the chat pane is the one tmux
/// started with our `__chat` command and the shell is the first other pane of the chat's window.
pub fn parse_panes(body: &[Vec<u8>]) -> Panes {
    struct P<'a> {
        id: u32,
        w: u16,
        h: u16,
        window: &'a str,
        role: &'a str,
        cmd: &'a str,
    }
    let text: Vec<String> = body.iter().map(|l| String::from_utf8_lossy(l).into_owned()).collect();
    let panes: Vec<P> = text
        .iter()
        .filter_map(|l| {
            let f: Vec<&str> = l.splitn(6, ' ').collect();
            if f.len() < 5 {
                return None;
            }
            Some(P {
                id: f[0].strip_prefix('%')?.parse().ok()?,
                w: f[1].parse().ok()?,
                h: f[2].parse().ok()?,
                window: f[3],
                role: f[4],
                cmd: f.get(5).copied().unwrap_or(""),
            })
        })
        .collect();
    let tagged = |r: &str| panes.iter().find(|p| p.role == r);
    if let Some(shell) = tagged("shell") {
        return Panes { shell: Some((shell.id, shell.w, shell.h)), chat: tagged("chat").map(|p| p.id) };
    }
    let Some(chat) = panes.iter().find(|p| p.cmd.contains(" __chat ")) else { return Panes::default() };
    let shell = panes.iter().find(|p| p.window == chat.window && p.id != chat.id && !p.cmd.contains(" __chat "));
    Panes { shell: shell.map(|p| (p.id, p.w, p.h)), chat: Some(chat.id) }
}

/// Commands (control-mode lines for the daemon) that rebuild the split for `L`: the existing shell pane
/// stays, a dead chat pane is respawned, then the layout is re-applied. `shell`/`chat` are pane ids.
pub fn reset_layout_commands(shell: u32, chat: Option<u32>, exe: &Path, dir: &Path, f: &Features) -> Vec<String> {
    // A dead shell comes back too: before 3.0 that is the only way (no root Enter on a dead pane).
    let mut cmds = vec![format!("respawn-pane -t %{shell}")]; // fails harmlessly if it is alive
    match chat {
        Some(id) => cmds.push(format!("respawn-pane -t %{id}")), // fails harmlessly if it is alive
        None => cmds.push(format!(
            "split-window -d -v -l {CHAT_HEIGHT} -t %{shell} {}",
            quote(&fmt_escape(&chat_command(exe, dir)))
        )),
    }
    cmds.push(format!("set-window-option -t %{shell} other-pane-height {}", other_pane_height(f)));
    cmds.push(format!("set-window-option -t %{shell} main-pane-height 1"));
    cmds.push(format!("select-layout -t %{shell} main-horizontal"));
    cmds
}

/// Everything the customer is told about a tunnel request before deciding (F1). Strings must already
/// be neutralised (no control characters); they are escaped here for tmux formats.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ask {
    /// The daemon's own number for the request: the only thing of it that travels in a command line
    /// (F2). The relay's request ID never does.
    pub n: u32,
    pub from: String,
    /// The account support logs in as.
    pub user: String,
    /// `HOST:PORT` the reverse tunnel leads to.
    pub target: String,
    /// One line per key, as `ssh-keygen -lf` prints it (`fingerprint`).
    pub keys: Vec<String>,
}

/// Widest line of ours: every screen fits an 80-column terminal (a menu adds 4 columns of frame).
pub const SCREEN_COLS: usize = 80;
/// Most lines of text a popup shows; further keys are counted (all are in the chat pane).
const POPUP_LINES: usize = 16;
/// The word that grants. Typing cannot produce it by accident: it must be typed into a prompt that
/// only opens after choosing Grant, which is neither preselected nor on a shortcut key.
pub const GRANT_WORD: &str = "GRANT";

/// A key line (`TYPE BASE64 [COMMENT]`, as `authkeys::validate_keys` returns them) as
/// `ssh-keygen -lf` prints it: `BITS SHA256:... COMMENT (TYPE)`.
pub fn fingerprint(line: &str) -> Option<String> {
    use base64::Engine;
    use sha2::Digest;
    let mut it = line.splitn(3, ' ');
    let (ty, b64) = (it.next()?, it.next()?);
    let comment = it.next().map(str::trim).filter(|c| !c.is_empty()).unwrap_or("no comment");
    let blob = base64::engine::general_purpose::STANDARD.decode(b64).ok()?;
    let (bits, kind) = match ty {
        "ssh-ed25519" => (256, "ED25519"),
        "sk-ssh-ed25519@openssh.com" => (256, "ED25519-SK"),
        "sk-ecdsa-sha2-nistp256@openssh.com" => (256, "ECDSA-SK"),
        "ecdsa-sha2-nistp256" => (256, "ECDSA"),
        "ecdsa-sha2-nistp384" => (384, "ECDSA"),
        "ecdsa-sha2-nistp521" => (521, "ECDSA"),
        "ssh-rsa" => (rsa_bits(&blob)?, "RSA"),
        _ => return None,
    };
    let fp = base64::engine::general_purpose::STANDARD_NO_PAD.encode(sha2::Sha256::digest(&blob));
    Some(format!("{bits} SHA256:{fp} {comment} ({kind})"))
}

/// The modulus size of an `ssh-rsa` blob (`string type, mpint e, mpint n`).
fn rsa_bits(blob: &[u8]) -> Option<usize> {
    let mut rest = blob;
    let mut field = || {
        let len = u32::from_be_bytes(rest.get(..4)?.try_into().ok()?) as usize;
        let f = rest.get(4..4 + len)?;
        rest = &rest[4 + len..];
        Some(f)
    };
    let (_, _, n) = (field()?, field()?, field()?);
    let lead = n.iter().position(|&b| b != 0).unwrap_or(n.len());
    Some((n.len() - lead) * 8 - n.get(lead).map_or(0, |b| b.leading_zeros() as usize))
}

/// Cut `s` to `max` characters, marking the cut.
fn clip(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        return s.to_string();
    }
    let mut out: String = s.chars().take(max.saturating_sub(3)).collect();
    out.push_str("...");
    out
}

/// A key line in lines of at most `max` columns: whole if it fits, else the fingerprint on one line
/// and the comment with the type on the next, so the fingerprint is never what gives way.
fn key_fit(line: &str, max: usize) -> Vec<String> {
    if line.chars().count() <= max {
        return vec![line.to_string()];
    }
    // `BITS SHA256:FP COMMENT (TYPE)`: BITS and FP contain no spaces.
    let mut parts = line.splitn(3, ' ');
    let (Some(bits), Some(fp), Some(rest)) = (parts.next(), parts.next(), parts.next()) else {
        return vec![clip(line, max)];
    };
    vec![clip(&format!("{bits} {fp}"), max), clip(&format!("    {rest}"), max)]
}

/// The lines of text a request is shown with (popup body and chat), each at most `cols` wide.
pub fn ask_lines(a: &Ask, cols: usize) -> Vec<String> {
    let mut v = vec![
        clip(&format!("{} asks to log in over SSH", a.from), cols),
        clip(&format!("as {} on {}, not shown in this terminal,", a.user, a.target), cols),
        clip(
            &format!(
                "with {}:",
                if a.keys.len() == 1 { "this key".to_string() } else { format!("{} keys", a.keys.len()) }
            ),
            cols,
        ),
    ];
    v.extend(a.keys.iter().flat_map(|k| key_fit(k, cols)));
    v
}

/// The Grant/Deny popup for a request (a control-mode line). Deny is the first choice (preselected
/// where tmux preselects) and on the `d` key; Grant has no key, and choosing it only opens a prompt
/// that grants when `GRANT` is typed. Anything else typed there denies. Kept in one function so the
/// rendering can be adapted per tmux version without touching what grants.
pub fn upgrade_prompt_command(exe: &Path, dir: &Path, a: &Ask, f: &Features) -> String {
    let n = a.n.to_string();
    let deny = ctl_command(exe, dir, &["answer", &n, "deny"]);
    // A comma in a prompt starts a second prompt on every tmux: none in names the relay chose.
    let (from, user) = (a.from.replace(',', ";"), a.user.replace(',', ";"));
    let prompt =
        clip(&format!("Type {GRANT_WORD} to let {from} log in as {user} (anything else denies): "), SCREEN_COLS - 2);
    let check = typed_answer_command(exe, dir, a.n, f);
    let confirm = format!("command-prompt -p {} {}", quote(&fmt_escape(&prompt)), quote(&check));
    if f.menu {
        let mut lines = ask_lines(a, SCREEN_COLS - 6);
        // 24 rows: the menu's frame, title, separator and two choices leave room for 16 lines of text.
        if lines.len() > POPUP_LINES {
            let shown = lines[3..POPUP_LINES - 1].iter().filter(|l| l.contains(" SHA256:")).count();
            lines.truncate(POPUP_LINES - 1);
            lines.push(format!("... and {} more keys (listed in the chat pane)", a.keys.len() - shown));
        }
        let mut s =
            format!("display-menu -T {}{} --", quote(&format!("#[align=centre]Tunnel request {n}")), menu_position(f));
        for l in lines {
            // A leading '-' shows the line disabled: text only, nothing to choose.
            s.push_str(&format!(" {} '' ''", quote(&format!("-{}", fmt_escape(&l)))));
        }
        s.push_str(" ''");
        // display-menu expands formats in item commands when it builds the menu: escaped once more,
        // or the comparison would be decided (false) before anything is typed.
        s.push_str(&format!(" {} d {}", quote("Deny"), quote(&fmt_escape(&deny))));
        let grant_item = format!("Grant (then type {GRANT_WORD})");
        s.push_str(&format!(" {} '' {}", quote(&grant_item), quote(&fmt_escape(&confirm))));
        s
    } else {
        // No menu on this tmux (before 3.0): the prompt itself is the popup, in the status line; the
        // chat pane shows the whole request (keys and fingerprints) beside it.
        let p =
            clip(&format!("Tunnel request {n}: type {GRANT_WORD} to let {from} log in as {user}: "), SCREEN_COLS - 2);
        format!("command-prompt -p {} {}", quote(&fmt_escape(&p)), quote(&check))
    }
}

/// How to answer, for the chat pane under the request.
pub fn answer_hint(f: &Features) -> String {
    if f.menu {
        format!("answer in the popup: Deny, or Grant and type {GRANT_WORD}")
    } else {
        format!("answer at the prompt below: type {GRANT_WORD} to allow; anything else denies")
    }
}

/// The command a Grant prompt runs with what was typed (`%%`): the text goes, exactly as typed,
/// into the tmux environment variable `LINBIT_ANSWER_N`, and `__ctl DIR answer N typed` (run-shell,
/// whose jobs inherit tmux's global environment) grants only when it reads `GRANT` there; it is
/// unset at once. The typed text is never part of a shell command or a tmux format, on any version:
/// from 2.7 `%%%` escapes it for tmux's parser inside double quotes; 1.8 has no such escape, so it
/// goes inside single quotes, where only a typed `'` ends the quoting (the line then fails to
/// parse or runs what the customer typed as tmux commands, never a grant without the word).
fn typed_answer_command(exe: &Path, dir: &Path, n: u32, f: &Features) -> String {
    let var = format!("LINBIT_ANSWER_{n}");
    let typed = if f.has(Feat::PromptQuoteEscape) { "\"%%%\"" } else { "'%%'" };
    // Without -b: the unset must wait until the job has its environment (from 3.2 even a run-shell
    // without a delay starts its job from a timer, after the commands that follow it have run).
    let ctl = ctl_command(exe, dir, &["answer", &n.to_string(), "typed"]).replacen("run-shell -b ", "run-shell ", 1);
    format!("set-environment -g {var} {typed} ; {ctl} ; set-environment -gu {var}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn cfg(prefix: &str) -> Config {
        let env = vec![("USER".to_string(), "root".to_string()), ("HOME".to_string(), "/root".to_string())];
        match crate::cli::parse([std::ffi::OsString::from("swift-fox-jumps-barrel")], &env).unwrap() {
            crate::cli::Action::Run(c) => Config { prefix: prefix.into(), ..*c },
            _ => unreachable!(),
        }
    }

    #[test]
    fn bound_keys_name_every_binding_of_the_configuration() {
        let f = Features::from_version(Some((3, 3)));
        let conf = tmux_conf(&cfg("C-b"), Path::new("/tmp/d"), Path::new("/usr/bin/linbit-tunl"), &f);
        let mut seen = Vec::new();
        for line in conf.lines().filter(|l| l.starts_with("bind-key ")) {
            let w: Vec<&str> = line.split(' ').collect();
            let (table, key) = match w[1] {
                "-n" => ("root", w[2]),
                "-T" => (w[2], w[3]),
                k => ("prefix", k),
            };
            if table == "linbit-menu" {
                continue;
            }
            let key = key.trim_matches('\'');
            assert!(BOUND_KEYS.contains(&(table, key)), "{table} {key} is bound but not in BOUND_KEYS");
            seen.push((table, key));
        }
        assert_eq!(seen.len(), BOUND_KEYS.len(), "BOUND_KEYS names a key the configuration does not bind");
    }

    #[test]
    fn the_customer_client_is_never_the_control_client() {
        let l = |v: &[&str]| v.iter().map(|s| s.as_bytes().to_vec()).collect::<Vec<_>>();
        assert_eq!(customer_client(&l(&[" screen 1 5", "/dev/pts/3 xterm 0 7"])), Some(("/dev/pts/3".into(), 7)));
        // tmux 1.8: no client_control_mode; a control client has no terminal type.
        assert_eq!(
            customer_client(&l(&["(null) (null) ", "/dev/pts/6 tmux-256color "])),
            Some(("/dev/pts/6".into(), 0))
        );
        assert_eq!(customer_client(&l(&["(null) (null) "])), None);
    }

    #[test]
    fn keys_render() {
        assert_eq!(display_key("C-b"), "Ctrl-b");
        assert_eq!(display_key("M-Space"), "Alt-Space");
        assert_eq!(display_key("C-M-a"), "Ctrl-Alt-a");
        assert_eq!(display_key("^A"), "Ctrl-a");
        assert_eq!(display_key("F12"), "F12");
        assert!(cheat_sheet("C-a")[0].starts_with("Ctrl-a Q"));
    }

    /// The `run-shell` words survive tmux's parser, format expansion and the shell for awkward paths.
    #[test]
    fn real_tmux_runs_ctl_with_awkward_paths() {
        let Ok(o) = std::process::Command::new("tmux").arg("-V").output() else { return };
        let f = Features::from_version_output(&String::from_utf8_lossy(&o.stdout));
        // Before 2.7 no `#` survives run-shell's format expansion (`##` stays two, `#{` ends it);
        // our own paths never hold one (the binary is copied into the session directory, F17).
        let hash = if f.has(Feat::OptionFormats) { "#" } else { "" };
        let dir =
            std::env::temp_dir().join(format!("tunl-ui-q-{}/it's {hash}1 $HOME \\ ; \"x\" ;", std::process::id()));
        let top = dir.parent().unwrap().to_path_buf();
        let _ = std::fs::remove_dir_all(&top);
        std::fs::create_dir_all(&dir).unwrap();
        let exe = dir.join("rec");
        std::fs::write(&exe, "#!/bin/sh\nprintf '%s\\n' \"$@\" > \"$0.out\"\n").unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).unwrap();
        let sock = top.join("s");
        let conf = top.join("c.conf");
        let word = format!("r'1 {hash}{{x}};");
        std::fs::write(&conf, format!("{}\n", ctl_command(&exe, &dir, &["answer", &word, "grant"]))).unwrap();
        let tmux = |args: &[&str]| std::process::Command::new("tmux").arg("-S").arg(&sock).args(args).status().unwrap();
        assert!(tmux(&["-f", "/dev/null", "new-session", "-d", "sleep 30"]).success());
        let ok = tmux(&["source-file", &conf.to_string_lossy()]).success();
        let out = dir.join("rec.out");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while !std::fs::read_to_string(&out).is_ok_and(|s| s.ends_with("grant\n"))
            && std::time::Instant::now() < deadline
        {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        let got = std::fs::read_to_string(&out).unwrap_or_default();
        tmux(&["kill-server"]);
        let _ = std::fs::remove_dir_all(&top);
        assert!(ok);
        assert_eq!(got, format!("__ctl\n{}\nanswer\n{word}\ngrant\n", dir.display()));
    }

    /// Load the generated configuration into a real tmux: every line must parse and run.
    #[test]
    fn real_tmux_accepts_conf_and_layout() {
        let Ok(o) = std::process::Command::new("tmux").arg("-V").output() else { return };
        let f = Features::from_version_output(&String::from_utf8_lossy(&o.stdout));
        let dir = std::env::temp_dir().join(format!("tunl-ui-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir(&dir).unwrap();
        struct Kill(PathBuf);
        impl Drop for Kill {
            fn drop(&mut self) {
                let _ = std::process::Command::new("tmux")
                    .arg("-S")
                    .arg(self.0.join("s"))
                    .arg("kill-server")
                    .stderr(std::process::Stdio::null())
                    .status();
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
        let _k = Kill(dir.clone());
        let sock = dir.join("s");
        let tmux =
            |args: &[String]| std::process::Command::new("tmux").arg("-S").arg(&sock).args(args).output().unwrap();
        // The prefix check: a bad key fails, a good one passes.
        // A fresh socket per check, as the launcher uses: a server still exiting must not answer.
        let check = |key: &str| {
            let sock = dir.join(format!("p-{key}"));
            let ok = std::process::Command::new("tmux").args(prefix_check_args(&sock, key)).output().unwrap();
            let _ = std::process::Command::new("tmux").arg("-S").arg(&sock).arg("kill-server").output();
            ok.status.success()
        };
        assert!(!check("NoSuchKey"));
        assert!(check("C-a"));
        let exe = Path::new("/bin/true");
        let conf = dir.join("tmux.conf");
        std::fs::write(&conf, tmux_conf(&cfg("C-a"), &dir, exe, &f)).unwrap();
        let t = LayoutTarget { attach_session: None, window: "tunl".into(), pane_base: 0, width: 100, height: 30 };
        let mut first = true;
        for cmd in layout_commands(&t, Path::new("/bin/sh"), &dir, Path::new("/"), &f) {
            let cmd: Vec<String> =
                cmd.into_iter().map(|a| a.replace("exec '/bin/sh' __", "exec sleep 60; : __")).collect();
            let mut args = Vec::new();
            if first {
                args.extend(["-f".to_string(), conf.to_string_lossy().into_owned()]);
                first = false;
            }
            args.extend(cmd.iter().cloned());
            let out = tmux(&args);
            assert!(out.status.success(), "{cmd:?}: {}", String::from_utf8_lossy(&out.stderr));
        }
        // Every config line ran without error (source-file again reports errors).
        let out = tmux(&["source-file".into(), conf.to_string_lossy().into_owned()]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        // The daemon finds the shell and the chat pane on every version (tags or start commands).
        let list = |fmt: &str| {
            String::from_utf8_lossy(&tmux(&v(&["list-panes", "-s", "-t", SESSION, "-F", fmt])).stdout).into_owned()
        };
        let ids = list("#{pane_id}");
        let ids: Vec<u32> = ids.lines().filter_map(|l| l.trim_start_matches('%').parse().ok()).collect();
        let body: Vec<Vec<u8>> =
            list("#{pane_id} #{pane_width} #{pane_height} #{window_id} #{@linbit-role} #{pane_start_command}")
                .lines()
                .map(|l| l.as_bytes().to_vec())
                .collect();
        let found = parse_panes(&body);
        assert_eq!(found.shell.map(|s| s.0), Some(ids[0]), "{body:?}");
        assert_eq!(found.chat, Some(ids[1]), "{body:?}");
        let windows = list("#{window_index}.#{pane_index} #{window_name}");
        if f.has(Feat::BreakPaneName) {
            assert_eq!(windows, "0.0 tunl\n0.1 tunl\n1.0 linbit-inner\n");
        }
        if f.pane_options {
            assert_eq!(list("#{@linbit-role}"), "shell\nchat\ninner\n");
        }
        let prefix = tmux(&v(&["show-options", "-gv", "prefix"]));
        assert_eq!(String::from_utf8_lossy(&prefix.stdout).trim(), "C-a");
        // The menu, cheat sheet and upgrade prompt parse as tmux commands (bound to a key, not run).
        for cmd in [
            menu_command(exe, &dir, &f),
            cheat_sheet_command("C-a", &f),
            upgrade_prompt_command(exe, &dir, &ask("Eve #{evil}", 1), &f),
            upgrade_prompt_command(exe, &dir, &ask("Eve", 16), &f),
            upgrade_prompt_command(exe, &dir, &ask("Eve", 1), &Features::from_version(Some(f.version.min((2, 9))))),
        ] {
            let line = format!("bind-key F5 {cmd}\n");
            std::fs::write(dir.join("x.conf"), line).unwrap();
            let out = tmux(&["source-file".into(), dir.join("x.conf").to_string_lossy().into_owned()]);
            assert!(out.status.success(), "{cmd}: {}", String::from_utf8_lossy(&out.stderr));
        }
    }

    fn ask(from: &str, keys: usize) -> Ask {
        let key =
            "256 SHA256:6k0oepy8XLeypW1FnyMNTWsgTqjR1G/QbNfmkBhOmAE a-rather-long-comment@support.linbit.com (ED25519)";
        Ask {
            n: 7,
            from: from.into(),
            user: "root".into(),
            target: "127.0.0.1:22".into(),
            keys: vec![key.into(); keys],
        }
    }

    #[test]
    fn fingerprints_are_what_ssh_keygen_prints() {
        let dir = std::env::temp_dir().join(format!("tunl-fp-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        for (ty, bits) in [("ed25519", ""), ("rsa", "3072"), ("ecdsa", "384"), ("ecdsa", "521")] {
            let key = dir.join(format!("k-{ty}{bits}"));
            let mut cmd = std::process::Command::new("ssh-keygen");
            cmd.args(["-q", "-N", "", "-C", "eng@linbit.com", "-t", ty]).arg("-f").arg(&key);
            if !bits.is_empty() {
                cmd.args(["-b", bits]);
            }
            assert!(cmd.status().unwrap().success());
            let pubfile = key.with_extension("pub");
            let line = std::fs::read_to_string(&pubfile).unwrap();
            let lf = std::process::Command::new("ssh-keygen").arg("-lf").arg(&pubfile).output().unwrap();
            assert_eq!(fingerprint(line.trim()).as_deref(), Some(String::from_utf8_lossy(&lf.stdout).trim()), "{ty}");
        }
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(fingerprint("ssh-ed25519 !!!"), None);
        assert_eq!(fingerprint("ssh-dss AAAA"), None);
    }

    #[test]
    fn a_request_reads_on_80_columns_and_24_rows() {
        let exe = Path::new("/usr/local/bin/linbit-tunl");
        let dir = Path::new("/tmp/linbit-tunl-0123456789ab");
        let a = ask("eng@linbit.com", 16);
        let lines = ask_lines(&a, SCREEN_COLS - 6);
        assert!(lines.iter().all(|l| l.chars().count() <= SCREEN_COLS - 6), "{lines:#?}");
        // The fingerprint is never cut; the comment moves to its own line.
        assert!(lines.contains(&"256 SHA256:6k0oepy8XLeypW1FnyMNTWsgTqjR1G/QbNfmkBhOmAE".to_string()), "{lines:#?}");
        let cmd = upgrade_prompt_command(exe, dir, &a, &Features::from_version(Some((3, 3))));
        // Frame (2) + title in the frame + text + separator + Deny + Grant fit 24 rows.
        let items = cmd.matches(" '' ''").count();
        assert!(items <= POPUP_LINES && items + 2 + 3 <= 24, "{items} lines: {cmd}");
        assert!(cmd.contains("more keys (listed in the chat pane)"), "{cmd}");
        // Deny comes first and has the only shortcut; Grant has none and only opens the prompt.
        let deny = cmd.find("'Deny' d").expect("Deny on d");
        let grant = cmd.find("'Grant (then type GRANT)' ''").expect("Grant without a key");
        assert!(deny < grant);
        assert!(cmd[grant..].starts_with("'Grant (then type GRANT)' '' 'command-prompt "), "{cmd}");
        // The relay's request ID is nowhere in it; our number is.
        assert!(cmd.contains("answer") && cmd.contains("'7'"), "{cmd}");
    }
}
