//! The broker over real unix sockets: a customer (as `produce` speaks to it) and viewers (as
//! `tunl-relay support join` speaks to it), each a real socket, the broker in its own thread.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tunl_relay::broker::{self, Broker, BrokerConfig, SessionSink};
use tunl_relay::hello::Hello;
use tunl_wire as wire;

const SID: &str = "swift-fox-jumps-barrel";

fn deadline() -> Instant {
    Instant::now() + Duration::from_secs(30)
}

struct Dir(PathBuf);
impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[derive(Clone, Default)]
struct Sink(Arc<Mutex<Vec<String>>>);
impl SessionSink for Sink {
    fn connected(&mut self, h: &Hello, state: &str, how: &str) {
        self.0.lock().unwrap().push(format!("connected {} {state} {how}", h.host));
    }
    fn refused(&mut self, h: &Hello, code: &str) {
        self.0.lock().unwrap().push(format!("refused {} {code}", h.host));
    }
    fn state(&mut self, s: &str) {
        self.0.lock().unwrap().push(format!("state {s}"));
    }
    fn viewers(&mut self, names: &[String]) {
        self.0.lock().unwrap().push(format!("viewers {}", names.join(",")));
    }
    fn tunnel_port(&mut self, port: Option<u16>) {
        self.0.lock().unwrap().push(format!("port {port:?}"));
    }
    fn ended(&mut self, word: &str, _why: &str) {
        self.0.lock().unwrap().push(format!("ended {word}"));
    }
    fn alive(&mut self, _: bool) -> bool {
        true
    }
}

struct Session {
    dir: Dir,
    run: PathBuf,
    sink: Sink,
    thread: Option<JoinHandle<std::io::Result<()>>>,
}

impl Session {
    fn start(restricted_only: bool) -> Session {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let dir = std::env::temp_dir().join(format!("tunl-broker-test-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let run = dir.join("run");
        let sink = Sink::default();
        let cfg = BrokerConfig {
            sid: SID.into(),
            run_dir: run.clone(),
            recording: dir.join("rec.cast"),
            audit: dir.join("audit.jsonl"),
            support_gid: None,
            restricted_only,
            case: "Case 7".into(),
            customer: "ACME".into(),
            linger: Duration::from_secs(60),
        };
        let s2 = sink.clone();
        let (tx, rx) = mpsc::channel();
        let thread = std::thread::spawn(move || {
            let b = Broker::bind(cfg, Box::new(s2));
            let b = match b {
                Ok(b) => {
                    tx.send(()).unwrap();
                    b
                }
                Err(e) => return Err(e),
            };
            b.run()
        });
        rx.recv_timeout(Duration::from_secs(10)).expect("broker bound");
        Session { dir: Dir(dir), run, sink, thread: Some(thread) }
    }

    fn customer(&self, hello: &str) -> Peer {
        let mut p = Peer::connect(&broker::customer_sock(&self.run));
        p.send(hello);
        p
    }

    fn welcomed(&self, resume: bool) -> Peer {
        let mut c = self.customer(&hello("share", resume));
        let w = c.next(deadline()).expect("an answer");
        assert!(w.starts_with("WELCOME proto=1 viewers="), "{w}");
        c
    }

    fn viewer(&self, ro: bool) -> Peer {
        let mut v = Peer::connect(&broker::support_sock(&self.run));
        v.send(&format!("HELLO role=join ro={}", u8::from(ro)));
        let j = v.next(deadline()).expect("JOINED");
        assert!(j.starts_with(&format!("JOINED id={SID} ")), "{j}");
        v
    }

    fn command(&self, line: &str) -> Peer {
        let mut v = Peer::connect(&broker::support_sock(&self.run));
        v.send("HELLO role=command");
        v.send(line);
        v
    }

    fn wait_ended(&mut self) -> bool {
        let t = self.thread.take().unwrap();
        let d = deadline();
        while !t.is_finished() {
            if Instant::now() > d {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        t.join().unwrap().unwrap();
        true
    }

    fn audit(&self) -> String {
        std::fs::read_to_string(self.dir.0.join("audit.jsonl")).unwrap_or_default()
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        // Ending the session through its own socket stops the broker thread.
        if let Some(t) = self.thread.take() {
            if let Ok(mut c) = UnixStream::connect(broker::support_sock(&self.run)) {
                let _ = c.write_all(b"HELLO role=command\nCLOSE reason=test\n");
            }
            let _ = t.join();
        }
    }
}

fn hello(mode: &str, resume: bool) -> String {
    format!(
        "linbit-tunl/1 id={SID} mode={mode} host=node1 user=root ips=192.0.2.1 case= client=0.1.0 size=80x24 resume={}",
        u8::from(resume)
    )
}

/// One end of a socket: lines read on a thread, so a test can wait with a deadline.
struct Peer {
    w: UnixStream,
    rx: Receiver<String>,
    seen: Vec<String>,
}

impl Peer {
    fn connect(path: &Path) -> Peer {
        let s = UnixStream::connect(path).unwrap();
        Self::from_stream(s)
    }
    fn from_stream(s: UnixStream) -> Peer {
        let r = s.try_clone().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut r = BufReader::new(r);
            let mut l = String::new();
            while r.read_line(&mut l).map(|n| n > 0).unwrap_or(false) {
                if tx.send(l.trim_end_matches('\n').to_string()).is_err() {
                    break;
                }
                l.clear();
            }
        });
        Peer { w: s, rx, seen: Vec::new() }
    }
    fn send(&mut self, l: &str) {
        self.w.write_all(format!("{l}\n").as_bytes()).unwrap();
    }
    fn next(&mut self, d: Instant) -> Option<String> {
        let l = self.rx.recv_timeout(d.saturating_duration_since(Instant::now())).ok()?;
        self.seen.push(l.clone());
        Some(l)
    }
    fn wait(&mut self, pred: impl Fn(&str) -> bool) -> String {
        let d = deadline();
        while let Some(l) = self.next(d) {
            if pred(&l) {
                return l;
            }
        }
        panic!("no such line; saw {:?}", self.seen.iter().map(|l| &l[..l.len().min(80)]).collect::<Vec<_>>());
    }
    fn wait_prefix(&mut self, p: &str) -> String {
        self.wait(|l| l.starts_with(p))
    }
    /// True once the other end closed the socket (and every line before it was read).
    fn wait_eof(&mut self) -> bool {
        let d = deadline();
        loop {
            match self.rx.recv_timeout(d.saturating_duration_since(Instant::now())) {
                Ok(l) => self.seen.push(l),
                Err(mpsc::RecvTimeoutError::Disconnected) => return true,
                Err(mpsc::RecvTimeoutError::Timeout) => return false,
            }
        }
    }
    /// No line matching `pred` arrives before a marker line that the test knows comes after it.
    fn none_before(&mut self, pred: impl Fn(&str) -> bool, marker: &str) {
        let l = self.wait(|l| pred(l) || l.starts_with(marker));
        assert!(l.starts_with(marker), "unexpected line {l}");
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.w.shutdown(std::net::Shutdown::Both);
    }
}

fn o_line(data: &[u8]) -> String {
    format!("O {}", wire::b64(data))
}

#[test]
fn fan_out_in_order_to_every_viewer() {
    let s = Session::start(false);
    let mut c = s.welcomed(false);
    let mut vs: Vec<Peer> = (0..3).map(|_| s.viewer(false)).collect();
    c.wait_prefix("REFRESH");
    c.wait(|l| l == "VIEWERS 3");
    c.send("SNAP size=80x24 c2NyZWVu");
    for i in 0..2000 {
        c.send(&o_line(format!("line {i}\n").as_bytes()));
    }
    for v in &mut vs {
        v.wait_prefix("SNAP size=80x24 ");
        for i in 0..2000 {
            let l = v.wait_prefix("O ");
            assert_eq!(l, o_line(format!("line {i}\n").as_bytes()));
        }
    }
    // A viewer joining later gets the last screen at once, and the customer a REFRESH.
    let mut late = s.viewer(true);
    late.wait_prefix("SNAP size=80x24 c2NyZWVu");
    let vl = late.wait_prefix("VIEWERS 4 ");
    assert!(vl.contains("names=root%2Croot%2Croot%2Croot"), "{vl}");
    c.wait_prefix("REFRESH");
    assert!(s.sink.0.lock().unwrap().iter().any(|e| e == "connected node1 share connected"));
    let rec = std::fs::read_to_string(s.dir.0.join("rec.cast")).unwrap();
    assert!(rec.starts_with("{") && rec.contains("\"line 1999\\n\""), "recording");
    assert!(s.audit().contains("\"ev\":\"join\""));
}

#[test]
fn a_viewer_that_does_not_read_is_dropped_and_slows_nobody() {
    let s = Session::start(false);
    let mut c = s.welcomed(false);
    let stuck = UnixStream::connect(broker::support_sock(&s.run)).unwrap();
    (&stuck).write_all(b"HELLO role=join ro=1\n").unwrap();
    let mut good = s.viewer(false);
    c.wait(|l| l == "VIEWERS 2");
    // 16 MiB of output in 32 KiB lines: four times the queue bound.
    let chunk = vec![b'x'; 32 * 1024];
    let line = o_line(&chunk);
    let started = Instant::now();
    // The good viewer keeps pace with the customer (at most 1 MiB behind, a quarter of its queue),
    // as a reading engineer does with a shell; without that a loaded test machine that starves the
    // reader thread for a few milliseconds would make it look slow too. The stuck one never reads.
    let delivered = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let writer = {
        let mut w = c.w.try_clone().unwrap();
        let line = line.clone();
        let delivered = delivered.clone();
        std::thread::spawn(move || {
            for i in 0..512 {
                let d = deadline();
                while i >= delivered.load(std::sync::atomic::Ordering::SeqCst) + 32 && Instant::now() < d {
                    std::thread::sleep(Duration::from_millis(1));
                }
                w.write_all(line.as_bytes()).unwrap();
                w.write_all(b"\n").unwrap();
            }
            w.write_all(b"PING 77\n").unwrap();
        })
    };
    let mut got = 0;
    while got < 512 {
        let l = good.wait_prefix("O ");
        assert_eq!(l.len(), line.len());
        got += 1;
        delivered.store(got, std::sync::atomic::Ordering::SeqCst);
    }
    writer.join().unwrap();
    c.wait(|l| l == "PONG 77");
    if !c.seen.iter().any(|l| l == "VIEWERS 1") {
        c.wait(|l| l == "VIEWERS 1");
    }
    assert!(started.elapsed() < Duration::from_secs(60));
    // The stuck viewer, read now: what fitted in its socket, then the reason if it fitted too
    // (the broker waits a grace period for it, not for ever), then the end.
    let mut stuck = Peer::from_stream(stuck);
    assert!(stuck.wait_eof());
    let outs: Vec<&String> = stuck.seen.iter().filter(|l| l.starts_with("O ")).collect();
    // Whole lines in order; only the one being written when the grace ran out may be cut.
    assert!(outs.len() < 512, "{} lines", outs.len());
    let (cut, whole) = outs.split_last().unwrap();
    assert!(whole.iter().all(|l| **l == line) && line.starts_with(cut.as_str()));
    let last = stuck.seen.last().unwrap();
    assert!(last.starts_with("O ") || last == "REFUSED what=O reason=slow", "{}", &last[..20]);
    // The others go on.
    c.send(&o_line(b"after"));
    assert_eq!(good.wait_prefix("O "), o_line(b"after"));
}

#[test]
fn restricted_session_is_enforced_by_the_broker() {
    let s = Session::start(true);
    let mut bad = s.customer(&hello("share", false));
    let e = bad.next(deadline()).unwrap();
    assert!(e.starts_with("ERROR code=mode-refused msg="), "{e}");
    assert!(bad.wait_eof());
    let mut c = s.customer(&hello("restricted", false));
    c.wait_prefix("WELCOME proto=1 viewers=0");
    let mut v = s.viewer(false);
    assert!(v.seen[0].contains(" mode=restricted "), "{}", v.seen[0]);
    v.send(&format!("K {}", wire::b64(b"rm -rf /\r")));
    assert_eq!(v.wait_prefix("REFUSED"), "REFUSED what=K reason=restricted");
    v.send(&format!("UPGRADE req=x1 {}", wire::b64(b"ssh-ed25519 AAAA x")));
    assert_eq!(v.wait_prefix("TUNNEL_REJECTED"), "TUNNEL_REJECTED req=x1 reason=restricted");
    assert_eq!(v.wait_prefix("REFUSED"), "REFUSED what=UPGRADE reason=restricted");
    // The customer saw neither; a chat after them arrives.
    v.send(&format!("CHAT {}", wire::b64(b"hello")));
    c.none_before(|l| l.starts_with("K ") || l.starts_with("UPGRADE"), "CHAT from=root ");
    // A one-shot upgrade is answered the same way, at once.
    let mut cmd = s.command(&format!("UPGRADE req=c1 {}", wire::b64(b"ssh-ed25519 AAAA x")));
    assert_eq!(cmd.wait_prefix("TUNNEL_REJECTED"), "TUNNEL_REJECTED req=c1 reason=restricted");
    assert_eq!(cmd.next(deadline()).as_deref(), Some("OK"));
}

#[test]
fn upgrades_are_answered_to_the_engineer_who_asked() {
    let s = Session::start(false);
    let mut c = s.welcomed(false);
    let mut a = s.viewer(false);
    let mut b = s.viewer(false);
    a.send(&format!("UPGRADE req=mine {}", wire::b64(b"ssh-ed25519 AAAA a")));
    let ua = c.wait_prefix("UPGRADE ");
    b.send(&format!("UPGRADE req=mine {}", wire::b64(b"ssh-ed25519 AAAA b")));
    let ub = c.wait_prefix("UPGRADE ");
    assert!(ua.starts_with("UPGRADE req=u1 from=root ") && ub.starts_with("UPGRADE req=u2 from=root "), "{ua} {ub}");
    assert!(ub.ends_with(&wire::b64(b"ssh-ed25519 AAAA b")));
    c.send("TUNNEL_OPEN req=u2 port=40022 user=root");
    assert_eq!(b.wait_prefix("TUNNEL_"), "TUNNEL_OPEN req=mine port=40022 user=root");
    c.send("TUNNEL_REJECTED req=u1 reason=denied");
    assert_eq!(a.wait_prefix("TUNNEL_"), "TUNNEL_REJECTED req=mine reason=denied");
    // A forged answer to a finished request reaches nobody.
    c.send("TUNNEL_OPEN req=u1 port=40023 user=root");
    c.send("STATE tunnel=active brb=0 mode=share");
    a.none_before(|l| l.starts_with("TUNNEL_OPEN"), "STATE tunnel=active");
    c.send("TUNNEL_CLOSED reason=revoked");
    a.wait(|l| l == "TUNNEL_CLOSED reason=revoked");
    b.send("REVOKE");
    c.wait(|l| l == "REVOKE");
    let events = s.sink.0.lock().unwrap().clone();
    assert!(events.contains(&"port Some(40022)".to_string()) && events.contains(&"state share+tunnel".to_string()));
    assert!(events.contains(&"port None".to_string()));
    let audit = s.audit();
    assert!(
        audit.contains("\"ev\":\"tunnel-open\"")
            && audit.contains("\"port\":40022")
            && audit.contains("\"ev\":\"revoke\"")
    );
    // A one-shot upgrade waits for the customer's answer.
    let mut cmd = s.command(&format!("UPGRADE req=c9 {}", wire::b64(b"ssh-ed25519 AAAA c")));
    let u = c.wait_prefix("UPGRADE ");
    assert!(u.starts_with("UPGRADE req=u3 "), "{u}");
    c.send("TUNNEL_OPEN req=u3 port=40030 user=root");
    assert_eq!(cmd.next(deadline()).as_deref(), Some("TUNNEL_OPEN req=c9 port=40030 user=root"));
    assert_eq!(cmd.next(deadline()).as_deref(), Some("OK"));
}

#[test]
fn keystrokes_chat_and_notes_are_routed_and_policed() {
    let s = Session::start(false);
    let mut c = s.welcomed(false);
    let mut rw = s.viewer(false);
    let mut ro = s.viewer(true);
    rw.send(&format!("K {}", wire::b64(b"ls\r")));
    c.wait(|l| l == format!("K {}", wire::b64(b"ls\r")));
    ro.send(&format!("K {}", wire::b64(b"rm\r")));
    assert_eq!(ro.wait_prefix("REFUSED"), "REFUSED what=K reason=read-only");
    c.send("STATE tunnel=confirm brb=1 mode=share");
    rw.wait_prefix("STATE tunnel=confirm brb=1");
    rw.send(&format!("K {}", wire::b64(b"x")));
    assert_eq!(rw.wait_prefix("REFUSED"), "REFUSED what=K reason=brb");
    c.send("STATE tunnel=confirm brb=0 mode=share");
    rw.wait_prefix("STATE tunnel=confirm brb=0");
    // More than 64 KiB in one go is over the rate.
    let big = vec![b'a'; 12 * 1024];
    for _ in 0..8 {
        rw.send(&format!("K {}", wire::b64(&big)));
    }
    assert_eq!(rw.wait_prefix("REFUSED"), "REFUSED what=K reason=limit");
    c.send(&format!("CHAT {}", wire::b64("grüß".as_bytes())));
    assert_eq!(ro.wait_prefix("CHAT "), format!("CHAT from=customer {}", wire::b64("grüß".as_bytes())));
    ro.send(&format!("CHAT {}", wire::b64(b"from ro")));
    c.wait(|l| l == format!("CHAT from=root {}", wire::b64(b"from ro")));
    rw.wait(|l| l == format!("CHAT from=root {}", wire::b64(b"from ro")));
    rw.send(&format!("NOTE {}", wire::b64(b"back in 5")));
    c.wait(|l| l == format!("NOTE {}", wire::b64(b"back in 5")));
    // Garbage is dropped, the connection stays, the next good line works.
    rw.send("K !!!");
    rw.send("FROB x=1");
    rw.send(&"A".repeat(300_000));
    rw.send("PING 5");
    assert_eq!(rw.wait_prefix("PONG"), "PONG 5");
    // A later viewer gets the note at once.
    let mut late = s.viewer(true);
    late.wait(|l| l == format!("NOTE {}", wire::b64(b"back in 5")));
    // The customer's garbage is dropped too.
    c.send("O not-base64");
    c.send("K aGk=");
    c.send(&o_line(b"fine"));
    late.wait(|l| l == o_line(b"fine"));
    drop(rw);
    drop(ro);
    c.wait(|l| l == "VIEWERS 1");
    let audit = s.audit();
    assert!(audit.contains("\"ev\":\"keys\"") && audit.contains("\"bytes\":"), "{audit}");
    assert!(audit.contains("\"text\":\"from ro\"") && audit.contains("\"ev\":\"leave\""));
}

#[test]
fn takeover_busy_and_link_state() {
    let s = Session::start(false);
    let mut first = s.welcomed(false);
    let mut v = s.viewer(false);
    let mut busy = s.customer(&hello("share", false));
    assert!(busy.next(deadline()).unwrap().starts_with("ERROR code=busy "));
    assert!(busy.wait_eof());
    let mut second = s.customer(&hello("share", true));
    assert_eq!(second.next(deadline()).as_deref(), Some("WELCOME proto=1 viewers=1"));
    assert!(first.wait_eof(), "the old link is closed");
    v.wait(|l| l == "LINK state=down");
    v.wait(|l| l == "LINK state=up");
    second.send(&o_line(b"again"));
    v.wait(|l| l == o_line(b"again"));
    // The customer's link drops: viewers stay, told; a resume brings it back.
    drop(second);
    v.wait(|l| l == "LINK state=down");
    let mut third = s.welcomed(true);
    v.wait(|l| l == "LINK state=up");
    third.send("BYE reason=customer");
    let closed = v.wait_prefix("CLOSED ");
    assert!(closed.starts_with("CLOSED reason=customer"), "{closed}");
    assert!(v.wait_eof());
    let mut s = s;
    assert!(s.wait_ended());
    let seen: Vec<String> = s.sink.0.lock().unwrap().iter().filter(|e| !e.starts_with("viewers ")).cloned().collect();
    assert_eq!(
        seen[..4],
        [
            "connected node1 share connected",
            "refused node1 busy",
            "connected node1 share takeover",
            "connected node1 share reconnected"
        ],
        "{seen:?}"
    );
    assert!(seen.iter().any(|e| e.starts_with("ended ")));
    let audit = s.audit();
    for ev in ["takeover", "refused", "link-down", "link-up", "bye", "end"] {
        assert!(audit.contains(&format!("\"ev\":\"{ev}\"")), "{ev}: {audit}");
    }
}

#[test]
fn close_from_support_ends_the_session() {
    let mut s = Session::start(false);
    let mut c = s.welcomed(false);
    let mut v = s.viewer(true);
    let mut cmd = s.command("CLOSE reason=done%20here");
    assert_eq!(cmd.next(deadline()).as_deref(), Some("OK"));
    c.wait(|l| l == "CLOSE reason=done%20here");
    v.wait_prefix("CLOSED reason=closed%20by%20root");
    assert!(c.wait_eof() && v.wait_eof());
    assert!(s.wait_ended());
    // A read-only viewer may not close, a bad opening line is answered and closed.
    assert!(!broker::support_sock(&s.run).exists());
}

#[test]
fn bad_openings_and_hellos_are_refused() {
    let s = Session::start(false);
    let mut p = Peer::connect(&broker::support_sock(&s.run));
    p.send("JOIN please");
    assert!(p.next(deadline()).unwrap().starts_with("ERR code=proto"));
    assert!(p.wait_eof());
    let mut c = s.customer("linbit-tunl/1 id=swift-fox-jumps-barrel mode=share");
    let e = c.next(deadline()).unwrap();
    assert!(e.starts_with("ERROR code=proto msg="), "{e}");
    let mut other = s.customer(&hello("share", false).replace(SID, "other-words-go-here"));
    assert!(other.next(deadline()).unwrap().starts_with("ERROR code=unknown-session"));
    let mut ro = s.viewer(true);
    ro.send("CLOSE reason=x");
    assert_eq!(ro.wait_prefix("REFUSED"), "REFUSED what=CLOSE reason=read-only");
    let mut cmd = s.command(&format!("K {}", wire::b64(b"x")));
    assert!(cmd.next(deadline()).unwrap().starts_with("ERR code=proto"));
}
