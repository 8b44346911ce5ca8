//! Small helpers shared by the relay pieces: temp dirs, free ports, deadlines, encodings, processes.

use std::fs;
use std::io;
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;

/// A private directory (mode 0700) under `std::env::temp_dir()`, removed with its contents on drop.
#[derive(Debug)]
pub struct TempDir {
    path: PathBuf,
    tag: String,
}

impl TempDir {
    /// Creates `$TMPDIR/PREFIX-TAG` with a unique tag made of the pid, a counter and the clock.
    pub fn new(prefix: &str) -> io::Result<TempDir> {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        for _ in 0..100 {
            let n = COUNTER.fetch_add(1, Ordering::Relaxed);
            let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
            let tag = format!("{}x{}x{:x}", std::process::id(), n, nanos);
            let path = std::env::temp_dir().join(format!("{prefix}-{tag}"));
            match fs::create_dir(&path) {
                Ok(()) => {
                    fs::set_permissions(&path, fs::Permissions::from_mode(0o700))?;
                    return Ok(TempDir { path, tag });
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(e),
            }
        }
        Err(io::Error::other("could not create a unique temp dir"))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The unique part of the directory name (safe for file and PAM service names).
    pub fn tag(&self) -> &str {
        &self.tag
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if std::env::var_os("TUNL_RELAY_KEEP").is_none() {
            let _ = fs::remove_dir_all(&self.path);
        }
    }
}

/// A TCP port on 127.0.0.1 that was free a moment ago (bind port 0, read it, release it).
pub fn free_port() -> io::Result<u16> {
    let l = TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

/// Polls `cond` every few milliseconds until it returns true or the deadline passes.
pub fn wait_until(deadline: Instant, mut cond: impl FnMut() -> bool) -> bool {
    let mut pause = Duration::from_millis(2);
    loop {
        if cond() {
            return true;
        }
        let now = Instant::now();
        if now >= deadline {
            return false;
        }
        std::thread::sleep(pause.min(deadline - now));
        pause = (pause * 2).min(Duration::from_millis(50));
    }
}

/// True once something accepts TCP connections on 127.0.0.1:port.
pub fn port_open(port: u16) -> bool {
    TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_millis(200)).is_ok()
}

/// Runs a command to completion; an error if it cannot start or exits non-zero (stderr in the error).
pub fn run(cmd: &mut Command) -> io::Result<Output> {
    let out = cmd.stdin(Stdio::null()).output()?;
    if !out.status.success() {
        return Err(io::Error::other(format!(
            "{:?} failed ({}): {}",
            cmd,
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(out)
}

/// Sends SIGTERM by pid (through the `kill` utility: this crate has no libc binding).
pub fn sigterm(pid: u32) {
    let _ = Command::new("kill").args(["-TERM", &pid.to_string()]).stdout(Stdio::null()).stderr(Stdio::null()).status();
}

/// Pids of the direct children of `pid`, read from /proc.
pub fn children_of(pid: u32) -> Vec<u32> {
    let mut kids = Vec::new();
    let Ok(rd) = fs::read_dir("/proc") else { return kids };
    for e in rd.flatten() {
        let Some(p) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else { continue };
        let Ok(stat) = fs::read_to_string(format!("/proc/{p}/stat")) else { continue };
        // Fields after the ")" that ends the command name: state, ppid, ...
        let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else { continue };
        let mut it = rest.split_whitespace();
        let _state = it.next();
        if it.next().and_then(|s| s.parse::<u32>().ok()) == Some(pid) {
            kids.push(p);
        }
    }
    kids
}

/// Ends a child process and the processes it forked (sshd's per-connection children): SIGTERM to the
/// children by pid, SIGTERM to the process, then SIGKILL after a deadline; always reaps it.
pub fn stop_child(child: &mut Child) {
    if let Ok(Some(_)) = child.try_wait() {
        return;
    }
    let pid = child.id();
    for kid in children_of(pid) {
        sigterm(kid);
    }
    sigterm(pid);
    let deadline = Instant::now() + Duration::from_secs(3);
    if !wait_until(deadline, || matches!(child.try_wait(), Ok(Some(_)))) {
        let _ = child.kill();
    }
    let _ = child.wait();
}

/// Standard base64 with padding.
pub fn b64(data: &[u8]) -> String {
    STANDARD.encode(data)
}

/// Strict standard base64 decoding.
pub fn unb64(text: &str) -> Option<Vec<u8>> {
    STANDARD.decode(text).ok()
}

/// Percent-encoding of protocol.md: every byte outside `[A-Za-z0-9._~-]` as `%XX`.
pub fn pct_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for &b in text.as_bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'~' | b'-') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Inverse of [`pct_encode`]; None on a malformed escape. Bytes that are not valid UTF-8 are replaced.
pub fn pct_decode(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = text.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    Some(String::from_utf8_lossy(&out).into_owned())
}

/// Lowercase hex of bytes (file names for accepted keyboard-interactive secrets).
pub fn hex(data: &[u8]) -> String {
    data.iter().map(|b| format!("{b:02x}")).collect()
}

/// The login name of the current user (`id -un`), falling back to `$USER`.
pub fn current_user() -> String {
    Command::new("id")
        .arg("-un")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .filter(|s| !s.is_empty())
        .or_else(|| std::env::var("USER").ok())
        .unwrap_or_else(|| "root".to_string())
}

/// Writes a file with the given mode.
pub fn write_mode(path: &Path, data: &[u8], mode: u32) -> io::Result<()> {
    fs::write(path, data)?;
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pct_round_trip() {
        assert_eq!(pct_encode("Jane Doe/ü"), "Jane%20Doe%2F%C3%BC");
        assert_eq!(pct_decode("Jane%20Doe%2F%C3%BC").as_deref(), Some("Jane Doe/ü"));
        assert_eq!(pct_decode("bad%2"), None);
    }

    #[test]
    fn strict_base64() {
        assert_eq!(unb64(&b64(b"hi\x00")), Some(b"hi\x00".to_vec()));
        assert_eq!(unb64("aGk"), None);
    }
}
