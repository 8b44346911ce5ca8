//! The per-session audit log: one JSON object a line, appended, never rewritten. Who joined and
//! left, keystroke byte counts per engineer (never the keys), chat, notes, upgrades and their
//! answers, tunnel ports, revokes, the link going down and up, and the close.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use serde_json::{Map, Value, json};

pub struct Audit {
    file: File,
}

pub fn now_unix() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

impl Audit {
    pub fn open(path: &Path) -> io::Result<Audit> {
        let file = OpenOptions::new().create(true).append(true).mode(0o640).open(path)?;
        Ok(Audit { file })
    }

    /// Appends `{"t":UNIX,"ev":EV,...fields}`. A failed write is reported to the caller, which logs
    /// it: losing an audit line must be visible, but must not end a customer's session.
    pub fn record(&mut self, ev: &str, fields: Value) -> io::Result<()> {
        let mut obj = Map::new();
        obj.insert("t".into(), json!(now_unix()));
        obj.insert("ev".into(), json!(ev));
        if let Value::Object(m) = fields {
            obj.extend(m);
        }
        let mut line = serde_json::to_vec(&Value::Object(obj)).map_err(io::Error::other)?;
        line.push(b'\n');
        self.file.write_all(&line)
    }
}

/// Every record of an audit log, as the raw lines (for `log`); a missing file has none.
pub fn read_lines(path: &Path) -> io::Result<Vec<String>> {
    match std::fs::read_to_string(path) {
        Ok(t) => Ok(t.lines().filter(|l| !l.is_empty()).map(str::to_string).collect()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(e),
    }
}

/// The chat records (`at`, `from`, `text`) of an audit log, the last `max` of them.
pub fn chat_log(lines: &[String], max: usize) -> Vec<(u64, String, String)> {
    let mut out: Vec<(u64, String, String)> = lines
        .iter()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["ev"] == "chat")
        .filter_map(|v| Some((v["t"].as_u64()?, v["from"].as_str()?.to_string(), v["text"].as_str()?.to_string())))
        .collect();
    let skip = out.len().saturating_sub(max);
    out.drain(..skip);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_and_chat_log() {
        let dir = std::env::temp_dir().join(format!("tunl-audit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("a.jsonl");
        let mut a = Audit::open(&p).unwrap();
        a.record("join", json!({"who": "alice", "ro": false})).unwrap();
        a.record("chat", json!({"from": "customer", "text": "hi \"there\"\n"})).unwrap();
        a.record("chat", json!({"from": "alice", "text": "hello"})).unwrap();
        let lines = read_lines(&p).unwrap();
        assert_eq!(lines.len(), 3);
        assert!(lines[0].contains("\"ev\":\"join\"") && lines[0].contains("\"who\":\"alice\""));
        let chat = chat_log(&lines, 1);
        assert_eq!(chat.len(), 1);
        assert_eq!((chat[0].1.as_str(), chat[0].2.as_str()), ("alice", "hello"));
        assert_eq!(chat_log(&lines, 10)[0].2, "hi \"there\"\n");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
