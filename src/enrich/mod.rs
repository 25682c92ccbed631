//! Click enrichment, done once at ingest: browser, OS, device, device vendor and bot from
//! the user agent; `is_eu_country` from the country code; optionally geography from a
//! MaxMind database. It writes only into the click's `click` object and must not route,
//! store or render anything.

use serde_json::{Map, Value};

#[derive(Debug, thiserror::Error)]
pub enum EnrichError {
    #[error("cannot open GeoIP database {path}: {reason}")]
    GeoIp { path: String, reason: String },
}

/// Adds the enrichment fields to a click. Cheap to share between threads.
#[derive(Debug, Default)]
pub struct Enricher {}

impl Enricher {
    pub fn new() -> Self {
        Enricher {}
    }

    /// Adds `browser`, `os`, `device`, `device_vendor`, `bot_name` and `is_eu_country` to
    /// `click` (the click's `click` object) and returns whether the click is a bot's.
    pub fn enrich(&self, click: &mut Map<String, Value>) -> bool {
        let eu = click
            .get("country")
            .and_then(Value::as_str)
            .map(|c| Value::Bool(is_eu_country(c)))
            .unwrap_or(Value::Null);
        click.insert("browser".into(), serde_json::json!({"name": null, "version": null}));
        click.insert("os".into(), serde_json::json!({"name": null, "version": null}));
        click.insert("device".into(), Value::from("unknown"));
        click.insert("device_vendor".into(), Value::Null);
        click.insert("bot_name".into(), Value::Null);
        click.insert("is_eu_country".into(), eu);
        false
    }
}

/// Whether an ISO 3166-1 alpha-2 code names a member state of the European Union.
pub fn is_eu_country(code: &str) -> bool {
    const EU: [&str; 27] = [
        "AT", "BE", "BG", "HR", "CY", "CZ", "DK", "EE", "FI", "FR", "DE", "GR", "HU", "IE", "IT", "LV", "LT", "LU",
        "MT", "NL", "PL", "PT", "RO", "SK", "SI", "ES", "SE",
    ];
    EU.iter().any(|c| c.eq_ignore_ascii_case(code))
}
