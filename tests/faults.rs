//! Link faults, in network namespaces (issue 13). The product relay (`tunl-relay init --root` on a
//! temp prefix, its own sshd and API: `tunl_relay::harness`) runs in a network namespace of its own;
//! the real client runs, in a terminal (an outer tmux), in a second namespace; a veth pair is the
//! only link between them (10.231.0.1 <-> 10.231.0.2, no address outside the two namespaces and
//! their loopbacks). Support engineers log in to the relay from inside the relay's namespace, so
//! only the customer's link sees the faults:
//!
//! - 300 ms of latency and 5 % loss: the session stays usable, keystrokes arrive once and in order;
//! - a black hole for 60 s, then the link restored;
//! - the relay's sshd restarted, and every relay process killed at once (a "reboot");
//! - a stall in the middle of a 10 MB burst: the daemon's memory stays bounded.
//!
//! Loss and black holes are nftables rules in the relay's namespace (`numgen random` for loss).
//! `tc netem` is used for latency where the kernel has it; where it does not (CONFIG_NET_SCH_NETEM
//! unset, as on the CI machines), a delay line stands in: a TCP forwarder in the relay's namespace
//! that holds every chunk for half the round trip in each direction (see README, "Link faults").
//! Every test skips itself with one line saying why where namespaces cannot be made (not root, no
//! `ip`, no `nft`). Everything (namespaces, veths, processes, files) goes on drop, also on failure.

mod common;

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::mpsc::{self, Receiver};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{BIN, Scratch, poll_until, processes_mentioning, secs, session_dir, sh_quote, wait_no_processes, which};
use relay_double::{SupportKey, TargetSshd, b64, support_login, unb64};
use tunl_relay::harness::{Relay, SupportUser};

const CLIENT_IP: &str = "10.231.0.1";
const RELAY_IP: &str = "10.231.0.2";

// ---- the two namespaces ------------------------------------------------------------------------

#[derive(Clone, Copy)]
enum Side {
    Client,
    Relay,
}

/// Two network namespaces joined by a veth pair; removed (with the veth) on drop.
struct Netns {
    names: [String; 2],
    /// The relay's end of the veth (where the fault rules apply).
    veth_relay: String,
    fds: Vec<File>,
}

fn run(args: &[&str]) -> Result<(), String> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("{}: {e}", args[0]))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("{}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim()))
    }
}

impl Netns {
    /// The namespaces, or why they cannot be made here (the caller skips with that line).
    fn make() -> Result<Netns, String> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return Err("not root: network namespaces need CAP_SYS_ADMIN".into());
        }
        if which("ip").is_none() {
            return Err("no `ip` (iproute2): run `just setup`".into());
        }
        if which("nft").is_none() {
            return Err("no `nft` (nftables): run `just setup`".into());
        }
        static N: AtomicU32 = AtomicU32::new(0);
        let tag = format!("{}x{}", std::process::id() % 1_000_000, N.fetch_add(1, Ordering::Relaxed));
        let (c, r) = (format!("tfc{tag}"), format!("tfr{tag}"));
        let mut ns = Netns { names: [String::new(), String::new()], veth_relay: r.clone(), fds: Vec::new() };
        run(&["ip", "netns", "add", &c]).map_err(|e| format!("cannot make a network namespace: {e}"))?;
        ns.names[0] = c.clone();
        run(&["ip", "netns", "add", &r])?;
        ns.names[1] = r.clone();
        // Born inside the namespaces: no end of the pair is ever in the host's.
        run(&["ip", "link", "add", &c, "netns", &c, "type", "veth", "peer", "name", &r, "netns", &r])?;
        run(&["ip", "-n", &c, "addr", "add", &format!("{CLIENT_IP}/30"), "dev", &c])?;
        run(&["ip", "-n", &r, "addr", "add", &format!("{RELAY_IP}/30"), "dev", &r])?;
        for (n, dev) in [(&c, &c), (&r, &r), (&c, &"lo".to_string()), (&r, &"lo".to_string())] {
            run(&["ip", "-n", n, "link", "set", dev, "up"])?;
        }
        for n in [&c, &r] {
            ns.fds.push(File::open(format!("/run/netns/{n}")).map_err(|e| format!("/run/netns/{n}: {e}"))?);
        }
        Ok(ns)
    }

    fn fd(&self, side: Side) -> RawFd {
        self.fds[side as usize].as_raw_fd()
    }

    fn name(&self, side: Side) -> &str {
        &self.names[side as usize]
    }

    /// Runs `f` on a thread inside `side`'s namespace: the sockets it makes and the processes it
    /// starts live there.
    fn run<T: Send>(&self, side: Side, f: impl FnOnce() -> T + Send) -> T {
        let fd = self.fd(side);
        std::thread::scope(|s| {
            let h = s.spawn(move || {
                // SAFETY: setns on an open namespace file; it changes only this thread.
                assert_eq!(
                    unsafe { libc::setns(fd, libc::CLONE_NEWNET) },
                    0,
                    "setns: {}",
                    std::io::Error::last_os_error()
                );
                f()
            });
            match h.join() {
                Ok(v) => v,
                Err(e) => std::panic::resume_unwind(e),
            }
        })
    }

    /// A command that runs inside `side`'s namespace.
    fn command(&self, side: Side, program: &str) -> Command {
        let fd = self.fd(side);
        let mut c = Command::new(program);
        // SAFETY: setns is async-signal-safe; the fd stays open until exec (then closes on exec).
        unsafe {
            c.pre_exec(move || {
                if libc::setns(fd, libc::CLONE_NEWNET) == 0 { Ok(()) } else { Err(std::io::Error::last_os_error()) }
            });
        }
        c
    }

    fn nft(&self, script: &str) {
        let mut c = self.command(Side::Relay, "nft");
        let mut child = c.args(["-f", "-"]).stdin(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("nft");
        child.stdin.take().unwrap().write_all(script.as_bytes()).unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "nft: {}\n{script}", String::from_utf8_lossy(&out.stderr));
    }

    /// Every packet over the veth dropped, both ways, until `heal`.
    fn black_hole(&self) {
        let v = &self.veth_relay;
        self.nft(&format!(
            "table inet fault {{\n chain in {{ type filter hook input priority 0; iifname \"{v}\" drop; }}\n \
             chain out {{ type filter hook output priority 0; oifname \"{v}\" drop; }}\n}}\n"
        ));
    }

    /// `percent` % of the packets dropped at random, each way.
    fn loss(&self, percent: u32) {
        let v = &self.veth_relay;
        self.nft(&format!(
            "table inet fault {{\n chain in {{ type filter hook input priority 0; iifname \"{v}\" numgen random mod 100 < {percent} drop; }}\n \
             chain out {{ type filter hook output priority 0; oifname \"{v}\" numgen random mod 100 < {percent} drop; }}\n}}\n"
        ));
    }

    fn heal(&self) {
        self.nft("delete table inet fault\n");
    }

    /// `tc netem delay` on both ends (half the round trip each), where the kernel has netem.
    fn netem(&self, rtt_ms: u32) -> bool {
        let half = format!("{}ms", rtt_ms / 2);
        [Side::Client, Side::Relay].iter().all(|&s| {
            let dev = self.name(s).to_string();
            self.command(s, "tc")
                .args(["qdisc", "add", "dev", &dev, "root", "netem", "delay", &half])
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|st| st.success())
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Deleting a namespace destroys the veth end inside it, and with it the pair.
        for n in self.names.iter().filter(|n| !n.is_empty()) {
            let _ = run(&["ip", "netns", "del", n]);
        }
    }
}

/// The namespaces, or None after one line saying why this test cannot run here.
fn netns_or_skip(test: &str) -> Option<Netns> {
    match Netns::make() {
        Ok(ns) => Some(ns),
        Err(why) => {
            eprintln!("{test}: skipped: {why}");
            None
        }
    }
}

// ---- the relay in its namespace ----------------------------------------------------------------

/// The product relay inside the relay's namespace, listening on every address there (the veth's
/// and loopback, where the engineers log in), its host certificate and TLS certificate also naming
/// the veth address.
fn relay_in(ns: &Netns) -> Relay {
    ns.run(Side::Relay, || Relay::start_with(&["--listen", "0.0.0.0", "--host-name", RELAY_IP])).expect("the relay")
}

/// What the client needs, pointed at the relay's veth address (or at `ports` in front of it).
fn client_env(relay: &Relay, ports: Option<(u16, u16)>) -> Vec<(String, String)> {
    let (ssh, api) = ports.unwrap_or((relay.port(), relay.cfg.api_port));
    let mut env = relay.env();
    for (k, v) in env.iter_mut() {
        match k.as_str() {
            "TUNL_RELAY" => *v = RELAY_IP.into(),
            "TUNL_RELAY_PORT" => *v = ssh.to_string(),
            "TUNL_API" => *v = format!("https://{RELAY_IP}:{api}"),
            _ => {}
        }
    }
    env
}

fn serve_log(relay: &Relay) -> String {
    std::fs::read_to_string(relay.layout.root.join("serve.log")).unwrap_or_default()
}

fn audit(relay: &Relay, id: &str) -> String {
    std::fs::read_to_string(relay.layout.audit().join(format!("{id}.jsonl"))).unwrap_or_default()
}

fn count(hay: &str, needle: &str) -> usize {
    hay.matches(needle).count()
}

/// The customer's links that came up (`link-up` in the session's audit), and how many were resumes.
fn links_up(relay: &Relay, id: &str) -> (usize, usize) {
    let a = audit(relay, id);
    let ups: Vec<&str> = a.lines().filter(|l| l.contains("\"ev\":\"link-up\"")).collect();
    (ups.len(), ups.iter().filter(|l| l.contains("\"resume\":true")).count())
}

/// A `serve` started again after an outage (the harness's own child is gone then); ended on drop,
/// before the relay's prefix and accounts are removed.
struct Serve(Child);

impl Serve {
    fn start(ns: &Netns, relay: &Relay) -> Serve {
        let log =
            std::fs::OpenOptions::new().append(true).create(true).open(relay.layout.root.join("serve.log")).unwrap();
        let child = ns
            .command(Side::Relay, &tunl_relay::harness::binary().unwrap().display().to_string())
            .arg("serve")
            .arg("--root")
            .arg(&relay.layout.root)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("serve");
        let (p, a) = (relay.port(), relay.cfg.api_port);
        let up = ns.run(Side::Relay, || {
            poll_until(secs(30), || {
                [p, a].iter().all(|&port| {
                    TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_millis(200)).is_ok()
                })
            })
        });
        assert!(up, "serve did not come back:\n{}", serve_log(relay));
        Serve(child)
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        // SAFETY: kill(2) on our own child, not reaped yet.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        if !poll_until(secs(20), || matches!(self.0.try_wait(), Ok(Some(_)))) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// Every process under `root` (children, their children...), by parent pid.
fn descendants(root: i32) -> Vec<i32> {
    let mut table = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else { continue };
        if let Some(ppid) =
            std::fs::read_to_string(e.path().join("stat")).ok().as_deref().and_then(tunl_relay::serve::ppid_from_stat)
        {
            table.push((pid, ppid));
        }
    }
    let mut out = Vec::new();
    let mut frontier = vec![root];
    while let Some(p) = frontier.pop() {
        for &(pid, ppid) in &table {
            if ppid == p && !out.contains(&pid) {
                out.push(pid);
                frontier.push(pid);
            }
        }
    }
    out
}

/// The pid of this relay's `tunl-relay serve`.
fn serve_pid(relay: &Relay) -> i32 {
    let needle = format!("serve --root {}", relay.layout.root.display());
    let p = processes_mentioning(&needle);
    p.iter()
        .filter(|l| !l.contains("cargo"))
        .find_map(|l| l.split(':').next()?.parse().ok())
        .unwrap_or_else(|| panic!("no `{needle}` running: {p:?}"))
}

// ---- the engineer, inside the relay's namespace -----------------------------------------------

fn support(ns: &Netns, relay: &Relay, who: &SupportUser, command: &str) -> Vec<String> {
    let o = ns
        .command(Side::Relay, "ssh")
        .args(relay.support_ssh_args(who))
        .arg("--")
        .arg(command)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(o.status.success(), "{command}: {}\n{}", String::from_utf8_lossy(&o.stderr), serve_log(relay));
    String::from_utf8_lossy(&o.stdout).lines().map(str::to_string).collect()
}

/// `tunl-support/1 join` over the engineer's ssh: the session's lines, `O` payloads decoded.
struct Join {
    child: Child,
    stdin: ChildStdin,
    rx: Receiver<String>,
    output: Arc<Mutex<Vec<u8>>>,
    /// The screen of the last `SNAP`, decoded.
    snap: Arc<Mutex<Vec<u8>>>,
    seen: Vec<String>,
}

impl Join {
    fn start(ns: &Netns, relay: &Relay, who: &SupportUser, id: &str, ro: bool) -> Join {
        let mut child = ns
            .command(Side::Relay, "ssh")
            .args(relay.support_ssh_args(who))
            .arg("--")
            .arg(format!("tunl-support/1 join id={id} ro={}", u8::from(ro)))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let out = child.stdout.take().unwrap();
        let stdin = child.stdin.take().unwrap();
        let output = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = mpsc::channel();
        let snap = Arc::new(Mutex::new(Vec::new()));
        let (sink, snap_sink) = (output.clone(), snap.clone());
        std::thread::spawn(move || {
            for l in BufReader::new(out).lines() {
                let Ok(l) = l else { break };
                if let Some(b) = l.strip_prefix("O ").and_then(unb64) {
                    sink.lock().unwrap().extend_from_slice(&b);
                }
                if let Some(b) = l.strip_prefix("SNAP ").and_then(|r| r.split(' ').next_back()).and_then(unb64) {
                    *snap_sink.lock().unwrap() = b;
                }
                // The payload lines (O, SNAP) are kept only decoded.
                if !l.starts_with("O ") && tx.send(l).is_err() {
                    break;
                }
            }
        });
        Join { child, stdin, rx, output, snap, seen: Vec::new() }
    }

    fn send(&mut self, l: &str) {
        self.stdin.write_all(format!("{l}\n").as_bytes()).unwrap();
        self.stdin.flush().unwrap();
    }

    fn keys(&mut self, bytes: &[u8]) {
        self.send(&format!("K {}", b64(bytes)));
    }

    fn wait_line(&mut self, deadline: Instant, pred: impl Fn(&str) -> bool) -> Option<String> {
        loop {
            let l = self.rx.recv_timeout(deadline.saturating_duration_since(Instant::now())).ok()?;
            self.seen.push(l.clone());
            if pred(&l) {
                return Some(l);
            }
        }
    }

    fn output_has(&self, needle: &[u8]) -> bool {
        self.output.lock().unwrap().windows(needle.len()).any(|w| w == needle)
    }

    /// Support sees `needle`: in the output, or on the last resynchronising screen.
    fn sees(&self, needle: &[u8]) -> bool {
        self.output_has(needle) || self.snap.lock().unwrap().windows(needle.len()).any(|w| w == needle)
    }

    fn output_len(&self) -> usize {
        self.output.lock().unwrap().len()
    }

    fn wait_output(&self, deadline: Instant, needle: &[u8]) -> bool {
        poll_until(deadline, || self.output_has(needle))
    }

    fn diag(&self) -> String {
        let tail: Vec<&String> = self.seen.iter().rev().take(20).collect();
        format!("join (last lines, newest first): {tail:?}")
    }
}

impl Drop for Join {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---- the customer, inside the client's namespace -----------------------------------------------

/// The real client in a 160x48 terminal (an outer tmux started in the client's namespace, so the
/// client and everything it starts are there too), a plain `sh` as the shell.
struct Customer {
    id: String,
    scratch: Scratch,
    outer: PathBuf,
}

impl Customer {
    fn start(ns: &Netns, env: &[(String, String)], id: &str, args: &[&str]) -> Customer {
        let scratch = Scratch::new("faults-cust");
        let s = scratch.path().to_path_buf();
        let outer = s.join("outer.sock");
        std::fs::write(s.join("outer.conf"), "set-option -g remain-on-exit on\nset-option -g history-limit 5000\n")
            .unwrap();
        let mut words = vec![BIN.to_string()];
        words.extend(args.iter().map(|a| a.to_string()));
        words.push(id.to_string());
        let words: Vec<String> = words.iter().map(|w| sh_quote(w)).collect();
        let script = format!("{}; echo EXIT=$? > {}/status", words.join(" "), s.display());
        let mut c = ns.command(Side::Client, "tmux");
        c.arg("-S").arg(&outer).arg("-f").arg(s.join("outer.conf"));
        c.args(["new-session", "-d", "-s", "cust", "-x", "160", "-y", "48", "sh", "-c", &script]);
        c.env_clear().env("PATH", std::env::var("PATH").unwrap_or_else(|_| "/usr/bin:/bin".into()));
        c.envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        c.env("USER", "root").env("HOME", &s).env("TERM", "xterm-256color").env("LANG", "C.UTF-8");
        c.env("TUNL_RECORDING_DIR", &s).env("TUNL_STATE_DIR", s.join("state"));
        c.env("SHELL", "/bin/sh").env("PS1", "$ ");
        if !env.iter().any(|(k, _)| k == "TUNL_AUTHKEYS_FILE") {
            c.env("TUNL_AUTHKEYS_FILE", s.join("authorized_keys"));
        }
        c.current_dir(&s).stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null());
        assert!(c.status().unwrap().success(), "the outer tmux did not start");
        Customer { id: id.into(), scratch, outer }
    }

    fn tmux(&self) -> Command {
        let mut c = Command::new("tmux");
        c.arg("-S").arg(&self.outer).stdin(Stdio::null());
        c
    }

    fn keys(&self, keys: &[&str]) {
        assert!(self.tmux().args(["send-keys", "-t", "cust:0.0"]).args(keys).status().unwrap().success());
    }

    fn type_line(&self, text: &str) {
        assert!(self.tmux().args(["send-keys", "-t", "cust:0.0", "-l", "--", text]).status().unwrap().success());
        self.keys(&["Enter"]);
    }

    fn screen(&self) -> String {
        let o = self.tmux().args(["capture-pane", "-p", "-t", "cust:0.0"]).output().unwrap();
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    fn wait_screen(&self, deadline: Instant, pred: impl Fn(&str) -> bool) -> bool {
        poll_until(deadline, || pred(&self.screen()))
    }

    fn status(&self) -> Option<i32> {
        let s = std::fs::read_to_string(self.scratch.path().join("status")).ok()?;
        s.trim().strip_prefix("EXIT=")?.parse().ok()
    }

    fn daemon_pid(&self) -> Option<i32> {
        std::fs::read_to_string(session_dir(&self.id).join("daemon.pid")).ok()?.trim().parse().ok()
    }

    fn diag(&self) -> String {
        let d = session_dir(&self.id);
        format!(
            "screen:\n{}\nstatus: {:?}\ndebug.log:\n{}\nssh.log:\n{}",
            self.screen(),
            self.status(),
            std::fs::read_to_string(d.join("debug.log")).unwrap_or_default(),
            std::fs::read_to_string(d.join("ssh.log")).unwrap_or_default()
        )
    }
}

impl Drop for Customer {
    fn drop(&mut self) {
        let _ = self.tmux().arg("kill-server").stderr(Stdio::null()).status();
        let dir = session_dir(&self.id);
        let _ =
            Command::new("tmux").arg("-S").arg(dir.join("tmux.sock")).arg("kill-server").stderr(Stdio::null()).status();
        // The daemon's orderly end first; whatever of the session still runs after that is killed by pid.
        let mut left = wait_no_processes(&dir.display().to_string(), secs(10));
        left.extend(processes_mentioning(&self.id));
        for p in left {
            if let Some(pid) = p.split(':').next() {
                let _ = Command::new("kill").args(["-KILL", pid]).stderr(Stdio::null()).status();
            }
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}

/// A session at the relay, the client started for it in its namespace and its link up.
fn connect(ns: &Netns, relay: &Relay, env: &[(String, String)], extra: &[&str]) -> (Customer, String) {
    let (id, token) = relay.create_session("FAULTS", false);
    let mut args = vec!["--token", token.as_str()];
    args.extend_from_slice(extra);
    let c = Customer::start(ns, env, &id, &args);
    let up = poll_until(secs(90), || links_up(relay, &id).0 >= 1);
    assert!(up, "the client never came up at the relay:\n{}\n{}", c.diag(), serve_log(relay));
    assert!(c.wait_screen(secs(30), |s| s.contains("[SHELL]")), "{}", c.diag());
    (c, id)
}

/// Makes the customer's shell a keystroke recorder (raw, no echo: every byte it reads goes to
/// `log`) and waits until it runs.
fn record_keystrokes(join: &mut Join, log: &std::path::Path) {
    join.keys(format!("exec sh -c 'stty raw -echo; echo REC-$((1+1)); exec cat > {}'\r", log.display()).as_bytes());
    assert!(join.wait_output(secs(60), b"REC-2"), "the recorder did not start\n{}", join.diag());
}

/// The signing API was asked once, and never refused: the token was used exactly once.
fn assert_one_token_use(relay: &Relay, id: &str) {
    let log = serve_log(relay);
    let signed = log.lines().filter(|l| l.contains(" info signed id=") && l.contains(id)).count();
    assert_eq!(signed, 1, "signing requests for {id}:\n{log}");
    assert!(!log.contains("sign-refused"), "a signing request was refused:\n{log}");
    assert!(!log.lines().any(|l| l.contains("ki-accepted") && l.contains(id)), "a keyboard-interactive login:\n{log}");
}

// ---- a delay line (latency where the kernel has no netem) --------------------------------------

/// TCP forwarders in the relay's namespace, one per port, that hold every chunk for `one_way` before
/// passing it on, in each direction (so `2 * one_way` is added to every round trip). Ends its
/// threads and connections on drop.
struct DelayLine {
    ports: Vec<u16>,
    stop: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<TcpStream>>>,
}

impl DelayLine {
    fn start(ns: &Netns, upstream: &[u16], one_way: Duration) -> DelayLine {
        let stop = Arc::new(AtomicBool::new(false));
        let conns: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let ports = ns.run(Side::Relay, || {
            let mut ports = Vec::new();
            for &up in upstream {
                let l = TcpListener::bind("0.0.0.0:0").unwrap();
                l.set_nonblocking(true).unwrap();
                ports.push(l.local_addr().unwrap().port());
                let (stop, conns) = (stop.clone(), conns.clone());
                // Threads inherit the namespace of the thread that makes them.
                std::thread::spawn(move || {
                    while !stop.load(Ordering::SeqCst) {
                        match l.accept() {
                            Ok((down, _)) => {
                                let _ = down.set_nonblocking(false);
                                let Ok(upc) = TcpStream::connect(("127.0.0.1", up)) else { continue };
                                let _ = (down.set_nodelay(true), upc.set_nodelay(true));
                                {
                                    let mut c = conns.lock().unwrap();
                                    c.push(down.try_clone().unwrap());
                                    c.push(upc.try_clone().unwrap());
                                }
                                pump(down.try_clone().unwrap(), upc.try_clone().unwrap(), one_way);
                                pump(upc, down, one_way);
                            }
                            Err(_) => std::thread::sleep(Duration::from_millis(20)),
                        }
                    }
                });
            }
            ports
        });
        DelayLine { ports, stop, conns }
    }
}

/// `from` -> `to`, every chunk delivered `delay` after it was read, in order.
fn pump(mut from: TcpStream, mut to: TcpStream, delay: Duration) {
    let (tx, rx) = mpsc::channel::<(Instant, Vec<u8>)>();
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 16384];
        loop {
            match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if tx.send((Instant::now() + delay, buf[..n].to_vec())).is_err() {
                        break;
                    }
                }
            }
        }
    });
    std::thread::spawn(move || {
        while let Ok((at, chunk)) = rx.recv() {
            if let Some(wait) = at.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
            if to.write_all(&chunk).is_err() {
                break;
            }
        }
        let _ = to.shutdown(std::net::Shutdown::Write);
    });
}

impl Drop for DelayLine {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for c in self.conns.lock().unwrap().drain(..) {
            let _ = c.shutdown(std::net::Shutdown::Both);
        }
    }
}

// ---- the cases -----------------------------------------------------------------------------------

#[test]
fn latency_300_ms_and_5_percent_loss_keep_the_session_usable() {
    let Some(ns) = netns_or_skip("latency_300_ms_and_5_percent_loss_keep_the_session_usable") else { return };
    let mut relay = relay_in(&ns);
    let eng = relay.add_support_user().unwrap();
    let netem = ns.netem(300);
    let delay = if netem {
        None
    } else {
        Some(DelayLine::start(&ns, &[relay.port(), relay.cfg.api_port], Duration::from_millis(150)))
    };
    ns.loss(5);
    let env = client_env(&relay, delay.as_ref().map(|d| (d.ports[0], d.ports[1])));
    let t0 = Instant::now();
    let (c, id) = connect(&ns, &relay, &env, &[]);
    let connect_s = t0.elapsed().as_secs_f64();
    let mut join = Join::start(&ns, &relay, &eng, &id, false);
    join.wait_line(secs(60), |l| l.starts_with("STATE")).unwrap_or_else(|| panic!("{}\n{}", join.diag(), c.diag()));

    // A round trip: support types, the customer's shell runs it, its output comes back.
    let mut rtts = Vec::new();
    for i in 0..5 {
        let t = Instant::now();
        join.keys(format!("echo RT-{i}-$((6*7))\r").as_bytes());
        assert!(join.wait_output(secs(60), format!("RT-{i}-42").as_bytes()), "{}\n{}", join.diag(), c.diag());
        rtts.push(t.elapsed().as_millis());
    }
    assert!(c.wait_screen(secs(30), |s| s.contains("RT-4-42")), "{}", c.diag());

    // Keystrokes at a typist's pace: each arrives once, in order.
    let log = c.scratch.path().join("keys.log");
    record_keystrokes(&mut join, &log);
    let mut sent = Vec::new();
    let t = Instant::now();
    for n in 0..200 {
        let k = format!("k{n:04} ");
        join.keys(k.as_bytes());
        sent.extend_from_slice(k.as_bytes());
        std::thread::sleep(Duration::from_millis(20));
    }
    let all = poll_until(secs(120), || std::fs::read(&log).is_ok_and(|g| g.len() >= sent.len()));
    let keys_s = t.elapsed().as_secs_f64();
    let got = std::fs::read(&log).unwrap_or_default();
    assert!(
        all && got == sent,
        "keystrokes: sent {:?}\ngot {:?}\n{}",
        String::from_utf8_lossy(&sent),
        String::from_utf8_lossy(&got),
        c.diag()
    );
    eprintln!(
        "faults: latency {} ms RTT ({}) + 5 % loss each way: connected in {connect_s:.1} s; echo round trips {rtts:?} ms; \
         200 keystroke lines sent 20 ms apart all arrived once and in order after {keys_s:.1} s",
        300,
        if netem { "tc netem" } else { "delay line" }
    );
    let _ = support(&ns, &relay, &eng, &format!("tunl-support/1 close id={id} reason=done"));
    assert!(poll_until(secs(60), || c.status().is_some()), "{}", c.diag());
    assert_eq!(c.status(), Some(0), "{}", c.diag());
    assert_one_token_use(&relay, &id);
}

/// What takes the relay away in [`outage`].
#[derive(Clone, Copy, Debug)]
enum Outage {
    /// Every packet dropped for 60 s, both ways.
    BlackHole,
    /// The relay's sshd ends (SIGTERM: `serve` then ends every session process) and starts again.
    SshdRestart,
    /// Every relay process stopped at once and killed (SIGSTOP, then SIGKILL), then started again.
    Reboot,
}

/// A session with an active tunnel through `outage`: the client notices within 45 s, shows
/// `reconnecting`, comes back within the back-off with `resume=1` and without a second token use,
/// and re-opens the tunnel (a login through it works again).
fn outage(test: &str, kind: Outage) {
    let Some(ns) = netns_or_skip(test) else { return };
    let mut relay = relay_in(&ns);
    let eng = relay.add_support_user().unwrap();
    let scratch = Scratch::new("faults-tunnel");
    let ak = scratch.path().join("authorized_keys");
    std::fs::write(&ak, "").unwrap();
    let target = ns.run(Side::Client, || TargetSshd::start(&ak)).expect("target sshd");
    let key = SupportKey::generate(scratch.path()).unwrap();
    let mut env = client_env(&relay, None);
    env.push(("TUNL_AUTHKEYS_FILE".into(), ak.display().to_string()));
    let tgt = format!("127.0.0.1:{}", target.port);
    let (c, id) = connect(&ns, &relay, &env, &["--target", &tgt]);
    c.keys(&["C-b", "u"]);
    let mut join = Join::start(&ns, &relay, &eng, &id, true);
    join.wait_line(secs(60), |l| l.starts_with("STATE") && l.contains("tunnel=allowed"))
        .unwrap_or_else(|| panic!("{}\n{}", join.diag(), c.diag()));
    drop(join);
    let t = support(&ns, &relay, &eng, &format!("tunl-support/1 upgrade id={id} {}", b64(key.public_line.as_bytes())));
    let port: u16 = t[0]
        .split(' ')
        .find_map(|f| f.strip_prefix("port="))
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("{t:?}"));
    let login = |port: u16| {
        ns.run(Side::Relay, || support_login(port, &key, "root", "echo THROUGH-$((6*7))"))
            .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("THROUGH-42"))
    };
    assert!(login(port), "no login through the tunnel\n{}", target.log());
    let opens = |relay: &Relay| count(&audit(relay, &id), "\"ev\":\"tunnel-open\"");
    assert_eq!(opens(&relay), 1, "{}", audit(&relay, &id));

    let t0 = Instant::now();
    let mut restarted: Option<Serve> = None;
    match kind {
        Outage::BlackHole => ns.black_hole(),
        Outage::SshdRestart => {
            let pid: i32 = std::fs::read_to_string(relay.layout.sshd_pid()).unwrap().trim().parse().unwrap();
            // SAFETY: kill(2) on the relay's sshd listener, which this test's relay started.
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
        Outage::Reboot => {
            let serve = serve_pid(&relay);
            let mut all = descendants(serve);
            all.push(serve);
            // Stopped first, so none of them sees another go and tidies up: a power cut.
            for sig in [libc::SIGSTOP, libc::SIGKILL] {
                for &p in &all {
                    // SAFETY: kill(2) on the processes of this test's relay.
                    unsafe { libc::kill(p, sig) };
                }
            }
        }
    }
    let noticed = c.wait_screen(t0 + Duration::from_secs(75), |s| s.contains("reconnecting"));
    let notice_s = t0.elapsed().as_secs_f64();
    assert!(noticed, "{kind:?}: no `reconnecting` after 75 s\n{}", c.diag());
    assert!(notice_s <= 50.0, "{kind:?}: noticed only after {notice_s:.1} s (contract: 45 s)\n{}", c.diag());
    let restored = match kind {
        Outage::BlackHole => {
            // The scenario's own length: the link stays black for 60 s.
            std::thread::sleep((t0 + Duration::from_secs(60)).saturating_duration_since(Instant::now()));
            ns.heal();
            Instant::now()
        }
        Outage::SshdRestart | Outage::Reboot => {
            let old = serve_pid_gone(&relay);
            assert!(old, "{kind:?}: the old serve is still running");
            // A relay host takes a while to come back: long enough for the client's back-off to grow.
            std::thread::sleep((t0 + Duration::from_secs(20)).saturating_duration_since(Instant::now()));
            restarted = Some(Serve::start(&ns, &relay));
            Instant::now()
        }
    };
    let down_s = restored.duration_since(t0).as_secs_f64();
    let back = poll_until(restored + Duration::from_secs(60), || links_up(&relay, &id) == (2, 1));
    let back_s = restored.elapsed().as_secs_f64();
    assert!(
        back,
        "{kind:?}: not back with resume=1 60 s after the relay was:\n{}\n{}\n{}",
        audit(&relay, &id),
        c.diag(),
        serve_log(&relay)
    );
    // Back-off: 1 s doubling to 30 s, with jitter; ssh's connect and login on top.
    assert!(back_s <= 45.0, "{kind:?}: back only {back_s:.1} s after the relay was");
    assert!(c.wait_screen(secs(30), |s| !s.contains("reconnecting")), "{}", c.diag());
    // The tunnel is re-opened on a new port, and a login through it works.
    assert!(
        poll_until(secs(60), || opens(&relay) == 2),
        "{kind:?}: the tunnel was not re-opened:\n{}",
        audit(&relay, &id)
    );
    let list = support(&ns, &relay, &eng, "tunl-support/1 list");
    let port2: u16 = list
        .iter()
        .find(|l| l.contains(&id))
        .and_then(|l| l.split(' ').find_map(|f| f.strip_prefix("port=")))
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("{list:?}"));
    assert!(login(port2), "{kind:?}: no login through the re-opened tunnel (port {port2})\n{}", target.log());
    assert_one_token_use(&relay, &id);
    eprintln!(
        "faults: {kind:?}: `reconnecting` shown {notice_s:.1} s after the fault; relay back after {down_s:.1} s; \
         client back (resume=1, link-up in the audit) {back_s:.1} s later; tunnel re-opened (port {port} -> {port2}), \
         one token use"
    );

    let _ = support(&ns, &relay, &eng, &format!("tunl-support/1 close id={id} reason=done"));
    assert!(poll_until(secs(60), || c.status().is_some()), "{}", c.diag());
    assert_eq!(c.status(), Some(0), "{}", c.diag());
    assert!(std::fs::read_to_string(&ak).unwrap().trim().is_empty(), "the key is still installed");
    drop(c);
    drop(restarted);
}

/// True once no `serve` of this relay runs (the old one ended with its sshd, or was killed).
fn serve_pid_gone(relay: &Relay) -> bool {
    let needle = format!("serve --root {}", relay.layout.root.display());
    poll_until(secs(30), || {
        processes_mentioning(&needle).iter().all(|l| {
            // A zombie (killed, not yet reaped by the harness) is gone for this purpose.
            let pid = l.split(':').next().unwrap_or("");
            std::fs::read_to_string(format!("/proc/{pid}/stat")).map(|s| s.contains(") Z ")).unwrap_or(true)
        })
    })
}

#[test]
fn black_hole_for_60_s_then_restored() {
    outage("black_hole_for_60_s_then_restored", Outage::BlackHole);
}

#[test]
fn relay_sshd_restarted() {
    outage("relay_sshd_restarted", Outage::SshdRestart);
}

#[test]
fn relay_rebooted_every_process_killed() {
    outage("relay_rebooted_every_process_killed", Outage::Reboot);
}

fn rss_kb(pid: i32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines().find_map(|l| l.strip_prefix("VmRSS:"))?.split_whitespace().next()?.parse().ok()
}

#[test]
fn a_stall_in_a_10_mb_burst_keeps_memory_bounded() {
    let Some(ns) = netns_or_skip("a_stall_in_a_10_mb_burst_keeps_memory_bounded") else { return };
    let mut relay = relay_in(&ns);
    let eng = relay.add_support_user().unwrap();
    let env = client_env(&relay, None);
    let (c, id) = connect(&ns, &relay, &env, &[]);
    let mut join = Join::start(&ns, &relay, &eng, &id, true);
    join.wait_line(secs(60), |l| l.starts_with("STATE")).unwrap_or_else(|| panic!("{}\n{}", join.diag(), c.diag()));
    let daemon = c.daemon_pid().unwrap_or_else(|| panic!("no daemon pid\n{}", c.diag()));
    let ssh_pid = || {
        processes_mentioning(&session_dir(&id).join("ssh-ctl.sock").display().to_string())
            .iter()
            .find(|l| l.contains("ControlMaster=yes"))
            .and_then(|l| l.split(':').next()?.parse::<i32>().ok())
    };
    let before = rss_kb(daemon).unwrap();
    let peak = Arc::new(Mutex::new((before, 0u64)));
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (peak, stop) = (peak.clone(), stop.clone());
        let ssh = ssh_pid();
        std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                let mut p = peak.lock().unwrap();
                p.0 = p.0.max(rss_kb(daemon).unwrap_or(0));
                p.1 = p.1.max(ssh.and_then(rss_kb).unwrap_or(0));
                drop(p);
                std::thread::sleep(Duration::from_millis(50));
            }
        })
    };

    // About 10 MB (seq 1..1300000 with the pty's \r\n); the link stalls once 2 MB have reached the relay.
    c.type_line("seq 1 1300000; echo BULK-$((40+2))-DONE");
    assert!(poll_until(secs(120), || join.output_len() > 2_000_000), "the burst never got going\n{}", c.diag());
    let at = join.output_len();
    ns.black_hole();
    let stalled = Instant::now();
    // 50 s of stall, past the 45 s after which the link counts as lost (a shorter one may or may
    // not outlast the limit, depending on how fast the queue drains afterwards: this one always
    // does). The client must hold on without buffering the rest of the burst.
    let moved = poll_until(stalled + Duration::from_secs(50), || join.output_len() > at + 1_000_000);
    assert!(!moved, "output still flowed through the black hole");
    let during = *peak.lock().unwrap();
    let shown = c.wait_screen(secs(1), |s| s.contains("BULK-42-DONE"));
    ns.heal();
    // Afterwards the session is whole again: the client resumes, and the end of the burst reaches
    // support (as output or in the resynchronising SNAP); the customer's screen shows it.
    let healed = Instant::now();
    let done = c.wait_screen(secs(180), |s| s.contains("BULK-42-DONE"));
    let screen_s = healed.elapsed().as_secs_f64();
    let resumed = poll_until(secs(90), || links_up(&relay, &id).1 >= 1);
    let resumed_s = healed.elapsed().as_secs_f64();
    assert!(resumed, "the client did not come back with resume=1\n{}\n{}", audit(&relay, &id), c.diag());
    assert!(done, "the burst never ended on the customer's screen\n{}", c.diag());
    // Output printed while the link was down is not replayed: the SNAP after the resume shows it.
    let through = poll_until(secs(120), || join.sees(b"BULK-42-DONE"));
    let support_s = healed.elapsed().as_secs_f64();
    stop.store(true, Ordering::SeqCst);
    let _ = sampler.join();
    let (peak_daemon, peak_ssh) = *peak.lock().unwrap();
    eprintln!(
        "faults: stall: link black-holed after {:.1} MB of a 10 MB burst for 50 s (burst finished on the customer's screen \
         during the stall: {shown}); daemon RSS {before} kB before, peak {} kB during the stall, peak {peak_daemon} kB overall; \
         ssh master peak {peak_ssh} kB; after the link healed the customer's screen showed the end in {screen_s:.1} s, \
         the client was back (resume=1) after {resumed_s:.1} s, support had the end after {support_s:.1} s: {through}",
        at as f64 / 1e6,
        during.0,
    );
    assert!(through, "the end of the burst never reached support\n{}\n{}", join.diag(), c.diag());
    // Bounded: the daemon does not hold the burst (10 MB) while the link is stalled.
    assert!(peak_daemon < before + 8 * 1024, "the daemon's RSS grew from {before} kB to {peak_daemon} kB");
    let _ = support(&ns, &relay, &eng, &format!("tunl-support/1 close id={id} reason=done"));
    assert!(poll_until(secs(60), || c.status().is_some()), "{}", c.diag());
}
