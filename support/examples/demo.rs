//! `just demo`: the whole system on one machine. The product relay (`tunl-relay init --root` on a
//! temp prefix, its own sshd and API, throwaway accounts), a second sshd standing in for the
//! customer host's own (so a granted tunnel really logs the engineer in), and a tmux of the demo's
//! own with two windows: `customer` runs `linbit-tunl --token ... ID`, `engineer` runs `tunl join
//! ID` as a throwaway support account's key. Everything is removed when the demo's tmux ends.
//! Needs root.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn shq(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

fn main() {
    if rustix::process::geteuid().as_raw() != 0 {
        eprintln!("demo: run as root (it makes throwaway accounts and runs sshd)");
        std::process::exit(1);
    }
    if let Err(e) = run() {
        eprintln!("demo: {e}");
        std::process::exit(1);
    }
}

fn run() -> Result<(), String> {
    // `just demo` builds every binary first; they sit in target/PROFILE/, one above examples/.
    let bins = std::env::current_exe()
        .map_err(|e| e.to_string())?
        .parent()
        .and_then(Path::parent)
        .map(Path::to_path_buf)
        .ok_or("cannot find the build directory")?;
    let tunl = bins.join("tunl");
    let client = bins.join("linbit-tunl");
    for b in [&tunl, &client, &bins.join("tunl-relay")] {
        if !b.is_file() {
            return Err(format!("{} is missing: cargo build --workspace --bins", b.display()));
        }
    }
    tunl_relay::harness::use_binary(bins.join("tunl-relay"));
    eprintln!("demo: starting the relay (tunl-relay init --root on a temp prefix, then serve)...");
    let mut relay = tunl_relay::harness::Relay::start().map_err(|e| format!("relay: {e}"))?;
    let user = relay.add_support_user().map_err(|e| format!("support account: {e}"))?;
    let dir = relay.layout.root.join("demo");
    std::fs::create_dir_all(dir.join("home/.ssh")).map_err(|e| e.to_string())?;
    let authkeys = dir.join("customer_authorized_keys");
    std::fs::write(&authkeys, "").map_err(|e| e.to_string())?;
    let target = relay_double::TargetSshd::start(&authkeys).map_err(|e| format!("target sshd: {e}"))?;
    let (id, token) = relay.create_session("DEMO-1", false);

    // The engineer's workstation: their key, the relay's CA for its host key, tunl's environment.
    let home = dir.join("home");
    std::fs::copy(user.key.with_extension("pub"), home.join(".ssh/id_ed25519.pub")).map_err(|e| e.to_string())?;
    let kh = home.join("relay_known_hosts");
    std::fs::write(&kh, format!("@cert-authority [127.0.0.1]:{} {}\n", relay.port(), relay.ca_pubkey()))
        .map_err(|e| e.to_string())?;
    let cfg = home.join("ssh_config");
    std::fs::write(
        &cfg,
        format!(
            "Host *\n  IdentityFile {}\n  IdentitiesOnly yes\n  UserKnownHostsFile {}\n  GlobalKnownHostsFile /dev/null\n  StrictHostKeyChecking yes\n",
            user.key.display(),
            kh.display()
        ),
    )
    .map_err(|e| e.to_string())?;
    let path = std::env::var("PATH").unwrap_or_default();
    let eng_env = [
        ("PATH", path.clone()),
        ("HOME", home.display().to_string()),
        ("TERM", "xterm-256color".into()),
        ("TUNL_RELAY", "127.0.0.1".into()),
        ("TUNL_RELAY_PORT", relay.port().to_string()),
        ("TUNL_SUPPORT_USER", user.name.clone()),
        ("TUNL_SSH_CONFIG", cfg.display().to_string()),
    ];
    let mut eng_sh = String::from("env -i");
    for (k, v) in &eng_env {
        eng_sh.push_str(&format!(" {k}={}", shq(v)));
    }
    let tunl_q = shq(&tunl.display().to_string());
    std::fs::write(dir.join("engineer.env"), {
        let mut s = String::new();
        for (k, v) in &eng_env {
            s.push_str(&format!("export {k}={}\n", shq(v)));
        }
        s.push_str(&format!("alias tunl={tunl_q}\n"));
        s
    })
    .map_err(|e| e.to_string())?;
    let engineer = format!(
        "clear; echo 'The engineer: waiting for the customer (tunl expect)...'; {eng_sh} {tunl_q} expect {id} --timeout 300 && {eng_sh} {tunl_q} join {id}; \
         echo; echo 'The join ended. Try: tunl list, tunl show {id}, tunl upgrade {id}, tunl ssh {id} -- id'; \
         echo '(this shell has the engineer environment; exit ends the demo window)'; \
         exec env -i {} bash --rcfile {}",
        eng_env.iter().map(|(k, v)| format!("{k}={}", shq(v))).collect::<Vec<_>>().join(" "),
        shq(&dir.join("engineer.env").display().to_string())
    );
    let mut cust_sh = String::from("env -i");
    for (k, v) in relay.env() {
        cust_sh.push_str(&format!(" {k}={}", shq(&v)));
    }
    cust_sh.push_str(&format!(
        " PATH={} USER=root HOME={} TERM=xterm-256color TUNL_AUTHKEYS_FILE={} TUNL_RECORDING_DIR={} {} --token {token} --case DEMO-1 --target 127.0.0.1:{} {id}; echo; echo \"linbit-tunl exited $?\"; sleep 3600",
        shq(&path),
        shq(&dir.display().to_string()),
        shq(&authkeys.display().to_string()),
        shq(&dir.display().to_string()),
        shq(&client.display().to_string()),
        target.port
    ));
    let sock = dir.join("demo.sock");
    let tmux = || {
        let mut c = Command::new("tmux");
        c.arg("-S").arg(&sock).env_remove("TMUX");
        c
    };
    let ok = tmux()
        .args(["-f", "/dev/null", "new-session", "-d", "-s", "demo", "-n", "customer", &cust_sh])
        .args([";", "new-window", "-t", "demo", "-n", "engineer", &engineer])
        .args([
            ";",
            "set-option",
            "-g",
            "prefix",
            "C-a",
            ";",
            "set-option",
            "-g",
            "status-left",
            " demo (C-a n: next window) ",
        ])
        .args([";", "set-option", "-g", "status-left-length", "40", ";", "select-window", "-t", "demo:customer"])
        .stdin(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !ok {
        return Err("cannot start the demo's tmux".into());
    }
    println!(
        "linbit-tunl demo: session {id}, token {token}\n\
         The demo's tmux has the prefix Ctrl-a (the sessions inside keep Ctrl-b):\n\
         \x20 window customer: linbit-tunl as the customer (Ctrl-b Q ends it)\n\
         \x20 window engineer: tunl join as support (Ctrl-b c chat, /upgrade, /close; Ctrl-b d detach)\n\
         Ctrl-a n switches windows; Ctrl-a d leaves the demo and removes everything.\n\
         Attaching in 3 seconds..."
    );
    let deadline = Instant::now() + Duration::from_secs(3);
    while Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = tmux().args(["attach-session", "-t", "demo"]).status();
    eprintln!("demo: cleaning up (relay, accounts, sshd, files)...");
    let _ = tmux().arg("kill-server").stderr(Stdio::null()).status();
    drop(target);
    relay.stop();
    Ok(())
}
