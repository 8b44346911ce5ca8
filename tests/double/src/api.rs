//! The HTTPS signing endpoint (protocol.md section 8), served by one thread with rustls.

use std::collections::HashMap;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::util::run;

/// How the signing endpoint behaves; switch at any time with [`crate::Relay::set_sign_mode`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum SignMode {
    /// Checks the session and token and signs correctly.
    #[default]
    Normal,
    /// Signs with a CA that is not the relay CA.
    OtherCa,
    /// Returns a valid certificate for a different public key.
    OtherKey,
    /// Returns a certificate that expired an hour ago.
    Expired,
    /// Returns a certificate whose only principal is not the login user.
    WrongPrincipal,
    /// Answers with this status and `{"error": ...}` (429 adds `Retry-After: 1`).
    Status(u16),
    /// Answers 200 with a body that is not JSON.
    Garbage,
    /// Answers 200 with JSON whose certificate is not an SSH certificate.
    GarbageCert,
}

/// One request to the signing endpoint, as logged.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SignRequest {
    pub session_id: String,
    pub token: String,
    pub public_key: String,
    pub host: String,
    /// The HTTP status that was answered.
    pub status: u16,
}

#[derive(Debug, Default)]
pub(crate) struct Session {
    pub token: Option<String>,
    pub token_spent: bool,
    pub expired: bool,
}

/// State shared between the relay handle and the API thread.
pub(crate) struct SignState {
    pub mode: Mutex<SignMode>,
    pub sessions: Mutex<HashMap<String, Session>>,
    pub requests: Mutex<Vec<SignRequest>>,
    pub dir: PathBuf,
    pub ca_key: PathBuf,
    pub other_ca_key: PathBuf,
    pub principal: String,
    pub counter: AtomicU64,
}

pub(crate) struct ApiServer {
    stop: Arc<AtomicBool>,
    port: u16,
    thread: Option<JoinHandle<()>>,
}

/// Makes a throwaway TLS CA and a server certificate for 127.0.0.1/localhost with the openssl CLI.
/// Returns (ca.pem, server.crt, server.key).
pub(crate) fn make_tls(dir: &Path) -> io::Result<(PathBuf, PathBuf, PathBuf)> {
    let ca_key = dir.join("tls-ca.key");
    let ca = dir.join("tls-ca.pem");
    let key = dir.join("tls-server.key");
    let csr = dir.join("tls-server.csr");
    let crt = dir.join("tls-server.crt");
    let ext = dir.join("tls-server.ext");
    let ec = ["genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out"];
    run(Command::new("openssl").args(ec).arg(&ca_key))?;
    run(Command::new("openssl")
        .args(["req", "-x509", "-new", "-sha256", "-days", "2", "-subj", "/CN=relay-double test CA", "-key"])
        .arg(&ca_key)
        .args(["-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign"])
        .arg("-out")
        .arg(&ca))?;
    run(Command::new("openssl").args(ec).arg(&key))?;
    run(Command::new("openssl")
        .args(["req", "-new", "-subj", "/CN=127.0.0.1", "-key"])
        .arg(&key)
        .arg("-out")
        .arg(&csr))?;
    std::fs::write(
        &ext,
        "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\n\
         extendedKeyUsage=serverAuth\nsubjectAltName=IP:127.0.0.1,DNS:localhost\n",
    )?;
    run(Command::new("openssl")
        .args(["x509", "-req", "-sha256", "-days", "2", "-set_serial", "4242", "-in"])
        .arg(&csr)
        .arg("-CA")
        .arg(&ca)
        .arg("-CAkey")
        .arg(&ca_key)
        .arg("-extfile")
        .arg(&ext)
        .arg("-out")
        .arg(&crt))?;
    Ok((ca, crt, key))
}

impl ApiServer {
    pub(crate) fn start(crt: &Path, key: &Path, state: Arc<SignState>) -> io::Result<ApiServer> {
        let certs = CertificateDer::pem_file_iter(crt)
            .map_err(io::Error::other)?
            .collect::<Result<Vec<_>, _>>()
            .map_err(io::Error::other)?;
        let key = PrivateKeyDer::from_pem_file(key).map_err(io::Error::other)?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(io::Error::other)?
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .map_err(io::Error::other)?;
        let config = Arc::new(config);
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let port = listener.local_addr()?.port();
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let thread = std::thread::Builder::new().name("tunl-api".into()).spawn(move || {
            for stream in listener.incoming() {
                if stop2.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(stream) = stream else { continue };
                let (config, state) = (config.clone(), state.clone());
                let _ = std::thread::Builder::new().name("tunl-api-conn".into()).spawn(move || {
                    let _ = serve_one(stream, config, &state);
                });
            }
        })?;
        Ok(ApiServer { stop, port, thread: Some(thread) })
    }

    pub(crate) fn port(&self) -> u16 {
        self.port
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(("127.0.0.1", self.port));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn serve_one(tcp: TcpStream, config: Arc<rustls::ServerConfig>, state: &SignState) -> io::Result<()> {
    tcp.set_read_timeout(Some(Duration::from_secs(10)))?;
    tcp.set_write_timeout(Some(Duration::from_secs(10)))?;
    let conn = rustls::ServerConnection::new(config).map_err(io::Error::other)?;
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    let (status, extra, body) = {
        let mut r = BufReader::new(&mut tls);
        let mut request_line = String::new();
        r.read_line(&mut request_line)?;
        let mut len = 0usize;
        loop {
            let mut h = String::new();
            if r.read_line(&mut h)? == 0 {
                return Ok(());
            }
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            if let Some((k, v)) = h.split_once(':')
                && k.trim().eq_ignore_ascii_case("content-length")
            {
                len = v.trim().parse().unwrap_or(usize::MAX);
            }
        }
        let mut parts = request_line.split_whitespace();
        let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
        if path != "/api/v1/sign" {
            (404, "", error_body("no such endpoint"))
        } else if method != "POST" {
            (405, "", error_body("POST only"))
        } else if len > 65536 {
            (400, "", error_body("body too large"))
        } else {
            let mut body = vec![0; len];
            r.read_exact(&mut body)?;
            handle_sign(state, &String::from_utf8_lossy(&body))
        }
    };
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        410 => "Gone",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        _ => "Status",
    };
    let resp = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n{extra}Connection: close\r\n\r\n{body}",
        body.len()
    );
    tls.write_all(resp.as_bytes())?;
    tls.flush()?;
    tls.conn.send_close_notify();
    let _ = tls.flush();
    Ok(())
}

fn error_body(text: &str) -> String {
    format!("{{\"error\": \"{}\"}}", json_escape(text))
}

fn json_escape(s: &str) -> String {
    let mut o = String::new();
    for c in s.chars() {
        match c {
            '"' => o.push_str("\\\""),
            '\\' => o.push_str("\\\\"),
            c if (c as u32) < 0x20 => o.push_str(&format!("\\u{:04x}", c as u32)),
            c => o.push(c),
        }
    }
    o
}

/// The string value of `"key"` in a flat JSON object; None if absent or not a string. Handles the
/// usual escapes; enough for the four-field request.
pub(crate) fn json_str(body: &str, key: &str) -> Option<String> {
    let pat = format!("\"{key}\"");
    let at = body.find(&pat)? + pat.len();
    let rest = body[at..].trim_start().strip_prefix(':')?.trim_start().strip_prefix('"')?;
    let mut out = String::new();
    let mut chars = rest.chars();
    while let Some(c) = chars.next() {
        match c {
            '"' => return Some(out),
            '\\' => match chars.next()? {
                'n' => out.push('\n'),
                't' => out.push('\t'),
                'r' => out.push('\r'),
                '/' => out.push('/'),
                '\\' => out.push('\\'),
                '"' => out.push('"'),
                'u' => {
                    let hex: String = chars.by_ref().take(4).collect();
                    out.push(char::from_u32(u32::from_str_radix(&hex, 16).ok()?)?);
                }
                _ => return None,
            },
            c => out.push(c),
        }
    }
    None
}

fn handle_sign(state: &SignState, body: &str) -> (u16, &'static str, String) {
    let f = |k| json_str(body, k);
    let (sid, token, key, host) = (f("session_id"), f("token"), f("public_key"), f("host"));
    let log = |status: u16| {
        state.requests.lock().unwrap().push(SignRequest {
            session_id: sid.clone().unwrap_or_default(),
            token: token.clone().unwrap_or_default(),
            public_key: key.clone().unwrap_or_default(),
            host: host.clone().unwrap_or_default(),
            status,
        });
    };
    let mode = *state.mode.lock().unwrap();
    match mode {
        SignMode::Status(code) => {
            log(code);
            let extra = if code == 429 { "Retry-After: 1\r\n" } else { "" };
            return (code, extra, error_body(&format!("test relay answers {code}")));
        }
        SignMode::Garbage => {
            log(200);
            return (200, "", "<html>this is not json</html>".to_string());
        }
        _ => {}
    }
    let (Some(sid), Some(token), Some(key)) = (sid.clone(), token.clone(), key.clone()) else {
        log(400);
        return (400, "", error_body("malformed request"));
    };
    if key.contains('\n') || !key.starts_with("ssh-") {
        log(400);
        return (400, "", error_body("malformed public key"));
    }
    {
        let mut sessions = state.sessions.lock().unwrap();
        let Some(s) = sessions.get_mut(&sid) else {
            log(404);
            return (404, "", error_body("unknown session"));
        };
        if s.expired {
            log(410);
            return (410, "", error_body("session expired"));
        }
        if s.token.as_deref() != Some(token.as_str()) {
            log(401);
            return (401, "", error_body("bad token"));
        }
        if s.token_spent {
            log(403);
            return (403, "", error_body("token already used"));
        }
        s.token_spent = true;
    }
    if mode == SignMode::GarbageCert {
        log(200);
        return (200, "", "{\"certificate\": \"ssh-ed25519-cert-v01@openssh.com AAAAnotacert\"}".to_string());
    }
    match sign(state, &sid, &key, mode) {
        Ok(cert) => {
            log(200);
            (200, "", format!("{{\"certificate\": \"{}\"}}", json_escape(&cert)))
        }
        Err(e) => {
            log(500);
            (500, "", error_body(&format!("signing failed: {e}")))
        }
    }
}

fn sign(state: &SignState, sid: &str, key: &str, mode: SignMode) -> io::Result<String> {
    let n = state.counter.fetch_add(1, Ordering::SeqCst);
    let base = state.dir.join(format!("sign-{n}"));
    let pubfile = base.with_extension("pub");
    if mode == SignMode::OtherKey {
        run(Command::new("ssh-keygen").args(["-q", "-t", "ed25519", "-N", "", "-C", "other", "-f"]).arg(&base))?;
    } else {
        std::fs::write(&pubfile, format!("{key}\n"))?;
    }
    let ca = if mode == SignMode::OtherCa { &state.other_ca_key } else { &state.ca_key };
    let principal = if mode == SignMode::WrongPrincipal { "not-the-user" } else { state.principal.as_str() };
    let validity = if mode == SignMode::Expired { "-2h:-1h" } else { "-5m:+1h" };
    run(Command::new("ssh-keygen")
        .arg("-q")
        .arg("-s")
        .arg(ca)
        .args(["-I", sid, "-n", principal, "-V", validity])
        .arg(&pubfile))?;
    let cert = std::fs::read_to_string(state.dir.join(format!("sign-{n}-cert.pub")))?;
    Ok(cert.trim().to_string())
}

#[cfg(test)]
mod tests {
    use super::json_str;

    #[test]
    fn json_fields() {
        let b = r#"{"session_id": "a-b-c-d", "token":"123456","public_key":"ssh-ed25519 AAA\u0041 x","host":"h\"1"}"#;
        assert_eq!(json_str(b, "session_id").as_deref(), Some("a-b-c-d"));
        assert_eq!(json_str(b, "token").as_deref(), Some("123456"));
        assert_eq!(json_str(b, "public_key").as_deref(), Some("ssh-ed25519 AAAA x"));
        assert_eq!(json_str(b, "host").as_deref(), Some("h\"1"));
        assert_eq!(json_str(b, "nope"), None);
    }
}
