//! The signing API's request reader (`api::read_request`: head, headers, body by Content-Length)
//! over a connection that delivers the bytes in pieces of a fuzzed size, then the sign request's
//! JSON body. Bounded whatever arrives; an accepted sign request holds only valid fields, and its
//! public key is one OpenSSH reads.
//!
//! Input: a byte for the piece size, then the bytes the client sends.
#![no_main]
use std::io::Read;
use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use tunl_relay::api::{MAX_BODY, Reply, parse_head, parse_sign, read_request, render};

/// A connection that hands out at most `piece` bytes a read, then end of file.
struct Pieces<'a> {
    data: &'a [u8],
    piece: usize,
}

impl Read for Pieces<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.piece.min(buf.len()).min(self.data.len());
        buf[..n].copy_from_slice(&self.data[..n]);
        self.data = &self.data[n..];
        Ok(n)
    }
}

fn answer_is_http(r: &Reply) {
    let text = String::from_utf8(render(r)).unwrap();
    assert!(text.starts_with(&format!("HTTP/1.1 {} ", r.status)), "{text:?}");
    assert!((400..600).contains(&r.status) || r.status == 200);
}

fuzz_target!(|data: &[u8]| {
    let Some((&piece, bytes)) = data.split_first() else { return };
    let mut conn = Pieces { data: bytes, piece: usize::from(piece).max(1) };
    let deadline = Instant::now() + Duration::from_secs(3600);
    match read_request(&mut conn, deadline) {
        Ok((head, body)) => {
            assert!(head.content_length <= MAX_BODY);
            assert_eq!(body.len(), head.content_length);
            match parse_sign(&body) {
                Ok(req) => {
                    assert!(ssh_key::PublicKey::from_openssh(&req.public_key).is_ok(), "{:?}", req.public_key);
                    assert!(req.token.len() == 6 && req.token.bytes().all(|b| b.is_ascii_digit()));
                    assert!(!req.host.is_empty() && req.host.len() <= 64);
                }
                Err(r) => answer_is_http(&r),
            }
        }
        Err(r) => answer_is_http(&r),
    }
    // The head parser alone, on the whole input.
    if let Err(r) = parse_head(bytes) {
        answer_is_http(&r);
    }
});
