//! The session registry: one narrow interface ([`Registry`]) over an embedded SQLite database
//! ([`Sqlite`]). Many short-lived processes share it (`produce`, `broker`, `support`, `api`,
//! `pam-ki`, `expire`): each opens it, runs a few short transactions with a busy timeout, and
//! closes it. The schema is plain SQL so that a PostgreSQL backend for several relay hosts is a
//! second implementation of the trait, not a rewrite (docs/architecture.md, "The registry").
//!
//! Times are Unix seconds, passed in by the caller so tests and the state rules are deterministic.

use std::fmt;
use std::path::Path;
use std::time::Duration;

use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};
use sha2::{Digest, Sha256};

/// The curated word list of session IDs: lowercase, 3 to 8 letters, pairwise at least two edits
/// apart and none a prefix of another, so an ID read over the phone is not mistaken for another.
const WORDS: &str = include_str!("words.txt");

/// Wrong token answers before a session's token is spent for good (its session must be created
/// again): 6 digits must not be guessable by someone who knows the session ID.
pub const MAX_TOKEN_FAILURES: i64 = 5;

/// How long a process waits for another's write transaction before giving up.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// A session's state as the registry stores it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    /// Created by support; no customer has connected yet.
    Pending,
    Share,
    Restricted,
    ShareTunnel,
    Tunnel,
    Ended,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Pending => "pending",
            State::Share => "share",
            State::Restricted => "restricted",
            State::ShareTunnel => "share+tunnel",
            State::Tunnel => "tunnel",
            State::Ended => "ended",
        }
    }
    pub fn parse(s: &str) -> Option<State> {
        Some(match s {
            "pending" => State::Pending,
            "share" => State::Share,
            "restricted" => State::Restricted,
            "share+tunnel" => State::ShareTunnel,
            "tunnel" => State::Tunnel,
            "ended" => State::Ended,
            _ => return None,
        })
    }
    /// A customer has connected and the session has not ended.
    pub fn is_live(self) -> bool {
        !matches!(self, State::Pending | State::Ended)
    }
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a session ended (`end_reason`): decides between the contract's `expired` and `closed`.
pub const REASON_EXPIRED: &str = "expired";

/// One session row.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Session {
    pub id: String,
    /// Support's case reference and the customer's name (free text, as support typed them).
    pub case: String,
    pub customer: String,
    /// The support account that created it.
    pub created_by: String,
    pub created: i64,
    /// Until when a pending session waits for its customer.
    pub expires: i64,
    /// Support created it restricted: a hello asking for share or tunnel is refused.
    pub restricted: bool,
    pub state: State,
    pub token_spent: bool,
    /// From the customer's hello (empty while pending).
    pub host: String,
    pub user: String,
    pub ips: String,
    pub client: String,
    /// The relay port of the customer's reverse forward while a tunnel is open.
    pub tunnel_port: Option<u16>,
    pub viewers: u32,
    /// Last sign of life (hello, broker activity): idle expiry counts from here.
    pub last_seen: i64,
    pub ended: Option<i64>,
    pub end_reason: String,
    /// The relay host that serves the session (several hosts behind one name pin it there).
    pub relay_host: String,
}

/// What a session means to someone who presents its ID at `now`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Standing {
    /// Pending and not yet expired.
    Pending,
    /// A customer is (or was, and may resume) connected.
    Live,
    /// Pending past its expiry, or ended by expiry.
    Expired,
    /// Ended by support, the customer or cancellation.
    Closed,
}

impl Session {
    pub fn standing(&self, now: i64) -> Standing {
        match self.state {
            State::Pending if now >= self.expires => Standing::Expired,
            State::Pending => Standing::Pending,
            State::Ended if self.end_reason == REASON_EXPIRED => Standing::Expired,
            State::Ended => Standing::Closed,
            _ => Standing::Live,
        }
    }
}

/// A new session as support asks for it.
#[derive(Clone, Debug, Default)]
pub struct NewSession {
    pub case: String,
    pub customer: String,
    pub created_by: String,
    /// Minutes the session waits for its customer.
    pub expires_minutes: u64,
    pub restricted: bool,
    pub relay_host: String,
}

/// The outcome of presenting a token for a session (the API maps it to HTTP statuses).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenVerdict {
    /// Right token, now spent.
    Accepted,
    /// Wrong token (counted; after [`MAX_TOKEN_FAILURES`] the token is spent).
    Wrong,
    /// Already spent (used, or burnt by wrong guesses).
    Spent,
    Unknown,
    Expired,
    Closed,
}

/// What a customer's hello asks of a session (see [`Registry::admit`]).
#[derive(Clone, Debug, Default)]
pub struct Hello {
    /// `share`, `restricted` or `tunnel`.
    pub mode: String,
    pub host: String,
    pub user: String,
    pub ips: String,
    pub client: String,
}

/// The registry's answer to a hello.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Admission {
    /// The session is now live in the hello's mode (or was already: a resume).
    Admitted(Box<Session>),
    Unknown,
    Expired,
    Closed,
    /// The session was created restricted and the hello asks for more.
    ModeRefused,
}

/// A change to a live session (by `produce` or the broker).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Update {
    State(State),
    /// The reverse forward's relay port, or `None` when it closed.
    TunnelPort(Option<u16>),
    Viewers(u32),
    /// A sign of life only.
    Seen,
}

/// One "who did what" record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Event {
    pub seq: i64,
    pub session: String,
    pub at: i64,
    /// `customer`, `relay`, or the engineer's account name.
    pub actor: String,
    /// A short word: `created`, `token-spent`, `connected`, `closed`, ...
    pub what: String,
    /// Free text without secrets.
    pub detail: String,
}

#[derive(Debug)]
pub struct Error(pub String);

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "registry: {}", self.0)
    }
}

impl std::error::Error for Error {}

impl From<rusqlite::Error> for Error {
    fn from(e: rusqlite::Error) -> Error {
        Error(e.to_string())
    }
}

pub type Result<T> = std::result::Result<T, Error>;

/// The registry as every relay process sees it. Implementations must make each method one atomic
/// transaction: two processes spending one token, or two customers claiming one session, see one
/// winner.
pub trait Registry {
    /// Creates a pending session with a fresh ID and token; the token in clear is returned only
    /// here (the registry keeps a salted hash).
    fn create(&self, new: &NewSession, now: i64) -> Result<(Session, String)>;
    fn get(&self, id: &str) -> Result<Option<Session>>;
    /// Sessions that are pending or live, and those ended since `ended_since`, oldest first.
    fn list(&self, ended_since: i64) -> Result<Vec<Session>>;
    /// Checks `token` for session `id` and spends it on success (signing API).
    fn spend_token(&self, id: &str, token: &str, now: i64) -> Result<TokenVerdict>;
    /// Keyboard-interactive: spends the unspent token of whichever pending or live session has it,
    /// returning that session's ID.
    fn spend_any_token(&self, token: &str, now: i64) -> Result<Option<String>>;
    /// A customer's hello: admits it to the session (pending -> the hello's mode; a live session
    /// stays in its state, the caller decides about `busy`), or says why not.
    fn admit(&self, id: &str, hello: &Hello, now: i64) -> Result<Admission>;
    /// Applies a change to a session that has not ended; false if there was none to change.
    fn update(&self, id: &str, change: &Update, now: i64) -> Result<bool>;
    /// Ends a session (`reason`: `expired`, `closed`, `cancelled`, `customer`, ...); its token is
    /// spent with it. False if it did not exist or had ended already.
    fn end(&self, id: &str, reason: &str, now: i64) -> Result<bool>;
    /// Appends a "who did what" record.
    fn record(&self, id: &str, actor: &str, what: &str, detail: &str, now: i64) -> Result<()>;
    fn events(&self, id: &str) -> Result<Vec<Event>>;
    /// Ends pending sessions past their expiry and live ones not seen for `idle_secs`; returns
    /// their IDs.
    fn expire(&self, now: i64, idle_secs: i64) -> Result<Vec<String>>;
    /// Retention: forgets sessions that ended before `before`, with their events; returns how many.
    fn purge(&self, before: i64) -> Result<usize>;
}

/// True if `s` is a session ID as the client validates it: four lowercase words joined by `-`.
pub fn is_session_id(s: &str) -> bool {
    let words: Vec<&str> = s.split('-').collect();
    words.len() == 4
        && words.iter().all(|w| !w.is_empty() && w.len() <= 32 && w.bytes().all(|b| b.is_ascii_lowercase()))
}

/// True if `s` is a token as support hands it out: exactly six ASCII digits.
pub fn is_token(s: &str) -> bool {
    s.len() == 6 && s.bytes().all(|b| b.is_ascii_digit())
}

pub fn words() -> impl Iterator<Item = &'static str> {
    WORDS.lines().filter(|l| !l.is_empty())
}

fn random_u32() -> u32 {
    let mut b = [0u8; 4];
    getrandom::getrandom(&mut b).expect("the kernel's random source");
    u32::from_le_bytes(b)
}

/// Uniform in `0..n` (rejection sampling, no modulo bias).
fn random_below(n: u32) -> u32 {
    let zone = u32::MAX - (u32::MAX % n);
    loop {
        let r = random_u32();
        if r < zone {
            return r % n;
        }
    }
}

/// A fresh four-word session ID.
pub fn new_session_id() -> String {
    let list: Vec<&str> = words().collect();
    (0..4).map(|_| list[random_below(list.len() as u32) as usize]).collect::<Vec<_>>().join("-")
}

fn new_token() -> String {
    format!("{:06}", random_below(1_000_000))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn token_hash(salt: &str, token: &str) -> String {
    let mut h = Sha256::new();
    h.update(salt.as_bytes());
    h.update(b":");
    h.update(token.as_bytes());
    hex(&h.finalize())
}

/// Compares without an early exit, so timing says nothing about how much of a hash matched.
fn same(a: &str, b: &str) -> bool {
    a.len() == b.len() && a.bytes().zip(b.bytes()).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS sessions (
    id TEXT PRIMARY KEY,
    case_ref TEXT NOT NULL,
    customer TEXT NOT NULL,
    created_by TEXT NOT NULL,
    created BIGINT NOT NULL,
    expires BIGINT NOT NULL,
    restricted INTEGER NOT NULL,
    state TEXT NOT NULL,
    token_salt TEXT NOT NULL,
    token_hash TEXT NOT NULL,
    token_spent INTEGER NOT NULL,
    token_failures INTEGER NOT NULL,
    host TEXT NOT NULL,
    user_name TEXT NOT NULL,
    ips TEXT NOT NULL,
    client TEXT NOT NULL,
    tunnel_port INTEGER,
    viewers INTEGER NOT NULL,
    last_seen BIGINT NOT NULL,
    ended BIGINT,
    end_reason TEXT NOT NULL,
    relay_host TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS sessions_state ON sessions (state);
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY,
    session TEXT NOT NULL,
    at BIGINT NOT NULL,
    actor TEXT NOT NULL,
    what TEXT NOT NULL,
    detail TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS events_session ON events (session, seq);
";

const COLUMNS: &str = "id, case_ref, customer, created_by, created, expires, restricted, state, token_spent, host, \
                       user_name, ips, client, tunnel_port, viewers, last_seen, ended, end_reason, relay_host";

fn row_to_session(r: &rusqlite::Row<'_>) -> rusqlite::Result<Session> {
    let state: String = r.get(7)?;
    let port: Option<i64> = r.get(13)?;
    let viewers: i64 = r.get(14)?;
    Ok(Session {
        id: r.get(0)?,
        case: r.get(1)?,
        customer: r.get(2)?,
        created_by: r.get(3)?,
        created: r.get(4)?,
        expires: r.get(5)?,
        restricted: r.get::<_, i64>(6)? != 0,
        // An unreadable state is treated as ended: never admit a customer on a row we do not understand.
        state: State::parse(&state).unwrap_or(State::Ended),
        token_spent: r.get::<_, i64>(8)? != 0,
        host: r.get(9)?,
        user: r.get(10)?,
        ips: r.get(11)?,
        client: r.get(12)?,
        tunnel_port: port.and_then(|p| u16::try_from(p).ok()),
        viewers: u32::try_from(viewers).unwrap_or(0),
        last_seen: r.get(15)?,
        ended: r.get(16)?,
        end_reason: r.get(17)?,
        relay_host: r.get(18)?,
    })
}

/// The SQLite backend (WAL mode, busy timeout; one connection per process).
pub struct Sqlite {
    conn: Connection,
}

impl Sqlite {
    /// Opens (creating if needed) the database at `path`. The file's mode and group are set by
    /// `init`; SQLite gives its `-wal` and `-shm` files the database file's mode.
    pub fn open(path: &Path) -> Result<Sqlite> {
        let conn = Connection::open(path).map_err(|e| Error(format!("{}: {e}", path.display())))?;
        Sqlite::setup(conn)
    }

    /// A private in-memory registry (unit tests).
    pub fn in_memory() -> Result<Sqlite> {
        Sqlite::setup(Connection::open_in_memory()?)
    }

    fn setup(conn: Connection) -> Result<Sqlite> {
        conn.busy_timeout(BUSY_TIMEOUT)?;
        // Persistent WAL: the last connection to close must not delete `-wal` and `-shm`. Else
        // whichever process opens next recreates them as its own user (an engineer's `-shm`,
        // 0660 eng:tunl-support, which the customers' account cannot open: "unable to open
        // database file" in produce and the broker). Kept, they stay as `init` made them.
        let mut persist: std::os::raw::c_int = 1;
        // SAFETY: a valid open handle; the opcode takes a pointer to an int, as given.
        let rc = unsafe {
            rusqlite::ffi::sqlite3_file_control(
                conn.handle(),
                c"main".as_ptr(),
                rusqlite::ffi::SQLITE_FCNTL_PERSIST_WAL,
                (&mut persist as *mut std::os::raw::c_int).cast(),
            )
        };
        if rc != rusqlite::ffi::SQLITE_OK && rc != rusqlite::ffi::SQLITE_NOTFOUND {
            return Err(Error(format!("persistent WAL: sqlite error {rc}")));
        }
        // WAL: readers never wait for the one writer; many short-lived processes share the file.
        let _mode: String = conn.query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))?;
        conn.execute_batch("PRAGMA synchronous=NORMAL;")?;
        conn.execute_batch(SCHEMA)?;
        Ok(Sqlite { conn })
    }

    fn write<T>(&self, f: impl FnOnce(&rusqlite::Transaction<'_>) -> Result<T>) -> Result<T> {
        // IMMEDIATE takes the write lock at BEGIN, so a read-then-write cannot lose a race and
        // the busy timeout applies at a point where waiting is safe.
        let tx = rusqlite::Transaction::new_unchecked(&self.conn, TransactionBehavior::Immediate)?;
        let out = f(&tx)?;
        tx.commit()?;
        Ok(out)
    }

    fn get_in(c: &Connection, id: &str) -> Result<Option<Session>> {
        Ok(c.query_row(&format!("SELECT {COLUMNS} FROM sessions WHERE id = ?1"), [id], row_to_session).optional()?)
    }

    fn record_in(c: &Connection, id: &str, actor: &str, what: &str, detail: &str, now: i64) -> Result<()> {
        c.execute(
            "INSERT INTO events (session, at, actor, what, detail) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![id, now, actor, what, detail],
        )?;
        Ok(())
    }

    fn end_in(c: &Connection, id: &str, reason: &str, now: i64) -> Result<bool> {
        let n = c.execute(
            "UPDATE sessions SET state = 'ended', ended = ?2, end_reason = ?3, token_spent = 1, tunnel_port = NULL, \
             viewers = 0 WHERE id = ?1 AND state <> 'ended'",
            params![id, now, reason],
        )?;
        if n > 0 {
            Sqlite::record_in(c, id, "relay", "ended", reason, now)?;
        }
        Ok(n > 0)
    }
}

impl Registry for Sqlite {
    fn create(&self, new: &NewSession, now: i64) -> Result<(Session, String)> {
        self.write(|tx| {
            let mut id = new_session_id();
            while Sqlite::get_in(tx, &id)?.is_some() {
                id = new_session_id();
            }
            // Keyboard-interactive finds a session by its token alone: no two unspent tokens alike.
            let mut live_tokens = Vec::new();
            {
                let mut st = tx.prepare("SELECT token_salt, token_hash FROM sessions WHERE token_spent = 0")?;
                let rows = st.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))?;
                for row in rows {
                    live_tokens.push(row?);
                }
            }
            let token = loop {
                let t = new_token();
                if !live_tokens.iter().any(|(salt, hash)| same(&token_hash(salt, &t), hash)) {
                    break t;
                }
            };
            let mut salt = [0u8; 16];
            getrandom::getrandom(&mut salt).map_err(|e| Error(format!("random source: {e}")))?;
            let salt = hex(&salt);
            let minutes = i64::try_from(new.expires_minutes).unwrap_or(i64::MAX / 120).min(i64::MAX / 120);
            tx.execute(
                "INSERT INTO sessions (id, case_ref, customer, created_by, created, expires, restricted, state, \
                 token_salt, token_hash, token_spent, token_failures, host, user_name, ips, client, tunnel_port, \
                 viewers, last_seen, ended, end_reason, relay_host) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, 'pending', \
                 ?8, ?9, 0, 0, '', '', '', '', NULL, 0, ?5, NULL, '', ?10)",
                params![
                    id,
                    new.case,
                    new.customer,
                    new.created_by,
                    now,
                    now.saturating_add(minutes * 60),
                    new.restricted as i64,
                    salt,
                    token_hash(&salt, &token),
                    new.relay_host,
                ],
            )?;
            Sqlite::record_in(tx, &id, &new.created_by, "created", &format!("expires in {minutes} min"), now)?;
            let s = Sqlite::get_in(tx, &id)?.ok_or_else(|| Error("created session vanished".into()))?;
            Ok((s, token))
        })
    }

    fn get(&self, id: &str) -> Result<Option<Session>> {
        Sqlite::get_in(&self.conn, id)
    }

    fn list(&self, ended_since: i64) -> Result<Vec<Session>> {
        let mut st = self.conn.prepare(&format!(
            "SELECT {COLUMNS} FROM sessions WHERE state <> 'ended' OR ended >= ?1 ORDER BY created, id"
        ))?;
        let rows = st.query_map([ended_since], row_to_session)?;
        Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
    }

    fn spend_token(&self, id: &str, token: &str, now: i64) -> Result<TokenVerdict> {
        self.write(|tx| {
            let Some(s) = Sqlite::get_in(tx, id)? else { return Ok(TokenVerdict::Unknown) };
            match s.standing(now) {
                Standing::Expired => return Ok(TokenVerdict::Expired),
                Standing::Closed => return Ok(TokenVerdict::Closed),
                Standing::Pending | Standing::Live => {}
            }
            if s.token_spent {
                return Ok(TokenVerdict::Spent);
            }
            let (salt, hash): (String, String) =
                tx.query_row("SELECT token_salt, token_hash FROM sessions WHERE id = ?1", [id], |r| {
                    Ok((r.get(0)?, r.get(1)?))
                })?;
            if is_token(token) && same(&token_hash(&salt, token), &hash) {
                tx.execute("UPDATE sessions SET token_spent = 1 WHERE id = ?1", [id])?;
                Sqlite::record_in(tx, id, "customer", "token-spent", "", now)?;
                return Ok(TokenVerdict::Accepted);
            }
            tx.execute(
                "UPDATE sessions SET token_failures = token_failures + 1, \
                 token_spent = CASE WHEN token_failures + 1 >= ?2 THEN 1 ELSE token_spent END WHERE id = ?1",
                params![id, MAX_TOKEN_FAILURES],
            )?;
            Sqlite::record_in(tx, id, "customer", "token-wrong", "", now)?;
            Ok(TokenVerdict::Wrong)
        })
    }

    fn spend_any_token(&self, token: &str, now: i64) -> Result<Option<String>> {
        if !is_token(token) {
            return Ok(None);
        }
        self.write(|tx| {
            let mut found = None;
            {
                let mut st = tx.prepare(
                    "SELECT id, token_salt, token_hash, state, expires FROM sessions \
                     WHERE token_spent = 0 AND state <> 'ended'",
                )?;
                let rows = st.query_map([], |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get::<_, String>(1)?,
                        r.get::<_, String>(2)?,
                        r.get::<_, String>(3)?,
                        r.get::<_, i64>(4)?,
                    ))
                })?;
                for row in rows {
                    let (id, salt, hash, state, expires) = row?;
                    let pending_expired = state == "pending" && now >= expires;
                    if !pending_expired && same(&token_hash(&salt, token), &hash) {
                        found = Some(id);
                    }
                }
            }
            if let Some(id) = &found {
                tx.execute("UPDATE sessions SET token_spent = 1 WHERE id = ?1", [id])?;
                Sqlite::record_in(tx, id, "customer", "token-spent", "keyboard-interactive", now)?;
            }
            Ok(found)
        })
    }

    fn admit(&self, id: &str, hello: &Hello, now: i64) -> Result<Admission> {
        self.write(|tx| {
            let Some(s) = Sqlite::get_in(tx, id)? else { return Ok(Admission::Unknown) };
            match s.standing(now) {
                Standing::Expired => return Ok(Admission::Expired),
                Standing::Closed => return Ok(Admission::Closed),
                Standing::Pending | Standing::Live => {}
            }
            let want = match hello.mode.as_str() {
                "share" => State::Share,
                "restricted" => State::Restricted,
                "tunnel" => State::Tunnel,
                _ => return Ok(Admission::ModeRefused),
            };
            if s.restricted && want != State::Restricted {
                return Ok(Admission::ModeRefused);
            }
            // The first customer's hello describes the session. A live session's broker decides
            // whether a later hello is a reconnect or a second customer (busy), and records which.
            if s.state == State::Pending {
                tx.execute(
                    "UPDATE sessions SET state = ?2, host = ?3, user_name = ?4, ips = ?5, client = ?6, last_seen = ?7 \
                     WHERE id = ?1",
                    params![id, want.as_str(), hello.host, hello.user, hello.ips, hello.client, now],
                )?;
            }
            let s = Sqlite::get_in(tx, id)?.ok_or_else(|| Error("admitted session vanished".into()))?;
            Ok(Admission::Admitted(Box::new(s)))
        })
    }

    fn update(&self, id: &str, change: &Update, now: i64) -> Result<bool> {
        self.write(|tx| {
            let n = match change {
                Update::State(State::Ended) => return Err(Error("use end() to end a session".into())),
                Update::State(st) => tx.execute(
                    "UPDATE sessions SET state = ?2, last_seen = ?3 WHERE id = ?1 AND state <> 'ended'",
                    params![id, st.as_str(), now],
                )?,
                Update::TunnelPort(p) => tx.execute(
                    "UPDATE sessions SET tunnel_port = ?2, last_seen = ?3 WHERE id = ?1 AND state <> 'ended'",
                    params![id, p.map(i64::from), now],
                )?,
                Update::Viewers(v) => tx.execute(
                    "UPDATE sessions SET viewers = ?2, last_seen = ?3 WHERE id = ?1 AND state <> 'ended'",
                    params![id, i64::from(*v), now],
                )?,
                Update::Seen => tx.execute(
                    "UPDATE sessions SET last_seen = ?2 WHERE id = ?1 AND state <> 'ended'",
                    params![id, now],
                )?,
            };
            Ok(n > 0)
        })
    }

    fn end(&self, id: &str, reason: &str, now: i64) -> Result<bool> {
        self.write(|tx| Sqlite::end_in(tx, id, reason, now))
    }

    fn record(&self, id: &str, actor: &str, what: &str, detail: &str, now: i64) -> Result<()> {
        Sqlite::record_in(&self.conn, id, actor, what, detail, now)
    }

    fn events(&self, id: &str) -> Result<Vec<Event>> {
        let mut st = self
            .conn
            .prepare("SELECT seq, session, at, actor, what, detail FROM events WHERE session = ?1 ORDER BY seq")?;
        let rows = st.query_map([id], |r| {
            Ok(Event {
                seq: r.get(0)?,
                session: r.get(1)?,
                at: r.get(2)?,
                actor: r.get(3)?,
                what: r.get(4)?,
                detail: r.get(5)?,
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
    }

    fn expire(&self, now: i64, idle_secs: i64) -> Result<Vec<String>> {
        self.write(|tx| {
            let mut ids = Vec::new();
            {
                let mut st = tx.prepare(
                    "SELECT id FROM sessions WHERE (state = 'pending' AND expires <= ?1) \
                     OR (state <> 'pending' AND state <> 'ended' AND last_seen <= ?2) ORDER BY id",
                )?;
                let rows = st.query_map(params![now, now.saturating_sub(idle_secs)], |r| r.get::<_, String>(0))?;
                for row in rows {
                    ids.push(row?);
                }
            }
            for id in &ids {
                Sqlite::end_in(tx, id, REASON_EXPIRED, now)?;
            }
            Ok(ids)
        })
    }

    fn purge(&self, before: i64) -> Result<usize> {
        self.write(|tx| {
            tx.execute(
                "DELETE FROM events WHERE session IN (SELECT id FROM sessions WHERE state = 'ended' AND ended < ?1)",
                [before],
            )?;
            Ok(tx.execute("DELETE FROM sessions WHERE state = 'ended' AND ended < ?1", [before])?)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    fn new(min: u64) -> NewSession {
        NewSession {
            case: "CASE-1".into(),
            customer: "ACME".into(),
            created_by: "alice".into(),
            expires_minutes: min,
            restricted: false,
            relay_host: "relay1".into(),
        }
    }

    fn hello(mode: &str) -> Hello {
        Hello {
            mode: mode.into(),
            host: "db1".into(),
            user: "root".into(),
            ips: "10.0.0.1".into(),
            client: "0.1".into(),
        }
    }

    #[test]
    fn word_list_is_curated() {
        let w: Vec<&str> = words().collect();
        assert!(w.len() >= 600, "{} words", w.len());
        let set: HashSet<_> = w.iter().collect();
        assert_eq!(set.len(), w.len(), "duplicates");
        for a in &w {
            assert!((3..=8).contains(&a.len()) && a.bytes().all(|b| b.is_ascii_lowercase()), "{a}");
        }
        fn dist(a: &str, b: &str) -> usize {
            let (a, b) = (a.as_bytes(), b.as_bytes());
            let mut d: Vec<usize> = (0..=b.len()).collect();
            for i in 1..=a.len() {
                let prev = d.clone();
                d[0] = i;
                for j in 1..=b.len() {
                    d[j] = (prev[j] + 1).min(d[j - 1] + 1).min(prev[j - 1] + usize::from(a[i - 1] != b[j - 1]));
                }
            }
            d[b.len()]
        }
        for (i, a) in w.iter().enumerate() {
            for b in &w[i + 1..] {
                assert!(dist(a, b) >= 2, "{a} and {b} are one edit apart");
                assert!(!a.starts_with(b) && !b.starts_with(a), "{a} / {b}: one is a prefix");
            }
        }
    }

    #[test]
    fn ids_and_tokens_have_the_documented_shape() {
        for _ in 0..200 {
            let id = new_session_id();
            assert!(is_session_id(&id), "{id}");
            assert!(is_token(&new_token()));
        }
        assert!(!is_token("12345") && !is_token("1234567") && !is_token("12345a"));
        assert!(!is_session_id("a-b-c") && !is_session_id("a-b-c-D") && !is_session_id("a-b--c"));
    }

    #[test]
    fn token_is_spent_once_and_stored_hashed() {
        let r = Sqlite::in_memory().unwrap();
        let (s, token) = r.create(&new(30), 1000).unwrap();
        assert_eq!(s.state, State::Pending);
        assert_eq!(s.expires, 1000 + 1800);
        let stored: String =
            r.conn.query_row("SELECT token_hash FROM sessions WHERE id = ?1", [&s.id], |r| r.get(0)).unwrap();
        assert!(!stored.contains(&token) && stored.len() == 64);
        assert_eq!(r.spend_token(&s.id, &token, 1001).unwrap(), TokenVerdict::Accepted);
        assert_eq!(r.spend_token(&s.id, &token, 1002).unwrap(), TokenVerdict::Spent);
        assert!(r.get(&s.id).unwrap().unwrap().token_spent);
        assert_eq!(r.spend_token("no-such-sess-ion", &token, 1002).unwrap(), TokenVerdict::Unknown);
    }

    #[test]
    fn wrong_tokens_burn_the_token() {
        let r = Sqlite::in_memory().unwrap();
        let (s, token) = r.create(&new(30), 1000).unwrap();
        let wrong = if token == "000000" { "000001" } else { "000000" };
        for _ in 0..MAX_TOKEN_FAILURES {
            assert_eq!(r.spend_token(&s.id, wrong, 1001).unwrap(), TokenVerdict::Wrong);
        }
        assert_eq!(r.spend_token(&s.id, &token, 1001).unwrap(), TokenVerdict::Spent);
        assert_eq!(r.spend_token(&s.id, "x", 1001).unwrap(), TokenVerdict::Spent);
    }

    #[test]
    fn expiry_and_closing_decide_the_verdicts() {
        let r = Sqlite::in_memory().unwrap();
        let (s, token) = r.create(&new(1), 1000).unwrap();
        assert_eq!(r.spend_token(&s.id, &token, 1060).unwrap(), TokenVerdict::Expired);
        assert_eq!(r.admit(&s.id, &hello("share"), 1060).unwrap(), Admission::Expired);
        let (c, token) = r.create(&new(10), 1000).unwrap();
        assert!(r.end(&c.id, "cancelled", 1001).unwrap());
        assert!(!r.end(&c.id, "cancelled", 1002).unwrap());
        assert_eq!(r.spend_token(&c.id, &token, 1002).unwrap(), TokenVerdict::Closed);
        assert_eq!(r.admit(&c.id, &hello("share"), 1002).unwrap(), Admission::Closed);
        assert_eq!(r.admit("no-such-sess-ion", &hello("share"), 1002).unwrap(), Admission::Unknown);
    }

    #[test]
    fn admit_moves_pending_to_the_hello_mode_and_respects_restricted() {
        let r = Sqlite::in_memory().unwrap();
        let (s, _) = r.create(&new(10), 1000).unwrap();
        let Admission::Admitted(a) = r.admit(&s.id, &hello("tunnel"), 1001).unwrap() else { panic!() };
        assert_eq!((a.state, a.host.as_str(), a.user.as_str()), (State::Tunnel, "db1", "root"));
        // A resume keeps the state the session is in.
        assert!(r.update(&s.id, &Update::State(State::ShareTunnel), 1002).unwrap());
        let Admission::Admitted(b) = r.admit(&s.id, &hello("share"), 1003).unwrap() else { panic!() };
        assert_eq!(b.state, State::ShareTunnel);
        assert_eq!(b.standing(1_000_000), Standing::Live, "a live session does not expire by its pending deadline");

        let mut n = new(10);
        n.restricted = true;
        let (rs, _) = r.create(&n, 1000).unwrap();
        assert_eq!(r.admit(&rs.id, &hello("share"), 1001).unwrap(), Admission::ModeRefused);
        assert_eq!(r.admit(&rs.id, &hello("bogus"), 1001).unwrap(), Admission::ModeRefused);
        assert!(matches!(r.admit(&rs.id, &hello("restricted"), 1001).unwrap(), Admission::Admitted(_)));
    }

    #[test]
    fn keyboard_interactive_finds_the_session_by_token() {
        let r = Sqlite::in_memory().unwrap();
        let (a, ta) = r.create(&new(10), 1000).unwrap();
        let (b, tb) = r.create(&new(10), 1000).unwrap();
        assert_ne!(ta, tb, "unspent tokens are unique");
        assert_eq!(r.spend_any_token(&tb, 1001).unwrap().as_deref(), Some(b.id.as_str()));
        assert_eq!(r.spend_any_token(&tb, 1002).unwrap(), None, "spent");
        assert_eq!(r.spend_any_token("abc", 1002).unwrap(), None);
        assert_eq!(r.spend_any_token(&ta, 1000 + 600).unwrap(), None, "expired");
        assert_eq!(r.spend_token(&a.id, &ta, 1001).unwrap(), TokenVerdict::Accepted);
    }

    #[test]
    fn updates_events_and_expiry() {
        let r = Sqlite::in_memory().unwrap();
        let (p, _) = r.create(&new(1), 1000).unwrap();
        let (l, _) = r.create(&new(10), 1000).unwrap();
        let (q, _) = r.create(&new(10), 1000).unwrap();
        r.admit(&l.id, &hello("share"), 1000).unwrap();
        r.admit(&q.id, &hello("share"), 1000).unwrap();
        assert!(r.update(&l.id, &Update::TunnelPort(Some(40001)), 1100).unwrap());
        assert!(r.update(&l.id, &Update::Viewers(2), 1100).unwrap());
        let got = r.get(&l.id).unwrap().unwrap();
        assert_eq!((got.tunnel_port, got.viewers, got.last_seen), (Some(40001), 2, 1100));
        assert!(r.update(&l.id, &Update::State(State::Ended), 1100).is_err());
        r.record(&l.id, "alice", "chat", "12 bytes", 1101).unwrap();
        let ev = r.events(&l.id).unwrap();
        assert_eq!(ev.iter().map(|e| e.what.as_str()).collect::<Vec<_>>(), ["created", "chat"]);

        // The pending one past its expiry and the live one idle since 1000 go; the recent one stays.
        let mut gone = r.expire(1500, 450).unwrap();
        gone.sort();
        let mut want = vec![p.id.clone(), q.id.clone()];
        want.sort();
        assert_eq!(gone, want);
        assert_eq!(r.get(&q.id).unwrap().unwrap().standing(1500), Standing::Expired);
        assert!(!r.update(&q.id, &Update::Seen, 1501).unwrap(), "an ended session takes no updates");
        assert_eq!(r.list(2000).unwrap().len(), 1);
        assert_eq!(r.list(0).unwrap().len(), 3);
        assert_eq!(r.purge(1500).unwrap(), 0, "ended at 1500, not before");
        assert_eq!(r.purge(1501).unwrap(), 2);
        assert!(r.get(&q.id).unwrap().is_none() && r.events(&q.id).unwrap().is_empty());
        assert_eq!(r.list(0).unwrap().len(), 1);
    }

    #[test]
    fn two_processes_share_one_file() {
        let dir = std::env::temp_dir().join(format!("tunl-registry-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("r.db");
        let a = Sqlite::open(&path).unwrap();
        let b = Sqlite::open(&path).unwrap();
        let (s, token) = a.create(&new(10), 1000).unwrap();
        let mode: String = b.conn.query_row("PRAGMA journal_mode", [], |r| r.get(0)).unwrap();
        assert_eq!(mode, "wal");
        assert_eq!(b.spend_token(&s.id, &token, 1001).unwrap(), TokenVerdict::Accepted);
        assert_eq!(a.spend_token(&s.id, &token, 1001).unwrap(), TokenVerdict::Spent);
        drop((a, b));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
