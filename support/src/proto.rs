//! tunl-support/1 as the engineer's side reads it (docs/architecture.md, "The support wire
//! protocol"): the answers to one-shot commands and the lines of the join stream, parsed strictly
//! into typed values. Pure functions over bytes.
//!
//! Every piece of text in a parsed value (names, host, case, chat, notes, reasons, messages) is
//! already neutralised, so whatever prints it cannot be driven by the customer or the relay. The
//! only raw bytes that leave this module are the shell's own output (`O`, `SNAP`), which only the
//! join view's top pane ever draws.

use tunl_wire::{Line, Malformed, neutralize, parse};

/// The first word of every command string.
pub const VERSION: &str = "tunl-support/1";

/// An `ERR` answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrReply {
    pub code: String,
    pub msg: String,
}

impl ErrReply {
    /// The code in plain words, then the relay's message when it says more.
    pub fn explain(&self) -> String {
        let plain = match self.code.as_str() {
            "unknown-session" => "no such session",
            "expired" => "the session expired",
            "closed" => "the session is closed",
            "not-live" => "the customer is not connected",
            "live" => "the customer is connected: close it instead (tunl close ID)",
            "denied" => "the relay refused this for your account",
            "busy" => "the relay is busy, try again",
            "timeout" => "no answer in time",
            "proto" => "the relay did not understand the request",
            "internal" => "the relay failed internally",
            _ => "",
        };
        match (plain.is_empty(), self.msg.is_empty()) {
            (true, true) => format!("error {}", self.code),
            (true, false) => format!("error {}: {}", self.code, self.msg),
            (false, true) => plain.to_string(),
            (false, false) => format!("{plain} ({})", self.msg),
        }
    }
}

/// One session as `list` and `show` give it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Item {
    pub id: String,
    pub state: String,
    pub host: String,
    pub user: String,
    pub case: String,
    pub customer: String,
    pub viewers: u32,
    pub created: u64,
    pub expires: u64,
    pub port: Option<u16>,
}

impl Item {
    /// A customer is connected (or reconnecting) to it.
    pub fn live(&self) -> bool {
        matches!(self.state.as_str(), "share" | "restricted" | "share+tunnel" | "tunnel")
    }
}

/// An answer line of a one-shot command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    Ok,
    Err(ErrReply),
    Session { id: String, token: String, expires: u64 },
    Item(Item),
    ChatLog { at: u64, from: String, text: String },
    Viewer { name: String, ro: bool },
    Tunnel { port: u16, user: String },
    Rejected { reason: String },
    Audit(String),
}

/// What the relay sent when joining, first line of the stream.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Joined {
    pub id: String,
    pub mode: String,
    pub host: String,
    pub user: String,
    pub case: String,
    pub customer: String,
    pub cols: u16,
    pub rows: u16,
    pub viewers: u32,
    pub ro: bool,
    pub me: String,
}

/// A line of the join stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    Joined(Joined),
    Snap { cols: u16, rows: u16, screen: Vec<u8> },
    Output(Vec<u8>),
    Size { cols: u16, rows: u16 },
    State { tunnel: String, brb: bool, mode: String },
    Note(String),
    Chat { from: String, text: String },
    Viewers { n: u32, names: Vec<String> },
    Link { up: bool },
    TunnelOpen { req: String, port: u16, user: String },
    TunnelRejected { req: String, reason: String },
    TunnelClosed { reason: String },
    Refused { what: String, reason: String },
    Closed { reason: String },
    Ping(u64),
    Pong(u64),
    Err(ErrReply),
}

fn bad(l: &Line, reason: &'static str) -> Malformed {
    Malformed { verb: l.verb.clone(), reason }
}

fn need<'a>(l: &'a Line, key: &str) -> Result<&'a str, Malformed> {
    l.get(key).ok_or_else(|| bad(l, "missing field"))
}

/// A percent-encoded text field, decoded and neutralised. Missing is malformed.
fn text(l: &Line, key: &str) -> Result<String, Malformed> {
    l.text(key).map(|s| neutralize(&s)).ok_or_else(|| bad(l, "missing or badly encoded text"))
}

/// Like [`text`], but an absent field is empty (fields a relay may leave out).
fn opt_text(l: &Line, key: &str) -> Result<String, Malformed> {
    match l.get(key) {
        None => Ok(String::new()),
        Some(_) => text(l, key),
    }
}

fn num(l: &Line, key: &str) -> Result<u64, Malformed> {
    l.num(key).ok_or_else(|| bad(l, "missing or bad number"))
}

fn flag(l: &Line, key: &str) -> Result<bool, Malformed> {
    match need(l, key)? {
        "0" => Ok(false),
        "1" => Ok(true),
        _ => Err(bad(l, "bad flag")),
    }
}

/// A word from a fixed vocabulary (states, modes, reasons): token characters, short.
fn word(l: &Line, key: &str) -> Result<String, Malformed> {
    let v = need(l, key)?;
    if v.is_empty() || v.len() > 64 || !v.bytes().all(|b| b.is_ascii_alphanumeric() || b"+_.-".contains(&b)) {
        return Err(bad(l, "bad word"));
    }
    Ok(v.to_string())
}

fn port(l: &Line, key: &str) -> Result<u16, Malformed> {
    match l.num(key) {
        Some(p) if (1..=65535).contains(&p) => Ok(p as u16),
        _ => Err(bad(l, "bad port")),
    }
}

fn session_id(l: &Line, key: &str) -> Result<String, Malformed> {
    let v = need(l, key)?;
    if crate::cli::valid_session_id(v) { Ok(v.to_string()) } else { Err(bad(l, "bad session id")) }
}

/// `CxR` with both between 1 and 10000.
pub fn parse_size(s: &str) -> Option<(u16, u16)> {
    let (c, r) = s.split_once('x')?;
    let c = tunl_wire::parse_u64(c)?;
    let r = tunl_wire::parse_u64(r)?;
    if (1..=10000).contains(&c) && (1..=10000).contains(&r) { Some((c as u16, r as u16)) } else { None }
}

fn size(l: &Line, key: &str) -> Result<(u16, u16), Malformed> {
    parse_size(need(l, key)?).ok_or_else(|| bad(l, "bad size"))
}

fn payload_text(l: &Line) -> String {
    neutralize(&String::from_utf8_lossy(l.payload.as_deref().unwrap_or_default()))
}

fn req_id(l: &Line) -> Result<String, Malformed> {
    let v = need(l, "req")?;
    if v.is_empty() || v.len() > 64 || !tunl_wire::is_token(v) {
        return Err(bad(l, "bad req"));
    }
    Ok(v.to_string())
}

fn err_reply(l: &Line) -> Result<ErrReply, Malformed> {
    Ok(ErrReply { code: word(l, "code")?, msg: opt_text(l, "msg")? })
}

fn item(l: &Line) -> Result<Item, Malformed> {
    let port = match need(l, "port")? {
        "-" => None,
        _ => Some(port(l, "port")?),
    };
    Ok(Item {
        id: session_id(l, "id")?,
        state: word(l, "state")?,
        host: opt_text(l, "host")?,
        user: opt_text(l, "user")?,
        case: opt_text(l, "case")?,
        customer: opt_text(l, "customer")?,
        viewers: num(l, "viewers")?.min(u32::MAX as u64) as u32,
        created: num(l, "created")?,
        expires: num(l, "expires")?,
        port,
    })
}

fn reply_has_payload(verb: &str) -> bool {
    matches!(verb, "CHATLOG" | "AUDIT")
}

/// One answer line of a one-shot command.
pub fn parse_reply(line: &[u8]) -> Result<Reply, Malformed> {
    let l = parse(line, reply_has_payload)?;
    Ok(match l.verb.as_str() {
        "OK" => Reply::Ok,
        "ERR" => Reply::Err(err_reply(&l)?),
        "SESSION" => {
            let token = need(&l, "token")?;
            if token.len() != 6 || !token.bytes().all(|b| b.is_ascii_digit()) {
                return Err(bad(&l, "bad token"));
            }
            Reply::Session { id: session_id(&l, "id")?, token: token.to_string(), expires: num(&l, "expires")? }
        }
        "ITEM" => Reply::Item(item(&l)?),
        "CHATLOG" => Reply::ChatLog { at: num(&l, "at")?, from: text(&l, "from")?, text: payload_text(&l) },
        "VIEWER" => Reply::Viewer { name: text(&l, "name")?, ro: flag(&l, "ro")? },
        "TUNNEL" => Reply::Tunnel { port: port(&l, "port")?, user: text(&l, "user")? },
        "REJECTED" => Reply::Rejected { reason: word(&l, "reason")? },
        "AUDIT" => Reply::Audit(payload_text(&l)),
        _ => return Err(bad(&l, "unknown verb")),
    })
}

fn event_has_payload(verb: &str) -> bool {
    matches!(verb, "SNAP" | "O" | "NOTE" | "CHAT")
}

fn bare_num(l: &Line, i: usize) -> Result<u64, Malformed> {
    l.bare.get(i).and_then(|s| tunl_wire::parse_u64(s)).ok_or_else(|| bad(l, "missing or bad number"))
}

/// One line of the join stream.
pub fn parse_event(line: &[u8]) -> Result<Event, Malformed> {
    let l = parse(line, event_has_payload)?;
    Ok(match l.verb.as_str() {
        "JOINED" => {
            let (cols, rows) = size(&l, "size")?;
            Event::Joined(Joined {
                id: session_id(&l, "id")?,
                mode: word(&l, "mode")?,
                host: opt_text(&l, "host")?,
                user: opt_text(&l, "user")?,
                case: opt_text(&l, "case")?,
                customer: opt_text(&l, "customer")?,
                cols,
                rows,
                viewers: num(&l, "viewers")?.min(u32::MAX as u64) as u32,
                ro: flag(&l, "ro")?,
                me: opt_text(&l, "me")?,
            })
        }
        "SNAP" => {
            let (cols, rows) = size(&l, "size")?;
            Event::Snap { cols, rows, screen: l.payload.unwrap_or_default() }
        }
        "O" => match l.payload {
            Some(p) if !p.is_empty() => Event::Output(p),
            _ => return Err(bad(&l, "empty output")),
        },
        "SIZE" => {
            let (c, r) = (bare_num(&l, 0)?, bare_num(&l, 1)?);
            if !(1..=10000).contains(&c) || !(1..=10000).contains(&r) || l.bare.len() != 2 {
                return Err(bad(&l, "bad size"));
            }
            Event::Size { cols: c as u16, rows: r as u16 }
        }
        "STATE" => Event::State { tunnel: word(&l, "tunnel")?, brb: flag(&l, "brb")?, mode: word(&l, "mode")? },
        "NOTE" => Event::Note(payload_text(&l)),
        "CHAT" => {
            if l.payload.as_deref().is_none_or(|p| p.is_empty()) {
                return Err(bad(&l, "empty chat"));
            }
            Event::Chat { from: text(&l, "from")?, text: payload_text(&l) }
        }
        "VIEWERS" => {
            let n = bare_num(&l, 0)?.min(u32::MAX as u64) as u32;
            let names = opt_text(&l, "names")?;
            // The names travel as one percent-encoded value; a comma inside a name arrives as
            // `%2C` in the encoded form but as `,` here, which only makes a name look like two.
            let names = if names.is_empty() { Vec::new() } else { names.split(',').map(str::to_string).collect() };
            Event::Viewers { n, names }
        }
        "LINK" => match need(&l, "state")? {
            "up" => Event::Link { up: true },
            "down" => Event::Link { up: false },
            _ => return Err(bad(&l, "bad link state")),
        },
        "TUNNEL_OPEN" => Event::TunnelOpen { req: req_id(&l)?, port: port(&l, "port")?, user: text(&l, "user")? },
        "TUNNEL_REJECTED" => Event::TunnelRejected { req: req_id(&l)?, reason: word(&l, "reason")? },
        "TUNNEL_CLOSED" => Event::TunnelClosed { reason: word(&l, "reason")? },
        "REFUSED" => Event::Refused { what: word(&l, "what")?, reason: word(&l, "reason")? },
        "CLOSED" => Event::Closed { reason: opt_text(&l, "reason")? },
        "PING" => Event::Ping(bare_num(&l, 0)?),
        "PONG" => Event::Pong(bare_num(&l, 0)?),
        "ERR" => Event::Err(err_reply(&l)?),
        _ => return Err(bad(&l, "unknown verb")),
    })
}

/// The command string for one request: `tunl-support/1 VERB key=value... [B64]`, no newline.
pub fn command(verb: &str, fields: &[(&str, &str)], payload: Option<&[u8]>) -> String {
    let mut l = tunl_wire::line(verb, fields, payload);
    l.pop();
    format!("{VERSION} {}", String::from_utf8(l).unwrap_or_default())
}

/// A line the engineer sends on the join stream, with its newline.
pub fn send(verb: &str, fields: &[(&str, &str)], payload: Option<&[u8]>) -> Vec<u8> {
    tunl_wire::line(verb, fields, payload)
}

/// Plain words for a rejection reason.
pub fn rejected_words(reason: &str) -> String {
    match reason {
        "denied" => "the customer denied the tunnel".into(),
        "blocked" => "the customer blocks tunnel requests".into(),
        "restricted" => "the session is watch-only (restricted): no tunnel".into(),
        "brb" => "the customer is away (BRB); ask again when they are back".into(),
        "invalid-key" => "the customer's side refused the key (plain ssh public keys only)".into(),
        "error" => "the customer's side could not show the request".into(),
        "timeout" => "the customer did not answer in time".into(),
        "offline" => "the customer is not connected right now".into(),
        r => format!("the tunnel was refused ({r})"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tunl_wire::b64;

    const ID: &str = "swift-fox-jumps-barrel";

    #[test]
    fn replies() {
        assert_eq!(parse_reply(b"OK"), Ok(Reply::Ok));
        assert_eq!(
            parse_reply(b"ERR code=unknown-session msg=no%20such"),
            Ok(Reply::Err(ErrReply { code: "unknown-session".into(), msg: "no such".into() }))
        );
        assert_eq!(
            parse_reply(format!("SESSION id={ID} token=012345 expires=1700000000").as_bytes()),
            Ok(Reply::Session { id: ID.into(), token: "012345".into(), expires: 1700000000 })
        );
        let it = parse_reply(
            format!("ITEM id={ID} state=share+tunnel host=db1 user=root case=CASE-4711 customer=ACME%20Inc viewers=2 created=10 expires=20 port=40001 new=ignored").as_bytes(),
        )
        .unwrap();
        let Reply::Item(it) = it else { panic!() };
        assert_eq!(it.customer, "ACME Inc");
        assert_eq!(it.port, Some(40001));
        assert!(it.live());
        let it = parse_reply(
            format!("ITEM id={ID} state=pending host= user= case= customer= viewers=0 created=10 expires=20 port=-")
                .as_bytes(),
        );
        assert!(matches!(it, Ok(Reply::Item(Item { port: None, .. }))));
        assert_eq!(
            parse_reply(format!("CHATLOG at=5 from=customer {}", b64(b"hi\x1b[2J")).as_bytes()),
            Ok(Reply::ChatLog { at: 5, from: "customer".into(), text: "hi^[[2J".into() })
        );
        assert_eq!(parse_reply(b"VIEWER name=alice ro=1"), Ok(Reply::Viewer { name: "alice".into(), ro: true }));
        assert_eq!(parse_reply(b"TUNNEL port=40001 user=root"), Ok(Reply::Tunnel { port: 40001, user: "root".into() }));
        assert_eq!(parse_reply(b"REJECTED reason=denied"), Ok(Reply::Rejected { reason: "denied".into() }));
        assert_eq!(
            parse_reply(format!("AUDIT {}", b64(b"{\"a\":1}")).as_bytes()),
            Ok(Reply::Audit("{\"a\":1}".into()))
        );
    }

    #[test]
    fn replies_strict() {
        for l in [
            "OKAY",
            "ERR msg=x",
            "ERR code=a%20b",
            "SESSION id=a-b-c token=123456 expires=1",
            &format!("SESSION id={ID} token=12345 expires=1"),
            &format!("SESSION id={ID} token=123456 expires=-1"),
            &format!("ITEM id={ID} state=share host= user= case= customer= viewers=0 created=1 expires=2 port=0"),
            &format!("ITEM id={ID} state=share host= user= case= customer= viewers=0 created=1 expires=2 port=70000"),
            &format!("ITEM id={ID} state=share host=%zz user= case= customer= viewers=0 created=1 expires=2 port=-"),
            &format!("ITEM id={ID} state=share host= viewers=0 created=1 expires=2"),
            "VIEWER name=a ro=2",
            "TUNNEL port=x user=root",
            "CHATLOG at=1 from=a !!",
            "ITEM\r",
        ] {
            assert!(parse_reply(l.as_bytes()).is_err(), "{l}");
        }
    }

    #[test]
    fn join_stream() {
        let j = parse_event(
            format!(
                "JOINED id={ID} mode=share host=db1 user=root case=4711 customer= size=120x40 viewers=2 ro=0 me=alice"
            )
            .as_bytes(),
        )
        .unwrap();
        let Event::Joined(j) = j else { panic!() };
        assert_eq!((j.cols, j.rows, j.ro, j.me.as_str()), (120, 40, false, "alice"));
        assert_eq!(
            parse_event(format!("SNAP size=80x24 {}", b64(b"\x1b[1mhi")).as_bytes()),
            Ok(Event::Snap { cols: 80, rows: 24, screen: b"\x1b[1mhi".to_vec() })
        );
        assert_eq!(parse_event(format!("O {}", b64(b"\x1b[2J")).as_bytes()), Ok(Event::Output(b"\x1b[2J".to_vec())));
        assert_eq!(parse_event(b"SIZE 100 30"), Ok(Event::Size { cols: 100, rows: 30 }));
        assert_eq!(
            parse_event(b"STATE tunnel=confirm brb=1 mode=share"),
            Ok(Event::State { tunnel: "confirm".into(), brb: true, mode: "share".into() })
        );
        assert_eq!(parse_event(b"NOTE"), Ok(Event::Note(String::new())));
        assert_eq!(
            parse_event(format!("CHAT from=customer {}", b64("hé\u{202e}\u{7}".as_bytes())).as_bytes()),
            Ok(Event::Chat { from: "customer".into(), text: "hé\u{FFFD}^G".into() })
        );
        assert_eq!(
            parse_event(b"VIEWERS 2 names=alice%2Cbob"),
            Ok(Event::Viewers { n: 2, names: vec!["alice".into(), "bob".into()] })
        );
        assert_eq!(parse_event(b"VIEWERS 0"), Ok(Event::Viewers { n: 0, names: vec![] }));
        assert_eq!(parse_event(b"LINK state=down"), Ok(Event::Link { up: false }));
        assert_eq!(
            parse_event(b"TUNNEL_OPEN req=e1 port=40001 user=root"),
            Ok(Event::TunnelOpen { req: "e1".into(), port: 40001, user: "root".into() })
        );
        assert_eq!(
            parse_event(b"TUNNEL_REJECTED req=e1 reason=denied"),
            Ok(Event::TunnelRejected { req: "e1".into(), reason: "denied".into() })
        );
        assert_eq!(parse_event(b"TUNNEL_CLOSED reason=revoked"), Ok(Event::TunnelClosed { reason: "revoked".into() }));
        assert_eq!(
            parse_event(b"REFUSED what=K reason=read-only"),
            Ok(Event::Refused { what: "K".into(), reason: "read-only".into() })
        );
        assert_eq!(parse_event(b"CLOSED reason=bye%1B%5B2J"), Ok(Event::Closed { reason: "bye^[[2J".into() }));
        assert_eq!(parse_event(b"PING 7"), Ok(Event::Ping(7)));
        assert_eq!(parse_event(b"PONG 8"), Ok(Event::Pong(8)));
        assert!(matches!(parse_event(b"ERR code=not-live msg="), Ok(Event::Err(_))));
    }

    #[test]
    fn join_stream_strict() {
        for l in [
            "K aGk=",
            "O",
            "SNAP size=0x24 aGk=",
            "SNAP size=80 aGk=",
            "SIZE 80",
            "SIZE 80 24 1",
            "SIZE 80 0",
            "STATE tunnel=a%20b brb=0 mode=share",
            "STATE tunnel=active brb=yes mode=share",
            "CHAT from=x",
            "LINK state=sideways",
            "TUNNEL_OPEN req=e1 port=0 user=root",
            "TUNNEL_OPEN req= port=1 user=root",
            "PING -1",
            "JOINED id=x mode=share size=80x24 viewers=1 ro=0",
            "O aGk=\r",
            "O aGk=  ",
        ] {
            assert!(parse_event(l.as_bytes()).is_err(), "{l}");
        }
    }

    #[test]
    fn commands_are_one_token_line() {
        assert_eq!(command("list", &[], None), "tunl-support/1 list");
        assert_eq!(
            command("create", &[("case", "a%20b"), ("restricted", "0")], None),
            "tunl-support/1 create case=a%20b restricted=0"
        );
        assert_eq!(command("chat", &[("id", ID)], Some(b"hi")), format!("tunl-support/1 chat id={ID} aGk="));
        assert_eq!(send("K", &[], Some(b"ls\r")), b"K bHMN\n");
    }

    #[test]
    fn err_words() {
        let e = ErrReply { code: "unknown-session".into(), msg: String::new() };
        assert_eq!(e.explain(), "no such session");
        let e = ErrReply { code: "weird".into(), msg: "x".into() };
        assert_eq!(e.explain(), "error weird: x");
    }
}
