//! The request and response bodies of the proxy's HTTP endpoints, written once: the server
//! ([`super::server`]) serialises them, the client ([`super::client`]) deserialises them, so
//! both sides agree by construction.
//!
//! Pure data with serde: nothing of the proxy's behaviour lives here. Answers ignore unknown
//! fields when read (a newer proxy may add fields without breaking older clients); the one
//! request body, [`PeerBinding`], is strict (`deny_unknown_fields`).

use snas_wire::{JobKey, TenantId};

pub use crate::drops::DropTenant;
use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Paths of the management and service endpoints (route patterns for the server, builders
/// for the client), and the path of the agents' policy endpoint the proxy fetches from.
pub mod paths {
    /// `GET`: health (both endpoints).
    pub const HEALTHZ: &str = "/healthz";
    /// `GET`: Prometheus text (management).
    pub const METRICS: &str = "/metrics";
    /// `GET`: live flows (management).
    pub const FLOWS: &str = "/v1/flows";
    /// `GET`: drop counters (management).
    pub const DROPS: &str = "/v1/drops";
    /// `POST`: start draining (management, bearer token).
    pub const DRAIN: &str = "/v1/drain";
    /// `POST`: stop draining (management, bearer token).
    pub const UNDRAIN: &str = "/v1/undrain";
    /// `POST`: a DNS binding pushed by a peer (service, peer secret).
    pub const BINDINGS: &str = "/v1/bindings";
    /// `POST` (management, bearer token): a signed revocation.
    pub const REVOCATIONS: &str = "/v1/revocations";
    /// Route of the job-ended notice (service); `{job_key}` is 16 hex digits.
    pub const JOB_ENDED_ROUTE: &str = "/v1/jobs/{job_key}/ended";

    /// Route of the job-updated notice (service); `{job_key}` is 16 hex digits, `{serial}` the
    /// new policy serial in decimal.
    pub const JOB_UPDATED_ROUTE: &str = "/v1/jobs/{job_key}/updated/{serial}";

    /// `/v1/jobs/{job_key}/updated/{serial}`.
    pub fn job_updated(job_key: snas_wire::JobKey, serial: snas_wire::PolicySerial) -> String {
        format!("/v1/jobs/{job_key}/updated/{}", serial.0)
    }

    /// `/v1/jobs/{job_key}/ended`.
    pub fn job_ended(job_key: snas_wire::JobKey) -> String {
        format!("/v1/jobs/{job_key}/ended")
    }

    /// `/v1/jobs/{job_key}/policy` on a node agent's policy endpoint (the agent's contract,
    /// `snas_agent::api::paths::POLICY_ROUTE`; the proxy is its client).
    pub fn agent_policy(job_key: snas_wire::JobKey) -> String {
        format!("/v1/jobs/{job_key}/policy")
    }
}

/// What `GET /healthz` says: `200 ok` or `503 draining` (text bodies, for load balancers and
/// people with curl).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProxyHealth {
    /// Takes new flows.
    Ok,
    /// Refuses new flows (`draining`); established flows continue.
    Draining,
}

impl ProxyHealth {
    /// The HTTP status that carries it.
    pub fn status(self) -> u16 {
        match self {
            ProxyHealth::Ok => 200,
            ProxyHealth::Draining => 503,
        }
    }

    /// The text body (with its newline).
    pub fn body(self) -> &'static str {
        match self {
            ProxyHealth::Ok => "ok\n",
            ProxyHealth::Draining => "draining\n",
        }
    }

    /// The health an HTTP status means, if it means one.
    pub fn from_status(status: u16) -> Option<ProxyHealth> {
        match status {
            200 => Some(ProxyHealth::Ok),
            503 => Some(ProxyHealth::Draining),
            _ => None,
        }
    }
}

/// The answer of `GET /v1/flows`: at most [`super::server::MAX_FLOWS_LISTED`] flows, in no
/// particular order.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct FlowList {
    /// The flows.
    pub flows: Vec<FlowView>,
}

/// One live flow of the proxy's conntrack table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowView {
    /// The job's key, 16 hex digits.
    #[serde(with = "snas_wire::types::job_key_hex")]
    pub job_key: JobKey,
    /// Tenant name, when the job's policy is cached.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    /// Job name, when the job's policy is cached.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job: Option<String>,
    /// Tenant id as carried in the overlay option.
    pub tenant_id: TenantId,
    /// `tcp`, `udp`, `icmp` or `icmpv6`.
    pub proto: String,
    /// Sandbox address and port (ICMP: the echo identifier as the port).
    pub src: SocketAddr,
    /// Destination address and port.
    pub dst: SocketAddr,
    /// Names the destination was resolved from for this job (unexpired bindings).
    #[serde(default)]
    pub hostnames: Vec<String>,
    /// The SNAT address and port the flow leaves with.
    pub egress: SocketAddr,
    /// Conntrack state, snake_case (`tcp_established`, `udp_replied`, …).
    pub state: String,
    /// Time since the flow's last packet, milliseconds.
    pub idle_ms: u64,
    /// Time since the flow's first packet, milliseconds.
    pub age_ms: u64,
    /// IP bytes sandbox → internet.
    pub bytes_out: u64,
    /// IP bytes internet → sandbox.
    pub bytes_in: u64,
    /// Packets sandbox → internet (saturating).
    pub packets_out: u32,
    /// Packets internet → sandbox (saturating).
    pub packets_in: u32,
}

impl FlowView {
    /// Time since the flow's first packet.
    pub fn age(&self) -> Duration {
        Duration::from_millis(self.age_ms)
    }

    /// Time since the flow's last packet.
    pub fn idle(&self) -> Duration {
        Duration::from_millis(self.idle_ms)
    }
}

/// The answer of `GET /v1/drops`: the proxy's tier-2 drops and refusals since start, the
/// figures of `snas_proxy_drops_total`.
///
/// Counted per reason, all tenants together (`total`, `drops`) and per tenant (`tenants`),
/// never per job: many drops have no job yet (untrusted sources, malformed datagrams, unknown
/// jobs), and per-job series would grow with every job the proxy ever saw. Tenants are those
/// of verified jobs, at most [`crate::drops::MAX_TENANT_SERIES`] (the rest are `other`);
/// drops before a job is verified are `unknown` (see [`crate::drops`]). The per-job detail of
/// a refusal is in the audit log.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct DropCounts {
    /// Every drop, all reasons together.
    pub total: u64,
    /// Drops per reason, by the stable names of `snas_wire::Reason`; reasons with none are
    /// left out. Keyed by name, not by `Reason`, so that a client older than the proxy still
    /// reads reasons it does not know.
    pub drops: BTreeMap<String, u64>,
    /// The same split per tenant: `unknown`, `other` or a tenant id (decimal), each with its
    /// total and its reasons with drops; tenants without drops are left out. Absent from a
    /// proxy older than the split.
    #[serde(default)]
    pub tenants: BTreeMap<DropTenant, TenantDrops>,
}

/// One tenant's part of [`DropCounts`].
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct TenantDrops {
    /// Drops of the tenant, all reasons together.
    pub total: u64,
    /// Drops per reason name; reasons with none are left out.
    pub drops: BTreeMap<String, u64>,
}

/// The body of `POST /v1/bindings` (a peer proxy's push of a DNS answer it gave a job).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerBinding {
    /// Job key, 16 hex digits.
    #[serde(with = "snas_wire::types::job_key_hex")]
    pub job_key: JobKey,
    /// The node the job runs on (the receiving proxy fetches the policy from it).
    pub node: Ipv4Addr,
    /// The queried name.
    pub name: String,
    /// Answered addresses.
    pub addrs: Vec<IpAddr>,
    /// Answered (clamped) TTL, seconds.
    pub ttl_secs: u32,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flow_is_written_with_the_field_names_clients_read() {
        let f = FlowView {
            job_key: JobKey(0xaa),
            tenant: Some("acme".into()),
            job: None,
            tenant_id: TenantId(7),
            proto: "tcp".into(),
            src: "10.255.1.2:40000".parse().unwrap(),
            dst: "[2001:db8::10]:443".parse().unwrap(),
            hostnames: vec!["api.example.com".into()],
            egress: "198.51.100.64:2000".parse().unwrap(),
            state: "tcp_established".into(),
            idle_ms: 250,
            age_ms: 1500,
            bytes_out: 812,
            bytes_in: 1_048_576,
            packets_out: 9,
            packets_in: 800,
        };
        let v = serde_json::to_value(FlowList {
            flows: vec![f.clone()],
        })
        .unwrap();
        assert_eq!(
            v,
            serde_json::json!({"flows": [{
                "job_key": "00000000000000aa", "tenant": "acme", "tenant_id": 7, "proto": "tcp",
                "src": "10.255.1.2:40000", "dst": "[2001:db8::10]:443",
                "hostnames": ["api.example.com"], "egress": "198.51.100.64:2000",
                "state": "tcp_established", "idle_ms": 250, "age_ms": 1500, "bytes_out": 812,
                "bytes_in": 1_048_576, "packets_out": 9, "packets_in": 800,
            }]})
        );
        let back: FlowList = serde_json::from_value(v).unwrap();
        assert_eq!(back.flows[0], f);
        assert_eq!(f.age(), Duration::from_millis(1500));
    }

    #[test]
    fn health_maps_to_its_status_and_back() {
        for h in [ProxyHealth::Ok, ProxyHealth::Draining] {
            assert_eq!(ProxyHealth::from_status(h.status()), Some(h));
        }
        assert_eq!(ProxyHealth::from_status(500), None);
    }

    #[test]
    fn a_peer_binding_with_an_unknown_field_is_refused() {
        let ok = r#"{"job_key":"00000000000000aa","node":"192.0.2.1","name":"a.example.com",
            "addrs":["203.0.113.10"],"ttl_secs":30}"#;
        assert_eq!(
            serde_json::from_str::<PeerBinding>(ok)
                .map(|b| b.job_key)
                .ok(),
            Some(JobKey(0xaa))
        );
        let upper = ok.replace("00000000000000aa", "00000000000000AA");
        assert!(serde_json::from_str::<PeerBinding>(&upper).is_err());
        let extra = ok.replace("\"ttl_secs\"", "\"tll\":1,\"ttl_secs\"");
        assert!(serde_json::from_str::<PeerBinding>(&extra).is_err());
    }
}
