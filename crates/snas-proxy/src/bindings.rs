//! DNS bindings: which names a job's resolver answered with which addresses, until when.
//!
//! Tier 2 admits a new flow to an address only through a name the job's policy allows and the
//! proxy's own resolver answered with that address (or through a CIDR rule). The resolver calls
//! [`Bindings::bind`] for every address of an allowed answer, with an expiry derived from the
//! TTL; tier 2 asks [`Bindings::names`] when a flow opens.
//!
//! # Invariants
//! - An expired binding is never returned, whether or not [`Bindings::sweep`] ran.
//! - Memory is bounded: at most `max_per_job` addresses per job and `MAX_NAMES` names per
//!   (job, address); beyond that, new bindings are refused (counted) rather than evicting
//!   live ones an established application may rely on.
//! - Sweeping is O(expired) amortised: expiries sit in a min-heap; a popped entry whose binding
//!   was refreshed since is re-checked, not removed.

use snas_wire::JobKey;
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::net::IpAddr;
use std::sync::Arc;

use crate::clock::Nanos;

/// Names kept per (job, address): CDNs put many names on one address.
pub const MAX_NAMES: usize = 8;

/// Default cap of addresses bound per job.
pub const DEFAULT_MAX_PER_JOB: usize = 4096;

#[derive(Debug, Default)]
struct Entry {
    names: Vec<(Arc<str>, Nanos)>,
}

impl Entry {
    fn latest(&self) -> Option<Nanos> {
        self.names.iter().map(|(_, e)| *e).max()
    }
}

/// Outcome of [`Bindings::bind`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bind {
    /// Recorded (new or refreshed).
    Bound,
    /// Refused: the job holds `max_per_job` addresses, or the address has `MAX_NAMES` names.
    Full,
}

/// The (job, address) → names table. See the module documentation.
#[derive(Debug)]
pub struct Bindings {
    map: HashMap<(JobKey, IpAddr), Entry>,
    per_job: HashMap<JobKey, usize>,
    expiry: BinaryHeap<Reverse<(Nanos, JobKey, IpAddr)>>,
    max_per_job: usize,
    refused: u64,
}

impl Default for Bindings {
    fn default() -> Self {
        Bindings::new(DEFAULT_MAX_PER_JOB)
    }
}

impl Bindings {
    /// An empty table holding at most `max_per_job` addresses per job.
    pub fn new(max_per_job: usize) -> Bindings {
        Bindings {
            map: HashMap::new(),
            per_job: HashMap::new(),
            expiry: BinaryHeap::new(),
            max_per_job,
            refused: 0,
        }
    }

    /// Binds `ip` to `name` for `job` until `expires` (refreshing an existing binding).
    pub fn bind(&mut self, job: JobKey, ip: IpAddr, name: &str, expires: Nanos) -> Bind {
        let count = self.per_job.get(&job).copied().unwrap_or(0);
        let entry = match self.map.get_mut(&(job, ip)) {
            Some(e) => e,
            None if count >= self.max_per_job => {
                self.refused += 1;
                return Bind::Full;
            }
            None => {
                *self.per_job.entry(job).or_insert(0) += 1;
                self.map.entry((job, ip)).or_default()
            }
        };
        if let Some(slot) = entry
            .names
            .iter_mut()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
        {
            slot.1 = slot.1.max(expires);
        } else if entry.names.len() >= MAX_NAMES {
            self.refused += 1;
            return Bind::Full;
        } else {
            entry.names.push((Arc::from(name), expires));
        }
        self.expiry.push(Reverse((expires, job, ip)));
        Bind::Bound
    }

    /// The unexpired names bound to `ip` for `job`.
    pub fn names(&self, job: JobKey, ip: IpAddr, now: Nanos) -> impl Iterator<Item = &Arc<str>> {
        self.map
            .get(&(job, ip))
            .into_iter()
            .flat_map(|e| e.names.iter())
            .filter(move |(_, exp)| *exp > now)
            .map(|(n, _)| n)
    }

    /// Removes expired bindings. Returns how many addresses were removed.
    pub fn sweep(&mut self, now: Nanos) -> usize {
        let mut removed = 0;
        while let Some(Reverse((exp, job, ip))) = self.expiry.peek().copied() {
            if exp > now {
                break;
            }
            self.expiry.pop();
            let Some(e) = self.map.get_mut(&(job, ip)) else {
                continue;
            };
            e.names.retain(|(_, x)| *x > now);
            if e.latest().is_none() {
                self.map.remove(&(job, ip));
                removed += 1;
                if let Some(c) = self.per_job.get_mut(&job) {
                    *c -= 1;
                    if *c == 0 {
                        self.per_job.remove(&job);
                    }
                }
            }
        }
        removed
    }

    /// Removes every binding of `job` (job ended).
    pub fn remove_job(&mut self, job: JobKey) {
        self.map.retain(|(j, _), _| *j != job);
        self.per_job.remove(&job);
    }

    /// Addresses bound, over all jobs.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether empty.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Bindings refused because a cap was reached.
    pub fn refused(&self) -> u64 {
        self.refused
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn t(ms: u64) -> Nanos {
        Nanos::ZERO.saturating_add(Duration::from_millis(ms))
    }
    const IP: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(203, 0, 113, 10));

    #[test]
    fn expired_binding_is_never_returned_even_before_sweep() {
        let mut b = Bindings::default();
        assert_eq!(
            b.bind(JobKey(1), IP, "api.example.com", t(100)),
            Bind::Bound
        );
        assert_eq!(b.names(JobKey(1), IP, t(50)).count(), 1);
        assert_eq!(b.names(JobKey(1), IP, t(100)).count(), 0);
        assert_eq!(
            b.names(JobKey(2), IP, t(50)).count(),
            0,
            "other job sees nothing"
        );
        assert_eq!(b.sweep(t(100)), 1);
        assert!(b.is_empty());
    }

    #[test]
    fn refresh_extends_and_sweep_keeps_refreshed() {
        let mut b = Bindings::default();
        b.bind(JobKey(1), IP, "api.example.com", t(100));
        b.bind(JobKey(1), IP, "API.example.com", t(300));
        assert_eq!(b.sweep(t(150)), 0);
        assert_eq!(b.names(JobKey(1), IP, t(200)).count(), 1);
        b.bind(JobKey(1), IP, "cdn.example.com", t(250));
        assert_eq!(b.names(JobKey(1), IP, t(200)).count(), 2);
        assert_eq!(b.sweep(t(260)), 0);
        assert_eq!(b.names(JobKey(1), IP, t(260)).count(), 1);
        assert_eq!(b.sweep(t(300)), 1);
    }

    #[test]
    fn caps_refuse_instead_of_evicting() {
        let mut b = Bindings::new(2);
        let ip = |n: u8| IpAddr::V4(std::net::Ipv4Addr::new(203, 0, 113, n));
        assert_eq!(
            b.bind(JobKey(1), ip(1), "a.example.com", t(10)),
            Bind::Bound
        );
        assert_eq!(
            b.bind(JobKey(1), ip(2), "a.example.com", t(10)),
            Bind::Bound
        );
        assert_eq!(b.bind(JobKey(1), ip(3), "a.example.com", t(10)), Bind::Full);
        assert_eq!(
            b.bind(JobKey(2), ip(3), "a.example.com", t(10)),
            Bind::Bound
        );
        for i in 0..MAX_NAMES {
            let _ = b.bind(JobKey(3), IP, &format!("n{i}.example.com"), t(10));
        }
        assert_eq!(
            b.bind(JobKey(3), IP, "extra.example.com", t(10)),
            Bind::Full
        );
        assert_eq!(b.refused(), 2);
        b.sweep(t(10));
        assert_eq!(
            b.bind(JobKey(1), ip(3), "a.example.com", t(20)),
            Bind::Bound
        );
    }
}
