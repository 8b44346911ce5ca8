//! The client's pure parsers, compiled from the client's own sources for the fuzz targets. The client
//! is a binary crate; including the modules by path keeps it one (no src/lib.rs for fuzzing's sake).
//! Only modules whose `crate::` references stay inside this set are included: authkeys.rs would pull
//! in sessiondir.rs and auth.rs (TLS, HTTP), so the authorized_keys editor is covered by its
//! property tests only.
#![allow(dead_code, unused_imports, clippy::all)]

#[path = "../../src/chat.rs"]
pub mod chat;
#[path = "../../src/cli.rs"]
pub mod cli;
#[path = "../../src/json.rs"]
pub mod json;
#[path = "../../src/proc.rs"]
pub mod proc;
#[path = "../../src/protocol.rs"]
pub mod protocol;
#[path = "../../src/signals.rs"]
pub mod signals;
#[path = "../../src/text.rs"]
pub mod text;
#[path = "../../src/tmux.rs"]
pub mod tmux;
#[path = "../../src/tunnel.rs"]
pub mod tunnel;
