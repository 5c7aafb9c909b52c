//! Pacer under simulated time: released bytes match the configured rate, and equal jobs under a
//! tenant cap get equal shares however their packets are ordered.

use std::time::Duration;

use snas_proxy::clock::Nanos;
use snas_proxy::pacer::{Enqueue, PaceRate, PacedQueue, PacerConfig, PacingKey, PacingRates};
use snas_wire::Bps;

const PACKET: u32 = 1500;

/// Greedy senders: every `step`, each key (in the given order) offers packets until one is
/// dropped; the queue releases what is due. Returns bytes released per key within `duration`.
fn simulate(
    keys: &[PacingKey],
    rates: PacingRates,
    duration: Duration,
    step: Duration,
) -> Vec<u64> {
    let mut q = PacedQueue::new(PacerConfig::default(), Nanos::ZERO)
        .expect("default pacer config is valid");
    let mut released = vec![0u64; keys.len()];
    let mut out: Vec<usize> = Vec::new();
    let mut now = Nanos::ZERO;
    let end = Nanos::ZERO.saturating_add(duration);
    while now <= end {
        for (i, k) in keys.iter().enumerate() {
            while let Enqueue::Queued(_) = q.enqueue(*k, rates, PACKET, i, now) {}
        }
        q.pop_due(now, &mut out);
        for i in out.drain(..) {
            released[i] += u64::from(PACKET);
        }
        now = now.saturating_add(step);
    }
    released
}

fn assert_within_one_percent(rate: Bps) {
    let key = PacingKey {
        job: snas_wire::JobKey(1),
        tenant: snas_wire::TenantId(1),
    };
    let rates = PacingRates {
        job: PaceRate::Limited(rate),
        tenant: PaceRate::Unlimited,
    };
    let secs = 10;
    let bytes = simulate(
        &[key],
        rates,
        Duration::from_secs(secs),
        Duration::from_micros(100),
    )[0];
    let expected = rate.get() as f64 * secs as f64 / 8.0;
    let err = (bytes as f64 - expected).abs() / expected;
    assert!(
        err < 0.01,
        "rate {rate:?}: released {bytes} B, expected {expected} B ({:.4}%)",
        err * 100.0
    );
}

#[test]
fn ten_megabit_job_releases_its_rate() {
    assert_within_one_percent(Bps::mbit(10).unwrap());
}

#[test]
fn hundred_megabit_job_releases_its_rate() {
    assert_within_one_percent(Bps::mbit(100).unwrap());
}

#[test]
fn gigabit_job_releases_its_rate() {
    assert_within_one_percent(Bps::gbit(1).unwrap());
}

fn jain(xs: &[u64]) -> f64 {
    let sum: f64 = xs.iter().map(|x| *x as f64).sum();
    let sq: f64 = xs.iter().map(|x| (*x as f64).powi(2)).sum();
    sum * sum / (xs.len() as f64 * sq)
}

#[test]
fn four_equal_jobs_share_a_tenant_cap_equally() {
    // Each job may do 100 Mbit/s, the tenant only 100 Mbit/s in total; job 0 always offers
    // first, which with a first-come tenant clock would let it take nearly everything.
    let keys: Vec<PacingKey> = (0..4)
        .map(|j| PacingKey {
            job: snas_wire::JobKey(j),
            tenant: snas_wire::TenantId(7),
        })
        .collect();
    let rates = PacingRates {
        job: PaceRate::mbit(100),
        tenant: PaceRate::mbit(100),
    };
    let secs = 10;
    let bytes = simulate(
        &keys,
        rates,
        Duration::from_secs(secs),
        Duration::from_micros(100),
    );
    let index = jain(&bytes);
    assert!(index >= 0.99, "shares {bytes:?}, Jain {index}");
    let total: u64 = bytes.iter().sum();
    let cap = 100e6 * secs as f64 / 8.0;
    assert!(
        (total as f64) <= cap * 1.01,
        "tenant cap exceeded: {total} B > {cap} B"
    );
    assert!(
        (total as f64) >= cap * 0.99,
        "tenant cap not used: {total} B < {cap} B"
    );
}

#[test]
fn a_job_joining_late_gets_its_share() {
    let rates = PacingRates {
        job: PaceRate::mbit(100),
        tenant: PaceRate::mbit(40),
    };
    let a = PacingKey {
        job: snas_wire::JobKey(1),
        tenant: snas_wire::TenantId(3),
    };
    let b = PacingKey {
        job: snas_wire::JobKey(2),
        tenant: snas_wire::TenantId(3),
    };
    let mut q = PacedQueue::new(PacerConfig::default(), Nanos::ZERO)
        .expect("default pacer config is valid");
    let mut out: Vec<u64> = Vec::new();
    let mut released = [0u64; 2];
    let step = Duration::from_micros(100);
    let mut now = Nanos::ZERO;
    // A alone for 1 s, then A and B for 2 s; measure the last second.
    for tick in 0..30_000u64 {
        while let Enqueue::Queued(_) = q.enqueue(a, rates, PACKET, 0, now) {}
        if tick >= 10_000 {
            while let Enqueue::Queued(_) = q.enqueue(b, rates, PACKET, 1, now) {}
        }
        q.pop_due(now, &mut out);
        for i in out.drain(..) {
            if tick >= 20_000 {
                released[i as usize] += u64::from(PACKET);
            }
        }
        now = now.saturating_add(step);
    }
    let index = jain(&released);
    assert!(index >= 0.99, "shares {released:?}, Jain {index}");
}
