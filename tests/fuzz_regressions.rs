//! Regression inputs for the fuzz targets in `fuzz/`: every input a fuzzer ever crashed on,
//! and the edge cases worth keeping, goes through the very checks of its target here, so a
//! finding stays fixed without the fuzzer. The functions below are the bodies of the four
//! targets (`click_parse`, `ndjson_framing`, `adapters`, `config_parse`); keep them in step.

use clickhook::config::Config;
use clickhook::deliver::format::{render, Format, RenderContext};
use clickhook::enrich::Enricher;
use clickhook::ingest::adapters::adapt;
use clickhook::ingest::click::{parse_body, parse_one, prepare, prepare_raw, split_body, ClickError, Framing};
use std::path::Path;
use std::sync::OnceLock;

fn enricher() -> &'static Enricher {
    static E: OnceLock<Enricher> = OnceLock::new();
    E.get_or_init(Enricher::new)
}

/// `fuzz_targets/click_parse.rs`: both framings, `prepare_raw` against `prepare`, and every
/// format's rendering.
fn click_parse(data: &[u8]) {
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
                    assert_eq!(
                        (&a.link_id, &a.workspace_id, a.is_bot),
                        (&b.link_id, &b.workspace_id, b.is_bot)
                    );
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
fn ndjson_framing(data: &[u8]) {
    let lines = data
        .split(|b| *b == b'\n')
        .filter(|l| !l.iter().all(u8::is_ascii_whitespace))
        .count();
    let body = data.to_vec();
    match parse_body(&body, Framing::Ndjson) {
        Ok(values) => assert_eq!(values.len(), lines, "one value per non-blank line"),
        Err(e) => assert!(e.index < lines, "error index {} of {} non-blank lines", e.index, lines),
    }
}

/// `fuzz_targets/adapters.rs`: the first byte picks the format; `adapt`, then `prepare`.
fn adapters(data: &[u8]) {
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
fn config_parse(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let _ = Config::parse(text, Path::new("/fuzz/config.toml"));
}

fn nested(open: &str, close: &str, depth: usize) -> Vec<u8> {
    format!("{}{}", open.repeat(depth), close.repeat(depth)).into_bytes()
}

#[test]
fn click_parse_inputs() {
    let deep = nested("[", "]", 100_000);
    let inputs: Vec<&[u8]> = vec![
        b"",
        b"\n\n \r\n",
        b"null",
        b"[]",
        b"[null,1,\"x\"]",
        br#"{"link":{"id":1}}"#,
        br#"{"link":{"id":18446744073709551615},"id":1e300,"timestamp":"2025-01-01T00:00:00+14:00"}"#,
        br#"{"link":{"id":"\u0000","created_at":"+262142-01-01","active_at":"9999-12-31T23:59:59.999999999-23:59"},"click":{"country":"\ud800"}}"#,
        br#"{"link":{"id":"1","destination":"http://[::1","domain":"."},"click":{"destination":"::::","user_agent":"\u0000"}}"#,
        &deep,
    ];
    for input in inputs {
        click_parse(input);
    }
}

#[test]
fn ndjson_framing_inputs() {
    let inputs: Vec<&[u8]> = vec![
        b"",
        b"\n",
        b"{}\n\n{}\n",
        b"{}\n{\n",
        b"\x0b\x0c\n{}",
        b"{}\r\n{}\r\n",
        b"\xff\xfe\n",
    ];
    for input in inputs {
        ndjson_framing(input);
    }
}

#[test]
fn adapters_inputs() {
    let inputs: Vec<&[u8]> = vec![
        b"\x01{}",
        b"\x02{\"data\":[]}",
        b"\x02{\"data\":[null,{}]}",
        b"\x03{\"EventType\":\"UserClick\",\"EventBody\":{}}",
        b"\x03{\"EventBody\":{\"CreationDate\":\"2023-08-24\",\"ClickAccessDate\":\"x\"}}",
        b"\x01{\"link\":{\"id\":1,\"full_url\":\"https://\"},\"click\":{\"country\":\"Germany\"}}",
    ];
    for input in inputs {
        adapters(input);
    }
}

#[test]
fn config_parse_inputs() {
    let shipped = std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("config.toml")).unwrap();
    let deep = format!("a = {}", String::from_utf8(nested("[", "]", 10_000)).unwrap()).into_bytes();
    let inputs: Vec<&[u8]> = vec![
        b"",
        &shipped,
        b"[storage]\nmax_bytes = \"99999999999999999999GiB\"\n",
        b"[delivery]\ntimeout = \"18446744073709551615s\"\n",
        b"[retry]\nschedule = [\"0ms\"]\njitter = 1.0\n",
        b"[[endpoints]]\nid = \"\"\nurl = \"\"\n",
        &deep,
    ];
    for input in inputs {
        config_parse(input);
    }
}
