//! The click model at the door: splits request bodies (one object, an array, or NDJSON)
//! into clicks, checks the fields of SPEC §3.1 with errors that name the field and the
//! object's index, and turns each click into the stored event JSON. A click is read from
//! its text and only the objects the checks and enrichment need are taken apart; the
//! rest is copied (serde_json's raw values; simd-json and whole `Value` trees measured
//! slower, see BENCHMARKS.md). It must not store, route or deliver anything.

use crate::enrich::{is_bot, ClickObject, Device, Enricher};
use crate::route::ClickFacts;
use serde_json::value::RawValue;
use serde_json::{Map, Value};
use std::borrow::Cow;
use std::collections::HashMap;

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
    /// What routing looks at, as the stored JSON gives it back.
    pub routing: StoredFacts,
    /// The stored event JSON, beginning `{"id":…,"timestamp":…,`.
    pub data: Vec<u8>,
}

/// What routing looks at: taken from a click at ingest, or read back from its stored JSON.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredFacts {
    pub link_id: String,
    pub workspace_id: Option<String>,
    pub is_bot: bool,
}

impl StoredFacts {
    /// The facts of a stored event, or `None` when it is not a click (an operational
    /// event has no `link`). Bot-ness is what enrichment wrote: a `bot_name`, or a
    /// `device` of `"bot"`.
    pub fn of(data: &[u8]) -> Option<StoredFacts> {
        let top = object_members(data).ok()??;
        let (link, _) = given(&top, "link").filter(|(_, kind)| *kind == Kind::Object)?;
        let link = object_members(link.get().as_bytes()).ok()??;
        let link_id = id_text(given(&link, "id")).ok()??;
        let workspace_id = id_text(given(&link, "workspace_id")).ok()?;
        let click = given(&top, "click")
            .and_then(|(raw, _)| object_members(raw.get().as_bytes()).ok().flatten())
            .unwrap_or_default();
        // Enrichment writes the device's name plainly, with no escapes to decode.
        let device = given(&click, "device")
            .and_then(|(raw, _)| raw.get().strip_prefix('"')?.strip_suffix('"'))
            .and_then(Device::from_name);
        let named_bot = given(&click, "bot_name").is_some_and(|(_, kind)| kind == Kind::String);
        Some(StoredFacts {
            link_id,
            workspace_id,
            is_bot: is_bot(device, named_bot),
        })
    }

    /// What routing looked at.
    pub fn facts(&self) -> ClickFacts<'_> {
        ClickFacts {
            link_id: &self.link_id,
            workspace_id: self.workspace_id.as_deref(),
            is_bot: self.is_bot,
        }
    }
}

/// How a body frames its clicks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// One JSON value: an object or an array of objects.
    Json,
    /// One object per non-blank line.
    Ndjson,
}

/// A line of NDJSON with only JSON's whitespace (ASCII) in it: no click, and no answer.
/// Other whitespace is malformed JSON, reported like any.
pub fn is_blank(line: &[u8]) -> bool {
    line.iter().all(u8::is_ascii_whitespace)
}

/// Splits a body into its click objects (not yet validated), each as the JSON text it
/// was sent as. Nothing is built from them yet: [`prepare_raw`] reads what it needs.
pub fn split_body(body: &[u8], framing: Framing) -> Result<Vec<&RawValue>, ClickError> {
    match framing {
        Framing::Ndjson => {
            let mut out = Vec::new();
            for line in body.split(|b| *b == b'\n') {
                if is_blank(line) {
                    continue;
                }
                let index = out.len();
                let raw = serde_json::from_slice::<&RawValue>(line)
                    .map_err(|e| ClickError::at(index, format!("malformed JSON: {e}")))?;
                out.push(raw);
            }
            Ok(out)
        }
        Framing::Json => {
            let is_array = body.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'[');
            let malformed = |e: serde_json::Error| {
                if !is_array {
                    return ClickError::at(0, format!("malformed JSON: {e}"));
                }
                match locate_array_error(body) {
                    ArrayError::InElement(index) => ClickError::at(index, format!("malformed JSON: {e}")),
                    // No object is at fault: the text follows the last one, which the
                    // index names (an index past the end would name nothing).
                    ArrayError::AfterArray(len) => ClickError::at(
                        len.saturating_sub(1),
                        format!("malformed JSON after the array's {len} objects: {e}"),
                    ),
                }
            };
            if is_array {
                serde_json::from_slice::<Vec<&RawValue>>(body).map_err(malformed)
            } else {
                serde_json::from_slice::<&RawValue>(body)
                    .map(|raw| vec![raw])
                    .map_err(malformed)
            }
        }
    }
}

/// Deepest nesting of arrays and objects a click may have.
pub const MAX_DEPTH: usize = 64;

/// Parses one JSON value into a `serde_json::Value`.
pub fn parse_one(bytes: &[u8]) -> Result<Value, String> {
    check_depth(bytes)?;
    serde_json::from_slice::<Value>(bytes).map_err(|e| format!("malformed JSON: {e}"))
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
    let (mut depth, mut strings) = (0usize, StringTracker::default());
    for &b in bytes {
        if strings.feed(b) {
            continue;
        }
        match b {
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

/// Where a malformed array went wrong.
#[derive(Debug, PartialEq)]
enum ArrayError {
    /// In the element at this index (or where it should have begun).
    InElement(usize),
    /// After a complete array of this many elements: text follows it.
    AfterArray(usize),
}

/// Where parsing a malformed array failed.
fn locate_array_error(body: &[u8]) -> ArrayError {
    use serde::de::{Deserializer, SeqAccess, Visitor};
    struct Count<'a>(&'a mut usize);
    impl<'de> Visitor<'de> for Count<'_> {
        type Value = ();
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("an array")
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
            // Read as the body is (not skipped), so an element fails here as it failed
            // there: invalid UTF-8 in a string, say.
            while seq.next_element::<&RawValue>()?.is_some() {
                *self.0 += 1;
            }
            Ok(())
        }
    }
    let mut n = 0;
    let mut de = serde_json::Deserializer::from_slice(body);
    let whole_array = (&mut de).deserialize_seq(Count(&mut n)).is_ok();
    if whole_array && de.end().is_err() {
        ArrayError::AfterArray(n)
    } else {
        ArrayError::InElement(n)
    }
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

/// Validates one click value and renders its stored JSON (the input adapters' way in;
/// the value is encoded once and takes the same path as a click sent as text).
pub fn prepare(value: Value, index: usize, enricher: &Enricher, received: &str) -> Result<PreparedClick, ClickError> {
    let text = serde_json::to_vec(&value).map_err(|e| ClickError::at(index, format!("cannot encode: {e}")))?;
    prepare_raw(&text, index, enricher, received)
}

/// Validates one click sent as JSON text and renders its stored JSON.
///
/// Only the objects a click's checks and enrichment read are taken apart into their
/// members: the top level, `link`, and `click` for the enricher. Everything else
/// (`metadata`, `link.utm`, `click.params`, unknown fields) is copied as sent, minus
/// whitespace, which is most of a click's bytes and all of its nesting.
pub fn prepare_raw(
    text: &[u8],
    index: usize,
    enricher: &Enricher,
    received: &str,
) -> Result<PreparedClick, ClickError> {
    let err = |m: String| ClickError::at(index, m);
    check_depth(text).map_err(err)?;
    let top = match object_members(text) {
        Ok(Some(members)) => members,
        Ok(None) => {
            let raw = serde_json::from_slice::<&RawValue>(text).map_err(|e| err(format!("malformed JSON: {e}")))?;
            return Err(err(format!("a click must be a JSON object, not {}", Kind::of_raw(raw))));
        }
        Err(e) => return Err(err(format!("malformed JSON: {e}"))),
    };
    if has_unicode_escape(text) {
        // Skipping a value, as raw members are, does not decode `\u` escapes; a lone
        // surrogate would pass and make the stored event unreadable. Decode it all once.
        serde_json::from_slice::<Value>(text).map_err(|e| err(format!("malformed JSON: {e}")))?;
    }
    let (id, client_id) = match given(&top, "id") {
        None => (new_event_id(), false),
        Some((raw, Kind::String)) => {
            let s = raw_str(raw).map_err(|e| err(format!("id: {e}")))?.into_owned();
            if s.is_empty() || s.len() > MAX_ID_LEN || !s.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(err(format!("id: must be 1-{MAX_ID_LEN} visible ASCII characters")));
            }
            (s, true)
        }
        // Whole numbers only: a fraction or one past 64 bits would go through f64, and
        // two different ids could come out the same (and be taken for a duplicate).
        Some((raw, Kind::Number)) => (integer_text(raw).map_err(|e| err(format!("id: {e}")))?, true),
        Some((_, other)) => return Err(err(format!("id: must be a string, not {other}"))),
    };
    let timestamp = match given(&top, "timestamp") {
        None => received.to_string(),
        Some((raw, Kind::String)) => {
            let s = raw_str(raw).map_err(|e| err(format!("timestamp: {e}")))?;
            chrono::DateTime::parse_from_rfc3339(&s)
                .map_err(|e| err(format!("timestamp: {s:?} is not RFC 3339: {e}")))?;
            s.into_owned()
        }
        Some((_, other)) => return Err(err(format!("timestamp: must be an RFC 3339 string, not {other}"))),
    };
    let link = match given(&top, "link") {
        None => return Err(err("link: required".into())),
        Some((raw, Kind::Object)) => object_members(raw.get().as_bytes())
            .map_err(|e| err(format!("link: {e}")))?
            .unwrap_or_default(),
        Some((_, other)) => return Err(err(format!("link: must be an object, not {other}"))),
    };
    let link_id = id_text(given(&link, "id"))
        .map_err(|m| err(format!("link.id: {m}")))?
        .ok_or_else(|| err("link.id: required".into()))?;
    let workspace_id = id_text(given(&link, "workspace_id")).map_err(|m| err(format!("link.workspace_id: {m}")))?;
    check_raw_fields(&link, "link", LINK_STRINGS, LINK_BOOLS).map_err(err)?;
    for (sub, want) in [
        ("utm", Kind::Object),
        ("og", Kind::Object),
        ("rules", Kind::Array),
        ("tags", Kind::Array),
    ] {
        if let Some((_, got)) = given(&link, sub).filter(|(_, got)| *got != want) {
            return Err(err(format!("link.{sub}: must be {want}, not {got}")));
        }
    }
    let mut click = match given(&top, "click") {
        None => ClickMembers::default(),
        Some((raw, Kind::Object)) => {
            let members = object_members(raw.get().as_bytes())
                .map_err(|e| err(format!("click: {e}")))?
                .unwrap_or_default();
            check_raw_fields(&members, "click", CLICK_STRINGS, &[]).map_err(err)?;
            if let Some((_, got)) = given(&members, "params").filter(|(_, got)| *got != Kind::Object) {
                return Err(err(format!("click.params: must be an object, not {got}")));
            }
            ClickMembers::from(members)
        }
        Some((_, other)) => return Err(err(format!("click: must be an object, not {other}"))),
    };
    let is_bot = enricher.enrich(&mut click);
    if let Some((_, got)) = given(&top, "metadata").filter(|(_, got)| *got != Kind::Object) {
        return Err(err(format!("metadata: must be an object, not {got}")));
    }

    let mut data = Vec::with_capacity(text.len() + 256);
    data.extend_from_slice(b"{\"id\":");
    write_json(&mut data, &id).map_err(err)?;
    data.extend_from_slice(b",\"timestamp\":");
    write_json(&mut data, &timestamp).map_err(err)?;
    let mut click_written = false;
    for (key, raw) in &top {
        match key.as_ref() {
            "id" | "timestamp" => continue,
            "link" => {
                write_key(&mut data, key).map_err(err)?;
                write_members(&mut data, &link, |out, raw| {
                    push_compact(out, raw.get());
                    Ok(())
                })
                .map_err(err)?;
            }
            "click" => {
                write_key(&mut data, key).map_err(err)?;
                click.write(&mut data).map_err(err)?;
                click_written = true;
            }
            _ => {
                write_key(&mut data, key).map_err(err)?;
                push_compact(&mut data, raw.get());
            }
        }
    }
    if !click_written {
        data.extend_from_slice(b",\"click\":");
        click.write(&mut data).map_err(err)?;
    }
    if member(&top, "metadata").is_none() {
        data.extend_from_slice(b",\"metadata\":null");
    }
    data.push(b'}');
    Ok(PreparedClick {
        id,
        client_id,
        routing: StoredFacts {
            link_id,
            workspace_id,
            is_bot,
        },
        data,
    })
}

/// The `click` object of a click being prepared, as enrichment sees it: what enrichment
/// sets is held as a value, every other member stays as its text.
#[derive(Default)]
struct ClickMembers<'a> {
    members: Vec<(Cow<'a, str>, Member<'a>)>,
}

enum Member<'a> {
    Text(&'a RawValue),
    Set(Value),
}

impl<'a> From<Members<'a>> for ClickMembers<'a> {
    fn from(members: Members<'a>) -> Self {
        ClickMembers {
            members: members.into_iter().map(|(n, raw)| (n, Member::Text(raw))).collect(),
        }
    }
}

impl ClickMembers<'_> {
    fn get(&self, name: &str) -> Option<&Member<'_>> {
        self.members.iter().find(|(n, _)| n == name).map(|(_, m)| m)
    }

    fn write(&self, out: &mut Vec<u8>) -> Result<(), String> {
        write_members(out, &self.members, |out, m| match m {
            Member::Text(raw) => {
                push_compact(out, raw.get());
                Ok(())
            }
            Member::Set(value) => write_json(out, value),
        })
    }
}

impl ClickObject for ClickMembers<'_> {
    fn string(&self, name: &str) -> Option<Cow<'_, str>> {
        match self.get(name)? {
            Member::Text(raw) if Kind::of_raw(raw) == Kind::String => raw_str(raw).ok(),
            Member::Set(Value::String(s)) => Some(Cow::Borrowed(s)),
            _ => None,
        }
    }

    fn boolean(&self, name: &str) -> Option<bool> {
        match self.get(name)? {
            Member::Text(raw) => match raw.get() {
                "true" => Some(true),
                "false" => Some(false),
                _ => None,
            },
            Member::Set(v) => v.as_bool(),
        }
    }

    fn present(&self, name: &str) -> bool {
        match self.get(name) {
            None => false,
            Some(Member::Text(raw)) => Kind::of_raw(raw) != Kind::Null,
            Some(Member::Set(v)) => !v.is_null(),
        }
    }

    fn object(&self, name: &str) -> Option<Map<String, Value>> {
        match self.get(name)? {
            Member::Text(raw) if Kind::of_raw(raw) == Kind::Object => serde_json::from_str(raw.get()).ok(),
            Member::Set(v) => v.as_object().cloned(),
            Member::Text(_) => None,
        }
    }

    fn set(&mut self, name: &str, value: Value) {
        match self.members.iter_mut().find(|(n, _)| n == name) {
            Some((_, slot)) => *slot = Member::Set(value),
            None => self.members.push((Cow::Owned(name.to_owned()), Member::Set(value))),
        }
    }
}

/// An object's members in the order written, each name once with its last value (as a
/// JSON object decoded into a map would have it), values left as their JSON text.
type Members<'a> = Vec<(Cow<'a, str>, &'a RawValue)>;

/// The members of `text` if it is a JSON object; `None` if it does not start like one
/// (the caller finds out what it is instead).
pub(crate) fn object_members(text: &[u8]) -> Result<Option<Members<'_>>, serde_json::Error> {
    use serde::de::{Deserializer, MapAccess, Visitor};
    struct MembersVisitor;
    impl<'de> Visitor<'de> for MembersVisitor {
        type Value = Members<'de>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a JSON object")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Members<'de>, A::Error> {
            let mut members: Members<'de> = Vec::with_capacity(map.size_hint().unwrap_or(8));
            while let Some(Name(name)) = map.next_key::<Name<'de>>()? {
                let value = map.next_value::<&'de RawValue>()?;
                members.push((name, value));
            }
            Ok(keep_last(members))
        }
    }
    let starts_object = text.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'{');
    if !starts_object {
        return Ok(None);
    }
    let mut de = serde_json::Deserializer::from_slice(text);
    let members = (&mut de).deserialize_map(MembersVisitor)?;
    de.end()?;
    Ok(Some(members))
}

/// A member name, borrowed from the text unless it had escapes.
struct Name<'a>(Cow<'a, str>);

impl<'de> serde::Deserialize<'de> for Name<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct NameVisitor;
        impl<'de> serde::de::Visitor<'de> for NameVisitor {
            type Value = Name<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a member name")
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Name<'de>, E> {
                Ok(Name(Cow::Borrowed(v)))
            }
            fn visit_str<E>(self, v: &str) -> Result<Name<'de>, E> {
                Ok(Name(Cow::Owned(v.to_owned())))
            }
        }
        d.deserialize_str(NameVisitor)
    }
}

/// Collapses repeated names to one member, at the first name's place with the last
/// value. Objects are small, so a scan beats hashing until they are not.
fn keep_last(members: Members<'_>) -> Members<'_> {
    const SCAN_UP_TO: usize = 16;
    let mut out: Members<'_> = Vec::with_capacity(members.len());
    if members.len() <= SCAN_UP_TO {
        for (name, value) in members {
            match out.iter_mut().find(|(n, _)| *n == name) {
                Some(slot) => slot.1 = value,
                None => out.push((name, value)),
            }
        }
        return out;
    }
    let mut at: HashMap<Cow<'_, str>, usize> = HashMap::with_capacity(members.len());
    for (name, value) in members {
        match at.get(&name) {
            Some(&i) => out[i].1 = value,
            None => {
                at.insert(name.clone(), out.len());
                out.push((name, value));
            }
        }
    }
    out
}

fn member<'a>(members: &Members<'a>, name: &str) -> Option<&'a RawValue> {
    members.iter().find(|(n, _)| n == name).map(|(_, v)| *v)
}

/// The member `name` with its kind, unless it is absent or null: every field of the
/// model takes null as not given.
fn given<'a>(members: &Members<'a>, name: &str) -> Option<(&'a RawValue, Kind)> {
    member(members, name)
        .map(|raw| (raw, Kind::of_raw(raw)))
        .filter(|(_, kind)| *kind != Kind::Null)
}

/// What a JSON value is, named in error messages as "a string", "an array", ….
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Null,
    Boolean,
    Number,
    String,
    Array,
    Object,
}

impl Kind {
    pub(crate) fn of(v: &Value) -> Kind {
        match v {
            Value::Null => Kind::Null,
            Value::Bool(_) => Kind::Boolean,
            Value::Number(_) => Kind::Number,
            Value::String(_) => Kind::String,
            Value::Array(_) => Kind::Array,
            Value::Object(_) => Kind::Object,
        }
    }

    /// The kind of valid JSON text: its first byte decides.
    fn of_raw(raw: &RawValue) -> Kind {
        match raw.get().as_bytes().first() {
            Some(b'"') => Kind::String,
            Some(b'{') => Kind::Object,
            Some(b'[') => Kind::Array,
            Some(b't' | b'f') => Kind::Boolean,
            Some(b'n') => Kind::Null,
            _ => Kind::Number,
        }
    }
}

impl std::fmt::Display for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Kind::Null => "null",
            Kind::Boolean => "a boolean",
            Kind::Number => "a number",
            Kind::String => "a string",
            Kind::Array => "an array",
            Kind::Object => "an object",
        })
    }
}

/// A raw JSON string's text, borrowed unless it has escapes.
fn raw_str(raw: &RawValue) -> Result<Cow<'_, str>, String> {
    let text = raw.get();
    match text.strip_prefix('"').and_then(|t| t.strip_suffix('"')) {
        Some(inner) if !inner.contains('\\') => Ok(Cow::Borrowed(inner)),
        _ => serde_json::from_str::<String>(text)
            .map(Cow::Owned)
            .map_err(|e| format!("malformed string: {e}")),
    }
}

fn raw_number(raw: &RawValue) -> Result<serde_json::Number, String> {
    serde_json::from_str::<serde_json::Number>(raw.get()).map_err(|e| format!("malformed number: {e}"))
}

/// Whether `text` may hold a `\u` escape (an escaped backslash before a `u` counts too;
/// that only costs a second look).
fn has_unicode_escape(text: &[u8]) -> bool {
    text.contains(&b'\\') && text.windows(2).any(|w| w == b"\\u")
}

/// Checks that the named members, where present, are strings (or booleans) or null.
fn check_raw_fields(members: &Members<'_>, at: &str, strings: &[&str], bools: &[&str]) -> Result<(), String> {
    for (name, raw) in members {
        let (want, wanted) = if strings.contains(&name.as_ref()) {
            (Kind::String, "a string")
        } else if bools.contains(&name.as_ref()) {
            (Kind::Boolean, "true or false")
        } else {
            continue;
        };
        let got = Kind::of_raw(raw);
        if got != want && got != Kind::Null {
            return Err(format!("{at}.{name}: must be {wanted}, not {got}"));
        }
    }
    Ok(())
}

fn write_json<T: serde::Serialize + ?Sized>(out: &mut Vec<u8>, value: &T) -> Result<(), String> {
    serde_json::to_writer(out, value).map_err(|e| format!("cannot encode: {e}"))
}

fn write_key(out: &mut Vec<u8>, name: &str) -> Result<(), String> {
    out.push(b',');
    write_json(out, name)?;
    out.push(b':');
    Ok(())
}

/// Writes `{"name":value,…}`, each value written by `value`.
fn write_members<V>(
    out: &mut Vec<u8>,
    members: &[(Cow<'_, str>, V)],
    mut value: impl FnMut(&mut Vec<u8>, &V) -> Result<(), String>,
) -> Result<(), String> {
    out.push(b'{');
    for (i, (name, v)) in members.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        write_json(out, name.as_ref())?;
        out.push(b':');
        value(out, v)?;
    }
    out.push(b'}');
    Ok(())
}

/// Appends valid JSON text without the whitespace between its tokens, so a stored event
/// is one line whatever layout it was sent in.
fn push_compact(out: &mut Vec<u8>, json: &str) {
    let bytes = json.as_bytes();
    // Most values hold no whitespace at all, not even inside strings: copy them whole.
    if !bytes.iter().any(|b| matches!(b, b' ' | b'\t' | b'\n' | b'\r')) {
        out.extend_from_slice(bytes);
        return;
    }
    let mut strings = StringTracker::default();
    for &b in bytes {
        if strings.feed(b) || !matches!(b, b' ' | b'\t' | b'\n' | b'\r') {
            out.push(b);
        }
    }
}

/// Follows JSON text byte by byte to tell which bytes belong to strings (quotes
/// included), where brackets and whitespace mean nothing.
#[derive(Default)]
struct StringTracker {
    open: bool,
    escaped: bool,
}

impl StringTracker {
    /// Takes the next byte; true if it is part of a string.
    fn feed(&mut self, b: u8) -> bool {
        if self.open {
            match (self.escaped, b) {
                (true, _) => self.escaped = false,
                (false, b'\\') => self.escaped = true,
                (false, b'"') => self.open = false,
                _ => {}
            }
            return true;
        }
        self.open = b == b'"';
        self.open
    }
}

/// A link or workspace id as text: ids compare as text (SPEC §9).
fn id_text(v: Option<(&RawValue, Kind)>) -> Result<Option<String>, String> {
    let Some((raw, kind)) = v else { return Ok(None) };
    match kind {
        Kind::String => {
            let s = raw_str(raw)?;
            if s.is_empty() {
                return Err("must not be empty".into());
            }
            Ok(Some(s.into_owned()))
        }
        Kind::Number => integer_text(raw).map(Some),
        other => Err(format!("must be a string or an integer, not {other}")),
    }
}

/// A JSON number that is a 64-bit integer, as text.
fn integer_text(raw: &RawValue) -> Result<String, String> {
    let n = raw_number(raw)?;
    if n.is_i64() || n.is_u64() {
        Ok(n.to_string())
    } else {
        Err("must be a string or an integer of at most 64 bits, not another number".into())
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
    fn a_numeric_click_id_is_a_whole_number_kept_exactly() {
        let c = prep(r#"{"id":18446744073709551615,"link":{"id":1}}"#).unwrap();
        assert_eq!((c.id.as_str(), c.client_id), ("18446744073709551615", true));
        for near in ["12345678901234567890123", "12345678901234567890124", "1.5", "1e3"] {
            let e = prep(&format!(r#"{{"id":{near},"link":{{"id":1}}}}"#))
                .unwrap_err()
                .to_string();
            assert!(e.contains("id: must be a string or an integer"), "{near}: {e}");
        }
    }

    #[test]
    fn minimal_click_gets_id_timestamp_and_enrichment() {
        let c = prep(r#"{"link":{"id":12345}}"#).unwrap();
        assert_eq!(c.routing.link_id, "12345");
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
        let deep = "[".repeat(100_000).into_bytes();
        assert!(parse_one(&deep).unwrap_err().contains("nested deeper"));
        let ok = format!(
            r#"{{"link":{{"id":1}},"metadata":{}{}}}"#,
            "[".repeat(60),
            "]".repeat(60)
        )
        .into_bytes();
        assert!(parse_one(&ok).is_ok());
        // Past the quick count of brackets, the exact scan decides: brackets inside
        // strings do not nest, real ones past the limit do.
        let in_strings = format!(r#"{{"link":{{"id":1}},"metadata":{{"x":"{}"}}}}"#, "[{".repeat(100)).into_bytes();
        assert!(parse_one(&in_strings).is_ok());
        let just_over = format!("{}{}", "[".repeat(MAX_DEPTH + 1), "]".repeat(MAX_DEPTH + 1)).into_bytes();
        assert!(parse_one(&just_over).unwrap_err().contains("nested deeper"));
        let in_string = format!(r#"{{"link":{{"id":"{}"}}}}"#, "[".repeat(1000)).into_bytes();
        assert!(parse_one(&in_string).is_ok(), "brackets inside strings do not count");
        let escaped = br#"{"link":{"id":"a\"[[["}}"#.to_vec();
        let parsed = parse_one(&escaped);
        assert!(parsed.is_ok(), "{parsed:?}");
    }

    fn prep_text(text: &str) -> Result<PreparedClick, ClickError> {
        prepare_raw(text.as_bytes(), 0, &Enricher::new(), "2025-01-01T00:00:00.000Z")
    }

    #[test]
    fn any_layout_is_stored_as_one_compact_line() {
        let compact = r#"{"id":"e1","link":{"id":7,"name":"a b","utm":{"source":"x y"}},"click":{"user_agent":"curl/8.0"},"metadata":{"k":[1,2,{"n":" spaced "}]}}"#;
        let pretty = serde_json::to_string_pretty(&serde_json::from_str::<Value>(compact).unwrap()).unwrap();
        assert!(pretty.contains('\n'));
        let a = prep_text(compact).unwrap();
        let b = prep_text(&pretty).unwrap();
        assert_eq!(a.data, b.data);
        assert!(!a.data.contains(&b'\n'));
        let text = String::from_utf8(a.data).unwrap();
        assert!(text.contains(r#""metadata":{"k":[1,2,{"n":" spaced "}]}"#), "{text}");
        assert!(text.contains(r#""name":"a b","utm":{"source":"x y"}"#), "{text}");
    }

    #[test]
    fn a_repeated_name_keeps_its_first_place_and_last_value() {
        let c = prep_text(r#"{"link":{"id":1,"slug":"s","id":2},"x":1,"link":{"id":3,"id":4},"x":2}"#).unwrap();
        assert_eq!(c.routing.link_id, "4");
        let text = String::from_utf8(c.data).unwrap();
        assert!(text.contains(r#","link":{"id":4},"x":2,"click":"#), "{text}");
        assert_eq!(text.matches("\"link\"").count(), 1);
        // Past the size where names are scanned, they are hashed; same answer.
        let mut many = String::from(r#"{"link":{"id":1"#);
        for i in 0..40 {
            many.push_str(&format!(r#","k{i}":{i}"#));
        }
        many.push_str(r#","k3":"last","id":"z"}}"#);
        let c = prep_text(&many).unwrap();
        assert_eq!(c.routing.link_id, "z");
        let v: Value = serde_json::from_slice(&c.data).unwrap();
        assert_eq!(v["link"]["k3"], "last");
        assert_eq!(v["link"].as_object().unwrap().len(), 41);
    }

    #[test]
    fn escapes_are_decoded_where_read_and_checked_everywhere() {
        let c = prep_text(r#"{"li\u006ek":{"id":"a\"b"},"id":"\u0065vt"}"#).unwrap();
        assert_eq!((c.routing.link_id.as_str(), c.id.as_str()), ("a\"b", "evt"));
        let v: Value = serde_json::from_slice(&c.data).unwrap();
        assert_eq!(v["link"]["id"], "a\"b");
        // A lone surrogate deep in a member that is only copied is still refused: the
        // stored event must stay readable.
        let lone = prep_text(r#"{"link":{"id":1},"metadata":{"a":["\ud800"]}}"#).unwrap_err();
        assert!(lone.message.starts_with("malformed JSON"), "{}", lone.message);
        assert!(prep_text(r#"{"link":{"id":1},"metadata":{"a":"\ud83d\ude00"}}"#).is_ok());
        assert!(prep_text(r#"{"link":{"id":1},"metadata":{"a":"\\u"}}"#).is_ok());
    }

    #[test]
    fn pairs_the_click_brings_are_kept_or_completed() {
        let c = prep_text(
            r#"{"link":{"id":1},"click":{"os":{"version":"14","name":"iOS","x":[1]},"browser":{"name":"Safari"},"device":"tablet"}}"#,
        )
        .unwrap();
        let text = String::from_utf8(c.data).unwrap();
        assert!(
            text.contains(r#""click":{"os":{"version":"14","name":"iOS","x":[1]},"browser":{"name":"Safari","version":null},"device":"tablet","#),
            "{text}"
        );
    }

    #[test]
    fn text_that_is_not_one_object_is_refused() {
        let trailing = prep_text(r#"{"link":{"id":1}} {}"#).unwrap_err();
        assert!(trailing.message.starts_with("malformed JSON"), "{}", trailing.message);
        assert_eq!(
            prep_text("[1]").unwrap_err().message,
            "a click must be a JSON object, not an array"
        );
        assert!(prep_text(r#"{"link":{"id":1}"#)
            .unwrap_err()
            .message
            .starts_with("malformed JSON"));
        assert_eq!(
            prep_text(r#"{"link":{"id":1,"tags":"x"}}"#).unwrap_err().message,
            "link.tags: must be an array, not a string"
        );
        assert_eq!(
            prep_text(r#"{"link":{"id":1.5}}"#).unwrap_err().message,
            "link.id: must be a string or an integer of at most 64 bits, not another number"
        );
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
        let one = br#"{"link":{"id":1}}"#.to_vec();
        assert_eq!(split_body(&one, Framing::Json).unwrap().len(), 1);
        let arr = br#"[{"link":{"id":1}},{"link":{"id":2}}]"#.to_vec();
        assert_eq!(split_body(&arr, Framing::Json).unwrap().len(), 2);
        let nd = b"{\"link\":{\"id\":1}}\n\n{\"link\":{\"id\":2}}\n".to_vec();
        assert_eq!(split_body(&nd, Framing::Ndjson).unwrap().len(), 2);
        let bad = b"{\"link\":{\"id\":1}}\n\n{\"link\":\n".to_vec();
        assert_eq!(split_body(&bad, Framing::Ndjson).unwrap_err().index, 1);
        let bad_arr = br#"[{"link":{"id":1}},{"link":{"id":2}},{"link":]"#.to_vec();
        assert_eq!(split_body(&bad_arr, Framing::Json).unwrap_err().index, 2);
    }

    #[test]
    fn text_after_an_array_names_its_last_object_and_says_where_it_is() {
        let trailing = br#"[{"link":{"id":1}},{"link":{"id":2}}] x"#.to_vec();
        let e = split_body(&trailing, Framing::Json).unwrap_err();
        assert_eq!(e.index, 1);
        assert!(e.message.contains("after the array's 2 objects"), "{}", e.message);
        let empty = b"[] x".to_vec();
        assert_eq!(split_body(&empty, Framing::Json).unwrap_err().index, 0);
        // A fault inside an element still names that element.
        let inner = br#"[{"link":{"id":1}},{"link" 2}] x"#.to_vec();
        let e = split_body(&inner, Framing::Json).unwrap_err();
        assert_eq!(e.index, 1);
        assert!(!e.message.contains("after the array"), "{}", e.message);
        // Invalid UTF-8 inside an element is that element's fault.
        let mut bad_text = br#"[{"link":{"id":1}},{"link":{"id":"x"}},{"link":{"id":3}}]"#.to_vec();
        let at = bad_text.iter().position(|b| *b == b'x').unwrap();
        bad_text[at] = 0xff;
        let e = split_body(&bad_text, Framing::Json).unwrap_err();
        assert_eq!(e.index, 1, "{}", e.message);
        assert!(!e.message.contains("after the array"), "{}", e.message);
    }
}
