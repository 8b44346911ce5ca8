//! The authorized_keys editor over a random existing file and random keys (issue 13): the bytes
//! that are not ours come back unchanged, ours are gone after removal, nothing else is dropped,
//! and what we add stays one key a line.
//!
//! Input: a flags byte, four bytes of expiry time, one to three 32-byte ed25519 keys, a length byte
//! and that much key text (through `validate_keys`, whose accepted keys join the others), then the
//! customer's file.
#![no_main]
use libfuzzer_sys::arbitrary::{Result, Unstructured};
use libfuzzer_sys::fuzz_target;
use linbit_tunl_fuzz::authkeys::{
    Expiry, KeyOptions, add_block, lines_left, remove_blocks, remove_session, validate_keys,
};

const ID: &str = "swift-fox-jumps-barrel";
const BEGIN: &str = "# linbit-tunl-begin ";
const END: &str = "# linbit-tunl-end ";

fn ed25519(seed: [u8; 32]) -> String {
    let k = ssh_key::PublicKey::from(ssh_key::public::KeyData::Ed25519(ssh_key::public::Ed25519PublicKey(seed)));
    k.to_openssh().unwrap()
}

fn split(content: &[u8]) -> Vec<&[u8]> {
    content.split_inclusive(|&b| b == b'\n').collect()
}

fn bare(line: &[u8]) -> &[u8] {
    let l = line.strip_suffix(b"\n").unwrap_or(line);
    l.strip_suffix(b"\r").unwrap_or(l)
}

fn is_marker_of(line: &[u8], id: Option<&str>) -> bool {
    let l = bare(line);
    [BEGIN, END].iter().any(|m| {
        l.strip_prefix(m.as_bytes()).is_some_and(|rest| match id {
            Some(id) => rest == id.as_bytes(),
            None => {
                !rest.is_empty()
                    && rest.len() <= 128
                    && rest.iter().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-')
            }
        })
    })
}

/// A line the editor may take as its own: a normalised key line, after nothing but our own options
/// (`from="127.0.0.1,::1"`, `expiry-time="..."`).
fn looks_like_ours(line: &[u8]) -> bool {
    let Ok(l) = std::str::from_utf8(bare(line)) else { return false };
    let key = match l.split_once(' ') {
        Some((opts, rest)) if opts.contains('=') => {
            let ok =
                opts.split(',').all(|o| o == "from=\"127.0.0.1" || o == "::1\"" || o.starts_with("expiry-time=\""));
            if !ok {
                return false;
            }
            rest
        }
        _ => l,
    };
    validate_keys(key.as_bytes()).is_ok_and(|k| k == [key])
}

/// `out`'s lines are `input`'s lines in order with some left out (the last one may have lost its
/// newline when a block at the end went), and every line left out satisfies `ours`.
fn only_ours_dropped(input: &[u8], out: &[u8], ours: impl Fn(&[u8]) -> bool) {
    let (ins, outs) = (split(input), split(out));
    let mut j = 0;
    for l in &ins {
        if j < outs.len() && (outs[j] == *l || (j + 1 == outs.len() && l.strip_suffix(b"\n") == Some(outs[j]))) {
            j += 1;
        } else {
            assert!(ours(l), "dropped a line that is not ours: {:?}", String::from_utf8_lossy(l));
        }
    }
    assert_eq!(j, outs.len(), "lines appeared: {:?}", String::from_utf8_lossy(out));
}

fn run(u: &mut Unstructured) -> Result<()> {
    let flags: u8 = u.arbitrary()?;
    let until: u32 = u.arbitrary()?;
    let mut keys = Vec::new();
    for _ in 0..=(flags % 3) {
        keys.push(format!("{} eng@linbit.com", ed25519(u.arbitrary()?)));
    }
    let len: u8 = u.arbitrary()?;
    let text = u.bytes(usize::from(len).min(u.len()))?;
    if let Ok(more) = validate_keys(text) {
        // Normalised once, normalised for good.
        assert_eq!(validate_keys(more.join("\n").as_bytes()).as_ref(), Ok(&more));
        keys.extend(more);
    }
    let file = u.bytes(u.len())?;
    let expiry = [Expiry::None, Expiry::Local, Expiry::Utc][usize::from(flags >> 2) % 3];
    let opts = KeyOptions { from_loopback: flags & 0x40 != 0, expiry };
    let lines: Vec<String> = keys.iter().map(|k| opts.line(k, u64::from(until))).collect();

    // Removing our session from whatever file: none of its keys or markers left, nothing else gone.
    let out = remove_session(file, ID, &keys);
    assert!(lines_left(&out, &keys).is_empty());
    assert!(!split(&out).iter().any(|l| is_marker_of(l, Some(ID))));
    // Outside a block of ours only this session's keys go; inside one, any key line we could have written.
    let has_block = split(file).iter().any(|l| bare(l) == format!("{BEGIN}{ID}").as_bytes());
    only_ours_dropped(file, &out, |l| {
        is_marker_of(l, Some(ID)) || !lines_left(l, &keys).is_empty() || (has_block && looks_like_ours(l))
    });
    assert_eq!(remove_session(&out, ID, &keys), out);
    // The stale sweep drops only markers and our key lines too.
    only_ours_dropped(file, &remove_blocks(file, None), |l| is_marker_of(l, None) || looks_like_ours(l));

    // A file that holds nothing of this session: add, then remove gives back every byte.
    if out == file {
        let added = add_block(file, ID, &lines).unwrap();
        assert!(added.starts_with(file) && added.ends_with(b"\n"));
        assert_eq!(lines_left(&added, &keys).len(), lines.len());
        let mut want = file.to_vec();
        if !file.is_empty() && !file.ends_with(b"\n") {
            want.push(b'\n');
        }
        // Our block is its own lines: the customer's lines are untouched, each of ours is one key.
        let block = &added[want.len()..];
        let mut expect = format!("{BEGIN}{ID}\n");
        for l in &lines {
            expect.push_str(l);
            expect.push('\n');
        }
        expect.push_str(&format!("{END}{ID}\n"));
        assert_eq!(block, expect.as_bytes());
        assert_eq!(remove_session(&added, ID, &keys), want);
        assert_eq!(remove_blocks(&added, Some(ID)), want);
        if remove_blocks(file, Some("other-session-id")) == file {
            assert_eq!(remove_blocks(&added, Some("other-session-id")), added);
        }
    }
    Ok(())
}

fuzz_target!(|data: &[u8]| {
    let _ = run(&mut Unstructured::new(data));
});
