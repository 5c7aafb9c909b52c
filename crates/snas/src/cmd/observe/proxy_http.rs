//! `GET` from a proxy's management endpoint (TCP), optionally from inside a network namespace
//! (a testbed proxy's endpoint lives in the proxy's namespace).
//!
//! HTTP/1.1 is hyper's (`client::conn::http1` over a tokio `TcpStream`), on a current-thread
//! runtime of the calling thread, so the socket is opened in that thread's namespace.
//!
//! # Limits
//! One request per connection, [`EXCHANGE_TIMEOUT`] for the whole exchange, answers up to
//! [`MAX_BODY`]; no TLS (the management endpoint is on a management network).

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper::header::{HOST, USER_AGENT};
use hyper::Request;
use hyper_util::rt::TokioIo;

/// Time allowed for one HTTP exchange.
pub(super) const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(3);
/// Largest answer read from a proxy.
pub(super) const MAX_BODY: usize = 64 << 20;

/// `GET path` from `addr`, from inside the namespace `netns` if given; the body of a 200
/// answer, an error naming the status and body otherwise.
pub(super) fn get(addr: SocketAddr, netns: Option<&str>, path: &str) -> anyhow::Result<Vec<u8>> {
    let p = path.to_owned();
    let (status, body) = match netns {
        Some(ns) => snas_testbed::netns::in_netns(ns, move || get_here(addr, &p))
            .with_context(|| format!("entering {ns}"))??,
        None => get_here(addr, path)?,
    };
    if status != 200 {
        bail!(
            "GET {path}: HTTP {status}: {}",
            String::from_utf8_lossy(&body).trim()
        );
    }
    Ok(body.to_vec())
}

/// One exchange from the calling thread's namespace: (status, body).
fn get_here(addr: SocketAddr, path: &str) -> anyhow::Result<(u16, Bytes)> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("runtime")?;
    rt.block_on(async {
        tokio::time::timeout(EXCHANGE_TIMEOUT, exchange(addr, path))
            .await
            .map_err(|_| anyhow!("no answer within {EXCHANGE_TIMEOUT:?}"))?
    })
}

async fn exchange(addr: SocketAddr, path: &str) -> anyhow::Result<(u16, Bytes)> {
    let stream = tokio::net::TcpStream::connect(addr).await?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    let req = Request::get(path)
        .header(HOST, addr.to_string())
        .header(USER_AGENT, "snas")
        .body(Empty::<Bytes>::new())?;
    let answer = async move {
        let resp = sender.send_request(req).await?;
        let status = resp.status().as_u16();
        let body = Limited::new(resp.into_body(), MAX_BODY)
            .collect()
            .await
            .map_err(|e| anyhow!("reading the answer: {e}"))?
            .to_bytes();
        drop(sender);
        Ok::<_, anyhow::Error>((status, body))
    };
    let (answer, _closed) = tokio::join!(answer, conn);
    answer
}
