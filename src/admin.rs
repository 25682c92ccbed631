//! The admin listener: health, readiness and `/metrics` for operators and Prometheus,
//! and the endpoint management API of SPEC §5. It owns admin authentication and the JSON
//! shapes of §9. It must not bypass the registry or the log: every change goes through
//! them, so delivery sees it the same way whether it came from here or the config file.

use crate::deliver::format::{self, RenderContext};
use crate::deliver::send::{AddressPolicy, ConnectionBudget, EndpointClient};
use crate::endpoints::{endpoint_config_from, EndpointError, EndpointRegistry, LiveEndpoint};
use crate::ingest::http::{bearer_matches, json, json_error, method_not_allowed};
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, AUTHORIZATION, CONNECTION, CONTENT_TYPE, RETRY_AFTER};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use metrics_exporter_prometheus::PrometheusHandle;
use serde_json::{json, Map, Value};
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::{oneshot, watch};

pub struct AdminState {
    pub registry: Arc<EndpointRegistry>,
    pub metrics: PrometheusHandle,
    pub ready: AtomicBool,
    pub token: String,
    /// Which destinations endpoints may have (checked on create and change).
    pub addresses: AddressPolicy,
    /// The outbound connection budget test events draw from, like deliveries.
    pub connections: ConnectionBudget,
}

/// At most this many open admin connections: past it, new connections wait in the kernel's backlog
/// instead of costing memory here.
const MAX_CONNECTIONS: usize = 256;

pub async fn serve(listener: TcpListener, state: Arc<AdminState>, mut shutdown: watch::Receiver<bool>) {
    let stop = async move {
        let _ = shutdown.changed().await;
    };
    accept(&listener, stop, move |req| {
        let state = state.clone();
        async move { route(req, &state).await }
    })
    .await;
}

/// Answers on the admin listener while the daemon starts (the log may take a while to
/// recover): `/healthz` 200, `/readyz` and everything else 503 with `Retry-After: 1`, each
/// on a connection that closes after it, so no probe stays on this server once it hands
/// the listener back at `started`.
pub async fn serve_starting(listener: TcpListener, started: oneshot::Receiver<()>) -> TcpListener {
    accept(&listener, started, |req: Request<Incoming>| async move {
        let mut resp = match (req.method(), req.uri().path()) {
            (&Method::GET, "/healthz") => text(StatusCode::OK, "ok\n"),
            (&Method::GET, "/readyz") => text(StatusCode::SERVICE_UNAVAILABLE, "starting\n"),
            _ => json_error(StatusCode::SERVICE_UNAVAILABLE, "the daemon is starting", None),
        };
        if resp.status() == StatusCode::SERVICE_UNAVAILABLE {
            resp.headers_mut().insert(RETRY_AFTER, HeaderValue::from_static("1"));
        }
        resp.headers_mut().insert(CONNECTION, HeaderValue::from_static("close"));
        resp
    })
    .await;
    listener
}

/// Serves HTTP/1.1 connections with `handle` until `stop` completes.
async fn accept<H, F>(listener: &TcpListener, stop: impl Future, handle: H)
where
    H: Fn(Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<Full<Bytes>>> + Send + 'static,
{
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let mut stop = std::pin::pin!(stop);
    loop {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = &mut stop => return,
        };
        let Ok((stream, _)) = accepted else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let handle = handle.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let service = service_fn(move |req| {
                let answer = handle(req);
                async move { Ok::<_, std::convert::Infallible>(answer.await) }
            });
            let _ = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

async fn route(req: Request<Incoming>, state: &AdminState) -> Response<Full<Bytes>> {
    let path = req.uri().path().to_string();
    match (req.method(), path.as_str()) {
        (&Method::GET, "/healthz") => text(StatusCode::OK, "ok\n"),
        (&Method::GET, "/readyz") => {
            if !state.ready.load(Ordering::SeqCst) {
                text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
            } else if let Some(failure) = state.registry.log().write_failure() {
                // Every append fails as this one did: a balancer should send clicks elsewhere.
                text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    &format!("not ready: writes to the log fail: {failure}\n"),
                )
            } else {
                text(StatusCode::OK, "ready\n")
            }
        }
        (&Method::GET, "/metrics") => {
            state.metrics.run_upkeep();
            let mut resp = text(StatusCode::OK, &state.metrics.render());
            resp.headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static("text/plain; version=0.0.4"));
            resp
        }
        (_, "/healthz" | "/readyz" | "/metrics") => method_not_allowed("GET"),
        _ if path.starts_with("/v1/") || path.starts_with("/api/v1/") => {
            if !state.token.is_empty()
                && !bearer_matches(req.headers().get(AUTHORIZATION), std::slice::from_ref(&state.token))
            {
                return json_error(StatusCode::UNAUTHORIZED, "missing or wrong admin bearer token", None);
            }
            api(req, state).await
        }
        _ => json_error(StatusCode::NOT_FOUND, "no such route", None),
    }
}

async fn api(req: Request<Incoming>, state: &AdminState) -> Response<Full<Bytes>> {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let query = req.uri().query().unwrap_or_default().to_string();
    let body = match read_body(req.into_body(), BODY_WITHIN).await {
        Ok(body) => body,
        Err(refused) => return refused,
    };
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    let result = match (&method, parts.as_slice()) {
        (&Method::GET, ["v1", "endpoints"]) => Ok(json(
            StatusCode::OK,
            &Value::Array(state.registry.all().iter().map(|e| e.describe()).collect()),
        )),
        (&Method::POST, ["v1", "endpoints"]) => create(state, &body, None).await,
        (&Method::GET, ["v1", "endpoints", id]) => endpoint(state, id).map(|ep| json(StatusCode::OK, &ep.describe())),
        (&Method::PATCH, ["v1", "endpoints", id]) => patch(state, id, &body).await,
        (&Method::DELETE, ["v1", "endpoints", id]) => state
            .registry
            .delete(id)
            .await
            .map(|_| json(StatusCode::OK, &json!({"deleted": id})))
            .map_err(Into::into),
        (&Method::GET, ["v1", "endpoints", id, "secret"]) => secret(state, id),
        (&Method::POST, ["v1", "endpoints", id, "secret", "rotate"]) => state
            .registry
            .rotate_secret(id)
            .await
            .map(|s| json(StatusCode::OK, &json!({ "secret": s })))
            .map_err(Into::into),
        (&Method::POST, ["v1", "endpoints", id, "test"]) => test_event(state, id).await,
        (&Method::GET, ["v1", "endpoints", id, "attempts"]) => attempts(state, id, &query),
        (&Method::GET, ["v1", "endpoints", id, "stats"]) => stats(state, id).await,
        (&Method::GET, ["v1", "endpoints", id, "dead"]) => dead(state, id, &query),
        (&Method::POST, ["v1", "endpoints", id, "replay"]) => replay(state, id, &body).await,
        (&Method::POST, ["api", "v1", scope @ ("link" | "workspace"), owner, "webhooks"]) => {
            linkly_create(state, scope, owner, &body).await
        }
        (&Method::GET, ["api", "v1", scope @ ("link" | "workspace"), owner, "webhooks"]) => {
            Ok(json(StatusCode::OK, &Value::Array(linkly_hooks(state, scope, owner))))
        }
        (&Method::DELETE, ["api", "v1", scope @ ("link" | "workspace"), owner, "webhooks", hook]) => {
            if linkly_hooks(state, scope, owner).iter().any(|h| h["id"] == *hook) {
                state
                    .registry
                    .delete(hook)
                    .await
                    .map(|_| json(StatusCode::OK, &json!({"deleted": hook})))
                    .map_err(Into::into)
            } else {
                Err(ApiError::NotFound(format!("no webhook {hook:?} on {scope} {owner:?}")))
            }
        }
        _ => Err(match allowed_methods(parts.as_slice()) {
            Some(allow) => ApiError::MethodNotAllowed(allow),
            None => ApiError::NotFound("no such route".into()),
        }),
    };
    result.unwrap_or_else(|e| e.response())
}

/// The methods a route takes, for the 405 to a known route asked with another.
fn allowed_methods(parts: &[&str]) -> Option<&'static str> {
    Some(match parts {
        ["v1", "endpoints"] => "GET, POST",
        ["v1", "endpoints", _] => "GET, PATCH, DELETE",
        ["v1", "endpoints", _, "secret" | "attempts" | "stats" | "dead"] => "GET",
        ["v1", "endpoints", _, "secret", "rotate"] | ["v1", "endpoints", _, "test" | "replay"] => "POST",
        ["api", "v1", "link" | "workspace", _, "webhooks"] => "GET, POST",
        ["api", "v1", "link" | "workspace", _, "webhooks", _] => "DELETE",
        _ => return None,
    })
}

/// Largest admin request body.
const MAX_ADMIN_BODY: usize = 1 << 20;
/// How long a request's body may take once its headers are in: a client that stops
/// sending would otherwise hold one of the listener's connections, which the health
/// checks and `/metrics` share, for good.
const BODY_WITHIN: Duration = Duration::from_secs(30);

/// A request's body, or the answer that refuses it: 413 past [`MAX_ADMIN_BODY`], 408
/// when it does not arrive `within`, 400 when it cannot be read.
async fn read_body<B>(body: B, within: Duration) -> Result<Bytes, Response<Full<Bytes>>>
where
    B: hyper::body::Body<Data = Bytes>,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    match tokio::time::timeout(within, Limited::new(body, MAX_ADMIN_BODY).collect()).await {
        Ok(Ok(collected)) => Ok(collected.to_bytes()),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => Err(json_error(
            StatusCode::PAYLOAD_TOO_LARGE,
            "admin request body over 1 MiB",
            None,
        )),
        Ok(Err(e)) => Err(json_error(
            StatusCode::BAD_REQUEST,
            &format!("cannot read the request body: {e}"),
            None,
        )),
        Err(_) => Err(json_error(
            StatusCode::REQUEST_TIMEOUT,
            &format!("the request body did not arrive within {} s", within.as_secs_f64()),
            None,
        )),
    }
}

/// Admin failures, each with the status that says whose fault it is.
#[derive(Debug, thiserror::Error)]
enum ApiError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("this route takes {0}")]
    MethodNotAllowed(&'static str),
    #[error("{0}")]
    Internal(String),
}

impl ApiError {
    fn response(&self) -> Response<Full<Bytes>> {
        let status = match self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            // The one 405 of both listeners, with its `Allow`.
            ApiError::MethodNotAllowed(allow) => return method_not_allowed(allow),
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        json_error(status, &self.to_string(), None)
    }
}

impl From<EndpointError> for ApiError {
    fn from(e: EndpointError) -> Self {
        match e {
            EndpointError::Invalid { .. } => ApiError::BadRequest(e.to_string()),
            EndpointError::NotFound(_) => ApiError::NotFound(e.to_string()),
            EndpointError::Exists(_) | EndpointError::FromConfig(_) => ApiError::Conflict(e.to_string()),
            EndpointError::Log(_) => ApiError::Internal(e.to_string()),
        }
    }
}

type ApiResult = Result<Response<Full<Bytes>>, ApiError>;

fn endpoint(state: &AdminState, id: &str) -> Result<Arc<LiveEndpoint>, ApiError> {
    state
        .registry
        .get(id)
        .ok_or_else(|| ApiError::NotFound(format!("no endpoint {id:?}")))
}

fn parse_object(body: &[u8]) -> Result<Map<String, Value>, ApiError> {
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err(ApiError::BadRequest("the body must be a JSON object".into())),
        Err(e) => Err(ApiError::BadRequest(format!("malformed JSON: {e}"))),
    }
}

/// Refuses URLs whose host is, or resolves to, a private address (unless allowed).
async fn check_destination(state: &AdminState, url: &str) -> Result<(), ApiError> {
    let uri: hyper::Uri = url
        .parse()
        .map_err(|e| ApiError::BadRequest(format!("url: {url:?}: {e}")))?;
    state
        .connections
        .resolver(state.addresses.clone())
        .check_url(&uri)
        .await
        .map_err(|e| ApiError::BadRequest(format!("url: {e}")))
}

async fn create(state: &AdminState, body: &[u8], defaults: Option<Map<String, Value>>) -> ApiResult {
    let mut fields = defaults.unwrap_or_default();
    fields.extend(parse_object(body)?);
    if !fields.contains_key("id") {
        fields.insert(
            "id".into(),
            Value::String(format!("ep_{}", uuid::Uuid::now_v7().simple())),
        );
    }
    let config = endpoint_config_from(Value::Object(fields))?;
    check_destination(state, &config.url).await?;
    let live = state.registry.create(config).await?;
    let mut out = live.describe();
    out["secret"] = Value::String(live.settings().config.secret.clone().unwrap_or_default());
    Ok(json(StatusCode::CREATED, &out))
}

async fn patch(state: &AdminState, id: &str, body: &[u8]) -> ApiResult {
    let fields = parse_object(body)?;
    // Whose fault first: a config-file endpoint cannot change here, whatever the URL.
    if endpoint(state, id)?.patch_is_the_files(&fields) {
        return Err(EndpointError::FromConfig(id.into()).into());
    }
    if let Some(url) = fields.get("url").and_then(Value::as_str) {
        check_destination(state, url).await?;
    }
    let live = state.registry.update(id, fields).await?;
    Ok(json(StatusCode::OK, &live.describe()))
}

async fn test_event(state: &AdminState, id: &str) -> ApiResult {
    let ep = endpoint(state, id)?;
    let settings = ep.settings();
    let event_id = format!("evt_test_{}", uuid::Uuid::now_v7().simple());
    let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    let event = json!({
        "id": event_id, "timestamp": now,
        "link": {"id": "test", "workspace_id": "test", "slug": "/test", "domain": "links.example",
                 "destination": "https://example.com/", "name": "clickhook test event"},
        "click": {"country": "US", "user_agent": "clickhook-test", "browser": {"name": null, "version": null},
                  "os": {"name": null, "version": null}, "device": "unknown", "device_vendor": null,
                  "bot_name": null, "is_eu_country": false},
        "metadata": {"test": true}
    });
    let data = serde_json::to_vec(&event).map_err(|e| ApiError::Internal(e.to_string()))?;
    let batched = settings.config.batch_max > 1;
    let webhook_id = if batched {
        format!("batch_test_{}", uuid::Uuid::now_v7().simple())
    } else {
        event_id
    };
    let ctx = RenderContext {
        endpoint_id: &ep.id,
        webhook_id: &webhook_id,
        include_ip: false,
        batch: batched,
    };
    let body = format::render(settings.config.format, &[&data], &ctx).map_err(|e| ApiError::Internal(e.to_string()))?;
    let client = EndpointClient::new(state.addresses.clone(), state.connections.clone(), settings.timeout, 1);
    let result = crate::deliver::attempt(&client, &settings, &webhook_id, Bytes::from(body), None).await;
    Ok(json(
        StatusCode::OK,
        &json!({
            "status": result.status,
            "latency_ms": result.latency.as_secs_f64() * 1000.0,
            "body": String::from_utf8_lossy(&result.body),
            "error": result.error,
        }),
    ))
}

/// The newest secret, and the Ed25519 public key when the endpoint signs with `v1a`.
fn secret(state: &AdminState, id: &str) -> ApiResult {
    let ep = endpoint(state, id)?;
    let mut out = json!({ "secret": state.registry.secret(id)? });
    if let Some(key) = &ep.settings().asymmetric {
        out["public_key"] = Value::String(key.public_key());
    }
    Ok(json(StatusCode::OK, &out))
}

/// The most a list answers with at once.
const LIMIT_MAX: usize = 10_000;

/// `?limit=N`, or `default` without one; anything but a whole number from 1 to
/// [`LIMIT_MAX`] is refused rather than bent into range.
fn limit_of(query: &str, default: usize) -> Result<usize, ApiError> {
    let Some(text) = query.split('&').find_map(|p| p.strip_prefix("limit=")) else {
        return Ok(default);
    };
    match text.parse::<usize>() {
        Ok(n) if (1..=LIMIT_MAX).contains(&n) => Ok(n),
        _ => Err(ApiError::BadRequest(format!(
            "limit: {text:?} is not a whole number from 1 to {LIMIT_MAX}"
        ))),
    }
}

fn attempts(state: &AdminState, id: &str, query: &str) -> ApiResult {
    let ep = endpoint(state, id)?;
    let limit = limit_of(query, 100)?;
    let cutoff_ms = crate::log::now_ms().saturating_sub(30 * 24 * 3600 * 1000);
    let history = ep
        .history
        .lock()
        .map_err(|_| ApiError::Internal("history lock poisoned".into()))?;
    let list: Vec<Value> = history
        .attempts
        .iter()
        .filter(|a| a.at_ms >= cutoff_ms)
        .take(limit)
        .map(|a| a.to_json())
        .collect();
    Ok(json(StatusCode::OK, &Value::Array(list)))
}

async fn stats(state: &AdminState, id: &str) -> ApiResult {
    let ep = endpoint(state, id)?;
    // Counting walks every dead letter, millions for an endpoint down for days: off the
    // runtime, whose other requests and connections would wait meanwhile.
    let (log, key) = (state.registry.log().clone(), ep.key);
    let dead = tokio::task::spawn_blocking(move || log.count_dead(key))
        .await
        .map_err(|e| ApiError::Internal(format!("counting dead letters stopped: {e}")))?
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    let minute = crate::log::now_ms() / 60_000;
    let history = ep
        .history
        .lock()
        .map_err(|_| ApiError::Internal("history lock poisoned".into()))?;
    Ok(json(
        StatusCode::OK,
        &json!({
            "delivered": history.delivered,
            "failed_attempts": history.failed_attempts,
            "pending": ep.pending.load(Ordering::Relaxed).max(0),
            "dead": dead,
            "success_rate_1h": history.success_rate(minute, 60),
            "success_rate_24h": history.success_rate(minute, 1440),
            "circuit": ep.circuit_state().as_str(),
        }),
    ))
}

fn dead(state: &AdminState, id: &str, query: &str) -> ApiResult {
    let ep = endpoint(state, id)?;
    let letters = state
        .registry
        .log()
        .dead_letters(ep.key, limit_of(query, 1000)?)
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    let list = letters
        .iter()
        .map(|d| {
            json!({
                "event_id": d.event_id, "attempts": d.attempts, "dead_at": rfc3339_ms(d.dead_at_ms),
                "accepted_at": rfc3339_ms(d.accepted_ms), "last_status": d.last_status, "last_error": d.last_error,
            })
        })
        .collect();
    Ok(json(StatusCode::OK, &Value::Array(list)))
}

async fn replay(state: &AdminState, id: &str, body: &[u8]) -> ApiResult {
    let fields = parse_object(body)?;
    let replayed = if fields.get("dead").and_then(Value::as_bool) == Some(true) {
        state.registry.replay_dead(id).await?
    } else {
        let time = |k: &str| -> Result<u64, ApiError> {
            let text = fields
                .get(k)
                .and_then(Value::as_str)
                .ok_or_else(|| ApiError::BadRequest(format!("{k}: required (RFC 3339), or give {{\"dead\": true}}")))?;
            chrono::DateTime::parse_from_rfc3339(text)
                .map(|t| t.timestamp_millis().max(0) as u64)
                .map_err(|e| ApiError::BadRequest(format!("{k}: {text:?} is not RFC 3339: {e}")))
        };
        let (since, until) = (time("since")?, time("until")?);
        if until <= since {
            return Err(ApiError::BadRequest("until: must be after since".into()));
        }
        state.registry.replay_window(id, since, until).await?
    };
    Ok(json(StatusCode::OK, &json!({ "replayed": replayed })))
}

/// Linkly-compatible webhooks: a `linkly`-format endpoint scoped to one link or workspace.
async fn linkly_create(state: &AdminState, scope: &str, owner: &str, body: &[u8]) -> ApiResult {
    let fields = parse_object(body)?;
    let url = fields
        .get("url")
        .and_then(Value::as_str)
        .ok_or_else(|| ApiError::BadRequest("url: required".into()))?;
    let id = format!(
        "linkly-{scope}-{}-{}",
        sanitize(owner),
        &uuid::Uuid::now_v7().simple().to_string()[20..]
    );
    let filter = if scope == "link" { "links" } else { "workspaces" };
    let mut spec = Map::new();
    spec.insert("id".into(), Value::String(id));
    spec.insert("url".into(), Value::String(url.into()));
    spec.insert("format".into(), Value::String("linkly".into()));
    spec.insert(filter.into(), json!([owner]));
    let created = create(
        state,
        &serde_json::to_vec(&Value::Object(spec)).unwrap_or_default(),
        None,
    )
    .await?;
    let (parts, body) = created.into_parts();
    let full: Value =
        serde_json::from_slice(&body.collect().await.map(|b| b.to_bytes()).unwrap_or_default()).unwrap_or_default();
    Ok(json(parts.status, &json!({"id": full["id"], "url": full["url"]})))
}

fn linkly_hooks(state: &AdminState, scope: &str, owner: &str) -> Vec<Value> {
    let prefix = format!("linkly-{scope}-");
    state
        .registry
        .all()
        .iter()
        .filter(|ep| ep.id.starts_with(&prefix))
        .filter(|ep| {
            let c = &ep.settings().config;
            let list = if scope == "link" { &c.links } else { &c.workspaces };
            list.len() == 1 && list[0] == owner
        })
        .map(|ep| json!({"id": ep.id, "url": ep.settings().config.url}))
        .collect()
}

fn sanitize(text: &str) -> String {
    text.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .take(64)
        .collect()
}

fn rfc3339_ms(ms: u64) -> String {
    chrono::DateTime::from_timestamp_millis(ms as i64)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
        .unwrap_or_default()
}

fn text(status: StatusCode, body: &str) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body.to_string())));
    *resp.status_mut() = status;
    resp
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A body that sends one frame and then nothing, nor ends.
    fn stalled() -> impl hyper::body::Body<Data = Bytes, Error = std::io::Error> {
        use futures_util::StreamExt;
        let first: Result<_, std::io::Error> = Ok(hyper::body::Frame::data(Bytes::from_static(b"{\"id\"")));
        let frames = futures_util::stream::iter([first]).chain(futures_util::stream::pending());
        http_body_util::StreamBody::new(frames)
    }

    #[tokio::test]
    async fn a_body_that_stops_arriving_is_answered_408_and_one_too_large_413() {
        let refused = read_body(stalled(), Duration::from_millis(50)).await.unwrap_err();
        assert_eq!(refused.status(), StatusCode::REQUEST_TIMEOUT);
        let big = Full::new(Bytes::from(vec![b' '; MAX_ADMIN_BODY + 1]));
        let refused = read_body(big, Duration::from_secs(5)).await.unwrap_err();
        assert_eq!(refused.status(), StatusCode::PAYLOAD_TOO_LARGE);
        let fine = read_body(Full::new(Bytes::from_static(b"{}")), Duration::from_secs(5)).await;
        assert_eq!(fine.unwrap(), Bytes::from_static(b"{}"));
    }

    async fn get(addr: std::net::SocketAddr, path: &str) -> String {
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let request = format!("GET {path} HTTP/1.1\r\nhost: x\r\n\r\n");
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut answer = String::new();
        // The connection closes after the answer, so reading to the end ends.
        tokio::time::timeout(Duration::from_secs(5), stream.read_to_string(&mut answer))
            .await
            .expect("the starting server closes its connections")
            .unwrap();
        answer
    }

    #[tokio::test]
    async fn while_starting_health_is_200_and_the_rest_503_until_the_listener_is_handed_back() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (started, started_rx) = oneshot::channel();
        let starting = tokio::spawn(serve_starting(listener, started_rx));
        assert!(get(addr, "/healthz").await.starts_with("HTTP/1.1 200"));
        let ready = get(addr, "/readyz").await;
        assert!(ready.starts_with("HTTP/1.1 503"), "{ready}");
        assert!(ready.to_ascii_lowercase().contains("retry-after: 1"), "{ready}");
        let api = get(addr, "/v1/endpoints").await;
        assert!(api.starts_with("HTTP/1.1 503"), "{api}");
        assert!(api.to_ascii_lowercase().contains("retry-after: 1"), "{api}");
        started.send(()).unwrap();
        let back = tokio::time::timeout(Duration::from_secs(5), starting)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            back.local_addr().unwrap(),
            addr,
            "the same listener, for the real admin server"
        );
    }
}
