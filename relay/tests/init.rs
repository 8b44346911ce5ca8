//! `tunl-relay init` and `serve` on a temp root: idempotent, the owners and modes the processes
//! need, bad options change nothing, and `serve` leaves nothing behind. Run as root.

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;

use common::*;
use tunl_relay::registry::Registry;

fn mode_owner(p: &Path) -> (u32, u32, u32) {
    let m = std::fs::metadata(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    (m.mode() & 0o7777, m.uid(), m.gid())
}

fn processes_mentioning(needle: &str) -> Vec<String> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        if let Ok(cmd) = std::fs::read(e.path().join("cmdline")) {
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            if cmd.contains(needle) {
                out.push(format!("{}: {cmd}", e.file_name().to_string_lossy()));
            }
        }
    }
    out
}

#[test]
fn init_is_idempotent_and_sets_owners_and_modes() {
    let mut relay = relay();
    let l = relay.layout.clone();
    let cfg = relay.cfg.clone();
    let again = Command::new(env!("CARGO_BIN_EXE_tunl-relay"))
        .arg("init")
        .arg("--root")
        .arg(&l.root)
        .args(["--port", &cfg.port.to_string(), "--api-port", &cfg.api_port.to_string()])
        .args(["--customer-user", &cfg.customer_user, "--support-group", &cfg.support_group])
        .args(["--pam-service", &cfg.pam_service, "--listen", "127.0.0.1", "--tls-self-signed"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&again.stdout);
    assert!(again.status.success(), "{text}{}", String::from_utf8_lossy(&again.stderr));
    for line in text.lines() {
        for changed in ["created", "wrote", "signed", "fixed", "linked"] {
            assert!(!line.starts_with(changed), "second init changed something: {line}\n{text}");
        }
    }
    assert!(text.contains("relay CA for client releases (keys/relay-ca.pub): ssh-ed25519 "), "{text}");
    // How the PAM service reaches this host's sshd, said and done according to its version.
    let v = tunl_relay::sshd::installed_version(std::path::Path::new(tunl_relay::SSHD)).expect("sshd -V");
    let conf = std::fs::read_to_string(l.sshd_config()).unwrap();
    if v >= (9, 8) {
        assert!(text.contains(&format!("PAM service {} set by PAMServiceName", cfg.pam_service)), "{text}");
        assert!(conf.contains(&format!("\nPAMServiceName {}\n", cfg.pam_service)), "{conf}");
    } else {
        assert!(text.contains(&format!("PAM service {} selected by the program name", cfg.pam_service)), "{text}");
        assert!(!conf.contains("PAMServiceName"), "{conf}");
    }

    let cust = tunl_relay::accounts::user(&cfg.customer_user).unwrap();
    let support = tunl_relay::accounts::group_gid(&cfg.support_group).unwrap();
    assert_eq!(cust.shell, tunl_relay::accounts::quiet_shell());
    assert_eq!(mode_owner(&l.ca_key()), (0o600, cust.uid, cust.gid));
    assert_eq!(mode_owner(&l.host_key()), (0o600, 0, 0));
    assert_eq!(mode_owner(&l.registry_dir()), (0o2770, cust.uid, support));
    assert_eq!(mode_owner(&l.registry_db()), (0o660, cust.uid, support));
    assert_eq!(mode_owner(&l.run().join("s")), (0o2750, cust.uid, support));
    assert_eq!(mode_owner(&l.customer_home()), (0o755, 0, 0));
    // The line a client release embeds is the CA sshd trusts.
    assert_eq!(
        std::fs::read_to_string(l.release_ca_line()).unwrap(),
        std::fs::read_to_string(l.trusted_user_ca()).unwrap()
    );
    for unit in ["tunl-relay-sshd.service", "tunl-relay-api.service", "tunl-relay-expire.timer"] {
        assert!(l.systemd().join(unit).is_file(), "{unit}");
    }

    // serve ends on SIGTERM and leaves nothing behind.
    let root = l.root.display().to_string();
    assert!(!processes_mentioning(&root).is_empty());
    assert!(Path::new("/etc/pam.d").join(&cfg.pam_service).exists(), "serve installs the instance's PAM service");
    assert!(relay.stop(), "serve did not end on SIGTERM\n{}", relay.log_text());
    assert_eq!(processes_mentioning(&root), Vec::<String>::new());
    assert!(!Path::new("/etc/pam.d").join(&cfg.pam_service).exists(), "PAM service left behind");
    assert!(std::net::TcpStream::connect(("127.0.0.1", cfg.port)).is_err(), "sshd still listening");
    assert!(std::net::TcpStream::connect(("127.0.0.1", cfg.api_port)).is_err(), "API still listening");
}

#[test]
fn bad_options_change_nothing() {
    let scratch = Scratch::new("bad");
    let root = scratch.path().join("r");
    for (args, needle) in [
        (vec!["--port", "0"], "--port"),
        (vec!["--customer-user", "Bad Name"], "--customer-user"),
        (vec!["--listen", "nowhere"], "--listen"),
        (vec!["--bogus"], "bogus"),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_tunl-relay"))
            .arg("init")
            .arg("--root")
            .arg(&root)
            .args(&args)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        assert_eq!(err.lines().count(), 1, "one line: {err}");
        assert!(err.contains(needle), "{err}");
        assert!(!root.exists(), "{args:?} created files");
    }
}

#[test]
fn status_lists_sessions_and_expire_ends_the_overdue_ones() {
    let relay = relay();
    let reg = relay.registry();
    let (live, _) = relay.create_session("CASE-LIVE", false);
    let n = tunl_relay::registry::NewSession { case: "CASE-OLD".into(), expires_minutes: 0, ..Default::default() };
    let (old, _) = reg.create(&n, tunl_relay::now()).unwrap();
    let run = |sub: &str| {
        let out = Command::new(env!("CARGO_BIN_EXE_tunl-relay"))
            .arg(sub)
            .arg("--root")
            .arg(&relay.layout.root)
            .output()
            .unwrap();
        assert!(out.status.success(), "{sub}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let status = run("status");
    assert!(status.contains("sshd port") && status.contains("running (pid"), "{status}");
    assert!(status.contains(&live) && status.contains(&old.id) && status.contains("CASE-LIVE"), "{status}");
    let expired = run("expire");
    assert!(expired.starts_with("expired 1 sessions"), "{expired}");
    let s = reg.get(&old.id).unwrap().unwrap();
    assert_eq!(s.standing(tunl_relay::now()), tunl_relay::registry::Standing::Expired);
    assert_eq!(reg.get(&live).unwrap().unwrap().state, tunl_relay::registry::State::Pending);
    assert!(run("status").lines().any(|l| l.starts_with(&old.id) && l.contains("ended")));
}
