//! tmux control-mode output: the events of the whole input must equal those of the input split at
//! the position the first two bytes name (every boundary is reachable).
#![no_main]
use libfuzzer_sys::fuzz_target;
use linbit_tunl_fuzz::tmux::{ControlParser, Event, unescape};

fn events(chunks: &[&[u8]]) -> Vec<Event> {
    let mut p = ControlParser::new();
    let mut out = Vec::new();
    for c in chunks {
        p.push(c);
        out.extend(std::iter::from_fn(|| p.next_event()));
    }
    out
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    let at = usize::from(u16::from_le_bytes([data[0], data[1]]));
    let s = &data[2..];
    let at = at % (s.len() + 1);
    assert_eq!(events(&[s]), events(&[&s[..at], &s[at..]]), "split at {at}");
    let _ = unescape(s);
});
