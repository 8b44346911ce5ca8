//! The shared terminal session end to end, driven from the customer's side as a person would: the
//! launcher runs in a terminal (an outer tmux), keys are typed into it, the screen is read back, and
//! the test relay plays support.

mod common;

use common::*;
use tunl_relay::{chat_line, close_line, k_line, line_field, note_line, unb64};

fn relay() -> Relay {
    Relay::start(RelayOpts::default()).expect("test relay")
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    find(hay, needle).is_some()
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    if needle.is_empty() {
        return Some(0);
    }
    let first = needle[0];
    let mut i = 0;
    while i + needle.len() <= hay.len() {
        match hay[i..hay.len() - needle.len() + 1].iter().position(|&b| b == first) {
            None => return None,
            Some(off) => {
                let at = i + off;
                if &hay[at..at + needle.len()] == needle {
                    return Some(at);
                }
                i = at + 1;
            }
        }
    }
    None
}

#[test]
fn typing_and_support_keys_round_trip() {
    let relay = relay();
    let id = unique_id("share");
    let (c, mut conn) = Customer::connect(&relay, &id, &[], &[]);
    // After WELCOME: SIZE and SNAP (and STATE), with the shell pane's size.
    let size = conn.wait_verb(secs(10), "SIZE").unwrap_or_else(|| panic!("no SIZE: {:?}", conn.lines()));
    let f: Vec<&str> = size.split(' ').collect();
    assert_eq!(f.len(), 3, "{size}");
    let (w, h): (u16, u16) = (f[1].parse().unwrap(), f[2].parse().unwrap());
    assert_eq!(w, 160, "{size}");
    assert!(h > 20 && h < 48, "{size}");
    let snap = conn.wait_verb(secs(10), "SNAP").unwrap_or_else(|| panic!("no SNAP: {:?}", conn.lines()));
    assert_eq!(line_field(&snap, "size"), Some(format!("{w}x{h}").as_str()), "{snap}");
    let lines = conn.lines();
    let pos = |v: &str| lines.iter().position(|l| l.split(' ').next() == Some(v));
    assert!(pos("SIZE").is_some() && pos("SNAP").is_some() && pos("STATE").is_some(), "{lines:?}");

    // The customer types; the command runs and its output reaches support.
    c.type_line("echo MARKER-$((6*7))");
    assert!(
        conn.wait_output(secs(10), |o| contains(o, b"MARKER-42")),
        "customer's output never reached the relay:\n{}",
        c.diag()
    );
    assert!(c.wait_screen(secs(5), |s| s.contains("MARKER-42")));

    // Support types; it runs in the customer's shell, in plain sight, and comes back in O.
    conn.send(&k_line(b"echo FROM-$((1+1))-SUPPORT\r"));
    assert!(c.wait_screen(secs(10), |s| s.contains("FROM-2-SUPPORT")), "{}", c.diag());
    assert!(conn.wait_output(secs(10), |o| contains(o, b"FROM-2-SUPPORT")));

    // A full-screen program driven by support: its screen travels in O, and :q! ends it.
    conn.send(&k_line(b"vi -c 'set nocompatible' scratch-file-XYZ\r"));
    assert!(
        c.wait_screen(secs(10), |s| s.contains("scratch-file-XYZ") && s.contains('~')),
        "vi did not start:\n{}",
        c.diag()
    );
    assert!(conn.wait_output(secs(10), |o| contains(o, b"scratch-file-XYZ") && contains(o, b"~")));
    conn.send(&k_line(b"\x1b:q!\r"));
    // vi discards typeahead when it quits: the next command waits for the shell's screen to return.
    assert!(c.wait_screen(secs(10), |s| !s.lines().any(|l| l.trim_end() == "~")), "vi did not quit:\n{}", c.diag());
    conn.send(&k_line(b"echo VI-GONE-$((2*3))\r"));
    assert!(conn.wait_output(secs(10), |o| contains(o, b"VI-GONE-6")), "{}", c.diag());
    assert!(c.wait_screen(secs(5), |s| s.contains("VI-GONE-6") && !s.contains("scratch-file-XYZ\" [New")));
}
