//! Lines from the customer's client (protocol.md section 3), parsed strictly: the broker acts only on
//! what is in the table, well-formed; everything else is dropped with its verb and reason logged.

use tunl_wire as wire;

/// Most raw bytes in one `O` line (protocol.md section 3).
pub const MAX_O_CHUNK: usize = 32_768;
const MAX_REQ: usize = 64;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CustomerMsg {
    O(Vec<u8>),
    Snap { cols: u16, rows: u16, screen: Vec<u8> },
    Size { cols: u16, rows: u16 },
    Chat(Vec<u8>),
    State { tunnel: String, brb: bool, mode: String },
    TunnelOpen { req: String, port: u16, user: String },
    TunnelRejected { req: String, reason: String },
    TunnelClosed { reason: String },
    Ping(u64),
    Pong(u64),
    Bye { reason: String },
}

fn payload_verb(v: &str) -> bool {
    matches!(v, "O" | "SNAP" | "CHAT")
}

pub fn valid_req(s: &str) -> bool {
    !s.is_empty() && s.len() <= MAX_REQ && wire::is_token(s)
}

fn one_of(s: &str, set: &[&str]) -> bool {
    set.contains(&s)
}

/// Parses one line (without its newline).
pub fn parse(line: &[u8]) -> Result<CustomerMsg, wire::Malformed> {
    let mut l = wire::parse(line, payload_verb)?;
    // Output is most of the traffic: its payload is moved out, never copied.
    let payload = l.payload.take();
    let bad = |reason| Err(wire::Malformed { verb: l.verb.clone(), reason });
    let n_bare = match l.verb.as_str() {
        "SIZE" => 2,
        "PING" | "PONG" => 1,
        _ => 0,
    };
    if l.bare.len() != n_bare {
        return bad("wrong number of bare fields");
    }
    let msg = match l.verb.as_str() {
        "O" => {
            let data = payload.unwrap_or_default();
            if data.is_empty() || data.len() > MAX_O_CHUNK {
                return bad("empty or oversized output");
            }
            CustomerMsg::O(data)
        }
        "SNAP" => {
            let Some((cols, rows)) = l.get("size").and_then(crate::hello::parse_size) else { return bad("bad size") };
            let Some(screen) = payload.filter(|p| !p.is_empty()) else { return bad("no screen") };
            CustomerMsg::Snap { cols, rows, screen }
        }
        "SIZE" => {
            let n = |s: &str| wire::parse_u64(s).filter(|&n| n <= 10_000).map(|n| n as u16);
            let (Some(cols), Some(rows)) = (n(&l.bare[0]), n(&l.bare[1])) else { return bad("bad size") };
            CustomerMsg::Size { cols, rows }
        }
        "CHAT" => {
            let text = payload.unwrap_or_default();
            if text.is_empty() || std::str::from_utf8(&text).is_err() {
                return bad("empty or not UTF-8");
            }
            CustomerMsg::Chat(text)
        }
        "STATE" => {
            let (Some(t), Some(b), Some(m)) = (l.get("tunnel"), l.get("brb"), l.get("mode")) else {
                return bad("missing field");
            };
            if !one_of(t, &["confirm", "allowed", "blocked", "active", "off"])
                || !one_of(b, &["0", "1"])
                || crate::hello::Mode::parse(m).is_none()
            {
                return bad("bad value");
            }
            CustomerMsg::State { tunnel: t.into(), brb: b == "1", mode: m.into() }
        }
        "TUNNEL_OPEN" => {
            let (Some(req), Some(port), Some(user)) = (l.get("req"), l.num("port"), l.get("user")) else {
                return bad("missing field");
            };
            if !valid_req(req) || !(1..=65535).contains(&port) || !wire::is_token(user) {
                return bad("bad value");
            }
            CustomerMsg::TunnelOpen { req: req.into(), port: port as u16, user: user.into() }
        }
        "TUNNEL_REJECTED" => {
            let (Some(req), Some(reason)) = (l.get("req"), l.get("reason")) else { return bad("missing field") };
            if !valid_req(req) || !one_of(reason, &["denied", "blocked", "restricted", "brb", "invalid-key", "error"]) {
                return bad("bad value");
            }
            CustomerMsg::TunnelRejected { req: req.into(), reason: reason.into() }
        }
        "TUNNEL_CLOSED" => {
            let Some(reason) = l.get("reason") else { return bad("missing field") };
            if !one_of(reason, &["revoked", "relay", "ended"]) {
                return bad("bad value");
            }
            CustomerMsg::TunnelClosed { reason: reason.into() }
        }
        "PING" | "PONG" => {
            let Some(n) = wire::parse_u64(&l.bare[0]) else { return bad("bad number") };
            if l.verb == "PING" { CustomerMsg::Ping(n) } else { CustomerMsg::Pong(n) }
        }
        "BYE" => {
            let reason = l.get("reason").unwrap_or("");
            if !one_of(reason, &["customer", "signal", "relay-close"]) {
                return bad("bad value");
            }
            CustomerMsg::Bye { reason: reason.into() }
        }
        _ => return bad("unknown verb"),
    };
    Ok(msg)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(s: &str) -> CustomerMsg {
        parse(s.as_bytes()).unwrap_or_else(|e| panic!("{s}: {e:?}"))
    }

    #[test]
    fn the_table() {
        assert_eq!(ok("O aGk="), CustomerMsg::O(b"hi".to_vec()));
        assert_eq!(ok("SNAP size=80x24 aGk="), CustomerMsg::Snap { cols: 80, rows: 24, screen: b"hi".to_vec() });
        assert_eq!(ok("SIZE 80 24"), CustomerMsg::Size { cols: 80, rows: 24 });
        assert_eq!(ok("CHAT aGk="), CustomerMsg::Chat(b"hi".to_vec()));
        assert_eq!(
            ok("STATE tunnel=confirm brb=0 mode=share"),
            CustomerMsg::State { tunnel: "confirm".into(), brb: false, mode: "share".into() }
        );
        assert_eq!(
            ok("TUNNEL_OPEN req=u1 port=40001 user=root"),
            CustomerMsg::TunnelOpen { req: "u1".into(), port: 40001, user: "root".into() }
        );
        assert_eq!(
            ok("TUNNEL_REJECTED req=u1 reason=denied"),
            CustomerMsg::TunnelRejected { req: "u1".into(), reason: "denied".into() }
        );
        assert_eq!(ok("TUNNEL_CLOSED reason=revoked"), CustomerMsg::TunnelClosed { reason: "revoked".into() });
        assert_eq!(ok("PING 7"), CustomerMsg::Ping(7));
        assert_eq!(ok("PONG 7"), CustomerMsg::Pong(7));
        assert_eq!(ok("BYE reason=customer"), CustomerMsg::Bye { reason: "customer".into() });
        assert_eq!(
            ok("STATE tunnel=off brb=1 mode=restricted future=1").clone(),
            ok("STATE brb=1 tunnel=off mode=restricted")
        );
    }

    #[test]
    fn strictness() {
        let big = format!("O {}", wire::b64(&vec![b'x'; MAX_O_CHUNK + 1]));
        for l in [
            "O",
            big.as_str(),
            "SNAP aGk=",
            "SNAP size=80x24",
            "SIZE 80",
            "SIZE 80 x",
            "SIZE 80 24 1",
            "CHAT",
            "CHAT /w==",
            "STATE tunnel=on brb=0 mode=share",
            "STATE tunnel=off brb=2 mode=share",
            "STATE tunnel=off brb=0",
            "TUNNEL_OPEN req=u1 port=0 user=root",
            "TUNNEL_OPEN req=u1 port=70000 user=root",
            "TUNNEL_OPEN port=1 user=root",
            "TUNNEL_REJECTED req=u1 reason=because",
            "TUNNEL_CLOSED reason=x",
            "PING",
            "PING -1",
            "BYE reason=x",
            "K aGk=",
            "WELCOME proto=1 viewers=0",
            "O aGk=\r",
            "o aGk=",
        ] {
            assert!(parse(l.as_bytes()).is_err(), "{l}");
        }
    }
}
