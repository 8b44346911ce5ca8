//! Command line and environment: everything the customer can set, validated before anything touches
//! the system. `parse` is pure over its inputs so that every refusal is testable without a process.

use std::ffi::OsString;
use std::fmt;
use std::path::PathBuf;

pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// The longest `--case` we accept: it travels percent-encoded in the hello and shows in `tunl list`.
pub const MAX_CASE_LEN: usize = 200;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Share,
    Restricted,
    Tunnel,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Share => "share",
            Mode::Restricted => "restricted",
            Mode::Tunnel => "tunnel",
        }
    }
    pub fn parse(s: &str) -> Option<Mode> {
        match s {
            "share" => Some(Mode::Share),
            "restricted" => Some(Mode::Restricted),
            "tunnel" => Some(Mode::Tunnel),
            _ => None,
        }
    }
}

/// The whole configuration of one session, from options and environment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    pub session_id: String,
    pub case: String,
    pub token: Option<String>,
    /// `--token -`: the launcher asks for the token (terminal without echo, or one line of stdin).
    pub ask_token: bool,
    /// The account support logs in as through the tunnel.
    pub user: String,
    pub mode: Mode,
    pub attach: bool,
    pub debug: bool,
    pub target_host: String,
    pub target_port: u16,
    pub relay: String,
    pub relay_port: u16,
    pub relay_user: String,
    /// Base URL of the relay API, always `https://...` without a trailing slash.
    pub api: String,
    pub authkeys_file: PathBuf,
    /// The relay CA public key in OpenSSH one-line form.
    pub ca_pubkey: String,
    pub compress: bool,
    /// The tmux prefix key spec (`C-b` unless TUNL_PREFIX says otherwise; tmux itself judges it).
    pub prefix: String,
    /// Where the asciinema recording goes; `None` means the manual's three locations in order.
    pub recording_dir: Option<PathBuf>,
    /// With `--attach`: the socket of the customer's tmux server (from `$TMUX`).
    pub tmux_socket: Option<PathBuf>,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Action {
    Run(Box<Config>),
    Help,
    Version,
}

/// A refusal: one line for the customer, exit status 1.
#[derive(Debug, PartialEq, Eq)]
pub struct CliError(pub String);

impl fmt::Display for CliError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

fn err<T>(msg: impl Into<String>) -> Result<T, CliError> {
    Err(CliError(msg.into()))
}

/// The relay CA embedded at build time. A release build replaces `keys/relay-ca.pub`.
pub const EMBEDDED_CA: &str = include_str!("../keys/relay-ca.pub");

pub const USAGE: &str = "\
linbit-tunl -- open a shared terminal session so LINBIT support can assist on this system

Usage:
  linbit-tunl [--case CASE] [--token TOKEN] [--user USER]
              [--restricted] [--tunnel]
              [--attach] [--debug] [--target HOST:PORT] SESSION_ID

Arguments:
  SESSION_ID           four lowercase words joined by hyphens, e.g. swift-fox-jumps-barrel

Options:
  --case CASE          support case number or short description (shown to support)
  --token TOKEN        six-digit pre-registration token for certificate signing; `--token -`
                       asks for it (not echoed) and TUNL_TOKEN gives it: both keep it out of
                       the process list, where --token TOKEN is visible to every local user
  --user USER          account support logs in as through the tunnel (default: $USER or $LOGNAME)
  --restricted         watch-only: support can see and chat, not type or request a tunnel
  --tunnel             open the reverse tunnel at start and grant requests without a popup;
                       works without tmux
  --attach             create a window in the current tmux session instead of a new server
  --debug              keep /tmp/linbit-tunl-{hash}/ after exit
  --target HOST:PORT   forward the reverse tunnel to HOST:PORT (default localhost:22)
  -h, --help           print this help and exit
  -V, --version        print the version and exit

Environment:
  TUNL_TOKEN            the token, instead of --token (sudo --preserve-env=TUNL_TOKEN ...)
  TUNL_RELAY            relay hostname (default tunl.linbit.com)
  TUNL_RELAY_PORT       relay SSH port (default 22)
  TUNL_USER             SSH user on the relay (default tunl)
  TUNL_API              relay API base URL (default https://tunl.linbit.com)
  TUNL_AUTHKEYS_FILE    authorized_keys for support keys (default ~/.ssh/authorized_keys)
  TUNL_TARGET_HOST      host part of --target (default localhost)
  TUNL_TARGET_PORT      port part of --target (default 22)
  TUNL_RELAY_CA_PUBKEY  override the embedded relay CA public key (testing)
  TUNL_COMPRESS         SSH compression, 1 or 0 (default 1)
  TUNL_PREFIX           tmux prefix key for the session (default C-b)
  TUNL_RECORDING_DIR    write the session recording (NAME.cast) and its chat transcript
                        (NAME.chat.txt) here instead of the default locations
  TUNL_STATE_DIR        record of the authorized_keys files used (default /var/lib/linbit-tunl)
  SSL_CERT_FILE         extra PEM roots trusted for TUNL_API

Hotkeys (prefix Ctrl-b unless TUNL_PREFIX): Q end session, c chat/shell, u grant tunnel,
U revoke tunnel, X block tunnel requests, L reset layout, F1 or Enter menu, ? cheat sheet,
K kill the session.

Exit status: 0 normal end, 1 fatal error, 130 SIGINT, 143 SIGTERM.
";

/// A session ID is four lowercase ASCII words joined by single hyphens.
pub fn valid_session_id(s: &str) -> bool {
    let words: Vec<&str> = s.split('-').collect();
    words.len() == 4
        && words.iter().all(|w| !w.is_empty() && w.len() <= 32 && w.bytes().all(|b| b.is_ascii_lowercase()))
}

pub fn valid_token(s: &str) -> bool {
    s.len() == 6 && s.bytes().all(|b| b.is_ascii_digit())
}

/// POSIX portable user names (plus the `$` some systems allow at the end for machine accounts).
fn valid_user(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 32
        && b[0] != b'-'
        && b.iter().enumerate().all(|(i, &c)| {
            c.is_ascii_alphanumeric() || c == b'_' || c == b'.' || c == b'-' || (c == b'$' && i == b.len() - 1)
        })
}

fn valid_host(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'.' || c == b'-' || c == b'_')
        && !s.starts_with('-')
}

fn valid_ipv6(s: &str) -> bool {
    s.parse::<std::net::Ipv6Addr>().is_ok()
}

fn parse_port(what: &str, s: &str) -> Result<u16, CliError> {
    match s.parse::<u16>() {
        Ok(p) if p >= 1 && s.bytes().all(|c| c.is_ascii_digit()) => Ok(p),
        _ => err(format!("{what}: '{}' is not a port number (1-65535)", printable(s))),
    }
}

/// Split `HOST:PORT`, where an IPv6 host is written in brackets.
pub fn parse_target(s: &str) -> Result<(String, u16), CliError> {
    let bad = || err(format!("--target: '{}' is not HOST:PORT (IPv6 as [ADDR]:PORT)", printable(s)));
    if let Some(rest) = s.strip_prefix('[') {
        let Some((host, port)) = rest.split_once("]:") else { return bad() };
        if !valid_ipv6(host) {
            return bad();
        }
        return Ok((host.to_string(), parse_port("--target", port)?));
    }
    let Some((host, port)) = s.rsplit_once(':') else { return bad() };
    if !valid_host(host) {
        return bad();
    }
    Ok((host.to_string(), parse_port("--target", port)?))
}

/// Text for an error line: control characters from the command line never reach the terminal raw.
pub fn printable(s: &str) -> String {
    s.chars().flat_map(|c| if c.is_control() { c.escape_default().collect::<Vec<_>>() } else { vec![c] }).collect()
}

/// Not a variable: the name of the effective user from /etc/passwd, which `environment` adds so
/// that cron jobs, `su -c` and systemd units (no `$USER`, no `$LOGNAME`) get the default `id -un`
/// would give.
pub const EFFECTIVE_USER: &str = "(effective user)";

/// Read the environment that matters, so `parse` stays pure.
pub fn environment() -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = std::env::vars_os()
        .filter_map(|(k, v)| Some((k.into_string().ok()?, v.to_string_lossy().into_owned())))
        .filter(|(k, _)| k.starts_with("TUNL_") || k == "USER" || k == "LOGNAME" || k == "HOME" || k == "TMUX")
        .collect();
    let euid = rustix::process::geteuid().as_raw();
    if let Some(name) = std::fs::read_to_string("/etc/passwd").ok().and_then(|pw| user_of_uid(&pw, euid)) {
        env.push((EFFECTIVE_USER.to_string(), name));
    }
    env
}

/// The first account with this uid in passwd(5) text. (A static binary has no NSS; an account only
/// in LDAP is found through `$USER`, or named with `--user`.)
pub fn user_of_uid(passwd: &str, uid: u32) -> Option<String> {
    passwd.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        (f.len() >= 7 && !f[0].is_empty() && f[2].parse::<u32>().ok() == Some(uid)).then(|| f[0].to_string())
    })
}

/// The token as typed at the prompt or piped in: one line of six digits.
pub fn token_from_line(line: &str) -> Result<String, CliError> {
    let t = line.trim();
    if t.is_empty() {
        return err("--token -: no token was entered");
    }
    if !valid_token(t) {
        return err("--token -: expected exactly six digits, as given by LINBIT support");
    }
    Ok(t.to_string())
}

fn getenv<'a>(env: &'a [(String, String)], key: &str) -> Option<&'a str> {
    env.iter().rev().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
}

/// Non-empty value of a variable, or the default.
fn env_or<'a>(env: &'a [(String, String)], key: &str, default: &'a str) -> &'a str {
    match getenv(env, key) {
        Some(v) if !v.is_empty() => v,
        _ => default,
    }
}

fn os_to_string(what: &str, v: OsString) -> Result<String, CliError> {
    v.into_string().map_err(|_| CliError(format!("{what}: not valid UTF-8")))
}

/// Check that a string is one OpenSSH public key line (`TYPE BASE64 [COMMENT]`).
pub fn valid_public_key(s: &str) -> bool {
    ssh_key::PublicKey::from_openssh(s.trim()).is_ok()
}

pub fn parse(args: impl IntoIterator<Item = OsString>, env: &[(String, String)]) -> Result<Action, CliError> {
    use lexopt::prelude::*;
    let mut p = lexopt::Parser::from_args(args);
    let mut session_id: Option<String> = None;
    let mut case = String::new();
    let mut token = None;
    let mut user = None;
    let (mut restricted, mut tunnel, mut attach, mut debug) = (false, false, false, false);
    let mut target = None;
    loop {
        let arg = match p.next() {
            Ok(Some(a)) => a,
            Ok(None) => break,
            Err(e) => return err(printable(&e.to_string())),
        };
        let value = |p: &mut lexopt::Parser, name: &str| -> Result<String, CliError> {
            let v = p.value().map_err(|_| CliError(format!("{name} needs a value")))?;
            os_to_string(name, v)
        };
        match arg {
            Short('h') | Long("help") => return Ok(Action::Help),
            Short('V') | Long("version") => return Ok(Action::Version),
            Long("case") => case = value(&mut p, "--case")?,
            Long("token") => token = Some(value(&mut p, "--token")?),
            Long("user") => user = Some(value(&mut p, "--user")?),
            Long("target") => target = Some(value(&mut p, "--target")?),
            Long("restricted") => restricted = true,
            Long("tunnel") => tunnel = true,
            Long("attach") => attach = true,
            Long("debug") => debug = true,
            Value(v) => {
                let v = os_to_string("SESSION_ID", v)?;
                if session_id.is_some() {
                    return err(format!("unexpected extra argument '{}' (only one SESSION_ID)", printable(&v)));
                }
                session_id = Some(v);
            }
            Long(o) => return err(format!("unknown option '--{}' (see --help)", printable(o))),
            Short(c) => return err(format!("unknown option '-{}' (see --help)", printable(&c.to_string()))),
        }
    }
    let Some(session_id) = session_id else {
        return err("missing SESSION_ID (four lowercase words joined by hyphens, e.g. swift-fox-jumps-barrel)");
    };
    if !valid_session_id(&session_id) {
        return err(format!(
            "invalid session ID '{}': expected four lowercase words joined by hyphens, e.g. swift-fox-jumps-barrel",
            printable(&session_id)
        ));
    }
    let ask_token = token.as_deref() == Some("-");
    if ask_token {
        token = None;
    } else if token.is_none() {
        token = getenv(env, "TUNL_TOKEN").filter(|v| !v.is_empty()).map(str::to_string);
        if token.as_deref().is_some_and(|t| !valid_token(t)) {
            return err("TUNL_TOKEN: expected exactly six digits, as given by LINBIT support");
        }
    }
    if let Some(t) = &token {
        if !valid_token(t) {
            return err("--token: expected exactly six digits, as given by LINBIT support");
        }
    }
    if case.chars().any(char::is_control) {
        return err("--case: must not contain control characters");
    }
    if case.len() > MAX_CASE_LEN {
        return err(format!("--case: longer than {MAX_CASE_LEN} bytes; give the case number or a short description"));
    }
    if restricted && tunnel {
        return err("--restricted and --tunnel contradict each other: watch-only mode cannot open a tunnel");
    }
    let user = match user {
        Some(u) => u,
        None => {
            let named = |k: &str| getenv(env, k).filter(|v| !v.is_empty());
            match named("USER").or(named("LOGNAME")).or(named(EFFECTIVE_USER)) {
                Some(u) => u.to_string(),
                None => {
                    return err("cannot tell the user name: set --user USER (no $USER, no $LOGNAME, and this user \
                         is not in /etc/passwd)");
                }
            }
        }
    };
    if !valid_user(&user) {
        return err(format!("--user: '{}' is not a valid user name", printable(&user)));
    }
    // It travels in the hello as a protocol token; `$` (machine accounts) is not one.
    if !user.bytes().all(|c| c.is_ascii_alphanumeric() || b"_.-".contains(&c)) {
        return err(format!(
            "--user: '{}' cannot be used for the tunnel: the relay accepts only letters, digits, '.', '_' \
             and '-' in the account name (the default is $USER or $LOGNAME)",
            printable(&user)
        ));
    }

    let (mut target_host, mut target_port) = (env_or(env, "TUNL_TARGET_HOST", "localhost").to_string(), 22);
    if !valid_host(&target_host) && !valid_ipv6(&target_host) {
        return err(format!("TUNL_TARGET_HOST: '{}' is not a host name or address", printable(&target_host)));
    }
    if let Some(p) = getenv(env, "TUNL_TARGET_PORT").filter(|v| !v.is_empty()) {
        target_port = parse_port("TUNL_TARGET_PORT", p)?;
    }
    if let Some(t) = target {
        (target_host, target_port) = parse_target(&t)?;
    }

    let relay = env_or(env, "TUNL_RELAY", "tunl.linbit.com").to_string();
    if !valid_host(&relay) && !valid_ipv6(&relay) {
        return err(format!("TUNL_RELAY: '{}' is not a host name or address", printable(&relay)));
    }
    let relay_port = parse_port("TUNL_RELAY_PORT", env_or(env, "TUNL_RELAY_PORT", "22"))?;
    let relay_user = env_or(env, "TUNL_USER", "tunl").to_string();
    if !valid_user(&relay_user) {
        return err(format!("TUNL_USER: '{}' is not a valid user name", printable(&relay_user)));
    }
    let api = env_or(env, "TUNL_API", "https://tunl.linbit.com").trim_end_matches('/').to_string();
    match api.strip_prefix("https://") {
        Some(rest) if !rest.is_empty() && rest.bytes().all(|c| c.is_ascii_graphic()) => {}
        _ => return err(format!("TUNL_API: '{}' is not an https:// URL", printable(&api))),
    }
    let ca_pubkey = match getenv(env, "TUNL_RELAY_CA_PUBKEY").filter(|v| !v.is_empty()) {
        Some(k) if valid_public_key(k) => k.trim().to_string(),
        Some(_) => return err("TUNL_RELAY_CA_PUBKEY: not an SSH public key line (TYPE BASE64 [COMMENT])"),
        None => EMBEDDED_CA.trim().to_string(),
    };
    let compress = match env_or(env, "TUNL_COMPRESS", "1") {
        "1" => true,
        "0" => false,
        other => return err(format!("TUNL_COMPRESS: '{}' must be 1 or 0", printable(other))),
    };
    let authkeys_file = match getenv(env, "TUNL_AUTHKEYS_FILE").filter(|v| !v.is_empty()) {
        // The launcher and the daemon run in different directories: a relative path would name
        // two files, the sweep one and the grant another (F22).
        Some(f) if !f.starts_with('/') => {
            return err(format!("TUNL_AUTHKEYS_FILE: '{}' is not an absolute path", printable(f)));
        }
        Some(f) => PathBuf::from(f),
        None => match home_of(&user, env) {
            Some(h) => h.join(".ssh/authorized_keys"),
            None => return err(format!("cannot find the home directory of '{user}': set TUNL_AUTHKEYS_FILE")),
        },
    };
    let prefix = env_or(env, "TUNL_PREFIX", "C-b").to_string();
    let recording_dir = getenv(env, "TUNL_RECORDING_DIR").filter(|v| !v.is_empty()).map(PathBuf::from);
    // $TMUX is "SOCKET,PID,SESSION". Inside a linbit-tunl session, --attach is implied.
    let tmux_socket =
        getenv(env, "TMUX").and_then(|t| t.split(',').next()).filter(|s| !s.is_empty()).map(PathBuf::from);
    let inside_tunl = tmux_socket.as_ref().is_some_and(|s| {
        s.file_name().is_some_and(|n| n == "tmux.sock")
            && s.parent().and_then(|p| p.file_name()).is_some_and(|n| n.to_string_lossy().starts_with("linbit-tunl-"))
    });
    let attach = attach || inside_tunl;
    if attach && tmux_socket.is_none() {
        return err("--attach works only inside a tmux session ($TMUX is not set)");
    }
    let tmux_socket = if attach { tmux_socket } else { None };
    let mode = if restricted {
        Mode::Restricted
    } else if tunnel {
        Mode::Tunnel
    } else {
        Mode::Share
    };
    Ok(Action::Run(Box::new(Config {
        session_id,
        case,
        token,
        ask_token,
        user,
        mode,
        attach,
        debug,
        target_host,
        target_port,
        relay,
        relay_port,
        relay_user,
        api,
        authkeys_file,
        ca_pubkey,
        compress,
        prefix,
        recording_dir,
        tmux_socket,
    })))
}

/// The home directory of the tunnel user: from /etc/passwd, or $HOME when the user is ourselves;
/// absolute, or none.
fn home_of(user: &str, env: &[(String, String)]) -> Option<PathBuf> {
    if let Ok(pw) = std::fs::read_to_string("/etc/passwd") {
        for line in pw.lines() {
            let f: Vec<&str> = line.split(':').collect();
            if f.len() >= 7 && f[0] == user && f[5].starts_with('/') {
                return Some(PathBuf::from(f[5]));
            }
        }
    }
    let me = getenv(env, "USER").or(getenv(env, "LOGNAME"));
    match (me, getenv(env, "HOME")) {
        // Only an absolute home names one file for the launcher and the daemon alike (F22).
        (Some(me), Some(h)) if me == user && h.starts_with('/') => Some(PathBuf::from(h)),
        _ => None,
    }
}

impl Config {
    /// Serialise for `daemon.conf`: one `key=value` per line, values percent-encoded.
    pub fn to_conf(&self) -> String {
        let mut s = String::new();
        let mut put = |k: &str, v: &str| {
            s.push_str(k);
            s.push('=');
            s.push_str(&pct_encode(v));
            s.push('\n');
        };
        put("session_id", &self.session_id);
        put("case", &self.case);
        put("token", self.token.as_deref().unwrap_or(""));
        put("user", &self.user);
        put("mode", self.mode.as_str());
        put("attach", if self.attach { "1" } else { "0" });
        put("debug", if self.debug { "1" } else { "0" });
        put("target_host", &self.target_host);
        put("target_port", &self.target_port.to_string());
        put("relay", &self.relay);
        put("relay_port", &self.relay_port.to_string());
        put("relay_user", &self.relay_user);
        put("api", &self.api);
        put("authkeys_file", &self.authkeys_file.to_string_lossy());
        put("ca_pubkey", &self.ca_pubkey);
        put("compress", if self.compress { "1" } else { "0" });
        put("prefix", &self.prefix);
        put(
            "recording_dir",
            &self.recording_dir.as_ref().map(|p| p.to_string_lossy().into_owned()).unwrap_or_default(),
        );
        put("tmux_socket", &self.tmux_socket.as_ref().map(|p| p.to_string_lossy().into_owned()).unwrap_or_default());
        s
    }

    pub fn from_conf(text: &str) -> Result<Config, String> {
        let mut m = std::collections::HashMap::new();
        for line in text.lines() {
            let (k, v) = line.split_once('=').ok_or_else(|| format!("daemon.conf: bad line '{}'", printable(line)))?;
            m.insert(k.to_string(), pct_decode(v).ok_or("daemon.conf: bad encoding")?);
        }
        let get = |k: &str| m.get(k).cloned().ok_or_else(|| format!("daemon.conf: missing {k}"));
        let num = |k: &str| -> Result<u16, String> { get(k)?.parse().map_err(|_| format!("daemon.conf: bad {k}")) };
        Ok(Config {
            session_id: get("session_id")?,
            case: get("case")?,
            token: Some(get("token")?).filter(|t| !t.is_empty()),
            ask_token: false,
            user: get("user")?,
            mode: Mode::parse(&get("mode")?).ok_or("daemon.conf: bad mode")?,
            attach: get("attach")? == "1",
            debug: get("debug")? == "1",
            target_host: get("target_host")?,
            target_port: num("target_port")?,
            relay: get("relay")?,
            relay_port: num("relay_port")?,
            relay_user: get("relay_user")?,
            api: get("api")?,
            authkeys_file: PathBuf::from(get("authkeys_file")?),
            ca_pubkey: get("ca_pubkey")?,
            compress: get("compress")? == "1",
            prefix: get("prefix")?,
            recording_dir: Some(get("recording_dir")?).filter(|p| !p.is_empty()).map(PathBuf::from),
            tmux_socket: Some(get("tmux_socket")?).filter(|p| !p.is_empty()).map(PathBuf::from),
        })
    }
}

/// Percent-encode every byte outside `[A-Za-z0-9._-]`. protocol.md also leaves `~` bare, but `~` is
/// not a token byte, so a line carrying it would be malformed: we encode it (`%7E` decodes the same).
pub fn pct_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for &b in s.as_bytes() {
        if b.is_ascii_alphanumeric() || b"._-".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Strict inverse of `pct_encode` for UTF-8 text; `None` on a malformed escape or invalid UTF-8.
pub fn pct_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let h = b.get(i + 1..i + 3).filter(|h| h.iter().all(u8::is_ascii_hexdigit))?;
            // Two ASCII hex digits (checked: `from_str_radix` alone would also take a sign).
            out.push(u8::from_str_radix(std::str::from_utf8(h).ok()?, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env() -> Vec<(String, String)> {
        vec![("USER".into(), "root".into()), ("HOME".into(), "/root".into())]
    }
    fn run(args: &[&str]) -> Result<Action, CliError> {
        parse(args.iter().map(OsString::from), &env())
    }
    fn cfg(args: &[&str]) -> Config {
        match run(args) {
            Ok(Action::Run(c)) => *c,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn defaults() {
        let c = cfg(&["swift-fox-jumps-barrel"]);
        assert_eq!(c.mode, Mode::Share);
        assert_eq!(c.relay, "tunl.linbit.com");
        assert_eq!(c.relay_port, 22);
        assert_eq!(c.relay_user, "tunl");
        assert_eq!(c.api, "https://tunl.linbit.com");
        assert_eq!((c.target_host.as_str(), c.target_port), ("localhost", 22));
        assert!(c.compress);
        assert_eq!(c.prefix, "C-b");
        assert_eq!(c.user, "root");
    }

    #[test]
    fn options_after_the_id() {
        let c = cfg(&["swift-fox-jumps-barrel", "--case", "CASE-4711", "--token=123456", "--tunnel", "--debug"]);
        assert_eq!(c.case, "CASE-4711");
        assert_eq!(c.token.as_deref(), Some("123456"));
        assert_eq!(c.mode, Mode::Tunnel);
        assert!(c.debug);
    }

    #[test]
    fn targets() {
        assert_eq!(parse_target("localhost:2222").unwrap(), ("localhost".into(), 2222));
        assert_eq!(parse_target("[::1]:22").unwrap(), ("::1".into(), 22));
        for bad in ["localhost", "host:0", "host:65536", "::1:22", "[::1]", "[zz]:22", ":22", "host:-1", "host:+22"] {
            assert!(parse_target(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn refusals() {
        for args in [
            &["Swift-fox-jumps-barrel"][..],
            &["swift-fox-jumps"],
            &["swift-fox-jumps-barrel-x"],
            &["swift--jumps-barrel"],
            &["a", "b"],
            &[],
            &["--token", "12345", "swift-fox-jumps-barrel"],
            &["--restricted", "--tunnel", "swift-fox-jumps-barrel"],
            &["--bogus", "swift-fox-jumps-barrel"],
            &["--user", "bad user", "swift-fox-jumps-barrel"],
            &["--case", "a\x1bb", "swift-fox-jumps-barrel"],
            &["--target", "nohost", "swift-fox-jumps-barrel"],
        ] {
            assert!(run(args).is_err(), "{args:?}");
        }
        let long = "x".repeat(MAX_CASE_LEN + 1);
        assert!(run(&["--case", &long, "swift-fox-jumps-barrel"]).is_err());
    }

    #[test]
    fn env_refusals() {
        for (k, v) in [
            ("TUNL_RELAY_PORT", "0"),
            ("TUNL_RELAY_PORT", "ssh"),
            ("TUNL_TARGET_PORT", "99999"),
            ("TUNL_COMPRESS", "yes"),
            ("TUNL_API", "http://tunl.linbit.com"),
            ("TUNL_RELAY_CA_PUBKEY", "not a key"),
        ] {
            let mut e = env();
            e.push((k.into(), v.into()));
            assert!(parse([OsString::from("swift-fox-jumps-barrel")], &e).is_err(), "{k}={v}");
        }
    }

    #[test]
    fn attach_needs_tmux_and_is_implied_inside_a_session() {
        assert!(run(&["--attach", "swift-fox-jumps-barrel"]).is_err());
        let with_tmux = |tmux: &str, args: &[&str]| -> Config {
            let mut e = env();
            e.push(("TMUX".into(), tmux.into()));
            match parse(args.iter().map(OsString::from), &e).unwrap() {
                Action::Run(c) => *c,
                _ => unreachable!(),
            }
        };
        let c = with_tmux("/tmp/tmux-0/default,123,0", &["--attach", "swift-fox-jumps-barrel"]);
        assert!(c.attach);
        assert_eq!(c.tmux_socket, Some(PathBuf::from("/tmp/tmux-0/default")));
        let plain = with_tmux("/tmp/tmux-0/default,123,0", &["swift-fox-jumps-barrel"]);
        assert!(!plain.attach && plain.tmux_socket.is_none(), "an ordinary tmux does not imply --attach");
        let inside = with_tmux("/tmp/linbit-tunl-0123456789ab/tmux.sock,99,0", &["swift-fox-jumps-barrel"]);
        assert!(inside.attach, "inside a linbit-tunl session --attach is automatic");
    }

    #[test]
    fn token_sources() {
        let with = |extra: &[(&str, &str)], args: &[&str]| {
            let mut e = env();
            e.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
            parse(args.iter().map(OsString::from), &e)
        };
        let id = "swift-fox-jumps-barrel";
        let c = |r: Result<Action, CliError>| match r {
            Ok(Action::Run(c)) => *c,
            other => panic!("{other:?}"),
        };
        // From the environment, so it is on no command line.
        let t = c(with(&[("TUNL_TOKEN", "135790")], &[id]));
        assert_eq!((t.token.as_deref(), t.ask_token), (Some("135790"), false));
        // `--token -` asks for it; nothing is taken from argv.
        let t = c(with(&[], &["--token", "-", id]));
        assert_eq!((t.token.as_deref(), t.ask_token), (None, true));
        let t = c(with(&[("TUNL_TOKEN", "135790")], &["--token=-", id]));
        assert_eq!((t.token.as_deref(), t.ask_token), (None, true));
        // The command line wins over the environment; an empty variable is no token.
        let t = c(with(&[("TUNL_TOKEN", "135790")], &["--token", "246802", id]));
        assert_eq!(t.token.as_deref(), Some("246802"));
        assert_eq!(c(with(&[("TUNL_TOKEN", "")], &[id])).token, None);
        let e = with(&[("TUNL_TOKEN", "12345")], &[id]).unwrap_err();
        assert!(e.0.starts_with("TUNL_TOKEN:") && !e.0.contains("12345"), "{e}");
        assert_eq!(token_from_line("424242\n"), Ok("424242".to_string()));
        assert_eq!(token_from_line(" 424242 \r\n"), Ok("424242".to_string()));
        for bad in ["", "\n", "42424\n", "4242421\n", "abcdef\n"] {
            assert!(token_from_line(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn user_names_that_cannot_reach_the_relay_are_refused_at_once() {
        // The account name travels in the hello as a protocol token: a `$` would fail only later,
        // after tmux, the recording and the session directory exist.
        let e = run(&["--user", "machine$", "swift-fox-jumps-barrel"]).unwrap_err();
        assert!(e.0.starts_with("--user: 'machine$'"), "{e}");
        let mut env = env();
        env[0].1 = "machine$".into();
        let e = parse([OsString::from("swift-fox-jumps-barrel")], &env).unwrap_err();
        assert!(e.0.contains("machine$") && e.0.contains("--user"), "{e}");
    }

    #[test]
    fn without_user_or_logname_the_effective_user_is_asked() {
        let env = vec![(EFFECTIVE_USER.to_string(), "backup".to_string()), ("HOME".into(), "/var/backups".into())];
        let c = match parse([OsString::from("swift-fox-jumps-barrel")], &env).unwrap() {
            Action::Run(c) => *c,
            other => panic!("{other:?}"),
        };
        assert_eq!(c.user, "backup");
        assert!(parse([OsString::from("swift-fox-jumps-barrel")], &[]).is_err());
        assert_eq!(
            user_of_uid("root:x:0:0:root:/root:/bin/sh\nbackup:x:34:34::/var/backups:/bin/sh\n", 34).as_deref(),
            Some("backup")
        );
        assert_eq!(user_of_uid("root:x:0:0:root:/root:/bin/sh\n", 34), None);
    }

    #[test]
    fn conf_round_trip() {
        let c = cfg(&["--case", "Case 4711: disk % full", "--token", "123456", "swift-fox-jumps-barrel"]);
        assert_eq!(Config::from_conf(&c.to_conf()).unwrap(), c);
    }

    #[test]
    fn pct() {
        assert_eq!(pct_encode("a b/ü"), "a%20b%2F%C3%BC");
        assert_eq!(pct_decode("a%20b%2F%C3%BC").as_deref(), Some("a b/ü"));
        assert_eq!(pct_decode("%zz"), None);
        assert_eq!(pct_decode("%2"), None);
    }
}

/// Properties of the percent coding used on the command line and on the wire (issue 13).
#[cfg(test)]
mod props {
    use super::*;
    use proptest::prelude::*;

    /// Found by `pct_decode_never_panics`: `u8::from_str_radix` takes a sign, so `%+a` decoded.
    #[test]
    fn pct_decode_wants_two_hex_digits() {
        for bad in ["%+a", "%-1", "%+", "%g0", "%1"] {
            assert_eq!(pct_decode(bad), None, "{bad}");
        }
        assert_eq!(pct_decode("%7e%7E"), Some("~~".into()));
    }

    fn arg() -> impl Strategy<Value = String> {
        prop_oneof![
            prop::sample::select(vec![
                "swift-fox-jumps-barrel",
                "--case",
                "--token",
                "--token=-",
                "--user",
                "--target",
                "--restricted",
                "--tunnel",
                "--attach",
                "--debug",
                "-h",
                "--version",
                "-x",
                "--",
                "-",
                "123456",
                "root",
                "[::1]:22",
                "localhost:0",
                "Case 4711",
            ])
            .prop_map(String::from),
            "(?s).{0,12}",
            "[a-z]{1,5}(-[a-z]{1,5}){3}",
        ]
    }

    fn env_entry() -> impl Strategy<Value = (String, String)> {
        let key = prop::sample::select(vec![
            "USER",
            "LOGNAME",
            "HOME",
            "TMUX",
            EFFECTIVE_USER,
            "TUNL_TOKEN",
            "TUNL_RELAY",
            "TUNL_RELAY_PORT",
            "TUNL_USER",
            "TUNL_API",
            "TUNL_AUTHKEYS_FILE",
            "TUNL_TARGET_HOST",
            "TUNL_TARGET_PORT",
            "TUNL_RELAY_CA_PUBKEY",
            "TUNL_COMPRESS",
            "TUNL_PREFIX",
            "TUNL_RECORDING_DIR",
        ]);
        let value = prop_oneof![
            prop::sample::select(vec![
                "root",
                "",
                "/root",
                "123456",
                "https://relay.example/",
                "http://x",
                "0",
                "1",
                "65536",
                "/tmp/linbit-tunl-0123456789ab/tmux.sock,1,0",
                "relay.example",
                "::1",
                "/etc/ak",
            ])
            .prop_map(String::from),
            "(?s).{0,16}",
        ];
        (key, value).prop_map(|(k, v)| (k.to_string(), v))
    }

    /// Found by the fuzz target `cli_env`: a relative `$HOME` (for a user not in /etc/passwd) gave
    /// a relative authorized_keys path, which the launcher and the daemon, in different
    /// directories, would take for two files (F22).
    #[test]
    fn a_relative_home_is_no_home() {
        for home in ["otro/", ".", "home/rooot"] {
            let env = vec![("USER".to_string(), "rooot".to_string()), ("HOME".to_string(), home.to_string())];
            let e = parse([OsString::from("swift-fox-jumps-barrel")], &env).unwrap_err();
            assert!(e.0.contains("cannot find the home directory of 'rooot'"), "{home}: {e}");
        }
    }

    proptest! {
        /// What the fuzz target `cli_env` checks: a refusal is one line without control characters;
        /// an accepted configuration holds only valid values and survives daemon.conf unchanged.
        #[test]
        fn command_lines_are_refused_in_one_line_or_survive_daemon_conf(
            args in prop::collection::vec(arg(), 0..6),
            env in prop::collection::vec(env_entry(), 0..6),
        ) {
            match parse(args.iter().map(OsString::from), &env) {
                Ok(Action::Run(c)) => {
                    prop_assert!(valid_session_id(&c.session_id) && c.token.as_deref().is_none_or(valid_token));
                    prop_assert!(c.case.len() <= MAX_CASE_LEN && !c.case.chars().any(char::is_control));
                    prop_assert!(c.api.starts_with("https://") && !c.api.ends_with('/'));
                    prop_assert!(c.authkeys_file.is_absolute() && c.attach == c.tmux_socket.is_some());
                    let mut want = (*c).clone();
                    want.ask_token = false;
                    prop_assert_eq!(Config::from_conf(&c.to_conf()), Ok(want));
                }
                Ok(_) => {}
                Err(e) => prop_assert!(!e.0.is_empty() && !e.0.chars().any(char::is_control), "{:?}", e),
            }
        }

        #[test]
        fn pct_roundtrip(s in ".{0,40}") {
            prop_assert_eq!(pct_decode(&pct_encode(&s)), Some(s));
        }

        #[test]
        fn pct_decode_never_panics(s in "\\PC{0,40}|[%0-9a-fA-F+ ]{0,20}") {
            if let Some(d) = pct_decode(&s) {
                // Whatever decoded is text, and encodes to something that decodes to it again.
                prop_assert_eq!(pct_decode(&pct_encode(&d)), Some(d));
                // Strict: every `%` starts two hex digits.
                let b = s.as_bytes();
                for (i, _) in s.match_indices('%') {
                    prop_assert!(b.get(i + 1..i + 3).is_some_and(|h| h.iter().all(u8::is_ascii_hexdigit)), "{s:?}");
                }
            }
        }
    }
}
