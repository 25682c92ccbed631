//! Load and fault generator for clickhook: starts the daemon (or attaches to a running one),
//! runs a scripted webhook sink on loopback, drives clicks in over HTTP or the Unix socket,
//! and verifies that every acknowledged click reached every endpoint it routes to, with a
//! valid Standard Webhooks signature. It owns nothing of the daemon but its command line,
//! config keys and wire formats (SPEC §1–§4); it must never target anything but loopback,
//! and every loop in it is bounded in count and time.
//!
//! # Library use
//!
//! ```no_run
//! use clickhook_loadtest::{run, Scenario, ScenarioOptions};
//!
//! let report = run(ScenarioOptions {
//!     clicks: Some(2_000),
//!     ..ScenarioOptions::new(Scenario::Flaky, env!("CARGO_MANIFEST_DIR").to_string() + "/target/release/clickhook")
//! })?;
//! assert!(report.passed, "{}", report.render_text());
//! assert_eq!(report.lost, 0);
//! # Ok::<(), clickhook_loadtest::Error>(())
//! ```
//!
//! - [`run`]`(`[`ScenarioOptions`]`) -> Result<`[`Report`]`, `[`Error`]`>` builds its own
//!   two-thread tokio runtime: call it from a plain `#[test]` (an integration test would pass
//!   `env!("CARGO_BIN_EXE_clickhook")` as `daemon_bin`).
//! - [`run_async`] is the same on the caller's runtime, for `#[tokio::test(flavor = "multi_thread")]`.
//! - `Err` means the run could not happen (binary missing, daemon never ready, bad options).
//!   A run that happened returns `Ok`, and its [`Report`] says whether it passed:
//!   [`Report::passed`] is false when nothing was acknowledged, anything acknowledged was
//!   lost, or any signature or timestamp was bad; [`Report::problems`] lists warnings that
//!   do not fail it (duplicates are counted, not failed: delivery is at least once).
//!
//! The [`sink`] and [`signature`] modules stand on their own, for tests that need a
//! scripted, verifying webhook receiver without a whole scenario:
//! [`Sink::start`]`(`[`SinkOptions`]`)`, then [`Sink::url`], [`Sink::set_behavior`],
//! [`Sink::set_down`], [`Sink::recorder`] and [`Sink::stats`].

pub mod baseline;
pub mod clicks;
pub mod clock;
pub mod daemon;
pub mod driver;
mod error;
pub mod http;
pub mod procstat;
pub mod report;
mod run;
pub mod scenario;
pub mod signature;
pub mod sink;
pub mod verify;

pub use clock::Clock;
pub use error::Error;
pub use report::Report;
pub use run::{run, run_async, Attach, ScenarioOptions, SinkScript, Transport};
pub use scenario::Scenario;
pub use sink::{Behavior, Mode, Sink, SinkEndpoint, SinkOptions};
