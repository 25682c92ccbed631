//! Input adapters: the first byte picks the product format, the rest is parsed as JSON
//! and mapped by `adapt`; whatever it maps is then validated by `prepare`, as ingest does.
//! The checks live in `tests/fuzz_bodies`, shared with `tests/fuzz_regressions.rs`.
#![no_main]

// Each target uses one of the shared bodies.
#[allow(dead_code)]
#[path = "../../tests/fuzz_bodies/mod.rs"]
mod fuzz_bodies;

libfuzzer_sys::fuzz_target!(|data: &[u8]| fuzz_bodies::adapters(data));
