//! `tunl-relay produce`: the customer's ForceCommand. Reads the hello from
//! `SSH_ORIGINAL_COMMAND`, checks it strictly and against the registry, makes sure the session's
//! broker runs, and from then on copies lines between the ssh channel and the broker. The broker
//! answers `WELCOME` (or `busy`), since only it knows whether a customer is connected.

use std::io::{self, Write};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tunl_wire as wire;

use crate::broker::customer_sock;
use crate::hello;
use crate::layout::Layout;
use crate::registry::{self, Admission, Registry, Sqlite};

/// How long `produce` waits for a broker it started to listen.
const BROKER_START: Duration = Duration::from_secs(10);
/// How long it waits for the broker's answer to the hello.
const ANSWER_WAIT: Duration = Duration::from_secs(15);

fn answer_error(code: &str, msg: &str) -> u8 {
    let mut out = io::stdout().lock();
    let _ = writeln!(out, "ERROR code={code} msg={}", wire::pct_encode(msg));
    let _ = out.flush();
    1
}

fn log(msg: &str) {
    eprintln!("tunl-relay produce: {msg}");
}

pub fn produce(layout: &Layout) -> u8 {
    let cmd = std::env::var("SSH_ORIGINAL_COMMAND").unwrap_or_default();
    let h = match hello::parse(&cmd) {
        Ok(h) => h,
        Err(r) => return answer_error(r.code, &r.msg),
    };
    if let Some(refusal) = certificate_mismatch(&h.id) {
        log(&refusal);
        return answer_error("unknown-session", "this certificate was issued for another session");
    }
    let reg = match Sqlite::open(&layout.registry_db()) {
        Ok(r) => r,
        Err(e) => {
            log(&format!("{e}"));
            return answer_error("internal", "the relay's registry is unavailable; try again later");
        }
    };
    let rh = registry::Hello {
        mode: h.mode.as_str().into(),
        host: h.host.clone(),
        user: h.user.clone(),
        ips: h.ips.join(","),
        client: h.client.clone(),
    };
    match reg.admit(&h.id, &rh, crate::now()) {
        Ok(Admission::Admitted(_)) => {}
        Ok(Admission::Unknown) => {
            return answer_error("unknown-session", "no such session on this relay; check the session ID");
        }
        Ok(Admission::Expired) => {
            return answer_error("expired", "this session has expired; ask support for a new one");
        }
        Ok(Admission::Closed) => return answer_error("closed", "this session has been closed"),
        Ok(Admission::ModeRefused) => {
            return answer_error("mode-refused", "support opened this session restricted; run again with --restricted");
        }
        Err(e) => {
            log(&format!("{e}"));
            return answer_error("internal", "the relay's registry is unavailable; try again later");
        }
    }
    drop(reg);
    let sock = match connect_or_start(layout, &h.id) {
        Ok(s) => s,
        Err(e) => {
            log(&format!("session {}: broker: {e}", h.id));
            return answer_error("internal", "the relay could not start the session; try again later");
        }
    };
    if (&sock).write_all(format!("{cmd}\n").as_bytes()).is_err() {
        return answer_error("internal", "the relay's session ended unexpectedly; try again later");
    }
    let _ = sock.set_read_timeout(Some(ANSWER_WAIT));
    let first = match crate::splice::read_first_line(&sock, 4096) {
        Ok(l) if l.ends_with(b"\n") => l,
        _ => return answer_error("internal", "the relay's session did not answer; try again later"),
    };
    let _ = sock.set_read_timeout(None);
    {
        let mut out = io::stdout().lock();
        if out.write_all(&first).and_then(|()| out.flush()).is_err() {
            return 1;
        }
    }
    if !first.starts_with(b"WELCOME ") {
        return 1;
    }
    match crate::splice::splice(&sock) {
        Ok(_) => 0,
        Err(e) => {
            log(&format!("session {}: {e}", h.id));
            1
        }
    }
}

/// A relay certificate opens only the session it was issued for (its key ID names it); sshd
/// reports the certificate through `ExposeAuthInfo`. `None` when the login may go on.
fn certificate_mismatch(sid: &str) -> Option<String> {
    let path = std::env::var_os("SSH_USER_AUTH")?;
    let text = std::fs::read_to_string(&path).ok()?;
    match crate::authinfo::parse(&text) {
        crate::authinfo::Auth::Certificate { session } if session == sid => None,
        crate::authinfo::Auth::Certificate { session } => {
            Some(format!("a certificate for session {session} asked for session {sid}: refused"))
        }
        crate::authinfo::Auth::ForeignCertificate => {
            Some(format!("session {sid}: a certificate the relay did not issue: refused"))
        }
        crate::authinfo::Auth::Other => None,
    }
}

/// Connects to the session's broker, starting it when none listens.
fn connect_or_start(layout: &Layout, sid: &str) -> io::Result<UnixStream> {
    let path = customer_sock(&layout.session_run(sid));
    if let Ok(s) = UnixStream::connect(&path) {
        return Ok(s);
    }
    start_broker(layout, sid)?;
    let deadline = Instant::now() + BROKER_START;
    loop {
        match UnixStream::connect(&path) {
            Ok(s) => return Ok(s),
            Err(e) if Instant::now() > deadline => {
                return Err(io::Error::new(e.kind(), format!("{}: {e}", path.display())));
            }
            // Another produce may be starting it too: the broker's lock lets one win; both connect.
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// `tunl-relay broker --root ROOT SID`, detached (double fork, own session) so that it outlives
/// this connection; its stderr goes to `STATE/audit/SID.log`.
pub fn start_broker(layout: &Layout, sid: &str) -> io::Result<()> {
    let exe = std::env::current_exe()?;
    let log_path = layout.audit().join(format!("{sid}.log"));
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", log_path.display())))?;
    let mut cmd = Command::new(exe);
    cmd.arg("broker").arg("--root").arg(&layout.root).arg(sid);
    cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::from(log));
    // SAFETY: only async-signal-safe calls (fork, setsid, _exit) between fork and exec.
    unsafe {
        cmd.pre_exec(|| match libc::fork() {
            -1 => Err(io::Error::last_os_error()),
            0 => {
                libc::setsid();
                Ok(())
            }
            _ => libc::_exit(0),
        });
    }
    let mut child = cmd.spawn()?;
    child.wait()?;
    Ok(())
}
