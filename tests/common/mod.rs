//! Shared harness for the end-to-end tests: the real binary, the test relay, a customer terminal.
#![allow(dead_code)]

use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[allow(unused_imports)]
pub use relay_double::{Conn, Relay, RelayOpts};

pub const BIN: &str = env!("CARGO_BIN_EXE_linbit-tunl");

pub fn secs(n: u64) -> Instant {
    Instant::now() + Duration::from_secs(n)
}

pub fn session_dir(id: &str) -> PathBuf {
    use sha2::{Digest, Sha256};
    let d = Sha256::digest(id.as_bytes());
    let h: String = d.iter().take(6).map(|b| format!("{b:02x}")).collect();
    PathBuf::from(format!("/tmp/linbit-tunl-{h}"))
}

/// A session ID unique to this test process and call, so parallel tests never share a directory.
pub fn unique_id(word: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    let letters = |mut v: u32| {
        let mut s = String::new();
        for _ in 0..6 {
            s.push((b'a' + (v % 26) as u8) as char);
            v /= 26;
        }
        s
    };
    format!("{word}-{}-{}-test", letters(std::process::id()), letters(n))
}

/// A scratch directory removed on drop.
pub struct Scratch(pub PathBuf);

impl Scratch {
    pub fn new(tag: &str) -> Scratch {
        static N: AtomicU32 = AtomicU32::new(0);
        let p = std::env::temp_dir().join(format!(
            "tunl-e2e-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        Scratch(p)
    }
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

// ---- the client's tools ----
//
// `TUNL_TEST_CLIENT_PATH` (directories, `:`-separated) goes first in the PATH of the client under
// test, and only there: `just compat` points it at an old tmux or OpenSSH build. The tests' own
// terminal (the outer tmux) stays the system's; every test command against the client's tmux server
// uses `client_tmux()` (a client must be of its server's version).

/// The PATH the client under test runs with.
pub fn client_path() -> String {
    let base = std::env::var("PATH").unwrap_or_else(|_| "/usr/bin:/bin".into());
    match std::env::var("TUNL_TEST_CLIENT_PATH") {
        Ok(extra) if !extra.is_empty() => format!("{extra}:{base}"),
        _ => base,
    }
}

fn client_which(name: &str) -> Option<PathBuf> {
    std::env::split_paths(&client_path())
        .map(|d| d.join(name))
        .find(|p| std::fs::metadata(p).map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0).unwrap_or(false))
}

/// The tmux the client runs (a path).
pub fn client_tmux() -> PathBuf {
    client_which("tmux").unwrap_or_else(|| PathBuf::from("tmux"))
}

/// The system's tmux, for the customer's terminal (the outer tmux).
pub fn outer_tmux() -> PathBuf {
    which("tmux").unwrap_or_else(|| PathBuf::from("tmux"))
}

/// `tmux -V` of the client's tmux as (major, minor); (99, 0) when unreadable.
pub fn client_tmux_version() -> (u32, u32) {
    let o = Command::new(client_tmux()).arg("-V").output().map(|o| o.stdout).unwrap_or_default();
    let s = String::from_utf8_lossy(&o);
    let v = s.trim().trim_start_matches("tmux ");
    let (a, b) = v.split_once('.').unwrap_or((v, "0"));
    let b: String = b.chars().take_while(char::is_ascii_digit).collect();
    (a.parse().unwrap_or(99), b.parse().unwrap_or(0))
}

/// A PATH with `ssh` but no `tmux`: the host that only `--tunnel` serves.
pub fn path_without_tmux(scratch: &Scratch) -> String {
    let bin = scratch.path().join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    let real = client_which("ssh").expect("ssh not installed");
    let _ = std::os::unix::fs::symlink(real, bin.join("ssh"));
    bin.display().to_string()
}

pub fn which(name: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|d| d.join(name))
        .find(|p| std::fs::metadata(p).map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0).unwrap_or(false))
}

/// The client in the foreground (`--tunnel` without tmux), its stderr collected as it comes.
pub struct Foreground {
    pub child: Child,
    pub stderr: Arc<Mutex<Vec<u8>>>,
    pub id: String,
}

impl Foreground {
    pub fn start(relay: &Relay, id: &str, args: &[&str], env: &[(&str, &str)], scratch: &Scratch) -> Foreground {
        Foreground::start_with_input(relay, id, args, env, scratch, None)
    }

    /// As `start`, with `input` on stdin (then closed) instead of /dev/null.
    pub fn start_with_input(
        relay: &Relay,
        id: &str,
        args: &[&str],
        env: &[(&str, &str)],
        scratch: &Scratch,
        input: Option<&[u8]>,
    ) -> Foreground {
        let (fg, pipe) = Foreground::spawn(relay, id, args, env, scratch, input);
        fg.read_stderr(pipe);
        fg
    }

    fn spawn(
        relay: &Relay,
        id: &str,
        args: &[&str],
        env: &[(&str, &str)],
        scratch: &Scratch,
        input: Option<&[u8]>,
    ) -> (Foreground, std::process::ChildStderr) {
        let mut c = Command::new(BIN);
        c.args(args).arg(id).env_clear();
        c.env("PATH", path_without_tmux(scratch)).env("USER", relay.user()).env("HOME", scratch.path());
        c.env("TUNL_AUTHKEYS_FILE", scratch.path().join("authorized_keys"));
        c.env("TUNL_RECORDING_DIR", scratch.path());
        // The record of touched authorized_keys files stays in the test's scratch, not in /var/lib.
        c.env("TUNL_STATE_DIR", scratch.path().join("state"));
        for (k, v) in relay.env() {
            c.env(k, v);
        }
        for (k, v) in env {
            c.env(k, v);
        }
        c.stdin(if input.is_some() { Stdio::piped() } else { Stdio::null() });
        c.stdout(Stdio::null()).stderr(Stdio::piped());
        let mut child = c.spawn().unwrap();
        if let (Some(bytes), Some(mut pipe)) = (input, child.stdin.take()) {
            std::io::Write::write_all(&mut pipe, bytes).unwrap();
        }
        let pipe = child.stderr.take().unwrap();
        (Foreground { child, stderr: Arc::new(Mutex::new(Vec::new())), id: id.to_string() }, pipe)
    }

    /// As `start`, but nobody reads the client's stderr (a terminal that takes no output, F24)
    /// until `read_stderr` is given the pipe returned here.
    pub fn start_unread(
        relay: &Relay,
        id: &str,
        args: &[&str],
        scratch: &Scratch,
    ) -> (Foreground, std::process::ChildStderr) {
        Foreground::spawn(relay, id, args, &[], scratch, None)
    }

    /// Collect the client's stderr from `pipe` from now on.
    pub fn read_stderr(&self, mut pipe: std::process::ChildStderr) {
        let sink = self.stderr.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = pipe.read(&mut buf) {
                if n == 0 {
                    break;
                }
                sink.lock().unwrap().extend_from_slice(&buf[..n]);
            }
        });
    }

    pub fn stderr_text(&self) -> String {
        String::from_utf8_lossy(&self.stderr.lock().unwrap()).into_owned()
    }

    pub fn wait_stderr(&self, deadline: Instant, needle: &str) -> bool {
        while Instant::now() < deadline {
            if self.stderr_text().contains(needle) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    /// Wait for the exit status, killing the client at the deadline.
    pub fn wait(&mut self, deadline: Instant) -> Option<i32> {
        while Instant::now() < deadline {
            if let Ok(Some(st)) = self.child.try_wait() {
                // Let the reader thread collect the last words.
                std::thread::sleep(Duration::from_millis(50));
                return st.code();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        None
    }

    pub fn signal(&self, sig: &str) {
        Command::new("kill").args(["-s", sig, &self.child.id().to_string()]).status().unwrap();
    }

    /// Everything that explains a failure: the client's stderr and the session's ssh.log.
    pub fn diag(&self) -> String {
        format!("stderr:\n{}\nssh.log:\n{}", self.stderr_text(), self.ssh_log())
    }

    pub fn ssh_log(&self) -> String {
        std::fs::read_to_string(session_dir(&self.id).join("ssh.log")).unwrap_or_default()
    }
}

impl Drop for Foreground {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        let _ = std::fs::remove_dir_all(session_dir(&self.id));
    }
}

/// Processes whose command line mentions `needle` (to prove nothing is left behind).
pub fn processes_mentioning(needle: &str) -> Vec<String> {
    let mut found = Vec::new();
    if let Ok(rd) = std::fs::read_dir("/proc") {
        for e in rd.flatten() {
            let name = e.file_name();
            let Some(pid) = name.to_str().filter(|s| s.bytes().all(|b| b.is_ascii_digit())) else { continue };
            if let Ok(cmd) = std::fs::read(e.path().join("cmdline")) {
                let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
                if cmd.contains(needle) {
                    found.push(format!("{pid}: {cmd}"));
                }
            }
        }
    }
    found
}

/// Wait until no process mentions `needle`.
pub fn wait_no_processes(needle: &str, deadline: Instant) -> Vec<String> {
    loop {
        let p = processes_mentioning(needle);
        if p.is_empty() || Instant::now() >= deadline {
            return p;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

// ---- customer terminal (share mode) ----
//
// The customer's terminal is an OUTER tmux server on a private socket: the launcher runs in its only
// pane exactly as it would in a terminal emulator, keys are typed with `send-keys` (so `C-b Q` reaches
// the inner tmux as a person's keystrokes would) and the screen is read with `capture-pane -p`.

/// Poll `f` every 25 ms until it holds or the deadline passes.
pub fn poll_until(deadline: Instant, mut f: impl FnMut() -> bool) -> bool {
    loop {
        if f() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
}

/// A customer running `linbit-tunl ARGS ID` in a terminal (the outer tmux).
pub struct Customer {
    pub id: String,
    pub scratch: Scratch,
    pub outer: PathBuf,
    pub dir: PathBuf,
}

pub const OUTER_TARGET: &str = "cust:0.0";

impl Customer {
    /// Start the launcher in a fresh 160x48 terminal. `env` adds to (or overrides) the base
    /// environment: relay.env(), USER=root, HOME=scratch, TERM, TUNL_AUTHKEYS_FILE,
    /// TUNL_RECORDING_DIR, SHELL=/bin/sh with PS1='$ '.
    pub fn start(relay: &Relay, id: &str, args: &[&str], env: &[(&str, &str)]) -> Customer {
        let scratch = Scratch::new("cust");
        let s = scratch.path().to_path_buf();
        let outer = s.join("outer.sock");
        // The pane stays after the launcher exits, so its last words ("session recording: ...") can be read.
        std::fs::write(s.join("outer.conf"), "set-option -g remain-on-exit on\nset-option -g history-limit 20000\n")
            .unwrap();
        let mut words: Vec<String> = vec![BIN.to_string()];
        words.extend(args.iter().map(|a| a.to_string()));
        words.push(id.to_string());
        let cmdline: Vec<String> = words.iter().map(|w| sh_quote(w)).collect();
        let script = format!(
            "PATH={} {}; echo EXIT=$? > {}",
            sh_quote(&client_path()),
            cmdline.join(" "),
            sh_quote(&s.join("status").display().to_string())
        );
        let mut c = Command::new(outer_tmux());
        c.arg("-S").arg(&outer).arg("-f").arg(s.join("outer.conf"));
        c.args(["new-session", "-d", "-s", "cust", "-x", "160", "-y", "48", "sh", "-c", &script]);
        c.env_clear();
        c.env("PATH", std::env::var("PATH").unwrap_or_else(|_| "/usr/bin:/bin".into()));
        for (k, v) in relay.env() {
            c.env(k, v);
        }
        c.env("USER", "root").env("HOME", &s).env("TERM", "xterm-256color");
        c.env("TUNL_AUTHKEYS_FILE", s.join("authorized_keys")).env("TUNL_RECORDING_DIR", &s);
        c.env("TUNL_STATE_DIR", s.join("state"));
        c.env("SHELL", "/bin/sh").env("PS1", "$ ").env("LANG", "C.UTF-8");
        for (k, v) in env {
            c.env(k, v);
        }
        c.current_dir(&s).stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null());
        let st = c.status().expect("tmux");
        assert!(st.success(), "the outer tmux did not start");
        Customer { id: id.to_string(), scratch, outer, dir: session_dir(id) }
    }

    /// Register `id` with `token` and start; then accept the session at the relay, WELCOME it and
    /// wait until the customer's terminal shows the shell pane with a prompt.
    pub fn connect(relay: &Relay, id: &str, args: &[&str], env: &[(&str, &str)]) -> (Customer, Conn) {
        relay.register(id, Some(CUSTOMER_TOKEN));
        let mut a = vec!["--token", CUSTOMER_TOKEN];
        a.extend_from_slice(args);
        let c = Customer::start(relay, id, &a, env);
        let mut conn = relay.accept(secs(40)).unwrap_or_else(|| panic!("no session at the relay:\n{}", c.diag()));
        conn.welcome(1);
        // Pane labels need pane-border-status (tmux 2.3); before, the status line names the session.
        let labels = if client_tmux_version() >= (2, 3) { "[SHELL]".to_string() } else { format!(" {id} ") };
        assert!(
            c.wait_screen(secs(20), |s| s.contains(&labels) && s.lines().any(|l| matches!(l.trim_end(), "#" | "$"))),
            "the customer never saw the session:\n{}",
            c.diag()
        );
        (c, conn)
    }

    fn outer_cmd(&self) -> Command {
        let mut c = Command::new(outer_tmux());
        c.arg("-S").arg(&self.outer).stdin(Stdio::null());
        c
    }

    /// Keys as tmux key names (`C-b`, `Q`, `Enter`, `F1`), each its own keystroke.
    pub fn keys(&self, keys: &[&str]) {
        let st = self.outer_cmd().args(["send-keys", "-t", OUTER_TARGET]).args(keys).status().unwrap();
        assert!(st.success(), "send-keys {keys:?}");
    }

    /// Literal text, as if typed.
    pub fn type_text(&self, text: &str) {
        let st = self.outer_cmd().args(["send-keys", "-t", OUTER_TARGET, "-l", "--", text]).status().unwrap();
        assert!(st.success(), "send-keys -l {text:?}");
    }

    /// Type a line and press Enter.
    pub fn type_line(&self, text: &str) {
        self.type_text(text);
        self.keys(&["Enter"]);
    }

    /// The visible screen of the customer's terminal.
    pub fn screen(&self) -> String {
        let o = self.outer_cmd().args(["capture-pane", "-p", "-t", OUTER_TARGET]).output().unwrap();
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    /// The terminal's whole history and screen (for what the launcher printed after tmux ended).
    pub fn history(&self) -> String {
        let o = self.outer_cmd().args(["capture-pane", "-p", "-J", "-S", "-", "-t", OUTER_TARGET]).output().unwrap();
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    pub fn wait_screen(&self, deadline: Instant, pred: impl Fn(&str) -> bool) -> bool {
        poll_until(deadline, || pred(&self.screen()))
    }

    /// A command against the OUTER server (the customer's terminal), stdout as text.
    pub fn outer(&self, args: &[&str]) -> String {
        let o = self.outer_cmd().args(args).output().unwrap();
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    /// A command against the session's own (inner) tmux server, stdout as text.
    pub fn inner(&self, args: &[&str]) -> String {
        let o = Command::new(client_tmux())
            .arg("-S")
            .arg(self.dir.join("tmux.sock"))
            .args(args)
            .env_remove("TMUX")
            .stdin(Stdio::null())
            .output()
            .unwrap();
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    /// `display -p FORMAT` on the inner server's current pane.
    pub fn inner_fmt(&self, fmt: &str) -> String {
        self.inner(&["display-message", "-p", fmt]).trim_end().to_string()
    }

    /// Which of our panes has the focus, "shell" or "chat" (told by what tmux started in it: pane
    /// options, where the launcher tags them, exist only from tmux 3.0).
    pub fn focus(&self) -> String {
        let cmd = self.inner_fmt("#{pane_start_command}");
        if cmd.contains(" __chat ") { "chat" } else { "shell" }.to_string()
    }

    /// The exit status the launcher's shell wrote, once it exited.
    pub fn status(&self) -> Option<i32> {
        let s = std::fs::read_to_string(self.scratch.path().join("status")).ok()?;
        s.trim().strip_prefix("EXIT=")?.parse().ok()
    }

    pub fn wait_status(&self, deadline: Instant) -> Option<i32> {
        let mut st = None;
        poll_until(deadline, || {
            st = self.status();
            st.is_some()
        });
        st
    }

    pub fn daemon_pid(&self) -> Option<i32> {
        std::fs::read_to_string(self.dir.join("daemon.pid")).ok()?.trim().parse().ok()
    }

    pub fn ssh_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("ssh.log")).unwrap_or_default()
    }

    /// Everything that explains a failure.
    pub fn diag(&self) -> String {
        format!(
            "screen:\n{}\nstatus: {:?}\ndebug.log:\n{}\nssh.log:\n{}",
            self.history(),
            self.status(),
            std::fs::read_to_string(self.dir.join("debug.log")).unwrap_or_default(),
            self.ssh_log()
        )
    }

    /// The path printed as "session recording: PATH (...)".
    pub fn recording_path(&self) -> Option<PathBuf> {
        let h = self.history();
        let i = h.find("session recording: ")?;
        let rest = &h[i + "session recording: ".len()..];
        let p = rest.split_whitespace().next()?;
        Some(PathBuf::from(p))
    }

    /// Nothing of the session left: no process mentioning the session dir, no socket, no directory.
    pub fn assert_clean(&self) {
        let d = self.dir.display().to_string();
        let left = wait_no_processes(&d, secs(10));
        assert!(left.is_empty(), "processes left behind: {left:?}");
        assert!(!self.dir.join("tmux.sock").exists(), "tmux socket left behind");
        assert!(!self.dir.exists(), "session directory left behind");
    }
}

impl Drop for Customer {
    fn drop(&mut self) {
        let _ = self.outer_cmd().arg("kill-server").stderr(Stdio::null()).status();
        let _ = Command::new(client_tmux())
            .arg("-S")
            .arg(self.dir.join("tmux.sock"))
            .arg("kill-server")
            .env_remove("TMUX")
            .stderr(Stdio::null())
            .status();
        // Give the daemon its orderly end; whatever is still running after that was ours: kill it by pid.
        let d = self.dir.display().to_string();
        let mut left = wait_no_processes(&d, secs(5));
        left.extend(processes_mentioning(&self.id));
        for p in left {
            if let Some(pid) = p.split(':').next() {
                let _ = Command::new("kill").args(["-KILL", pid]).stderr(Stdio::null()).status();
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

pub const CUSTOMER_TOKEN: &str = "424242";

pub fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// A 64 KiB tmpfs of its own (root only), for a full disk under a file we write; unmounted on drop.
pub struct TinyFs(pub PathBuf);

impl TinyFs {
    pub fn mount(mode: u32, at: &Path) -> TinyFs {
        std::fs::create_dir_all(at).unwrap();
        let opts = format!("size=64k,mode={mode:04o}");
        let st = Command::new("mount").args(["-t", "tmpfs", "-o", &opts, "tmpfs"]).arg(at).status();
        assert!(st.is_ok_and(|s| s.success()), "cannot mount a tmpfs (the test needs root)");
        TinyFs(at.to_path_buf())
    }

    /// Fill it to the last byte.
    pub fn fill(&self) {
        use std::io::Write;
        let mut f = std::fs::File::create(self.0.join("filler")).unwrap();
        let chunk = vec![b'x'; 4096];
        while f.write_all(&chunk).is_ok() {}
        let one = [b'x'; 1];
        while f.write_all(&one).is_ok() {}
        let _ = f.sync_all();
    }
}

impl Drop for TinyFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}
