//! `tunl-relay`: the relay a support team deploys. One subcommand a concern; see docs/architecture.md
//! ("The relay and the support side") for the processes and who runs each.

use std::path::PathBuf;
use std::process::ExitCode;

use lexopt::prelude::*;
use tunl_relay::init::{InitOpts, init};
use tunl_relay::layout::Layout;

fn usage() -> &'static str {
    "usage: tunl-relay init|serve|api|produce|broker|support|pam-ki|status|expire [--root DIR] [OPTIONS]\n\
     \n\
     init [--root DIR] [--port N] [--api-port N] [--customer-user NAME] [--support-group NAME]\n\
     \x20    [--pam-service NAME] [--listen ADDR] [--host-name NAME]...\n\
     \x20    [--tls-self-signed] [--idle-minutes N] [--retain-days N]\n\
     serve [--root DIR]        run the sshd instance and the API in the foreground\n\
     api [--root DIR]          the HTTPS signing API\n\
     pam-ki [--root DIR]       keyboard-interactive check (pam_exec, answer on stdin)\n\
     status [--root DIR]       sessions, viewers, tunnels\n\
     expire [--root DIR]       end pending and idle sessions, apply retention\n\
     produce [--root DIR]      the customers' ForceCommand (hello from SSH_ORIGINAL_COMMAND)\n\
     broker [--root DIR] SID   one session's broker (started by produce)\n\
     support [--root DIR]      the support accounts' ForceCommand (tunl-support/1)"
}

/// One clear line, exit 1.
fn fail(msg: impl std::fmt::Display) -> ExitCode {
    eprintln!("tunl-relay: {msg}");
    ExitCode::from(1)
}

fn parse_init(mut p: lexopt::Parser) -> Result<InitOpts, lexopt::Error> {
    let mut o = InitOpts::default();
    while let Some(arg) = p.next()? {
        match arg {
            Long("root") => o.root = PathBuf::from(p.value()?),
            Long("port") => o.port = p.value()?.parse()?,
            Long("api-port") => o.api_port = p.value()?.parse()?,
            Long("customer-user") => o.customer_user = p.value()?.string()?,
            Long("support-group") => o.support_group = p.value()?.string()?,
            Long("pam-service") => o.pam_service = p.value()?.string()?,
            Long("listen") => o.listen = p.value()?.string()?,
            Long("host-name") => o.host_names.push(p.value()?.string()?),
            Long("tls-self-signed") => o.tls_self_signed = true,
            Long("idle-minutes") => o.idle_minutes = p.value()?.parse()?,
            Long("retain-days") => o.retain_days = p.value()?.parse()?,
            _ => return Err(arg.unexpected()),
        }
    }
    Ok(o)
}

/// `--root DIR` and the positional arguments, in order (produce, broker, support).
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

/// The session processes (relay-b's): `--root DIR` and positional arguments.
fn session_process(cmd: &str, args: &[std::ffi::OsString]) -> ExitCode {
    let (layout, rest) = match root_and_args(args) {
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
        (other, _) => fail(format!("{other}: wrong arguments\n{}", usage())),
    }
}

/// `--root DIR` only.
fn parse_root(mut p: lexopt::Parser) -> Result<PathBuf, lexopt::Error> {
    let mut root = PathBuf::from("/");
    while let Some(arg) = p.next()? {
        match arg {
            Long("root") => root = PathBuf::from(p.value()?),
            _ => return Err(arg.unexpected()),
        }
    }
    Ok(root)
}

fn main() -> ExitCode {
    let mut args = std::env::args_os().skip(1);
    let Some(cmd) = args.next() else {
        eprintln!("{}", usage());
        return ExitCode::from(1);
    };
    let rest: Vec<_> = args.collect();
    if let Some(c @ ("produce" | "support" | "broker")) = cmd.to_str() {
        return session_process(c, &rest);
    }
    let p = lexopt::Parser::from_args(rest);
    match cmd.to_str().unwrap_or("") {
        "init" => match parse_init(p) {
            Ok(o) => match init(&o) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => fail(format!("init: {e}")),
            },
            Err(e) => fail(format!("init: {e}")),
        },
        "serve" => with_root(p, "serve", |l| tunl_relay::serve::serve(&l)),
        "api" => with_root(p, "api", |l| tunl_relay::api::run(&l)),
        "status" => with_root(p, "status", |l| tunl_relay::ops::status(&l)),
        "expire" => with_root(p, "expire", |l| tunl_relay::ops::expire(&l)),
        "pam-ki" => match parse_root(p) {
            Ok(root) => ExitCode::from(tunl_relay::pam_ki::pam_ki(&Layout::new(root))),
            Err(e) => fail(format!("pam-ki: {e}")),
        },
        "-h" | "--help" | "help" => {
            println!("{}", usage());
            ExitCode::SUCCESS
        }
        other => fail(format!("{other}: unknown command\n{}", usage())),
    }
}

/// Subcommands that take `--root DIR` only.
fn with_root(p: lexopt::Parser, name: &str, f: impl FnOnce(Layout) -> Result<(), String>) -> ExitCode {
    match parse_root(p) {
        Ok(root) => match f(Layout::new(root)) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => fail(format!("{name}: {e}")),
        },
        Err(e) => fail(format!("{name}: {e}")),
    }
}
