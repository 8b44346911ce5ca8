//! `tunl-relay`: the relay a support team deploys. One concern a module; see docs/architecture.md
//! ("The relay and the support side") for the processes and who runs each.

pub mod accounts;
pub mod api;
pub mod audit;
pub mod authinfo;
pub mod broker;
pub mod broker_main;
pub mod conn;
pub mod from_customer;
pub mod from_viewer;
pub mod harness;
pub mod hello;
pub mod identity;
pub mod init;
pub mod kibind;
pub mod layout;
pub mod log;
pub mod ops;
pub mod outq;
pub mod pam_ki;
pub mod produce;
pub mod recording;
pub mod registry;
pub mod serve;
pub mod splice;
pub mod sshd;
pub mod support;
pub mod support_cmd;

/// The host's OpenSSH server, which the relay drives (never an SSH stack of our own).
pub const SSHD: &str = "/usr/sbin/sshd";

/// Unix seconds now (the registry takes times from its callers).
pub fn now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0)
}
