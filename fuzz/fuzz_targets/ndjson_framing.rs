//! NDJSON framing: `parse_body` with `Framing::Ndjson` yields one value per non-blank line,
//! or an error whose index is the 0-based index of a non-blank line.
#![no_main]

use clickhook::ingest::click::{parse_body, Framing};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let lines = data
        .split(|b| *b == b'\n')
        .filter(|l| !l.iter().all(u8::is_ascii_whitespace))
        .count();
    let mut body = data.to_vec();
    match parse_body(&mut body, Framing::Ndjson) {
        Ok(values) => assert_eq!(values.len(), lines, "one value per non-blank line"),
        Err(e) => assert!(e.index < lines, "error index {} of {} non-blank lines", e.index, lines),
    }
});
