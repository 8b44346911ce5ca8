//! A whole support session end to end, as root on loopback: `tunl-relay init --root` and its sshd
//! (the harness), the real client in a terminal (an outer tmux), support engineers over their own
//! ssh logins to the relay's support ForceCommand, and a second real sshd as the customer's SSH
//! target for the login through the reverse tunnel.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::time::Instant;

use common::*;
use relay_double::{SupportKey, TargetSshd, support_login};
use tunl_relay::harness::{Relay, SupportUser, client_binary, wait_until};
use tunl_relay::registry::Registry;
use tunl_wire as wire;

/// The customer: the real client in a 160x48 terminal (an outer tmux), a plain `sh` as the shell.
struct Customer {
    scratch: Scratch,
    outer: PathBuf,
}

impl Customer {
    fn start(relay: &Relay, id: &str, args: &[&str], env: &[(&str, &str)]) -> Customer {
        let scratch = Scratch::new("e2e-cust");
        let s = scratch.path().to_path_buf();
        let outer = s.join("outer.sock");
        std::fs::write(s.join("outer.conf"), "set-option -g remain-on-exit on\n").unwrap();
        let mut words = vec![client_binary().unwrap().display().to_string()];
        words.extend(args.iter().map(|a| a.to_string()));
        words.push(id.to_string());
        let script = format!("{}; echo EXIT=$? > {}/status", words.join(" "), s.display());
        let mut c = Command::new("tmux");
        c.arg("-S").arg(&outer).arg("-f").arg(s.join("outer.conf"));
        c.args(["new-session", "-d", "-s", "cust", "-x", "160", "-y", "48", "sh", "-c", &script]);
        c.env_clear().env("PATH", std::env::var("PATH").unwrap_or_else(|_| "/usr/bin:/bin".into()));
        for (k, v) in relay.env() {
            c.env(k, v);
        }
        c.env("USER", "root").env("HOME", &s).env("TERM", "xterm-256color").env("LANG", "C.UTF-8");
        c.env("TUNL_AUTHKEYS_FILE", s.join("authorized_keys")).env("TUNL_RECORDING_DIR", &s);
        c.env("TUNL_STATE_DIR", s.join("state")).env("SHELL", "/bin/sh").env("PS1", "$ ");
        for (k, v) in env {
            c.env(k, v);
        }
        c.current_dir(&s).stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null());
        assert!(c.status().unwrap().success(), "the outer tmux did not start");
        Customer { scratch, outer }
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
        let o = self.tmux().args(["capture-pane", "-p", "-J", "-S", "-", "-t", "cust:0.0"]).output().unwrap();
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    fn wait_screen(&self, secs_: u64, pred: impl Fn(&str) -> bool) -> bool {
        wait_until(secs(secs_), || pred(&self.screen()))
    }

    fn exit_status(&self, secs_: u64) -> Option<i32> {
        let mut st = None;
        wait_until(secs(secs_), || {
            st = std::fs::read_to_string(self.scratch.path().join("status"))
                .ok()
                .and_then(|s| s.trim().strip_prefix("EXIT=").and_then(|n| n.parse().ok()));
            st.is_some()
        });
        st
    }
}

impl Drop for Customer {
    fn drop(&mut self) {
        // Ending the terminal ends the client in it (SIGHUP), which cleans up after itself.
        let _ = self.tmux().args(["kill-server"]).status();
    }
}

/// An engineer's `ssh` to the relay running one `tunl-support/1` command.
fn support(relay: &Relay, who: &SupportUser, command: &str) -> (Vec<String>, bool) {
    let o = Command::new("ssh")
        .args(relay.support_ssh_args(who))
        .arg("--")
        .arg(command)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let lines = String::from_utf8_lossy(&o.stdout).lines().map(str::to_string).collect();
    (lines, o.status.success())
}

/// `tunl-support/1 join` over the engineer's ssh: lines in, lines out.
struct Join {
    child: Child,
    stdin: ChildStdin,
    rx: Receiver<String>,
    seen: Vec<String>,
    output: Vec<u8>,
}

impl Join {
    fn start(relay: &Relay, who: &SupportUser, id: &str, ro: bool) -> Join {
        let mut child = Command::new("ssh")
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
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for l in BufReader::new(out).lines() {
                let Ok(l) = l else { break };
                if tx.send(l).is_err() {
                    break;
                }
            }
        });
        Join { child, stdin, rx, seen: Vec::new(), output: Vec::new() }
    }

    fn send(&mut self, l: &str) {
        self.stdin.write_all(format!("{l}\n").as_bytes()).unwrap();
        self.stdin.flush().unwrap();
    }

    /// Reads lines until `pred(line, output)` holds. `output` is the shell output since the join on
    /// the first call of a wait, then only its tail (what the last line added, and a little before):
    /// scanning all of it for every line made a 16 MB test quadratic, minutes long.
    fn wait(&mut self, secs_: u64, pred: impl Fn(&str, &[u8]) -> bool) -> Option<String> {
        let d = secs(secs_);
        let mut from: usize = 0;
        loop {
            let l = self.rx.recv_timeout(d.saturating_duration_since(Instant::now())).ok()?;
            if let Some(p) = l.strip_prefix("O ")
                && let Some(b) = wire::b64_decode(p)
            {
                self.output.extend_from_slice(&b);
            }
            // Big outputs are not kept whole: only their tail is ever looked at again.
            if self.output.len() > 8 << 20 {
                let cut = self.output.len() - (1 << 20);
                self.output.drain(..cut);
                from = from.saturating_sub(cut);
            }
            if self.seen.len() > 1000 {
                self.seen.drain(..500);
            }
            self.seen.push(if l.len() > 200 { format!("{}...", &l[..200]) } else { l.clone() });
            if pred(&l, &self.output[from.min(self.output.len())..]) {
                return Some(l);
            }
            from = self.output.len().saturating_sub(256);
        }
    }

    fn diag(&self) -> String {
        let tail: Vec<&String> = self.seen.iter().rev().take(20).collect();
        format!("join stream (last 20, newest first): {tail:?}\noutput: {}", String::from_utf8_lossy(&self.output))
    }
}

impl Drop for Join {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn contains(hay: &[u8], needle: &str) -> bool {
    hay.windows(needle.len()).any(|w| w == needle.as_bytes())
}

fn audit(relay: &Relay, id: &str) -> String {
    std::fs::read_to_string(relay.layout.audit().join(format!("{id}.jsonl"))).unwrap_or_default()
}

fn recording(relay: &Relay, id: &str) -> String {
    std::fs::read_to_string(relay.layout.recordings().join(format!("{id}.cast"))).unwrap_or_default()
}

fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

#[test]
fn support_session_end_to_end() {
    let mut relay = relay();
    let eng = relay.add_support_user().unwrap();
    let (created, ok) = support(&relay, &eng, "tunl-support/1 create case=E2E customer=ACME expires=30 restricted=0");
    assert!(ok, "create: {created:?}\n{}", relay.log_text());
    let s = wire::parse(created[0].as_bytes(), |_| false).unwrap();
    let (id, token) = (s.get("id").unwrap().to_string(), s.get("token").unwrap().to_string());

    let cust = Customer::start(&relay, &id, &["--token", &token], &[]);
    let (x, ok) = support(&relay, &eng, &format!("tunl-support/1 expect id={id} timeout=60"));
    assert!(ok && x == ["OK"], "expect: {x:?}\n{}", relay.log_text());
    assert!(cust.wait_screen(30, |s| s.contains("[SHELL]")), "{}", cust.screen());

    let mut join = Join::start(&relay, &eng, &id, false);
    let joined = join.wait(30, |l, _| l.starts_with("JOINED ")).unwrap_or_else(|| panic!("{}", join.diag()));
    assert!(
        joined.contains(&format!("id={id} mode=share ")) && joined.contains(&format!(" me={}", eng.name)),
        "{joined}"
    );
    join.wait(30, |l, _| l.starts_with("SNAP size=")).unwrap_or_else(|| panic!("no SNAP: {}", join.diag()));
    // The customer's terminal counts the viewer.
    assert!(cust.wait_screen(30, |s| s.contains("viewers: 1 ") || s.contains("viewers 1 ")), "{}", cust.screen());

    // Keystrokes round trip: typed by support, run by the customer's shell, seen by both.
    join.send(&format!("K {}", wire::b64(b"echo RT-$((40+2))\r")));
    join.wait(30, |_, o| contains(o, "RT-42")).unwrap_or_else(|| panic!("no echo: {}", join.diag()));
    assert!(cust.wait_screen(10, |s| s.contains("RT-42")));

    // Chat both ways.
    let (x, ok) = support(&relay, &eng, &format!("tunl-support/1 chat id={id} {}", wire::b64(b"hello from support")));
    assert!(ok && x == ["OK"], "{x:?}");
    assert!(cust.wait_screen(30, |s| s.contains("hello from support")), "{}", cust.screen());
    cust.keys(&["C-b", "c"]);
    assert!(cust.wait_screen(15, |s| s.contains("[CHAT]")));
    let focus = wait_until(secs(15), || {
        let o = Command::new("tmux")
            .arg("-S")
            .arg(session_dir(&id).join("tmux.sock"))
            .args(["display-message", "-p", "#{@linbit-role}"])
            .env_remove("TMUX")
            .output()
            .unwrap();
        String::from_utf8_lossy(&o.stdout).trim() == "chat"
    });
    assert!(focus, "C-b c did not focus the chat");
    cust.type_line("thanks from the customer");
    let chat = join
        .wait(30, |l, _| l.starts_with("CHAT from=customer "))
        .unwrap_or_else(|| panic!("no customer chat: {}", join.diag()));
    assert!(chat.ends_with(&wire::b64(b"thanks from the customer")), "{chat}");
    cust.keys(&["C-b", "c"]);

    // `show` and `list` see the live session and its viewer.
    let (x, ok) = support(&relay, &eng, &format!("tunl-support/1 show id={id}"));
    assert!(ok, "{x:?}");
    assert!(
        x[0].contains(" state=share ") && x.iter().any(|l| l.starts_with(&format!("VIEWER name={} ", eng.name))),
        "{x:?}"
    );
    assert!(x.iter().any(|l| l.starts_with("CHATLOG ") && l.contains(" from=customer ")), "{x:?}");

    // Close: the customer's client ends by itself (exit 0), the engineer sees CLOSED.
    let (x, ok) = support(&relay, &eng, &format!("tunl-support/1 close id={id} reason=solved"));
    assert!(ok && x == ["OK"], "{x:?}");
    join.wait(30, |l, _| l.starts_with("CLOSED ")).unwrap_or_else(|| panic!("no CLOSED: {}", join.diag()));
    assert_eq!(cust.exit_status(60), Some(0), "{}", cust.screen());
    let a = audit(&relay, &id);
    for ev in ["link-up", "join", "keys", "chat", "close", "end"] {
        assert!(a.contains(&format!("\"ev\":\"{ev}\"")), "{ev} not in the audit log:\n{a}");
    }
    assert!(recording(&relay, &id).contains("RT-42"), "the relay's recording lacks the session");
}

#[test]
fn tunnel_granted_used_and_revoked() {
    let mut relay = relay();
    let eng = relay.add_support_user().unwrap();
    let (id, token) = relay.create_session("E2E-TUNNEL", false);
    let keys = Scratch::new("e2e-tkeys");
    let eng_key = SupportKey::generate(keys.path()).unwrap();
    let ak = keys.path().join("authorized_keys");
    std::fs::write(&ak, "").unwrap();
    let target = TargetSshd::start(&ak).unwrap();
    let port = target.port.to_string();
    let ak_s = ak.display().to_string();
    let cust = Customer::start(
        &relay,
        &id,
        &["--token", &token],
        &[("TUNL_TARGET_PORT", &port), ("TUNL_TARGET_HOST", "127.0.0.1"), ("TUNL_AUTHKEYS_FILE", &ak_s)],
    );
    let (x, ok) = support(&relay, &eng, &format!("tunl-support/1 expect id={id} timeout=60"));
    assert!(ok, "{x:?}\n{}", relay.log_text());
    assert!(cust.wait_screen(30, |s| s.contains("[SHELL]")));
    // Pre-grant (Ctrl-b u): no popup.
    cust.keys(&["C-b", "u"]);
    let mut join = Join::start(&relay, &eng, &id, true);
    join.wait(30, |l, _| l.starts_with("STATE tunnel=allowed")).unwrap_or_else(|| panic!("{}", join.diag()));

    let (x, ok) =
        support(&relay, &eng, &format!("tunl-support/1 upgrade id={id} {}", wire::b64(eng_key.public_line.as_bytes())));
    assert!(ok, "upgrade: {x:?}\n{}", relay.log_text());
    let t = wire::parse(x[0].as_bytes(), |_| false).unwrap();
    assert_eq!(t.verb, "TUNNEL", "{x:?}");
    let p: u16 = t.get("port").unwrap().parse().unwrap();
    // Through the engineer's own relay login (direct-tcpip to the relay's loopback only).
    let proxy: Vec<String> = relay.support_ssh_args(&eng).iter().map(|a| sh_quote(a)).collect();
    let proxy = format!("ssh {} -W 127.0.0.1:{p}", proxy.join(" "));
    let o = Command::new("ssh")
        .args(["-F", "/dev/null", "-i"])
        .arg(&eng_key.private_path)
        .args(["-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "-o", "BatchMode=yes"])
        .args(["-o", "IdentitiesOnly=yes", "-o", "LogLevel=ERROR", "-o"])
        .arg(format!("ProxyCommand={proxy}"))
        .args(["root@tunl-target", "echo", "THROUGH-$((6*7))"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("THROUGH-42"),
        "no login through the tunnel: {}\n{}\n{}",
        String::from_utf8_lossy(&o.stderr),
        target.log(),
        relay.log_text()
    );
    let (x, _) = support(&relay, &eng, "tunl-support/1 list");
    assert!(
        x.iter().any(|l| l.contains(&id) && l.ends_with(&format!(" port={p}"))),
        "{x:?}\n{}\n{}",
        audit(&relay, &id),
        std::fs::read_to_string(relay.layout.audit().join(format!("{id}.log"))).unwrap_or_default()
    );

    // Revoke: the forward and the key go; the login fails now.
    let (x, ok) = support(&relay, &eng, &format!("tunl-support/1 revoke id={id}"));
    assert!(ok && x == ["OK"], "{x:?}");
    join.wait(30, |l, _| l.starts_with("TUNNEL_CLOSED ")).unwrap_or_else(|| panic!("{}", join.diag()));
    let refused = wait_until(secs(30), || {
        !support_login(p, &eng_key, "root", "echo STILL")
            .map(|o| String::from_utf8_lossy(&o.stdout).contains("STILL"))
            .unwrap_or(false)
    });
    assert!(refused, "the tunnel still lets support in after revoke");
    assert!(std::fs::read_to_string(&ak).unwrap().trim().is_empty(), "the key is still installed");
    let a = audit(&relay, &id);
    assert!(
        a.contains("\"ev\":\"tunnel-open\"") && a.contains(&format!("\"port\":{p}")) && a.contains("\"ev\":\"revoke\""),
        "{a}"
    );

    let (x, ok) = support(&relay, &eng, &format!("tunl-support/1 close id={id} reason=done"));
    assert!(ok, "{x:?}");
    assert_eq!(cust.exit_status(60), Some(0));
}

/// A live session with one engineer, for the misbehaviour tests.
fn live_session(tag: &str) -> (Relay, SupportUser, String, Customer) {
    let mut relay = relay();
    let eng = relay.add_support_user().unwrap();
    let (id, token) = relay.create_session(tag, false);
    let cust = Customer::start(&relay, &id, &["--token", &token], &[]);
    let (x, ok) = support(&relay, &eng, &format!("tunl-support/1 expect id={id} timeout=60"));
    assert!(ok, "{x:?}\n{}", relay.log_text());
    assert!(cust.wait_screen(30, |s| s.contains("[SHELL]")), "{}", cust.screen());
    (relay, eng, id, cust)
}

fn session_log(relay: &Relay, id: &str) -> String {
    std::fs::read_to_string(relay.layout.audit().join(format!("{id}.log"))).unwrap_or_default()
}

#[test]
fn misbehaving_engineers_are_answered_and_dropped() {
    let (relay, eng, id, cust) = live_session("E2E-BAD");

    // Garbage commands: one ERR line each, nothing else.
    for c in ["rm -rf /", "tunl-support/1 join id=../../x ro=0", "tunl-support/9 list"] {
        let (x, ok) = support(&relay, &eng, c);
        assert!(!ok && x.len() == 1 && x[0].starts_with("ERR code=proto "), "{c}: {x:?}");
    }
    // A viewer sending garbage stays joined; one that never reads is dropped; others go on.
    let mut noisy = Join::start(&relay, &eng, &id, false);
    noisy.wait(30, |l, _| l.starts_with("JOINED ")).unwrap();
    noisy.send("\u{1b}[2J GARBAGE");
    noisy.send(&"Z".repeat(300_000));
    noisy.send("PING 31");
    noisy.wait(30, |l, _| l == "PONG 31").unwrap_or_else(|| panic!("{}", noisy.diag()));
    let stuck = Command::new("ssh")
        .args(relay.support_ssh_args(&eng))
        .arg("--")
        .arg(format!("tunl-support/1 join id={id} ro=1"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut stuck = KillOnDrop(stuck);
    assert!(cust.wait_screen(30, |s| s.contains("viewers: 2 ") || s.contains("viewers 2 ")), "{}", cust.screen());
    // 16 MB of output: far more than the stuck viewer's queue and every buffer on its way.
    cust.type_line("head -c 16000000 /dev/zero | tr '\\0' x; echo; echo BIG-$((20+3))");
    noisy
        .wait(300, |_, o| contains(o, "BIG-23"))
        .unwrap_or_else(|| panic!("the reading viewer stalled: {}", noisy.diag()));
    assert!(cust.wait_screen(60, |s| s.contains("BIG-23")));
    let dropped = wait_until(secs(60), || session_log(&relay, &id).contains(" warn viewer-dropped "));
    assert!(dropped, "the stuck viewer was not dropped\n{}", session_log(&relay, &id));
    assert!(cust.wait_screen(30, |s| s.contains("viewers: 1 ") || s.contains("viewers 1 ")), "{}", cust.screen());
    let _ = stuck.0.kill();
    noisy.send(&format!("K {}", wire::b64(b"echo STILL-$((1+1))\r")));
    noisy.wait(30, |_, o| contains(o, "STILL-2")).unwrap_or_else(|| panic!("{}", noisy.diag()));
}

#[test]
fn a_second_customer_is_refused_busy_and_the_first_goes_on() {
    let (relay, eng, id, cust) = live_session("E2E-TWO");
    let mut join = Join::start(&relay, &eng, &id, false);
    join.wait(30, |l, _| l.starts_with("JOINED ")).unwrap_or_else(|| panic!("{}", join.diag()));

    // The same session ID from a second customer (keyboard-interactive with the ID, resume=0;
    // a second real client on this host would stop at its own lock first).
    let scratch = Scratch::new("e2e-second");
    let hello = format!(
        "linbit-tunl/1 id={id} mode=share host=other user=root ips=10.0.0.2 case= client=0.1 size=80x24 resume=0"
    );
    let got = ki_first_line(&relay, &scratch, &id, &hello);
    assert!(got.starts_with("ERROR code=busy "), "{got}\n{}", relay.log_text());
    let log = session_log(&relay, &id);
    assert!(log.lines().any(|l| l.contains(&format!(" warn customer-refused id={id} code=busy "))), "{log}");
    let ev = relay.registry().events(&id).unwrap();
    assert!(ev.iter().any(|e| e.what == "refused" && e.detail.starts_with("busy")), "{ev:?}");
    assert!(!ev.iter().any(|e| e.what == "reconnected"), "{ev:?}");

    join.send(&format!("K {}", wire::b64(b"echo STILL-$((1+1))\r")));
    join.wait(30, |_, o| contains(o, "STILL-2")).unwrap_or_else(|| panic!("{}", join.diag()));
    let (x, ok) = support(&relay, &eng, &format!("tunl-support/1 close id={id} reason=done"));
    assert!(ok, "{x:?}");
    assert_eq!(cust.exit_status(60), Some(0));
}

struct KillOnDrop(Child);
impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
