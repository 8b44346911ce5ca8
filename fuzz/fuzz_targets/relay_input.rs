//! The relay's parsers of what a customer or an engineer sends (the first byte picks one): the
//! customer's hello, the client's lines, the engineer's lines and the support socket's opening
//! line, the engineer's `tunl-support/1` command. Accepted input holds only valid values and
//! re-serialises to the same message; a refusal's text is one printable line.
#![no_main]
use libfuzzer_sys::fuzz_target;
use tunl_relay::from_customer::{self, CustomerMsg, MAX_O_CHUNK};
use tunl_relay::from_viewer::{self, ViewerMsg};
use tunl_relay::hello::{self, Hello};
use tunl_relay::support_cmd::{self, SupportCmd};
use tunl_wire as wire;

fn printable(s: &str) {
    assert!(!s.is_empty() && s.bytes().all(|b| (0x20..0x7f).contains(&b)), "{s:?}");
}

fn hello_text(h: &Hello) -> String {
    format!(
        "{} id={} mode={} host={} user={} ips={} case={} client={} size={}x{} resume={}",
        hello::PROTO,
        h.id,
        h.mode.as_str(),
        h.host,
        h.user,
        h.ips.join(","),
        wire::pct_encode(&h.case),
        wire::pct_encode(&h.client),
        h.cols,
        h.rows,
        u8::from(h.resume)
    )
}

fn customer_line(m: &CustomerMsg) -> Vec<u8> {
    let size;
    let num;
    let mut l = match m {
        CustomerMsg::O(d) => wire::line("O", &[], Some(d)),
        CustomerMsg::Snap { cols, rows, screen } => {
            size = format!("{cols}x{rows}");
            wire::line("SNAP", &[("size", &size)], Some(screen))
        }
        CustomerMsg::Size { cols, rows } => format!("SIZE {cols} {rows}\n").into_bytes(),
        CustomerMsg::Chat(t) => wire::line("CHAT", &[], Some(t)),
        CustomerMsg::State { tunnel, brb, mode } => {
            wire::line("STATE", &[("tunnel", tunnel), ("brb", if *brb { "1" } else { "0" }), ("mode", mode)], None)
        }
        CustomerMsg::TunnelOpen { req, port, user } => {
            num = port.to_string();
            wire::line("TUNNEL_OPEN", &[("req", req), ("port", &num), ("user", user)], None)
        }
        CustomerMsg::TunnelRejected { req, reason } => {
            wire::line("TUNNEL_REJECTED", &[("req", req), ("reason", reason)], None)
        }
        CustomerMsg::TunnelClosed { reason } => wire::line("TUNNEL_CLOSED", &[("reason", reason)], None),
        CustomerMsg::Ping(n) => format!("PING {n}\n").into_bytes(),
        CustomerMsg::Pong(n) => format!("PONG {n}\n").into_bytes(),
        CustomerMsg::Bye { reason } => wire::line("BYE", &[("reason", reason)], None),
    };
    l.pop();
    l
}

fn viewer_line(m: &ViewerMsg) -> Vec<u8> {
    let reason;
    let mut l = match m {
        ViewerMsg::K(d) => wire::line("K", &[], Some(d)),
        ViewerMsg::Chat(t) => wire::line("CHAT", &[], Some(t)),
        ViewerMsg::Note(t) => wire::line("NOTE", &[], Some(t)),
        ViewerMsg::Upgrade { req, keys } => wire::line("UPGRADE", &[("req", req)], Some(keys)),
        ViewerMsg::Revoke => wire::line("REVOKE", &[], None),
        ViewerMsg::Refresh => wire::line("REFRESH", &[], None),
        ViewerMsg::Close { reason: r } if r.is_empty() => wire::line("CLOSE", &[], None),
        ViewerMsg::Close { reason: r } => {
            reason = wire::pct_encode(r);
            wire::line("CLOSE", &[("reason", &reason)], None)
        }
        ViewerMsg::Ping(n) => format!("PING {n}\n").into_bytes(),
        ViewerMsg::Pong(n) => format!("PONG {n}\n").into_bytes(),
        ViewerMsg::Bye => wire::line("BYE", &[], None),
    };
    l.pop();
    l
}

fn check_hello(cmd: &str) {
    match hello::parse(cmd) {
        Ok(h) => {
            assert!(hello::valid_session_id(&h.id));
            assert!(h.ips.len() <= 32 && h.ips.iter().all(|ip| ip.parse::<std::net::IpAddr>().is_ok()));
            assert!(h.case.len() <= 256 && !h.client.is_empty() && h.client.len() <= 256);
            assert!(h.cols <= 10_000 && h.rows <= 10_000);
            assert_eq!(hello::parse(&hello_text(&h)), Ok(h));
        }
        Err(r) => {
            assert_eq!(r.code, "proto");
            printable(&r.msg);
        }
    }
}

fn check_support(cmd: &str) {
    match support_cmd::parse(cmd) {
        Ok(c) => match c {
            SupportCmd::Create { case, customer, expires_min, .. } => {
                assert!(case.len() <= 256 && customer.len() <= 256 && (1..=43_200).contains(&expires_min))
            }
            SupportCmd::Chat { id, text } => {
                assert!(hello::valid_session_id(&id) && !text.is_empty() && text.len() <= 4096);
                assert!(std::str::from_utf8(&text).is_ok());
            }
            SupportCmd::Note { id, text } => {
                assert!(hello::valid_session_id(&id) && text.len() <= 1024 && std::str::from_utf8(&text).is_ok())
            }
            SupportCmd::Upgrade { id, keys } => {
                assert!(hello::valid_session_id(&id) && keys.len() <= 16 * 1024 && support_cmd::valid_keys(&keys))
            }
            SupportCmd::Expect { id, timeout } => {
                assert!(hello::valid_session_id(&id) && (1..=3600).contains(&timeout))
            }
            SupportCmd::Close { id, reason } => assert!(hello::valid_session_id(&id) && reason.len() <= 256),
            SupportCmd::Show { id }
            | SupportCmd::Cancel { id }
            | SupportCmd::Revoke { id }
            | SupportCmd::Log { id }
            | SupportCmd::Join { id, .. } => assert!(hello::valid_session_id(&id)),
            SupportCmd::List => {}
        },
        Err(e) => printable(&e),
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&which, bytes)) = data.split_first() else { return };
    match which % 5 {
        // SSH_ORIGINAL_COMMAND reaches the relay as a String (not UTF-8: empty).
        0 => check_hello(std::str::from_utf8(bytes).unwrap_or("")),
        1 => match from_customer::parse(bytes) {
            Ok(m) => {
                if let CustomerMsg::O(d) = &m {
                    assert!(!d.is_empty() && d.len() <= MAX_O_CHUNK);
                }
                if let CustomerMsg::Chat(t) = &m {
                    assert!(std::str::from_utf8(t).is_ok());
                }
                assert_eq!(from_customer::parse(&customer_line(&m)), Ok(m));
            }
            // The verb goes to the log: token bytes only (possibly none, hence the dot).
            Err(e) => printable(&format!("{}.", e.verb)),
        },
        2 => match from_viewer::parse(bytes) {
            Ok(m) => assert_eq!(from_viewer::parse(&viewer_line(&m)), Ok(m)),
            Err(e) => printable(&format!("{}.", e.verb)),
        },
        3 => {
            let _ = from_viewer::parse_opening(bytes);
        }
        _ => {
            check_support(std::str::from_utf8(bytes).unwrap_or(""));
            let _ = support_cmd::valid_keys(bytes);
        }
    }
});
