//! The launcher: what runs in the customer's terminal. It prepares everything that can fail before
//! the session starts (directory, stale keys, authentication), starts the dedicated tmux server with
//! the daemon hidden in it, attaches the customer's terminal, and reports how the session ended.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::cli::{Config, Mode};
use crate::daemon::Daemon;
use crate::sessiondir::{self, Log, SessionDir};
use crate::{auth, authkeys, signals, ssh, tmux, ui, which};

const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// The daemon's watchdog is 10 s; give it that and a little more to write its exit file.
const EXIT_TIMEOUT: Duration = Duration::from_secs(12);
const SIGN_RETRIES: u32 = 3;

fn say(msg: &str) {
    eprintln!("linbit-tunl: {msg}");
}

pub fn run(cfg: Config) -> u8 {
    let foreground = cfg.mode == Mode::Tunnel && which("tmux").is_none();
    let dir = match SessionDir::create(&cfg.session_id) {
        Ok(d) => d,
        Err(e) => {
            say(&e);
            return 1;
        }
    };
    let mut log = Log::open(&dir.file("debug.log"));
    log.line(&format!("linbit-tunl {} starting, mode {}", crate::cli::VERSION, cfg.mode.as_str()));
    if let Err(e) = sweep_stale_keys(&cfg.authkeys_file) {
        say(&e);
        return 1;
    }
    let auth_path = match authenticate(&cfg, &dir, &mut log) {
        Ok(a) => a,
        Err(e) => {
            say(&e);
            log.line(&format!("fatal: {e}"));
            return 1;
        }
    };
    let mut conf = cfg.to_conf();
    conf.push_str(&format!("auth={}\n", auth_name(auth_path)));
    if let Err(e) = sessiondir::write_private(&dir.file("daemon.conf"), conf.as_bytes(), 0o600) {
        say(&e);
        return 1;
    }
    if foreground { run_foreground(cfg, dir, auth_path) } else { run_tmux(cfg, dir, &mut log) }
}

fn auth_name(a: ssh::AuthPath) -> &'static str {
    match a {
        ssh::AuthPath::Cert => "cert",
        ssh::AuthPath::KeyboardInteractive => "ki",
    }
}

pub fn auth_from_name(s: &str) -> Option<ssh::AuthPath> {
    match s {
        "cert" => Some(ssh::AuthPath::Cert),
        "ki" => Some(ssh::AuthPath::KeyboardInteractive),
        _ => None,
    }
}

/// Remove every linbit-tunl block left by a session that could not clean up (killed, power loss).
pub fn sweep_stale_keys(path: &Path) -> Result<(), String> {
    match std::fs::symlink_metadata(path) {
        Err(_) => Ok(()),
        Ok(_) => authkeys::edit(path, |old| authkeys::remove_blocks(old, None))
            .map(|_| ())
            .map_err(|e| format!("cannot clean stale support keys from {}: {e}", path.display())),
    }
}

/// Ephemeral key, then a certificate from the signing API (with a token), else keyboard-interactive.
fn authenticate(cfg: &Config, dir: &SessionDir, log: &mut Log) -> Result<ssh::AuthPath, String> {
    let keydir = dir.file("sharekey");
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&keydir)
        .map_err(|e| format!("cannot create {}: {e}", keydir.display()))?;
    let key = auth::generate_key(&keydir)?;
    auth::write_known_hosts(&dir.path, &cfg.relay, cfg.relay_port, &cfg.ca_pubkey)?;
    let Some(token) = &cfg.token else {
        log.line("no token: keyboard-interactive with the session ID");
        auth::write_askpass(&dir.path, &cfg.session_id)?;
        return Ok(ssh::AuthPath::KeyboardInteractive);
    };
    let public = key.public_key().to_openssh().map_err(|e| format!("cannot encode the public key: {e}"))?;
    let (host, _) = ssh::host_context();
    let mut tries = 0;
    loop {
        tries += 1;
        match auth::request_certificate(&cfg.api, &cfg.session_id, token, &public, &host, auth::REQUEST_TIMEOUT) {
            Ok(cert) => {
                let now = crate::daemon::now_unix();
                auth::verify_certificate(&cert, key.public_key(), &cfg.ca_pubkey, &cfg.relay_user, now)?;
                auth::write_cert(&keydir, &cert)?;
                log.line("certificate received and verified");
                return Ok(ssh::AuthPath::Cert);
            }
            Err(auth::SignError::Unreachable(why)) => {
                say(&format!("the signing service is unreachable ({why}); using keyboard-interactive login"));
                log.line(&format!("signing API unreachable: {why}"));
                auth::write_askpass(&dir.path, token)?;
                return Ok(ssh::AuthPath::KeyboardInteractive);
            }
            Err(auth::SignError::RateLimited(secs)) if tries < SIGN_RETRIES && secs <= 60 => {
                say(&format!("the signing service asks us to wait {secs} s; retrying"));
                std::thread::sleep(Duration::from_secs(secs.max(1)));
            }
            Err(e) => return Err(format!("certificate signing failed: {e}")),
        }
    }
}

fn run_foreground(cfg: Config, dir: SessionDir, auth_path: ssh::AuthPath) -> u8 {
    let debug = cfg.debug;
    let mut d = match Daemon::new(cfg, dir, auth_path, true) {
        Ok(d) => d,
        Err(e) => {
            say(&e);
            return 1;
        }
    };
    let (end, connected) = d.run_to_end();
    let dir = d.into_dir();
    finish(&dir, end.status(), connected, debug, None)
}

/// Remove the directory unless it is evidence (error, never connected) or --debug keeps it.
fn finish(dir: &SessionDir, status: u8, connected: bool, debug: bool, rec: Option<&str>) -> u8 {
    if let Some(r) = rec.filter(|r| !r.is_empty()) {
        say(&format!("session recording: {r} (replay with: asciinema play -i 2 {r})"));
    }
    let keep = debug || status == 1 || !connected;
    if keep {
        say(&format!("session files kept in {}", dir.path.display()));
    } else {
        dir.remove();
    }
    status
}

fn tmux_cmd(dir: &SessionDir) -> Command {
    let mut c = Command::new("tmux");
    c.arg("-S").arg(dir.file("tmux.sock"));
    c
}

fn terminal_size() -> (u16, u16) {
    match rustix::termios::tcgetwinsize(rustix::stdio::stdout()) {
        Ok(ws) if ws.ws_col > 0 && ws.ws_row > 0 => (ws.ws_col, ws.ws_row),
        _ => (80, 24),
    }
}

/// Ask tmux whether it accepts the prefix key; fall back to C-b with a warning, as the manual says.
fn checked_prefix(dir: &SessionDir, prefix: &str) -> String {
    if prefix == "C-b" {
        return prefix.to_string();
    }
    let sock = dir.file("prefix-check.sock");
    let ok = Command::new("tmux")
        .args(ui::prefix_check_args(&sock, prefix))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    let _ = Command::new("tmux").arg("-S").arg(&sock).arg("kill-server").stderr(Stdio::null()).status();
    let _ = std::fs::remove_file(&sock);
    if ok {
        prefix.to_string()
    } else {
        say(&format!("TUNL_PREFIX '{}' is not a key tmux knows; using C-b", crate::cli::printable(prefix)));
        "C-b".to_string()
    }
}

fn run_tmux(mut cfg: Config, dir: SessionDir, log: &mut Log) -> u8 {
    let exe = std::env::current_exe().unwrap_or_else(|_| PathBuf::from("linbit-tunl"));
    let version = Command::new("tmux").arg("-V").output().map(|o| o.stdout).unwrap_or_default();
    let features = tmux::Features::from_version_output(&String::from_utf8_lossy(&version));
    cfg.prefix = checked_prefix(&dir, &cfg.prefix);
    let fail = |dir: &SessionDir, msg: &str| -> u8 {
        say(msg);
        let _ = tmux_cmd(dir).arg("kill-server").stderr(Stdio::null()).status();
        1
    };
    for f in ["chat.fifo", "ctl.fifo"] {
        if let Err(e) = sessiondir::make_fifo(&dir.file(f)) {
            return fail(&dir, &e);
        }
    }
    let conf = ui::tmux_conf(&cfg, &dir.path, &exe, &features);
    if let Err(e) = sessiondir::write_private(&dir.file("tmux.conf"), conf.as_bytes(), 0o600) {
        return fail(&dir, &e);
    }
    let (width, height) = terminal_size();
    let target = ui::LayoutTarget { attach_session: None, window: "main".into(), pane_base: 0, width, height };
    let cwd = std::env::current_dir().unwrap_or_else(|_| PathBuf::from("/"));
    for (i, args) in ui::layout_commands(&target, &exe, &dir.path, &cwd, &features).into_iter().enumerate() {
        let mut c = tmux_cmd(&dir);
        if i == 0 {
            c.arg("-f").arg(dir.file("tmux.conf"));
        }
        // Our own server: a TMUX inherited from the customer's tmux must not redirect anything.
        let out = c.args(&args).env_remove("TMUX").stdin(Stdio::null()).output();
        match out {
            Ok(o) if o.status.success() => {}
            Ok(o) => {
                let e = crate::text::neutralize(&o.stderr, 300);
                return fail(&dir, &format!("tmux refused to build the session layout: {e}"));
            }
            Err(e) => return fail(&dir, &format!("cannot run tmux: {e}")),
        }
    }
    log.line("tmux session started; waiting for the daemon to connect");
    // Wait for the daemon's verdict on the connection before the customer's terminal is handed over.
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        if let Ok(s) = std::fs::read_to_string(dir.file("state")) {
            if s.starts_with("ready") {
                break;
            }
            if let Some(msg) = s.strip_prefix("failed ") {
                let _ = tmux_cmd(&dir).arg("kill-server").stderr(Stdio::null()).status();
                wait_exit(&dir);
                say(msg.trim_end());
                say(&format!("session files kept in {}", dir.path.display()));
                return 1;
            }
        }
        if !dir.file("tmux.sock").exists() || Instant::now() >= deadline {
            return fail(&dir, "the session daemon did not start; see debug.log in the session directory");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    if let Ok(pid) = std::fs::read_to_string(dir.file("daemon.pid")) {
        if let Ok(pid) = pid.trim().parse::<i32>() {
            signals::forward_to(pid);
        }
    }
    let _ = tmux_cmd(&dir).args(["attach-session", "-t", ui::SESSION]).env_remove("TMUX").status();
    let (status, rec) = match wait_exit(&dir) {
        Some(x) => x,
        None => {
            // The daemon vanished without its orderly end: make sure no support key outlives it.
            let sid = cfg.session_id.clone();
            let _ = authkeys::edit(&cfg.authkeys_file, |old| authkeys::remove_blocks(old, Some(&sid)));
            let _ = tmux_cmd(&dir).arg("kill-server").stderr(Stdio::null()).status();
            say("the session daemon ended without cleaning up; support keys were removed");
            (1, String::new())
        }
    };
    finish(&dir, status, true, cfg.debug, Some(&rec))
}

/// The daemon's exit file: status and recording path.
fn wait_exit(dir: &SessionDir) -> Option<(u8, String)> {
    let deadline = Instant::now() + EXIT_TIMEOUT;
    loop {
        if let Ok(s) = std::fs::read_to_string(dir.file("exit")) {
            let mut it = s.lines();
            if let Some(Ok(st)) = it.next().map(str::parse::<u8>) {
                let rec = it.next().unwrap_or("").to_string();
                // The daemon's last word (a relay CLOSE reason, already neutralised) was shown only
                // inside tmux, which is gone now: repeat it on the customer's terminal.
                if let Some(msg) = it.next().filter(|m| !m.is_empty()) {
                    say(msg);
                }
                return Some((st, rec));
            }
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `__daemon DIR`: the daemon in its hidden tmux window.
pub fn daemon_main(dir: &Path) -> u8 {
    let dir = match SessionDir::open(dir) {
        Ok(d) => d,
        Err(e) => {
            say(&e);
            return 1;
        }
    };
    let text = match std::fs::read_to_string(dir.file("daemon.conf")) {
        Ok(t) => t,
        Err(e) => {
            say(&format!("cannot read daemon.conf: {e}"));
            return 1;
        }
    };
    let auth_path = text.lines().find_map(|l| l.strip_prefix("auth=")).and_then(auth_from_name);
    let conf: String = text.lines().filter(|l| !l.starts_with("auth=")).map(|l| format!("{l}\n")).collect();
    let (cfg, auth_path) = match (Config::from_conf(&conf), auth_path) {
        (Ok(c), Some(a)) => (c, a),
        _ => {
            say("daemon.conf is damaged");
            return 1;
        }
    };
    let _ = std::fs::write(dir.file("daemon.pid"), format!("{}\n", std::process::id()));
    let version = Command::new("tmux").arg("-V").output().map(|o| o.stdout).unwrap_or_default();
    let features = tmux::Features::from_version_output(&String::from_utf8_lossy(&version));
    let sock = dir.file("tmux.sock");
    let mut d = match Daemon::new(cfg, dir, auth_path, false) {
        Ok(d) => d,
        Err(e) => {
            say(&e);
            return 1;
        }
    };
    if let Err(e) = d.open_fifos().and_then(|_| d.attach_tmux(features)) {
        say(&e);
        return 1;
    }
    let (end, _) = d.run_to_end();
    // The session is over: the customer's terminal returns to the launcher.
    let _ = Command::new("tmux").arg("-S").arg(&sock).arg("kill-server").stderr(Stdio::null()).status();
    end.status()
}

use std::os::unix::fs::DirBuilderExt;
