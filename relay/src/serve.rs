//! `tunl-relay serve`: the sshd instance and the API in the foreground, for tests and the demo
//! (production runs them as systemd units). It becomes a child subreaper, so the per-connection sshd
//! processes and the brokers that outlive them stay its descendants; on SIGINT, SIGTERM or SIGHUP, or
//! when sshd or the API ends, it ends every descendant, removes the PAM service it installed, and
//! returns.

use std::collections::HashMap;
use std::fs;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::accounts;
use crate::layout::{Config, Layout};
use crate::log;

/// `pid -> ppid` of every process (pure parser of `/proc/PID/stat` below, tested).
pub fn ppid_from_stat(stat: &str) -> Option<i32> {
    // The command name is in parentheses and may contain anything: read after the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(1)?.parse().ok()
}

fn process_table() -> HashMap<i32, i32> {
    let mut m = HashMap::new();
    if let Ok(rd) = fs::read_dir("/proc") {
        for e in rd.flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else { continue };
            if let Some(ppid) = fs::read_to_string(e.path().join("stat")).ok().as_deref().and_then(ppid_from_stat) {
                m.insert(pid, ppid);
            }
        }
    }
    m
}

/// Every descendant of `root` (children, their children, ...).
pub fn descendants(root: i32) -> Vec<i32> {
    let table = process_table();
    let mut out = Vec::new();
    let mut frontier = vec![root];
    while let Some(p) = frontier.pop() {
        for (&pid, &ppid) in &table {
            if ppid == p && !out.contains(&pid) {
                out.push(pid);
                frontier.push(pid);
            }
        }
    }
    out
}

fn reap_all() {
    loop {
        // SAFETY: waitpid with WNOHANG on any child only reaps zombies; no memory is touched.
        let r = unsafe { libc::waitpid(-1, std::ptr::null_mut(), libc::WNOHANG) };
        if r <= 0 {
            break;
        }
    }
}

/// Ends every descendant: SIGTERM, then SIGKILL after `grace`.
pub fn end_descendants(grace: Duration) {
    let me = std::process::id() as i32;
    for sig in [libc::SIGTERM, libc::SIGKILL] {
        let deadline = Instant::now() + grace;
        for pid in descendants(me) {
            // SAFETY: kill(2) on a pid we just found to be our descendant.
            unsafe { libc::kill(pid, sig) };
        }
        while Instant::now() < deadline {
            reap_all();
            if descendants(me).is_empty() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    reap_all();
}

/// Installs the instance's PAM service in `/etc/pam.d` when the root is not `/` (PAM reads
/// nothing else); returns the path to remove at the end.
fn install_pam(layout: &Layout, cfg: &Config) -> Result<Option<PathBuf>, String> {
    if layout.root == Path::new("/") {
        return Ok(None);
    }
    let src = layout.pam_file(&cfg.pam_service);
    let text = fs::read(&src).map_err(|e| format!("{}: {e}", src.display()))?;
    let dst = Path::new("/etc/pam.d").join(&cfg.pam_service);
    match fs::read(&dst) {
        Ok(old) if old == text => return Ok(None), // someone else's copy, identical: leave it to them
        Ok(_) => return Err(format!("{} exists with other content: choose another --pam-service", dst.display())),
        Err(_) => {}
    }
    fs::write(&dst, &text).map_err(|e| format!("{}: {e}", dst.display()))?;
    Ok(Some(dst))
}

fn start_sshd(layout: &Layout, cfg: &Config) -> std::io::Result<Child> {
    fs::create_dir_all("/run/sshd")?;
    Command::new(layout.sshd_link(&cfg.pam_service))
        .arg("-D")
        .arg("-e")
        .arg("-f")
        .arg(layout.sshd_config())
        .stdin(Stdio::null())
        .spawn()
}

fn start_api(layout: &Layout, cfg: &Config) -> Result<Child, String> {
    let user = accounts::user(&cfg.customer_user).ok_or_else(|| format!("no account {}", cfg.customer_user))?;
    let mut cmd = Command::new(&cfg.binary);
    cmd.arg("api").arg("--root").arg(&layout.root).stdin(Stdio::null());
    // std drops root's supplementary groups when it sets the uid.
    cmd.uid(user.uid).gid(user.gid);
    cmd.spawn().map_err(|e| format!("start the API: {e}"))
}

/// Runs until a signal or until sshd or the API ends.
pub fn serve(layout: &Layout) -> Result<(), String> {
    let cfg = Config::load(layout).map_err(|e| e.to_string())?;
    // SAFETY: prctl(PR_SET_CHILD_SUBREAPER) only changes how orphans are reparented.
    if unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) } != 0 {
        return Err(format!("prctl(PR_SET_CHILD_SUBREAPER): {}", std::io::Error::last_os_error()));
    }
    let got = Arc::new(AtomicUsize::new(0));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM, signal_hook::consts::SIGHUP] {
        signal_hook::flag::register_usize(sig, got.clone(), sig as usize).map_err(|e| e.to_string())?;
    }
    let pam = install_pam(layout, &cfg)?;
    let result = run_children(layout, &cfg, &got);
    end_descendants(Duration::from_secs(5));
    if let Some(p) = pam {
        let _ = fs::remove_file(p);
    }
    let _ = fs::remove_file(layout.sshd_pid());
    result
}

fn run_children(layout: &Layout, cfg: &Config, got: &AtomicUsize) -> Result<(), String> {
    let sshd = start_sshd(layout, cfg).map_err(|e| format!("start sshd: {e}"))?;
    let api = start_api(layout, cfg)?;
    log::info(
        "serving",
        &[
            ("sshd_port", &cfg.port.to_string()),
            ("api_port", &cfg.api_port.to_string()),
            ("root", &layout.root.display().to_string()),
        ],
    );
    loop {
        let sig = got.load(Ordering::SeqCst);
        if sig != 0 {
            log::info("stopping", &[("signal", &sig.to_string())]);
            return Ok(());
        }
        // Reaps our own children and the orphans reparented to us (ended sessions' sshd
        // processes, brokers); sshd or the API among them ends the whole relay.
        loop {
            let mut status = 0;
            // SAFETY: waitpid with WNOHANG writes only `status`.
            let r = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
            if r <= 0 {
                break;
            }
            if r == sshd.id() as i32 {
                return Err(format!("sshd ended (wait status {status})"));
            }
            if r == api.id() as i32 {
                return Err(format!("the API ended (wait status {status})"));
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_lines() {
        assert_eq!(ppid_from_stat("123 (sshd: tunl) S 45 123 123 0"), Some(45));
        assert_eq!(ppid_from_stat("9 (a) b) c) R 7 9"), Some(7));
        assert_eq!(ppid_from_stat("garbage"), None);
    }
}
