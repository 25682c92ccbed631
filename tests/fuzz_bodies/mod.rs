//! The bodies of the fuzz targets in `fuzz/` (`click_parse`, `ndjson_framing`, `adapters`,
//! `config_parse`). Each target calls its function here, and `tests/fuzz_regressions.rs`
//! runs the saved inputs through the same functions, so a finding stays fixed without the
//! fuzzer and the two can never drift apart. It must not hold inputs: those live with
//! the fuzz targets and in `tests/fuzz_regressions.rs`.

use clickhook::config::Config;
use clickhook::deliver::format::{render, Format, RenderContext};
use clickhook::enrich::Enricher;
use clickhook::ingest::adapters::adapt;
use clickhook::ingest::click::{parse_one, prepare, prepare_raw, split_body, ClickError, Framing};
use std::path::Path;
use std::sync::OnceLock;

fn enricher() -> &'static Enricher {
    static E: OnceLock<Enricher> = OnceLock::new();
    E.get_or_init(Enricher::new)
}

/// `fuzz_targets/click_parse.rs`: both framings, `prepare_raw` against `prepare`, and every
/// format's rendering.
pub fn click_parse(data: &[u8]) {
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
                    let mut va: serde_json::Value =
                        serde_json::from_slice(&a.data).expect("a prepared click is stored as JSON");
                    let mut vb: serde_json::Value =
                        serde_json::from_slice(&b.data).expect("a prepared click is stored as JSON");
                    if !a.client_id {
                        va["id"] = serde_json::Value::Null;
                        vb["id"] = serde_json::Value::Null;
                    }
                    assert_eq!(va, vb, "text and value give different stored clicks");
                    assert_eq!(a.routing, b.routing);
                    a
                }
                (Err(_), Err(_)) => continue,
                (a, b) => panic!(
                    "text and value disagree: {:?} against {:?}",
                    a.map(|c| c.id),
                    b.map(|c| c.id)
                ),
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
}

/// `fuzz_targets/ndjson_framing.rs`: one value per non-blank line, or an error at one.
pub fn ndjson_framing(data: &[u8]) {
    let lines = data
        .split(|b| *b == b'\n')
        .filter(|l| !l.iter().all(u8::is_ascii_whitespace))
        .count();
    match split_body(data, Framing::Ndjson) {
        Ok(values) => assert_eq!(values.len(), lines, "one value per non-blank line"),
        Err(e) => assert!(e.index < lines, "error index {} of {} non-blank lines", e.index, lines),
    }
}

/// `fuzz_targets/adapters.rs`: the first byte picks the format; `adapt`, then `prepare`.
pub fn adapters(data: &[u8]) {
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
    let Ok(clicks) = adapt(format, payload) else {
        return;
    };
    for (i, c) in clicks.into_iter().enumerate() {
        let _ = prepare(c, i, enricher(), "2025-01-01T00:00:00.000Z");
    }
}

/// `fuzz_targets/config_parse.rs`: a config or a `ConfigError`, never a panic.
pub fn config_parse(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let _ = Config::parse(text, Path::new("/fuzz/config.toml"));
}
