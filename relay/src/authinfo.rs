//! What sshd tells `produce` about how the customer authenticated (`ExposeAuthInfo yes` writes it
//! to the file named by `SSH_USER_AUTH`), and the session a relay certificate was issued for.
//!
//! The signing API names the session in the certificate's key ID (`tunl session=SID ...`), so a
//! certificate bought with session A's token must not open session B: `produce` compares the two.
//! Pure functions over the file's text; only ed25519 certificates are ever issued by the API.

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;

const CERT_TYPE: &str = "ssh-ed25519-cert-v01@openssh.com";

/// How the customer got in, as far as binding a session is concerned.
#[derive(Debug, PartialEq, Eq)]
pub enum Auth {
    /// A relay certificate whose key ID names this session.
    Certificate { session: String },
    /// A certificate whose key ID is not ours (or that cannot be read): refused.
    ForeignCertificate,
    /// Keyboard-interactive: PAM checked the answer, `kibind` says for which session.
    KeyboardInteractive,
    /// Nothing recorded (not run by sshd).
    Other,
}

fn take<'a>(b: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
    if b.len() < n {
        return None;
    }
    let (head, rest) = b.split_at(n);
    *b = rest;
    Some(head)
}

fn string<'a>(b: &mut &'a [u8]) -> Option<&'a [u8]> {
    let len = u32::from_be_bytes(take(b, 4)?.try_into().ok()?) as usize;
    take(b, len)
}

/// The key ID of an ed25519 user certificate blob (PROTOCOL.certkeys: type, nonce, pk, serial,
/// type, key id, ...).
pub fn cert_key_id(blob: &[u8]) -> Option<String> {
    let mut b = blob;
    if string(&mut b)? != CERT_TYPE.as_bytes() {
        return None;
    }
    string(&mut b)?; // nonce
    string(&mut b)?; // public key
    take(&mut b, 8)?; // serial
    if u32::from_be_bytes(take(&mut b, 4)?.try_into().ok()?) != 1 {
        return None; // not a user certificate
    }
    String::from_utf8(string(&mut b)?.to_vec()).ok()
}

/// The session named by a key ID the API wrote (`tunl session=SID host=... serial=...`).
pub fn session_of_key_id(key_id: &str) -> Option<&str> {
    let mut words = key_id.split(' ');
    if words.next()? != "tunl" {
        return None;
    }
    words.find_map(|w| w.strip_prefix("session=")).filter(|s| !s.is_empty())
}

/// Reads the `SSH_USER_AUTH` text: the last method that succeeded decides.
pub fn parse(text: &str) -> Auth {
    let Some(last) = text.lines().rev().find(|l| !l.trim().is_empty()) else { return Auth::Other };
    let mut f = last.split(' ');
    match (f.next(), f.next(), f.next()) {
        (Some("publickey"), Some(CERT_TYPE), Some(b64)) => {
            match B64.decode(b64).ok().as_deref().and_then(cert_key_id).as_deref().and_then(session_of_key_id) {
                Some(s) => Auth::Certificate { session: s.to_string() },
                None => Auth::ForeignCertificate,
            }
        }
        (Some("publickey"), Some(t), _) if t.contains("-cert-") => Auth::ForeignCertificate,
        (Some(m), _, _) if m == "keyboard-interactive" || m.starts_with("keyboard-interactive/") => {
            Auth::KeyboardInteractive
        }
        _ => Auth::Other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn blob(kind: u32, key_id: &str) -> Vec<u8> {
        let mut b = Vec::new();
        for s in [CERT_TYPE.as_bytes(), &[7u8; 32][..], &[9u8; 32][..]] {
            b.extend_from_slice(&(s.len() as u32).to_be_bytes());
            b.extend_from_slice(s);
        }
        b.extend_from_slice(&42u64.to_be_bytes());
        b.extend_from_slice(&kind.to_be_bytes());
        b.extend_from_slice(&(key_id.len() as u32).to_be_bytes());
        b.extend_from_slice(key_id.as_bytes());
        b.extend_from_slice(&[0, 0, 0, 0]);
        b
    }

    #[test]
    fn the_session_comes_from_the_key_id() {
        let line = |b: &[u8]| format!("publickey {CERT_TYPE} {}\n", B64.encode(b));
        let ok = line(&blob(1, "tunl session=alpha-bravo-charlie-delta host=h serial=3"));
        assert_eq!(parse(&ok), Auth::Certificate { session: "alpha-bravo-charlie-delta".into() });
        assert_eq!(parse(&line(&blob(2, "tunl session=a-b-c-d"))), Auth::ForeignCertificate);
        assert_eq!(parse(&line(&blob(1, "someone else"))), Auth::ForeignCertificate);
        assert_eq!(parse(&line(&blob(1, "tunl host=h"))), Auth::ForeignCertificate);
        assert_eq!(parse(&line(&blob(1, "tunl session=a-b-c-d")[..20])), Auth::ForeignCertificate);
        assert_eq!(parse("publickey ssh-rsa-cert-v01@openssh.com AAAA\n"), Auth::ForeignCertificate);
        assert_eq!(parse("keyboard-interactive\n"), Auth::KeyboardInteractive);
        assert_eq!(parse("keyboard-interactive/pam\n"), Auth::KeyboardInteractive);
        assert_eq!(parse("keyboard-interactivex\n"), Auth::Other);
        assert_eq!(parse(""), Auth::Other);
    }
}
