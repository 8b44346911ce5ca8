//! linbit-tunl: open a shared terminal session so LINBIT support can assist on this system.

mod auth;
mod authkeys;
mod chat;
mod cli;
mod console;
mod control;
mod daemon;
mod grants;
mod json;
mod keeper;
mod launcher;
mod link;
mod marks;
mod mux;
mod proc;
mod protocol;
mod recording;
mod sessiondir;
mod signals;
mod ssh;
mod text;
mod tmux;
mod tunnel;
mod ui;

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

/// One line for the customer on stderr. A full or closed stderr loses the line; it never ends the
/// program with a panic (`eprintln!` would).
pub fn say(msg: &str) {
    let _ = writeln!(std::io::stderr().lock(), "linbit-tunl: {msg}");
}

/// `--help` and `--version` output. A reader that went away (`| head -1`) is not an error; a full
/// device is, said on stderr, exit 1.
fn print_stdout(text: &str) -> ExitCode {
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
        Err(e) => {
            say(&format!("cannot write to standard output: {e}"));
            ExitCode::from(1)
        }
    }
}

/// A bug must still end with the manual's "fatal error" status and a line, not SIGABRT's 134 (the
/// release profile aborts on panic; the hook runs first). The launcher's fallback removes the keys
/// when a daemon ends this way.
fn exit_1_on_panic() {
    std::panic::set_hook(Box::new(|info| {
        say(&format!("internal error: {info}"));
        std::process::exit(1);
    }));
}

/// Ask for the token (`--token -`): on a terminal without echo, else one line from stdin.
fn ask_token() -> Result<String, String> {
    use rustix::termios;
    let stdin = rustix::stdio::stdin();
    let saved = termios::tcgetattr(stdin).ok();
    if let Some(t) = &saved {
        let _ = write!(std::io::stderr().lock(), "LINBIT support token (six digits, not shown): ");
        let mut quiet = t.clone();
        quiet.local_modes.remove(termios::LocalModes::ECHO);
        let _ = termios::tcsetattr(stdin, termios::OptionalActions::Flush, &quiet);
    }
    let mut line = String::new();
    let read = std::io::stdin().read_line(&mut line);
    if let Some(t) = &saved {
        let _ = termios::tcsetattr(stdin, termios::OptionalActions::Now, t);
        let _ = writeln!(std::io::stderr().lock());
    }
    read.map_err(|e| format!("--token -: cannot read the token: {e}"))?;
    cli::token_from_line(&line).map_err(|e| e.0)
}

/// Overwrite the value of `--token N` in our own argv, which every local user can read in
/// /proc/PID/cmdline while the session runs (sudo's copy is out of our reach: the README says to
/// use TUNL_TOKEN or `--token -`). The kernel serves cmdline from this memory, so overwriting it in
/// place is enough; std has already copied the arguments.
fn hide_token_in_argv(token: &str) {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else { return };
    // Fields after the command name (which may hold spaces) start at the last ')'; arg_start and
    // arg_end are fields 48 and 49 (Linux >= 3.5).
    let Some(rest) = stat.rfind(')').map(|i| &stat[i + 2..]) else { return };
    let f: Vec<&str> = rest.split(' ').collect();
    let (Some(Ok(start)), Some(Ok(end))) =
        (f.get(45).map(|v| v.parse::<usize>()), f.get(46).map(|v| v.parse::<usize>()))
    else {
        return;
    };
    if start == 0 || end <= start || end - start > 1 << 20 {
        return;
    }
    // SAFETY: [arg_start, arg_end) is this process's argument area on its initial stack, mapped and
    // writable for the life of the process, and no Rust reference to it exists (std copied argv
    // into its own Strings before main).
    let area = unsafe { std::slice::from_raw_parts_mut(start as *mut u8, end - start) };
    let mut prev_was_flag = false;
    for arg in area.split_mut(|&b| b == 0) {
        let is_flag = arg == b"--token";
        if prev_was_flag && arg == token.as_bytes() {
            arg.fill(b'x');
        } else if arg.starts_with(b"--token=") && &arg[8..] == token.as_bytes() {
            arg[8..].fill(b'x');
        }
        prev_was_flag = is_flag;
    }
}

/// Find an executable on PATH, as the shell would.
pub fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|d| d.join(name)).find(|p| is_executable(p))
}

/// A regular file with an execute bit.
pub fn is_executable(p: &std::path::Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Internal roles (see docs/architecture.md): started by the launcher and by tmux key bindings,
/// always with the session directory as their only input.
fn internal(args: &[std::ffi::OsString]) -> Option<u8> {
    let role = args.first()?.to_str()?;
    let dir = std::path::Path::new(args.get(1)?);
    let rest: Vec<String> = args[2..].iter().map(|a| a.to_string_lossy().into_owned()).collect();
    match role {
        "__daemon" => Some(launcher::daemon_main(dir)),
        "__chat" => Some(chat::run(dir) as u8),
        "__shell" => Some(keeper::run(dir) as u8),
        "__ctl" => Some(chat::ctl(dir, &rest) as u8),
        _ => None,
    }
}

fn main() -> ExitCode {
    exit_1_on_panic();
    let args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    if let Some(status) = internal(&args) {
        return ExitCode::from(status);
    }
    let env = cli::environment();
    let mut cfg = match cli::parse(args, &env) {
        Ok(cli::Action::Help) => return print_stdout(cli::USAGE),
        Ok(cli::Action::Version) => return print_stdout(&format!("linbit-tunl {}\n", cli::VERSION)),
        Ok(cli::Action::Run(cfg)) => cfg,
        Err(e) => {
            say(&e.0);
            return ExitCode::from(1);
        }
    };
    // Nothing we start inherits the token through the environment (the shared shell least of all).
    // SAFETY: no other thread exists yet.
    unsafe { std::env::remove_var("TUNL_TOKEN") };
    if let Some(t) = &cfg.token {
        hide_token_in_argv(t);
    }
    if cfg.mode != cli::Mode::Tunnel && which("tmux").is_none() {
        say("tmux is not installed or not on PATH; install tmux, or use --tunnel (the only mode without tmux)");
        return ExitCode::from(1);
    }
    if which("ssh").is_none() {
        say("ssh (the OpenSSH client) is not installed or not on PATH; install openssh-client");
        return ExitCode::from(1);
    }
    if cfg.ask_token {
        match ask_token() {
            Ok(t) => cfg.token = Some(t),
            Err(e) => {
                say(&e);
                return ExitCode::from(1);
            }
        }
        cfg.ask_token = false;
    }
    ExitCode::from(launcher::run(*cfg))
}
