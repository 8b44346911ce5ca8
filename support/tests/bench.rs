//! `just bench`, the support side's figures (design.md, "relay"): the keystroke round trip engineer
//! -> customer shell -> engineer through both ssh hops on loopback (median, p99), and `tunl join`'s
//! time to the first full screen, beside the ssh login alone. The product relay, the real client in
//! an outer tmux, the engineer's own ssh. A benchmark: it reports, never fails on a target; writes
//! target/bench-support.json. The client-only round trip (no support hop) is `just bench`'s
//! `latency_median_ms` in target/bench.json, measured by the root crate's bench in the same run.

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use tunl_relay::harness::Relay;

const ROUNDS: usize = 300;
const JOINS: usize = 10;

fn shq(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

fn b64(d: &[u8]) -> String {
    tunl_wire::b64(d)
}

#[test]
#[ignore]
fn support_figures() {
    let dir = std::env::temp_dir().join(format!("tunl-bench-support-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut relay = Relay::start().expect("relay");
    let user = relay.add_support_user().expect("support user");
    let kh = dir.join("kh");
    std::fs::write(&kh, format!("@cert-authority [127.0.0.1]:{} {}\n", relay.port(), relay.ca_pubkey())).unwrap();
    let ssh_args = |cmd: &str| -> Vec<String> {
        vec![
            "-F".into(),
            "/dev/null".into(),
            "-i".into(),
            user.key.display().to_string(),
            "-o".into(),
            "IdentitiesOnly=yes".into(),
            "-o".into(),
            format!("UserKnownHostsFile={}", kh.display()),
            "-o".into(),
            "StrictHostKeyChecking=yes".into(),
            "-o".into(),
            "BatchMode=yes".into(),
            "-p".into(),
            relay.port().to_string(),
            "-T".into(),
            format!("{}@127.0.0.1", user.name),
            "--".into(),
            cmd.into(),
        ]
    };
    let (id, token) = relay.create_session("BENCH", false);
    let client = tunl_relay::harness::client_binary().unwrap();
    let mut sh = String::from("env -i");
    for (k, v) in relay.env() {
        sh.push_str(&format!(" {k}={}", shq(&v)));
    }
    sh.push_str(&format!(
        " PATH={} USER=root HOME={} TERM=xterm-256color TUNL_RECORDING_DIR={} {} --token {token} {id}",
        shq(&std::env::var("PATH").unwrap()),
        shq(&dir.display().to_string()),
        shq(&dir.display().to_string()),
        shq(&client.display().to_string())
    ));
    let sock = dir.join("outer.sock");
    assert!(
        Command::new("tmux")
            .arg("-S")
            .arg(&sock)
            .args(["-f", "/dev/null", "new-session", "-d", "-x", "120", "-y", "40", &sh])
            .env_remove("TMUX")
            .status()
            .unwrap()
            .success()
    );
    let expect =
        Command::new("ssh").args(ssh_args(&format!("tunl-support/1 expect id={id} timeout=60"))).output().unwrap();
    assert!(String::from_utf8_lossy(&expect.stdout).contains("OK"), "{expect:?}");

    // The ssh login alone: a one-shot command that the relay answers from its registry.
    let mut login = Vec::new();
    for _ in 0..JOINS {
        let t = Instant::now();
        let out = Command::new("ssh").args(ssh_args("tunl-support/1 list")).output().unwrap();
        assert!(out.status.success());
        login.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    // Time to the first full screen: ssh started -> SNAP read.
    let mut first = Vec::new();
    let mut after_joined = Vec::new();
    for _ in 0..JOINS {
        let t = Instant::now();
        let mut c = Command::new("ssh")
            .args(ssh_args(&format!("tunl-support/1 join id={id} ro=1")))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut r = BufReader::new(c.stdout.take().unwrap());
        let mut l = String::new();
        let mut joined = None;
        loop {
            l.clear();
            if r.read_line(&mut l).unwrap() == 0 {
                panic!("join ended before SNAP");
            }
            if l.starts_with("JOINED ") {
                joined = Some(Instant::now());
            }
            if l.starts_with("SNAP ") {
                break;
            }
        }
        first.push(t.elapsed().as_secs_f64() * 1000.0);
        // JOINED is the relay's first line once ssh has logged in and started the command.
        after_joined.push(joined.map(|j| j.elapsed().as_secs_f64() * 1000.0).unwrap_or(f64::NAN));
        let _ = c.stdin.take().unwrap().write_all(b"BYE\n");
        let _ = c.wait();
    }

    // Keystroke round trip: `cat` in the customer's shell echoes each key through the tty.
    let mut c = Command::new("ssh")
        .args(ssh_args(&format!("tunl-support/1 join id={id} ro=0")))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut w = c.stdin.take().unwrap();
    let mut r = BufReader::new(c.stdout.take().unwrap());
    let wait_for = |r: &mut BufReader<std::process::ChildStdout>, want: &[u8]| -> bool {
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut l = String::new();
        while Instant::now() < deadline {
            l.clear();
            if r.read_line(&mut l).unwrap_or(0) == 0 {
                return false;
            }
            if let Some(p) = l.trim_end().strip_prefix("O ")
                && let Some(d) = tunl_wire::b64_decode(p)
                && d.windows(want.len()).any(|x| x == want)
            {
                return true;
            }
        }
        false
    };
    writeln!(w, "K {}", b64(b"stty -echo; echo CAT-$((6*7)); stty echo; cat\r")).unwrap();
    assert!(wait_for(&mut r, b"CAT-42"), "the customer's shell did not start cat");
    std::thread::sleep(Duration::from_millis(300));
    let mut rtt = Vec::new();
    for i in 0..ROUNDS {
        let k = [b'a' + (i % 26) as u8];
        let t = Instant::now();
        writeln!(w, "K {}", b64(&k)).unwrap();
        assert!(wait_for(&mut r, &k), "no echo of round {i}");
        rtt.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    writeln!(w, "K {}", b64(b"\x03")).unwrap();
    let _ = writeln!(w, "BYE");
    drop(w);
    let _ = c.wait();

    let (rt_med, rt_p99) = (pct(&mut rtt.clone(), 0.5), pct(&mut rtt, 0.99));
    let (first_med, login_med, snap_med) = (pct(&mut first, 0.5), pct(&mut login, 0.5), pct(&mut after_joined, 0.5));
    let client_only =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../target/bench.json")).ok().and_then(|s| {
            let i = s.find("\"latency_median_ms\"")?;
            let rest = &s[i + 19..];
            let v: String = rest
                .chars()
                .skip_while(|c| !c.is_ascii_digit())
                .take_while(|c| c.is_ascii_digit() || *c == '.')
                .collect();
            v.parse::<f64>().ok()
        });
    println!("support hop: keystroke round trip engineer -> customer shell -> engineer, {ROUNDS} keys");
    println!("  median {rt_med:.2} ms, p99 {rt_p99:.2} ms");
    match client_only {
        Some(c) => {
            println!("  client-only median {c:.2} ms (target/bench.json): added {:.2} ms (target < 1 ms)", rt_med - c)
        }
        None => println!("  client-only figure: run the root bench first (target/bench.json)"),
    }
    println!(
        "tunl join first screen: median {first_med:.0} ms from ssh start, {snap_med:.1} ms after JOINED (the login done; target < 300 ms); ssh login + `list` alone {login_med:.0} ms"
    );
    let json = format!(
        "{{\"support_rtt_median_ms\": {rt_med:.2}, \"support_rtt_p99_ms\": {rt_p99:.2}, \"client_only_median_ms\": {}, \"join_first_screen_ms\": {first_med:.0}, \"join_snap_after_joined_ms\": {snap_med:.1}, \"ssh_login_ms\": {login_med:.0}}}\n",
        client_only.map(|c| format!("{c:.2}")).unwrap_or_else(|| "null".into())
    );
    let _ = std::fs::write(concat!(env!("CARGO_MANIFEST_DIR"), "/../target/bench-support.json"), json);
    let _ = Command::new("tmux").arg("-S").arg(&sock).arg("kill-server").status();
    relay.stop();
    let _ = std::fs::remove_dir_all(&dir);
}
