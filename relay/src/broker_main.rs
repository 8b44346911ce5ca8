//! `tunl-relay broker --root DIR SID`: sets up one session's broker from the registry and the
//! relay's configuration, and writes what the broker learns back to the registry.

use std::path::PathBuf;
use std::time::Duration;

use crate::broker::{Broker, BrokerConfig, SessionSink};
use crate::hello::Hello;
use crate::layout::{Config, Layout};
use crate::registry::{Registry, Sqlite, State, Update};

/// With no customer and no viewer for this long the broker exits; the session stays, and the
/// customer's next connection starts a broker again.
const LINGER: Duration = Duration::from_secs(30 * 60);

/// Each write opens the registry, runs one transaction and closes it, as every relay process
/// does: the broker lives for hours, the database may be replaced or locked meanwhile.
struct RegistrySink {
    db: PathBuf,
    sid: String,
}

impl RegistrySink {
    fn with(&self, what: &str, f: impl FnOnce(&Sqlite) -> crate::registry::Result<()>) {
        if let Err(e) = Sqlite::open(&self.db).and_then(|r| f(&r)) {
            crate::log::warn("registry-failed", &[("id", &self.sid), ("what", what), ("error", &e.to_string())]);
        }
    }
    fn update(&self, change: Update) {
        self.with("update", |r| r.update(&self.sid, &change, crate::now()).map(|_| ()));
    }
}

impl SessionSink for RegistrySink {
    fn connected(&mut self, h: &Hello, state: &str, how: &str) {
        let detail = format!("mode={} host={}", h.mode.as_str(), h.host);
        self.with("connected", |r| {
            if let Some(s) = State::parse(state) {
                r.update(&self.sid, &Update::State(s), crate::now())?;
            }
            r.record(&self.sid, "customer", how, &detail, crate::now())
        });
    }
    fn refused(&mut self, h: &Hello, code: &str) {
        let detail = format!("{code}: a second customer, host={} user={}", h.host, h.user);
        self.with("refused", |r| r.record(&self.sid, "customer", "refused", &detail, crate::now()));
    }
    fn state(&mut self, state: &str) {
        if let Some(s) = State::parse(state) {
            self.update(Update::State(s));
        }
    }
    fn viewers(&mut self, names: &[String]) {
        self.update(Update::Viewers(names.len() as u32));
    }
    fn tunnel_port(&mut self, port: Option<u16>) {
        self.update(Update::TunnelPort(port));
    }
    fn ended(&mut self, word: &str, why: &str) {
        self.with("end", |r| {
            r.end(&self.sid, word, crate::now())?;
            r.record(&self.sid, "relay", "ended", why, crate::now())
        });
    }
    fn alive(&mut self, connected: bool) -> bool {
        let reg = match Sqlite::open(&self.db) {
            Ok(r) => r,
            Err(e) => {
                crate::log::warn("registry-failed", &[("id", &self.sid), ("what", "open"), ("error", &e.to_string())]);
                return true; // a registry hiccup must not end a customer's session
            }
        };
        if connected && let Err(e) = reg.update(&self.sid, &Update::Seen, crate::now()) {
            crate::log::warn("registry-failed", &[("id", &self.sid), ("what", "seen"), ("error", &e.to_string())]);
        }
        !matches!(reg.get(&self.sid), Ok(Some(s)) if s.state == State::Ended)
    }
}

pub fn run(layout: &Layout, sid: &str) -> Result<(), String> {
    let b = open(layout, sid).map_err(|e| e.to_string())?;
    b.run().map_err(|e| e.to_string())
}

/// The session's broker, its sockets bound and its lock taken; `ErrorKind::AddrInUse` when another
/// process serves the session already.
pub fn open(layout: &Layout, sid: &str) -> std::io::Result<Broker> {
    let fail = |m: String| std::io::Error::other(m);
    if !crate::hello::valid_session_id(sid) {
        return Err(fail("SID is not a session ID (four lowercase words joined by hyphens)".into()));
    }
    let cfg = Config::load(layout).map_err(|e| fail(e.to_string()))?;
    let db = layout.registry_db();
    // The connection is closed before the broker runs: an idle session holds no SQLite cache.
    let s = Sqlite::open(&db)
        .and_then(|r| r.get(sid))
        .map_err(|e| fail(e.to_string()))?
        .ok_or_else(|| fail(format!("no session {sid} in the registry")))?;
    if s.state == State::Ended {
        return Err(fail(format!("session {sid} has ended")));
    }
    let bc = BrokerConfig {
        sid: sid.to_string(),
        run_dir: layout.session_run(sid),
        recording: layout.recordings().join(format!("{sid}.cast")),
        audit: layout.audit().join(format!("{sid}.jsonl")),
        support_gid: crate::identity::group_id(&cfg.support_group),
        restricted_only: s.restricted,
        case: s.case.clone(),
        customer: s.customer.clone(),
        linger: LINGER,
    };
    let sink = RegistrySink { db, sid: sid.to_string() };
    Broker::bind(bc, Box::new(sink))
}
