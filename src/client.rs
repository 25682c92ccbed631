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
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWriteExt, BufReader, Lines};
use tokio::net::UnixStream;

/// Lines per HTTP request (SPEC §9).
pub const HTTP_CHUNK: usize = 1000;

/// How often, and after what pauses, what the daemon refused as unavailable is sent again.
#[derive(Debug, Clone, Copy)]
pub struct Resend {
    /// Sends again at most, after the first.
    pub times: u32,
    /// The pause before the first; each next one doubles, up to `longest_pause`. A 503's
    /// `Retry-After` is taken instead, up to `longest_pause` too.
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

impl Resend {
    fn next_pause(&self, pause: Duration) -> Duration {
        (pause * 2).min(self.longest_pause)
    }
}

/// Whether a refusal as unavailable may be sent again. A failed write to the log also
/// answers `unavailable`, but part of it may be stored: an error for the operator, not
/// backpressure, so it is reported rather than sent twice.
fn resendable(reason: &str) -> bool {
    !reason.starts_with("storage failed")
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to {0}: {1}")]
    Connect(String, std::io::Error),
    #[error("HTTP error: {0}")]
    Http(String),
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

/// Where a pass over the socket takes its lines: the input, or those refused before.
enum LineSource<R> {
    Input { lines: Lines<BufReader<R>>, at: usize },
    Again(std::vec::IntoIter<(usize, String)>),
}

impl<R: AsyncRead + Unpin> LineSource<R> {
    /// The next non-blank line with its line number in the input.
    async fn next_line(&mut self) -> std::io::Result<Option<(usize, String)>> {
        match self {
            LineSource::Input { lines, at } => loop {
                let Some(line) = lines.next_line().await? else {
                    return Ok(None);
                };
                *at += 1;
                if !line.trim().is_empty() {
                    return Ok(Some((*at, line)));
                }
            },
            LineSource::Again(lines) => Ok(lines.next()),
        }
    }

    /// The input's last line read, for an error reading the next.
    fn at(&self) -> usize {
        match self {
            LineSource::Input { at, .. } => *at,
            LineSource::Again(_) => 0,
        }
    }
}

/// A line refused as unavailable: its number, its text, and why.
type Refused = Vec<(usize, String, String)>;

/// Sends every non-blank line of `input` over the socket, pipelined; lines answered
/// `err unavailable` go again over a new connection after a pause, as `resend` says.
pub async fn send_unix<R: AsyncRead + Unpin + Send + 'static>(
    socket: &str,
    input: R,
    resend: Resend,
) -> Result<SendReport, ClientError> {
    let mut report = SendReport::default();
    let first = LineSource::Input {
        lines: BufReader::new(input).lines(),
        at: 0,
    };
    let mut refused = pass_unix(socket, first, &mut report).await?;
    let mut pause = resend.first_pause;
    for _ in 0..resend.times {
        if refused.is_empty() || report.cut_short.is_some() {
            break;
        }
        tokio::time::sleep(pause).await;
        pause = resend.next_pause(pause);
        let again = refused
            .iter()
            .map(|(line, text, _)| (*line, text.clone()))
            .collect::<Vec<_>>();
        report.resent += again.len();
        match pass_unix::<R>(socket, LineSource::Again(again.into_iter()), &mut report).await {
            Ok(still) => refused = still,
            Err(e) => {
                report.cut_short = Some(format!("sending again what was refused as unavailable: {e}"));
            }
        }
    }
    for (line, _, why) in refused {
        report.rejected += 1;
        report.errors.push(format!("line {line}: unavailable: {why}"));
    }
    Ok(report)
}

/// One connection's pass over `source`: counts what is acknowledged or rejected into
/// `report`, and returns the lines refused as unavailable that may go again.
async fn pass_unix<R: AsyncRead + Unpin + Send + 'static>(
    socket: &str,
    mut source: LineSource<R>,
    report: &mut SendReport,
) -> Result<Refused, ClientError> {
    let stream = UnixStream::connect(socket)
        .await
        .map_err(|e| ClientError::Connect(socket.into(), e))?;
    let (read, mut write) = stream.into_split();
    // Each line sent, in order, with its line number in the input: the daemon answers
    // each, a rejection names the line as the file counts it, and one refused as
    // unavailable is sent again. They wait here only as far as the daemon reads ahead.
    let (sent_tx, mut sent_rx) = tokio::sync::mpsc::unbounded_channel::<(usize, String)>();
    let writer = tokio::spawn(async move {
        let mut out = tokio::io::BufWriter::new(&mut write);
        // An input error still ends the stream cleanly: the daemon answers what it got.
        let read = async {
            while let Some((at, line)) = source.next_line().await? {
                out.write_all(line.as_bytes()).await?;
                out.write_all(b"\n").await?;
                let _ = sent_tx.send((at, line));
            }
            Ok::<_, std::io::Error>(())
        }
        .await;
        let flushed = out.flush().await;
        drop(out);
        let _ = write.shutdown().await;
        read.map_err(|e| format!("cannot read the input after line {}: {e}", source.at()))
            .and(flushed.map_err(|e| format!("cannot write to the daemon: {e}")))
    });
    let mut replies = BufReader::new(read).lines();
    let mut refused = Refused::new();
    loop {
        let reply = match replies.next_line().await {
            Ok(Some(reply)) => reply,
            Ok(None) => break,
            Err(e) => {
                report.cut_short = Some(format!("cannot read the daemon's replies: {e}"));
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
        } else if let Some(why) = reply.strip_prefix("err unavailable: ").filter(|why| resendable(why)) {
            refused.push((line, text, why.to_string()));
        } else {
            report.rejected += 1;
            report
                .errors
                .push(format!("line {line}: {}", reply.trim_start_matches("err ")));
        }
    }
    match writer.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            report.cut_short.get_or_insert(e);
        }
        Err(e) => {
            report.cut_short.get_or_insert(e.to_string());
        }
    }
    let unanswered = sent_rx.len();
    if unanswered > 0 && report.cut_short.is_none() {
        report.cut_short = Some(format!(
            "the daemon closed the connection with {unanswered} lines unanswered"
        ));
    }
    Ok(refused)
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
    let client = http_client();
    let url = format!("{}/v1/clicks", base.trim_end_matches('/'));
    let mut lines = BufReader::new(input).lines();
    let mut report = SendReport::default();
    let mut chunk = Vec::new();
    // The input's line number of each line in the chunk.
    let mut chunk_lines: Vec<usize> = Vec::new();
    let mut file_line = 0usize;
    loop {
        let line = match lines.next_line().await {
            Ok(line) => line,
            Err(e) => {
                // What was read before goes out; the report says where the input failed.
                report.cut_short = Some(format!("cannot read the input after line {file_line}: {e}"));
                None
            }
        };
        if let Some(l) = &line {
            file_line += 1;
            if !l.trim().is_empty() {
                chunk.extend_from_slice(l.as_bytes());
                chunk.push(b'\n');
                chunk_lines.push(file_line);
            }
        }
        let count = chunk_lines.len();
        if count == HTTP_CHUNK || (count > 0 && line.is_none()) {
            // Not empty: it has a first and a last line.
            let (first, last) = (chunk_lines[0], chunk_lines[count - 1]);
            let body = Bytes::from(std::mem::take(&mut chunk));
            let mut pause = resend.first_pause;
            let mut times = 0;
            let answer = loop {
                let answer = post_chunk(&client, &url, token, body.clone()).await?;
                let Ok((StatusCode::SERVICE_UNAVAILABLE, retry_after, reply)) = &answer else {
                    break answer;
                };
                let why: serde_json::Value = serde_json::from_slice(reply).unwrap_or_default();
                if times == resend.times || !why["error"].as_str().is_some_and(resendable) {
                    break answer;
                }
                times += 1;
                report.resent += count;
                tokio::time::sleep(retry_after.unwrap_or(pause).min(resend.longest_pause)).await;
                pause = resend.next_pause(pause);
            };
            let (status, body) = match answer {
                Ok((status, _, body)) => (status, body),
                Err(e) => {
                    // An unreadable input found before this stays the first cause.
                    report
                        .cut_short
                        .get_or_insert(format!("{url}: {e} (lines {first} to {file_line} unanswered)"));
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
        if line.is_none() {
            break;
        }
    }
    Ok(report)
}

/// Posts one chunk; answers its status, `Retry-After` and body, or why none came.
async fn post_chunk(
    client: &Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
    url: &str,
    token: Option<&str>,
    body: Bytes,
) -> Result<Result<(StatusCode, Option<Duration>, Bytes), String>, ClientError> {
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
            let retry_after = resp
                .headers()
                .get(hyper::header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok()?.trim().parse::<u64>().ok())
                .map(Duration::from_secs);
            let body = resp.into_body().collect().await;
            body.map(|b| (status, retry_after, b.to_bytes()))
                .map_err(|e| e.to_string())
        }
        Err(e) => Err(e.to_string()),
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

    /// The daemon's socket and HTTP listeners in-process on a real log in `dir`: the
    /// socket's path, the HTTP base URL, the ingestor (whose gate refuses clicks as
    /// unavailable while set) and the senders that keep them running.
    async fn listeners(
        dir: &std::path::Path,
    ) -> (
        String,
        String,
        std::sync::Arc<crate::ingest::Ingestor>,
        Vec<tokio::sync::watch::Sender<bool>>,
    ) {
        use crate::ingest::{http, unix, ByteBudget};
        let (_log, ingestor, running) = crate::ingest::ingestor_in(dir);
        let (stop, shutdown) = tokio::sync::watch::channel(false);
        let socket = dir.join("ingest.sock");
        let unix_listener = tokio::net::UnixListener::bind(&socket).unwrap();
        tokio::spawn(unix::serve(unix_listener, ingestor.clone(), 1 << 20, shutdown.clone()));
        let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", tcp.local_addr().unwrap());
        let settings = http::HttpIngestSettings {
            max_body: 1 << 20,
            tokens: Vec::new(),
            body_budget: ByteBudget::of(1 << 20),
        };
        tokio::spawn(http::serve(tcp, ingestor.clone(), settings, shutdown));
        (socket.display().to_string(), base, ingestor, vec![running, stop])
    }

    /// Three clicks and a blank line, the third click on the input's fourth line.
    const CLICKS: &[u8] = b"{\"link\":{\"id\":\"a\"}}\n{\"link\":{\"id\":\"b\"}}\n\n{\"link\":{\"id\":\"c\"}}\n";

    fn quick(times: u32) -> Resend {
        Resend {
            times,
            first_pause: Duration::from_millis(20),
            longest_pause: Duration::from_millis(20),
        }
    }

    /// Lines the daemon refuses as unavailable (here: storage over `max_bytes`) go again,
    /// over either transport, until they are taken.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn lines_refused_as_unavailable_are_sent_again_until_taken() {
        let dir = tempfile::tempdir().unwrap();
        let (socket, base, ingestor, _running) = listeners(dir.path()).await;
        for over_http in [false, true] {
            ingestor
                .gate
                .over_budget
                .store(true, std::sync::atomic::Ordering::Relaxed);
            let gate = ingestor.gate.clone();
            let reopen = tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(200)).await;
                gate.over_budget.store(false, std::sync::atomic::Ordering::Relaxed);
            });
            // 50 sends again take at least a second: the gate opens well before they end.
            let report = if over_http {
                send_http(&base, None, CLICKS, quick(50)).await.unwrap()
            } else {
                send_unix(&socket, CLICKS, quick(50)).await.unwrap()
            };
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

    /// Lines still refused after the last resend are reported rejected, by their line in
    /// the input, with the daemon's reason.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn lines_still_unavailable_after_the_last_resend_are_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let (socket, base, ingestor, _running) = listeners(dir.path()).await;
        ingestor
            .gate
            .over_budget
            .store(true, std::sync::atomic::Ordering::Relaxed);
        let report = send_unix(&socket, CLICKS, quick(2)).await.unwrap();
        assert_eq!(
            (report.acknowledged, report.rejected, report.resent),
            (0, 3, 6),
            "{report:?}"
        );
        assert!(
            report.errors[2].starts_with("line 4: unavailable: storage is over"),
            "{report:?}"
        );
        let report = send_http(&base, None, CLICKS, quick(2)).await.unwrap();
        assert_eq!(
            (report.acknowledged, report.rejected, report.resent),
            (0, 3, 6),
            "{report:?}"
        );
        assert!(report.errors[0].starts_with("lines 1 to 4: 503"), "{report:?}");
    }
}
