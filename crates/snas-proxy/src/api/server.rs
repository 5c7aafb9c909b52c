//! The proxy's two HTTP endpoints: axum routers over the daemon's [`Shared`] state, answering
//! with the types of [`super::types`].
//!
//! # Management (`control_listen`, default `127.0.0.1:9090`)
//! For operators and Prometheus; never reachable from a data path (loopback by default, and
//! every address the proxy listens on is infrastructure, see [`crate::infra`]).
//! - `GET /healthz`: 200 `ok`, or 503 `draining` while draining.
//! - `GET /metrics`: Prometheus text ([`crate::metrics`]).
//! - `GET /v1/flows`: live flows as JSON ([`FlowList`], at most [`MAX_FLOWS_LISTED`]).
//! - `GET /v1/drops`: drops and refusals per reason and per tenant as JSON ([`DropCounts`]).
//! - `POST /v1/drain`, `POST /v1/undrain`: set or clear draining (new flows are refused with
//!   `draining`; established flows continue); answer the new health text. They require
//!   `Authorization: Bearer <token>` with the token of `control_token_file` (compared in constant
//!   time): 401 without it or with another token, 403 when no token is configured.
//! - `POST /v1/revocations`: a signed revocation (body: the compact JWS), same bearer token.
//!   Verified against the trust bundle; the job's held policy is dropped if the revocation
//!   covers it and its flows end (audited `revoked`); the job's packets are dropped as
//!   `policy_revoked` and no policy of it the revocation covers is accepted again until the
//!   revocation ends. 200 `{"job_key", "covered"}`; 422 a revocation that does not verify;
//!   503 when the store of revocations is full.
//!
//! # Service (`service_listen`, default `<underlay_addr>:9090`)
//! Only what nodes and peers need:
//! - `GET /healthz`: as above (agents' health checks).
//! - `POST /v1/bindings`: a DNS binding pushed by a peer proxy ([`PeerBinding`],
//!   `Authorization: Bearer <peer secret>`, compared in constant time); see
//!   [`crate::resolver::apply_peer_binding`]. 503 when the policy's key is not trusted yet
//!   (the pusher tries again), 403 for every other refusal.
//! - `POST /v1/jobs/{job_key}/ended`: the job's node says the job ended; the proxy removes its
//!   flows (ports into quarantine, a `flow_end` line each), held packets, pacing and rate state,
//!   bindings and cached policy — at the engine's next housekeeping tick, a few milliseconds
//!   later — and audits `job_ended`. Accepted only from a configured node
//!   that is the job's node (the policy's `node`, else the node its traffic came from, else the
//!   node its policy was fetched from): 204; 404 for a job the proxy holds nothing of; 403 from
//!   any other address; 400 for a key that is not 16 hex digits.
//!
//! - `POST /v1/jobs/{job_key}/updated/{serial}`: the job's node says the job's policy was
//!   updated to `serial` (so that an idle job's flows the update removes end within a second,
//!   without waiting for its next packet). Same acceptance as the ended notice. The proxy only
//!   refetches from the job's node — it verifies what it fetches, only a higher serial replaces
//!   the cached policy, and the refetch rate limit applies — so a forged notice costs at most
//!   one rate-limited fetch. 202 refetch queued or running; 204 the cached policy has that
//!   serial or a higher one; 429 the rate limit declined it; 404, 403, 400 as above.
//!
//! A route asked on the other endpoint answers 404.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::extract::{ConnectInfo, Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use snas_wire::Reason;

use super::types::{paths, DropCounts, FlowList, FlowView, PeerBinding, ProxyHealth, TenantDrops};
use crate::drops::{DropTally, ReasonCounts};
use crate::metrics::{self, Extra};
use crate::shared::Shared;
use crate::tier2::FlowEnd;

/// Most flows `GET /v1/flows` lists.
pub const MAX_FLOWS_LISTED: usize = 10_000;

/// The secrets the endpoints check (read from files at start-up).
#[derive(Clone, Debug, Default)]
pub struct Secrets {
    /// Bearer token of drain/undrain (`control_token_file`).
    pub control_token: Option<Arc<str>>,
    /// Shared peer secret (`peer_secret_file`).
    pub peer_secret: Option<Arc<str>>,
}

#[derive(Clone, Debug)]
struct Ctl {
    shared: Arc<Shared>,
    secrets: Secrets,
}

/// The management router (see the module documentation).
pub fn management_router(shared: Arc<Shared>, secrets: Secrets) -> Router {
    Router::new()
        .route(paths::HEALTHZ, get(healthz))
        .route(paths::METRICS, get(metrics_text))
        .route(paths::DRAIN, post(drain))
        .route(paths::UNDRAIN, post(undrain))
        .route(paths::FLOWS, get(flows))
        .route(paths::DROPS, get(drops))
        .route(paths::REVOCATIONS, post(revocation))
        .with_state(Ctl { shared, secrets })
}

/// The service router (see the module documentation).
pub fn service_router(shared: Arc<Shared>, secrets: Secrets) -> Router {
    Router::new()
        .route(paths::HEALTHZ, get(healthz))
        .route(paths::BINDINGS, post(bindings))
        .route(paths::JOB_ENDED_ROUTE, post(job_ended))
        .route(paths::JOB_UPDATED_ROUTE, post(job_updated))
        .with_state(Ctl { shared, secrets })
}

/// Serves `router` on `listener` until the runtime stops; `what` names it in the log.
pub async fn serve(listener: tokio::net::TcpListener, router: Router, what: &'static str) {
    let app = router.into_make_service_with_connect_info::<std::net::SocketAddr>();
    if let Err(e) = axum::serve(listener, app).await {
        tracing::error!(error = %e, endpoint = what, "HTTP endpoint stopped");
    }
}

/// The bearer token of an `Authorization` header, if any.
fn bearer(headers: &HeaderMap) -> &str {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("")
}

/// `None` when the request carries the control token; otherwise the answer to send.
fn check_control_token(c: &Ctl, headers: &HeaderMap) -> Option<Response> {
    let Some(token) = &c.secrets.control_token else {
        return Some(
            (
                StatusCode::FORBIDDEN,
                "drain, undrain and revocations are disabled: no `control_token_file` in the \
                 proxy configuration\n",
            )
                .into_response(),
        );
    };
    if secret_eq(bearer(headers).as_bytes(), token.as_bytes()) {
        return None;
    }
    Some(
        (
            StatusCode::UNAUTHORIZED,
            [(header::WWW_AUTHENTICATE, "Bearer realm=\"snas-proxy\"")],
            "missing or wrong bearer token\n",
        )
            .into_response(),
    )
}

fn health(shared: &Shared) -> Response {
    let h = if shared.draining.load(Ordering::Relaxed) {
        ProxyHealth::Draining
    } else {
        ProxyHealth::Ok
    };
    let status = StatusCode::from_u16(h.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (status, h.body()).into_response()
}

async fn healthz(State(c): State<Ctl>) -> Response {
    health(&c.shared)
}

async fn drain(State(c): State<Ctl>, headers: HeaderMap) -> Response {
    if let Some(refused) = check_control_token(&c, &headers) {
        return refused;
    }
    c.shared.draining.store(true, Ordering::SeqCst);
    c.shared.engine().set_draining(true);
    tracing::info!("draining: new flows refused");
    health(&c.shared)
}

async fn undrain(State(c): State<Ctl>, headers: HeaderMap) -> Response {
    if let Some(refused) = check_control_token(&c, &headers) {
        return refused;
    }
    c.shared.draining.store(false, Ordering::SeqCst);
    c.shared.engine().set_draining(false);
    tracing::info!("undrained");
    health(&c.shared)
}

async fn metrics_text(State(c): State<Ctl>) -> Response {
    let s = &c.shared;
    let guard = match s.guard.clone() {
        Some(g) => tokio::task::spawn_blocking(move || g.counters())
            .await
            .ok()
            .and_then(|r| {
                r.map_err(|e| tracing::warn!(error = %e, "guard counters unreadable"))
                    .ok()
            }),
        None => None,
    };
    let snap = s.store.snapshot();
    let extra = Extra {
        guard,
        policies: snap.len(),
        fetch_ok: s.fetcher.stats.ok.load(Ordering::Relaxed),
        fetch_failed: s.fetcher.stats.failed.load(Ordering::Relaxed),
        audit_dropped: s.audit.dropped(),
        audit_written: s.audit.written(),
        draining: s.draining.load(Ordering::Relaxed),
        queues: metrics::QueueGauges::sum(&s.worker_gauges),
    };
    let scrape = metrics::Scrape::take(&s.metrics, &s.engine(), extra);
    (
        [(header::CONTENT_TYPE, metrics::CONTENT_TYPE)],
        scrape.render(),
    )
        .into_response()
}

fn state_name(s: crate::conntrack::FlowState) -> String {
    // FlowState's Debug names are CamelCase (TcpEstablished): print them snake_case.
    let mut out = String::new();
    for (i, c) in format!("{s:?}").chars().enumerate() {
        if c.is_ascii_uppercase() && i > 0 {
            out.push('_');
        }
        out.push(c.to_ascii_lowercase());
    }
    out
}

fn millis(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

async fn flows(State(c): State<Ctl>) -> Response {
    let now = c.shared.clock_now();
    let snap = c.shared.store.snapshot();
    let list: Vec<FlowView> = {
        let mut eng = c.shared.engine();
        let infos: Vec<_> = eng
            .conntrack()
            .iter()
            .take(MAX_FLOWS_LISTED)
            .map(|(_, f)| f)
            .collect();
        let bindings = eng.bindings_mut();
        infos
            .into_iter()
            .map(|f| {
                let policy = snap.get(f.key.job);
                FlowView {
                    job_key: f.key.job,
                    tenant: policy.map(|p| p.tenant.to_string()),
                    job: policy.map(|p| p.job.to_string()),
                    tenant_id: f.tenant,
                    proto: f.key.proto.name().to_owned(),
                    src: std::net::SocketAddr::from((f.key.src_ip, f.key.src_port)),
                    dst: std::net::SocketAddr::from((f.key.dst_ip, f.key.dst_port)),
                    hostnames: bindings
                        .names(f.key.job, f.key.dst_ip, now)
                        .map(|n| n.to_string())
                        .collect(),
                    egress: std::net::SocketAddr::from((f.egress_ip, f.egress_port)),
                    state: state_name(f.state),
                    idle_ms: millis(now.saturating_duration_since(f.last_seen)),
                    age_ms: millis(now.saturating_duration_since(f.created)),
                    bytes_out: f.counters.bytes_out,
                    bytes_in: f.counters.bytes_in,
                    packets_out: f.counters.packets_out,
                    packets_in: f.counters.packets_in,
                }
            })
            .collect()
    };
    Json(FlowList { flows: list }).into_response()
}

async fn drops(State(c): State<Ctl>) -> Response {
    let tally = c.shared.engine().drop_tally().clone();
    Json(drop_counts(&tally)).into_response()
}

/// Reasons with drops, by name.
fn by_name(counts: &ReasonCounts) -> std::collections::BTreeMap<String, u64> {
    Reason::ALL
        .iter()
        .filter_map(|r| {
            let n = counts.get(usize::from(r.code())).copied().unwrap_or(0);
            (n > 0).then(|| (r.name().to_owned(), n))
        })
        .collect()
}

/// The JSON drop counters of the engine's tally (reasons and tenants with none left out).
pub fn drop_counts(tally: &DropTally) -> DropCounts {
    let drops = by_name(&tally.by_reason());
    let tenants = tally
        .series()
        .filter_map(|(who, counts)| {
            let drops = by_name(counts);
            let total = drops.values().sum();
            (total > 0).then_some((who, TenantDrops { total, drops }))
        })
        .collect();
    DropCounts {
        total: drops.values().sum(),
        drops,
        tenants,
    }
}

/// Constant-time comparison: the time depends on the lengths only (the length of a secret is
/// not secret), never on where the first difference is.
pub fn secret_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = u8::from(a.len() != b.len());
    for (i, x) in a.iter().enumerate() {
        diff |= x ^ b.get(i).copied().unwrap_or(!x);
    }
    std::hint::black_box(diff) == 0
}

async fn bindings(State(c): State<Ctl>, headers: HeaderMap, body: axum::body::Bytes) -> Response {
    let Some(secret) = &c.secrets.peer_secret else {
        return (StatusCode::FORBIDDEN, "peer bindings not enabled\n").into_response();
    };
    if !secret_eq(bearer(&headers).as_bytes(), secret.as_bytes()) {
        return (StatusCode::UNAUTHORIZED, "bad peer secret\n").into_response();
    }
    let b: PeerBinding = match serde_json::from_slice(&body) {
        Ok(b) => b,
        Err(e) => return (StatusCode::BAD_REQUEST, format!("bad body: {e}\n")).into_response(),
    };
    match crate::resolver::apply_peer_binding(&c.shared, &b).await {
        Ok(n) => (StatusCode::OK, format!("bound {n}\n")).into_response(),
        // Not yet: the pushing peer tries again (resolver::PEER_RETRY_AFTER).
        Err(e) if e.retry_later() => {
            (StatusCode::SERVICE_UNAVAILABLE, format!("{e}\n")).into_response()
        }
        Err(e) => (StatusCode::FORBIDDEN, format!("{e}\n")).into_response(),
    }
}

async fn revocation(State(c): State<Ctl>, headers: HeaderMap, body: axum::body::Bytes) -> Response {
    if let Some(refused) = check_control_token(&c, &headers) {
        return refused;
    }
    let Ok(token) = std::str::from_utf8(&body) else {
        return (StatusCode::BAD_REQUEST, "body: not UTF-8\n").into_response();
    };
    match crate::lifecycle::apply_revocation(&c.shared, token) {
        Ok((job_key, covered)) => (
            StatusCode::OK,
            Json(serde_json::json!({"job_key": job_key.to_string(), "covered": covered})),
        )
            .into_response(),
        Err(crate::lifecycle::RevocationError::Verify(e)) => {
            (StatusCode::UNPROCESSABLE_ENTITY, format!("{e}\n")).into_response()
        }
        Err(crate::lifecycle::RevocationError::Store(e)) => {
            (StatusCode::SERVICE_UNAVAILABLE, format!("{e}\n")).into_response()
        }
    }
}

/// The node a notice about `job` must come from, or the refusal. See the module documentation.
fn notice_owner(
    s: &Shared,
    peer: std::net::SocketAddr,
    job_key: &str,
) -> Result<(std::net::Ipv4Addr, snas_wire::JobKey), (StatusCode, &'static str)> {
    let from = match peer.ip() {
        std::net::IpAddr::V4(a) => Some(a),
        std::net::IpAddr::V6(a) => a.to_ipv4_mapped(),
    };
    let Some(from) = from.filter(|a| s.cfg.nodes.contains(a)) else {
        return Err((StatusCode::FORBIDDEN, "not a configured node\n"));
    };
    let Ok(job) = job_key.parse::<snas_wire::JobKey>() else {
        return Err((
            StatusCode::BAD_REQUEST,
            "job_key must be 16 lower-case hex digits\n",
        ));
    };
    let snap = s.store.snapshot();
    let policy = snap.get(job);
    let (known, traffic_node) = {
        let eng = s.engine();
        (eng.knows_job(job), eng.job_node(job))
    };
    if policy.is_none() && !known {
        return Err((StatusCode::NOT_FOUND, "unknown job\n"));
    }
    let pinned = policy.and_then(|p| match p.node {
        Some(std::net::IpAddr::V4(n)) => Some(n),
        _ => None,
    });
    let owner = pinned
        .or(traffic_node)
        .or_else(|| policy.and_then(|p| p.fetched_from));
    if owner != Some(from) {
        return Err((StatusCode::FORBIDDEN, "not the job's node\n"));
    }
    Ok((from, job))
}

async fn job_updated(
    State(c): State<Ctl>,
    ConnectInfo(peer): ConnectInfo<std::net::SocketAddr>,
    Path((job_key, serial)): Path<(String, String)>,
) -> Response {
    let s = &c.shared;
    let (from, job) = match notice_owner(s, peer, &job_key) {
        Ok(o) => o,
        Err(r) => return r.into_response(),
    };
    let Ok(serial) = serial.parse::<u32>().map(snas_wire::PolicySerial) else {
        return (StatusCode::BAD_REQUEST, "serial must be a decimal u32\n").into_response();
    };
    let held = s.store.snapshot().get(job).map(|p| p.serial);
    if held.is_some_and(|h| h >= serial) {
        return StatusCode::NO_CONTENT.into_response();
    }
    if !s.fetcher.request_refetch(job, from) {
        return (StatusCode::TOO_MANY_REQUESTS, "refetch rate limited\n").into_response();
    }
    crate::metrics::add(&s.metrics.update_notices, 1);
    tracing::info!(job_key = %job_key, node = %from, serial = serial.0, "job policy update announced");
    StatusCode::ACCEPTED.into_response()
}

async fn job_ended(
    State(c): State<Ctl>,
    ConnectInfo(peer): ConnectInfo<std::net::SocketAddr>,
    Path(job_key): Path<String>,
) -> Response {
    let s = &c.shared;
    let (from, job) = match notice_owner(s, peer, &job_key) {
        Ok(o) => o,
        Err(r) => return r.into_response(),
    };
    let snap = s.store.snapshot();
    let policy = snap.get(job);
    // Carried out by the next housekeeping tick (within a few milliseconds), with the ends of
    // every other job due then in one pass over the flow table.
    let names = policy.map(|p| (Arc::clone(&p.tenant), Arc::clone(&p.job)));
    s.engine().end_job(job, FlowEnd::JobEnded, names);
    s.store.remove(job);
    crate::metrics::add(&s.metrics.jobs_ended, 1);
    tracing::info!(job_key = %job_key, node = %from, "job ended");
    StatusCode::NO_CONTENT.into_response()
}
