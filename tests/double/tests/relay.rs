//! The relay itself, proven with the real `ssh` and `curl` clients.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use relay_double::util::{TempDir, wait_until};
use relay_double::{Relay, RelayOpts, SignMode, SupportKey, TargetSshd, support_login};

const SID: &str = "alpha-bravo-charlie-delta";

fn soon(secs: u64) -> Instant {
    Instant::now() + Duration::from_secs(secs)
}

fn keygen(dir: &Path, name: &str) -> PathBuf {
    let p = dir.join(name);
    let st = Command::new("ssh-keygen").args(["-q", "-t", "ed25519", "-N", "", "-f"]).arg(&p).status().unwrap();
    assert!(st.success());
    p
}

/// POSTs a sign request with curl (trusting only the relay's TLS CA); returns (status, body).
fn curl_sign(relay: &Relay, body: &str) -> (u16, String) {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "10", "--cacert"])
        .arg(relay.tls_ca_file())
        .args(["-H", "Content-Type: application/json", "--data-binary", body, "-w", "\n%{http_code}"])
        .arg(format!("{}/api/v1/sign", relay.api_url()))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (code.trim().parse().unwrap_or(0), body.to_string())
}

fn sign_body(sid: &str, token: &str, pubkey: &str) -> String {
    format!(r#"{{"session_id": "{sid}", "token": "{token}", "public_key": "{pubkey}", "host": "testhost"}}"#)
}

fn extract_cert(body: &str) -> String {
    let start = body.find("ssh-ed25519-cert-v01@openssh.com").expect(body);
    let end = body[start..].find('"').unwrap() + start;
    body[start..end].to_string()
}

/// A known_hosts with the relay CA, and the common ssh options (strict host key checking).
fn ssh_base(relay: &Relay, dir: &Path) -> Command {
    let kh = dir.join("known_hosts");
    fs::write(&kh, format!("{}\n", relay.known_hosts_line())).unwrap();
    let mut c = Command::new("ssh");
    c.args(["-F", "/dev/null", "-p", &relay.port().to_string()])
        .args(["-o", "StrictHostKeyChecking=yes", "-o"])
        .arg(format!("UserKnownHostsFile={}", kh.display()))
        .args(["-o", "GlobalKnownHostsFile=/dev/null", "-o", "ConnectTimeout=10", "-o", "LogLevel=ERROR"]);
    c
}

fn hello() -> String {
    format!(
        "linbit-tunl/1 id={SID} mode=share host=h user=root ips=10.0.0.1 case=x%20y client=0.1.0 size=80x24 resume=0"
    )
}

struct Killed(Child);
impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn api_signed_cert_logs_in_and_broker_gets_hello() {
    let relay = Relay::start(RelayOpts::default()).unwrap();
    relay.register(SID, Some("123456"));
    let tmp = TempDir::new("relay-double-test").unwrap();
    let key = keygen(tmp.path(), "id_ed25519");
    let pubkey = fs::read_to_string(key.with_extension("pub")).unwrap().trim().to_string();

    // Unknown session, bad token, then a good one, then the spent token.
    assert_eq!(curl_sign(&relay, &sign_body("no-such-session-here", "123456", &pubkey)).0, 404);
    assert_eq!(curl_sign(&relay, &sign_body(SID, "654321", &pubkey)).0, 401);
    let (status, body) = curl_sign(&relay, &sign_body(SID, "123456", &pubkey));
    assert_eq!(status, 200, "{body}");
    fs::write(tmp.path().join("id_ed25519-cert.pub"), extract_cert(&body) + "\n").unwrap();
    assert_eq!(curl_sign(&relay, &sign_body(SID, "123456", &pubkey)).0, 403);
    assert_eq!(curl_sign(&relay, "{not json").0, 400);
    let reqs = relay.sign_requests();
    assert_eq!(reqs.iter().map(|r| r.status).collect::<Vec<_>>(), [404, 401, 200, 403, 400]);
    assert_eq!(reqs[2].host, "testhost");

    // The certificate carries the login user and the session ID.
    let info =
        Command::new("ssh-keygen").arg("-L").arg("-f").arg(tmp.path().join("id_ed25519-cert.pub")).output().unwrap();
    let info = String::from_utf8_lossy(&info.stdout);
    assert!(info.contains(&format!("Key ID: \"{SID}\"")), "{info}");
    assert!(info.contains(relay.user()), "{info}");

    // Log in with it (host checked against the CA); the broker sees the hello, and lines flow both ways.
    let mut ssh = ssh_base(&relay, tmp.path());
    ssh.arg("-i").arg(&key).args(["-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes", "-T"]);
    ssh.arg(format!("{}@127.0.0.1", relay.user())).arg(hello());
    let mut child = Killed(ssh.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap());
    let mut conn = relay.accept(soon(20)).unwrap_or_else(|| panic!("no session; sshd log:\n{}", relay.sshd_log()));
    assert_eq!(conn.hello_raw(), hello());
    assert_eq!(conn.hello_proto(), "linbit-tunl/1");
    assert_eq!(conn.hello_field("id"), Some(SID));
    assert_eq!(conn.hello_field("case"), Some("x%20y"));
    conn.welcome(2);
    let mut stdin = child.0.stdin.take().unwrap();
    let mut stdout = std::io::BufReader::new(child.0.stdout.take().unwrap());
    let mut first = String::new();
    std::io::BufRead::read_line(&mut stdout, &mut first).unwrap();
    assert_eq!(first, "WELCOME proto=1 viewers=2\n");
    std::io::Write::write_all(&mut stdin, b"O aGVsbG8=\nPING 7\nO IHdvcmxk\n").unwrap();
    assert!(conn.wait_output(soon(10), |o| o == b"hello world"));
    let mut pong = String::new();
    std::io::BufRead::read_line(&mut stdout, &mut pong).unwrap();
    assert_eq!(pong, "PONG 7\n");
    assert_eq!(conn.wait_verb(soon(5), "O").as_deref(), Some("O aGVsbG8="));
    assert_eq!(conn.lines(), ["O aGVsbG8=", "PING 7", "O IHdvcmxk"]);

    // Dropping the link ends the ssh session.
    conn.drop_link();
    assert!(wait_until(soon(10), || matches!(child.0.try_wait(), Ok(Some(_)))));
}

#[test]
fn sign_modes_and_foreign_ca_refused() {
    let relay = Relay::start(RelayOpts::default()).unwrap();
    let tmp = TempDir::new("relay-double-test").unwrap();
    let key = keygen(tmp.path(), "id_ed25519");
    let pubkey = fs::read_to_string(key.with_extension("pub")).unwrap().trim().to_string();

    relay.set_sign_mode(SignMode::Status(429));
    let out = Command::new("curl")
        .args(["-sS", "-i", "--cacert"])
        .arg(relay.tls_ca_file())
        .args(["--data-binary", "{}"])
        .arg(format!("{}/api/v1/sign", relay.api_url()))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.starts_with("HTTP/1.1 429"), "{text}");
    assert!(text.contains("Retry-After: 1"), "{text}");
    assert!(text.contains("{\"error\": "), "{text}");

    // A certificate from another CA: signed by the endpoint in OtherCa mode, refused by sshd.
    relay.register(SID, Some("111111"));
    relay.set_sign_mode(SignMode::OtherCa);
    let (status, body) = curl_sign(&relay, &sign_body(SID, "111111", &pubkey));
    assert_eq!(status, 200);
    fs::write(tmp.path().join("id_ed25519-cert.pub"), extract_cert(&body) + "\n").unwrap();
    let mut ssh = ssh_base(&relay, tmp.path());
    ssh.arg("-i").arg(&key).args(["-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes", "-T"]);
    let out = ssh.arg(format!("{}@127.0.0.1", relay.user())).arg(hello()).stdin(Stdio::null()).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("Permission denied"), "{out:?}");
    assert!(relay.accept(Instant::now()).is_none());

    // Wrong principal and expired certificates are issued as asked (the client must refuse them).
    for (mode, want) in [(SignMode::WrongPrincipal, "not-the-user"), (SignMode::Expired, "Valid: from")] {
        relay.register(SID, Some("222222"));
        relay.set_sign_mode(mode);
        let (status, body) = curl_sign(&relay, &sign_body(SID, "222222", &pubkey));
        assert_eq!(status, 200);
        let cert = tmp.path().join("x-cert.pub");
        fs::write(&cert, extract_cert(&body) + "\n").unwrap();
        let info = Command::new("ssh-keygen").arg("-L").arg("-f").arg(&cert).output().unwrap();
        assert!(String::from_utf8_lossy(&info.stdout).contains(want));
    }
}

#[test]
fn host_cert_from_other_ca_fails_strict_check() {
    let relay = Relay::start(RelayOpts { host_cert_other_ca: true, api_down: true, ..Default::default() }).unwrap();
    let tmp = TempDir::new("relay-double-test").unwrap();
    let key = keygen(tmp.path(), "id_ed25519");
    relay.sign_user_key(&key.with_extension("pub"), "t").unwrap();
    let mut ssh = ssh_base(&relay, tmp.path());
    ssh.arg("-i").arg(&key).args(["-o", "BatchMode=yes", "-T"]);
    let out = ssh.arg(format!("{}@127.0.0.1", relay.user())).arg(hello()).stdin(Stdio::null()).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("Host key verification failed"), "{out:?}");
    // api_down: nothing listens.
    let port: u16 = relay.api_url().rsplit(':').next().unwrap().parse().unwrap();
    assert!(!relay_double::util::port_open(port));
}

#[test]
fn control_master_remote_forward_and_support_login() {
    let relay = Relay::start(RelayOpts::default()).unwrap();
    let tmp = TempDir::new("relay-double-test").unwrap();
    let key = keygen(tmp.path(), "id_ed25519");
    relay.sign_user_key(&key.with_extension("pub"), SID).unwrap();

    // The customer's target sshd, with the support key installed.
    let support = SupportKey::generate(tmp.path()).unwrap();
    let ak = tmp.path().join("authorized_keys");
    fs::write(&ak, format!("{}\n", support.public_line)).unwrap();
    let target = TargetSshd::start(&ak).unwrap();

    // The master, as the client runs it: stdin/stdout are the protocol.
    let ctl = tmp.path().join("ctl.sock");
    let mut ssh = ssh_base(&relay, tmp.path());
    ssh.arg("-i").arg(&key).args(["-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes", "-T", "-M", "-S"]).arg(&ctl);
    ssh.arg(format!("{}@127.0.0.1", relay.user())).arg(hello());
    let _master = Killed(ssh.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::null()).spawn().unwrap());
    let mut conn = relay.accept(soon(20)).unwrap_or_else(|| panic!("no session; sshd log:\n{}", relay.sshd_log()));
    conn.welcome(1);
    assert!(wait_until(soon(10), || ctl.exists()));

    let fwd = |op: &str| -> Output {
        Command::new("ssh")
            .args(["-F", "/dev/null", "-S"])
            .arg(&ctl)
            .args(["-O", op, "-R", &format!("0:127.0.0.1:{}", target.port), "x"])
            .output()
            .unwrap()
    };
    let out = fwd("forward");
    assert!(out.status.success(), "{out:?}");
    let port: u16 = String::from_utf8_lossy(&out.stdout).trim().parse().expect("the mux client prints the port");
    assert!(port > 0);

    let login = support_login(port, &support, &relay_double::util::current_user(), "echo tunnel-ok").unwrap();
    assert!(login.status.success(), "{login:?}\n{}", target.log());
    assert_eq!(String::from_utf8_lossy(&login.stdout).trim(), "tunnel-ok");

    // After cancel the relay port is gone.
    let out = fwd("cancel");
    assert!(out.status.success(), "{out:?}");
    assert!(wait_until(soon(10), || !relay_double::util::port_open(port)));
}

#[test]
fn keyboard_interactive_through_pam() {
    if !relay_double::ki_supported() {
        eprintln!("skipped: /etc/pam.d is not writable");
        return;
    }
    let relay = Relay::start(RelayOpts { ki: true, api_down: true, ..Default::default() }).unwrap();
    relay.register(SID, Some("987654"));
    let tmp = TempDir::new("relay-double-test").unwrap();
    let pam_file = Path::new("/etc/pam.d").join(relay.dir().file_name().unwrap().to_str().unwrap().replacen(
        "relay-double-",
        "relay-double-sshd-",
        1,
    ));
    assert!(pam_file.exists(), "{}", pam_file.display());

    let try_login = |answer: &str| -> (Output, Option<String>) {
        let askpass = tmp.path().join("askpass.sh");
        let secret = tmp.path().join("secret");
        fs::write(&secret, answer).unwrap();
        fs::write(&askpass, format!("#!/bin/sh\ncat '{}'\n", secret.display())).unwrap();
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(&askpass, fs::Permissions::from_mode(0o700)).unwrap();
        let mut ssh = ssh_base(&relay, tmp.path());
        ssh.args(["-o", "PreferredAuthentications=keyboard-interactive", "-o", "PubkeyAuthentication=no", "-T"])
            .args(["-o", "NumberOfPasswordPrompts=1"])
            .arg(format!("{}@127.0.0.1", relay.user()))
            .arg(hello())
            .env("SSH_ASKPASS", &askpass)
            .env("SSH_ASKPASS_REQUIRE", "force")
            .env("DISPLAY", ":0")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut cmd = Command::new("setsid");
        cmd.arg("-w").arg(ssh.get_program()).args(ssh.get_args());
        for (k, v) in ssh.get_envs() {
            cmd.env(k, v.unwrap());
        }
        let mut child =
            Killed(cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap());
        // Either a session reaches the broker or ssh gives up.
        let mut conn = None;
        wait_until(soon(20), || {
            if conn.is_none() {
                conn = relay.accept(Instant::now());
            }
            conn.is_some() || matches!(child.0.try_wait(), Ok(Some(_)))
        });
        // Answer and hang up, so ssh ends.
        let id = conn.map(|mut c| {
            c.error("closed", "test over");
            c.hello_field("id").unwrap_or_default().to_string()
        });
        let out = std::mem::replace(&mut child.0, Command::new("true").spawn().unwrap()).wait_with_output().unwrap();
        (out, id)
    };

    let (out, conn) = try_login("wrong-words-here-now");
    assert!(conn.is_none(), "a wrong answer must be refused");
    assert!(String::from_utf8_lossy(&out.stderr).contains("Permission denied"), "{out:?}");

    for good in [SID, "987654"] {
        let (out, conn) = try_login(good);
        let id = conn.unwrap_or_else(|| panic!("{good} refused: {out:?}\n{}", relay.sshd_log()));
        assert_eq!(id, SID);
        assert!(String::from_utf8_lossy(&out.stdout).starts_with("ERROR code=closed msg=test%20over"));
    }

    relay.expire(SID);
    let (_, conn) = try_login(SID);
    assert!(conn.is_none(), "an expired session must be refused");

    drop(relay);
    assert!(!pam_file.exists(), "the PAM service file is removed on drop");
}
