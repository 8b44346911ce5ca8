//! `tunl-relay`: the relay a support team deploys. One concern a module; see docs/architecture.md
//! ("The relay and the support side") for the processes and who runs each.

pub mod audit;
pub mod broker;
pub mod broker_main;
pub mod from_customer;
pub mod from_viewer;
pub mod hello;
pub mod identity;
pub mod layout;
pub mod outq;
pub mod produce;
pub mod recording;
pub mod registry;
pub mod splice;
pub mod support;
pub mod support_cmd;

/// Unix seconds now (the registry takes times from its callers).
pub fn now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0)
}
