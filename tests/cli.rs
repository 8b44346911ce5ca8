//! The built binary against bad input: one clear line, exit status 1, nothing created.

use std::path::PathBuf;
use std::process::{Command, Output};

const BIN: &str = env!("CARGO_BIN_EXE_linbit-tunl");

fn session_path(id: &str) -> PathBuf {
    use sha2::{Digest, Sha256};
    let d = Sha256::digest(id.as_bytes());
    let h: String = d.iter().take(6).map(|b| format!("{b:02x}")).collect();
    PathBuf::from(format!("/tmp/linbit-tunl-{h}"))
}

fn run(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut c = Command::new(BIN);
    c.args(args).env_clear().env("PATH", std::env::var("PATH").unwrap()).env("USER", "root").env("HOME", "/root");
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().unwrap()
}

/// Exit 1, exactly one line on stderr naming `needle`, nothing on stdout, no session directory.
fn refused(args: &[&str], env: &[(&str, &str)], needle: &str) {
    let ids: Vec<&str> = args.iter().copied().filter(|a| !a.starts_with('-')).collect();
    let out = run(args, env);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{args:?} {env:?}: {err}");
    assert_eq!(err.lines().count(), 1, "{args:?}: want one line, got {err:?}");
    assert!(err.contains(needle), "{args:?}: {err:?} lacks {needle:?}");
    assert!(out.stdout.is_empty());
    for id in ids {
        assert!(!session_path(id).exists(), "{args:?} created {}", session_path(id).display());
    }
}

#[test]
fn bad_arguments_are_refused_without_side_effects() {
    refused(&["Swift-fox-jumps-barrel"], &[], "invalid session ID");
    refused(&["swift-fox-jumps"], &[], "invalid session ID");
    refused(&["swift-fox-jumps-barrel-now"], &[], "invalid session ID");
    refused(&["swift-fox-jumps-b4rrel"], &[], "invalid session ID");
    refused(&[], &[], "missing SESSION_ID");
    refused(&["cli-test-one-a", "cli-test-one-b"], &[], "extra argument");
    refused(&["--token", "12345", "cli-test-two-a"], &[], "six digits");
    refused(&["--token", "1234567", "cli-test-two-a"], &[], "six digits");
    refused(&["--token", "12a456", "cli-test-two-a"], &[], "six digits");
    refused(&["--target", "localhost", "cli-test-three-a"], &[], "--target");
    refused(&["--target", "localhost:0", "cli-test-three-a"], &[], "--target");
    refused(&["--target", "localhost:70000", "cli-test-three-a"], &[], "--target");
    refused(&["--target", "::1:22", "cli-test-three-a"], &[], "--target");
    refused(&["--user", "no body", "cli-test-four-a"], &[], "--user");
    refused(&["--user", "-rf", "cli-test-four-a"], &[], "--user");
    refused(&["--user", "machine$", "cli-test-four-a"], &[], "--user");
    refused(&["--case", "a\x1b[2Jb", "cli-test-five-a"], &[], "control characters");
    refused(&["--case", &"x".repeat(201), "cli-test-five-a"], &[], "--case");
    refused(&["--restricted", "--tunnel", "cli-test-six-a"], &[], "contradict");
    refused(&["--frobnicate", "cli-test-six-a"], &[], "unknown option");
    refused(&["-x", "cli-test-six-a"], &[], "unknown option");
    refused(&["--case"], &[], "--case needs a value");
}

#[test]
fn bad_environment_is_refused_without_side_effects() {
    let id = "cli-test-env-a";
    refused(&[id], &[("TUNL_RELAY_PORT", "0")], "TUNL_RELAY_PORT");
    refused(&[id], &[("TUNL_RELAY_PORT", "22x")], "TUNL_RELAY_PORT");
    refused(&[id], &[("TUNL_TARGET_PORT", "65536")], "TUNL_TARGET_PORT");
    refused(&[id], &[("TUNL_COMPRESS", "yes")], "TUNL_COMPRESS");
    refused(&[id], &[("TUNL_API", "http://tunl.linbit.com")], "TUNL_API");
    refused(&[id], &[("TUNL_API", "tunl.linbit.com")], "TUNL_API");
    refused(&[id], &[("TUNL_RELAY_CA_PUBKEY", "ssh-ed25519 notbase64")], "TUNL_RELAY_CA_PUBKEY");
    // F22: the launcher and the daemon run in different directories; a relative path means two files.
    refused(&[id], &[("TUNL_AUTHKEYS_FILE", "keys/authorized_keys")], "TUNL_AUTHKEYS_FILE");
    // Without $USER and $LOGNAME (cron, `su -c`, a systemd unit) the effective user is the default,
    // as `id -un` says: the user check passes and the next refusal is the API's.
    refused(&[id], &[("USER", ""), ("LOGNAME", ""), ("TUNL_API", "http://x")], "TUNL_API");
    refused(&[id], &[("TUNL_TOKEN", "12345")], "TUNL_TOKEN");
}

/// A user name that the hello cannot carry (`machine$`) is refused with the other arguments: one
/// line naming --user, before a session directory, a tmux server or a recording exists.
#[test]
fn a_user_the_relay_cannot_take_is_refused_up_front() {
    let rec = std::env::temp_dir().join(format!("tunl-cli-rec-{}", std::process::id()));
    std::fs::create_dir_all(&rec).unwrap();
    let r = rec.display().to_string();
    for mode in [&[][..], &["--tunnel"], &["--restricted"]] {
        let mut args = mode.to_vec();
        args.extend(["--user", "machine$", "cli-test-user-a"]);
        refused(&args, &[("TUNL_RECORDING_DIR", &r)], "--user: 'machine$'");
    }
    refused(&["cli-test-user-a"], &[("USER", "machine$"), ("TUNL_RECORDING_DIR", &r)], "machine$");
    assert!(std::fs::read_dir(&rec).unwrap().next().is_none(), "a recording was created");
    std::fs::remove_dir_all(&rec).unwrap();
}

/// A closed or full stdout/stderr ends with one of the manual's statuses (0 or 1), never a panic's
/// SIGABRT (134).
#[test]
fn closed_or_full_output_is_not_a_crash() {
    let full = || std::fs::OpenOptions::new().write(true).open("/dev/full").unwrap();
    let plain = |args: &[&str]| {
        let mut c = Command::new(BIN);
        c.args(args).env_clear().env("PATH", std::env::var("PATH").unwrap()).env("USER", "root");
        c
    };
    // `linbit-tunl --help | head -1`: the reader is gone before we write.
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let out = plain(&["--help"]).stdout(writer).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.stderr.is_empty(), "{}", String::from_utf8_lossy(&out.stderr));
    // `--version >/dev/full`: said on stderr, status 1.
    for flag in ["--version", "--help"] {
        let out = plain(&[flag]).stdout(full()).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{flag}: {err}");
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(err.contains("cannot write to standard output"), "{err}");
    }
    // A bad option with stderr on a full device: the line is lost, the status is still 1.
    let out = plain(&["--no-such-option"]).stderr(full()).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let out = plain(&["--no-such-option"]).stderr(std::process::Stdio::null()).stdout(full()).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
}

#[test]
fn tmux_missing_is_refused_unless_tunnel_mode() {
    let out = Command::new(BIN)
        .arg("cli-test-notmux-a")
        .env_clear()
        .env("PATH", "/nonexistent")
        .env("USER", "root")
        .env("HOME", "/root")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("tmux"), "{err}");
    assert!(err.contains("--tunnel"), "the message points at the mode that works: {err}");
    assert!(!session_path("cli-test-notmux-a").exists());
}

#[test]
fn help_and_version() {
    for flag in ["--help", "-h"] {
        let out = run(&[flag], &[]);
        assert_eq!(out.status.code(), Some(0));
        let text = String::from_utf8_lossy(&out.stdout);
        for word in [
            "--case CASE",
            "--token TOKEN",
            "--user USER",
            "--restricted",
            "--tunnel",
            "--attach",
            "--debug",
            "--target HOST:PORT",
            "SESSION_ID",
            "TUNL_RELAY ",
            "TUNL_RELAY_PORT",
            "TUNL_USER",
            "TUNL_API",
            "TUNL_AUTHKEYS_FILE",
            "TUNL_TARGET_HOST",
            "TUNL_TARGET_PORT",
            "TUNL_RELAY_CA_PUBKEY",
            "TUNL_COMPRESS",
            "TUNL_PREFIX",
            "tunl.linbit.com",
        ] {
            assert!(text.contains(word), "--help lacks {word}");
        }
    }
    for flag in ["--version", "-V"] {
        let out = run(&[flag], &[]);
        assert_eq!(out.status.code(), Some(0));
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), format!("linbit-tunl {}", env!("CARGO_PKG_VERSION")));
    }
    // Help wins wherever it stands, even after the ID.
    assert_eq!(run(&["cli-test-help-a", "--help"], &[]).status.code(), Some(0));
}

/// A path at the session directory's place that is not ours is refused, never followed or reused.
#[test]
fn session_directory_rules_hold_for_the_real_binary() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let id = "cli-test-plant-a";
    let path = session_path(id);
    let _ = std::fs::remove_file(&path);
    let _ = std::fs::remove_dir_all(&path);
    let target = std::env::temp_dir().join(format!("tunl-cli-plant-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&target);
    std::fs::create_dir(&target).unwrap();

    // A symlink an attacker planted: refused, and nothing appears where it points.
    std::os::unix::fs::symlink(&target, &path).unwrap();
    let out = run(&["--tunnel", id], &[]);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("symbolic link"), "{err}");
    assert!(std::fs::read_dir(&target).unwrap().next().is_none(), "the link was followed");
    assert!(std::fs::symlink_metadata(&path).unwrap().file_type().is_symlink());
    std::fs::remove_file(&path).unwrap();

    // A directory that other users can enter: refused.
    std::fs::create_dir(&path).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o777)).unwrap();
    let out = run(&["--tunnel", id], &[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("lets other users in"));
    assert!(std::fs::read_dir(&path).unwrap().next().is_none(), "nothing was written into it");

    // A directory owned by someone else: refused, and left as it was.
    if rustix::process::geteuid().is_root() {
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o700)).unwrap();
        std::os::unix::fs::chown(&path, Some(65534), Some(65534)).unwrap();
        let out = run(&["--tunnel", id], &[]);
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert_eq!(out.status.code(), Some(1), "{err}");
        assert!(err.contains("belongs to uid 65534"), "{err}");
        assert_eq!(std::fs::metadata(&path).unwrap().uid(), 65534);
        assert!(std::fs::read_dir(&path).unwrap().next().is_none());
    }
    std::fs::remove_dir_all(&path).unwrap();
    std::fs::remove_dir_all(&target).unwrap();
}

#[test]
fn options_after_the_session_id_are_options() {
    // Parsed after the ID, --restricted and --tunnel still meet and contradict each other.
    refused(&["cli-test-after-a", "--restricted", "--tunnel"], &[], "contradict");
    refused(&["cli-test-after-a", "--token", "99"], &[], "six digits");
}
