//! The CI-sized crash loop: the real daemon under continuous socket ingest and delivery to
//! two endpoints (a receiver with small random latency and about 10 % of 500s, so retries
//! are pending), killed with `kill -9` at random moments twelve times — during ingest
//! bursts, with attempts in flight, with retries pending, and right after a dead-letter
//! replay — and restarted each time. Afterwards every acknowledged click must have reached
//! both endpoints with a 2xx at least once. It prints acknowledged, delivered, lost (which
//! must be 0) and duplicates; `CRASH_SEED` replays a run and `CRASH_KILLS` sets the
//! number of kills (the long version: `loadtest/scripts/crash-loop.sh`, 100 kills). The
//! kills must stay real SIGKILLs of the real binary; nothing here may stop it gently.

mod common;

use bytes::Bytes;
use common::*;
use http_body_util::{BodyExt, Full};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

/// Kills per run; `CRASH_KILLS` sets more for the long version
/// (`loadtest/scripts/crash-loop.sh`).
fn rounds() -> usize {
    std::env::var("CRASH_KILLS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(12)
}

/// How a receiver path answers: `fail_pct` % of requests get a 500, each after a delay
/// drawn from `delay_ms`.
#[derive(Clone, Copy, Debug)]
struct Mode {
    fail_pct: u32,
    delay_ms: (u64, u64),
}

const NORMAL: Mode = Mode {
    fail_pct: 10,
    delay_ms: (0, 3),
};
const SLOW: Mode = Mode {
    fail_pct: 10,
    delay_ms: (100, 300),
};
const DOWN: Mode = Mode {
    fail_pct: 100,
    delay_ms: (0, 2),
};
const HEALTHY: Mode = Mode {
    fail_pct: 0,
    delay_ms: (0, 0),
};

#[derive(Default)]
struct ReceiverState {
    modes: HashMap<String, Mode>,
    /// (path, event id, status answered), in answer order.
    answered: Vec<(String, String, u16)>,
}

/// A webhook receiver whose per-path behaviour the test changes as it goes, and which
/// remembers what it answered to which event.
#[derive(Clone)]
struct Receiver {
    addr: std::net::SocketAddr,
    state: Arc<Mutex<ReceiverState>>,
    in_progress: Arc<AtomicUsize>,
}

impl Receiver {
    async fn start() -> Receiver {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let r = Receiver {
            addr,
            state: Arc::default(),
            in_progress: Arc::default(),
        };
        let rx = r.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let rx = rx.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req| rx.clone().answer(req));
                    let _ = http1::Builder::new().serve_connection(TokioIo::new(stream), svc).await;
                });
            }
        });
        r
    }

    fn set(&self, path: &str, mode: Mode) {
        self.state.lock().unwrap().modes.insert(path.into(), mode);
    }

    async fn answer(self, req: Request<hyper::body::Incoming>) -> Result<Response<Full<Bytes>>, hyper::Error> {
        let path = req.uri().path().to_string();
        let body = req.into_body().collect().await?.to_bytes();
        let id = serde_json::from_slice::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v["data"]["id"].as_str().map(String::from))
            .unwrap_or_default();
        let mode = self.state.lock().unwrap().modes.get(&path).copied().unwrap_or(HEALTHY);
        let (status, delay) = {
            let mut rng = rand::thread_rng();
            let status = if rng.gen_range(0..100) < mode.fail_pct {
                500
            } else {
                200
            };
            (status, rng.gen_range(mode.delay_ms.0..=mode.delay_ms.1))
        };
        {
            // Counted while the answer is pending, also when the daemon dies meanwhile and
            // the connection's task is dropped.
            let _in_progress = InProgress::enter(&self.in_progress);
            tokio::time::sleep(Duration::from_millis(delay)).await;
        }
        self.state.lock().unwrap().answered.push((path, id, status));
        let mut resp = Response::new(Full::new(Bytes::from_static(b"ok")));
        *resp.status_mut() = hyper::StatusCode::from_u16(status).unwrap();
        Ok(resp)
    }

    /// Distinct event ids answered 2xx on `path`, and how many 2xx answers there were.
    fn delivered(&self, path: &str) -> (HashSet<String>, usize) {
        let st = self.state.lock().unwrap();
        let ok: Vec<&String> = st
            .answered
            .iter()
            .filter(|(p, _, s)| p == path && *s < 300)
            .map(|(_, id, _)| id)
            .collect();
        (ok.iter().map(|s| s.to_string()).collect(), ok.len())
    }

    fn requests(&self, path: &str) -> usize {
        self.state
            .lock()
            .unwrap()
            .answered
            .iter()
            .filter(|(p, ..)| p == path)
            .count()
    }
}

struct InProgress<'a>(&'a AtomicUsize);

impl<'a> InProgress<'a> {
    fn enter(n: &'a AtomicUsize) -> Self {
        n.fetch_add(1, Ordering::SeqCst);
        InProgress(n)
    }
}

impl Drop for InProgress<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Streams clicks over the socket until the connection dies or `n` are written; returns
/// the ids acknowledged (only `ok` lines count). `paced`: about 2,500 lines a second, so
/// ingest is still going whenever the kill comes; otherwise as fast as the socket takes them.
async fn stream(socket: std::path::PathBuf, n: usize, paced: bool, tag: String, acks: Arc<AtomicUsize>) -> Vec<String> {
    let Ok(conn) = tokio::net::UnixStream::connect(&socket).await else {
        return vec![];
    };
    let (read, mut write) = conn.into_split();
    tokio::spawn(async move {
        for i in 0..n {
            let line = format!("{}\n", click(&format!("{tag}-{i}"), "w"));
            if write.write_all(line.as_bytes()).await.is_err() {
                return;
            }
            if paced && i % 5 == 4 {
                tokio::time::sleep(Duration::from_millis(2)).await;
            } else if i % 50 == 0 {
                tokio::task::yield_now().await;
            }
        }
        let _ = write.shutdown().await;
    });
    let mut acked = Vec::new();
    let mut lines = BufReader::new(read).lines();
    while let Ok(Some(l)) = lines.next_line().await {
        if let Some(id) = l.strip_prefix("ok ") {
            acked.push(id.to_string());
            acks.store(acked.len(), Ordering::SeqCst);
        }
    }
    acked
}

async fn until(limit: Duration, mut check: impl AsyncFnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if check().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    false
}

#[derive(Clone, Copy, Debug)]
enum Moment {
    IngestBurst,
    AttemptsInFlight,
    RetriesPending,
    RightAfterReplay,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twelve_kill_9s_at_random_moments_lose_no_acknowledged_click() {
    let started = Instant::now();
    let seed: u64 = std::env::var("CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| rand::thread_rng().gen());
    eprintln!("CRASH_SEED={seed}");
    let mut rng = StdRng::seed_from_u64(seed);
    let rx = Receiver::start().await;
    rx.set("/a", NORMAL);
    rx.set("/b", NORMAL);
    let base = format!("http://{}", rx.addr);
    let eps = endpoint("a", &format!("{base}/a"), "max_concurrency = 8")
        + &endpoint("b", &format!("{base}/b"), "max_concurrency = 8");
    // A short schedule: five attempts within ~0.4 s, then the dead letter.
    let cfg = config_text(&eps)
        + "\n[retry]\nschedule = [\"20ms\", \"50ms\", \"100ms\", \"200ms\"]\njitter = 0.2\n[breaker]\nfailures = 100000\n";
    let mut d = Daemon::start(&cfg);
    let mut acknowledged: Vec<String> = Vec::new();
    let mut replayed_before_kill = 0;

    let rounds = rounds();
    for round in 0..rounds {
        let moment = [
            Moment::IngestBurst,
            Moment::AttemptsInFlight,
            Moment::RetriesPending,
            Moment::RightAfterReplay,
        ][round % 4];
        let acks = Arc::new(AtomicUsize::new(0));
        let burst = matches!(moment, Moment::IngestBurst);
        let n = if burst { 4000 } else { 100_000 };
        let streamer = tokio::spawn(stream(d.socket.clone(), n, !burst, format!("r{round}"), acks.clone()));
        // Whatever the moment, ingest is under way when the kill comes.
        let first = rng.gen_range(10..200);
        let ingesting = until(Duration::from_secs(20), async || acks.load(Ordering::SeqCst) >= first).await;
        assert!(ingesting, "round {round}: no acknowledgement within 20 s\n{}", d.logs());
        let ready = match moment {
            Moment::IngestBurst => {
                let at = rng.gen_range(50..1500);
                until(Duration::from_secs(20), async || acks.load(Ordering::SeqCst) >= at).await
            }
            Moment::AttemptsInFlight => {
                rx.set("/a", SLOW);
                rx.set("/b", SLOW);
                let want = rng.gen_range(1..=8);
                let ok = until(Duration::from_secs(20), async || {
                    rx.in_progress.load(Ordering::SeqCst) >= want
                })
                .await;
                tokio::time::sleep(Duration::from_millis(rng.gen_range(0..30))).await;
                ok
            }
            Moment::RetriesPending => {
                rx.set("/a", DOWN);
                let want = rng.gen_range(5.0..40.0);
                until(Duration::from_secs(20), async || {
                    let failed = d
                        .metric("clickhook_delivery_attempts_total{endpoint=\"a\",outcome=\"http_5xx\"}")
                        .await;
                    let pending = d.metric("clickhook_endpoint_pending{endpoint=\"a\"}").await;
                    failed >= want && pending > 0.0
                })
                .await
            }
            Moment::RightAfterReplay => {
                // Dead letters on b first, then b recovers and they are replayed.
                rx.set("/b", DOWN);
                let ok = until(Duration::from_secs(20), async || {
                    d.metric("clickhook_dead_letters_total{endpoint=\"b\"}").await >= 5.0
                })
                .await;
                rx.set("/b", NORMAL);
                let (status, v) = request(
                    "POST",
                    &format!("{}/v1/endpoints/b/replay", d.admin),
                    r#"{"dead":true}"#,
                    &[],
                )
                .await;
                assert_eq!(status, 200, "replay: {v}");
                replayed_before_kill += v["replayed"].as_u64().unwrap_or(0);
                tokio::time::sleep(Duration::from_millis(rng.gen_range(0..20))).await;
                ok
            }
        };
        let in_flight = rx.in_progress.load(Ordering::SeqCst);
        d.kill9();
        let acked = streamer.await.unwrap();
        let streamed_on = !burst && acked.len() < n;
        eprintln!(
            "round {round:2} {moment:?}: kill -9 after {} acknowledgements, {in_flight} attempts in flight",
            acked.len()
        );
        assert!(burst || streamed_on, "round {round}: the stream ended before the kill");
        assert!(ready, "round {round}: the {moment:?} moment never came\n{}", d.logs());
        acknowledged.extend(acked);
        rx.set("/a", NORMAL);
        rx.set("/b", NORMAL);
        d.spawn();
    }
    assert!(replayed_before_kill > 0, "the replay rounds replayed dead letters");

    // Settle: healthy receiver, dead letters replayed until both endpoints have everything.
    rx.set("/a", HEALTHY);
    rx.set("/b", HEALTHY);
    let want: HashSet<&String> = acknowledged.iter().collect();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let complete = ["/a", "/b"].iter().all(|p| {
            let (got, _) = rx.delivered(p);
            want.iter().all(|id| got.contains(*id))
        });
        if complete || Instant::now() > deadline {
            break;
        }
        for ep in ["a", "b"] {
            let _ = request(
                "POST",
                &format!("{}/v1/endpoints/{ep}/replay", d.admin),
                r#"{"dead":true}"#,
                &[],
            )
            .await;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let mut lost_total = 0;
    for path in ["/a", "/b"] {
        let (got, oks) = rx.delivered(path);
        let lost: Vec<&&String> = want.iter().filter(|id| !got.contains(**id)).collect();
        let duplicates = oks - got.len();
        let delivered = want.iter().filter(|id| got.contains(**id)).count();
        eprintln!(
            "{path}: acknowledged {}, delivered {delivered} (+{} durable but unacknowledged when killed; {} requests, \
             {oks} answered 2xx), lost {}, duplicates {duplicates}",
            want.len(),
            got.len() - delivered,
            rx.requests(path),
            lost.len(),
        );
        if !lost.is_empty() {
            eprintln!("{path}: lost, first few: {:?}", &lost[..lost.len().min(10)]);
        }
        lost_total += lost.len();
    }
    eprintln!("{rounds} kill -9 rounds in {:?}", started.elapsed());
    assert!(
        acknowledged.len() > 1000,
        "the loop acknowledged too little to prove anything"
    );
    assert_eq!(want.len(), acknowledged.len(), "every acknowledged id is unique");
    assert_eq!(
        lost_total, 0,
        "acknowledged clicks that never reached an endpoint with a 2xx (CRASH_SEED={seed})"
    );
    let _ = d.terminate();
}
