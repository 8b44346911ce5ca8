//! `tunl`: the support engineer's command. It talks to the relay over the engineer's own `ssh`
//! login to the relay's support account (docs/architecture.md, "The support wire protocol").

use std::process::ExitCode;

fn main() -> ExitCode {
    eprintln!("tunl: not built yet");
    ExitCode::from(1)
}
