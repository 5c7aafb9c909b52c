//! Matcher benchmarks: compile a 10,000-rule mixed policy and time lookups (exact hit, wildcard
//! hit, miss, CIDR hit, IPv6 CIDR hit, always-denied), plus TOML parse and JWS verify of the same
//! policy for scale. Run: `cargo bench -p snas-policy --bench matcher -- --quick`.

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use snas_policy::claims::PolicyDraft;
use snas_policy::matcher::compile_rules;
use snas_policy::{EgressRule, PolicyKey, Transport, TrustBundle};
use std::net::IpAddr;
use std::time::{Duration, SystemTime};

/// 4,000 exact names, 2,000 wildcards, 3,000 IPv4 CIDRs (/16, /24, /32), 1,000 IPv6 CIDRs.
fn mixed_rules() -> Vec<EgressRule> {
    let mut out = Vec::with_capacity(10_000);
    let rule = |h: Option<&str>, c: Option<&str>, p: Option<&str>| {
        EgressRule::from_parts(h, c, p, None, None)
    };
    for i in 0..4_000 {
        out.push(rule(
            Some(&format!("api{i}.svc{}.example.com:443", i % 97)),
            None,
            None,
        ));
    }
    for i in 0..1_000 {
        out.push(rule(Some(&format!("*.w{i}.example.org")), None, None));
        out.push(rule(Some(&format!("api-*.z{i}.example.net:0")), None, None));
    }
    for i in 0u32..3_000 {
        let (net, len) = match i % 3 {
            0 => (0x0B00_0000 + (i << 8), 24),
            1 => (0x0C00_0000 + i, 32),
            _ => (0x0D00_0000 + ((i & 0xff) << 16), 16),
        };
        let cidr = format!("{}/{len}", std::net::Ipv4Addr::from(net));
        out.push(rule(None, Some(&cidr), Some("443")));
    }
    for i in 0u128..1_000 {
        let a = (0x2001_0db8u128 << 96) | (i << 64);
        out.push(rule(
            None,
            Some(&format!("{}/64", std::net::Ipv6Addr::from(a))),
            Some("0"),
        ));
    }
    out.into_iter()
        .collect::<Result<_, _>>()
        .unwrap_or_else(|e| panic!("bench rule: {e}"))
}

fn to_toml(rules: &[EgressRule]) -> String {
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

fn bench(c: &mut Criterion) {
    let rules = mixed_rules();
    c.bench_function("compile/10k_mixed_rules", |b| {
        b.iter(|| compile_rules(black_box(&rules), &[]))
    });

    let m = compile_rules(&rules, &[]);
    let ip = |s: &str| s.parse::<IpAddr>().unwrap_or_else(|e| panic!("{e}"));
    let (v4_hit, v4_miss, v6_hit, metadata) = (
        ip("11.0.200.9"),
        ip("198.51.100.77"),
        ip("2001:db8:0:1f4::1"),
        ip("169.254.169.254"),
    );
    let mut g = c.benchmark_group("lookup");
    g.bench_function("exact_hit", |b| {
        b.iter(|| m.check_host(black_box("api1234.svc70.example.com"), 443, Transport::Tcp))
    });
    g.bench_function("exact_hit_mixed_case", |b| {
        b.iter(|| m.check_host(black_box("API1234.Svc70.Example.com."), 443, Transport::Tcp))
    });
    g.bench_function("wildcard_hit", |b| {
        b.iter(|| m.check_host(black_box("api-eu.z777.example.net"), 8443, Transport::Tcp))
    });
    g.bench_function("name_miss", |b| {
        b.iter(|| {
            m.check_host(
                black_box("www.not-in-policy.example.io"),
                443,
                Transport::Tcp,
            )
        })
    });
    g.bench_function("cidr_v4_hit", |b| {
        b.iter(|| m.check_ip(black_box(v4_hit), 443, Transport::Tcp))
    });
    g.bench_function("cidr_v4_miss", |b| {
        b.iter(|| m.check_ip(black_box(v4_miss), 443, Transport::Tcp))
    });
    g.bench_function("cidr_v6_hit", |b| {
        b.iter(|| m.check_ip(black_box(v6_hit), 443, Transport::Tcp))
    });
    g.bench_function("always_denied", |b| {
        b.iter(|| m.check_ip(black_box(metadata), 80, Transport::Tcp))
    });
    g.finish();

    let toml = to_toml(&rules);
    let mut g = c.benchmark_group("policy_10k");
    g.sample_size(10);
    g.bench_function("parse_toml", |b| {
        b.iter(|| snas_policy::parse_policy(black_box(&toml)))
    });
    let mut draft = PolicyDraft::new("bench", "bench");
    draft.egress = rules.clone();
    let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
    let key = PolicyKey::from_seed("bench", [9; 32]).unwrap_or_else(|e| panic!("{e}"));
    let claims = draft.to_claims("benchbenchbenchbench", 1, now);
    let token = snas_policy::sign(&claims, &key).unwrap_or_else(|e| panic!("{e}"));
    let pem = key.public_pem().unwrap_or_else(|e| panic!("{e}"));
    let bundle = TrustBundle::from_keys([("bench", pem)]).unwrap_or_else(|e| panic!("{e}"));
    println!(
        "10k-rule policy: TOML {} bytes, JWS {} bytes",
        toml.len(),
        token.len()
    );
    g.bench_function("verify_jws", |b| {
        b.iter(|| snas_policy::verify(black_box(&token), &bundle, now))
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
