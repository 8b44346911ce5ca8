//! The shell pane's first process on tmux 3.2 and 3.2a (`__shell DIR`).
//!
//! Those two releases crash the whole tmux server when a pane kept by `remain-on-exit` dies while a
//! control client (our daemon) still has output of it queued: `control_write_pending` reads the dead
//! pane's freed buffer (3.3 checks for a dead pane first). A shell's last words (`logout`) and its
//! exit come together, so typing `exit` ended the session, and with `--attach` the customer's own
//! tmux server. There the pane never dies: this keeper starts the login shell as tmux would
//! (`argv[0]` is `-NAME`), and when the shell ends it shows what `remain-on-exit-format` shows
//! elsewhere and waits: Enter starts a new shell, `q` ends the session.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use rustix::event::{PollFd, PollFlags, poll};
use rustix::io::Errno;

use crate::{chat, signals};

/// What the pane says once the shell has ended (the `remain-on-exit-format` of 3.3+).
pub const ENDED: &str = "Shell ended: press Enter to restart it, q to end the session";

/// What a key typed at the ended shell does.
#[derive(Debug, PartialEq, Eq)]
pub enum Answer {
    Restart,
    Quit,
    Wait,
}

/// The answer to the bytes one read gave: the first key that means something wins.
pub fn answer(keys: &[u8]) -> Answer {
    keys.iter()
        .find_map(|&k| match k {
            b'\r' | b'\n' => Some(Answer::Restart),
            b'q' => Some(Answer::Quit),
            _ => None,
        })
        .unwrap_or(Answer::Wait)
}

/// The login shell tmux would start: `$SHELL` when it is an absolute path to an executable (tmux
/// puts its `default-shell` there), else `/bin/sh`; `argv[0]` is `-` and its file name.
pub fn login_shell(shell: Option<&str>) -> (PathBuf, String) {
    let usable = |s: &&str| Path::new(s).is_absolute() && crate::is_executable(Path::new(s));
    let path = PathBuf::from(shell.filter(usable).unwrap_or("/bin/sh"));
    let name = path.file_name().map_or("sh".into(), |n| n.to_string_lossy().into_owned());
    (path, format!("-{name}"))
}

pub fn run(dir: &Path) -> i32 {
    let Ok(sig) = signals::SignalPipe::install() else {
        eprintln!("linbit-tunl: cannot set up signals");
        return 1;
    };
    // A shell without job control leaves us in the foreground with it: Ctrl-\ and Ctrl-z meant for
    // it must not end or stop the pane's keeper. (Caught, not ignored: the shell gets the defaults.)
    signals::catch_job_signals();
    let (shell, argv0) = login_shell(std::env::var("SHELL").ok().as_deref());
    loop {
        let mut cmd = Command::new(&shell);
        cmd.arg0(&argv0);
        // SAFETY: reset_in_child only calls signal(2), which is async-signal-safe.
        unsafe {
            cmd.pre_exec(|| {
                signals::reset_in_child();
                Ok(())
            });
        }
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => {
                chat::write_all(&format!("\r\nlinbit-tunl: cannot start {}: {e}\r\n", shell.display()));
                return wait_for_key(dir, &sig).unwrap_or(1);
            }
        };
        // Until the shell ends: SIGCHLD wakes us; a hangup (the session is over) ends both.
        loop {
            if let Ok(Some(_)) = child.try_wait() {
                break;
            }
            if wait_signal(&sig).iter().any(|&s| s == signals::SIGHUP || s == signals::SIGTERM) {
                signals::send(child.id() as i32, signals::SIGHUP);
                let _ = child.wait();
                return 0;
            }
        }
        // An interactive shell gave the terminal back to our process group as it left; one that
        // was killed may not have.
        signals::take_terminal();
        chat::write_all(&format!("\r\n{ENDED}"));
        match wait_for_key(dir, &sig) {
            Some(code) => return code,
            None => chat::write_all("\r\n"),
        }
    }
}

/// Wait for Enter (None: start a new shell) or the end of the session (Some: exit with it).
fn wait_for_key(dir: &Path, sig: &signals::SignalPipe) -> Option<i32> {
    let stdin = rustix::stdio::stdin();
    let saved = chat::raw_stdin();
    let restore = || chat::restore_stdin(&saved);
    let mut buf = [0u8; 64];
    loop {
        let mut fds = [PollFd::new(&stdin, PollFlags::IN), PollFd::from_borrowed_fd(sig.fd(), PollFlags::IN)];
        if let Err(e) = poll(&mut fds, None) {
            if e != Errno::INTR {
                restore();
                return Some(1);
            }
        }
        let (key_ev, sig_ev) = (fds[0].revents(), fds[1].revents());
        if !sig_ev.is_empty() && sig.drain().iter().any(|&s| s == signals::SIGHUP || s == signals::SIGTERM) {
            restore();
            return Some(0);
        }
        if key_ev.is_empty() {
            continue;
        }
        match rustix::io::read(stdin, &mut buf) {
            Ok(0) | Err(Errno::IO) => return Some(0),
            Ok(n) => match answer(&buf[..n]) {
                Answer::Restart => {
                    restore();
                    return None;
                }
                // Ctrl-b Q's way; the daemon ends the session and tmux hangs up on us.
                Answer::Quit => {
                    let _ = chat::send_ctl(dir, "quit\n");
                }
                Answer::Wait => {}
            },
            Err(Errno::INTR) | Err(Errno::AGAIN) => {}
            Err(_) => {
                restore();
                return Some(1);
            }
        }
    }
}

fn wait_signal(sig: &signals::SignalPipe) -> Vec<i32> {
    let mut fds = [PollFd::from_borrowed_fd(sig.fd(), PollFlags::IN)];
    let _ = poll(&mut fds, None);
    sig.drain()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enter_restarts_q_quits_and_anything_else_waits() {
        assert_eq!(answer(b"\r"), Answer::Restart);
        assert_eq!(answer(b"\n"), Answer::Restart);
        assert_eq!(answer(b"q"), Answer::Quit);
        assert_eq!(answer(b"xyq\r"), Answer::Quit);
        assert_eq!(answer(b"x\rq"), Answer::Restart);
        assert_eq!(answer(b"\x1b[A"), Answer::Wait);
        assert_eq!(answer(b"Q"), Answer::Wait);
        assert_eq!(answer(b""), Answer::Wait);
    }

    #[test]
    fn the_login_shell_is_what_tmux_would_start() {
        assert_eq!(login_shell(Some("/bin/sh")), (PathBuf::from("/bin/sh"), "-sh".to_string()));
        // Relative, missing or not executable: tmux's fallback.
        for bad in [Some("bash"), Some("/nonexistent/zsh"), Some("/etc/passwd"), Some(""), None] {
            assert_eq!(login_shell(bad), (PathBuf::from("/bin/sh"), "-sh".to_string()), "{bad:?}");
        }
    }
}
