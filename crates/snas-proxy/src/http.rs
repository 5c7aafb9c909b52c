//! A minimal HTTP/1.1 client for the two small requests the proxy makes: the policy GET to a
//! node's agent and the binding POST to a peer proxy.
//!
//! # What it owns
//! One request per connection (`Connection: close`), a whole-exchange timeout, a response-size
//! cap, and `Content-Length` or read-to-close bodies.
//!
//! # Limits
//! No TLS, no redirects, no chunked transfer encoding (the agent and the proxies answer with a
//! length). Responses larger than [`MAX_RESPONSE`] are rejected.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Largest response accepted (headers + body): a signed policy is at most 1 MiB.
pub const MAX_RESPONSE: usize = (1 << 20) + 16 * 1024;

/// A failed exchange.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    /// connect, write or read failed
    #[error("{addr}: {source}")]
    Io {
        /// Peer.
        addr: SocketAddr,
        /// The error.
        source: std::io::Error,
    },
    /// no complete answer within the timeout
    #[error("{addr}: timed out after {timeout:?}")]
    Timeout {
        /// Peer.
        addr: SocketAddr,
        /// The limit.
        timeout: Duration,
    },
    /// the answer is not HTTP/1.x we understand
    #[error("{addr}: bad response: {detail}")]
    BadResponse {
        /// Peer.
        addr: SocketAddr,
        /// What was wrong.
        detail: &'static str,
    },
}

/// A response: status and body.
#[derive(Debug)]
pub struct Response {
    /// Status code.
    pub status: u16,
    /// Body bytes.
    pub body: Vec<u8>,
}

/// Sends one request and reads the response. `headers` are extra `Name: value` lines.
pub async fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
    timeout: Duration,
) -> Result<Response, HttpError> {
    match tokio::time::timeout(timeout, exchange(addr, method, path, headers, body)).await {
        Ok(r) => r,
        Err(_) => Err(HttpError::Timeout { addr, timeout }),
    }
}

async fn exchange(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Result<Response, HttpError> {
    let io = |source| HttpError::Io { addr, source };
    let bad = |detail| HttpError::BadResponse { addr, detail };
    let mut s = TcpStream::connect(addr).await.map_err(io)?;
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(k);
        req.push_str(": ");
        req.push_str(v);
        req.push_str("\r\n");
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).await.map_err(io)?;
    s.write_all(body).await.map_err(io)?;
    let mut buf = Vec::with_capacity(4096);
    let mut chunk = [0u8; 8192];
    let (head_end, status, length) = loop {
        let n = s.read(&mut chunk).await.map_err(io)?;
        if n == 0 {
            return Err(bad("connection closed before the headers ended"));
        }
        buf.extend_from_slice(&chunk[..n]);
        if buf.len() > MAX_RESPONSE {
            return Err(bad("response too large"));
        }
        if let Some(pos) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = std::str::from_utf8(&buf[..pos]).map_err(|_| bad("headers not UTF-8"))?;
            let mut lines = head.split("\r\n");
            let status_line = lines.next().ok_or(bad("no status line"))?;
            let mut parts = status_line.split(' ');
            let version = parts.next().unwrap_or("");
            if !version.starts_with("HTTP/1.") {
                return Err(bad("not HTTP/1.x"));
            }
            let status: u16 = parts
                .next()
                .and_then(|c| c.parse().ok())
                .ok_or(bad("bad status code"))?;
            let mut length = None;
            for l in lines {
                let Some((k, v)) = l.split_once(':') else {
                    continue;
                };
                let k = k.trim();
                if k.eq_ignore_ascii_case("content-length") {
                    length = Some(
                        v.trim()
                            .parse::<usize>()
                            .map_err(|_| bad("bad Content-Length"))?,
                    );
                } else if k.eq_ignore_ascii_case("transfer-encoding")
                    && !v.trim().eq_ignore_ascii_case("identity")
                {
                    return Err(bad("chunked responses are not supported"));
                }
            }
            break (pos + 4, status, length);
        }
    };
    if let Some(len) = length {
        if head_end + len > MAX_RESPONSE {
            return Err(bad("response too large"));
        }
    }
    loop {
        if let Some(len) = length {
            if buf.len() >= head_end + len {
                buf.truncate(head_end + len);
                break;
            }
        }
        let n = s.read(&mut chunk).await.map_err(io)?;
        if n == 0 {
            if length.is_some() {
                return Err(bad("body shorter than Content-Length"));
            }
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
        if buf.len() > MAX_RESPONSE {
            return Err(bad("response too large"));
        }
    }
    Ok(Response {
        status,
        body: buf.split_off(head_end),
    })
}
