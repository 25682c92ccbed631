//! The `rebrandly` format (SPEC §4.2, §9): Rebrandly's own webhook payload — always
//! `{"data":[…],"key":"clickhook-<endpoint id>-<webhook-id>"}`, one entry per event with
//! exactly the keys of its documented example, names in its lower-case hyphenated style
//! (`chrome-mobile`, `android-10`, `smartphone`). Pure mapping from the stored click JSON;
//! it must not sign or send (the `apikey` header is the sender's business).

use super::fields::{at, hyphenated, opt, slug, str_at, text_at, time_at, value_at};
use super::RenderContext;
use serde_json::{json, Value};

/// Renders every event into the one `data` array, batch or not.
pub fn render(events: &[Value], ctx: &RenderContext<'_>) -> Value {
    json!({
        "data": events.iter().map(entry).collect::<Vec<_>>(),
        "key": format!("clickhook-{}-{}", ctx.endpoint_id, ctx.webhook_id),
    })
}

fn entry(event: &Value) -> Value {
    let click = |key: &str| value_at(event, &["click", key]);
    let browser = str_at(event, &["click", "browser", "name"]);
    let os = str_at(event, &["click", "os", "name"]);
    let os_version = str_at(event, &["click", "os", "version"]).map(|v| match os {
        Some(os) => format!("{}-{}", hyphenated(os), hyphenated(v)),
        None => hyphenated(v),
    });
    let domain = str_at(event, &["link", "domain"]);
    json!({
        "timestamp": time_at(event, &["timestamp"], "%Y-%m-%dT%H:%M:%S%.3fZ"),
        "client": {
            "agent": {
                "browser": {
                    "name": opt(browser.map(hyphenated).as_deref()),
                    "version": value_at(event, &["click", "browser", "version"]),
                },
                "os": {
                    "name": opt(os.map(hyphenated).as_deref()),
                    "version": opt(os_version.as_deref()),
                },
                "device": {
                    "name": opt(device_name(str_at(event, &["click", "device"]))),
                },
            },
            "geo": {
                "country": click("country"),
                "region": click("region"),
                "city": click("city"),
            },
        },
        "route": {
            "id": text_at(event, &["link", "id"]),
            "slashtag": opt(slug(event)),
            "createdAt": time_at(event, &["link", "created_at"], "%Y-%m-%dT%H:%M:%S%.3f"),
            "domain": {
                "id": text_at(event, &["link", "domain_id"]),
                "raw": opt(domain),
                "zone": opt(domain.map(zone).as_deref()),
            },
            "destination": destination(at(event, &["link", "destination"])),
        },
    })
}

/// Rebrandly's device names for clickhook's device kinds.
fn device_name(device: Option<&str>) -> Option<&'static str> {
    match device? {
        "mobile" => Some("smartphone"),
        "tablet" => Some("tablet"),
        "desktop" => Some("desktop"),
        "bot" => Some("bot"),
        _ => None,
    }
}

/// The domain's labels in reverse order: "brand.link" → "link.brand".
fn zone(domain: &str) -> String {
    domain.trim_end_matches('.').rsplit('.').collect::<Vec<_>>().join(".")
}

/// The link's destination and its parts; parts are null when it is not an absolute URL.
fn destination(raw: Option<&Value>) -> Value {
    let parsed = raw.and_then(Value::as_str).and_then(|s| url::Url::parse(s).ok());
    json!({
        "raw": raw.cloned().unwrap_or(Value::Null),
        "protocol": opt(parsed.as_ref().map(url::Url::scheme)),
        "hostname": opt(parsed.as_ref().and_then(url::Url::host_str)),
        "path": opt(parsed.as_ref().map(url::Url::path)),
    })
}

#[cfg(test)]
mod tests {
    use super::super::fields::testing::{assert_golden, assert_same_shape, stored_event};
    use super::*;

    const EXAMPLE: &str = include_str!("../../../tests/golden/rebrandly_example.json");

    fn ctx(batch: bool) -> RenderContext<'static> {
        RenderContext {
            endpoint_id: "crm",
            webhook_id: "evt_1",
            include_ip: true,
            batch,
        }
    }

    #[test]
    fn rich_click_matches_golden() {
        let out = render(
            &[stored_event(include_str!("../../../tests/golden/click_rich.json"))],
            &ctx(false),
        );
        assert_same_shape(&serde_json::from_str(EXAMPLE).unwrap(), &out, &[]);
        assert_golden(
            "rebrandly_rich.json",
            include_str!("../../../tests/golden/rebrandly_rich.json"),
            &out,
        );
    }

    #[test]
    fn sparse_click_matches_golden() {
        let out = render(
            &[stored_event(include_str!("../../../tests/golden/click_sparse.json"))],
            &ctx(false),
        );
        assert_same_shape(&serde_json::from_str(EXAMPLE).unwrap(), &out, &[]);
        assert_golden(
            "rebrandly_sparse.json",
            include_str!("../../../tests/golden/rebrandly_sparse.json"),
            &out,
        );
    }

    #[test]
    fn a_batch_fills_the_array_and_the_key_names_endpoint_and_request() {
        let a = stored_event(r#"{"link": {"id": "a"}}"#);
        let b = stored_event(r#"{"link": {"id": 2}}"#);
        let out = render(
            &[a, b],
            &RenderContext {
                webhook_id: "batch_9",
                ..ctx(true)
            },
        );
        assert_eq!(out["data"].as_array().map(Vec::len), Some(2));
        assert_eq!(out["data"][1]["route"]["id"], "2");
        assert_eq!(out["key"], "clickhook-crm-batch_9");
    }

    #[test]
    fn names_are_lower_case_hyphenated() {
        let out = render(
            &[stored_event(include_str!("../../../tests/golden/click_rich.json"))],
            &ctx(false),
        );
        let agent = &out["data"][0]["client"]["agent"];
        assert_eq!(agent["browser"]["name"], "chrome-mobile");
        assert_eq!(agent["os"], json!({"name": "android", "version": "android-10"}));
        assert_eq!(agent["device"]["name"], "smartphone");
    }

    #[test]
    fn zone_reverses_labels_and_destination_is_parsed() {
        assert_eq!(zone("brand.link"), "link.brand");
        assert_eq!(zone("go.brand.co.uk"), "uk.co.brand.go");
        let d = destination(Some(&json!("https://example.com/landing-page?x=1")));
        assert_eq!(
            d,
            json!({"raw": "https://example.com/landing-page?x=1", "protocol": "https", "hostname": "example.com", "path": "/landing-page"})
        );
        let d = destination(Some(&json!("not a url")));
        assert_eq!(
            d,
            json!({"raw": "not a url", "protocol": null, "hostname": null, "path": null})
        );
    }
}
