//! The tunnel's effects: what the state machine in `tunnel.rs` decides, carried out. The reverse
//! forward through the ssh master (`mux.rs`, children of the loop), support's keys in our
//! authorized_keys block (`authkeys.rs`), who asked for which request and the customer's number for
//! it (F2), and the grants that wait for a forward (F7: keys go into the file only once the forward
//! is up). Like the state machine it serves it says nothing itself: what the relay, the customer or
//! the log must hear is queued as `Said`, in order, for the daemon to deliver.

use std::time::Instant;

use crate::authkeys;
use crate::cli::Config;
use crate::mux::{self, Mux};
use crate::protocol::{CloseReason, RejectReason};
use crate::tunnel::{self, Effect, Tunnel};
use crate::ui;

/// Something the daemon must deliver for the tunnel, in the order it was said.
#[derive(Debug, PartialEq, Eq)]
pub enum Said {
    /// `debug.log` only.
    Log(String),
    /// `debug.log`, and the terminal in the foreground mode.
    Tell(String),
    /// A line in the chat pane (and the terminal in the foreground mode).
    Chat(String),
    /// Ask the customer about this request: the popup, and the same words in the chat.
    Ask {
        req: String,
        from: String,
    },
    /// The customer changed what happens to requests (`grant`, `revoke`, `block`); the state after.
    Decision {
        word: String,
        state: tunnel::State,
    },
    /// A request granted: keys in the file, the forward on `port`. `TUNNEL_OPEN` and the customer's
    /// chat line.
    Granted {
        req: String,
        from: String,
        port: u16,
    },
    /// An open tunnel announced again, on the new forward after a reconnect.
    TunnelOpen {
        req: String,
        port: u16,
    },
    TunnelRejected {
        req: String,
        from: String,
        reason: RejectReason,
    },
    TunnelClosed(CloseReason),
    /// The reverse forward is up.
    ForwardOpen(u16),
    /// Keys that were in the file are proven gone.
    KeysRemoved,
    /// Keys could not be proven gone; the lines to delete follow as `Log` and `Chat`.
    KeysLeft,
    /// `STATE`, with the tunnel's state and BRB as they were when it was said.
    State {
        tunnel: tunnel::State,
        brb: bool,
    },
    /// The status rows changed.
    Status,
}

/// Who asked for a tunnel request, and with which keys, for what the customer is shown.
struct Requester {
    req: String,
    n: u32,
    from: String,
    /// The keys as `ssh-keygen -lf` prints them.
    keys: Vec<String>,
}

pub struct Grants {
    tunnel: Tunnel,
    /// Whether the relay link is up (a forward needs a master), as the daemon last said.
    link_up: bool,
    forward_port: Option<u16>,
    /// The `ssh -O` clients, run as children of the loop (F20).
    mux: Mux,
    /// Granted requests waiting for the forward: their keys are written only once it is up (F7).
    awaiting: Vec<(String, Vec<String>)>,
    /// Who asked for which tunnel request, for the customer's messages.
    requesters: Vec<Requester>,
    /// The daemon's own number for the next tunnel request (F2).
    next_ask: u32,
    /// The support keys in our authorized_keys block (all granted requests of this session).
    installed: Vec<String>,
    /// The block in the authorized_keys file: options, renewal, verified removal.
    keys: authkeys::KeyBlock,
    user: String,
    target: String,
    said: Vec<Said>,
}

impl Grants {
    pub fn new(cfg: &Config, dir: &std::path::Path) -> Grants {
        Grants {
            tunnel: Tunnel::new(cfg.mode),
            link_up: false,
            forward_port: None,
            mux: Mux::new(dir, &cfg.target_host, cfg.target_port),
            awaiting: Vec::new(),
            requesters: Vec::new(),
            next_ask: 1,
            installed: Vec::new(),
            keys: authkeys::KeyBlock::for_session(&cfg.authkeys_file, &cfg.session_id, &cfg.target_host, dir),
            user: cfg.user.clone(),
            target: format!("{}:{}", cfg.target_host, cfg.target_port),
            said: Vec::new(),
        }
    }

    /// What was said since the last call, in order.
    pub fn said(&mut self) -> Vec<Said> {
        std::mem::take(&mut self.said)
    }

    /// The state machine, to read.
    pub fn tunnel(&self) -> &Tunnel {
        &self.tunnel
    }

    pub fn set_link_up(&mut self, up: bool) {
        self.link_up = up;
    }

    fn say(&mut self, s: Said) {
        self.said.push(s);
    }

    fn say_state(&mut self) {
        let (tunnel, brb) = (self.tunnel.state(), self.tunnel.brb());
        self.say(Said::State { tunnel, brb });
    }

    // ---- what happens to the tunnel ----------------------------------------------------------

    /// The relay's `UPGRADE` (allowed in this mode). `from` is already neutralised.
    pub fn upgrade(&mut self, req: String, from: String, keys: Vec<u8>) {
        // Keys are checked before anyone is asked: a request we could never honour needs no popup.
        let valid = match authkeys::validate_keys(&keys) {
            Ok(k) => k,
            Err(e) => {
                self.say(Said::Log(format!("tunnel request {req} from {from} refused: {e}")));
                self.say(Said::TunnelRejected { req, from, reason: RejectReason::InvalidKey });
                return;
            }
        };
        let shown: Vec<String> = valid
            .iter()
            .map(|k| ui::fingerprint(k).unwrap_or_else(|| "(a key ssh-keygen would not fingerprint)".into()))
            .collect();
        let n = self.next_ask;
        self.next_ask = self.next_ask % 999_999_999 + 1;
        self.requesters.push(Requester { req: req.clone(), n, from: from.clone(), keys: shown });
        if self.requesters.len() > 64 {
            self.requesters.remove(0);
        }
        let fx = self.tunnel.upgrade(&req, &from, keys);
        self.apply(fx, CloseReason::Revoked);
    }

    /// The relay's `REVOKE`.
    pub fn relay_revoke(&mut self) {
        let fx = self.tunnel.relay_revoke();
        self.apply(fx, CloseReason::Relay);
        self.say_state();
    }

    /// The relay welcomed us: a tunnel that was open, or `--tunnel` mode, opens again. Open tunnels
    /// are announced again once the new forward is up (`on_mux`).
    pub fn welcomed(&mut self, first: bool) {
        let fx = if first { self.tunnel.connect() } else { self.tunnel.resume() };
        self.apply(fx, CloseReason::Ended);
    }

    /// The link is gone, and the forward with its master.
    pub fn link_lost(&mut self) {
        self.forward_port = None;
        // Grants waiting for a forward of the old master cannot get one: refused, nothing written.
        self.fail_awaiting();
        self.mux.reset();
        self.tunnel.link_lost();
    }

    /// The customer's answer `grant`/`deny` to the request we numbered `n` (F2); an unknown number
    /// does nothing.
    pub fn answer(&mut self, n: Option<u32>, grant: bool) {
        let req = self.requesters.iter().rev().find(|r| Some(r.n) == n).map(|r| r.req.clone());
        let Some(req) = req else {
            return self.say(Said::Log("ctl: answer for an unknown request dropped".into()));
        };
        let fx = self.tunnel.answer(&req, grant);
        self.apply(fx, CloseReason::Revoked);
        self.say_state();
    }

    /// Nobody can be asked about `req` (no terminal in the foreground): denied.
    pub fn deny_unasked(&mut self, req: &str) {
        let fx = self.tunnel.answer(req, false);
        self.apply(fx, CloseReason::Revoked);
    }

    /// No client of the customer's is attached to show the popup on: the request is answered rather
    /// than left (with the queue behind it) hanging.
    pub fn abandon(&mut self, req: &str) {
        let fx = self.tunnel.abandon(req);
        self.apply(fx, CloseReason::Revoked);
    }

    /// The customer's decision (Ctrl-b u/U/X or the menu): `grant`, `revoke` or `block`; what to tell
    /// them, or why it was refused.
    pub fn decide(&mut self, word: &str) -> Result<&'static str, &'static str> {
        let r = match word {
            "grant" => self.tunnel.grant(),
            "revoke" => self.tunnel.revoke(),
            _ => self.tunnel.block(),
        };
        let fx = r?;
        let state = self.tunnel.state();
        self.say(Said::Decision { word: word.to_string(), state });
        self.apply(fx, CloseReason::Revoked);
        Ok(match (word, self.tunnel.state()) {
            ("grant", tunnel::State::Allowed) => "tunnel requests will be granted without asking (Ctrl-b U to undo)",
            ("grant", tunnel::State::Confirm) => "tunnel requests unblocked: you will be asked for each",
            ("grant", _) => "tunnel already open",
            ("revoke", _) => "tunnel revoked: each request will be asked for again",
            _ => "tunnel requests blocked (Ctrl-b u to unblock)",
        })
    }

    /// BRB on or off.
    pub fn set_brb(&mut self, on: bool) -> Result<(), &'static str> {
        self.tunnel.set_brb(on)
    }

    /// The orderly end: `TUNNEL_CLOSED reason=ended` if a tunnel was open, our block out of the
    /// file, a running mux client gone (the forward dies with the master: no `-O cancel`).
    pub fn end(&mut self) {
        if self.tunnel.state() == tunnel::State::Active {
            self.say(Said::TunnelClosed(CloseReason::Ended));
        }
        let _ = self.remove_keys();
    }

    /// After BYE: a mux client still running goes.
    pub fn stop_mux(&mut self) {
        self.mux.reset();
    }

    /// The request whose popup should be on screen, and who asked.
    pub fn on_screen(&self) -> Option<(String, String)> {
        self.tunnel.on_screen()
    }

    /// What the customer is asked for request `req`.
    pub fn ask(&self, req: &str) -> Option<ui::Ask> {
        let r = self.requesters.iter().rev().find(|r| r.req == req)?;
        Some(ui::Ask {
            n: r.n,
            from: r.from.clone(),
            user: self.user.clone(),
            target: self.target.clone(),
            keys: r.keys.clone(),
        })
    }

    // ---- timers and children -------------------------------------------------------------------

    /// The next timer: a mux client's deadline, the keys' renewal.
    pub fn deadline(&self) -> Option<Instant> {
        match (self.mux.deadline(), self.keys.renew_at()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    pub fn on_timers(&mut self, now: Instant) {
        if self.mux.deadline().is_some_and(|d| now >= d) {
            let out = self.mux.poll(now);
            self.on_mux(out);
        }
        if self.keys.renew_at().is_some_and(|r| now >= r) {
            if let Err(e) = self.keys.renew() {
                self.say(Said::Log(format!("cannot renew the expiry of the support keys: {e}")));
            }
        }
    }

    /// A child ended (SIGCHLD): a mux client may have finished.
    pub fn reap(&mut self, now: Instant) {
        let out = self.mux.poll(now);
        self.on_mux(out);
    }

    // ---- carrying out ----------------------------------------------------------------------------

    /// Who asked for `req` (neutralised), as the customer was shown.
    pub fn requester(&self, req: &str) -> String {
        self.requesters.iter().rev().find(|r| r.req == req).map(|r| r.from.clone()).unwrap_or_default()
    }

    /// Carry out what the tunnel state machine decided. `closed_as` names who closed the tunnel.
    fn apply(&mut self, effects: Vec<Effect>, closed_as: CloseReason) {
        for fx in effects {
            match fx {
                Effect::Popup { req, from } => self.say(Said::Ask { req, from }),
                Effect::Install { req, keys } => self.install(&req, &keys),
                Effect::Reject { req, reason } => {
                    let from = self.requester(&req);
                    if reason == RejectReason::Denied {
                        self.say(Said::Chat(format!("tunnel request from {from} denied")));
                    }
                    self.say(Said::TunnelRejected { req, from, reason });
                }
                Effect::OpenForward => {
                    if self.forward_port.is_none() {
                        let out = self.mux.request(mux::Op::Open);
                        self.on_mux(out);
                    }
                }
                Effect::CancelForward => {
                    if self.forward_port.take().is_some() || self.mux.opening() {
                        let out = self.mux.request(mux::Op::Cancel);
                        self.on_mux(out);
                    }
                }
                Effect::RemoveKeys => {
                    if self.remove_keys() {
                        self.say(Said::Chat("tunnel closed: support keys removed".into()));
                    }
                }
                Effect::Closed(reason) => {
                    let reason = if reason == CloseReason::Revoked { closed_as } else { reason };
                    self.say(Said::TunnelClosed(reason));
                }
            }
        }
        self.say(Said::Status);
    }

    /// A granted request. Transactional (F7): the forward comes first, the keys are written only once
    /// it is up, and `installed` changes only after the file did; a failure at any step leaves the
    /// file as it was and answers the request `error`.
    fn install(&mut self, req: &str, keys: &[u8]) {
        let keys = match authkeys::validate_keys(keys) {
            Ok(k) => k,
            Err(_) => {
                let fx = self.tunnel.failed(req, RejectReason::InvalidKey);
                return self.apply(fx, CloseReason::Revoked);
            }
        };
        if self.forward_port.is_some() {
            return self.commit_keys(vec![(req.to_string(), keys)]);
        }
        if !self.link_up || self.awaiting.len() >= tunnel::MAX_QUEUED {
            // No master to forward through (the link is down), or too many grants in flight.
            self.say(Said::Log(format!("tunnel request {req}: no forward can be opened now")));
            let fx = self.tunnel.failed(req, RejectReason::Error);
            return self.apply(fx, CloseReason::Revoked);
        }
        self.awaiting.push((req.to_string(), keys));
        let out = self.mux.request(mux::Op::Open);
        self.on_mux(out);
    }

    /// Write the block with the keys of `batch` added, then announce each request.
    fn commit_keys(&mut self, batch: Vec<(String, Vec<String>)>) {
        if batch.is_empty() {
            return;
        }
        let Some(port) = self.forward_port else { return self.fail_batch(batch) };
        let mut all = self.installed.clone();
        for k in batch.iter().flat_map(|(_, keys)| keys) {
            // A key granted again (a second request of the same engineer) is in the block once.
            if !all.contains(k) {
                all.push(k.clone());
            }
        }
        if let Err(e) = self.keys.write(&all) {
            self.say(Said::Tell(format!("cannot install support keys: {e}")));
            return self.fail_batch(batch);
        }
        self.installed = all;
        for (req, _) in batch {
            self.tunnel.opened(&req);
            let from = self.requester(&req);
            self.say(Said::Granted { req, from, port });
        }
        self.say_state();
        self.say(Said::Status);
    }

    fn fail_batch(&mut self, batch: Vec<(String, Vec<String>)>) {
        for (req, _) in batch {
            let fx = self.tunnel.failed(&req, RejectReason::Error);
            self.apply(fx, CloseReason::Revoked);
        }
    }

    fn fail_awaiting(&mut self) {
        let batch = std::mem::take(&mut self.awaiting);
        self.fail_batch(batch);
    }

    /// What the finished `ssh -O` clients did.
    fn on_mux(&mut self, outcomes: Vec<mux::Outcome>) {
        for o in outcomes {
            match o {
                mux::Outcome::Opened(port) if self.mux.cancel_ahead() => {
                    // Revoked while it was opening: the queued cancel closes it; nothing waits for it.
                    self.say(Said::Log(format!("reverse tunnel on relay port {port} opened after a revoke: closing")));
                    self.fail_awaiting();
                }
                mux::Outcome::Opened(port) => {
                    self.forward_port = Some(port);
                    self.tunnel.forward_opened();
                    self.say(Said::ForwardOpen(port));
                    // After a reconnect: the tunnels that were open are open again, on the new port.
                    for req in self.tunnel.open_reqs().to_vec() {
                        self.say(Said::TunnelOpen { req, port });
                    }
                    let batch = std::mem::take(&mut self.awaiting);
                    self.commit_keys(batch);
                }
                mux::Outcome::OpenFailed(why) => {
                    self.say(Said::Log(why));
                    self.fail_awaiting();
                    let fx = self.tunnel.forward_failed();
                    if !fx.is_empty() {
                        self.say(Said::Tell(
                            "the reverse tunnel could not be opened again: support keys removed".into(),
                        ));
                    }
                    self.apply(fx, CloseReason::Relay);
                    self.say_state();
                }
                mux::Outcome::Cancelled(Some(e)) => self.say(Said::Log(format!("ssh -O cancel failed: {e}"))),
                mux::Outcome::Cancelled(None) => self.say(Said::Log("reverse tunnel closed".into())),
            }
        }
    }

    /// Whether the keys are gone (verified by reading the file again).
    fn remove_keys(&mut self) -> bool {
        let had = !std::mem::take(&mut self.installed).is_empty();
        // On failure the journal stays in the session directory: the launcher tries again at the
        // end and, if the keys are still there, tells the customer which lines to delete (F12).
        match self.keys.remove() {
            Ok(()) => {
                if had {
                    self.say(Said::KeysRemoved);
                }
                true
            }
            Err(left) => {
                self.say(Said::KeysLeft);
                for line in left.message() {
                    self.say(Said::Log(line.clone()));
                    self.say(Said::Chat(line));
                }
                false
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::OsString;

    const ED: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl eng@linbit";

    fn grants() -> Grants {
        let env = vec![("USER".to_string(), "root".to_string()), ("HOME".to_string(), "/root".to_string())];
        let args = ["swift-fox-jumps-barrel"].map(OsString::from);
        let cfg = match crate::cli::parse(args, &env) {
            Ok(crate::cli::Action::Run(c)) => *c,
            other => panic!("{other:?}"),
        };
        // Nothing here reaches the file or runs ssh: no forward is ever opened.
        Grants::new(&cfg, std::path::Path::new("/nonexistent-linbit-tunl-test"))
    }

    #[test]
    fn keys_that_cannot_be_installed_are_refused_before_anyone_is_asked() {
        let mut g = grants();
        g.upgrade("r1".into(), "eng".into(), b"not a key".to_vec());
        let said = g.said();
        assert!(matches!(&said[0], Said::Log(l) if l.contains("tunnel request r1 from eng refused")), "{said:?}");
        assert_eq!(
            said[1],
            Said::TunnelRejected { req: "r1".into(), from: "eng".into(), reason: RejectReason::InvalidKey }
        );
        assert_eq!(said.len(), 2);
        assert!(g.on_screen().is_none());
    }

    #[test]
    fn a_request_is_asked_by_our_number_and_a_denial_is_said_in_order() {
        let mut g = grants();
        g.upgrade("p:1@x".into(), "eng".into(), ED.as_bytes().to_vec());
        assert_eq!(g.said(), vec![Said::Ask { req: "p:1@x".into(), from: "eng".into() }, Said::Status]);
        let ask = g.ask("p:1@x").expect("asked");
        assert_eq!((ask.n, ask.from.as_str(), ask.keys.len()), (1, "eng", 1));
        assert!(ask.keys[0].starts_with("256 SHA256:"), "{:?}", ask.keys);
        // An answer names our number, never the relay's request ID (F2); an unknown number does nothing.
        g.answer(Some(7), true);
        assert_eq!(g.said(), vec![Said::Log("ctl: answer for an unknown request dropped".into())]);
        g.answer(Some(ask.n), false);
        let said = g.said();
        assert_eq!(
            said,
            vec![
                Said::Chat("tunnel request from eng denied".into()),
                Said::TunnelRejected { req: "p:1@x".into(), from: "eng".into(), reason: RejectReason::Denied },
                Said::Status,
                Said::State { tunnel: g.tunnel().state(), brb: false },
            ]
        );
        assert!(g.on_screen().is_none());
    }
}
