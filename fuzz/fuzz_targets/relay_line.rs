//! One relay line through the parser, the allowlist in every state and the log writer. The first
//! byte picks the state so the fuzzer can vary it; the rest is the line.
#![no_main]
use libfuzzer_sys::fuzz_target;
use linbit_tunl_fuzz::cli::Mode;
use linbit_tunl_fuzz::protocol::{LineSplitter, allowed, log_line, parse_relay_line};

fuzz_target!(|data: &[u8]| {
    let Some((&state, line)) = data.split_first() else { return };
    let mode = [Mode::Share, Mode::Restricted, Mode::Tunnel][usize::from(state % 3)];
    let parsed = parse_relay_line(line);
    let verdict = parsed.as_ref().ok().map(|m| allowed(m, mode, state & 4 != 0, state & 8 != 0));
    let log = log_line(&parsed, verdict);
    assert!(!log.bytes().any(|b| b < 0x20 || b == 0x7f), "control byte in log line {log:?}");
    // The same bytes as a stream, cut where the state byte says.
    let cut = usize::from(state).min(line.len());
    let mut sp = LineSplitter::new();
    for part in [&line[..cut], &line[cut..], b"\n"] {
        sp.push(part);
        while let Some(l) = sp.next_line() {
            if let Ok(l) = l {
                let _ = parse_relay_line(l);
            }
        }
    }
});
