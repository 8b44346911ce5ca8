//! Binds a keyboard-interactive login to the session its answer named, as a relay certificate's
//! key ID binds a certificate login: `pam-ki` (root, under sshd's PAM) writes which session the
//! answer was for, `produce` (the customer's account) compares it with the hello's.
//!
//! What both see of one ssh connection is sshd's per-connection process (the privileged monitor):
//! `pam-ki` is its grandchild (pam_exec's child of sshd's PAM process, a fork of the monitor),
//! `produce` too (exec'd from the session child of the monitor's post-authentication process).
//! The grant is kept under that process's pid and start time, which no other connection shares.
//! sshd exports nothing else a PAM program writes (pam_exec cannot set the PAM environment, and
//! `ExposeAuthInfo` records only `keyboard-interactive/pam`).

use std::fs;
use std::io;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use crate::layout::Layout;

/// A grant older than this is of no use (the hello follows the login within `LoginGraceTime`).
const KEEP: Duration = Duration::from_secs(600);

/// `(ppid, start time in clock ticks)` from the text of `/proc/PID/stat` (pure, tested).
pub fn parse_stat(stat: &str) -> Option<(i32, u64)> {
    // The command name is in parentheses and may contain anything: read after the last ')'.
    let f: Vec<&str> = stat[stat.rfind(')')? + 1..].split_whitespace().collect();
    // After the name: state(3) ppid(4) ... starttime(22), numbered as in proc(5).
    Some((f.get(1)?.parse().ok()?, f.get(19)?.parse().ok()?))
}

fn stat_of(pid: i32) -> Option<(i32, u64)> {
    parse_stat(&fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// The key of the connection process `pid`: `PID-STARTTIME`.
fn key(pid: i32) -> Option<String> {
    Some(format!("{pid}-{}", stat_of(pid)?.1))
}

fn dir(layout: &Layout) -> PathBuf {
    layout.run().join("ki")
}

/// For `pam-ki`: the connection it answers for, its grandparent, which must be a child of the
/// instance's listening sshd (anything else is a process tree this code does not know: refused,
/// so that a grant can never cover the listener and with it every connection).
pub fn connection_of_pam(layout: &Layout) -> Result<String, String> {
    let unknown = |what: &str| format!("cannot tell which ssh connection this is ({what})");
    let pam = stat_of(std::process::id() as i32).ok_or_else(|| unknown("no parent"))?.0;
    let monitor = stat_of(pam).ok_or_else(|| unknown("no PAM process"))?.0;
    let listener: i32 = fs::read_to_string(layout.sshd_pid())
        .ok()
        .and_then(|t| t.trim().parse().ok())
        .ok_or_else(|| unknown("no sshd.pid"))?;
    match stat_of(monitor) {
        Some((parent, _)) if parent == listener && monitor != listener => key(monitor).ok_or_else(|| unknown("gone")),
        _ => Err(unknown("sshd's process tree is not the one expected")),
    }
}

/// For `produce`: its grandparent, the same connection process.
pub fn connection_of_session() -> Option<String> {
    let parent = stat_of(std::process::id() as i32)?.0;
    key(stat_of(parent)?.0)
}

/// Records that the connection `conn` answered for session `sid` (root: `pam-ki`). The directory
/// is readable by the customers' group only: a session ID is a keyboard-interactive credential.
pub fn record(layout: &Layout, customer_gid: u32, conn: &str, sid: &str) -> io::Result<()> {
    let d = dir(layout);
    if !d.is_dir() {
        fs::DirBuilder::new().mode(0o750).create(&d)?;
    }
    rustix::fs::chown(&d, None, Some(rustix::fs::Gid::from_raw(customer_gid)))?;
    fs::set_permissions(&d, fs::Permissions::from_mode(0o750))?;
    prune(&d);
    let tmp = d.join(format!(".{conn}.tmp"));
    let mut f = fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o640).open(&tmp)?;
    rustix::fs::fchown(&f, None, Some(rustix::fs::Gid::from_raw(customer_gid)))?;
    io::Write::write_all(&mut f, format!("{sid}\n").as_bytes())?;
    fs::rename(&tmp, d.join(conn))
}

/// The session the connection `conn` answered for, if a fresh grant says so.
pub fn lookup(layout: &Layout, conn: &str) -> Option<String> {
    let p = dir(layout).join(conn);
    let fresh = fs::metadata(&p).ok()?.modified().ok()?.elapsed().is_ok_and(|age| age < KEEP);
    let text = fs::read_to_string(&p).ok()?;
    let sid = text.strip_suffix('\n')?;
    (fresh && crate::hello::valid_session_id(sid)).then(|| sid.to_string())
}

/// Forgets grants whose login is long over.
fn prune(d: &std::path::Path) {
    let Ok(rd) = fs::read_dir(d) else { return };
    for e in rd.flatten() {
        let old = e
            .metadata()
            .and_then(|m| m.modified())
            .map(|t| SystemTime::now().duration_since(t).is_ok_and(|age| age > KEEP))
            .unwrap_or(false);
        if old {
            let _ = fs::remove_file(e.path());
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn ppid_and_start_time_after_the_last_parenthesis() {
        let stat = "4242 (sshd: a) b) S 4000 4242 4242 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 987654 1000 100";
        assert_eq!(super::parse_stat(stat), Some((4000, 987654)));
        assert_eq!(super::parse_stat("1 (init) S"), None);
        assert_eq!(super::parse_stat("garbage"), None);
    }
}
