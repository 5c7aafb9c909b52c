//! EDT pacer: per-job and per-tenant rate limits as departure times, with a bounded queueing
//! delay, and a timer-wheel queue that releases packets when due.
//!
//! One [`Pacer`] paces one direction; the proxy keeps two (egress = upload limits, ingress =
//! download limits), each fed the matching policy rate.
//!
//! # Semantics
//! A packet of `len` bytes of job `j` in tenant `T` at time `now` gets the departure time
//! `d = max(s_job, s_tenant, s_share)` with `s_c = max(now, c)`, and each clock `c` then
//! advances to `s_c + len·8·10⁹ / rate_c` nanoseconds (start-time EDT, as with fq: a packet of
//! an idle job leaves at once and its transmission time delays the next one, so pacing adds no
//! latency below the rate; a burst is at most one packet):
//! - the **job clock** runs at the job's rate;
//! - the **tenant clock** runs at the tenant's cap (a hard ceiling on the tenant's sum);
//! - the job's **share clock** runs at `tenant cap / n`, where `n` is the number of the tenant's
//!   jobs that sent in the current or previous activity window (default 20 ms). This is what
//!   makes the cap fair: a job cannot take more than its `1/n` of the tenant, whatever order
//!   packets arrive in, so greedy jobs get equal shares instead of whoever enqueues first.
//!
//! If `d − now` exceeds the horizon (the queueing-delay budget, default 20 ms, but never less
//! than [`BURST_BYTES`] take at the job's rate or its share, so that one 64 KiB super-packet
//! split by the proxy always fits) the packet is
//! dropped ([`Reason::PacingHorizon`]), counted, and no clock moves. Otherwise all three clocks
//! move as above. Departures of one job never decrease, so a flow's packets stay in order.
//!
//! # Rates
//! A rate is a [`PaceRate`]: `Limited(Bps)` (bits per second, [`snas_wire::Bps`], never zero),
//! `Unlimited` (costs no time) or `Blocked` (every packet is dropped). An enum rather than
//! `Option<Bps>` because the pacer has three behaviours, and an `Option` would leave `None` to
//! mean either "no limit" or "nothing passes" (the confusion of a rate where 0 means one of
//! them).
//! There is no default: the caller passes both rates with every packet (from the job's signed
//! policy and the tenant's configuration), so nothing is unlimited by accident.
//!
//! # Limits
//! - Fair, not fully work-conserving: when an active job sends less than its `1/n`, the rest of
//!   its share is not handed to the others (the cap is a ceiling, not a guarantee).
//! - Transmission times are rounded up to whole nanoseconds per packet (< 0.01 % at 1500 B and
//!   10 Gbit/s).
//! - Per-job and per-tenant state is removed by [`Pacer::evict_idle`], which the caller runs
//!   periodically (it scans, O(entries)); counters of evicted entries are gone.

use snas_wire::{JobKey, TenantId};
use std::collections::HashMap;
use std::time::Duration;

use snas_wire::{Bps, Reason};

use crate::clock::{duration_to_nanos, Nanos};
use crate::wheel::{TimerWheel, WheelError};

/// Bytes of one segmentation burst (the largest TCP super-packet): the horizon is never shorter
/// than the time this takes at the packet's binding rate.
pub const BURST_BYTES: u32 = 65_536;

/// The rate a packet is paced at. See "Rates" in the module documentation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PaceRate {
    /// Every packet is dropped.
    Blocked,
    /// Paced at this rate.
    Limited(Bps),
    /// No limit: packets cost no time.
    Unlimited,
}

impl PaceRate {
    /// `n` megabits (10⁶ bits) per second; [`PaceRate::Blocked`] for 0 (nothing can pass at
    /// zero), [`PaceRate::Unlimited`] on overflow.
    pub const fn mbit(n: u64) -> PaceRate {
        PaceRate::bits(n, 1_000_000)
    }

    /// `n` gigabits (10⁹ bits) per second, as [`PaceRate::mbit`].
    pub const fn gbit(n: u64) -> PaceRate {
        PaceRate::bits(n, 1_000_000_000)
    }

    const fn bits(n: u64, unit: u64) -> PaceRate {
        match n.checked_mul(unit) {
            None => PaceRate::Unlimited,
            Some(v) => match Bps::new(v) {
                Some(b) => PaceRate::Limited(b),
                None => PaceRate::Blocked,
            },
        }
    }

    /// Nanoseconds to send `len` bytes, rounded up; `None` when blocked.
    fn tx_nanos(self, len: u32) -> Option<u64> {
        match self {
            PaceRate::Blocked => None,
            PaceRate::Unlimited => Some(0),
            PaceRate::Limited(r) => {
                let ns = (u128::from(len) * 8 * 1_000_000_000).div_ceil(u128::from(r.get()));
                Some(u64::try_from(ns).unwrap_or(u64::MAX))
            }
        }
    }
}

impl From<Bps> for PaceRate {
    fn from(b: Bps) -> PaceRate {
        PaceRate::Limited(b)
    }
}

/// Who a packet is charged to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PacingKey {
    /// Job key.
    pub job: JobKey,
    /// Tenant id.
    pub tenant: TenantId,
}

/// The limits in force for a packet (from the job's policy and the tenant's configuration).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PacingRates {
    /// The job's rate in this direction.
    pub job: PaceRate,
    /// The tenant's cap in this direction.
    pub tenant: PaceRate,
}

/// Pacer configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PacerConfig {
    /// Queueing-delay budget (default 20 ms).
    pub horizon: Duration,
    /// Window in which a job counts as active for the fair share (default 20 ms).
    pub activity_window: Duration,
    /// Timer wheel slot width (default 10 µs).
    pub granularity: Duration,
}

impl Default for PacerConfig {
    fn default() -> Self {
        PacerConfig {
            horizon: Duration::from_millis(20),
            activity_window: Duration::from_millis(20),
            granularity: Duration::from_micros(10),
        }
    }
}

/// Invalid pacer configuration.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PacerError {
    /// the activity window must be longer than zero
    #[error("pacer activity window must be greater than zero")]
    ZeroActivityWindow,
    /// the timer wheel cannot be built
    #[error("pacer timer wheel: {0}")]
    Wheel(#[from] WheelError),
}

/// Outcome of [`Pacer::stamp`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stamp {
    /// Send at this time.
    Depart(Nanos),
    /// Dropped (always [`Reason::PacingHorizon`]; counted).
    Drop(Reason),
}

/// Packet and byte counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PacingStats {
    /// Packets given a departure time.
    pub passed_packets: u64,
    /// Bytes given a departure time.
    pub passed_bytes: u64,
    /// Packets dropped beyond the horizon.
    pub dropped_packets: u64,
    /// Bytes dropped beyond the horizon.
    pub dropped_bytes: u64,
}

impl PacingStats {
    fn pass(&mut self, len: u32) {
        self.passed_packets += 1;
        self.passed_bytes += u64::from(len);
    }

    fn drop(&mut self, len: u32) {
        self.dropped_packets += 1;
        self.dropped_bytes += u64::from(len);
    }
}

#[derive(Debug, Clone)]
struct JobClock {
    t_job: Nanos,
    t_share: Nanos,
    window: u64,
    stats: PacingStats,
}

#[derive(Debug, Clone)]
struct TenantClock {
    t: Nanos,
    window: u64,
    active_now: u32,
    active_before: u32,
    stats: PacingStats,
}

impl TenantClock {
    fn roll(&mut self, window: u64) {
        if window != self.window {
            self.active_before = if window == self.window + 1 {
                self.active_now
            } else {
                0
            };
            self.active_now = 0;
            self.window = window;
        }
    }
}

/// Per-job and per-tenant EDT clocks. See the module documentation.
#[derive(Debug)]
pub struct Pacer {
    horizon_ns: u64,
    window_ns: u64,
    jobs: HashMap<JobKey, JobClock>,
    tenants: HashMap<TenantId, TenantClock>,
    totals: PacingStats,
}

impl Pacer {
    /// A pacer with no state.
    pub fn new(cfg: PacerConfig) -> Result<Pacer, PacerError> {
        let window_ns = duration_to_nanos(cfg.activity_window);
        if window_ns == 0 {
            return Err(PacerError::ZeroActivityWindow);
        }
        Ok(Pacer {
            horizon_ns: duration_to_nanos(cfg.horizon),
            window_ns,
            jobs: HashMap::new(),
            tenants: HashMap::new(),
            totals: PacingStats::default(),
        })
    }

    /// The queueing-delay budget.
    pub fn horizon(&self) -> Duration {
        Duration::from_nanos(self.horizon_ns)
    }

    /// Departure time for a packet of `len` bytes charged to `key` under `rates` at `now`, or a
    /// drop. See the module documentation for the exact rule.
    pub fn stamp(&mut self, key: PacingKey, rates: PacingRates, len: u32, now: Nanos) -> Stamp {
        let window = now.as_nanos() / self.window_ns;
        let tenant = self.tenants.entry(key.tenant).or_insert(TenantClock {
            t: now,
            window,
            active_now: 0,
            active_before: 0,
            stats: PacingStats::default(),
        });
        tenant.roll(window);
        let job = self.jobs.entry(key.job).or_insert(JobClock {
            t_job: now,
            t_share: now,
            window: u64::MAX,
            stats: PacingStats::default(),
        });
        if job.window != window {
            job.window = window;
            tenant.active_now += 1;
        }
        let n = tenant.active_now.max(tenant.active_before).max(1);

        let (Some(tx_job), Some(tx_tenant)) = (rates.job.tx_nanos(len), rates.tenant.tx_nanos(len))
        else {
            job.stats.drop(len);
            tenant.stats.drop(len);
            self.totals.drop(len);
            return Stamp::Drop(Reason::PacingHorizon);
        };
        let tx_share = tx_tenant.saturating_mul(u64::from(n));
        // Start-time EDT (as fq's users do): the packet leaves when every clock has caught up
        // with the packets before it, and its own transmission time is charged to the next.
        let s_job = job.t_job.max(now);
        let s_share = job.t_share.max(now);
        let s_tenant = tenant.t.max(now);
        let departure = s_job.max(s_share).max(s_tenant);
        let d_job = s_job.saturating_add_nanos(tx_job);
        let d_share = s_share.saturating_add_nanos(tx_share);
        let d_tenant = s_tenant.saturating_add_nanos(tx_tenant);
        // A low rate must still admit one whole segmentation burst (a 64 KiB TCP super-packet
        // split by the proxy arrives at once): else every such burst loses its tail and TCP
        // never reaches the rate (10 Mbit/s achieved 83% with a flat 20 ms horizon).
        let burst_ns = rates.job.tx_nanos(BURST_BYTES).unwrap_or(0).max(
            rates
                .tenant
                .tx_nanos(BURST_BYTES)
                .unwrap_or(0)
                .saturating_mul(u64::from(n)),
        );
        if departure.as_nanos() - now.as_nanos() > self.horizon_ns.max(burst_ns) {
            job.stats.drop(len);
            tenant.stats.drop(len);
            self.totals.drop(len);
            return Stamp::Drop(Reason::PacingHorizon);
        }
        job.t_job = d_job;
        job.t_share = d_share;
        tenant.t = d_tenant;
        job.stats.pass(len);
        tenant.stats.pass(len);
        self.totals.pass(len);
        Stamp::Depart(departure)
    }

    /// Counters of a job (since its state was created).
    pub fn job_stats(&self, job: JobKey) -> Option<PacingStats> {
        self.jobs.get(&job).map(|j| j.stats)
    }

    /// Counters of a tenant (since its state was created).
    pub fn tenant_stats(&self, tenant: TenantId) -> Option<PacingStats> {
        self.tenants.get(&tenant).map(|t| t.stats)
    }

    /// Counters over everything this pacer has seen.
    pub fn totals(&self) -> PacingStats {
        self.totals
    }

    /// Jobs and tenants with state.
    pub fn entries(&self) -> (usize, usize) {
        (self.jobs.len(), self.tenants.len())
    }

    /// Removes the state of jobs and tenants with nothing queued and no packet for `idle`.
    pub fn evict_idle(&mut self, now: Nanos, idle: Duration) {
        let cutoff = now.saturating_sub(idle);
        let cutoff_window = cutoff.as_nanos() / self.window_ns;
        self.jobs
            .retain(|_, j| j.t_job.max(j.t_share) > cutoff || j.window >= cutoff_window);
        self.tenants
            .retain(|_, t| t.t > cutoff || t.window >= cutoff_window);
    }

    /// Forgets a job (it ended).
    pub fn forget_job(&mut self, job: JobKey) {
        self.jobs.remove(&job);
    }
}

/// Outcome of [`PacedQueue::enqueue`].
#[derive(Debug, PartialEq, Eq)]
pub enum Enqueue<T> {
    /// Queued; released at this time.
    Queued(Nanos),
    /// Dropped; the item is handed back so the caller can recycle its buffer.
    Dropped(Reason, T),
}

/// A [`Pacer`] plus a [`TimerWheel`] that holds packets until their departure time.
#[derive(Debug)]
pub struct PacedQueue<T> {
    pacer: Pacer,
    wheel: TimerWheel<T>,
}

impl<T> PacedQueue<T> {
    /// An empty queue at time `now`; the wheel spans the horizon.
    pub fn new(cfg: PacerConfig, now: Nanos) -> Result<PacedQueue<T>, PacerError> {
        let span = cfg.horizon.saturating_add(cfg.granularity);
        Ok(PacedQueue {
            pacer: Pacer::new(cfg)?,
            wheel: TimerWheel::new(cfg.granularity, span, now)?,
        })
    }

    /// Stamps `item` (a packet of `len` bytes) and queues it, or hands it back with the reason.
    pub fn enqueue(
        &mut self,
        key: PacingKey,
        rates: PacingRates,
        len: u32,
        item: T,
        now: Nanos,
    ) -> Enqueue<T> {
        match self.pacer.stamp(key, rates, len, now) {
            Stamp::Depart(t) => {
                self.wheel.insert(t, item);
                Enqueue::Queued(t)
            }
            Stamp::Drop(r) => Enqueue::Dropped(r, item),
        }
    }

    /// Moves every packet due at `now` into `out`, in departure order.
    pub fn pop_due<E: Extend<T>>(&mut self, now: Nanos, out: &mut E) {
        self.wheel.pop_due(now, out);
    }

    /// Packets queued.
    pub fn len(&self) -> usize {
        self.wheel.len()
    }

    /// True when nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.wheel.is_empty()
    }

    /// Earliest time a packet may be due (for the I/O loop's sleep).
    pub fn next_due_hint(&self) -> Option<Nanos> {
        self.wheel.next_due_hint()
    }

    /// The pacer (counters, eviction).
    pub fn pacer(&self) -> &Pacer {
        &self.pacer
    }

    /// The pacer, mutably (eviction, forgetting jobs).
    pub fn pacer_mut(&mut self) -> &mut Pacer {
        &mut self.pacer
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: PacingKey = PacingKey {
        job: JobKey(1),
        tenant: TenantId(9),
    };

    fn ms(n: u64) -> Nanos {
        Nanos::from_nanos(n * 1_000_000)
    }

    fn pacer() -> Pacer {
        Pacer::new(PacerConfig::default()).unwrap()
    }

    fn rates(job: PaceRate, tenant: PaceRate) -> PacingRates {
        PacingRates { job, tenant }
    }

    #[test]
    fn departures_are_spaced_by_len_over_rate() {
        let mut p = pacer();
        let r = rates(PaceRate::mbit(12), PaceRate::Unlimited);
        // 1500 B at 12 Mbit/s = 1 ms; the first packet of an idle job leaves at once.
        assert_eq!(p.stamp(KEY, r, 1500, ms(0)), Stamp::Depart(ms(0)));
        assert_eq!(p.stamp(KEY, r, 1500, ms(0)), Stamp::Depart(ms(1)));
        assert_eq!(p.stamp(KEY, r, 1500, ms(0)), Stamp::Depart(ms(2)));
        // After idling, the clock restarts from now (no credit for idle time).
        assert_eq!(p.stamp(KEY, r, 1500, ms(10)), Stamp::Depart(ms(10)));
        assert_eq!(p.stamp(KEY, r, 1500, ms(10)), Stamp::Depart(ms(11)));
    }

    #[test]
    fn packets_beyond_the_horizon_are_dropped_and_counted() {
        let mut p = pacer();
        // 1500 B at 120 Mbit/s = 100 µs; the 20 ms horizon holds departures 0 ..= 20 ms.
        let r = rates(PaceRate::mbit(120), PaceRate::Unlimited);
        let us100 = |i: u64| Nanos::from_nanos(i * 100_000);
        for i in 0..=200 {
            assert_eq!(p.stamp(KEY, r, 1500, ms(0)), Stamp::Depart(us100(i)));
        }
        assert_eq!(
            p.stamp(KEY, r, 1500, ms(0)),
            Stamp::Drop(Reason::PacingHorizon)
        );
        let s = p.job_stats(JobKey(1)).unwrap();
        assert_eq!((s.passed_packets, s.dropped_packets), (201, 1));
        assert_eq!(s.dropped_bytes, 1500);
        // The drop did not move the clock.
        assert_eq!(p.stamp(KEY, r, 1500, ms(1)), Stamp::Depart(us100(201)));
    }

    #[test]
    fn a_low_rate_still_admits_one_64k_burst() {
        let mut p = pacer();
        // 12 Mbit/s, 1 ms per 1500 B: a 20 ms horizon would admit 21 packets; 64 KiB take
        // 43.7 ms, so the departures 0 ..= 43 ms are admitted.
        let r = rates(PaceRate::mbit(12), PaceRate::Unlimited);
        for i in 0..=43 {
            assert_eq!(p.stamp(KEY, r, 1500, ms(0)), Stamp::Depart(ms(i)));
        }
        assert_eq!(
            p.stamp(KEY, r, 1500, ms(0)),
            Stamp::Drop(Reason::PacingHorizon)
        );
    }

    #[test]
    fn blocked_rate_drops_everything_and_unlimited_costs_nothing() {
        let mut p = pacer();
        assert_eq!(
            p.stamp(
                KEY,
                rates(PaceRate::Blocked, PaceRate::Unlimited),
                100,
                ms(0)
            ),
            Stamp::Drop(Reason::PacingHorizon)
        );
        assert_eq!(
            p.stamp(
                KEY,
                rates(PaceRate::Unlimited, PaceRate::Unlimited),
                1500,
                ms(5)
            ),
            Stamp::Depart(ms(5))
        );
    }

    #[test]
    fn tenant_cap_binds_a_fast_job() {
        let mut p = pacer();
        let r = rates(PaceRate::gbit(1), PaceRate::mbit(12));
        assert_eq!(p.stamp(KEY, r, 1500, ms(0)), Stamp::Depart(ms(0)));
        assert_eq!(p.stamp(KEY, r, 1500, ms(0)), Stamp::Depart(ms(1)));
        assert_eq!(p.stamp(KEY, r, 1500, ms(0)), Stamp::Depart(ms(2)));
    }

    #[test]
    fn two_active_jobs_each_get_half_the_tenant() {
        let mut p = pacer();
        let r = rates(PaceRate::gbit(1), PaceRate::mbit(12));
        let other = PacingKey {
            job: JobKey(2),
            tenant: TenantId(9),
        };
        assert_eq!(p.stamp(KEY, r, 1500, ms(0)), Stamp::Depart(ms(0)));
        // Second job active: it waits for the tenant clock, then its share is 6 Mbit/s, 2 ms
        // per packet.
        assert_eq!(p.stamp(other, r, 1500, ms(0)), Stamp::Depart(ms(1)));
        assert_eq!(p.stamp(other, r, 1500, ms(0)), Stamp::Depart(ms(2)));
        assert_eq!(p.stamp(other, r, 1500, ms(0)), Stamp::Depart(ms(4)));
    }

    #[test]
    fn paced_queue_releases_in_departure_order() {
        let mut q = PacedQueue::new(PacerConfig::default(), ms(0)).unwrap();
        let r = rates(PaceRate::mbit(12), PaceRate::Unlimited);
        for i in 0..5u32 {
            assert!(matches!(
                q.enqueue(KEY, r, 1500, i, ms(0)),
                Enqueue::Queued(_)
            ));
        }
        let mut out = Vec::new();
        q.pop_due(ms(1), &mut out);
        assert_eq!(out, vec![0, 1]);
        q.pop_due(ms(5), &mut out);
        assert_eq!(out, vec![0, 1, 2, 3, 4]);
        assert!(q.is_empty());
    }

    #[test]
    fn dropped_items_are_handed_back() {
        let mut q = PacedQueue::new(PacerConfig::default(), ms(0)).unwrap();
        let r = rates(PaceRate::Blocked, PaceRate::Unlimited);
        assert_eq!(
            q.enqueue(KEY, r, 1500, 42u32, ms(0)),
            Enqueue::Dropped(Reason::PacingHorizon, 42)
        );
    }

    #[test]
    fn idle_state_is_evicted() {
        let mut p = pacer();
        let r = rates(PaceRate::mbit(12), PaceRate::Unlimited);
        p.stamp(KEY, r, 1500, ms(0));
        p.evict_idle(ms(500), Duration::from_secs(1));
        assert_eq!(p.entries(), (1, 1));
        p.evict_idle(ms(5_000), Duration::from_secs(1));
        assert_eq!(p.entries(), (0, 0));
    }
}
