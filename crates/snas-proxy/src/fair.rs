//! Fair queueing of a worker's packets between tenants, and between the jobs of a tenant:
//! deficit round robin in bytes with fq_codel's sparse-flow rule, bounded per tenant and per
//! worker. Pure: no I/O, no clock reads (the caller passes the time of every push and pop).
//!
//! # What it owns
//! [`FairQueue`]: per-tenant queues, and within each tenant per-job FIFO queues, of items the
//! caller will process (the proxy worker queues received GENEVE datagrams before tier-2
//! processing and the TUN write, and replies before they are sent to nodes). The caller pushes
//! what it reads, cheaply, as fast as it arrives, and pops in fair order what it has time to
//! process.
//!
//! # Model
//! Two levels of the same scheduler: tenants share the worker, and a tenant's share is shared
//! by its jobs. At each level (RFC 8290 §4, fq_codel's DRR++):
//! - a queue that becomes non-empty joins the tail of the *new* list with a deficit of one
//!   `quantum` (bytes); new queues are served before *old* ones, so a tenant that sends a
//!   packet now and then (a request, an ACK, a DNS query) is served next, not after a round;
//! - the head of the list is served while its deficit is positive: one item per pop, the
//!   deficit falls by the item's length (it may go negative: a 64 KiB super-packet is served
//!   at once and paid back over the next rounds);
//! - a queue whose deficit is used up gets another quantum and moves to the tail of the old
//!   list; a queue found empty leaves the lists (from the new list it first passes through the
//!   old list once, so a queue cannot stay "new" by emptying itself after every item).
//!
//! Popping an item charges its length to its tenant's and its job's deficits.
//!
//! # Bounds
//! Per tenant (`tenant_packets`, `tenant_bytes`) and per queue (`total_packets`,
//! `total_bytes`). The byte bounds count the memory items hold ([`Size::mem`]: a 100-byte
//! datagram in a 2 KiB buffer holds 2 KiB, a super-packet kept in its 64 KiB receive buffer
//! 64 KiB), so they bound memory; turns charge [`Size::len`], so fairness is in packet bytes.
//! An item that does not fit makes room by dropping from the head of the *fattest* queue (most
//! bytes held) — of its own tenant when the tenant is full, of the fattest tenant when the
//! queue is full — so a tenant under its share never loses a packet to one above it, and a
//! flood loses its oldest packets first (the freshest ones are worth more, and the drop reaches
//! its sender's congestion control sooner). Making room for the whole queue drops at least a
//! few packets per scan of the fattest tenant (up to [`EVICT_BATCH`] or half its backlog), so
//! an overload costs one scan per batch, not per packet. An item larger than a tenant's byte
//! bound is dropped itself. Every dropped item is handed to the caller (to count it as
//! `tenant_queue_full` and recycle its buffer).
//!
//! # Invariants
//! - Each queue is FIFO: a job's items leave in the order they were pushed.
//! - Items and bytes held never exceed the bounds; the totals equal the sum over tenants, and
//!   a tenant's the sum over its jobs.
//! - While two tenants both have items queued, the bytes served to one between two turns of
//!   the other are less than `2 × (quantum + largest item)` (one turn as a new queue, one as
//!   an old one), and over any interval in which both stay backlogged their served bytes differ
//!   by less than that — whatever the arrival pattern. The same holds for jobs in a tenant.
//! - State exists only for queues that hold something or sit in a list: slots are recycled
//!   (no allocation per item once the slots and their queues have grown), and an emptied
//!   queue's capacity is trimmed back to [`KEEP_CAPACITY`].
//!
//! # Limits
//! - Fairness is in bytes (as the issue asks and as fq_codel does), not in CPU: a tenant of
//!   64-byte packets gets about 20 times the packets of one of 1,500-byte packets for the same
//!   share. The per-packet cost of the proxy is what a small-packet flood spends; its *share*
//!   still cannot grow beyond its byte share while others are backlogged.
//! - The tenant of an item is what the caller says (the proxy reads it from the GENEVE option
//!   before the policy is checked: a compromised node can charge its packets to another tenant
//!   of the same node, which costs that tenant its share on this worker, never anything more).
//! - Finding the fattest queue scans the tenants (or a tenant's jobs) that hold something:
//!   O(active tenants) once per overload batch.

use std::collections::{HashMap, VecDeque};
use std::hash::Hash;

use crate::clock::Nanos;

/// Items dropped per scan for the fattest queue when the worker is full (at least the room
/// needed; up to half the fattest queue's items).
pub const EVICT_BATCH: u32 = 64;

/// Capacity (items) an emptied queue keeps for reuse.
pub const KEEP_CAPACITY: usize = 64;

/// The bounds of a [`FairQueue`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FairLimits {
    /// Items one tenant may have queued.
    pub tenant_packets: u32,
    /// Bytes of memory one tenant's queued items may hold ([`Size::mem`]).
    pub tenant_bytes: u64,
    /// Items queued over all tenants.
    pub total_packets: u32,
    /// Bytes of memory queued items may hold over all tenants.
    pub total_bytes: u64,
}

impl Default for FairLimits {
    /// 1,024 items or 4 MiB per tenant (several milliseconds of a worker's work: 1,024 small
    /// packets, or 64 TCP super-packets in 64 KiB buffers), 16,384 items or 32 MiB per queue.
    fn default() -> Self {
        FairLimits {
            tenant_packets: 1024,
            tenant_bytes: 4 << 20,
            total_packets: 16_384,
            total_bytes: 32 << 20,
        }
    }
}

/// The configuration of a [`FairQueue`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FairConfig {
    /// Bytes a tenant (and a job within it) is credited per round (default 1,514: one
    /// full-sized Ethernet frame, as fq_codel).
    pub quantum: u32,
    /// Bounds.
    pub limits: FairLimits,
}

impl Default for FairConfig {
    fn default() -> Self {
        FairConfig {
            quantum: 1514,
            limits: FairLimits::default(),
        }
    }
}

/// An invalid [`FairConfig`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FairConfigError {
    /// A zero quantum would never serve anything.
    #[error("quantum must be at least 1 byte")]
    ZeroQuantum,
    /// A bound of zero admits nothing.
    #[error("{0} must be at least 1")]
    ZeroBound(&'static str),
    /// The worker's bound must hold at least one tenant's.
    #[error("{total} must be at least {tenant}")]
    TotalBelowTenant {
        /// The total field.
        total: &'static str,
        /// The tenant field.
        tenant: &'static str,
    },
}

impl FairConfig {
    /// Checks the configuration.
    pub fn validate(&self) -> Result<(), FairConfigError> {
        let l = &self.limits;
        if self.quantum == 0 {
            return Err(FairConfigError::ZeroQuantum);
        }
        for (name, zero) in [
            ("tenant_packets", l.tenant_packets == 0),
            ("tenant_bytes", l.tenant_bytes == 0),
            ("total_packets", l.total_packets == 0),
            ("total_bytes", l.total_bytes == 0),
        ] {
            if zero {
                return Err(FairConfigError::ZeroBound(name));
            }
        }
        if l.total_packets < l.tenant_packets {
            return Err(FairConfigError::TotalBelowTenant {
                total: "total_packets",
                tenant: "tenant_packets",
            });
        }
        if l.total_bytes < l.tenant_bytes {
            return Err(FairConfigError::TotalBelowTenant {
                total: "total_bytes",
                tenant: "tenant_bytes",
            });
        }
        Ok(())
    }
}

/// What an item costs: its length (charged to its tenant's and job's deficits: fairness is in
/// these bytes) and the memory it holds while queued (what the byte bounds count).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Size {
    /// Length in bytes.
    pub len: u32,
    /// Bytes of memory held (its buffer's size), at least `len`.
    pub mem: u32,
}

impl Size {
    /// An item that holds exactly its length.
    pub fn exact(len: u32) -> Size {
        Size { len, mem: len }
    }

    /// An item of `len` bytes in a buffer of `mem` bytes (`mem` is raised to `len`).
    pub fn in_buffer(len: u32, mem: usize) -> Size {
        Size {
            len,
            mem: u32::try_from(mem).unwrap_or(u32::MAX).max(len),
        }
    }
}

/// A queued item with what the queue knows about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry<K, J, T> {
    /// The caller's item.
    pub item: T,
    /// Its tenant.
    pub tenant: K,
    /// Its job.
    pub job: J,
    /// Its length in bytes (what it is charged).
    pub len: u32,
    /// The memory it held.
    pub mem: u32,
    /// When it was pushed.
    pub pushed: Nanos,
}

/// Counters of a [`FairQueue`] since it was made.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FairStats {
    /// Items pushed and kept (at least until now).
    pub pushed: u64,
    /// Items popped.
    pub popped: u64,
    /// Items dropped: refused on push or evicted to make room.
    pub dropped: u64,
    /// Sum of the time popped items waited, nanoseconds.
    pub waited_ns: u64,
    /// Longest wait of a popped item.
    pub max_wait_ns: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum List {
    New,
    Old,
}

/// The DRR++ state of one level: a slot's deficit and list membership, and the two lists.
#[derive(Debug, Default)]
struct Lists {
    new: VecDeque<u32>,
    old: VecDeque<u32>,
}

impl Lists {
    fn front(&self) -> Option<(List, u32)> {
        if let Some(&i) = self.new.front() {
            return Some((List::New, i));
        }
        self.old.front().map(|&i| (List::Old, i))
    }

    fn pop_front(&mut self, l: List) {
        match l {
            List::New => self.new.pop_front(),
            List::Old => self.old.pop_front(),
        };
    }

    fn iter(&self) -> impl Iterator<Item = u32> + '_ {
        self.new.iter().chain(self.old.iter()).copied()
    }
}

#[derive(Debug)]
struct JobSlot<J, T> {
    job: J,
    tenant: u32,
    deficit: i64,
    list: Option<List>,
    bytes: u64,
    queue: VecDeque<(T, Size, Nanos)>,
}

#[derive(Debug)]
struct TenantSlot<K> {
    tenant: K,
    deficit: i64,
    list: Option<List>,
    packets: u32,
    bytes: u64,
    jobs: Lists,
}

/// Per-tenant, per-job fair queues of one worker. See the module documentation.
#[derive(Debug)]
pub struct FairQueue<K, J, T> {
    cfg: FairConfig,
    tenants: Vec<TenantSlot<K>>,
    free_tenants: Vec<u32>,
    tenant_index: HashMap<K, u32>,
    jobs: Vec<JobSlot<J, T>>,
    free_jobs: Vec<u32>,
    job_index: HashMap<(K, J), u32>,
    lists: Lists,
    packets: u32,
    bytes: u64,
    stats: FairStats,
}

impl<K, J, T> FairQueue<K, J, T>
where
    K: Copy + Eq + Hash,
    J: Copy + Eq + Hash,
{
    /// An empty queue.
    pub fn new(cfg: FairConfig) -> Result<FairQueue<K, J, T>, FairConfigError> {
        cfg.validate()?;
        Ok(FairQueue {
            cfg,
            tenants: Vec::new(),
            free_tenants: Vec::new(),
            tenant_index: HashMap::new(),
            jobs: Vec::new(),
            free_jobs: Vec::new(),
            job_index: HashMap::new(),
            lists: Lists::default(),
            packets: 0,
            bytes: 0,
            stats: FairStats::default(),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &FairConfig {
        &self.cfg
    }

    /// Items queued.
    pub fn len(&self) -> usize {
        self.packets as usize
    }

    /// Whether nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.packets == 0
    }

    /// Bytes of memory queued items hold.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Items and bytes of memory `tenant` has queued.
    pub fn tenant_usage(&self, tenant: K) -> (u32, u64) {
        self.tenant_index.get(&tenant).map_or((0, 0), |&t| {
            let s = &self.tenants[t as usize];
            (s.packets, s.bytes)
        })
    }

    /// Items and bytes of memory `job` of `tenant` has queued.
    pub fn job_usage(&self, tenant: K, job: J) -> (u32, u64) {
        self.job_index.get(&(tenant, job)).map_or((0, 0), |&j| {
            let s = &self.jobs[j as usize];
            (s.queue.len() as u32, s.bytes)
        })
    }

    /// Tenants that hold a slot (something queued, or still in a list).
    pub fn tenants(&self) -> usize {
        self.tenant_index.len()
    }

    /// Counters since the queue was made.
    pub fn stats(&self) -> FairStats {
        self.stats
    }

    /// Queues `item` of `size` for `job` of `tenant` at `now`. What cannot be kept — the item
    /// itself, or older items evicted to make room for it — is handed to `dropped`. Returns
    /// whether `item` was kept.
    pub fn push(
        &mut self,
        tenant: K,
        job: J,
        size: Size,
        item: T,
        now: Nanos,
        mut dropped: impl FnMut(Entry<K, J, T>),
    ) -> bool {
        let l = self.cfg.limits;
        let mem = u64::from(size.mem);
        if mem > l.tenant_bytes {
            self.stats.dropped += 1;
            dropped(Entry {
                item,
                tenant,
                job,
                len: size.len,
                mem: size.mem,
                pushed: now,
            });
            return false;
        }
        // Room in the worker: evict from the fattest tenant (perhaps this one).
        if self.packets >= l.total_packets || self.bytes + mem > l.total_bytes {
            let need_p = (self.packets + 1).saturating_sub(l.total_packets);
            let need_b = (self.bytes + mem).saturating_sub(l.total_bytes);
            if let Some(fat) = self.fattest_tenant() {
                self.evict_from_tenant(fat, need_p, need_b, true, &mut dropped);
            }
        }
        // Room in the tenant: evict from its fattest job (perhaps this one).
        if let Some(&t) = self.tenant_index.get(&tenant) {
            let s = &self.tenants[t as usize];
            if s.packets >= l.tenant_packets || s.bytes + mem > l.tenant_bytes {
                let need_p = (s.packets + 1).saturating_sub(l.tenant_packets);
                let need_b = (s.bytes + mem).saturating_sub(l.tenant_bytes);
                self.evict_from_tenant(t, need_p, need_b, false, &mut dropped);
            }
        }
        let t = self.tenant_slot(tenant);
        let j = self.job_slot(t, tenant, job);
        let q = self.cfg.quantum;
        let js = &mut self.jobs[j as usize];
        js.queue.push_back((item, size, now));
        js.bytes += mem;
        let job_joins = js.list.is_none();
        if job_joins {
            js.list = Some(List::New);
            js.deficit = i64::from(q);
        }
        let ts = &mut self.tenants[t as usize];
        ts.packets += 1;
        ts.bytes += mem;
        if job_joins {
            ts.jobs.new.push_back(j);
        }
        if ts.list.is_none() {
            ts.list = Some(List::New);
            ts.deficit = i64::from(q);
            self.lists.new.push_back(t);
        }
        self.packets += 1;
        self.bytes += mem;
        self.stats.pushed += 1;
        true
    }

    /// The next item in fair order, if any; `now` is used for the wait statistics.
    pub fn pop(&mut self, now: Nanos) -> Option<Entry<K, J, T>> {
        let q = i64::from(self.cfg.quantum);
        loop {
            let (list, t) = self.lists.front()?;
            let ts = &mut self.tenants[t as usize];
            if ts.deficit <= 0 {
                ts.deficit += q;
                ts.list = Some(List::Old);
                self.lists.pop_front(list);
                self.lists.old.push_back(t);
                continue;
            }
            match self.pop_job(t) {
                Some(e) => {
                    let len = i64::from(e.len);
                    self.tenants[t as usize].deficit -= len;
                    let waited = now.saturating_duration_since(e.pushed);
                    let waited = u64::try_from(waited.as_nanos()).unwrap_or(u64::MAX);
                    self.stats.popped += 1;
                    self.stats.waited_ns = self.stats.waited_ns.saturating_add(waited);
                    self.stats.max_wait_ns = self.stats.max_wait_ns.max(waited);
                    return Some(e);
                }
                None => {
                    // The tenant is empty: leave the lists (after one pass through the old
                    // list when it was new and others wait there).
                    self.lists.pop_front(list);
                    if list == List::New && !self.lists.old.is_empty() {
                        self.tenants[t as usize].list = Some(List::Old);
                        self.lists.old.push_back(t);
                    } else {
                        self.tenants[t as usize].list = None;
                        self.free_tenant(t);
                    }
                }
            }
        }
    }

    /// Drops everything queued, handing each item to `dropped` (not counted as a drop: the
    /// caller is shutting down or reconfiguring).
    pub fn clear(&mut self, mut dropped: impl FnMut(Entry<K, J, T>)) {
        let tenants: Vec<u32> = self.lists.iter().collect();
        for t in tenants {
            let jobs: Vec<u32> = self.tenants[t as usize].jobs.iter().collect();
            for j in jobs {
                let tenant = self.tenants[t as usize].tenant;
                let js = &mut self.jobs[j as usize];
                let job = js.job;
                for (item, size, pushed) in js.queue.drain(..) {
                    dropped(Entry {
                        item,
                        tenant,
                        job,
                        len: size.len,
                        mem: size.mem,
                        pushed,
                    });
                }
                js.bytes = 0;
                js.list = None;
                self.free_job(j);
            }
            let ts = &mut self.tenants[t as usize];
            ts.jobs = Lists::default();
            ts.packets = 0;
            ts.bytes = 0;
            ts.list = None;
            self.free_tenant(t);
        }
        self.lists = Lists::default();
        self.packets = 0;
        self.bytes = 0;
    }

    /// The next item of tenant slot `t` by the job-level DRR++ (the same rules one level
    /// down); `None` when the tenant holds nothing (its job lists are then empty).
    fn pop_job(&mut self, t: u32) -> Option<Entry<K, J, T>> {
        let q = i64::from(self.cfg.quantum);
        loop {
            let (list, j) = self.tenants[t as usize].jobs.front()?;
            let js = &mut self.jobs[j as usize];
            if js.deficit <= 0 {
                js.deficit += q;
                js.list = Some(List::Old);
                let ts = &mut self.tenants[t as usize];
                ts.jobs.pop_front(list);
                ts.jobs.old.push_back(j);
                continue;
            }
            if let Some((item, size, pushed)) = js.queue.pop_front() {
                let mem = u64::from(size.mem);
                js.deficit -= i64::from(size.len);
                js.bytes -= mem;
                let job = js.job;
                let ts = &mut self.tenants[t as usize];
                ts.packets -= 1;
                ts.bytes -= mem;
                let tenant = ts.tenant;
                self.packets -= 1;
                self.bytes -= mem;
                return Some(Entry {
                    item,
                    tenant,
                    job,
                    len: size.len,
                    mem: size.mem,
                    pushed,
                });
            }
            let ts = &mut self.tenants[t as usize];
            ts.jobs.pop_front(list);
            if list == List::New && !ts.jobs.old.is_empty() {
                ts.jobs.old.push_back(j);
                self.jobs[j as usize].list = Some(List::Old);
            } else {
                self.jobs[j as usize].list = None;
                self.free_job(j);
            }
        }
    }

    fn fattest_tenant(&self) -> Option<u32> {
        self.lists
            .iter()
            .filter(|&t| self.tenants[t as usize].packets > 0)
            .max_by_key(|&t| self.tenants[t as usize].bytes)
    }

    fn fattest_job(&self, t: u32) -> Option<u32> {
        self.tenants[t as usize]
            .jobs
            .iter()
            .filter(|&j| !self.jobs[j as usize].queue.is_empty())
            .max_by_key(|&j| self.jobs[j as usize].bytes)
    }

    /// Drops items from the heads of tenant slot `t`'s fattest jobs until `packets` items and
    /// `bytes` bytes are freed; with `batch`, keeps going up to [`EVICT_BATCH`] items or half
    /// of what the tenant held (amortising the scan for the fattest tenant).
    fn evict_from_tenant(
        &mut self,
        t: u32,
        packets: u32,
        bytes: u64,
        batch: bool,
        dropped: &mut impl FnMut(Entry<K, J, T>),
    ) {
        let held = self.tenants[t as usize].packets;
        let goal = if batch {
            packets.max(EVICT_BATCH.min(held / 2))
        } else {
            packets
        };
        let (mut freed_p, mut freed_b) = (0u32, 0u64);
        while freed_p < goal || freed_b < bytes {
            let Some(j) = self.fattest_job(t) else { break };
            let js = &mut self.jobs[j as usize];
            let Some((item, size, pushed)) = js.queue.pop_front() else {
                break;
            };
            let mem = u64::from(size.mem);
            js.bytes -= mem;
            let job = js.job;
            let ts = &mut self.tenants[t as usize];
            ts.packets -= 1;
            ts.bytes -= mem;
            let tenant = ts.tenant;
            self.packets -= 1;
            self.bytes -= mem;
            self.stats.dropped += 1;
            freed_p += 1;
            freed_b += mem;
            dropped(Entry {
                item,
                tenant,
                job,
                len: size.len,
                mem: size.mem,
                pushed,
            });
        }
        // Emptied queues stay in their lists; the next pop that reaches them removes them.
    }

    fn tenant_slot(&mut self, tenant: K) -> u32 {
        if let Some(&t) = self.tenant_index.get(&tenant) {
            return t;
        }
        let slot = TenantSlot {
            tenant,
            deficit: 0,
            list: None,
            packets: 0,
            bytes: 0,
            jobs: Lists::default(),
        };
        let t = match self.free_tenants.pop() {
            Some(t) => {
                let old = std::mem::replace(&mut self.tenants[t as usize], slot);
                // Keep the job lists' capacity.
                let mut jobs = old.jobs;
                jobs.new.clear();
                jobs.old.clear();
                self.tenants[t as usize].jobs = jobs;
                t
            }
            None => {
                self.tenants.push(slot);
                (self.tenants.len() - 1) as u32
            }
        };
        self.tenant_index.insert(tenant, t);
        t
    }

    fn job_slot(&mut self, t: u32, tenant: K, job: J) -> u32 {
        if let Some(&j) = self.job_index.get(&(tenant, job)) {
            return j;
        }
        let j = match self.free_jobs.pop() {
            Some(j) => {
                let s = &mut self.jobs[j as usize];
                s.job = job;
                s.tenant = t;
                s.deficit = 0;
                s.list = None;
                s.bytes = 0;
                j
            }
            None => {
                self.jobs.push(JobSlot {
                    job,
                    tenant: t,
                    deficit: 0,
                    list: None,
                    bytes: 0,
                    queue: VecDeque::new(),
                });
                (self.jobs.len() - 1) as u32
            }
        };
        self.job_index.insert((tenant, job), j);
        j
    }

    fn free_job(&mut self, j: u32) {
        let tenant = self.tenants[self.jobs[j as usize].tenant as usize].tenant;
        let js = &mut self.jobs[j as usize];
        self.job_index.remove(&(tenant, js.job));
        js.queue.shrink_to(KEEP_CAPACITY);
        self.free_jobs.push(j);
    }

    fn free_tenant(&mut self, t: u32) {
        let ts = &mut self.tenants[t as usize];
        self.tenant_index.remove(&ts.tenant);
        ts.jobs.new.shrink_to(KEEP_CAPACITY);
        ts.jobs.old.shrink_to(KEEP_CAPACITY);
        self.free_tenants.push(t);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    type Q = FairQueue<u32, u64, u64>;

    fn q(quantum: u32, limits: FairLimits) -> Q {
        FairQueue::new(FairConfig { quantum, limits }).unwrap()
    }

    fn big() -> FairLimits {
        FairLimits {
            tenant_packets: 100_000,
            tenant_bytes: 1 << 30,
            total_packets: 1_000_000,
            total_bytes: 1 << 40,
        }
    }

    const T0: Nanos = Nanos::ZERO;

    fn no_drop(e: Entry<u32, u64, u64>) {
        panic!("unexpected drop of {e:?}");
    }

    #[test]
    fn a_flooding_tenant_does_not_delay_a_sparse_tenants_packet_by_a_round() {
        let mut f = q(1514, big());
        // Tenant 1 floods: 1,000 small datagrams queued, and it has been served for a while
        // (its first quantum as a new queue is spent: it is an old queue now).
        for i in 0..1000 {
            assert!(f.push(1, 10, Size::exact(92), i, T0, no_drop));
        }
        for _ in 0..50 {
            assert_eq!(f.pop(T0).unwrap().tenant, 1);
        }
        // Tenant 2's request arrives: a queue that becomes non-empty is new, and new queues
        // go first.
        f.push(2, 20, Size::exact(81), 9999, T0, no_drop);
        let e = f.pop(T0).unwrap();
        assert_eq!((e.tenant, e.item), (2, 9999));
        // Had it arrived while tenant 1 was still new, it would have waited at most the rest
        // of tenant 1's first quantum.
        let mut f = q(1514, big());
        for i in 0..1000 {
            f.push(1, 10, Size::exact(92), i, T0, no_drop);
        }
        f.pop(T0);
        f.push(2, 20, Size::exact(81), 9999, T0, no_drop);
        let ahead = std::iter::from_fn(|| f.pop(T0))
            .take_while(|e| e.tenant == 1)
            .count();
        assert!(
            ahead < 1514_usize.div_ceil(92),
            "{ahead} flood packets went first"
        );
    }

    #[test]
    fn two_backlogged_tenants_get_equal_bytes_whatever_their_packet_sizes() {
        let mut f = q(1514, big());
        for i in 0..20_000 {
            f.push(1, 1, Size::exact(92), i, T0, no_drop);
        }
        for i in 0..2_000 {
            f.push(2, 2, Size::exact(1500), i, T0, no_drop);
        }
        let mut served = [0u64; 3];
        for _ in 0..10_000 {
            let e = f.pop(T0).unwrap();
            served[e.tenant as usize] += u64::from(e.len);
        }
        let diff = served[1].abs_diff(served[2]);
        assert!(diff < 2 * (1514 + 1500), "{served:?}");
        assert!(served[1] > 0 && served[2] > 0);
    }

    #[test]
    fn jobs_of_one_tenant_share_its_turns_fairly() {
        let mut f = q(1000, big());
        for i in 0..3000 {
            f.push(1, 1, Size::exact(100), i, T0, no_drop);
        }
        for i in 0..300 {
            f.push(1, 2, Size::exact(1000), i, T0, no_drop);
        }
        let mut by_job = HashMap::new();
        for _ in 0..1000 {
            let e = f.pop(T0).unwrap();
            *by_job.entry(e.job).or_insert(0u64) += u64::from(e.len);
        }
        let (a, b) = (by_job[&1], by_job[&2]);
        assert!(a.abs_diff(b) < 2 * (1000 + 1000), "{by_job:?}");
    }

    #[test]
    fn a_super_packet_is_served_at_once_and_paid_back_over_later_rounds() {
        let mut f = q(1514, big());
        f.push(1, 1, Size::exact(65_000), 0, T0, no_drop);
        for i in 1..=100 {
            f.push(1, 1, Size::exact(100), i, T0, no_drop);
        }
        for i in 0..200 {
            f.push(2, 2, Size::exact(100), i, T0, no_drop);
        }
        // Tenant 1 went first (it was new first): its super-packet leaves at once.
        assert_eq!(f.pop(T0).unwrap().len, 65_000);
        // Then tenant 2 is served until tenant 1's debt is paid: 65,000 bytes of tenant 2
        // (all its 200 × 100 bytes) before tenant 1's next item.
        let mut t2 = 0;
        while let Some(e) = f.pop(T0) {
            if e.tenant == 1 {
                break;
            }
            t2 += 1;
        }
        assert_eq!(
            t2, 200,
            "tenant 2 had only 20,000 bytes; all of it went first"
        );
    }

    #[test]
    fn a_job_keeps_its_order() {
        let mut f = q(300, big());
        for i in 0..100u64 {
            f.push(
                (i % 3) as u32,
                i % 5,
                Size::exact(50 + (i as u32 % 7) * 100),
                i,
                T0,
                no_drop,
            );
        }
        let mut last: HashMap<(u32, u64), u64> = HashMap::new();
        while let Some(e) = f.pop(T0) {
            if let Some(prev) = last.insert((e.tenant, e.job), e.item) {
                assert!(prev < e.item);
            }
        }
        assert!(f.is_empty());
        assert_eq!(f.tenants(), 0, "every slot was released");
    }

    #[test]
    fn a_full_tenant_loses_its_oldest_packets_and_others_lose_nothing() {
        let limits = FairLimits {
            tenant_packets: 10,
            tenant_bytes: 1 << 20,
            total_packets: 100,
            total_bytes: 1 << 20,
        };
        let mut f = q(1514, limits);
        let mut dropped = Vec::new();
        for i in 0..50 {
            f.push(1, 1, Size::exact(100), i, T0, |e| dropped.push(e.item));
        }
        assert_eq!(f.tenant_usage(1), (10, 1000));
        assert_eq!(
            dropped,
            (0..40).collect::<Vec<_>>(),
            "head drop: oldest first"
        );
        f.push(2, 2, Size::exact(100), 1000, T0, no_drop);
        assert_eq!(f.tenant_usage(2), (1, 100));
        assert_eq!(f.stats().dropped, 40);
    }

    #[test]
    fn within_a_full_tenant_the_fattest_job_pays() {
        let limits = FairLimits {
            tenant_packets: 10,
            tenant_bytes: 1 << 20,
            total_packets: 100,
            total_bytes: 1 << 20,
        };
        let mut f = q(1514, limits);
        let mut dropped = Vec::new();
        for i in 0..9 {
            f.push(1, 1, Size::exact(100), i, T0, |e| {
                dropped.push((e.job, e.item))
            });
        }
        // The tenant's other job arrives with the tenant full: job 1 makes room.
        f.push(1, 2, Size::exact(100), 100, T0, |e| {
            dropped.push((e.job, e.item))
        });
        f.push(1, 2, Size::exact(100), 101, T0, |e| {
            dropped.push((e.job, e.item))
        });
        assert_eq!(dropped, vec![(1, 0)]);
        assert_eq!(f.job_usage(1, 2), (2, 200));
        assert_eq!(f.job_usage(1, 1), (8, 800));
    }

    #[test]
    fn a_full_worker_evicts_from_the_fattest_tenant() {
        let limits = FairLimits {
            tenant_packets: 1000,
            tenant_bytes: 1 << 20,
            total_packets: 1000,
            total_bytes: 1 << 20,
        };
        let mut f = q(1514, limits);
        for i in 0..1000 {
            f.push(1, 1, Size::exact(100), i, T0, no_drop);
        }
        let mut dropped = Vec::new();
        for i in 0..10 {
            f.push(2, 2, Size::exact(100), i, T0, |e| dropped.push(e.tenant));
        }
        assert!(!dropped.is_empty() && dropped.iter().all(|t| *t == 1));
        assert_eq!(f.tenant_usage(2), (10, 1000));
        assert!(f.len() <= 1000);
        // One scan freed a batch), not one packet per push.
        assert_eq!(dropped.len() as u32, EVICT_BATCH);
    }

    #[test]
    fn an_item_larger_than_a_tenants_bound_is_dropped_itself() {
        let limits = FairLimits {
            tenant_packets: 10,
            tenant_bytes: 1000,
            total_packets: 10,
            total_bytes: 1000,
        };
        let mut f = q(1514, limits);
        f.push(1, 1, Size::exact(100), 1, T0, no_drop);
        let mut dropped = Vec::new();
        assert!(!f.push(1, 1, Size::exact(1001), 2, T0, |e| dropped.push(e.item)));
        assert_eq!(dropped, vec![2]);
        assert_eq!(f.tenant_usage(1), (1, 100));
    }

    #[test]
    fn bounds_count_the_memory_items_hold_and_turns_count_their_length() {
        let limits = FairLimits {
            tenant_packets: 1000,
            tenant_bytes: 10 * 2048,
            total_packets: 10_000,
            total_bytes: 1 << 20,
        };
        let mut f = q(1514, limits);
        let mut dropped = 0;
        // 100-byte packets in 2 KiB buffers: ten fit, whatever the packet bound says.
        for i in 0..20 {
            f.push(1, 1, Size::in_buffer(100, 2048), i, T0, |_| dropped += 1);
        }
        assert_eq!((f.tenant_usage(1), dropped), ((10, 20_480), 10));
        // A tenant whose packets sit in big buffers is not charged more per turn for it.
        let mut f = q(1514, big());
        for i in 0..1000 {
            f.push(1, 1, Size::in_buffer(100, 65_536), i, T0, no_drop);
            f.push(2, 2, Size::exact(100), i, T0, no_drop);
        }
        let mut n = [0u32; 3];
        for _ in 0..1000 {
            n[f.pop(T0).unwrap().tenant as usize] += 1;
        }
        assert!(n[1].abs_diff(n[2]) <= 2 * 16, "{n:?}");
    }

    #[test]
    fn waits_are_measured_with_the_callers_clock() {
        let mut f = q(1514, big());
        f.push(1, 1, Size::exact(100), 0, Nanos::from_nanos(1_000), no_drop);
        f.push(1, 1, Size::exact(100), 1, Nanos::from_nanos(2_000), no_drop);
        f.pop(Nanos::from_nanos(5_000));
        f.pop(Nanos::from_nanos(5_000));
        let s = f.stats();
        assert_eq!(
            (s.pushed, s.popped, s.waited_ns, s.max_wait_ns),
            (2, 2, 7_000, 4_000)
        );
    }

    #[test]
    fn bad_configurations_are_refused_with_the_field() {
        let c = FairConfig {
            quantum: 0,
            ..FairConfig::default()
        };
        assert_eq!(c.validate(), Err(FairConfigError::ZeroQuantum));
        let mut c = FairConfig::default();
        c.limits.tenant_bytes = 0;
        assert_eq!(
            c.validate(),
            Err(FairConfigError::ZeroBound("tenant_bytes"))
        );
        let mut c = FairConfig::default();
        c.limits.total_packets = c.limits.tenant_packets - 1;
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("total_packets"));
    }

    #[test]
    fn clear_hands_back_everything() {
        let mut f = q(1514, big());
        for i in 0..100 {
            f.push(i as u32 % 4, i % 7, Size::exact(60), i, T0, no_drop);
        }
        let mut n = 0;
        f.clear(|_| n += 1);
        assert_eq!(n, 100);
        assert!(f.is_empty() && f.tenants() == 0 && f.pop(T0).is_none());
        f.push(1, 1, Size::exact(60), 0, T0, no_drop);
        assert_eq!(f.pop(T0).unwrap().item, 0);
    }

    /// One step of a random schedule.
    #[derive(Debug, Clone)]
    enum Op {
        Push {
            tenant: u32,
            job: u64,
            len: u32,
            /// Memory held beyond the length.
            slack: u32,
        },
        Pop,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            3 => (0u32..5, 0u64..4, 1u32..3000, prop_oneof![Just(0u32), 0u32..4096])
                .prop_map(|(tenant, job, len, slack)| Op::Push { tenant, job, len, slack }),
            2 => Just(Op::Pop),
        ]
    }

    const QUANTUM: u32 = 1514;
    const MAX_LEN: u64 = 3000;

    fn small_limits() -> FairLimits {
        FairLimits {
            tenant_packets: 40,
            tenant_bytes: 40_000,
            total_packets: 100,
            total_bytes: 120_000,
        }
    }

    /// Which level [`check_round_bound`] looks at.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum Level {
        /// Tenants (each push's tenant and job as generated).
        Tenants,
        /// The jobs of one tenant (each push's tenant becomes a job of tenant 0).
        Jobs,
    }

    /// Runs `ops` and checks that between two services of a backlogged queue of `level` no
    /// other queue of that level is served `2 × (quantum + largest item)` bytes or more.
    fn check_round_bound(ops: &[Op], level: Level) -> Result<(), TestCaseError> {
        let mut f: Q = q(QUANTUM, big());
        let bound = 2 * (u64::from(QUANTUM) + MAX_LEN);
        let waiting = |f: &Q, id: u64| match level {
            Level::Tenants => f.tenant_usage(id as u32).0 > 0,
            Level::Jobs => f.job_usage(0, id).0 > 0,
        };
        // Bytes served to queue u since queue t's last service, while t waits: (t, u) → bytes.
        let mut since: HashMap<(u64, u64), u64> = HashMap::new();
        for o in ops {
            match *o {
                Op::Push {
                    tenant,
                    job,
                    len,
                    slack,
                } => {
                    let (t, j, id) = match level {
                        Level::Tenants => (tenant, job, u64::from(tenant)),
                        Level::Jobs => (0, u64::from(tenant), u64::from(tenant)),
                    };
                    if !waiting(&f, id) {
                        // A queue that starts waiting is owed nothing yet.
                        since.retain(|(w, _), _| *w != id);
                    }
                    // The memory an item holds does not change its turns.
                    f.push(
                        t,
                        j,
                        Size {
                            len,
                            mem: len + slack,
                        },
                        0,
                        T0,
                        no_drop,
                    );
                }
                Op::Pop => {
                    if let Some(e) = f.pop(T0) {
                        let served = match level {
                            Level::Tenants => u64::from(e.tenant),
                            Level::Jobs => e.job,
                        };
                        since.retain(|(w, _), _| *w != served);
                        for id in 0..5u64 {
                            if id != served && waiting(&f, id) {
                                let s = since.entry((id, served)).or_default();
                                *s += u64::from(e.len);
                                prop_assert!(
                                    *s < bound,
                                    "{} got {} bytes while {} waited",
                                    served,
                                    s,
                                    id
                                );
                            }
                        }
                    }
                }
            }
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// Bounds hold, totals add up, every item is popped, dropped or still queued, and a
        /// job's items keep their order, whatever the schedule.
        #[test]
        fn bounded_and_conserving_under_any_schedule(ops in prop::collection::vec(op(), 1..600)) {
            let l = small_limits();
            let mut f: Q = q(QUANTUM, l);
            let mut next = 0u64;
            let (mut popped, mut dropped) = (0u64, 0u64);
            let mut last: HashMap<(u32, u64), u64> = HashMap::new();
            for o in ops {
                match o {
                    Op::Push { tenant, job, len, slack } => {
                        let size = Size { len, mem: len + slack };
                        f.push(tenant, job, size, next, T0, |_| dropped += 1);
                        next += 1;
                    }
                    Op::Pop => if let Some(e) = f.pop(T0) {
                        popped += 1;
                        if let Some(p) = last.insert((e.tenant, e.job), e.item) {
                            prop_assert!(p < e.item, "job order");
                        }
                    },
                }
                prop_assert!(f.packets <= l.total_packets && f.bytes <= l.total_bytes);
                let (mut sp, mut sb) = (0u32, 0u64);
                for t in 0..5 {
                    let (p, b) = f.tenant_usage(t);
                    prop_assert!(p <= l.tenant_packets && b <= l.tenant_bytes);
                    let (mut jp, mut jb) = (0u32, 0u64);
                    for j in 0..4 {
                        let (p, b) = f.job_usage(t, j);
                        jp += p;
                        jb += b;
                    }
                    prop_assert_eq!((jp, jb), (p, b));
                    sp += p;
                    sb += b;
                }
                prop_assert_eq!((sp, sb), (f.packets, f.bytes));
                prop_assert_eq!(next, popped + dropped + u64::from(f.packets));
            }
            while f.pop(T0).is_some() {
                popped += 1;
            }
            prop_assert_eq!(next, popped + dropped);
            prop_assert_eq!(f.tenants(), 0);
            prop_assert!(f.job_index.is_empty());
        }

        /// Between two turns of a backlogged tenant, no other tenant is served
        /// `2 × (quantum + largest item)` bytes or more, whatever the arrivals.
        #[test]
        fn no_tenant_waits_more_than_a_round_behind_another(ops in prop::collection::vec(op(), 1..800)) {
            check_round_bound(&ops, Level::Tenants)?;
        }

        /// The same between the jobs of one tenant.
        #[test]
        fn no_job_waits_more_than_a_round_behind_another_of_its_tenant(ops in prop::collection::vec(op(), 1..800)) {
            check_round_bound(&ops, Level::Jobs)?;
        }

        /// Tenants that stay backlogged over an interval get equal bytes within one round's
        /// worth, whatever happened before and whatever the others do.
        #[test]
        fn backlogged_tenants_share_bytes_equally(
            warm in prop::collection::vec(op(), 0..300),
            sizes in prop::collection::vec((1u32..3000, 1u32..3000), 200),
        ) {
            let mut f: Q = q(QUANTUM, big());
            for o in warm {
                match o {
                    Op::Push { tenant, job, len, slack } => {
                        f.push(tenant, job, Size { len, mem: len + slack }, 0, T0, no_drop);
                    }
                    Op::Pop => { f.pop(T0); }
                }
            }
            // Tenants 7 and 8 become backlogged and stay so (each holds more than is served).
            for (i, (a, b)) in sizes.iter().enumerate() {
                f.push(7, i as u64 % 3, Size::exact(*a), 0, T0, no_drop);
                f.push(8, 0, Size::exact(*b), 0, T0, no_drop);
            }
            let mut served: HashMap<u32, u64> = HashMap::new();
            let total: u64 = sizes.iter().map(|(a, b)| u64::from(*a.min(b))).sum();
            let mut popped = 0u64;
            while popped < total / 2 {
                let Some(e) = f.pop(T0) else { break };
                if e.tenant == 7 || e.tenant == 8 {
                    popped += u64::from(e.len);
                    *served.entry(e.tenant).or_default() += u64::from(e.len);
                }
                prop_assert!(f.tenant_usage(7).0 > 0 && f.tenant_usage(8).0 > 0);
                let d = served.get(&7).copied().unwrap_or(0).abs_diff(served.get(&8).copied().unwrap_or(0));
                prop_assert!(d < 2 * (u64::from(QUANTUM) + MAX_LEN), "{served:?}");
            }
        }
    }
}
