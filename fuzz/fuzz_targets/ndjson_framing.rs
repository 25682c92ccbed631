//! NDJSON framing: `split_body` with `Framing::Ndjson` yields one value per non-blank line,
//! or an error whose index is the 0-based index of a non-blank line.
//! The checks live in `tests/fuzz_bodies`, shared with `tests/fuzz_regressions.rs`.
#![no_main]

// Each target uses one of the shared bodies.
#[allow(dead_code)]
#[path = "../../tests/fuzz_bodies/mod.rs"]
mod fuzz_bodies;

libfuzzer_sys::fuzz_target!(|data: &[u8]| fuzz_bodies::ndjson_framing(data));
