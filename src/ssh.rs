//! The system `ssh` as linbit-tunl drives it: the master connection that carries the protocol, and
//! the mux client commands (`-O forward|cancel|exit`) for the reverse tunnel. Everything here builds
//! arguments or parses text; spawning and reading is the daemon's job.
//!
//! Every invocation starts with `-F /dev/null`: the customer's `~/.ssh/config` and `/etc/ssh/ssh_config`
//! never apply, so a `ProxyCommand`, `LocalCommand`, agent or forwarding set there cannot leak into the
//! session. The relay's host key is checked only against the relay CA in the session's `known_hosts`.
//!
//! The master must run without a controlling terminal: in the daemon's tmux pane ssh would otherwise
//! open `/dev/tty` to ask for passwords or host-key confirmation. `master_command` arranges `setsid()`
//! in the child (via `pre_exec`), which also keeps terminal signals (SIGINT/SIGHUP of the pane) away from
//! ssh: the daemon decides when ssh ends. The keyboard-interactive answer then comes only from
//! `askpass.sh` (`SSH_ASKPASS_REQUIRE=force` on OpenSSH >= 8.4; `DISPLAY` plus no tty on older ones).

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::auth;
use crate::cli::{self, Config};

pub const CONTROL_SOCKET: &str = "ssh-ctl.sock";
/// Seconds between ssh's own keepalives, and how many may go unanswered (45 s, as in protocol.md 7).
pub const SERVER_ALIVE_INTERVAL: u32 = 15;
pub const SERVER_ALIVE_COUNT_MAX: u32 = 3;
pub const CONNECT_TIMEOUT_SECS: u32 = 15;
/// The mux client needs some destination argument; the master's connection decides where it goes.
const MUX_PLACEHOLDER_HOST: &str = "linbit-tunl-relay";
/// The hello is one SSH command string; addresses beyond this many are left out.
const MAX_IPS: usize = 16;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AuthPath {
    /// Ephemeral key plus the certificate from the signing API; never prompts (`BatchMode=yes`).
    Cert,
    /// The relay's keyboard-interactive prompt, answered once by `askpass.sh`.
    KeyboardInteractive,
}

pub fn control_path(dir: &Path) -> PathBuf {
    dir.join(CONTROL_SOCKET)
}

fn opt(cmd: &mut Command, kv: impl AsRef<std::ffi::OsStr>) {
    cmd.arg("-o").arg(kv);
}

fn path_opt(cmd: &mut Command, key: &str, path: &Path) {
    let mut s = std::ffi::OsString::from(format!("{key}="));
    s.push(path.as_os_str());
    opt(cmd, s);
}

/// The arguments common to every ssh invocation, independent of the customer's configuration.
fn base_command() -> Command {
    let mut cmd = Command::new("ssh");
    cmd.arg("-F").arg("/dev/null");
    cmd
}

/// The session's own ssh configuration (0600): it carries the hello as `RemoteCommand`.
pub const CONFIG_FILE: &str = "ssh_config";

/// `RemoteCommand` came with OpenSSH 7.6; older clients refuse the keyword.
const REMOTE_COMMAND_SINCE: (u32, u32) = (7, 6);

/// `(major, minor)` from `ssh -V` (`OpenSSH_9.2p1 Debian-2, OpenSSL 3.0.11 ...`, on stderr).
pub fn parse_openssh_version(text: &str) -> Option<(u32, u32)> {
    let rest = &text[text.find("OpenSSH_")? + "OpenSSH_".len()..];
    let (major, rest) = rest.split_once('.')?;
    let minor: String = rest.chars().take_while(char::is_ascii_digit).collect();
    Some((major.parse().ok()?, minor.parse().ok()?))
}

/// The installed OpenSSH client's version, asked once per process.
pub fn openssh_version() -> Option<(u32, u32)> {
    static V: std::sync::OnceLock<Option<(u32, u32)>> = std::sync::OnceLock::new();
    *V.get_or_init(|| {
        let out = Command::new("ssh").arg("-V").stdin(Stdio::null()).output().ok()?;
        parse_openssh_version(&String::from_utf8_lossy(&out.stderr))
            .or_else(|| parse_openssh_version(&String::from_utf8_lossy(&out.stdout)))
    })
}

/// `ssh_config` text whose only setting is `RemoteCommand HELLO`. ssh expands `%` tokens there, so
/// the percent-encoded `case` is written with `%%`; a hello is one line of protocol tokens.
pub fn remote_command_config(hello: &str) -> Result<String, String> {
    if hello.is_empty() || hello.chars().any(|c| c.is_control() || !c.is_ascii()) {
        return Err("the hello is not one line of ASCII".to_string());
    }
    Ok(format!(
        "# linbit-tunl: the hello (it names the session) travels here, not on ssh's command line.\n\
         RemoteCommand {}\n",
        hello.replace('%', "%%")
    ))
}

/// The master connection with stdin/stdout/stderr piped (protocol lines in and out, diagnostics on
/// stderr for `ssh.log`), in its own session without a controlling terminal.
///
/// The hello names the session, and the session ID is the keyboard-interactive and resume
/// credential, so it must not sit in ssh's argv (world-readable in /proc) for hours: from OpenSSH
/// 7.6 on it goes into `DIR/ssh_config` (0600) as `RemoteCommand`, and that file replaces
/// `-F /dev/null` (it holds nothing else, so no user or system configuration applies either). Older
/// clients have no `RemoteCommand`: there the hello stays the last argument (docs/architecture.md).
pub fn master_command(cfg: &Config, dir: &Path, auth: AuthPath, hello: &str) -> Result<Command, String> {
    let remote_command = openssh_version().is_some_and(|v| v >= REMOTE_COMMAND_SINCE);
    master_command_for(cfg, dir, auth, hello, remote_command)
}

fn master_command_for(
    cfg: &Config,
    dir: &Path,
    auth: AuthPath,
    hello: &str,
    remote_command: bool,
) -> Result<Command, String> {
    let keydir = dir.join("sharekey");
    let mut cmd = Command::new("ssh");
    if remote_command {
        let path = dir.join(CONFIG_FILE);
        auth::replace_file(&path, remote_command_config(hello)?.as_bytes(), 0o600)?;
        cmd.arg("-F").arg(path);
    } else {
        cmd.arg("-F").arg("/dev/null");
    }
    cmd.arg("-p").arg(cfg.relay_port.to_string()).arg("-l").arg(&cfg.relay_user);
    opt(&mut cmd, "ControlMaster=yes");
    path_opt(&mut cmd, "ControlPath", &control_path(dir));
    opt(&mut cmd, "ControlPersist=no");
    // Host authentication: only a host certificate from the relay CA, nothing learnt or updated.
    path_opt(&mut cmd, "UserKnownHostsFile", &dir.join(auth::KNOWN_HOSTS_FILE));
    opt(&mut cmd, "GlobalKnownHostsFile=/dev/null");
    opt(&mut cmd, "StrictHostKeyChecking=yes");
    opt(&mut cmd, "CheckHostIP=no");
    opt(&mut cmd, "UpdateHostKeys=no");
    opt(&mut cmd, "VerifyHostKeyDNS=no");
    // User authentication: our ephemeral key only, never the customer's agent or keys.
    opt(&mut cmd, "IdentitiesOnly=yes");
    opt(&mut cmd, "IdentityAgent=none");
    path_opt(&mut cmd, "IdentityFile", &keydir.join(auth::KEY_FILE));
    opt(&mut cmd, "PasswordAuthentication=no");
    opt(&mut cmd, "HostbasedAuthentication=no");
    opt(&mut cmd, "GSSAPIAuthentication=no");
    match auth {
        AuthPath::Cert => {
            path_opt(&mut cmd, "CertificateFile", &keydir.join(auth::CERT_FILE));
            opt(&mut cmd, "PreferredAuthentications=publickey");
            opt(&mut cmd, "PubkeyAuthentication=yes");
            opt(&mut cmd, "KbdInteractiveAuthentication=no");
            opt(&mut cmd, "BatchMode=yes");
        }
        AuthPath::KeyboardInteractive => {
            opt(&mut cmd, "PreferredAuthentications=keyboard-interactive");
            opt(&mut cmd, "PubkeyAuthentication=no");
            opt(&mut cmd, "KbdInteractiveAuthentication=yes");
            opt(&mut cmd, "NumberOfPasswordPrompts=1");
            opt(&mut cmd, "BatchMode=no");
        }
    }
    // Nothing of this host travels to the relay but the protocol itself.
    opt(&mut cmd, "ForwardAgent=no");
    opt(&mut cmd, "ForwardX11=no");
    opt(&mut cmd, "ClearAllForwardings=yes");
    opt(&mut cmd, "PermitLocalCommand=no");
    opt(&mut cmd, "Tunnel=no");
    opt(&mut cmd, "EscapeChar=none");
    opt(&mut cmd, format!("ServerAliveInterval={SERVER_ALIVE_INTERVAL}"));
    opt(&mut cmd, format!("ServerAliveCountMax={SERVER_ALIVE_COUNT_MAX}"));
    opt(&mut cmd, "ExitOnForwardFailure=yes");
    opt(&mut cmd, format!("ConnectTimeout={CONNECT_TIMEOUT_SECS}"));
    opt(&mut cmd, if cfg.compress { "Compression=yes" } else { "Compression=no" });
    opt(&mut cmd, "LogLevel=VERBOSE");
    cmd.arg("-T");
    // `--` ends ssh's options, so neither host nor hello can ever be read as one.
    cmd.arg("--").arg(&cfg.relay);
    if !remote_command {
        cmd.arg(hello);
    }

    cmd.env_remove("SSH_AUTH_SOCK");
    match auth {
        AuthPath::KeyboardInteractive => {
            cmd.env("SSH_ASKPASS", dir.join(auth::ASKPASS_FILE));
            cmd.env("SSH_ASKPASS_REQUIRE", "force");
            // OpenSSH < 8.4 runs SSH_ASKPASS only when DISPLAY is set and there is no terminal.
            if std::env::var_os("DISPLAY").is_none_or(|d| d.is_empty()) {
                cmd.env("DISPLAY", ":0");
            }
        }
        AuthPath::Cert => {
            cmd.env_remove("SSH_ASKPASS");
            cmd.env_remove("SSH_ASKPASS_REQUIRE");
        }
    }
    cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
    detach_from_terminal(&mut cmd);
    Ok(cmd)
}

/// Run the child in a new session (`setsid()` between fork and exec), so it has no controlling
/// terminal and gets no terminal signals.
pub fn detach_from_terminal(cmd: &mut Command) {
    // SAFETY: the closure only makes the setsid system call, which is async-signal-safe, and
    // allocates nothing (the error path converts an errno, no heap).
    unsafe {
        cmd.pre_exec(|| rustix::process::setsid().map(|_| ()).map_err(std::io::Error::from));
    }
}

/// A mux client command for the master on `DIR/ssh-ctl.sock`.
fn mux_command(dir: &Path) -> Command {
    let mut cmd = base_command();
    cmd.arg("-S").arg(control_path(dir));
    opt(&mut cmd, "ControlMaster=no");
    opt(&mut cmd, "BatchMode=yes");
    opt(&mut cmd, "LogLevel=ERROR");
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    cmd
}

/// `HOST:PORT` for an `-R` spec, with an IPv6 address in brackets.
fn forward_target(host: &str, port: u16) -> String {
    if host.contains(':') { format!("[{host}]:{port}") } else { format!("{host}:{port}") }
}

/// Ask the master for a reverse forward on a relay-chosen port to TARGET_HOST:TARGET_PORT; the mux
/// client prints the allocated port on stdout (`parse_forward_port`).
pub fn forward_command(dir: &Path, target_host: &str, target_port: u16) -> Command {
    let mut cmd = mux_command(dir);
    cmd.arg("-O").arg("forward").arg("-R").arg(format!("0:{}", forward_target(target_host, target_port)));
    cmd.arg("--").arg(MUX_PLACEHOLDER_HOST);
    cmd
}

/// The relay port from `-O forward`'s stdout: one decimal line.
pub fn parse_forward_port(stdout: &[u8]) -> Option<u16> {
    let s = std::str::from_utf8(stdout).ok()?;
    let s = s.strip_suffix('\n').unwrap_or(s);
    if s.is_empty() || s.len() > 5 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse::<u16>().ok().filter(|&p| p != 0)
}

/// Cancel the reverse forward opened by `forward_command(dir, target_host, target_port)`.
///
/// The spec must be the one the forward was requested with (`-R 0:HOST:PORT`), not the port the relay
/// allocated: the master matches its registered forward, whose listen port is 0, and cancels the
/// allocated port itself. Checked against OpenSSH 9.2: `-R ALLOCATED:HOST:PORT` fails with "port not
/// forwarded". The mux client exits 0 even then, so judge the result with `mux_error`.
pub fn cancel_command(dir: &Path, target_host: &str, target_port: u16) -> Command {
    let mut cmd = mux_command(dir);
    cmd.arg("-O").arg("cancel").arg("-R").arg(format!("0:{}", forward_target(target_host, target_port)));
    cmd.arg("--").arg(MUX_PLACEHOLDER_HOST);
    cmd
}

/// The failure of a finished mux client command, if it failed. OpenSSH 9.2's mux client can exit 0
/// after a refused request and says so only on stderr; with `LogLevel=ERROR` stderr is empty on
/// success, except for `-O exit`'s "Exit request sent.". The text is made printable for the log.
pub fn mux_error(status: std::process::ExitStatus, stderr: &[u8]) -> Option<String> {
    let text = String::from_utf8_lossy(stderr);
    let lines: Vec<&str> =
        text.lines().map(str::trim).filter(|l| !l.is_empty() && *l != "Exit request sent.").collect();
    if status.success() && lines.is_empty() {
        return None;
    }
    let mut msg = cli::printable(&lines.join("; "));
    msg.truncate(msg.char_indices().nth(300).map_or(msg.len(), |(i, _)| i));
    if msg.is_empty() {
        msg = format!("ssh mux client failed ({status})");
    }
    Some(msg)
}

/// Ask the master to end the connection.
pub fn exit_command(dir: &Path) -> Command {
    let mut cmd = mux_command(dir);
    cmd.arg("-O").arg("exit").arg("--").arg(MUX_PLACEHOLDER_HOST);
    cmd
}

/// A protocol token: `[A-Za-z0-9+/=_.:,@%-]+` (protocol.md section 1).
pub fn is_token(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"+/=_.:,@%-".contains(&b))
}

/// Percent-encoding for a hello value: `cli::pct_encode` leaves `~` alone, which is not a token byte,
/// so it is encoded too (`%7E` decodes to the same text).
fn pct_token(s: &str) -> String {
    cli::pct_encode(s).replace('~', "%7E")
}

/// The hello (protocol.md section 2): the single remote command string of the master connection.
pub fn hello(cfg: &Config, host: &str, ips: &[String], size: (u16, u16), resume: bool) -> Result<String, String> {
    if !cli::valid_session_id(&cfg.session_id) {
        return Err("the session ID is not valid".to_string());
    }
    if !is_token(host) || host.contains(',') {
        return Err(format!("this host's name '{}' cannot be sent to the relay", cli::printable(host)));
    }
    if !is_token(&cfg.user) {
        return Err(format!("the user name '{}' cannot be sent to the relay", cli::printable(&cfg.user)));
    }
    let ips: Vec<&str> =
        ips.iter().map(String::as_str).filter(|ip| is_token(ip) && !ip.contains(',')).take(MAX_IPS).collect();
    Ok(format!(
        "linbit-tunl/1 id={} mode={} host={} user={} ips={} case={} client={} size={}x{} resume={}",
        cfg.session_id,
        cfg.mode.as_str(),
        host,
        cfg.user,
        ips.join(","),
        pct_token(&cfg.case),
        pct_token(cli::VERSION),
        size.0,
        size.1,
        if resume { 1 } else { 0 }
    ))
}

/// The short host name and this host's non-loopback, non-link-local addresses (IPv4 first).
pub fn host_context() -> (String, Vec<String>) {
    let uname = rustix::system::uname();
    let node = uname.nodename().to_string_lossy();
    let host = short_hostname(&node);
    let mut ips = std::fs::read_to_string("/proc/net/fib_trie").map(|t| parse_fib_trie(&t)).unwrap_or_default();
    ips.extend(std::fs::read_to_string("/proc/net/if_inet6").map(|t| parse_if_inet6(&t)).unwrap_or_default());
    (host, ips)
}

/// The first label of the node name.
pub fn short_hostname(node: &str) -> String {
    node.split('.').next().unwrap_or("").to_string()
}

/// Local IPv4 addresses from `/proc/net/fib_trie`: each `|-- ADDR` leaf followed by a `/32 host LOCAL`
/// line is an address of this host. Loopback and link-local are skipped; the Main and Local tables
/// repeat entries, so duplicates are dropped.
pub fn parse_fib_trie(text: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    let mut leaf: Option<std::net::Ipv4Addr> = None;
    for line in text.lines() {
        let t = line.trim();
        if let Some(a) = t.strip_prefix("|-- ") {
            leaf = a.trim().parse().ok();
        } else if t.starts_with("/32 host LOCAL") {
            if let Some(a) = leaf.take() {
                if !a.is_loopback() && !a.is_link_local() && !a.is_unspecified() && !out.contains(&a.to_string()) {
                    out.push(a.to_string());
                }
            }
        } else if !t.starts_with('/') {
            leaf = None;
        }
    }
    out
}

/// Global IPv6 addresses from `/proc/net/if_inet6` (`ADDR32HEX IFINDEX PREFIXLEN SCOPE FLAGS NAME`):
/// scope 00 (global) only, which leaves out loopback (10), link-local (20) and site-local (40).
/// Tentative/duplicate (flags 0x40/0x08) addresses are skipped too.
pub fn parse_if_inet6(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    for line in text.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 6 || f[0].len() != 32 {
            continue;
        }
        let (Ok(scope), Ok(flags)) = (u32::from_str_radix(f[3], 16), u32::from_str_radix(f[4], 16)) else {
            continue;
        };
        if scope != 0 || flags & (0x40 | 0x08) != 0 {
            continue;
        }
        let Ok(n) = u128::from_str_radix(f[0], 16) else { continue };
        let a = std::net::Ipv6Addr::from(n);
        if a.is_loopback() || a.is_unspecified() || (a.segments()[0] & 0xffc0) == 0xfe80 {
            continue;
        }
        let s = a.to_string();
        if !out.contains(&s) {
            out.push(s);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::OsString;
    use std::os::unix::fs::PermissionsExt;

    fn cfg() -> Config {
        let env = vec![("USER".to_string(), "root".to_string()), ("HOME".to_string(), "/root".to_string())];
        let args = ["--case", "Case 4711: ~disk full", "swift-fox-jumps-barrel"].map(OsString::from);
        match cli::parse(args, &env) {
            Ok(cli::Action::Run(c)) => *c,
            other => panic!("{other:?}"),
        }
    }

    fn args(cmd: &Command) -> Vec<String> {
        cmd.get_args().map(|a| a.to_string_lossy().into_owned()).collect()
    }

    fn has_opt(a: &[String], kv: &str) -> bool {
        a.windows(2).any(|w| w[0] == "-o" && w[1] == kv)
    }

    #[test]
    fn hello_line() {
        let c = cfg();
        let h = hello(&c, "node1", &["192.0.2.2".into(), "2001:db8::1".into()], (120, 40), false).unwrap();
        assert_eq!(
            h,
            format!(
                "linbit-tunl/1 id=swift-fox-jumps-barrel mode=share host=node1 user=root ips=192.0.2.2,2001:db8::1 \
                 case=Case%204711%3A%20%7Edisk%20full client={} size=120x40 resume=0",
                cli::VERSION
            )
        );
        for field in h.split(' ').skip(1) {
            let (_, v) = field.split_once('=').unwrap();
            assert!(v.is_empty() || is_token(v), "{field}");
        }
        let h = hello(&c, "node1", &[], (0, 0), true).unwrap();
        assert!(h.contains(" ips= ") && h.ends_with(" size=0x0 resume=1"), "{h}");
        assert!(hello(&c, "bad host", &[], (0, 0), true).is_err());
        assert!(hello(&c, "", &[], (0, 0), true).is_err());
        let mut c2 = c.clone();
        c2.user = "machine$".into();
        assert!(hello(&c2, "node1", &[], (0, 0), true).is_err());
        // Nothing that is not a token gets into ips.
        let h = hello(&c, "n", &["1.2.3.4 evil=1".into(), "a,b".into(), "5.6.7.8".into()], (1, 1), false).unwrap();
        assert!(h.contains(" ips=5.6.7.8 "), "{h}");
    }

    #[test]
    fn master_args() {
        let c = cfg();
        let dir = Path::new("/tmp/linbit-tunl-0123456789ab");
        let cmd = master_command_for(&c, dir, AuthPath::Cert, "linbit-tunl/1 id=x", false).unwrap();
        let a = args(&cmd);
        assert_eq!(&a[..2], ["-F", "/dev/null"]);
        assert_eq!(&a[a.len() - 3..], ["--", "tunl.linbit.com", "linbit-tunl/1 id=x"]);
        for kv in [
            "ControlMaster=yes",
            "ControlPath=/tmp/linbit-tunl-0123456789ab/ssh-ctl.sock",
            "UserKnownHostsFile=/tmp/linbit-tunl-0123456789ab/known_hosts",
            "StrictHostKeyChecking=yes",
            "IdentityAgent=none",
            "IdentityFile=/tmp/linbit-tunl-0123456789ab/sharekey/id_ed25519",
            "CertificateFile=/tmp/linbit-tunl-0123456789ab/sharekey/id_ed25519-cert.pub",
            "PreferredAuthentications=publickey",
            "BatchMode=yes",
            "Compression=yes",
        ] {
            assert!(has_opt(&a, kv), "{kv} missing from {a:?}");
        }
        assert!(a.contains(&"-T".to_string()));
        let envs: Vec<_> = cmd.get_envs().collect();
        assert!(envs.iter().any(|(k, v)| *k == "SSH_AUTH_SOCK" && v.is_none()));

        let mut c2 = c.clone();
        c2.compress = false;
        let cmd = master_command_for(&c2, dir, AuthPath::KeyboardInteractive, "h", false).unwrap();
        let a = args(&cmd);
        assert!(has_opt(&a, "PreferredAuthentications=keyboard-interactive"));
        assert!(has_opt(&a, "NumberOfPasswordPrompts=1"));
        assert!(has_opt(&a, "Compression=no"));
        assert!(!a.iter().any(|x| x.starts_with("CertificateFile=") || x == "BatchMode=yes"));
        let envs: Vec<_> = cmd.get_envs().collect();
        assert!(envs.iter().any(|(k, v)| *k == "SSH_ASKPASS"
            && v.map(|v| v.to_string_lossy().into_owned()) == Some(format!("{}/askpass.sh", dir.display()))));
        assert!(envs.iter().any(|(k, v)| *k == "SSH_ASKPASS_REQUIRE" && *v == Some("force".as_ref())));
    }

    #[test]
    fn remote_command_text() {
        assert_eq!(parse_openssh_version("OpenSSH_9.2p1 Debian-2+deb12u3, OpenSSL 3.0.15 3 Sep 2024"), Some((9, 2)));
        assert_eq!(parse_openssh_version("OpenSSH_7.4p1, OpenSSL 1.0.2k-fips  26 Jan 2017"), Some((7, 4)));
        assert_eq!(parse_openssh_version("OpenSSH_10.0p2"), Some((10, 0)));
        assert_eq!(parse_openssh_version("Sun_SSH_1.1"), None);
        assert!((7, 4) < REMOTE_COMMAND_SINCE && (7, 6) >= REMOTE_COMMAND_SINCE && (10, 0) > REMOTE_COMMAND_SINCE);
        let t = remote_command_config("linbit-tunl/1 id=a-b-c-d case=x%20y").unwrap();
        assert!(t.ends_with("\nRemoteCommand linbit-tunl/1 id=a-b-c-d case=x%%20y\n"), "{t}");
        assert_eq!(t.lines().filter(|l| !l.starts_with('#')).count(), 1, "{t}");
        assert!(remote_command_config("a\nProxyCommand x").is_err());
        assert!(remote_command_config("").is_err());
    }

    #[test]
    fn mux_args() {
        let dir = Path::new("/d");
        let a = args(&forward_command(dir, "localhost", 22));
        assert_eq!(&a[..4], ["-F", "/dev/null", "-S", "/d/ssh-ctl.sock"]);
        assert!(a.windows(4).any(|w| w == ["-O", "forward", "-R", "0:localhost:22"]), "{a:?}");
        let a = args(&forward_command(dir, "::1", 2222));
        assert!(a.contains(&"0:[::1]:2222".to_string()), "{a:?}");
        let a = args(&cancel_command(dir, "10.0.0.1", 22));
        assert!(a.windows(4).any(|w| w == ["-O", "cancel", "-R", "0:10.0.0.1:22"]), "{a:?}");
        let a = args(&cancel_command(dir, "fd00::1", 22));
        assert!(a.contains(&"0:[fd00::1]:22".to_string()), "{a:?}");
        let a = args(&exit_command(dir));
        assert!(a.windows(2).any(|w| w == ["-O", "exit"]), "{a:?}");
    }

    #[test]
    fn forward_port() {
        assert_eq!(parse_forward_port(b"40001\n"), Some(40001));
        assert_eq!(parse_forward_port(b"22"), Some(22));
        for bad in [&b""[..], b"\n", b"0\n", b"65536\n", b"-1\n", b"1 2\n", b"40001\n40002\n", b"+5\n", b"\xff\n"] {
            assert_eq!(parse_forward_port(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn mux_errors() {
        use std::os::unix::process::ExitStatusExt;
        let ok = std::process::ExitStatus::from_raw(0);
        let bad = std::process::ExitStatus::from_raw(255 << 8);
        assert_eq!(mux_error(ok, b""), None);
        assert_eq!(mux_error(ok, b"Exit request sent.\r\n"), None);
        let e = mux_error(ok, b"mux_client_forward: forwarding request failed: port not forwarded\r\n\x1b[2J").unwrap();
        assert!(e.contains("port not forwarded") && !e.contains('\x1b'), "{e}");
        assert!(mux_error(bad, b"").is_some());
    }

    #[test]
    fn addresses() {
        let fib = "Main:\n  +-- 0.0.0.0/0 3 0 5\n     |-- 0.0.0.0\n        /0 universe UNICAST\n     +-- 127.0.0.0/8 2 0 2\n\
                   +-- 127.0.0.0/31 1 0 0\n           |-- 127.0.0.0\n              /8 host LOCAL\n\
                   |-- 127.0.0.1\n              /32 host LOCAL\n        |-- 127.255.255.255\n           /32 link BROADCAST\n\
                   +-- 192.0.2.0/24 2 0 2\n           |-- 192.0.2.0\n              /24 link UNICAST\n\
                   |-- 192.0.2.2\n              /32 host LOCAL\n        |-- 192.0.2.255\n           /32 link BROADCAST\n\
                   |-- 169.254.1.1\n              /32 host LOCAL\n\
                   |-- 10.1.1.1\n              /24 link UNICAST\n              /32 host LOCAL\n\
                   Local:\n     |-- 192.0.2.2\n              /32 host LOCAL\n";
        assert_eq!(parse_fib_trie(fib), ["192.0.2.2", "10.1.1.1"]);
        let v6 = "fe8000000000000000fc00fffe000001 04 40 20 80     eth0\n\
                  fd000000000000000000000000000002 04 40 00 82     eth0\n\
                  20010db8000000000000000000000001 03 40 00 80     eth1\n\
                  20010db8000000000000000000000002 03 40 00 40     eth1\n\
                  00000000000000000000000000000001 01 80 10 80       lo\n\
                  garbage line\n";
        assert_eq!(parse_if_inet6(v6), ["fd00::2", "2001:db8::1"]);
        assert_eq!(short_hostname("node1.example.com"), "node1");
        let (h, ips) = host_context();
        assert!(!h.is_empty());
        assert!(ips.iter().all(|ip| ip != "127.0.0.1" && ip != "::1"), "{ips:?}");
    }

    /// A real-program check: OpenSSH itself accepts every option the builders produce (`ssh -G`
    /// parses the whole command line and prints the resulting configuration without connecting).
    #[test]
    fn openssh_accepts_the_options() {
        if Command::new("ssh").arg("-V").output().is_err() {
            eprintln!("no ssh on PATH; skipped");
            return;
        }
        let c = cfg();
        let tmp = std::env::temp_dir().join(format!("tunl-ssh-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir(&tmp).unwrap();
        let dir = tmp.as_path();
        let hello = "linbit-tunl/1 id=swift-fox-jumps-barrel case=a%20b%25 resume=0";
        for (auth, rc) in [(AuthPath::Cert, false), (AuthPath::KeyboardInteractive, false), (AuthPath::Cert, true)] {
            if rc && openssh_version().is_none_or(|v| v < REMOTE_COMMAND_SINCE) {
                eprintln!("ssh older than 7.6: RemoteCommand not checked");
                continue;
            }
            let m = master_command_for(&c, dir, auth, hello, rc).unwrap();
            let mut a = args(&m);
            // The hello is on the command line only where ssh has no RemoteCommand.
            assert_eq!(a.iter().any(|x| x.contains("swift-fox")), !rc, "{a:?}");
            if rc {
                assert_eq!(&a[..2], ["-F".to_string(), dir.join(CONFIG_FILE).display().to_string()]);
                let mode = std::fs::metadata(dir.join(CONFIG_FILE)).unwrap().permissions().mode();
                assert_eq!(mode & 0o777, 0o600);
            }
            a.insert(0, "-G".to_string());
            let out = Command::new("ssh").args(&a).stdin(Stdio::null()).output().unwrap();
            let text = String::from_utf8_lossy(&out.stdout);
            assert!(out.status.success(), "{auth:?}: {}", String::from_utf8_lossy(&out.stderr));
            assert!(
                text.contains("\nidentitiesonly yes\n") && text.contains("\nstricthostkeychecking true\n"),
                "{text}"
            );
            assert!(text.contains(&format!("\nport {}\n", c.relay_port)) && text.contains("\nuser tunl\n"), "{text}");
            if rc {
                // ssh reads the hello back exactly, `%` escapes undone.
                assert!(text.contains(&format!("\nremotecommand {hello}\n")), "{text}");
            }
        }
        std::fs::remove_dir_all(&tmp).unwrap();
        let dir = Path::new("/tmp/linbit-tunl-test-nonexistent");
        for m in [forward_command(dir, "::1", 22), cancel_command(dir, "localhost", 22), exit_command(dir)] {
            let mut a: Vec<String> = args(&m).into_iter().filter(|x| x != "-O").collect();
            // -G cannot be combined with -O; drop the control verb, keep every other option.
            a.retain(|x| !["forward", "cancel", "exit"].contains(&x.as_str()));
            a.insert(0, "-G".to_string());
            let out = Command::new("ssh").args(&a).stdin(Stdio::null()).output().unwrap();
            assert!(out.status.success(), "{a:?}: {}", String::from_utf8_lossy(&out.stderr));
        }
    }
}
