//! `tunl join`: the launcher. It opens the engineer's ssh ControlMaster to the relay in the
//! engineer's terminal (so ssh can ask for a passphrase or a host key there), starts a tmux of the
//! engineer's own on a socket of its own with two panes (the mirrored shell on top, `__view`, and
//! the chat below, `__chat`), waits until the view has joined, attaches, and on every way out
//! (detach, the session closing, an error, SIGINT/SIGTERM/SIGHUP) ends tmux and the master, puts
//! the terminal's settings back and says why it ended.
//!
//! The join directory (`$XDG_RUNTIME_DIR/tunl/join-PID` or `/tmp/tunl-UID/join-PID`, 0700):
//! `join.conf` (sid, ro), `tmux.sock`, `tmux.conf`, `ssh.sock` (the master), `ssh.log` (ssh's
//! stderr and dropped lines), `ctl.fifo` (-> view: control words), `chat.fifo` (view -> chat pane),
//! `state` (`ready` or `failed MSG`, from the view), `exit` (`STATUS` then a message, from the view).

use crate::relay::Relay;
use crate::term::{Saved, Signals};
use rustix::fs::{Mode, OFlags};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use tunl_wire::neutralize;

/// Rows of the chat pane: two status rows, the history, the prompt.
pub const CHAT_HEIGHT: u16 = 9;
pub const SESSION: &str = "tunl";

/// Where join directories live: `$XDG_RUNTIME_DIR/tunl`, else `/tmp/tunl-UID`.
pub fn runtime_base() -> PathBuf {
    match std::env::var_os("XDG_RUNTIME_DIR").filter(|v| !v.is_empty()) {
        Some(d) => PathBuf::from(d).join("tunl"),
        None => std::env::temp_dir().join(format!("tunl-{}", rustix::process::geteuid().as_raw())),
    }
}

/// A word for `sh -c`.
pub fn sh_quote(s: &str) -> String {
    if !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_./:=@,+".contains(&b)) {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

/// A string as one tmux argument in a configuration file or command: double quotes, with `\`, `"`
/// and `$` escaped (tmux expands `$VAR` in double quotes), `#` doubled where formats are expanded.
pub fn tmux_quote(s: &str) -> String {
    let mut o = String::from("\"");
    for c in s.chars() {
        if matches!(c, '\\' | '"' | '$') {
            o.push('\\');
        }
        o.push(c);
    }
    o.push('"');
    o
}

/// The `run-shell` command that gives the view one control word.
pub fn ctl_binding(exe: &Path, dir: &Path, word: &str) -> String {
    let sh = format!("{} __ctl {} {word}", sh_quote(&exe.to_string_lossy()), sh_quote(&dir.to_string_lossy()));
    format!("run-shell -b {}", tmux_quote(&sh.replace('#', "##")))
}

/// Our tmux configuration: the engineer's ~/.tmux.conf does not apply (`-f`), so the keys are the
/// documented ones. What the customer's shell prints runs through this tmux's terminal emulator,
/// never straight to the engineer's terminal: clipboard writes, title changes and passthrough are
/// off so the customer's output cannot reach beyond the pane.
pub fn tmux_conf(sid: &str, exe: &Path, dir: &Path) -> String {
    let mut c = String::from("# tunl join: generated; ~/.tmux.conf does not apply.\n");
    let mut l = |s: &str| {
        c.push_str(s);
        c.push('\n');
    };
    l("set-option -g default-shell /bin/sh");
    l("set-option -g prefix C-b");
    l("set-option -g escape-time 10");
    l("set-option -g history-limit 50000");
    l("set-option -g mouse off");
    l("set-option -g set-clipboard off");
    l("set-option -g set-titles off");
    l("set-window-option -g allow-rename off");
    l("set-option -gq allow-passthrough off");
    l("set-option -gq focus-events off");
    // The window is sized to the customer's pane plus the chat by the view's `resize-window`
    // (which makes that window's size manual); a smaller terminal is told so. A global
    // `window-size manual` here crashes tmux 3.3a's server on the split that follows.
    l("set-option -g status on");
    l("set-option -g status-interval 0");
    l("set-option -g status-left-length 90");
    l("set-option -g status-right-length 120");
    l(&format!(
        "set-option -g status-left {}",
        tmux_quote(&format!("#[reverse]#{{@tunl-warn}}#[default] tunl {sid} "))
    ));
    l(&format!(
        "set-option -g status-right {}",
        tmux_quote("#{@tunl-status} | C-b c shell/chat | C-b d detach | C-b ? keys ")
    ));
    l("set-window-option -g window-status-format ''");
    l("set-window-option -g window-status-current-format ''");
    l("set-window-option -g pane-border-status top");
    l(&format!(
        "set-window-option -g pane-border-format {}",
        tmux_quote(" #{?#{==:#{pane_index},0},[CUSTOMER SHELL],[CHAT]} Ctrl-b c toggles ")
    ));
    l("set-window-option -g remain-on-exit off");
    // Splits, new windows and kills would break the two-pane view; the view ends it all itself.
    for k in ["'\"'", "%", "!", "&", "x", "'$'", ",", ".", "n", "p", "w", "s", "o", "'{'", "'}'", "Space"] {
        l(&format!("unbind-key {k}"));
    }
    l("bind-key c select-pane -t :.+");
    l("bind-key C-c select-pane -t :.+");
    l(&format!("bind-key d {}", ctl_binding(exe, dir, "detach")));
    l(&format!(
        "bind-key ? display-message -d 8000 {}",
        tmux_quote(
            "Ctrl-b c: shell <-> chat | Ctrl-b d: detach | chat: /note TEXT /upgrade /revoke /detach /close [REASON] /help"
        )
    ));
    for hook in ["client-resized", "client-attached"] {
        l(&format!("set-hook -g {hook} {}", tmux_quote(&ctl_binding(exe, dir, "resized"))));
    }
    c
}

/// `tmux -S SOCK ARGS`, without the engineer's `TMUX` so nothing lands in a surrounding tmux.
pub fn tmux(sock: &Path) -> Command {
    let mut c = Command::new("tmux");
    c.arg("-S").arg(sock).env_remove("TMUX");
    c
}

fn run_quiet(mut c: Command) -> bool {
    c.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null());
    c.status().map(|s| s.success()).unwrap_or(false)
}

pub fn make_fifo(path: &Path) -> Result<(), String> {
    rustix::fs::mknodat(rustix::fs::CWD, path, rustix::fs::FileType::Fifo, Mode::from_raw_mode(0o600), 0)
        .map_err(|e| format!("cannot make {}: {e}", path.display()))
}

/// One control line to a view, without blocking: a view that is gone is an error.
pub fn send_ctl(dir: &Path, line: &str) -> Result<(), String> {
    let fd = rustix::fs::open(dir.join("ctl.fifo"), OFlags::WRONLY | OFlags::NONBLOCK | OFlags::CLOEXEC, Mode::empty())
        .map_err(|_| "the join is not running".to_string())?;
    let mut l = line.to_string();
    if !l.ends_with('\n') {
        l.push('\n');
    }
    match rustix::io::write(&fd, l.as_bytes()) {
        Ok(n) if n == l.len() => Ok(()),
        _ => Err("the join's view is busy; try again".into()),
    }
}

/// `tunl __ctl DIR WORD...`: only the words the bindings and hooks use.
pub fn ctl(dir: &Path, words: &[String]) -> i32 {
    let ok = matches!(words.iter().map(String::as_str).collect::<Vec<_>>().as_slice(), ["detach"] | ["resized"]);
    if !ok {
        eprintln!("tunl: unknown control word");
        return 1;
    }
    match send_ctl(dir, &words.join(" ")) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("tunl: {e}");
            1
        }
    }
}

/// `tunl detach`: the join this terminal is in (`TUNL_JOIN_DIR` in its panes), else every join of
/// this user.
pub fn detach_command() -> Result<i32, String> {
    if let Some(d) = std::env::var_os("TUNL_JOIN_DIR") {
        send_ctl(Path::new(&d), "detach")?;
        return Ok(0);
    }
    let base = runtime_base();
    let mut n = 0;
    if let Ok(rd) = std::fs::read_dir(&base) {
        for e in rd.flatten() {
            if e.file_name().to_string_lossy().starts_with("join-") && send_ctl(&e.path(), "detach").is_ok() {
                n += 1;
            }
        }
    }
    if n == 0 {
        return Err("no tunl join is running".into());
    }
    println!("detached {n} join{}", if n == 1 { "" } else { "s" });
    Ok(0)
}

/// What the view leaves in `DIR/exit`: the status, then the message.
pub fn parse_exit(s: &str) -> Option<(i32, String)> {
    let (first, rest) = s.split_once('\n').unwrap_or((s, ""));
    let status: i32 = first.trim().parse().ok()?;
    Some((status, neutralize(rest.trim_end_matches('\n'))))
}

/// Publish a small file by rename, so a reader never sees half of it.
pub fn publish(dir: &Path, name: &str, text: &str) {
    let tmp = dir.join(format!(".{name}.tmp"));
    if std::fs::write(&tmp, text).is_ok() {
        let _ = std::fs::rename(&tmp, dir.join(name));
    }
}

struct Cleanup {
    dir: PathBuf,
    relay: Relay,
    master: bool,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = run_quiet({
            let mut c = tmux(&self.dir.join("tmux.sock"));
            c.arg("kill-server");
            c
        });
        if self.master {
            let mut c = Command::new(crate::relay::ssh_program());
            c.args(self.relay.base_args()).arg("-S").arg(self.dir.join("ssh.sock")).args(["-O", "exit"]);
            c.arg(self.relay.destination());
            let _ = run_quiet(c);
        }
        if std::env::var_os("TUNL_KEEP_JOIN_DIR").is_none() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

fn read_state(dir: &Path) -> Option<String> {
    std::fs::read_to_string(dir.join("state")).ok()
}

/// `tunl join [--read-only] ID`.
pub fn run(relay: &Relay, sid: &str, read_only: bool) -> Result<i32, String> {
    if !crate::term::is_tty(rustix::stdio::stdin()) || !crate::term::is_tty(rustix::stdio::stdout()) {
        return Err("join needs a terminal (stdin and stdout)".into());
    }
    if std::env::var_os("TUNL_JOIN_DIR").is_some() {
        return Err("this terminal is already a tunl join (Ctrl-b d detaches it)".into());
    }
    if !run_quiet({
        let mut c = Command::new("tmux");
        c.arg("-V");
        c
    }) {
        return Err("join needs tmux on PATH".into());
    }
    let exe = std::env::current_exe().map_err(|e| format!("cannot find my own program: {e}"))?;
    let base = runtime_base();
    crate::access::make_private_dir(&base)?;
    let dir = base.join(format!("join-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    crate::access::make_private_dir(&dir)?;
    let mut cleanup = Cleanup { dir: dir.clone(), relay: relay.clone(), master: false };
    std::fs::write(dir.join("join.conf"), format!("sid={sid}\nro={}\n", u8::from(read_only)))
        .map_err(|e| format!("cannot write {}: {e}", dir.display()))?;
    make_fifo(&dir.join("ctl.fifo"))?;
    make_fifo(&dir.join("chat.fifo"))?;
    let sig = Signals::install().map_err(|e| format!("cannot set up signals: {e}"))?;
    let saved = Saved::stdin();

    // The master, in this terminal: ssh may ask for a passphrase or about the relay's host key.
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("ssh.log"))
        .map_err(|e| format!("cannot write ssh.log: {e}"))?;
    let mut m = Command::new(crate::relay::ssh_program());
    m.args(relay.base_args())
        .arg("-S")
        .arg(dir.join("ssh.sock"))
        .args(["-M", "-o", "ControlPersist=no", "-f", "-N", "-T"])
        .arg(relay.destination())
        .stdin(Stdio::inherit())
        .stdout(Stdio::null())
        .stderr(log);
    let st = m.status().map_err(|e| format!("cannot run ssh: {e}"))?;
    cleanup.master = true;
    if !st.success() {
        let why = std::fs::read(dir.join("ssh.log")).ok().and_then(|b| crate::relay::last_stderr_line(&b));
        return Err(format!(
            "cannot log in to the relay {}:{} as {}{}",
            relay.host,
            relay.port,
            relay.user,
            why.map(|w| format!(": {w}")).unwrap_or_default()
        ));
    }
    if let Some(s) =
        sig.drain().into_iter().find(|&s| matches!(s, crate::term::SIGINT | crate::term::SIGTERM | crate::term::SIGHUP))
    {
        return Ok(128 + s);
    }

    let conf = dir.join("tmux.conf");
    std::fs::write(&conf, tmux_conf(sid, &exe, &dir)).map_err(|e| format!("cannot write tmux.conf: {e}"))?;
    let (cols, rows) = rustix::termios::tcgetwinsize(rustix::stdio::stdout())
        .map(|w| (w.ws_col.max(20), w.ws_row.max(10)))
        .unwrap_or((80, 24));
    let sock = dir.join("tmux.sock");
    let pane =
        |role: &str| format!("exec {} {role} {}", sh_quote(&exe.to_string_lossy()), sh_quote(&dir.to_string_lossy()));
    let mut t = tmux(&sock);
    t.arg("-f").arg(&conf);
    t.args(["new-session", "-d", "-s", SESSION, "-x", &cols.to_string(), "-y", &rows.to_string()]);
    t.args(["-e", &format!("TUNL_JOIN_DIR={}", dir.display())]);
    t.arg(pane("__view"));
    t.args([";", "split-window", "-v", "-l", &CHAT_HEIGHT.to_string(), "-t", &format!("{SESSION}:0")]);
    t.args(["-e", &format!("TUNL_JOIN_DIR={}", dir.display())]);
    t.arg(pane("__chat"));
    t.args([";", "select-pane", "-t", &format!("{SESSION}:0.0")]);
    if !run_quiet(t) {
        return Err("cannot start tmux for the view".into());
    }

    // The view joins; only then does the engineer's terminal switch to tmux.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match read_state(&dir) {
            Some(s) if s.starts_with("ready") => break,
            Some(s) if s.starts_with("failed") => {
                return Err(neutralize(s.trim_start_matches("failed").trim()));
            }
            _ => {}
        }
        if let Some(&s) = sig.drain().iter().find(|&&s| s != crate::term::SIGCHLD && s != crate::term::SIGWINCH) {
            let _ = send_ctl(&dir, &format!("quit {s}"));
            return Ok(128 + s);
        }
        if Instant::now() > deadline {
            return Err("the relay did not let us join within 60 s".into());
        }
        if !run_quiet({
            let mut c = tmux(&sock);
            c.arg("has-session");
            c
        }) {
            return Err("the view ended before joining (see its ssh.log with TUNL_KEEP_JOIN_DIR=1)".into());
        }
        std::thread::sleep(Duration::from_millis(30));
    }

    let mut attach = tmux(&sock);
    attach.args(["attach-session", "-t", SESSION]);
    let mut child = attach.spawn().map_err(|e| format!("cannot run tmux attach: {e}"))?;
    let mut signalled = 0;
    let mut asked_at: Option<Instant> = None;
    loop {
        if let Ok(Some(_)) = child.try_wait() {
            break;
        }
        let mut fds = [rustix::event::PollFd::from_borrowed_fd(sig.fd(), rustix::event::PollFlags::IN)];
        let ts = rustix::event::Timespec { tv_sec: 0, tv_nsec: 100_000_000 };
        let _ = rustix::event::poll(&mut fds, Some(&ts));
        for s in sig.drain() {
            if matches!(s, crate::term::SIGINT | crate::term::SIGTERM | crate::term::SIGHUP) && signalled == 0 {
                signalled = s;
                let _ = send_ctl(&dir, &format!("quit {s}"));
                asked_at = Some(Instant::now());
            }
        }
        // A view that does not end the server in time is not waited for.
        if asked_at.is_some_and(|t| t.elapsed() > Duration::from_secs(3)) {
            let _ = run_quiet({
                let mut c = tmux(&sock);
                c.arg("kill-server");
                c
            });
            asked_at = None;
        }
    }
    let attach_ok = child.wait().is_ok_and(|s| s.success());
    if let Some(s) = &saved {
        s.restore();
    }
    // tmux puts the screen back itself; a tmux client that was killed did not: the main screen, the
    // cursor shown, no attributes, no scroll region, and the cursor on the last row.
    if !attach_ok {
        let _ = crate::term::write_all(rustix::stdio::stdout(), b"\x1b[?1049l\x1b[?25h\x1b[0m\x1b[r\x1b[999;1H\r\n");
    }

    // Attach returned without the view ending (Ctrl-b D, another client): that is a detach.
    let mut exit = std::fs::read_to_string(dir.join("exit")).ok();
    if exit.is_none() {
        let _ = send_ctl(&dir, if signalled != 0 { "quit 15" } else { "detach" });
        let deadline = Instant::now() + Duration::from_secs(5);
        while exit.is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(30));
            exit = std::fs::read_to_string(dir.join("exit")).ok();
        }
    }
    drop(cleanup);
    if signalled != 0 {
        return Ok(128 + signalled);
    }
    match exit.as_deref().and_then(parse_exit) {
        Some((status, msg)) => {
            if !msg.is_empty() {
                if status == 0 {
                    println!("tunl: {msg}");
                } else {
                    return Err(msg);
                }
            }
            Ok(status)
        }
        None => Err("the view ended without saying why".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting() {
        assert_eq!(sh_quote("/usr/bin/tunl"), "/usr/bin/tunl");
        assert_eq!(sh_quote("/a b/it's"), "'/a b/it'\\''s'");
        assert_eq!(tmux_quote("a \"b\" $HOME \\"), "\"a \\\"b\\\" \\$HOME \\\\\"");
        let b = ctl_binding(Path::new("/x/tunl"), Path::new("/tmp/d#1"), "detach");
        assert_eq!(b, "run-shell -b \"/x/tunl __ctl '/tmp/d##1' detach\"");
    }

    #[test]
    fn conf_keeps_customer_output_in_the_pane() {
        let c = tmux_conf("swift-fox-jumps-barrel", Path::new("/x/tunl"), Path::new("/tmp/d"));
        for want in [
            "set-option -g set-clipboard off",
            "set-option -gq allow-passthrough off",
            "bind-key c select-pane -t :.+",
            "bind-key C-c select-pane -t :.+",
            "bind-key d run-shell -b \"/x/tunl __ctl /tmp/d detach\"",
            "set-hook -g client-resized",
            "tunl swift-fox-jumps-barrel",
        ] {
            assert!(c.contains(want), "{want}\n{c}");
        }
    }

    #[test]
    fn exit_file() {
        assert_eq!(parse_exit("0\ndetached\n"), Some((0, "detached".into())));
        assert_eq!(parse_exit("1\nbad\u{1b}[2J"), Some((1, "bad^[[2J".into())));
        assert_eq!(parse_exit("143"), Some((143, String::new())));
        assert_eq!(parse_exit("x\n"), None);
    }
}
