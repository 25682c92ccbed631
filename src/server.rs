//! The daemon's wiring: opens the log, starts delivery, the listeners and the
//! housekeeping tasks, and runs the shutdown sequence of SPEC §2 (stop accepting, answer
//! what was received, let in-flight attempts finish, leave the rest durable). Library
//! first: [`bind`] then [`run`] with a control channel, so tests and `main` drive the
//! same code. It must not parse arguments, install signal handlers or exit the process.

use crate::admin::{self, AdminState};
use crate::config::{Config, ConfigError, OPERATIONS_ENDPOINT};
use crate::deliver::policy::RetrySchedule;
use crate::deliver::send::{AddressPolicy, ConnectionBudget};
use crate::deliver::{DeliverError, DeliveryPolicy, Dispatcher, WorkerEvent};
use crate::endpoints::{EndpointDefaults, EndpointError, EndpointRegistry};
use crate::enrich::Enricher;
use crate::ingest::http::HttpIngestSettings;
use crate::ingest::{http, unix, IngestGate, Ingestor};
use crate::log::{now_ms, ClickLog, LogError, SledLog};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{mpsc, oneshot, watch};

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    // Causes are in the messages, not `source`s, so `{:#}` does not print them twice.
    #[error("cannot listen on {what} {addr}: {cause}")]
    Bind {
        what: &'static str,
        addr: String,
        cause: std::io::Error,
    },
    #[error("cannot open the log at {path}: {cause}")]
    Log { path: String, cause: LogError },
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Endpoint(#[from] EndpointError),
    #[error(transparent)]
    Deliver(#[from] DeliverError),
    #[error(transparent)]
    Enrich(#[from] crate::enrich::EnrichError),
    #[error("the admin listener's start-up server stopped: {0}")]
    Admin(String),
    #[error("the log's last writes as it closed failed (the next start recovers as after a crash): {0}")]
    Close(LogError),
    #[error("stopped to reopen the log, which takes no writes after a failed write though its disk has room again ({0}); start clickhook again (systemd's Restart=on-failure does)")]
    LogNeedsRestart(String),
}

/// The daemon's listening sockets, bound before anything else starts so that bind errors
/// come first and tests can use port 0.
pub struct Listeners {
    pub http: TcpListener,
    pub admin: TcpListener,
    pub unix: Option<(UnixListener, PathBuf)>,
}

impl Listeners {
    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.http.local_addr().ok()
    }
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.local_addr().ok()
    }
}

/// What the process asks of a running daemon.
#[derive(Debug)]
pub enum Control {
    /// Re-read `[[endpoints]]` from the config file (SIGHUP).
    Reload,
    /// Drain and stop (SIGTERM, SIGINT).
    Shutdown,
}

pub async fn bind(config: &Config) -> Result<Listeners, ServerError> {
    let bind_tcp = |what: &'static str, addr: &str| {
        let addr = addr.to_string();
        async move {
            TcpListener::bind(&addr).await.map_err(|cause| ServerError::Bind {
                what,
                addr: addr.clone(),
                cause,
            })
        }
    };
    let http = bind_tcp("ingest.http.listen", &config.ingest.http.listen).await?;
    let admin = bind_tcp("admin.listen", &config.admin.listen).await?;
    let unix = if config.ingest.unix.path.is_empty() {
        None
    } else {
        let path = config.resolve(Path::new(&config.ingest.unix.path));
        Some((bind_unix(&path, config)?, path))
    };
    Ok(Listeners { http, admin, unix })
}

fn bind_unix(path: &Path, config: &Config) -> Result<UnixListener, ServerError> {
    use std::os::unix::fs::PermissionsExt;
    let err = |cause| ServerError::Bind {
        what: "ingest.unix.path",
        addr: path.display().to_string(),
        cause,
    };
    // A socket file left by a previous run that nobody listens on any more is removed;
    // one somebody still answers on is refused, so two daemons never share it. Anything
    // else there (a path set to a data file by mistake) is left alone and refused.
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        use std::os::unix::fs::FileTypeExt;
        if !meta.file_type().is_socket() {
            return Err(err(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                "something that is not a socket is there; it is left as it is",
            )));
        }
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(err(std::io::Error::new(
                std::io::ErrorKind::AddrInUse,
                "another process listens there",
            )));
        }
        std::fs::remove_file(path).map_err(err)?;
    }
    let listener = UnixListener::bind(path).map_err(err)?;
    let mode = config.socket_mode().unwrap_or(0o660);
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(err)?;
    Ok(listener)
}

/// The config file read again for a reload, off the runtime: checking each endpoint's URL
/// resolves its host, which blocks for as long as DNS takes.
async fn reread(path: &Path, running: &Config) -> Result<(Config, Vec<&'static str>), ConfigError> {
    let (file, running) = (path.to_path_buf(), running.clone());
    tokio::task::spawn_blocking(move || Config::load_for_reload(&file, &running))
        .await
        .unwrap_or_else(|e| {
            // A panic in the check (none is known) leaves the endpoints as they are.
            Err(ConfigError::Parse {
                file: path.display().to_string(),
                message: format!("the reload's check stopped: {e}"),
            })
        })
}

/// Runs the daemon on bound listeners until [`Control::Shutdown`] (or the channel
/// closes). On return everything acknowledged is durable in the log.
pub async fn run(
    config: Config,
    listeners: Listeners,
    mut control: mpsc::Receiver<Control>,
) -> Result<(), ServerError> {
    let http_addr = listeners.http_addr();
    let admin_addr = listeners.admin_addr();
    // Probes get answers while the log recovers, which can take a while on a big one.
    let (started, started_rx) = oneshot::channel();
    let starting = tokio::spawn(admin::serve_starting(listeners.admin, started_rx));
    let metrics = crate::metrics::install();
    crate::metrics::set_endpoint_series_cap(config.metrics.max_endpoint_series);
    // A configured GeoIP database that is none stops the start (one that cannot be read
    // stopped it as a config error): silently running without it would send clicks
    // without the geography the operator asked for.
    let enricher = match &config.enrich.geoip {
        Some(path) => Enricher::with_geoip(&config.resolve(path))?,
        None => Enricher::new(),
    };
    let data_dir = config.resolve(&config.storage.path);
    let log = SledLog::open(
        &data_dir,
        crate::log::sled_log_options(
            config.storage.fsync,
            config.storage.fsync_interval.0,
            config.storage.cache_capacity.0,
        ),
    )
    .map_err(|cause| ServerError::Log {
        path: data_dir.display().to_string(),
        cause,
    })?;
    let sled_log = log.clone();
    let log: Arc<dyn ClickLog> = log;

    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let (delivery_stop_tx, delivery_stop_rx) = watch::channel(false);
    let (worker_events_tx, mut worker_events) = mpsc::unbounded_channel();
    let connections = match config.delivery.max_connections {
        0 => ConnectionBudget::from_file_limit(),
        n => ConnectionBudget::new(n),
    };
    tracing::info!(connections = connections.available(), "outbound connection budget");
    let policy = DeliveryPolicy {
        schedule: Arc::new(RetrySchedule {
            steps: config.retry.schedule.iter().map(|d| d.0).collect(),
            jitter: config.retry.jitter,
        }),
        breaker_failures: config.breaker.failures,
        breaker_cooldown: config.breaker.cooldown.0,
        addresses: AddressPolicy {
            allow_private: config.delivery.allow_private_networks,
            allowed: Arc::new(config.allowed_cidrs()?),
        },
        connections: connections.clone(),
        per_receiver: config.delivery.max_in_flight_per_receiver,
        failing_after: config.operations.failing_after,
        disable_after: config.operations.disable_after.0,
    };
    let dispatcher = Dispatcher::new(
        config.shard_count(),
        log.clone(),
        policy,
        delivery_stop_rx,
        worker_events_tx,
    )?;
    let registry = EndpointRegistry::new(
        log.clone(),
        dispatcher,
        EndpointDefaults {
            timeout: config.delivery.timeout.0,
            max_concurrency: config.delivery.max_concurrency,
        },
    );
    registry.apply_config(&config.endpoints).await?;
    if let Some(ops) = config.operations_endpoint() {
        registry.start_operations(&ops).await?;
    }
    registry.load_api_endpoints().await?;

    let gate = Arc::new(IngestGate::default());
    let ingestor = Arc::new(Ingestor::new(
        log.clone(),
        registry.clone(),
        Arc::new(enricher),
        gate.clone(),
    ));
    let admin_state = Arc::new(AdminState {
        registry: registry.clone(),
        metrics: metrics.clone(),
        ready: false.into(),
        token: config.admin.token.clone(),
        connections,
        addresses: AddressPolicy {
            allow_private: config.delivery.allow_private_networks,
            allowed: Arc::new(config.allowed_cidrs()?),
        },
    });

    let unix_path = listeners.unix.as_ref().map(|(_, p)| p.clone());
    let max_body = config.ingest.http.max_body.0 as usize;
    let http_task = tokio::spawn(http::serve(
        listeners.http,
        ingestor.clone(),
        HttpIngestSettings {
            max_body,
            tokens: config.ingest.http.tokens.clone(),
            body_budget: crate::ingest::ByteBudget::for_max_body(max_body),
        },
        shutdown_rx.clone(),
    ));
    let unix_task = listeners
        .unix
        .map(|(l, _)| tokio::spawn(unix::serve(l, ingestor.clone(), max_body, shutdown_rx.clone())));
    let (admin_stop_tx, admin_stop_rx) = watch::channel(false);
    let _ = started.send(());
    let admin_listener = starting.await.map_err(|e| ServerError::Admin(e.to_string()))?;
    let admin_task = tokio::spawn(admin::serve(admin_listener, admin_state.clone(), admin_stop_rx));

    // Housekeeping's word that the log needs reopening, which a restart does.
    let (stuck_tx, mut stuck_rx) = mpsc::channel::<String>(1);
    let housekeeping = tokio::spawn(housekeeping(
        sled_log.clone(),
        metrics,
        data_dir.clone(),
        StorageLimits {
            max_bytes: config.storage.max_bytes.0,
            min_free: config.storage.min_free.0,
            retention: config.storage.retention.0,
        },
        gate.clone(),
        stuck_tx,
        shutdown_rx.clone(),
    ));
    {
        let registry = registry.clone();
        tokio::spawn(async move {
            let mut taken = Vec::new();
            // Each operational event is a durable append; taking what queued meanwhile
            // and folding dead letters together keeps this loop up with a storm of them
            // (a backlog reaching the end of its retries), so the channel stays short.
            while worker_events.recv_many(&mut taken, WORKER_EVENTS_PER_TURN).await > 0 {
                for event in coalesce_dead_letters(taken.drain(..)) {
                    handle_worker_event(&registry, event).await;
                }
            }
        });
    }

    admin_state.ready.store(true, Ordering::SeqCst);
    // systemd (Type=notify): ready only now that the log is recovered and listeners are up.
    // Without NOTIFY_SOCKET these calls do nothing.
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);
    let watchdog = start_watchdog(shutdown_rx.clone());
    tracing::info!(ingest_http = ?http_addr, admin = ?admin_addr, unix = ?unix_path, fsync = ?config.storage.fsync, "clickhook ready");
    println!(
        "ready ingest_http={} admin={} unix={}",
        http_addr.map(|a| a.to_string()).unwrap_or_default(),
        admin_addr.map(|a| a.to_string()).unwrap_or_default(),
        unix_path
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| "-".into())
    );

    let config_file = config.file.clone();
    let mut stuck = None;
    loop {
        let msg = tokio::select! {
            msg = control.recv() => msg,
            Some(why) = stuck_rx.recv() => {
                stuck = Some(why);
                break;
            }
        };
        match msg {
            None | Some(Control::Shutdown) => break,
            Some(Control::Reload) => match reread(&config_file, &config).await {
                Ok((fresh, waiting)) => {
                    if !waiting.is_empty() {
                        tracing::warn!(
                            sections = %waiting.join(", "),
                            "a reload applies [[endpoints]] only; the file's changes to these sections take effect at the next start"
                        );
                    }
                    match registry.apply_config(&fresh.endpoints).await {
                        Ok(()) => tracing::info!(endpoints = fresh.endpoints.len(), "endpoints reloaded"),
                        Err(e) => tracing::error!(error = %e, "reload refused; the old endpoints stay in force"),
                    }
                }
                Err(e) => tracing::error!(error = %e, "reload refused; the old config stays in force"),
            },
        }
    }

    // Drain: refuse new work, answer what was received, then let delivery finish the
    // attempts in flight; everything else stays queued in the log for the next start.
    tracing::info!("shutting down");
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
    admin_state.ready.store(false, Ordering::SeqCst);
    gate.shutting_down.store(true, Ordering::SeqCst);
    let _ = shutdown_tx.send(true);
    let _ = http_task.await;
    if let Some(t) = unix_task {
        let _ = t.await;
    }
    let _ = delivery_stop_tx.send(true);
    registry.shutdown().await;
    let _ = housekeeping.await;
    if let Some(w) = watchdog {
        let _ = w.await;
    }
    // What the close could not write is said by the log; the exit code says it too, so
    // the service manager counts the stop as a failure (and restarts a stuck log).
    let closed = match log.close().await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(ServerError::Close(e)),
        Err(_) => Err(ServerError::Close(LogError::Storage(
            "the log's writer stopped without answering the close".into(),
        ))),
    };
    let _ = admin_stop_tx.send(true);
    let _ = admin_task.await;
    if let Some(p) = unix_path {
        let _ = std::fs::remove_file(p);
    }
    tracing::info!("stopped");
    match stuck {
        Some(why) => Err(ServerError::LogNeedsRestart(why)),
        None => closed,
    }
}

/// Worker reports taken from the channel at once.
const WORKER_EVENTS_PER_TURN: usize = 4096;

/// Event ids in one `endpoint.dead_letter` operational event at most.
const DEAD_LETTER_IDS_PER_EVENT: usize = 1000;

/// Folds each dead-letter report into the endpoint's latest one when both carry the same
/// last error, in events of at most [`DEAD_LETTER_IDS_PER_EVENT`] ids. Only an endpoint's
/// latest report takes more, and any other kind of report from it is a fence, so each
/// endpoint's reports keep their order.
fn coalesce_dead_letters(events: impl IntoIterator<Item = WorkerEvent>) -> Vec<WorkerEvent> {
    let mut out: Vec<WorkerEvent> = Vec::new();
    let mut latest: std::collections::HashMap<String, usize> = std::collections::HashMap::new();
    for event in events {
        let WorkerEvent::DeadLetter {
            endpoint,
            event_ids,
            last_error,
        } = event
        else {
            latest.remove(event.endpoint());
            out.push(event);
            continue;
        };
        let mut ids = event_ids.into_iter().peekable();
        loop {
            let takes_more = |report: &WorkerEvent| {
                matches!(report, WorkerEvent::DeadLetter { event_ids, last_error: error, .. }
                    if *error == last_error && event_ids.len() < DEAD_LETTER_IDS_PER_EVENT)
            };
            let at = match latest.get(&endpoint) {
                Some(&at) if takes_more(&out[at]) => at,
                _ => {
                    latest.insert(endpoint.clone(), out.len());
                    out.push(WorkerEvent::DeadLetter {
                        endpoint: endpoint.clone(),
                        event_ids: Vec::new(),
                        last_error: last_error.clone(),
                    });
                    out.len() - 1
                }
            };
            if let WorkerEvent::DeadLetter { event_ids: into, .. } = &mut out[at] {
                let room = DEAD_LETTER_IDS_PER_EVENT - into.len();
                into.extend(ids.by_ref().take(room));
            }
            if ids.peek().is_none() {
                break;
            }
        }
    }
    out
}

/// Acts on what a worker reported: disables endpoints, and tells the operator through
/// operational events. The operations endpoint reports nothing about itself (no loops).
async fn handle_worker_event(registry: &EndpointRegistry, event: WorkerEvent) {
    use serde_json::json;
    let disable = |endpoint: String, reason: &'static str| async move {
        if let Err(e) = registry.disable(&endpoint, reason).await {
            tracing::error!(endpoint = %endpoint, error = %e, "cannot disable the endpoint");
        }
        registry
            .emit_operational("endpoint.disabled", json!({"endpoint": endpoint, "reason": reason}))
            .await;
    };
    if event.endpoint() == OPERATIONS_ENDPOINT {
        // Its own troubles are not operational events: they would queue behind themselves.
        if matches!(event, WorkerEvent::Gone { .. } | WorkerEvent::FailingTooLong { .. }) {
            tracing::error!("the operations endpoint is gone or failing; operational events wait in its queue");
        }
        return;
    }
    match event {
        WorkerEvent::Gone { endpoint } => disable(endpoint, "gone").await,
        WorkerEvent::FailingTooLong { endpoint } => disable(endpoint, "failing").await,
        WorkerEvent::Failing {
            endpoint,
            consecutive,
            last_error,
        } => {
            let data = json!({"endpoint": endpoint, "consecutive_failures": consecutive, "last_error": last_error});
            registry.emit_operational("endpoint.failing", data).await;
        }
        WorkerEvent::Recovered { endpoint } => {
            registry
                .emit_operational("endpoint.recovered", json!({ "endpoint": endpoint }))
                .await;
        }
        WorkerEvent::DeadLetter {
            endpoint,
            event_ids,
            last_error,
        } => {
            let data = json!({"endpoint": endpoint, "event_ids": event_ids, "last_error": last_error});
            registry.emit_operational("endpoint.dead_letter", data).await;
        }
    }
}

/// Pings systemd's watchdog at half its interval while the runtime is alive to do it, so a
/// wedged daemon is restarted.
fn start_watchdog(mut shutdown: watch::Receiver<bool>) -> Option<tokio::task::JoinHandle<()>> {
    let mut usec = 0u64;
    if !sd_notify::watchdog_enabled(false, &mut usec) || usec == 0 {
        return None;
    }
    let every = Duration::from_micros(usec / 2);
    Some(tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Watchdog]);
                }
                _ = shutdown.changed() => return,
            }
        }
    }))
}

/// How long the disk must keep room before a log that needs reopening stops the daemon
/// for it: a disk freed for a moment is not worth a restart.
const REOPEN_AFTER_ROOM: Duration = Duration::from_secs(5);

/// The least free space in which a log that needs reopening is worth a restart (or
/// `min_free`, if more): less, and the first writes after the start would fail again.
const ROOM_TO_REOPEN: u64 = 16 << 20;

/// What closes ingest for storage, and how long delivered events stay: the `[storage]`
/// keys of the same names.
#[derive(Debug, Clone, Copy)]
struct StorageLimits {
    max_bytes: u64,
    min_free: u64,
    retention: Duration,
}

/// Once a second: measure the storage directory against `max_bytes` and its filesystem's
/// free space against `min_free` (ingest answers 503 past either), and publish the log
/// gauges (when the whole directory could be measured). Prune past retention once a
/// minute, or every half retention when that is shorter.
async fn housekeeping(
    log: Arc<SledLog>,
    metrics: metrics_exporter_prometheus::PrometheusHandle,
    dir: PathBuf,
    limits: StorageLimits,
    gate: Arc<IngestGate>,
    stuck: mpsc::Sender<String>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut room_since: Option<Instant> = None;
    let mut n: u64 = 0;
    let mut measure_failing = false;
    let mut free_unknown = false;
    let prune_every = (limits.retention.as_secs() / 2).clamp(1, 60);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.changed() => return,
        }
        let (dir2, log2) = (dir.clone(), log.clone());
        let ((bytes, error), free, reopen) = tokio::task::spawn_blocking(move || {
            // A log that needs reopening is worth a restart only on a disk that takes
            // writes again: not a read-only or failing one, where the start would fail.
            let reopen = log2.needs_reopen().map(|why| (why, takes_writes(&dir2)));
            (dir_size(&dir2), free_space(&dir2), reopen)
        })
        .await
        .unwrap_or_else(|join| {
            let e = join.to_string();
            (
                (0, Some(std::io::Error::other(e.clone()))),
                Err(std::io::Error::other(e)),
                None,
            )
        });
        apply_storage_budget(&gate, bytes, error.is_none(), limits.max_bytes);
        apply_free_space(&gate, &free, limits.min_free, &mut free_unknown);
        if let Some((why, writable)) = reopen {
            let room = writable && free.as_ref().is_ok_and(|&f| f >= limits.min_free.max(ROOM_TO_REOPEN));
            if !room {
                room_since = None;
            } else if room_since.get_or_insert_with(Instant::now).elapsed() >= REOPEN_AFTER_ROOM {
                tracing::error!(error = %why, "the log takes no writes since a failed write, and its disk has room again: stopping, to be started again on a reopened log");
                let _ = stuck.try_send(why);
                // The daemon shuts down; nothing more to look after.
                let _ = shutdown.changed().await;
                return;
            }
        }
        match error {
            None => {
                measure_failing = false;
                crate::metrics::log_gauges(log.event_count(), bytes);
            }
            Some(e) => {
                // Reading the unreadable as 0 would open the gate on a full disk.
                if !measure_failing {
                    tracing::warn!(error = %e, dir = %dir.display(), bytes, "cannot measure all of the storage directory; storage.max_bytes goes by what was read, and holds its last verdict while that is under it");
                }
                measure_failing = true;
            }
        }
        // Histogram samples pile up in the recorder until an upkeep folds them into their
        // buckets, and a scrape is not guaranteed: without this, an unscraped daemon grew
        // by some 50 MiB over a million deliveries.
        metrics.run_upkeep();
        n += 1;
        if n % prune_every == 0 {
            match log.prune(now_ms(), limits.retention.as_millis() as u64).await {
                Ok(Ok(pruned)) if pruned > 0 => tracing::info!(pruned, "pruned delivered events past retention"),
                Ok(Err(e)) => tracing::warn!(error = %e, "pruning failed"),
                Ok(Ok(_)) => {}
                Err(_) => tracing::warn!("pruning got no answer (its thread could not start, or the log closed)"),
            }
        }
    }
}

/// Whether ingest must stay closed for storage, from a size measured in full
/// (`complete`) or only in part. A partial size is a lower bound: it can say "over" but
/// not "under", so short of over it keeps the last verdict.
fn over_budget_after(was_over: bool, bytes: u64, complete: bool, max_bytes: u64) -> bool {
    bytes > max_bytes || (!complete && was_over)
}

/// Whether ingest must stay closed for the free space of the log's disk: under
/// `min_free`, and once closed, until an eighth more, so a disk that hovers at the line
/// does not toggle it every second.
fn low_on_disk_after(was_low: bool, free: u64, min_free: u64) -> bool {
    let line = if was_low {
        min_free.saturating_add(min_free / 8)
    } else {
        min_free
    };
    free < line
}

/// Sets one of the gate's storage flags to what `decide` makes of its value; `Some` of
/// the new value when it changed. Housekeeping alone writes these flags, so what it read
/// is what it changes.
fn update_flag(flag: &AtomicBool, decide: impl FnOnce(bool) -> bool) -> Option<bool> {
    let was = flag.load(Ordering::Relaxed);
    let now = decide(was);
    flag.store(now, Ordering::Relaxed);
    (now != was).then_some(now)
}

/// Closes or opens ingest on a measured storage size, logging each change once.
fn apply_storage_budget(gate: &IngestGate, bytes: u64, complete: bool, max_bytes: u64) {
    match update_flag(&gate.over_budget, |was| {
        over_budget_after(was, bytes, complete, max_bytes)
    }) {
        Some(true) => tracing::warn!(
            bytes,
            max_bytes,
            "storage over storage.max_bytes: ingest answers 503 until delivery frees space"
        ),
        Some(false) => tracing::info!(bytes, "storage back under storage.max_bytes: ingest resumes"),
        None => {}
    }
}

/// Closes or opens ingest on the free space of the log's filesystem
/// ([`low_on_disk_after`]), logging each change once. A space that cannot be read keeps
/// the last verdict (with a warning, once).
fn apply_free_space(gate: &IngestGate, free: &std::io::Result<u64>, min_free: u64, unknown: &mut bool) {
    let free = match free {
        Ok(free) => {
            *unknown = false;
            *free
        }
        Err(e) => {
            if !*unknown {
                tracing::warn!(error = %e, "cannot read the free space of the log's disk; storage.min_free keeps its last verdict");
            }
            *unknown = true;
            return;
        }
    };
    match update_flag(&gate.low_on_disk, |was| low_on_disk_after(was, free, min_free)) {
        Some(true) => tracing::warn!(
            free,
            min_free,
            "the log's disk has less than storage.min_free free: ingest answers 503 until it has that again"
        ),
        Some(false) => tracing::info!(free, "the log's disk has storage.min_free free again: ingest resumes"),
        None => {}
    }
}

/// Whether a file can be written, synced and removed in `dir`: what a restart's log
/// needs of its disk beyond free space (a read-only or failing one fails here).
fn takes_writes(dir: &Path) -> bool {
    use std::io::Write;
    let probe = dir.join(".clickhook-write-probe");
    let written = std::fs::File::create(&probe).and_then(|mut f| {
        f.write_all(b"probe")?;
        f.sync_all()
    });
    let removed = std::fs::remove_file(&probe);
    written.is_ok() && removed.is_ok()
}

/// Bytes an unprivileged writer may still put on the filesystem holding `path`.
fn free_space(path: &Path) -> std::io::Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes())?;
    let mut stats = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: `c_path` is a NUL-terminated string and `stats` a buffer of the type
    // statvfs fills; it is read only after statvfs reported success.
    let stats = unsafe {
        if libc::statvfs(c_path.as_ptr(), stats.as_mut_ptr()) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        stats.assume_init()
    };
    Ok((stats.f_bavail as u64).saturating_mul(stats.f_frsize as u64))
}

/// The on-disk size of a directory tree, in bytes, as far as it could be read, and the
/// first error that kept part of it out. Entries that vanish while it walks (sled removes
/// files as it compacts) count as nothing and are no error.
fn dir_size(path: &Path) -> (u64, Option<std::io::Error>) {
    let mut first_error = None;
    let bytes = match std::fs::read_dir(path) {
        Ok(entries) => dir_entries_size(entries, &mut first_error),
        // The tree itself must be there: its absence is an error, not a size of 0.
        Err(e) => {
            first_error = Some(e);
            0
        }
    };
    (bytes, first_error)
}

fn dir_entries_size(entries: std::fs::ReadDir, first_error: &mut Option<std::io::Error>) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let mut total = 0;
    for entry in entries {
        let read = entry.and_then(|entry| {
            let meta = entry.metadata()?;
            let below = if meta.is_dir() {
                Some(std::fs::read_dir(entry.path())?)
            } else {
                None
            };
            Ok((meta, below))
        });
        match read {
            Ok((_, Some(below))) => total += dir_entries_size(below, first_error),
            // Allocated blocks, not apparent length: sparse files count as what they use.
            Ok((meta, None)) => total += meta.blocks() * 512,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                first_error.get_or_insert(e);
            }
        }
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dir_size_counts_nested_files_and_refuses_to_guess_about_a_missing_tree() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        std::fs::write(dir.path().join("a"), vec![1u8; 10_000]).unwrap();
        std::fs::write(dir.path().join("sub/b"), vec![1u8; 20_000]).unwrap();
        let (size, error) = dir_size(dir.path());
        assert!(error.is_none(), "{error:?}");
        assert!(size >= 30_000, "both files count, the nested one too: {size}");
        // The tree's own absence is an error, not 0: 0 would read as "far under
        // max_bytes" and open ingest on a disk nobody measured.
        assert!(dir_size(&dir.path().join("missing")).1.is_some());
    }

    #[test]
    fn a_directory_takes_writes_unless_it_cannot_hold_a_file() {
        let dir = tempfile::tempdir().unwrap();
        assert!(takes_writes(dir.path()));
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            0,
            "the probe file is gone"
        );
        assert!(!takes_writes(&dir.path().join("missing")));
        // procfs takes no new files, whoever asks (root too).
        assert!(!takes_writes(Path::new("/proc")));
    }

    #[test]
    fn free_space_is_read_from_the_filesystem_and_a_missing_path_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        assert!(free_space(dir.path()).unwrap() > 0);
        assert!(free_space(&dir.path().join("missing")).is_err());
    }

    #[test]
    fn ingest_closes_under_min_free_reopens_over_it_and_keeps_its_verdict_when_unread() {
        let gate = IngestGate::default();
        let mut unknown = false;
        apply_free_space(&gate, &Ok(100), 1_000, &mut unknown);
        assert!(gate.check().is_err_and(|e| e.to_string().contains("storage.min_free")));
        let unreadable = Err(std::io::Error::other("gone"));
        apply_free_space(&gate, &unreadable, 1_000, &mut unknown);
        assert!(unknown && gate.check().is_err(), "an unread space opens nothing");
        apply_free_space(&gate, &Ok(1_000), 1_000, &mut unknown);
        assert!(
            !unknown && gate.check().is_err(),
            "closed, it opens only at an eighth more"
        );
        apply_free_space(&gate, &Ok(1_125), 1_000, &mut unknown);
        assert!(gate.check().is_ok());
        apply_free_space(&gate, &Ok(1_000), 1_000, &mut unknown);
        assert!(gate.check().is_ok(), "open, min_free free is enough");
        apply_free_space(&gate, &unreadable, 1_000, &mut unknown);
        assert!(gate.check().is_ok(), "an unread space closes nothing");
    }

    fn dead(endpoint: &str, ids: &[&str], error: &str) -> WorkerEvent {
        WorkerEvent::DeadLetter {
            endpoint: endpoint.into(),
            event_ids: ids.iter().map(|s| s.to_string()).collect(),
            last_error: Some(error.into()),
        }
    }

    fn summary(events: &[WorkerEvent]) -> Vec<String> {
        events
            .iter()
            .map(|e| match e {
                WorkerEvent::DeadLetter {
                    endpoint,
                    event_ids,
                    last_error,
                } => format!(
                    "{endpoint} dead {} {}",
                    event_ids.join(","),
                    last_error.as_deref().unwrap_or("")
                ),
                WorkerEvent::Recovered { endpoint } => format!("{endpoint} recovered"),
                _ => "other".into(),
            })
            .collect()
    }

    /// The number of event ids in each report.
    fn id_counts(events: &[WorkerEvent]) -> Vec<usize> {
        events
            .iter()
            .map(|e| match e {
                WorkerEvent::DeadLetter { event_ids, .. } => event_ids.len(),
                _ => 0,
            })
            .collect()
    }

    #[test]
    fn dead_letter_reports_fold_per_endpoint_and_error_without_crossing_other_reports() {
        let events = vec![
            dead("a", &["1"], "500"),
            dead("b", &["2"], "500"),
            dead("a", &["3", "4"], "500"),
            dead("a", &["5"], "timeout"),
            WorkerEvent::Recovered { endpoint: "a".into() },
            dead("a", &["6"], "500"),
        ];
        assert_eq!(
            summary(&coalesce_dead_letters(events)),
            [
                "a dead 1,3,4 500",
                "b dead 2 500",
                "a dead 5 timeout",
                "a recovered",
                "a dead 6 500"
            ]
        );
        // A storm folds into events of at most DEAD_LETTER_IDS_PER_EVENT ids, none lost.
        let storm: Vec<WorkerEvent> = (0..2500).map(|i| dead("a", &[&i.to_string()], "500")).collect();
        assert_eq!(id_counts(&coalesce_dead_letters(storm)), [1000, 1000, 500]);
        // A single report over the bound (a large batch) is split too.
        let ids: Vec<String> = (0..1500).map(|i| i.to_string()).collect();
        let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
        let folded = coalesce_dead_letters(vec![dead("a", &["x"], "500"), dead("a", &ids, "500")]);
        assert_eq!(id_counts(&folded), [1000, 501]);
        // Another endpoint's report is no fence for this one's letters.
        let events = vec![
            dead("a", &["1"], "500"),
            WorkerEvent::Recovered { endpoint: "b".into() },
            dead("a", &["2"], "500"),
        ];
        assert_eq!(
            summary(&coalesce_dead_letters(events)),
            ["a dead 1,2 500", "b recovered"]
        );
        // An endpoint's letters fold only into its latest report: 7 comes after 5's
        // timeout, so it cannot join 1 ahead of it.
        let events = vec![
            dead("a", &["1"], "500"),
            dead("a", &["5"], "timeout"),
            dead("a", &["7"], "500"),
        ];
        assert_eq!(
            summary(&coalesce_dead_letters(events)),
            ["a dead 1 500", "a dead 5 timeout", "a dead 7 500"]
        );
    }

    #[test]
    fn a_storage_size_measured_in_part_can_close_ingest_but_never_open_it() {
        // Measured in full: the size decides.
        assert!(over_budget_after(false, 2_000, true, 1_000));
        assert!(
            !over_budget_after(true, 1_000, true, 1_000),
            "at the budget is not over it"
        );
        // In part: over is over, and under keeps the last verdict either way.
        assert!(over_budget_after(false, 2_000, false, 1_000));
        assert!(over_budget_after(true, 10, false, 1_000));
        assert!(!over_budget_after(false, 10, false, 1_000));
        let gate = IngestGate::default();
        apply_storage_budget(&gate, 2_000, true, 1_000);
        assert!(gate.over_budget.load(Ordering::Relaxed));
        apply_storage_budget(&gate, 0, false, 1_000);
        assert!(
            gate.over_budget.load(Ordering::Relaxed),
            "an unreadable tree is not an empty one"
        );
    }
}
