//! Config parsing: any text is either a valid config or a `ConfigError`, never a panic.
#![no_main]

use clickhook::config::Config;
use libfuzzer_sys::fuzz_target;
use std::path::Path;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let _ = Config::parse(text, Path::new("/fuzz/config.toml"));
});
