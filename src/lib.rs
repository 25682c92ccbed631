//! clickhook turns the clicks of a URL shortener into signed, retried webhooks.
//!
//! The data flows ingest → log → route → deliver (format, sign, send): [`ingest`]
//! validates and enriches a click and appends it to the durable [`log`] with the endpoints
//! [`route`] chose; [`deliver`] drains each endpoint's queue. [`config`], [`endpoints`],
//! [`admin`] and [`metrics`] stand beside that flow, and [`said_seldom`] keeps its warnings
//! from flooding the journal; [`server`] wires it all together and
//! [`client`] is the reference ingest client behind `clickhook send`. The library must not
//! read the process's arguments or environment (systemd's notify socket aside, which
//! [`server`] tells of readiness and the watchdog when it is set), install signal
//! handlers or exit: that is the binary's edge (`main.rs`), so tests and embedders drive
//! the whole daemon on port 0.

pub mod admin;
pub mod client;
pub mod config;
pub mod deliver;
pub mod endpoints;
pub mod enrich;
pub mod ingest;
pub mod log;
pub mod metrics;
pub mod route;
pub mod said_seldom;
pub mod server;
#[cfg(test)]
mod test_util;

pub use server::{bind, run, Control, Listeners};
