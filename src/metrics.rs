//! Metrics: installs the Prometheus recorder once per process and names every series of
//! SPEC §6. It owns metric names, labels and histogram buckets, and per-endpoint handles
//! created once so the delivery hot path never formats a label. It must not decide
//! anything: callers say what happened.

use crate::deliver::send::Outcome;
use metrics::{Counter, Gauge, Histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};

pub const INGEST_EVENTS: &str = "clickhook_ingest_events_total";
pub const INGEST_REJECTED: &str = "clickhook_ingest_rejected_total";
pub const DELIVERY_ATTEMPTS: &str = "clickhook_delivery_attempts_total";
pub const DELIVERY_DURATION: &str = "clickhook_delivery_duration_seconds";
pub const DELIVERY_LAG: &str = "clickhook_delivery_lag_seconds";
pub const DEAD_LETTERS: &str = "clickhook_dead_letters_total";
pub const ENDPOINT_PENDING: &str = "clickhook_endpoint_pending";
pub const ENDPOINT_CIRCUIT_OPEN: &str = "clickhook_endpoint_circuit_open";
pub const LOG_EVENTS: &str = "clickhook_log_events";
pub const LOG_BYTES: &str = "clickhook_log_bytes";

/// From a millisecond to a minute: loopback deliveries take well under 1 ms, a slow
/// receiver up to its timeout, and lag includes retry waits.
const BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 3600.0,
];

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Endpoints that get series of their own; the rest share the label `endpoint="_other"`,
/// so 100,000 endpoints cannot blow up a Prometheus server.
static ENDPOINT_SERIES_CAP: AtomicUsize = AtomicUsize::new(DEFAULT_ENDPOINT_SERIES);
static ENDPOINT_SERIES: Mutex<Option<HashSet<String>>> = Mutex::new(None);
pub const DEFAULT_ENDPOINT_SERIES: usize = 1000;
/// The shared label of endpoints past the cap.
pub const OTHER_ENDPOINTS: &str = "_other";

pub fn set_endpoint_series_cap(cap: usize) {
    ENDPOINT_SERIES_CAP.store(cap, Ordering::Relaxed);
}

/// The `endpoint` label value for an endpoint id: its own while under the cap.
fn endpoint_label(endpoint: &str) -> String {
    let Ok(mut guard) = ENDPOINT_SERIES.lock() else {
        return OTHER_ENDPOINTS.into();
    };
    let named = guard.get_or_insert_with(HashSet::new);
    if named.contains(endpoint) {
        return endpoint.into();
    }
    if named.len() < ENDPOINT_SERIES_CAP.load(Ordering::Relaxed) {
        named.insert(endpoint.to_string());
        return endpoint.into();
    }
    OTHER_ENDPOINTS.into()
}

/// Installs the global recorder (once per process) and returns the handle `/metrics`
/// renders from.
pub fn install() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Prefix("clickhook_delivery".into()), BUCKETS)
                .unwrap_or_else(|_| PrometheusBuilder::new());
            let recorder = builder.build_recorder();
            let handle = recorder.handle();
            // Another recorder may already be installed (an embedding program); then our
            // handle renders nothing but the daemon still runs.
            let _ = metrics::set_global_recorder(recorder);
            handle
        })
        .clone()
}

/// Which listener a click came in through.
#[derive(Debug, Clone, Copy)]
pub enum Source {
    Http,
    Unix,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Http => "http",
            Source::Unix => "unix",
        }
    }
}

pub fn ingest_accepted(source: Source, n: u64) {
    metrics::counter!(INGEST_EVENTS, "source" => source.as_str()).increment(n);
}

pub fn ingest_rejected(source: Source, reason: &'static str, n: u64) {
    metrics::counter!(INGEST_REJECTED, "source" => source.as_str(), "reason" => reason).increment(n);
}

pub fn log_gauges(events: u64, bytes: u64) {
    metrics::gauge!(LOG_EVENTS).set(events as f64);
    metrics::gauge!(LOG_BYTES).set(bytes as f64);
}

/// One endpoint's series, registered (at 0) when the endpoint comes into being.
pub struct EndpointMetrics {
    attempts: [Counter; 6],
    pub duration: Histogram,
    pub lag: Histogram,
    pub dead: Counter,
    pub pending: Gauge,
    pub circuit_open: Gauge,
    shared: bool,
}

impl EndpointMetrics {
    pub fn new(endpoint: &str) -> Self {
        let ep = endpoint_label(endpoint);
        let attempts = Outcome::ALL
            .map(|o| metrics::counter!(DELIVERY_ATTEMPTS, "endpoint" => ep.clone(), "outcome" => o.as_str()));
        for c in &attempts {
            c.increment(0);
        }
        let m = EndpointMetrics {
            attempts,
            duration: metrics::histogram!(DELIVERY_DURATION, "endpoint" => ep.clone()),
            lag: metrics::histogram!(DELIVERY_LAG, "endpoint" => ep.clone()),
            dead: metrics::counter!(DEAD_LETTERS, "endpoint" => ep.clone()),
            pending: metrics::gauge!(ENDPOINT_PENDING, "endpoint" => ep.clone()),
            circuit_open: metrics::gauge!(ENDPOINT_CIRCUIT_OPEN, "endpoint" => ep.clone()),
            shared: ep == OTHER_ENDPOINTS,
        };
        if !m.shared {
            m.pending.set(0.0);
            m.circuit_open.set(0.0);
        }
        m.dead.increment(0);
        m
    }

    /// Whether this endpoint shares its series with others (past the cap): gauges are
    /// then not set per endpoint, as they would overwrite each other.
    pub fn shared(&self) -> bool {
        self.shared
    }

    pub fn attempt(&self, outcome: Outcome) -> &Counter {
        let i = Outcome::ALL.iter().position(|o| *o == outcome).unwrap_or(0);
        &self.attempts[i]
    }
}
