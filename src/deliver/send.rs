//! Sending one attempt: the outbound HTTP stack of an endpoint and the classification of
//! what happened. It owns the connection pool (hyper-util over rustls, HTTP/1.1 and
//! HTTP/2 by ALPN), the private-address guard applied to the very address connected to,
//! and the single deadline covering DNS, connect, TLS, request and response body. It must
//! not decide about retries: it reports an [`AttemptResult`] whose [`Outcome`] says whose
//! fault it was, and the worker decides.

use super::slots::{ReceiverSlot, ReceiverSlots};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::header::{HeaderName, HeaderValue};
use hyper::{Request, StatusCode, Uri};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::dns::Name;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use ipnet::IpNet;
use std::future::Future;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

/// How much of a response body is kept for the attempt log and `/test`.
pub const BODY_SNIPPET: usize = 1024;
/// Past this many response bytes the body is abandoned (and the connection with it).
const MAX_RESPONSE_BODY: usize = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error("refused: {0} is a private address and private networks are not allowed")]
    PrivateAddress(IpAddr),
    #[error("cannot resolve {host}: {reason}")]
    Resolve { host: String, reason: String },
}

/// What one attempt came to, as the metric label `outcome` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome {
    Success,
    Http3xx,
    Http4xx,
    Http5xx,
    Timeout,
    Network,
}

impl Outcome {
    pub const ALL: [Outcome; 6] = [
        Outcome::Success,
        Outcome::Http3xx,
        Outcome::Http4xx,
        Outcome::Http5xx,
        Outcome::Timeout,
        Outcome::Network,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Success => "success",
            Outcome::Http3xx => "http_3xx",
            Outcome::Http4xx => "http_4xx",
            Outcome::Http5xx => "http_5xx",
            Outcome::Timeout => "timeout",
            Outcome::Network => "network",
        }
    }

    fn of_status(status: StatusCode) -> Outcome {
        match status.as_u16() {
            200..=299 => Outcome::Success,
            300..=399 => Outcome::Http3xx,
            400..=499 => Outcome::Http4xx,
            _ => Outcome::Http5xx,
        }
    }
}

#[derive(Debug, Clone)]
pub struct AttemptResult {
    pub outcome: Outcome,
    pub status: Option<u16>,
    pub latency: Duration,
    pub error: Option<String>,
    /// The receiver's `Retry-After`, on 429 and 503.
    pub retry_after: Option<Duration>,
    /// The first [`BODY_SNIPPET`] bytes of the response.
    pub body: Bytes,
}

impl AttemptResult {
    /// An attempt that got no answer: a timeout, or a failure on our side or the network's.
    pub fn unanswered(outcome: Outcome, latency: Duration, error: String) -> AttemptResult {
        AttemptResult {
            outcome,
            status: None,
            latency,
            error: Some(error),
            retry_after: None,
            body: Bytes::new(),
        }
    }
}

/// Which destination addresses may be connected to.
#[derive(Debug, Clone, Default)]
pub struct AddressPolicy {
    pub allow_private: bool,
    pub allowed: Arc<Vec<IpNet>>,
}

impl AddressPolicy {
    pub fn permits(&self, ip: IpAddr) -> bool {
        self.allow_private || !is_private(ip) || self.allowed.iter().any(|net| net.contains(&ip))
    }
}

/// A URL's host as a name or an IP literal (without an IPv6 literal's brackets).
fn host_of(url: &Uri) -> &str {
    url.host()
        .unwrap_or_default()
        .trim_start_matches('[')
        .trim_end_matches(']')
}

/// Loopback, RFC 1918, link-local (cloud metadata lives there), CGNAT, unique-local,
/// unspecified, broadcast, multicast and documentation ranges.
pub fn is_private(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || v4.is_multicast()
                || v4.is_documentation()
                || (o[0] == 100 && (o[1] & 0xc0) == 64)
                || o[0] == 0
                || (o[0] == 192 && o[1] == 0 && o[2] == 0)
                || (o[0] == 198 && (o[1] & 0xfe) == 18)
        }
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_private(IpAddr::V4(v4));
            }
            let s = v6.segments();
            // Addresses that carry an IPv4 address a gateway reaches for us: NAT64
            // (64:ff9b::/96 and the local-use 64:ff9b:1::/48), 6to4 (2002::/16) and the old
            // IPv4-compatible ::a.b.c.d. They are as private as the address they carry.
            let carried = |hi: u16, lo: u16| Ipv4Addr::new((hi >> 8) as u8, hi as u8, (lo >> 8) as u8, lo as u8);
            let embedded = match s {
                [0x64, 0xff9b, 0, 0, 0, 0, hi, lo] | [0x64, 0xff9b, 1, _, _, _, hi, lo] => Some(carried(hi, lo)),
                [0x2002, hi, lo, ..] => Some(carried(hi, lo)),
                [0, 0, 0, 0, 0, 0, hi, lo] if hi != 0 => Some(carried(hi, lo)),
                _ => None,
            };
            if let Some(v4) = embedded {
                return is_private(IpAddr::V4(v4));
            }
            v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (s[0] & 0xfe00) == 0xfc00
                || (s[0] & 0xffc0) == 0xfe80
                || (s[0] == 0x2001 && s[1] == 0x0db8)
                // The AWS metadata service's IPv6 address.
                || (s[0] == 0xfd00 && s[1] == 0x0ec2)
        }
    }
}

/// How long a lookup may take: past it, its askers get an error and the next asks again,
/// where a lookup stuck on a lost reply would otherwise answer every asker until it ends.
const LOOKUP_LIMIT: Duration = Duration::from_secs(10);

/// How long a name's addresses are reused. The system resolver gives no TTL; this keeps
/// a burst of new connections to one receiver (thousands of endpoints waking at once) to
/// one lookup, and a changed record is followed within it.
const RESOLVED_FOR: Duration = Duration::from_secs(30);

/// Entries a table keeps before it looks for ones to drop; it then waits until it has
/// doubled, so a table of many live entries is not scanned on every insert.
const TABLE_PRUNE_FLOOR: usize = 4096;

/// A map whose entries nobody needs any more are dropped once it has grown: past
/// [`TABLE_PRUNE_FLOOR`] entries, and then each time it has doubled since, so a table of
/// many live entries is not scanned on every insert.
#[derive(Debug)]
struct PrunedTable<K, V> {
    entries: std::collections::HashMap<K, V>,
    prune_at: usize,
}

impl<K, V> Default for PrunedTable<K, V> {
    fn default() -> Self {
        PrunedTable {
            entries: std::collections::HashMap::new(),
            prune_at: TABLE_PRUNE_FLOOR,
        }
    }
}

impl<K, V> PrunedTable<K, V> {
    /// Before an insert: keeps only the entries `keep` wants, if the table has grown.
    fn make_room(&mut self, mut keep: impl FnMut(&V) -> bool) {
        if self.entries.len() < self.prune_at {
            return;
        }
        self.entries.retain(|_, v| keep(v));
        self.prune_at = (2 * self.entries.len()).max(TABLE_PRUNE_FLOOR);
    }
}

/// A lookup's outcome, shared by everyone who asks for the name while it runs.
type Lookup =
    futures_util::future::Shared<Pin<Box<dyn Future<Output = Result<Arc<[SocketAddr]>, Arc<io::Error>>> + Send>>>;

enum Resolved {
    /// `id` tells this lookup from a later one of the same name.
    Running {
        id: u64,
        lookup: Lookup,
    },
    Known {
        at: Instant,
        addrs: Arc<[SocketAddr]>,
    },
}

/// Names looked up lately, shared by every client of the daemon (through its
/// [`ConnectionBudget`]): a name is looked up once per [`RESOLVED_FOR`] whatever the
/// delivery thread or endpoint timeout asking.
#[derive(Default)]
pub struct NameTable {
    names: PrunedTable<String, Resolved>,
    /// Lookups started so far: the last one's id.
    next_id: u64,
}

impl std::fmt::Debug for NameTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NameTable")
            .field("names", &self.names.entries.len())
            .finish()
    }
}

impl NameTable {
    /// Drops the answers past [`RESOLVED_FOR`] once the table has grown.
    fn prune(&mut self) {
        self.names.make_room(|r| match r {
            Resolved::Running { .. } => true,
            Resolved::Known { at, .. } => at.elapsed() < RESOLVED_FOR,
        });
    }

    /// Files lookup `id`'s outcome if the name still waits for that lookup: an answer is
    /// kept, a failure is not (the next attempt asks again).
    fn file(&mut self, name: &str, id: u64, outcome: &Result<Arc<[SocketAddr]>, Arc<io::Error>>) {
        let names = &mut self.names.entries;
        if !matches!(names.get(name), Some(Resolved::Running { id: running, .. }) if *running == id) {
            return;
        }
        match outcome {
            Ok(addrs) => {
                let known = Resolved::Known {
                    at: Instant::now(),
                    addrs: addrs.clone(),
                };
                names.insert(name.to_string(), known);
            }
            Err(_) => {
                names.remove(name);
            }
        }
    }
}

/// Resolves names and drops every address the policy refuses, so the address vetted is
/// the address connected to (no window for DNS rebinding). Names resolve once per
/// [`RESOLVED_FOR`], and one lookup serves everyone who asks for the name meanwhile:
/// each lookup takes a thread of the blocking pool, which lookups of other names share.
#[derive(Clone)]
pub struct GuardedResolver {
    policy: AddressPolicy,
    table: Arc<std::sync::Mutex<NameTable>>,
    /// Turns the addresses of each answer, so connects spread over a name's addresses as
    /// a fresh lookup's rotated order spread them.
    turn: Arc<std::sync::atomic::AtomicUsize>,
}

impl GuardedResolver {
    fn new(policy: AddressPolicy, table: Arc<std::sync::Mutex<NameTable>>) -> Self {
        GuardedResolver {
            policy,
            table,
            turn: Arc::default(),
        }
    }

    /// Checks a URL's host now (at creation time): an IP literal or a name resolving to a
    /// refused address is an error. The name is looked up as for a connect (from the
    /// daemon's table, within [`LOOKUP_LIMIT`]).
    pub async fn check_url(&self, url: &Uri) -> Result<(), SendError> {
        let host = host_of(url);
        if let Ok(ip) = host.parse::<IpAddr>() {
            return if self.policy.permits(ip) {
                Ok(())
            } else {
                Err(SendError::PrivateAddress(ip))
            };
        }
        let addrs = self.addresses(host).await.map_err(|e| SendError::Resolve {
            host: host.to_string(),
            reason: e.to_string(),
        })?;
        match addrs.iter().find(|a| !self.policy.permits(a.ip())) {
            Some(refused) => Err(SendError::PrivateAddress(refused.ip())),
            None => Ok(()),
        }
    }

    /// The permitted addresses of `host`, turned one further each time.
    async fn resolve(&self, host: &str) -> Result<Arc<[SocketAddr]>, io::Error> {
        let addrs = self.addresses(host).await?;
        let mut permitted: Vec<SocketAddr> = addrs.iter().copied().filter(|a| self.policy.permits(a.ip())).collect();
        if let (true, Some(first)) = (permitted.is_empty(), addrs.first()) {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                SendError::PrivateAddress(first.ip()),
            ));
        }
        let turn = self.turn.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        turn_within_families(&mut permitted, turn);
        Ok(permitted.into())
    }

    /// Every address of `host`, from a lookup of the last [`RESOLVED_FOR`] if there is one.
    async fn addresses(&self, host: &str) -> Result<Arc<[SocketAddr]>, io::Error> {
        let (id, lookup) = {
            let Ok(mut table) = self.table.lock() else {
                return Err(io::Error::other("the resolver's table is poisoned"));
            };
            match table.names.entries.get(host) {
                Some(Resolved::Known { at, addrs }) if at.elapsed() < RESOLVED_FOR => return Ok(addrs.clone()),
                Some(Resolved::Running { id, lookup }) => (*id, lookup.clone()),
                _ => {
                    table.prune();
                    table.next_id += 1;
                    let id = table.next_id;
                    let lookup = self.start_lookup(host, id);
                    let running = Resolved::Running {
                        id,
                        lookup: lookup.clone(),
                    };
                    table.names.entries.insert(host.to_string(), running);
                    (id, lookup)
                }
            }
        };
        let outcome = lookup.await;
        if outcome.is_err() {
            // The lookup's task files its own outcome; one that never ran to its end
            // (cancelled with its runtime) is taken out here.
            if let Ok(mut table) = self.table.lock() {
                table.file(host, id, &outcome);
            }
        }
        outcome.map_err(|e| io::Error::new(e.kind(), e.to_string()))
    }

    /// Looks `host` up in a task of its own, which files the outcome in the table when
    /// it ends: a lookup every asker gave up on (their deadlines passed) still ends there,
    /// and is not served later as if it were fresh.
    fn start_lookup(&self, host: &str, id: u64) -> Lookup {
        let (table, name) = (self.table.clone(), host.to_string());
        let task = tokio::spawn(async move {
            let lookup = tokio::time::timeout(LOOKUP_LIMIT, tokio::net::lookup_host((name.as_str(), 0)));
            let outcome: Result<Arc<[SocketAddr]>, Arc<io::Error>> = match lookup.await {
                Ok(Ok(addrs)) => Ok(addrs.collect::<Vec<_>>().into()),
                Ok(Err(e)) => Err(Arc::new(e)),
                Err(_) => Err(Arc::new(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("no DNS answer within {} s", LOOKUP_LIMIT.as_secs()),
                ))),
            };
            if let Ok(mut table) = table.lock() {
                table.file(&name, id, &outcome);
            }
            outcome
        });
        let run: Pin<Box<dyn Future<Output = _> + Send>> =
            Box::pin(async move { task.await.unwrap_or_else(|e| Err(Arc::new(io::Error::other(e)))) });
        futures_util::FutureExt::shared(run)
    }
}

/// Turns `addrs` by `turn` within each address family, the first address's family
/// first: hyper-util tries that family, then the other after a moment (happy eyeballs).
fn turn_within_families(addrs: &mut [SocketAddr], turn: usize) {
    let first_v6 = addrs.first().is_some_and(SocketAddr::is_ipv6);
    // Stable: each family keeps its order.
    addrs.sort_by_key(|a| a.is_ipv6() != first_v6);
    let split = addrs.iter().take_while(|a| a.is_ipv6() == first_v6).count();
    let (first, other) = addrs.split_at_mut(split);
    for family in [first, other] {
        if !family.is_empty() {
            let by = turn % family.len();
            family.rotate_left(by);
        }
    }
}

/// Addresses already resolved (and vetted), handed to hyper-util's connector so that it
/// connects to exactly those: it asks its resolver again otherwise.
#[derive(Clone)]
struct PinnedAddresses(Arc<[SocketAddr]>);

impl tower_service::Service<Name> for PinnedAddresses {
    type Response = std::vec::IntoIter<SocketAddr>;
    type Error = io::Error;
    type Future = std::future::Ready<Result<Self::Response, io::Error>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), io::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _name: Name) -> Self::Future {
        let addrs: Vec<SocketAddr> = self.0.iter().copied().collect();
        std::future::ready(Ok(addrs.into_iter()))
    }
}

/// The plain-TCP connector: it resolves and vets the host first (IP literals too, which
/// hyper-util connects to without asking a resolver), then waits for its place among the
/// receiver's connects and for an open-connection slot, then connects to exactly the
/// addresses vetted.
#[derive(Clone)]
pub struct GuardedConnector {
    resolver: GuardedResolver,
    budget: ConnectionBudget,
    connect_timeout: Duration,
}

impl GuardedConnector {
    fn new(policy: AddressPolicy, budget: ConnectionBudget, connect_timeout: Duration) -> Self {
        GuardedConnector {
            resolver: budget.resolver(policy),
            budget,
            connect_timeout,
        }
    }

    /// hyper-util's connector for one connect, to `addrs`.
    fn plain(&self, addrs: Arc<[SocketAddr]>) -> HttpConnector<PinnedAddresses> {
        let mut http = HttpConnector::new_with_resolver(PinnedAddresses(addrs));
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(self.connect_timeout));
        http.set_keepalive(Some(Duration::from_secs(60)));
        http
    }
}

/// Open outbound connections across all endpoints at most: a connect waits for a slot
/// (inside its attempt's deadline), and a slot is held until its connection closes. This
/// keeps thousands of endpoints, each with its own pool, under the process's file limit.
///
/// Connects in progress are bounded too, per receiver address ([`MAX_CONNECTING`]):
/// thousands of endpoints waking at once would otherwise send thousands of SYNs in the
/// same millisecond, and a receiver's accept queue (1,024 by default) drops the overflow,
/// which TCP retries only after 1 s and 3 s — past most attempt deadlines. The bound is
/// per receiver so that connects hanging at one (a blackholed address) never hold up
/// connects to another, and a name's lookup comes before it, so a slow DNS server holds
/// up only its own names.
#[derive(Clone, Debug)]
pub struct ConnectionBudget {
    open: Arc<tokio::sync::Semaphore>,
    /// Connects in progress, per receiver address.
    connecting: Arc<std::sync::Mutex<PrunedTable<SocketAddr, Arc<tokio::sync::Semaphore>>>>,
    names: Arc<std::sync::Mutex<NameTable>>,
}

/// Open outbound connections at most, whatever the open-files limit or
/// `delivery.max_connections` say: far past what one machine serves, and within what a
/// semaphore counts.
pub const MAX_CONNECTIONS: usize = 1 << 20;

/// TCP connects in progress at most to one receiver address, across all endpoints.
/// Against a distant receiver (20 ms round trips) this still opens over 10,000
/// connections a second.
pub const MAX_CONNECTING: usize = 256;

impl ConnectionBudget {
    pub fn new(connections: usize) -> Self {
        ConnectionBudget {
            open: Arc::new(tokio::sync::Semaphore::new(connections.max(1))),
            connecting: Arc::default(),
            names: Arc::default(),
        }
    }

    /// Sized from the soft open-files limit, keeping 1024 descriptors for listeners,
    /// clients and the log.
    pub fn from_file_limit() -> Self {
        // SAFETY: getrlimit only writes the struct passed to it.
        let soft = unsafe {
            let mut limit = libc::rlimit {
                rlim_cur: 0,
                rlim_max: 0,
            };
            if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 {
                limit.rlim_cur
            } else {
                1024
            }
        };
        let soft = usize::try_from(soft).unwrap_or(usize::MAX).min(MAX_CONNECTIONS);
        ConnectionBudget::new(soft.saturating_sub(1024).max(256))
    }

    pub fn available(&self) -> usize {
        self.open.available_permits()
    }

    /// A resolver holding names to `policy`, with the daemon's table of names.
    pub fn resolver(&self, policy: AddressPolicy) -> GuardedResolver {
        GuardedResolver::new(policy, self.names.clone())
    }

    /// A place among the connects in progress to `receiver`.
    async fn connect_permit(&self, receiver: SocketAddr) -> Result<tokio::sync::OwnedSemaphorePermit, io::Error> {
        let permits = {
            let Ok(mut table) = self.connecting.lock() else {
                return Err(io::Error::other("the connect table is poisoned"));
            };
            if !table.entries.contains_key(&receiver) {
                // Receivers nobody is connecting to go: a permit or a wait for one holds
                // its receiver's entry.
                table.make_room(|permits| Arc::strong_count(permits) > 1);
            }
            table
                .entries
                .entry(receiver)
                .or_insert_with(|| Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTING)))
                .clone()
        };
        permits.acquire_owned().await.map_err(io::Error::other)
    }

    /// Connects in progress, across receivers.
    #[cfg(test)]
    fn connects_in_progress(&self) -> usize {
        self.connecting.lock().map_or(0, |table| {
            table
                .entries
                .values()
                .map(|p| MAX_CONNECTING - p.available_permits())
                .sum()
        })
    }
}

/// A TCP connection holding its slot of the [`ConnectionBudget`].
pub struct BudgetedStream {
    inner: TokioIo<tokio::net::TcpStream>,
    _slot: tokio::sync::OwnedSemaphorePermit,
}

impl hyper_util::client::legacy::connect::Connection for BudgetedStream {
    fn connected(&self) -> hyper_util::client::legacy::connect::Connected {
        self.inner.connected()
    }
}

impl hyper::rt::Read for BudgetedStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl hyper::rt::Write for BudgetedStream {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
}

impl tower_service::Service<Uri> for GuardedConnector {
    type Response = BudgetedStream;
    type Error = Box<dyn std::error::Error + Send + Sync>;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let host = host_of(&uri);
        let literal = host.parse::<IpAddr>().ok();
        if let Some(ip) = literal {
            if !self.resolver.policy.permits(ip) {
                return Box::pin(async move { Err(SendError::PrivateAddress(ip).into()) });
            }
        }
        let host = host.to_string();
        let port = uri
            .port_u16()
            .unwrap_or(if uri.scheme() == Some(&hyper::http::uri::Scheme::HTTPS) {
                443
            } else {
                80
            });
        let this = self.clone();
        Box::pin(async move {
            // The lookup waits outside every bound: a slow DNS server holds up its own
            // names only. Then the receiver's connects, then the open connections: a
            // connect waiting at a blackholed receiver holds no slot another could use.
            let addrs: Arc<[SocketAddr]> = match literal {
                Some(ip) => Arc::new([SocketAddr::new(ip, port)]),
                None => this.resolver.resolve(&host).await?,
            };
            let Some(receiver) = addrs.first().map(|a| SocketAddr::new(a.ip(), port)) else {
                return Err(SendError::Resolve {
                    host,
                    reason: "no addresses".into(),
                }
                .into());
            };
            let connecting = this.budget.connect_permit(receiver).await?;
            let slot = this.budget.open.clone().acquire_owned().await?;
            let stream = this.plain(addrs).call(uri).await?;
            drop(connecting);
            Ok(BudgetedStream {
                inner: stream,
                _slot: slot,
            })
        })
    }
}

/// One rustls configuration (webpki roots, verification on) for every endpoint: parsing
/// the root store per endpoint cost ~80 KB each with thousands of endpoints.
pub(crate) fn tls_config() -> rustls::ClientConfig {
    static CONFIG: std::sync::OnceLock<rustls::ClientConfig> = std::sync::OnceLock::new();
    CONFIG
        .get_or_init(|| {
            // The builder wants a process-wide crypto provider; this is the one place that
            // builds a TLS config, for deliveries and for `clickhook send` alike. An
            // embedding program that installed its own keeps it.
            let _ = rustls::crypto::ring::default_provider().install_default();
            let mut roots = rustls::RootCertStore::empty();
            roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
            rustls::ClientConfig::builder()
                .with_root_certificates(roots)
                .with_no_client_auth()
        })
        .clone()
}

type HttpsClient = Client<HttpsConnector<GuardedConnector>, Full<Bytes>>;

/// One endpoint's connection pool. Cloning shares the pool.
#[derive(Clone)]
pub struct EndpointClient {
    client: HttpsClient,
    /// For a client shared by many endpoints: a bound on requests in flight per receiver.
    origins: Option<Arc<OriginSlots>>,
}

type Origin = (Option<hyper::http::uri::Scheme>, Option<hyper::http::uri::Authority>);

/// Request slots per receiver, each free one to the waiter with the oldest event.
struct OriginSlots {
    per_origin: usize,
    slots: std::sync::Mutex<std::collections::HashMap<Origin, Arc<ReceiverSlots>>>,
}

impl OriginSlots {
    fn new(per_origin: usize) -> Self {
        OriginSlots {
            per_origin: per_origin.max(1),
            slots: std::sync::Mutex::new(std::collections::HashMap::new()),
        }
    }

    /// The slots of `uri`'s receiver. `None` only if the table's lock is poisoned, and
    /// then requests there go without one.
    fn for_origin(&self, uri: &Uri) -> Option<Arc<ReceiverSlots>> {
        let origin = (uri.scheme().cloned(), uri.authority().cloned());
        let mut map = self.slots.lock().ok()?;
        Some(
            map.entry(origin)
                .or_insert_with(|| ReceiverSlots::new(self.per_origin))
                .clone(),
        )
    }

    /// A slot for a request to `uri`'s receiver, once one is free. Such a request
    /// carries no event order of its own, and goes before queued events.
    async fn acquire(&self, uri: &Uri) -> Option<OriginSlot> {
        self.for_origin(uri)?.take(0).await
    }
}

/// A request slot at one receiver of a shared client, held for one attempt.
pub type OriginSlot = ReceiverSlot;

impl EndpointClient {
    pub fn new(policy: AddressPolicy, budget: ConnectionBudget, connect_timeout: Duration, max_idle: usize) -> Self {
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls_config())
            .https_or_http()
            .enable_http1()
            .enable_http2()
            .wrap_connector(GuardedConnector::new(policy, budget, connect_timeout));
        let client = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            // Idle connections hold descriptors and budget slots: not for long.
            .pool_idle_timeout(Duration::from_secs(30))
            .pool_max_idle_per_host(max_idle)
            .build(https);
        EndpointClient { client, origins: None }
    }

    /// The same, with at most `per_origin` requests in flight to any one receiver.
    fn shared(
        policy: AddressPolicy,
        budget: ConnectionBudget,
        connect_timeout: Duration,
        max_idle: usize,
        per_origin: usize,
    ) -> Self {
        EndpointClient {
            origins: Some(Arc::new(OriginSlots::new(per_origin))),
            ..EndpointClient::new(policy, budget, connect_timeout, max_idle)
        }
    }

    /// The client every endpoint on this delivery thread shares for `connect_timeout`,
    /// with at most `per_receiver` requests in flight to one receiver (scheme, host and
    /// port; `delivery.max_in_flight_per_receiver`). Without that bound, 10,000 endpoints
    /// on one receiver each sending up to their `max_concurrency` opened a connection per
    /// request in flight: tens of thousands of sockets, most of the shared connection
    /// budget, and 250 MiB more RSS in `many-endpoints`. A hung endpoint holds at most its
    /// own `max_concurrency` of these. As many connections per receiver stay open when
    /// idle as may be in flight there, so a burst's connections survive the lull after
    /// it: with half as many, each burst past the idle limit closed the excess and the
    /// next opened them again (7–8k connects in a 200,000-click `many-endpoints` run
    /// against 1.0–1.3k).
    ///
    /// hyper pools connections by origin, so endpoints that point at the same receiver —
    /// thousands of link-level endpoints often do — reuse each other's idle connections
    /// instead of each opening its own; distinct receivers still get distinct connections.
    /// Per-endpoint bounds stay with the endpoint's worker, which never waits on the pool:
    /// without an idle connection a request opens one (within the connection budget).
    pub fn for_this_thread(
        policy: &AddressPolicy,
        budget: &ConnectionBudget,
        connect_timeout: Duration,
        per_receiver: usize,
    ) -> Arc<Self> {
        thread_local! {
            static CLIENTS: std::cell::RefCell<std::collections::HashMap<(Duration, usize), Arc<EndpointClient>>> =
                std::cell::RefCell::new(std::collections::HashMap::new());
        }
        CLIENTS.with(|clients| {
            clients
                .borrow_mut()
                .entry((connect_timeout, per_receiver))
                .or_insert_with(|| {
                    Arc::new(EndpointClient::shared(
                        policy.clone(),
                        budget.clone(),
                        connect_timeout,
                        per_receiver,
                        per_receiver,
                    ))
                })
                .clone()
        })
    }

    /// The request slots of `uri`'s receiver on a client shared by a thread's endpoints,
    /// for a caller that takes a slot before it builds a request ([`Self::send`]);
    /// `None` on a client of one endpoint's own, which its worker's concurrency bounds.
    pub fn origin_slots(&self, uri: &Uri) -> Option<Arc<ReceiverSlots>> {
        self.origins.as_ref()?.for_origin(uri)
    }

    /// Sends one request under one deadline that covers everything up to the last byte
    /// of the response body. Redirects are not followed: a 3xx is a failed attempt. On a
    /// shared client the request goes in `held`, its receiver's slot taken by the caller
    /// ([`Self::origin_slots`]), or else first waits for one; either way the deadline
    /// starts once it has one, so a queue there does not spend attempts. The slot is
    /// released when the attempt ends.
    pub async fn send(
        &self,
        request: Request<Full<Bytes>>,
        timeout: Duration,
        held: Option<OriginSlot>,
    ) -> AttemptResult {
        let _slot = match (held, &self.origins) {
            (Some(slot), _) => Some(slot),
            (None, Some(origins)) => origins.acquire(request.uri()).await,
            (None, None) => None,
        };
        let started = Instant::now();
        let exchange = async {
            let response = self.client.request(request).await?;
            let status = response.status();
            let retry_after = retry_after(response.headers());
            let mut body = response.into_body();
            let mut kept = Vec::new();
            let mut total = 0usize;
            while let Some(frame) = body.frame().await {
                let frame = frame?;
                if let Some(data) = frame.data_ref() {
                    total += data.len();
                    let room = BODY_SNIPPET.saturating_sub(kept.len());
                    kept.extend_from_slice(&data[..data.len().min(room)]);
                    if total > MAX_RESPONSE_BODY {
                        break;
                    }
                }
            }
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>((status, retry_after, Bytes::from(kept)))
        };
        match tokio::time::timeout(timeout, exchange).await {
            Err(_) => AttemptResult::unanswered(
                Outcome::Timeout,
                started.elapsed(),
                format!("no complete answer within {}", humantime::format_duration(timeout)),
            ),
            Ok(Err(e)) => AttemptResult::unanswered(Outcome::Network, started.elapsed(), error_chain(e.as_ref())),
            Ok(Ok((status, retry_after, body))) => {
                let outcome = Outcome::of_status(status);
                AttemptResult {
                    outcome,
                    status: Some(status.as_u16()),
                    latency: started.elapsed(),
                    error: (outcome != Outcome::Success).then(|| format!("answered {status}")),
                    retry_after: retry_after.filter(|_| matches!(status.as_u16(), 429 | 503)),
                    body,
                }
            }
        }
    }
}

/// The request of one attempt, from the endpoint's fixed headers and this attempt's own
/// (names and values were validated with the endpoint), without copying the fixed ones
/// first: this runs once per attempt.
pub fn build_request(
    url: &Uri,
    fixed: &[(HeaderName, HeaderValue)],
    attempt: &[(HeaderName, HeaderValue)],
    body: Bytes,
) -> Request<Full<Bytes>> {
    // Parts set in place: a builder moves the whole request on every header it adds.
    let mut request = Request::new(Full::new(body));
    *request.method_mut() = hyper::Method::POST;
    *request.uri_mut() = url.clone();
    let headers = request.headers_mut();
    headers.reserve(fixed.len() + attempt.len());
    for (name, value) in fixed.iter().chain(attempt) {
        headers.append(name.clone(), value.clone());
    }
    request
}

/// A `Retry-After` in seconds or as an HTTP date, as a pause from now.
pub(crate) fn retry_after(headers: &hyper::HeaderMap) -> Option<Duration> {
    let value = headers.get(hyper::header::RETRY_AFTER)?.to_str().ok()?.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let when = httpdate::parse_http_date(value).ok()?;
    Some(when.duration_since(std::time::SystemTime::now()).unwrap_or_default())
}

fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let s_text = s.to_string();
        if !text.contains(&s_text) {
            text.push_str(": ");
            text.push_str(&s_text);
        }
        source = s.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::eventually;

    #[test]
    fn private_ranges_are_recognised() {
        for ip in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "::1",
            "fc00::1",
            "fe80::1",
            "::ffff:127.0.0.1",
            "fd00:ec2::254",
            "64:ff9b::a9fe:a9fe",
            "64:ff9b::10.0.0.1",
            "64:ff9b:1::a00:1",
            "2002:a00:1::1",
            "2002:7f00:1::",
            "::10.0.0.1",
        ] {
            assert!(is_private(ip.parse().unwrap()), "{ip}");
        }
        for ip in [
            "93.184.216.34",
            "8.8.8.8",
            "2606:4700::1111",
            "64:ff9b::808:808",
            "2002:808:808::1",
        ] {
            assert!(!is_private(ip.parse().unwrap()), "{ip}");
        }
    }

    #[test]
    fn allowed_cidrs_open_exactly_their_range() {
        let policy = AddressPolicy {
            allow_private: false,
            allowed: Arc::new(vec!["10.0.0.0/8".parse().unwrap()]),
        };
        assert!(policy.permits("10.9.9.9".parse().unwrap()));
        assert!(!policy.permits("192.168.0.1".parse().unwrap()));
        assert!(policy.permits("8.8.8.8".parse().unwrap()));
    }

    fn connector(policy: AddressPolicy, budget: ConnectionBudget) -> GuardedConnector {
        GuardedConnector::new(policy, budget, Duration::from_secs(30))
    }

    fn private_allowed() -> AddressPolicy {
        AddressPolicy {
            allow_private: true,
            allowed: Arc::new(vec![]),
        }
    }

    /// A listener whose accept queue is full and never drained: the kernel drops further
    /// SYNs, so connects to it hang as to a blackholed address.
    fn blackhole() -> (std::net::TcpListener, Vec<std::net::TcpStream>) {
        use std::os::fd::FromRawFd;
        // SAFETY: plain socket calls on a descriptor this function owns; it goes into the
        // returned listener, which closes it.
        let listener = unsafe {
            let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
            assert!(fd >= 0);
            let mut addr: libc::sockaddr_in = std::mem::zeroed();
            addr.sin_family = libc::AF_INET as libc::sa_family_t;
            addr.sin_addr.s_addr = u32::from(Ipv4Addr::LOCALHOST).to_be();
            let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
            assert_eq!(libc::bind(fd, (&raw const addr).cast(), len), 0);
            assert_eq!(libc::listen(fd, 0), 0);
            std::net::TcpListener::from_raw_fd(fd)
        };
        let addr = listener.local_addr().unwrap();
        // A backlog of 0 queues one connection; the next handshakes go unanswered.
        let queued = (0..3)
            .filter_map(|_| std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(300)).ok())
            .collect();
        (listener, queued)
    }

    #[tokio::test]
    async fn connects_hanging_at_one_receiver_do_not_hold_up_another() {
        use tower_service::Service;
        let (dead, _queued) = blackhole();
        let dead_port = dead.local_addr().unwrap().port();
        let live = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let live_port = live.local_addr().unwrap().port();
        // Open connections for the dead receiver's connects and 4 more: those waiting
        // for the receiver's permits must not hold any.
        let budget = ConnectionBudget::new(MAX_CONNECTING + 4);
        let conn = connector(private_allowed(), budget.clone());
        let mut hanging = Vec::new();
        for _ in 0..MAX_CONNECTING + 8 {
            let mut conn = conn.clone();
            let uri: Uri = format!("http://127.0.0.1:{dead_port}/").parse().unwrap();
            hanging.push(tokio::spawn(async move { conn.call(uri).await.map(drop) }));
        }
        assert!(
            eventually(Duration::from_secs(5), || budget.connects_in_progress()
                == MAX_CONNECTING)
            .await,
            "the dead receiver holds its own permits: {}",
            budget.connects_in_progress()
        );
        assert_eq!(budget.available(), 4, "connects waiting for a permit hold no open slot");
        for host in ["127.0.0.1", "localhost"] {
            let uri: Uri = format!("http://{host}:{live_port}/").parse().unwrap();
            let connected = tokio::time::timeout(Duration::from_secs(5), conn.clone().call(uri)).await;
            assert!(
                matches!(connected, Ok(Ok(_))),
                "{host}: another receiver connects at once"
            );
        }
        for task in &hanging {
            assert!(!task.is_finished(), "the dead receiver's connects still hang");
            task.abort();
        }
    }

    #[tokio::test]
    async fn a_name_is_looked_up_once_for_everyone_who_asks_meanwhile_and_then_reused() {
        let resolver = GuardedResolver::new(private_allowed(), Arc::default());
        let asks: Vec<_> = (0..50)
            .map(|_| {
                let resolver = resolver.clone();
                tokio::spawn(async move { resolver.resolve("localhost").await.map(|a| a.len()) })
            })
            .collect();
        for ask in asks {
            assert!(ask.await.unwrap().unwrap() > 0);
        }
        assert!(resolver.resolve("localhost").await.is_ok());
        assert_eq!(lookups(&resolver), 1, "51 askers, one lookup");
        // The reused addresses are held to the policy as a fresh lookup is.
        let refusing = GuardedResolver {
            policy: AddressPolicy::default(),
            ..resolver.clone()
        };
        let refused = refusing.resolve("localhost").await.unwrap_err();
        assert!(refused.to_string().contains("private"), "{refused}");
        // A failed lookup is not kept: the next ask looks up again.
        let bad = "name.invalid";
        assert!(resolver.resolve(bad).await.is_err());
        assert!(resolver.resolve(bad).await.is_err());
        assert_eq!(lookups(&resolver), 3);
    }

    #[tokio::test]
    async fn a_lookup_its_askers_gave_up_on_still_files_its_answer() {
        let resolver = GuardedResolver::new(private_allowed(), Arc::default());
        // Its one asker looks once, then gives up (its deadline passed).
        let mut asking = Box::pin(resolver.resolve("localhost"));
        let answered = futures_util::FutureExt::now_or_never(&mut asking);
        assert!(answered.is_none(), "a lookup cannot end before its first wait");
        drop(asking);
        let filed = || {
            matches!(
                resolver.table.lock().unwrap().names.entries.get("localhost"),
                Some(Resolved::Known { .. })
            )
        };
        assert!(
            eventually(Duration::from_secs(5), filed).await,
            "the answer is filed with the time it came"
        );
        assert!(resolver.resolve("localhost").await.is_ok());
        assert_eq!(lookups(&resolver), 1);
    }

    /// Lookups the resolver's table has started.
    fn lookups(resolver: &GuardedResolver) -> u64 {
        resolver.table.lock().unwrap().next_id
    }

    #[test]
    fn a_grown_name_table_drops_only_old_answers_and_then_waits_to_double() {
        let mut table = NameTable::default();
        let addrs: Arc<[SocketAddr]> = Arc::new([SocketAddr::from(([192, 0, 2, 1], 0))]);
        let old = Instant::now() - RESOLVED_FOR - Duration::from_secs(1);
        let add = |table: &mut NameTable, name: String, at: Instant| {
            let addrs = addrs.clone();
            table.names.entries.insert(name, Resolved::Known { at, addrs });
        };
        for i in 0..TABLE_PRUNE_FLOOR {
            add(&mut table, format!("fresh{i}"), Instant::now());
        }
        add(&mut table, "old".into(), old);
        table.prune();
        assert_eq!(table.names.entries.len(), TABLE_PRUNE_FLOOR, "only the old answer goes");
        // Now it waits until it holds twice as many before it looks again.
        add(&mut table, "old again".into(), old);
        for i in 0..TABLE_PRUNE_FLOOR - 2 {
            add(&mut table, format!("more{i}"), Instant::now());
        }
        table.prune();
        assert!(
            table.names.entries.contains_key("old again"),
            "no scan before the table doubles"
        );
        add(&mut table, "one more".into(), Instant::now());
        table.prune();
        assert!(!table.names.entries.contains_key("old again"), "a scan once it has");
    }

    #[test]
    fn a_lookups_outcome_is_filed_only_while_the_name_waits_for_that_lookup() {
        let mut table = NameTable::default();
        let pending = || -> Lookup { futures_util::FutureExt::shared(Box::pin(std::future::pending())) };
        table.names.entries.insert(
            "h".into(),
            Resolved::Running {
                id: 2,
                lookup: pending(),
            },
        );
        let failed: Result<Arc<[SocketAddr]>, Arc<io::Error>> = Err(Arc::new(io::Error::other("x")));
        // An older lookup's failure leaves the newer one running.
        table.file("h", 1, &failed);
        assert!(matches!(
            table.names.entries.get("h"),
            Some(Resolved::Running { id: 2, .. })
        ));
        let answer: Result<Arc<[SocketAddr]>, Arc<io::Error>> = Ok(Arc::new([SocketAddr::from(([192, 0, 2, 1], 0))]));
        table.file("h", 2, &answer);
        assert!(matches!(table.names.entries.get("h"), Some(Resolved::Known { .. })));
        // A failure filed late does not remove the answer.
        table.file("h", 2, &failed);
        assert!(matches!(table.names.entries.get("h"), Some(Resolved::Known { .. })));
    }

    fn turned(mut addrs: Vec<SocketAddr>, turn: usize) -> Vec<SocketAddr> {
        turn_within_families(&mut addrs, turn);
        addrs
    }

    #[test]
    fn answers_turn_within_each_family_the_first_family_first() {
        let a = |s: &str| s.parse::<SocketAddr>().unwrap();
        let addrs = vec![
            a("[2001:db8::1]:0"),
            a("192.0.2.1:0"),
            a("[2001:db8::2]:0"),
            a("192.0.2.2:0"),
            a("192.0.2.3:0"),
        ];
        assert_eq!(
            turned(addrs.clone(), 0),
            vec![
                a("[2001:db8::1]:0"),
                a("[2001:db8::2]:0"),
                a("192.0.2.1:0"),
                a("192.0.2.2:0"),
                a("192.0.2.3:0")
            ]
        );
        assert_eq!(
            turned(addrs, 1),
            vec![
                a("[2001:db8::2]:0"),
                a("[2001:db8::1]:0"),
                a("192.0.2.2:0"),
                a("192.0.2.3:0"),
                a("192.0.2.1:0")
            ]
        );
        assert!(turned(Vec::new(), 3).is_empty());
    }

    #[tokio::test]
    async fn the_connector_refuses_private_addresses_at_connect_time() {
        use tower_service::Service;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let deny = AddressPolicy::default();
        for url in [format!("http://127.0.0.1:{port}/"), format!("http://localhost:{port}/")] {
            let mut conn = connector(deny.clone(), ConnectionBudget::new(4));
            let err = conn
                .call(url.parse().unwrap())
                .await
                .err()
                .map(|e| format!("{e:?}"))
                .expect("refused");
            assert!(err.to_lowercase().contains("private"), "{url}: {err}");
        }
        let allow = AddressPolicy {
            allow_private: true,
            allowed: Arc::new(vec![]),
        };
        let budget = ConnectionBudget::new(1);
        let mut conn = connector(allow, budget.clone());
        let first = conn
            .call(format!("http://localhost:{port}/").parse().unwrap())
            .await
            .unwrap();
        assert_eq!(budget.available(), 0, "an open connection holds its slot");
        let second = conn.call(format!("http://localhost:{port}/").parse().unwrap());
        let waited = tokio::time::timeout(Duration::from_millis(200), second).await;
        assert!(waited.is_err(), "past the budget a connect waits");
        drop(first);
        assert_eq!(budget.available(), 1, "closing the connection frees its slot");
    }

    /// A test receiver's counters: connections accepted, and the most requests it held
    /// at once.
    struct Receiver {
        port: u16,
        accepted: Arc<std::sync::atomic::AtomicUsize>,
        most: Arc<std::sync::atomic::AtomicUsize>,
    }

    /// A receiver that answers every request 200, after `delay`, on keep-alive connections.
    async fn receiver(delay: Duration) -> Receiver {
        use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (accepted, most) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let active = Arc::new(AtomicUsize::new(0));
        let (counter, seen_most) = (accepted.clone(), most.clone());
        tokio::spawn(async move {
            loop {
                let (mut conn, _) = listener.accept().await.unwrap();
                counter.fetch_add(1, SeqCst);
                let (most, active) = (seen_most.clone(), active.clone());
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 4096];
                    let mut seen = Vec::new();
                    loop {
                        let n = match conn.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => n,
                        };
                        seen.extend_from_slice(&buf[..n]);
                        // Each test request is a small POST with a 2-byte body after the headers.
                        while let Some(end) = seen.windows(4).position(|w| w == b"\r\n\r\n") {
                            if seen.len() < end + 4 + 2 {
                                break;
                            }
                            seen.drain(..end + 4 + 2);
                            let now = active.fetch_add(1, SeqCst) + 1;
                            most.fetch_max(now, SeqCst);
                            tokio::time::sleep(delay).await;
                            active.fetch_sub(1, SeqCst);
                            let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n";
                            if conn.write_all(answer).await.is_err() {
                                return;
                            }
                        }
                    }
                });
            }
        });
        Receiver { port, accepted, most }
    }

    #[tokio::test]
    async fn endpoints_on_one_thread_share_connections_to_the_same_receiver() {
        let Receiver { port, accepted, .. } = receiver(Duration::ZERO).await;
        let policy = AddressPolicy {
            allow_private: true,
            allowed: Arc::new(vec![]),
        };
        let budget = ConnectionBudget::new(16);
        let first_endpoint = EndpointClient::for_this_thread(&policy, &budget, Duration::from_secs(5), 512);
        let second_endpoint = EndpointClient::for_this_thread(&policy, &budget, Duration::from_secs(5), 512);
        for (client, path) in [
            (&first_endpoint, "/a"),
            (&second_endpoint, "/b"),
            (&first_endpoint, "/c"),
        ] {
            let url: Uri = format!("http://127.0.0.1:{port}{path}").parse().unwrap();
            let request = build_request(&url, &[], &[], Bytes::from_static(b"{}"));
            let result = client.send(request, Duration::from_secs(5), None).await;
            assert_eq!(result.outcome, Outcome::Success, "{:?}", result.error);
        }
        assert_eq!(
            accepted.load(std::sync::atomic::Ordering::SeqCst),
            1,
            "three requests from two endpoints to one receiver use one connection"
        );
        assert_eq!(budget.connects_in_progress(), 0, "a finished connect frees its permit");
    }

    #[tokio::test]
    async fn a_shared_client_bounds_requests_in_flight_per_receiver_and_not_across_them() {
        use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
        let Receiver {
            port: slow_port, most, ..
        } = receiver(Duration::from_millis(400)).await;
        let fast_port = receiver(Duration::ZERO).await.port;
        let policy = AddressPolicy {
            allow_private: true,
            allowed: Arc::new(vec![]),
        };
        let client = Arc::new(EndpointClient::shared(
            policy,
            ConnectionBudget::new(64),
            Duration::from_secs(5),
            16,
            2,
        ));
        let post = |port: u16| {
            let url: Uri = format!("http://127.0.0.1:{port}/x").parse().unwrap();
            build_request(&url, &[], &[], Bytes::from_static(b"{}"))
        };
        let slow_done = Arc::new(AtomicUsize::new(0));
        let mut slow = Vec::new();
        for _ in 0..6 {
            let (client, request, done) = (client.clone(), post(slow_port), slow_done.clone());
            slow.push(tokio::spawn(async move {
                let result = client.send(request, Duration::from_secs(30), None).await;
                done.fetch_add(1, SeqCst);
                result
            }));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        // Another receiver is not held up by the slow one's full slots.
        let fast = client.send(post(fast_port), Duration::from_secs(30), None).await;
        assert_eq!(fast.outcome, Outcome::Success, "{:?}", fast.error);
        assert!(
            slow_done.load(SeqCst) < 6,
            "the other receiver's request finished only after the slow receiver's queue"
        );
        for handle in slow {
            let result = handle.await.unwrap();
            assert_eq!(result.outcome, Outcome::Success, "{:?}", result.error);
        }
        assert_eq!(
            most.load(SeqCst),
            2,
            "six requests, at most two at once at one receiver"
        );
    }

    #[test]
    fn retry_after_reads_seconds_and_dates() {
        let mut h = hyper::HeaderMap::new();
        h.insert(hyper::header::RETRY_AFTER, HeaderValue::from_static("7"));
        assert_eq!(retry_after(&h), Some(Duration::from_secs(7)));
        let later = std::time::SystemTime::now() + Duration::from_secs(120);
        h.insert(
            hyper::header::RETRY_AFTER,
            HeaderValue::from_str(&httpdate::fmt_http_date(later)).unwrap(),
        );
        let d = retry_after(&h).unwrap();
        assert!(d > Duration::from_secs(100) && d <= Duration::from_secs(120));
    }
}
