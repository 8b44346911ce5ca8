//! Making relay-supplied text safe to print on the customer's terminal.
//!
//! The relay is untrusted (protocol.md section 5): chat lines, engineer names and NOTE text must never
//! be able to drive the terminal. `neutralize` turns arbitrary bytes into a single line of printable
//! text in which every control character is *visible* (caret notation), so an attempted escape-sequence
//! attack shows up as text instead of being silently swallowed.

/// Placeholder for characters that have no caret notation (C1 controls, bidi/format controls).
const PLACEHOLDER: char = '\u{FFFD}';
const ELLIPSIS: char = '\u{2026}';

/// How one input character is shown.
fn render(c: char, out: &mut String) -> usize {
    match c {
        // Even a tab becomes a space: tab stops are terminal state we do not want to depend on.
        '\t' => {
            out.push(' ');
            1
        }
        // C0 controls (ESC, BEL, CR, LF, ...) in caret notation: ESC -> "^[", LF -> "^J".
        '\u{0}'..='\u{1f}' => {
            out.push('^');
            out.push(char::from(c as u8 + 0x40));
            2
        }
        '\u{7f}' => {
            out.push_str("^?");
            2
        }
        // C1 controls (8-bit CSI U+009B, OSC U+009D, DCS U+0090, ...), bidi embeddings/overrides/isolates
        // and marks (Trojan Source), line/paragraph separators.
        '\u{80}'..='\u{9f}'
        | '\u{202a}'..='\u{202e}'
        | '\u{2066}'..='\u{2069}'
        | '\u{200e}'
        | '\u{200f}'
        | '\u{061c}'
        | '\u{2028}'
        | '\u{2029}'
        // Invisible format characters (General_Category=Cf) and variation selectors: they cannot drive
        // the terminal, but they let one name look like another (`eng\u{200b}@linbit.com`) (F6).
        | '\u{00ad}'
        | '\u{180e}'
        | '\u{200b}'..='\u{200d}'
        | '\u{2060}'..='\u{2064}'
        | '\u{206a}'..='\u{206f}'
        | '\u{fe00}'..='\u{fe0f}'
        | '\u{feff}'
        | '\u{fff9}'..='\u{fffb}'
        | '\u{110bd}'
        | '\u{1bca0}'..='\u{1bca3}'
        | '\u{1d173}'..='\u{1d17a}'
        | '\u{e0000}'..='\u{e007f}'
        | '\u{e0100}'..='\u{e01ef}' => {
            out.push(PLACEHOLDER);
            1
        }
        _ => {
            out.push(c);
            1
        }
    }
}

/// Turn relay-supplied bytes into one line of terminal-safe text of at most `max_chars` characters.
///
/// Invalid UTF-8 becomes U+FFFD; C0 controls and DEL are shown in caret notation (`^[`, `^J`, `^?`;
/// a tab becomes a space); C1 controls and bidi controls become U+FFFD. Newlines are not kept, so one
/// chat line stays one line. If the rendering is longer than `max_chars` it is cut and ends with `…`
/// (the result, ellipsis included, never exceeds `max_chars` characters). Characters are counted as
/// Unicode scalar values, not terminal columns: callers that need column-exact layout must also
/// account for wide characters.
pub fn neutralize(bytes: &[u8], max_chars: usize) -> String {
    if max_chars == 0 {
        return String::new();
    }
    let text = String::from_utf8_lossy(bytes);
    let mut out = String::with_capacity(bytes.len().min(max_chars.saturating_mul(4)));
    let mut count = 0usize;
    // The last cut point (byte length of `out`) that still leaves room for the ellipsis.
    let mut room = 0usize;
    for c in text.chars() {
        if count < max_chars {
            room = out.len();
        }
        count += render(c, &mut out);
        if count > max_chars {
            out.truncate(room);
            out.push(ELLIPSIS);
            return out;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn is_safe(s: &str) -> bool {
        !s.chars()
            .any(|c| c.is_control() || ('\u{202a}'..='\u{202e}').contains(&c) || ('\u{2066}'..='\u{2069}').contains(&c))
    }

    #[test]
    fn plain_text_unchanged() {
        assert_eq!(neutralize(b"hello, world", 80), "hello, world");
        assert_eq!(neutralize("grüße ✓".as_bytes(), 80), "grüße ✓");
    }

    #[test]
    fn c0_caret_notation() {
        assert_eq!(neutralize(b"a\x1b[2Jb", 80), "a^[[2Jb");
        assert_eq!(neutralize(b"line1\nline2\r\n", 80), "line1^Jline2^M^J");
        assert_eq!(neutralize(b"\x00\x07\x7f", 80), "^@^G^?");
        assert_eq!(neutralize(b"a\tb", 80), "a b");
    }

    #[test]
    fn escape_attacks_are_visible_and_inert() {
        let attacks: &[&[u8]] = &[
            b"\x1b[31mred\x1b[0m",
            b"\x1b]52;c;ZWNobyBwd25lZA==\x07",  // OSC 52 clipboard write
            b"\x1b]0;title\x1b\\",              // OSC title with ST
            b"\x1bP+q544e\x1b\\",               // DCS request
            b"\x1b[6n",                         // cursor position report request
            "\u{9b}31m 8-bit CSI".as_bytes(),   // C1 CSI as UTF-8
            b"\x9b31m raw 8-bit CSI",           // invalid UTF-8 byte 0x9b
            "\u{9d}52;c;AAAA\u{9c}".as_bytes(), // C1 OSC/ST
            "\u{202e}evil\u{202c}".as_bytes(),
            "\u{2066}iso\u{2069}".as_bytes(),
        ];
        for a in attacks {
            let s = neutralize(a, 200);
            assert!(is_safe(&s), "unsafe output {s:?} for {a:?}");
            assert!(!s.contains('\x1b'));
        }
        assert_eq!(neutralize("\u{9b}x".as_bytes(), 10), "\u{FFFD}x");
        assert_eq!(neutralize("a\u{202e}b".as_bytes(), 10), "a\u{FFFD}b");
    }

    #[test]
    fn invalid_utf8() {
        assert_eq!(neutralize(b"ok\xff\xfe!", 80), "ok\u{FFFD}\u{FFFD}!");
        assert_eq!(neutralize(b"\xe2\x82", 80), "\u{FFFD}");
        assert!(is_safe(&neutralize(b"\xc2\x9b", 80)));
    }

    #[test]
    fn cap_with_ellipsis() {
        assert_eq!(neutralize(b"abcdef", 6), "abcdef");
        assert_eq!(neutralize(b"abcdefg", 6), "abcde\u{2026}");
        assert_eq!(neutralize(b"abc", 0), "");
        assert_eq!(neutralize(b"abc", 1), "\u{2026}");
        // A caret pair is never split.
        assert_eq!(neutralize(b"abcd\x1bxyz", 6), "abcd\u{2026}");
        assert_eq!(neutralize(b"abc\x1bxyz", 6), "abc^[\u{2026}");
        for max in 0..20 {
            let s = neutralize(b"\x1b\x1b\x1b\x1b\x1b\x1b\x1b\x1b\x1b\x1b\x1b\x1bxx", max);
            assert!(s.chars().count() <= max, "{max}: {s:?}");
        }
    }

    #[test]
    fn invisible_format_characters_are_made_visible() {
        for c in [
            '\u{200b}',
            '\u{200c}',
            '\u{200d}',
            '\u{2060}',
            '\u{2064}',
            '\u{206a}',
            '\u{feff}',
            '\u{00ad}',
            '\u{fff9}',
            '\u{e0041}',
            '\u{fe0f}',
            '\u{e0100}',
            '\u{180e}',
        ] {
            let name = format!("eng{c}@linbit.com");
            assert_eq!(neutralize(name.as_bytes(), 64), "eng\u{FFFD}@linbit.com", "U+{:04X}", c as u32);
        }
        // Visible text around them is untouched.
        assert_eq!(neutralize("Grüße, 日本".as_bytes(), 64), "Grüße, 日本");
    }
}
