//! The raw baseline's webhook: the body the daemon delivers in its `standard` format for
//! one synthetic click, so that `wrk` posts the sink the same bytes the daemon does and the
//! ratio of their rates compares like with like. It owns what the daemon's enrichment adds
//! to that one click, kept here as text and compared with a real delivery by a test of the
//! daemon (`tests/loadtest_smoke.rs`); it must not be used to check what a run delivers.

use crate::clicks::ClickFactory;

/// The click the baseline's body carries.
pub const BASELINE_CLICK: u64 = 1;
/// The baseline's event id, shaped like the daemon's: `evt_` and 32 hex digits.
pub const BASELINE_ID: &str = "evt_000000000000000000000000000000b0";

/// What the daemon's enrichment appends to the visitor of [`BASELINE_CLICK`] (Safari 17.3
/// on a Mac), in the order it appends it.
const ENRICHMENT: &str = concat!(
    r#","browser":{"name":"Safari","version":"17.3"},"os":{"name":"Mac OS X","version":"10.15.7"},"#,
    r#""device":"desktop","device_vendor":"Apple","bot_name":null,"is_eu_country":false"#
);

/// The `standard` body the daemon sends for click [`BASELINE_CLICK`] of `factory` as event
/// `id`: the click's own fields under `data`, its visitor IP cut (endpoints get it only with
/// `include_ip`) and its enrichment added. `None` if the factory's click lost the shape
/// this relies on.
pub fn delivered_body(factory: &ClickFactory, id: &str) -> Option<String> {
    let mut click = Vec::new();
    factory.write(BASELINE_CLICK, &mut click);
    let click = String::from_utf8(click).ok()?;
    let fields = click.strip_prefix('{')?.strip_suffix('}')?;
    let timestamp = fields.strip_prefix(r#""timestamp":""#)?.split('"').next()?;
    // The IP is the visitor's first field; the visitor ends with its `params`.
    let ip_at = fields.find(r#""click":{"ip":""#)? + r#""click":{"#.len();
    let ip_len = fields[ip_at..].find(r#"","#)? + 2;
    let visitor_end = fields.find(r#"}},"metadata""#)? + 1;
    Some(format!(
        r#"{{"type":"link.clicked","timestamp":"{timestamp}","data":{{"id":"{id}",{}{}{ENRICHMENT}{}}}}}"#,
        &fields[..ip_at],
        &fields[ip_at + ip_len..visitor_end],
        &fields[visitor_end..],
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_body_is_the_click_without_its_ip_and_with_its_enrichment() {
        let factory = ClickFactory::new(1000, "wrk", false, "2026-01-02T03:04:05Z".into());
        let body = delivered_body(&factory, "evt_1").unwrap();
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["type"], "link.clicked");
        assert_eq!(v["timestamp"], "2026-01-02T03:04:05Z");
        assert_eq!(v["data"]["id"], "evt_1");
        assert_eq!(v["data"]["metadata"]["seq"], BASELINE_CLICK);
        let visitor = &v["data"]["click"];
        assert!(visitor.get("ip").is_none(), "{visitor}");
        assert_eq!(visitor["params"]["utm_source"], "twitter");
        assert_eq!(visitor["browser"]["name"], "Safari");
        assert_eq!(visitor["is_eu_country"], false);
    }
}
