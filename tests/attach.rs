//! `--attach`: the session inside the customer's own tmux, typed at through a real client of it.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::*;

fn tmux(sock: &Path, args: &[&str]) -> String {
    // The customer's own tmux is the client's (a client talks only to a server of its version).
    let o = Command::new(client_tmux()).arg("-S").arg(sock).args(args).env_remove("TMUX").output().unwrap();
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// The terminal the customer sees their tmux through: the system's tmux.
fn terminal(sock: &Path, args: &[&str]) {
    Command::new(outer_tmux()).arg("-S").arg(sock).args(args).env_remove("TMUX").output().unwrap();
}

fn wait(deadline: std::time::Instant, mut f: impl FnMut() -> bool) -> bool {
    while std::time::Instant::now() < deadline {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(30));
    }
    false
}

/// The outer server (the terminal) and the customer's own server, killed at the end.
struct Servers(std::path::PathBuf, std::path::PathBuf);

impl Drop for Servers {
    fn drop(&mut self) {
        let _ = Command::new(outer_tmux()).arg("-S").arg(&self.0).arg("kill-server").output();
        let _ = Command::new(client_tmux()).arg("-S").arg(&self.1).arg("kill-server").output();
    }
}

#[test]
fn attach_builds_a_window_in_the_customers_tmux_and_gives_everything_back() {
    let relay = Relay::start(RelayOpts::default()).unwrap();
    let scratch = Scratch::new("attach");
    let id = unique_id("attach");
    relay.register(&id, Some("246810"));
    let outer = scratch.path().join("outer.sock");
    let theirs = scratch.path().join("theirs.sock");
    let _servers = Servers(outer.clone(), theirs.clone());
    // The customer's own tmux, with its stock bindings, seen through a terminal (the outer server).
    // Its server, like a real one, has the client's tools first on its PATH: the panes it starts
    // (our daemon among them) find the same tmux as the customer's shell. Its shell is sh with a
    // home of its own: this machine's root ~/.bashrc (pyenv's rehash, which waits a minute on a
    // lock a killed shell left) must not decide when the customer's prompt comes.
    let client = format!(
        "env PATH='{}' SHELL=/bin/sh HOME='{}' {} -S {} -f /dev/null new-session -s mine",
        client_path(),
        scratch.path().display(),
        client_tmux().display(),
        theirs.display()
    );
    Command::new(outer_tmux())
        .arg("-S")
        .arg(&outer)
        .args(["-f", "/dev/null", "new-session", "-d", "-x", "160", "-y", "48", &client])
        .env_remove("TMUX")
        .status()
        .unwrap();
    assert!(wait(secs(10), || tmux(&theirs, &["list-sessions"]).contains("mine")), "customer's tmux did not start");
    // Key tables (`list-keys -T`) came with tmux 2.1; before, every binding is in one list.
    let keys = |table: &str| {
        if client_tmux_version() >= (2, 1) {
            tmux(&theirs, &["list-keys", "-T", table])
        } else {
            tmux(&theirs, &["list-keys"])
        }
    };
    let before = keys("prefix");
    assert!(before.contains("new-window"));

    let mut script = format!("export PATH='{}'\n", client_path());
    for (k, v) in relay.env() {
        script.push_str(&format!("export {k}='{v}'\n"));
    }
    let sp = scratch.path().display();
    script.push_str(&format!(
        "export USER=root HOME={sp} TUNL_AUTHKEYS_FILE={sp}/ak TUNL_RECORDING_DIR={sp}\n\
         {BIN} --attach --token 246810 {id}\necho EXIT=$? > {sp}/status\n"
    ));
    std::fs::write(scratch.path().join("run.sh"), script).unwrap();
    terminal(&outer, &["send-keys", &format!("sh {sp}/run.sh"), "Enter"]);

    let screen = |sock: &Path| {
        let o = Command::new(outer_tmux()).arg("-S").arg(sock).args(["capture-pane", "-p"]).env_remove("TMUX").output();
        o.map(|o| String::from_utf8_lossy(&o.stdout).into_owned()).unwrap_or_default()
    };
    let Some(mut conn) = relay.accept(secs(30)) else {
        panic!("the session did not reach the relay; the customer's terminal:\n{}", screen(&outer))
    };
    conn.welcome(1);
    assert!(conn.wait_verb(secs(10), "SNAP").is_some(), "{:?}", conn.lines());
    assert!(wait(secs(10), || tmux(&theirs, &["list-windows", "-F", "#W"]).contains("linbit-tunl")));
    let size = conn.lines().into_iter().find(|l| l.starts_with("SIZE ")).unwrap();
    assert_ne!(size, "SIZE 80 24", "the shared pane has the real size of the customer's window");
    // Support types into the shell pane of the new window.
    conn.send(&relay_double::k_line(b"echo ATTACHED-$((40+2))\r"));
    assert!(conn.wait_output(secs(10), |o| String::from_utf8_lossy(o).contains("ATTACHED-42")));
    // The customer presses Ctrl-b Q in their own tmux.
    terminal(&outer, &["send-keys", "C-b", "Q"]);
    assert!(conn.wait_for(secs(15), |l| l == "BYE reason=customer").is_some(), "{:?}", conn.lines());
    let status = scratch.path().join("status");
    assert!(wait(secs(15), || std::fs::read_to_string(&status).is_ok_and(|s| s.trim() == "EXIT=0")));
    // Our windows are gone, the customer's session lives on, and their bindings are theirs again.
    let windows = tmux(&theirs, &["list-windows", "-t", "mine", "-F", "#W"]);
    assert!(!windows.contains("linbit"), "{windows}");
    assert_eq!(keys("prefix"), before, "bindings restored exactly");
    assert!(keys("root").lines().all(|l| !l.contains("linbit-tunl")));
    assert!(!session_dir(&id).exists());
    assert!(wait_no_processes(&session_dir(&id).display().to_string(), secs(5)).is_empty());
}
