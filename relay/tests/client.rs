//! The real client against the real relay (init --root, serve, sshd, API, produce, broker): it is
//! welcomed after a token login and after a keyboard-interactive one; what the relay refuses ends
//! it with the contract's answer; a certificate kept after its session closed gets `ERROR closed`.
//! Run as root.

mod common;

use std::io::{BufRead, BufReader};
use std::process::Stdio;

use common::*;
use tunl_relay::harness::{Relay, wait_until};
use tunl_relay::registry::{Registry, State};

fn welcomed(client: &Client) -> bool {
    client.stderr_text().contains("connected to the relay")
}

#[test]
fn a_token_login_is_welcomed_and_the_session_goes_live() {
    let relay = relay();
    let scratch = Scratch::new("welcome");
    let (id, token) = relay.create_session("CASE-W", false);
    let mut client = Client::start(&relay, &id, &["--token", &token], &[], &scratch);
    assert!(wait_until(secs(60), || welcomed(&client)), "{}\n{}", client.diag(), relay.log_text());
    let s = relay.registry().get(&id).unwrap().unwrap();
    assert_eq!(s.state, State::Tunnel, "{s:?}");
    assert_eq!(s.user, "root");

    // Support closes the session: the client ends orderly (CLOSE -> exit 0).
    relay.registry().end(&id, "closed", tunl_relay::now()).unwrap();
    let _ = client.wait(secs(1));
    drop(client);
}

#[test]
fn a_spent_token_ends_the_client_with_the_apis_403() {
    let relay = relay();
    let scratch = Scratch::new("spent");
    let (_key, public) = keypair(scratch.path(), "k");
    let (id, token) = relay.create_session("CASE-S", false);
    assert_eq!(post_sign(&relay, &sign_body(&id, &token, &public)).status, 200);
    let mut client = Client::start(&relay, &id, &["--token", &token], &[], &scratch);
    assert_eq!(client.wait(secs(60)), Some(1), "{}", client.diag());
    assert!(client.stderr_text().contains("403"), "{}", client.diag());
}

#[test]
fn a_keyboard_interactive_login_is_welcomed() {
    let relay = relay();
    let scratch = Scratch::new("kiw");
    let (id, _token) = relay.create_session("CASE-KIW", false);
    let client = Client::start(&relay, &id, &[], &[], &scratch);
    assert!(wait_until(secs(60), || welcomed(&client)), "{}\n{}", client.diag(), relay.log_text());
    assert!(relay.registry().get(&id).unwrap().unwrap().state.is_live());
}

#[test]
fn unknown_expired_and_closed_sessions_end_the_client_with_status_1() {
    let relay = relay();
    let reg = relay.registry();
    let (closed, ctoken) = relay.create_session("CASE-C", false);
    reg.end(&closed, "closed", tunl_relay::now()).unwrap();
    let n = tunl_relay::registry::NewSession { expires_minutes: 0, ..Default::default() };
    let (expired, etoken) = reg.create(&n, tunl_relay::now()).unwrap();
    for (id, token, says) in [
        ("unknown-words-for-test", "123456", "404"),
        (expired.id.as_str(), etoken.as_str(), "410"),
        (closed.as_str(), ctoken.as_str(), "410"),
    ] {
        let scratch = Scratch::new("refused");
        let mut client = Client::start(&relay, id, &["--token", token], &[], &scratch);
        assert_eq!(client.wait(secs(60)), Some(1), "{id}: {}", client.diag());
        assert!(client.stderr_text().contains(says), "{id}: {}", client.diag());
    }
}

/// Runs `ssh` with a key and its certificate, sending `hello` as the command; the relay's first line.
fn first_line(relay: &Relay, scratch: &Scratch, key: &std::path::Path, hello: &str) -> String {
    let kh = scratch.path().join("known_hosts");
    std::fs::write(&kh, format!("@cert-authority [127.0.0.1]:{} {}\n", relay.port(), relay.ca_pubkey())).unwrap();
    let cert = std::path::PathBuf::from(format!("{}-cert.pub", key.display()));
    let mut child = customer_ssh(relay, &kh, key, &cert, hello)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    let _ = BufReader::new(child.stdout.take().unwrap()).read_line(&mut line);
    let _ = child.kill();
    let out = child.wait_with_output().unwrap();
    format!(
        "{}{}",
        line.trim_end(),
        if line.is_empty() { String::from_utf8_lossy(&out.stderr).into_owned() } else { String::new() }
    )
}

#[test]
fn a_certificate_kept_after_its_session_ends_gets_the_contracts_error() {
    let relay = relay();
    let scratch = Scratch::new("replay");
    let (key, public) = keypair(scratch.path(), "k");
    let (id, token) = relay.create_session("CASE-R", false);
    let a = post_sign(&relay, &sign_body(&id, &token, &public));
    assert_eq!(a.status, 200, "{a:?}");
    let v: serde_json::Value = serde_json::from_str(&a.body).unwrap();
    std::fs::write(format!("{}-cert.pub", key.display()), format!("{}\n", v["certificate"].as_str().unwrap())).unwrap();
    let hello = |sid: &str| {
        format!("linbit-tunl/1 id={sid} mode=share host=h user=root ips=10.0.0.1 case= client=0.1 size=80x24 resume=0")
    };

    // A session ID nobody created.
    assert!(
        first_line(&relay, &scratch, &key, &hello("unknown-words-for-test")).starts_with("ERROR code=unknown-session ")
    );
    // A certificate opens only the session it was issued for, not another live one.
    let (other, _) = relay.create_session("CASE-OTHER", false);
    let got = first_line(&relay, &scratch, &key, &hello(&other));
    assert!(got.starts_with("ERROR code=unknown-session "), "{got}");
    assert!(got.contains("another%20session"), "{got}");
    // The session closed: the certificate still logs in, the relay says closed.
    relay.registry().end(&id, "closed", tunl_relay::now()).unwrap();
    let got = first_line(&relay, &scratch, &key, &hello(&id));
    assert!(got.starts_with("ERROR code=closed "), "{got}\n{}", relay.log_text());

    // A pending session that expired meanwhile.
    let (id2, token2) = relay.create_session("CASE-R2", false);
    let (key2, public2) = keypair(scratch.path(), "k2");
    let a = post_sign(&relay, &sign_body(&id2, &token2, &public2));
    let v: serde_json::Value = serde_json::from_str(&a.body).unwrap();
    std::fs::write(format!("{}-cert.pub", key2.display()), format!("{}\n", v["certificate"].as_str().unwrap()))
        .unwrap();
    relay.registry().expire(tunl_relay::now() + 365 * 86400, 1).unwrap();
    let got = first_line(&relay, &scratch, &key2, &hello(&id2));
    assert!(got.starts_with("ERROR code=expired "), "{got}");
}

#[test]
fn a_keyboard_interactive_login_opens_only_the_session_it_answered_for() {
    let relay = relay();
    let scratch = Scratch::new("kibind");
    let hello = |sid: &str| {
        format!("linbit-tunl/1 id={sid} mode=share host=h user=root ips=10.0.0.1 case= client=0.1 size=80x24 resume=0")
    };
    let (a, a_token) = relay.create_session("CASE-KA", false);
    let (b, _) = relay.create_session("CASE-KB", false);
    // Session A's token, then a hello for session B: refused as a certificate for A would be.
    let got = ki_first_line(&relay, &scratch, &a_token, &hello(&b));
    assert!(got.starts_with("ERROR code=unknown-session "), "{got}\n{}", relay.log_text());
    assert!(got.contains("another%20session"), "{got}");
    // Session A's ID likewise.
    let got = ki_first_line(&relay, &scratch, &a, &hello(&b));
    assert!(got.starts_with("ERROR code=unknown-session "), "{got}\n{}", relay.log_text());
    assert!(!relay.registry().get(&b).unwrap().unwrap().state.is_live());
    // Its own session's ID opens it.
    let got = ki_first_line(&relay, &scratch, &a, &hello(&a));
    assert!(got.starts_with("WELCOME "), "{got}\n{}", relay.log_text());
}

/// Pids of the relay's own session processes (`produce`, `broker`) for this relay's root.
fn session_processes(relay: &Relay) -> Vec<i32> {
    let root = format!("--root {}", relay.layout.root.display());
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else { continue };
        let Ok(cmd) = std::fs::read(e.path().join("cmdline")) else { continue };
        let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
        if cmd.contains(&root) && (cmd.contains(" produce ") || cmd.contains(" broker ")) {
            out.push(pid);
        }
    }
    out
}

#[test]
fn an_idle_session_is_one_process_that_outlives_its_connection() {
    let relay = relay();
    let scratch = Scratch::new("oneproc");
    let (key, public) = keypair(scratch.path(), "k");
    let (id, token) = relay.create_session("CASE-ONE", false);
    let a = post_sign(&relay, &sign_body(&id, &token, &public));
    assert_eq!(a.status, 200, "{a:?}");
    let v: serde_json::Value = serde_json::from_str(&a.body).unwrap();
    std::fs::write(format!("{}-cert.pub", key.display()), format!("{}\n", v["certificate"].as_str().unwrap())).unwrap();
    let kh = scratch.path().join("known_hosts");
    std::fs::write(&kh, format!("@cert-authority [127.0.0.1]:{} {}\n", relay.port(), relay.ca_pubkey())).unwrap();
    let login = |resume: u8| {
        let hello = format!(
            "linbit-tunl/1 id={id} mode=share host=h user=root ips=10.0.0.1 case= client=0.1 size=80x24 resume={resume}"
        );
        let cert = std::path::PathBuf::from(format!("{}-cert.pub", key.display()));
        let mut child = customer_ssh(&relay, &kh, &key, &cert, &hello)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        out.read_line(&mut line).unwrap();
        assert!(line.starts_with("WELCOME "), "{line:?}\n{}", relay.log_text());
        (child, out)
    };

    let (mut first, _out) = login(0);
    // One process of ours serves the welcomed, idle session: its produce is the broker.
    assert!(
        wait_until(secs(10), || session_processes(&relay).len() == 1),
        "session processes: {:?}\n{}",
        session_processes(&relay),
        relay.log_text()
    );
    // The customer's link ends (the client closes ssh's input): sshd closes the connection, so
    // ssh exits, while the session's broker stays for the reconnect.
    drop(first.stdin.take());
    assert!(
        wait_until(secs(30), || matches!(first.try_wait(), Ok(Some(_)))),
        "ssh did not end with its channel\n{}",
        relay.log_text()
    );
    let lock = relay.layout.session_run(&id).join("broker.lock");
    let broker = || std::fs::read_to_string(&lock).ok().and_then(|t| t.trim().parse::<i32>().ok());
    assert!(
        wait_until(secs(10), || broker().is_some_and(|p| session_processes(&relay) == vec![p])),
        "the broker did not stay: lock {:?}, processes {:?}",
        broker(),
        session_processes(&relay)
    );
    // The reconnect finds it: the session goes on.
    let (mut second, _out2) = login(1);
    drop(second.stdin.take());
    let _ = second.kill();
    let _ = second.wait();
}
