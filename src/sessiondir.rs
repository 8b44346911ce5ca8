//! The per-session directory `/tmp/linbit-tunl-{hash}` and the append-only logs inside it.
//!
//! The directory holds the private key, the token (keyboard-interactive path) and the control fifos,
//! so it must be ours alone: created 0700, and a path that already exists is accepted only when it is
//! a real directory owned by us that nobody else can enter. A symlink or a foreign directory is an
//! attack or a mistake, and either way we refuse rather than follow or reuse it.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::OwnedFd;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use rustix::fs::{FlockOperation, Mode as FMode, OFlags};

use sha2::{Digest, Sha256};

pub const BASE: &str = "/tmp";

/// First 12 hex digits of SHA-256(session_id): keeps the ID out of /tmp listings.
pub fn hash(session_id: &str) -> String {
    let d = Sha256::digest(session_id.as_bytes());
    d.iter().take(6).map(|b| format!("{b:02x}")).collect()
}

pub fn dir_for(session_id: &str) -> PathBuf {
    Path::new(BASE).join(format!("linbit-tunl-{}", hash(session_id)))
}

#[derive(Debug)]
pub struct SessionDir {
    pub path: PathBuf,
    /// A shared `flock` on `DIR/lock`, held by every process of the session for its whole life:
    /// while anyone holds it, the session is running, whatever its mode (F16), and only root can
    /// take it in root's 0700 directory (F13). Never read: holding it is its purpose.
    #[allow(dead_code)]
    lock: Option<OwnedFd>,
}

/// The lock file in the session directory; never cleared out with the leftovers.
const LOCK: &str = "lock";

/// Files we may find in a leftover directory and are willing to clear out.
const OUR_FILES: &[&str] = &[
    "tmux.sock",
    "tmux.conf",
    "ssh-ctl.sock",
    "debug.log",
    "ssh.log",
    "chat.fifo",
    "ctl.fifo",
    "known_hosts",
    "askpass.sh",
    "daemon.conf",
    "state",
    "exit",
    "sharekey",
    "daemon.pid",
    "state.new",
    "exit.new",
    "daemon.pid.new",
    "keys.restore",
    "prefix-check.sock",
    "keys.journal",
    "keys.journal.new",
    "target-sshd",
];

impl SessionDir {
    /// Create the directory for a new session, or take over a leftover one after checking it.
    pub fn create(session_id: &str) -> Result<SessionDir, String> {
        Self::create_at(&dir_for(session_id))
    }

    pub fn create_at(path: &Path) -> Result<SessionDir, String> {
        let shown = path.display();
        let in_use = || {
            format!(
                "a linbit-tunl session with this ID is already running on this host ({shown}); \
                 end it with Ctrl-b Q or run with --attach from inside it"
            )
        };
        let leftover = match std::fs::DirBuilder::new().mode(0o700).create(path) {
            Ok(()) => false,
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => true,
            Err(e) => return Err(format!("cannot create session directory {shown}: {e}")),
        };
        Self::check_owned(path)?;
        let lock = rustix::fs::open(
            path.join(LOCK),
            OFlags::RDWR | OFlags::CREATE | OFlags::NOFOLLOW | OFlags::CLOEXEC | OFlags::NONBLOCK,
            FMode::from_raw_mode(0o600),
        )
        .map_err(|e| format!("cannot open {}/{LOCK}: {e}", shown))?;
        // Exclusive while we clear out a leftover: nobody else may be using these files.
        if rustix::fs::flock(&lock, FlockOperation::NonBlockingLockExclusive).is_err() {
            return Err(in_use());
        }
        if leftover {
            // A session from before the lock, or one whose processes all died but tmux.
            if path.join("tmux.sock").exists() && tmux_alive(&path.join("tmux.sock")) {
                return Err(in_use());
            }
            for name in OUR_FILES {
                let p = path.join(name);
                let _ = if p.is_dir() { std::fs::remove_dir_all(&p) } else { std::fs::remove_file(&p) };
            }
        }
        // Then shared, for the whole session, so its daemon can hold it too. (Not atomic: should
        // another start take it exclusively in between, we are the one that gives way.)
        if rustix::fs::flock(&lock, FlockOperation::NonBlockingLockShared).is_err() {
            return Err(in_use());
        }
        Ok(SessionDir { path: path.to_path_buf(), lock: Some(lock) })
    }

    /// Open the directory of a running session (internal roles); the same ownership rules apply,
    /// and this process holds the session's lock too while it lives.
    pub fn open(path: &Path) -> Result<SessionDir, String> {
        Self::check_owned(path)?;
        let flags = OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC | OFlags::NONBLOCK;
        let lock = rustix::fs::open(path.join(LOCK), flags, FMode::empty()).ok();
        if let Some(l) = &lock {
            let _ = rustix::fs::flock(l, FlockOperation::NonBlockingLockShared);
        }
        Ok(SessionDir { path: path.to_path_buf(), lock })
    }

    /// The same directory without the lock (the lock stays with `self`).
    pub fn alias(&self) -> SessionDir {
        SessionDir { path: self.path.clone(), lock: None }
    }

    /// Whether a session is running in `path`: the directory is ours (root's, 0700, no link) and a
    /// process holds its lock. A file anyone else planted proves nothing (F13).
    pub fn running(path: &Path) -> bool {
        if Self::check_owned(path).is_err() {
            return false;
        }
        let flags = OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC | OFlags::NONBLOCK;
        let Ok(fd) = rustix::fs::open(path.join(LOCK), flags, FMode::empty()) else { return false };
        if !rustix::fs::fstat(&fd).is_ok_and(|st| st.st_mode & 0o170000 == 0o100000) {
            return false;
        }
        matches!(rustix::fs::flock(&fd, FlockOperation::NonBlockingLockExclusive), Err(rustix::io::Errno::WOULDBLOCK))
    }

    /// Kept for diagnosis (error, `--debug`): logs and public material stay, live secrets go (F15):
    /// the private key and its certificate, the askpass helper, the token in daemon.conf.
    pub fn drop_secrets(&self) {
        let keydir = self.file("sharekey");
        for f in [crate::auth::KEY_FILE, crate::auth::CERT_FILE] {
            let _ = std::fs::remove_file(keydir.join(f));
        }
        let _ = std::fs::remove_file(self.file(crate::auth::ASKPASS_FILE));
        let conf = self.file("daemon.conf");
        if let Ok(text) = std::fs::read_to_string(&conf) {
            let kept: String = text
                .lines()
                .map(|l| if l.starts_with("token=") { "token=" } else { l })
                .map(|l| format!("{l}\n"))
                .collect();
            if kept != text {
                let _ = std::fs::remove_file(&conf);
                let _ = write_private(&conf, kept.as_bytes(), 0o600);
            }
        }
    }

    fn check_owned(path: &Path) -> Result<(), String> {
        let shown = path.display();
        let md = std::fs::symlink_metadata(path).map_err(|e| format!("cannot inspect {shown}: {e}"))?;
        if md.file_type().is_symlink() {
            return Err(format!("refusing {shown}: it is a symbolic link (possible attack); remove it and retry"));
        }
        if !md.is_dir() {
            return Err(format!("refusing {shown}: it is not a directory; remove it and retry"));
        }
        if md.uid() != rustix::process::geteuid().as_raw() {
            return Err(format!("refusing {shown}: it belongs to uid {}, not to us; remove it and retry", md.uid()));
        }
        if md.mode() & 0o077 != 0 {
            return Err(format!(
                "refusing {shown}: its mode {:o} lets other users in; remove it and retry",
                md.mode() & 0o7777
            ));
        }
        Ok(())
    }

    pub fn file(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    pub fn remove(&self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// Is a tmux server answering on this socket? A stale socket file from a crash is not a live session.
fn tmux_alive(sock: &Path) -> bool {
    std::process::Command::new("tmux")
        .arg("-S")
        .arg(sock)
        .arg("list-sessions")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// Create a fifo with mode 0600 (replacing nothing: the directory was emptied at creation).
pub fn make_fifo(path: &Path) -> Result<(), String> {
    rustix::fs::mknodat(rustix::fs::CWD, path, rustix::fs::FileType::Fifo, rustix::fs::Mode::from_raw_mode(0o600), 0)
        .map_err(|e| format!("cannot create fifo {}: {e}", path.display()))
}

/// Create `path` with `mode` and `data`, failing if anything (file, symlink) is already there:
/// O_CREAT|O_EXCL never follows a link an attacker planted. The mode is applied again through the
/// open descriptor so a restrictive umask cannot leave e.g. askpass.sh without its execute bit.
pub fn write_private(path: &Path, data: &[u8], mode: u32) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(|e| format!("cannot create {}: {e}", path.display()))?;
    f.set_permissions(std::fs::Permissions::from_mode(mode))
        .map_err(|e| format!("cannot chmod {}: {e}", path.display()))?;
    f.write_all(data).and_then(|_| f.sync_all()).map_err(|e| format!("cannot write {}: {e}", path.display()))
}

/// Replace a small hand-over file (`state`, `exit`, `daemon.pid`) in one step: written beside it and
/// renamed over it, so the process polling for it never reads half a file. Mode 0600.
pub fn publish(path: &Path, data: &str) -> Result<(), String> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".new");
    let tmp = PathBuf::from(tmp);
    let _ = std::fs::remove_file(&tmp);
    write_private(&tmp, data.as_bytes(), 0o600)?;
    std::fs::rename(&tmp, path).map_err(|e| format!("cannot publish {}: {e}", path.display()))
}

/// An append-only log where every line carries a UTC timestamp.
pub struct Log {
    file: Option<File>,
}

impl Log {
    pub fn open(path: &Path) -> Log {
        let file = OpenOptions::new().append(true).create(true).mode(0o600).open(path).ok();
        Log { file }
    }

    pub fn line(&mut self, msg: &str) {
        if let Some(f) = &mut self.file {
            let mut s = timestamp_now();
            s.push(' ');
            // One line per call: embedded newlines would let a caller forge entries.
            s.extend(msg.chars().map(|c| if c == '\n' || c == '\r' { ' ' } else { c }));
            s.push('\n');
            let _ = f.write_all(s.as_bytes());
        }
    }
}

/// Seconds and microseconds since the epoch.
pub fn now() -> (u64, u32) {
    let d = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    (d.as_secs(), d.subsec_micros())
}

pub fn timestamp_now() -> String {
    let (s, us) = now();
    let (y, mo, d, h, mi, se) = civil(s);
    format!("{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{se:02}.{:03}Z", us / 1000)
}

/// Compact UTC stamp for file names: 20261125T153000Z.
pub fn file_stamp(secs: u64) -> String {
    let (y, mo, d, h, mi, se) = civil(secs);
    format!("{y:04}{mo:02}{d:02}T{h:02}{mi:02}{se:02}Z")
}

/// UTC calendar fields from Unix seconds (proleptic Gregorian; days-from-civil inverted).
pub fn civil(secs: u64) -> (i64, u32, u32, u32, u32, u32) {
    let days = (secs / 86400) as i64;
    let rem = secs % 86400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + if m <= 2 { 1 } else { 0 };
    (y, m, d, (rem / 3600) as u32, (rem % 3600 / 60) as u32, (rem % 60) as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_is_sha256_prefix() {
        // sha256("swift-fox-jumps-barrel") computed with coreutils sha256sum.
        assert_eq!(hash("swift-fox-jumps-barrel"), "0f05bf25e11e");
        assert_eq!(dir_for("swift-fox-jumps-barrel"), PathBuf::from("/tmp/linbit-tunl-0f05bf25e11e"));
    }

    #[test]
    fn civil_dates() {
        assert_eq!(civil(0), (1970, 1, 1, 0, 0, 0));
        assert_eq!(civil(951_782_400), (2000, 2, 29, 0, 0, 0));
        assert_eq!(civil(1_795_620_600), (2026, 11, 25, 15, 30, 0));
        assert_eq!(file_stamp(1_795_620_600), "20261125T153000Z");
    }

    fn scratch(name: &str) -> PathBuf {
        let p = std::env::temp_dir().join(format!("tunl-sd-test-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        let _ = std::fs::remove_file(&p);
        p
    }

    #[test]
    fn creates_private_dir_and_reuses_own_leftover() {
        let p = scratch("own");
        let d = SessionDir::create_at(&p).unwrap();
        assert_eq!(std::fs::metadata(&p).unwrap().mode() & 0o777, 0o700);
        std::fs::write(d.file("ssh.log"), b"old").unwrap();
        std::fs::write(d.file("notours"), b"keep").unwrap();
        // The session that made it is gone (its lock with it): the directory is a leftover.
        drop(d);
        let d2 = SessionDir::create_at(&p).unwrap();
        assert!(!d2.file("ssh.log").exists(), "our leftover files are cleared");
        assert!(d2.file("notours").exists(), "files we did not make are left alone");
        d2.remove();
        assert!(!p.exists());
    }

    #[test]
    fn refuses_symlink_foreign_and_open_dirs() {
        let target = scratch("target");
        std::fs::create_dir(&target).unwrap();
        let link = scratch("link");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        let e = SessionDir::create_at(&link).unwrap_err();
        assert!(e.contains("symbolic link"), "{e}");
        std::fs::remove_file(&link).unwrap();

        let open = scratch("open");
        std::fs::DirBuilder::new().mode(0o755).create(&open).unwrap();
        std::fs::set_permissions(&open, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        assert!(SessionDir::create_at(&open).unwrap_err().contains("lets other users in"));
        std::fs::remove_dir(&open).unwrap();

        if rustix::process::geteuid().is_root() {
            std::os::unix::fs::chown(&target, Some(65534), Some(65534)).unwrap();
            std::fs::set_permissions(&target, std::os::unix::fs::PermissionsExt::from_mode(0o700)).unwrap();
            assert!(SessionDir::create_at(&target).unwrap_err().contains("belongs to uid 65534"));
        }
        std::fs::remove_dir(&target).unwrap();
    }

    #[test]
    fn the_lock_says_who_runs() {
        // F16: a second start with the same directory is refused while the first one lives.
        let p = scratch("lock");
        let first = SessionDir::create_at(&p).unwrap();
        assert!(SessionDir::running(&p));
        let e = SessionDir::create_at(&p).unwrap_err();
        assert!(e.contains("already running"), "{e}");
        // The daemon of the session shares it; the session runs while either lives.
        let daemon = SessionDir::open(&p).unwrap();
        drop(first);
        assert!(SessionDir::running(&p));
        drop(daemon);
        assert!(!SessionDir::running(&p));
        let again = SessionDir::create_at(&p).unwrap();
        again.remove();
        // F13: a directory someone else owns proves nothing, lock or not.
        if rustix::process::geteuid().is_root() {
            let d = SessionDir::create_at(&p).unwrap();
            std::os::unix::fs::chown(&p, Some(65534), Some(65534)).unwrap();
            assert!(!SessionDir::running(&p));
            d.remove();
        }
    }

    #[test]
    fn kept_directory_loses_its_secrets() {
        let p = scratch("secrets");
        let d = SessionDir::create_at(&p).unwrap();
        std::fs::create_dir(d.file("sharekey")).unwrap();
        for f in ["sharekey/id_ed25519", "sharekey/id_ed25519-cert.pub", "sharekey/id_ed25519.pub", "askpass.sh"] {
            std::fs::write(d.file(f), b"x").unwrap();
        }
        std::fs::write(d.file("daemon.conf"), "session_id=a-b-c-d\ntoken=123456\nuser=root\n").unwrap();
        d.drop_secrets();
        assert!(!d.file("sharekey/id_ed25519").exists() && !d.file("sharekey/id_ed25519-cert.pub").exists());
        assert!(!d.file("askpass.sh").exists());
        assert!(d.file("sharekey/id_ed25519.pub").exists(), "public material stays");
        assert_eq!(std::fs::read_to_string(d.file("daemon.conf")).unwrap(), "session_id=a-b-c-d\ntoken=\nuser=root\n");
        d.remove();
    }

    #[test]
    fn log_lines_are_timestamped_and_single() {
        let p = scratch("log");
        let mut l = Log::open(&p);
        l.line("one\ntwo");
        l.line("three");
        let text = std::fs::read_to_string(&p).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2);
        assert!(lines[0].ends_with("Z one two"), "{}", lines[0]);
        assert!(lines[0].starts_with("20"));
        std::fs::remove_file(&p).unwrap();
    }
}
