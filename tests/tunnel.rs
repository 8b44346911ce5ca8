//! The reverse tunnel, end to end: the real binary, the real ssh client, the test relay's sshd and a
//! second real sshd as the customer's SSH target (`TargetSshd`), reached by support through the
//! relay-side port of the reverse forward with `support_login`.
//!
//! Foreground tests run `--tunnel` without tmux; share-mode tests run the client in a pane of an
//! OUTER tmux server on a private socket (the customer's terminal), type with `send-keys` and read
//! the screen with `capture-pane`.

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use relay_double::{SupportKey, TargetSshd, close_line, line_field, support_login, upgrade_line};

const TOKEN: &str = "424242";
const OK: &str = "TUNNEL-OK";

/// Whether support can log in through `port` with `key` and run a command.
fn login_works(port: u16, key: &SupportKey) -> bool {
    let out = support_login(port, key, "root", &format!("echo {OK}")).expect("ssh runs");
    out.status.success() && String::from_utf8_lossy(&out.stdout).contains(OK)
}

fn port_of(open: &str) -> u16 {
    line_field(open, "port").and_then(|p| p.parse().ok()).unwrap_or_else(|| panic!("no port in {open}"))
}

/// Poll `cond` until it holds or the deadline passes.
fn until(deadline: Instant, mut cond: impl FnMut() -> bool) -> bool {
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn read(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_default()
}

fn has_block(path: &Path) -> bool {
    String::from_utf8_lossy(&read(path)).contains("# linbit-tunl-begin")
}

/// Everything one tunnel test needs: relay, target sshd on the test's authorized_keys file, a
/// support key pair. Fields drop in declaration order: the relay outlives nothing it must.
struct Bed {
    target: TargetSshd,
    key: SupportKey,
    relay: Relay,
    scratch: Scratch,
}

impl Bed {
    fn new(tag: &str) -> Bed {
        Bed::with(tag, RelayOpts::default())
    }
    fn with(tag: &str, opts: RelayOpts) -> Bed {
        let scratch = Scratch::new(tag);
        let relay = Relay::start(opts).expect("test relay");
        let target = TargetSshd::start(&scratch.path().join("authorized_keys")).expect("target sshd");
        let keydir = scratch.path().join("support");
        std::fs::create_dir_all(&keydir).unwrap();
        let key = SupportKey::generate(&keydir).expect("support key");
        Bed { target, key, relay, scratch }
    }
    fn authkeys(&self) -> PathBuf {
        self.scratch.path().join("authorized_keys")
    }
    fn target_arg(&self) -> String {
        format!("127.0.0.1:{}", self.target.port)
    }
    fn upgrade(&self, req: &str) -> String {
        upgrade_line(req, "eng@linbit.com", &format!("{}\n", self.key.public_line))
    }
    /// `--tunnel` in the foreground, connected and welcomed.
    fn foreground(&self, word: &str) -> (Foreground, Conn) {
        let id = unique_id(word);
        self.relay.register(&id, Some(TOKEN));
        let target = self.target_arg();
        let fg = Foreground::start(
            &self.relay,
            &id,
            &["--tunnel", "--token", TOKEN, "--target", &target],
            &[],
            &self.scratch,
        );
        let mut conn = self.relay.accept(secs(30)).unwrap_or_else(|| panic!("no session at the relay: {}", fg.diag()));
        conn.welcome(0);
        assert!(conn.wait_verb(secs(10), "STATE").is_some(), "no STATE: {:?}", conn.lines());
        (fg, conn)
    }
}

/// Grant in `--tunnel` mode: UPGRADE -> TUNNEL_OPEN, login works; returns the port.
fn open_tunnel(bed: &Bed, fg: &Foreground, conn: &mut Conn, req: &str) -> u16 {
    conn.send(&bed.upgrade(req));
    let open = conn
        .wait_for(secs(20), |l| l.starts_with("TUNNEL_OPEN ") || l.starts_with("TUNNEL_REJECTED "))
        .unwrap_or_else(|| panic!("no answer to UPGRADE: {:?}\n{}", conn.lines(), fg.diag()));
    assert!(open.starts_with("TUNNEL_OPEN "), "{open}\n{}", fg.diag());
    assert_eq!(line_field(&open, "req"), Some(req), "{open}");
    assert_eq!(line_field(&open, "user"), Some(bed.relay.user()), "{open}");
    let port = port_of(&open);
    assert!(login_works(port, &bed.key), "support login through port {port} failed\n{}", bed.target.log());
    port
}

// ---- 1 + 5: --tunnel without tmux, --target ------------------------------------------------------

#[test]
fn tunnel_mode_grant_relay_revoke_and_sigterm() {
    let bed = Bed::new("tfg");
    let (mut fg, mut conn) = bed.foreground("tfg");
    // The forward is opened at connect, before any request.
    assert!(fg.wait_stderr(secs(15), "reverse tunnel open on relay port"), "{}", fg.diag());
    assert!(!bed.authkeys().exists() || !has_block(&bed.authkeys()));

    // --target: the forward reaches the TargetSshd port (any other port would refuse the login).
    let port = open_tunnel(&bed, &fg, &mut conn, "r1");
    assert!(has_block(&bed.authkeys()));
    let st = conn.wait_for(secs(10), |l| l.starts_with("STATE") && l.contains("tunnel=active"));
    assert!(st.is_some(), "{:?}", conn.lines());

    // Relay REVOKE: closed, our block gone, the same login fails (both through the tunnel and
    // directly at the target: the key itself is gone, not just the forward).
    conn.send("REVOKE");
    let closed = conn.wait_verb(secs(15), "TUNNEL_CLOSED").unwrap_or_else(|| panic!("{:?}", conn.lines()));
    assert_eq!(line_field(&closed, "reason"), Some("relay"), "{closed}");
    assert!(!has_block(&bed.authkeys()), "{:?}", String::from_utf8_lossy(&read(&bed.authkeys())));
    assert!(!login_works(port, &bed.key), "login through the revoked tunnel still works");
    assert!(!login_works(bed.target.port, &bed.key), "support key still accepted by the target");
    // Support being done does not undo the customer's --tunnel: the next request is granted again,
    // through the session's forward, and a second REVOKE takes the key away again.
    let st = conn.wait_for(secs(10), |l| l.starts_with("STATE") && l.contains("tunnel=allowed"));
    assert!(st.is_some(), "{:?}", conn.lines());
    let port2 = open_tunnel(&bed, &fg, &mut conn, "r2");
    assert_eq!(port2, port, "--tunnel keeps the forward it opened at connect");
    conn.send("REVOKE");
    assert!(conn.wait_verb(secs(15), "TUNNEL_CLOSED").is_some(), "{:?}", conn.lines());
    assert!(!has_block(&bed.authkeys()));
    assert!(!login_works(port, &bed.key), "login after the second revoke still works");

    // SIGTERM with nothing active: 143 and no key in the file.
    fg.signal("TERM");
    assert_eq!(fg.wait(secs(15)), Some(143), "{}", fg.diag());
    assert!(!has_block(&bed.authkeys()));
}

#[test]
fn tunnel_mode_sigterm_and_sigint_with_an_active_tunnel_remove_the_keys() {
    let bed = Bed::new("tsig");
    for (sig, status) in [("TERM", 143), ("INT", 130)] {
        let (mut fg, mut conn) = bed.foreground(&format!("tsig{}", sig.to_lowercase()));
        let port = open_tunnel(&bed, &fg, &mut conn, "s1");
        fg.signal(sig);
        let closed = conn.wait_verb(secs(10), "TUNNEL_CLOSED");
        assert_eq!(closed.as_deref().and_then(|l| line_field(l, "reason")), Some("ended"), "{:?}", conn.lines());
        assert_eq!(fg.wait(secs(15)), Some(status), "SIG{sig}: {}", fg.diag());
        assert!(!has_block(&bed.authkeys()), "SIG{sig} left keys behind");
        assert!(!login_works(port, &bed.key));
        assert!(!login_works(bed.target.port, &bed.key));
        assert!(wait_no_processes(&session_dir(&fg.id).display().to_string(), secs(5)).is_empty());
    }
}

// ---- 3 (the part that needs no terminal): key validation ----------------------------------------

#[test]
fn invalid_option_carrying_and_certificate_keys_are_refused() {
    let bed = Bed::new("tinv");
    let before = b"# mine\nssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl me@host\n";
    std::fs::write(bed.authkeys(), before).unwrap();
    let (mut fg, mut conn) = bed.foreground("tinv");
    let blob = bed.key.public_line.split(' ').nth(1).unwrap().to_string();
    let pubfile = bed.key.private_path.with_extension("pub");
    let cert = bed.relay.sign_user_key(&pubfile, "support-cert").expect("sign");
    let cert_line = std::fs::read_to_string(cert).unwrap().trim().to_string();
    assert!(cert_line.starts_with("ssh-ed25519-cert-v01@openssh.com "), "{cert_line}");
    let cases = [
        ("i1", "ssh-ed25519 AAAA-not-base64!! x".to_string()),
        ("i2", format!("command=\"sh\" ssh-ed25519 {blob} support")),
        ("i3", format!("no-pty,permitopen=\"*:*\" ssh-ed25519 {blob}")),
        ("i4", cert_line),
        ("i5", format!("{}\nssh-ed25519 garbage", bed.key.public_line)),
    ];
    for (req, keys) in &cases {
        conn.send(&upgrade_line(req, "eng", &format!("{keys}\n")));
        let ans = conn
            .wait_for(secs(10), |l| l.contains(&format!("req={req} ")) || l.ends_with(&format!("req={req}")))
            .unwrap_or_else(|| panic!("no answer for {req}: {:?}", conn.lines()));
        assert!(ans.starts_with("TUNNEL_REJECTED "), "{req}: {ans}");
        assert_eq!(line_field(&ans, "reason"), Some("invalid-key"), "{req}: {ans}");
        assert_eq!(read(&bed.authkeys()), before, "{req} changed the file");
    }
    assert!(!login_works(bed.target.port, &bed.key));
    // A valid request afterwards still works: the refusals left no state behind.
    open_tunnel(&bed, &fg, &mut conn, "v1");
    fg.signal("TERM");
    assert_eq!(fg.wait(secs(15)), Some(143));
    assert_eq!(read(&bed.authkeys()), before);
}

// ---- 4: authorized_keys fidelity -----------------------------------------------------------------

#[test]
fn authorized_keys_bytes_mode_and_owner_survive_grant_and_revoke() {
    let bed = Bed::new("tfid");
    let before: &[u8] = b"# customer's own keys\r\n\
        ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl admin@box\r\n\
        \n\
        command=\"/usr/bin/backup\",no-pty,from=\"10.0.0.0/8\" ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl backup\n\
        #   indented comment\twith tab\n\
        ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAABAQ last-line-no-newline";
    let ak = bed.authkeys();
    std::fs::write(&ak, before).unwrap();
    std::fs::set_permissions(&ak, std::fs::Permissions::from_mode(0o640)).unwrap();
    // A distinct group, so "owner kept" is not just "root:root by default".
    std::os::unix::fs::chown(&ak, Some(0), Some(1)).unwrap();
    let meta0 = std::fs::metadata(&ak).unwrap();

    let (mut fg, mut conn) = bed.foreground("tfid");
    let port = open_tunnel(&bed, &fg, &mut conn, "f1");
    // A second request of the same session shares the one block.
    open_tunnel(&bed, &fg, &mut conn, "f2");
    let during = read(&ak);
    assert!(during.starts_with(before), "the customer's bytes changed while granted");
    let tail = String::from_utf8_lossy(&during[before.len()..]).into_owned();
    assert!(tail.starts_with("\n# linbit-tunl-begin "), "{tail:?}");
    assert_eq!(tail.matches("# linbit-tunl-begin ").count(), 1, "{tail:?}");
    assert_eq!(tail.matches(&bed.key.public_line).count(), 1, "the same key installed twice: {tail:?}");
    // The end marker always ends its line, so a `>>` append cannot fuse with it (F8); the revoke
    // takes the newline we added away again.
    assert!(tail.ends_with('\n'), "the end marker does not end its line: {tail:?}");
    let m = std::fs::metadata(&ak).unwrap();
    assert_eq!((m.mode() & 0o7777, m.uid(), m.gid()), (0o640, meta0.uid(), meta0.gid()));

    conn.send("REVOKE");
    assert!(conn.wait_verb(secs(15), "TUNNEL_CLOSED").is_some(), "{:?}", conn.lines());
    assert_eq!(read(&ak), before, "grant + revoke is not byte-identical");
    let m = std::fs::metadata(&ak).unwrap();
    assert_eq!((m.mode() & 0o7777, m.uid(), m.gid()), (0o640, meta0.uid(), meta0.gid()));
    assert!(!login_works(port, &bed.key));

    fg.signal("TERM");
    assert_eq!(fg.wait(secs(15)), Some(143));
    assert_eq!(read(&ak), before);
}

#[test]
fn a_stale_block_from_a_killed_session_is_swept_at_start() {
    let bed = Bed::new("tstale");
    let ak = bed.authkeys();
    let mine: &[u8] =
        b"# top\nssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl a@b\r\n";
    let rest: &[u8] = b"# after the block\nno-agent-forwarding ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl c";
    let mut content = mine.to_vec();
    content.extend_from_slice(b"# linbit-tunl-begin other-old-session-id\n");
    content.extend_from_slice(format!("{}\n", bed.key.public_line).as_bytes());
    content.extend_from_slice(b"# linbit-tunl-end other-old-session-id\n");
    content.extend_from_slice(rest);
    std::fs::write(&ak, &content).unwrap();
    std::fs::set_permissions(&ak, std::fs::Permissions::from_mode(0o600)).unwrap();
    // The stale key works before the sweep (so its absence later means something).
    assert!(login_works(bed.target.port, &bed.key));

    let (mut fg, _conn) = bed.foreground("tstale");
    let mut expect = mine.to_vec();
    expect.extend_from_slice(rest);
    assert_eq!(read(&ak), expect, "the sweep must remove exactly the stale block");
    assert!(!login_works(bed.target.port, &bed.key), "stale support key still accepted");
    assert_eq!(std::fs::metadata(&ak).unwrap().mode() & 0o7777, 0o600);
    fg.signal("TERM");
    assert_eq!(fg.wait(secs(15)), Some(143));
    assert_eq!(read(&ak), expect);
}

#[test]
fn the_block_of_a_session_still_running_here_is_not_stale() {
    let bed = Bed::new("tlive");
    let (mut first, mut conn) = bed.foreground("tlive");
    let port = open_tunnel(&bed, &first, &mut conn, "l1");
    let before = read(&bed.authkeys());
    // A second session on the same host and file starts while the first one's tunnel is open.
    let (mut second, _conn2) = bed.foreground("tlive");
    assert_eq!(read(&bed.authkeys()), before, "the running session's block was swept");
    assert!(login_works(port, &bed.key), "the running session's tunnel was broken");
    second.signal("TERM");
    assert_eq!(second.wait(secs(15)), Some(143));
    assert_eq!(read(&bed.authkeys()), before, "the second session removed another session's keys");
    first.signal("TERM");
    assert_eq!(first.wait(secs(15)), Some(143));
    assert!(!has_block(&bed.authkeys()));
}

// ---- 6: reconnect --------------------------------------------------------------------------------

#[test]
fn reconnect_re_announces_an_active_tunnel_on_a_new_port() {
    let bed = Bed::new("trec");
    let (mut fg, mut conn) = bed.foreground("trec");
    let port1 = open_tunnel(&bed, &fg, &mut conn, "c1");
    conn.drop_link();
    let mut conn2 = bed.relay.accept(secs(30)).unwrap_or_else(|| panic!("no reconnect: {}", fg.diag()));
    assert_eq!(conn2.hello_field("resume"), Some("1"));
    // The keys stay while the link is down.
    assert!(has_block(&bed.authkeys()));
    conn2.welcome(0);
    let open = conn2.wait_verb(secs(20), "TUNNEL_OPEN").unwrap_or_else(|| panic!("{:?}\n{}", conn2.lines(), fg.diag()));
    assert_eq!(line_field(&open, "req"), Some("c1"), "{open}");
    assert_eq!(line_field(&open, "user"), Some(bed.relay.user()), "{open}");
    let port2 = port_of(&open);
    assert!(login_works(port2, &bed.key), "login through the re-opened tunnel (port {port2}) failed");
    if port2 != port1 {
        assert!(!login_works(port1, &bed.key), "the old port still forwards");
    }
    fg.signal("TERM");
    assert_eq!(fg.wait(secs(15)), Some(143));
    assert!(!has_block(&bed.authkeys()));
}

// ---- share mode: the customer's terminal ---------------------------------------------------------

/// The customer's terminal: an outer tmux server on a private socket whose only pane runs
/// `linbit-tunl ARGS ID` with a controlled environment. Dropping it ends both tmux servers and waits
/// for every process of the session to go.
struct Customer {
    outer: PathBuf,
    id: String,
    status: PathBuf,
}

impl Customer {
    fn start(bed: &Bed, word: &str, args: &[&str]) -> Customer {
        Customer::start_sized(bed, word, args, (160, 45))
    }

    /// In a terminal of `cols` x `rows`.
    fn start_sized(bed: &Bed, word: &str, args: &[&str], (cols, rows): (u16, u16)) -> Customer {
        let id = unique_id(word);
        bed.relay.register(&id, Some(TOKEN));
        let s = bed.scratch.path();
        let outer = s.join(format!("outer-{id}.sock"));
        let conf = s.join("outer.conf");
        std::fs::write(&conf, "set -g status off\nset -g prefix None\nunbind-key C-b\nset -g escape-time 0\n").unwrap();
        let status = s.join(format!("status-{id}"));
        let mut env: Vec<(String, String)> = bed.relay.env();
        env.push(("PATH".into(), client_path()));
        env.push(("USER".into(), "root".into()));
        env.push(("HOME".into(), s.display().to_string()));
        env.push(("TERM".into(), "xterm-256color".into()));
        env.push(("TUNL_AUTHKEYS_FILE".into(), bed.authkeys().display().to_string()));
        env.push(("TUNL_RECORDING_DIR".into(), s.display().to_string()));
        let mut sh = String::from("env -i");
        for (k, v) in &env {
            sh.push_str(&format!(" {k}={}", shq(v)));
        }
        sh.push_str(&format!(" {} --token {TOKEN}", shq(BIN)));
        for a in args {
            sh.push_str(&format!(" {}", shq(a)));
        }
        sh.push_str(&format!(" {id}; echo $? > {}", shq(&status.display().to_string())));
        let st = Command::new(outer_tmux())
            .arg("-S")
            .arg(&outer)
            .arg("-f")
            .arg(&conf)
            .args(["new-session", "-d", "-s", "cust", "-x", &cols.to_string(), "-y", &rows.to_string(), &sh])
            .env_remove("TMUX")
            .stdin(Stdio::null())
            .status()
            .unwrap();
        assert!(st.success(), "outer tmux did not start");
        Customer { outer, id, status }
    }

    fn tmux(&self) -> Command {
        let mut c = Command::new(outer_tmux());
        c.arg("-S").arg(&self.outer).env_remove("TMUX").stdin(Stdio::null());
        c
    }

    /// Type keys into the customer's terminal (tmux key names: `C-b`, `u`, `Enter`).
    fn keys(&self, keys: &[&str]) {
        let ok = self.tmux().args(["send-keys", "-t", "cust:"]).args(keys).status().unwrap().success();
        assert!(ok, "send-keys {keys:?}");
    }

    fn screen(&self) -> String {
        let out = self.tmux().args(["capture-pane", "-p", "-t", "cust:"]).output().unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn wait_screen(&self, deadline: Instant, pred: impl Fn(&str) -> bool) -> bool {
        until(deadline, || pred(&self.screen()))
    }

    fn exit_status(&self) -> Option<i32> {
        std::fs::read_to_string(&self.status).ok().and_then(|s| s.trim().parse().ok())
    }

    fn debug_log(&self) -> String {
        std::fs::read_to_string(session_dir(&self.id).join("debug.log")).unwrap_or_default()
    }

    fn diag(&self) -> String {
        format!(
            "screen:\n{}\ndebug.log:\n{}\nssh.log:\n{}",
            self.screen(),
            self.debug_log(),
            std::fs::read_to_string(session_dir(&self.id).join("ssh.log")).unwrap_or_default()
        )
    }

    /// The session is up and the customer's client is attached to the inner tmux (the popup needs it).
    fn connected(&self, bed: &Bed) -> Conn {
        let mut conn = bed.relay.accept(secs(40)).unwrap_or_else(|| panic!("no session: {}", self.diag()));
        conn.welcome(0);
        assert!(conn.wait_verb(secs(10), "STATE").is_some(), "{:?}", conn.lines());
        assert!(
            self.wait_screen(secs(20), |s| s.contains("tunnel: ") && s.contains(&self.id)),
            "the customer's screen never showed the session\n{}",
            self.diag()
        );
        conn
    }
}

impl Drop for Customer {
    fn drop(&mut self) {
        let dir = session_dir(&self.id);
        let _ = Command::new(client_tmux())
            .arg("-S")
            .arg(dir.join("tmux.sock"))
            .arg("kill-server")
            .stderr(Stdio::null())
            .status();
        let _ = self.tmux().arg("kill-server").stderr(Stdio::null()).status();
        let _ = wait_no_processes(&dir.display().to_string(), secs(15));
        let _ = wait_no_processes(&self.outer.display().to_string(), secs(5));
        let _ = std::fs::remove_file(&self.outer);
        let _ = std::fs::remove_dir_all(&dir);
    }
}

fn shq(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// The answer (TUNNEL_OPEN / TUNNEL_REJECTED) to request `req`.
fn answer_to(conn: &mut Conn, req: &str, deadline: Instant) -> Option<String> {
    conn.wait_for(deadline, |l| {
        (l.starts_with("TUNNEL_OPEN ") || l.starts_with("TUNNEL_REJECTED ")) && line_field(l, "req") == Some(req)
    })
}

/// tmux has menus (3.0): the question is a menu; before, it is a prompt in the status line.
fn menus() -> bool {
    client_tmux_version() >= (3, 0)
}

/// The menu itself (the chat pane repeats its text, not its title or Deny's key); before 3.0 the
/// prompt (the chat pane says "type GRANT to allow", the prompt "type GRANT to let").
fn popup_shown(s: &str) -> bool {
    if menus() {
        s.contains("Tunnel request") && s.contains("asks to log in over SSH") && s.contains("(d)")
    } else {
        s.contains("Tunnel request") && s.contains("type GRANT to let")
    }
}

/// What names the requester in the question itself.
fn asker(who: &str) -> String {
    if menus() { format!("{who} asks to log in over SSH") } else { format!("type GRANT to let {who} log in") }
}

impl Customer {
    /// Where the word is typed: after choosing Grant in the menu (it has no key), or the prompt.
    fn confirmation(&self) {
        if menus() {
            self.keys(&["Up", "Enter"]);
        }
        assert!(
            self.wait_screen(secs(10), |s| s.contains("Type GRANT") || s.contains("type GRANT to let")),
            "no confirmation prompt\n{}",
            self.screen()
        );
    }

    /// The deliberate grant: the confirmation, then the word.
    fn grant(&self) {
        self.confirmation();
        self.keys(&["G", "R", "A", "N", "T", "Enter"]);
    }

    /// Deny: `d` in the menu; any other word at the prompt.
    fn deny(&self) {
        if menus() {
            self.keys(&["d"]);
        } else {
            self.keys(&["d", "Enter"]);
        }
    }
}

fn state_line(conn: &mut Conn, tunnel: &str) -> bool {
    let want = format!("tunnel={tunnel}");
    conn.wait_for(secs(10), |l| l.starts_with("STATE") && l.split(' ').any(|f| f == want)).is_some()
}

#[test]
fn share_mode_popup_deny_grant_and_revoke() {
    let bed = Bed::new("tshare");
    let ak = bed.authkeys();
    let before: &[u8] = b"# kept\r\nssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl x";
    std::fs::write(&ak, before).unwrap();
    let target = bed.target_arg();
    let cust = Customer::start(&bed, "tshare", &["--target", &target]);
    let mut conn = cust.connected(&bed);

    // Confirm state: the popup names the request; Deny answers `denied`, the file is untouched.
    conn.send(&bed.upgrade("p1"));
    assert!(cust.wait_screen(secs(15), popup_shown), "no popup\n{}", cust.diag());
    assert!(cust.screen().contains("eng@linbit.com"), "{}", cust.screen());
    cust.deny();
    let ans = answer_to(&mut conn, "p1", secs(10)).unwrap_or_else(|| panic!("{:?}\n{}", conn.lines(), cust.diag()));
    assert_eq!(line_field(&ans, "reason"), Some("denied"), "{ans}");
    assert!(ans.starts_with("TUNNEL_REJECTED"), "{ans}");
    assert_eq!(read(&ak), before);
    assert!(cust.wait_screen(secs(10), |s| !popup_shown(s)), "popup still shown\n{}", cust.screen());

    // Grant: keys installed, forward to --target, login works.
    conn.send(&bed.upgrade("p2"));
    assert!(cust.wait_screen(secs(15), popup_shown), "no popup\n{}", cust.diag());
    cust.grant();
    let open = answer_to(&mut conn, "p2", secs(20)).unwrap_or_else(|| panic!("{:?}\n{}", conn.lines(), cust.diag()));
    assert!(open.starts_with("TUNNEL_OPEN "), "{open}\n{}", cust.diag());
    assert_eq!(line_field(&open, "user"), Some("root"));
    let port = port_of(&open);
    assert!(login_works(port, &bed.key), "{}", bed.target.log());
    assert!(state_line(&mut conn, "active"), "{:?}", conn.lines());

    // Ctrl-b U: closed, our block gone byte-exactly, login fails.
    cust.keys(&["C-b", "U"]);
    let closed =
        conn.wait_verb(secs(15), "TUNNEL_CLOSED").unwrap_or_else(|| panic!("{:?}\n{}", conn.lines(), cust.diag()));
    assert_eq!(line_field(&closed, "reason"), Some("revoked"), "{closed}");
    assert!(state_line(&mut conn, "confirm"), "{:?}", conn.lines());
    assert_eq!(read(&ak), before);
    assert!(!login_works(port, &bed.key));
    assert!(!login_works(bed.target.port, &bed.key));

    // Ctrl-b Q ends the session orderly.
    cust.keys(&["C-b", "Q"]);
    assert!(until(secs(20), || cust.exit_status().is_some()), "no exit\n{}", cust.diag());
    assert_eq!(cust.exit_status(), Some(0));
    assert_eq!(read(&ak), before);
}

#[test]
fn share_mode_block_unblock_pregrant() {
    let bed = Bed::new("tblock");
    let ak = bed.authkeys();
    let target = bed.target_arg();
    let cust = Customer::start(&bed, "tblock", &["--target", &target]);
    let mut conn = cust.connected(&bed);

    // Ctrl-b X: blocked, answered without a popup.
    cust.keys(&["C-b", "X"]);
    assert!(state_line(&mut conn, "blocked"), "{:?}\n{}", conn.lines(), cust.diag());
    conn.send(&bed.upgrade("b1"));
    let ans = answer_to(&mut conn, "b1", secs(10)).unwrap_or_else(|| panic!("{:?}", conn.lines()));
    assert_eq!(line_field(&ans, "reason"), Some("blocked"), "{ans}");
    assert!(!popup_shown(&cust.screen()), "{}", cust.screen());
    assert!(!has_block(&ak));

    // Ctrl-b u from blocked: back to confirm (requests ask again).
    cust.keys(&["C-b", "u"]);
    assert!(state_line(&mut conn, "confirm"), "{:?}", conn.lines());
    conn.send(&bed.upgrade("b2"));
    assert!(cust.wait_screen(secs(15), popup_shown), "no popup after unblock\n{}", cust.diag());
    cust.deny();
    let ans = answer_to(&mut conn, "b2", secs(10)).unwrap_or_else(|| panic!("{:?}", conn.lines()));
    assert_eq!(line_field(&ans, "reason"), Some("denied"), "{ans}");

    // Ctrl-b u from confirm: pre-grant; the next request installs without a popup.
    cust.keys(&["C-b", "u"]);
    assert!(state_line(&mut conn, "allowed"), "{:?}", conn.lines());
    conn.send(&bed.upgrade("b3"));
    let open = answer_to(&mut conn, "b3", secs(20)).unwrap_or_else(|| panic!("{:?}\n{}", conn.lines(), cust.diag()));
    assert!(open.starts_with("TUNNEL_OPEN "), "{open}");
    assert!(!popup_shown(&cust.screen()));
    assert!(login_works(port_of(&open), &bed.key));

    // Ctrl-b X with an active tunnel: revoked first, then blocked.
    cust.keys(&["C-b", "X"]);
    let closed = conn.wait_verb(secs(15), "TUNNEL_CLOSED").unwrap_or_else(|| panic!("{:?}", conn.lines()));
    assert_eq!(line_field(&closed, "reason"), Some("revoked"));
    assert!(state_line(&mut conn, "blocked"), "{:?}", conn.lines());
    assert!(!has_block(&ak));
    assert!(!login_works(bed.target.port, &bed.key));
}

#[test]
fn restricted_mode_refuses_tunnels() {
    let bed = Bed::new("trestr");
    let before: &[u8] = b"# only this\n";
    std::fs::write(bed.authkeys(), before).unwrap();
    let cust = Customer::start(&bed, "trestr", &["--restricted"]);
    let mut conn = cust.connected(&bed);
    conn.send(&bed.upgrade("x1"));
    let ans = answer_to(&mut conn, "x1", secs(10)).unwrap_or_else(|| panic!("{:?}\n{}", conn.lines(), cust.diag()));
    assert_eq!(line_field(&ans, "reason"), Some("restricted"), "{ans}");
    assert!(!popup_shown(&cust.screen()));
    // The hotkeys cannot open a tunnel either.
    cust.keys(&["C-b", "u"]);
    conn.send(&bed.upgrade("x2"));
    let ans = answer_to(&mut conn, "x2", secs(10)).unwrap_or_else(|| panic!("{:?}", conn.lines()));
    assert_eq!(line_field(&ans, "reason"), Some("restricted"), "{ans}");
    assert_eq!(read(&bed.authkeys()), before);
}

#[test]
fn a_dismissed_popup_returns_and_a_second_request_is_queued() {
    let bed = Bed::new("tqueue");
    let target = bed.target_arg();
    let cust = Customer::start(&bed, "tqueue", &["--target", &target]);
    let mut conn = cust.connected(&bed);
    let key = format!("{}\n", bed.key.public_line);
    let title = asker;

    conn.send(&upgrade_line("q1", "first@linbit.com", &key));
    assert!(
        cust.wait_screen(secs(15), |s| popup_shown(s) && s.contains(&title("first@linbit.com"))),
        "{}",
        cust.diag()
    );
    // Dismissed without an answer (Escape): the request is not lost, the popup comes back.
    cust.keys(&["Escape"]);
    assert!(cust.wait_screen(secs(4), |s| !popup_shown(s)), "Escape did not close the popup\n{}", cust.screen());
    assert!(
        cust.wait_screen(secs(30), |s| popup_shown(s) && s.contains(&title("first@linbit.com"))),
        "a dismissed popup never came back\n{}",
        cust.diag()
    );
    // Asked while the first popup is open: not refused, not shown over it.
    conn.send(&upgrade_line("q2", "second@linbit.com", &key));
    conn.send("PING 77");
    assert!(conn.wait_for(secs(10), |l| l == "PONG 77").is_some(), "{:?}", conn.lines());
    assert!(
        !conn.lines().iter().any(|l| l.starts_with("TUNNEL_") && line_field(l, "req") == Some("q2")),
        "q2 answered before it was asked: {:?}",
        conn.lines()
    );
    cust.deny();
    let a1 = answer_to(&mut conn, "q1", secs(10)).unwrap_or_else(|| panic!("{:?}", conn.lines()));
    assert_eq!(line_field(&a1, "reason"), Some("denied"), "{a1}");
    // The queued request gets its own popup, and a grant opens the tunnel.
    assert!(
        cust.wait_screen(secs(15), |s| popup_shown(s) && s.contains(&title("second@linbit.com"))),
        "no popup for the queued request\n{}",
        cust.diag()
    );
    cust.grant();
    let a2 = answer_to(&mut conn, "q2", secs(20)).unwrap_or_else(|| panic!("{:?}\n{}", conn.lines(), cust.diag()));
    assert!(a2.starts_with("TUNNEL_OPEN "), "{a2}");
    assert!(login_works(port_of(&a2), &bed.key));
}

// ---- issue 9: keys only while active (F7), the loop never waits for ssh -O (F20), the master never
// outlives the daemon (F19) ----------------------------------------------------------------------------

/// Watches authorized_keys from a thread and remembers whether our block was ever in it.
struct FileWatch {
    seen: std::sync::Arc<std::sync::atomic::AtomicBool>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl FileWatch {
    fn start(path: &Path) -> FileWatch {
        use std::sync::atomic::{AtomicBool, Ordering};
        let (seen, stop) = (std::sync::Arc::new(AtomicBool::new(false)), std::sync::Arc::new(AtomicBool::new(false)));
        let (s2, st2, p) = (seen.clone(), stop.clone(), path.to_path_buf());
        let thread = std::thread::spawn(move || {
            while !st2.load(Ordering::SeqCst) {
                if has_block(&p) {
                    s2.store(true, Ordering::SeqCst);
                }
                std::thread::sleep(Duration::from_millis(2));
            }
        });
        FileWatch { seen, stop, thread: Some(thread) }
    }
    fn ever(&self) -> bool {
        self.seen.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl Drop for FileWatch {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[test]
fn a_forward_the_relay_refuses_never_puts_keys_in_the_file() {
    let bed = Bed::with("trefuse", RelayOpts { refuse_forward: true, ..RelayOpts::default() });
    let watch = FileWatch::start(&bed.authkeys());
    let (mut fg, mut conn) = bed.foreground("trefuse");
    for req in ["n1", "n2"] {
        conn.send(&bed.upgrade(req));
        let ans = answer_to(&mut conn, req, secs(30)).unwrap_or_else(|| panic!("{:?}\n{}", conn.lines(), fg.diag()));
        assert!(ans.starts_with("TUNNEL_REJECTED "), "{ans}");
        assert_eq!(line_field(&ans, "reason"), Some("error"), "{ans}");
        assert!(!has_block(&bed.authkeys()), "{req}: keys left behind by a failed grant");
    }
    assert!(!watch.ever(), "support keys were written although the tunnel never opened");
    assert!(!conn.lines().iter().any(|l| l.starts_with("STATE") && l.contains("tunnel=active")), "{:?}", conn.lines());
    assert!(!login_works(bed.target.port, &bed.key));
    fg.signal("TERM");
    assert_eq!(fg.wait(secs(15)), Some(143), "{}", fg.diag());
    assert!(!watch.ever());
}

#[test]
fn relay_close_with_an_active_tunnel_removes_the_keys() {
    let bed = Bed::new("tclose");
    let (mut fg, mut conn) = bed.foreground("tclose");
    let port = open_tunnel(&bed, &fg, &mut conn, "k1");
    conn.send(&close_line("done"));
    assert_eq!(fg.wait(secs(15)), Some(0), "{}", fg.diag());
    assert!(!has_block(&bed.authkeys()));
    assert!(!login_works(port, &bed.key));
    assert!(!login_works(bed.target.port, &bed.key));
}

#[test]
fn a_hanging_ssh_mux_request_does_not_stop_the_loop() {
    let bed = Bed::new("thang");
    let id = unique_id("thang");
    bed.relay.register(&id, Some(TOKEN));
    let target = bed.target_arg();
    let mut fg =
        Foreground::start(&bed.relay, &id, &["--tunnel", "--token", TOKEN, "--target", &target], &[], &bed.scratch);
    let mut conn = bed.relay.accept(secs(30)).unwrap_or_else(|| panic!("no session: {}", fg.diag()));
    // A mux socket that accepts and never answers: `ssh -O forward` hangs as it would on a relay that
    // never answers `tcpip-forward`. The master keeps its connection (it already has it).
    let sock = session_dir(&id).join("ssh-ctl.sock");
    assert!(until(secs(20), || sock.exists()), "no control socket\n{}", fg.diag());
    std::fs::rename(&sock, sock.with_extension("real")).unwrap();
    let _silent = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    conn.welcome(0);
    assert!(conn.wait_verb(secs(10), "STATE").is_some(), "{:?}", conn.lines());
    // The forward is being opened (--tunnel): the loop answers a PING at once all the same.
    let t0 = Instant::now();
    conn.send("PING 7");
    assert!(conn.wait_for(secs(20), |l| l == "PONG 7").is_some(), "{:?}", conn.lines());
    assert!(t0.elapsed() < Duration::from_secs(3), "PONG took {:?}: the loop waited for ssh -O", t0.elapsed());
    // A request while the forward hangs is not granted on a forward that does not exist.
    conn.send(&bed.upgrade("h1"));
    // SIGTERM is answered within the shutdown budget, not after the mux client's deadline.
    let t0 = Instant::now();
    fg.signal("TERM");
    assert_eq!(fg.wait(secs(20)), Some(143), "{}", fg.diag());
    assert!(t0.elapsed() < Duration::from_secs(4), "SIGTERM took {:?}", t0.elapsed());
    assert!(!has_block(&bed.authkeys()));
    assert!(wait_no_processes(&session_dir(&id).display().to_string(), secs(5)).is_empty());
}

#[test]
fn a_killed_foreground_client_takes_its_ssh_master_with_it() {
    let bed = Bed::new("tkillfg");
    let (mut fg, mut conn) = bed.foreground("tkillfg");
    let port = open_tunnel(&bed, &fg, &mut conn, "m1");
    let dir = session_dir(&fg.id).display().to_string();
    let _ = fg.child.kill();
    let _ = fg.child.wait();
    // ssh is in its own session (no SIGHUP) and the relay keeps the channel open: only the
    // parent-death signal ends it.
    let left = wait_no_processes(&dir, secs(5));
    assert!(left.is_empty(), "still running after the client was killed: {left:?}");
    assert!(until(secs(10), || conn.is_closed()), "the relay still has the connection");
    let forward_gone = until(secs(10), || std::net::TcpStream::connect(("127.0.0.1", port)).is_err());
    assert!(forward_gone, "the reverse forward on relay port {port} still accepts connections");
}

#[test]
fn a_killed_daemon_takes_master_and_keys_with_it_and_the_customer_is_told() {
    let bed = Bed::new("tkill");
    let target = bed.target_arg();
    let cust = Customer::start(&bed, "tkill", &["--target", &target]);
    let mut conn = cust.connected(&bed);
    cust.keys(&["C-b", "u"]);
    assert!(state_line(&mut conn, "allowed"), "{:?}\n{}", conn.lines(), cust.diag());
    conn.send(&bed.upgrade("d1"));
    let open = answer_to(&mut conn, "d1", secs(20)).unwrap_or_else(|| panic!("{:?}\n{}", conn.lines(), cust.diag()));
    assert!(open.starts_with("TUNNEL_OPEN "), "{open}");
    let port = port_of(&open);
    assert!(login_works(port, &bed.key));
    let dir = session_dir(&cust.id);
    let pid: i32 = std::fs::read_to_string(dir.join("daemon.pid")).unwrap().trim().parse().unwrap();
    Command::new("kill").args(["-KILL", &pid.to_string()]).status().unwrap();
    // Within seconds: the keys are gone, the relay connection and the forward are gone, and the
    // launcher has ended the session with status 1.
    // Seconds, not forever: the launcher notices within a second; the rest is tmux and a locked
    // rewrite of the file, slow only when every core is busy with the tests running beside this one.
    assert!(
        until(secs(20), || !has_block(&bed.authkeys())),
        "keys still installed after the daemon died\n{}",
        cust.diag()
    );
    assert!(until(secs(10), || conn.is_closed()), "the relay still has the connection");
    assert!(!login_works(bed.target.port, &bed.key));
    assert!(until(secs(15), || cust.exit_status().is_some()), "the launcher did not notice\n{}", cust.diag());
    assert_eq!(cust.exit_status(), Some(1));
    let left = wait_no_processes(&dir.join("ssh-ctl.sock").display().to_string(), secs(5));
    assert!(left.is_empty(), "ssh master outlived the daemon: {left:?}");
}

// ---- issue 9, F1 and F2: only a deliberate act grants; the customer sees who, as whom, where, and
// which keys; the relay's request IDs never reach a command line -----------------------------------

fn informed_popup(s: &str) -> bool {
    popup_shown(s)
}

#[test]
fn typing_never_grants_and_the_popup_says_who_where_and_which_key_on_80x24() {
    let bed = Bed::new("tinform");
    let target = bed.target_arg();
    let watch = FileWatch::start(&bed.authkeys());
    let cust = Customer::start_sized(&bed, "tinform", &["--target", &target], (80, 24));
    let mut conn = cust.connected(&bed);
    // A request ID with every token byte tmux or a shell could trip over (F2).
    let req = "p:1@x+y=/%,";
    conn.send(&bed.upgrade(req));
    assert!(cust.wait_screen(secs(15), informed_popup), "no popup\n{}", cust.diag());
    let pubfile = bed.key.private_path.with_extension("pub");
    let lf = Command::new("ssh-keygen").arg("-lf").arg(&pubfile).output().unwrap();
    let lf = String::from_utf8_lossy(&lf.stdout).trim().to_string();
    // `BITS SHA256:FP COMMENT (TYPE)`; at 80 columns the comment may go on the next line.
    let (fp, rest) = lf.split_at(lf.find(" support@").unwrap_or_else(|| panic!("{lf}")));
    assert!(fp.contains(" SHA256:"), "{lf}");
    // Before 3.0 the question is the status-line prompt (who, as whom); the chat pane above it
    // shows the whole request, of which an 8-row pane keeps the target and the key in view.
    let on = format!("as root on {target}");
    let who = if menus() {
        "eng@linbit.com asks to log in over SSH"
    } else {
        "type GRANT to let eng@linbit.com log in as root"
    };
    let wants = [who, &on, fp, rest.trim()];
    // (The chat pane may draw its copy a moment after the question is up.)
    cust.wait_screen(secs(10), |s| wants.iter().all(|w| s.contains(w)));
    let screen = cust.screen();
    for want in wants {
        assert!(screen.contains(want), "the popup does not say {want:?}:\n{}", cust.diag());
    }
    // The status line and the chat pane's status row fit 80 columns whole (before 3.0 the status
    // line is the prompt until it is answered: checked below).
    let status_whole = |s: &str| {
        let status = s.lines().last().unwrap_or("").to_string();
        status.contains("tunnel confirm") && status.contains("F1 menu")
    };
    if menus() {
        assert!(status_whole(&screen), "status line cut:\n{screen}");
    }

    // What a customer types for the shell the moment the popup appears grants nothing: not `g`, not
    // Enter (preselected first item on tmux >= 3.4), not `y`, not even the word itself. (Before 3.0
    // the first Enter answers the prompt with `g`: denied.)
    for k in ["g", "Enter", "y", "Enter", "G", "R", "A", "N", "T", "Enter"] {
        cust.keys(&[k]);
    }
    conn.send("PING 11");
    assert!(conn.wait_for(secs(10), |l| l == "PONG 11").is_some(), "{:?}", conn.lines());
    assert!(
        !conn.lines().iter().any(|l| l.starts_with("TUNNEL_OPEN")),
        "typing granted the request: {:?}",
        conn.lines()
    );
    let mut req = req.to_string();
    // Before 3.0 the first Enter answers the prompt (`g`); from 3.4 Enter chooses the preselected
    // first item, Deny. Either way: denied, and a new request carries on.
    let enter_answers = !menus() || client_tmux_version() >= (3, 4);
    if enter_answers {
        // (The answer may have come before the PONG that was waited for.)
        let answered = |l: &String| l.starts_with("TUNNEL_REJECTED ") && line_field(l, "req") == Some(req.as_str());
        let ans = conn.lines().into_iter().find(answered).or_else(|| answer_to(&mut conn, &req, secs(10)));
        let ans = ans.unwrap_or_else(|| panic!("{:?}\n{}", conn.lines(), cust.diag()));
        assert_eq!(line_field(&ans, "reason"), Some("denied"), "{ans}");
        assert!(cust.wait_screen(secs(10), status_whole), "status line cut:\n{}", cust.screen());
        req = "p1b".to_string();
        conn.send(&bed.upgrade(&req));
        assert!(cust.wait_screen(secs(15), informed_popup), "no popup\n{}", cust.diag());
    }
    // Dismissed: it does not come back while the customer keeps typing...
    cust.keys(&["Escape"]);
    assert!(cust.wait_screen(secs(5), |s| !informed_popup(s)), "Escape left the popup up\n{}", cust.diag());
    let row = |s: &str| {
        s.lines().any(|l| l.starts_with("relay: connected") && l.ends_with("tunnel: confirm, request waiting"))
    };
    assert!(cust.wait_screen(secs(5), row), "chat status row cut:\n{}", cust.screen());
    let until_t = Instant::now() + Duration::from_secs(12);
    while Instant::now() < until_t {
        cust.keys(&["x"]);
        assert!(!informed_popup(&cust.screen()), "the popup came back in the middle of typing\n{}", cust.diag());
        std::thread::sleep(Duration::from_millis(400));
    }
    cust.keys(&["C-u"]);
    // ...and does once they stop.
    assert!(cust.wait_screen(secs(30), informed_popup), "a dismissed popup never came back\n{}", cust.diag());
    assert!(!watch.ever(), "keys were written without a grant");

    // The deliberate way: choose Grant (no shortcut key), then type the word.
    cust.grant();
    let open = answer_to(&mut conn, &req, secs(20)).unwrap_or_else(|| panic!("{:?}\n{}", conn.lines(), cust.diag()));
    assert!(open.starts_with("TUNNEL_OPEN "), "{open}");
    assert!(login_works(port_of(&open), &bed.key));

    // A second request: a word other than GRANT denies it.
    cust.keys(&["C-b", "U"]);
    assert!(state_line(&mut conn, "confirm"), "{:?}", conn.lines());
    conn.send(&bed.upgrade("p2"));
    assert!(cust.wait_screen(secs(15), informed_popup), "no popup\n{}", cust.diag());
    cust.confirmation();
    cust.keys(&["y", "e", "s", "Enter"]);
    let ans = answer_to(&mut conn, "p2", secs(10)).unwrap_or_else(|| panic!("{:?}\n{}", conn.lines(), cust.diag()));
    assert_eq!(line_field(&ans, "reason"), Some("denied"), "{ans}");
    assert!(!has_block(&bed.authkeys()));
}

// ---- issue 9, F3: REFRESH is coalesced ---------------------------------------------------------------

#[test]
fn a_refresh_flood_costs_a_few_snapshots_not_one_each() {
    let bed = Bed::new("trefresh");
    let cust = Customer::start(&bed, "trefresh", &[]);
    let mut conn = cust.connected(&bed);
    assert!(conn.wait_verb(secs(10), "SNAP").is_some(), "{:?}", conn.lines());
    let snaps = |c: &Conn| c.lines().iter().filter(|l| l.starts_with("SNAP ")).count();
    let before = snaps(&conn);
    for _ in 0..300 {
        conn.send("REFRESH");
    }
    conn.send("PING 31");
    assert!(conn.wait_for(secs(20), |l| l == "PONG 31").is_some(), "{:?}", conn.lines());
    // Whatever was wanted is still delivered: at least one fresh screen arrives.
    assert!(until(secs(10), || snaps(&conn) > before), "no SNAP after REFRESH");
    std::thread::sleep(Duration::from_millis(2500)); // let any further (wrong) snapshots arrive
    let sent = snaps(&conn) - before;
    assert!(sent <= 5, "{sent} SNAPs for 300 REFRESH lines");
}

/// The tunnel question as the customer sees it on 80x24, for the README's compatibility table
/// (`cargo test --test tunnel popup_screen_for_the_readme -- --ignored --nocapture`, with
/// TUNL_TEST_CLIENT_PATH for an old tmux).
#[test]
#[ignore]
fn popup_screen_for_the_readme() {
    let bed = Bed::new("readme");
    let target = bed.target_arg();
    let cust = Customer::start_sized(&bed, "readme", &["--target", &target], (80, 24));
    let mut conn = cust.connected(&bed);
    conn.send(&bed.upgrade("r1"));
    let want = format!("as root on {target}");
    assert!(cust.wait_screen(secs(15), |s| popup_shown(s) && s.contains(&want)), "no popup\n{}", cust.diag());
    println!("{}", cust.screen());
    cust.deny();
    let ans = answer_to(&mut conn, "r1", secs(15)).unwrap_or_else(|| panic!("{:?}\n{}", conn.lines(), cust.diag()));
    assert!(ans.starts_with("TUNNEL_REJECTED "), "{ans}");
}
