//! The linbit-tunl test relay, built from real parts on loopback (see `docs/architecture.md` and
//! design.md, "The test bed"):
//!
//! - a real `/usr/sbin/sshd` with a host certificate and `TrustedUserCAKeys` from an SSH CA made per
//!   run, whose `ForceCommand` is this crate's own binary (`relay-double shim SOCK`), which hands the
//!   session to the broker;
//! - the broker, a unix socket that turns each session into a [`Conn`] speaking `linbit-tunl/1`;
//! - an HTTPS signing endpoint (rustls, throwaway TLS CA made with `openssl`);
//! - optionally keyboard-interactive through PAM (`pam_exec` + `relay-double pam-check`);
//! - [`TargetSshd`], a second sshd as the customer's SSH target, and [`SupportKey`]/[`support_login`]
//!   to log in as support through a reverse tunnel.
//!
//! Tests must run as root (sshd's per-user ForceCommand session and `/etc/pam.d` for PAM).
//!
//! ```no_run
//! use std::time::{Duration, Instant};
//! use relay_double::{Relay, RelayOpts};
//! let relay = Relay::start(RelayOpts::default()).unwrap();
//! relay.register("alpha-bravo-charlie-delta", Some("123456"));
//! // run the client with relay.env() ...
//! let mut conn = relay.accept(Instant::now() + Duration::from_secs(20)).expect("a session");
//! assert_eq!(conn.hello_field("id"), Some("alpha-bravo-charlie-delta"));
//! conn.welcome(1);
//! conn.wait_verb(Instant::now() + Duration::from_secs(5), "STATE").unwrap();
//! ```

mod api;
mod broker;
pub mod json;
mod target;
pub mod util;

use std::collections::HashMap;
use std::fs;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::AtomicU64;
use std::sync::mpsc::{self, Receiver};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

pub use api::{SignMode, SignRequest};
pub use broker::{Conn, MAX_LINE, chat_line, close_line, k_line, line_field, note_line, upgrade_line};
pub use target::{SupportKey, TargetSshd, support_login};
pub use util::{b64, pct_decode, pct_encode, unb64};

use api::{ApiServer, Session, SignState};
use broker::Broker;
use util::{TempDir, run, write_mode};

/// The sshd binary used for the relay and the target.
pub const SSHD: &str = "/usr/sbin/sshd";

/// Options for [`Relay::start`].
#[derive(Clone, Debug, Default)]
pub struct RelayOpts {
    /// Keyboard-interactive authentication through PAM (needs a writable `/etc/pam.d`; see
    /// [`Relay::ki_supported`]). Off: public keys (certificates) only.
    pub ki: bool,
    /// The sshd host certificate is signed by a CA other than the relay CA.
    pub host_cert_other_ca: bool,
    /// No signing endpoint: `api_url()` points at a closed port.
    pub api_down: bool,
    /// sshd refuses every `tcpip-forward` request (`AllowTcpForwarding no`): a relay that will not
    /// open the reverse tunnel.
    pub refuse_forward: bool,
}

/// A running test relay. Everything it started (sshd, threads, sockets, temp dir, the per-instance
/// PAM service file) is stopped and removed on drop.
pub struct Relay {
    sshd: Child,
    port: u16,
    api: Option<ApiServer>,
    api_port: u16,
    broker: Option<Broker>,
    conns: Mutex<Receiver<Conn>>,
    state: Arc<SignState>,
    ca_pub: String,
    tls_ca: PathBuf,
    user: String,
    ki_dir: Option<PathBuf>,
    pam_file: Option<PathBuf>,
    sshd_log: PathBuf,
    dir: TempDir,
}

impl std::fmt::Debug for Relay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Relay").field("dir", &self.dir.path()).field("port", &self.port).finish_non_exhaustive()
    }
}

/// True if this process can install a PAM service (root and a writable `/etc/pam.d`).
pub fn ki_supported() -> bool {
    let probe = Path::new("/etc/pam.d").join(format!(".relay-double-probe-{}", std::process::id()));
    let ok = fs::write(&probe, b"").is_ok();
    let _ = fs::remove_file(&probe);
    ok && Path::new(SSHD).exists()
}

/// The `relay-double` binary, for sshd's ForceCommand and PAM's `pam_exec`.
///
/// Integration tests of the main crate do not get `CARGO_BIN_EXE_relay-double` (cargo only sets it for
/// the relay crate's own tests), so the binary is found or built on demand:
/// 1. `$TUNL_RELAY_BIN` if set;
/// 2. the current executable if it is `relay-double` itself (the standalone `serve`);
/// 3. otherwise, once per process, `$CARGO build -p relay-double --bin relay-double` (`--release` when the
///    test executable lives in a `release` profile dir) is run for the workspace, so the binary is never
///    stale, and `relay-double` next to the test executable (`target/PROFILE/`, the parent of `deps/`) is
///    used. If the build cannot run, an existing binary there is used as it is.
pub fn relay_binary() -> io::Result<PathBuf> {
    static BIN: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    BIN.get_or_init(find_or_build_binary).clone().map_err(io::Error::other)
}

fn find_or_build_binary() -> Result<PathBuf, String> {
    if let Some(p) = std::env::var_os("TUNL_RELAY_BIN") {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    if exe.file_name().is_some_and(|n| n == "relay-double") {
        return Ok(exe);
    }
    let mut dir = exe.parent().ok_or("no exe dir")?.to_path_buf();
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir.pop();
    }
    let candidate = dir.join("relay-double");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml");
    let mut cmd = Command::new(cargo);
    cmd.args(["build", "--quiet", "-p", "relay-double", "--bin", "relay-double", "--manifest-path"]).arg(&manifest);
    if dir.file_name().is_some_and(|n| n == "release") {
        cmd.arg("--release");
    }
    let built = cmd.stdin(Stdio::null()).status();
    if candidate.is_file() {
        return Ok(candidate);
    }
    Err(format!("relay-double binary not found at {} (cargo build: {built:?})", candidate.display()))
}

impl Relay {
    /// Starts the relay: temp dir, SSH CA, TLS CA, broker, signing endpoint and sshd.
    pub fn start(opts: RelayOpts) -> io::Result<Relay> {
        if opts.ki && !ki_supported() {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                "keyboard-interactive needs a writable /etc/pam.d",
            ));
        }
        let bin = relay_binary()?;
        let dir = TempDir::new("relay-double")?;
        let d = dir.path().to_path_buf();
        let user = util::current_user();

        // SSH CAs (ours and a stranger's), host key and host certificate.
        let keygen = |file: &Path, comment: &str| {
            run(Command::new("ssh-keygen").args(["-q", "-t", "ed25519", "-N", "", "-C", comment, "-f"]).arg(file))
        };
        let ca = d.join("ca");
        let other_ca = d.join("other-ca");
        let host_key = d.join("host_ed25519");
        keygen(&ca, "relay-double test CA")?;
        keygen(&other_ca, "some other CA")?;
        keygen(&host_key, "relay-double host")?;
        let host_signer = if opts.host_cert_other_ca { &other_ca } else { &ca };
        run(Command::new("ssh-keygen")
            .arg("-q")
            .arg("-s")
            .arg(host_signer)
            .args(["-h", "-I", "relay-double-host", "-n", "127.0.0.1,localhost", "-V", "-5m:+1d"])
            .arg(d.join("host_ed25519.pub")))?;
        let ca_pub = fs::read_to_string(d.join("ca.pub"))?.trim().to_string();

        // Broker.
        let (tx, rx) = mpsc::channel();
        let sock = d.join("broker.sock");
        let broker = Broker::start(&sock, tx)?;

        // Signing endpoint.
        let (tls_ca, crt, key) = api::make_tls(&d)?;
        let state = Arc::new(SignState {
            mode: Mutex::new(SignMode::Normal),
            sessions: Mutex::new(HashMap::new()),
            requests: Mutex::new(Vec::new()),
            dir: d.clone(),
            ca_key: ca.clone(),
            other_ca_key: other_ca.clone(),
            principal: user.clone(),
            counter: AtomicU64::new(0),
        });
        let (api, api_port) = if opts.api_down {
            (None, util::free_port()?)
        } else {
            let a = ApiServer::start(&crt, &key, state.clone())?;
            let p = a.port();
            (Some(a), p)
        };

        // sshd runs through a symlink with a per-instance name: OpenSSH uses its program name as the PAM
        // service (verified on Debian 12's OpenSSH 9.2: it opens /etc/pam.d/<argv0 basename>).
        let service = format!("relay-double-sshd-{}", dir.tag());
        let sshd_link = d.join(&service);
        std::os::unix::fs::symlink(SSHD, &sshd_link)?;
        let mut pam_file = None;
        let mut ki_dir = None;
        if opts.ki {
            let kd = d.join("ki");
            fs::create_dir(&kd)?;
            fs::set_permissions(&kd, fs::Permissions::from_mode(0o700))?;
            let pf = Path::new("/etc/pam.d").join(&service);
            fs::write(
                &pf,
                format!(
                    "# linbit-tunl test relay {} (removed when the relay stops)\n\
                     auth required pam_exec.so expose_authtok quiet {} pam-check {}\n\
                     auth optional pam_permit.so\n\
                     account required pam_permit.so\n\
                     session required pam_permit.so\n",
                    d.display(),
                    bin.display(),
                    kd.display()
                ),
            )?;
            pam_file = Some(pf);
            ki_dir = Some(kd);
        }
        fs::create_dir_all("/run/sshd")?; // privilege separation dir, missing in fresh containers
        let sshd_log = d.join("sshd.log");

        let mut last_err = io::Error::other("sshd did not start");
        for _attempt in 0..5 {
            let port = util::free_port()?;
            let cfg = d.join("sshd_config");
            let ki = if opts.ki { "yes" } else { "no" };
            let fwd = if opts.refuse_forward { "no" } else { "remote" };
            // SetEnv SHLVL=1: sshd runs ForceCommand through root's login shell, and bash sources
            // ~/.bashrc for an ssh command unless it is a nested shell. Whatever a machine's root
            // keeps there (pyenv's rehash waits a minute on a lock a killed shell left) must not
            // decide whether a test relay answers in time.
            fs::write(
                &cfg,
                format!(
                    "Port {port}\nListenAddress 127.0.0.1\nHostKey {hk}\nHostCertificate {hk}-cert.pub\n\
                     SetEnv SHLVL=1\n\
                     TrustedUserCAKeys {ca}.pub\nAuthorizedKeysFile none\nPubkeyAuthentication yes\n\
                     KbdInteractiveAuthentication {ki}\nUsePAM {ki}\nPasswordAuthentication no\n\
                     PermitRootLogin yes\nStrictModes no\nAllowTcpForwarding {fwd}\nGatewayPorts no\n\
                     X11Forwarding no\nPermitTTY no\nPrintMotd no\nUseDNS no\nMaxAuthTries 10\n\
                     MaxStartups 100\nLogLevel VERBOSE\nPidFile {dir}/sshd.pid\n\
                     ForceCommand {bin} shim {sock}\n",
                    hk = host_key.display(),
                    ca = ca.display(),
                    dir = d.display(),
                    bin = bin.display(),
                    sock = sock.display(),
                ),
            )?;
            let log = fs::OpenOptions::new().create(true).append(true).open(&sshd_log)?;
            let mut child = Command::new(&sshd_link)
                .args(["-D", "-e", "-f"])
                .arg(&cfg)
                .stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log)
                .spawn()?;
            let deadline = Instant::now() + Duration::from_secs(10);
            let mut exited = false;
            let up = util::wait_until(deadline, || {
                exited = matches!(child.try_wait(), Ok(Some(_)));
                exited || util::port_open(port)
            });
            if up && !exited {
                return Ok(Relay {
                    sshd: child,
                    port,
                    api,
                    api_port,
                    broker: Some(broker),
                    conns: Mutex::new(rx),
                    state,
                    ca_pub,
                    tls_ca,
                    user,
                    ki_dir,
                    pam_file,
                    sshd_log,
                    dir,
                });
            }
            util::stop_child(&mut child);
            last_err = io::Error::other(format!(
                "sshd did not start on port {port}: {}",
                fs::read_to_string(&sshd_log).unwrap_or_default().trim()
            ));
        }
        if let Some(pf) = pam_file {
            let _ = fs::remove_file(pf);
        }
        Err(last_err)
    }

    /// The relay CA's public key line (`ssh-ed25519 AAAA... comment`), for `TUNL_RELAY_CA_PUBKEY`.
    pub fn ca_pubkey(&self) -> &str {
        &self.ca_pub
    }

    /// A `known_hosts` line that trusts the relay CA for 127.0.0.1 and localhost.
    pub fn known_hosts_line(&self) -> String {
        format!("@cert-authority 127.0.0.1,[127.0.0.1]:{},localhost {}", self.port, self.ca_pub)
    }

    /// The relay's SSH port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The login user, also the principal of signed certificates.
    pub fn user(&self) -> &str {
        &self.user
    }

    /// `https://127.0.0.1:PORT` (a closed port with `api_down`).
    pub fn api_url(&self) -> String {
        format!("https://127.0.0.1:{}", self.api_port)
    }

    /// The TLS CA (PEM) that signed the endpoint's certificate; give it to the client as `SSL_CERT_FILE`.
    pub fn tls_ca_file(&self) -> &Path {
        &self.tls_ca
    }

    /// The relay's private temp dir.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// sshd's log so far (for assertions and failure messages).
    pub fn sshd_log(&self) -> String {
        fs::read_to_string(&self.sshd_log).unwrap_or_default()
    }

    /// The environment the client needs: TUNL_RELAY, TUNL_RELAY_PORT, TUNL_USER, TUNL_API,
    /// TUNL_RELAY_CA_PUBKEY, SSL_CERT_FILE.
    pub fn env(&self) -> Vec<(String, String)> {
        [
            ("TUNL_RELAY", "127.0.0.1".to_string()),
            ("TUNL_RELAY_PORT", self.port.to_string()),
            ("TUNL_USER", self.user.clone()),
            ("TUNL_API", self.api_url()),
            ("TUNL_RELAY_CA_PUBKEY", self.ca_pub.clone()),
            ("SSL_CERT_FILE", self.tls_ca.display().to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }

    /// Registers a session for the signing endpoint (with a one-time token) and, with `ki`, as an
    /// accepted keyboard-interactive answer (the session ID, and the token if any).
    pub fn register(&self, session_id: &str, token: Option<&str>) {
        self.state.sessions.lock().unwrap().insert(
            session_id.to_string(),
            Session { token: token.map(str::to_string), token_spent: false, expired: false },
        );
        if let Some(kd) = &self.ki_dir {
            for secret in std::iter::once(session_id).chain(token) {
                let _ = write_mode(&kd.join(util::hex(secret.as_bytes())), b"", 0o600);
            }
        }
    }

    /// Stops accepting `secret` as a keyboard-interactive answer, as a relay that spends a token on
    /// its first use does.
    pub fn spend_ki_answer(&self, secret: &str) {
        if let Some(kd) = &self.ki_dir {
            let _ = fs::remove_file(kd.join(util::hex(secret.as_bytes())));
        }
    }

    /// Marks a registered session as expired (the endpoint answers 410) and no longer accepted by PAM.
    pub fn expire(&self, session_id: &str) {
        let mut sessions = self.state.sessions.lock().unwrap();
        if let Some(s) = sessions.get_mut(session_id) {
            s.expired = true;
            if let Some(kd) = &self.ki_dir {
                for secret in std::iter::once(session_id).chain(s.token.as_deref()) {
                    let _ = fs::remove_file(kd.join(util::hex(secret.as_bytes())));
                }
            }
        }
    }

    /// Changes how the signing endpoint behaves from now on.
    pub fn set_sign_mode(&self, mode: SignMode) {
        *self.state.mode.lock().unwrap() = mode;
    }

    /// Every request the signing endpoint received, in order.
    pub fn sign_requests(&self) -> Vec<SignRequest> {
        self.state.requests.lock().unwrap().clone()
    }

    /// The next client session that reached the broker, waiting until the deadline.
    pub fn accept(&self, deadline: Instant) -> Option<Conn> {
        let wait = deadline.saturating_duration_since(Instant::now());
        self.conns.lock().unwrap().recv_timeout(wait).ok()
    }

    /// Signs `public_key_file` as a user certificate for [`Relay::user`] with the relay CA (what the
    /// endpoint does, without HTTP); returns the certificate path.
    pub fn sign_user_key(&self, public_key_file: &Path, key_id: &str) -> io::Result<PathBuf> {
        run(Command::new("ssh-keygen")
            .arg("-q")
            .arg("-s")
            .arg(&self.state.ca_key)
            .args(["-I", key_id, "-n", &self.user, "-V", "-5m:+1h"])
            .arg(public_key_file))?;
        let name = public_key_file.file_name().and_then(|n| n.to_str()).unwrap_or("key.pub");
        Ok(public_key_file.with_file_name(format!("{}-cert.pub", name.trim_end_matches(".pub"))))
    }

    /// The private key of a CA that is not the relay CA (to make certificates the relay must refuse).
    pub fn other_ca_key(&self) -> &Path {
        &self.state.other_ca_key
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        // Closing the broker ends every session (the shims exit), then sshd and its children stop.
        self.broker.take();
        self.api.take();
        util::stop_child(&mut self.sshd);
        if let Some(pf) = self.pam_file.take() {
            let _ = fs::remove_file(pf);
        }
    }
}
