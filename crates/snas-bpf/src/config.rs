//! Typed configuration written into tier-1 maps and `.rodata`.
//!
//! Owns: the Rust view of node constants ([`NodeConfig`]), per-job values ([`JobConfig`]),
//! destination rules ([`PortRule`]) and proxies ([`ProxyEntry`]), and their conversion into the
//! BTF-generated C types. Units and identities are carried by types (the workspace's
//! [`Bps`], [`JobKey`], [`PolicySerial`], [`RuleProtocol`] from `snas_wire::types`; `Duration`,
//! [`PacketBudget`], `SystemTime`).
//!
//! # C encodings
//! The C structs use 0 for "none" where Rust has an `Option`: an absent rate (`egress_bps`,
//! `ingress_bps` = 0: not stamped / not policed), horizon, expiry, DNS budget, and a rule
//! protocol of `any` (`port_rule.proto` = 0; otherwise the IP protocol number). The conversions
//! below are the only place these zeros are written or read.
#![forbid(unsafe_code)]

use std::net::{Ipv4Addr, Ipv6Addr};
use std::num::NonZeroU32;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use crate::skel::types;
use snas_wire::L4Proto;

pub use snas_wire::{Bps, JobKey, PolicySerial, RuleProtocol, TenantId};

/// A token bucket of packets: `per_sec` tokens a second, at most `burst` saved up. Both are at
/// least one; "no limit" is the absence of a budget (`Option<PacketBudget>::None`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PacketBudget {
    /// Packets per second.
    pub per_sec: NonZeroU32,
    /// Packets that may be sent at once after a quiet spell.
    pub burst: NonZeroU32,
}

impl PacketBudget {
    /// A budget of `per_sec` packets a second with a burst of `burst`; `None` if either is 0.
    pub fn new(per_sec: u32, burst: u32) -> Option<PacketBudget> {
        Some(PacketBudget {
            per_sec: NonZeroU32::new(per_sec)?,
            burst: NonZeroU32::new(burst)?,
        })
    }
}

/// Default ICMP unreachable budget per job: 100 a second, burst 200.
pub const DEFAULT_ICMP_BUDGET: PacketBudget = PacketBudget {
    per_sec: NonZeroU32::MIN.saturating_add(99),
    burst: NonZeroU32::MIN.saturating_add(199),
};

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
    /// GENEVE UDP port ([`snas_wire::geneve::GENEVE_PORT`], 6081).
    pub geneve_port: u16,
    /// Audit events per second per job.
    pub audit_per_sec: u32,
    /// ICMP/ICMPv6 unreachable messages per job for denied UDP (a bucket per job at this
    /// rate); beyond it a denied datagram is only dropped and counted.
    pub icmp_budget: PacketBudget,
    /// bpffs directory holding this node's pinned maps and programs.
    pub pin_dir: PathBuf,
    /// Record redirect targets in the debug map (tests only).
    pub record_debug: bool,
}

impl NodeConfig {
    /// Defaults for a node: 6081, 20 ms horizon, 100 audit events/s, ICMP unreachables at
    /// 100/s burst 200 per job, pins under `/sys/fs/bpf/snas/<node_name>`.
    pub fn new(node_name: &str, uplink_ifindex: u32, node_ip: Ipv4Addr, uplink_mtu: u32) -> Self {
        NodeConfig {
            uplink_ifindex,
            attach_uplink: true,
            node_ip,
            uplink_mtu,
            horizon: DEFAULT_HORIZON,
            geneve_port: snas_wire::geneve::GENEVE_PORT,
            audit_per_sec: 100,
            icmp_budget: DEFAULT_ICMP_BUDGET,
            pin_dir: PathBuf::from(DEFAULT_PIN_ROOT).join(node_name),
            record_debug: false,
        }
    }
}

/// One job as tier 1 sees it, attached to the host side of its veth.
///
/// [`JobConfig::default`] is a job with no identity and no limits (every `Option` `None`,
/// every rate 0); fill in at least the identity, addresses and MACs:
/// `JobConfig { veth_ifindex, job_key, .., ..JobConfig::default() }`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobConfig {
    /// Host-side veth ifindex (the attach point and the job's attribution key).
    pub veth_ifindex: u32,
    /// `snas_policy::identity::job_key(jti)`.
    pub job_key: JobKey,
    /// `snas_policy::identity::tenant_id(tenant)`.
    pub tenant_id: TenantId,
    /// Policy serial carried in the GENEVE option.
    pub policy_serial: PolicySerial,
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
    /// The policy's expiry (`exp`). From then on every packet the sandbox sends (but ARP and
    /// neighbour discovery) is refused as `policy_expired`. Converted to the monotonic clock
    /// of the programs when the job is configured or adopted; `None`: never.
    pub expires_at: Option<SystemTime>,
    /// Budget of DNS packets the job may send to its stub (UDP and TCP, taken before the
    /// capture rewrite); beyond it packets are dropped as `dns_rate`. `None`: not limited in
    /// tier 1.
    pub dns_budget: Option<PacketBudget>,
    /// The policy's mode is `audit`: a destination denied only because no rule allows it
    /// (`destination_denied`, `port_denied`) passes, audited [`crate::AuditKind::WouldDeny`] on
    /// its flow's first packet; infrastructure, always-denied ranges and deny rules stay
    /// denied (`JOB_F_AUDIT` in maps.h).
    pub audit_mode: bool,
}

impl Default for JobConfig {
    fn default() -> Self {
        JobConfig {
            veth_ifindex: 0,
            job_key: JobKey(0),
            tenant_id: snas_wire::TenantId(0),
            policy_serial: PolicySerial(0),
            sandbox_ip: Ipv4Addr::UNSPECIFIED,
            sandbox_mac: [0; 6],
            host_mac: [0; 6],
            gateway_ip: Ipv4Addr::UNSPECIFIED,
            dns_port: 53,
            egress: None,
            ingress: None,
            horizon: None,
            new_conn_per_sec: 0,
            new_conn_burst: 0,
            max_connections: 0,
            ipv6_rules: false,
            sandbox_ip6: None,
            expires_at: None,
            dns_budget: None,
            audit_mode: false,
        }
    }
}

/// One reading of both clocks, to move a wall-clock instant into the monotonic domain of
/// `bpf_ktime_get_ns`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Clocks {
    /// `SystemTime::now()`.
    pub wall: SystemTime,
    /// CLOCK_MONOTONIC at (about) the same instant.
    pub mono: Duration,
}

impl Clocks {
    /// `at` in CLOCK_MONOTONIC nanoseconds; an instant already past maps to `mono` itself
    /// (at least 1, because 0 means "no expiry" to the programs).
    pub fn mono_ns_of(&self, at: SystemTime) -> u64 {
        let ahead = at.duration_since(self.wall).unwrap_or(Duration::ZERO);
        saturating_ns(self.mono.saturating_add(ahead)).max(1)
    }
}

impl JobConfig {
    pub(crate) fn to_c(&self, clocks: &Clocks) -> types::job_cfg {
        let mut c = types::job_cfg {
            job_key: self.job_key.get(),
            tenant_id: self.tenant_id.get(),
            policy_serial: self.policy_serial.get(),
            sandbox_ip: u32::from_ne_bytes(self.sandbox_ip.octets()),
            gateway_ip: u32::from_ne_bytes(self.gateway_ip.octets()),
            sandbox_mac: self.sandbox_mac,
            host_mac: self.host_mac,
            dns_port: self.dns_port,
            flags: u16::from(self.ipv6_rules && self.sandbox_ip6.is_some())
                | if self.audit_mode { JOB_F_AUDIT } else { 0 },
            sandbox_ip6: self.sandbox_ip6.map_or([0; 16], |a| a.octets()),
            ifindex: self.veth_ifindex,
            egress_bps: self.egress.map_or(0, Bps::get),
            ingress_bps: self.ingress.map_or(0, Bps::get),
            horizon_ns: self.horizon.map_or(0, saturating_ns),
            conn_rate: self.new_conn_per_sec,
            conn_burst: self.new_conn_burst,
            max_connections: self.max_connections,
            expires_ns: self.expires_at.map_or(0, |at| clocks.mono_ns_of(at)),
            dns_rate: self.dns_budget.map_or(0, |b| b.per_sec.get()),
            dns_burst: self.dns_budget.map_or(0, |b| b.burst.get()),
            ..Default::default()
        };
        c._pad0 = 0;
        c
    }
}

pub(crate) fn saturating_ns(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// An allowed (protocol, inclusive port range).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PortRule {
    /// The transports the rule allows.
    pub proto: RuleProtocol,
    /// First port.
    pub lo: u16,
    /// Last port (inclusive).
    pub hi: u16,
}

impl PortRule {
    /// Every port of `proto`.
    pub fn all(proto: RuleProtocol) -> Self {
        PortRule {
            proto,
            lo: 0,
            hi: u16::MAX,
        }
    }

    /// A single port.
    pub fn port(proto: RuleProtocol, port: u16) -> Self {
        PortRule {
            proto,
            lo: port,
            hi: port,
        }
    }

    /// The C rule, valid until `expires_s` (whole CLOCK_MONOTONIC seconds; `None`: always).
    pub(crate) fn to_c(self, expires_s: Option<u32>) -> types::port_rule {
        types::port_rule {
            proto: match self.proto {
                RuleProtocol::Any => 0,
                RuleProtocol::Tcp => L4Proto::Tcp.number(),
                RuleProtocol::Udp => L4Proto::Udp.number(),
            },
            lo: self.lo,
            hi: self.hi,
            expires_s: expires_s.unwrap_or(0),
            ..Default::default()
        }
    }

    /// The Rust rule of a C rule and its expiry.
    pub(crate) fn from_c(c: &types::port_rule) -> (PortRule, Option<u32>) {
        let proto = match L4Proto::from_number(c.proto) {
            Some(L4Proto::Tcp) => RuleProtocol::Tcp,
            Some(L4Proto::Udp) => RuleProtocol::Udp,
            _ => RuleProtocol::Any,
        };
        let expires = (c.expires_s != 0).then_some(c.expires_s);
        (
            PortRule {
                proto,
                lo: c.lo,
                hi: c.hi,
            },
            expires,
        )
    }
}

/// `JOB_F_AUDIT` in maps.h (checked by `tests/c_constants.rs`).
pub const JOB_F_AUDIT: u16 = 4;

/// Maximum port rules per destination entry (`MAX_PORT_RULES` in maps.h): the union of every
/// allowed name's rules on one address.
pub const MAX_PORT_RULES: usize = 16;

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

#[cfg(test)]
mod tests {
    use super::*;

    fn clocks() -> Clocks {
        Clocks {
            wall: SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000),
            mono: Duration::from_secs(5_000),
        }
    }

    #[test]
    fn a_future_expiry_moves_into_the_monotonic_domain() {
        let c = clocks();
        let at = c.wall + Duration::from_millis(90_500);
        assert_eq!(c.mono_ns_of(at), 5_090_500_000_000);
    }

    #[test]
    fn a_past_expiry_is_already_reached_and_never_zero() {
        let c = clocks();
        assert_eq!(
            c.mono_ns_of(c.wall - Duration::from_secs(60)),
            5_000_000_000_000
        );
        let boot = Clocks {
            mono: Duration::ZERO,
            ..c
        };
        assert_eq!(boot.mono_ns_of(c.wall), 1, "0 would mean no expiry");
    }

    #[test]
    fn job_config_carries_expiry_and_dns_budget_into_c() {
        let c = clocks();
        let j = JobConfig {
            expires_at: Some(c.wall + Duration::from_secs(10)),
            dns_budget: PacketBudget::new(500, 1000),
            ..JobConfig::default()
        };
        let cfg = j.to_c(&c);
        assert_eq!(cfg.expires_ns, 5_010_000_000_000);
        assert_eq!((cfg.dns_rate, cfg.dns_burst), (500, 1000));
        let none = JobConfig::default().to_c(&c);
        assert_eq!((none.expires_ns, none.dns_rate, none.dns_burst), (0, 0, 0));
    }

    #[test]
    fn a_packet_budget_is_never_zero() {
        assert!(PacketBudget::new(0, 10).is_none());
        assert!(PacketBudget::new(10, 0).is_none());
        assert_eq!(
            PacketBudget::new(100, 200),
            Some(DEFAULT_ICMP_BUDGET),
            "the default is 100/s burst 200"
        );
    }

    #[test]
    fn port_rules_round_trip_through_c_with_their_expiry() {
        for (r, e) in [
            (PortRule::port(RuleProtocol::Tcp, 443), Some(77)),
            (PortRule::all(RuleProtocol::Any), None),
            (
                PortRule {
                    proto: RuleProtocol::Udp,
                    lo: 4000,
                    hi: 4999,
                },
                Some(1),
            ),
        ] {
            assert_eq!(PortRule::from_c(&r.to_c(e)), (r, e));
        }
    }

    #[test]
    fn audit_mode_sets_its_flag_beside_the_ipv6_flag() {
        let c = clocks();
        let j = JobConfig {
            audit_mode: true,
            ..JobConfig::default()
        };
        assert_eq!(j.to_c(&c).flags, JOB_F_AUDIT);
        let both = JobConfig {
            ipv6_rules: true,
            sandbox_ip6: Some(Ipv6Addr::LOCALHOST),
            ..j
        };
        assert_eq!(both.to_c(&c).flags, JOB_F_AUDIT | 1);
        assert_eq!(JobConfig::default().to_c(&c).flags, 0);
    }
}
