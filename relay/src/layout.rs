//! Where the relay keeps its files, and the small configuration `init` writes. Every subcommand
//! takes `--root DIR` (default `/`) and finds everything else from here, so a test or the demo runs
//! a whole relay under a temporary prefix.

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

/// The directory layout under a root prefix.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Layout {
    pub root: PathBuf,
}

impl Layout {
    pub fn new(root: impl Into<PathBuf>) -> Layout {
        Layout { root: root.into() }
    }

    fn under(&self, rel: &str) -> PathBuf {
        self.root.join(rel)
    }

    /// Configuration: `sshd_config`, `relay.conf`, the host key and certificate, the TLS files.
    pub fn etc(&self) -> PathBuf {
        self.under("etc/tunl-relay")
    }
    /// Long-lived state: the CA, the registry, recordings, audit logs.
    pub fn state(&self) -> PathBuf {
        self.under("var/lib/tunl-relay")
    }
    /// Sockets and pid files of running processes.
    pub fn run(&self) -> PathBuf {
        self.under("run/tunl-relay")
    }
    /// systemd units (`init` writes them; under a test root nobody starts them).
    pub fn systemd(&self) -> PathBuf {
        self.under("etc/systemd/system")
    }
    pub fn config_file(&self) -> PathBuf {
        self.etc().join("relay.conf")
    }
    pub fn sshd_config(&self) -> PathBuf {
        self.etc().join("sshd_config")
    }
    /// The SSH CA's private half (0600 root); its public half is `ca_key().with_extension("pub")`.
    pub fn ca_key(&self) -> PathBuf {
        self.state().join("ca/relay_ca")
    }
    pub fn ca_pub(&self) -> PathBuf {
        self.state().join("ca/relay_ca.pub")
    }
    /// The line a client release embeds as `keys/relay-ca.pub`.
    pub fn release_ca_line(&self) -> PathBuf {
        self.etc().join("relay-ca.pub")
    }
    pub fn host_key(&self) -> PathBuf {
        self.etc().join("ssh_host_ed25519_key")
    }
    pub fn host_cert(&self) -> PathBuf {
        self.etc().join("ssh_host_ed25519_key-cert.pub")
    }
    /// `TrustedUserCAKeys` of the sshd instance.
    pub fn trusted_user_ca(&self) -> PathBuf {
        self.etc().join("trusted_user_ca.pub")
    }
    /// The API's TLS certificate chain and key (PEM), reloaded on SIGHUP.
    pub fn tls_cert(&self) -> PathBuf {
        self.etc().join("tls/cert.pem")
    }
    pub fn tls_key(&self) -> PathBuf {
        self.etc().join("tls/key.pem")
    }
    /// The registry's directory (group of the support accounts, setgid: SQLite's `-wal` and `-shm`
    /// files are created by whichever process writes first).
    pub fn registry_dir(&self) -> PathBuf {
        self.state().join("registry")
    }
    pub fn registry_db(&self) -> PathBuf {
        self.registry_dir().join("registry.db")
    }
    pub fn recordings(&self) -> PathBuf {
        self.state().join("recordings")
    }
    pub fn audit(&self) -> PathBuf {
        self.state().join("audit")
    }
    /// Per-session sockets: `RUN/s/SID/customer.sock`, `RUN/s/SID/support.sock`.
    pub fn session_run(&self, sid: &str) -> PathBuf {
        self.run().join("s").join(sid)
    }
    pub fn sshd_pid(&self) -> PathBuf {
        self.run().join("sshd.pid")
    }
    /// sshd runs through a symlink named after the instance's PAM service: OpenSSH (9.2, Debian 12)
    /// opens `/etc/pam.d/<its program name>`, so this instance's PAM stack is its own.
    pub fn sshd_link(&self, service: &str) -> PathBuf {
        self.etc().join("sbin").join(service)
    }
    /// The PAM service file `init` writes (`/etc/pam.d/SERVICE` for the real root; under a test root
    /// `serve` installs a copy in `/etc/pam.d` while it runs, since PAM reads nothing else).
    pub fn pam_file(&self, service: &str) -> PathBuf {
        self.under("etc/pam.d").join(service)
    }
    /// The home of the customers' account: empty and root's, so no start-up file can appear there.
    pub fn customer_home(&self) -> PathBuf {
        self.state().join("home")
    }
    /// The API's listening socket address and pid (for `serve` and `status`).
    pub fn api_pid(&self) -> PathBuf {
        self.run().join("api.pid")
    }
}

/// What `init` decided, read back by every other subcommand (`key=value` lines, `#` comments).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    /// The sshd instance's port (clients' `TUNL_RELAY_PORT`).
    pub port: u16,
    /// The signing API's port.
    pub api_port: u16,
    /// The account customers log in as (`TUNL_USER`).
    pub customer_user: String,
    /// The group of the support engineers' accounts.
    pub support_group: String,
    /// The PAM service name of this sshd instance (also the name sshd runs under).
    pub pam_service: String,
    /// The absolute path of the `tunl-relay` binary that ForceCommand and PAM run.
    pub binary: PathBuf,
    /// Address the sshd instance and the API listen on.
    pub listen: String,
    /// Minutes a live session may stay idle before `expire` ends it.
    pub idle_minutes: u64,
    /// Days recordings and audit logs are kept.
    pub retain_days: u64,
}

impl Config {
    pub fn render(&self) -> String {
        format!(
            "# tunl-relay configuration, written by `tunl-relay init`\n\
             port={}\napi_port={}\ncustomer_user={}\nsupport_group={}\npam_service={}\nbinary={}\n\
             listen={}\nidle_minutes={}\nretain_days={}\n",
            self.port,
            self.api_port,
            self.customer_user,
            self.support_group,
            self.pam_service,
            self.binary.display(),
            self.listen,
            self.idle_minutes,
            self.retain_days
        )
    }

    /// Strict: every key must be present and well-formed; unknown keys are refused so a typo is
    /// not silently ignored.
    pub fn parse(text: &str) -> Result<Config, String> {
        let mut m = BTreeMap::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (k, v) = line.split_once('=').ok_or_else(|| format!("line {}: expected key=value", n + 1))?;
            if m.insert(k.trim().to_string(), v.trim().to_string()).is_some() {
                return Err(format!("line {}: {} given twice", n + 1, k.trim()));
            }
        }
        let mut take = |k: &str| m.remove(k).ok_or_else(|| format!("missing {k}"));
        let num = |k: &str, v: String| v.parse::<u64>().map_err(|_| format!("{k}: not a number: {v}"));
        let port = num("port", take("port")?)?;
        let api_port = num("api_port", take("api_port")?)?;
        let cfg = Config {
            port: u16::try_from(port).map_err(|_| "port: out of range".to_string())?,
            api_port: u16::try_from(api_port).map_err(|_| "api_port: out of range".to_string())?,
            customer_user: take("customer_user")?,
            support_group: take("support_group")?,
            pam_service: take("pam_service")?,
            binary: PathBuf::from(take("binary")?),
            listen: take("listen")?,
            idle_minutes: num("idle_minutes", take("idle_minutes")?)?,
            retain_days: num("retain_days", take("retain_days")?)?,
        };
        if let Some(k) = m.keys().next() {
            return Err(format!("unknown key {k}"));
        }
        Ok(cfg)
    }

    pub fn load(layout: &Layout) -> io::Result<Config> {
        let path = layout.config_file();
        let text = fs::read_to_string(&path)
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {e} (run `tunl-relay init` first)", path.display())))?;
        Config::parse(&text).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("{}: {e}", path.display())))
    }
}

/// The root given on the command line, or `/`.
pub fn root_or_default(root: Option<&Path>) -> Layout {
    Layout::new(root.unwrap_or(Path::new("/")))
}

#[cfg(test)]
impl Config {
    /// The configuration the unit tests of several modules render from.
    pub(crate) fn sample() -> Config {
        Config {
            port: 2222,
            api_port: 8443,
            customer_user: "tunl".into(),
            support_group: "tunl-support".into(),
            pam_service: "tunl-relay-sshd".into(),
            binary: "/usr/local/bin/tunl-relay".into(),
            listen: "0.0.0.0".into(),
            idle_minutes: 120,
            retain_days: 90,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_round_trips() {
        assert_eq!(Config::parse(&Config::sample().render()), Ok(Config::sample()));
    }

    #[test]
    fn config_is_strict() {
        let t = Config::sample().render();
        assert!(Config::parse(&t.replace("port=2222", "port=x")).unwrap_err().contains("port"));
        assert!(Config::parse(&format!("{t}bogus=1\n")).unwrap_err().contains("unknown key bogus"));
        assert!(Config::parse(&format!("{t}port=1\n")).unwrap_err().contains("twice"));
        assert!(Config::parse(&t.replace("listen=0.0.0.0\n", "")).unwrap_err().contains("missing listen"));
    }

    #[test]
    fn layout_is_under_root() {
        let l = Layout::new("/tmp/x");
        assert_eq!(l.registry_db(), Path::new("/tmp/x/var/lib/tunl-relay/registry/registry.db"));
        assert_eq!(l.session_run("a-b-c-d"), Path::new("/tmp/x/run/tunl-relay/s/a-b-c-d"));
        assert_eq!(Layout::new("/").sshd_config(), Path::new("/etc/tunl-relay/sshd_config"));
    }
}
