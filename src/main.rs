//! linbit-tunl: open a shared terminal session so LINBIT support can assist on this system.

// Until the launcher and daemon use all of it.
#[allow(dead_code)]
mod chat;
#[allow(dead_code)]
mod cli;
#[allow(dead_code)]
mod recording;
#[allow(dead_code)]
mod tmux;
#[allow(dead_code)]
mod ui;

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
