//! Helpers shared by the product formats (`linkly`, `rebrandly`, `masiv`): reading the
//! stored event JSON by path, parsing its times, and the spellings the products share
//! (lower-case hyphenated names, browser families). It must not know any product's key
//! names: each format module owns its own payload shape.

use chrono::{DateTime, NaiveDate, NaiveDateTime, Utc};
use serde_json::Value;

/// The value at `path`, or `None` when absent or null.
pub(super) fn at<'a>(v: &'a Value, path: &[&str]) -> Option<&'a Value> {
    let mut cur = v;
    for key in path {
        cur = cur.get(key)?;
    }
    (!cur.is_null()).then_some(cur)
}

pub(super) fn str_at<'a>(v: &'a Value, path: &[&str]) -> Option<&'a str> {
    at(v, path).and_then(Value::as_str)
}

/// A copy of the value at `path`, `null` when absent.
pub(super) fn value_at(v: &Value, path: &[&str]) -> Value {
    at(v, path).cloned().unwrap_or(Value::Null)
}

/// The value at `path` as a JSON string: products that type an id as a string get numbers
/// as their decimal text.
pub(super) fn text_at(v: &Value, path: &[&str]) -> Value {
    match at(v, path) {
        Some(Value::String(s)) => Value::String(s.clone()),
        Some(Value::Number(n)) => Value::String(n.to_string()),
        Some(Value::Bool(b)) => Value::String(b.to_string()),
        _ => Value::Null,
    }
}

pub(super) fn opt(s: Option<&str>) -> Value {
    s.map_or(Value::Null, Value::from)
}

/// Reads a time as RFC 3339, or in the zone-less forms products use
/// (`2023-08-31T04:13:48.385`, `2023-07-28 11:24:20`, `2023-08-24`), taken as UTC.
pub(super) fn parse_time(s: &str) -> Option<DateTime<Utc>> {
    let s = s.trim();
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return Some(t.with_timezone(&Utc));
    }
    for form in ["%Y-%m-%dT%H:%M:%S%.f", "%Y-%m-%d %H:%M:%S%.f"] {
        if let Ok(t) = NaiveDateTime::parse_from_str(s, form) {
            return Some(t.and_utc());
        }
    }
    NaiveDate::parse_from_str(s, "%Y-%m-%d")
        .ok()
        .and_then(|d| d.and_hms_opt(0, 0, 0))
        .map(|t| t.and_utc())
}

/// The time at `path` written with `fmt` in UTC; a value that is not a time passes through
/// as it was, so nothing the click carried is lost.
pub(super) fn time_at(v: &Value, path: &[&str], fmt: &str) -> Value {
    match str_at(v, path) {
        Some(s) => match parse_time(s) {
            Some(t) => Value::String(t.format(fmt).to_string()),
            None => Value::String(s.to_string()),
        },
        None => Value::Null,
    }
}

/// The link's slug without the leading "/" some products put in front.
pub(super) fn slug(event: &Value) -> Option<&str> {
    str_at(event, &["link", "slug"]).map(|s| s.trim_start_matches('/'))
}

/// Where this click went: its own destination (after rules), else the link's.
pub(super) fn click_destination(event: &Value) -> Value {
    at(event, &["click", "destination"])
        .or_else(|| at(event, &["link", "destination"]))
        .cloned()
        .unwrap_or(Value::Null)
}

/// Lower-case, hyphen-separated: "Chrome Mobile" → "chrome-mobile", "10.15.7" → "10-15-7".
pub(super) fn hyphenated(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if c.is_alphanumeric() {
            out.extend(c.to_lowercase());
        } else if !out.is_empty() && !out.ends_with('-') {
            out.push('-');
        }
    }
    while out.ends_with('-') {
        out.pop();
    }
    out
}

/// The browser family a product means by "browser name": "Chrome" for Chrome Mobile and
/// Chrome on iOS, "Safari" for Mobile Safari.
pub(super) fn browser_family(name: &str) -> &str {
    match name {
        "Chrome Mobile" | "Chrome Mobile iOS" | "Chrome Mobile WebView" => "Chrome",
        "Mobile Safari" | "Mobile Safari UI/WKWebView" => "Safari",
        "Firefox Mobile" | "Firefox iOS" => "Firefox",
        "Edge Mobile" => "Edge",
        "Opera Mobile" | "Opera Mini" => "Opera",
        "IE Mobile" => "IE",
        other => other.strip_suffix(" Mobile").unwrap_or(other),
    }
}

/// Shared by the format tests: the stored event of an ingest click, and golden files.
#[cfg(test)]
pub(super) mod testing {
    use crate::enrich::Enricher;
    use serde_json::{Map, Value};

    /// What ingest stores for `input` (a SPEC §3.1 click): `id` and `timestamp` first, then
    /// the rest, with the click enriched and a missing `metadata` as null.
    pub fn stored_event(input: &str) -> Value {
        let Value::Object(mut obj) = serde_json::from_str::<Value>(input).unwrap() else {
            panic!("not an object")
        };
        let id = obj
            .shift_remove("id")
            .unwrap_or_else(|| Value::from("evt_0195c2f3a0c07b6e8d2f4a1b9c3d5e7f"));
        let ts = obj
            .shift_remove("timestamp")
            .unwrap_or_else(|| Value::from("2025-01-15T10:30:00Z"));
        let click = obj.entry("click").or_insert_with(|| Value::Object(Map::new()));
        Enricher::new().enrich(click.as_object_mut().unwrap());
        obj.entry("metadata").or_insert(Value::Null);
        let mut stored = Map::new();
        stored.insert("id".into(), id);
        stored.insert("timestamp".into(), ts);
        stored.extend(obj);
        Value::Object(stored)
    }

    /// Compares with a committed golden file, key order included. With
    /// `CLICKHOOK_BLESS_GOLDEN=1` it rewrites the file instead.
    pub fn assert_golden(file: &str, expected: &str, actual: &Value) {
        let actual_text = serde_json::to_string_pretty(actual).unwrap() + "\n";
        if std::env::var_os("CLICKHOOK_BLESS_GOLDEN").is_some() {
            let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("tests/golden")
                .join(file);
            std::fs::write(path, &actual_text).unwrap();
            return;
        }
        let expected: Value = serde_json::from_str(expected).unwrap();
        assert_eq!(
            actual_text,
            serde_json::to_string_pretty(&expected).unwrap() + "\n",
            "golden {file} differs"
        );
    }

    /// Asserts that `actual` has exactly the keys of `example`, in its order and nesting,
    /// and the same JSON type wherever `actual` is not null. Objects at the `free_form`
    /// paths (such as `$.click.params`) carry whatever the click had.
    pub fn assert_same_shape(example: &Value, actual: &Value, free_form: &[&str]) {
        fn walk(path: &str, ex: &Value, ac: &Value, free: &[&str], errors: &mut Vec<String>) {
            match (ex, ac) {
                (_, Value::Null) => {}
                (Value::Object(_), Value::Object(_)) if free.contains(&path) => {}
                (Value::Object(e), Value::Object(a)) => {
                    let ek: Vec<_> = e.keys().collect();
                    let ak: Vec<_> = a.keys().collect();
                    if ek != ak {
                        errors.push(format!("{path}: keys {ak:?}, example has {ek:?}"));
                        return;
                    }
                    for (k, v) in e {
                        walk(&format!("{path}.{k}"), v, &a[k], free, errors);
                    }
                }
                (Value::Array(e), Value::Array(a)) => {
                    if let Some(first) = e.first() {
                        for (i, item) in a.iter().enumerate() {
                            walk(&format!("{path}[{i}]"), first, item, free, errors);
                        }
                    }
                }
                (Value::String(_), Value::String(_))
                | (Value::Number(_), Value::Number(_))
                | (Value::Bool(_), Value::Bool(_)) => {}
                (e, a) => errors.push(format!("{path}: {a} where the example has {e}")),
            }
        }
        let mut errors = Vec::new();
        walk("$", example, actual, free_form, &mut errors);
        assert!(
            errors.is_empty(),
            "shape differs from the product example:\n{}",
            errors.join("\n")
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_in_every_product_form() {
        let want = "2023-08-31T04:13:48Z";
        for s in [
            "2023-08-31T04:13:48Z",
            "2023-08-31T06:13:48+02:00",
            "2023-08-31T04:13:48",
            "2023-08-31 04:13:48",
        ] {
            assert_eq!(
                parse_time(s)
                    .unwrap()
                    .to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                want,
                "{s}"
            );
        }
        assert_eq!(
            parse_time("2023-08-24").unwrap().to_rfc3339(),
            "2023-08-24T00:00:00+00:00"
        );
        assert!(parse_time("yesterday").is_none());
    }

    #[test]
    fn hyphenated_names() {
        assert_eq!(hyphenated("Chrome Mobile"), "chrome-mobile");
        assert_eq!(hyphenated("Mobile Safari UI/WKWebView"), "mobile-safari-ui-wkwebview");
        assert_eq!(hyphenated("10.15.7"), "10-15-7");
        assert_eq!(hyphenated(" Mac OS X "), "mac-os-x");
    }

    #[test]
    fn families() {
        assert_eq!(browser_family("Chrome Mobile"), "Chrome");
        assert_eq!(browser_family("Chrome Mobile iOS"), "Chrome");
        assert_eq!(browser_family("Mobile Safari"), "Safari");
        assert_eq!(browser_family("Samsung Internet"), "Samsung Internet");
        assert_eq!(browser_family("Yandex Browser Mobile"), "Yandex Browser");
    }
}
