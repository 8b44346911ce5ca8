//! `tunl`: the support engineer's command. It talks to the relay over the engineer's own `ssh`
//! login to the relay's support account (docs/architecture.md, "The support wire protocol").

mod access;
mod chatpane;
mod cli;
mod commands;
mod join;
mod keys;
mod proto;
mod relay;
mod show;
mod term;
mod view;

use cli::Command;
use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    let cmd = match cli::parse_internal(&args) {
        Some(c) => Ok(c),
        None => cli::parse(args),
    };
    let status = match cmd.and_then(run) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("tunl: {}", tunl_wire::neutralize(&e));
            1
        }
    };
    ExitCode::from(status.clamp(0, 255) as u8)
}

fn relay() -> Result<relay::Relay, String> {
    relay::Relay::from_process_env()
}

fn run(cmd: Command) -> Result<i32, String> {
    match cmd {
        Command::Help => {
            print!("{}", cli::USAGE);
            Ok(0)
        }
        Command::Version => {
            println!("tunl {}", env!("CARGO_PKG_VERSION"));
            Ok(0)
        }
        Command::View(dir) => Ok(view::run(&dir)),
        Command::ChatPane(dir) => Ok(chatpane::run(&dir)),
        Command::Ctl(dir, words) => Ok(join::ctl(&dir, &words)),
        Command::Detach => join::detach_command(),
        Command::Create(c) => {
            let r = relay()?;
            let (id, _) = commands::create(&r, &c)?;
            if c.join {
                println!("\nWaiting for the customer to connect...");
                // The relay waits an hour at most per request; the session may expire later.
                commands::expect(&r, &id, (u64::from(c.expires_in) * 60).min(cli::DEFAULT_EXPECT_TIMEOUT))?;
                return join::run(&r, &id, false);
            }
            Ok(0)
        }
        Command::List => commands::list(&relay()?),
        Command::Show(id) => commands::show(&relay()?, &id),
        Command::Pick => {
            let r = relay()?;
            match commands::pick(&r)? {
                commands::Picked::Join(id) => join::run(&r, &id, false),
                commands::Picked::Ssh(id) => {
                    let s = commands::fetch(&r, &id)?;
                    Err(access::exec_ssh(&r, &s.item, &[]))
                }
                commands::Picked::Quit => Ok(0),
            }
        }
        Command::Join { id, read_only } => join::run(&relay()?, &id, read_only),
        Command::Upgrade { id, keys } => commands::upgrade(&relay()?, &id, &keys),
        Command::Revoke(id) => commands::revoke(&relay()?, &id),
        Command::Ssh { id, command } => {
            let r = relay()?;
            let s = commands::fetch(&r, &id)?;
            Err(access::exec_ssh(&r, &s.item, &command))
        }
        Command::Browser { id, profile, kill } => {
            let profile = profile.unwrap_or_else(|| id.clone());
            if kill {
                print!("{}", access::browser_kill(&id, &profile)?);
                return Ok(0);
            }
            let r = relay()?;
            let s = commands::fetch(&r, &id)?;
            print!("{}", access::browser_start(&r, &s.item, &profile)?);
            Ok(0)
        }
        Command::Chat { id, text } => commands::chat(&relay()?, &id, &text),
        Command::Note { id, text } => commands::note(&relay()?, &id, &text),
        Command::Close { id, reason } => commands::close(&relay()?, &id, &reason),
        Command::Cancel(id) => commands::cancel(&relay()?, &id),
        Command::Expect { id, timeout } => commands::expect(&relay()?, &id, timeout),
        Command::Log(id) => commands::log(&relay()?, &id),
    }
}
