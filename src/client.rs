//! The reference ingest client behind `clickhook send`: streams NDJSON clicks into a
//! running daemon over the Unix socket (pipelined, reading replies while writing) or over
//! HTTP (chunks of up to 1,000 lines), and counts what was acknowledged. It must not
//! alter clicks. It sends again only what the daemon refused as unavailable (nothing of
//! it stored: a full budget, storage over `max_bytes`, a shutdown), a few times with a
//! pause, and reports what was answered in the end.

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::StatusCode;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWriteExt, BufReader, Lines};
use tokio::net::UnixStream;
use tokio::sync::Notify;

use crate::ingest::click::is_blank;
use crate::ingest::unix::UNAVAILABLE_REPLY;
use crate::ingest::MAY_BE_STORED;

/// Lines per HTTP request (SPEC §9).
pub const HTTP_CHUNK: usize = 1000;

/// How much of the input one read takes. A file is read on tokio's blocking threads, a
/// hand-off each read: at the default 8 KiB, those hand-offs were most of the client's
/// CPU on the socket.
const INPUT_BUFFER: usize = 1 << 20;

/// How often, and after what pauses, what the daemon refused as unavailable is sent again.
#[derive(Debug, Clone, Copy)]
pub struct Resend {
    /// Tries in a row that store nothing (a refusal, a refused connection) before what is
    /// refused is given up.
    pub times: u32,
    /// The pause before the first; each next one doubles, up to `longest_pause`. A 503's
    /// `Retry-After` is taken instead, within the same two.
    pub first_pause: Duration,
    pub longest_pause: Duration,
}

impl Default for Resend {
    /// About 15 s in all: longer than a restart under systemd, short enough that storage
    /// over `max_bytes` fails the run rather than hanging it.
    fn default() -> Self {
        Resend {
            times: 5,
            first_pause: Duration::from_secs(1),
            longest_pause: Duration::from_secs(5),
        }
    }
}

/// Tries in a row that stored nothing.
struct Tries {
    resend: Resend,
    fruitless: u32,
}

impl Tries {
    fn new(resend: Resend) -> Self {
        Tries { resend, fruitless: 0 }
    }

    /// Something was stored: the count and the pauses start over.
    fn stored(&mut self) {
        self.fruitless = 0;
    }

    /// Counts a try that stored nothing and pauses before the next, for `asked` if the
    /// daemon (or a proxy) asked; false, at once, once the tries are used up. An ask is
    /// held to the first and longest pauses: `Retry-After: 0` would spend every try at
    /// once.
    async fn next(&mut self, asked: Option<Duration>) -> bool {
        if self.fruitless == self.resend.times {
            return false;
        }
        let Resend {
            first_pause,
            longest_pause,
            ..
        } = self.resend;
        let doubled = first_pause.saturating_mul(1 << self.fruitless.min(16));
        let pause = asked.map_or(doubled, |a| a.max(first_pause)).min(longest_pause);
        self.fruitless += 1;
        tokio::time::sleep(pause).await;
        true
    }
}

/// Whether a refusal as unavailable may be sent again: not one that came after the
/// clicks went to the log, as part of them may be stored. Those are errors for the
/// operator, not backpressure, so they are reported rather than sent twice.
fn resendable(reason: &str) -> bool {
    !MAY_BE_STORED.iter().any(|stored| reason.starts_with(stored))
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to {0}: {1}")]
    Connect(String, std::io::Error),
    #[error("HTTP error: {0}")]
    Http(String),
    #[error("--url {0:?}: {1}")]
    BadUrl(String, &'static str),
}

/// Refuses a daemon URL that could never be posted to, before any input is read.
fn check_base_url(base: &str) -> Result<(), ClientError> {
    let bad = |why| ClientError::BadUrl(base.to_owned(), why);
    let uri: hyper::Uri = base.parse().map_err(|_| bad("not a URL"))?;
    if !matches!(uri.scheme_str(), Some("http" | "https")) {
        return Err(bad("must start with http:// or https://"));
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err(bad("names no host"));
    }
    if uri.query().is_some() {
        return Err(bad("must not have a query: /v1/clicks is added to it"));
    }
    Ok(())
}

/// A client for `http://` and `https://` URLs (the daemon may sit behind a TLS proxy),
/// verifying certificates against the same roots as deliveries.
fn http_client() -> Client<HttpsConnector<HttpConnector>, Full<Bytes>> {
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(crate::deliver::send::tls_config())
        .https_or_http()
        .enable_http1()
        .build();
    Client::builder(TokioExecutor::new()).build(https)
}

/// What `send` achieved, also when it was cut short.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SendReport {
    pub acknowledged: usize,
    pub rejected: usize,
    /// Lines sent again (each time counted) after the daemon refused them as unavailable.
    pub resent: usize,
    /// One line per rejection: which line of the input (or chunk), and why.
    pub errors: Vec<String>,
    /// What ended the run before every line was answered (an unreadable input, a lost
    /// connection); the counts above are what was answered until then.
    pub cut_short: Option<String>,
}

/// The input's non-blank lines, numbered as the file counts them (blank lines too).
struct InputLines<R> {
    lines: Lines<BufReader<R>>,
    at: usize,
}

impl<R: AsyncRead + Unpin> InputLines<R> {
    fn new(input: R) -> Self {
        InputLines {
            lines: BufReader::with_capacity(INPUT_BUFFER, input).lines(),
            at: 0,
        }
    }

    /// Why the input cannot be read on.
    fn unreadable(&self, e: std::io::Error) -> String {
        format!("cannot read the input after line {}: {e}", self.at)
    }

    async fn next_line(&mut self) -> std::io::Result<Option<(usize, String)>> {
        loop {
            let Some(line) = self.lines.next_line().await? else {
                return Ok(None);
            };
            self.at += 1;
            if !is_blank(line.as_bytes()) {
                return Ok(Some((self.at, line)));
            }
        }
    }
}

/// A line refused as unavailable: its number, its text, and why.
type Refused = Vec<(usize, String, String)>;

/// How a pass over one connection ended.
struct Pass<R> {
    /// Lines refused as unavailable, in the order sent.
    refused: Refused,
    /// The rest of the input, when the pass stopped sending it at a refusal.
    rest: Option<InputLines<R>>,
    /// Why the input could not be read on: what was sent still goes again if refused.
    unreadable: Option<String>,
}

/// Sends every non-blank line of `input` over the socket, pipelined. At the first line
/// answered `err unavailable`, the pass stops taking input; once what it sent is answered,
/// the refused lines go again after a pause, over a new connection and ahead of the rest
/// of the input. After `resend.times` passes in a row that store nothing (or cannot
/// connect), the refused lines are counted rejected and the run stops there.
pub async fn send_unix<R: AsyncRead + Unpin + Send + 'static>(
    socket: &str,
    input: R,
    resend: Resend,
) -> Result<SendReport, ClientError> {
    let mut report = SendReport::default();
    let mut rest = Some(InputLines::new(input));
    let mut refused = Refused::new();
    let mut tries = Tries::new(resend);
    let mut unreadable = None;
    loop {
        let stream = match UnixStream::connect(socket).await {
            Ok(stream) => stream,
            Err(e) if refused.is_empty() => return Err(ClientError::Connect(socket.into(), e)),
            // The daemon may be restarting: a try like any other.
            Err(e) => {
                if tries.next(None).await {
                    continue;
                }
                report.cut_short = Some(format!(
                    "cannot connect to {socket} to send again what was refused as unavailable: {e}{}",
                    not_sent(&rest)
                ));
                break;
            }
        };
        let again: Vec<(usize, String)> = refused.drain(..).map(|(line, text, _)| (line, text)).collect();
        report.resent += again.len();
        let stored_before = report.acknowledged;
        let pass = pass_unix(stream, again, rest.take(), &mut report).await;
        (refused, rest) = (pass.refused, pass.rest);
        unreadable = unreadable.or(pass.unreadable);
        if report.cut_short.is_some() || (refused.is_empty() && rest.is_none()) {
            break;
        }
        if report.acknowledged > stored_before {
            tries.stored();
        }
        if !refused.is_empty() && !tries.next(None).await {
            break;
        }
    }
    // The input's end came first.
    if let Some(unreadable) = unreadable {
        report.cut_short = Some(unreadable);
    }
    if !refused.is_empty() && rest.is_some() {
        report.cut_short.get_or_insert(format!(
            "lines refused as unavailable were given up after {} tries in a row that stored nothing{}",
            resend.times,
            not_sent(&rest)
        ));
    }
    for (line, _, why) in refused {
        report.rejected += 1;
        report.errors.push(format!("line {line}: unavailable: {why}"));
    }
    Ok(report)
}

/// What a run given up says of the input it did not send. Whether any is left is not
/// known without reading on, which could wait for ever on a pipe.
fn not_sent<R>(rest: &Option<InputLines<R>>) -> String {
    rest.as_ref()
        .map(|rest| format!("; what the input held after line {} was not sent", rest.at))
        .unwrap_or_default()
}

/// Why a pass's writer stopped early.
enum WriteFailure {
    /// Why the input cannot be read on.
    Input(String),
    Daemon(std::io::Error),
}

/// Writes one line to the daemon and keeps it, numbered, for the reply that answers it.
async fn send_line(
    out: &mut tokio::io::BufWriter<&mut tokio::net::unix::OwnedWriteHalf>,
    sent: &tokio::sync::mpsc::UnboundedSender<(usize, String)>,
    at: usize,
    line: String,
) -> Result<(), WriteFailure> {
    out.write_all(line.as_bytes()).await.map_err(WriteFailure::Daemon)?;
    out.write_all(b"\n").await.map_err(WriteFailure::Daemon)?;
    // A reply reader that stopped (the connection lost) needs it no more.
    let _ = sent.send((at, line));
    Ok(())
}

/// One connection's pass: sends `again`, then `input` until its end or the first line
/// refused as unavailable, and counts what is acknowledged or rejected into `report`.
async fn pass_unix<R: AsyncRead + Unpin + Send + 'static>(
    stream: UnixStream,
    again: Vec<(usize, String)>,
    input: Option<InputLines<R>>,
    report: &mut SendReport,
) -> Pass<R> {
    let (read, mut write) = stream.into_split();
    // Each line sent, in order, with its line number in the input: the daemon answers
    // each, a rejection names the line as the file counts it, and one refused as
    // unavailable is sent again. They wait here only as far as the daemon reads ahead.
    let (sent_tx, mut sent_rx) = tokio::sync::mpsc::unbounded_channel::<(usize, String)>();
    // Told at the first refusal, also while the input is slow to come: what follows
    // waits for the next pass, so that a daemon refusing everything does not have the
    // whole input read into memory here.
    let refusing = Arc::new(Notify::new());
    let stop = refusing.clone();
    let writer = tokio::spawn(async move {
        let mut input = input;
        let mut out = tokio::io::BufWriter::new(&mut write);
        // An input error still ends the stream cleanly: the daemon answers what it got.
        let sent = async {
            for (at, line) in again {
                send_line(&mut out, &sent_tx, at, line).await?;
            }
            let Some(lines) = input.as_mut() else {
                return Ok(());
            };
            loop {
                // Reading a line is cancel-safe: one cut short here is read next pass.
                let next = tokio::select! {
                    biased;
                    _ = stop.notified() => return Ok(()),
                    next = lines.next_line() => next.map_err(|e| WriteFailure::Input(lines.unreadable(e)))?,
                    // The input is slow to come (a pipe): what is written so far goes now
                    // rather than once the buffer fills.
                    _ = std::future::ready(()), if !out.buffer().is_empty() => {
                        out.flush().await.map_err(WriteFailure::Daemon)?;
                        continue;
                    }
                };
                let Some((at, line)) = next else {
                    input = None;
                    return Ok(());
                };
                send_line(&mut out, &sent_tx, at, line).await?;
            }
        }
        .await;
        let flushed = out.flush().await.map_err(WriteFailure::Daemon);
        drop(out);
        let _ = write.shutdown().await;
        (sent.and(flushed), input)
    });
    let stop_writer = writer.abort_handle();
    let mut replies = BufReader::new(read).lines();
    let mut refused = Refused::new();
    loop {
        let reply = match replies.next_line().await {
            Ok(Some(reply)) => reply,
            Ok(None) => break,
            Err(e) => {
                report.cut_short = Some(format!("cannot read the daemon's replies: {e}"));
                // Its writes could wait for ever on a daemon no longer read.
                stop_writer.abort();
                break;
            }
        };
        // Every reply answers a line sent before it, so one is waiting here.
        let Some((line, text)) = sent_rx.recv().await else {
            report.cut_short = Some(format!("the daemon answered more lines than were sent: {reply}"));
            break;
        };
        if reply.starts_with("ok ") {
            report.acknowledged += 1;
        } else if let Some(why) = reply.strip_prefix(UNAVAILABLE_REPLY).filter(|why| resendable(why)) {
            refusing.notify_one();
            refused.push((line, text, why.to_string()));
        } else {
            report.rejected += 1;
            report
                .errors
                .push(format!("line {line}: {}", reply.trim_start_matches("err ")));
        }
    }
    let (written, rest) = match writer.await {
        Ok(written) => written,
        Err(e) => {
            report.cut_short.get_or_insert(e.to_string());
            (Ok(()), None)
        }
    };
    let rest = if written.is_ok() { rest } else { None };
    // The first cause of a cut: lines left unanswered, then a failed write (which a
    // daemon going away also leaves). An unreadable input ends the input only.
    if let Ok((line, _)) = sent_rx.try_recv() {
        let unanswered = sent_rx.len() + 1;
        report.cut_short.get_or_insert(format!(
            "the daemon closed the connection with {unanswered} lines unanswered, from line {line}"
        ));
    }
    let mut unreadable = None;
    match written {
        Ok(()) => {}
        Err(WriteFailure::Input(why)) => unreadable = Some(why),
        Err(WriteFailure::Daemon(e)) => {
            report
                .cut_short
                .get_or_insert(format!("cannot write to the daemon: {e}"));
        }
    }
    Pass {
        refused,
        rest,
        unreadable,
    }
}

/// Posts the lines as NDJSON chunks to `{base}/v1/clicks`.
/// A chunk refused 503 for a reason that may pass goes again after a pause, as `resend`
/// says.
pub async fn send_http<R: AsyncRead + Unpin>(
    base: &str,
    token: Option<&str>,
    input: R,
    resend: Resend,
) -> Result<SendReport, ClientError> {
    check_base_url(base)?;
    let client = http_client();
    let url = format!("{}/v1/clicks", base.trim_end_matches('/'));
    let mut input = InputLines::new(input);
    let mut report = SendReport::default();
    let mut chunk = Vec::new();
    // The input's line number of each line in the chunk.
    let mut chunk_lines: Vec<usize> = Vec::new();
    loop {
        let next = match input.next_line().await {
            Ok(next) => next,
            Err(e) => {
                // What was read before goes out; the report says where the input failed.
                report.cut_short = Some(input.unreadable(e));
                None
            }
        };
        if let Some((at, line)) = &next {
            chunk.extend_from_slice(line.as_bytes());
            chunk.push(b'\n');
            chunk_lines.push(*at);
        }
        let count = chunk_lines.len();
        if count == HTTP_CHUNK || (count > 0 && next.is_none()) {
            // Not empty: it has a first and a last line.
            let (first, last) = (chunk_lines[0], chunk_lines[count - 1]);
            let body = Bytes::from(std::mem::take(&mut chunk));
            let mut tries = Tries::new(resend);
            // The last 503 the chunk got, for a resend that could not connect.
            let mut refused: Option<Answer> = None;
            let answer = loop {
                let posted = post_chunk(&client, &url, token, body.clone()).await?;
                if refused.is_some() && !matches!(posted, Err(Unsent::Connect(_))) {
                    report.resent += count;
                }
                match posted {
                    // A 503 that is not the daemon's (a proxy's page while it restarts)
                    // may pass too.
                    Ok(answer) if answer.0 == StatusCode::SERVICE_UNAVAILABLE && may_pass(&answer.2) => {
                        if !tries.next(answer.1).await {
                            break Ok(answer);
                        }
                        refused = Some(answer);
                    }
                    Ok(answer) => break Ok(answer),
                    Err(Unsent::Connect(e)) => match refused.take() {
                        None => break Err(e),
                        // The daemon may be restarting: a try like any other.
                        Some(last) if tries.next(None).await => refused = Some(last),
                        // Out of tries: the chunk stays refused as the daemon last answered.
                        Some(last) => break Ok(last),
                    },
                    Err(Unsent::Other(e)) => break Err(e),
                }
            };
            let (status, body) = match answer {
                Ok((status, _, body)) => (status, body),
                Err(e) => {
                    // An unreadable input found before this stays the first cause.
                    report
                        .cut_short
                        .get_or_insert(format!("{url}: {e} (lines {first} to {last} unanswered)"));
                    break;
                }
            };
            if status.as_u16() == 202 {
                report.acknowledged += count;
            } else {
                report.rejected += count;
                let answer: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
                // A 400 names the chunk's line at fault by its index among the chunk's
                // lines; the whole chunk is refused.
                let at = match answer["index"].as_u64().and_then(|i| chunk_lines.get(i as usize)) {
                    Some(line) => format!("line {line}"),
                    None => format!("lines {first} to {last}"),
                };
                report.errors.push(format!(
                    "{at}: {status} {}",
                    answer["error"]
                        .as_str()
                        .map_or_else(|| String::from_utf8_lossy(&body).trim().to_string(), str::to_string)
                ));
            }
            chunk_lines.clear();
        }
        if next.is_none() {
            break;
        }
    }
    Ok(report)
}

/// Whether a 503's body may pass if sent again: the daemon's error says it was not
/// stored, or it is not the daemon's.
fn may_pass(body: &[u8]) -> bool {
    let answer: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
    answer["error"].as_str().is_none_or(resendable)
}

/// A chunk's answer: its status, `Retry-After` and body.
type Answer = (StatusCode, Option<Duration>, Bytes);

/// Why a chunk got no answer.
enum Unsent {
    /// No connection: nothing of it reached the daemon.
    Connect(String),
    /// It may have.
    Other(String),
}

/// Posts one chunk; answers its answer, or why none came.
async fn post_chunk(
    client: &Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
    url: &str,
    token: Option<&str>,
    body: Bytes,
) -> Result<Result<Answer, Unsent>, ClientError> {
    let mut req = hyper::Request::post(url).header("content-type", "application/x-ndjson");
    if let Some(t) = token {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    let req = req
        .body(Full::new(body))
        .map_err(|e| ClientError::Http(e.to_string()))?;
    Ok(match client.request(req).await {
        Ok(resp) => {
            let status = resp.status();
            let retry_after = crate::deliver::send::retry_after(resp.headers());
            let body = resp.into_body().collect().await;
            body.map(|b| (status, retry_after, b.to_bytes()))
                .map_err(|e| Unsent::Other(e.to_string()))
        }
        Err(e) if e.is_connect() => Err(Unsent::Connect(e.to_string())),
        Err(e) => Err(Unsent::Other(e.to_string())),
    })
}

/// One admin API call for the operator commands; answers the status and JSON body.
pub async fn admin_request(
    base: &str,
    token: Option<&str>,
    method: &str,
    path: &str,
    body: Option<serde_json::Value>,
) -> Result<(u16, serde_json::Value), ClientError> {
    let client = http_client();
    let url = format!("{}{}", base.trim_end_matches('/'), path);
    let mut req = hyper::Request::builder()
        .method(method)
        .uri(&url)
        .header("content-type", "application/json");
    if let Some(t) = token {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    let payload = body.map(|b| b.to_string()).unwrap_or_default();
    let req = req
        .body(Full::new(Bytes::from(payload)))
        .map_err(|e| ClientError::Http(e.to_string()))?;
    let resp = client
        .request(req)
        .await
        .map_err(|e| ClientError::Http(format!("{url}: {e}")))?;
    let status = resp.status().as_u16();
    let bytes = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| ClientError::Http(e.to_string()))?
        .to_bytes();
    let value = serde_json::from_slice(&bytes)
        .unwrap_or_else(|_| serde_json::Value::String(String::from_utf8_lossy(&bytes).into_owned()));
    Ok((status, value))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    #[tokio::test]
    async fn an_https_url_is_spoken_to_in_tls() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let first_bytes = tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.unwrap();
            let mut head = [0u8; 3];
            stream.read_exact(&mut head).await.unwrap();
            head
        });
        let input: &[u8] = b"{\"link\":{\"id\":\"1\"}}\n";
        // No TLS server answers, so the send fails; what matters is how it began.
        let _ = tokio::time::timeout(
            std::time::Duration::from_secs(5),
            send_http(&format!("https://127.0.0.1:{port}"), None, input, Resend::default()),
        )
        .await;
        let head = first_bytes.await.unwrap();
        assert_eq!(head[..2], [0x16, 0x03], "a TLS handshake record, not an HTTP request");
    }

    use crate::ingest::Ingestor;
    use std::sync::atomic::Ordering::Relaxed;
    use tokio::sync::watch;
    use tokio::task::JoinHandle;

    /// The daemon's socket and HTTP listeners in-process on a real log, with the gate
    /// that refuses clicks as unavailable while storage is over its budget.
    struct Listeners {
        _dir: tempfile::TempDir,
        socket: String,
        addr: std::net::SocketAddr,
        base: String,
        ingestor: Arc<Ingestor>,
        _running: watch::Sender<bool>,
        stop: watch::Sender<bool>,
        served: Vec<JoinHandle<()>>,
    }

    impl Listeners {
        async fn start() -> Self {
            let dir = tempfile::tempdir().unwrap();
            let (_log, ingestor, running) = crate::ingest::ingestor_in(dir.path());
            let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = tcp.local_addr().unwrap();
            let mut listeners = Listeners {
                socket: dir.path().join("ingest.sock").display().to_string(),
                _dir: dir,
                addr,
                base: format!("http://{addr}"),
                ingestor,
                _running: running,
                stop: watch::channel(false).0,
                served: Vec::new(),
            };
            listeners.serve(tcp);
            listeners
        }

        fn serve(&mut self, tcp: tokio::net::TcpListener) {
            use crate::ingest::{http, unix, ByteBudget};
            let (stop, shutdown) = watch::channel(false);
            self.stop = stop;
            let unix_listener = tokio::net::UnixListener::bind(&self.socket).unwrap();
            let settings = http::HttpIngestSettings {
                max_body: 1 << 20,
                tokens: Vec::new(),
                body_budget: ByteBudget::of(1 << 20),
            };
            self.served = vec![
                tokio::spawn(unix::serve(
                    unix_listener,
                    self.ingestor.clone(),
                    1 << 20,
                    shutdown.clone(),
                )),
                tokio::spawn(http::serve(tcp, self.ingestor.clone(), settings, shutdown)),
            ];
        }

        /// Stops both listeners, as a daemon going down does.
        async fn stop(&mut self) {
            self.stop.send(true).unwrap();
            for served in self.served.drain(..) {
                served.await.unwrap();
            }
            std::fs::remove_file(&self.socket).unwrap();
        }

        /// Serves again on the same socket path and port.
        async fn serve_again(&mut self) {
            let tcp = tokio::net::TcpListener::bind(self.addr).await.unwrap();
            self.serve(tcp);
        }

        fn refuse(&self, refusing: bool) {
            self.ingestor.gate.over_budget.store(refusing, Relaxed);
        }

        /// Takes clicks again 200 ms from now.
        fn reopen_soon(self: &Arc<Self>) -> JoinHandle<()> {
            let daemon = self.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(200)).await;
                daemon.refuse(false);
            })
        }

        async fn send(&self, over_http: bool, input: &'static [u8], resend: Resend) -> SendReport {
            if over_http {
                send_http(&self.base, None, input, resend).await.unwrap()
            } else {
                send_unix(&self.socket, input, resend).await.unwrap()
            }
        }
    }

    /// Three clicks and a blank line, the third click on the input's fourth line.
    const CLICKS: &[u8] = b"{\"link\":{\"id\":\"a\"}}\n{\"link\":{\"id\":\"b\"}}\n\n{\"link\":{\"id\":\"c\"}}\n";

    /// Whether the run says it was cut short, and says `text` of why.
    fn cut_short_says(report: &SendReport, text: &str) -> bool {
        report.cut_short.as_deref().is_some_and(|why| why.contains(text))
    }

    fn quick(times: u32) -> Resend {
        Resend {
            times,
            first_pause: Duration::from_millis(20),
            longest_pause: Duration::from_millis(20),
        }
    }

    /// The pauses double from the first up to the longest and start over once something
    /// is stored; an ask is held within the same two, so `Retry-After: 0` does not spend
    /// the tries at once.
    #[tokio::test(start_paused = true)]
    async fn tries_pause_on_the_schedule_and_hold_an_ask_within_it() {
        let mut tries = Tries::new(Resend {
            times: 4,
            first_pause: Duration::from_secs(1),
            longest_pause: Duration::from_secs(3),
        });
        let pause = async |tries: &mut Tries, asked| {
            let start = tokio::time::Instant::now();
            assert!(tries.next(asked).await, "tries left");
            start.elapsed().as_secs()
        };
        let mut pauses = Vec::new();
        for asked in [None, None, Some(Duration::ZERO), Some(Duration::from_secs(60))] {
            pauses.push(pause(&mut tries, asked).await);
        }
        assert_eq!(pauses, [1, 2, 1, 3]);
        assert!(!tries.next(None).await, "4 tries that stored nothing are all");
        tries.stored();
        assert_eq!(pause(&mut tries, None).await, 1);
    }

    /// A line that is blank only to Unicode is no blank line to JSON: it goes to the
    /// daemon, which rejects it, rather than being dropped without a word.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_line_of_other_whitespace_goes_to_the_daemon() {
        let daemon = Listeners::start().await;
        for over_http in [false, true] {
            let report = daemon
                .send(over_http, "{\"link\":{\"id\":\"a\"}}\n\u{a0}\n".as_bytes(), quick(1))
                .await;
            // Over HTTP a 400 refuses the chunk the line is in.
            let taken = usize::from(!over_http);
            assert_eq!(
                (report.acknowledged, report.rejected),
                (taken, 2 - taken),
                "over HTTP: {over_http}: {report:?}"
            );
            assert!(
                report.errors.iter().any(|e| e.contains("line 2")),
                "over HTTP: {over_http}: {report:?}"
            );
        }
    }

    /// Lines the daemon refuses as unavailable (here: storage over `max_bytes`) go again,
    /// over either transport, until they are taken.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn lines_refused_as_unavailable_are_sent_again_until_taken() {
        let daemon = Arc::new(Listeners::start().await);
        for over_http in [false, true] {
            daemon.refuse(true);
            let reopen = daemon.reopen_soon();
            // 50 sends again take at least a second: the gate opens well before they end.
            let report = daemon.send(over_http, CLICKS, quick(50)).await;
            reopen.await.unwrap();
            assert_eq!(
                (report.acknowledged, report.rejected, report.cut_short.as_deref()),
                (3, 0, None),
                "over HTTP: {over_http}: {report:?}"
            );
            // The gate was shut when the run began: the first answer refused them all.
            assert!(report.resent >= 3, "over HTTP: {over_http}: {report:?}");
        }
    }

    /// A daemon that goes down after refusing lines and comes back takes them: the
    /// connections it refuses meanwhile are tries like the refusals.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn lines_refused_before_a_restart_are_taken_once_the_daemon_is_back() {
        for over_http in [false, true] {
            let mut daemon = Listeners::start().await;
            daemon.refuse(true);
            let (socket, base) = (daemon.socket.clone(), daemon.base.clone());
            // The first refusal comes at once, then 1 s of pause: the daemon goes down in
            // it, not while a pass waits for its answers (which would cut the run short,
            // as lines left unanswered may be stored), and stays down through tries
            // 50 ms apart.
            let resend = Resend {
                times: 50,
                first_pause: Duration::from_secs(1),
                longest_pause: Duration::from_millis(50),
            };
            let sending = tokio::spawn(async move {
                if over_http {
                    send_http(&base, None, CLICKS, resend).await.unwrap()
                } else {
                    send_unix(&socket, CLICKS, resend).await.unwrap()
                }
            });
            tokio::time::sleep(Duration::from_millis(300)).await;
            daemon.stop().await;
            tokio::time::sleep(Duration::from_millis(1000)).await;
            daemon.refuse(false);
            daemon.serve_again().await;
            let report = sending.await.unwrap();
            assert_eq!(
                (report.acknowledged, report.rejected, report.cut_short.as_deref()),
                (3, 0, None),
                "over HTTP: {over_http}: {report:?}"
            );
        }
    }

    /// A daemon that refuses every line does not have the whole input read into memory:
    /// the run stops taking input at the first refusal, and says where it stopped.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_daemon_refusing_everything_does_not_have_the_whole_input_read() {
        let daemon = Listeners::start().await;
        daemon.refuse(true);
        let lines = 300_000;
        let input: &'static [u8] = b"{\"link\":{\"id\":\"a\"}}\n".repeat(lines).leak();
        let report = daemon.send(false, input, quick(1)).await;
        assert_eq!(report.acknowledged, 0, "{:?}", report.cut_short);
        assert!(report.rejected < lines / 2, "{} rejected", report.rejected);
        let stopped = report.cut_short.as_deref().unwrap_or_default();
        let after: usize = stopped
            .split("after line ")
            .nth(1)
            .and_then(|rest| rest.split(' ').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("says where it stopped: {stopped}"));
        assert!(after < lines / 2, "{stopped}");
        assert!(report
            .errors
            .iter()
            .all(|e| e.contains(": unavailable: storage is over")));
    }

    /// Lines refused before the input turned unreadable still go again and are taken;
    /// the run then says where the input failed.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn lines_refused_before_the_input_failed_are_still_sent_again() {
        let daemon = Arc::new(Listeners::start().await);
        daemon.refuse(true);
        let reopen = daemon.reopen_soon();
        let input: &'static [u8] = [CLICKS, b"\xff\xfe\n"].concat().leak();
        let report = daemon.send(false, input, quick(50)).await;
        reopen.await.unwrap();
        assert_eq!((report.acknowledged, report.rejected), (3, 0), "{report:?}");
        assert!(
            cut_short_says(&report, "cannot read the input after line 4: "),
            "{report:?}"
        );
    }

    /// A refusal ends the pass even while the input is slow to come (a pipe kept open):
    /// the refused lines do not wait for the next line of input.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_refusal_ends_the_pass_while_the_input_waits() {
        use tokio::io::AsyncWriteExt;
        let daemon = Listeners::start().await;
        daemon.refuse(true);
        let (mut feed, input) = tokio::io::duplex(1 << 16);
        feed.write_all(CLICKS).await.unwrap();
        // `feed` stays open: the input has no end.
        let sending = send_unix(&daemon.socket, input, quick(1));
        let report = tokio::time::timeout(Duration::from_secs(20), sending)
            .await
            .expect("the run waited for more input")
            .unwrap();
        assert_eq!((report.acknowledged, report.rejected), (0, 3), "{report:?}");
        assert!(cut_short_says(&report, "after line 4 was not sent"), "{report:?}");
        drop(feed);
    }

    /// What may be stored in part is reported, not sent twice; what the gate refuses
    /// goes again. The reasons are the daemon's own.
    #[test]
    fn refusals_after_the_clicks_went_to_the_log_are_not_sent_again() {
        use crate::ingest::{IngestError, IngestGate};
        let failed_write = IngestError::Storage(crate::log::LogError::Closed).to_string();
        assert!(!resendable(&failed_write), "{failed_write}");
        assert!(!resendable(&IngestError::AppendTaskFailed.to_string()));
        let over = IngestGate::default();
        over.over_budget.store(true, Relaxed);
        let stopping = IngestGate::default();
        stopping.shutting_down.store(true, Relaxed);
        for gate in [over, stopping] {
            let why = gate.check().unwrap_err().to_string();
            assert!(resendable(&why), "{why}");
        }
    }

    /// Lines still refused after the last resend are reported rejected, by their line in
    /// the input, with the daemon's reason.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn lines_still_unavailable_after_the_last_resend_are_rejected() {
        let daemon = Listeners::start().await;
        daemon.refuse(true);
        let report = daemon.send(false, CLICKS, quick(2)).await;
        assert_eq!(report.acknowledged, 0, "{report:?}");
        // The run stops taking input at the first refusal: lines not yet sent by then
        // are not sent, and the run says so.
        let named: Vec<&str> = report
            .errors
            .iter()
            .map(|e| e.split(':').next().unwrap_or_default())
            .collect();
        let all = ["line 1", "line 2", "line 4"];
        assert!(!named.is_empty() && all.starts_with(&named), "{report:?}");
        if named.len() < all.len() {
            assert!(cut_short_says(&report, "was not sent"), "{report:?}");
        }
        assert!(
            report
                .errors
                .iter()
                .all(|e| e.contains(": unavailable: storage is over")),
            "{report:?}"
        );
        let report = daemon.send(true, CLICKS, quick(2)).await;
        assert_eq!(
            (report.acknowledged, report.rejected, report.resent),
            (0, 3, 6),
            "{report:?}"
        );
        assert!(report.errors[0].starts_with("lines 1 to 4: 503"), "{report:?}");
    }
}
