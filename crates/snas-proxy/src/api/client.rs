//! A typed client of the proxy's endpoints, for the agents (health probes, job-ended notices),
//! the peer proxies (binding pushes), the CLI (`snas flows`, `snas drops`) and the testbed; and
//! the one HTTP exchange the proxy itself makes as a client ([`exchange`]: the policy fetch
//! from an agent, the binding push to a peer).
//!
//! Owns nothing of the protocol: HTTP/1.1 is hyper's (`client::conn::http1` over a tokio
//! `TcpStream`: framing, chunked bodies, keep-alive rules), the bodies are the serde types of
//! [`super::types`], the paths those of [`super::types::paths`]. What it adds: one connection
//! per call, a deadline over the whole exchange, a bound on the answer's size, and errors that
//! name the address, the request and, for refusals, the status and the proxy's text.
//!
//! [`ProxyClient`] is async; [`blocking::ProxyClient`] wraps it for synchronous callers (it
//! opens its socket on the calling thread, so a caller inside another network namespace —
//! a testbed proxy's — reaches the endpoint there).
//!
//! # Limits
//! - One request per connection (calls are per job or per operator command, not per packet).
//! - No TLS: the management endpoint is on loopback or a management network, the service
//!   endpoint on the underlay; secrets are bearer tokens compared in constant time.
//! - Answers larger than the call's bound ([`MAX_ANSWER`] by default) are refused.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::header::{AUTHORIZATION, CONTENT_TYPE, HOST, USER_AGENT};
use hyper::Request;

/// HTTP methods (hyper's), for [`Call`].
pub use hyper::Method;
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;

use super::types::{paths, DropCounts, FlowList, PeerBinding, ProxyHealth};

/// Default deadline of one call.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(3);

/// Largest answer read by default (10 000 flows are a few MB).
pub const MAX_ANSWER: usize = 64 << 20;

/// Errors of a call to a proxy (or, for [`exchange`], to any of our HTTP endpoints).
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The address could not be reached.
    #[error("{addr}: {source}")]
    Connect {
        /// The endpoint.
        addr: SocketAddr,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The HTTP exchange broke (connection closed, not HTTP, answer too large).
    #[error("{addr}: {method} {path}: {detail}")]
    Exchange {
        /// The endpoint.
        addr: SocketAddr,
        /// Request method.
        method: Method,
        /// Request path.
        path: String,
        /// What broke.
        detail: String,
    },
    /// No complete answer within the deadline.
    #[error("{addr}: {method} {path}: no answer within {after:?}")]
    Timeout {
        /// The endpoint.
        addr: SocketAddr,
        /// Request method.
        method: Method,
        /// Request path.
        path: String,
        /// The deadline.
        after: Duration,
    },
    /// The endpoint answered with a status the call does not expect (its text body as detail).
    #[error("{addr}: {method} {path}: HTTP {status}: {detail}")]
    Refused {
        /// The endpoint.
        addr: SocketAddr,
        /// Request method.
        method: Method,
        /// Request path.
        path: String,
        /// HTTP status.
        status: u16,
        /// The answer's body, trimmed.
        detail: String,
    },
    /// The answer was not the JSON the API promises.
    #[error("{addr}: {method} {path}: malformed answer: {detail}")]
    Malformed {
        /// The endpoint.
        addr: SocketAddr,
        /// Request method.
        method: Method,
        /// Request path.
        path: String,
        /// What did not parse.
        detail: String,
    },
    /// A runtime for a blocking call could not be built.
    #[error("proxy API client runtime: {0}")]
    Runtime(#[source] std::io::Error),
}

impl ClientError {
    /// The HTTP status of a refusal.
    pub fn status(&self) -> Option<u16> {
        match self {
            ClientError::Refused { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// One request: what [`exchange`] sends.
#[derive(Debug, Clone)]
pub struct Call {
    /// Method.
    pub method: Method,
    /// Path (and query).
    pub path: String,
    /// `Authorization: Bearer …`, if any.
    pub bearer: Option<Arc<str>>,
    /// Body and its content type, if any.
    pub body: Option<(&'static str, Bytes)>,
    /// Whole-exchange deadline.
    pub timeout: Duration,
    /// Largest answer body accepted.
    pub max_answer: usize,
}

impl Call {
    /// A bodiless call with the default deadline and bound.
    pub fn new(method: Method, path: impl Into<String>) -> Call {
        Call {
            method,
            path: path.into(),
            bearer: None,
            body: None,
            timeout: DEFAULT_TIMEOUT,
            max_answer: MAX_ANSWER,
        }
    }
}

/// An answer: status and body (whatever the status).
#[derive(Debug, Clone)]
pub struct Answer {
    /// HTTP status.
    pub status: u16,
    /// Body.
    pub body: Bytes,
}

/// One exchange on a fresh TCP connection to `addr`, within `call.timeout`.
pub async fn exchange(addr: SocketAddr, call: Call) -> Result<Answer, ClientError> {
    let (method, path, after) = (call.method.clone(), call.path.clone(), call.timeout);
    match tokio::time::timeout(after, exchange_now(addr, call)).await {
        Ok(r) => r,
        Err(_) => Err(ClientError::Timeout {
            addr,
            method,
            path,
            after,
        }),
    }
}

async fn exchange_now(addr: SocketAddr, call: Call) -> Result<Answer, ClientError> {
    let broke = |detail: String| ClientError::Exchange {
        addr,
        method: call.method.clone(),
        path: call.path.clone(),
        detail,
    };
    let stream = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|source| ClientError::Connect { addr, source })?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| broke(e.to_string()))?;
    let mut req = Request::builder()
        .method(call.method.clone())
        .uri(call.path.as_str())
        .header(HOST, addr.to_string())
        .header(USER_AGENT, concat!("snas/", env!("CARGO_PKG_VERSION")));
    if let Some(token) = &call.bearer {
        req = req.header(AUTHORIZATION, format!("Bearer {token}"));
    }
    let body = match call.body.clone() {
        Some((content_type, bytes)) => {
            req = req.header(CONTENT_TYPE, content_type);
            bytes
        }
        None => Bytes::new(),
    };
    let req = req
        .body(Full::new(body))
        .map_err(|e| broke(e.to_string()))?;
    let max = call.max_answer;
    let answer = async move {
        let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
        let status = resp.status().as_u16();
        let body = Limited::new(resp.into_body(), max)
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        // Dropping the sender lets the connection task finish.
        drop(sender);
        Ok::<_, String>(Answer { status, body })
    };
    // The connection is driven here, not spawned: it ends with the exchange.
    let (answer, _closed) = tokio::join!(answer, conn);
    answer.map_err(broke)
}

/// A client of one proxy endpoint (management or service, by the address given).
#[derive(Debug, Clone)]
pub struct ProxyClient {
    addr: SocketAddr,
    timeout: Duration,
    token: Option<Arc<str>>,
}

impl ProxyClient {
    /// A client for the endpoint at `addr`, with [`DEFAULT_TIMEOUT`] per call and no token.
    pub fn new(addr: SocketAddr) -> ProxyClient {
        ProxyClient {
            addr,
            timeout: DEFAULT_TIMEOUT,
            token: None,
        }
    }

    /// The same client with another deadline per call.
    pub fn with_timeout(mut self, timeout: Duration) -> ProxyClient {
        self.timeout = timeout;
        self
    }

    /// The same client sending `Authorization: Bearer <token>`: the management token (drain,
    /// undrain) or the peer secret (bindings).
    pub fn with_token(mut self, token: impl Into<Arc<str>>) -> ProxyClient {
        self.token = Some(token.into());
        self
    }

    /// The endpoint's address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `GET /healthz`: `ok` (200) or `draining` (503).
    pub async fn health(&self) -> Result<ProxyHealth, ClientError> {
        self.health_call(Method::GET, paths::HEALTHZ).await
    }

    /// `POST /v1/drain` (management token): the health after it (`draining`).
    pub async fn drain(&self) -> Result<ProxyHealth, ClientError> {
        self.health_call(Method::POST, paths::DRAIN).await
    }

    /// `POST /v1/undrain` (management token): the health after it (`ok`).
    pub async fn undrain(&self) -> Result<ProxyHealth, ClientError> {
        self.health_call(Method::POST, paths::UNDRAIN).await
    }

    /// `GET /v1/flows`: the live flows.
    pub async fn flows(&self) -> Result<FlowList, ClientError> {
        self.json(self.call(Method::GET, paths::FLOWS)).await
    }

    /// `GET /v1/drops`: the drop counters.
    pub async fn drops(&self) -> Result<DropCounts, ClientError> {
        self.json(self.call(Method::GET, paths::DROPS)).await
    }

    /// `GET /metrics`: the Prometheus exposition text.
    pub async fn metrics(&self) -> Result<String, ClientError> {
        let call = self.call(Method::GET, paths::METRICS);
        let (method, path) = (call.method.clone(), call.path.clone());
        let body = self.expect(call, 200).await?;
        String::from_utf8(body.to_vec()).map_err(|e| self.malformed(method, path, &e))
    }

    /// `POST /v1/bindings` (peer secret as the token): the peer checked the binding against
    /// the job's policy and bound it.
    pub async fn push_binding(&self, binding: &PeerBinding) -> Result<(), ClientError> {
        let mut call = self.call(Method::POST, paths::BINDINGS);
        let body = serde_json::to_vec(binding)
            .map_err(|e| self.malformed(call.method.clone(), call.path.clone(), &e))?;
        call.body = Some(("application/json", Bytes::from(body)));
        self.expect(call, 200).await.map(|_| ())
    }

    /// `POST /v1/jobs/{job_key}/ended` (from the job's node): 204, the proxy frees the job's
    /// state. Refusals carry the status: 404 (the proxy holds nothing of the job), 403 (not
    /// the job's node), 400 (bad key).
    pub async fn job_ended(&self, job_key: snas_wire::JobKey) -> Result<(), ClientError> {
        let call = self.call(Method::POST, paths::job_ended(job_key));
        self.expect(call, 204).await.map(|_| ())
    }

    /// `POST /v1/jobs/{job_key}/updated/{serial}` (from the job's node): the job's policy was
    /// updated to `serial`. Returns the status taken: 202 (the proxy refetches), 204 (it holds
    /// that serial or a higher one already). Refusals carry the status: 429 (refetch rate
    /// limit), 404 (the proxy holds nothing of the job), 403 (not the job's node), 400.
    pub async fn job_updated(
        &self,
        job_key: snas_wire::JobKey,
        serial: snas_wire::PolicySerial,
    ) -> Result<u16, ClientError> {
        let call = self.call(Method::POST, paths::job_updated(job_key, serial));
        match self.expect(call, 202).await {
            Ok(_) => Ok(202),
            Err(e) if e.status() == Some(204) => Ok(204),
            Err(e) => Err(e),
        }
    }

    fn call(&self, method: Method, path: impl Into<String>) -> Call {
        Call {
            bearer: self.token.clone(),
            timeout: self.timeout,
            ..Call::new(method, path)
        }
    }

    async fn health_call(&self, method: Method, path: &str) -> Result<ProxyHealth, ClientError> {
        let call = self.call(method, path);
        let (method, path) = (call.method.clone(), call.path.clone());
        let a = exchange(self.addr, call).await?;
        ProxyHealth::from_status(a.status).ok_or_else(|| self.refused(method, path, &a))
    }

    async fn json<T: DeserializeOwned>(&self, call: Call) -> Result<T, ClientError> {
        let (method, path) = (call.method.clone(), call.path.clone());
        let body = self.expect(call, 200).await?;
        serde_json::from_slice(&body).map_err(|e| self.malformed(method, path, &e))
    }

    /// The body of an answer with status `want`; any other status is a refusal.
    async fn expect(&self, call: Call, want: u16) -> Result<Bytes, ClientError> {
        let (method, path) = (call.method.clone(), call.path.clone());
        let a = exchange(self.addr, call).await?;
        if a.status == want {
            return Ok(a.body);
        }
        Err(self.refused(method, path, &a))
    }

    fn refused(&self, method: Method, path: String, a: &Answer) -> ClientError {
        ClientError::Refused {
            addr: self.addr,
            method,
            path,
            status: a.status,
            detail: String::from_utf8_lossy(&a.body).trim().to_owned(),
        }
    }

    fn malformed(&self, method: Method, path: String, e: &dyn std::fmt::Display) -> ClientError {
        ClientError::Malformed {
            addr: self.addr,
            method,
            path,
            detail: e.to_string(),
        }
    }
}

/// The client for synchronous callers (the CLI, the testbed, tests).
pub mod blocking {
    use super::*;

    /// A client of one proxy endpoint; each call blocks until answered (or the deadline).
    ///
    /// Each call runs on a current-thread runtime of its own on the calling thread (its socket
    /// is opened in the calling thread's network namespace); called from inside a tokio
    /// runtime it runs on a helper thread instead of blocking that runtime's worker.
    #[derive(Debug, Clone)]
    pub struct ProxyClient {
        inner: super::ProxyClient,
    }

    impl ProxyClient {
        /// A client for the endpoint at `addr`, with [`DEFAULT_TIMEOUT`] per call.
        pub fn new(addr: SocketAddr) -> ProxyClient {
            ProxyClient {
                inner: super::ProxyClient::new(addr),
            }
        }

        /// The same client with another deadline per call.
        pub fn with_timeout(self, timeout: Duration) -> ProxyClient {
            ProxyClient {
                inner: self.inner.with_timeout(timeout),
            }
        }

        /// The same client sending a bearer token.
        pub fn with_token(self, token: impl Into<Arc<str>>) -> ProxyClient {
            ProxyClient {
                inner: self.inner.with_token(token),
            }
        }

        /// The endpoint's address.
        pub fn addr(&self) -> SocketAddr {
            self.inner.addr()
        }

        /// The async client underneath.
        pub fn as_async(&self) -> &super::ProxyClient {
            &self.inner
        }

        /// See [`super::ProxyClient::health`].
        pub fn health(&self) -> Result<ProxyHealth, ClientError> {
            run(self.inner.health())
        }

        /// See [`super::ProxyClient::drain`].
        pub fn drain(&self) -> Result<ProxyHealth, ClientError> {
            run(self.inner.drain())
        }

        /// See [`super::ProxyClient::undrain`].
        pub fn undrain(&self) -> Result<ProxyHealth, ClientError> {
            run(self.inner.undrain())
        }

        /// See [`super::ProxyClient::flows`].
        pub fn flows(&self) -> Result<FlowList, ClientError> {
            run(self.inner.flows())
        }

        /// See [`super::ProxyClient::drops`].
        pub fn drops(&self) -> Result<DropCounts, ClientError> {
            run(self.inner.drops())
        }

        /// See [`super::ProxyClient::metrics`].
        pub fn metrics(&self) -> Result<String, ClientError> {
            run(self.inner.metrics())
        }

        /// See [`super::ProxyClient::push_binding`].
        pub fn push_binding(&self, binding: &PeerBinding) -> Result<(), ClientError> {
            run(self.inner.push_binding(binding))
        }

        /// See [`super::ProxyClient::job_ended`].
        pub fn job_ended(&self, job_key: snas_wire::JobKey) -> Result<(), ClientError> {
            run(self.inner.job_ended(job_key))
        }
    }

    fn run<T: Send>(
        call: impl Future<Output = Result<T, ClientError>> + Send,
    ) -> Result<T, ClientError> {
        block_on(call, ClientError::Runtime)
    }

    /// Runs an async client call to completion from synchronous code, on a current-thread
    /// runtime of its own (`runtime_error` wraps a failure to build it): on the calling thread,
    /// or, when called from inside a tokio runtime, on a helper thread. The blocking clients of
    /// the proxy and of the agent (`snas_agent::api::blocking`) share it.
    pub fn block_on<T: Send, E: Send>(
        call: impl Future<Output = Result<T, E>> + Send,
        runtime_error: impl FnOnce(std::io::Error) -> E + Send,
    ) -> Result<T, E> {
        let block = move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(runtime_error)?
                .block_on(call)
        };
        if tokio::runtime::Handle::try_current().is_err() {
            return block();
        }
        // Inside a runtime: blocking its thread could stall the tasks the call waits for.
        std::thread::scope(|s| match s.spawn(block).join() {
            Ok(r) => r,
            Err(panic) => std::panic::resume_unwind(panic),
        })
    }
}
