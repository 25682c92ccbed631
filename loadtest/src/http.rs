//! A minimal HTTP/1.1 client over one kept-alive loopback connection, for ingest and the
//! admin API. It owns connecting, sending one request at a time and reading the whole
//! answer; it must not retry (whether a request may be repeated is the caller's business)
//! and must refuse any address outside loopback.

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper::header::{HeaderMap, HOST};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use std::net::{SocketAddr, ToSocketAddrs};
use std::time::Duration;

pub struct Http1 {
    sender: SendRequest<Full<Bytes>>,
    host: String,
    conn: tokio::task::JoinHandle<()>,
}

impl Drop for Http1 {
    fn drop(&mut self) {
        self.conn.abort();
    }
}

#[derive(Debug)]
pub struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Http1 {
    pub async fn connect(addr: SocketAddr) -> std::io::Result<Http1> {
        if !addr.ip().is_loopback() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("{addr} is not loopback"),
            ));
        }
        let stream = tokio::net::TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(std::io::Error::other)?;
        let conn = tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(Http1 {
            sender,
            host: addr.to_string(),
            conn,
        })
    }

    /// Whether the connection can still take a request.
    pub fn is_open(&self) -> bool {
        !self.sender.is_closed()
    }

    /// Sends one request and reads the whole answer within `timeout`.
    pub async fn request(
        &mut self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: Bytes,
        timeout: Duration,
    ) -> Result<Answer, String> {
        let mut builder = Request::builder().method(method).uri(path).header(HOST, &self.host);
        for (name, value) in headers {
            builder = builder.header(*name, *value);
        }
        let req = builder.body(Full::new(body)).map_err(|e| format!("request: {e}"))?;
        let exchange = async {
            self.sender.ready().await.map_err(|e| format!("connection: {e}"))?;
            let resp = self.sender.send_request(req).await.map_err(|e| format!("send: {e}"))?;
            let (parts, body) = resp.into_parts();
            let body = body
                .collect()
                .await
                .map_err(|e| format!("read answer: {e}"))?
                .to_bytes();
            Ok(Answer {
                status: parts.status,
                headers: parts.headers,
                body,
            })
        };
        tokio::time::timeout(timeout, exchange)
            .await
            .map_err(|_| format!("no answer within {timeout:?}"))?
    }
}

/// `http://127.0.0.1:8080[/…]` or `127.0.0.1:8080` → a loopback socket address; `localhost`
/// resolves to loopback only.
pub fn loopback_addr(url: &str) -> Result<SocketAddr, String> {
    let rest = url.strip_prefix("http://").unwrap_or(url);
    if rest.starts_with("https://") {
        return Err(format!("{url:?}: only plain http on loopback is supported"));
    }
    let authority = rest.split('/').next().unwrap_or(rest);
    let addr = authority
        .to_socket_addrs()
        .map_err(|e| format!("{url:?}: {e}"))?
        .find(|a| a.ip().is_loopback())
        .ok_or_else(|| format!("{url:?} is not a loopback address; only 127.0.0.1 targets are allowed"))?;
    Ok(addr)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_loopback_targets_are_accepted() {
        assert_eq!(
            loopback_addr("http://127.0.0.1:8080").unwrap(),
            "127.0.0.1:8080".parse().unwrap()
        );
        assert_eq!(loopback_addr("http://127.0.0.1:8080/v1/clicks").unwrap().port(), 8080);
        assert_eq!(loopback_addr("127.0.0.1:9").unwrap().port(), 9);
        assert!(loopback_addr("http://localhost:8080").unwrap().ip().is_loopback());
        assert!(loopback_addr("http://10.0.0.1:8080").is_err());
        assert!(loopback_addr("http://192.168.1.1:80").is_err());
        assert!(loopback_addr("https://127.0.0.1:443").is_err());
        assert!(loopback_addr("http://127.0.0.1").is_err());
    }
}
