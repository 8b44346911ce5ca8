//! `tunl` as an engineer meets it before any relay answers: help, bad input, an unreachable relay.
//! Every error is one line on stderr and status 1, and nothing is left behind.

use std::process::{Command, Output, Stdio};

const TUNL: &str = env!("CARGO_BIN_EXE_tunl");

fn tunl(args: &[&str], env: &[(&str, &str)]) -> Output {
    Command::new(TUNL)
        .args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap())
        .env("USER", "alice")
        .env("HOME", std::env::temp_dir())
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

fn one_line_error(o: &Output, want: &str) {
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.starts_with("tunl: ") && err.contains(want), "want {want:?}: {err}");
    assert!(o.stdout.is_empty(), "{}", String::from_utf8_lossy(&o.stdout));
}

#[test]
fn help_and_version() {
    for args in [&["help"][..], &["--help"], &[]] {
        let o = tunl(args, &[]);
        assert!(o.status.success());
        let out = String::from_utf8_lossy(&o.stdout);
        for cmd in [
            "create-session",
            "list",
            "show",
            "pick",
            "join",
            "upgrade",
            "ssh",
            "browser",
            "chat",
            "note",
            "close",
            "cancel",
            "expect",
            "detach",
            "log",
        ] {
            assert!(out.contains(&format!("  {cmd}")), "{cmd} missing from help");
        }
    }
    let o = tunl(&["--version"], &[]);
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), format!("tunl {}", env!("CARGO_PKG_VERSION")));
}

#[test]
fn bad_input() {
    one_line_error(&tunl(&["frobnicate"], &[]), "unknown command");
    one_line_error(&tunl(&["show", "not-an-id"], &[]), "is not a session ID");
    one_line_error(&tunl(&["show", "a\x1b[2Jb-c-d-e"], &[]), "is not a session ID");
    assert!(!tunl(&["show", "a\x1b[2Jb-c-d-e"], &[]).stderr.contains(&0x1b));
    one_line_error(&tunl(&["list"], &[("TUNL_RELAY_PORT", "99999")]), "TUNL_RELAY_PORT");
    one_line_error(&tunl(&["list"], &[("TUNL_SSH_CONFIG", "/nonexistent")]), "TUNL_SSH_CONFIG");
    one_line_error(&tunl(&["join", "swift-fox-jumps-barrel"], &[]), "needs a terminal");
    one_line_error(&tunl(&["upgrade", "swift-fox-jumps-barrel", "--key", "/nonexistent.pub"], &[]), "/nonexistent.pub");
    one_line_error(&tunl(&["detach"], &[("XDG_RUNTIME_DIR", "/nonexistent")]), "no tunl join is running");
    one_line_error(
        &tunl(
            &["browser", "swift-fox-jumps-barrel", "--kill"],
            &[(
                "XDG_CACHE_HOME",
                &std::env::temp_dir().join(format!("tunl-cli-{}", std::process::id())).display().to_string(),
            )],
        ),
        "no browser of tunl",
    );
    let _ = std::fs::remove_dir_all(std::env::temp_dir().join(format!("tunl-cli-{}", std::process::id())));
}

#[test]
fn unreachable_relay_is_named() {
    // A port nothing listens on: ssh's own reason comes back in one line.
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port().to_string();
    drop(l);
    let cfg = std::env::temp_dir().join(format!("tunl-cli-cfg-{}", std::process::id()));
    std::fs::write(&cfg, "Host *\n  BatchMode yes\n  ConnectTimeout 10\n").unwrap();
    let o = tunl(
        &["list"],
        &[("TUNL_RELAY", "127.0.0.1"), ("TUNL_RELAY_PORT", &port), ("TUNL_SSH_CONFIG", &cfg.display().to_string())],
    );
    let _ = std::fs::remove_file(&cfg);
    one_line_error(&o, &format!("no answer from the relay 127.0.0.1:{port}"));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("Connection refused"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
}
