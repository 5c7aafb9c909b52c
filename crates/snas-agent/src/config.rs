//! The agent's configuration file (`agent.toml`).
//!
//! Owns parsing and validation of the configuration. Every field is documented in
//! `docs/agent.md`; unknown fields are rejected so that a typo never silently falls back to a
//! default. Every error names the file, the field and the reason.
//!
//! # Invariants (checked by [`AgentConfig::validate`])
//! - `underlay_mtu - 56` (the GENEVE overhead) is at least 1280, so the sandbox can carry IPv6.
//! - `job_pool` is an IPv4 network that holds at least one job subnet of `job_prefix_len`
//!   (30 or 31).
//! - Interface names built from `host_veth_prefix` fit IFNAMSIZ (15 bytes).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};

use ipnet::{Ipv4Net, Ipv6Net};
use serde::Deserialize;

use crate::naming::{MAX_HOST_VETH_PREFIX, SHORT_ID_HEX};

/// Bytes the overlay adds to every packet: outer IPv4 20 + UDP 8 + GENEVE 8 + SNAS option 20
/// (`snas_wire::geneve::OVERLAY_OVERHEAD`, as a `u32` for MTU arithmetic).
pub const GENEVE_OVERHEAD: u32 = snas_wire::geneve::OVERLAY_OVERHEAD as u32;

/// The smallest MTU the sandbox may get (IPv6 minimum link MTU).
pub const MIN_SANDBOX_MTU: u32 = 1280;

/// Errors from loading `agent.toml`. Each names the file and, where it applies, the field.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{path}: cannot read configuration: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// TOML syntax error, unknown field, missing field or wrong type (the message names the field).
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    /// A field parsed but its value is not acceptable.
    #[error("{path}: field `{field}`: {reason}")]
    Invalid {
        path: PathBuf,
        field: &'static str,
        reason: String,
    },
}

impl ConfigError {
    /// The offending field, when the error is about one value.
    pub fn field(&self) -> Option<&str> {
        match self {
            ConfigError::Invalid { field, .. } => Some(field),
            _ => None,
        }
    }
}

/// The node agent's configuration. See `docs/agent.md` for every field and its default.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// Name of this node (audit events, logs). Default: the host name.
    #[serde(default = "default_node_name")]
    pub node_name: String,
    /// The underlay (uplink) interface that carries GENEVE to the proxies.
    pub underlay_interface: String,
    /// This node's underlay IPv4 address: the policy's `node` claim must name it.
    pub underlay_address: Ipv4Addr,
    /// MTU of the underlay; the sandbox gets `underlay_mtu - 56`.
    #[serde(default = "default_underlay_mtu")]
    pub underlay_mtu: u32,
    /// Per-node pool from which each job gets a small subnet.
    #[serde(default = "default_job_pool")]
    pub job_pool: Ipv4Net,
    /// Prefix length of each job subnet: 30 (gateway .1, sandbox .2) or 31 (gateway even,
    /// sandbox odd, RFC 3021).
    #[serde(default = "default_job_prefix_len")]
    pub job_prefix_len: u8,
    /// Whether jobs get an IPv6 address and route (dual stack). Default true.
    #[serde(default = "default_true")]
    pub job_ipv6: bool,
    /// Per-node IPv6 prefix of the jobs' addresses: each job gets one /128, the prefix with its
    /// sandbox IPv4 address as the low 32 bits (see docs/agent.md, "Addressing plan").
    #[serde(default = "default_job_pool6")]
    pub job_pool6: Ipv6Net,
    /// Unix socket of the local API.
    #[serde(default = "default_api_socket")]
    pub api_socket: PathBuf,
    /// Permission bits of the API socket (e.g. `0o600`, `0o660`).
    #[serde(default = "default_api_socket_mode")]
    pub api_socket_mode: u32,
    /// TCP address on the underlay where proxies fetch a job's signed policy.
    /// Default: `underlay_address:7070`.
    #[serde(default)]
    pub policy_listen: Option<SocketAddr>,
    /// Trust bundle (public keys) used to verify signed policies.
    pub trust_bundle: PathBuf,
    /// Directory for the agent's job records (restart recovery).
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
    /// bpffs directory under which tier-1 maps are pinned.
    #[serde(default = "default_bpf_pin_dir")]
    pub bpf_pin_dir: PathBuf,
    /// Directory of named network namespaces (iproute2 uses /run/netns).
    #[serde(default = "default_netns_dir")]
    pub netns_dir: PathBuf,
    /// Prefix of the agent's namespace names; everything with this prefix belongs to the agent.
    #[serde(default = "default_netns_prefix")]
    pub netns_prefix: String,
    /// Prefix of host-side veth names (followed by 8 hex digits; at most 7 characters).
    #[serde(default = "default_host_veth_prefix")]
    pub host_veth_prefix: String,
    /// Static proxy addresses (underlay) for tier 1 to encapsulate to.
    #[serde(default)]
    pub proxies: Vec<IpAddr>,
    /// DNS name whose A records list further proxies (appended to `proxies`).
    #[serde(default)]
    pub proxy_service: Option<String>,
    /// DNS server asked for `proxy_service` (required with it; the host's resolver
    /// configuration is never used).
    #[serde(default)]
    pub proxy_service_dns: Option<SocketAddr>,
    /// Port of each proxy's control endpoint (`GET /healthz`).
    #[serde(default = "default_proxy_control_port")]
    pub proxy_control_port: u16,
    /// Port of each proxy's DNS resolver (the stub forwards allowed queries there).
    #[serde(default = "default_proxy_resolver_port")]
    pub proxy_resolver_port: u16,
    /// Address the DNS stub binds (UDP and TCP, port 53). Default `0.0.0.0`: tier 1 rewrites
    /// every sandbox DNS packet to its job's gateway address, which is local to this host.
    #[serde(default = "default_dns_listen")]
    pub dns_listen: IpAddr,
    /// Per-job DNS query rate (queries per second) before the stub answers REFUSED.
    #[serde(default = "default_dns_rate")]
    pub dns_queries_per_sec: u32,
    /// Per-job DNS query burst.
    #[serde(default = "default_dns_burst")]
    pub dns_query_burst: u32,
    /// Queries of one job forwarded and not yet answered, at most.
    #[serde(default = "default_dns_inflight")]
    pub dns_max_inflight_per_job: u32,
    /// TCP connections of one job to the DNS stub, at most; beyond: closed at once
    /// (`dns_tcp_limit`).
    #[serde(default = "default_dns_tcp_per_job")]
    pub dns_max_tcp_connections_per_job: u32,
    /// Per-job DNS packets per second that tier 1 lets through to the stub (UDP/TCP 53, TCP
    /// 853); beyond it (after the burst) tier 1 drops them (`dns_rate`) before they reach the
    /// stub's shared sockets. Bounds what one job's DNS flood costs the node; cached answers
    /// are not budgeted by the stub, so this is their bound.
    #[serde(default = "default_dns_packets_per_sec")]
    pub dns_packets_per_sec: u32,
    /// Per-job DNS packet burst in tier 1.
    #[serde(default = "default_dns_packet_burst")]
    pub dns_packet_burst: u32,
    /// Put the `fq` qdisc on the underlay interface at start (mq + one fq per transmit queue)
    /// where the kernel has it, so that tier 1's EDT stamps pace jobs on the node. `false`
    /// leaves the interface's qdisc to the operator.
    #[serde(default = "default_true")]
    pub install_fq: bool,
    /// Infrastructure prefixes (IPv4 or IPv6) that tier 1 refuses for every job whatever its
    /// policy says (`infrastructure_denied`), in addition to the defaults of
    /// [`AgentConfig::infrastructure_set`]: management networks, the underlay, egress pools of
    /// the proxies, internal resolvers.
    #[serde(default)]
    pub infrastructure: Vec<ipnet::IpNet>,
    /// JSON-lines audit log (tier-1 events and DNS decisions). Default: `state_dir/audit.log`.
    #[serde(default)]
    pub audit_log: Option<PathBuf>,
    /// TCP address serving `GET /metrics` (Prometheus text). None: only on the API socket.
    #[serde(default)]
    pub metrics_listen: Option<SocketAddr>,
    /// Directory of signed revocations (one per file), scanned every 500 ms; applied like
    /// `POST /v1/revocations`. None: revocations come only through the API.
    #[serde(default)]
    pub revocations_dir: Option<PathBuf>,
}

fn default_node_name() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: buf is valid for buf.len() bytes; gethostname writes at most that many.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return "localhost".to_owned();
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}
fn default_underlay_mtu() -> u32 {
    1500
}
fn default_job_pool() -> Ipv4Net {
    Ipv4Net::new(Ipv4Addr::new(10, 255, 0, 0), 16).unwrap_or_default()
}
/// `fd73:6e61:7300::/64`: a ULA ("sna" in the global ID), the same on every node like the
/// default `job_pool` (jobs' addresses never leave the node: the proxies translate them).
pub const DEFAULT_JOB_POOL6: Ipv6Net = Ipv6Net::new_assert(
    std::net::Ipv6Addr::new(0xfd73, 0x6e61, 0x7300, 0, 0, 0, 0, 0),
    64,
);
fn default_job_pool6() -> Ipv6Net {
    DEFAULT_JOB_POOL6
}
fn default_job_prefix_len() -> u8 {
    30
}
fn default_api_socket() -> PathBuf {
    PathBuf::from("/run/snas/agent.sock")
}
fn default_api_socket_mode() -> u32 {
    0o600
}
fn default_state_dir() -> PathBuf {
    PathBuf::from("/var/lib/snas/agent")
}
fn default_bpf_pin_dir() -> PathBuf {
    PathBuf::from("/sys/fs/bpf/snas")
}
fn default_netns_dir() -> PathBuf {
    PathBuf::from("/run/netns")
}
fn default_netns_prefix() -> String {
    "snas-".to_owned()
}
fn default_proxy_control_port() -> u16 {
    9090
}
fn default_proxy_resolver_port() -> u16 {
    5353
}
fn default_dns_listen() -> IpAddr {
    IpAddr::V4(Ipv4Addr::UNSPECIFIED)
}
fn default_dns_rate() -> u32 {
    20
}
fn default_dns_burst() -> u32 {
    40
}
fn default_dns_inflight() -> u32 {
    16
}
fn default_dns_tcp_per_job() -> u32 {
    8
}
fn default_true() -> bool {
    true
}
fn default_dns_packets_per_sec() -> u32 {
    500
}
fn default_dns_packet_burst() -> u32 {
    1000
}
fn default_host_veth_prefix() -> String {
    "sh".to_owned()
}

impl AgentConfig {
    /// Reads, parses and validates a configuration file.
    pub fn from_toml_file(path: &Path) -> Result<AgentConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        AgentConfig::from_toml_str(&text, path)
    }

    /// Parses and validates configuration text; `path` is used in error messages only.
    pub fn from_toml_str(text: &str, path: &Path) -> Result<AgentConfig, ConfigError> {
        let config: AgentConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: e.to_string().trim_end().to_owned(),
        })?;
        config.validate(path)?;
        Ok(config)
    }

    /// Checks the relations between fields that serde cannot express.
    pub fn validate(&self, path: &Path) -> Result<(), ConfigError> {
        let invalid = |field: &'static str, reason: String| ConfigError::Invalid {
            path: path.to_owned(),
            field,
            reason,
        };
        if self.underlay_interface.is_empty() || self.underlay_interface.len() > 15 {
            return Err(invalid(
                "underlay_interface",
                "must be an interface name of 1 to 15 bytes".into(),
            ));
        }
        if self.underlay_mtu < MIN_SANDBOX_MTU + GENEVE_OVERHEAD || self.underlay_mtu > 65535 {
            return Err(invalid(
                "underlay_mtu",
                format!(
                    "{} leaves a sandbox MTU below {MIN_SANDBOX_MTU} after the {GENEVE_OVERHEAD}-byte overlay header (need {}..=65535)",
                    self.underlay_mtu,
                    MIN_SANDBOX_MTU + GENEVE_OVERHEAD
                ),
            ));
        }
        if !(30..=31).contains(&self.job_prefix_len) {
            return Err(invalid(
                "job_prefix_len",
                format!("{} is not 30 or 31", self.job_prefix_len),
            ));
        }
        if self.job_pool.prefix_len() > self.job_prefix_len {
            return Err(invalid(
                "job_pool",
                format!(
                    "{} is smaller than one job subnet (/{})",
                    self.job_pool, self.job_prefix_len
                ),
            ));
        }
        if self.job_pool.network() != self.job_pool.addr() {
            return Err(invalid(
                "job_pool",
                format!(
                    "{} has host bits set (did you mean {}?)",
                    self.job_pool,
                    self.job_pool.trunc()
                ),
            ));
        }
        if self.job_pool6.prefix_len() > 96 {
            return Err(invalid(
                "job_pool6",
                format!(
                    "{} is longer than /96 (the low 32 bits hold the job's IPv4 address)",
                    self.job_pool6
                ),
            ));
        }
        if self.job_pool6.network() != self.job_pool6.addr() {
            return Err(invalid(
                "job_pool6",
                format!(
                    "{} has host bits set (did you mean {}?)",
                    self.job_pool6,
                    self.job_pool6.trunc()
                ),
            ));
        }
        if self.api_socket_mode & !0o777 != 0 {
            return Err(invalid(
                "api_socket_mode",
                format!(
                    "{:#o} is not a permission mode (0o000..=0o777)",
                    self.api_socket_mode
                ),
            ));
        }
        if self.api_socket_mode & 0o007 != 0 {
            return Err(invalid(
                "api_socket_mode",
                format!(
                    "{:#o} gives other users access to the agent API",
                    self.api_socket_mode
                ),
            ));
        }
        if self.netns_prefix.is_empty()
            || self.netns_prefix.contains('/')
            || self.netns_prefix.len() + SHORT_ID_HEX > 200
        {
            return Err(invalid(
                "netns_prefix",
                "must be a non-empty file name fragment without '/'".into(),
            ));
        }
        if self.host_veth_prefix.is_empty()
            || self.host_veth_prefix.len() > MAX_HOST_VETH_PREFIX
            || !self
                .host_veth_prefix
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err(invalid(
                "host_veth_prefix",
                format!(
                    "must be 1 to {MAX_HOST_VETH_PREFIX} characters of [A-Za-z0-9_-] so that the name fits 15 bytes"
                ),
            ));
        }
        if self.dns_queries_per_sec == 0 || self.dns_query_burst == 0 {
            return Err(invalid(
                "dns_queries_per_sec",
                "the DNS query rate and burst must be at least 1".into(),
            ));
        }
        if self.dns_packets_per_sec == 0 || self.dns_packet_burst == 0 {
            return Err(invalid(
                "dns_packets_per_sec",
                "the DNS packet rate and burst must be at least 1".into(),
            ));
        }
        if self.dns_max_inflight_per_job == 0 {
            return Err(invalid(
                "dns_max_inflight_per_job",
                "must be at least 1".into(),
            ));
        }
        if self.dns_max_tcp_connections_per_job == 0 {
            return Err(invalid(
                "dns_max_tcp_connections_per_job",
                "must be at least 1".into(),
            ));
        }
        if self.proxy_service.is_some() != self.proxy_service_dns.is_some() {
            return Err(invalid(
                "proxy_service_dns",
                "proxy_service and proxy_service_dns go together".into(),
            ));
        }
        for (field, p) in [
            ("audit_log", &self.audit_log),
            ("revocations_dir", &self.revocations_dir),
        ] {
            if let Some(p) = p {
                if !p.is_absolute() {
                    return Err(invalid(
                        field,
                        format!("{} is not an absolute path", p.display()),
                    ));
                }
            }
        }
        for (field, dir) in [
            ("state_dir", &self.state_dir),
            ("bpf_pin_dir", &self.bpf_pin_dir),
            ("netns_dir", &self.netns_dir),
            ("api_socket", &self.api_socket),
        ] {
            if !dir.is_absolute() {
                return Err(invalid(
                    field,
                    format!("{} is not an absolute path", dir.display()),
                ));
            }
        }
        Ok(())
    }

    /// The audit log path (explicit, or `state_dir/audit.log`).
    pub fn audit_log_path(&self) -> PathBuf {
        self.audit_log
            .clone()
            .unwrap_or_else(|| self.state_dir.join("audit.log"))
    }

    /// The configured IPv4 proxies, in configuration order (their tier-1 positions).
    pub fn proxy_v4(&self) -> Vec<Ipv4Addr> {
        self.proxies
            .iter()
            .filter_map(|p| match p {
                IpAddr::V4(ip) => Some(*ip),
                IpAddr::V6(_) => None,
            })
            .collect()
    }

    /// Every destination tier 1 refuses whatever a job's policy says: the configured
    /// `infrastructure` plus the addresses the agent knows itself — its underlay address, the
    /// configured proxies, the job pool (other sandboxes and their gateways, i.e. this node),
    /// and the cloud metadata services (169.254.169.254, fd00:ec2::254). Proxies found through
    /// `proxy_service` at run time are added by the agent as they appear.
    pub fn infrastructure_set(&self) -> Vec<ipnet::IpNet> {
        let host = |ip: IpAddr| ipnet::IpNet::from(ip);
        let mut out: Vec<ipnet::IpNet> = self.infrastructure.iter().map(|n| n.trunc()).collect();
        out.push(host(IpAddr::V4(self.underlay_address)));
        out.extend(self.proxies.iter().copied().map(host));
        out.push(ipnet::IpNet::V4(self.job_pool));
        if self.job_ipv6 {
            out.push(ipnet::IpNet::V6(self.job_pool6));
        }
        out.push(host(IpAddr::V4(Ipv4Addr::new(169, 254, 169, 254))));
        out.push(host(IpAddr::V6(std::net::Ipv6Addr::new(
            0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254,
        ))));
        out.sort();
        out.dedup();
        out
    }

    /// The IPv6 address of the job whose sandbox IPv4 address is `sandbox`, or `None` when
    /// jobs are IPv4-only (`job_ipv6 = false`): `job_pool6` with `sandbox` as its low 32 bits.
    pub fn sandbox_ip6(&self, sandbox: Ipv4Addr) -> Option<std::net::Ipv6Addr> {
        self.job_ipv6.then(|| {
            std::net::Ipv6Addr::from(
                u128::from(self.job_pool6.network()) | u128::from(u32::from(sandbox)),
            )
        })
    }

    /// The MTU given to each sandbox: underlay MTU minus the overlay header.
    pub fn sandbox_mtu(&self) -> u32 {
        self.underlay_mtu - GENEVE_OVERHEAD
    }

    /// The policy endpoint's listen address (explicit, or the underlay address on port 7070).
    pub fn policy_listen_addr(&self) -> SocketAddr {
        self.policy_listen
            .unwrap_or_else(|| SocketAddr::new(IpAddr::V4(self.underlay_address), 7070))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
underlay_interface = "eth0"
underlay_address = "192.0.2.7"
trust_bundle = "/etc/snas/trust.json"
"#;

    fn parse(text: &str) -> Result<AgentConfig, ConfigError> {
        AgentConfig::from_toml_str(text, Path::new("/etc/snas/agent.toml"))
    }

    #[test]
    fn minimal_config_takes_documented_defaults() {
        let c = parse(MINIMAL).unwrap();
        assert_eq!(c.underlay_mtu, 1500);
        assert_eq!(c.sandbox_mtu(), 1444);
        assert_eq!(c.job_pool.to_string(), "10.255.0.0/16");
        assert_eq!(c.job_prefix_len, 30);
        assert_eq!(c.api_socket, PathBuf::from("/run/snas/agent.sock"));
        assert_eq!(c.api_socket_mode, 0o600);
        assert_eq!(c.policy_listen_addr().to_string(), "192.0.2.7:7070");
        assert_eq!(c.netns_prefix, "snas-");
        assert_eq!(c.host_veth_prefix, "sh");
        assert!(c.proxies.is_empty());
        assert_eq!(c.dns_packets_per_sec, 500);
        assert_eq!(c.dns_packet_burst, 1000);
    }

    #[test]
    fn infrastructure_includes_what_the_agent_knows() {
        let c = parse(&format!(
            "{MINIMAL}\nproxies = [\"198.51.100.1\"]\ninfrastructure = [\"192.0.2.0/24\", \"203.0.113.7/32\"]\n"
        ))
        .unwrap();
        let set: Vec<String> = c
            .infrastructure_set()
            .iter()
            .map(|n| n.to_string())
            .collect();
        for want in [
            "192.0.2.0/24",
            "192.0.2.7/32",
            "198.51.100.1/32",
            "203.0.113.7/32",
            "10.255.0.0/16",
            "169.254.169.254/32",
            "fd00:ec2::254/128",
            "fd73:6e61:7300::/64",
        ] {
            assert!(set.iter().any(|s| s == want), "{want} missing from {set:?}");
        }
        let err = parse(&format!("{MINIMAL}\ninfrastructure = [\"not-a-net\"]\n")).unwrap_err();
        assert!(err.to_string().contains("infrastructure"), "{err}");
    }

    #[test]
    fn jobs_get_an_ipv6_address_that_embeds_their_ipv4_address() {
        let c = parse(MINIMAL).unwrap();
        assert_eq!(c.job_pool6.to_string(), "fd73:6e61:7300::/64");
        assert_eq!(
            c.sandbox_ip6(Ipv4Addr::new(10, 255, 0, 2)),
            Some("fd73:6e61:7300::aff:2".parse().unwrap())
        );
        let c = parse(&format!("{MINIMAL}\njob_pool6 = \"2001:db8:77::/96\"\n")).unwrap();
        assert_eq!(
            c.sandbox_ip6(Ipv4Addr::new(10, 255, 3, 6)),
            Some("2001:db8:77::aff:306".parse().unwrap())
        );
        let off = parse(&format!("{MINIMAL}\njob_ipv6 = false\n")).unwrap();
        assert_eq!(off.sandbox_ip6(Ipv4Addr::new(10, 255, 0, 2)), None);
        assert!(!off
            .infrastructure_set()
            .iter()
            .any(|n| n.to_string() == "fd73:6e61:7300::/64"));
    }

    #[test]
    fn job_pool6_longer_than_96_bits_or_with_host_bits_is_rejected() {
        let err = parse(&format!("{MINIMAL}\njob_pool6 = \"fd00::/120\"\n")).unwrap_err();
        assert_eq!(err.field(), Some("job_pool6"), "{err}");
        let err = parse(&format!("{MINIMAL}\njob_pool6 = \"fd00::1/64\"\n")).unwrap_err();
        assert_eq!(err.field(), Some("job_pool6"), "{err}");
        assert!(err.to_string().contains("fd00::/64"), "{err}");
    }

    #[test]
    fn full_config_parses_every_field() {
        let c = parse(
            r#"
node_name = "node-a"
underlay_interface = "ens5"
underlay_address = "192.0.2.7"
underlay_mtu = 9001
job_pool = "10.254.0.0/20"
job_prefix_len = 31
api_socket = "/run/x/agent.sock"
api_socket_mode = 0o660
policy_listen = "192.0.2.7:7171"
trust_bundle = "/etc/snas/trust.json"
state_dir = "/var/lib/x"
bpf_pin_dir = "/sys/fs/bpf/x"
netns_dir = "/run/netns"
netns_prefix = "x-"
host_veth_prefix = "hx"
proxies = ["198.51.100.1", "198.51.100.2"]
"#,
        )
        .unwrap();
        assert_eq!(c.node_name, "node-a");
        assert_eq!(c.sandbox_mtu(), 9001 - 56);
        assert_eq!(c.api_socket_mode, 0o660);
        assert_eq!(c.policy_listen_addr().port(), 7171);
        assert_eq!(c.proxies.len(), 2);
        assert_eq!(c.job_prefix_len, 31);
    }

    #[test]
    fn unknown_field_is_named() {
        let err = parse(&format!("{MINIMAL}\njob_pol = \"10.0.0.0/8\"\n")).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("job_pol"), "{msg}");
        assert!(msg.contains("/etc/snas/agent.toml"), "{msg}");
    }

    #[test]
    fn missing_required_field_is_named() {
        let err = parse("underlay_interface = \"eth0\"\ntrust_bundle = \"/t\"\n").unwrap_err();
        assert!(err.to_string().contains("underlay_address"), "{err}");
    }

    #[test]
    fn wrong_type_is_named() {
        let err = parse(&format!("{MINIMAL}\nunderlay_mtu = \"big\"\n")).unwrap_err();
        assert!(err.to_string().contains("underlay_mtu"), "{err}");
        let err = parse(&format!("{MINIMAL}\njob_pool = \"10.0.0.300/16\"\n")).unwrap_err();
        assert!(err.to_string().contains("job_pool"), "{err}");
    }

    #[test]
    fn underlay_mtu_too_small_for_overlay_is_rejected() {
        let err = parse(&format!("{MINIMAL}\nunderlay_mtu = 1300\n")).unwrap_err();
        assert_eq!(err.field(), Some("underlay_mtu"));
        assert!(parse(&format!("{MINIMAL}\nunderlay_mtu = 1336\n")).is_ok());
    }

    #[test]
    fn job_prefix_len_other_than_30_or_31_is_rejected() {
        let err = parse(&format!("{MINIMAL}\njob_prefix_len = 29\n")).unwrap_err();
        assert_eq!(err.field(), Some("job_prefix_len"));
    }

    #[test]
    fn job_pool_with_host_bits_is_rejected() {
        let err = parse(&format!("{MINIMAL}\njob_pool = \"10.255.0.1/16\"\n")).unwrap_err();
        assert_eq!(err.field(), Some("job_pool"));
        assert!(err.to_string().contains("10.255.0.0/16"), "{err}");
    }

    #[test]
    fn world_accessible_socket_mode_is_rejected() {
        let err = parse(&format!("{MINIMAL}\napi_socket_mode = 0o666\n")).unwrap_err();
        assert_eq!(err.field(), Some("api_socket_mode"));
    }

    #[test]
    fn long_veth_prefix_is_rejected() {
        let err = parse(&format!("{MINIMAL}\nhost_veth_prefix = \"snashost\"\n")).unwrap_err();
        assert_eq!(err.field(), Some("host_veth_prefix"));
    }

    #[test]
    fn relative_state_dir_is_rejected() {
        let err = parse(&format!("{MINIMAL}\nstate_dir = \"state\"\n")).unwrap_err();
        assert_eq!(err.field(), Some("state_dir"));
    }

    #[test]
    fn unreadable_file_error_names_the_path() {
        let err = AgentConfig::from_toml_file(Path::new("/nonexistent/agent.toml")).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/agent.toml"), "{err}");
    }
}
