//! The relay's recording of a session: asciinema v2 (a JSON header line, then `[t, "o", data]`
//! and `[t, "r", "CxR"]` events) of the shared pane's output as the broker received it. Output
//! arrives in chunks that may split a UTF-8 sequence; the tail is carried to the next chunk so a
//! character is never turned into two replacement marks.

use std::fs::{File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::time::Instant;

use serde_json::json;

pub struct Recording {
    out: BufWriter<File>,
    start: Instant,
    carry: Vec<u8>,
}

impl Recording {
    /// Opens (appending: a broker restarted for the same session continues its file) and writes
    /// the header when the file is new.
    pub fn open(path: &Path, cols: u16, rows: u16, title: &str) -> io::Result<Recording> {
        let file = OpenOptions::new().create(true).append(true).mode(0o640).open(path)?;
        let fresh = file.metadata()?.len() == 0;
        let mut out = BufWriter::with_capacity(64 * 1024, file);
        if fresh {
            let header = json!({
                "version": 2, "width": cols.max(1), "height": rows.max(1),
                "timestamp": crate::audit::now_unix(), "title": title,
            });
            writeln!(out, "{header}")?;
        }
        Ok(Recording { out, start: Instant::now(), carry: Vec::new() })
    }

    fn t(&self) -> f64 {
        (self.start.elapsed().as_micros() as f64) / 1e6
    }

    pub fn output(&mut self, data: &[u8]) -> io::Result<()> {
        self.carry.extend_from_slice(data);
        let cut = utf8_prefix_len(&self.carry);
        let text = String::from_utf8_lossy(&self.carry[..cut]).into_owned();
        self.carry.drain(..cut);
        if text.is_empty() {
            return Ok(());
        }
        // Written directly rather than through a JSON value: this is the hot path of a busy
        // shell, and the escaping is the only part that needs care.
        let t = self.t();
        write!(self.out, "[{t:.6},\"o\",\"")?;
        write_json_escaped(&mut self.out, &text)?;
        self.out.write_all(b"\"]\n")
    }

    pub fn resize(&mut self, cols: u16, rows: u16) -> io::Result<()> {
        let ev = json!([self.t(), "r", format!("{cols}x{rows}")]);
        writeln!(self.out, "{ev}")
    }

    pub fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}

/// The inside of a JSON string: `"` and `\\` escaped, control characters as `\\u00XX`.
fn write_json_escaped(w: &mut impl Write, s: &str) -> io::Result<()> {
    let b = s.as_bytes();
    let mut start = 0;
    for (i, &c) in b.iter().enumerate() {
        if c == b'"' || c == b'\\' || c < 0x20 || c == 0x7f {
            w.write_all(&b[start..i])?;
            match c {
                b'"' => w.write_all(b"\\\"")?,
                b'\\' => w.write_all(b"\\\\")?,
                b'\n' => w.write_all(b"\\n")?,
                b'\r' => w.write_all(b"\\r")?,
                b'\t' => w.write_all(b"\\t")?,
                _ => write!(w, "\\u{c:04x}")?,
            }
            start = i + 1;
        }
    }
    w.write_all(&b[start..])
}

/// The length of `b` without an incomplete UTF-8 sequence at its end (at most 3 bytes held back).
fn utf8_prefix_len(b: &[u8]) -> usize {
    let n = b.len();
    for back in 1..=3.min(n) {
        let c = b[n - back];
        if c & 0xC0 == 0x80 {
            continue; // continuation byte: look further back for the lead
        }
        let need = match c {
            0xC0..=0xDF => 2,
            0xE0..=0xEF => 3,
            0xF0..=0xF7 => 4,
            _ => 1,
        };
        return if need > back { n - back } else { n };
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_utf8_is_joined() {
        assert_eq!(utf8_prefix_len(b"ab"), 2);
        assert_eq!(utf8_prefix_len("aé".as_bytes()), 3);
        assert_eq!(utf8_prefix_len(&"aé".as_bytes()[..2]), 1);
        assert_eq!(utf8_prefix_len(&"a世".as_bytes()[..3]), 1);
        let dir = std::env::temp_dir().join(format!("tunl-rec-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("r.cast");
        let mut r = Recording::open(&p, 80, 24, "t").unwrap();
        let s = "x世y".as_bytes();
        r.output(&s[..2]).unwrap();
        r.output(&s[2..]).unwrap();
        r.resize(100, 30).unwrap();
        r.flush().unwrap();
        let text = std::fs::read_to_string(&p).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].contains("\"version\":2") && lines[0].contains("\"width\":80"));
        assert!(lines[1].ends_with(",\"o\",\"x\"]") && lines[2].ends_with(",\"o\",\"世y\"]"), "{text}");
        let mut ctl = Recording::open(&dir.join("c.cast"), 80, 24, "t").unwrap();
        ctl.output("a\"b\\c\n\u{1b}[0m\u{7f}".as_bytes()).unwrap();
        ctl.flush().unwrap();
        let c = std::fs::read_to_string(dir.join("c.cast")).unwrap();
        let ev: serde_json::Value = serde_json::from_str(c.lines().nth(1).unwrap()).unwrap();
        assert_eq!(ev[2], "a\"b\\c\n\u{1b}[0m\u{7f}");
        assert!(lines[3].ends_with(",\"r\",\"100x30\"]"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
