//! `just bench`: the figures of design.md ("What we measure"), each beside its limit measured in the
//! same run on the same machine. A benchmark, not a test: it reports and never fails on a target.
//!
//! One share session (the customer's client inside an outer tmux, the test relay on loopback) serves
//! throughput, latency, idle cost and memory; a bare tmux server with a bare control-mode client,
//! its pane shown by a client in an outer tmux as ours is, gives the limits. Start-up runs ten
//! foreground `--tunnel` sessions. Everything started here is stopped and removed at the end.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use relay_double::{Conn, Relay, RelayOpts, k_line, unb64};

const BIN: &str = env!("CARGO_BIN_EXE_linbit-tunl");
const TOKEN: &str = "424242";
/// The throughput workload: this many bytes of text, printed by `cat` in the shell pane.
const WORKLOAD: usize = 40_000_000;
/// Rounds of the throughput workload per side (the median counts).
const ROUNDS: usize = 3;
const KEYSTROKES: usize = 500;
const IDLE: Duration = Duration::from_secs(60);
const STARTUPS: usize = 10;
/// What the shell prints when the workload is done; typed as `$((6*7))` so the echo of the command
/// line never contains it.
const MARKER: &[u8] = b"BENCH-END-42";
const MARKER_CMD: &str = "echo BENCH-END-$((6*7))";

// ---- small helpers (copied from tests/common, which other work appends to) --------------------

fn secs(n: u64) -> Instant {
    Instant::now() + Duration::from_secs(n)
}

fn session_dir(id: &str) -> PathBuf {
    use sha2::{Digest, Sha256};
    let d = Sha256::digest(id.as_bytes());
    let h: String = d.iter().take(6).map(|b| format!("{b:02x}")).collect();
    PathBuf::from(format!("/tmp/linbit-tunl-{h}"))
}

fn session_id(word: &str, n: u32) -> String {
    let mut v = std::process::id();
    let mut s = String::new();
    for _ in 0..6 {
        s.push((b'a' + (v % 26) as u8) as char);
        v /= 26;
    }
    let n = (b'a' + (n % 26) as u8) as char;
    format!("{word}-{s}-bench-{n}")
}

/// A scratch directory removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new() -> Scratch {
        let p = std::env::temp_dir().join(format!("tunl-bench-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        Scratch(p)
    }
    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn which(name: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|d| d.join(name))
        .find(|p| std::fs::metadata(p).map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0).unwrap_or(false))
}

/// A dir with only an `ssh` symlink: the host that only `--tunnel` serves, in the foreground.
fn path_without_tmux(scratch: &Scratch) -> String {
    let bin = scratch.path().join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    let _ = std::os::unix::fs::symlink(which("ssh").expect("ssh"), bin.join("ssh"));
    bin.display().to_string()
}

/// A tmux server on a private socket, killed on drop.
struct Tmux(PathBuf);

impl Tmux {
    fn cmd(&self) -> Command {
        let mut c = Command::new("tmux");
        c.arg("-S").arg(&self.0).env_remove("TMUX");
        c.stdin(Stdio::null());
        c
    }
    fn run(&self, args: &[&str]) -> String {
        let o = self.cmd().args(args).output().unwrap();
        assert!(o.status.success(), "tmux {args:?}: {}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8_lossy(&o.stdout).into_owned()
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = self.cmd().arg("kill-server").stderr(Stdio::null()).status();
        let _ = std::fs::remove_file(&self.0);
    }
}

fn wait_until(deadline: Instant, mut cond: impl FnMut() -> bool) -> bool {
    while Instant::now() < deadline {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    cond()
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// utime + stime of a process, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let Some((_, rest)) = stat.rsplit_once(')') else { return 0 };
    let f: Vec<&str> = rest.split_whitespace().collect();
    // After ")": state(0) ppid(1) ... utime(11) stime(12).
    f.get(11).and_then(|s| s.parse::<u64>().ok()).unwrap_or(0)
        + f.get(12).and_then(|s| s.parse::<u64>().ok()).unwrap_or(0)
}

/// A numeric field of /proc/PID/status (`VmHWM`, `voluntary_ctxt_switches`, ...).
fn status_field(pid: u32, key: &str) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines()
        .find_map(|l| l.strip_prefix(key).and_then(|r| r.strip_prefix(':')))
        .and_then(|r| r.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn ppid(pid: u32) -> u32 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    rest.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0)
}

/// Direct children of `pid` whose command name is `comm`.
fn children_named(pid: u32, comm: &str) -> Vec<u32> {
    let mut kids = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(p) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else { continue };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{p}/stat")) else { continue };
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else { continue };
        let ppid = stat[close + 1..].split_whitespace().nth(1).and_then(|s| s.parse::<u32>().ok());
        if ppid == Some(pid) && &stat[open + 1..close] == comm {
            kids.push(p);
        }
    }
    kids
}

fn processes_mentioning(needle: &str) -> Vec<String> {
    let mut found = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let name = e.file_name();
        let Some(pid) = name.to_str().filter(|s| s.bytes().all(|b| b.is_ascii_digit())) else { continue };
        if let Ok(cmd) = std::fs::read(e.path().join("cmdline")) {
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            if cmd.contains(needle) && pid != std::process::id().to_string() {
                found.push(format!("{pid}: {cmd}"));
            }
        }
    }
    found
}

fn clk_tck() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as f64 } else { 100.0 }
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn percentile(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let i = ((v.len() as f64 * p).ceil() as usize).clamp(1, v.len()) - 1;
    v[i]
}

/// tmux's `%output` escaping undone: `\ooo` is one byte.
fn unescape(v: &[u8], out: &mut Vec<u8>) {
    let mut i = 0;
    while i < v.len() {
        if v[i] == b'\\' && i + 4 <= v.len() {
            let d = &v[i + 1..i + 4];
            out.push(((d[0] - b'0') << 6) | ((d[1] - b'0') << 3) | (d[2] - b'0'));
            i += 4;
        } else {
            out.push(v[i]);
            i += 1;
        }
    }
}

// ---- the workload -------------------------------------------------------------------------------

/// 40 MB of numbered 100-byte lines of printable text.
fn write_workload(path: &Path) -> Vec<u8> {
    let mut data = Vec::with_capacity(WORKLOAD);
    let body: Vec<u8> = (0..90u8).map(|i| b'!' + (i % 94)).collect();
    let mut n = 0u32;
    while data.len() + 100 <= WORKLOAD {
        data.extend_from_slice(format!("{n:08} ").as_bytes());
        data.extend_from_slice(&body);
        data.push(b'\n');
        n += 1;
    }
    std::fs::write(path, &data).unwrap();
    data
}

/// What the workload looks like coming out of a pane: the tty turns `\n` into `\r\n`.
fn through_tty(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len() + data.len() / 50);
    for &b in data {
        if b == b'\n' {
            out.push(b'\r');
        }
        out.push(b);
    }
    out
}

/// Complete and in order: the whole workload appears, contiguous, after the echo of the command.
fn complete_in_order(output: &[u8], expected: &[u8]) -> bool {
    // The first line, after the command's echo (which never contains "00000000 ").
    let Some(start) = find(output, &expected[..9]) else { return false };
    output.len() >= start + expected.len() && &output[start..start + expected.len()] == expected
}

fn type_command(tmux: &Tmux, pane: &str, cmd: &str) {
    tmux.run(&["send-keys", "-t", pane, "-l", cmd]);
    tmux.run(&["send-keys", "-t", pane, "Enter"]);
}

/// Wait until `pane` runs `program` in the foreground (e.g. `cat` is reading the keystrokes).
fn wait_for_program(tmux: &Tmux, pane: &str, program: &str) {
    let running = || tmux.run(&["display-message", "-p", "-t", pane, "#{pane_current_command}"]).trim() == program;
    assert!(wait_until(secs(10), running), "{program} did not start in {pane}");
}

// ---- the bare limit: a tmux server and a bare control-mode client ----------------------------

struct Bare {
    tmux: Tmux,
    ctl: Child,
    stdin: ChildStdin,
    out: BufReader<ChildStdout>,
    line: Vec<u8>,
}

impl Bare {
    fn start(scratch: &Scratch, outer: &Tmux) -> Bare {
        let tmux = Tmux(scratch.path().join("bare.sock"));
        let mut c = tmux.cmd();
        c.args(["-f", "/dev/null", "new-session", "-d", "-s", "bare", "-x", "160", "-y", "40"]);
        c.env("SHELL", "/bin/sh").env("HOME", scratch.path()).env("TERM", "xterm-256color");
        assert!(c.status().unwrap().success());
        // Shown in a terminal as the customer's shell pane is: tmux renders to a real client there too.
        outer.run(&["new-window", "-d", "-n", "bare", &format!("tmux -S {} attach -t bare", tmux.0.display())]);
        let mut ctl = tmux
            .cmd()
            .args(["-C", "attach-session", "-t", "bare"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdin = ctl.stdin.take().unwrap();
        let out = BufReader::with_capacity(1 << 16, ctl.stdout.take().unwrap());
        let mut b = Bare { tmux, ctl, stdin, out, line: Vec::new() };
        b.sync();
        b
    }

    /// Send a command and read until its reply ends (everything before it is dropped).
    fn sync(&mut self) {
        writeln!(self.stdin, "display-message -p bench-sync").unwrap();
        let mut seen = false;
        loop {
            self.next_line();
            if self.line == b"bench-sync" {
                seen = true;
            }
            if seen && self.line.starts_with(b"%end ") {
                return;
            }
        }
    }

    fn next_line(&mut self) {
        self.line.clear();
        let n = self.out.read_until(b'\n', &mut self.line).unwrap();
        assert!(n > 0, "the bare control client ended");
        if self.line.last() == Some(&b'\n') {
            self.line.pop();
        }
    }

    /// The next `%output %0` payload, unescaped, appended to `out`.
    fn next_output(&mut self, out: &mut Vec<u8>) {
        loop {
            self.next_line();
            if let Some(v) = self.line.strip_prefix(b"%output %0 ") {
                unescape(v, out);
                return;
            }
        }
    }

    fn throughput(&mut self, workload: &Path, expected: &[u8]) -> f64 {
        self.sync();
        let t0 = Instant::now();
        type_command(&self.tmux, "%0", &format!("cat {}; {MARKER_CMD}", workload.display()));
        let mut got = Vec::with_capacity(expected.len() + 4096);
        loop {
            let before = got.len().saturating_sub(MARKER.len());
            self.next_output(&mut got);
            if find(&got[before..], MARKER).is_some() {
                break;
            }
        }
        let dt = t0.elapsed().as_secs_f64();
        assert!(complete_in_order(&got, expected), "bare: workload incomplete or out of order");
        WORKLOAD as f64 / 1e6 / dt
    }

    /// Round trips `send-keys` -> `%output` echo, in ms, with `cat` in the pane.
    fn latency(&mut self) -> Vec<f64> {
        type_command(&self.tmux, "%0", "clear; cat");
        wait_for_program(&self.tmux, "%0", "cat");
        self.sync();
        let mut v = Vec::with_capacity(KEYSTROKES);
        let mut got = Vec::new();
        for i in 0..KEYSTROKES {
            let key = b'a' + (i % 26) as u8;
            let t0 = Instant::now();
            writeln!(self.stdin, "send-keys -H -t %0 {key:02x}").unwrap();
            loop {
                got.clear();
                self.next_output(&mut got);
                if got.contains(&key) {
                    break;
                }
            }
            v.push(t0.elapsed().as_secs_f64() * 1e3);
        }
        self.tmux.run(&["send-keys", "-t", "%0", "C-c"]);
        v
    }
}

impl Drop for Bare {
    fn drop(&mut self) {
        let _ = self.ctl.kill();
        let _ = self.ctl.wait();
    }
}

// ---- our side: a share session -----------------------------------------------------------------

struct Share {
    id: String,
    conn: Conn,
    inner: Tmux,
    pane: String,
    daemon: u32,
}

impl Share {
    fn start(relay: &Relay, scratch: &Scratch, outer: &Tmux) -> Share {
        let id = session_id("share", 0);
        relay.register(&id, Some(TOKEN));
        let mut c = outer.cmd();
        c.env_clear();
        c.env("PATH", std::env::var("PATH").unwrap());
        for (k, v) in relay.env() {
            c.env(k, v);
        }
        c.env("USER", relay.user()).env("HOME", scratch.path()).env("TERM", "xterm-256color");
        c.env("SHELL", "/bin/sh");
        c.env("TUNL_AUTHKEYS_FILE", scratch.path().join("ak")).env("TUNL_RECORDING_DIR", scratch.path());
        c.env("TUNL_STATE_DIR", scratch.path().join("state"));
        c.args(["-f", "/dev/null", "new-session", "-d", "-x", "160", "-y", "48"]);
        c.arg(format!("{BIN} --token {TOKEN} {id}"));
        assert!(c.status().unwrap().success(), "outer tmux");
        let mut conn = relay.accept(secs(60)).expect("no session reached the relay");
        conn.welcome(1);
        assert!(conn.wait_verb(secs(10), "STATE").is_some(), "no STATE: {:?}", conn.lines());
        let dir = session_dir(&id);
        let inner = Tmux(dir.join("tmux.sock"));
        let mut pane = String::new();
        assert!(
            wait_until(secs(10), || {
                let o = inner.cmd().args(["list-panes", "-s", "-F", "#{pane_id} #{@linbit-role}"]).output().unwrap();
                let s = String::from_utf8_lossy(&o.stdout).into_owned();
                match s.lines().find(|l| l.ends_with(" shell")) {
                    Some(l) => {
                        pane = l.split(' ').next().unwrap().to_string();
                        true
                    }
                    None => false,
                }
            }),
            "no shell pane"
        );
        let daemon = std::fs::read_to_string(dir.join("daemon.pid")).unwrap().trim().parse().unwrap();
        // The customer's client is attached (the launcher waited for WELCOME) and the shell is up.
        assert!(wait_until(secs(10), || inner.run(&["list-clients"]).lines().any(|l| !l.is_empty())));
        std::thread::sleep(Duration::from_millis(300));
        Share { id, conn, inner, pane, daemon }
    }

    fn drain(&mut self) {
        while self.conn.recv_line(Instant::now()).is_some() {}
    }

    /// The processes whose CPU time explains a throughput figure.
    fn cpu_roles(&self, outer: &Tmux) -> Vec<(&'static str, u32)> {
        let pid = |t: &Tmux| t.run(&["display-message", "-p", "#{pid}"]).trim().parse::<u32>().unwrap();
        let mut v = vec![("daemon", self.daemon)];
        v.extend(children_named(self.daemon, "ssh").into_iter().map(|p| ("ssh", p)));
        v.extend(children_named(self.daemon, "tmux").into_iter().map(|p| ("tmux -C", p)));
        v.push(("inner tmux server", pid(&self.inner)));
        v.push(("outer tmux server", pid(outer)));
        for p in processes_mentioning(" shim ") {
            if let Some(pid) = p.split(':').next().and_then(|s| s.parse().ok()) {
                v.push(("relay shim", pid));
                v.push(("relay sshd", ppid(pid)));
            }
        }
        v.push(("bench (relay, bare reader)", std::process::id()));
        v
    }

    /// The decoded output so far ends with `needle` somewhere in its last few KiB.
    /// Only output after `base` counts.
    fn output_tail_has(&mut self, base: usize, needle: &[u8]) -> bool {
        self.conn.wait_output(Instant::now(), |o| find(&o[o.len().saturating_sub(4096).max(base)..], needle).is_some())
    }

    fn throughput(&mut self, workload: &Path, expected: &[u8]) -> f64 {
        self.drain();
        let base = self.conn.output().len();
        let t0 = Instant::now();
        type_command(&self.inner, &self.pane, &format!("cat {}; {MARKER_CMD}", workload.display()));
        // Every line from the relay's reader wakes us (no polling interval in the figure); the
        // decoded output is checked near its end only.
        let deadline = secs(300);
        loop {
            let Some(l) = self.conn.recv_line(deadline) else { panic!("no marker at the relay") };
            if l.starts_with("O ") && self.output_tail_has(base, MARKER) {
                break;
            }
        }
        let dt = t0.elapsed().as_secs_f64();
        let out = self.conn.output();
        assert!(complete_in_order(&out[base..], expected), "ours: workload incomplete or out of order");
        WORKLOAD as f64 / 1e6 / dt
    }

    /// Round trips `K` -> `O` echo, in ms, with `cat` in the pane.
    fn latency(&mut self) -> Vec<f64> {
        type_command(&self.inner, &self.pane, "clear; cat");
        wait_for_program(&self.inner, &self.pane, "cat");
        self.drain();
        let mut v = Vec::with_capacity(KEYSTROKES);
        for i in 0..KEYSTROKES {
            let key = b'a' + (i % 26) as u8;
            let line = k_line(&[key]);
            let t0 = Instant::now();
            self.conn.send(&line);
            loop {
                let l = self.conn.recv_line(secs(10)).expect("no echo at the relay");
                if let Some(p) = l.strip_prefix("O ") {
                    if unb64(p).is_some_and(|b| b.contains(&key)) {
                        break;
                    }
                }
            }
            v.push(t0.elapsed().as_secs_f64() * 1e3);
        }
        self.inner.run(&["send-keys", "-t", &self.pane, "C-c"]);
        v
    }

    /// The daemon and its ssh child over exactly `IDLE`: (CPU % of a core, wake-ups per minute).
    fn idle(&mut self) -> (f64, f64, String) {
        std::thread::sleep(Duration::from_secs(2));
        let ssh = children_named(self.daemon, "ssh");
        let pids: Vec<u32> = std::iter::once(self.daemon).chain(ssh.iter().copied()).collect();
        let t0: Vec<u64> = pids.iter().map(|&p| cpu_ticks(p)).collect();
        let s0: Vec<u64> = pids.iter().map(|&p| status_field(p, "voluntary_ctxt_switches")).collect();
        std::thread::sleep(IDLE);
        let t1: Vec<u64> = pids.iter().map(|&p| cpu_ticks(p)).collect();
        let s1: Vec<u64> = pids.iter().map(|&p| status_field(p, "voluntary_ctxt_switches")).collect();
        let ticks: u64 = t1.iter().zip(&t0).map(|(a, b)| a - b).sum();
        let switches: u64 = s1.iter().zip(&s0).map(|(a, b)| a - b).sum();
        let cpu_s = ticks as f64 / clk_tck();
        let detail = format!(
            "daemon {} ticks {} switches; ssh {:?} {} ticks {} switches",
            t1[0] - t0[0],
            s1[0] - s0[0],
            ssh,
            ticks - (t1[0] - t0[0]),
            switches - (s1[0] - s0[0])
        );
        (cpu_s / IDLE.as_secs_f64() * 100.0, switches as f64 * 60.0 / IDLE.as_secs_f64(), detail)
    }

    /// Orderly end: SIGTERM to the daemon, BYE at the relay, the session directory gone.
    fn end(mut self) {
        let _ = Command::new("kill").args(["-TERM", &self.daemon.to_string()]).status();
        let _ = self.conn.wait_verb(secs(15), "BYE");
        let dir = session_dir(&self.id);
        wait_until(secs(15), || !dir.exists());
        let _ = std::fs::remove_dir_all(&dir);
    }
}

// ---- start-up: foreground --tunnel to the relay's accept ----------------------------------------

fn startup(relay: &Relay, scratch: &Scratch) -> Vec<f64> {
    let path = path_without_tmux(scratch);
    let mut v = Vec::new();
    for n in 0..STARTUPS {
        let id = session_id("start", n as u32);
        relay.register(&id, Some(TOKEN));
        let mut c = Command::new(BIN);
        c.args(["--tunnel", "--token", TOKEN, &id]).env_clear();
        c.env("PATH", &path).env("USER", relay.user()).env("HOME", scratch.path());
        c.env("TUNL_AUTHKEYS_FILE", scratch.path().join("ak")).env("TUNL_RECORDING_DIR", scratch.path());
        c.env("TUNL_STATE_DIR", scratch.path().join("state"));
        for (k, v) in relay.env() {
            c.env(k, v);
        }
        c.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null());
        let t0 = Instant::now();
        let mut child = c.spawn().unwrap();
        let conn = relay.accept(secs(30));
        let dt = t0.elapsed().as_secs_f64() * 1e3;
        let Some(mut conn) = conn else {
            let _ = child.kill();
            let _ = child.wait();
            panic!("start-up {n}: no session at the relay");
        };
        v.push(dt);
        conn.welcome(0);
        let _ = conn.wait_verb(secs(10), "STATE");
        let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
        let _ = conn.wait_verb(secs(10), "BYE");
        if !wait_until(secs(15), || matches!(child.try_wait(), Ok(Some(_)))) {
            let _ = child.kill();
        }
        let _ = child.wait();
        let _ = std::fs::remove_dir_all(session_dir(&id));
    }
    v
}

/// The limit under start-up: a plain `ssh` with a certificate from the same CA, exec to the relay's
/// accept (sshd, the shim and the broker cost the same; key, signing and our own start do not).
fn startup_bare_ssh(relay: &Relay, scratch: &Scratch) -> Vec<f64> {
    let key = scratch.path().join("bare_ed25519");
    let st = Command::new("ssh-keygen").args(["-q", "-t", "ed25519", "-N", "", "-f"]).arg(&key).status().unwrap();
    assert!(st.success());
    let cert = relay.sign_user_key(&key.with_extension("pub"), "bench-bare").unwrap();
    let kh = scratch.path().join("bare_known_hosts");
    std::fs::write(&kh, format!("{}\n", relay.known_hosts_line())).unwrap();
    let mut v = Vec::new();
    for n in 0..STARTUPS {
        let mut c = Command::new("ssh");
        c.args(["-F", "/dev/null", "-T", "-p", &relay.port().to_string(), "-l", relay.user(), "-i"]).arg(&key);
        c.arg("-o").arg(format!("CertificateFile={}", cert.display()));
        c.arg("-o").arg(format!("UserKnownHostsFile={}", kh.display()));
        for o in ["IdentitiesOnly=yes", "IdentityAgent=none", "GlobalKnownHostsFile=/dev/null", "BatchMode=yes"] {
            c.args(["-o", o]);
        }
        c.args(["-o", "StrictHostKeyChecking=yes", "127.0.0.1", &format!("linbit-tunl/1 id=bare-ssh-{n} mode=tunnel")]);
        c.stdin(Stdio::piped()).stdout(Stdio::null()).stderr(Stdio::null());
        let t0 = Instant::now();
        let mut child = c.spawn().unwrap();
        let conn = relay.accept(secs(30));
        v.push(t0.elapsed().as_secs_f64() * 1e3);
        assert!(conn.is_some(), "bare ssh: no session at the relay");
        drop(conn);
        if !wait_until(secs(5), || matches!(child.try_wait(), Ok(Some(_)))) {
            let _ = child.kill();
        }
        let _ = child.wait();
    }
    v
}

// ---- report ---------------------------------------------------------------------------------------

struct Row {
    name: &'static str,
    value: String,
    limit: String,
    ok: bool,
}

fn fmt2(x: f64) -> String {
    format!("{x:.2}")
}

#[test]
#[ignore = "benchmark: run with `just bench`"]
fn bench() {
    let relay = Relay::start(RelayOpts::default()).expect("test relay");
    let scratch = Scratch::new();
    let workload = scratch.path().join("workload.txt");
    let expected = through_tty(&write_workload(&workload));
    let outer = Tmux(scratch.path().join("outer.sock"));

    eprintln!("bench: share session");
    let mut share = Share::start(&relay, &scratch, &outer);
    let mut bare = Bare::start(&scratch, &outer);

    let who = share.cpu_roles(&outer);
    let cpu0: Vec<u64> = who.iter().map(|(_, p)| cpu_ticks(*p)).collect();
    eprintln!("bench: throughput, {ROUNDS} rounds of {} MB each side", WORKLOAD / 1_000_000);
    let (mut ours, mut base) = (Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        base.push(bare.throughput(&workload, &expected));
        ours.push(share.throughput(&workload, &expected));
        type_command(&share.inner, &share.pane.clone(), "clear");
        type_command(&bare.tmux, "%0", "clear");
    }
    eprintln!("bench: throughput MB/s ours {ours:.1?} bare {base:.1?}");
    // Where the CPU went over all rounds of both sides (the bare side is the tmux servers only).
    let cpu: Vec<String> = who
        .iter()
        .zip(&cpu0)
        .map(|((name, p), t0)| format!("{name} {:.2}", (cpu_ticks(*p) - t0) as f64 / clk_tck()))
        .collect();
    eprintln!("bench: throughput CPU s: {}", cpu.join(", "));
    let (mbps, bare_mbps) = (median(&mut ours), median(&mut base));
    let ratio = mbps / bare_mbps;
    let peak_rss = status_field(share.daemon, "VmHWM");

    eprintln!("bench: latency, {KEYSTROKES} keystrokes each side");
    let mut lat_bare = bare.latency();
    let mut lat = share.latency();
    let (lat_med, lat_p99) = (median(&mut lat), percentile(&mut lat, 0.99));
    let (bare_med, bare_p99) = (median(&mut lat_bare), percentile(&mut lat_bare, 0.99));
    let added = lat_med - bare_med;
    drop(bare);

    eprintln!("bench: idle, {} s", IDLE.as_secs());
    let (idle_pct, wakeups, idle_detail) = share.idle();
    eprintln!("bench: idle {idle_detail}");
    let peak_rss = peak_rss.max(status_field(share.daemon, "VmHWM"));
    share.end();
    drop(outer);

    eprintln!("bench: start-up, {STARTUPS} sessions");
    let mut st = startup(&relay, &scratch);
    eprintln!("bench: start-up ms {st:.0?}");
    let st_med = median(&mut st);
    let mut st_bare = startup_bare_ssh(&relay, &scratch);
    eprintln!("bench: start-up of a bare ssh ms {st_bare:.0?}");
    let st_bare_med = median(&mut st_bare);

    let musl = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/x86_64-unknown-linux-musl/release/linbit-tunl");
    let size = std::fs::metadata(&musl).map(|m| m.len()).unwrap_or(0);

    let rows = [
        Row {
            name: "throughput",
            value: format!("{mbps:.1} MB/s (ratio {ratio:.2})"),
            limit: format!("bare tmux -C {bare_mbps:.1} MB/s; target ratio >= 0.90"),
            ok: ratio >= 0.9,
        },
        Row {
            name: "latency",
            value: format!("median {lat_med:.2} ms, p99 {lat_p99:.2} ms (added {added:.2} ms)"),
            limit: format!("bare median {bare_med:.2} ms, p99 {bare_p99:.2} ms; target added < 1 ms"),
            ok: added < 1.0,
        },
        Row {
            name: "idle cost",
            value: format!("{idle_pct:.3}% of a core, {wakeups:.0} wake-ups/min"),
            limit: "target < 0.1% of a core, no busy loop".into(),
            ok: idle_pct < 0.1,
        },
        Row {
            name: "peak RSS",
            value: format!("{peak_rss} KiB"),
            limit: "target < 8192 KiB".into(),
            ok: peak_rss > 0 && peak_rss < 8192,
        },
        Row {
            name: "binary size",
            value: if size > 0 { format!("{size} bytes") } else { "not built".into() },
            limit: "target < 4194304 bytes".into(),
            ok: size > 0 && size < 4 << 20,
        },
        Row {
            name: "start-up",
            value: format!("median {st_med:.0} ms of {STARTUPS}"),
            limit: format!("bare ssh to the same relay {st_bare_med:.0} ms; target < 150 ms"),
            ok: st_med < 150.0,
        },
    ];
    println!();
    println!("| figure | value | limit / target | |");
    println!("|---|---|---|---|");
    for r in &rows {
        println!("| {} | {} | {} | {} |", r.name, r.value, r.limit, if r.ok { "ok" } else { "MISS" });
    }
    println!();
    let figures: [(&str, String); 14] = [
        ("throughput_ratio", fmt2(ratio)),
        ("throughput_mbps", format!("{mbps:.1}")),
        ("bare_mbps", format!("{bare_mbps:.1}")),
        ("latency_added_median_ms", fmt2(added)),
        ("latency_p99_ms", fmt2(lat_p99)),
        ("bare_median_ms", fmt2(bare_med)),
        ("idle_cpu_pct", format!("{idle_pct:.3}")),
        ("idle_wakeups_per_min", format!("{wakeups:.0}")),
        ("peak_rss_kib", peak_rss.to_string()),
        ("binary_bytes", size.to_string()),
        ("startup_median_ms", format!("{st_med:.0}")),
        ("latency_median_ms", fmt2(lat_med)),
        ("bare_p99_ms", fmt2(bare_p99)),
        ("startup_bare_ssh_median_ms", format!("{st_bare_med:.0}")),
    ];
    let get = |k: &str| figures.iter().find(|(n, _)| *n == k).map(|(_, v)| v.as_str()).unwrap();
    let lines: [&[&str]; 6] = [
        &["throughput_ratio", "throughput_mbps", "bare_mbps"],
        &["latency_added_median_ms", "latency_p99_ms", "bare_median_ms"],
        &["idle_cpu_pct", "idle_wakeups_per_min"],
        &["peak_rss_kib"],
        &["binary_bytes"],
        &["startup_median_ms", "startup_bare_ssh_median_ms"],
    ];
    for keys in lines {
        let kv: Vec<String> = keys.iter().map(|k| format!("{k}={}", get(k))).collect();
        println!("BENCH {}", kv.join(" "));
    }

    // Hand-written JSON: every figure is a plain number.
    let mut json = String::from("{\n");
    for (i, (k, v)) in figures.iter().enumerate() {
        let comma = if i + 1 < figures.len() { "," } else { "" };
        json.push_str(&format!("  \"{k}\": {v}{comma}\n"));
    }
    json.push_str("}\n");
    let out = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench.json");
    std::fs::write(&out, json).unwrap();
    println!("bench: wrote {}", out.display());

    drop(relay);
    drop(scratch);
    let left = processes_mentioning("tunl-bench-");
    if !left.is_empty() {
        eprintln!("bench: processes left behind: {left:?}");
    }
}
