//! The customer's record (issue 14), end to end: a whole session in a real terminal (an outer
//! tmux), the test relay playing support, a second real sshd as the customer's SSH target. Then the
//! recording is read back: its output and marker events in order, the chat transcript beside it, and
//! stock asciinema plays it.

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;
use relay_double::json::{J, parse_json};
use relay_double::{SupportKey, TargetSshd, chat_line, line_field, note_line, support_login, unb64, upgrade_line};

/// One event of an asciicast v2 file.
#[derive(Debug)]
struct Event {
    t: f64,
    kind: String,
    data: String,
}

/// The header and the events of a recording; every line must be JSON of the v2 shape.
fn read_cast(path: &Path) -> (J, Vec<Event>) {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut lines = text.lines();
    let header = parse_json(lines.next().expect("empty recording")).expect("header is not JSON");
    let mut events = Vec::new();
    for l in lines {
        let Some(J::Arr(v)) = parse_json(l) else { panic!("event line is not a JSON array: {l:?}") };
        assert_eq!(v.len(), 3, "{l}");
        let (J::Num(t), J::Str(kind), J::Str(data)) = (&v[0], &v[1], &v[2]) else { panic!("{l}") };
        events.push(Event { t: *t, kind: kind.clone(), data: data.clone() });
    }
    (header, events)
}

/// Nothing in `s` can drive a terminal or reorder text: no control, no bidi, no format character.
fn inert(s: &str) -> bool {
    !s.chars().any(|c| {
        c.is_control()
            || ('\u{202a}'..='\u{202e}').contains(&c)
            || ('\u{2066}'..='\u{2069}').contains(&c)
            || matches!(c, '\u{200b}'..='\u{200f}' | '\u{061c}' | '\u{2028}' | '\u{2029}' | '\u{feff}')
    })
}

/// The deliberate grant in the popup: choose Grant (it has no key), then type the word.
fn grant(c: &Customer) {
    c.keys(&["Up", "Enter"]);
    assert!(c.wait_screen(secs(10), |s| s.contains("Type GRANT")), "no confirmation prompt\n{}", c.screen());
    for k in ["G", "R", "A", "N", "T", "Enter"] {
        c.keys(&[k]);
    }
}

fn popup_shown(s: &str) -> bool {
    s.contains("Tunnel request") && s.contains("asks to log in over SSH") && s.contains("(d)")
}

/// The answer (TUNNEL_OPEN / TUNNEL_REJECTED) to request `req`.
fn answer_to(conn: &mut Conn, req: &str) -> Option<String> {
    conn.wait_for(secs(20), |l| {
        (l.starts_with("TUNNEL_OPEN ") || l.starts_with("TUNNEL_REJECTED ")) && line_field(l, "req") == Some(req)
    })
}

fn wait_state(conn: &mut Conn, field: &str) -> bool {
    conn.wait_for(secs(15), |l| l.starts_with("STATE") && l.split(' ').any(|f| f == field)).is_some()
}

/// Run a shell command line on a pseudo-terminal of its own (util-linux `script`), its exit status
/// passed through; stdout holds what it printed on the terminal.
fn in_a_terminal(cmdline: &str) -> std::process::Output {
    Command::new("script")
        .args(["-q", "-e", "-c", cmdline, "/dev/null"])
        .stdin(std::process::Stdio::null())
        .output()
        .expect("script (util-linux) runs")
}

/// `BITS SHA256:FP COMMENT (TYPE)` of a public key file, as `ssh-keygen -lf` prints it.
fn fingerprint(pubfile: &Path) -> String {
    let out = Command::new("ssh-keygen").arg("-lf").arg(pubfile).output().expect("ssh-keygen");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[test]
fn the_recording_holds_every_session_event_in_order_and_plays_in_asciinema() {
    let relay = Relay::start(RelayOpts::default()).expect("test relay");
    let bed = Scratch::new("record");
    let ak = bed.path().join("authorized_keys");
    let target = TargetSshd::start(&ak).expect("target sshd");
    let keydir = bed.path().join("support");
    std::fs::create_dir_all(&keydir).unwrap();
    let key = SupportKey::generate(&keydir).expect("support key");
    let key_fp = fingerprint(&key.private_path.with_extension("pub"));
    assert!(key_fp.contains(" SHA256:"), "{key_fp}");
    let target_arg = format!("127.0.0.1:{}", target.port);
    let keys = format!("{}\n", key.public_line);

    let id = unique_id("record");
    let ak_env = ak.display().to_string();
    let (c, mut conn) =
        Customer::connect(&relay, &id, &["--target", &target_arg], &[("TUNL_AUTHKEYS_FILE", ak_env.as_str())]);

    // The shell's output, before anything else happens.
    c.type_line("echo BEFORE-$((20+1))");
    assert!(conn.wait_output(secs(15), |o| String::from_utf8_lossy(o).contains("BEFORE-21")), "{}", c.diag());

    // A second engineer joins.
    conn.send("VIEWERS 2");
    assert!(c.wait_screen(secs(15), |s| s.contains("viewers: 2")), "{}", c.diag());

    // Chat both ways; support's name and text carry escape sequences and a bidi override.
    c.keys(&["C-b", "c"]);
    assert!(poll_until(secs(15), || c.focus() == "chat"), "C-b c did not focus the chat\n{}", c.diag());
    let said = "hello from the customer, grüße";
    c.type_line(said);
    let line = conn.wait_verb(secs(15), "CHAT").unwrap_or_else(|| panic!("no CHAT: {:?}\n{}", conn.lines(), c.diag()));
    assert_eq!(unb64(line.split(' ').nth(1).unwrap()), Some(said.as_bytes().to_vec()), "{line}");
    conn.send(&chat_line("eng@linbit.com\x1b[31m", "\x1b[2Jlooking \u{202e}now\x07"));
    assert!(c.wait_screen(secs(15), |s| s.contains("^[[2Jlooking")), "support chat not shown\n{}", c.diag());

    // A note.
    conn.send(&note_line("checking the DRBD resources"));
    assert!(c.wait_screen(secs(15), |s| s.contains("checking the DRBD resources")), "{}", c.diag());

    // A tunnel request, denied.
    conn.send(&upgrade_line("p1", "eng@linbit.com", &keys));
    assert!(c.wait_screen(secs(20), popup_shown), "no popup\n{}", c.diag());
    c.keys(&["d"]);
    let ans = answer_to(&mut conn, "p1").unwrap_or_else(|| panic!("{:?}\n{}", conn.lines(), c.diag()));
    assert_eq!(line_field(&ans, "reason"), Some("denied"), "{ans}");
    assert!(c.wait_screen(secs(10), |s| !popup_shown(s)), "popup still shown\n{}", c.screen());

    // A second one, granted, and support logs in through it.
    conn.send(&upgrade_line("p2", "eng@linbit.com", &keys));
    assert!(c.wait_screen(secs(20), popup_shown), "no popup\n{}", c.diag());
    grant(&c);
    let open = answer_to(&mut conn, "p2").unwrap_or_else(|| panic!("{:?}\n{}", conn.lines(), c.diag()));
    assert!(open.starts_with("TUNNEL_OPEN "), "{open}\n{}", c.diag());
    let port: u16 = line_field(&open, "port").and_then(|p| p.parse().ok()).expect("port");
    let login = support_login(port, &key, "root", "echo TUNNEL-LOGIN-OK").expect("ssh runs");
    assert!(String::from_utf8_lossy(&login.stdout).contains("TUNNEL-LOGIN-OK"), "{}", target.log());

    // The customer revokes it (BRB is refused while a tunnel is open).
    c.keys(&["C-b", "U"]);
    let closed = conn.wait_verb(secs(20), "TUNNEL_CLOSED").unwrap_or_else(|| panic!("{:?}", conn.lines()));
    assert_eq!(line_field(&closed, "reason"), Some("revoked"), "{closed}");
    assert!(wait_state(&mut conn, "tunnel=confirm"), "{:?}", conn.lines());

    // The engineer leaves; then the link drops and comes back.
    conn.send("VIEWERS 1");
    assert!(c.wait_screen(secs(15), |s| s.contains("viewers: 1")), "{}", c.diag());
    conn.drop_link();
    let mut conn = relay.accept(secs(40)).unwrap_or_else(|| panic!("no reconnect\n{}", c.diag()));
    assert_eq!(conn.hello_field("resume"), Some("1"));
    conn.welcome(1);
    assert!(conn.wait_verb(secs(15), "STATE").is_some(), "{:?}", conn.lines());

    // BRB on and off, from the chat pane.
    assert!(poll_until(secs(15), || c.focus() == "chat"), "the chat lost the focus\n{}", c.diag());
    c.type_line("/brb");
    assert!(wait_state(&mut conn, "brb=1"), "no STATE brb=1: {:?}", conn.lines());
    c.type_line("/back");
    assert!(wait_state(&mut conn, "brb=0"), "no STATE brb=0: {:?}", conn.lines());

    // More shell output, then Ctrl-b Q.
    c.keys(&["C-b", "c"]);
    assert!(poll_until(secs(15), || c.focus() == "shell"), "C-b c did not focus the shell\n{}", c.diag());
    c.type_line("echo AFTER-$((40+2))");
    assert!(conn.wait_output(secs(15), |o| String::from_utf8_lossy(o).contains("AFTER-42")), "{}", c.diag());
    c.keys(&["C-b", "Q"]);
    assert_eq!(c.wait_status(secs(30)), Some(0), "{}", c.diag());
    assert!(conn.wait_for(secs(15), |l| l == "BYE reason=customer").is_some(), "{:?}", conn.lines());

    // ---- the recording ----
    let rec = c.recording_path().unwrap_or_else(|| panic!("no recording path printed:\n{}", c.history()));
    let (header, events) = read_cast(&rec);
    assert_eq!(header.get("version"), Some(&J::Num(2.0)), "{header:?}");
    let mut last = 0.0;
    for e in &events {
        assert!(e.t >= last, "time goes backwards at {e:?}");
        last = e.t;
        assert!(["o", "r", "m"].contains(&e.kind.as_str()), "{e:?}");
        if e.kind == "m" {
            assert!(inert(&e.data), "a marker a player or terminal could obey: {:?}", e.data);
        }
    }
    let target_words = format!("log in as root on {target_arg}; keys: {key_fp}");
    let expected: Vec<String> = vec![
        "relay connected (viewers: 1)".into(),
        "o:BEFORE-21".into(),
        "viewers: 2 (1 joined)".into(),
        format!("chat customer: {said}"),
        "chat support (eng@linbit.com^[[31m): ^[[2Jlooking \u{FFFD}now^G".into(),
        "note: checking the DRBD resources".into(),
        format!("tunnel request p1 from eng@linbit.com: {target_words}"),
        "tunnel request p1 from eng@linbit.com: denied".into(),
        format!("tunnel request p2 from eng@linbit.com: {target_words}"),
        format!("tunnel forward open on relay port {port}"),
        format!("tunnel request p2 from eng@linbit.com: granted, relay port {port}"),
        "tunnel revoke by the customer: requests are now asked for one by one".into(),
        "support keys removed from authorized_keys".into(),
        "tunnel closed: revoked by the customer".into(),
        "viewers: 1 (1 left)".into(),
        // Why: as ssh's end was seen first (the relay closed the connection, or ssh ended).
        "relay disconnected: *".into(),
        "relay reconnected (viewers: 1)".into(),
        "BRB on: support keystrokes paused".into(),
        "BRB off: support can type again".into(),
        "o:AFTER-42".into(),
        "session end: the customer ended it".into(),
    ];
    // The markers are exactly these, in this order, and the shell's output sits between them where
    // it happened: the output between two markers is one stretch, in which the echoes are found.
    let mut seen: Vec<String> = Vec::new();
    let mut stretch = String::new();
    let end_stretch = |stretch: &mut String, seen: &mut Vec<String>| {
        for echo in ["BEFORE-21", "AFTER-42"] {
            if stretch.contains(echo) {
                seen.push(format!("o:{echo}"));
            }
        }
        stretch.clear();
    };
    for e in &events {
        match e.kind.as_str() {
            "o" => stretch.push_str(&e.data),
            "m" => {
                end_stretch(&mut stretch, &mut seen);
                let why = e.data.strip_prefix("relay disconnected: ").filter(|w| !w.is_empty());
                seen.push(if why.is_some() { "relay disconnected: *".into() } else { e.data.clone() });
            }
            _ => {}
        }
    }
    end_stretch(&mut stretch, &mut seen);
    assert_eq!(seen, expected, "the recording's events, in order");

    // ---- the transcript beside it ----
    let chat: PathBuf = rec.with_extension("chat.txt");
    assert!(c.history().contains(&format!("chat transcript: {}", chat.display())), "{}", c.history());
    let (cm, tm) = (std::fs::metadata(&rec).unwrap(), std::fs::metadata(&chat).unwrap());
    assert_eq!(tm.permissions().mode() & 0o777, 0o600, "the transcript's mode");
    assert_eq!((tm.uid(), tm.gid()), (cm.uid(), cm.gid()), "the transcript's owner differs from the recording's");
    let transcript = std::fs::read_to_string(&chat).unwrap();
    let lines: Vec<&str> = transcript.lines().collect();
    assert_eq!(lines.len(), 4, "{transcript}");
    assert!(lines[0].starts_with("# linbit-tunl chat transcript for "), "{transcript}");
    let bodies = [
        format!("customer: {said}"),
        "support (eng@linbit.com^[[31m): ^[[2Jlooking \u{FFFD}now^G".to_string(),
        "support note: checking the DRBD resources".to_string(),
    ];
    for (line, body) in lines[1..].iter().zip(&bodies) {
        // 2026-11-26T15:30:00Z
        let (stamp, rest) = line.split_once(' ').unwrap_or_else(|| panic!("{line}"));
        assert_eq!(stamp.len(), 20, "{line}");
        assert!(stamp.ends_with('Z') && stamp.as_bytes()[10] == b'T', "{line}");
        assert_eq!(rest, body, "{transcript}");
        assert!(inert(line), "{line:?}");
    }

    // ---- stock asciinema reads it ----
    // Both commands want a terminal (/dev/tty): `script` gives them one.
    let cat = in_a_terminal(&format!("asciinema cat {}", sh_quote(&rec.display().to_string())));
    assert!(cat.status.success(), "asciinema cat failed: {}", String::from_utf8_lossy(&cat.stdout));
    let shown = String::from_utf8_lossy(&cat.stdout);
    assert!(shown.contains("BEFORE-21") && shown.contains("AFTER-42"), "{shown}");
    // The README's replay, with the idle cap short enough for a test.
    let play = in_a_terminal(&format!("asciinema play -i 0.01 {}", sh_quote(&rec.display().to_string())));
    assert!(play.status.success(), "asciinema play failed: {}", String::from_utf8_lossy(&play.stdout));
    assert!(String::from_utf8_lossy(&play.stdout).contains("AFTER-42"));
    c.assert_clean();
}

/// The disk under the recording fills up: the recording and the transcript stop where their last
/// whole line ended (both still readable, the recording still plays), the customer is told once,
/// and the session goes on.
#[test]
fn a_full_disk_stops_the_record_tells_the_customer_once_and_the_session_goes_on() {
    let relay = Relay::start(RelayOpts::default()).expect("test relay");
    let bed = Scratch::new("recfull");
    let fs = TinyFs::mount(0o700, &bed.path().join("tiny"));
    let dir = fs.0.display().to_string();
    let id = unique_id("recfull");
    let (c, mut conn) = Customer::connect(&relay, &id, &[], &[("TUNL_RECORDING_DIR", dir.as_str())]);
    conn.send(&chat_line("eng", "before the disk filled"));
    assert!(c.wait_screen(secs(15), |s| s.contains("support (eng): before the disk filled")), "{}", c.diag());

    fs.fill();
    // More output than the recording's last page of the disk can take.
    c.type_line("seq 100000 102000; echo FILLED-$((3*3))");
    assert!(conn.wait_output(secs(20), |o| String::from_utf8_lossy(o).contains("FILLED-9")), "{}", c.diag());
    let told = "recording stopped: cannot write";
    assert!(c.wait_screen(secs(15), |s| s.contains(told)), "the customer was not told\n{}", c.diag());

    // The session goes on: the shell, support's chat, the customer's chat; nobody is told again.
    c.type_line("echo STILL-$((40+2))");
    assert!(conn.wait_output(secs(15), |o| String::from_utf8_lossy(o).contains("STILL-42")), "{}", c.diag());
    conn.send(&chat_line("eng", "still here"));
    assert!(c.wait_screen(secs(15), |s| s.contains("support (eng): still here")), "{}", c.diag());
    conn.send("VIEWERS 3");
    assert!(c.wait_screen(secs(15), |s| s.contains("viewers: 3")), "{}", c.diag());
    let log = std::fs::read_to_string(c.dir.join("debug.log")).unwrap_or_default();
    assert_eq!(log.matches("recording stopped").count(), 1, "{log}");
    assert_eq!(c.screen().matches(told).count(), 1, "{}", c.screen());
    assert!(log.contains("No space left on device"), "{log}");

    c.keys(&["C-b", "Q"]);
    assert_eq!(c.wait_status(secs(30)), Some(0), "{}", c.diag());

    // What was written before stays whole: every line of both files complete.
    let rec = c.recording_path().unwrap_or_else(|| panic!("no recording path printed:\n{}", c.history()));
    assert!(rec.starts_with(&fs.0), "{}", rec.display());
    let raw = std::fs::read_to_string(&rec).unwrap();
    assert!(raw.ends_with('\n'), "a torn last line: {:?}", &raw[raw.len().saturating_sub(80)..]);
    let (_, events) = read_cast(&rec);
    let markers: Vec<&str> = events.iter().filter(|e| e.kind == "m").map(|e| e.data.as_str()).collect();
    assert_eq!(markers[..2], ["relay connected (viewers: 1)", "chat support (eng): before the disk filled"]);
    assert!(!raw.contains("still here") && !raw.contains("STILL-42"), "written after the failure");
    let cat = in_a_terminal(&format!("asciinema cat {}", sh_quote(&rec.display().to_string())));
    assert!(cat.status.success(), "asciinema cat failed: {}", String::from_utf8_lossy(&cat.stdout));
    let transcript = std::fs::read_to_string(rec.with_extension("chat.txt")).unwrap();
    let lines: Vec<&str> = transcript.lines().collect();
    assert!(transcript.ends_with('\n') && lines.len() == 2, "{transcript}");
    assert!(lines[1].ends_with(" support (eng): before the disk filled"), "{transcript}");
    drop(c);
}

/// The markers of a recording, in order.
fn markers_of(rec: &Path) -> Vec<String> {
    let (_, events) = read_cast(rec);
    events.into_iter().filter(|e| e.kind == "m").map(|e| e.data).collect()
}

/// The answers that need no popup (blocked, a pre-grant, BRB), support's revoke, and an end by
/// signal, as the recording tells them.
#[test]
fn answers_without_a_popup_support_s_revoke_and_a_signal_are_recorded() {
    let relay = Relay::start(RelayOpts::default()).expect("test relay");
    let bed = Scratch::new("recans");
    let ak = bed.path().join("authorized_keys");
    let target = TargetSshd::start(&ak).expect("target sshd");
    let keydir = bed.path().join("support");
    std::fs::create_dir_all(&keydir).unwrap();
    let key = SupportKey::generate(&keydir).expect("support key");
    let keys = format!("{}\n", key.public_line);
    let target_arg = format!("127.0.0.1:{}", target.port);
    let id = unique_id("recans");
    let ak_env = ak.display().to_string();
    let (c, mut conn) =
        Customer::connect(&relay, &id, &["--target", &target_arg], &[("TUNL_AUTHKEYS_FILE", ak_env.as_str())]);

    c.keys(&["C-b", "X"]);
    assert!(wait_state(&mut conn, "tunnel=blocked"), "{:?}\n{}", conn.lines(), c.diag());
    conn.send(&upgrade_line("b1", "eng", &keys));
    assert_eq!(answer_to(&mut conn, "b1").as_deref().and_then(|a| line_field(a, "reason")), Some("blocked"));
    c.keys(&["C-b", "u"]);
    assert!(wait_state(&mut conn, "tunnel=confirm"), "{:?}", conn.lines());
    c.keys(&["C-b", "u"]);
    assert!(wait_state(&mut conn, "tunnel=allowed"), "{:?}", conn.lines());
    conn.send(&upgrade_line("b2", "eng", &keys));
    let open = answer_to(&mut conn, "b2").unwrap_or_else(|| panic!("{:?}\n{}", conn.lines(), c.diag()));
    let port: u16 = line_field(&open, "port").and_then(|p| p.parse().ok()).unwrap_or_else(|| panic!("{open}"));
    conn.send("REVOKE");
    let closed = conn.wait_verb(secs(20), "TUNNEL_CLOSED").unwrap_or_else(|| panic!("{:?}", conn.lines()));
    assert_eq!(line_field(&closed, "reason"), Some("relay"), "{closed}");
    // Support being done does not undo the customer's pre-grant.
    assert!(wait_state(&mut conn, "tunnel=allowed"), "{:?}", conn.lines());
    c.keys(&["C-b", "c"]);
    assert!(poll_until(secs(15), || c.focus() == "chat"), "{}", c.diag());
    c.type_line("/brb");
    assert!(wait_state(&mut conn, "brb=1"), "{:?}", conn.lines());
    conn.send(&upgrade_line("b3", "eng", &keys));
    assert_eq!(answer_to(&mut conn, "b3").as_deref().and_then(|a| line_field(a, "reason")), Some("brb"));
    let pid = c.daemon_pid().expect("daemon.pid");
    assert!(Command::new("kill").args(["-TERM", &pid.to_string()]).status().unwrap().success());
    assert_eq!(c.wait_status(secs(30)), Some(143), "{}", c.diag());

    let rec = c.recording_path().unwrap_or_else(|| panic!("no recording path printed:\n{}", c.history()));
    let request = |req: &str| format!("tunnel request {req} from eng: log in as root on {target_arg}; keys: ");
    let got = markers_of(&rec);
    let mut it = got.iter();
    for want in [
        "relay connected (viewers: 1)".to_string(),
        "tunnel block by the customer: requests are now blocked".into(),
        request("b1"),
        "tunnel request b1 from eng: blocked".into(),
        "tunnel grant by the customer: requests are now asked for one by one".into(),
        "tunnel grant by the customer: requests are now granted without asking".into(),
        request("b2"),
        format!("tunnel forward open on relay port {port}"),
        format!("tunnel request b2 from eng: granted, relay port {port}"),
        "support keys removed from authorized_keys".into(),
        "tunnel closed: revoked by support".into(),
        "BRB on: support keystrokes paused".into(),
        request("b3"),
        "tunnel request b3 from eng: brb".into(),
        "session end: SIGTERM".into(),
    ] {
        assert!(it.any(|m| m.starts_with(&want)), "no {want:?} (in order) among {got:#?}");
    }
    assert_eq!(got.last().map(String::as_str), Some("session end: SIGTERM"), "{got:#?}");
}

/// Watch-only: a request is refused `restricted` before anyone is asked, and recorded all the
/// same; support's CLOSE ends the session with its reason in the last marker.
#[test]
fn a_restricted_refusal_and_support_s_close_are_recorded() {
    let relay = Relay::start(RelayOpts::default()).expect("test relay");
    let id = unique_id("recrestr");
    let (c, mut conn) = Customer::connect(&relay, &id, &["--restricted"], &[]);
    let keydir = c.scratch.path().join("support");
    std::fs::create_dir_all(&keydir).unwrap();
    let key = SupportKey::generate(&keydir).expect("support key");
    let fp = fingerprint(&key.private_path.with_extension("pub"));
    conn.send(&upgrade_line("x1", "eng\u{202e}moc", &format!("{}\n", key.public_line)));
    assert_eq!(answer_to(&mut conn, "x1").as_deref().and_then(|a| line_field(a, "reason")), Some("restricted"));
    conn.send(&relay_double::close_line("all done, thanks\x1b[2J"));
    assert_eq!(c.wait_status(secs(30)), Some(0), "{}", c.diag());

    let rec = c.recording_path().unwrap_or_else(|| panic!("no recording path printed:\n{}", c.history()));
    assert_eq!(
        markers_of(&rec),
        [
            "relay connected (viewers: 1)".to_string(),
            format!("tunnel request x1 from eng\u{FFFD}moc: log in as root on localhost:22; keys: {fp}"),
            "tunnel request x1 from eng\u{FFFD}moc: restricted".into(),
            "session end: support ended it (all done, thanks^[[2J)".into(),
        ]
    );
}
