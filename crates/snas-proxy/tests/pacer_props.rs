//! Pacer properties over random arrivals, sizes and rates (several jobs in one tenant):
//! - no packet is stamped beyond the horizon (or one 64 KiB burst at its binding rate);
//! - a job's departures never decrease (its packets stay in order);
//! - neither a job nor the tenant ever gets ahead of its rate by more than one packet: the
//!   bytes stamped to leave by any departure time T fit in rate × (T − first arrival) plus the
//!   largest packet (start-time EDT: a packet leaves once the ones before it have had their
//!   time, so its own transmission time is charged to the next).

use std::time::Duration;

use proptest::prelude::*;
use snas_proxy::clock::Nanos;
use snas_proxy::pacer::{Pacer, PacerConfig, PacingKey, PacingRates, Stamp, BURST_BYTES};
use snas_wire::Bps;

#[derive(Debug, Clone)]
struct Arrival {
    gap_us: u32,
    job: usize,
    len: u32,
}

/// `n` Mbit/s (the strategies never draw 0).
fn mbit(n: u64) -> Bps {
    Bps::mbit(n).expect("a non-zero rate")
}

fn arrival() -> impl Strategy<Value = Arrival> {
    (0u32..400, 0usize..4, 40u32..9_000).prop_map(|(gap_us, job, len)| Arrival { gap_us, job, len })
}

/// Bytes `(departure, len)` leaving by each departure time T never exceed
/// `rate × (T − start)` plus one packet of the largest size.
fn check_rate(sent: &mut [(Nanos, u32)], rate: Bps, start: Nanos) -> Result<(), TestCaseError> {
    sent.sort_by_key(|(d, _)| *d);
    let burst = u128::from(sent.iter().map(|(_, l)| *l).max().unwrap_or(0));
    let mut bytes: u128 = 0;
    for (d, len) in sent.iter() {
        bytes += u128::from(*len);
        let elapsed = u128::from(d.as_nanos() - start.as_nanos());
        prop_assert!(
            (bytes - burst.min(bytes)) * 8 * 1_000_000_000 <= u128::from(rate.get()) * elapsed,
            "{} B by {:?} exceeds {:?} since {:?} by more than one {} B packet",
            bytes,
            d,
            rate,
            start,
            burst
        );
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn pacing_never_exceeds_rates_or_horizon(
        arrivals in proptest::collection::vec(arrival(), 1..600),
        job_mbit in proptest::collection::vec(1u64..200, 4),
        tenant_mbit in 1u64..300,
    ) {
        let cfg = PacerConfig::default();
        let mut p = Pacer::new(cfg).map_err(|e| TestCaseError::fail(e.to_string()))?;
        let tenant_rate = mbit(tenant_mbit);
        let mut now = Nanos::ZERO;
        let mut per_job: Vec<Vec<(Nanos, u32)>> = vec![Vec::new(); 4];
        let mut first: Vec<Option<Nanos>> = vec![None; 4];
        let mut all = Vec::new();
        let mut tenant_first = None;
        for a in arrivals {
            now = now.saturating_add(Duration::from_micros(u64::from(a.gap_us)));
            let key = PacingKey { job: snas_wire::JobKey(a.job as u64), tenant: snas_wire::TenantId(1) };
            let rates = PacingRates { job: mbit(job_mbit[a.job]).into(), tenant: tenant_rate.into() };
            first[a.job].get_or_insert(now);
            tenant_first.get_or_insert(now);
            if let Stamp::Depart(d) = p.stamp(key, rates, a.len, now) {
                prop_assert!(d >= now);
                // The horizon, or one 64 KiB burst at the job's rate or its share of the
                // tenant (at most 4 jobs), whichever is longer.
                let burst = |bps: u64| Duration::from_nanos(
                    (u64::from(BURST_BYTES) * 8 * 1_000_000_000).div_ceil(bps),
                );
                let horizon = cfg
                    .horizon
                    .max(burst(mbit(job_mbit[a.job]).get()))
                    .max(burst(tenant_rate.get()) * 4);
                prop_assert!(d.saturating_duration_since(now) <= horizon);
                if let Some((last, _)) = per_job[a.job].last() {
                    prop_assert!(d >= *last, "job {} reordered", a.job);
                }
                per_job[a.job].push((d, a.len));
                all.push((d, a.len));
            }
        }
        for (j, sent) in per_job.iter_mut().enumerate() {
            if let Some(start) = first[j] {
                check_rate(sent, mbit(job_mbit[j]), start)?;
            }
        }
        if let Some(start) = tenant_first {
            check_rate(&mut all, tenant_rate, start)?;
        }
    }
}
