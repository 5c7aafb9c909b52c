//! Benchmarks of the proxy core: conntrack lookup, new flow (insert + port allocation) with 1M
//! live flows, and pacer enqueue + dequeue. The flows are `snas_proxy::synthetic`; their memory
//! (100k and 1M flows, two destination mixes) is measured by `snas-bench scale`.
//!
//! Run: `cargo bench -p snas-proxy --bench core` (add `-- --quick` for a short run).

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, BatchSize, Criterion, Throughput};
use snas_proxy::clock::Nanos;
use snas_proxy::conntrack::{Conntrack, Direction, FlowKey, Open, TcpFlags};
use snas_proxy::pacer::{PaceRate, PacedQueue, PacerConfig, PacingKey, PacingRates};
use snas_proxy::synthetic::{self, WIDE};

const FLOWS: u32 = 1_000_000;

fn key(i: u32, distinct_dests: bool) -> FlowKey {
    synthetic::flow_key(i, distinct_dests)
}

fn tracker() -> Conntrack {
    synthetic::tracker(2 * FLOWS).expect("valid config")
}

fn fill(ct: &mut Conntrack, n: u32, distinct_dests: bool) {
    synthetic::fill(ct, n, distinct_dests).unwrap_or_else(|e| panic!("{e}"));
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
                black_box(ct.observe(id, Direction::Original, TcpFlags::ACK, 60, Nanos::ZERO));
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
                job: snas_wire::JobKey(0xbe7c_0000_0000 + u64::from(n / 60_000)),
                ..key(n % FLOWS, false)
            };
            if let Open::Created { id, .. } = ct.open(k, snas_wire::TenantId(99), WIDE, Nanos::ZERO)
            {
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
                            job: snas_wire::JobKey(p % jobs),
                            tenant: snas_wire::TenantId((p % jobs % 16) as u32),
                        };
                        let rates = PacingRates {
                            job: PaceRate::gbit(1),
                            tenant: PaceRate::gbit(10),
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
    benches();
    Criterion::default().configure_from_args().final_summary();
}
