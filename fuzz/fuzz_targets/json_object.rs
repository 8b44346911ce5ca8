//! The signing API's answer: never a panic; what parses re-encodes to text that parses the same.
#![no_main]
use libfuzzer_sys::fuzz_target;
use linbit_tunl_fuzz::json::{encode_object, parse_string_object};

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else { return };
    if let Ok(fields) = parse_string_object(s) {
        let refs: Vec<(&str, &str)> = fields.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        assert_eq!(parse_string_object(&encode_object(&refs)).as_ref(), Ok(&fields));
    }
});
