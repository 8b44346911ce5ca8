//! linbit-tunl/1, client side: strict parsing of relay lines, the customer-side allowlist, the
//! serialisers for client lines, and the incremental line splitter for the relay's stdout.
//!
//! Everything here is pure (no I/O) so that the untrusted-input handling can be tested exhaustively.
//!
//! Decisions where protocol.md is silent (to be recorded in docs/architecture.md):
//! - A line is ASCII `[A-Za-z0-9+/=_.:,@%-]` plus single spaces, no leading/trailing space; a trailing
//!   `\r` (CRLF) makes the line malformed.
//! - Verbs that carry a base64 payload (`K`, `CHAT`, `NOTE`, `UPGRADE`) carry it as the *last* field;
//!   every field before it must be `key=value`. (Base64 padding contains `=`, so the payload cannot be
//!   told apart from a `key=value` field by its shape alone.) `NOTE` without payload (`NOTE` or `NOTE `)
//!   means "clear". `VIEWERS`, `PING`, `PONG` take their number as the first field.
//! - Keys are `[a-z0-9_-]+`; a duplicated key is malformed; unknown keys are ignored; a bare token where
//!   none is expected is malformed.
//! - Base64 is RFC 4648 standard alphabet with canonical padding and zero trailing bits.
//! - Numbers are ASCII decimal digits only (no sign, no space), must fit the type.
//! - `WELCOME` requires `proto=1` and `viewers`; `ERROR` requires a known `code` (an unknown code is a
//!   malformed line; before WELCOME any dropped line is fatal anyway), `msg` defaults to empty.
//!   `CLOSE reason` defaults to empty. `UPGRADE` requires `req` (1..=64 token chars) and `from`.
//! - Percent-encoded values must use `%XX` with two hex digits and decode to UTF-8; the decoded text
//!   may contain anything and must be neutralised (`text::neutralize`) before display.

use crate::cli::{self, Mode};
use crate::tunnel::State as TunnelState;
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;

/// Maximum line length in bytes, including the newline.
pub const MAX_LINE: usize = 262_144;
/// Maximum raw bytes in one `O` line.
pub const MAX_O_CHUNK: usize = 32_768;
/// Maximum length of a request ID.
pub const MAX_REQ_LEN: usize = 64;
/// Maximum length of the verb as reported in a drop.
const MAX_VERB_REPORT: usize = 32;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorCode {
    UnknownSession,
    Expired,
    Closed,
    ModeRefused,
    Busy,
    Proto,
    Internal,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::UnknownSession => "unknown-session",
            ErrorCode::Expired => "expired",
            ErrorCode::Closed => "closed",
            ErrorCode::ModeRefused => "mode-refused",
            ErrorCode::Busy => "busy",
            ErrorCode::Proto => "proto",
            ErrorCode::Internal => "internal",
        }
    }
    pub fn from_str(s: &str) -> Option<ErrorCode> {
        Some(match s {
            "unknown-session" => ErrorCode::UnknownSession,
            "expired" => ErrorCode::Expired,
            "closed" => ErrorCode::Closed,
            "mode-refused" => ErrorCode::ModeRefused,
            "busy" => ErrorCode::Busy,
            "proto" => ErrorCode::Proto,
            "internal" => ErrorCode::Internal,
            _ => return None,
        })
    }
    /// `busy` and `internal` are retried with back-off; every other code is fatal.
    pub fn retryable(self) -> bool {
        matches!(self, ErrorCode::Busy | ErrorCode::Internal)
    }
}

/// One parsed relay -> client line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RelayMsg {
    Welcome { viewers: u32 },
    Error { code: ErrorCode, msg: String },
    K(Vec<u8>),
    Chat { from: String, text: Vec<u8> },
    Viewers(u32),
    Note(Vec<u8>),
    Upgrade { req: String, from: String, keys: Vec<u8> },
    Revoke,
    Refresh,
    Close { reason: String },
    Ping(u64),
    Pong(u64),
}

impl RelayMsg {
    pub fn verb(&self) -> &'static str {
        match self {
            RelayMsg::Welcome { .. } => "WELCOME",
            RelayMsg::Error { .. } => "ERROR",
            RelayMsg::K(_) => "K",
            RelayMsg::Chat { .. } => "CHAT",
            RelayMsg::Viewers(_) => "VIEWERS",
            RelayMsg::Note(_) => "NOTE",
            RelayMsg::Upgrade { .. } => "UPGRADE",
            RelayMsg::Revoke => "REVOKE",
            RelayMsg::Refresh => "REFRESH",
            RelayMsg::Close { .. } => "CLOSE",
            RelayMsg::Ping(_) => "PING",
            RelayMsg::Pong(_) => "PONG",
        }
    }
}

/// A relay line that was not accepted by the parser. `verb` is safe to log (token characters only,
/// at most 32 of them, anything else replaced by `?`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Dropped {
    pub verb: String,
    pub reason: &'static str,
}

fn is_token_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"+/=_.:,@%-".contains(&b)
}

fn is_token(s: &str) -> bool {
    s.bytes().all(is_token_byte)
}

fn sanitize_verb(line: &[u8]) -> String {
    let end = line.iter().position(|&b| b == b' ').unwrap_or(line.len());
    let verb = &line[..end];
    let mut s: String =
        verb.iter().take(MAX_VERB_REPORT).map(|&b| if is_token_byte(b) { b as char } else { '?' }).collect();
    if verb.len() > MAX_VERB_REPORT {
        s.push_str("...");
    }
    if s.is_empty() {
        s.push('-');
    }
    s
}

fn parse_u64(s: &str) -> Option<u64> {
    if s.is_empty() || s.len() > 20 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

fn parse_u32(s: &str) -> Option<u32> {
    parse_u64(s).and_then(|n| u32::try_from(n).ok())
}

fn b64_decode(s: &str) -> Option<Vec<u8>> {
    B64.decode(s).ok()
}

/// Strict percent-decoding: every `%` must start a `%XX` escape; the result must be UTF-8.
fn pct(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let ok = b.get(i + 1..i + 3).is_some_and(|h| h.iter().all(u8::is_ascii_hexdigit));
            if !ok {
                return None;
            }
            i += 3;
        } else {
            i += 1;
        }
    }
    cli::pct_decode(s)
}

fn valid_req(s: &str) -> bool {
    !s.is_empty() && s.len() <= MAX_REQ_LEN && is_token(s)
}

/// The fields of one line after the verb.
struct Fields<'a> {
    kv: Vec<(&'a str, &'a str)>,
    bare: Vec<&'a str>,
}

impl<'a> Fields<'a> {
    fn get(&self, key: &str) -> Option<&'a str> {
        self.kv.iter().find(|(k, _)| *k == key).map(|(_, v)| *v)
    }
}

fn is_key(k: &str) -> bool {
    !k.is_empty() && k.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
}

/// Split fields: the first `positional` bare fields (payload or number) are taken by position as given
/// by `payload_last` / `leading`; everything else must be a `key=value`.
fn split_fields<'a>(fields: &[&'a str], leading: usize, trailing: usize) -> Result<Fields<'a>, &'static str> {
    if fields.len() < leading + trailing {
        return Err("missing field");
    }
    let mut out = Fields { kv: Vec::new(), bare: Vec::new() };
    out.bare.extend_from_slice(&fields[..leading]);
    for f in &fields[leading..fields.len() - trailing] {
        let Some((k, v)) = f.split_once('=') else { return Err("malformed") };
        if !is_key(k) {
            return Err("malformed");
        }
        if out.kv.iter().any(|(kk, _)| *kk == k) {
            return Err("duplicate field");
        }
        out.kv.push((k, v));
    }
    out.bare.extend_from_slice(&fields[fields.len() - trailing..]);
    Ok(out)
}

/// Parse one relay line (without its trailing `\n`) strictly.
pub fn parse_relay_line(line: &[u8]) -> Result<RelayMsg, Dropped> {
    let drop = |reason: &'static str| Dropped { verb: sanitize_verb(line), reason };
    if line.len() + 1 > MAX_LINE {
        return Err(drop("too long"));
    }
    if line.is_empty() {
        return Err(drop("empty"));
    }
    if !line.iter().all(|&b| b == b' ' || is_token_byte(b)) {
        return Err(drop("bad character"));
    }
    // Safe: ASCII only.
    let text = std::str::from_utf8(line).map_err(|_| drop("bad character"))?;
    let mut parts: Vec<&str> = text.split(' ').collect();
    let verb = parts.remove(0);
    // `NOTE ` (empty payload after one space) means clear, like `NOTE`.
    if verb == "NOTE" && parts.len() == 1 && parts[0].is_empty() {
        parts.clear();
    }
    if verb.is_empty() || parts.iter().any(|p| p.is_empty()) {
        return Err(drop("malformed"));
    }
    let payload_verb = matches!(verb, "K" | "CHAT" | "UPGRADE") || (verb == "NOTE" && !parts.is_empty());
    let leading = usize::from(matches!(verb, "VIEWERS" | "PING" | "PONG"));
    let trailing = usize::from(payload_verb);
    let msg = match verb {
        "WELCOME" | "ERROR" | "K" | "CHAT" | "VIEWERS" | "NOTE" | "UPGRADE" | "REVOKE" | "REFRESH" | "CLOSE"
        | "PING" | "PONG" => {
            let f = split_fields(&parts, leading, trailing).map_err(drop)?;
            let payload = || f.bare.last().and_then(|p| b64_decode(p)).ok_or_else(|| drop("bad base64"));
            match verb {
                "WELCOME" => {
                    let proto = f.get("proto").ok_or_else(|| drop("missing field"))?;
                    if proto != "1" {
                        return Err(drop("unsupported proto"));
                    }
                    let viewers = f.get("viewers").ok_or_else(|| drop("missing field"))?;
                    RelayMsg::Welcome { viewers: parse_u32(viewers).ok_or_else(|| drop("bad number"))? }
                }
                "ERROR" => {
                    let code = f.get("code").ok_or_else(|| drop("missing field"))?;
                    let code = ErrorCode::from_str(code).ok_or_else(|| drop("unknown error code"))?;
                    let msg = pct(f.get("msg").unwrap_or("")).ok_or_else(|| drop("bad percent-encoding"))?;
                    RelayMsg::Error { code, msg }
                }
                "K" => RelayMsg::K(payload()?),
                "CHAT" => {
                    let from = f.get("from").ok_or_else(|| drop("missing field"))?;
                    let from = pct(from).ok_or_else(|| drop("bad percent-encoding"))?;
                    RelayMsg::Chat { from, text: payload()? }
                }
                "VIEWERS" => RelayMsg::Viewers(parse_u32(f.bare[0]).ok_or_else(|| drop("bad number"))?),
                "NOTE" => RelayMsg::Note(if payload_verb { payload()? } else { Vec::new() }),
                "UPGRADE" => {
                    let req = f.get("req").ok_or_else(|| drop("missing field"))?;
                    if !valid_req(req) {
                        return Err(drop("bad req"));
                    }
                    let from = f.get("from").ok_or_else(|| drop("missing field"))?;
                    let from = pct(from).ok_or_else(|| drop("bad percent-encoding"))?;
                    let keys = payload()?;
                    if keys.is_empty() {
                        return Err(drop("missing field"));
                    }
                    RelayMsg::Upgrade { req: req.to_string(), from, keys }
                }
                "REVOKE" => RelayMsg::Revoke,
                "REFRESH" => RelayMsg::Refresh,
                "CLOSE" => {
                    let reason = pct(f.get("reason").unwrap_or("")).ok_or_else(|| drop("bad percent-encoding"))?;
                    RelayMsg::Close { reason }
                }
                "PING" => RelayMsg::Ping(parse_u64(f.bare[0]).ok_or_else(|| drop("bad number"))?),
                "PONG" => RelayMsg::Pong(parse_u64(f.bare[0]).ok_or_else(|| drop("bad number"))?),
                _ => unreachable!(),
            }
        }
        _ => return Err(drop("unknown verb")),
    };
    Ok(msg)
}

// ---------------------------------------------------------------------------------------------
// The customer-side allowlist (protocol.md sections 4 and 5).

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RejectReason {
    Denied,
    Blocked,
    Restricted,
    Brb,
    InvalidKey,
    Error,
}

impl RejectReason {
    pub fn as_str(self) -> &'static str {
        match self {
            RejectReason::Denied => "denied",
            RejectReason::Blocked => "blocked",
            RejectReason::Restricted => "restricted",
            RejectReason::Brb => "brb",
            RejectReason::InvalidKey => "invalid-key",
            RejectReason::Error => "error",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CloseReason {
    Revoked,
    Relay,
    Ended,
}

impl CloseReason {
    pub fn as_str(self) -> &'static str {
        match self {
            CloseReason::Revoked => "revoked",
            CloseReason::Relay => "relay",
            CloseReason::Ended => "ended",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ByeReason {
    Customer,
    Signal,
    RelayClose,
}

impl ByeReason {
    pub fn as_str(self) -> &'static str {
        match self {
            ByeReason::Customer => "customer",
            ByeReason::Signal => "signal",
            ByeReason::RelayClose => "relay-close",
        }
    }
}

/// What to do with a parsed relay line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Act on it.
    Accept,
    /// Ignore it (log only).
    Drop(&'static str),
    /// Do not act on it, but answer `TUNNEL_REJECTED req=ID reason=R` (only for `UPGRADE`).
    Reject(RejectReason),
}

/// The allowlist: may `msg` be acted on in `mode`, with BRB on or off, before/after WELCOME?
///
/// Before WELCOME only `WELCOME` and `ERROR` are accepted (the caller treats anything else, including a
/// line the parser dropped, as a fatal protocol error). After WELCOME, `WELCOME` and `ERROR` are dropped.
/// `K` is dropped in restricted mode and while BRB. `UPGRADE` in restricted mode is rejected with
/// `restricted`; everything else about `UPGRADE` (BRB, blocked, popup) is decided by `tunnel::Tunnel`.
pub fn allowed(msg: &RelayMsg, mode: Mode, brb: bool, welcomed: bool) -> Verdict {
    match msg {
        RelayMsg::Welcome { .. } | RelayMsg::Error { .. } => {
            if welcomed {
                Verdict::Drop("after welcome")
            } else {
                Verdict::Accept
            }
        }
        _ if !welcomed => Verdict::Drop("before welcome"),
        RelayMsg::K(_) if mode == Mode::Restricted => Verdict::Drop("restricted"),
        RelayMsg::K(_) if brb => Verdict::Drop("brb"),
        RelayMsg::Upgrade { .. } if mode == Mode::Restricted => Verdict::Reject(RejectReason::Restricted),
        _ => Verdict::Accept,
    }
}

/// One line for `ssh.log` about a relay line. Never contains the `K` payload, chat text, note text or
/// keys (only byte counts); names and messages are neutralised.
pub fn log_line(parsed: &Result<RelayMsg, Dropped>, verdict: Option<Verdict>) -> String {
    let msg = match parsed {
        Err(d) => return format!("dropped {} {}", d.verb, d.reason),
        Ok(m) => m,
    };
    let short = |b: &[u8]| crate::text::neutralize(b, 64);
    let detail = match msg {
        RelayMsg::Welcome { viewers } => format!("viewers={viewers}"),
        RelayMsg::Error { code, msg } => format!("code={} msg={}", code.as_str(), short(msg.as_bytes())),
        RelayMsg::K(b) => format!("bytes={}", b.len()),
        RelayMsg::Chat { from, text } => format!("from={} bytes={}", short(from.as_bytes()), text.len()),
        RelayMsg::Viewers(n) => format!("{n}"),
        RelayMsg::Note(b) => format!("bytes={}", b.len()),
        RelayMsg::Upgrade { req, from, keys } => {
            format!("req={req} from={} bytes={}", short(from.as_bytes()), keys.len())
        }
        RelayMsg::Revoke | RelayMsg::Refresh => String::new(),
        RelayMsg::Close { reason } => format!("reason={}", short(reason.as_bytes())),
        RelayMsg::Ping(n) | RelayMsg::Pong(n) => format!("{n}"),
    };
    let sep = if detail.is_empty() { "" } else { " " };
    match verdict.unwrap_or(Verdict::Accept) {
        Verdict::Accept => format!("accepted {}{sep}{detail}", msg.verb()),
        Verdict::Drop(r) => format!("dropped {} {r}{sep}{detail}", msg.verb()),
        Verdict::Reject(r) => format!("rejected {} {}{sep}{detail}", msg.verb(), r.as_str()),
    }
}

// ---------------------------------------------------------------------------------------------
// Client -> relay serialisers. All append complete lines (with `\n`) to an output buffer.

/// A line would exceed `MAX_LINE`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TooLong;

/// Append base64 of `data` to `out` without an intermediate allocation.
fn push_b64(out: &mut Vec<u8>, data: &[u8]) {
    let start = out.len();
    let n = base64::encoded_len(data.len(), true).expect("length overflow");
    out.resize(start + n, 0);
    let written = B64.encode_slice(data, &mut out[start..]).expect("buffer sized by encoded_len");
    debug_assert_eq!(written, n);
}

fn b64_line_len(prefix: usize, data: usize) -> usize {
    prefix + base64::encoded_len(data, true).unwrap_or(usize::MAX / 2) + 1
}

/// `O B64` lines for bytes the shared pane printed, split into chunks of at most `MAX_O_CHUNK` bytes.
pub fn push_o(out: &mut Vec<u8>, bytes: &[u8]) {
    out.reserve(bytes.len().div_ceil(3) * 4 + bytes.len().div_ceil(MAX_O_CHUNK) * 3);
    for chunk in bytes.chunks(MAX_O_CHUNK) {
        out.extend_from_slice(b"O ");
        push_b64(out, chunk);
        out.push(b'\n');
    }
}

/// `SNAP size=CxR B64`. Fails (appending nothing) if the line would exceed `MAX_LINE`; the caller then
/// retries with a plainer capture (without attributes) or skips the snapshot.
pub fn push_snap(out: &mut Vec<u8>, cols: u16, rows: u16, screen: &[u8]) -> Result<(), TooLong> {
    let head = format!("SNAP size={cols}x{rows} ");
    if b64_line_len(head.len(), screen.len()) > MAX_LINE {
        return Err(TooLong);
    }
    out.extend_from_slice(head.as_bytes());
    push_b64(out, screen);
    out.push(b'\n');
    Ok(())
}

/// `SIZE C R`.
pub fn push_size(out: &mut Vec<u8>, cols: u16, rows: u16) {
    out.extend_from_slice(format!("SIZE {cols} {rows}\n").as_bytes());
}

/// `CHAT B64` (one chat line typed by the customer). Fails if the line would exceed `MAX_LINE`.
pub fn push_chat(out: &mut Vec<u8>, text: &[u8]) -> Result<(), TooLong> {
    if b64_line_len(5, text.len()) > MAX_LINE {
        return Err(TooLong);
    }
    out.extend_from_slice(b"CHAT ");
    push_b64(out, text);
    out.push(b'\n');
    Ok(())
}

/// `STATE tunnel=T brb=0|1 mode=MODE`.
pub fn push_state(out: &mut Vec<u8>, tunnel: TunnelState, brb: bool, mode: Mode) {
    let line = format!("STATE tunnel={} brb={} mode={}\n", tunnel.wire(), u8::from(brb), mode.as_str());
    out.extend_from_slice(line.as_bytes());
}

/// `TUNNEL_OPEN req=ID port=P user=USER`. `req` must be a request ID accepted by the parser; `user` is
/// percent-encoded (the identity for ordinary user names).
pub fn push_tunnel_open(out: &mut Vec<u8>, req: &str, port: u16, user: &str) {
    debug_assert!(valid_req(req));
    let line = format!("TUNNEL_OPEN req={} port={port} user={}\n", req_field(req), cli::pct_encode(user));
    out.extend_from_slice(line.as_bytes());
}

/// `TUNNEL_REJECTED req=ID reason=R`.
pub fn push_tunnel_rejected(out: &mut Vec<u8>, req: &str, reason: RejectReason) {
    debug_assert!(valid_req(req));
    out.extend_from_slice(format!("TUNNEL_REJECTED req={} reason={}\n", req_field(req), reason.as_str()).as_bytes());
}

/// A request ID as it goes back on the wire: IDs come from the parser (validated); anything else is
/// replaced rather than risk breaking the framing.
fn req_field(req: &str) -> &str {
    if valid_req(req) { req } else { "invalid" }
}

/// `TUNNEL_CLOSED reason=R`.
pub fn push_tunnel_closed(out: &mut Vec<u8>, reason: CloseReason) {
    out.extend_from_slice(format!("TUNNEL_CLOSED reason={}\n", reason.as_str()).as_bytes());
}

/// `PING N`.
pub fn push_ping(out: &mut Vec<u8>, n: u64) {
    out.extend_from_slice(format!("PING {n}\n").as_bytes());
}

/// `PONG N`.
pub fn push_pong(out: &mut Vec<u8>, n: u64) {
    out.extend_from_slice(format!("PONG {n}\n").as_bytes());
}

/// `BYE reason=R`.
pub fn push_bye(out: &mut Vec<u8>, reason: ByeReason) {
    out.extend_from_slice(format!("BYE reason={}\n", reason.as_str()).as_bytes());
}

// ---------------------------------------------------------------------------------------------
// Line splitter for the relay's stdout.

/// Incremental splitter with a memory bound.
///
/// Contract: after each `push`, call `next_line` until it returns `None`. Then the buffer never holds
/// more than one incomplete line of less than `MAX_LINE` bytes plus the last pushed chunk. A line of
/// `MAX_LINE` bytes or more (without its newline; i.e. over the limit including the newline) is
/// reported once as `TooLong` and the rest of it is discarded up to the next `\n` without buffering.
#[derive(Default)]
pub struct LineSplitter {
    buf: Vec<u8>,
    start: usize,
    discarding: bool,
}

impl LineSplitter {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn push(&mut self, mut data: &[u8]) {
        if self.start > 0 {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        if self.discarding {
            match data.iter().position(|&b| b == b'\n') {
                None => return,
                Some(i) => {
                    self.discarding = false;
                    data = &data[i + 1..];
                }
            }
        }
        self.buf.extend_from_slice(data);
    }

    /// The next complete line without its `\n`, or `TooLong` once per over-long line.
    pub fn next_line(&mut self) -> Option<Result<&[u8], TooLong>> {
        let rest = &self.buf[self.start..];
        match rest.iter().position(|&b| b == b'\n') {
            Some(i) => {
                let s = self.start;
                self.start += i + 1;
                if i + 1 > MAX_LINE { Some(Err(TooLong)) } else { Some(Ok(&self.buf[s..s + i])) }
            }
            None if rest.len() >= MAX_LINE => {
                // No newline within the limit: report, forget what we have, skip to the next newline.
                self.buf.clear();
                self.start = 0;
                self.discarding = true;
                Some(Err(TooLong))
            }
            None => None,
        }
    }

    /// Bytes currently buffered (for tests and diagnostics).
    #[cfg(test)]
    pub fn buffered(&self) -> usize {
        self.buf.len() - self.start
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Result<RelayMsg, Dropped> {
        parse_relay_line(s.as_bytes())
    }
    fn reason(s: &str) -> &'static str {
        p(s).unwrap_err().reason
    }

    #[test]
    fn parse_valid_lines() {
        assert_eq!(p("WELCOME proto=1 viewers=3"), Ok(RelayMsg::Welcome { viewers: 3 }));
        assert_eq!(p("WELCOME viewers=0 proto=1 future=x"), Ok(RelayMsg::Welcome { viewers: 0 }));
        assert_eq!(
            p("ERROR code=expired msg=session%20expired"),
            Ok(RelayMsg::Error { code: ErrorCode::Expired, msg: "session expired".into() })
        );
        assert_eq!(p("ERROR code=busy"), Ok(RelayMsg::Error { code: ErrorCode::Busy, msg: String::new() }));
        assert_eq!(p("K aGVsbG8="), Ok(RelayMsg::K(b"hello".to_vec())));
        assert_eq!(p("K QQ=="), Ok(RelayMsg::K(b"A".to_vec())));
        assert_eq!(
            p("CHAT from=Jane%20Doe aGk="),
            Ok(RelayMsg::Chat { from: "Jane Doe".into(), text: b"hi".to_vec() })
        );
        assert_eq!(p("CHAT x=1 from=j aGk="), Ok(RelayMsg::Chat { from: "j".into(), text: b"hi".to_vec() }));
        assert_eq!(p("VIEWERS 2"), Ok(RelayMsg::Viewers(2)));
        assert_eq!(p("NOTE aGk="), Ok(RelayMsg::Note(b"hi".to_vec())));
        assert_eq!(p("NOTE"), Ok(RelayMsg::Note(Vec::new())));
        assert_eq!(p("NOTE "), Ok(RelayMsg::Note(Vec::new())));
        assert_eq!(
            p("UPGRADE req=r-1.a from=eng%40linbit.com c3NoLWVkMjU1MTkgQUFBQQ=="),
            Ok(RelayMsg::Upgrade {
                req: "r-1.a".into(),
                from: "eng@linbit.com".into(),
                keys: b"ssh-ed25519 AAAA".to_vec()
            })
        );
        assert_eq!(p("REVOKE"), Ok(RelayMsg::Revoke));
        assert_eq!(p("REVOKE why=x"), Ok(RelayMsg::Revoke));
        assert_eq!(p("REFRESH"), Ok(RelayMsg::Refresh));
        assert_eq!(p("CLOSE reason=done%21"), Ok(RelayMsg::Close { reason: "done!".into() }));
        assert_eq!(p("CLOSE"), Ok(RelayMsg::Close { reason: String::new() }));
        assert_eq!(p("PING 18446744073709551615"), Ok(RelayMsg::Ping(u64::MAX)));
        assert_eq!(p("PONG 0"), Ok(RelayMsg::Pong(0)));
        for code in ["unknown-session", "expired", "closed", "mode-refused", "busy", "proto", "internal"] {
            let m = p(&format!("ERROR code={code} msg=x")).unwrap();
            assert!(matches!(m, RelayMsg::Error { code: c, .. } if c.as_str() == code));
        }
    }

    #[test]
    fn parse_hostile_lines() {
        assert_eq!(reason(""), "empty");
        assert_eq!(reason("FOO bar"), "unknown verb");
        assert_eq!(reason("k aGk="), "unknown verb");
        assert_eq!(reason("K aGk=\r"), "bad character");
        assert_eq!(reason("K  aGk="), "malformed");
        assert_eq!(reason(" K aGk="), "malformed");
        assert_eq!(reason("K aGk= "), "malformed");
        assert_eq!(reason("K\taGk="), "bad character");
        assert_eq!(reason("K"), "missing field");
        assert_eq!(reason("K aGk"), "bad base64"); // missing padding
        assert_eq!(reason("K aGl="), "bad base64"); // non-zero trailing bits
        assert_eq!(reason("K aG=k"), "bad base64");
        assert_eq!(reason("K a-k="), "bad base64");
        assert_eq!(reason("K extra aGk="), "malformed");
        assert_eq!(reason("CHAT aGk="), "missing field");
        assert_eq!(reason("CHAT from=a from=b aGk="), "duplicate field");
        assert_eq!(reason("CHAT from=%zz aGk="), "bad percent-encoding");
        assert_eq!(reason("CHAT from=%+1 aGk="), "bad percent-encoding");
        assert_eq!(reason("CHAT from=%4 aGk="), "bad percent-encoding");
        assert_eq!(reason("CHAT from=%ff aGk="), "bad percent-encoding"); // not UTF-8
        assert_eq!(reason("CHAT From=x aGk="), "malformed");
        assert_eq!(reason("VIEWERS"), "missing field");
        assert_eq!(reason("VIEWERS -1"), "bad number");
        assert_eq!(reason("VIEWERS +1"), "bad number");
        assert_eq!(reason("VIEWERS 4294967296"), "bad number");
        assert_eq!(reason("VIEWERS 1 2"), "malformed");
        assert_eq!(reason("PING 18446744073709551616"), "bad number");
        assert_eq!(reason("PING 0x10"), "bad number");
        assert_eq!(reason("REVOKE now"), "malformed");
        assert_eq!(reason("WELCOME viewers=1"), "missing field");
        assert_eq!(reason("WELCOME proto=2 viewers=1"), "unsupported proto");
        assert_eq!(reason("WELCOME proto=1 viewers=x"), "bad number");
        assert_eq!(reason("ERROR code=nope msg=x"), "unknown error code");
        assert_eq!(reason("ERROR msg=x"), "missing field");
        assert_eq!(reason("UPGRADE from=x c3No"), "missing field");
        assert_eq!(reason("UPGRADE req= from=x c3No"), "bad req");
        assert_eq!(reason(&format!("UPGRADE req={} from=x c3No", "a".repeat(65))), "bad req");
        assert!(p(&format!("UPGRADE req={} from=x c3No", "a".repeat(64))).is_ok());
        assert_eq!(reason("UPGRADE req=1 c3No"), "missing field");
        assert_eq!(reason("UPGRADE req=1 from=x"), "missing field"); // from=x taken as the payload
        assert_eq!(reason("K \x1b[2J"), "bad character");
        assert_eq!(parse_relay_line("K é".as_bytes()).unwrap_err().reason, "bad character");
        assert_eq!(parse_relay_line(b"K \xff").unwrap_err().reason, "bad character");
    }

    #[test]
    fn dropped_verb_is_sanitized() {
        let d = parse_relay_line(b"\x1b]52;c;AAAA\x07 x").unwrap_err();
        assert_eq!(d.verb, "??52?c?AAAA?");
        let d = parse_relay_line("X".repeat(100).as_bytes()).unwrap_err();
        assert_eq!(d.verb.len(), 35);
        assert!(d.verb.bytes().all(|b| b.is_ascii_graphic()));
    }

    #[test]
    fn over_length_line_dropped() {
        let line = format!("K {}", "A".repeat(MAX_LINE));
        assert_eq!(reason(&line), "too long");
        // Exactly at the limit (MAX_LINE - 1 bytes + newline) is fine.
        let n = (MAX_LINE - 3) / 4 * 4;
        let line = format!("K {}", "A".repeat(n));
        assert!(line.len() < MAX_LINE);
        assert!(p(&line).is_ok());
    }

    #[test]
    fn allowlist() {
        use Mode::*;
        let k = RelayMsg::K(vec![1]);
        let up = RelayMsg::Upgrade { req: "1".into(), from: "x".into(), keys: vec![1] };
        let w = RelayMsg::Welcome { viewers: 0 };
        let e = RelayMsg::Error { code: ErrorCode::Busy, msg: String::new() };
        assert_eq!(allowed(&w, Share, false, false), Verdict::Accept);
        assert_eq!(allowed(&e, Share, false, false), Verdict::Accept);
        assert_eq!(allowed(&w, Share, false, true), Verdict::Drop("after welcome"));
        assert_eq!(allowed(&e, Share, false, true), Verdict::Drop("after welcome"));
        for m in [&k, &up, &RelayMsg::Ping(1), &RelayMsg::Revoke, &RelayMsg::Close { reason: String::new() }] {
            assert_eq!(allowed(m, Share, false, false), Verdict::Drop("before welcome"));
        }
        assert_eq!(allowed(&k, Share, false, true), Verdict::Accept);
        assert_eq!(allowed(&k, Tunnel, false, true), Verdict::Accept);
        assert_eq!(allowed(&k, Restricted, false, true), Verdict::Drop("restricted"));
        assert_eq!(allowed(&k, Share, true, true), Verdict::Drop("brb"));
        assert_eq!(allowed(&k, Restricted, true, true), Verdict::Drop("restricted"));
        assert_eq!(allowed(&up, Share, false, true), Verdict::Accept);
        assert_eq!(allowed(&up, Restricted, false, true), Verdict::Reject(RejectReason::Restricted));
        let all = [
            RelayMsg::Chat { from: "a".into(), text: vec![] },
            RelayMsg::Viewers(1),
            RelayMsg::Note(vec![]),
            RelayMsg::Revoke,
            RelayMsg::Refresh,
            RelayMsg::Close { reason: String::new() },
            RelayMsg::Ping(1),
            RelayMsg::Pong(1),
        ];
        for m in &all {
            for mode in [Share, Restricted, Tunnel] {
                for brb in [false, true] {
                    assert_eq!(allowed(m, mode, brb, true), Verdict::Accept, "{m:?}");
                }
            }
        }
    }

    #[test]
    fn log_never_contains_payloads() {
        let secret = b"hunter2-secret-password";
        let line = format!("K {}", B64.encode(secret));
        let parsed = parse_relay_line(line.as_bytes());
        for v in [Verdict::Accept, Verdict::Drop("brb"), Verdict::Drop("restricted")] {
            let l = log_line(&parsed, Some(v));
            assert!(!l.contains("hunter2"), "{l}");
            assert!(!l.contains(&B64.encode(secret)), "{l}");
            assert!(l.contains("bytes=23"), "{l}");
        }
        assert_eq!(log_line(&parsed, Some(Verdict::Drop("brb"))), "dropped K brb bytes=23");
        assert_eq!(log_line(&parsed, None), "accepted K bytes=23");
        let chat = parse_relay_line(format!("CHAT from=eng%1B%5B2J {}", B64.encode(secret)).as_bytes());
        let l = log_line(&chat, None);
        assert!(!l.contains("hunter2") && !l.contains('\x1b'), "{l}");
        assert_eq!(l, "accepted CHAT from=eng^[[2J bytes=23");
        let bad = parse_relay_line(format!("K {}!", B64.encode(secret)).as_bytes());
        assert_eq!(log_line(&bad, None), "dropped K bad character");
        let up = parse_relay_line(b"UPGRADE req=7 from=x c3No");
        assert_eq!(
            log_line(&up, Some(Verdict::Reject(RejectReason::Restricted))),
            "rejected UPGRADE restricted req=7 from=x bytes=3"
        );
        assert_eq!(log_line(&Ok(RelayMsg::Revoke), None), "accepted REVOKE");
    }

    #[test]
    fn serializers() {
        let mut out = Vec::new();
        push_size(&mut out, 80, 24);
        push_state(&mut out, TunnelState::Confirm, false, Mode::Share);
        push_state(&mut out, TunnelState::Off, true, Mode::Restricted);
        push_tunnel_open(&mut out, "r1", 40001, "root");
        push_tunnel_rejected(&mut out, "r1", RejectReason::InvalidKey);
        push_tunnel_closed(&mut out, CloseReason::Revoked);
        push_ping(&mut out, 7);
        push_pong(&mut out, 8);
        push_bye(&mut out, ByeReason::RelayClose);
        push_chat(&mut out, "hé\n".as_bytes()).unwrap();
        push_snap(&mut out, 80, 24, b"\x1b[1mscreen").unwrap();
        push_tunnel_open(&mut out, "r2", 1, "dom user");
        let expect = "SIZE 80 24\nSTATE tunnel=confirm brb=0 mode=share\nSTATE tunnel=off brb=1 mode=restricted\n\
            TUNNEL_OPEN req=r1 port=40001 user=root\nTUNNEL_REJECTED req=r1 reason=invalid-key\n\
            TUNNEL_CLOSED reason=revoked\nPING 7\nPONG 8\nBYE reason=relay-close\nCHAT aMOpCg==\n\
            SNAP size=80x24 G1sxbXNjcmVlbg==\nTUNNEL_OPEN req=r2 port=1 user=dom%20user\n";
        assert_eq!(String::from_utf8(out).unwrap(), expect);
        let mut out = Vec::new();
        assert_eq!(push_chat(&mut out, &vec![b'a'; MAX_LINE]), Err(TooLong));
        assert_eq!(push_snap(&mut out, 1, 1, &vec![b'a'; MAX_LINE]), Err(TooLong));
        assert!(out.is_empty());
        push_snap(&mut out, 65535, 65535, &vec![b'a'; 190_000]).unwrap();
        assert!(out.len() <= MAX_LINE);
    }

    #[test]
    fn o_lines_split_and_roundtrip() {
        let mut out = Vec::new();
        push_o(&mut out, b"");
        assert!(out.is_empty());
        let data: Vec<u8> = (0..100_000u32).map(|i| (i * 7 % 256) as u8).collect();
        push_o(&mut out, &data);
        let text = String::from_utf8(out).unwrap();
        let lines: Vec<&str> = text.strip_suffix('\n').unwrap().split('\n').collect();
        assert_eq!(lines.len(), 4);
        let mut back = Vec::new();
        for l in &lines {
            assert!(l.len() < MAX_LINE);
            let b = B64.decode(l.strip_prefix("O ").unwrap()).unwrap();
            assert!(b.len() <= MAX_O_CHUNK);
            back.extend(b);
        }
        assert_eq!(back, data);
    }

    #[test]
    fn splitter_basic_and_chunked() {
        let mut s = LineSplitter::new();
        let input = b"PING 1\nK aGk=\nVIEWERS 3\n";
        for b in input.iter() {
            s.push(std::slice::from_ref(b));
        }
        let mut got = Vec::new();
        while let Some(l) = s.next_line() {
            got.push(l.unwrap().to_vec());
        }
        assert_eq!(got, vec![b"PING 1".to_vec(), b"K aGk=".to_vec(), b"VIEWERS 3".to_vec()]);
        s.push(b"PART");
        assert!(s.next_line().is_none());
        s.push(b"IAL\n\n");
        assert_eq!(s.next_line(), Some(Ok(&b"PARTIAL"[..])));
        assert_eq!(s.next_line(), Some(Ok(&b""[..])));
        assert_eq!(s.next_line(), None);
        s.push(b"X\r\n");
        assert_eq!(s.next_line(), Some(Ok(&b"X\r"[..])));
    }

    fn drain(s: &mut LineSplitter) -> Vec<Result<Vec<u8>, TooLong>> {
        let mut v = Vec::new();
        while let Some(l) = s.next_line() {
            v.push(l.map(|x| x.to_vec()));
        }
        v
    }

    #[test]
    fn splitter_long_line_streamed() {
        let mut s = LineSplitter::new();
        let mut results = Vec::new();
        s.push(b"PING 1\nK ");
        results.extend(drain(&mut s));
        let chunk = vec![b'A'; 4096];
        for _ in 0..75 {
            // 300 KiB without a newline
            s.push(&chunk);
            results.extend(drain(&mut s));
            assert!(s.buffered() <= MAX_LINE + chunk.len());
        }
        s.push(b"AAAA\nPING 2\n");
        results.extend(drain(&mut s));
        assert_eq!(results, vec![Ok(b"PING 1".to_vec()), Err(TooLong), Ok(b"PING 2".to_vec())]);
    }

    #[test]
    fn splitter_long_line_in_one_push() {
        let mut s = LineSplitter::new();
        let mut data = vec![b'A'; 300 * 1024];
        data.extend_from_slice(b"\nPONG 5\n");
        s.push(&data);
        assert_eq!(drain(&mut s), vec![Err(TooLong), Ok(b"PONG 5".to_vec())]);
        // Boundary: MAX_LINE - 1 bytes plus newline is fine, MAX_LINE bytes plus newline is not.
        let mut data = vec![b'A'; MAX_LINE - 1];
        data.push(b'\n');
        data.extend(vec![b'B'; MAX_LINE]);
        data.push(b'\n');
        s.push(&data);
        let r = drain(&mut s);
        assert_eq!(r.len(), 2);
        assert_eq!(r[0].as_ref().unwrap().len(), MAX_LINE - 1);
        assert_eq!(r[1], Err(TooLong));
    }
}

/// Properties over random input (issue 13): the relay is untrusted, so no line may panic the parser,
/// the allowlist or the log writer, and what is accepted must mean exactly what it says.
#[cfg(test)]
mod props {
    use super::*;
    use proptest::prelude::*;

    /// The line a well-behaved relay would send for `msg` (protocol.md section 3).
    fn serialise(msg: &RelayMsg) -> String {
        let pe = cli::pct_encode;
        match msg {
            RelayMsg::Welcome { viewers } => format!("WELCOME proto=1 viewers={viewers}"),
            RelayMsg::Error { code, msg } => format!("ERROR code={} msg={}", code.as_str(), pe(msg)),
            RelayMsg::K(b) => format!("K {}", B64.encode(b)),
            RelayMsg::Chat { from, text } => format!("CHAT from={} {}", pe(from), B64.encode(text)),
            RelayMsg::Viewers(n) => format!("VIEWERS {n}"),
            RelayMsg::Note(b) if b.is_empty() => "NOTE".into(),
            RelayMsg::Note(b) => format!("NOTE {}", B64.encode(b)),
            RelayMsg::Upgrade { req, from, keys } => {
                format!("UPGRADE req={req} from={} {}", pe(from), B64.encode(keys))
            }
            RelayMsg::Revoke => "REVOKE".into(),
            RelayMsg::Refresh => "REFRESH".into(),
            RelayMsg::Close { reason } => format!("CLOSE reason={}", pe(reason)),
            RelayMsg::Ping(n) => format!("PING {n}"),
            RelayMsg::Pong(n) => format!("PONG {n}"),
        }
    }

    fn code() -> impl Strategy<Value = ErrorCode> {
        use ErrorCode::*;
        prop::sample::select(vec![UnknownSession, Expired, Closed, ModeRefused, Busy, Proto, Internal])
    }

    fn msg() -> impl Strategy<Value = RelayMsg> {
        let bytes = || prop::collection::vec(any::<u8>(), 1..64);
        prop_oneof![
            any::<u32>().prop_map(|viewers| RelayMsg::Welcome { viewers }),
            (code(), ".{0,20}").prop_map(|(code, msg)| RelayMsg::Error { code, msg }),
            bytes().prop_map(RelayMsg::K),
            (".{0,12}", bytes()).prop_map(|(from, text)| RelayMsg::Chat { from, text }),
            any::<u32>().prop_map(RelayMsg::Viewers),
            prop::collection::vec(any::<u8>(), 0..64).prop_map(RelayMsg::Note),
            ("[A-Za-z0-9_.:-]{1,64}", ".{0,12}", bytes()).prop_map(|(req, from, keys)| RelayMsg::Upgrade {
                req,
                from,
                keys
            }),
            Just(RelayMsg::Revoke),
            Just(RelayMsg::Refresh),
            ".{0,20}".prop_map(|reason| RelayMsg::Close { reason }),
            any::<u64>().prop_map(RelayMsg::Ping),
            any::<u64>().prop_map(RelayMsg::Pong),
        ]
    }

    /// Lines near the grammar: a known verb, then fields from the token alphabet, `=` and spaces,
    /// so that most of them reach the per-verb checks rather than the character filter.
    fn near_line() -> impl Strategy<Value = Vec<u8>> {
        let verbs = vec![
            "WELCOME", "ERROR", "K", "CHAT", "VIEWERS", "NOTE", "UPGRADE", "REVOKE", "REFRESH", "CLOSE", "PING",
            "PONG", "O", "welcome", "",
        ];
        let field = prop_oneof![
            "(proto|viewers|code|msg|from|req|reason|x)=[A-Za-z0-9%=+/_-]{0,12}",
            "[A-Za-z0-9+/=]{0,16}",
            "[0-9]{1,22}",
            "%[0-9A-Fa-fg]{0,3}",
        ];
        (prop::sample::select(verbs), prop::collection::vec(field, 0..5), prop::collection::vec(any::<u8>(), 0..2))
            .prop_map(|(verb, fields, junk)| {
                let mut l = verb.as_bytes().to_vec();
                for f in fields {
                    l.push(b' ');
                    l.extend_from_slice(f.as_bytes());
                }
                l.extend_from_slice(&junk);
                l
            })
    }

    /// Every outcome of one line: parse, allowlist in every state, log line; an accepted line
    /// re-serialises to a line that parses to the same message.
    fn check_line(line: &[u8]) -> Result<(), TestCaseError> {
        let parsed = parse_relay_line(line);
        for mode in [Mode::Share, Mode::Restricted, Mode::Tunnel] {
            for brb in [false, true] {
                for welcomed in [false, true] {
                    let verdict = parsed.as_ref().ok().map(|m| allowed(m, mode, brb, welcomed));
                    let log = log_line(&parsed, verdict);
                    prop_assert!(!log.bytes().any(|b| b < 0x20 || b == 0x7f), "raw control byte in log {log:?}");
                }
            }
        }
        match &parsed {
            Ok(m) => {
                let again = parse_relay_line(serialise(m).as_bytes());
                prop_assert_eq!(again.as_ref(), Ok(m));
            }
            Err(d) => {
                prop_assert!(!d.verb.is_empty() && d.verb.len() <= MAX_VERB_REPORT + 3);
                prop_assert!(d.verb.bytes().all(|b| is_token_byte(b) || b == b'?' || b == b'-'));
            }
        }
        Ok(())
    }

    /// Found by `every_message_survives_its_own_line`: `pct_encode` left `~` bare (protocol.md
    /// allows it) but `~` is not a token byte, so a user name with `~` made our line malformed.
    #[test]
    fn client_lines_stay_in_the_token_alphabet() {
        let mut out = Vec::new();
        push_tunnel_open(&mut out, "r1", 22, "a~b c%");
        assert!(out.ends_with(b"\n"));
        assert!(
            out[..out.len() - 1].iter().all(|&b| b == b' ' || is_token_byte(b)),
            "{}",
            String::from_utf8_lossy(&out)
        );
    }

    proptest! {
        #[test]
        fn any_bytes_never_panic(line in prop::collection::vec(any::<u8>(), 0..200)) {
            check_line(&line)?;
        }

        #[test]
        fn lines_near_the_grammar_are_consistent(line in near_line()) {
            check_line(&line)?;
        }

        #[test]
        fn every_message_survives_its_own_line(m in msg()) {
            let line = serialise(&m);
            prop_assert_eq!(parse_relay_line(line.as_bytes()), Ok(m));
        }

        /// The splitter gives the same lines however the stream was cut into reads.
        #[test]
        fn split_reads_give_the_same_lines(
            lines in prop::collection::vec("[ -~]{0,40}", 0..8),
            cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..8),
        ) {
            let stream = lines.iter().map(|l| format!("{l}\n")).collect::<String>().into_bytes();
            let mut at: Vec<usize> = cuts.iter().map(|c| c.index(stream.len() + 1)).collect();
            at.push(0);
            at.push(stream.len());
            at.sort();
            let mut sp = LineSplitter::new();
            let mut got = Vec::new();
            for w in at.windows(2) {
                sp.push(&stream[w[0]..w[1]]);
                while let Some(l) = sp.next_line() {
                    got.push(String::from_utf8(l.expect("short line").to_vec()).unwrap());
                }
            }
            prop_assert_eq!(got, lines);
            prop_assert_eq!(sp.buffered(), 0);
        }
    }
}
