//! The fixed testbed topology: namespace and interface names, addresses, the DNS names table.
//!
//! Owns every constant other engineers configure agents and proxies against (see
//! `docs/testbed.md`). The only parameter is the prefix, so tests can build a second testbed
//! with unique names next to the default one.
//!
//! # Invariants
//! - A prefix is 1–10 characters of `[a-z0-9]`, so `<prefix>-` never is a prefix of another
//!   testbed's `<prefix2>-` (no `-` inside a prefix) and namespace names stay short.
//! - Interface names are fixed and short (`ul0`, `tr0`, `br0`, …): they live in separate
//!   namespaces, so they never clash between testbeds.
//! - Only documentation ranges are used (192.0.2.0/24, 198.51.100.0/24, 203.0.113.0/24,
//!   2001:db8::/32), plus the deliberately forbidden DNS answers 169.254.169.254 and 10.1.2.3,
//!   which are never configured on any interface.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;

/// The default prefix of `snas testbed`.
pub const DEFAULT_PREFIX: &str = "snastb";
/// Longest accepted prefix.
pub const MAX_PREFIX_LEN: usize = 10;
/// Number of nodes (agents).
pub const NODES: u8 = 2;
/// Number of proxies.
pub const PROXIES: u8 = 2;
/// Underlay MTU (the sandbox gets 56 bytes less).
pub const UNDERLAY_MTU: u32 = 1500;
/// Underlay network.
pub const UNDERLAY_NET: (Ipv4Addr, u8) = (Ipv4Addr::new(192, 0, 2, 0), 24);
/// The bridge in the underlay switch namespace.
pub const BRIDGE: &str = "br0";
/// Each member's underlay veth.
pub const UNDERLAY_IF: &str = "ul0";
/// Each proxy's transit veth toward the internet.
pub const TRANSIT_IF: &str = "tr0";
/// Device in the internet namespace holding the host and DNS addresses (`lo`: this kernel has
/// no dummy driver).
pub const HOSTS_IF: &str = "lo";
/// The TUN device each proxy creates for its egress pool.
pub const PROXY_TUN: &str = "snastun0";
/// Port where agents serve signed policies to proxies.
pub const AGENT_POLICY_PORT: u16 = 7070;
/// The proxies' job-identified DNS resolver port.
pub const PROXY_RESOLVER_PORT: u16 = 5353;
/// The proxies' management port (on loopback inside each proxy namespace) and service port
/// (on the underlay: health checks, peer bindings, job ends).
pub const PROXY_CONTROL_PORT: u16 = 9090;
/// Authoritative DNS server of the internet.
pub const DNS_SERVER: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 53);
/// The four internet hosts; each runs every service.
pub const HOSTS: [(&str, Ipv4Addr); 4] = [
    ("api.example.com", Ipv4Addr::new(203, 0, 113, 10)),
    ("blocked.example.com", Ipv4Addr::new(203, 0, 113, 20)),
    ("edge.example.net", Ipv4Addr::new(203, 0, 113, 30)),
    ("bulk.example.com", Ipv4Addr::new(203, 0, 113, 40)),
];
/// IPv6 address of the internet's AAAA test name (configured on the hosts device).
pub const HOST_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x10);
/// HTTP port of every host.
pub const HTTP_PORT: u16 = 80;
/// TCP and UDP echo port of every host.
pub const ECHO_PORT: u16 = 7;
/// TCP bulk source/sink port of every host.
pub const BULK_PORT: u16 = 5201;
/// Default TTL of the zone records.
pub const DEFAULT_TTL: u32 = 60;
/// Number of A records of `many.example.com` (too many for a 512-byte UDP answer).
pub const MANY_RECORDS: u8 = 40;

/// Errors about a testbed prefix.
#[derive(Debug, thiserror::Error)]
pub enum TopologyError {
    /// The prefix is empty, too long or has characters other than `[a-z0-9]`.
    #[error("testbed prefix `{0}` must be 1 to {MAX_PREFIX_LEN} characters of [a-z0-9]")]
    BadPrefix(String),
}

/// Role of a member namespace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Member {
    /// Node N (1-based): runs an agent.
    Node(u8),
    /// Proxy N (1-based): runs a proxy.
    Proxy(u8),
}

impl Member {
    /// Every member attached to the underlay, in order.
    pub fn all() -> Vec<Member> {
        let mut v: Vec<Member> = (1..=NODES).map(Member::Node).collect();
        v.extend((1..=PROXIES).map(Member::Proxy));
        v
    }

    /// Short tag: `n1`, `p2`. Also the bridge-port name in the underlay namespace.
    pub fn tag(self) -> String {
        match self {
            Member::Node(n) => format!("n{n}"),
            Member::Proxy(n) => format!("p{n}"),
        }
    }

    /// Underlay address.
    pub fn underlay_addr(self) -> Ipv4Addr {
        match self {
            Member::Node(n) => Ipv4Addr::new(192, 0, 2, 10 + n),
            Member::Proxy(n) => Ipv4Addr::new(192, 0, 2, 20 + n),
        }
    }
}

/// One DNS record of the internet zones.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ZoneData {
    /// IPv4 address.
    A(Ipv4Addr),
    /// IPv6 address.
    Aaaa(Ipv6Addr),
    /// Alias to another name.
    Cname(String),
}

/// A name, its TTL and its data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ZoneRecord {
    /// Fully qualified name without the trailing dot, lower case.
    pub name: String,
    /// Time to live.
    pub ttl: u32,
    /// Record data.
    pub data: ZoneData,
}

/// The zones served by the internet's authoritative DNS server.
pub const ZONES: [&str; 3] = ["example.com", "example.net", "example.org"];

/// The full DNS names table (also printed by `snas testbed status`).
pub fn zone_records() -> Vec<ZoneRecord> {
    let a = |name: &str, ttl: u32, ip: Ipv4Addr| ZoneRecord {
        name: name.to_owned(),
        ttl,
        data: ZoneData::A(ip),
    };
    let mut v = vec![
        a("api.example.com", DEFAULT_TTL, HOSTS[0].1),
        a("blocked.example.com", DEFAULT_TTL, HOSTS[1].1),
        ZoneRecord {
            name: "cdn.example.com".to_owned(),
            ttl: DEFAULT_TTL,
            data: ZoneData::Cname("edge.example.net".to_owned()),
        },
        a("edge.example.net", DEFAULT_TTL, HOSTS[2].1),
        a("bulk.example.com", DEFAULT_TTL, HOSTS[3].1),
        a("a.svc.example.com", DEFAULT_TTL, HOSTS[0].1),
        a("b.svc.example.com", DEFAULT_TTL, HOSTS[0].1),
        a("long-ttl.example.com", 86_400, HOSTS[0].1),
        a("short-ttl.example.com", 1, HOSTS[0].1),
        ZoneRecord {
            name: "v6.example.com".to_owned(),
            ttl: DEFAULT_TTL,
            data: ZoneData::Aaaa(HOST_V6),
        },
        a("dual.example.com", DEFAULT_TTL, HOSTS[0].1),
        ZoneRecord {
            name: "dual.example.com".to_owned(),
            ttl: DEFAULT_TTL,
            data: ZoneData::Aaaa(HOST_V6),
        },
        a(
            "metadata.example.com",
            DEFAULT_TTL,
            Ipv4Addr::new(169, 254, 169, 254),
        ),
        a(
            "private.example.com",
            DEFAULT_TTL,
            Ipv4Addr::new(10, 1, 2, 3),
        ),
        a("www.example.org", DEFAULT_TTL, HOSTS[0].1),
        ZoneRecord {
            name: "chain.example.org".to_owned(),
            ttl: DEFAULT_TTL,
            data: ZoneData::Cname("cdn.example.com".to_owned()),
        },
        a("ns.example.com", DEFAULT_TTL, DNS_SERVER),
    ];
    // 203.0.113.100.. : enough A records that the answer exceeds 512 bytes over UDP.
    for i in 0..MANY_RECORDS {
        v.push(a(
            "many.example.com",
            DEFAULT_TTL,
            Ipv4Addr::new(203, 0, 113, 100 + i),
        ));
    }
    v
}

/// Names and addresses of one testbed, derived from its prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topology {
    prefix: String,
}

impl Topology {
    /// The topology for `prefix` (validated).
    pub fn new(prefix: &str) -> Result<Topology, TopologyError> {
        if prefix.is_empty()
            || prefix.len() > MAX_PREFIX_LEN
            || !prefix
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        {
            return Err(TopologyError::BadPrefix(prefix.to_owned()));
        }
        Ok(Topology {
            prefix: prefix.to_owned(),
        })
    }

    /// The prefix.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Underlay switch namespace (holds the bridge).
    pub fn underlay_ns(&self) -> String {
        format!("{}-ul", self.prefix)
    }

    /// Internet namespace.
    pub fn inet_ns(&self) -> String {
        format!("{}-inet", self.prefix)
    }

    /// Namespace of a member.
    pub fn member_ns(&self, m: Member) -> String {
        format!("{}-{}", self.prefix, m.tag())
    }

    /// Namespace of node `n`.
    pub fn node_ns(&self, n: u8) -> String {
        self.member_ns(Member::Node(n))
    }

    /// Namespace of proxy `n`.
    pub fn proxy_ns(&self, n: u8) -> String {
        self.member_ns(Member::Proxy(n))
    }

    /// Every fixed namespace of the testbed, in creation order.
    pub fn namespaces(&self) -> Vec<String> {
        let mut v = vec![self.underlay_ns()];
        v.extend(Member::all().into_iter().map(|m| self.member_ns(m)));
        v.push(self.inet_ns());
        v
    }

    /// Prefix of the job namespaces that node `n`'s agent creates.
    pub fn job_netns_prefix(&self, n: u8) -> String {
        format!("{}-j{n}-", self.prefix)
    }

    /// Whether a namespace name belongs to this testbed (fixed or job namespace).
    pub fn owns_netns(&self, name: &str) -> bool {
        self.namespaces().iter().any(|n| n == name)
            || (1..=NODES).any(|n| name.starts_with(&self.job_netns_prefix(n)))
    }

    /// State directory: configs, pid files, logs, keys.
    pub fn state_dir(&self) -> PathBuf {
        PathBuf::from("/run/snas-testbed").join(&self.prefix)
    }

    /// Directory of trusted public keys (`*.pub`) given to agents and proxies.
    pub fn trust_dir(&self) -> PathBuf {
        self.state_dir().join("trust")
    }

    /// The proxies' `revocations_dir` (all proxies watch it): a signed revocation written here
    /// cuts the job off at the proxies alone, its agent is not told.
    pub fn proxy_revocations_dir(&self) -> PathBuf {
        self.state_dir().join("revocations").join("proxies")
    }

    /// The agents' `revocations_dir` (all agents watch it): a revocation written here tears
    /// the job down on its node. Write it into both directories to cut a job off everywhere.
    pub fn agent_revocations_dir(&self) -> PathBuf {
        self.state_dir().join("revocations").join("agents")
    }

    /// Directory of the generated signing key.
    pub fn key_dir(&self) -> PathBuf {
        self.state_dir().join("keys")
    }

    /// State directory of node `n`'s agent.
    pub fn node_dir(&self, n: u8) -> PathBuf {
        self.state_dir().join(format!("node-{n}"))
    }

    /// State directory of proxy `n`.
    pub fn proxy_dir(&self, n: u8) -> PathBuf {
        self.state_dir().join(format!("proxy-{n}"))
    }

    /// Directory of the internet services' log and pid file.
    pub fn inet_dir(&self) -> PathBuf {
        self.state_dir().join("inet")
    }

    /// Node `n`'s agent API socket.
    pub fn agent_socket(&self, n: u8) -> PathBuf {
        self.node_dir(n).join("agent.sock")
    }

    /// bpffs directory of node `n`'s tier-1 pins.
    pub fn bpf_pin_dir(&self, n: u8) -> PathBuf {
        PathBuf::from("/sys/fs/bpf").join(format!("snas-testbed-{}-n{n}", self.prefix))
    }

    /// Underlay address of node `n`.
    pub fn node_addr(&self, n: u8) -> Ipv4Addr {
        Member::Node(n).underlay_addr()
    }

    /// Underlay address of proxy `n`.
    pub fn proxy_addr(&self, n: u8) -> Ipv4Addr {
        Member::Proxy(n).underlay_addr()
    }

    /// Job pool of node `n`'s agent.
    pub fn job_pool(&self, n: u8) -> (Ipv4Addr, u8) {
        (Ipv4Addr::new(10, 255, n, 0), 24)
    }

    /// Transit link of proxy `n`: (internet side, proxy side), both /30.
    pub fn transit(&self, n: u8) -> (Ipv4Addr, Ipv4Addr) {
        let base = 4 * (n - 1);
        (
            Ipv4Addr::new(198, 51, 100, base + 1),
            Ipv4Addr::new(198, 51, 100, base + 2),
        )
    }

    /// Egress pool of proxy `n` (a /28).
    pub fn egress_pool(&self, n: u8) -> (Ipv4Addr, u8) {
        (Ipv4Addr::new(198, 51, 100, 64 + 16 * (n - 1)), 28)
    }

    /// IPv6 transit link of proxy `n` (a /64): (internet side, proxy side).
    pub fn transit6(&self, n: u8) -> (Ipv6Addr, Ipv6Addr) {
        let net = 0xff00 + u16::from(n);
        (
            Ipv6Addr::new(0x2001, 0xdb8, net, 0, 0, 0, 0, 1),
            Ipv6Addr::new(0x2001, 0xdb8, net, 0, 0, 0, 0, 2),
        )
    }

    /// IPv6 egress pool of proxy `n` (a /120: 255 addresses after the subnet-router anycast).
    pub fn egress_pool6(&self, n: u8) -> (Ipv6Addr, u8) {
        (
            Ipv6Addr::new(0x2001, 0xdb8, 0xe9, 0, 0, 0, 0, 0x100 * u16::from(n)),
            120,
        )
    }

    /// The proxy's job-identified resolver.
    pub fn proxy_resolver(&self, n: u8) -> SocketAddr {
        SocketAddr::new(IpAddr::V4(self.proxy_addr(n)), PROXY_RESOLVER_PORT)
    }

    /// The proxy's management endpoint (health, metrics, flows, drain): the proxy's default
    /// `127.0.0.1:9090`, reachable only from inside the proxy's namespace.
    pub fn proxy_control(&self, n: u8) -> SocketAddr {
        let _ = n;
        SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), PROXY_CONTROL_PORT)
    }

    /// The proxy's service endpoint on the underlay (agents' health checks, peer bindings, job
    /// ends): the proxy's default `<underlay>:9090`.
    pub fn proxy_service(&self, n: u8) -> SocketAddr {
        SocketAddr::new(IpAddr::V4(self.proxy_addr(n)), PROXY_CONTROL_PORT)
    }

    /// The internet's DNS server.
    pub fn dns_server(&self) -> SocketAddr {
        SocketAddr::new(IpAddr::V4(DNS_SERVER), 53)
    }

    /// The testbed's infrastructure, given to every agent and proxy as `infrastructure`: the
    /// underlay (nodes, proxies, their control, resolver and GENEVE ports), the transit links
    /// (the proxies' internet side and the gateways, IPv4 and IPv6), every egress pool (IPv4
    /// and IPv6), the proxies' upstream
    /// DNS server and every node's job pool (other sandboxes and their gateways). Jobs are
    /// refused these whatever their policy says.
    pub fn infrastructure(&self) -> Vec<ipnet::IpNet> {
        let v4 = |(a, len): (Ipv4Addr, u8)| {
            ipnet::IpNet::V4(ipnet::Ipv4Net::new(a, len).unwrap_or_default().trunc())
        };
        let mut out = vec![v4(UNDERLAY_NET)];
        for p in 1..=PROXIES {
            out.push(v4((self.transit(p).0, 30)));
            out.push(v4(self.egress_pool(p)));
        }
        out.push(v4((DNS_SERVER, 32)));
        out.push(v4((Ipv4Addr::new(10, 255, 0, 0), 16)));
        let v6 = |(a, len): (Ipv6Addr, u8)| {
            ipnet::IpNet::V6(ipnet::Ipv6Net::new(a, len).unwrap_or_default().trunc())
        };
        for p in 1..=PROXIES {
            out.push(v6((self.transit6(p).0, 64)));
            out.push(v6(self.egress_pool6(p)));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_with_dash_or_upper_case_is_rejected() {
        assert!(Topology::new("snas-tb").is_err());
        assert!(Topology::new("SNAS").is_err());
        assert!(Topology::new("").is_err());
        assert!(Topology::new("abcdefghijk").is_err());
        assert!(Topology::new("snastb1a2b").is_ok());
    }

    #[test]
    fn job_namespaces_of_another_prefix_are_not_owned() {
        let a = Topology::new("snastb").unwrap();
        let b = Topology::new("snastbab12").unwrap();
        assert!(a.owns_netns("snastb-j1-0011aabb"));
        assert!(a.owns_netns("snastb-inet"));
        assert!(!a.owns_netns("snastbab12-inet"));
        assert!(!a.owns_netns("snastbab12-j1-0011aabb"));
        assert!(b.owns_netns("snastbab12-n2"));
    }

    #[test]
    fn addresses_follow_the_documented_plan() {
        let t = Topology::new("snastb").unwrap();
        assert_eq!(t.node_addr(2), Ipv4Addr::new(192, 0, 2, 12));
        assert_eq!(t.proxy_addr(1), Ipv4Addr::new(192, 0, 2, 21));
        assert_eq!(
            t.transit(2),
            (
                Ipv4Addr::new(198, 51, 100, 5),
                Ipv4Addr::new(198, 51, 100, 6)
            )
        );
        assert_eq!(t.egress_pool(2), (Ipv4Addr::new(198, 51, 100, 80), 28));
        let infra: Vec<String> = t.infrastructure().iter().map(|n| n.to_string()).collect();
        assert_eq!(
            infra,
            [
                "192.0.2.0/24",
                "198.51.100.0/30",
                "198.51.100.64/28",
                "198.51.100.4/30",
                "198.51.100.80/28",
                "203.0.113.53/32",
                "10.255.0.0/16",
                "2001:db8:ff01::/64",
                "2001:db8:e9::100/120",
                "2001:db8:ff02::/64",
                "2001:db8:e9::200/120"
            ]
        );
    }

    #[test]
    fn many_example_com_does_not_fit_a_512_byte_answer() {
        let n = zone_records()
            .iter()
            .filter(|r| r.name == "many.example.com")
            .count();
        // 12 header + question ~34 + 16 bytes per compressed A record.
        assert!(12 + 34 + 16 * n > 512, "{n} records fit in 512 bytes");
    }
}
