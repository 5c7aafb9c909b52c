//! The request and response bodies of the agent's APIs, written once: the server serialises
//! them, [`super::client`] deserialises them, so both sides agree by construction.
//!
//! Pure data with serde: no behaviour of the agent lives here (the views are built from the
//! job table, proxy table and DNS stub by the modules that own them). Unknown fields are
//! ignored when reading, so a newer agent may add fields without breaking older clients;
//! request bodies are strict (`deny_unknown_fields`): a misspelt field is refused, not lost.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use snas_wire::{JobKey, PolicySerial, TenantId};

/// Paths of the local API and the policy endpoint: route patterns for the server, builders
/// for the client.
pub mod paths {
    /// `POST` (create) and `GET` (list).
    pub const JOBS: &str = "/v1/jobs";
    /// Route of one job (`GET`, `DELETE`); `{job}` is the job key or a unique job name.
    pub const JOB_ROUTE: &str = "/v1/jobs/{job}";
    /// Route of one job's tier-1 drop counters.
    pub const JOB_COUNTERS_ROUTE: &str = "/v1/jobs/{job}/counters";
    /// The proxy table.
    pub const PROXIES: &str = "/v1/proxies";
    /// The DNS stub's figures.
    pub const DNS: &str = "/v1/dns";
    /// Prometheus text.
    pub const METRICS: &str = "/metrics";
    /// Route of the policy endpoint (underlay TCP): a job's signed policy, for proxies.
    pub const POLICY_ROUTE: &str = "/v1/jobs/{job_key}/policy";
    /// Route of a running job's policy on the local API (`PUT`: live update or renewal).
    pub const JOB_POLICY_ROUTE: &str = "/v1/jobs/{job}/policy";
    /// `POST`: a signed revocation.
    pub const REVOCATIONS: &str = "/v1/revocations";

    /// Characters escaped in a path segment: everything but RFC 3986's unreserved ones.
    const SEGMENT: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
        .remove(b'-')
        .remove(b'.')
        .remove(b'_')
        .remove(b'~');

    fn segment(id: &str) -> percent_encoding::PercentEncode<'_> {
        percent_encoding::utf8_percent_encode(id, SEGMENT)
    }

    /// `/v1/jobs/{job}` for a job key or name (escaped: a name may hold any character).
    pub fn job(id: &str) -> String {
        format!("{JOBS}/{}", segment(id))
    }

    /// `/v1/jobs/{job}/counters`.
    pub fn job_counters(id: &str) -> String {
        format!("{}/counters", job(id))
    }

    /// `/v1/jobs/{job}/policy` on the local API.
    pub fn job_policy(id: &str) -> String {
        format!("{}/policy", job(id))
    }

    /// `/v1/jobs/{job_key}/policy` on the policy endpoint: the proxy's definition (it is this
    /// endpoint's client), so both ends spell the path once.
    pub fn policy(job_key: super::JobKey) -> String {
        snas_proxy::api::paths::agent_policy(job_key)
    }
}

/// Content type of the policy endpoint's answer: the raw signed token.
pub const POLICY_CONTENT_TYPE: &str = "text/plain; charset=utf-8";

/// Body of `POST /v1/jobs` in its JSON form (the raw token as text is accepted too).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateJob {
    /// The signed policy token (compact JWS).
    pub policy: String,
}

/// Answer of `POST /v1/revocations`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RevocationOutcome {
    /// The revoked job key.
    pub job_key: JobKey,
    /// Running jobs of this agent the revocation tore down (0 when the job is not here or
    /// was torn down by an earlier copy of the revocation).
    pub jobs_torn_down: usize,
}

/// Every error answer: `{"error": code, "detail": message}` with a matching HTTP status.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// Stable code (`job_not_found`, `policy_invalid`, `forbidden`, …; docs/agent.md).
    pub error: String,
    /// What went wrong, for a person (names the field for refused policies).
    pub detail: String,
}

/// Whether a job may still use the network.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobState {
    /// Within its policy's validity.
    Running,
    /// Its policy's `exp` has passed: tier 1 refuses its packets, the stub its DNS queries;
    /// the job stays listed (and its network in place) until it is deleted.
    Expired,
}

/// A job as the API shows it: the answer of `POST /v1/jobs` and `GET /v1/jobs/{job}`, the
/// items of `GET /v1/jobs`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobView {
    /// Job name (policy `job` claim).
    pub job: String,
    /// Tenant name.
    pub tenant: String,
    /// 16 hex digits.
    #[serde(with = "snas_wire::types::job_key_hex")]
    pub job_key: JobKey,
    /// Tenant id as carried in the overlay option.
    pub tenant_id: TenantId,
    /// Policy id.
    pub jti: String,
    /// Policy serial.
    pub serial: PolicySerial,
    /// Policy expiry, seconds since the Unix epoch.
    pub expires_at: u64,
    /// `running`, or `expired` once `expires_at` has passed.
    pub state: JobState,
    /// Network namespace name.
    pub netns: String,
    /// Network namespace path (for runsc).
    pub netns_path: PathBuf,
    /// Sandbox address.
    pub sandbox_ip: IpAddr,
    /// Gateway (host veth) address.
    pub gateway_ip: IpAddr,
    /// DNS stub address for the sandbox (the gateway).
    pub dns_ip: IpAddr,
    /// Prefix length of the job subnet.
    pub prefix_len: u8,
    /// Host-side veth.
    pub veth: String,
    /// Interface name inside the namespace.
    pub sandbox_ifname: String,
    /// MTU inside the sandbox.
    pub mtu: u32,
    /// The sandbox's IPv6 address (a /128) for a dual-stack job; absent for an IPv4-only job.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sandbox_ip6: Option<Ipv6Addr>,
    /// The sandbox's IPv6 gateway (the host veth's link-local address) for a dual-stack job.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway_ip6: Option<Ipv6Addr>,
}

impl JobView {
    /// The resolver the job's processes should use (the agent's DNS stub).
    pub fn resolver(&self) -> IpAddr {
        self.dns_ip
    }
}

/// A job's tier-1 drop counters (`GET /v1/jobs/{job}/counters`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobDrops {
    /// 16 hex digits.
    #[serde(with = "snas_wire::types::job_key_hex")]
    pub job_key: JobKey,
    /// Packets dropped, all reasons and both directions together.
    pub total: u64,
    /// Packets dropped per reason, by the stable names of `snas_wire::Reason` (every reason,
    /// zeros included). Keyed by name, not by `Reason`, so that a client older than the agent
    /// still reads reasons it does not know.
    pub drops: BTreeMap<String, u64>,
}

/// Health of one proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Health {
    /// Takes new flows.
    Alive,
    /// Alive, takes no new flows (before maintenance).
    Draining,
    /// Not answering: its flows move to others.
    Dead,
}

/// One proxy's state (the items of `GET /v1/proxies`, in tier 1's position order).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProxyStatus {
    /// Position in tier 1's proxy table.
    pub index: usize,
    /// Underlay address.
    pub ip: Ipv4Addr,
    /// Current health.
    pub health: Health,
    /// Consecutive failed probes.
    pub failures: u32,
    /// Probes answered so far.
    pub probes_ok: u64,
    /// Probes failed so far.
    pub probes_failed: u64,
    /// From `proxy_service` discovery (else from the static `proxies` list).
    pub discovered: bool,
    /// In the configuration or the latest discovery answer. An unlisted proxy keeps its
    /// position but is dead to tier 1, not probed, and never asked for DNS.
    pub listed: bool,
}

/// The DNS stub's figures (`GET /v1/dns`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DnsView {
    /// Queries received (parsed).
    pub queries: u64,
    /// Queries forwarded to a proxy.
    pub forwarded: u64,
    /// Queries answered from the cache.
    pub cached: u64,
    /// Forward attempts that timed out or failed (each moves to the next proxy).
    pub proxy_failures: u64,
    /// Addresses installed into tier 1.
    pub installed_addrs: u64,
    /// Refusal audit lines left out by the per-job audit limit.
    pub audit_suppressed: u64,
    /// Answers that could not be sent (the socket's send buffer was full).
    pub send_failures: u64,
    /// Outcomes by label.
    pub outcomes: BTreeMap<String, u64>,
    /// Jobs with stub state.
    pub jobs: usize,
    /// Cache entries held.
    pub cache_entries: usize,
    /// Cache bytes held.
    pub cache_bytes: usize,
    /// Cache entries evicted to respect a bound.
    pub cache_evictions: u64,
    /// TCP connections open.
    pub tcp_connections: usize,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_paths_escape_names_and_keep_keys() {
        assert_eq!(paths::job("9f86d081884c7d65"), "/v1/jobs/9f86d081884c7d65");
        assert_eq!(paths::job("build-7.a_b~c"), "/v1/jobs/build-7.a_b~c");
        assert_eq!(paths::job("a/b c?d#é"), "/v1/jobs/a%2Fb%20c%3Fd%23%C3%A9");
        assert_eq!(paths::job_counters("x/y"), "/v1/jobs/x%2Fy/counters");
        assert_eq!(
            paths::policy(JobKey(0xab)),
            "/v1/jobs/00000000000000ab/policy"
        );
    }

    #[test]
    fn create_job_refuses_unknown_fields() {
        let ok: CreateJob = serde_json::from_str(r#"{"policy":"a.b.c"}"#).unwrap();
        assert_eq!(ok.policy, "a.b.c");
        let err = serde_json::from_str::<CreateJob>(r#"{"policy":"a","x":1}"#).unwrap_err();
        assert!(err.to_string().contains('x'), "{err}");
    }

    #[test]
    fn a_job_view_reads_what_the_docs_show() {
        // The example of docs/agent.md ("Create a job"), byte for byte.
        let v: JobView = serde_json::from_str(
            r#"{"job":"build-7","tenant":"acme","job_key":"9f86d081884c7d65","tenant_id":2953711447,
 "jti":"policy-1","serial":3,"expires_at":1795000000,"state":"running",
 "netns":"snas-1a2b3c4d","netns_path":"/run/netns/snas-1a2b3c4d",
 "sandbox_ip":"10.255.0.2","gateway_ip":"10.255.0.1","dns_ip":"10.255.0.1","prefix_len":30,
 "veth":"sh1a2b3c4d","sandbox_ifname":"eth0","mtu":1444}"#,
        )
        .unwrap();
        assert_eq!(v.state, JobState::Running);
        assert_eq!(v.resolver(), IpAddr::from([10, 255, 0, 1]));
        assert_eq!(v.netns_path, PathBuf::from("/run/netns/snas-1a2b3c4d"));
        let back = serde_json::to_value(&v).unwrap();
        assert_eq!(back["state"], "running");
        assert_eq!(back["sandbox_ip"], "10.255.0.2");
        assert_eq!(back["netns_path"], "/run/netns/snas-1a2b3c4d");
    }
}
