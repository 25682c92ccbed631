//! The `standard` format: the stored event is already the `data` object, so rendering is
//! splicing bytes into an envelope — no parse on the hot path. It must not reorder or
//! rewrite the stored JSON, with one exception: without `include_ip` the click's `ip`
//! member is cut out, since the stored event keeps the IP for the endpoints that may have it
//! (an event not laid out as the log writes it then gets its `click` object written anew,
//! members in order, compact).

use super::RenderContext;
use crate::ingest::click::object_members;

/// Renders events into the `link.clicked` envelope (or `link.clicked.batch`), each event's
/// bytes written once, straight into the body.
pub fn render(events: &[&[u8]], ctx: &RenderContext<'_>) -> Result<Vec<u8>, serde_json::Error> {
    let len: usize = events.iter().map(|e| e.len() + 1).sum::<usize>() + 96;
    let mut out = Vec::with_capacity(len);
    let write = |out: &mut Vec<u8>, event: &[u8]| {
        if ctx.include_ip {
            out.extend_from_slice(event);
            Ok(())
        } else {
            write_without_click_ip(out, event)
        }
    };
    if ctx.batch {
        out.extend_from_slice(br#"{"type":"link.clicked.batch","data":["#);
        for (i, event) in events.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            write(&mut out, event)?;
        }
        out.extend_from_slice(b"]}");
        return Ok(out);
    }
    let event: &[u8] = events.first().copied().unwrap_or(b"null");
    out.extend_from_slice(br#"{"type":"link.clicked","timestamp":"#);
    out.extend_from_slice(timestamp_of(event));
    out.extend_from_slice(br#","data":"#);
    write(&mut out, event)?;
    out.push(b'}');
    Ok(out)
}

/// Writes the stored event with its `click.ip` member cut out; every other byte stays as
/// stored when the log wrote it (compact), else see [`write_without_click_ip_parsed`].
fn write_without_click_ip(out: &mut Vec<u8>, event: &[u8]) -> Result<(), serde_json::Error> {
    match compact::click_ip(event) {
        Some(None) => out.extend_from_slice(event),
        Some(Some(cut)) => {
            out.extend_from_slice(&event[..cut.start]);
            out.extend_from_slice(&event[cut.end..]);
        }
        None => write_without_click_ip_parsed(out, event)?,
    }
    Ok(())
}

/// [`write_without_click_ip`] for JSON of any layout: the members' boundaries come from
/// serde_json, as ingest reads them (as raw text, each name once). The `click` object, when
/// it has an `ip`, is written anew without it (compact, names as serde_json writes them);
/// every other byte stays. Events the log wrote never need it.
fn write_without_click_ip_parsed(out: &mut Vec<u8>, event: &[u8]) -> Result<(), serde_json::Error> {
    let top = object_members(event)?.unwrap_or_default();
    let Some((_, click)) = top.iter().find(|(key, _)| key == "click") else {
        out.extend_from_slice(event);
        return Ok(());
    };
    let Some(members) = object_members(click.get().as_bytes())? else {
        out.extend_from_slice(event);
        return Ok(());
    };
    if !members.iter().any(|(key, _)| key == "ip") {
        out.extend_from_slice(event);
        return Ok(());
    }
    // The raw value borrows from `event`, so its place there is its address's distance from
    // the start of `event`.
    let start = click.get().as_ptr() as usize - event.as_ptr() as usize;
    let end = start + click.get().len();
    out.extend_from_slice(&event[..start]);
    out.push(b'{');
    let mut first = true;
    for (key, value) in members.iter().filter(|(key, _)| key != "ip") {
        if !first {
            out.push(b',');
        }
        first = false;
        serde_json::to_writer(&mut *out, key)?;
        out.push(b':');
        out.extend_from_slice(value.get().as_bytes());
    }
    out.push(b'}');
    out.extend_from_slice(&event[end..]);
    Ok(())
}

/// Member boundaries in compact JSON as the log writes it: no whitespace, each name once
/// (ingest keeps the last of a repeated one), names written by serde_json (so `"ip"` is
/// never spelled with escapes). Finding `click.ip` this way costs a
/// pass over the bytes, where parsing the event cost about a tenth of a delivery. Anything
/// not laid out so (`None`) goes to the parsing path, so a wrong guess costs time, never
/// a wrong body.
mod compact {
    use std::ops::Range;

    /// Where the `ip` member of the top-level `click` object lies, with the comma that
    /// joins it to a neighbour: `Some(None)` when there is none.
    pub(super) fn click_ip(b: &[u8]) -> Option<Option<Range<usize>>> {
        let Some(click) = member(b, 0, b"\"click\"")? else {
            return Some(None);
        };
        if b.get(click.value.start) != Some(&b'{') {
            return Some(None);
        }
        let Some(ip) = member(b, click.value.start, b"\"ip\"")? else {
            return Some(None);
        };
        Some(Some(if b.get(ip.value.end) == Some(&b',') {
            ip.key_start..ip.value.end + 1
        } else if b.get(ip.key_start - 1) == Some(&b',') {
            ip.key_start - 1..ip.value.end
        } else {
            ip.key_start..ip.value.end
        }))
    }

    struct Member {
        key_start: usize,
        value: Range<usize>,
    }

    /// The member named `key` (quotes included) of the object that opens at `at`.
    fn member(b: &[u8], at: usize, key: &[u8]) -> Option<Option<Member>> {
        if b.get(at) != Some(&b'{') {
            return None;
        }
        let mut i = at + 1;
        if b.get(i) == Some(&b'}') {
            return Some(None);
        }
        loop {
            let key_start = i;
            let key_end = string_end(b, i)?;
            if b.get(key_end) != Some(&b':') {
                return None;
            }
            let name = &b[key_start..key_end];
            if name.contains(&b'\\') {
                // An escaped name may spell the key; the parsing path decodes it.
                return None;
            }
            let value_end = value_end(b, key_end + 1)?;
            if name == key {
                return Some(Some(Member {
                    key_start,
                    value: key_end + 1..value_end,
                }));
            }
            match b.get(value_end) {
                Some(b',') => i = value_end + 1,
                Some(b'}') => return Some(None),
                _ => return None,
            }
        }
    }

    /// Just past the string whose opening quote is at `at`.
    fn string_end(b: &[u8], at: usize) -> Option<usize> {
        if b.get(at) != Some(&b'"') {
            return None;
        }
        let mut i = at + 1;
        while let Some(&c) = b.get(i) {
            match c {
                b'"' => return Some(i + 1),
                b'\\' => i += 2,
                _ => i += 1,
            }
        }
        None
    }

    /// Just past the value that starts at `at`.
    fn value_end(b: &[u8], at: usize) -> Option<usize> {
        match *b.get(at)? {
            b'"' => string_end(b, at),
            b'{' | b'[' => {
                let mut depth = 0usize;
                let mut i = at;
                while let Some(&c) = b.get(i) {
                    match c {
                        b'"' => {
                            i = string_end(b, i)?;
                            continue;
                        }
                        b'{' | b'[' => depth += 1,
                        b'}' | b']' => {
                            depth -= 1;
                            if depth == 0 {
                                return Some(i + 1);
                            }
                        }
                        b' ' | b'\t' | b'\n' | b'\r' => return None,
                        _ => {}
                    }
                    i += 1;
                }
                None
            }
            _ => {
                let len = b[at..]
                    .iter()
                    .position(|c| matches!(c, b',' | b'}' | b']' | b' ' | b'\t' | b'\n' | b'\r'))?;
                (len > 0 && matches!(b[at + len], b',' | b'}' | b']')).then_some(at + len)
            }
        }
    }
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
        let out = render(&[ev], &ctx(false)).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["type"], "link.clicked");
        assert_eq!(v["timestamp"], "2025-01-15T10:30:00Z");
        assert_eq!(v["data"]["id"], "evt_1");
    }

    #[test]
    fn batch_envelope_holds_every_event() {
        let a = br#"{"id":"a","timestamp":"2025-01-15T10:30:00Z"}"#;
        let b = br#"{"id":"b","timestamp":"2025-01-15T10:30:01Z"}"#;
        let out = render(&[a, b], &ctx(true)).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["type"], "link.clicked.batch");
        assert_eq!(v["data"][1]["id"], "b");
    }

    #[test]
    fn id_containing_timestamp_text_does_not_confuse_the_splice() {
        let ev = br#"{"id":"x\",\"timestamp\":\"bad","timestamp":"2025-01-15T10:30:00Z"}"#;
        let out = render(&[ev], &ctx(false)).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["timestamp"], "2025-01-15T10:30:00Z");
    }

    fn with_ip(include_ip: bool) -> RenderContext<'static> {
        RenderContext {
            include_ip,
            ..ctx(false)
        }
    }

    fn data_of(out: &[u8]) -> String {
        let v: serde_json::Value = serde_json::from_slice(out).unwrap();
        serde_json::to_string(&v["data"]).unwrap()
    }

    #[test]
    fn the_click_ip_goes_out_only_with_include_ip() {
        let ev = br#"{"id":"e","timestamp":"2025-01-15T10:30:00Z","link":{"id":1},"click":{"ip":"203.0.113.9","user_agent":"UA"},"metadata":null}"#;
        let kept = render(&[ev], &with_ip(true)).unwrap();
        assert_eq!(data_of(&kept), std::str::from_utf8(ev).unwrap());
        let cut = render(&[ev], &with_ip(false)).unwrap();
        assert_eq!(
            data_of(&cut),
            r#"{"id":"e","timestamp":"2025-01-15T10:30:00Z","link":{"id":1},"click":{"user_agent":"UA"},"metadata":null}"#
        );
        let batch = render(
            &[ev, ev],
            &RenderContext {
                batch: true,
                ..with_ip(false)
            },
        )
        .unwrap();
        assert!(!String::from_utf8(batch).unwrap().contains("203.0.113.9"));
    }

    #[test]
    fn only_the_clicks_own_ip_member_is_cut() {
        let cases: [(&str, &str); 6] = [
            // first, middle, last and only member
            (r#"{"click":{"ip":"1.2.3.4","a":1}}"#, r#"{"click":{"a":1}}"#),
            (
                r#"{"click":{"a":1,"ip":"1.2.3.4","b":[1,{"ip":2}]}}"#,
                r#"{"click":{"a":1,"b":[1,{"ip":2}]}}"#,
            ),
            (
                r#"{"click":{"a":"x","ip":"1.2.3.4"},"z":0}"#,
                r#"{"click":{"a":"x"},"z":0}"#,
            ),
            (r#"{"click":{"ip":"1.2.3.4"}}"#, r#"{"click":{}}"#),
            // an escaped key is the same key
            (r#"{"click":{"\u0069p":"1.2.3.4","a":1}}"#, r#"{"click":{"a":1}}"#),
            // "ip" elsewhere, as a key or inside strings, stays
            (
                r#"{"link":{"ip":"5.6.7.8","s":"\"ip\":\"9\""},"click":{"r":"\"ip\":1","ip":"1.2.3.4"},"metadata":{"ip":"x"}}"#,
                r#"{"link":{"ip":"5.6.7.8","s":"\"ip\":\"9\""},"click":{"r":"\"ip\":1"},"metadata":{"ip":"x"}}"#,
            ),
        ];
        let without_click_ip = |event: &[u8]| {
            let mut out = Vec::new();
            write_without_click_ip(&mut out, event).map(|()| out)
        };
        for (stored, expected) in cases {
            let out = without_click_ip(stored.as_bytes()).unwrap();
            assert_eq!(std::str::from_utf8(&out).unwrap(), expected, "from {stored}");
            let mut parsed = Vec::new();
            write_without_click_ip_parsed(&mut parsed, stored.as_bytes()).unwrap();
            assert_eq!(std::str::from_utf8(&parsed).unwrap(), expected, "parsed from {stored}");
        }
        // Laid out otherwise than the log writes, it still comes out right, by parsing.
        let spaced = br#"{ "click" : { "a" : 1 , "ip" : "1.2.3.4" } }"#;
        assert_eq!(compact::click_ip(spaced), None);
        assert_eq!(&*without_click_ip(spaced).unwrap(), br#"{ "click" : {"a":1} }"#);
        let untouched = br#"{"link":{"ip":"5.6.7.8"},"click":{"a":1}}"#;
        assert_eq!(without_click_ip(untouched).unwrap(), untouched);
        assert!(
            without_click_ip(br#"{"click":{"ip":"#).is_err(),
            "a damaged event is an error, not a pass"
        );
    }
}
