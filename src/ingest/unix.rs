//! The Unix-socket ingest (SPEC §3.3): pipelined NDJSON in, one `ok <id>` / `err <reason>`
//! line out per input line, in order, each written only once that click is durable. A
//! connection's reader and writer are decoupled by a small bounded queue, so a client that
//! stops reading replies stops being read: backpressure, never unbounded memory. It must
//! not let one bad line affect its neighbours.

use super::click::{self, PreparedClick};
use super::{ByteBudget, IngestError, Ingestor, FINISH_WITHIN};
use crate::metrics::{self, Source};
use bytes::BufMut;
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufWriter};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit};
use tokio::task::{JoinHandle, JoinSet};

/// Reads of a connection between being read and their replies written. A read takes
/// its place before it reads, so the replies of a client that reads none hold up its own
/// reads only, and none of the listener's budgets.
const READS_UNANSWERED: usize = 12;
/// Lines one place among [`READS_UNANSWERED`] covers: a read of lines of 32 bytes or
/// more with their newline (64 KiB of them is at most 2,048 lines) takes one place, a
/// read of 3-byte lines 11. At 512, 20-byte clicks over one connection went 30 % slower,
/// with about two reads in flight instead of twelve.
const LINES_PER_PLACE: usize = 2048;
const READ_CHUNK: usize = 64 * 1024;
/// Chunks of a connection being parsed at once, ahead of their append.
const PARSE_AHEAD: usize = 4;
/// The memory a click costs from its parse until it is durable, besides its line's bytes:
/// the prepared click and the log's event.
const CLICK_COST: usize = 256;
/// What the clicks of reads not yet durable may cost at once across the socket's
/// connections (a read's bytes, and [`CLICK_COST`] a line).
const CLICKS_BUDGET: usize = 64 << 20;
/// How a line refused through no fault of its own is answered, before why: it may be
/// sent again.
pub const UNAVAILABLE_REPLY: &str = "err unavailable: ";
/// How long a connection's replies may take once the daemon shuts down.
const SHUTDOWN_REPLIES_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// The answer owed to one line.
enum LineResult {
    /// Answered with the next id of the group's append.
    Click,
    Rejected(String),
    /// Not taken now, through no fault of the line: it may be sent again.
    Unavailable(&'static str),
}

/// The lines of one read, in order, with the append that covers the good ones.
struct Group {
    /// The read's place among its connection's unanswered ones.
    _place: OwnedSemaphorePermit,
    lines: Vec<LineResult>,
    /// The append's outcome, awaited in a task of its own: the append's place among those
    /// waiting for the disk goes back once it is durable, whether or not the client reads
    /// its replies. Held until the writer got to it, it kept others' clicks out.
    appended: Option<JoinHandle<Result<Vec<String>, IngestError>>>,
}

/// At most this many open socket connections: past it, new connections wait in the kernel's backlog
/// instead of costing memory here.
const MAX_CONNECTIONS: usize = 1024;

/// How a connection may hold lines: each at most `max_line` bytes, and what a line being
/// read holds past one read ([`READ_CHUNK`]) taken from a budget the listener's
/// connections share. Lines of clicks are far shorter, so only long lines touch the
/// budget; without it, 1,024 connections each in the middle of an 8 MiB line would hold
/// 8 GiB. Whole lines read take from a second budget until their clicks are durable:
/// 1,024 connections each with a dozen reads of short clicks parsed ahead held gigabytes.
#[derive(Clone)]
pub(crate) struct LineLimits {
    max_line: usize,
    long_lines: ByteBudget,
    clicks: ByteBudget,
}

/// The lines a read ends (each owes a reply, or none if blank).
fn lines_in(chunk: &[u8]) -> usize {
    chunk.iter().filter(|b| **b == b'\n').count()
}

/// What a read of `len` bytes and `lines` lines takes from the clicks' budget.
fn clicks_cost(len: usize, lines: usize) -> usize {
    len.saturating_add(lines.saturating_mul(CLICK_COST))
}

/// The places a read of `lines` lines takes besides its own: one for each
/// [`LINES_PER_PLACE`], and never all of them, so that a read can always go on once the
/// connection's earlier replies are written.
fn extra_places(lines: usize) -> u32 {
    (lines.saturating_sub(1) / LINES_PER_PLACE).min(READS_UNANSWERED - 1) as u32
}

/// A read's whole lines on their way to the log: their parse, the long line they end and
/// its budget, what their clicks take from the listener's budget, and their place.
struct ReadLines {
    parse: JoinHandle<Parsed>,
    long_line: Option<OwnedSemaphorePermit>,
    clicks: OwnedSemaphorePermit,
    place: OwnedSemaphorePermit,
}

/// Why a line is being skipped to its end.
#[derive(Clone, Copy)]
enum Skipped {
    TooLong,
    /// Its bytes past one read did not fit in the listener's budget of long lines.
    OverBudget,
    /// It held budget past [`FINISH_WITHIN`] without ending.
    TooSlow,
}

pub async fn serve(
    listener: UnixListener,
    ingestor: Arc<Ingestor>,
    max_line: usize,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut connections = JoinSet::new();
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let limits = LineLimits {
        max_line,
        long_lines: ByteBudget::for_max_body(max_line),
        clicks: ByteBudget::of(CLICKS_BUDGET),
    };
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
                let conn = connection(stream, ingestor.clone(), limits.clone(), shutdown.clone());
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

async fn connection(
    stream: UnixStream,
    ingestor: Arc<Ingestor>,
    limits: LineLimits,
    mut shutdown: watch::Receiver<bool>,
) {
    let max_line = limits.max_line;
    let (mut read, write) = stream.into_split();
    let (parsed_tx, parsed_rx) = mpsc::channel::<ReadLines>(PARSE_AHEAD);
    // Room for every read that holds a place: sending a group never waits.
    let (tx, rx) = mpsc::channel::<Group>(READS_UNANSWERED);
    let places = Arc::new(tokio::sync::Semaphore::new(READS_UNANSWERED));
    let writer = tokio::spawn(write_replies(write, rx));
    let submitter = tokio::spawn(submit_in_order(parsed_rx, tx, ingestor.clone()));
    let mut buf: Vec<u8> = Vec::with_capacity(READ_CHUNK);
    // Inside a line refused before its end: why, and its length so far. Its bytes are
    // dropped until its newline, and counted so that one refused for the budget is told
    // if it is too long.
    let mut skipping: Option<(Skipped, usize)> = None;
    // The budget the line being read holds for its bytes past one read, and until when.
    let mut held: Option<(OwnedSemaphorePermit, tokio::time::Instant)> = None;
    // The place of the next read with whole lines, taken before reading: a connection
    // whose client reads no replies waits here, where what is left of the buffer is
    // shorter than one read and holds no budget. Taken after the read, the chunk that
    // ended a long line waited for it while holding that line's budget.
    let mut place: Option<OwnedSemaphorePermit> = None;
    let handing = Handing {
        ingestor: &ingestor,
        limits: &limits,
        places: &places,
        parsed_tx: &parsed_tx,
    };
    loop {
        let start = buf.len();
        buf.reserve(READ_CHUNK);
        let held_until = held.as_ref().map(|(_, until)| *until);
        let n = tokio::select! {
            r = async {
                if place.is_none() {
                    place = places.clone().acquire_owned().await.ok();
                }
                // At most one READ_CHUNK a read, into room not zeroed first.
                read.read_buf(&mut (&mut buf).limit(READ_CHUNK)).await
            } => r,
            // The daemon stops reading, not the client: a line cut here is not the
            // client's fault, and goes unanswered (nor stored) rather than blamed.
            _ = shutdown.changed() => break,
            _ = async {
                match held_until {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            } => {
                skipping = Some((Skipped::TooSlow, start));
                buf.clear();
                held = None;
                continue;
            }
        };
        // A read error ends the connection like an end of stream: answer what was read.
        let closing = n.unwrap_or_default() == 0;
        if closing && (!buf.is_empty() || skipping.is_some()) {
            // A last line without its newline is still a line, and an over-long one is
            // still answered.
            buf.push(b'\n');
        }
        // Whole lines go to a parse task of their own, so one connection's clicks are
        // parsed on every ingest thread; what follows the last newline waits for more.
        // Only the new bytes can hold one: what was kept from before follows the last.
        let whole = buf[start..]
            .iter()
            .rposition(|b| *b == b'\n')
            .map_or(0, |last| start + last + 1);
        if whole > 0 {
            let mut chunk: Vec<u8> = if whole > READ_CHUNK {
                // A long line: the chunk takes the buffer's room, not a copy of it.
                let rest = buf[whole..].to_vec();
                buf.truncate(whole);
                std::mem::replace(&mut buf, rest)
            } else {
                buf.drain(..whole).collect()
            };
            // The connection's places are never closed.
            let Some(place) = place.take() else {
                break;
            };
            // The read's first line, up to its newline (the chunk ends with one): the end
            // of a line refused or held from earlier reads, if any.
            let first_line = chunk.iter().position(|b| *b == b'\n').unwrap_or(chunk.len());
            // The refused line's last bytes came with this read: counted before it is
            // answered, so one that ends past `max_line` is told it is too long however
            // the reads split it.
            let first_line_skipped = skipping.take().map(|(why, so_far)| {
                if so_far.saturating_add(first_line) > max_line {
                    Skipped::TooLong
                } else {
                    why
                }
            });
            let long_line = held.take().map(|(permit, _)| permit);
            // A long line goes on its own, in the place its read took: lines read with it
            // wait for places of their own, not holding its budget.
            let read_with_it = long_line
                .as_ref()
                .map(|_| chunk.split_off((first_line + 1).min(chunk.len())))
                .filter(|rest| !rest.is_empty());
            if !handing
                .hand_over(chunk, place, long_line, first_line_skipped, &mut shutdown)
                .await
            {
                break;
            }
            if let Some(rest) = read_with_it {
                let place = tokio::select! {
                    place = places.clone().acquire_owned() => place.ok(),
                    _ = stopping(&mut shutdown) => None,
                };
                let Some(place) = place else {
                    break;
                };
                if !handing.hand_over(rest, place, None, None, &mut shutdown).await {
                    break;
                }
            }
        }
        if let Some((why, so_far)) = &mut skipping {
            // Still inside the refused line. One refused for the budget or its pace is
            // told it is too long once it is.
            *so_far += buf.len();
            if *so_far > max_line {
                *why = Skipped::TooLong;
            }
            buf.clear();
        } else if buf.len() > max_line {
            skipping = Some((Skipped::TooLong, buf.len()));
            buf.clear();
            held = None;
        } else if let Some(past_one_read) = buf.len().checked_sub(READ_CHUNK).filter(|n| *n > 0) {
            let (mut permit, finish_by) = match held.take() {
                Some((permit, finish_by)) => (Some(permit), finish_by),
                None => (None, tokio::time::Instant::now() + FINISH_WITHIN),
            };
            let holding = permit.as_ref().map_or(0, OwnedSemaphorePermit::num_permits);
            if limits
                .long_lines
                .take(&mut permit, past_one_read.saturating_sub(holding))
            {
                held = permit.map(|permit| (permit, finish_by));
            } else {
                skipping = Some((Skipped::OverBudget, buf.len()));
                buf.clear();
            }
        }
        if held.is_none() && buf.capacity() > 2 * READ_CHUNK {
            // A long line's room goes back with its budget.
            buf.shrink_to(2 * READ_CHUNK);
        }
        if closing {
            break;
        }
    }
    drop(parsed_tx);
    let (stop_submitter, stop_writer) = (submitter.abort_handle(), writer.abort_handle());
    let answered = async {
        let _ = submitter.await;
        let _ = writer.await;
    };
    tokio::pin!(answered);
    tokio::select! {
        _ = &mut answered => return,
        _ = stopping(&mut shutdown) => {}
    }
    // Shutting down: the replies get a while more, and a client that reads none no longer
    // holds the daemon up. Appends already submitted finish on their own; a click not yet
    // submitted was never acknowledged.
    if tokio::time::timeout(SHUTDOWN_REPLIES_WAIT, answered).await.is_err() {
        stop_submitter.abort();
        stop_writer.abort();
        tracing::warn!("a socket client read no replies at shutdown; its connection was closed");
    }
}

/// What a connection hands its reads of whole lines over with.
struct Handing<'a> {
    ingestor: &'a Arc<Ingestor>,
    limits: &'a LineLimits,
    places: &'a Arc<tokio::sync::Semaphore>,
    parsed_tx: &'a mpsc::Sender<ReadLines>,
}

impl Handing<'_> {
    /// Hands `chunk` (whole lines) to a parse task and then, in order, to the append, in
    /// `place` and with the long line it ends, if any. False when the connection is to
    /// stop reading: the daemon shuts down (these lines are never answered, nor stored).
    async fn hand_over(
        &self,
        chunk: Vec<u8>,
        mut place: OwnedSemaphorePermit,
        long_line: Option<OwnedSemaphorePermit>,
        first_line_skipped: Option<Skipped>,
        shutdown: &mut watch::Receiver<bool>,
    ) -> bool {
        let lines = lines_in(&chunk);
        // A read of many short lines owes as many replies: it takes a place for each
        // LINES_PER_PLACE of them, so a client that reads no replies has at most about
        // 55,000 lines taken and unanswered (22,528 in 11 places waiting for replies,
        // 32,768 in one read of 2-byte lines waiting here), not 12 reads of `{}` lines
        // (21,845 each).
        let more = extra_places(lines);
        if more > 0 {
            let extra = tokio::select! {
                extra = self.places.clone().acquire_many_owned(more) => extra.ok(),
                _ = stopping(shutdown) => None,
            };
            let Some(extra) = extra else {
                return false;
            };
            place.merge(extra);
        }
        // Waits for appends to take clicks off the budget: backpressure.
        let cost = clicks_cost(chunk.len(), lines);
        let clicks = tokio::select! {
            clicks = self.limits.clicks.wait_for(cost) => clicks,
            _ = stopping(shutdown) => None,
        };
        let Some(clicks) = clicks else {
            return false;
        };
        let ingestor = self.ingestor.clone();
        let max_line = self.limits.max_line;
        let parse = tokio::spawn(async move { parse_chunk(&ingestor, chunk, max_line, first_line_skipped) });
        // The long line this chunk ends holds its budget until its clicks are submitted
        // to the log.
        let read = ReadLines {
            parse,
            long_line,
            clicks,
            place,
        };
        tokio::select! {
            sent = self.parsed_tx.send(read) => sent.is_ok(),
            _ = stopping(shutdown) => false,
        }
    }
}

/// Resolves once the daemon shuts down.
async fn stopping(shutdown: &mut watch::Receiver<bool>) {
    if shutdown.wait_for(|stopping| *stopping).await.is_err() {
        // No one can shut the daemon down any more.
        std::future::pending::<()>().await;
    }
}

/// One chunk's lines, parsed, before their append.
struct Parsed {
    lines: Vec<LineResult>,
    good: Vec<PreparedClick>,
}

/// Parses and validates the whole lines of `chunk`. `first_line_skipped`: the chunk
/// starts with the tail of a line refused before its end, answered as such.
fn parse_chunk(ingestor: &Ingestor, chunk: Vec<u8>, max_line: usize, first_line_skipped: Option<Skipped>) -> Parsed {
    let mut lines = Vec::new();
    let mut good: Vec<PreparedClick> = Vec::new();
    let received = click::received_now();
    let mut skipping = first_line_skipped;
    for line in chunk.split(|b| *b == b'\n') {
        let refused = match skipping.take() {
            None if line.len() <= max_line => None,
            Some(Skipped::OverBudget) => Some(LineResult::Unavailable(
                "the socket listener holds as many long lines as it may at once; send the line again",
            )),
            Some(Skipped::TooSlow) => Some(LineResult::Rejected(format!(
                "a line over {} KiB must end within {} s",
                READ_CHUNK >> 10,
                FINISH_WITHIN.as_secs()
            ))),
            _ => Some(LineResult::Rejected(format!(
                "line longer than ingest.http.max_body ({max_line} bytes)"
            ))),
        };
        if let Some(refused) = refused {
            lines.push(refused);
        } else if !click::is_blank(line) {
            let result = click::prepare_raw(line, 0, &ingestor.enricher, &received).map_err(|e| e.message);
            lines.push(match result {
                Ok(c) => {
                    good.push(c);
                    LineResult::Click
                }
                Err(m) => LineResult::Rejected(m),
            });
        }
    }
    Parsed { lines, good }
}

/// Takes parsed chunks in the order they were read and appends them in that order, so
/// seqs and replies follow the connection's order whichever parse finished first.
async fn submit_in_order(mut parsed: mpsc::Receiver<ReadLines>, tx: mpsc::Sender<Group>, ingestor: Arc<Ingestor>) {
    while let Some(read) = parsed.recv().await {
        let Parsed { lines, good } = match read.parse.await {
            Ok(p) => p,
            Err(e) => {
                // A parse task cannot panic on input (every error is a rejected line);
                // should one fail anyway, the connection ends rather than misanswer.
                tracing::error!(error = %e, "a socket parse task failed; closing the connection");
                return;
            }
        };
        if lines.is_empty() {
            continue;
        }
        let clicks = read.clicks;
        let appended = if good.is_empty() {
            None
        } else {
            let submitted = ingestor.submit(good, Source::Unix).await;
            Some(tokio::spawn(async move {
                let durable = submitted?.wait().await;
                drop(clicks);
                durable
            }))
        };
        drop(read.long_line);
        let group = Group {
            _place: read.place,
            lines,
            appended,
        };
        if tx.send(group).await.is_err() {
            return;
        }
    }
}

async fn write_replies(write: tokio::net::unix::OwnedWriteHalf, mut rx: mpsc::Receiver<Group>) {
    let mut out = BufWriter::new(write);
    while let Some(group) = rx.recv().await {
        let ids = match group.appended {
            None => Ok(Vec::new()),
            Some(task) => task.await.unwrap_or(Err(IngestError::AppendTaskFailed)),
        };
        // Lines the log could not take are counted under why, as over HTTP.
        let mut ids = match ids {
            Ok(ids) => Ok(ids.into_iter()),
            Err(e) => Err((e.metric_reason(), e.to_string())),
        };
        let mut rejected = 0;
        let mut unavailable = 0;
        let mut held_back = 0;
        let mut text = String::new();
        for line in group.lines {
            match (line, &mut ids) {
                (LineResult::Rejected(reason), _) => {
                    rejected += 1;
                    text.push_str("err ");
                    text.push_str(&reason.replace('\n', " "));
                }
                (LineResult::Unavailable(reason), _) => {
                    held_back += 1;
                    text.push_str(UNAVAILABLE_REPLY);
                    text.push_str(reason);
                }
                (LineResult::Click, Ok(ids)) => {
                    text.push_str("ok ");
                    text.push_str(&ids.next().unwrap_or_default());
                }
                (LineResult::Click, Err((_, e))) => {
                    unavailable += 1;
                    text.push_str(UNAVAILABLE_REPLY);
                    text.push_str(e);
                }
            }
            text.push('\n');
        }
        if rejected > 0 {
            metrics::ingest_rejected(Source::Unix, "invalid", rejected);
        }
        if held_back > 0 {
            metrics::ingest_rejected(Source::Unix, "unavailable", held_back);
        }
        if let (true, Err((reason, _))) = (unavailable > 0, &ids) {
            metrics::ingest_rejected(Source::Unix, reason, unavailable);
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ingest::{ingestor_in, padded_click};
    use crate::log::ClickLog;
    use crate::test_util::eventually;

    /// Lines of at most `max_line` bytes, with `budget` bytes for long ones.
    fn limits(max_line: usize, budget: usize) -> LineLimits {
        LineLimits {
            max_line,
            long_lines: ByteBudget::of(budget),
            clicks: ByteBudget::of(CLICKS_BUDGET),
        }
    }
    use std::time::Duration;

    /// An ingestor on a real log in `dir`, routing to no endpoint.
    /// A connection whose client writes far more clicks than the socket buffers replies for,
    /// and reads none: the daemon's reply writer blocks. Returns the connection's task and
    /// the sender that shuts it down.
    fn stuck_connection(ingestor: &Arc<Ingestor>, limits: &LineLimits) -> (JoinHandle<()>, watch::Sender<bool>) {
        let (client, stop, task) = connected(ingestor, limits, None);
        let (read, mut write) = client.into_split();
        let mut line = padded_click(201);
        line.push(b'\n');
        let clicks: Vec<u8> = line.iter().copied().cycle().take(line.len() * 30_000).collect();
        tokio::spawn(async move {
            let _ = write.write_all(&clicks).await;
            // Kept open and unread: the connection stays, stuck on its replies.
            tokio::time::sleep(Duration::from_secs(60)).await;
            drop(read);
        });
        (task, stop)
    }

    /// Waits until the log's event count stops growing and no append waits for the disk.
    async fn settled(log: &crate::log::SledLog, ingestor: &Ingestor) -> u64 {
        let mut stored = 0;
        for _ in 0..200 {
            tokio::time::sleep(Duration::from_millis(50)).await;
            let now = log.event_count();
            if now > 0 && now == stored && ingestor.appends_in_flight() == 0 {
                break;
            }
            stored = now;
        }
        stored
    }

    /// A client that writes clicks and never reads its replies holds its connection up, and
    /// nothing else: once its appends are durable they no longer count against the appends
    /// all connections may have waiting for the disk, nor against the clicks' budget, so
    /// other clients' clicks go on.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_client_that_reads_no_replies_holds_no_place_among_the_appends() {
        let dir = tempfile::tempdir().unwrap();
        let (log, ingestor, _running) = ingestor_in(dir.path());
        let limits = limits(1 << 20, 1 << 20);
        let (_connection, _stop) = stuck_connection(&ingestor, &limits);
        let stored = settled(&log, &ingestor).await;
        assert!(stored > 0, "the connection stored nothing");
        assert!(
            stored < 30_000,
            "the connection was not held up by its replies ({stored} stored)"
        );
        assert_eq!(
            ingestor.appends_in_flight(),
            0,
            "durable appends of a stuck connection still count as waiting for the disk"
        );
        // The budget goes back just after the append's place among those waiting.
        let given_back = || limits.clicks.available() == CLICKS_BUDGET;
        assert!(
            eventually(Duration::from_secs(2), given_back).await,
            "reads of a stuck connection hold the clicks' budget"
        );
        let (mut replies, mut write, _other) = open_with(&ingestor, &limits);
        write.write_all(b"{\"link\":{\"id\":\"l\"}}\n").await.unwrap();
        let reply = replies.next_line().await.unwrap().unwrap();
        assert!(reply.starts_with("ok "), "{reply}");
    }

    /// Whole lines read take from a budget the listener's connections share until their
    /// clicks are durable; while it is taken, a connection is not read on.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn short_lines_wait_for_the_listeners_clicks_budget() {
        let dir = tempfile::tempdir().unwrap();
        let (log, ingestor, _running) = ingestor_in(dir.path());
        let limits = limits(1 << 20, 1 << 20);
        let mut taken = None;
        assert!(limits.clicks.take(&mut taken, CLICKS_BUDGET));
        let (mut replies, mut write, _stop) = open_with(&ingestor, &limits);
        write.write_all(b"{\"link\":{\"id\":\"l\"}}\n").await.unwrap();
        let early = tokio::time::timeout(Duration::from_millis(300), replies.next_line()).await;
        assert!(early.is_err(), "answered while the budget was taken: {early:?}");
        assert_eq!(log.event_count(), 0);
        drop(taken);
        answered_and_given_back(&mut replies, &limits).await;
    }

    /// The next reply is an `ok`, and then the clicks' budget is whole again.
    async fn answered_and_given_back(
        replies: &mut tokio::io::Lines<tokio::io::BufReader<tokio::net::unix::OwnedReadHalf>>,
        limits: &LineLimits,
    ) {
        let reply = replies.next_line().await.unwrap().unwrap();
        assert!(reply.starts_with("ok "), "{reply}");
        let given_back = || limits.clicks.available() == CLICKS_BUDGET;
        assert!(
            eventually(Duration::from_secs(2), given_back).await,
            "the durable click holds the budget"
        );
    }

    /// A read's clicks hold the listener's budget until they are durable, not only until
    /// they are handed to the log: an append waiting for the disk is memory all the same.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_reads_clicks_hold_the_budget_until_they_are_durable() {
        let dir = tempfile::tempdir().unwrap();
        let (log, ingestor, _running) = ingestor_in(dir.path());
        let limits = limits(1 << 20, 1 << 20);
        let release = log.hold_writer();
        let (mut replies, mut write, _stop) = open_with(&ingestor, &limits);
        let line = b"{\"link\":{\"id\":\"l\"}}\n";
        write.write_all(line).await.unwrap();
        let submitted = || ingestor.appends_in_flight() == 1;
        assert!(
            eventually(Duration::from_secs(5), submitted).await,
            "the click was not handed to the log"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(
            limits.clicks.available(),
            CLICKS_BUDGET - clicks_cost(line.len(), 1),
            "a click handed to the log but not durable gave its budget back"
        );
        release.send(()).unwrap();
        answered_and_given_back(&mut replies, &limits).await;
    }

    /// A client that sends short lines and reads no replies: a read of many lines takes a
    /// place for each [`LINES_PER_PLACE`] of them, so the connection stops being read
    /// after two reads of 3-byte lines, not twelve.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn unread_replies_to_short_lines_stop_the_reading_after_two_reads() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let dir = tempfile::tempdir().unwrap();
        let (_log, ingestor, _running) = ingestor_in(dir.path());
        let (client, _stop, _) = connected(&ingestor, &limits(1 << 20, 1 << 20), None);
        // What the kernel holds of the client's writes, unread, besides what the daemon read.
        let sndbuf = send_buffer(&client);
        let (_unread, mut write) = client.into_split();
        let accepted = Arc::new(AtomicUsize::new(0));
        let lines: Vec<u8> = b"{}\n".iter().copied().cycle().take(3 << 20).collect();
        tokio::spawn({
            let accepted = accepted.clone();
            async move {
                for piece in lines.chunks(4096) {
                    if write.write_all(piece).await.is_err() {
                        return;
                    }
                    accepted.fetch_add(piece.len(), Ordering::SeqCst);
                }
            }
        });
        let mut taken = 0;
        for _ in 0..100 {
            tokio::time::sleep(Duration::from_millis(200)).await;
            let now = accepted.load(Ordering::SeqCst);
            if now > 0 && now == taken {
                break;
            }
            taken = now;
        }
        assert!(taken > 0, "the connection was not read");
        let bound = 6 * READ_CHUNK + sndbuf;
        assert!(
            taken < bound,
            "{taken} bytes taken from a client that reads no replies (at most {bound} expected)"
        );
    }

    /// A read costs its bytes and a click's memory a line.
    #[test]
    fn a_read_costs_its_bytes_and_its_lines() {
        let read = b"{}\n{}\n{";
        assert_eq!(clicks_cost(read.len(), lines_in(read)), 7 + 2 * CLICK_COST);
        assert_eq!(clicks_cost(0, lines_in(b"")), 0);
    }

    /// A line the daemon stops reading halfway at shutdown is left unanswered, not blamed
    /// on the client as malformed; the whole lines before it are answered.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_line_cut_by_a_shutdown_is_not_answered_as_malformed() {
        use tokio::io::AsyncBufReadExt;
        let dir = tempfile::tempdir().unwrap();
        let (_log, ingestor, _running) = ingestor_in(dir.path());
        let (client, stop, connection) = connected(&ingestor, &limits(1 << 20, 1 << 20), None);
        let (read, mut write) = client.into_split();
        write
            .write_all(b"{\"link\":{\"id\":\"l\"}}\n{\"link\":{\"id\"")
            .await
            .unwrap();
        let mut replies = tokio::io::BufReader::new(read).lines();
        let first = replies.next_line().await.unwrap().unwrap();
        assert!(first.starts_with("ok "), "{first}");
        stop.send(true).unwrap();
        connection.await.unwrap();
        assert_eq!(replies.next_line().await.unwrap(), None, "the cut line got an answer");
        drop(write);
    }

    /// Long lines being read hold a budget the listener's connections share; a line whose
    /// bytes do not fit is refused and skipped to its end, and the next one fits again.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn long_lines_past_the_listeners_budget_are_refused_until_it_frees() {
        let dir = tempfile::tempdir().unwrap();
        let (_log, ingestor, _running) = ingestor_in(dir.path());
        let limits = limits(1 << 20, 32 << 10);
        let (mut a_replies, mut a, _a_stop) = open_with(&ingestor, &limits);
        let (mut b_replies, mut b, _b_stop) = open_with(&ingestor, &limits);
        // A holds 30 KiB of the 32 KiB budget: its line is 30 KiB past one read, unfinished.
        let a_line = padded_click(READ_CHUNK + (30 << 10) + 1);
        a.write_all(&a_line[..a_line.len() - 1]).await.unwrap();
        let holding = || limits.long_lines.available() == 2 << 10;
        assert!(
            eventually(Duration::from_secs(2), holding).await,
            "{}",
            limits.long_lines.available()
        );
        // B's line runs on past two reads before its end (reads take at most one
        // READ_CHUNK), so it is held unfinished past one read: refused, and answered at
        // its end.
        let mut b_overlong = padded_click(READ_CHUNK + (10 << 10));
        b_overlong.extend(std::iter::repeat_n(b'.', 2 * READ_CHUNK));
        b_overlong.push(b'\n');
        b.write_all(&b_overlong).await.unwrap();
        let refused = b_replies.next_line().await.unwrap().unwrap();
        assert!(
            refused.starts_with("err ") && refused.contains("long lines"),
            "{refused}"
        );
        // A finishes and is stored; its budget goes back, and B's line now fits.
        a.write_all(&a_line[a_line.len() - 1..]).await.unwrap();
        a.write_all(b"\n").await.unwrap();
        let stored = a_replies.next_line().await.unwrap().unwrap();
        assert!(stored.starts_with("ok "), "{stored}");
        let b_line = padded_click(READ_CHUNK + (10 << 10));
        b.write_all(&b_line).await.unwrap();
        b.write_all(b"\n").await.unwrap();
        let stored = b_replies.next_line().await.unwrap().unwrap();
        assert!(stored.starts_with("ok "), "{stored}");
        assert_eq!(
            limits.long_lines.available(),
            32 << 10,
            "every long line gave its budget back"
        );
    }

    /// A long line ended in the same read as thousands of short lines goes on its own,
    /// in the place its read took: the short lines wait for places of their own, and the
    /// long line's budget goes back even while a client that reads no replies keeps them
    /// waiting.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_long_line_does_not_wait_with_the_short_lines_read_after_it() {
        let dir = tempfile::tempdir().unwrap();
        let (log, ingestor, _running) = ingestor_in(dir.path());
        let limits = limits(1 << 20, 1 << 20);
        // The input lies whole in the kernel before the daemon reads it, so reads come
        // READ_CHUNK at a time; few replies fit, so the first read's stay unwritten.
        let (client, _stop, _) = connected(&ingestor, &limits, Some(4 << 10));
        set_send_buffer(&client, 256 << 10);
        let (_unread, mut write) = client.into_split();
        // 11 places for a read of `{}` lines whose replies are never read; then a long
        // line in the 12th, with 3,000 short lines after it in the read that ends it.
        let mut input: Vec<u8> = b"{}\n".iter().copied().cycle().take(READ_CHUNK - 1).collect();
        input.extend(padded_click(READ_CHUNK + (36 << 10)));
        input.push(b'\n');
        input.extend(b"{}\n".iter().copied().cycle().take(3 * 3000));
        tokio::spawn(async move {
            let _ = write.write_all(&input).await;
            tokio::time::sleep(Duration::from_secs(60)).await;
        });
        let stored = || log.event_count() == 1;
        assert!(
            eventually(Duration::from_secs(5), stored).await,
            "the long line's click was not stored"
        );
        let given_back = || limits.long_lines.available() == 1 << 20;
        assert!(
            eventually(Duration::from_secs(5), given_back).await,
            "the long line holds {} bytes of its budget",
            (1 << 20) - limits.long_lines.available()
        );
    }

    /// The socket's send buffer, as the kernel counts it.
    fn send_buffer(stream: &UnixStream) -> usize {
        use std::os::fd::AsRawFd;
        let mut bytes: libc::c_int = 0;
        let mut size = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: getsockopt writes at most `size` bytes into `bytes`, whose size it is.
        let got = unsafe {
            libc::getsockopt(
                stream.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_SNDBUF,
                (&mut bytes as *mut libc::c_int).cast(),
                &mut size,
            )
        };
        assert_eq!(got, 0, "{}", std::io::Error::last_os_error());
        usize::try_from(bytes).unwrap()
    }

    /// Sets the socket's send buffer (the kernel doubles it, within `wmem_max`).
    fn set_send_buffer(stream: &UnixStream, bytes: libc::c_int) {
        use std::os::fd::AsRawFd;
        // SAFETY: setsockopt reads `size_of::<c_int>()` bytes from `bytes`, an int.
        let set = unsafe {
            libc::setsockopt(
                stream.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_SNDBUF,
                (&bytes as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        assert_eq!(set, 0, "{}", std::io::Error::last_os_error());
    }

    /// The client's end of a connection served under `limits`, the sender that shuts the
    /// connection down and its task. `server_send_buffer`: set on the daemon's end first.
    fn connected(
        ingestor: &Arc<Ingestor>,
        limits: &LineLimits,
        server_send_buffer: Option<libc::c_int>,
    ) -> (UnixStream, watch::Sender<bool>, JoinHandle<()>) {
        let (client, server) = UnixStream::pair().unwrap();
        if let Some(bytes) = server_send_buffer {
            set_send_buffer(&server, bytes);
        }
        let (stop, shutdown) = watch::channel(false);
        let task = tokio::spawn(connection(server, ingestor.clone(), limits.clone(), shutdown));
        (client, stop, task)
    }

    /// A connection to `ingestor` under `limits`: its replies, its writer, and the sender
    /// that shuts it down.
    fn open_with(
        ingestor: &Arc<Ingestor>,
        limits: &LineLimits,
    ) -> (
        tokio::io::Lines<tokio::io::BufReader<tokio::net::unix::OwnedReadHalf>>,
        tokio::net::unix::OwnedWriteHalf,
        watch::Sender<bool>,
    ) {
        use tokio::io::AsyncBufReadExt;
        let (client, stop, _) = connected(ingestor, limits, None);
        let (read, write) = client.into_split();
        (tokio::io::BufReader::new(read).lines(), write, stop)
    }

    /// A line refused for the budget that runs on past `max_line` is told it is too long,
    /// not to send it again.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_line_refused_for_the_budget_is_told_when_it_is_too_long() {
        let mut overlong = vec![b'.'; 300 << 10];
        overlong.push(b'\n');
        let reply = reply_while_the_budget_is_held(256 << 10, &[&overlong]).await;
        assert!(reply.starts_with("err line longer than"), "{reply}");
    }

    /// The same when the line's last read is what takes it past `max_line`: its bytes
    /// until then fit, and the read that ends it counts too.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_line_refused_for_the_budget_that_its_last_read_makes_too_long_is_told_so() {
        let max_line = 256 << 10;
        // Exactly `max_line` bytes, all read before the line ends: not yet too long.
        let reply = reply_while_the_budget_is_held(max_line, &[&vec![b'.'; max_line], b"..\n"]).await;
        assert!(reply.starts_with("err line longer than"), "{reply}");
    }

    /// The reply to a line sent in `parts`, each read by the daemon before the next goes,
    /// while another connection holds all but 2 KiB of the listener's 32 KiB budget for
    /// long lines (its line 30 KiB past one read, unfinished).
    async fn reply_while_the_budget_is_held(max_line: usize, parts: &[&[u8]]) -> String {
        let dir = tempfile::tempdir().unwrap();
        let (_log, ingestor, _running) = ingestor_in(dir.path());
        let limits = limits(max_line, 32 << 10);
        let (_a_replies, mut a, _a_stop) = open_with(&ingestor, &limits);
        let (mut b_replies, mut b, _b_stop) = open_with(&ingestor, &limits);
        a.write_all(&padded_click(READ_CHUNK + (30 << 10) + 1)[..READ_CHUNK + (30 << 10)])
            .await
            .unwrap();
        let holding = || limits.long_lines.available() == 2 << 10;
        assert!(eventually(Duration::from_secs(2), holding).await);
        for part in parts {
            b.write_all(part).await.unwrap();
            let read_by_the_daemon = || unread_by_peer(b.as_ref()) == 0;
            assert!(eventually(Duration::from_secs(5), read_by_the_daemon).await);
        }
        b_replies.next_line().await.unwrap().unwrap()
    }

    /// Bytes written to `stream` that its peer has not read yet.
    fn unread_by_peer(stream: &UnixStream) -> usize {
        use std::os::fd::AsRawFd;
        let mut bytes: libc::c_int = 0;
        // SAFETY: TIOCOUTQ (SIOCOUTQ) writes one int, into `bytes`.
        let got = unsafe { libc::ioctl(stream.as_raw_fd(), libc::TIOCOUTQ, &mut bytes) };
        assert_eq!(got, 0, "{}", std::io::Error::last_os_error());
        usize::try_from(bytes).unwrap()
    }

    /// A long line that stops coming gives its budget back after a while, and is told why.
    #[tokio::test(start_paused = true)]
    async fn a_long_line_that_stalls_gives_its_budget_back() {
        let dir = tempfile::tempdir().unwrap();
        let (_log, ingestor, _running) = ingestor_in(dir.path());
        let limits = limits(1 << 20, 64 << 10);
        let (mut replies, mut write, _stop) = open_with(&ingestor, &limits);
        let line = padded_click(READ_CHUNK + (40 << 10));
        write.write_all(&line[..READ_CHUNK + (20 << 10)]).await.unwrap();
        while limits.long_lines.available() == 64 << 10 {
            tokio::task::yield_now().await;
        }
        tokio::time::sleep(FINISH_WITHIN + Duration::from_secs(1)).await;
        assert_eq!(
            limits.long_lines.available(),
            64 << 10,
            "the stalled line holds nothing"
        );
        write.write_all(&line[READ_CHUNK + (20 << 10)..]).await.unwrap();
        write.write_all(b"\n").await.unwrap();
        let reply = replies.next_line().await.unwrap().unwrap();
        assert!(
            reply.starts_with("err a line over 64 KiB must end within 30 s"),
            "{reply}"
        );
    }

    /// At shutdown such a client's replies get a few seconds, then its connection closes,
    /// rather than holding the daemon up for ever.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_shutdown_does_not_wait_for_a_client_that_reads_no_replies() {
        let dir = tempfile::tempdir().unwrap();
        let (log, ingestor, _running) = ingestor_in(dir.path());
        let (connection, stop) = stuck_connection(&ingestor, &limits(1 << 20, 1 << 20));
        assert!(settled(&log, &ingestor).await > 0);
        stop.send(true).unwrap();
        let ended = tokio::time::timeout(SHUTDOWN_REPLIES_WAIT + Duration::from_secs(10), connection).await;
        assert!(ended.is_ok(), "the connection held the shutdown up");
    }
}
