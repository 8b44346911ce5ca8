//! The session recording: an asciinema v2 `.cast` file of what the shared pane printed.
//!
//! Events are complete lines, written with `write(2)` only as whole lines: pane output is gathered
//! in memory and written by `flush` (the daemon calls it once per read from tmux, so a 40 MB burst
//! costs one write per read instead of one per `%output` line), and by itself beyond `FLUSH_AT`.
//! A crash at any point leaves a playable file, missing at most the last unflushed read. Output chunks may split a UTF-8 sequence; the incomplete tail waits
//! for the next chunk, and bytes that are not UTF-8 become U+FFFD (the format carries text).
//!
//! Session events are marker events (`"m"`, labels from `marks`), and chat lines also go to the
//! transcript beside the recording: same stem, `.chat.txt`, created with it, mode 0600.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

/// What goes into the header line.
#[derive(Clone, Debug)]
pub struct Header {
    pub width: u16,
    pub height: u16,
    pub term: String,
    pub shell: String,
    pub session_id: String,
}

/// Pending output beyond this is written at once, whether or not the daemon flushes.
const FLUSH_AT: usize = 64 * 1024;

/// A file that only ever holds whole lines: a write that fails (a full disk) is cut back to where
/// the last whole write ended, and nothing is written after it, so what is there stays readable.
struct Lines {
    file: File,
    len: u64,
    broken: bool,
}

impl Lines {
    fn new(file: File) -> Lines {
        Lines { file, len: 0, broken: false }
    }

    fn write(&mut self, bytes: &[u8]) -> io::Result<()> {
        if self.broken {
            return Err(io::Error::other("an earlier write failed"));
        }
        match self.file.write_all(bytes) {
            Ok(()) => {
                self.len += bytes.len() as u64;
                Ok(())
            }
            Err(e) => {
                self.broken = true;
                let _ = self.file.set_len(self.len);
                Err(e)
            }
        }
    }
}

pub struct Recorder {
    file: Lines,
    /// The chat transcript (`transcript_path`).
    chat: Lines,
    /// Complete event lines not yet written.
    pending: Vec<u8>,
    start: Instant,
    /// An incomplete UTF-8 sequence from the end of the previous chunk (at most 3 bytes).
    tail: Vec<u8>,
}

/// The manual's locations, in order of preference, when no override is configured.
pub fn default_dirs(home: Option<&Path>) -> Vec<PathBuf> {
    let mut v = vec![PathBuf::from("/var/log/linbit-tunl")];
    if let Some(h) = home {
        v.push(h.join(".local/share/linbit-tunl"));
    }
    v.push(PathBuf::from("/tmp"));
    v
}

/// `20261125T153000Z` for a time.
pub fn timestamp(t: SystemTime) -> String {
    crate::sessiondir::file_stamp(t.duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0))
}

/// Keep a host name safe as a file name component.
fn file_safe(s: &str) -> String {
    let s: String = s
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || c == '.' || c == '-' || c == '_' { c } else { '_' })
        .collect();
    if s.is_empty() || s.starts_with('.') { format!("host{s}") } else { s }
}

impl Recorder {
    /// Create the recording in `dir` if given (TUNL_RECORDING_DIR), else in the first writable of
    /// `default_dirs(home)`. The file is new (O_EXCL, never following a planted link), mode 0600.
    pub fn create(
        dir: Option<&Path>,
        home: Option<&Path>,
        hostname: &str,
        now: SystemTime,
        header: &Header,
    ) -> io::Result<(Recorder, PathBuf)> {
        let dirs = match dir {
            Some(d) => vec![d.to_path_buf()],
            None => default_dirs(home),
        };
        let name = format!("linbit-tunl_{}_{}", timestamp(now), file_safe(hostname));
        let mut last_err = io::Error::other("no recording directory");
        for d in dirs {
            if d != Path::new("/tmp") {
                let _ = std::fs::DirBuilder::new().recursive(true).mode(0o700).create(&d);
            }
            for n in 0..100 {
                let path = if n == 0 { d.join(format!("{name}.cast")) } else { d.join(format!("{name}-{n}.cast")) };
                let file = match new_private(&path) {
                    Ok(f) => f,
                    Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                    Err(e) => {
                        last_err = e;
                        break;
                    }
                };
                // The pair shares one stem: a name whose transcript is taken (or planted) is not ours.
                let chat = match new_private(&transcript_path(&path)) {
                    Ok(f) => f,
                    Err(e) => {
                        let _ = std::fs::remove_file(&path);
                        if e.kind() == io::ErrorKind::AlreadyExists {
                            continue;
                        }
                        last_err = e;
                        break;
                    }
                };
                let (file, chat) = (Lines::new(file), Lines::new(chat));
                let mut r = Recorder { file, chat, pending: Vec::new(), start: Instant::now(), tail: Vec::new() };
                let cast_name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
                r.write_header(now, header)?;
                r.chat.write(crate::marks::transcript_header(&cast_name).as_bytes())?;
                return Ok((r, path));
            }
        }
        Err(last_err)
    }

    fn write_header(&mut self, now: SystemTime, h: &Header) -> io::Result<()> {
        let ts = now.duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        let line = format!(
            "{{\"version\": 2, \"width\": {}, \"height\": {}, \"timestamp\": {ts}, \"env\": {{\"TERM\": {}, \"SHELL\": {}}}, \"title\": {}}}\n",
            h.width,
            h.height,
            json_str(&h.term),
            json_str(&h.shell),
            json_str(&format!("linbit-tunl {}", h.session_id))
        );
        self.file.write(line.as_bytes())
    }

    fn elapsed(&self) -> String {
        format!("{:.6}", self.start.elapsed().as_secs_f64())
    }

    /// Record bytes the pane printed.
    pub fn output(&mut self, data: &[u8]) -> io::Result<()> {
        let mut bytes = std::mem::take(&mut self.tail);
        bytes.extend_from_slice(data);
        let text = decode_keep_tail(&bytes, &mut self.tail);
        if text.is_empty() {
            return Ok(());
        }
        let line = format!("[{}, \"o\", {}]\n", self.elapsed(), json_str(&text));
        self.pending.extend_from_slice(line.as_bytes());
        if self.pending.len() >= FLUSH_AT {
            return self.flush();
        }
        Ok(())
    }

    /// Write the pending output lines (one `write(2)` of whole lines).
    pub fn flush(&mut self) -> io::Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let r = self.file.write(&self.pending);
        self.pending.clear();
        r
    }

    /// A marker (chapter mark in the player) for a session event, after the output so far.
    pub fn mark(&mut self, label: &str) -> io::Result<()> {
        self.event("m", label)
    }

    /// One line of the chat transcript (a complete, neutralised line from `marks::transcript_line`).
    pub fn transcript(&mut self, line: &str) -> io::Result<()> {
        self.chat.write(line.as_bytes())
    }

    /// Record a change of the pane's size.
    pub fn resize(&mut self, width: u16, height: u16) -> io::Result<()> {
        self.event("r", &format!("{width}x{height}"))
    }

    fn event(&mut self, kind: &str, text: &str) -> io::Result<()> {
        self.flush()?;
        let line = format!("[{}, \"{kind}\", {}]\n", self.elapsed(), json_str(text));
        self.file.write(line.as_bytes())
    }

    /// Write out a pending incomplete sequence (as U+FFFD) and sync the file.
    pub fn finish(mut self) -> io::Result<()> {
        self.flush()?;
        if !self.tail.is_empty() {
            let t = String::from_utf8_lossy(&std::mem::take(&mut self.tail)).into_owned();
            self.event("o", &t)?;
        }
        self.file.file.sync_all()?;
        self.chat.file.sync_all()
    }
}

impl Drop for Recorder {
    /// Whatever ends the recorder, gathered output is not lost.
    fn drop(&mut self) {
        let _ = self.flush();
    }
}

/// The chat transcript beside a recording: `NAME.cast` -> `NAME.chat.txt`.
pub fn transcript_path(cast: &Path) -> PathBuf {
    cast.with_extension("chat.txt")
}

/// A new file, mode 0600, never through a planted link, never an existing file.
fn new_private(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
        .open(path)
}

/// Decode UTF-8, replacing invalid bytes with U+FFFD, but hold back an incomplete sequence at the end.
fn decode_keep_tail(bytes: &[u8], tail: &mut Vec<u8>) -> String {
    let mut out = String::with_capacity(bytes.len());
    let mut rest = bytes;
    loop {
        match std::str::from_utf8(rest) {
            Ok(s) => {
                out.push_str(s);
                return out;
            }
            Err(e) => {
                let good = e.valid_up_to();
                out.push_str(std::str::from_utf8(&rest[..good]).unwrap_or_default());
                match e.error_len() {
                    Some(n) => {
                        out.push('\u{FFFD}');
                        rest = &rest[good + n..];
                    }
                    None => {
                        tail.extend_from_slice(&rest[good..]);
                        return out;
                    }
                }
            }
        }
    }
}

/// A JSON string literal.
///
/// The hot path of recording (every byte of pane output passes here): runs of bytes that need no
/// escaping are copied in one go. Scanning bytes is exact for UTF-8, whose multi-byte sequences
/// never contain an ASCII byte.
pub fn json_str(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = String::with_capacity(s.len() + s.len() / 16 + 2);
    out.push('"');
    let mut start = 0;
    for (i, &c) in b.iter().enumerate() {
        let esc = match c {
            b'"' => "\\\"",
            b'\\' => "\\\\",
            b'\n' => "\\n",
            b'\r' => "\\r",
            b'\t' => "\\t",
            0..0x20 | 0x7f => "",
            _ => continue,
        };
        out.push_str(&s[start..i]);
        if esc.is_empty() {
            out.push_str(&format!("\\u{:04x}", c));
        } else {
            out.push_str(esc);
        }
        start = i + 1;
    }
    out.push_str(&s[start..]);
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    use relay_double::json::J;

    fn parse_json(line: &str) -> J {
        relay_double::json::parse_json(line).unwrap_or_else(|| panic!("not JSON: {line}"))
    }

    fn get<'a>(o: &'a J, k: &str) -> &'a J {
        let J::Obj(v) = o else { panic!("not an object") };
        &v.iter().find(|(kk, _)| kk == k).unwrap_or_else(|| panic!("no {k}")).1
    }

    fn tempdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("tunl-rec-test-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn cast_file_is_asciinema_v2() {
        let dir = tempdir("v2");
        let header = Header {
            width: 80,
            height: 24,
            term: "xterm-256color".into(),
            shell: "/bin/bash".into(),
            session_id: "swift-fox-jumps-barrel".into(),
        };
        let now = UNIX_EPOCH + std::time::Duration::from_secs(1_795_620_600);
        let (mut r, path) = Recorder::create(Some(&dir), None, "node1/x", now, &header).unwrap();
        assert_eq!(path, dir.join("linbit-tunl_20261125T153000Z_node1_x.cast"));
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        // A second recording in the same second gets its own file.
        let (_r2, path2) = Recorder::create(Some(&dir), None, "node1/x", now, &header).unwrap();
        assert_ne!(path, path2);

        let euro = "€".as_bytes(); // e2 82 ac
        r.output(b"hello \"q\" \\ \x1b[1m\r\n").unwrap();
        r.output(&euro[..1]).unwrap();
        r.output(&euro[1..2]).unwrap();
        r.output(&[euro[2], b'!', 0xff, b'x', 0xc3]).unwrap();
        r.resize(100, 30).unwrap();
        r.mark("chat support (eve): hi \"there\"").unwrap();
        r.output(b"after").unwrap();
        r.transcript("2026-11-25T15:30:00Z support (eve): hi\n").unwrap();
        r.finish().unwrap();

        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        let h = parse_json(lines[0]);
        assert_eq!(get(&h, "version"), &J::Num(2.0));
        assert_eq!(get(&h, "width"), &J::Num(80.0));
        assert_eq!(get(&h, "height"), &J::Num(24.0));
        assert_eq!(get(&h, "timestamp"), &J::Num(1_795_620_600.0));
        assert_eq!(get(get(&h, "env"), "TERM"), &J::Str("xterm-256color".into()));
        assert_eq!(get(&h, "title"), &J::Str("linbit-tunl swift-fox-jumps-barrel".into()));
        let mut out = String::new();
        let mut last_t = 0.0;
        let mut kinds = String::new();
        for l in &lines[1..] {
            let J::Arr(v) = parse_json(l) else { panic!("event not an array: {l}") };
            assert_eq!(v.len(), 3);
            let (J::Num(t), J::Str(k), J::Str(s)) = (&v[0], &v[1], &v[2]) else { panic!("{l}") };
            assert!(*t >= last_t);
            last_t = *t;
            kinds.push_str(k);
            match k.as_str() {
                "o" => out.push_str(s),
                "r" => assert_eq!(s, "100x30"),
                _ => assert_eq!(s, "chat support (eve): hi \"there\""),
            }
        }
        // The marker comes after the output written before it, and before what followed.
        assert_eq!(kinds, "oormo");
        assert_eq!(out, "hello \"q\" \\ \x1b[1m\r\n€!\u{FFFD}x\u{FFFD}after");
        // The transcript: same stem, 0600, a header naming the recording, then the lines.
        let chat = dir.join("linbit-tunl_20261125T153000Z_node1_x.chat.txt");
        assert_eq!(transcript_path(&path), chat);
        assert_eq!(std::fs::metadata(&chat).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(
            std::fs::read_to_string(&chat).unwrap(),
            "# linbit-tunl chat transcript for linbit-tunl_20261125T153000Z_node1_x.cast; \
             one line per message: UTC time, sender, text\n\
             2026-11-25T15:30:00Z support (eve): hi\n"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn falls_back_to_a_writable_dir_and_refuses_links() {
        let dir = tempdir("links");
        std::fs::create_dir_all(&dir).unwrap();
        let header =
            Header { width: 1, height: 1, term: String::new(), shell: String::new(), session_id: "a-b-c-d".into() };
        let now = UNIX_EPOCH;
        // A planted symlink at the first name is not followed; the next name is used.
        std::os::unix::fs::symlink("/dev/null", dir.join("linbit-tunl_19700101T000000Z_h.cast")).unwrap();
        // A planted transcript name is not followed either: the pair moves on to a free stem together.
        std::os::unix::fs::symlink("/etc/passwd", dir.join("linbit-tunl_19700101T000000Z_h-1.chat.txt")).unwrap();
        let (_r, p) = Recorder::create(Some(&dir), None, "h", now, &header).unwrap();
        assert_eq!(p, dir.join("linbit-tunl_19700101T000000Z_h-2.cast"));
        assert!(!dir.join("linbit-tunl_19700101T000000Z_h-1.cast").exists(), "a half pair was left behind");
        assert!(dir.join("linbit-tunl_19700101T000000Z_h-2.chat.txt").is_file());
        // An unusable override directory is an error, not a silent fallback.
        let file = dir.join("plainfile");
        std::fs::write(&file, "").unwrap();
        assert!(Recorder::create(Some(&file), None, "h", now, &header).is_err());
        assert_eq!(default_dirs(Some(Path::new("/home/u")))[1], PathBuf::from("/home/u/.local/share/linbit-tunl"));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_full_disk_is_an_error_the_caller_sees() {
        let full = || Lines::new(OpenOptions::new().write(true).open("/dev/full").unwrap());
        let mut r =
            Recorder { file: full(), chat: full(), pending: Vec::new(), start: Instant::now(), tail: Vec::new() };
        assert!(r.mark("relay connected (viewers: 1)").is_err());
        assert!(r.transcript("2026-11-25T15:30:00Z customer: hi\n").is_err());
        r.output(b"x").unwrap();
        assert!(r.flush().is_err());
    }

    #[test]
    fn timestamps() {
        assert_eq!(timestamp(UNIX_EPOCH), "19700101T000000Z");
        assert_eq!(timestamp(UNIX_EPOCH + std::time::Duration::from_secs(951_825_600)), "20000229T120000Z");
    }
}
