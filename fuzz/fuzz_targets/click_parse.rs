//! Click parsing as HTTP ingest does it: the body framed as JSON and as NDJSON, every
//! parsed object validated by `prepare`, and every accepted click rendered in every
//! payload format (single and, where the format has one, batch) into valid JSON.
#![no_main]

use clickhook::deliver::format::{render, Format, RenderContext};
use clickhook::enrich::Enricher;
use clickhook::ingest::click::{parse_body, prepare, Framing};
use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;

fn enricher() -> &'static Enricher {
    static E: OnceLock<Enricher> = OnceLock::new();
    E.get_or_init(Enricher::new)
}

fuzz_target!(|data: &[u8]| {
    for framing in [Framing::Json, Framing::Ndjson] {
        let mut body = data.to_vec();
        let Ok(values) = parse_body(&mut body, framing) else {
            continue;
        };
        for (i, v) in values.into_iter().enumerate() {
            let Ok(click) = prepare(v, i, enricher(), "2025-01-01T00:00:00.000Z") else {
                continue;
            };
            let stored: serde_json::Value =
                serde_json::from_slice(&click.data).expect("a prepared click is stored as JSON");
            assert_eq!(stored["id"], click.id.as_str());
            for format in [Format::Standard, Format::Linkly, Format::Rebrandly, Format::Masiv] {
                for batch in [false, true] {
                    if batch && !format.supports_batch() {
                        continue;
                    }
                    let ctx = RenderContext {
                        endpoint_id: "fuzz",
                        webhook_id: &click.id,
                        include_ip: true,
                        batch,
                    };
                    let out = render(format, &[&click.data, &click.data], &ctx).expect("a prepared click renders");
                    serde_json::from_slice::<serde_json::Value>(&out).expect("rendered payloads are JSON");
                }
            }
        }
    }
});
