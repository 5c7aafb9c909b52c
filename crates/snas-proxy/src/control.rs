//! The control endpoint (HTTP on `control_listen`).
//!
//! # Routes
//! - `GET /healthz`: 200 `ok`, or 503 `draining` while draining (agents use it to stop choosing
//!   this proxy).
//! - `POST /v1/drain`, `POST /v1/undrain`: set or clear draining (new flows are refused with
//!   `draining`; established flows continue). Answer the new health text.
//! - `GET /metrics`: Prometheus text ([`crate::metrics`]).
//! - `GET /v1/flows`: live flows as JSON (at most [`MAX_FLOWS_LISTED`]).
//! - `POST /v1/bindings`: a DNS binding pushed by a peer proxy (`Authorization: Bearer
//!   <peer secret>`, compared in constant time); see [`crate::resolver::apply_peer_binding`].
//!
//! # Limits
//! No authentication on drain/undrain: the endpoint must listen on the management (underlay)
//! address only, which nodes and operators reach and sandboxes do not.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Serialize;

use crate::daemon::Shared;
use crate::metrics::{self, Extra};
use crate::resolver::PeerBinding;

/// Most flows `GET /v1/flows` lists.
pub const MAX_FLOWS_LISTED: usize = 10_000;

#[derive(Clone, Debug)]
struct Ctl {
    shared: Arc<Shared>,
    peer_secret: Option<Arc<str>>,
}

/// The router.
pub fn router(shared: Arc<Shared>, peer_secret: Option<Arc<str>>) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics_text))
        .route("/v1/drain", post(drain))
        .route("/v1/undrain", post(undrain))
        .route("/v1/flows", get(flows))
        .route("/v1/bindings", post(bindings))
        .with_state(Ctl {
            shared,
            peer_secret,
        })
}

/// Serves the router on `listener` until the runtime stops.
pub async fn serve(
    listener: tokio::net::TcpListener,
    shared: Arc<Shared>,
    peer_secret: Option<Arc<str>>,
) {
    if let Err(e) = axum::serve(listener, router(shared, peer_secret)).await {
        tracing::error!(error = %e, "control endpoint stopped");
    }
}

fn health(shared: &Shared) -> Response {
    if shared.draining.load(Ordering::Relaxed) {
        (StatusCode::SERVICE_UNAVAILABLE, "draining\n").into_response()
    } else {
        (StatusCode::OK, "ok\n").into_response()
    }
}

async fn healthz(State(c): State<Ctl>) -> Response {
    health(&c.shared)
}

async fn drain(State(c): State<Ctl>) -> Response {
    c.shared.draining.store(true, Ordering::SeqCst);
    c.shared.engine().set_draining(true);
    tracing::info!("draining: new flows refused");
    health(&c.shared)
}

async fn undrain(State(c): State<Ctl>) -> Response {
    c.shared.draining.store(false, Ordering::SeqCst);
    c.shared.engine().set_draining(false);
    tracing::info!("undrained");
    health(&c.shared)
}

async fn metrics_text(State(c): State<Ctl>) -> Response {
    let s = &c.shared;
    let snap = s.store.snapshot();
    let extra = Extra {
        policies: snap.len(),
        fetch_ok: s.fetcher.stats.ok.load(Ordering::Relaxed),
        fetch_failed: s.fetcher.stats.failed.load(Ordering::Relaxed),
        audit_dropped: s.audit.dropped(),
        audit_written: s.audit.written(),
        draining: s.draining.load(Ordering::Relaxed),
    };
    let text = {
        let eng = s.engine();
        metrics::render(&s.metrics, &eng, extra)
    };
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}

#[derive(Debug, Serialize)]
struct FlowJson {
    job_key: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    tenant: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    job: Option<String>,
    tenant_id: u32,
    proto: &'static str,
    src: String,
    dst: String,
    hostnames: Vec<String>,
    egress: String,
    state: String,
    idle_ms: u64,
}

fn proto_name(p: crate::nat::IpProto) -> &'static str {
    match p {
        crate::nat::IpProto::Tcp => "tcp",
        crate::nat::IpProto::Udp => "udp",
        crate::nat::IpProto::Icmp => "icmp",
        crate::nat::IpProto::Icmpv6 => "icmpv6",
    }
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

async fn flows(State(c): State<Ctl>) -> Response {
    let now = c.shared.clock_now();
    let snap = c.shared.store.snapshot();
    let list: Vec<FlowJson> = {
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
                FlowJson {
                    job_key: format!("{:016x}", f.key.job),
                    tenant: policy.map(|p| p.tenant.to_string()),
                    job: policy.map(|p| p.job.to_string()),
                    tenant_id: f.tenant,
                    proto: proto_name(f.key.proto),
                    src: std::net::SocketAddr::from((f.key.src_ip, f.key.src_port)).to_string(),
                    dst: std::net::SocketAddr::from((f.key.dst_ip, f.key.dst_port)).to_string(),
                    hostnames: bindings
                        .names(f.key.job, f.key.dst_ip, now)
                        .map(|n| n.to_string())
                        .collect(),
                    egress: std::net::SocketAddr::from((f.egress_ip, f.egress_port)).to_string(),
                    state: state_name(f.state),
                    idle_ms: u64::try_from(now.saturating_duration_since(f.last_seen).as_millis())
                        .unwrap_or(u64::MAX),
                }
            })
            .collect()
    };
    Json(serde_json::json!({ "flows": list })).into_response()
}

/// Constant-time comparison (the length is not secret).
pub fn secret_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn bindings(State(c): State<Ctl>, headers: HeaderMap, body: axum::body::Bytes) -> Response {
    let Some(secret) = &c.peer_secret else {
        return (StatusCode::FORBIDDEN, "peer bindings not enabled\n").into_response();
    };
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    if !secret_eq(given.as_bytes(), secret.as_bytes()) {
        return (StatusCode::UNAUTHORIZED, "bad peer secret\n").into_response();
    }
    let b: PeerBinding = match serde_json::from_slice(&body) {
        Ok(b) => b,
        Err(e) => return (StatusCode::BAD_REQUEST, format!("bad body: {e}\n")).into_response(),
    };
    match crate::resolver::apply_peer_binding(&c.shared, &b).await {
        Ok(n) => (StatusCode::OK, format!("bound {n}\n")).into_response(),
        Err(e) => (StatusCode::FORBIDDEN, format!("{e}\n")).into_response(),
    }
}
