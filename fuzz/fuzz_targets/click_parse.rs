//! Click parsing as HTTP ingest does it: the body framed as JSON and as NDJSON, every
//! object validated from its text by `prepare_raw` and, for the same verdict and stored
//! click, from a value by `prepare`, and every accepted click rendered in every payload
//! format (single and, where the format has one, batch) into valid JSON.
#![no_main]

use clickhook::deliver::format::{render, Format, RenderContext};
use clickhook::enrich::Enricher;
use clickhook::ingest::click::{parse_one, prepare, prepare_raw, split_body, ClickError, Framing};
use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;

fn enricher() -> &'static Enricher {
    static E: OnceLock<Enricher> = OnceLock::new();
    E.get_or_init(Enricher::new)
}

fuzz_target!(|data: &[u8]| {
    for framing in [Framing::Json, Framing::Ndjson] {
        let Ok(items) = split_body(data, framing) else {
            continue;
        };
        for (i, raw) in items.into_iter().enumerate() {
            let text = raw.get().as_bytes();
            let from_text = prepare_raw(text, i, enricher(), "2025-01-01T00:00:00.000Z");
            // The adapters' way in (a value, encoded again) must reach the same verdict
            // and the same stored click.
            let from_value = parse_one(text)
                .map_err(|m| ClickError { index: i, message: m })
                .and_then(|v| prepare(v, i, enricher(), "2025-01-01T00:00:00.000Z"));
            let click = match (from_text, from_value) {
                (Ok(a), Ok(b)) => {
                    let mut va: serde_json::Value = serde_json::from_slice(&a.data).expect("a prepared click is stored as JSON");
                    let mut vb: serde_json::Value = serde_json::from_slice(&b.data).expect("a prepared click is stored as JSON");
                    if !a.client_id {
                        va["id"] = serde_json::Value::Null;
                        vb["id"] = serde_json::Value::Null;
                    }
                    assert_eq!(va, vb, "text and value give different stored clicks");
                    assert_eq!((&a.link_id, &a.workspace_id, a.is_bot), (&b.link_id, &b.workspace_id, b.is_bot));
                    a
                }
                (Err(_), Err(_)) => continue,
                (a, b) => panic!("text and value disagree: {:?} against {:?}", a.map(|c| c.id), b.map(|c| c.id)),
            };
            let stored: serde_json::Value =
                serde_json::from_slice(&click.data).expect("a prepared click is stored as JSON");
            assert_eq!(stored["id"], click.id.as_str());
            assert!(!click.data.contains(&b'\n'), "a stored click is one line");
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
