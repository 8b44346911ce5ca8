//! Tunnel access: the engineer's ssh to the customer's host through the granted reverse forward.
//! The forward listens on the relay's loopback only, so ssh jumps there through the support account
//! (`ProxyCommand ssh -W 127.0.0.1:PORT`, a direct-tcpip channel the relay permits to 127.0.0.1
//! only), and the customer's host key is pinned per session in `~/.cache/tunl/known_hosts` under
//! `HostKeyAlias=tunl-SID`. `tunl browser` runs the same ssh as a SOCKS proxy (`-D`) and starts a
//! browser with a profile of its own that uses it.

use crate::proto::Item;
use crate::relay::Relay;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use tunl_wire::neutralize;

/// `$XDG_CACHE_HOME/tunl` or `~/.cache/tunl`, created 0700.
pub fn cache_dir() -> Result<PathBuf, String> {
    let base = match std::env::var_os("XDG_CACHE_HOME").filter(|v| !v.is_empty()) {
        Some(x) => PathBuf::from(x),
        None => PathBuf::from(std::env::var_os("HOME").ok_or("HOME is not set")?).join(".cache"),
    };
    let dir = base.join("tunl");
    make_private_dir(&dir)?;
    Ok(dir)
}

pub fn make_private_dir(dir: &Path) -> Result<(), String> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt};
    let shown = neutralize(&dir.to_string_lossy());
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| format!("cannot create {shown}: {e}"))?;
    let m = std::fs::symlink_metadata(dir).map_err(|e| format!("{shown}: {e}"))?;
    if !m.is_dir() || m.uid() != rustix::process::geteuid().as_raw() {
        return Err(format!("{shown} is not a directory of yours"));
    }
    Ok(())
}

/// One argument as `sh -c` reads it back, with `%` doubled for ssh's ProxyCommand token expansion.
fn proxy_word(s: &str) -> String {
    let q = if !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_./:=@,+".contains(&b)) {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    };
    q.replace('%', "%%")
}

/// The ProxyCommand: the engineer's ssh to the support account, opening a channel to the
/// forwarded port on the relay's loopback.
pub fn proxy_command(relay: &Relay, port: u16) -> String {
    // ssh runs it as `exec COMMAND` in the user's shell itself.
    let mut argv = vec![crate::relay::ssh_program()];
    argv.extend(relay.base_args());
    argv.extend(["-T".into(), "-W".into(), format!("127.0.0.1:{port}"), relay.destination()]);
    argv.iter().map(|a| proxy_word(a)).collect::<Vec<_>>().join(" ")
}

/// A user name the customer named for the tunnel, safe as ssh's `-l`.
fn check_user(user: &str) -> Result<(), String> {
    let ok = !user.is_empty()
        && user.len() <= 32
        && !user.starts_with('-')
        && user.bytes().enumerate().all(|(i, b)| {
            b.is_ascii_alphanumeric() || b == b'_' || b == b'.' || b == b'-' || (b == b'$' && i == user.len() - 1)
        });
    if ok { Ok(()) } else { Err(format!("the customer's user name '{user}' is not one ssh can log in as")) }
}

/// The port and user of an open tunnel, or a sentence saying why there is none.
pub fn tunnel_of(item: &Item) -> Result<(u16, String), String> {
    let Some(port) = item.port else {
        return Err(format!(
            "{}: no tunnel is open (mode {}); ask for one with: tunl upgrade {}",
            item.id, item.state, item.id
        ));
    };
    check_user(&item.user)?;
    Ok((port, item.user.clone()))
}

/// The ssh options of every login through the tunnel, before the destination.
pub fn login_args(relay: &Relay, sid: &str, port: u16, user: &str, known_hosts: &Path) -> Vec<String> {
    let mut a = Vec::new();
    if let Some(f) = &relay.ssh_config {
        a.push("-F".into());
        a.push(f.to_string_lossy().into_owned());
    }
    let kh = known_hosts.to_string_lossy();
    let kh = if kh.contains(' ') { format!("\"{kh}\"") } else { kh.into_owned() };
    for o in [
        format!("ProxyCommand={}", proxy_command(relay, port)),
        format!("HostKeyAlias=tunl-{sid}"),
        format!("UserKnownHostsFile={kh}"),
        "GlobalKnownHostsFile=/dev/null".into(),
        // The first login of a session learns the customer's host key; a different key later in
        // the same session is refused.
        "StrictHostKeyChecking=accept-new".into(),
        "CheckHostIP=no".into(),
    ] {
        a.push("-o".into());
        a.push(o);
    }
    a.push("-l".into());
    a.push(user.into());
    a
}

/// `tunl ssh`: replaces this process with the engineer's ssh; returns only on failure.
pub fn exec_ssh(relay: &Relay, item: &Item, command: &[std::ffi::OsString]) -> String {
    let (port, user) = match tunnel_of(item) {
        Ok(t) => t,
        Err(e) => return e,
    };
    let kh = match cache_dir() {
        Ok(d) => d.join("known_hosts"),
        Err(e) => return e,
    };
    let mut c = Command::new(crate::relay::ssh_program());
    c.args(login_args(relay, &item.id, port, &user, &kh));
    c.arg(format!("tunl-{}", item.id));
    if !command.is_empty() {
        c.arg("--");
        c.args(command);
    }
    let e = c.exec();
    format!("cannot run ssh: {e}")
}

/// `--kill` needs to know what it started: one small file per profile.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct BrowserState {
    pub sid: String,
    pub ssh_pid: i32,
    pub browser_pid: i32,
    pub port: u16,
}

impl BrowserState {
    pub fn render(&self) -> String {
        format!("sid={}\nssh_pid={}\nbrowser_pid={}\nport={}\n", self.sid, self.ssh_pid, self.browser_pid, self.port)
    }
    pub fn parse(s: &str) -> Option<BrowserState> {
        let mut st = BrowserState::default();
        for l in s.lines() {
            let (k, v) = l.split_once('=')?;
            match k {
                "sid" => st.sid = v.to_string(),
                "ssh_pid" => st.ssh_pid = v.parse().ok()?,
                "browser_pid" => st.browser_pid = v.parse().ok()?,
                "port" => st.port = v.parse().ok()?,
                _ => {}
            }
        }
        crate::cli::valid_session_id(&st.sid).then_some(st)
    }
}

/// The browser: `TUNL_BROWSER`, else the first of the usual ones on PATH.
fn find_browser() -> Option<String> {
    if let Some(b) = std::env::var("TUNL_BROWSER").ok().filter(|b| !b.is_empty()) {
        return Some(b);
    }
    let path = std::env::var_os("PATH")?;
    for name in ["firefox", "firefox-esr", "chromium", "chromium-browser", "google-chrome", "brave-browser"] {
        if std::env::split_paths(&path).any(|d| d.join(name).is_file()) {
            return Some(name.into());
        }
    }
    None
}

/// The browser's arguments for a profile directory and the SOCKS port. Firefox-like browsers read
/// the proxy from the profile's `user.js` (written by the caller); Chromium-like take flags.
pub fn browser_args(browser: &str, profile_dir: &Path, port: u16) -> Vec<String> {
    let base = Path::new(browser).file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    if base.contains("firefox") {
        vec!["-no-remote".into(), "-profile".into(), profile_dir.to_string_lossy().into_owned(), "about:blank".into()]
    } else {
        vec![
            format!("--user-data-dir={}", profile_dir.to_string_lossy()),
            format!("--proxy-server=socks5://127.0.0.1:{port}"),
            // The customer's own localhost web UIs go through the proxy too.
            "--proxy-bypass-list=<-loopback>".into(),
            "--no-first-run".into(),
            "--no-default-browser-check".into(),
            "about:blank".into(),
        ]
    }
}

/// Firefox's proxy settings for the profile: SOCKS5 with remote DNS, localhost included.
pub fn firefox_user_js(port: u16) -> String {
    format!(
        "user_pref(\"network.proxy.type\", 1);\nuser_pref(\"network.proxy.socks\", \"127.0.0.1\");\nuser_pref(\"network.proxy.socks_port\", {port});\nuser_pref(\"network.proxy.socks_version\", 5);\nuser_pref(\"network.proxy.socks_remote_dns\", true);\nuser_pref(\"network.proxy.no_proxies_on\", \"\");\nuser_pref(\"network.proxy.allow_hijacking_localhost\", true);\nuser_pref(\"browser.shell.checkDefaultBrowser\", false);\n"
    )
}

fn pid_alive(pid: i32) -> bool {
    pid > 0 && std::path::Path::new(&format!("/proc/{pid}")).exists()
}

fn cmdline(pid: i32) -> String {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
        .unwrap_or_default()
}

/// SIGTERM to `pid` if it is still the process we started (its command line names `marker`).
fn end_if_ours(pid: i32, marker: &str) -> bool {
    if pid_alive(pid) && cmdline(pid).contains(marker) {
        // SAFETY: kill(2) with a positive pid and a valid signal.
        unsafe { libc::kill(pid, libc::SIGTERM) == 0 }
    } else {
        false
    }
}

fn free_port() -> Result<u16, String> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| format!("no free local port: {e}"))?;
    Ok(l.local_addr().map_err(|e| e.to_string())?.port())
}

fn detached(c: &mut Command) -> &mut Command {
    // SAFETY: setsid(2) is async-signal-safe; the child leaves our session so closing the
    // engineer's terminal does not end the proxy or the browser.
    unsafe {
        c.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    c
}

/// `tunl browser ID [--profile NAME]`: start the proxy and the browser, print what runs.
pub fn browser_start(relay: &Relay, item: &Item, profile: &str) -> Result<String, String> {
    let (port, user) = tunnel_of(item)?;
    let cache = cache_dir()?;
    let bdir = cache.join("browser");
    make_private_dir(&bdir)?;
    let state_file = bdir.join(format!("{profile}.state"));
    if let Some(st) = std::fs::read_to_string(&state_file).ok().and_then(|s| BrowserState::parse(&s))
        && pid_alive(st.ssh_pid)
    {
        return Err(format!(
            "profile {profile} already runs a proxy on 127.0.0.1:{} for {}: tunl browser {} --profile {profile} --kill ends it",
            st.port, st.sid, st.sid
        ));
    }
    let socks = free_port()?;
    let log = bdir.join(format!("{profile}.log"));
    let logf = std::fs::File::create(&log).map_err(|e| format!("cannot write {}: {e}", log.display()))?;
    let mut c = Command::new(crate::relay::ssh_program());
    c.args(login_args(relay, &item.id, port, &user, &cache.join("known_hosts")));
    c.args(["-N", "-o", "ExitOnForwardFailure=yes", "-o", "BatchMode=yes", "-D", &format!("127.0.0.1:{socks}")]);
    c.arg(format!("tunl-{}", item.id));
    c.stdin(Stdio::null()).stdout(Stdio::null()).stderr(logf.try_clone().map_err(|e| e.to_string())?);
    let mut ssh = detached(&mut c).spawn().map_err(|e| format!("cannot run ssh: {e}"))?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if std::net::TcpStream::connect(("127.0.0.1", socks)).is_ok() {
            break;
        }
        if let Ok(Some(st)) = ssh.try_wait() {
            let why = std::fs::read(&log).ok().and_then(|b| crate::relay::last_stderr_line(&b));
            return Err(format!(
                "the SOCKS proxy did not start (ssh {st}{})",
                why.map(|w| format!(": {w}")).unwrap_or_default()
            ));
        }
        if Instant::now() > deadline {
            let _ = ssh.kill();
            let _ = ssh.wait();
            return Err("the SOCKS proxy did not start within 30 s".into());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut st = BrowserState { sid: item.id.clone(), ssh_pid: ssh.id() as i32, browser_pid: 0, port: socks };
    let mut out = format!("SOCKS proxy 127.0.0.1:{socks} through the tunnel of {} (ssh pid {})\n", item.id, st.ssh_pid);
    let pdir = bdir.join(profile);
    make_private_dir(&pdir)?;
    match find_browser() {
        None => out.push_str("no browser found (set TUNL_BROWSER); point one at the proxy yourself\n"),
        Some(b) => {
            if Path::new(&b).file_name().is_some_and(|n| n.to_string_lossy().contains("firefox")) {
                std::fs::write(pdir.join("user.js"), firefox_user_js(socks))
                    .map_err(|e| format!("cannot write the profile: {e}"))?;
            }
            let mut c = Command::new(&b);
            c.args(browser_args(&b, &pdir, socks)).stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null());
            match detached(&mut c).spawn() {
                Ok(child) => {
                    st.browser_pid = child.id() as i32;
                    out.push_str(&format!(
                        "browser {} with profile {} (pid {})\n",
                        neutralize(&b),
                        pdir.display(),
                        st.browser_pid
                    ));
                }
                Err(e) => out.push_str(&format!("cannot start the browser {}: {e}\n", neutralize(&b))),
            }
        }
    }
    std::fs::write(&state_file, st.render()).map_err(|e| format!("cannot write {}: {e}", state_file.display()))?;
    out.push_str(&format!("end both: tunl browser {} --profile {profile} --kill\n", item.id));
    Ok(out)
}

/// `tunl browser ID --kill`: end the proxy and the browser of that profile.
pub fn browser_kill(sid: &str, profile: &str) -> Result<String, String> {
    let bdir = cache_dir()?.join("browser");
    let state_file = bdir.join(format!("{profile}.state"));
    let Some(st) = std::fs::read_to_string(&state_file).ok().and_then(|s| BrowserState::parse(&s)) else {
        return Err(format!("no browser of tunl runs with profile {profile}"));
    };
    if st.sid != sid {
        return Err(format!("profile {profile} belongs to session {}, not {sid}", st.sid));
    }
    let pdir = bdir.join(profile);
    let b = end_if_ours(st.browser_pid, &pdir.to_string_lossy());
    let s = end_if_ours(st.ssh_pid, &format!("127.0.0.1:{}", st.port));
    let _ = std::fs::remove_file(&state_file);
    Ok(format!(
        "{}; {}\n",
        if s { "proxy ended" } else { "the proxy was not running" },
        if b { "browser ended" } else { "the browser was not running" }
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn relay() -> Relay {
        Relay {
            host: "relay.example".into(),
            port: 2222,
            user: "alice".into(),
            ssh_config: Some("/tmp/my cfg%".into()),
        }
    }

    #[test]
    fn proxy_command_quotes_for_sh_and_ssh() {
        let p = proxy_command(&relay(), 40001);
        assert_eq!(
            p,
            "ssh -F '/tmp/my cfg%%' -o ForwardAgent=no -o ForwardX11=no -o ServerAliveInterval=15 -o ServerAliveCountMax=3 -p 2222 -T -W 127.0.0.1:40001 alice@relay.example"
        );
    }

    #[test]
    fn login_pins_the_host_key_per_session() {
        let a = login_args(&relay(), "swift-fox-jumps-barrel", 40001, "root", Path::new("/h/.cache/tunl/known_hosts"));
        let s = a.join("\n");
        assert!(s.contains("HostKeyAlias=tunl-swift-fox-jumps-barrel"));
        assert!(s.contains("UserKnownHostsFile=/h/.cache/tunl/known_hosts"));
        assert!(s.contains("StrictHostKeyChecking=accept-new"));
        assert!(s.ends_with("-l\nroot"));
    }

    #[test]
    fn tunnel_needed() {
        let mut it = Item { id: "a-b-c-d".into(), state: "share".into(), user: "root".into(), ..Item::default() };
        assert!(tunnel_of(&it).unwrap_err().contains("tunl upgrade a-b-c-d"));
        it.port = Some(4000);
        assert_eq!(tunnel_of(&it).unwrap(), (4000, "root".into()));
        it.user = "-oProxyCommand=x".into();
        assert!(tunnel_of(&it).is_err());
    }

    #[test]
    fn browsers() {
        let a = browser_args("/usr/bin/chromium", Path::new("/p"), 1080);
        assert!(a.contains(&"--proxy-server=socks5://127.0.0.1:1080".to_string()));
        assert!(a.contains(&"--user-data-dir=/p".to_string()));
        let a = browser_args("firefox-esr", Path::new("/p"), 1080);
        assert_eq!(a[..3], ["-no-remote", "-profile", "/p"]);
        assert!(firefox_user_js(1080).contains("socks_port\", 1080"));
        let st = BrowserState { sid: "a-b-c-d".into(), ssh_pid: 5, browser_pid: 6, port: 7 };
        assert_eq!(BrowserState::parse(&st.render()), Some(st));
        assert_eq!(BrowserState::parse("sid=bad\n"), None);
    }
}
