//! A typed client of the agent's local API (the Unix socket), for the CLI, the testbed and
//! anything else that drives an agent.
//!
//! Owns nothing of the protocol: HTTP/1.1 is hyper's (`client::conn::http1` over a tokio
//! `UnixStream`: framing, chunked bodies, keep-alive rules), the bodies are the serde types of
//! [`super::types`], the paths those of [`super::types::paths`]. What it adds: one connection
//! per call, a deadline over the whole exchange, a bound on the answer's size, and errors that
//! name the socket, the request and, for refusals, the agent's error code.
//!
//! [`AgentClient`] is async; [`blocking::AgentClient`] wraps it for synchronous callers.
//!
//! # Limits
//! - One request per connection (the API is called a few times per job, not per packet).
//! - Answers larger than [`MAX_ANSWER`] are refused.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::header::{CONTENT_TYPE, HOST};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;

use super::types::{
    paths, CreateJob, DnsView, ErrorBody, JobDrops, JobView, ProxyStatus, RevocationOutcome,
};

/// Default deadline of one call (creating a job on a loaded node takes well under a second;
/// the margin is for a node under stress, where an early give-up would leave the caller
/// unsure whether the job exists).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);

/// Largest answer read (a list of thousands of jobs is a few MB).
pub const MAX_ANSWER: usize = 64 << 20;

/// Errors of a call to the agent's API.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The socket could not be reached.
    #[error("agent API {socket}: {source}")]
    Connect {
        /// The API socket.
        socket: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The HTTP exchange broke (connection closed, not HTTP, answer too large).
    #[error("agent API {socket}: {method} {path}: {detail}")]
    Exchange {
        /// The API socket.
        socket: PathBuf,
        /// Request method.
        method: Method,
        /// Request path.
        path: String,
        /// What broke.
        detail: String,
    },
    /// No complete answer within the deadline.
    #[error("agent API {socket}: {method} {path}: no answer within {after:?}")]
    Timeout {
        /// The API socket.
        socket: PathBuf,
        /// Request method.
        method: Method,
        /// Request path.
        path: String,
        /// The deadline.
        after: Duration,
    },
    /// The agent refused the request (an error status with its `{"error", "detail"}` body; a
    /// body that is not one becomes `error: "http_<status>"` with the body as detail).
    #[error("agent API {method} {path}: HTTP {status}: {}: {}", body.error, body.detail)]
    Refused {
        /// Request method.
        method: Method,
        /// Request path.
        path: String,
        /// HTTP status.
        status: u16,
        /// The agent's error.
        body: ErrorBody,
    },
    /// The answer was not the JSON the API promises.
    #[error("agent API {method} {path}: malformed answer: {detail}")]
    Malformed {
        /// Request method.
        method: Method,
        /// Request path.
        path: String,
        /// What did not parse.
        detail: String,
    },
    /// A runtime for a blocking call could not be built.
    #[error("agent API client runtime: {0}")]
    Runtime(#[source] std::io::Error),
}

impl ClientError {
    /// The agent's error code (`job_not_found`, `policy_invalid`, …) of a refusal.
    pub fn code(&self) -> Option<&str> {
        match self {
            ClientError::Refused { body, .. } => Some(&body.error),
            _ => None,
        }
    }

    /// The HTTP status of a refusal.
    pub fn status(&self) -> Option<u16> {
        match self {
            ClientError::Refused { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// Whether the agent has no such job (404 `job_not_found`).
    pub fn is_job_not_found(&self) -> bool {
        self.code() == Some("job_not_found")
    }
}

/// A client of one agent's API socket (async).
#[derive(Debug, Clone)]
pub struct AgentClient {
    socket: PathBuf,
    timeout: Duration,
}

/// What a call sends.
struct Call<'a> {
    method: Method,
    path: String,
    body: Option<(&'a str, Bytes)>,
}

impl AgentClient {
    /// A client for the agent listening on `socket`, with [`DEFAULT_TIMEOUT`] per call.
    pub fn new(socket: impl Into<PathBuf>) -> AgentClient {
        AgentClient {
            socket: socket.into(),
            timeout: DEFAULT_TIMEOUT,
        }
    }

    /// The same client with another deadline per call.
    pub fn with_timeout(mut self, timeout: Duration) -> AgentClient {
        self.timeout = timeout;
        self
    }

    /// The API socket.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// `POST /v1/jobs`: verifies the signed policy and creates the job.
    pub async fn create_job(&self, token: &str) -> Result<JobView, ClientError> {
        let body = serde_json::to_vec(&CreateJob {
            policy: token.trim().to_owned(),
        })
        .map_err(|e| self.malformed(&Method::POST, paths::JOBS, &e))?;
        let call = Call {
            method: Method::POST,
            path: paths::JOBS.to_owned(),
            body: Some(("application/json", Bytes::from(body))),
        };
        self.json(call).await
    }

    /// `GET /v1/jobs`: every job (running and expired), by job key.
    pub async fn list_jobs(&self) -> Result<Vec<JobView>, ClientError> {
        self.json(Call::get(paths::JOBS.to_owned())).await
    }

    /// `GET /v1/jobs/{job}`: one job by key or unique name.
    pub async fn job(&self, id: &str) -> Result<JobView, ClientError> {
        self.json(Call::get(paths::job(id))).await
    }

    /// `DELETE /v1/jobs/{job}`. A job the agent does not have is an error
    /// ([`ClientError::is_job_not_found`]).
    pub async fn delete_job(&self, id: &str) -> Result<(), ClientError> {
        let call = Call {
            method: Method::DELETE,
            path: paths::job(id),
            body: None,
        };
        self.send(call).await.map(|_| ())
    }

    /// `GET /v1/jobs/{job}/counters`: the job's tier-1 drops by reason.
    pub async fn counters(&self, id: &str) -> Result<JobDrops, ClientError> {
        self.json(Call::get(paths::job_counters(id))).await
    }

    /// `PUT /v1/jobs/{job}/policy`: replaces the running job's policy with the next one of the
    /// same job (refusals: 409 `serial_not_newer`, 422 `lineage_mismatch`, and those of
    /// [`AgentClient::create_job`]).
    pub async fn update_policy(&self, id: &str, token: &str) -> Result<JobView, ClientError> {
        let path = paths::job_policy(id);
        let body = serde_json::to_vec(&CreateJob {
            policy: token.trim().to_owned(),
        })
        .map_err(|e| self.malformed(&Method::PUT, &path, &e))?;
        let call = Call {
            method: Method::PUT,
            path,
            body: Some(("application/json", Bytes::from(body))),
        };
        self.json(call).await
    }

    /// `POST /v1/revocations`: a signed revocation (the jobs it covers are torn down).
    pub async fn revoke(&self, token: &str) -> Result<RevocationOutcome, ClientError> {
        let call = Call {
            method: Method::POST,
            path: paths::REVOCATIONS.to_owned(),
            body: Some(("text/plain", Bytes::from(token.trim().as_bytes().to_vec()))),
        };
        self.json(call).await
    }

    /// `GET /v1/proxies`: the proxy table in position order.
    pub async fn proxies(&self) -> Result<Vec<ProxyStatus>, ClientError> {
        self.json(Call::get(paths::PROXIES.to_owned())).await
    }

    /// `GET /v1/dns`: the DNS stub's figures.
    pub async fn dns(&self) -> Result<DnsView, ClientError> {
        self.json(Call::get(paths::DNS.to_owned())).await
    }

    /// `GET /metrics`: the Prometheus exposition text.
    pub async fn metrics(&self) -> Result<String, ClientError> {
        let method = Method::GET;
        let body = self.send(Call::get(paths::METRICS.to_owned())).await?;
        String::from_utf8(body.to_vec()).map_err(|e| self.malformed(&method, paths::METRICS, &e))
    }

    fn malformed(&self, method: &Method, path: &str, e: &dyn std::fmt::Display) -> ClientError {
        ClientError::Malformed {
            method: method.clone(),
            path: path.to_owned(),
            detail: e.to_string(),
        }
    }

    async fn json<T: DeserializeOwned>(&self, call: Call<'_>) -> Result<T, ClientError> {
        let (method, path) = (call.method.clone(), call.path.clone());
        let body = self.send(call).await?;
        serde_json::from_slice(&body).map_err(|e| self.malformed(&method, &path, &e))
    }

    /// One exchange on a fresh connection; the body of a 2xx answer.
    async fn send(&self, call: Call<'_>) -> Result<Bytes, ClientError> {
        let (method, path) = (call.method.clone(), call.path.clone());
        match tokio::time::timeout(self.timeout, self.exchange(call)).await {
            Ok(r) => r,
            Err(_) => Err(ClientError::Timeout {
                socket: self.socket.clone(),
                method,
                path,
                after: self.timeout,
            }),
        }
    }

    async fn exchange(&self, call: Call<'_>) -> Result<Bytes, ClientError> {
        let broke = |detail: String| ClientError::Exchange {
            socket: self.socket.clone(),
            method: call.method.clone(),
            path: call.path.clone(),
            detail,
        };
        let stream = tokio::net::UnixStream::connect(&self.socket)
            .await
            .map_err(|source| ClientError::Connect {
                socket: self.socket.clone(),
                source,
            })?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| broke(e.to_string()))?;
        let mut req = Request::builder()
            .method(call.method.clone())
            .uri(call.path.as_str())
            .header(HOST, "agent");
        let body = match call.body {
            Some((content_type, bytes)) => {
                req = req.header(CONTENT_TYPE, content_type);
                bytes
            }
            None => Bytes::new(),
        };
        let req = req
            .body(Full::new(body))
            .map_err(|e| broke(e.to_string()))?;
        let exchange = async move {
            let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
            let status = resp.status();
            let body = Limited::new(resp.into_body(), MAX_ANSWER)
                .collect()
                .await
                .map_err(|e| e.to_string())?
                .to_bytes();
            // Dropping the sender lets the connection task finish.
            drop(sender);
            Ok::<_, String>((status, body))
        };
        // The connection is driven here, not spawned: it ends with the exchange.
        let (answer, _closed) = tokio::join!(exchange, conn);
        let (status, body) = answer.map_err(broke)?;
        if status.is_success() {
            return Ok(body);
        }
        Err(refusal(call.method, call.path, status, &body))
    }
}

impl Call<'_> {
    fn get(path: String) -> Call<'static> {
        Call {
            method: Method::GET,
            path,
            body: None,
        }
    }
}

/// The error of a non-2xx answer: the agent's `ErrorBody`, or the raw text as its detail.
fn refusal(method: Method, path: String, status: StatusCode, body: &[u8]) -> ClientError {
    let body = serde_json::from_slice::<ErrorBody>(body).unwrap_or_else(|_| ErrorBody {
        error: format!("http_{}", status.as_u16()),
        detail: String::from_utf8_lossy(body).trim().to_owned(),
    });
    ClientError::Refused {
        method,
        path,
        status: status.as_u16(),
        body,
    }
}

/// The client for synchronous callers (the CLI, the testbed, tests).
pub mod blocking {
    use super::*;

    /// A job this process created, deleted when dropped (unless [`OwnedJob::delete`]d first):
    /// an error or a panic between creating a job and ending it does not leave it behind.
    #[derive(Debug)]
    pub struct OwnedJob {
        client: AgentClient,
        view: JobView,
        live: bool,
    }

    impl OwnedJob {
        /// Creates the job (`POST /v1/jobs`).
        pub fn create(client: AgentClient, token: &str) -> Result<OwnedJob, ClientError> {
            let view = client.create_job(token)?;
            Ok(OwnedJob {
                client,
                view,
                live: true,
            })
        }

        /// The agent's answer to the create.
        pub fn view(&self) -> &JobView {
            &self.view
        }

        /// The client the job was created with.
        pub fn client(&self) -> &AgentClient {
            &self.client
        }

        /// Deletes the job now, reporting failure; a job the agent no longer has counts as
        /// deleted.
        pub fn delete(mut self) -> Result<(), ClientError> {
            self.live = false;
            delete_if_there(&self.client, &self.view.job_key.to_string())
        }
    }

    impl Drop for OwnedJob {
        fn drop(&mut self) {
            if self.live {
                let _ = delete_if_there(&self.client, &self.view.job_key.to_string());
            }
        }
    }

    fn delete_if_there(client: &AgentClient, job_key: &str) -> Result<(), ClientError> {
        match client.delete_job(job_key) {
            Err(e) if !e.is_job_not_found() => Err(e),
            _ => Ok(()),
        }
    }

    /// A client of one agent's API socket; each call blocks until answered (or the deadline).
    ///
    /// Each call runs on a small runtime of its own (a current-thread tokio runtime: an epoll
    /// instance, built in microseconds), so the client is plain data, `Clone`, and usable from
    /// any thread; called from inside a tokio runtime it runs the call on a helper thread
    /// instead of blocking that runtime's worker.
    #[derive(Debug, Clone)]
    pub struct AgentClient {
        inner: super::AgentClient,
    }

    impl AgentClient {
        /// A client for the agent listening on `socket`, with [`DEFAULT_TIMEOUT`] per call.
        pub fn new(socket: impl Into<PathBuf>) -> AgentClient {
            AgentClient {
                inner: super::AgentClient::new(socket),
            }
        }

        /// The same client with another deadline per call.
        pub fn with_timeout(self, timeout: Duration) -> AgentClient {
            AgentClient {
                inner: self.inner.with_timeout(timeout),
            }
        }

        /// The API socket.
        pub fn socket(&self) -> &Path {
            self.inner.socket()
        }

        /// The async client underneath.
        pub fn as_async(&self) -> &super::AgentClient {
            &self.inner
        }

        /// See [`super::AgentClient::create_job`].
        pub fn create_job(&self, token: &str) -> Result<JobView, ClientError> {
            run(self.inner.create_job(token))
        }

        /// See [`super::AgentClient::update_policy`].
        pub fn update_policy(&self, id: &str, token: &str) -> Result<JobView, ClientError> {
            run(self.inner.update_policy(id, token))
        }

        /// See [`super::AgentClient::revoke`].
        pub fn revoke(&self, token: &str) -> Result<RevocationOutcome, ClientError> {
            run(self.inner.revoke(token))
        }

        /// See [`super::AgentClient::list_jobs`].
        pub fn list_jobs(&self) -> Result<Vec<JobView>, ClientError> {
            run(self.inner.list_jobs())
        }

        /// See [`super::AgentClient::job`].
        pub fn job(&self, id: &str) -> Result<JobView, ClientError> {
            run(self.inner.job(id))
        }

        /// See [`super::AgentClient::delete_job`].
        pub fn delete_job(&self, id: &str) -> Result<(), ClientError> {
            run(self.inner.delete_job(id))
        }

        /// See [`super::AgentClient::counters`].
        pub fn counters(&self, id: &str) -> Result<JobDrops, ClientError> {
            run(self.inner.counters(id))
        }

        /// See [`super::AgentClient::proxies`].
        pub fn proxies(&self) -> Result<Vec<ProxyStatus>, ClientError> {
            run(self.inner.proxies())
        }

        /// See [`super::AgentClient::dns`].
        pub fn dns(&self) -> Result<DnsView, ClientError> {
            run(self.inner.dns())
        }

        /// See [`super::AgentClient::metrics`].
        pub fn metrics(&self) -> Result<String, ClientError> {
            run(self.inner.metrics())
        }
    }

    fn run<T: Send>(
        call: impl Future<Output = Result<T, ClientError>> + Send,
    ) -> Result<T, ClientError> {
        snas_proxy::api::blocking::block_on(call, ClientError::Runtime)
    }
}
