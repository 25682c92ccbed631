//! The live set of webhook endpoints: the config file's and the admin API's, each with
//! its persistent storage key, resolved secrets, prebuilt request headers, metrics and
//! delivery worker. It owns endpoint lifecycle (start, change, disable, stop) and the
//! routing index swapped in on every change. It must not send requests or touch queues
//! directly: workers do the first, the log the second.

use crate::config::{not_reserved, validate_endpoint, validate_user_endpoint, EndpointConfig};
use crate::deliver::policy::CircuitState;
use crate::deliver::send::Outcome;
use crate::deliver::sign::{generate_secret, AsymmetricKey, SigningKey};
use crate::deliver::Dispatcher;
use crate::ingest::click::StoredFacts;
use crate::log::{ClickLog, EndpointKey, LogError};
use crate::metrics::EndpointMetrics;
use crate::route::{ClickFacts, RoutingIndex};
use arc_swap::ArcSwap;
use hyper::header::{HeaderName, HeaderValue};
use hyper::Uri;
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::task::JoinHandle;

#[derive(Debug, thiserror::Error)]
pub enum EndpointError {
    #[error("{field}: {why}")]
    Invalid { field: String, why: String },
    #[error("no endpoint {0:?}")]
    NotFound(String),
    #[error("endpoint {0:?} exists already")]
    Exists(String),
    #[error("endpoint {0:?} is defined in the config file; change it there")]
    FromConfig(String),
    #[error(transparent)]
    Log(#[from] LogError),
}

/// Where an endpoint was defined.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EndpointSource {
    Config,
    Api,
}

/// `[delivery]` values an endpoint falls back to.
#[derive(Debug, Clone, Copy)]
pub struct EndpointDefaults {
    pub timeout: Duration,
    pub max_concurrency: usize,
}

/// Everything a worker needs per attempt, derived once per change of the endpoint.
#[derive(Debug)]
pub struct EndpointSettings {
    pub config: EndpointConfig,
    pub url: Uri,
    /// Fixed headers: content type, user agent, the endpoint's own, `apikey` for rebrandly.
    pub headers: Vec<(HeaderName, HeaderValue)>,
    /// Newest first; during rotation the previous key signs too. Empty when only `v1a`.
    pub keys: Vec<SigningKey>,
    /// When the previous key stops signing (Unix ms), checked per request: settings are
    /// rebuilt only on a change, and the overlap must end on time without one.
    pub previous_key_until_ms: Option<u64>,
    /// The Ed25519 key when the endpoint wants `v1a` signatures.
    pub asymmetric: Option<AsymmetricKey>,
    pub timeout: Duration,
    pub max_concurrency: usize,
    pub disabled_reason: Option<String>,
}

impl EndpointSettings {
    /// The HMAC keys that sign a request sent at `now_ms`.
    pub fn signing_keys(&self, now_ms: u64) -> &[SigningKey] {
        match self.previous_key_until_ms {
            Some(until) if now_ms >= until => &self.keys[..self.keys.len().min(1)],
            _ => &self.keys,
        }
    }
}

/// One recorded delivery attempt (SPEC §9 "Attempt"). The daemon keeps up to
/// [`ATTEMPT_HISTORY_TOTAL`] of these, so the time is a number rendered only when read,
/// and the error text of one attempt is shared by the records of every event it carried.
#[derive(Debug, Clone)]
pub struct AttemptRecord {
    pub event_id: Box<str>,
    pub attempt: u32,
    /// When the attempt ended, in Unix milliseconds.
    pub at_ms: u64,
    pub status: Option<u16>,
    pub latency_ms: f64,
    pub outcome: &'static str,
    pub error: Option<Arc<str>>,
}

impl AttemptRecord {
    /// The record as the admin API shows it; `at` is RFC 3339 to the second.
    pub fn to_json(&self) -> serde_json::Value {
        let at = chrono::DateTime::from_timestamp_millis(self.at_ms as i64)
            .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true));
        serde_json::json!({
            "event_id": self.event_id, "attempt": self.attempt, "at": at, "status": self.status,
            "latency_ms": self.latency_ms, "outcome": self.outcome, "error": self.error.as_deref(),
        })
    }
}

/// Attempt records one endpoint keeps at most.
pub const ATTEMPT_HISTORY: usize = 1000;
/// Attempt records kept across all endpoints. Past `ATTEMPT_HISTORY_TOTAL /
/// ATTEMPT_HISTORY` endpoints each keeps its share instead of a full history: 10,000
/// endpoints keeping 1,000 records each would hold 10 million, over a gigabyte.
pub const ATTEMPT_HISTORY_TOTAL: usize = 100_000;
/// Records an endpoint keeps however many endpoints there are.
pub const ATTEMPT_HISTORY_MIN: usize = 10;

/// How many attempt records each endpoint keeps when there are `endpoints` of them.
pub fn attempt_history_share(endpoints: usize) -> usize {
    (ATTEMPT_HISTORY_TOTAL / endpoints.max(1)).clamp(ATTEMPT_HISTORY_MIN, ATTEMPT_HISTORY)
}

#[derive(Debug, Default)]
pub struct EndpointHistory {
    pub attempts: VecDeque<AttemptRecord>,
    /// Events delivered (a batch counts each of its events).
    pub delivered: u64,
    pub failed_attempts: u64,
    /// Per-minute attempt counts, newest last: (unix minute, succeeded, all), 24 h deep.
    minutes: VecDeque<(u64, u32, u32)>,
}

impl EndpointHistory {
    /// Counts one attempt that carried `records` (one per event) and keeps the newest
    /// `keep` records.
    fn record(&mut self, records: Vec<AttemptRecord>, ok: bool, minute: u64, keep: usize) {
        if ok {
            self.delivered += records.len() as u64;
        } else {
            self.failed_attempts += 1;
        }
        match self.minutes.back_mut() {
            Some((m, o, a)) if *m == minute => {
                *o += ok as u32;
                *a += 1;
            }
            _ => self.minutes.push_back((minute, ok as u32, 1)),
        }
        while self
            .minutes
            .front()
            .is_some_and(|(m, _, _)| minute.saturating_sub(*m) >= 1440)
        {
            self.minutes.pop_front();
        }
        for record in records {
            self.attempts.push_front(record);
        }
        self.attempts.truncate(keep);
    }

    /// The fraction of attempts in the last `minutes` minutes that succeeded, or `None`
    /// without attempts.
    pub fn success_rate(&self, now_minute: u64, minutes: u64) -> Option<f64> {
        let (ok, all) = self
            .minutes
            .iter()
            .filter(|(m, _, _)| now_minute.saturating_sub(*m) < minutes)
            .fold((0u64, 0u64), |(ok, all), (_, o, a)| (ok + *o as u64, all + *a as u64));
        (all > 0).then(|| ok as f64 / all as f64)
    }
}

/// The wake-up of an endpoint's worker, a permit kept when it is not waiting (as tokio's
/// `Notify::notify_one`). The worker waits for it on every turn of its loop, and over
/// many endpoints a click is a turn or two: `Notify` entered and left a waiter list
/// behind a lock on each (leaving it alone was 2.5 % of the delivery threads' samples
/// in the spread over 10,000 endpoints), where this stores one waker.
#[derive(Default)]
pub struct WorkerWake {
    raised: AtomicBool,
    waker: futures_util::task::AtomicWaker,
}

impl WorkerWake {
    pub fn notify_one(&self) {
        self.raised.store(true, Ordering::Release);
        self.waker.wake();
    }

    /// Resolves once woken, at once if woken since the last time. For one waiter only:
    /// a second would take the first one's place.
    pub fn notified(&self) -> impl std::future::Future<Output = ()> + '_ {
        std::future::poll_fn(|cx| {
            if take_flag(&self.raised) {
                return std::task::Poll::Ready(());
            }
            // Registered before the second look, so a wake between the two is not missed.
            self.waker.register(cx.waker());
            if take_flag(&self.raised) {
                std::task::Poll::Ready(())
            } else {
                std::task::Poll::Pending
            }
        })
    }
}

/// Clears a flag another task raises now and then; true if it was raised. Read first: a
/// worker asks on every turn, and a write each time would take the endpoint's cache line
/// from the ingest threads that raise its flags and count its pending clicks.
pub(crate) fn take_flag(flag: &AtomicBool) -> bool {
    flag.load(Ordering::Relaxed) && flag.swap(false, Ordering::SeqCst)
}

pub struct LiveEndpoint {
    pub id: String,
    pub key: EndpointKey,
    pub source: EndpointSource,
    pub created_at: String,
    settings: ArcSwap<EndpointSettings>,
    /// New work, changed settings, rewind or stop: the worker re-examines everything.
    pub wake: WorkerWake,
    pub rewind: AtomicBool,
    /// Set when the endpoint is enabled by hand: its worker counts `disable_after` anew.
    pub enabled_again: AtomicBool,
    /// Held by a replay from its look-up of the endpoint until its writes are queued, and
    /// by a delete from unrouting the endpoint to the end: a replay never queues entries
    /// behind the forget, and one begun after the delete finds the endpoint gone.
    replaying: Arc<tokio::sync::Mutex<()>>,
    pub stopping: AtomicBool,
    pub pending: AtomicI64,
    /// When the breaker lets (or let) its probe through, in Unix ms; 0 while it is closed.
    /// The circuit's state follows from it alone: open before it, half-open after,
    /// whether or not an attempt has happened since.
    circuit_open_until_ms: AtomicU64,
    pub metrics: EndpointMetrics,
    pub history: Mutex<EndpointHistory>,
    /// Attempt records this endpoint keeps: [`attempt_history_share`] of the registry's
    /// endpoint count, shared by all of them and updated when the count changes.
    history_share: Arc<AtomicUsize>,
}

impl LiveEndpoint {
    /// Whether `patch` changes what only the config file may: every change to one of its
    /// endpoints but turning it on again after a 410 or `disable_after`, not where the
    /// file itself sets `enabled = false`.
    pub fn patch_is_the_files(&self, patch: &serde_json::Map<String, serde_json::Value>) -> bool {
        self.source == EndpointSource::Config
            && (patch.keys().any(|k| k != "enabled")
                || patch.get("enabled") != Some(&serde_json::Value::Bool(true))
                || !self.settings().config.enabled)
    }

    pub fn settings(&self) -> Arc<EndpointSettings> {
        self.settings.load_full()
    }

    pub fn add_pending(&self, n: i64) {
        let now = self.pending.fetch_add(n, Ordering::Relaxed) + n;
        if self.metrics.shared() {
            self.metrics.pending.increment(n as f64);
        } else {
            self.metrics.pending.set(now.max(0) as f64);
        }
    }

    /// The breaker after an attempt: when its circuit lets a probe through, if it is not
    /// closed.
    pub fn set_circuit(&self, open_until_ms: Option<u64>) {
        // 0 marks closed; a real time is never 0.
        let until = open_until_ms.map_or(0, |ms| ms.max(1));
        let before = self.circuit_open_until_ms.swap(until, Ordering::Relaxed);
        if !self.metrics.shared() {
            self.metrics.circuit_open.set(if until == 0 { 0.0 } else { 1.0 });
            return;
        }
        // The shared series counts open circuits: only this endpoint's changes move it,
        // where setting it would overwrite the others'.
        match (before == 0, until == 0) {
            (true, false) => self.metrics.circuit_open.increment(1.0),
            (false, true) => self.metrics.circuit_open.decrement(1.0),
            _ => {}
        }
    }

    pub fn circuit_state(&self) -> CircuitState {
        match self.circuit_open_until_ms.load(Ordering::Relaxed) {
            0 => CircuitState::Closed,
            until if crate::log::now_ms() < until => CircuitState::Open,
            _ => CircuitState::HalfOpen,
        }
    }

    /// Records one attempt: one record per event it carried.
    pub fn record_attempt(&self, records: Vec<AttemptRecord>, outcome: Outcome) {
        let minute = crate::log::now_ms() / 60_000;
        let keep = self.history_share.load(Ordering::Relaxed);
        if let Ok(mut h) = self.history.lock() {
            h.record(records, outcome == Outcome::Success, minute, keep);
        }
    }

    /// The endpoint as the admin API shows it (no secret).
    pub fn describe(&self) -> serde_json::Value {
        let s = self.settings();
        let c = &s.config;
        serde_json::json!({
            "id": self.id, "url": c.url, "format": c.format, "workspaces": c.workspaces, "links": c.links,
            "include_bots": c.include_bots, "include_ip": c.include_ip,
            "timeout": humantime::format_duration(s.timeout).to_string(),
            "max_concurrency": s.max_concurrency, "rate_limit": c.rate_limit, "batch_max": c.batch_max,
            "batch_linger": humantime::format_duration(c.batch_linger.0).to_string(), "headers": c.headers, "signature": c.signature,
            "enabled": s.disabled_reason.is_none() && c.enabled, "disabled_reason": s.disabled_reason,
            "source": self.source, "created_at": self.created_at,
        })
    }
}

/// A disabled marker, persisted so a 410 survives restarts.
#[derive(Debug, Serialize, Deserialize)]
struct DisabledMarker {
    reason: String,
}

/// The routing of one request: the endpoints as they were when it began, and a hold that
/// makes a delete wait until the request's append is queued.
pub struct RoutingPass<'a> {
    _in_progress: std::sync::RwLockReadGuard<'a, ()>,
    /// A guard, not a clone: no reference count bounces between the ingest threads for
    /// it, and like the lock it lives only within the request's routing.
    snapshot: arc_swap::Guard<Arc<Snapshot>>,
}

impl RoutingPass<'_> {
    /// Appends the keys of the endpoints that want this click.
    pub fn route(&self, click: ClickFacts<'_>, out: &mut Vec<EndpointKey>) {
        self.snapshot.routes.route(click, out);
    }
}

/// Endpoints by id. Persistent (structurally shared), so a copy with one endpoint more
/// costs O(log n), not O(n): creating the 10,000th endpoint must not rebuild 9,999.
type ById = imbl::HashMap<String, Arc<LiveEndpoint>>;

#[derive(Clone)]
struct Snapshot {
    by_id: ById,
    by_key: imbl::HashMap<EndpointKey, Arc<LiveEndpoint>>,
    routes: RoutingIndex,
}

pub struct EndpointRegistry {
    snapshot: ArcSwap<Snapshot>,
    log: Arc<dyn ClickLog>,
    dispatcher: Dispatcher,
    defaults: EndpointDefaults,
    workers: Mutex<HashMap<EndpointKey, JoinHandle<()>>>,
    /// The internal endpoint for operational events; never routed clicks, never listed.
    operations: Mutex<Option<Arc<LiveEndpoint>>>,
    /// Serialises changes; reads never wait for it.
    change: tokio::sync::Mutex<()>,
    /// Held shared by ingest from routing a request's clicks until their append is queued
    /// to the log, and taken alone by a delete once the endpoint is unrouted: after that,
    /// every append routed to it is ahead of the forget in the log's queue, where one
    /// behind would leave an entry nobody reads, holding pruning back for good.
    routing_in_progress: Arc<std::sync::RwLock<()>>,
    /// [`attempt_history_share`] for the current endpoint count, read by every endpoint.
    history_share: Arc<AtomicUsize>,
    /// The share every history was last cut to. Histories are cut again only once the
    /// share has halved since, so adding endpoints one by one does not visit them all
    /// each time, and no endpoint holds more than twice its share for long.
    history_cut_to: AtomicUsize,
}

impl EndpointRegistry {
    pub fn new(log: Arc<dyn ClickLog>, dispatcher: Dispatcher, defaults: EndpointDefaults) -> Arc<Self> {
        Arc::new(EndpointRegistry {
            snapshot: ArcSwap::from_pointee(Snapshot {
                by_id: ById::new(),
                by_key: imbl::HashMap::new(),
                routes: RoutingIndex::default(),
            }),
            log,
            dispatcher,
            defaults,
            workers: Mutex::new(HashMap::new()),
            operations: Mutex::new(None),
            change: tokio::sync::Mutex::new(()),
            routing_in_progress: Arc::new(std::sync::RwLock::new(())),
            history_share: Arc::new(AtomicUsize::new(ATTEMPT_HISTORY)),
            history_cut_to: AtomicUsize::new(ATTEMPT_HISTORY),
        })
    }

    /// Routing for one request's clicks; keep it until their append is queued to the log.
    pub fn routing(&self) -> RoutingPass<'_> {
        RoutingPass {
            // Poisoning cannot leave the unit value wrong.
            _in_progress: self
                .routing_in_progress
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
            snapshot: self.snapshot.load(),
        }
    }

    /// Waits until every request routed before now has queued its append.
    async fn routed_before_now_queued(&self) {
        let lock = self.routing_in_progress.clone();
        // Off the async threads: the wait is for other threads' short sections.
        let _ = tokio::task::spawn_blocking(move || {
            drop(lock.write().unwrap_or_else(std::sync::PoisonError::into_inner));
        })
        .await;
    }

    /// Tells an endpoint's worker that `n` new events wait for it.
    pub fn notify_new(&self, key: EndpointKey, n: i64) {
        if let Some(ep) = self.snapshot.load().by_key.get(&key) {
            ep.add_pending(n);
            ep.wake.notify_one();
        }
    }

    pub fn get(&self, id: &str) -> Option<Arc<LiveEndpoint>> {
        self.snapshot.load().by_id.get(id).cloned()
    }

    pub fn all(&self) -> Vec<Arc<LiveEndpoint>> {
        let mut v: Vec<_> = self.snapshot.load().by_id.values().cloned().collect();
        v.sort_by(|a, b| a.id.cmp(&b.id));
        v
    }

    pub fn log(&self) -> &Arc<dyn ClickLog> {
        &self.log
    }

    /// Makes the config file's endpoints the live ones of source `config`: new ones start,
    /// changed ones take their new settings, removed ones stop (their queues stay on disk
    /// and resume if they come back). API endpoints are untouched.
    pub async fn apply_config(&self, endpoints: &[EndpointConfig]) -> Result<(), EndpointError> {
        let _guard = self.change.lock().await;
        let current = self.snapshot.load_full();
        let mut by_id: ById = current
            .by_id
            .iter()
            .filter(|(_, ep)| ep.source == EndpointSource::Api)
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        // Everything that can refuse the file runs before anything changes, so that a
        // refused reload leaves the old endpoints in force, with no worker started.
        if let Some(ep) = endpoints.iter().find(|ep| by_id.contains_key(&ep.id)) {
            return Err(EndpointError::Exists(ep.id.clone()));
        }
        let mut changed = Vec::new();
        let mut started = Vec::new();
        for ep in endpoints {
            match current.by_id.get(&ep.id) {
                Some(live) if live.source == EndpointSource::Config => {
                    if live.settings().config != *ep {
                        changed.push((live.clone(), self.settings_for(ep, live.source).await?));
                    }
                    by_id.insert(ep.id.clone(), live.clone());
                }
                _ => {
                    let (live, pending) = self.prepare_live(ep, EndpointSource::Config, now_rfc3339()).await?;
                    by_id.insert(ep.id.clone(), live.clone());
                    started.push((live, pending));
                }
            }
        }
        for (live, settings) in changed {
            live.settings.store(Arc::new(settings));
            live.wake.notify_one();
        }
        for (live, pending) in &started {
            self.start_worker(live, *pending);
        }
        let mut stopped = Vec::new();
        for (id, live) in &current.by_id {
            if !by_id.contains_key(id) {
                stopped.push(live.clone());
            }
        }
        self.publish(by_id);
        for live in stopped {
            self.stop_worker(&live).await;
        }
        Ok(())
    }

    /// Adds an endpoint at run time and persists it.
    pub async fn create(&self, mut config: EndpointConfig) -> Result<Arc<LiveEndpoint>, EndpointError> {
        let _guard = self.change.lock().await;
        validate_user_endpoint(&config).map_err(|(f, why)| EndpointError::Invalid { field: f.into(), why })?;
        if self.get(&config.id).is_some() {
            return Err(EndpointError::Exists(config.id));
        }
        if config.secret.is_none() {
            config.secret = Some(generate_secret());
        }
        let created_at = now_rfc3339();
        let stored = StoredApiEndpoint {
            config: config.clone(),
            created_at: created_at.clone(),
            previous_secret: None,
        };
        // A new endpoint takes over neither the failing time nor the disabling of one that
        // had its id before (a config-file endpoint since removed).
        self.clear_marks(&config.id).await?;
        // Everything that can fail comes before the record: one stored for an endpoint
        // the answer said was not created would start at the next start.
        let (live, pending) = self.prepare_live(&config, EndpointSource::Api, created_at).await?;
        self.persist_api(&stored).await?;
        self.start_worker(&live, pending);
        self.publish_change(&live, None, true);
        Ok(live)
    }

    /// Loads the endpoints created through the API in earlier runs.
    pub async fn load_api_endpoints(&self) -> Result<(), EndpointError> {
        let _guard = self.change.lock().await;
        let mut by_id = self.snapshot.load().by_id.clone();
        for (_, bytes) in self.log.settings_with_prefix(API_PREFIX)? {
            let stored: StoredApiEndpoint = match serde_json::from_slice(&bytes) {
                Ok(s) => s,
                Err(e) => {
                    tracing::error!(error = %e, "skipping an unreadable stored endpoint");
                    continue;
                }
            };
            if by_id.contains_key(&stored.config.id) {
                tracing::warn!(endpoint = %stored.config.id, "an API endpoint has the id of a config endpoint; the config one wins");
                continue;
            }
            if let Err((_, why)) = not_reserved(&stored.config.id) {
                tracing::error!(endpoint = %stored.config.id, why, "skipping a stored API endpoint; its record stays in the log");
                continue;
            }
            let live = self
                .make_live(&stored.config, EndpointSource::Api, stored.created_at.clone())
                .await?;
            by_id.insert(stored.config.id.clone(), live);
        }
        self.publish(by_id);
        Ok(())
    }

    /// Marks an endpoint disabled (a 410 Gone) so no new click is routed to it; its
    /// queue stays and resumes if it is enabled again.
    pub async fn disable(&self, id: &str, reason: &str) -> Result<(), EndpointError> {
        let _guard = self.change.lock().await;
        let live = self.get(id).ok_or_else(|| EndpointError::NotFound(id.into()))?;
        let marker = serde_json::to_vec(&DisabledMarker { reason: reason.into() })
            .map_err(|e| LogError::Corrupt(e.to_string()))?;
        wait(self.log.put_setting(&disabled_setting(id), Some(marker))).await?;
        let before = live.settings();
        let mut settings = self.settings_for(&before.config, live.source).await?;
        settings.disabled_reason = Some(reason.into());
        live.settings.store(Arc::new(settings));
        self.publish_change(&live, Some(&before), true);
        tracing::warn!(endpoint = %id, reason, "endpoint disabled");
        Ok(())
    }

    /// Starts the internal endpoint that receives operational events.
    pub async fn start_operations(&self, config: &EndpointConfig) -> Result<(), EndpointError> {
        let live = self.make_live(config, EndpointSource::Config, now_rfc3339()).await?;
        if let Ok(mut ops) = self.operations.lock() {
            *ops = Some(live);
        }
        Ok(())
    }

    /// Queues one operational event (`endpoint.failing`, …) for the operations endpoint,
    /// durably, like any click. Without `[operations] url` it does nothing.
    pub async fn emit_operational(&self, kind: &str, data: serde_json::Value) {
        let Some(ops) = self.operations.lock().ok().and_then(|o| o.clone()) else {
            return;
        };
        let id = format!("op_{}", uuid::Uuid::now_v7().simple());
        let event = serde_json::json!({
            "id": id, "timestamp": chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            "type": kind, "data": data,
        });
        let Ok(bytes) = serde_json::to_vec(&event) else { return };
        let ticket = self.log.append(vec![crate::log::NewEvent {
            id,
            client_id: false,
            data: bytes,
            endpoints: vec![ops.key],
        }]);
        match ticket.await {
            Ok(Ok(_)) => {
                ops.add_pending(1);
                ops.wake.notify_one();
            }
            _ => tracing::error!(kind, "cannot store an operational event"),
        }
    }

    /// Applies a partial change (any endpoint field but `id`). Config-file endpoints take
    /// only `{"enabled": true}` here — to re-enable one a 410 or `disable_after` disabled —
    /// the file holds the rest.
    pub async fn update(
        &self,
        id: &str,
        patch: serde_json::Map<String, serde_json::Value>,
    ) -> Result<Arc<LiveEndpoint>, EndpointError> {
        let _guard = self.change.lock().await;
        let live = self.get(id).ok_or_else(|| EndpointError::NotFound(id.into()))?;
        if patch.contains_key("id") {
            return Err(EndpointError::Invalid {
                field: "id".into(),
                why: "cannot be changed".into(),
            });
        }
        if live.patch_is_the_files(&patch) {
            return Err(EndpointError::FromConfig(id.into()));
        }
        let enable = patch.get("enabled").and_then(serde_json::Value::as_bool);
        let current = live.settings().config.clone();
        let mut config = current.clone();
        if live.source == EndpointSource::Api {
            let mut merged = serde_json::to_value(&current).map_err(|e| LogError::Corrupt(e.to_string()))?;
            if let serde_json::Value::Object(m) = &mut merged {
                for (k, v) in patch {
                    m.insert(k, v);
                }
            }
            config = endpoint_config_from(merged)?;
            validate_endpoint(&config).map_err(|(f, why)| EndpointError::Invalid { field: f.into(), why })?;
        }
        // The settings before the record, as in `create`: a change refused here stores
        // nothing for the next start to apply.
        let mut settings = self.settings_for(&config, live.source).await?;
        if live.source == EndpointSource::Api {
            let stored = self.stored_api(id)?;
            self.persist_api(&StoredApiEndpoint {
                config: config.clone(),
                ..stored
            })
            .await?;
        }
        if enable == Some(true) {
            wait(self.log.put_setting(&disabled_setting(id), None)).await?;
            // The mark read into `settings` is gone; only the config can still disable it.
            settings.disabled_reason = (!config.enabled).then(|| "disabled".to_string());
            if live.settings().disabled_reason.is_some() {
                live.enabled_again.store(true, Ordering::SeqCst);
            }
        }
        let before = live.settings();
        live.settings.store(Arc::new(settings));
        self.publish_change(&live, Some(&before), true);
        live.wake.notify_one();
        Ok(live)
    }

    /// Removes an API endpoint with its queue and dead letters.
    pub async fn delete(&self, id: &str) -> Result<(), EndpointError> {
        let _guard = self.change.lock().await;
        let live = self.get(id).ok_or_else(|| EndpointError::NotFound(id.into()))?;
        if live.source == EndpointSource::Config {
            return Err(EndpointError::FromConfig(id.into()));
        }
        self.publish_change(&live, Some(&live.settings()), false);
        self.routed_before_now_queued().await;
        let _no_replays = live.replaying.lock().await;
        self.stop_worker(&live).await;
        wait(self.log.forget_endpoint(live.key)).await?;
        wait(self.log.put_setting(&api_setting(id), None)).await?;
        self.clear_marks(id).await?;
        live.add_pending(-live.pending.load(Ordering::Relaxed));
        Ok(())
    }

    /// Removes what the log keeps of an endpoint id's disabling and failing time; writes
    /// only what is there.
    async fn clear_marks(&self, id: &str) -> Result<(), EndpointError> {
        for mark in [disabled_setting(id), failing_for_setting(id)] {
            if self.log.get_setting(&mark)?.is_some() {
                wait(self.log.put_setting(&mark, None)).await?;
            }
        }
        Ok(())
    }

    /// The newest secret of an endpoint.
    pub fn secret(&self, id: &str) -> Result<String, EndpointError> {
        let live = self.get(id).ok_or_else(|| EndpointError::NotFound(id.into()))?;
        Ok(live.settings().config.secret.clone().unwrap_or_default())
    }

    /// Gives an API endpoint a new secret; the old one keeps signing beside it for 24 h.
    pub async fn rotate_secret(&self, id: &str) -> Result<String, EndpointError> {
        let _guard = self.change.lock().await;
        let live = self.get(id).ok_or_else(|| EndpointError::NotFound(id.into()))?;
        if live.source == EndpointSource::Config {
            return Err(EndpointError::FromConfig(id.into()));
        }
        let mut stored = self.stored_api(id)?;
        let old = stored.config.secret.clone().unwrap_or_default();
        let new = generate_secret();
        stored.previous_secret = Some(PreviousSecret {
            secret: old,
            expires_ms: crate::log::now_ms() + ROTATION_OVERLAP_MS,
        });
        stored.config.secret = Some(new.clone());
        self.persist_api(&stored).await?;
        let settings = self.settings_for(&stored.config, live.source).await?;
        live.settings.store(Arc::new(settings));
        Ok(new)
    }

    /// Queues an endpoint's dead letters again; returns how many.
    pub async fn replay_dead(&self, id: &str) -> Result<usize, EndpointError> {
        let (live, _replaying) = self.for_replay(id).await?;
        let (log, key) = (self.log.clone(), live.key);
        let n = wait_planned(move || log.revive_dead(key)).await?;
        live.add_pending(n as i64);
        Self::rewind(&live);
        Ok(n)
    }

    /// Queues again every retained click accepted in `[since_ms, until_ms)` that the
    /// endpoint's filters take now (links, workspaces, bots), as routing would have; never
    /// the daemon's own operational events.
    pub async fn replay_window(&self, id: &str, since_ms: u64, until_ms: u64) -> Result<usize, EndpointError> {
        let (live, _replaying) = self.for_replay(id).await?;
        let before = self.log.count_pending(live.key)? as i64;
        // An index of this endpoint alone, enabled so that a disabled one replays too.
        let mut config = live.settings().config.clone();
        config.enabled = true;
        let index = RoutingIndex::build([(live.key, &config)]);
        let (log, key) = (self.log.clone(), live.key);
        let n = wait_planned(move || {
            let wanted = |data: &[u8]| {
                StoredFacts::of(data).is_some_and(|facts| {
                    let mut routed = Vec::new();
                    index.route(facts.facts(), &mut routed);
                    !routed.is_empty()
                })
            };
            log.replay_window(key, since_ms, until_ms, &wanted)
        })
        .await?;
        // Entries already pending were rewritten, not added: count what the queue grew by.
        let after = self.log.count_pending(live.key)? as i64;
        live.add_pending(after - before);
        Self::rewind(&live);
        Ok(n)
    }

    /// The endpoint, held for a replay: still routed once its replay lock is taken.
    async fn for_replay(
        &self,
        id: &str,
    ) -> Result<(Arc<LiveEndpoint>, tokio::sync::OwnedMutexGuard<()>), EndpointError> {
        let live = self.get(id).ok_or_else(|| EndpointError::NotFound(id.into()))?;
        let guard = live.replaying.clone().lock_owned().await;
        if !self.get(id).is_some_and(|now| Arc::ptr_eq(&now, &live)) {
            return Err(EndpointError::NotFound(id.into()));
        }
        Ok((live, guard))
    }

    /// Makes the worker read its queue from the start again (entries came back behind it).
    fn rewind(live: &LiveEndpoint) {
        live.rewind.store(true, Ordering::SeqCst);
        live.wake.notify_one();
    }

    fn stored_api(&self, id: &str) -> Result<StoredApiEndpoint, EndpointError> {
        let bytes = self
            .log
            .get_setting(&api_setting(id))?
            .ok_or_else(|| EndpointError::NotFound(id.into()))?;
        Ok(serde_json::from_slice(&bytes).map_err(|e| LogError::Corrupt(e.to_string()))?)
    }

    async fn make_live(
        &self,
        config: &EndpointConfig,
        source: EndpointSource,
        created_at: String,
    ) -> Result<Arc<LiveEndpoint>, EndpointError> {
        let (live, pending) = self.prepare_live(config, source, created_at).await?;
        self.start_worker(&live, pending);
        Ok(live)
    }

    /// An endpoint ready to run, its worker not started yet, and how many entries wait in
    /// its queue: counted only once it starts, so that one prepared for a refused reload
    /// leaves no trace in the pending gauge.
    async fn prepare_live(
        &self,
        config: &EndpointConfig,
        source: EndpointSource,
        created_at: String,
    ) -> Result<(Arc<LiveEndpoint>, i64), EndpointError> {
        let key = self.log.endpoint_key(&config.id)?;
        let settings = self.settings_for(config, source).await?;
        let pending = self.log.count_pending(key)? as i64;
        let live = Arc::new(LiveEndpoint {
            id: config.id.clone(),
            key,
            source,
            created_at,
            settings: ArcSwap::from_pointee(settings),
            wake: WorkerWake::default(),
            rewind: AtomicBool::new(false),
            enabled_again: AtomicBool::new(false),
            replaying: Arc::new(tokio::sync::Mutex::new(())),
            stopping: AtomicBool::new(false),
            pending: AtomicI64::new(0),
            circuit_open_until_ms: AtomicU64::new(0),
            metrics: EndpointMetrics::new(&config.id),
            history: Mutex::new(EndpointHistory::default()),
            history_share: self.history_share.clone(),
        });
        Ok((live, pending))
    }

    fn start_worker(&self, live: &Arc<LiveEndpoint>, pending: i64) {
        live.add_pending(pending);
        let handle = self.dispatcher.start(live.clone());
        if let Ok(mut workers) = self.workers.lock() {
            workers.insert(live.key, handle);
        }
    }

    /// Derives an endpoint's settings: defaults, its secret (from the file, the API
    /// record, or generated once and persisted), headers, disabled marker.
    async fn settings_for(
        &self,
        config: &EndpointConfig,
        source: EndpointSource,
    ) -> Result<EndpointSettings, EndpointError> {
        let invalid = |field: &str, why: String| EndpointError::Invalid {
            field: field.into(),
            why,
        };
        let mut config = config.clone();
        let secret = match &config.secret {
            Some(s) => s.clone(),
            None => {
                let name = format!("{SECRET_PREFIX}{}", config.id);
                match self.log.get_setting(&name)? {
                    Some(s) => String::from_utf8_lossy(&s).into_owned(),
                    None => {
                        let s = generate_secret();
                        // Written synchronously: a secret handed out must survive a crash.
                        wait(self.log.put_setting(&name, Some(s.clone().into_bytes()))).await?;
                        s
                    }
                }
            }
        };
        let mut keys = vec![SigningKey::from_secret(&secret).map_err(|e| invalid("secret", e.to_string()))?];
        let mut previous_key_until_ms = None;
        if source == EndpointSource::Api {
            if let Some((prev, until_ms)) = self.previous_secret(&config.id)? {
                keys.push(prev);
                previous_key_until_ms = Some(until_ms);
            }
        }
        let url: Uri = config.url.parse().map_err(|e| invalid("url", format!("{e}")))?;
        let mut headers = vec![
            (
                hyper::header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            ),
            (
                hyper::header::USER_AGENT,
                HeaderValue::from_static(concat!("clickhook/", env!("CARGO_PKG_VERSION"))),
            ),
        ];
        if config.format == crate::deliver::format::Format::Rebrandly {
            let v = HeaderValue::from_str(&secret).map_err(|e| invalid("secret", e.to_string()))?;
            headers.push((HeaderName::from_static("apikey"), v));
        }
        for (name, value) in &config.headers {
            let n = name
                .parse::<HeaderName>()
                .map_err(|e| invalid("headers", format!("{name:?}: {e}")))?;
            let v = value
                .parse::<HeaderValue>()
                .map_err(|e| invalid("headers", format!("{name:?}: {e}")))?;
            headers.push((n, v));
        }
        let disabled_reason = self
            .log
            .get_setting(&disabled_setting(&config.id))?
            .and_then(|b| serde_json::from_slice::<DisabledMarker>(&b).ok())
            .map(|m| m.reason)
            .or_else(|| (!config.enabled).then(|| "disabled".to_string()));
        let asymmetric = if config.signature.ed25519() {
            let text = match &config.signing_key {
                Some(k) => k.clone(),
                None => {
                    let name = format!("{SIGNING_KEY_PREFIX}{}", config.id);
                    match self.log.get_setting(&name)? {
                        Some(k) => String::from_utf8_lossy(&k).into_owned(),
                        None => {
                            let k = AsymmetricKey::generate();
                            wait(self.log.put_setting(&name, Some(k.clone().into_bytes()))).await?;
                            k
                        }
                    }
                }
            };
            Some(AsymmetricKey::from_secret(&text).map_err(|e| invalid("signing_key", e.to_string()))?)
        } else {
            None
        };
        if !config.signature.hmac() {
            keys.clear();
        }
        config.secret = Some(secret);
        Ok(EndpointSettings {
            asymmetric,
            timeout: config.timeout.map(|t| t.0).unwrap_or(self.defaults.timeout),
            max_concurrency: config.max_concurrency.unwrap_or(self.defaults.max_concurrency),
            url,
            headers,
            keys,
            previous_key_until_ms,
            disabled_reason,
            config,
        })
    }

    /// The rotated-out key still in its overlap, with when the overlap ends.
    fn previous_secret(&self, id: &str) -> Result<Option<(SigningKey, u64)>, EndpointError> {
        let Some(bytes) = self.log.get_setting(&api_setting(id))? else {
            return Ok(None);
        };
        let stored: StoredApiEndpoint = serde_json::from_slice(&bytes).map_err(|e| LogError::Corrupt(e.to_string()))?;
        Ok(stored.previous_secret.and_then(|p| {
            (p.expires_ms > crate::log::now_ms())
                .then(|| SigningKey::from_secret(&p.secret).ok().map(|k| (k, p.expires_ms)))
                .flatten()
        }))
    }

    async fn persist_api(&self, stored: &StoredApiEndpoint) -> Result<(), EndpointError> {
        let bytes = serde_json::to_vec(stored).map_err(|e| LogError::Corrupt(e.to_string()))?;
        wait(self.log.put_setting(&api_setting(&stored.config.id), Some(bytes))).await?;
        Ok(())
    }

    /// Publishes the current snapshot with one endpoint changed, without a rebuild:
    /// `before` is the settings it was published with (`None` for a new one), and
    /// `present` false takes it out.
    fn publish_change(&self, live: &Arc<LiveEndpoint>, before: Option<&EndpointSettings>, present: bool) {
        let mut next = Snapshot::clone(&self.snapshot.load());
        if let Some(before) = before.filter(|b| b.disabled_reason.is_none()) {
            next.routes.remove(live.key, &before.config);
        }
        if present {
            next.by_id.insert(live.id.clone(), live.clone());
            next.by_key.insert(live.key, live.clone());
            let settings = live.settings();
            if settings.disabled_reason.is_none() {
                next.routes.add(live.key, &settings.config);
            }
        } else {
            next.by_id.remove(&live.id);
            next.by_key.remove(&live.key);
        }
        self.share_history(&next.by_id);
        self.snapshot.store(Arc::new(next));
    }

    /// Publishes these endpoints as the live set, rebuilding the routing index.
    fn publish(&self, by_id: ById) {
        self.share_history(&by_id);
        let by_key = by_id.values().map(|ep| (ep.key, ep.clone())).collect();
        let settings: Vec<_> = by_id.values().map(|ep| (ep.key, ep.settings())).collect();
        let routes = RoutingIndex::build(
            settings
                .iter()
                .filter(|(_, s)| s.disabled_reason.is_none())
                .map(|(k, s)| (*k, &s.config)),
        );
        self.snapshot.store(Arc::new(Snapshot { by_id, by_key, routes }));
    }

    /// Sets the attempt-history share for this many endpoints, and cuts the histories
    /// to it when it has halved since the last cut.
    fn share_history(&self, by_id: &ById) {
        let share = attempt_history_share(by_id.len());
        self.history_share.store(share, Ordering::Relaxed);
        let cut_to = self.history_cut_to.load(Ordering::Relaxed);
        if share > cut_to {
            // Fewer endpoints: histories may grow back to the larger share.
            self.history_cut_to.store(share, Ordering::Relaxed);
        } else if share <= cut_to / 2 {
            self.history_cut_to.store(share, Ordering::Relaxed);
            // Each endpoint gives back what it holds past its new share now, not at its
            // next attempt, which may never come.
            for ep in by_id.values() {
                if let Ok(mut h) = ep.history.lock() {
                    h.attempts.truncate(share);
                    h.attempts.shrink_to(share);
                }
            }
        }
    }

    async fn stop_worker(&self, live: &Arc<LiveEndpoint>) {
        live.stopping.store(true, Ordering::SeqCst);
        live.wake.notify_one();
        let handle = self.workers.lock().ok().and_then(|mut w| w.remove(&live.key));
        if let Some(h) = handle {
            let _ = h.await;
        }
        // No circuit of a stopped endpoint is open: the shared series counts open ones.
        live.set_circuit(None);
    }

    /// Stops every worker once they have finished their in-flight attempts.
    pub async fn shutdown(&self) {
        let handles: Vec<_> = match self.workers.lock() {
            Ok(mut w) => w.drain().map(|(_, h)| h).collect(),
            Err(_) => Vec::new(),
        };
        for h in handles {
            let _ = h.await;
        }
    }
}

const API_PREFIX: &str = "endpoint/";
/// How long a rotated-out secret keeps signing beside the new one.
const ROTATION_OVERLAP_MS: u64 = 24 * 3600 * 1000;
const SECRET_PREFIX: &str = "secret/";
const SIGNING_KEY_PREFIX: &str = "signing-key/";
const DISABLED_PREFIX: &str = "disabled/";
const FAILING_FOR_PREFIX: &str = "failing-for/";

/// An endpoint from an admin request's JSON; a field of the wrong type is named.
pub fn endpoint_config_from(value: serde_json::Value) -> Result<EndpointConfig, EndpointError> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let field = e.path().to_string();
        EndpointError::Invalid {
            field: if field == "." { "body".into() } else { field },
            why: e.into_inner().to_string(),
        }
    })
}

/// The setting that stores an API endpoint.
fn api_setting(id: &str) -> String {
    format!("{API_PREFIX}{id}")
}

/// The setting that marks an endpoint disabled (a [`DisabledMarker`]).
fn disabled_setting(id: &str) -> String {
    format!("{DISABLED_PREFIX}{id}")
}

/// The setting in which an endpoint's worker keeps how long the endpoint has been failing.
pub(crate) fn failing_for_setting(id: &str) -> String {
    format!("{FAILING_FOR_PREFIX}{id}")
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct PreviousSecret {
    secret: String,
    expires_ms: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct StoredApiEndpoint {
    config: EndpointConfig,
    created_at: String,
    previous_secret: Option<PreviousSecret>,
}

async fn wait<T>(ticket: crate::log::Ticket<T>) -> Result<T, LogError> {
    ticket.await.map_err(|_| LogError::Closed)?
}

/// Starts a log write whose planning reads much of the log (a replay, a revival), off the
/// async workers: it may also wait for a prune under way.
async fn wait_planned<T: Send + 'static>(
    start: impl FnOnce() -> crate::log::Ticket<T> + Send + 'static,
) -> Result<T, LogError> {
    let ticket = tokio::task::spawn_blocking(start)
        .await
        .map_err(|e| LogError::Storage(format!("planning a log write failed: {e}")))?;
    wait(ticket).await
}

pub fn now_rfc3339() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

#[cfg(test)]
/// A registry on a real log in `dir`, with one delivery thread; the sender keeps its
/// workers from seeing a shutdown.
pub(crate) fn registry_in(
    dir: &std::path::Path,
) -> (
    Arc<crate::log::SledLog>,
    Arc<EndpointRegistry>,
    tokio::sync::watch::Sender<bool>,
) {
    let options = crate::log::SledOptions::for_tests(1 << 20, 1000, 1000);
    let log = crate::log::SledLog::open(dir, options).unwrap();
    let (running, shutdown) = tokio::sync::watch::channel(false);
    let (events, _) = tokio::sync::mpsc::unbounded_channel();
    let policy = crate::deliver::DeliveryPolicy {
        schedule: Arc::new(crate::deliver::policy::RetrySchedule {
            steps: vec![],
            jitter: 0.0,
        }),
        breaker_failures: 5,
        breaker_cooldown: Duration::from_secs(1),
        addresses: crate::deliver::send::AddressPolicy {
            allow_private: true,
            allowed: Arc::new(Vec::new()),
        },
        connections: crate::deliver::send::ConnectionBudget::new(16),
        per_receiver: 16,
        failing_after: 5,
        disable_after: Duration::from_secs(3600),
    };
    let dispatcher = Dispatcher::new(1, log.clone(), policy, shutdown, events).unwrap();
    let defaults = EndpointDefaults {
        timeout: Duration::from_secs(1),
        max_concurrency: 4,
    };
    (log.clone(), EndpointRegistry::new(log, dispatcher, defaults), running)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A wake before the wait is kept (once, however many came), and one after the wait
    /// went to sleep wakes the task that waits.
    #[test]
    fn a_worker_wake_is_kept_until_taken_and_wakes_the_waiting_task() {
        use std::future::Future;
        use std::task::{Context, Poll, Wake, Waker};
        struct Counted(AtomicUsize);
        impl Wake for Counted {
            fn wake(self: Arc<Self>) {
                self.0.fetch_add(1, Ordering::SeqCst);
            }
        }
        let counted = Arc::new(Counted(AtomicUsize::new(0)));
        let waker = Waker::from(counted.clone());
        let mut cx = Context::from_waker(&waker);
        let wake = Arc::new(WorkerWake::default());
        let poll = |wake: &WorkerWake, cx: &mut Context<'_>| std::pin::pin!(wake.notified()).poll(cx);

        wake.notify_one();
        wake.notify_one();
        assert_eq!(poll(&wake, &mut cx), Poll::Ready(()), "a wake before the wait is kept");
        assert_eq!(poll(&wake, &mut cx), Poll::Pending, "two wakes are one permit");
        assert_eq!(counted.0.load(Ordering::SeqCst), 0);
        let from_another_thread = wake.clone();
        std::thread::spawn(move || from_another_thread.notify_one())
            .join()
            .unwrap();
        assert_eq!(counted.0.load(Ordering::SeqCst), 1, "the waiting task was not woken");
        assert_eq!(poll(&wake, &mut cx), Poll::Ready(()));
    }

    /// A request routed to an endpoint just before its delete queues its append after the
    /// delete began: the delete waits for it, so the forget comes after the append in the
    /// log and no entry is left for an endpoint that is gone.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_delete_waits_for_appends_routed_before_it() {
        let dir = tempfile::tempdir().unwrap();
        let (log, registry, _running) = registry_in(dir.path());
        // A receiver that takes nothing: the entry stays pending unless the delete drops it.
        let config: EndpointConfig =
            serde_json::from_value(serde_json::json!({"id": "gone", "url": "http://127.0.0.1:9/", "links": ["l"]}))
                .unwrap();
        let live = registry.create(config).await.unwrap();
        let data = br#"{"id":"c1","timestamp":"2025-01-01T00:00:00Z","link":{"id":"l"}}"#;
        let facts = StoredFacts::of(data).unwrap();
        let routing = registry.routing();
        let mut routed = Vec::new();
        routing.route(facts.facts(), &mut routed);
        assert_eq!(routed, vec![live.key]);
        let deleting = tokio::spawn({
            let registry = registry.clone();
            async move { registry.delete("gone").await }
        });
        // Time for a delete that does not wait to finish.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let appended = log.append(vec![crate::log::NewEvent {
            id: "c1".into(),
            client_id: false,
            data: data.to_vec(),
            endpoints: routed,
        }]);
        drop(routing);
        deleting.await.unwrap().unwrap();
        appended.await.unwrap().unwrap();
        assert_eq!(
            log.count_pending(live.key).unwrap(),
            0,
            "an entry outlived its endpoint's delete"
        );
    }

    /// An API endpoint given the id of a config-file endpoint since removed starts afresh:
    /// not disabled because the old one was, nor failing for as long.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_new_endpoint_does_not_take_over_the_disabling_of_one_with_its_id_before() {
        let dir = tempfile::tempdir().unwrap();
        let (log, registry, _running) = registry_in(dir.path());
        let config: EndpointConfig =
            serde_json::from_value(serde_json::json!({"id": "crm", "url": "http://127.0.0.1:9/"})).unwrap();
        registry.apply_config(std::slice::from_ref(&config)).await.unwrap();
        registry.disable("crm", "failing").await.unwrap();
        wait(log.put_setting(&failing_for_setting("crm"), Some(b"{}".to_vec())))
            .await
            .unwrap();
        registry.apply_config(&[]).await.unwrap();
        assert!(registry.get("crm").is_none());
        let created = registry.create(config).await.unwrap();
        assert_eq!(created.settings().disabled_reason, None);
        assert_eq!(log.get_setting(&failing_for_setting("crm")).unwrap(), None);
        assert_eq!(log.get_setting(&disabled_setting("crm")).unwrap(), None);
    }

    /// A create that fails stores nothing: the endpoint the answer said was not created
    /// does not start at the next start.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_create_that_fails_leaves_no_stored_endpoint() {
        let dir = tempfile::tempdir().unwrap();
        let (log, registry, _running) = registry_in(dir.path());
        log.exhaust_endpoint_keys();
        let config: EndpointConfig =
            serde_json::from_value(serde_json::json!({"id": "late", "url": "http://127.0.0.1:9/"})).unwrap();
        let Err(err) = registry.create(config).await else {
            panic!("created with no key left for it");
        };
        assert!(err.to_string().contains("every key"), "{err}");
        assert!(registry.get("late").is_none());
        assert_eq!(
            log.settings_with_prefix(API_PREFIX).unwrap().len(),
            0,
            "a record for the refused endpoint"
        );
    }

    fn record(n: u32) -> AttemptRecord {
        AttemptRecord {
            event_id: format!("evt_{n}").into(),
            attempt: 1,
            at_ms: 1_700_000_000_123,
            status: Some(500),
            latency_ms: 1.5,
            outcome: "http_5xx",
            error: Some(Arc::from("HTTP 500")),
        }
    }

    #[test]
    fn each_endpoint_keeps_a_full_history_until_there_are_many() {
        assert_eq!(attempt_history_share(0), ATTEMPT_HISTORY);
        assert_eq!(attempt_history_share(1), ATTEMPT_HISTORY);
        assert_eq!(attempt_history_share(100), ATTEMPT_HISTORY);
        assert_eq!(attempt_history_share(1_000), 100);
        assert_eq!(attempt_history_share(10_000), 10);
        assert_eq!(attempt_history_share(1_000_000), ATTEMPT_HISTORY_MIN);
    }

    #[test]
    fn a_history_keeps_the_newest_records_and_counts_every_attempt() {
        let mut h = EndpointHistory::default();
        h.record((0..3).map(record).collect(), false, 10, 4);
        h.record((3..6).map(record).collect(), true, 10, 4);
        let ids: Vec<&str> = h.attempts.iter().map(|a| &*a.event_id).collect();
        assert_eq!(ids, ["evt_5", "evt_4", "evt_3", "evt_2"]);
        assert_eq!((h.delivered, h.failed_attempts), (3, 1));
        assert_eq!(h.success_rate(10, 60), Some(0.5));
    }

    #[test]
    fn the_previous_key_stops_signing_when_its_overlap_ends_without_a_rebuild() {
        let key = |secret: &str| SigningKey::from_secret(secret).unwrap();
        let (new, old) = (generate_secret(), generate_secret());
        let config: EndpointConfig =
            serde_json::from_value(serde_json::json!({"id": "e", "url": "http://127.0.0.1:9/"})).unwrap();
        let settings = EndpointSettings {
            url: config.url.parse().unwrap(),
            config,
            headers: vec![],
            keys: vec![key(&new), key(&old)],
            previous_key_until_ms: Some(1_000),
            asymmetric: None,
            timeout: Duration::from_secs(1),
            max_concurrency: 1,
            disabled_reason: None,
        };
        let signed = |now_ms| crate::deliver::sign::signature_header(settings.signing_keys(now_ms), "msg", 1, b"{}");
        let both = crate::deliver::sign::signature_header(&[key(&new), key(&old)], "msg", 1, b"{}");
        let newest = crate::deliver::sign::signature_header(&[key(&new)], "msg", 1, b"{}");
        assert_eq!(signed(999), both, "inside the overlap both sign");
        assert_eq!(signed(1_000), newest, "at its end only the new one does");
    }

    #[test]
    fn a_record_reads_back_as_the_api_shows_it() {
        let v = record(7).to_json();
        assert_eq!(v["event_id"], "evt_7");
        assert_eq!(v["at"], "2023-11-14T22:13:20Z");
        assert_eq!(v["status"], 500);
        assert_eq!(v["error"], "HTTP 500");
        let keys: Vec<&String> = v.as_object().unwrap().keys().collect();
        assert_eq!(
            keys,
            ["event_id", "attempt", "at", "status", "latency_ms", "outcome", "error"]
        );
    }
}
