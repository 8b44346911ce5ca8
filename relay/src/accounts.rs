//! The relay's system accounts: the customers' account (`tunl`, which also runs the API) and the
//! support engineers' group. Looked up from
//! `/etc/passwd` and `/etc/group` (the accounts are local ones `init` made with `useradd`), created
//! with the host's own `useradd`/`groupadd`, removed with `userdel`/`groupdel` by test harnesses.

use std::fs;
use std::io;
use std::path::Path;
use std::process::{Command, Stdio};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct User {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    pub home: String,
    pub shell: String,
}

/// One `/etc/passwd` line, or `None` when it is not one.
pub fn parse_passwd_line(line: &str) -> Option<User> {
    let f: Vec<&str> = line.split(':').collect();
    if f.len() != 7 {
        return None;
    }
    Some(User {
        name: f[0].to_string(),
        uid: f[2].parse().ok()?,
        gid: f[3].parse().ok()?,
        home: f[5].to_string(),
        shell: f[6].to_string(),
    })
}

/// One `/etc/group` line: name, gid and members.
pub fn parse_group_line(line: &str) -> Option<(String, u32, Vec<String>)> {
    let f: Vec<&str> = line.split(':').collect();
    if f.len() != 4 {
        return None;
    }
    let members = f[3].split(',').filter(|m| !m.is_empty()).map(str::to_string).collect();
    Some((f[0].to_string(), f[2].parse().ok()?, members))
}

pub fn user(name: &str) -> Option<User> {
    let text = fs::read_to_string("/etc/passwd").ok()?;
    text.lines().filter_map(parse_passwd_line).find(|u| u.name == name)
}

pub fn group_gid(name: &str) -> Option<u32> {
    let text = fs::read_to_string("/etc/group").ok()?;
    text.lines().filter_map(parse_group_line).find(|g| g.0 == name).map(|g| g.1)
}

/// A name `useradd` accepts and that is safe in sshd_config and PAM files.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 32
        && name.as_bytes()[0].is_ascii_lowercase()
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
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

/// Creates the system group unless it exists; true if it was created.
pub fn ensure_group(name: &str) -> io::Result<bool> {
    if group_gid(name).is_some() {
        return Ok(false);
    }
    run(Command::new("groupadd").args(["--system", name]))?;
    Ok(true)
}

/// Creates a system account (own group, no password, no home directory made) unless it exists;
/// true if it was created. `shell` must be one that reads no start-up files for `-c`.
pub fn ensure_user(name: &str, home: &Path, shell: &str) -> io::Result<bool> {
    if user(name).is_some() {
        return Ok(false);
    }
    run(Command::new("useradd")
        .args(["--system", "--user-group", "--no-create-home", "--shell", shell, "--home-dir"])
        .arg(home)
        .arg(name))?;
    Ok(true)
}

/// Removes an account and its group (test harnesses; errors ignored by callers that clean up).
pub fn remove_user(name: &str) -> io::Result<()> {
    run(Command::new("userdel").arg(name))?;
    if group_gid(name).is_some() {
        let _ = run(Command::new("groupdel").arg(name));
    }
    Ok(())
}

pub fn remove_group(name: &str) -> io::Result<()> {
    run(Command::new("groupdel").arg(name))
}

/// Adds an existing account to a supplementary group (test harnesses make support accounts).
pub fn add_to_group(user: &str, group: &str) -> io::Result<()> {
    run(Command::new("usermod").args(["-a", "-G", group, user]))
}

/// The shell for the customers' account: sshd runs the ForceCommand as `SHELL -c CMD`, and dash
/// reads no start-up file for that (bash reads `~/.bashrc` when it guesses it was started by sshd).
pub fn quiet_shell() -> &'static str {
    if Path::new("/bin/dash").exists() { "/bin/dash" } else { "/bin/sh" }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwd_and_group_lines() {
        let u = parse_passwd_line("tunl:x:998:997::/var/lib/tunl-relay/home:/bin/dash").unwrap();
        assert_eq!((u.uid, u.gid, u.shell.as_str()), (998, 997, "/bin/dash"));
        assert_eq!(parse_passwd_line("tunl:x:abc:997::/:/bin/sh"), None);
        assert_eq!(parse_passwd_line("short:x:1"), None);
        let g = parse_group_line("tunl-support:x:996:alice,bob").unwrap();
        assert_eq!(g, ("tunl-support".into(), 996, vec!["alice".into(), "bob".into()]));
        assert_eq!(parse_group_line("empty:x:5:").unwrap().2, Vec::<String>::new());
    }

    #[test]
    fn names() {
        assert!(valid_name("tunl") && valid_name("tunl-support") && valid_name("t_1"));
        assert!(!valid_name("Tunl") && !valid_name("1tunl") && !valid_name("a b") && !valid_name(""));
        assert!(!valid_name(&"a".repeat(33)));
    }
}
