//! The command line and the environment (`cli::parse`), the `--token -` line and the passwd lookup.
//! A refusal is one line without control characters; an accepted configuration holds only valid
//! values and survives daemon.conf (`to_conf`, `from_conf`) unchanged.
//!
//! Input: NUL-separated fields; the arguments (raw bytes, not necessarily UTF-8) up to the first
//! empty field, then `KEY=VALUE` environment entries.
#![no_main]
use std::ffi::OsString;
use std::os::unix::ffi::OsStringExt;

use libfuzzer_sys::fuzz_target;
use linbit_tunl_fuzz::cli::{
    Action, Config, MAX_CASE_LEN, parse, token_from_line, user_of_uid, valid_session_id, valid_token,
};

fn check(c: &Config) {
    assert!(valid_session_id(&c.session_id), "{c:?}");
    assert!(c.token.as_deref().is_none_or(valid_token), "{c:?}");
    assert!(!(c.ask_token && c.token.is_some()));
    assert!(c.case.len() <= MAX_CASE_LEN && !c.case.chars().any(char::is_control), "{c:?}");
    assert!(!c.user.is_empty() && c.user.bytes().all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b)), "{c:?}");
    assert!(c.api.starts_with("https://") && !c.api.ends_with('/') && c.api.len() > 8, "{c:?}");
    assert!(c.authkeys_file.is_absolute(), "{c:?}");
    assert!(c.relay_port != 0 && c.target_port != 0, "{c:?}");
    assert_eq!(c.attach, c.tmux_socket.is_some(), "{c:?}");
    // What the launcher hands the daemon comes back the same (the daemon never asks for the token).
    let mut want = c.clone();
    want.ask_token = false;
    assert_eq!(Config::from_conf(&c.to_conf()), Ok(want));
}

fuzz_target!(|data: &[u8]| {
    let mut fields = data.split(|&b| b == 0);
    let args: Vec<OsString> =
        fields.by_ref().take_while(|f| !f.is_empty()).map(|f| OsString::from_vec(f.to_vec())).collect();
    let env: Vec<(String, String)> = fields
        .filter_map(|f| {
            let f = String::from_utf8_lossy(f);
            let (k, v) = f.split_once('=')?;
            Some((k.to_string(), v.to_string()))
        })
        .collect();
    match parse(args, &env) {
        Ok(Action::Run(c)) => check(&c),
        Ok(_) => {}
        Err(e) => assert!(!e.0.is_empty() && !e.0.chars().any(char::is_control), "{e:?}"),
    }
    let text = String::from_utf8_lossy(data);
    if let Ok(t) = token_from_line(&text) {
        assert!(valid_token(&t));
    }
    let uid = data.first().map_or(0, |&b| u32::from(b));
    if let Some(name) = user_of_uid(&text, uid) {
        assert!(!name.is_empty() && !name.contains(':') && !name.contains('\n'), "{name:?}");
    }
});
