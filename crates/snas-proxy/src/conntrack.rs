//! Connection tracking: flows of jobs ↔ their NAT tuples, TCP/UDP/ICMP state and idle expiry.
//!
//! Owns the flow table, both lookup directions, the per-flow protocol state, the expiry timer,
//! and the [`PortAllocator`] that gives each flow its NAT tuple (so flow and port accounting can
//! never disagree).
//!
//! # Keys
//! - Forward ([`FlowKey`]): (job, protocol, inner source ip:port, destination ip:port).
//! - Reply ([`ReplyKey`]): (protocol, remote ip:port, egress ip:port), i.e. what a packet from
//!   the internet carries.
//! - ICMP echo: the identifier is the source "port" and is what NAT translates; the destination
//!   port is 0 in both directions (a reply key has `remote_port: 0` and `egress_port` = the
//!   translated identifier). Callers whose tuple puts the identifier in both ports (as
//!   `snas_wire::FiveTuple` does) set the remote side to 0 before calling.
//!
//! # Layout and memory
//! Flows live in a slab (`Vec<Flow>`, one 104-byte entry each, free list for reuse). Both lookup
//! tables are SwissTables of 4-byte flow indices that hash and compare through the slab entry,
//! so a key is stored once and each table costs about 5–10 bytes per flow. Expiry uses a
//! [`TimerWheel`] of (index, timer-token) pairs with lazy re-check: a packet only stamps
//! `last_seen`; when an entry comes due the flow's real deadline is recomputed and the entry
//! re-inserted if the flow was active. A state change to a shorter timeout inserts a new entry and
//! bumps the token, turning the old one stale. So lookup, insert, observe and expiry are O(1)
//! amortised. [`Conntrack::memory`] reports the bytes; `docs/proxy-core.md` has the figures.
//!
//! # Counters
//! Every flow counts packets and bytes (IP packet length, a GSO super-packet counted once as
//! one packet) in each direction and remembers when it was created, so that the end of a flow
//! (expiry, [`Conntrack::remove`], [`Conntrack::remove_job`]) yields a [`RemovedFlow`] with its
//! totals and duration. Packet counts saturate at `u32::MAX`.
//!
//! # TCP states (enough to time out correctly; no sequence tracking)
//! `SynSent` (every new TCP flow) → `Established` on a reply SYN+ACK; a FIN in either direction
//! → `Closing`; FINs from both directions or an RST in either → `Closed`. A flow never goes back
//! to `SynSent`: a new SYN from the inside on a `Closing` or `Closed` flow is a new connection on
//! a reused 5-tuple ([`Conntrack::starts_new_connection`]), which the engine ends the old flow
//! for and admits like any other (policy decision, limits, name check, a fresh NAT tuple). A SYN
//! on an `Established` flow is taken for a retransmission (the SYN+ACK got lost on its way to
//! the sandbox): without sequence numbers the two cannot be told apart, and the remote, which
//! holds that connection, answers such a SYN with an ACK, not a new connection. UDP is
//! `UdpUnreplied` until a reply is seen, then `UdpReplied`. ICMP has one state.
//!
//! # Invariants
//! - Every live flow is in both tables and holds exactly one live NAT lease; removing a flow
//!   (expiry or [`Conntrack::remove`]) puts its port in quarantine.
//! - [`FlowId`]s carry a generation: a stale id never reaches a newer flow in the same slot.
//! - A job's tenant is fixed by its first live flow (NAT quotas are charged to it until its last
//!   flow is gone): job keys come from signed policies, which name one tenant.
//! - Expiry timer tokens are 16 bits: a wrapped token that matches a stale wheel entry only makes
//!   that entry recompute the flow's real deadline, which is always correct.
//! - At most [`ConntrackConfig::max_flows`] flows; beyond that new flows are refused with
//!   [`Reason::PortsExhausted`] (the proxy has no room for another NAT entry).

use snas_wire::{JobKey, TenantId};
use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use hashbrown::HashTable;
use snas_wire::{L4Proto, Reason};

use crate::clock::Nanos;
use crate::nat::{
    table_bytes, Allocation, Destination, JobLimits, NatConfig, NatConfigError, NatLease, Owner,
    PortAllocator,
};
use crate::wheel::{TimerWheel, WheelError};

/// Idle timeouts per protocol state. [`Timeouts::default`] gives the documented defaults.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// TCP before the reply SYN+ACK (default 30 s).
    pub tcp_syn_sent: Duration,
    /// TCP established (default 1 h).
    pub tcp_established: Duration,
    /// TCP after a FIN in one direction (default 60 s).
    pub tcp_closing: Duration,
    /// TCP after FINs both ways or an RST (default 30 s).
    pub tcp_closed: Duration,
    /// UDP with no reply seen (default 30 s).
    pub udp_unreplied: Duration,
    /// UDP with replies (default 120 s).
    pub udp_replied: Duration,
    /// ICMP echo (default 30 s).
    pub icmp: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            tcp_syn_sent: Duration::from_secs(30),
            tcp_established: Duration::from_secs(3600),
            tcp_closing: Duration::from_secs(60),
            tcp_closed: Duration::from_secs(30),
            udp_unreplied: Duration::from_secs(30),
            udp_replied: Duration::from_secs(120),
            icmp: Duration::from_secs(30),
        }
    }
}

impl Timeouts {
    /// The idle timeout of a flow in `state`.
    pub fn of(&self, state: FlowState) -> Duration {
        match state {
            FlowState::TcpSynSent => self.tcp_syn_sent,
            FlowState::TcpEstablished => self.tcp_established,
            FlowState::TcpClosing => self.tcp_closing,
            FlowState::TcpClosed => self.tcp_closed,
            FlowState::UdpUnreplied => self.udp_unreplied,
            FlowState::UdpReplied => self.udp_replied,
            FlowState::Icmp => self.icmp,
        }
    }
}

/// Conntrack configuration.
#[derive(Debug, Clone)]
pub struct ConntrackConfig {
    /// Idle timeouts.
    pub timeouts: Timeouts,
    /// Hard cap on live flows (default 2²⁰ = 1 048 576).
    pub max_flows: u32,
    /// Expiry precision (default 1 s): a flow is removed at most this late.
    pub expiry_granularity: Duration,
    /// NAT allocator configuration.
    pub nat: NatConfig,
}

impl ConntrackConfig {
    /// Defaults for the given egress pool.
    pub fn new(egress_ips: Vec<IpAddr>) -> ConntrackConfig {
        ConntrackConfig {
            timeouts: Timeouts::default(),
            max_flows: 1 << 20,
            expiry_granularity: Duration::from_secs(1),
            nat: NatConfig::new(egress_ips),
        }
    }
}

/// Invalid conntrack configuration.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConntrackError {
    /// the NAT allocator configuration is invalid
    #[error("invalid NAT configuration: {0}")]
    Nat(#[from] NatConfigError),
    /// the expiry wheel cannot be built
    #[error("invalid expiry granularity: {0}")]
    Wheel(#[from] WheelError),
    /// a timeout is zero
    #[error("conntrack timeout for {0:?} must be greater than zero")]
    ZeroTimeout(FlowState),
}

/// Forward key: what a packet from the sandbox carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FlowKey {
    /// Job key.
    pub job: JobKey,
    /// Protocol.
    pub proto: L4Proto,
    /// Inner source (sandbox) address.
    pub src_ip: IpAddr,
    /// Inner source port (ICMP: echo identifier).
    pub src_port: u16,
    /// Destination address.
    pub dst_ip: IpAddr,
    /// Destination port (ICMP: 0).
    pub dst_port: u16,
}

/// Reply key: what a packet from the internet carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ReplyKey {
    /// Protocol.
    pub proto: L4Proto,
    /// The remote peer (the reply's source).
    pub remote_ip: IpAddr,
    /// The remote peer's port (ICMP: 0).
    pub remote_port: u16,
    /// The egress address (the reply's destination).
    pub egress_ip: IpAddr,
    /// The egress port (ICMP: the translated echo identifier).
    pub egress_port: u16,
}

/// Handle of a live flow. Stale handles (flow gone) are recognised, never aliased.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FlowId {
    index: u32,
    generation: u32,
}

/// Which way a packet goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Sandbox → internet.
    Original,
    /// Internet → sandbox.
    Reply,
}

/// TCP header flags, as the wire views read them.
pub use snas_wire::TcpFlags;

/// Protocol state of a flow (selects its idle timeout).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum FlowState {
    /// TCP, no reply SYN+ACK yet.
    TcpSynSent,
    /// TCP, handshake answered.
    TcpEstablished,
    /// TCP, FIN seen in one direction.
    TcpClosing,
    /// TCP, FINs both ways or RST.
    TcpClosed,
    /// UDP, no reply yet.
    UdpUnreplied,
    /// UDP, replies seen.
    UdpReplied,
    /// ICMP echo.
    Icmp,
}

impl FlowState {
    fn initial(proto: L4Proto) -> FlowState {
        match proto {
            L4Proto::Tcp => FlowState::TcpSynSent,
            L4Proto::Udp => FlowState::UdpUnreplied,
            L4Proto::Icmp | L4Proto::Icmpv6 => FlowState::Icmp,
        }
    }
}

/// Outcome of [`Conntrack::open`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Open {
    /// A new flow with its NAT tuple.
    Created {
        /// The flow.
        id: FlowId,
        /// Egress address.
        egress_ip: IpAddr,
        /// Egress port.
        egress_port: u16,
    },
    /// The key already had a flow.
    Existing(FlowId),
    /// The new flow is refused (answer with RST / ICMP unreachable and audit).
    Refused(Reason),
}

/// Packets and bytes of a flow, each way (IP packet lengths).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FlowCounters {
    /// Packets sandbox → internet (saturating).
    pub packets_out: u32,
    /// Packets internet → sandbox (saturating).
    pub packets_in: u32,
    /// Bytes sandbox → internet.
    pub bytes_out: u64,
    /// Bytes internet → sandbox.
    pub bytes_in: u64,
}

/// A read-only view of a flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlowInfo {
    /// Forward key.
    pub key: FlowKey,
    /// Tenant.
    pub tenant: TenantId,
    /// Egress address.
    pub egress_ip: IpAddr,
    /// Egress port.
    pub egress_port: u16,
    /// Protocol state.
    pub state: FlowState,
    /// Last packet seen (either direction).
    pub last_seen: Nanos,
    /// When the flow was created.
    pub created: Nanos,
    /// Packets and bytes each way.
    pub counters: FlowCounters,
}

impl FlowInfo {
    /// Time from the first to the last packet.
    pub fn duration(&self) -> std::time::Duration {
        self.last_seen.saturating_duration_since(self.created)
    }
}

/// A flow that has been removed (expired or closed); its port is in quarantine.
pub type RemovedFlow = FlowInfo;

const FIN_ORIGINAL: u8 = 1;
const FIN_REPLY: u8 = 2;
/// In `Flow::flags`: the slot holds a live flow.
const LIVE: u8 = 0x80;

// Field order is the compiler's; the size is what counts (see `FLOW_ENTRY_BYTES` and the
// memory figures in docs/proxy-core.md): keep it at 104 bytes.
#[derive(Debug, Clone)]
struct Flow {
    job: JobKey,
    last_seen: Nanos,
    created: Nanos,
    bytes: [u64; 2],
    packets: [u32; 2],
    src_ip: IpAddr,
    dst_ip: IpAddr,
    src_port: u16,
    dst_port: u16,
    nat_port: u16,
    egress: u16,
    dest: u32,
    generation: u32,
    timer: u16,
    proto: L4Proto,
    state: FlowState,
    /// `FIN_ORIGINAL | FIN_REPLY` seen, and `LIVE`.
    flags: u8,
}

impl Flow {
    fn live(&self) -> bool {
        self.flags & LIVE != 0
    }
}

/// Per-job state: the tenant NAT quotas are charged to, and the counts.
#[derive(Debug, Clone, Copy)]
struct JobEntry {
    tenant: TenantId,
    /// Live flows (closed ones waiting to expire included).
    live: u32,
    /// Live flows that are not closed: the `max_connections` count.
    open: u32,
}

/// The connection tracker. See the module documentation.
#[derive(Debug)]
pub struct Conntrack {
    timeouts: Timeouts,
    max_flows: u32,
    flows: Vec<Flow>,
    free: Vec<u32>,
    live: u32,
    fwd: HashTable<u32>,
    rev: HashTable<u32>,
    hasher: RandomState,
    wheel: TimerWheel<(u32, u32)>,
    due: Vec<(u32, u32)>,
    nat: PortAllocator,
    /// Jobs with live flows. A closed TCP flow keeps its entry (and NAT port) until it expires,
    /// so late ACKs and FINs still translate, but it is no longer an open connection.
    jobs: std::collections::HashMap<JobKey, JobEntry>,
}

/// An address as 128 bits (IPv4 as its v4-mapped form) for hashing; equality always compares
/// the `IpAddr` itself.
fn ip_bits(ip: &IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V4(a) => a.to_ipv6_mapped().octets(),
        IpAddr::V6(a) => a.octets(),
    }
}

// Keys are hashed as one contiguous byte string: one SipHash write instead of a dozen small
// ones from the derived `Hash` impls (measurably faster, same keyed hash).
fn hash_fwd(
    s: &RandomState,
    job: JobKey,
    proto: L4Proto,
    src: &IpAddr,
    sport: u16,
    dst: &IpAddr,
    dport: u16,
) -> u64 {
    let mut b = [0u8; 45];
    b[0..8].copy_from_slice(&job.get().to_ne_bytes());
    b[8..24].copy_from_slice(&ip_bits(src));
    b[24..40].copy_from_slice(&ip_bits(dst));
    b[40..42].copy_from_slice(&sport.to_ne_bytes());
    b[42..44].copy_from_slice(&dport.to_ne_bytes());
    b[44] = proto.number();
    let mut h = s.build_hasher();
    h.write(&b);
    h.finish()
}

fn hash_rev(
    s: &RandomState,
    proto: L4Proto,
    remote: &IpAddr,
    rport: u16,
    egress: u16,
    eport: u16,
) -> u64 {
    let mut b = [0u8; 23];
    b[0..16].copy_from_slice(&ip_bits(remote));
    b[16..18].copy_from_slice(&rport.to_ne_bytes());
    b[18..20].copy_from_slice(&egress.to_ne_bytes());
    b[20..22].copy_from_slice(&eport.to_ne_bytes());
    b[22] = proto.number();
    let mut h = s.build_hasher();
    h.write(&b);
    h.finish()
}

fn flow_fwd_hash(s: &RandomState, f: &Flow) -> u64 {
    hash_fwd(
        s, f.job, f.proto, &f.src_ip, f.src_port, &f.dst_ip, f.dst_port,
    )
}

fn flow_rev_hash(s: &RandomState, f: &Flow) -> u64 {
    hash_rev(s, f.proto, &f.dst_ip, f.dst_port, f.egress, f.nat_port)
}

/// Bytes held by the conntrack, by structure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryReport {
    /// Live flows.
    pub flows: usize,
    /// Flow slab (capacity × entry size) and free list.
    pub slab: usize,
    /// Forward lookup table.
    pub forward_table: usize,
    /// Reply lookup table.
    pub reply_table: usize,
    /// Expiry wheel.
    pub expiry: usize,
    /// NAT allocator (destinations, port sets, quotas, quarantine).
    pub nat: usize,
}

impl MemoryReport {
    /// Sum of all parts.
    pub fn total(&self) -> usize {
        self.slab + self.forward_table + self.reply_table + self.expiry + self.nat
    }

    /// Bytes per live flow (0 when empty).
    pub fn bytes_per_flow(&self) -> usize {
        self.total().checked_div(self.flows).unwrap_or(0)
    }
}

impl Conntrack {
    /// An empty tracker at time `now`.
    pub fn new(cfg: ConntrackConfig, now: Nanos) -> Result<Conntrack, ConntrackError> {
        let t = cfg.timeouts;
        for s in [
            FlowState::TcpSynSent,
            FlowState::TcpEstablished,
            FlowState::TcpClosing,
            FlowState::TcpClosed,
            FlowState::UdpUnreplied,
            FlowState::UdpReplied,
            FlowState::Icmp,
        ] {
            if t.of(s).is_zero() {
                return Err(ConntrackError::ZeroTimeout(s));
            }
        }
        // Span the longest timeout (capped at 2^16 slots, 1.5 MiB of slot headers) so that an
        // entry is normally looked at only when its flow may be due.
        let longest = [
            t.tcp_syn_sent,
            t.tcp_established,
            t.tcp_closing,
            t.tcp_closed,
            t.udp_unreplied,
            t.udp_replied,
            t.icmp,
        ]
        .into_iter()
        .max()
        .unwrap_or(Duration::ZERO);
        let span = longest.min(cfg.expiry_granularity.saturating_mul(1 << 16));
        Ok(Conntrack {
            timeouts: t,
            max_flows: cfg.max_flows,
            flows: Vec::new(),
            free: Vec::new(),
            live: 0,
            fwd: HashTable::new(),
            rev: HashTable::new(),
            hasher: RandomState::new(),
            wheel: TimerWheel::new(cfg.expiry_granularity, span, now)?,
            due: Vec::new(),
            nat: PortAllocator::new(cfg.nat)?,
            jobs: std::collections::HashMap::new(),
        })
    }

    /// The NAT allocator (for gauges and quota queries).
    pub fn nat(&self) -> &PortAllocator {
        &self.nat
    }

    /// Live flows.
    pub fn len(&self) -> usize {
        self.live as usize
    }

    /// True when no flow is live.
    pub fn is_empty(&self) -> bool {
        self.live == 0
    }

    /// Live flows of `job`, closed TCP flows waiting to expire included (each holds a NAT port).
    pub fn live_flows_of_job(&self, job: JobKey) -> u32 {
        self.nat.job_usage(job).live
    }

    /// Open connections of `job`: live flows that are not closed (exact; this is the
    /// `max_connections` count).
    pub fn open_connections_of_job(&self, job: JobKey) -> u32 {
        self.jobs.get(&job).map_or(0, |j| j.open)
    }

    /// Jobs with live flows.
    pub fn jobs(&self) -> impl Iterator<Item = JobKey> + '_ {
        self.jobs.keys().copied()
    }

    fn count_open(&mut self, job: JobKey, opened: bool) {
        if let Some(j) = self.jobs.get_mut(&job) {
            if opened {
                j.open += 1;
            } else {
                j.open = j.open.saturating_sub(1);
            }
        }
    }

    /// The flow for a packet from the sandbox.
    pub fn lookup(&self, key: &FlowKey) -> Option<FlowId> {
        let h = hash_fwd(
            &self.hasher,
            key.job,
            key.proto,
            &key.src_ip,
            key.src_port,
            &key.dst_ip,
            key.dst_port,
        );
        let flows = &self.flows;
        self.fwd
            .find(h, |&i| {
                let f = &flows[i as usize];
                f.job == key.job
                    && f.proto == key.proto
                    && f.src_port == key.src_port
                    && f.dst_port == key.dst_port
                    && f.src_ip == key.src_ip
                    && f.dst_ip == key.dst_ip
            })
            .map(|&i| self.id_of(i))
    }

    /// The flow for a packet from the internet.
    pub fn lookup_reply(&self, key: &ReplyKey) -> Option<FlowId> {
        let egress = self.nat.egress_index(key.egress_ip)?;
        let h = hash_rev(
            &self.hasher,
            key.proto,
            &key.remote_ip,
            key.remote_port,
            egress,
            key.egress_port,
        );
        let flows = &self.flows;
        self.rev
            .find(h, |&i| {
                let f = &flows[i as usize];
                f.nat_port == key.egress_port
                    && f.egress == egress
                    && f.dst_port == key.remote_port
                    && f.proto == key.proto
                    && f.dst_ip == key.remote_ip
            })
            .map(|&i| self.id_of(i))
    }

    fn id_of(&self, index: u32) -> FlowId {
        FlowId {
            index,
            generation: self.flows[index as usize].generation,
        }
    }

    fn get(&self, id: FlowId) -> Option<&Flow> {
        self.flows
            .get(id.index as usize)
            .filter(|f| f.live() && f.generation == id.generation)
    }

    /// A view of a live flow; `None` for a stale id.
    pub fn info(&self, id: FlowId) -> Option<FlowInfo> {
        self.get(id).map(|f| self.info_of(f))
    }

    fn info_of(&self, f: &Flow) -> FlowInfo {
        FlowInfo {
            key: FlowKey {
                job: f.job,
                proto: f.proto,
                src_ip: f.src_ip,
                src_port: f.src_port,
                dst_ip: f.dst_ip,
                dst_port: f.dst_port,
            },
            tenant: self
                .jobs
                .get(&f.job)
                .map_or(TenantId::default(), |j| j.tenant),
            egress_ip: self.nat.egress_ip(f.egress),
            egress_port: f.nat_port,
            state: f.state,
            last_seen: f.last_seen,
            created: f.created,
            counters: FlowCounters {
                packets_out: f.packets[0],
                packets_in: f.packets[1],
                bytes_out: f.bytes[0],
                bytes_in: f.bytes[1],
            },
        }
    }

    /// Creates the flow for `key` (or finds the existing one), allocating its NAT tuple under
    /// the job's `limits`. The policy decision (is this destination allowed?) and the
    /// `new_connections_per_sec` bucket come before this call. `tenant` is used for the job's
    /// first live flow; later flows of the job keep that tenant (see the invariants). The new
    /// flow's counters are zero: count its first packet with [`Conntrack::observe`].
    pub fn open(&mut self, key: FlowKey, tenant: TenantId, limits: JobLimits, now: Nanos) -> Open {
        if let Some(id) = self.lookup(&key) {
            return Open::Existing(id);
        }
        if self.live >= self.max_flows {
            return Open::Refused(Reason::PortsExhausted);
        }
        let tenant = self.jobs.get(&key.job).map_or(tenant, |j| j.tenant);
        let owner = Owner {
            job: key.job,
            tenant,
        };
        let dest = Destination {
            proto: key.proto,
            ip: key.dst_ip,
            port: key.dst_port,
        };
        if self.open_connections_of_job(key.job) >= limits.max_connections {
            return Open::Refused(Reason::ConnectionLimit);
        }
        // `max_connections` counts open connections (above); the allocator bounds NAT entries,
        // closed flows included, through the port quotas.
        let nat_limits = JobLimits {
            max_connections: u32::MAX,
            ..limits
        };
        let source = SocketAddr::new(key.src_ip, key.src_port);
        let lease = match self.nat.allocate(owner, source, dest, nat_limits, now) {
            Allocation::Granted(l) => l,
            Allocation::Refused(r) => return Open::Refused(r),
        };
        let state = FlowState::initial(key.proto);
        let (index, timer) = match self.free.pop() {
            Some(i) => (i, self.flows[i as usize].timer.wrapping_add(1)),
            None => {
                let Ok(i) = u32::try_from(self.flows.len()) else {
                    self.nat.release(owner, &lease, now);
                    return Open::Refused(Reason::PortsExhausted);
                };
                (i, 0)
            }
        };
        let generation = self
            .flows
            .get(index as usize)
            .map_or(0, |f| f.generation.wrapping_add(1));
        let flow = Flow {
            job: key.job,
            last_seen: now,
            created: now,
            bytes: [0; 2],
            packets: [0; 2],
            src_ip: key.src_ip,
            dst_ip: key.dst_ip,
            src_port: key.src_port,
            dst_port: key.dst_port,
            nat_port: lease.egress_port,
            egress: lease.egress_index,
            dest: lease.dest_id,
            generation,
            timer,
            proto: key.proto,
            state,
            flags: LIVE,
        };
        if (index as usize) < self.flows.len() {
            self.flows[index as usize] = flow;
        } else {
            self.flows.push(flow);
        }
        let f = &self.flows[index as usize];
        let (hf, hr) = (
            flow_fwd_hash(&self.hasher, f),
            flow_rev_hash(&self.hasher, f),
        );
        let (flows, hasher) = (&self.flows, &self.hasher);
        self.fwd
            .insert_unique(hf, index, |&i| flow_fwd_hash(hasher, &flows[i as usize]));
        self.rev
            .insert_unique(hr, index, |&i| flow_rev_hash(hasher, &flows[i as usize]));
        self.live += 1;
        let j = self.jobs.entry(key.job).or_insert(JobEntry {
            tenant,
            live: 0,
            open: 0,
        });
        j.live += 1;
        j.open += 1;
        self.wheel.insert(
            now.saturating_add(self.timeouts.of(state)),
            (index, u32::from(timer)),
        );
        Open::Created {
            id: FlowId { index, generation },
            egress_ip: lease.egress_ip,
            egress_port: lease.egress_port,
        }
    }

    /// Records a packet of `len` bytes (its IP length) of flow `id` going `dir` with TCP
    /// `flags` (ignored for UDP/ICMP) at `now`; returns the new state, or `None` for a stale id.
    pub fn observe(
        &mut self,
        id: FlowId,
        dir: Direction,
        flags: TcpFlags,
        len: u32,
        now: Nanos,
    ) -> Option<FlowState> {
        self.get(id)?;
        let timeouts = self.timeouts;
        let f = &mut self.flows[id.index as usize];
        f.last_seen = f.last_seen.max(now);
        let d = usize::from(dir == Direction::Reply);
        f.packets[d] = f.packets[d].saturating_add(1);
        f.bytes[d] = f.bytes[d].saturating_add(u64::from(len));
        let old = f.state;
        let new = match old {
            FlowState::UdpUnreplied if dir == Direction::Reply => FlowState::UdpReplied,
            FlowState::UdpUnreplied | FlowState::UdpReplied | FlowState::Icmp => old,
            _ if flags.contains(TcpFlags::RST) => FlowState::TcpClosed,
            // A SYN here is a new connection: the caller asked `starts_new_connection` first.
            FlowState::TcpClosed => old,
            _ if flags.contains(TcpFlags::FIN) => {
                f.flags |= match dir {
                    Direction::Original => FIN_ORIGINAL,
                    Direction::Reply => FIN_REPLY,
                };
                if f.flags & (FIN_ORIGINAL | FIN_REPLY) == FIN_ORIGINAL | FIN_REPLY {
                    FlowState::TcpClosed
                } else {
                    FlowState::TcpClosing
                }
            }
            FlowState::TcpSynSent
                if dir == Direction::Reply && flags.contains(TcpFlags::SYN | TcpFlags::ACK) =>
            {
                FlowState::TcpEstablished
            }
            _ => old,
        };
        f.state = new;
        let job = f.job;
        match (old == FlowState::TcpClosed, new == FlowState::TcpClosed) {
            (false, true) => self.count_open(job, false),
            (true, false) => self.count_open(job, true),
            _ => {}
        }
        let f = &mut self.flows[id.index as usize];
        if timeouts.of(new) < timeouts.of(old) {
            // The pending entry is too late now: replace it.
            f.timer = f.timer.wrapping_add(1);
            let entry = (id.index, u32::from(f.timer));
            self.wheel
                .insert(now.saturating_add(timeouts.of(new)), entry);
        }
        Some(new)
    }

    /// Whether a packet from the inside with TCP `flags` on flow `id` starts a new connection
    /// on the flow's 5-tuple: a SYN without ACK on a TCP flow that is closing or closed (a FIN
    /// or RST was seen). The sandbox chooses its source ports, so it can reuse a tuple at once;
    /// the old flow's decisions (policy, DNS binding, name check) must not carry over, so the
    /// caller removes the flow and admits the SYN as a new flow. A SYN in `SynSent` or
    /// `Established` is a retransmission of the handshake the flow was admitted for (see the
    /// module documentation). `false` for a stale id.
    pub fn starts_new_connection(&self, id: FlowId, flags: TcpFlags) -> bool {
        flags.contains(TcpFlags::SYN)
            && !flags.contains(TcpFlags::ACK)
            && !flags.contains(TcpFlags::RST)
            && self.get(id).is_some_and(|f| {
                f.proto == L4Proto::Tcp
                    && matches!(f.state, FlowState::TcpClosing | FlowState::TcpClosed)
            })
    }

    /// Adds `packets` and `bytes` that went `dir` outside the engine (the proxy's in-kernel
    /// fast path, which never sees SYN, FIN or RST: the state does not change) to flow `id`,
    /// the last of them at `last_seen` (later than the flow's last packet, or ignored). Returns
    /// false for a stale id.
    pub fn credit(
        &mut self,
        id: FlowId,
        dir: Direction,
        packets: u32,
        bytes: u64,
        last_seen: Option<Nanos>,
    ) -> bool {
        if self.get(id).is_none() {
            return false;
        }
        let f = &mut self.flows[id.index as usize];
        if let Some(t) = last_seen {
            // The expiry wheel re-reads last_seen when the flow's entry comes due.
            f.last_seen = f.last_seen.max(t);
        }
        let d = usize::from(dir == Direction::Reply);
        f.packets[d] = f.packets[d].saturating_add(packets);
        f.bytes[d] = f.bytes[d].saturating_add(bytes);
        true
    }

    /// Removes flow `id` at once (e.g. policy revoked); its port goes into quarantine.
    pub fn remove(&mut self, id: FlowId, now: Nanos) -> Option<RemovedFlow> {
        self.get(id)?;
        Some(self.remove_index(id.index, now))
    }

    fn remove_index(&mut self, index: u32, now: Nanos) -> RemovedFlow {
        let info = self.info_of(&self.flows[index as usize]);
        let f = &self.flows[index as usize];
        let (hf, hr) = (
            flow_fwd_hash(&self.hasher, f),
            flow_rev_hash(&self.hasher, f),
        );
        if let Ok(e) = self.fwd.find_entry(hf, |&i| i == index) {
            e.remove();
        }
        if let Ok(e) = self.rev.find_entry(hr, |&i| i == index) {
            e.remove();
        }
        if info.state != FlowState::TcpClosed {
            self.count_open(info.key.job, false);
        }
        if let Some(j) = self.jobs.get_mut(&info.key.job) {
            j.live = j.live.saturating_sub(1);
            if j.live == 0 {
                self.jobs.remove(&info.key.job);
            }
        }
        let f = &mut self.flows[index as usize];
        f.flags = 0;
        f.timer = f.timer.wrapping_add(1);
        let owner = Owner {
            job: f.job,
            tenant: info.tenant,
        };
        let lease = NatLease {
            egress_ip: info.egress_ip,
            egress_port: f.nat_port,
            egress_index: f.egress,
            dest_id: f.dest,
            source: SocketAddr::new(f.src_ip, f.src_port),
        };
        self.nat.release(owner, &lease, now);
        self.free.push(index);
        self.live -= 1;
        info
    }

    /// Removes every flow idle past its timeout at `now` (within the expiry granularity) and
    /// releases ports whose quarantine has ended. The caller drives the iterator; what it does
    /// not consume stays pending for the next call.
    pub fn expire(&mut self, now: Nanos) -> Expired<'_> {
        self.nat.release_due(now);
        self.wheel.pop_due(now, &mut self.due);
        Expired { ct: self, now }
    }

    /// Every live flow (for `snas flows` and audits). O(slab size).
    pub fn iter(&self) -> impl Iterator<Item = (FlowId, FlowInfo)> + '_ {
        self.flows
            .iter()
            .enumerate()
            .filter(|(_, f)| f.live())
            .map(|(i, f)| {
                (
                    FlowId {
                        index: i as u32,
                        generation: f.generation,
                    },
                    self.info_of(f),
                )
            })
    }

    /// Removes every flow of `job` (job ended or its policy was revoked); their ports go into
    /// quarantine. O(slab size): an administrative operation, not a per-packet one; to end
    /// several jobs, [`Conntrack::remove_jobs`] does it in one pass.
    pub fn remove_job(&mut self, job: JobKey, now: Nanos) -> Vec<RemovedFlow> {
        self.remove_jobs(&[job], now)
    }

    /// Removes every flow of the `jobs` in one pass over the slab (none at all when none of
    /// them has a live flow).
    pub fn remove_jobs(&mut self, jobs: &[JobKey], now: Nanos) -> Vec<RemovedFlow> {
        let mut with_flows: Vec<JobKey> = jobs
            .iter()
            .copied()
            .filter(|j| self.jobs.contains_key(j))
            .collect();
        if with_flows.is_empty() {
            return Vec::new();
        }
        with_flows.sort_unstable();
        let indices: Vec<u32> = self
            .flows
            .iter()
            .enumerate()
            .filter(|(_, f)| f.live() && with_flows.binary_search(&f.job).is_ok())
            .map(|(i, _)| i as u32)
            .collect();
        indices
            .into_iter()
            .map(|i| self.remove_index(i, now))
            .collect()
    }

    /// Bytes held, by structure.
    pub fn memory(&self) -> MemoryReport {
        MemoryReport {
            flows: self.len(),
            slab: self.flows.capacity() * std::mem::size_of::<Flow>() + self.free.capacity() * 4,
            forward_table: table_bytes(self.fwd.capacity(), 4),
            reply_table: table_bytes(self.rev.capacity(), 4),
            expiry: self.wheel.heap_bytes() + self.due.capacity() * 8,
            nat: self.nat.heap_bytes(),
        }
    }

    /// Size of one flow slab entry in bytes.
    pub const FLOW_ENTRY_BYTES: usize = std::mem::size_of::<Flow>();
}

// docs/proxy-core.md "Memory" (≤ 256 B per flow at 1M flows in the worst case) rests on a
// 104-byte entry: a field added here must be paid for elsewhere.
const _: () = assert!(Conntrack::FLOW_ENTRY_BYTES <= 104);

/// Iterator over flows removed by [`Conntrack::expire`].
#[derive(Debug)]
pub struct Expired<'a> {
    ct: &'a mut Conntrack,
    now: Nanos,
}

impl Iterator for Expired<'_> {
    type Item = RemovedFlow;

    fn next(&mut self) -> Option<RemovedFlow> {
        let ct = &mut *self.ct;
        while let Some((index, timer)) = ct.due.pop() {
            let Some(f) = ct.flows.get(index as usize) else {
                continue;
            };
            if !f.live() || u32::from(f.timer) != timer {
                continue;
            }
            let deadline = f.last_seen.saturating_add(ct.timeouts.of(f.state));
            if deadline <= self.now {
                return Some(ct.remove_index(index, self.now));
            }
            ct.wheel.insert(deadline, (index, timer));
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    const EGRESS: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1));
    const LIMITS: JobLimits = JobLimits {
        max_connections: 100,
        max_ports_per_destination: 100,
    };

    fn secs(s: u64) -> Nanos {
        Nanos::from_nanos(s * 1_000_000_000)
    }

    fn ct() -> Conntrack {
        Conntrack::new(ConntrackConfig::new(vec![EGRESS]), secs(0)).unwrap()
    }

    fn key(proto: L4Proto, sport: u16) -> FlowKey {
        FlowKey {
            job: JobKey(7),
            proto,
            src_ip: IpAddr::V4(Ipv4Addr::new(198, 51, 100, 2)),
            src_port: sport,
            dst_ip: IpAddr::V4(Ipv4Addr::new(203, 0, 113, 9)),
            dst_port: 443,
        }
    }

    fn created(o: Open) -> (FlowId, u16) {
        match o {
            Open::Created {
                id, egress_port, ..
            } => (id, egress_port),
            other => panic!("not created: {other:?}"),
        }
    }

    fn reply_key(k: &FlowKey, port: u16) -> ReplyKey {
        ReplyKey {
            proto: k.proto,
            remote_ip: k.dst_ip,
            remote_port: k.dst_port,
            egress_ip: EGRESS,
            egress_port: port,
        }
    }

    #[test]
    fn both_directions_find_the_flow() {
        let mut c = ct();
        let k = key(L4Proto::Tcp, 40000);
        let (id, port) = created(c.open(k, TenantId(1), LIMITS, secs(0)));
        assert_eq!(c.lookup(&k), Some(id));
        assert_eq!(c.lookup_reply(&reply_key(&k, port)), Some(id));
        assert_eq!(c.lookup_reply(&reply_key(&k, port.wrapping_add(1))), None);
        assert_eq!(c.open(k, TenantId(1), LIMITS, secs(0)), Open::Existing(id));
        assert_eq!(c.len(), 1);
    }

    #[test]
    fn ipv6_flows_use_an_ipv6_egress_and_are_found_both_ways() {
        let e6: IpAddr = "2001:db8:e::1".parse().unwrap();
        let mut c = Conntrack::new(ConntrackConfig::new(vec![EGRESS, e6]), secs(0)).unwrap();
        let k = FlowKey {
            job: JobKey(7),
            proto: L4Proto::Udp,
            src_ip: "2001:db8:5::2".parse().unwrap(),
            src_port: 5353,
            dst_ip: "2001:db8:80::9".parse().unwrap(),
            dst_port: 53,
        };
        let Open::Created {
            id,
            egress_ip,
            egress_port,
        } = c.open(k, TenantId(1), LIMITS, secs(0))
        else {
            panic!("refused");
        };
        assert_eq!(egress_ip, e6);
        assert_eq!(c.lookup(&k), Some(id));
        let r = ReplyKey {
            proto: L4Proto::Udp,
            remote_ip: k.dst_ip,
            remote_port: 53,
            egress_ip: e6,
            egress_port,
        };
        assert_eq!(c.lookup_reply(&r), Some(id));
        // The IPv4 egress with the same port is another tuple.
        assert_eq!(
            c.lookup_reply(&ReplyKey {
                egress_ip: EGRESS,
                ..r
            }),
            None
        );
    }

    #[test]
    fn tcp_handshake_and_close_walk_the_states() {
        let mut c = ct();
        let (id, _) = created(c.open(key(L4Proto::Tcp, 1), TenantId(1), LIMITS, secs(0)));
        let o = Direction::Original;
        let r = Direction::Reply;
        assert_eq!(
            c.observe(id, o, TcpFlags::SYN, 60, secs(0)),
            Some(FlowState::TcpSynSent)
        );
        assert_eq!(
            c.observe(id, r, TcpFlags::SYN | TcpFlags::ACK, 60, secs(0)),
            Some(FlowState::TcpEstablished)
        );
        assert_eq!(
            c.observe(id, o, TcpFlags::FIN | TcpFlags::ACK, 60, secs(1)),
            Some(FlowState::TcpClosing)
        );
        assert_eq!(
            c.observe(id, r, TcpFlags::FIN | TcpFlags::ACK, 60, secs(1)),
            Some(FlowState::TcpClosed)
        );
        assert!(
            c.starts_new_connection(id, TcpFlags::SYN),
            "a SYN now is a new connection for the engine to admit, not this flow's"
        );
    }

    #[test]
    fn rst_closes_from_any_state() {
        let mut c = ct();
        let (id, _) = created(c.open(key(L4Proto::Tcp, 1), TenantId(1), LIMITS, secs(0)));
        assert_eq!(
            c.observe(id, Direction::Reply, TcpFlags::RST, 60, secs(0)),
            Some(FlowState::TcpClosed)
        );
    }

    #[test]
    fn unanswered_syn_expires_after_syn_timeout() {
        let mut c = ct();
        let k = key(L4Proto::Tcp, 1);
        created(c.open(k, TenantId(1), LIMITS, secs(0)));
        assert_eq!(c.expire(secs(29)).count(), 0);
        let gone: Vec<_> = c.expire(secs(31)).collect();
        assert_eq!(gone.len(), 1);
        assert_eq!(gone[0].key, k);
        assert_eq!(c.lookup(&k), None);
        assert!(c.is_empty());
    }

    #[test]
    fn activity_keeps_an_established_flow_alive() {
        let mut c = ct();
        let (id, _) = created(c.open(key(L4Proto::Tcp, 1), TenantId(1), LIMITS, secs(0)));
        c.observe(
            id,
            Direction::Reply,
            TcpFlags::SYN | TcpFlags::ACK,
            60,
            secs(1),
        );
        for t in (100..10_000).step_by(100) {
            c.observe(id, Direction::Original, TcpFlags::ACK, 60, secs(t));
            assert_eq!(c.expire(secs(t)).count(), 0);
        }
        assert_eq!(c.expire(secs(9_900 + 3_599)).count(), 0);
        assert_eq!(c.expire(secs(9_900 + 3_601)).count(), 1);
    }

    #[test]
    fn closing_shortens_the_timeout() {
        let mut c = ct();
        let (id, _) = created(c.open(key(L4Proto::Tcp, 1), TenantId(1), LIMITS, secs(0)));
        c.observe(
            id,
            Direction::Reply,
            TcpFlags::SYN | TcpFlags::ACK,
            60,
            secs(0),
        );
        c.observe(id, Direction::Original, TcpFlags::RST, 60, secs(10));
        assert_eq!(c.expire(secs(39)).count(), 0);
        assert_eq!(c.expire(secs(41)).count(), 1);
    }

    #[test]
    fn udp_with_replies_lives_longer() {
        let mut c = ct();
        let (a, _) = created(c.open(key(L4Proto::Udp, 1), TenantId(1), LIMITS, secs(0)));
        let (b, _) = created(c.open(key(L4Proto::Udp, 2), TenantId(1), LIMITS, secs(0)));
        c.observe(b, Direction::Reply, TcpFlags::NONE, 60, secs(0));
        let gone: Vec<_> = c.expire(secs(31)).collect();
        assert_eq!(gone.len(), 1);
        assert_eq!(c.info(a), None);
        assert_eq!(c.info(b).map(|i| i.state), Some(FlowState::UdpReplied));
        assert_eq!(c.expire(secs(121)).count(), 1);
    }

    #[test]
    fn stale_ids_do_not_reach_a_reused_slot() {
        let mut c = ct();
        let (old, _) = created(c.open(key(L4Proto::Icmp, 1), TenantId(1), LIMITS, secs(0)));
        assert!(c.remove(old, secs(1)).is_some());
        let (new, _) = created(c.open(key(L4Proto::Icmp, 2), TenantId(1), LIMITS, secs(1)));
        assert_ne!(old, new);
        assert_eq!(c.info(old), None);
        assert_eq!(
            c.observe(old, Direction::Original, TcpFlags::NONE, 60, secs(2)),
            None
        );
        assert!(c.info(new).is_some());
    }

    #[test]
    fn max_connections_is_exact_per_job() {
        let mut c = ct();
        let lim = JobLimits {
            max_connections: 3,
            max_ports_per_destination: 10,
        };
        let ids: Vec<_> = (0..3)
            .map(|p| created(c.open(key(L4Proto::Tcp, p), TenantId(1), lim, secs(0))).0)
            .collect();
        assert_eq!(
            c.open(key(L4Proto::Tcp, 9), TenantId(1), lim, secs(0)),
            Open::Refused(Reason::ConnectionLimit)
        );
        c.remove(ids[0], secs(0));
        assert_eq!(c.live_flows_of_job(JobKey(7)), 2);
        created(c.open(key(L4Proto::Tcp, 9), TenantId(1), lim, secs(0)));
    }

    #[test]
    fn a_closed_connection_frees_its_max_connections_slot_but_keeps_translating() {
        let mut c = ct();
        let lim = JobLimits {
            max_connections: 2,
            max_ports_per_destination: 10,
        };
        let a = created(c.open(key(L4Proto::Tcp, 1), TenantId(1), lim, secs(0))).0;
        created(c.open(key(L4Proto::Tcp, 2), TenantId(1), lim, secs(0)));
        assert_eq!(
            c.open(key(L4Proto::Tcp, 3), TenantId(1), lim, secs(0)),
            Open::Refused(Reason::ConnectionLimit)
        );
        // FIN both ways: closed, no longer a connection, but still translated.
        c.observe(
            a,
            Direction::Original,
            TcpFlags::FIN | TcpFlags::ACK,
            60,
            secs(1),
        );
        assert_eq!(c.open_connections_of_job(JobKey(7)), 2);
        c.observe(
            a,
            Direction::Reply,
            TcpFlags::FIN | TcpFlags::ACK,
            60,
            secs(1),
        );
        assert_eq!(c.open_connections_of_job(JobKey(7)), 1);
        assert_eq!(
            c.lookup(&key(L4Proto::Tcp, 1)),
            Some(a),
            "late ACKs still translate"
        );
        assert_eq!(
            c.live_flows_of_job(JobKey(7)),
            2,
            "the closed flow keeps its NAT port"
        );
        let b = created(c.open(key(L4Proto::Tcp, 3), TenantId(1), lim, secs(1))).0;
        // Expiry of a closed flow does not count twice.
        c.observe(b, Direction::Original, TcpFlags::RST, 60, secs(2));
        assert_eq!(c.open_connections_of_job(JobKey(7)), 1);
        c.remove(b, secs(3));
        assert_eq!(c.open_connections_of_job(JobKey(7)), 1);
        c.remove(a, secs(3));
        assert_eq!(c.open_connections_of_job(JobKey(7)), 1);
    }

    #[test]
    fn a_syn_on_a_closing_or_closed_tuple_is_a_new_connection_and_never_reopens_the_flow() {
        let mut c = ct();
        let (a, _) = created(c.open(key(L4Proto::Tcp, 1), TenantId(1), LIMITS, secs(0)));
        let syn = TcpFlags::SYN;
        assert!(!c.starts_new_connection(a, syn), "a retransmitted SYN");
        c.observe(a, Direction::Reply, syn | TcpFlags::ACK, 60, secs(0));
        assert!(
            !c.starts_new_connection(a, syn),
            "established: a retransmission (the SYN+ACK was lost after the proxy)"
        );
        assert!(!c.starts_new_connection(a, syn | TcpFlags::ACK));
        c.observe(a, Direction::Original, TcpFlags::FIN, 60, secs(1));
        assert!(c.starts_new_connection(a, syn), "closing");
        c.observe(a, Direction::Reply, TcpFlags::FIN, 60, secs(1));
        assert!(c.starts_new_connection(a, syn), "closed");
        assert_eq!(
            c.observe(a, Direction::Original, syn, 60, secs(2)),
            Some(FlowState::TcpClosed),
            "a closed flow stays closed whatever arrives"
        );
        let (u, _) = created(c.open(key(L4Proto::Udp, 2), TenantId(1), LIMITS, secs(0)));
        assert!(!c.starts_new_connection(u, syn));
        c.remove(a, secs(3));
        assert!(!c.starts_new_connection(a, syn), "a stale id");
    }

    #[test]
    fn a_new_connection_on_a_closed_tuple_keeps_the_egress_port_and_a_new_tuple_does_not() {
        let mut c = ct();
        let k = key(L4Proto::Tcp, 40000);
        let (a, port) = created(c.open(k, TenantId(1), LIMITS, secs(0)));
        c.observe(a, Direction::Reply, TcpFlags::FIN, 60, secs(1));
        c.observe(a, Direction::Original, TcpFlags::FIN, 60, secs(1));
        assert!(c.starts_new_connection(a, TcpFlags::SYN));
        // What the engine does with such a SYN: the old flow ends, the SYN opens a new one.
        c.remove(a, secs(2));
        let (b, again) = created(c.open(k, TenantId(1), LIMITS, secs(2)));
        assert_ne!(a, b);
        assert_eq!(
            again, port,
            "the remote sees the tuple it would see without NAT"
        );
        assert_eq!(c.nat().quarantined(), 0);
        let (_, fresh) = created(c.open(key(L4Proto::Tcp, 40001), TenantId(1), LIMITS, secs(2)));
        assert_ne!(fresh, port);
    }

    #[test]
    fn remove_job_ends_only_that_jobs_flows() {
        let mut c = ct();
        for p in 0..5 {
            created(c.open(key(L4Proto::Udp, p), TenantId(1), LIMITS, secs(0)));
        }
        let other = FlowKey {
            job: JobKey(8),
            ..key(L4Proto::Udp, 0)
        };
        let (kept, _) = created(c.open(other, TenantId(1), LIMITS, secs(0)));
        let gone = c.remove_job(JobKey(7), secs(1));
        assert_eq!(gone.len(), 5);
        assert!(gone.iter().all(|f| f.key.job == JobKey(7)));
        assert_eq!(c.live_flows_of_job(JobKey(7)), 0);
        let live: Vec<_> = c.iter().map(|(id, _)| id).collect();
        assert_eq!(live, vec![kept]);
        assert_eq!(c.nat().job_usage(JobKey(7)).held, 5);
    }

    #[test]
    fn packets_and_bytes_are_counted_each_way_and_reported_at_the_end() {
        let mut c = ct();
        let (id, _) = created(c.open(key(L4Proto::Tcp, 1), TenantId(1), LIMITS, secs(5)));
        c.observe(id, Direction::Original, TcpFlags::SYN, 60, secs(5));
        c.observe(
            id,
            Direction::Reply,
            TcpFlags::SYN | TcpFlags::ACK,
            60,
            secs(6),
        );
        for t in 7..17 {
            c.observe(id, Direction::Original, TcpFlags::ACK, 1500, secs(t));
            c.observe(id, Direction::Reply, TcpFlags::ACK, 52, secs(t));
        }
        let live = c.info(id).unwrap();
        assert_eq!(live.created, secs(5));
        assert_eq!(
            live.counters,
            FlowCounters {
                packets_out: 11,
                packets_in: 11,
                bytes_out: 60 + 15_000,
                bytes_in: 60 + 520,
            }
        );
        let gone = c.remove(id, secs(20)).unwrap();
        assert_eq!(gone.counters, live.counters);
        assert_eq!(
            gone.duration(),
            Duration::from_secs(11),
            "first to last packet"
        );
    }

    #[test]
    fn a_jobs_tenant_is_fixed_by_its_first_flow() {
        let mut c = ct();
        created(c.open(key(L4Proto::Udp, 1), TenantId(1), LIMITS, secs(0)));
        created(c.open(key(L4Proto::Udp, 2), TenantId(2), LIMITS, secs(0)));
        assert!(c.iter().all(|(_, f)| f.tenant == TenantId(1)));
        assert_eq!(c.nat().tenant_usage(TenantId(1)).live, 2);
        assert_eq!(c.nat().tenant_usage(TenantId(2)).live, 0);
        let ids: Vec<_> = c.iter().map(|(id, _)| id).collect();
        for id in ids {
            c.remove(id, secs(1));
        }
        assert_eq!(
            c.nat().tenant_usage(TenantId(1)).live,
            0,
            "released to the same tenant"
        );
    }

    #[test]
    fn table_cap_refuses_new_flows() {
        let mut cfg = ConntrackConfig::new(vec![EGRESS]);
        cfg.max_flows = 2;
        let mut c = Conntrack::new(cfg, secs(0)).unwrap();
        created(c.open(key(L4Proto::Udp, 1), TenantId(1), LIMITS, secs(0)));
        created(c.open(key(L4Proto::Udp, 2), TenantId(1), LIMITS, secs(0)));
        assert_eq!(
            c.open(key(L4Proto::Udp, 3), TenantId(1), LIMITS, secs(0)),
            Open::Refused(Reason::PortsExhausted)
        );
    }

    #[test]
    fn zero_timeout_is_rejected() {
        let mut cfg = ConntrackConfig::new(vec![EGRESS]);
        cfg.timeouts.icmp = Duration::ZERO;
        assert_eq!(
            Conntrack::new(cfg, secs(0)).unwrap_err(),
            ConntrackError::ZeroTimeout(FlowState::Icmp)
        );
    }

    #[test]
    fn memory_report_counts_the_tables() {
        let mut c = ct();
        let lim = JobLimits {
            max_connections: 1000,
            max_ports_per_destination: 1000,
        };
        for p in 0..1000 {
            created(c.open(key(L4Proto::Udp, p), TenantId(1), lim, secs(0)));
        }
        let m = c.memory();
        assert_eq!(m.flows, 1000);
        assert!(m.slab >= 1000 * Conntrack::FLOW_ENTRY_BYTES);
        assert!(m.forward_table >= 1000 * 5);
        assert!(m.bytes_per_flow() > Conntrack::FLOW_ENTRY_BYTES);
    }
}
