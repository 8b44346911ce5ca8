//! The customer's hello (protocol.md section 2), as `produce` reads it from `SSH_ORIGINAL_COMMAND`
//! and the broker reads it again from `produce`: every field checked, the first problem named.
//!
//! Where the contract is silent: `host` and `user` are non-empty tokens without `,`; `ips` is empty
//! or a comma-separated list of at most 32 IPv4/IPv6 addresses; `case` and `client` decode as
//! percent-encoded UTF-8 (`client` non-empty), at most 256 bytes decoded; `size` is `CxR` with both
//! numbers in 0..=10000 (`0x0` without tmux); unknown `key=value` fields are ignored, a bare token
//! is refused.

use tunl_wire as wire;

pub const PROTO: &str = "linbit-tunl/1";
const MAX_IPS: usize = 32;
const MAX_TEXT: usize = 256;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Share,
    Restricted,
    Tunnel,
}

impl Mode {
    pub fn parse(s: &str) -> Option<Mode> {
        Some(match s {
            "share" => Mode::Share,
            "restricted" => Mode::Restricted,
            "tunnel" => Mode::Tunnel,
            _ => return None,
        })
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Share => "share",
            Mode::Restricted => "restricted",
            Mode::Tunnel => "tunnel",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hello {
    pub id: String,
    pub mode: Mode,
    pub host: String,
    pub user: String,
    pub ips: Vec<String>,
    pub case: String,
    pub client: String,
    pub cols: u16,
    pub rows: u16,
    pub resume: bool,
}

/// Why a hello was refused: the `ERROR code=...` to answer and a message for the customer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refused {
    pub code: &'static str,
    pub msg: String,
}

fn proto(msg: impl Into<String>) -> Refused {
    Refused { code: "proto", msg: msg.into() }
}

/// Four lowercase ASCII words joined by single hyphens (the client's own rule).
pub fn valid_session_id(s: &str) -> bool {
    let words: Vec<&str> = s.split('-').collect();
    words.len() == 4
        && words.iter().all(|w| !w.is_empty() && w.len() <= 32 && w.bytes().all(|b| b.is_ascii_lowercase()))
}

/// `CxR`, both decimal and at most 10000.
pub fn parse_size(s: &str) -> Option<(u16, u16)> {
    let (c, r) = s.split_once('x')?;
    let c = wire::parse_u64(c).filter(|&n| n <= 10_000)?;
    let r = wire::parse_u64(r).filter(|&n| n <= 10_000)?;
    Some((c as u16, r as u16))
}

fn name_token(s: &str) -> bool {
    wire::is_token(s) && !s.contains(',') && s.len() <= 255
}

/// Parses the SSH command string.
pub fn parse(cmd: &str) -> Result<Hello, Refused> {
    let (version, rest) = cmd.split_once(' ').unwrap_or((cmd, ""));
    if version != PROTO {
        if version.starts_with("linbit-tunl/") {
            return Err(proto(format!(
                "protocol version {} is not served here; this relay speaks {PROTO}",
                shown(version)
            )));
        }
        return Err(proto(format!("expected a {PROTO} hello")));
    }
    if rest.is_empty() {
        return Err(proto("the hello has no fields"));
    }
    // The fields follow the framing rules of any line; a verb placeholder makes it one.
    let line = format!("HELLO {rest}");
    let l = wire::parse(line.as_bytes(), |_| false).map_err(|m| proto(format!("malformed hello: {}", m.reason)))?;
    if let Some(b) = l.bare.first() {
        return Err(proto(format!("unexpected field '{}' in the hello", shown(b))));
    }
    let field = |k: &'static str| l.get(k).ok_or_else(|| proto(format!("the hello lacks {k}=")));
    let id = field("id")?;
    if !valid_session_id(id) {
        return Err(proto("id= is not a session ID (four lowercase words joined by hyphens)"));
    }
    let mode = Mode::parse(field("mode")?).ok_or_else(|| proto("mode= must be share, restricted or tunnel"))?;
    let host = field("host")?;
    if !name_token(host) {
        return Err(proto("host= is empty or not a plain name"));
    }
    let user = field("user")?;
    if !name_token(user) {
        return Err(proto("user= is empty or not a plain name"));
    }
    let ips_raw = field("ips")?;
    let mut ips = Vec::new();
    if !ips_raw.is_empty() {
        for ip in ips_raw.split(',') {
            if ip.parse::<std::net::IpAddr>().is_err() {
                return Err(proto(format!("ips= holds '{}', which is not an IP address", shown(ip))));
            }
            ips.push(ip.to_string());
        }
        if ips.len() > MAX_IPS {
            return Err(proto(format!("ips= lists more than {MAX_IPS} addresses")));
        }
    }
    let case = wire::pct_decode(field("case")?)
        .filter(|c| c.len() <= MAX_TEXT)
        .ok_or_else(|| proto("case= is not percent-encoded text of at most 256 bytes"))?;
    let client = wire::pct_decode(field("client")?)
        .filter(|c| !c.is_empty() && c.len() <= MAX_TEXT)
        .ok_or_else(|| proto("client= is not a percent-encoded version"))?;
    let (cols, rows) = parse_size(field("size")?).ok_or_else(|| proto("size= must be COLSxROWS"))?;
    let resume = match field("resume")? {
        "0" => false,
        "1" => true,
        _ => return Err(proto("resume= must be 0 or 1")),
    };
    Ok(Hello {
        id: id.to_string(),
        mode,
        host: host.to_string(),
        user: user.to_string(),
        ips,
        case,
        client,
        cols,
        rows,
        resume,
    })
}

/// Untrusted text echoed in an error message: token bytes only, short.
fn shown(s: &str) -> String {
    let mut v: String =
        s.chars().take(40).map(|c| if c.is_ascii() && wire::is_token_byte(c as u8) { c } else { '?' }).collect();
    if s.chars().count() > 40 {
        v.push_str("...");
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "linbit-tunl/1 id=swift-fox-jumps-barrel mode=share host=node1 user=root \
                        ips=192.0.2.2,2001:db8::1 case=Case%204711%3A%20%7Edisk client=0.1.0 size=120x40 resume=0";

    #[test]
    fn accepts_the_clients_hello() {
        let h = parse(GOOD).unwrap();
        assert_eq!(h.id, "swift-fox-jumps-barrel");
        assert_eq!(h.mode, Mode::Share);
        assert_eq!((h.host.as_str(), h.user.as_str()), ("node1", "root"));
        assert_eq!(h.ips, ["192.0.2.2", "2001:db8::1"]);
        assert_eq!(h.case, "Case 4711: ~disk");
        assert_eq!((h.cols, h.rows, h.resume), (120, 40, false));
        let h =
            parse("linbit-tunl/1 id=a-b-c-d mode=tunnel host=h user=u ips= case= client=1 size=0x0 resume=1 future=x")
                .unwrap();
        assert!(h.ips.is_empty() && h.case.is_empty() && h.resume && h.mode == Mode::Tunnel);
    }

    #[test]
    fn every_field_wrong_is_named() {
        let cases = [
            ("", "expected a linbit-tunl/1 hello"),
            ("linbit-tunl/2 id=a-b-c-d", "version"),
            ("ls -la", "expected"),
            ("linbit-tunl/1", "no fields"),
            ("linbit-tunl/1 id=a-b-c-d  mode=share", "malformed"),
            ("linbit-tunl/1 id=a-b-c-d\n", "malformed"),
            ("linbit-tunl/1 id=a-b-c-d id=a-b-c-d", "malformed"),
        ];
        for (h, want) in cases {
            let e = parse(h).unwrap_err();
            assert_eq!(e.code, "proto");
            assert!(e.msg.contains(want), "{h:?}: {}", e.msg);
        }
        // One field wrong at a time, from the good hello.
        let wrong = [
            ("id=swift-fox-jumps-barrel", "id=Swift-fox-jumps-barrel", "id="),
            ("id=swift-fox-jumps-barrel", "id=swift-fox-jumps", "id="),
            ("mode=share", "mode=admin", "mode="),
            ("host=node1", "host=a,b", "host="),
            ("host=node1", "host=", "host="),
            ("user=root", "user=", "user="),
            ("ips=192.0.2.2,2001:db8::1", "ips=192.0.2.300", "ips="),
            ("ips=192.0.2.2,2001:db8::1", "ips=1.2.3.4,,", "ips="),
            ("case=Case%204711%3A%20%7Edisk", "case=%ZZ", "case="),
            ("case=Case%204711%3A%20%7Edisk", "case=%FF", "case="),
            ("client=0.1.0", "client=", "client="),
            ("size=120x40", "size=120", "size="),
            ("size=120x40", "size=99999x1", "size="),
            ("size=120x40", "size=-1x2", "size="),
            ("resume=0", "resume=yes", "resume="),
            ("resume=0", "resume=0 stray", "unexpected field"),
        ];
        for (from, to, want) in wrong {
            let h = GOOD.replace(from, to);
            let e = parse(&h).unwrap_err();
            assert!(e.msg.contains(want), "{to}: {}", e.msg);
        }
        for k in ["id", "mode", "host", "user", "ips", "case", "client", "size", "resume"] {
            let h: Vec<&str> = GOOD.split(' ').filter(|f| !f.starts_with(&format!("{k}="))).collect();
            let e = parse(&h.join(" ")).unwrap_err();
            assert_eq!(e.msg, format!("the hello lacks {k}="));
        }
        let big_case = format!("case={}", "a".repeat(300));
        assert!(parse(&GOOD.replace("case=Case%204711%3A%20%7Edisk", &big_case)).is_err());
    }

    #[test]
    fn messages_never_echo_control_bytes() {
        let e = parse("linbit-tunl/\u{1b}[2J x").unwrap_err();
        assert!(!e.msg.contains('\u{1b}'), "{}", e.msg);
    }
}
