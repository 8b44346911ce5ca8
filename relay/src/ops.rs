//! Operations: `tunl-relay status` (sessions, viewers, tunnels) and `tunl-relay expire` (pending
//! and idle sessions end; recordings, audit logs and registry rows past retention go).

use std::fs;
use std::path::Path;
use std::time::{Duration, SystemTime};

use crate::layout::{Config, Layout};
use crate::log;
use crate::registry::{Registry, Session, Sqlite};

/// One table row per session (pure, tested). Free text is neutralised: it came from support or a
/// customer's hello and is printed on an admin's terminal.
pub fn status_line(s: &Session, now: i64) -> String {
    let port = s.tunnel_port.map(|p| p.to_string()).unwrap_or_else(|| "-".into());
    let clean = |t: &str| if t.is_empty() { "-".to_string() } else { tunl_wire::neutralize(t).replace(' ', "_") };
    let age = |t: i64| {
        let d = now - t;
        if d < 0 { format!("in {}m", (-d) / 60) } else { format!("{}m ago", d / 60) }
    };
    format!(
        "{:<36} {:<12} {:>7} {:>6} {:<16} {:<10} {:<16} {:<16} {}",
        s.id,
        s.state.as_str(),
        s.viewers,
        port,
        clean(&s.host),
        clean(&s.user),
        clean(&s.case),
        clean(&s.customer),
        if s.state == crate::registry::State::Pending {
            format!("expires {}", age(s.expires))
        } else {
            format!("seen {}", age(s.last_seen))
        }
    )
}

pub fn status(layout: &Layout) -> Result<(), String> {
    let cfg = Config::load(layout).map_err(|e| e.to_string())?;
    let reg = Sqlite::open(&layout.registry_db()).map_err(|e| e.to_string())?;
    let now = crate::now();
    let sessions = reg.list(now - 86400).map_err(|e| e.to_string())?;
    let sshd = fs::read_to_string(layout.sshd_pid()).ok().map(|p| p.trim().to_string());
    let running = sshd.as_deref().is_some_and(|p| Path::new("/proc").join(p).exists());
    println!(
        "sshd port {}: {}; API port {}",
        cfg.port,
        if running { format!("running (pid {})", sshd.unwrap_or_default()) } else { "not running".into() },
        cfg.api_port
    );
    let live = sessions.iter().filter(|s| s.state.is_live()).count();
    let viewers: u32 = sessions.iter().map(|s| s.viewers).sum();
    let tunnels = sessions.iter().filter(|s| s.tunnel_port.is_some()).count();
    println!("{} sessions ({live} live), {viewers} viewers, {tunnels} tunnels", sessions.len());
    println!(
        "{:<36} {:<12} {:>7} {:>6} {:<16} {:<10} {:<16} {:<16} WHEN",
        "ID", "STATE", "VIEWERS", "TUNNEL", "HOST", "USER", "CASE", "CUSTOMER"
    );
    for s in &sessions {
        println!("{}", status_line(s, now));
    }
    Ok(())
}

/// Removes regular files directly in `dir` (and one level of per-session subdirectories) last
/// modified before `cutoff`; returns how many.
pub fn remove_older(dir: &Path, cutoff: SystemTime) -> usize {
    let mut n = 0;
    let Ok(rd) = fs::read_dir(dir) else { return 0 };
    for e in rd.flatten() {
        let Ok(md) = e.path().symlink_metadata() else { continue };
        if md.is_dir() {
            n += remove_older(&e.path(), cutoff);
            let _ = fs::remove_dir(e.path()); // only when it is empty now
        } else if md.is_file() && md.modified().is_ok_and(|m| m < cutoff) && fs::remove_file(e.path()).is_ok() {
            n += 1;
        }
    }
    n
}

pub fn expire(layout: &Layout) -> Result<(), String> {
    let cfg = Config::load(layout).map_err(|e| e.to_string())?;
    let reg = Sqlite::open(&layout.registry_db()).map_err(|e| e.to_string())?;
    let now = crate::now();
    let idle = (cfg.idle_minutes as i64).saturating_mul(60);
    let ended = reg.expire(now, idle).map_err(|e| e.to_string())?;
    for id in &ended {
        log::info("session-expired", &[("id", id)]);
    }
    let keep = Duration::from_secs(cfg.retain_days.saturating_mul(86400));
    let cutoff = SystemTime::now().checked_sub(keep).unwrap_or(SystemTime::UNIX_EPOCH);
    let files = remove_older(&layout.recordings(), cutoff) + remove_older(&layout.audit(), cutoff);
    let rows = reg.purge(now.saturating_sub(keep.as_secs() as i64)).map_err(|e| e.to_string())?;
    log::info(
        "expire-done",
        &[
            ("expired", &ended.len().to_string()),
            ("files_removed", &files.to_string()),
            ("sessions_forgotten", &rows.to_string()),
        ],
    );
    println!("expired {} sessions, removed {files} old files, forgot {rows} old sessions", ended.len());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::{NewSession, Sqlite};

    #[test]
    fn status_lines_are_one_line_and_clean() {
        let r = Sqlite::in_memory().unwrap();
        let n = NewSession {
            case: "C 1\x1b[31m".into(),
            customer: "A\nB".into(),
            expires_minutes: 10,
            ..Default::default()
        };
        let (s, _) = r.create(&n, 1000).unwrap();
        let l = status_line(&s, 1000);
        assert!(l.starts_with(&s.id) && l.contains("pending") && l.contains("expires in 10m"), "{l}");
        assert!(!l.contains('\x1b') && !l.contains('\n'), "{l:?}");
    }

    #[test]
    fn retention_removes_only_old_files() {
        let d = std::env::temp_dir().join(format!("tunl-retention-{}", std::process::id()));
        fs::create_dir_all(d.join("sess")).unwrap();
        fs::write(d.join("old.cast"), b"x").unwrap();
        fs::write(d.join("sess/new.jsonl"), b"x").unwrap();
        let old = SystemTime::now() - Duration::from_secs(10 * 86400);
        fs::File::options().write(true).open(d.join("old.cast")).unwrap().set_modified(old).unwrap();
        assert_eq!(remove_older(&d, SystemTime::now() - Duration::from_secs(86400)), 1);
        assert!(!d.join("old.cast").exists() && d.join("sess/new.jsonl").exists());
        fs::remove_dir_all(&d).unwrap();
    }
}
