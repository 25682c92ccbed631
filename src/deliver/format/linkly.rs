//! The `linkly` format (SPEC §4.2): the product's own webhook payload, field for field.
//! Pure mapping from the stored click JSON; it must not sign or send.

use super::RenderContext;
use serde_json::Value;

pub fn render(events: &[Value], _ctx: &RenderContext<'_>) -> Value {
    Value::Array(events.to_vec())
}
