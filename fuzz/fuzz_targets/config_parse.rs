//! Config parsing: any text is either a valid config or a `ConfigError`, never a panic.
//! The checks live in `tests/fuzz_bodies`, shared with `tests/fuzz_regressions.rs`.
#![no_main]

// Each target uses one of the shared bodies.
#[allow(dead_code)]
#[path = "../../tests/fuzz_bodies/mod.rs"]
mod fuzz_bodies;

libfuzzer_sys::fuzz_target!(|data: &[u8]| fuzz_bodies::config_parse(data));
