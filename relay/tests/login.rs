//! The real client logging in to the relay: with a token through the signing API (certificate),
//! and through keyboard-interactive answered by `tunl-relay pam-ki` (token, then session ID).
//! The relay's own sshd says who it let in and how. Run as root.

mod common;

use common::*;
use tunl_relay::harness::wait_until;
use tunl_relay::registry::Registry;

fn accepted(relay: &tunl_relay::harness::Relay, how: &str) -> bool {
    relay.log_text().lines().any(|l| l.contains(&format!("Accepted {how} for {} ", relay.cfg.customer_user)))
}

#[test]
fn token_through_the_api_logs_in_with_a_relay_certificate() {
    let relay = relay();
    let scratch = Scratch::new("cert");
    let (id, token) = relay.create_session("CASE-LOGIN", false);
    let client = Client::start(&relay, &id, &["--token", &token], &[], &scratch);
    let ok = wait_until(secs(60), || {
        relay.log_text().lines().any(|l| {
            l.contains(&format!("Accepted publickey for {} ", relay.cfg.customer_user))
                && l.contains(&format!("ID tunl session={id} "))
        })
    });
    assert!(ok, "no certificate login\n{}\n{}", client.diag(), relay.log_text());
    let reg = relay.registry();
    assert!(reg.get(&id).unwrap().unwrap().token_spent);
    assert!(reg.events(&id).unwrap().iter().any(|e| e.what == "certificate"));
    assert!(!accepted(&relay, "keyboard-interactive/pam"), "{}", relay.log_text());
}

#[test]
fn keyboard_interactive_takes_the_token_once_and_the_session_id() {
    let relay = relay();
    let scratch = Scratch::new("ki");
    let (id, token) = relay.create_session("CASE-KI", false);
    // The API cannot be reached at all: the client answers the relay's prompt with its token.
    let api_down = [("TUNL_API", "https://127.0.0.1:1")];
    let client = Client::start(&relay, &id, &["--token", &token], &api_down, &scratch);
    let ok = wait_until(secs(60), || accepted(&relay, "keyboard-interactive/pam"));
    assert!(ok, "no keyboard-interactive login\n{}\n{}", client.diag(), relay.log_text());
    drop(client);
    let reg = relay.registry();
    let events = reg.events(&id).unwrap();
    assert!(events.iter().any(|e| e.what == "token-spent" && e.detail == "keyboard-interactive"), "{events:?}");
    assert!(reg.get(&id).unwrap().unwrap().token_spent);

    // Without a token the answer is the session ID, accepted for a pending or live session.
    let (id2, _token2) = relay.create_session("CASE-KI2", false);
    let before = relay.log_text().matches("Accepted keyboard-interactive/pam").count();
    let scratch2 = Scratch::new("ki2");
    let client = Client::start(&relay, &id2, &[], &[], &scratch2);
    let ok = wait_until(secs(60), || relay.log_text().matches("Accepted keyboard-interactive/pam").count() > before);
    assert!(ok, "session ID not accepted\n{}\n{}", client.diag(), relay.log_text());
    drop(client);
    assert!(!relay.log_text().contains(&token), "a token reached the relay's log");
}

#[test]
fn keyboard_interactive_refuses_closed_sessions_and_spent_tokens() {
    let relay = relay();
    let (id, token) = relay.create_session("CASE-KI3", false);
    let reg = relay.registry();
    reg.end(&id, "closed", tunl_relay::now()).unwrap();
    let scratch = Scratch::new("ki3");
    let api_down = [("TUNL_API", "https://127.0.0.1:1")];
    let mut client = Client::start(&relay, &id, &["--token", &token], &api_down, &scratch);
    // sshd reports the refusals; the client gives up or keeps retrying, never gets in.
    let refused = wait_until(secs(60), || {
        relay.log_text().contains(&format!("Failed keyboard-interactive/pam for {} ", relay.cfg.customer_user))
    });
    assert!(refused, "{}\n{}", client.diag(), relay.log_text());
    let _ = client.wait(secs(1));
    assert!(!relay.log_text().contains(&format!("Accepted keyboard-interactive/pam for {}", relay.cfg.customer_user)));
}
