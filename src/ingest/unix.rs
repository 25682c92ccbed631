//! The Unix-socket ingest (SPEC §3.3): pipelined NDJSON in, one `ok <id>` / `err <reason>`
//! line out per input line, in order, each written only once that click is durable. A
//! connection's reader and writer are decoupled by a small bounded queue, so a client that
//! stops reading replies stops being read: backpressure, never unbounded memory. It must
//! not let one bad line affect its neighbours.

use super::click::{self, PreparedClick};
use super::{IngestError, Ingestor, Submitted};
use crate::metrics::{self, Source};
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufWriter};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;

/// Groups of lines read but not yet answered, per connection.
const REPLY_QUEUE: usize = 8;
const READ_CHUNK: usize = 64 * 1024;

/// The answer owed to one line.
enum LineResult {
    /// Answered with the next id of the group's append.
    Click,
    Rejected(String),
}

/// The lines of one read, in order, with the append that covers the good ones.
struct Group {
    lines: Vec<LineResult>,
    submitted: Option<Result<Submitted, IngestError>>,
}

/// At most this many open socket connections: past it, new connections wait in the kernel's backlog
/// instead of costing memory here.
const MAX_CONNECTIONS: usize = 1024;

pub async fn serve(
    listener: UnixListener,
    ingestor: Arc<Ingestor>,
    max_line: usize,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut connections = JoinSet::new();
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            break;
        };
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = shutdown.changed() => break,
        };
        match accepted {
            Ok((stream, _)) => {
                let conn = connection(stream, ingestor.clone(), max_line, shutdown.clone());
                connections.spawn(async move {
                    let _slot = slot;
                    conn.await
                });
            }
            Err(e) => {
                tracing::warn!(error = %e, "socket accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
        while connections.try_join_next().is_some() {}
    }
    while connections.join_next().await.is_some() {}
}

async fn connection(stream: UnixStream, ingestor: Arc<Ingestor>, max_line: usize, mut shutdown: watch::Receiver<bool>) {
    let (mut read, write) = stream.into_split();
    let (tx, rx) = mpsc::channel::<Group>(REPLY_QUEUE);
    let writer = tokio::spawn(write_replies(write, rx, ingestor.clone()));
    let mut buf: Vec<u8> = Vec::with_capacity(READ_CHUNK);
    // Inside an overlong line: its bytes are dropped until its newline.
    let mut skipping = false;
    loop {
        let start = buf.len();
        buf.resize(start + READ_CHUNK, 0);
        let n = tokio::select! {
            r = read.read(&mut buf[start..]) => r,
            _ = shutdown.changed() => Ok(0),
        };
        // A read error ends the connection like an end of stream: answer what was read.
        let n = n.unwrap_or_default();
        buf.truncate(start + n);
        if n == 0 {
            // A last line without its newline is still a line.
            if !buf.is_empty() && !skipping {
                buf.push(b'\n');
                let group = make_group(&ingestor, &mut buf, max_line, &mut skipping).await;
                let _ = tx.send(group).await;
            }
            break;
        }
        let group = make_group(&ingestor, &mut buf, max_line, &mut skipping).await;
        if group.lines.is_empty() {
            continue;
        }
        if tx.send(group).await.is_err() {
            break;
        }
    }
    drop(tx);
    let _ = writer.await;
}

/// Takes every complete line out of `buf` and submits the good ones as one append.
async fn make_group(ingestor: &Ingestor, buf: &mut Vec<u8>, max_line: usize, skipping: &mut bool) -> Group {
    let mut lines = Vec::new();
    let mut good: Vec<PreparedClick> = Vec::new();
    let mut consumed = 0;
    let received = click::received_now();
    while let Some(pos) = buf[consumed..].iter().position(|b| *b == b'\n') {
        let end = consumed + pos;
        let line = &mut buf[consumed..end];
        let was_skipping = std::mem::replace(skipping, false);
        if was_skipping || line.len() > max_line {
            lines.push(LineResult::Rejected(format!(
                "line longer than ingest.http.max_body ({max_line} bytes)"
            )));
        } else if !line.iter().all(u8::is_ascii_whitespace) {
            let result = click::parse_one(line)
                .and_then(|v| click::prepare(v, 0, &ingestor.enricher, &received).map_err(|e| e.message));
            lines.push(match result {
                Ok(c) => {
                    good.push(c);
                    LineResult::Click
                }
                Err(m) => LineResult::Rejected(m),
            });
        }
        consumed = end + 1;
    }
    buf.drain(..consumed);
    if buf.len() > max_line {
        *skipping = true;
        buf.clear();
    }
    let submitted = if good.is_empty() {
        None
    } else {
        Some(ingestor.submit(good, Source::Unix).await)
    };
    Group { lines, submitted }
}

async fn write_replies(
    write: tokio::net::unix::OwnedWriteHalf,
    mut rx: mpsc::Receiver<Group>,
    ingestor: Arc<Ingestor>,
) {
    let mut out = BufWriter::new(write);
    while let Some(group) = rx.recv().await {
        let ids = match group.submitted {
            None => Ok(Vec::new()),
            Some(Ok(s)) => ingestor.wait(s).await,
            Some(Err(e)) => Err(e),
        };
        let mut ids = match ids {
            Ok(ids) => Ok(ids.into_iter()),
            Err(e) => Err(e.to_string()),
        };
        let mut rejected = 0;
        let mut text = String::new();
        for line in group.lines {
            match (line, &mut ids) {
                (LineResult::Rejected(reason), _) => {
                    rejected += 1;
                    text.push_str("err ");
                    text.push_str(&reason.replace('\n', " "));
                }
                (LineResult::Click, Ok(ids)) => {
                    text.push_str("ok ");
                    text.push_str(&ids.next().unwrap_or_default());
                }
                (LineResult::Click, Err(e)) => {
                    rejected += 1;
                    text.push_str("err unavailable: ");
                    text.push_str(e);
                }
            }
            text.push('\n');
        }
        if rejected > 0 {
            metrics::ingest_rejected(Source::Unix, "invalid", rejected);
        }
        if out.write_all(text.as_bytes()).await.is_err() {
            return;
        }
        if rx.is_empty() && out.flush().await.is_err() {
            return;
        }
    }
    let _ = out.flush().await;
}
