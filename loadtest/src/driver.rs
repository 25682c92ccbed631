//! The click driver: pushes clicks into the daemon over K kept-alive HTTP connections
//! (`POST /v1/clicks`, one object or an array of `batch`) or K Unix-socket connections
//! (NDJSON written pipelined while a reader takes the `ok <id>` / `err <reason>` replies in
//! order), at a fixed rate or as fast as acknowledgements come. It owns what was sent, what
//! was acknowledged with which id and when, and why anything was not. It must never resend
//! a click whose fate is unknown (that would blur loss and duplicate counts), must stop at
//! its click count or deadline, whichever comes first, and must not buffer without bound:
//! each socket connection has a fixed window of unanswered lines.

use crate::clicks::ClickFactory;
use crate::clock::Clock;
use crate::http::Http1;
use crate::scenario::Routing;
use bytes::Bytes;
use hyper::{Method, StatusCode};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::ops::Range;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::sync::{mpsc, Semaphore};

/// Unanswered lines allowed per socket connection before the writer waits.
pub(crate) const SOCKET_WINDOW: usize = 4096;
/// Longest wait for one acknowledgement; beyond it the daemon is considered stuck.
const ACK_TIMEOUT: Duration = Duration::from_secs(60);
/// 503 answers retried per request before giving up on it.
const MAX_BUSY_RETRIES: u32 = 100;
/// How the daemon's 503 error starts when its write to the log failed partway: the clicks
/// may be stored (README, "A failed write to the log"), so sending them again could
/// deliver one twice under two ids, and their fate is unknown.
const STORAGE_FAILED: &str = "storage failed";

/// The error of a 503 whose clicks may be stored.
fn may_be_stored(body: &[u8]) -> Option<String> {
    let answer: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
    answer["error"]
        .as_str()
        .filter(|e| e.starts_with(STORAGE_FAILED))
        .map(str::to_owned)
}

#[derive(Clone, Debug)]
pub enum IngestTarget {
    Http { addr: SocketAddr, token: Option<String> },
    Unix(PathBuf),
}

#[derive(Clone, Debug)]
pub struct DriveOptions {
    pub clicks: u64,
    /// Clicks per second over all connections; `None` = as fast as acknowledgements allow.
    pub rate: Option<u64>,
    pub connections: usize,
    pub batch: usize,
    /// No new request starts after this.
    pub deadline: Instant,
    /// A connection that cannot connect for this long stops: the daemon is gone, and
    /// the run should end now rather than at the deadline.
    pub give_up_connecting: Duration,
}

/// One acknowledged click.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ack {
    pub id: Box<str>,
    pub link: u64,
    /// When the click went out (the request, or the socket write, that was answered): the
    /// daemon accepted it between this and `at_us`, so latency is measured from here.
    pub sent_us: u64,
    /// When its acknowledgement was read.
    pub at_us: u64,
}

/// Live counters, read by the progress line while the driver runs.
pub struct DriveCounters {
    pub sent: AtomicU64,
    pub acked: AtomicU64,
    pub rejected: AtomicU64,
    /// Acknowledgements naming another id than the click's own client id.
    pub client_id_mismatches: AtomicU64,
    /// Deliveries the acknowledged clicks call for (sum of their matching endpoints).
    pub expected_deliveries: AtomicU64,
    /// JSON bytes of the acknowledged clicks.
    pub raw_bytes: AtomicU64,
    pub first_send_us: AtomicU64,
    pub last_ack_us: AtomicU64,
    errors: Mutex<BTreeMap<String, u64>>,
}

impl Default for DriveCounters {
    fn default() -> Self {
        DriveCounters {
            sent: AtomicU64::new(0),
            acked: AtomicU64::new(0),
            rejected: AtomicU64::new(0),
            client_id_mismatches: AtomicU64::new(0),
            expected_deliveries: AtomicU64::new(0),
            raw_bytes: AtomicU64::new(0),
            first_send_us: AtomicU64::new(u64::MAX),
            last_ack_us: AtomicU64::new(0),
            errors: Mutex::new(BTreeMap::new()),
        }
    }
}

impl DriveCounters {
    pub fn error(&self, kind: impl Into<String>) {
        self.errors_n(kind, 1);
    }

    fn errors_n(&self, kind: impl Into<String>, n: u64) {
        let mut errors = self.errors.lock().unwrap_or_else(|e| e.into_inner());
        *errors.entry(kind.into()).or_insert(0) += n;
    }

    pub fn errors(&self) -> BTreeMap<String, u64> {
        self.errors.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// (first send, last acknowledgement) once anything was acknowledged.
    pub fn span_us(&self) -> Option<(u64, u64)> {
        let first = self.first_send_us.load(Relaxed);
        let last = self.last_ack_us.load(Relaxed);
        (first != u64::MAX && last >= first && self.acked.load(Relaxed) > 0).then_some((first, last))
    }
}

struct Shared {
    opts: DriveOptions,
    factory: Arc<ClickFactory>,
    routing: Arc<Routing>,
    clock: Clock,
    counters: Arc<DriveCounters>,
    next: AtomicU64,
    start: Instant,
}

impl Shared {
    /// The next clicks this connection sends, or `None` when the run is over.
    fn claim(&self) -> Option<Range<u64>> {
        if Instant::now() >= self.opts.deadline {
            return None;
        }
        let batch = self.opts.batch as u64;
        let first = self.next.fetch_add(batch, Relaxed);
        (first < self.opts.clicks).then(|| first..(first + batch).min(self.opts.clicks))
    }

    /// Waits until click `i` is due at the configured rate.
    async fn pace(&self, i: u64) {
        if let Some(rate) = self.opts.rate.filter(|r| *r > 0) {
            let due = self.start + Duration::from_secs_f64(i as f64 / rate as f64);
            if due > Instant::now() {
                tokio::time::sleep_until(due.into()).await;
            }
        }
    }

    fn note_send(&self, n: u64) {
        self.counters.sent.fetch_add(n, Relaxed);
        self.counters.first_send_us.fetch_min(self.clock.now_us(), Relaxed);
    }

    fn note_ack(&self, acks: &mut Vec<Ack>, id: &str, click: &Sent, at_us: u64) {
        if let Some(expected) = self.factory.client_id(click.index) {
            if expected != id {
                // Counted once, where the report fails the run on it.
                self.counters.client_id_mismatches.fetch_add(1, Relaxed);
            }
        }
        acks.push(Ack {
            id: id.into(),
            link: click.link,
            sent_us: click.sent_us,
            at_us,
        });
        self.counters.acked.fetch_add(1, Relaxed);
        self.counters.raw_bytes.fetch_add(click.bytes, Relaxed);
        self.counters
            .expected_deliveries
            .fetch_add(self.routing.expected_count(click.link), Relaxed);
        self.counters.last_ack_us.fetch_max(at_us, Relaxed);
    }
}

/// What the driver remembers of a click until its acknowledgement.
#[derive(Clone, Copy, Debug)]
struct Sent {
    index: u64,
    link: u64,
    bytes: u64,
    /// When it went out: the start of the request, or the socket write, that was answered.
    sent_us: u64,
}

/// Sends up to `opts.clicks` clicks and returns every acknowledged one.
pub async fn drive(
    target: IngestTarget,
    opts: DriveOptions,
    factory: Arc<ClickFactory>,
    routing: Arc<Routing>,
    clock: Clock,
    counters: Arc<DriveCounters>,
) -> Vec<Ack> {
    let connections = opts.connections.max(1);
    let shared = Arc::new(Shared {
        opts,
        factory,
        routing,
        clock,
        counters,
        next: AtomicU64::new(0),
        start: Instant::now(),
    });
    let workers: Vec<_> = (0..connections)
        .map(|_| {
            let shared = shared.clone();
            let target = target.clone();
            tokio::spawn(async move {
                match target {
                    IngestTarget::Http { addr, token } => http_worker(shared, addr, token).await,
                    IngestTarget::Unix(path) => unix_worker(shared, path).await,
                }
            })
        })
        .collect();
    let mut acks = Vec::new();
    for w in workers {
        match w.await {
            Ok(mut a) => acks.append(&mut a),
            Err(e) => shared.counters.error(format!("driver task failed: {e}")),
        }
    }
    acks
}

fn build_body(shared: &Shared, range: Range<u64>, body: &mut Vec<u8>, sent: &mut Vec<Sent>) {
    body.clear();
    sent.clear();
    let array = shared.opts.batch > 1;
    if array {
        body.push(b'[');
    }
    for i in range {
        if array && body.len() > 1 {
            body.push(b',');
        }
        let before = body.len();
        let link = shared.factory.write(i, body);
        sent.push(Sent {
            index: i,
            link,
            bytes: (body.len() - before) as u64,
            sent_us: 0,
        });
    }
    if array {
        body.push(b']');
    }
}

#[derive(Deserialize)]
struct Accepted {
    accepted: u64,
    ids: Vec<String>,
}

fn retry_after(answer: &crate::http::Answer) -> Duration {
    let secs = answer
        .headers
        .get(hyper::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .unwrap_or(1);
    Duration::from_secs(secs.clamp(1, 5))
}

async fn http_worker(shared: Arc<Shared>, addr: SocketAddr, token: Option<String>) -> Vec<Ack> {
    let counters = &shared.counters;
    let auth = token.map(|t| format!("Bearer {t}"));
    let mut acks = Vec::new();
    let mut conn: Option<Http1> = None;
    // Since when connecting has failed without a success in between.
    let mut refused_since: Option<Instant> = None;
    let mut body = Vec::with_capacity(shared.opts.batch * 700 + 2);
    let mut sent = Vec::with_capacity(shared.opts.batch);
    'claims: while let Some(range) = shared.claim() {
        shared.pace(range.start).await;
        build_body(&shared, range, &mut body, &mut sent);
        let payload = Bytes::copy_from_slice(&body);
        let mut busy = 0;
        let mut first_attempt = true;
        loop {
            if Instant::now() >= shared.opts.deadline {
                counters.error("unsent at the deadline");
                break 'claims;
            }
            let mut c = match conn.take().filter(Http1::is_open) {
                Some(c) => c,
                None => match Http1::connect(addr).await {
                    Ok(c) => {
                        refused_since = None;
                        c
                    }
                    Err(e) => {
                        counters.error(format!("connect: {}", e.kind()));
                        let since = *refused_since.get_or_insert_with(Instant::now);
                        if since.elapsed() >= shared.opts.give_up_connecting {
                            counters.error("unsent: no connection to the daemon for the give-up time");
                            break 'claims;
                        }
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
            };
            if first_attempt {
                shared.note_send(sent.len() as u64);
                first_attempt = false;
            }
            let mut headers = vec![("content-type", "application/json")];
            if let Some(a) = &auth {
                headers.push(("authorization", a.as_str()));
            }
            let sent_us = shared.clock.now_us();
            for s in sent.iter_mut() {
                s.sent_us = sent_us;
            }
            let answer = match c
                .request(Method::POST, "/v1/clicks", &headers, payload.clone(), ACK_TIMEOUT)
                .await
            {
                Ok(a) => a,
                Err(e) => {
                    // The daemon may or may not have stored these: never resend them.
                    counters.error(format!("request failed, fate unknown: {}", first_words(&e)));
                    break;
                }
            };
            let at_us = shared.clock.now_us();
            conn = Some(c);
            let stored_maybe = match answer.status {
                StatusCode::SERVICE_UNAVAILABLE => may_be_stored(&answer.body),
                _ => None,
            };
            match (answer.status, stored_maybe) {
                (StatusCode::ACCEPTED, _) => {
                    match serde_json::from_slice::<Accepted>(&answer.body) {
                        Ok(a) if a.ids.len() == sent.len() && a.accepted == sent.len() as u64 => {
                            for (id, click) in a.ids.iter().zip(&sent) {
                                shared.note_ack(&mut acks, id, click, at_us);
                            }
                        }
                        Ok(a) => counters.error(format!(
                            "202 for {} clicks names accepted={} and {} ids",
                            sent.len(),
                            a.accepted,
                            a.ids.len()
                        )),
                        Err(e) => counters.error(format!("202 body unreadable: {e}")),
                    }
                    break;
                }
                (StatusCode::SERVICE_UNAVAILABLE, Some(error)) => {
                    // Never resent, as a request with no answer.
                    counters.error(format!("503, fate unknown: {}", first_words(&error)));
                    break;
                }
                (StatusCode::SERVICE_UNAVAILABLE, None) if busy < MAX_BUSY_RETRIES => {
                    // Any other 503 stored nothing (SPEC §3.2), so the same clicks may go
                    // again.
                    busy += 1;
                    counters.error("503, retried");
                    tokio::time::sleep(retry_after(&answer)).await;
                }
                (status, _) => {
                    counters.rejected.fetch_add(sent.len() as u64, Relaxed);
                    let text = String::from_utf8_lossy(&answer.body);
                    counters.error(format!("status {}: {}", status.as_u16(), first_words(&text)));
                    break;
                }
            }
        }
    }
    acks
}

/// The start of an error text, so that error kinds group instead of listing every id.
fn first_words(text: &str) -> String {
    let t: String = text.chars().take(80).collect();
    t.split(|c: char| c.is_ascii_digit())
        .next()
        .unwrap_or("")
        .trim()
        .to_string()
}

async fn unix_worker(shared: Arc<Shared>, path: PathBuf) -> Vec<Ack> {
    let stream = match tokio::net::UnixStream::connect(&path).await {
        Ok(s) => s,
        Err(e) => {
            shared.counters.error(format!("socket connect: {}", e.kind()));
            return Vec::new();
        }
    };
    let (rd, mut wr) = stream.into_split();
    let window = Arc::new(Semaphore::new(SOCKET_WINDOW));
    let (tx, rx) = mpsc::unbounded_channel::<Sent>();
    let reader = tokio::spawn(unix_reader(shared.clone(), rd, rx, window.clone()));
    let mut buf = Vec::with_capacity(shared.opts.batch * 700);
    let mut sent = Vec::with_capacity(shared.opts.batch);
    while let Some(range) = shared.claim() {
        shared.pace(range.start).await;
        buf.clear();
        sent.clear();
        for i in range {
            let before = buf.len();
            let link = shared.factory.write(i, &mut buf);
            sent.push(Sent {
                index: i,
                link,
                bytes: (buf.len() - before) as u64,
                sent_us: 0,
            });
            buf.push(b'\n');
        }
        let n = sent.len().min(SOCKET_WINDOW) as u32;
        match tokio::time::timeout(ACK_TIMEOUT, window.acquire_many(n)).await {
            Ok(Ok(permits)) => permits.forget(),
            // Closed: the reader stopped (daemon closed the socket). Elapsed: nothing answered.
            Ok(Err(_)) => break,
            Err(_) => {
                shared.counters.error("socket: no replies within the ack timeout");
                break;
            }
        }
        // Queue before writing, so a reply can never come for a line the reader does not know.
        let sent_us = shared.clock.now_us();
        if sent.iter().any(|s| tx.send(Sent { sent_us, ..*s }).is_err()) {
            break;
        }
        shared.note_send(sent.len() as u64);
        if let Err(e) = wr.write_all(&buf).await {
            shared.counters.error(format!("socket write: {}", e.kind()));
            break;
        }
    }
    drop(tx);
    let acks = match reader.await {
        Ok(acks) => acks,
        Err(e) => {
            shared.counters.error(format!("socket reader failed: {e}"));
            Vec::new()
        }
    };
    let _ = wr.shutdown().await;
    acks
}

async fn unix_reader(
    shared: Arc<Shared>,
    rd: tokio::net::unix::OwnedReadHalf,
    mut pending: mpsc::UnboundedReceiver<Sent>,
    window: Arc<Semaphore>,
) -> Vec<Ack> {
    let mut acks = Vec::new();
    let mut lines = BufReader::new(rd).lines();
    let mut unanswered = 0u64;
    while let Some(click) = pending.recv().await {
        unanswered = 1;
        let line = match tokio::time::timeout(ACK_TIMEOUT, lines.next_line()).await {
            Ok(Ok(Some(line))) => line,
            Ok(Ok(None)) => {
                shared.counters.error("socket closed by the daemon");
                break;
            }
            Ok(Err(e)) => {
                shared.counters.error(format!("socket read: {}", e.kind()));
                break;
            }
            Err(_) => {
                shared.counters.error("socket: no reply within the ack timeout");
                break;
            }
        };
        unanswered = 0;
        window.add_permits(1);
        let at_us = shared.clock.now_us();
        match parse_reply(&line) {
            Reply::Ok(id) => shared.note_ack(&mut acks, id, &click, at_us),
            Reply::Err(reason) => {
                shared.counters.rejected.fetch_add(1, Relaxed);
                shared.counters.error(format!("err {}", first_words(reason)));
            }
            Reply::Garbled => shared
                .counters
                .error(format!("unreadable socket reply: {}", first_words(&line))),
        }
    }
    window.close();
    pending.close();
    while pending.try_recv().is_ok() {
        unanswered += 1;
    }
    if unanswered > 0 {
        shared
            .counters
            .errors_n("socket lines left unanswered, fate unknown", unanswered);
    }
    acks
}

#[derive(Debug, PartialEq, Eq)]
enum Reply<'a> {
    Ok(&'a str),
    Err(&'a str),
    Garbled,
}

fn parse_reply(line: &str) -> Reply<'_> {
    let line = line.trim_end();
    if let Some(id) = line
        .strip_prefix("ok ")
        .filter(|id| !id.is_empty() && !id.contains(' '))
    {
        Reply::Ok(id)
    } else if let Some(reason) = line.strip_prefix("err") {
        Reply::Err(reason.trim_start())
    } else {
        Reply::Garbled
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scenario::{Plan, Scenario};

    #[test]
    fn socket_replies_parse() {
        assert_eq!(parse_reply("ok 0192abc\n"), Reply::Ok("0192abc"));
        assert_eq!(parse_reply("err missing link.id"), Reply::Err("missing link.id"));
        assert_eq!(parse_reply("ok "), Reply::Garbled);
        assert_eq!(parse_reply("hello"), Reply::Garbled);
    }

    #[test]
    fn error_kinds_group_without_numbers() {
        assert_eq!(first_words("status 400: bad index 17"), "status");
        assert_eq!(first_words("connection reset"), "connection reset");
    }

    fn shared(clicks: u64, batch: usize) -> (Arc<ClickFactory>, Arc<Routing>, Arc<DriveCounters>, DriveOptions) {
        let plan = Plan::new(Scenario::Fanout);
        let opts = DriveOptions {
            clicks,
            rate: None,
            connections: 2,
            batch,
            deadline: Instant::now() + Duration::from_secs(20),
            give_up_connecting: Duration::from_secs(20),
        };
        (
            Arc::new(ClickFactory::new(plan.links, "t", false, "2024-05-01T10:00:00Z".into())),
            Arc::new(Routing::new(&plan)),
            Arc::new(DriveCounters::default()),
            opts,
        )
    }

    /// A stand-in ingest socket: answers `ok c<n>` per line, and `err` for every 10th line.
    async fn fake_socket(path: PathBuf) {
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let (rd, mut wr) = stream.into_split();
                let mut lines = BufReader::new(rd).lines();
                let mut n = 0u64;
                while let Ok(Some(line)) = lines.next_line().await {
                    let v: serde_json::Value = serde_json::from_str(&line).unwrap();
                    assert!(v["link"]["id"].is_u64());
                    n += 1;
                    let reply = if n % 10 == 0 {
                        "err storage full\n".to_string()
                    } else {
                        format!("ok c{n}-{line_len}\n", line_len = line.len())
                    };
                    if wr.write_all(reply.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    }

    #[tokio::test]
    async fn socket_driver_pipelines_and_matches_replies_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        let server = tokio::spawn(fake_socket(path.clone()));
        tokio::time::sleep(Duration::from_millis(50)).await;
        let (factory, routing, counters, opts) = shared(1000, 7);
        let acks = drive(
            IngestTarget::Unix(path),
            opts,
            factory,
            routing,
            Clock::new(),
            counters.clone(),
        )
        .await;
        server.abort();
        // Each connection answers err for its every 10th line.
        assert_eq!(acks.len() as u64 + counters.rejected.load(Relaxed), 1000);
        assert!(acks.len() >= 890 && acks.len() <= 910, "{}", acks.len());
        assert_eq!(counters.expected_deliveries.load(Relaxed), acks.len() as u64 * 10);
        assert!(counters.raw_bytes.load(Relaxed) > 500 * acks.len() as u64);
        assert_eq!(
            counters.errors().get("err storage full"),
            Some(&(1000 - acks.len() as u64))
        );
    }

    /// A stand-in ingest server speaking just enough HTTP/1.1 for the driver.
    async fn fake_http() -> SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let svc = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| async move {
                    use http_body_util::BodyExt;
                    let body = req.into_body().collect().await?.to_bytes();
                    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
                    let count = v.as_array().map_or(1, Vec::len);
                    let ids: Vec<String> = (0..count).map(|i| format!("id-{i}-{}", body.len())).collect();
                    let text = serde_json::json!({"accepted": count, "ids": ids}).to_string();
                    let mut resp = hyper::Response::new(http_body_util::Full::new(Bytes::from(text)));
                    *resp.status_mut() = StatusCode::ACCEPTED;
                    Ok::<_, hyper::Error>(resp)
                });
                tokio::spawn(
                    hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), svc),
                );
            }
        });
        addr
    }

    #[tokio::test]
    async fn http_driver_batches_and_records_every_id() {
        let addr = fake_http().await;
        let (factory, routing, counters, opts) = shared(250, 20);
        let acks = drive(
            IngestTarget::Http { addr, token: None },
            opts,
            factory,
            routing,
            Clock::new(),
            counters.clone(),
        )
        .await;
        assert_eq!(acks.len(), 250, "{:?}", counters.errors());
        assert_eq!(counters.sent.load(Relaxed), 250);
        assert!(counters.span_us().is_some());
        assert!(counters.errors().is_empty(), "{:?}", counters.errors());
    }

    /// A stand-in ingest server that answers every request 503 with `error`, and counts them.
    async fn fake_http_503(error: &'static str) -> (SocketAddr, Arc<AtomicU64>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let requests = Arc::new(AtomicU64::new(0));
        let counted = requests.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let counted = counted.clone();
                let svc = hyper::service::service_fn(move |_req: hyper::Request<hyper::body::Incoming>| {
                    counted.fetch_add(1, Relaxed);
                    let text = serde_json::json!({ "error": error }).to_string();
                    let mut resp = hyper::Response::new(http_body_util::Full::new(Bytes::from(text)));
                    *resp.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
                    async move { Ok::<_, hyper::Error>(resp) }
                });
                tokio::spawn(
                    hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), svc),
                );
            }
        });
        (addr, requests)
    }

    /// [`drive`] at an HTTP ingest at `addr`, for at most `within`.
    async fn drive_http_within(
        within: Duration,
        addr: SocketAddr,
        (factory, routing, counters, opts): (Arc<ClickFactory>, Arc<Routing>, Arc<DriveCounters>, DriveOptions),
    ) -> Result<Vec<Ack>, tokio::time::error::Elapsed> {
        let target = IngestTarget::Http { addr, token: None };
        tokio::time::timeout(within, drive(target, opts, factory, routing, Clock::new(), counters)).await
    }

    /// A 503 for a write that failed may have stored its clicks: they are not sent again
    /// (a stored one would then arrive twice, under two ids) and count as fate unknown.
    #[tokio::test]
    async fn clicks_refused_by_a_failed_write_are_not_sent_again() {
        let (addr, requests) = fake_http_503("storage failed: No space left on device").await;
        let (factory, routing, counters, opts) = shared(20, 10);
        let acks = drive_http_within(
            Duration::from_secs(10),
            addr,
            (factory, routing, counters.clone(), opts),
        )
        .await;
        // Sent again, the 503s would go on past the first second's retry.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert_eq!(requests.load(Relaxed), 2, "one request for each batch of 10");
        assert_eq!(acks.map(|a| a.len()).ok(), Some(0));
        assert_eq!(
            counters
                .errors()
                .get("503, fate unknown: storage failed: No space left on device"),
            Some(&2),
            "{:?}",
            counters.errors()
        );
    }

    /// A daemon that stops listening ends the run once connecting has failed for the
    /// give-up time, not at the ingest deadline (30 minutes by default).
    #[tokio::test]
    async fn a_daemon_that_is_gone_ends_ingest_at_the_give_up_time() {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = probe.local_addr().unwrap();
        drop(probe);
        let (factory, routing, counters, mut opts) = shared(1000, 10);
        opts.deadline = Instant::now() + Duration::from_secs(600);
        opts.give_up_connecting = Duration::from_millis(300);
        let started = Instant::now();
        let acks = drive_http_within(
            Duration::from_secs(20),
            addr,
            (factory, routing, counters.clone(), opts),
        )
        .await
        .expect("ingest ended long before its deadline");
        assert!(acks.is_empty());
        assert!(started.elapsed() < Duration::from_secs(5), "{:?}", started.elapsed());
        assert!(
            counters
                .errors()
                .keys()
                .any(|k| k.contains("no connection to the daemon")),
            "{:?}",
            counters.errors()
        );
    }

    #[tokio::test]
    async fn rate_and_deadline_bound_the_run() {
        let addr = fake_http().await;
        let (factory, routing, counters, mut opts) = shared(1_000_000, 1);
        opts.rate = Some(200);
        opts.deadline = Instant::now() + Duration::from_millis(500);
        let started = Instant::now();
        let acks = drive(
            IngestTarget::Http { addr, token: None },
            opts,
            factory,
            routing,
            Clock::new(),
            counters,
        )
        .await;
        assert!(started.elapsed() < Duration::from_secs(3));
        assert!((60..=140).contains(&acks.len()), "{}", acks.len());
    }
}
