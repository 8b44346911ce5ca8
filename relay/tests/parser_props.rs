//! Properties of the relay's parsers of outside bytes (issue 13), the same the fuzz targets
//! `relay_input` and `relay_api` check, in seconds: near-grammar and random input never panics;
//! what is accepted holds only valid values and re-serialises to the same message; a refusal's
//! text is one printable line; the API's request reader stays within its bounds however the bytes
//! arrive.

use std::io::Read;
use std::time::{Duration, Instant};

use proptest::prelude::*;
use tunl_relay::api::{MAX_BODY, parse_sign, read_request};
use tunl_relay::from_customer::{self, CustomerMsg};
use tunl_relay::from_viewer::{self, ViewerMsg};
use tunl_relay::hello::{self, Hello};
use tunl_relay::support_cmd::{self, SupportCmd};
use tunl_wire as wire;

fn printable(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| (0x20..0x7f).contains(&b))
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
    let mut l = match m {
        CustomerMsg::O(d) => wire::line("O", &[], Some(d)),
        CustomerMsg::Snap { cols, rows, screen } => {
            wire::line("SNAP", &[("size", &format!("{cols}x{rows}"))], Some(screen))
        }
        CustomerMsg::Size { cols, rows } => format!("SIZE {cols} {rows}\n").into_bytes(),
        CustomerMsg::Chat(t) => wire::line("CHAT", &[], Some(t)),
        CustomerMsg::State { tunnel, brb, mode } => {
            wire::line("STATE", &[("tunnel", tunnel), ("brb", if *brb { "1" } else { "0" }), ("mode", mode)], None)
        }
        CustomerMsg::TunnelOpen { req, port, user } => {
            wire::line("TUNNEL_OPEN", &[("req", req), ("port", &port.to_string()), ("user", user)], None)
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
    let mut l = match m {
        ViewerMsg::K(d) => wire::line("K", &[], Some(d)),
        ViewerMsg::Chat(t) => wire::line("CHAT", &[], Some(t)),
        ViewerMsg::Note(t) => wire::line("NOTE", &[], Some(t)),
        ViewerMsg::Upgrade { req, keys } => wire::line("UPGRADE", &[("req", req)], Some(keys)),
        ViewerMsg::Revoke => wire::line("REVOKE", &[], None),
        ViewerMsg::Refresh => wire::line("REFRESH", &[], None),
        ViewerMsg::Close { reason } if reason.is_empty() => wire::line("CLOSE", &[], None),
        ViewerMsg::Close { reason } => wire::line("CLOSE", &[("reason", &wire::pct_encode(reason))], None),
        ViewerMsg::Ping(n) => format!("PING {n}\n").into_bytes(),
        ViewerMsg::Pong(n) => format!("PONG {n}\n").into_bytes(),
        ViewerMsg::Bye => wire::line("BYE", &[], None),
    };
    l.pop();
    l
}

/// A field of a near-grammar line: a known key with a plausible or random value, a bare token, or
/// a payload.
fn field() -> impl Strategy<Value = String> {
    let key = prop::sample::select(vec![
        "id",
        "mode",
        "host",
        "user",
        "ips",
        "case",
        "client",
        "size",
        "resume",
        "tunnel",
        "brb",
        "req",
        "port",
        "reason",
        "role",
        "ro",
        "expires",
        "restricted",
        "customer",
        "timeout",
        "future",
    ]);
    let value = prop_oneof![
        prop::sample::select(vec![
            "swift-fox-jumps-barrel",
            "a-b-c-d",
            "share",
            "tunnel",
            "restricted",
            "0",
            "1",
            "80x24",
            "0x0",
            "10001x1",
            "192.0.2.2,::1",
            "1.2.3.4,,",
            "confirm",
            "off",
            "denied",
            "revoked",
            "customer",
            "join",
            "command",
            "who",
            "65535",
            "0",
            "%7E",
            "%zz",
            "%FF",
            "root",
            "",
        ])
        .prop_map(String::from),
        "[a-zA-Z0-9%:,.@_=+/-]{0,12}",
    ];
    prop_oneof![
        (key, value).prop_map(|(k, v)| format!("{k}={v}")),
        "[A-Za-z0-9+/=]{1,12}",
        prop::collection::vec(any::<u8>(), 0..24).prop_map(|b| wire::b64(&b)),
    ]
}

fn verb() -> impl Strategy<Value = String> {
    prop_oneof![
        prop::sample::select(vec![
            "O",
            "SNAP",
            "SIZE",
            "CHAT",
            "STATE",
            "TUNNEL_OPEN",
            "TUNNEL_REJECTED",
            "TUNNEL_CLOSED",
            "PING",
            "PONG",
            "BYE",
            "K",
            "NOTE",
            "UPGRADE",
            "REVOKE",
            "REFRESH",
            "CLOSE",
            "HELLO",
        ])
        .prop_map(String::from),
        "[A-Z_]{1,8}",
    ]
}

fn line() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        4 => (verb(), prop::collection::vec(field(), 0..5)).prop_map(|(v, f)| {
            std::iter::once(v).chain(f).collect::<Vec<_>>().join(" ").into_bytes()
        }),
        1 => prop::collection::vec(any::<u8>(), 0..60),
    ]
}

/// A connection that hands out at most `piece` bytes a read.
struct Pieces<'a> {
    data: &'a [u8],
    piece: usize,
}

impl Read for Pieces<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.piece.min(buf.len()).min(self.data.len());
        buf[..n].copy_from_slice(&self.data[..n]);
        self.data = &self.data[n..];
        Ok(n)
    }
}

proptest! {
    #[test]
    fn hellos_are_valid_or_refused_in_one_line(
        fields in prop::collection::vec(field(), 0..11),
        version in prop::sample::select(vec!["linbit-tunl/1", "linbit-tunl/2", "ls", ""]),
    ) {
        let cmd = std::iter::once(version.to_string()).chain(fields).collect::<Vec<_>>().join(" ");
        match hello::parse(&cmd) {
            Ok(h) => {
                prop_assert!(hello::valid_session_id(&h.id));
                prop_assert!(h.ips.len() <= 32 && h.case.len() <= 256 && !h.client.is_empty());
                prop_assert!(h.cols <= 10_000 && h.rows <= 10_000);
                prop_assert_eq!(hello::parse(&hello_text(&h)), Ok(h));
            }
            Err(r) => prop_assert!(r.code == "proto" && printable(&r.msg), "{:?}", r),
        }
    }

    #[test]
    fn the_good_hello_with_one_field_changed(value in field(), at in 0usize..9) {
        let mut f: Vec<String> = "id=swift-fox-jumps-barrel mode=share host=node1 user=root ips=192.0.2.2 case=x \
                                  client=0.1.0 size=120x40 resume=0"
            .split(' ')
            .map(String::from)
            .collect();
        f[at] = value;
        let cmd = format!("{} {}", hello::PROTO, f.join(" "));
        match hello::parse(&cmd) {
            Ok(h) => prop_assert_eq!(hello::parse(&hello_text(&h)), Ok(h)),
            Err(r) => prop_assert!(printable(&r.msg), "{:?}", r),
        }
    }

    #[test]
    fn customer_lines_round_trip(l in line()) {
        match from_customer::parse(&l) {
            Ok(m) => prop_assert_eq!(from_customer::parse(&customer_line(&m)), Ok(m)),
            Err(e) => prop_assert!(printable(&format!("{}.", e.verb)), "{:?}", e),
        }
    }

    #[test]
    fn viewer_lines_round_trip(l in line()) {
        match from_viewer::parse(&l) {
            Ok(m) => prop_assert_eq!(from_viewer::parse(&viewer_line(&m)), Ok(m)),
            Err(e) => prop_assert!(printable(&format!("{}.", e.verb)), "{:?}", e),
        }
        let _ = from_viewer::parse_opening(&l);
    }

    #[test]
    fn support_commands_are_valid_or_refused_in_one_line(
        verb in prop::sample::select(vec![
            "create", "list", "show", "close", "cancel", "chat", "note", "upgrade", "revoke", "expect", "log", "join", "rm", "",
        ]),
        fields in prop::collection::vec(field(), 0..5),
    ) {
        let cmd = format!("{} {verb} {}", support_cmd::VERSION, fields.join(" "));
        match support_cmd::parse(cmd.trim_end()) {
            Ok(SupportCmd::Upgrade { keys, .. }) => prop_assert!(support_cmd::valid_keys(&keys)),
            Ok(SupportCmd::Chat { text, .. }) => prop_assert!(!text.is_empty() && std::str::from_utf8(&text).is_ok()),
            Ok(SupportCmd::Create { expires_min, .. }) => prop_assert!((1..=43_200).contains(&expires_min)),
            Ok(_) => {}
            Err(e) => prop_assert!(printable(&e), "{:?}", e),
        }
    }

    #[test]
    fn api_requests_stay_in_bounds_however_they_arrive(
        length in prop_oneof![Just(None), (0usize..5000).prop_map(Some)],
        body in prop::collection::vec(any::<u8>(), 0..300),
        extra in prop::sample::select(vec!["", "Transfer-Encoding: chunked\r\n", "Content-Length: 1\r\n", "X: y\r\n", "bad\r\n"]),
        piece in 1usize..300,
    ) {
        let mut req = format!("POST /api/v1/sign HTTP/1.1\r\nHost: relay\r\n{extra}").into_bytes();
        if let Some(n) = length {
            req.extend_from_slice(format!("Content-Length: {n}\r\n").as_bytes());
        }
        req.extend_from_slice(b"\r\n");
        req.extend_from_slice(&body);
        let deadline = Instant::now() + Duration::from_secs(60);
        match read_request(&mut Pieces { data: &req, piece }, deadline) {
            Ok((head, got)) => {
                prop_assert!(head.content_length <= MAX_BODY && got.len() == head.content_length);
                if let Ok(s) = parse_sign(&got) {
                    prop_assert!(s.token.len() == 6 && !s.host.is_empty());
                }
            }
            Err(r) => prop_assert!((400..500).contains(&r.status), "{:?}", r),
        }
    }
}
