//! The relay's and support tool's framing (tunl-wire): parse, split reads, neutralize.
#![no_main]
use libfuzzer_sys::fuzz_target;
use tunl_wire::{Splitter, neutralize, parse, pct_decode, pct_encode};

fuzz_target!(|data: &[u8]| {
    let Some((&cut, bytes)) = data.split_first() else { return };
    let _ = parse(bytes, |v| matches!(v, "K" | "O" | "CHAT" | "NOTE" | "UPGRADE"));
    let cut = usize::from(cut).min(bytes.len());
    let mut a = Splitter::default();
    let want = a.push(bytes);
    let mut b = Splitter::default();
    let mut got = b.push(&bytes[..cut]);
    got.extend(b.push(&bytes[cut..]));
    assert_eq!(got, want);
    let text = String::from_utf8_lossy(bytes);
    let _ = neutralize(&text);
    if let Some(d) = pct_decode(&text) {
        assert_eq!(pct_decode(&pct_encode(&d)), Some(d));
    }
});
