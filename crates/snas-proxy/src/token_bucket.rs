//! Token bucket as pure arithmetic on an injected time (Firecracker's `rate_limiter` model).
//!
//! Used for the per-job `new_connections_per_sec` limit: one token per new flow, refilled at
//! `rate_per_sec`, holding at most `burst` tokens. The bucket starts full.
//!
//! # Invariants
//! - Exact integer arithmetic: credit is kept in token-nanoseconds (`tokens × 10⁹`), so refill
//!   never drifts or loses fractions however often it is called.
//! - `0 ≤ credit ≤ burst × 10⁹`. Time that goes backwards refills nothing.
//! - `rate_per_sec = 0` means the bucket never refills: `burst` tokens in total, then refusals.
//!   There is no "unlimited" value; a caller that wants none does not consult a bucket.
//!
//! # Limits
//! Owns no timer: [`TokenBucket::time_until`] says when tokens will be there, and the caller
//! decides whether to wait (the proxy never waits: it refuses with
//! `Reason::NewConnectionRate`).

use std::time::Duration;

use crate::clock::Nanos;

const NANOS_PER_SEC: u128 = 1_000_000_000;

/// Invalid token bucket parameters.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenBucketError {
    /// burst must be at least one token
    #[error("token bucket burst must be at least 1 token")]
    ZeroBurst,
}

/// A token bucket refilled continuously at `rate_per_sec`, holding at most `burst` tokens.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate_per_sec: u64,
    burst: u64,
    /// Tokens × 10⁹.
    credit: u128,
    last: Nanos,
}

impl TokenBucket {
    /// A full bucket at time `now`.
    pub fn new(rate_per_sec: u64, burst: u64, now: Nanos) -> Result<TokenBucket, TokenBucketError> {
        if burst == 0 {
            return Err(TokenBucketError::ZeroBurst);
        }
        Ok(TokenBucket {
            rate_per_sec,
            burst,
            credit: u128::from(burst) * NANOS_PER_SEC,
            last: now,
        })
    }

    /// Refill rate in tokens per second.
    pub fn rate_per_sec(&self) -> u64 {
        self.rate_per_sec
    }

    /// Capacity in tokens.
    pub fn burst(&self) -> u64 {
        self.burst
    }

    fn cap(&self) -> u128 {
        u128::from(self.burst) * NANOS_PER_SEC
    }

    fn refill(&mut self, now: Nanos) {
        if now <= self.last {
            return;
        }
        let elapsed = u128::from(now.as_nanos() - self.last.as_nanos());
        self.credit = self
            .credit
            .saturating_add(elapsed.saturating_mul(u128::from(self.rate_per_sec)))
            .min(self.cap());
        self.last = now;
    }

    /// Whole tokens available at `now`.
    pub fn available(&mut self, now: Nanos) -> u64 {
        self.refill(now);
        u64::try_from(self.credit / NANOS_PER_SEC).unwrap_or(u64::MAX)
    }

    /// Takes `n` tokens if all of them are there; otherwise takes none and returns false.
    pub fn try_take(&mut self, n: u64, now: Nanos) -> bool {
        self.refill(now);
        let cost = u128::from(n) * NANOS_PER_SEC;
        if cost <= self.credit {
            self.credit -= cost;
            true
        } else {
            false
        }
    }

    /// How long from `now` until `n` tokens are there; `None` if never (more than `burst`, or
    /// rate zero and not enough left).
    pub fn time_until(&mut self, n: u64, now: Nanos) -> Option<Duration> {
        self.refill(now);
        let cost = u128::from(n) * NANOS_PER_SEC;
        if cost <= self.credit {
            return Some(Duration::ZERO);
        }
        if n > self.burst || self.rate_per_sec == 0 {
            return None;
        }
        let missing = cost - self.credit;
        let ns = missing.div_ceil(u128::from(self.rate_per_sec));
        Some(Duration::from_nanos(u64::try_from(ns).unwrap_or(u64::MAX)))
    }

    /// Changes rate and burst (live policy update), keeping the current credit clamped to the new
    /// burst.
    pub fn reconfigure(
        &mut self,
        rate_per_sec: u64,
        burst: u64,
        now: Nanos,
    ) -> Result<(), TokenBucketError> {
        if burst == 0 {
            return Err(TokenBucketError::ZeroBurst);
        }
        self.refill(now);
        self.rate_per_sec = rate_per_sec;
        self.burst = burst;
        self.credit = self.credit.min(self.cap());
        Ok(())
    }
}

/// Per-job new-connection buckets (`new_connections_per_sec` with burst), created on a job's
/// first new flow.
///
/// Eviction is exact: a bucket that has refilled to its burst behaves exactly like a new one, so
/// [`JobBuckets::evict_full`] drops those and nothing a job can observe changes.
#[derive(Debug, Default)]
pub struct JobBuckets {
    buckets: std::collections::HashMap<snas_wire::JobKey, TokenBucket>,
}

impl JobBuckets {
    /// No buckets.
    pub fn new() -> JobBuckets {
        JobBuckets::default()
    }

    /// Takes one token from `job`'s bucket (created full with `rate_per_sec`/`burst`, or updated
    /// to them if the policy changed). False means: refuse with `Reason::NewConnectionRate`.
    pub fn try_new_flow(
        &mut self,
        job: snas_wire::JobKey,
        rate_per_sec: u64,
        burst: u64,
        now: Nanos,
    ) -> Result<bool, TokenBucketError> {
        let b = match self.buckets.entry(job) {
            std::collections::hash_map::Entry::Occupied(e) => {
                let b = e.into_mut();
                if b.rate_per_sec != rate_per_sec || b.burst != burst {
                    b.reconfigure(rate_per_sec, burst, now)?;
                }
                b
            }
            std::collections::hash_map::Entry::Vacant(e) => {
                e.insert(TokenBucket::new(rate_per_sec, burst, now)?)
            }
        };
        Ok(b.try_take(1, now))
    }

    /// Removes buckets that are full again at `now` (indistinguishable from new ones).
    pub fn evict_full(&mut self, now: Nanos) {
        self.buckets.retain(|_, b| {
            b.refill(now);
            b.credit < b.cap()
        });
    }

    /// Removes a job's bucket (job ended).
    pub fn forget(&mut self, job: snas_wire::JobKey) {
        self.buckets.remove(&job);
    }

    /// Buckets held.
    pub fn len(&self) -> usize {
        self.buckets.len()
    }

    /// True when no bucket is held.
    pub fn is_empty(&self) -> bool {
        self.buckets.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at_ms(ms: u64) -> Nanos {
        Nanos::from_nanos(ms * 1_000_000)
    }

    #[test]
    fn starts_full_and_refuses_beyond_burst() {
        let mut b = TokenBucket::new(10, 3, at_ms(0)).unwrap();
        assert!(b.try_take(1, at_ms(0)));
        assert!(b.try_take(1, at_ms(0)));
        assert!(b.try_take(1, at_ms(0)));
        assert!(!b.try_take(1, at_ms(0)));
    }

    #[test]
    fn refills_at_rate_without_losing_fractions() {
        let mut b = TokenBucket::new(10, 1, at_ms(0)).unwrap();
        assert!(b.try_take(1, at_ms(0)));
        // 10/s = one token per 100 ms; polled every 1 ms, fractions must add up exactly.
        let mut granted = 0;
        for ms in 1..=1_000 {
            if b.try_take(1, at_ms(ms)) {
                granted += 1;
            }
        }
        assert_eq!(granted, 10);
    }

    #[test]
    fn refill_is_capped_at_burst() {
        let mut b = TokenBucket::new(1_000, 5, at_ms(0)).unwrap();
        assert!(b.try_take(5, at_ms(0)));
        assert_eq!(b.available(at_ms(60_000)), 5);
    }

    #[test]
    fn zero_rate_never_refills() {
        let mut b = TokenBucket::new(0, 2, at_ms(0)).unwrap();
        assert!(b.try_take(2, at_ms(0)));
        assert!(!b.try_take(1, at_ms(3_600_000)));
        assert_eq!(b.time_until(1, at_ms(3_600_000)), None);
    }

    #[test]
    fn zero_burst_is_rejected() {
        assert_eq!(
            TokenBucket::new(10, 0, at_ms(0)).unwrap_err(),
            TokenBucketError::ZeroBurst
        );
    }

    #[test]
    fn time_until_says_when_tokens_arrive() {
        let mut b = TokenBucket::new(4, 2, at_ms(0)).unwrap();
        assert!(b.try_take(2, at_ms(0)));
        assert_eq!(b.time_until(1, at_ms(0)), Some(Duration::from_millis(250)));
        assert_eq!(b.time_until(3, at_ms(0)), None);
        assert!(!b.try_take(1, at_ms(249)));
        assert!(b.try_take(1, at_ms(250)));
    }

    #[test]
    fn time_going_backwards_refills_nothing() {
        let mut b = TokenBucket::new(1_000, 1, at_ms(100)).unwrap();
        assert!(b.try_take(1, at_ms(100)));
        assert!(!b.try_take(1, at_ms(50)));
        assert!(!b.try_take(1, at_ms(100)));
    }

    #[test]
    fn reconfigure_clamps_credit_to_new_burst() {
        let mut b = TokenBucket::new(10, 100, at_ms(0)).unwrap();
        b.reconfigure(10, 3, at_ms(0)).unwrap();
        assert_eq!(b.available(at_ms(0)), 3);
    }

    #[test]
    fn job_buckets_limit_each_job_separately() {
        let mut jb = JobBuckets::new();
        assert!(jb
            .try_new_flow(snas_wire::JobKey(1), 1, 2, at_ms(0))
            .unwrap());
        assert!(jb
            .try_new_flow(snas_wire::JobKey(1), 1, 2, at_ms(0))
            .unwrap());
        assert!(!jb
            .try_new_flow(snas_wire::JobKey(1), 1, 2, at_ms(0))
            .unwrap());
        assert!(jb
            .try_new_flow(snas_wire::JobKey(2), 1, 2, at_ms(0))
            .unwrap());
        assert!(jb
            .try_new_flow(snas_wire::JobKey(1), 1, 2, at_ms(1_000))
            .unwrap());
    }

    #[test]
    fn only_refilled_buckets_are_evicted() {
        let mut jb = JobBuckets::new();
        jb.try_new_flow(snas_wire::JobKey(1), 10, 5, at_ms(0))
            .unwrap();
        jb.try_new_flow(snas_wire::JobKey(2), 10, 5, at_ms(900))
            .unwrap();
        jb.evict_full(at_ms(950));
        assert_eq!(jb.len(), 1);
        jb.evict_full(at_ms(1_000));
        assert!(jb.is_empty());
    }

    #[test]
    fn policy_change_reconfigures_the_bucket() {
        let mut jb = JobBuckets::new();
        assert!(jb
            .try_new_flow(snas_wire::JobKey(1), 0, 3, at_ms(0))
            .unwrap());
        assert!(jb
            .try_new_flow(snas_wire::JobKey(1), 0, 1, at_ms(0))
            .unwrap());
        assert!(!jb
            .try_new_flow(snas_wire::JobKey(1), 0, 1, at_ms(0))
            .unwrap());
        assert_eq!(
            jb.try_new_flow(snas_wire::JobKey(1), 0, 0, at_ms(0))
                .unwrap_err(),
            TokenBucketError::ZeroBurst
        );
    }
}
