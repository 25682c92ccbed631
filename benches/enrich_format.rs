//! Per-click costs of ingest enrichment and of the product formats. Enrichment runs once per
//! accepted click, so its cost bounds ingest throughput (the target is 150k clicks/s over all
//! cores): `enrich/cached` is the steady state of real traffic, where a few thousand user
//! agents repeat; `enrich/uncached` is the parser's own cost, paid once per new user agent.
//! `render/*` is what delivery pays per request body. Nothing here asserts a speed; the
//! figures go to BENCHMARKS.md.

use clickhook::deliver::format::{render, Format, RenderContext};
use clickhook::enrich::Enricher;
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use serde_json::{json, Map, Value};
use std::hint::black_box;

const USER_AGENTS: [&str; 10] = [
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0.0.0 Safari/537.36",
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.2 Safari/605.1.15",
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_1_2 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.1.2 \
     Mobile/15E148 Safari/604.1",
    "Mozilla/5.0 (Linux; Android 10; SM-G973F) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/121.0.0.0 Mobile \
     Safari/537.36",
    "Mozilla/5.0 (Linux; Android 13; SAMSUNG SM-S911B) AppleWebKit/537.36 (KHTML, like Gecko) SamsungBrowser/23.0 \
     Chrome/115.0.0.0 Mobile Safari/537.36",
    "Mozilla/5.0 (iPad; CPU OS 17_1 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.1 Mobile/15E148 \
     Safari/604.1",
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64; rv:121.0) Gecko/20100101 Firefox/121.0",
    "Mozilla/5.0 (iPhone; CPU iPhone OS 16_5 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Mobile/15E148 \
     [FBAN/FBIOS;FBDV/iPhone14,5;FBMD/iPhone;FBSN/iOS;FBSV/16.5;FBSS/3;FBID/phone;FBLC/en_US;FBOP/5]",
    "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)",
    "Slackbot-LinkExpanding 1.0 (+https://api.slack.com/robots)",
];

fn click(user_agent: &str) -> Map<String, Value> {
    let click = json!({
        "ip": "203.0.113.9",
        "user_agent": user_agent,
        "referer": "https://twitter.com/",
        "country": "DE",
        "region": "BE",
        "city": "Berlin",
        "destination": "https://example.com/landing-page",
        "params": {"utm_source": "twitter"}
    });
    match click {
        Value::Object(map) => map,
        _ => Map::new(),
    }
}

fn enrich(c: &mut Criterion) {
    let enricher = Enricher::new();
    let clicks: Vec<Map<String, Value>> = USER_AGENTS.iter().map(|ua| click(ua)).collect();
    let mut group = c.benchmark_group("enrich");
    group.throughput(Throughput::Elements(clicks.len() as u64));
    group.bench_function("cached", |b| {
        b.iter_batched(
            || clicks.clone(),
            |mut batch| {
                for click in &mut batch {
                    black_box(enricher.enrich(click));
                }
                batch
            },
            BatchSize::SmallInput,
        )
    });
    let mut round = 0u64;
    group.bench_function("uncached", |b| {
        b.iter_batched(
            || {
                // A suffix the parser ignores makes every string new to the cache.
                round += 1;
                clicks
                    .iter()
                    .map(|c| {
                        let mut c = c.clone();
                        let ua = format!("{} r/{round}", c["user_agent"].as_str().unwrap_or_default());
                        c.insert("user_agent".into(), Value::String(ua));
                        c
                    })
                    .collect::<Vec<_>>()
            },
            |mut batch| {
                for click in &mut batch {
                    black_box(enricher.enrich(click));
                }
                batch
            },
            BatchSize::SmallInput,
        )
    });
    group.finish();
}

/// The stored event of a rich click, as ingest writes it.
fn stored_event() -> Vec<u8> {
    let mut click = click(USER_AGENTS[3]);
    Enricher::new().enrich(&mut click);
    let event = json!({
        "id": "evt_0195c2f3a0c07b6e8d2f4a1b9c3d5e7f",
        "timestamp": "2025-10-25T02:36:47.132Z",
        "link": {
            "id": 12345, "workspace_id": 1, "slug": "abc123", "domain": "brand.link",
            "destination": "https://example.com/landing-page", "name": "My Campaign Link",
            "created_at": "2023-08-31T04:13:48.385Z", "active_at": "2023-09-01T08:00:00Z", "enabled": true,
            "campaign_id": "20230824141025935", "client_id": "00001", "product_id": "masivlinks",
            "delivery_id": "20230824141025935", "recipient": "email@masiv.com",
            "utm": {"source": "newsletter", "medium": "email", "campaign": "spring-sale"},
            "og": {"title": "Special Offer", "description": "Check out our spring sale!"},
            "rules": [{"what": "country", "matches": "US", "url": "https://example.com/us-landing"}],
            "forward_params": true, "cloaking": false, "block_bots": true, "public_analytics": false,
            "domain_id": "8f104cc5b6ee4a4ba7897b06ac2ddcfb"
        },
        "click": click,
        "metadata": {"crm_contact": "C-1042"}
    });
    serde_json::to_vec(&event).unwrap_or_default()
}

fn formats(c: &mut Criterion) {
    let event = stored_event();
    let events: [&[u8]; 1] = [&event];
    let ctx = RenderContext {
        endpoint_id: "crm",
        webhook_id: "evt_1",
        include_ip: false,
        batch: false,
    };
    let mut group = c.benchmark_group("render");
    group.throughput(Throughput::Elements(1));
    for format in [Format::Standard, Format::Linkly, Format::Rebrandly, Format::Masiv] {
        group.bench_function(format.as_str(), |b| b.iter(|| render(format, black_box(&events), &ctx)));
    }
    group.finish();
}

criterion_group!(benches, enrich, formats);
criterion_main!(benches);
