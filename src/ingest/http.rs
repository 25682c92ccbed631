//! `POST /v1/clicks` (SPEC §3.2): bodies of one object, an array or NDJSON; 202 with the
//! ids once durable; 400 naming the failing object; 401, 413 and 503 as the contract
//! says. It owns the ingest HTTP listener and its limits, and must not answer 202 for
//! anything the log has not made durable.

use super::click::{self, Framing, PreparedClick};
use super::{adapters, ByteBudget, IngestError, Ingestor, FINISH_WITHIN};
use crate::deliver::format::Format;
use crate::metrics::{self, Source};
use crate::said_seldom::RateLimited;
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, AUTHORIZATION, CONTENT_LENGTH, CONTENT_TYPE, RETRY_AFTER};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;

/// "An append failed", said at most every 10 s: on a full disk every request fails so.
static APPEND_FAILED: RateLimited = RateLimited::new(10_000);

/// How long a client may take to send its request headers (slowloris guard).
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

pub struct HttpIngestSettings {
    pub max_body: usize,
    pub tokens: Vec<String>,
    /// Bytes of request bodies all connections may hold at once. A body whose
    /// `Content-Length` is more than is free when it starts is answered 503 at once, one
    /// sent in parts when a part does not fit.
    pub body_budget: ByteBudget,
}

/// At most this many open ingest HTTP connections: past it, new connections wait in the kernel's backlog
/// instead of costing memory here.
const MAX_CONNECTIONS: usize = 4096;

/// Serves until `shutdown` turns true, then finishes the requests already received.
pub async fn serve(
    listener: TcpListener,
    ingestor: Arc<Ingestor>,
    settings: HttpIngestSettings,
    mut shutdown: watch::Receiver<bool>,
) {
    let budget = settings.body_budget.clone();
    let settings = Arc::new(settings);
    let mut connections = JoinSet::new();
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let accepted = tokio::select! {
            a = accept_within(&listener, &slots) => a,
            _ = shutdown.changed() => break,
        };
        let (accepted, slot) = match accepted {
            Some((a, slot)) => (a, slot),
            None => break,
        };
        let (stream, _) = match accepted {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "ingest accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let ingestor = ingestor.clone();
        let settings = settings.clone();
        let budget = budget.clone();
        let mut shutdown = shutdown.clone();
        connections.spawn(async move {
            let _slot = slot;
            let service = service_fn(move |req| handle(req, ingestor.clone(), settings.clone(), budget.clone()));
            let conn = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service);
            tokio::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => {}
                _ = shutdown.changed() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.await;
                }
            }
        });
        while connections.try_join_next().is_some() {}
    }
    while connections.join_next().await.is_some() {}
}

/// Waits for a free connection slot, then for a connection.
async fn accept_within(
    listener: &TcpListener,
    slots: &Arc<tokio::sync::Semaphore>,
) -> Option<(
    std::io::Result<(tokio::net::TcpStream, std::net::SocketAddr)>,
    tokio::sync::OwnedSemaphorePermit,
)> {
    let slot = slots.clone().acquire_owned().await.ok()?;
    Some((listener.accept().await, slot))
}

async fn handle(
    req: Request<Incoming>,
    ingestor: Arc<Ingestor>,
    settings: Arc<HttpIngestSettings>,
    budget: ByteBudget,
) -> Result<Response<Full<Bytes>>, std::convert::Infallible> {
    Ok(match (req.method(), req.uri().path()) {
        (&Method::POST, "/v1/clicks") => ingest(req, &ingestor, &settings, budget).await,
        (_, "/v1/clicks") => method_not_allowed("POST"),
        _ => json_error(
            StatusCode::NOT_FOUND,
            "no such route; clicks go to POST /v1/clicks",
            None,
        ),
    })
}

async fn ingest(
    req: Request<Incoming>,
    ingestor: &Ingestor,
    settings: &HttpIngestSettings,
    budget: ByteBudget,
) -> Response<Full<Bytes>> {
    if !settings.tokens.is_empty() && !authorized(&req, &settings.tokens) {
        metrics::ingest_rejected(Source::Http, "unauthorized", 1);
        return json_error(StatusCode::UNAUTHORIZED, "missing or wrong bearer token", None);
    }
    if let Err(e) = ingestor.gate.check() {
        metrics::ingest_rejected(Source::Http, "unavailable", 1);
        return unavailable(&e.to_string());
    }
    let declared = req
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|n| n > settings.max_body as u64) {
        metrics::ingest_rejected(Source::Http, "too_large", 1);
        return too_large(settings.max_body);
    }
    // Media types are case-insensitive; parameters (`; charset=…`) say nothing of framing.
    let media_type = req
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|ct| ct.split(';').next().unwrap_or_default().trim().to_ascii_lowercase());
    let framing = match media_type.as_deref() {
        Some(mt) if mt.ends_with("ndjson") || mt.ends_with("jsonlines") || mt.ends_with("jsonl") => Framing::Ndjson,
        _ => Framing::Json,
    };
    let format = match adapter_format(req.uri().query()) {
        Ok(f) => f,
        Err(msg) => {
            metrics::ingest_rejected(Source::Http, "invalid", 1);
            return json_error(StatusCode::BAD_REQUEST, &msg, None);
        }
    };
    let reading = tokio::time::timeout(
        FINISH_WITHIN,
        read_body(req.into_body(), declared, settings.max_body, &budget),
    );
    let Ok(body) = reading.await else {
        metrics::ingest_rejected(Source::Http, "invalid", 1);
        return json_error(
            StatusCode::REQUEST_TIMEOUT,
            &format!("the body did not arrive within {} s", FINISH_WITHIN.as_secs()),
            None,
        );
    };
    // The budget is held until the answer: the body, and the clicks made from it, live
    // until then.
    let (body, _held) = match body {
        Ok(read) => read,
        Err(BodyError::TooLarge) => {
            metrics::ingest_rejected(Source::Http, "too_large", 1);
            return too_large(settings.max_body);
        }
        Err(BodyError::OverBudget) => {
            metrics::ingest_rejected(Source::Http, "unavailable", 1);
            return unavailable(&format!(
                "the ingest listener holds its budget of {} bytes of request bodies; retry",
                settings.body_budget.size()
            ));
        }
        Err(BodyError::Read(e)) => {
            metrics::ingest_rejected(Source::Http, "invalid", 1);
            return json_error(StatusCode::BAD_REQUEST, &format!("cannot read the body: {e}"), None);
        }
    };
    let clicks = match prepare_body(ingestor, &body, framing, format) {
        Ok(c) => c,
        Err(e) => {
            metrics::ingest_rejected(Source::Http, "invalid", 1);
            return json_error(StatusCode::BAD_REQUEST, &e.message, Some(e.index));
        }
    };
    let accepted = clicks.len();
    let result = match ingestor.submit(clicks, Source::Http).await {
        Ok(submitted) => submitted.wait().await,
        Err(e) => Err(e),
    };
    match result {
        Ok(ids) => json(
            StatusCode::ACCEPTED,
            &serde_json::json!({ "accepted": accepted, "ids": ids }),
        ),
        Err(e) => {
            if let IngestError::Storage(_) = e {
                if let Some(times) = APPEND_FAILED.due(crate::log::now_ms()) {
                    tracing::error!(error = %e, requests = times, "an append failed; the request is answered 503 and nothing was acknowledged");
                }
            }
            metrics::ingest_rejected(Source::Http, e.metric_reason(), 1);
            unavailable(&e.to_string())
        }
    }
}

/// Why a body was not read whole.
#[derive(Debug)]
enum BodyError {
    TooLarge,
    OverBudget,
    Read(Box<dyn std::error::Error + Send + Sync>),
}

/// Reads a body of at most `max` bytes into memory taken from `budget` as it arrives,
/// returned with what it holds of the budget. A declared length more than is free now is
/// refused before any of it is read.
async fn read_body(
    body: Incoming,
    declared: Option<u64>,
    max: usize,
    budget: &ByteBudget,
) -> Result<(Bytes, Option<tokio::sync::OwnedSemaphorePermit>), BodyError> {
    let declared = declared.and_then(|len| usize::try_from(len).ok());
    if declared.is_some_and(|len| len > budget.available()) {
        return Err(BodyError::OverBudget);
    }
    let mut held = None;
    let mut body = Limited::new(body, max);
    // A body in one frame (most are) is kept as it came, without a copy; one in parts is
    // gathered, in room for its declared length.
    let mut first: Option<Bytes> = None;
    let mut bytes = Vec::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| {
            if e.downcast_ref::<http_body_util::LengthLimitError>().is_some() {
                BodyError::TooLarge
            } else {
                BodyError::Read(e)
            }
        })?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        if !budget.take(&mut held, data.len()) {
            return Err(BodyError::OverBudget);
        }
        match first.take() {
            None if bytes.is_empty() => first = Some(data),
            earlier => {
                if let Some(earlier) = earlier {
                    bytes.reserve(declared.unwrap_or(0).min(max).max(earlier.len() + data.len()));
                    bytes.extend_from_slice(&earlier);
                }
                bytes.extend_from_slice(&data);
            }
        }
    }
    Ok((first.unwrap_or_else(|| bytes.into()), held))
}

/// Parses, adapts and validates a whole body; the first bad object rejects it all.
pub fn prepare_body(
    ingestor: &Ingestor,
    body: &[u8],
    framing: Framing,
    format: Format,
) -> Result<Vec<PreparedClick>, click::ClickError> {
    let items = click::split_body(body, framing)?;
    let received = click::received_now();
    let mut out = Vec::with_capacity(items.len());
    for (i, raw) in items.into_iter().enumerate() {
        if matches!(format, Format::Standard) {
            // Clicks already in the model go straight from their text to the stored form.
            out.push(click::prepare_raw(
                raw.get().as_bytes(),
                i,
                &ingestor.enricher,
                &received,
            )?);
            continue;
        }
        let at = |message: String| click::ClickError { index: i, message };
        let value = click::parse_one(raw.get().as_bytes()).map_err(at)?;
        let clicks = adapters::adapt(format, value).map_err(|e| at(e.to_string()))?;
        for c in clicks {
            // An error names the product payload the sender wrote, not a click it never saw.
            out.push(click::prepare(c, i, &ingestor.enricher, &received)?);
        }
    }
    Ok(out)
}

fn adapter_format(query: Option<&str>) -> Result<Format, String> {
    let Some(q) = query else { return Ok(Format::Standard) };
    for pair in q.split('&') {
        if let Some(v) = pair.strip_prefix("format=") {
            return match v {
                "standard" => Ok(Format::Standard),
                "linkly" => Ok(Format::Linkly),
                "rebrandly" => Ok(Format::Rebrandly),
                "masiv" => Ok(Format::Masiv),
                other => Err(format!(
                    "format: {other:?} is not one of standard, linkly, rebrandly, masiv"
                )),
            };
        }
    }
    Ok(Format::Standard)
}

/// Constant-time comparison against every configured token.
pub fn bearer_matches(header: Option<&HeaderValue>, tokens: &[String]) -> bool {
    use subtle::ConstantTimeEq;
    // The scheme's name is case-insensitive (RFC 9110 §11.1): `bearer` is `Bearer`.
    let Some(given) = header
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, token)| token)
    else {
        return false;
    };
    tokens.iter().fold(false, |found, t| {
        found | bool::from(t.as_bytes().ct_eq(given.trim().as_bytes()))
    })
}

fn authorized(req: &Request<Incoming>, tokens: &[String]) -> bool {
    bearer_matches(req.headers().get(AUTHORIZATION), tokens)
}

pub fn json(status: StatusCode, value: &serde_json::Value) -> Response<Full<Bytes>> {
    let body = serde_json::to_vec(value).unwrap_or_default();
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

pub fn json_error(status: StatusCode, message: &str, index: Option<usize>) -> Response<Full<Bytes>> {
    let value = match index {
        Some(i) => serde_json::json!({ "error": message, "index": i }),
        None => serde_json::json!({ "error": message }),
    };
    json(status, &value)
}

/// A 405 for a route asked with a method it does not take; `allow` lists those it does.
pub fn method_not_allowed(allow: &'static str) -> Response<Full<Bytes>> {
    let mut resp = json_error(
        StatusCode::METHOD_NOT_ALLOWED,
        &format!("this route takes {allow}"),
        None,
    );
    resp.headers_mut()
        .insert(hyper::header::ALLOW, HeaderValue::from_static(allow));
    resp
}

fn unavailable(message: &str) -> Response<Full<Bytes>> {
    let mut resp = json_error(StatusCode::SERVICE_UNAVAILABLE, message, None);
    resp.headers_mut().insert(RETRY_AFTER, HeaderValue::from_static("2"));
    resp
}

fn too_large(max: usize) -> Response<Full<Bytes>> {
    json_error(
        StatusCode::PAYLOAD_TOO_LARGE,
        &format!("body over ingest.http.max_body ({max} bytes)"),
        None,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    /// The HTTP ingest listener on a real log in `dir`, with a body budget of `budget`.
    async fn listener_in(dir: &std::path::Path, budget: usize) -> (std::net::SocketAddr, Vec<watch::Sender<bool>>) {
        let (_log, ingestor, running) = crate::ingest::ingestor_in(dir);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, shutdown) = watch::channel(false);
        let settings = HttpIngestSettings {
            max_body: 1 << 20,
            tokens: Vec::new(),
            body_budget: ByteBudget::of(budget),
        };
        tokio::spawn(serve(listener, ingestor, settings, shutdown));
        (addr, vec![running, stop])
    }

    /// Sends a request's head and the first `part` bytes of a `len`-byte JSON body.
    async fn begin(addr: std::net::SocketAddr, len: usize, part: usize) -> TcpStream {
        let mut conn = TcpStream::connect(addr).await.unwrap();
        let head = format!(
            "POST /v1/clicks HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {len}\r\n\r\n"
        );
        conn.write_all(head.as_bytes()).await.unwrap();
        conn.write_all(&click_body(len)[..part]).await.unwrap();
        conn
    }

    use crate::ingest::padded_click as click_body;

    async fn status_of(mut conn: TcpStream) -> (u16, String) {
        let mut answer = Vec::new();
        let mut buf = [0u8; 4096];
        while !answer.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = conn.read(&mut buf).await.unwrap();
            assert!(n > 0, "closed without an answer");
            answer.extend_from_slice(&buf[..n]);
        }
        let text = String::from_utf8_lossy(&answer).to_string();
        (text[9..12].parse().unwrap(), text)
    }

    #[tokio::test]
    async fn bodies_past_the_listeners_byte_budget_are_answered_503_until_it_frees() {
        let dir = tempfile::tempdir().unwrap();
        let (addr, _keep) = listener_in(dir.path(), 64 << 10).await;
        // A declared length holds nothing until its bytes come.
        let idle = begin(addr, 60 << 10, 0).await;
        // 56 KiB of a 60 KiB body arrive: they hold most of the 64 KiB budget.
        let mut holding = begin(addr, 60 << 10, 56 << 10).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        // A declared length that does not fit is refused before its body is read.
        let (status, answer) = status_of(begin(addr, 10 << 10, 0).await).await;
        assert_eq!(status, 503, "{answer}");
        assert!(answer.to_ascii_lowercase().contains("retry-after"), "{answer}");
        // So is a chunk that does not fit.
        let mut chunked = TcpStream::connect(addr).await.unwrap();
        let body = click_body(10 << 10);
        let head = "POST /v1/clicks HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n";
        let request = [
            head.as_bytes(),
            format!("{:x}\r\n", body.len()).as_bytes(),
            &body,
            b"\r\n0\r\n\r\n",
        ]
        .concat();
        chunked.write_all(&request).await.unwrap();
        let (status, answer) = status_of(chunked).await;
        assert_eq!(status, 503, "{answer}");
        // The held body completes and is stored; then the budget is free again.
        holding.write_all(&click_body(60 << 10)[56 << 10..]).await.unwrap();
        let (status, answer) = status_of(holding).await;
        assert_eq!(status, 202, "{answer}");
        drop(idle);
        let (status, answer) = status_of(begin(addr, 10 << 10, 10 << 10).await).await;
        assert_eq!(status, 202, "{answer}");
    }

    #[test]
    fn the_bearer_scheme_is_matched_whatever_its_case_and_the_token_exactly() {
        let tokens = ["s3cret".to_string()];
        let matches = |v: &str| bearer_matches(Some(&HeaderValue::from_str(v).unwrap()), &tokens);
        for good in ["Bearer s3cret", "bearer s3cret", "BEARER s3cret", "Bearer  s3cret "] {
            assert!(matches(good), "{good:?}");
        }
        for bad in [
            "Bearer S3CRET",
            "Basic s3cret",
            "Bearers3cret",
            "s3cret",
            "Bearer",
            "Bearer other",
        ] {
            assert!(!matches(bad), "{bad:?}");
        }
        assert!(!bearer_matches(None, &tokens));
    }
}
