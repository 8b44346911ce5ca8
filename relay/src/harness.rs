//! A real relay for tests: `tunl-relay init --root` on a fresh temp prefix with
//! throwaway accounts, `tunl-relay serve` on free loopback ports, the environment a client needs,
//! and everything (processes, accounts, the PAM service, files) removed on drop. Needs root.
//!
//! ```no_run
//! let mut relay = tunl_relay::harness::Relay::start().unwrap();
//! let (id, token) = relay.create_session("CASE-1", false);
//! // run `linbit-tunl --token TOKEN ID` with relay.env() ...
//! let engineer = relay.add_support_user().unwrap();
//! // ssh -i engineer.key -p relay.port() engineer.name@127.0.0.1 -- "tunl-support/1 list"
//! ```

use std::fs;
use std::io;
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::{PermissionsExt, chown};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::accounts;
use crate::layout::{Config, Layout};
use crate::registry::{NewSession, Registry, Sqlite};

/// The `tunl-relay` binary the relay runs (ForceCommand, PAM, API).
///
/// 1. `$TUNL_RELAY_BIN` if set;
/// 2. otherwise, once per process, `cargo build -p tunl-relay --bin tunl-relay` for the workspace
///    (so it is never stale) and `tunl-relay` next to the test executable (`target/PROFILE/`).
pub fn binary() -> io::Result<PathBuf> {
    if let Some(p) = OVERRIDE.get() {
        return Ok(p.clone());
    }
    static BIN: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    BIN.get_or_init(find_or_build).clone().map_err(io::Error::other)
}

static OVERRIDE: OnceLock<PathBuf> = OnceLock::new();

/// The relay crate's own tests pass `env!("CARGO_BIN_EXE_tunl-relay")`: the binary cargo just built
/// for them, so no second build with other features overwrites it.
pub fn use_binary(path: impl Into<PathBuf>) {
    let _ = OVERRIDE.set(path.into());
}

fn find_or_build() -> Result<PathBuf, String> {
    if let Some(p) = std::env::var_os("TUNL_RELAY_BIN") {
        return Ok(PathBuf::from(p));
    }
    build_sibling("tunl-relay", "tunl-relay")
}

/// Builds `package`'s `bin` for the workspace and returns it from the test executable's
/// `target/PROFILE/` directory.
fn build_sibling(package: &str, bin: &str) -> Result<PathBuf, String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let mut dir = exe.parent().ok_or("no exe dir")?.to_path_buf();
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir.pop();
    }
    let candidate = dir.join(bin);
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml");
    let mut cmd = Command::new(cargo);
    cmd.args(["build", "--quiet", "-p", package, "--bin", bin, "--manifest-path"]).arg(&manifest);
    if dir.file_name().is_some_and(|n| n == "release") {
        cmd.arg("--release");
    }
    let built = cmd.stdin(Stdio::null()).status();
    if candidate.is_file() {
        return Ok(candidate);
    }
    Err(format!("{bin} binary not found at {} (cargo build: {built:?})", candidate.display()))
}

/// The client binary (`linbit-tunl`), built for the workspace on first use like [`binary`]
/// (`$TUNL_CLIENT_BIN` overrides).
pub fn client_binary() -> io::Result<PathBuf> {
    static BIN: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(p) = std::env::var_os("TUNL_CLIENT_BIN") {
            return Ok(PathBuf::from(p));
        }
        build_sibling("linbit-tunl", "linbit-tunl")
    })
    .clone()
    .map_err(io::Error::other)
}

fn free_port() -> io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn port_open(port: u16) -> bool {
    TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_millis(200)).is_ok()
}

/// Polls `cond` until it holds or the deadline passes.
pub fn wait_until(deadline: Instant, mut cond: impl FnMut() -> bool) -> bool {
    let mut pause = Duration::from_millis(5);
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(100));
    }
}

fn random_tag() -> String {
    let mut b = [0u8; 4];
    getrandom::getrandom(&mut b).expect("random");
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// A throwaway support engineer: an account in the relay's support group with its own key.
#[derive(Debug)]
pub struct SupportUser {
    pub name: String,
    /// The private key file (mode 0600, root's) for `ssh -i`.
    pub key: PathBuf,
}

/// A running relay under a temp root. Dropping it ends `serve` (and with it sshd, the API and every
/// session process), removes the accounts it made and the temp root.
pub struct Relay {
    pub layout: Layout,
    pub cfg: Config,
    serve: Option<Child>,
    log: PathBuf,
    tag: String,
    users: Vec<String>,
}

impl Relay {
    /// init + serve with default options.
    pub fn start() -> io::Result<Relay> {
        Relay::start_with(&[])
    }

    /// init (with `extra` options, e.g. `["--idle-minutes", "1"]`) + serve.
    pub fn start_with(extra: &[&str]) -> io::Result<Relay> {
        let bin = binary()?;
        let tag = random_tag();
        let root = std::env::temp_dir().join(format!("tunl-relay-test-{tag}"));
        fs::create_dir(&root)?;
        // The accounts traverse it (sshd reads support keys as the user; produce runs as tunl).
        fs::set_permissions(&root, fs::Permissions::from_mode(0o755))?;
        let mut relay = Relay {
            layout: Layout::new(&root),
            cfg: Config {
                port: 0,
                api_port: 0,
                customer_user: format!("trc-{tag}"),
                support_group: format!("trs-{tag}"),
                pam_service: format!("tunl-relay-{tag}"),
                binary: bin.clone(),
                listen: "127.0.0.1".into(),
                idle_minutes: 0,
                retain_days: 0,
            },
            serve: None,
            log: root.join("serve.log"),
            tag,
            users: Vec::new(),
        };
        let mut last = io::Error::other("relay did not start");
        for _attempt in 0..3 {
            let (port, api_port) = (free_port()?, free_port()?);
            if port == api_port {
                continue;
            }
            let out = Command::new(&bin)
                .arg("init")
                .arg("--root")
                .arg(&root)
                .args(["--port", &port.to_string(), "--api-port", &api_port.to_string()])
                .args(["--customer-user", &relay.cfg.customer_user, "--support-group", &relay.cfg.support_group])
                .args(["--pam-service", &relay.cfg.pam_service, "--listen", "127.0.0.1", "--tls-self-signed"])
                .args(extra)
                .stdin(Stdio::null())
                .output()?;
            // Accounts exist from here on, even if init failed later: remember them for drop.
            relay.users = vec![relay.cfg.customer_user.clone()];
            if !out.status.success() {
                return Err(io::Error::other(format!("init failed: {}", String::from_utf8_lossy(&out.stderr).trim())));
            }
            relay.cfg = Config::load(&relay.layout)?;
            let log = fs::OpenOptions::new().create(true).append(true).open(&relay.log)?;
            let mut child = Command::new(&bin)
                .arg("serve")
                .arg("--root")
                .arg(&root)
                .stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log)
                .spawn()?;
            let mut exited = false;
            let up = wait_until(Instant::now() + Duration::from_secs(20), || {
                exited = matches!(child.try_wait(), Ok(Some(_)));
                exited || (port_open(port) && port_open(api_port))
            });
            if up && !exited {
                relay.serve = Some(child);
                return Ok(relay);
            }
            let _ = child.kill();
            let _ = child.wait();
            last = io::Error::other(format!("serve did not come up: {}", relay.log_text()));
        }
        Err(last)
    }

    /// The sshd instance's port.
    pub fn port(&self) -> u16 {
        self.cfg.port
    }

    pub fn api_url(&self) -> String {
        format!("https://127.0.0.1:{}", self.cfg.api_port)
    }

    /// The relay CA's public key line.
    pub fn ca_pubkey(&self) -> String {
        fs::read_to_string(self.layout.release_ca_line()).unwrap_or_default().trim().to_string()
    }

    /// The throwaway TLS CA that signed the API's certificate.
    pub fn tls_ca(&self) -> PathBuf {
        self.layout.etc().join("tls/ca.pem")
    }

    /// What a client needs to reach this relay: TUNL_RELAY, TUNL_RELAY_PORT, TUNL_USER, TUNL_API,
    /// TUNL_RELAY_CA_PUBKEY, SSL_CERT_FILE.
    pub fn env(&self) -> Vec<(String, String)> {
        [
            ("TUNL_RELAY", "127.0.0.1".to_string()),
            ("TUNL_RELAY_PORT", self.port().to_string()),
            ("TUNL_USER", self.cfg.customer_user.clone()),
            ("TUNL_API", self.api_url()),
            ("TUNL_RELAY_CA_PUBKEY", self.ca_pubkey()),
            ("SSL_CERT_FILE", self.tls_ca().display().to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }

    /// The registry, opened as root (tests create and inspect sessions through it).
    pub fn registry(&self) -> Sqlite {
        Sqlite::open(&self.layout.registry_db()).expect("the relay's registry")
    }

    /// A pending session waiting 30 minutes for its customer: its ID and token.
    pub fn create_session(&self, case: &str, restricted: bool) -> (String, String) {
        let n = NewSession {
            case: case.into(),
            customer: "test customer".into(),
            created_by: "harness".into(),
            expires_minutes: 30,
            restricted,
            relay_host: "127.0.0.1".into(),
        };
        let (s, token) = self.registry().create(&n, crate::now()).expect("create a session");
        (s.id, token)
    }

    /// A new support engineer account (member of the support group) with an ed25519 key in its
    /// `~/.ssh/authorized_keys`; removed on drop.
    pub fn add_support_user(&mut self) -> io::Result<SupportUser> {
        let name = format!("tre{}-{}", self.users.len(), self.tag);
        let home = self.layout.root.join("home").join(&name);
        fs::create_dir_all(home.parent().unwrap_or(&self.layout.root))?;
        fs::set_permissions(home.parent().unwrap_or(&self.layout.root), fs::Permissions::from_mode(0o755))?;
        let out = Command::new("useradd")
            .args(["--create-home", "--shell", "/bin/sh", "--groups", &self.cfg.support_group, "--home-dir"])
            .arg(&home)
            .arg(&name)
            .stdin(Stdio::null())
            .output()?;
        if !out.status.success() {
            return Err(io::Error::other(format!("useradd {name}: {}", String::from_utf8_lossy(&out.stderr).trim())));
        }
        self.users.push(name.clone());
        let u = accounts::user(&name).ok_or_else(|| io::Error::other("new account not found"))?;
        let keys = self.layout.root.join("keys");
        fs::create_dir_all(&keys)?;
        fs::set_permissions(&keys, fs::Permissions::from_mode(0o700))?;
        let key = keys.join(&name);
        let out = Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-C", &name, "-f"])
            .arg(&key)
            .stdin(Stdio::null())
            .output()?;
        if !out.status.success() {
            return Err(io::Error::other("ssh-keygen failed"));
        }
        let ssh = home.join(".ssh");
        fs::create_dir_all(&ssh)?;
        fs::set_permissions(&ssh, fs::Permissions::from_mode(0o700))?;
        fs::copy(key.with_extension("pub"), ssh.join("authorized_keys"))?;
        for p in [&ssh, &ssh.join("authorized_keys")] {
            chown(p, Some(u.uid), Some(u.gid))?;
        }
        Ok(SupportUser { name, key })
    }

    /// `ssh` arguments that log `user` in to this relay (no config, known host pinned by the CA).
    pub fn support_ssh_args(&self, user: &SupportUser) -> Vec<String> {
        let kh = self.layout.root.join("keys/known_hosts");
        let _ = fs::write(&kh, format!("@cert-authority [127.0.0.1]:{} {}\n", self.port(), self.ca_pubkey()));
        vec![
            "-F".into(),
            "/dev/null".into(),
            "-i".into(),
            user.key.display().to_string(),
            "-o".into(),
            "IdentitiesOnly=yes".into(),
            "-o".into(),
            format!("UserKnownHostsFile={}", kh.display()),
            "-o".into(),
            "GlobalKnownHostsFile=/dev/null".into(),
            "-o".into(),
            "StrictHostKeyChecking=yes".into(),
            "-o".into(),
            "BatchMode=yes".into(),
            "-p".into(),
            self.port().to_string(),
            "-l".into(),
            user.name.clone(),
            "127.0.0.1".into(),
        ]
    }

    /// What `serve`, sshd, the API and the session processes wrote on stderr so far.
    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Ends `serve` (SIGTERM) and waits for it; true if it ended by itself within 20 s.
    pub fn stop(&mut self) -> bool {
        let Some(mut child) = self.serve.take() else { return true };
        // SAFETY: kill(2) on the pid of our own child, which we have not reaped yet.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let ended = wait_until(Instant::now() + Duration::from_secs(20), || matches!(child.try_wait(), Ok(Some(_))));
        if !ended {
            let _ = child.kill();
            let _ = child.wait();
        }
        ended
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop();
        for u in self.users.iter().rev() {
            let _ = accounts::remove_user(u);
        }
        let _ = accounts::remove_group(&self.cfg.support_group);
        let _ = fs::remove_file(Path::new("/etc/pam.d").join(&self.cfg.pam_service));
        if std::env::var_os("TUNL_RELAY_KEEP").is_none() {
            let _ = fs::remove_dir_all(&self.layout.root);
        }
    }
}
