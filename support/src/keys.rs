//! The engineer's public keys for a tunnel request: `~/.ssh/id_ed25519.pub` or the `--key` files.
//! The customer's side accepts only plain public keys, so we refuse anything else here, where the
//! engineer can still fix it, rather than have the customer's side answer `invalid-key`.

use std::path::{Path, PathBuf};
use tunl_wire::neutralize;

const ALGORITHMS: &[&str] = &[
    "ssh-ed25519",
    "ssh-rsa",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
    "sk-ssh-ed25519@openssh.com",
    "sk-ecdsa-sha2-nistp256@openssh.com",
];

/// One authorized_keys line from a `.pub` file's text: `ALGO BASE64 [COMMENT]`, nothing before the
/// algorithm (no options), no certificates. The comment is kept when it is plain.
pub fn parse_public_key(text: &str) -> Result<String, String> {
    let lines: Vec<&str> = text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')).collect();
    let [line] = lines.as_slice() else {
        return Err(format!("holds {} keys, want one", lines.len()));
    };
    let mut parts = line.split_whitespace();
    let algo = parts.next().unwrap_or_default();
    if algo.contains("-cert-") {
        return Err("is a certificate, not a public key".into());
    }
    if !ALGORITHMS.contains(&algo) {
        return Err(format!(
            "is not a public key (starts with '{}')",
            neutralize(&algo.chars().take(40).collect::<String>())
        ));
    }
    let data = parts.next().ok_or("has no key data")?;
    let blob = tunl_wire::b64_decode(data).ok_or("has bad key data")?;
    // The blob starts with the algorithm name again, length-prefixed.
    let n = blob.get(..4).map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize).unwrap_or(0);
    if blob.get(4..4 + n) != Some(algo.as_bytes()) {
        return Err("has key data that does not match its type".into());
    }
    let comment: String = parts.collect::<Vec<_>>().join(" ");
    let comment_ok = comment.bytes().all(|b| b.is_ascii_graphic() || b == b' ') && comment.len() <= 100;
    Ok(if comment.is_empty() || !comment_ok { format!("{algo} {data}") } else { format!("{algo} {data} {comment}") })
}

/// The default key file: `$HOME/.ssh/id_ed25519.pub`.
pub fn default_key_file() -> Option<PathBuf> {
    std::env::var_os("HOME").map(|h| Path::new(&h).join(".ssh/id_ed25519.pub"))
}

/// The key lines to send, one a line, each checked.
pub fn load(files: &[PathBuf]) -> Result<String, String> {
    let files: Vec<PathBuf> = if files.is_empty() {
        vec![default_key_file().ok_or("HOME is not set: name a key with --key FILE")?]
    } else {
        files.to_vec()
    };
    let mut out = String::new();
    for f in &files {
        let shown = neutralize(&f.to_string_lossy());
        let text = std::fs::read_to_string(f).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound && f.extension().is_none_or(|x| x != "pub") {
                format!("{shown}: {e} (name your public key with --key FILE.pub)")
            } else {
                format!("{shown}: {e}")
            }
        })?;
        if text.contains("PRIVATE KEY") {
            return Err(format!("{shown} is a private key: name the .pub file"));
        }
        out.push_str(&parse_public_key(&text).map_err(|e| format!("{shown} {e}"))?);
        out.push('\n');
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ED: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIKfHwf5KZ+78BofPhl9KIN2fvICQRkU0BwLnW62cNskT";

    #[test]
    fn plain_keys_only() {
        assert_eq!(parse_public_key(&format!("{ED} alice@work\n")).unwrap(), format!("{ED} alice@work"));
        assert_eq!(parse_public_key(&format!("# mine\n{ED}\n")).unwrap(), ED);
        assert_eq!(parse_public_key(&format!("{ED} bad\u{1b}comment")).unwrap(), ED);
        for (t, want) in [
            (format!("command=\"x\" {ED}"), "not a public key"),
            (format!("{ED}\n{ED}"), "holds 2 keys"),
            ("".to_string(), "holds 0 keys"),
            ("ssh-ed25519-cert-v01@openssh.com AAAA".to_string(), "certificate"),
            (
                "ssh-rsa AAAAC3NzaC1lZDI1NTE5AAAAIKfHwf5KZ+78BofPhl9KIN2fvICQRkU0BwLnW62cNskT".to_string(),
                "does not match",
            ),
            ("ssh-ed25519 !!!".to_string(), "bad key data"),
        ] {
            let e = parse_public_key(&t).unwrap_err();
            assert!(e.contains(want), "{t}: {e}");
        }
    }

    #[test]
    fn load_files() {
        let d = std::env::temp_dir().join(format!("tunl-keys-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("a.pub"), format!("{ED} a\n")).unwrap();
        std::fs::write(d.join("id"), "-----BEGIN OPENSSH PRIVATE KEY-----\n").unwrap();
        assert_eq!(load(&[d.join("a.pub"), d.join("a.pub")]).unwrap(), format!("{ED} a\n{ED} a\n"));
        assert!(load(&[d.join("id")]).unwrap_err().contains("private key"));
        assert!(load(&[d.join("nope")]).unwrap_err().contains("--key FILE.pub"));
        std::fs::remove_dir_all(&d).unwrap();
    }
}
