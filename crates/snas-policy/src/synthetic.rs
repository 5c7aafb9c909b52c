//! A synthetic 10,000-rule policy and lookup probes for benchmarks (not part of the API).
//!
//! Owns the one definition of the benchmark policy, so the criterion bench
//! (`benches/matcher.rs`) and the scale scenario of `snas-bench` time the same thing.
//! Invariants: [`mixed_rules`] is deterministic, and each probe constant below hits or misses as
//! its name says (checked by the tests at the end of this file).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::rules::{EgressRule, RuleError, RuleFields};

/// Rules in [`mixed_rules`].
pub const RULES: usize = 10_000;
/// An exact-name rule of [`mixed_rules`] (port 443).
pub const EXACT_HIT: &str = "api1234.svc70.example.com";
/// [`EXACT_HIT`] as a sandbox may spell it (case, trailing dot).
pub const EXACT_HIT_MIXED_CASE: &str = "API1234.Svc70.Example.com.";
/// Matches the wildcard `api-*.z777.example.net` (any port).
pub const WILDCARD_HIT: &str = "api-eu.z777.example.net";
/// Matches no rule.
pub const NAME_MISS: &str = "www.not-in-policy.example.io";
/// Inside the /24 `11.0.201.0` (port 443; rule 6,201).
pub const CIDR_V4_HIT: IpAddr = IpAddr::V4(Ipv4Addr::new(11, 0, 201, 9));
/// Outside every IPv4 rule.
pub const CIDR_V4_MISS: IpAddr = IpAddr::V4(Ipv4Addr::new(198, 51, 100, 77));
/// Inside the /64 `2001:db8:0:1f4::` (any port).
pub const CIDR_V6_HIT: IpAddr = IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0x1f4, 0, 0, 0, 1));
/// Cloud metadata: always denied whatever the rules say.
pub const ALWAYS_DENIED: IpAddr = IpAddr::V4(Ipv4Addr::new(169, 254, 169, 254));

/// 4,000 exact names, 2,000 wildcards, 3,000 IPv4 CIDRs (/16, /24, /32), 1,000 IPv6 CIDRs.
pub fn mixed_rules() -> Result<Vec<EgressRule>, RuleError> {
    let mut out = Vec::with_capacity(RULES);
    let rule = |h: Option<&str>, c: Option<&str>, p: Option<&str>| {
        EgressRule::from_fields(RuleFields {
            host: h,
            cidr: c,
            ports: p,
            ..RuleFields::default()
        })
    };
    for i in 0..4_000 {
        let host = format!("api{i}.svc{}.example.com:443", i % 97);
        out.push(rule(Some(&host), None, None)?);
    }
    for i in 0..1_000 {
        out.push(rule(Some(&format!("*.w{i}.example.org")), None, None)?);
        out.push(rule(
            Some(&format!("api-*.z{i}.example.net:0")),
            None,
            None,
        )?);
    }
    for i in 0u32..3_000 {
        let (net, len) = match i % 3 {
            0 => (0x0B00_0000 + (i << 8), 24),
            1 => (0x0C00_0000 + i, 32),
            _ => (0x0D00_0000 + ((i & 0xff) << 16), 16),
        };
        let cidr = format!("{}/{len}", Ipv4Addr::from(net));
        out.push(rule(None, Some(&cidr), Some("443"))?);
    }
    for i in 0u128..1_000 {
        let a = (0x2001_0db8u128 << 96) | (i << 64);
        let cidr = format!("{}/64", Ipv6Addr::from(a));
        out.push(rule(None, Some(&cidr), Some("0"))?);
    }
    Ok(out)
}

/// The authoring (TOML) form of `rules` under tenant and job `bench`.
pub fn to_toml(rules: &[EgressRule]) -> String {
    let mut s = String::from("tenant = \"bench\"\njob = \"bench\"\n");
    for r in rules {
        match r {
            EgressRule::Host { host, .. } => {
                s.push_str(&format!("[[egress]]\nhost = \"{host}\"\n"))
            }
            EgressRule::Cidr { cidr, ports, .. } => s.push_str(&format!(
                "[[egress]]\ncidr = \"{cidr}\"\nports = \"{ports}\"\n"
            )),
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::matcher::compile_rules;
    use crate::Transport;

    #[test]
    fn probes_hit_and_miss_as_named() {
        let rules = mixed_rules().unwrap();
        assert_eq!(rules.len(), RULES);
        let m = compile_rules(&rules, &[]);
        assert!(m.check_host(EXACT_HIT, 443, Transport::Tcp).is_allow());
        assert!(m
            .check_host(EXACT_HIT_MIXED_CASE, 443, Transport::Tcp)
            .is_allow());
        assert!(m.check_host(WILDCARD_HIT, 8443, Transport::Tcp).is_allow());
        assert!(!m.check_host(NAME_MISS, 443, Transport::Tcp).is_allow());
        assert!(m.check_ip(CIDR_V4_HIT, 443, Transport::Tcp).is_allow());
        assert!(!m.check_ip(CIDR_V4_MISS, 443, Transport::Tcp).is_allow());
        assert!(m.check_ip(CIDR_V6_HIT, 443, Transport::Tcp).is_allow());
        assert!(!m.check_ip(ALWAYS_DENIED, 80, Transport::Tcp).is_allow());
    }

    #[test]
    fn toml_form_parses_back_to_the_same_rules() {
        let rules = mixed_rules().unwrap();
        let draft = crate::parse_policy(&to_toml(&rules)).unwrap();
        assert_eq!(draft.egress, rules);
    }
}
