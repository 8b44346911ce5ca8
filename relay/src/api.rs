//! `tunl-relay api`: the HTTPS signing API of protocol.md section 8 on rustls.
//!
//! One request per connection (`Connection: close`), a thread per connection with a cap on how many
//! run at once, bounded header and body sizes and a deadline per connection. The certificate and key
//! are read from files and read again on SIGHUP. `POST /api/v1/sign` spends the token and answers a
//! user certificate signed by the host's own `ssh-keygen -s`: the relay's sshd is what checks these
//! certificates, so OpenSSH's own signer cannot produce one that sshd reads differently, and the
//! relay carries no certificate encoder of its own.

use std::collections::HashMap;
use std::fs;
use std::io::{self, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use base64::Engine;
use rustls::ServerConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::layout::{Config, Layout};
use crate::log;
use crate::registry::{Registry, Sqlite, TokenVerdict, is_session_id, is_token};
use crate::sshd::relay_command;

/// Request head (request line and headers) and body limits.
pub const MAX_HEAD: usize = 8192;
pub const MAX_BODY: usize = 4096;
/// A connection that has not sent its request by then is closed.
pub const REQUEST_DEADLINE: Duration = Duration::from_secs(10);
/// Connections served at once; more wait in the kernel's backlog.
pub const MAX_CONNECTIONS: usize = 64;
/// How long an issued certificate is valid (backdated for clock skew).
pub const CERT_VALIDITY: &str = "-5m:+10m";

/// Rate limits (token buckets): per client address, and per session ID.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub per_addr_burst: f64,
    pub per_addr_per_min: f64,
    pub per_session_burst: f64,
    pub per_session_per_min: f64,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits { per_addr_burst: 10.0, per_addr_per_min: 10.0, per_session_burst: 5.0, per_session_per_min: 5.0 }
    }
}

/// Token buckets by key; answers `Err(seconds)` to wait when empty.
pub struct Buckets {
    burst: f64,
    per_sec: f64,
    map: HashMap<String, (f64, Instant)>,
}

impl Buckets {
    pub fn new(burst: f64, per_min: f64) -> Buckets {
        Buckets { burst, per_sec: per_min / 60.0, map: HashMap::new() }
    }

    pub fn take(&mut self, key: &str, now: Instant) -> Result<(), u64> {
        if self.map.len() > 100_000 {
            // Bounded memory under a flood: full buckets carry no information, drop them.
            let (burst, per_sec) = (self.burst, self.per_sec);
            self.map.retain(|_, (tokens, at)| *tokens + now.duration_since(*at).as_secs_f64() * per_sec < burst);
        }
        let (tokens, at) = self.map.entry(key.to_string()).or_insert((self.burst, now));
        *tokens = (*tokens + now.duration_since(*at).as_secs_f64() * self.per_sec).min(self.burst);
        *at = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            Ok(())
        } else {
            Err(((1.0 - *tokens) / self.per_sec).ceil().max(1.0) as u64)
        }
    }
}

/// An HTTP answer.
#[derive(Debug, PartialEq, Eq)]
pub struct Reply {
    pub status: u16,
    pub body: String,
    pub retry_after: Option<u64>,
}

impl Reply {
    fn error(status: u16, text: &str) -> Reply {
        Reply { status, body: serde_json::json!({ "error": text }).to_string(), retry_after: None }
    }
    fn limited(secs: u64) -> Reply {
        Reply { retry_after: Some(secs), ..Reply::error(429, "too many requests; try again later") }
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        410 => "Gone",
        411 => "Length Required",
        413 => "Content Too Large",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        _ => "Internal Server Error",
    }
}

pub fn render(r: &Reply) -> Vec<u8> {
    let mut s = format!(
        "HTTP/1.1 {} {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\nCache-Control: no-store\r\n",
        r.status,
        reason(r.status),
        r.body.len()
    );
    if let Some(secs) = r.retry_after {
        s.push_str(&format!("Retry-After: {secs}\r\n"));
    }
    s.push_str("\r\n");
    s.push_str(&r.body);
    s.into_bytes()
}

/// The parts of a request head we act on (pure, tested).
#[derive(Debug, PartialEq, Eq)]
pub struct Head {
    pub method: String,
    pub path: String,
    pub content_length: usize,
}

/// Parses the request line and headers (everything before the blank line). Chunked bodies and
/// missing or oversized lengths are refused: the only body we take is a small JSON object.
pub fn parse_head(head: &[u8]) -> Result<Head, Reply> {
    let text = std::str::from_utf8(head).map_err(|_| Reply::error(400, "request head is not UTF-8"))?;
    let mut lines = text.split("\r\n");
    let first = lines.next().unwrap_or("");
    let parts: Vec<&str> = first.split(' ').collect();
    if parts.len() != 3 || !parts[2].starts_with("HTTP/1.") {
        return Err(Reply::error(400, "malformed request line"));
    }
    let mut length = None;
    for l in lines.filter(|l| !l.is_empty()) {
        let (k, v) = l.split_once(':').ok_or_else(|| Reply::error(400, "malformed header"))?;
        let k = k.trim().to_ascii_lowercase();
        let v = v.trim();
        match k.as_str() {
            "content-length" => {
                if length.is_some() {
                    return Err(Reply::error(400, "Content-Length given twice"));
                }
                let n: usize = v.parse().map_err(|_| Reply::error(400, "malformed Content-Length"))?;
                length = Some(n);
            }
            "transfer-encoding" => return Err(Reply::error(400, "Transfer-Encoding is not accepted")),
            _ => {}
        }
    }
    let head = Head { method: parts[0].to_string(), path: parts[1].to_string(), content_length: length.unwrap_or(0) };
    if head.method == "POST" && length.is_none() {
        return Err(Reply::error(411, "Content-Length required"));
    }
    if head.content_length > MAX_BODY {
        return Err(Reply::error(413, "request body too large"));
    }
    Ok(head)
}

/// A sign request as the contract defines it.
#[derive(Debug, PartialEq, Eq, serde::Deserialize)]
pub struct SignRequest {
    pub session_id: String,
    pub token: String,
    pub public_key: String,
    pub host: String,
}

/// Parses and checks a sign request body (pure, tested). Unknown fields are ignored.
pub fn parse_sign(body: &[u8]) -> Result<SignRequest, Reply> {
    let req: SignRequest = serde_json::from_slice(body)
        .map_err(|_| Reply::error(400, "expected a JSON object with session_id, token, public_key and host"))?;
    if !is_session_id(&req.session_id) {
        return Err(Reply::error(400, "session_id is not four lowercase words joined by hyphens"));
    }
    if !is_token(&req.token) {
        return Err(Reply::error(400, "token is not six digits"));
    }
    if !valid_ed25519_line(&req.public_key) {
        return Err(Reply::error(400, "public_key is not one ssh-ed25519 public key line"));
    }
    if req.host.is_empty()
        || req.host.len() > 64
        || !req.host.bytes().all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b))
    {
        return Err(Reply::error(400, "host is not a short host name"));
    }
    Ok(req)
}

/// `ssh-ed25519 BASE64 [comment]` whose blob is exactly an ed25519 public key.
pub fn valid_ed25519_line(line: &str) -> bool {
    if line.contains(['\n', '\r', '\0']) {
        return false;
    }
    let mut parts = line.split(' ');
    if parts.next() != Some("ssh-ed25519") {
        return false;
    }
    let Some(b64) = parts.next() else { return false };
    let Ok(blob) = base64::engine::general_purpose::STANDARD.decode(b64) else { return false };
    let mut want = Vec::new();
    want.extend_from_slice(&11u32.to_be_bytes());
    want.extend_from_slice(b"ssh-ed25519");
    want.extend_from_slice(&32u32.to_be_bytes());
    blob.len() == want.len() + 32 && blob.starts_with(&want)
}

/// What the API needs to sign.
pub struct Signer {
    pub ca_key: PathBuf,
    pub principal: String,
    pub force_command: String,
    pub tmp: PathBuf,
}

impl Signer {
    /// Signs `public_key` for session `id` with `ssh-keygen -s`; returns the certificate line.
    pub fn sign(&self, id: &str, host: &str, public_key: &str) -> io::Result<String> {
        let mut serial = [0u8; 8];
        getrandom::getrandom(&mut serial).map_err(|e| io::Error::other(e.to_string()))?;
        let serial = u64::from_le_bytes(serial) >> 1;
        let dir = self.tmp.join(format!("tunl-sign-{}-{serial:x}", std::process::id()));
        fs::create_dir(&dir)?;
        let result = (|| {
            use std::os::unix::fs::PermissionsExt;
            fs::set_permissions(&dir, fs::Permissions::from_mode(0o700))?;
            let key = dir.join("key.pub");
            fs::write(&key, format!("{public_key}\n"))?;
            let out = Command::new("ssh-keygen")
                .arg("-q")
                .arg("-s")
                .arg(&self.ca_key)
                .args(["-I", &format!("tunl session={id} host={host} serial={serial}")])
                .args(["-n", &self.principal, "-V", CERT_VALIDITY, "-z", &serial.to_string()])
                .args(["-O", "clear", "-O", "permit-port-forwarding"])
                .arg("-O")
                .arg(format!("force-command={}", self.force_command))
                .arg(&key)
                .stdin(Stdio::null())
                .output()?;
            if !out.status.success() {
                return Err(io::Error::other(format!(
                    "ssh-keygen -s: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                )));
            }
            Ok(fs::read_to_string(dir.join("key-cert.pub"))?.trim().to_string())
        })();
        let _ = fs::remove_dir_all(&dir);
        result
    }
}

/// Shared state of the serving threads.
pub struct Api {
    pub layout: Layout,
    pub signer: Signer,
    pub limits: Limits,
    addr_buckets: Mutex<Buckets>,
    session_buckets: Mutex<Buckets>,
}

impl Api {
    pub fn new(layout: Layout, cfg: &Config, limits: Limits) -> Api {
        let signer = Signer {
            ca_key: layout.ca_key(),
            principal: cfg.customer_user.clone(),
            force_command: relay_command(cfg, &layout, "produce"),
            tmp: std::env::temp_dir(),
        };
        Api {
            layout,
            signer,
            limits,
            addr_buckets: Mutex::new(Buckets::new(limits.per_addr_burst, limits.per_addr_per_min)),
            session_buckets: Mutex::new(Buckets::new(limits.per_session_burst, limits.per_session_per_min)),
        }
    }

    /// Answers one request whose head is parsed and body read.
    pub fn handle(&self, peer: IpAddr, head: &Head, body: &[u8]) -> Reply {
        if let Err(secs) = self.addr_buckets.lock().unwrap().take(&peer.to_string(), Instant::now()) {
            log::warn("sign-limited", &[("addr", &peer.to_string()), ("by", "address")]);
            return Reply::limited(secs);
        }
        if head.path != "/api/v1/sign" {
            return Reply::error(404, "no such endpoint");
        }
        if head.method != "POST" {
            return Reply::error(405, "use POST");
        }
        let req = match parse_sign(body) {
            Ok(r) => r,
            Err(r) => {
                log::warn("sign-malformed", &[("addr", &peer.to_string())]);
                return r;
            }
        };
        if let Err(secs) = self.session_buckets.lock().unwrap().take(&req.session_id, Instant::now()) {
            log::warn("sign-limited", &[("id", &req.session_id), ("by", "session")]);
            return Reply::limited(secs);
        }
        let verdict = Sqlite::open(&self.layout.registry_db())
            .and_then(|r| r.spend_token(&req.session_id, &req.token, crate::now()));
        let verdict = match verdict {
            Ok(v) => v,
            Err(e) => {
                log::warn("sign-failed", &[("id", &req.session_id), ("why", &e.to_string())]);
                return Reply::error(503, "the relay's session registry is not available");
            }
        };
        let fields = [("id", req.session_id.as_str()), ("addr", &peer.to_string()), ("host", req.host.as_str())];
        match verdict {
            TokenVerdict::Accepted => {}
            TokenVerdict::Wrong => {
                log::warn("sign-refused", &[fields[0], fields[1], ("why", "wrong token")]);
                return Reply::error(401, "wrong token for this session");
            }
            TokenVerdict::Spent => {
                log::warn("sign-refused", &[fields[0], fields[1], ("why", "token spent")]);
                return Reply::error(403, "this session's token has been used already");
            }
            TokenVerdict::Unknown => return Reply::error(404, "no such session"),
            TokenVerdict::Expired => return Reply::error(410, "this session has expired"),
            TokenVerdict::Closed => return Reply::error(410, "this session has been closed"),
        }
        match self.signer.sign(&req.session_id, &req.host, &req.public_key) {
            Ok(cert) => {
                log::info("signed", &fields);
                if let Ok(r) = Sqlite::open(&self.layout.registry_db()) {
                    let _ = r.record(
                        &req.session_id,
                        "customer",
                        "certificate",
                        &format!("host={}", req.host),
                        crate::now(),
                    );
                }
                Reply { status: 200, body: serde_json::json!({ "certificate": cert }).to_string(), retry_after: None }
            }
            Err(e) => {
                log::warn("sign-failed", &[fields[0], ("why", &e.to_string())]);
                Reply::error(500, "the relay could not sign the key")
            }
        }
    }
}

/// Loads the TLS certificate chain and key.
pub fn tls_config(cert: &Path, key: &Path) -> io::Result<Arc<ServerConfig>> {
    let certs = CertificateDer::pem_file_iter(cert)
        .map_err(|e| io::Error::other(format!("{}: {e}", cert.display())))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| io::Error::other(format!("{}: {e}", cert.display())))?;
    if certs.is_empty() {
        return Err(io::Error::other(format!("{}: no certificate", cert.display())));
    }
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| io::Error::other(format!("{}: {e}", key.display())))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(io::Error::other)?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| io::Error::other(format!("TLS certificate and key: {e}")))?;
    Ok(Arc::new(cfg))
}

/// Reads until the blank line that ends the head (at most [`MAX_HEAD`]); returns head and the
/// body bytes read with it.
pub fn read_request(tls: &mut impl Read, deadline: Instant) -> Result<(Head, Vec<u8>), Reply> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 2048];
    let (head, mut body) = loop {
        if let Some(pos) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = parse_head(&buf[..pos])?;
            break (head, buf[pos + 4..].to_vec());
        }
        if buf.len() > MAX_HEAD {
            return Err(Reply::error(431, "request head too large"));
        }
        if Instant::now() > deadline {
            return Err(Reply::error(408, "request took too long"));
        }
        match tls.read(&mut chunk) {
            Ok(0) => return Err(Reply::error(400, "connection closed mid-request")),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(_) => return Err(Reply::error(408, "request took too long")),
        }
    };
    while body.len() < head.content_length {
        if Instant::now() > deadline {
            return Err(Reply::error(408, "request took too long"));
        }
        match tls.read(&mut chunk) {
            Ok(0) => return Err(Reply::error(400, "body shorter than Content-Length")),
            Ok(n) => body.extend_from_slice(&chunk[..n]),
            Err(_) => return Err(Reply::error(408, "request took too long")),
        }
    }
    if body.len() > head.content_length {
        return Err(Reply::error(400, "body longer than Content-Length"));
    }
    Ok((head, body))
}

fn serve_conn(api: &Api, tls_cfg: Arc<ServerConfig>, tcp: TcpStream, peer: SocketAddr) {
    let deadline = Instant::now() + REQUEST_DEADLINE;
    let _ = tcp.set_read_timeout(Some(Duration::from_secs(5)));
    let _ = tcp.set_write_timeout(Some(Duration::from_secs(5)));
    let Ok(conn) = rustls::ServerConnection::new(tls_cfg) else { return };
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    let reply = match read_request(&mut tls, deadline) {
        Ok((head, body)) => api.handle(peer.ip(), &head, &body),
        Err(r) => r,
    };
    log::info("http", &[("addr", &peer.ip().to_string()), ("status", &reply.status.to_string())]);
    let _ = tls.write_all(&render(&reply));
    let _ = tls.flush();
    tls.conn.send_close_notify();
    let _ = tls.flush();
}

/// Serves on `listener` until the process is ended; the TLS configuration is re-read from the files
/// when `reload` has been set (SIGHUP).
pub fn serve(api: Arc<Api>, listener: TcpListener, cert: PathBuf, key: PathBuf) -> io::Result<()> {
    let current = Arc::new(RwLock::new(tls_config(&cert, &key)?));
    {
        let current = current.clone();
        let mut signals = signal_hook::iterator::Signals::new([signal_hook::consts::SIGHUP])?;
        std::thread::spawn(move || {
            for _ in signals.forever() {
                match tls_config(&cert, &key) {
                    Ok(c) => {
                        *current.write().unwrap() = c;
                        log::info("tls-reloaded", &[("cert", &cert.display().to_string())]);
                    }
                    Err(e) => log::warn("tls-reload-failed", &[("why", &e.to_string())]),
                }
            }
        });
    }
    let active = Arc::new(AtomicUsize::new(0));
    for conn in listener.incoming() {
        let Ok(tcp) = conn else { continue };
        let Ok(peer) = tcp.peer_addr() else { continue };
        if active.load(Ordering::SeqCst) >= MAX_CONNECTIONS {
            log::warn("http-busy", &[("addr", &peer.ip().to_string())]);
            continue; // dropped: the client retries
        }
        active.fetch_add(1, Ordering::SeqCst);
        let (api, cfg, active) = (api.clone(), current.read().unwrap().clone(), active.clone());
        std::thread::spawn(move || {
            serve_conn(&api, cfg, tcp, peer);
            active.fetch_sub(1, Ordering::SeqCst);
        });
    }
    Ok(())
}

/// `tunl-relay api`: listens on the configured address and port.
pub fn run(layout: &Layout) -> Result<(), String> {
    let cfg = Config::load(layout).map_err(|e| e.to_string())?;
    let addr = SocketAddr::new(
        cfg.listen.parse().map_err(|_| format!("listen={}: not an address", cfg.listen))?,
        cfg.api_port,
    );
    let listener = TcpListener::bind(addr).map_err(|e| format!("listen on {addr}: {e}"))?;
    log::info("api-listening", &[("addr", &addr.to_string())]);
    let api = Arc::new(Api::new(layout.clone(), &cfg, Limits::default()));
    serve(api, listener, layout.tls_cert(), layout.tls_key()).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGFR5xUaDvgWD2mim2Z7fdshEePbgCoqaaq7+7VCvsm0 linbit-tunl";

    #[test]
    fn heads() {
        let h = parse_head(b"POST /api/v1/sign HTTP/1.1\r\nHost: x\r\nContent-Length: 12").unwrap();
        assert_eq!(h, Head { method: "POST".into(), path: "/api/v1/sign".into(), content_length: 12 });
        assert_eq!(parse_head(b"POST /api/v1/sign HTTP/1.1\r\nHost: x").unwrap_err().status, 411);
        assert_eq!(parse_head(b"POST / HTTP/1.1\r\nContent-Length: 99999").unwrap_err().status, 413);
        assert_eq!(parse_head(b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked").unwrap_err().status, 400);
        assert_eq!(parse_head(b"POST / HTTP/1.1\r\nContent-Length: 1\r\ncontent-length: 1").unwrap_err().status, 400);
        assert_eq!(parse_head(b"garbage").unwrap_err().status, 400);
        assert_eq!(parse_head(b"GET / HTTP/1.1").unwrap().content_length, 0);
    }

    #[test]
    fn sign_bodies() {
        let ok = format!(
            r#"{{"session_id":"swift-fox-jumps-barrel","token":"123456","public_key":"{KEY}","host":"db1","extra":1}}"#
        );
        let r = parse_sign(ok.as_bytes()).unwrap();
        assert_eq!((r.token.as_str(), r.host.as_str()), ("123456", "db1"));
        for bad in [
            ok.replace("123456", "12345"),
            ok.replace("swift-fox-jumps-barrel", "swift"),
            ok.replace("ssh-ed25519 AAAA", "ssh-rsa AAAA"),
            ok.replace("db1", "db 1"),
            ok.replace("\"host\":\"db1\",", ""),
            "[]".to_string(),
            "{".to_string(),
        ] {
            assert_eq!(parse_sign(bad.as_bytes()).unwrap_err().status, 400, "{bad}");
        }
    }

    #[test]
    fn ed25519_lines() {
        assert!(valid_ed25519_line(KEY));
        assert!(valid_ed25519_line(KEY.trim_end_matches(" linbit-tunl")));
        assert!(!valid_ed25519_line(&KEY.replace("AAAAC3", "AAAAC4")));
        assert!(!valid_ed25519_line(&format!("{KEY}\nssh-ed25519 x")));
    }

    #[test]
    fn buckets_refill_and_say_how_long_to_wait() {
        let mut b = Buckets::new(2.0, 6.0); // one every 10 s
        let t = Instant::now();
        assert!(b.take("a", t).is_ok() && b.take("a", t).is_ok());
        assert_eq!(b.take("a", t), Err(10));
        assert!(b.take("b", t).is_ok(), "keys are independent");
        assert!(b.take("a", t + Duration::from_secs(10)).is_ok());
    }

    #[test]
    fn replies_carry_retry_after() {
        let r = String::from_utf8(render(&Reply::limited(7))).unwrap();
        assert!(r.starts_with("HTTP/1.1 429 Too Many Requests\r\n"));
        assert!(r.contains("\r\nRetry-After: 7\r\n"));
        assert!(r.ends_with("\r\n\r\n{\"error\":\"too many requests; try again later\"}"));
    }
}
