//! The durable click log: the one place clicks and their delivery state live.
//!
//! It owns the [`ClickLog`] seam — append with group commit, per-endpoint pending queues,
//! retry state, dead letters, replay, and retention — and its sled implementation
//! ([`SledLog`]), where one writer thread batches every write and flushes once per batch.
//! A clustered store slots in beside it by implementing the same trait. It must not parse
//! clicks, route, or speak HTTP: events arrive as opaque JSON bytes with their endpoint
//! keys already chosen.

mod fresh;
mod keys;
mod segments;
mod sled_log;

pub use sled_log::{SledLog, SledOptions};

/// Options for [`SledLog::open`].
pub fn sled_log_options(
    fsync: crate::config::FsyncMode,
    fsync_interval: std::time::Duration,
    cache_capacity: u64,
) -> SledOptions {
    SledOptions {
        fsync,
        fsync_interval,
        cache_capacity,
        segment_bytes: segments::SEGMENT_BYTES,
        fresh_listed_max: sled_log::FRESH_LISTED_MAX,
        fresh_repeat_max: sled_log::FRESH_REPEAT_MAX,
    }
}

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

/// A log position; assigned in append order, never reused.
pub type Seq = u64;
/// A compact, persistent number for an endpoint id, used in storage keys.
pub type EndpointKey = u32;

#[derive(Debug, Clone, thiserror::Error)]
pub enum LogError {
    #[error("storage error: {0}")]
    Storage(String),
    #[error("the log is closed")]
    Closed,
    #[error("stored record is corrupt: {0}")]
    Corrupt(String),
}

impl From<sled::Error> for LogError {
    fn from(e: sled::Error) -> Self {
        LogError::Storage(e.to_string())
    }
}

/// One click to append, already rendered to its stored JSON and routed.
#[derive(Debug, Clone)]
pub struct NewEvent {
    /// The event id (the client's `id` when given).
    pub id: String,
    /// Whether `id` came from the client: such ids are deduplicated within retention.
    pub client_id: bool,
    /// The stored event JSON (the `standard` format's `data` object).
    pub data: Vec<u8>,
    /// Endpoints the click was routed to; each gets a pending entry.
    pub endpoints: Vec<EndpointKey>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AppendOutcome {
    /// Newly stored at this position.
    Stored(Seq),
    /// A client id already stored within retention: acknowledged, not delivered again.
    Duplicate,
}

/// A stored event as delivery reads it.
#[derive(Debug, Clone)]
pub struct StoredEvent {
    pub seq: Seq,
    /// When clickhook accepted the click, in Unix milliseconds.
    pub accepted_ms: u64,
    pub data: Bytes,
}

/// One event waiting for one endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pending {
    pub seq: Seq,
    /// Failed attempts so far.
    pub attempts: u32,
    /// Not before this Unix millisecond (0: now).
    pub due_ms: u64,
    /// The batch this event was last sent in (0: none), so a retried batch keeps its id.
    pub batch: u64,
}

impl Pending {
    pub fn fresh(seq: Seq) -> Self {
        Pending {
            seq,
            attempts: 0,
            due_ms: 0,
            batch: 0,
        }
    }
}

/// An event that exhausted its retries at one endpoint.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DeadLetter {
    pub seq: Seq,
    pub event_id: String,
    pub attempts: u32,
    pub dead_at_ms: u64,
    pub accepted_ms: u64,
    pub last_status: Option<u16>,
    pub last_error: Option<String>,
}

/// A future that resolves once the log has done what was asked (durably, when asked).
pub type Ticket<T> = oneshot::Receiver<Result<T, LogError>>;

/// The storage seam. Reads are synchronous: the latest events and queue entries come from
/// memory, older ones from sled's page cache and a `pread` of a segment file, which the
/// kernel's page cache usually serves; a disk that answers slowly holds up the reading
/// thread (a delivery thread, with its other endpoints) for as long. Writes are queued to
/// the log's writer and resolve through a [`Ticket`] or not at all, as noted.
pub trait ClickLog: Send + Sync + 'static {
    /// Appends events; the ticket resolves once they are durable per `storage.fsync`,
    /// with one outcome per event in input order.
    fn append(&self, events: Vec<NewEvent>) -> Ticket<Vec<AppendOutcome>>;

    fn event(&self, seq: Seq) -> Result<Option<StoredEvent>, LogError>;

    /// Pending entries of one endpoint with `seq > after`, in seq order.
    fn pending_after(&self, endpoint: EndpointKey, after: Option<Seq>, limit: usize) -> Result<Vec<Pending>, LogError>;

    fn count_pending(&self, endpoint: EndpointKey) -> Result<u64, LogError>;

    /// Delivery succeeded: the entries leave the queue. Not awaited: losing this in a
    /// crash only means a duplicate delivery, which at-least-once allows.
    fn delivered(&self, endpoint: EndpointKey, seqs: &[Seq]);

    /// Records new retry state (attempts, due time, batch) for entries still pending.
    fn reschedule(&self, endpoint: EndpointKey, entries: &[Pending]);

    /// Moves entries from the queue to the endpoint's dead letters.
    fn bury(&self, endpoint: EndpointKey, letters: Vec<DeadLetter>);

    fn dead_letters(&self, endpoint: EndpointKey, limit: usize) -> Result<Vec<DeadLetter>, LogError>;

    fn count_dead(&self, endpoint: EndpointKey) -> Result<u64, LogError>;

    /// Moves every dead letter of the endpoint back to its queue; resolves to how many.
    fn revive_dead(&self, endpoint: EndpointKey) -> Ticket<usize>;

    /// Queues again every retained event accepted in `[since_ms, until_ms)` whose stored JSON
    /// `wanted` admits (the caller knows which clicks the endpoint takes; the log does not),
    /// and every one it cannot read, for delivery to bury as a dead letter that says why.
    fn replay_window(
        &self,
        endpoint: EndpointKey,
        since_ms: u64,
        until_ms: u64,
        wanted: &dyn Fn(&[u8]) -> bool,
    ) -> Ticket<usize>;

    /// The persistent key of an endpoint id, assigned on first use.
    fn endpoint_key(&self, endpoint_id: &str) -> Result<EndpointKey, LogError>;

    /// Drops an endpoint's queue and dead letters (the endpoint was deleted).
    fn forget_endpoint(&self, endpoint: EndpointKey) -> Ticket<()>;

    /// Small durable settings (generated secrets, API-created endpoints), by name.
    fn get_setting(&self, name: &str) -> Result<Option<Vec<u8>>, LogError>;
    fn put_setting(&self, name: &str, value: Option<Vec<u8>>) -> Ticket<()>;
    fn settings_with_prefix(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, LogError>;

    /// Removes delivered events older than `retention_ms` and expired client ids;
    /// resolves to how many events went.
    fn prune(&self, now_ms: u64, retention_ms: u64) -> Ticket<u64>;

    /// Retained events (the `clickhook_log_events` gauge).
    fn event_count(&self) -> u64;

    /// Why the log's last write or flush failed, while no write has succeeded since: a
    /// full, read-only or failing disk. `/readyz` answers 503 with it.
    fn write_failure(&self) -> Option<String>;

    /// Why the store takes no more writes until it is opened again, whatever the disk
    /// does now (sled 0.34 after a failed write of its own); `None` while it may write.
    /// May write to find out: call it off the async workers.
    fn needs_reopen(&self) -> Option<String>;

    /// Flushes and stops the writer; later writes fail with [`LogError::Closed`].
    fn close(&self) -> Ticket<()>;
}

/// Milliseconds since the Unix epoch, the log's clock.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
