//! Endurance (issue 13): `just soak MINUTES` runs the real client in share mode against the test
//! relay for MINUTES (`TUNL_SOAK_MINUTES`, default 10) while everything happens at random: a shell
//! that prints at random rates (lines, base64 bursts up to about 1 MB, raw random bytes), a relay
//! that sends random valid and invalid lines, chat both ways, tunnels granted, used and revoked,
//! links dropped. At the end: no key left in authorized_keys, no process or file of the session
//! left, the daemon's RSS and fd count flat (first and last minute), every keystroke sent arrived
//! exactly once and in order. Not part of `just test` (ignored); the figures go to stdout and to
//! `target/soak.txt`.

mod common;

use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use relay_double::{
    SupportKey, TargetSshd, chat_line, close_line, k_line, line_field, note_line, support_login, upgrade_line,
};

/// xorshift64*: the soak's own randomness, seeded from the clock (the seed is printed, so a run can
/// be repeated with `TUNL_SOAK_SEED`).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

/// The shell the soak types into: it prints at random rates in the background and records every
/// byte it reads, unprocessed (raw mode, no echo), so the keystrokes can be counted at the end.
const SHELL: &str = r#"#!/bin/bash
stty raw -echo
(
  while :; do
    r=$((RANDOM % 100))
    if [ $r -lt 2 ]; then head -c $((300000 + RANDOM * 16)) /dev/urandom | base64 -w 120
    elif [ $r -lt 7 ]; then head -c $((RANDOM % 2000)) /dev/urandom
    elif [ $r -lt 35 ]; then head -c $((RANDOM % 6000)) /dev/urandom | base64 -w 100
    else printf 'tick %05d\n' $RANDOM; fi
    sleep "0.$((RANDOM % 10))$((RANDOM % 10))"
  done
) &
exec cat > "$1"
"#;

/// Lines a hostile or broken relay might send: none of them may reach the shell or crash the client.
fn invalid_line(rng: &mut Rng) -> Vec<u8> {
    let mut l: Vec<u8> = match rng.below(12) {
        0 => b"K !!!not-base64!!!".to_vec(),
        1 => b"K".to_vec(),
        2 => format!("K {} extra", relay_double::b64(b"x")).into_bytes(),
        3 => b"WELCOME proto=1 viewers=1".to_vec(),
        4 => b"UPGRADE req=zz from=eve".to_vec(),
        5 => b"CHAT from=%ZZ AAAA".to_vec(),
        6 => b"VIEWERS -1".to_vec(),
        7 => format!("NOTE {}", "A".repeat(300_000)).into_bytes(),
        8 => b"TUNNEL_OPEN req=1 port=1".to_vec(),
        9 => b"\x1b[2J\x1b]52;c;aGk=\x07".to_vec(),
        10 => {
            // Random bytes behind a verb no contract has.
            let mut v = b"XJUNK ".to_vec();
            let n = rng.below(400) as usize;
            v.extend(rng.bytes(n).into_iter().map(|b| if b == b'\n' { b' ' } else { b }));
            v
        }
        _ => b"ping 1".to_vec(),
    };
    l.push(b'\n');
    l
}

#[derive(Clone, Copy)]
struct Sample {
    at: Duration,
    rss_kb: u64,
    fds: usize,
}

fn sample(pid: i32, start: Instant) -> Option<Sample> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rss_kb = status.lines().find_map(|l| l.strip_prefix("VmRSS:"))?.split_whitespace().next()?.parse().ok()?;
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count();
    Some(Sample { at: start.elapsed(), rss_kb, fds })
}

fn window(samples: &[Sample], from: Duration, to: Duration) -> (u64, u64, usize, usize) {
    let w: Vec<&Sample> = samples.iter().filter(|s| s.at >= from && s.at < to).collect();
    let rss_max = w.iter().map(|s| s.rss_kb).max().unwrap_or(0);
    let rss_avg = if w.is_empty() { 0 } else { w.iter().map(|s| s.rss_kb).sum::<u64>() / w.len() as u64 };
    let fd_min = w.iter().map(|s| s.fds).min().unwrap_or(0);
    let fd_max = w.iter().map(|s| s.fds).max().unwrap_or(0);
    (rss_avg, rss_max, fd_min, fd_max)
}

/// Sends `PING n` and waits for `PONG n`: everything sent before it has been handled by the client.
fn sync(conn: &mut Conn, n: &mut u64, c: &Customer) {
    *n += 1;
    let want = format!("PONG {n}");
    conn.send(&format!("PING {n}"));
    assert!(conn.wait_for(secs(60), |l| l == want).is_some(), "no {want} within 60 s\n{}", c.diag());
}

#[test]
#[ignore = "the endurance run: `just soak MINUTES`"]
fn soak() {
    let minutes: u64 = std::env::var("TUNL_SOAK_MINUTES").ok().and_then(|m| m.parse().ok()).unwrap_or(10);
    let seed: u64 = std::env::var("TUNL_SOAK_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64 | 1
    });
    let mut rng = Rng(seed);
    let mut report = format!("soak: {minutes} minutes, seed {seed}\n");
    println!("{report}");

    let relay = Relay::start(RelayOpts::default()).expect("test relay");
    let scratch = Scratch::new("soak");
    let s = scratch.path();
    let authkeys = s.join("authorized_keys");
    // Someone else's bytes that must survive every grant and revoke.
    let theirs: &[u8] = b"# the customer's own key, not ours\nssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl admin\n";
    std::fs::write(&authkeys, theirs).unwrap();
    let target = TargetSshd::start(&authkeys).expect("target sshd");
    let keydir = s.join("support");
    std::fs::create_dir_all(&keydir).unwrap();
    let key = SupportKey::generate(&keydir).expect("support key");
    let shell = s.join("soak-shell.sh");
    std::fs::write(&shell, SHELL).unwrap();
    let keylog = s.join("keystrokes.log");

    let id = unique_id("soak");
    let ak = authkeys.display().to_string();
    let tgt = format!("127.0.0.1:{}", target.port);
    let (c, mut conn) = Customer::connect(&relay, &id, &["--target", &tgt], &[("TUNL_AUTHKEYS_FILE", &ak)]);
    // Pre-grant (Ctrl-b u): tunnel requests need no popup.
    c.keys(&["C-b", "u"]);
    assert!(
        conn.wait_for(secs(20), |l| l.starts_with("STATE") && l.contains("tunnel=allowed")).is_some(),
        "{}",
        c.diag()
    );
    conn.send(&k_line(format!("exec bash {} {}\r", shell.display(), keylog.display()).as_bytes()));
    assert!(
        conn.wait_output(secs(30), |o| o.windows(5).any(|w| w == b"tick ")),
        "the soak shell did not start\n{}",
        c.diag()
    );

    let start = Instant::now();
    let end = start + Duration::from_secs(minutes * 60);
    let mut sent_keys: Vec<u8> = Vec::new();
    let mut key_n = 0u64;
    let mut ping_n = 1000u64;
    let (mut chats_in, mut chats_out, mut invalid, mut valid, mut drops, mut grants, mut logins) =
        (0, 0, 0, 0, 0, 0, 0);
    let mut tunnel_open: Option<(String, u16)> = None;
    let mut req_n = 0u32;
    let mut samples: Vec<Sample> = Vec::new();
    let mut next_sample = Instant::now();
    let mut last_progress = Instant::now();

    while Instant::now() < end {
        if Instant::now() >= next_sample {
            let pid = c.daemon_pid().unwrap_or_else(|| panic!("no daemon pid\n{}", c.diag()));
            if let Some(x) = sample(pid, start) {
                samples.push(x);
            }
            next_sample += Duration::from_secs(5);
        }
        if last_progress.elapsed() > Duration::from_secs(60) {
            last_progress = Instant::now();
            let x = samples.last().copied();
            println!(
                "{:>5.1} min: keys {key_n}, drops {drops}, tunnels {grants}, chats {chats_in}/{chats_out}, invalid {invalid}, rss {:?} kB, fds {:?}",
                start.elapsed().as_secs_f64() / 60.0,
                x.map(|x| x.rss_kb),
                x.map(|x| x.fds)
            );
        }
        // Lines from the client are consumed as they come (the double keeps them per link anyway).
        while conn.recv_line(Instant::now()).is_some() {}
        match rng.below(100) {
            // Keystrokes, a few tokens per K line.
            0..=39 => {
                let mut b = Vec::new();
                for _ in 0..=rng.below(4) {
                    key_n += 1;
                    b.extend_from_slice(format!("k{key_n:07} ").as_bytes());
                }
                conn.send(&k_line(&b));
                sent_keys.extend_from_slice(&b);
            }
            40..=54 => {
                valid += 1;
                let line = match rng.below(5) {
                    0 => chat_line("eve", &format!("support chat {valid} \x1b[31m")),
                    1 => note_line(&format!("note {valid}")),
                    2 => format!("VIEWERS {}", rng.below(5)),
                    3 => "REFRESH".to_string(),
                    _ => {
                        ping_n += 1;
                        format!("PING {ping_n}")
                    }
                };
                if line.starts_with("CHAT") {
                    chats_in += 1;
                }
                conn.send(&line);
            }
            55..=69 => {
                invalid += 1;
                conn.send_raw(&invalid_line(&mut rng));
            }
            // The customer chats: focus the chat, type, focus the shell again.
            70..=72 => {
                chats_out += 1;
                c.keys(&["C-b", "c"]);
                assert!(poll_until(secs(30), || c.focus() == "chat"), "C-b c did not focus the chat\n{}", c.diag());
                let text = format!("customer chat {chats_out}");
                c.type_line(&text);
                let want = relay_double::b64(text.as_bytes());
                assert!(
                    conn.wait_for(secs(30), |l| l.starts_with("CHAT ") && l.ends_with(&want)).is_some(),
                    "the customer's chat {chats_out} never reached the relay\n{}",
                    c.diag()
                );
                c.keys(&["C-b", "c"]);
                assert!(poll_until(secs(30), || c.focus() == "shell"), "C-b c did not focus the shell\n{}", c.diag());
            }
            // A tunnel: granted (and used), or revoked.
            73..=75 => match tunnel_open.take() {
                None => {
                    req_n += 1;
                    let req = format!("s{req_n}");
                    conn.send(&upgrade_line(&req, "eng@linbit.com", &format!("{}\n", key.public_line)));
                    let open = conn
                        .wait_for(secs(60), |l| {
                            (l.starts_with("TUNNEL_OPEN ") || l.starts_with("TUNNEL_REJECTED "))
                                && line_field(l, "req") == Some(req.as_str())
                        })
                        .unwrap_or_else(|| panic!("no answer to UPGRADE {req}\n{}", c.diag()));
                    assert!(open.starts_with("TUNNEL_OPEN "), "{open}\n{}", c.diag());
                    let port: u16 = line_field(&open, "port").unwrap().parse().unwrap();
                    grants += 1;
                    if rng.below(3) == 0 {
                        let o = support_login(port, &key, "root", "echo THROUGH-$((6*7))").unwrap();
                        assert!(
                            String::from_utf8_lossy(&o.stdout).contains("THROUGH-42"),
                            "no login through the tunnel: {}\n{}",
                            String::from_utf8_lossy(&o.stderr),
                            target.log()
                        );
                        logins += 1;
                    }
                    tunnel_open = Some((req, port));
                }
                Some(_) => {
                    conn.send("REVOKE");
                    assert!(conn.wait_verb(secs(60), "TUNNEL_CLOSED").is_some(), "no TUNNEL_CLOSED\n{}", c.diag());
                    assert_eq!(std::fs::read(&authkeys).unwrap(), theirs, "authorized_keys after REVOKE");
                }
            },
            // The link drops; the client comes back with resume=1 and re-opens an active tunnel.
            76 if rng.below(3) == 0 => {
                sync(&mut conn, &mut ping_n, &c);
                conn.drop_link();
                drops += 1;
                conn =
                    relay.accept(secs(90)).unwrap_or_else(|| panic!("no reconnect after drop {drops}\n{}", c.diag()));
                assert_eq!(conn.hello_field("resume"), Some("1"));
                conn.welcome(1);
                if let Some((req, _)) = &tunnel_open {
                    let open = conn
                        .wait_verb(secs(60), "TUNNEL_OPEN")
                        .unwrap_or_else(|| panic!("the tunnel was not re-opened\n{}", c.diag()));
                    assert_eq!(line_field(&open, "req"), Some(req.as_str()));
                    let port: u16 = line_field(&open, "port").unwrap().parse().unwrap();
                    tunnel_open = Some((req.clone(), port));
                }
            }
            _ => {}
        }
        std::thread::sleep(Duration::from_millis(50 + rng.below(400)));
    }

    // Every keystroke arrived once, in order.
    sync(&mut conn, &mut ping_n, &c);
    let complete = poll_until(secs(60), || std::fs::read(&keylog).map(|k| k.len() >= sent_keys.len()).unwrap_or(false));
    let got = std::fs::read(&keylog).unwrap_or_default();
    let keys_ok = got == sent_keys;
    if tunnel_open.is_some() {
        conn.send("REVOKE");
        assert!(conn.wait_verb(secs(60), "TUNNEL_CLOSED").is_some(), "no TUNNEL_CLOSED\n{}", c.diag());
    }
    let sign_requests = relay.sign_requests().len();
    conn.send(&close_line("soak done"));
    let status = c.wait_status(secs(60));

    let total = start.elapsed();
    let first = window(&samples, Duration::ZERO, Duration::from_secs(60));
    let last = window(&samples, total.saturating_sub(Duration::from_secs(60)), total);
    report.push_str(&format!(
        "ran {:.1} min: {key_n} keystroke tokens ({} bytes), {drops} link drops, {grants} tunnels granted \
         ({logins} logins through them), {chats_in} support chats, {chats_out} customer chats, {valid} other \
         valid relay lines, {invalid} invalid relay lines, 1 token use ({sign_requests} signing requests)\n\
         daemon RSS kB first minute avg {} max {}, last minute avg {} max {}; fds first minute {}-{}, last minute {}-{}\n",
        total.as_secs_f64() / 60.0,
        sent_keys.len(),
        first.0,
        first.1,
        last.0,
        last.1,
        first.2,
        first.3,
        last.2,
        last.3,
    ));
    let out = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/soak.txt");
    if let Ok(mut f) = std::fs::File::create(&out) {
        let _ = f.write_all(report.as_bytes());
    }
    println!("{report}");

    assert!(
        complete && keys_ok,
        "keystrokes: sent {} bytes, the shell read {} bytes (differ: {})\n{}",
        sent_keys.len(),
        got.len(),
        !keys_ok,
        c.diag()
    );
    assert_eq!(status, Some(0), "the client did not end with 0 on CLOSE\n{}", c.diag());
    assert_eq!(sign_requests, 1, "the token was used again");
    assert_eq!(std::fs::read(&authkeys).unwrap(), theirs, "authorized_keys is not as it was");
    c.assert_clean();
    let left = wait_no_processes(&s.display().to_string(), secs(20));
    assert!(left.is_empty(), "processes left: {left:?}");
    // Flat: the last minute's RSS within 25 % (+2 MB) of the first's, the fd count no higher.
    assert!(last.1 <= first.1 + first.1 / 4 + 2048, "RSS grew: {report}");
    assert!(last.3 <= first.3, "fds grew: {report}");
}
