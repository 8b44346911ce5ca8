//! The client's pure parsers, compiled from the client's own sources for the fuzz targets. The client
//! is a binary crate; including the modules by path keeps it one (no src/lib.rs for fuzzing's sake).
//! Only modules whose `crate::` references stay inside this set are included, and `auth` below, which
//! sessiondir.rs (called by authkeys.rs) needs for three file names only: the real auth.rs would pull
//! in TLS and HTTP.
#![allow(dead_code, unused_imports, clippy::all)]

#[path = "../../src/authkeys.rs"]
pub mod authkeys;
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
#[path = "../../src/sessiondir.rs"]
pub mod sessiondir;
#[path = "../../src/signals.rs"]
pub mod signals;
#[path = "../../src/text.rs"]
pub mod text;
#[path = "../../src/tmux.rs"]
pub mod tmux;
#[path = "../../src/tunnel.rs"]
pub mod tunnel;
// chat.rs names the grant word from it.
#[path = "../../src/ui.rs"]
pub mod ui;

/// The names sessiondir.rs takes from auth.rs; the fuzz targets never touch these files.
pub mod auth {
    pub const KEY_FILE: &str = "id_ed25519";
    pub const CERT_FILE: &str = "id_ed25519-cert.pub";
    pub const ASKPASS_FILE: &str = "askpass.sh";
}
