//! The broker: a unix socket that the ForceCommand shim connects to; each connection is one client
//! session (one `ssh` ControlMaster) and reaches the test as a [`Conn`].

use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::util::{b64, pct_encode, unb64};

/// Longest line accepted from the client (protocol.md section 1), newline included.
pub const MAX_LINE: usize = 262_144;

/// The sockets of live connections, so that dropping the relay ends every session.
pub(crate) type LiveSockets = Arc<Mutex<Vec<UnixStream>>>;

pub(crate) struct Broker {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    path: std::path::PathBuf,
    pub(crate) live: LiveSockets,
}

impl Broker {
    pub(crate) fn start(path: &Path, tx: Sender<Conn>) -> io::Result<Broker> {
        let listener = UnixListener::bind(path)?;
        let stop = Arc::new(AtomicBool::new(false));
        let live: LiveSockets = Arc::default();
        let (stop2, live2) = (stop.clone(), live.clone());
        let thread = std::thread::Builder::new().name("tunl-broker".into()).spawn(move || {
            for stream in listener.incoming() {
                if stop2.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(stream) = stream else { continue };
                let (tx, live) = (tx.clone(), live2.clone());
                // The hello is read on its own thread so a silent peer cannot block other sessions.
                let _ = std::thread::Builder::new().name("tunl-hello".into()).spawn(move || {
                    if let Ok(conn) = Conn::from_shim(stream, &live) {
                        let _ = tx.send(conn);
                    }
                });
            }
        })?;
        Ok(Broker { stop, thread: Some(thread), path: path.to_path_buf(), live })
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop.
        let _ = UnixStream::connect(&self.path);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        for s in self.live.lock().unwrap().drain(..) {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }
}

/// One client session at the broker, from the shim's `HELLO` line on.
///
/// A reader thread logs every line (see [`Conn::lines`]), decodes `O` payloads into
/// [`Conn::output`], answers `PING N` with `PONG N` (unless [`Conn::set_auto_pong`] turned it off),
/// and queues the lines for [`Conn::recv_line`] / [`Conn::wait_for`].
pub struct Conn {
    hello: String,
    fields: Vec<(String, String)>,
    writer: Arc<Mutex<UnixStream>>,
    rx: Receiver<String>,
    log: Arc<Mutex<Vec<String>>>,
    output: Arc<Mutex<Vec<u8>>>,
    bad_output: Arc<AtomicBool>,
    auto_pong: Arc<AtomicBool>,
    reading: Arc<AtomicBool>,
    closed: Arc<AtomicBool>,
    reader: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conn").field("hello", &self.hello).finish_non_exhaustive()
    }
}

impl Conn {
    fn from_shim(stream: UnixStream, live: &LiveSockets) -> io::Result<Conn> {
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        let mut reader = BufReader::new(stream.try_clone()?);
        let mut first = String::new();
        reader.read_line(&mut first)?;
        let hello = first.strip_suffix('\n').and_then(|l| l.strip_prefix("HELLO ")).map(str::to_string);
        let Some(hello) = hello else {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "no HELLO line from the shim"));
        };
        stream.set_read_timeout(None)?;
        live.lock().unwrap().push(stream.try_clone()?);
        let fields =
            hello.split(' ').filter_map(|f| f.split_once('=').map(|(k, v)| (k.to_string(), v.to_string()))).collect();
        let writer = Arc::new(Mutex::new(stream));
        let (tx, rx) = mpsc::channel();
        let log = Arc::<Mutex<Vec<String>>>::default();
        let output = Arc::<Mutex<Vec<u8>>>::default();
        let bad_output = Arc::new(AtomicBool::new(false));
        let auto_pong = Arc::new(AtomicBool::new(true));
        let reading = Arc::new(AtomicBool::new(true));
        let closed = Arc::new(AtomicBool::new(false));
        let st = ReaderState {
            writer: writer.clone(),
            tx,
            log: log.clone(),
            output: output.clone(),
            bad_output: bad_output.clone(),
            auto_pong: auto_pong.clone(),
            reading: reading.clone(),
            closed: closed.clone(),
        };
        let reader = std::thread::Builder::new().name("tunl-conn".into()).spawn(move || st.run(reader))?;
        Ok(Conn {
            hello,
            fields,
            writer,
            rx,
            log,
            output,
            bad_output,
            auto_pong,
            reading,
            closed,
            reader: Some(reader),
        })
    }

    /// The SSH command string as the client sent it (`linbit-tunl/1 id=... ...`).
    pub fn hello_raw(&self) -> &str {
        &self.hello
    }

    /// The first word of the hello (`linbit-tunl/1`).
    pub fn hello_proto(&self) -> &str {
        self.hello.split(' ').next().unwrap_or("")
    }

    /// A `key=value` field of the hello, raw (not percent-decoded).
    pub fn hello_field(&self, key: &str) -> Option<&str> {
        self.fields.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }

    /// Sends one line to the client; the newline is added. Errors are ignored (a test asserts on what
    /// the client does, and a closed link shows up there).
    pub fn send(&mut self, line: &str) {
        let _ = self.try_send(line);
    }

    /// Like [`Conn::send`] but reports a write error.
    pub fn try_send(&mut self, line: &str) -> io::Result<()> {
        let mut w = self.writer.lock().unwrap();
        let mut buf = Vec::with_capacity(line.len() + 1);
        buf.extend_from_slice(line.as_bytes());
        buf.push(b'\n');
        w.write_all(&buf)
    }

    /// Sends raw bytes as they are (for malformed-input tests: no newline added).
    pub fn send_raw(&mut self, bytes: &[u8]) {
        let _ = self.writer.lock().unwrap().write_all(bytes);
    }

    /// `WELCOME proto=1 viewers=N`.
    pub fn welcome(&mut self, viewers: u32) {
        self.send(&format!("WELCOME proto=1 viewers={viewers}"));
    }

    /// `ERROR code=CODE msg=PCT`.
    pub fn error(&mut self, code: &str, msg: &str) {
        self.send(&format!("ERROR code={code} msg={}", pct_encode(msg)));
    }

    /// The next line from the client, waiting until the deadline; None on timeout or closed link.
    pub fn recv_line(&mut self, deadline: Instant) -> Option<String> {
        let wait = deadline.saturating_duration_since(Instant::now());
        match self.rx.recv_timeout(wait) {
            Ok(l) => Some(l),
            Err(RecvTimeoutError::Timeout) | Err(RecvTimeoutError::Disconnected) => None,
        }
    }

    /// Receives lines until one satisfies `pred` (returned) or the deadline passes (None). Every line
    /// stays in [`Conn::lines`].
    pub fn wait_for(&mut self, deadline: Instant, pred: impl Fn(&str) -> bool) -> Option<String> {
        while let Some(l) = self.recv_line(deadline) {
            if pred(&l) {
                return Some(l);
            }
        }
        None
    }

    /// Waits for the first line with this verb (`"STATE"`, `"TUNNEL_OPEN"`, ...).
    pub fn wait_verb(&mut self, deadline: Instant, verb: &str) -> Option<String> {
        self.wait_for(deadline, |l| l.split(' ').next() == Some(verb))
    }

    /// Waits until the decoded `O` output satisfies `pred`; returns whether it did.
    pub fn wait_output(&mut self, deadline: Instant, pred: impl Fn(&[u8]) -> bool) -> bool {
        crate::util::wait_until(deadline, || pred(&self.output.lock().unwrap()))
    }

    /// Waits until the client side closed the link (EOF at the broker).
    pub fn wait_closed(&mut self, deadline: Instant) -> bool {
        crate::util::wait_until(deadline, || self.closed.load(Ordering::SeqCst))
    }

    /// True once the link reached EOF.
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::SeqCst)
    }

    /// Every line received from the client so far, in order (whether or not it was consumed).
    pub fn lines(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }

    /// The concatenated, decoded payloads of every `O` line received so far.
    pub fn output(&self) -> Vec<u8> {
        self.output.lock().unwrap().clone()
    }

    /// The output as lossy UTF-8 (convenient for `contains`).
    pub fn output_text(&self) -> String {
        String::from_utf8_lossy(&self.output()).into_owned()
    }

    /// True if any `O` line carried a payload that is not strict base64.
    pub fn saw_bad_output(&self) -> bool {
        self.bad_output.load(Ordering::SeqCst)
    }

    /// Turns the automatic `PONG` answer to `PING` on or off (on by default).
    pub fn set_auto_pong(&self, on: bool) {
        self.auto_pong.store(on, Ordering::SeqCst);
    }

    /// Stops (false) or resumes (true) reading from the client: a relay that still sends (PING, K)
    /// but takes nothing, so the client's lines back up in ssh and in its own queue. Lines already
    /// read stay readable; while stopped, PING gets no automatic PONG.
    pub fn set_reading(&self, on: bool) {
        self.reading.store(on, Ordering::SeqCst);
    }

    /// Closes the socket: the shim exits and the client's ssh session ends (a dropped link).
    pub fn drop_link(self) {
        drop(self)
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        if let Ok(w) = self.writer.lock() {
            let _ = w.shutdown(std::net::Shutdown::Both);
        }
        // A reader told to stop reading must see the shutdown to end.
        self.reading.store(true, Ordering::SeqCst);
        if let Some(t) = self.reader.take() {
            let _ = t.join();
        }
    }
}

struct ReaderState {
    writer: Arc<Mutex<UnixStream>>,
    tx: Sender<String>,
    log: Arc<Mutex<Vec<String>>>,
    output: Arc<Mutex<Vec<u8>>>,
    bad_output: Arc<AtomicBool>,
    auto_pong: Arc<AtomicBool>,
    reading: Arc<AtomicBool>,
    closed: Arc<AtomicBool>,
}

impl ReaderState {
    fn run(self, mut reader: BufReader<UnixStream>) {
        let mut buf = Vec::new();
        loop {
            // Lines already buffered are still taken; nothing more is read from the socket.
            while !self.reading.load(Ordering::SeqCst) && reader.buffer().is_empty() {
                std::thread::sleep(Duration::from_millis(20));
            }
            buf.clear();
            match (&mut reader).take(MAX_LINE as u64 + 1).read_until(b'\n', &mut buf) {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
            if buf.last() == Some(&b'\n') {
                buf.pop();
            }
            let line = String::from_utf8_lossy(&buf).into_owned();
            if let Some(p) = line.strip_prefix("O ") {
                match unb64(p) {
                    Some(bytes) => self.output.lock().unwrap().extend_from_slice(&bytes),
                    None => self.bad_output.store(true, Ordering::SeqCst),
                }
            }
            if let Some(n) = line.strip_prefix("PING ")
                && self.auto_pong.load(Ordering::SeqCst)
            {
                let _ = self.writer.lock().unwrap().write_all(format!("PONG {n}\n").as_bytes());
            }
            self.log.lock().unwrap().push(line.clone());
            let _ = self.tx.send(line);
        }
        self.closed.store(true, Ordering::SeqCst);
    }
}

use std::io::Read as _;

/// `K B64` with the given keystroke bytes.
pub fn k_line(bytes: &[u8]) -> String {
    format!("K {}", b64(bytes))
}

/// `CHAT from=PCT B64`.
pub fn chat_line(from: &str, text: &str) -> String {
    format!("CHAT from={} {}", pct_encode(from), b64(text.as_bytes()))
}

/// `NOTE B64` (an empty text clears the note).
pub fn note_line(text: &str) -> String {
    format!("NOTE {}", b64(text.as_bytes()))
}

/// `UPGRADE req=ID from=PCT B64(keys)`.
pub fn upgrade_line(req: &str, from: &str, keys_text: &str) -> String {
    format!("UPGRADE req={req} from={} {}", pct_encode(from), b64(keys_text.as_bytes()))
}

/// `CLOSE reason=PCT`.
pub fn close_line(reason: &str) -> String {
    format!("CLOSE reason={}", pct_encode(reason))
}

/// The `key=value` field of a protocol line, raw.
pub fn line_field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split(' ').skip(1).find_map(|f| f.strip_prefix(key).and_then(|r| r.strip_prefix('=')))
}
