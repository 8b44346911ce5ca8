//! `tunl-relay`: the relay a support team deploys. One subcommand a concern; see
//! docs/architecture.md ("The relay and the support side") for the processes and who runs each.

use std::process::ExitCode;

fn usage() -> &'static str {
    "usage: tunl-relay init|serve|api|produce|broker|support|pam-ki|status|expire [OPTIONS]"
}

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let Some(cmd) = args.next() else {
        eprintln!("{}", usage());
        return ExitCode::from(1);
    };
    eprintln!("tunl-relay: {cmd}: not built yet");
    ExitCode::from(1)
}
