//! The one-shot commands: one request to the relay each, its answer said in plain words. Every text
//! printed here comes from the parsers already neutralised.

use crate::cli::Create;
use crate::proto::{Item, Reply, rejected_words};
use crate::relay::{Failure, Relay, request};
use std::io::{BufRead, Write};
use tunl_wire::pct_encode;

/// What a command ends with: its exit status, and an error line for stderr.
pub type Outcome = Result<i32, String>;

pub fn now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

fn fail(sid: Option<&str>, f: Failure) -> String {
    match sid {
        Some(s) => format!("{s}: {}", f.message()),
        None => f.message(),
    }
}

fn simple(
    relay: &Relay,
    sid: &str,
    verb: &str,
    fields: &[(&str, &str)],
    payload: Option<&[u8]>,
) -> Result<Vec<Reply>, String> {
    let mut all = vec![("id", sid)];
    all.extend_from_slice(fields);
    request(relay, verb, &all, payload, |_| {}).map_err(|f| fail(Some(sid), f))
}

pub fn create(relay: &Relay, c: &Create) -> Result<(String, String), String> {
    let (case, customer, exp) = (pct_encode(&c.case), pct_encode(&c.customer), c.expires_in.to_string());
    let lines = request(
        relay,
        "create",
        &[
            ("case", &case),
            ("customer", &customer),
            ("expires", &exp),
            ("restricted", if c.restricted { "1" } else { "0" }),
        ],
        None,
        |_| {},
    )
    .map_err(|f| fail(None, f))?;
    let Some((id, token, expires)) = lines.iter().find_map(|l| match l {
        Reply::Session { id, token, expires } => Some((id.clone(), token.clone(), *expires)),
        _ => None,
    }) else {
        return Err("the relay created no session (no SESSION line in its answer)".into());
    };
    print!("{}", crate::show::created(&id, &token, expires, &c.case, now()));
    if c.restricted {
        println!("\nThe session is watch-only: the customer's side refuses typing and tunnels.");
    }
    Ok((id, token))
}

pub fn items(relay: &Relay) -> Result<Vec<Item>, String> {
    let lines = request(relay, "list", &[], None, |_| {}).map_err(|f| fail(None, f))?;
    Ok(lines
        .into_iter()
        .filter_map(|l| match l {
            Reply::Item(i) => Some(i),
            _ => None,
        })
        .collect())
}

pub fn list(relay: &Relay) -> Outcome {
    let items = items(relay)?;
    if items.is_empty() {
        println!("no sessions (tunl create-session makes one)");
    } else {
        print!("{}", crate::show::table(&items, now()));
    }
    Ok(0)
}

/// Everything `show` answers: the session, its viewers, its recent chat.
pub struct Shown {
    pub item: Item,
    pub viewers: Vec<(String, bool)>,
    pub chat: Vec<(u64, String, String)>,
}

pub fn fetch(relay: &Relay, sid: &str) -> Result<Shown, String> {
    let lines = simple(relay, sid, "show", &[], None)?;
    let mut item = None;
    let mut viewers = Vec::new();
    let mut chat = Vec::new();
    for l in lines {
        match l {
            Reply::Item(i) if i.id == sid => item = Some(i),
            Reply::Viewer { name, ro } => viewers.push((name, ro)),
            Reply::ChatLog { at, from, text } => chat.push((at, from, text)),
            _ => {}
        }
    }
    let item = item.ok_or_else(|| format!("{sid}: the relay's answer did not describe the session"))?;
    Ok(Shown { item, viewers, chat })
}

pub fn show(relay: &Relay, sid: &str) -> Outcome {
    let s = fetch(relay, sid)?;
    print!("{}", crate::show::page(&s.item, &s.viewers, &s.chat, now()));
    Ok(0)
}

pub fn upgrade(relay: &Relay, sid: &str, keys: &[std::path::PathBuf]) -> Outcome {
    let keys = crate::keys::load(keys)?;
    eprintln!("tunl: asking the customer of {sid} for the tunnel (they see a Grant/Deny popup)...");
    let lines = simple(relay, sid, "upgrade", &[], Some(keys.as_bytes()))?;
    for l in lines {
        match l {
            Reply::Tunnel { port, user } => {
                println!("granted: the tunnel is open on the relay's port {port}, log in as {user}: tunl ssh {sid}");
                return Ok(0);
            }
            Reply::Rejected { reason } => return Err(format!("{sid}: {}", rejected_words(&reason))),
            _ => {}
        }
    }
    Err(format!("{sid}: the relay answered without saying whether the tunnel was granted"))
}

pub fn revoke(relay: &Relay, sid: &str) -> Outcome {
    simple(relay, sid, "revoke", &[], None)?;
    println!("{sid}: tunnel revoked; the customer's side removes your keys");
    Ok(0)
}

pub fn chat(relay: &Relay, sid: &str, text: &str) -> Outcome {
    simple(relay, sid, "chat", &[], Some(text.as_bytes()))?;
    Ok(0)
}

pub fn note(relay: &Relay, sid: &str, text: &str) -> Outcome {
    simple(relay, sid, "note", &[], Some(text.as_bytes()))?;
    Ok(0)
}

pub fn close(relay: &Relay, sid: &str, reason: &str) -> Outcome {
    simple(relay, sid, "close", &[("reason", &pct_encode(reason))], None)?;
    println!("{sid}: closed");
    Ok(0)
}

pub fn cancel(relay: &Relay, sid: &str) -> Outcome {
    simple(relay, sid, "cancel", &[], None)?;
    println!("{sid}: cancelled; its token no longer works");
    Ok(0)
}

pub fn expect(relay: &Relay, sid: &str, timeout: u64) -> Outcome {
    let t = timeout.to_string();
    match request(relay, "expect", &[("id", sid), ("timeout", &t)], None, |_| {}) {
        Ok(_) => {
            println!("{sid}: the customer is connected");
            Ok(0)
        }
        Err(Failure::Err(e)) if e.code == "timeout" => {
            Err(format!("{sid}: the customer did not connect within {timeout} s"))
        }
        Err(f) => Err(fail(Some(sid), f)),
    }
}

pub fn log(relay: &Relay, sid: &str) -> Outcome {
    let lines = simple(relay, sid, "log", &[], None)?;
    let mut out = std::io::stdout().lock();
    for l in lines {
        if let Reply::Audit(rec) = l {
            let _ = writeln!(out, "{rec}");
        }
    }
    Ok(0)
}

/// A number from 1 to `n` read from the engineer, or `None` for quit/EOF.
fn choose(prompt: &str, n: usize) -> Option<usize> {
    let stdin = std::io::stdin();
    loop {
        eprint!("{prompt}");
        let mut s = String::new();
        if stdin.lock().read_line(&mut s).ok()? == 0 {
            return None;
        }
        let s = s.trim();
        if s == "q" || s == "quit" {
            return None;
        }
        match s.parse::<usize>() {
            Ok(k) if (1..=n).contains(&k) => return Some(k - 1),
            _ => eprintln!("type a number from 1 to {n}, or q"),
        }
    }
}

/// What the engineer picked in `tunl pick`.
pub enum Picked {
    Join(String),
    Ssh(String),
    Quit,
}

pub fn pick(relay: &Relay) -> Result<Picked, String> {
    let live: Vec<Item> = items(relay)?.into_iter().filter(Item::live).collect();
    let item = match live.len() {
        0 => return Err("no live sessions (tunl list shows pending ones)".into()),
        1 => {
            eprintln!(
                "one live session: {} ({}, {})",
                live[0].id,
                live[0].state,
                if live[0].host.is_empty() { "-" } else { &live[0].host }
            );
            live[0].clone()
        }
        n => {
            let table = crate::show::table(&live, now());
            let mut lines = table.lines();
            eprintln!("    {}", lines.next().unwrap_or_default());
            for (k, l) in lines.enumerate() {
                eprintln!("{:>2}) {l}", k + 1);
            }
            match choose("session> ", n) {
                Some(k) => live[k].clone(),
                None => return Ok(Picked::Quit),
            }
        }
    };
    eprintln!(" 1) join   2) ssh   3) info   4) quit");
    loop {
        match choose("action> ", 4) {
            Some(0) => return Ok(Picked::Join(item.id)),
            Some(1) => return Ok(Picked::Ssh(item.id)),
            Some(2) => {
                let s = fetch(relay, &item.id)?;
                print!("{}", crate::show::page(&s.item, &s.viewers, &s.chat, now()));
            }
            _ => return Ok(Picked::Quit),
        }
    }
}
