//! The always-denied address ranges (ARCHITECTURE.md §1).
//!
//! # Invariants
//! - An address in one of these ranges is denied unless a `cidr` rule with `allow_private = true`
//!   covers it. Deployment-specific ranges (overlay, underlay, the node, other sandboxes) are not
//!   known here; the agent and proxy pass them to [`crate::matcher::compile_with`] as
//!   infrastructure ranges, which no rule can open.
//! - The documentation ranges (192.0.2.0/24, 198.51.100.0/24, 203.0.113.0/24, 2001:db8::/32) are
//!   deliberately *not* listed: the testbed uses them as "the internet".
//! - IPv6 `::/8` covers `::1`, `::`, IPv4-mapped (`::ffff:0:0/96`) and IPv4-compatible addresses,
//!   so no IPv4 range can be reached through an IPv6 spelling.

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// One always-denied range with a short label for explanations and audit events.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeniedRange {
    /// The range.
    pub net: IpNet,
    /// What it is, e.g. `"private (RFC 1918)"`.
    pub label: &'static str,
}

const fn v4(a: u8, b: u8, c: u8, d: u8, len: u8, label: &'static str) -> DeniedRange {
    let net = match Ipv4Net::new(Ipv4Addr::new(a, b, c, d), len) {
        Ok(n) => n,
        Err(_) => panic!("bad constant prefix"),
    };
    DeniedRange {
        net: IpNet::V4(net),
        label,
    }
}

const fn v6(segs: [u16; 8], len: u8, label: &'static str) -> DeniedRange {
    let a = Ipv6Addr::new(
        segs[0], segs[1], segs[2], segs[3], segs[4], segs[5], segs[6], segs[7],
    );
    let net = match Ipv6Net::new(a, len) {
        Ok(n) => n,
        Err(_) => panic!("bad constant prefix"),
    };
    DeniedRange {
        net: IpNet::V6(net),
        label,
    }
}

/// Every always-denied range, IPv4 first.
pub const ALWAYS_DENIED: &[DeniedRange] = &[
    v4(0, 0, 0, 0, 8, "\"this network\" (0.0.0.0/8)"),
    v4(10, 0, 0, 0, 8, "private (RFC 1918)"),
    v4(100, 64, 0, 0, 10, "CGNAT (RFC 6598)"),
    v4(127, 0, 0, 0, 8, "loopback"),
    v4(169, 254, 0, 0, 16, "link-local / cloud metadata"),
    v4(172, 16, 0, 0, 12, "private (RFC 1918)"),
    v4(192, 0, 0, 0, 24, "IETF protocol assignments"),
    v4(192, 88, 99, 0, 24, "6to4 relay anycast"),
    v4(192, 168, 0, 0, 16, "private (RFC 1918)"),
    v4(198, 18, 0, 0, 15, "benchmarking (RFC 2544)"),
    v4(224, 0, 0, 0, 4, "multicast"),
    v4(240, 0, 0, 0, 4, "reserved / broadcast"),
    v6([0, 0, 0, 0, 0, 0, 0, 1], 128, "loopback"),
    v6(
        [0, 0, 0, 0, 0, 0, 0, 0],
        8,
        "reserved (unspecified, IPv4-mapped/compatible)",
    ),
    v6([0x64, 0xff9b, 1, 0, 0, 0, 0, 0], 48, "local-use NAT64"),
    v6([0x100, 0, 0, 0, 0, 0, 0, 0], 64, "discard-only"),
    v6(
        [0x2001, 0, 0, 0, 0, 0, 0, 0],
        23,
        "IETF protocol assignments (incl. Teredo)",
    ),
    v6([0x2002, 0, 0, 0, 0, 0, 0, 0], 16, "6to4"),
    v6([0xfc00, 0, 0, 0, 0, 0, 0, 0], 7, "unique local (private)"),
    v6([0xfe80, 0, 0, 0, 0, 0, 0, 0], 10, "link-local"),
    v6([0xfec0, 0, 0, 0, 0, 0, 0, 0], 10, "site-local (deprecated)"),
    v6([0xff00, 0, 0, 0, 0, 0, 0, 0], 8, "multicast"),
];

/// The always-denied range containing `ip`, if any (the most specific one).
pub fn always_denied(ip: IpAddr) -> Option<&'static DeniedRange> {
    ALWAYS_DENIED
        .iter()
        .filter(|r| r.net.contains(&ip))
        .max_by_key(|r| r.net.prefix_len())
}

/// The first always-denied range that overlaps `net` at all.
pub fn overlapping(net: &IpNet) -> Option<&'static DeniedRange> {
    ALWAYS_DENIED
        .iter()
        .find(|r| r.net.contains(net) || net.contains(&r.net))
}

/// The always-denied range that contains all of `net`, if any.
pub fn containing(net: &IpNet) -> Option<&'static DeniedRange> {
    ALWAYS_DENIED.iter().find(|r| r.net.contains(net))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    #[test]
    fn private_loopback_metadata_and_mapped_are_denied() {
        for a in [
            "10.1.2.3",
            "172.16.0.1",
            "172.31.255.255",
            "192.168.1.1",
            "127.0.0.1",
            "169.254.169.254",
            "100.64.0.1",
            "100.127.255.255",
            "224.0.0.1",
            "255.255.255.255",
            "0.0.0.0",
            "::1",
            "::",
            "::ffff:10.0.0.1",
            "::ffff:8.8.8.8",
            "fe80::1",
            "fd00::1",
            "ff02::1",
            "2002:c000:0201::1",
            "2001:0:1::1",
        ] {
            assert!(
                always_denied(ip(a)).is_some(),
                "{a} should be always denied"
            );
        }
    }

    #[test]
    fn documentation_and_public_ranges_are_not_denied() {
        for a in [
            "192.0.2.1",
            "198.51.100.7",
            "203.0.113.9",
            "2001:db8::1",
            "8.8.8.8",
            "172.32.0.1",
            "100.128.0.1",
            "2606:4700::1",
        ] {
            assert!(
                always_denied(ip(a)).is_none(),
                "{a} should not be always denied"
            );
        }
    }

    #[test]
    fn most_specific_label_wins() {
        assert_eq!(always_denied(ip("::1")).map(|r| r.label), Some("loopback"));
    }
}
