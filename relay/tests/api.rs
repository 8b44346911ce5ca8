//! The signing API end to end: `tunl-relay init --root` + `serve`, real TLS, the real registry,
//! the host's `ssh-keygen` reading the certificates we issue. Run as root.

mod common;

use common::*;
use tunl_relay::registry::Registry;

#[test]
fn a_token_buys_one_certificate_for_principal_tunl_with_only_port_forwarding() {
    let relay = relay();
    let scratch = Scratch::new("cert");
    let (_key, public) = keypair(scratch.path(), "k");
    let (id, token) = relay.create_session("CASE-1", false);

    let a = post_sign(&relay, &sign_body(&id, &token, &public));
    assert_eq!(a.status, 200, "{a:?}\n{}", relay.log_text());
    let v: serde_json::Value = serde_json::from_str(&a.body).unwrap();
    let cert = v["certificate"].as_str().unwrap();
    assert!(cert.starts_with("ssh-ed25519-cert-v01@openssh.com "), "{cert}");
    let cert_file = scratch.path().join("k-cert.pub");
    std::fs::write(&cert_file, format!("{cert}\n")).unwrap();
    let out = std::process::Command::new("ssh-keygen").arg("-L").arg("-f").arg(&cert_file).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("user certificate"), "{text}");
    assert!(text.contains(&format!("Key ID: \"tunl session={id} host=testhost")), "{text}");
    let principals = text.split("Principals:").nth(1).unwrap().split("Critical Options:").next().unwrap();
    assert_eq!(principals.trim(), relay.cfg.customer_user, "{text}");
    let critical = text.split("Critical Options:").nth(1).unwrap().split("Extensions:").next().unwrap();
    assert!(critical.contains(&format!("force-command {} produce --root", relay.cfg.binary.display())), "{text}");
    let extensions = text.split("Extensions:").nth(1).unwrap();
    assert_eq!(extensions.split_whitespace().collect::<Vec<_>>(), ["permit-port-forwarding"], "{text}");
    // Signed by the relay CA that clients embed.
    let ca_file = scratch.path().join("ca.pub");
    std::fs::write(&ca_file, relay.ca_pubkey()).unwrap();
    let fp = std::process::Command::new("ssh-keygen").arg("-l").arg("-f").arg(&ca_file).output().unwrap();
    let fp = String::from_utf8_lossy(&fp.stdout).split_whitespace().nth(1).unwrap().to_string();
    assert!(text.contains(&format!("Signing CA: ED25519 {fp}")), "{text}\n{fp}");

    // Spent on first use: the same token again is 403, a wrong one 401.
    let again = post_sign(&relay, &sign_body(&id, &token, &public));
    assert_eq!(again.status, 403, "{again:?}");
    assert!(again.body.starts_with("{\"error\":"), "{}", again.body);
    let reg = relay.registry();
    let s = reg.get(&id).unwrap().unwrap();
    assert!(s.token_spent);
    assert!(reg.events(&id).unwrap().iter().any(|e| e.what == "certificate"));
    // The token never reaches a log.
    assert!(!relay.log_text().contains(&token), "token in the relay's log");
}

#[test]
fn error_codes_follow_the_contract() {
    let relay = relay();
    let scratch = Scratch::new("codes");
    let (_key, public) = keypair(scratch.path(), "k");
    let (id, token) = relay.create_session("CASE-2", false);
    let wrong = if token == "000000" { "000001" } else { "000000" };

    assert_eq!(post_sign(&relay, "{not json").status, 400);
    assert_eq!(post_sign(&relay, &sign_body(&id, "12345", &public)).status, 400);
    assert_eq!(post_sign(&relay, &sign_body(&id, &token, "ssh-rsa AAAA")).status, 400);
    assert_eq!(post_sign(&relay, &sign_body("unknown-words-for-test", &token, &public)).status, 404);
    assert_eq!(post_sign(&relay, &sign_body(&id, wrong, &public)).status, 401);

    // Expired: a pending session past its deadline.
    let reg = relay.registry();
    let n = tunl_relay::registry::NewSession { expires_minutes: 0, ..Default::default() };
    let (expired, etoken) = reg.create(&n, tunl_relay::now()).unwrap();
    assert_eq!(post_sign(&relay, &sign_body(&expired.id, &etoken, &public)).status, 410);
    // Closed: ended by support.
    let (closed, ctoken) = relay.create_session("CASE-3", false);
    reg.end(&closed, "closed", tunl_relay::now()).unwrap();
    let a = post_sign(&relay, &sign_body(&closed, &ctoken, &public));
    assert_eq!(a.status, 410);
    assert!(a.body.contains("closed"), "{}", a.body);

    // Wrong method, wrong path, no length, chunked, too large: refused before the registry.
    let raw = |r: &str| https_raw(&relay, r.as_bytes()).status;
    assert_eq!(raw("GET /api/v1/sign HTTP/1.1\r\nHost: x\r\n\r\n"), 405);
    assert_eq!(raw("POST /other HTTP/1.1\r\nContent-Length: 0\r\n\r\n"), 404);
    assert_eq!(raw("POST /api/v1/sign HTTP/1.1\r\nHost: x\r\n\r\n"), 411);
    assert_eq!(raw("POST /api/v1/sign HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"), 400);
    let big = format!("POST /api/v1/sign HTTP/1.1\r\nContent-Length: {}\r\n\r\n", 1 << 20);
    assert_eq!(raw(&big), 413);
}

#[test]
fn rate_limits_answer_429_with_retry_after() {
    let relay = relay();
    let scratch = Scratch::new("rate");
    let (_key, public) = keypair(scratch.path(), "k");
    let (id, token) = relay.create_session("CASE-4", false);
    let wrong = if token == "000000" { "000001" } else { "000000" };
    // Per session: five tries a minute (burst five), then 429, whatever the token. Under load a
    // slot may refill between tries, so the test asks until the 429 comes (within a bound).
    let mut answers = Vec::new();
    while answers.len() < 20 {
        let a = post_sign(&relay, &sign_body(&id, wrong, &public));
        let done = a.status == 429;
        answers.push(a);
        if done {
            break;
        }
    }
    let codes: Vec<u16> = answers.iter().map(|a| a.status).collect();
    assert_eq!(codes.last(), Some(&429), "{codes:?}");
    assert!(codes.len() >= 6, "429 before the burst was used: {codes:?}");
    assert!(codes[..codes.len() - 1].iter().all(|&c| c == 401 || c == 403), "{codes:?}");
    let retry: u64 = answers.last().unwrap().header("retry-after").expect("Retry-After").parse().unwrap();
    assert!((1..=60).contains(&retry), "{retry}");
    // Five wrong answers spent the token for good (6 digits must not be guessable).
    assert!(relay.registry().get(&id).unwrap().unwrap().token_spent);

    // Per address: ten requests a minute from one address, then 429 for everything.
    let mut last = None;
    for _ in 0..40 {
        let a = post_sign(&relay, "{}");
        let done = a.status == 429;
        last = Some(a);
        if done {
            break;
        }
    }
    let last = last.unwrap();
    assert_eq!(last.status, 429, "{last:?}");
    assert!(last.header("retry-after").is_some());
}

#[test]
fn a_slow_client_is_cut_off() {
    let relay = relay();
    use std::io::Read;
    // A TCP connection that never speaks TLS is closed at the request deadline, not kept.
    let mut tcp = std::net::TcpStream::connect(("127.0.0.1", relay.cfg.api_port)).unwrap();
    tcp.set_read_timeout(Some(std::time::Duration::from_secs(40))).unwrap();
    let started = std::time::Instant::now();
    // At most a TLS alert, then the end of the stream.
    let mut buf = Vec::new();
    let n = tcp.read_to_end(&mut buf).expect("closed, not timed out");
    assert!(n < 64, "{n} bytes");
    assert!(started.elapsed() < std::time::Duration::from_secs(35), "kept for {:?}", started.elapsed());
}

#[test]
fn sighup_makes_the_api_read_its_certificate_again() {
    let relay = relay();
    let l = &relay.layout;
    let api_pid = tunl_relay::serve::descendants(std::process::id() as i32)
        .into_iter()
        .find(|p| {
            std::fs::read(format!("/proc/{p}/cmdline"))
                .map(|c| {
                    String::from_utf8_lossy(&c)
                        .replace('\0', " ")
                        .contains(&format!(" api --root {}", l.root.display()))
                })
                .unwrap_or(false)
        })
        .expect("the API process");
    let probe = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n";
    assert_eq!(https_raw(&relay, probe).status, 404);
    // A new TLS CA and certificate in the same files (init makes them when they are missing).
    std::fs::remove_file(l.tls_cert()).unwrap();
    std::fs::remove_file(l.tls_key()).unwrap();
    let c = &relay.cfg;
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tunl-relay"))
        .arg("init")
        .arg("--root")
        .arg(&l.root)
        .args(["--port", &c.port.to_string(), "--api-port", &c.api_port.to_string()])
        .args(["--customer-user", &c.customer_user, "--support-group", &c.support_group])
        .args(["--pam-service", &c.pam_service, "--listen", "127.0.0.1", "--tls-self-signed"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(try_https(&relay, probe).is_err(), "the API serves the new certificate before SIGHUP?");
    std::process::Command::new("kill").args(["-HUP", &api_pid.to_string()]).status().unwrap();
    let reloaded =
        tunl_relay::harness::wait_until(secs(20), || try_https(&relay, probe).is_ok_and(|a| a.status == 404));
    assert!(reloaded, "{}", relay.log_text());
    assert!(relay.log_text().contains("tls-reloaded"));
}
