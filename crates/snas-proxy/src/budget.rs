//! Per-job bounds on what every job of a proxy shares (issue 11: one job's flood must not take
//! what others need). Pure: an injected clock, no I/O.
//!
//! # What it owns
//! - [`AuditBudget`]: audit lines per job and second (a token bucket per job, burst twice the
//!   rate). A line over budget is not written but counted; the job's next written line carries
//!   how many were left out before it (`suppressed`), as the agent's DNS stub does.
//! - [`QueueBudget`]: packets and bytes one job may have waiting in a worker's pacing queue,
//!   and the worker's total. Beyond either, the packet is not queued (the worker drops it as
//!   `pacing_horizon`: the same outcome as a departure beyond the horizon).
//!
//! # Invariants
//! - State exists only for jobs that hold something: an [`AuditBudget`] entry whose bucket is
//!   full and that owes no `suppressed` count is indistinguishable from a new one and is dropped
//!   by [`AuditBudget::evict`]; a [`QueueBudget`] entry goes when the job's last queued packet
//!   leaves.
//! - [`QueueBudget`] totals equal the sums of its entries.
//!
//! # Limits
//! An entry that owes a `suppressed` count but whose job writes nothing more for
//! [`AuditBudget::OWED_KEEP`] is dropped; the count then lives only in the proxy's
//! `suppressed` counter (metrics).

use snas_wire::JobKey;
use std::collections::HashMap;
use std::time::Duration;

use crate::clock::Nanos;
use crate::token_bucket::{TokenBucket, TokenBucketError};

#[derive(Debug)]
struct AuditSlot {
    bucket: TokenBucket,
    suppressed: u64,
    last_refused: Nanos,
}

/// Audit lines per job and second. See the module documentation.
#[derive(Debug)]
pub struct AuditBudget {
    per_sec: u32,
    slots: HashMap<JobKey, AuditSlot>,
    suppressed_total: u64,
}

impl AuditBudget {
    /// How long an entry owing a `suppressed` count is kept for the job's next line.
    pub const OWED_KEEP: Duration = Duration::from_secs(600);

    /// A budget of `per_sec` lines per job and second (burst `2 × per_sec`).
    pub fn new(per_sec: u32) -> Result<AuditBudget, TokenBucketError> {
        // Checked once here, so that `admit` cannot fail later.
        TokenBucket::new(u64::from(per_sec), 2 * u64::from(per_sec), Nanos::ZERO)?;
        Ok(AuditBudget {
            per_sec,
            slots: HashMap::new(),
            suppressed_total: 0,
        })
    }

    /// Lines per job and second.
    pub fn per_sec(&self) -> u32 {
        self.per_sec
    }

    /// Whether a line of `job` may be written at `now`: `Some(n)` with the `n` lines suppressed
    /// since its last written one, or `None` (suppressed and counted).
    pub fn admit(&mut self, job: JobKey, now: Nanos) -> Option<u64> {
        let rate = u64::from(self.per_sec);
        let slot = match self.slots.entry(job) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => {
                // `new` checked these parameters: the fallback is never taken.
                let Ok(bucket) = TokenBucket::new(rate, 2 * rate, now) else {
                    return Some(0);
                };
                e.insert(AuditSlot {
                    bucket,
                    suppressed: 0,
                    last_refused: now,
                })
            }
        };
        if slot.bucket.try_take(1, now) {
            Some(std::mem::take(&mut slot.suppressed))
        } else {
            slot.suppressed += 1;
            slot.last_refused = now;
            self.suppressed_total += 1;
            None
        }
    }

    /// Lines suppressed so far, over all jobs.
    pub fn suppressed_total(&self) -> u64 {
        self.suppressed_total
    }

    /// Lines `job` owes (suppressed since its last written line).
    pub fn owed(&self, job: JobKey) -> u64 {
        self.slots.get(&job).map_or(0, |s| s.suppressed)
    }

    /// Drops entries that are full and owe nothing, and entries that owed for longer than
    /// [`AuditBudget::OWED_KEEP`].
    pub fn evict(&mut self, now: Nanos) {
        self.slots.retain(|_, s| {
            if s.suppressed > 0 {
                now.saturating_duration_since(s.last_refused) < Self::OWED_KEEP
            } else {
                s.bucket.available(now) < s.bucket.burst()
            }
        });
    }

    /// Forgets a job (it ended).
    pub fn forget(&mut self, job: JobKey) {
        self.slots.remove(&job);
    }

    /// Jobs with an entry.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// Whether no job has an entry.
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }
}

/// Bounds of a worker's pacing queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueLimits {
    /// Packets one job may have queued (default 4 096).
    pub job_packets: u32,
    /// Bytes one job may have queued (default 8 MiB: 64 ms at 1 Gbit/s).
    pub job_bytes: u64,
    /// Packets queued over all jobs (default 65 536).
    pub total_packets: u32,
    /// Bytes queued over all jobs (default 128 MiB).
    pub total_bytes: u64,
}

impl Default for QueueLimits {
    fn default() -> Self {
        QueueLimits {
            job_packets: 4096,
            job_bytes: 8 << 20,
            total_packets: 65_536,
            total_bytes: 128 << 20,
        }
    }
}

#[derive(Debug, Clone, Copy, Default)]
struct Held {
    packets: u32,
    bytes: u64,
}

/// What a worker's pacing queue holds per job. See the module documentation.
#[derive(Debug)]
pub struct QueueBudget {
    limits: QueueLimits,
    jobs: HashMap<JobKey, Held>,
    total: Held,
}

impl QueueBudget {
    /// An empty budget.
    pub fn new(limits: QueueLimits) -> QueueBudget {
        QueueBudget {
            limits,
            jobs: HashMap::new(),
            total: Held::default(),
        }
    }

    /// Accounts a packet of `len` bytes of `job` entering the queue; false (nothing accounted)
    /// when the job's or the total bound would be exceeded.
    pub fn try_add(&mut self, job: JobKey, len: u64) -> bool {
        let l = &self.limits;
        if self.total.packets >= l.total_packets
            || self.total.bytes.saturating_add(len) > l.total_bytes
        {
            return false;
        }
        let h = self.jobs.get(&job).copied().unwrap_or_default();
        if h.packets >= l.job_packets || h.bytes.saturating_add(len) > l.job_bytes {
            return false;
        }
        let h = self.jobs.entry(job).or_default();
        h.packets += 1;
        h.bytes += len;
        self.total.packets += 1;
        self.total.bytes += len;
        true
    }

    /// Accounts a packet of `len` bytes of `job` leaving the queue.
    pub fn remove(&mut self, job: JobKey, len: u64) {
        if let Some(h) = self.jobs.get_mut(&job) {
            h.packets = h.packets.saturating_sub(1);
            h.bytes = h.bytes.saturating_sub(len);
            if h.packets == 0 {
                self.jobs.remove(&job);
            }
            self.total.packets = self.total.packets.saturating_sub(1);
            self.total.bytes = self.total.bytes.saturating_sub(len);
        }
    }

    /// Packets and bytes queued, over all jobs.
    pub fn total(&self) -> (u32, u64) {
        (self.total.packets, self.total.bytes)
    }

    /// Packets and bytes queued for `job`.
    pub fn of(&self, job: JobKey) -> (u32, u64) {
        self.jobs.get(&job).map_or((0, 0), |h| (h.packets, h.bytes))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Nanos {
        Nanos::from_nanos(n * 1_000_000)
    }

    #[test]
    fn a_flooding_job_is_held_to_its_budget_and_its_next_line_carries_the_count() {
        let mut b = AuditBudget::new(10).unwrap();
        let written = (0..1000)
            .filter(|_| b.admit(JobKey(1), ms(0)).is_some())
            .count();
        assert_eq!(written, 20, "the burst is twice the rate");
        assert_eq!(b.owed(JobKey(1)), 980);
        // Another job is not affected.
        assert_eq!(b.admit(JobKey(2), ms(0)), Some(0));
        // 100 ms later one token is back: the line carries what was left out.
        assert_eq!(b.admit(JobKey(1), ms(100)), Some(980));
        assert_eq!(b.admit(JobKey(1), ms(100)), None);
        assert_eq!(b.suppressed_total(), 981);
    }

    #[test]
    fn over_a_long_run_a_job_writes_its_rate() {
        let mut b = AuditBudget::new(50).unwrap();
        // 10 s of 1000 attempts per second.
        let written = (0..10_000u64)
            .filter(|i| b.admit(JobKey(7), ms(*i)).is_some())
            .count();
        assert_eq!(
            written,
            100 + 50 * 10 - 1,
            "burst + rate × 10 s (last refill not due)"
        );
    }

    #[test]
    fn idle_entries_are_evicted_but_owed_counts_are_kept_for_a_while() {
        let mut b = AuditBudget::new(1).unwrap();
        b.admit(JobKey(1), ms(0));
        b.admit(JobKey(1), ms(0));
        assert_eq!(b.admit(JobKey(1), ms(0)), None);
        b.admit(JobKey(2), ms(0));
        b.admit(JobKey(2), ms(0));
        b.evict(ms(1_000));
        assert_eq!(
            b.len(),
            2,
            "job 1 owes a count; job 2 is refilling (2 s at 1/s)"
        );
        b.evict(ms(10_000));
        assert_eq!(b.len(), 1, "job 2's bucket is full again");
        assert_eq!(b.admit(JobKey(1), ms(10_000)), Some(1));
        b.evict(ms(700_000));
        assert!(b.is_empty());
    }

    #[test]
    fn a_zero_rate_is_rejected() {
        assert!(
            AuditBudget::new(0).is_err(),
            "a burst of zero lines is not a budget"
        );
    }

    #[test]
    fn a_job_cannot_queue_beyond_its_bounds_and_others_still_can() {
        let mut q = QueueBudget::new(QueueLimits {
            job_packets: 3,
            job_bytes: 3000,
            total_packets: 5,
            total_bytes: 10_000,
        });
        assert!((0..3).all(|_| q.try_add(JobKey(1), 100)));
        assert!(!q.try_add(JobKey(1), 100), "job packets");
        assert!(q.try_add(JobKey(2), 2999));
        assert!(!q.try_add(JobKey(2), 2), "job bytes");
        assert!(q.try_add(JobKey(3), 100));
        assert!(!q.try_add(JobKey(4), 1), "total packets");
        assert_eq!(q.total(), (5, 3399));
        for _ in 0..3 {
            q.remove(JobKey(1), 100);
        }
        assert_eq!(q.of(JobKey(1)), (0, 0));
        assert_eq!(q.total(), (2, 3099));
        assert!(q.try_add(JobKey(4), 1));
    }

    #[test]
    fn removing_what_was_never_added_changes_nothing() {
        let mut q = QueueBudget::new(QueueLimits::default());
        q.remove(JobKey(9), 100);
        assert_eq!(q.total(), (0, 0));
    }
}
