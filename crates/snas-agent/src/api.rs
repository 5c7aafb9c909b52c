//! The agent's HTTP/JSON APIs.
//!
//! Owns two routers:
//! - the local API on a Unix socket (mode from config): `POST /v1/jobs` (body: the signed policy
//!   token, or JSON `{"policy": token}`), `GET /v1/jobs`, `GET /v1/jobs/{job}`,
//!   `DELETE /v1/jobs/{job}`, `GET /v1/jobs/{job}/counters`, where `{job}` is the 16-hex-digit
//!   job key or a unique job name;
//! - with the node services ([`Ops`], [`serve_node`]): `GET /v1/proxies` (the proxy table),
//!   `GET /v1/dns` (DNS stub figures) and `GET /metrics` (Prometheus text), the latter also on
//!   `metrics_listen` if configured;
//! - the read-only policy endpoint on the underlay address: `GET /v1/jobs/{job_key}/policy`
//!   returns the raw signed token as `text/plain` (proxies verify it themselves), 404 if unknown.
//!
//! Errors are JSON `{"error": code, "detail": message}` with a matching status. Job operations
//! block (netlink, files), so handlers run them on tokio's blocking pool.
//!
//! # Limits
//! The policy endpoint serves only what the agent holds for running jobs; it adds no
//! authentication because the token is signed and proxies check it and its `node` claim.

use std::collections::BTreeMap;
use std::future::Future;
use std::io;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::Path;
use std::sync::Arc;

use axum::extract::{Path as UrlPath, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Serialize;
use tokio::net::{TcpListener, UnixListener};

use crate::agent::{Agent, JobError, JobView};
use crate::naming::{job_key_hex, parse_job_key_hex};

/// A JSON error answer.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    detail: String,
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: &'a str,
    detail: &'a str,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (
            self.status,
            Json(ErrorBody {
                error: self.code,
                detail: &self.detail,
            }),
        )
            .into_response()
    }
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, detail: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            detail: detail.into(),
        }
    }
}

impl From<JobError> for ApiError {
    fn from(e: JobError) -> ApiError {
        let (status, code) = match &e {
            JobError::Policy(v) => (StatusCode::UNPROCESSABLE_ENTITY, v.reason.name()),
            JobError::WrongNode { .. } => (StatusCode::FORBIDDEN, "node_mismatch"),
            JobError::Exists(_) => (StatusCode::CONFLICT, "job_exists"),
            JobError::NotFound(_) => (StatusCode::NOT_FOUND, "job_not_found"),
            JobError::Ambiguous(_) => (StatusCode::CONFLICT, "job_name_ambiguous"),
            JobError::Pool(_) => (StatusCode::SERVICE_UNAVAILABLE, "pool_exhausted"),
            JobError::Network(_) => (StatusCode::INTERNAL_SERVER_ERROR, "network"),
            JobError::Dataplane(_) => (StatusCode::INTERNAL_SERVER_ERROR, "dataplane"),
            JobError::State(_) => (StatusCode::INTERNAL_SERVER_ERROR, "state"),
            JobError::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        };
        ApiError::new(status, code, e.to_string())
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, JobError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::from(JobError::Internal(e.to_string())))?
        .map_err(ApiError::from)
}

/// Extracts the token from a request body: raw token text, or JSON `{"policy": "..."}`.
pub fn token_from_body(body: &str) -> Result<String, String> {
    let trimmed = body.trim();
    if trimmed.starts_with('{') {
        #[derive(serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Create {
            policy: String,
        }
        let c: Create = serde_json::from_str(trimmed).map_err(|e| format!("request body: {e}"))?;
        return Ok(c.policy.trim().to_owned());
    }
    if trimmed.is_empty() {
        return Err("request body: empty; expected the signed policy token".into());
    }
    Ok(trimmed.to_owned())
}

async fn create_job(
    State(agent): State<Arc<Agent>>,
    body: axum::body::Bytes,
) -> Result<(StatusCode, Json<JobView>), ApiError> {
    let body = std::str::from_utf8(&body).map_err(|_| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_request",
            "request body: not UTF-8",
        )
    })?;
    let token = token_from_body(body)
        .map_err(|d| ApiError::new(StatusCode::BAD_REQUEST, "bad_request", d))?;
    let view = blocking(move || agent.create_job(&token)).await?;
    Ok((StatusCode::CREATED, Json(view)))
}

async fn list_jobs(State(agent): State<Arc<Agent>>) -> Json<Vec<JobView>> {
    Json(agent.jobs())
}

async fn get_job(
    State(agent): State<Arc<Agent>>,
    UrlPath(id): UrlPath<String>,
) -> Result<Json<JobView>, ApiError> {
    let key = agent.resolve(&id)?;
    agent
        .job(key)
        .map(Json)
        .ok_or_else(|| JobError::NotFound(id).into())
}

async fn delete_job(
    State(agent): State<Arc<Agent>>,
    UrlPath(id): UrlPath<String>,
) -> Result<StatusCode, ApiError> {
    let key = agent.resolve(&id)?;
    blocking(move || agent.delete_job(key)).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Serialize)]
struct Counters {
    job_key: String,
    total: u64,
    drops: BTreeMap<&'static str, u64>,
}

async fn job_counters(
    State(agent): State<Arc<Agent>>,
    UrlPath(id): UrlPath<String>,
) -> Result<Json<Counters>, ApiError> {
    let key = agent.resolve(&id)?;
    let counters = blocking(move || agent.counters(key)).await?;
    Ok(Json(Counters {
        job_key: job_key_hex(key),
        total: counters.values().sum(),
        drops: counters.into_iter().map(|(r, n)| (r.name(), n)).collect(),
    }))
}

async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such endpoint")
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "method not allowed on this endpoint",
    )
}

/// The local API (Unix socket).
pub fn api_router(agent: Arc<Agent>) -> Router {
    Router::new()
        .route("/v1/jobs", get(list_jobs).post(create_job))
        .route("/v1/jobs/{job}", get(get_job).delete(delete_job))
        .route("/v1/jobs/{job}/counters", get(job_counters))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(agent)
}

async fn get_policy(
    State(agent): State<Arc<Agent>>,
    UrlPath(id): UrlPath<String>,
) -> Result<Response, ApiError> {
    let key = parse_job_key_hex(&id).ok_or_else(|| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_request",
            format!("{id:?} is not a job key (16 hex digits)"),
        )
    })?;
    let token = agent.signed_policy(key).ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "job_not_found",
            format!("no job {id}"),
        )
    })?;
    Ok(([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], token).into_response())
}

/// The read-only policy endpoint (underlay TCP).
pub fn policy_router(agent: Arc<Agent>) -> Router {
    Router::new()
        .route("/v1/jobs/{job_key}/policy", get(get_policy))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(agent)
}

/// Binds the API socket: creates the parent directory, replaces a stale socket file (never any
/// other kind of file) and sets the permission bits.
pub fn bind_unix(path: &Path, mode: u32) -> io::Result<UnixListener> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => std::fs::remove_file(path)?,
        Ok(_) => {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{} exists and is not a socket", path.display()),
            ))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    Ok(listener)
}

/// The node services beside the job table: proxy table, DNS stub, audit sink.
#[derive(Debug, Clone)]
pub struct Ops {
    /// The job table.
    pub agent: Arc<Agent>,
    /// The proxy table (health-checked).
    pub proxies: Arc<crate::proxies::Proxies>,
    /// The DNS stub.
    pub stub: Arc<crate::stub::DnsStub>,
    /// The audit sink.
    pub audit: crate::audit::AuditSink,
}

async fn get_proxies(State(ops): State<Arc<Ops>>) -> Json<Vec<crate::proxies::ProxyStatus>> {
    Json(ops.proxies.snapshot().statuses().to_vec())
}

async fn get_dns(State(ops): State<Arc<Ops>>) -> Json<crate::stub::DnsView> {
    Json(ops.stub.view())
}

/// Gathers a metrics snapshot (reads tier-1 counters: blocking).
fn snapshot(ops: &Ops) -> crate::metrics::Snapshot {
    let jobs = ops.agent.jobs();
    let mut drops = BTreeMap::new();
    for j in &jobs {
        if let Some(key) = parse_job_key_hex(&j.job_key) {
            if let Ok(c) = ops.agent.counters(key) {
                drops.insert(j.job_key.clone(), c);
            }
        }
    }
    let v = ops.stub.view();
    crate::metrics::Snapshot {
        jobs: jobs.len(),
        drops,
        dns_outcomes: v.outcomes,
        dns_forwarded: v.forwarded,
        dns_proxy_failures: v.proxy_failures,
        dns_installed: v.installed_addrs,
        proxies: Some(ops.proxies.snapshot()),
        audit_emitted: ops.audit.emitted(),
        audit_dropped: ops.audit.dropped(),
        audit_suppressed: v.audit_suppressed,
    }
}

async fn get_metrics(State(ops): State<Arc<Ops>>) -> Response {
    let o = ops.clone();
    let text = tokio::task::spawn_blocking(move || {
        crate::metrics::render(&snapshot(&o), o.agent.setup_latency())
    })
    .await
    .unwrap_or_default();
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

/// `GET /v1/proxies`, `GET /v1/dns`, `GET /metrics` (merged into the local API).
pub fn ops_router(ops: Arc<Ops>) -> Router {
    Router::new()
        .route("/v1/proxies", get(get_proxies))
        .route("/v1/dns", get(get_dns))
        .route("/metrics", get(get_metrics))
        .with_state(ops)
}

/// Only `GET /metrics` (the `metrics_listen` TCP address).
pub fn metrics_router(ops: Arc<Ops>) -> Router {
    Router::new()
        .route("/metrics", get(get_metrics))
        .fallback(not_found)
        .with_state(ops)
}

/// Serves the local API (with the node services), the policy endpoint and, if given, the
/// metrics listener until `shutdown` completes.
pub async fn serve_node(
    ops: Arc<Ops>,
    unix: UnixListener,
    tcp: TcpListener,
    metrics: Option<TcpListener>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> io::Result<()> {
    let (tx, rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        shutdown.await;
        let _ = tx.send(true);
    });
    let wait = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|v| *v).await;
    };
    let agent = ops.agent.clone();
    let local = api_router(agent.clone()).merge(ops_router(ops.clone()));
    let api = axum::serve(unix, local).with_graceful_shutdown(wait(rx.clone()));
    let pol = axum::serve(tcp, policy_router(agent)).with_graceful_shutdown(wait(rx.clone()));
    let met = async move {
        match metrics {
            Some(l) => {
                axum::serve(l, metrics_router(ops))
                    .with_graceful_shutdown(wait(rx))
                    .await
            }
            None => Ok(()),
        }
    };
    let (a, b, c) = tokio::join!(api, pol, met);
    a.and(b).and(c)
}

/// Serves both routers until `shutdown` completes.
pub async fn serve_listeners(
    agent: Arc<Agent>,
    unix: UnixListener,
    tcp: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> io::Result<()> {
    let (tx, rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        shutdown.await;
        let _ = tx.send(true);
    });
    let wait = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|v| *v).await;
    };
    let api = axum::serve(unix, api_router(agent.clone())).with_graceful_shutdown(wait(rx.clone()));
    let pol = axum::serve(tcp, policy_router(agent)).with_graceful_shutdown(wait(rx));
    let (a, b) = tokio::join!(api, pol);
    a.and(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_is_taken_raw_or_from_json() {
        assert_eq!(token_from_body(" a.b.c\n").unwrap(), "a.b.c");
        assert_eq!(token_from_body(r#"{"policy":"a.b.c"}"#).unwrap(), "a.b.c");
        assert!(token_from_body("").is_err());
        assert!(token_from_body(r#"{"policy":"a","x":1}"#)
            .unwrap_err()
            .contains("x"));
        assert!(token_from_body(r#"{"token":"a"}"#).is_err());
    }
}
