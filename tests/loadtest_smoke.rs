//! Short runs of the load generator's `throughput`, `flaky` and `many-endpoints`
//! scenarios against the real daemon, so the tool cannot rot. They assert what the tool
//! verifies (nothing lost, every signature valid). They must never assert a speed.

use clickhook_loadtest::{run_async, Scenario, ScenarioOptions, Transport};

async fn smoke(scenario: Scenario, clicks: u64, transport: Transport) {
    let mut options = ScenarioOptions::new(scenario, env!("CARGO_BIN_EXE_clickhook"));
    options.clicks = Some(clicks);
    options.transport = transport;
    options.progress = false;
    let report = run_async(options).await.expect("the scenario runs");
    eprintln!("{}", report.render_text());
    assert!(report.passed, "{:?}", report.failures());
    assert_eq!(report.clicks_acknowledged, clicks);
    assert_eq!(report.lost, 0);
    assert_eq!(report.bad_signatures, 0);
    assert!(report.delivered >= clicks);
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
    smoke(Scenario::Flaky, 1000, Transport::Http).await;
}

/// 10,000 link-level endpoints, all pointing at the one local sink: every click must
/// reach its link's endpoint. At this size it guards the scenario, not the speed: the
/// connection sharing that made the full-size run pass is shown by a unit test in
/// `deliver::send`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_endpoints_smoke_delivers_every_click() {
    smoke(Scenario::ManyEndpoints, 10_000, Transport::Http).await;
}
