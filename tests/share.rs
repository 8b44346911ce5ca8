//! The shared terminal session end to end, driven from the customer's side as a person would: the
//! launcher runs in a terminal (an outer tmux), keys are typed into it, the screen is read back, and
//! the test relay plays support.

mod common;

use common::*;
use relay_double::json::{J, parse_json};
use relay_double::{chat_line, close_line, k_line, line_field, note_line, unb64};

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
    assert!(c.wait_screen(secs(15), |s| s.contains("MARKER-42")));

    // Support types; it runs in the customer's shell, in plain sight, and comes back in O.
    conn.send(&k_line(b"echo FROM-$((1+1))-SUPPORT\r"));
    assert!(c.wait_screen(secs(10), |s| s.contains("FROM-2-SUPPORT")), "{}", c.diag());
    assert!(conn.wait_output(secs(10), |o| contains(o, b"FROM-2-SUPPORT")));

    // A full-screen program driven by support: its screen travels in O, and :q! ends it.
    // (The text is typed by vi itself, so the check does not race vi's start-up messages.)
    conn.send(&k_line(b"vi -c 'set nocompatible' -c 'normal iVI-TEXT-$((3*3))' scratch-file-XYZ\r"));
    assert!(
        c.wait_screen(secs(10), |s| s.contains("VI-TEXT-$((3*3))") && s.contains('~')),
        "vi did not start:\n{}",
        c.diag()
    );
    assert!(conn.wait_output(secs(10), |o| contains(o, b"VI-TEXT-$((3*3))") && contains(o, b"~")));
    conn.send(&k_line(b"\x1b:q!\r"));
    // vi discards typeahead when it quits: the next command waits for the shell's screen to return.
    assert!(c.wait_screen(secs(10), |s| !s.lines().any(|l| l.trim_end() == "~")), "vi did not quit:\n{}", c.diag());
    conn.send(&k_line(b"echo VI-GONE-$((2*3))\r"));
    assert!(conn.wait_output(secs(10), |o| contains(o, b"VI-GONE-6")), "{}", c.diag());
    assert!(c.wait_screen(secs(15), |s| s.contains("VI-GONE-6") && !s.contains("scratch-file-XYZ\" [New")));
}

/// Review finding F18: on every tmux (`just compat` runs this with 1.8 and 2.7, whose parser read
/// `\'` outside quotes literally) support's keystrokes are typed into the shell, never read as tmux
/// commands, whatever quotes, `;`, `#` or `run-shell` they hold.
#[test]
fn support_keys_never_become_tmux_commands() {
    let relay = relay();
    let id = unique_id("keysafe");
    let (c, mut conn) = Customer::connect(&relay, &id, &[], &[]);
    let s = c.scratch.path().to_path_buf();
    let got = s.join("got");
    let mark = |n: usize| s.join(format!("ran-{n}"));
    let attacks: Vec<String> = [
        "a' ; run-shell 'touch {}' ; '",
        "a'\\'' ; run-shell '\\''touch {}'\\'' #",
        "x \\; run-shell \"touch {}\" \\;",
        "y; run-shell -b touch {};",
        "z\" ; run-shell \"touch {}\" # #{pane_id} '",
    ]
    .iter()
    .enumerate()
    .map(|(i, a)| a.replace("{}", &mark(i).display().to_string()))
    .collect();
    conn.send(&k_line(format!("cat > {}\r", got.display()).as_bytes()));
    for a in &attacks {
        conn.send(&k_line(format!("{a}\r").as_bytes()));
    }
    conn.send(&k_line(b"\x04"));
    conn.send(&k_line(b"echo TYPED-$((4*4))\r"));
    assert!(c.wait_screen(secs(15), |s| s.contains("TYPED-16")), "{}", c.diag());
    let want: String = attacks.iter().map(|a| format!("{a}\n")).collect();
    assert_eq!(std::fs::read_to_string(&got).unwrap_or_default(), want, "{}", c.diag());
    for i in 0..attacks.len() {
        assert!(!mark(i).exists(), "support's keystrokes ran a tmux command (payload {i})");
    }
    c.keys(&["C-b", "Q"]);
    assert_eq!(c.wait_status(secs(20)), Some(0), "{}", c.diag());
}

/// Wait until the line `verb` with `field=value` arrives.
fn wait_field(conn: &mut Conn, verb: &str, field: &str, value: &str) -> Option<String> {
    conn.wait_for(secs(10), |l| l.split(' ').next() == Some(verb) && line_field(l, field) == Some(value))
}

/// A round trip through the daemon's loop: everything the relay sent before has been handled.
fn sync(conn: &mut Conn, n: u32) {
    conn.send(&format!("PING {n}"));
    let want = format!("PONG {n}");
    assert!(conn.wait_for(secs(10), |l| l == want).is_some(), "no {want}: {:?}", conn.lines());
}

/// Holds for the whole period (a bounded check that something does NOT happen).
fn stays(for_ms: u64, mut f: impl FnMut() -> bool) -> bool {
    let end = std::time::Instant::now() + std::time::Duration::from_millis(for_ms);
    while std::time::Instant::now() < end {
        if !f() {
            return false;
        }
        std::thread::sleep(std::time::Duration::from_millis(25));
    }
    true
}

#[test]
fn ten_megabytes_arrive_complete_and_in_order() {
    let relay = relay();
    let id = unique_id("bulk");
    let (c, mut conn) = Customer::connect(&relay, &id, &[], &[]);
    const N: u32 = 1_300_000;
    // What the program prints, as the terminal delivers it (the pty turns \n into \r\n).
    let mut expected = Vec::with_capacity(11 << 20);
    for n in 1..=N {
        expected.extend_from_slice(n.to_string().as_bytes());
        expected.extend_from_slice(b"\r\n");
    }
    assert!(expected.len() > 10_000_000);
    c.type_line(&format!("seq 1 {N}; echo BULK-$((40+2))-DONE"));
    let tail = format!("\r\n{}\r\n{}\r\n", N - 1, N);
    let done = conn.wait_output(secs(150), |o| contains(o, b"BULK-42-DONE"));
    let out = conn.output();
    assert!(done, "output incomplete after 150 s: {} of {} bytes\n{}", out.len(), expected.len(), c.diag());
    assert!(!conn.saw_bad_output());
    let start = find(&out, &expected[..64]).expect("the first lines of seq are not in the output");
    let got = &out[start..(start + expected.len()).min(out.len())];
    assert_eq!(got.len(), expected.len(), "output cut short");
    if got != &expected[..] {
        let at = got.iter().zip(expected.iter()).position(|(a, b)| a != b).unwrap();
        panic!(
            "output differs at byte {at}: got {:?}, want {:?}",
            String::from_utf8_lossy(&got[at.saturating_sub(40)..(at + 40).min(got.len())]),
            String::from_utf8_lossy(&expected[at.saturating_sub(40)..(at + 40).min(expected.len())])
        );
    }
    assert!(contains(&out, tail.as_bytes()));
    // Nothing duplicated: the first line appears exactly once as the start of the sequence.
    assert!(find(&out[start + 1..], &expected[..64]).is_none(), "the sequence was sent twice");
    assert!(c.wait_screen(secs(10), |s| s.contains("BULK-42-DONE")));
}

#[test]
fn chat_both_ways_and_status_rows() {
    let relay = relay();
    let id = unique_id("chat");
    let (c, mut conn) = Customer::connect(&relay, &id, &[], &[]);
    c.type_line("echo KEEP-$((5+5))");
    assert!(c.wait_screen(secs(10), |s| s.contains("KEEP-10")), "{}", c.diag());
    assert_eq!(c.focus(), "shell");
    c.keys(&["C-b", "c"]);
    assert!(poll_until(secs(15), || c.focus() == "chat"), "C-b c did not focus the chat");
    let text = "hello from the customer, grüße";
    c.type_line(text);
    let line = conn.wait_verb(secs(10), "CHAT").unwrap_or_else(|| panic!("no CHAT: {:?}\n{}", conn.lines(), c.diag()));
    let payload = line.split(' ').nth(1).unwrap();
    assert_eq!(unb64(payload).map(|b| String::from_utf8(b).unwrap()), Some(text.to_string()), "{line}");
    assert!(c.wait_screen(secs(15), |s| s.contains(&format!("customer> {text}"))));
    // What the customer typed in the chat did not go to the shell.
    assert!(!conn.output_text().contains("grüße"));

    // Support's chat with escape sequences: shown as visible text, nothing obeyed.
    conn.send(&chat_line("eve\x1b[31m", "\x1b[2J\x1b]52;c;aGk=\x07evil"));
    assert!(
        c.wait_screen(secs(10), |s| s.contains("support (eve^[[31m): ^[[2J^[]52;c;aGk=^Gevil")),
        "support chat not shown neutralised:\n{}",
        c.diag()
    );
    let s = c.screen();
    assert!(s.contains("KEEP-10") && has_labels(&s, "", ""), "the screen was cleared:\n{s}");
    assert!(s.contains(&format!("customer> {text}")), "the chat history was cleared:\n{s}");
    // No OSC 52 reached either tmux's clipboard.
    assert_eq!(c.inner(&["list-buffers"]), "", "OSC 52 set a buffer in the session's tmux");
    assert_eq!(c.outer(&["list-buffers"]), "", "OSC 52 reached the customer's terminal");

    // The pinned status rows: viewer count and support's note, also neutralised.
    conn.send("VIEWERS 3");
    conn.send(&note_line("reading the logs\x1b[5m now"));
    assert!(
        c.wait_screen(secs(10), |s| s.contains("viewers: 3") && s.contains("reading the logs^[[5m now")),
        "status rows not updated:\n{}",
        c.diag()
    );
    assert!(c.wait_screen(secs(15), |s| s.contains("viewers 3")), "status bar not updated:\n{}", c.screen());
    // The note is pinned: more chat lines do not scroll it away.
    for i in 0..12 {
        conn.send(&chat_line("eve", &format!("line {i}")));
    }
    assert!(c.wait_screen(secs(10), |s| s.contains("support (eve): line 11")));
    let s = c.screen();
    assert!(s.contains("reading the logs") && s.contains("viewers: 3"), "status rows scrolled away:\n{s}");
    // An empty note clears the row.
    conn.send(&note_line(""));
    assert!(c.wait_screen(secs(10), |s| !s.contains("reading the logs")), "{}", c.screen());
}

#[test]
fn restricted_mode_drops_support_keys() {
    let relay = relay();
    let id = unique_id("watch");
    let (c, mut conn) = Customer::connect(&relay, &id, &["--restricted"], &[]);
    assert_eq!(conn.hello_field("mode"), Some("restricted"));
    let st = conn.wait_verb(secs(10), "STATE").unwrap();
    assert_eq!(line_field(&st, "mode"), Some("restricted"), "{st}");
    assert_eq!(line_field(&st, "tunnel"), Some("off"), "{st}");
    assert!(
        c.wait_screen(secs(15), |s| s.contains("[watch-only]") && s.contains("mode: restricted")),
        "{}",
        c.screen()
    );
    conn.send(&k_line(b"echo RESTRICTED-$((3*3))\r"));
    sync(&mut conn, 1);
    assert!(c.ssh_log().contains("dropped K restricted"), "{}", c.ssh_log());
    // The customer can still type, and what they type is shared; support's line never ran.
    c.type_line("echo OWN-$((4*4))");
    assert!(conn.wait_output(secs(10), |o| contains(o, b"OWN-16")), "{}", c.diag());
    assert!(!c.screen().contains("RESTRICTED"), "{}", c.screen());
    assert!(!conn.output_text().contains("RESTRICTED"));
}

#[test]
fn brb_pauses_support_keys_until_back() {
    let relay = relay();
    let id = unique_id("brb");
    let (c, mut conn) = Customer::connect(&relay, &id, &[], &[]);
    assert!(wait_field(&mut conn, "STATE", "brb", "0").is_some());
    c.keys(&["C-b", "c"]);
    assert!(poll_until(secs(15), || c.focus() == "chat"));
    c.type_line("/brb");
    assert!(wait_field(&mut conn, "STATE", "brb", "1").is_some(), "no STATE brb=1: {:?}", conn.lines());
    assert!(c.wait_screen(secs(15), |s| s.contains("BRB")), "{}", c.screen());
    // A slash command is not chat.
    assert!(!conn.lines().iter().any(|l| l.starts_with("CHAT ")), "{:?}", conn.lines());
    conn.send(&k_line(b"echo PAUSED-$((7*7))\r"));
    sync(&mut conn, 1);
    assert!(c.ssh_log().contains("dropped K brb"), "{}", c.ssh_log());
    c.type_line("/back");
    assert!(wait_field(&mut conn, "STATE", "brb", "0").is_some(), "no STATE brb=0: {:?}", conn.lines());
    conn.send(&k_line(b"echo RESUMED-$((8*8))\r"));
    assert!(conn.wait_output(secs(10), |o| contains(o, b"RESUMED-64")), "{}", c.diag());
    // Had the paused keys been delivered late, they would have run before these.
    assert!(!conn.output_text().contains("PAUSED"));
    assert!(!c.screen().contains("PAUSED-49"));
}

fn role(c: &Customer) -> String {
    c.focus()
}

/// The pane labels `[SHELL]SHELL_TAIL` and `[CHAT]CHAT_TAIL` are on screen (tmux >= 2.3 draws them
/// in the pane borders; before, there are none to check).
fn has_labels(s: &str, shell_tail: &str, chat_tail: &str) -> bool {
    client_tmux_version() < (2, 3)
        || (s.contains(&format!("[SHELL]{shell_tail}")) && s.contains(&format!("[CHAT]{chat_tail}")))
}

/// The shell pane is zoomed: tmux says so from 2.0 (`window_zoomed_flag`); 1.8 only shows it (the
/// chat prompt is gone from the screen).
fn zoomed(c: &Customer) -> bool {
    if client_tmux_version() >= (2, 0) {
        c.inner_fmt("#{window_zoomed_flag}") == "1"
    } else {
        !c.screen().contains("customer>")
    }
}

fn chat_height(c: &Customer) -> String {
    c.inner(&["display-message", "-p", "-t", "tunl:0.1", "#{pane_height}"]).trim().to_string()
}

/// Close a menu or popup and wait until `gone` is no longer on the screen. (Before tmux 3.0 menus
/// and the cheat sheet are status-line messages that go by themselves; a key is not needed.)
fn close_menu(c: &Customer, gone: &str) {
    if client_tmux_version() >= (3, 0) {
        c.keys(&["Escape"]);
    }
    assert!(c.wait_screen(secs(15), |s| !s.contains(gone)), "menu with {gone:?} did not close:\n{}", c.screen());
}

#[test]
fn hotkeys_with_the_default_prefix() {
    let relay = relay();
    let id = unique_id("keys");
    let (c, mut conn) = Customer::connect(&relay, &id, &[], &[]);
    assert!(wait_field(&mut conn, "STATE", "tunnel", "confirm").is_some());
    // Focus: c and C-c toggle between shell and chat.
    assert_eq!(role(&c), "shell");
    c.keys(&["C-b", "c"]);
    assert!(poll_until(secs(15), || role(&c) == "chat"));
    c.keys(&["C-b", "C-c"]);
    assert!(poll_until(secs(15), || role(&c) == "shell"));
    // Zoom.
    c.keys(&["C-b", "z"]);
    assert!(poll_until(secs(15), || zoomed(&c)));
    assert!(c.wait_screen(secs(15), |s| !s.contains("customer>")), "{}", c.screen());
    c.keys(&["C-b", "z"]);
    assert!(poll_until(secs(15), || !zoomed(&c)));
    // The customer messes up the layout; L puts it back (and so does C-l).
    assert_eq!(chat_height(&c), "8");
    c.inner(&["resize-pane", "-t", "tunl:0.1", "-y", "25"]);
    assert!(poll_until(secs(15), || chat_height(&c) == "25"));
    c.keys(&["C-b", "L"]);
    assert!(poll_until(secs(15), || chat_height(&c) == "8"), "C-b L: chat height {}", chat_height(&c));
    // L also asks the daemon to re-apply the layout, a moment later: resize until it sticks.
    assert!(poll_until(secs(15), || {
        c.inner(&["resize-pane", "-t", "tunl:0.1", "-y", "3"]);
        stays(300, || chat_height(&c) == "3")
    }));
    c.keys(&["C-b", "C-l"]);
    assert!(poll_until(secs(15), || chat_height(&c) == "8"), "C-b C-l: chat height {}", chat_height(&c));
    // The cheat sheet, with the active prefix.
    c.keys(&["C-b", "?"]);
    let (sheet, gone) = if client_tmux_version() >= (3, 0) {
        (&["This cheat sheet", "Ctrl-b Q", "/brb"][..], "This cheat sheet")
    } else {
        (&["Ctrl-b then: Q end", "c chat/shell", "L layout"][..], "Ctrl-b then: Q end")
    };
    assert!(c.wait_screen(secs(15), |s| sheet.iter().all(|w| s.contains(w))), "no cheat sheet:\n{}", c.screen());
    close_menu(&c, gone);
    // The menu, from F1 and from C-b Enter; its entries act. Before 3.0 it is one line of 80
    // columns: a status-line message (2.1 to 2.9, the next key chooses) or a prompt (1.8, the key
    // and Enter).
    let (entries, first) = if client_tmux_version() >= (3, 0) {
        (
            &["Go to chat", "Reset layout", "Grant tunnel", "Revoke tunnel", "Block tunnel", "End session for good"][..],
            "Go to chat",
        )
    } else {
        (&["c chat | L layout | u grant | U revoke | X block | Q end"][..], "c chat | L layout")
    };
    for keys in [&["F1"][..], &["C-b", "Enter"][..]] {
        c.keys(keys);
        assert!(
            c.wait_screen(secs(15), |s| entries.iter().all(|e| s.contains(e))),
            "{keys:?}: no menu:\n{}",
            c.screen()
        );
        if client_tmux_version() < (2, 1) {
            c.keys(&["Escape"]); // the prompt stays until answered
        }
        close_menu(&c, first);
    }
    c.keys(&["F1"]);
    assert!(c.wait_screen(secs(15), |s| s.contains(first)));
    if client_tmux_version() < (2, 1) {
        c.keys(&["c", "Enter"]);
    } else {
        c.keys(&["c"]);
    }
    assert!(poll_until(secs(15), || role(&c) == "chat"), "menu entry c did not move to the chat");
    c.keys(&["C-b", "c"]);
    assert!(poll_until(secs(15), || role(&c) == "shell"));
    // The tunnel state keys.
    c.keys(&["C-b", "u"]);
    assert!(wait_field(&mut conn, "STATE", "tunnel", "allowed").is_some(), "C-b u: {:?}", conn.lines());
    c.keys(&["C-b", "U"]);
    assert!(wait_field(&mut conn, "STATE", "tunnel", "confirm").is_some(), "C-b U: {:?}", conn.lines());
    c.keys(&["C-b", "X"]);
    assert!(wait_field(&mut conn, "STATE", "tunnel", "blocked").is_some(), "C-b X: {:?}", conn.lines());
    assert!(c.wait_screen(secs(15), |s| s.contains("tunnel blocked")), "{}", c.screen());
    c.keys(&["C-b", "u"]);
    assert!(wait_field(&mut conn, "STATE", "tunnel", "confirm").is_some(), "C-b u unblocks: {:?}", conn.lines());
    // A dead shell: Enter respawns it, and the new shell is shared. On 3.2/3.2a the pane is never
    // dead (a dead pane crashed that tmux): the keeper says so on its last line instead.
    let v = client_tmux_version();
    let kept = ((3, 2)..(3, 3)).contains(&v);
    let ended = |c: &Customer| {
        if kept {
            let pane = c.inner(&["capture-pane", "-p", "-t", "tunl:0.0"]);
            pane.lines().rev().find(|l| !l.trim().is_empty()).is_some_and(|l| l.contains("Shell ended: press Enter"))
        } else {
            c.inner(&["display-message", "-p", "-t", "tunl:0.0", "#{pane_dead}"]).trim() == "1"
        }
    };
    c.type_line("exit");
    assert!(poll_until(secs(15), || ended(&c)), "the shell did not end:\n{}", c.diag());
    // (tmux 3.3 draws the "Shell ended" line of remain-on-exit-format only on some redraws, so the
    // pane's state is what is checked.) Before 3.0 Enter is not bound (a bound Enter lands after
    // the keys typed next there): Ctrl-b L brings the shell back.
    if client_tmux_version() >= (3, 0) {
        c.keys(&["Enter"]);
    } else {
        c.keys(&["C-b", "L"]);
    }
    assert!(poll_until(secs(15), || !ended(&c)), "the shell did not come back:\n{}", c.diag());
    c.type_line("echo REBORN-$((9*9))");
    assert!(conn.wait_output(secs(10), |o| contains(o, b"REBORN-81")), "respawned shell not shared:\n{}", c.diag());
    // q on a live shell is just a letter...
    c.type_text("q");
    assert!(c.wait_screen(secs(15), |s| s.lines().any(|l| l.trim_end().ends_with("# q"))), "{}", c.screen());
    c.keys(&["C-u"]);
    // ...and on a dead one it ends the session for good (from 3.0; before, Ctrl-b Q does).
    if client_tmux_version() < (3, 0) {
        c.keys(&["C-b", "Q"]);
        assert_eq!(c.wait_status(secs(20)), Some(0), "{}", c.diag());
        assert!(conn.wait_for(secs(15), |l| l == "BYE reason=customer").is_some(), "{:?}", conn.lines());
        c.assert_clean();
        return;
    }
    c.type_line("exit");
    assert!(poll_until(secs(15), || ended(&c)), "the shell did not end:\n{}", c.diag());
    c.keys(&["q"]);
    assert_eq!(c.wait_status(secs(20)), Some(0), "{}", c.diag());
    assert!(conn.wait_for(secs(15), |l| l == "BYE reason=customer").is_some(), "{:?}", conn.lines());
    c.assert_clean();
}

#[test]
fn another_prefix_drives_the_same_keys() {
    let relay = relay();
    let id = unique_id("prefix");
    let (c, mut conn) = Customer::connect(&relay, &id, &[], &[("TUNL_PREFIX", "C-a")]);
    let s = c.screen();
    assert!(has_labels(&s, " prefix Ctrl-a", " prefix Ctrl-a"), "pane labels:\n{s}");
    assert!(s.contains("| F1 menu"), "status bar:\n{s}");
    assert!(!s.contains("Ctrl-b"), "{s}");
    c.keys(&["C-a", "c"]);
    assert!(poll_until(secs(15), || role(&c) == "chat"));
    c.keys(&["C-a", "c"]);
    assert!(poll_until(secs(15), || role(&c) == "shell"));
    c.keys(&["C-a", "z"]);
    assert!(poll_until(secs(15), || zoomed(&c)));
    c.keys(&["C-a", "z"]);
    assert!(poll_until(secs(15), || !zoomed(&c)));
    c.keys(&["C-a", "?"]);
    let sheet = |s: &str| {
        if client_tmux_version() >= (3, 0) {
            s.contains("Ctrl-a Q") && s.contains("Ctrl-a c")
        } else {
            s.contains("Ctrl-a then: Q end") && s.contains("c chat/shell")
        }
    };
    assert!(c.wait_screen(secs(15), sheet), "{}", c.screen());
    close_menu(&c, if client_tmux_version() >= (3, 0) { "This cheat sheet" } else { "Ctrl-a then: Q end" });
    c.keys(&["C-a", "u"]);
    assert!(wait_field(&mut conn, "STATE", "tunnel", "allowed").is_some(), "C-a u: {:?}", conn.lines());
    // C-b is an ordinary key now: it reaches the shell (a nested tmux would get it).
    c.type_line("cat -v");
    c.keys(&["C-b", "c"]);
    c.keys(&["Enter"]);
    assert!(
        c.wait_screen(secs(15), |s| s.lines().any(|l| l.trim_end() == "^Bc")),
        "C-b did not reach the shell:\n{}",
        c.screen()
    );
    assert_eq!(role(&c), "shell");
    c.keys(&["C-d"]);
    // Q only once the shell has its prompt back: under load the prefix otherwise races cat's exit.
    let prompt_back = |s: &str| {
        let lines: Vec<&str> = s.lines().map(str::trim_end).collect();
        lines.iter().rposition(|l| *l == "^Bc").is_some_and(|i| lines[i + 1..].iter().any(|l| *l == "$" || *l == "#"))
    };
    assert!(c.wait_screen(secs(15), prompt_back), "cat did not end:\n{}", c.screen());
    c.keys(&["C-a", "Q"]);
    assert_eq!(c.wait_status(secs(20)), Some(0), "{}", c.diag());
    c.assert_clean();
}

#[test]
fn invalid_prefix_falls_back_to_ctrl_b_with_a_warning() {
    let relay = relay();
    let id = unique_id("bogus");
    let (c, _conn) = Customer::connect(&relay, &id, &[], &[("TUNL_PREFIX", "Bogus-Key")]);
    assert!(has_labels(&c.screen(), " prefix Ctrl-b", ""), "{}", c.screen());
    c.keys(&["C-b", "c"]);
    assert!(poll_until(secs(15), || role(&c) == "chat"));
    c.keys(&["C-b", "Q"]);
    assert_eq!(c.wait_status(secs(20)), Some(0), "{}", c.diag());
    let h = c.history();
    let warn = h.lines().find(|l| l.contains("TUNL_PREFIX")).unwrap_or_else(|| panic!("no warning:\n{h}"));
    assert!(warn.contains("Bogus-Key") && warn.contains("C-b"), "{warn}");
}

/// Check an asciinema v2 file; returns the concatenated output events.
fn check_cast(path: &std::path::Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut lines = text.lines();
    let header = parse_json(lines.next().expect("empty recording")).expect("header is not JSON");
    assert_eq!(header.get("version"), Some(&J::Num(2.0)), "{header:?}");
    assert!(matches!(header.get("width"), Some(J::Num(w)) if *w > 0.0), "{header:?}");
    assert!(matches!(header.get("height"), Some(J::Num(h)) if *h > 0.0), "{header:?}");
    let mut out = String::new();
    let mut last = 0.0;
    for l in lines {
        let ev = parse_json(l).unwrap_or_else(|| panic!("event line is not JSON: {l:?}"));
        let J::Arr(v) = ev else { panic!("event is not an array: {l}") };
        assert_eq!(v.len(), 3, "{l}");
        let J::Num(t) = v[0] else { panic!("{l}") };
        assert!(t >= last, "time goes backwards: {l}");
        last = t;
        let (J::Str(kind), J::Str(data)) = (&v[1], &v[2]) else { panic!("{l}") };
        assert!(kind == "o" || kind == "r" || kind == "m", "{l}");
        if kind == "o" {
            out.push_str(data);
        }
    }
    out
}

#[test]
fn quit_key_ends_cleanly_and_leaves_a_recording() {
    let relay = relay();
    let id = unique_id("quit");
    let (c, mut conn) = Customer::connect(&relay, &id, &[], &[]);
    c.type_line("echo MARKER-$((6*7))");
    assert!(conn.wait_output(secs(10), |o| contains(o, b"MARKER-42")));
    c.keys(&["C-b", "Q"]);
    assert_eq!(c.wait_status(secs(20)), Some(0), "{}", c.diag());
    assert!(conn.wait_for(secs(15), |l| l == "BYE reason=customer").is_some(), "{:?}", conn.lines());
    assert!(conn.wait_closed(secs(10)), "the link stayed open");
    c.assert_clean();
    let rec = c.recording_path().unwrap_or_else(|| panic!("no recording path printed:\n{}", c.history()));
    assert!(rec.starts_with(c.scratch.path()), "TUNL_RECORDING_DIR not used: {}", rec.display());
    assert!(rec.extension().is_some_and(|e| e == "cast"), "{}", rec.display());
    let out = check_cast(&rec);
    assert!(out.contains("MARKER-42"), "the recording lacks the session's output:\n{out}");
    let meta = std::fs::metadata(&rec).unwrap();
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(meta.permissions().mode() & 0o077, 0, "the recording is readable by others");
}

fn ends_by_signal(sig: &str, status: i32) {
    let relay = relay();
    let id = unique_id(&format!("sig{}", sig.to_lowercase()));
    let (c, mut conn) = Customer::connect(&relay, &id, &[], &[]);
    let pid = c.daemon_pid().expect("daemon.pid");
    assert!(std::process::Command::new("kill").args(["-s", sig, &pid.to_string()]).status().unwrap().success());
    assert_eq!(c.wait_status(secs(20)), Some(status), "{}", c.diag());
    assert!(conn.wait_for(secs(15), |l| l == "BYE reason=signal").is_some(), "{:?}", conn.lines());
    c.assert_clean();
    let rec = c.recording_path().unwrap_or_else(|| panic!("no recording path printed:\n{}", c.history()));
    check_cast(&rec);
}

#[test]
fn sigterm_to_the_daemon_gives_143() {
    ends_by_signal("TERM", 143);
}

#[test]
fn sigint_to_the_daemon_gives_130() {
    ends_by_signal("INT", 130);
}

#[test]
fn killed_tmux_server_still_cleans_up() {
    let relay = relay();
    let id = unique_id("killed");
    let (c, mut conn) = Customer::connect(&relay, &id, &[], &[]);
    c.inner(&["kill-server"]);
    // The session did not end by the customer's choice nor by a fatal error: an orderly end (0).
    assert_eq!(c.wait_status(secs(20)), Some(0), "{}", c.diag());
    assert!(conn.wait_verb(secs(15), "BYE").is_some(), "{:?}", conn.lines());
    assert!(conn.wait_closed(secs(10)), "the link stayed open");
    c.assert_clean();
}

#[test]
fn relay_close_ends_with_zero() {
    let relay = relay();
    let id = unique_id("closed");
    let (c, mut conn) = Customer::connect(&relay, &id, &[], &[]);
    conn.send(&close_line("case solved, thanks"));
    assert_eq!(c.wait_status(secs(20)), Some(0), "{}", c.diag());
    assert!(conn.wait_for(secs(15), |l| l == "BYE reason=relay-close").is_some(), "{:?}", conn.lines());
    c.assert_clean();
    assert!(c.history().contains("case solved, thanks"), "the reason was not shown:\n{}", c.history());
}

#[test]
fn a_busy_shell_still_pings_a_quiet_relay() {
    let relay = relay();
    let id = unique_id("busy");
    let (c, mut conn) = Customer::connect(&relay, &id, &[], &[]);
    // Output every 200 ms: the client never goes 15 s without sending, and the relay says nothing
    // but PONG. Without a PING the 45 s silence limit would call a healthy link dead.
    conn.send(&relay_double::k_line(b"while :; do echo tick; sleep 0.2; done\r"));
    assert!(conn.wait_output(secs(10), |o| contains(o, b"tick\r\ntick")), "{}", c.diag());
    let ping = conn.wait_for(secs(25), |l| l.starts_with("PING "));
    assert!(ping.is_some(), "no PING while busy: {}", c.diag());
    assert!(!c.ssh_log().contains("link lost"), "{}", c.ssh_log());
    conn.send(&relay_double::k_line(b"\x03"));
}

/// Review F3: a relay that keeps talking (a PING every 10 s) but stops taking our lines is a dead
/// link like a silent one. Once the queue towards it has not moved for the dead-link time (45 s,
/// protocol.md section 7), the link is dropped and the normal reconnect resynchronises support.
#[test]
fn a_relay_that_stops_reading_is_declared_dead() {
    let relay = relay();
    let id = unique_id("deaf");
    let (c, mut conn) = Customer::connect(&relay, &id, &[], &[]);
    conn.set_reading(false);
    let start = std::time::Instant::now();
    // About 1 MB/s, paced: tmux 1.8 forwards an unpaced flood (`yes`) to its control client in a
    // trickle of some 60 KB/s (one 8 KiB message per event loop), which would take minutes to fill
    // the relay's buffers; every tmux forwards this whole.
    conn.send(&k_line(
        b"while :; do yes linbit-tunl-fills-the-link-of-a-relay-that-stopped-reading | head -c 100000; sleep 0.1; done\r",
    ));
    let mut again = None;
    for n in 1..=15 {
        again = relay.accept(secs(10));
        if again.is_some() {
            break;
        }
        conn.send(&format!("PING {n}"));
    }
    let took = start.elapsed();
    let mut again = again.unwrap_or_else(|| panic!("a relay that stopped reading was never given up:\n{}", c.diag()));
    assert!(took >= std::time::Duration::from_secs(40), "given up after {took:?}, before the dead-link time");
    assert_eq!(again.hello_field("resume"), Some("1"));
    assert!(c.ssh_log().contains("link lost: the relay took nothing"), "{}", c.ssh_log());
    again.welcome(1);
    again.send(&k_line(b"\x03"));
    again.send(&k_line(b"echo AFTER-$((6*7))-STALL\r"));
    assert!(again.wait_output(secs(30), |o| contains(o, b"AFTER-42-STALL")), "{}", c.diag());
    drop(conn);
    c.keys(&["C-b", "Q"]);
    assert_eq!(c.wait_status(secs(30)), Some(0), "{}", c.diag());
}

/// The tmux control client of the session (`tmux -C attach-session`), a child of the daemon.
fn control_client(c: &Customer) -> Option<u32> {
    let daemon = c.daemon_pid()? as u32;
    let rd = std::fs::read_dir("/proc").ok()?;
    rd.flatten().find_map(|e| {
        let pid: u32 = e.file_name().to_str()?.parse().ok()?;
        let stat = std::fs::read_to_string(e.path().join("stat")).ok()?;
        let ppid: u32 = stat[stat.rfind(')')? + 2..].split(' ').nth(1)?.parse().ok()?;
        let cmd = String::from_utf8_lossy(&std::fs::read(e.path().join("cmdline")).ok()?).replace('\0', " ");
        (ppid == daemon && cmd.contains(" -C ")).then_some(pid)
    })
}

/// A `/proc/PID/status` figure in KiB (`VmRSS`, `VmHWM`).
fn vm_kib(pid: i32, what: &str) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines()
        .find_map(|l| l.strip_prefix(what)?.strip_prefix(':')?.trim().strip_suffix(" kB")?.parse().ok())
        .unwrap_or(0)
}

/// Sends SIGCONT to a stopped process when dropped, whatever the test's outcome.
struct Stopped(u32);

impl Drop for Stopped {
    fn drop(&mut self) {
        let _ = std::process::Command::new("kill").args(["-CONT", &self.0.to_string()]).status();
    }
}

/// Review F3: the queue of commands for tmux is bounded. With the control client stopped (a tmux
/// that reads nothing), support's keystrokes beyond the bound are dropped and logged, not queued:
/// 16 MB of keystrokes (some 48 MB of send-keys commands) cost the daemon a few MiB at most, and the
/// session works again once tmux reads.
#[test]
fn a_tmux_that_reads_nothing_costs_bounded_memory() {
    let relay = relay();
    let id = unique_id("tmuxq");
    let (c, mut conn) = Customer::connect(&relay, &id, &[], &[]);
    conn.send(&k_line(b"cat > /dev/null\r"));
    assert!(conn.wait_output(secs(10), |o| contains(o, b"cat > /dev/null")), "{}", c.diag());
    let daemon = c.daemon_pid().expect("daemon.pid");
    let ctl = control_client(&c).unwrap_or_else(|| panic!("no tmux control client below the daemon"));
    let st = std::process::Command::new("kill").args(["-STOP", &ctl.to_string()]).status().unwrap();
    assert!(st.success());
    let stopped = Stopped(ctl);
    let before = vm_kib(daemon, "VmRSS");
    // Lines of 99 keys and a carriage return, for cat; 160000 keys a K line, 100 lines.
    let keys: Vec<u8> = (0..1600).flat_map(|_| b"x".repeat(99).into_iter().chain([b'\r'])).collect();
    for _ in 0..100 {
        conn.send(&k_line(&keys));
    }
    sync(&mut conn, 41);
    let peak = vm_kib(daemon, "VmHWM");
    assert!(
        peak < before + 16 * 1024,
        "the daemon grew from {before} KiB to a peak of {peak} KiB for a tmux that reads nothing"
    );
    assert!(c.ssh_log().contains("dropped K reason=tmux-busy"), "{}", c.ssh_log());
    drop(stopped);
    // Keys that come while tmux still works through the queue are dropped too: Ctrl-C until the
    // shell's prompt follows it, then the command (never both at once: the shell throws away a line
    // typed while it handles the interrupt).
    let mark = conn.output().len();
    let prompt_after_interrupt = |o: &[u8]| {
        let t = &o[mark.min(o.len())..];
        let last = (0..t.len().saturating_sub(1)).rev().find(|&i| &t[i..i + 2] == b"^C");
        last.is_some_and(|i| contains(&t[i..], b"# ") || contains(&t[i..], b"$ "))
    };
    let interrupted = (0..12).any(|_| {
        conn.send(&k_line(b"\x03"));
        conn.wait_output(secs(5), prompt_after_interrupt)
    });
    assert!(interrupted, "{}", c.diag());
    let recovered = (0..6).any(|_| {
        conn.send(&k_line(b"echo RECOVERED-$((6*7))\r"));
        conn.wait_output(secs(5), |o| contains(o, b"RECOVERED-42"))
    });
    assert!(recovered, "{}", c.diag());
    c.keys(&["C-b", "Q"]);
    assert_eq!(c.wait_status(secs(30)), Some(0), "{}", c.diag());
}

/// The session as the customer sees it, for the README's compatibility table (`cargo test --test
/// share screen_for_the_readme -- --ignored --nocapture`, with TUNL_TEST_CLIENT_PATH for an old tmux).
#[test]
#[ignore]
fn screen_for_the_readme() {
    let relay = relay();
    let id = unique_id("readme");
    let (c, mut conn) = Customer::connect(&relay, &id, &[], &[]);
    c.type_line("echo customer typed this");
    conn.send(&k_line(b"echo support typed this\r"));
    conn.send(&chat_line("eng@linbit.com", "hello, I am looking at the DRBD resources"));
    assert!(c.wait_screen(secs(15), |s| s.contains("hello, I am looking") && s.contains("support typed this")));
    println!("{}", c.outer(&["capture-pane", "-p", "-t", OUTER_TARGET]));
    c.keys(&["C-b", "Q"]);
    assert_eq!(c.wait_status(secs(20)), Some(0), "{}", c.diag());
}
