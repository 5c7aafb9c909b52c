//! The agent's HTTP/JSON APIs: the contract, its server and its client.
//!
//! Two APIs, one vocabulary ([`types`]):
//! - the **local API** on a Unix socket (mode from config), JSON over HTTP/1.1:
//!
//!   | request | answer |
//!   |---|---|
//!   | `POST /v1/jobs`, body [`CreateJob`] (or the raw token as text) | 201 [`JobView`] |
//!   | `GET /v1/jobs` | `[`[`JobView`]`]` |
//!   | `GET /v1/jobs/{job}` | [`JobView`] |
//!   | `DELETE /v1/jobs/{job}` | 204 |
//!   | `GET /v1/jobs/{job}/counters` | [`JobDrops`] |
//!   | `PUT /v1/jobs/{job}/policy`, body the next signed policy of the job | [`JobView`] |
//!   | `POST /v1/revocations`, body a signed revocation | [`RevocationOutcome`] |
//!   | `GET /v1/proxies` | `[`[`ProxyStatus`]`]` |
//!   | `GET /v1/dns` | [`DnsView`] |
//!   | `GET /metrics` | Prometheus text (also on `metrics_listen` if configured) |
//!
//!   `{job}` is the 16-hex-digit job key or a unique job name;
//! - the **policy endpoint** on the underlay address: `GET /v1/jobs/{job_key}/policy` returns
//!   the raw signed token as [`POLICY_CONTENT_TYPE`] (proxies verify it themselves), 404 if
//!   unknown. It answers only the proxies of the current proxy set (configured, and discovered
//!   while listed): any other caller gets 403 `forbidden` for every request, counted and logged
//!   (at most one line per [`FORBIDDEN_LOG_EVERY`]).
//!
//! Errors are [`ErrorBody`] (`{"error": code, "detail": message}`) with a matching status.
//!
//! # Layout
//! - [`types`]: the request/response bodies and paths, with serde.
//! - [`server`]: the axum routers over the node's services ([`Ops`]) and their listeners.
//! - [`client`]: [`AgentClient`] (async) and [`blocking::AgentClient`] over the Unix socket.
//!
//! The operator's description of every endpoint is `docs/agent.md`.

pub mod client;
pub mod server;
pub mod types;

pub use client::{blocking, AgentClient, ClientError};
pub use server::{
    api_router, bind_unix, metrics_router, policy_router, serve_listeners, token_from_body,
    ApiError, Ops, PolicyStats, END_NOTICE_TIMEOUT, FORBIDDEN_LOG_EVERY,
};
pub use types::{
    paths, CreateJob, DnsView, ErrorBody, Health, JobDrops, JobState, JobView, ProxyStatus,
    RevocationOutcome, POLICY_CONTENT_TYPE,
};
