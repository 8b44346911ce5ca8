//! The line framing of linbit-tunl/1 (protocol.md section 1) and tunl-support/1
//! (docs/architecture.md), as the relay and the support tool parse it. Pure functions over bytes.
//!
//! A line is `VERB` or `VERB SP field (SP field)*`, ASCII from the token alphabet plus single
//! spaces, no `\r`. A field is `key=value` or a bare token. Verbs that carry a base64 payload carry
//! it as the last field (base64 padding contains `=`, so its shape alone cannot tell it apart from a
//! `key=value` field): the caller says which verbs do, through [`parse`]'s `payload` flag.
//! Keys are `[a-z0-9_-]+`; a repeated key is malformed; unknown keys are kept for the caller to ignore.

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;

/// Longest line, newline included.
pub const MAX_LINE: usize = 262_144;

/// Why a line was not accepted. `verb` is sanitised and short, fit for a log line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Malformed {
    pub verb: String,
    pub reason: &'static str,
}

/// A parsed line: the verb, its `key=value` fields in order, its bare tokens in order, and the
/// decoded payload when the verb carries one.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Line {
    pub verb: String,
    pub fields: Vec<(String, String)>,
    pub bare: Vec<String>,
    pub payload: Option<Vec<u8>>,
}

impl Line {
    /// The raw value of `key`.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.fields.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }
    /// The percent-decoded value of `key` (UTF-8); `None` if missing or badly encoded.
    pub fn text(&self, key: &str) -> Option<String> {
        self.get(key).and_then(pct_decode)
    }
    /// `key` as a decimal number (digits only, within range).
    pub fn num(&self, key: &str) -> Option<u64> {
        self.get(key).and_then(parse_u64)
    }
}

pub fn is_token_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"+/=_.:,@%-".contains(&b)
}

pub fn is_token(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(is_token_byte)
}

fn is_key(k: &str) -> bool {
    !k.is_empty() && k.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
}

/// Decimal digits only, no sign, must fit.
pub fn parse_u64(s: &str) -> Option<u64> {
    if s.is_empty() || s.len() > 20 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// The verb of a line, as safe to log: token bytes only, at most 32 of them.
pub fn sanitize_verb(line: &[u8]) -> String {
    let end = line.iter().position(|&b| b == b' ').unwrap_or(line.len());
    let mut v: String = line[..end].iter().take(32).map(|&b| if is_token_byte(b) { b as char } else { '?' }).collect();
    if end > 32 {
        v.push('~');
    }
    v
}

/// Parse one line (without its newline). `payload` is true when this verb carries a base64
/// payload as its last field (which may be absent: `NOTE` alone clears the note).
pub fn parse(line: &[u8], payload: impl Fn(&str) -> bool) -> Result<Line, Malformed> {
    let bad = |reason| Err(Malformed { verb: sanitize_verb(line), reason });
    if line.len() >= MAX_LINE {
        return bad("too long");
    }
    if line.is_empty() {
        return bad("empty");
    }
    if !line.iter().all(|&b| b == b' ' || is_token_byte(b)) {
        return bad("bad byte");
    }
    // Every byte is ASCII now.
    let s = std::str::from_utf8(line).map_err(|_| Malformed { verb: sanitize_verb(line), reason: "bad byte" })?;
    let parts: Vec<&str> = s.split(' ').collect();
    if parts.iter().any(|p| p.is_empty()) {
        return bad("bad spacing");
    }
    let verb = parts[0];
    if !verb
        .bytes()
        .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_' || b == b'-' || b == b'/' || b == b'.')
    {
        return bad("bad verb");
    }
    let mut out = Line { verb: verb.to_string(), ..Line::default() };
    let mut rest = &parts[1..];
    if payload(verb) {
        if let Some((last, head)) = rest.split_last() {
            let Some(data) = b64_decode(last) else { return bad("bad base64") };
            out.payload = Some(data);
            rest = head;
        } else {
            out.payload = Some(Vec::new());
        }
    }
    for p in rest {
        match p.split_once('=') {
            Some((k, v)) => {
                if !is_key(k) {
                    return bad("bad key");
                }
                if out.fields.iter().any(|(seen, _)| seen == k) {
                    return bad("repeated key");
                }
                out.fields.push((k.to_string(), v.to_string()));
            }
            None => out.bare.push(p.to_string()),
        }
    }
    Ok(out)
}

/// Canonical standard base64 (padding required, no trailing bits).
pub fn b64_decode(s: &str) -> Option<Vec<u8>> {
    B64.decode(s).ok()
}

pub fn b64(data: &[u8]) -> String {
    B64.encode(data)
}

/// Every byte outside `[A-Za-z0-9._~-]` as `%XX`; `~` too, since it is not a token byte.
pub fn pct_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// `%XX` with two hex digits, decoding to UTF-8; anything else is `None`.
pub fn pct_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = b.get(i + 1..i + 3)?;
            let hex = std::str::from_utf8(hex).ok()?;
            if !hex.bytes().all(|c| c.is_ascii_hexdigit()) {
                return None;
            }
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// Build a line: `verb`, the fields, and an optional payload, with the newline.
pub fn line(verb: &str, fields: &[(&str, &str)], payload: Option<&[u8]>) -> Vec<u8> {
    let mut s = String::from(verb);
    for (k, v) in fields {
        s.push(' ');
        s.push_str(k);
        s.push('=');
        s.push_str(v);
    }
    if let Some(p) = payload
        && !p.is_empty()
    {
        s.push(' ');
        s.push_str(&b64(p));
    }
    s.push('\n');
    s.into_bytes()
}

/// Splits a byte stream into lines of at most [`MAX_LINE`] bytes. An over-long line is reported
/// once ([`Piece::TooLong`]) and the rest of it is discarded up to the next newline without being
/// buffered, so a hostile peer costs at most one line of memory.
#[derive(Default)]
pub struct Splitter {
    buf: Vec<u8>,
    skipping: bool,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Piece {
    Line(Vec<u8>),
    TooLong,
}

impl Splitter {
    pub fn push(&mut self, mut data: &[u8]) -> Vec<Piece> {
        let mut out = Vec::new();
        while !data.is_empty() {
            match data.iter().position(|&b| b == b'\n') {
                Some(nl) => {
                    if self.skipping {
                        self.skipping = false;
                    } else if self.buf.len() + nl + 1 > MAX_LINE {
                        self.buf.clear();
                        out.push(Piece::TooLong);
                    } else {
                        self.buf.extend_from_slice(&data[..nl]);
                        out.push(Piece::Line(std::mem::take(&mut self.buf)));
                    }
                    data = &data[nl + 1..];
                }
                None => {
                    if !self.skipping {
                        if self.buf.len() + data.len() >= MAX_LINE {
                            self.buf.clear();
                            self.skipping = true;
                            out.push(Piece::TooLong);
                        } else {
                            self.buf.extend_from_slice(data);
                        }
                    }
                    data = &[];
                }
            }
        }
        out
    }
    /// Bytes of an unfinished line held now.
    pub fn pending(&self) -> usize {
        self.buf.len()
    }
}

/// Text from the other side made safe for a terminal: C0 controls in caret notation, DEL, C1
/// controls, bidi controls and every other invisible format character replaced, so a peer can
/// neither drive the terminal nor make one name look like another. One line stays one line.
pub fn neutralize(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        let u = c as u32;
        match u {
            0x00..=0x1f => {
                out.push('^');
                out.push((u as u8 + 0x40) as char);
            }
            0x7f => out.push_str("^?"),
            0x80..=0x9f => out.push('\u{FFFD}'),
            0x00AD
            | 0x061C
            | 0x180E
            | 0x200B..=0x200F
            | 0x2028..=0x202E
            | 0x2060..=0x206F
            | 0xFEFF
            | 0xFFF9..=0xFFFB => out.push('\u{FFFD}'),
            0xE0000..=0xE007F | 0xFE00..=0xFE0F | 0xE0100..=0xE01EF => out.push('\u{FFFD}'),
            _ => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(l: &str) -> Result<Line, Malformed> {
        parse(l.as_bytes(), |v| matches!(v, "K" | "CHAT" | "NOTE" | "UPGRADE"))
    }

    #[test]
    fn fields_bare_and_payload() {
        let l = p("CHAT from=al%20ice aGk=").unwrap();
        assert_eq!(l.verb, "CHAT");
        assert_eq!(l.text("from").as_deref(), Some("al ice"));
        assert_eq!(l.payload.as_deref(), Some(&b"hi"[..]));
        let l = p("SIZE 80 24").unwrap();
        assert_eq!(l.bare, ["80", "24"]);
        assert_eq!(p("NOTE").unwrap().payload, Some(vec![]));
    }

    #[test]
    fn strictness() {
        for (l, why) in [
            ("", "empty"),
            ("K  aGk=", "bad spacing"),
            ("K aGk= ", "bad spacing"),
            ("K aGk=\r", "bad byte"),
            ("K aGk", "bad base64"),
            ("K aGl=", "bad base64"),
            ("X a=1 a=2", "repeated key"),
            ("X A=1", "bad key"),
            ("x", "bad verb"),
            ("X é", "bad byte"),
        ] {
            assert_eq!(p(l).unwrap_err().reason, why, "{l:?}");
        }
        let long = vec![b'A'; MAX_LINE];
        assert_eq!(parse(&long, |_| false).unwrap_err().reason, "too long");
    }

    #[test]
    fn pct_round_trip_and_strict() {
        for s in ["", "a b~c", "ü\u{1b}[31m", "100%"] {
            assert_eq!(pct_decode(&pct_encode(s)).as_deref(), Some(s));
            assert!(pct_encode(s).bytes().all(is_token_byte));
        }
        assert_eq!(pct_decode("%4"), None);
        assert_eq!(pct_decode("%zz"), None);
        assert_eq!(pct_decode("%ff"), None);
    }

    #[test]
    fn splitter_bounds_memory() {
        let mut s = Splitter::default();
        assert_eq!(s.push(b"A 1\nB"), vec![Piece::Line(b"A 1".to_vec())]);
        assert_eq!(s.push(b" 2\n"), vec![Piece::Line(b"B 2".to_vec())]);
        let big = vec![b'x'; MAX_LINE + 10];
        assert_eq!(s.push(&big), vec![Piece::TooLong]);
        assert_eq!(s.pending(), 0);
        assert_eq!(s.push(b"yyy\nC\n"), vec![Piece::Line(b"C".to_vec())]);
        // Split at every boundary gives the same lines.
        let data = b"PING 1\nCHAT aGk=\nPONG 22\n";
        for cut in 0..data.len() {
            let mut s = Splitter::default();
            let mut got = s.push(&data[..cut]);
            got.extend(s.push(&data[cut..]));
            assert_eq!(got.len(), 3, "cut {cut}");
        }
    }

    #[test]
    fn neutralize_controls() {
        assert_eq!(neutralize("a\u{1b}[2Jb\n"), "a^[[2Jb^J");
        assert_eq!(neutralize("x\u{202e}y\u{200b}z\u{9b}"), "x\u{FFFD}y\u{FFFD}z\u{FFFD}");
        assert_eq!(neutralize("héllo 世界"), "héllo 世界");
    }
}

/// Properties over random input (issue 13): both peers of the relay are untrusted.
#[cfg(test)]
mod props {
    use super::*;
    use proptest::prelude::*;

    fn payload_verb(v: &str) -> bool {
        matches!(v, "K" | "O" | "CHAT" | "NOTE" | "UPGRADE")
    }

    proptest! {
        #[test]
        fn any_bytes_never_panic(line in prop::collection::vec(any::<u8>(), 0..200)) {
            match parse(&line, payload_verb) {
                Ok(l) => prop_assert!(!l.verb.is_empty()),
                Err(m) => prop_assert!(m.verb.bytes().all(|b| is_token_byte(b) || b == b'?' || b == b'~')),
            }
            let _ = neutralize(&String::from_utf8_lossy(&line));
        }

        /// What `line` builds parses back to the same fields and payload.
        #[test]
        fn built_lines_parse_back(
            verb in "[A-Z][A-Z_]{0,8}",
            fields in prop::collection::vec(("[a-z][a-z0-9_-]{0,6}", ".{0,10}"), 0..5),
            data in prop::collection::vec(any::<u8>(), 0..40),
        ) {
            let mut seen = std::collections::HashSet::new();
            let fields: Vec<(String, String)> =
                fields.into_iter().filter(|(k, _)| seen.insert(k.clone())).map(|(k, v)| (k, pct_encode(&v))).collect();
            let refs: Vec<(&str, &str)> = fields.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
            let carries = payload_verb(&verb);
            let built = line(&verb, &refs, carries.then_some(&data[..]));
            let parsed = parse(&built[..built.len() - 1], payload_verb).unwrap();
            prop_assert_eq!(&parsed.fields, &fields);
            prop_assert!(parsed.bare.is_empty());
            prop_assert_eq!(parsed.payload, carries.then_some(data));
        }

        #[test]
        fn pct_roundtrip_and_strict(s in ".{0,30}", junk in "[%0-9a-fA-F+-]{0,12}") {
            prop_assert!(pct_encode(&s).bytes().all(is_token_byte));
            prop_assert_eq!(pct_decode(&pct_encode(&s)), Some(s));
            if let Some(d) = pct_decode(&junk) {
                prop_assert_eq!(pct_decode(&pct_encode(&d)), Some(d));
            }
        }

        /// The splitter gives the same pieces however the stream was cut into reads.
        #[test]
        fn split_reads_give_the_same_pieces(
            stream in prop::collection::vec(prop_oneof![Just(b'\n'), any::<u8>()], 0..300),
            cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..8),
        ) {
            let mut whole = Splitter::default();
            let want = whole.push(&stream);
            let mut at: Vec<usize> = cuts.iter().map(|c| c.index(stream.len() + 1)).collect();
            at.extend([0, stream.len()]);
            at.sort();
            let mut sp = Splitter::default();
            let got: Vec<Piece> = at.windows(2).flat_map(|w| sp.push(&stream[w[0]..w[1]])).collect();
            prop_assert_eq!(got, want);
            prop_assert_eq!(sp.pending(), whole.pending());
        }
    }
}
