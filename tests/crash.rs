//! `kill -9` in the middle of a stream of clicks: every acknowledged click must still be
//! delivered after a restart. Duplicates are allowed (at least once) and reported. The
//! kill is a real SIGKILL of the real binary, never a simulated stop.

mod common;

use common::*;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

/// Streams clicks over the socket until the connection dies or `n` are sent; returns the
/// ids acknowledged (only `ok` lines count).
async fn stream_until_killed(
    socket: std::path::PathBuf,
    n: usize,
    tag: usize,
    progress: Arc<AtomicUsize>,
) -> Vec<String> {
    let Ok(stream) = tokio::net::UnixStream::connect(&socket).await else {
        return vec![];
    };
    let (read, mut write) = stream.into_split();
    tokio::spawn(async move {
        for i in 0..n {
            let line = format!("{}\n", click(&format!("{tag}-{i}"), "w"));
            if write.write_all(line.as_bytes()).await.is_err() {
                return;
            }
            if i % 50 == 0 {
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
            progress.store(acked.len(), Ordering::SeqCst);
        }
    }
    acked
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_stream_loses_no_acknowledged_click() {
    let sink = Sink::start().await;
    // A slow-ish receiver keeps deliveries in flight and a backlog queued when the kill lands.
    sink.default_answer("/a", Answer::Delay(Duration::from_millis(2), 200));
    let mut d = Daemon::start(&config_text(&endpoint("a", &sink.url("/a"), "max_concurrency = 8")));
    let mut acked_all: Vec<String> = Vec::new();
    for round in 0..3 {
        let socket = d.socket.clone();
        let progress = Arc::new(AtomicUsize::new(0));
        let streamer = tokio::spawn(stream_until_killed(socket, 6000, round, progress.clone()));
        // Kill once part of the stream has been acknowledged, at a different point each round.
        let kill_after = 300 + 700 * round;
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while progress.load(Ordering::SeqCst) < kill_after && std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        d.kill9();
        let acked = streamer.await.unwrap();
        eprintln!("round {round}: {} clicks acknowledged before kill -9", acked.len());
        assert!(
            !acked.is_empty(),
            "the kill came before any acknowledgement; the test proves nothing"
        );
        acked_all.extend(acked);
        d.spawn();
    }
    let want: HashSet<&String> = acked_all.iter().collect();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let got: HashSet<String> = sink.event_ids("/a").into_iter().collect();
        if want.iter().all(|id| got.contains(*id)) || std::time::Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let delivered = sink.event_ids("/a");
    let mut counts: HashMap<&String, usize> = HashMap::new();
    for id in &delivered {
        *counts.entry(id).or_default() += 1;
    }
    let lost: Vec<_> = want.iter().filter(|id| !counts.contains_key(**id)).collect();
    let duplicates: usize = counts.values().map(|c| c - 1).sum();
    eprintln!(
        "acknowledged {}, delivered {} distinct ({} requests), lost {}, duplicates {}",
        want.len(),
        counts.len(),
        delivered.len(),
        lost.len(),
        duplicates
    );
    assert!(
        lost.is_empty(),
        "acknowledged clicks lost: {:?}",
        &lost[..lost.len().min(10)]
    );
    let _ = d.terminate();
}
