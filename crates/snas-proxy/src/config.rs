//! `proxy.toml`: the proxy daemon's configuration.
//!
//! # What it owns
//! The schema (unknown fields are rejected), defaults of the optional fields, and the checks
//! that need no I/O (non-empty node list, worker count, pool sizes). Every error names the file,
//! the field and the reason. The operator reference is `docs/proxy.md`.
//!
//! # Limits
//! IPv4 underlay and IPv4 egress pool only (the overlay contract is IPv4 outside).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use serde::Deserialize;

use crate::budget::QueueLimits;
use crate::fair::{FairConfig, FairConfigError, FairLimits};
use crate::hold::{HoldConfig, HoldQueue};
use crate::infra::{self, METADATA};

/// Longest IPv6 egress prefix accepted (/112: 65536 addresses, the allocator's index space).
pub const MIN_POOL6_PREFIX: u8 = 112;

/// Most workers accepted (one per core; the machine is small, the check catches typos).
pub const MAX_WORKERS: usize = 64;

/// The daemon configuration (see `docs/proxy.md` for every field).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProxyConfig {
    /// Proxy name (logs, audit, metrics label).
    pub name: String,
    /// Underlay address: GENEVE on :6081 and the outer source toward nodes.
    pub underlay_addr: Ipv4Addr,
    /// Nodes GENEVE and DNS queries are accepted from; their agents serve policies.
    pub nodes: Vec<Ipv4Addr>,
    /// Port of the agents' policy endpoint.
    #[serde(default = "default_agent_policy_port")]
    pub agent_policy_port: u16,
    /// Trust bundle: a `*.pub` file or a directory of them.
    pub trust: PathBuf,
    /// Egress address pool, routed to the TUN device.
    pub egress_pool: Vec<Ipv4Net>,
    /// IPv6 egress address pool (/112 or longer each), routed to the TUN device: the source
    /// addresses of jobs' IPv6 flows (SNAT66). Empty: IPv6 destinations are refused
    /// (`ports_exhausted`, RST / ICMPv6 at once).
    #[serde(default)]
    pub egress_pool6: Vec<Ipv6Net>,
    /// TUN device name.
    pub tun_name: String,
    /// Data-path worker threads (each with its own socket and TUN queue).
    #[serde(default = "default_workers")]
    pub workers: usize,
    /// Hand TCP super-packets for nodes to the kernel whole, UDP-tunnelled, through a TAP
    /// device (`overlay_gso_device`; Linux 6.17+); without it, or where the kernel refuses
    /// the device, the proxy splits them into one GENEVE datagram per segment.
    #[serde(default = "default_true")]
    pub overlay_gso: bool,
    /// Carry established flows in the kernel (`bpf/proxy_fastpath.bpf.c`, tc programs on the
    /// underlay interface and on `fast_path_interface`): decapsulation, NAT, encapsulation and
    /// redirect without the worker. Where the programs cannot be loaded or attached the proxy
    /// logs a warning, reports `snas_proxy_fastpath_available 0` and carries everything itself.
    #[serde(default = "default_true")]
    pub fast_path: bool,
    /// Each tenant's bandwidth cap on this proxy, each way (all its jobs together; the
    /// pacer's tenant clock), e.g. `"10Gbit"`. Also what the fast path charges.
    #[serde(default = "default_tenant_cap")]
    pub tenant_cap: String,
    /// The interface packets to the egress pool arrive on (the fast path's internet side).
    /// Default: the interface of the namespace's IPv4 default route.
    #[serde(default)]
    pub fast_path_interface: Option<String>,
    /// DNS resolver listen address (UDP and TCP).
    pub resolver_listen: SocketAddr,
    /// Upstream DNS servers (the only ones used).
    pub upstream_dns: Vec<SocketAddr>,
    /// Management endpoint (HTTP): health, metrics, flows, drain/undrain. Loopback by default:
    /// it must never be reachable from a data path.
    #[serde(default = "default_control_listen")]
    pub control_listen: SocketAddr,
    /// File holding the bearer token `POST /v1/drain`, `/v1/undrain` and `/v1/revocations`
    /// require (≥ 16 characters). Without it those routes answer 403.
    #[serde(default)]
    pub control_token_file: Option<PathBuf>,
    /// Directory of signed revocations (one per file), scanned every 500 ms and applied like
    /// `POST /v1/revocations`. None: revocations come only through the management API.
    #[serde(default)]
    pub revocations_dir: Option<PathBuf>,
    /// Service endpoint (HTTP) for nodes and peers: health, peer bindings, job ended. Default
    /// `<underlay_addr>:9090` ([`ProxyConfig::service_addr`]).
    #[serde(default)]
    pub service_listen: Option<SocketAddr>,
    /// Audit log (JSON lines, appended).
    pub audit_log: PathBuf,
    /// State directory (created if missing).
    pub state_dir: PathBuf,
    /// Peer proxies that receive DNS binding pushes.
    #[serde(default)]
    pub peers: Vec<Ipv4Addr>,
    /// File holding the shared peer secret (required when `peers` is set or pushes are
    /// accepted).
    #[serde(default)]
    pub peer_secret_file: Option<PathBuf>,
    /// TUN MTU; TCP super-packets above it are segmented by the proxy.
    #[serde(default = "default_tun_mtu")]
    pub tun_mtu: u32,
    /// Timeout of one policy fetch, milliseconds.
    #[serde(default = "default_fetch_timeout_ms")]
    pub fetch_timeout_ms: u64,
    /// How long a failed fetch is remembered (negative cache), seconds.
    #[serde(default = "default_negative_cache_secs")]
    pub negative_cache_secs: u64,
    /// Pacing horizon (queueing-delay budget), milliseconds.
    #[serde(default = "default_pacing_horizon_ms")]
    pub pacing_horizon_ms: u64,
    /// Datagrams per `recvmmsg`/`sendmmsg` batch.
    #[serde(default = "default_batch")]
    pub batch: usize,
    /// After traffic, a worker keeps polling without sleeping for this many microseconds
    /// before it blocks (0: never spins). Trades CPU for latency: each sleep costs a wake-up
    /// (tens of µs on a VM) on the next packet. Worth it on cores dedicated to the proxy.
    #[serde(default)]
    pub busy_poll_us: u64,
    /// NAT ports (live + quarantined) one job may hold on this proxy.
    #[serde(default = "default_max_ports_per_job")]
    pub max_ports_per_job: u32,
    /// NAT ports (live + quarantined) one tenant may hold on this proxy, unless `tenant_quotas`
    /// names it.
    #[serde(default = "default_max_ports_per_tenant")]
    pub max_ports_per_tenant: u32,
    /// Per-tenant port quotas by tenant name (overrides `max_ports_per_tenant`).
    #[serde(default)]
    pub tenant_quotas: std::collections::BTreeMap<String, u32>,
    /// Infrastructure prefixes (underlay and management networks, other fleets' addresses) no
    /// job may reach whatever its policy says, in addition to what the proxy knows itself (see
    /// [`ProxyConfig::infrastructure_set`]).
    #[serde(default)]
    pub infrastructure: Vec<IpNet>,
    /// Packets of one job held while its policy is fetched.
    #[serde(default = "default_hold_job_packets")]
    pub hold_job_packets: u32,
    /// Bytes of one job held while its policy is fetched.
    #[serde(default = "default_hold_job_bytes")]
    pub hold_job_bytes: u64,
    /// Packets held over all jobs.
    #[serde(default = "default_hold_total_packets")]
    pub hold_total_packets: u32,
    /// Bytes held over all jobs.
    #[serde(default = "default_hold_total_bytes")]
    pub hold_total_bytes: u64,
    /// Packets one job may have in one worker's pacing queue.
    #[serde(default = "default_pacing_queue_job_packets")]
    pub pacing_queue_job_packets: u32,
    /// Bytes one job may have in one worker's pacing queue.
    #[serde(default = "default_pacing_queue_job_bytes")]
    pub pacing_queue_job_bytes: u64,
    /// Packets in one worker's pacing queue, over all jobs.
    #[serde(default = "default_pacing_queue_total_packets")]
    pub pacing_queue_total_packets: u32,
    /// Bytes in one worker's pacing queue, over all jobs.
    #[serde(default = "default_pacing_queue_total_bytes")]
    pub pacing_queue_total_bytes: u64,
    /// Audit lines one job may produce per second (burst twice that); the rest are counted and
    /// the job's next line says how many were left out.
    #[serde(default = "default_audit_lines_per_job_per_sec")]
    pub audit_lines_per_job_per_sec: u32,
    /// Bytes a tenant (and a job within it) is credited per round of a worker's fair queues.
    #[serde(default = "default_fair_quantum_bytes")]
    pub fair_quantum_bytes: u32,
    /// Packets one tenant may have waiting in one of a worker's fair queues.
    #[serde(default = "default_fair_tenant_packets")]
    pub fair_tenant_packets: u32,
    /// Bytes one tenant may have waiting in one of a worker's fair queues.
    #[serde(default = "default_fair_tenant_bytes")]
    pub fair_tenant_bytes: u64,
    /// Packets waiting in one of a worker's fair queues, over all tenants.
    #[serde(default = "default_fair_total_packets")]
    pub fair_total_packets: u32,
    /// Bytes waiting in one of a worker's fair queues, over all tenants.
    #[serde(default = "default_fair_total_bytes")]
    pub fair_total_bytes: u64,
}

fn default_hold_job_packets() -> u32 {
    HoldConfig::default().job_packets
}
fn default_hold_job_bytes() -> u64 {
    HoldConfig::default().job_bytes
}
fn default_hold_total_packets() -> u32 {
    HoldConfig::default().total_packets
}
fn default_hold_total_bytes() -> u64 {
    HoldConfig::default().total_bytes
}
fn default_pacing_queue_job_packets() -> u32 {
    QueueLimits::default().job_packets
}
fn default_pacing_queue_job_bytes() -> u64 {
    QueueLimits::default().job_bytes
}
fn default_pacing_queue_total_packets() -> u32 {
    QueueLimits::default().total_packets
}
fn default_pacing_queue_total_bytes() -> u64 {
    QueueLimits::default().total_bytes
}
fn default_audit_lines_per_job_per_sec() -> u32 {
    200
}
fn default_fair_quantum_bytes() -> u32 {
    FairConfig::default().quantum
}
fn default_fair_tenant_packets() -> u32 {
    FairLimits::default().tenant_packets
}
fn default_fair_tenant_bytes() -> u64 {
    FairLimits::default().tenant_bytes
}
fn default_fair_total_packets() -> u32 {
    FairLimits::default().total_packets
}
fn default_fair_total_bytes() -> u64 {
    FairLimits::default().total_bytes
}

fn default_max_ports_per_job() -> u32 {
    crate::nat::NatConfig::new(Vec::new()).max_ports_per_job
}
fn default_max_ports_per_tenant() -> u32 {
    crate::nat::NatConfig::new(Vec::new()).max_ports_per_tenant
}

/// Default port of the management and service endpoints.
pub const DEFAULT_HTTP_PORT: u16 = 9090;

fn default_control_listen() -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, DEFAULT_HTTP_PORT))
}

fn default_agent_policy_port() -> u16 {
    7070
}
fn default_workers() -> usize {
    1
}
fn default_tenant_cap() -> String {
    "10Gbit".to_owned()
}

fn default_true() -> bool {
    true
}

fn default_tun_mtu() -> u32 {
    1500
}
fn default_fetch_timeout_ms() -> u64 {
    2000
}
fn default_negative_cache_secs() -> u64 {
    5
}
fn default_pacing_horizon_ms() -> u64 {
    20
}
fn default_batch() -> usize {
    32
}

/// A configuration that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// the file cannot be read
    #[error("{file}: cannot read: {source}")]
    Read {
        /// The file.
        file: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// the TOML does not match the schema (the message names the field)
    #[error("{file}: {message}")]
    Parse {
        /// The file.
        file: PathBuf,
        /// The parser's message (field, line, reason).
        message: String,
    },
    /// a field has an unusable value
    #[error("{file}: field `{field}`: {reason}")]
    Invalid {
        /// The file.
        file: PathBuf,
        /// The field.
        field: &'static str,
        /// Why.
        reason: String,
    },
}

impl ProxyConfig {
    /// Name of the TAP device of [`ProxyConfig::overlay_gso`]: `tun_name` (its first 14
    /// bytes) followed by `g` (`h` if that would be `tun_name` itself).
    pub fn overlay_gso_device(&self) -> String {
        let stem = &self.tun_name[..self.tun_name.len().min(14)];
        let name = format!("{stem}g");
        if name == self.tun_name {
            format!("{stem}h")
        } else {
            name
        }
    }

    /// [`ProxyConfig::tenant_cap`] as a rate (checked at load; 10 Gbit/s if it does not parse).
    pub fn tenant_cap_rate(&self) -> snas_wire::Bps {
        snas_wire::Bps::parse(&self.tenant_cap)
            .ok()
            .or(snas_wire::Bps::gbit(10))
            .unwrap_or(snas_wire::Bps::MAX)
    }

    /// Reads and checks `path`.
    pub fn load(path: &Path) -> Result<ProxyConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            file: path.to_owned(),
            source,
        })?;
        ProxyConfig::parse(&text, path)
    }

    /// Parses and checks TOML text; `file` is only used in messages.
    pub fn parse(text: &str, file: &Path) -> Result<ProxyConfig, ConfigError> {
        let cfg: ProxyConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            file: file.to_owned(),
            message: e.to_string().trim_end().to_owned(),
        })?;
        cfg.check(file)?;
        Ok(cfg)
    }

    fn check(&self, file: &Path) -> Result<(), ConfigError> {
        let bad = |field: &'static str, reason: String| ConfigError::Invalid {
            file: file.to_owned(),
            field,
            reason,
        };
        if self.name.is_empty() {
            return Err(bad("name", "must not be empty".into()));
        }
        if self.nodes.is_empty() {
            return Err(bad("nodes", "at least one node address is needed".into()));
        }
        if self.workers == 0 || self.workers > MAX_WORKERS {
            return Err(bad(
                "workers",
                format!("{} is outside 1..={MAX_WORKERS}", self.workers),
            ));
        }
        if self.egress_pool.is_empty() {
            return Err(bad("egress_pool", "at least one prefix is needed".into()));
        }
        if let Some(n) = self
            .egress_pool6
            .iter()
            .find(|n| n.prefix_len() < MIN_POOL6_PREFIX)
        {
            return Err(bad(
                "egress_pool6",
                format!(
                    "{n} is shorter than /{MIN_POOL6_PREFIX}: the proxy gives every pool address its own port space, at most 65535 addresses in all"
                ),
            ));
        }
        if self.egress_ips().len() > usize::from(u16::MAX) {
            return Err(bad(
                "egress_pool6",
                format!(
                    "egress_pool and egress_pool6 hold {} addresses together, at most 65535 are supported",
                    self.egress_ips().len()
                ),
            ));
        }
        if self.egress_ips().is_empty() {
            return Err(bad(
                "egress_pool",
                "the prefixes hold no host address".into(),
            ));
        }
        if self.tun_name.is_empty() || self.tun_name.len() > 15 {
            return Err(bad("tun_name", "must be 1 to 15 bytes (IFNAMSIZ)".into()));
        }
        if !self
            .tun_name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
        {
            return Err(bad(
                "tun_name",
                "only letters, digits, `_`, `.` and `-` (it also names the nftables guard)".into(),
            ));
        }
        if self.upstream_dns.is_empty() {
            return Err(bad("upstream_dns", "at least one server is needed".into()));
        }
        if !(576..=65535).contains(&self.tun_mtu) {
            return Err(bad(
                "tun_mtu",
                format!("{} is outside 576..=65535", self.tun_mtu),
            ));
        }
        if self.max_ports_per_job == 0 {
            return Err(bad("max_ports_per_job", "must be at least 1".into()));
        }
        if self.max_ports_per_tenant == 0 {
            return Err(bad("max_ports_per_tenant", "must be at least 1".into()));
        }
        for (tenant, quota) in &self.tenant_quotas {
            if let Err(e) = snas_policy::claims::check_tenant(tenant) {
                return Err(bad("tenant_quotas", format!("tenant `{tenant}`: {e}")));
            }
            if *quota == 0 {
                return Err(bad(
                    "tenant_quotas",
                    format!("tenant `{tenant}`: quota must be at least 1"),
                ));
            }
        }
        if let Err(e) = snas_wire::Bps::parse(&self.tenant_cap) {
            return Err(bad("tenant_cap", e.to_string()));
        }
        if self.batch == 0 || self.batch > 1024 {
            return Err(bad("batch", format!("{} is outside 1..=1024", self.batch)));
        }
        if self.fetch_timeout_ms == 0 {
            return Err(bad("fetch_timeout_ms", "must be greater than zero".into()));
        }
        let service = self.service_addr();
        // Port 0 asks the kernel for a free port for each socket: never a clash.
        let clash = self.control_listen.port() == service.port()
            && service.port() != 0
            && (self.control_listen.ip() == service.ip()
                || self.control_listen.ip().is_unspecified()
                || service.ip().is_unspecified());
        if clash {
            return Err(bad(
                "control_listen",
                format!(
                    "{} overlaps `service_listen` ({service}): the management endpoint needs its \
                     own address (default 127.0.0.1:{DEFAULT_HTTP_PORT})",
                    self.control_listen
                ),
            ));
        }
        if let Err(e) = HoldQueue::new(self.hold_config()) {
            let field = match e {
                crate::hold::HoldConfigError::Zero(f)
                | crate::hold::HoldConfigError::JobAboveTotal(f) => f,
            };
            let field = match field {
                "job_packets" => "hold_job_packets",
                "job_bytes" => "hold_job_bytes",
                "total_packets" => "hold_total_packets",
                "total_bytes" => "hold_total_bytes",
                _ => "fetch_timeout_ms",
            };
            return Err(bad(field, e.to_string()));
        }
        let q = self.pacing_queue_limits();
        for (field, zero) in [
            ("pacing_queue_job_packets", q.job_packets == 0),
            ("pacing_queue_job_bytes", q.job_bytes == 0),
            (
                "pacing_queue_total_packets",
                q.total_packets < q.job_packets,
            ),
            ("pacing_queue_total_bytes", q.total_bytes < q.job_bytes),
        ] {
            if zero {
                return Err(bad(
                    field,
                    "must be at least 1, and a total at least its per-job bound".into(),
                ));
            }
        }
        if let Err(e) = self.fair_config().validate() {
            let field = match e {
                FairConfigError::ZeroQuantum => "fair_quantum_bytes",
                FairConfigError::ZeroBound(f)
                | FairConfigError::TotalBelowTenant { total: f, .. } => match f {
                    "tenant_packets" => "fair_tenant_packets",
                    "tenant_bytes" => "fair_tenant_bytes",
                    "total_packets" => "fair_total_packets",
                    _ => "fair_total_bytes",
                },
            };
            return Err(bad(field, e.to_string()));
        }
        if self.audit_lines_per_job_per_sec == 0 {
            return Err(bad(
                "audit_lines_per_job_per_sec",
                "must be at least 1".into(),
            ));
        }
        if !self.peers.is_empty() && self.peer_secret_file.is_none() {
            return Err(bad(
                "peer_secret_file",
                "required when `peers` is set".into(),
            ));
        }
        Ok(())
    }

    /// Every prefix no job may reach: `infrastructure` plus what the proxy knows about itself —
    /// its underlay address, every node, every peer, the egress pool, the addresses it listens
    /// on (unspecified ones excepted: those are the namespace's local addresses, which the
    /// start-up guard covers), the upstream DNS servers and the cloud metadata endpoints
    /// ([`METADATA`]). Not aggregated (see [`crate::infra::InfraSet`]).
    pub fn infrastructure_set(&self) -> Vec<IpNet> {
        let mut out = self.infrastructure.clone();
        out.push(infra::host(IpAddr::V4(self.underlay_addr)));
        out.extend(self.nodes.iter().map(|n| infra::host(IpAddr::V4(*n))));
        out.extend(self.peers.iter().map(|n| infra::host(IpAddr::V4(*n))));
        out.extend(self.egress_pool.iter().map(|n| IpNet::V4(n.trunc())));
        out.extend(self.egress_pool6.iter().map(|n| IpNet::V6(n.trunc())));
        out.extend(
            [
                self.resolver_listen.ip(),
                self.control_listen.ip(),
                self.service_addr().ip(),
            ]
            .into_iter()
            .filter(|ip| !ip.is_unspecified())
            .map(infra::host),
        );
        out.extend(self.upstream_dns.iter().map(|s| infra::host(s.ip())));
        out.extend(METADATA);
        out
    }

    /// The egress addresses: the host addresses of every pool prefix, in order.
    pub fn egress_ips(&self) -> Vec<IpAddr> {
        let mut out = Vec::new();
        for net in &self.egress_pool {
            out.extend(net.hosts().map(IpAddr::V4));
        }
        for net in &self.egress_pool6 {
            let net = net.trunc();
            // The first address of a prefix is its subnet-router anycast address (RFC 4291
            // §2.6.1), not a host's.
            let skip = usize::from(net.prefix_len() < 127);
            out.extend(net.hosts().skip(skip).map(IpAddr::V6));
        }
        out.dedup();
        out
    }

    /// Where the service endpoint listens: `service_listen`, or `<underlay_addr>:9090`.
    pub fn service_addr(&self) -> SocketAddr {
        self.service_listen
            .unwrap_or_else(|| SocketAddr::from((self.underlay_addr, DEFAULT_HTTP_PORT)))
    }

    /// Bounds of the hold queue; held packets wait at most the fetch timeout.
    pub fn hold_config(&self) -> HoldConfig {
        HoldConfig {
            job_packets: self.hold_job_packets,
            job_bytes: self.hold_job_bytes,
            total_packets: self.hold_total_packets,
            total_bytes: self.hold_total_bytes,
            max_wait: self.fetch_timeout(),
        }
    }

    /// Bounds of each worker's pacing queue.
    pub fn pacing_queue_limits(&self) -> QueueLimits {
        QueueLimits {
            job_packets: self.pacing_queue_job_packets,
            job_bytes: self.pacing_queue_job_bytes,
            total_packets: self.pacing_queue_total_packets,
            total_bytes: self.pacing_queue_total_bytes,
        }
    }

    /// The quantum and bounds of each of a worker's fair queues (one per direction).
    pub fn fair_config(&self) -> FairConfig {
        FairConfig {
            quantum: self.fair_quantum_bytes,
            limits: FairLimits {
                tenant_packets: self.fair_tenant_packets,
                tenant_bytes: self.fair_tenant_bytes,
                total_packets: self.fair_total_packets,
                total_bytes: self.fair_total_bytes,
            },
        }
    }

    /// Policy fetch timeout.
    pub fn fetch_timeout(&self) -> Duration {
        Duration::from_millis(self.fetch_timeout_ms)
    }

    /// Negative-cache lifetime.
    pub fn negative_cache(&self) -> Duration {
        Duration::from_secs(self.negative_cache_secs)
    }

    /// Pacing horizon.
    pub fn pacing_horizon(&self) -> Duration {
        Duration::from_millis(self.pacing_horizon_ms)
    }
}
