//! `relay-double`: the test relay's binary.
//!
//! - `relay-double shim SOCK`: sshd's ForceCommand; hands the session to the broker socket.
//! - `relay-double pam-check DIR`: pam_exec checker for keyboard-interactive answers.
//! - `relay-double serve [--session ID] [--token T] [--ki] [--viewers N] [--out FILE] [--target-sshd AUTHORIZED_KEYS]`: the standalone
//!   demo relay with a support console on stdin.

use std::io::{self, BufRead, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::ExitCode;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use relay_double::{Relay, RelayOpts, SupportKey, chat_line, close_line, k_line, line_field, note_line, unb64};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let code = match args.first().map(String::as_str) {
        Some("shim") if args.len() == 2 => shim(&args[1]),
        Some("pam-check") if args.len() == 2 => pam_check(Path::new(&args[1])),
        Some("serve") => match serve(&args[1..]) {
            Ok(()) => 0,
            Err(e) => {
                eprintln!("relay-double: {e}");
                1
            }
        },
        _ => {
            eprintln!(
                "usage: relay-double shim SOCK | pam-check DIR | serve [--session ID] [--token T] [--ki] [--viewers N] [--out FILE] [--target-sshd AUTHORIZED_KEYS]"
            );
            2
        }
    };
    ExitCode::from(code)
}

/// Connects to the broker, sends `HELLO <SSH_ORIGINAL_COMMAND>`, then copies stdin -> socket and
/// socket -> stdout until the socket closes (then exits, which ends the ssh session).
fn shim(sock: &str) -> u8 {
    let cmd = std::env::var("SSH_ORIGINAL_COMMAND").unwrap_or_default();
    let Ok(mut s) = UnixStream::connect(sock) else {
        eprintln!("relay-double shim: broker unavailable");
        return 1;
    };
    if s.write_all(format!("HELLO {}\n", cmd.replace('\n', " ")).as_bytes()).is_err() {
        return 1;
    }
    let Ok(mut up) = s.try_clone() else { return 1 };
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 65536];
        let mut stdin = io::stdin().lock();
        loop {
            match stdin.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if up.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            }
        }
        let _ = up.shutdown(std::net::Shutdown::Write);
    });
    let mut buf = vec![0u8; 65536];
    let mut out = io::stdout().lock();
    loop {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if out.write_all(&buf[..n]).and_then(|()| out.flush()).is_err() {
                    break;
                }
            }
        }
    }
    // Exit at once: the stdin thread may still block in read().
    std::process::exit(0);
}

/// Reads the keyboard-interactive answer (pam_exec `expose_authtok`: the secret then a NUL) from stdin
/// and accepts it (exit 0) only if DIR holds a file named by its lowercase hex.
fn pam_check(dir: &Path) -> u8 {
    // pam_exec also runs for pam_setcred (no secret then): nothing to set, accept.
    if std::env::var("PAM_TYPE").is_ok_and(|t| t != "auth") {
        return 0;
    }
    let mut secret = Vec::new();
    if io::stdin().take(4096).read_to_end(&mut secret).is_err() {
        return 1;
    }
    while matches!(secret.last(), Some(0 | b'\n' | b'\r')) {
        secret.pop();
    }
    if secret.is_empty() || secret.len() > 256 {
        return 1;
    }
    if dir.join(relay_double::util::hex(&secret)).is_file() { 0 } else { 1 }
}

/// Decodes console escapes: `\r`, `\n`, `\t`, `\e`, `\\`, `\xHH`.
fn unescape(text: &str) -> Vec<u8> {
    let b = text.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 1 < b.len() {
            i += 1;
            match b[i] {
                b'r' => out.push(b'\r'),
                b'n' => out.push(b'\n'),
                b't' => out.push(b'\t'),
                b'e' => out.push(0x1b),
                b'x' if i + 2 < b.len() => match u8::from_str_radix(&text[i + 1..i + 3], 16) {
                    Ok(v) => {
                        out.push(v);
                        i += 2;
                    }
                    Err(_) => out.extend_from_slice(b"\\x"),
                },
                c => out.push(c),
            }
        } else {
            out.push(b[i]);
        }
        i += 1;
    }
    out
}

fn serve(args: &[String]) -> Result<(), String> {
    let mut session = None;
    let mut token = None;
    let mut ki = false;
    let mut viewers = 1u32;
    let mut out_file = None;
    let mut target_keys = None;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--session" => session = it.next().cloned(),
            "--token" => token = it.next().cloned(),
            "--ki" => ki = true,
            "--viewers" => viewers = it.next().and_then(|v| v.parse().ok()).ok_or("--viewers N")?,
            "--out" => out_file = it.next().cloned(),
            "--target-sshd" => target_keys = it.next().cloned(),
            other => return Err(format!("unknown argument {other}")),
        }
    }
    let relay = Relay::start(RelayOpts { ki, ..Default::default() }).map_err(|e| e.to_string())?;
    if let Some(s) = &session {
        relay.register(s, token.as_deref());
    }
    for (k, v) in relay.env() {
        println!("export {k}='{v}'");
    }
    // The customer's SSH target for the demo: support's tunnel login lands here, reading the same
    // authorized_keys file the client edits.
    let _target = match &target_keys {
        Some(path) => {
            let t = relay_double::TargetSshd::start(Path::new(path)).map_err(|e| format!("target sshd: {e}"))?;
            println!("export TUNL_TARGET_HOST='127.0.0.1'");
            println!("export TUNL_TARGET_PORT='{}'", t.port);
            Some(t)
        }
        None => None,
    };
    println!(
        "# relay dir {}; console: k TEXT | chat TEXT | note TEXT | upgrade | revoke | refresh | viewers N | close | raw LINE",
        relay.dir().display()
    );
    let mut output: Box<dyn Write> = match &out_file {
        Some(f) => Box::new(std::fs::File::create(f).map_err(|e| format!("{f}: {e}"))?),
        None => Box::new(io::stdout()),
    };
    let (tx, console) = mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in io::stdin().lock().lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut key: Option<SupportKey> = None;
    let mut req = 0u32;
    stop_on_signals();
    loop {
        eprintln!("[relay] waiting for a client on 127.0.0.1:{}", relay.port());
        let mut conn = loop {
            if let Some(c) = relay.accept(Instant::now() + Duration::from_millis(500)) {
                break c;
            }
            if stopped() {
                return Ok(());
            }
            if let Ok(l) = console.try_recv()
                && l.trim() == "quit"
            {
                return Ok(());
            }
        };
        eprintln!("[relay] hello: {}", conn.hello_raw());
        conn.welcome(viewers);
        loop {
            while let Some(line) = conn.recv_line(Instant::now() + Duration::from_millis(50)) {
                let verb = line.split(' ').next().unwrap_or("");
                match verb {
                    "O" => {
                        if let Some(b) = unb64(&line[2..]) {
                            let _ = output.write_all(&b).and_then(|()| output.flush());
                        }
                    }
                    "CHAT" => eprintln!(
                        "[customer] {}",
                        String::from_utf8_lossy(&unb64(&line[5..]).unwrap_or_default()).escape_debug()
                    ),
                    "SNAP" => {
                        eprintln!("[relay] SNAP {} ({} bytes)", line_field(&line, "size").unwrap_or("?"), line.len())
                    }
                    "PING" | "PONG" => {}
                    "TUNNEL_OPEN" => {
                        eprintln!("[relay] {line}");
                        if let (Some(k), Some(port), Some(user)) =
                            (&key, line_field(&line, "port"), line_field(&line, "user"))
                        {
                            eprintln!(
                                "[relay] log in: ssh -F /dev/null -p {port} -i {} -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null {user}@127.0.0.1",
                                k.private_path.display()
                            );
                        }
                    }
                    _ => eprintln!("[relay] {line}"),
                }
            }
            if conn.is_closed() {
                eprintln!("[relay] link closed");
                break;
            }
            if stopped() {
                return Ok(());
            }
            while let Ok(cmd) = console.try_recv() {
                let (word, rest) = cmd.split_once(' ').unwrap_or((cmd.as_str(), ""));
                let line = match word {
                    "k" => k_line(&unescape(rest)),
                    "chat" => chat_line("support", rest),
                    "note" => note_line(rest),
                    "upgrade" => {
                        let k = SupportKey::generate(relay.dir()).map_err(|e| e.to_string())?;
                        req += 1;
                        let l = relay_double::upgrade_line(&req.to_string(), "support", &k.public_line);
                        key = Some(k);
                        l
                    }
                    "revoke" => "REVOKE".into(),
                    "refresh" => "REFRESH".into(),
                    "viewers" => format!("VIEWERS {}", rest.trim()),
                    "close" => close_line(if rest.is_empty() { "support closed the session" } else { rest }),
                    "raw" => rest.to_string(),
                    // A relay that keeps talking but stops taking the client's lines (review F3).
                    "stop-reading" | "read" => {
                        conn.set_reading(word == "read");
                        continue;
                    }
                    "quit" => return Ok(()),
                    "" => continue,
                    _ => {
                        eprintln!("[relay] unknown console command {word}");
                        continue;
                    }
                };
                conn.send(&line);
            }
        }
    }
}

static STOP: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

extern "C" fn on_stop(_: libc::c_int) {
    STOP.store(true, std::sync::atomic::Ordering::Relaxed);
}

/// SIGINT, SIGTERM and SIGHUP (its terminal closed) end `serve` through the normal return, so the
/// relay's sshd, PAM service file and temp dir are removed as on `quit`.
fn stop_on_signals() {
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        unsafe {
            libc::signal(sig, on_stop as *const () as libc::sighandler_t);
        }
    }
}

fn stopped() -> bool {
    STOP.load(std::sync::atomic::Ordering::Relaxed)
}
