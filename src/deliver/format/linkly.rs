//! The `linkly` format (SPEC §4.2, §9): Linkly's own webhook payload, field for field —
//! `{"event":"click","timestamp","link":{…},"click":{…}}` with exactly the keys of its
//! documented example, `null` where the click lacks a value. Pure mapping from the stored
//! click JSON; it must not sign or send, and it never writes the visitor's IP, whatever
//! `include_ip` says, because Linkly promises that.

use super::fields::{at, browser_family, click_destination, opt, parse_time, slug, str_at, value_at};
use super::RenderContext;
use chrono::SecondsFormat;
use serde_json::{json, Value};

/// Renders one event; Linkly has no batch shape, so only the first event is read.
pub fn render(events: &[Value], _ctx: &RenderContext<'_>) -> Value {
    let event = events.first().unwrap_or(&Value::Null);
    let link = |key: &str| value_at(event, &["link", key]);
    let click = |key: &str| value_at(event, &["click", key]);
    let destination = click_destination(event);
    json!({
        "event": "click",
        "timestamp": timestamp(event),
        "link": {
            "id": link("id"),
            "name": link("name"),
            "url": link("destination"),
            "full_url": full_url(event),
            "domain": link("domain"),
            "slug": opt(slug(event).map(|s| format!("/{s}")).as_deref()),
            "destination": destination,
            "workspace_id": link("workspace_id"),
            "enabled": link("enabled"),
            "cloaking": link("cloaking"),
            "forward_params": link("forward_params"),
            "block_bots": link("block_bots"),
            "public_analytics": link("public_analytics"),
            "utm_source": value_at(event, &["link", "utm", "source"]),
            "utm_medium": value_at(event, &["link", "utm", "medium"]),
            "utm_campaign": value_at(event, &["link", "utm", "campaign"]),
            "og_title": value_at(event, &["link", "og", "title"]),
            "og_description": value_at(event, &["link", "og", "description"]),
            "rules": link("rules"),
        },
        "click": {
            "country": click("country"),
            "is_eu_country": click("is_eu_country"),
            "platform": platform(event),
            "browser_name": opt(str_at(event, &["click", "browser", "name"]).map(browser_family)),
            "referer": click("referer"),
            "isp": click("isp"),
            "bot_name": click("bot_name"),
            "destination": destination,
            "params": click("params"),
        },
    })
}

/// Linkly writes UTC with a `Z`; a time already written so goes out exactly as it came.
fn timestamp(event: &Value) -> Value {
    match str_at(event, &["timestamp"]) {
        Some(s) if s.ends_with('Z') => Value::from(s),
        Some(s) => match parse_time(s) {
            Some(t) => Value::String(t.to_rfc3339_opts(SecondsFormat::AutoSi, true)),
            None => Value::from(s),
        },
        None => Value::Null,
    }
}

/// The short URL: what the shortener sent as `link.full_url` (an input adapter keeps
/// Linkly's own when it is not the https one), else `https://{domain}/{slug}`.
fn full_url(event: &Value) -> Value {
    if let Some(url) = at(event, &["link", "full_url"]) {
        return url.clone();
    }
    match (str_at(event, &["link", "domain"]), slug(event)) {
        (Some(domain), Some(slug)) => Value::String(format!("https://{domain}/{slug}")),
        _ => Value::Null,
    }
}

/// desktop, ios, android, … : the OS where it names the platform, else the device kind. A
/// `click.platform` the click brought (from Linkly's own payload) wins.
fn platform(event: &Value) -> Value {
    if let Some(p) = at(event, &["click", "platform"]) {
        return p.clone();
    }
    let platform = match str_at(event, &["click", "os", "name"]) {
        Some("iOS" | "iPadOS") => Some("ios"),
        Some("Android") => Some("android"),
        _ => match str_at(event, &["click", "device"]) {
            Some(d @ ("desktop" | "mobile" | "tablet" | "bot")) => Some(d),
            _ => None,
        },
    };
    opt(platform)
}

#[cfg(test)]
mod tests {
    use super::super::fields::testing::{assert_golden, assert_same_shape, stored_event};
    use super::*;

    const EXAMPLE: &str = include_str!("../../../tests/golden/linkly_example.json");

    fn ctx() -> RenderContext<'static> {
        RenderContext {
            endpoint_id: "crm",
            webhook_id: "evt_1",
            include_ip: true,
            batch: false,
        }
    }

    fn rendered(input: &str) -> Value {
        render(&[stored_event(input)], &ctx())
    }

    #[test]
    fn rich_click_matches_golden() {
        let out = rendered(include_str!("../../../tests/golden/click_rich.json"));
        assert_same_shape(&serde_json::from_str(EXAMPLE).unwrap(), &out, &["$.click.params"]);
        assert_golden(
            "linkly_rich.json",
            include_str!("../../../tests/golden/linkly_rich.json"),
            &out,
        );
    }

    #[test]
    fn sparse_click_matches_golden() {
        let out = rendered(include_str!("../../../tests/golden/click_sparse.json"));
        assert_same_shape(&serde_json::from_str(EXAMPLE).unwrap(), &out, &["$.click.params"]);
        assert_golden(
            "linkly_sparse.json",
            include_str!("../../../tests/golden/linkly_sparse.json"),
            &out,
        );
    }

    #[test]
    fn never_sends_the_ip() {
        let out = rendered(include_str!("../../../tests/golden/click_rich.json"));
        let text = out.to_string();
        assert!(!text.contains("203.0.113.9"), "{text}");
    }

    #[test]
    fn browser_name_is_the_family_and_platform_the_os() {
        let out = rendered(include_str!("../../../tests/golden/click_rich.json"));
        assert_eq!(out["click"]["browser_name"], "Chrome");
        assert_eq!(out["click"]["platform"], "android");
    }

    #[test]
    fn slug_gets_one_leading_slash_and_destination_falls_back_to_the_link() {
        let out = rendered(
            r#"{"link": {"id": 7, "domain": "go.example", "slug": "/x1", "destination": "https://a.example/"}}"#,
        );
        assert_eq!(out["link"]["slug"], "/x1");
        assert_eq!(out["link"]["full_url"], "https://go.example/x1");
        assert_eq!(out["link"]["destination"], "https://a.example/");
        assert_eq!(out["click"]["destination"], "https://a.example/");
        assert_eq!(out["click"]["platform"], Value::Null);
    }

    #[test]
    fn timestamps_are_utc() {
        let out = rendered(r#"{"timestamp": "2025-01-15T12:30:00.250+02:00", "link": {"id": 1}}"#);
        assert_eq!(out["timestamp"], "2025-01-15T10:30:00.250Z");
    }
}
