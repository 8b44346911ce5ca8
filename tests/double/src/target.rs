//! The customer's SSH target (a second real sshd) and the support side's key and login.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::util::{self, TempDir, run};

/// A real sshd on 127.0.0.1 that accepts public keys from one authorized_keys file only.
pub struct TargetSshd {
    /// The port it listens on (127.0.0.1).
    pub port: u16,
    child: Child,
    log: PathBuf,
    _dir: TempDir,
}

impl std::fmt::Debug for TargetSshd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TargetSshd").field("port", &self.port).finish_non_exhaustive()
    }
}

impl TargetSshd {
    /// Starts sshd with `AuthorizedKeysFile` = `authorized_keys` (made absolute), public keys only,
    /// no ForceCommand, `StrictModes no`.
    pub fn start(authorized_keys: &Path) -> io::Result<TargetSshd> {
        let keys = std::path::absolute(authorized_keys)?;
        let dir = TempDir::new("tunl-target")?;
        let d = dir.path();
        let hk = d.join("host_ed25519");
        run(Command::new("ssh-keygen").args(["-q", "-t", "ed25519", "-N", "", "-f"]).arg(&hk))?;
        fs::create_dir_all("/run/sshd")?;
        let log = d.join("sshd.log");
        let mut last = io::Error::other("target sshd did not start");
        for _ in 0..5 {
            let port = util::free_port()?;
            let cfg = d.join("sshd_config");
            fs::write(
                &cfg,
                format!(
                    // SHLVL=1: no ~/.bashrc of the machine's root in a login (see the relay's sshd).
                    "Port {port}\nListenAddress 127.0.0.1\nHostKey {hk}\nAuthorizedKeysFile {keys}\n\
                     SetEnv SHLVL=1\n\
                     PubkeyAuthentication yes\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n\
                     UsePAM no\nPermitRootLogin yes\nStrictModes no\nX11Forwarding no\nPrintMotd no\n\
                     UseDNS no\nLogLevel VERBOSE\nPidFile {dir}/sshd.pid\n",
                    hk = hk.display(),
                    keys = keys.display(),
                    dir = d.display()
                ),
            )?;
            let out = fs::OpenOptions::new().create(true).append(true).open(&log)?;
            let mut child = Command::new(crate::SSHD)
                .args(["-D", "-e", "-f"])
                .arg(&cfg)
                .stdin(Stdio::null())
                .stdout(out.try_clone()?)
                .stderr(out)
                .spawn()?;
            let mut exited = false;
            let up = util::wait_until(Instant::now() + Duration::from_secs(10), || {
                exited = matches!(child.try_wait(), Ok(Some(_)));
                exited || util::port_open(port)
            });
            if up && !exited {
                return Ok(TargetSshd { port, child, log, _dir: dir });
            }
            util::stop_child(&mut child);
            last = io::Error::other(format!("target sshd failed: {}", fs::read_to_string(&log).unwrap_or_default()));
        }
        Err(last)
    }

    /// The target sshd's log so far.
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for TargetSshd {
    fn drop(&mut self) {
        util::stop_child(&mut self.child);
    }
}

/// A support engineer's key pair (ed25519, no passphrase).
#[derive(Clone, Debug)]
pub struct SupportKey {
    pub private_path: PathBuf,
    /// The `authorized_keys`-style public line (`ssh-ed25519 AAAA... support@relay-double`).
    pub public_line: String,
}

impl SupportKey {
    /// Generates `DIR/support_ed25519` (a fresh name if it exists).
    pub fn generate(dir: &Path) -> io::Result<SupportKey> {
        let mut n = 0;
        let private_path = loop {
            let p = dir.join(if n == 0 { "support_ed25519".to_string() } else { format!("support_ed25519_{n}") });
            if !p.exists() {
                break p;
            }
            n += 1;
        };
        run(Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-C", "support@relay-double", "-f"])
            .arg(&private_path))?;
        let public_line = fs::read_to_string(private_path.with_extension("pub"))?.trim().to_string();
        Ok(SupportKey { private_path, public_line })
    }
}

/// Logs in as support with the real `ssh` through `127.0.0.1:port` (e.g. the relay-side port of a
/// reverse tunnel) and runs `cmd`; no config file, no host key checks, batch mode, a 10 s connect
/// timeout.
pub fn support_login(port: u16, key: &SupportKey, user: &str, cmd: &str) -> io::Result<Output> {
    Command::new("ssh")
        .args(["-F", "/dev/null", "-p", &port.to_string(), "-i"])
        .arg(&key.private_path)
        .args([
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
            "-o",
            "BatchMode=yes",
            "-o",
            "IdentitiesOnly=yes",
            "-o",
            "ConnectTimeout=10",
            "-o",
            "LogLevel=ERROR",
        ])
        .arg(format!("{user}@127.0.0.1"))
        .arg(cmd)
        .stdin(Stdio::null())
        .output()
}
