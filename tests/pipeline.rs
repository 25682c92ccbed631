//! End-to-end tests of the core pipeline (ingest over HTTP and the socket, the durable log,
//! routing, delivery with retries and signatures, shutdown): the real daemon binary, real
//! HTTP sinks. They must not mock any part of the daemon or assert a speed.

mod common;

use common::*;
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(20);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivers_a_click_signed_as_standard_webhooks() {
    let sink = Sink::start().await;
    let d = Daemon::start(&config_text(&endpoint("a", &sink.url("/a"), "")));
    let (status, body) = d.post(&click("12345", "1"), "application/json").await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(body["accepted"], 1);
    let id = body["ids"][0].as_str().unwrap().to_string();
    let got = sink.wait_for("/a", 1, WAIT).await;
    assert_eq!(got.len(), 1);
    let r = &got[0];
    assert_eq!(r.headers["webhook-id"], id);
    assert_eq!(r.headers["content-type"], "application/json");
    assert!(r.headers["user-agent"].starts_with("clickhook/"));
    assert!(
        signature_valid(r, SECRET),
        "signature must verify with an independent HMAC"
    );
    let ts: i64 = r.headers["webhook-timestamp"].parse().unwrap();
    assert!((ts - chrono::Utc::now().timestamp()).abs() < 60);
    let v = r.json();
    assert_eq!(v["type"], "link.clicked");
    assert_eq!(v["data"]["id"], id.as_str());
    assert_eq!(v["data"]["link"]["id"], "12345");
    assert_eq!(v["data"]["click"]["is_eu_country"], false);
    assert_eq!(v["timestamp"], v["data"]["timestamp"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_visitor_ip_reaches_only_endpoints_with_include_ip() {
    let sink = Sink::start().await;
    let eps = endpoint("plain", &sink.url("/plain"), "")
        + &endpoint(
            "batched",
            &sink.url("/batched"),
            "batch_max = 10\nbatch_linger = \"50ms\"",
        )
        + &endpoint("with_ip", &sink.url("/with_ip"), "include_ip = true");
    let d = Daemon::start(&config_text(&eps));
    let body = r#"{"link":{"id":"7"},"click":{"ip":"203.0.113.9","country":"US","user_agent":"Mozilla/5.0"}}"#;
    let (status, v) = d.post(body, "application/json").await;
    assert_eq!(status, 202, "{v}");
    for path in ["/plain", "/batched"] {
        let got = sink.wait_for(path, 1, WAIT).await;
        let text = String::from_utf8_lossy(&got[0].body).to_string();
        assert!(!text.contains("203.0.113.9"), "{path} got the IP: {text}");
        assert!(signature_valid(&got[0], SECRET), "the cut body is the signed body");
    }
    let got = sink.wait_for("/with_ip", 1, WAIT).await;
    assert_eq!(got[0].json()["data"]["click"]["ip"], "203.0.113.9");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accepts_arrays_and_ndjson_with_ids_in_input_order() {
    let sink = Sink::start().await;
    let d = Daemon::start(&config_text(&endpoint("a", &sink.url("/a"), "")));
    let arr = format!("[{},{},{}]", click("1", "w"), click("2", "w"), click("3", "w"));
    let (status, body) = d.post(&arr, "application/json").await;
    assert_eq!(status, 202);
    assert_eq!(body["accepted"], 3);
    let nd = format!("{}\n\n{}\n", click("4", "w"), click("5", "w"));
    let (status, body2) = d.post(&nd, "application/x-ndjson").await;
    assert_eq!(status, 202, "{body2}");
    assert_eq!(body2["accepted"], 2);
    sink.wait_for("/a", 5, WAIT).await;
    let mut want = accepted_ids(&body);
    want.extend(accepted_ids(&body2));
    let mut got = sink.event_ids("/a");
    // Order of arrival is not promised; the ids of each answer are in input order.
    let links: Vec<String> = sink
        .received("/a")
        .iter()
        .map(|r| r.json()["data"]["link"]["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(links.len(), 5);
    for r in sink.received("/a") {
        let v = r.json();
        let pos = want
            .iter()
            .position(|w| w == v["data"]["id"].as_str().unwrap())
            .unwrap();
        assert_eq!(
            v["data"]["link"]["id"],
            (pos + 1).to_string(),
            "ids answer in input order"
        );
    }
    want.sort();
    got.sort();
    assert_eq!(want, got);
    // Media types are case-insensitive and may carry parameters.
    for media_type in ["Application/X-NDJSON; charset=utf-8", "application/jsonl"] {
        let (status, v) = d
            .post(&format!("{}\n{}\n", click("6", "w"), click("7", "w")), media_type)
            .await;
        assert_eq!((status, v["accepted"].as_u64()), (202, Some(2)), "{media_type}: {v}");
    }
    // Another method on the route is 405, and says which one to use.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut get = tokio::net::TcpStream::connect(d.http.trim_start_matches("http://"))
        .await
        .unwrap();
    get.write_all(b"GET /v1/clicks HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut answer = String::new();
    tokio::time::timeout(WAIT, get.read_to_string(&mut answer))
        .await
        .expect("the connection closes after the answer")
        .unwrap();
    assert!(
        answer.starts_with("HTTP/1.1 405") && answer.to_ascii_lowercase().contains("\r\nallow: post\r\n"),
        "{answer}"
    );
}

/// Writes `text` to the daemon's socket while reading every reply line, until the daemon
/// closes its side.
async fn socket_exchange(socket: &std::path::Path, text: String) -> Vec<String> {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    let stream = tokio::net::UnixStream::connect(socket).await.unwrap();
    let (read, mut write) = stream.into_split();
    let writer = tokio::spawn(async move {
        write.write_all(text.as_bytes()).await.unwrap();
        write.shutdown().await.unwrap();
    });
    let mut lines = BufReader::new(read).lines();
    let mut replies = Vec::new();
    while let Some(l) = lines.next_line().await.unwrap() {
        replies.push(l);
    }
    writer.await.unwrap();
    replies
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socket_pipelines_500_lines_and_one_bad_line_disturbs_nothing() {
    let sink = Sink::start().await;
    let d = Daemon::start(&config_text(&endpoint("a", &sink.url("/a"), "")));
    let mut text = String::new();
    for i in 0..500 {
        if i == 250 {
            text.push_str("{\"link\": {\"id\": [\"not\", \"valid\"]}}\n");
        } else {
            text.push_str(&click(&i.to_string(), "w"));
            text.push('\n');
        }
    }
    let replies = socket_exchange(&d.socket, text).await;
    assert_eq!(replies.len(), 500);
    for (i, r) in replies.iter().enumerate() {
        if i == 250 {
            assert!(r.starts_with("err link.id"), "{r}");
        } else {
            assert!(r.starts_with("ok evt_"), "line {i}: {r}");
        }
    }
    sink.wait_for("/a", 499, WAIT).await;
    let mut got = sink.event_ids("/a");
    got.sort();
    let mut want: Vec<String> = replies
        .iter()
        .filter_map(|r| r.strip_prefix("ok ").map(String::from))
        .collect();
    want.sort();
    assert_eq!(got, want);
}

/// A connection's reads are parsed on several threads at once; replies and appends must
/// still follow the order of the lines, across many 64 KiB reads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socket_replies_follow_line_order_across_many_reads() {
    let sink = Sink::start().await;
    let d = Daemon::start(&config_text(&endpoint("a", &sink.url("/a"), "")));
    const LINES: usize = 6_000;
    let mut text = String::new();
    for i in 0..LINES {
        if i % 97 == 0 {
            text.push_str("{\"link\": {}}\n");
        } else {
            // A padded metadata field varies line lengths so reads split lines anywhere.
            text.push_str(&format!(
                r#"{{"id":"line-{i}","link":{{"id":"{i}"}},"metadata":{{"pad":"{}"}}}}"#,
                "x".repeat(i % 300)
            ));
            text.push('\n');
        }
    }
    let replies = socket_exchange(&d.socket, text).await;
    assert_eq!(replies.len(), LINES);
    for (i, r) in replies.iter().enumerate() {
        if i % 97 == 0 {
            assert!(r.starts_with("err link.id"), "line {i}: {r}");
        } else {
            assert_eq!(r, &format!("ok line-{i}"), "line {i}");
        }
    }
    let good = LINES - LINES.div_ceil(97);
    sink.wait_for("/a", good, WAIT).await;
    assert_eq!(sink.event_ids("/a").len(), good);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filters_route_by_link_and_workspace_and_both_fire() {
    let sink = Sink::start().await;
    let eps = [
        endpoint("link", &sink.url("/link"), "links = [12345]"),
        endpoint("ws", &sink.url("/ws"), "workspaces = [\"1\"]"),
        endpoint("both", &sink.url("/both"), "links = [\"12345\"]\nworkspaces = [\"2\"]"),
        endpoint("all", &sink.url("/all"), ""),
    ]
    .concat();
    let d = Daemon::start(&config_text(&eps));
    for (link, ws) in [("12345", "1"), ("12345", "2"), ("999", "1"), ("999", "3")] {
        let (s, _) = d.post(&click(link, ws), "application/json").await;
        assert_eq!(s, 202);
    }
    sink.wait_for("/all", 4, WAIT).await;
    sink.wait_for("/link", 2, WAIT).await;
    sink.wait_for("/ws", 2, WAIT).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let pairs = |p: &str| {
        let mut v: Vec<(String, String)> = sink
            .received(p)
            .iter()
            .map(|r| {
                let j = r.json();
                (
                    j["data"]["link"]["id"].as_str().unwrap().into(),
                    j["data"]["link"]["workspace_id"].as_str().unwrap().into(),
                )
            })
            .collect();
        v.sort();
        v
    };
    let p = |a: &str, b: &str| (a.to_string(), b.to_string());
    assert_eq!(pairs("/link"), vec![p("12345", "1"), p("12345", "2")]);
    assert_eq!(pairs("/ws"), vec![p("12345", "1"), p("999", "1")]);
    assert_eq!(pairs("/both"), vec![p("12345", "2")]);
    assert_eq!(pairs("/all").len(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejects_bad_requests_and_stores_nothing_of_them() {
    let sink = Sink::start().await;
    // [ingest.http] is already in the base config: extend that table.
    let cfg = config_text("").replace(
        "[ingest.http]\nlisten = \"127.0.0.1:0\"",
        "[ingest.http]\nlisten = \"127.0.0.1:0\"\nmax_body = \"2KiB\"\ntokens = [\"s3cret\"]",
    ) + &endpoint("a", &sink.url("/a"), "");
    let d = Daemon::start(&cfg);
    let url = format!("{}/v1/clicks", d.http);
    let auth = [("content-type", "application/json"), ("authorization", "Bearer s3cret")];
    let (s, _) = request("POST", &url, &click("1", "w"), &[("content-type", "application/json")]).await;
    assert_eq!(s, 401);
    let (s, _) = request("POST", &url, &click("1", "w"), &[("authorization", "Bearer wrong")]).await;
    assert_eq!(s, 401);
    let bad = format!("[{},{{\"link\":{{}}}},{}]", click("1", "w"), click("2", "w"));
    let (s, body) = request("POST", &url, &bad, &auth).await;
    assert_eq!(s, 400);
    assert_eq!(body["index"], 1);
    assert_eq!(body["error"], "link.id: required");
    let (s, body) = request("POST", &url, &format!("[{},{{\"link\":", click("1", "w")), &auth).await;
    assert_eq!(s, 400, "{body}");
    assert_eq!(body["index"], 1);
    let nd = format!("{}\n{{\"link\":{{\"id\":true}}}}\n", click("1", "w"));
    let (s, body) = request(
        "POST",
        &url,
        &nd,
        &[
            ("content-type", "application/x-ndjson"),
            ("authorization", "Bearer s3cret"),
        ],
    )
    .await;
    assert_eq!(s, 400);
    assert_eq!(body["index"], 1);
    let big = format!("[{}]", vec![click("1", "w"); 40].join(","));
    let (s, _) = request("POST", &url, &big, &auth).await;
    assert_eq!(s, 413);
    // A body that cannot be read (a broken chunk) is refused, and counted like the others.
    let invalid = "clickhook_ingest_rejected_total{source=\"http\",reason=\"invalid\"}";
    let before = d.metric(invalid).await;
    let mut raw = tokio::net::TcpStream::connect(d.http.trim_start_matches("http://"))
        .await
        .unwrap();
    let head = "POST /v1/clicks HTTP/1.1\r\nhost: x\r\nauthorization: Bearer s3cret\r\n\
                transfer-encoding: chunked\r\n\r\nzz\r\n";
    tokio::io::AsyncWriteExt::write_all(&mut raw, head.as_bytes())
        .await
        .unwrap();
    let mut answer = String::new();
    let _ = tokio::time::timeout(WAIT, tokio::io::AsyncReadExt::read_to_string(&mut raw, &mut answer)).await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert_eq!(d.metric(invalid).await, before + 1.0);
    // Only the one good click after all that is delivered.
    let (s, ok) = request("POST", &url, &click("good", "w"), &auth).await;
    assert_eq!(s, 202);
    sink.wait_for("/a", 1, WAIT).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(sink.event_ids("/a"), vec![ok["ids"][0].as_str().unwrap().to_string()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeated_client_id_is_acknowledged_but_delivered_once_even_after_restart() {
    let sink = Sink::start().await;
    let mut d = Daemon::start(&config_text(&endpoint("a", &sink.url("/a"), "")));
    let body = r#"{"id":"order-42","link":{"id":"1"}}"#;
    for _ in 0..3 {
        let (s, v) = d.post(body, "application/json").await;
        assert_eq!(s, 202);
        assert_eq!(v["ids"][0], "order-42");
    }
    let (s, v) = d.post(&format!("[{body},{body}]"), "application/json").await;
    assert_eq!((s, v["accepted"].as_u64()), (202, Some(2)));
    sink.wait_for("/a", 1, WAIT).await;
    assert_eq!(d.terminate(), 0);
    d.spawn();
    let (s, _) = d.post(body, "application/json").await;
    assert_eq!(s, 202);
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(sink.event_ids("/a"), vec!["order-42".to_string()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_three_500s_with_the_same_webhook_id() {
    let sink = Sink::start().await;
    sink.script(
        "/a",
        vec![Answer::Status(500), Answer::Status(500), Answer::Status(500)],
    );
    let cfg = config_text(&endpoint("a", &sink.url("/a"), ""))
        + "\n[retry]\nschedule = [\"50ms\", \"50ms\", \"50ms\", \"50ms\"]\njitter = 0.0\n";
    let d = Daemon::start(&cfg);
    let (_, v) = d.post(&click("1", "w"), "application/json").await;
    let got = sink.wait_for("/a", 4, WAIT).await;
    assert_eq!(got.len(), 4);
    let id = v["ids"][0].as_str().unwrap();
    assert!(got.iter().all(|r| r.headers["webhook-id"] == id));
    assert!(got.iter().all(|r| signature_valid(r, SECRET)));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(sink.received("/a").len(), 4, "no attempt after the success");
    assert_eq!(
        d.metric("clickhook_delivery_attempts_total{endpoint=\"a\",outcome=\"http_5xx\"}")
            .await,
        3.0
    );
    assert_eq!(
        d.metric("clickhook_delivery_attempts_total{endpoint=\"a\",outcome=\"success\"}")
            .await,
        1.0
    );
    assert_eq!(d.metric("clickhook_endpoint_pending{endpoint=\"a\"}").await, 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_endpoint_times_out_while_a_healthy_one_gets_everything_first() {
    let sink = Sink::start().await;
    sink.default_answer("/hung", Answer::Hang);
    let eps = endpoint("hung", &sink.url("/hung"), "timeout = \"3s\"\nmax_concurrency = 4")
        + &endpoint("ok", &sink.url("/ok"), "");
    let d = Daemon::start(&(config_text(&eps) + "\n[retry]\nschedule = [\"10s\"]\n"));
    let started = std::time::Instant::now();
    let mut ids = Vec::new();
    for chunk in 0..10 {
        let body = format!(
            "[{}]",
            (0..20)
                .map(|i| click(&format!("{chunk}-{i}"), "w"))
                .collect::<Vec<_>>()
                .join(",")
        );
        let (s, v) = d.post(&body, "application/json").await;
        assert_eq!(s, 202);
        ids.extend(accepted_ids(&v));
    }
    let got = sink.wait_for("/ok", 200, WAIT).await;
    assert_eq!(got.len(), 200);
    let last_ok = got.iter().map(|r| r.at).max().unwrap();
    // The healthy endpoint finished before the hung one's first attempt could even time out.
    assert!(
        last_ok.duration_since(started) < Duration::from_secs(3),
        "healthy endpoint waited on the hung one"
    );
    assert!(
        sink.received("/hung").len() <= 4,
        "the hung endpoint holds at most max_concurrency"
    );
    let series = "clickhook_delivery_attempts_total{endpoint=\"hung\",outcome=\"timeout\"}";
    let timeouts = d.metric_until(series, |v| v >= 1.0).await;
    assert!(timeouts >= 1.0, "the hung endpoint's attempts end as timeouts");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_becomes_a_dead_letter_after_the_schedule() {
    let sink = Sink::start().await;
    sink.default_answer("/a", Answer::Status(503));
    let cfg =
        config_text(&endpoint("a", &sink.url("/a"), "")) + "\n[retry]\nschedule = [\"50ms\", \"50ms\"]\njitter = 0.0\n";
    let d = Daemon::start(&cfg);
    d.post(&click("1", "w"), "application/json").await;
    sink.wait_for("/a", 3, WAIT).await;
    let dead = "clickhook_dead_letters_total{endpoint=\"a\"}";
    assert_eq!(d.metric_until(dead, |v| v == 1.0).await, 1.0);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(sink.received("/a").len(), 3, "a schedule of 2 steps means 3 attempts");
    assert_eq!(d.metric("clickhook_endpoint_pending{endpoint=\"a\"}").await, 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_410_disables_the_endpoint_and_stops_routing_to_it() {
    let sink = Sink::start().await;
    sink.default_answer("/gone", Answer::Status(410));
    let eps = endpoint("gone", &sink.url("/gone"), "") + &endpoint("ok", &sink.url("/ok"), "");
    let d = Daemon::start(&config_text(&eps));
    d.post(&click("1", "w"), "application/json").await;
    sink.wait_for("/gone", 1, WAIT).await;
    let (_, gone) = d
        .admin_get_until("/v1/endpoints/gone", |_, v| v["enabled"] == false)
        .await;
    assert_eq!(gone["enabled"], false, "{gone}");
    assert_eq!(gone["disabled_reason"], "gone", "{gone}");
    for i in 0..5 {
        d.post(&click(&i.to_string(), "w"), "application/json").await;
    }
    sink.wait_for("/ok", 6, WAIT).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(sink.received("/gone").len(), 1, "nothing more goes to a gone endpoint");
    assert_eq!(
        d.metric("clickhook_endpoint_pending{endpoint=\"gone\"}").await,
        1.0,
        "its event stays queued"
    );
    // Re-enabled, it gets its queued event and new clicks again.
    sink.default_answer("/gone", Answer::Status(200));
    let (s, v) = request(
        "PATCH",
        &format!("{}/v1/endpoints/gone", d.admin),
        r#"{"enabled": true}"#,
        &[],
    )
    .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["enabled"], true);
    d.post(&click("later", "w"), "application/json").await;
    let got = sink.wait_for("/gone", 3, WAIT).await;
    assert_eq!(
        got.len(),
        3,
        "the first attempt, the queued event again, and the new click"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_exits_0_and_pending_work_is_delivered_after_restart() {
    // The endpoint's port refuses connections until the sink starts there.
    let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = probe.local_addr().unwrap();
    drop(probe);
    let cfg = config_text(&endpoint("a", &format!("http://{addr}/a"), "")) + "\n[retry]\nschedule = [\"100ms\", \"100ms\", \"100ms\", \"100ms\", \"100ms\", \"100ms\", \"100ms\", \"100ms\", \"100ms\", \"100ms\", \"100ms\", \"100ms\", \"100ms\", \"100ms\", \"100ms\", \"100ms\", \"100ms\", \"100ms\", \"100ms\", \"100ms\"]\n[breaker]\nfailures = 1000\n";
    let mut d = Daemon::start(&cfg);
    let body = format!(
        "[{}]",
        (0..50)
            .map(|i| click(&i.to_string(), "w"))
            .collect::<Vec<_>>()
            .join(",")
    );
    let (s, v) = d.post(&body, "application/json").await;
    assert_eq!(s, 202);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(d.terminate(), 0, "clean shutdown exits 0:\n{}", d.logs());
    let sink = Sink::start_on(addr).await;
    d.spawn();
    sink.wait_for("/a", 50, WAIT).await;
    let mut got = sink.event_ids("/a");
    got.sort();
    got.dedup();
    let mut want: Vec<String> = accepted_ids(&v);
    want.sort();
    assert_eq!(got, want);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_waiting_for_its_retry_goes_out_one_event_a_request_after_batching_is_turned_off() {
    let sink = Sink::start().await;
    sink.script("/b", vec![Answer::Status(500)]);
    let config = |batch_max: u32| {
        config_text(&endpoint(
            "b",
            &sink.url("/b"),
            &format!("batch_max = {batch_max}\nbatch_linger = \"100ms\""),
        )) + "\n[retry]\nschedule = [\"1s\", \"1s\", \"1s\"]\njitter = 0.0\n"
    };
    let d = Daemon::start(&config(10));
    let body = format!("[{},{},{}]", click("1", "w"), click("2", "w"), click("3", "w"));
    let (s, v) = d.post(&body, "application/json").await;
    assert_eq!(s, 202, "{v}");
    let mut ids: Vec<String> = accepted_ids(&v);
    let first = sink.wait_for("/b", 1, WAIT).await;
    assert_eq!(
        sink.event_ids("/b").len(),
        3,
        "the three went as one batch, answered 500"
    );
    assert_eq!(first.len(), 1);
    std::fs::write(d.config_path(), config(1)).unwrap();
    d.signal(libc::SIGHUP);
    let (_, b) = d.admin_get_until("/v1/endpoints/b", |_, v| v["batch_max"] == 1).await;
    assert_eq!(
        b["batch_max"],
        1,
        "batching is off before the retry is due: {}",
        d.logs()
    );
    // Every event of the batch arrives again, each in a body of its own.
    let again = sink.wait_for("/b", 4, WAIT).await.split_off(1);
    assert_eq!(again.len(), 3, "three requests after the batch: {}", d.logs());
    let mut again: Vec<String> = again
        .iter()
        .map(|r| {
            let body = r.json();
            assert_eq!(body["type"], "link.clicked", "not a batch body: {body}");
            body["data"]["id"].as_str().unwrap().to_string()
        })
        .collect();
    again.sort();
    ids.sort();
    assert_eq!(again, ids, "one event a request: {}", d.logs());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_batch_cut_by_a_page_after_a_restart_never_reuses_its_webhook_id() {
    let sink = Sink::start().await;
    // The first three requests fail: a batch of one, then the 600 clicks as 512 and 88.
    sink.script("/b", vec![Answer::Status(500); 3]);
    let cfg = config_text(&endpoint(
        "b",
        &sink.url("/b"),
        "batch_max = 1000\nbatch_linger = \"300ms\"",
    )) + "\n[retry]\nschedule = [\"3s\", \"3s\", \"3s\"]\njitter = 0.0\n";
    let mut d = Daemon::start(&cfg);
    let (s, v) = d.post(&click("1", "w"), "application/json").await;
    assert_eq!(s, 202, "{v}");
    sink.wait_for("/b", 1, WAIT).await;
    let body = format!("[{}]", vec![click("2", "w"); 600].join(","));
    let (s, v) = d.post(&body, "application/json").await;
    assert_eq!(s, 202, "{v}");
    sink.wait_for("/b", 3, WAIT).await;
    // After a restart the queue is paged in again, 512 entries a page: the first page holds
    // the batch of one and all but the last entry of the batch of 512.
    assert_eq!(d.terminate(), 0);
    d.spawn();
    let delivered_again = || {
        let mut ids = sink.event_ids("/b").split_off(601);
        ids.sort();
        ids.dedup();
        ids.len()
    };
    eventually(WAIT, || delivered_again() == 601).await;
    assert_eq!(delivered_again(), 601, "every click arrived after the restart");
    let answered_200 = sink.received("/b").split_off(3);
    let mut webhook_ids: Vec<&str> = answered_200.iter().map(|r| r.headers["webhook-id"].as_str()).collect();
    webhook_ids.sort();
    let requests = webhook_ids.len();
    webhook_ids.dedup();
    assert_eq!(webhook_ids.len(), requests, "no webhook-id was used for two bodies");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_endpoints_and_keeps_the_old_ones_on_a_bad_file() {
    let sink = Sink::start().await;
    let d = Daemon::start(&config_text(&endpoint("a", &sink.url("/a"), "")));
    let grown = config_text(&(endpoint("a", &sink.url("/a"), "") + &endpoint("b", &sink.url("/b"), "")));
    std::fs::write(d.config_path(), grown).unwrap();
    d.signal(libc::SIGHUP);
    let (status, _) = d.admin_get_until("/v1/endpoints/b", |status, _| status == 200).await;
    assert_eq!(status, 200, "{}", d.logs());
    std::fs::write(d.config_path(), "[[endpoints]]\nid = 7\n").unwrap();
    d.signal(libc::SIGHUP);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(d.logs().contains("reload refused"));
    d.post(&click("1", "w"), "application/json").await;
    sink.wait_for("/b", 1, WAIT).await;
    sink.wait_for("/a", 1, WAIT).await;
    assert_eq!(sink.received("/b").len(), 1);
}

/// A reload applies `[[endpoints]]` only, so the file's endpoints are checked against the
/// address rules the daemon runs with: a loopback endpoint that only the file's new
/// `allow_private_networks` allows is refused, not added to fail every attempt. A change
/// outside the endpoints is named as waiting for a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_checks_endpoints_against_the_delivery_settings_the_daemon_runs_with() {
    let sink = Sink::start().await;
    let strict = config_text("").replace("allow_private_networks = true", "allow_private_networks = false");
    assert!(strict.contains("allow_private_networks = false"));
    let d = Daemon::start(&strict);
    std::fs::write(d.config_path(), config_text(&endpoint("a", &sink.url("/a"), ""))).unwrap();
    d.signal(libc::SIGHUP);
    assert!(
        eventually(WAIT, || d.logs().contains("reload refused")).await,
        "{}",
        d.logs()
    );
    let logs = d.logs();
    assert!(
        logs.contains("endpoints[0].url") && logs.contains("restart"),
        "the refusal names the endpoint and the restart it needs: {logs}"
    );
    assert_eq!(d.admin_get("/v1/endpoints/a").await.0, 404, "{}", d.logs());

    // With the running rules kept, the endpoint is refused for the same reason by the
    // next start; a change elsewhere (the timeout) is reloaded around, and said so.
    let mut other = strict.replace("timeout = \"2s\"", "timeout = \"3s\"");
    assert_ne!(other, strict);
    other.push_str("\n[[endpoints]]\nid = \"b\"\nurl = \"http://8.8.8.8:9/b\"\n");
    std::fs::write(d.config_path(), other).unwrap();
    d.signal(libc::SIGHUP);
    let (status, _) = d.admin_get_until("/v1/endpoints/b", |status, _| status == 200).await;
    assert_eq!(status, 200, "{}", d.logs());
    assert!(
        d.logs().contains("take effect at the next start") && d.logs().contains("sections=delivery"),
        "{}",
        d.logs()
    );
}

/// A file refused for an id an API endpoint holds changes nothing, even in the
/// endpoints listed before that id: not a URL, and no worker for a new endpoint.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_reload_changes_no_endpoint_before_the_refusal() {
    let sink = Sink::start().await;
    let d = Daemon::start(&config_text(&endpoint("a", &sink.url("/a"), "")));
    let created = request(
        "POST",
        &format!("{}/v1/endpoints", d.admin),
        &format!(
            r#"{{"id": "hooks", "url": "{}", "links": ["none"]}}"#,
            sink.url("/hooks")
        ),
        &[("content-type", "application/json")],
    )
    .await;
    assert_eq!(created.0, 201, "{}", created.1);
    let clashing = endpoint("a", &sink.url("/a-moved"), "")
        + &endpoint("new", &sink.url("/new"), "")
        + &endpoint("hooks", &sink.url("/hooks"), "");
    std::fs::write(d.config_path(), config_text(&clashing)).unwrap();
    d.signal(libc::SIGHUP);
    assert!(
        eventually(WAIT, || d.logs().contains("reload refused")).await,
        "{}",
        d.logs()
    );
    let (status, answer) = d.post(&click("1", "w"), "application/json").await;
    assert_eq!(status, 202, "{answer}");
    sink.wait_for("/a", 1, WAIT).await;
    assert!(sink.received("/a-moved").is_empty(), "a kept its URL");
    assert_eq!(d.admin_get("/v1/endpoints/new").await.0, 404);

    // The next good file starts `new` once: one worker, one delivery per click.
    let good = endpoint("a", &sink.url("/a"), "") + &endpoint("new", &sink.url("/new"), "");
    std::fs::write(d.config_path(), config_text(&good)).unwrap();
    d.signal(libc::SIGHUP);
    let (status, _) = d.admin_get_until("/v1/endpoints/new", |status, _| status == 200).await;
    assert_eq!(status, 200, "{}", d.logs());
    let (status, _) = d.post(&click("2", "w"), "application/json").await;
    assert_eq!(status, 202);
    sink.wait_for("/new", 1, WAIT).await;
    sink.wait_for("/a", 2, WAIT).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(sink.received("/new").len(), 1, "one worker for new");
}

/// A client that hangs up before its answer may still have had its clicks stored; those
/// must reach their endpoints without waiting for the next click there. A restart shows
/// what the log holds: every stored click goes out then, so one that arrives only after
/// the restart was stored and left waiting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clicks_of_a_client_that_hung_up_before_its_answer_are_delivered() {
    use tokio::io::AsyncWriteExt;
    let sink = Sink::start().await;
    let mut endpoints = String::new();
    for n in 0..20 {
        endpoints += &endpoint(
            &format!("e{n}"),
            &sink.url(&format!("/e{n}")),
            &format!("links = [\"l{n}\"]"),
        );
    }
    let mut d = Daemon::start(&config_text(&endpoints));
    let addr = d.http.trim_start_matches("http://").to_string();
    for n in 0..20 {
        let body = click(&format!("l{n}"), "w");
        let mut stream = tokio::net::TcpStream::connect(&addr).await.unwrap();
        let request = format!(
            "POST /v1/clicks HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        );
        stream.write_all(request.as_bytes()).await.unwrap();
        // Gone before the answer, while the append may wait for its flush.
        drop(stream);
    }
    let delivered = |sink: &Sink| -> Vec<String> {
        let mut ids: Vec<String> = (0..20).flat_map(|n| sink.event_ids(&format!("/e{n}"))).collect();
        ids.sort();
        ids.dedup();
        ids
    };
    // Settled: everything stored so far has arrived, twice in a row 300 ms apart, so no
    // append still on its way is taken for one left waiting.
    let series = "clickhook_ingest_events_total{source=\"http\"}";
    let deadline = std::time::Instant::now() + WAIT;
    let mut settled = 0;
    while settled < 2 && std::time::Instant::now() < deadline {
        let stored = d.metric(series).await;
        let caught_up = stored > 0.0 && delivered(&sink).len() as f64 == stored;
        settled = if caught_up { settled + 1 } else { 0 };
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert_eq!(settled, 2, "stored clicks stayed undelivered: {}", d.logs());
    let before = delivered(&sink);
    assert!(!before.is_empty(), "{}", d.logs());
    assert_eq!(d.terminate(), 0);
    d.spawn();
    // The restarted daemon sends whatever was left waiting: wait until nothing is pending.
    for n in 0..20 {
        let (_, stats) = d
            .admin_get_until(&format!("/v1/endpoints/e{n}/stats"), |_, v| v["pending"] == 0)
            .await;
        assert_eq!(stats["pending"], 0, "e{n}: {stats}");
    }
    assert_eq!(
        delivered(&sink),
        before,
        "nothing stored was left waiting for a restart"
    );
}

/// A click that a product format cannot render (a number past f64 in its metadata,
/// which ingest copies as sent) becomes a dead letter at once for that endpoint, saying
/// why, and holds up nothing behind it; `standard` sends it as stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_click_a_format_cannot_render_is_a_dead_letter_at_once_and_holds_up_nothing() {
    let sink = Sink::start().await;
    let cfg = config_text(
        &(endpoint("linkly", &sink.url("/linkly"), "format = \"linkly\"")
            + &endpoint("standard", &sink.url("/standard"), "")),
    );
    let d = Daemon::start(&cfg);
    let huge = r#"{"link":{"id":"1","workspace_id":"w"},"metadata":{"n":1e400}}"#;
    let (status, answer) = d.post(huge, "application/json").await;
    assert_eq!(status, 202, "{answer}");
    let unrenderable = accepted_ids(&answer)[0].clone();
    let (status, answer) = d.post(&click("2", "w"), "application/json").await;
    assert_eq!(status, 202, "{answer}");
    sink.wait_for("/linkly", 1, WAIT).await;
    sink.wait_for("/standard", 2, WAIT).await;
    assert_eq!(sink.received("/linkly").len(), 1, "only the click it can render");
    assert_eq!(sink.received("/standard").len(), 2, "standard sends it as stored");
    let dead = d.admin_get("/v1/endpoints/linkly/dead").await.1;
    let dead = dead.as_array().unwrap();
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(dead[0]["event_id"], unrenderable.as_str());
    assert_eq!(dead[0]["attempts"], 0, "no request was sent for it");
    assert!(
        dead[0]["last_error"]
            .as_str()
            .unwrap()
            .contains("cannot render the event as linkly"),
        "{dead:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingest_answers_503_with_retry_after_over_max_bytes() {
    let cfg = config_text("").replace("path = \"data\"", "path = \"data\"\nmax_bytes = \"1KiB\"");
    let d = Daemon::start(&cfg);
    let client: hyper_util::client::legacy::Client<_, http_body_util::Full<bytes::Bytes>> =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build_http();
    let mut last = None;
    for _ in 0..60 {
        let req = hyper::Request::post(format!("{}/v1/clicks", d.http))
            .body(http_body_util::Full::new(bytes::Bytes::from(click("1", "w"))))
            .unwrap();
        let resp = client.request(req).await.unwrap();
        if resp.status() == 503 {
            last = Some(resp);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let resp = last.expect("ingest must answer 503 once the data dir is over max_bytes");
    let retry: u64 = resp.headers()["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=5).contains(&retry));
}

#[test]
fn check_config_exit_codes() {
    let dir = tempfile::tempdir().unwrap();
    let run = |path: &std::path::Path| {
        std::process::Command::new(bin())
            .args(["check-config", "--config"])
            .arg(path)
            .output()
            .unwrap()
    };
    let out = run(&dir.path().join("missing.toml"));
    assert_eq!(out.status.code(), Some(2));
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[delivery]\ntimeout = \"soon\"\n").unwrap();
    let out = run(&bad);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("bad.toml") && err.contains("line 2") && err.contains("soon"),
        "{err}"
    );
    let shipped = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config.toml");
    assert_eq!(
        run(&shipped).status.code(),
        Some(0),
        "the shipped config.toml must be valid"
    );
    let out = std::process::Command::new(bin())
        .args(["serve", "--config"])
        .arg(&bad)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "serve with a bad config exits 2");
    let out = std::process::Command::new(bin())
        .args(["send", "--socket"])
        .arg(dir.path().join("none.sock"))
        .arg(dir.path().join("missing.ndjson"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "send with a FILE it cannot read exits 2");
    assert!(String::from_utf8_lossy(&out.stderr).contains("missing.ndjson"));
    let clicks = dir.path().join("clicks.ndjson");
    std::fs::write(&clicks, "{}\n").unwrap();
    for url in ["localhost:8080", "ftp://127.0.0.1:9", "http://", "not a url"] {
        let out = std::process::Command::new(bin())
            .args(["send", "--url", url])
            .arg(&clicks)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "send --url {url:?} exits 2: {err}");
        assert!(err.contains("--url"), "{err}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_breaker_opens_after_consecutive_failures_and_stops_attempts() {
    let sink = Sink::start().await;
    sink.default_answer("/a", Answer::Status(500));
    let cfg = config_text(&endpoint("a", &sink.url("/a"), "max_concurrency = 1"))
        + "\n[retry]\nschedule = [\"20ms\", \"20ms\", \"20ms\", \"20ms\", \"20ms\", \"20ms\", \"20ms\", \"20ms\"]\njitter = 0.0\n[breaker]\nfailures = 3\ncooldown = \"1h\"\n";
    let d = Daemon::start(&cfg);
    for i in 0..5 {
        d.post(&click(&i.to_string(), "w"), "application/json").await;
    }
    sink.wait_for("/a", 3, WAIT).await;
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(sink.received("/a").len(), 3, "no attempt while the circuit is open");
    assert_eq!(d.metric("clickhook_endpoint_circuit_open{endpoint=\"a\"}").await, 1.0);
    assert_eq!(
        d.metric("clickhook_endpoint_pending{endpoint=\"a\"}").await,
        5.0,
        "events wait durably"
    );
    assert_eq!(d.metric("clickhook_dead_letters_total{endpoint=\"a\"}").await, 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_circuit_reads_half_open_once_its_cooldown_is_over() {
    let sink = Sink::start().await;
    sink.script("/a", vec![Answer::Status(500), Answer::Status(500)]);
    sink.default_answer("/a", Answer::Hang);
    let cfg = config_text(&endpoint("a", &sink.url("/a"), "timeout = \"30s\""))
        + "\n[retry]\nschedule = [\"20ms\", \"20ms\", \"20ms\"]\njitter = 0.0\n[breaker]\nfailures = 2\ncooldown = \"1s\"\n";
    let d = Daemon::start(&cfg);
    d.post(&click("1", "w"), "application/json").await;
    sink.wait_for("/a", 2, WAIT).await;
    let circuit = || async { d.admin_get("/v1/endpoints/a/stats").await.1["circuit"].clone() };
    // The sink counts the second 500 as it answers; the daemon handles it a moment later.
    let (_, stats) = d
        .admin_get_until("/v1/endpoints/a/stats", |_, v| v["circuit"] == "open")
        .await;
    assert_eq!(stats["circuit"], "open");
    // The probe goes out after the cooldown and hangs: the circuit is half-open meanwhile.
    let probed = sink.wait_for("/a", 3, WAIT).await;
    assert_eq!(probed.len(), 3);
    assert_eq!(circuit().await, "half_open");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivered_events_are_pruned_after_retention() {
    let sink = Sink::start().await;
    let cfg = config_text(&endpoint("a", &sink.url("/a"), ""))
        .replace("path = \"data\"", "path = \"data\"\nretention = \"1s\"");
    let d = Daemon::start(&cfg);
    let (s, _) = d
        .post(
            &format!("[{},{}]", click("1", "w"), click("2", "w")),
            "application/json",
        )
        .await;
    assert_eq!(s, 202);
    sink.wait_for("/a", 2, WAIT).await;
    let events = d.metric_until("clickhook_log_events", |v| v == 0.0).await;
    assert_eq!(events, 0.0, "delivered events older than retention are pruned");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redirects_are_not_followed() {
    let sink = Sink::start().await;
    sink.default_answer(
        "/a",
        Answer::StatusWith(302, vec![("location".into(), "/elsewhere".into())]),
    );
    let cfg = config_text(&endpoint("a", &sink.url("/a"), "")) + "\n[retry]\nschedule = [\"10ms\"]\njitter = 0.0\n";
    let d = Daemon::start(&cfg);
    d.post(&click("1", "w"), "application/json").await;
    sink.wait_for("/a", 2, WAIT).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(sink.received("/elsewhere").is_empty());
    assert_eq!(
        d.metric("clickhook_delivery_attempts_total{endpoint=\"a\",outcome=\"http_3xx\"}")
            .await,
        2.0
    );
}

#[test]
fn a_private_destination_in_the_config_file_is_refused_with_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config_text(&endpoint("a", "http://127.0.0.1:9/a", ""))
        .replace("allow_private_networks = true", "allow_private_networks = false");
    std::fs::write(dir.path().join("config.toml"), cfg).unwrap();
    for cmd in ["check-config", "serve"] {
        let out = std::process::Command::new(bin())
            .args([cmd, "--config"])
            .arg(dir.path().join("config.toml"))
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{cmd}");
        assert!(String::from_utf8_lossy(&out.stderr).contains("endpoints[0].url"));
    }
}

/// A stale socket file is replaced, but a socket path set to an ordinary file by mistake
/// leaves the file as it is and stops the start with a reason.
#[test]
fn a_socket_path_that_names_an_ordinary_file_is_refused_and_the_file_kept() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config_text("").replace("path = \"clickhook.sock\"", "path = \"precious.txt\"");
    assert!(cfg.contains("precious.txt"));
    std::fs::write(dir.path().join("config.toml"), cfg).unwrap();
    std::fs::write(dir.path().join("precious.txt"), "keep me").unwrap();
    let mut child = std::process::Command::new(bin())
        .args(["serve", "--config"])
        .arg(dir.path().join("config.toml"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // A daemon that took the path would run on: it is stopped, and the test fails.
    let deadline = std::time::Instant::now() + WAIT;
    while child.try_wait().unwrap().is_none() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    if child.try_wait().unwrap().is_none() {
        child.kill().unwrap();
    }
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("ingest.unix.path") && err.contains("not a socket"),
        "{err}"
    );
    assert_eq!(
        std::fs::read_to_string(dir.path().join("precious.txt")).unwrap(),
        "keep me"
    );
}

#[test]
fn an_unreadable_geoip_database_is_a_clear_start_error() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config_text("\n[enrich]\ngeoip = \"missing.mmdb\"\n");
    let line = cfg.lines().position(|l| l.starts_with("geoip")).unwrap() + 1;
    std::fs::write(dir.path().join("config.toml"), cfg).unwrap();
    let out = std::process::Command::new(bin())
        .args(["serve", "--config"])
        .arg(dir.path().join("config.toml"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "a config error");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("line {line}: enrich.geoip")) && err.contains("missing.mmdb"),
        "{err}"
    );
    let check = std::process::Command::new(bin())
        .args(["check-config", "--config"])
        .arg(dir.path().join("config.toml"))
        .output()
        .unwrap();
    assert_eq!(check.status.code(), Some(2), "check-config finds it too");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_googlebot_click_reaches_only_the_endpoint_that_includes_bots() {
    let sink = Sink::start().await;
    let eps =
        endpoint("humans", &sink.url("/humans"), "") + &endpoint("bots", &sink.url("/bots"), "include_bots = true");
    let d = Daemon::start(&config_text(&eps));
    let bot = r#"{"link":{"id":"1"},"click":{"user_agent":"Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)"}}"#;
    let (s, _) = d.post(bot, "application/json").await;
    assert_eq!(s, 202);
    d.post(&click("2", "w"), "application/json").await;
    sink.wait_for("/bots", 2, WAIT).await;
    sink.wait_for("/humans", 1, WAIT).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let humans = sink.received("/humans");
    assert_eq!(humans.len(), 1);
    assert_eq!(humans[0].json()["data"]["link"]["id"], "2");
    let bots: Vec<_> = sink.received("/bots").iter().map(|r| r.json()).collect();
    let googlebot = bots.iter().find(|v| v["data"]["link"]["id"] == "1").unwrap();
    assert_eq!(googlebot["data"]["click"]["device"], "bot");
    assert!(googlebot["data"]["click"]["bot_name"]
        .as_str()
        .unwrap()
        .contains("Googlebot"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_to_a_batching_rebrandly_endpoint_arrives_in_few_requests() {
    let sink = Sink::start().await;
    let d = Daemon::start(&config_text(&endpoint(
        "rb",
        &sink.url("/rb"),
        "format = \"rebrandly\"\nbatch_max = 50\nbatch_linger = \"300ms\"",
    )));
    let body = format!(
        "[{}]",
        (0..100)
            .map(|i| click(&i.to_string(), "w"))
            .collect::<Vec<_>>()
            .join(",")
    );
    let (s, v) = d.post(&body, "application/json").await;
    assert_eq!(s, 202);
    let deadline = std::time::Instant::now() + WAIT;
    let count = |sink: &Sink| {
        sink.received("/rb")
            .iter()
            .map(|r| r.json()["data"].as_array().unwrap().len())
            .sum::<usize>()
    };
    while count(&sink) < 100 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let got = sink.received("/rb");
    assert_eq!(count(&sink), 100, "all 100 clicks arrive");
    assert!(
        got.len() <= 4,
        "100 clicks with batch_max 50 take at most 4 requests, took {}",
        got.len()
    );
    for r in &got {
        assert!(signature_valid(r, SECRET));
        assert_eq!(r.headers["apikey"], SECRET);
        let v = r.json();
        assert_eq!(v["key"], format!("clickhook-rb-{}", r.headers["webhook-id"]));
        assert!(r.headers["webhook-id"].starts_with("batch_"));
    }
    assert_eq!(v["accepted"], 100);
}

#[test]
fn tells_systemd_ready_watchdog_and_stopping() {
    use std::os::unix::net::UnixDatagram;
    let dir = tempfile::tempdir().unwrap();
    let notify_path = dir.path().join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    notify.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    std::fs::write(dir.path().join("config.toml"), config_text("")).unwrap();
    // systemd names the watched process in WATCHDOG_PID; `exec` keeps the shell's pid.
    let mut child = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "WATCHDOG_PID=$$ exec {} serve --config {}",
            bin(),
            dir.path().join("config.toml").display()
        ))
        .env("NOTIFY_SOCKET", &notify_path)
        .env("WATCHDOG_USEC", "200000")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 512];
    while !(seen.iter().any(|m: &String| m.contains("READY=1")) && seen.iter().any(|m| m.contains("WATCHDOG=1"))) {
        let n = notify.recv(&mut buf).expect("a notification within 20 s");
        seen.push(String::from_utf8_lossy(&buf[..n]).into_owned());
    }
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    loop {
        let n = notify.recv(&mut buf).expect("STOPPING=1 on drain");
        if String::from_utf8_lossy(&buf[..n]).contains("STOPPING=1") {
            break;
        }
    }
    assert_eq!(child.wait().unwrap().code(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failure_logs_name_endpoint_and_event_are_rate_limited_and_never_show_secrets() {
    let sink = Sink::start().await;
    sink.default_answer("/f", Answer::Status(500));
    let steps = vec!["\"10ms\""; 30].join(", ");
    let cfg = config_text(&endpoint("f", &sink.url("/f"), ""))
        + &format!("\n[retry]\nschedule = [{steps}]\njitter = 0.0\n[breaker]\nfailures = 1000\n");
    let d = Daemon::start(&cfg.replace("level = \"info\"", "level = \"debug\""));
    let (_, v) = d.post(&click("1", "w"), "application/json").await;
    let id = v["ids"][0].as_str().unwrap().to_string();
    sink.wait_for("/f", 20, WAIT).await;
    let logs = d.logs();
    let failure_lines: Vec<&str> = logs.lines().filter(|l| l.contains("delivery attempt failed")).collect();
    assert!(!failure_lines.is_empty());
    assert!(
        failure_lines[0].contains("endpoint=f") && failure_lines[0].contains(&id),
        "{}",
        failure_lines[0]
    );
    assert!(
        failure_lines.len() <= 2,
        "20 failures in well under 10 s log at most twice:\n{}",
        failure_lines.join("\n")
    );
    let secret_b64 = SECRET.trim_start_matches("whsec_");
    assert!(!logs.contains(secret_b64), "the secret leaked into the logs");
    assert!(
        !d.metrics().await.contains(secret_b64),
        "the secret leaked into the metrics"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoints_past_the_series_cap_share_one_label() {
    let sink = Sink::start().await;
    let eps =
        endpoint("a", &sink.url("/a"), "") + &endpoint("b", &sink.url("/b"), "") + &endpoint("c", &sink.url("/c"), "");
    let d = Daemon::start(&(config_text(&eps) + "\n[metrics]\nmax_endpoint_series = 1\n"));
    d.post(&click("1", "w"), "application/json").await;
    sink.wait_for("/a", 1, WAIT).await;
    sink.wait_for("/b", 1, WAIT).await;
    sink.wait_for("/c", 1, WAIT).await;
    let text = d.metrics().await;
    let labels: std::collections::BTreeSet<&str> = text
        .lines()
        .filter(|l| l.starts_with("clickhook_delivery_attempts_total{"))
        .filter_map(|l| l.split("endpoint=\"").nth(1)?.split('"').next())
        .collect();
    assert_eq!(labels.len(), 2, "one named endpoint and one shared label: {labels:?}");
    assert!(labels.contains("_other"));
    let success = d
        .metric_until(
            "clickhook_delivery_attempts_total{endpoint=\"_other\",outcome=\"success\"}",
            |v| v == 2.0,
        )
        .await;
    assert_eq!(
        success, 2.0,
        "the two endpoints past the cap add up in the shared series"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shared_circuit_series_counts_the_open_circuits_past_the_cap() {
    let sink = Sink::start().await;
    sink.default_answer("/down", Answer::Status(500));
    let config = |endpoints: &str| {
        config_text(&(endpoint("a", &sink.url("/a"), "") + endpoints))
            + "\n[metrics]\nmax_endpoint_series = 1\n[breaker]\nfailures = 1\ncooldown = \"1h\"\n"
    };
    let d = Daemon::start(&config(&endpoint("z", &sink.url("/down"), "")));
    let series = "clickhook_endpoint_circuit_open{endpoint=\"_other\"}";
    for id in ["b", "c"] {
        let body = serde_json::json!({"id": id, "url": sink.url("/down")});
        let (status, answer) = d.admin_request("POST", "/v1/endpoints", body).await;
        assert_eq!(status, 201, "{answer}");
    }
    d.post(&click("1", "w"), "application/json").await;
    sink.wait_for("/down", 3, WAIT).await;
    // Each of them set the series to 1 before: the last open circuit overwrote the others.
    assert_eq!(
        d.metric_until(series, |v| v == 3.0).await,
        3.0,
        "three circuits are open"
    );
    let (status, _) = d
        .admin_request("DELETE", "/v1/endpoints/b", serde_json::Value::Null)
        .await;
    assert_eq!(status, 200);
    assert_eq!(
        d.metric_until(series, |v| v == 2.0).await,
        2.0,
        "a deleted endpoint's open circuit no longer counts"
    );
    std::fs::write(d.config_path(), config("")).unwrap();
    d.signal(libc::SIGHUP);
    assert_eq!(
        d.metric_until(series, |v| v == 1.0).await,
        1.0,
        "nor does one of an endpoint the file no longer has"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_listener_caps_its_connections() {
    let d = Daemon::start(&config_text(""));
    let addr = d.admin.trim_start_matches("http://").to_string();
    // Idle connections that never send a request hold their slots (until the header timeout).
    let mut idle = Vec::new();
    for _ in 0..256 {
        idle.push(tokio::net::TcpStream::connect(&addr).await.unwrap());
    }
    let url = format!("{}/healthz", d.admin);
    let blocked = tokio::time::timeout(Duration::from_millis(700), raw_request("GET", &url, "", &[])).await;
    assert!(blocked.is_err(), "a connection past the cap waits");
    idle.truncate(200);
    let (s, _) = tokio::time::timeout(Duration::from_secs(5), raw_request("GET", &url, "", &[]))
        .await
        .unwrap();
    assert_eq!(s, 200, "freed slots take connections again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn product_payloads_go_in_through_adapters_and_come_out_unchanged() {
    let sink = Sink::start().await;
    let eps = endpoint(
        "masiv",
        &sink.url("/masiv"),
        "format = \"masiv\"\ninclude_ip = true\ninclude_bots = true",
    ) + &endpoint(
        "linkly",
        &sink.url("/linkly"),
        "format = \"linkly\"\ninclude_bots = true",
    );
    let d = Daemon::start(&config_text(&eps));
    let masiv_in: serde_json::Value = serde_json::from_str(include_str!("golden/masiv_example.json")).unwrap();
    let url = format!("{}/v1/clicks?format=masiv", d.http);
    let (s, v) = request(
        "POST",
        &url,
        &masiv_in.to_string(),
        &[("content-type", "application/json")],
    )
    .await;
    assert_eq!(s, 202, "{v}");
    let linkly_in: serde_json::Value = serde_json::from_str(include_str!("golden/linkly_example.json")).unwrap();
    let url = format!("{}/v1/clicks?format=linkly", d.http);
    let (s, v) = request(
        "POST",
        &url,
        &linkly_in.to_string(),
        &[("content-type", "application/json")],
    )
    .await;
    assert_eq!(s, 202, "{v}");
    // Each product's payload arrives at the endpoint of its own format as it went in.
    let masiv = sink.wait_for("/masiv", 2, WAIT).await;
    let back = masiv
        .iter()
        .map(|r| r.json())
        .find(|v| v["EventBody"]["Segment"] == "Q7tAxat")
        .unwrap();
    assert_eq!(back, masiv_in);
    let linkly = sink.wait_for("/linkly", 2, WAIT).await;
    let back = linkly
        .iter()
        .map(|r| r.json())
        .find(|v| v["link"]["id"] == 12345)
        .unwrap();
    assert_eq!(back, linkly_in);
    let (s, v) = request("POST", &format!("{}/v1/clicks?format=bitly", d.http), "{}", &[]).await;
    assert_eq!(s, 400, "{v}");
    // A 400 names the product payload at fault, however many clicks the ones before it held.
    let mut two: serde_json::Value = serde_json::from_str(include_str!("golden/rebrandly_example.json")).unwrap();
    let item = two["data"][0].clone();
    two["data"].as_array_mut().unwrap().push(item);
    let mut bad = two.clone();
    bad["data"][1]["timestamp"] = "yesterday".into();
    let body = serde_json::json!([two, bad]).to_string();
    let url = format!("{}/v1/clicks?format=rebrandly", d.http);
    let (s, v) = request("POST", &url, &body, &[("content-type", "application/json")]).await;
    assert_eq!((s, v["index"].as_u64()), (400, Some(1)), "{v}");
    assert!(v["error"].as_str().unwrap().contains("timestamp"), "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abuse_limits_slowloris_overlong_socket_lines_and_private_data_files() {
    use std::os::unix::fs::PermissionsExt;
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
    let cfg = config_text("").replace(
        "[ingest.http]\nlisten = \"127.0.0.1:0\"",
        "[ingest.http]\nlisten = \"127.0.0.1:0\"\nmax_body = \"1KiB\"",
    );
    let mut d = Daemon::start(&cfg);
    // A body that stops coming: answered 408 after 30 s, checked once the slowloris is.
    let mut trickle = tokio::net::TcpStream::connect(d.http.trim_start_matches("http://"))
        .await
        .unwrap();
    trickle
        .write_all(
            b"POST /v1/clicks HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 500\r\n\r\n[{",
        )
        .await
        .unwrap();
    // Slowloris: headers that never finish are cut off (header read timeout, 10 s).
    let mut slow = tokio::net::TcpStream::connect(d.http.trim_start_matches("http://"))
        .await
        .unwrap();
    slow.write_all(b"POST /v1/clicks HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 256];
    let closed = tokio::time::timeout(Duration::from_secs(15), async {
        loop {
            match slow.read(&mut buf).await {
                Ok(0) | Err(_) => return true,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert_eq!(
        closed,
        Ok(true),
        "a connection that never finishes its headers is closed"
    );
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(40), async {
        let mut buf = [0u8; 512];
        while let Ok(n @ 1..) = trickle.read(&mut buf).await {
            answer.extend_from_slice(&buf[..n]);
            if answer.windows(4).any(|w| w == b"\r\n\r\n") {
                break;
            }
        }
    })
    .await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(
        answer.starts_with("HTTP/1.1 408"),
        "a body that stops coming: {answer:?}"
    );
    // A socket line over max_body is answered err and skipped; its neighbours are fine.
    let stream = tokio::net::UnixStream::connect(&d.socket).await.unwrap();
    let (read, mut write) = stream.into_split();
    let long = format!("{{\"link\":{{\"id\":\"{}\"}}}}", "x".repeat(4096));
    let text = format!("{}\n{long}\n{}\n", click("1", "w"), click("2", "w"));
    write.write_all(text.as_bytes()).await.unwrap();
    write.shutdown().await.unwrap();
    let mut lines = BufReader::new(read).lines();
    let mut replies = Vec::new();
    while let Some(l) = lines.next_line().await.unwrap() {
        replies.push(l);
    }
    assert_eq!(replies.len(), 3, "{replies:?}");
    assert!(
        replies[0].starts_with("ok ") && replies[2].starts_with("ok "),
        "{replies:?}"
    );
    assert!(replies[1].starts_with("err line longer"), "{replies:?}");
    // So is an over-long last line that the stream ends without a newline.
    let replies = socket_exchange(&d.socket, format!("{}\n{long}", click("3", "w"))).await;
    assert_eq!(replies.len(), 2, "{replies:?}");
    assert!(
        replies[0].starts_with("ok ") && replies[1].starts_with("err line longer"),
        "{replies:?}"
    );
    assert_eq!(d.terminate(), 0);
    // Secrets live in the data directory: it and its files are private to the daemon.
    let data = d.dir.path().join("data");
    assert_eq!(std::fs::metadata(&data).unwrap().permissions().mode() & 0o777, 0o700);
    d.spawn();
    for entry in std::fs::read_dir(&data).unwrap().flatten() {
        let mode = entry.metadata().unwrap().permissions().mode() & 0o777;
        let want = if entry.path().is_dir() { 0o700 } else { 0o600 };
        assert_eq!(mode & !want, 0, "{} has mode {mode:o}", entry.path().display());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_request_headers_are_refused() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let d = Daemon::start(&config_text(""));
    let mut conn = tokio::net::TcpStream::connect(d.http.trim_start_matches("http://"))
        .await
        .unwrap();
    let huge = "a".repeat(1 << 20);
    let head = format!("POST /v1/clicks HTTP/1.1\r\nHost: x\r\nX-Big: {huge}\r\nContent-Length: 2\r\n\r\n{{}}");
    let _ = conn.write_all(head.as_bytes()).await;
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), conn.read_to_end(&mut answer)).await;
    let text = String::from_utf8_lossy(&answer);
    assert!(
        text.is_empty() || text.starts_with("HTTP/1.1 431"),
        "a 1 MiB header is refused, got {text:?}"
    );
    assert!(!text.contains("\"accepted\""), "nothing is accepted");
    let (s, _) = d.post(&click("1", "w"), "application/json").await;
    assert_eq!(s, 202, "the daemon still serves others");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ingest_and_socket_listeners_cap_their_connections() {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    let d = Daemon::start(&config_text(""));
    let addr = d.http.trim_start_matches("http://").to_string();
    let mut idle = Vec::new();
    for _ in 0..4096 {
        idle.push(tokio::net::TcpStream::connect(&addr).await.unwrap());
    }
    let blocked = tokio::time::timeout(Duration::from_millis(700), d.post(&click("1", "w"), "application/json")).await;
    assert!(blocked.is_err(), "an HTTP connection past the cap of 4096 waits");
    idle.truncate(4000);
    let (s, _) = tokio::time::timeout(Duration::from_secs(5), d.post(&click("1", "w"), "application/json"))
        .await
        .unwrap();
    assert_eq!(s, 202);
    drop(idle);
    let mut socks = Vec::new();
    for _ in 0..1024 {
        socks.push(tokio::net::UnixStream::connect(&d.socket).await.unwrap());
    }
    let try_one = || async {
        let s = tokio::net::UnixStream::connect(&d.socket).await.unwrap();
        let (r, mut w) = s.into_split();
        w.write_all(format!("{}\n", click("2", "w")).as_bytes()).await.unwrap();
        BufReader::new(r).lines().next_line().await.unwrap().unwrap_or_default()
    };
    let blocked = tokio::time::timeout(Duration::from_millis(700), try_one()).await;
    assert!(
        blocked.is_err(),
        "a socket connection past the cap of 1024 is not served"
    );
    socks.truncate(1000);
    let reply = tokio::time::timeout(Duration::from_secs(5), try_one()).await.unwrap();
    assert!(reply.starts_with("ok "), "{reply}");
}

/// `clickhook send` names a rejected line as the file counts it (blank lines too), and
/// when the input breaks off it still reports what was acknowledged before, and exits 1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_names_file_lines_and_reports_what_was_acknowledged_when_cut_short() {
    let d = Daemon::start(&config_text(""));
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("clicks.ndjson");
    std::fs::write(
        &file,
        format!("{}\n\n{{\"nolink\":1}}\n{}\n", click("1", "w"), click("2", "w")),
    )
    .unwrap();
    let send = |args: Vec<String>| {
        let out = std::process::Command::new(bin())
            .arg("send")
            .args(args)
            .output()
            .unwrap();
        let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
        (out.status.code(), text(&out.stdout), text(&out.stderr))
    };
    let file_arg = file.display().to_string();
    let (code, out, err) = send(vec![
        "--socket".into(),
        d.socket.display().to_string(),
        file_arg.clone(),
    ]);
    assert_eq!(code, Some(1), "{out}{err}");
    assert!(out.contains("acknowledged 2 rejected 1"), "{out}");
    assert!(err.contains("rejected line 3: "), "{err}");
    // Over HTTP the chunk is refused whole; the line at fault is named all the same.
    let (code, out, err) = send(vec!["--url".into(), d.http.clone(), file_arg]);
    assert_eq!(code, Some(1), "{out}{err}");
    assert!(out.contains("acknowledged 0 rejected 3"), "{out}");
    assert!(err.contains("rejected line 3: 400 "), "{err}");
    // Bytes that are no text after two good lines: those two count, and the run says why it stopped.
    let mut broken = format!("{}\n{}\n", click("3", "w"), click("4", "w")).into_bytes();
    broken.extend_from_slice(b"\xff\xfe\n");
    std::fs::write(&file, broken).unwrap();
    for transport in [
        vec!["--socket".to_string(), d.socket.display().to_string()],
        vec!["--url".into(), d.http.clone()],
    ] {
        let mut args = transport.clone();
        args.push(file.display().to_string());
        let (code, out, err) = send(args);
        assert_eq!(code, Some(1), "{transport:?}: {out}{err}");
        assert!(out.contains("acknowledged 2 rejected 0"), "{transport:?}: {out}");
        assert!(
            err.contains("stopped early: cannot read the input after line 2"),
            "{transport:?}: {err}"
        );
    }
}
