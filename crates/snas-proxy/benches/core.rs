//! Benchmarks of the proxy core: conntrack lookup, new flow (insert + port allocation) with 1M
//! live flows, and pacer enqueue + dequeue. Also prints the memory of 1M live flows (computed
//! from table capacities, and the process RSS growth) for two destination mixes.
//!
//! Run: `cargo bench -p snas-proxy --bench core` (add `-- --quick` for a short run).

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use criterion::{criterion_group, BatchSize, Criterion, Throughput};
use snas_proxy::clock::Nanos;
use snas_proxy::conntrack::{Conntrack, ConntrackConfig, Direction, FlowKey, Open, TcpFlags};
use snas_proxy::nat::{IpProto, JobLimits};
use snas_proxy::pacer::{Bps, PacedQueue, PacerConfig, PacingKey, PacingRates};

const FLOWS: u32 = 1_000_000;
const EGRESS: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1));
const WIDE: JobLimits = JobLimits {
    max_connections: u32::MAX,
    max_ports_per_destination: u32::MAX,
};

/// A documentation-range address by index (768 of them).
fn doc_ip(i: u32) -> IpAddr {
    let (net, host) = (i / 256 % 3, (i % 256) as u8);
    IpAddr::V4(match net {
        0 => Ipv4Addr::new(192, 0, 2, host),
        1 => Ipv4Addr::new(198, 51, 100, host),
        _ => Ipv4Addr::new(203, 0, 113, host),
    })
}

/// Flow `i` of a fleet of 1000 jobs, each talking to `dests` destinations in total.
fn key(i: u32, distinct_dests: bool) -> FlowKey {
    let job = u64::from(i % 1000);
    let (dst_ip, dst_port) = if distinct_dests {
        (doc_ip(i % 768), (i / 768) as u16 + 1)
    } else {
        (doc_ip(i % 400), 443)
    };
    FlowKey {
        job: job.wrapping_mul(0x9e37_79b9_7f4a_7c15),
        proto: IpProto::Tcp,
        src_ip: IpAddr::V4(Ipv4Addr::new(10, 0, (job / 256) as u8, (job % 256) as u8)),
        src_port: (i / 1000) as u16 + 1024,
        dst_ip,
        dst_port,
    }
}

fn tracker() -> Conntrack {
    let mut cfg = ConntrackConfig::new(vec![EGRESS]);
    cfg.max_flows = 2 * FLOWS;
    cfg.nat.max_ports_per_job = u32::MAX;
    cfg.nat.max_ports_per_tenant = u32::MAX;
    Conntrack::new(cfg, Nanos::ZERO).expect("valid config")
}

fn fill(ct: &mut Conntrack, n: u32, distinct_dests: bool) {
    for i in 0..n {
        let k = key(i, distinct_dests);
        match ct.open(k, i % 10, WIDE, Nanos::ZERO) {
            Open::Created { id, .. } => {
                ct.observe(
                    id,
                    Direction::Reply,
                    TcpFlags::SYN | TcpFlags::ACK,
                    Nanos::ZERO,
                );
            }
            other => panic!("flow {i}: {other:?}"),
        }
    }
}

fn rss_bytes() -> usize {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<usize>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

fn print_memory() {
    println!("flow slab entry: {} B", Conntrack::FLOW_ENTRY_BYTES);
    for (name, distinct) in [
        ("400 destinations", false),
        ("1M distinct destinations", true),
    ] {
        let before = rss_bytes();
        let mut ct = tracker();
        fill(&mut ct, FLOWS, distinct);
        let after = rss_bytes();
        let m = ct.memory();
        println!(
            "1M flows, {name}: computed {:.1} MiB = {} B/flow (slab {} B, fwd {} B, rev {} B, \
             expiry {} B, nat {} B per flow); RSS growth {:.1} MiB = {} B/flow",
            m.total() as f64 / (1 << 20) as f64,
            m.bytes_per_flow(),
            m.slab / m.flows,
            m.forward_table / m.flows,
            m.reply_table / m.flows,
            m.expiry / m.flows,
            m.nat / m.flows,
            after.saturating_sub(before) as f64 / (1 << 20) as f64,
            after.saturating_sub(before) / FLOWS as usize,
        );
        drop(black_box(ct));
    }
}

/// The same lookup with 1000 live flows: everything in cache, so this is the hashing and probing
/// cost; the 1M figure adds the cache and TLB misses.
fn conntrack_small(c: &mut Criterion) {
    let mut ct = tracker();
    fill(&mut ct, 1000, false);
    let mut g = c.benchmark_group("conntrack_1k_live");
    g.throughput(Throughput::Elements(1));
    let mut i = 0u32;
    g.bench_function("lookup_hit_established", |b| {
        b.iter(|| {
            i = (i + 7) % 1000;
            black_box(ct.lookup(&key(i, false)))
        })
    });
    g.finish();
}

fn conntrack(c: &mut Criterion) {
    let mut ct = tracker();
    fill(&mut ct, FLOWS, false);
    let mut g = c.benchmark_group("conntrack_1M_live");
    g.throughput(Throughput::Elements(1));
    let mut i = 0u32;
    g.bench_function("lookup_hit_established", |b| {
        b.iter(|| {
            i = (i + 7919) % FLOWS;
            black_box(ct.lookup(&key(i, false)))
        })
    });
    g.bench_function("lookup_and_observe", |b| {
        b.iter(|| {
            i = (i + 7919) % FLOWS;
            if let Some(id) = ct.lookup(&key(i, false)) {
                black_box(ct.observe(id, Direction::Original, TcpFlags::ACK, Nanos::ZERO));
            }
        })
    });
    // New flow: insert + allocate, then remove (which quarantines) to keep the size at 1M.
    let mut n = 0u32;
    g.bench_function("open_new_flow_allocate_port_and_remove", |b| {
        b.iter(|| {
            n = n.wrapping_add(1);
            let k = FlowKey {
                src_port: (n % 60_000) as u16,
                job: 0xbe7c_0000_0000 + u64::from(n / 60_000),
                ..key(n % FLOWS, false)
            };
            if let Open::Created { id, .. } = ct.open(k, 99, WIDE, Nanos::ZERO) {
                black_box(ct.remove(id, Nanos::ZERO));
            }
        })
    });
    g.finish();
    // Ports from the churn above are quarantined until t = 60 s: release them and measure a full
    // expiry pass over 1M established flows at their timeout.
    let t = Nanos::ZERO.saturating_add(Duration::from_secs(4_000));
    let start = std::time::Instant::now();
    let expired = ct.expire(t).count();
    println!(
        "expire(): {expired} flows removed in {:.0} ms ({:.0} ns/flow)",
        start.elapsed().as_secs_f64() * 1e3,
        start.elapsed().as_nanos() as f64 / expired.max(1) as f64
    );
}

fn pacer(c: &mut Criterion) {
    let mut g = c.benchmark_group("pacer");
    for jobs in [1u64, 1000] {
        // One iteration = 10 000 packets enqueued and released.
        g.throughput(Throughput::Elements(10_000));
        g.bench_function(format!("enqueue_dequeue_{jobs}_jobs"), |b| {
            b.iter_batched_ref(
                || {
                    (
                        PacedQueue::<u32>::new(PacerConfig::default(), Nanos::ZERO)
                            .expect("default config"),
                        Vec::with_capacity(64),
                        0u64,
                    )
                },
                |(q, out, t)| {
                    // 1 Gbit/s per job; advance 1 µs per packet and release what is due.
                    for p in 0..10_000u64 {
                        *t += 1_000;
                        let key = PacingKey {
                            job: p % jobs,
                            tenant: (p % jobs % 16) as u32,
                        };
                        let rates = PacingRates {
                            job: Bps::gbit(1),
                            tenant: Bps::gbit(10),
                        };
                        black_box(q.enqueue(key, rates, 1500, p as u32, Nanos::from_nanos(*t)));
                        q.pop_due(Nanos::from_nanos(*t), out);
                        out.clear();
                    }
                },
                BatchSize::LargeInput,
            )
        });
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .measurement_time(Duration::from_secs(3))
        .warm_up_time(Duration::from_secs(1));
    targets = conntrack_small, conntrack, pacer
}

fn main() {
    print_memory();
    benches();
    Criterion::default().configure_from_args().final_summary();
}
