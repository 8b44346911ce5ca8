//! `tunl-relay`: the relay a support team deploys. One subcommand a concern; see
//! docs/architecture.md ("The relay and the support side") for the processes and who runs each.

use std::path::PathBuf;
use std::process::ExitCode;

use tunl_relay::layout::Layout;

fn usage() -> &'static str {
    "usage: tunl-relay init|serve|api|produce|broker|support|pam-ki|status|expire [--root DIR] [OPTIONS]\n\
     \n\
     produce [--root DIR]      the customers' ForceCommand (hello from SSH_ORIGINAL_COMMAND)\n\
     broker [--root DIR] SID   one session's broker (started by produce)\n\
     support [--root DIR]      the support accounts' ForceCommand (tunl-support/1)"
}

fn fail(msg: impl std::fmt::Display) -> ExitCode {
    eprintln!("tunl-relay: {msg}");
    ExitCode::from(1)
}

/// `--root DIR` and the positional arguments, in order.
fn root_and_args(args: &[std::ffi::OsString]) -> Result<(Layout, Vec<String>), String> {
    let mut root = PathBuf::from("/");
    let mut rest = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let a = a.to_str().ok_or("arguments must be UTF-8")?;
        if a == "--root" {
            root = PathBuf::from(it.next().ok_or("--root needs a directory")?);
        } else if let Some(r) = a.strip_prefix("--root=") {
            root = PathBuf::from(r);
        } else if a.starts_with('-') {
            return Err(format!("unknown option {a}"));
        } else {
            rest.push(a.to_string());
        }
    }
    Ok((Layout::new(root), rest))
}

fn main() -> ExitCode {
    let args: Vec<_> = std::env::args_os().skip(1).collect();
    let Some(cmd) = args.first().and_then(|a| a.to_str()) else {
        eprintln!("{}", usage());
        return ExitCode::from(1);
    };
    let (layout, rest) = match root_and_args(&args[1..]) {
        Ok(x) => x,
        Err(e) => return fail(format!("{cmd}: {e}")),
    };
    match (cmd, rest.as_slice()) {
        ("produce", []) => ExitCode::from(tunl_relay::produce::produce(&layout)),
        ("support", []) => ExitCode::from(tunl_relay::support::support(&layout)),
        ("broker", [sid]) => match tunl_relay::broker_main::run(&layout, sid) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => fail(format!("broker {sid}: {e}")),
        },
        ("-h" | "--help" | "help", _) => {
            println!("{}", usage());
            ExitCode::SUCCESS
        }
        (other, _) => fail(format!("{other}: unknown command or wrong arguments\n{}", usage())),
    }
}
