//! Input adapters: maps the webhook payloads of Linkly, Rebrandly and Masiv Links
//! (`POST /v1/clicks?format=…`) into clickhook's click model, so a shortener that already
//! emits one of them gains durability with no code. A value the product payload carries is
//! put where the model keeps it (browser, OS and device included, which enrichment then
//! keeps), so that a click going in as format X comes out as format X with every field it
//! had; fields clickhook does not know are kept beside the mapped ones. Pure mapping; it
//! must not validate beyond what mapping needs (ingest validates the result) nor store
//! anything.

use crate::deliver::format::Format;
use crate::enrich::country_code;
use serde_json::{Map, Value};

#[derive(Debug, thiserror::Error)]
pub enum AdapterError {
    #[error("{field}: {why}")]
    Field { field: String, why: String },
}

fn field_error(field: impl Into<String>, why: impl Into<String>) -> AdapterError {
    AdapterError::Field {
        field: field.into(),
        why: why.into(),
    }
}

/// Maps one product payload into one or more clicks of the model of SPEC §3.1.
pub fn adapt(format: Format, payload: Value) -> Result<Vec<Value>, AdapterError> {
    match format {
        // Operational events are never ingested; the ingest query cannot name them.
        Format::Standard | Format::Operational => Ok(vec![payload]),
        Format::Linkly => linkly(payload).map(|c| vec![c]),
        Format::Rebrandly => rebrandly(payload),
        Format::Masiv => masiv(payload).map(|c| vec![c]),
    }
}

/// An object being taken apart: each key is removed as it is mapped, so what is left at
/// the end is what the product sent that clickhook does not know.
struct Fields {
    map: Map<String, Value>,
    at: String,
}

impl Fields {
    fn of(value: Value, at: String) -> Result<Fields, AdapterError> {
        match value {
            Value::Object(map) => Ok(Fields { map, at }),
            other => Err(field_error(
                if at.is_empty() { "payload" } else { &at },
                must_be("an object", &other),
            )),
        }
    }

    fn path(&self, key: &str) -> String {
        if self.at.is_empty() {
            key.to_string()
        } else {
            format!("{}.{key}", self.at)
        }
    }

    /// The value under `key`, removed; `None` when absent or null.
    fn take(&mut self, key: &str) -> Option<Value> {
        self.map.shift_remove(key).filter(|v| !v.is_null())
    }

    fn string(&mut self, key: &str) -> Result<Option<String>, AdapterError> {
        match self.take(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(other) => Err(field_error(self.path(key), must_be("a string", &other))),
        }
    }

    /// A string, or a number written as text: products disagree on how they type ids.
    fn text(&mut self, key: &str) -> Result<Option<String>, AdapterError> {
        match self.take(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(Value::Number(n)) => Ok(Some(n.to_string())),
            Some(other) => Err(field_error(self.path(key), must_be("a string", &other))),
        }
    }

    fn object(&mut self, key: &str) -> Result<Option<Fields>, AdapterError> {
        let at = self.path(key);
        self.take(key).map(|v| Fields::of(v, at)).transpose()
    }

    fn required<T>(&self, key: &str, value: Option<T>) -> Result<T, AdapterError> {
        value.ok_or_else(|| field_error(self.path(key), "required"))
    }

    /// Moves `key` as it is into `to` under `as_key`.
    fn move_to(&mut self, key: &str, to: &mut Map<String, Value>, as_key: &str) {
        if let Some(v) = self.take(key) {
            to.insert(as_key.to_string(), v);
        }
    }

    /// Keeps every key not yet mapped in `to`, without replacing a mapped one.
    fn keep_rest_in(self, to: &mut Map<String, Value>) {
        for (k, v) in self.map {
            to.entry(k).or_insert(v);
        }
    }
}

fn must_be(what: &str, got: &Value) -> String {
    format!("must be {what}, not {}", super::click::Kind::of(got))
}

/// `{"name": …, "version": …}` as the click model spells browser and OS.
fn name_version(name: Option<String>, version: Option<String>) -> Value {
    let mut pair = Map::with_capacity(2);
    pair.insert("name".into(), name.map_or(Value::Null, Value::String));
    pair.insert("version".into(), version.map_or(Value::Null, Value::String));
    Value::Object(pair)
}

fn click_model(timestamp: Option<String>, link: Map<String, Value>, click: Map<String, Value>) -> Map<String, Value> {
    let mut out = Map::with_capacity(4);
    if let Some(ts) = timestamp {
        out.insert("timestamp".into(), Value::String(ts));
    }
    out.insert("link".into(), Value::Object(link));
    out.insert("click".into(), Value::Object(click));
    out
}

// --- Linkly -------------------------------------------------------------------------------

fn linkly(payload: Value) -> Result<Value, AdapterError> {
    let mut top = Fields::of(payload, String::new())?;
    match top.string("event")? {
        None => {}
        Some(e) if e == "click" => {}
        Some(e) => return Err(field_error("event", format!("must be \"click\", not {e:?}"))),
    }
    let timestamp = top.string("timestamp")?;
    let mut l = top.object("link")?.ok_or_else(|| field_error("link", "required"))?;
    let mut c = match top.object("click")? {
        Some(c) => c,
        None => Fields::of(Value::Object(Map::new()), "click".into())?,
    };

    let mut link = Map::new();
    let id = l.take("id");
    link.insert("id".into(), l.required("id", id)?);
    l.move_to("workspace_id", &mut link, "workspace_id");
    let slug = l.string("slug")?.map(|s| s.trim_start_matches('/').to_string());
    if let Some(s) = &slug {
        link.insert("slug".into(), Value::from(s.as_str()));
    }
    let domain = l.string("domain")?;
    if let Some(d) = &domain {
        link.insert("domain".into(), Value::from(d.as_str()));
    }
    // Linkly's `url` is the link's own destination; its `destination` is this click's.
    l.move_to("url", &mut link, "destination");
    l.move_to("name", &mut link, "name");
    for key in [
        "enabled",
        "forward_params",
        "cloaking",
        "block_bots",
        "public_analytics",
    ] {
        l.move_to(key, &mut link, key);
    }
    let mut utm = Map::new();
    for key in ["source", "medium", "campaign", "term", "content"] {
        l.move_to(&format!("utm_{key}"), &mut utm, key);
    }
    if !utm.is_empty() {
        link.insert("utm".into(), Value::Object(utm));
    }
    let mut og = Map::new();
    for key in ["title", "description", "image"] {
        l.move_to(&format!("og_{key}"), &mut og, key);
    }
    if !og.is_empty() {
        link.insert("og".into(), Value::Object(og));
    }
    l.move_to("rules", &mut link, "rules");
    // The short URL is derived on the way out; only one that derivation would not give back
    // (another scheme, a port) is kept.
    if let Some(full) = l.string("full_url")? {
        let derived = match (&domain, &slug) {
            (Some(d), Some(s)) => Some(format!("https://{d}/{s}")),
            _ => None,
        };
        if derived.as_deref() != Some(full.as_str()) {
            link.insert("full_url".into(), Value::String(full));
        }
    }
    let link_destination = l.take("destination");
    l.keep_rest_in(&mut link);

    let mut click = Map::new();
    c.move_to("country", &mut click, "country");
    c.move_to("is_eu_country", &mut click, "is_eu_country");
    match c.string("platform")?.as_deref() {
        None => {}
        Some("ios") => {
            click.insert("os".into(), name_version(Some("iOS".into()), None));
        }
        Some("android") => {
            click.insert("os".into(), name_version(Some("Android".into()), None));
        }
        Some(d @ ("desktop" | "mobile" | "tablet" | "bot")) => {
            click.insert("device".into(), Value::from(d));
        }
        Some(other) => {
            click.insert("platform".into(), Value::from(other));
        }
    }
    if let Some(name) = c.string("browser_name")? {
        click.insert("browser".into(), name_version(Some(name), None));
    }
    c.move_to("referer", &mut click, "referer");
    c.move_to("isp", &mut click, "isp");
    c.move_to("bot_name", &mut click, "bot_name");
    if let Some(d) = c.take("destination").or(link_destination) {
        click.insert("destination".into(), d);
    }
    c.move_to("params", &mut click, "params");
    c.keep_rest_in(&mut click);

    let mut out = click_model(timestamp, link, click);
    top.keep_rest_in(&mut out);
    Ok(Value::Object(out))
}

// --- Rebrandly ----------------------------------------------------------------------------

/// Rebrandly's hyphenated names back to the spelling enrichment uses, for the common ones;
/// others stay as Rebrandly wrote them, which renders back the same.
const DISPLAY_NAMES: &[(&str, &str)] = &[
    ("chrome", "Chrome"),
    ("chrome-mobile", "Chrome Mobile"),
    ("chrome-mobile-ios", "Chrome Mobile iOS"),
    ("chrome-mobile-webview", "Chrome Mobile WebView"),
    ("chromium", "Chromium"),
    ("safari", "Safari"),
    ("mobile-safari", "Mobile Safari"),
    ("mobile-safari-ui-wkwebview", "Mobile Safari UI/WKWebView"),
    ("firefox", "Firefox"),
    ("firefox-mobile", "Firefox Mobile"),
    ("firefox-ios", "Firefox iOS"),
    ("edge", "Edge"),
    ("edge-mobile", "Edge Mobile"),
    ("opera", "Opera"),
    ("opera-mini", "Opera Mini"),
    ("opera-mobile", "Opera Mobile"),
    ("samsung-internet", "Samsung Internet"),
    ("ie", "IE"),
    ("facebook", "Facebook"),
    ("instagram", "Instagram"),
    ("yandex-browser", "Yandex Browser"),
    ("uc-browser", "UC Browser"),
    ("amazon-silk", "Amazon Silk"),
    ("android", "Android"),
    ("ios", "iOS"),
    ("windows", "Windows"),
    ("mac-os-x", "Mac OS X"),
    ("linux", "Linux"),
    ("ubuntu", "Ubuntu"),
    ("chrome-os", "Chrome OS"),
    ("windows-phone", "Windows Phone"),
    ("tizen", "Tizen"),
];

fn display_name(hyphenated: String) -> String {
    DISPLAY_NAMES
        .iter()
        .find(|(h, _)| *h == hyphenated)
        .map_or(hyphenated, |(_, name)| (*name).to_string())
}

fn rebrandly(payload: Value) -> Result<Vec<Value>, AdapterError> {
    let mut top = Fields::of(payload, String::new())?;
    let data = match top.take("data") {
        Some(Value::Array(items)) => items,
        Some(other) => return Err(field_error("data", must_be("an array", &other))),
        None => return Err(field_error("data", "required")),
    };
    let key = top.string("key")?;
    data.into_iter()
        .enumerate()
        .map(|(i, item)| rebrandly_click(item, i, key.as_deref()))
        .collect()
}

fn rebrandly_click(item: Value, index: usize, key: Option<&str>) -> Result<Value, AdapterError> {
    let mut it = Fields::of(item, format!("data[{index}]"))?;
    let timestamp = it.string("timestamp")?;
    let mut click = Map::new();
    if let Some(mut client) = it.object("client")? {
        if let Some(mut agent) = client.object("agent")? {
            if let Some(mut b) = agent.object("browser")? {
                let name = b.string("name")?.map(display_name);
                let version = b.string("version")?;
                click.insert("browser".into(), name_version(name, version));
            }
            if let Some(mut o) = agent.object("os")? {
                let raw_name = o.string("name")?;
                // "android-10" is the OS name and its version, hyphenated.
                let version = o.string("version")?.map(|v| {
                    let bare = raw_name
                        .as_deref()
                        .and_then(|n| v.strip_prefix(n)?.strip_prefix('-'))
                        .unwrap_or(&v);
                    bare.replace('-', ".")
                });
                click.insert("os".into(), name_version(raw_name.map(display_name), version));
            }
            if let Some(mut d) = agent.object("device")? {
                if let Some(name) = d.string("name")? {
                    let device = match name.as_str() {
                        "smartphone" | "phablet" | "feature-phone" | "feature phone" => "mobile",
                        "tablet" => "tablet",
                        "desktop" => "desktop",
                        "bot" => "bot",
                        _ => "unknown",
                    };
                    click.insert("device".into(), Value::from(device));
                }
                d.keep_rest_in(&mut click);
            }
            agent.keep_rest_in(&mut click);
        }
        if let Some(mut geo) = client.object("geo")? {
            for k in ["country", "region", "city"] {
                geo.move_to(k, &mut click, k);
            }
            geo.keep_rest_in(&mut click);
        }
        client.keep_rest_in(&mut click);
    }

    let mut route = it
        .object("route")?
        .ok_or_else(|| field_error(format!("data[{index}].route"), "required"))?;
    let mut link = Map::new();
    let id = route.text("id")?;
    link.insert("id".into(), Value::String(route.required("id", id)?));
    if let Some(slashtag) = route.string("slashtag")? {
        link.insert("slug".into(), Value::String(slashtag));
    }
    if let Some(mut domain) = route.object("domain")? {
        domain.move_to("raw", &mut link, "domain");
        if let Some(id) = domain.text("id")? {
            link.insert("domain_id".into(), Value::String(id));
        }
        // The zone is the domain reversed; it is derived again on the way out.
        domain.take("zone");
        domain.keep_rest_in(&mut link);
    }
    if let Some(mut dest) = route.object("destination")? {
        dest.move_to("raw", &mut link, "destination");
        // Protocol, hostname and path are parsed again from the raw URL on the way out.
        for derived in ["protocol", "hostname", "path"] {
            dest.take(derived);
        }
        dest.keep_rest_in(&mut link);
    }
    if let Some(created) = route.string("createdAt")? {
        link.insert(
            "created_at".into(),
            Value::String(utc_rfc3339(&created, &route.path("createdAt"))?),
        );
    }
    route.keep_rest_in(&mut link);
    it.keep_rest_in(&mut click);

    let mut out = click_model(timestamp, link, click);
    if let Some(key) = key {
        // Rebrandly's `key` names its own webhook configuration; clickhook writes its own on
        // the way out, so this one is kept as metadata.
        let mut metadata = Map::new();
        metadata.insert("rebrandly_key".into(), Value::from(key));
        out.insert("metadata".into(), Value::Object(metadata));
    }
    Ok(Value::Object(out))
}

/// An RFC 3339 time for a product time, which may lack a zone (then it is UTC) or be a
/// bare date (then midnight UTC).
fn utc_rfc3339(s: &str, field: &str) -> Result<String, AdapterError> {
    use chrono::{DateTime, NaiveDate, NaiveDateTime};
    let s = s.trim();
    if DateTime::parse_from_rfc3339(s).is_ok() {
        return Ok(s.to_string());
    }
    if NaiveDateTime::parse_from_str(s, "%Y-%m-%dT%H:%M:%S%.f").is_ok() {
        return Ok(format!("{s}Z"));
    }
    if let Ok(t) = NaiveDateTime::parse_from_str(s, "%Y-%m-%d %H:%M:%S%.f") {
        return Ok(t.and_utc().to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true));
    }
    if let Ok(d) = NaiveDate::parse_from_str(s, "%Y-%m-%d") {
        return Ok(format!("{}T00:00:00Z", d.format("%Y-%m-%d")));
    }
    Err(field_error(field, format!("{s:?} is not a date or date-time")))
}

// --- Masiv Links --------------------------------------------------------------------------

/// Masiv's page shows URLs as `<https://…>`; take them either way.
fn unbracket(s: &str) -> &str {
    let s = s.trim();
    s.strip_prefix('<').and_then(|s| s.strip_suffix('>')).unwrap_or(s)
}

fn masiv(payload: Value) -> Result<Value, AdapterError> {
    let mut top = Fields::of(payload, String::new())?;
    match top.string("EventType")?.as_deref() {
        Some("UserClick") => {}
        Some(other) => {
            return Err(field_error(
                "EventType",
                format!("must be \"UserClick\", not {other:?}"),
            ))
        }
        None => return Err(field_error("EventType", "required")),
    }
    let mut b = top
        .object("EventBody")?
        .ok_or_else(|| field_error("EventBody", "required"))?;

    let metadata = match b.take("Metadata") {
        None => None,
        Some(m @ Value::Object(_)) => Some(m),
        Some(other) => return Err(field_error(b.path("Metadata"), must_be("an object", &other))),
    };
    let mut link = Map::new();
    // Masiv identifies a link by its short code.
    let segment = b.text("Segment")?;
    let segment = b.required("Segment", segment)?;
    link.insert("id".into(), Value::from(segment.as_str()));
    link.insert("slug".into(), Value::String(segment));
    if let Some(domain) = b.string("UrlDomain")? {
        let bare = unbracket(&domain);
        let bare = bare.split_once("://").map_or(bare, |(_, rest)| rest);
        link.insert("domain".into(), Value::from(bare.trim_end_matches('/')));
    }
    if let Some(target) = b.string("TargetUrl")? {
        link.insert("destination".into(), Value::from(unbracket(&target)));
    }
    for (from, to) in [
        ("IdClient", "client_id"),
        ("IdCampaign", "campaign_id"),
        ("IdProduct", "product_id"),
        ("IdDelivery", "delivery_id"),
        ("Recipient", "recipient"),
    ] {
        if let Some(v) = b.text(from)? {
            link.insert(to.into(), Value::String(v));
        }
    }
    for (from, to) in [("CreationDate", "created_at"), ("ActiveDate", "active_at")] {
        if let Some(v) = b.string(from)? {
            link.insert(to.into(), Value::String(utc_rfc3339(&v, &b.path(from))?));
        }
    }
    let timestamp = match b.string("ClickAccessDate")? {
        Some(v) => Some(utc_rfc3339(&v, &b.path("ClickAccessDate"))?),
        None => None,
    };

    let mut click = Map::new();
    b.move_to("IpRemote", &mut click, "ip");
    b.move_to("UserAgent", &mut click, "user_agent");
    if let Some(name) = b.string("BrowserName")? {
        click.insert("browser".into(), name_version(Some(name), None));
    }
    if let Some(name) = b.string("OsName")? {
        click.insert("os".into(), name_version(Some(name), None));
    }
    if let Some(kind) = b.string("DeviceType")? {
        let device = match kind.to_ascii_lowercase().as_str() {
            "desktop" => "desktop",
            "cellular" | "mobile" | "smartphone" => "mobile",
            "tablet" => "tablet",
            "bot" => "bot",
            _ => "unknown",
        };
        click.insert("device".into(), Value::from(device));
    }
    b.move_to("DeviceVendor", &mut click, "device_vendor");
    if let Some(name) = b.string("CountryName")? {
        match country_code(&name) {
            Some(code) => click.insert("country".into(), Value::from(code)),
            // A name no table knows still reaches the receiver.
            None => click.insert("country_name".into(), Value::String(name)),
        };
    }
    b.move_to("IspName", &mut click, "isp");
    b.move_to("OrganizationName", &mut click, "organization");
    b.move_to("ConnectionType", &mut click, "connection_type");
    b.keep_rest_in(&mut click);

    let mut out = click_model(timestamp, link, click);
    if let Some(m) = metadata {
        out.insert("metadata".into(), m);
    }
    top.keep_rest_in(&mut out);
    Ok(Value::Object(out))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::deliver::format::{render, RenderContext};
    use crate::enrich::Enricher;
    use serde_json::json;

    const LINKLY: &str = include_str!("../../tests/golden/linkly_example.json");
    const REBRANDLY: &str = include_str!("../../tests/golden/rebrandly_example.json");
    const MASIV: &str = include_str!("../../tests/golden/masiv_example.json");

    /// What ingest stores for an adapted click: id and timestamp first, click enriched.
    fn stored(click: Value, n: usize) -> Vec<u8> {
        let Value::Object(mut obj) = click else {
            panic!("not an object")
        };
        let ts = obj
            .shift_remove("timestamp")
            .unwrap_or_else(|| json!("2025-01-15T10:30:00Z"));
        let c = obj.entry("click").or_insert_with(|| json!({}));
        Enricher::new().enrich(c.as_object_mut().unwrap());
        obj.entry("metadata").or_insert(Value::Null);
        let mut event = Map::new();
        event.insert("id".into(), json!(format!("evt_{n}")));
        event.insert("timestamp".into(), ts);
        event.extend(obj);
        serde_json::to_vec(&event).unwrap()
    }

    fn round_trip(format: Format, payload: &Value, batch: bool) -> Value {
        let clicks = adapt(format, payload.clone()).unwrap();
        let events: Vec<Vec<u8>> = clicks.into_iter().enumerate().map(|(i, c)| stored(c, i)).collect();
        let refs: Vec<&[u8]> = events.iter().map(Vec::as_slice).collect();
        let ctx = RenderContext {
            endpoint_id: "crm",
            webhook_id: "w_1",
            include_ip: true,
            batch,
        };
        serde_json::from_slice(&render(format, &refs, &ctx).unwrap()).unwrap()
    }

    fn pretty(v: &Value) -> String {
        serde_json::to_string_pretty(v).unwrap()
    }

    #[test]
    fn linkly_round_trip_keeps_every_field() {
        let input: Value = serde_json::from_str(LINKLY).unwrap();
        assert_eq!(pretty(&round_trip(Format::Linkly, &input, false)), pretty(&input));
    }

    #[test]
    fn linkly_round_trip_of_other_values() {
        let input = json!({
            "event": "click", "timestamp": "2025-01-15T10:30:00.5Z",
            "link": {"id": "l1", "name": null, "url": "https://a.example/", "full_url": "http://go.example:8080/x",
                     "domain": "go.example", "slug": "/x", "destination": "https://a.example/de",
                     "workspace_id": "w1", "enabled": true, "cloaking": true, "forward_params": false,
                     "block_bots": false, "public_analytics": true, "utm_source": null, "utm_medium": null,
                     "utm_campaign": null, "og_title": null, "og_description": null, "rules": []},
            "click": {"country": "DE", "is_eu_country": true, "platform": "ios", "browser_name": "Safari",
                      "referer": null, "isp": null, "bot_name": null, "destination": "https://a.example/de",
                      "params": {}}
        });
        assert_eq!(pretty(&round_trip(Format::Linkly, &input, false)), pretty(&input));
    }

    #[test]
    fn rebrandly_round_trip_keeps_every_field_of_every_click() {
        let mut input: Value = serde_json::from_str(REBRANDLY).unwrap();
        let mut second = input["data"][0].clone();
        second["timestamp"] = json!("2025-10-25T02:36:48.000Z");
        second["client"]["agent"] = json!({
            "browser": {"name": "mobile-safari", "version": "17.1.2"},
            "os": {"name": "ios", "version": "ios-17-1-2"},
            "device": {"name": "tablet"}
        });
        input["data"].as_array_mut().unwrap().push(second);
        let out = round_trip(Format::Rebrandly, &input, true);
        assert_eq!(pretty(&out["data"]), pretty(&input["data"]));
        assert_eq!(out["key"], "clickhook-crm-w_1");
    }

    #[test]
    fn masiv_round_trip_keeps_every_field() {
        let input: Value = serde_json::from_str(MASIV).unwrap();
        assert_eq!(pretty(&round_trip(Format::Masiv, &input, false)), pretty(&input));
    }

    #[test]
    fn masiv_takes_the_bracketed_urls_of_its_page() {
        let mut input: Value = serde_json::from_str(MASIV).unwrap();
        input["EventBody"]["UrlDomain"] = json!("<https://links.ma.sv>");
        input["EventBody"]["TargetUrl"] = json!("<https://www.google.com/>");
        let clicks = adapt(Format::Masiv, input).unwrap();
        assert_eq!(clicks[0]["link"]["domain"], "links.ma.sv");
        assert_eq!(clicks[0]["link"]["destination"], "https://www.google.com/");
    }

    #[test]
    fn mapped_clicks_have_the_model_shape() {
        let linkly = &adapt(Format::Linkly, serde_json::from_str(LINKLY).unwrap()).unwrap()[0];
        assert_eq!(linkly["link"]["destination"], "https://example.com/landing-page");
        assert_eq!(linkly["link"]["slug"], "abc123");
        assert_eq!(linkly["link"]["utm"]["campaign"], "spring-sale");
        assert_eq!(linkly["click"]["device"], "desktop");
        let rebrandly = &adapt(Format::Rebrandly, serde_json::from_str(REBRANDLY).unwrap()).unwrap()[0];
        assert_eq!(rebrandly["link"]["created_at"], "2023-08-31T04:13:48.385Z");
        assert_eq!(
            rebrandly["click"]["browser"],
            json!({"name": "Chrome Mobile", "version": "121.0.0.0"})
        );
        assert_eq!(rebrandly["click"]["os"], json!({"name": "Android", "version": "10"}));
        assert_eq!(
            rebrandly["metadata"]["rebrandly_key"],
            "userId_32f5164718384fcda6503f550295885e-configId_db2a7cdeb91f4a2b9"
        );
        let masiv = &adapt(Format::Masiv, serde_json::from_str(MASIV).unwrap()).unwrap()[0];
        assert_eq!(masiv["timestamp"], "2023-08-24T14:12:01Z");
        assert_eq!(masiv["link"]["created_at"], "2023-08-24T00:00:00Z");
        assert_eq!(masiv["click"]["country"], "CO");
        assert_eq!(masiv["click"]["device"], "mobile");
    }

    #[test]
    fn unknown_fields_are_kept() {
        let clicks = adapt(
            Format::Linkly,
            json!({"event": "click", "link": {"id": 1, "folder": "x"}, "click": {"os_hint": 1}, "extra": true}),
        )
        .unwrap();
        assert_eq!(clicks[0]["link"]["folder"], "x");
        assert_eq!(clicks[0]["click"]["os_hint"], 1);
        assert_eq!(clicks[0]["extra"], true);
        let clicks = adapt(
            Format::Masiv,
            json!({"EventType": "UserClick", "EventBody": {"Segment": "s", "New": 1}}),
        )
        .unwrap();
        assert_eq!(clicks[0]["click"]["New"], 1);
    }

    #[test]
    fn errors_name_the_field() {
        let cases = [
            (Format::Linkly, json!({"event": "click"}), "link: required"),
            (Format::Linkly, json!({"link": {"name": "x"}}), "link.id: required"),
            (
                Format::Linkly,
                json!({"event": "open", "link": {"id": 1}}),
                "event: must be \"click\"",
            ),
            (
                Format::Linkly,
                json!({"link": {"id": 1, "slug": 5}}),
                "link.slug: must be a string",
            ),
            (Format::Linkly, json!([1]), "payload: must be an object"),
            (Format::Rebrandly, json!({"key": "k"}), "data: required"),
            (Format::Rebrandly, json!({"data": {}}), "data: must be an array"),
            (
                Format::Rebrandly,
                json!({"data": [{"route": {"id": "a"}}, {"client": {}}]}),
                "data[1].route: required",
            ),
            (
                Format::Rebrandly,
                json!({"data": [{"route": {"slashtag": "a"}}]}),
                "data[0].route.id: required",
            ),
            (
                Format::Rebrandly,
                json!({"data": [{"route": {"id": "a", "createdAt": "soon"}}]}),
                "data[0].route.createdAt: \"soon\" is not a date",
            ),
            (
                Format::Rebrandly,
                json!({"data": [{"route": {"id": "a"}, "client": {"agent": 1}}]}),
                "data[0].client.agent: must be an object",
            ),
            (Format::Masiv, json!({"EventBody": {}}), "EventType: required"),
            (Format::Masiv, json!({"EventType": "UserClick"}), "EventBody: required"),
            (
                Format::Masiv,
                json!({"EventType": "UserClick", "EventBody": {}}),
                "EventBody.Segment: required",
            ),
            (
                Format::Masiv,
                json!({"EventType": "UserClick", "EventBody": {"Segment": "s", "ClickAccessDate": "ayer"}}),
                "EventBody.ClickAccessDate: \"ayer\" is not a date",
            ),
        ];
        for (format, payload, want) in cases {
            let err = adapt(format, payload.clone()).unwrap_err().to_string();
            assert!(err.starts_with(want), "{payload}: {err}");
        }
    }

    #[test]
    fn standard_passes_through() {
        let click = json!({"link": {"id": 1}});
        assert_eq!(adapt(Format::Standard, click.clone()).unwrap(), vec![click]);
    }
}
