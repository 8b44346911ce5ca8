//! authorized_keys and the session directory under faults and local attackers (review F8-F16, F22):
//! the real binary in `--tunnel` mode without tmux, the test relay, and a second real sshd as the
//! customer's SSH target that reads the test's authorized_keys file, so "the key works" and "the key
//! is refused" are what a real sshd says.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::*;
use relay_double::{SupportKey, TargetSshd, line_field, support_login, upgrade_line};

const TOKEN: &str = "424242";
const OK: &str = "KEYS-OK";

/// Whether `key` logs in as root at 127.0.0.1:`port` (optionally from the local address `from`).
fn login_from(port: u16, key: &SupportKey, from: Option<&str>) -> bool {
    let out = match from {
        None => support_login(port, key, "root", &format!("echo {OK}")).expect("ssh runs"),
        Some(src) => ssh_from(port, key, src),
    };
    out.status.success() && String::from_utf8_lossy(&out.stdout).contains(OK)
}

fn ssh_from(port: u16, key: &SupportKey, src: &str) -> Output {
    Command::new("ssh")
        .args(["-F", "/dev/null", "-p", &port.to_string(), "-i"])
        .arg(&key.private_path)
        .args(["-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "-o", "BatchMode=yes"])
        .args(["-o", "IdentitiesOnly=yes", "-o", "ConnectTimeout=10", "-o", "LogLevel=ERROR"])
        .args(["-o", &format!("BindAddress={src}")])
        .arg("root@127.0.0.1")
        .arg(format!("echo {OK}"))
        .stdin(Stdio::null())
        .output()
        .expect("ssh runs")
}

fn read(path: &Path) -> String {
    String::from_utf8_lossy(&std::fs::read(path).unwrap_or_default()).into_owned()
}

struct Bed {
    target: TargetSshd,
    key: SupportKey,
    /// A key of the customer's own, to show their lines still work.
    mine: SupportKey,
    relay: Relay,
    scratch: Scratch,
}

impl Bed {
    fn new(tag: &str) -> Bed {
        let scratch = Scratch::new(tag);
        let relay = Relay::start(RelayOpts::default()).expect("test relay");
        let target = TargetSshd::start(&scratch.path().join("authorized_keys")).expect("target sshd");
        let keydir = scratch.path().join("support");
        std::fs::create_dir_all(&keydir).unwrap();
        let key = SupportKey::generate(&keydir).expect("support key");
        let mine = SupportKey::generate(&keydir).expect("customer key");
        Bed { target, key, mine, relay, scratch }
    }
    fn authkeys(&self) -> PathBuf {
        self.scratch.path().join("authorized_keys")
    }
    fn target_arg(&self) -> String {
        format!("127.0.0.1:{}", self.target.port)
    }
    fn start(&self, id: &str, extra: &[&str], env: &[(&str, &str)]) -> Foreground {
        self.relay.register(id, Some(TOKEN));
        let target = self.target_arg();
        let mut args = vec!["--tunnel", "--token", TOKEN, "--target", &target];
        args.extend_from_slice(extra);
        Foreground::start(&self.relay, id, &args, env, &self.scratch)
    }
    fn connect(&self, id: &str, extra: &[&str], env: &[(&str, &str)]) -> (Foreground, Conn) {
        let fg = self.start(id, extra, env);
        let mut conn = self.relay.accept(secs(30)).unwrap_or_else(|| panic!("no session at the relay: {}", fg.diag()));
        conn.welcome(0);
        assert!(conn.wait_verb(secs(10), "STATE").is_some(), "no STATE: {:?}\n{}", conn.lines(), fg.diag());
        (fg, conn)
    }
    /// UPGRADE -> TUNNEL_OPEN; returns the relay-side port.
    fn grant(&self, fg: &Foreground, conn: &mut Conn, req: &str) -> u16 {
        conn.send(&upgrade_line(req, "eng@linbit.com", &format!("{}\n", self.key.public_line)));
        let open = conn
            .wait_for(secs(20), |l| l.starts_with("TUNNEL_OPEN ") || l.starts_with("TUNNEL_REJECTED "))
            .unwrap_or_else(|| panic!("no answer to UPGRADE: {:?}\n{}", conn.lines(), fg.diag()));
        assert!(open.starts_with("TUNNEL_OPEN "), "{open}\n{}", fg.diag());
        line_field(&open, "port").and_then(|p| p.parse().ok()).expect("port")
    }
    fn revoke(&self, fg: &Foreground, conn: &mut Conn) {
        conn.send("REVOKE");
        assert!(conn.wait_verb(secs(15), "TUNNEL_CLOSED").is_some(), "{:?}\n{}", conn.lines(), fg.diag());
    }
    fn support_line(&self) -> String {
        read(&self.authkeys())
            .lines()
            .find(|l| l.contains(self.key.public_line.split(' ').nth(1).unwrap()))
            .unwrap_or_else(|| panic!("support's key is not installed: {}", read(&self.authkeys())))
            .to_string()
    }
}

// ---- F8 ------------------------------------------------------------------------------------------

/// The customer's file has no final newline; during the session an admin appends a key with `>>`.
/// Our end marker must still be a line of its own, so the revoke removes support's key and the
/// appended key stays intact and working.
#[test]
fn a_key_appended_during_the_session_keeps_the_block_removable() {
    let bed = Bed::new("akapp");
    let ak = bed.authkeys();
    std::fs::write(&ak, format!("# mine\n{}", bed.mine.public_line)).unwrap();
    let (mut fg, mut conn) = bed.connect(&unique_id("akapp"), &[], &[]);
    bed.grant(&fg, &mut conn, "a1");
    let during = read(&ak);
    assert!(during.ends_with('\n'), "the end marker does not end its line: {during:?}");
    // `echo KEY >> authorized_keys`
    let appended = format!("{} appended-by-admin\n", bed.mine.public_line);
    {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new().append(true).open(&ak).unwrap();
        f.write_all(appended.as_bytes()).unwrap();
    }
    bed.revoke(&fg, &mut conn);
    let after = read(&ak);
    assert!(!after.contains("linbit-tunl"), "the block was not removed: {after:?}");
    assert!(after.contains(&appended), "the appended key was damaged: {after:?}");
    assert!(!login_from(bed.target.port, &bed.key, None), "support's key still works after the revoke");
    assert!(login_from(bed.target.port, &bed.mine, None), "the customer's key no longer works");
    fg.signal("TERM");
    assert_eq!(fg.wait(secs(15)), Some(143), "{}", fg.diag());
}

/// A session ID is re-used while an old begin marker of that ID lost its end: the removal of the
/// new block must never reach back over the customer's lines to the old begin.
#[test]
fn a_reused_session_id_never_removes_the_customers_lines() {
    let bed = Bed::new("akreuse");
    let ak = bed.authkeys();
    let id = unique_id("akreuse");
    let mine = format!("{} customer-key\n# the customer's comment\n", bed.mine.public_line);
    std::fs::write(&ak, format!("# linbit-tunl-begin {id}\n{mine}")).unwrap();
    let (mut fg, mut conn) = bed.connect(&id, &[], &[]);
    bed.grant(&fg, &mut conn, "r1");
    bed.revoke(&fg, &mut conn);
    let after = read(&ak);
    assert!(after.contains(&mine), "the customer's lines were removed: {after:?}");
    assert!(!after.contains(&bed.key.public_line), "support's key is still there: {after:?}");
    assert!(login_from(bed.target.port, &bed.mine, None), "the customer's key no longer works");
    assert!(!login_from(bed.target.port, &bed.key, None));
    fg.signal("TERM");
    assert_eq!(fg.wait(secs(15)), Some(143), "{}", fg.diag());
}

/// Someone deletes our end marker during the session: the block cannot be found, but our exact
/// key line is still removed at the revoke.
#[test]
fn a_damaged_block_still_loses_our_key_lines() {
    let bed = Bed::new("akdmg");
    let ak = bed.authkeys();
    std::fs::write(&ak, format!("{} mine\n", bed.mine.public_line)).unwrap();
    let (mut fg, mut conn) = bed.connect(&unique_id("akdmg"), &[], &[]);
    bed.grant(&fg, &mut conn, "d1");
    let damaged: String =
        read(&ak).lines().filter(|l| !l.starts_with("# linbit-tunl-end")).map(|l| format!("{l}\n")).collect();
    std::fs::write(&ak, &damaged).unwrap();
    bed.revoke(&fg, &mut conn);
    let after = read(&ak);
    assert!(!after.contains(&bed.key.public_line), "support's key survived a damaged block: {after:?}");
    assert!(!login_from(bed.target.port, &bed.key, None));
    assert!(login_from(bed.target.port, &bed.mine, None));
    fg.signal("TERM");
    assert_eq!(fg.wait(secs(15)), Some(143), "{}", fg.diag());
}

// ---- F9 ------------------------------------------------------------------------------------------

/// Support's key carries `from="127.0.0.1,::1"` (the target is this host) and an `expiry-time`
/// that the real sshd enforces.
#[test]
fn installed_keys_work_only_from_loopback_and_expire() {
    let bed = Bed::new("akopt");
    let ak = bed.authkeys();
    std::fs::write(&ak, format!("{} mine\n", bed.mine.public_line)).unwrap();
    let (mut fg, mut conn) = bed.connect(&unique_id("akopt"), &[], &[]);
    let port = bed.grant(&fg, &mut conn, "o1");
    let line = bed.support_line();
    assert!(line.starts_with("from=\"127.0.0.1,::1\",expiry-time=\""), "{line}");
    assert!(login_from(port, &bed.key, None), "login through the tunnel fails");
    // The same sshd, another local source address: the customer's own key gets in, support's not.
    assert!(login_from(bed.target.port, &bed.mine, Some("127.0.0.2")), "127.0.0.2 cannot log in at all");
    assert!(!login_from(bed.target.port, &bed.key, Some("127.0.0.2")), "support's key works from elsewhere");

    // The expiry is in the near future, and the real sshd honours the form we write it in.
    let spec = line.split("expiry-time=\"").nth(1).unwrap().split('"').next().unwrap().to_string();
    assert!(spec.len() == 15 && spec.ends_with('Z'), "{spec}");
    let when = utc_secs(&spec[..14]);
    let now = now_secs();
    assert!(when > now + 600 && when <= now + 2 * 3600 + 60, "expiry {spec} is not about an hour ahead");
    let past = utc_stamp(now - 120);
    std::fs::write(&ak, read(&ak).replace(&spec, &format!("{past}Z"))).unwrap();
    assert!(!login_from(port, &bed.key, None), "an expired key was accepted");
    std::fs::write(&ak, read(&ak).replace(&format!("{past}Z"), &spec)).unwrap();
    assert!(login_from(port, &bed.key, None));
    fg.signal("TERM");
    assert_eq!(fg.wait(secs(15)), Some(143), "{}", fg.diag());
    assert!(!read(&ak).contains(&bed.key.public_line));
}

/// A session killed outright leaves its block in a file that a later run with another
/// TUNL_AUTHKEYS_FILE does not use; the record of touched files lets that later run sweep it.
#[test]
fn a_later_run_sweeps_every_file_an_earlier_run_touched() {
    let bed = Bed::new("akrec");
    let state = bed.scratch.path().join("state");
    let state_s = state.display().to_string();
    let (mut fg, mut conn) = bed.connect(&unique_id("akrec"), &["--debug"], &[("TUNL_STATE_DIR", &state_s)]);
    bed.grant(&fg, &mut conn, "k1");
    assert!(read(&bed.authkeys()).contains("# linbit-tunl-begin"));
    // Power loss, as far as this session is concerned.
    let _ = fg.child.kill();
    let _ = fg.child.wait();
    drop(conn);
    assert!(read(&bed.authkeys()).contains("# linbit-tunl-begin"));

    let other = bed.scratch.path().join("other_keys");
    let other_s = other.display().to_string();
    let env = [("TUNL_STATE_DIR", state_s.as_str()), ("TUNL_AUTHKEYS_FILE", other_s.as_str())];
    let (mut fg2, _conn2) = bed.connect(&unique_id("akrec"), &[], &env);
    assert!(!read(&bed.authkeys()).contains("linbit-tunl"), "{}", read(&bed.authkeys()));
    assert!(!login_from(bed.target.port, &bed.key, None));
    fg2.signal("TERM");
    assert_eq!(fg2.wait(secs(15)), Some(143), "{}", fg2.diag());
}

// ---- F10 -----------------------------------------------------------------------------------------

/// The directory part of TUNL_AUTHKEYS_FILE is a symlink (a user's `~/.ssh -> /root/.ssh`): a run
/// that finds it so refuses to start, and one where it is swapped in during the session refuses
/// the grant; nothing is written where the link points.
#[test]
fn a_symlinked_directory_in_the_keys_path_is_never_followed() {
    let bed = Bed::new("akln");
    let victim = bed.scratch.path().join("victim");
    std::fs::create_dir(&victim).unwrap();
    std::fs::write(victim.join("authorized_keys"), "# root's keys\n").unwrap();
    let home = bed.scratch.path().join("home");
    std::fs::create_dir_all(home.join(".ssh")).unwrap();
    let path = home.join(".ssh/authorized_keys").display().to_string();
    let env = [("TUNL_AUTHKEYS_FILE", path.as_str())];
    let (mut fg, mut conn) = bed.connect(&unique_id("akln"), &[], &env);
    // The user swaps the link in while the session runs.
    std::fs::remove_dir(home.join(".ssh")).unwrap();
    std::os::unix::fs::symlink(&victim, home.join(".ssh")).unwrap();
    conn.send(&upgrade_line("l1", "eng@linbit.com", &format!("{}\n", bed.key.public_line)));
    let ans = conn
        .wait_for(secs(20), |l| l.starts_with("TUNNEL_OPEN ") || l.starts_with("TUNNEL_REJECTED "))
        .unwrap_or_else(|| panic!("no answer: {:?}\n{}", conn.lines(), fg.diag()));
    assert!(ans.starts_with("TUNNEL_REJECTED "), "{ans}");
    assert_eq!(read(&victim.join("authorized_keys")), "# root's keys\n");
    assert_eq!(std::fs::read_dir(&victim).unwrap().count(), 1, "files appeared behind the link");
    fg.signal("TERM");
    assert_eq!(fg.wait(secs(15)), Some(143), "{}", fg.diag());

    // A run that starts with the link in place: one clear line, status 1, nothing written.
    let mut fg2 = bed.start(&unique_id("akln"), &[], &env);
    assert_eq!(fg2.wait(secs(30)), Some(1), "{}", fg2.diag());
    let err = fg2.stderr_text();
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("symbolic link"), "{err}");
    assert_eq!(read(&victim.join("authorized_keys")), "# root's keys\n");
    assert_eq!(std::fs::read_dir(&victim).unwrap().count(), 1, "files appeared behind the link");
}

// ---- F12 -----------------------------------------------------------------------------------------

/// The removal at the end fails (configuration management turned the file into a symlink meanwhile,
/// and sshd follows it): the customer's terminal says so in plain words with the exact lines to
/// delete, and the status is 1.
#[test]
fn keys_that_could_not_be_removed_are_reported_with_status_1() {
    let bed = Bed::new("akleft");
    let ak = bed.authkeys();
    let (mut fg, mut conn) = bed.connect(&unique_id("akleft"), &[], &[]);
    let port = bed.grant(&fg, &mut conn, "f1");
    let line = bed.support_line();
    let real = bed.scratch.path().join("managed_keys");
    std::fs::rename(&ak, &real).unwrap();
    std::os::unix::fs::symlink(&real, &ak).unwrap();
    assert!(login_from(port, &bed.key, None), "sshd does not follow the link: the test shows nothing");
    fg.signal("TERM");
    assert_eq!(fg.wait(secs(20)), Some(1), "{}", fg.diag());
    let err = fg.stderr_text();
    assert!(err.contains("could not be removed"), "{err}");
    assert!(err.contains(&line), "the exact line to delete is not shown: {err}");
    assert!(err.contains(&ak.display().to_string()), "{err}");
}

// ---- F13, F16 ------------------------------------------------------------------------------------

/// A local user plants a directory for a dead session's ID with a daemon.pid naming their own
/// process: the stale block is swept all the same.
#[test]
fn the_stale_sweep_does_not_trust_planted_liveness() {
    let bed = Bed::new("akplant");
    let ak = bed.authkeys();
    let dead = unique_id("akdead");
    std::fs::write(&ak, format!("# linbit-tunl-begin {dead}\n{}\n# linbit-tunl-end {dead}\n", bed.key.public_line))
        .unwrap();
    let dir = session_dir(&dead);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir(&dir).unwrap();
    let mut sleeper = Command::new("sh")
        .args(["-c", "sleep 120", &dir.display().to_string(), &dead])
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    std::fs::write(dir.join("daemon.pid"), format!("{}\n", sleeper.id())).unwrap();
    std::os::unix::fs::chown(dir.join("daemon.pid"), Some(65534), Some(65534)).unwrap();
    std::os::unix::fs::chown(&dir, Some(65534), Some(65534)).unwrap();
    let (mut fg, _conn) = bed.connect(&unique_id("akplant"), &[], &[]);
    let after = read(&ak);
    let _ = sleeper.kill();
    let _ = sleeper.wait();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(!after.contains("linbit-tunl"), "the planted directory kept a stale block alive: {after:?}");
    fg.signal("TERM");
    assert_eq!(fg.wait(secs(15)), Some(143), "{}", fg.diag());
}

/// Running the same command again while a `--tunnel` session runs: refused, and the running
/// session keeps its files, its keys and its tunnel.
#[test]
fn a_second_run_with_the_same_id_leaves_the_running_session_alone() {
    let bed = Bed::new("akdup");
    let id = unique_id("akdup");
    let (mut fg, mut conn) = bed.connect(&id, &[], &[]);
    let port = bed.grant(&fg, &mut conn, "u1");
    let dir = session_dir(&id);
    assert!(dir.join("ssh-ctl.sock").exists());
    let mut again = Command::new(BIN);
    again.args(["--tunnel", "--token", TOKEN, &id]).env_clear();
    again.env("PATH", path_without_tmux(&bed.scratch)).env("USER", "root").env("HOME", bed.scratch.path());
    again.env("TUNL_AUTHKEYS_FILE", bed.authkeys()).env("TUNL_STATE_DIR", bed.scratch.path().join("state"));
    for (k, v) in bed.relay.env() {
        again.env(k, v);
    }
    let mut child = again.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break Some(st);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let err = child.wait_with_output().map(|o| String::from_utf8_lossy(&o.stderr).into_owned()).unwrap_or_default();
    assert_eq!(status.and_then(|s| s.code()), Some(1), "the second run was not refused: {err}");
    assert!(err.contains("already running"), "{err}");
    assert!(dir.join("ssh-ctl.sock").exists(), "the running session's files were wiped");
    assert!(read(&bed.authkeys()).contains(&bed.key.public_line), "the running session's keys were swept");
    assert!(login_from(port, &bed.key, None), "the running session's tunnel broke");
    bed.revoke(&fg, &mut conn);
    assert!(!login_from(bed.target.port, &bed.key, None));
    fg.signal("TERM");
    assert_eq!(fg.wait(secs(15)), Some(143), "{}", fg.diag());
}

// ---- F15 -----------------------------------------------------------------------------------------

/// `--debug` keeps the session directory for diagnosis, but not the secrets in it.
#[test]
fn the_kept_directory_holds_no_live_secrets() {
    let bed = Bed::new("aksec");
    let id = unique_id("aksec");
    let (mut fg, _conn) = bed.connect(&id, &["--debug"], &[]);
    let dir = session_dir(&id);
    assert!(dir.join("sharekey").read_dir().unwrap().count() > 0);
    fg.signal("TERM");
    assert_eq!(fg.wait(secs(15)), Some(143), "{}", fg.diag());
    assert!(dir.join("debug.log").exists(), "--debug did not keep the directory");
    let left: Vec<String> = walk(&dir).into_iter().map(|p| p.display().to_string()).collect();
    for secret in ["id_ed25519", "id_ed25519-cert.pub", "askpass.sh"] {
        assert!(!left.iter().any(|p| p.ends_with(&format!("/{secret}"))), "{secret} kept: {left:?}");
    }
    assert!(!read(&dir.join("daemon.conf")).contains(TOKEN), "the token was kept");
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        }
        out.push(p);
    }
    out
}

// ---- time helpers (UTC, as sshd reads `...Z`) ------------------------------------------------------

fn now_secs() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs()
}

fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// YYYYMMDDHHMMSS (UTC) -> Unix seconds.
fn utc_secs(s: &str) -> u64 {
    let n = |a: usize, b: usize| s[a..b].parse::<i64>().unwrap();
    let days = days_from_civil(n(0, 4), n(4, 6), n(6, 8));
    (days * 86400 + n(8, 10) * 3600 + n(10, 12) * 60 + n(12, 14)) as u64
}

/// Unix seconds -> YYYYMMDDHHMMSS (UTC), by search over the inverse (tests only).
fn utc_stamp(t: u64) -> String {
    let days = (t / 86400) as i64;
    let rem = t % 86400;
    let mut y = 1970 + days / 366;
    while days_from_civil(y + 1, 1, 1) <= days {
        y += 1;
    }
    let mut m = 1;
    while m < 12 && days_from_civil(y, m + 1, 1) <= days {
        m += 1;
    }
    let d = days - days_from_civil(y, m, 1) + 1;
    format!("{y:04}{m:02}{d:02}{:02}{:02}{:02}", rem / 3600, rem % 3600 / 60, rem % 60)
}

/// The same under tmux (`--tunnel` with tmux installed): the daemon's last words die with tmux, so
/// the launcher says it on the customer's terminal once tmux is gone, and the status is 1.
#[test]
fn keys_left_behind_are_reported_after_tmux_is_gone() {
    let bed = Bed::new("akleftt");
    let ak = bed.authkeys();
    let ak_s = ak.display().to_string();
    let target = bed.target_arg();
    let id = unique_id("akleftt");
    let (c, mut conn) =
        Customer::connect(&bed.relay, &id, &["--tunnel", "--target", &target], &[("TUNL_AUTHKEYS_FILE", &ak_s)]);
    conn.send(&upgrade_line("t1", "eng@linbit.com", &format!("{}\n", bed.key.public_line)));
    let open = conn.wait_verb(secs(20), "TUNNEL_OPEN").unwrap_or_else(|| panic!("{:?}\n{}", conn.lines(), c.diag()));
    let port: u16 = line_field(&open, "port").and_then(|p| p.parse().ok()).unwrap();
    let line = bed.support_line();
    let real = bed.scratch.path().join("managed_keys");
    std::fs::rename(&ak, &real).unwrap();
    std::os::unix::fs::symlink(&real, &ak).unwrap();
    assert!(login_from(port, &bed.key, None));
    c.keys(&["C-b", "Q"]);
    assert_eq!(c.wait_status(secs(30)), Some(1), "{}", c.diag());
    let h = c.history();
    assert!(h.contains("could not be removed"), "{h}");
    assert!(h.contains(&line), "the exact line to delete is not shown: {h}");
}

/// The disk holding authorized_keys is full (the rewrite needs room for a whole copy): support's
/// key is still disabled at the revoke, commented out in place, and the real sshd refuses it.
#[test]
fn a_full_disk_still_disables_the_keys() {
    let bed = Bed::new("akfull");
    let fs = TinyFs::mount(0o755, &bed.scratch.path().join("tiny"));
    let ak = fs.0.join("authorized_keys");
    std::fs::write(&ak, format!("{} mine\n", bed.mine.public_line)).unwrap();
    let target = TargetSshd::start(&ak).expect("target sshd");
    let ak_s = ak.display().to_string();
    let id = unique_id("akfull");
    bed.relay.register(&id, Some(TOKEN));
    let t = format!("127.0.0.1:{}", target.port);
    let fg = Foreground::start(
        &bed.relay,
        &id,
        &["--tunnel", "--token", TOKEN, "--target", &t],
        &[("TUNL_AUTHKEYS_FILE", &ak_s)],
        &bed.scratch,
    );
    let mut conn = bed.relay.accept(secs(30)).unwrap_or_else(|| panic!("no session at the relay: {}", fg.diag()));
    conn.welcome(0);
    let port = bed.grant(&fg, &mut conn, "z1");
    assert!(login_from(port, &bed.key, None), "{}", target.log());
    fs.fill();
    bed.revoke(&fg, &mut conn);
    let after = read(&ak);
    assert!(!login_from(port, &bed.key, None) && !login_from(target.port, &bed.key, None), "{after}");
    assert!(login_from(target.port, &bed.mine, None), "the customer's key was damaged: {after}");
    let mut fg = fg;
    fg.signal("TERM");
    assert_eq!(fg.wait(secs(15)), Some(143), "{}", fg.diag());
}

/// The target identifies itself as an OpenSSH older than 8.2 (which refuses a key line with an
/// option it does not know): support's key goes in with `from=` but without `expiry-time`. No such
/// sshd is installed here, so a listener that answers with its identification string stands in.
#[test]
fn an_old_openssh_target_gets_no_expiry_time() {
    use std::io::Write;
    let bed = Bed::new("akold");
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let server = std::thread::spawn(move || {
        // The launcher's probe, then (after the grant) nothing else is needed from it.
        if let Ok((mut s, _)) = listener.accept() {
            let _ = s.write_all(b"SSH-2.0-OpenSSH_7.4\r\n");
        }
    });
    let id = unique_id("akold");
    bed.relay.register(&id, Some(TOKEN));
    let t = format!("127.0.0.1:{port}");
    let mut fg = Foreground::start(&bed.relay, &id, &["--tunnel", "--token", TOKEN, "--target", &t], &[], &bed.scratch);
    let mut conn = bed.relay.accept(secs(30)).unwrap_or_else(|| panic!("no session at the relay: {}", fg.diag()));
    conn.welcome(0);
    bed.grant(&fg, &mut conn, "o1");
    let line = bed.support_line();
    assert_eq!(line, format!("from=\"127.0.0.1,::1\" {}", bed.key.public_line), "{line}");
    fg.signal("TERM");
    assert_eq!(fg.wait(secs(15)), Some(143), "{}", fg.diag());
    let _ = server.join();
}
