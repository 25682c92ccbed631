//! Configuration: reads `config.toml` (SPEC §2) into typed settings and validates it with
//! errors that name the file, the key and why. It owns defaults and the parsing of
//! duration and size strings. It must not open sockets, touch storage or start anything:
//! a `Config` is inert data that `check-config` can print judgement on.

use crate::deliver::format::Format;
use ipnet::IpNet;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    // The cause is in the message, not a `source`: reloads log it with `%`, and the
    // binary's `{:#}` would print it twice.
    #[error("{file}: cannot read: {cause}")]
    Read { file: String, cause: std::io::Error },
    #[error("{file}: {message}")]
    Parse { file: String, message: String },
    /// `line` is where the file sets `key`, or the table around it, when it does.
    #[error("{file}: {}{key}: {why}", at_line(*.line))]
    Invalid {
        file: String,
        line: Option<usize>,
        key: String,
        why: String,
    },
}

fn at_line(line: Option<usize>) -> String {
    line.map(|n| format!("line {n}: ")).unwrap_or_default()
}

impl ConfigError {
    fn invalid(file: &Path, key: impl Into<String>, why: impl Into<String>) -> Self {
        ConfigError::Invalid {
            file: file.display().to_string(),
            line: None,
            key: key.into(),
            why: why.into(),
        }
    }

    /// Gives an [`ConfigError::Invalid`] from checks made after parsing the line of `text`
    /// that sets its key.
    fn placed_in(self, text: &str) -> Self {
        match self {
            ConfigError::Invalid {
                file,
                line: None,
                key,
                why,
            } => ConfigError::Invalid {
                file,
                line: line_of_key(text, &key),
                key,
                why,
            },
            other => other,
        }
    }
}

/// The line on which `text` sets `key` (`endpoints[2].url`), or else the nearest table
/// around it that it writes out; `None` when the value is a default.
fn line_of_key(text: &str, key: &str) -> Option<usize> {
    let doc = toml_edit::ImDocument::parse(text).ok()?;
    let mut item = doc.as_item();
    let mut span = None;
    for part in key.split(['.', '[']) {
        let part = part.trim_end_matches(']');
        let next = match part.parse::<usize>() {
            Ok(i) => item.get(i),
            Err(_) => item.get(part),
        };
        let Some(next) = next else { break };
        item = next;
        span = next.span().or(span);
    }
    let start = span?.start;
    Some(text.get(..start)?.matches('\n').count() + 1)
}

/// The id of the internal endpoint that carries operational events.
pub const OPERATIONS_ENDPOINT: &str = "_operations";

/// A duration written as a string (`"250ms"`, `"5s"`, `"7d"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct HumanDuration(pub Duration);

/// The longest duration any setting takes: longer ones overflow the clock arithmetic of
/// timers and deadlines, and no retry, timeout or retention needs them.
const MAX_DURATION: Duration = Duration::from_secs(100 * 365 * 86_400);

impl HumanDuration {
    pub fn parse(text: &str) -> Result<Self, String> {
        let d = humantime::parse_duration(text.trim())
            .map_err(|e| format!("{text:?} is not a duration like \"250ms\", \"5s\" or \"7d\": {e}"))?;
        if d > MAX_DURATION {
            return Err(format!("{text:?} is longer than 100 years"));
        }
        Ok(HumanDuration(d))
    }
}

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        HumanDuration::parse(&text).map_err(serde::de::Error::custom)
    }
}

impl Serialize for HumanDuration {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(self.0).to_string())
    }
}

/// A size written as a string (`"8MiB"`, `"10GiB"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HumanSize(pub u64);

impl<'de> Deserialize<'de> for HumanSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        text.trim()
            .parse::<bytesize::ByteSize>()
            .map(|b| HumanSize(b.as_u64()))
            .map_err(|e| serde::de::Error::custom(format!("{text:?} is not a size like \"8MiB\" or \"10GiB\": {e}")))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum FsyncMode {
    #[default]
    Always,
    Interval,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct StorageConfig {
    pub path: PathBuf,
    pub fsync: FsyncMode,
    pub fsync_interval: HumanDuration,
    pub max_bytes: HumanSize,
    /// Ingest answers 503 while the log's filesystem has less than this free: a disk that
    /// fills under sled stops it writing until a restart, where a 503 clears by itself.
    pub min_free: HumanSize,
    pub retention: HumanDuration,
    /// sled's page cache; kept small because sled's RSS runs well above it. It holds
    /// pointers, route records and queue runs, not event bodies: 16 MiB took 14 MiB off
    /// the backlog's peak RSS against 32 MiB at the same rates (BENCHMARKS.md).
    pub cache_capacity: HumanSize,
}

impl Default for StorageConfig {
    fn default() -> Self {
        StorageConfig {
            path: PathBuf::from("data"),
            fsync: FsyncMode::Always,
            fsync_interval: HumanDuration(Duration::from_millis(50)),
            max_bytes: HumanSize(10 << 30),
            min_free: HumanSize(256 << 20),
            retention: HumanDuration(Duration::from_secs(7 * 86400)),
            cache_capacity: HumanSize(16 << 20),
        }
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct HttpIngestConfig {
    pub listen: String,
    pub max_body: HumanSize,
    pub tokens: Vec<String>,
}

impl Default for HttpIngestConfig {
    fn default() -> Self {
        HttpIngestConfig {
            listen: "127.0.0.1:8080".into(),
            max_body: HumanSize(8 << 20),
            tokens: vec![],
        }
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct UnixIngestConfig {
    pub path: String,
    pub mode: String,
}

impl Default for UnixIngestConfig {
    fn default() -> Self {
        UnixIngestConfig {
            path: "clickhook.sock".into(),
            mode: "0660".into(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Default, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct IngestConfig {
    pub http: HttpIngestConfig,
    pub unix: UnixIngestConfig,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    pub listen: String,
    pub token: String,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            listen: "127.0.0.1:9090".into(),
            token: String::new(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct DeliveryConfig {
    pub shards: usize,
    pub timeout: HumanDuration,
    pub max_concurrency: usize,
    pub allow_private_networks: bool,
    pub allowed_cidrs: Vec<String>,
    /// Open outbound connections across all endpoints; 0 = from the open-files limit.
    pub max_connections: usize,
    /// Requests in flight to one receiver (scheme, host and port) from the endpoints of
    /// one delivery thread. 128 (four endpoints' `max_concurrency`) keeps a local
    /// receiver busy; with 512, 10,000 endpoints on one receiver held 1,024 connections
    /// open and delivered about 10 % slower for about 10 % more CPU.
    pub max_in_flight_per_receiver: usize,
}

impl Default for DeliveryConfig {
    fn default() -> Self {
        DeliveryConfig {
            shards: 0,
            timeout: HumanDuration(Duration::from_secs(5)),
            max_concurrency: 32,
            allow_private_networks: false,
            allowed_cidrs: vec![],
            max_connections: 0,
            max_in_flight_per_receiver: 128,
        }
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RetryConfig {
    pub schedule: Vec<HumanDuration>,
    pub jitter: f64,
}

impl Default for RetryConfig {
    fn default() -> Self {
        let steps = ["1s", "5s", "30s", "2m", "10m", "30m", "1h", "2h", "4h", "8h"];
        RetryConfig {
            schedule: steps.iter().filter_map(|s| HumanDuration::parse(s).ok()).collect(),
            jitter: 0.2,
        }
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct BreakerConfig {
    pub failures: u32,
    pub cooldown: HumanDuration,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        BreakerConfig {
            failures: 20,
            cooldown: HumanDuration(Duration::from_secs(30)),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Default, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct EnrichConfig {
    /// A MaxMind database (`.mmdb`) filling country, region, city and ISP from the IP.
    pub geoip: Option<PathBuf>,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// `text` or `json`.
    pub format: String,
    /// A tracing filter such as `info` or `clickhook=debug`.
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: "text".into(),
            level: "info".into(),
        }
    }
}

/// One webhook endpoint as written in `[[endpoints]]` or sent to the admin API. Fields left
/// out take the `[delivery]` values (`timeout`, `max_concurrency`) or the SPEC defaults.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct EndpointConfig {
    pub id: String,
    pub url: String,
    #[serde(default)]
    pub format: Format,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret: Option<String>,
    #[serde(default, deserialize_with = "ids_as_text")]
    pub workspaces: Vec<String>,
    #[serde(default, deserialize_with = "ids_as_text")]
    pub links: Vec<String>,
    #[serde(default)]
    pub include_bots: bool,
    #[serde(default)]
    pub include_ip: bool,
    #[serde(default)]
    pub timeout: Option<HumanDuration>,
    #[serde(default)]
    pub max_concurrency: Option<usize>,
    #[serde(default)]
    pub rate_limit: u32,
    #[serde(default = "one")]
    pub batch_max: usize,
    #[serde(default)]
    pub batch_linger: HumanDuration,
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    #[serde(default = "yes")]
    pub enabled: bool,
    /// `v1` (HMAC), `v1a` (Ed25519) or `both`.
    #[serde(default)]
    pub signature: crate::deliver::sign::SignatureScheme,
    /// The Ed25519 key (`whsk_…`) for `v1a`; generated and persisted when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signing_key: Option<String>,
}

fn one() -> usize {
    1
}
fn yes() -> bool {
    true
}

/// Link and workspace ids compare as text (SPEC §9): `12345` and `"12345"` are one link.
fn ids_as_text<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Id {
        Text(String),
        Number(i64),
    }
    let ids = Vec::<Id>::deserialize(d)?;
    Ok(ids
        .into_iter()
        .map(|id| match id {
            Id::Text(s) => s,
            Id::Number(n) => n.to_string(),
        })
        .collect())
}

/// `[operations]`: where operational events (`endpoint.failing`, `endpoint.disabled`,
/// `endpoint.recovered`, `endpoint.dead_letter`) go.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct OperationsConfig {
    /// "" disables operational events.
    pub url: String,
    /// Signs them like any endpoint; generated and persisted when absent.
    pub secret: Option<String>,
    /// Consecutive failed attempts after which an endpoint is reported failing.
    pub failing_after: u32,
    /// An endpoint failing without a single success this long is disabled.
    pub disable_after: HumanDuration,
}

impl Default for OperationsConfig {
    fn default() -> Self {
        OperationsConfig {
            url: String::new(),
            secret: None,
            failing_after: 5,
            disable_after: HumanDuration(Duration::from_secs(5 * 86400)),
        }
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// Endpoints with series of their own; the rest share `endpoint="_other"`.
    pub max_endpoint_series: usize,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            max_endpoint_series: crate::metrics::DEFAULT_ENDPOINT_SERIES,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub storage: StorageConfig,
    pub ingest: IngestConfig,
    pub admin: AdminConfig,
    pub delivery: DeliveryConfig,
    pub retry: RetryConfig,
    pub breaker: BreakerConfig,
    pub enrich: EnrichConfig,
    pub log: LogConfig,
    pub metrics: MetricsConfig,
    pub operations: OperationsConfig,
    pub endpoints: Vec<EndpointConfig>,
    /// The folder relative paths resolve against (the config file's folder).
    #[serde(skip)]
    pub base_dir: PathBuf,
    #[serde(skip)]
    pub file: PathBuf,
}

impl Config {
    /// [`Config::load`], and the files only a start opens (the GeoIP database) must be
    /// readable: `check-config` and `serve` look, a reload (which opens none) does not.
    pub fn load_to_start(path: &Path) -> Result<Config, ConfigError> {
        let text = Self::read(path)?;
        let config = Config::parse(&text, path)?;
        if let Some(geoip) = &config.enrich.geoip {
            let geoip = config.resolve(geoip);
            std::fs::File::open(&geoip).map_err(|e| {
                ConfigError::invalid(path, "enrich.geoip", format!("cannot read {}: {e}", geoip.display()))
                    .placed_in(&text)
            })?;
        }
        Ok(config)
    }

    /// Reads, parses and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        Config::parse(&Self::read(path)?, path)
    }

    /// [`Config::load`] for a reload into a daemon started on `running`, with the sections
    /// besides `[[endpoints]]` that the file changes (a reload applies the endpoints only).
    /// The endpoints must pass the address checks of the running daemon's `[delivery]`:
    /// one that only the file's changed `[delivery]` allows would fail every attempt
    /// until a restart.
    pub fn load_for_reload(path: &Path, running: &Config) -> Result<(Config, Vec<&'static str>), ConfigError> {
        let text = Self::read(path)?;
        let fresh = Config::parse(&text, path)?;
        let allowed = running.allowed_cidrs()?;
        for (i, ep) in fresh.endpoints.iter().enumerate() {
            running
                .check_destination(&ep.url, &format!("endpoints[{i}].url"), &allowed)
                .map_err(|e| match e {
                    ConfigError::Invalid { file, line, key, why } => ConfigError::Invalid {
                        file,
                        line,
                        key,
                        why: format!(
                            "{why}; a reload checks it against the [delivery] the daemon started \
                             with, so restart it to apply a change there"
                        ),
                    },
                    other => other,
                })
                .map_err(|e| e.placed_in(&text))?;
        }
        let changed = fresh.sections_changed_from(running);
        Ok((fresh, changed))
    }

    /// The sections other than `[[endpoints]]` in which `self` differs from `other`.
    fn sections_changed_from(&self, other: &Config) -> Vec<&'static str> {
        [
            ("storage", self.storage != other.storage),
            ("ingest", self.ingest != other.ingest),
            ("admin", self.admin != other.admin),
            ("delivery", self.delivery != other.delivery),
            ("retry", self.retry != other.retry),
            ("breaker", self.breaker != other.breaker),
            ("enrich", self.enrich != other.enrich),
            ("log", self.log != other.log),
            ("metrics", self.metrics != other.metrics),
            ("operations", self.operations != other.operations),
        ]
        .into_iter()
        .filter_map(|(name, changed)| changed.then_some(name))
        .collect()
    }

    fn read(path: &Path) -> Result<String, ConfigError> {
        std::fs::read_to_string(path).map_err(|cause| ConfigError::Read {
            file: path.display().to_string(),
            cause,
        })
    }

    /// Parses and validates config text as if read from `path`.
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let mut config: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            file: path.display().to_string(),
            message: one_line(&e.to_string()),
        })?;
        config.file = path.to_path_buf();
        config.base_dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
        if config.base_dir.as_os_str().is_empty() {
            config.base_dir = PathBuf::from(".");
        }
        config.validate().map_err(|e| e.placed_in(text))?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let file = &self.file;
        if self.storage.path.as_os_str().is_empty() {
            return Err(ConfigError::invalid(file, "storage.path", "must not be empty"));
        }
        if self.storage.fsync_interval.0.is_zero() {
            return Err(ConfigError::invalid(
                file,
                "storage.fsync_interval",
                "must be more than 0",
            ));
        }
        parse_listen(&self.ingest.http.listen).map_err(|why| ConfigError::invalid(file, "ingest.http.listen", why))?;
        parse_listen(&self.admin.listen).map_err(|why| ConfigError::invalid(file, "admin.listen", why))?;
        if self.ingest.http.max_body.0 == 0 {
            return Err(ConfigError::invalid(
                file,
                "ingest.http.max_body",
                "must be more than 0",
            ));
        }
        // Bodies are counted against the listener's byte budget in 32-bit amounts.
        if self.ingest.http.max_body.0 > u64::from(u32::MAX) {
            return Err(ConfigError::invalid(
                file,
                "ingest.http.max_body",
                "must be less than 4 GiB",
            ));
        }
        if self.ingest.http.tokens.iter().any(|t| t.trim().is_empty()) {
            return Err(ConfigError::invalid(
                file,
                "ingest.http.tokens",
                "a token must not be empty",
            ));
        }
        self.socket_mode()
            .map_err(|why| ConfigError::invalid(file, "ingest.unix.mode", why))?;
        if self.delivery.max_concurrency == 0 {
            return Err(ConfigError::invalid(
                file,
                "delivery.max_concurrency",
                "must be at least 1",
            ));
        }
        if self.delivery.max_in_flight_per_receiver == 0 {
            return Err(ConfigError::invalid(
                file,
                "delivery.max_in_flight_per_receiver",
                "must be at least 1",
            ));
        }
        if self.delivery.max_connections > crate::deliver::send::MAX_CONNECTIONS {
            return Err(ConfigError::invalid(
                file,
                "delivery.max_connections",
                format!(
                    "must be at most {} (0: the open-files limit less 1024)",
                    crate::deliver::send::MAX_CONNECTIONS
                ),
            ));
        }
        if self.delivery.timeout.0.is_zero() {
            return Err(ConfigError::invalid(file, "delivery.timeout", "must be more than 0"));
        }
        let allowed = self.allowed_cidrs()?;
        if !(0.0..=1.0).contains(&self.retry.jitter) {
            return Err(ConfigError::invalid(
                file,
                "retry.jitter",
                "must be a fraction between 0 and 1",
            ));
        }
        if self.breaker.failures == 0 {
            return Err(ConfigError::invalid(file, "breaker.failures", "must be at least 1"));
        }
        if !matches!(self.log.format.as_str(), "text" | "json") {
            return Err(ConfigError::invalid(file, "log.format", "must be \"text\" or \"json\""));
        }
        tracing_subscriber::EnvFilter::try_new(&self.log.level).map_err(|e| {
            ConfigError::invalid(
                file,
                "log.level",
                format!(
                    "{:?} is not a filter like \"info\" or \"clickhook=debug\": {e}",
                    self.log.level
                ),
            )
        })?;
        if self.operations.disable_after.0.is_zero() {
            // Zero would disable an endpoint at its first failed attempt.
            return Err(ConfigError::invalid(
                file,
                "operations.disable_after",
                "must be more than 0; to never disable an endpoint, make it very long (\"3650d\")",
            ));
        }
        if let Some(ops) = self.operations_endpoint() {
            validate_endpoint(&ops)
                .map_err(|(field, why)| ConfigError::invalid(file, format!("operations.{field}"), why))?;
            self.check_destination(&ops.url, "operations.url", &allowed)?;
            if self.operations.failing_after == 0 {
                return Err(ConfigError::invalid(
                    file,
                    "operations.failing_after",
                    "must be at least 1",
                ));
            }
        }
        let mut seen = std::collections::HashSet::new();
        for (i, ep) in self.endpoints.iter().enumerate() {
            let key = format!("endpoints[{i}]");
            validate_user_endpoint(ep)
                .map_err(|(field, why)| ConfigError::invalid(file, format!("{key}.{field}"), why))?;
            self.check_destination(&ep.url, &format!("{key}.url"), &allowed)?;
            if !seen.insert(ep.id.as_str()) {
                return Err(ConfigError::invalid(
                    file,
                    format!("{key}.id"),
                    format!("{:?} is used twice", ep.id),
                ));
            }
        }
        Ok(())
    }

    /// The internal endpoint that carries operational events, when `[operations] url` is set.
    pub fn operations_endpoint(&self) -> Option<EndpointConfig> {
        if self.operations.url.is_empty() {
            return None;
        }
        Some(EndpointConfig {
            id: OPERATIONS_ENDPOINT.into(),
            url: self.operations.url.clone(),
            format: Format::Operational,
            secret: self.operations.secret.clone(),
            workspaces: vec![],
            links: vec![],
            include_bots: false,
            include_ip: false,
            timeout: None,
            max_concurrency: None,
            rate_limit: 0,
            batch_max: 1,
            batch_linger: HumanDuration::default(),
            headers: BTreeMap::new(),
            enabled: true,
            signature: Default::default(),
            signing_key: None,
        })
    }

    /// The socket's permission bits, from the octal `ingest.unix.mode`.
    pub fn socket_mode(&self) -> Result<u32, String> {
        u32::from_str_radix(self.ingest.unix.mode.trim_start_matches("0o"), 8)
            .ok()
            .filter(|m| *m <= 0o777)
            .ok_or_else(|| format!("{:?} is not an octal file mode like \"0660\"", self.ingest.unix.mode))
    }

    /// Refuses a destination that is or resolves to a private address, unless allowed.
    fn check_destination(&self, url: &str, key: &str, allowed: &[IpNet]) -> Result<(), ConfigError> {
        if self.delivery.allow_private_networks {
            return Ok(());
        }
        match private_destination(url, allowed) {
            Some(ip) => Err(ConfigError::invalid(
                &self.file,
                key,
                format!(
                    "{url:?} is or resolves to the private address {ip}; set delivery.allow_private_networks \
                     or list it in delivery.allowed_cidrs"
                ),
            )),
            None => Ok(()),
        }
    }

    pub fn allowed_cidrs(&self) -> Result<Vec<IpNet>, ConfigError> {
        self.delivery
            .allowed_cidrs
            .iter()
            .enumerate()
            .map(|(i, c)| {
                c.parse::<IpNet>().map_err(|e| {
                    ConfigError::invalid(
                        &self.file,
                        format!("delivery.allowed_cidrs[{i}]"),
                        format!("{c:?}: {e}"),
                    )
                })
            })
            .collect()
    }

    /// A path from the config, resolved against the config file's folder.
    pub fn resolve(&self, path: &Path) -> PathBuf {
        if path.is_absolute() {
            path.to_path_buf()
        } else {
            self.base_dir.join(path)
        }
    }

    pub fn shard_count(&self) -> usize {
        if self.delivery.shards > 0 {
            self.delivery.shards
        } else {
            std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
        }
    }
}

/// Headers every request carries from clickhook itself (SPEC §4.1) or from HTTP's
/// framing: an endpoint's extra `headers` would send them twice or contradict them.
const RESERVED_HEADERS: [&str; 9] = [
    "content-type",
    "user-agent",
    "content-length",
    "transfer-encoding",
    "host",
    "connection",
    "webhook-id",
    "webhook-timestamp",
    "webhook-signature",
];

/// Refuses the id of the internal operations endpoint for an endpoint of the user's:
/// ids name queues, so two endpoints of one id would drain one queue, and the
/// operations endpoint sends stored events whole, the visitor IP included.
pub fn not_reserved(id: &str) -> Result<(), (&'static str, String)> {
    if id == OPERATIONS_ENDPOINT {
        return Err(("id", format!("{id:?} is reserved for the [operations] endpoint")));
    }
    Ok(())
}

/// Checks an endpoint of the user's, from the file or the API: a valid definition under
/// an id of its own.
pub fn validate_user_endpoint(ep: &EndpointConfig) -> Result<(), (&'static str, String)> {
    validate_endpoint(ep).and_then(|()| not_reserved(&ep.id))
}

/// Checks one endpoint definition; on failure returns the field and why.
pub fn validate_endpoint(ep: &EndpointConfig) -> Result<(), (&'static str, String)> {
    if ep.id.is_empty() || ep.id.len() > 128 || !ep.id.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
    {
        return Err((
            "id",
            format!(
                "{:?} must be 1-128 characters of letters, digits, '-', '_' or '.'",
                ep.id
            ),
        ));
    }
    let url = ep
        .url
        .parse::<hyper::Uri>()
        .map_err(|e| ("url", format!("{:?} is not a URL: {e}", ep.url)))?;
    match url.scheme_str() {
        Some("http") | Some("https") => {}
        _ => return Err(("url", format!("{:?} must be an http:// or https:// URL", ep.url))),
    }
    if url.host().is_none_or(str::is_empty) {
        return Err(("url", format!("{:?} has no host", ep.url)));
    }
    if let Some(secret) = &ep.secret {
        crate::deliver::sign::SigningKey::from_secret(secret).map_err(|e| ("secret", e.to_string()))?;
    }
    if let Some(key) = &ep.signing_key {
        crate::deliver::sign::AsymmetricKey::from_secret(key).map_err(|e| ("signing_key", e.to_string()))?;
    }
    if ep.max_concurrency == Some(0) {
        return Err(("max_concurrency", "must be at least 1".into()));
    }
    if ep.timeout.is_some_and(|t| t.0.is_zero()) {
        return Err(("timeout", "must be more than 0".into()));
    }
    if ep.batch_max == 0 {
        return Err(("batch_max", "must be at least 1".into()));
    }
    if ep.batch_max > 1 && !ep.format.supports_batch() {
        return Err((
            "batch_max",
            format!(
                "format {:?} has no batch shape; batching needs \"standard\" or \"rebrandly\"",
                ep.format.as_str()
            ),
        ));
    }
    for (name, value) in &ep.headers {
        let Ok(parsed) = name.parse::<hyper::header::HeaderName>() else {
            return Err(("headers", format!("{name:?} is not a valid header name")));
        };
        // A parsed name is lowercase. Rebrandly's `apikey` carries the endpoint's secret.
        let rebrandly_key = ep.format == Format::Rebrandly && parsed.as_str() == "apikey";
        if RESERVED_HEADERS.contains(&parsed.as_str()) || rebrandly_key {
            return Err((
                "headers",
                format!("{name:?} is set by clickhook on every request and cannot be replaced"),
            ));
        }
        if value.parse::<hyper::header::HeaderValue>().is_err() {
            return Err(("headers", format!("the value of {name:?} is not a valid header value")));
        }
    }
    Ok(())
}

/// The first private address a URL's host is or resolves to now, unless allowed. A name
/// that does not resolve is not refused here; delivery checks again at connect time.
fn private_destination(url: &str, allowed: &[IpNet]) -> Option<std::net::IpAddr> {
    use std::net::ToSocketAddrs;
    let uri = url.parse::<hyper::Uri>().ok()?;
    let host = uri.host()?.trim_start_matches('[').trim_end_matches(']');
    let ips: Vec<std::net::IpAddr> = match host.parse() {
        Ok(ip) => vec![ip],
        Err(_) => (host, uri.port_u16().unwrap_or(443))
            .to_socket_addrs()
            .map(|a| a.map(|s| s.ip()).collect())
            .unwrap_or_default(),
    };
    ips.into_iter()
        .find(|ip| crate::deliver::send::is_private(*ip) && !allowed.iter().any(|net| net.contains(ip)))
}

/// `host:port` with a literal IP; port 0 asks the system for a free one.
pub fn parse_listen(text: &str) -> Result<SocketAddr, String> {
    text.parse::<SocketAddr>()
        .map_err(|_| format!("{text:?} is not an address like \"127.0.0.1:8080\""))
}

fn one_line(message: &str) -> String {
    message
        .lines()
        .map(str::trim_end)
        .filter(|l| !l.trim().is_empty())
        .collect::<Vec<_>>()
        .join(" | ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("/etc/clickhook/config.toml"))
    }

    #[test]
    fn empty_file_takes_every_default() {
        let c = parse("").unwrap();
        assert_eq!(c.storage.path, PathBuf::from("data"));
        assert_eq!(c.retry.schedule.len(), 10);
        assert_eq!(c.storage.retention.0, Duration::from_secs(7 * 86400));
        assert_eq!(c.resolve(Path::new("data")), PathBuf::from("/etc/clickhook/data"));
    }

    #[test]
    fn unknown_key_names_line_and_key() {
        let err = parse("[storage]\npath = \"d\"\nfsink = \"always\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("line 3"), "{err}");
        assert!(err.contains("fsink"), "{err}");
    }

    #[test]
    fn bad_duration_names_the_value() {
        let err = parse("[delivery]\ntimeout = \"5 parsecs\"\n").unwrap_err().to_string();
        assert!(err.contains("5 parsecs") && err.contains("line 2"), "{err}");
        // Long enough to overflow a deadline: refused at the file, not a panic at the timer.
        let err = parse("[breaker]\ncooldown = \"300000000000years\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("longer than 100 years") && err.contains("line 2"), "{err}");
        assert!(parse("[storage]\nretention = \"3650d\"\n").is_ok());
    }

    #[test]
    fn endpoint_errors_name_the_index_and_field() {
        let err = parse("[[endpoints]]\nid = \"a\"\nurl = \"ftp://x\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("endpoints[0].url"), "{err}");
        let err = parse("[[endpoints]]\nid = \"a\"\nurl = \"http://x\"\nformat = \"linkly\"\nbatch_max = 5\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("endpoints[0].batch_max") && err.contains("no batch shape"),
            "{err}"
        );
    }

    #[test]
    fn checks_after_parsing_name_the_line_that_sets_the_key() {
        let two = "[[endpoints]]\nid = \"a\"\nurl = \"http://x\"\n\n[[endpoints]]\nid = \"b\"\nurl = \"ftp://y\"\n";
        let err = parse(two).unwrap_err().to_string();
        assert!(err.contains(": line 7: endpoints[1].url: "), "{err}");
        let twice = "[[endpoints]]\nid = \"a\"\nurl = \"http://x\"\n[[endpoints]]\nurl = \"http://y\"\nid = \"a\"\n";
        let err = parse(twice).unwrap_err().to_string();
        assert!(err.contains(": line 6: endpoints[1].id: "), "{err}");
        let inline = "[retry]\njitter = 0.0\n\n[ingest.http]\nlisten = \"nowhere\"\n";
        let err = parse(inline).unwrap_err().to_string();
        assert!(err.contains(": line 5: ingest.http.listen: "), "{err}");
        // A key that names a table is placed at its header.
        let table = "[storage]\npath = \"d\"\n[[endpoints]]\nid = \"a\"\nurl = \"http://x\"\n[endpoints.headers]\nhost = \"h\"\n";
        let err = parse(table).unwrap_err().to_string();
        assert!(err.contains(": line 6: endpoints[0].headers: "), "{err}");
        // A key the file leaves out is placed at the table around it, or nowhere.
        assert_eq!(line_of_key(table, "endpoints[0].timeout"), Some(3));
        assert_eq!(line_of_key(table, "breaker.failures"), None);
    }

    #[test]
    fn max_body_is_more_than_0_and_less_than_4_gib() {
        let err = parse("[ingest.http]\nmax_body = \"4GiB\"\n").unwrap_err().to_string();
        assert!(
            err.contains("line 2: ingest.http.max_body: must be less than 4 GiB"),
            "{err}"
        );
        assert!(parse("[ingest.http]\nmax_body = \"3GiB\"\n").is_ok());
        assert!(parse("[ingest.http]\nmax_body = \"0\"\n").is_err());
    }

    #[test]
    fn a_log_filter_that_does_not_parse_is_refused() {
        let err = parse("[log]\nlevel = \"clickhook=verbose\"\n").unwrap_err().to_string();
        assert!(
            err.contains("line 2: log.level: ") && err.contains("clickhook=verbose"),
            "{err}"
        );
        assert!(parse("[log]\nlevel = \"warn,clickhook=debug\"\n").is_ok());
    }

    #[test]
    fn the_operations_url_is_held_to_the_private_address_rule_too() {
        let err = parse("[operations]\nurl = \"http://127.0.0.1:9/ops\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("line 2: operations.url: ") && err.contains("127.0.0.1"),
            "{err}"
        );
        assert!(
            parse("[delivery]\nallow_private_networks = true\n[operations]\nurl = \"http://127.0.0.1:9/ops\"\n")
                .is_ok()
        );
    }

    #[test]
    fn a_disable_after_of_zero_is_refused() {
        let err = parse("[operations]\ndisable_after = \"0s\"\n").unwrap_err().to_string();
        assert!(
            err.contains("line 2: operations.disable_after: ") && err.contains("more than 0"),
            "{err}"
        );
        assert!(parse("[operations]\ndisable_after = \"1h\"\n").is_ok());
    }

    #[test]
    fn numeric_link_ids_compare_as_text() {
        let c = parse("[[endpoints]]\nid = \"a\"\nurl = \"http://x\"\nlinks = [12345, \"abc\"]\n").unwrap();
        assert_eq!(c.endpoints[0].links, vec!["12345".to_string(), "abc".to_string()]);
    }

    #[test]
    fn private_destinations_are_refused_unless_allowed() {
        let t = "[[endpoints]]\nid = \"a\"\nurl = \"http://127.0.0.1:9/x\"\n";
        let err = parse(t).unwrap_err().to_string();
        assert!(err.contains("endpoints[0].url") && err.contains("127.0.0.1"), "{err}");
        assert!(parse(&format!("[delivery]\nallow_private_networks = true\n{t}")).is_ok());
        assert!(parse(&format!("[delivery]\nallowed_cidrs = [\"127.0.0.0/8\"]\n{t}")).is_ok());
        let named = "[[endpoints]]\nid = \"a\"\nurl = \"http://localhost:9/x\"\n";
        assert!(parse(named).unwrap_err().to_string().contains("private address"));
    }

    #[test]
    fn zero_in_flight_per_receiver_is_refused_by_name() {
        assert_eq!(parse("").unwrap().delivery.max_in_flight_per_receiver, 128);
        let err = parse("[delivery]\nmax_in_flight_per_receiver = 0\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("delivery.max_in_flight_per_receiver") && err.contains("at least 1"),
            "{err}"
        );
    }

    #[test]
    fn duplicate_endpoint_ids_are_refused() {
        let t = "[[endpoints]]\nid = \"a\"\nurl = \"http://x\"\n[[endpoints]]\nid = \"a\"\nurl = \"http://y\"\n";
        assert!(parse(t).unwrap_err().to_string().contains("endpoints[1].id"));
    }

    /// The systemd copy of the shipped config differs in its paths only.
    #[test]
    fn the_systemd_config_is_the_shipped_one_with_systemd_paths() {
        let load = |file: &str| Config::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join(file)).unwrap();
        let (shipped, mut systemd) = (load("config.toml"), load("systemd/config.toml"));
        assert_eq!(systemd.storage.path, Path::new("/var/lib/clickhook/data"));
        assert_eq!(systemd.ingest.unix.path, "/run/clickhook/clickhook.sock");
        systemd.storage.path = shipped.storage.path.clone();
        systemd.ingest.unix.path = shipped.ingest.unix.path.clone();
        systemd.base_dir = shipped.base_dir.clone();
        systemd.file = shipped.file.clone();
        assert_eq!(format!("{systemd:?}"), format!("{shipped:?}"));
    }

    #[test]
    fn extra_headers_cannot_replace_the_protocol_ones() {
        for name in ["Content-Type", "webhook-signature", "Host", "User-Agent"] {
            let t = format!("[[endpoints]]\nid = \"a\"\nurl = \"http://x\"\nheaders = {{ \"{name}\" = \"v\" }}\n");
            let err = parse(&t).unwrap_err().to_string();
            assert!(
                err.contains("endpoints[0].headers") && err.contains("cannot be replaced"),
                "{err}"
            );
        }
        let t = "[[endpoints]]\nid = \"a\"\nurl = \"http://x\"\nheaders = { \"x-team\" = \"growth\" }\n";
        assert!(parse(t).is_ok());
        // A rebrandly endpoint's `apikey` is its secret, sent by clickhook.
        let key =
            "[[endpoints]]\nid = \"a\"\nurl = \"http://x\"\nformat = \"rebrandly\"\nheaders = { \"ApiKey\" = \"k\" }\n";
        let err = parse(key).unwrap_err().to_string();
        assert!(
            err.contains("endpoints[0].headers") && err.contains("cannot be replaced"),
            "{err}"
        );
        assert!(
            parse(&key.replace("rebrandly", "linkly")).is_ok(),
            "another format may send one"
        );
    }

    #[test]
    fn a_connection_cap_past_what_can_be_counted_is_refused() {
        let err = parse("[delivery]\nmax_connections = 3000000000000000000\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("delivery.max_connections") && err.contains("at most"),
            "{err}"
        );
        assert!(parse("[delivery]\nmax_connections = 65536\n").is_ok());
    }

    #[test]
    fn the_operations_endpoint_id_is_refused_for_an_endpoint() {
        let t = "[[endpoints]]\nid = \"_operations\"\nurl = \"http://x\"\n";
        let err = parse(t).unwrap_err().to_string();
        assert!(err.contains("endpoints[0].id") && err.contains("reserved"), "{err}");
        let ops = "[operations]\nurl = \"https://ops.example/\"\n";
        assert!(parse(ops).is_ok(), "the operations endpoint itself takes it");
    }
}
