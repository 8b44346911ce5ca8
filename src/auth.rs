//! Authentication material for the relay connection: the ephemeral key, the certificate from the
//! signing API (and its strict verification), the session's `known_hosts` pinning the relay CA, and
//! the `askpass.sh` helper for the keyboard-interactive fallback.
//!
//! The token is a secret: it goes into the HTTPS body and into `askpass.sh` (0700, in the 0700
//! session directory) and nowhere else: no error text, no log line, no command line, no environment.

use std::fs::File;
use std::io::Read;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use ssh_key::certificate::CertType;
use ssh_key::rand_core::OsRng;
use ssh_key::{Algorithm, Certificate, HashAlg, LineEnding, PrivateKey, PublicKey};

use crate::json;

/// Comment on the ephemeral key, so it is recognisable in the relay's logs.
pub const KEY_COMMENT: &str = "linbit-tunl";
/// Clock skew we tolerate between this host and the signing service.
pub const SKEW_SECS: u64 = 5 * 60;
/// A certificate is reused on reconnect only while it has at least this much life left.
pub const REUSE_MARGIN_SECS: u64 = 60;
/// Connect timeout for the signing API (the whole request is bounded by the caller's timeout).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// The default bound on one whole signing request.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(20);
/// Server-provided text is cut to this many characters before it is shown.
const MAX_SERVER_TEXT: usize = 200;
/// Retry-After values are clamped into this range (seconds), so a hostile server cannot stall us.
const RETRY_AFTER_DEFAULT: u64 = 10;
const RETRY_AFTER_MAX: u64 = 300;

pub const KEY_FILE: &str = "id_ed25519";
pub const PUB_FILE: &str = "id_ed25519.pub";
pub const CERT_FILE: &str = "id_ed25519-cert.pub";
pub const KNOWN_HOSTS_FILE: &str = "known_hosts";
pub const ASKPASS_FILE: &str = "askpass.sh";

use crate::sessiondir::write_private as create_exclusive;

/// Replace `path` atomically: exclusive create of a sibling temporary file, then rename over. Readers
/// (ssh on reconnect) see either the old or the new file, never a torn one.
pub fn replace_file(path: &Path, contents: &[u8], mode: u32) -> Result<(), String> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    match std::fs::remove_file(&tmp) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(format!("cannot remove {}: {e}", tmp.display())),
    }
    create_exclusive(&tmp, contents, mode)?;
    std::fs::rename(&tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        format!("cannot rename {} into place: {e}", path.display())
    })
}

/// Generate the session's ephemeral ed25519 key and write `id_ed25519` (0600) and `id_ed25519.pub`
/// into `sharekey_dir`, which the caller created with mode 0700.
pub fn generate_key(sharekey_dir: &Path) -> Result<PrivateKey, String> {
    let mut key =
        PrivateKey::random(&mut OsRng, Algorithm::Ed25519).map_err(|e| format!("cannot generate a key: {e}"))?;
    key.set_comment(KEY_COMMENT);
    let private = key.to_openssh(LineEnding::LF).map_err(|e| format!("cannot encode the key: {e}"))?;
    let public = key.public_key().to_openssh().map_err(|e| format!("cannot encode the public key: {e}"))?;
    create_exclusive(&sharekey_dir.join(KEY_FILE), private.as_bytes(), 0o600)?;
    create_exclusive(&sharekey_dir.join(PUB_FILE), format!("{public}\n").as_bytes(), 0o644)?;
    Ok(key)
}

/// Why the signing API did not give us a certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SignError {
    /// Nothing answered (DNS, connect, timeout, connection dropped during the handshake): the caller
    /// falls back to keyboard-interactive authentication.
    Unreachable(String),
    /// Something answered with a certificate we must not trust: the API may be forged. Fatal.
    Untrusted(String),
    /// Local configuration problem (e.g. an unreadable SSL_CERT_FILE). Fatal.
    Setup(String),
    /// 4xx with a customer-actionable sentence. Fatal.
    Rejected(String),
    /// 429: retry after this many seconds (the caller retries at most a few times).
    RateLimited(u64),
    /// 5xx: relay trouble. Fatal after the caller's retries, if any.
    Server(String),
    /// A success status with an answer we cannot use.
    Bad(String),
}

impl std::fmt::Display for SignError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SignError::Unreachable(m) => write!(f, "the signing service cannot be reached: {m}"),
            SignError::Untrusted(m) | SignError::Setup(m) | SignError::Rejected(m) => f.write_str(m),
            SignError::RateLimited(s) => write!(f, "the signing service asks us to wait {s} s (rate limited)"),
            SignError::Server(m) => write!(f, "the signing service has a problem: {m}"),
            SignError::Bad(m) => write!(f, "the signing service gave an unusable answer: {m}"),
        }
    }
}

/// Server text made safe to show: control characters dropped, the token (should the server echo it)
/// masked, length capped.
fn neutralise(s: &str, token: &str) -> String {
    let masked = if token.is_empty() { s.to_string() } else { s.replace(token, "******") };
    let clean: String = masked.chars().filter(|c| !c.is_control()).collect();
    let clean = clean.trim();
    if clean.chars().count() > MAX_SERVER_TEXT {
        let mut cut: String = clean.chars().take(MAX_SERVER_TEXT).collect();
        cut.push_str("...");
        cut
    } else {
        clean.to_string()
    }
}

/// Extra PEM roots from `SSL_CERT_FILE` (every certificate in the file) and `SSL_CERT_DIR` (every
/// file in the directory that holds PEM certificates; others are skipped, as OpenSSL does).
fn extra_roots(
    cert_file: Option<&std::ffi::OsStr>,
    cert_dir: Option<&std::ffi::OsStr>,
) -> Result<Vec<rustls_pki_types::CertificateDer<'static>>, String> {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;
    let mut out = Vec::new();
    if let Some(f) = cert_file.filter(|v| !v.is_empty()) {
        let path = Path::new(&f);
        let iter = CertificateDer::pem_file_iter(path)
            .map_err(|e| format!("SSL_CERT_FILE: cannot read {}: {e}", path.display()))?;
        let before = out.len();
        for c in iter {
            out.push(c.map_err(|e| format!("SSL_CERT_FILE: {} is not valid PEM: {e}", path.display()))?);
        }
        if out.len() == before {
            return Err(format!("SSL_CERT_FILE: {} holds no PEM certificate", path.display()));
        }
    }
    if let Some(d) = cert_dir.filter(|v| !v.is_empty()) {
        // Like OpenSSL, a colon-separated list; unreadable entries are skipped.
        for dir in std::env::split_paths(d) {
            let Ok(entries) = std::fs::read_dir(&dir) else { continue };
            for e in entries.flatten() {
                if let Ok(iter) = CertificateDer::pem_file_iter(e.path()) {
                    out.extend(iter.flatten());
                }
            }
        }
    }
    Ok(out)
}

/// The TLS configuration for the signing API: the Mozilla roots plus the extra roots above.
fn tls_config(
    cert_file: Option<&std::ffi::OsStr>,
    cert_dir: Option<&std::ffi::OsStr>,
) -> Result<rustls::ClientConfig, String> {
    let mut roots = rustls::RootCertStore { roots: webpki_roots::TLS_SERVER_ROOTS.to_vec() };
    for c in extra_roots(cert_file, cert_dir)? {
        roots.add(c).map_err(|e| format!("extra root certificate refused: {e}"))?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS12, &rustls::version::TLS13])
        .map_err(|e| format!("TLS setup: {e}"))?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

/// The rustls error behind an I/O error, if any. `io::Error::source` skips the wrapped error, so
/// the chain is walked with explicit downcasts.
fn find_rustls_error<'a>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a rustls::Error> {
    let mut cur = Some(e);
    while let Some(e) = cur {
        if let Some(r) = e.downcast_ref::<rustls::Error>() {
            return Some(r);
        }
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            if let Some(inner) = io.get_ref() {
                if let Some(r) = find_rustls_error(inner) {
                    return Some(r);
                }
            }
        }
        cur = e.source();
    }
    None
}

/// Sort a failed request into "nothing answered" (the only case that falls back to
/// keyboard-interactive) and everything else. Once TCP is connected, any TLS error is fatal: an
/// injected alert or a garbled record must not quietly move the session off the certificate path.
fn classify_transport(e: &ureq::Error) -> SignError {
    use ureq::Error as E;
    if let E::Io(io) = e {
        if let Some(r) = find_rustls_error(io) {
            return match r {
                rustls::Error::InvalidCertificate(_)
                | rustls::Error::NoCertificatesPresented
                | rustls::Error::UnsupportedNameType
                | rustls::Error::InvalidCertRevocationList(_) => SignError::Untrusted(format!(
                    "the signing service's TLS certificate is not trusted ({r}): the API may be forged; \
                     if your network inspects TLS, add its CA with SSL_CERT_FILE"
                )),
                other => SignError::Untrusted(format!(
                    "the TLS connection to the signing service failed ({other}): something between this \
                     host and the service interferes, or the API is forged; not falling back to the \
                     session ID. Check the network path to TUNL_API, or run without --token"
                )),
            };
        }
    }
    // ureq's own messages name the host and the OS error, never the body.
    let what = match e {
        E::HostNotFound => "name lookup failed",
        E::ConnectionFailed => "connection failed",
        E::Timeout(_) => "timed out",
        E::Io(_) => "connection error",
        E::BadUri(_) | E::RequireHttpsOnly(_) => {
            return SignError::Setup(format!("TUNL_API is not a usable URL: {e}"));
        }
        E::Tls(m) => return SignError::Setup(format!("TUNL_API cannot be used with TLS: {m}")),
        E::Protocol(_) | E::Http(_) => return SignError::Bad(format!("not HTTP: {e}")),
        E::BodyExceedsLimit(_) => return SignError::Bad("the answer is too large".to_string()),
        _ => "request failed",
    };
    SignError::Unreachable(format!("{what}: {e}"))
}

/// TLS for the signing API with our own rustls configuration (Mozilla roots *plus* the extra roots,
/// TLS 1.2/1.3, ring): ureq's built-in connector takes either its bundled roots or a list, never
/// both, and would pull in a second root store. Plain http is refused here as well as by
/// `https_only`.
mod tls_connector {
    use std::io::{Read, Write};
    use std::sync::Arc;

    use rustls::{ClientConnection, StreamOwned};
    use rustls_pki_types::ServerName;
    use ureq::Error;
    use ureq::unversioned::transport::{
        Buffers, ConnectionDetails, Connector, LazyBuffers, NextTimeout, Transport, TransportAdapter,
    };

    #[derive(Debug)]
    pub struct Rustls(pub Arc<rustls::ClientConfig>);

    pub struct TlsTransport {
        buffers: LazyBuffers,
        stream: StreamOwned<ClientConnection, TransportAdapter>,
    }

    impl std::fmt::Debug for TlsTransport {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("TlsTransport")
        }
    }

    impl<In: Transport> Connector<In> for Rustls {
        type Out = TlsTransport;

        fn connect(&self, details: &ConnectionDetails, chained: Option<In>) -> Result<Option<TlsTransport>, Error> {
            let Some(tcp) = chained else { return Err(Error::ConnectionFailed) };
            if !details.needs_tls() {
                return Err(Error::RequireHttpsOnly("the signing API is reached over https only".to_string()));
            }
            let host = details.uri.host().ok_or(Error::Tls("no host name in TUNL_API"))?;
            // An IPv6 literal keeps its brackets in the URI.
            let host = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
            let name =
                ServerName::try_from(host.to_string()).map_err(|_| Error::Tls("TUNL_API's host is not a DNS name"))?;
            let conn = ClientConnection::new(self.0.clone(), name).map_err(|e| Error::Io(std::io::Error::other(e)))?;
            let mut sock = TransportAdapter::new(tcp.boxed(), details.current_time.clone());
            sock.set_timeout(details.timeout);
            let mut stream = StreamOwned { conn, sock };
            // A rustls failure comes back as an io::Error wrapping it (classified as fatal); a
            // deadline comes back as ureq's own Timeout.
            stream.conn.complete_io(&mut stream.sock)?;
            let buffers = LazyBuffers::new(details.config.input_buffer_size(), details.config.output_buffer_size());
            Ok(Some(TlsTransport { buffers, stream }))
        }
    }

    impl Transport for TlsTransport {
        fn buffers(&mut self) -> &mut dyn Buffers {
            &mut self.buffers
        }

        fn transmit_output(&mut self, amount: usize, timeout: NextTimeout) -> Result<(), Error> {
            self.stream.get_mut().set_timeout(timeout);
            let output = &self.buffers.output()[..amount];
            self.stream.write_all(output)?;
            Ok(())
        }

        fn await_input(&mut self, timeout: NextTimeout) -> Result<bool, Error> {
            self.stream.get_mut().set_timeout(timeout);
            let input = self.buffers.input_append_buf();
            let amount = self.stream.read(input)?;
            self.buffers.input_appended(amount);
            Ok(amount > 0)
        }

        fn is_open(&mut self) -> bool {
            self.stream.get_mut().get_mut().is_open()
        }

        fn is_tls(&self) -> bool {
            true
        }
    }
}

/// Read at most the JSON cap of a body; more is refused rather than truncated.
fn read_body(body: ureq::Body) -> Result<String, String> {
    let mut buf = Vec::new();
    body.into_reader()
        .take(json::MAX_INPUT as u64 + 1)
        .read_to_end(&mut buf)
        .map_err(|e| format!("reading the answer failed: {e}"))?;
    if buf.len() > json::MAX_INPUT {
        return Err("the answer is too large".to_string());
    }
    String::from_utf8(buf).map_err(|_| "the answer is not UTF-8".to_string())
}

fn parse_retry_after(v: Option<&str>) -> u64 {
    // Only the delta-seconds form; an HTTP date (or garbage) gets the default.
    v.and_then(|s| s.trim().parse::<u64>().ok()).unwrap_or(RETRY_AFTER_DEFAULT).clamp(1, RETRY_AFTER_MAX)
}

/// Map an HTTP error status and its body to the customer-facing refusal.
fn classify_status(code: u16, body: &str, retry_after: Option<&str>, session_id: &str, token: &str) -> SignError {
    let server = json::parse_string_object(body)
        .ok()
        .and_then(|f| f.into_iter().find(|(k, _)| k == "error").map(|(_, v)| neutralise(&v, token)))
        .filter(|s| !s.is_empty());
    let said = server.map(|s| format!(" (the service says: {s})")).unwrap_or_default();
    match code {
        400 => SignError::Rejected(format!(
            "the signing service refused the request as malformed (400){said}; \
             make sure this linbit-tunl is current, or contact LINBIT support"
        )),
        401 | 403 => SignError::Rejected(format!(
            "the token was not accepted ({code}){said}: it is wrong or already used; \
             ask LINBIT support for a new token, or run without --token"
        )),
        404 => SignError::Rejected(format!(
            "the signing service does not know session {session_id} (404){said}; \
             check the session ID with LINBIT support"
        )),
        410 => SignError::Rejected(format!(
            "session {session_id} has expired (410){said}; ask LINBIT support for a new session"
        )),
        429 => SignError::RateLimited(parse_retry_after(retry_after)),
        500..=599 => SignError::Server(format!("HTTP {code}{said}; try again later")),
        _ => SignError::Rejected(format!("the signing service refused the request (HTTP {code}){said}")),
    }
}

/// Read the certificate out of a 200 answer; it must look like one OpenSSH certificate line.
fn certificate_from_body(body: &str, token: &str) -> Result<String, SignError> {
    let fields = json::parse_string_object(body).map_err(|e| SignError::Bad(format!("not the expected JSON: {e}")))?;
    let cert = fields
        .into_iter()
        .find(|(k, _)| k == "certificate")
        .map(|(_, v)| v)
        .ok_or_else(|| SignError::Bad("no \"certificate\" in the answer".to_string()))?;
    let cert = cert.trim();
    if cert.is_empty() || cert.contains(['\n', '\r']) || !cert.is_ascii() {
        return Err(SignError::Bad(format!("the certificate is not one line: {}", neutralise(cert, token))));
    }
    Ok(cert.to_string())
}

/// Ask the signing API to certify `public_key_line`. `timeout` bounds the whole request (connect is
/// bounded by at most `CONNECT_TIMEOUT`). No redirects are followed: the token goes to `api` only.
/// The returned line still has to pass `verify_certificate`.
pub fn request_certificate(
    api: &str,
    session_id: &str,
    token: &str,
    public_key_line: &str,
    host: &str,
    timeout: Duration,
) -> Result<String, SignError> {
    let (file, dir) = (std::env::var_os("SSL_CERT_FILE"), std::env::var_os("SSL_CERT_DIR"));
    let tls = tls_config(file.as_deref(), dir.as_deref()).map_err(SignError::Setup)?;
    request_with(tls, api, session_id, token, public_key_line, host, timeout)
}

fn request_with(
    tls: rustls::ClientConfig,
    api: &str,
    session_id: &str,
    token: &str,
    public_key_line: &str,
    host: &str,
    timeout: Duration,
) -> Result<String, SignError> {
    use ureq::unversioned::transport::{Connector, TcpConnector};
    // No proxy from the environment, no redirects (the token goes to TUNL_API only), error statuses
    // as responses (their JSON text is shown), one deadline for the whole request.
    let config = ureq::Agent::config_builder()
        .https_only(true)
        .max_redirects(0)
        .http_status_as_error(false)
        .proxy(None)
        .timeout_global(Some(timeout))
        .timeout_connect(Some(CONNECT_TIMEOUT.min(timeout)))
        .user_agent(format!("linbit-tunl/{}", crate::cli::VERSION))
        .build();
    let connector = ().chain(TcpConnector::default()).chain(tls_connector::Rustls(Arc::new(tls)));
    let agent = ureq::Agent::with_parts(config, connector, ureq::unversioned::resolver::DefaultResolver::default());
    let body = json::encode_object(&[
        ("session_id", session_id),
        ("token", token),
        ("public_key", public_key_line.trim()),
        ("host", host),
    ]);
    let url = format!("{}/api/v1/sign", api.trim_end_matches('/'));
    let result = agent
        .post(&url)
        .header("Content-Type", "application/json")
        .header("Accept", "application/json")
        .send(body.as_bytes());
    drop(body);
    let resp = result.map_err(|e| classify_transport(&e))?;
    let code = resp.status().as_u16();
    match code {
        200 => {
            let text = read_body(resp.into_body()).map_err(SignError::Bad)?;
            certificate_from_body(&text, token)
        }
        // Redirects are not followed, so 1xx/2xx/3xx other than 200 end up here.
        100..=399 => Err(SignError::Bad(format!("unexpected HTTP status {code}"))),
        _ => {
            let retry_after = resp.headers().get("Retry-After").and_then(|v| v.to_str().ok()).map(str::to_string);
            let text = read_body(resp.into_body()).unwrap_or_default();
            Err(classify_status(code, &text, retry_after.as_deref(), session_id, token))
        }
    }
}

/// Accept the certificate only if it is an OpenSSH user certificate for exactly `our_key`, signed by
/// the CA in `ca_line` (signature verified), valid at `now_unix` give or take `SKEW_SECS`, and lists
/// `principal`. Every refusal is a sentence for the customer.
pub fn verify_certificate(
    cert_line: &str,
    our_key: &PublicKey,
    ca_line: &str,
    principal: &str,
    now_unix: u64,
) -> Result<Certificate, String> {
    const FORGED: &str = "the signing service may be forged";
    let cert = Certificate::from_openssh(cert_line.trim())
        .map_err(|e| format!("the signing service returned something that is not an SSH certificate ({e})"))?;
    let ca = PublicKey::from_openssh(ca_line.trim()).map_err(|e| format!("the relay CA key is not usable: {e}"))?;
    if cert.signature_key() != ca.key_data() {
        return Err(format!("the certificate is signed by an unknown CA, not the relay CA: {FORGED}"));
    }
    if cert.cert_type() != CertType::User {
        return Err(format!("the certificate is not a user certificate: {FORGED}"));
    }
    if cert.public_key() != our_key.key_data() {
        return Err(format!("the certificate is for a different key than the one this session generated: {FORGED}"));
    }
    let (after, before) = (cert.valid_after(), cert.valid_before());
    if before <= after {
        return Err(format!("the certificate has an empty validity period: {FORGED}"));
    }
    if now_unix.saturating_add(SKEW_SECS) < after {
        return Err(format!(
            "the certificate is not valid yet (from {after}, now {now_unix}): check this system's clock, or {FORGED}"
        ));
    }
    if now_unix >= before.saturating_add(SKEW_SECS) {
        return Err(format!(
            "the certificate has expired (until {before}, now {now_unix}): check this system's clock, or {FORGED}"
        ));
    }
    // Inside the widened window: check the signature at a time clamped into the real one.
    let t = now_unix.clamp(after, before - 1);
    let fp = ca.fingerprint(HashAlg::Sha256);
    cert.validate_at(t, [&fp]).map_err(|_| format!("the certificate's signature does not verify: {FORGED}"))?;
    let principals = cert.valid_principals();
    if principals.is_empty() {
        return Err(format!("the certificate names no principal (it would be valid for anyone): {FORGED}"));
    }
    if !principals.iter().any(|p| p == principal) {
        return Err(format!("the certificate is not for the relay user '{principal}': {FORGED}"));
    }
    Ok(cert)
}

/// Write the verified certificate as `id_ed25519-cert.pub` (replacing an older one on re-signing).
pub fn write_cert(sharekey_dir: &Path, cert_line: &str) -> Result<(), String> {
    replace_file(&sharekey_dir.join(CERT_FILE), format!("{}\n", cert_line.trim()).as_bytes(), 0o644)
}

/// The host pattern(s) for the relay in known_hosts: `[host]:port` for a non-default port, plus the
/// plain host, comma-separated.
fn host_patterns(relay: &str, port: u16) -> String {
    if port == 22 { relay.to_string() } else { format!("[{relay}]:{port},{relay}") }
}

/// Write `known_hosts` (0600) trusting only host certificates signed by the relay CA for the relay.
/// The CA line is re-encoded from the parsed key, so its comment cannot inject anything.
pub fn write_known_hosts(dir: &Path, relay: &str, port: u16, ca_line: &str) -> Result<(), String> {
    if relay.is_empty() || relay.bytes().any(|b| !(b.is_ascii_alphanumeric() || b"._-:".contains(&b))) {
        return Err("the relay host name is not usable in known_hosts".to_string());
    }
    let mut ca = PublicKey::from_openssh(ca_line.trim()).map_err(|e| format!("the relay CA key is not usable: {e}"))?;
    ca.set_comment("");
    let key = ca.to_openssh().map_err(|e| format!("cannot encode the relay CA key: {e}"))?;
    let line = format!("@cert-authority {} {}\n", host_patterns(relay, port), key.trim());
    replace_file(&dir.join(KNOWN_HOSTS_FILE), line.as_bytes(), 0o600)
}

/// `'...'` for /bin/sh: every `'` becomes `'\''`.
fn sh_single_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// Write `askpass.sh` (0700): it prints the secret with the shell's builtin printf, so the secret
/// is in a file only we can read and never on a command line or in an environment.
pub fn write_askpass(dir: &Path, secret: &str) -> Result<(), String> {
    if secret.is_empty() || secret.chars().any(|c| c.is_control()) {
        return Err("the keyboard-interactive answer must be one non-empty line".to_string());
    }
    let script = format!("#!/bin/sh\nprintf '%s\\n' {}\n", sh_single_quote(secret));
    replace_file(&dir.join(ASKPASS_FILE), script.as_bytes(), 0o700)
}

/// Before a reconnect: must `askpass.sh` now answer with the session ID? Always on a resume that
/// uses keyboard-interactive (the first answer may have been the token, which is spent), and when
/// the certificate has less than `REUSE_MARGIN_SECS` left. `Some(reason)` for the log.
pub fn reconnect_with_session_id(
    resume: bool,
    path: crate::ssh::AuthPath,
    cert_path: &Path,
    now_unix: u64,
) -> Option<&'static str> {
    use crate::ssh::AuthPath;
    match path {
        _ if !resume => None,
        AuthPath::KeyboardInteractive => Some("resuming"),
        AuthPath::Cert if !cert_still_valid(cert_path, now_unix) => Some("certificate expired"),
        AuthPath::Cert => None,
    }
}

/// On reconnect: is the stored certificate still good for at least `REUSE_MARGIN_SECS`?
pub fn cert_still_valid(cert_path: &Path, now_unix: u64) -> bool {
    let mut text = String::new();
    let Ok(f) = File::open(cert_path) else { return false };
    if Read::take(f, 16 * 1024).read_to_string(&mut text).is_err() {
        return false;
    }
    match Certificate::from_openssh(text.trim()) {
        Ok(c) => {
            c.valid_after() <= now_unix.saturating_add(SKEW_SECS) && now_unix + REUSE_MARGIN_SECS < c.valid_before()
        }
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ssh_key::certificate::Builder;
    use std::io::Write;
    use std::os::unix::fs::PermissionsExt;

    const NOW: u64 = 1_800_000_000;

    fn tmpdir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("tunl-auth-test-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn key() -> PrivateKey {
        PrivateKey::random(&mut OsRng, Algorithm::Ed25519).unwrap()
    }

    fn cert(
        ca: &PrivateKey,
        subject: &PublicKey,
        ty: CertType,
        after: u64,
        before: u64,
        principals: &[&str],
    ) -> String {
        let mut b = Builder::new_with_random_nonce(&mut OsRng, subject.key_data().clone(), after, before).unwrap();
        b.cert_type(ty).unwrap().key_id("test").unwrap();
        if principals.is_empty() {
            b.all_principals_valid().unwrap();
        }
        for p in principals {
            b.valid_principal(*p).unwrap();
        }
        b.sign(ca).unwrap().to_openssh().unwrap()
    }

    #[test]
    fn certificate_checks() {
        let ca = key();
        let ca_line = ca.public_key().to_openssh().unwrap();
        let ours = key();
        let me = ours.public_key();
        let good = cert(&ca, me, CertType::User, NOW - 60, NOW + 3600, &["tunl"]);
        assert!(verify_certificate(&good, me, &ca_line, "tunl", NOW).is_ok());
        // Clock skew within five minutes on both sides.
        assert!(verify_certificate(&good, me, &ca_line, "tunl", NOW - 60 - 299).is_ok());
        assert!(verify_certificate(&good, me, &ca_line, "tunl", NOW + 3600 + 299).is_ok());
        let refused = |line: &str, who: &str, now: u64, want: &str| {
            let e = verify_certificate(line, me, &ca_line, who, now).unwrap_err();
            assert!(e.contains(want), "{e}");
        };
        refused(&good, "tunl", NOW - 60 - 301, "not valid yet");
        refused(&good, "tunl", NOW + 3600 + 300, "expired");
        refused(&good, "other", NOW, "not for the relay user");
        let other_ca = key();
        refused(&cert(&other_ca, me, CertType::User, NOW - 60, NOW + 3600, &["tunl"]), "tunl", NOW, "unknown CA");
        refused(
            &cert(&ca, key().public_key(), CertType::User, NOW - 60, NOW + 3600, &["tunl"]),
            "tunl",
            NOW,
            "different key",
        );
        refused(&cert(&ca, me, CertType::Host, NOW - 60, NOW + 3600, &["tunl"]), "tunl", NOW, "not a user certificate");
        refused(&cert(&ca, me, CertType::User, NOW - 7200, NOW - 3600, &["tunl"]), "tunl", NOW, "expired");
        refused(&cert(&ca, me, CertType::User, NOW + 3600, NOW + 7200, &["tunl"]), "tunl", NOW, "not valid yet");
        refused(&cert(&ca, me, CertType::User, NOW - 60, NOW + 3600, &[]), "tunl", NOW, "no principal");
        // (An empty validity window cannot be built here: the builder self-validates in debug builds.)
        refused(&ca_line, "tunl", NOW, "not an SSH certificate");
        refused("garbage", "tunl", NOW, "not an SSH certificate");
        // A certificate whose signature was tampered with: flip a bit inside the signature blob.
        let parsed = Certificate::from_openssh(&good).unwrap();
        let mut bytes = parsed.to_bytes().unwrap();
        let n = bytes.len();
        bytes[n - 5] ^= 1;
        use base64::Engine;
        let b64 = base64::engine::general_purpose::STANDARD.encode(&bytes);
        let tampered = format!("ssh-ed25519-cert-v01@openssh.com {b64}");
        refused(&tampered, "tunl", NOW, "signature does not verify");
    }

    #[test]
    fn key_files() {
        let d = tmpdir("key");
        let k = generate_key(&d).unwrap();
        let meta = std::fs::metadata(d.join(KEY_FILE)).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        let back = PrivateKey::read_openssh_file(&d.join(KEY_FILE)).unwrap();
        assert_eq!(back.public_key().key_data(), k.public_key().key_data());
        let pubtext = std::fs::read_to_string(d.join(PUB_FILE)).unwrap();
        assert!(pubtext.starts_with("ssh-ed25519 ") && pubtext.trim_end().ends_with(" linbit-tunl"), "{pubtext}");
        // Never overwrites (or follows a planted link).
        assert!(generate_key(&d).is_err());
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn cert_file_reuse() {
        let d = tmpdir("cert");
        let ca = key();
        let me = key();
        let line = cert(&ca, me.public_key(), CertType::User, NOW - 60, NOW + 3600, &["tunl"]);
        write_cert(&d, &line).unwrap();
        write_cert(&d, &line).unwrap(); // replacing is fine
        let p = d.join(CERT_FILE);
        assert!(cert_still_valid(&p, NOW));
        assert!(cert_still_valid(&p, NOW + 3600 - 61));
        assert!(!cert_still_valid(&p, NOW + 3600 - 60));
        assert!(!cert_still_valid(&p, NOW - 60 - 301));
        assert!(!cert_still_valid(&d.join("missing"), NOW));
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn reconnects_never_answer_with_the_token() {
        use crate::ssh::AuthPath;
        let d = tmpdir("reconnect");
        let ca = key();
        let me = key();
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
        write_cert(&d, &cert(&ca, me.public_key(), CertType::User, now - 60, now + 3600, &["tunl"])).unwrap();
        let c = d.join(CERT_FILE);
        assert_eq!(reconnect_with_session_id(false, AuthPath::KeyboardInteractive, &c, now), None);
        assert_eq!(reconnect_with_session_id(false, AuthPath::Cert, &c, now + 7200), None);
        assert!(reconnect_with_session_id(true, AuthPath::KeyboardInteractive, &c, now).is_some());
        assert_eq!(reconnect_with_session_id(true, AuthPath::Cert, &c, now), None);
        assert!(reconnect_with_session_id(true, AuthPath::Cert, &c, now + 3600).is_some());
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn known_hosts_and_askpass() {
        let d = tmpdir("kh");
        let ca = key().public_key().to_openssh().unwrap();
        let ca_with_comment = format!("{ca} evil\n@cert-authority * x");
        write_known_hosts(&d, "relay.example", 2222, &ca).unwrap();
        let kh = std::fs::read_to_string(d.join(KNOWN_HOSTS_FILE)).unwrap();
        assert_eq!(kh, format!("@cert-authority [relay.example]:2222,relay.example {}\n", ca.trim()));
        assert_eq!(std::fs::metadata(d.join(KNOWN_HOSTS_FILE)).unwrap().permissions().mode() & 0o777, 0o600);
        // A comment cannot smuggle a second line in: the key is re-encoded without it.
        if write_known_hosts(&d, "relay.example", 22, &ca_with_comment).is_ok() {
            let kh = std::fs::read_to_string(d.join(KNOWN_HOSTS_FILE)).unwrap();
            assert_eq!(kh, format!("@cert-authority relay.example {}\n", ca.trim()));
        }
        write_known_hosts(&d, "127.0.0.1", 22, &format!("{ca} a comment")).unwrap();
        let kh = std::fs::read_to_string(d.join(KNOWN_HOSTS_FILE)).unwrap();
        assert_eq!(kh, format!("@cert-authority 127.0.0.1 {}\n", ca.trim()));
        assert!(write_known_hosts(&d, "bad host", 22, &ca).is_err());

        for secret in ["123456", "it's \"$(x)\" `y` \\", "swift-fox-jumps-barrel"] {
            write_askpass(&d, secret).unwrap();
            let p = d.join(ASKPASS_FILE);
            assert_eq!(std::fs::metadata(&p).unwrap().permissions().mode() & 0o777, 0o700);
            let out = std::process::Command::new(&p).output().unwrap();
            assert_eq!(String::from_utf8(out.stdout).unwrap(), format!("{secret}\n"));
        }
        assert!(write_askpass(&d, "a\nb").is_err());
        assert!(write_askpass(&d, "").is_err());
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn status_mapping() {
        let sid = "swift-fox-jumps-barrel";
        let tok = "123456";
        let e = classify_status(401, r#"{"error":"token 123456 already used\u001b[2J"}"#, None, sid, tok);
        match &e {
            SignError::Rejected(m) => {
                assert!(!m.contains(tok) && !m.contains('\u{1b}') && m.contains("already used"), "{m}");
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(classify_status(404, "", None, sid, tok), SignError::Rejected(m) if m.contains(sid)));
        assert!(
            matches!(classify_status(410, "junk", None, sid, tok), SignError::Rejected(m) if m.contains("expired"))
        );
        assert!(matches!(classify_status(400, "{}", None, sid, tok), SignError::Rejected(_)));
        assert!(matches!(classify_status(403, "{}", None, sid, tok), SignError::Rejected(_)));
        assert_eq!(classify_status(429, "", Some("7"), sid, tok), SignError::RateLimited(7));
        assert_eq!(classify_status(429, "", Some("99999"), sid, tok), SignError::RateLimited(RETRY_AFTER_MAX));
        assert_eq!(
            classify_status(429, "", Some("Wed, 21 Oct 2015 07:28:00 GMT"), sid, tok),
            SignError::RateLimited(10)
        );
        assert_eq!(classify_status(429, "", None, sid, tok), SignError::RateLimited(10));
        assert!(matches!(classify_status(503, "", None, sid, tok), SignError::Server(_)));
        let long = format!("{{\"error\":\"{}\"}}", "x".repeat(5000));
        match classify_status(500, &long, None, sid, tok) {
            SignError::Server(m) => assert!(m.len() < 400, "{}", m.len()),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn success_bodies() {
        assert_eq!(
            certificate_from_body(r#"{"certificate":"ssh-ed25519-cert-v01@openssh.com AAAA"}"#, "1").unwrap(),
            "ssh-ed25519-cert-v01@openssh.com AAAA"
        );
        assert!(matches!(certificate_from_body("{}", "1"), Err(SignError::Bad(_))));
        assert!(matches!(certificate_from_body("<html>", "1"), Err(SignError::Bad(_))));
        assert!(matches!(certificate_from_body(r#"{"certificate":"a\nb"}"#, "1"), Err(SignError::Bad(_))));
    }

    #[test]
    fn unreachable_api_is_unreachable() {
        // A port on loopback where nothing listens: connection refused, quickly.
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        drop(l);
        let api = format!("https://127.0.0.1:{port}");
        let r = request_certificate(&api, "a-b-c-d", "123456", "ssh-ed25519 AAAA", "h", Duration::from_secs(5));
        match r {
            Err(SignError::Unreachable(m)) => assert!(!m.contains("123456"), "{m}"),
            other => panic!("{other:?}"),
        }
    }

    /// A TCP peer that does `what` with the first connection: answers the ClientHello with the given
    /// bytes (then closes), or holds the connection open and silent until the client gives up.
    fn raw_peer(answer: Option<&'static [u8]>) -> (u16, std::thread::JoinHandle<()>) {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let h = std::thread::spawn(move || {
            let (mut sock, _) = l.accept().unwrap();
            let mut buf = [0u8; 4096];
            let _ = sock.read(&mut buf);
            match answer {
                Some(bytes) => {
                    let _ = sock.write_all(bytes);
                }
                // Silent until the client hangs up (its deadline), then done.
                None => while matches!(sock.read(&mut buf), Ok(n) if n > 0) {},
            }
        });
        (port, h)
    }

    /// F25: once TCP is connected, a TLS failure is fatal (Untrusted), never the quiet fallback to
    /// keyboard-interactive; only "nothing answered" (refused, dropped, silent) is Unreachable.
    #[test]
    fn tls_failures_after_connect_are_fatal() {
        let ask = |port: u16, secs: u64| {
            let api = format!("https://127.0.0.1:{port}");
            request_certificate(&api, "a-b-c-d", "123456", "ssh-ed25519 AAAA", "h", Duration::from_secs(secs))
        };
        // A fatal handshake_failure alert, as an on-path attacker would inject it.
        let (port, h) = raw_peer(Some(b"\x15\x03\x03\x00\x02\x02\x28"));
        match ask(port, 10) {
            Err(SignError::Untrusted(m)) => assert!(m.contains("TLS") && !m.contains("123456"), "{m}"),
            other => panic!("alert: {other:?}"),
        }
        h.join().unwrap();
        // Something that is not TLS at all on the HTTPS port.
        let (port, h) = raw_peer(Some(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n"));
        assert!(matches!(ask(port, 10), Err(SignError::Untrusted(_))), "plain HTTP answer");
        h.join().unwrap();
        // Closed without a word: nothing answered.
        let (port, h) = raw_peer(Some(b""));
        assert!(matches!(ask(port, 10), Err(SignError::Unreachable(_))), "closed");
        h.join().unwrap();
        // Accepted but silent: the deadline holds and it counts as nothing answered.
        let (port, h) = raw_peer(None);
        let t = std::time::Instant::now();
        match ask(port, 2) {
            Err(SignError::Unreachable(m)) => assert!(m.contains("timed out"), "{m}"),
            other => panic!("silent: {other:?}"),
        }
        assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
        h.join().unwrap();
    }

    /// A throwaway TLS CA and a leaf for 127.0.0.1 signed by it, made with the openssl tool (webpki
    /// refuses a self-signed CA certificate used as the server's own). `None` without openssl.
    fn tls_material(d: &Path) -> Option<()> {
        let v = std::process::Command::new("openssl").arg("version").output().ok()?;
        if !v.status.success() {
            return None;
        }
        std::fs::write(d.join("leaf.ext"), "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n").unwrap();
        let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"];
        let steps: [Vec<&str>; 3] = [
            [
                &["req", "-x509", "-days", "1"][..],
                &ec,
                &["-subj", "/CN=test CA", "-keyout", "ca.key", "-out", "ca.pem"],
            ]
            .concat(),
            [&["req"][..], &ec, &["-subj", "/CN=127.0.0.1", "-keyout", "k.pem", "-out", "leaf.csr"]].concat(),
            vec!["x509", "-req", "-days", "1", "-in", "leaf.csr", "-CA", "ca.pem", "-CAkey", "ca.key"]
                .into_iter()
                .chain(["-CAcreateserial", "-extfile", "leaf.ext", "-out", "c.pem"])
                .collect(),
        ];
        for a in steps {
            let st = std::process::Command::new("openssl")
                .args(&a)
                .current_dir(d)
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .status()
                .unwrap();
            assert!(st.success(), "openssl {a:?}");
        }
        Some(())
    }

    /// Serve one HTTPS request with a canned answer; the thread returns the request it read.
    fn serve_once(d: &Path, answer: String) -> (u16, std::thread::JoinHandle<String>) {
        use rustls_pki_types::pem::PemObject;
        use rustls_pki_types::{CertificateDer, PrivateKeyDer};
        let certs: Vec<CertificateDer<'static>> =
            CertificateDer::pem_file_iter(d.join("c.pem")).unwrap().map(|c| c.unwrap()).collect();
        let key = PrivateKeyDer::from_pem_file(d.join("k.pem")).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let cfg = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .unwrap();
        let cfg = Arc::new(cfg);
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let h = std::thread::spawn(move || {
            let (sock, _) = l.accept().unwrap();
            let conn = rustls::ServerConnection::new(cfg).unwrap();
            let mut tls = rustls::StreamOwned::new(conn, sock);
            let mut req = Vec::new();
            let mut buf = [0u8; 4096];
            // Read the head, then Content-Length bytes of body.
            loop {
                let Ok(n) = tls.read(&mut buf) else { return String::new() };
                if n == 0 {
                    return String::from_utf8_lossy(&req).into_owned();
                }
                req.extend_from_slice(&buf[..n]);
                let text = String::from_utf8_lossy(&req).into_owned();
                if let Some(head_end) = text.find("\r\n\r\n") {
                    let len = text[..head_end]
                        .lines()
                        .find_map(|l| {
                            l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().to_string())
                        })
                        .and_then(|v| v.parse::<usize>().ok())
                        .unwrap_or(0);
                    if req.len() >= head_end + 4 + len {
                        break;
                    }
                }
            }
            tls.write_all(answer.as_bytes()).unwrap();
            tls.conn.send_close_notify();
            let _ = tls.flush();
            String::from_utf8_lossy(&req).into_owned()
        });
        (port, h)
    }

    fn http(status: &str, extra: &str, body: &str) -> String {
        format!(
            "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n{extra}Connection: close\r\n\r\n{body}",
            body.len()
        )
    }

    #[test]
    fn https_signing_api() {
        let d = tmpdir("tls");
        if tls_material(&d).is_none() {
            eprintln!("no openssl; skipped");
            return;
        }
        let ca = d.join("ca.pem");
        let ask = |port: u16, extra_root: bool| {
            let tls = tls_config(extra_root.then_some(ca.as_os_str()), None).unwrap();
            let api = format!("https://127.0.0.1:{port}/");
            request_with(
                tls,
                &api,
                "swift-fox-jumps-barrel",
                "123456",
                "ssh-ed25519 AAAA x",
                "node1",
                Duration::from_secs(5),
            )
        };

        // Without the extra root: a certificate we cannot verify is Untrusted, never Unreachable.
        let (port, h) = serve_once(&d, http("200 OK", "", "{}"));
        match ask(port, false) {
            Err(SignError::Untrusted(m)) => assert!(m.contains("forged") && !m.contains("123456"), "{m}"),
            other => panic!("{other:?}"),
        }
        let _ = h.join();

        // With it (what SSL_CERT_FILE provides): the request is the documented JSON, the answer used.
        let cert = "ssh-ed25519-cert-v01@openssh.com AAAAtest";
        let (port, h) = serve_once(&d, http("200 OK", "", &json::encode_object(&[("certificate", cert)])));
        assert_eq!(ask(port, true).unwrap(), cert);
        let req = h.join().unwrap();
        assert!(req.starts_with("POST /api/v1/sign HTTP/1.1\r\n"), "{req}");
        let body = &req[req.find("\r\n\r\n").unwrap() + 4..];
        let fields = json::parse_string_object(body).unwrap();
        let get = |k: &str| fields.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
        assert_eq!(get("session_id"), Some("swift-fox-jumps-barrel"));
        assert_eq!(get("token"), Some("123456"));
        assert_eq!(get("public_key"), Some("ssh-ed25519 AAAA x"));
        assert_eq!(get("host"), Some("node1"));

        let (port, h) = serve_once(&d, http("429 Too Many Requests", "Retry-After: 3\r\n", r#"{"error":"slow down"}"#));
        assert_eq!(ask(port, true), Err(SignError::RateLimited(3)));
        let _ = h.join();
        let (port, h) = serve_once(&d, http("401 Unauthorized", "", r#"{"error":"bad token 123456"}"#));
        match ask(port, true) {
            Err(SignError::Rejected(m)) => assert!(m.contains("bad token") && !m.contains("123456"), "{m}"),
            other => panic!("{other:?}"),
        }
        let _ = h.join();
        let (port, h) = serve_once(&d, http("302 Found", "Location: https://elsewhere.example/\r\n", ""));
        assert!(matches!(ask(port, true), Err(SignError::Bad(_))));
        let _ = h.join();
        let (port, h) = serve_once(&d, http("200 OK", "", "<html>hello</html>"));
        assert!(matches!(ask(port, true), Err(SignError::Bad(_))));
        let _ = h.join();
        // The size cap: a body one byte over the JSON limit is refused, not truncated.
        let big = format!("{{\"certificate\":\"{}\"}}", "A".repeat(json::MAX_INPUT));
        let (port, h) = serve_once(&d, http("200 OK", "", &big));
        assert!(matches!(ask(port, true), Err(SignError::Bad(m)) if m.contains("too large")));
        let _ = h.join();
        // Plain http is never used, whatever TUNL_API says.
        let tls = tls_config(None, None).unwrap();
        let plain = request_with(tls, "http://127.0.0.1:1", "a-b-c-d", "123456", "k", "h", Duration::from_secs(5));
        assert!(matches!(plain, Err(SignError::Setup(_))), "{plain:?}");

        let empty = d.join("empty.pem");
        std::fs::write(&empty, "").unwrap();
        assert!(tls_config(Some(empty.as_os_str()), None).is_err());
        assert!(tls_config(Some(d.join("missing.pem").as_os_str()), None).is_err());
        // SSL_CERT_DIR: every PEM file in the directory; other files are skipped.
        assert!(tls_config(None, Some(d.as_os_str())).is_ok());
        std::fs::remove_dir_all(&d).unwrap();
    }
}
