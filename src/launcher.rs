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
    crate::say(msg);
}

/// Exit status for a signal that interrupted the set-up.
fn interrupted_status(sig: i32) -> u8 {
    if sig == signals::SIGTERM { 143 } else { 130 }
}

pub fn run(cfg: Config) -> u8 {
    let foreground = cfg.mode == Mode::Tunnel && which("tmux").is_none();
    signals::hold();
    let dir = match SessionDir::create(&cfg.session_id) {
        Ok(d) => d,
        Err(e) => {
            say(&e);
            return 1;
        }
    };
    let status = prepare_and_run(cfg, &dir, foreground);
    if let Some(sig) = signals::held().filter(|_| status == INTERRUPTED) {
        // Stopped during set-up: nothing of the session may stay, least of all the key.
        say("interrupted before the session started; nothing was left behind");
        dir.remove();
        return interrupted_status(sig);
    }
    status
}

/// A status that says "a held signal stopped the set-up"; never an exit status of its own.
const INTERRUPTED: u8 = 255;

fn prepare_and_run(cfg: Config, dir: &SessionDir, foreground: bool) -> u8 {
    let dir = dir.alias();
    let mut log = Log::open(&dir.file("debug.log"));
    log.line(&format!("linbit-tunl {} starting, mode {}", crate::cli::VERSION, cfg.mode.as_str()));
    // Which sshd the tunnel reaches decides the options on support's keys; ask while we sign.
    let probe = {
        let (host, port) = (cfg.target_host.clone(), cfg.target_port);
        std::thread::spawn(move || probe_target(&host, port))
    };
    if let Err(e) = sweep_stale_keys(&cfg, &mut log) {
        say(&e);
        return 1;
    }
    let auth_path = match authenticate(&cfg, &dir, &mut log) {
        Ok(_) if signals::held().is_some() => return INTERRUPTED,
        Ok(a) => a,
        Err(_) if signals::held().is_some() => return INTERRUPTED,
        Err(e) => {
            say(&e);
            log.line(&format!("fatal: {e}"));
            return 1;
        }
    };
    match probe.join().ok().flatten() {
        Some(banner) => {
            log.line(&format!("target sshd says {banner}"));
            let _ = sessiondir::write_private(&dir.file(authkeys::TARGET_SSHD), banner.as_bytes(), 0o600);
        }
        None => log.line("target sshd did not identify itself: support keys go in without options"),
    }
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

/// Where we remember every authorized_keys file a session of ours used (F9): the next run sweeps
/// them all, also when it uses another file itself (`--user`, TUNL_AUTHKEYS_FILE).
fn state_dir() -> PathBuf {
    std::env::var_os("TUNL_STATE_DIR")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/lib/linbit-tunl"))
}

const RECORD: &str = "authkeys-files";
/// More files than this in the record would be someone else's doing; the oldest go.
const RECORD_MAX: usize = 64;

fn read_record(path: &Path) -> Vec<PathBuf> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let mut files: Vec<PathBuf> = Vec::new();
    for l in text.lines().map(PathBuf::from).filter(|p| p.is_absolute()) {
        if !files.contains(&l) {
            files.push(l);
        }
    }
    files
}

fn write_record(path: &Path, files: &[PathBuf]) -> Result<(), String> {
    let dir = path.parent().unwrap_or(Path::new("/"));
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| format!("{}: {e}", dir.display()))?;
    let start = files.len().saturating_sub(RECORD_MAX);
    let text: String = files[start..].iter().map(|f| format!("{}\n", f.display())).collect();
    sessiondir::publish(path, &text)
}

/// Remove every linbit-tunl block left by a session that could not clean up (killed, power loss),
/// from our file and every file an earlier run recorded, then record ours. A block whose session
/// still runs on this host (its directory's lock is held) is not stale; one of our own ID is, since
/// we hold that ID's directory now.
pub fn sweep_stale_keys(cfg: &Config, log: &mut Log) -> Result<(), String> {
    let record = state_dir().join(RECORD);
    let ours = cfg.authkeys_file.clone();
    let mut keep = Vec::new();
    for f in read_record(&record).into_iter().filter(|f| *f != ours) {
        match sweep_file(&f, &cfg.session_id) {
            Ok(false) => log.line(&format!("stale sweep: {} is clean", f.display())),
            Ok(true) => keep.push(f),
            Err(e) => {
                log.line(&format!("stale sweep of {}: {e}", f.display()));
                keep.push(f);
            }
        }
    }
    sweep_file(&ours, &cfg.session_id)
        .map_err(|e| format!("cannot clean stale support keys from {}: {e}", ours.display()))?;
    keep.push(ours);
    if let Err(e) = write_record(&record, &keep) {
        log.line(&format!("cannot record the authorized_keys file for later sweeps: {e}"));
    }
    Ok(())
}

/// Sweep one file; returns whether blocks of running sessions remain in it.
fn sweep_file(path: &Path, own_id: &str) -> Result<bool, String> {
    let mut live = false;
    authkeys::edit(path, |old| {
        live = false;
        let mut out = old.to_vec();
        for id in block_ids(old) {
            if id != own_id && session_alive(&id) {
                live = true;
            } else {
                out = authkeys::remove_blocks(&out, Some(&id));
            }
        }
        out
    })?;
    Ok(live)
}

/// The session IDs named by `# linbit-tunl-begin ID` lines.
fn block_ids(content: &[u8]) -> Vec<String> {
    let mut ids: Vec<String> = content
        .split(|&b| b == b'\n')
        .filter_map(|l| l.strip_prefix(b"# linbit-tunl-begin "))
        .map(|id| String::from_utf8_lossy(id.strip_suffix(b"\r").unwrap_or(id)).into_owned())
        .collect();
    ids.dedup();
    ids
}

/// The pid the daemon of the session in `dir` published.
fn daemon_pid(dir: &Path) -> Option<i32> {
    std::fs::read_to_string(dir.join("daemon.pid")).ok()?.trim().parse().ok().filter(|&p: &i32| p > 0)
}

/// Is a session with this ID running here? Its directory is root's and a process holds its lock;
/// nothing a local user can create in /tmp passes that (F13).
fn session_alive(id: &str) -> bool {
    crate::cli::valid_session_id(id) && SessionDir::running(&sessiondir::dir_for(id))
}

/// The target sshd's identification string (`SSH-2.0-OpenSSH_9.2p1 Debian-2`), read from its port.
fn probe_target(host: &str, port: u16) -> Option<String> {
    use std::io::{Read, Write};
    use std::net::ToSocketAddrs;
    for addr in (host, port).to_socket_addrs().ok()? {
        let Ok(mut s) = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)) else { continue };
        let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
        // Our own identification first, so sshd logs an ordinary closed connection.
        let _ = s.write_all(b"SSH-2.0-linbit-tunl-probe\r\n");
        let mut buf = Vec::new();
        let mut chunk = [0u8; 512];
        // RFC 4253 lets a server send other lines first; the identification is at most 255 bytes.
        while buf.len() < 8192 {
            let n = match s.read(&mut chunk) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            buf.extend_from_slice(&chunk[..n]);
            let complete = buf.iter().rposition(|&b| b == b'\n').map_or(&buf[..0], |i| &buf[..i]);
            if let Some(id) = complete.split(|&b| b == b'\n').find(|l| l.starts_with(b"SSH-")) {
                return Some(crate::text::neutralize(id.strip_suffix(b"\r").unwrap_or(id), 255));
            }
        }
    }
    None
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
    let id = cfg.session_id.clone();
    // Lets a session started meanwhile tell that our keys are not stale.
    let _ = sessiondir::publish(&dir.file("daemon.pid"), &format!("{}\n", std::process::id()));
    if signals::held().is_some() {
        return INTERRUPTED;
    }
    let mut d = match Daemon::new(cfg, dir, auth_path, true) {
        Ok(d) => d,
        Err(e) => {
            say(&e);
            return 1;
        }
    };
    let (end, connected) = d.run_to_end();
    let dir = d.into_dir();
    let status = if keys_gone(&dir, &id) { end.status() } else { 1 };
    finish(&dir, status, connected, debug, None)
}

/// The end of every session: the daemon removed support's keys and proved it, or its journal is
/// still in the directory. Then try once more, and if they are still in the file, tell the
/// customer in plain words which lines to delete where (F12); the status is then 1.
fn keys_gone(dir: &SessionDir, id: &str) -> bool {
    // No journal: the daemon never wrote a key, or proved them all gone.
    let Some(mut block) = authkeys::KeyBlock::from_journal(&dir.file(authkeys::JOURNAL), id) else { return true };
    match block.remove() {
        Ok(()) => true,
        Err(left) => {
            for line in left.message() {
                say(&line);
            }
            false
        }
    }
}

/// Remove the directory unless it is evidence (error, never connected) or --debug keeps it.
fn finish(dir: &SessionDir, status: u8, connected: bool, debug: bool, rec: Option<&str>) -> u8 {
    if let Some(r) = rec.filter(|r| !r.is_empty()) {
        say(&format!("session recording: {r} (replay with: asciinema play -i 2 {r})"));
        let chat = crate::recording::transcript_path(std::path::Path::new(r));
        if chat.is_file() {
            say(&format!("chat transcript: {}", chat.display()));
        }
    }
    let keep = debug || status == 1 || !connected;
    if keep {
        dir.drop_secrets();
        say(&format!("session files kept in {}", dir.path.display()));
    } else {
        dir.remove();
    }
    status
}

/// The tmux server a session lives on: our dedicated one, or the customer's with `--attach`.
fn tmux_sock(cfg: &Config, dir: &SessionDir) -> PathBuf {
    cfg.tmux_socket.clone().unwrap_or_else(|| dir.file("tmux.sock"))
}

fn tmux_at(sock: &Path) -> Command {
    let mut c = Command::new("tmux");
    // A TMUX inherited from the customer's tmux must never redirect our commands.
    c.arg("-S").arg(sock).env_remove("TMUX").stdin(Stdio::null());
    c
}

/// Every tmux call of the launcher but the customer's own `attach-session` is bounded: a tmux client
/// that cannot talk to its server (another version's server on the socket, a hung server) must not
/// hang the customer's terminal.
const TMUX_TIMEOUT: Duration = Duration::from_secs(10);

/// Run `tmux ARGS` with the deadline; Err names what went wrong (failure text or the timeout).
fn tmux_run(c: &mut Command) -> Result<String, String> {
    match crate::proc::run_with_timeout(c, TMUX_TIMEOUT) {
        Ok(f) if f.status.is_some_and(|s| s.success()) => Ok(String::from_utf8_lossy(&f.stdout).into_owned()),
        Ok(f) if f.status.is_none() => Err(format!("tmux did not answer within {} s", TMUX_TIMEOUT.as_secs())),
        Ok(f) => Err(tmux_failure_text(&f.stderr)),
        Err(e) => Err(format!("cannot run tmux: {e}")),
    }
}

/// Run one tmux command on `sock` and return its trimmed output.
fn tmux_query(sock: &Path, args: &[&str]) -> Option<String> {
    tmux_run(tmux_at(sock).args(args)).ok().map(|s| s.trim().to_string())
}

/// Run one tmux command on `sock` for its effect; failures are the caller's to ignore.
fn tmux_do(sock: &Path, args: &[&str]) -> bool {
    tmux_run(tmux_at(sock).args(args)).is_ok()
}

/// The window that holds our panes inside the customer's session (`--attach`).
pub const ATTACH_WINDOW: &str = "linbit-tunl";

fn terminal_size() -> (u16, u16) {
    match rustix::termios::tcgetwinsize(rustix::stdio::stdout()) {
        Ok(ws) if ws.ws_col > 0 && ws.ws_row > 0 => (ws.ws_col, ws.ws_row),
        _ => (80, 24),
    }
}

/// Review finding F17: tmux runs our binary as root on every hotkey, menu entry and pane start, for
/// hours. The path the customer started (often their download directory) may be writable by
/// others, so tmux gets a copy in the root-only session directory instead.
fn private_copy(dir: &SessionDir) -> Result<PathBuf, String> {
    let me = std::env::current_exe().map_err(|e| format!("cannot find our own binary: {e}"))?;
    let copy = dir.file("linbit-tunl");
    // A retry reuses the kept directory of the failed attempt (checked ours, 0700): replace its copy.
    let _ = std::fs::remove_file(&copy);
    let bytes = std::fs::read(&me).map_err(|e| format!("cannot read {}: {e}", me.display()))?;
    sessiondir::write_private(&copy, &bytes, 0o700)
        .map_err(|e| format!("cannot copy the binary into the session directory: {e}"))?;
    Ok(copy)
}

/// Ask tmux whether it accepts the prefix key; fall back to C-b with a warning, as the manual says.
fn checked_prefix(dir: &SessionDir, prefix: &str) -> String {
    if prefix == "C-b" {
        return prefix.to_string();
    }
    let sock = dir.file("prefix-check.sock");
    let mut c = Command::new("tmux");
    c.args(ui::prefix_check_args(&sock, prefix)).env_remove("TMUX");
    let ok = tmux_run(&mut c).is_ok();
    tmux_do(&sock, &["kill-server"]);
    let _ = std::fs::remove_file(&sock);
    if ok {
        prefix.to_string()
    } else {
        say(&format!("TUNL_PREFIX '{}' is not a key tmux knows; using C-b", crate::cli::printable(prefix)));
        "C-b".to_string()
    }
}

fn run_tmux(mut cfg: Config, dir: SessionDir, log: &mut Log) -> u8 {
    let exe = match private_copy(&dir) {
        Ok(e) => e,
        Err(e) => {
            say(&e);
            return 1;
        }
    };
    let features = tmux::Features::installed();
    let sock = tmux_sock(&cfg, &dir);
    let attach = cfg.tmux_socket.is_some();
    cfg.prefix = if attach { "C-b".to_string() } else { checked_prefix(&dir, &cfg.prefix) };
    let session = if attach {
        // The session the customer runs us from; prefix and options are theirs, so read them.
        // $TMUX_PANE names the pane we run in; without it tmux guesses the most recent session.
        let pane = std::env::var("TMUX_PANE").unwrap_or_default();
        let mut q = vec!["display-message", "-p"];
        if !pane.is_empty() {
            q.extend(["-t", pane.as_str()]);
        }
        q.push("#{session_name}");
        match tmux_query(&sock, &q) {
            Some(s) if !s.is_empty() => s,
            _ => {
                say("--attach: cannot find the current tmux session");
                return 1;
            }
        }
    } else {
        ui::SESSION.to_string()
    };
    let end_tmux = |sock: &Path| {
        if attach {
            restore_bindings(sock, &dir);
            for w in [ATTACH_WINDOW, "linbit-inner"] {
                tmux_do(sock, &["kill-window", "-t", &format!("{}:{w}", features.exact(&session))]);
            }
        } else {
            tmux_do(sock, &["kill-server"]);
            // A customer who runs the same command again must not meet this server while it exits.
            wait_server_gone(sock);
        }
    };
    let fail = |msg: &str| -> u8 {
        say(msg);
        end_tmux(&sock);
        dir.drop_secrets();
        say(&format!("session files kept in {}", dir.path.display()));
        1
    };
    for f in ["chat.fifo", "ctl.fifo"] {
        if let Err(e) = sessiondir::make_fifo(&dir.file(f)) {
            return fail(&e);
        }
    }
    if attach {
        if let Some(p) = tmux_query(&sock, &["show-options", "-gv", "prefix"]) {
            cfg.prefix = p;
        }
        if let Err(e) = save_bindings(&sock, &dir, &features) {
            return fail(&e);
        }
    }
    let conf = ui::tmux_conf(&cfg, &dir.path, &exe, &features);
    if let Err(e) = sessiondir::write_private(&dir.file("tmux.conf"), conf.as_bytes(), 0o600) {
        return fail(&e);
    }
    for (name, text) in ui::menu_files(&exe, &dir.path, &features) {
        if let Err(e) = sessiondir::write_private(&dir.file(&name), text.as_bytes(), 0o600) {
            return fail(&e);
        }
    }
    let mut dconf = std::fs::read_to_string(dir.file("daemon.conf")).unwrap_or_default();
    dconf.push_str(&format!("tmux_session={}\n", crate::cli::pct_encode(&session)));
    dconf.push_str(&format!("prefix_checked={}\n", crate::cli::pct_encode(&cfg.prefix)));
    let (width, height) = terminal_size();
    dconf.push_str(&format!("tmux_size={width}x{height}\n"));
    let _ = std::fs::remove_file(dir.file("daemon.conf"));
    if let Err(e) = sessiondir::write_private(&dir.file("daemon.conf"), dconf.as_bytes(), 0o600) {
        return fail(&e);
    }
    let pane_base = if attach {
        tmux_query(&sock, &["show-options", "-gv", "pane-base-index"]).and_then(|v| v.parse().ok()).unwrap_or(0)
    } else {
        0
    };
    let target = ui::LayoutTarget {
        attach_session: attach.then(|| session.clone()),
        window: if attach { ATTACH_WINDOW.into() } else { "main".into() },
        pane_base,
        width,
        height,
    };
    let cwd = std::env::current_dir().unwrap_or_else(|_| PathBuf::from("/"));
    let mut steps: Vec<Vec<String>> = Vec::new();
    if attach {
        steps.push(vec!["source-file".into(), dir.file("tmux.conf").to_string_lossy().into_owned()]);
    }
    steps.extend(ui::layout_commands(&target, &exe, &dir.path, &cwd, &features));
    for (i, args) in steps.into_iter().enumerate() {
        let mut c = tmux_at(&sock);
        if i == 0 && !attach {
            c.arg("-f").arg(dir.file("tmux.conf"));
        }
        // tmux 1.8 has no new-session -c: the session starts where its client runs.
        c.current_dir(&cwd);
        if let Err(e) = tmux_run(c.args(&args)) {
            // The daemon starts with the first step; when it fails at once (relay unreachable) it
            // ends the server under the later steps. Its reason is then the real one.
            if let Some(msg) = wait_daemon_failure(&dir, Duration::from_secs(3)) {
                wait_exit_file(&dir);
                return fail(&msg);
            }
            return fail(&format!("tmux refused to build the session layout: {e}"));
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
                wait_exit_file(&dir);
                return fail(msg.trim_end());
            }
        }
        if let Some(sig) = signals::held() {
            // The customer gave up while we were connecting: let the daemon end orderly first.
            if let Some(pid) = daemon_pid(&dir.path) {
                signals::send(pid, sig);
                wait_exit_file(&dir);
            }
            end_tmux(&sock);
            return INTERRUPTED;
        }
        let server_gone = !attach && !sock.exists();
        if server_gone || Instant::now() >= deadline {
            return fail("the session daemon did not start; see debug.log in the session directory");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    if let Some(pid) = daemon_pid(&dir.path) {
        signals::forward_to(pid);
    }
    let ended = if attach {
        // Our panes are a window of the customer's session: they are already looking at it. This
        // pane waits for the daemon's end and then reports, as the dedicated mode does.
        say("session running in the tmux window 'linbit-tunl'; Ctrl-b Q there ends it");
        wait_exit_file_forever(&dir)
    } else {
        attach_while_daemon_lives(&sock, &dir)
    };
    let (status, rec) = match ended {
        Some(x) => x,
        None => {
            // The daemon vanished without its orderly end: no support key and no path from the relay
            // to this host may outlive it. Its blocks go here; `keys_gone` below proves every key
            // it wrote gone, or says which lines are left.
            let sid = cfg.session_id.clone();
            let _ = authkeys::edit(&cfg.authkeys_file, |old| authkeys::remove_blocks(old, Some(&sid)));
            close_master(&dir);
            end_tmux(&sock);
            say("the session daemon ended without cleaning up; removing support keys");
            (1, String::new())
        }
    };
    let status = if keys_gone(&dir, &cfg.session_id) { status } else { 1 };
    if attach {
        end_tmux(&sock);
    }
    finish(&dir, status, true, cfg.debug, Some(&rec))
}

/// tmux's complaint as one plain line: its lines joined with "; ", control characters shown as
/// text (never a literal `^J` for the newline that ends it).
fn tmux_failure_text(stderr: &[u8]) -> String {
    let text = String::from_utf8_lossy(stderr);
    let lines: Vec<String> =
        text.lines().map(|l| crate::text::neutralize(l.trim().as_bytes(), 300)).filter(|l| !l.is_empty()).collect();
    if lines.is_empty() { "no reason given".to_string() } else { lines.join("; ") }
}

/// The daemon's `failed REASON` from the state file, waiting up to `limit` for it.
fn wait_daemon_failure(dir: &SessionDir, limit: Duration) -> Option<String> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(msg) = std::fs::read_to_string(dir.file("state"))
            .ok()
            .and_then(|s| s.strip_prefix("failed ").map(|m| m.trim_end().to_string()))
        {
            return Some(msg);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Wait (at most 3 s) until nothing answers on the server socket any more, then remove it.
fn wait_server_gone(sock: &Path) {
    let deadline = Instant::now() + Duration::from_secs(3);
    while std::os::unix::net::UnixStream::connect(sock).is_ok() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = std::fs::remove_file(sock);
}

/// The customer's terminal in the session until the server ends; meanwhile the daemon is watched, so
/// that a daemon killed outright (SIGKILL, the OOM killer, a watchdog) is noticed within a second and
/// not only when the customer leaves tmux (F19). None: the daemon died without its `exit` file.
fn attach_while_daemon_lives(sock: &Path, dir: &SessionDir) -> Option<(u8, String)> {
    // The customer's terminal, for as long as the session lasts: the one tmux call without a deadline.
    let attach = tmux_at(sock).args(["attach-session", "-t", ui::SESSION]).stdin(Stdio::inherit()).spawn();
    let Ok(mut attach) = attach else { return wait_exit_file(dir) };
    let pid = daemon_pid(&dir.path);
    loop {
        if matches!(attach.try_wait(), Ok(Some(_)) | Err(_)) {
            return wait_exit_file(dir);
        }
        let alive = pid.is_some_and(process_alive);
        if !alive && !dir.file("exit").exists() {
            // Give an orderly end that is just writing its exit file a moment, then take over.
            if let Some(x) = wait_exit_file_for(dir, Duration::from_millis(500)) {
                kill_server(sock);
                let _ = attach.wait();
                return Some(x);
            }
            kill_server(sock);
            let _ = attach.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A killed daemon stays in /proc as a zombie until its parent reaps it, which a busy or stopped
/// parent may not do at once: only a process that is still running counts.
fn process_alive(pid: i32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return false };
    // The state is the first field after the command name, which is in parentheses and may itself
    // contain spaces or parentheses.
    let state = stat.rfind(')').and_then(|i| stat[i + 1..].split_whitespace().next());
    !matches!(state, None | Some("Z") | Some("X") | Some("x"))
}

fn kill_server(sock: &Path) {
    tmux_do(sock, &["kill-server"]);
}

/// Close the ssh master of a daemon that is gone: through its control socket, and by the pid it
/// recorded, checked to be that master (its command line names this session's directory).
fn close_master(dir: &SessionDir) {
    let _ = crate::proc::run_with_timeout(&mut ssh::exit_command(&dir.path), Duration::from_secs(2));
    let Some(pid) = std::fs::read_to_string(dir.file("ssh.pid")).ok().and_then(|s| s.trim().parse::<i32>().ok()) else {
        return;
    };
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let ours = String::from_utf8_lossy(&cmdline).contains(&*dir.path.to_string_lossy());
    if ours {
        if let Some(p) = rustix::process::Pid::from_raw(pid) {
            let _ = rustix::process::kill_process(p, rustix::process::Signal::KILL);
        }
    }
}

/// With `--attach` our bindings go into the customer's server; remember theirs for the keys we take,
/// so the end of the session gives them back. The file is written in this tmux's own syntax: what
/// its `list-keys` printed, and `unbind-key` with only the flags it knows (`-q` is 3.2's, `-T` 2.1's).
fn save_bindings(sock: &Path, dir: &SessionDir, f: &tmux::Features) -> Result<(), String> {
    let listing = tmux_query(sock, &["list-keys"]).unwrap_or_default();
    let restore = restore_file(&listing, f);
    sessiondir::write_private(&dir.file("keys.restore"), restore.as_bytes(), 0o600)
}

/// The restore file for `list-keys` output `listing` (see `save_bindings`).
pub fn restore_file(listing: &str, f: &tmux::Features) -> String {
    use tmux::Feat;
    let q = if f.has(Feat::UnbindQuiet) { "-q " } else { "" };
    let mut restore = String::from("# linbit-tunl: the customer's bindings for the keys the session took\n");
    for (table, key) in ui::BOUND_KEYS {
        let key = tmux::quote(key);
        restore.push_str(&match *table {
            _ if f.has(Feat::KeyTables) => format!("unbind-key {q}-T {table} {key}\n"),
            "root" => format!("unbind-key -n {key}\n"),
            _ => format!("unbind-key {key}\n"),
        });
    }
    if f.has(Feat::KeyTables) {
        restore.push_str(&format!("unbind-key {q}-a -T linbit-menu\n"));
    }
    for line in listing.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        // `bind-key [-r] -T TABLE KEY COMMAND...`; before 2.1 `bind-key [-nr] KEY COMMAND...`.
        let (table, key) = if let Some(t) = words.iter().position(|w| *w == "-T") {
            match (words.get(t + 1), words.get(t + 2)) {
                (Some(table), Some(key)) => (*table, *key),
                _ => continue,
            }
        } else {
            let Some(k) = words.iter().skip(1).position(|w| !w.starts_with('-')).map(|i| i + 1) else { continue };
            (if words[1..k].contains(&"-n") { "root" } else { "prefix" }, words[k])
        };
        if ui::BOUND_KEYS.iter().any(|(bt, bk)| *bt == table && key.trim_matches('\\') == *bk) {
            restore.push_str(line);
            restore.push('\n');
        }
    }
    restore
}

/// Give the customer's server back its bindings: the restore file at once, or, where this tmux
/// refuses a line of it (a parser error rejects the whole file on 3.x), line by line.
fn restore_bindings(sock: &Path, dir: &SessionDir) {
    let file = dir.file("keys.restore");
    if tmux_do(sock, &["source-file", &file.to_string_lossy()]) {
        return;
    }
    let Ok(text) = std::fs::read_to_string(&file) else { return };
    let one = dir.file("keys.restore.line");
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        if sessiondir::write_private(&one, format!("{line}\n").as_bytes(), 0o600).is_ok() {
            tmux_do(sock, &["source-file", &one.to_string_lossy()]);
        }
        let _ = std::fs::remove_file(&one);
    }
}

/// `--attach`: the session may run for hours; wait for the daemon's exit file for as long as it
/// lives, and give up only when its process is gone.
fn wait_exit_file_forever(dir: &SessionDir) -> Option<(u8, String)> {
    let pid = daemon_pid(&dir.path);
    loop {
        if let Some(x) = wait_exit_file(dir) {
            return Some(x);
        }
        let alive = pid.is_some_and(|p| Path::new(&format!("/proc/{p}")).exists());
        if !alive {
            return None;
        }
    }
}

/// The daemon's exit file: status and recording path.
fn wait_exit_file(dir: &SessionDir) -> Option<(u8, String)> {
    wait_exit_file_for(dir, EXIT_TIMEOUT)
}

fn wait_exit_file_for(dir: &SessionDir, limit: Duration) -> Option<(u8, String)> {
    let deadline = Instant::now() + limit;
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
    // Nobody sees the hidden pane: everything the daemon writes to stderr (a panic too) goes to
    // debug.log, the manual's "stderr tee".
    if let Ok(f) = std::fs::OpenOptions::new().append(true).create(true).mode(0o600).open(dir.file("debug.log")) {
        let _ = rustix::stdio::dup2_stderr(&f);
    }
    let text = match std::fs::read_to_string(dir.file("daemon.conf")) {
        Ok(t) => t,
        Err(e) => {
            say(&format!("cannot read daemon.conf: {e}"));
            return 1;
        }
    };
    // The launcher's own lines come after the configuration proper.
    let extra = |key: &str| text.lines().find_map(|l| l.strip_prefix(key)).and_then(crate::cli::pct_decode);
    let auth_path = extra("auth=").as_deref().and_then(auth_from_name);
    let session = extra("tmux_session=").unwrap_or_else(|| ui::SESSION.to_string());
    let conf: String = text
        .lines()
        .filter(|l| !["auth=", "tmux_session=", "prefix_checked=", "tmux_size="].iter().any(|k| l.starts_with(k)))
        .map(|l| format!("{l}\n"))
        .collect();
    let (mut cfg, auth_path) = match (Config::from_conf(&conf), auth_path) {
        (Ok(c), Some(a)) => (c, a),
        _ => {
            say("daemon.conf is damaged");
            return 1;
        }
    };
    if let Some(p) = extra("prefix_checked=") {
        cfg.prefix = p;
    }
    let _ = sessiondir::publish(&dir.file("daemon.pid"), &format!("{}\n", std::process::id()));
    let features = tmux::Features::installed();
    let sock = tmux_sock(&cfg, &dir);
    let attach = cfg.tmux_socket.is_some();
    let mut d = match Daemon::new(cfg, dir, auth_path, false) {
        Ok(d) => d,
        Err(e) => {
            say(&e);
            return 1;
        }
    };
    let size = extra("tmux_size=").and_then(|s| {
        let (w, h) = s.split_once('x')?;
        Some((w.parse().ok()?, h.parse().ok()?))
    });
    let first = ui::control_client_commands(&features, size, attach);
    if let Err(e) = d.open_fifos().and_then(|_| d.attach_tmux(&sock, &session, features, &first)) {
        say(&e);
        return 1;
    }
    let (end, _) = d.run_to_end();
    // The session is over: the customer's terminal returns to the launcher. With --attach the
    // launcher gives the customer's server back its bindings and closes our window.
    if !attach {
        tmux_do(&sock, &["kill-server"]);
    }
    end.status()
}

use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};

#[cfg(test)]
mod tests {
    #[test]
    fn tmux_failures_are_one_plain_line() {
        assert_eq!(super::tmux_failure_text(b"server exited unexpectedly\n"), "server exited unexpectedly");
        assert_eq!(super::tmux_failure_text(b"a\nb\r\n\n"), "a; b");
        assert_eq!(super::tmux_failure_text(b"x\x1b[2Jy\n"), "x^[[2Jy");
        assert_eq!(super::tmux_failure_text(b""), "no reason given");
    }

    #[test]
    fn a_zombie_is_not_alive() {
        let mut child = std::process::Command::new("sleep").arg("30").spawn().unwrap();
        let pid = child.id() as i32;
        assert!(super::process_alive(pid));
        child.kill().unwrap();
        // Killed but not reaped yet: a zombie, which /proc still lists.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while super::process_alive(pid) && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert!(std::path::Path::new(&format!("/proc/{pid}")).exists(), "reaped too early for this test");
        assert!(!super::process_alive(pid));
        child.wait().unwrap();
        assert!(!super::process_alive(pid));
    }
}
