//! The relay's own sshd instance: its configuration, its PAM service and the systemd units, as
//! pure renderers (tested below), and starting it in the foreground for `serve`. The host admin's
//! sshd and its files are never touched.

use std::path::Path;

use crate::layout::{Config, Layout};

/// The command sshd runs for `sub` (`produce`, `support`, `pam-ki`), naming the root when it is
/// not `/`. Paths are checked by `init` to contain no whitespace or quotes.
pub fn relay_command(cfg: &Config, layout: &Layout, sub: &str) -> String {
    if layout.root == Path::new("/") {
        format!("{} {sub}", cfg.binary.display())
    } else {
        format!("{} {sub} --root {}", cfg.binary.display(), layout.root.display())
    }
}

/// True if `p` can go into sshd_config and PAM lines unquoted.
pub fn plain_path(p: &Path) -> bool {
    p.to_str().is_some_and(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_graphic() && !b"\"'\\#".contains(&b)))
}

/// How the instance's sshd is told its PAM service. OpenSSH before 9.8 names the service after its
/// program (`__progname`), so the instance runs through a symlink named after the service;
/// 9.8 moved authentication into `sshd-session`, whose name is fixed, and added `PAMServiceName`
/// (default `sshd`), which older versions refuse as a bad option.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PamSelection {
    ProgramName,
    Option,
}

impl PamSelection {
    pub fn for_version(v: Option<(u32, u32)>) -> PamSelection {
        match v {
            Some(v) if v >= (9, 8) => PamSelection::Option,
            _ => PamSelection::ProgramName,
        }
    }
}

/// The version in `sshd -V`'s banner (`OpenSSH_9.2p1 Debian-2+deb12u10, OpenSSL ...`; pure, tested).
pub fn openssh_version(banner: &str) -> Option<(u32, u32)> {
    let rest = banner.split_whitespace().find_map(|w| w.strip_prefix("OpenSSH_"))?;
    let mut it = rest.split(|c: char| !c.is_ascii_digit());
    Some((it.next()?.parse().ok()?, it.next()?.parse().ok()?))
}

/// The installed sshd's version (`sshd -V` prints its banner on stderr and exits 0 since 9.x;
/// older ones print usage and the banner, which is parsed the same).
pub fn installed_version(sshd: &Path) -> Option<(u32, u32)> {
    let o = std::process::Command::new(sshd).arg("-V").stdin(std::process::Stdio::null()).output().ok()?;
    openssh_version(&String::from_utf8_lossy(&o.stderr))
        .or_else(|| openssh_version(&String::from_utf8_lossy(&o.stdout)))
}

pub fn render_sshd_config(cfg: &Config, layout: &Layout, pam: PamSelection) -> String {
    let pam_line = match pam {
        PamSelection::Option => format!("PAMServiceName {}\n", cfg.pam_service),
        PamSelection::ProgramName => String::new(),
    };
    format!(
        "# The tunl-relay sshd instance, written by `tunl-relay init` (rewritten on every init).\n\
         # The host's own sshd does not read this file.\n\
         Port {port}\n\
         ListenAddress {listen}\n\
         HostKey {hk}\n\
         HostCertificate {hc}\n\
         PidFile {pid}\n\
         # Nobody logs in with a password or a plain key unless a Match below says so.\n\
         AuthorizedKeysFile none\n\
         PubkeyAuthentication yes\n\
         PasswordAuthentication no\n\
         KbdInteractiveAuthentication no\n\
         PermitEmptyPasswords no\n\
         UsePAM yes\n\
         {pam_line}\
         PermitRootLogin no\n\
         AllowGroups {cust} {group}\n\
         PermitTTY no\n\
         PermitUserRC no\n\
         PermitUserEnvironment no\n\
         PermitTunnel no\n\
         X11Forwarding no\n\
         AllowAgentForwarding no\n\
         AllowStreamLocalForwarding no\n\
         AllowTcpForwarding no\n\
         GatewayPorts no\n\
         PrintMotd no\n\
         PrintLastLog no\n\
         UseDNS no\n\
         Subsystem sftp none\n\
         ClientAliveInterval 15\n\
         ClientAliveCountMax 3\n\
         LoginGraceTime 30\n\
         MaxAuthTries 6\n\
         MaxStartups 100:30:300\n\
         MaxSessions 10\n\
         LogLevel VERBOSE\n\
         \n\
         # Customers: a relay certificate (principal = the account's name, sshd's default without\n\
         # AuthorizedPrincipalsFile) or keyboard-interactive (session ID or token, checked by\n\
         # `tunl-relay pam-ki`), then only `tunl-relay produce` and remote forwards on loopback.\n\
         Match User {cust}\n\
         \tTrustedUserCAKeys {ca}\n\
         \tAuthenticationMethods publickey keyboard-interactive\n\
         \tKbdInteractiveAuthentication yes\n\
         \tExposeAuthInfo yes\n\
         \tForceCommand exec {produce}\n\
         \tAllowTcpForwarding remote\n\
         \tGatewayPorts no\n\
         \tPermitListen any\n\
         \tPermitOpen none\n\
         \tPermitTTY no\n\
         \n\
         # Support engineers: their own keys, then only `tunl-relay support` and direct-tcpip\n\
         # channels to the relay's loopback (the customers' tunnel ports).\n\
         Match Group {group}\n\
         \tAuthorizedKeysFile .ssh/authorized_keys\n\
         \tAuthenticationMethods publickey\n\
         \tForceCommand exec {support}\n\
         \tAllowTcpForwarding local\n\
         \tPermitOpen 127.0.0.1:*\n\
         \tPermitListen none\n\
         \tPermitTTY no\n",
        port = cfg.port,
        listen = cfg.listen,
        pam_line = pam_line,
        hk = layout.host_key().display(),
        hc = layout.host_cert().display(),
        pid = layout.sshd_pid().display(),
        cust = cfg.customer_user,
        group = cfg.support_group,
        ca = layout.trusted_user_ca().display(),
        // `exec`: sshd runs a ForceCommand as `SHELL -c CMD`, and dash would stay as a parent for
        // the whole session (a process, and about a MiB, per customer and per engineer command).
        produce = relay_command(cfg, layout, "produce"),
        support = relay_command(cfg, layout, "support"),
    )
}

/// The instance's PAM service: keyboard-interactive answers go to `tunl-relay pam-ki` (the secret
/// on its stdin, never on a command line); support engineers authenticate with keys, never here.
pub fn render_pam(cfg: &Config, layout: &Layout) -> String {
    format!(
        "# PAM service of the tunl-relay sshd instance only, written by `tunl-relay init`.\n\
         # Only the customers' account answers here (ignore: pam_setcred runs this stack too).\n\
         auth [success=ok ignore=ignore default=die] pam_succeed_if.so quiet user = {cust}\n\
         auth required pam_exec.so expose_authtok quiet {cmd}\n\
         auth optional pam_permit.so\n\
         account required pam_permit.so\n\
         session required pam_permit.so\n",
        cust = cfg.customer_user,
        cmd = relay_command(cfg, layout, "pam-ki"),
    )
}

pub fn render_sshd_unit(cfg: &Config, layout: &Layout) -> String {
    format!(
        "# Written by `tunl-relay init`.\n\
         [Unit]\n\
         Description=tunl-relay sshd instance (customers and support, port {port})\n\
         After=network.target\n\
         \n\
         [Service]\n\
         ExecStartPre={link} -t -f {conf}\n\
         ExecStart={link} -D -e -f {conf}\n\
         ExecReload=/bin/kill -HUP $MAINPID\n\
         KillMode=process\n\
         Restart=on-failure\n\
         RuntimeDirectory=sshd\n\
         RuntimeDirectoryPreserve=yes\n\
         \n\
         [Install]\n\
         WantedBy=multi-user.target\n",
        port = cfg.port,
        link = layout.sshd_link(&cfg.pam_service).display(),
        conf = layout.sshd_config().display(),
    )
}

pub fn render_api_unit(cfg: &Config, layout: &Layout) -> String {
    format!(
        "# Written by `tunl-relay init`.\n\
         [Unit]\n\
         Description=tunl-relay certificate signing API (port {port})\n\
         After=network.target\n\
         \n\
         [Service]\n\
         ExecStart={api}\n\
         ExecReload=/bin/kill -HUP $MAINPID\n\
         User={user}\n\
         Group={user}\n\
         AmbientCapabilities=CAP_NET_BIND_SERVICE\n\
         NoNewPrivileges=yes\n\
         ProtectSystem=strict\n\
         ReadWritePaths={registry}\n\
         ProtectHome=yes\n\
         PrivateTmp=yes\n\
         Restart=on-failure\n\
         \n\
         [Install]\n\
         WantedBy=multi-user.target\n",
        port = cfg.api_port,
        api = relay_command(cfg, layout, "api"),
        user = cfg.customer_user,
        registry = layout.registry_dir().display(),
    )
}

/// `expire` every five minutes: pending and idle sessions, old recordings and logs.
pub fn render_expire_units(cfg: &Config, layout: &Layout) -> (String, String) {
    let service = format!(
        "# Written by `tunl-relay init`.\n\
         [Unit]\n\
         Description=tunl-relay: expire sessions, apply retention\n\
         \n\
         [Service]\n\
         Type=oneshot\n\
         ExecStart={cmd}\n",
        cmd = relay_command(cfg, layout, "expire"),
    );
    let timer = "# Written by `tunl-relay init`.\n\
                 [Unit]\n\
                 Description=tunl-relay: expire sessions every five minutes\n\
                 \n\
                 [Timer]\n\
                 OnBootSec=5min\n\
                 OnUnitActiveSec=5min\n\
                 \n\
                 [Install]\n\
                 WantedBy=timers.target\n"
        .to_string();
    (service, timer)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sshd_config_confines_both_kinds_of_account() {
        let c = render_sshd_config(&Config::sample(), &Layout::new("/"), PamSelection::ProgramName);
        assert!(c.contains("Port 2222\n"));
        assert!(!c.contains("PAMServiceName"), "OpenSSH before 9.8 refuses the option");
        let (global, rest) = c.split_once("Match User tunl\n").unwrap();
        let (customer, support) = rest.split_once("Match Group tunl-support\n").unwrap();
        for no in ["X11Forwarding no", "AllowAgentForwarding no", "PermitTTY no", "AllowTcpForwarding no"] {
            assert!(global.contains(no), "{no}");
        }
        assert!(customer.contains("\tForceCommand exec /usr/local/bin/tunl-relay produce\n"));
        assert!(customer.contains("\tAllowTcpForwarding remote\n\tGatewayPorts no\n"));
        assert!(customer.contains("\tPermitOpen none\n"));
        assert!(customer.contains("\tTrustedUserCAKeys /etc/tunl-relay/trusted_user_ca.pub\n"));
        assert!(support.contains("\tForceCommand exec /usr/local/bin/tunl-relay support\n"));
        assert!(support.contains("\tPermitOpen 127.0.0.1:*\n\tPermitListen none\n"));
        assert!(!support.contains("KbdInteractive"), "support logs in with keys only");
    }

    #[test]
    fn openssh_9_8_and_later_are_told_the_pam_service_by_option() {
        assert_eq!(openssh_version("OpenSSH_9.2p1 Debian-2+deb12u10, OpenSSL 3.0.22 25 Aug 2026"), Some((9, 2)));
        assert_eq!(openssh_version("OpenSSH_9.8p1, OpenSSL 3.3.1"), Some((9, 8)));
        assert_eq!(openssh_version("OpenSSH_10.0p2 Ubuntu-5ubuntu5"), Some((10, 0)));
        assert_eq!(openssh_version("unknown option -- V\nusage: sshd"), None);
        assert_eq!(PamSelection::for_version(Some((9, 7))), PamSelection::ProgramName);
        assert_eq!(PamSelection::for_version(None), PamSelection::ProgramName);
        for v in [(9, 8), (9, 9), (10, 0)] {
            assert_eq!(PamSelection::for_version(Some(v)), PamSelection::Option);
        }
        let c = render_sshd_config(&Config::sample(), &Layout::new("/"), PamSelection::Option);
        let (global, _) = c.split_once("Match User").unwrap();
        assert!(global.contains("UsePAM yes\nPAMServiceName tunl-relay-sshd\n"), "{global}");
    }

    #[test]
    fn a_test_root_is_named_in_every_command() {
        let l = Layout::new("/tmp/r1");
        assert_eq!(relay_command(&Config::sample(), &l, "produce"), "/usr/local/bin/tunl-relay produce --root /tmp/r1");
        assert!(
            render_pam(&Config::sample(), &l)
                .contains("pam_exec.so expose_authtok quiet /usr/local/bin/tunl-relay pam-ki --root /tmp/r1\n")
        );
        assert!(
            render_sshd_unit(&Config::sample(), &l)
                .contains("ExecStart=/tmp/r1/etc/tunl-relay/sbin/tunl-relay-sshd -D -e -f")
        );
        assert!(render_api_unit(&Config::sample(), &l).contains("User=tunl\n"));
    }

    #[test]
    fn plain_paths_only() {
        assert!(plain_path(Path::new("/tmp/x-1/y")));
        assert!(
            !plain_path(Path::new("/tmp/a b")) && !plain_path(Path::new("/tmp/a\"b")) && !plain_path(Path::new(""))
        );
    }
}
