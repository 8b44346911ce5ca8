//! The smallest JSON the signing API needs: encode one flat object of strings, and parse one flat
//! object whose interesting values are strings. The API is reached over TLS but its answer is still
//! input from the network, so the parser is strict (RFC 8259 grammar, no nesting, no duplicates, no
//! trailing garbage, a size cap) rather than forgiving; pulling in serde for two fields would cost
//! more binary than this file.

/// Bodies larger than this are refused before parsing: a real answer is one certificate (~1 KiB).
pub const MAX_INPUT: usize = 64 * 1024;

/// `{"k":"v",...}` with every string escaped; control characters (and DEL) as `\u00XX`.
pub fn encode_object(fields: &[(&str, &str)]) -> String {
    let mut out = String::from("{");
    for (i, (k, v)) in fields.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        push_string(&mut out, k);
        out.push(':');
        push_string(&mut out, v);
    }
    out.push('}');
    out
}

fn push_string(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 || c as u32 == 0x7f => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
}

/// Parse exactly one JSON object whose members are scalars. String members are returned in order;
/// numbers, `true`, `false` and `null` are validated and skipped; nested objects or arrays, duplicate
/// keys, bad escapes, unpaired surrogates, raw control characters and anything after the object are
/// refused. Error texts describe the position, never echo the input.
pub fn parse_string_object(input: &str) -> Result<Vec<(String, String)>, String> {
    if input.len() > MAX_INPUT {
        return Err(format!("JSON answer too large ({} bytes, limit {MAX_INPUT})", input.len()));
    }
    let mut p = Parser { b: input.as_bytes(), i: 0 };
    let mut out: Vec<(String, String)> = Vec::new();
    let mut keys: Vec<String> = Vec::new();
    p.ws();
    p.expect(b'{')?;
    p.ws();
    if p.peek() == Some(b'}') {
        p.i += 1;
    } else {
        loop {
            p.ws();
            let key = p.string()?;
            if keys.contains(&key) {
                return Err(format!("duplicate key at byte {}", p.i));
            }
            keys.push(key.clone());
            p.ws();
            p.expect(b':')?;
            p.ws();
            match p.peek() {
                Some(b'"') => {
                    let v = p.string()?;
                    out.push((key, v));
                }
                Some(b'{') | Some(b'[') => {
                    return Err(format!("nested value at byte {} (expected a flat object)", p.i));
                }
                Some(b't') => p.literal(b"true")?,
                Some(b'f') => p.literal(b"false")?,
                Some(b'n') => p.literal(b"null")?,
                Some(b'-' | b'0'..=b'9') => p.number()?,
                _ => return Err(format!("expected a value at byte {}", p.i)),
            }
            p.ws();
            match p.next() {
                Some(b',') => continue,
                Some(b'}') => break,
                _ => return Err(format!("expected ',' or '}}' at byte {}", p.i.saturating_sub(1))),
            }
        }
    }
    p.ws();
    if p.i != p.b.len() {
        return Err(format!("trailing data at byte {}", p.i));
    }
    Ok(out)
}

struct Parser<'a> {
    b: &'a [u8],
    i: usize,
}

impl Parser<'_> {
    fn peek(&self) -> Option<u8> {
        self.b.get(self.i).copied()
    }

    fn next(&mut self) -> Option<u8> {
        let c = self.peek()?;
        self.i += 1;
        Some(c)
    }

    fn ws(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t' | b'\n' | b'\r')) {
            self.i += 1;
        }
    }

    fn expect(&mut self, c: u8) -> Result<(), String> {
        if self.next() == Some(c) {
            Ok(())
        } else {
            Err(format!("expected '{}' at byte {}", c as char, self.i.saturating_sub(1)))
        }
    }

    fn literal(&mut self, word: &[u8]) -> Result<(), String> {
        if self.b[self.i..].starts_with(word) {
            self.i += word.len();
            Ok(())
        } else {
            Err(format!("bad literal at byte {}", self.i))
        }
    }

    fn digits(&mut self) -> usize {
        let start = self.i;
        while matches!(self.peek(), Some(b'0'..=b'9')) {
            self.i += 1;
        }
        self.i - start
    }

    /// RFC 8259 number: `-? (0 | [1-9][0-9]*) (. [0-9]+)? ([eE] [+-]? [0-9]+)?`
    fn number(&mut self) -> Result<(), String> {
        let start = self.i;
        let bad = |at: usize| Err(format!("bad number at byte {at}"));
        if self.peek() == Some(b'-') {
            self.i += 1;
        }
        match self.peek() {
            Some(b'0') => self.i += 1,
            Some(b'1'..=b'9') => {
                self.digits();
            }
            _ => return bad(start),
        }
        if self.peek() == Some(b'.') {
            self.i += 1;
            if self.digits() == 0 {
                return bad(start);
            }
        }
        if matches!(self.peek(), Some(b'e' | b'E')) {
            self.i += 1;
            if matches!(self.peek(), Some(b'+' | b'-')) {
                self.i += 1;
            }
            if self.digits() == 0 {
                return bad(start);
            }
        }
        Ok(())
    }

    fn hex4(&mut self) -> Result<u32, String> {
        let h = self.b.get(self.i..self.i + 4).ok_or_else(|| format!("short \\u escape at byte {}", self.i))?;
        if !h.iter().all(u8::is_ascii_hexdigit) {
            return Err(format!("bad \\u escape at byte {}", self.i));
        }
        self.i += 4;
        // Four ASCII hex digits: always valid UTF-8 and always in range.
        Ok(u32::from_str_radix(std::str::from_utf8(h).unwrap_or("0"), 16).unwrap_or(0))
    }

    fn string(&mut self) -> Result<String, String> {
        self.expect(b'"')?;
        let mut out = String::new();
        loop {
            // Copy the run of plain bytes in one go; the input is a &str, so runs split only at ASCII
            // bytes and stay valid UTF-8.
            let start = self.i;
            while let Some(c) = self.peek() {
                if c == b'"' || c == b'\\' || c < 0x20 {
                    break;
                }
                self.i += 1;
            }
            out.push_str(std::str::from_utf8(&self.b[start..self.i]).map_err(|_| "invalid UTF-8".to_string())?);
            match self.next() {
                None => return Err("unterminated string".to_string()),
                Some(b'"') => return Ok(out),
                Some(b'\\') => {
                    let at = self.i - 1;
                    let c = match self.next() {
                        Some(b'"') => '"',
                        Some(b'\\') => '\\',
                        Some(b'/') => '/',
                        Some(b'b') => '\u{8}',
                        Some(b'f') => '\u{c}',
                        Some(b'n') => '\n',
                        Some(b'r') => '\r',
                        Some(b't') => '\t',
                        Some(b'u') => {
                            let hi = self.hex4()?;
                            let cp = if (0xD800..0xDC00).contains(&hi) {
                                if !self.b[self.i..].starts_with(b"\\u") {
                                    return Err(format!("unpaired surrogate at byte {at}"));
                                }
                                self.i += 2;
                                let lo = self.hex4()?;
                                if !(0xDC00..0xE000).contains(&lo) {
                                    return Err(format!("unpaired surrogate at byte {at}"));
                                }
                                0x10000 + ((hi - 0xD800) << 10) + (lo - 0xDC00)
                            } else if (0xDC00..0xE000).contains(&hi) {
                                return Err(format!("unpaired surrogate at byte {at}"));
                            } else {
                                hi
                            };
                            char::from_u32(cp).ok_or_else(|| format!("bad \\u escape at byte {at}"))?
                        }
                        _ => return Err(format!("bad escape at byte {at}")),
                    };
                    out.push(c);
                }
                Some(_) => return Err(format!("raw control character in string at byte {}", self.i - 1)),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(s: &str) -> Vec<(String, String)> {
        parse_string_object(s).unwrap_or_else(|e| panic!("{s:?}: {e}"))
    }

    #[test]
    fn encode_escapes() {
        assert_eq!(encode_object(&[]), "{}");
        assert_eq!(
            encode_object(&[("a", "x\"y\\z"), ("b", "\n\u{1}\u{7f}ü")]),
            r#"{"a":"x\"y\\z","b":"\u000a\u0001\u007fü"}"#
        );
    }

    #[test]
    fn round_trip() {
        let fields = [("session_id", "swift-fox-jumps-barrel"), ("weird", "\"\\/\u{0}\t\u{1F600}é")];
        let got = ok(&encode_object(&fields));
        let want: Vec<(String, String)> = fields.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        assert_eq!(got, want);
    }

    #[test]
    fn parses_real_answers() {
        assert_eq!(
            ok(r#" {"certificate": "ssh-ed25519-cert-v01@openssh.com AAAA"} "#)[0].1,
            "ssh-ed25519-cert-v01@openssh.com AAAA"
        );
        assert_eq!(ok("{}"), vec![]);
        assert_eq!(ok("\r\n{ }\n"), vec![]);
        let v = ok(r#"{"n": -1.5e+3, "t": true, "f": false, "z": null, "error": "no", "i": 0}"#);
        assert_eq!(v, vec![("error".to_string(), "no".to_string())]);
        assert_eq!(ok(r#"{"s":"\ud83d\ude00\u00e9\/"}"#)[0].1, "😀é/");
    }

    #[test]
    fn refuses_hostile_input() {
        for bad in [
            "",
            " ",
            "[]",
            "\"x\"",
            "{",
            "{\"a\"}",
            "{\"a\":}",
            "{\"a\":\"b\",}",
            "{,}",
            "{\"a\":\"b\"}x",
            "{\"a\":\"b\"}{}",
            "{\"a\":{}}",
            "{\"a\":[\"b\"]}",
            "{\"a\":\"b\",\"a\":\"c\"}",
            "{\"a\":\"\\x\"}",
            "{\"a\":\"\\u12\"}",
            "{\"a\":\"\\u12g4\"}",
            "{\"a\":\"\\ud800\"}",
            "{\"a\":\"\\ud800\\u0041\"}",
            "{\"a\":\"\\udc00\"}",
            "{\"a\":\"\\ud800x\"}",
            "{\"a\":\"raw\ncontrol\"}",
            "{\"a\":\"unterminated}",
            "{\"a\":01}",
            "{\"a\":1.}",
            "{\"a\":.5}",
            "{\"a\":1e}",
            "{\"a\":-}",
            "{\"a\":+1}",
            "{\"a\":tru}",
            "{\"a\":nul}",
            "{\"a\":True}",
            "{'a':'b'}",
            "{a:\"b\"}",
            "{\"a\" \"b\"}",
            "\u{feff}{}",
        ] {
            assert!(parse_string_object(bad).is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn size_cap_and_deep_nesting() {
        let big = format!("{{\"a\":\"{}\"}}", "x".repeat(MAX_INPUT));
        assert!(parse_string_object(&big).is_err());
        let deep = format!("{{\"a\":{}", "[".repeat(100_000));
        assert!(parse_string_object(&deep).is_err());
        // Just under the cap is fine.
        let fits = format!("{{\"a\":\"{}\"}}", "x".repeat(MAX_INPUT - 8));
        assert_eq!(ok(&fits)[0].1.len(), MAX_INPUT - 8);
    }

    #[test]
    fn errors_do_not_echo_input() {
        let e = parse_string_object("{\"token\":\"123456\" junk}").unwrap_err();
        assert!(!e.contains("123456"), "{e}");
    }
}

/// Properties over random answers (issue 13): the API's body is network input.
#[cfg(test)]
mod props {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn any_text_never_panics(s in "\\PC{0,80}|[{}\\[\\]\":,\\\\u0-9a-fA-Ftrn .eE+-]{0,60}") {
            let _ = parse_string_object(&s);
        }

        #[test]
        fn encoded_objects_parse_back(fields in prop::collection::vec(("\\PC{0,8}|.{0,8}", ".{0,24}"), 0..6)) {
            let mut seen = std::collections::HashSet::new();
            let fields: Vec<(String, String)> = fields.into_iter().filter(|(k, _)| seen.insert(k.clone())).collect();
            let refs: Vec<(&str, &str)> = fields.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
            let text = encode_object(&refs);
            prop_assert_eq!(parse_string_object(&text), Ok(fields.clone()));
            // Whitespace between tokens does not change the meaning.
            let spaced = format!(" {{\n{}\t}}\r\n", &text[1..text.len() - 1]);
            prop_assert_eq!(parse_string_object(&spaced), Ok(fields));
        }
    }
}
