//! The reference ingest client behind `clickhook send`: streams NDJSON clicks into a
//! running daemon over the Unix socket (pipelined, reading replies while writing) or over
//! HTTP (chunks of up to 1,000 lines), and counts what was acknowledged. It must not
//! retry or alter clicks: it reports exactly what the daemon answered.

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

/// Lines per HTTP request (SPEC §9).
pub const HTTP_CHUNK: usize = 1000;

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
    /// One line per rejection: which line of the input (or chunk), and why.
    pub errors: Vec<String>,
    /// What ended the run before every line was answered (an unreadable input, a lost
    /// connection); the counts above are what was answered until then.
    pub cut_short: Option<String>,
}

/// Sends every non-blank line of `input` over the socket, pipelined.
pub async fn send_unix<R: AsyncRead + Unpin + Send + 'static>(
    socket: &str,
    input: R,
) -> Result<SendReport, ClientError> {
    let stream = UnixStream::connect(socket)
        .await
        .map_err(|e| ClientError::Connect(socket.into(), e))?;
    let (read, mut write) = stream.into_split();
    // The input's line number of each line sent, in order: the daemon answers each
    // non-blank line, and a rejection names the line as the file counts it.
    let (sent_tx, mut sent_rx) = tokio::sync::mpsc::unbounded_channel::<usize>();
    let writer = tokio::spawn(async move {
        let mut lines = BufReader::new(input).lines();
        let mut file_line = 0usize;
        let mut out = tokio::io::BufWriter::new(&mut write);
        // An input error still ends the stream cleanly: the daemon answers what it got.
        let read = async {
            while let Some(line) = lines.next_line().await? {
                file_line += 1;
                if line.trim().is_empty() {
                    continue;
                }
                let _ = sent_tx.send(file_line);
                out.write_all(line.as_bytes()).await?;
                out.write_all(b"\n").await?;
            }
            Ok::<_, std::io::Error>(())
        }
        .await;
        let flushed = out.flush().await;
        drop(out);
        let _ = write.shutdown().await;
        read.map_err(|e| format!("cannot read the input after line {file_line}: {e}"))
            .and(flushed.map_err(|e| format!("cannot write to the daemon: {e}")))
    });
    let mut replies = BufReader::new(read).lines();
    let mut report = SendReport::default();
    let mut answered = 0usize;
    loop {
        let reply = match replies.next_line().await {
            Ok(Some(reply)) => reply,
            Ok(None) => break,
            Err(e) => {
                report.cut_short = Some(format!("cannot read the daemon's replies: {e}"));
                break;
            }
        };
        answered += 1;
        let line = sent_rx.recv().await.unwrap_or(answered);
        if reply.starts_with("ok ") {
            report.acknowledged += 1;
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
    Ok(report)
}

/// Posts the lines as NDJSON chunks to `{base}/v1/clicks`.
pub async fn send_http<R: AsyncRead + Unpin>(
    base: &str,
    token: Option<&str>,
    input: R,
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
            let mut req = hyper::Request::post(&url).header("content-type", "application/x-ndjson");
            if let Some(t) = token {
                req = req.header("authorization", format!("Bearer {t}"));
            }
            let req = req
                .body(Full::new(Bytes::from(std::mem::take(&mut chunk))))
                .map_err(|e| ClientError::Http(e.to_string()))?;
            let answer = match client.request(req).await {
                Ok(resp) => {
                    let status = resp.status();
                    let body = resp.into_body().collect().await;
                    body.map(|b| (status, b.to_bytes())).map_err(|e| e.to_string())
                }
                Err(e) => Err(e.to_string()),
            };
            let (status, body) = match answer {
                Ok(answer) => answer,
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
            send_http(&format!("https://127.0.0.1:{port}"), None, input),
        )
        .await;
        let head = first_bytes.await.unwrap();
        assert_eq!(head[..2], [0x16, 0x03], "a TLS handshake record, not an HTTP request");
    }
}
