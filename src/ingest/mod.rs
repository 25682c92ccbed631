//! Ingest: the front door for clicks, over HTTP (`POST /v1/clicks`) and a Unix socket.
//! It owns validation, enrichment and routing of each click on arrival, and the rule that
//! nothing is acknowledged before the log says it is durable. It must not deliver or hold
//! clicks in memory past their acknowledgement: after the ack, the log has them.

pub mod adapters;
pub mod click;
pub mod http;
pub mod unix;

use crate::endpoints::EndpointRegistry;
use crate::enrich::Enricher;
use crate::log::{AppendOutcome, ClickLog, LogError, NewEvent, Ticket};
use crate::metrics::{self, Source};
use click::PreparedClick;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Appends waiting for durability at most, across all connections: past this, ingest
/// waits (backpressure) instead of queueing without bound.
const MAX_APPENDS_IN_FLIGHT: usize = 1024;

/// Bytes a client has begun (a request body, a socket line past one read) must all arrive
/// within this: a client trickling them would otherwise hold what they take for ever.
const FINISH_WITHIN: std::time::Duration = std::time::Duration::from_secs(30);

/// Bytes a listener's connections may hold at once: each is bounded by `max_body`, but
/// thousands of connections of 8 MiB each would be tens of GiB. Bytes being read (bodies,
/// socket lines past one read) are taken as they arrive, so a client holds only what it
/// has sent, and are never waited for: what does not fit is refused (backpressure), so
/// that requests half read never wait on each other. Bytes already read (a socket read's
/// whole lines) may wait with [`ByteBudget::wait_for`], as they hold nothing else.
#[derive(Clone)]
pub struct ByteBudget {
    bytes: Arc<Semaphore>,
    size: usize,
}

impl ByteBudget {
    /// 128 MiB, and at least `max_body`: a largest body fits whenever nothing else holds
    /// the budget. `max_body` is less than 4 GiB (the config says so), as amounts taken
    /// from a semaphore are.
    pub fn for_max_body(max_body: usize) -> Self {
        ByteBudget::of((128usize << 20).max(max_body).min(u32::MAX as usize))
    }

    pub fn of(size: usize) -> Self {
        ByteBudget {
            bytes: Arc::new(Semaphore::new(size)),
            size,
        }
    }

    pub fn size(&self) -> usize {
        self.size
    }

    pub fn available(&self) -> usize {
        self.bytes.available_permits()
    }

    /// Waits until `n` bytes are free, and takes them: all of the budget when `n` is more.
    /// `None` only once the budget is closed, which it never is.
    pub async fn wait_for(&self, n: usize) -> Option<OwnedSemaphorePermit> {
        let n = u32::try_from(n.min(self.size)).unwrap_or(u32::MAX);
        self.bytes.clone().acquire_many_owned(n).await.ok()
    }

    /// Adds `n` bytes to what `held` holds; false, taking nothing, if they do not fit.
    pub fn take(&self, held: &mut Option<OwnedSemaphorePermit>, n: usize) -> bool {
        let Ok(n) = u32::try_from(n) else {
            return false;
        };
        let Ok(taken) = self.bytes.clone().try_acquire_many_owned(n) else {
            return false;
        };
        match held {
            Some(permit) => permit.merge(taken),
            None => *held = Some(taken),
        }
        true
    }
}

/// How a failed write's refusal begins (a socket line's reason, a 503's error).
pub const STORAGE_FAILED: &str = "storage failed";
/// The refusal of clicks whose append's task ended without an answer.
pub const APPEND_TASK_FAILED: &str = "the append's task failed";
/// Refusals answered as unavailable that come after the clicks went to the log: part of
/// them may be stored, so a client must not send them again.
pub const MAY_BE_STORED: [&str; 2] = [STORAGE_FAILED, APPEND_TASK_FAILED];

#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    /// Nothing of the clicks was stored: they may be sent again.
    #[error("{0}")]
    Unavailable(&'static str),
    #[error("{}: {}", STORAGE_FAILED, .0)]
    Storage(#[from] LogError),
    /// The clicks went to the log and their append's task ended without an answer: they
    /// may be stored.
    #[error("{}", APPEND_TASK_FAILED)]
    AppendTaskFailed,
}

impl IngestError {
    /// The `reason` label of `clickhook_ingest_rejected_total` for clicks refused so.
    pub fn metric_reason(&self) -> &'static str {
        match self {
            IngestError::Unavailable(_) => "unavailable",
            IngestError::Storage(_) | IngestError::AppendTaskFailed => "storage",
        }
    }
}

/// Whether ingest may accept clicks now.
#[derive(Debug, Default)]
pub struct IngestGate {
    pub shutting_down: AtomicBool,
    pub over_budget: AtomicBool,
    /// The filesystem holding the log has less than `storage.min_free` free.
    pub low_on_disk: AtomicBool,
}

impl IngestGate {
    pub fn check(&self) -> Result<(), IngestError> {
        if self.shutting_down.load(Ordering::SeqCst) {
            return Err(IngestError::Unavailable("shutting down"));
        }
        if self.over_budget.load(Ordering::Relaxed) {
            return Err(IngestError::Unavailable(
                "storage is over storage.max_bytes; retry later",
            ));
        }
        if self.low_on_disk.load(Ordering::Relaxed) {
            return Err(IngestError::Unavailable(
                "the disk holding the log has less than storage.min_free free; retry later",
            ));
        }
        Ok(())
    }
}

pub struct Ingestor {
    log: Arc<dyn ClickLog>,
    endpoints: Arc<EndpointRegistry>,
    pub enricher: Arc<Enricher>,
    pub gate: Arc<IngestGate>,
    in_flight: Arc<Semaphore>,
}

/// An append submitted to the log, not yet known durable.
pub struct Submitted {
    /// Taken by [`Submitted::wait`] once the log answered; still here when the waiter went
    /// away first, and then seen through by [`Drop`].
    in_flight: Option<InFlight>,
    ids: Vec<String>,
    source: Source,
}

/// What an append still needs once the log has answered: the endpoints to wake.
struct InFlight {
    ticket: Ticket<Vec<AppendOutcome>>,
    routes: Vec<Vec<u32>>,
    endpoints: Arc<EndpointRegistry>,
    _permit: OwnedSemaphorePermit,
}

impl InFlight {
    /// Once the append is durable: tells each endpoint how many of the stored clicks wait
    /// for it, and counts them accepted.
    fn finish(self, outcomes: &[AppendOutcome], source: Source, clicks: usize) {
        let mut woken: HashMap<u32, i64> = HashMap::new();
        for (outcome, endpoints) in outcomes.iter().zip(self.routes) {
            if let AppendOutcome::Stored(_) = outcome {
                for key in endpoints {
                    *woken.entry(key).or_default() += 1;
                }
            }
        }
        for (key, n) in woken {
            self.endpoints.notify_new(key, n);
        }
        metrics::ingest_accepted(source, clicks as u64);
    }
}

impl Drop for Submitted {
    /// A waiter that went away (an HTTP client that hung up, a socket that closed) does
    /// not stop the append, which the log carries on with. Its clicks are stored all the
    /// same, and a worker learns of new clicks only from a wake-up, so without this one
    /// they would wait for the endpoint's next click or a restart.
    fn drop(&mut self) {
        let Some(mut in_flight) = self.in_flight.take() else {
            return;
        };
        let (source, clicks) = (self.source, self.ids.len());
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                if let Ok(Ok(outcomes)) = (&mut in_flight.ticket).await {
                    in_flight.finish(&outcomes, source, clicks);
                }
            });
        }
    }
}

impl Submitted {
    /// Waits until the submission is durable, wakes the endpoints it was routed to, and
    /// returns the event ids in input order.
    pub async fn wait(mut self) -> Result<Vec<String>, IngestError> {
        // Only this and `Drop` take `in_flight`, each once, and both take `self`.
        let Some(in_flight) = self.in_flight.as_mut() else {
            return Err(IngestError::Storage(LogError::Closed));
        };
        let answer = (&mut in_flight.ticket).await;
        // Taken only now: a waiter dropped during the await leaves the wake-up to `Drop`.
        let in_flight = self.in_flight.take();
        let outcomes = answer.map_err(|_| LogError::Closed)??;
        let ids = std::mem::take(&mut self.ids);
        if let Some(in_flight) = in_flight {
            in_flight.finish(&outcomes, self.source, ids.len());
        }
        Ok(ids)
    }
}

impl Ingestor {
    /// Appends submitted and not yet durable.
    #[cfg(test)]
    pub(crate) fn appends_in_flight(&self) -> usize {
        MAX_APPENDS_IN_FLIGHT - self.in_flight.available_permits()
    }

    pub fn new(
        log: Arc<dyn ClickLog>,
        endpoints: Arc<EndpointRegistry>,
        enricher: Arc<Enricher>,
        gate: Arc<IngestGate>,
    ) -> Self {
        Ingestor {
            log,
            endpoints,
            enricher,
            gate,
            in_flight: Arc::new(Semaphore::new(MAX_APPENDS_IN_FLIGHT)),
        }
    }

    /// Routes the clicks and hands them to the log in this order. Await the result with
    /// [`Submitted::wait`]; submissions are appended in the order they were made.
    pub async fn submit(&self, clicks: Vec<PreparedClick>, source: Source) -> Result<Submitted, IngestError> {
        self.gate.check()?;
        let permit = self
            .in_flight
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| IngestError::Unavailable("shutting down"))?;
        let mut ids = Vec::with_capacity(clicks.len());
        let mut routes = Vec::with_capacity(clicks.len());
        let mut events = Vec::with_capacity(clicks.len());
        let routing = self.endpoints.routing();
        for c in clicks {
            let mut endpoints = Vec::new();
            routing.route(c.routing.facts(), &mut endpoints);
            ids.push(c.id.clone());
            routes.push(endpoints.clone());
            events.push(NewEvent {
                id: c.id,
                client_id: c.client_id,
                data: c.data,
                endpoints,
            });
        }
        let ticket = self.log.append(events);
        drop(routing);
        Ok(Submitted {
            in_flight: Some(InFlight {
                ticket,
                routes,
                endpoints: self.endpoints.clone(),
                _permit: permit,
            }),
            ids,
            source,
        })
    }
}

/// An ingestor on a real log in `dir`, routing to no endpoint; the sender keeps the
/// registry's workers from seeing a shutdown.
#[cfg(test)]
pub(crate) fn ingestor_in(
    dir: &std::path::Path,
) -> (
    Arc<crate::log::SledLog>,
    Arc<Ingestor>,
    tokio::sync::watch::Sender<bool>,
) {
    let (log, registry, running) = crate::endpoints::registry_in(dir);
    let ingestor = Arc::new(Ingestor::new(
        log.clone(),
        registry,
        Arc::new(Enricher::new()),
        Arc::new(IngestGate::default()),
    ));
    (log, ingestor, running)
}

/// A click padded to exactly `len` bytes of JSON, for tests of long bodies and lines.
#[cfg(test)]
pub(crate) fn padded_click(len: usize) -> Vec<u8> {
    let frame = br#"{"link":{"id":"l"},"metadata":{"pad":""}}"#;
    let mut click = frame[..frame.len() - 3].to_vec();
    click.resize(len - 3, b'.');
    click.extend_from_slice(b"\"}}");
    click
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Clicks refused after they went to the log count as storage failures, the rest that
    /// stored nothing as unavailable.
    #[test]
    fn refusals_that_may_have_stored_count_under_storage() {
        assert_eq!(IngestError::AppendTaskFailed.metric_reason(), "storage");
        assert_eq!(
            IngestError::Storage(LogError::Storage("disk".into())).metric_reason(),
            "storage"
        );
        assert_eq!(IngestError::Unavailable("shutting down").metric_reason(), "unavailable");
    }
}
