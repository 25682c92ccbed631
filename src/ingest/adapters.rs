//! Input adapters: maps the webhook payloads of Linkly, Rebrandly and Masiv Links
//! (`POST /v1/clicks?format=…`) into clickhook's click model, so a shortener that already
//! emits one of them gains durability with no code. Pure mapping; it must not validate
//! beyond what mapping needs (ingest validates the result) nor store anything.

use crate::deliver::format::Format;
use serde_json::Value;

#[derive(Debug, thiserror::Error)]
pub enum AdapterError {
    #[error("{field}: {why}")]
    Field { field: String, why: String },
}

/// Maps one product payload into one or more clicks of the model of SPEC §3.1.
pub fn adapt(format: Format, payload: Value) -> Result<Vec<Value>, AdapterError> {
    match format {
        Format::Standard => Ok(vec![payload]),
        _ => Err(AdapterError::Field {
            field: "format".into(),
            why: format!("adapter for {} not built yet", format.as_str()),
        }),
    }
}
