//! `tunl-relay init`: makes a host (or a `--root` prefix) ready to run the relay, idempotently,
//! printing one line per thing it created, changed or kept. Keys are made once and kept; files we
//! own are rewritten only when their content changes (atomically); accounts are made when missing.

use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{PermissionsExt, chown};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::accounts;
use crate::layout::{Config, Layout};
use crate::registry::Sqlite;
use crate::sshd;

#[derive(Clone, Debug)]
pub struct InitOpts {
    pub root: PathBuf,
    pub port: u16,
    pub api_port: u16,
    pub customer_user: String,
    pub support_group: String,
    pub pam_service: String,
    pub listen: String,
    /// Names the relay's host certificate is valid for (what customers type as `TUNL_RELAY`).
    pub host_names: Vec<String>,
    /// Make a throwaway TLS CA and server certificate when none is there (tests, the demo).
    pub tls_self_signed: bool,
    pub idle_minutes: u64,
    pub retain_days: u64,
}

impl Default for InitOpts {
    fn default() -> InitOpts {
        InitOpts {
            root: PathBuf::from("/"),
            port: 22,
            api_port: 443,
            customer_user: "tunl".into(),
            support_group: "tunl-support".into(),
            pam_service: "tunl-relay-sshd".into(),
            listen: "0.0.0.0".into(),
            host_names: Vec::new(),
            tls_self_signed: false,
            idle_minutes: 120,
            retain_days: 90,
        }
    }
}

fn say(what: &str, path: &Path) {
    println!("{what:<8} {}", path.display());
}

/// Writes `content` atomically (temp file, fsync, rename) unless the file already holds it; sets
/// owner and mode either way. Returns what it did.
pub fn write_file(path: &Path, content: &[u8], mode: u32, owner: (u32, u32)) -> io::Result<&'static str> {
    let same = fs::read(path).is_ok_and(|old| old == content);
    if !same {
        let dir = path.parent().ok_or_else(|| io::Error::other("no parent directory"))?;
        let tmp =
            dir.join(format!(".{}.tmp{}", path.file_name().unwrap_or_default().to_string_lossy(), std::process::id()));
        let _ = fs::remove_file(&tmp);
        let mut f = fs::OpenOptions::new().write(true).create_new(true).open(&tmp)?;
        f.set_permissions(fs::Permissions::from_mode(mode))?;
        f.write_all(content)?;
        f.sync_all()?;
        drop(f);
        chown(&tmp, Some(owner.0), Some(owner.1))?;
        fs::rename(&tmp, path)?;
    }
    let changed = fix_owner_mode(path, mode, owner)?;
    Ok(if !same {
        "wrote"
    } else if changed {
        "fixed"
    } else {
        "kept"
    })
}

fn fix_owner_mode(path: &Path, mode: u32, owner: (u32, u32)) -> io::Result<bool> {
    use std::os::unix::fs::MetadataExt;
    let md = fs::symlink_metadata(path)?;
    let mut changed = false;
    if md.mode() & 0o7777 != mode {
        fs::set_permissions(path, fs::Permissions::from_mode(mode))?;
        changed = true;
    }
    if (md.uid(), md.gid()) != owner {
        chown(path, Some(owner.0), Some(owner.1))?;
        changed = true;
    }
    Ok(changed)
}

fn ensure_dir(path: &Path, mode: u32, owner: (u32, u32)) -> io::Result<()> {
    let what = if path.is_dir() {
        "kept"
    } else {
        fs::create_dir_all(path)?;
        "created"
    };
    let changed = fix_owner_mode(path, mode, owner)?;
    say(if what == "kept" && changed { "fixed" } else { what }, path);
    Ok(())
}

fn run(cmd: &mut Command) -> io::Result<()> {
    let out = cmd.stdin(Stdio::null()).output()?;
    if out.status.success() {
        Ok(())
    } else {
        Err(io::Error::other(format!(
            "{:?} failed: {}",
            cmd.get_program(),
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

fn keygen(path: &Path, comment: &str) -> io::Result<bool> {
    if path.exists() {
        return Ok(false);
    }
    run(Command::new("ssh-keygen").args(["-q", "-t", "ed25519", "-N", "", "-C", comment, "-f"]).arg(path))?;
    Ok(true)
}

fn hostname() -> String {
    fs::read_to_string("/proc/sys/kernel/hostname").map(|s| s.trim().to_string()).unwrap_or_default()
}

fn check(opts: &InitOpts) -> Result<(), String> {
    for (what, name) in [("--customer-user", &opts.customer_user), ("--support-group", &opts.support_group)] {
        if !accounts::valid_name(name) {
            return Err(format!("{what} {name:?}: use lowercase letters, digits, - and _ (at most 32)"));
        }
    }
    if !accounts::valid_name(&opts.pam_service) {
        return Err(format!("--pam-service {:?}: use lowercase letters, digits, - and _", opts.pam_service));
    }
    if opts.customer_user == opts.support_group {
        return Err("the customer account and the support group must differ".into());
    }
    if !opts.root.is_absolute() || !sshd::plain_path(&opts.root) {
        return Err(format!("--root {}: must be an absolute path without spaces or quotes", opts.root.display()));
    }
    if opts.port == 0 || opts.api_port == 0 || opts.port == opts.api_port {
        return Err("--port and --api-port must be two different non-zero ports".into());
    }
    if opts.listen.parse::<std::net::IpAddr>().is_err() {
        return Err(format!("--listen {}: not an IP address", opts.listen));
    }
    for h in &opts.host_names {
        if h.is_empty() || !h.bytes().all(|b| b.is_ascii_alphanumeric() || b".-:".contains(&b)) {
            return Err(format!("--host-name {h:?}: not a host name or address"));
        }
    }
    Ok(())
}

/// Runs `init`. Errors name what failed; a bad option changes nothing.
pub fn init(opts: &InitOpts) -> Result<(), String> {
    check(opts)?;
    if !Path::new(crate::SSHD).exists() {
        return Err(format!("{} is missing: install OpenSSH's server (apt-get install openssh-server)", crate::SSHD));
    }
    let binary = std::env::current_exe().and_then(fs::canonicalize).map_err(|e| format!("own binary: {e}"))?;
    if !sshd::plain_path(&binary) {
        return Err(format!("{}: the binary's path must have no spaces or quotes", binary.display()));
    }
    init_with(opts, binary).map_err(|e| e.to_string())
}

fn init_with(opts: &InitOpts, binary: PathBuf) -> io::Result<()> {
    let l = Layout::new(&opts.root);
    let root_ids = (0, 0);
    let cfg = Config {
        port: opts.port,
        api_port: opts.api_port,
        customer_user: opts.customer_user.clone(),
        support_group: opts.support_group.clone(),
        pam_service: opts.pam_service.clone(),
        binary,
        listen: opts.listen.clone(),
        idle_minutes: opts.idle_minutes,
        retain_days: opts.retain_days,
    };

    // Accounts first: directories below are owned by them.
    ensure_dir(&l.state(), 0o755, root_ids)?;
    ensure_dir(&l.customer_home(), 0o755, root_ids)?;
    if accounts::ensure_group(&cfg.support_group)? {
        println!("created  group {}", cfg.support_group);
    } else {
        println!("kept     group {}", cfg.support_group);
    }
    let made = accounts::ensure_user(&cfg.customer_user, &l.customer_home(), accounts::quiet_shell())?;
    println!(
        "{:<8} account {} (shell {})",
        if made { "created" } else { "kept" },
        cfg.customer_user,
        accounts::quiet_shell()
    );
    let cust = accounts::user(&cfg.customer_user).ok_or_else(|| io::Error::other("customer account vanished"))?;
    // The API runs as the customers' account: it needs the registry and the CA, nothing else.
    let api = cust.clone();
    let support_gid =
        accounts::group_gid(&cfg.support_group).ok_or_else(|| io::Error::other("support group vanished"))?;

    // Directories with the owners and modes the processes need.
    ensure_dir(&l.etc(), 0o755, root_ids)?;
    ensure_dir(&l.etc().join("sbin"), 0o755, root_ids)?;
    ensure_dir(&l.etc().join("tls"), 0o750, (0, api.gid))?;
    ensure_dir(&l.state().join("ca"), 0o700, (api.uid, api.gid))?;
    // setgid: SQLite's -wal/-shm files get the support group whoever creates them.
    ensure_dir(&l.registry_dir(), 0o2770, (cust.uid, support_gid))?;
    ensure_dir(&l.recordings(), 0o2750, (cust.uid, support_gid))?;
    ensure_dir(&l.audit(), 0o2750, (cust.uid, support_gid))?;
    ensure_dir(&l.run(), 0o755, root_ids)?;
    ensure_dir(&l.run().join("s"), 0o2750, (cust.uid, support_gid))?;
    ensure_dir(&l.root.join("etc/pam.d"), 0o755, root_ids)?;
    ensure_dir(&l.systemd(), 0o755, root_ids)?;

    // The SSH CA (its private half readable by the API's account only) and the host certificate.
    let made = keygen(&l.ca_key(), "tunl-relay CA")?;
    fix_owner_mode(&l.ca_key(), 0o600, (api.uid, api.gid))?;
    fix_owner_mode(&l.ca_pub(), 0o644, root_ids)?;
    say(if made { "created" } else { "kept" }, &l.ca_key());
    let ca_line = fs::read_to_string(l.ca_pub())?;
    let ca_line = ca_line.trim();
    say(write_file(&l.trusted_user_ca(), format!("{ca_line}\n").as_bytes(), 0o644, root_ids)?, &l.trusted_user_ca());
    say(write_file(&l.release_ca_line(), format!("{ca_line}\n").as_bytes(), 0o644, root_ids)?, &l.release_ca_line());

    let new_host_key = keygen(&l.host_key(), "tunl-relay host")?;
    fix_owner_mode(&l.host_key(), 0o600, root_ids)?;
    say(if new_host_key { "created" } else { "kept" }, &l.host_key());
    let mut names = vec![hostname(), "localhost".to_string(), "127.0.0.1".to_string(), "::1".to_string()];
    names.extend(opts.host_names.iter().cloned());
    names.retain(|n| !n.is_empty());
    names.dedup();
    let names = names.join(",");
    // Re-signed when new, when its names change, or when it is older than half its validity.
    let names_file = l.etc().join("host-cert-names");
    let stale = !l.host_cert().exists()
        || new_host_key
        || made
        || fs::read_to_string(&names_file).map(|n| n.trim() != names).unwrap_or(true)
        || fs::metadata(l.host_cert())
            .and_then(|m| m.modified())
            .map(|t| t.elapsed().unwrap_or_default().as_secs() > 180 * 86400)
            .unwrap_or(true);
    if stale {
        run(Command::new("ssh-keygen")
            .arg("-q")
            .arg("-s")
            .arg(l.ca_key())
            .args(["-h", "-I", "tunl-relay-host", "-n", &names, "-V", "-5m:+365d"])
            .arg(l.host_key().with_extension("pub")))?;
        // ssh-keygen names the certificate after the public key: ..._key.pub -> ..._key-cert.pub
        fix_owner_mode(&l.host_cert(), 0o644, root_ids)?;
        write_file(&names_file, format!("{names}\n").as_bytes(), 0o644, root_ids)?;
        println!("signed   {} for {names}", l.host_cert().display());
    } else {
        say("kept", &l.host_cert());
    }

    // The registry, created now so its owner and mode are ours, not those of whoever comes first.
    drop(Sqlite::open(&l.registry_db()).map_err(|e| io::Error::other(e.to_string()))?);
    for f in ["registry.db", "registry.db-wal", "registry.db-shm"] {
        let p = l.registry_dir().join(f);
        if p.exists() {
            fix_owner_mode(&p, 0o660, (cust.uid, support_gid))?;
        }
    }
    say("ready", &l.registry_db());

    // TLS for the API.
    if !l.tls_cert().exists() || !l.tls_key().exists() {
        if opts.tls_self_signed {
            self_signed_tls(&l, &opts.host_names)?;
            println!(
                "created  {} (throwaway CA {}: for tests and demos only)",
                l.tls_cert().display(),
                l.etc().join("tls/ca.pem").display()
            );
        } else {
            println!(
                "missing  {} and {}: put the API's certificate chain and key there (PEM), then start the API",
                l.tls_cert().display(),
                l.tls_key().display()
            );
        }
    }
    if l.tls_key().exists() {
        fix_owner_mode(&l.tls_key(), 0o640, (0, api.gid))?;
    }

    // Configuration, sshd_config, PAM service, the sshd symlink, systemd units.
    say(write_file(&l.config_file(), cfg.render().as_bytes(), 0o644, root_ids)?, &l.config_file());
    // The PAM service reaches sshd by its program name before OpenSSH 9.8, by an option after.
    let version = sshd::installed_version(Path::new(crate::SSHD));
    let pam_by = sshd::PamSelection::for_version(version);
    let shown = version.map_or_else(|| "of unknown version".to_string(), |(a, b)| format!("{a}.{b}"));
    match pam_by {
        sshd::PamSelection::Option => println!(
            "sshd     OpenSSH {shown}: PAM service {} set by PAMServiceName (sshd-session authenticates)",
            cfg.pam_service
        ),
        sshd::PamSelection::ProgramName => println!(
            "sshd     OpenSSH {shown}: PAM service {} selected by the program name (the symlink below)",
            cfg.pam_service
        ),
    }
    let conf = sshd::render_sshd_config(&cfg, &l, pam_by);
    say(write_file(&l.sshd_config(), conf.as_bytes(), 0o644, root_ids)?, &l.sshd_config());
    let pam = l.pam_file(&cfg.pam_service);
    say(write_file(&pam, sshd::render_pam(&cfg, &l).as_bytes(), 0o644, root_ids)?, &pam);
    let link = l.sshd_link(&cfg.pam_service);
    if fs::read_link(&link).ok().as_deref() != Some(Path::new(crate::SSHD)) {
        let _ = fs::remove_file(&link);
        std::os::unix::fs::symlink(crate::SSHD, &link)?;
        say("linked", &link);
    } else {
        say("kept", &link);
    }
    let units = l.systemd();
    let (expire_service, expire_timer) = sshd::render_expire_units(&cfg, &l);
    for (name, text) in [
        ("tunl-relay-sshd.service", sshd::render_sshd_unit(&cfg, &l)),
        ("tunl-relay-api.service", sshd::render_api_unit(&cfg, &l)),
        ("tunl-relay-expire.service", expire_service),
        ("tunl-relay-expire.timer", expire_timer),
    ] {
        let p = units.join(name);
        say(write_file(&p, text.as_bytes(), 0o644, root_ids)?, &p);
    }

    // sshd's own check of what we wrote.
    fs::create_dir_all("/run/sshd")?; // privilege separation directory, missing in fresh containers
    run(Command::new(&link).arg("-t").arg("-f").arg(l.sshd_config()))?;
    println!("checked  {} (sshd -t)", l.sshd_config().display());
    println!("relay CA for client releases (keys/relay-ca.pub): {ca_line}");
    if l.root == Path::new("/") {
        println!(
            "next: systemctl daemon-reload && systemctl enable --now tunl-relay-sshd tunl-relay-api tunl-relay-expire.timer"
        );
    } else {
        println!("next: tunl-relay serve --root {}", l.root.display());
    }
    Ok(())
}

fn self_signed_tls(l: &Layout, extra: &[String]) -> io::Result<()> {
    let d = l.etc().join("tls");
    let ca_key = d.join("ca.key");
    let ca = d.join("ca.pem");
    let csr = d.join("server.csr");
    let ext = d.join("server.ext");
    let ec = ["genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out"];
    run(Command::new("openssl").args(ec).arg(&ca_key))?;
    run(Command::new("openssl")
        .args(["req", "-x509", "-new", "-sha256", "-days", "30", "-subj", "/CN=tunl-relay throwaway CA", "-key"])
        .arg(&ca_key)
        .args(["-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign"])
        .arg("-out")
        .arg(&ca))?;
    run(Command::new("openssl").args(ec).arg(l.tls_key()))?;
    run(Command::new("openssl")
        .args(["req", "-new", "-subj", "/CN=tunl-relay", "-key"])
        .arg(l.tls_key())
        .arg("-out")
        .arg(&csr))?;
    let mut san = vec!["IP:127.0.0.1".to_string(), "DNS:localhost".to_string()];
    for h in extra {
        san.push(if h.parse::<std::net::IpAddr>().is_ok() { format!("IP:{h}") } else { format!("DNS:{h}") });
    }
    fs::write(
        &ext,
        format!(
            "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\n\
             extendedKeyUsage=serverAuth\nsubjectAltName={}\n",
            san.join(",")
        ),
    )?;
    run(Command::new("openssl")
        .args(["x509", "-req", "-sha256", "-days", "30", "-set_serial", "1", "-in"])
        .arg(&csr)
        .arg("-CA")
        .arg(&ca)
        .arg("-CAkey")
        .arg(&ca_key)
        .arg("-extfile")
        .arg(&ext)
        .arg("-out")
        .arg(l.tls_cert()))?;
    // The throwaway CA signs nothing else.
    let _ = fs::remove_file(&ca_key);
    let _ = fs::remove_file(&csr);
    let _ = fs::remove_file(&ext);
    fix_owner_mode(&ca, 0o644, (0, 0))?;
    fix_owner_mode(&l.tls_cert(), 0o644, (0, 0))?;
    Ok(())
}
