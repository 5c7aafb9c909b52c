//! The infrastructure set: addresses no job may reach through this proxy, whatever its policy
//! says (issue 11: a validly signed `0.0.0.0/0` policy must not open the proxies' own ports).
//!
//! # What it owns
//! A set of IPv4/IPv6 prefixes, aggregated (overlaps and neighbours merged), and the membership
//! test tier 2 runs on every new flow before any rule of the policy is consulted (so no rule,
//! `allow_private` included, can open it). The set itself comes from configuration
//! ([`crate::config::ProxyConfig::infrastructure_set`]: the configured `infrastructure` prefixes
//! plus everything the proxy knows about itself); [`crate::tier2::Tier2`] adds what the engine
//! knows (its underlay address, its nodes, its egress addresses) so a caller cannot forget them.
//!
//! # Invariants
//! - An address is infrastructure when a prefix of the set contains it, or when it is an IPv6
//!   address that embeds an infrastructure IPv4 address a translator could deliver to: IPv4-mapped
//!   (`::ffff:a.b.c.d`) and the NAT64 well-known prefix (`64:ff9b::a.b.c.d`, RFC 6052).
//! - Lookup cost: one hash probe per distinct prefix length present (at most 33 for IPv4, 129 for
//!   IPv6); no allocation.
//!
//! # Limits
//! Only the well-known NAT64 prefix is decoded; a fleet with a network-specific NAT64 prefix
//! lists that prefix's translations of its infrastructure itself.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

/// Cloud metadata endpoints, always infrastructure: AWS/GCP/Azure/OpenStack's 169.254.169.254
/// and AWS's IPv6 endpoint.
pub const METADATA: [IpNet; 2] = [
    IpNet::V4(Ipv4Net::new_assert(Ipv4Addr::new(169, 254, 169, 254), 32)),
    IpNet::V6(Ipv6Net::new_assert(
        Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254),
        128,
    )),
];

/// The NAT64 well-known prefix (RFC 6052), `64:ff9b::/96`.
const NAT64_WKP: u128 = 0x0064_ff9b_0000_0000_0000_0000_0000_0000;

/// A host prefix (/32 or /128) of `ip`.
pub fn host(ip: IpAddr) -> IpNet {
    IpNet::from(ip)
}

/// A set of prefixes with a fast membership test. See the module documentation.
#[derive(Debug, Clone, Default)]
pub struct InfraSet {
    nets: Vec<IpNet>,
    v4: Vec<(u8, HashSet<u32>)>,
    v6: Vec<(u8, HashSet<u128>)>,
}

fn mask4(len: u8) -> u32 {
    u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0)
}

fn mask6(len: u8) -> u128 {
    u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0)
}

impl InfraSet {
    /// The set of `nets` (host bits ignored, overlaps merged).
    pub fn new<'a>(nets: impl IntoIterator<Item = &'a IpNet>) -> InfraSet {
        let nets: Vec<IpNet> = nets.into_iter().map(IpNet::trunc).collect();
        let nets = IpNet::aggregate(&nets);
        let mut v4: HashMap<u8, HashSet<u32>> = HashMap::new();
        let mut v6: HashMap<u8, HashSet<u128>> = HashMap::new();
        for n in &nets {
            match n {
                IpNet::V4(n) => {
                    v4.entry(n.prefix_len())
                        .or_default()
                        .insert(u32::from(n.network()));
                }
                IpNet::V6(n) => {
                    v6.entry(n.prefix_len())
                        .or_default()
                        .insert(u128::from(n.network()));
                }
            }
        }
        let mut v4: Vec<_> = v4.into_iter().collect();
        let mut v6: Vec<_> = v6.into_iter().collect();
        // Longest first: the common hit (a host address) is found at the first probe.
        v4.sort_unstable_by_key(|e| std::cmp::Reverse(e.0));
        v6.sort_unstable_by_key(|e| std::cmp::Reverse(e.0));
        InfraSet { nets, v4, v6 }
    }

    /// The aggregated prefixes.
    pub fn nets(&self) -> &[IpNet] {
        &self.nets
    }

    /// The aggregated IPv4 prefixes.
    pub fn v4_nets(&self) -> impl Iterator<Item = Ipv4Net> + '_ {
        self.nets.iter().filter_map(|n| match n {
            IpNet::V4(n) => Some(*n),
            IpNet::V6(_) => None,
        })
    }

    /// The aggregated IPv6 prefixes.
    pub fn v6_nets(&self) -> impl Iterator<Item = Ipv6Net> + '_ {
        self.nets.iter().filter_map(|n| match n {
            IpNet::V6(n) => Some(*n),
            IpNet::V4(_) => None,
        })
    }

    /// Whether the set is empty.
    pub fn is_empty(&self) -> bool {
        self.nets.is_empty()
    }

    fn contains_v4(&self, a: Ipv4Addr) -> bool {
        let a = u32::from(a);
        self.v4
            .iter()
            .any(|(len, set)| set.contains(&(a & mask4(*len))))
    }

    /// Whether `ip` is infrastructure (see the module invariants).
    pub fn contains(&self, ip: IpAddr) -> bool {
        match ip {
            IpAddr::V4(a) => self.contains_v4(a),
            IpAddr::V6(a) => {
                let bits = u128::from(a);
                if self
                    .v6
                    .iter()
                    .any(|(len, set)| set.contains(&(bits & mask6(*len))))
                {
                    return true;
                }
                let embedded = match a.to_ipv4_mapped() {
                    Some(v4) => Some(v4),
                    None if bits & mask6(96) == NAT64_WKP => Some(Ipv4Addr::from(bits as u32)),
                    None => None,
                };
                embedded.is_some_and(|v4| self.contains_v4(v4))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(nets: &[&str]) -> InfraSet {
        let nets: Vec<IpNet> = nets.iter().map(|n| n.parse().unwrap()).collect();
        InfraSet::new(&nets)
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn prefixes_and_hosts_match_their_addresses_only() {
        let s = set(&["192.0.2.0/24", "198.51.100.7/32", "2001:db8:1::/48"]);
        assert!(s.contains(ip("192.0.2.0")));
        assert!(s.contains(ip("192.0.2.255")));
        assert!(s.contains(ip("198.51.100.7")));
        assert!(!s.contains(ip("198.51.100.8")));
        assert!(!s.contains(ip("203.0.113.1")));
        assert!(s.contains(ip("2001:db8:1:ffff::1")));
        assert!(!s.contains(ip("2001:db8:2::1")));
    }

    #[test]
    fn ipv4_infrastructure_embedded_in_ipv6_is_infrastructure() {
        let s = set(&["192.0.2.21/32"]);
        assert!(s.contains(ip("::ffff:192.0.2.21")));
        assert!(s.contains(ip("64:ff9b::192.0.2.21")));
        assert!(!s.contains(ip("64:ff9b::192.0.2.22")));
        assert!(!s.contains(ip("64:ff9b:1::192.0.2.21")));
    }

    #[test]
    fn overlapping_prefixes_are_aggregated_and_host_bits_ignored() {
        let s = set(&[
            "192.0.2.21/24",
            "192.0.2.0/25",
            "192.0.3.0/24",
            "169.254.169.254/32",
        ]);
        let v4: Vec<String> = s.v4_nets().map(|n| n.to_string()).collect();
        assert_eq!(v4, ["169.254.169.254/32", "192.0.2.0/23"]);
    }

    #[test]
    fn metadata_endpoints_are_the_documented_ones() {
        let s = InfraSet::new(&METADATA);
        assert!(s.contains(ip("169.254.169.254")));
        assert!(s.contains(ip("fd00:ec2::254")));
        assert!(!s.contains(ip("169.254.169.253")));
    }

    #[test]
    fn the_empty_set_contains_nothing() {
        let s = InfraSet::default();
        assert!(s.is_empty());
        assert!(!s.contains(ip("0.0.0.0")));
        assert!(!s.contains(ip("::ffff:0.0.0.0")));
    }
}
