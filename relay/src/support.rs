//! `tunl-relay support`: the support accounts' ForceCommand. Runs as the engineer's own account;
//! reads one `tunl-support/1` command from `SSH_ORIGINAL_COMMAND`, answers it from the registry or
//! through the session's broker (`support.sock`), and ends with `OK` or `ERR code=CODE msg=PCT`.
//! `join` turns into a copy between the ssh channel and the broker (the join stream).

use std::io::{self, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use serde_json::json;
use tunl_wire::{self as wire, Piece, Splitter};

use crate::broker::support_sock;
use crate::layout::Layout;
use crate::registry::{NewSession, Registry, Session, Sqlite, Standing};
use crate::support_cmd::{self, SupportCmd};

/// Ended sessions stay in `list` for a day.
const LIST_ENDED_FOR: i64 = 24 * 3600;
/// `upgrade` waits this long for the customer's answer (the broker gives up at 300 s).
const UPGRADE_WAIT: Duration = Duration::from_secs(310);
const COMMAND_WAIT: Duration = Duration::from_secs(15);
const CHATLOG_LINES: usize = 50;

/// A failed command: `ERR code=CODE msg=PCT`.
struct Fail(&'static str, String);

fn fail<T>(code: &'static str, msg: impl Into<String>) -> Result<T, Fail> {
    Err(Fail(code, msg.into()))
}

struct Out(io::StdoutLock<'static>);

impl Out {
    fn line(&mut self, l: &str) -> Result<(), Fail> {
        writeln!(self.0, "{l}").and_then(|()| self.0.flush()).or_else(|_| fail("internal", "stdout closed"))
    }
}

pub fn support(layout: &Layout) -> u8 {
    let mut out = Out(io::stdout().lock());
    let raw = std::env::var("SSH_ORIGINAL_COMMAND").unwrap_or_default();
    let me = crate::identity::user_name(rustix::process::getuid().as_raw());
    let result = support_cmd::parse(&raw).or_else(|e| fail("proto", e)).and_then(|cmd| run(layout, &me, cmd, &mut out));
    match result {
        Ok(()) => 0,
        Err(Fail(code, msg)) => {
            eprintln!("tunl-relay support: {me}: {code}: {}", wire::neutralize(&msg));
            let _ = out.line(&format!("ERR code={code} msg={}", wire::pct_encode(&msg)));
            1
        }
    }
}

fn open(layout: &Layout) -> Result<Sqlite, Fail> {
    Sqlite::open(&layout.registry_db()).or_else(|e| fail("internal", e.to_string()))
}

fn session(reg: &Sqlite, id: &str) -> Result<Session, Fail> {
    match reg.get(id) {
        Ok(Some(s)) => Ok(s),
        Ok(None) => fail("unknown-session", format!("no session {id}")),
        Err(e) => fail("internal", e.to_string()),
    }
}

/// The session must be live (a customer connected, or reconnecting).
fn live(reg: &Sqlite, id: &str) -> Result<Session, Fail> {
    let s = session(reg, id)?;
    match s.standing(crate::now()) {
        Standing::Live => Ok(s),
        Standing::Pending => fail("not-live", "the customer has not connected yet"),
        Standing::Expired => fail("expired", "the session has expired"),
        Standing::Closed => fail("closed", "the session has been closed"),
    }
}

fn item(s: &Session) -> String {
    format!(
        "ITEM id={} state={} host={} user={} case={} customer={} viewers={} created={} expires={} port={}",
        s.id,
        s.state.as_str(),
        wire::pct_encode(&s.host),
        wire::pct_encode(&s.user),
        wire::pct_encode(&s.case),
        wire::pct_encode(&s.customer),
        s.viewers,
        s.created.max(0),
        s.expires.max(0),
        s.tunnel_port.map_or("-".to_string(), |p| p.to_string()),
    )
}

fn broker(layout: &Layout, id: &str) -> Result<UnixStream, Fail> {
    UnixStream::connect(support_sock(&layout.session_run(id)))
        .or_else(|_| fail("not-live", "the customer is not connected (the session's broker is not running)"))
}

/// One line through the broker's command role; the broker's answer lines are translated to the
/// command's (`TUNNEL`, `REJECTED`), its `OK`/`ERR` ends it.
fn via_broker(layout: &Layout, id: &str, line: &str, wait: Duration, out: &mut Out) -> Result<(), Fail> {
    let sock = broker(layout, id)?;
    (&sock)
        .write_all(format!("HELLO role=command\n{line}\n").as_bytes())
        .or_else(|_| fail("not-live", "the session's broker went away"))?;
    answers(&sock, wait, |l| {
        let verb = l.split(' ').next().unwrap_or("");
        let p = wire::parse(l.as_bytes(), |_| false).ok();
        let get = |k: &str| p.as_ref().and_then(|p| p.get(k)).unwrap_or("").to_string();
        match verb {
            "OK" => Some(Ok(out.line("OK"))),
            "ERR" => {
                let code = match get("code").as_str() {
                    "denied" => "denied",
                    "proto" => "proto",
                    _ => "internal",
                };
                Some(Err(Fail(code, p.as_ref().and_then(|p| p.text("msg")).unwrap_or_default())))
            }
            "TUNNEL_OPEN" => out.line(&format!("TUNNEL port={} user={}", get("port"), get("user"))).err().map(Err),
            "TUNNEL_REJECTED" => out.line(&format!("REJECTED reason={}", get("reason"))).err().map(Err),
            _ => None,
        }
    })
}

/// Reads the broker's lines until `f` decides (or the deadline, or the end of the socket).
fn answers(
    sock: &UnixStream,
    wait: Duration,
    mut f: impl FnMut(&str) -> Option<Result<Result<(), Fail>, Fail>>,
) -> Result<(), Fail> {
    let deadline = Instant::now() + wait;
    let mut split = Splitter::default();
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return fail("timeout", "no answer in time");
        }
        let _ = sock.set_read_timeout(Some(left));
        let n = match rustix::io::read(sock, &mut buf) {
            Ok(0) => return fail("internal", "the session's broker closed the connection without an answer"),
            Ok(n) => n,
            Err(rustix::io::Errno::INTR) => continue,
            Err(rustix::io::Errno::AGAIN) => return fail("timeout", "no answer in time"),
            Err(e) => return fail("internal", e.to_string()),
        };
        for piece in split.push(&buf[..n]) {
            if let Piece::Line(l) = piece
                && let Ok(l) = std::str::from_utf8(&l)
                && let Some(r) = f(l)
            {
                return r?;
            }
        }
    }
}

fn run(layout: &Layout, me: &str, cmd: SupportCmd, out: &mut Out) -> Result<(), Fail> {
    let reg = open(layout)?;
    let now = crate::now();
    match cmd {
        SupportCmd::Create { case, customer, expires_min, restricted } => {
            let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default().trim().to_string();
            let new = NewSession {
                case,
                customer,
                created_by: me.to_string(),
                expires_minutes: expires_min,
                restricted,
                relay_host: host,
            };
            let (s, token) = reg.create(&new, now).or_else(|e| fail("internal", e.to_string()))?;
            out.line(&format!("SESSION id={} token={token} expires={}", s.id, s.expires.max(0)))?;
            out.line("OK")
        }
        SupportCmd::List => {
            let all = reg.list(now - LIST_ENDED_FOR).or_else(|e| fail("internal", e.to_string()))?;
            for s in &all {
                out.line(&item(s))?;
            }
            out.line("OK")
        }
        SupportCmd::Show { id } => {
            let s = session(&reg, &id)?;
            out.line(&item(&s))?;
            let audit = crate::audit::read_lines(&layout.audit().join(format!("{id}.jsonl"))).unwrap_or_default();
            for (at, from, text) in crate::audit::chat_log(&audit, CHATLOG_LINES) {
                out.line(&format!("CHATLOG at={at} from={} {}", wire::pct_encode(&from), wire::b64(text.as_bytes())))?;
            }
            if s.standing(now) == Standing::Live
                && let Ok(sock) = broker(layout, &id)
                && (&sock).write_all(b"HELLO role=who\n").is_ok()
            {
                // Names come from the broker, which knows them from SO_PEERCRED.
                let _ = answers(&sock, COMMAND_WAIT, |l| {
                    if l == "OK" {
                        return Some(Ok(Ok(())));
                    }
                    if let Ok(p) = wire::parse(l.as_bytes(), |_| false)
                        && p.verb == "VIEWER"
                        && let (Some(n), Some(ro)) = (p.get("name"), p.get("ro"))
                    {
                        return out.line(&format!("VIEWER name={n} ro={ro}")).err().map(Err);
                    }
                    None
                });
            }
            out.line("OK")
        }
        SupportCmd::Close { id, reason } => {
            let s = session(&reg, &id)?;
            match s.standing(now) {
                Standing::Expired => fail("expired", "the session has expired"),
                Standing::Closed => fail("closed", "the session has already been closed"),
                Standing::Live if broker(layout, &id).is_ok() => {
                    via_broker(layout, &id, &format!("CLOSE reason={}", wire::pct_encode(&reason)), COMMAND_WAIT, out)
                }
                Standing::Live | Standing::Pending => {
                    reg.end(&id, "closed", now).or_else(|e| fail("internal", e.to_string()))?;
                    let _ = reg.record(&id, me, "closed", &reason, now);
                    out.line("OK")
                }
            }
        }
        SupportCmd::Cancel { id } => {
            let s = session(&reg, &id)?;
            match s.standing(now) {
                Standing::Pending => {
                    reg.end(&id, "cancelled", now).or_else(|e| fail("internal", e.to_string()))?;
                    let _ = reg.record(&id, me, "cancelled", "", now);
                    out.line("OK")
                }
                Standing::Live => fail("live", "the customer is connected; use close"),
                Standing::Expired => fail("expired", "the session has expired"),
                Standing::Closed => fail("closed", "the session has already been closed"),
            }
        }
        SupportCmd::Chat { id, text } => {
            live(&reg, &id)?;
            via_broker(layout, &id, &format!("CHAT {}", wire::b64(&text)), COMMAND_WAIT, out)
        }
        SupportCmd::Note { id, text } => {
            live(&reg, &id)?;
            let l = if text.is_empty() { "NOTE".to_string() } else { format!("NOTE {}", wire::b64(&text)) };
            via_broker(layout, &id, &l, COMMAND_WAIT, out)
        }
        SupportCmd::Upgrade { id, keys } => {
            live(&reg, &id)?;
            via_broker(layout, &id, &format!("UPGRADE req=c1 {}", wire::b64(&keys)), UPGRADE_WAIT, out)
        }
        SupportCmd::Revoke { id } => {
            live(&reg, &id)?;
            via_broker(layout, &id, "REVOKE", COMMAND_WAIT, out)
        }
        SupportCmd::Expect { id, timeout } => {
            drop(reg);
            let deadline = Instant::now() + Duration::from_secs(timeout);
            loop {
                let reg = open(layout)?;
                let s = session(&reg, &id)?;
                match s.standing(crate::now()) {
                    Standing::Live => return out.line("OK"),
                    Standing::Expired => return fail("expired", "the session expired before the customer connected"),
                    Standing::Closed => return fail("closed", "the session was closed"),
                    Standing::Pending => {}
                }
                drop(reg);
                if Instant::now() >= deadline {
                    return fail("timeout", "the customer has not connected yet");
                }
                std::thread::sleep(Duration::from_millis(250));
            }
        }
        SupportCmd::Log { id } => {
            session(&reg, &id)?;
            for e in reg.events(&id).or_else(|e| fail("internal", e.to_string()))? {
                let rec = json!({"t": e.at, "ev": e.what, "who": e.actor, "detail": e.detail, "source": "registry"});
                out.line(&format!("AUDIT {}", wire::b64(rec.to_string().as_bytes())))?;
            }
            let lines = crate::audit::read_lines(&layout.audit().join(format!("{id}.jsonl")))
                .or_else(|e| fail("internal", format!("the audit log: {e}")))?;
            for l in lines {
                out.line(&format!("AUDIT {}", wire::b64(l.as_bytes())))?;
            }
            out.line("OK")
        }
        SupportCmd::Join { id, ro } => {
            live(&reg, &id)?;
            drop(reg);
            let sock = broker(layout, &id)?;
            (&sock)
                .write_all(format!("HELLO role=join ro={}\n", u8::from(ro)).as_bytes())
                .or_else(|_| fail("not-live", "the session's broker went away"))?;
            crate::splice::splice(&sock).or_else(|e| fail("internal", e.to_string()))?;
            Ok(())
        }
    }
}
