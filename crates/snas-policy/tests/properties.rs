//! Property tests: round trips through every representation, parsers that never panic, and
//! wildcard matching against a simple label-by-label reference model.

use proptest::prelude::*;
use snas_policy::hostport::HostPort;
use snas_policy::matcher::compile_rules;
use snas_policy::{Decision, EgressRule, PolicyKey, RuleFields, Transport, TrustBundle};
use std::time::{Duration, SystemTime};

fn label() -> impl Strategy<Value = String> {
    "[a-z0-9][a-z0-9-]{0,9}"
}

fn name() -> impl Strategy<Value = String> {
    (prop::collection::vec(label(), 1..4), "[a-z]{2,6}").prop_map(|(mut l, tld)| {
        l.push(tld);
        l.join(".")
    })
}

fn port_spec() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(String::new()),
        Just(":0".to_owned()),
        (1u16..=65535).prop_map(|p| format!(":{p}")),
        (1u16..=65535, 0u16..1000).prop_map(|(lo, d)| format!(":{lo}-{}", lo.saturating_add(d))),
    ]
}

fn protocol() -> impl Strategy<Value = Option<&'static str>> {
    prop_oneof![
        Just(None),
        Just(Some("tcp")),
        Just(Some("udp")),
        Just(Some("any"))
    ]
}

/// (TOML fragment, rule) pairs of valid rules.
fn rule() -> impl Strategy<Value = String> {
    let host =
        (name(), port_spec(), protocol()).prop_map(|(n, p, proto)| (format!("{n}{p}"), proto));
    let wild = (
        "[a-z-]{0,3}",
        "[a-z-]{0,3}",
        label(),
        "[a-z]{2,5}",
        port_spec(),
        protocol(),
    )
        .prop_map(|(pre, suf, parent, tld, p, proto)| {
            (format!("{pre}*{suf}.{parent}.{tld}{p}"), proto)
        });
    let any_host = (prop_oneof![Just(""), Just(":80"), Just(":443")], protocol())
        .prop_map(|(p, proto)| (format!("0.0.0.0{p}"), proto));
    let host_rule = prop_oneof![host, wild, any_host].prop_map(|(h, proto)| {
        let mut s = format!("[[egress]]\nhost = \"{h}\"\n");
        if let Some(p) = proto {
            s.push_str(&format!("protocol = \"{p}\"\n"));
        }
        s
    });
    let v4 = (11u32..=99, any::<u16>(), 8u8..=32).prop_map(|(a, rest, len)| {
        let addr = (a << 24) | (u32::from(rest) << 8);
        let mask = if len == 0 {
            0
        } else {
            u32::MAX << (32 - u32::from(len))
        };
        format!("{}/{len}", std::net::Ipv4Addr::from(addr & mask))
    });
    let v6 = (any::<u32>(), 32u8..=128).prop_map(|(rest, len)| {
        let addr = (0x2001_0db8u128 << 96) | (u128::from(rest) << 64);
        let mask = u128::MAX << (128 - u32::from(len));
        format!("{}/{len}", std::net::Ipv6Addr::from(addr & mask))
    });
    let ports = prop_oneof![
        Just("0".to_owned()),
        (1u16..=65535).prop_map(|p| p.to_string())
    ];
    let cidr_rule = (prop_oneof![v4, v6], ports, protocol(), any::<bool>()).prop_map(
        |(c, p, proto, private)| {
            let mut s =
                format!("[[egress]]\ncidr = \"{c}\"\nports = \"{p}\"\nallow_private = {private}\n");
            if let Some(p) = proto {
                s.push_str(&format!("protocol = \"{p}\"\n"));
            }
            s
        },
    );
    prop_oneof![host_rule, cidr_rule]
}

fn policy_toml() -> impl Strategy<Value = String> {
    (
        "[a-z0-9-]{1,20}",
        "[A-Za-z0-9._-]{1,30}",
        prop::collection::vec(rule(), 0..20),
        1u64..=86_400,
        1u32..=1000,
    )
        .prop_map(|(tenant, job, rules, ttl, conns)| {
            let mut s = format!("tenant = \"{tenant}\"\njob = \"{job}\"\nttl = \"{ttl}s\"\n");
            for r in rules {
                s.push_str(&r);
            }
            s.push_str(&format!(
                "[limits]\nmax_connections = {conns}\negress_bps = \"{conns}Mbit\"\n"
            ));
            s
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    #[test]
    fn valid_policies_round_trip_toml_claims_jws_verify(src in policy_toml(), serial in any::<u32>().prop_map(snas_wire::PolicySerial), seed in any::<[u8; 32]>()) {
        let draft = snas_policy::parse_policy(&src).map_err(|e| TestCaseError::fail(format!("{e}\n{src}")))?;
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let claims = draft.to_claims("0123456789abcdef0123", serial, now);
        let key = PolicyKey::from_seed("prop", seed).map_err(|e| TestCaseError::fail(e.to_string()))?;
        let token = snas_policy::sign(&claims, &key).map_err(|e| TestCaseError::fail(e.to_string()))?;
        let bundle = TrustBundle::from_keys([("prop", key.public_pem().map_err(|e| TestCaseError::fail(e.to_string()))?)])
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        let v = snas_policy::verify(&token, &bundle, now).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(v.claims(), &claims);
        // JSON is a fixed point too.
        let json = serde_json::to_string(&claims).map_err(|e| TestCaseError::fail(e.to_string()))?;
        let back: snas_policy::PolicyClaims = serde_json::from_str(&json).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(back, claims);
    }

    #[test]
    fn canonical_host_form_reparses_identically(h in (name(), port_spec()).prop_map(|(n, p)| format!("{n}{p}"))) {
        let a = HostPort::parse(&h).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(HostPort::parse(&a.to_string()), Ok(a));
    }

    #[test]
    fn parsers_never_panic_on_arbitrary_text(s in "\\PC{0,200}") {
        let _ = snas_policy::parse_policy(&s);
        let _ = HostPort::parse(&s);
        let _ = snas_policy::units::Bps::parse(&s);
        let _ = snas_policy::units::parse_ttl(&s);
        let _ = snas_policy::PortRange::parse(&s);
    }

    #[test]
    fn parsers_never_panic_on_toml_shaped_text(
        keys in prop::collection::vec(prop_oneof![
            Just("tenant"), Just("job"), Just("node"), Just("ttl"), Just("host"), Just("cidr"), Just("ports"),
            Just("protocol"), Just("allow_private"), Just("egress_bps"), Just("max_connections"), Just("[[egress]]"), Just("[limits]"),
        ], 0..12),
        vals in prop::collection::vec("\\PC{0,20}|[0-9]{1,25}|true|\\[\\]", 12),
    ) {
        let mut s = String::new();
        for (k, v) in keys.iter().zip(&vals) {
            if k.starts_with('[') {
                s.push_str(&format!("{k}\n"));
            } else {
                s.push_str(&format!("{k} = \"{}\"\n{k}2 = {v}\n", v.replace(['"', '\\'], "")));
            }
        }
        let _ = snas_policy::parse_policy(&s);
    }

    #[test]
    fn verify_never_panics_on_arbitrary_tokens(s in "[A-Za-z0-9_.=-]{0,300}|\\PC{0,100}") {
        let key = PolicyKey::from_seed("k", [1; 32]).map_err(|e| TestCaseError::fail(e.to_string()))?;
        let bundle = TrustBundle::from_keys([("k", key.public_pem().map_err(|e| TestCaseError::fail(e.to_string()))?)])
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert!(snas_policy::verify(&s, &bundle, SystemTime::UNIX_EPOCH).is_err());
    }
}

/// The reference: same number of labels, every label equal except the wildcard one, which must
/// start with the prefix, end with the suffix, be long enough and consist of `[a-z0-9-]`.
fn reference_match(pattern: &str, name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    let name = name.strip_suffix('.').unwrap_or(&name);
    let p: Vec<&str> = pattern.split('.').collect();
    let n: Vec<&str> = name.split('.').collect();
    if p.len() != n.len() {
        return false;
    }
    p.iter().zip(&n).all(|(pl, nl)| match pl.split_once('*') {
        None => pl == nl,
        Some((pre, suf)) => {
            !nl.is_empty()
                && nl.len() >= pre.len() + suf.len()
                && nl.starts_with(pre)
                && nl.ends_with(suf)
                && nl
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        }
    })
}

fn tiny_label() -> impl Strategy<Value = String> {
    "[ab1-]{1,4}"
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn wildcard_matching_agrees_with_reference_model(
        before in prop::collection::vec(tiny_label(), 0..2),
        pre in "[ab-]{0,2}",
        suf in "[ab-]{0,2}",
        parent in (prop::collection::vec(tiny_label(), 1..3), "[ab]{1,3}").prop_map(|(mut v, tld)| { v.push(tld); v }),
        names in prop::collection::vec((prop::collection::vec(tiny_label(), 1..6), any::<bool>(), any::<bool>()), 1..16),
    ) {
        let mut labels = before.clone();
        labels.push(format!("{pre}*{suf}"));
        labels.extend(parent.iter().cloned());
        let pattern = labels.join(".");
        let rule = EgressRule::from_fields(RuleFields::host(&format!("{pattern}:0")).protocol("any"))
            .map_err(|e| TestCaseError::fail(format!("{pattern}: {e}")))?;
        let m = compile_rules(&[rule], &[]);
        // Half the names reuse the pattern's tail so that hits are common.
        for (ls, reuse_tail, upper) in names {
            let mut ls = ls;
            if reuse_tail {
                ls.truncate(before.len() + 1);
                ls.splice(0..ls.len().min(before.len()), before.iter().cloned());
                ls.extend(parent.iter().cloned());
            }
            let mut n = ls.join(".");
            if upper {
                n = n.to_ascii_uppercase();
            }
            let got = m.check_host(&n, 443, Transport::Tcp);
            let want = reference_match(&pattern, &n);
            prop_assert_eq!(matches!(got, Decision::Allow { rule: 0 }), want, "pattern {} name {} got {:?}", pattern, n, got);
        }
    }
}

/// The reference for `check_ip`: the lowest `cidr` rule covering the address (an always-denied
/// address only through `allow_private`) on this port and transport; host rules — `0.0.0.0`
/// included — never allow a raw address.
fn reference_check_ip(
    egress: &[EgressRule],
    ip: std::net::IpAddr,
    port: u16,
    t: Transport,
) -> Decision {
    use snas_policy::DenyReason;
    let private = snas_policy::ranges::always_denied(ip).is_some();
    let mut covered = false;
    for (i, r) in egress.iter().enumerate() {
        if let EgressRule::Cidr {
            cidr,
            ports,
            protocol,
            allow_private,
        } = r
        {
            if cidr.contains(&ip) && (!private || *allow_private) {
                covered = true;
                if ports.contains(port) && protocol.allows(t.into()) {
                    return Decision::Allow { rule: i };
                }
            }
        }
    }
    Decision::Deny(if covered {
        DenyReason::PortDenied
    } else if private {
        DenyReason::AlwaysDenied
    } else {
        DenyReason::DestinationDenied
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn check_ip_agrees_with_the_cidr_only_reference_model(
        src in policy_toml(),
        probes in prop::collection::vec((any::<u32>(), any::<u128>(), any::<bool>(), any::<u16>(), any::<bool>()), 32),
    ) {
        let draft = snas_policy::parse_policy(&src).map_err(|e| TestCaseError::fail(format!("{e}\n{src}")))?;
        let m = compile_rules(&draft.egress, &[]);
        // Addresses at the edges of every cidr rule, random ones near the rules, and fixed ones
        // (public, private, metadata, documentation) that `0.0.0.0` rules must not open.
        let mut ips: Vec<std::net::IpAddr> = Vec::new();
        for r in &draft.egress {
            if let EgressRule::Cidr { cidr, .. } = r {
                ips.push(cidr.network());
                ips.push(cidr.broadcast());
            }
        }
        for (v4, v6, _, _, _) in &probes {
            ips.push(std::net::Ipv4Addr::from(0x0B00_0000 + v4 % (89 << 24)).into());
            ips.push(std::net::Ipv6Addr::from((0x2001_0db8u128 << 96) | (v6 >> 32)).into());
        }
        for fixed in ["198.51.100.7", "8.8.8.8", "10.0.0.1", "169.254.169.254", "2001:db8::1", "::1"] {
            ips.push(fixed.parse().map_err(|_| TestCaseError::fail("ip"))?);
        }
        for (i, ip) in ips.iter().enumerate() {
            let (_, _, web, port, udp) = probes[i % probes.len()];
            let port = if web { if port % 2 == 0 { 443 } else { 80 } } else { port.max(1) };
            let t = if udp { Transport::Udp } else { Transport::Tcp };
            prop_assert_eq!(
                m.check_ip(*ip, port, t),
                reference_check_ip(&draft.egress, *ip, port, t),
                "{}:{}/{} in\n{}", ip, port, t, src
            );
        }
    }
}

/// Deny rules: the valid-rule strategy written as `[[deny]]` tables (no `allow_private`).
fn deny_rule() -> impl Strategy<Value = String> {
    rule().prop_map(|r| {
        r.replace("[[egress]]", "[[deny]]")
            .lines()
            .filter(|l| !l.starts_with("allow_private"))
            .map(|l| format!("{l}\n"))
            .collect()
    })
}

/// The full reference for `check_ip`: infrastructure, then the lowest deny cidr rule on this
/// port/transport, then the cidr-only model; audit mode turns only "no rule allows it" into
/// `WouldDeny`.
fn reference_full(
    draft: &snas_policy::PolicyDraft,
    infra: &[snas_policy::IpNet],
    ip: std::net::IpAddr,
    port: u16,
    t: Transport,
) -> Decision {
    use snas_policy::DenyReason;
    if infra.iter().any(|n| n.contains(&ip)) {
        return Decision::Deny(DenyReason::Infrastructure);
    }
    for (i, d) in draft.deny.iter().enumerate() {
        if let EgressRule::Cidr {
            cidr,
            ports,
            protocol,
            ..
        } = d.rule()
        {
            if cidr.contains(&ip) && ports.contains(port) && protocol.allows(t.into()) {
                return Decision::Deny(DenyReason::DenyRule(i));
            }
        }
    }
    match reference_check_ip(&draft.egress, ip, port, t) {
        Decision::Deny(r @ (DenyReason::DestinationDenied | DenyReason::PortDenied))
            if draft.mode == snas_policy::Mode::Audit =>
        {
            Decision::WouldDeny(r)
        }
        d => d,
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn deny_beats_allow_infrastructure_beats_all_and_audit_never_opens_private_or_infrastructure(
        src in policy_toml(),
        deny in prop::collection::vec(deny_rule(), 0..8),
        audit in any::<bool>(),
        probes in prop::collection::vec((any::<u32>(), any::<u128>(), any::<u16>(), any::<bool>()), 32),
    ) {
        let mut src = src;
        let at = src.find("[limits]").unwrap_or(src.len());
        src.insert_str(at, &deny.concat());
        if audit {
            src.insert_str(0, "mode = \"audit\"\n");
        }
        let draft = snas_policy::parse_policy(&src).map_err(|e| TestCaseError::fail(format!("{e}\n{src}")))?;
        let infra: Vec<snas_policy::IpNet> = ["11.0.0.0/8", "2001:db8:ff::/48", "169.254.169.254/32"]
            .iter().map(|s| s.parse().map_err(|_| TestCaseError::fail("net"))).collect::<Result<_, _>>()?;
        let m = snas_policy::matcher::compile_policy(&draft.egress, &draft.deny, draft.mode, &infra);
        let mut ips: Vec<std::net::IpAddr> = Vec::new();
        for r in draft.egress.iter().chain(draft.deny.iter().map(|d| d.rule())) {
            if let EgressRule::Cidr { cidr, .. } = r {
                ips.push(cidr.network());
                ips.push(cidr.broadcast());
            }
        }
        for (v4, v6, _, _) in &probes {
            ips.push(std::net::Ipv4Addr::from(0x0B00_0000 + v4 % (89 << 24)).into());
            ips.push(std::net::Ipv6Addr::from((0x2001_0db8u128 << 96) | (v6 >> 32)).into());
        }
        for fixed in ["198.51.100.7", "8.8.8.8", "10.0.0.1", "169.254.169.254", "2001:db8::1", "::1", "11.1.2.3"] {
            ips.push(fixed.parse().map_err(|_| TestCaseError::fail("ip"))?);
        }
        for (i, ip) in ips.iter().enumerate() {
            let (_, _, port, udp) = probes[i % probes.len()];
            let t = if udp { Transport::Udp } else { Transport::Tcp };
            for port in [port.max(1), 443, 22] {
                let got = m.check_ip(*ip, port, t);
                prop_assert_eq!(got, reference_full(&draft, &infra, *ip, port, t), "{}:{}/{} in\n{}", ip, port, t, src);
                if infra.iter().any(|n| n.contains(ip)) {
                    prop_assert!(!got.passes());
                }
                if snas_policy::ranges::always_denied(*ip).is_some() {
                    prop_assert!(!matches!(got, Decision::WouldDeny(_)), "audit opened {}", ip);
                }
                // Through any name too: a deny cidr rule and infrastructure decide first.
                let named = m.check_resolved("www.example.com", *ip, port, t);
                if let Decision::Deny(r @ (snas_policy::DenyReason::Infrastructure | snas_policy::DenyReason::DenyRule(_))) = got {
                    prop_assert_eq!(named, Decision::Deny(r));
                }
                if snas_policy::ranges::always_denied(*ip).is_some() {
                    prop_assert!(!matches!(named, Decision::WouldDeny(_)));
                }
            }
        }
    }
}
