//! Click enrichment, done once at ingest: browser, OS, device, device vendor and bot from
//! the user agent; `is_eu_country` from the country code; optionally geography from a
//! MaxMind database. A value the click already brings (a shortener that knows better, or a
//! product payload mapped by an input adapter) is kept; only missing or null fields are
//! derived. It writes only into the click's `click` object and must not route, store or
//! render anything.

mod country;
mod geoip;
mod ua;

pub use country::{country_code, country_name};
use serde_json::{Map, Value};
use std::borrow::Cow;
use std::path::Path;
pub use ua::Device;
use ua::{ParsedUserAgent, UaParser};

#[derive(Debug, thiserror::Error)]
pub enum EnrichError {
    #[error("cannot open GeoIP database {path}: {reason}")]
    GeoIp { path: String, reason: String },
}

/// Adds the enrichment fields to a click. Cheap to share between threads.
#[derive(Debug, Default)]
pub struct Enricher {
    ua: UaParser,
    geoip: Option<geoip::GeoIp>,
}

impl Enricher {
    pub fn new() -> Self {
        Enricher {
            ua: UaParser::new(),
            geoip: None,
        }
    }

    /// An enricher that also fills `country`, `region`, `city`, `isp` and `organization`
    /// from `click.ip` with the MaxMind database at `path` (`[enrich] geoip`).
    pub fn with_geoip(path: &Path) -> Result<Enricher, EnrichError> {
        Ok(Enricher {
            ua: UaParser::new(),
            geoip: Some(geoip::GeoIp::open(path)?),
        })
    }

    /// Adds `browser`, `os`, `device`, `device_vendor`, `bot_name` and `is_eu_country` to
    /// `click` (the click's `click` object) and returns whether the click is a bot's.
    pub fn enrich<C: ClickObject + ?Sized>(&self, click: &mut C) -> bool {
        if let Some(geo) = &self.geoip {
            geo.fill(click);
        }
        let parsed = click.string("user_agent").map(|ua| self.ua.parse(&ua));
        let info: &ParsedUserAgent = parsed.as_deref().unwrap_or(&UNKNOWN);

        keep_or_insert_pair(click, "browser", &info.browser, &info.browser_version);
        keep_or_insert_pair(click, "os", &info.os, &info.os_version);

        let bot_name = match click.string("bot_name") {
            Some(s) => Some(s.into_owned()),
            None => info.bot.clone(),
        };
        let device = match click.string("device").as_deref().and_then(Device::from_name) {
            Some(given) => given,
            // A bot the shortener named is a bot whatever its user agent claims.
            None if bot_name.is_some() => Device::Bot,
            None => info.device,
        };
        let vendor = match click.string("device_vendor") {
            Some(s) => Some(s.into_owned()),
            None => info.vendor.clone(),
        };
        let is_eu = match click.boolean("is_eu_country") {
            Some(b) => Value::Bool(b),
            None => click
                .string("country")
                .map_or(Value::Null, |c| Value::Bool(is_eu_country(&c))),
        };
        let is_bot = is_bot(Some(device), bot_name.is_some());
        click.set("device", Value::from(device.as_str()));
        click.set("device_vendor", vendor.map_or(Value::Null, Value::String));
        click.set("bot_name", bot_name.map_or(Value::Null, Value::String));
        click.set("is_eu_country", is_eu);
        is_bot
    }
}

/// Whether an enriched click is a bot's: its device says so, or it names a bot. Routing
/// asks at ingest and again of stored clicks (a replay); both ask here.
pub fn is_bot(device: Option<Device>, bot_named: bool) -> bool {
    device == Some(Device::Bot) || bot_named
}

/// A click's `click` object as enrichment reads and writes it. Ingest implements it over
/// the click's text, so that members enrichment does not touch are never decoded; a
/// `serde_json` map implements it for everything else.
pub trait ClickObject {
    /// The member's value if it is a string.
    fn string(&self, name: &str) -> Option<Cow<'_, str>>;
    /// The member's value if it is a boolean.
    fn boolean(&self, name: &str) -> Option<bool>;
    /// Whether the member is there and not null.
    fn present(&self, name: &str) -> bool;
    /// The member's value, decoded, if it is an object.
    fn object(&self, name: &str) -> Option<Map<String, Value>>;
    /// Sets the member: in its place if it is there, else last.
    fn set(&mut self, name: &str, value: Value);
}

impl ClickObject for Map<String, Value> {
    fn string(&self, name: &str) -> Option<Cow<'_, str>> {
        self.get(name).and_then(Value::as_str).map(Cow::Borrowed)
    }

    fn boolean(&self, name: &str) -> Option<bool> {
        self.get(name).and_then(Value::as_bool)
    }

    fn present(&self, name: &str) -> bool {
        matches!(self.get(name), Some(v) if !v.is_null())
    }

    fn object(&self, name: &str) -> Option<Map<String, Value>> {
        self.get(name).and_then(Value::as_object).cloned()
    }

    fn set(&mut self, name: &str, value: Value) {
        self.insert(name.to_owned(), value);
    }
}

static UNKNOWN: ParsedUserAgent = ParsedUserAgent {
    browser: None,
    browser_version: None,
    os: None,
    os_version: None,
    device: Device::Unknown,
    vendor: None,
    bot: None,
};

/// Keeps a `{name, version}` object the click brought with a name, completing its keys;
/// otherwise writes the parsed one.
fn keep_or_insert_pair<C: ClickObject + ?Sized>(
    click: &mut C,
    key: &str,
    name: &Option<String>,
    version: &Option<String>,
) {
    if let Some(mut given) = click.object(key) {
        if matches!(given.get("name"), Some(Value::String(_))) {
            // Only a pair without its version is written again, so one the click brought
            // whole stays exactly as it came.
            if !given.contains_key("version") {
                given.insert("version".into(), Value::Null);
                click.set(key, Value::Object(given));
            }
            return;
        }
    }
    let mut pair = Map::with_capacity(2);
    pair.insert("name".into(), name.clone().map_or(Value::Null, Value::String));
    pair.insert("version".into(), version.clone().map_or(Value::Null, Value::String));
    click.set(key, Value::Object(pair));
}

/// Whether an ISO 3166-1 alpha-2 code names a member state of the European Union.
pub fn is_eu_country(code: &str) -> bool {
    const EU: [&str; 27] = [
        "AT", "BE", "BG", "HR", "CY", "CZ", "DK", "EE", "FI", "FR", "DE", "GR", "HU", "IE", "IT", "LV", "LT", "LU",
        "MT", "NL", "PL", "PT", "RO", "SK", "SI", "ES", "SE",
    ];
    EU.iter().any(|c| c.eq_ignore_ascii_case(code))
}

#[cfg(test)]
mod tests;
