//! Keyboard bytes into the chat line editor (whole and cut in two: the same lines, no control
//! character), plus the same bytes as a chat.fifo line and as percent-encoded text.
#![no_main]
use libfuzzer_sys::fuzz_target;
use linbit_tunl_fuzz::chat::{LineEditor, neutralise, parse_chat_line};
use linbit_tunl_fuzz::cli::{pct_decode, pct_encode};

fuzz_target!(|data: &[u8]| {
    let Some((&cut, bytes)) = data.split_first() else { return };
    let cut = usize::from(cut).min(bytes.len());
    let mut whole = LineEditor::default();
    let want = whole.feed(bytes);
    let mut parts = LineEditor::default();
    let mut got = parts.feed(&bytes[..cut]);
    got.extend(parts.feed(&bytes[cut..]));
    assert_eq!(got, want);
    for l in &want {
        assert_eq!(&neutralise(l), l);
    }
    let _ = parse_chat_line(bytes);
    if let Ok(s) = std::str::from_utf8(bytes)
        && let Some(d) = pct_decode(s)
    {
        assert_eq!(pct_decode(&pct_encode(&d)), Some(d));
    }
});
