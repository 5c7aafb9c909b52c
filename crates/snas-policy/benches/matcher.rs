//! Matcher benchmarks: compile a 10,000-rule mixed policy and time lookups (exact hit, wildcard
//! hit, miss, CIDR hit, IPv6 CIDR hit, always-denied, with and without a 4,000-range
//! infrastructure set), plus TOML parse, JWS verify and the strict JSON pass of the
//! same policy for scale (the policy is `snas_policy::synthetic`, shared with `snas-bench scale`).
//! Run: `cargo bench -p snas-policy --bench matcher -- --quick`.

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use ipnet::Ipv4Net;
use snas_policy::claims::PolicyDraft;
use snas_policy::matcher::compile_rules;
use snas_policy::synthetic;
use snas_policy::IpNet;
use snas_policy::{PolicyKey, Transport, TrustBundle};
use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, SystemTime};

fn bench(c: &mut Criterion) {
    let rules = synthetic::mixed_rules().unwrap_or_else(|e| panic!("bench rule: {e}"));
    c.bench_function("compile/10k_mixed_rules", |b| {
        b.iter(|| compile_rules(black_box(&rules), &[]))
    });

    let m = compile_rules(&rules, &[]);
    let (v4_hit, v4_miss, v6_hit, metadata) = (
        synthetic::CIDR_V4_HIT,
        synthetic::CIDR_V4_MISS,
        synthetic::CIDR_V6_HIT,
        synthetic::ALWAYS_DENIED,
    );
    let mut g = c.benchmark_group("lookup");
    g.bench_function("exact_hit", |b| {
        b.iter(|| m.check_host(black_box(synthetic::EXACT_HIT), 443, Transport::Tcp))
    });
    g.bench_function("exact_hit_mixed_case", |b| {
        b.iter(|| {
            m.check_host(
                black_box(synthetic::EXACT_HIT_MIXED_CASE),
                443,
                Transport::Tcp,
            )
        })
    });
    g.bench_function("wildcard_hit", |b| {
        b.iter(|| m.check_host(black_box(synthetic::WILDCARD_HIT), 8443, Transport::Tcp))
    });
    g.bench_function("name_miss", |b| {
        b.iter(|| m.check_host(black_box(synthetic::NAME_MISS), 443, Transport::Tcp))
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
    // A fleet's infrastructure set: 4,000 node/proxy /32s, a /24 management net, a /16 underlay.
    let mut infra: Vec<IpNet> = (0u32..4_000)
        .map(|i| {
            IpNet::V4(
                Ipv4Net::new(Ipv4Addr::from(0x0E00_0000 + i), 32).unwrap_or_else(|e| panic!("{e}")),
            )
        })
        .collect();
    for net in ["192.0.2.0/24", "100.64.0.0/16"] {
        infra.push(net.parse().unwrap_or_else(|e| panic!("{e}")));
    }
    let mi = compile_rules(&rules, &infra);
    g.bench_function("cidr_v4_hit_with_4k_infrastructure", |b| {
        b.iter(|| mi.check_ip(black_box(v4_hit), 443, Transport::Tcp))
    });
    let infra_hit = IpAddr::V4(Ipv4Addr::new(14, 0, 7, 208));
    g.bench_function("infrastructure_hit_of_4k", |b| {
        b.iter(|| mi.check_ip(black_box(infra_hit), 443, Transport::Tcp))
    });
    g.finish();

    let toml = synthetic::to_toml(&rules);
    let mut g = c.benchmark_group("policy_10k");
    g.sample_size(10);
    g.bench_function("parse_toml", |b| {
        b.iter(|| snas_policy::parse_policy(black_box(&toml)))
    });
    let mut draft = PolicyDraft::new("bench", "bench");
    draft.egress = rules.clone();
    let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
    let key = PolicyKey::from_seed("bench", [9; 32]).unwrap_or_else(|e| panic!("{e}"));
    let claims = draft.to_claims("benchbenchbenchbench", snas_wire::PolicySerial(1), now);
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
    // The strict JSON pass of verify against serde_json's own parse into the same Value.
    let claims_json = serde_json::to_vec(&claims).unwrap_or_else(|e| panic!("{e}"));
    g.bench_function("claims_json_strict", |b| {
        b.iter(|| snas_policy::json::parse_strict(black_box(&claims_json)))
    });
    g.bench_function("claims_json_serde_value", |b| {
        b.iter(|| serde_json::from_slice::<serde_json::Value>(black_box(&claims_json)))
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
