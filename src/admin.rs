//! The admin listener: health, readiness and `/metrics` for operators and Prometheus,
//! and the endpoint management API of SPEC §5. It owns admin authentication and the JSON
//! shapes of §9. It must not bypass the registry or the log: every change goes through
//! them, so delivery sees it the same way whether it came from here or the config file.

use crate::endpoints::EndpointRegistry;
use crate::ingest::http::{bearer_matches, json, json_error};
use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use metrics_exporter_prometheus::PrometheusHandle;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::watch;

pub struct AdminState {
    pub registry: Arc<EndpointRegistry>,
    pub metrics: PrometheusHandle,
    pub ready: AtomicBool,
    pub token: String,
}

pub async fn serve(listener: TcpListener, state: Arc<AdminState>, mut shutdown: watch::Receiver<bool>) {
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = shutdown.changed() => return,
        };
        let Ok((stream, _)) = accepted else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let state = state.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let state = state.clone();
                async move { Ok::<_, std::convert::Infallible>(route(req, &state).await) }
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
            if state.ready.load(Ordering::SeqCst) {
                text(StatusCode::OK, "ready\n")
            } else {
                text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
            }
        }
        (&Method::GET, "/metrics") => {
            state.metrics.run_upkeep();
            let mut resp = text(StatusCode::OK, &state.metrics.render());
            resp.headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static("text/plain; version=0.0.4"));
            resp
        }
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
    let path = req.uri().path().to_string();
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    match (req.method(), parts.as_slice()) {
        (&Method::GET, ["v1", "endpoints"]) => {
            let list: Vec<_> = state.registry.all().iter().map(|e| e.describe()).collect();
            json(StatusCode::OK, &serde_json::Value::Array(list))
        }
        (&Method::GET, ["v1", "endpoints", id]) => match state.registry.get(id) {
            Some(ep) => json(StatusCode::OK, &ep.describe()),
            None => json_error(StatusCode::NOT_FOUND, &format!("no endpoint {id:?}"), None),
        },
        _ => json_error(StatusCode::NOT_FOUND, "no such route", None),
    }
}

fn text(status: StatusCode, body: &str) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body.to_string())));
    *resp.status_mut() = status;
    resp
}
