//! Payload formats: turns stored click events into the request body an endpoint expects.
//!
//! Owns the wire shape of every `format` of SPEC §4.2 (`standard`, `linkly`, `rebrandly`,
//! `masiv`) and which of them have a batch shape. It is pure: it reads the stored event
//! JSON (the `data` object of the `standard` format) and returns bytes. It must not sign,
//! send, or look at endpoint state beyond the [`RenderContext`] it is handed.

mod fields;
mod linkly;
mod masiv;
mod rebrandly;
mod standard;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The payload shape an endpoint receives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, Hash)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    #[default]
    Standard,
    Linkly,
    Rebrandly,
    Masiv,
    /// Operational events: the stored JSON is the whole body. Internal, not configurable.
    #[serde(skip)]
    Operational,
}

impl Format {
    /// Whether the format has a shape that carries several events in one request.
    pub fn supports_batch(self) -> bool {
        matches!(self, Format::Standard | Format::Rebrandly)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Format::Standard => "standard",
            Format::Linkly => "linkly",
            Format::Rebrandly => "rebrandly",
            Format::Masiv => "masiv",
            Format::Operational => "operational",
        }
    }
}

/// What a renderer may know about the request it is building.
#[derive(Debug, Clone, Copy)]
pub struct RenderContext<'a> {
    /// The endpoint's id (Rebrandly's `key` names it).
    pub endpoint_id: &'a str,
    /// The `webhook-id` header of this request: the event id, or the batch id.
    pub webhook_id: &'a str,
    /// Whether the visitor IP may leave (`include_ip`); never honoured by `linkly`.
    pub include_ip: bool,
    /// Whether the request has the batch shape (`batch_max > 1`), even with one event.
    pub batch: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    #[error("stored event is not valid JSON: {0}")]
    StoredEvent(#[from] serde_json::Error),
    #[error("format {0} has no batch shape")]
    NoBatchShape(&'static str),
}

/// In the crate's own tests, an event holding this makes every renderer panic, standing
/// in for a renderer's bug that the worker must survive.
#[cfg(test)]
pub(crate) const PANICS: &[u8] = b"renderer-panics-here";

/// Renders `events` (each the stored `data` JSON of one click) as one request body.
pub fn render(format: Format, events: &[&[u8]], ctx: &RenderContext<'_>) -> Result<Vec<u8>, FormatError> {
    if ctx.batch && !format.supports_batch() {
        return Err(FormatError::NoBatchShape(format.as_str()));
    }
    #[cfg(test)]
    if events.iter().any(|e| e.windows(PANICS.len()).any(|w| w == PANICS)) {
        panic!("a test's event that no renderer takes");
    }
    let renderer: fn(&[Value], &RenderContext<'_>) -> Value = match format {
        // The stored event already is the standard `data` object: splice, do not parse
        // (past finding the click's `ip` when it must not go out).
        Format::Standard => return Ok(standard::render(events, ctx)?),
        Format::Operational => return Ok(events.first().map(|e| e.to_vec()).unwrap_or_default()),
        Format::Linkly => linkly::render,
        Format::Rebrandly => rebrandly::render,
        Format::Masiv => masiv::render,
    };
    let parsed = events
        .iter()
        .map(|raw| serde_json::from_slice::<Value>(raw))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(serde_json::to_vec(&renderer(&parsed, ctx))?)
}
