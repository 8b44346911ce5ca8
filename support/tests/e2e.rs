//! The whole system, as a vendor runs it: the product relay (`tunl-relay init --root` on a temp
//! prefix, its own sshd, throwaway accounts), the real customer client in an outer tmux as the
//! customer's terminal, and `tunl` as two support engineers, each in an outer tmux of its own as
//! their terminal. A second real sshd (`TargetSshd`) is the customer's host that the tunnel reaches.
//! Needs root (accounts, sshd).

use relay_double::TargetSshd;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};
use tunl_relay::harness::{Relay, SupportUser};

const TUNL: &str = env!("CARGO_BIN_EXE_tunl");

fn secs(n: u64) -> Instant {
    Instant::now() + Duration::from_secs(n)
}

fn until(deadline: Instant, mut cond: impl FnMut() -> bool) -> bool {
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn shq(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// A scratch directory, removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(tag: &str) -> Scratch {
        let p = std::env::temp_dir().join(format!("tunl-e2e-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        Scratch(p)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if std::env::var_os("TUNL_E2E_KEEP").is_none() {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// A support engineer's workstation: a HOME with their public key, an ssh_config for the relay
/// (their key, the relay CA for its host key), and the environment `tunl` reads.
struct Engineer {
    name: String,
    home: PathBuf,
    env: Vec<(String, String)>,
}

impl Engineer {
    fn new(relay: &Relay, user: &SupportUser, dir: &Path) -> Engineer {
        let home = dir.join(&user.name);
        std::fs::create_dir_all(home.join(".ssh")).unwrap();
        std::fs::copy(user.key.with_extension("pub"), home.join(".ssh/id_ed25519.pub")).unwrap();
        let kh = home.join("relay_known_hosts");
        std::fs::write(&kh, format!("@cert-authority [127.0.0.1]:{} {}\n", relay.port(), relay.ca_pubkey())).unwrap();
        let cfg = home.join("ssh_config");
        std::fs::write(
            &cfg,
            format!(
                "Host *\n  IdentityFile {}\n  IdentitiesOnly yes\n  UserKnownHostsFile {}\n  GlobalKnownHostsFile /dev/null\n  StrictHostKeyChecking yes\n  BatchMode yes\n  ConnectTimeout 20\n",
                user.key.display(),
                kh.display()
            ),
        )
        .unwrap();
        let env = vec![
            ("PATH".into(), std::env::var("PATH").unwrap()),
            ("HOME".into(), home.display().to_string()),
            ("USER".into(), user.name.clone()),
            ("TERM".into(), "xterm-256color".into()),
            ("TUNL_RELAY".into(), "127.0.0.1".into()),
            ("TUNL_RELAY_PORT".into(), relay.port().to_string()),
            ("TUNL_SUPPORT_USER".into(), user.name.clone()),
            ("TUNL_SSH_CONFIG".into(), cfg.display().to_string()),
            ("XDG_RUNTIME_DIR".into(), home.display().to_string()),
        ];
        Engineer { name: user.name.clone(), home, env }
    }

    /// `tunl ARGS` run directly (no terminal).
    fn tunl(&self, args: &[&str]) -> Output {
        Command::new(TUNL).args(args).env_clear().envs(self.env.iter().cloned()).stdin(Stdio::null()).output().unwrap()
    }

    /// `env -i ... tunl ARGS` as one shell line for an outer tmux pane.
    fn shell_line(&self, args: &str) -> String {
        let mut sh = String::from("env -i");
        for (k, v) in &self.env {
            sh.push_str(&format!(" {k}={}", shq(v)));
        }
        sh.push_str(&format!(" {} {args}", shq(TUNL)));
        sh
    }
}

/// A terminal: an outer tmux server on a private socket running one shell command, read with
/// `capture-pane`, typed into with `send-keys`.
struct Term {
    sock: PathBuf,
}

impl Term {
    fn start(dir: &Path, name: &str, cols: u16, rows: u16, sh: &str) -> Term {
        let sock = dir.join(format!("{name}.sock"));
        let conf = dir.join("outer.conf");
        std::fs::write(&conf, "set -g status off\nset -g prefix None\nunbind-key C-b\nset -g escape-time 0\n").unwrap();
        let ok = Command::new("tmux")
            .arg("-S")
            .arg(&sock)
            .arg("-f")
            .arg(&conf)
            .args(["new-session", "-d", "-s", "t", "-x", &cols.to_string(), "-y", &rows.to_string(), sh])
            .env_remove("TMUX")
            .stdin(Stdio::null())
            .status()
            .unwrap()
            .success();
        assert!(ok, "outer tmux {name} did not start");
        Term { sock }
    }

    fn tmux(&self) -> Command {
        let mut c = Command::new("tmux");
        c.arg("-S").arg(&self.sock).env_remove("TMUX").stdin(Stdio::null());
        c
    }

    fn keys(&self, keys: &[&str]) {
        assert!(self.tmux().args(["send-keys", "-t", "t:"]).args(keys).status().unwrap().success());
    }

    fn text(&self, s: &str) {
        assert!(self.tmux().args(["send-keys", "-l", "-t", "t:", s]).status().unwrap().success());
    }

    fn screen(&self) -> String {
        let out = self.tmux().args(["capture-pane", "-p", "-t", "t:"]).output().unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn wait(&self, deadline: Instant, pred: impl Fn(&str) -> bool) -> bool {
        until(deadline, || pred(&self.screen()))
    }
}

impl Drop for Term {
    fn drop(&mut self) {
        let _ = self.tmux().arg("kill-server").stderr(Stdio::null()).status();
        let _ = std::fs::remove_file(&self.sock);
    }
}

/// An engineer's `tunl join` in a terminal of its own, bracketed by `stty -g` so the test can check
/// the terminal's settings come back, and its exit status kept.
struct Join {
    term: Term,
    dir: PathBuf,
    name: String,
}

impl Join {
    fn start(eng: &Engineer, dir: &Path, name: &str, args: &str) -> Join {
        // The engineer's terminal is larger than the customer's pane plus the chat.
        Join::start_sized(eng, dir, name, args, 160, 60)
    }

    fn start_sized(eng: &Engineer, dir: &Path, name: &str, args: &str, cols: u16, rows: u16) -> Join {
        let line = format!(
            "stty -g > {d}/{name}.before; {}; echo $? > {d}/{name}.rc; stty -g > {d}/{name}.after; sleep 600",
            eng.shell_line(&format!("join {args}")),
            d = dir.display()
        );
        let term = Term::start(dir, name, cols, rows, &line);
        Join { term, dir: dir.to_path_buf(), name: name.into() }
    }

    fn rc(&self) -> Option<i32> {
        std::fs::read_to_string(self.dir.join(format!("{}.rc", self.name))).ok().and_then(|s| s.trim().parse().ok())
    }

    fn stty_restored(&self) -> bool {
        let b = std::fs::read_to_string(self.dir.join(format!("{}.before", self.name))).unwrap_or_default();
        let a = std::fs::read_to_string(self.dir.join(format!("{}.after", self.name))).unwrap_or_default();
        !b.is_empty() && a == b
    }

    /// The pid of this join's launcher (`tunl join` whose terminal is this outer tmux).
    fn launcher_pid(&self) -> Option<i32> {
        let out = self.term.tmux().args(["list-panes", "-t", "t:", "-F", "#{pane_pid}"]).output().ok()?;
        let shell: i32 = String::from_utf8_lossy(&out.stdout).trim().parse().ok()?;
        // The pane's shell runs `env -i ... tunl join`: env execs tunl, a child of the shell.
        let children = std::fs::read_to_string(format!("/proc/{shell}/task/{shell}/children")).ok()?;
        children.split_whitespace().filter_map(|p| p.parse().ok()).find(|p: &i32| {
            std::fs::read(format!("/proc/{p}/cmdline")).is_ok_and(|c| String::from_utf8_lossy(&c).contains("join"))
        })
    }
}

/// A SOCKS5 CONNECT to 127.0.0.1:`port` through the proxy on `socks`; true when it succeeds.
fn socks_connect(socks: u16, port: u16) -> bool {
    use std::io::{Read, Write};
    let Ok(mut c) = std::net::TcpStream::connect(("127.0.0.1", socks)) else { return false };
    let _ = c.set_read_timeout(Some(Duration::from_secs(20)));
    let mut b = [0u8; 10];
    if c.write_all(&[5, 1, 0]).is_err() || c.read_exact(&mut b[..2]).is_err() || b[..2] != [5, 0] {
        return false;
    }
    let p = port.to_be_bytes();
    if c.write_all(&[5, 1, 0, 1, 127, 0, 0, 1, p[0], p[1]]).is_err() || c.read_exact(&mut b).is_err() {
        return false;
    }
    b[1] == 0
}

fn diag(what: &str, t: &Term) -> String {
    format!("{what} screen:\n{}", t.screen())
}

#[test]
fn engineer_and_customer_end_to_end() {
    let scratch = Scratch::new("main");
    let s = scratch.0.clone();
    let mut relay = Relay::start().expect("relay");
    let alice_user = relay.add_support_user().expect("support user");
    let bob_user = relay.add_support_user().expect("support user");
    let alice = Engineer::new(&relay, &alice_user, &s);
    let bob = Engineer::new(&relay, &bob_user, &s);
    let authkeys = s.join("customer_authorized_keys");
    std::fs::write(&authkeys, "").unwrap();
    let target = TargetSshd::start(&authkeys).expect("target sshd");

    // create-session: the ID, the token and the customer's command, ready for the ticket.
    let out = alice.tunl(&["create-session", "--case", "E2E-1", "--customer", "ACME"]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    let id = text.lines().find_map(|l| l.strip_prefix("Session:")).map(|s| s.trim().to_string()).expect(&text);
    let token =
        text.lines().find_map(|l| l.strip_prefix("Token:")).and_then(|s| s.split_whitespace().next()).expect(&text);
    assert!(text.contains(&format!("sudo ./linbit-tunl --token {token} --case E2E-1 {id}")), "{text}");
    let list = alice.tunl(&["list"]);
    let list_text = String::from_utf8_lossy(&list.stdout);
    assert!(
        list_text.lines().any(|l| l.starts_with(&id) && l.contains("pending") && l.contains("E2E-1")),
        "{list_text}"
    );

    // The customer: the real client in a terminal of theirs.
    let client = tunl_relay::harness::client_binary().expect("client binary");
    let mut cenv = relay.env();
    cenv.extend([
        ("PATH".to_string(), std::env::var("PATH").unwrap()),
        ("USER".into(), "root".into()),
        ("HOME".into(), s.display().to_string()),
        ("TERM".into(), "xterm-256color".into()),
        ("TUNL_AUTHKEYS_FILE".into(), authkeys.display().to_string()),
        ("TUNL_RECORDING_DIR".into(), s.display().to_string()),
    ]);
    let mut sh = String::from("env -i");
    for (k, v) in &cenv {
        sh.push_str(&format!(" {k}={}", shq(v)));
    }
    let cstatus = s.join("customer.rc");
    sh.push_str(&format!(
        " {} --token {token} --target 127.0.0.1:{} {id}; echo $? > {}; sleep 600",
        shq(&client.display().to_string()),
        target.port,
        shq(&cstatus.display().to_string())
    ));
    let cust = Term::start(&s, "customer", 100, 32, &sh);
    let exp = alice.tunl(&["expect", &id, "--timeout", "60"]);
    assert!(exp.status.success(), "expect: {}\n{}", String::from_utf8_lossy(&exp.stderr), diag("customer", &cust));
    assert!(cust.wait(secs(30), |sc| sc.contains("tunnel: ")), "{}", diag("customer", &cust));

    // The customer's shell prints; the engineer sees it.
    let a = Join::start(&alice, &s, "alice", &id);
    assert!(
        a.term.wait(secs(30), |sc| sc.contains("[CUSTOMER SHELL]") && sc.contains("typing: on")),
        "{}",
        diag("alice", &a.term)
    );
    cust.text("echo cust-$((40+2))-mark");
    cust.keys(&["Enter"]);
    assert!(a.term.wait(secs(20), |sc| sc.contains("cust-42-mark")), "{}", diag("alice", &a.term));

    // The engineer types; it runs in the customer's shell.
    a.term.text("echo eng-$((6*7))-mark");
    a.term.keys(&["Enter"]);
    assert!(
        cust.wait(secs(20), |sc| sc.contains("eng-42-mark")),
        "{}\n{}",
        diag("customer", &cust),
        diag("alice", &a.term)
    );

    // Chat both ways.
    a.term.keys(&["C-b", "c"]);
    a.term.text("hello from support");
    a.term.keys(&["Enter"]);
    assert!(cust.wait(secs(20), |sc| sc.contains("hello from support")), "{}", diag("customer", &cust));
    cust.keys(&["C-b", "c"]);
    cust.text("hi from the customer");
    cust.keys(&["Enter"]);
    assert!(a.term.wait(secs(20), |sc| sc.contains("customer> hi from the customer")), "{}", diag("alice", &a.term));
    cust.keys(&["C-b", "c"]);

    // A second engineer, read-only, cannot type; they are told why. SIGTERM ends their join with
    // their terminal restored.
    let b = Join::start(&bob, &s, "bob", &format!("--read-only {id}"));
    assert!(b.term.wait(secs(30), |sc| sc.contains("READ-ONLY")), "{}", diag("bob", &b.term));
    assert!(a.term.wait(secs(20), |sc| sc.contains(&format!("{} joined", bob.name))), "{}", diag("alice", &a.term));
    b.term.text("echo ro-$((3*3))-mark");
    b.term.keys(&["Enter"]);
    assert!(b.term.wait(secs(20), |sc| sc.contains("(not sent) read-only")), "{}", diag("bob", &b.term));
    // What alice types after bob's keys arrives; bob's never does.
    a.term.keys(&["C-b", "c"]);
    a.term.text("echo after-$((5*5))-mark");
    a.term.keys(&["Enter"]);
    assert!(cust.wait(secs(20), |sc| sc.contains("after-25-mark")), "{}", diag("customer", &cust));
    assert!(!cust.screen().contains("ro-9-mark"), "{}", diag("customer", &cust));
    let pid = b.launcher_pid().expect("bob's tunl join");
    // SAFETY: kill(2) on a process this test started.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    assert!(until(secs(20), || b.rc().is_some()), "{}", diag("bob", &b.term));
    assert_eq!(b.rc(), Some(143));
    assert!(until(secs(5), || b.stty_restored()), "bob's terminal settings were not restored");

    // Upgrade from the chat pane: the customer's popup, Grant, and `tunl ssh -- id` is the customer's user.
    a.term.keys(&["C-b", "c"]);
    a.term.text("/upgrade");
    a.term.keys(&["Enter"]);
    assert!(
        cust.wait(secs(20), |sc| sc.contains("Tunnel request") && sc.contains("Deny")),
        "{}",
        diag("customer", &cust)
    );
    // Grant has no key (issue 9, F1): choose it, then type the word.
    cust.keys(&["Up", "Enter"]);
    assert!(cust.wait(secs(10), |sc| sc.contains("Type GRANT")), "{}", diag("customer", &cust));
    cust.keys(&["G", "R", "A", "N", "T", "Enter"]);
    assert!(a.term.wait(secs(30), |sc| sc.contains("tunnel granted")), "{}", diag("alice", &a.term));
    let out = alice.tunl(&["ssh", &id, "--", "id", "-un"]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "root",
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        target.log()
    );
    assert!(out.status.success());
    let show = alice.tunl(&["show", &id]);
    assert!(
        String::from_utf8_lossy(&show.stdout).contains("Tunnel:      open"),
        "{}",
        String::from_utf8_lossy(&show.stdout)
    );

    // The proxied browser: a SOCKS proxy through the tunnel reaches the customer's loopback, the
    // browser gets a profile that uses it, --kill ends both.
    let browser_log = s.join("browser.args");
    let browser = s.join("fake-browser");
    // A stand-in for the browser that keeps its arguments on its command line, as a browser does.
    std::fs::write(
        &browser,
        format!("#!/bin/sh\necho \"$@\" > {}\ntrap 'kill $!; exit 0' TERM\nsleep 120 &\nwait\n", browser_log.display()),
    )
    .unwrap();
    std::fs::set_permissions(&browser, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let mut benv = alice.env.clone();
    benv.push(("TUNL_BROWSER".into(), browser.display().to_string()));
    let out = Command::new(TUNL).args(["browser", &id]).env_clear().envs(benv).stdin(Stdio::null()).output().unwrap();
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{said}{}", String::from_utf8_lossy(&out.stderr));
    let socks: u16 = said
        .split("SOCKS proxy 127.0.0.1:")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|p| p.parse().ok())
        .expect(&said);
    let web = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let web_port = web.local_addr().unwrap().port();
    assert!(socks_connect(socks, web_port), "the SOCKS proxy did not reach 127.0.0.1:{web_port}");
    assert!(web.accept().is_ok());
    assert!(until(secs(10), || std::fs::read_to_string(&browser_log)
        .is_ok_and(|a| a.contains(&format!("socks5://127.0.0.1:{socks}")))));
    let out = alice.tunl(&["browser", &id, "--kill"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("proxy ended; browser ended"), "{out:?}");
    assert!(until(secs(10), || std::net::TcpStream::connect(("127.0.0.1", socks)).is_err()), "the proxy still listens");

    // Revoke: the tunnel closes and `tunl ssh` fails with one line.
    a.term.text("/revoke");
    a.term.keys(&["Enter"]);
    assert!(a.term.wait(secs(20), |sc| sc.contains("the tunnel closed")), "{}", diag("alice", &a.term));
    let out = alice.tunl(&["ssh", &id, "--", "id", "-un"]);
    assert!(!out.status.success());
    assert_ne!(String::from_utf8_lossy(&out.stdout).trim(), "root");

    // Close from the chat pane: the customer's session ends with the reason shown, the engineer's
    // join ends 0 with their terminal restored.
    a.term.text("/close all done, thanks");
    a.term.keys(&["Enter"]);
    assert!(until(secs(30), || std::fs::read_to_string(&cstatus).is_ok()), "{}", diag("customer", &cust));
    assert_eq!(std::fs::read_to_string(&cstatus).unwrap().trim(), "0");
    assert!(cust.wait(secs(10), |sc| sc.contains("all done, thanks")), "{}", diag("customer", &cust));
    assert!(until(secs(20), || a.rc().is_some()), "{}", diag("alice", &a.term));
    assert_eq!(a.rc(), Some(0));
    assert!(a.term.screen().contains("has ended"), "{}", diag("alice", &a.term));
    assert!(until(secs(5), || a.stty_restored()), "alice's terminal settings were not restored");
    drop(target);
    relay.stop();
}

#[test]
fn detach_restores_the_terminal_and_the_session_goes_on() {
    let scratch = Scratch::new("detach");
    let s = scratch.0.clone();
    let mut relay = Relay::start().expect("relay");
    let user = relay.add_support_user().expect("support user");
    let eng = Engineer::new(&relay, &user, &s);
    let (id, token) = relay.create_session("E2E-2", false);
    let client = tunl_relay::harness::client_binary().expect("client binary");
    let mut sh = String::from("env -i");
    for (k, v) in relay.env() {
        sh.push_str(&format!(" {k}={}", shq(&v)));
    }
    sh.push_str(&format!(
        " PATH={} USER=root HOME={} TERM=xterm-256color TUNL_RECORDING_DIR={} {} --token {token} {id}; sleep 600",
        shq(&std::env::var("PATH").unwrap()),
        shq(&s.display().to_string()),
        shq(&s.display().to_string()),
        shq(&client.display().to_string())
    ));
    let cust = Term::start(&s, "customer", 90, 30, &sh);
    assert!(eng.tunl(&["expect", &id, "--timeout", "60"]).status.success(), "{}", diag("customer", &cust));

    let j = Join::start(&eng, &s, "eng", &id);
    assert!(j.term.wait(secs(30), |sc| sc.contains("[CHAT]")), "{}", diag("eng", &j.term));
    j.term.keys(&["C-b", "d"]);
    assert!(until(secs(20), || j.rc().is_some()), "{}", diag("eng", &j.term));
    assert_eq!(j.rc(), Some(0));
    assert!(j.term.screen().contains("detached from"), "{}", diag("eng", &j.term));
    assert!(until(secs(5), || j.stty_restored()), "the terminal settings were not restored");
    // The session goes on: the customer is still connected, a new join sees it.
    let out = eng.tunl(&["show", &id]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(!cust.screen().contains("ended"), "{}", diag("customer", &cust));
    // Nothing of the join is left: its directory is gone.
    let left: Vec<_> = std::fs::read_dir(eng.home.join("tunl")).map(|d| d.flatten().collect()).unwrap_or_default();
    assert!(left.is_empty(), "{left:?}");

    // A terminal smaller than the customer's pane is told so, not silently clipped; `tunl detach`
    // from another terminal of the engineer's ends a running join the same way as Ctrl-b d.
    let j2 = Join::start_sized(&eng, &s, "eng2", &id, 70, 20);
    assert!(j2.term.wait(secs(30), |sc| sc.contains("TERMINAL TOO SMALL")), "{}", diag("eng2", &j2.term));
    let out = eng.tunl(&["detach"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(until(secs(20), || j2.rc().is_some()), "{}", diag("eng2", &j2.term));
    assert_eq!(j2.rc(), Some(0));
    assert!(until(secs(5), || j2.stty_restored()));

    // The one-shot commands reach the customer.
    assert!(eng.tunl(&["chat", &id, "hello", "from", "the", "cli"]).status.success());
    assert!(cust.wait(secs(20), |sc| sc.contains("hello from the cli")), "{}", diag("customer", &cust));
    assert!(eng.tunl(&["note", &id, "looking at the logs"]).status.success());
    assert!(cust.wait(secs(20), |sc| sc.contains("looking at the logs")), "{}", diag("customer", &cust));
    // `tunl upgrade` waits for the customer's answer and says it in plain words.
    let up = Command::new(TUNL)
        .args(["upgrade", &id])
        .env_clear()
        .envs(eng.env.iter().cloned())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    assert!(cust.wait(secs(20), |sc| sc.contains("Grant") && sc.contains("Deny")), "{}", diag("customer", &cust));
    cust.keys(&["d"]);
    let out = up.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("the customer denied the tunnel"), "{out:?}");
    let log = eng.tunl(&["log", &id]);
    let log_text = String::from_utf8_lossy(&log.stdout);
    assert!(
        log.status.success() && log_text.lines().all(|l| l.starts_with('{')) && log_text.contains("join"),
        "{log_text}"
    );
    // `tunl pick`: one live session is chosen by itself; 3 is info, 4 quits.
    let mut pick = Command::new(TUNL)
        .arg("pick")
        .env_clear()
        .envs(eng.env.iter().cloned())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(&mut pick.stdin.take().unwrap(), b"3\n4\n").unwrap();
    let out = pick.wait_with_output().unwrap();
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains(&format!("=== {id}")), "{out:?}");
    let out = eng.tunl(&["close", &id, "bye"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    relay.stop();
}

#[test]
fn one_shot_errors_are_one_line() {
    let scratch = Scratch::new("errors");
    let s = scratch.0.clone();
    let mut relay = Relay::start().expect("relay");
    let user = relay.add_support_user().expect("support user");
    let eng = Engineer::new(&relay, &user, &s);
    let out = eng.tunl(&["show", "no-such-session-here"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("no such session"), "{err}");
    // A pending session: cancel works, and the token is gone with it.
    let (id, _) = relay.create_session("E2E-3", false);
    let out = eng.tunl(&["cancel", &id]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = eng.tunl(&["ssh", &id]);
    assert_eq!(out.status.code(), Some(1));
    relay.stop();
}
