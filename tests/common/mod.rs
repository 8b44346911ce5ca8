//! Shared harness for the end-to-end tests: the real binary, the test relay, a customer terminal.
#![allow(dead_code)]

use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[allow(unused_imports)]
pub use tunl_relay::{Conn, Relay, RelayOpts};

pub const BIN: &str = env!("CARGO_BIN_EXE_linbit-tunl");

pub fn secs(n: u64) -> Instant {
    Instant::now() + Duration::from_secs(n)
}

pub fn session_dir(id: &str) -> PathBuf {
    use sha2::{Digest, Sha256};
    let d = Sha256::digest(id.as_bytes());
    let h: String = d.iter().take(6).map(|b| format!("{b:02x}")).collect();
    PathBuf::from(format!("/tmp/linbit-tunl-{h}"))
}

/// A session ID unique to this test process and call, so parallel tests never share a directory.
pub fn unique_id(word: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    let letters = |mut v: u32| {
        let mut s = String::new();
        for _ in 0..6 {
            s.push((b'a' + (v % 26) as u8) as char);
            v /= 26;
        }
        s
    };
    format!("{word}-{}-{}-test", letters(std::process::id()), letters(n))
}

/// A scratch directory removed on drop.
pub struct Scratch(pub PathBuf);

impl Scratch {
    pub fn new(tag: &str) -> Scratch {
        static N: AtomicU32 = AtomicU32::new(0);
        let p = std::env::temp_dir().join(format!(
            "tunl-e2e-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        Scratch(p)
    }
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A PATH with `ssh` but no `tmux`: the host that only `--tunnel` serves.
pub fn path_without_tmux(scratch: &Scratch) -> String {
    let bin = scratch.path().join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    let real = which("ssh").expect("ssh not installed");
    let _ = std::os::unix::fs::symlink(real, bin.join("ssh"));
    bin.display().to_string()
}

pub fn which(name: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|d| d.join(name))
        .find(|p| std::fs::metadata(p).map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0).unwrap_or(false))
}

/// The client in the foreground (`--tunnel` without tmux), its stderr collected as it comes.
pub struct Foreground {
    pub child: Child,
    pub stderr: Arc<Mutex<Vec<u8>>>,
    pub id: String,
}

impl Foreground {
    pub fn start(relay: &Relay, id: &str, args: &[&str], env: &[(&str, &str)], scratch: &Scratch) -> Foreground {
        let mut c = Command::new(BIN);
        c.args(args).arg(id).env_clear();
        c.env("PATH", path_without_tmux(scratch)).env("USER", relay.user()).env("HOME", scratch.path());
        c.env("TUNL_AUTHKEYS_FILE", scratch.path().join("authorized_keys"));
        c.env("TUNL_RECORDING_DIR", scratch.path());
        for (k, v) in relay.env() {
            c.env(k, v);
        }
        for (k, v) in env {
            c.env(k, v);
        }
        c.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped());
        let mut child = c.spawn().unwrap();
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let mut pipe = child.stderr.take().unwrap();
        let sink = stderr.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = pipe.read(&mut buf) {
                if n == 0 {
                    break;
                }
                sink.lock().unwrap().extend_from_slice(&buf[..n]);
            }
        });
        Foreground { child, stderr, id: id.to_string() }
    }

    pub fn stderr_text(&self) -> String {
        String::from_utf8_lossy(&self.stderr.lock().unwrap()).into_owned()
    }

    pub fn wait_stderr(&self, deadline: Instant, needle: &str) -> bool {
        while Instant::now() < deadline {
            if self.stderr_text().contains(needle) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    /// Wait for the exit status, killing the client at the deadline.
    pub fn wait(&mut self, deadline: Instant) -> Option<i32> {
        while Instant::now() < deadline {
            if let Ok(Some(st)) = self.child.try_wait() {
                // Let the reader thread collect the last words.
                std::thread::sleep(Duration::from_millis(50));
                return st.code();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        None
    }

    pub fn signal(&self, sig: &str) {
        Command::new("kill").args(["-s", sig, &self.child.id().to_string()]).status().unwrap();
    }

    /// Everything that explains a failure: the client's stderr and the session's ssh.log.
    pub fn diag(&self) -> String {
        format!("stderr:\n{}\nssh.log:\n{}", self.stderr_text(), self.ssh_log())
    }

    pub fn ssh_log(&self) -> String {
        std::fs::read_to_string(session_dir(&self.id).join("ssh.log")).unwrap_or_default()
    }
}

impl Drop for Foreground {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        let _ = std::fs::remove_dir_all(session_dir(&self.id));
    }
}

/// Processes whose command line mentions `needle` (to prove nothing is left behind).
pub fn processes_mentioning(needle: &str) -> Vec<String> {
    let mut found = Vec::new();
    if let Ok(rd) = std::fs::read_dir("/proc") {
        for e in rd.flatten() {
            let name = e.file_name();
            let Some(pid) = name.to_str().filter(|s| s.bytes().all(|b| b.is_ascii_digit())) else { continue };
            if let Ok(cmd) = std::fs::read(e.path().join("cmdline")) {
                let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
                if cmd.contains(needle) {
                    found.push(format!("{pid}: {cmd}"));
                }
            }
        }
    }
    found
}

/// Wait until no process mentions `needle`.
pub fn wait_no_processes(needle: &str, deadline: Instant) -> Vec<String> {
    loop {
        let p = processes_mentioning(needle);
        if p.is_empty() || Instant::now() >= deadline {
            return p;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
