//! The webhook sink: an HTTP/1.1 server on loopback standing in for every endpoint of a run,
//! one path per endpoint (`/ep/<n>`). It owns answering (scripted per endpoint: latency,
//! failure rate, hang, 410, connection reset, keep-alive, and the whole listener down or
//! up), checking each request's Standard Webhooks signature, timestamp and headers, and
//! recording which event ids arrived where and when. It must not judge a run: losses and
//! latencies are computed by `verify` from what it recorded. Its request path must stay
//! cheap, since it shares two cores with the daemon under test: one HMAC, one id scan,
//! one short lock.

use crate::clock::{unix_now, Clock};
use crate::signature::{timestamp_fresh, SigningKey};
use crate::Error;
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONNECTION, CONTENT_TYPE, USER_AGENT};
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;
use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::watch;

/// Largest webhook body the sink reads; clickhook batches stay far below it.
const MAX_BODY: usize = 64 << 20;
const SHARDS: usize = 64;

/// What an endpoint does with a request once its signature checked out.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// Answer 200, or 500 per `fail_rate`, after `latency`.
    Answer,
    /// Never answer within `hang_for`; then 504, which no sender should still be waiting for.
    Hang,
    /// Answer 410 Gone.
    Gone,
    /// Close the connection without answering.
    Reset,
}

/// The script of one endpoint; change it while running with [`Sink::set_behavior`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Behavior {
    pub mode: Mode,
    /// Added before every answer.
    pub latency: Duration,
    /// Fraction (0–1) of attempts answered 500.
    pub fail_rate: f64,
    /// Never fail the same `webhook-id` more than this many times (0 = no cap), so that a
    /// finite retry schedule is enough for everything to arrive despite `fail_rate`.
    pub max_failures_per_event: u32,
    /// `false` answers with `connection: close`, making the sender reconnect every time.
    pub keep_alive: bool,
    pub hang_for: Duration,
}

impl Default for Behavior {
    fn default() -> Self {
        Behavior {
            mode: Mode::Answer,
            latency: Duration::ZERO,
            fail_rate: 0.0,
            max_failures_per_event: 0,
            keep_alive: true,
            hang_for: Duration::from_secs(3600),
        }
    }
}

impl Behavior {
    pub fn hang() -> Self {
        Behavior {
            mode: Mode::Hang,
            ..Behavior::default()
        }
    }

    pub fn flaky(fail_rate: f64, max_failures_per_event: u32) -> Self {
        Behavior {
            fail_rate,
            max_failures_per_event,
            ..Behavior::default()
        }
    }
}

/// One endpoint as the sink knows it: the secret its requests must be signed with.
#[derive(Clone, Debug)]
pub struct SinkEndpoint {
    pub secret: String,
    pub behavior: Behavior,
}

#[derive(Clone, Debug)]
pub struct SinkOptions {
    /// A loopback address; port 0 picks a free one.
    pub listen: SocketAddr,
    pub endpoints: Vec<SinkEndpoint>,
    pub clock: Clock,
    /// Refuse (401) timestamps more than 5 minutes off, as Standard Webhooks receivers do.
    pub check_timestamps: bool,
}

impl SinkOptions {
    pub fn new(endpoints: Vec<SinkEndpoint>, clock: Clock) -> Self {
        SinkOptions {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            endpoints,
            clock,
            check_timestamps: true,
        }
    }
}

/// First successful delivery of one event to one endpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Hit {
    pub endpoint: u32,
    pub first_us: u64,
    /// 2xx answers for this event at this endpoint; above 1 means duplicates.
    pub count: u32,
}

/// Event id → its first delivery at each endpoint.
type DeliveryMap = HashMap<Box<str>, Vec<Hit>>;
/// (endpoint, webhook-id) → attempts answered 500.
type FailureMap = HashMap<(u32, Box<str>), u32>;

/// Every event id answered 2xx, per endpoint, with its first arrival. Sharded by id so the
/// sink's connections rarely wait on each other.
pub struct Recorder {
    hasher: RandomState,
    shards: Box<[Mutex<DeliveryMap>]>,
    failures: Box<[Mutex<FailureMap>]>,
    unique: AtomicU64,
    duplicates: AtomicU64,
    first_arrival_us: AtomicU64,
    last_first_arrival_us: AtomicU64,
}

impl Default for Recorder {
    fn default() -> Self {
        Recorder::new()
    }
}

impl Recorder {
    pub fn new() -> Self {
        Recorder {
            hasher: RandomState::new(),
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            failures: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            unique: AtomicU64::new(0),
            duplicates: AtomicU64::new(0),
            first_arrival_us: AtomicU64::new(u64::MAX),
            last_first_arrival_us: AtomicU64::new(0),
        }
    }

    fn shard(&self, id: &str) -> usize {
        (self.hasher.hash_one(id) as usize) % SHARDS
    }

    /// Notes a 2xx delivery; returns true when it is the first of this event at this endpoint.
    pub fn record(&self, endpoint: u32, id: &str, at_us: u64) -> bool {
        let first = {
            let mut map = lock(&self.shards[self.shard(id)]);
            match map.get_mut(id) {
                Some(hits) => match hits.iter_mut().find(|h| h.endpoint == endpoint) {
                    Some(hit) => {
                        hit.count += 1;
                        false
                    }
                    None => {
                        hits.push(Hit {
                            endpoint,
                            first_us: at_us,
                            count: 1,
                        });
                        true
                    }
                },
                None => {
                    map.insert(
                        id.into(),
                        vec![Hit {
                            endpoint,
                            first_us: at_us,
                            count: 1,
                        }],
                    );
                    true
                }
            }
        };
        if first {
            self.unique.fetch_add(1, Relaxed);
            self.first_arrival_us.fetch_min(at_us, Relaxed);
            self.last_first_arrival_us.fetch_max(at_us, Relaxed);
        } else {
            self.duplicates.fetch_add(1, Relaxed);
        }
        first
    }

    /// Runs `f` on the deliveries of one event id (empty when it never arrived).
    pub fn with_hits<R>(&self, id: &str, f: impl FnOnce(&[Hit]) -> R) -> R {
        let map = lock(&self.shards[self.shard(id)]);
        f(map.get(id).map(Vec::as_slice).unwrap_or(&[]))
    }

    /// Failed attempts answered so far for this `webhook-id` at this endpoint.
    fn failures_of(&self, endpoint: u32, webhook_id: &str) -> u32 {
        let map = lock(&self.failures[self.shard(webhook_id)]);
        map.get(&(endpoint, Box::from(webhook_id))).copied().unwrap_or(0)
    }

    fn note_failure(&self, endpoint: u32, webhook_id: &str) {
        let mut map = lock(&self.failures[self.shard(webhook_id)]);
        *map.entry((endpoint, webhook_id.into())).or_insert(0) += 1;
    }

    /// (endpoint, event) pairs delivered at least once.
    pub fn unique(&self) -> u64 {
        self.unique.load(Relaxed)
    }

    /// 2xx deliveries beyond the first of each (endpoint, event) pair.
    pub fn duplicates(&self) -> u64 {
        self.duplicates.load(Relaxed)
    }

    /// Distinct event ids delivered anywhere.
    pub fn distinct_ids(&self) -> u64 {
        self.shards.iter().map(|s| lock(s).len() as u64).sum()
    }

    /// Earliest and latest first-arrival, once anything arrived.
    pub fn arrival_span_us(&self) -> Option<(u64, u64)> {
        let first = self.first_arrival_us.load(Relaxed);
        (first != u64::MAX).then(|| (first, self.last_first_arrival_us.load(Relaxed)))
    }
}

/// A poisoned lock only means another sink task panicked mid-update of a counter map; the
/// map itself is still consistent enough to keep counting, so carry on with it.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[derive(Default)]
struct Counters {
    requests: AtomicU64,
    answered_2xx: AtomicU64,
    answered_500: AtomicU64,
    answered_410: AtomicU64,
    answered_401: AtomicU64,
    answered_404: AtomicU64,
    hung: AtomicU64,
    reset: AtomicU64,
    bad_signatures: AtomicU64,
    stale_timestamps: AtomicU64,
    header_problems: AtomicU64,
    unparsable: AtomicU64,
    id_mismatches: AtomicU64,
    events_delivered: AtomicU64,
    connections: AtomicU64,
}

/// What the sink saw, for the whole sink or one endpoint.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SinkStats {
    pub requests: u64,
    pub answered_2xx: u64,
    pub answered_500: u64,
    pub answered_410: u64,
    /// Refused for a bad signature or a stale timestamp.
    pub answered_401: u64,
    pub answered_404: u64,
    pub hung: u64,
    pub reset: u64,
    pub bad_signatures: u64,
    pub stale_timestamps: u64,
    /// Requests without `content-type: application/json` or a `clickhook/` user agent.
    pub header_problems: u64,
    /// 2xx-answered bodies whose event ids could not be read.
    pub unparsable: u64,
    /// Single-event bodies whose `data.id` differs from `webhook-id`.
    pub id_mismatches: u64,
    /// Events in 2xx-answered requests, duplicates included.
    pub events_delivered: u64,
    pub connections: u64,
}

impl Counters {
    fn snapshot(&self) -> SinkStats {
        SinkStats {
            requests: self.requests.load(Relaxed),
            answered_2xx: self.answered_2xx.load(Relaxed),
            answered_500: self.answered_500.load(Relaxed),
            answered_410: self.answered_410.load(Relaxed),
            answered_401: self.answered_401.load(Relaxed),
            answered_404: self.answered_404.load(Relaxed),
            hung: self.hung.load(Relaxed),
            reset: self.reset.load(Relaxed),
            bad_signatures: self.bad_signatures.load(Relaxed),
            stale_timestamps: self.stale_timestamps.load(Relaxed),
            header_problems: self.header_problems.load(Relaxed),
            unparsable: self.unparsable.load(Relaxed),
            id_mismatches: self.id_mismatches.load(Relaxed),
            events_delivered: self.events_delivered.load(Relaxed),
            connections: self.connections.load(Relaxed),
        }
    }
}

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Relaxed);
}

struct EndpointState {
    key: SigningKey,
    behavior: RwLock<Behavior>,
    counters: Counters,
}

struct State {
    clock: Clock,
    check_timestamps: bool,
    endpoints: Vec<EndpointState>,
    recorder: Recorder,
    counters: Counters,
    down: watch::Sender<bool>,
    listening: watch::Sender<bool>,
    shutdown: watch::Sender<bool>,
    bind_errors: AtomicU64,
}

/// A running sink. Dropping it stops the listener and every connection.
pub struct Sink {
    state: Arc<State>,
    addr: SocketAddr,
}

/// See [`Sink::set_down`].
async fn set_listener_down(state: &State, addr: SocketAddr, down: bool) -> Result<(), Error> {
    state.down.send_replace(down);
    let mut listening = state.listening.subscribe();
    let reached = tokio::time::timeout(Duration::from_secs(10), listening.wait_for(|l| *l != down)).await;
    match reached {
        Ok(Ok(_)) => Ok(()),
        _ => Err(Error::Sink(format!(
            "listener on {addr} did not go {} within 10 s ({} bind errors)",
            if down { "down" } else { "up" },
            state.bind_errors.load(Relaxed)
        ))),
    }
}

impl Sink {
    /// Binds the listener and starts serving. Errors when the address is not loopback or
    /// cannot be bound, or a secret is malformed.
    pub async fn start(options: SinkOptions) -> Result<Sink, Error> {
        if !options.listen.ip().is_loopback() {
            return Err(Error::Options(format!(
                "the sink only listens on loopback, not {}",
                options.listen
            )));
        }
        let endpoints = options
            .endpoints
            .iter()
            .map(|e| {
                Ok(EndpointState {
                    key: SigningKey::from_secret(&e.secret)?,
                    behavior: RwLock::new(e.behavior),
                    counters: Counters::default(),
                })
            })
            .collect::<Result<Vec<_>, Error>>()?;
        let listener = bind(options.listen).map_err(|e| Error::Sink(format!("cannot bind {}: {e}", options.listen)))?;
        let addr = listener.local_addr().map_err(|e| Error::io("sink local address", e))?;
        let state = Arc::new(State {
            clock: options.clock,
            check_timestamps: options.check_timestamps,
            endpoints,
            recorder: Recorder::new(),
            counters: Counters::default(),
            down: watch::channel(false).0,
            listening: watch::channel(true).0,
            shutdown: watch::channel(false).0,
            bind_errors: AtomicU64::new(0),
        });
        tokio::spawn(accept_loop(state.clone(), listener, addr));
        Ok(Sink { state, addr })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The URL of endpoint `n`.
    pub fn url(&self, n: usize) -> String {
        format!("http://{}/ep/{n}", self.addr)
    }

    pub fn endpoint_count(&self) -> usize {
        self.state.endpoints.len()
    }

    /// Changes what endpoint `n` does from the next request on; unknown `n` is ignored.
    pub fn set_behavior(&self, n: usize, behavior: Behavior) {
        if let Some(ep) = self.state.endpoints.get(n) {
            *ep.behavior.write().unwrap_or_else(|e| e.into_inner()) = behavior;
        }
    }

    /// Down: the listener is closed (connections are refused) and open connections are cut.
    /// Up: the same port is bound again. Returns once the listener is in the asked state.
    pub async fn set_down(&self, down: bool) -> Result<(), Error> {
        set_listener_down(&self.state, self.addr, down).await
    }

    /// In the background: `after` from now, takes the listener down for `period`, then
    /// brings it back; the task ends with an error if the listener did not follow.
    pub fn outage(&self, after: Duration, period: Duration) -> tokio::task::JoinHandle<Result<(), Error>> {
        let (state, addr) = (self.state.clone(), self.addr);
        tokio::spawn(async move {
            tokio::time::sleep(after).await;
            set_listener_down(&state, addr, true).await?;
            tokio::time::sleep(period).await;
            set_listener_down(&state, addr, false).await
        })
    }

    pub fn recorder(&self) -> &Recorder {
        &self.state.recorder
    }

    pub fn stats(&self) -> SinkStats {
        self.state.counters.snapshot()
    }

    /// Counters of endpoint `n` (default when `n` is unknown).
    pub fn endpoint_stats(&self, n: usize) -> SinkStats {
        self.state
            .endpoints
            .get(n)
            .map(|e| e.counters.snapshot())
            .unwrap_or_default()
    }

    /// Stops accepting and cuts every connection, hung requests included.
    pub fn shutdown(&self) {
        self.state.shutdown.send_replace(true);
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    // Coming back up on the same port must work while old connections sit in TIME_WAIT.
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(4096)
}

async fn accept_loop(state: Arc<State>, listener: TcpListener, addr: SocketAddr) {
    let mut listener = Some(listener);
    let mut down = state.down.subscribe();
    let mut shutdown = state.shutdown.subscribe();
    loop {
        if *shutdown.borrow() {
            return;
        }
        if *down.borrow_and_update() {
            listener = None;
            state.listening.send_replace(false);
            tokio::select! {
                _ = down.changed() => {}
                _ = shutdown.changed() => {}
            }
            continue;
        }
        let Some(l) = listener.as_ref() else {
            match bind(addr) {
                Ok(l) => {
                    listener = Some(l);
                    state.listening.send_replace(true);
                }
                Err(_) => {
                    bump(&state.bind_errors);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
            continue;
        };
        tokio::select! {
            accepted = l.accept() => match accepted {
                Ok((stream, _)) => {
                    let _ = stream.set_nodelay(true);
                    bump(&state.counters.connections);
                    tokio::spawn(serve_connection(state.clone(), stream));
                }
                // EMFILE and friends: back off instead of spinning on the error.
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            },
            _ = down.changed() => {}
            _ = shutdown.changed() => return,
        }
    }
}

async fn serve_connection(state: Arc<State>, stream: tokio::net::TcpStream) {
    let mut down = state.down.subscribe();
    let mut shutdown = state.shutdown.subscribe();
    let service_state = state.clone();
    let service = service_fn(move |req| handle(service_state.clone(), req));
    let conn = hyper::server::conn::http1::Builder::new()
        .keep_alive(true)
        .header_read_timeout(None)
        .serve_connection(TokioIo::new(stream), service);
    tokio::select! {
        _ = conn => {}
        _ = down.wait_for(|d| *d) => {}
        _ = shutdown.wait_for(|s| *s) => {}
    }
}

/// Returned by the service to make hyper drop the connection without an answer.
#[derive(Debug)]
struct ResetConnection;

impl std::fmt::Display for ResetConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("connection reset by script")
    }
}

impl std::error::Error for ResetConnection {}

fn answer(status: StatusCode, keep_alive: bool) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::new()));
    *resp.status_mut() = status;
    if !keep_alive {
        resp.headers_mut().insert(CONNECTION, HeaderValue::from_static("close"));
    }
    resp
}

fn header<'a>(req: &'a Request<Incoming>, name: &str) -> &'a str {
    req.headers().get(name).and_then(|v| v.to_str().ok()).unwrap_or("")
}

/// `/ep/<n>` → n.
pub fn endpoint_of_path(path: &str) -> Option<usize> {
    path.strip_prefix("/ep/")?.parse().ok()
}

async fn handle(state: Arc<State>, req: Request<Incoming>) -> Result<Response<Full<Bytes>>, ResetConnection> {
    bump(&state.counters.requests);
    let Some((n, ep)) = endpoint_of_path(req.uri().path()).and_then(|n| Some((n, state.endpoints.get(n)?))) else {
        bump(&state.counters.answered_404);
        return Ok(answer(StatusCode::NOT_FOUND, true));
    };
    let counters = [&state.counters, &ep.counters];
    let count = |f: fn(&Counters) -> &AtomicU64| counters.iter().for_each(|c| bump(f(c)));
    bump(&ep.counters.requests);
    let behavior = *ep.behavior.read().unwrap_or_else(|e| e.into_inner());
    let content_type_ok = header(&req, CONTENT_TYPE.as_str()).starts_with("application/json");
    let agent_ok = header(&req, USER_AGENT.as_str()).starts_with("clickhook/");
    if !content_type_ok || !agent_ok {
        count(|c| &c.header_problems);
    }
    let webhook_id = header(&req, "webhook-id").to_string();
    let timestamp = header(&req, "webhook-timestamp").to_string();
    let signature = header(&req, "webhook-signature").to_string();
    let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => return Err(ResetConnection),
    };
    if webhook_id.is_empty() || !ep.key.verify(&webhook_id, &timestamp, &body, &signature) {
        count(|c| &c.bad_signatures);
        count(|c| &c.answered_401);
        return Ok(answer(StatusCode::UNAUTHORIZED, behavior.keep_alive));
    }
    if state.check_timestamps && !timestamp_fresh(&timestamp, unix_now()) {
        count(|c| &c.stale_timestamps);
        count(|c| &c.answered_401);
        return Ok(answer(StatusCode::UNAUTHORIZED, behavior.keep_alive));
    }
    match behavior.mode {
        Mode::Reset => {
            count(|c| &c.reset);
            return Err(ResetConnection);
        }
        Mode::Gone => {
            count(|c| &c.answered_410);
            return Ok(answer(StatusCode::GONE, behavior.keep_alive));
        }
        Mode::Hang => {
            count(|c| &c.hung);
            let mut shutdown = state.shutdown.subscribe();
            tokio::select! {
                _ = tokio::time::sleep(behavior.hang_for) => {}
                _ = shutdown.wait_for(|s| *s) => {}
            }
            return Ok(answer(StatusCode::GATEWAY_TIMEOUT, behavior.keep_alive));
        }
        Mode::Answer => {}
    }
    // Arrival is when the request came in: a scripted latency is the receiver's own time,
    // not the dispatcher's.
    let arrived = state.clock.now_us();
    if !behavior.latency.is_zero() {
        tokio::time::sleep(behavior.latency).await;
    }
    if behavior.fail_rate > 0.0 && rand::random::<f64>() < behavior.fail_rate {
        let cap = behavior.max_failures_per_event;
        if cap == 0 || state.recorder.failures_of(n as u32, &webhook_id) < cap {
            state.recorder.note_failure(n as u32, &webhook_id);
            count(|c| &c.answered_500);
            return Ok(answer(StatusCode::INTERNAL_SERVER_ERROR, behavior.keep_alive));
        }
    }
    match event_ids(&body, &webhook_id) {
        Ok(ids) => {
            if ids.mismatch {
                count(|c| &c.id_mismatches);
            }
            for id in ids.ids.iter() {
                state.recorder.record(n as u32, id, arrived);
                count(|c| &c.events_delivered);
            }
        }
        Err(_) => count(|c| &c.unparsable),
    }
    count(|c| &c.answered_2xx);
    Ok(answer(StatusCode::OK, behavior.keep_alive))
}

/// The event ids one webhook body carries.
#[derive(Debug, PartialEq, Eq)]
pub struct EventIds {
    pub ids: Vec<String>,
    /// A single-event body whose `data.id` is not its `webhook-id`.
    pub mismatch: bool,
}

#[derive(Deserialize)]
struct IdOnly {
    id: String,
}

/// The envelope's `data`, read for its event ids only.
#[derive(Deserialize)]
#[serde(untagged)]
enum DataIds {
    Many(Vec<IdOnly>),
    One(IdOnly),
}

#[derive(Deserialize)]
struct Envelope {
    #[serde(rename = "type")]
    kind: String,
    data: DataIds,
}

const SINGLE_PREFIX: &[u8] = br#"{"type":"link.clicked","#;
const DATA_ID: &[u8] = br#""data":{"id":""#;

/// Reads the event ids of a standard-format body. The common case — a single event whose
/// `data` opens with its `id` — is found by a byte scan; anything else takes a full parse.
pub fn event_ids(body: &[u8], webhook_id: &str) -> Result<EventIds, String> {
    if body.starts_with(SINGLE_PREFIX) {
        if let Some(at) = find(body, DATA_ID) {
            let rest = &body[at + DATA_ID.len()..];
            if let Some(end) = rest.iter().position(|&b| b == b'"' || b == b'\\') {
                if rest[end] == b'"' {
                    if let Ok(id) = std::str::from_utf8(&rest[..end]) {
                        return Ok(EventIds {
                            mismatch: id != webhook_id,
                            ids: vec![id.to_string()],
                        });
                    }
                }
            }
        }
    }
    let envelope: Envelope = serde_json::from_slice(body).map_err(|e| e.to_string())?;
    match (envelope.kind.as_str(), envelope.data) {
        ("link.clicked.batch", DataIds::Many(items)) => Ok(EventIds {
            ids: items.into_iter().map(|i| i.id).collect(),
            mismatch: false,
        }),
        ("link.clicked", DataIds::One(item)) => Ok(EventIds {
            mismatch: item.id != webhook_id,
            ids: vec![item.id],
        }),
        (kind, _) => Err(format!("type {kind:?} does not fit the shape of its data")),
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    let first = *needle.first()?;
    let mut from = 0;
    while let Some(pos) = haystack.get(from..)?.iter().position(|&b| b == first) {
        let at = from + pos;
        if haystack.get(at..at + needle.len())? == needle {
            return Some(at);
        }
        from = at + 1;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::signature::generate_secret;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[test]
    fn finds_the_id_of_a_single_event_without_parsing() {
        let body =
            br#"{"type":"link.clicked","timestamp":"2024-05-01T10:00:00Z","data":{"id":"evt_1","link":{"id":"L"}}}"#;
        assert_eq!(
            event_ids(body, "evt_1").unwrap(),
            EventIds {
                ids: vec!["evt_1".into()],
                mismatch: false
            }
        );
        assert!(event_ids(body, "evt_2").unwrap().mismatch);
    }

    #[test]
    fn parses_ids_placed_anywhere_and_batches() {
        let body = br#"{"type":"link.clicked","data":{"link":{"id":"L1"},"id":"evt_9"}}"#;
        assert_eq!(event_ids(body, "evt_9").unwrap().ids, vec!["evt_9"]);
        let body = br#"{"timestamp":1,"type":"link.clicked","data":{"id":"evt_9"}}"#;
        assert_eq!(event_ids(body, "evt_9").unwrap().ids, vec!["evt_9"]);
        let batch = br#"{"type":"link.clicked.batch","data":[{"id":"a","link":{"id":1}},{"link":{"id":2},"id":"b"}]}"#;
        assert_eq!(
            event_ids(batch, "batch_1").unwrap(),
            EventIds {
                ids: vec!["a".into(), "b".into()],
                mismatch: false
            }
        );
        assert!(event_ids(b"{\"type\":\"link.clicked\",\"data\":[]}", "x").is_err());
        assert!(event_ids(b"not json", "x").is_err());
        assert!(event_ids(br#"{"type":"link.clicked","data":{"id":"a\"b"}}"#, "a\"b").is_ok());
    }

    #[test]
    fn recorder_counts_firsts_and_duplicates() {
        let r = Recorder::new();
        assert!(r.record(0, "a", 10));
        assert!(r.record(1, "a", 12));
        assert!(!r.record(0, "a", 20));
        assert!(r.record(0, "b", 30));
        assert_eq!((r.unique(), r.duplicates(), r.distinct_ids()), (3, 1, 2));
        assert_eq!(r.arrival_span_us(), Some((10, 30)));
        r.with_hits("a", |h| {
            assert_eq!(
                h,
                &[
                    Hit {
                        endpoint: 0,
                        first_us: 10,
                        count: 2
                    },
                    Hit {
                        endpoint: 1,
                        first_us: 12,
                        count: 1
                    }
                ]
            )
        });
        r.with_hits("zz", |h| assert!(h.is_empty()));
    }

    struct Sent {
        status: u16,
        connection_close: bool,
    }

    /// One request on a fresh connection, signed with `secret` unless `sign` is false.
    async fn send(sink: &Sink, path: &str, secret: &str, id: &str, body: &str, sign: bool) -> std::io::Result<Sent> {
        let key = SigningKey::from_secret(secret).unwrap();
        let ts = unix_now().to_string();
        let sig = if sign {
            key.sign(id, &ts, body.as_bytes())
        } else {
            "v1,AAAA".into()
        };
        let mut s = tokio::net::TcpStream::connect(sink.addr()).await?;
        let req = format!(
            "POST {path} HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\nuser-agent: clickhook/0.1.0\r\n\
             webhook-id: {id}\r\nwebhook-timestamp: {ts}\r\nwebhook-signature: {sig}\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        );
        s.write_all(req.as_bytes()).await?;
        let mut buf = vec![0u8; 1024];
        let n = s.read(&mut buf).await?;
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::ConnectionReset,
                "closed without answer",
            ));
        }
        let text = String::from_utf8_lossy(&buf[..n]).to_lowercase();
        let status = text.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
        Ok(Sent {
            status,
            connection_close: text.contains("connection: close"),
        })
    }

    fn single(id: &str) -> String {
        format!(
            r#"{{"type":"link.clicked","timestamp":"2024-05-01T10:00:00Z","data":{{"id":"{id}","link":{{"id":1}}}}}}"#
        )
    }

    /// A delivery arrives when its request comes in: the receiver's scripted latency is
    /// its own time, not in the dispatcher's latency.
    #[tokio::test]
    async fn arrival_is_stamped_before_the_scripted_latency() {
        let secret = generate_secret();
        let endpoint = SinkEndpoint {
            secret: secret.clone(),
            behavior: Behavior {
                latency: Duration::from_millis(300),
                ..Behavior::default()
            },
        };
        let clock = Clock::new();
        let sink = Sink::start(SinkOptions::new(vec![endpoint], clock)).await.unwrap();
        let before = clock.now_us();
        let sent = send(&sink, "/ep/0", &secret, "e1", &single("e1"), true).await.unwrap();
        assert_eq!(sent.status, 200);
        let answered = clock.now_us();
        assert!(answered - before >= 300_000, "the answer waited for the latency");
        let arrived = sink.recorder().with_hits("e1", |hits| hits[0].first_us);
        assert!(
            arrived - before < 200_000,
            "stamped {} µs after the send",
            arrived - before
        );
    }

    #[tokio::test]
    async fn scripted_endpoints_answer_as_told_and_record_deliveries() {
        let secrets: Vec<String> = (0..4).map(|_| generate_secret()).collect();
        let behaviors = [
            Behavior::default(),
            Behavior {
                mode: Mode::Gone,
                ..Behavior::default()
            },
            Behavior {
                mode: Mode::Reset,
                ..Behavior::default()
            },
            Behavior {
                keep_alive: false,
                ..Behavior::flaky(1.0, 2)
            },
        ];
        let endpoints = secrets
            .iter()
            .zip(behaviors)
            .map(|(s, b)| SinkEndpoint {
                secret: s.clone(),
                behavior: b,
            })
            .collect();
        let sink = Sink::start(SinkOptions::new(endpoints, Clock::new())).await.unwrap();

        assert_eq!(
            send(&sink, "/ep/0", &secrets[0], "e1", &single("e1"), true)
                .await
                .unwrap()
                .status,
            200
        );
        assert_eq!(
            send(&sink, "/ep/0", &secrets[0], "e1", &single("e1"), true)
                .await
                .unwrap()
                .status,
            200
        );
        assert_eq!(
            send(&sink, "/ep/0", &secrets[1], "e2", &single("e2"), true)
                .await
                .unwrap()
                .status,
            401
        );
        assert_eq!(
            send(&sink, "/ep/0", &secrets[0], "e3", &single("e3"), false)
                .await
                .unwrap()
                .status,
            401
        );
        assert_eq!(
            send(&sink, "/ep/1", &secrets[1], "e4", &single("e4"), true)
                .await
                .unwrap()
                .status,
            410
        );
        assert!(send(&sink, "/ep/2", &secrets[2], "e5", &single("e5"), true)
            .await
            .is_err());
        assert_eq!(
            send(&sink, "/ep/9", &secrets[0], "e6", &single("e6"), true)
                .await
                .unwrap()
                .status,
            404
        );
        // Always failing, but at most twice per event: the third attempt goes through.
        for expected in [500, 500, 200] {
            let sent = send(&sink, "/ep/3", &secrets[3], "e7", &single("e7"), true)
                .await
                .unwrap();
            assert_eq!(sent.status, expected);
            assert!(sent.connection_close);
        }

        let stats = sink.stats();
        assert_eq!(stats.bad_signatures, 2);
        assert_eq!(
            (stats.answered_2xx, stats.answered_500, stats.answered_410, stats.reset),
            (3, 2, 1, 1)
        );
        assert_eq!(stats.header_problems, 0);
        let r = sink.recorder();
        assert_eq!((r.unique(), r.duplicates()), (2, 1));
        r.with_hits("e7", |h| assert_eq!(h[0].endpoint, 3));
        r.with_hits("e2", |h| assert!(h.is_empty()));
        assert_eq!(sink.endpoint_stats(3).answered_500, 2);
    }

    #[tokio::test]
    async fn down_refuses_connections_and_up_serves_on_the_same_port() {
        let secret = generate_secret();
        let sink = Sink::start(SinkOptions::new(
            vec![SinkEndpoint {
                secret: secret.clone(),
                behavior: Behavior::default(),
            }],
            Clock::new(),
        ))
        .await
        .unwrap();
        let addr = sink.addr();
        sink.set_down(true).await.unwrap();
        let refused = tokio::net::TcpStream::connect(addr).await;
        assert_eq!(refused.unwrap_err().kind(), std::io::ErrorKind::ConnectionRefused);
        sink.set_down(false).await.unwrap();
        assert_eq!(sink.addr(), addr);
        assert_eq!(
            send(&sink, "/ep/0", &secret, "e1", &single("e1"), true)
                .await
                .unwrap()
                .status,
            200
        );
    }

    #[tokio::test]
    async fn hung_requests_end_when_the_sink_stops() {
        let secret = generate_secret();
        let sink = Sink::start(SinkOptions::new(
            vec![SinkEndpoint {
                secret: secret.clone(),
                behavior: Behavior::hang(),
            }],
            Clock::new(),
        ))
        .await
        .unwrap();
        let pending = tokio::time::timeout(
            Duration::from_millis(300),
            send(&sink, "/ep/0", &secret, "e1", &single("e1"), true),
        )
        .await;
        assert!(pending.is_err(), "a hung endpoint answered");
        assert_eq!(sink.stats().hung, 1);
        sink.shutdown();
    }
}
