//! `tunl-relay produce`, `broker` and `support` as sshd runs them (the command in
//! `SSH_ORIGINAL_COMMAND`, the channel on stdin/stdout), under a temporary `--root`: the real
//! binary, the real registry, real brokers. The sshd in front of them is tested end to end
//! elsewhere; here every answer of every command is checked.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::time::{Duration, Instant};

use tunl_relay::layout::{Config, Layout};
use tunl_relay::registry::{NewSession, Registry, Sqlite};
use tunl_wire as wire;

const BIN: &str = env!("CARGO_BIN_EXE_tunl-relay");

fn deadline() -> Instant {
    Instant::now() + Duration::from_secs(30)
}

struct Root {
    dir: PathBuf,
    layout: Layout,
}

impl Root {
    fn new() -> Root {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let dir = std::env::temp_dir().join(format!("tunl-relay-cmd-{}-{n}", std::process::id()));
        let layout = Layout::new(&dir);
        for d in [layout.etc(), layout.registry_dir(), layout.recordings(), layout.audit(), layout.run().join("s")] {
            std::fs::create_dir_all(d).unwrap();
        }
        let cfg = Config {
            port: 2222,
            api_port: 8443,
            customer_user: "tunl".into(),
            support_group: "tunl-support".into(),
            pam_service: "tunl-relay-sshd".into(),
            binary: BIN.into(),
            listen: "127.0.0.1".into(),
            idle_minutes: 120,
            retain_days: 90,
        };
        std::fs::write(layout.config_file(), cfg.render()).unwrap();
        Root { dir, layout }
    }

    fn reg(&self) -> Sqlite {
        Sqlite::open(&self.layout.registry_db()).unwrap()
    }

    fn create(&self, restricted: bool) -> String {
        let new = NewSession {
            case: "CASE-1".into(),
            customer: "ACME".into(),
            created_by: "test".into(),
            expires_minutes: 60,
            restricted,
            relay_host: "relay".into(),
        };
        self.reg().create(&new, tunl_relay::now()).unwrap().0.id
    }

    fn cmd(&self, sub: &str, original: &str) -> Command {
        let mut c = Command::new(BIN);
        c.arg(sub).arg("--root").arg(&self.dir).env("SSH_ORIGINAL_COMMAND", original);
        c
    }

    /// A one-shot `support` command: its stdout lines and exit status.
    fn support(&self, command: &str) -> (Vec<String>, bool) {
        let o = self.cmd("support", command).stdin(Stdio::null()).output().unwrap();
        let lines = String::from_utf8_lossy(&o.stdout).lines().map(str::to_string).collect();
        (lines, o.status.success())
    }

    fn spawn(&self, sub: &str, original: &str) -> Proc {
        let mut c = self.cmd(sub, original).stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().unwrap();
        let out = c.stdout.take().unwrap();
        let stdin = c.stdin.take();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for l in BufReader::new(out).lines() {
                let Ok(l) = l else { break };
                if tx.send(l).is_err() {
                    break;
                }
            }
        });
        Proc { child: c, stdin, rx, seen: Vec::new() }
    }

    fn broker_pid(&self, sid: &str) -> Option<i32> {
        let t = std::fs::read_to_string(self.layout.session_run(sid).join("broker.lock")).ok()?;
        t.trim().parse().ok()
    }

    fn broker_gone(&self, sid: &str) -> bool {
        let d = deadline();
        while Instant::now() < d {
            match self.broker_pid(sid) {
                Some(pid) if Path::new(&format!("/proc/{pid}")).exists() => {
                    std::thread::sleep(Duration::from_millis(50));
                }
                _ => return true,
            }
        }
        false
    }
}

impl Drop for Root {
    fn drop(&mut self) {
        // Brokers (a `produce` that became one, or `broker SID`) outlive their customer: end every
        // one this test started, by its pid.
        if let Ok(rd) = std::fs::read_dir(self.layout.run().join("s")) {
            for e in rd.flatten() {
                if let Some(pid) = self.broker_pid(&e.file_name().to_string_lossy())
                    && Path::new(&format!("/proc/{pid}/cmdline")).exists()
                    && std::fs::read(format!("/proc/{pid}/cmdline"))
                        .is_ok_and(|c| c.windows(6).any(|w| w == b"broker") || c.windows(7).any(|w| w == b"produce"))
                {
                    unsafe { libc::kill(pid, libc::SIGTERM) };
                }
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

struct Proc {
    child: Child,
    stdin: Option<ChildStdin>,
    rx: Receiver<String>,
    seen: Vec<String>,
}

impl Proc {
    fn send(&mut self, l: &str) {
        let s = self.stdin.as_mut().unwrap();
        s.write_all(format!("{l}\n").as_bytes()).unwrap();
        s.flush().unwrap();
    }
    fn next(&mut self) -> Option<String> {
        let l = self.rx.recv_timeout(deadline().saturating_duration_since(Instant::now())).ok()?;
        self.seen.push(l.clone());
        Some(l)
    }
    fn wait(&mut self, pred: impl Fn(&str) -> bool) -> String {
        while let Some(l) = self.next() {
            if pred(&l) {
                return l;
            }
        }
        panic!("no such line; saw {:?}", self.seen);
    }
    fn exit(&mut self) -> Option<i32> {
        let d = deadline();
        while Instant::now() < d {
            if let Some(st) = self.child.try_wait().unwrap() {
                return st.code();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn hello(sid: &str, mode: &str, resume: bool) -> String {
    format!(
        "linbit-tunl/1 id={sid} mode={mode} host=node1 user=root ips=192.0.2.1 case=c client=0.1.0 size=80x24 resume={}",
        u8::from(resume)
    )
}

fn produce_answer(root: &Root, hello: &str) -> (String, Option<i32>) {
    let mut p = root.spawn("produce", hello);
    let first = p.next().unwrap_or_default();
    drop(p.stdin.take());
    (first, p.exit())
}

#[test]
fn produce_refuses_with_the_contracts_codes_and_starts_nothing() {
    let root = Root::new();
    let sid = root.create(false);
    let restricted = root.create(true);
    let closed = root.create(false);
    root.reg().end(&closed, "closed", tunl_relay::now()).unwrap();
    let old = NewSession { expires_minutes: 1, ..Default::default() };
    let expired = root.reg().create(&old, tunl_relay::now() - 3600).unwrap().0.id;
    for (h, code) in [
        (String::new(), "proto"),
        ("ls -la; id".into(), "proto"),
        (hello(&sid, "share", false).replace("mode=share", "mode=root"), "proto"),
        (hello(&sid, "share", false).replace("size=80x24", "size=80"), "proto"),
        (hello(&sid, "share", false).replace("ips=192.0.2.1", "ips=`id`"), "proto"),
        (hello(&sid, "share", false).replace(" resume=0", ""), "proto"),
        (hello("no-such-session-here", "share", false), "unknown-session"),
        (hello(&expired, "share", false), "expired"),
        (hello(&closed, "share", false), "closed"),
        (hello(&restricted, "share", false), "mode-refused"),
        (hello(&restricted, "tunnel", false), "mode-refused"),
    ] {
        let (first, code_) = produce_answer(&root, &h);
        assert!(first.starts_with(&format!("ERROR code={code} msg=")), "{h:?}: {first}");
        assert_eq!(code_, Some(1), "{h:?}");
    }
    // Nothing ran for any of them.
    for s in [&sid, &restricted, &closed, &expired] {
        assert!(!root.layout.session_run(s).exists(), "{s}");
    }
    assert_eq!(root.reg().get(&sid).unwrap().unwrap().state.as_str(), "pending");
}

#[test]
fn a_whole_session_through_the_commands() {
    let root = Root::new();
    let (created, ok) = root.support("tunl-support/1 create case=CASE%207 customer=ACME%20Inc expires=60 restricted=0");
    assert!(ok, "{created:?}");
    let s = wire::parse(created[0].as_bytes(), |_| false).unwrap();
    assert_eq!(s.verb, "SESSION");
    let sid = s.get("id").unwrap().to_string();
    assert!(s.get("token").unwrap().len() == 6 && created[1] == "OK");
    let (x, ok) = root.support(&format!("tunl-support/1 expect id={sid} timeout=1"));
    assert!(!ok && x[0].starts_with("ERR code=timeout"), "{x:?}");
    let (x, _) = root.support(&format!("tunl-support/1 chat id={sid} aGk="));
    assert!(x[0].starts_with("ERR code=not-live"), "{x:?}");

    let mut customer = root.spawn("produce", &hello(&sid, "share", false));
    assert_eq!(customer.next().as_deref(), Some("WELCOME proto=1 viewers=0"));
    let (x, ok) = root.support(&format!("tunl-support/1 expect id={sid} timeout=5"));
    assert!(ok && x == ["OK"], "{x:?}");
    let (x, _) = root.support("tunl-support/1 list");
    let item = x.iter().find(|l| l.contains(&sid)).unwrap();
    assert!(
        item.contains(" state=share ") && item.contains(" host=node1 ") && item.contains(" customer=ACME%20Inc "),
        "{item}"
    );

    let mut join = root.spawn("support", &format!("tunl-support/1 join id={sid} ro=0"));
    let joined = join.next().unwrap();
    assert!(joined.starts_with(&format!("JOINED id={sid} mode=share host=node1 user=root case=CASE%207 customer=ACME%20Inc size=80x24 viewers=1 ro=0 me=")), "{joined}");
    customer.wait(|l| l == "REFRESH");
    customer.send("SNAP size=80x24 c2NyZWVu");
    join.wait(|l| l == "SNAP size=80x24 c2NyZWVu");
    customer.send(&format!("O {}", wire::b64(b"$ ")));
    join.wait(|l| l == format!("O {}", wire::b64(b"$ ")));
    join.send(&format!("K {}", wire::b64(b"id\r")));
    customer.wait(|l| l == format!("K {}", wire::b64(b"id\r")));
    let (x, ok) = root.support(&format!("tunl-support/1 chat id={sid} {}", wire::b64(b"hello from support")));
    assert!(ok && x == ["OK"], "{x:?}");
    let chat = customer.wait(|l| l.starts_with("CHAT "));
    assert!(chat.ends_with(&wire::b64(b"hello from support")), "{chat}");
    customer.send(&format!("CHAT {}", wire::b64(b"thanks")));
    join.wait(|l| l == format!("CHAT from=customer {}", wire::b64(b"thanks")));
    let (x, ok) = root.support(&format!("tunl-support/1 show id={sid}"));
    assert!(ok, "{x:?}");
    assert!(x[0].starts_with(&format!("ITEM id={sid} state=share ")) && x[0].contains(" viewers=1 "), "{x:?}");
    assert!(x.iter().any(|l| l.starts_with("CHATLOG at=") && l.contains(" from=customer ")), "{x:?}");
    assert!(x.iter().any(|l| l.starts_with("VIEWER name=") && l.ends_with(" ro=0")), "{x:?}");

    // Two customers claiming one session: the second without resume is busy, with resume it wins.
    let (first, code) = produce_answer(&root, &hello(&sid, "share", false));
    assert!(first.starts_with("ERROR code=busy "), "{first}");
    assert_eq!(code, Some(1));
    let mut again = root.spawn("produce", &hello(&sid, "share", true));
    assert_eq!(again.next().as_deref(), Some("WELCOME proto=1 viewers=1"));
    assert_eq!(customer.exit(), Some(0), "the replaced link ends");
    join.wait(|l| l == "LINK state=down");
    join.wait(|l| l == "LINK state=up");
    // Each is recorded as what it was: the busy one is no reconnect, the resume a takeover.
    let ev: Vec<String> = root.reg().events(&sid).unwrap().iter().map(|e| format!("{} {}", e.what, e.detail)).collect();
    assert!(ev.iter().any(|e| e.starts_with("refused busy")), "{ev:?}");
    assert!(ev.iter().any(|e| e.starts_with("takeover ")), "{ev:?}");
    assert!(!ev.iter().any(|e| e.starts_with("reconnected")), "{ev:?}");
    let log = std::fs::read_to_string(root.layout.audit().join(format!("{sid}.log"))).unwrap();
    assert!(log.lines().any(|l| l.contains(&format!(" warn customer-refused id={sid} code=busy "))), "{log}");

    // An upgrade: the one-shot command waits for the customer's answer.
    let key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl eng";
    let mut up = root.spawn("support", &format!("tunl-support/1 upgrade id={sid} {}", wire::b64(key.as_bytes())));
    let u = again.wait(|l| l.starts_with("UPGRADE "));
    assert!(u.starts_with("UPGRADE req=u1 from=") && u.ends_with(&wire::b64(key.as_bytes())), "{u}");
    again.send("TUNNEL_OPEN req=u1 port=40123 user=root");
    assert_eq!(up.next().as_deref(), Some("TUNNEL port=40123 user=root"));
    assert_eq!(up.next().as_deref(), Some("OK"));
    assert_eq!(up.exit(), Some(0));
    let (x, _) = root.support("tunl-support/1 list");
    assert!(x.iter().any(|l| l.contains(&sid) && l.ends_with(" port=40123")), "{x:?}");
    let (x, ok) = root.support(&format!("tunl-support/1 revoke id={sid}"));
    assert!(ok && x == ["OK"]);
    again.wait(|l| l == "REVOKE");
    let (x, _) = root.support(&format!("tunl-support/1 cancel id={sid}"));
    assert!(x[0].starts_with("ERR code=live"), "{x:?}");

    // Garbage from the engineer is dropped; the stream goes on.
    join.send("rm -rf /");
    join.send("PING 9");
    join.wait(|l| l == "PONG 9");

    let (x, ok) = root.support(&format!("tunl-support/1 log id={sid}"));
    assert!(ok);
    let audit: Vec<String> = x
        .iter()
        .filter_map(|l| l.strip_prefix("AUDIT "))
        .map(|b| String::from_utf8(wire::b64_decode(b).unwrap()).unwrap())
        .collect();
    for ev in ["\"ev\":\"join\"", "\"ev\":\"chat\"", "\"ev\":\"upgrade\"", "\"port\":40123", "\"ev\":\"revoke\""] {
        assert!(audit.iter().any(|a| a.contains(ev)), "{ev}: {audit:?}");
    }

    let (x, ok) = root.support(&format!("tunl-support/1 close id={sid} reason=solved"));
    assert!(ok && x == ["OK"], "{x:?}");
    again.wait(|l| l == "CLOSE reason=solved");
    join.wait(|l| l.starts_with("CLOSED reason="));
    assert_eq!(join.exit(), Some(0));
    assert!(root.broker_gone(&sid));
    let (x, _) = root.support("tunl-support/1 list");
    assert!(x.iter().any(|l| l.contains(&sid) && l.contains(" state=ended ")), "{x:?}");
    // Keystroke counts are written when the engineer leaves (and every 10 s).
    let (x, _) = root.support(&format!("tunl-support/1 log id={sid}"));
    let last: Vec<String> = x
        .iter()
        .filter_map(|l| l.strip_prefix("AUDIT "))
        .map(|b| String::from_utf8(wire::b64_decode(b).unwrap()).unwrap())
        .collect();
    assert!(last.iter().any(|a| a.contains("\"ev\":\"keys\"") && a.contains("\"bytes\":3")), "{last:?}");
    assert!(last.iter().any(|a| a.contains("\"ev\":\"end\"")), "{last:?}");
    let (first, _) = produce_answer(&root, &hello(&sid, "share", true));
    assert!(first.starts_with("ERROR code=closed "), "{first}");
    let rec = std::fs::read_to_string(root.layout.recordings().join(format!("{sid}.cast"))).unwrap();
    assert!(rec.lines().nth(1).is_some_and(|l| l.contains("\"o\",\"$ \"")), "{rec}");
}

#[test]
fn support_refuses_bad_commands() {
    let root = Root::new();
    let sid = root.create(true);
    for (c, code) in [
        (String::new(), "proto"),
        ("bash".into(), "proto"),
        ("tunl-support/1 frobnicate".into(), "proto"),
        (format!("tunl-support/1 show id={sid} id={sid}"), "proto"),
        ("tunl-support/1 show id=no-such-session-here".into(), "unknown-session"),
        (format!("tunl-support/1 join id={sid} ro=1"), "not-live"),
        (format!("tunl-support/1 upgrade id={sid} aGk="), "proto"),
    ] {
        let (x, ok) = root.support(&c);
        assert!(!ok && x.len() == 1 && x[0].starts_with(&format!("ERR code={code} msg=")), "{c:?}: {x:?}");
    }
    // A restricted session: the broker answers an upgrade at once.
    let mut customer = root.spawn("produce", &hello(&sid, "restricted", false));
    assert_eq!(customer.next().as_deref(), Some("WELCOME proto=1 viewers=0"));
    let key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl eng";
    let (x, ok) = root.support(&format!("tunl-support/1 upgrade id={sid} {}", wire::b64(key.as_bytes())));
    assert!(ok && x == ["REJECTED reason=restricted", "OK"], "{x:?}");
    let (x, ok) = root.support(&format!("tunl-support/1 cancel id={sid}"));
    assert!(!ok && x[0].starts_with("ERR code=live"));
    // The customer ends it.
    customer.send("BYE reason=customer");
    assert_eq!(customer.exit(), Some(0));
    assert!(root.broker_gone(&sid));
    let (x, _) = root.support(&format!("tunl-support/1 close id={sid} reason=x"));
    assert!(x[0].starts_with("ERR code=closed"), "{x:?}");
}
