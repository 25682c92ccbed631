//! Criterion benches of the hot path outside the network: click parsing (simd-json beside
//! serde_json), validation into the stored form (from text and from a value), signing,
//! log append + flush per batch size, and routing with 10k and 100k endpoints (a lookup,
//! and adding one endpoint to the index against rebuilding it). Figures go to
//! BENCHMARKS.md; nothing here asserts a speed or touches the network.

use clickhook::config::{EndpointConfig, FsyncMode};
use clickhook::deliver::sign::{generate_secret, SigningKey};
use clickhook::enrich::Enricher;
use clickhook::ingest::click;
use clickhook::log::{sled_log_options, ClickLog, NewEvent, SledLog};
use clickhook::route::{ClickFacts, RoutingIndex};
use criterion::{criterion_group, criterion_main, BatchSize, BenchmarkId, Criterion, Throughput};
use std::time::Duration;

const CLICK: &str = r#"{"link":{"id":12345,"workspace_id":1,"slug":"/abc123","domain":"links.example","destination":"https://example.com/landing-page?utm_source=newsletter","name":"Spring sale","created_at":"2025-01-01T00:00:00Z","utm":{"source":"newsletter","medium":"email","campaign":"spring-sale"},"tags":["sale","spring"]},"click":{"ip":"203.0.113.9","user_agent":"Mozilla/5.0 (Linux; Android 10; SM-G973F) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0.0.0 Mobile Safari/537.36","referer":"https://twitter.com/","country":"US","region":"CA","city":"San Francisco","isp":"Comcast","language":"en-US","params":{"utm_source":"twitter"}},"metadata":{"campaign":"spring","order":991}}"#;

fn parsing(c: &mut Criterion) {
    let mut g = c.benchmark_group("parse_click");
    g.throughput(Throughput::Bytes(CLICK.len() as u64));
    g.bench_function("simd_json", |b| {
        b.iter_batched(
            || CLICK.as_bytes().to_vec(),
            |mut bytes| simd_json::serde::from_slice::<serde_json::Value>(&mut bytes).unwrap(),
            BatchSize::SmallInput,
        )
    });
    g.bench_function("serde_json", |b| {
        b.iter(|| serde_json::from_str::<serde_json::Value>(CLICK).unwrap())
    });
    g.finish();
    let enricher = Enricher::new();
    let mut g = c.benchmark_group("prepare_click");
    // What ingest does with a click in the model: from its text to the stored form.
    g.bench_function("from_text", |b| {
        b.iter(|| click::prepare_raw(CLICK.as_bytes(), 0, &enricher, "2025-01-15T10:30:00.000Z").unwrap())
    });
    // The input adapters' way: a value already built, encoded and prepared.
    g.bench_function("from_value", |b| {
        b.iter_batched(
            || serde_json::from_str::<serde_json::Value>(CLICK).unwrap(),
            |v| click::prepare(v, 0, &enricher, "2025-01-15T10:30:00.000Z").unwrap(),
            BatchSize::SmallInput,
        )
    });
    g.finish();
}

fn signing(c: &mut Criterion) {
    let key = SigningKey::from_secret(&generate_secret()).unwrap();
    let body = vec![b'x'; 1024];
    c.bench_function("sign v1 (1 KiB body)", |b| {
        b.iter(|| key.sign("evt_0123456789abcdef", 1_700_000_000, &body))
    });
}

fn log_append(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let options = sled_log_options(FsyncMode::Always, Duration::from_millis(50), 32 << 20);
    let log = SledLog::open(dir.path(), options).unwrap();
    let data = br#"{"id":"evt_x","timestamp":"2025-01-15T10:30:00.000Z","link":{"id":1}}"#.repeat(12);
    let mut g = c.benchmark_group("log_append_flush");
    g.sample_size(20);
    for batch in [1usize, 10, 100, 1000] {
        g.throughput(Throughput::Elements(batch as u64));
        g.bench_with_input(BenchmarkId::from_parameter(batch), &batch, |b, &batch| {
            b.iter(|| {
                let events = (0..batch)
                    .map(|i| NewEvent {
                        id: format!("e{i}"),
                        client_id: false,
                        data: data.clone(),
                        endpoints: vec![1],
                    })
                    .collect();
                runtime.block_on(log.append(events)).unwrap().unwrap()
            })
        });
    }
    g.finish();
}

fn routing(c: &mut Criterion) {
    let mut g = c.benchmark_group("route");
    for n in [10_000usize, 100_000] {
        let endpoints: Vec<EndpointConfig> = (0..n)
            .map(|i| {
                let mut e: EndpointConfig = toml::from_str(&format!("id = \"e{i}\"\nurl = \"http://x\"")).unwrap();
                e.links = vec![i.to_string()];
                e
            })
            .collect();
        let index = RoutingIndex::build(endpoints.iter().enumerate().map(|(i, e)| (i as u32, e)));
        // What creating one more endpoint costs the registry: a copy of the live index
        // with that endpoint added, against rebuilding the index over all of them.
        let mut extra: EndpointConfig = toml::from_str("id = \"new\"\nurl = \"http://x\"").unwrap();
        extra.links = vec!["new".into()];
        g.bench_with_input(BenchmarkId::new("add one to", n), &n, |b, _| {
            b.iter(|| {
                let mut next = index.clone();
                next.add(n as u32, &extra);
                next
            })
        });
        g.bench_with_input(BenchmarkId::new("rebuild with one more", n), &n, |b, _| {
            b.iter(|| {
                RoutingIndex::build(
                    endpoints
                        .iter()
                        .chain(std::iter::once(&extra))
                        .enumerate()
                        .map(|(i, e)| (i as u32, e)),
                )
            })
        });
        let mut out = Vec::with_capacity(4);
        g.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, _| {
            let mut i = 0usize;
            b.iter(|| {
                out.clear();
                i = (i + 7919) % n;
                let link = i.to_string();
                index.route(
                    ClickFacts {
                        link_id: &link,
                        workspace_id: Some("1"),
                        is_bot: false,
                    },
                    &mut out,
                );
                out.len()
            })
        });
    }
    g.finish();
}

criterion_group!(benches, parsing, signing, log_append, routing);
criterion_main!(benches);
