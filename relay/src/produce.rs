//! `tunl-relay produce`: the customer's ForceCommand. Reads the hello from
//! `SSH_ORIGINAL_COMMAND`, checks it strictly and against the registry, then becomes the session's
//! broker with the ssh channel as its customer (one process per session), or, when a broker
//! already serves the session (a reconnect while it lingers, a second customer), copies lines
//! between the channel and it. The broker answers `WELCOME` (or `busy`), since only it knows
//! whether a customer is connected.

use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use tunl_wire as wire;

use crate::broker::{Broker, customer_sock};
use crate::conn::Conn;
use crate::hello;
use crate::layout::Layout;
use crate::registry::{self, Admission, Registry, Sqlite};

/// How long `produce` waits for a broker that another `produce` is starting to listen.
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
    if let Some((refusal, answer)) = login_mismatch(layout, &h.id) {
        log(&refusal);
        return answer_error("unknown-session", answer);
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
    let sock = match connect_or_become(layout, &h.id) {
        Ok(Peer::Broker(b)) => return serve_as_broker(layout, &h.id, *b, &cmd),
        Ok(Peer::Socket(s)) => s,
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

/// A login opens only the session it was for: a relay certificate's key ID names it (sshd reports
/// the certificate through `ExposeAuthInfo`), a keyboard-interactive answer's session is recorded by
/// `pam-ki` (`kibind`). `None` when the login may go on; else the log line and the answer.
fn login_mismatch(layout: &Layout, sid: &str) -> Option<(String, &'static str)> {
    use crate::authinfo::Auth;
    let path = std::env::var_os("SSH_USER_AUTH")?;
    let text = std::fs::read_to_string(&path).ok()?;
    let cert = "this certificate was issued for another session";
    let ki = "this login answered for another session";
    match crate::authinfo::parse(&text) {
        Auth::Certificate { session } if session == sid => None,
        Auth::Certificate { session } => {
            Some((format!("a certificate for session {session} asked for session {sid}: refused"), cert))
        }
        Auth::ForeignCertificate => {
            Some((format!("session {sid}: a certificate the relay did not issue: refused"), cert))
        }
        Auth::KeyboardInteractive => {
            match crate::kibind::connection_of_session().and_then(|c| crate::kibind::lookup(layout, &c)) {
                Some(s) if s == sid => None,
                Some(s) => {
                    Some((format!("a keyboard-interactive login for session {s} asked for session {sid}: refused"), ki))
                }
                None => Some((
                    format!("session {sid}: a keyboard-interactive login with no record of its session: refused"),
                    ki,
                )),
            }
        }
        Auth::Other => None,
    }
}

enum Peer {
    /// No broker served the session: this process is it now.
    Broker(Box<Broker>),
    /// The session's broker (a reconnect while it lingers, a second customer): lines are copied.
    Socket(UnixStream),
}

/// Connects to the session's broker, or becomes it when none listens.
fn connect_or_become(layout: &Layout, sid: &str) -> io::Result<Peer> {
    let path = customer_sock(&layout.session_run(sid));
    let deadline = Instant::now() + BROKER_START;
    loop {
        if let Ok(s) = UnixStream::connect(&path) {
            return Ok(Peer::Socket(s));
        }
        match crate::broker_main::open(layout, sid) {
            Ok(b) => return Ok(Peer::Broker(Box::new(b))),
            // Another produce took the lock first and is binding its sockets: connect to it.
            Err(e) if e.kind() == io::ErrorKind::AddrInUse && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => return Err(e),
        }
    }
}

/// The session's broker in this process, with the ssh channel as its customer. Its stdin and
/// stdout move to descriptors of the broker's own (0 and 1 become /dev/null), and stderr, which
/// sshd would forward to the customer and waits on before closing the channel, goes to journald
/// (or `STATE/audit/SID.log` without systemd).
fn serve_as_broker(layout: &Layout, sid: &str, mut b: Broker, hello: &str) -> u8 {
    let channel = (|| -> io::Result<Conn> {
        let rd = rustix::io::fcntl_dupfd_cloexec(io::stdin(), 3)?;
        let wr = rustix::io::fcntl_dupfd_cloexec(io::stdout(), 3)?;
        let null = std::fs::OpenOptions::new().read(true).write(true).open("/dev/null")?;
        // Operational events: journald's stream on a systemd host, as for the relay's services;
        // else (a test root, no systemd) the session's own file.
        let journal = if layout.root == std::path::Path::new("/") { crate::log::journal_stream() } else { None };
        let log: std::os::fd::OwnedFd = match journal {
            Some(j) => j.into(),
            None => {
                let log_path = layout.audit().join(format!("{sid}.log"));
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&log_path)
                    .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", log_path.display())))?
                    .into()
            }
        };
        for (from, to) in [(null.as_raw_fd(), 0), (null.as_raw_fd(), 1), (log.as_raw_fd(), 2)] {
            // SAFETY: dup2 onto the standard descriptors, which nothing else in this process holds.
            if unsafe { libc::dup2(from, to) } < 0 {
                return Err(io::Error::last_os_error());
            }
        }
        Conn::pipes(rd, wr)
    })();
    let conn = match channel {
        Ok(c) => c,
        Err(e) => {
            log(&format!("session {sid}: broker: {e}"));
            return answer_error("internal", "the relay could not start the session; try again later");
        }
    };
    b.adopt_customer(conn, hello.as_bytes());
    match b.run() {
        Ok(()) => 0,
        Err(e) => {
            log(&format!("session {sid}: broker: {e}"));
            1
        }
    }
}
