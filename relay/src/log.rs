//! Structured log lines on stderr, one event a line (`key=value`, values percent-encoded when they
//! are not plain tokens), for journald. Never a token, a key or a session's payload: callers pass
//! byte counts and reasons.

use std::io::Write;

/// Formats one event line (pure, tested): `tunl-relay[PID]: LEVEL EVENT k=v ...`.
pub fn format(pid: u32, level: &str, event: &str, fields: &[(&str, &str)]) -> String {
    let mut s = format!("tunl-relay[{pid}]: {level} {event}");
    for (k, v) in fields {
        s.push(' ');
        s.push_str(k);
        s.push('=');
        if !v.is_empty() && tunl_wire::is_token(v) {
            s.push_str(v);
        } else {
            s.push_str(&tunl_wire::pct_encode(v));
        }
    }
    s
}

static SYSLOG: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Also send every line to syslog (authpriv): `pam_exec` throws a command's stderr away, so
/// `pam-ki`'s decisions would otherwise reach no journal.
pub fn use_syslog() {
    // SAFETY: openlog keeps the pointer: the identity is a 'static C string.
    unsafe { libc::openlog(c"tunl-relay".as_ptr(), libc::LOG_PID, libc::LOG_AUTHPRIV) };
    SYSLOG.store(true, std::sync::atomic::Ordering::SeqCst);
}

static JOURNAL: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Journald's stream socket (what systemd gives a service as its stderr), for a process that sshd
/// started, whose stderr would be the customer's channel: identifier `tunl-relay`, and a `<N>`
/// syslog priority before each line.
pub fn journal_stream() -> Option<std::os::unix::net::UnixStream> {
    let mut s = std::os::unix::net::UnixStream::connect("/run/systemd/journal/stdout").ok()?;
    // identifier, unit, default priority, level prefixes on, no syslog/kmsg/console forwarding.
    s.write_all(b"tunl-relay\n\n6\n1\n0\n0\n0\n").ok()?;
    let _ = s.shutdown(std::net::Shutdown::Read);
    JOURNAL.store(true, std::sync::atomic::Ordering::SeqCst);
    Some(s)
}

pub fn event(level: &str, event: &str, fields: &[(&str, &str)]) {
    let line = format(std::process::id(), level, event, fields);
    let prefix = match (JOURNAL.load(std::sync::atomic::Ordering::SeqCst), level) {
        (false, _) => "",
        (true, "warn") => "<4>",
        (true, _) => "<6>",
    };
    let _ = writeln!(std::io::stderr().lock(), "{prefix}{line}");
    if SYSLOG.load(std::sync::atomic::Ordering::SeqCst) {
        // The line is ASCII without NUL (values are percent-encoded), so CString cannot fail.
        if let Ok(c) = std::ffi::CString::new(line) {
            let prio = if level == "warn" { libc::LOG_WARNING } else { libc::LOG_INFO };
            // SAFETY: a "%s" format with one valid C string argument.
            unsafe { libc::syslog(prio, c"%s".as_ptr(), c.as_ptr()) };
        }
    }
}

pub fn info(ev: &str, fields: &[(&str, &str)]) {
    event("info", ev, fields);
}

pub fn warn(ev: &str, fields: &[(&str, &str)]) {
    event("warn", ev, fields);
}

#[cfg(test)]
mod tests {
    #[test]
    fn one_line_whatever_the_values() {
        let l = super::format(7, "warn", "sign", &[("id", "a-b-c-d"), ("why", "bad\nline x"), ("e", "")]);
        assert_eq!(l, "tunl-relay[7]: warn sign id=a-b-c-d why=bad%0Aline%20x e=");
    }
}
