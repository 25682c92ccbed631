//! Click parsing as HTTP ingest does it: the body framed as JSON and as NDJSON, every
//! object validated from its text by `prepare_raw` and, for the same verdict and stored
//! click, from a value by `prepare`, and every accepted click rendered in every payload
//! format (single and, where the format has one, batch) into valid JSON.
//! The checks live in `tests/fuzz_bodies`, shared with `tests/fuzz_regressions.rs`.
#![no_main]

// Each target uses one of the shared bodies.
#[allow(dead_code)]
#[path = "../../tests/fuzz_bodies/mod.rs"]
mod fuzz_bodies;

libfuzzer_sys::fuzz_target!(|data: &[u8]| fuzz_bodies::click_parse(data));
