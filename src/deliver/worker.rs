//! One endpoint's delivery loop. It pages the endpoint's queue in from the log (so a
//! backlog lives on disk, not in memory), keeps at most `max_concurrency` attempts in
//! flight, honours the rate limit and circuit breaker, retries on the schedule, and
//! writes every outcome back to the log. It must not block on anything but its own
//! endpoint: whatever this endpoint or its receiver does, other endpoints' workers never
//! wait for it. The one wait it shares with its thread's other workers is the log's
//! reads, synchronous and served from memory or the page cache (see `ClickLog`).

use super::format::{self, FormatError, RenderContext};
use super::policy::{Breaker, CircuitState, TokenBucket};
use super::send::{AttemptResult, EndpointClient, OriginSlot, Outcome};
use super::slots::ReceiverSlots;
use super::{DeliveryPolicy, WorkerEvent};
use crate::endpoints::{failing_for_setting, take_flag, AttemptRecord, EndpointSettings, LiveEndpoint};
use crate::log::{now_ms, ClickLog, DeadLetter, Pending, Seq, Ticket};
use crate::said_seldom::RateLimited;
use bytes::Bytes;
use futures_util::FutureExt;
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet, VecDeque};
use std::panic::AssertUnwindSafe;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;

/// How many queue entries one page-in reads.
const PAGE: usize = 512;
/// Retries waiting in memory at most; past this the worker stops paging in new events
/// (they wait on disk) until retries drain.
const MAX_WAITING: usize = 100_000;
/// Pages one turn reads at most while they make nothing ready (all in flight, or retries
/// not yet due); the next turn goes on at once, so other tasks get the thread between.
const PAGES_PER_TURN: usize = 8;

#[derive(Clone)]
pub(crate) struct WorkerContext {
    pub log: Arc<dyn ClickLog>,
    pub policy: DeliveryPolicy,
    pub shutdown: watch::Receiver<bool>,
    pub events: mpsc::UnboundedSender<WorkerEvent>,
}

/// Events sent together in one request; `batch` is their batch id (0: a single event).
#[derive(Debug)]
struct Job {
    items: Vec<Pending>,
    batch: u64,
}

impl Job {
    /// Failed attempts so far: a batch's are its events' most.
    fn attempts(&self) -> u32 {
        self.items.iter().map(|p| p.attempts).max().unwrap_or(0)
    }
}

/// What a finished attempt hands back to the loop.
struct Finished {
    job: Job,
    /// The settings the attempt went out with: the endpoint may have moved since.
    sent_with: Arc<EndpointSettings>,
    /// Whether it was a half-open circuit's probe.
    probe: bool,
    result: AttemptResult,
    event_ids: Vec<String>,
    accepted_ms: Vec<u64>,
}

struct Worker {
    ep: Arc<LiveEndpoint>,
    ctx: WorkerContext,
    /// Shared with the thread's other endpoints; one reference count per attempt.
    client: Arc<EndpointClient>,
    cursor: Option<Seq>,
    caught_up: bool,
    ready: VecDeque<Job>,
    ready_since: Option<Instant>,
    waiting: BinaryHeap<Reverse<(u64, u64)>>,
    waiting_jobs: HashMap<u64, Job>,
    next_job_no: u64,
    owned: HashSet<Seq>,
    /// Batch ids paged in since the queue was last read to its end: a batch cut by a
    /// page's end must not go out twice under one `webhook-id` with two bodies.
    batches_paged: HashSet<u64>,
    inflight: JoinSet<Finished>,
    breaker: Breaker,
    limiter: Option<(u32, TokenBucket)>,
    /// Settings that answered 410; launching resumes when the settings change.
    gone_at: Option<Arc<EndpointSettings>>,
    /// Failure logging is rate-limited so a dead endpoint cannot flood the journal.
    failure_log: RateLimited,
    /// After a failed read of the queue: when it is read again. Nothing else may wake the
    /// worker (a backlog with no new clicks), so the loop sleeps until then at most.
    read_again_at: Option<Instant>,
    /// The pause after the last failed read, doubled by each failure in a row (zero: the
    /// last read went through).
    read_backoff: Duration,
    /// "Cannot read the queue", said at most every [`FAILURE_LOG_EVERY_MS`]: a failing
    /// disk fails every read.
    read_failure_log: RateLimited,
    /// "Cannot read an event", the same: a damaged segment fails thousands of events.
    event_failure_log: RateLimited,
    /// Failed attempts since the last success (`failing` times the run).
    consecutive_failures: u32,
    failing: FailingStreak,
    reported_failing: bool,
    reported_too_long: bool,
    /// Delivered entries not yet handed to the log.
    completed: Vec<Seq>,
    /// In-flight attempts allowed now (up to `max_concurrency`): it starts at 1 and grows
    /// while the endpoint keeps up, so a burst over thousands of endpoints opens a few
    /// connections each rather than `max_concurrency` each, and halves on failures.
    concurrency: usize,
    /// The request slots of the endpoint's receiver on the thread's shared client.
    origin: Option<Origin>,
    /// A slot taken and not yet used, and the wait for one when none was free. An
    /// attempt is built only once it has its slot: attempts that waited inside the
    /// client held their rendered request, so a backlog spread over many endpoints on one
    /// receiver lived in memory as waiting requests (3 KB a click) instead of on disk.
    slot: Option<OriginSlot>,
    slot_wait: Option<SlotWait>,
}

/// The request slots of an endpoint's receiver, and the settings whose URL they were
/// looked up for: the same settings say the same receiver without comparing URLs, which
/// for an endpoint with a click now and then are memory not read since its last one.
struct Origin {
    settings: Arc<EndpointSettings>,
    /// `None`: the client bounds nothing there.
    slots: Option<Arc<ReceiverSlots>>,
}

/// A wait for a receiver's slot; kept across the loop's turns so it keeps its place.
type SlotWait = std::pin::Pin<Box<dyn std::future::Future<Output = Option<OriginSlot>> + Send>>;

/// The next job from the front of `ready`, shaped for `batch_max`: a batch split into
/// single events when the endpoint no longer batches, and events sent on their own so far
/// gathered into a new batch when it does. Only events with as many failed attempts are
/// gathered: a batch's attempt counts for all its events, so a retry gathered with new
/// events would spend theirs.
fn take_job(ready: &mut VecDeque<Job>, batch_max: usize) -> Job {
    let mut job = ready.pop_front().unwrap_or(Job {
        items: Vec::new(),
        batch: 0,
    });
    if batch_max <= 1 && job.items.len() > 1 {
        // A batch from before the endpoint stopped batching: a body without the batch
        // shape carries one event, so each goes on its own now, the rest next in line.
        push_front_singly(ready, job.items.drain(1..));
        job.batch = 0;
        job.items[0].batch = 0;
    }
    if batch_max > 1 && job.items.len() > batch_max {
        // A batch from before `batch_max` was lowered: the events past it go next, as a
        // batch of their own (its own id: its body differs from the first part's).
        let id = new_batch_id();
        let rest = job
            .items
            .split_off(batch_max)
            .into_iter()
            .map(|p| Pending { batch: id, ..p });
        ready.push_front(Job {
            items: rest.collect(),
            batch: id,
        });
    }
    if batch_max > 1 && job.batch == 0 {
        let n = gatherable(ready, job.attempts(), batch_max.saturating_sub(job.items.len()));
        for next in ready.drain(..n) {
            job.items.extend(next.items);
        }
        job.batch = new_batch_id();
        for p in &mut job.items {
            p.batch = job.batch;
        }
    }
    job
}

/// Puts `items` back at the front of `ready` in their order, each as an event sent alone.
fn push_front_singly(ready: &mut VecDeque<Job>, items: impl DoubleEndedIterator<Item = Pending>) {
    for p in items.rev() {
        ready.push_front(Job {
            items: vec![Pending { batch: 0, ..p }],
            batch: 0,
        });
    }
}

/// How many jobs at the front of `ready`, at most `max`, a new batch gathers: events sent
/// alone so far (one a job) with `attempts` failed attempts.
fn gatherable(ready: &VecDeque<Job>, attempts: u32, max: usize) -> usize {
    ready
        .iter()
        .take(max)
        .take_while(|j| j.batch == 0 && j.attempts() == attempts)
        .count()
}

/// How long the endpoint has been failing without a success, for `disable_after`,
/// measured on the monotonic clock while the daemon runs. A run that has lasted a while is
/// kept in the log with the URL it fails at, and refreshed now and then, so that a daemon
/// restarted more often than `disable_after` still disables an endpoint that never
/// recovers. Time while the daemon is down does not count, nor a run at another URL. A
/// short run is not kept, so an endpoint failing now and then costs no writes.
struct FailingStreak {
    /// When the run began on this process's clock, moved back by what was carried over.
    started: Option<Instant>,
    /// What an earlier run of the daemon saw of the run, until this one's first failure.
    carried: Duration,
    /// The failing time last written to the log; `None` when the log holds nothing.
    stored: Option<Duration>,
    /// The write that cleared the log's record, until it is known to have gone through.
    clearing: Option<Ticket<()>>,
    /// How long a run lasts before it is kept, and how much longer before it is kept again.
    keep_after: Duration,
    refresh: Duration,
    url: String,
    setting: String,
}

/// What the log keeps of a run of failures.
#[derive(serde::Serialize, serde::Deserialize)]
struct StoredStreak {
    failing_ms: u64,
    url: String,
}

/// A run of failures is kept once it has lasted this long, or a quarter of
/// `disable_after` when that is shorter; it is refreshed as often, or every hundredth of
/// `disable_after` when that is longer (at most [`REFRESH_FAILING_MAX`] apart), and when
/// the worker stops.
const KEEP_FAILING_AFTER: Duration = Duration::from_secs(10);
/// The longest wait between refreshes: a crash loses at most this much of a run.
const REFRESH_FAILING_MAX: Duration = Duration::from_secs(600);

impl FailingStreak {
    fn load(log: &dyn ClickLog, endpoint: &str, url: &str, disable_after: Duration) -> Self {
        let setting = failing_for_setting(endpoint);
        let mut streak = FailingStreak {
            started: None,
            carried: Duration::ZERO,
            stored: None,
            clearing: None,
            keep_after: KEEP_FAILING_AFTER.min(disable_after / 4),
            refresh: KEEP_FAILING_AFTER
                .max(disable_after / 100)
                .min(REFRESH_FAILING_MAX)
                .min(disable_after / 4),
            url: url.to_owned(),
            setting,
        };
        match log.get_setting(&streak.setting) {
            Ok(None) => {}
            Ok(Some(v)) => {
                // A record of another URL (or unreadable) counts for nothing, and goes
                // when this run ends or is kept.
                streak.stored = Some(Duration::ZERO);
                if let Ok(kept) = serde_json::from_slice::<StoredStreak>(&v) {
                    if kept.url == url {
                        streak.carried = Duration::from_millis(kept.failing_ms);
                        streak.stored = Some(streak.carried);
                    }
                }
            }
            Err(e) => {
                tracing::warn!(endpoint, error = %e, "cannot read how long the endpoint has been failing; counting from now")
            }
        }
        streak
    }

    /// Notes a failure at `url`; returns how long the endpoint has been failing there.
    fn failed(&mut self, log: &dyn ClickLog, now: Instant, url: &str) -> Duration {
        self.check_clearing();
        if url != self.url {
            // A new URL is a new run; what the log holds is of the old one.
            self.url = url.to_owned();
            self.started = None;
            self.carried = Duration::ZERO;
            if self.stored.is_some() {
                self.stored = Some(Duration::ZERO);
            }
        }
        let carried = std::mem::take(&mut self.carried);
        let started = *self
            .started
            .get_or_insert_with(|| now.checked_sub(carried).unwrap_or(now));
        let failing_for = now.duration_since(started);
        let due = match self.stored {
            None => failing_for >= self.keep_after,
            Some(kept) => failing_for >= kept + self.refresh,
        };
        if due {
            self.keep(log, failing_for);
        }
        failing_for
    }

    fn keep(&mut self, log: &dyn ClickLog, failing_for: Duration) {
        let record = StoredStreak {
            failing_ms: failing_for.as_millis() as u64,
            url: self.url.clone(),
        };
        if let Ok(value) = serde_json::to_vec(&record) {
            // Not awaited: lost in a crash, the run counts from its last record.
            drop(log.put_setting(&self.setting, Some(value)));
            self.stored = Some(failing_for);
        }
    }

    /// The worker stops (a shutdown, a reload): a kept run is brought up to date, so that
    /// restarts closer together than the refresh do not each lose what they saw.
    fn stopping(&mut self, log: &dyn ClickLog) {
        if let (Some(started), Some(kept)) = (self.started, self.stored) {
            let failing_for = started.elapsed();
            if failing_for > kept {
                self.keep(log, failing_for);
            }
        }
    }

    /// The run ended: a success, or the endpoint was enabled again.
    fn ended(&mut self, log: &dyn ClickLog) {
        self.check_clearing();
        self.started = None;
        self.carried = Duration::ZERO;
        if self.stored.take().is_some() {
            self.clearing = Some(log.put_setting(&self.setting, None));
        }
    }

    /// A clearing write that failed is tried again when the next run ends: a record left
    /// behind would count an old run toward the next one after a restart.
    fn check_clearing(&mut self) {
        let Some(ticket) = &mut self.clearing else { return };
        match ticket.try_recv() {
            Err(tokio::sync::oneshot::error::TryRecvError::Empty) => {}
            Ok(Ok(())) => self.clearing = None,
            Ok(Err(_)) | Err(tokio::sync::oneshot::error::TryRecvError::Closed) => {
                self.clearing = None;
                self.stored.get_or_insert(Duration::ZERO);
            }
        }
    }
}

/// A batch id: random, never 0 (which marks an event sent on its own).
fn new_batch_id() -> u64 {
    loop {
        let id = rand::random::<u64>();
        if id != 0 {
            return id;
        }
    }
}

/// At most one failure line per endpoint per this interval; the rest are counted.
const FAILURE_LOG_EVERY_MS: u64 = 10_000;

/// The first pause before a failed read of the queue is tried again; it doubles with each
/// failure in a row, up to [`READ_AGAIN_AFTER_MAX`]: a passing fault costs little delay,
/// and a lasting one a read every few seconds.
const READ_AGAIN_AFTER: Duration = Duration::from_millis(100);
const READ_AGAIN_AFTER_MAX: Duration = Duration::from_secs(5);

/// The first pause before a worker that panicked starts again; it doubles with each
/// panic in a row, up to [`RESTART_AFTER_MAX`].
const RESTART_AFTER: Duration = Duration::from_secs(1);
const RESTART_AFTER_MAX: Duration = Duration::from_secs(60);

/// Runs the endpoint's worker until the endpoint stops or the daemon shuts down.
pub(crate) async fn run(ep: Arc<LiveEndpoint>, ctx: WorkerContext) {
    let stopped = || stopping(&ep, &ctx.shutdown);
    restarting_after_panics(&ep.id, || run_once(ep.clone(), ctx.clone()), stopped).await;
}

/// Whether the endpoint's worker is to finish what is in flight and stop.
fn stopping(ep: &LiveEndpoint, shutdown: &watch::Receiver<bool>) -> bool {
    ep.stopping.load(Ordering::SeqCst) || *shutdown.borrow()
}

/// Runs `worker` again whenever it panics, after a pause that doubles with each panic
/// in a row. A panicked worker's entries are still pending in the log, so the next run
/// reads them again: its attempts in flight and its unwritten progress are sent again,
/// which at-least-once delivery allows, where a worker left dead would have stopped
/// the endpoint until a restart of the daemon.
async fn restarting_after_panics<F: std::future::Future<Output = ()>>(
    endpoint: &str,
    mut worker: impl FnMut() -> F,
    stopped: impl Fn() -> bool,
) {
    let mut pause = RESTART_AFTER;
    loop {
        let panic = match AssertUnwindSafe(worker()).catch_unwind().await {
            Ok(()) => return,
            Err(panic) => panic,
        };
        if stopped() {
            return;
        }
        tracing::error!(
            endpoint,
            panic = panic_message(panic.as_ref()),
            restart_in_ms = pause.as_millis() as u64,
            "the endpoint's worker panicked; it starts again from its queue in the log"
        );
        let until = tokio::time::Instant::now() + pause;
        // Checked every tick, so that a shutdown or a stop need not wait out the pause.
        while !stopped() && tokio::time::Instant::now() < until {
            tokio::time::sleep(RESTART_TICK.min(until - tokio::time::Instant::now())).await;
        }
        if stopped() {
            return;
        }
        pause = (pause * 2).min(RESTART_AFTER_MAX);
    }
}

const RESTART_TICK: Duration = Duration::from_millis(100);

async fn run_once(ep: Arc<LiveEndpoint>, ctx: WorkerContext) {
    let settings = ep.settings();
    let client = EndpointClient::for_this_thread(
        &ctx.policy.addresses,
        &ctx.policy.connections,
        settings.timeout,
        ctx.policy.per_receiver,
    );
    let breaker = Breaker::new(ctx.policy.breaker_failures, ctx.policy.breaker_cooldown);
    let failing = FailingStreak::load(ctx.log.as_ref(), &ep.id, &settings.config.url, ctx.policy.disable_after);
    let mut worker = Worker {
        ep,
        ctx,
        client,
        cursor: None,
        caught_up: false,
        ready: VecDeque::new(),
        ready_since: None,
        waiting: BinaryHeap::new(),
        waiting_jobs: HashMap::new(),
        next_job_no: 0,
        owned: HashSet::new(),
        batches_paged: HashSet::new(),
        inflight: JoinSet::new(),
        breaker,
        limiter: None,
        gone_at: None,
        failure_log: RateLimited::new(FAILURE_LOG_EVERY_MS),
        read_again_at: None,
        read_backoff: Duration::ZERO,
        read_failure_log: RateLimited::new(FAILURE_LOG_EVERY_MS),
        event_failure_log: RateLimited::new(FAILURE_LOG_EVERY_MS),
        consecutive_failures: 0,
        failing,
        reported_failing: false,
        reported_too_long: false,
        completed: Vec::new(),
        concurrency: 1,
        origin: None,
        slot: None,
        slot_wait: None,
    };
    worker.run().await;
}

impl Worker {
    async fn run(&mut self) {
        loop {
            let settings = self.ep.settings();
            if take_flag(&self.ep.enabled_again) {
                self.failing.ended(self.ctx.log.as_ref());
                self.reported_too_long = false;
            }
            let draining = stopping(&self.ep, &self.ctx.shutdown);
            if draining && self.inflight.is_empty() {
                self.flush_completed();
                self.failing.stopping(self.ctx.log.as_ref());
                return;
            }
            if draining {
                // Nothing more is launched: a slot held or awaited would only hold up
                // the receiver's other endpoints.
                self.slot = None;
                self.slot_wait = None;
            }
            if take_flag(&self.ep.rewind) {
                self.cursor = None;
                self.caught_up = false;
                self.batches_paged.clear();
            }
            let read_on = !draining && self.page_in();
            if !draining {
                self.promote_due();
            }
            let try_again_at = if draining { None } else { self.launch(&settings) };
            #[cfg(test)]
            tests::count_turn(&self.ep.id);
            // Only times at which a turn can do something: a retry that is due while the
            // circuit is open, or a token while something else holds the launch back,
            // would wake the loop at once, again and again.
            let now = Instant::now();
            let retry_due = (!draining && self.breaker.state(now) != CircuitState::Open)
                .then(|| self.waiting.peek().map(|Reverse((due, _))| instant_of(*due)))
                .flatten();
            let wake_at = [
                retry_due,
                self.breaker.reopens_at(now),
                try_again_at,
                read_on.then_some(now),
                self.read_again_at.filter(|_| !draining),
            ]
            .into_iter()
            .flatten()
            .min();
            let mut shutdown = self.ctx.shutdown.clone();
            tokio::select! {
                Some(done) = self.inflight.join_next(), if !self.inflight.is_empty() => {
                    self.finished(done, &settings);
                    // Take every other attempt that is done too, so their completions reach
                    // the log in one write instead of one wake-up of its writer each.
                    while let Some(done) = self.inflight.try_join_next() {
                        self.finished(done, &settings);
                    }
                    self.flush_completed();
                }
                slot = async { self.slot_wait.as_mut()?.await }, if self.slot_wait.is_some() => {
                    self.slot_wait = None;
                    self.slot = slot;
                }
                _ = self.ep.wake.notified() => self.caught_up = false,
                _ = sleep_until(wake_at), if wake_at.is_some() => {}
                _ = shutdown.changed(), if !draining => {}
            }
        }
    }

    /// Reads pages of the queue while little is ready. Returns whether the queue should be
    /// read on at once: its pages so far made nothing ready, and a page past them may
    /// (after a restart the head can be retries due in hours, with new clicks behind).
    fn page_in(&mut self) -> bool {
        if self.read_again_at.is_some_and(|at| Instant::now() >= at) {
            self.read_again_at = None;
        }
        for _ in 0..PAGES_PER_TURN {
            if !self.may_read() || !self.read_page() || !self.ready.is_empty() {
                return false;
            }
        }
        self.may_read()
    }

    /// Whether the queue has more to read, room for what it reads, and no failed read to
    /// wait out.
    fn may_read(&self) -> bool {
        !self.caught_up
            && self.ready.len() < PAGE
            && self.waiting_jobs.len() < MAX_WAITING
            && self.read_again_at.is_none()
    }

    /// Reads the next page of the queue; false if the log could not be read, and then
    /// it is read again after a pause.
    fn read_page(&mut self) -> bool {
        let page = match self.ctx.log.pending_after(self.ep.key, self.cursor, PAGE) {
            Ok(p) => p,
            Err(e) => {
                self.read_backoff = if self.read_backoff.is_zero() {
                    READ_AGAIN_AFTER
                } else {
                    (self.read_backoff * 2).min(READ_AGAIN_AFTER_MAX)
                };
                self.read_again_at = Some(Instant::now() + self.read_backoff);
                if let Some(times) = self.read_failure_log.due(now_ms()) {
                    tracing::error!(
                        endpoint = %self.ep.id,
                        error = %e,
                        failures = times,
                        retry_in_ms = self.read_backoff.as_millis() as u64,
                        "cannot read the queue; it is read again after a pause"
                    );
                }
                return false;
            }
        };
        self.read_backoff = Duration::ZERO;
        self.caught_up = page.len() < PAGE;
        if let Some(last) = page.last() {
            self.cursor = Some(last.seq);
        }
        let now = now_ms();
        // Entries sent together before (a batch) are retried together, under their id.
        let mut batches: HashMap<u64, Vec<Pending>> = HashMap::new();
        for p in page {
            if !self.owned.insert(p.seq) {
                continue;
            }
            if p.batch != 0 {
                batches.entry(p.batch).or_default().push(p);
            } else if p.due_ms > now {
                self.wait(
                    Job {
                        items: vec![p],
                        batch: 0,
                    },
                    p.due_ms,
                );
            } else {
                self.push_ready(Job {
                    items: vec![p],
                    batch: 0,
                });
            }
        }
        for (batch, mut items) in batches {
            let batch = if self.batches_paged.insert(batch) {
                batch
            } else {
                // The rest of a batch an earlier page began: a receiver that deduplicates
                // on `webhook-id` would take it for the part already sent, so it gets its own.
                let fresh = new_batch_id();
                for p in &mut items {
                    p.batch = fresh;
                }
                fresh
            };
            let due = items.iter().map(|p| p.due_ms).max().unwrap_or(0);
            let job = Job { items, batch };
            if due > now {
                self.wait(job, due);
            } else {
                self.push_ready(job);
            }
        }
        if self.caught_up {
            // Read to its end: no batch continues past here.
            self.batches_paged.clear();
        }
        true
    }

    fn push_ready(&mut self, job: Job) {
        if self.ready.is_empty() {
            self.ready_since = Some(Instant::now());
        }
        self.ready.push_back(job);
    }

    fn wait(&mut self, job: Job, due_ms: u64) {
        self.next_job_no += 1;
        self.waiting.push(Reverse((due_ms, self.next_job_no)));
        self.waiting_jobs.insert(self.next_job_no, job);
    }

    fn promote_due(&mut self) {
        let now = now_ms();
        // An open circuit keeps retries waiting without spending their attempts.
        if self.breaker.state(Instant::now()) == CircuitState::Open {
            return;
        }
        while let Some(Reverse((due, no))) = self.waiting.peek().copied() {
            if due > now {
                break;
            }
            self.waiting.pop();
            if let Some(job) = self.waiting_jobs.remove(&no) {
                if self.ready.is_empty() {
                    self.ready_since = Some(Instant::now());
                }
                self.ready.push_front(job);
            }
        }
    }

    fn report_circuit(&self, now: Instant) {
        let open_until_ms = self
            .breaker
            .open_until()
            .map(|at| now_ms() + at.saturating_duration_since(now).as_millis() as u64);
        self.ep.set_circuit(open_until_ms);
    }

    /// Starts as many attempts as the limits allow. Returns when to try again if a time
    /// holds the rest back: a partial batch's linger, or the rate limit's next token.
    fn launch(&mut self, settings: &Arc<EndpointSettings>) -> Option<Instant> {
        let try_again_at = self.launch_within_limits(settings);
        // A slot not used now goes back: holding it idle would hold up the receiver's
        // other endpoints.
        self.slot = None;
        try_again_at
    }

    fn launch_within_limits(&mut self, settings: &Arc<EndpointSettings>) -> Option<Instant> {
        if settings.disabled_reason.is_some() {
            return None;
        }
        if let Some(gone) = &self.gone_at {
            if Arc::ptr_eq(gone, settings) {
                return None;
            }
            self.gone_at = None;
        }
        let rate = settings.config.rate_limit;
        match (&self.limiter, rate) {
            (_, 0) => self.limiter = None,
            (Some((r, _)), _) if *r == rate => {}
            _ => self.limiter = Some((rate, TokenBucket::new(rate, Instant::now()))),
        }
        let batch_max = settings.config.batch_max.max(1);
        let linger = settings.config.batch_linger.0;
        let limit = self.concurrency.min(settings.max_concurrency).max(1);
        while self.inflight.len() < limit && !self.ready.is_empty() {
            let now = Instant::now();
            if self.breaker.state(now) == CircuitState::Open {
                break;
            }
            // What `take_job` would gather now, counted only for an endpoint that batches.
            let gathered = match self.ready.front() {
                Some(front) if batch_max > 1 => gatherable(&self.ready, front.attempts(), batch_max),
                _ => 0,
            };
            if (1..batch_max).contains(&gathered) {
                // A partial batch waits for more events until its linger runs out.
                let deadline = self.ready_since.unwrap_or(now) + linger;
                if now < deadline {
                    return Some(deadline);
                }
            }
            // The slot first: the limiter's token and a half-open circuit's probe are
            // spent only on an attempt that starts now.
            let slot = match self.take_slot(settings) {
                Ok(slot) => slot,
                Err(()) => break,
            };
            let Some(probe) = self.breaker.try_acquire(now) else {
                break;
            };
            if let Some((_, bucket)) = &mut self.limiter {
                if !bucket.try_take(now) {
                    self.breaker.release(probe);
                    return Some(bucket.next_token_at(now));
                }
            }
            let job = take_job(&mut self.ready, batch_max);
            self.ready_since = (!self.ready.is_empty()).then(Instant::now);
            self.start_attempt(job, settings, slot, probe);
        }
        None
    }

    /// A slot at the endpoint's receiver for the next attempt: `Ok(None)` when the client
    /// bounds nothing there, `Err` when none is free (a wait for one is then under way).
    fn take_slot(&mut self, settings: &Arc<EndpointSettings>) -> Result<Option<OriginSlot>, ()> {
        match &mut self.origin {
            Some(o) if Arc::ptr_eq(&o.settings, settings) => {}
            Some(o) if o.settings.url == settings.url => o.settings = settings.clone(),
            _ => {
                self.origin = Some(Origin {
                    settings: settings.clone(),
                    slots: self.client.origin_slots(&settings.url),
                });
                self.slot = None;
                self.slot_wait = None;
            }
        }
        let Some(Origin { slots: Some(slots), .. }) = &self.origin else {
            return Ok(None);
        };
        if let Some(slot) = self.slot.take() {
            return Ok(Some(slot));
        }
        if self.slot_wait.is_some() {
            return Err(());
        }
        if let Some(slot) = slots.try_take() {
            return Ok(Some(slot));
        }
        // The next job's oldest event sets the place in line: the receiver's oldest
        // waiting click goes first, across the thread's endpoints.
        let order = self
            .ready
            .front()
            .and_then(|job| job.items.iter().map(|p| p.seq).min())
            .unwrap_or(Seq::MAX);
        self.slot_wait = Some(Box::pin(slots.clone().take(order)));
        Err(())
    }

    /// `probe`: the attempt is a half-open circuit's probe.
    fn start_attempt(&mut self, job: Job, settings: &Arc<EndpointSettings>, slot: Option<OriginSlot>, probe: bool) {
        let mut bodies = Vec::with_capacity(job.items.len());
        let mut accepted_ms = Vec::with_capacity(job.items.len());
        let mut event_ids = Vec::with_capacity(job.items.len());
        let mut kept = Vec::with_capacity(job.items.len());
        let mut missing = Vec::new();
        let mut unreadable = Vec::new();
        for p in &job.items {
            match self.ctx.log.event(p.seq) {
                Ok(Some(ev)) => {
                    event_ids.push(event_id_of(&ev.data));
                    accepted_ms.push(ev.accepted_ms);
                    bodies.push(ev.data);
                    kept.push(*p);
                }
                Ok(None) => missing.push(p.seq),
                Err(e) => {
                    // A damaged segment fails thousands of events, one by one: each is
                    // buried with its error, and said here at most every 10 s.
                    if let Some(times) = self.event_failure_log.due(now_ms()) {
                        tracing::error!(endpoint = %self.ep.id, seq = p.seq, error = %e, failures = times, "cannot read an event");
                    }
                    unreadable.push((*p, e.to_string()));
                }
            }
        }
        if !unreadable.is_empty() {
            self.bury_unreadable(unreadable);
        }
        if !missing.is_empty() {
            // A queue entry without its event cannot be delivered; drop the entry so it
            // does not block the queue forever, and say so loudly.
            tracing::error!(endpoint = %self.ep.id, count = missing.len(), "queue entries without a stored event dropped");
            self.ctx.log.delivered(self.ep.key, &missing);
            self.settle(&missing);
        }
        if kept.is_empty() {
            // Nothing went out: a half-open circuit's probe is still to be sent.
            self.breaker.release(probe);
            return;
        }
        let job = Job {
            items: kept,
            batch: job.batch,
        };
        let batched = settings.config.batch_max > 1;
        let webhook_id = if batched {
            format!("batch_{:016x}", job.batch)
        } else {
            event_ids[0].clone()
        };
        let refs: Vec<&[u8]> = bodies.iter().map(|b| b.as_ref()).collect();
        let body = match self.render(settings, &refs, &webhook_id, batched) {
            Ok(Ok(b)) => Ok(Bytes::from(b)),
            // A renderer that panics on these events fails their attempt, so they take
            // the way of retries and then dead letters instead of taking the worker down
            // again on every restart.
            Err(panic) => Err(panicked_attempt(panic.as_ref())),
            Ok(Err(e)) => {
                tracing::error!(endpoint = %self.ep.id, error = %e, "cannot render events; they become dead letters");
                self.breaker.release(probe);
                drop(refs);
                self.bury_unrenderable(job, bodies, event_ids, accepted_ms, settings, e);
                return;
            }
        };
        let client = self.client.clone();
        let settings = settings.clone();
        self.inflight.spawn(async move {
            let result = match body {
                Ok(body) => unless_panicked(super::attempt(&client, &settings, &webhook_id, body, slot)).await,
                Err(panicked) => panicked,
            };
            Finished {
                job,
                sent_with: settings,
                probe,
                result,
                event_ids,
                accepted_ms,
            }
        });
    }

    /// The endpoint's body for `events`, or the panic of a renderer that panicked.
    fn render(
        &self,
        settings: &EndpointSettings,
        events: &[&[u8]],
        webhook_id: &str,
        batch: bool,
    ) -> std::thread::Result<Result<Vec<u8>, FormatError>> {
        let ctx = RenderContext {
            endpoint_id: &self.ep.id,
            webhook_id,
            include_ip: settings.config.include_ip,
            batch,
        };
        std::panic::catch_unwind(AssertUnwindSafe(|| {
            format::render(settings.config.format, events, &ctx)
        }))
    }

    fn finish(&mut self, done: Finished, settings: &Arc<EndpointSettings>) {
        let Finished {
            mut job,
            sent_with,
            probe,
            result,
            event_ids,
            accepted_ms,
        } = done;
        let ep = self.ep.clone();
        let metrics = &ep.metrics;
        metrics.attempt(result.outcome).increment(1);
        metrics.duration.record(result.latency.as_secs_f64());
        let attempt_no = job.attempts() + 1;
        let at_ms = now_ms();
        let error: Option<Arc<str>> = result.error.as_deref().map(Arc::from);
        let records = event_ids
            .iter()
            .map(|id| AttemptRecord {
                event_id: id.as_str().into(),
                attempt: attempt_no,
                at_ms,
                status: result.status,
                latency_ms: result.latency.as_secs_f64() * 1000.0,
                outcome: result.outcome.as_str(),
                error: error.clone(),
            })
            .collect();
        self.ep.record_attempt(records, result.outcome);
        let now = Instant::now();
        let seqs: Vec<Seq> = job.items.iter().map(|p| p.seq).collect();
        if result.outcome == Outcome::Success {
            // Grow only when the limit is what holds the queue back.
            if self.inflight.len() + 1 >= self.concurrency && !self.ready.is_empty() {
                self.concurrency = (self.concurrency + 1).min(settings.max_concurrency.max(1));
            }
            if self.reported_failing {
                self.report(WorkerEvent::Recovered {
                    endpoint: self.ep.id.clone(),
                });
            }
            self.consecutive_failures = 0;
            self.failing.ended(self.ctx.log.as_ref());
            self.reported_failing = false;
            self.reported_too_long = false;
            self.breaker.on_success();
            self.report_circuit(now);
            self.completed.extend_from_slice(&seqs);
            let now_ms = now_ms();
            for accepted in accepted_ms {
                metrics.lag.record(now_ms.saturating_sub(accepted) as f64 / 1000.0);
            }
            self.settle(&seqs);
            return;
        }
        // A 410 from a URL the endpoint has left since says nothing of the new one: it is
        // an ordinary failure, retried there.
        if result.status == Some(410) && sent_with.config.url == settings.config.url {
            // Gone: the endpoint is disabled; its events stay queued for a re-enable.
            self.breaker.on_success();
            self.gone_at = Some(settings.clone());
            let _ = self.ctx.events.send(WorkerEvent::Gone {
                endpoint: self.ep.id.clone(),
            });
            self.ready.push_front(job);
            return;
        }
        self.concurrency = (self.concurrency / 2).max(1);
        self.note_failure(now, &sent_with.config.url, &result.error);
        if self.breaker.on_failure(now, probe) {
            tracing::warn!(endpoint = %self.ep.id, cooldown = ?self.ctx.policy.breaker_cooldown, "circuit opened");
        }
        self.report_circuit(now);
        if let Some(times) = self.failure_log.due(at_ms) {
            tracing::warn!(
                endpoint = %self.ep.id,
                event = %event_ids.first().map(String::as_str).unwrap_or(""),
                attempt = attempt_no,
                outcome = result.outcome.as_str(),
                status = ?result.status,
                error = ?result.error,
                suppressed = times - 1,
                "delivery attempt failed"
            );
        }
        match self.ctx.policy.schedule.delay(attempt_no, result.retry_after) {
            Some(delay) => {
                let due = now_ms() + delay.as_millis() as u64;
                for p in &mut job.items {
                    p.attempts = attempt_no;
                    p.due_ms = due;
                }
                self.ctx.log.reschedule(self.ep.key, &job.items);
                self.wait(job, due);
            }
            None => {
                let dead_at_ms = now_ms();
                let letters = job
                    .items
                    .iter()
                    .zip(event_ids.iter().zip(accepted_ms.iter()))
                    .map(|(p, (id, accepted))| DeadLetter {
                        seq: p.seq,
                        event_id: id.clone(),
                        attempts: attempt_no,
                        dead_at_ms,
                        accepted_ms: *accepted,
                        last_status: result.status,
                        last_error: result.error.clone(),
                    })
                    .collect::<Vec<_>>();
                tracing::warn!(endpoint = %self.ep.id, count = letters.len(), "events dead-lettered after the last retry");
                self.bury(letters);
            }
        }
    }

    /// Events the log holds but cannot read back (a damaged segment) become dead letters
    /// that name the damage: an operator sees them, and a reader that recovers (a disk
    /// error that passes) lets them be replayed, where dropping them would hide the loss.
    fn bury_unreadable(&mut self, unreadable: Vec<(Pending, String)>) {
        let dead_at_ms = now_ms();
        let letters: Vec<DeadLetter> = unreadable
            .into_iter()
            .map(|(p, error)| DeadLetter {
                seq: p.seq,
                event_id: String::new(),
                attempts: p.attempts,
                dead_at_ms,
                accepted_ms: 0,
                last_status: None,
                last_error: Some(format!("the stored event cannot be read: {error}")),
            })
            .collect();
        self.bury(letters);
    }

    /// A stored click this endpoint's format cannot render (one it cannot parse) will
    /// never render: it becomes a dead letter that says why at once, instead of holding
    /// the queue, and pruning, behind it for ever. Of a batch, only the events that fail
    /// alone go; the others go back in line, to be sent in a batch of a new id.
    fn bury_unrenderable(
        &mut self,
        job: Job,
        bodies: Vec<Bytes>,
        event_ids: Vec<String>,
        accepted_ms: Vec<u64>,
        settings: &EndpointSettings,
        error: FormatError,
    ) {
        // An event that failed on its own already said why.
        let mut known = (job.items.len() == 1).then_some(error);
        let dead_at_ms = now_ms();
        let mut letters = Vec::new();
        let mut renderable = Vec::new();
        for (((p, body), id), accepted) in job.items.into_iter().zip(bodies).zip(event_ids).zip(accepted_ms) {
            let failed = known
                .take()
                .or_else(|| match self.render(settings, &[body.as_ref()], &id, false) {
                    Ok(Err(e)) => Some(e),
                    _ => None,
                });
            match failed {
                Some(e) => letters.push(DeadLetter {
                    seq: p.seq,
                    event_id: id,
                    attempts: p.attempts,
                    dead_at_ms,
                    accepted_ms: accepted,
                    last_status: None,
                    last_error: Some(format!(
                        "cannot render the event as {}: {e}",
                        settings.config.format.as_str()
                    )),
                }),
                None => renderable.push(p),
            }
        }
        push_front_singly(&mut self.ready, renderable.into_iter());
        if !letters.is_empty() {
            self.bury(letters);
        }
    }

    /// Moves entries to the endpoint's dead letters. They leave the pending count and go
    /// to the log before they are counted dead, so that whoever sees a dead letter counted
    /// sees it gone from the pending count too (and its bury on its way).
    fn bury(&mut self, letters: Vec<DeadLetter>) {
        let seqs: Vec<Seq> = letters.iter().map(|l| l.seq).collect();
        self.settle(&seqs);
        // Unreadable events have no id to name.
        let event_ids = letters
            .iter()
            .filter(|l| !l.event_id.is_empty())
            .map(|l| l.event_id.clone())
            .collect();
        let last_error = letters.first().and_then(|l| l.last_error.clone());
        let count = letters.len() as u64;
        self.ctx.log.bury(self.ep.key, letters);
        self.ep.metrics.dead.increment(count);
        self.report(WorkerEvent::DeadLetter {
            endpoint: self.ep.id.clone(),
            event_ids,
            last_error,
        });
    }

    /// Counts a failed attempt toward the operational `failing` and `disabled` thresholds.
    fn note_failure(&mut self, now: Instant, url: &str, error: &Option<String>) {
        self.consecutive_failures = self.consecutive_failures.saturating_add(1);
        let disable_after = self.ctx.policy.disable_after;
        let failing_for = self.failing.failed(self.ctx.log.as_ref(), now, url);
        if !self.reported_failing && self.consecutive_failures >= self.ctx.policy.failing_after {
            self.reported_failing = true;
            self.report(WorkerEvent::Failing {
                endpoint: self.ep.id.clone(),
                consecutive: self.consecutive_failures,
                last_error: error.clone(),
            });
        }
        if !self.reported_too_long && failing_for >= disable_after {
            self.reported_too_long = true;
            self.report(WorkerEvent::FailingTooLong {
                endpoint: self.ep.id.clone(),
            });
        }
    }

    fn report(&self, event: WorkerEvent) {
        // The receiver lives as long as the daemon; a send after it is gone changes nothing.
        let _ = self.ctx.events.send(event);
    }

    fn finished(&mut self, done: Result<Finished, tokio::task::JoinError>, settings: &Arc<EndpointSettings>) {
        match done {
            Ok(finished) => self.finish(finished, settings),
            Err(e) => tracing::error!(endpoint = %self.ep.id, error = %e, "an attempt task failed"),
        }
    }

    /// Hands the delivered entries gathered since the last call to the log in one write.
    fn flush_completed(&mut self) {
        if !self.completed.is_empty() {
            self.ctx.log.delivered(self.ep.key, &self.completed);
            self.completed.clear();
        }
    }

    /// The entries left the queue (delivered, dead or dropped).
    fn settle(&mut self, seqs: &[Seq]) {
        for s in seqs {
            self.owned.remove(s);
        }
        self.ep.add_pending(-(seqs.len() as i64));
    }
}

/// The attempt's result, or a failed attempt in place of one that panicked. The job then
/// takes the usual failure path (retried on the schedule, then a dead letter), where a
/// lost task would have left its entries owned by nobody until a restart. The outcome
/// labels (SPEC §9) have no place for a fault of our own: it counts with `network`, the
/// request's fate being unknown, and its error says what it was.
async fn unless_panicked(attempt: impl std::future::Future<Output = AttemptResult>) -> AttemptResult {
    AssertUnwindSafe(attempt)
        .catch_unwind()
        .await
        .unwrap_or_else(|panic| panicked_attempt(panic.as_ref()))
}

fn panicked_attempt(panic: &(dyn std::any::Any + Send)) -> AttemptResult {
    // The panic hook has printed the panic already; the attempt's error carries it on.
    let what = panic_message(panic);
    AttemptResult::unanswered(
        Outcome::Network,
        Duration::ZERO,
        format!("internal error: the attempt panicked ({what})"),
    )
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> &str {
    panic
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("no message")
}

/// The stored event starts with `{"id":"…"`; reads that id without parsing the rest.
pub(crate) fn event_id_of(data: &[u8]) -> String {
    let rest = data.strip_prefix(br#"{"id":"#).unwrap_or(b"");
    serde_json::Deserializer::from_slice(rest)
        .into_iter::<String>()
        .next()
        .and_then(Result::ok)
        .unwrap_or_default()
}

fn instant_of(ms: u64) -> Instant {
    let now = now_ms();
    Instant::now() + Duration::from_millis(ms.saturating_sub(now))
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clickhook_loadtest::http::Http1;
    use clickhook_loadtest::{Behavior, Clock, Sink, SinkEndpoint, SinkOptions};
    use hyper::Method;
    use std::sync::Mutex;

    fn single(seq: Seq, attempts: u32) -> Job {
        Job {
            items: vec![Pending {
                seq,
                attempts,
                due_ms: 0,
                batch: 0,
            }],
            batch: 0,
        }
    }

    #[tokio::test]
    async fn a_failing_run_is_kept_for_its_url_and_cleared_when_it_ends() {
        let dir = tempfile::tempdir().unwrap();
        let options = crate::log::SledOptions::for_tests(1 << 20, 1000, 1000);
        let log = crate::log::SledLog::open(dir.path(), options).unwrap();
        let (a, b) = ("http://a.example/", "http://b.example/");
        let after = Duration::from_secs(100);
        let sync = || async { log.put_setting("sync", None).await.unwrap().unwrap() };
        let t0 = Instant::now();
        let mut streak = FailingStreak::load(log.as_ref(), "e", a, after);
        assert_eq!(streak.failed(log.as_ref(), t0, a), Duration::ZERO);
        // Kept once it has lasted 10 s (less than a quarter of disable_after), then
        // refreshed every 10 s more.
        streak.failed(log.as_ref(), t0 + Duration::from_secs(5), a);
        sync().await;
        assert!(
            log.get_setting("failing-for/e").unwrap().is_none(),
            "a short run is not kept"
        );
        let kept = |log: &Arc<crate::log::SledLog>| {
            let v = log.get_setting("failing-for/e").unwrap().unwrap();
            serde_json::from_slice::<StoredStreak>(&v).unwrap().failing_ms
        };
        streak.failed(log.as_ref(), t0 + Duration::from_secs(12), a);
        streak.failed(log.as_ref(), t0 + Duration::from_secs(18), a);
        sync().await;
        assert_eq!(kept(&log), 12_000);
        streak.failed(log.as_ref(), t0 + Duration::from_secs(30), a);
        sync().await;
        assert_eq!(kept(&log), 30_000);
        // The next run of the daemon goes on from what was kept, at the same URL only.
        let mut again = FailingStreak::load(log.as_ref(), "e", a, after);
        let t1 = t0 + Duration::from_secs(1000);
        assert_eq!(again.failed(log.as_ref(), t1, a), Duration::from_secs(30));
        let mut moved = FailingStreak::load(log.as_ref(), "e", b, after);
        assert_eq!(moved.failed(log.as_ref(), t1, b), Duration::ZERO);
        // A new URL in the same run of the daemon starts a new run too.
        assert_eq!(
            again.failed(log.as_ref(), t1 + Duration::from_secs(5), b),
            Duration::ZERO
        );
        again.ended(log.as_ref());
        sync().await;
        assert!(
            log.get_setting("failing-for/e").unwrap().is_none(),
            "an ended run is cleared"
        );
    }

    #[test]
    fn a_batch_gathers_only_events_with_as_many_failed_attempts() {
        let mut ready: VecDeque<Job> = [single(1, 2), single(2, 0), single(3, 0), single(4, 2)].into();
        let seqs = |job: &Job| job.items.iter().map(|p| p.seq).collect::<Vec<_>>();
        let retried = take_job(&mut ready, 10);
        assert_eq!(seqs(&retried), vec![1], "a retry goes without the new events");
        assert!(retried.batch != 0 && retried.items.iter().all(|p| p.batch == retried.batch));
        assert_eq!(seqs(&take_job(&mut ready, 10)), vec![2, 3]);
        assert_eq!(seqs(&take_job(&mut ready, 10)), vec![4]);
        // Without batching a batch splits into single events, each keeping its attempts.
        let mut ready: VecDeque<Job> = VecDeque::new();
        ready.push_back(Job {
            items: vec![
                Pending {
                    seq: 5,
                    attempts: 1,
                    due_ms: 0,
                    batch: 9,
                },
                Pending {
                    seq: 6,
                    attempts: 1,
                    due_ms: 0,
                    batch: 9,
                },
            ],
            batch: 9,
        });
        let first = take_job(&mut ready, 1);
        assert_eq!((seqs(&first), first.batch, first.attempts()), (vec![5], 0, 1));
        let second = take_job(&mut ready, 1);
        assert_eq!((seqs(&second), second.batch, second.attempts()), (vec![6], 0, 1));
        // A batch larger than a since-lowered batch_max goes out in parts of batch_max:
        // the first keeps its id, each other part gets one of its own.
        let items = (10..15)
            .map(|seq| Pending {
                seq,
                attempts: 1,
                due_ms: 0,
                batch: 9,
            })
            .collect();
        let mut ready: VecDeque<Job> = [Job { items, batch: 9 }].into();
        let parts: Vec<Job> = (0..3).map(|_| take_job(&mut ready, 2)).collect();
        assert!(ready.is_empty());
        assert_eq!(
            parts.iter().map(seqs).collect::<Vec<_>>(),
            vec![vec![10, 11], vec![12, 13], vec![14]]
        );
        assert_eq!(parts[0].batch, 9);
        assert!(parts[1].batch != 9 && parts[2].batch != 9 && parts[1].batch != parts[2].batch);
        for part in &parts {
            assert!(part.items.iter().all(|p| p.batch == part.batch && p.attempts == 1));
        }
    }

    /// Turns of the loop of each worker whose endpoint id starts with `turns-`.
    static TURNS: Mutex<std::collections::BTreeMap<String, u64>> = Mutex::new(std::collections::BTreeMap::new());

    pub(super) fn count_turn(endpoint: &str) {
        if endpoint.starts_with("turns-") {
            *TURNS.lock().unwrap().entry(endpoint.to_string()).or_default() += 1;
        }
    }

    fn turns(endpoint: &str) -> u64 {
        TURNS.lock().unwrap().get(endpoint).copied().unwrap_or(0)
    }

    const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

    /// The load generator's verifying sink, endpoint `n` (at `sink.url(n)`) scripted by
    /// `behaviors[n]` and signed with [`SECRET`].
    async fn sink(behaviors: &[Behavior]) -> Sink {
        let endpoints = behaviors
            .iter()
            .map(|&behavior| SinkEndpoint {
                secret: SECRET.into(),
                behavior,
            })
            .collect();
        Sink::start(SinkOptions::new(endpoints, Clock::new())).await.unwrap()
    }

    /// The daemon in this process on `config` (loopback, port 0, a temp dir): its ingest
    /// and admin addresses, the channel that stops it, and its task.
    async fn daemon(
        config: &str,
    ) -> (
        tempfile::TempDir,
        std::net::SocketAddr,
        std::net::SocketAddr,
        mpsc::Sender<crate::server::Control>,
        tokio::task::JoinHandle<Result<(), crate::server::ServerError>>,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let text = format!(
            r#"
[storage]
path = "data"
[ingest.http]
listen = "127.0.0.1:0"
[admin]
listen = "127.0.0.1:0"
[delivery]
allow_private_networks = true
{config}
"#
        );
        let path = dir.path().join("config.toml");
        let config = crate::config::Config::parse(&text, &path).unwrap();
        let listeners = crate::server::bind(&config).await.unwrap();
        let (ingest, admin) = (listeners.http_addr().unwrap(), listeners.admin_addr().unwrap());
        let (control, control_rx) = mpsc::channel(1);
        let task = tokio::spawn(crate::server::run(config, listeners, control_rx));
        (dir, ingest, admin, control, task)
    }

    async fn post_clicks(ingest: std::net::SocketAddr, clicks: String) -> Vec<String> {
        let mut http = Http1::connect(ingest).await.unwrap();
        let accepted = http
            .request(
                Method::POST,
                "/v1/clicks",
                &[("content-type", "application/json")],
                clicks.into(),
                Duration::from_secs(5),
            )
            .await
            .unwrap();
        assert_eq!(accepted.status, 202, "{:?}", accepted.body);
        let answer: serde_json::Value = serde_json::from_slice(&accepted.body).unwrap();
        answer["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i.as_str().unwrap().to_string())
            .collect()
    }

    /// A worker waits for what can let it act, not in a loop: with its circuit open and
    /// retries come due meanwhile, and with attempts in flight under a rate limit.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_worker_held_back_by_its_circuit_or_its_concurrency_does_not_spin() {
        let sink = sink(&[Behavior::flaky(1.0, 0), Behavior::hang()]).await;
        let (failing, hanging) = (sink.url(0), sink.url(1));
        let config = format!(
            r#"
[retry]
schedule = ["10ms", "10ms", "10ms", "10ms"]
jitter = 0.0
[breaker]
failures = 1
cooldown = "30s"
[[endpoints]]
id = "turns-open"
url = "{failing}"
secret = "{SECRET}"
links = ["open"]
[[endpoints]]
id = "turns-limited"
url = "{hanging}"
secret = "{SECRET}"
links = ["limited"]
rate_limit = 1000
timeout = "20s"
"#
        );
        let (_dir, ingest, _admin, control, task) = daemon(&config).await;
        let clicks: Vec<String> = ["open", "open", "open", "limited", "limited", "limited"]
            .iter()
            .map(|l| format!(r#"{{"link":{{"id":"{l}"}}}}"#))
            .collect();
        post_clicks(ingest, format!("[{}]", clicks.join(","))).await;
        // The first failure opens the circuit; the other clicks' retries come due within
        // 10 ms, 30 s before it lets a probe through. The hanging receiver holds the
        // other endpoint's one attempt (concurrency starts at 1) while tokens abound.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let before = (turns("turns-open"), turns("turns-limited"));
        tokio::time::sleep(Duration::from_millis(1000)).await;
        let after = (turns("turns-open"), turns("turns-limited"));
        assert!(after.0 - before.0 < 20, "open circuit: {before:?} → {after:?}");
        assert!(
            after.1 - before.1 < 20,
            "rate limit, concurrency full: {before:?} → {after:?}"
        );
        control.send(crate::server::Control::Shutdown).await.unwrap();
        drop(task);
    }

    /// A backlog with no new clicks: nothing but the worker's own pause wakes it to read
    /// its queue again after reads that failed.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_backlog_is_delivered_after_failed_reads_of_the_queue_without_a_new_click() {
        let sink = sink(&[Behavior::default()]).await;
        let dir = tempfile::tempdir().unwrap();
        let (log, registry, _running) = crate::endpoints::registry_in(dir.path());
        let key = log.endpoint_key("e").unwrap();
        let ids: Vec<String> = (0..3).map(|i| format!("c{i}")).collect();
        let events = ids
            .iter()
            .map(|id| crate::log::NewEvent {
                id: id.clone(),
                client_id: false,
                data: format!(r#"{{"id":"{id}","timestamp":"2025-01-01T00:00:00Z","link":{{"id":"l"}}}}"#).into_bytes(),
                endpoints: vec![key],
            })
            .collect();
        log.append(events).await.unwrap().unwrap();
        // More failures than the wake-ups the worker's start brings.
        log.fail_reads(3);
        let config =
            serde_json::from_value(serde_json::json!({"id": "e", "url": sink.url(0), "secret": SECRET})).unwrap();
        registry.create(config).await.unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !ids
            .iter()
            .all(|id| sink.recorder().with_hits(id, |hits| !hits.is_empty()))
        {
            assert!(Instant::now() < deadline, "the backlog is never read again");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        for id in &ids {
            assert_eq!(sink.recorder().with_hits(id, <[_]>::len), 1, "{id}");
        }
        assert_eq!(sink.stats().bad_signatures, 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_renderer_that_panics_fails_its_events_and_the_endpoint_delivers_the_rest() {
        let sink = sink(&[Behavior::default()]).await;
        let (_dir, ingest, admin, control, daemon) = daemon(&format!(
            r#"
[retry]
schedule = ["10ms", "10ms"]
jitter = 0.0
[[endpoints]]
id = "e"
url = "{}"
secret = "{SECRET}"
"#,
            sink.url(0)
        ))
        .await;

        let panics = std::str::from_utf8(format::PANICS).unwrap();
        let clicks = format!(
            r#"[{{"link":{{"id":"{panics}","workspace_id":"w"}}}},{{"link":{{"id":"fine","workspace_id":"w"}}}}]"#
        );
        let ids = post_clicks(ingest, clicks).await;

        // The endpoint's first attempt is the panicking event's, so without the guard the
        // worker would die on it, and again on every restart, before the second went out.
        let mut admin_http = Http1::connect(admin).await.unwrap();
        let mut dead = serde_json::Value::Null;
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            let answer = admin_http
                .request(
                    Method::GET,
                    "/v1/endpoints/e/dead",
                    &[],
                    Bytes::new(),
                    Duration::from_secs(5),
                )
                .await
                .unwrap();
            dead = serde_json::from_slice(&answer.body).unwrap();
            let delivered = sink.recorder().with_hits(&ids[1], |hits| !hits.is_empty());
            if delivered && dead.as_array().is_some_and(|d| !d.is_empty()) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(
            sink.recorder().with_hits(&ids[1], <[_]>::len),
            1,
            "the second click arrives"
        );
        assert_eq!(sink.stats().requests, 1, "nothing went out for the first");
        assert_eq!(sink.stats().bad_signatures, 0);
        let dead = dead.as_array().unwrap();
        assert_eq!(dead.len(), 1, "{dead:?}");
        assert_eq!(dead[0]["event_id"], ids[0]);
        assert_eq!(dead[0]["attempts"], 3, "the first try and both retries");
        let error = dead[0]["last_error"].as_str().unwrap();
        assert!(error.contains("panicked"), "{error}");

        control.send(crate::server::Control::Shutdown).await.unwrap();
        daemon.await.unwrap().unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_worker_that_panics_starts_again_after_a_growing_pause() {
        let runs = std::sync::atomic::AtomicU32::new(0);
        let started = tokio::time::Instant::now();
        let mut starts = Vec::new();
        restarting_after_panics(
            "e",
            || {
                starts.push(started.elapsed());
                let run = runs.fetch_add(1, Ordering::SeqCst);
                async move {
                    if run < 3 {
                        panic!("worker bug {run}");
                    }
                }
            },
            || false,
        )
        .await;
        assert_eq!(runs.load(Ordering::SeqCst), 4, "three panics, then a run that ends");
        let secs: Vec<u64> = starts.iter().map(|d| d.as_secs()).collect();
        assert_eq!(secs, [0, 1, 3, 7], "pauses of 1, 2 and 4 s");
    }

    #[tokio::test(start_paused = true)]
    async fn a_stopped_endpoint_is_not_started_again_and_does_not_wait_out_the_pause() {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let runs = std::sync::atomic::AtomicU32::new(0);
        let stopper = stop.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(250)).await;
            stopper.store(true, Ordering::SeqCst);
        });
        let started = tokio::time::Instant::now();
        restarting_after_panics(
            "e",
            || {
                runs.fetch_add(1, Ordering::SeqCst);
                async { panic!("worker bug") }
            },
            || stop.load(Ordering::SeqCst),
        )
        .await;
        assert_eq!(runs.load(Ordering::SeqCst), 1);
        assert!(
            started.elapsed() < Duration::from_millis(500),
            "{:?}",
            started.elapsed()
        );
    }

    #[tokio::test]
    async fn a_panicking_attempt_becomes_a_failed_attempt_that_is_retried() {
        let attempt = async {
            if event_id_of(b"{}").is_empty() {
                panic!("boom");
            }
            AttemptResult {
                outcome: Outcome::Success,
                status: Some(200),
                latency: Duration::ZERO,
                error: None,
                retry_after: None,
                body: Bytes::new(),
            }
        };
        let result = unless_panicked(attempt).await;
        assert_eq!(result.outcome, Outcome::Network);
        assert_eq!(
            result.error.as_deref(),
            Some("internal error: the attempt panicked (boom)")
        );
    }

    #[test]
    fn event_id_is_read_from_the_stored_prefix() {
        assert_eq!(event_id_of(br#"{"id":"evt_1","timestamp":"x"}"#), "evt_1");
        assert_eq!(event_id_of(br#"{"id":"a\"b","timestamp":"x"}"#), "a\"b");
        assert_eq!(event_id_of(b"garbage"), "");
    }
}
