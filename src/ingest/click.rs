//! The click model at the door: parses request bodies (one object, an array, or NDJSON)
//! with simd-json, checks the fields of SPEC §3.1 with errors that name the field and
//! the object's index, and turns each click into the stored event JSON. It must not
//! store, route or deliver anything.

use crate::enrich::Enricher;
use serde_json::{Map, Value};

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{message}")]
pub struct ClickError {
    /// 0-based index of the object (for NDJSON, of the non-blank line).
    pub index: usize,
    pub message: String,
}

impl ClickError {
    fn at(index: usize, message: impl Into<String>) -> Self {
        ClickError {
            index,
            message: message.into(),
        }
    }
}

/// A validated click, ready to append.
#[derive(Debug, Clone)]
pub struct PreparedClick {
    pub id: String,
    pub client_id: bool,
    pub link_id: String,
    pub workspace_id: Option<String>,
    pub is_bot: bool,
    /// The stored event JSON, beginning `{"id":…,"timestamp":…,`.
    pub data: Vec<u8>,
}

/// How a body frames its clicks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// One JSON value: an object or an array of objects.
    Json,
    /// One object per non-blank line.
    Ndjson,
}

/// Parses a body into click objects (not yet validated). The buffer is parsed in place.
pub fn parse_body(body: &mut [u8], framing: Framing) -> Result<Vec<Value>, ClickError> {
    match framing {
        Framing::Ndjson => {
            let mut out = Vec::new();
            for line in body.split_mut(|b| *b == b'\n') {
                if line.iter().all(u8::is_ascii_whitespace) {
                    continue;
                }
                let index = out.len();
                out.push(parse_one(line).map_err(|m| ClickError::at(index, m))?);
            }
            Ok(out)
        }
        Framing::Json => {
            let copy = body.to_vec();
            match parse_one(body) {
                Ok(Value::Array(items)) => Ok(items),
                Ok(v) => Ok(vec![v]),
                Err(m) => Err(ClickError::at(locate_array_error(&copy), m)),
            }
        }
    }
}

/// Deepest nesting of arrays and objects a click may have. Parsing recurses per level,
/// so without a bound a body of nested brackets could exhaust the stack.
pub const MAX_DEPTH: usize = 64;

/// Parses one JSON value with simd-json.
pub fn parse_one(bytes: &mut [u8]) -> Result<Value, String> {
    check_depth(bytes)?;
    simd_json::serde::from_slice::<Value>(bytes).map_err(|e| format!("malformed JSON: {e}"))
}

/// Refuses JSON nested deeper than [`MAX_DEPTH`], looking at brackets outside strings.
fn check_depth(bytes: &[u8]) -> Result<(), String> {
    // Nesting never exceeds the number of opening brackets, strings included. Counting
    // them is a branch-free pass the compiler vectorizes; a click has a handful, so the
    // exact scan below runs only for bodies that could be too deep.
    let openers = bytes
        .iter()
        .map(|b| usize::from(*b == b'[' || *b == b'{'))
        .sum::<usize>();
    if openers <= MAX_DEPTH {
        return Ok(());
    }
    let (mut depth, mut in_string, mut escaped) = (0usize, false, false);
    for &b in bytes {
        if in_string {
            match (escaped, b) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                if depth > MAX_DEPTH {
                    return Err(format!("JSON nested deeper than {MAX_DEPTH} levels"));
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    Ok(())
}

/// For a malformed array, the index of the element where parsing failed (0 otherwise).
fn locate_array_error(body: &[u8]) -> usize {
    use serde::de::{Deserializer, IgnoredAny, SeqAccess, Visitor};
    struct Count<'a>(&'a mut usize);
    impl<'de> Visitor<'de> for Count<'_> {
        type Value = ();
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("an array")
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
            while seq.next_element::<IgnoredAny>()?.is_some() {
                *self.0 += 1;
            }
            Ok(())
        }
    }
    let mut n = 0;
    let mut de = serde_json::Deserializer::from_slice(body);
    let _ = (&mut de).deserialize_seq(Count(&mut n));
    n
}

const MAX_ID_LEN: usize = 128;

const LINK_STRINGS: &[&str] = &[
    "slug",
    "domain",
    "destination",
    "name",
    "created_at",
    "active_at",
    "campaign_id",
    "client_id",
    "product_id",
    "delivery_id",
    "recipient",
    "domain_id",
];
const LINK_BOOLS: &[&str] = &[
    "enabled",
    "forward_params",
    "cloaking",
    "block_bots",
    "public_analytics",
];
const CLICK_STRINGS: &[&str] = &[
    "ip",
    "user_agent",
    "referer",
    "country",
    "region",
    "city",
    "isp",
    "organization",
    "connection_type",
    "language",
    "destination",
];

/// Validates one click object and renders its stored JSON.
pub fn prepare(value: Value, index: usize, enricher: &Enricher, received: &str) -> Result<PreparedClick, ClickError> {
    let err = |m: String| ClickError::at(index, m);
    let Value::Object(mut obj) = value else {
        return Err(err(format!("a click must be a JSON object, not {}", kind(&value))));
    };
    let (id, client_id) = match obj.shift_remove("id") {
        None | Some(Value::Null) => (new_event_id(), false),
        Some(Value::String(s)) => {
            if s.is_empty() || s.len() > MAX_ID_LEN || !s.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(err(format!("id: must be 1-{MAX_ID_LEN} visible ASCII characters")));
            }
            (s, true)
        }
        Some(Value::Number(n)) => (n.to_string(), true),
        Some(other) => return Err(err(format!("id: must be a string, not {}", kind(&other)))),
    };
    let timestamp = match obj.shift_remove("timestamp") {
        None | Some(Value::Null) => received.to_string(),
        Some(Value::String(s)) => {
            chrono::DateTime::parse_from_rfc3339(&s)
                .map_err(|e| err(format!("timestamp: {s:?} is not RFC 3339: {e}")))?;
            s
        }
        Some(other) => {
            return Err(err(format!(
                "timestamp: must be an RFC 3339 string, not {}",
                kind(&other)
            )))
        }
    };
    let link = match obj.get_mut("link") {
        Some(Value::Object(link)) => link,
        None | Some(Value::Null) => return Err(err("link: required".into())),
        Some(other) => return Err(err(format!("link: must be an object, not {}", kind(other)))),
    };
    let link_id = id_text(link.get("id"))
        .map_err(|m| err(format!("link.id: {m}")))?
        .ok_or_else(|| err("link.id: required".into()))?;
    let workspace_id = id_text(link.get("workspace_id")).map_err(|m| err(format!("link.workspace_id: {m}")))?;
    check_fields(link, "link", LINK_STRINGS, LINK_BOOLS).map_err(err)?;
    for sub in ["utm", "og"] {
        match link.get(sub) {
            None | Some(Value::Null) => {}
            Some(Value::Object(m)) => check_fields(m, &format!("link.{sub}"), &[], &[]).map_err(err)?,
            Some(other) => return Err(err(format!("link.{sub}: must be an object, not {}", kind(other)))),
        }
    }
    for list in ["rules", "tags"] {
        if let Some(v) = link.get(list) {
            if !matches!(v, Value::Array(_) | Value::Null) {
                return Err(err(format!("link.{list}: must be an array, not {}", kind(v))));
            }
        }
    }
    if matches!(obj.get("click"), None | Some(Value::Null)) {
        obj.insert("click".into(), Value::Object(Map::new()));
    }
    let click = match obj.get_mut("click") {
        Some(Value::Object(c)) => c,
        Some(other) => return Err(err(format!("click: must be an object, not {}", kind(other)))),
        None => return Err(err("click: missing".into())),
    };
    check_fields(click, "click", CLICK_STRINGS, &[]).map_err(err)?;
    if let Some(p) = click.get("params") {
        if !matches!(p, Value::Object(_) | Value::Null) {
            return Err(err(format!("click.params: must be an object, not {}", kind(p))));
        }
    }
    let is_bot = enricher.enrich(click);
    match obj.get("metadata") {
        None => {
            obj.insert("metadata".into(), Value::Null);
        }
        Some(Value::Object(_)) | Some(Value::Null) => {}
        Some(other) => return Err(err(format!("metadata: must be an object, not {}", kind(other)))),
    }
    let mut stored = Map::with_capacity(obj.len() + 2);
    stored.insert("id".into(), Value::String(id.clone()));
    stored.insert("timestamp".into(), Value::String(timestamp));
    stored.extend(obj);
    let data = serde_json::to_vec(&Value::Object(stored)).map_err(|e| err(format!("cannot encode: {e}")))?;
    Ok(PreparedClick {
        id,
        client_id,
        link_id,
        workspace_id,
        is_bot,
        data,
    })
}

/// A link or workspace id as text: ids compare as text (SPEC §9).
fn id_text(v: Option<&Value>) -> Result<Option<String>, String> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s.is_empty() => Err("must not be empty".into()),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(Value::Number(n)) if n.is_i64() || n.is_u64() => Ok(Some(n.to_string())),
        Some(other) => Err(format!("must be a string or an integer, not {}", kind(other))),
    }
}

fn check_fields(obj: &Map<String, Value>, at: &str, strings: &[&str], bools: &[&str]) -> Result<(), String> {
    for name in strings {
        if let Some(v) = obj.get(*name) {
            if !matches!(v, Value::String(_) | Value::Null) {
                return Err(format!("{at}.{name}: must be a string, not {}", kind(v)));
            }
        }
    }
    for name in bools {
        if let Some(v) = obj.get(*name) {
            if !matches!(v, Value::Bool(_) | Value::Null) {
                return Err(format!("{at}.{name}: must be true or false, not {}", kind(v)));
            }
        }
    }
    Ok(())
}

/// How a JSON value is named in error messages ("a string", "an array", …).
pub(crate) fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// A new event id: time-ordered and unique across restarts.
pub fn new_event_id() -> String {
    format!("evt_{}", uuid::Uuid::now_v7().simple())
}

/// The receive time in the stored form.
pub fn received_now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prep(json: &str) -> Result<PreparedClick, ClickError> {
        let v: Value = serde_json::from_str(json).unwrap();
        prepare(v, 3, &Enricher::new(), "2025-01-01T00:00:00.000Z")
    }

    #[test]
    fn minimal_click_gets_id_timestamp_and_enrichment() {
        let c = prep(r#"{"link":{"id":12345}}"#).unwrap();
        assert_eq!(c.link_id, "12345");
        assert!(!c.client_id && c.id.starts_with("evt_"));
        let text = String::from_utf8(c.data.clone()).unwrap();
        assert!(
            text.starts_with(&format!(r#"{{"id":"{}","timestamp":"2025-01-01T00:00:00.000Z","#, c.id)),
            "{text}"
        );
        let v: Value = serde_json::from_slice(&c.data).unwrap();
        assert_eq!(v["click"]["device"], "unknown");
        assert!(v["metadata"].is_null());
    }

    #[test]
    fn unknown_fields_stay_where_they_were() {
        let c = prep(r#"{"link":{"id":"a","extra":1},"click":{"foo":"bar"},"top":true}"#).unwrap();
        let v: Value = serde_json::from_slice(&c.data).unwrap();
        assert_eq!(v["link"]["extra"], 1);
        assert_eq!(v["click"]["foo"], "bar");
        assert_eq!(v["top"], true);
    }

    #[test]
    fn errors_name_the_field_and_index() {
        let e = prep(r#"{"link":{}}"#).unwrap_err();
        assert_eq!((e.index, e.message.as_str()), (3, "link.id: required"));
        assert_eq!(prep(r#"{"click":{}}"#).unwrap_err().message, "link: required");
        assert!(prep(r#"{"link":{"id":[1]}}"#)
            .unwrap_err()
            .message
            .starts_with("link.id: must be a string"));
        assert!(prep(r#"{"link":{"id":1},"click":{"country":5}}"#)
            .unwrap_err()
            .message
            .starts_with("click.country"));
        assert!(prep(r#"{"link":{"id":1},"timestamp":"yesterday"}"#)
            .unwrap_err()
            .message
            .starts_with("timestamp"));
        assert!(prep(r#"{"link":{"id":1,"enabled":"yes"}}"#)
            .unwrap_err()
            .message
            .starts_with("link.enabled"));
    }

    #[test]
    fn deep_nesting_is_refused_before_parsing() {
        let mut deep = "[".repeat(100_000).into_bytes();
        assert!(parse_one(&mut deep).unwrap_err().contains("nested deeper"));
        let mut ok = format!(
            r#"{{"link":{{"id":1}},"metadata":{}{}}}"#,
            "[".repeat(60),
            "]".repeat(60)
        )
        .into_bytes();
        assert!(parse_one(&mut ok).is_ok());
        // Past the quick count of brackets, the exact scan decides: brackets inside
        // strings do not nest, real ones past the limit do.
        let mut in_strings = format!(r#"{{"link":{{"id":1}},"metadata":{{"x":"{}"}}}}"#, "[{".repeat(100)).into_bytes();
        assert!(parse_one(&mut in_strings).is_ok());
        let mut just_over = format!("{}{}", "[".repeat(MAX_DEPTH + 1), "]".repeat(MAX_DEPTH + 1)).into_bytes();
        assert!(parse_one(&mut just_over).unwrap_err().contains("nested deeper"));
        let mut in_string = format!(r#"{{"link":{{"id":"{}"}}}}"#, "[".repeat(1000)).into_bytes();
        assert!(
            parse_one(&mut in_string).is_ok(),
            "brackets inside strings do not count"
        );
        let mut escaped = br#"{"link":{"id":"a\"[[["}}"#.to_vec();
        let parsed = parse_one(&mut escaped);
        assert!(parsed.is_ok(), "{parsed:?}");
    }

    #[test]
    fn client_ids_are_kept() {
        let c = prep(r#"{"id":"order-77","link":{"id":1}}"#).unwrap();
        assert!(c.client_id);
        assert_eq!(c.id, "order-77");
        assert!(prep(r#"{"id":"has space","link":{"id":1}}"#).is_err());
    }

    #[test]
    fn bodies_frame_as_object_array_and_ndjson() {
        let mut one = br#"{"link":{"id":1}}"#.to_vec();
        assert_eq!(parse_body(&mut one, Framing::Json).unwrap().len(), 1);
        let mut arr = br#"[{"link":{"id":1}},{"link":{"id":2}}]"#.to_vec();
        assert_eq!(parse_body(&mut arr, Framing::Json).unwrap().len(), 2);
        let mut nd = b"{\"link\":{\"id\":1}}\n\n{\"link\":{\"id\":2}}\n".to_vec();
        assert_eq!(parse_body(&mut nd, Framing::Ndjson).unwrap().len(), 2);
        let mut bad = b"{\"link\":{\"id\":1}}\n\n{\"link\":\n".to_vec();
        assert_eq!(parse_body(&mut bad, Framing::Ndjson).unwrap_err().index, 1);
        let mut bad_arr = br#"[{"link":{"id":1}},{"link":{"id":2}},{"link":]"#.to_vec();
        assert_eq!(parse_body(&mut bad_arr, Framing::Json).unwrap_err().index, 2);
    }
}
