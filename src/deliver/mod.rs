//! Delivery: everything between a pending entry in the log and a 2xx from an endpoint.
//!
//! The [`Dispatcher`] spreads endpoints over [`EndpointShard`]s — one OS thread with its
//! own single-threaded runtime each, so delivery never competes with ingest's runtime —
//! and runs one worker per endpoint there. Submodules: `format` renders bodies, `sign`
//! signs them, `send` performs one attempt, `slots` shares a receiver among a thread's
//! endpoints, `policy` holds retry/breaker/rate-limit state, `worker` drives an
//! endpoint's queue. This layer must not route or accept clicks; it only drains queues
//! the log already holds.

pub mod format;
pub mod policy;
pub mod send;
pub mod sign;
pub mod slots;
mod worker;

use crate::endpoints::{EndpointSettings, LiveEndpoint};
use crate::log::ClickLog;
use policy::RetrySchedule;
use send::AddressPolicy;
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;

#[derive(Debug, thiserror::Error)]
pub enum DeliverError {
    #[error("cannot start delivery shard {0}: {1}")]
    Shard(usize, std::io::Error),
}

/// What a worker reports upward because it concerns more than its own queue: the
/// registry disables endpoints, and operational events tell the operator.
#[derive(Debug)]
pub enum WorkerEvent {
    /// The endpoint answered 410 Gone: disable it.
    Gone { endpoint: String },
    /// `failing_after` consecutive attempts failed.
    Failing {
        endpoint: String,
        consecutive: u32,
        last_error: Option<String>,
    },
    /// Failing without a success for `disable_after`: disable it.
    FailingTooLong { endpoint: String },
    /// A success after it was reported failing.
    Recovered { endpoint: String },
    /// Events exhausted their retries.
    DeadLetter {
        endpoint: String,
        event_ids: Vec<String>,
        last_error: Option<String>,
    },
}

impl WorkerEvent {
    /// The endpoint the report is about.
    pub fn endpoint(&self) -> &str {
        match self {
            WorkerEvent::Gone { endpoint }
            | WorkerEvent::Failing { endpoint, .. }
            | WorkerEvent::FailingTooLong { endpoint }
            | WorkerEvent::Recovered { endpoint }
            | WorkerEvent::DeadLetter { endpoint, .. } => endpoint,
        }
    }
}

/// Settings shared by every worker.
#[derive(Clone)]
pub struct DeliveryPolicy {
    pub schedule: Arc<RetrySchedule>,
    pub breaker_failures: u32,
    pub breaker_cooldown: Duration,
    pub addresses: AddressPolicy,
    /// Outbound connections across all endpoints.
    pub connections: send::ConnectionBudget,
    /// Requests in flight to one receiver from one delivery thread's endpoints.
    pub per_receiver: usize,
    /// Consecutive failures that make an endpoint "failing" (an operational event).
    pub failing_after: u32,
    /// How long an endpoint may fail without a success before it is disabled.
    pub disable_after: Duration,
}

/// One delivery thread with its own current-thread runtime.
pub struct EndpointShard {
    handle: tokio::runtime::Handle,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl EndpointShard {
    fn start(index: usize) -> Result<Self, DeliverError> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| DeliverError::Shard(index, e))?;
        let handle = runtime.handle().clone();
        let (stop, stopped) = oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name(format!("clickhook-shard-{index}"))
            .spawn(move || {
                // The runtime drives the workers spawned onto it until told to stop.
                runtime.block_on(async {
                    let _ = stopped.await;
                });
            })
            .map_err(|e| DeliverError::Shard(index, e))?;
        Ok(EndpointShard {
            handle,
            stop: Some(stop),
            thread: Some(thread),
        })
    }
}

impl Drop for EndpointShard {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

pub struct Dispatcher {
    shards: Vec<EndpointShard>,
    log: Arc<dyn ClickLog>,
    policy: DeliveryPolicy,
    shutdown: watch::Receiver<bool>,
    events: mpsc::UnboundedSender<WorkerEvent>,
}

impl Dispatcher {
    pub fn new(
        shard_count: usize,
        log: Arc<dyn ClickLog>,
        policy: DeliveryPolicy,
        shutdown: watch::Receiver<bool>,
        events: mpsc::UnboundedSender<WorkerEvent>,
    ) -> Result<Self, DeliverError> {
        let shards = (0..shard_count.max(1))
            .map(EndpointShard::start)
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Dispatcher {
            shards,
            log,
            policy,
            shutdown,
            events,
        })
    }

    /// Starts the endpoint's worker on its shard. The worker runs until the endpoint is
    /// stopping or the daemon shuts down, and finishes its in-flight attempts first.
    pub fn start(&self, endpoint: Arc<LiveEndpoint>) -> JoinHandle<()> {
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        endpoint.id.hash(&mut hasher);
        let shard = &self.shards[(hasher.finish() % self.shards.len() as u64) as usize];
        let ctx = worker::WorkerContext {
            log: self.log.clone(),
            policy: self.policy.clone(),
            shutdown: self.shutdown.clone(),
            events: self.events.clone(),
        };
        shard.handle.spawn(worker::run(endpoint, ctx))
    }
}

/// Signs `body` now (Standard Webhooks wants the send time) and sends it as one attempt,
/// in `slot` (the receiver's slot the caller took on a shared client); without one, a
/// shared client waits for a slot itself.
pub async fn attempt(
    client: &send::EndpointClient,
    settings: &EndpointSettings,
    webhook_id: &str,
    body: bytes::Bytes,
    slot: Option<send::OriginSlot>,
) -> send::AttemptResult {
    use hyper::header::{HeaderName, HeaderValue};
    let timestamp = chrono::Utc::now().timestamp();
    // The keys that sign are those of the signed time: the same clock read.
    let keys = settings.signing_keys(u64::try_from(timestamp).unwrap_or(0).saturating_mul(1000));
    let mut signature = sign::signature_header(keys, webhook_id, timestamp, &body);
    if let Some(key) = &settings.asymmetric {
        if !signature.is_empty() {
            signature.push(' ');
        }
        signature.push_str(&key.sign(webhook_id, timestamp, &body));
    }
    let mut headers = Vec::with_capacity(3);
    for (name, value) in [
        ("webhook-id", webhook_id),
        ("webhook-timestamp", &timestamp.to_string()),
        ("webhook-signature", &signature),
    ] {
        // Ids are visible ASCII (checked at ingest), so these values are always valid.
        if let Ok(v) = HeaderValue::from_str(value) {
            headers.push((HeaderName::from_static(name), v));
        }
    }
    let request = send::build_request(&settings.url, &settings.headers, &headers, body);
    client.send(request, settings.timeout, slot).await
}
