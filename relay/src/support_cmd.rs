//! The engineer's command (`tunl-support/1 VERB field...`, docs/architecture.md "Commands"), as
//! `tunl-relay support` reads it from `SSH_ORIGINAL_COMMAND`: parsed strictly, the first problem
//! named in the `ERR code=proto` answer.
//!
//! Where the contract is silent: `expires` is 1..=43200 minutes (30 days); `expect`'s timeout
//! 1..=3600 s; `case`, `customer` and `reason` decode to at most 256 bytes; chat is 1..=4096 bytes
//! of UTF-8, a note 0..=1024 (empty clears it); upgrade keys are 1..=16384 bytes, one or more
//! `ALGO BASE64 [comment]` lines of plain public keys (the client validates them again).

use tunl_wire as wire;

pub const VERSION: &str = "tunl-support/1";

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SupportCmd {
    Create { case: String, customer: String, expires_min: u64, restricted: bool },
    List,
    Show { id: String },
    Close { id: String, reason: String },
    Cancel { id: String },
    Chat { id: String, text: Vec<u8> },
    Note { id: String, text: Vec<u8> },
    Upgrade { id: String, keys: Vec<u8> },
    Revoke { id: String },
    Expect { id: String, timeout: u64 },
    Log { id: String },
    Join { id: String, ro: bool },
}

impl SupportCmd {
    pub fn verb(&self) -> &'static str {
        match self {
            SupportCmd::Create { .. } => "create",
            SupportCmd::List => "list",
            SupportCmd::Show { .. } => "show",
            SupportCmd::Close { .. } => "close",
            SupportCmd::Cancel { .. } => "cancel",
            SupportCmd::Chat { .. } => "chat",
            SupportCmd::Note { .. } => "note",
            SupportCmd::Upgrade { .. } => "upgrade",
            SupportCmd::Revoke { .. } => "revoke",
            SupportCmd::Expect { .. } => "expect",
            SupportCmd::Log { .. } => "log",
            SupportCmd::Join { .. } => "join",
        }
    }
}

const MAX_TEXT: usize = 256;
const MAX_CHAT: usize = 4096;
const MAX_NOTE: usize = 1024;
const MAX_KEYS: usize = 16 * 1024;
const KEY_ALGOS: &[&str] = &[
    "ssh-ed25519",
    "ssh-rsa",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
    "sk-ssh-ed25519@openssh.com",
    "sk-ecdsa-sha2-nistp256@openssh.com",
];

/// Plain public-key lines only: no options, a known algorithm, base64 key data.
pub fn valid_keys(keys: &[u8]) -> bool {
    let Ok(text) = std::str::from_utf8(keys) else { return false };
    let mut n = 0;
    for l in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let mut f = l.split_ascii_whitespace();
        let (Some(algo), Some(data)) = (f.next(), f.next()) else { return false };
        if !KEY_ALGOS.contains(&algo) || wire::b64_decode(data).is_none_or(|d| d.len() < 16) {
            return false;
        }
        if l.chars().any(|c| c.is_control()) {
            return false;
        }
        n += 1;
    }
    n > 0
}

pub fn parse(cmd: &str) -> Result<SupportCmd, String> {
    let (version, rest) = cmd.split_once(' ').unwrap_or((cmd, ""));
    if version != VERSION {
        return Err(if version.starts_with("tunl-support/") {
            format!("this relay speaks {VERSION}")
        } else {
            format!("expected a {VERSION} command")
        });
    }
    let (verb, fields) = rest.split_once(' ').unwrap_or((rest, ""));
    if verb.is_empty() || !verb.bytes().all(|b| b.is_ascii_lowercase()) {
        return Err("no command verb".into());
    }
    let payload = matches!(verb, "chat" | "note" | "upgrade");
    let line = if fields.is_empty() { "CMD".to_string() } else { format!("CMD {fields}") };
    // An empty payload is left out (`note id=SID` clears the note), so a last field that is not
    // base64 but a `key=value` means "no payload" (a session ID's `-` is never base64).
    let l = match wire::parse(line.as_bytes(), |_| payload) {
        Err(m) if payload && m.reason == "bad base64" => {
            let mut l =
                wire::parse(line.as_bytes(), |_| false).map_err(|m| format!("malformed command: {}", m.reason))?;
            l.payload = Some(Vec::new());
            l
        }
        r => r.map_err(|m| format!("malformed command: {}", m.reason))?,
    };
    if !l.bare.is_empty() {
        return Err("unexpected bare field".into());
    }
    let id = || -> Result<String, String> {
        let id = l.get("id").ok_or("missing id=")?;
        if !crate::hello::valid_session_id(id) {
            return Err("id= is not a session ID".into());
        }
        Ok(id.to_string())
    };
    let text = |k: &str, required: bool| -> Result<String, String> {
        match l.get(k) {
            None if !required => Ok(String::new()),
            None => Err(format!("missing {k}=")),
            Some(v) => wire::pct_decode(v)
                .filter(|t| t.len() <= MAX_TEXT)
                .ok_or_else(|| format!("{k}= is not percent-encoded text of at most {MAX_TEXT} bytes")),
        }
    };
    let number = |k: &str, max: u64| -> Result<u64, String> {
        l.num(k).filter(|n| (1..=max).contains(n)).ok_or_else(|| format!("{k}= must be a number from 1 to {max}"))
    };
    let flag = |k: &str| -> Result<bool, String> {
        match l.get(k) {
            Some("0") => Ok(false),
            Some("1") => Ok(true),
            _ => Err(format!("{k}= must be 0 or 1")),
        }
    };
    let body = l.payload.clone().unwrap_or_default();
    Ok(match verb {
        "create" => SupportCmd::Create {
            case: text("case", false)?,
            customer: text("customer", false)?,
            expires_min: number("expires", 43_200)?,
            restricted: flag("restricted")?,
        },
        "list" => SupportCmd::List,
        "show" => SupportCmd::Show { id: id()? },
        "close" => SupportCmd::Close { id: id()?, reason: text("reason", false)? },
        "cancel" => SupportCmd::Cancel { id: id()? },
        "chat" => {
            if body.is_empty() || body.len() > MAX_CHAT || std::str::from_utf8(&body).is_err() {
                return Err(format!("chat text must be 1 to {MAX_CHAT} bytes of UTF-8"));
            }
            SupportCmd::Chat { id: id()?, text: body }
        }
        "note" => {
            if body.len() > MAX_NOTE || std::str::from_utf8(&body).is_err() {
                return Err(format!("a note must be at most {MAX_NOTE} bytes of UTF-8"));
            }
            SupportCmd::Note { id: id()?, text: body }
        }
        "upgrade" => {
            if body.len() > MAX_KEYS || !valid_keys(&body) {
                return Err("upgrade needs plain public key lines (ALGO BASE64 [comment])".into());
            }
            SupportCmd::Upgrade { id: id()?, keys: body }
        }
        "revoke" => SupportCmd::Revoke { id: id()? },
        "expect" => SupportCmd::Expect { id: id()?, timeout: number("timeout", 3600)? },
        "log" => SupportCmd::Log { id: id()? },
        "join" => SupportCmd::Join { id: id()?, ro: flag("ro")? },
        _ => return Err("unknown command verb".into()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "swift-fox-jumps-barrel";
    const KEY: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl alice@desk";

    fn ok(s: &str) -> SupportCmd {
        parse(s).unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    #[test]
    fn every_verb() {
        assert_eq!(
            ok("tunl-support/1 create case=CASE-1 customer=ACME%20Inc expires=60 restricted=1"),
            SupportCmd::Create {
                case: "CASE-1".into(),
                customer: "ACME Inc".into(),
                expires_min: 60,
                restricted: true
            }
        );
        assert_eq!(ok("tunl-support/1 list"), SupportCmd::List);
        assert_eq!(ok(&format!("tunl-support/1 show id={ID}")), SupportCmd::Show { id: ID.into() });
        assert_eq!(
            ok(&format!("tunl-support/1 close id={ID} reason=done")),
            SupportCmd::Close { id: ID.into(), reason: "done".into() }
        );
        assert_eq!(ok(&format!("tunl-support/1 cancel id={ID}")), SupportCmd::Cancel { id: ID.into() });
        assert_eq!(
            ok(&format!("tunl-support/1 chat id={ID} aGk=")),
            SupportCmd::Chat { id: ID.into(), text: b"hi".to_vec() }
        );
        assert_eq!(ok(&format!("tunl-support/1 note id={ID}")), SupportCmd::Note { id: ID.into(), text: vec![] });
        assert_eq!(
            ok(&format!("tunl-support/1 upgrade id={ID} {}", wire::b64(KEY.as_bytes()))),
            SupportCmd::Upgrade { id: ID.into(), keys: KEY.as_bytes().to_vec() }
        );
        assert_eq!(ok(&format!("tunl-support/1 revoke id={ID}")), SupportCmd::Revoke { id: ID.into() });
        assert_eq!(
            ok(&format!("tunl-support/1 expect id={ID} timeout=30")),
            SupportCmd::Expect { id: ID.into(), timeout: 30 }
        );
        assert_eq!(ok(&format!("tunl-support/1 log id={ID}")), SupportCmd::Log { id: ID.into() });
        assert_eq!(ok(&format!("tunl-support/1 join id={ID} ro=1")), SupportCmd::Join { id: ID.into(), ro: true });
        // Unknown fields are ignored.
        assert_eq!(ok(&format!("tunl-support/1 log id={ID} future=1")), SupportCmd::Log { id: ID.into() });
    }

    #[test]
    fn strictness() {
        let key = wire::b64(KEY.as_bytes());
        for (c, want) in [
            ("", "expected"),
            ("bash -i", "expected"),
            ("tunl-support/2 list", "speaks"),
            ("tunl-support/1", "verb"),
            ("tunl-support/1 LIST", "verb"),
            ("tunl-support/1 rm", "unknown"),
            ("tunl-support/1 show", "missing id="),
            ("tunl-support/1 show id=../../etc", "session ID"),
            ("tunl-support/1 show id=a-b-c", "session ID"),
            ("tunl-support/1 list  x", "malformed"),
            ("tunl-support/1 list x", "bare"),
            ("tunl-support/1 list\n", "verb"),
            ("tunl-support/1 create case=a expires=0 restricted=0", "expires="),
            ("tunl-support/1 create case=a expires=99999 restricted=0", "expires="),
            ("tunl-support/1 create case=%zz expires=5 restricted=0", "case="),
            ("tunl-support/1 create expires=5", "restricted="),
            (&format!("tunl-support/1 chat id={ID}"), "chat text"),
            (&format!("tunl-support/1 chat id={ID} !!"), "malformed"),
            (&format!("tunl-support/1 chat id={ID} aGk"), "bare"),
            (&format!("tunl-support/1 upgrade id={ID} aGk="), "public key"),
            (
                &format!("tunl-support/1 upgrade id={ID} {}", wire::b64(format!("command=\"x\" {KEY}").as_bytes())),
                "public key",
            ),
            (&format!("tunl-support/1 expect id={ID} timeout=x"), "timeout="),
            (&format!("tunl-support/1 join id={ID}"), "ro="),
            (&format!("tunl-support/1 join id={ID} ro=1 id={ID}"), "malformed"),
            (&format!("tunl-support/1 upgrade {key}"), "missing id="),
        ] {
            let e = parse(c).unwrap_err();
            assert!(e.contains(want), "{c:?}: {e}");
        }
    }
}
