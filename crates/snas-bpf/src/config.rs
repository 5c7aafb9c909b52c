//! Typed configuration written into tier-1 maps and `.rodata`.
//!
//! Owns: the Rust view of node constants ([`NodeConfig`]), per-job values ([`JobConfig`]),
//! destination rules ([`PortRule`]) and proxies ([`ProxyEntry`]), and their conversion into the
//! BTF-generated C types. Units are carried by types (`Bps`, `Duration`).
#![forbid(unsafe_code)]

use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;
use std::time::Duration;

use crate::skel::types;

/// Bits per second.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Bps(pub u64);

/// Default EDT horizon: the queueing-delay budget of one job.
pub const DEFAULT_HORIZON: Duration = Duration::from_millis(20);

/// Default pin directory root; the node name is appended.
pub const DEFAULT_PIN_ROOT: &str = "/sys/fs/bpf/snas";

/// Per-node constants, fixed when the programs are loaded.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// Underlay interface: encapsulated packets leave here; its ingress program decapsulates.
    pub uplink_ifindex: u32,
    /// Attach the uplink program to `uplink_ifindex` at load (false in test-run tests).
    pub attach_uplink: bool,
    /// This node's underlay IPv4 address (outer source).
    pub node_ip: Ipv4Addr,
    /// Underlay L3 MTU; an encapsulated packet must fit.
    pub uplink_mtu: u32,
    /// Default EDT horizon for jobs that set none.
    pub horizon: Duration,
    /// GENEVE UDP port (6081).
    pub geneve_port: u16,
    /// Audit events per second per job.
    pub audit_per_sec: u32,
    /// bpffs directory holding this node's pinned maps and programs.
    pub pin_dir: PathBuf,
    /// Record redirect targets in the debug map (tests only).
    pub record_debug: bool,
}

impl NodeConfig {
    /// Defaults for a node: 6081, 20 ms horizon, 100 audit events/s, pins under
    /// `/sys/fs/bpf/snas/<node_name>`.
    pub fn new(node_name: &str, uplink_ifindex: u32, node_ip: Ipv4Addr, uplink_mtu: u32) -> Self {
        NodeConfig {
            uplink_ifindex,
            attach_uplink: true,
            node_ip,
            uplink_mtu,
            horizon: DEFAULT_HORIZON,
            geneve_port: 6081,
            audit_per_sec: 100,
            pin_dir: PathBuf::from(DEFAULT_PIN_ROOT).join(node_name),
            record_debug: false,
        }
    }
}

/// One job as tier 1 sees it, attached to the host side of its veth.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobConfig {
    /// Host-side veth ifindex (the attach point and the job's attribution key).
    pub veth_ifindex: u32,
    /// `snas_policy::identity::job_key(jti)`.
    pub job_key: u64,
    /// `snas_policy::identity::tenant_id(tenant)`.
    pub tenant_id: u32,
    /// Policy serial carried in the GENEVE option.
    pub policy_serial: u32,
    /// The sandbox's only allowed source address.
    pub sandbox_ip: Ipv4Addr,
    /// The sandbox's only allowed source MAC.
    pub sandbox_mac: [u8; 6],
    /// MAC of the host side of the veth (source of decapsulated frames).
    pub host_mac: [u8; 6],
    /// Gateway address; the job's DNS stub listens here.
    pub gateway_ip: Ipv4Addr,
    /// DNS stub UDP/TCP port.
    pub dns_port: u16,
    /// Egress rate for EDT stamping; `None` stamps nothing (and never drops for the horizon).
    pub egress: Option<Bps>,
    /// Ingress rate the node polices decapsulated traffic to (drop beyond the horizon), so
    /// that a job's downloads stay within its limit however many proxies carry them; `None`
    /// polices nothing.
    pub ingress: Option<Bps>,
    /// Horizon override; `None` takes the node default.
    pub horizon: Option<Duration>,
    /// New connections per second; 0 = no rate limit.
    pub new_conn_per_sec: u64,
    /// Burst of the new-connection bucket.
    pub new_conn_burst: u64,
    /// `max_connections` estimate limit; 0 = none.
    pub max_connections: u32,
    /// The policy has IPv6 rules. Together with `sandbox_ip6`, IPv6 from the sandbox goes
    /// through the IPv6 maps; otherwise every IPv6 frame is dropped as `ipv6_denied`.
    pub ipv6_rules: bool,
    /// The sandbox's only allowed IPv6 source (needed for IPv6 traffic).
    pub sandbox_ip6: Option<Ipv6Addr>,
}

impl JobConfig {
    pub(crate) fn to_c(&self) -> types::job_cfg {
        let mut c = types::job_cfg {
            job_key: self.job_key,
            tenant_id: self.tenant_id,
            policy_serial: self.policy_serial,
            sandbox_ip: u32::from_ne_bytes(self.sandbox_ip.octets()),
            gateway_ip: u32::from_ne_bytes(self.gateway_ip.octets()),
            sandbox_mac: self.sandbox_mac,
            host_mac: self.host_mac,
            dns_port: self.dns_port,
            flags: u16::from(self.ipv6_rules && self.sandbox_ip6.is_some()),
            sandbox_ip6: self.sandbox_ip6.map_or([0; 16], |a| a.octets()),
            ifindex: self.veth_ifindex,
            egress_bps: self.egress.map_or(0, |b| b.0),
            ingress_bps: self.ingress.map_or(0, |b| b.0),
            horizon_ns: self.horizon.map_or(0, saturating_ns),
            conn_rate: self.new_conn_per_sec,
            conn_burst: self.new_conn_burst,
            max_connections: self.max_connections,
            ..Default::default()
        };
        c._pad0 = 0;
        c
    }
}

pub(crate) fn saturating_ns(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// Transport protocol a rule applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Proto {
    /// TCP or UDP.
    Any,
    /// TCP only.
    Tcp,
    /// UDP only.
    Udp,
}

/// An allowed (protocol, inclusive port range).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PortRule {
    /// Protocol.
    pub proto: Proto,
    /// First port.
    pub lo: u16,
    /// Last port (inclusive).
    pub hi: u16,
}

impl PortRule {
    /// Every port of `proto`.
    pub fn all(proto: Proto) -> Self {
        PortRule {
            proto,
            lo: 0,
            hi: u16::MAX,
        }
    }

    /// A single port.
    pub fn port(proto: Proto, port: u16) -> Self {
        PortRule {
            proto,
            lo: port,
            hi: port,
        }
    }

    pub(crate) fn to_c(self) -> types::port_rule {
        types::port_rule {
            proto: match self.proto {
                Proto::Any => 0,
                Proto::Tcp => 6,
                Proto::Udp => 17,
            },
            lo: self.lo,
            hi: self.hi,
            ..Default::default()
        }
    }
}

/// Maximum port rules per destination entry (`MAX_PORT_RULES` in maps.h).
pub const MAX_PORT_RULES: usize = 8;

/// One proxy of the fleet. Its position in the slice given to `Tier1::set_proxies` is its
/// index; keep positions stable (mark a proxy dead instead of removing it) so that pinned
/// flows keep meaning the same proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProxyEntry {
    /// Underlay IPv4 address.
    pub ip: Ipv4Addr,
    /// Healthy: flows pinned to it stay on it. A dead proxy's flows are re-picked.
    pub alive: bool,
    /// Draining before maintenance: takes no new flows (left out of the Maglev table) but
    /// keeps the flows pinned to it while `alive`.
    pub draining: bool,
}

impl ProxyEntry {
    /// A healthy proxy that takes new flows.
    pub fn active(ip: std::net::Ipv4Addr) -> Self {
        ProxyEntry {
            ip,
            alive: true,
            draining: false,
        }
    }
}
