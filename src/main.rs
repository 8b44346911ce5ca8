//! linbit-tunl: open a shared terminal session so LINBIT support can assist on this system.

// The authentication, SSH and JSON building blocks land before the daemon that calls them.
#[allow(dead_code)]
mod auth;
mod cli;
#[allow(dead_code)]
mod json;
#[allow(dead_code)]
mod ssh;

use std::process::ExitCode;

fn main() -> ExitCode {
    let env = cli::environment();
    match cli::parse(std::env::args_os().skip(1), &env) {
        Ok(cli::Action::Help) => {
            print!("{}", cli::USAGE);
            ExitCode::SUCCESS
        }
        Ok(cli::Action::Version) => {
            println!("linbit-tunl {}", cli::VERSION);
            ExitCode::SUCCESS
        }
        Ok(cli::Action::Run(_cfg)) => {
            eprintln!("linbit-tunl: not implemented yet");
            ExitCode::from(1)
        }
        Err(e) => {
            eprintln!("linbit-tunl: {e}");
            ExitCode::from(1)
        }
    }
}
