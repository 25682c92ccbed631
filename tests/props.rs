//! Property tests of the pure core. Any click — generated JSON with arbitrary strings and
//! numbers in the known fields of SPEC §3.1, wrong types now and then, and unknown fields
//! anywhere — is either rejected by `prepare` with a 400-style error (the object's index and
//! a message naming what is wrong) or renders in every payload format, single and batch,
//! into valid JSON without a panic; a click with every field well typed is never rejected;
//! the body survives the simd-json framing unchanged; and every signature `SigningKey::sign`
//! makes verifies with an HMAC-SHA256 written here from RFC 2104, sharing nothing with the
//! signer. It must not start the daemon: the properties are of the pure core.

mod common;

use base64::Engine;
use clickhook::deliver::format::{render, Format, FormatError, RenderContext};
use clickhook::deliver::sign::{signature_header, SigningKey};
use clickhook::enrich::Enricher;
use clickhook::ingest::click::{prepare, split_body, Framing, StoredFacts};
use common::hmac_sha256;
use proptest::prelude::*;
use serde_json::{Map, Value};
use std::sync::OnceLock;

const RECEIVED: &str = "2025-01-01T00:00:00.000Z";
const FORMATS: [Format; 4] = [Format::Standard, Format::Linkly, Format::Rebrandly, Format::Masiv];

fn enricher() -> &'static Enricher {
    static E: OnceLock<Enricher> = OnceLock::new();
    E.get_or_init(Enricher::new)
}

// ---- generators ----

#[derive(Clone, Copy, Debug)]
enum Kind {
    Text,
    Bool,
    Id,
    Object,
    List,
}

const LINK_FIELDS: &[(&str, Kind)] = &[
    ("workspace_id", Kind::Id),
    ("slug", Kind::Text),
    ("domain", Kind::Text),
    ("destination", Kind::Text),
    ("name", Kind::Text),
    ("created_at", Kind::Text),
    ("active_at", Kind::Text),
    ("enabled", Kind::Bool),
    ("campaign_id", Kind::Text),
    ("client_id", Kind::Text),
    ("product_id", Kind::Text),
    ("delivery_id", Kind::Text),
    ("recipient", Kind::Text),
    ("utm", Kind::Object),
    ("og", Kind::Object),
    ("rules", Kind::List),
    ("tags", Kind::List),
    ("forward_params", Kind::Bool),
    ("cloaking", Kind::Bool),
    ("block_bots", Kind::Bool),
    ("public_analytics", Kind::Bool),
    ("domain_id", Kind::Text),
];

const CLICK_FIELDS: &[(&str, Kind)] = &[
    ("ip", Kind::Text),
    ("user_agent", Kind::Text),
    ("referer", Kind::Text),
    ("country", Kind::Text),
    ("region", Kind::Text),
    ("city", Kind::Text),
    ("isp", Kind::Text),
    ("organization", Kind::Text),
    ("connection_type", Kind::Text),
    ("language", Kind::Text),
    ("destination", Kind::Text),
    ("params", Kind::Object),
];

const USER_AGENTS: &[&str] = &[
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0 Safari/537.36",
    "Mozilla/5.0 (Linux; Android 10; K) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0 Mobile Safari/537.36",
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_1 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.1 Mobile/15E148 Safari/604.1",
    "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)",
    "curl/8.4.0",
];

/// Text as clicks carry it: anything, URL-ish, date-ish, country codes, real user agents.
fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => any::<String>(),
        2 => "[a-zA-Z0-9 ./:_-]{0,24}",
        1 => "https?://[a-z]{1,8}(\\.[a-z]{2,3})?(:[0-9]{1,5})?(/[a-zA-Z0-9%._~-]{0,8}){0,3}(\\?[a-z]=[^ ]{0,5})?",
        1 => "[0-9]{4}-[0-9]{2}-[0-9]{2}([T ][0-9]{2}:[0-9]{2}:[0-9]{2}(\\.[0-9]{1,9})?(Z|[+-][0-9]{2}:[0-9]{2})?)?",
        1 => "[A-Za-z]{2}",
        1 => prop::sample::select(USER_AGENTS).prop_map(String::from),
    ]
}

fn number() -> impl Strategy<Value = Value> {
    prop_oneof![
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>()
            .prop_filter("JSON has no NaN or infinity", |f| f.is_finite())
            .prop_map(Value::from),
    ]
}

/// Any JSON value, a few levels deep.
fn any_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        number(),
        text().prop_map(Value::String),
    ];
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::vec((text(), inner), 0..4).prop_map(|kv| Value::Object(kv.into_iter().collect())),
        ]
    })
}

/// A value of the field's kind; with `typed == false`, now and then any JSON at all.
fn field_value(kind: Kind, typed: bool) -> BoxedStrategy<Value> {
    let right: BoxedStrategy<Value> = match kind {
        Kind::Text => text().prop_map(Value::String).boxed(),
        Kind::Bool => any::<bool>().prop_map(Value::Bool).boxed(),
        Kind::Id => prop_oneof![
            "[a-zA-Z0-9_-]{1,12}".prop_map(Value::String),
            any::<i64>().prop_map(Value::from),
        ]
        .boxed(),
        Kind::Object => prop::collection::vec(("[a-z_]{1,8}", any_json()), 0..4)
            .prop_map(|kv| Value::Object(kv.into_iter().collect()))
            .boxed(),
        Kind::List => prop::collection::vec(any_json(), 0..3).prop_map(Value::Array).boxed(),
    };
    if typed {
        prop_oneof![9 => right, 1 => Just(Value::Null)].boxed()
    } else {
        prop_oneof![8 => right, 1 => Just(Value::Null), 1 => any_json()].boxed()
    }
}

/// Some of `fields` with values, plus unknown fields.
fn fields(known: &'static [(&'static str, Kind)], typed: bool) -> impl Strategy<Value = Map<String, Value>> {
    let picked = prop::collection::vec(
        prop::sample::select(known).prop_flat_map(move |(k, kind)| field_value(kind, typed).prop_map(move |v| (k, v))),
        0..known.len(),
    );
    let unknown = prop::collection::vec(("x_[a-z]{1,6}", any_json()), 0..3);
    (picked, unknown).prop_map(|(picked, unknown)| {
        let mut m = Map::new();
        for (k, v) in picked {
            m.insert(k.to_string(), v);
        }
        for (k, v) in unknown {
            m.insert(k, v);
        }
        m
    })
}

fn rfc3339() -> impl Strategy<Value = String> {
    (0i64..4_102_444_800, 0u32..1_000_000_000, -1439i32..1440).prop_map(|(secs, nanos, offset_min)| {
        let offset = chrono::FixedOffset::east_opt(offset_min * 60).unwrap();
        chrono::DateTime::from_timestamp(secs, nanos)
            .unwrap()
            .with_timezone(&offset)
            .to_rfc3339()
    })
}

/// A click. `typed`: every field has its documented type, so it must be accepted.
fn click(typed: bool) -> impl Strategy<Value = Value> {
    let link_id = if typed {
        field_value(Kind::Id, true)
            .prop_filter("link.id is required", |v| !v.is_null())
            .boxed()
    } else {
        prop_oneof![8 => field_value(Kind::Id, false), 1 => text().prop_map(Value::String)].boxed()
    };
    let id = prop_oneof![
        2 => Just(None),
        1 => "[!-~]{1,128}".prop_map(|s| Some(Value::String(s))),
        1 => any::<u32>().prop_map(|n| Some(Value::from(n))),
    ];
    let timestamp = prop_oneof![2 => Just(None), 2 => rfc3339().prop_map(Some), 1 => text().prop_map(Some)];
    let metadata = prop_oneof![
        Just(None),
        field_value(Kind::Object, true).prop_map(Some),
        any_json().prop_map(Some)
    ];
    (
        link_id,
        fields(LINK_FIELDS, typed),
        fields(CLICK_FIELDS, typed),
        id,
        timestamp,
        metadata,
        prop::collection::vec(("y_[a-z]{1,6}", any_json()), 0..2),
    )
        .prop_map(move |(link_id, mut link, click, id, timestamp, metadata, top)| {
            let mut obj = Map::new();
            link.insert("id".into(), link_id);
            if let Some(id) = id {
                obj.insert("id".into(), id);
            }
            if let Some(ts) = timestamp {
                // A typed click only carries a real RFC 3339 time.
                if !typed || chrono::DateTime::parse_from_rfc3339(&ts).is_ok() {
                    obj.insert("timestamp".into(), Value::String(ts));
                }
            }
            obj.insert("link".into(), Value::Object(link));
            obj.insert("click".into(), Value::Object(click));
            if let Some(m) = metadata {
                if !typed || m.is_object() || m.is_null() {
                    obj.insert("metadata".into(), m);
                }
            }
            for (k, v) in top {
                obj.insert(k, v);
            }
            Value::Object(obj)
        })
}

// ---- checks ----

/// Renders a stored click in every format, single and batch, and checks each is JSON.
fn renders_everywhere(data: &[u8], id: &str) -> Result<(), TestCaseError> {
    for format in FORMATS {
        for batch in [false, true] {
            let ctx = RenderContext {
                endpoint_id: "props",
                webhook_id: id,
                include_ip: true,
                batch,
            };
            let events: Vec<&[u8]> = if batch { vec![data, data, data] } else { vec![data] };
            match render(format, &events, &ctx) {
                Ok(body) => {
                    let v: Value = serde_json::from_slice(&body).map_err(|e| {
                        TestCaseError::fail(format!(
                            "{format:?} batch={batch} is not JSON ({e}): {}",
                            String::from_utf8_lossy(&body)
                        ))
                    })?;
                    if format == Format::Standard && !batch {
                        prop_assert_eq!(&v["data"]["id"], &Value::String(id.into()));
                        prop_assert_eq!(&v["timestamp"], &v["data"]["timestamp"]);
                    }
                    if format == Format::Standard && batch {
                        prop_assert_eq!(v["data"].as_array().map(Vec::len), Some(3));
                    }
                }
                Err(FormatError::NoBatchShape(_)) if batch && !format.supports_batch() => {}
                Err(e) => return Err(TestCaseError::fail(format!("{format:?} batch={batch}: {e}"))),
            }
        }
    }
    without_ip_is_the_stored_click_less_its_ip(data, id)
}

/// `standard` without `include_ip` is the stored event less `click.ip`, members in order.
fn without_ip_is_the_stored_click_less_its_ip(data: &[u8], id: &str) -> Result<(), TestCaseError> {
    let ctx = RenderContext {
        endpoint_id: "props",
        webhook_id: id,
        include_ip: false,
        batch: false,
    };
    let body = render(Format::Standard, &[data], &ctx).map_err(|e| TestCaseError::fail(e.to_string()))?;
    let sent: Value = serde_json::from_slice(&body).map_err(|e| TestCaseError::fail(e.to_string()))?;
    let mut expected: Value = serde_json::from_slice(data).map_err(|e| TestCaseError::fail(e.to_string()))?;
    if let Some(click) = expected.get_mut("click").and_then(Value::as_object_mut) {
        click.shift_remove("ip");
    }
    prop_assert_eq!(
        serde_json::to_string(&sent["data"]).ok(),
        serde_json::to_string(&expected).ok(),
        "only click.ip is cut"
    );
    Ok(())
}

/// The clicks `split_body` finds in `body`, as values.
fn values_of(body: &[u8], framing: Framing) -> Result<Vec<Value>, clickhook::ingest::click::ClickError> {
    Ok(split_body(body, framing)?
        .into_iter()
        .map(|raw| serde_json::from_str(raw.get()).expect("split_body hands out valid JSON"))
        .collect())
}

fn accepted_or_rejected(value: Value, index: usize) -> Result<bool, TestCaseError> {
    match prepare(value, index, enricher(), RECEIVED) {
        Err(e) => {
            prop_assert_eq!(e.index, index, "the error names the object's index");
            prop_assert!(!e.message.is_empty(), "a rejection says why");
            Ok(false)
        }
        Ok(c) => {
            let stored: Value = serde_json::from_slice(&c.data)
                .map_err(|e| TestCaseError::fail(format!("the stored event is not JSON: {e}")))?;
            prop_assert_eq!(&stored["id"], &Value::String(c.id.clone()));
            prop_assert!(stored["timestamp"].is_string());
            prop_assert!(!c.routing.link_id.is_empty());
            prop_assert!(
                !c.id.is_empty() && c.id.len() <= 128 && c.id.bytes().all(|b| b.is_ascii_graphic()),
                "an event id must fit a webhook-id header: {:?}",
                c.id
            );
            renders_everywhere(&c.data, &c.id)?;
            // A replay routes the stored event again: it must read back what ingest routed.
            let facts = StoredFacts::of(&c.data);
            prop_assert_eq!(facts, Some(c.routing.clone()), "the stored event's routing facts");
            Ok(true)
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, max_shrink_iters: 2000, ..ProptestConfig::default() })]

    #[test]
    fn any_click_is_rejected_with_its_index_or_renders_in_every_format(value in click(false), index in 0usize..1000) {
        accepted_or_rejected(value, index)?;
    }

    #[test]
    fn a_well_typed_click_is_always_accepted(value in click(true)) {
        let shown = value.to_string();
        prop_assert!(accepted_or_rejected(value, 0)?, "a well-typed click was rejected: {}", shown);
    }

    #[test]
    fn any_json_at_all_is_rejected_or_accepted_without_a_panic(value in any_json()) {
        accepted_or_rejected(value, 7)?;
    }

    #[test]
    fn framing_hands_prepare_the_clicks_as_sent(values in prop::collection::vec(click(false), 1..4)) {
        // JSON array, single object and NDJSON all yield the objects that were sent.
        let array = serde_json::to_vec(&Value::Array(values.clone())).unwrap();
        let parsed = values_of(&array, Framing::Json).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(&parsed, &values);
        let one = serde_json::to_vec(&values[0]).unwrap();
        let parsed = values_of(&one, Framing::Json).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(&parsed, &values[..1]);
        let mut nd = Vec::new();
        for v in &values {
            nd.extend(serde_json::to_vec(v).unwrap());
            nd.extend_from_slice(b"\n\n");
        }
        let parsed = values_of(&nd, Framing::Ndjson).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(&parsed, &values);
        for (i, v) in parsed.into_iter().enumerate() {
            accepted_or_rejected(v, i)?;
        }
    }

    #[test]
    fn every_signature_verifies_with_an_independent_hmac(
        key in prop::collection::vec(any::<u8>(), 16..=64),
        id in any::<String>(),
        timestamp in any::<i64>(),
        body in prop::collection::vec(any::<u8>(), 0..2048),
    ) {
        let b64 = base64::engine::general_purpose::STANDARD;
        let secret = format!("whsec_{}", b64.encode(&key));
        let signing = SigningKey::from_secret(&secret).map_err(|e| TestCaseError::fail(e.to_string()))?;
        let mut message = format!("{id}.{timestamp}.").into_bytes();
        message.extend_from_slice(&body);
        let expected = format!("v1,{}", b64.encode(hmac_sha256(&key, &message)));
        prop_assert_eq!(signing.sign(&id, timestamp, &body), expected.clone());
        // During rotation the header carries one signature per key; each verifies alone.
        let mut other_key = key.clone();
        other_key[0] ^= 0xff;
        let other = SigningKey::from_secret(&format!("whsec_{}", b64.encode(&other_key))).unwrap();
        let header = signature_header(&[signing, other], &id, timestamp, &body);
        let parts: Vec<&str> = header.split(' ').collect();
        prop_assert_eq!(parts.len(), 2);
        prop_assert_eq!(parts[0], expected.as_str());
        prop_assert_eq!(parts[1], format!("v1,{}", b64.encode(hmac_sha256(&other_key, &message))));
    }

    #[test]
    fn keys_outside_16_to_64_bytes_are_refused(len in prop_oneof![0usize..16, 65usize..200]) {
        let secret = format!("whsec_{}", base64::engine::general_purpose::STANDARD.encode(vec![7u8; len]));
        prop_assert!(SigningKey::from_secret(&secret).is_err());
    }
}
