//! The tunnel state machine (pure): what the customer's keys, the relay's UPGRADE/REVOKE and BRB do to
//! the reverse-tunnel state, expressed as explicit effects that the daemon carries out.
//!
//! Decisions (to be recorded in docs/architecture.md):
//! - `u` (grant): Confirm -> Allowed (pre-grant); Blocked -> Confirm (unblock: requests ask again);
//!   Allowed/Active: no change; Off: refused.
//! - `U` and relay `REVOKE`: Active -> Confirm (cancel forward, remove keys, `TUNNEL_CLOSED revoked`);
//!   Allowed -> Confirm (clears the pre-grant; with `--tunnel` the pre-opened forward is cancelled too).
//! - `X` (block): from Confirm/Allowed/Active -> Blocked; an active tunnel is revoked first, a pending
//!   popup is answered `TUNNEL_REJECTED blocked`. Off: refused.
//! - UPGRADE: Off -> reject `restricted`; Blocked -> `blocked`; BRB on -> `brb` (nobody is there to
//!   decide, and a tunnel would defeat BRB); Confirm -> popup;
//!   Allowed -> install without popup; Active -> install without popup if the tunnel was pre-granted
//!   (`u` or `--tunnel`), else popup.
//! - One popup at a time: a request that needs asking while a popup is open is queued (up to
//!   `MAX_QUEUED`, beyond that `error`) and decided when its turn comes, against the state *then*
//!   (blocked meanwhile -> `blocked`, pre-granted meanwhile -> installed without asking). A popup the
//!   daemon could not show (no customer client) is answered `error` and the queue moves on. A popup
//!   dismissed without an answer (Escape) is shown again by the daemon until it is answered.
//! - BRB is refused while Active. `--tunnel` starts Allowed (pre-granted) with the forward opened at
//!   connect; `TUNNEL_OPEN` is sent per request once its keys are installed.
//! - All requests of a session share the one authorized_keys block; the daemon rewrites the block with
//!   the union of installed keys.

use std::collections::VecDeque;

use crate::cli::Mode;
use crate::protocol::{CloseReason, RejectReason};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    Confirm,
    Allowed,
    Blocked,
    Active,
    Off,
}

impl State {
    /// The name used in `STATE tunnel=...`.
    pub fn wire(self) -> &'static str {
        match self {
            State::Confirm => "confirm",
            State::Allowed => "allowed",
            State::Blocked => "blocked",
            State::Active => "active",
            State::Off => "off",
        }
    }
}

/// Something the daemon must do, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Effect {
    /// Show the Grant/Deny popup for this request (answer with `Tunnel::answer`).
    Popup { req: String, from: String },
    /// Validate the keys, install them (block rewrite), make sure the forward is open, then call
    /// `Tunnel::opened` (sends `TUNNEL_OPEN`) or `Tunnel::failed`.
    Install { req: String, keys: Vec<u8> },
    /// Send `TUNNEL_REJECTED req=ID reason=R`.
    Reject { req: String, reason: RejectReason },
    /// `ssh -O forward -R ...` (only with `--tunnel`, at connect).
    OpenForward,
    /// `ssh -O cancel ...`.
    CancelForward,
    /// Remove our authorized_keys block.
    RemoveKeys,
    /// Send `TUNNEL_CLOSED reason=R`.
    Closed(CloseReason),
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Pending {
    req: String,
    from: String,
    keys: Vec<u8>,
}

/// Requests waiting for the customer, the one on screen included.
pub const MAX_QUEUED: usize = 8;

#[derive(Clone, Debug)]
pub struct Tunnel {
    state: State,
    /// Entered Allowed through `u` or `--tunnel`: requests are installed without asking.
    pregrant: bool,
    brb: bool,
    forward_open: bool,
    /// The request whose popup is on screen (front), then the ones waiting for their turn.
    pending: VecDeque<Pending>,
    /// Requests whose keys are installed and announced with `TUNNEL_OPEN`.
    open_reqs: Vec<String>,
    /// Our block is (or may be) in authorized_keys. Kept apart from the state so that every way out
    /// of `active` removes it, whatever the state says (F7: keys only while `active`).
    keys_in: bool,
    /// `--tunnel`: the forward belongs to the whole session, not to one grant.
    tunnel_mode: bool,
}

impl Tunnel {
    pub fn new(mode: Mode) -> Tunnel {
        let state = match mode {
            Mode::Share => State::Confirm,
            Mode::Restricted => State::Off,
            Mode::Tunnel => State::Allowed,
        };
        Tunnel {
            state,
            pregrant: mode == Mode::Tunnel,
            brb: false,
            forward_open: false,
            pending: VecDeque::new(),
            open_reqs: Vec::new(),
            keys_in: false,
            tunnel_mode: mode == Mode::Tunnel,
        }
    }

    pub fn state(&self) -> State {
        self.state
    }
    pub fn brb(&self) -> bool {
        self.brb
    }
    #[cfg(test)]
    pub fn forward_open(&self) -> bool {
        self.forward_open
    }
    /// Requests with installed keys (to re-announce with `TUNNEL_OPEN` after a reconnect).
    pub fn open_reqs(&self) -> &[String] {
        &self.open_reqs
    }

    /// At connect: with `--tunnel` the forward is opened up front.
    pub fn connect(&mut self) -> Vec<Effect> {
        if self.state == State::Allowed && self.pregrant && !self.forward_open {
            vec![Effect::OpenForward]
        } else {
            Vec::new()
        }
    }

    /// The daemon opened the forward (for `OpenForward` or as part of `Install`).
    pub fn forward_opened(&mut self) {
        self.forward_open = true;
    }

    /// An accepted `UPGRADE` (after `protocol::allowed`).
    pub fn upgrade(&mut self, req: &str, from: &str, keys: Vec<u8>) -> Vec<Effect> {
        let reject = |reason| vec![Effect::Reject { req: req.to_string(), reason }];
        match self.state {
            State::Off => return reject(RejectReason::Restricted),
            State::Blocked => return reject(RejectReason::Blocked),
            _ if self.brb => return reject(RejectReason::Brb),
            _ => {}
        }
        let ask = match self.state {
            State::Confirm => true,
            State::Allowed => false,
            State::Active => !self.pregrant,
            State::Off | State::Blocked => unreachable!(),
        };
        if ask {
            if self.pending.len() >= MAX_QUEUED {
                return reject(RejectReason::Error);
            }
            self.pending.push_back(Pending { req: req.to_string(), from: from.to_string(), keys });
            if self.pending.len() == 1 {
                vec![Effect::Popup { req: req.to_string(), from: from.to_string() }]
            } else {
                // Answered, not lost: asked once the popup on screen is answered.
                Vec::new()
            }
        } else {
            vec![Effect::Install { req: req.to_string(), keys }]
        }
    }

    /// The customer answered the popup for `req`. A stale answer (no such pending request) does nothing.
    pub fn answer(&mut self, req: &str, grant: bool) -> Vec<Effect> {
        if self.pending.front().is_none_or(|p| p.req != req) {
            return Vec::new();
        }
        let p = self.pending.pop_front().expect("checked");
        let mut fx = if !grant {
            vec![Effect::Reject { req: p.req, reason: RejectReason::Denied }]
        } else {
            match self.state {
                State::Blocked => vec![Effect::Reject { req: p.req, reason: RejectReason::Blocked }],
                State::Off => vec![Effect::Reject { req: p.req, reason: RejectReason::Restricted }],
                _ if self.brb => vec![Effect::Reject { req: p.req, reason: RejectReason::Brb }],
                _ => vec![Effect::Install { req: p.req, keys: p.keys }],
            }
        };
        fx.extend(self.next_in_queue());
        fx
    }

    /// The request whose popup is (or should be) on screen, with who asks.
    pub fn on_screen(&self) -> Option<(String, String)> {
        self.pending.front().map(|p| (p.req.clone(), p.from.clone()))
    }

    /// The popup for `req` could not be shown (no customer client): answer it `error` and move on.
    pub fn abandon(&mut self, req: &str) -> Vec<Effect> {
        if self.pending.front().is_none_or(|p| p.req != req) {
            return Vec::new();
        }
        let p = self.pending.pop_front().expect("checked");
        let mut fx = vec![Effect::Reject { req: p.req, reason: RejectReason::Error }];
        fx.extend(self.next_in_queue());
        fx
    }

    /// Decide queued requests against the current state until one needs a popup (shown) or none is left.
    fn next_in_queue(&mut self) -> Vec<Effect> {
        let mut fx = Vec::new();
        while let Some(p) = self.pending.front() {
            let reason = match self.state {
                State::Off => Some(RejectReason::Restricted),
                State::Blocked => Some(RejectReason::Blocked),
                _ if self.brb => Some(RejectReason::Brb),
                _ => None,
            };
            let ask = match self.state {
                State::Confirm => true,
                State::Active => !self.pregrant,
                _ => false,
            };
            if reason.is_none() && ask {
                fx.push(Effect::Popup { req: p.req.clone(), from: p.from.clone() });
                break;
            }
            let p = self.pending.pop_front().expect("front exists");
            fx.push(match reason {
                Some(reason) => Effect::Reject { req: p.req, reason },
                None => Effect::Install { req: p.req, keys: p.keys },
            });
        }
        fx
    }

    /// Keys installed and the forward is up: the daemon now sends `TUNNEL_OPEN`.
    pub fn opened(&mut self, req: &str) {
        self.forward_open = true;
        self.keys_in = true;
        if !self.open_reqs.iter().any(|r| r == req) {
            self.open_reqs.push(req.to_string());
        }
        self.state = State::Active;
    }

    /// Installing failed. The daemon installs transactionally (forward first, keys only once it is
    /// up), so no key of this request is in the file; a forward opened only for it goes again.
    pub fn failed(&mut self, req: &str, reason: RejectReason) -> Vec<Effect> {
        let mut fx = vec![Effect::Reject { req: req.to_string(), reason }];
        if self.forward_open && self.open_reqs.is_empty() && !self.tunnel_mode {
            self.forward_open = false;
            fx.push(Effect::CancelForward);
        }
        fx
    }

    /// An `OpenForward` failed (the relay refused `tcpip-forward`, or the master went away). An
    /// active tunnel that cannot be re-opened after a reconnect is closed: its keys must not stay
    /// in the file for a tunnel that does not exist.
    pub fn forward_failed(&mut self) -> Vec<Effect> {
        self.forward_open = false;
        if !self.keys_in && self.state != State::Active {
            return Vec::new();
        }
        let mut fx = Vec::new();
        if self.keys_in {
            fx.push(Effect::RemoveKeys);
        }
        fx.push(Effect::Closed(CloseReason::Relay));
        self.keys_in = false;
        self.open_reqs.clear();
        self.state = if self.pregrant { State::Allowed } else { State::Confirm };
        fx
    }

    /// Ctrl-b u: pre-grant or unblock.
    pub fn grant(&mut self) -> Result<Vec<Effect>, &'static str> {
        match self.state {
            State::Off => Err("restricted mode: no tunnel"),
            State::Confirm => {
                self.state = State::Allowed;
                self.pregrant = true;
                Ok(Vec::new())
            }
            State::Blocked => {
                self.state = State::Confirm;
                Ok(Vec::new())
            }
            State::Allowed | State::Active => Ok(Vec::new()),
        }
    }

    fn close_all(&mut self, fx: &mut Vec<Effect>) {
        let was_active = self.state == State::Active;
        if self.forward_open {
            fx.push(Effect::CancelForward);
            self.forward_open = false;
        }
        // Whatever the state: a block that is in the file goes (F7).
        if was_active || !self.open_reqs.is_empty() || self.keys_in {
            fx.push(Effect::RemoveKeys);
            fx.push(Effect::Closed(CloseReason::Revoked));
        }
        self.keys_in = false;
        self.open_reqs.clear();
        self.pregrant = false;
    }

    /// Relay `REVOKE`: support is done with the tunnel. Its keys go and `TUNNEL_CLOSED` is due; what
    /// the customer decided stays: a pre-grant (Ctrl-b u or `--tunnel`) still grants the next request,
    /// and with `--tunnel` the session's forward stays open.
    pub fn relay_revoke(&mut self) -> Vec<Effect> {
        if self.state != State::Active && !self.keys_in {
            return Vec::new();
        }
        let mut fx = Vec::new();
        if self.forward_open && !self.tunnel_mode {
            fx.push(Effect::CancelForward);
            self.forward_open = false;
        }
        fx.push(Effect::RemoveKeys);
        fx.push(Effect::Closed(CloseReason::Revoked));
        self.keys_in = false;
        self.open_reqs.clear();
        self.state = if self.pregrant { State::Allowed } else { State::Confirm };
        fx
    }

    /// Whether our block may be in the file (for the invariant check: only while `active`).
    #[cfg(test)]
    pub fn keys_in(&self) -> bool {
        self.keys_in
    }

    /// Ctrl-b U: back to confirm, closing an active tunnel and clearing a pre-grant.
    pub fn revoke(&mut self) -> Result<Vec<Effect>, &'static str> {
        let mut fx = Vec::new();
        match self.state {
            State::Off => return Err("restricted mode: no tunnel"),
            State::Active | State::Allowed => {
                self.close_all(&mut fx);
                self.state = State::Confirm;
            }
            State::Confirm | State::Blocked => self.close_all(&mut fx),
        }
        Ok(fx)
    }

    /// Ctrl-b X: block all requests (revoking an active tunnel first).
    pub fn block(&mut self) -> Result<Vec<Effect>, &'static str> {
        if self.state == State::Off {
            return Err("restricted mode: no tunnel");
        }
        let mut fx = Vec::new();
        self.close_all(&mut fx);
        for p in self.pending.drain(..) {
            fx.push(Effect::Reject { req: p.req, reason: RejectReason::Blocked });
        }
        self.state = State::Blocked;
        Ok(fx)
    }

    /// `/brb` and `/back`. BRB is refused while a tunnel is active.
    pub fn set_brb(&mut self, on: bool) -> Result<(), &'static str> {
        if on && self.state == State::Active {
            return Err("BRB is not available while a tunnel is active -- revoke the tunnel first (Ctrl-b U)");
        }
        self.brb = on;
        Ok(())
    }

    /// The ssh master is gone (link lost): the forward died with it. Keys stay installed; after the new
    /// WELCOME the daemon re-opens the forward and re-sends `TUNNEL_OPEN` for `open_reqs()`.
    pub fn link_lost(&mut self) {
        self.forward_open = false;
    }

    /// After a (re)connect's WELCOME: what to re-open.
    pub fn resume(&mut self) -> Vec<Effect> {
        if self.state == State::Active || (self.state == State::Allowed && self.pregrant) {
            vec![Effect::OpenForward]
        } else {
            Vec::new()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use RejectReason as R;

    fn rej(req: &str, reason: RejectReason) -> Vec<Effect> {
        vec![Effect::Reject { req: req.into(), reason }]
    }
    fn inst(req: &str) -> Vec<Effect> {
        vec![Effect::Install { req: req.into(), keys: b"k".to_vec() }]
    }

    #[test]
    fn relay_revoke_keeps_what_the_customer_decided() {
        let closed = |cancel: bool| {
            let mut v = if cancel { vec![Effect::CancelForward] } else { vec![] };
            v.extend([Effect::RemoveKeys, Effect::Closed(CloseReason::Revoked)]);
            v
        };
        // Granted through the popup: back to asking, the per-grant forward closed.
        let mut t = Tunnel::new(Mode::Share);
        t.upgrade("1", "eng", b"k".to_vec());
        assert_eq!(t.answer("1", true), inst("1"));
        t.opened("1");
        assert_eq!(t.relay_revoke(), closed(true));
        assert_eq!(t.state(), State::Confirm);
        // Pre-granted with Ctrl-b u: the pre-grant stands.
        let mut t = Tunnel::new(Mode::Share);
        t.grant().unwrap();
        assert_eq!(t.upgrade("2", "eng", b"k".to_vec()), inst("2"));
        t.opened("2");
        assert_eq!(t.relay_revoke(), closed(true));
        assert_eq!(t.state(), State::Allowed);
        // --tunnel: the session's forward stays open for the next request.
        let mut t = Tunnel::new(Mode::Tunnel);
        t.forward_opened();
        t.opened("3");
        assert_eq!(t.relay_revoke(), closed(false));
        assert_eq!((t.state(), t.forward_open()), (State::Allowed, true));
        // Nothing open: nothing to do, nothing sent.
        assert!(t.relay_revoke().is_empty());
        assert!(Tunnel::new(Mode::Restricted).relay_revoke().is_empty());
    }

    #[test]
    fn initial_states_and_wire_names() {
        assert_eq!(Tunnel::new(Mode::Share).state(), State::Confirm);
        assert_eq!(Tunnel::new(Mode::Restricted).state(), State::Off);
        let mut t = Tunnel::new(Mode::Tunnel);
        assert_eq!(t.state(), State::Allowed);
        assert_eq!(t.connect(), vec![Effect::OpenForward]);
        t.forward_opened();
        assert!(t.connect().is_empty());
        assert!(Tunnel::new(Mode::Share).connect().is_empty());
        let names: Vec<_> =
            [State::Confirm, State::Allowed, State::Blocked, State::Active, State::Off].map(State::wire).into();
        assert_eq!(names, ["confirm", "allowed", "blocked", "active", "off"]);
    }

    #[test]
    fn confirm_popup_grant_and_deny() {
        let mut t = Tunnel::new(Mode::Share);
        assert_eq!(t.upgrade("1", "eng", b"k".to_vec()), vec![Effect::Popup { req: "1".into(), from: "eng".into() }]);
        // A second request while the popup is open waits for its turn.
        assert!(t.upgrade("2", "eng2", b"k".to_vec()).is_empty());
        assert!(t.answer("2", true).is_empty()); // not on screen yet
        assert_eq!(
            t.answer("1", false),
            vec![
                Effect::Reject { req: "1".into(), reason: R::Denied },
                Effect::Popup { req: "2".into(), from: "eng2".into() }
            ]
        );
        assert!(t.answer("1", true).is_empty()); // already answered
        assert_eq!(t.answer("2", false), rej("2", R::Denied));
        assert_eq!(t.state(), State::Confirm);
        t.upgrade("3", "eng", b"k".to_vec());
        assert_eq!(t.answer("3", true), inst("3"));
        t.opened("3");
        assert_eq!(t.state(), State::Active);
        assert!(t.forward_open());
        // Not pre-granted: a further request while active asks again.
        assert!(matches!(t.upgrade("4", "e", b"k".to_vec())[..], [Effect::Popup { .. }]));
    }

    #[test]
    fn pregrant_and_unblock() {
        let mut t = Tunnel::new(Mode::Share);
        assert_eq!(t.grant(), Ok(vec![]));
        assert_eq!(t.state(), State::Allowed);
        assert_eq!(t.upgrade("1", "e", b"k".to_vec()), inst("1"));
        t.opened("1");
        assert_eq!(t.state(), State::Active);
        assert_eq!(t.upgrade("2", "e", b"k".to_vec()), inst("2"));
        assert_eq!(t.grant(), Ok(vec![]));
        assert_eq!(t.state(), State::Active);
        let mut t = Tunnel::new(Mode::Share);
        t.block().unwrap();
        assert_eq!(t.upgrade("1", "e", b"k".to_vec()), rej("1", R::Blocked));
        t.grant().unwrap();
        assert_eq!(t.state(), State::Confirm);
        t.grant().unwrap();
        assert_eq!(t.state(), State::Allowed);
    }

    #[test]
    fn revoke_transitions() {
        let mut t = Tunnel::new(Mode::Share);
        assert_eq!(t.revoke(), Ok(vec![]));
        t.grant().unwrap();
        assert_eq!(t.revoke(), Ok(vec![]));
        assert_eq!(t.state(), State::Confirm);
        t.grant().unwrap();
        t.upgrade("1", "e", b"k".to_vec());
        t.opened("1");
        assert_eq!(
            t.revoke(),
            Ok(vec![Effect::CancelForward, Effect::RemoveKeys, Effect::Closed(CloseReason::Revoked)])
        );
        assert_eq!(t.state(), State::Confirm);
        assert!(!t.forward_open() && t.open_reqs().is_empty());
        // Pre-grant cleared: next request asks.
        assert!(matches!(t.upgrade("2", "e", b"k".to_vec())[..], [Effect::Popup { .. }]));
        let mut b = Tunnel::new(Mode::Share);
        b.block().unwrap();
        assert_eq!(b.revoke(), Ok(vec![]));
        assert_eq!(b.state(), State::Blocked);
    }

    #[test]
    fn tunnel_mode_revoke_cancels_preopened_forward() {
        let mut t = Tunnel::new(Mode::Tunnel);
        t.connect();
        t.forward_opened();
        assert_eq!(t.revoke(), Ok(vec![Effect::CancelForward]));
        assert_eq!(t.state(), State::Confirm);
        assert!(t.resume().is_empty());
    }

    #[test]
    fn block_transitions() {
        let mut t = Tunnel::new(Mode::Share);
        t.upgrade("1", "e", b"k".to_vec());
        assert_eq!(t.block(), Ok(rej("1", R::Blocked)));
        assert!(t.answer("1", true).is_empty());
        let mut t = Tunnel::new(Mode::Share);
        t.grant().unwrap();
        t.upgrade("1", "e", b"k".to_vec());
        t.opened("1");
        assert_eq!(
            t.block(),
            Ok(vec![Effect::CancelForward, Effect::RemoveKeys, Effect::Closed(CloseReason::Revoked)])
        );
        assert_eq!(t.state(), State::Blocked);
        assert_eq!(t.block(), Ok(vec![]));
    }

    #[test]
    fn queued_requests_are_decided_in_turn() {
        let mut t = Tunnel::new(Mode::Share);
        t.upgrade("1", "a", b"k".to_vec());
        for i in 2..=MAX_QUEUED {
            assert!(t.upgrade(&i.to_string(), "b", b"k".to_vec()).is_empty());
        }
        assert_eq!(t.upgrade("full", "c", b"k".to_vec()), rej("full", R::Error));
        // Pre-granted meanwhile: the queue installs without asking once the popup is answered.
        t.grant().unwrap();
        let fx = t.answer("1", true);
        assert_eq!(fx.len(), MAX_QUEUED);
        assert!(fx.iter().all(|e| matches!(e, Effect::Install { .. })), "{fx:?}");
        // Blocked meanwhile: every queued request is answered `blocked` at once.
        let mut t = Tunnel::new(Mode::Share);
        t.upgrade("1", "a", b"k".to_vec());
        t.upgrade("2", "a", b"k".to_vec());
        assert_eq!(
            t.block(),
            Ok(vec![
                Effect::Reject { req: "1".into(), reason: R::Blocked },
                Effect::Reject { req: "2".into(), reason: R::Blocked }
            ])
        );
        // A popup that could not be shown is answered `error` and the next one is shown.
        let mut t = Tunnel::new(Mode::Share);
        t.upgrade("1", "a", b"k".to_vec());
        t.upgrade("2", "b", b"k".to_vec());
        assert!(t.abandon("2").is_empty());
        assert_eq!(
            t.abandon("1"),
            vec![
                Effect::Reject { req: "1".into(), reason: R::Error },
                Effect::Popup { req: "2".into(), from: "b".into() }
            ]
        );
        // BRB meanwhile: the queued request is refused `brb` when its turn comes.
        t.upgrade("3", "c", b"k".to_vec());
        t.set_brb(true).unwrap();
        assert_eq!(
            t.answer("2", false),
            vec![
                Effect::Reject { req: "2".into(), reason: R::Denied },
                Effect::Reject { req: "3".into(), reason: R::Brb }
            ]
        );
    }

    #[test]
    fn answer_after_state_change() {
        let mut t = Tunnel::new(Mode::Share);
        t.upgrade("1", "e", b"k".to_vec());
        t.set_brb(true).unwrap();
        assert_eq!(t.answer("1", true), rej("1", R::Brb));
    }

    #[test]
    fn restricted_refuses_everything() {
        let mut t = Tunnel::new(Mode::Restricted);
        assert_eq!(t.upgrade("1", "e", b"k".to_vec()), rej("1", R::Restricted));
        assert!(t.grant().is_err());
        assert!(t.revoke().is_err());
        assert!(t.block().is_err());
        assert_eq!(t.state(), State::Off);
        assert_eq!(t.set_brb(true), Ok(()));
    }

    #[test]
    fn brb_rules() {
        let mut t = Tunnel::new(Mode::Share);
        t.set_brb(true).unwrap();
        assert_eq!(t.upgrade("1", "e", b"k".to_vec()), rej("1", R::Brb));
        t.grant().unwrap();
        assert_eq!(t.upgrade("2", "e", b"k".to_vec()), rej("2", R::Brb));
        t.set_brb(false).unwrap();
        assert_eq!(t.upgrade("3", "e", b"k".to_vec()), inst("3"));
        t.opened("3");
        assert!(t.set_brb(true).is_err());
        assert!(!t.brb());
        assert_eq!(t.set_brb(false), Ok(()));
    }

    #[test]
    fn reconnect_reopens_active() {
        let mut t = Tunnel::new(Mode::Share);
        t.grant().unwrap();
        t.upgrade("1", "e", b"k".to_vec());
        t.opened("1");
        t.opened("1");
        t.link_lost();
        assert!(!t.forward_open());
        assert_eq!(t.resume(), vec![Effect::OpenForward]);
        assert_eq!(t.open_reqs(), ["1".to_string()]);
        assert_eq!(t.state(), State::Active);
        assert_eq!(t.failed("9", R::InvalidKey), rej("9", R::InvalidKey));
    }

    /// F7: whatever the customer, the relay and the daemon's failures do, in any order, our block is
    /// in the file only while the state is `active`. Every sequence of up to four events is tried;
    /// the daemon's side is modelled as it works: an `Install` either commits the keys and calls
    /// `opened`, or fails before writing anything and calls `failed`.
    #[test]
    fn keys_are_in_the_file_only_while_active() {
        #[derive(Clone, Copy, Debug)]
        enum Ev {
            Upgrade,
            Grant,
            Deny,
            PreGrant,
            Revoke,
            Block,
            RelayRevoke,
            LinkLost,
            Resume,
            ForwardFailed,
            Brb,
            Back,
        }
        const ALL: [Ev; 12] = [
            Ev::Upgrade,
            Ev::Grant,
            Ev::Deny,
            Ev::PreGrant,
            Ev::Revoke,
            Ev::Block,
            Ev::RelayRevoke,
            Ev::LinkLost,
            Ev::Resume,
            Ev::ForwardFailed,
            Ev::Brb,
            Ev::Back,
        ];
        // Carry out effects as the daemon does; `ok` decides whether installs succeed.
        fn run(t: &mut Tunnel, file: &mut bool, fx: Vec<Effect>, ok: bool) {
            for e in fx {
                match e {
                    Effect::Install { req, .. } if ok => {
                        *file = true;
                        t.opened(&req);
                    }
                    Effect::Install { req, .. } => {
                        let more = t.failed(&req, R::Error);
                        run(t, file, more, ok);
                    }
                    Effect::RemoveKeys => *file = false,
                    _ => {}
                }
            }
        }
        fn explore(t: &Tunnel, file: bool, trail: &mut Vec<(Ev, bool)>, n: &mut u32, depth: usize) {
            assert!(!file || t.state() == State::Active, "keys in the file in state {:?} after {trail:?}", t.state());
            assert_eq!(file, t.keys_in(), "the machine lost track of the file after {trail:?}");
            if depth == 0 {
                return;
            }
            for ev in ALL {
                for ok in [true, false] {
                    let (mut t, mut file) = (t.clone(), file);
                    *n += 1;
                    let req = n.to_string();
                    let fx = match ev {
                        Ev::Upgrade => t.upgrade(&req, "e", b"k".to_vec()),
                        Ev::Grant | Ev::Deny => match t.on_screen() {
                            Some((r, _)) => t.answer(&r, matches!(ev, Ev::Grant)),
                            None => continue,
                        },
                        Ev::PreGrant => t.grant().unwrap_or_default(),
                        Ev::Revoke => t.revoke().unwrap_or_default(),
                        Ev::Block => t.block().unwrap_or_default(),
                        Ev::RelayRevoke => t.relay_revoke(),
                        Ev::LinkLost => {
                            t.link_lost();
                            Vec::new()
                        }
                        Ev::Resume => t.resume(),
                        Ev::ForwardFailed => t.forward_failed(),
                        Ev::Brb => {
                            let _ = t.set_brb(true);
                            Vec::new()
                        }
                        Ev::Back => {
                            let _ = t.set_brb(false);
                            Vec::new()
                        }
                    };
                    run(&mut t, &mut file, fx, ok);
                    trail.push((ev, ok));
                    explore(&t, file, trail, n, depth - 1);
                    trail.pop();
                }
            }
        }
        for mode in [Mode::Share, Mode::Tunnel, Mode::Restricted] {
            let mut n = 0;
            explore(&Tunnel::new(mode), false, &mut Vec::new(), &mut n, 4);
        }
    }

    #[test]
    fn a_failed_install_or_reopen_leaves_nothing_behind() {
        // The forward opened for one grant goes again when installing fails.
        let mut t = Tunnel::new(Mode::Share);
        t.upgrade("1", "e", b"k".to_vec());
        assert_eq!(t.answer("1", true), inst("1"));
        t.forward_opened();
        assert_eq!(t.failed("1", R::Error), vec![rej("1", R::Error)[0].clone(), Effect::CancelForward]);
        assert_eq!(t.state(), State::Confirm);
        // --tunnel keeps the session's forward.
        let mut t = Tunnel::new(Mode::Tunnel);
        t.forward_opened();
        assert_eq!(t.failed("2", R::Error), rej("2", R::Error));
        // A tunnel that cannot be re-opened after a reconnect is closed and its keys removed.
        let mut t = Tunnel::new(Mode::Share);
        t.grant().unwrap();
        t.upgrade("3", "e", b"k".to_vec());
        t.opened("3");
        t.link_lost();
        assert_eq!(t.resume(), vec![Effect::OpenForward]);
        assert_eq!(t.forward_failed(), vec![Effect::RemoveKeys, Effect::Closed(CloseReason::Relay)]);
        assert_eq!(t.state(), State::Allowed);
        assert!(t.forward_failed().is_empty());
    }
}
