//! The library's error type. It owns the wording of every failure `run` can return and must
//! not decide policy: whether a lost click is a failure is the report's call, not an error.

use std::path::PathBuf;

/// Why a load-test run could not produce a [`crate::Report`]. Each message carries its
/// cause in full, so the variants keep no `source` chain to print it twice.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The options contradict themselves or name something this tool refuses (a non-loopback target).
    #[error("bad options: {0}")]
    Options(String),
    /// A webhook secret that is not `whsec_<base64>`.
    #[error("bad secret: {0}")]
    Secret(String),
    /// The daemon binary is missing or cannot be executed.
    #[error("cannot start {}: {error}", bin.display())]
    Spawn { bin: PathBuf, error: std::io::Error },
    /// The daemon started but never printed its `ready …` line, or died before it did.
    #[error("daemon not ready: {reason}\n--- last daemon stderr lines ---\n{stderr_tail}")]
    NotReady { reason: String, stderr_tail: String },
    /// The admin API refused to create or delete an endpoint (attached mode).
    #[error("admin API: {0}")]
    Admin(String),
    /// The sink could not bind or rebind its listener.
    #[error("sink: {0}")]
    Sink(String),
    /// Any other I/O failure, with what was being done.
    #[error("{context}: {error}")]
    Io { context: String, error: std::io::Error },
}

impl Error {
    pub(crate) fn io(context: impl Into<String>, error: std::io::Error) -> Self {
        Error::Io {
            context: context.into(),
            error,
        }
    }
}
