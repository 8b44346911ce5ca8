//! The link to the relay, end to end: the real binary in `--tunnel` mode without tmux, the real
//! ssh client, the test relay's real sshd and HTTPS signing endpoint.

mod common;

use common::*;
use relay_double::{SignMode, line_field};

const TOKEN: &str = "424242";

fn relay() -> Relay {
    Relay::start(RelayOpts::default()).expect("test relay")
}

/// Start a session with a token (certificate path) and complete the hello.
fn connected(relay: &Relay, id: &str, scratch: &Scratch, extra: &[&str]) -> (Foreground, Conn) {
    relay.register(id, Some(TOKEN));
    let mut args = vec!["--tunnel", "--token", TOKEN];
    args.extend_from_slice(extra);
    let fg = Foreground::start(relay, id, &args, &[], scratch);
    let mut conn = relay.accept(secs(30)).unwrap_or_else(|| panic!("no session at the relay: {}", fg.stderr_text()));
    conn.welcome(0);
    assert!(conn.wait_verb(secs(10), "STATE").is_some(), "no STATE after WELCOME: {:?}", conn.lines());
    (fg, conn)
}

#[test]
fn certificate_path_sends_the_exact_hello_and_runs() {
    let relay = relay();
    let scratch = Scratch::new("cert");
    let id = unique_id("cert");
    let (mut fg, mut conn) = connected(&relay, &id, &scratch, &["--case", "CASE 4711/ü", "--user", "root"]);
    let hello = conn.hello_raw().to_string();
    assert!(hello.starts_with("linbit-tunl/1 "), "{hello}");
    assert_eq!(conn.hello_field("id"), Some(id.as_str()));
    assert_eq!(conn.hello_field("mode"), Some("tunnel"));
    assert_eq!(conn.hello_field("user"), Some("root"));
    assert_eq!(conn.hello_field("case"), Some("CASE%204711%2F%C3%BC"));
    assert_eq!(conn.hello_field("client"), Some(env!("CARGO_PKG_VERSION")));
    assert_eq!(conn.hello_field("size"), Some("0x0"));
    assert_eq!(conn.hello_field("resume"), Some("0"));
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
    assert_eq!(conn.hello_field("host"), Some(host.trim().split('.').next().unwrap()));
    let ips = conn.hello_field("ips").expect("ips field");
    assert!(ips.split(',').all(|ip| !ip.starts_with("127.") && ip != "::1"), "{ips}");
    // Every field of the contract is there, in the contract's order.
    let keys: Vec<&str> = hello.split(' ').skip(1).map(|f| f.split('=').next().unwrap()).collect();
    assert_eq!(keys, ["id", "mode", "host", "user", "ips", "case", "client", "size", "resume"]);
    // Exactly one signing request, with our token and a real public key.
    let reqs = relay.sign_requests();
    assert_eq!(reqs.len(), 1);
    assert_eq!(reqs[0].token, TOKEN);
    assert!(reqs[0].public_key.starts_with("ssh-ed25519 "));
    // The session runs: a PING is answered.
    conn.send("PING 7");
    assert!(conn.wait_for(secs(10), |l| l == "PONG 7").is_some(), "{:?}", conn.lines());
    let st = conn.lines().into_iter().find(|l| l.starts_with("STATE")).unwrap();
    assert_eq!(line_field(&st, "mode"), Some("tunnel"));
    // SIGTERM ends it orderly: BYE, status 143, nothing left.
    fg.signal("TERM");
    assert!(conn.wait_verb(secs(10), "BYE").is_some(), "{:?}", conn.lines());
    assert_eq!(fg.wait(secs(15)), Some(143), "{}", fg.stderr_text());
    assert!(!session_dir(&id).exists(), "session directory left behind");
    assert!(wait_no_processes(&session_dir(&id).display().to_string(), secs(5)).is_empty());
}

#[test]
fn sigint_gives_130() {
    let relay = relay();
    let scratch = Scratch::new("int");
    let id = unique_id("sigint");
    let (mut fg, mut conn) = connected(&relay, &id, &scratch, &[]);
    fg.signal("INT");
    assert!(conn.wait_for(secs(10), |l| l == "BYE reason=signal").is_some(), "{:?}", conn.lines());
    assert_eq!(fg.wait(secs(15)), Some(130), "{}", fg.stderr_text());
}

#[test]
fn relay_close_ends_with_zero() {
    let relay = relay();
    let scratch = Scratch::new("close");
    let id = unique_id("close");
    let (mut fg, mut conn) = connected(&relay, &id, &scratch, &[]);
    conn.send(&relay_double::close_line("case solved"));
    assert!(conn.wait_for(secs(10), |l| l == "BYE reason=relay-close").is_some(), "{:?}", conn.lines());
    assert_eq!(fg.wait(secs(15)), Some(0), "{}", fg.stderr_text());
    assert!(fg.stderr_text().contains("case solved"));
}

#[test]
fn keyboard_interactive_with_the_session_id_and_with_the_token() {
    if !relay_double::ki_supported() {
        eprintln!("skipped: keyboard-interactive needs root and a writable /etc/pam.d");
        return;
    }
    let relay = Relay::start(RelayOpts { ki: true, api_down: true, ..Default::default() }).unwrap();
    let scratch = Scratch::new("ki");
    // No token: the session ID answers the prompt.
    let id = unique_id("kisid");
    relay.register(&id, None);
    let mut fg = Foreground::start(&relay, &id, &["--tunnel"], &[], &scratch);
    let mut conn = relay.accept(secs(30)).unwrap_or_else(|| panic!("no session: {}", fg.diag()));
    assert_eq!(conn.hello_field("id"), Some(id.as_str()));
    conn.welcome(0);
    assert!(conn.wait_verb(secs(10), "STATE").is_some());
    assert!(!std::fs::read_to_string(session_dir(&id).join("askpass.sh")).unwrap().is_empty());
    fg.signal("TERM");
    assert_eq!(fg.wait(secs(15)), Some(143));

    // A token and an unreachable API: the token answers the prompt.
    let id2 = unique_id("kitok");
    relay.register(&id2, Some("135790"));
    let mut fg2 = Foreground::start(&relay, &id2, &["--tunnel", "--token", "135790"], &[], &scratch);
    let mut conn2 = relay.accept(secs(40)).unwrap_or_else(|| panic!("no session: {}", fg2.diag()));
    conn2.welcome(0);
    assert!(conn2.wait_verb(secs(10), "STATE").is_some());
    assert!(fg2.stderr_text().contains("unreachable"), "{}", fg2.stderr_text());
    // The secret is in the askpass helper only: never on a command line.
    // (The customer's own `--token` argument is theirs; none of the programs we start may carry it.)
    let token_on_cmdline: Vec<String> = processes_mentioning("135790")
        .into_iter()
        .filter(|p| !p.contains(&format!("{BIN} --tunnel --token")))
        .collect();
    assert!(token_on_cmdline.is_empty(), "{token_on_cmdline:?}");
    fg2.signal("TERM");
    assert_eq!(fg2.wait(secs(15)), Some(143));
}

#[test]
fn wrong_keyboard_interactive_answer_is_refused() {
    if !relay_double::ki_supported() {
        eprintln!("skipped: keyboard-interactive needs root and a writable /etc/pam.d");
        return;
    }
    let relay = Relay::start(RelayOpts { ki: true, api_down: true, ..Default::default() }).unwrap();
    let scratch = Scratch::new("kibad");
    let id = unique_id("kibad");
    // Not registered: the relay refuses the session ID.
    let mut fg = Foreground::start(&relay, &id, &["--tunnel"], &[], &scratch);
    assert_eq!(fg.wait(secs(40)), Some(1), "{}", fg.stderr_text());
    let err = fg.stderr_text();
    assert!(err.contains("cannot connect to the relay"), "{err}");
    assert!(relay.accept(secs(1)).is_none());
}

#[test]
fn api_rejection_is_fatal_without_retry_storm() {
    let relay = relay();
    let scratch = Scratch::new("403");
    let id = unique_id("forbid");
    relay.register(&id, Some(TOKEN));
    relay.set_sign_mode(SignMode::Status(403));
    let mut fg = Foreground::start(&relay, &id, &["--tunnel", "--token", TOKEN], &[], &scratch);
    assert_eq!(fg.wait(secs(30)), Some(1), "{}", fg.stderr_text());
    let err = fg.stderr_text();
    assert!(err.contains("certificate signing failed"), "{err}");
    assert!(!err.contains(TOKEN), "the token must never be shown: {err}");
    assert_eq!(relay.sign_requests().len(), 1, "no retries on 403");
    assert!(relay.accept(secs(1)).is_none(), "nothing may reach the relay");
}

#[test]
fn forged_certificates_are_refused_before_connecting() {
    let relay = relay();
    let scratch = Scratch::new("forged");
    for (mode, needle) in [
        (SignMode::OtherCa, "CA"),
        (SignMode::OtherKey, "key"),
        (SignMode::Expired, "expired"),
        (SignMode::WrongPrincipal, "not for the relay user"),
        (SignMode::GarbageCert, "certificate"),
    ] {
        let id = unique_id("forged");
        relay.register(&id, Some(TOKEN));
        relay.set_sign_mode(mode);
        let mut fg = Foreground::start(&relay, &id, &["--tunnel", "--token", TOKEN], &[], &scratch);
        assert_eq!(fg.wait(secs(30)), Some(1), "{mode:?}: {}", fg.stderr_text());
        let err = fg.stderr_text();
        assert!(err.contains(needle), "{mode:?}: {err}");
        assert!(relay.accept(secs(1)).is_none(), "{mode:?}: nothing may reach the relay");
    }
}

#[test]
fn relay_host_certificate_from_another_ca_is_refused() {
    let relay = Relay::start(RelayOpts { host_cert_other_ca: true, ..Default::default() }).unwrap();
    let scratch = Scratch::new("hostca");
    let id = unique_id("hostca");
    relay.register(&id, Some(TOKEN));
    let mut fg = Foreground::start(&relay, &id, &["--tunnel", "--token", TOKEN], &[], &scratch);
    assert_eq!(fg.wait(secs(40)), Some(1), "{}", fg.stderr_text());
    let err = fg.stderr_text();
    assert!(err.contains("Host key verification failed"), "{err}");
    assert!(relay.accept(secs(1)).is_none());
}

#[test]
fn relay_error_is_shown_and_fatal() {
    let relay = relay();
    let scratch = Scratch::new("err");
    let id = unique_id("error");
    relay.register(&id, Some(TOKEN));
    let mut fg = Foreground::start(&relay, &id, &["--tunnel", "--token", TOKEN], &[], &scratch);
    let mut conn = relay.accept(secs(30)).expect("session");
    conn.error("unknown-session", "no such session: ask support for a new ID");
    assert_eq!(fg.wait(secs(20)), Some(1), "{}", fg.stderr_text());
    let err = fg.stderr_text();
    assert!(err.contains("unknown-session"), "{err}");
    assert!(err.contains("no such session: ask support for a new ID"), "{err}");
    assert!(relay.accept(secs(2)).is_none(), "no retry after a fatal ERROR");
}

#[test]
fn dropped_link_reconnects_with_resume_and_no_token() {
    let relay = relay();
    let scratch = Scratch::new("drop");
    let id = unique_id("resume");
    let (mut fg, conn) = connected(&relay, &id, &scratch, &[]);
    conn.drop_link();
    // Back-off starts at 1 s (plus jitter): well within 15 s.
    let mut again = relay.accept(secs(15)).unwrap_or_else(|| panic!("no reconnect: {}", fg.stderr_text()));
    assert_eq!(again.hello_field("resume"), Some("1"));
    assert_eq!(again.hello_field("id"), Some(id.as_str()));
    assert_eq!(relay.sign_requests().len(), 1, "the token is never used again");
    again.welcome(2);
    assert!(again.wait_verb(secs(10), "STATE").is_some());
    assert!(fg.wait_stderr(secs(5), "reconnecting"), "{}", fg.stderr_text());
    fg.signal("TERM");
    assert_eq!(fg.wait(secs(15)), Some(143));
}

#[test]
fn hostile_relay_lines_are_dropped_and_logged() {
    let relay = relay();
    let scratch = Scratch::new("hostile");
    let id = unique_id("hostile");
    let (mut fg, mut conn) = connected(&relay, &id, &scratch, &["--debug"]);
    let secret_keys = "c2VjcmV0LWtleXN0cm9rZXM="; // base64("secret-keystrokes")
    conn.send_raw(b"\x1b]52;c;aGk=\x07garbage\n");
    conn.send("FROBNICATE now");
    conn.send(&format!("K {}", "A".repeat(300 * 1024)));
    conn.send("K not*base64");
    conn.send("VIEWERS -1");
    conn.send(&format!("K {secret_keys}"));
    conn.send("CHAT from=x%1B%5B2J bad");
    conn.send("PING 99");
    assert!(conn.wait_for(secs(10), |l| l == "PONG 99").is_some(), "the session goes on: {:?}", conn.lines());
    let log = fg.ssh_log();
    assert!(log.contains("dropped FROBNICATE"), "{log}");
    assert!(log.matches("dropped").count() >= 6, "{log}");
    assert!(!log.contains(secret_keys), "K payload in the log");
    assert!(!log.contains("secret-keystrokes"));
    assert!(!log.contains(&"A".repeat(100)), "a huge line was logged");
    assert!(!log.contains('\x1b'), "raw escape in the log");
    fg.signal("TERM");
    assert_eq!(fg.wait(secs(15)), Some(143));
    assert!(session_dir(&id).exists(), "--debug keeps the directory");
    let _ = std::fs::remove_dir_all(session_dir(&id));
}

#[test]
fn idle_session_does_not_busy_wait() {
    let relay = relay();
    let scratch = Scratch::new("idle");
    let id = unique_id("idle");
    let (mut fg, mut conn) = connected(&relay, &id, &scratch, &[]);
    let pid = fg.child.id();
    let ticks = |pid: u32| -> u64 {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
        let rest = &stat[stat.rfind(')').unwrap() + 2..];
        let f: Vec<&str> = rest.split(' ').collect();
        f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
    };
    let switches = |pid: u32| -> u64 {
        let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        s.lines()
            .find(|l| l.starts_with("voluntary_ctxt_switches"))
            .unwrap()
            .split_whitespace()
            .nth(1)
            .unwrap()
            .parse()
            .unwrap()
    };
    let (t0, s0) = (ticks(pid), switches(pid));
    // 60 s of an idle session: the client's only traffic is its heartbeat.
    let end = secs(60);
    let mut pings = 0;
    while std::time::Instant::now() < end {
        if let Some(l) = conn.recv_line(end) {
            if l.starts_with("PING ") {
                pings += 1;
            }
        }
    }
    let (t1, s1) = (ticks(pid), switches(pid));
    // Clock ticks are 10 ms: a busy loop would burn thousands; timers and pings need a handful.
    assert!(t1 - t0 <= 10, "{} ticks of CPU in 60 s idle", t1 - t0);
    assert!(s1 - s0 <= 60, "{} wake-ups in 60 s idle", s1 - s0);
    assert!((3..=5).contains(&pings), "heartbeat every 15 s of silence: {pings} pings");
    fg.signal("TERM");
    assert_eq!(fg.wait(secs(15)), Some(143));
}

#[test]
fn sigterm_while_connecting_leaves_nothing_behind() {
    let relay = relay();
    let scratch = Scratch::new("early");
    let id = unique_id("early");
    relay.register(&id, Some(TOKEN));
    // Share mode with tmux, no terminal needed before the relay answers: the launcher is waiting.
    let mut c = std::process::Command::new(BIN);
    c.args(["--token", TOKEN, &id]).env_clear();
    c.env("PATH", std::env::var("PATH").unwrap()).env("USER", relay.user()).env("HOME", scratch.path());
    c.env("TUNL_AUTHKEYS_FILE", scratch.path().join("ak")).env("TUNL_RECORDING_DIR", scratch.path());
    c.env("TUNL_STATE_DIR", scratch.path().join("state"));
    for (k, v) in relay.env() {
        c.env(k, v);
    }
    c.stdin(std::process::Stdio::null()).stdout(std::process::Stdio::null()).stderr(std::process::Stdio::piped());
    let mut child = c.spawn().unwrap();
    // The relay holds the hello unanswered: the session is half set up (key, certificate, tmux, ssh).
    let conn = relay.accept(secs(30)).expect("hello");
    assert!(session_dir(&id).join("sharekey").exists());
    assert!(session_dir(&id).join("daemon.pid").exists());
    std::process::Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    let deadline = secs(20);
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st.code();
        }
        assert!(std::time::Instant::now() < deadline, "the launcher did not end");
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
    assert_eq!(status, Some(143), "{err}");
    assert!(!session_dir(&id).exists(), "the key and certificate must not stay behind: {err}");
    assert!(wait_no_processes(&session_dir(&id).display().to_string(), secs(5)).is_empty());
    drop(conn);
}

/// Every process below `root` (its children, theirs, ...): pid, command line (NULs as spaces) and
/// environment block.
fn descendants(root: u32) -> Vec<(u32, String, Vec<u8>)> {
    let mut parent = std::collections::HashMap::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else { continue };
        let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else { continue };
        let Some(ppid) = stat.rfind(')').and_then(|i| stat[i + 2..].split(' ').nth(1)?.parse::<u32>().ok()) else {
            continue;
        };
        parent.insert(pid, ppid);
    }
    let below = |mut p: u32| {
        while let Some(&pp) = parent.get(&p) {
            if pp == root {
                return true;
            }
            if pp <= 1 {
                return false;
            }
            p = pp;
        }
        false
    };
    let mut out = Vec::new();
    for &pid in parent.keys() {
        if below(pid) {
            let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let env = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
            out.push((pid, String::from_utf8_lossy(&cmd).replace('\0', " "), env));
        }
    }
    out
}

fn cmdline(pid: u32) -> String {
    String::from_utf8_lossy(&std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default()).replace('\0', " ")
}

/// Assert that nothing the launcher started shows `secrets` on its command line or carries the
/// token in its environment; returns how many processes were checked.
/// The OpenSSH release of the client's `ssh` (7.4 under `just compat`).
fn client_openssh() -> (u32, u32) {
    let o = std::process::Command::new("ssh").env("PATH", client_path()).arg("-V").output().unwrap();
    let text = String::from_utf8_lossy(&o.stderr).into_owned();
    let v = text.trim().strip_prefix("OpenSSH_").unwrap_or("99.0");
    let (a, b) = v.split_once('.').unwrap_or((v, "0"));
    let b: String = b.chars().take_while(char::is_ascii_digit).collect();
    (a.parse().unwrap_or(99), b.parse().unwrap_or(0))
}

/// `RemoteCommand` came with OpenSSH 7.6: before, the hello is ssh's last argument.
fn remote_command() -> bool {
    client_openssh() >= (7, 6)
}

fn assert_no_secret_below(launcher: u32, id: &str, token: &str) -> usize {
    let procs = descendants(launcher);
    let ssh: Vec<_> = procs.iter().filter(|(_, c, _)| c.starts_with("ssh ")).collect();
    assert!(!ssh.is_empty(), "no ssh below the launcher: {procs:?}");
    for (pid, cmd, env) in &procs {
        // OpenSSH 7.4/7.5: the session ID is in the master's hello, its last argument, and nowhere
        // else (it is in the launcher's own argv anyway: the customer typed it there).
        let hello_arg = !remote_command()
            && cmd.starts_with("ssh ")
            && cmd.rsplit_once(" -- ").is_some_and(|(_, tail)| {
                tail.split_once(' ').is_some_and(|(_, hello)| hello.starts_with(&format!("linbit-tunl/1 id={id} ")))
            })
            && cmd.matches(id).count() == 1;
        assert!(hello_arg || !cmd.contains(id), "the session ID is on the command line of {pid}: {cmd}");
        assert!(!cmd.contains(token), "the token is on the command line of {pid}: {cmd}");
        let env = String::from_utf8_lossy(env);
        assert!(!env.contains(token), "the token is in the environment of {pid}: {cmd}");
    }
    procs.len()
}

/// F14: the hello (which names the session, the keyboard-interactive and resume credential) is in
/// a 0600 ssh config, not in ssh's argv; a token from TUNL_TOKEN is on no command line and in no
/// child's environment, on the first connection and after a reconnect.
#[test]
fn session_id_and_token_stay_off_command_lines() {
    let relay = relay();
    let scratch = Scratch::new("argv");
    let id = unique_id("argv");
    let token = "318207";
    relay.register(&id, Some(token));
    let mut fg = Foreground::start(&relay, &id, &["--tunnel"], &[("TUNL_TOKEN", token)], &scratch);
    let mut conn = relay.accept(secs(30)).unwrap_or_else(|| panic!("no session at the relay: {}", fg.diag()));
    assert_eq!(conn.hello_field("id"), Some(id.as_str()));
    conn.welcome(0);
    assert!(conn.wait_verb(secs(10), "STATE").is_some(), "{:?}", conn.lines());
    assert_eq!(relay.sign_requests().len(), 1, "TUNL_TOKEN gives the certificate path");
    assert_eq!(relay.sign_requests()[0].token, token);
    let launcher = fg.child.id();
    assert!(!cmdline(launcher).contains(token));
    assert_no_secret_below(launcher, &id, token);
    let conf = session_dir(&id).join("ssh_config");
    use std::os::unix::fs::PermissionsExt;
    if remote_command() {
        assert_eq!(std::fs::metadata(&conf).unwrap().permissions().mode() & 0o777, 0o600);
        assert!(std::fs::read_to_string(&conf).unwrap().contains(&format!("RemoteCommand linbit-tunl/1 id={id} ")));
    } else {
        // Version-gated: OpenSSH 7.4/7.5 refuse the RemoteCommand keyword (fatal): no such file.
        assert!(!conf.exists(), "an ssh_config for an OpenSSH without RemoteCommand");
    }

    conn.drop_link();
    let mut again = relay.accept(secs(15)).unwrap_or_else(|| panic!("no reconnect: {}", fg.diag()));
    assert_eq!(again.hello_field("resume"), Some("1"));
    again.welcome(0);
    assert!(again.wait_verb(secs(10), "STATE").is_some());
    assert_no_secret_below(launcher, &id, token);
    fg.signal("TERM");
    assert_eq!(fg.wait(secs(15)), Some(143), "{}", fg.stderr_text());
}

/// `--token -` reads the token from stdin (a terminal gets a prompt without echo); `--token N` is
/// overwritten in the launcher's own argv, so `ps` shows `xxxxxx` for the rest of the session.
#[test]
fn token_from_stdin_and_hidden_from_the_process_list() {
    let relay = relay();
    let scratch = Scratch::new("tokin");
    let id = unique_id("tokin");
    let token = "246801";
    relay.register(&id, Some(token));
    let mut fg =
        Foreground::start_with_input(&relay, &id, &["--tunnel", "--token", "-"], &[], &scratch, Some(b"246801\n"));
    let mut conn = relay.accept(secs(30)).unwrap_or_else(|| panic!("no session at the relay: {}", fg.diag()));
    conn.welcome(0);
    assert!(conn.wait_verb(secs(10), "STATE").is_some());
    assert_eq!(relay.sign_requests().last().map(|r| r.token.clone()).as_deref(), Some(token));
    assert!(processes_mentioning(token).is_empty(), "{:?}", processes_mentioning(token));
    fg.signal("TERM");
    assert_eq!(fg.wait(secs(15)), Some(143), "{}", fg.stderr_text());

    let id2 = unique_id("tokargv");
    let token2 = "246802";
    relay.register(&id2, Some(token2));
    let mut fg2 = Foreground::start(&relay, &id2, &["--tunnel", "--token", token2], &[], &scratch);
    let mut conn2 = relay.accept(secs(30)).unwrap_or_else(|| panic!("no session at the relay: {}", fg2.diag()));
    conn2.welcome(0);
    assert!(conn2.wait_verb(secs(10), "STATE").is_some());
    let own = cmdline(fg2.child.id());
    assert!(own.contains("--token xxxxxx") && !own.contains(token2), "{own}");
    assert!(processes_mentioning(token2).is_empty(), "{:?}", processes_mentioning(token2));
    fg2.signal("TERM");
    assert_eq!(fg2.wait(secs(15)), Some(143), "{}", fg2.stderr_text());

    // A wrong token at the prompt: one line, exit 1, nothing created.
    let id3 = unique_id("tokbad");
    let mut fg3 =
        Foreground::start_with_input(&relay, &id3, &["--tunnel", "--token", "-"], &[], &scratch, Some(b"12\n"));
    assert_eq!(fg3.wait(secs(10)), Some(1));
    assert!(fg3.stderr_text().contains("six digits"), "{}", fg3.stderr_text());
    assert!(!session_dir(&id3).exists());
}

/// With a token and the signing API down, the first login answers keyboard-interactive with the
/// token; a relay that spends tokens must still take the reconnect, which answers with the session
/// ID (protocol.md 8).
#[test]
fn reconnect_after_keyboard_interactive_with_the_token_uses_the_session_id() {
    if !relay_double::ki_supported() {
        eprintln!("skipped: keyboard-interactive needs root and a writable /etc/pam.d");
        return;
    }
    let relay = Relay::start(RelayOpts { ki: true, api_down: true, ..Default::default() }).unwrap();
    let scratch = Scratch::new("kire");
    let id = unique_id("kire");
    let token = "975310";
    relay.register(&id, Some(token));
    let mut fg = Foreground::start(&relay, &id, &["--tunnel"], &[("TUNL_TOKEN", token)], &scratch);
    let mut conn = relay.accept(secs(40)).unwrap_or_else(|| panic!("no session: {}", fg.diag()));
    conn.welcome(0);
    assert!(conn.wait_verb(secs(10), "STATE").is_some());
    assert!(fg.stderr_text().contains("unreachable"), "{}", fg.stderr_text());
    relay.spend_ki_answer(token);
    conn.drop_link();
    let mut again = relay.accept(secs(20)).unwrap_or_else(|| panic!("no reconnect: {}", fg.diag()));
    assert_eq!(again.hello_field("resume"), Some("1"));
    again.welcome(0);
    assert!(again.wait_verb(secs(10), "STATE").is_some());
    fg.signal("TERM");
    assert_eq!(fg.wait(secs(15)), Some(143), "{}", fg.stderr_text());
}

/// Issue 13, a customer retrying after a failure: every attempt (share mode, tmux) against a relay
/// port where nothing listens says the real reason in plain lines (never tmux's "server exited
/// unexpectedly" from the previous attempt's dying server, never a literal `^J`), says where the
/// session files were kept, and leaves no recording of a session that never connected.
#[test]
fn retrying_after_an_unreachable_relay_gives_the_real_reason_every_time() {
    let relay = relay();
    let scratch = Scratch::new("retry");
    let id = unique_id("retry");
    relay.register(&id, Some(TOKEN));
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let recordings = scratch.path().join("rec");
    std::fs::create_dir(&recordings).unwrap();
    for attempt in 0..3 {
        // A new token for each try, as support would hand out (the double spends each one).
        relay.register(&id, Some(TOKEN));
        let mut c = std::process::Command::new(BIN);
        c.args(["--token", TOKEN, &id]).env_clear();
        c.env("PATH", std::env::var("PATH").unwrap()).env("USER", relay.user()).env("HOME", scratch.path());
        c.env("TUNL_AUTHKEYS_FILE", scratch.path().join("ak")).env("TUNL_RECORDING_DIR", &recordings);
        for (k, v) in relay.env() {
            c.env(k, v);
        }
        c.env("TUNL_RELAY_PORT", closed.to_string());
        c.stdin(std::process::Stdio::null());
        let out = c.output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "attempt {attempt}: {err}");
        assert!(err.contains("cannot connect to the relay"), "attempt {attempt}: {err}");
        assert!(!err.contains("tmux refused") && !err.contains("^J"), "attempt {attempt}: {err}");
        assert!(err.contains("session files kept in"), "attempt {attempt}: {err}");
        let left: Vec<_> = std::fs::read_dir(&recordings).unwrap().flatten().map(|e| e.path()).collect();
        assert!(left.is_empty(), "attempt {attempt}: a recording of a session that never connected: {left:?}");
    }
    assert!(wait_no_processes(&session_dir(&id).display().to_string(), secs(5)).is_empty());
    let _ = std::fs::remove_dir_all(session_dir(&id));
}

/// Review F24: in the foreground, a terminal that takes no output (Ctrl-S, a stalled serial or IPMI
/// console; here a stderr pipe nobody reads) never stops the loop. Support's chat floods it; the
/// client still answers PING and, once the terminal reads again, says how many lines it could not
/// show and goes on; SIGTERM ends it as usual.
#[test]
fn a_terminal_that_takes_no_output_never_stops_the_foreground_loop() {
    let relay = relay();
    let scratch = Scratch::new("stall");
    let id = unique_id("stall");
    relay.register(&id, Some(TOKEN));
    let (mut fg, pipe) = Foreground::start_unread(&relay, &id, &["--tunnel", "--token", TOKEN], &scratch);
    let mut conn = relay.accept(secs(30)).unwrap_or_else(|| panic!("no session at the relay: {}", fg.diag()));
    conn.welcome(0);
    assert!(conn.wait_verb(secs(10), "STATE").is_some(), "no STATE after WELCOME: {:?}", conn.lines());
    // 400 chat lines of 1000 characters: several times what a pipe (or a stopped tty) holds.
    let text = "z".repeat(1000);
    for _ in 0..400 {
        conn.send(&relay_double::chat_line("eng@linbit.com", &text));
    }
    conn.send("PING 77");
    assert!(
        conn.wait_for(secs(15), |l| l == "PONG 77").is_some(),
        "the loop stopped on a terminal that takes no output:\n{}",
        fg.ssh_log()
    );
    fg.read_stderr(pipe);
    conn.send(&relay_double::chat_line("eng@linbit.com", "after-the-stall"));
    assert!(fg.wait_stderr(secs(15), "after-the-stall"), "{}", fg.diag());
    let err = fg.stderr_text();
    assert!(err.contains("lines not shown"), "no word about the dropped lines:\n{err}");
    assert!(err.contains(&format!("support (eng@linbit.com): {text}")), "nothing of the chat was shown:\n{err}");
    fg.signal("TERM");
    assert_eq!(fg.wait(secs(15)), Some(143), "{}", fg.diag());
}
