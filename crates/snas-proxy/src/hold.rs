//! The hold queue: a job's first packets wait here while the proxy fetches its policy, instead
//! of being dropped (issue 12: a dropped SYN costs the application a one-second retransmission).
//!
//! # What it owns
//! Per job, a FIFO of GENEVE payloads (copied as they arrived, with the node that sent them),
//! the time its first packet was held, and whether its policy has arrived ("ready"). Bounds per
//! job and in total, in packets and bytes. Pure: no clock, no I/O; the engine
//! ([`crate::tier2::Tier2`]) drives it.
//!
//! # Life of a held job
//! 1. [`HoldQueue::hold`] copies a packet in (or refuses it: [`Reason::HoldQueueFull`]).
//! 2. The policy arrives: [`HoldQueue::mark_ready`]; [`HoldQueue::take_ready`] then hands the
//!    packets out in arrival order, ready jobs in the order they became ready, for the engine
//!    to process as if they had just arrived. Packets held while a job is ready join its queue
//!    behind the others (a job's packets never overtake each other).
//! 3. Or the fetch fails: [`HoldQueue::drop_job`] discards them (the caller counts them under
//!    the fetch's reason).
//! 4. Either way, nothing outlives `max_wait` after the job's first held packet:
//!    [`HoldQueue::expire`] discards what is left (the fetch timeout is the natural value).
//!
//! # Invariants
//! - `packets()` / `bytes()` are the sums over jobs and never exceed the configured totals; no
//!   job exceeds its own bounds.
//! - A job with nothing held has no entry (memory follows what is held).
//!
//! # Limits
//! One allocation per held packet (its copy): held packets are the first packets of jobs, not
//! the established path.

use snas_wire::JobKey;
use std::collections::{HashMap, VecDeque};
use std::net::Ipv4Addr;
use std::time::Duration;

use snas_wire::Reason;

use crate::clock::Nanos;

/// Bounds of the hold queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HoldConfig {
    /// Packets one job may have held (default 64).
    pub job_packets: u32,
    /// Bytes one job may have held (default 256 KiB).
    pub job_bytes: u64,
    /// Packets held over all jobs (default 8 192).
    pub total_packets: u32,
    /// Bytes held over all jobs (default 32 MiB).
    pub total_bytes: u64,
    /// Longest a job's packets wait after its first one was held (default 2 s, the default
    /// policy fetch timeout).
    pub max_wait: Duration,
}

impl Default for HoldConfig {
    fn default() -> Self {
        HoldConfig {
            job_packets: 64,
            job_bytes: 256 * 1024,
            total_packets: 8192,
            total_bytes: 32 * 1024 * 1024,
            max_wait: Duration::from_secs(2),
        }
    }
}

/// An unusable [`HoldConfig`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HoldConfigError {
    /// a bound is zero (nothing could ever be held)
    #[error("hold queue bound `{0}` must be at least 1")]
    Zero(&'static str),
    /// a per-job bound exceeds the total
    #[error("hold queue per-job bound `{0}` exceeds the total")]
    JobAboveTotal(&'static str),
}

/// One held packet: the GENEVE payload and the node it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeldPacket {
    /// The sending node (outer source address).
    pub node: Ipv4Addr,
    /// The UDP payload (GENEVE header and inner packet), as received.
    pub payload: Vec<u8>,
}

#[derive(Debug)]
struct JobHold {
    packets: VecDeque<HeldPacket>,
    bytes: u64,
    since: Nanos,
    ready: bool,
}

/// The hold queue. See the module documentation.
#[derive(Debug)]
pub struct HoldQueue {
    cfg: HoldConfig,
    jobs: HashMap<JobKey, JobHold>,
    /// Ready jobs, in the order they became ready (a job appears at most once).
    ready: VecDeque<JobKey>,
    packets: u32,
    bytes: u64,
}

impl HoldQueue {
    /// An empty queue.
    pub fn new(cfg: HoldConfig) -> Result<HoldQueue, HoldConfigError> {
        for (name, zero) in [
            ("job_packets", cfg.job_packets == 0),
            ("job_bytes", cfg.job_bytes == 0),
            ("total_packets", cfg.total_packets == 0),
            ("total_bytes", cfg.total_bytes == 0),
            ("max_wait", cfg.max_wait.is_zero()),
        ] {
            if zero {
                return Err(HoldConfigError::Zero(name));
            }
        }
        if cfg.job_packets > cfg.total_packets {
            return Err(HoldConfigError::JobAboveTotal("job_packets"));
        }
        if cfg.job_bytes > cfg.total_bytes {
            return Err(HoldConfigError::JobAboveTotal("job_bytes"));
        }
        Ok(HoldQueue {
            cfg,
            jobs: HashMap::new(),
            ready: VecDeque::new(),
            packets: 0,
            bytes: 0,
        })
    }

    /// The bounds.
    pub fn config(&self) -> &HoldConfig {
        &self.cfg
    }

    /// Packets held, over all jobs.
    pub fn packets(&self) -> u32 {
        self.packets
    }

    /// Bytes held, over all jobs.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Jobs with packets held.
    pub fn jobs(&self) -> usize {
        self.jobs.len()
    }

    /// Whether nothing is held.
    pub fn is_empty(&self) -> bool {
        self.jobs.is_empty()
    }

    /// Whether `job` has packets held.
    pub fn has(&self, job: JobKey) -> bool {
        self.jobs.contains_key(&job)
    }

    /// Packets held for `job`.
    pub fn held_of(&self, job: JobKey) -> usize {
        self.jobs.get(&job).map_or(0, |j| j.packets.len())
    }

    /// Copies `payload` (from `node`) into `job`'s queue; [`Reason::HoldQueueFull`] when the
    /// job's or the total bound would be exceeded (nothing is held then).
    pub fn hold(
        &mut self,
        job: JobKey,
        node: Ipv4Addr,
        payload: &[u8],
        now: Nanos,
    ) -> Result<(), Reason> {
        let len = payload.len() as u64;
        if self.packets >= self.cfg.total_packets
            || self.bytes.saturating_add(len) > self.cfg.total_bytes
        {
            return Err(Reason::HoldQueueFull);
        }
        let (job_packets, job_bytes) = self
            .jobs
            .get(&job)
            .map_or((0, 0), |j| (j.packets.len(), j.bytes));
        if job_packets >= self.cfg.job_packets as usize
            || job_bytes.saturating_add(len) > self.cfg.job_bytes
        {
            return Err(Reason::HoldQueueFull);
        }
        let j = self.jobs.entry(job).or_insert_with(|| JobHold {
            packets: VecDeque::new(),
            bytes: 0,
            since: now,
            ready: false,
        });
        j.packets.push_back(HeldPacket {
            node,
            payload: payload.to_vec(),
        });
        j.bytes += len;
        self.packets += 1;
        self.bytes += len;
        Ok(())
    }

    /// The policy of `job` is available: its packets may be taken. No effect without packets.
    pub fn mark_ready(&mut self, job: JobKey) {
        if let Some(j) = self.jobs.get_mut(&job) {
            if !j.ready {
                j.ready = true;
                self.ready.push_back(job);
            }
        }
    }

    /// Whether some job is ready.
    pub fn any_ready(&self) -> bool {
        !self.ready.is_empty()
    }

    /// Moves up to `limit` packets of ready jobs into `out` (each job's in arrival order, jobs
    /// in the order they became ready). Returns how many were moved.
    pub fn take_ready(&mut self, out: &mut Vec<HeldPacket>, limit: usize) -> usize {
        let mut moved = 0;
        while moved < limit {
            let Some(&job) = self.ready.front() else {
                break;
            };
            let Some(j) = self.jobs.get_mut(&job) else {
                self.ready.pop_front();
                continue;
            };
            while moved < limit {
                let Some(p) = j.packets.pop_front() else {
                    break;
                };
                let len = p.payload.len() as u64;
                j.bytes -= len;
                self.bytes -= len;
                self.packets -= 1;
                out.push(p);
                moved += 1;
            }
            if j.packets.is_empty() {
                self.jobs.remove(&job);
                self.ready.pop_front();
            }
        }
        moved
    }

    /// Discards everything held for `job`; returns how many packets.
    pub fn drop_job(&mut self, job: JobKey) -> u32 {
        let Some(j) = self.jobs.remove(&job) else {
            return 0;
        };
        if j.ready {
            self.ready.retain(|r| *r != job);
        }
        let n = j.packets.len() as u32;
        self.packets -= n;
        self.bytes -= j.bytes;
        n
    }

    /// Discards the packets of jobs whose first packet was held `max_wait` or longer before
    /// `now`; returns (job, packets discarded) per such job.
    pub fn expire(&mut self, now: Nanos) -> Vec<(JobKey, u32)> {
        let max = self.cfg.max_wait;
        let due: Vec<JobKey> = self
            .jobs
            .iter()
            .filter(|(_, j)| now.saturating_duration_since(j.since) >= max)
            .map(|(k, _)| *k)
            .collect();
        due.into_iter()
            .map(|job| (job, self.drop_job(job)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NODE: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 7);

    fn ms(n: u64) -> Nanos {
        Nanos::from_nanos(n * 1_000_000)
    }

    fn q(cfg: HoldConfig) -> HoldQueue {
        HoldQueue::new(cfg).unwrap()
    }

    fn small() -> HoldConfig {
        HoldConfig {
            job_packets: 3,
            job_bytes: 300,
            total_packets: 5,
            total_bytes: 1000,
            max_wait: Duration::from_secs(2),
        }
    }

    #[test]
    fn ready_packets_come_out_in_arrival_order_per_job_and_jobs_in_ready_order() {
        let mut h = q(small());
        for (job, b) in [(1, 10u8), (2, 20), (1, 11), (2, 21), (1, 12)] {
            h.hold(JobKey(job), NODE, &[b], ms(0)).unwrap();
        }
        let mut out = Vec::new();
        assert_eq!(h.take_ready(&mut out, 100), 0, "nothing is ready yet");
        h.mark_ready(JobKey(2));
        h.mark_ready(JobKey(1));
        h.mark_ready(JobKey(2));
        assert_eq!(h.take_ready(&mut out, 100), 5);
        let order: Vec<u8> = out.iter().map(|p| p.payload[0]).collect();
        assert_eq!(order, [20, 21, 10, 11, 12]);
        assert!(h.is_empty());
        assert_eq!((h.packets(), h.bytes()), (0, 0));
    }

    #[test]
    fn take_ready_respects_the_limit_and_keeps_the_rest_ready() {
        let mut h = q(small());
        for b in 0..3u8 {
            h.hold(JobKey(1), NODE, &[b], ms(0)).unwrap();
        }
        h.mark_ready(JobKey(1));
        let mut out = Vec::new();
        assert_eq!(h.take_ready(&mut out, 2), 2);
        // A packet held while the job is ready queues behind the others.
        h.hold(JobKey(1), NODE, &[9], ms(1)).unwrap();
        assert_eq!(h.take_ready(&mut out, 10), 2);
        let order: Vec<u8> = out.iter().map(|p| p.payload[0]).collect();
        assert_eq!(order, [0, 1, 2, 9]);
        assert!(!h.any_ready());
    }

    #[test]
    fn per_job_and_total_bounds_refuse_with_hold_queue_full() {
        let mut h = q(small());
        for _ in 0..3 {
            h.hold(JobKey(1), NODE, &[0; 10], ms(0)).unwrap();
        }
        assert_eq!(
            h.hold(JobKey(1), NODE, &[0; 10], ms(0)),
            Err(Reason::HoldQueueFull)
        );
        // Another job still fits, up to the total of 5 packets.
        h.hold(JobKey(2), NODE, &[0; 10], ms(0)).unwrap();
        h.hold(JobKey(3), NODE, &[0; 10], ms(0)).unwrap();
        assert_eq!(
            h.hold(JobKey(4), NODE, &[0; 10], ms(0)),
            Err(Reason::HoldQueueFull)
        );
        assert_eq!(h.packets(), 5);
        // Bytes: one job's 300, in total 1000.
        let mut h = q(small());
        h.hold(JobKey(1), NODE, &[0; 250], ms(0)).unwrap();
        assert_eq!(
            h.hold(JobKey(1), NODE, &[0; 51], ms(0)),
            Err(Reason::HoldQueueFull)
        );
        h.hold(JobKey(1), NODE, &[0; 50], ms(0)).unwrap();
        for job in 2..5 {
            h.hold(JobKey(job), NODE, &[0; 200], ms(0)).unwrap();
        }
        assert_eq!(
            h.hold(JobKey(5), NODE, &[0; 101], ms(0)),
            Err(Reason::HoldQueueFull)
        );
        assert_eq!(h.bytes(), 900);
    }

    #[test]
    fn nothing_outlives_max_wait_after_the_first_held_packet() {
        let mut h = q(small());
        h.hold(JobKey(1), NODE, &[1], ms(0)).unwrap();
        h.hold(JobKey(1), NODE, &[2], ms(1500)).unwrap();
        h.hold(JobKey(2), NODE, &[3], ms(1000)).unwrap();
        assert!(h.expire(ms(1999)).is_empty());
        assert_eq!(h.expire(ms(2000)), vec![(JobKey(1), 2)]);
        assert!(h.has(JobKey(2)));
        assert_eq!(h.expire(ms(3000)), vec![(JobKey(2), 1)]);
        assert!(h.is_empty());
        assert_eq!((h.packets(), h.bytes()), (0, 0));
    }

    #[test]
    fn dropping_a_ready_job_forgets_it() {
        let mut h = q(small());
        h.hold(JobKey(1), NODE, &[1, 2, 3], ms(0)).unwrap();
        h.mark_ready(JobKey(1));
        assert_eq!(h.drop_job(JobKey(1)), 1);
        assert_eq!(h.drop_job(JobKey(1)), 0);
        let mut out = Vec::new();
        assert_eq!(h.take_ready(&mut out, 10), 0);
        assert_eq!((h.packets(), h.bytes(), h.jobs()), (0, 0, 0));
        // A new packet of the job is held anew, not ready.
        h.hold(JobKey(1), NODE, &[4], ms(5)).unwrap();
        assert_eq!(h.take_ready(&mut out, 10), 0);
    }

    #[test]
    fn zero_or_inconsistent_bounds_are_rejected() {
        let mut c = small();
        c.job_packets = 0;
        assert_eq!(
            HoldQueue::new(c).unwrap_err(),
            HoldConfigError::Zero("job_packets")
        );
        let mut c = small();
        c.job_bytes = 2000;
        assert_eq!(
            HoldQueue::new(c).unwrap_err(),
            HoldConfigError::JobAboveTotal("job_bytes")
        );
    }
}
