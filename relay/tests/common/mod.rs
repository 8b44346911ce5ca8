//! Helpers of the relay's end-to-end tests: an HTTPS client for the signing API (rustls, trusting
//! the relay's throwaway TLS CA), and the real client binary in the foreground.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use tunl_relay::harness::{Relay, client_binary, wait_until};

/// A relay started with the binary cargo built for these tests.
pub fn relay() -> Relay {
    // `just bench` measures the static (musl) build that a relay host runs: TUNL_RELAY_BIN.
    match std::env::var_os("TUNL_RELAY_BIN") {
        Some(p) => tunl_relay::harness::use_binary(p),
        None => tunl_relay::harness::use_binary(env!("CARGO_BIN_EXE_tunl-relay")),
    }
    Relay::start().expect("relay")
}

pub fn secs(n: u64) -> Instant {
    Instant::now() + Duration::from_secs(n)
}

/// An HTTP answer: status, headers (lowercased names), body.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Answer {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }
}

/// Sends `raw` (a whole HTTP request) to the relay's API over TLS and reads the answer.
pub fn https_raw(relay: &Relay, raw: &[u8]) -> Answer {
    try_https(relay, raw).unwrap()
}

/// As [`https_raw`], with TLS failures (e.g. a certificate the relay's TLS CA did not sign) as errors.
pub fn try_https(relay: &Relay, raw: &[u8]) -> std::io::Result<Answer> {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(relay.tls_ca()).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let conn = rustls::ClientConnection::new(Arc::new(cfg), ServerName::try_from("127.0.0.1").unwrap()).unwrap();
    let tcp = TcpStream::connect(("127.0.0.1", relay.cfg.api_port)).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    tls.write_all(raw)?;
    let mut out = Vec::new();
    let _ = tls.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or_else(|| panic!("no HTTP answer: {text:?}"));
    let mut lines = head.split("\r\n");
    let status = lines.next().unwrap().split(' ').nth(1).unwrap().parse().unwrap();
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    Ok(Answer { status, headers, body: body.to_string() })
}

pub fn post_sign(relay: &Relay, body: &str) -> Answer {
    https_raw(
        relay,
        format!(
            "POST /api/v1/sign HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .as_bytes(),
    )
}

pub fn sign_body(id: &str, token: &str, public_key: &str) -> String {
    format!(r#"{{"session_id":"{id}","token":"{token}","public_key":"{public_key}","host":"testhost"}}"#)
}

/// A fresh ed25519 key pair in `dir`; returns (private key path, public key line).
pub fn keypair(dir: &Path, name: &str) -> (PathBuf, String) {
    let key = dir.join(name);
    let st = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", "linbit-tunl", "-f"])
        .arg(&key)
        .stdin(Stdio::null())
        .status()
        .unwrap();
    assert!(st.success());
    let public = std::fs::read_to_string(key.with_extension("pub")).unwrap().trim().to_string();
    (key, public)
}

/// A scratch directory removed on drop.
pub struct Scratch(pub PathBuf);

impl Scratch {
    pub fn new(tag: &str) -> Scratch {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let p = std::env::temp_dir().join(format!(
            "tunl-relay-e2e-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        Scratch(p)
    }
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The client's session directory for `id` (as the client derives it).
pub fn session_dir(id: &str) -> PathBuf {
    use sha2::{Digest, Sha256};
    let d = Sha256::digest(id.as_bytes());
    let h: String = d.iter().take(6).map(|b| format!("{b:02x}")).collect();
    PathBuf::from(format!("/tmp/linbit-tunl-{h}"))
}

/// The real client, `linbit-tunl --tunnel ARGS ID` without tmux, stderr collected.
pub struct Client {
    pub child: Child,
    pub stderr: Arc<Mutex<Vec<u8>>>,
    pub id: String,
}

impl Client {
    pub fn start(relay: &Relay, id: &str, args: &[&str], env: &[(&str, &str)], scratch: &Scratch) -> Client {
        let bin = scratch.path().join("bin");
        std::fs::create_dir_all(&bin).unwrap();
        let _ = std::os::unix::fs::symlink("/usr/bin/ssh", bin.join("ssh"));
        let mut c = Command::new(client_binary().expect("client binary"));
        c.arg("--tunnel").args(args).arg(id).env_clear();
        c.env("PATH", &bin).env("USER", "root").env("HOME", scratch.path());
        c.env("TUNL_AUTHKEYS_FILE", scratch.path().join("authorized_keys"));
        c.env("TUNL_RECORDING_DIR", scratch.path());
        for (k, v) in relay.env() {
            c.env(k, v);
        }
        for (k, v) in env {
            c.env(k, v);
        }
        c.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped());
        let mut child = c.spawn().unwrap();
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let mut pipe = child.stderr.take().unwrap();
        let sink = stderr.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = pipe.read(&mut buf) {
                if n == 0 {
                    break;
                }
                sink.lock().unwrap().extend_from_slice(&buf[..n]);
            }
        });
        Client { child, stderr, id: id.to_string() }
    }

    pub fn stderr_text(&self) -> String {
        String::from_utf8_lossy(&self.stderr.lock().unwrap()).into_owned()
    }

    pub fn ssh_log(&self) -> String {
        std::fs::read_to_string(session_dir(&self.id).join("ssh.log")).unwrap_or_default()
    }

    pub fn diag(&self) -> String {
        format!("client stderr:\n{}\nssh.log:\n{}", self.stderr_text(), self.ssh_log())
    }

    /// The exit status, or None (and the client killed) at the deadline.
    pub fn wait(&mut self, deadline: Instant) -> Option<i32> {
        let mut status = None;
        wait_until(deadline, || match self.child.try_wait() {
            Ok(Some(st)) => {
                status = st.code();
                true
            }
            _ => false,
        });
        if status.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        status
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status();
            if !wait_until(secs(10), || matches!(self.child.try_wait(), Ok(Some(_)))) {
                let _ = self.child.kill();
                let _ = self.child.wait();
            }
        }
        let _ = std::fs::remove_dir_all(session_dir(&self.id));
    }
}

/// Runs `ssh` logging in by keyboard-interactive with `answer` (askpass), sending `hello` as the
/// command; the relay's first line (or ssh's stderr when there is none).
pub fn ki_first_line(relay: &Relay, scratch: &Scratch, answer: &str, hello: &str) -> String {
    use std::io::BufRead;
    use std::os::unix::fs::PermissionsExt;
    let kh = scratch.path().join("known_hosts");
    std::fs::write(&kh, format!("@cert-authority [127.0.0.1]:{} {}\n", relay.port(), relay.ca_pubkey())).unwrap();
    let askpass = scratch.path().join("askpass.sh");
    std::fs::write(&askpass, format!("#!/bin/sh\necho {answer}\n")).unwrap();
    std::fs::set_permissions(&askpass, std::fs::Permissions::from_mode(0o700)).unwrap();
    let mut child = Command::new("ssh")
        .args(["-F", "/dev/null", "-o", "GlobalKnownHostsFile=/dev/null", "-o", "StrictHostKeyChecking=yes"])
        .args(["-o", "PreferredAuthentications=keyboard-interactive", "-o", "NumberOfPasswordPrompts=1"])
        .arg("-o")
        .arg(format!("UserKnownHostsFile={}", kh.display()))
        .args(["-p", &relay.port().to_string(), "-l", &relay.cfg.customer_user, "127.0.0.1", "--", hello])
        .env("SSH_ASKPASS", &askpass)
        .env("SSH_ASKPASS_REQUIRE", "force")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    let _ = std::io::BufReader::new(child.stdout.take().unwrap()).read_line(&mut line);
    let _ = child.kill();
    let out = child.wait_with_output().unwrap();
    format!(
        "{}{}",
        line.trim_end(),
        if line.is_empty() { String::from_utf8_lossy(&out.stderr).into_owned() } else { String::new() }
    )
}

/// `ssh` that logs in to `relay` as a customer with `key` and its certificate `cert`, trusting only
/// the hosts in `known_hosts` (the relay's CA), with `hello` as the command. Stdio is the caller's.
pub fn customer_ssh(relay: &Relay, known_hosts: &Path, key: &Path, cert: &Path, hello: &str) -> Command {
    let mut c = Command::new("ssh");
    c.args(["-F", "/dev/null", "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes"])
        .args(["-o", "GlobalKnownHostsFile=/dev/null", "-o", "StrictHostKeyChecking=yes"])
        .args(["-o", "PreferredAuthentications=publickey"])
        .arg("-o")
        .arg(format!("UserKnownHostsFile={}", known_hosts.display()))
        .arg("-o")
        .arg(format!("CertificateFile={}", cert.display()))
        .arg("-i")
        .arg(key)
        .args(["-p", &relay.port().to_string(), "-l", &relay.cfg.customer_user, "127.0.0.1", "--", hello]);
    c
}
