//! `just bench`: idle sessions on one relay (issue 11's figures): the memory of the relay's own
//! processes per idle session (target under 4 MiB RSS; sshd's own reported beside it), and the
//! relay's CPU at rest with 200 idle sessions. A benchmark, not a test: it reports, never fails.
//!
//! The relay is the real one (init --root, serve, sshd, produce, broker); each session is a real
//! `ssh` login with a relay certificate whose command is a hello, welcomed, then left idle.
//! `TUNL_BENCH_SESSIONS` sets how many (default 200).

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use tunl_relay::serve::descendants;

struct Proc {
    pid: i32,
    cmd: String,
}

fn procs_under(root: i32) -> Vec<Proc> {
    descendants(root)
        .into_iter()
        .filter_map(|pid| {
            let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
            Some(Proc { pid, cmd: String::from_utf8_lossy(&cmd).replace('\0', " ") })
        })
        .collect()
}

/// `VmRSS` and `Pss` in KiB.
fn memory(pid: i32) -> (u64, u64) {
    let field = |text: &str, name: &str| {
        text.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap_or_default();
    (field(&status, "VmRSS:"), field(&smaps, "Pss:"))
}

/// utime + stime in clock ticks.
fn cpu_ticks(pid: i32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let Some(rest) = stat.rfind(')').map(|i| &stat[i + 1..]) else { return 0 };
    let f: Vec<&str> = rest.split_whitespace().collect();
    f.get(11).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
        + f.get(12).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
}

fn serve_pid(root: &str) -> i32 {
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        if let Ok(cmd) = std::fs::read(e.path().join("cmdline")) {
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            if cmd.contains(" serve --root ") && cmd.contains(root) {
                return e.file_name().to_string_lossy().parse().unwrap();
            }
        }
    }
    panic!("no serve process for {root}");
}

#[test]
#[ignore = "benchmark: just bench"]
fn idle_sessions_memory_and_cpu() {
    let n: usize = std::env::var("TUNL_BENCH_SESSIONS").ok().and_then(|v| v.parse().ok()).unwrap_or(200);
    let relay = relay();
    let scratch = Scratch::new("idle");
    let (key, _public) = keypair(scratch.path(), "k");
    // A certificate per session, as the API issues them (its key ID names the session, which
    // `produce` checks); signed here, since the benchmark measures idle sessions, not the API.
    let certify = |i: usize, id: &str| {
        let dir = scratch.path().join(format!("s{i}"));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::copy(format!("{}.pub", key.display()), dir.join("k.pub")).unwrap();
        let st = Command::new("ssh-keygen")
            .arg("-q")
            .arg("-s")
            .arg(relay.layout.ca_key())
            .args(["-I", &format!("tunl session={id} host=bench serial={i}"), "-n", &relay.cfg.customer_user])
            .args(["-V", "-5m:+2h"])
            .arg(dir.join("k.pub"))
            .status()
            .unwrap();
        assert!(st.success());
        dir.join("k-cert.pub")
    };
    let kh = scratch.path().join("known_hosts");
    std::fs::write(&kh, format!("@cert-authority [127.0.0.1]:{} {}\n", relay.port(), relay.ca_pubkey())).unwrap();

    let started = Instant::now();
    let mut clients: Vec<Child> = Vec::new();
    let mut readers = Vec::new();
    for i in 0..n {
        let (id, _token) = relay.create_session(&format!("BENCH-{i}"), false);
        let cert = certify(i, &id);
        let hello = format!(
            "linbit-tunl/1 id={id} mode=share host=h{i} user=root ips=10.0.0.1 case= client=0.1 size=80x24 resume=0"
        );
        let mut child = customer_ssh(&relay, &kh, &key, &cert, &hello)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut r = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        r.read_line(&mut line).unwrap();
        assert!(line.starts_with("WELCOME "), "session {i}: {line:?}\n{}", relay.log_text());
        clients.push(child);
        readers.push(r); // keeps the channel's stdout open: an idle, not a vanished, customer
    }
    let setup = started.elapsed();

    let root = relay.layout.root.display().to_string();
    let serve = serve_pid(&root);
    // Let start-up work settle before measuring rest.
    std::thread::sleep(Duration::from_secs(5));
    let procs = procs_under(serve);
    if std::env::var_os("TUNL_BENCH_VERBOSE").is_some() {
        for p in &procs {
            println!("{} {}", p.pid, p.cmd);
        }
    }
    let bin = relay.cfg.binary.display().to_string();
    let is_ours =
        |p: &&Proc| p.cmd.starts_with(&format!("{bin} produce")) || p.cmd.starts_with(&format!("{bin} broker"));
    // sshd names its session processes after its program: the instance's symlink name.
    let sshd_name = format!("{}:", relay.cfg.pam_service);
    let is_sshd = |p: &&Proc| p.cmd.starts_with(&sshd_name) && !p.cmd.contains("[listener]");
    // The account's shell, if it stayed (the ForceCommand execs, so it should not).
    let is_shell = |p: &&Proc| p.cmd.contains(" -c ") && p.cmd.contains(" produce");
    let ours: Vec<&Proc> = procs.iter().filter(is_ours).collect();
    let sshd: Vec<&Proc> = procs.iter().filter(|p| is_sshd(p) || is_shell(p)).collect();
    let sum = |ps: &[&Proc]| ps.iter().map(|p| memory(p.pid)).fold((0, 0), |a, m| (a.0 + m.0, a.1 + m.1));
    let (our_rss, our_pss) = sum(&ours);
    let (sshd_rss, sshd_pss) = sum(&sshd);

    let window = Duration::from_secs(20);
    let all: Vec<i32> = procs.iter().map(|p| p.pid).chain([serve]).collect();
    let before: u64 = all.iter().map(|&p| cpu_ticks(p)).sum();
    let our_before: u64 = ours.iter().map(|p| cpu_ticks(p.pid)).sum();
    std::thread::sleep(window);
    let after: u64 = all.iter().map(|&p| cpu_ticks(p)).sum();
    let our_after: u64 = ours.iter().map(|p| cpu_ticks(p.pid)).sum();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let pct = |ticks: u64| ticks as f64 / hz / window.as_secs_f64() * 100.0;
    let mib = |kib: u64| kib as f64 / 1024.0 / n as f64;

    println!("idle sessions: {n} welcomed in {:.1} s", setup.as_secs_f64());
    println!(
        "relay processes (produce, the session's broker): {} processes ({:.2} per session), RSS {:.2} MiB/session (target < 4), PSS {:.2} MiB/session",
        ours.len(),
        ours.len() as f64 / n as f64,
        mib(our_rss),
        mib(our_pss)
    );
    println!(
        "sshd and the account's shell (not counted): {} processes, RSS {:.2} MiB/session, PSS {:.2} MiB/session",
        sshd.len(),
        mib(sshd_rss),
        mib(sshd_pss)
    );
    println!(
        "CPU at rest over {} s: relay's own {:.2} % of a core, with sshd and the API {:.2} %",
        window.as_secs(),
        pct(our_after - our_before),
        pct(after - before)
    );

    for mut c in clients {
        drop(c.stdin.take());
        let _ = c.kill();
        let _ = c.wait();
    }
}
