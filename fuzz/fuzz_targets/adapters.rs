//! Input adapters: the first byte picks the product format, the rest is parsed as JSON
//! and mapped by `adapt`; whatever it maps is then validated by `prepare`, as ingest does.
#![no_main]

use clickhook::deliver::format::Format;
use clickhook::enrich::Enricher;
use clickhook::ingest::adapters::adapt;
use clickhook::ingest::click::prepare;
use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;

fn enricher() -> &'static Enricher {
    static E: OnceLock<Enricher> = OnceLock::new();
    E.get_or_init(Enricher::new)
}

fuzz_target!(|data: &[u8]| {
    let Some((first, rest)) = data.split_first() else {
        return;
    };
    let format = match first % 4 {
        0 => Format::Standard,
        1 => Format::Linkly,
        2 => Format::Rebrandly,
        _ => Format::Masiv,
    };
    let Ok(payload) = serde_json::from_slice::<serde_json::Value>(rest) else {
        return;
    };
    let Ok(clicks) = adapt(format, payload) else { return };
    for (i, c) in clicks.into_iter().enumerate() {
        let _ = prepare(c, i, enricher(), "2025-01-01T00:00:00.000Z");
    }
});
