//! Per-packet cost of the tier-2 pipeline, the proxy's whole decision path without sockets:
//! - established flow, node → internet: GENEVE receive rules → policy cache → conntrack lookup
//!   → SNAT rewrite → pacer stamp, at 64 B, 1400 B and 64 KiB inner packets;
//! - established flow, internet → node: reverse lookup → reverse NAT → GENEVE header → pacer;
//! - new flow: admission (bindings, matcher, exact connection limit, rate bucket) + conntrack
//!   insert + port allocation + SNAT, with 100k flows already live.
//!
//! Between iterations only the rewritten header bytes are restored (the payload is never
//! touched by the pipeline), so the 64 KiB case measures the pipeline, not a memcpy. Time
//! advances by one packet's serialisation time at the job's rate, so the pacer never drops.
//!
//! Run: `cargo bench -p snas-proxy --bench tier2` (add `-- --quick` for a short run).

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant, SystemTime};

use criterion::{criterion_group, Criterion, Throughput};
use snas_policy::authoring::parse_policy;
use snas_policy::bundle::TrustBundle;
use snas_policy::jws::{sign, verify};
use snas_policy::keys::PolicyKey;
use snas_proxy::clock::Nanos;
use snas_proxy::pacer::PaceRate;
use snas_proxy::tier2::{
    JobPolicy, Now, StaticPolicies, Tier2, Tier2Config, Verdict, GENEVE_HEADER_LEN,
};
use snas_wire::build::{tcp, TcpSpec};
use snas_wire::geneve::{write_geneve_header, InnerProto, SnasOption};
use snas_wire::TcpFlags;

const NODE: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 7);
const PROXY: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 100);
const EGRESS: IpAddr = IpAddr::V4(Ipv4Addr::new(198, 51, 100, 1));
const SANDBOX: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 255, 0, 2));
const JTI: &str = "bench-policy-00000001";
const T0: u64 = 1_800_000_000;
/// Rate of the benchmark job (the policy's maximum).
const RATE_BPS: u64 = 1_000_000_000_000;
/// Header bytes NAT rewrites (GENEVE 28 + IPv4 20 + TCP 20).
const HEADERS: usize = GENEVE_HEADER_LEN + 40;
/// Destinations bound for the new-flow case.
const DESTS: u8 = 200;

const POLICY: &str = r#"
tenant = "bench"
job = "bench"
[[egress]]
host = "*.example.com"
[limits]
egress_bps = "1000Gbit"
ingress_bps = "1000Gbit"
max_connections = 1000000
new_connections_per_sec = 1000000
new_connections_burst = 1000000
max_ports_per_destination = 65535
"#;

fn dest(i: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(203, 0, 113, i))
}

struct Bench {
    policies: StaticPolicies,
    tier2: Tier2,
    option: SnasOption,
    now: Nanos,
}

impl Bench {
    fn new() -> Bench {
        let key = PolicyKey::from_seed("bench", [3; 32]).expect("key");
        let bundle =
            TrustBundle::from_keys([("bench", key.public_pem().expect("pem"))]).expect("bundle");
        let at = SystemTime::UNIX_EPOCH + Duration::from_secs(T0);
        let claims =
            parse_policy(POLICY)
                .expect("policy")
                .to_claims(JTI, snas_wire::PolicySerial(1), at);
        let token = sign(&claims, &key).expect("sign");
        let verified = verify(&token, &bundle, at).expect("verify");
        let option = SnasOption {
            tenant_id: verified.tenant_id(),
            job_key: verified.job_key(),
            policy_serial: snas_wire::PolicySerial(1),
        };
        let mut policies = StaticPolicies::default();
        policies.insert(JobPolicy::from_verified(&verified, &[]));
        let mut cfg = Tier2Config::new(PROXY, vec![NODE], vec![EGRESS]);
        cfg.default_tenant_cap = (PaceRate::Unlimited, PaceRate::Unlimited);
        cfg.conntrack.max_flows = 4_000_000;
        cfg.conntrack.nat.max_ports_per_job = u32::MAX;
        cfg.conntrack.nat.max_ports_per_tenant = u32::MAX;
        let mut tier2 = Tier2::new(cfg, Nanos::ZERO).expect("tier2");
        for i in 1..=DESTS {
            tier2.bindings_mut().bind(
                option.job_key,
                dest(i),
                &format!("h{i}.example.com"),
                Nanos::MAX,
            );
        }
        Bench {
            policies,
            tier2,
            option,
            now: Nanos::from_nanos(1_000_000_000),
        }
    }

    fn now(&self) -> Now {
        Now {
            mono: self.now,
            unix_secs: T0 + 1,
        }
    }

    /// Advances the clock by one packet's serialisation time at the job's rate.
    fn tick(&mut self, len: usize) {
        let ns = (len as u64 * 8 * 1_000_000_000).div_ceil(RATE_BPS);
        self.now = self.now.saturating_add_nanos(ns.max(1));
    }

    fn payload(&self, inner: &[u8]) -> Vec<u8> {
        let mut p = vec![0u8; GENEVE_HEADER_LEN + inner.len()];
        write_geneve_header(&mut p, &self.option, InnerProto::Ipv4).expect("header");
        p[GENEVE_HEADER_LEN..].copy_from_slice(inner);
        p
    }
}

fn segment(src_port: u16, dst: IpAddr, flags: TcpFlags, payload: &[u8]) -> Vec<u8> {
    tcp(&TcpSpec {
        src: SocketAddr::new(SANDBOX, src_port),
        dst: SocketAddr::new(dst, 443),
        seq: 1,
        ack: if flags.contains(TcpFlags::ACK) { 1 } else { 0 },
        flags,
        window: 65535,
        payload,
    })
    .expect("segment")
}

fn established(c: &mut Criterion) {
    let mut group = c.benchmark_group("tier2_established");
    for size in [64usize, 1400, 65_479] {
        let mut b = Bench::new();
        let mut refusal = vec![0u8; 2048];
        // Open the flow.
        let syn = b.payload(&segment(40000, dest(1), TcpFlags::SYN, &[]));
        let mut buf = syn.clone();
        let now = b.now();
        let egress_port = match b
            .tier2
            .from_node(&b.policies, NODE, &mut buf, &mut refusal, now)
        {
            Verdict::ToInternet { range, .. } => {
                let t = snas_wire::flow_tuple(&buf[range]).expect("tuple");
                t.src_port
            }
            v => panic!("flow not admitted: {v:?}"),
        };
        // A data segment whose inner packet is `size` bytes.
        let data_len = size.saturating_sub(40);
        let data = vec![0x5a; data_len];
        let template = b.payload(&segment(40000, dest(1), TcpFlags::ACK, &data));
        let mut packet = template.clone();
        group.throughput(Throughput::Bytes(size as u64));
        group.bench_function(format!("node_to_internet/{size}B"), |bencher| {
            bencher.iter(|| {
                packet[..HEADERS].copy_from_slice(&template[..HEADERS]);
                b.tick(size);
                let now = b.now();
                let v =
                    b.tier2
                        .from_node(&b.policies, NODE, black_box(&mut packet), &mut refusal, now);
                debug_assert!(matches!(v, Verdict::ToInternet { .. }), "{v:?}");
                black_box(v)
            })
        });

        // The reply direction: internet → node.
        let reply_inner = tcp(&TcpSpec {
            src: SocketAddr::new(dest(1), 443),
            dst: SocketAddr::new(EGRESS, egress_port),
            seq: 1,
            ack: 1,
            flags: TcpFlags::ACK,
            window: 65535,
            payload: &data,
        })
        .expect("reply");
        let mut reply_template = vec![0u8; GENEVE_HEADER_LEN + reply_inner.len()];
        reply_template[GENEVE_HEADER_LEN..].copy_from_slice(&reply_inner);
        let mut reply = reply_template.clone();
        let end = reply.len();
        group.bench_function(format!("internet_to_node/{size}B"), |bencher| {
            bencher.iter(|| {
                reply[..HEADERS].copy_from_slice(&reply_template[..HEADERS]);
                b.tick(size);
                let now = b.now();
                let v = b
                    .tier2
                    .from_internet(black_box(&mut reply), GENEVE_HEADER_LEN..end, now);
                debug_assert!(matches!(v, Verdict::ToNode { .. }), "{v:?}");
                black_box(v)
            })
        });
    }
    group.finish();
}

/// Opens flows `0..n` (distinct source ports over `DESTS` destinations) on `b`.
fn open_flows(b: &mut Bench, first: u32, n: u32, refusal: &mut [u8]) -> u32 {
    let mut admitted = 0;
    for i in first..first + n {
        let port = 1024 + (i / u32::from(DESTS)) as u16;
        let d = dest((i % u32::from(DESTS)) as u8 + 1);
        let mut p = b.payload(&segment(port, d, TcpFlags::SYN, &[]));
        b.tick(60);
        let now = b.now();
        if matches!(
            b.tier2.from_node(&b.policies, NODE, &mut p, refusal, now),
            Verdict::ToInternet { .. }
        ) {
            admitted += 1;
        }
    }
    admitted
}

fn new_flow(c: &mut Criterion) {
    const LIVE: u32 = 100_000;
    const CHUNK: u32 = 200_000;
    let mut group = c.benchmark_group("tier2_new_flow");
    group.bench_function("syn_admit_nat/100k_live", |bencher| {
        bencher.iter_custom(|iters| {
            let mut refusal = vec![0u8; 2048];
            let mut total = Duration::ZERO;
            let mut done: u64 = 0;
            while done < iters {
                let mut b = Bench::new();
                let live = open_flows(&mut b, 0, LIVE, &mut refusal);
                assert_eq!(live, LIVE, "warm-up flows admitted");
                let n = CHUNK.min(u32::try_from(iters - done).unwrap_or(CHUNK));
                // Packets are built outside the timed region.
                let packets: Vec<Vec<u8>> = (LIVE..LIVE + n)
                    .map(|i| {
                        let port = 1024 + (i / u32::from(DESTS)) as u16;
                        let d = dest((i % u32::from(DESTS)) as u8 + 1);
                        b.payload(&segment(port, d, TcpFlags::SYN, &[]))
                    })
                    .collect();
                let start = Instant::now();
                for mut p in packets {
                    b.tick(60);
                    let now = b.now();
                    black_box(
                        b.tier2
                            .from_node(&b.policies, NODE, &mut p, &mut refusal, now),
                    );
                }
                total += start.elapsed();
                done += u64::from(n);
            }
            total
        })
    });
    group.finish();
}

criterion_group!(benches, established, new_flow);

fn main() {
    benches();
    Criterion::default().configure_from_args().final_summary();
}
