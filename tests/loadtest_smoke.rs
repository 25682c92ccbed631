//! Short runs of the load generator's `throughput`, `flaky` and `many-endpoints`
//! scenarios against the real daemon, and one with the sink's scripted faults (latency,
//! 410s, an outage), so the tool cannot rot; and the `wrk` baseline's body against what
//! the daemon really delivers. They assert what the tool
//! verifies (nothing lost, every signature valid). They must never assert a speed.

mod common;

use clickhook_loadtest::{run_async, Scenario, ScenarioOptions, SinkScript, Transport};
use std::time::Duration;

fn options(scenario: Scenario, clicks: u64) -> ScenarioOptions {
    let mut options = ScenarioOptions::new(scenario, env!("CARGO_BIN_EXE_clickhook"));
    options.clicks = Some(clicks);
    options.progress = false;
    options
}

async fn smoke(scenario: Scenario, clicks: u64, transport: Transport) -> clickhook_loadtest::Report {
    let mut options = options(scenario, clicks);
    options.transport = transport;
    checked_run(options).await
}

/// Runs the scenario and asserts what the tool verifies.
async fn checked_run(options: ScenarioOptions) -> clickhook_loadtest::Report {
    let clicks = options.clicks.expect("a smoke run sets its clicks");
    let report = run_async(options).await.expect("the scenario runs");
    eprintln!("{}", report.render_text());
    assert!(report.passed, "{:?}", report.failures());
    assert_eq!(report.clicks_acknowledged, clicks);
    assert_eq!(report.lost, 0);
    assert_eq!(report.bad_signatures, 0);
    assert!(report.delivered >= clicks);
    // A started daemon is measured twice: once started, once at the end.
    let (start, all) = (report.daemon.startup_cpu_seconds, report.daemon.cpu_seconds);
    assert!(start.zip(all).is_some_and(|(s, a)| s <= a), "{start:?} of {all:?}");
    report
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn throughput_smoke_over_http() {
    smoke(Scenario::Throughput, 3000, Transport::Http).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn throughput_smoke_over_the_socket() {
    smoke(Scenario::Throughput, 3000, Transport::Unix).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flaky_smoke_delivers_everything() {
    let report = smoke(Scenario::Flaky, 3000, Transport::Http).await;
    // Everything arrived although the sink failed attempts: 30 % of them, at most three
    // for each event, about 1,250 for 3,000 clicks. 300 leaves room for chance and still
    // shows that the faults happened.
    let failed = report.sink.answered_500;
    assert!(failed >= 300, "the sink failed only {failed} attempts");
}

/// 10,000 link-level endpoints, all pointing at the one local sink: every click must
/// reach its link's endpoint. At this size it guards the scenario, not the speed: the
/// connection sharing that made the full-size run pass is shown by a unit test in
/// `deliver::send`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_endpoints_smoke_delivers_every_click() {
    smoke(Scenario::ManyEndpoints, 10_000, Transport::Http).await;
}

/// The sink's scripted faults: every answer late, an endpoint that answers 410, and the
/// sink down for a moment in the middle of ingest. Everything still arrives at the
/// endpoint that must receive, and the 410 endpoint was answered 410.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scripted_sink_faults_still_deliver_everything() {
    let mut options = options(Scenario::Throughput, 3000);
    options.rate = Some(2000);
    options.sink = SinkScript {
        latency: Some(Duration::from_millis(2)),
        fail_rate: None,
        gone: 1,
        outage: Some((Duration::from_millis(300), Duration::from_millis(700))),
    };
    let report = checked_run(options).await;
    assert!(report.sink.answered_410 >= 1, "the gone endpoint answered 410");
    assert_eq!(report.endpoints, 2);
    // A listener that did not go down or come back fails the run; clicks sent while it
    // was down waited for it.
    assert!(
        report.latency.max_ms >= 300.0,
        "the outage held some deliveries back: {:?}",
        report.latency
    );
}

/// A scripted outage that never happened (due after the run is over) fails the run, as
/// the load generator's README says, though every click arrived.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_that_did_not_happen_fails_the_run() {
    let mut options = options(Scenario::Throughput, 500);
    options.sink.outage = Some((Duration::from_secs(600), Duration::from_millis(100)));
    let report = run_async(options).await.expect("the scenario runs");
    assert_eq!(report.lost, 0);
    assert!(!report.passed, "{}", report.render_text());
    assert!(
        report.failures().iter().any(|f| f.contains("scripted outage")),
        "{:?}",
        report.failures()
    );
}

/// `wrk`'s baseline posts the body the daemon delivers for the same click, so the ratio
/// of their rates compares the same bytes; when enrichment or the `standard` format
/// changes, the baseline's copy must change with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_wrk_baseline_posts_what_the_daemon_delivers() {
    use clickhook_loadtest::baseline::{delivered_body, BASELINE_CLICK, BASELINE_ID};
    let sink = common::Sink::start().await;
    let daemon = common::Daemon::start(&common::config_text(&common::endpoint("ep", &sink.url("/ep"), "")));
    let factory = clickhook_loadtest::clicks::ClickFactory::new(1000, "wrk", false, "2026-01-02T03:04:05Z".into());
    let mut click = Vec::new();
    factory.write(BASELINE_CLICK, &mut click);
    let (status, answer) = daemon
        .post(std::str::from_utf8(&click).unwrap(), "application/json")
        .await;
    assert_eq!(status, 202, "{answer}");
    let got = sink.wait_for("/ep", 1, Duration::from_secs(10)).await;
    let delivered = got[0].json();
    let id = delivered["data"]["id"].as_str().expect("an event id");
    assert_eq!((&id[..4], id.len()), (&BASELINE_ID[..4], BASELINE_ID.len()), "{id}");
    let baseline = delivered_body(&factory, id).expect("the baseline click keeps its shape");
    assert_eq!(serde_json::from_str::<serde_json::Value>(&baseline).unwrap(), delivered);
    assert_eq!(baseline.len(), got[0].body.len(), "{baseline}");
}
