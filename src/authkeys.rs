//! authorized_keys editing (safety critical): key validation, our bracketed block, atomic rewrite.
//!
//! Decisions (to be recorded in docs/architecture.md):
//! - Keys from the relay must be plain `TYPE BASE64 [COMMENT]` lines of a known algorithm (ed25519,
//!   ecdsa-sha2-nistp256/384/521, rsa >= 2048 bits, sk-ed25519, sk-ecdsa); no options, no certificates,
//!   comment printable ASCII; 1..=16 keys. They are re-serialised (normalised) before installing.
//! - Block: `# linbit-tunl-begin ID\n<keys>\n# linbit-tunl-end ID\n`. If the file does not end in a
//!   newline, we add `\n` before the block and write the end line *without* its newline, so the file
//!   keeps "no final newline"; removal of a block that ends at EOF without newline also removes the
//!   `\n` before it. Grant + revoke is therefore byte-identical.
//! - Only complete blocks (begin ID ... first following end ID) are removed; a lone begin is kept.
//!   Marker lines may end in `\r` (a CRLF editor touched the file).
//! - `edit` never follows a symlink at the file, writes nothing when the content is unchanged, and
//!   creates a missing file (and `~/.ssh`, 0700) owned like the directory that will contain it.

use std::io::Write;
use std::os::fd::AsFd;
use std::path::Path;

use rustix::fs::{self as rfs, Mode as FMode, OFlags};

pub const MAX_KEYS: usize = 16;
const MAX_COMMENT: usize = 256;
const BEGIN: &str = "# linbit-tunl-begin ";
const END: &str = "# linbit-tunl-end ";

const KEY_TYPES: &[&str] = &[
    "ssh-ed25519",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
    "ssh-rsa",
    "sk-ssh-ed25519@openssh.com",
    "sk-ecdsa-sha2-nistp256@openssh.com",
];

fn check_key(line: &str) -> Result<String, String> {
    let mut parts = line.splitn(3, ' ');
    let ty = parts.next().unwrap_or("");
    let blob = parts.next().ok_or("missing key data")?;
    let comment = parts.next().unwrap_or("").trim();
    if !KEY_TYPES.contains(&ty) {
        return Err("not a plain public key of a known type".into());
    }
    if comment.len() > MAX_COMMENT || !comment.bytes().all(|b| (0x20..0x7f).contains(&b)) {
        return Err("bad comment".into());
    }
    if ty.contains("ecdsa") {
        // ssh-key is built without its `ecdsa` feature (no extra dependencies): check the wire structure.
        return check_ecdsa(ty, blob, comment);
    }
    let key = ssh_key::PublicKey::from_openssh(&format!("{ty} {blob}")).map_err(|e| format!("unparsable key: {e}"))?;
    if key.algorithm().as_str() != ty {
        return Err("key type mismatch".into());
    }
    match key.key_data() {
        ssh_key::public::KeyData::Rsa(rsa) => {
            let n = rsa.n.as_positive_bytes().ok_or("bad RSA modulus")?;
            let lead = n.iter().position(|&b| b != 0).unwrap_or(n.len());
            let bits = (n.len() - lead) * 8 - n.get(lead).map_or(0, |b| b.leading_zeros() as usize);
            if bits < 2048 {
                return Err(format!("RSA key too short ({bits} bits)"));
            }
        }
        ssh_key::public::KeyData::Ed25519(_) | ssh_key::public::KeyData::SkEd25519(_) => {}
        _ => return Err("unsupported key algorithm".into()),
    }
    let mut out = key.to_openssh().map_err(|e| format!("cannot encode key: {e}"))?;
    if !comment.is_empty() {
        out.push(' ');
        out.push_str(comment);
    }
    Ok(out)
}

/// One SSH wire `string` from the front of `rest`.
fn take<'a>(rest: &mut &'a [u8]) -> Result<&'a [u8], String> {
    let len = rest.get(..4).ok_or("truncated key")?;
    let len = u32::from_be_bytes(len.try_into().expect("4 bytes")) as usize;
    let v = rest.get(4..4usize.saturating_add(len)).ok_or("truncated key")?;
    *rest = &rest[4 + len..];
    Ok(v)
}

/// Structural check of an ECDSA / sk-ECDSA key blob: `string type, string curve, string Q
/// [, string application]`, Q an uncompressed point of the curve's size, nothing left over.
fn check_ecdsa(ty: &str, blob: &str, comment: &str) -> Result<String, String> {
    use base64::Engine;
    let data = base64::engine::general_purpose::STANDARD.decode(blob).map_err(|_| "bad base64")?;
    let mut rest = &data[..];
    if take(&mut rest)? != ty.as_bytes() {
        return Err("key type mismatch".into());
    }
    let curve = take(&mut rest)?;
    let (name, point_len) = match ty {
        "ecdsa-sha2-nistp256" | "sk-ecdsa-sha2-nistp256@openssh.com" => ("nistp256", 65),
        "ecdsa-sha2-nistp384" => ("nistp384", 97),
        "ecdsa-sha2-nistp521" => ("nistp521", 133),
        _ => return Err("unsupported key algorithm".into()),
    };
    if curve != name.as_bytes() {
        return Err("curve mismatch".into());
    }
    let q = take(&mut rest)?;
    if q.len() != point_len || q[0] != 4 {
        return Err("bad ECDSA point".into());
    }
    if ty.starts_with("sk-") {
        let app = take(&mut rest)?;
        if app.is_empty() || !app.iter().all(|b| b.is_ascii_graphic()) {
            return Err("bad security key application".into());
        }
    }
    if !rest.is_empty() {
        return Err("trailing data in key".into());
    }
    let enc = base64::engine::general_purpose::STANDARD.encode(&data);
    Ok(if comment.is_empty() { format!("{ty} {enc}") } else { format!("{ty} {enc} {comment}") })
}

/// Validate the key lines of an UPGRADE payload; returns the normalised lines.
pub fn validate_keys(text: &[u8]) -> Result<Vec<String>, String> {
    let text = std::str::from_utf8(text).map_err(|_| "keys are not UTF-8".to_string())?;
    let mut out = Vec::new();
    for (i, line) in text.split('\n').enumerate() {
        let line = line.strip_suffix('\r').unwrap_or(line);
        if line.trim().is_empty() {
            continue;
        }
        if out.len() == MAX_KEYS {
            return Err(format!("more than {MAX_KEYS} keys"));
        }
        out.push(check_key(line).map_err(|e| format!("key line {}: {e}", i + 1))?);
    }
    if out.is_empty() {
        return Err("no keys".into());
    }
    Ok(out)
}

fn valid_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 128 && id.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

/// Split into lines, each including its `\n` (the last may lack it).
fn lines(content: &[u8]) -> Vec<&[u8]> {
    content.split_inclusive(|&b| b == b'\n').collect()
}

fn marker<'a>(line: &'a [u8], prefix: &str) -> Option<&'a str> {
    let l = line.strip_suffix(b"\n").unwrap_or(line);
    let l = l.strip_suffix(b"\r").unwrap_or(l);
    let id = std::str::from_utf8(l.strip_prefix(prefix.as_bytes())?).ok()?;
    valid_id(id).then_some(id)
}

/// Remove our complete blocks: those of `session_id`, or every one of ours when `None` (stale sweep).
/// Every other byte is kept exactly.
pub fn remove_blocks(content: &[u8], session_id: Option<&str>) -> Vec<u8> {
    let ls = lines(content);
    let mut out: Vec<u8> = Vec::with_capacity(content.len());
    let mut i = 0;
    while i < ls.len() {
        let begin = marker(ls[i], BEGIN).filter(|id| session_id.is_none_or(|s| s == *id));
        if let Some(id) = begin {
            if let Some(j) = (i + 1..ls.len()).find(|&j| marker(ls[j], END) == Some(id)) {
                if !ls[j].ends_with(b"\n") && i > 0 && out.ends_with(b"\n") {
                    // The block ended the file without a newline: the `\n` before it was ours.
                    out.pop();
                }
                i = j + 1;
                continue;
            }
        }
        out.extend_from_slice(ls[i]);
        i += 1;
    }
    out
}

/// Append our block with `keys` (lines from `validate_keys`).
pub fn add_block(content: &[u8], session_id: &str, keys: &[String]) -> Result<Vec<u8>, String> {
    if !valid_id(session_id) {
        return Err("invalid session id".into());
    }
    if keys.is_empty() || keys.iter().any(|k| k.is_empty() || k.bytes().any(|b| b < 0x20 || b == 0x7f)) {
        return Err("invalid key lines".into());
    }
    let mut out = content.to_vec();
    let no_final_newline = !content.is_empty() && !content.ends_with(b"\n");
    if no_final_newline {
        out.push(b'\n');
    }
    out.extend_from_slice(format!("{BEGIN}{session_id}\n").as_bytes());
    for k in keys {
        out.extend_from_slice(k.as_bytes());
        out.push(b'\n');
    }
    out.extend_from_slice(format!("{END}{session_id}").as_bytes());
    if !no_final_newline {
        out.push(b'\n');
    }
    Ok(out)
}

fn random_suffix() -> String {
    let mut b = [0u8; 8];
    rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut b);
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Owner of the nearest existing ancestor directory of `path`.
fn ancestor_owner(path: &Path) -> Result<(u32, u32), String> {
    let mut p = path.parent();
    while let Some(d) = p {
        let d = if d.as_os_str().is_empty() { Path::new(".") } else { d };
        if let Ok(st) = rfs::stat(d) {
            return Ok((st.st_uid, st.st_gid));
        }
        p = d.parent();
    }
    Err("no existing parent directory".into())
}

fn chown_fd(fd: impl AsFd, uid: u32, gid: u32) -> Result<(), String> {
    let st = rfs::fstat(&fd).map_err(|e| format!("fstat: {e}"))?;
    if st.st_uid == uid && st.st_gid == gid {
        return Ok(());
    }
    rfs::fchown(&fd, Some(rustix::fs::Uid::from_raw(uid)), Some(rustix::fs::Gid::from_raw(gid)))
        .map_err(|e| format!("fchown: {e}"))
}

/// Atomically rewrite the authorized_keys file at `path` with `f(old content)`.
/// Returns whether the file changed.
pub fn edit(path: &Path, f: impl FnOnce(&[u8]) -> Vec<u8>) -> Result<bool, String> {
    let show = path.display();
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => ".".into(),
    };
    let name = path.file_name().ok_or_else(|| format!("{show}: not a file name"))?.to_string_lossy().into_owned();
    // (content, uid, gid, mode) of the existing file, opened without following a symlink.
    let existing = match rfs::open(path, OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC, FMode::empty()) {
        Ok(fd) => {
            let st = rfs::fstat(&fd).map_err(|e| format!("{show}: {e}"))?;
            if st.st_mode & 0o170000 != 0o100000 {
                return Err(format!("{show}: not a regular file"));
            }
            let mut data = Vec::new();
            std::io::Read::read_to_end(&mut std::fs::File::from(fd), &mut data).map_err(|e| format!("{show}: {e}"))?;
            Some((data, st.st_uid, st.st_gid, st.st_mode & 0o7777))
        }
        Err(rustix::io::Errno::LOOP) => return Err(format!("{show}: is a symbolic link, refusing to edit")),
        Err(rustix::io::Errno::NOENT) => None,
        Err(e) => return Err(format!("{show}: {e}")),
    };
    if let Ok(st) = rfs::lstat(path)
        && st.st_mode & 0o170000 == 0o120000
    {
        return Err(format!("{show}: is a symbolic link, refusing to edit"));
    }
    let old: &[u8] = existing.as_ref().map_or(&[], |e| &e.0);
    let new = f(old);
    if new == old {
        return Ok(false);
    }
    let (uid, gid, mode) = match &existing {
        Some((_, u, g, m)) => (*u, *g, *m),
        None => {
            let (u, g) = ancestor_owner(path)?;
            if rfs::stat(&dir).is_err() {
                rfs::mkdir(&dir, FMode::from_raw_mode(0o700)).map_err(|e| format!("{}: {e}", dir.display()))?;
                let d = rfs::open(
                    &dir,
                    OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                    FMode::empty(),
                )
                .map_err(|e| format!("{}: {e}", dir.display()))?;
                chown_fd(&d, u, g)?;
                rfs::fchmod(&d, FMode::from_raw_mode(0o700)).map_err(|e| format!("{}: {e}", dir.display()))?;
            }
            (u, g, 0o600)
        }
    };
    let tmp = dir.join(format!(".{name}.linbit-tunl.{}", random_suffix()));
    let fd = rfs::open(
        &tmp,
        OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        FMode::from_raw_mode(0o600),
    )
    .map_err(|e| format!("{}: {e}", tmp.display()))?;
    let result = (|| {
        let mut file = std::fs::File::from(fd);
        file.write_all(&new).map_err(|e| format!("{}: {e}", tmp.display()))?;
        chown_fd(&file, uid, gid)?;
        rfs::fchmod(&file, FMode::from_raw_mode(mode)).map_err(|e| format!("fchmod: {e}"))?;
        file.sync_all().map_err(|e| format!("fsync: {e}"))?;
        rfs::rename(&tmp, path).map_err(|e| format!("rename to {show}: {e}"))
    })();
    if let Err(e) = result {
        let _ = rfs::unlink(&tmp);
        return Err(e);
    }
    if let Ok(d) = rfs::open(&dir, OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC, FMode::empty()) {
        let _ = rfs::fsync(&d);
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    const ED: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl";

    fn keys() -> Vec<String> {
        validate_keys(format!("{ED} eng@linbit.com").as_bytes()).unwrap()
    }

    #[test]
    fn validate_accepts_plain_keys() {
        assert_eq!(keys(), vec![format!("{ED} eng@linbit.com")]);
        let two = format!("{ED}\r\n\n{ED} second key\n");
        assert_eq!(validate_keys(two.as_bytes()).unwrap().len(), 2);
    }

    #[test]
    fn validate_refuses_hostile() {
        let bad = [
            String::new(),
            "\n \n".into(),
            format!("command=\"sh\" {ED}"),
            format!("no-pty {ED}"),
            format!("{ED} comment\x1b[2J"),
            format!("{ED} {}", "c".repeat(300)),
            "ssh-ed25519 AAAA".into(),
            "ssh-ed25519".into(),
            format!("ssh-rsa {}", &ED[12..]), // type mismatch with the blob
            "ssh-ed25519-cert-v01@openssh.com AAAAIHNzaC1lZDI1NTE5LWNlcnQtdjAxQG9wZW5zc2guY29tAAAA".into(),
            "ssh-dss AAAAB3NzaC1kc3MAAACBAP".into(),
            format!("# {ED}"),
            format!("{}\n", vec![ED; 17].join("\n")),
            format!(" {ED}"),
        ];
        for b in &bad {
            assert!(validate_keys(b.as_bytes()).is_err(), "accepted {b:?}");
        }
        assert!(validate_keys(b"\xff\xfe").is_err());
        assert_eq!(validate_keys(vec![ED; 16].join("\n").as_bytes()).unwrap().len(), 16);
    }

    #[test]
    fn validate_real_key_types() {
        let good = [
            "ecdsa-sha2-nistp256 AAAAE2VjZHNhLXNoYTItbmlzdHAyNTYAAAAIbmlzdHAyNTYAAABBBNVPIbl4iZdnE9qi8oygIaxAxzIohZJJi3R4Vby3Mk2HstZ0+zONiCa9GYTCgRQpfV8MJwXMN1pUGdzkpHEqDlM= c ecdsa256",
            "ecdsa-sha2-nistp384 AAAAE2VjZHNhLXNoYTItbmlzdHAzODQAAAAIbmlzdHAzODQAAABhBJtJh6qPQhnicnKOhauySNWcYykGI1sPPWNbKu4JJrVndTWXP+a7Bm2EzVDSmKX9/H5FHiDiPJjRvn8VAv6zDl54e781plT5uQkN7mTCJSCvpQPHRDGSfvD99352fK6vKw== c ecdsa384",
            "ecdsa-sha2-nistp521 AAAAE2VjZHNhLXNoYTItbmlzdHA1MjEAAAAIbmlzdHA1MjEAAACFBAGhqgriCB0X7KQTExB3WhlTnbR0ckXDm2FNSzAr6lLOHDP2XT1Wi4dwHtuofQWqzfpL76wn4Vj1os4olnkgAZ2ZgQAjWKExoteX15043kwd2uGu6WjdVhaKGgPy4+hMFjZrniwUOHYNkKIzNajfu12R4PDOg9ODK+pXnt2nnoOGWFkMAQ== c ecdsa521",
            "ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAABAQC2/A5oQUHQRUiAtPH/kmkhW27GMTpTGmGLVH32wmIB8G6CRIw3+zrFkBAC0qf1FCIUWOVhkZerwZdEN3SBGax9tgPN9i4axFB01lTf6DmVo6a3hIAtGTSDn1sG0eo5bNuKM97nlnFbNieFlUa0832TFKQkv7oREHmIQghROeWBkUr21UIAp1zD7DLfFg9srVA8xeW8AzGSnzGX3ZgsFdWWj5pIR8OhNPxWreeTWNt0RwvvXo0pxkDOI0B2x2zJV7Y3hDhOfofXefkF9IlMTQ00i7HF0a+hQMj4TTd+y/HD2lbOZ85nbr4tUin3Hpy++zvqnH9aNh6upB8HpCYB/C2x c rsa2048",
        ];
        for g in good {
            assert_eq!(validate_keys(g.as_bytes()), Ok(vec![g.to_string()]), "{g}");
        }
        let short_rsa = "ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAAAgQD+WnshPSVKECQ1XvdCkkaqSIulytRdihp0SZmJ4BnwKlBIDYbG5oXTWELc4bDu6166x0eoFTR2ArGDjN7ZqQbXEbCPne+2GfzXHYK3Smz0Rfv0+T+vE8Ez1HqUP1+J9Mjn9SN/SaLbMJDbhq3mSsNi3hYpzYwePOIXxduTLxouhw== c rsa1024";
        assert!(validate_keys(short_rsa.as_bytes()).unwrap_err().contains("too short"));
        // An ECDSA blob under another curve's name is refused.
        let swapped = good[0].replacen("nistp256", "nistp384", 1);
        assert!(validate_keys(swapped.as_bytes()).is_err());
    }

    #[test]
    fn block_roundtrip_byte_identical() {
        let samples: &[&[u8]] = &[
            b"",
            b"\n",
            b"ssh-rsa AAAA user@x\n",
            b"ssh-rsa AAAA user@x",
            b"# comment\r\nfrom=\"10.0.0.1\",no-pty ssh-ed25519 AAAA x\r\n",
            b"# comment\r\nno-pty ssh-ed25519 AAAA x",
            b"a\n\n\nb\n\n",
        ];
        for s in samples {
            let added = add_block(s, "swift-fox-jumps-barrel", &keys()).unwrap();
            assert!(added.starts_with(s));
            let text = String::from_utf8_lossy(&added);
            assert!(text.contains("# linbit-tunl-begin swift-fox-jumps-barrel\nssh-ed25519 "), "{text}");
            assert_eq!(remove_blocks(&added, Some("swift-fox-jumps-barrel")), s.to_vec(), "{text:?}");
            assert_eq!(remove_blocks(&added, None), s.to_vec());
            assert_eq!(remove_blocks(&added, Some("other-id-a-b")), added);
        }
        let added = add_block(b"", "a-b-c-d", &keys()).unwrap();
        assert_eq!(
            added,
            format!("# linbit-tunl-begin a-b-c-d\n{ED} eng@linbit.com\n# linbit-tunl-end a-b-c-d\n").as_bytes()
        );
    }

    #[test]
    fn sweep_and_partial_blocks() {
        let k = keys();
        let base = b"keep1\n".to_vec();
        let a = add_block(&base, "old-one-a-b", &k).unwrap();
        let mut b = add_block(&a, "new-two-c-d", &k).unwrap();
        b.extend_from_slice(b"keep2\n");
        assert_eq!(remove_blocks(&b, None), b"keep1\nkeep2\n");
        let only_old = remove_blocks(&b, Some("old-one-a-b"));
        assert!(String::from_utf8_lossy(&only_old).contains("new-two-c-d"));
        // CRLF markers are recognised.
        let crlf = b"x\r\n# linbit-tunl-begin a-b\r\nk\r\n# linbit-tunl-end a-b\r\ny\r\n";
        assert_eq!(remove_blocks(crlf, None), b"x\r\ny\r\n");
        // A begin without an end, or with a different end ID, is left alone.
        let lone = b"x\n# linbit-tunl-begin a-b\nk\n# linbit-tunl-end z-z\ny\n";
        assert_eq!(remove_blocks(lone, None), lone.to_vec());
        // Look-alike markers are not ours.
        let fake = b"# linbit-tunl-begin A B\nk\n# linbit-tunl-end A B\n";
        assert_eq!(remove_blocks(fake, None), fake.to_vec());
        assert!(add_block(b"", "bad\nid", &k).is_err());
        assert!(add_block(b"", "a-b", &["x\ny".into()]).is_err());
        assert!(add_block(b"", "a-b", &[]).is_err());
    }

    struct TmpDir(std::path::PathBuf);
    impl TmpDir {
        fn new(tag: &str) -> TmpDir {
            let p = std::env::temp_dir().join(format!(
                "tunl-authkeys-test-{tag}-{}-{}",
                std::process::id(),
                random_suffix()
            ));
            std::fs::create_dir(&p).unwrap();
            TmpDir(p)
        }
    }
    impl std::ops::Drop for TmpDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn edit_roundtrip_preserves_bytes_mode_owner() {
        let t = TmpDir::new("rt");
        let path = t.0.join("authorized_keys");
        let orig: &[u8] = b"# mine\r\nfrom=\"1.2.3.4\" ssh-ed25519 AAAA me\r\nssh-rsa BBBB no-final-newline";
        std::fs::write(&path, orig).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
        let root = rustix::process::geteuid().is_root();
        if root {
            rustix::fs::chown(&path, Some(rustix::fs::Uid::from_raw(12345)), Some(rustix::fs::Gid::from_raw(23456)))
                .unwrap();
        }
        let k = keys();
        assert!(edit(&path, |c| add_block(c, "a-b-c-d", &k).unwrap()).unwrap());
        let md = std::fs::metadata(&path).unwrap();
        assert_eq!(md.mode() & 0o7777, 0o640);
        if root {
            assert_eq!((md.uid(), md.gid()), (12345, 23456));
        }
        assert!(std::fs::read(&path).unwrap().len() > orig.len());
        assert!(edit(&path, |c| remove_blocks(c, Some("a-b-c-d"))).unwrap());
        assert_eq!(std::fs::read(&path).unwrap(), orig);
        // Unchanged content: nothing written.
        let ino = std::fs::metadata(&path).unwrap().ino();
        assert!(!edit(&path, |c| remove_blocks(c, None)).unwrap());
        assert_eq!(std::fs::metadata(&path).unwrap().ino(), ino);
        // No temp files left behind.
        assert_eq!(std::fs::read_dir(&t.0).unwrap().count(), 1);
    }

    #[test]
    fn edit_refuses_symlink() {
        let t = TmpDir::new("ln");
        let target = t.0.join("target");
        std::fs::write(&target, b"x\n").unwrap();
        let link = t.0.join("authorized_keys");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        let k = keys();
        assert!(edit(&link, |c| add_block(c, "a-b", &k).unwrap()).unwrap_err().contains("symbolic link"));
        assert_eq!(std::fs::read(&target).unwrap(), b"x\n");
        let dangling = t.0.join("dangling");
        std::os::unix::fs::symlink(t.0.join("nowhere"), &dangling).unwrap();
        assert!(edit(&dangling, |c| add_block(c, "a-b", &k).unwrap()).is_err());
        assert!(!t.0.join("nowhere").exists());
    }

    #[test]
    fn edit_creates_missing_dir_and_file() {
        let t = TmpDir::new("new");
        if rustix::process::geteuid().is_root() {
            rustix::fs::chown(&t.0, Some(rustix::fs::Uid::from_raw(4242)), Some(rustix::fs::Gid::from_raw(4343)))
                .unwrap();
        }
        let path = t.0.join(".ssh").join("authorized_keys");
        // Nothing to do on a missing file: nothing is created.
        assert!(!edit(&path, |c| remove_blocks(c, None)).unwrap());
        assert!(!t.0.join(".ssh").exists());
        let k = keys();
        assert!(edit(&path, |c| add_block(c, "a-b", &k).unwrap()).unwrap());
        let d = std::fs::metadata(t.0.join(".ssh")).unwrap();
        let f = std::fs::metadata(&path).unwrap();
        assert_eq!(d.mode() & 0o7777, 0o700);
        assert_eq!(f.mode() & 0o7777, 0o600);
        if rustix::process::geteuid().is_root() {
            assert_eq!((d.uid(), d.gid(), f.uid(), f.gid()), (4242, 4343, 4242, 4343));
        }
        assert!(edit(&path, |c| remove_blocks(c, None)).unwrap());
        assert_eq!(std::fs::read(&path).unwrap(), b"");
    }
}
