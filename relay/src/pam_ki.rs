//! `tunl-relay pam-ki`: the keyboard-interactive check of the relay's sshd instance, run by
//! `pam_exec expose_authtok` as root. The answer (the secret, then a NUL) arrives on stdin, never
//! on a command line. Accepted: the ID of a pending or live session, or the unspent token of one
//! (which is spent). Exit 0 accepts, anything else refuses.

use std::io::Read;
use std::time::Duration;

use crate::layout::{Config, Layout};
use crate::log;
use crate::registry::{Registry, Sqlite, Standing, is_session_id, is_token};

/// The longest answer read: a session ID is at most 4 x 32 letters and 3 hyphens.
const MAX_ANSWER: u64 = 256;

/// What an answer is, before the registry is asked (pure, tested).
#[derive(Debug, PartialEq, Eq)]
pub enum Answer {
    SessionId(String),
    Token(String),
    Malformed,
}

pub fn classify(raw: &[u8]) -> Answer {
    let end = raw.iter().position(|&b| b == 0).unwrap_or(raw.len());
    let Ok(s) = std::str::from_utf8(&raw[..end]) else { return Answer::Malformed };
    // askpass prints the answer with a newline; PAM hands it over as typed.
    let s = s.strip_suffix('\n').unwrap_or(s);
    if is_session_id(s) {
        Answer::SessionId(s.to_string())
    } else if is_token(s) {
        Answer::Token(s.to_string())
    } else {
        Answer::Malformed
    }
}

/// Runs the check; returns the exit status for pam_exec.
pub fn pam_ki(layout: &Layout) -> u8 {
    // pam_exec also runs for the account, session and setcred phases (no secret then): nothing to check.
    if std::env::var("PAM_TYPE").is_ok_and(|t| t != "auth") {
        return 0;
    }
    log::use_syslog();
    let rhost = std::env::var("PAM_RHOST").unwrap_or_default();
    let user = std::env::var("PAM_USER").unwrap_or_default();
    let cfg = match Config::load(layout) {
        Ok(c) => c,
        Err(e) => {
            log::warn("ki-refused", &[("why", &e.to_string())]);
            return 1;
        }
    };
    if user != cfg.customer_user {
        log::warn("ki-refused", &[("why", "not the customers' account"), ("user", &user), ("rhost", &rhost)]);
        return 1;
    }
    let mut raw = Vec::new();
    let _ = std::io::stdin().take(MAX_ANSWER).read_to_end(&mut raw);
    // Which connection this is, before a token is spent: produce opens only the session answered for.
    let conn = match crate::kibind::connection_of_pam(layout) {
        Ok(c) => c,
        Err(e) => {
            log::warn("ki-refused", &[("why", &e), ("rhost", &rhost)]);
            return 1;
        }
    };
    let gid = crate::accounts::user(&cfg.customer_user).map(|u| u.gid);
    let ok = match check(layout, &classify(&raw)) {
        Ok(Some(id)) => match gid.ok_or_else(|| "no customers' account".to_string()).and_then(|g| {
            crate::kibind::record(layout, g, &conn, &id).map_err(|e| format!("recording the login's session: {e}"))
        }) {
            Ok(()) => {
                log::info("ki-accepted", &[("id", &id), ("rhost", &rhost)]);
                true
            }
            Err(e) => {
                log::warn("ki-refused", &[("why", &e), ("rhost", &rhost)]);
                false
            }
        },
        Ok(None) => {
            log::warn("ki-refused", &[("why", "no such pending or live session, or token"), ("rhost", &rhost)]);
            false
        }
        Err(e) => {
            log::warn("ki-refused", &[("why", &e), ("rhost", &rhost)]);
            false
        }
    };
    if ok {
        0
    } else {
        // Slows guessing down beyond sshd's own delay (MaxAuthTries bounds the tries per connection).
        std::thread::sleep(Duration::from_secs(1));
        1
    }
}

fn check(layout: &Layout, answer: &Answer) -> Result<Option<String>, String> {
    let now = crate::now();
    let reg = Sqlite::open(&layout.registry_db()).map_err(|e| e.to_string())?;
    match answer {
        Answer::Malformed => Ok(None),
        Answer::SessionId(id) => {
            let s = reg.get(id).map_err(|e| e.to_string())?;
            Ok(s.filter(|s| matches!(s.standing(now), Standing::Pending | Standing::Live)).map(|s| s.id))
        }
        Answer::Token(t) => reg.spend_any_token(t, now).map_err(|e| e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_classified_strictly() {
        assert_eq!(classify(b"swift-fox-jumps-barrel\0"), Answer::SessionId("swift-fox-jumps-barrel".into()));
        assert_eq!(classify(b"123456\n"), Answer::Token("123456".into()));
        assert_eq!(classify(b"123456"), Answer::Token("123456".into()));
        assert_eq!(classify(b"12345"), Answer::Malformed);
        assert_eq!(classify(b"Swift-fox-jumps-barrel"), Answer::Malformed);
        assert_eq!(classify(b"swift-fox-jumps-barrel\n\n"), Answer::Malformed);
        assert_eq!(classify(b"\xff\xfe"), Answer::Malformed);
        assert_eq!(classify(b""), Answer::Malformed);
    }
}
