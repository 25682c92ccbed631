//! The endpoint fault matrix of SPEC §4, against the real daemon. Endpoints that refuse
//! connections, close or reset the connection after reading the request, cut their answer
//! short, answer slowly, trickle their body past the timeout, hang, answer 3xx, 4xx, 5xx,
//! 429 or 503 with `Retry-After`, 410, an oversized body, or bytes that are not HTTP: each
//! ends in delivery, retry, dead letter or disable as SPEC §4 says, counted under the right
//! `outcome` of `clickhook_delivery_attempts_total`, with the daemon's memory and its
//! connections to the endpoint bounded. With all of them at once, a healthy endpoint beside
//! them receives every click before any faulty endpoint's first attempt could time out,
//! and endpoints sharing a receiver's request slots send each request signed when it goes.
//! The malformed answers come from raw TCP servers written here; the rest from `Sink`.
//! Nothing of the daemon may be mocked here: every fault is a real socket misbehaving.

mod common;

use common::*;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const WAIT: Duration = Duration::from_secs(15);
const OUTCOMES: [&str; 6] = ["success", "http_3xx", "http_4xx", "http_5xx", "timeout", "network"];
/// Two retries after the first attempt (3 attempts, then the dead letter), no jitter, and a
/// breaker that never opens, so every attempt of the schedule happens.
const FAST_RETRY: &str = "\n[retry]\nschedule = [\"10ms\", \"10ms\"]\njitter = 0.0\n[breaker]\nfailures = 1000\n";

/// What a raw TCP endpoint does once it has read a whole request.
#[derive(Clone, Copy, Debug)]
enum Raw {
    /// Closes the connection without a byte of answer.
    Close,
    /// Resets the connection (RST, through `SO_LINGER` 0).
    Reset,
    /// A head that promises 100 body bytes, 10 of them, then closes.
    HalfResponse,
    /// A head that promises 1,000 body bytes, then one byte every 100 ms.
    Trickle,
    /// Never answers; keeps the connection until the daemon closes it.
    Silent,
    /// `200` with a body of this many bytes, written as fast as the daemon reads.
    Oversized(u64),
    /// Bytes that are not HTTP, then close.
    Garbage,
}

#[derive(Default)]
struct RawStats {
    /// When each complete request arrived.
    requests: Mutex<Vec<Instant>>,
    open: AtomicUsize,
    /// Body bytes the daemon took from `Oversized` (what the kernel accepted).
    written: AtomicU64,
}

#[derive(Clone)]
struct RawServer {
    addr: SocketAddr,
    stats: Arc<RawStats>,
}

impl RawServer {
    async fn start(behaviour: Raw) -> RawServer {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stats = Arc::new(RawStats::default());
        let st = stats.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let st = st.clone();
                st.open.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    serve_raw(stream, behaviour, &st).await;
                    st.open.fetch_sub(1, Ordering::SeqCst);
                });
            }
        });
        RawServer { addr, stats }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    fn requests(&self) -> Vec<Instant> {
        self.stats.requests.lock().unwrap().clone()
    }
}

/// Reads one request (head and `content-length` body); false if the peer closed first.
async fn read_request(s: &mut TcpStream) -> bool {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            let len = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse::<usize>().ok())
                .unwrap_or(0);
            if buf.len() >= end + 4 + len {
                return true;
            }
        }
        match s.read(&mut chunk).await {
            Ok(0) | Err(_) => return false,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

async fn serve_raw(mut s: TcpStream, behaviour: Raw, stats: &RawStats) {
    if !read_request(&mut s).await {
        return;
    }
    stats.requests.lock().unwrap().push(Instant::now());
    match behaviour {
        Raw::Close => {}
        Raw::Reset => {
            // A zero linger makes the close an RST; with zero it never blocks on drop.
            #[allow(deprecated)]
            let _ = s.set_linger(Some(Duration::ZERO));
        }
        Raw::HalfResponse => {
            let _ = s
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n0123456789")
                .await;
        }
        Raw::Trickle => {
            if s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 1000\r\n\r\n")
                .await
                .is_err()
            {
                return;
            }
            for _ in 0..1000 {
                tokio::time::sleep(Duration::from_millis(100)).await;
                if s.write_all(b"x").await.is_err() {
                    return;
                }
            }
        }
        Raw::Silent => {
            // Wait for the daemon to give up and close; whatever it sends is ignored.
            let mut sink = [0u8; 1024];
            while matches!(s.read(&mut sink).await, Ok(n) if n > 0) {}
        }
        Raw::Oversized(total) => {
            let head = format!("HTTP/1.1 200 OK\r\ncontent-length: {total}\r\nconnection: close\r\n\r\n");
            if s.write_all(head.as_bytes()).await.is_err() {
                return;
            }
            let block = vec![b'z'; 64 * 1024];
            let mut sent = 0u64;
            while sent < total {
                let n = block.len().min((total - sent) as usize);
                if s.write_all(&block[..n]).await.is_err() {
                    return;
                }
                sent += n as u64;
                stats.written.fetch_add(n as u64, Ordering::Relaxed);
            }
        }
        Raw::Garbage => {
            let _ = s
                .write_all(b"\x00\xff\xfeNOT HTTP AT ALL \x01\x02\x03\r\n\r\n\x7f{}")
                .await;
        }
    }
}

/// On an endpoint whose every attempt lasts until `timeout`, at most `max` attempts are in
/// flight at once: so any `max + 1` consecutive arrivals span (about) a whole timeout.
/// Counted from request arrivals, which a connection handed over at the same instant as
/// another closes cannot blur.
fn assert_bounded_in_flight(arrivals: &[Instant], max: usize, timeout: Duration, what: &str) {
    let mut arrivals = arrivals.to_vec();
    arrivals.sort();
    for w in arrivals.windows(max + 1) {
        let span = w[max].duration_since(w[0]);
        assert!(
            span + Duration::from_millis(100) >= timeout,
            "{what}: {} requests arrived within {span:?}, so more than max_concurrency ({max}) were in flight",
            max + 1
        );
    }
}

/// A loopback address where nothing listens: connecting is refused.
fn refusing_addr() -> SocketAddr {
    let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = probe.local_addr().unwrap();
    drop(probe);
    addr
}

fn attempts_series(ep: &str, outcome: &str) -> String {
    format!("clickhook_delivery_attempts_total{{endpoint=\"{ep}\",outcome=\"{outcome}\"}}")
}

/// Every outcome counter of one endpoint.
async fn outcomes(d: &Daemon, ep: &str) -> HashMap<&'static str, f64> {
    let text = d.metrics().await;
    OUTCOMES
        .iter()
        .map(|o| {
            let series = attempts_series(ep, o);
            let v = text
                .lines()
                .find(|l| l.starts_with(&series) && l[series.len()..].starts_with(' '))
                .and_then(|l| l.rsplit(' ').next())
                .and_then(|v| v.parse().ok())
                .unwrap_or(f64::NAN);
            (*o, v)
        })
        .collect()
}

/// Polls one series until it reaches `at_least` or `limit` passes; returns the last value.
async fn metric_reaches(d: &Daemon, series: &str, at_least: f64, limit: Duration) -> f64 {
    let deadline = Instant::now() + limit;
    loop {
        let v = d.metric(series).await;
        if v >= at_least || Instant::now() > deadline {
            return v;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Makes the daemon build what it builds lazily on its first click (the user-agent parser)
/// with a click no endpoint takes (the endpoints of the memory tests only take workspace
/// "w"), so that memory measured afterwards is what delivery costs.
async fn warm_up(d: &Daemon) {
    let (status, v) = d.post(&click("warm-up", "nobody"), "application/json").await;
    assert_eq!(status, 202, "{v}");
    tokio::time::sleep(Duration::from_millis(300)).await;
}

async fn post_clicks(d: &Daemon, n: usize, tag: &str) -> Vec<String> {
    let mut ids = Vec::with_capacity(n);
    for chunk in (0..n).collect::<Vec<_>>().chunks(20) {
        let body = format!(
            "[{}]",
            chunk
                .iter()
                .map(|i| click(&format!("{tag}-{i}"), "w"))
                .collect::<Vec<_>>()
                .join(",")
        );
        let (status, v) = d.post(&body, "application/json").await;
        assert_eq!(status, 202, "ingest must accept the clicks: {v}");
        ids.extend(accepted_ids(&v));
    }
    ids
}

/// One click to a failing endpoint: all three attempts of the schedule end with `outcome`,
/// then the event is that endpoint's dead letter and nothing stays pending.
async fn assert_dead_letter_after_three(d: &Daemon, ep: &str, outcome: &str) {
    let (status, v) = d.post(&click("1", "w"), "application/json").await;
    assert_eq!(status, 202, "{v}");
    let id = v["ids"][0].as_str().unwrap().to_string();
    let dead = format!("clickhook_dead_letters_total{{endpoint=\"{ep}\"}}");
    assert_eq!(
        metric_reaches(d, &dead, 1.0, WAIT).await,
        1.0,
        "{ep}: the event must become a dead letter after the schedule\n{}",
        d.logs()
    );
    let got = outcomes(d, ep).await;
    for o in OUTCOMES {
        let want = if o == outcome { 3.0 } else { 0.0 };
        assert_eq!(got[o], want, "{ep}: attempts with outcome {o} (all: {got:?})");
    }
    assert_eq!(
        d.metric(&format!("clickhook_endpoint_pending{{endpoint=\"{ep}\"}}"))
            .await,
        0.0,
        "{ep}: a dead letter is no longer pending"
    );
    let (s, letters) = d.admin_get(&format!("/v1/endpoints/{ep}/dead")).await;
    assert_eq!(s, 200, "{letters}");
    let letters = letters.as_array().expect("the dead list is an array");
    assert_eq!(letters.len(), 1, "{ep}: one dead letter: {letters:?}");
    assert_eq!(letters[0]["event_id"], id.as_str());
    assert_eq!(letters[0]["attempts"], 3, "{ep}: {letters:?}");
    let (_, attempts) = d.admin_get(&format!("/v1/endpoints/{ep}/attempts?limit=10")).await;
    let attempts = attempts.as_array().expect("attempts are an array");
    assert_eq!(attempts.len(), 3, "{ep}: {attempts:?}");
    assert!(
        attempts
            .iter()
            .all(|a| a["outcome"] == outcome && a["error"].is_string()),
        "{ep}: every attempt is recorded with its outcome and an error: {attempts:?}"
    );
}

async fn raw_endpoint_dead_letters(behaviour: Raw, outcome: &str, extra: &str) -> RawServer {
    let server = RawServer::start(behaviour).await;
    let d = Daemon::start(&(config_text(&endpoint("raw", &server.url("/raw"), extra)) + FAST_RETRY));
    assert_dead_letter_after_three(&d, "raw", outcome).await;
    assert_eq!(server.requests().len(), 3, "{behaviour:?}: one request per attempt");
    server
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_connection_is_a_network_failure_retried_then_dead_lettered() {
    let addr = refusing_addr();
    let d = Daemon::start(&(config_text(&endpoint("refused", &format!("http://{addr}/x"), "")) + FAST_RETRY));
    assert_dead_letter_after_three(&d, "refused", "network").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_closed_after_the_request_is_a_network_failure() {
    raw_endpoint_dead_letters(Raw::Close, "network", "").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_reset_after_the_request_is_a_network_failure() {
    raw_endpoint_dead_letters(Raw::Reset, "network", "").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_200_cut_off_mid_body_is_a_network_failure_not_a_delivery() {
    raw_endpoint_dead_letters(Raw::HalfResponse, "network", "").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_instead_of_http_is_a_network_failure() {
    raw_endpoint_dead_letters(Raw::Garbage, "network", "").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_trickled_past_the_timeout_is_a_timeout() {
    // The status line arrives at once; the deadline covers the whole body too.
    raw_endpoint_dead_letters(Raw::Trickle, "timeout", "timeout = \"1s\"").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_3xx_4xx_and_5xx_are_retried_and_dead_lettered_under_their_label() {
    for (status, outcome) in [(301, "http_3xx"), (400, "http_4xx"), (500, "http_5xx")] {
        let sink = Sink::start().await;
        sink.default_answer("/e", Answer::Status(status));
        let d = Daemon::start(&(config_text(&endpoint("e", &sink.url("/e"), "")) + FAST_RETRY));
        assert_dead_letter_after_three(&d, "e", outcome).await;
        assert_eq!(sink.received("/e").len(), 3, "{status}: one request per attempt");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_answer_within_the_timeout_is_delivered() {
    let sink = Sink::start().await;
    sink.default_answer("/slow", Answer::Delay(Duration::from_millis(700), 200));
    let d = Daemon::start(&(config_text(&endpoint("slow", &sink.url("/slow"), "timeout = \"3s\"")) + FAST_RETRY));
    let ids = post_clicks(&d, 3, "slow").await;
    let success = metric_reaches(&d, &attempts_series("slow", "success"), 3.0, WAIT).await;
    assert_eq!(
        success, 3.0,
        "three slow answers inside the timeout are three deliveries"
    );
    let got = outcomes(&d, "slow").await;
    assert_eq!(got["timeout"] + got["network"] + got["http_5xx"], 0.0, "{got:?}");
    let mut delivered = sink.event_ids("/slow");
    delivered.sort();
    let mut want = ids;
    want.sort();
    assert_eq!(delivered, want, "each click delivered exactly once");
    assert_eq!(d.metric("clickhook_endpoint_pending{endpoint=\"slow\"}").await, 0.0);
    assert_eq!(d.metric("clickhook_dead_letters_total{endpoint=\"slow\"}").await, 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_endpoint_times_out_holding_at_most_max_concurrency_connections() {
    let server = RawServer::start(Raw::Silent).await;
    let extra = "timeout = \"1s\"\nmax_concurrency = 2";
    let cfg = config_text(&endpoint("hung", &server.url("/hung"), extra))
        + "\n[retry]\nschedule = [\"10ms\"]\njitter = 0.0\n[breaker]\nfailures = 1000\n";
    let d = Daemon::start(&cfg);
    post_clicks(&d, 4, "hung").await;
    // 4 events x 2 attempts, 2 at a time, 1 s each.
    let timeouts = metric_reaches(&d, &attempts_series("hung", "timeout"), 8.0, WAIT).await;
    assert_eq!(timeouts, 8.0, "every attempt on a hung endpoint ends as a timeout");
    assert_eq!(
        metric_reaches(&d, "clickhook_dead_letters_total{endpoint=\"hung\"}", 4.0, WAIT).await,
        4.0
    );
    assert_bounded_in_flight(&server.requests(), 2, Duration::from_secs(1), "hung");
    assert!(
        eventually(Duration::from_secs(5), || server.stats.open.load(Ordering::SeqCst) == 0).await,
        "timed-out attempts close their connections"
    );
    let got = outcomes(&d, "hung").await;
    assert_eq!(got["success"] + got["network"], 0.0, "{got:?}");
}

/// Four endpoints on one receiver that holds each request 4 s, and 2 request slots per
/// receiver: two requests go at once, two wait for a slot. A waiting request is built and
/// signed only once it has its slot, so its `webhook-timestamp` is that of its sending,
/// not 4 s older (a receiver checking the timestamp against its clock would refuse a
/// request that waited minutes), and the receiver never has more than 2 at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_waiting_for_a_receiver_slot_is_signed_when_it_gets_one() {
    let sink = Sink::start().await;
    let paths = ["/e1", "/e2", "/e3", "/e4"];
    let mut endpoints = String::new();
    for (i, path) in paths.iter().enumerate() {
        sink.default_answer(path, Answer::Delay(Duration::from_secs(4), 200));
        endpoints += &endpoint(&format!("e{}", i + 1), &sink.url(path), "timeout = \"20s\"");
    }
    let cfg = config_text(&endpoints).replace(
        "[delivery]\n",
        "[delivery]\nshards = 1\nmax_in_flight_per_receiver = 2\n",
    );
    let d = Daemon::start(&cfg);
    post_clicks(&d, 1, "slot").await;
    let mut arrived = Vec::new();
    for path in paths {
        let got = sink.wait_for(path, 1, Duration::from_secs(30)).await;
        assert_eq!(got.len(), 1, "{path} got its click: {}", d.logs());
        arrived.push(got[0].clone());
    }
    arrived.sort_by_key(|r| r.at);
    let first = arrived[0].at;
    let at: Vec<Duration> = arrived.iter().map(|r| r.at - first).collect();
    assert!(
        at[1] < Duration::from_secs(2) && at[2] >= Duration::from_millis(3500),
        "two requests at once, the next two once those are answered: {at:?}"
    );
    let now_unix = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    for r in &arrived {
        let signed: f64 = r.headers["webhook-timestamp"].parse().unwrap();
        let arrival = now_unix - r.at.elapsed().as_secs_f64();
        assert!(
            arrival - signed < 2.0,
            "{} was signed {:.1} s before it arrived",
            r.path,
            arrival - signed
        );
        assert!(signature_valid(r, SECRET), "{}", r.path);
    }
}

/// One request slot at a receiver, held 1.5 s by a "gate" endpoint. Then "older" gets
/// a click and "newer" one just after it, but "older" batches and lingers 300 ms before it
/// asks for the slot, so "newer" asks first. The freed slot goes to the oldest click
/// waiting, not to the first to ask: "older" arrives first (first come, first served
/// sent "newer" first).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_freed_receiver_slot_goes_to_the_oldest_waiting_click_not_the_first_to_ask() {
    let sink = Sink::start().await;
    sink.default_answer("/gate", Answer::Delay(Duration::from_millis(1500), 200));
    let endpoints = endpoint("gate", &sink.url("/gate"), "links = [\"gate\"]")
        + &endpoint(
            "older",
            &sink.url("/older"),
            "links = [\"older\"]\nbatch_max = 10\nbatch_linger = \"300ms\"",
        )
        + &endpoint("newer", &sink.url("/newer"), "links = [\"newer\"]");
    let cfg = config_text(&endpoints).replace(
        "[delivery]\n",
        "[delivery]\nshards = 1\nmax_in_flight_per_receiver = 1\n",
    );
    let d = Daemon::start(&cfg);
    for link in ["gate", "older", "newer"] {
        let (status, v) = d.post(&click(link, "w"), "application/json").await;
        assert_eq!(status, 202, "{v}");
    }
    let older = sink.wait_for("/older", 1, Duration::from_secs(10)).await;
    let newer = sink.wait_for("/newer", 1, Duration::from_secs(10)).await;
    let gate = sink.wait_for("/gate", 1, Duration::from_secs(10)).await;
    assert_eq!((older.len(), newer.len(), gate.len()), (1, 1, 1), "{}", d.logs());
    assert!(
        older[0].at < newer[0].at,
        "the older click went {:?} after the newer one",
        older[0].at - newer[0].at
    );
    assert!(
        newer[0].at - gate[0].at >= Duration::from_secs(1),
        "the newer click waited for the slot"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_after_on_429_and_503_replaces_the_short_schedule_step() {
    let sink = Sink::start().await;
    let retry_after = |s| Answer::StatusWith(s, vec![("retry-after".into(), "1".into())]);
    sink.script("/429", vec![retry_after(429), Answer::Status(200)]);
    sink.script("/503", vec![retry_after(503), Answer::Status(200)]);
    // The control: a 500 without Retry-After waits only the 10 ms step.
    sink.script("/500", vec![Answer::Status(500), Answer::Status(200)]);
    let eps = endpoint("r429", &sink.url("/429"), "")
        + &endpoint("r503", &sink.url("/503"), "")
        + &endpoint("r500", &sink.url("/500"), "");
    // The longest step (5 s) caps Retry-After; the first step is 10 ms.
    let cfg = config_text(&eps) + "\n[retry]\nschedule = [\"10ms\", \"10ms\", \"5s\"]\njitter = 0.0\n";
    let d = Daemon::start(&cfg);
    post_clicks(&d, 1, "ra").await;
    let mut gaps = HashMap::new();
    for path in ["/429", "/503", "/500"] {
        let got = sink.wait_for(path, 2, WAIT).await;
        assert_eq!(got.len(), 2, "{path}: a failed attempt, then the delivery");
        assert_eq!(got[0].headers["webhook-id"], got[1].headers["webhook-id"]);
        gaps.insert(path, got[1].at.duration_since(got[0].at));
    }
    eprintln!("gaps between the two attempts: {gaps:?}");
    for path in ["/429", "/503"] {
        assert!(
            gaps[path] >= Duration::from_millis(950),
            "{path} with Retry-After: 1 must wait about 1 s, not the 10 ms step: {:?}",
            gaps[path]
        );
        assert!(
            gaps["/500"] < gaps[path],
            "the control without Retry-After retries sooner than {path}: {gaps:?}"
        );
    }
    assert_eq!(
        metric_reaches(&d, &attempts_series("r429", "success"), 1.0, WAIT).await,
        1.0
    );
    assert_eq!(d.metric(&attempts_series("r429", "http_4xx")).await, 1.0);
    assert_eq!(
        metric_reaches(&d, &attempts_series("r503", "success"), 1.0, WAIT).await,
        1.0
    );
    assert_eq!(d.metric(&attempts_series("r503", "http_5xx")).await, 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_410_disables_the_endpoint_and_keeps_its_event_pending() {
    let sink = Sink::start().await;
    sink.default_answer("/gone", Answer::Status(410));
    let d = Daemon::start(&(config_text(&endpoint("gone", &sink.url("/gone"), "")) + FAST_RETRY));
    post_clicks(&d, 1, "gone").await;
    let (_, disabled) = d
        .admin_get_until("/v1/endpoints/gone", |_, v| v["enabled"] == false)
        .await;
    assert_eq!(disabled["enabled"], false, "a 410 disables the endpoint");
    assert_eq!(disabled["disabled_reason"], "gone");
    post_clicks(&d, 2, "after").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(sink.received("/gone").len(), 1, "no attempt after the 410");
    let got = outcomes(&d, "gone").await;
    assert_eq!(got["http_4xx"], 1.0, "{got:?}");
    assert_eq!(got.values().sum::<f64>(), 1.0, "{got:?}");
    assert_eq!(
        d.metric("clickhook_endpoint_pending{endpoint=\"gone\"}").await,
        1.0,
        "its event stays queued; new clicks are not routed to it"
    );
    assert_eq!(d.metric("clickhook_dead_letters_total{endpoint=\"gone\"}").await, 0.0);
}

/// Resident and peak resident memory of a process, in bytes.
fn rss(pid: i32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc/<pid>/status");
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|kb| kb.parse::<u64>().ok())
            .unwrap_or(0)
            * 1024
    };
    (field("VmRSS:"), field("VmHWM:"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_50_mib_answer_counts_by_status_and_memory_stays_bounded() {
    const BODY: u64 = 50 << 20;
    let server = RawServer::start(Raw::Oversized(BODY)).await;
    let extra = "max_concurrency = 4\nworkspaces = [\"w\"]";
    let d = Daemon::start(&(config_text(&endpoint("big", &server.url("/big"), extra)) + FAST_RETRY));
    warm_up(&d).await;
    let (before, hwm_before) = rss(d.pid());
    let pid = d.pid();
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop = done.clone();
    let sampler = tokio::spawn(async move {
        let mut peak = 0;
        while !stop.load(Ordering::SeqCst) {
            peak = peak.max(rss(pid).0);
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        peak
    });
    post_clicks(&d, 4, "big").await;
    let success = metric_reaches(&d, &attempts_series("big", "success"), 4.0, WAIT).await;
    assert_eq!(success, 4.0, "a 200 with an oversized body is a delivery");
    assert_eq!(d.metric("clickhook_endpoint_pending{endpoint=\"big\"}").await, 0.0);
    done.store(true, Ordering::SeqCst);
    let peak = sampler.await.unwrap();
    let (after, hwm_after) = rss(d.pid());
    let taken = server.stats.written.load(Ordering::Relaxed);
    eprintln!(
        "RSS before {} KiB, sampled peak {} KiB, after {} KiB; VmHWM {} -> {} KiB; \
         the daemon took {} KiB of 4 x {} KiB offered",
        before >> 10,
        peak >> 10,
        after >> 10,
        hwm_before >> 10,
        hwm_after >> 10,
        taken >> 10,
        BODY >> 10
    );
    assert!(
        peak < before + (32 << 20),
        "4 answers of 50 MiB must not be buffered: RSS went from {} KiB to {} KiB",
        before >> 10,
        peak >> 10
    );
    assert!(
        taken < 4 * BODY / 2,
        "the daemon stops reading an oversized body: it took {} KiB of {} KiB",
        taken >> 10,
        (4 * BODY) >> 10
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_healthy_endpoint_gets_every_click_before_any_faulty_one_could_time_out() {
    const N: usize = 200;
    const FAULTY_TIMEOUT: Duration = Duration::from_secs(5);
    let sink = Sink::start().await;
    sink.default_answer("/slow", Answer::Delay(Duration::from_millis(300), 200));
    sink.default_answer("/e500", Answer::Status(500));
    sink.default_answer("/e400", Answer::Status(400));
    sink.default_answer(
        "/e429",
        Answer::StatusWith(429, vec![("retry-after".into(), "1".into())]),
    );
    sink.default_answer("/e410", Answer::Status(410));
    sink.default_answer("/hang", Answer::Hang);
    let close = RawServer::start(Raw::Close).await;
    let reset = RawServer::start(Raw::Reset).await;
    let half = RawServer::start(Raw::HalfResponse).await;
    let trickle = RawServer::start(Raw::Trickle).await;
    let silent = RawServer::start(Raw::Silent).await;
    let big = RawServer::start(Raw::Oversized(8 << 20)).await;
    let garbage = RawServer::start(Raw::Garbage).await;
    let refused = refusing_addr();
    let timeout = format!(
        "timeout = \"{}s\"\nmax_concurrency = 4\nworkspaces = [\"w\"]",
        FAULTY_TIMEOUT.as_secs()
    );
    let faulty: Vec<(&str, String, &str)> = vec![
        ("refused", format!("http://{refused}/x"), "network"),
        ("close", close.url("/x"), "network"),
        ("reset", reset.url("/x"), "network"),
        ("half", half.url("/x"), "network"),
        ("garbage", garbage.url("/x"), "network"),
        ("trickle", trickle.url("/x"), "timeout"),
        ("silent", silent.url("/x"), "timeout"),
        ("hang", sink.url("/hang"), "timeout"),
        ("slow", sink.url("/slow"), "success"),
        ("big", big.url("/x"), "success"),
        ("e500", sink.url("/e500"), "http_5xx"),
        ("e400", sink.url("/e400"), "http_4xx"),
        ("e429", sink.url("/e429"), "http_4xx"),
        ("e410", sink.url("/e410"), "http_4xx"),
    ];
    let mut eps: String = faulty.iter().map(|(id, url, _)| endpoint(id, url, &timeout)).collect();
    eps.push_str(&endpoint("ok", &sink.url("/ok"), "workspaces = [\"w\"]"));
    let d = Daemon::start(&(config_text(&eps) + FAST_RETRY));
    warm_up(&d).await;
    let (rss_before, _) = rss(d.pid());
    let ids = post_clicks(&d, N, "all").await;

    // Ordering: when the healthy endpoint has everything, no faulty attempt has timed out yet.
    let deadline = Instant::now() + WAIT;
    let mut timeouts_then = f64::NAN;
    while Instant::now() < deadline {
        if sink.received("/ok").len() >= N {
            let text = d.metrics().await;
            timeouts_then = text
                .lines()
                .filter(|l| l.starts_with("clickhook_delivery_attempts_total{") && l.contains("outcome=\"timeout\""))
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .sum();
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let ok = sink.received("/ok");
    assert_eq!(ok.len(), N, "the healthy endpoint receives all {N} clicks");
    let mut got = sink.event_ids("/ok");
    got.sort();
    let mut want = ids.clone();
    want.sort();
    assert_eq!(got, want, "every click exactly once at the healthy endpoint");
    assert_eq!(
        timeouts_then, 0.0,
        "the healthy endpoint finished before any faulty endpoint's first timeout"
    );
    // The same in timestamps: the last healthy delivery precedes the earliest moment a
    // hung or trickling endpoint's first attempt could time out.
    let last_ok = ok.iter().map(|r| r.at).max().unwrap();
    let first_hung = [silent.requests(), trickle.requests()]
        .into_iter()
        .flatten()
        .chain(sink.received("/hang").iter().map(|r| r.at))
        .min()
        .expect("the hung endpoints got their first attempt");
    assert!(
        last_ok < first_hung + FAULTY_TIMEOUT,
        "the healthy endpoint waited on a hung one"
    );

    // Every faulty endpoint ends the way SPEC §4 says, under its label.
    for (id, _, outcome) in &faulty {
        let v = metric_reaches(&d, &attempts_series(id, outcome), 1.0, WAIT).await;
        assert!(
            v >= 1.0,
            "{id}: attempts end as {outcome}: {:?}",
            outcomes(&d, id).await
        );
        let got = outcomes(&d, id).await;
        let others: f64 = got.iter().filter(|(o, _)| *o != outcome).map(|(_, v)| v).sum();
        assert_eq!(others, 0.0, "{id}: only {outcome} attempts: {got:?}");
    }
    let (_, gone) = d.admin_get("/v1/endpoints/e410").await;
    assert_eq!(gone["disabled_reason"], "gone", "{gone}");
    for id in ["refused", "close", "reset", "half", "garbage", "e500", "e400"] {
        let dead = metric_reaches(
            &d,
            &format!("clickhook_dead_letters_total{{endpoint=\"{id}\"}}"),
            1.0,
            WAIT,
        )
        .await;
        assert!(dead >= 1.0, "{id}: events reach the dead letters after the schedule");
    }
    assert_bounded_in_flight(&silent.requests(), 4, FAULTY_TIMEOUT, "silent");
    assert_bounded_in_flight(&trickle.requests(), 4, FAULTY_TIMEOUT, "trickle");
    let (rss_after, hwm) = rss(d.pid());
    eprintln!(
        "daemon RSS {} KiB before the burst, {} KiB after, peak {} KiB",
        rss_before >> 10,
        rss_after >> 10,
        hwm >> 10
    );
    assert!(
        rss_after < rss_before + (64 << 20),
        "memory stays bounded with 14 faulty endpoints: {} KiB -> {} KiB",
        rss_before >> 10,
        rss_after >> 10
    );
}

/// After a restart the head of a queue can be a full page of retries not yet due. The
/// worker reads on past them to the clicks behind, instead of sleeping until the first
/// retry is due (an hour here) with deliverable clicks unread.
#[tokio::test]
async fn after_a_restart_clicks_behind_a_page_of_waiting_retries_go_out_at_once() {
    let sink = Sink::start().await;
    sink.default_answer("/e", Answer::Status(500));
    // 520 first attempts fail, each due again in an hour, and then the circuit opens for
    // an hour, so the 5 clicks after them are not tried before the restart.
    let cfg = config_text(&endpoint("e", &sink.url("/e"), ""))
        + "\n[retry]\nschedule = [\"1h\"]\njitter = 0.0\n[breaker]\nfailures = 520\ncooldown = \"1h\"\n";
    let mut d = Daemon::start(&cfg);
    post_clicks(&d, 520, "head").await;
    assert_eq!(sink.wait_for("/e", 520, Duration::from_secs(60)).await.len(), 520);
    let (_, stats) = d
        .admin_get_until("/v1/endpoints/e/stats", |_, v| v["circuit"] == "open")
        .await;
    assert_eq!(stats["circuit"], "open", "{stats}");
    let behind = post_clicks(&d, 5, "behind").await;
    assert_eq!(d.terminate(), 0);
    assert_eq!(sink.received("/e").len(), 520, "the clicks behind were not tried yet");
    sink.default_answer("/e", Answer::Status(200));
    d.spawn();
    sink.wait_for("/e", 525, Duration::from_secs(30)).await;
    let ids = sink.event_ids("/e");
    for id in &behind {
        assert!(ids.contains(id), "click {id} behind the retries was not delivered");
    }
    assert_eq!(ids.len(), 525, "no retry went before it was due");
}
