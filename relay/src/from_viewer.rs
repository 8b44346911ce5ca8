//! Lines from a support engineer (the join stream's engineer -> relay table in
//! docs/architecture.md), and the first line that `tunl-relay support` sends on the broker's
//! support socket. Parsed strictly; anything else is dropped and logged by verb and reason.

use tunl_wire as wire;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ViewerMsg {
    K(Vec<u8>),
    Chat(Vec<u8>),
    Note(Vec<u8>),
    Upgrade { req: String, keys: Vec<u8> },
    Revoke,
    Refresh,
    Close { reason: String },
    Ping(u64),
    Pong(u64),
    Bye,
}

/// What a connection on `support.sock` is: a viewer joining (`HELLO role=join ro=0|1`), a
/// one-shot command (`HELLO role=command`: one engineer line, answered `OK`/`ERR`), or a question
/// for `show` (`HELLO role=who`: `VIEWER name=PCT ro=0|1` per viewer, then `OK`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Opening {
    Join { ro: bool },
    Command,
    Who,
}

const MAX_CHAT: usize = 4096;
const MAX_NOTE: usize = 1024;
const MAX_KEYS: usize = 16 * 1024;
const MAX_REASON: usize = 256;

fn payload_verb(v: &str) -> bool {
    matches!(v, "K" | "CHAT" | "NOTE" | "UPGRADE")
}

pub fn parse(line: &[u8]) -> Result<ViewerMsg, wire::Malformed> {
    let l = wire::parse(line, payload_verb)?;
    let bad = |reason| Err(wire::Malformed { verb: l.verb.clone(), reason });
    let n_bare = usize::from(matches!(l.verb.as_str(), "PING" | "PONG"));
    if l.bare.len() != n_bare {
        return bad("wrong number of bare fields");
    }
    let payload = l.payload.clone().unwrap_or_default();
    let text_ok = |max: usize, empty_ok: bool| {
        (empty_ok || !payload.is_empty()) && payload.len() <= max && std::str::from_utf8(&payload).is_ok()
    };
    Ok(match l.verb.as_str() {
        "K" if !payload.is_empty() => ViewerMsg::K(payload),
        "K" => return bad("no keystrokes"),
        "CHAT" if text_ok(MAX_CHAT, false) => ViewerMsg::Chat(payload),
        "CHAT" => return bad("empty, long or not UTF-8"),
        "NOTE" if text_ok(MAX_NOTE, true) => ViewerMsg::Note(payload),
        "NOTE" => return bad("long or not UTF-8"),
        "UPGRADE" => {
            let Some(req) = l.get("req").filter(|r| crate::from_customer::valid_req(r)) else {
                return bad("bad req");
            };
            if payload.is_empty() || payload.len() > MAX_KEYS || std::str::from_utf8(&payload).is_err() {
                return bad("bad keys");
            }
            ViewerMsg::Upgrade { req: req.into(), keys: payload }
        }
        "REVOKE" => ViewerMsg::Revoke,
        "REFRESH" => ViewerMsg::Refresh,
        "CLOSE" => {
            let reason = match l.get("reason") {
                None => String::new(),
                Some(r) => match wire::pct_decode(r).filter(|r| r.len() <= MAX_REASON) {
                    Some(r) => r,
                    None => return bad("bad reason"),
                },
            };
            ViewerMsg::Close { reason }
        }
        "PING" | "PONG" => {
            let Some(n) = wire::parse_u64(&l.bare[0]) else { return bad("bad number") };
            if l.verb == "PING" { ViewerMsg::Ping(n) } else { ViewerMsg::Pong(n) }
        }
        "BYE" => ViewerMsg::Bye,
        _ => return bad("unknown verb"),
    })
}

pub fn parse_opening(line: &[u8]) -> Result<Opening, wire::Malformed> {
    let l = wire::parse(line, |_| false)?;
    let bad = |reason| Err(wire::Malformed { verb: l.verb.clone(), reason });
    if l.verb != "HELLO" || !l.bare.is_empty() {
        return bad("expected HELLO");
    }
    match (l.get("role"), l.get("ro")) {
        (Some("join"), Some("0")) => Ok(Opening::Join { ro: false }),
        (Some("join"), Some("1")) => Ok(Opening::Join { ro: true }),
        (Some("command"), _) => Ok(Opening::Command),
        (Some("who"), _) => Ok(Opening::Who),
        _ => bad("bad role"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(s: &str) -> ViewerMsg {
        parse(s.as_bytes()).unwrap_or_else(|e| panic!("{s}: {e:?}"))
    }

    #[test]
    fn the_table() {
        assert_eq!(ok("K aGk="), ViewerMsg::K(b"hi".to_vec()));
        assert_eq!(ok("CHAT aGk="), ViewerMsg::Chat(b"hi".to_vec()));
        assert_eq!(ok("NOTE"), ViewerMsg::Note(vec![]));
        assert_eq!(ok("NOTE aGk="), ViewerMsg::Note(b"hi".to_vec()));
        assert_eq!(ok("UPGRADE req=a1 aGk="), ViewerMsg::Upgrade { req: "a1".into(), keys: b"hi".to_vec() });
        assert_eq!(ok("REVOKE"), ViewerMsg::Revoke);
        assert_eq!(ok("REFRESH"), ViewerMsg::Refresh);
        assert_eq!(ok("CLOSE reason=all%20done"), ViewerMsg::Close { reason: "all done".into() });
        assert_eq!(ok("CLOSE"), ViewerMsg::Close { reason: String::new() });
        assert_eq!(ok("PING 3"), ViewerMsg::Ping(3));
        assert_eq!(ok("PONG 3"), ViewerMsg::Pong(3));
        assert_eq!(ok("BYE"), ViewerMsg::Bye);
        assert_eq!(parse_opening(b"HELLO role=join ro=1").unwrap(), Opening::Join { ro: true });
        assert_eq!(parse_opening(b"HELLO role=join ro=0").unwrap(), Opening::Join { ro: false });
        assert_eq!(parse_opening(b"HELLO role=command").unwrap(), Opening::Command);
        assert_eq!(parse_opening(b"HELLO role=who").unwrap(), Opening::Who);
    }

    #[test]
    fn strictness() {
        for l in [
            "K",
            "K aGk",
            "CHAT",
            "CHAT /w==",
            "UPGRADE aGk=",
            "UPGRADE req= aGk=",
            "UPGRADE req=a1",
            "CLOSE reason=%zz",
            "PING",
            "PING x",
            "REVOKE now",
            "O aGk=",
            "SNAP size=1x1 aGk=",
            "WELCOME",
            "k aGk=",
            "K aGk= ",
        ] {
            assert!(parse(l.as_bytes()).is_err(), "{l}");
        }
        for l in ["HELLO", "HELLO role=join", "HELLO role=join ro=2", "HELLO role=admin", "JOIN ro=0", "HELLO x"] {
            assert!(parse_opening(l.as_bytes()).is_err(), "{l}");
        }
    }
}
