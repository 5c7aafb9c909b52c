//! SNAT port allocator with port-exhaustion safeguards.
//!
//! Owns the egress address pool, which (egress IP, port) each live NAT entry holds per
//! destination, the quarantine of recently freed ports, and the per-job, per-tenant and
//! per-(job, destination) accounting that refuses a new flow before the pool runs dry.
//!
//! # Model
//! A *destination* is (protocol, remote IP, remote port). The tuple (egress IP, egress port,
//! protocol, remote IP, remote port) is unique, so every egress IP offers the whole port range to
//! every destination independently. Per destination the allocator keeps, per egress IP in use, a
//! set of used ports (inline up to 11 ports, then a sorted vector, then an 8 KiB bitmap past
//! [`SPARSE_MAX`]) and a cursor that starts at a pseudo-random offset (from the configured seed,
//! the destination and an activation counter) and moves forward, so allocation is a cursor step
//! plus a word scan: O(1) amortised, never a scan of 64k ports per call.
//!
//! A port is *live* while its flow lives and *quarantined* for [`NatConfig::quarantine`] after
//! (TIME_WAIT safety: a late segment of the old connection must not reach a new one with the
//! same tuple). Quarantine is one FIFO (the duration is fixed, so it is ordered by release time).
//!
//! **A reopened tuple gets its port back.** When a job opens a new flow from the same source
//! address and port to the same destination as a flow whose port is still quarantined, that
//! port is taken out of quarantine and given to the new flow: the job's own TCP/IP stack chose
//! to reuse the tuple (its TIME_WAIT, if any, is over), and the remote then sees exactly the
//! tuple it would see without NAT, so its TIME_WAIT rules apply as they would on a direct path
//! (Linux conntrack reopens a tuple the same way). Quarantine still keeps the port from every
//! *other* tuple, job and tenant. Without this, a job that loops over short connections to one
//! server burns a port per connection and is refused with `port_quota` after
//! [`NatConfig::max_ports_per_job`] connections per quarantine period (about 270 per second),
//! although its own source ports come round after ~28,000 connections.
//!
//! # Checks, in order, for a new flow
//! 1. job live entries ≥ `JobLimits::max_connections` → [`Reason::ConnectionLimit`]
//! 2. job held ports (live + quarantined) ≥ [`NatConfig::max_ports_per_job`] → [`Reason::PortQuota`]
//! 3. tenant held ports (live + quarantined) ≥ tenant quota → [`Reason::TenantPortQuota`]
//! 4. job live entries to this destination ≥ `JobLimits::max_ports_per_destination` →
//!    [`Reason::DestinationPortCap`]
//! 5. no egress IP of the destination's family has a free port for it → [`Reason::PortsExhausted`]
//!
//! Quarantined ports count against the job's and tenant's port quotas (not against
//! `max_connections`, which is about live connections): a tenant that churns connections to one
//! destination holds the ports it burnt until their quarantine ends, so it cannot fill the
//! destination's ports for everyone else. A reopened tuple (above) takes back a port the job
//! already holds, so checks 2, 3 and 5 do not apply to it; 1 and 4 (live flows) do.
//!
//! Egress IP choice: the job's preferred IP is `job_key mod n` among the pool's IPs of the
//! destination's family (job keys are SHA-256 derived, so this spreads evenly and keeps a job on
//! one source address while it has room); if that IP has no free port for the destination the
//! next ones are tried in order.
//!
//! # Invariants
//! - A (egress IP, port, destination) is handed out at most once until it is released and its
//!   quarantine has ended.
//! - Per-destination, per-job and per-tenant state is removed as soon as it holds nothing (live
//!   or quarantined): memory follows the live + quarantined entries, never the history.
//!
//! # Limits
//! The port range applies to ICMP echo identifiers too (destination port 0). Time that goes
//! backwards does not shorten quarantine.

use snas_wire::{JobKey, TenantId};
use std::collections::hash_map::RandomState;
use std::collections::{HashMap, VecDeque};
use std::hash::BuildHasher;
use std::net::{IpAddr, SocketAddr};
use std::ops::RangeInclusive;
use std::time::Duration;

use hashbrown::HashTable;
use snas_wire::{L4Proto, Reason};

use crate::clock::Nanos;

/// Sorted-vector port sets become bitmaps when they reach this many ports.
pub const SPARSE_MAX: usize = 256;
/// Bitmaps become sorted vectors again below this many ports (hysteresis).
const DENSE_MIN: u32 = 64;

/// Where a flow goes: protocol, remote address and remote port (0 for ICMP).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Destination {
    /// Protocol.
    pub proto: L4Proto,
    /// Remote address.
    pub ip: IpAddr,
    /// Remote port.
    pub port: u16,
}

/// Who asks for a port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Owner {
    /// Job key (from the GENEVE option).
    pub job: JobKey,
    /// Tenant id (from the GENEVE option, checked against the policy).
    pub tenant: TenantId,
}

/// The job's limits from its signed policy, passed with every new flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JobLimits {
    /// Concurrent live flows of the job (exact).
    pub max_connections: u32,
    /// Concurrent live flows of the job to one destination.
    pub max_ports_per_destination: u32,
}

/// Invalid allocator configuration.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NatConfigError {
    /// the egress pool is empty
    #[error("egress address pool is empty")]
    EmptyPool,
    /// the same egress IP is listed twice
    #[error("egress address {0} is listed twice")]
    DuplicateEgress(IpAddr),
    /// the pool has more addresses than the allocator indexes
    #[error("egress address pool has {0} addresses, at most 65535 are supported")]
    PoolTooLarge(usize),
    /// the port range is empty
    #[error("egress port range {0}-{1} is empty")]
    EmptyPortRange(u16, u16),
}

/// Allocator configuration. [`NatConfig::new`] gives the documented defaults.
#[derive(Debug, Clone)]
pub struct NatConfig {
    /// Egress addresses routed to this proxy.
    pub egress_ips: Vec<IpAddr>,
    /// Egress ports handed out (default 1024–65535).
    pub ports: RangeInclusive<u16>,
    /// How long a freed port stays unusable for its destination (default 60 s).
    pub quarantine: Duration,
    /// Ports (live + quarantined) one job may hold (default 16384).
    pub max_ports_per_job: u32,
    /// Ports (live + quarantined) one tenant may hold unless overridden (default 65536).
    pub max_ports_per_tenant: u32,
    /// Per-tenant quota overrides.
    pub tenant_quotas: HashMap<TenantId, u32>,
    /// Seed of the per-destination starting port (give it a random value in production so ports
    /// are not predictable across proxies; fixed in tests for reproducibility).
    pub port_seed: u64,
}

impl NatConfig {
    /// Defaults for the given egress pool.
    pub fn new(egress_ips: Vec<IpAddr>) -> NatConfig {
        NatConfig {
            egress_ips,
            ports: 1024..=65535,
            quarantine: Duration::from_secs(60),
            max_ports_per_job: 16_384,
            max_ports_per_tenant: 65_536,
            tenant_quotas: HashMap::new(),
            port_seed: 0x5eed_5eed_5eed_5eed,
        }
    }
}

/// A granted NAT binding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NatLease {
    /// Egress (source) address the flow leaves from.
    pub egress_ip: IpAddr,
    /// Egress (source) port.
    pub egress_port: u16,
    pub(crate) egress_index: u16,
    pub(crate) dest_id: u32,
    /// The job's source address and port of the flow (what a reopened tuple is recognised by).
    pub(crate) source: SocketAddr,
}

/// Outcome of [`PortAllocator::allocate`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Allocation {
    /// A port was handed out.
    Granted(NatLease),
    /// The new flow is refused for this reason.
    Refused(Reason),
}

/// Live and held ports of a job or a tenant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Usage {
    /// Ports of live flows.
    pub live: u32,
    /// Ports of live flows plus quarantined ones.
    pub held: u32,
}

/// Gauge: one egress IP.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EgressUsage {
    /// The address.
    pub ip: IpAddr,
    /// Live ports on it, over all destinations.
    pub live: u32,
    /// Quarantined ports on it.
    pub quarantined: u32,
    /// Destinations it currently holds ports for.
    pub destinations: u32,
    /// Ports it has per destination.
    pub ports_per_destination: u32,
    /// Highest fraction (0–1) of the ports used (live + quarantined) for any one destination.
    pub busiest_destination_utilisation: f64,
}

/// Gauge: one destination.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DestinationUsage {
    /// The destination.
    pub destination: Destination,
    /// Live ports for it, over all egress IPs.
    pub live: u32,
    /// Live + quarantined ports for it.
    pub used: u32,
    /// Ports the pool has for it (egress IPs of its family × port range).
    pub capacity: u32,
}

#[derive(Debug)]
struct Bitmap {
    words: [u64; 1024],
}

/// Ports held inline before a set spills to a vector.
const INLINE: usize = 11;

#[derive(Debug)]
enum PortSet {
    /// Sorted, no duplicates, `len ≤ INLINE`: no heap allocation for the common tiny set.
    Inline {
        len: u8,
        ports: [u16; INLINE],
    },
    /// Sorted, no duplicates.
    Sparse(Vec<u16>),
    Dense(Box<Bitmap>),
}

impl PortSet {
    fn empty() -> PortSet {
        PortSet::Inline {
            len: 0,
            ports: [0; INLINE],
        }
    }

    fn contains(&self, p: u16) -> bool {
        match self {
            PortSet::Inline { len, ports } => ports[..usize::from(*len)].binary_search(&p).is_ok(),
            PortSet::Sparse(v) => v.binary_search(&p).is_ok(),
            PortSet::Dense(b) => b.words[usize::from(p / 64)] & (1 << (p % 64)) != 0,
        }
    }

    fn insert(&mut self, p: u16) {
        match self {
            PortSet::Inline { len, ports } => {
                let n = usize::from(*len);
                if let Err(i) = ports[..n].binary_search(&p) {
                    if n < INLINE {
                        ports.copy_within(i..n, i + 1);
                        ports[i] = p;
                        *len += 1;
                    } else {
                        let mut v = Vec::with_capacity(2 * INLINE);
                        v.extend_from_slice(&ports[..n]);
                        v.insert(i, p);
                        *self = PortSet::Sparse(v);
                    }
                }
            }
            PortSet::Sparse(v) => {
                if let Err(i) = v.binary_search(&p) {
                    v.insert(i, p);
                }
                if v.len() >= SPARSE_MAX {
                    let mut b = Box::new(Bitmap { words: [0; 1024] });
                    for &q in v.iter() {
                        b.words[usize::from(q / 64)] |= 1 << (q % 64);
                    }
                    *self = PortSet::Dense(b);
                }
            }
            PortSet::Dense(b) => b.words[usize::from(p / 64)] |= 1 << (p % 64),
        }
    }

    /// Removes `p`; `remaining` is the count after removal (for the switch back to sparse).
    fn remove(&mut self, p: u16, remaining: u32) {
        match self {
            PortSet::Inline { len, ports } => {
                let n = usize::from(*len);
                if let Ok(i) = ports[..n].binary_search(&p) {
                    ports.copy_within(i + 1..n, i);
                    *len -= 1;
                }
            }
            PortSet::Sparse(v) => {
                if let Ok(i) = v.binary_search(&p) {
                    v.remove(i);
                }
                if v.is_empty() {
                    *self = PortSet::empty();
                }
            }
            PortSet::Dense(b) => {
                b.words[usize::from(p / 64)] &= !(1 << (p % 64));
                if remaining < DENSE_MIN {
                    let mut v = Vec::with_capacity(remaining as usize);
                    for (w, &word) in b.words.iter().enumerate() {
                        let mut bits = word;
                        while bits != 0 {
                            let bit = bits.trailing_zeros();
                            // w < 1024 and bit < 64, so the port fits in u16.
                            v.push((w as u16) * 64 + bit as u16);
                            bits &= bits - 1;
                        }
                    }
                    *self = PortSet::Sparse(v);
                }
            }
        }
    }

    /// First free port at or after `from` within `lo..=hi`, wrapping to `lo`.
    fn find_free(&self, from: u16, lo: u16, hi: u16) -> Option<u16> {
        let sorted = match self {
            PortSet::Inline { len, ports } => &ports[..usize::from(*len)],
            PortSet::Sparse(v) => v.as_slice(),
            PortSet::Dense(b) => {
                return find_zero(&b.words, from, hi).or_else(|| find_zero(&b.words, lo, from));
            }
        };
        let mut c = from;
        for _ in 0..=sorted.len() {
            if sorted.binary_search(&c).is_err() {
                return Some(c);
            }
            c = if c >= hi { lo } else { c + 1 };
        }
        None
    }

    fn heap_bytes(&self) -> usize {
        match self {
            PortSet::Inline { .. } => 0,
            PortSet::Sparse(v) => v.capacity() * 2,
            PortSet::Dense(_) => std::mem::size_of::<Bitmap>(),
        }
    }
}

/// First zero bit in `a..=b`.
fn find_zero(words: &[u64; 1024], a: u16, b: u16) -> Option<u16> {
    if a > b {
        return None;
    }
    let (wa, wb) = (usize::from(a / 64), usize::from(b / 64));
    for (w, word) in words.iter().enumerate().take(wb + 1).skip(wa) {
        let mut free = !*word;
        if w == wa {
            free &= !0u64 << (a % 64);
        }
        if w == wb {
            free &= !0u64 >> (63 - b % 64);
        }
        if free != 0 {
            return Some((w as u16) * 64 + free.trailing_zeros() as u16);
        }
    }
    None
}

#[derive(Debug)]
struct IpPorts {
    set: PortSet,
    used: u32,
    egress: u16,
    cursor: u16,
}

/// One destination. Laid out for the common cases without heap allocations: one egress IP in
/// use (`first`) and one job talking to it (`top_job`); others spill to `rest` and to the
/// allocator's `job_dest_live` map. `rest` is boxed (8 bytes instead of a 24-byte `Vec`):
/// with one destination per flow in the worst case, this state is per-flow memory.
#[derive(Debug)]
// The box is the point: see above.
#[allow(clippy::box_collection)]
struct DestState {
    key: Destination,
    live: u32,
    used: u32,
    top_count: u32,
    top_job: JobKey,
    first: Option<IpPorts>,
    rest: Option<Box<Vec<IpPorts>>>,
}

impl DestState {
    fn ports(&self, e: u16) -> Option<&IpPorts> {
        self.iter().find(|p| p.egress == e)
    }

    fn ports_mut(&mut self, e: u16) -> Option<&mut IpPorts> {
        if self.first.as_ref().is_some_and(|p| p.egress == e) {
            return self.first.as_mut();
        }
        self.rest
            .as_mut()
            .and_then(|r| r.iter_mut().find(|p| p.egress == e))
    }

    fn add(&mut self, p: IpPorts) {
        if self.first.is_none() {
            self.first = Some(p);
        } else {
            self.rest.get_or_insert_with(Box::default).push(p);
        }
    }

    fn remove_ip(&mut self, e: u16) {
        if self.first.as_ref().is_some_and(|p| p.egress == e) {
            self.first = self.rest.as_mut().and_then(|r| r.pop());
        } else if let Some(r) = self.rest.as_mut() {
            if let Some(i) = r.iter().position(|p| p.egress == e) {
                r.swap_remove(i);
            }
        }
        if self.rest.as_ref().is_some_and(|r| r.is_empty()) {
            self.rest = None;
        }
    }

    fn iter(&self) -> impl Iterator<Item = &IpPorts> {
        self.first
            .iter()
            .chain(self.rest.iter().flat_map(|r| r.iter()))
    }

    fn rest_heap_bytes(&self) -> usize {
        self.rest.as_ref().map_or(0, |r| {
            std::mem::size_of::<Vec<IpPorts>>() + r.capacity() * std::mem::size_of::<IpPorts>()
        })
    }
}

#[derive(Debug, Clone, Copy)]
struct Quarantined {
    release_at: Nanos,
    job: JobKey,
    tenant: TenantId,
    dest: u32,
    egress: u16,
    port: u16,
    source: SocketAddr,
    /// Taken back by a reopened tuple: skipped (already live again) when its time comes.
    reclaimed: bool,
}

/// A quarantined port's flow as a reopened tuple names it: the job, its source address and
/// port, the destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct ReopenKey {
    job: JobKey,
    source: SocketAddr,
    dest: u32,
}

#[derive(Debug, Clone, Copy, Default)]
struct EgressCounters {
    live: u32,
    quarantined: u32,
    destinations: u32,
}

/// The SNAT port allocator. See the module documentation.
#[derive(Debug)]
pub struct PortAllocator {
    cfg: NatConfig,
    lo: u16,
    hi: u16,
    v4: Vec<u16>,
    v6: Vec<u16>,
    egress: Vec<EgressCounters>,
    hasher: RandomState,
    /// Destination → index into `dests`, hashed and compared through the slab entry.
    dest_index: HashTable<u32>,
    dests: Vec<Option<DestState>>,
    free_dests: Vec<u32>,
    /// Live flows per (job, destination) for jobs other than the destination's `top_job`.
    job_dest_live: HashMap<(JobKey, u32), u32>,
    jobs: HashMap<JobKey, Usage>,
    tenants: HashMap<TenantId, Usage>,
    quarantine: VecDeque<Quarantined>,
    /// Sequence number of `quarantine[0]` (entries are numbered in push order).
    quarantine_front: u64,
    /// Entries of `quarantine` taken back by reopened tuples (still in the FIFO).
    reclaimed: usize,
    /// The quarantined ports a reopened tuple may take back: key → sequence number in
    /// `quarantine`. At most one entry per quarantined port (keyed by SipHash with a random
    /// key: jobs choose their source ports).
    reopen: HashMap<ReopenKey, u64>,
    /// Counts destination activations, so a destination that goes idle and comes back starts
    /// its cursor somewhere new.
    activations: u64,
}

fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

fn map_capacity_bytes<K, V>(m: &HashMap<K, V>) -> usize {
    table_bytes(m.capacity(), std::mem::size_of::<(K, V)>())
}

/// Bytes of a SwissTable with usable capacity `cap` and `elem` bytes per slot (one control byte
/// per bucket, buckets a power of two loaded to 7/8).
pub(crate) fn table_bytes(cap: usize, elem: usize) -> usize {
    if cap == 0 {
        return 0;
    }
    let buckets = if cap < 8 {
        (cap + 1).next_power_of_two()
    } else {
        (cap * 8 / 7).next_power_of_two()
    };
    buckets * (elem + 1) + 16
}

impl PortAllocator {
    /// An empty allocator.
    pub fn new(cfg: NatConfig) -> Result<PortAllocator, NatConfigError> {
        if cfg.egress_ips.is_empty() {
            return Err(NatConfigError::EmptyPool);
        }
        if cfg.egress_ips.len() > usize::from(u16::MAX) {
            return Err(NatConfigError::PoolTooLarge(cfg.egress_ips.len()));
        }
        let (lo, hi) = (*cfg.ports.start(), *cfg.ports.end());
        if lo > hi {
            return Err(NatConfigError::EmptyPortRange(lo, hi));
        }
        let (mut v4, mut v6) = (Vec::new(), Vec::new());
        for (i, ip) in cfg.egress_ips.iter().enumerate() {
            if cfg.egress_ips[..i].contains(ip) {
                return Err(NatConfigError::DuplicateEgress(*ip));
            }
            // i < 65535 checked above.
            let i = i as u16;
            if ip.is_ipv4() {
                v4.push(i)
            } else {
                v6.push(i)
            }
        }
        let n = cfg.egress_ips.len();
        Ok(PortAllocator {
            cfg,
            lo,
            hi,
            v4,
            v6,
            egress: vec![EgressCounters::default(); n],
            hasher: RandomState::new(),
            dest_index: HashTable::new(),
            dests: Vec::new(),
            free_dests: Vec::new(),
            job_dest_live: HashMap::new(),
            jobs: HashMap::new(),
            tenants: HashMap::new(),
            quarantine: VecDeque::new(),
            quarantine_front: 0,
            reclaimed: 0,
            reopen: HashMap::new(),
            activations: 0,
        })
    }

    /// The configuration in force.
    pub fn config(&self) -> &NatConfig {
        &self.cfg
    }

    /// Ports per (egress IP, destination).
    pub fn ports_per_destination(&self) -> u32 {
        u32::from(self.hi - self.lo) + 1
    }

    /// Index of `ip` in the egress pool.
    pub fn egress_index(&self, ip: IpAddr) -> Option<u16> {
        self.cfg
            .egress_ips
            .iter()
            .position(|e| *e == ip)
            .map(|i| i as u16)
    }

    pub(crate) fn egress_ip(&self, index: u16) -> IpAddr {
        self.cfg.egress_ips[usize::from(index)]
    }

    fn dest(&self, id: u32) -> Option<&DestState> {
        self.dests.get(id as usize).and_then(Option::as_ref)
    }

    fn dest_mut(&mut self, id: u32) -> Option<&mut DestState> {
        self.dests.get_mut(id as usize).and_then(Option::as_mut)
    }

    pub(crate) fn dest_id(&self, d: &Destination) -> Option<u32> {
        let dests = &self.dests;
        self.dest_index
            .find(self.hasher.hash_one(d), |&i| {
                dests[i as usize].as_ref().is_some_and(|s| s.key == *d)
            })
            .copied()
    }

    fn tenant_quota(&self, tenant: TenantId) -> u32 {
        self.cfg
            .tenant_quotas
            .get(&tenant)
            .copied()
            .unwrap_or(self.cfg.max_ports_per_tenant)
    }

    /// Live and held ports of a job.
    pub fn job_usage(&self, job: JobKey) -> Usage {
        self.jobs.get(&job).copied().unwrap_or_default()
    }

    /// Live and held ports of a tenant.
    pub fn tenant_usage(&self, tenant: TenantId) -> Usage {
        self.tenants.get(&tenant).copied().unwrap_or_default()
    }

    /// Live flows of `job` to `dest`.
    pub fn job_destination_live(&self, job: JobKey, dest: &Destination) -> u32 {
        self.dest_id(dest)
            .map_or(0, |d| self.job_dest_count(job, d))
    }

    // A job's count for a destination lives in exactly one place: the destination's `top_*`
    // fields or the `job_dest_live` map.
    fn job_dest_count(&self, job: JobKey, d: u32) -> u32 {
        match self.dest(d) {
            Some(s) if s.top_count > 0 && s.top_job == job => s.top_count,
            _ => self.job_dest_live.get(&(job, d)).copied().unwrap_or(0),
        }
    }

    fn job_dest_inc(&mut self, job: JobKey, d: u32) {
        let in_map = self.job_dest_live.contains_key(&(job, d));
        let Some(s) = self.dests.get_mut(d as usize).and_then(Option::as_mut) else {
            return;
        };
        if s.top_count > 0 && s.top_job == job {
            s.top_count += 1;
        } else if s.top_count == 0 && !in_map {
            s.top_job = job;
            s.top_count = 1;
        } else {
            *self.job_dest_live.entry((job, d)).or_insert(0) += 1;
        }
    }

    fn job_dest_dec(&mut self, job: JobKey, d: u32) {
        if let Some(s) = self.dests.get_mut(d as usize).and_then(Option::as_mut) {
            if s.top_count > 0 && s.top_job == job {
                s.top_count -= 1;
                return;
            }
        }
        if let Some(n) = self.job_dest_live.get_mut(&(job, d)) {
            *n -= 1;
            if *n == 0 {
                self.job_dest_live.remove(&(job, d));
            }
        }
    }

    /// Ports in quarantine.
    pub fn quarantined(&self) -> usize {
        self.quarantine.len() - self.reclaimed
    }

    /// Is `port` on egress `ip` in use (live or quarantined) for `dest`?
    pub fn is_in_use(&self, ip: IpAddr, port: u16, dest: &Destination) -> bool {
        let (Some(e), Some(d)) = (self.egress_index(ip), self.dest_id(dest)) else {
            return false;
        };
        self.dest(d)
            .and_then(|s| s.ports(e))
            .is_some_and(|p| p.set.contains(port))
    }

    /// Hands out a port for a new flow of `owner` from `source` (the job's address and port)
    /// to `dest`, or says why not. Releases due quarantine first. A tuple the job reopens gets
    /// back the port it had, if that port is still quarantined (module documentation).
    pub fn allocate(
        &mut self,
        owner: Owner,
        source: SocketAddr,
        dest: Destination,
        limits: JobLimits,
        now: Nanos,
    ) -> Allocation {
        self.release_due(now);
        let job = self.job_usage(owner.job);
        if job.live >= limits.max_connections {
            return Allocation::Refused(Reason::ConnectionLimit);
        }
        if let Some(reopened) = self.reopen_quarantined(owner, source, &dest, limits) {
            return reopened;
        }
        if job.held >= self.cfg.max_ports_per_job {
            return Allocation::Refused(Reason::PortQuota);
        }
        if self.tenant_usage(owner.tenant).held >= self.tenant_quota(owner.tenant) {
            return Allocation::Refused(Reason::TenantPortQuota);
        }
        let existing = self.dest_id(&dest);
        let to_dest = existing.map_or(0, |d| self.job_dest_count(owner.job, d));
        if to_dest >= limits.max_ports_per_destination {
            return Allocation::Refused(Reason::DestinationPortCap);
        }
        let family = if dest.ip.is_ipv4() {
            &self.v4
        } else {
            &self.v6
        };
        if family.is_empty() {
            return Allocation::Refused(Reason::PortsExhausted);
        }
        let cap = self.ports_per_destination();
        let start = (owner.job.get() % family.len() as u64) as usize;
        let state = existing.and_then(|d| self.dest(d));
        let chosen = (0..family.len())
            .map(|k| family[(start + k) % family.len()])
            .find(|&e| state.and_then(|s| s.ports(e)).map_or(0, |p| p.used) < cap);
        let Some(egress) = chosen else {
            return Allocation::Refused(Reason::PortsExhausted);
        };

        let dest_id = match existing {
            Some(d) => d,
            None => self.new_dest(dest),
        };
        self.activations = self.activations.wrapping_add(1);
        let (lo, hi) = (self.lo, self.hi);
        let seed = splitmix64(self.cfg.port_seed ^ self.activations);
        let Some(state) = self
            .dests
            .get_mut(dest_id as usize)
            .and_then(Option::as_mut)
        else {
            return Allocation::Refused(Reason::PortsExhausted);
        };
        if state.ports(egress).is_none() {
            let span = u64::from(hi - lo) + 1;
            let h = splitmix64(seed ^ dest_hash(&dest) ^ u64::from(egress) << 32);
            state.add(IpPorts {
                set: PortSet::empty(),
                used: 0,
                egress,
                cursor: lo + (h % span) as u16,
            });
            self.egress[usize::from(egress)].destinations += 1;
        }
        let Some(ports) = state.ports_mut(egress) else {
            return Allocation::Refused(Reason::PortsExhausted);
        };
        let Some(port) = ports.set.find_free(ports.cursor, lo, hi) else {
            // Unreachable while `used < cap`; refuse rather than corrupt state.
            return Allocation::Refused(Reason::PortsExhausted);
        };
        ports.set.insert(port);
        ports.used += 1;
        ports.cursor = if port >= hi { lo } else { port + 1 };
        state.live += 1;
        state.used += 1;
        self.egress[usize::from(egress)].live += 1;
        self.job_dest_inc(owner.job, dest_id);
        let j = self.jobs.entry(owner.job).or_default();
        j.live += 1;
        j.held += 1;
        let t = self.tenants.entry(owner.tenant).or_default();
        t.live += 1;
        t.held += 1;
        Allocation::Granted(NatLease {
            egress_ip: self.cfg.egress_ips[usize::from(egress)],
            egress_port: port,
            egress_index: egress,
            dest_id,
            source,
        })
    }

    /// The port a reopened tuple takes back out of quarantine (made live again for `owner`),
    /// or `None` if the tuple has no quarantined port. Refuses if the job is at its live cap
    /// for the destination.
    fn reopen_quarantined(
        &mut self,
        owner: Owner,
        source: SocketAddr,
        dest: &Destination,
        limits: JobLimits,
    ) -> Option<Allocation> {
        let dest_id = self.dest_id(dest)?;
        let key = ReopenKey {
            job: owner.job,
            source,
            dest: dest_id,
        };
        let seq = *self.reopen.get(&key)?;
        if self.job_dest_count(owner.job, dest_id) >= limits.max_ports_per_destination {
            return Some(Allocation::Refused(Reason::DestinationPortCap));
        }
        let index = usize::try_from(seq.checked_sub(self.quarantine_front)?).ok()?;
        let q = self.quarantine.get_mut(index)?;
        if q.reclaimed || q.job != owner.job || q.dest != dest_id {
            // Unreachable: the map names only unreclaimed entries of their own key.
            self.reopen.remove(&key);
            return None;
        }
        q.reclaimed = true;
        let (egress, port) = (q.egress, q.port);
        self.reopen.remove(&key);
        self.reclaimed += 1;
        let e = &mut self.egress[usize::from(egress)];
        e.quarantined = e.quarantined.saturating_sub(1);
        e.live += 1;
        if let Some(state) = self.dest_mut(dest_id) {
            state.live += 1;
        }
        self.job_dest_inc(owner.job, dest_id);
        // Held (live + quarantined) is unchanged: the port moves from one to the other.
        if let Some(j) = self.jobs.get_mut(&owner.job) {
            j.live += 1;
        }
        if let Some(t) = self.tenants.get_mut(&owner.tenant) {
            t.live += 1;
        }
        Some(Allocation::Granted(NatLease {
            egress_ip: self.cfg.egress_ips[usize::from(egress)],
            egress_port: port,
            egress_index: egress,
            dest_id,
            source,
        }))
    }

    fn new_dest(&mut self, key: Destination) -> u32 {
        let state = DestState {
            key,
            live: 0,
            used: 0,
            top_count: 0,
            top_job: JobKey::default(),
            first: None,
            rest: None,
        };
        let id = match self.free_dests.pop() {
            Some(id) => {
                self.dests[id as usize] = Some(state);
                id
            }
            None => {
                self.dests.push(Some(state));
                (self.dests.len() - 1) as u32
            }
        };
        let (dests, hasher) = (&self.dests, &self.hasher);
        self.dest_index
            .insert_unique(hasher.hash_one(key), id, |&i| {
                dests[i as usize]
                    .as_ref()
                    .map_or(0, |s| hasher.hash_one(s.key))
            });
        id
    }

    /// Ends the live use of `lease` by `owner`: the port goes into quarantine until
    /// `now + quarantine` (or is free at once when quarantine is zero).
    pub fn release(&mut self, owner: Owner, lease: &NatLease, now: Nanos) {
        let d = lease.dest_id;
        self.job_dest_dec(owner.job, d);
        if let Some(state) = self.dest_mut(d) {
            state.live = state.live.saturating_sub(1);
        }
        if let Some(j) = self.jobs.get_mut(&owner.job) {
            j.live = j.live.saturating_sub(1);
        }
        if let Some(t) = self.tenants.get_mut(&owner.tenant) {
            t.live = t.live.saturating_sub(1);
        }
        let e = &mut self.egress[usize::from(lease.egress_index)];
        e.live = e.live.saturating_sub(1);
        if self.cfg.quarantine.is_zero() {
            self.free_port(owner, d, lease.egress_index, lease.egress_port);
            return;
        }
        e.quarantined += 1;
        let mut release_at = now.saturating_add(self.cfg.quarantine);
        if let Some(back) = self.quarantine.back() {
            release_at = release_at.max(back.release_at);
        }
        let seq = self.quarantine_front + self.quarantine.len() as u64;
        self.quarantine.push_back(Quarantined {
            release_at,
            job: owner.job,
            tenant: owner.tenant,
            dest: d,
            egress: lease.egress_index,
            port: lease.egress_port,
            source: lease.source,
            reclaimed: false,
        });
        self.reopen.insert(
            ReopenKey {
                job: owner.job,
                source: lease.source,
                dest: d,
            },
            seq,
        );
    }

    /// Returns ports whose quarantine has ended to the free pool; returns how many.
    pub fn release_due(&mut self, now: Nanos) -> usize {
        let mut n = 0;
        while let Some(q) = self.quarantine.front().copied() {
            if q.release_at > now {
                break;
            }
            self.quarantine.pop_front();
            let seq = self.quarantine_front;
            self.quarantine_front += 1;
            if q.reclaimed {
                // Live again under a reopened tuple; its flow's release quarantines it anew.
                self.reclaimed = self.reclaimed.saturating_sub(1);
                continue;
            }
            let key = ReopenKey {
                job: q.job,
                source: q.source,
                dest: q.dest,
            };
            if self.reopen.get(&key) == Some(&seq) {
                self.reopen.remove(&key);
            }
            let e = &mut self.egress[usize::from(q.egress)];
            e.quarantined = e.quarantined.saturating_sub(1);
            self.free_port(
                Owner {
                    job: q.job,
                    tenant: q.tenant,
                },
                q.dest,
                q.egress,
                q.port,
            );
            n += 1;
        }
        n
    }

    /// When the next quarantined port is released, if any (an entry a reopened tuple took
    /// back may come first: releasing it is a no-op).
    pub fn next_release(&self) -> Option<Nanos> {
        self.quarantine.front().map(|q| q.release_at)
    }

    fn free_port(&mut self, owner: Owner, dest: u32, egress: u16, port: u16) {
        if let Some(j) = self.jobs.get_mut(&owner.job) {
            j.held = j.held.saturating_sub(1);
            if j.held == 0 {
                self.jobs.remove(&owner.job);
            }
        }
        if let Some(t) = self.tenants.get_mut(&owner.tenant) {
            t.held = t.held.saturating_sub(1);
            if t.held == 0 {
                self.tenants.remove(&owner.tenant);
            }
        }
        let Some(state) = self.dests.get_mut(dest as usize).and_then(Option::as_mut) else {
            return;
        };
        if let Some(p) = state.ports_mut(egress) {
            p.used = p.used.saturating_sub(1);
            p.set.remove(port, p.used);
            if p.used == 0 {
                state.remove_ip(egress);
                let e = &mut self.egress[usize::from(egress)];
                e.destinations = e.destinations.saturating_sub(1);
            }
        }
        state.used = state.used.saturating_sub(1);
        if state.used == 0 {
            let hash = self.hasher.hash_one(state.key);
            self.dests[dest as usize] = None;
            self.free_dests.push(dest);
            if let Ok(entry) = self.dest_index.find_entry(hash, |&i| i == dest) {
                entry.remove();
            }
        }
    }

    /// Gauges per egress IP, in pool order.
    pub fn egress_usage(&self) -> Vec<EgressUsage> {
        let cap = f64::from(self.ports_per_destination());
        let mut busiest = vec![0u32; self.egress.len()];
        for s in self.dests.iter().flatten() {
            for p in s.iter() {
                let b = &mut busiest[usize::from(p.egress)];
                *b = (*b).max(p.used);
            }
        }
        self.cfg
            .egress_ips
            .iter()
            .zip(&self.egress)
            .zip(busiest)
            .map(|((ip, c), b)| EgressUsage {
                ip: *ip,
                live: c.live,
                quarantined: c.quarantined,
                destinations: c.destinations,
                ports_per_destination: self.ports_per_destination(),
                busiest_destination_utilisation: f64::from(b) / cap,
            })
            .collect()
    }

    /// The `n` destinations with the most ports in use (live + quarantined), busiest first.
    /// One pass over the destinations with a heap of `n`: O(destinations × log n) time, O(n)
    /// memory.
    pub fn hottest_destinations(&self, n: usize) -> Vec<DestinationUsage> {
        use std::cmp::Reverse;
        use std::collections::BinaryHeap;
        if n == 0 {
            return Vec::new();
        }
        let mut heap: BinaryHeap<Reverse<(u32, u32)>> = BinaryHeap::with_capacity(n + 1);
        for (id, s) in self.dests.iter().enumerate() {
            if let Some(s) = s {
                heap.push(Reverse((s.used, id as u32)));
                if heap.len() > n {
                    heap.pop();
                }
            }
        }
        let per = self.ports_per_destination();
        let mut top: Vec<(u32, u32)> = heap.into_iter().map(|Reverse(x)| x).collect();
        top.sort_by(|a, b| b.cmp(a));
        top.into_iter()
            .filter_map(|(_, id)| self.dest(id))
            .map(|s| {
                let ips = if s.key.ip.is_ipv4() {
                    self.v4.len()
                } else {
                    self.v6.len()
                };
                DestinationUsage {
                    destination: s.key,
                    live: s.live,
                    used: s.used,
                    capacity: per.saturating_mul(ips as u32),
                }
            })
            .collect()
    }

    /// Destinations with state (live or quarantined ports).
    pub fn destinations(&self) -> usize {
        self.dest_index.len()
    }

    /// Approximate heap bytes held (table capacities, port sets, quarantine).
    pub fn heap_bytes(&self) -> usize {
        let port_sets: usize = self
            .dests
            .iter()
            .flatten()
            .map(|s| s.rest_heap_bytes() + s.iter().map(|p| p.set.heap_bytes()).sum::<usize>())
            .sum();
        table_bytes(self.dest_index.capacity(), 4)
            + self.dests.capacity() * std::mem::size_of::<Option<DestState>>()
            + self.free_dests.capacity() * 4
            + port_sets
            + map_capacity_bytes(&self.job_dest_live)
            + map_capacity_bytes(&self.jobs)
            + map_capacity_bytes(&self.tenants)
            + self.quarantine.capacity() * std::mem::size_of::<Quarantined>()
            + map_capacity_bytes(&self.reopen)
    }

    /// Size of one destination slab entry in bytes.
    pub const DESTINATION_ENTRY_BYTES: usize = std::mem::size_of::<Option<DestState>>();
}

fn dest_hash(d: &Destination) -> u64 {
    let ip = match d.ip {
        IpAddr::V4(a) => u64::from(u32::from(a)),
        IpAddr::V6(a) => {
            let v = u128::from(a);
            (v as u64) ^ ((v >> 64) as u64)
        }
    };
    splitmix64(ip ^ u64::from(d.port) << 48 ^ u64::from(d.proto.number()) << 40)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    const E1: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1));
    const E2: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 2));
    const D: Destination = Destination {
        proto: L4Proto::Tcp,
        ip: IpAddr::V4(Ipv4Addr::new(203, 0, 113, 10)),
        port: 443,
    };
    const A: Owner = Owner {
        job: JobKey(1),
        tenant: TenantId(10),
    };
    const B: Owner = Owner {
        job: JobKey(2),
        tenant: TenantId(20),
    };
    const WIDE: JobLimits = JobLimits {
        max_connections: 1_000_000,
        max_ports_per_destination: 1_000_000,
    };

    /// A source address and port no other call of the test used: each allocation is a new
    /// tuple of the job (tests of reopened tuples pass their own).
    fn next_src() -> SocketAddr {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        SocketAddr::new(
            IpAddr::V4(Ipv4Addr::new(198, 51, 100, (n >> 16) as u8)),
            (n & 0xffff) as u16,
        )
    }

    fn secs(s: u64) -> Nanos {
        Nanos::from_nanos(s * 1_000_000_000)
    }

    fn small_pool(ports: RangeInclusive<u16>) -> PortAllocator {
        let mut cfg = NatConfig::new(vec![E1]);
        cfg.ports = ports;
        cfg.max_ports_per_job = u32::MAX;
        cfg.max_ports_per_tenant = u32::MAX;
        PortAllocator::new(cfg).unwrap()
    }

    fn granted(a: Allocation) -> NatLease {
        match a {
            Allocation::Granted(l) => l,
            Allocation::Refused(r) => panic!("refused: {r}"),
        }
    }

    #[test]
    fn hands_out_every_port_of_the_range_once() {
        let mut a = small_pool(2000..=2999);
        let mut seen = std::collections::HashSet::new();
        for _ in 0..1000 {
            let l = granted(a.allocate(A, next_src(), D, WIDE, secs(0)));
            assert!((2000..=2999).contains(&l.egress_port));
            assert!(seen.insert(l.egress_port));
        }
        assert_eq!(
            a.allocate(A, next_src(), D, WIDE, secs(0)),
            Allocation::Refused(Reason::PortsExhausted)
        );
    }

    #[test]
    fn each_destination_gets_the_whole_range() {
        let mut a = small_pool(5000..=5009);
        let other = Destination { port: 80, ..D };
        for _ in 0..10 {
            granted(a.allocate(A, next_src(), D, WIDE, secs(0)));
            granted(a.allocate(A, next_src(), other, WIDE, secs(0)));
        }
        assert_eq!(a.destinations(), 2);
    }

    #[test]
    fn a_reopened_tuple_takes_back_its_quarantined_port_and_no_one_else_can() {
        let mut cfg = NatConfig::new(vec![E1]);
        cfg.ports = 7000..=7001;
        cfg.max_ports_per_job = 1;
        let mut a = PortAllocator::new(cfg).unwrap();
        let src = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(198, 51, 100, 7)), 40000);
        let first = granted(a.allocate(A, src, D, WIDE, secs(0)));
        a.release(A, &first, secs(1));
        assert_eq!(a.quarantined(), 1);
        // The job's quota (one port) is full of the quarantined port: a new tuple is refused.
        assert_eq!(
            a.allocate(A, next_src(), D, WIDE, secs(2)),
            Allocation::Refused(Reason::PortQuota)
        );
        // Another job reusing the same source address and port gets a fresh port, not it.
        let other = granted(a.allocate(B, src, D, WIDE, secs(2)));
        assert_ne!(other.egress_port, first.egress_port);
        // The same job reopening the same tuple to another destination: not the same tuple.
        let elsewhere = Destination { port: 80, ..D };
        assert_eq!(
            a.allocate(A, src, elsewhere, WIDE, secs(2)),
            Allocation::Refused(Reason::PortQuota)
        );
        // The same job, source and destination: the same egress port, out of quarantine.
        let again = granted(a.allocate(A, src, D, WIDE, secs(2)));
        assert_eq!(again.egress_port, first.egress_port);
        assert_eq!(a.quarantined(), 0);
        assert_eq!(a.job_usage(A.job), Usage { live: 1, held: 1 });
        assert_eq!(a.job_destination_live(A.job, &D), 1);
        // Its old quarantine entry ends without freeing the port that is live again.
        assert_eq!(a.release_due(secs(100)), 0);
        assert!(a.is_in_use(E1, first.egress_port, &D));
        // Released again, it is quarantined again, for the full period from then.
        a.release(A, &again, secs(100));
        assert_eq!(a.quarantined(), 1);
        assert_eq!(a.release_due(secs(159)), 0);
        assert_eq!(a.release_due(secs(160)), 1);
        assert!(!a.is_in_use(E1, first.egress_port, &D));
        a.release(B, &other, secs(160));
        a.release_due(secs(300));
        assert_eq!(a.destinations(), 0, "nothing held: state evicted");
        assert_eq!(a.job_usage(A.job), Usage::default());
    }

    #[test]
    fn a_reopened_tuple_respects_the_jobs_live_cap_for_the_destination() {
        let mut a = small_pool(7000..=7009);
        let lim = JobLimits {
            max_connections: 10,
            max_ports_per_destination: 1,
        };
        let src = next_src();
        let l = granted(a.allocate(A, src, D, lim, secs(0)));
        a.release(A, &l, secs(0));
        granted(a.allocate(A, next_src(), D, lim, secs(0)));
        assert_eq!(
            a.allocate(A, src, D, lim, secs(0)),
            Allocation::Refused(Reason::DestinationPortCap)
        );
    }

    #[test]
    fn a_job_looping_over_short_connections_to_one_server_is_never_refused_at_default_quotas() {
        // A Linux client's connect() walks the even ports of 32768–60999 before it reuses one
        // (a closed connection whose server closed first leaves no TIME_WAIT at the client):
        // 14,116 tuples. 100,000 connections in 10 s, far inside one 60 s quarantine.
        let mut a = PortAllocator::new(NatConfig::new(vec![E1])).unwrap();
        let sources: Vec<u16> = (32768..=60999).step_by(2).collect();
        let mut granted_ports = std::collections::HashSet::new();
        for i in 0..100_000u64 {
            let now = Nanos::from_nanos(i * 100_000);
            let src = SocketAddr::new(
                IpAddr::V4(Ipv4Addr::new(198, 51, 100, 2)),
                sources[i as usize % sources.len()],
            );
            let l = match a.allocate(A, src, D, WIDE, now) {
                Allocation::Granted(l) => l,
                Allocation::Refused(r) => panic!("connection {i} refused: {r}"),
            };
            granted_ports.insert(l.egress_port);
            a.release(A, &l, now);
        }
        assert_eq!(
            granted_ports.len(),
            sources.len(),
            "one egress port per tuple"
        );
        assert_eq!(a.job_usage(A.job).held as usize, sources.len());
        assert_eq!(a.quarantined(), sources.len());
    }

    #[test]
    fn freed_port_stays_quarantined_until_its_time() {
        let mut a = small_pool(7000..=7000);
        let l = granted(a.allocate(A, next_src(), D, WIDE, secs(0)));
        a.release(A, &l, secs(1));
        assert_eq!(
            a.allocate(B, next_src(), D, WIDE, secs(60)),
            Allocation::Refused(Reason::PortsExhausted)
        );
        assert!(a.is_in_use(E1, 7000, &D));
        let again = granted(a.allocate(B, next_src(), D, WIDE, secs(61)));
        assert_eq!(again.egress_port, 7000);
    }

    #[test]
    fn state_is_evicted_when_nothing_is_held() {
        let mut a = small_pool(1024..=65535);
        let leases: Vec<_> = (0..600)
            .map(|_| granted(a.allocate(A, next_src(), D, WIDE, secs(0))))
            .collect();
        for l in &leases {
            a.release(A, l, secs(1));
        }
        assert_eq!(a.destinations(), 1);
        assert_eq!(a.release_due(secs(61)), 600);
        assert_eq!(a.destinations(), 0);
        assert_eq!(a.job_usage(A.job), Usage::default());
        assert_eq!(a.tenant_usage(A.tenant), Usage::default());
        assert_eq!(a.egress_usage()[0].destinations, 0);
    }

    #[test]
    fn refusal_reasons_follow_the_documented_order() {
        let mut cfg = NatConfig::new(vec![E1]);
        cfg.max_ports_per_job = 3;
        cfg.max_ports_per_tenant = 4;
        let mut a = PortAllocator::new(cfg).unwrap();
        let lim = JobLimits {
            max_connections: 2,
            max_ports_per_destination: 1,
        };
        let d2 = Destination { port: 80, ..D };
        let d3 = Destination { port: 25, ..D };
        granted(a.allocate(A, next_src(), D, lim, secs(0)));
        assert_eq!(
            a.allocate(A, next_src(), D, lim, secs(0)),
            Allocation::Refused(Reason::DestinationPortCap)
        );
        let l2 = granted(a.allocate(A, next_src(), d2, lim, secs(0)));
        assert_eq!(
            a.allocate(A, next_src(), d3, lim, secs(0)),
            Allocation::Refused(Reason::ConnectionLimit)
        );
        a.release(A, &l2, secs(0));
        // Live 1 < 2, but held 2 (one quarantined); a third port is still within 3.
        let l3 = granted(a.allocate(A, next_src(), d3, lim, secs(0)));
        a.release(A, &l3, secs(0));
        assert_eq!(
            a.allocate(A, next_src(), d2, lim, secs(0)),
            Allocation::Refused(Reason::PortQuota)
        );
        let sibling = Owner {
            job: JobKey(3),
            tenant: TenantId(10),
        };
        granted(a.allocate(sibling, next_src(), D, lim, secs(0)));
        assert_eq!(
            a.allocate(sibling, next_src(), d2, lim, secs(0)),
            Allocation::Refused(Reason::TenantPortQuota)
        );
        granted(a.allocate(B, next_src(), D, lim, secs(0)));
    }

    #[test]
    fn a_full_egress_ip_falls_over_to_the_next() {
        let mut cfg = NatConfig::new(vec![E1, E2]);
        cfg.ports = 3000..=3001;
        let mut a = PortAllocator::new(cfg).unwrap();
        let ips: Vec<IpAddr> = (0..4)
            .map(|_| granted(a.allocate(A, next_src(), D, WIDE, secs(0))).egress_ip)
            .collect();
        assert_eq!(ips.iter().filter(|ip| **ip == E1).count(), 2);
        assert_eq!(ips.iter().filter(|ip| **ip == E2).count(), 2);
        assert_eq!(ips[0], ips[1]);
        assert_eq!(
            a.allocate(A, next_src(), D, WIDE, secs(0)),
            Allocation::Refused(Reason::PortsExhausted)
        );
    }

    #[test]
    fn ipv6_destination_without_ipv6_egress_is_refused() {
        let mut a = small_pool(1024..=65535);
        let d6 = Destination {
            ip: "2001:db8::10".parse().unwrap(),
            ..D
        };
        assert_eq!(
            a.allocate(A, next_src(), d6, WIDE, secs(0)),
            Allocation::Refused(Reason::PortsExhausted)
        );
    }

    #[test]
    fn bad_configurations_are_rejected() {
        assert_eq!(
            PortAllocator::new(NatConfig::new(vec![])).unwrap_err(),
            NatConfigError::EmptyPool
        );
        assert_eq!(
            PortAllocator::new(NatConfig::new(vec![E1, E1])).unwrap_err(),
            NatConfigError::DuplicateEgress(E1)
        );
        let mut cfg = NatConfig::new(vec![E1]);
        cfg.ports = RangeInclusive::new(10, 9);
        assert_eq!(
            PortAllocator::new(cfg).unwrap_err(),
            NatConfigError::EmptyPortRange(10, 9)
        );
    }

    #[test]
    fn dense_sets_find_free_ports_across_word_and_range_edges() {
        let mut s = PortSet::empty();
        for p in 1000..(1000 + SPARSE_MAX as u16) {
            s.insert(p);
        }
        assert!(matches!(s, PortSet::Dense(_)));
        assert_eq!(
            s.find_free(1000, 1000, 2000),
            Some(1000 + SPARSE_MAX as u16)
        );
        assert_eq!(s.find_free(1200, 1000, 1255), None);
        assert_eq!(s.find_free(1200, 990, 1255), Some(990));
        s.remove(1100, 100);
        assert_eq!(s.find_free(1001, 1000, 1255), Some(1100));
        s.remove(1101, 10);
        assert!(matches!(s, PortSet::Sparse(_)));
        assert!(!s.contains(1101));
        assert!(s.contains(1102));
    }

    #[test]
    fn destination_cap_counts_each_job_separately_across_hand_overs() {
        let mut a = small_pool(1024..=65535);
        let cap = JobLimits {
            max_connections: 100,
            max_ports_per_destination: 3,
        };
        let x = Owner {
            job: JobKey(1),
            tenant: TenantId(1),
        };
        let y = Owner {
            job: JobKey(2),
            tenant: TenantId(1),
        };
        let x1 = granted(a.allocate(x, next_src(), D, cap, secs(0)));
        granted(a.allocate(y, next_src(), D, cap, secs(0)));
        granted(a.allocate(y, next_src(), D, cap, secs(0)));
        // x's count was kept inline, y's in the map; x leaves, y goes on.
        a.release(x, &x1, secs(0));
        assert_eq!(a.job_destination_live(x.job, &D), 0);
        granted(a.allocate(y, next_src(), D, cap, secs(0)));
        assert_eq!(a.job_destination_live(y.job, &D), 3);
        assert_eq!(
            a.allocate(y, next_src(), D, cap, secs(0)),
            Allocation::Refused(Reason::DestinationPortCap)
        );
        for _ in 0..3 {
            granted(a.allocate(x, next_src(), D, cap, secs(0)));
        }
        assert_eq!(
            a.allocate(x, next_src(), D, cap, secs(0)),
            Allocation::Refused(Reason::DestinationPortCap)
        );
    }

    #[test]
    fn port_sets_grow_from_inline_to_bitmap_and_back() {
        let mut s = PortSet::empty();
        let n = 2 * SPARSE_MAX as u16;
        for p in (2000..2000 + n).rev() {
            assert!(!s.contains(p));
            s.insert(p);
            assert!(s.contains(p));
        }
        assert!(matches!(s, PortSet::Dense(_)));
        let mut left = u32::from(n);
        for p in 2000..2000 + n - 3 {
            left -= 1;
            s.remove(p, left);
            assert!(!s.contains(p));
        }
        assert!(!matches!(s, PortSet::Dense(_)));
        assert_eq!(s.find_free(2000, 2000, 65535), Some(2000));
        let last = 2000 + n - 3;
        assert_eq!(s.find_free(last, 2000, 65535), Some(last + 3));
    }

    #[test]
    fn hottest_destinations_are_sorted_by_use() {
        let mut a = small_pool(1024..=65535);
        let d2 = Destination { port: 80, ..D };
        for _ in 0..3 {
            granted(a.allocate(A, next_src(), d2, WIDE, secs(0)));
        }
        granted(a.allocate(A, next_src(), D, WIDE, secs(0)));
        let d3 = Destination { port: 22, ..D };
        for _ in 0..2 {
            granted(a.allocate(A, next_src(), d3, WIDE, secs(0)));
        }
        let hot = a.hottest_destinations(2);
        assert_eq!(hot.len(), 2);
        assert_eq!((hot[0].destination, hot[0].used), (d2, 3));
        assert_eq!((hot[1].destination, hot[1].used), (d3, 2));
        assert_eq!(hot[0].capacity, 64_512);
        assert_eq!(a.hottest_destinations(10).len(), 3);
        let usage = a.egress_usage();
        assert_eq!(usage[0].live, 6);
        assert_eq!(usage[0].destinations, 3);
    }
}
