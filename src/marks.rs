//! What the customer's record says about the session: the labels of the recording's marker events
//! (asciicast v2 `[t, "m", "label"]`, chapter marks in asciinema's player) and the lines of the chat
//! transcript beside it. Pure functions; the recorder writes them, the daemon says when.
//!
//! Every label and transcript line is one line of neutralised text (`text::neutralize`): whatever
//! the relay put into a name, a chat line or a key comment shows as visible characters, never as an
//! escape sequence, a control or a bidi character, in a player, in `cat`, or in an editor.

use crate::daemon::End;
use crate::protocol::{CloseReason, RejectReason};
use crate::tunnel::State;
use crate::{signals, text};

/// Who wrote a chat line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Who<'a> {
    /// The customer, in the chat pane; `delivered`: the link was up and it went to the relay.
    Customer { delivered: bool },
    /// Support, under the name the relay gave.
    Support(&'a str),
}

/// How a tunnel request was answered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Answer {
    /// Keys installed, forward open on this relay port.
    Granted {
        port: u16,
    },
    Rejected(RejectReason),
}

/// One event worth a chapter mark.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Mark<'a> {
    Connected {
        viewers: u32,
    },
    Reconnected {
        viewers: u32,
    },
    Disconnected {
        why: &'a str,
    },
    Viewers {
        before: u32,
        now: u32,
    },
    Chat {
        who: Who<'a>,
        text: &'a [u8],
    },
    /// Support's pinned note; empty clears it.
    Note(&'a [u8]),
    /// `keys`: as `ssh-keygen -lf` prints them (SHA256 fingerprints).
    Request {
        req: &'a str,
        from: &'a str,
        user: &'a str,
        target: &'a str,
        keys: &'a [String],
    },
    Answer {
        req: &'a str,
        from: &'a str,
        answer: Answer,
    },
    /// The reverse forward is up (at a grant, for `--tunnel` at connect, again after a reconnect).
    ForwardOpen {
        port: u16,
    },
    /// The customer changed what happens to requests (Ctrl-b u/U/X, the menu): `word` is the
    /// control word (grant, revoke, block), `state` the tunnel state after it.
    Decision {
        word: &'a str,
        state: State,
    },
    Closed(CloseReason),
    KeysRemoved,
    /// The keys could not be proven gone; the customer was told which lines to delete.
    KeysLeft,
    Brb(bool),
    End {
        end: End,
        why: &'a str,
    },
}

/// Longest label: a 4000-character chat line with its sender, with room to spare.
const LABEL_MAX: usize = 4400;

/// The marker's label.
pub fn label(m: &Mark) -> String {
    let s = match m {
        Mark::Connected { viewers } => format!("relay connected (viewers: {viewers})"),
        Mark::Reconnected { viewers } => format!("relay reconnected (viewers: {viewers})"),
        Mark::Disconnected { why } => format!("relay disconnected: {why}"),
        Mark::Viewers { before, now } if now >= before => {
            format!("viewers: {now} ({} joined)", now - before)
        }
        Mark::Viewers { before, now } => format!("viewers: {now} ({} left)", before - now),
        Mark::Chat { who, text } => {
            let t = text::neutralize(text, 4000);
            match who {
                Who::Customer { delivered: true } => format!("chat customer: {t}"),
                Who::Customer { delivered: false } => format!("chat customer (not delivered: relay link down): {t}"),
                Who::Support(from) => format!("chat support ({}): {t}", text::neutralize(from.as_bytes(), 64)),
            }
        }
        Mark::Note([]) => "note cleared".to_string(),
        Mark::Note(t) => format!("note: {}", text::neutralize(t, 200)),
        Mark::Request { req, from, user, target, keys } => {
            let keys = if keys.is_empty() { "none valid".to_string() } else { keys.join("; ") };
            format!(
                "tunnel request {} from {}: log in as {user} on {target}; keys: {keys}",
                text::neutralize(req.as_bytes(), 64),
                text::neutralize(from.as_bytes(), 64)
            )
        }
        Mark::Answer { req, from, answer } => {
            let req = text::neutralize(req.as_bytes(), 64);
            let from = text::neutralize(from.as_bytes(), 64);
            match answer {
                Answer::Granted { port } => format!("tunnel request {req} from {from}: granted, relay port {port}"),
                Answer::Rejected(r) => format!("tunnel request {req} from {from}: {}", r.as_str()),
            }
        }
        Mark::ForwardOpen { port } => format!("tunnel forward open on relay port {port}"),
        Mark::Decision { word, state } => {
            let now = match state {
                State::Confirm => "asked for one by one",
                State::Allowed => "granted without asking",
                State::Blocked => "blocked",
                State::Active => "granted (a tunnel is open)",
                State::Off => "refused (watch-only)",
            };
            format!("tunnel {word} by the customer: requests are now {now}")
        }
        Mark::Closed(r) => match r {
            CloseReason::Revoked => "tunnel closed: revoked by the customer".to_string(),
            CloseReason::Relay => "tunnel closed: revoked by support".to_string(),
            CloseReason::Ended => "tunnel closed: the session ended".to_string(),
        },
        Mark::KeysRemoved => "support keys removed from authorized_keys".to_string(),
        Mark::KeysLeft => "support keys could NOT be removed from authorized_keys".to_string(),
        Mark::Brb(true) => "BRB on: support keystrokes paused".to_string(),
        Mark::Brb(false) => "BRB off: support can type again".to_string(),
        Mark::End { end, why } => format!("session end: {}", end_reason(*end, why)),
    };
    // The one guarantee for every label, whatever went into it: a single line of visible text.
    text::neutralize(s.as_bytes(), LABEL_MAX)
}

/// Why the session ended, in words; `why` is what the daemon already told the customer (support's
/// CLOSE reason, the fatal error), if anything.
pub fn end_reason(end: End, why: &str) -> String {
    let base = match end {
        End::Customer => "the customer ended it".to_string(),
        End::RelayClose => "support ended it".to_string(),
        End::Signal(s) if s == signals::SIGINT => "SIGINT".to_string(),
        End::Signal(s) if s == signals::SIGTERM => "SIGTERM".to_string(),
        End::Signal(s) => format!("signal {s}"),
        End::TmuxGone => "the tmux session ended".to_string(),
        End::Fatal => "error".to_string(),
    };
    if why.is_empty() { base } else { format!("{base} ({why})") }
}

/// The transcript's line for a chat line or a note (`None` for every other mark): UTC time of
/// `unix_secs`, sender, text. The sender's prefix is ours (`customer`, `support (NAME)`, `note`), so
/// a name the relay chose cannot make a line read as the customer's.
pub fn transcript_line(unix_secs: u64, m: &Mark) -> Option<String> {
    let (sender, text) = match m {
        Mark::Chat { who: Who::Customer { delivered: true }, text } => ("customer".to_string(), *text),
        Mark::Chat { who: Who::Customer { delivered: false }, text } => ("customer (not delivered)".to_string(), *text),
        Mark::Chat { who: Who::Support(from), text } => {
            (format!("support ({})", text::neutralize(from.as_bytes(), 64)), *text)
        }
        Mark::Note([]) => ("support note".to_string(), &b"(cleared)"[..]),
        Mark::Note(t) => ("support note".to_string(), *t),
        _ => return None,
    };
    let (y, mo, d, h, mi, s) = crate::sessiondir::civil(unix_secs);
    let line = format!("{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}Z {sender}: {}", text::neutralize(text, 4000));
    Some(format!("{}\n", text::neutralize(line.as_bytes(), LABEL_MAX)))
}

/// The transcript's first line (no session ID in it: that is a credential while the session runs).
pub fn transcript_header(cast_name: &str) -> String {
    format!(
        "# linbit-tunl chat transcript for {}; one line per message: UTC time, sender, text\n",
        text::neutralize(cast_name.as_bytes(), 200)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// No control, escape, bidi or format character can reach a reader.
    fn inert(s: &str) -> bool {
        !s.chars().any(|c| {
            c.is_control()
                || ('\u{202a}'..='\u{202e}').contains(&c)
                || ('\u{2066}'..='\u{2069}').contains(&c)
                || matches!(c, '\u{200e}' | '\u{200f}' | '\u{061c}' | '\u{2028}' | '\u{2029}' | '\u{200b}')
        })
    }

    #[test]
    fn link_and_viewer_labels() {
        assert_eq!(label(&Mark::Connected { viewers: 1 }), "relay connected (viewers: 1)");
        assert_eq!(label(&Mark::Reconnected { viewers: 0 }), "relay reconnected (viewers: 0)");
        assert_eq!(
            label(&Mark::Disconnected { why: "no answer from the relay for 45 s" }),
            "relay disconnected: no answer from the relay for 45 s"
        );
        assert_eq!(label(&Mark::Viewers { before: 1, now: 3 }), "viewers: 3 (2 joined)");
        assert_eq!(label(&Mark::Viewers { before: 3, now: 0 }), "viewers: 0 (3 left)");
    }

    #[test]
    fn chat_and_note_labels_are_neutralised() {
        let evil = "\x1b[2J\x1b]52;c;aGk=\x07evil\u{202e}txt.exe\r\nnext";
        let l = label(&Mark::Chat { who: Who::Support("eve\x1b[31m"), text: evil.as_bytes() });
        assert_eq!(l, "chat support (eve^[[31m): ^[[2J^[]52;c;aGk=^Gevil\u{FFFD}txt.exe^M^Jnext");
        assert!(inert(&l));
        let l = label(&Mark::Chat { who: Who::Customer { delivered: true }, text: "grüße \"quoted\" \\".as_bytes() });
        assert_eq!(l, "chat customer: grüße \"quoted\" \\");
        let l = label(&Mark::Chat { who: Who::Customer { delivered: false }, text: b"hi" });
        assert_eq!(l, "chat customer (not delivered: relay link down): hi");
        assert_eq!(label(&Mark::Note(b"reading\x1b[5m logs")), "note: reading^[[5m logs");
        assert_eq!(label(&Mark::Note(b"")), "note cleared");
        // Invalid UTF-8 shows as U+FFFD, and a flood is cut.
        assert_eq!(label(&Mark::Note(b"a\xffb")), "note: a\u{FFFD}b");
        let long = label(&Mark::Chat { who: Who::Support("e"), text: "x".repeat(10_000).as_bytes() });
        assert!(long.chars().count() < LABEL_MAX && long.ends_with('…'), "{}", long.len());
    }

    #[test]
    fn tunnel_labels() {
        let keys = vec!["256 SHA256:abc support@x (ED25519)".to_string(), "2048 SHA256:def y (RSA)".into()];
        let l = label(&Mark::Request {
            req: "p1",
            from: "eng@linbit.com\n",
            user: "root",
            target: "localhost:22",
            keys: &keys,
        });
        assert_eq!(
            l,
            "tunnel request p1 from eng@linbit.com^J: log in as root on localhost:22; \
             keys: 256 SHA256:abc support@x (ED25519); 2048 SHA256:def y (RSA)"
        );
        let none = label(&Mark::Request { req: "p1", from: "e", user: "root", target: "h:22", keys: &[] });
        assert!(none.ends_with("keys: none valid"), "{none}");
        let a = |answer| label(&Mark::Answer { req: "p2", from: "eng", answer });
        assert_eq!(a(Answer::Granted { port: 41234 }), "tunnel request p2 from eng: granted, relay port 41234");
        for (r, w) in [
            (RejectReason::Denied, "denied"),
            (RejectReason::Blocked, "blocked"),
            (RejectReason::Restricted, "restricted"),
            (RejectReason::Brb, "brb"),
            (RejectReason::InvalidKey, "invalid-key"),
            (RejectReason::Error, "error"),
        ] {
            assert_eq!(a(Answer::Rejected(r)), format!("tunnel request p2 from eng: {w}"));
        }
        assert_eq!(label(&Mark::ForwardOpen { port: 7 }), "tunnel forward open on relay port 7");
        assert_eq!(
            label(&Mark::Decision { word: "block", state: State::Blocked }),
            "tunnel block by the customer: requests are now blocked"
        );
        assert_eq!(
            label(&Mark::Decision { word: "grant", state: State::Allowed }),
            "tunnel grant by the customer: requests are now granted without asking"
        );
        assert_eq!(
            label(&Mark::Decision { word: "revoke", state: State::Confirm }),
            "tunnel revoke by the customer: requests are now asked for one by one"
        );
        assert_eq!(label(&Mark::Closed(CloseReason::Revoked)), "tunnel closed: revoked by the customer");
        assert_eq!(label(&Mark::Closed(CloseReason::Relay)), "tunnel closed: revoked by support");
        assert_eq!(label(&Mark::Closed(CloseReason::Ended)), "tunnel closed: the session ended");
        assert_eq!(label(&Mark::KeysRemoved), "support keys removed from authorized_keys");
    }

    #[test]
    fn brb_and_end_labels() {
        assert_eq!(label(&Mark::Brb(true)), "BRB on: support keystrokes paused");
        assert_eq!(label(&Mark::Brb(false)), "BRB off: support can type again");
        let e = |end, why| label(&Mark::End { end, why });
        assert_eq!(e(End::Customer, ""), "session end: the customer ended it");
        assert_eq!(e(End::RelayClose, "done\x1b"), "session end: support ended it (done^[)");
        assert_eq!(e(End::Signal(signals::SIGTERM), ""), "session end: SIGTERM");
        assert_eq!(e(End::Signal(signals::SIGINT), ""), "session end: SIGINT");
        assert_eq!(e(End::TmuxGone, ""), "session end: the tmux session ended");
        assert_eq!(e(End::Fatal, "cannot connect"), "session end: error (cannot connect)");
    }

    #[test]
    fn labels_are_valid_json_in_an_event() {
        let text = "quote\" back\\slash \u{7f} \u{9b}31m tab\t nul\0 €";
        let l = label(&Mark::Chat { who: Who::Support("a\"b"), text: text.as_bytes() });
        assert!(inert(&l), "{l:?}");
        let event = format!("[1.5, \"m\", {}]", crate::recording::json_str(&l));
        let relay_double::json::J::Arr(v) = relay_double::json::parse_json(&event).expect("JSON") else { panic!() };
        assert_eq!(v[2], relay_double::json::J::Str(l));
    }

    #[test]
    fn transcript_lines() {
        let t = 1_795_620_600; // 2026-11-25 15:30:00 UTC
        let line = |m: &Mark| transcript_line(t, m);
        assert_eq!(
            line(&Mark::Chat { who: Who::Customer { delivered: true }, text: b"hello" }).as_deref(),
            Some("2026-11-25T15:30:00Z customer: hello\n")
        );
        assert_eq!(
            line(&Mark::Chat { who: Who::Customer { delivered: false }, text: b"hello" }).as_deref(),
            Some("2026-11-25T15:30:00Z customer (not delivered): hello\n")
        );
        // A relay name that tries to start a new line as the customer stays on its own line.
        let forged = line(&Mark::Chat { who: Who::Support("eve"), text: b"hi\n2026-11-25T15:30:01Z customer: yes" });
        assert_eq!(
            forged.as_deref(),
            Some("2026-11-25T15:30:00Z support (eve): hi^J2026-11-25T15:30:01Z customer: yes\n")
        );
        let l = line(&Mark::Chat { who: Who::Support("e\u{202e}ve"), text: b"\x1b[2Jx\x9b" }).unwrap();
        assert_eq!(l, "2026-11-25T15:30:00Z support (e\u{FFFD}ve): ^[[2Jx\u{FFFD}\n");
        assert!(inert(l.trim_end_matches('\n')));
        assert_eq!(line(&Mark::Note(b"looking")).as_deref(), Some("2026-11-25T15:30:00Z support note: looking\n"));
        assert_eq!(line(&Mark::Note(b"")).as_deref(), Some("2026-11-25T15:30:00Z support note: (cleared)\n"));
        assert_eq!(line(&Mark::Brb(true)), None);
        assert_eq!(line(&Mark::Connected { viewers: 1 }), None);
        assert_eq!(
            transcript_header("x.cast"),
            "# linbit-tunl chat transcript for x.cast; one line per message: UTC time, sender, text\n"
        );
    }
}

/// Whatever bytes the relay sends as a name, a chat line, a note or a request ID, the label and the
/// transcript line are one line of inert text, and the label survives the trip through the file's
/// JSON unchanged.
#[cfg(test)]
mod props {
    use super::*;
    use proptest::prelude::*;

    fn inert(s: &str) -> bool {
        !s.chars().any(|c| {
            c.is_control()
                || ('\u{202a}'..='\u{202e}').contains(&c)
                || ('\u{2066}'..='\u{2069}').contains(&c)
                || matches!(c, '\u{200b}'..='\u{200f}' | '\u{061c}' | '\u{2028}' | '\u{2029}' | '\u{feff}')
        })
    }

    proptest! {
        #[test]
        fn any_relay_text_makes_one_inert_line(
            from in any::<String>(),
            text in prop::collection::vec(any::<u8>(), 0..300),
            note in prop::collection::vec(any::<u8>(), 0..300),
            secs in any::<u32>(),
        ) {
            let keys = [from.clone()];
            for m in [
                Mark::Chat { who: Who::Support(&from), text: &text },
                Mark::Chat { who: Who::Customer { delivered: true }, text: &text },
                Mark::Note(&note),
                Mark::Request { req: &from, from: &from, user: "root", target: "localhost:22", keys: &keys },
                Mark::Answer { req: &from, from: &from, answer: Answer::Rejected(RejectReason::Denied) },
                Mark::Disconnected { why: &from },
            ] {
                let l = label(&m);
                prop_assert!(inert(&l), "{:?}", l);
                let event = format!("[0.5, \"m\", {}]", crate::recording::json_str(&l));
                let parsed = relay_double::json::parse_json(&event);
                prop_assert_eq!(parsed, Some(relay_double::json::J::Arr(vec![
                    relay_double::json::J::Num(0.5),
                    relay_double::json::J::Str("m".into()),
                    relay_double::json::J::Str(l.clone()),
                ])));
                if let Some(t) = transcript_line(u64::from(secs), &m) {
                    let body = t.strip_suffix('\n');
                    prop_assert!(body.is_some_and(inert), "{:?}", t);
                }
            }
        }
    }
}
