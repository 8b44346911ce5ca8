//! Who a viewer is: the broker names a peer on `support.sock` by the uid that `SO_PEERCRED`
//! reports (looked up in `/etc/passwd`), never by what the peer says.

use std::fs;

/// `(name, uid)` of each `/etc/passwd`-format line.
fn passwd_entries(text: &str) -> impl Iterator<Item = (&str, u32)> {
    text.lines().filter_map(|l| {
        let mut f = l.split(':');
        let name = f.next()?;
        let uid = f.nth(1)?.parse().ok()?;
        Some((name, uid))
    })
}

pub fn name_in(passwd: &str, uid: u32) -> Option<String> {
    passwd_entries(passwd).find(|&(_, u)| u == uid).map(|(n, _)| n.to_string())
}

/// The account name of `uid`, or `uid-N` when it has none.
pub fn user_name(uid: u32) -> String {
    fs::read_to_string("/etc/passwd").ok().and_then(|t| name_in(&t, uid)).unwrap_or_else(|| format!("uid-{uid}"))
}

pub fn gid_in(group: &str, name: &str) -> Option<u32> {
    group.lines().find_map(|l| {
        let mut f = l.split(':');
        (f.next()? == name).then_some(())?;
        f.nth(1)?.parse().ok()
    })
}

pub fn group_id(name: &str) -> Option<u32> {
    fs::read_to_string("/etc/group").ok().and_then(|t| gid_in(&t, name))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lookups() {
        let p = "root:x:0:0:root:/root:/bin/bash\nalice:x:1001:1001::/home/alice:/bin/sh\nbroken\n";
        assert_eq!(name_in(p, 1001).as_deref(), Some("alice"));
        assert_eq!(name_in(p, 7), None);
        let g = "root:x:0:\ntunl-support:x:990:alice,bob\n";
        assert_eq!(gid_in(g, "tunl-support"), Some(990));
        assert_eq!(gid_in(g, "tunl"), None);
    }
}
