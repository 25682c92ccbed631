//! Test harness: runs the real `clickhook` binary on loopback ports with a temp data dir,
//! and a real HTTP sink whose behaviour each test scripts. Nothing here is mocked, and it
//! must not decide what a test expects: it checks only that the daemon it starts comes up.
#![allow(dead_code)]

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::collections::{HashMap, VecDeque};
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::net::TcpListener;

pub const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

/// How a sink path answers: a queue of scripted answers, then `default`.
#[derive(Clone, Debug)]
pub enum Answer {
    Status(u16),
    StatusWith(u16, Vec<(String, String)>),
    Hang,
    Delay(Duration, u16),
}

#[derive(Clone, Debug)]
pub struct Received {
    pub path: String,
    pub headers: HashMap<String, String>,
    pub body: Bytes,
    pub at: Instant,
}

impl Received {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).expect("sink got JSON")
    }
}

#[derive(Default)]
struct SinkState {
    received: Vec<Received>,
    scripts: HashMap<String, VecDeque<Answer>>,
    defaults: HashMap<String, Answer>,
}

#[derive(Clone)]
pub struct Sink {
    pub addr: std::net::SocketAddr,
    state: Arc<Mutex<SinkState>>,
}

impl Sink {
    pub async fn start() -> Sink {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        Sink::serve(listener)
    }

    pub async fn start_on(addr: std::net::SocketAddr) -> Sink {
        let listener = TcpListener::bind(addr).await.unwrap();
        Sink::serve(listener)
    }

    fn serve(listener: TcpListener) -> Sink {
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(Mutex::new(SinkState::default()));
        let st = state.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let st = st.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req| answer(req, st.clone()));
                    let _ = http1::Builder::new().serve_connection(TokioIo::new(stream), svc).await;
                });
            }
        });
        Sink { addr, state }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub fn script(&self, path: &str, answers: Vec<Answer>) {
        self.state.lock().unwrap().scripts.insert(path.into(), answers.into());
    }

    pub fn default_answer(&self, path: &str, answer: Answer) {
        self.state.lock().unwrap().defaults.insert(path.into(), answer);
    }

    pub fn received(&self, path: &str) -> Vec<Received> {
        self.state
            .lock()
            .unwrap()
            .received
            .iter()
            .filter(|r| r.path == path)
            .cloned()
            .collect()
    }

    /// Event ids delivered to a path (standard format, single or batch).
    pub fn event_ids(&self, path: &str) -> Vec<String> {
        let mut ids = Vec::new();
        for r in self.received(path) {
            let v = r.json();
            match &v["data"] {
                serde_json::Value::Array(items) => {
                    ids.extend(items.iter().map(|i| i["id"].as_str().unwrap_or_default().to_string()))
                }
                d => ids.push(d["id"].as_str().unwrap_or_default().to_string()),
            }
        }
        ids
    }

    pub async fn wait_for(&self, path: &str, n: usize, limit: Duration) -> Vec<Received> {
        let deadline = Instant::now() + limit;
        loop {
            let got = self.received(path);
            if got.len() >= n || Instant::now() > deadline {
                return got;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

async fn answer(req: Request<Incoming>, state: Arc<Mutex<SinkState>>) -> Result<Response<Full<Bytes>>, hyper::Error> {
    let path = req.uri().path().to_string();
    let headers = req
        .headers()
        .iter()
        .map(|(k, v)| (k.as_str().to_string(), v.to_str().unwrap_or_default().to_string()))
        .collect();
    let body = req.into_body().collect().await?.to_bytes();
    let answer = {
        let mut st = state.lock().unwrap();
        st.received.push(Received {
            path: path.clone(),
            headers,
            body,
            at: Instant::now(),
        });
        let scripted = st.scripts.get_mut(&path).and_then(|q| q.pop_front());
        scripted
            .or_else(|| st.defaults.get(&path).cloned())
            .unwrap_or(Answer::Status(200))
    };
    let (status, extra) = match answer {
        Answer::Status(s) => (s, vec![]),
        Answer::StatusWith(s, h) => (s, h),
        Answer::Delay(d, s) => {
            tokio::time::sleep(d).await;
            (s, vec![])
        }
        Answer::Hang => {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            (200, vec![])
        }
    };
    let mut resp = Response::new(Full::new(Bytes::from_static(b"ok")));
    *resp.status_mut() = StatusCode::from_u16(status).unwrap();
    for (k, v) in extra {
        resp.headers_mut().insert(
            hyper::header::HeaderName::from_bytes(k.as_bytes()).unwrap(),
            v.parse().unwrap(),
        );
    }
    Ok(resp)
}

/// HMAC-SHA256 written out from its definition (RFC 2104) on top of the `sha2` digest, so
/// the daemon's signatures are checked by code that shares nothing with its signer.
pub fn hmac_sha256(key: &[u8], message: &[u8]) -> [u8; 32] {
    use sha2::{Digest, Sha256};
    let mut block = [0u8; 64];
    if key.len() > 64 {
        block[..32].copy_from_slice(&Sha256::digest(key));
    } else {
        block[..key.len()].copy_from_slice(key);
    }
    let ipad: Vec<u8> = block.iter().map(|b| b ^ 0x36).collect();
    let opad: Vec<u8> = block.iter().map(|b| b ^ 0x5c).collect();
    let inner = Sha256::new().chain_update(&ipad).chain_update(message).finalize();
    Sha256::new().chain_update(&opad).chain_update(inner).finalize().into()
}

/// Whether a request carries a valid Standard Webhooks signature for `secret`.
pub fn signature_valid(r: &Received, secret: &str) -> bool {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD;
    let key = b64.decode(secret.trim_start_matches("whsec_")).unwrap();
    let id = &r.headers["webhook-id"];
    let ts = &r.headers["webhook-timestamp"];
    let mut msg = format!("{id}.{ts}.").into_bytes();
    msg.extend_from_slice(&r.body);
    let expected = format!("v1,{}", b64.encode(hmac_sha256(&key, &msg)));
    r.headers["webhook-signature"].split(' ').any(|s| s == expected)
}

pub struct Daemon {
    pub dir: tempfile::TempDir,
    pub child: Option<Child>,
    pub http: String,
    pub admin: String,
    pub socket: PathBuf,
    pub stderr: Arc<Mutex<String>>,
}

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_clickhook")
}

/// A config with loopback port-0 listeners, private networks allowed (the sink is on
/// loopback) and a fast retry schedule; `extra` is appended verbatim.
pub fn config_text(extra: &str) -> String {
    format!(
        r#"
[storage]
path = "data"
[ingest.http]
listen = "127.0.0.1:0"
[ingest.unix]
path = "clickhook.sock"
[admin]
listen = "127.0.0.1:0"
[delivery]
allow_private_networks = true
timeout = "2s"
[log]
level = "info"
{extra}
"#
    )
}

pub fn endpoint(id: &str, url: &str, more: &str) -> String {
    format!("\n[[endpoints]]\nid = \"{id}\"\nurl = \"{url}\"\nsecret = \"{SECRET}\"\n{more}\n")
}

impl Daemon {
    pub fn start(config: &str) -> Daemon {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("config.toml"), config).unwrap();
        let mut d = Daemon {
            dir,
            child: None,
            http: String::new(),
            admin: String::new(),
            socket: PathBuf::new(),
            stderr: Arc::new(Mutex::new(String::new())),
        };
        d.spawn();
        d
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("config.toml")
    }

    pub fn spawn(&mut self) {
        let mut child = Command::new(bin())
            .args(["serve", "--config"])
            .arg(self.config_path())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let stderr = child.stderr.take().unwrap();
        let log = self.stderr.clone();
        std::thread::spawn(move || {
            let mut r = BufReader::new(stderr);
            let mut line = String::new();
            while r.read_line(&mut line).unwrap_or(0) > 0 {
                log.lock().unwrap().push_str(&line);
                line.clear();
            }
        });
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut r = BufReader::new(stdout);
            let mut line = String::new();
            let _ = r.read_line(&mut line);
            let _ = tx.send(line);
            let mut rest = Vec::new();
            let _ = r.read_to_end(&mut rest);
        });
        let line = rx.recv_timeout(Duration::from_secs(30)).unwrap_or_default();
        assert!(
            line.starts_with("ready "),
            "daemon did not start: {line:?}\n{}",
            self.stderr.lock().unwrap()
        );
        for part in line.split_whitespace() {
            if let Some(v) = part.strip_prefix("ingest_http=") {
                self.http = format!("http://{v}");
            } else if let Some(v) = part.strip_prefix("admin=") {
                self.admin = format!("http://{v}");
            } else if let Some(v) = part.strip_prefix("unix=") {
                let p = Path::new(v);
                self.socket = if p.is_absolute() {
                    p.to_path_buf()
                } else {
                    self.dir.path().join(p)
                };
            }
        }
        self.child = Some(child);
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().unwrap().id() as i32
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            unsafe { libc::kill(c.id() as i32, libc::SIGKILL) };
            let _ = c.wait();
        }
    }

    pub fn signal(&self, sig: i32) {
        unsafe { libc::kill(self.pid(), sig) };
    }

    /// SIGTERM and wait for the exit code.
    pub fn terminate(&mut self) -> i32 {
        self.signal(libc::SIGTERM);
        self.exit_code_within(Duration::from_secs(30))
            .expect("daemon did not exit after SIGTERM")
    }

    /// Waits up to `limit` for the daemon to exit; its exit code (-1 for a signal), or
    /// `None` while it still runs (then it stays here, for the drop to kill it).
    pub fn exit_code_within(&mut self, limit: Duration) -> Option<i32> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                self.child = None;
                return Some(status.code().unwrap_or(-1));
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn logs(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    pub async fn post(&self, body: &str, content_type: &str) -> (u16, serde_json::Value) {
        request(
            "POST",
            &format!("{}/v1/clicks", self.http),
            body,
            &[("content-type", content_type)],
        )
        .await
    }

    /// An admin API call with a JSON body (none when `body` is null).
    pub async fn admin_request(&self, method: &str, path: &str, body: serde_json::Value) -> (u16, serde_json::Value) {
        let text = if body.is_null() {
            String::new()
        } else {
            body.to_string()
        };
        request(
            method,
            &format!("{}{}", self.admin, path),
            &text,
            &[("content-type", "application/json")],
        )
        .await
    }

    pub async fn admin_get(&self, path: &str) -> (u16, serde_json::Value) {
        request("GET", &format!("{}{}", self.admin, path), "", &[]).await
    }

    pub async fn metrics(&self) -> String {
        let (_, text) = raw_request("GET", &format!("{}/metrics", self.admin), "", &[]).await;
        text
    }

    /// Polls an admin GET until `done` holds for its status and body (up to 10 s); returns
    /// the last answer, for the caller's assertion.
    pub async fn admin_get_until(
        &self,
        path: &str,
        done: impl Fn(u16, &serde_json::Value) -> bool,
    ) -> (u16, serde_json::Value) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let (status, body) = self.admin_get(path).await;
            if done(status, &body) || Instant::now() > deadline {
                return (status, body);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Polls a metric series until `done` holds for its value (up to 10 s); returns the
    /// last value read, for the caller's assertion.
    pub async fn metric_until(&self, series: &str, done: impl Fn(f64) -> bool) -> f64 {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let v = self.metric(series).await;
            if done(v) || Instant::now() > deadline {
                return v;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The value of one metric series, e.g. `clickhook_dead_letters_total{endpoint="a"}`.
    pub async fn metric(&self, series: &str) -> f64 {
        let text = self.metrics().await;
        text.lines()
            .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(f64::NAN)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

pub async fn raw_request(method: &str, url: &str, body: &str, headers: &[(&str, &str)]) -> (u16, String) {
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let mut req = Request::builder().method(method).uri(url);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = client
        .request(req.body(Full::new(Bytes::from(body.to_string()))).unwrap())
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&bytes).into_owned())
}

pub async fn request(method: &str, url: &str, body: &str, headers: &[(&str, &str)]) -> (u16, serde_json::Value) {
    let (status, text) = raw_request(method, url, body, headers).await;
    (
        status,
        serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text)),
    )
}

/// Polls `check` until it holds or `limit` passes; returns whether it held.
pub async fn eventually(limit: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if check() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    check()
}

/// The click ids of an ingest answer (a 202's `ids`), in input order.
pub fn accepted_ids(answer: &serde_json::Value) -> Vec<String> {
    answer["ids"]
        .as_array()
        .unwrap_or_else(|| panic!("ids in a 202: {answer}"))
        .iter()
        .map(|id| id.as_str().expect("ids are strings").to_string())
        .collect()
}

pub fn click(link: &str, workspace: &str) -> String {
    format!(
        r#"{{"link":{{"id":"{link}","workspace_id":"{workspace}","slug":"abc"}},"click":{{"country":"US","user_agent":"Mozilla/5.0"}}}}"#
    )
}
