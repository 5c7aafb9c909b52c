//! Tier-2 enforcement: what the proxy does with each packet, as a pure function of the packet,
//! the job's verified policy, the DNS bindings and the injected time.
//!
//! # What it owns
//! - The per-packet pipeline in both directions:
//!   - from a node ([`Tier2::from_node`]): trusted source → GENEVE receive rules → the job's
//!     verified policy (tenant, `node`, expiry, serial) → established flow? NAT and pace :
//!     new-flow checks in the order of the architecture (destination not infrastructure —
//!     before any rule is consulted → destination bound to an allowed name or inside an allowed
//!     CIDR → port/protocol → never an always-denied range → exact `max_connections` →
//!     `new_connections_per_sec` → SNAT) → NAT and pace;
//!   - from the internet ([`Tier2::from_internet`]): reverse NAT → pace (ingress limit) →
//!     GENEVE header toward the job's node.
//! - Refusals: a denied or refused new flow gets a TCP RST or an ICMP unreachable, already
//!   behind a GENEVE header for the node, so the sandboxed app fails at once.
//! - First packets of a job whose policy is not cached yet: held ([`crate::hold`]) while the
//!   caller fetches it, then handed back ([`Tier2::take_released`]) to be processed in order.
//! - Packets whose option carries a newer serial than the cached policy (a live update the
//!   proxy has not fetched yet): held the same way while the caller refetches, so that the
//!   first SYN to a destination only the new policy allows is decided under the new policy.
//!   When the refetch ends ([`Tier2::policy_ready`]) or is not started
//!   ([`Tier2::refetch_declined`]) they are handed back and decided under whatever is cached
//!   then (a failed refetch keeps the old policy); later packets announcing the same serial
//!   are then decided at once under the cached policy instead of being held again.
//! - The end of a job: at its policy's `exp` every packet is refused (RST for any TCP segment,
//!   RFC 793 reset generation; ICMP unreachable otherwise) and its flows, SNAT ports, pacing
//!   and rate state are freed ([`Tier2::end_job`], carried out by the next [`Tier2::tick`] in
//!   one pass over the flow table for all jobs ending then; [`Tier2::remove_job`] at once);
//!   the same when its node says it ended.
//! - Audit events: every new-flow decision and the end of every flow (packets and bytes each
//!   way, duration), within a per-job budget ([`crate::budget::AuditBudget`]); per-reason drop
//!   counters.
//!
//! # Invariants
//! - Every packet ends in exactly one [`Verdict`]; a drop is a verdict with a [`Reason`] and is
//!   counted, never an error.
//! - No packet reaches the internet for a job without a policy that verified, is unexpired, names
//!   the tenant in the option and (if pinned) the sending node.
//! - No flow is ever opened to an infrastructure address ([`InfraSet`]: the configured set plus
//!   this proxy's underlay address, its nodes and its egress addresses), whatever the policy.
//! - A flow is created only from an initial packet (TCP SYN without ACK, or any UDP / ICMP echo).
//! - No allocation per established-flow packet; buffers belong to the caller.
//! - A job's packets leave in the order they arrived, held ones included: while packets of a
//!   job are held, later ones join them.
//! - Expired jobs lose their flows at the tick after their first refused packet, and within a
//!   second of `exp` without traffic ([`Tier2::tick`] checks once per second); their packets
//!   from nodes are refused from `exp` on.
//!
//! # Limits
//! - Names are learnt only through [`Bindings`] (filled by the proxy's resolver); an address no
//!   answer bound is decided by the CIDR rules alone (`0.0.0.0` rules allow names, never raw
//!   addresses).
//! - ICMP echo is not a policy protocol: new ICMP flows are dropped (`port_denied`).
//! - ICMP/ICMPv6 errors from the internet are translated back to the job only when they quote
//!   a packet of a live flow, at most [`ICMP_ERRORS_PER_SEC`] per job
//!   ([`Tier2::from_internet`]); the rest are dropped and counted.
//! - Replies from the internet to an expired job's flows still pass until the next once-a-second
//!   check removes the flows.

use snas_wire::{JobKey, PolicySerial, TenantId};
use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr};
use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;

use ipnet::IpNet;
use snas_policy::jws::VerifiedPolicy;
use snas_policy::limits::Limits;
use snas_policy::matcher::{Decision, DenyReason, Matcher};
use snas_policy::rules::Transport;
use snas_wire::build::{icmp_unreachable_into, tcp_rst_into, Unreachable};
use snas_wire::geneve::{parse_payload, write_geneve_header, InnerProto, SnasOption};
use snas_wire::{Endpoint, FiveTuple, IpPacket, L4Proto, NatPacket, Reason};

use crate::bindings::Bindings;
use crate::budget::AuditBudget;
use crate::clock::Nanos;
use crate::conntrack::{
    Conntrack, ConntrackConfig, ConntrackError, Direction, FlowCounters, FlowId, FlowInfo, FlowKey,
    FlowState, Open, ReplyKey, TcpFlags,
};
use crate::drops::DropTally;
use crate::hold::{HeldPacket, HoldConfig, HoldConfigError, HoldQueue};
use crate::infra::{self, InfraSet};
use crate::names::{NameCheckConfig, NameChecks, NamePolicy};
use crate::nat::JobLimits;
use crate::offload::{self, FastFlow, FastRates, OffloadEvent, Offloads};
use crate::pacer::{PaceRate, Pacer, PacerConfig, PacerError, PacingKey, PacingRates, Stamp};
use crate::pmtu::PathMtus;
use crate::resets::{Closings, Control, Intercept, JobPath, ResetStats};
use crate::token_bucket::{JobBuckets, TokenBucketError};

/// Length of the GENEVE header with the SNAS option (the UDP payload prefix).
pub const GENEVE_HEADER_LEN: usize = 28;

/// A job's verified policy in the form the proxy consults per new flow.
#[derive(Debug)]
pub struct JobPolicy {
    /// Job key (from the policy id).
    pub job_key: JobKey,
    /// Tenant id (overlay option).
    pub tenant_id: TenantId,
    /// Tenant name (audit).
    pub tenant: Arc<str>,
    /// Job name (audit).
    pub job: Arc<str>,
    /// Policy serial.
    pub serial: PolicySerial,
    /// The node the job is pinned to, if any.
    pub node: Option<IpAddr>,
    /// Expiry, Unix seconds.
    pub expires_at_unix: u64,
    /// Limits.
    pub limits: Limits,
    /// Compiled rules.
    pub matcher: Matcher,
    /// The node whose agent served the policy (set by the fetcher; `None` for policies built
    /// otherwise).
    pub fetched_from: Option<Ipv4Addr>,
    /// The name checks of the rules (names on the wire, [`crate::names`]).
    pub names: NamePolicy,
}

impl JobPolicy {
    /// Compiles a verified policy; `infrastructure` prefixes are denied by the matcher whatever
    /// the rules say (tier 2 also refuses them before consulting the matcher at all).
    pub fn from_verified(v: &VerifiedPolicy, infrastructure: &[IpNet]) -> JobPolicy {
        let c = v.claims();
        JobPolicy {
            job_key: v.job_key(),
            tenant_id: v.tenant_id(),
            tenant: Arc::from(c.tenant.as_str()),
            job: Arc::from(c.job.as_str()),
            serial: c.serial,
            node: c.node,
            expires_at_unix: c.exp,
            limits: c.limits,
            matcher: snas_policy::matcher::compile_with(c, infrastructure),
            fetched_from: None,
            names: NamePolicy::new(&c.egress),
        }
    }
}

/// Answer of a [`PolicyCache`].
#[derive(Debug)]
pub enum PolicyLookup<'a> {
    /// Verified and usable.
    Ready(&'a JobPolicy),
    /// Not known yet: the caller fetches it from the sending node's agent.
    Missing,
    /// Known bad (negative cache): fetch failed verification, expired, ...
    Rejected(Reason),
}

/// Where tier 2 gets verified policies. The fetching and verifying implementation lives in the
/// proxy's I/O layer; tests use [`StaticPolicies`].
pub trait PolicyCache {
    /// The policy of `job_key`.
    fn lookup(&self, job_key: JobKey) -> PolicyLookup<'_>;
}

/// A fixed map of policies (tests, benchmarks, and the base of the real cache).
#[derive(Debug, Default)]
pub struct StaticPolicies {
    ready: HashMap<JobKey, JobPolicy>,
    rejected: HashMap<JobKey, Reason>,
}

impl StaticPolicies {
    /// Adds a verified policy.
    pub fn insert(&mut self, p: JobPolicy) {
        self.rejected.remove(&p.job_key);
        self.ready.insert(p.job_key, p);
    }
    /// Marks a job key as rejected.
    pub fn reject(&mut self, job_key: JobKey, reason: Reason) {
        self.ready.remove(&job_key);
        self.rejected.insert(job_key, reason);
    }
}

impl PolicyCache for StaticPolicies {
    fn lookup(&self, job_key: JobKey) -> PolicyLookup<'_> {
        if let Some(p) = self.ready.get(&job_key) {
            return PolicyLookup::Ready(p);
        }
        match self.rejected.get(&job_key) {
            Some(r) => PolicyLookup::Rejected(*r),
            None => PolicyLookup::Missing,
        }
    }
}

/// The time of one batch of packets: monotonic for timers, wall clock for policy expiry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Now {
    /// Monotonic time.
    pub mono: Nanos,
    /// Unix seconds.
    pub unix_secs: u64,
}

/// What to do with a packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Write `buf[range]` (the NATed inner packet) to the internet side at `depart`.
    ToInternet {
        /// The packet within the caller's buffer.
        range: Range<usize>,
        /// Departure time (EDT).
        depart: Nanos,
        /// The job it belongs to (the caller bounds what a job may queue).
        job: JobKey,
        /// The path MTU the internet reported for the destination ([`crate::pmtu`]), if any: a
        /// TCP super-packet must leave in segments no longer than this (the daemon takes the
        /// smaller of it and its TUN MTU).
        path_mtu: Option<u16>,
    },
    /// Send `buf[range]` (GENEVE header + inner packet) as a UDP payload to `node`:6081 at
    /// `depart`.
    ToNode {
        /// The node's underlay address.
        node: Ipv4Addr,
        /// The UDP payload within the caller's buffer.
        range: Range<usize>,
        /// Departure time (EDT).
        depart: Nanos,
        /// The job it belongs to (the caller bounds what a job may queue).
        job: JobKey,
    },
    /// Refused: send `reply[..reply_len]` (GENEVE header + RST or ICMP) to `node` now.
    Refuse {
        /// Why.
        reason: Reason,
        /// Where the refusal goes.
        node: Ipv4Addr,
        /// Bytes written into the caller's refusal buffer.
        reply_len: usize,
    },
    /// Dropped and counted.
    Drop(Reason),
    /// The packet was copied into the hold queue. With `fetch`, the job's policy is not cached:
    /// make sure a fetch of `job_key` from `node`'s agent is under way, and call
    /// [`Tier2::policy_ready`] or [`Tier2::policy_failed`] when it ends. Without, the policy is
    /// there and the packet waits behind the job's earlier held packets
    /// ([`Tier2::has_released`] is true).
    Held {
        /// The job key.
        job_key: JobKey,
        /// The node that sent it.
        node: Ipv4Addr,
        /// Whether a fetch is needed.
        fetch: bool,
    },
}

/// What happened to a new flow (audit).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Allowed and NATed.
    Allow,
    /// Denied by policy.
    Deny,
    /// Allowed by policy but refused by a limit.
    Refuse,
    /// Audit mode: no rule allows it (`reason` says why it would be denied), let through and
    /// NATed.
    WouldDeny,
}

impl Action {
    /// Stable lower-case name.
    pub fn name(self) -> &'static str {
        match self {
            Action::Allow => "allow",
            Action::Deny => "deny",
            Action::Refuse => "refuse",
            Action::WouldDeny => "would_deny",
        }
    }
}

/// One new-flow decision, for the audit log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditRecord {
    /// Wall clock, Unix seconds.
    pub unix_secs: u64,
    /// Outcome.
    pub action: Action,
    /// Reason for deny/refuse.
    pub reason: Option<Reason>,
    /// Tenant name.
    pub tenant: Arc<str>,
    /// Job name.
    pub job: Arc<str>,
    /// Job key.
    pub job_key: JobKey,
    /// Protocol.
    pub proto: L4Proto,
    /// Sandbox address and port.
    pub src: (IpAddr, u16),
    /// Destination address and port.
    pub dst: (IpAddr, u16),
    /// The name the destination was bound from, if any.
    pub hostname: Option<Arc<str>>,
    /// Index of the rule that allowed it (or that matched the name on a port deny); for
    /// reason `deny_rule`, the index of the deny rule.
    pub rule: Option<usize>,
    /// The NAT tuple, when allowed.
    pub egress: Option<(IpAddr, u16)>,
    /// Size of the inner packet the decision was made on.
    pub bytes: u64,
    /// Audit lines of this job left out (over its budget) since its previous line.
    pub suppressed: u64,
}

/// Why a flow ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlowEnd {
    /// Idle past its timeout.
    Idle,
    /// TCP closed (FIN both ways or RST) and its closed timeout passed.
    Closed,
    /// Its job's policy expired.
    PolicyExpired,
    /// Its job's node said the job ended.
    JobEnded,
    /// Its job's policy is no longer held (evicted long after expiry, or removed).
    PolicyGone,
    /// A live update of its job's policy no longer allows its destination.
    PolicyUpdated,
    /// A revocation covers its job's policy.
    Revoked,
    /// The key that signed its job's policy was removed from the trust bundle.
    KeyUntrusted,
    /// The job opened a new connection on its 5-tuple (a SYN after a FIN or RST):
    /// that connection is a new flow, admitted and name-checked like any other.
    Reused,
}

impl FlowEnd {
    /// Stable lower-case name (audit `end`).
    pub fn name(self) -> &'static str {
        match self {
            FlowEnd::Idle => "idle",
            FlowEnd::Closed => "closed",
            FlowEnd::PolicyExpired => "policy_expired",
            FlowEnd::JobEnded => "job_ended",
            FlowEnd::PolicyGone => "policy_gone",
            FlowEnd::PolicyUpdated => "policy_updated",
            FlowEnd::Revoked => "revoked",
            FlowEnd::KeyUntrusted => "key_untrusted",
            FlowEnd::Reused => "reused",
        }
    }
}

/// The end of a flow, for the audit log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlowEndRecord {
    /// Wall clock, Unix seconds.
    pub unix_secs: u64,
    /// Why it ended.
    pub end: FlowEnd,
    /// Tenant name (empty if the engine never saw the job admit a flow).
    pub tenant: Arc<str>,
    /// Job name (likewise).
    pub job: Arc<str>,
    /// Job key.
    pub job_key: JobKey,
    /// Protocol.
    pub proto: L4Proto,
    /// Sandbox address and port.
    pub src: (IpAddr, u16),
    /// Destination address and port.
    pub dst: (IpAddr, u16),
    /// The NAT tuple.
    pub egress: (IpAddr, u16),
    /// A name the destination was bound from, if still bound.
    pub hostname: Option<Arc<str>>,
    /// Packets and bytes each way.
    pub counters: FlowCounters,
    /// First to last packet.
    pub duration: Duration,
    /// Audit lines of this job left out since its previous line.
    pub suppressed: u64,
}

/// A job its node said ended, for the audit log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobEndRecord {
    /// Wall clock, Unix seconds.
    pub unix_secs: u64,
    /// Tenant name (empty when unknown).
    pub tenant: Arc<str>,
    /// Job name (empty when unknown).
    pub job: Arc<str>,
    /// Job key.
    pub job_key: JobKey,
    /// Flows removed.
    pub flows: u64,
}

/// An audit event of the engine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuditEvent {
    /// A new-flow decision (or a refusal of an expired job's packet).
    Decision(AuditRecord),
    /// The end of a flow.
    FlowEnd(FlowEndRecord),
    /// A job its node ended (never suppressed).
    JobEnded(JobEndRecord),
    /// The name on the wire of a flow did not pass its check ([`crate::names`]).
    NameMismatch(NameMismatchRecord),
}

/// A flow cut off because the name on the wire did not pass, for the audit log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NameMismatchRecord {
    /// Wall clock, Unix seconds.
    pub unix_secs: u64,
    /// `sni_mismatch` or `host_mismatch`.
    pub reason: Reason,
    /// Tenant name.
    pub tenant: Arc<str>,
    /// Job name.
    pub job: Arc<str>,
    /// Job key.
    pub job_key: JobKey,
    /// Protocol.
    pub proto: L4Proto,
    /// Sandbox address and port.
    pub src: (IpAddr, u16),
    /// Destination address and port.
    pub dst: (IpAddr, u16),
    /// The name on the wire (or `(none)`, `(malformed: …)`).
    pub wire_name: Arc<str>,
    /// The names the job's DNS bound to the destination address.
    pub bound: Vec<Arc<str>>,
    /// The rule that allowed the flow.
    pub rule: Option<usize>,
    /// Audit lines of this job left out since its previous line.
    pub suppressed: u64,
}

impl AuditEvent {
    /// The job key.
    pub fn job_key(&self) -> JobKey {
        match self {
            AuditEvent::Decision(r) => r.job_key,
            AuditEvent::FlowEnd(r) => r.job_key,
            AuditEvent::JobEnded(r) => r.job_key,
            AuditEvent::NameMismatch(r) => r.job_key,
        }
    }

    fn set_suppressed(&mut self, n: u64) {
        match self {
            AuditEvent::Decision(r) => r.suppressed = n,
            AuditEvent::FlowEnd(r) => r.suppressed = n,
            AuditEvent::NameMismatch(r) => r.suppressed = n,
            AuditEvent::JobEnded(_) => {}
        }
    }
}

/// Tier-2 configuration.
#[derive(Debug, Clone)]
pub struct Tier2Config {
    /// This proxy's underlay address (outer source toward nodes).
    pub proxy_addr: Ipv4Addr,
    /// Node addresses GENEVE is accepted from.
    pub nodes: Vec<Ipv4Addr>,
    /// Conntrack and NAT.
    pub conntrack: ConntrackConfig,
    /// Pacer (both directions).
    pub pacer: PacerConfig,
    /// Per-tenant bandwidth caps (egress, ingress); tenants not listed get `default_tenant_cap`.
    pub tenant_caps: HashMap<TenantId, (PaceRate, PaceRate)>,
    /// Cap of a tenant not in `tenant_caps` (default 10 Gbit/s each way).
    pub default_tenant_cap: (PaceRate, PaceRate),
    /// Per-job state (rate bucket, route) of a job with no flows is forgotten after this.
    pub job_idle: Duration,
    /// Infrastructure prefixes no new flow may reach (the engine adds `proxy_addr`, `nodes`
    /// and the egress addresses itself).
    pub infrastructure: Vec<IpNet>,
    /// Bounds of the queue of first packets held while a policy is fetched.
    pub hold: HoldConfig,
    /// Audit lines one job may produce per second (burst twice that; default 200).
    pub audit_lines_per_sec: u32,
    /// The MTU TCP super-packets are charged at by the pacers (the internet side's, 1500 by
    /// default): a super-packet costs its length plus the headers its segments repeat
    /// ([`crate::gso::wire_len`]).
    pub segment_mtu: usize,
    /// Bounds of the name check of first payloads ([`crate::names`]).
    pub names: NameCheckConfig,
}

impl Tier2Config {
    /// Defaults around a proxy address, its nodes and its egress pool.
    pub fn new(proxy_addr: Ipv4Addr, nodes: Vec<Ipv4Addr>, egress_ips: Vec<IpAddr>) -> Self {
        Tier2Config {
            proxy_addr,
            nodes,
            conntrack: ConntrackConfig::new(egress_ips),
            pacer: PacerConfig::default(),
            tenant_caps: HashMap::new(),
            default_tenant_cap: (PaceRate::gbit(10), PaceRate::gbit(10)),
            job_idle: Duration::from_secs(600),
            infrastructure: infra::METADATA.to_vec(),
            hold: HoldConfig::default(),
            audit_lines_per_sec: 200,
            segment_mtu: 1500,
            names: NameCheckConfig::default(),
        }
    }
}

/// Invalid tier-2 configuration.
#[derive(Debug, thiserror::Error)]
pub enum Tier2Error {
    /// conntrack/NAT configuration
    #[error("conntrack: {0}")]
    Conntrack(#[from] ConntrackError),
    /// pacer configuration
    #[error("pacer: {0}")]
    Pacer(#[from] PacerError),
    /// hold queue bounds
    #[error("hold queue: {0}")]
    Hold(#[from] HoldConfigError),
    /// audit budget (`audit_lines_per_sec` must be at least 1)
    #[error("audit budget: {0}")]
    Audit(#[from] TokenBucketError),
}

/// Where a job's replies go and what it may use; learnt from its traffic.
#[derive(Debug)]
struct JobState {
    node: Ipv4Addr,
    option: SnasOption,
    inner_v6: bool,
    ingress_bps: snas_wire::Bps,
    last_active: Nanos,
    tenant: Arc<str>,
    job: Arc<str>,
}

/// ICMP errors from the internet translated per job and second (burst the same): enough for
/// path-MTU discovery and unreachables of many flows, while a flood of errors quoting one of a
/// job's flows cannot take more of its ingress than this.
pub const ICMP_ERRORS_PER_SEC: u64 = 100;

/// How often [`Tier2::tick`] checks jobs for expiry and evicts idle per-job state.
pub const JOB_SCAN: Duration = Duration::from_secs(1);

/// The tier-2 engine of one worker. See the module documentation.
#[derive(Debug)]
pub struct Tier2 {
    cfg: Tier2Config,
    /// Trusted node addresses, sorted (binary search: cheaper per packet than hashing).
    nodes: Vec<Ipv4Addr>,
    conntrack: Conntrack,
    egress_pacer: Pacer,
    ingress_pacer: Pacer,
    bindings: Bindings,
    jobs: HashMap<JobKey, JobState>,
    buckets: JobBuckets,
    drops: DropTally,
    audit: Vec<AuditEvent>,
    audit_budget: AuditBudget,
    refetch: Vec<(JobKey, Ipv4Addr)>,
    /// Jobs whose packets are held until the refetch of the newer serial in their option ends.
    serial_wait: HashMap<JobKey, PolicySerial>,
    /// Per job, the highest serial a finished (or declined) refetch did not bring: packets
    /// announcing it or less are decided under the cached policy without being held again.
    serial_stale: HashMap<JobKey, PolicySerial>,
    draining: bool,
    infra: InfraSet,
    hold: HoldQueue,
    last_scan: Option<Nanos>,
    pending_ends: Vec<PendingEnd>,
    /// Departures of the segments of the last super-packet from the internet
    /// ([`Tier2::from_internet_segmented`]); `None`: that segment is beyond the horizon.
    segment_departs: Vec<Option<Nanos>>,
    /// The segment lengths behind `segment_departs` (reused).
    segment_lens: Vec<u32>,
    /// Flows under the name check ([`crate::names`]): first payload awaited or held, held
    /// packets on their way out, or rejected.
    names: NameChecks,
    /// Flows handed to the in-kernel fast path ([`Tier2::drain_offload_events`]).
    offload: Offloads,
    /// TCP flows the proxy ended on its own, being reset both ways ([`crate::resets`]).
    resets: Closings,
    /// Per-job budget of ICMP errors from the internet ([`ICMP_ERRORS_PER_SEC`]).
    icmp_errors: JobBuckets,
    /// Path MTUs reported by "fragmentation needed" / "packet too big" for flows of jobs.
    path_mtus: PathMtus,
}

/// A job whose end [`Tier2::apply_ends`] will carry out.
#[derive(Debug)]
struct PendingEnd {
    job: JobKey,
    end: FlowEnd,
    names: Option<(Arc<str>, Arc<str>)>,
}

fn transport_of(p: L4Proto) -> Option<Transport> {
    match p {
        L4Proto::Tcp => Some(Transport::Tcp),
        L4Proto::Udp => Some(Transport::Udp),
        L4Proto::Icmp | L4Proto::Icmpv6 => None,
    }
}

/// TCP flags of a packet [`NatPacket`] validated (0 for UDP/ICMP): the flags byte sits 13 bytes
/// into the TCP header, after a 40-byte IPv6 header or an IHL-sized IPv4 header.
fn tcp_flags(packet: &[u8], t: &FiveTuple) -> TcpFlags {
    if t.proto != L4Proto::Tcp {
        return TcpFlags::NONE;
    }
    let l3 = match packet.first() {
        Some(b) if b >> 4 == 4 => usize::from(b & 0x0f) * 4,
        Some(_) => 40,
        None => return TcpFlags::NONE,
    };
    packet.get(l3 + 13).map_or(TcpFlags::NONE, |f| TcpFlags(*f))
}

/// The conntrack port of the remote end: conntrack keys ICMP echo with destination port 0.
fn remote_port(t: &FiveTuple, port: u16) -> u16 {
    match t.proto {
        L4Proto::Icmp | L4Proto::Icmpv6 => 0,
        _ => port,
    }
}

impl Tier2 {
    /// A new engine.
    pub fn new(cfg: Tier2Config, now: Nanos) -> Result<Tier2, Tier2Error> {
        let mut infra_nets = cfg.infrastructure.clone();
        infra_nets.push(infra::host(IpAddr::V4(cfg.proxy_addr)));
        infra_nets.extend(cfg.nodes.iter().map(|n| infra::host(IpAddr::V4(*n))));
        infra_nets.extend(
            cfg.conntrack
                .nat
                .egress_ips
                .iter()
                .map(|ip| infra::host(*ip)),
        );
        Ok(Tier2 {
            infra: InfraSet::new(&infra_nets),
            nodes: {
                let mut n = cfg.nodes.clone();
                n.sort_unstable();
                n.dedup();
                n
            },
            conntrack: Conntrack::new(cfg.conntrack.clone(), now)?,
            egress_pacer: Pacer::new(cfg.pacer)?,
            ingress_pacer: Pacer::new(cfg.pacer)?,
            segment_departs: Vec::new(),
            segment_lens: Vec::new(),
            offload: Offloads::default(),
            bindings: Bindings::default(),
            jobs: HashMap::new(),
            buckets: JobBuckets::new(),
            drops: DropTally::default(),
            audit: Vec::new(),
            audit_budget: AuditBudget::new(cfg.audit_lines_per_sec)?,
            refetch: Vec::new(),
            serial_wait: HashMap::new(),
            serial_stale: HashMap::new(),
            draining: false,
            hold: HoldQueue::new(cfg.hold)?,
            last_scan: None,
            pending_ends: Vec::new(),
            names: NameChecks::new(cfg.names),
            resets: Closings::default(),
            icmp_errors: JobBuckets::new(),
            path_mtus: PathMtus::new(),
            cfg,
        })
    }

    /// The DNS bindings (the resolver fills them).
    pub fn bindings_mut(&mut self) -> &mut Bindings {
        &mut self.bindings
    }

    /// Conntrack (read-only: metrics, `snas flows`).
    pub fn conntrack(&self) -> &Conntrack {
        &self.conntrack
    }

    /// Stops admitting new flows; established flows continue.
    pub fn set_draining(&mut self, draining: bool) {
        self.draining = draining;
    }

    /// Whether draining.
    pub fn is_draining(&self) -> bool {
        self.draining
    }

    /// The infrastructure set new flows are checked against (the configured prefixes plus the
    /// engine's own addresses).
    pub fn infrastructure(&self) -> &InfraSet {
        &self.infra
    }

    /// Drops so far by reason code, all tenants together.
    pub fn drops(&self) -> [u64; Reason::COUNT] {
        self.drops.by_reason()
    }

    /// Drops so far by tenant and reason (see [`crate::drops`]).
    pub fn drop_tally(&self) -> &DropTally {
        &self.drops
    }

    /// Counts a drop the caller decided (e.g. a full pacing queue), not tied to a verified
    /// tenant (`tenant="unknown"`).
    pub fn count_drop(&mut self, r: Reason) {
        self.drops.unknown(r, 1);
    }

    /// Counts a drop the caller decided for a packet whose (unverified) overlay option names
    /// `tenant`: charged to the tenant only if it already has a series of verified drops
    /// ([`DropTally::claimed`]), so the label set stays bounded.
    pub fn count_drop_claimed(&mut self, tenant: Option<TenantId>, r: Reason) {
        self.drops.claimed(tenant, r, 1);
    }

    /// Takes the audit events produced since the last call.
    pub fn drain_audit(&mut self) -> std::vec::Drain<'_, AuditEvent> {
        self.audit.drain(..)
    }

    /// Audit lines suppressed so far (over their job's budget).
    pub fn audit_suppressed(&self) -> u64 {
        self.audit_budget.suppressed_total()
    }

    /// Takes the jobs whose option carried a newer serial than the cached policy (refetch).
    pub fn drain_refetch(&mut self) -> std::vec::Drain<'_, (JobKey, Ipv4Addr)> {
        self.refetch.drain(..)
    }

    /// Packets and bytes in the hold queue.
    pub fn held(&self) -> (u32, u64) {
        (self.hold.packets(), self.hold.bytes())
    }

    /// The policy of `job` is now in the cache: its held packets may be taken with
    /// [`Tier2::take_released`].
    /// Also ends a wait for a refetch of a newer serial (whatever the refetch brought: its
    /// packets are decided under the policy cached then).
    pub fn policy_ready(&mut self, job: JobKey) {
        self.serial_wait.remove(&job);
        self.hold.mark_ready(job);
    }

    /// The refetch the engine asked for with [`Tier2::drain_refetch`] was not started (rate
    /// limited, queue full): the packets held for it are released to be decided under the
    /// cached policy, and the job's later packets with that serial are not held.
    pub fn refetch_declined(&mut self, job: JobKey) {
        if let Some(serial) = self.serial_wait.remove(&job) {
            self.mark_stale(job, serial);
            self.hold.mark_ready(job);
        }
    }

    /// Jobs whose packets wait for the refetch of a newer serial.
    pub fn refetch_waits(&self) -> usize {
        self.serial_wait.len()
    }

    fn mark_stale(&mut self, job: JobKey, serial: PolicySerial) {
        let e = self.serial_stale.entry(job).or_insert(serial);
        *e = (*e).max(serial);
    }

    /// Fetching `job`'s policy failed with `reason`: its held packets are dropped and counted
    /// under `reason`. Returns how many.
    pub fn policy_failed(&mut self, job: JobKey, reason: Reason) -> u32 {
        self.serial_wait.remove(&job);
        let n = self.hold.drop_job(job);
        self.drops.unknown(reason, u64::from(n));
        n
    }

    /// Whether held packets are ready to be taken.
    pub fn has_released(&self) -> bool {
        self.hold.any_ready() || self.names.has_released()
    }

    /// Moves up to `limit` held packets whose policy arrived into `out`, in the order they were
    /// received; the caller runs each through [`Tier2::from_node`] again.
    pub fn take_released(&mut self, out: &mut Vec<HeldPacket>, limit: usize) -> usize {
        // Packets released by the name check first: later packets of their flows queue
        // behind them, and they are older than anything the policy hold releases now.
        let n = self.names.take_released(out, limit);
        n + self.hold.take_ready(out, limit - n)
    }

    /// The node `job`'s traffic comes from, if the engine has seen it admit a flow recently.
    pub fn job_node(&self, job: JobKey) -> Option<Ipv4Addr> {
        self.jobs.get(&job).map(|s| s.node)
    }

    /// Whether the engine holds anything for `job` (flows, held packets, recent traffic).
    pub fn knows_job(&self, job: JobKey) -> bool {
        self.jobs.contains_key(&job)
            || self.conntrack.live_flows_of_job(job) > 0
            || self.hold.has(job)
    }

    /// A drop before the packet is tied to a verified job (`tenant="unknown"`).
    fn drop(&mut self, r: Reason) -> Verdict {
        self.drops.unknown(r, 1);
        Verdict::Drop(r)
    }

    /// A drop of a packet of a verified job of `tenant`.
    fn drop_of(&mut self, tenant: TenantId, r: Reason) -> Verdict {
        self.drops.verified(tenant, r, 1);
        Verdict::Drop(r)
    }

    fn tenant_cap(&self, tenant: TenantId) -> (PaceRate, PaceRate) {
        self.cfg
            .tenant_caps
            .get(&tenant)
            .copied()
            .unwrap_or(self.cfg.default_tenant_cap)
    }

    /// Whether an audit line of `job` written outside the engine (DNS refusals) fits its
    /// budget: `Some(n)` with the lines suppressed before it, or `None` (suppressed, counted).
    pub fn admit_audit(&mut self, job: JobKey, now: Nanos) -> Option<u64> {
        self.audit_budget.admit(job, now)
    }

    /// Queues an audit event within its job's budget.
    fn audit(&mut self, mut event: AuditEvent, now: Nanos) {
        if let Some(suppressed) = self.audit_budget.admit(event.job_key(), now) {
            event.set_suppressed(suppressed);
            self.audit.push(event);
        }
    }

    fn hold_packet(
        &mut self,
        job: JobKey,
        node: Ipv4Addr,
        payload: &[u8],
        now: Nanos,
        fetch: bool,
    ) -> Verdict {
        match self.hold.hold(job, node, payload, now) {
            Ok(()) => Verdict::Held {
                job_key: job,
                node,
                fetch,
            },
            Err(r) => self.drop(r),
        }
    }

    /// Handles the UDP payload of a GENEVE datagram from `outer_src`. `payload` is rewritten in
    /// place (NAT); a refusal is written into `refusal` (at least 28 + 1280 bytes is enough for
    /// every refusal).
    pub fn from_node(
        &mut self,
        policies: &impl PolicyCache,
        outer_src: Ipv4Addr,
        payload: &mut [u8],
        refusal: &mut [u8],
        now: Now,
    ) -> Verdict {
        self.node_packet(policies, outer_src, payload, refusal, now, false)
    }

    /// As [`Tier2::from_node`], for a packet [`Tier2::take_released`] handed out: it is older
    /// than anything still held for its job, so it does not queue behind them.
    pub fn from_node_released(
        &mut self,
        policies: &impl PolicyCache,
        held: &mut HeldPacket,
        refusal: &mut [u8],
        now: Now,
    ) -> Verdict {
        self.node_packet(policies, held.node, &mut held.payload, refusal, now, true)
    }

    fn node_packet(
        &mut self,
        policies: &impl PolicyCache,
        outer_src: Ipv4Addr,
        payload: &mut [u8],
        refusal: &mut [u8],
        now: Now,
        released: bool,
    ) -> Verdict {
        if self.nodes.binary_search(&outer_src).is_err() {
            return self.drop(Reason::UntrustedSource);
        }
        let g = match parse_payload(payload) {
            Ok(g) => g,
            Err(e) => return self.drop(e.reason()),
        };
        let opt = g.option;
        if !self.resets.is_empty() {
            let inner = &payload[g.inner_offset..];
            if let Some(v) = self.resets_from_node(outer_src, opt, inner, refusal) {
                return v;
            }
        }
        let policy = match policies.lookup(opt.job_key) {
            PolicyLookup::Ready(p) => p,
            PolicyLookup::Missing => {
                return self.hold_packet(opt.job_key, outer_src, payload, now.mono, true)
            }
            PolicyLookup::Rejected(r) => return self.drop(r),
        };
        if !released && !self.hold.is_empty() && self.hold.has(opt.job_key) {
            // Packets of the job wait: this one goes behind them. Released now unless they
            // wait for the refetch of a newer serial (then they go when it ends).
            if !self.serial_wait.contains_key(&opt.job_key) {
                self.hold.mark_ready(opt.job_key);
            }
            return self.hold_packet(opt.job_key, outer_src, payload, now.mono, false);
        }
        if policy.tenant_id != opt.tenant_id {
            return self.drop(Reason::GeneveUnknownJob);
        }
        // From here on the job is verified: drops are charged to its tenant.
        let tenant = opt.tenant_id;
        if policy.node.is_some_and(|n| n != IpAddr::V4(outer_src)) {
            return self.drop_of(tenant, Reason::NodeMismatch);
        }
        if opt.policy_serial > policy.serial {
            if !self.refetch.contains(&(opt.job_key, outer_src)) {
                // Also for an expired policy: the newer serial may be its renewal.
                self.refetch.push((opt.job_key, outer_src));
            }
            let stale = self
                .serial_stale
                .get(&opt.job_key)
                .is_some_and(|s| *s >= opt.policy_serial);
            if released {
                // Its refetch ended (or was declined) and did not bring the serial: decided
                // under the cached policy, as are the job's next packets announcing it.
                self.mark_stale(opt.job_key, opt.policy_serial);
            } else if !stale {
                // Not decided by the older policy: a SYN to a destination only the new policy
                // allows would be refused. Held until the refetch ends.
                let v = self.hold_packet(opt.job_key, outer_src, payload, now.mono, false);
                if matches!(v, Verdict::Held { .. }) {
                    let e = self
                        .serial_wait
                        .entry(opt.job_key)
                        .or_insert(opt.policy_serial);
                    *e = (*e).max(opt.policy_serial);
                }
                return v;
            }
        } else if !self.serial_stale.is_empty() {
            self.serial_stale.remove(&opt.job_key);
        }

        let start = g.inner_offset;
        let (tenant_egress, _) = self.tenant_cap(opt.tenant_id);
        let job_rate = PaceRate::Limited(policy.limits.egress_bps);
        let len = crate::gso::wire_len(&payload[start..], self.cfg.segment_mtu);
        let len32 = u32::try_from(len).unwrap_or(u32::MAX);
        let (geneve_head, inner) = payload.split_at_mut(start);
        let mut packet = match NatPacket::parse(inner) {
            Ok(p) => p,
            Err(e) => return self.drop_of(tenant, e.reason()),
        };
        let tuple = packet.tuple();
        let flags = tcp_flags(packet.as_bytes(), &tuple);
        let key = FlowKey {
            job: opt.job_key,
            proto: tuple.proto,
            src_ip: tuple.src,
            src_port: tuple.src_port,
            dst_ip: tuple.dst,
            dst_port: remote_port(&tuple, tuple.dst_port),
        };

        if now.unix_secs >= policy.expires_at_unix {
            // `exp` is the contract: every packet is refused from then on; the job's state goes
            // at the next tick (one pass over the flow table for every job ending then).
            if !self.is_ending(opt.job_key) && self.knows_job(opt.job_key) {
                self.end_job(opt.job_key, FlowEnd::PolicyExpired, None);
            }
            let mut record = decision_record(policy, &key, tuple.proto, len as u64, now);
            record.action = Action::Refuse;
            record.reason = Some(Reason::PolicyExpired);
            self.audit(AuditEvent::Decision(record), now.mono);
            let offending = packet.as_bytes();
            return self.refuse(
                Reason::PolicyExpired,
                outer_src,
                opt,
                g.inner_proto,
                offending,
                refusal,
            );
        }

        let found = self
            .conntrack
            .lookup(&key)
            .filter(|&id| !self.reused_tuple(id, flags, now));
        let (id, egress_ip, egress_port) = match found {
            Some(id) => match self.conntrack.info(id) {
                Some(i) => (id, i.egress_ip, i.egress_port),
                None => return self.drop_of(tenant, Reason::NoConntrack),
            },
            None => match self.admit(policy, opt, &key, tuple.proto, flags, len as u64, now) {
                Ok((id, ip, port)) => {
                    // Where replies go: learnt when a flow opens (a job lives on one node).
                    self.job_state(policy, opt, outer_src, g.inner_proto, now.mono);
                    self.names_admitted(policy, id, &key, packet.as_bytes(), now);
                    (id, ip, port)
                }
                Err(reason) => {
                    let offending = packet.as_bytes();
                    return self.refuse(reason, outer_src, opt, g.inner_proto, offending, refusal);
                }
            },
        };
        if !self.names.is_empty() {
            let gate = NameGate {
                id,
                node: outer_src,
                opt,
                inner_proto: g.inner_proto,
                released,
            };
            let inner = packet.as_bytes();
            if let Some(v) = self.names_gate(policy, gate, geneve_head, inner, refusal, now) {
                return v;
            }
        }
        self.conntrack
            .observe(id, Direction::Original, flags, len32, now.mono);

        if let Err(e) = packet.rewrite(Endpoint::Source, egress_ip, egress_port) {
            return self.drop_of(tenant, e.reason());
        }
        let pkey = PacingKey {
            job: opt.job_key,
            tenant: opt.tenant_id,
        };
        let rates = PacingRates {
            job: job_rate,
            tenant: tenant_egress,
        };
        match self.egress_pacer.stamp(pkey, rates, len32, now.mono) {
            Stamp::Depart(depart) => {
                if self.offload.enabled() {
                    let client_payload = offload::carries_payload(&payload[start..]);
                    self.offload_after_client_packet(&key, policy, outer_src, client_payload);
                }
                Verdict::ToInternet {
                    range: start..payload.len(),
                    depart,
                    job: opt.job_key,
                    path_mtu: self.path_mtus.get(key.dst_ip, now.mono),
                }
            }
            Stamp::Drop(r) => self.drop_of(tenant, r),
        }
    }

    // ---- The in-kernel fast path (crate::offload): what the engine hands to it. ----

    /// Turns offloading established flows to the in-kernel fast path on or off (the daemon
    /// turns it on once its programs are attached; off removes every installed flow).
    pub fn set_offload(&mut self, on: bool) {
        self.offload.set_enabled(on);
    }

    /// Packets (either way) a flow must carry through the engine after its first client
    /// payload before it is offloaded (the daemon uses [`offload::FAST_AFTER_PACKETS`]; 0, the
    /// default: at its first client payload).
    pub fn set_offload_min_packets(&mut self, n: u64) {
        self.offload.set_min_packets(n);
    }

    /// Takes the pending [`OffloadEvent`]s, oldest first. The daemon mirrors them into the fast
    /// path's maps under the same lock hold, before the packets of the batch are written.
    pub fn drain_offload_events(&mut self) -> std::vec::Drain<'_, OffloadEvent> {
        self.offload.drain()
    }

    /// Whether [`Tier2::drain_offload_events`] has something.
    pub fn has_offload_events(&self) -> bool {
        self.offload.has_events()
    }

    /// Flows installed in the fast path.
    pub fn offloaded_flows(&self) -> usize {
        self.offload.len()
    }

    /// **The one predicate that says a flow may be carried by the fast path.** Today: offload
    /// is on, the proxy is not draining (a draining proxy keeps its flows where they are, so
    /// that nothing new is handed over), the flow is IPv4 TCP or UDP, established (TCP
    /// handshake answered, no FIN or RST; UDP answered), and `client_payload`: the flow's first
    /// client payload has passed through the engine (the packet being forwarded carries it),
    /// and the job's limits are above [`offload::MIN_FAST_RATE_BPS`] both ways (at or below,
    /// the userspace pacer, which can delay packets, keeps the job: a limit that binds is met
    /// there and not on the fast path). An eligible flow is then
    /// installed once it has carried the offload threshold's packets through the engine after
    /// its first client payload ([`Tier2::set_offload_min_packets`]).
    /// A check that must see more of a flow in userspace adds its condition here: a flow it
    /// has not passed is never installed. The name check ([`crate::names`]) does: a flow whose
    /// first payload is held, being released, or was refused stays in userspace.
    fn offload_eligible(
        &self,
        id: FlowId,
        info: &FlowInfo,
        policy: &JobPolicy,
        client_payload: bool,
    ) -> bool {
        self.offload.enabled()
            && !self.name_check_pending(id)
            && !self.draining
            && offload::fast_shape(&info.key)
            && offload::fast_state(info.state)
            && offload::fast_rates(policy.limits.egress_bps, policy.limits.ingress_bps)
            && client_payload
    }

    /// After a packet from a node was let through: installs its flow if it became eligible
    /// (or re-installs it with the policy's new serial, rates or expiry), removes it if its
    /// state left "established" (FIN, RST).
    fn offload_after_client_packet(
        &mut self,
        key: &FlowKey,
        policy: &JobPolicy,
        node: Ipv4Addr,
        client_payload: bool,
    ) {
        let Some((id, info)) = self
            .conntrack
            .lookup(key)
            .and_then(|id| Some((id, self.conntrack.info(id)?)))
        else {
            return;
        };
        let installed = self.offload.get(key).is_some();
        if !offload::fast_state(info.state)
            || !offload::fast_rates(policy.limits.egress_bps, policy.limits.ingress_bps)
        {
            self.offload.remove(key);
            self.offload.forget_payload(id);
            return;
        }
        // A flow installed once needs no new payload to follow its policy's renewal; one whose
        // first payload passed before it was proven long is installed at a later packet.
        let payload = client_payload || installed || self.offload.payload_seen(id);
        if !self.offload_eligible(id, &info, policy, payload) {
            return;
        }
        let conntrack = &self.conntrack;
        if !installed
            && !self
                .offload
                .proven(id, &info.counters, client_payload, |x| {
                    conntrack.info(x).is_some()
                })
        {
            return;
        }
        self.offload.forget_payload(id);
        let IpAddr::V4(egress_ip) = info.egress_ip else {
            return;
        };
        let (tenant_egress, tenant_ingress) = self.tenant_cap(policy.tenant_id);
        self.offload.install(FastFlow {
            key: info.key,
            tenant: policy.tenant_id,
            serial: policy.serial,
            node,
            egress_ip,
            egress_port: info.egress_port,
            expires_unix: policy.expires_at_unix,
            rates: FastRates {
                job_egress: PaceRate::Limited(policy.limits.egress_bps),
                job_ingress: PaceRate::Limited(policy.limits.ingress_bps),
                tenant_egress,
                tenant_ingress,
            },
        });
    }

    /// Adds what the fast path carried for the flow of `key` since the last call (packets and
    /// bytes sandbox → internet, then back; the last packet's time) to its conntrack entry,
    /// so that idle expiry, `/v1/flows` and the `flow_end` audit line count it. Returns false
    /// when the engine no longer has the flow.
    pub fn credit_offloaded(
        &mut self,
        key: &FlowKey,
        out: (u64, u64),
        inbound: (u64, u64),
        last_seen: Option<Nanos>,
    ) -> bool {
        let Some(id) = self.conntrack.lookup(key) else {
            return false;
        };
        let sat = |n: u64| u32::try_from(n).unwrap_or(u32::MAX);
        self.conntrack
            .credit(id, Direction::Original, sat(out.0), out.1, last_seen);
        self.conntrack
            .credit(id, Direction::Reply, sat(inbound.0), inbound.1, None)
    }

    /// Whether the next [`Tier2::tick`] may end flows of jobs (queued ends, or the
    /// once-a-[`JOB_SCAN`] check is due): the daemon credits the fast path's counters first,
    /// so that the `flow_end` lines count everything.
    pub fn ends_flows_at(&self, now: Nanos) -> bool {
        !self.pending_ends.is_empty()
            || self
                .last_scan
                .is_none_or(|t| now.saturating_duration_since(t) >= JOB_SCAN)
    }

    /// Records where the job's replies go (its node and option), its ingress rate and names.
    fn job_state(
        &mut self,
        policy: &JobPolicy,
        opt: SnasOption,
        node: Ipv4Addr,
        inner: InnerProto,
        now: Nanos,
    ) {
        let state = JobState {
            node,
            option: opt,
            inner_v6: inner == InnerProto::Ipv6,
            ingress_bps: policy.limits.ingress_bps,
            last_active: now,
            tenant: Arc::clone(&policy.tenant),
            job: Arc::clone(&policy.job),
        };
        self.jobs.insert(opt.job_key, state);
    }

    /// The policy decision for a destination: via the names bound to it, else by address. Of
    /// the names, an allowing one wins, then one audit mode lets through, then a port denial
    /// (a deny host rule denies its name, not an address another name allows).
    fn decide(
        &self,
        policy: &JobPolicy,
        ip: IpAddr,
        port: u16,
        t: Transport,
        now: Nanos,
    ) -> (Decision, Option<Arc<str>>) {
        let rank = |d: &Decision| match d {
            Decision::Allow { .. } => 3,
            Decision::WouldDeny(_) => 2,
            Decision::Deny(DenyReason::PortDenied) => 1,
            Decision::Deny(_) => 0,
        };
        let mut best: Option<(Decision, Arc<str>)> = None;
        for name in self.bindings.names(policy.job_key, ip, now) {
            let d = policy.matcher.check_resolved(name, ip, port, t);
            if d.is_allow() {
                return (d, Some(Arc::clone(name)));
            }
            if best.as_ref().is_none_or(|(b, _)| rank(&d) > rank(b)) {
                best = Some((d, Arc::clone(name)));
            }
        }
        match best {
            Some((d, name)) => (d, Some(name)),
            None => (policy.matcher.check_ip(ip, port, t), None),
        }
    }

    /// The new-flow checks. Returns the flow and its NAT tuple, or the refusal reason; audits
    /// either way.
    #[allow(clippy::too_many_arguments)]
    fn admit(
        &mut self,
        policy: &JobPolicy,
        opt: SnasOption,
        key: &FlowKey,
        proto: L4Proto,
        flags: TcpFlags,
        bytes: u64,
        now: Now,
    ) -> Result<(FlowId, IpAddr, u16), Reason> {
        let initial = match proto {
            L4Proto::Tcp => flags.contains(TcpFlags::SYN) && !flags.contains(TcpFlags::ACK),
            _ => true,
        };
        if !initial {
            // A segment of a flow this proxy does not know (e.g. after a failover): no new state.
            return Err(Reason::NoConntrack);
        }
        let mut record = decision_record(policy, key, proto, bytes, now);
        debug_assert_eq!(record.job_key, opt.job_key);
        let outcome = self.admit_checks(policy, key, proto, now, &mut record);
        match outcome {
            Ok((_, ip, port)) => {
                // A reason on an admitted flow is the one audit mode let it through despite.
                record.action = if record.reason.is_some() {
                    Action::WouldDeny
                } else {
                    Action::Allow
                };
                record.egress = Some((ip, port));
            }
            Err(r) => {
                record.reason = Some(r);
                if !matches!(
                    r,
                    Reason::DestinationDenied
                        | Reason::PortDenied
                        | Reason::AlwaysDenied
                        | Reason::InfrastructureDenied
                        | Reason::DenyRule
                ) {
                    record.action = Action::Refuse;
                }
            }
        }
        self.audit(AuditEvent::Decision(record), now.mono);
        outcome
    }

    fn admit_checks(
        &mut self,
        policy: &JobPolicy,
        key: &FlowKey,
        proto: L4Proto,
        now: Now,
        record: &mut AuditRecord,
    ) -> Result<(FlowId, IpAddr, u16), Reason> {
        // Before any rule: no rule (not even `allow_private`) opens infrastructure.
        if self.infra.contains(key.dst_ip) {
            return Err(Reason::InfrastructureDenied);
        }
        if self.draining {
            return Err(Reason::Draining);
        }
        let t = transport_of(proto).ok_or(Reason::PortDenied)?;
        let (decision, name) = self.decide(policy, key.dst_ip, key.dst_port, t, now.mono);
        record.hostname = name;
        match decision {
            Decision::Allow { rule } => record.rule = Some(rule),
            // Audit mode: on through the limits, audited `would_deny` with this reason.
            Decision::WouldDeny(d) => record.reason = Some(d.reason()),
            Decision::Deny(d) => {
                if let DenyReason::DenyRule(n) = d {
                    record.rule = Some(n);
                }
                return Err(d.reason());
            }
        }
        if self.conntrack.open_connections_of_job(key.job) >= policy.limits.max_connections {
            return Err(Reason::ConnectionLimit);
        }
        let admitted = self
            .buckets
            .try_new_flow(
                key.job,
                u64::from(policy.limits.new_connections_per_sec),
                u64::from(policy.limits.new_connections_burst),
                now.mono,
            )
            .map_err(|_| Reason::PolicyInvalid)?;
        if !admitted {
            return Err(Reason::NewConnectionRate);
        }
        let limits = JobLimits {
            max_connections: policy.limits.max_connections,
            max_ports_per_destination: policy.limits.max_ports_per_destination,
        };
        match self
            .conntrack
            .open(*key, policy.tenant_id, limits, now.mono)
        {
            Open::Created {
                id,
                egress_ip,
                egress_port,
            } => Ok((id, egress_ip, egress_port)),
            Open::Existing(id) => self
                .conntrack
                .info(id)
                .map(|i| (id, i.egress_ip, i.egress_port))
                .ok_or(Reason::NoConntrack),
            Open::Refused(r) => Err(r),
        }
    }

    /// Counts the refusal (under the option's tenant: only verified jobs are refused) and
    /// builds the RST / ICMP answer behind a GENEVE header.
    fn refuse(
        &mut self,
        reason: Reason,
        node: Ipv4Addr,
        opt: SnasOption,
        inner_proto: InnerProto,
        offending: &[u8],
        out: &mut [u8],
    ) -> Verdict {
        self.drops.verified(opt.tenant_id, reason, 1);
        if out.len() < GENEVE_HEADER_LEN {
            return Verdict::Drop(reason);
        }
        let (head, body) = out.split_at_mut(GENEVE_HEADER_LEN);
        let is_tcp = IpPacket::parse(offending)
            .map(|p| p.protocol() == snas_wire::ip::proto::TCP)
            .unwrap_or(false);
        let built = if is_tcp {
            tcp_rst_into(body, offending)
        } else {
            let why = match reason {
                Reason::DestinationDenied
                | Reason::AlwaysDenied
                | Reason::InfrastructureDenied
                | Reason::PolicyExpired => Unreachable::AdminProhibited,
                _ => Unreachable::Port,
            };
            icmp_unreachable_into(body, offending, why)
        };
        let Ok(n) = built else {
            return Verdict::Drop(reason);
        };
        if write_geneve_header(head, &opt, inner_proto).is_err() {
            return Verdict::Drop(reason);
        }
        Verdict::Refuse {
            reason,
            node,
            reply_len: GENEVE_HEADER_LEN + n,
        }
    }

    /// Handles a packet from the internet side in `buf[inner]`; `inner.start` must leave at
    /// least [`GENEVE_HEADER_LEN`] bytes of headroom for the overlay header. Replies of flows
    /// and ICMP errors about them (translated, see `icmp_error_from_internet`) go to the
    /// job's node.
    pub fn from_internet(&mut self, buf: &mut [u8], inner: Range<usize>, now: Now) -> Verdict {
        self.from_internet_segmented(buf, inner, None, now)
    }

    /// [`Tier2::from_internet`] for a TCP super-packet that the caller will split into
    /// segments of at most `segment_mtu` bytes ([`crate::gso::segment_tcp`]): the pacer
    /// stamps each segment as if it had arrived alone, so that a 64 KiB read from the kernel
    /// leaves at the job's rate, not as one burst. The verdict's departure is the first
    /// segment's; [`Tier2::segment_departs`] has them all.
    pub fn from_internet_segmented(
        &mut self,
        buf: &mut [u8],
        inner: Range<usize>,
        segment_mtu: Option<usize>,
        now: Now,
    ) -> Verdict {
        self.segment_departs.clear();
        if inner.start < GENEVE_HEADER_LEN || inner.end > buf.len() || inner.start > inner.end {
            return self.drop(Reason::Malformed);
        }
        self.segment_lens.clear();
        if let Some(mtu) = segment_mtu {
            self.segment_lens.extend(
                crate::gso::segment_lens(&buf[inner.clone()], mtu)
                    .map(|l| u32::try_from(l).unwrap_or(u32::MAX)),
            );
        }
        let len = crate::gso::wire_len(&buf[inner.clone()], self.cfg.segment_mtu);
        let len = u32::try_from(len).unwrap_or(u32::MAX);
        let mut packet = match NatPacket::parse(&mut buf[inner.clone()]) {
            Ok(p) => p,
            Err(snas_wire::ParseError::NotAFlow { .. }) => {
                return self.icmp_error_from_internet(buf, inner, len, now)
            }
            Err(e) => return self.drop(e.reason()),
        };
        let tuple = packet.tuple();
        let flags = tcp_flags(packet.as_bytes(), &tuple);
        let rkey = ReplyKey {
            proto: tuple.proto,
            remote_ip: tuple.src,
            remote_port: remote_port(&tuple, tuple.src_port),
            egress_ip: tuple.dst,
            egress_port: tuple.dst_port,
        };
        let Some(id) = self.conntrack.lookup_reply(&rkey) else {
            self.resets_from_internet(&rkey, packet.as_bytes());
            return self.drop(Reason::NoConntrack);
        };
        self.conntrack
            .observe(id, Direction::Reply, flags, len, now.mono);
        let Some(info) = self.conntrack.info(id) else {
            return self.drop(Reason::NoConntrack);
        };
        if !offload::fast_state(info.state) {
            // FIN or RST from the internet: the flow leaves the fast path.
            self.offload.remove(&info.key);
        }
        let Some(job) = self.jobs.get_mut(&info.key.job) else {
            return self.drop(Reason::UnknownJob);
        };
        job.last_active = now.mono;
        let (node, opt, rate, v6) = (job.node, job.option, job.ingress_bps, job.inner_v6);
        // A flow the engine admitted: its job, and so its tenant, were verified.
        let tenant = opt.tenant_id;
        let (_, tenant_ingress) = self.tenant_cap(tenant);
        if let Err(e) = packet.rewrite(Endpoint::Destination, info.key.src_ip, info.key.src_port) {
            return self.drop_of(tenant, e.reason());
        }
        let head = inner.start - GENEVE_HEADER_LEN;
        let proto = if v6 || info.key.src_ip.is_ipv6() {
            InnerProto::Ipv6
        } else {
            InnerProto::Ipv4
        };
        if write_geneve_header(&mut buf[head..inner.start], &opt, proto).is_err() {
            return self.drop_of(tenant, Reason::Malformed);
        }
        let pkey = PacingKey {
            job: opt.job_key,
            tenant: opt.tenant_id,
        };
        let rates = PacingRates {
            job: PaceRate::Limited(rate),
            tenant: tenant_ingress,
        };
        if self.segment_lens.len() <= 1 {
            return match self.ingress_pacer.stamp(pkey, rates, len, now.mono) {
                Stamp::Depart(depart) => {
                    self.segment_departs.push(Some(depart));
                    Verdict::ToNode {
                        node,
                        range: head..inner.end,
                        depart,
                        job: opt.job_key,
                    }
                }
                Stamp::Drop(r) => self.drop_of(tenant, r),
            };
        }
        // Each segment is stamped alone.
        let mut first = None;
        for i in 0..self.segment_lens.len() {
            let seg = self.segment_lens[i];
            let d = match self.ingress_pacer.stamp(pkey, rates, seg, now.mono) {
                Stamp::Depart(d) => {
                    first.get_or_insert(d);
                    Some(d)
                }
                Stamp::Drop(r) => {
                    self.drop_of(tenant, r);
                    None
                }
            };
            self.segment_departs.push(d);
        }
        match first {
            Some(depart) => Verdict::ToNode {
                node,
                range: head..inner.end,
                depart,
                job: opt.job_key,
            },
            None => Verdict::Drop(Reason::PacingHorizon),
        }
    }

    /// An ICMP/ICMPv6 error from the internet (destination unreachable, fragmentation needed,
    /// packet too big, time exceeded, parameter problem) sent to an egress address: it quotes
    /// the proxy's own packet of a flow, so the flow is found by the quoted tuple (the reply
    /// key of the SNAT mapping), the error is translated back to the job
    /// ([`snas_wire::rewrite_icmp_error`]: outer destination and quoted source become the job's,
    /// checksums kept) and goes to the job's node like any reply, paced at the job's ingress
    /// rate. A PTB's or "fragmentation needed" MTU is passed on unchanged: NAT does not change a
    /// packet's size, and the overlay's 56 bytes are already outside the job's MTU (its veth
    /// MTU is `underlay_mtu − 56`), so the internet hop's figure is the one the job's packets
    /// must fit.
    ///
    /// Dropped: other ICMP messages without a flow (redirects, router advertisements, …) and
    /// quotes that do not parse (their parse reason: `port_denied`, `malformed`, …); errors
    /// whose quote is not a packet this proxy sent for a live flow, or whose outer destination
    /// is not the quoted source (`no_conntrack`); errors beyond the job's budget of
    /// [`ICMP_ERRORS_PER_SEC`] (`pacing_horizon`, as any reply over the job's ingress budget).
    /// The flow's state is not changed: an error ends nothing by itself.
    fn icmp_error_from_internet(
        &mut self,
        buf: &mut [u8],
        inner: Range<usize>,
        len: u32,
        now: Now,
    ) -> Verdict {
        let quoted = match snas_wire::quoted_flow_tuple(&buf[inner.clone()]) {
            Ok(t) => t,
            Err(e) => return self.drop(e.reason()),
        };
        let outer_dst = match IpPacket::parse(&buf[inner.clone()]) {
            Ok(ip) => ip.dst(),
            Err(e) => return self.drop(e.reason()),
        };
        if outer_dst != quoted.src {
            return self.drop(Reason::NoConntrack);
        }
        let rkey = ReplyKey {
            proto: quoted.proto,
            remote_ip: quoted.dst,
            remote_port: remote_port(&quoted, quoted.dst_port),
            egress_ip: quoted.src,
            egress_port: quoted.src_port,
        };
        let Some(info) = self
            .conntrack
            .lookup_reply(&rkey)
            .and_then(|id| self.conntrack.info(id))
        else {
            return self.drop(Reason::NoConntrack);
        };
        let (job_ip, job_port, job_key) = (info.key.src_ip, info.key.src_port, info.key.job);
        let Some(job) = self.jobs.get(&job_key) else {
            return self.drop(Reason::UnknownJob);
        };
        let (node, opt, rate) = (job.node, job.option, job.ingress_bps);
        let tenant = opt.tenant_id;
        let burst = ICMP_ERRORS_PER_SEC;
        if !matches!(
            self.icmp_errors
                .try_new_flow(job_key, ICMP_ERRORS_PER_SEC, burst, now.mono),
            Ok(true)
        ) {
            return self.drop_of(tenant, Reason::PacingHorizon);
        }
        if let Some(mtu) = crate::pmtu::reported_path_mtu(&buf[inner.clone()]) {
            // The proxy segments the job's super-packets itself: it must fit the path too.
            self.path_mtus.learn(quoted.dst, mtu, now.mono);
        }
        if let Err(e) =
            snas_wire::rewrite_icmp_error(&mut buf[inner.clone()], job_ip, job_ip, job_port)
        {
            return self.drop_of(tenant, e.reason());
        }
        let head = inner.start - GENEVE_HEADER_LEN;
        let proto = if job_ip.is_ipv6() {
            InnerProto::Ipv6
        } else {
            InnerProto::Ipv4
        };
        if write_geneve_header(&mut buf[head..inner.start], &opt, proto).is_err() {
            return self.drop_of(tenant, Reason::Malformed);
        }
        let (_, tenant_ingress) = self.tenant_cap(tenant);
        let pkey = PacingKey {
            job: opt.job_key,
            tenant,
        };
        let rates = PacingRates {
            job: PaceRate::Limited(rate),
            tenant: tenant_ingress,
        };
        match self.ingress_pacer.stamp(pkey, rates, len, now.mono) {
            Stamp::Depart(depart) => {
                self.segment_departs.push(Some(depart));
                Verdict::ToNode {
                    node,
                    range: head..inner.end,
                    depart,
                    job: opt.job_key,
                }
            }
            Stamp::Drop(r) => self.drop_of(tenant, r),
        }
    }

    /// The departure of each segment of the super-packet of the last
    /// [`Tier2::from_internet_segmented`] (`None`: beyond the horizon, dropped and counted).
    pub fn segment_departs(&self) -> &[Option<Nanos>] {
        &self.segment_departs
    }

    /// The audit event of a flow that ended.
    fn flow_end(&mut self, f: &FlowInfo, end: FlowEnd, now: Now) {
        let (tenant, job) = match self.jobs.get(&f.key.job) {
            Some(s) => (Arc::clone(&s.tenant), Arc::clone(&s.job)),
            None => (Arc::from(""), Arc::from("")),
        };
        let hostname = self
            .bindings
            .names(f.key.job, f.key.dst_ip, now.mono)
            .next()
            .cloned();
        let record = FlowEndRecord {
            unix_secs: now.unix_secs,
            end,
            tenant,
            job,
            job_key: f.key.job,
            proto: f.key.proto,
            src: (f.key.src_ip, f.key.src_port),
            dst: (f.key.dst_ip, f.key.dst_port),
            egress: (f.egress_ip, f.egress_port),
            hostname,
            counters: f.counters,
            duration: f.duration(),
            suppressed: 0,
        };
        self.audit(AuditEvent::FlowEnd(record), now.mono);
    }

    /// Queues the end of `job` (see [`Tier2::apply_ends`], which the next [`Tier2::tick`]
    /// runs). `names` (tenant, job) name the job in its `job` audit event when the engine has not
    /// seen it admit a flow. A job already queued is not queued twice.
    pub fn end_job(&mut self, job: JobKey, end: FlowEnd, names: Option<(Arc<str>, Arc<str>)>) {
        if !self.pending_ends.iter().any(|p| p.job == job) {
            self.pending_ends.push(PendingEnd { job, end, names });
        }
    }

    /// Ends every queued job in one pass over the flow table: its flows (one `flow_end` event
    /// each, with its end; their ports go into quarantine), held packets (counted as
    /// `unknown_job`), pacing clocks, connection-rate bucket; a job its node ended also loses
    /// its DNS bindings and audit budget and gets a `job` audit event. Returns the number of
    /// flows removed.
    pub fn apply_ends(&mut self, now: Now) -> usize {
        if self.pending_ends.is_empty() {
            return 0;
        }
        let pending = std::mem::take(&mut self.pending_ends);
        let jobs: Vec<JobKey> = pending.iter().map(|p| p.job).collect();
        let removed = self.conntrack.remove_jobs(&jobs, now.mono);
        let mut per_job: HashMap<JobKey, u64> = HashMap::new();
        for f in &removed {
            let end = pending
                .iter()
                .find(|p| p.job == f.key.job)
                .map_or(FlowEnd::PolicyGone, |p| p.end);
            self.offload.remove(&f.key);
            self.resets_begin(f, end, now);
            self.flow_end(f, end, now);
            *per_job.entry(f.key.job).or_default() += 1;
        }
        for p in pending {
            let job = p.job;
            let held = self.hold.drop_job(job);
            self.serial_wait.remove(&job);
            self.serial_stale.remove(&job);
            self.drops.unknown(Reason::UnknownJob, u64::from(held));
            self.egress_pacer.forget_job(job);
            self.ingress_pacer.forget_job(job);
            self.buckets.forget(job);
            let state = self.jobs.remove(&job);
            if p.end == FlowEnd::JobEnded {
                self.bindings.remove_job(job);
                self.audit_budget.forget(job);
                let (tenant, name) = match (state, p.names) {
                    (Some(s), _) => (s.tenant, s.job),
                    (None, Some(n)) => n,
                    (None, None) => (Arc::from(""), Arc::from("")),
                };
                // Never suppressed: one per job.
                self.audit.push(AuditEvent::JobEnded(JobEndRecord {
                    unix_secs: now.unix_secs,
                    tenant,
                    job: name,
                    job_key: job,
                    flows: per_job.get(&job).copied().unwrap_or(0),
                }));
            }
        }
        removed.len()
    }

    /// Ends `job` now (as [`Tier2::end_job`] followed by [`Tier2::apply_ends`]). Returns the
    /// number of flows removed (those of other queued jobs included).
    pub fn remove_job(&mut self, job: JobKey, end: FlowEnd, now: Now) -> usize {
        self.end_job(job, end, None);
        self.apply_ends(now)
    }

    /// Whether the end of `job` is queued.
    pub fn is_ending(&self, job: JobKey) -> bool {
        self.pending_ends.iter().any(|p| p.job == job)
    }

    /// Housekeeping; call it every few milliseconds. Expires idle flows (a `flow_end` event
    /// each), bindings and held packets that waited too long (counted as `unknown_job`, the
    /// reason of a fetch that timed out), forgets idle jobs; once per [`JOB_SCAN`], ends the
    /// jobs whose policy in `policies` expired or is gone and evicts idle per-job state.
    /// Returns the number of flows removed.
    pub fn tick(&mut self, policies: &impl PolicyCache, now: Now) -> usize {
        let mut removed = 0;
        while let Some(f) = self.conntrack.expire(now.mono).next() {
            let end = if f.state == FlowState::TcpClosed {
                FlowEnd::Closed
            } else {
                FlowEnd::Idle
            };
            self.offload.remove(&f.key);
            self.flow_end(&f, end, now);
            removed += 1;
        }
        self.names_tick(policies, now);
        self.resets.tick(now.mono);
        self.bindings.sweep(now.mono);
        for (job, n) in self.hold.expire(now.mono) {
            self.serial_wait.remove(&job);
            self.drops.unknown(Reason::UnknownJob, u64::from(n));
        }
        if self
            .last_scan
            .is_none_or(|t| now.mono.saturating_duration_since(t) >= JOB_SCAN)
        {
            self.last_scan = Some(now.mono);
            self.scan_jobs(policies, now);
        }
        removed += self.apply_ends(now);
        let idle = self.cfg.job_idle;
        let conntrack = &self.conntrack;
        self.jobs.retain(|job, s| {
            conntrack.live_flows_of_job(*job) > 0
                || now.mono.saturating_duration_since(s.last_active) < idle
        });
        if !self.serial_stale.is_empty() {
            let (jobs, hold) = (&self.jobs, &self.hold);
            self.serial_stale.retain(|j, _| {
                jobs.contains_key(j) || conntrack.live_flows_of_job(*j) > 0 || hold.has(*j)
            });
        }
        removed
    }

    /// Queues the end of the jobs whose policy expired or is gone; evicts idle per-job state.
    fn scan_jobs(&mut self, policies: &impl PolicyCache, now: Now) {
        let mut jobs: Vec<JobKey> = self.conntrack.jobs().collect();
        jobs.extend(self.jobs.keys().copied());
        jobs.sort_unstable();
        jobs.dedup();
        for job in jobs {
            let end = match policies.lookup(job) {
                PolicyLookup::Ready(p) if now.unix_secs < p.expires_at_unix => continue,
                PolicyLookup::Ready(_) => FlowEnd::PolicyExpired,
                PolicyLookup::Rejected(Reason::PolicyRevoked) => FlowEnd::Revoked,
                PolicyLookup::Rejected(Reason::KeyUntrusted) => FlowEnd::KeyUntrusted,
                PolicyLookup::Missing | PolicyLookup::Rejected(_) => FlowEnd::PolicyGone,
            };
            self.end_job(job, end, None);
        }
        self.buckets.evict_full(now.mono);
        self.icmp_errors.evict_full(now.mono);
        self.audit_budget.evict(now.mono);
        self.egress_pacer.evict_idle(now.mono, self.cfg.job_idle);
        self.ingress_pacer.evict_idle(now.mono, self.cfg.job_idle);
    }
}

/// A packet of a flow under the name check, as [`Tier2::names_gate`] sees it.
#[derive(Debug, Clone, Copy)]
struct NameGate {
    id: FlowId,
    node: Ipv4Addr,
    opt: SnasOption,
    inner_proto: InnerProto,
    released: bool,
}

/// Names on the wire ([`crate::names`]): the engine's side of the check. Called from three
/// places: admission ([`Tier2::names_admitted`]), every packet of a flow under the check
/// ([`Tier2::names_gate`], skipped while no flow is) and [`Tier2::tick`].
impl Tier2 {
    /// Whether flow `id` is under the name check (first payload pending, released packets on
    /// their way, or rejected): such a flow is not eligible for a fast path that bypasses the
    /// engine.
    pub fn name_check_pending(&self, id: FlowId) -> bool {
        self.names.involves(id)
    }

    /// Counters of the name check.
    pub fn name_stats(&self) -> crate::names::NameStats {
        self.names.stats()
    }

    /// Bytes held by the name check now.
    pub fn name_held_bytes(&self) -> u64 {
        self.names.held_bytes()
    }

    /// A SYN from the job on flow `id` that starts a new connection on the flow's 5-tuple
    /// ([`Conntrack::starts_new_connection`]; the sandbox picks its source ports): the old flow
    /// ends here (`flow_end` `reused`, out of the fast path, its name-check state and held bytes
    /// gone, its NAT port into quarantine) and `true` sends the SYN through admission as a new
    /// flow — policy decision, limits, a fresh NAT tuple and its own name check. Without this a
    /// flow that passed the check (or a host rule's DNS binding since expired) would carry its
    /// verdict over to whatever the job sends next on the same tuple.
    fn reused_tuple(&mut self, id: FlowId, flags: TcpFlags, now: Now) -> bool {
        if !self.conntrack.starts_new_connection(id, flags) {
            return false;
        }
        let discarded = self.names.forget(id);
        if let Some(f) = self.conntrack.remove(id, now.mono) {
            self.drops
                .verified(f.tenant, Reason::NoConntrack, u64::from(discarded));
            self.offload.remove(&f.key);
            self.flow_end(&f, FlowEnd::Reused, now);
        }
        true
    }

    /// A flow was just admitted: if the rule that allowed it checks names (TCP on any port,
    /// UDP on 443), its first payload will be checked (in place when it comes whole in one
    /// packet, else held until it is complete).
    fn names_admitted(
        &mut self,
        policy: &JobPolicy,
        id: FlowId,
        key: &FlowKey,
        inner: &[u8],
        now: Now,
    ) {
        if !policy.names.any() {
            return;
        }
        let t = match key.proto {
            L4Proto::Tcp => Transport::Tcp,
            L4Proto::Udp if key.dst_port == 443 => Transport::Udp,
            _ => return,
        };
        let Decision::Allow { rule } = self.decide(policy, key.dst_ip, key.dst_port, t, now.mono).0
        else {
            return;
        };
        let Some(check) = policy.names.of_rule(rule) else {
            return;
        };
        let syn_seq = match IpPacket::parse(inner)
            .ok()
            .and_then(|p| match p.transport() {
                Ok(snas_wire::Transport::Tcp(tcp)) => Some(tcp.seq()),
                _ => None,
            }) {
            Some(seq) => Some(seq),
            None if t == Transport::Tcp => return,
            None => None,
        };
        self.names
            .start(id, *key, policy.tenant_id, check, rule, syn_seq, now.mono);
    }

    /// A packet of a flow while some flow is under the check: `None` lets it through (also a
    /// first payload that passed in place), `Some(verdict)` is its fate (held, refused,
    /// dropped).
    fn names_gate(
        &mut self,
        policy: &JobPolicy,
        gate: NameGate,
        head: &[u8],
        inner: &[u8],
        refusal: &mut [u8],
        now: Now,
    ) -> Option<Verdict> {
        let tenant = gate.opt.tenant_id;
        let held = Verdict::Held {
            job_key: gate.opt.job_key,
            node: gate.node,
            fetch: false,
        };
        match self
            .names
            .on_packet(gate.id, gate.node, head, inner, gate.released, now.mono)
        {
            crate::names::Step::Pass => None,
            crate::names::Step::Held => Some(held),
            crate::names::Step::Drop(r) => Some(self.drop_of(tenant, r)),
            crate::names::Step::Rejected(r) => Some(self.names_refuse(r, gate, inner, refusal)),
            crate::names::Step::Decide(d) => match self.names_decide(policy, d, None, now) {
                None => Some(held),
                Some((reason, discarded)) => {
                    // The packet in hand is one of the discarded: counted by the refusal.
                    self.drops
                        .verified(tenant, reason, u64::from(discarded.saturating_sub(1)));
                    Some(self.names_refuse(reason, gate, inner, refusal))
                }
            },
            // Nothing held: a match goes on in this call, a mismatch refuses this packet (the
            // only one of the flow the check has seen, counted by the refusal).
            crate::names::Step::DecideInPlace(d) => self
                .names_decide(policy, d, Some((gate.node, head)), now)
                .map(|(reason, _)| self.names_refuse(reason, gate, inner, refusal)),
        }
    }

    /// A TCP packet of a rejected flow is answered with a RST; a UDP one is dropped.
    fn names_refuse(
        &mut self,
        reason: Reason,
        gate: NameGate,
        inner: &[u8],
        refusal: &mut [u8],
    ) -> Verdict {
        let is_tcp = IpPacket::parse(inner)
            .map(|p| p.protocol() == snas_wire::ip::proto::TCP)
            .unwrap_or(false);
        if is_tcp {
            self.refuse(
                reason,
                gate.node,
                gate.opt,
                gate.inner_proto,
                inner,
                refusal,
            )
        } else {
            self.drop_of(gate.opt.tenant_id, reason)
        }
    }

    /// Decides a classified first payload: releases the flow's held packets, if any (`None`),
    /// or rejects the flow and audits it (`Some((reason, packets discarded))`). `in_hand`: the
    /// node and GENEVE header of the packet decided in place (for the RST to the server).
    fn names_decide(
        &mut self,
        policy: &JobPolicy,
        d: crate::names::Decide,
        in_hand: Option<(Ipv4Addr, &[u8])>,
        now: Now,
    ) -> Option<(Reason, u32)> {
        let key = d.key;
        let (udp, t) = match key.proto {
            L4Proto::Udp => (true, Transport::Udp),
            _ => (false, Transport::Tcp),
        };
        let bindings = &self.bindings;
        let matcher = &policy.matcher;
        let outcome = crate::names::check(&d.classified, d.rule, udp, |n| {
            matcher.check_host(n, key.dst_port, t).is_allow()
                && bindings
                    .names(key.job, key.dst_ip, now.mono)
                    .any(|b| crate::names::same_name(b, n))
        });
        match outcome {
            crate::names::Check::Pass => {
                let other = d.classified == crate::names::Classified::Other;
                self.names.pass(d.id, other);
                None
            }
            crate::names::Check::Mismatch { reason, wire } => {
                let discarded = self.names.reject(d.id, reason, in_hand);
                let bound = self
                    .bindings
                    .names(key.job, key.dst_ip, now.mono)
                    .cloned()
                    .collect();
                let record = NameMismatchRecord {
                    unix_secs: now.unix_secs,
                    reason,
                    tenant: Arc::clone(&policy.tenant),
                    job: Arc::clone(&policy.job),
                    job_key: key.job,
                    proto: key.proto,
                    src: (key.src_ip, key.src_port),
                    dst: (key.dst_ip, key.dst_port),
                    wire_name: Arc::from(wire.as_str()),
                    bound,
                    rule: Some(d.rule_index),
                    suppressed: 0,
                };
                self.audit(AuditEvent::NameMismatch(record), now.mono);
                Some((reason, discarded))
            }
        }
    }

    /// The check's housekeeping: forgets flows that ended; decides flows whose wait ended (a
    /// rejected TCP flow's RST to the job goes with its next packet).
    fn names_tick(&mut self, policies: &impl PolicyCache, now: Now) {
        if self.names.is_empty() {
            return;
        }
        let conntrack = &self.conntrack;
        let gone = self.names.sweep(|id| conntrack.info(id).is_some());
        self.drops.unknown(Reason::NoConntrack, u64::from(gone));
        for d in self.names.due(now.mono) {
            let (tenant, id) = (d.tenant, d.id);
            let reason = match &d.classified {
                crate::names::Classified::Names(w, _)
                | crate::names::Classified::NoName(w)
                | crate::names::Classified::Malformed(w, _) => w.reason(),
                crate::names::Classified::Other => Reason::HostMismatch,
            };
            let rejected = match policies.lookup(d.key.job) {
                PolicyLookup::Ready(p) => self.names_decide(p, d, None, now),
                // The job's end is on its way; nothing of the flow goes out.
                _ => Some((reason, self.names.reject(id, reason, None))),
            };
            if let Some((reason, discarded)) = rejected {
                self.drops.verified(tenant, reason, u64::from(discarded));
            }
        }
    }
}

/// Live policy updates (issue 16): the flows of a job whose new policy no longer allows them.
impl Tier2 {
    /// Re-decides every live flow of `policy`'s job under `policy` (its new version) and ends
    /// those it no longer allows — infrastructure included — through the normal flow-removal
    /// path ([`Conntrack::remove`]: the port goes into quarantine), each audited as a
    /// `flow_end` with end `policy_updated`. Returns how many flows were ended.
    ///
    /// An ended TCP flow is reset both ways ([`crate::resets`]): the call queues probes to the
    /// sandbox and the remote ([`Tier2::take_control`]), whose answers are turned into RSTs each
    /// end accepts; a new connection to the destination is refused by the new policy (RST or
    /// ICMP). O(flows of the engine): run once per update, never per packet.
    pub fn reevaluate_job(&mut self, policy: &JobPolicy, now: Now) -> usize {
        let job = policy.job_key;
        if self.conntrack.live_flows_of_job(job) == 0 {
            return 0;
        }
        let ended: Vec<FlowId> = self
            .conntrack
            .iter()
            .filter(|(_, f)| f.key.job == job)
            .filter(|(_, f)| {
                if self.infra.contains(f.key.dst_ip) {
                    return true;
                }
                let Some(t) = transport_of(f.key.proto) else {
                    return false;
                };
                let (d, _) = self.decide(policy, f.key.dst_ip, f.key.dst_port, t, now.mono);
                // Audit mode's `would_deny` still passes: an update to audit mode ends nothing.
                !d.passes()
            })
            .map(|(id, _)| id)
            .collect();
        let mut n = 0;
        for id in ended {
            if let Some(f) = self.conntrack.remove(id, now.mono) {
                // Out of the fast path in the same call, before its NAT port can be reused.
                self.offload.remove(&f.key);
                self.resets_begin(&f, FlowEnd::PolicyUpdated, now);
                self.flow_end(&f, FlowEnd::PolicyUpdated, now);
                n += 1;
            }
        }
        n
    }
}

/// Resets of the TCP flows the engine ends on its own ([`crate::resets`]): the ends of
/// `policy_updated`, `revoked` and `key_untrusted` flows, and the segments that answer them.
impl Tier2 {
    /// Starts resetting flow `f`, which just ended with `end`, if `end` is one the proxy decided
    /// (a policy update, a revocation, a key removed) and the engine knows where the job is.
    fn resets_begin(&mut self, f: &FlowInfo, end: FlowEnd, now: Now) {
        if !matches!(
            end,
            FlowEnd::PolicyUpdated | FlowEnd::Revoked | FlowEnd::KeyUntrusted
        ) {
            return;
        }
        let Some(job) = self.jobs.get(&f.key.job) else {
            return;
        };
        let path = JobPath {
            node: job.node,
            option: job.option,
            inner: crate::resets::inner_proto(job.inner_v6, f.key.src_ip),
        };
        self.resets.start(f, path, now.mono);
    }

    /// A packet from a node while flows are closing: `Some` when it belongs to one (refused
    /// with a RST, or dropped if it is a RST; counted as `no_conntrack`, the flow is gone).
    fn resets_from_node(
        &mut self,
        node: Ipv4Addr,
        opt: SnasOption,
        inner: &[u8],
        refusal: &mut [u8],
    ) -> Option<Verdict> {
        let ip = IpPacket::parse(inner).ok()?;
        let snas_wire::Transport::Tcp(t) = ip.transport().ok()? else {
            return None;
        };
        let key = FlowKey {
            job: opt.job_key,
            proto: L4Proto::Tcp,
            src_ip: ip.src(),
            src_port: t.src_port(),
            dst_ip: ip.dst(),
            dst_port: t.dst_port(),
        };
        match self.resets.from_job(node, &key, inner) {
            Intercept::NotClosing => None,
            Intercept::Consumed => Some(self.drop_of(opt.tenant_id, Reason::NoConntrack)),
            Intercept::ResetJob(path) => Some(self.refuse(
                Reason::NoConntrack,
                path.node,
                path.option,
                path.inner,
                inner,
                refusal,
            )),
        }
    }

    /// A packet from the internet that has no flow: answered if it belongs to a closing flow
    /// (the caller drops it either way).
    fn resets_from_internet(&mut self, rkey: &ReplyKey, packet: &[u8]) {
        if !self.resets.is_empty() && rkey.proto == L4Proto::Tcp {
            self.resets.from_remote(rkey, packet);
        }
    }

    /// Whether probes or RSTs wait to be sent ([`Tier2::take_control`]).
    pub fn has_control(&self) -> bool {
        self.resets.has_control()
    }

    /// Moves up to `limit` probes and RSTs the engine wants sent into `out`, oldest first
    /// (a [`crate::resets::ControlTo::Node`] packet goes to the node's GENEVE port, a
    /// [`crate::resets::ControlTo::Internet`] one to the TUN device). The daemon sends them
    /// after the batch's offload events reached the fast path's maps, so that the answers
    /// come to the engine. Returns how many.
    pub fn take_control(&mut self, out: &mut Vec<Control>, limit: usize) -> usize {
        self.resets.take_control(out, limit)
    }

    /// Counters of the resets ([`crate::resets`]).
    pub fn reset_stats(&self) -> ResetStats {
        self.resets.stats()
    }

    /// Flows being reset now.
    pub fn closing_flows(&self) -> usize {
        self.resets.len()
    }
}

/// The audit record of a decision about `key` (deny until the caller says otherwise).
fn decision_record(
    policy: &JobPolicy,
    key: &FlowKey,
    proto: L4Proto,
    bytes: u64,
    now: Now,
) -> AuditRecord {
    AuditRecord {
        unix_secs: now.unix_secs,
        action: Action::Deny,
        reason: None,
        tenant: Arc::clone(&policy.tenant),
        job: Arc::clone(&policy.job),
        job_key: key.job,
        proto,
        src: (key.src_ip, key.src_port),
        dst: (key.dst_ip, key.dst_port),
        hostname: None,
        rule: None,
        egress: None,
        bytes,
        suppressed: 0,
    }
}
