//! The agent's HTTP servers: the routers over the node's services ([`Ops`]) and the
//! listeners they are served on. The contract they serve (paths, bodies, error codes) is
//! [`super`]'s; this module only maps it onto the job table, the proxy table, the DNS stub and
//! the metrics.
//!
//! A job's DELETE tells every listed proxy that the job has ended
//! ([`crate::proxies::announce_job_ended`], fire-and-forget: the answer does not wait for it);
//! a policy update (`PUT /v1/jobs/{job}/policy`) tells them the new serial
//! ([`crate::proxies::announce_job_updated`], the same way).
//! Job operations block (netlink, files), so handlers run them on tokio's blocking pool.
//!
//! # Limits
//! The policy endpoint authenticates callers by their source address (the underlay is the
//! proxies' own network; a sandbox cannot reach it: tier 1 refuses the underlay and the node as
//! infrastructure). The token it serves is signed, and proxies verify it and its `node` claim.

use std::collections::BTreeMap;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{ConnectInfo, Path as UrlPath, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use tokio::net::{TcpListener, UnixListener};

use super::types::{
    paths, CreateJob, DnsView, ErrorBody, JobDrops, JobState, JobView, ProxyStatus,
    RevocationOutcome, POLICY_CONTENT_TYPE,
};
use crate::agent::{Agent, JobError};
use crate::naming::parse_job_key_hex;
use crate::upkeep::LogLimiter;

/// A JSON error answer.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    detail: String,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (
            self.status,
            Json(ErrorBody {
                error: self.code.to_owned(),
                detail: self.detail,
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
            JobError::Lineage(snas_policy::LineageError::Serial { .. }) => {
                (StatusCode::CONFLICT, "serial_not_newer")
            }
            JobError::Lineage(_) => (StatusCode::UNPROCESSABLE_ENTITY, "lineage_mismatch"),
            JobError::Revoked { .. } => (StatusCode::FORBIDDEN, "policy_revoked"),
            JobError::RevocationStore(_) => (StatusCode::SERVICE_UNAVAILABLE, "revocations_full"),
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
        let c: CreateJob =
            serde_json::from_str(trimmed).map_err(|e| format!("request body: {e}"))?;
        return Ok(c.policy.trim().to_owned());
    }
    if trimmed.is_empty() {
        return Err("request body: empty; expected the signed policy token".into());
    }
    Ok(trimmed.to_owned())
}

async fn create_job(
    State(ops): State<Arc<Ops>>,
    body: axum::body::Bytes,
) -> Result<(StatusCode, Json<JobView>), ApiError> {
    let agent = ops.agent.clone();
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

fn body_text(body: &axum::body::Bytes) -> Result<&str, ApiError> {
    std::str::from_utf8(body).map_err(|_| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_request",
            "request body: not UTF-8",
        )
    })
}

/// `PUT /v1/jobs/{job}/policy`: the next policy of a running job.
async fn update_policy(
    State(ops): State<Arc<Ops>>,
    UrlPath(id): UrlPath<String>,
    body: axum::body::Bytes,
) -> Result<Json<JobView>, ApiError> {
    let key = ops.agent.resolve(&id)?;
    let token = token_from_body(body_text(&body)?)
        .map_err(|d| ApiError::new(StatusCode::BAD_REQUEST, "bad_request", d))?;
    let agent = ops.agent.clone();
    let view = blocking(move || agent.update_job(key, &token)).await?;
    // Proxies learn the serial from the job's next packet too; the notice makes an idle job's
    // removed flows end within a second.
    tokio::spawn(crate::proxies::announce_job_updated(
        ops.proxies.clone(),
        key,
        view.serial,
        ops.updated.clone(),
        END_NOTICE_TIMEOUT,
    ));
    Ok(Json(view))
}

/// `POST /v1/revocations`: a signed revocation; covered jobs are torn down.
async fn post_revocation(
    State(ops): State<Arc<Ops>>,
    body: axum::body::Bytes,
) -> Result<Json<RevocationOutcome>, ApiError> {
    let token = body_text(&body)?.trim().to_owned();
    if token.is_empty() {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_request",
            "request body: empty; expected the signed revocation",
        ));
    }
    let (job_key, jobs_torn_down) = crate::lifecycle::apply_revocation(&ops, &token).await?;
    Ok(Json(RevocationOutcome {
        job_key,
        jobs_torn_down,
    }))
}

async fn list_jobs(State(ops): State<Arc<Ops>>) -> Json<Vec<JobView>> {
    Json(ops.agent.jobs())
}

async fn get_job(
    State(ops): State<Arc<Ops>>,
    UrlPath(id): UrlPath<String>,
) -> Result<Json<JobView>, ApiError> {
    let key = ops.agent.resolve(&id)?;
    ops.agent
        .job(key)
        .map(Json)
        .ok_or_else(|| JobError::NotFound(id).into())
}

/// Time a proxy has to answer the job-ended notice.
pub const END_NOTICE_TIMEOUT: Duration = Duration::from_secs(2);

async fn delete_job(
    State(ops): State<Arc<Ops>>,
    UrlPath(id): UrlPath<String>,
) -> Result<StatusCode, ApiError> {
    let key = ops.agent.resolve(&id)?;
    let agent = ops.agent.clone();
    blocking(move || agent.delete_job(key)).await?;
    ops.stub.forget(key);
    tokio::spawn(crate::proxies::announce_job_ended(
        ops.proxies.clone(),
        key,
        ops.ended.clone(),
        END_NOTICE_TIMEOUT,
    ));
    Ok(StatusCode::NO_CONTENT)
}

async fn job_counters(
    State(ops): State<Arc<Ops>>,
    UrlPath(id): UrlPath<String>,
) -> Result<Json<JobDrops>, ApiError> {
    let agent = ops.agent.clone();
    let key = agent.resolve(&id)?;
    let counters = blocking(move || agent.counters(key)).await?;
    Ok(Json(JobDrops {
        job_key: key,
        total: counters.values().sum(),
        drops: counters
            .into_iter()
            .map(|(r, n)| (r.name().to_owned(), n))
            .collect(),
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

/// The local API (Unix socket) with the node endpoints.
pub fn api_router(ops: Arc<Ops>) -> Router {
    Router::new()
        .route(paths::JOBS, get(list_jobs).post(create_job))
        .route(paths::JOB_ROUTE, get(get_job).delete(delete_job))
        .route(paths::JOB_COUNTERS_ROUTE, get(job_counters))
        .route(paths::JOB_POLICY_ROUTE, axum::routing::put(update_policy))
        .route(paths::REVOCATIONS, axum::routing::post(post_revocation))
        .route(paths::PROXIES, get(get_proxies))
        .route(paths::DNS, get(get_dns))
        .route(paths::METRICS, get(get_metrics))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(ops)
}

/// One refused caller is logged at most this often (the rest are counted).
pub const FORBIDDEN_LOG_EVERY: Duration = Duration::from_secs(10);

/// Outcomes of the policy endpoint.
#[derive(Debug, Default)]
pub struct PolicyStats {
    served: AtomicU64,
    not_found: AtomicU64,
    bad_request: AtomicU64,
    forbidden: AtomicU64,
    log: LogLimiter,
}

impl PolicyStats {
    /// Requests by outcome: `served`, `not_found`, `bad_request`, `forbidden`.
    pub fn outcomes(&self) -> BTreeMap<&'static str, u64> {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        BTreeMap::from([
            ("served", g(&self.served)),
            ("not_found", g(&self.not_found)),
            ("bad_request", g(&self.bad_request)),
            ("forbidden", g(&self.forbidden)),
        ])
    }
}

fn count(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// An IPv4-mapped IPv6 peer as the IPv4 address it is.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// Lets only the proxies of the current proxy set through.
async fn only_proxies(
    State(ops): State<Arc<Ops>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    req: Request,
    next: Next,
) -> Response {
    let ip = canonical(peer.ip());
    if ops.proxies.is_member(ip) {
        return next.run(req).await;
    }
    count(&ops.policy.forbidden);
    if ops.policy.log.allow(FORBIDDEN_LOG_EVERY) {
        tracing::warn!(
            caller = %ip,
            path = %req.uri().path(),
            refused = ops.policy.forbidden.load(Ordering::Relaxed),
            "policy endpoint: caller is not a proxy of this node; refused (403)"
        );
    }
    ApiError::new(
        StatusCode::FORBIDDEN,
        "forbidden",
        format!("{ip} is not a proxy of this node"),
    )
    .into_response()
}

async fn get_policy(
    State(ops): State<Arc<Ops>>,
    UrlPath(id): UrlPath<String>,
) -> Result<Response, ApiError> {
    let Some(key) = parse_job_key_hex(&id) else {
        count(&ops.policy.bad_request);
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_request",
            format!("{id:?} is not a job key (16 hex digits)"),
        ));
    };
    let Some(token) = ops.agent.signed_policy(key) else {
        count(&ops.policy.not_found);
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "job_not_found",
            format!("no job {id}"),
        ));
    };
    count(&ops.policy.served);
    Ok(([(header::CONTENT_TYPE, POLICY_CONTENT_TYPE)], token).into_response())
}

/// The policy endpoint (underlay TCP). Serve it with
/// `into_make_service_with_connect_info::<SocketAddr>()`: callers are checked by address.
pub fn policy_router(ops: Arc<Ops>) -> Router {
    Router::new()
        .route(paths::POLICY_ROUTE, get(get_policy))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::middleware::from_fn_with_state(
            ops.clone(),
            only_proxies,
        ))
        .with_state(ops)
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

/// The node's services: the job table, proxy table, DNS stub, audit sink, and the counters
/// the metrics show.
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
    /// Policy endpoint outcomes.
    pub policy: Arc<PolicyStats>,
    /// Job-ended notices to proxies.
    pub ended: Arc<crate::proxies::EndNotices>,
    /// Policy-update notices to proxies.
    pub updated: Arc<crate::proxies::UpdateNotices>,
    /// Periodic work (flow ageing, infrastructure, expiry).
    pub upkeep: Arc<crate::upkeep::UpkeepStats>,
    /// Where each listening socket came from at start (`handover`, `systemd`, `bound`).
    pub sockets: BTreeMap<&'static str, &'static str>,
}

impl Ops {
    /// The services with fresh counters.
    pub fn new(
        agent: Arc<Agent>,
        proxies: Arc<crate::proxies::Proxies>,
        stub: Arc<crate::stub::DnsStub>,
        audit: crate::audit::AuditSink,
    ) -> Ops {
        Ops {
            agent,
            proxies,
            stub,
            audit,
            policy: Arc::default(),
            ended: Arc::default(),
            updated: Arc::default(),
            upkeep: Arc::default(),
            sockets: BTreeMap::new(),
        }
    }
}

async fn get_proxies(State(ops): State<Arc<Ops>>) -> Json<Vec<ProxyStatus>> {
    Json(ops.proxies.snapshot().statuses().to_vec())
}

async fn get_dns(State(ops): State<Arc<Ops>>) -> Json<DnsView> {
    Json(ops.stub.view())
}

/// Gathers a metrics snapshot (reads tier-1 counters: blocking).
fn snapshot(ops: &Ops) -> crate::metrics::Snapshot {
    let jobs = ops.agent.jobs();
    let mut drops = BTreeMap::new();
    for j in &jobs {
        if let Ok(c) = ops.agent.counters(j.job_key) {
            drops.insert(j.job_key.to_string(), c);
        }
    }
    crate::metrics::Snapshot {
        jobs: jobs.len(),
        jobs_expired: jobs.iter().filter(|j| j.state == JobState::Expired).count(),
        drops,
        dns: Some(ops.stub.view()),
        proxies: Some(ops.proxies.snapshot()),
        audit_emitted: ops.audit.emitted(),
        audit_dropped: ops.audit.dropped(),
        policy_requests: ops.policy.outcomes(),
        end_notices: ops.ended.outcomes(),
        update_notices: ops.updated.outcomes(),
        upkeep: ops.upkeep.counts(),
        sockets: ops.sockets.clone(),
    }
}

async fn get_metrics(State(ops): State<Arc<Ops>>) -> Response {
    let o = ops.clone();
    let text = tokio::task::spawn_blocking(move || {
        crate::metrics::render(snapshot(&o), o.agent.setup_latency())
    })
    .await
    .unwrap_or_default();
    ([(header::CONTENT_TYPE, crate::metrics::CONTENT_TYPE)], text).into_response()
}

/// Only `GET /metrics` (the `metrics_listen` TCP address).
pub fn metrics_router(ops: Arc<Ops>) -> Router {
    Router::new()
        .route(paths::METRICS, get(get_metrics))
        .fallback(not_found)
        .with_state(ops)
}

/// Serves the local API on `unix` and the policy endpoint on `tcp` until `shutdown` completes
/// (both stop accepting, then finish the requests in progress).
pub async fn serve_listeners(
    ops: Arc<Ops>,
    unix: UnixListener,
    tcp: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> io::Result<()> {
    let (tx, rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        shutdown.await;
        let _ = tx.send(true);
    });
    let api = axum::serve(unix, api_router(ops.clone()))
        .with_graceful_shutdown(crate::shutdown::stopped(rx.clone()));
    let pol = axum::serve(
        tcp,
        policy_router(ops).into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(crate::shutdown::stopped(rx));
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
