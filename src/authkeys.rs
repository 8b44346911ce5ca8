//! authorized_keys editing (safety critical): key validation, our bracketed block, atomic rewrite.
//!
//! Decisions (docs/architecture.md, "authorized_keys", has them all):
//! - Keys from the relay must be plain `TYPE BASE64 [COMMENT]` lines of a known algorithm (ed25519,
//!   ecdsa-sha2-nistp256/384/521, rsa >= 2048 bits, sk-ed25519, sk-ecdsa); no options, no certificates,
//!   comment printable ASCII; 1..=16 keys. They are re-serialised (normalised) before installing, and
//!   get only our own options in front (`from="127.0.0.1,::1"`, `expiry-time`).
//! - Block: `# linbit-tunl-begin ID\n<lines>\n# linbit-tunl-end ID\n`, the end always with its
//!   newline. A block is a begin and the end of its ID with no other marker between; inside it only
//!   key lines are ours. Marker lines may end in `\r` (a CRLF editor touched the file).
//! - `edit` walks the directory without following links, locks it, re-checks the file before the
//!   rename, writes nothing when the content is unchanged, and creates a missing file (and `~/.ssh`,
//!   0700) owned like the directory that will contain it.
//! - `KeyBlock` is one session's keys: written, renewed, removed, and proven gone by reading again.

use std::io::Write;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Component, Path, PathBuf};
use std::time::{Duration, Instant};

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

/// A line without its `\n` and a `\r` before it (a CRLF editor touched the file).
fn bare(line: &[u8]) -> &[u8] {
    let l = line.strip_suffix(b"\n").unwrap_or(line);
    l.strip_suffix(b"\r").unwrap_or(l)
}

fn marker<'a>(line: &'a [u8], prefix: &str) -> Option<&'a str> {
    let id = std::str::from_utf8(bare(line).strip_prefix(prefix.as_bytes())?).ok()?;
    valid_id(id).then_some(id)
}

fn is_marker(line: &[u8]) -> bool {
    marker(line, BEGIN).is_some() || marker(line, END).is_some()
}

// ---- the options in front of support's keys (F9) ------------------------------------------------

const FROM_LOOPBACK: &str = "from=\"127.0.0.1,::1\"";
/// How long an installed key works without being renewed: what is left after a crash that nothing
/// cleaned up (power loss, SIGKILL of daemon and launcher).
pub const KEY_LIFETIME: Duration = Duration::from_secs(3600);
/// The daemon renews the expiry this often while the keys are installed.
pub const KEY_RENEW: Duration = Duration::from_secs(15 * 60);

/// How `expiry-time` can be written for the target sshd.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Expiry {
    /// Not understood (OpenSSH < 8.2 refuses the whole line, other servers are unknown): none.
    #[default]
    None,
    /// OpenSSH 8.2 - 9.0 read it in the system time zone.
    Local,
    /// OpenSSH >= 9.1 take a `Z` suffix for UTC.
    Utc,
}

/// The options we put in front of support's keys, decided once per session from the target sshd.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KeyOptions {
    /// `from="127.0.0.1,::1"`: the target is this host, so the key works only through the tunnel,
    /// never over the LAN, a VPN or a public address.
    pub from_loopback: bool,
    pub expiry: Expiry,
}

impl KeyOptions {
    /// From the target's identification string (`SSH-2.0-OpenSSH_9.2p1 Debian-2`), if it answered.
    /// Only OpenSSH is known to take both options; for anything else the keys go in bare rather
    /// than be refused by a server that rejects lines with unknown options.
    pub fn for_target(banner: Option<&str>, target_is_loopback: bool) -> KeyOptions {
        let Some(v) = banner.and_then(openssh_version) else { return KeyOptions::default() };
        let expiry = if v >= (9, 1) {
            Expiry::Utc
        } else if v >= (8, 2) {
            Expiry::Local
        } else {
            Expiry::None
        };
        KeyOptions { from_loopback: target_is_loopback, expiry }
    }

    /// The authorized_keys line for `key` (from `validate_keys`), valid until `until` (Unix seconds).
    pub fn line(&self, key: &str, until: u64) -> String {
        let mut opts: Vec<String> = Vec::new();
        if self.from_loopback {
            opts.push(FROM_LOOPBACK.to_string());
        }
        match self.expiry {
            Expiry::None => {}
            Expiry::Utc => opts.push(format!("expiry-time=\"{}Z\"", stamp(crate::sessiondir::civil(until)))),
            Expiry::Local => opts.push(format!("expiry-time=\"{}\"", stamp(local_fields(until)))),
        }
        if opts.is_empty() { key.to_string() } else { format!("{} {key}", opts.join(",")) }
    }
}

fn stamp((y, mo, d, h, mi, s): (i64, u32, u32, u32, u32, u32)) -> String {
    format!("{y:04}{mo:02}{d:02}{h:02}{mi:02}{s:02}")
}

/// Calendar fields of `t` in this process's time zone, which is the system's for sshd too.
// libc marks musl's `time_t` deprecated while musl moves 32-bit targets to 64 bits; on every
// target we build it is already 64 bits wide, which is all this call needs.
#[allow(deprecated)]
fn local_fields(t: u64) -> (i64, u32, u32, u32, u32, u32) {
    let tt = t as libc::time_t;
    // SAFETY: `tm` is plain data; localtime_r writes only into it and returns it or NULL.
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    let ok = unsafe { !libc::localtime_r(&tt, &mut tm).is_null() };
    if !ok {
        return crate::sessiondir::civil(t);
    }
    let f = |v: libc::c_int| v.max(0) as u32;
    (tm.tm_year as i64 + 1900, f(tm.tm_mon) + 1, f(tm.tm_mday), f(tm.tm_hour), f(tm.tm_min), f(tm.tm_sec))
}

/// `SSH-2.0-OpenSSH_8.2p1 Ubuntu-4ubuntu0.5` -> (8, 2); `None` for any other software.
pub fn openssh_version(banner: &str) -> Option<(u32, u32)> {
    let soft = banner.trim_end().strip_prefix("SSH-2.0-").or_else(|| banner.strip_prefix("SSH-1.99-"))?;
    let v = soft.split(' ').next()?.strip_prefix("OpenSSH_")?;
    let v = v.strip_prefix("for_Windows_").unwrap_or(v);
    let mut it = v.split(|c: char| !c.is_ascii_digit());
    let major = it.next()?.parse().ok()?;
    let minor = it.next()?.parse().ok()?;
    Some((major, minor))
}

/// Whether a connection to `host` comes from a loopback address (what `from=` then allows).
pub fn is_loopback(host: &str) -> bool {
    let h = host.trim_start_matches('[').trim_end_matches(']');
    h.eq_ignore_ascii_case("localhost") || h.parse::<std::net::IpAddr>().is_ok_and(|a| a.is_loopback())
}

/// The key part of a line we could have written, `[OUR_OPTIONS ]KEY`, or `None`. Our options are
/// exactly `from="127.0.0.1,::1"` and `expiry-time="DIGITS[Z]"`; a line with any other option is
/// never ours.
fn our_key_part(line: &str) -> Option<&str> {
    let mut rest = line;
    let (mut from, mut exp) = (false, false);
    loop {
        if let Some(r) = rest.strip_prefix(FROM_LOOPBACK).filter(|_| !from) {
            from = true;
            rest = r;
        } else if let Some(r) = rest.strip_prefix("expiry-time=\"").filter(|_| !exp) {
            let end = r.find('"')?;
            let spec = r[..end].strip_suffix('Z').unwrap_or(&r[..end]);
            if !matches!(spec.len(), 8 | 12 | 14) || !spec.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            exp = true;
            rest = &r[end + 1..];
        } else if from || exp {
            return None;
        } else {
            break;
        }
        if let Some(r) = rest.strip_prefix(',') {
            rest = r;
        } else {
            let key = rest.strip_prefix(' ')?;
            return is_key_line(key).then_some(key);
        }
    }
    is_key_line(line).then_some(line)
}

/// A plain key line exactly as `validate_keys` writes it.
fn is_key_line(s: &str) -> bool {
    check_key(s).is_ok_and(|k| k == s)
}

/// Whether `line` is one of `keys` the way we write it (with or without our options).
fn carries_one_of(line: &[u8], keys: &[String]) -> bool {
    std::str::from_utf8(bare(line)).ok().and_then(our_key_part).is_some_and(|k| keys.iter().any(|x| x == k))
}

// ---- editing the content (pure) ------------------------------------------------------------------

/// Remove our complete blocks: those of `session_id`, or every one of ours when `None` (stale sweep).
/// A block is a begin marker and the end marker of its ID with no other marker between them, so a
/// begin whose end was lost never pairs with a later block of a re-used ID across the customer's
/// lines. Inside a block only the markers and key lines are ours; anything else stays.
pub fn remove_blocks(content: &[u8], session_id: Option<&str>) -> Vec<u8> {
    let ls = lines(content);
    let mut out: Vec<u8> = Vec::with_capacity(content.len());
    let mut i = 0;
    while i < ls.len() {
        let begin = marker(ls[i], BEGIN).filter(|id| session_id.is_none_or(|s| s == *id));
        if let Some(id) = begin {
            let next = (i + 1..ls.len()).find(|&j| is_marker(ls[j]));
            if let Some(j) = next.filter(|&j| marker(ls[j], END) == Some(id)) {
                for l in &ls[i + 1..j] {
                    if std::str::from_utf8(bare(l)).ok().is_none_or(|s| our_key_part(s).is_none()) {
                        out.extend_from_slice(l);
                    }
                }
                if !ls[j].ends_with(b"\n") && i > 0 && out.ends_with(b"\n") {
                    // A block from an older version ended the file without a newline: the `\n`
                    // before it was ours.
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

/// Everything of session `session_id`: its blocks, its marker lines wherever they are (a block
/// someone damaged), and every line that carries one of `keys` the way we write them.
pub fn remove_session(content: &[u8], session_id: &str, keys: &[String]) -> Vec<u8> {
    let rest = remove_blocks(content, Some(session_id));
    let mut out = Vec::with_capacity(rest.len());
    for l in lines(&rest) {
        let ours = marker(l, BEGIN) == Some(session_id) || marker(l, END) == Some(session_id);
        if !ours && !carries_one_of(l, keys) {
            out.extend_from_slice(l);
        }
    }
    out
}

/// The lines of `content` that still carry one of `keys` (what a removal must leave none of).
pub fn lines_left(content: &[u8], keys: &[String]) -> Vec<String> {
    lines(content)
        .into_iter()
        .filter(|l| carries_one_of(l, keys))
        .map(|l| String::from_utf8_lossy(bare(l)).into_owned())
        .collect()
}

/// Append our block with `lines` (from `KeyOptions::line`). The end marker always ends its line,
/// so a later `echo KEY >> authorized_keys` starts a line of its own.
pub fn add_block(content: &[u8], session_id: &str, keys: &[String]) -> Result<Vec<u8>, String> {
    if !valid_id(session_id) {
        return Err("invalid session id".into());
    }
    if keys.is_empty() || keys.iter().any(|k| k.is_empty() || k.bytes().any(|b| b < 0x20 || b == 0x7f)) {
        return Err("invalid key lines".into());
    }
    let mut out = content.to_vec();
    if !content.is_empty() && !content.ends_with(b"\n") {
        out.push(b'\n');
    }
    out.extend_from_slice(format!("{BEGIN}{session_id}\n").as_bytes());
    for k in keys {
        out.extend_from_slice(k.as_bytes());
        out.push(b'\n');
    }
    out.extend_from_slice(format!("{END}{session_id}\n").as_bytes());
    Ok(out)
}

fn random_suffix() -> String {
    let mut b = [0u8; 8];
    rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut b);
    b.iter().map(|x| format!("{x:02x}")).collect()
}

// ---- the file (I/O) ------------------------------------------------------------------------------

const DIR_FLAGS: OFlags = OFlags::RDONLY.union(OFlags::DIRECTORY).union(OFlags::NOFOLLOW).union(OFlags::CLOEXEC);
/// How long we wait for another linbit-tunl that edits the same file.
const LOCK_WAIT: Duration = Duration::from_secs(5);
/// How often we start over when a writer that does not lock changed the file under us.
const ATTEMPTS: usize = 5;

fn symlink_error(shown: &Path) -> String {
    format!("{}: is a symbolic link, refusing to follow it as root", shown.display())
}

/// Open the directory that holds `path`, one component at a time and never following a symbolic
/// link (F10): a user who owns a directory on the way (`~/.ssh`) cannot point root elsewhere, and
/// every later step works relative to this descriptor, so swapping a link in afterwards changes
/// nothing. `None` when the directory does not exist; with `create`, a missing last directory is
/// made (0700, owned like the directory it is in, as `~/.ssh` would be).
fn open_parent(path: &Path, create: bool) -> Result<Option<OwnedFd>, String> {
    if !path.is_absolute() {
        return Err(format!("{}: not an absolute path", path.display()));
    }
    let parent = path.parent().ok_or_else(|| format!("{}: not a file name", path.display()))?;
    let names: Vec<&std::ffi::OsStr> = parent
        .components()
        .filter_map(|c| match c {
            Component::Normal(n) => Some(Ok(n)),
            Component::ParentDir => Some(Err(())),
            _ => None,
        })
        .collect::<Result<_, _>>()
        .map_err(|_| format!("{}: '..' in the path", path.display()))?;
    let mut fd = rfs::open("/", DIR_FLAGS, FMode::empty()).map_err(|e| format!("/: {e}"))?;
    let mut sofar = PathBuf::from("/");
    for (i, name) in names.iter().enumerate() {
        sofar.push(name);
        match rfs::openat(&fd, *name, DIR_FLAGS, FMode::empty()) {
            Ok(next) => fd = next,
            Err(rustix::io::Errno::LOOP) => return Err(symlink_error(&sofar)),
            Err(rustix::io::Errno::NOTDIR) => {
                let link = rfs::statat(&fd, *name, rfs::AtFlags::SYMLINK_NOFOLLOW)
                    .is_ok_and(|st| st.st_mode & 0o170000 == 0o120000);
                return Err(if link { symlink_error(&sofar) } else { format!("{}: not a directory", sofar.display()) });
            }
            Err(rustix::io::Errno::NOENT) if create && i + 1 == names.len() => {
                let st = rfs::fstat(&fd).map_err(|e| format!("{}: {e}", sofar.display()))?;
                rfs::mkdirat(&fd, *name, FMode::from_raw_mode(0o700))
                    .map_err(|e| format!("{}: {e}", sofar.display()))?;
                let d = rfs::openat(&fd, *name, DIR_FLAGS, FMode::empty())
                    .map_err(|e| format!("{}: {e}", sofar.display()))?;
                chown_fd(&d, st.st_uid, st.st_gid)?;
                rfs::fchmod(&d, FMode::from_raw_mode(0o700)).map_err(|e| format!("{}: {e}", sofar.display()))?;
                fd = d;
            }
            Err(rustix::io::Errno::NOENT) => return Ok(None),
            Err(e) => return Err(format!("{}: {e}", sofar.display())),
        }
    }
    Ok(Some(fd))
}

fn chown_fd(fd: impl AsFd, uid: u32, gid: u32) -> Result<(), String> {
    let st = rfs::fstat(&fd).map_err(|e| format!("fstat: {e}"))?;
    if st.st_uid == uid && st.st_gid == gid {
        return Ok(());
    }
    rfs::fchown(&fd, Some(rustix::fs::Uid::from_raw(uid)), Some(rustix::fs::Gid::from_raw(gid)))
        .map_err(|e| format!("fchown: {e}"))
}

/// What identifies one version of the file: a rename or a write in place changes it.
#[derive(Clone, PartialEq, Eq)]
struct Version {
    dev: u64,
    ino: u64,
    size: i64,
    mtime: (i64, u64),
    ctime: (i64, u64),
}

fn version(st: &rfs::Stat) -> Version {
    Version {
        dev: st.st_dev,
        ino: st.st_ino,
        size: st.st_size,
        mtime: (st.st_mtime, st.st_mtime_nsec as _),
        ctime: (st.st_ctime, st.st_ctime_nsec as _),
    }
}

/// One version of the file as we read it.
struct Existing {
    data: Vec<u8>,
    uid: u32,
    gid: u32,
    mode: u32,
    version: Version,
}

/// The file `name` in `dir`; `None` if it does not exist.
fn read_at(dir: &OwnedFd, name: &str, shown: &Path) -> Result<Option<Existing>, String> {
    let show = shown.display();
    // NONBLOCK: a fifo planted at the name must not hang us; it is refused below.
    let flags = OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC | OFlags::NONBLOCK;
    match rfs::openat(dir, name, flags, FMode::empty()) {
        Ok(fd) => {
            let st = rfs::fstat(&fd).map_err(|e| format!("{show}: {e}"))?;
            if st.st_mode & 0o170000 != 0o100000 {
                return Err(format!("{show}: not a regular file"));
            }
            let mut data = Vec::new();
            std::io::Read::read_to_end(&mut std::fs::File::from(fd), &mut data).map_err(|e| format!("{show}: {e}"))?;
            Ok(Some(Existing {
                data,
                uid: st.st_uid,
                gid: st.st_gid,
                mode: st.st_mode & 0o7777,
                version: version(&st),
            }))
        }
        Err(rustix::io::Errno::LOOP) => Err(symlink_error(shown)),
        Err(rustix::io::Errno::NOENT) => Ok(None),
        Err(e) => Err(format!("{show}: {e}")),
    }
}

fn version_at(dir: &OwnedFd, name: &str) -> Option<Version> {
    rfs::statat(dir, name, rfs::AtFlags::SYMLINK_NOFOLLOW).ok().map(|st| version(&st))
}

/// Our writers take turns (F11): an exclusive `flock` on the directory, which outlives every
/// rename of the file inside it. Bounded, so a user holding a lock on their own `~/.ssh` cannot
/// stall us.
fn lock_dir(dir: &OwnedFd, shown: &Path) -> Result<(), String> {
    let deadline = Instant::now() + LOCK_WAIT;
    loop {
        match rfs::flock(dir, rfs::FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => return Ok(()),
            Err(rustix::io::Errno::WOULDBLOCK) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => return Err(format!("cannot lock the directory of {}: {e}", shown.display())),
        }
    }
}

fn file_name(path: &Path) -> Result<String, String> {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .ok_or_else(|| format!("{}: not a file name", path.display()))
}

/// The content of the authorized_keys file at `path` (empty if it does not exist), read with the
/// same care as `edit`.
pub fn read(path: &Path) -> Result<Vec<u8>, String> {
    let name = file_name(path)?;
    let Some(dir) = open_parent(path, false)? else { return Ok(Vec::new()) };
    Ok(read_at(&dir, &name, path)?.map(|r| r.data).unwrap_or_default())
}

/// Atomically rewrite the authorized_keys file at `path` with `f(old content)`; returns whether the
/// file changed. Owner, group and mode are kept; a missing file is created 0600, owned like its
/// directory. If a writer that does not take our lock replaces the file while we work, `f` runs
/// again on its version, so their change is kept.
pub fn edit(path: &Path, mut f: impl FnMut(&[u8]) -> Vec<u8>) -> Result<bool, String> {
    let show = path.display();
    let name = file_name(path)?;
    let dir = match open_parent(path, false)? {
        Some(d) => d,
        // No directory: there is nothing to remove, and something to add needs it made.
        None if f(&[]).is_empty() => return Ok(false),
        None => open_parent(path, true)?.ok_or_else(|| format!("{show}: cannot create its directory"))?,
    };
    lock_dir(&dir, path)?;
    for _ in 0..ATTEMPTS {
        let existing = read_at(&dir, &name, path)?;
        let old: &[u8] = existing.as_ref().map_or(&[], |e| &e.data);
        let new = f(old);
        if new == old {
            return Ok(false);
        }
        let (uid, gid, mode) = match &existing {
            Some(e) => (e.uid, e.gid, e.mode),
            None => {
                let st = rfs::fstat(&dir).map_err(|e| format!("{show}: {e}"))?;
                (st.st_uid, st.st_gid, 0o600)
            }
        };
        let tmp = format!(".{name}.linbit-tunl.{}", random_suffix());
        let fd = rfs::openat(
            &dir,
            tmp.as_str(),
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            FMode::from_raw_mode(0o600),
        )
        .map_err(|e| format!("{show}: cannot create a temporary file beside it: {e}"))?;
        let result = (|| {
            let mut file = std::fs::File::from(fd);
            file.write_all(&new).map_err(|e| format!("{show}: cannot write the new version: {e}"))?;
            chown_fd(&file, uid, gid)?;
            rfs::fchmod(&file, FMode::from_raw_mode(mode)).map_err(|e| format!("fchmod: {e}"))?;
            file.sync_all().map_err(|e| format!("fsync: {e}"))?;
            // Someone who does not take our lock changed the file since we read it: start over.
            if version_at(&dir, &name) != existing.as_ref().map(|e| e.version.clone()) {
                return Ok(false);
            }
            rfs::renameat(&dir, tmp.as_str(), &dir, name.as_str()).map_err(|e| format!("rename to {show}: {e}"))?;
            Ok(true)
        })();
        match result {
            Ok(true) => {
                let _ = rfs::fsync(&dir);
                return Ok(true);
            }
            Ok(false) => {
                let _ = rfs::unlinkat(&dir, tmp.as_str(), rfs::AtFlags::empty());
            }
            Err(e) => {
                let _ = rfs::unlinkat(&dir, tmp.as_str(), rfs::AtFlags::empty());
                return Err(e);
            }
        }
    }
    Err(format!("{show}: it keeps changing while we edit it; try again"))
}

/// The last resort when the file cannot be rewritten (a full disk: the rewrite needs room for a
/// whole copy, and the session's own recording may be what filled it): turn each line that carries
/// one of `keys` into a comment in place, one byte each, which needs no new space. Returns how many
/// lines it disabled. The markers and the rest of those lines stay, as comments.
pub fn disable_in_place(path: &Path, keys: &[String]) -> Result<usize, String> {
    use std::os::unix::fs::FileExt;
    let show = path.display();
    let name = file_name(path)?;
    let Some(dir) = open_parent(path, false)? else { return Ok(0) };
    lock_dir(&dir, path)?;
    let flags = OFlags::RDWR | OFlags::NOFOLLOW | OFlags::CLOEXEC | OFlags::NONBLOCK;
    let fd = match rfs::openat(&dir, name.as_str(), flags, FMode::empty()) {
        Ok(fd) => fd,
        Err(rustix::io::Errno::NOENT) => return Ok(0),
        Err(rustix::io::Errno::LOOP) => return Err(symlink_error(path)),
        Err(e) => return Err(format!("{show}: {e}")),
    };
    let st = rfs::fstat(&fd).map_err(|e| format!("{show}: {e}"))?;
    if st.st_mode & 0o170000 != 0o100000 {
        return Err(format!("{show}: not a regular file"));
    }
    let mut file = std::fs::File::from(fd);
    let mut data = Vec::new();
    std::io::Read::read_to_end(&mut file, &mut data).map_err(|e| format!("{show}: {e}"))?;
    let (mut off, mut n) = (0u64, 0);
    for l in lines(&data) {
        if carries_one_of(l, keys) {
            file.write_at(b"#", off).map_err(|e| format!("{show}: {e}"))?;
            n += 1;
        }
        off += l.len() as u64;
    }
    file.sync_all().map_err(|e| format!("{show}: fsync: {e}"))?;
    Ok(n)
}

// ---- one session's keys ----------------------------------------------------------------------------

/// Support's keys of one session in one authorized_keys file: written with our options, renewed
/// before they expire, and taken out again with proof that none is left (F8, F9, F12). A journal
/// in the session directory names the file and the keys, so the launcher can finish the removal
/// (and say what is left) when the daemon could not.
#[derive(Debug)]
pub struct KeyBlock {
    path: PathBuf,
    id: String,
    opts: KeyOptions,
    /// Every key this session wrote and has not yet seen gone from the file.
    ours: Vec<String>,
    /// The keys the block holds now.
    current: Vec<String>,
    /// The file had no final newline and we added one: the removal takes it away again, so grant
    /// and revoke leave the file byte-identical.
    added_newline: bool,
    renew_at: Option<Instant>,
    journal: Option<PathBuf>,
}

/// Keys a removal could not take out of the file: the customer must be told, in these words.
#[derive(Debug)]
pub struct Leftover {
    pub path: PathBuf,
    pub why: String,
    /// The exact lines to delete.
    pub lines: Vec<String>,
}

impl Leftover {
    /// Plain words for the customer's terminal, one line each.
    pub fn message(&self) -> Vec<String> {
        let p = self.path.display();
        let mut m = vec![
            format!("WARNING: support's keys could not be removed from {p} ({}).", self.why),
            format!("Support may still be able to log in with them. Delete these lines from {p} now:"),
        ];
        m.extend(self.lines.iter().map(|l| format!("    {l}")));
        m
    }
}

/// The journal's name in the session directory.
pub const JOURNAL: &str = "keys.journal";
/// The file in the session directory that names the target sshd (its identification string).
pub const TARGET_SSHD: &str = "target-sshd";

impl KeyBlock {
    pub fn new(path: PathBuf, id: String, opts: KeyOptions, journal: Option<PathBuf>) -> KeyBlock {
        KeyBlock {
            path,
            id,
            opts,
            ours: Vec::new(),
            current: Vec::new(),
            added_newline: false,
            renew_at: None,
            journal,
        }
    }

    /// The session's block: options from what the launcher learned about the target sshd
    /// (`DIR/target-sshd`), journal in `DIR`.
    pub fn for_session(path: &Path, id: &str, target_host: &str, dir: &Path) -> KeyBlock {
        let banner = std::fs::read_to_string(dir.join(TARGET_SSHD)).ok();
        let opts = KeyOptions::for_target(banner.as_deref(), is_loopback(target_host));
        KeyBlock::new(path.to_path_buf(), id.to_string(), opts, Some(dir.join(JOURNAL)))
    }

    /// What a journal names (the launcher, after a daemon that could not finish).
    pub fn from_journal(journal: &Path, id: &str) -> Option<KeyBlock> {
        let text = std::fs::read_to_string(journal).ok()?;
        let mut it = text.lines();
        let path = PathBuf::from(it.next()?);
        let added_newline = it.next()? == "1";
        let ours: Vec<String> = it.map(str::to_string).collect();
        let mut b = KeyBlock::new(path, id.to_string(), KeyOptions::default(), Some(journal.to_path_buf()));
        b.ours = ours;
        b.added_newline = added_newline;
        Some(b)
    }

    fn write_journal(&self) {
        if let Some(j) = &self.journal {
            let mut text = format!("{}\n{}\n", self.path.display(), if self.added_newline { 1 } else { 0 });
            for k in &self.ours {
                text.push_str(k);
                text.push('\n');
            }
            let _ = crate::sessiondir::publish(j, &text);
        }
    }

    pub fn installed(&self) -> bool {
        !self.current.is_empty()
    }

    /// Make the block hold exactly `keys` (from `validate_keys`), valid for `KEY_LIFETIME`.
    pub fn write(&mut self, keys: &[String]) -> Result<(), String> {
        if keys.is_empty() {
            return self.remove().map_err(|l| l.why);
        }
        let until = crate::sessiondir::now().0 + KEY_LIFETIME.as_secs();
        let lines: Vec<String> = keys.iter().map(|k| self.opts.line(k, until)).collect();
        let before = self.ours.clone();
        for k in keys {
            if !self.ours.contains(k) {
                self.ours.push(k.clone());
            }
        }
        // The journal first: after a crash in between it names a superset of what is in the file.
        self.write_journal();
        let mut added = false;
        let (id, ours) = (&self.id, &self.ours);
        let res = edit(&self.path, |old| {
            let cleaned = remove_session(old, id, ours);
            added = !cleaned.is_empty() && !cleaned.ends_with(b"\n");
            add_block(&cleaned, id, &lines).unwrap_or(cleaned)
        });
        if let Err(e) = res {
            // `edit` fails only before its rename: the file holds what it held.
            self.ours = before;
            self.write_journal();
            self.renew_at = self.renew_at.map(|_| Instant::now() + Duration::from_secs(60));
            return Err(e);
        }
        if added && !self.added_newline {
            self.added_newline = true;
            self.write_journal();
        }
        self.current = keys.to_vec();
        self.renew_at = (self.opts.expiry != Expiry::None).then(|| Instant::now() + KEY_RENEW);
        Ok(())
    }

    /// When the installed keys need a fresh expiry.
    pub fn renew_at(&self) -> Option<Instant> {
        self.renew_at.filter(|_| self.installed())
    }

    pub fn renew(&mut self) -> Result<(), String> {
        let keys = self.current.clone();
        self.write(&keys)
    }

    /// Take every key of this session out of the file, then read it again: none may be left.
    pub fn remove(&mut self) -> Result<(), Leftover> {
        self.renew_at = None;
        self.current.clear();
        if self.ours.is_empty() {
            // Nothing of ours ever reached the file.
            if let Some(j) = &self.journal {
                let _ = std::fs::remove_file(j);
            }
            return Ok(());
        }
        let (id, ours, added) = (&self.id, &self.ours, self.added_newline);
        let mut res = edit(&self.path, |old| {
            let mut new = remove_session(old, id, ours);
            let last_ours = lines(old).last().is_some_and(|l| marker(l, END) == Some(id) || carries_one_of(l, ours));
            if added && last_ours && new.ends_with(b"\n") {
                new.pop();
            }
            new
        });
        if res.is_err() && disable_in_place(&self.path, ours).is_ok_and(|n| n > 0) {
            // Commented out where they stand; the check below proves them harmless.
            res = Ok(true);
        }
        let check = read(&self.path);
        let left = check.as_ref().map(|c| lines_left(c, ours)).unwrap_or_default();
        let why = match (res, check) {
            (Ok(_), Ok(_)) if left.is_empty() => {
                self.ours.clear();
                self.added_newline = false;
                if let Some(j) = &self.journal {
                    let _ = std::fs::remove_file(j);
                }
                return Ok(());
            }
            (Err(e), _) | (Ok(_), Err(e)) => e,
            (Ok(_), Ok(_)) => "they came back after the removal".to_string(),
        };
        // What to tell the customer: the lines as they are in the file, followed like sshd
        // follows it (reading only); else what we wrote, with any expiry.
        let mut shown = std::fs::read(&self.path).map(|c| lines_left(&c, ours)).unwrap_or_default();
        if shown.is_empty() {
            shown = if left.is_empty() { ours.clone() } else { left };
        }
        Err(Leftover { path: self.path.clone(), why, lines: shown })
    }
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
    fn block_roundtrip() {
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
            // Without the session's memory a removal cannot know whether the final newline was
            // ours: it stays (harmless to sshd). `KeyBlock` remembers and restores the bytes.
            let mut want = s.to_vec();
            if !s.is_empty() && !s.ends_with(b"\n") {
                want.push(b'\n');
            }
            assert_eq!(remove_blocks(&added, Some("swift-fox-jumps-barrel")), want, "{text:?}");
            assert_eq!(remove_blocks(&added, None), want);
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
        let crlf = format!("x\r\n# linbit-tunl-begin a-b\r\n{ED} k\r\n# linbit-tunl-end a-b\r\ny\r\n");
        assert_eq!(remove_blocks(crlf.as_bytes(), None), b"x\r\ny\r\n");
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

    #[test]
    fn end_marker_always_ends_its_line() {
        // F8: `echo KEY >> authorized_keys` during the session must not fuse with our end marker.
        let k = keys();
        let added = add_block(b"A", "a-b", &k).unwrap();
        assert!(added.ends_with(b"# linbit-tunl-end a-b\n"), "{:?}", String::from_utf8_lossy(&added));
        let mut appended = added.clone();
        appended.extend_from_slice(b"ssh-ed25519 AAAAmine me\n");
        assert_eq!(remove_blocks(&appended, Some("a-b")), b"A\nssh-ed25519 AAAAmine me\n");
    }

    #[test]
    fn a_reused_id_never_spans_the_customers_lines() {
        // F8: an old begin of this ID lost its end; the customer's lines follow; then our new block.
        let k = keys();
        let old = format!("# linbit-tunl-begin a-b\n{ED} eng@linbit.com\nssh-rsa CUSTOMER one\n# comment\n");
        let new = add_block(old.as_bytes(), "a-b", &k).unwrap();
        let text = String::from_utf8_lossy(&remove_blocks(&new, Some("a-b"))).into_owned();
        assert!(text.contains("ssh-rsa CUSTOMER one\n# comment\n"), "{text}");
        assert!(!text.contains("linbit-tunl-end"), "{text}");
        // Inside a block, only key lines are ours: anything else someone put there stays.
        let inside = format!(
            "# linbit-tunl-begin a-b\n{ED} eng\n# customer note\nfrom=\"10.0.0.1\" ssh-rsa X y\n# linbit-tunl-end a-b\n"
        );
        assert_eq!(remove_blocks(inside.as_bytes(), Some("a-b")), b"# customer note\nfrom=\"10.0.0.1\" ssh-rsa X y\n");
    }

    #[test]
    fn options_follow_the_target_sshd() {
        assert_eq!(openssh_version("SSH-2.0-OpenSSH_9.2p1 Debian-2+deb12u6\r\n"), Some((9, 2)));
        assert_eq!(openssh_version("SSH-2.0-OpenSSH_7.4"), Some((7, 4)));
        assert_eq!(openssh_version("SSH-2.0-OpenSSH_for_Windows_8.1"), Some((8, 1)));
        assert_eq!(openssh_version("SSH-2.0-dropbear_2022.83"), None);
        assert_eq!(openssh_version("HTTP/1.1 400"), None);
        let t = |b: &str, l: bool| KeyOptions::for_target(Some(b), l);
        assert_eq!(t("SSH-2.0-OpenSSH_9.1", true), KeyOptions { from_loopback: true, expiry: Expiry::Utc });
        assert_eq!(t("SSH-2.0-OpenSSH_8.2p1", false), KeyOptions { from_loopback: false, expiry: Expiry::Local });
        assert_eq!(t("SSH-2.0-OpenSSH_7.4", true), KeyOptions { from_loopback: true, expiry: Expiry::None });
        assert_eq!(t("SSH-2.0-dropbear", true), KeyOptions::default());
        assert_eq!(KeyOptions::for_target(None, true), KeyOptions::default());
        for (h, l) in [
            ("localhost", true),
            ("127.0.0.1", true),
            ("127.1.2.3", true),
            ("::1", true),
            ("10.0.0.1", false),
            ("db1", false),
        ] {
            assert_eq!(is_loopback(h), l, "{h}");
        }
        let k = &keys()[0];
        // 2026-11-25 15:30:00 UTC
        let utc = KeyOptions { from_loopback: true, expiry: Expiry::Utc }.line(k, 1_795_620_600);
        assert_eq!(utc, format!("from=\"127.0.0.1,::1\",expiry-time=\"20261125153000Z\" {k}"));
        assert_eq!(KeyOptions::default().line(k, 1), *k);
        let remote = KeyOptions { from_loopback: false, expiry: Expiry::Utc }.line(k, 1_795_620_600);
        assert_eq!(remote, format!("expiry-time=\"20261125153000Z\" {k}"));
        // What we write is recognised as ours, and nothing else is.
        for line in [&utc, &remote, k] {
            assert_eq!(our_key_part(line), Some(k.as_str()), "{line}");
        }
        for line in [
            format!("from=\"10.0.0.1\" {k}"),
            format!("from=\"127.0.0.1,::1\",no-pty {k}"),
            format!("from=\"127.0.0.1,::1\",from=\"127.0.0.1,::1\" {k}"),
            format!("expiry-time=\"2026\" {k}"),
            "from=\"127.0.0.1,::1\" ssh-ed25519 AAAA".to_string(),
            "# comment".to_string(),
        ] {
            assert_eq!(our_key_part(&line), None, "{line}");
        }
    }

    #[test]
    fn removal_finds_our_lines_wherever_they_are() {
        // F8: the end marker is gone (someone edited the file): the exact lines still go.
        let k = keys();
        let line = KeyOptions { from_loopback: true, expiry: Expiry::Utc }.line(&k[0], 1_795_620_600);
        let damaged = format!("mine\n# linbit-tunl-begin a-b\n{line}\nafter\n");
        assert_eq!(remove_session(damaged.as_bytes(), "a-b", &k), b"mine\nafter\n");
        assert_eq!(lines_left(damaged.as_bytes(), &k), vec![line.clone()]);
        // The customer's own copy of the key with their own options is theirs.
        let theirs = format!("no-pty {}\n", k[0]);
        assert_eq!(remove_session(theirs.as_bytes(), "a-b", &k), theirs.as_bytes());
    }

    #[test]
    fn key_block_reports_what_it_could_not_remove() {
        // F12: the file became a symlink (configuration management): we refuse to follow it, and
        // say which exact lines are left where.
        let t = TmpDir::new("left");
        let path = t.0.join("authorized_keys");
        let k = keys();
        let mut block =
            KeyBlock::new(path.clone(), "a-b".into(), KeyOptions { from_loopback: true, expiry: Expiry::Utc }, None);
        block.write(&k).unwrap();
        let installed = String::from_utf8(std::fs::read(&path).unwrap()).unwrap();
        let line = installed.lines().nth(1).unwrap().to_string();
        assert!(line.starts_with("from=\"127.0.0.1,::1\",expiry-time=\""), "{line}");
        std::fs::rename(&path, t.0.join("managed")).unwrap();
        std::os::unix::fs::symlink(t.0.join("managed"), &path).unwrap();
        let left = block.remove().unwrap_err();
        assert_eq!(left.lines, vec![line.clone()]);
        assert!(left.why.contains("symbolic link"), "{}", left.why);
        let msg = left.message().join("\n");
        assert!(msg.contains(&line) && msg.contains(&path.display().to_string()), "{msg}");
        // Once the link is gone the keys can go, and the next removal proves it.
        std::fs::remove_file(&path).unwrap();
        std::fs::rename(t.0.join("managed"), &path).unwrap();
        block.remove().unwrap();
        assert!(!String::from_utf8(std::fs::read(&path).unwrap()).unwrap().contains("ssh-ed25519"));
    }

    #[test]
    fn installed_keys_are_renewed_before_they_expire() {
        let t = TmpDir::new("renew");
        let path = t.0.join("authorized_keys");
        let opts = KeyOptions { from_loopback: true, expiry: Expiry::Utc };
        let mut block = KeyBlock::new(path.clone(), "a-b".into(), opts, None);
        assert_eq!(block.renew_at(), None);
        block.write(&keys()).unwrap();
        let due = block.renew_at().expect("a renewal is due");
        let wait = due.saturating_duration_since(Instant::now());
        assert!(wait > KEY_RENEW - Duration::from_secs(5) && wait <= KEY_RENEW && KEY_RENEW < KEY_LIFETIME / 2);
        // Pretend the installed expiry is old: the renewal writes a fresh one in its place.
        let text = String::from_utf8(std::fs::read(&path).unwrap()).unwrap();
        let at = text.find("expiry-time=\"").unwrap() + "expiry-time=\"".len();
        let aged = format!("{}20000101000000{}", &text[..at], &text[at + 14..]);
        std::fs::write(&path, aged).unwrap();
        block.renew().unwrap();
        let text = String::from_utf8(std::fs::read(&path).unwrap()).unwrap();
        assert!(!text.contains("20000101000000"), "{text}");
        assert_eq!(text.matches("ssh-ed25519").count(), 1, "{text}");
        let until = crate::sessiondir::now().0 + KEY_LIFETIME.as_secs();
        let spec = stamp(crate::sessiondir::civil(until));
        assert!(text.contains(&format!("expiry-time=\"{}", &spec[..10])), "{text}");
        assert_eq!(text.matches("linbit-tunl-begin").count(), 1, "{text}");
        block.remove().unwrap();
        assert_eq!(block.renew_at(), None);
        // Without expiry there is nothing to renew.
        let mut bare = KeyBlock::new(path.clone(), "c-d".into(), KeyOptions::default(), None);
        bare.write(&keys()).unwrap();
        assert_eq!(bare.renew_at(), None);
        bare.remove().unwrap();
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
        let mut block = KeyBlock::new(path.clone(), "a-b-c-d".into(), KeyOptions::default(), None);
        block.write(&k).unwrap();
        let md = std::fs::metadata(&path).unwrap();
        assert_eq!(md.mode() & 0o7777, 0o640);
        if root {
            assert_eq!((md.uid(), md.gid()), (12345, 23456));
        }
        assert!(std::fs::read(&path).unwrap().len() > orig.len());
        // A second grant rewrites the one block; the revoke restores every byte.
        block.write(&[k[0].clone(), format!("{ED} second")]).unwrap();
        block.remove().unwrap();
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
    fn edit_refuses_a_symlink_in_the_directory_part() {
        // F10: a user's `~/.ssh -> /root/.ssh`: root must neither write nor create anything there.
        let t = TmpDir::new("dirln");
        let victim = t.0.join("victim");
        std::fs::create_dir(&victim).unwrap();
        std::fs::write(victim.join("authorized_keys"), b"root-keys\n").unwrap();
        let home = t.0.join("home");
        std::fs::create_dir(&home).unwrap();
        std::os::unix::fs::symlink(&victim, home.join(".ssh")).unwrap();
        let path = home.join(".ssh").join("authorized_keys");
        let k = keys();
        let e = edit(&path, |c| add_block(c, "a-b", &k).unwrap()).unwrap_err();
        assert!(e.contains("symbolic link"), "{e}");
        assert_eq!(std::fs::read(victim.join("authorized_keys")).unwrap(), b"root-keys\n");
        std::fs::remove_file(victim.join("authorized_keys")).unwrap();
        assert!(edit(&path, |c| add_block(c, "a-b", &k).unwrap()).is_err());
        assert_eq!(std::fs::read_dir(&victim).unwrap().count(), 0, "something was created behind the link");
    }

    #[test]
    fn edit_keeps_a_change_made_while_it_worked() {
        // F11: someone replaces the file between our read and our rename: their version is the
        // one we edit, not the one we read first.
        let t = TmpDir::new("race");
        let path = t.0.join("authorized_keys");
        std::fs::write(&path, b"A\n").unwrap();
        let k = keys();
        let calls = std::cell::Cell::new(0);
        let other = t.0.join("other");
        edit(&path, |c| {
            if calls.get() == 0 {
                std::fs::write(&other, b"A\nB\n").unwrap();
                std::fs::rename(&other, &path).unwrap();
            }
            calls.set(calls.get() + 1);
            add_block(c, "a-b", &k).unwrap()
        })
        .unwrap();
        let text = String::from_utf8(std::fs::read(&path).unwrap()).unwrap();
        assert!(text.starts_with("A\nB\n# linbit-tunl-begin a-b\n"), "{text:?}");
    }

    #[test]
    fn concurrent_edits_lose_nothing() {
        // F11: two sessions on one host edit the same file at once; every block survives.
        let t = TmpDir::new("conc");
        let path = t.0.join("authorized_keys");
        std::fs::write(&path, b"# top\n").unwrap();
        let k = keys();
        std::thread::scope(|s| {
            for w in 0..4 {
                let (path, k) = (&path, &k);
                s.spawn(move || {
                    for i in 0..15 {
                        let id = format!("w{w}-n{i}");
                        edit(path, |c| add_block(c, &id, k).unwrap()).unwrap();
                    }
                });
            }
        });
        let text = String::from_utf8(std::fs::read(&path).unwrap()).unwrap();
        assert_eq!(text.matches("# linbit-tunl-begin ").count(), 60, "lost updates:\n{text}");
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

/// Properties over a random existing authorized_keys and random keys (issue 13): the bytes that
/// are not ours come back unchanged, ours go, whatever the customer's file looked like.
#[cfg(test)]
mod props {
    use super::*;
    use proptest::prelude::*;

    const ID: &str = "swift-fox-jumps-barrel";

    fn key(seed: [u8; 32], comment: &str) -> String {
        let k = ssh_key::PublicKey::from(ssh_key::public::KeyData::Ed25519(ssh_key::public::Ed25519PublicKey(seed)));
        let text = format!("{} {comment}", k.to_openssh().unwrap());
        validate_keys(text.as_bytes()).unwrap().remove(0)
    }

    /// A customer's file: their keys with and without options, comments, blank and CRLF lines,
    /// markers of other sessions, binary junk, and maybe no final newline.
    fn customer_file() -> impl Strategy<Value = Vec<u8>> {
        let line = prop_oneof![
            any::<[u8; 32]>().prop_map(|s| key(s, "customer@host").into_bytes()),
            any::<[u8; 32]>().prop_map(|s| format!("from=\"10.0.0.1\",no-pty {}", key(s, "c")).into_bytes()),
            "#[ -~]{0,30}".prop_map(String::into_bytes),
            "# linbit-tunl-(begin|end) [a-z-]{1,20}".prop_map(String::into_bytes),
            Just(Vec::new()),
            prop::collection::vec(any::<u8>().prop_filter("no newline", |b| *b != b'\n'), 0..40),
        ];
        (prop::collection::vec((line, any::<bool>()), 0..8), any::<bool>()).prop_map(|(ls, last_nl)| {
            let mut out = Vec::new();
            for (l, crlf) in ls {
                out.extend_from_slice(&l);
                out.extend_from_slice(if crlf { b"\r\n" } else { b"\n" });
            }
            if !last_nl && out.ends_with(b"\n") {
                out.pop();
            }
            out
        })
    }

    proptest! {
        #[test]
        fn ours_go_theirs_stay(
            file in customer_file(),
            seeds in prop::collection::vec(any::<[u8; 32]>(), 1..4),
            loopback in any::<bool>(),
            until in 0u64..4_000_000_000,
        ) {
            let keys: Vec<String> = seeds.iter().map(|s| key(*s, "eng@linbit.com")).collect();
            // A file that already holds our session's keys or markers is another property's business.
            prop_assume!(remove_session(&file, ID, &keys) == file);
            let opts = KeyOptions::for_target(Some("SSH-2.0-OpenSSH_9.2p1"), loopback);
            let lines: Vec<String> = keys.iter().map(|k| opts.line(k, until)).collect();
            let added = add_block(&file, ID, &lines).unwrap();
            prop_assert!(added.starts_with(&file));
            prop_assert_eq!(lines_left(&added, &keys).len(), keys.len());
            let mut want = file.clone();
            if !file.is_empty() && !file.ends_with(b"\n") {
                want.push(b'\n');
            }
            prop_assert_eq!(&remove_session(&added, ID, &keys), &want);
            prop_assert_eq!(&remove_blocks(&added, Some(ID)), &want);
            prop_assert_eq!(&remove_blocks(&added, Some("other-session-id")), &added);
        }

        /// Whatever is in the file, removing a session leaves none of its keys and keeps every
        /// other line in order.
        #[test]
        fn removal_leaves_no_key(
            file in customer_file(),
            seed in any::<[u8; 32]>(),
            at in any::<prop::sample::Index>(),
        ) {
            let keys = vec![key(seed, "eng@linbit.com")];
            let stray = format!("{}\n", keys[0]);
            let mut mixed = file.clone();
            let i = lines(&file).iter().take(at.index(lines(&file).len() + 1)).map(|l| l.len()).sum::<usize>();
            mixed.splice(i..i, stray.bytes());
            let out = remove_session(&mixed, ID, &keys);
            prop_assert!(lines_left(&out, &keys).is_empty());
            let theirs: Vec<&[u8]> = lines(&mixed).into_iter().filter(|l| !carries_one_of(l, &keys)).collect();
            let kept: Vec<&[u8]> = lines(&out);
            let bare_eq = theirs.len() == kept.len() && theirs.iter().zip(&kept).all(|(a, b)| bare(a) == bare(b));
            prop_assert!(bare_eq, "{:?} -> {:?}", String::from_utf8_lossy(&mixed), String::from_utf8_lossy(&out));
        }

        /// What the fuzz target `authkeys` checks on any file (ours mixed into theirs, blocks
        /// damaged): removing a session leaves none of its keys or markers, drops nothing else but
        /// key lines we could have written inside its block, and a second removal changes nothing.
        #[test]
        fn removal_drops_only_ours(
            parts in prop::collection::vec(prop_oneof![
                3 => customer_file(),
                1 => Just(format!("{BEGIN}{ID}\n").into_bytes()),
                1 => Just(format!("{END}{ID}\r\n").into_bytes()),
                1 => (any::<[u8; 32]>(), any::<bool>()).prop_map(|(s, opt)| {
                    let k = key(s, "x");
                    if opt { format!("from=\"127.0.0.1,::1\",expiry-time=\"20261126Z\" {k}\n") } else { format!("{k}\n") }
                        .into_bytes()
                }),
            ], 0..8),
            seed in any::<[u8; 32]>(),
        ) {
            let mut file: Vec<u8> = Vec::new();
            for p in parts {
                if !file.is_empty() && !file.ends_with(b"\n") {
                    file.push(b'\n');
                }
                file.extend(p);
            }
            let keys = vec![key(seed, "eng@linbit.com")];
            let out = remove_session(&file, ID, &keys);
            prop_assert!(lines_left(&out, &keys).is_empty());
            prop_assert!(!lines(&out).iter().any(|l| marker(l, BEGIN) == Some(ID) || marker(l, END) == Some(ID)));
            prop_assert_eq!(&remove_session(&out, ID, &keys), &out);
            let has_block = lines(&file).iter().any(|l| marker(l, BEGIN) == Some(ID));
            let (ins, outs) = (lines(&file), lines(&out));
            let mut j = 0;
            for l in &ins {
                let kept = j < outs.len()
                    && (outs[j] == *l || (j + 1 == outs.len() && l.strip_suffix(b"\n") == Some(outs[j])));
                if kept {
                    j += 1;
                } else {
                    let ours = marker(l, BEGIN) == Some(ID)
                        || marker(l, END) == Some(ID)
                        || carries_one_of(l, &keys)
                        || (has_block && std::str::from_utf8(bare(l)).is_ok_and(|s| our_key_part(s).is_some()));
                    prop_assert!(ours, "dropped {:?} of {:?}", String::from_utf8_lossy(l), String::from_utf8_lossy(&file));
                }
            }
            prop_assert_eq!(j, outs.len());
        }

        #[test]
        fn validate_keys_never_panics(text in prop::collection::vec(any::<u8>(), 0..300)) {
            if let Ok(keys) = validate_keys(&text) {
                // Normalised once, normalised for good.
                prop_assert_eq!(validate_keys(keys.join("\n").as_bytes()), Ok(keys));
            }
        }
    }
}
