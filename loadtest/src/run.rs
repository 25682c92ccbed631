//! One load-test run from start to report: start the sink, start (or attach to) the daemon,
//! drive clicks, wait for the deliveries, stop everything, verify and build the [`Report`].
//! It owns the order of those steps, every deadline between them, and cleaning up what it
//! started even when a step fails. It must not leave a process behind (the daemon child is
//! killed on drop, whatever the path out) nor, on a completed run, an endpoint created
//! through an attached daemon's admin API.

use crate::clicks::ClickFactory;
use crate::clock::{rfc3339, unix_now, Clock};
use crate::daemon::{disk_usage, render_config, ConfigEndpoint, Daemon, DaemonSettings};
use crate::driver::{drive, DriveCounters, DriveOptions, IngestTarget, SOCKET_WINDOW};
use crate::http::{loopback_addr, Http1};
use crate::procstat::{self, Sampler};
use crate::report::{BacklogReport, DaemonReport, GroupReport, LatencySummary, Report};
use crate::scenario::{EndpointPlan, Plan, Routing, Scenario, BACKLOG_RETRY};
use crate::signature::generate_secret;
use crate::sink::{Behavior, Mode, Sink, SinkEndpoint, SinkOptions};
use crate::verify::{count_missing, verify};
use crate::Error;
use bytes::Bytes;
use hyper::Method;
use std::fmt;
use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::atomic::{AtomicU8, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Upper bound on ingest time when no `duration` is given, so that every run ends.
const DEFAULT_INGEST_LIMIT: Duration = Duration::from_secs(1800);
/// Time allowed for duplicate deliveries still in flight once everything has arrived.
const SETTLE: Duration = Duration::from_millis(500);
const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);
/// How long a scripted outage may still take to finish once everything arrived.
const OUTAGE_GRACE: Duration = Duration::from_secs(5);

/// How clicks reach the daemon.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Transport {
    /// `POST /v1/clicks` on kept-alive connections.
    #[default]
    Http,
    /// NDJSON over `ingest.unix.path`, pipelined.
    Unix,
}

impl fmt::Display for Transport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Transport::Http => "http",
            Transport::Unix => "unix",
        })
    }
}

impl FromStr for Transport {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "http" => Ok(Transport::Http),
            "unix" => Ok(Transport::Unix),
            _ => Err(format!("unknown transport {s:?}; http or unix")),
        }
    }
}

/// A daemon that is already running. Its endpoints for the run are created through its
/// admin API (`POST /v1/endpoints`, pointing at this run's sink) and deleted afterwards;
/// its own retry and breaker settings apply, not the scenario's.
#[derive(Clone, Debug, Default)]
pub struct Attach {
    /// Ingest base URL, e.g. `http://127.0.0.1:8080`; needed for the HTTP transport.
    pub ingest_url: Option<String>,
    /// Ingest socket path; needed for the Unix transport.
    pub socket: Option<PathBuf>,
    /// Admin base URL, e.g. `http://127.0.0.1:9090`.
    pub admin_url: String,
    pub admin_token: Option<String>,
    /// Bearer token for `POST /v1/clicks` when the daemon has `ingest.http.tokens`.
    pub ingest_token: Option<String>,
    /// When given, the daemon's CPU and memory are sampled.
    pub pid: Option<u32>,
}

/// Everything a run can be told. `None` fields take the scenario's defaults.
#[derive(Clone, Debug)]
pub struct ScenarioOptions {
    pub scenario: Scenario,
    /// The `clickhook` binary to start; ignored when `attach` is set.
    pub daemon_bin: PathBuf,
    pub attach: Option<Attach>,
    pub clicks: Option<u64>,
    /// Clicks per second over all connections; `None` = as fast as acknowledgements allow.
    pub rate: Option<u64>,
    pub connections: Option<usize>,
    /// Clicks per HTTP request (a JSON array when above 1) or per socket write.
    pub batch: Option<usize>,
    pub transport: Transport,
    /// Longest time spent ingesting; clicks not sent by then are not sent.
    pub duration: Option<Duration>,
    /// Longest wait for deliveries once ingest ends.
    pub drain_timeout: Option<Duration>,
    /// `storage.fsync` for a started daemon ("always" or "interval"); `None` = its default.
    pub fsync: Option<String>,
    /// Send each click with its own idempotency key (`"id"`), checked against the acknowledgement.
    pub client_ids: bool,
    /// `max_concurrency` of every endpoint the run creates; `None` = the daemon's default.
    pub max_concurrency: Option<usize>,
    /// Link-level endpoints of `many-endpoints`; `None` = 10,000. Other scenarios refuse it.
    pub endpoints: Option<u32>,
    /// Clicks spread over links `0..links`; `None` = the scenario's own (one per endpoint
    /// in `many-endpoints`). `--links 1` sends every click to one link-level endpoint
    /// while the others stay in the routing index: the cost of routing alone.
    pub links: Option<u64>,
    /// A progress line on stderr every second.
    pub progress: bool,
    /// How long a started daemon may take to print its ready line.
    pub startup_timeout: Duration,
    /// Faults added to the scenario's own sink script.
    pub sink: SinkScript,
}

/// Faults the command line adds to a scenario's sink script.
#[derive(Clone, Debug, Default)]
pub struct SinkScript {
    /// Added before every answer of the endpoints that must receive.
    pub latency: Option<Duration>,
    /// Fraction (0–1) of their attempts answered 500, at most 3 times per event so that
    /// the retry schedule still delivers everything.
    pub fail_rate: Option<f64>,
    /// Extra endpoints, taking every click, that answer 410 Gone: the daemon must disable
    /// them and deliver everything to the rest all the same.
    pub gone: u32,
    /// The sink goes down (connections refused) this long after ingest starts, for this
    /// long, then comes back; everything must still arrive.
    pub outage: Option<(Duration, Duration)>,
}

impl SinkScript {
    /// The plan with these faults added.
    fn apply(&self, mut plan: Plan) -> Plan {
        for e in plan.endpoints.iter_mut().filter(|e| e.expect) {
            if let Some(latency) = self.latency {
                e.behavior.latency = latency;
            }
            if let Some(rate) = self.fail_rate {
                e.behavior.fail_rate = rate;
                if e.behavior.max_failures_per_event == 0 {
                    e.behavior.max_failures_per_event = 3;
                }
            }
        }
        for _ in 0..self.gone {
            plan.endpoints.push(EndpointPlan {
                group: "gone",
                links: vec![],
                behavior: Behavior {
                    mode: Mode::Gone,
                    ..Behavior::default()
                },
                expect: false,
                timeout: None,
            });
        }
        if self.outage.is_some() {
            // Breaker probes during the outage spend attempts: the long schedule outlasts it.
            plan.retry_schedule = BACKLOG_RETRY.to_vec();
        }
        plan
    }
}

impl Default for ScenarioOptions {
    fn default() -> Self {
        ScenarioOptions {
            scenario: Scenario::Throughput,
            daemon_bin: PathBuf::from("target/release/clickhook"),
            attach: None,
            clicks: None,
            rate: None,
            connections: None,
            batch: None,
            transport: Transport::Http,
            duration: None,
            drain_timeout: None,
            fsync: None,
            client_ids: false,
            max_concurrency: None,
            endpoints: None,
            links: None,
            progress: false,
            startup_timeout: Duration::from_secs(30),
            sink: SinkScript::default(),
        }
    }
}

impl ScenarioOptions {
    pub fn new(scenario: Scenario, daemon_bin: impl Into<PathBuf>) -> Self {
        ScenarioOptions {
            scenario,
            daemon_bin: daemon_bin.into(),
            ..ScenarioOptions::default()
        }
    }
}

/// Runs a scenario on a runtime of its own (two worker threads). Call it from plain
/// `#[test]`s and `main`; from async code use [`run_async`].
pub fn run(options: ScenarioOptions) -> Result<Report, Error> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| Error::io("tokio runtime", e))?;
    rt.block_on(run_async(options))
}

const PHASE_START: u8 = 0;
const PHASE_INGEST: u8 = 1;
const PHASE_DRAIN: u8 = 2;
const PHASE_STOP: u8 = 3;

/// The endpoints created on an attached daemon, deleted again on drop of the run.
struct AdminEndpoints {
    admin: SocketAddr,
    token: Option<String>,
    ids: Vec<String>,
}

async fn admin_call(
    conn: &mut Option<Http1>,
    admin: SocketAddr,
    token: &Option<String>,
    method: Method,
    path: &str,
    body: Bytes,
) -> Result<hyper::StatusCode, String> {
    let mut c = match conn.take().filter(Http1::is_open) {
        Some(c) => c,
        None => Http1::connect(admin)
            .await
            .map_err(|e| format!("connect {admin}: {e}"))?,
    };
    let auth = token.as_ref().map(|t| format!("Bearer {t}"));
    let mut headers = vec![("content-type", "application/json")];
    if let Some(a) = &auth {
        headers.push(("authorization", a.as_str()));
    }
    let answer = c.request(method, path, &headers, body, Duration::from_secs(30)).await?;
    *conn = Some(c);
    if answer.status.is_success() {
        Ok(answer.status)
    } else {
        Err(format!(
            "{path}: {} {}",
            answer.status,
            String::from_utf8_lossy(&answer.body)
        ))
    }
}

impl AdminEndpoints {
    async fn create(
        admin: SocketAddr,
        token: Option<String>,
        endpoints: &[ConfigEndpoint],
    ) -> Result<AdminEndpoints, Error> {
        let mut created = AdminEndpoints {
            admin,
            token,
            ids: Vec::new(),
        };
        let mut conn = None;
        for e in endpoints {
            let mut body = serde_json::json!({
                "id": e.id, "url": e.url, "secret": e.secret, "include_bots": true, "links": e.links,
            });
            if let Some(t) = &e.timeout {
                body["timeout"] = serde_json::Value::from(t.as_str());
            }
            if let Some(n) = e.max_concurrency {
                body["max_concurrency"] = serde_json::Value::from(n);
            }
            let body = Bytes::from(body.to_string());
            if let Err(why) = admin_call(&mut conn, admin, &created.token, Method::POST, "/v1/endpoints", body).await {
                created.delete().await;
                return Err(Error::Admin(why));
            }
            created.ids.push(e.id.clone());
        }
        Ok(created)
    }

    async fn delete(&mut self) -> Vec<String> {
        let mut conn = None;
        let mut errors = Vec::new();
        for id in std::mem::take(&mut self.ids) {
            let path = format!("/v1/endpoints/{id}");
            if let Err(e) = admin_call(&mut conn, self.admin, &self.token, Method::DELETE, &path, Bytes::new()).await {
                errors.push(e);
            }
        }
        errors
    }
}

/// Before ingest starts, the daemon must have used under 5 % of a core over this window…
const QUIET_WINDOW: Duration = Duration::from_millis(200);
/// …or have been given this long to get there.
const QUIET_LIMIT: Duration = Duration::from_secs(10);

/// The most endpoints `--endpoints` may ask for: each is one sink route and one daemon
/// worker, and 100,000 is ten times the scenario's default.
const MAX_ENDPOINTS: u32 = 100_000;
/// The most links `--links` may spread clicks over.
const MAX_LINKS: u64 = 10_000_000;
/// How long a driver connection may fail to connect before ingest stops: a daemon that
/// died or stopped listening ends the run within it, not at the ingest time limit.
const GIVE_UP_CONNECTING: Duration = Duration::from_secs(30);

fn check(options: &ScenarioOptions, plan: &Plan) -> Result<(), Error> {
    let bad = |why: String| Err(Error::Options(why));
    if options.clicks == Some(0) {
        return bad("--clicks must be at least 1".into());
    }
    if options.rate == Some(0) {
        return bad("--rate must be at least 1 (leave it out for as fast as possible)".into());
    }
    if options.connections == Some(0) || options.connections.is_some_and(|c| c > 4096) {
        return bad("--connections must be 1..=4096".into());
    }
    let batch = options.batch.unwrap_or(plan.batch);
    if batch == 0 || batch > 10_000 {
        return bad("--batch must be 1..=10000".into());
    }
    if options.transport == Transport::Unix && batch > SOCKET_WINDOW {
        // A write takes its lines' places in the socket's window of unanswered lines.
        return bad(format!(
            "--batch must be at most {SOCKET_WINDOW} over the socket, its window of unanswered lines"
        ));
    }
    match options.endpoints {
        Some(_) if options.scenario != Scenario::ManyEndpoints => {
            return bad("--endpoints is for many-endpoints only".into());
        }
        Some(n) if n == 0 || n > MAX_ENDPOINTS => {
            return bad(format!("--endpoints must be 1..={MAX_ENDPOINTS}"));
        }
        _ => {}
    }
    let script = &options.sink;
    if script.fail_rate.is_some_and(|f| !(0.0..=1.0).contains(&f)) {
        return bad("--sink-fail-rate must be between 0 and 1".into());
    }
    if script.gone > 100 {
        return bad("--gone must be 0..=100".into());
    }
    if script.outage.is_some() && plan.sink_down_during_ingest {
        return bad("backlog keeps the sink down during ingest already; leave out --sink-down-at".into());
    }
    if script.outage.is_some_and(|(_, period)| period.is_zero()) {
        return bad("--sink-down-for must be longer than 0".into());
    }
    if options.links.is_some_and(|n| n == 0 || n > MAX_LINKS) {
        return bad(format!("--links must be 1..={MAX_LINKS}"));
    }
    if let Some(f) = &options.fsync {
        if f != "always" && f != "interval" {
            return bad(format!("fsync {f:?}: always or interval"));
        }
    }
    Ok(())
}

fn random_tag() -> String {
    format!("{:08x}", rand::random::<u32>())
}

/// Runs a scenario on the caller's tokio runtime (multi-threaded: the sink, the driver and
/// the waits run side by side).
pub async fn run_async(options: ScenarioOptions) -> Result<Report, Error> {
    let wall = Instant::now();
    let plan = match (options.scenario, options.endpoints) {
        (Scenario::ManyEndpoints, Some(n)) => Plan::many_endpoints(n),
        (scenario, _) => Plan::new(scenario),
    };
    check(&options, &plan)?;
    let plan = options.sink.apply(plan);
    let clicks = options.clicks.unwrap_or(plan.clicks);
    let connections = options.connections.unwrap_or(plan.connections);
    let batch = options.batch.unwrap_or(plan.batch);
    let clock = Clock::new();
    let tag = random_tag();

    let secrets: Vec<String> = plan.endpoints.iter().map(|_| generate_secret()).collect();
    let sink_endpoints = plan
        .endpoints
        .iter()
        .zip(&secrets)
        .map(|(e, s)| SinkEndpoint {
            secret: s.clone(),
            behavior: e.behavior,
        })
        .collect();
    let sink = Arc::new(Sink::start(SinkOptions::new(sink_endpoints, clock)).await?);
    let id_prefix = if options.attach.is_some() {
        format!("lt{tag}-")
    } else {
        "ep-".to_string()
    };
    let config_endpoints: Vec<ConfigEndpoint> = plan
        .endpoints
        .iter()
        .enumerate()
        .map(|(n, e)| ConfigEndpoint {
            id: format!("{id_prefix}{n}"),
            url: sink.url(n),
            secret: secrets[n].clone(),
            links: e.links.iter().map(u64::to_string).collect(),
            timeout: e.timeout.map(str::to_string),
            max_concurrency: options.max_concurrency,
        })
        .collect();

    // Kept alive until the end: the daemon's data directory lives in it.
    let mut workdir: Option<tempfile::TempDir> = None;
    let mut daemon: Option<Daemon> = None;
    let mut registered: Option<AdminEndpoints> = None;
    let (target, pid) = match &options.attach {
        None => {
            let dir = tempfile::Builder::new()
                .prefix("clickhook-loadtest-")
                .tempdir()
                .map_err(|e| Error::io("temporary directory", e))?;
            let settings = DaemonSettings {
                data_dir: dir.path().join("data"),
                socket: dir.path().join("clickhook.sock"),
                fsync: options.fsync.clone(),
                delivery_timeout: plan.delivery_timeout.to_string(),
                retry_schedule: plan.retry_schedule.iter().map(|s| s.to_string()).collect(),
                breaker_failures: plan.breaker_failures,
                breaker_cooldown: plan.breaker_cooldown.to_string(),
                endpoints: config_endpoints,
            };
            let config = dir.path().join("config.toml");
            std::fs::write(&config, render_config(&settings)).map_err(|e| Error::io("writing config.toml", e))?;
            // The daemon runs in its temp dir: a relative binary path must not resolve there.
            let bin = std::path::absolute(&options.daemon_bin).unwrap_or_else(|_| options.daemon_bin.clone());
            let d = Daemon::start(&bin, &config, dir.path(), options.startup_timeout).await?;
            let target = match options.transport {
                Transport::Http => IngestTarget::Http {
                    addr: d.ready.ingest_http,
                    token: None,
                },
                Transport::Unix => match &d.ready.unix {
                    Some(p) => IngestTarget::Unix(p.clone()),
                    None => return Err(Error::Options("the daemon announced no socket (unix=-)".into())),
                },
            };
            let pid = d.pid();
            daemon = Some(d);
            workdir = Some(dir);
            (target, Some(pid))
        }
        Some(a) => {
            let target = match options.transport {
                Transport::Http => {
                    let url = a.ingest_url.as_deref().ok_or_else(|| {
                        Error::Options("the http transport needs --ingest-url with --admin-url".into())
                    })?;
                    IngestTarget::Http {
                        addr: loopback_addr(url).map_err(Error::Options)?,
                        token: a.ingest_token.clone(),
                    }
                }
                Transport::Unix => IngestTarget::Unix(
                    a.socket
                        .clone()
                        .ok_or_else(|| Error::Options("the unix transport needs --socket".into()))?,
                ),
            };
            let admin = loopback_addr(&a.admin_url).map_err(Error::Options)?;
            registered = Some(AdminEndpoints::create(admin, a.admin_token.clone(), &config_endpoints).await?);
            (target, a.pid)
        }
    };

    if let Some(p) = pid {
        // Measure the daemon at work, not finishing its start.
        procstat::wait_until_quiet(p, QUIET_WINDOW, 0.05, QUIET_LIMIT).await;
    }
    let sampler = pid.map(|p| Arc::new(Sampler::start(p)));
    // Its first sample, taken as it starts: the daemon's start, before the first click.
    let startup_cpu_seconds = sampler.as_ref().and_then(|s| s.latest()).map(|s| s.cpu_seconds);
    let counters = Arc::new(DriveCounters::default());
    let routing = Arc::new(Routing::new(&plan));
    let phase = Arc::new(AtomicU8::new(PHASE_START));
    let progress = options.progress.then(|| {
        tokio::spawn(progress_loop(
            options.scenario,
            clock,
            counters.clone(),
            sink.clone(),
            sampler.clone(),
            phase.clone(),
        ))
    });

    let mut down_since = None;
    if plan.sink_down_during_ingest {
        sink.set_down(true).await?;
        down_since = Some(Instant::now());
    }

    phase.store(PHASE_INGEST, Relaxed);
    let outage = options.sink.outage.map(|(after, period)| sink.outage(after, period));
    let factory = Arc::new(ClickFactory::new(
        options.links.unwrap_or(plan.links),
        &tag,
        options.client_ids,
        rfc3339(unix_now()),
    ));
    let drive_opts = DriveOptions {
        clicks,
        rate: options.rate,
        connections,
        batch,
        deadline: Instant::now() + options.duration.unwrap_or(DEFAULT_INGEST_LIMIT),
        give_up_connecting: GIVE_UP_CONNECTING,
    };
    let acks = drive(target, drive_opts, factory, routing.clone(), clock, counters.clone()).await;

    phase.store(PHASE_DRAIN, Relaxed);
    let mut backlog = None;
    if let Some(since) = down_since {
        let disk_before = workdir.as_ref().map_or(0, |d| disk_usage(&d.path().join("data")));
        let up_us = clock.now_us();
        sink.set_down(false).await?;
        backlog = Some((since.elapsed(), up_us, disk_before));
    }

    // What goes wrong on the way fails the run.
    let mut failures = Vec::new();
    let drain_deadline = Instant::now() + options.drain_timeout.unwrap_or(plan.drain_timeout);
    let expected_total = counters.expected_deliveries.load(Relaxed);
    let mut next_full_check = Instant::now();
    let mut drain_timed_out = false;
    loop {
        let now = Instant::now();
        if sink.recorder().unique() >= expected_total && now >= next_full_check {
            if count_missing(&acks, &routing, sink.recorder()) == 0 {
                tokio::time::sleep(SETTLE).await;
                break;
            }
            // Unacknowledged ids filled the count; look again later, not on every tick.
            next_full_check = now + Duration::from_secs(2);
        }
        if now >= drain_deadline {
            drain_timed_out = true;
            break;
        }
        if let Some(d) = daemon.as_mut() {
            if !d.alive() {
                failures.push(format!(
                    "the daemon exited during the run; stderr ends with:\n{}",
                    d.stderr_tail()
                ));
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    phase.store(PHASE_STOP, Relaxed);
    if let Some(mut o) = outage {
        // Everything arrived, so the sink is up again; its outage task may still be
        // confirming that. One that has not even begun, or is stuck, fails the run.
        match tokio::time::timeout(OUTAGE_GRACE, &mut o).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => failures.push(format!("the scripted outage: {e}")),
            Ok(Err(e)) => failures.push(format!("the scripted outage's task: {e}")),
            Err(_) => {
                o.abort();
                failures.push("the scripted outage had not taken the sink down and back up when the run ended".into());
            }
        }
    }
    let last_sample = sampler.as_ref().and_then(|s| s.latest());
    let outcome = match daemon.take() {
        Some(d) => Some(d.stop(SHUTDOWN_GRACE).await),
        None => None,
    };
    let disk_after = workdir.as_ref().map_or(0, |d| disk_usage(&d.path().join("data")));
    if let Some(mut r) = registered.take() {
        for e in r.delete().await {
            failures.push(format!("could not delete endpoint: {e}"));
        }
    }
    if let Some(p) = progress {
        p.abort();
        if std::io::stderr().is_terminal() {
            eprintln!();
        }
    }
    sink.shutdown();

    let groups = plan.groups();
    let group_of: Vec<usize> = plan
        .endpoints
        .iter()
        .map(|e| groups.iter().position(|g| *g == e.group).unwrap_or(0))
        .collect();
    let v = verify(&acks, &routing, sink.recorder(), &group_of, groups.len());
    let stats = sink.stats();
    let (first_send, last_ack) = counters.span_us().unwrap_or((0, 0));
    let ingest_seconds = (last_ack.saturating_sub(first_send)) as f64 / 1e6;
    let delivery_seconds = v.last_arrival_us.saturating_sub(first_send) as f64 / 1e6;
    let per_sec = |n: u64, secs: f64| if secs > 0.0 { n as f64 / secs } else { 0.0 };
    let raw_bytes = counters.raw_bytes.load(Relaxed);

    let group_reports = groups
        .iter()
        .enumerate()
        .map(|(gi, name)| {
            let members: Vec<usize> = (0..plan.endpoints.len()).filter(|e| group_of[*e] == gi).collect();
            let tally = &v.groups[gi];
            let mut g = GroupReport {
                name: name.to_string(),
                endpoints: members.len(),
                expected: tally.expected,
                delivered: tally.delivered,
                lost: tally.expected - tally.delivered,
                delivery_rate: per_sec(
                    tally.delivered,
                    tally.last_arrival_us.saturating_sub(first_send) as f64 / 1e6,
                ),
                ..GroupReport::default()
            };
            for m in members {
                let s = sink.endpoint_stats(m);
                g.requests += s.requests;
                g.answered_2xx += s.answered_2xx;
                g.answered_500 += s.answered_500;
                g.hung += s.hung;
            }
            g
        })
        .collect();

    let backlog = backlog.map(|(down, up_us, disk_before)| {
        let first = sink.recorder().arrival_span_us().map_or(up_us, |(f, _)| f);
        let drain_seconds = v.last_arrival_us.saturating_sub(up_us) as f64 / 1e6;
        BacklogReport {
            down_seconds: down.as_secs_f64(),
            first_delivery_after_up_seconds: first.saturating_sub(up_us) as f64 / 1e6,
            drain_seconds,
            drain_rate: per_sec(v.delivered, drain_seconds),
            disk_bytes_before_drain: disk_before,
            disk_bytes_after_drain: disk_after,
            raw_click_bytes: raw_bytes,
            disk_per_raw_byte: if raw_bytes > 0 {
                disk_before as f64 / raw_bytes as f64
            } else {
                0.0
            },
        }
    });

    let mut report = Report {
        scenario: options.scenario.to_string(),
        transport: options.transport.to_string(),
        connections,
        batch,
        rate_limit: options.rate,
        endpoints: plan.endpoints.len(),
        clicks_requested: clicks,
        clicks_sent: counters.sent.load(Relaxed),
        clicks_acknowledged: acks.len() as u64,
        clicks_rejected: counters.rejected.load(Relaxed),
        ingest_errors: counters.errors(),
        ingest_seconds,
        ingest_rate: per_sec(acks.len() as u64, ingest_seconds),
        raw_click_bytes: raw_bytes,
        expected_deliveries: v.expected,
        delivered: v.delivered,
        delivery_seconds,
        delivery_rate: per_sec(v.delivered, delivery_seconds),
        lost: v.lost,
        lost_samples: v.lost_samples.iter().map(|(e, id)| format!("{e}:{id}")).collect(),
        duplicates: sink.recorder().duplicates(),
        unexpected_ids: sink.recorder().distinct_ids().saturating_sub(v.matched_ids),
        misrouted: v.misrouted,
        client_id_mismatches: counters.client_id_mismatches.load(Relaxed),
        reused_ack_ids: v.reused_ids,
        bad_signatures: stats.bad_signatures,
        stale_timestamps: stats.stale_timestamps,
        latency: LatencySummary::from_micros(&v.latency),
        delivered_before_ack: v.before_ack,
        sink: stats,
        groups: group_reports,
        backlog,
        daemon: DaemonReport {
            pid,
            cpu_seconds: last_sample.map(|s| s.cpu_seconds),
            startup_cpu_seconds,
            peak_rss_bytes: last_sample.map(|s| s.peak_rss_bytes),
            outcome,
        },
        loadtest_cpu_seconds: procstat::sample(std::process::id()).map_or(0.0, |s| s.cpu_seconds),
        wall_seconds: wall.elapsed().as_secs_f64(),
        drain_timed_out,
        problems: Vec::new(),
        run_failures: failures,
        passed: false,
    };
    report.conclude();
    drop(workdir);
    Ok(report)
}

async fn progress_loop(
    scenario: Scenario,
    clock: Clock,
    counters: Arc<DriveCounters>,
    sink: Arc<Sink>,
    sampler: Option<Arc<Sampler>>,
    phase: Arc<AtomicU8>,
) {
    let tty = std::io::stderr().is_terminal();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.tick().await;
    let (mut last_acked, mut last_delivered) = (0u64, 0u64);
    loop {
        tick.tick().await;
        let acked = counters.acked.load(Relaxed);
        let delivered = sink.recorder().unique();
        let stats = sink.stats();
        let daemon = sampler.as_ref().and_then(|s| s.latest()).map_or(String::new(), |s| {
            format!("  daemon cpu {:.1}s rss {} MiB", s.cpu_seconds, s.rss_bytes >> 20)
        });
        let phase = match phase.load(Relaxed) {
            PHASE_START => "start",
            PHASE_INGEST => "ingest",
            PHASE_DRAIN => "drain",
            _ => "stop",
        };
        let line = format!(
            "{scenario} {:>5.0}s {phase:<6} acked {acked} (+{}/s)  delivered {delivered}/{} (+{}/s)  dup {}  badsig {}  500s {}{daemon}",
            clock.now_us() as f64 / 1e6,
            acked - last_acked,
            counters.expected_deliveries.load(Relaxed),
            delivered.saturating_sub(last_delivered),
            sink.recorder().duplicates(),
            stats.bad_signatures + stats.stale_timestamps,
            stats.answered_500,
        );
        if tty {
            eprint!("\r\x1b[2K{line}");
        } else {
            eprintln!("{line}");
        }
        (last_acked, last_delivered) = (acked, delivered);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn script(dir: &std::path::Path, body: &str) -> PathBuf {
        let path = dir.join("fake-clickhook");
        std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        path
    }

    fn quick(bin: PathBuf) -> ScenarioOptions {
        ScenarioOptions {
            clicks: Some(10),
            connections: Some(1),
            duration: Some(Duration::from_millis(800)),
            drain_timeout: Some(Duration::from_millis(500)),
            startup_timeout: Duration::from_secs(5),
            ..ScenarioOptions::new(Scenario::Throughput, bin)
        }
    }

    #[test]
    fn a_missing_binary_is_an_error() {
        let err = run(quick(PathBuf::from("/nonexistent/clickhook"))).unwrap_err();
        assert!(matches!(err, Error::Spawn { .. }), "{err}");
    }

    #[test]
    fn a_daemon_that_dies_at_start_shows_its_stderr() {
        let dir = tempfile::tempdir().unwrap();
        let bin = script(dir.path(), "echo 'config.toml: storage.path: broken' >&2; exit 2");
        let err = run(quick(bin)).unwrap_err().to_string();
        assert!(err.contains("storage.path: broken"), "{err}");
    }

    #[test]
    fn the_generated_config_is_what_the_daemon_is_given() {
        let dir = tempfile::tempdir().unwrap();
        let copy = dir.path().join("seen.toml");
        let bin = script(dir.path(), &format!("cp \"$3\" {}; exit 1", copy.display()));
        assert!(run(quick(bin)).is_err());
        let text = std::fs::read_to_string(copy).unwrap();
        assert!(text.contains("allow_private_networks = true"), "{text}");
        assert!(text.contains("url = \"http://127.0.0.1:"), "{text}");
    }

    #[test]
    fn a_daemon_that_never_acknowledges_fails_the_run_in_bounded_time() {
        let dir = tempfile::tempdir().unwrap();
        // Port 1 refuses connections: the driver retries until its deadline.
        let bin = script(
            dir.path(),
            "echo 'ready ingest_http=127.0.0.1:1 admin=127.0.0.1:2 unix=-'; exec sleep 30",
        );
        let started = Instant::now();
        let report = run(quick(bin)).unwrap();
        assert!(started.elapsed() < Duration::from_secs(10));
        assert!(!report.passed);
        assert_eq!(report.clicks_acknowledged, 0);
        assert!(
            report.ingest_errors.keys().any(|k| k.starts_with("connect")),
            "{:?}",
            report.ingest_errors
        );
        let outcome = report.daemon.outcome.clone().unwrap();
        assert!(
            !outcome.killed && outcome.exit_code.is_none(),
            "SIGTERM should have ended it: {outcome:?}"
        );
        assert!(report.render_text().contains("FAIL       no click was acknowledged"));
    }

    #[test]
    fn options_are_checked_before_anything_starts() {
        let bad = ScenarioOptions {
            batch: Some(0),
            ..quick(PathBuf::from("/nonexistent"))
        };
        assert!(matches!(run(bad), Err(Error::Options(_))));
        let bad = ScenarioOptions {
            fsync: Some("sometimes".into()),
            ..quick(PathBuf::from("/nonexistent"))
        };
        assert!(matches!(run(bad), Err(Error::Options(_))));
        for (scenario, endpoints) in [(Scenario::Throughput, 10), (Scenario::ManyEndpoints, 0)] {
            let bad = ScenarioOptions {
                scenario,
                endpoints: Some(endpoints),
                ..quick(PathBuf::from("/nonexistent"))
            };
            assert!(
                matches!(run(bad), Err(Error::Options(_))),
                "{scenario} with {endpoints} endpoints"
            );
        }
        let bad = ScenarioOptions {
            links: Some(0),
            ..quick(PathBuf::from("/nonexistent"))
        };
        assert!(matches!(run(bad), Err(Error::Options(_))));
        let bad = ScenarioOptions {
            transport: Transport::Unix,
            batch: Some(SOCKET_WINDOW + 1),
            ..quick(PathBuf::from("/nonexistent"))
        };
        assert!(
            matches!(run(bad), Err(Error::Options(_))),
            "a write past the socket's window"
        );
        assert_eq!("unix".parse::<Transport>(), Ok(Transport::Unix));
        assert!("tcp".parse::<Transport>().is_err());
    }
}
