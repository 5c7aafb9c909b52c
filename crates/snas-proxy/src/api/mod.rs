//! The proxy's HTTP/JSON endpoints: the contract, its server and its client.
//!
//! Two endpoints, one vocabulary ([`types`]):
//! - **management** (`control_listen`, default `127.0.0.1:9090`), for operators and
//!   Prometheus; never reachable from a data path:
//!
//!   | request | answer |
//!   |---|---|
//!   | `GET /healthz` | 200 `ok` / 503 `draining` (text, [`ProxyHealth`]) |
//!   | `GET /metrics` | Prometheus text ([`crate::metrics`]) |
//!   | `GET /v1/flows` | [`FlowList`] |
//!   | `GET /v1/drops` | [`DropCounts`] |
//!   | `POST /v1/drain`, `POST /v1/undrain` (bearer: management token) | the new health |
//!
//! - **service** (`service_listen`, default `<underlay_addr>:9090`), what nodes and peers need:
//!
//!   | request | answer |
//!   |---|---|
//!   | `GET /healthz` | as above (agents' health checks) |
//!   | `POST /v1/bindings`, body [`PeerBinding`] (bearer: peer secret) | 200 |
//!   | `POST /v1/jobs/{job_key}/ended` (from the job's node) | 204 |
//!   | `POST /v1/jobs/{job_key}/updated/{serial}` (from the job's node) | 202 refetch, 204 held already, 429 rate limited |
//!
//! Refusals are text bodies with their status (401, 403, 404, 400); a route asked on the other
//! endpoint answers 404. The operator's description is `docs/proxy.md`.
//!
//! # Layout
//! - [`types`]: the bodies and paths, with serde.
//! - [`server`]: the axum routers over the daemon's [`crate::shared::Shared`] state.
//! - [`client`]: [`ProxyClient`] (async) and [`blocking::ProxyClient`], and the one HTTP
//!   exchange the proxy makes as a client ([`client::exchange`]).

pub mod client;
pub mod server;
pub mod types;

pub use client::{blocking, ClientError, ProxyClient};
pub use types::{
    paths, DropCounts, DropTenant, FlowList, FlowView, PeerBinding, ProxyHealth, TenantDrops,
};
