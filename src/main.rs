//! linbit-tunl: open a shared terminal session so LINBIT support can assist on this system.

mod auth;
mod authkeys;
mod chat;
mod cli;
mod daemon;
mod json;
mod launcher;
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

use std::path::PathBuf;
use std::process::ExitCode;

/// Find an executable on PATH, as the shell would.
pub fn which(name: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| std::fs::metadata(p).map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0).unwrap_or(false))
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
        "__ctl" => Some(chat::ctl(dir, &rest) as u8),
        _ => None,
    }
}

fn main() -> ExitCode {
    let args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    if let Some(status) = internal(&args) {
        return ExitCode::from(status);
    }
    let env = cli::environment();
    let cfg = match cli::parse(args, &env) {
        Ok(cli::Action::Help) => {
            print!("{}", cli::USAGE);
            return ExitCode::SUCCESS;
        }
        Ok(cli::Action::Version) => {
            println!("linbit-tunl {}", cli::VERSION);
            return ExitCode::SUCCESS;
        }
        Ok(cli::Action::Run(cfg)) => cfg,
        Err(e) => {
            eprintln!("linbit-tunl: {e}");
            return ExitCode::from(1);
        }
    };
    if cfg.mode != cli::Mode::Tunnel && which("tmux").is_none() {
        eprintln!(
            "linbit-tunl: tmux is not installed or not on PATH; install tmux, or use --tunnel (the only mode without tmux)"
        );
        return ExitCode::from(1);
    }
    if which("ssh").is_none() {
        eprintln!("linbit-tunl: ssh (the OpenSSH client) is not installed or not on PATH; install openssh-client");
        return ExitCode::from(1);
    }
    ExitCode::from(launcher::run(*cfg))
}
