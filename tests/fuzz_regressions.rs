//! Regression inputs for the fuzz targets in `fuzz/`: every input a fuzzer ever crashed on,
//! and the edge cases worth keeping, goes through the very checks of its target here
//! (`tests/fuzz_bodies`, which the targets themselves call), so a finding stays fixed
//! without the fuzzer. It must not check anything of its own beside what the targets check.

mod fuzz_bodies;

use fuzz_bodies::{adapters, click_parse, config_parse, ndjson_framing};
use std::path::Path;

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
