//! The `masiv` format (SPEC §4.2, §9): Masiv Links' own webhook payload —
//! `{"EventType":"UserClick","EventBody":{…}}` with exactly the PascalCase keys of its
//! documented example, dates in UTC written as it writes them (`2023-08-24`,
//! `2023-08-24 14:12:01`), the country spelled out in English. Pure mapping from the stored
//! click JSON; it must not sign or send, and writes the IP only when `include_ip` is set.

use super::fields::{at, click_destination, opt, slug, str_at, text_at, time_at, value_at};
use super::RenderContext;
use crate::enrich::country_name;
use serde_json::{json, Map, Value};

/// Renders one event; Masiv has no batch shape, so only the first event is read.
pub fn render(events: &[Value], ctx: &RenderContext<'_>) -> Value {
    let event = events.first().unwrap_or(&Value::Null);
    let link = |key: &str| text_at(event, &["link", key]);
    let click = |key: &str| value_at(event, &["click", key]);
    json!({
        "EventType": "UserClick",
        "EventBody": {
            // Masiv sends an empty object for a click without metadata.
            "Metadata": at(event, &["metadata"]).cloned().unwrap_or_else(|| Value::Object(Map::new())),
            "Segment": opt(slug(event)),
            "IdClient": link("client_id"),
            "IdCampaign": link("campaign_id"),
            "IdProduct": link("product_id"),
            "IdDelivery": link("delivery_id"),
            "Recipient": link("recipient"),
            "CreationDate": time_at(event, &["link", "created_at"], "%Y-%m-%d"),
            "ActiveDate": time_at(event, &["link", "active_at"], "%Y-%m-%d"),
            "UrlDomain": opt(str_at(event, &["link", "domain"]).map(|d| format!("https://{d}")).as_deref()),
            "TargetUrl": click_destination(event),
            "ClickAccessDate": time_at(event, &["timestamp"], "%Y-%m-%d %H:%M:%S"),
            "UserAgent": click("user_agent"),
            "BrowserName": value_at(event, &["click", "browser", "name"]),
            "DeviceVendor": click("device_vendor"),
            "DeviceType": opt(device_type(str_at(event, &["click", "device"]))),
            "OsName": value_at(event, &["click", "os", "name"]),
            "IpRemote": if ctx.include_ip { click("ip") } else { Value::Null },
            "ConnectionType": opt(str_at(event, &["click", "connection_type"]).map(capitalized).as_deref()),
            "CountryName": country(event),
            "IspName": click("isp"),
            "OrganizationName": click("organization"),
        },
    })
}

/// Masiv's device types for clickhook's device kinds.
fn device_type(device: Option<&str>) -> Option<&'static str> {
    Some(match device? {
        "desktop" => "Desktop",
        "mobile" => "Cellular",
        "tablet" => "Tablet",
        "bot" => "Bot",
        _ => "Unknown",
    })
}

/// "cellular" → "Cellular", as Masiv writes connection types.
fn capitalized(s: &str) -> String {
    let mut chars = s.chars();
    match chars.next() {
        Some(first) => first.to_uppercase().chain(chars).collect(),
        None => String::new(),
    }
}

/// The English name of `click.country`; a `click.country_name` the click brought (an input
/// adapter keeps a name it could not map to a code) stands in for an unknown code.
fn country(event: &Value) -> Value {
    str_at(event, &["click", "country"])
        .and_then(country_name)
        .map(Value::from)
        .or_else(|| at(event, &["click", "country_name"]).cloned())
        .unwrap_or(Value::Null)
}

#[cfg(test)]
mod tests {
    use super::super::fields::testing::{assert_golden, assert_same_shape, stored_event};
    use super::*;

    const EXAMPLE: &str = include_str!("../../../tests/golden/masiv_example.json");

    fn ctx(include_ip: bool) -> RenderContext<'static> {
        RenderContext {
            endpoint_id: "crm",
            webhook_id: "evt_1",
            include_ip,
            batch: false,
        }
    }

    #[test]
    fn rich_click_matches_golden() {
        let out = render(
            &[stored_event(include_str!("../../../tests/golden/click_rich.json"))],
            &ctx(true),
        );
        assert_same_shape(&serde_json::from_str(EXAMPLE).unwrap(), &out, &["$.EventBody.Metadata"]);
        assert_golden(
            "masiv_rich.json",
            include_str!("../../../tests/golden/masiv_rich.json"),
            &out,
        );
    }

    #[test]
    fn sparse_click_matches_golden() {
        let out = render(
            &[stored_event(include_str!("../../../tests/golden/click_sparse.json"))],
            &ctx(true),
        );
        assert_same_shape(&serde_json::from_str(EXAMPLE).unwrap(), &out, &["$.EventBody.Metadata"]);
        assert_golden(
            "masiv_sparse.json",
            include_str!("../../../tests/golden/masiv_sparse.json"),
            &out,
        );
    }

    #[test]
    fn the_ip_goes_out_only_when_allowed() {
        let event = stored_event(include_str!("../../../tests/golden/click_rich.json"));
        assert_eq!(
            render(std::slice::from_ref(&event), &ctx(true))["EventBody"]["IpRemote"],
            "203.0.113.9"
        );
        assert_eq!(render(&[event], &ctx(false))["EventBody"]["IpRemote"], Value::Null);
    }

    #[test]
    fn dates_are_utc_in_masiv_forms() {
        let event = stored_event(
            r#"{"timestamp": "2023-08-24T09:12:01.5-05:00",
                "link": {"id": 1, "created_at": "2023-08-24T23:30:00-05:00", "active_at": "2023-08-24T10:00:00Z"}}"#,
        );
        let body = &render(&[event], &ctx(false))["EventBody"];
        assert_eq!(body["ClickAccessDate"], "2023-08-24 14:12:01");
        assert_eq!(body["CreationDate"], "2023-08-25");
        assert_eq!(body["ActiveDate"], "2023-08-24");
    }

    #[test]
    fn device_types_and_country_names() {
        assert_eq!(device_type(Some("mobile")), Some("Cellular"));
        assert_eq!(device_type(Some("unknown")), Some("Unknown"));
        assert_eq!(device_type(None), None);
        let event = stored_event(r#"{"link": {"id": 1}, "click": {"country": "CO", "connection_type": "cellular"}}"#);
        let body = &render(&[event], &ctx(false))["EventBody"];
        assert_eq!(body["CountryName"], "Colombia");
        assert_eq!(body["ConnectionType"], "Cellular");
    }
}
