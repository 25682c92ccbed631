//! The `standard` format: the stored event is already the `data` object, so rendering is
//! splicing bytes into an envelope — no parse on the hot path. It must not reorder or
//! rewrite the stored JSON.

use super::RenderContext;

/// Renders events into the `link.clicked` envelope (or `link.clicked.batch`).
pub fn render(events: &[&[u8]], ctx: &RenderContext<'_>) -> Vec<u8> {
    let len: usize = events.iter().map(|e| e.len() + 1).sum::<usize>() + 96;
    let mut out = Vec::with_capacity(len);
    if ctx.batch {
        out.extend_from_slice(br#"{"type":"link.clicked.batch","data":["#);
        for (i, event) in events.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            out.extend_from_slice(event);
        }
        out.extend_from_slice(b"]}");
        return out;
    }
    let event = events.first().copied().unwrap_or(b"null");
    out.extend_from_slice(br#"{"type":"link.clicked","timestamp":"#);
    out.extend_from_slice(timestamp_of(event));
    out.extend_from_slice(br#","data":"#);
    out.extend_from_slice(event);
    out.push(b'}');
    out
}

/// The stored event always begins `{"id":<json string>,"timestamp":"<rfc3339>",` (the log
/// writes it that way); this finds the timestamp's JSON text without parsing the rest.
fn timestamp_of(event: &[u8]) -> &[u8] {
    const KEY: &[u8] = br#","timestamp":""#;
    if let Some(start) = find(event, KEY) {
        let from = start + KEY.len() - 1;
        if let Some(end) = event[from + 1..].iter().position(|&b| b == b'"') {
            return &event[from..from + end + 2];
        }
    }
    b"null"
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx(batch: bool) -> RenderContext<'static> {
        RenderContext {
            endpoint_id: "e",
            webhook_id: "w",
            include_ip: false,
            batch,
        }
    }

    #[test]
    fn single_event_envelope_carries_click_timestamp() {
        let ev = br#"{"id":"evt_1","timestamp":"2025-01-15T10:30:00Z","link":{"id":1}}"#;
        let out = render(&[ev], &ctx(false));
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["type"], "link.clicked");
        assert_eq!(v["timestamp"], "2025-01-15T10:30:00Z");
        assert_eq!(v["data"]["id"], "evt_1");
    }

    #[test]
    fn batch_envelope_holds_every_event() {
        let a = br#"{"id":"a","timestamp":"2025-01-15T10:30:00Z"}"#;
        let b = br#"{"id":"b","timestamp":"2025-01-15T10:30:01Z"}"#;
        let out = render(&[a, b], &ctx(true));
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["type"], "link.clicked.batch");
        assert_eq!(v["data"][1]["id"], "b");
    }

    #[test]
    fn id_containing_timestamp_text_does_not_confuse_the_splice() {
        let ev = br#"{"id":"x\",\"timestamp\":\"bad","timestamp":"2025-01-15T10:30:00Z"}"#;
        let out = render(&[ev], &ctx(false));
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["timestamp"], "2025-01-15T10:30:00Z");
    }
}
