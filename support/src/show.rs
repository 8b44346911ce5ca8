//! How sessions look on the engineer's terminal: the `list` table, the `show` page, the text to
//! paste into a ticket. Pure functions building strings from already neutralised values.

use crate::proto::Item;

/// `90` -> `1m`, `7200` -> `2h`, `200000` -> `2d`.
pub fn age(secs: u64) -> String {
    match secs {
        0..=59 => format!("{secs}s"),
        60..=3599 => format!("{}m", secs / 60),
        3600..=86399 => format!("{}h", secs / 3600),
        _ => format!("{}d", secs / 86400),
    }
}

/// A session's state as `list` says it: the relay's mode words.
pub fn mode(state: &str) -> &str {
    state
}

fn cut(s: &str, w: usize) -> String {
    if s.chars().count() <= w {
        s.to_string()
    } else {
        let mut t: String = s.chars().take(w.saturating_sub(1)).collect();
        t.push('~');
        t
    }
}

/// The `list` table, newest first as the relay sends them.
pub fn table(items: &[Item], now: u64) -> String {
    let head = ["ID", "MODE", "HOST", "CASE", "VIEWERS", "AGE"];
    let rows: Vec<[String; 6]> = items
        .iter()
        .map(|i| {
            let host = if i.host.is_empty() { "-".to_string() } else { cut(&i.host, 24) };
            let case = if i.case.is_empty() { "-".to_string() } else { cut(&i.case, 24) };
            [
                i.id.clone(),
                mode(&i.state).to_string(),
                host,
                case,
                i.viewers.to_string(),
                age(now.saturating_sub(i.created)),
            ]
        })
        .collect();
    let mut w = head.map(|h| h.chars().count());
    for r in &rows {
        for (k, c) in r.iter().enumerate() {
            w[k] = w[k].max(c.chars().count());
        }
    }
    let fmt = |cells: &[String]| {
        let mut s = String::new();
        for (k, c) in cells.iter().enumerate() {
            if k + 1 == cells.len() {
                s.push_str(c);
            } else {
                s.push_str(c);
                s.push_str(&" ".repeat(w[k] - c.chars().count() + 2));
            }
        }
        s.trim_end().to_string()
    };
    let mut out = fmt(&head.map(String::from));
    out.push('\n');
    for r in &rows {
        out.push_str(&fmt(r));
        out.push('\n');
    }
    out
}

fn clock(t: u64) -> String {
    // UTC, without a date crate: days since the epoch to a civil date (Howard Hinnant's algorithm).
    let days = (t / 86400) as i64;
    let s = t % 86400;
    let z = days + 719468;
    let era = z.div_euclid(146097);
    let doe = z - era * 146097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC", s / 3600, s % 3600 / 60, s % 60)
}

/// One labelled field a line, like `upterm session current`.
pub fn page(item: &Item, viewers: &[(String, bool)], chat: &[(u64, String, String)], now: u64) -> String {
    let dash = |s: &str| if s.is_empty() { "-".to_string() } else { s.to_string() };
    let mut o = format!("=== {}\n", item.id);
    let mut kv = |k: &str, v: String| o.push_str(&format!("{:<13}{v}\n", format!("{k}:")));
    kv("Mode", item.state.clone());
    kv("Host", dash(&item.host));
    kv("User", dash(&item.user));
    kv("Case", dash(&item.case));
    kv("Customer", dash(&item.customer));
    kv("Created", format!("{} ({} ago)", clock(item.created), age(now.saturating_sub(item.created))));
    let exp = if item.expires > now {
        format!("{} (in {})", clock(item.expires), age(item.expires - now))
    } else {
        format!("{} (passed)", clock(item.expires))
    };
    kv("Expires", exp);
    kv(
        "Tunnel",
        match item.port {
            Some(p) => format!("open on the relay's port {p}: tunl ssh {}", item.id),
            None => "none".into(),
        },
    );
    let names: Vec<String> =
        viewers.iter().map(|(n, ro)| if *ro { format!("{n} (read-only)") } else { n.clone() }).collect();
    kv("Viewers", if names.is_empty() { item.viewers.to_string() } else { names.join(", ") });
    if !chat.is_empty() {
        o.push_str("Recent chat:\n");
        for (at, from, text) in chat {
            let t = clock(*at);
            o.push_str(&format!("  {} {from}> {text}\n", &t[11..16]));
        }
    }
    o
}

/// What `create-session` prints: the ID, the token and the command for the ticket.
pub fn created(id: &str, token: &str, expires: u64, case: &str, now: u64) -> String {
    let case_arg = if case.is_empty() { String::new() } else { format!(" --case {}", shell_word(case)) };
    format!(
        "Session:  {id}\nToken:    {token} (one use)\nExpires:  {} (in {})\n\nThe customer runs, as root on the host:\n\n    sudo ./linbit-tunl --token {token}{case_arg} {id}\n",
        clock(expires),
        age(expires.saturating_sub(now))
    )
}

/// A word as a POSIX shell reads it back unchanged: bare when safe, else single-quoted.
pub fn shell_word(s: &str) -> String {
    if !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.,:/@+=".contains(&b)) {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(id: &str, state: &str, host: &str, case: &str, created: u64) -> Item {
        Item {
            id: id.into(),
            state: state.into(),
            host: host.into(),
            case: case.into(),
            created,
            expires: created + 3600,
            ..Item::default()
        }
    }

    #[test]
    fn ages() {
        assert_eq!(age(5), "5s");
        assert_eq!(age(90), "1m");
        assert_eq!(age(7200), "2h");
        assert_eq!(age(200000), "2d");
    }

    #[test]
    fn table_aligns() {
        let t = table(
            &[
                item("swift-fox-jumps-barrel", "share+tunnel", "db1", "CASE-4711", 1000),
                item("a-b-c-d", "pending", "", "", 1900),
            ],
            2000,
        );
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines[0], "ID                      MODE          HOST  CASE       VIEWERS  AGE");
        assert_eq!(lines[1], "swift-fox-jumps-barrel  share+tunnel  db1   CASE-4711  0        16m");
        assert_eq!(lines[2], "a-b-c-d                 pending       -     -          0        1m");
    }

    #[test]
    fn dates() {
        assert_eq!(clock(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(clock(1_700_000_000), "2023-11-14 22:13:20 UTC");
        assert_eq!(clock(951_782_400), "2000-02-29 00:00:00 UTC");
    }

    #[test]
    fn ticket_text() {
        let s = created("swift-fox-jumps-barrel", "012345", 5600, "CASE 4711's", 2000);
        assert!(
            s.contains("sudo ./linbit-tunl --token 012345 --case 'CASE 4711'\\''s' swift-fox-jumps-barrel\n"),
            "{s}"
        );
        assert!(s.contains("in 1h"));
        assert!(created("a-b-c-d", "000000", 1, "", 0).contains("--token 000000 a-b-c-d"));
    }

    #[test]
    fn show_page() {
        let mut it = item("swift-fox-jumps-barrel", "share", "db1", "", 0);
        it.port = Some(40001);
        let p =
            page(&it, &[("alice".into(), false), ("bob".into(), true)], &[(3600, "customer".into(), "hi".into())], 60);
        assert!(p.starts_with("=== swift-fox-jumps-barrel\nMode:        share\n"), "{p}");
        assert!(p.contains("Viewers:     alice, bob (read-only)\n"));
        assert!(p.contains("port 40001"));
        assert!(p.contains("  01:00 customer> hi\n"));
    }
}
