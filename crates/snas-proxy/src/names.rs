//! Names on the wire: tier 2 checks the name a flow's first payload carries (TLS SNI, HTTP
//! `Host`, QUIC SNI) against the job's policy and DNS bindings, without terminating anything.
//!
//! # What it owns
//! - The pure parsers of first payloads: [`tls`] (ClientHello `server_name`, records
//!   reassembled), [`http`] (request head names, through `httparse`), [`quic`] (client Initial
//!   decryption, RFC 9001 / RFC 9369) and [`classify_tcp`], which says what a TCP stream's first
//!   bytes are.
//! - [`Assembler`]: a byte stream rebuilt by offset (TCP sequence numbers, QUIC CRYPTO offsets),
//!   first copy of every byte kept, bounded.
//! - [`NameChecks`]: the per-flow state of the check inside the engine ([`crate::tier2`]). A
//!   first payload that is complete in the flow's first payload packet (the common case: a
//!   ClientHello, a request head, a QUIC Initial in one segment or datagram) is decided *in
//!   place* ([`Step::DecideInPlace`]): on a match that packet goes on in the same engine call,
//!   no copy, no second pass. Otherwise the client's packets are held until the first payload
//!   classifies, released unchanged in order on a match, discarded on a mismatch. Either way a
//!   mismatch resets the flow both ways and is audited by the engine.
//!
//! # Rules (docs/proxy.md, "Names on the wire")
//! - Only flows a *host* rule with `names = "check"` allowed are inspected: TCP on any port of
//!   the rule, UDP on 443 (QUIC). CIDR rules are address rules.
//! - A name passes when the policy allows it on the flow's port and transport *and* the job's
//!   DNS bound it to the flow's destination address: fronting another name through a shared
//!   address fails even when both names are allowed elsewhere.
//! - TLS without `server_name`, HTTP without any name, a ClientHello or request head that is
//!   malformed, longer than the per-flow limit, or unfinished when the wait ends: mismatch (a
//!   front end would pick the backend by something we did not see).
//! - Anything else (neither TLS nor HTTP/1.x nor a QUIC Initial): passes, unless the rule says
//!   `require_name = true`.
//! - Once decided, a TCP flow is never inspected again: later requests on a keep-alive HTTP
//!   connection are not checked, and the fast path stays the fast path.
//! - A UDP flow that passed stays watched (`Gate::Checked`): a QUIC Initial with a
//!   Destination Connection ID the flow has not shown before, which opens under the keys of
//!   that DCID, is a new QUIC connection on the reused 5-tuple (a second connection from the
//!   same socket) and is checked again from its first packet, with the same parser and
//!   verdicts. An Initial that does not open under its own DCID's keys cannot start a
//!   connection at the server (it derives them the same way) and belongs to one already
//!   checked (a client's Initial to the server's chosen CID): it passes. Short-header packets
//!   pass after a one-byte test. Such a flow stays out of the fast path.
//!
//! # Invariants
//! - A decision in place and a decision after holding see the same bytes and give the same
//!   [`Classified`] ([`classify_first_packet`] is [`classify_tcp`] of what the [`Assembler`]
//!   would hold after that one packet): only whether a copy is made differs.
//! - Only the flow's first payload packet is decided in place, and only while nothing of the
//!   flow is held: a packet at a later offset that came first, or any held packet, sends the
//!   rest of the first payload through the hold (later packets never overtake held ones).
//! - Held bytes never exceed the per-flow, per-job and total bounds of [`NameCheckConfig`]; a
//!   packet that would is dropped (`hold_queue_full`) and the client retransmits it.
//! - A flow in [`NameChecks`] (pending, releasing or rejected) is never eligible for any fast
//!   path that skips the engine ([`NameChecks::involves`]).
//! - Released packets leave in TCP sequence order (QUIC: arrival order), each once, exactly
//!   as the job sent them; later packets of the flow queue behind them until they are through.
//!
//! # Limits
//! - Entries of flows that ended are found and freed by [`NameChecks::sweep`] (the engine's
//!   tick), not at once: conntrack reports ended flows without their ids.
//! - One allocation per held packet and per decided flow: these are first payloads, not the
//!   established path. A decision in place allocates nothing on a match (QUIC: the copy of the
//!   Initial that is decrypted); a mismatch copies the GENEVE header for the RST to the server.
//! - A decision in place needs no hold space, so a complete first payload is decided even when
//!   the job's or the total hold bound is reached (only what must be held is refused).

pub mod http;
pub mod quic;
pub mod tls;

use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasherDefault, Hasher};
use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use snas_policy::rules::{EgressRule, NameCheck};
use snas_wire::build::{tcp_into, TcpSpec};
use snas_wire::Transport as L4View;
use snas_wire::{IpPacket, JobKey, Reason, TcpFlags, TenantId};

use crate::clock::Nanos;
use crate::conntrack::{FlowId, FlowKey};
use crate::hold::HeldPacket;

/// Bounds of the check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NameCheckConfig {
    /// First-payload bytes inspected per flow (default 4 KiB: a post-quantum ClientHello is
    /// 1.2–1.8 KB). A ClientHello or request head longer than this is a mismatch.
    pub flow_bytes: usize,
    /// Bytes (whole packets) one job may have held (default 256 KiB).
    pub job_bytes: u64,
    /// Bytes held over all jobs (default 16 MiB).
    pub total_bytes: u64,
    /// Longest a flow's first payload is waited for after its first held packet (default 2 s).
    pub max_wait: Duration,
    /// QUIC datagrams held per flow before the ClientHello must be complete (default 8).
    pub quic_packets: u32,
}

impl Default for NameCheckConfig {
    fn default() -> Self {
        NameCheckConfig {
            flow_bytes: 4096,
            job_bytes: 256 * 1024,
            total_bytes: 16 << 20,
            max_wait: Duration::from_secs(2),
            quic_packets: 8,
        }
    }
}

/// The name checks of a policy's rules, by rule index.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NamePolicy {
    /// `Some` for host rules with `names = "check"`.
    rules: Vec<Option<NameCheck>>,
    any: bool,
}

impl NamePolicy {
    /// From a policy's `egress` rules.
    pub fn new(egress: &[EgressRule]) -> NamePolicy {
        let rules: Vec<Option<NameCheck>> = egress
            .iter()
            .map(|r| r.name_check().filter(|c| c.checks()))
            .collect();
        let any = rules.iter().any(Option::is_some);
        NamePolicy { rules, any }
    }

    /// The check of rule `rule` (`None`: not name-checked).
    pub fn of_rule(&self, rule: usize) -> Option<NameCheck> {
        self.rules.get(rule).copied().flatten()
    }

    /// Whether any rule is name-checked (if not, the engine never looks further).
    pub fn any(&self) -> bool {
        self.any
    }
}

/// Which protocol carried (or should have carried) the name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Wire {
    /// A TLS ClientHello over TCP.
    Tls,
    /// An HTTP/1.x request head.
    Http,
    /// A QUIC Initial's ClientHello.
    Quic,
}

impl Wire {
    /// The drop reason of a mismatch.
    pub fn reason(self) -> Reason {
        match self {
            Wire::Tls | Wire::Quic => Reason::SniMismatch,
            Wire::Http => Reason::HostMismatch,
        }
    }

    /// Stable lower-case name.
    pub fn name(self) -> &'static str {
        match self {
            Wire::Tls => "tls",
            Wire::Http => "http",
            Wire::Quic => "quic",
        }
    }
}

/// What a first payload is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Classified {
    /// Names carried (never empty; TLS and QUIC carry one).
    Names(Wire, Vec<String>),
    /// A ClientHello without `server_name`, a request head without `Host`.
    NoName(Wire),
    /// Not well-formed, too long, or unfinished when no more bytes are waited for.
    Malformed(Wire, &'static str),
    /// Neither TLS, HTTP/1.x nor a QUIC Initial.
    Other,
}

/// What the first bytes of a TCP stream are; `None`: wait for more. `last`: no more bytes will
/// come (limit reached, FIN, or the wait ended), so anything unfinished is decided now.
pub fn classify_tcp(
    prefix: &[u8],
    last: bool,
    scratch: &mut Vec<u8>,
    max: usize,
) -> Option<Classified> {
    if tls::looks_like_tls(prefix) {
        return match tls::client_hello_from_records(prefix, scratch, max) {
            tls::Hello::Incomplete if last => {
                Some(Classified::Malformed(Wire::Tls, "unfinished ClientHello"))
            }
            tls::Hello::Incomplete => None,
            tls::Hello::NotTls => Some(Classified::Other),
            tls::Hello::Malformed(why) => Some(Classified::Malformed(Wire::Tls, why)),
            tls::Hello::ClientHello { sni: Some(n) } => Some(Classified::Names(Wire::Tls, vec![n])),
            tls::Hello::ClientHello { sni: None } => Some(Classified::NoName(Wire::Tls)),
        };
    }
    match http::request_head(prefix) {
        http::Head::Incomplete if last => {
            Some(Classified::Malformed(Wire::Http, "unfinished request head"))
        }
        http::Head::Incomplete => None,
        http::Head::NotHttp => Some(Classified::Other),
        http::Head::Malformed(why) => Some(Classified::Malformed(Wire::Http, why)),
        http::Head::Request { names } if names.is_empty() => Some(Classified::NoName(Wire::Http)),
        http::Head::Request { names } => Some(Classified::Names(Wire::Http, names)),
    }
}

/// What a TCP flow's first payload is, from its first payload packet alone (`data`: its
/// payload, at stream offset 0, nothing else of the stream received): exactly what
/// [`classify_tcp`] says of the prefix an [`Assembler`] of `max` bytes holds after that packet,
/// with `last` set as the hold sets it (`fin`, or the packet reaches the limit). `None`: the
/// first payload goes on past this packet and must be held.
pub fn classify_first_packet(
    data: &[u8],
    fin: bool,
    scratch: &mut Vec<u8>,
    max: usize,
) -> Option<Classified> {
    let last = fin || data.len() >= max;
    classify_tcp(&data[..data.len().min(max)], last, scratch, max)
}

/// The outcome of a check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Check {
    /// Release the held packets.
    Pass,
    /// Reset / drop the flow.
    Mismatch {
        /// `sni_mismatch` or `host_mismatch`.
        reason: Reason,
        /// The name on the wire, or what stood in its place (`(none)`, `(malformed: …)`).
        wire: String,
    },
}

/// Decides a classified payload: every name must pass `allowed` (allowed by the policy on the
/// flow's port and bound by DNS to its address). `udp`: the flow is QUIC (reason of a missing
/// name where one is required).
pub fn check(
    c: &Classified,
    rule: NameCheck,
    udp: bool,
    mut allowed: impl FnMut(&str) -> bool,
) -> Check {
    match c {
        Classified::Names(w, names) => match names.iter().find(|n| !allowed(n)) {
            None => Check::Pass,
            Some(bad) => Check::Mismatch {
                reason: w.reason(),
                wire: bad.clone(),
            },
        },
        Classified::NoName(w) => Check::Mismatch {
            reason: w.reason(),
            wire: "(none)".into(),
        },
        Classified::Malformed(w, why) => Check::Mismatch {
            reason: w.reason(),
            wire: format!("(malformed: {why})"),
        },
        Classified::Other if rule.require_name => Check::Mismatch {
            reason: if udp {
                Reason::SniMismatch
            } else {
                Reason::HostMismatch
            },
            wire: "(none: not TLS, HTTP or QUIC)".into(),
        },
        Classified::Other => Check::Pass,
    }
}

/// Whether `a` and `b` are the same DNS name (case and one trailing dot ignored).
pub fn same_name(a: &str, b: &str) -> bool {
    a.strip_suffix('.')
        .unwrap_or(a)
        .eq_ignore_ascii_case(b.strip_suffix('.').unwrap_or(b))
}

/// What adding bytes to an [`Assembler`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Feed {
    /// Stored whole (or already had it).
    Stored,
    /// Some of it lies past the limit and was not kept.
    Overflow,
}

/// A byte stream rebuilt by offset: the first copy of every byte stays (a later, different copy
/// is ignored, as the Linux receiver does), bytes past `max` are not kept but their ranges are
/// remembered (so a retransmission is recognised).
#[derive(Debug, Clone)]
pub struct Assembler {
    data: Vec<u8>,
    /// Byte ranges received, sorted, disjoint, merged.
    have: Vec<(u64, u64)>,
    max: usize,
}

impl Assembler {
    /// An empty stream keeping at most `max` bytes.
    pub fn new(max: usize) -> Assembler {
        Assembler {
            data: Vec::new(),
            have: Vec::new(),
            max,
        }
    }

    /// Whether every byte of `[start, end)` was received already.
    pub fn covers(&self, start: u64, end: u64) -> bool {
        start >= end || self.have.iter().any(|&(s, e)| s <= start && end <= e)
    }

    /// Adds `data` at `offset`.
    pub fn add(&mut self, offset: u64, data: &[u8]) -> Feed {
        let Some(end) = offset.checked_add(data.len() as u64) else {
            return Feed::Overflow;
        };
        if data.is_empty() {
            return Feed::Stored;
        }
        let max = self.max as u64;
        let kept_end = end.min(max);
        if offset < kept_end {
            // Both fit in usize: below `max`.
            let (s, e) = (offset as usize, kept_end as usize);
            if self.data.len() < e {
                self.data.resize(e, 0);
            }
            // Write only the gaps, so the first copy of every byte stays.
            let mut at = s;
            for &(hs, he) in &self.have {
                let (hs, he) = (hs.min(max) as usize, he.min(max) as usize);
                if he <= at || hs >= e {
                    continue;
                }
                if hs > at {
                    self.data[at..hs].copy_from_slice(&data[at - s..hs - s]);
                }
                at = at.max(he);
            }
            if at < e {
                self.data[at..e].copy_from_slice(&data[at - s..e - s]);
            }
        }
        let pos = self.have.partition_point(|&(s, _)| s < offset);
        self.have.insert(pos, (offset, end));
        let mut merged: Vec<(u64, u64)> = Vec::with_capacity(self.have.len());
        for &(s, e) in &self.have {
            match merged.last_mut() {
                Some(last) if s <= last.1 => last.1 = last.1.max(e),
                _ => merged.push((s, e)),
            }
        }
        self.have = merged;
        if end > max {
            Feed::Overflow
        } else {
            Feed::Stored
        }
    }

    /// The contiguous bytes from offset 0 (at most `max`).
    pub fn prefix(&self) -> &[u8] {
        match self.have.first() {
            Some(&(0, e)) => &self.data[..(e.min(self.max as u64) as usize)],
            _ => &[],
        }
    }

    /// Whether the contiguous prefix reached the limit.
    pub fn full(&self) -> bool {
        self.prefix().len() >= self.max
    }
}

/// Counters of the check (metrics).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NameStats {
    /// Flows whose first payload was inspected.
    pub inspected: u64,
    /// Flows released after a match (or as "other" without `require_name`).
    pub passed: u64,
    /// Flows reset or dropped on a mismatch.
    pub mismatched: u64,
    /// Flows decided because the wait ended.
    pub timed_out: u64,
    /// Flows whose first payload was neither TLS, HTTP nor QUIC.
    pub other: u64,
    /// Flows whose first payload could not be decided in place (not complete in the flow's
    /// first payload packet, or a later segment came first): their packets were held.
    pub held: u64,
}

/// The most Destination Connection IDs remembered per checked UDP flow (oldest replaced).
const KNOWN_DCIDS: usize = 4;

/// A QUIC connection ID (at most 20 bytes, RFC 9000 §17.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
struct Dcid {
    len: u8,
    bytes: [u8; quic::MAX_CID],
}

impl Dcid {
    fn of(cid: &[u8]) -> Dcid {
        let mut d = Dcid::default();
        let n = cid.len().min(quic::MAX_CID);
        d.bytes[..n].copy_from_slice(&cid[..n]);
        d.len = n as u8;
        d
    }

    fn as_slice(&self) -> &[u8] {
        &self.bytes[..usize::from(self.len)]
    }
}

/// A UDP flow whose first payload passed: what is needed to check a new QUIC connection on
/// it, and the DCIDs of the connections (and their Initials) already seen. Bounded: a fixed
/// ring of [`KNOWN_DCIDS`].
#[derive(Debug, Clone)]
struct Checked {
    key: FlowKey,
    tenant: TenantId,
    rule: NameCheck,
    rule_index: usize,
    known: [Option<Dcid>; KNOWN_DCIDS],
    next: usize,
}

impl Checked {
    fn knows(&self, cid: &[u8]) -> bool {
        self.known.iter().flatten().any(|d| d.as_slice() == cid)
    }

    fn remember(&mut self, cid: &[u8]) {
        self.known[self.next] = Some(Dcid::of(cid));
        self.next = (self.next + 1) % KNOWN_DCIDS;
    }

    /// Whether `ip` (a packet of the job, not NATed) is of this flow: a flow id outlives its
    /// flow until the sweep, and conntrack may give it to another.
    fn is_of(&self, ip: &IpPacket<&[u8]>) -> bool {
        let Ok(L4View::Udp(u)) = ip.transport() else {
            return false;
        };
        ip.dst() == self.key.dst_ip
            && u.dst_port() == self.key.dst_port
            && u.src_port() == self.key.src_port
    }
}

/// Whether `datagram` starts with the Initial of a QUIC connection not yet seen on a checked
/// flow: its DCID is not known to `c` and the packet opens under that DCID's Initial keys.
/// `Some(dcid)`: a new connection to check; `None`: not an Initial, or one of a connection
/// already checked (whose DCID is then remembered, so that it is opened only once).
fn new_connection(datagram: &[u8], c: &mut Checked) -> Option<Dcid> {
    let h = quic::initial_header(datagram).ok()?;
    if c.knows(h.dcid) {
        return None;
    }
    let dcid = Dcid::of(h.dcid);
    let opens = quic::InitialKeys::client(h.version, h.dcid)
        .ok()
        .is_some_and(|keys| {
            let mut packet = datagram[..h.packet_len].to_vec();
            quic::open_initial(&keys, &mut packet, h.pn_offset).is_ok()
        });
    if opens {
        Some(dcid)
    } else {
        c.remember(h.dcid);
        None
    }
}

/// A flow whose first payload is awaited.
#[derive(Debug)]
struct Pending {
    key: FlowKey,
    tenant: TenantId,
    rule: NameCheck,
    rule_index: usize,
    /// TCP: the sequence number of the first payload byte (ISN + 1). UDP: unused.
    base: u32,
    /// TCP: the last acknowledgement number the client sent (for the RST to the server).
    ack: u32,
    deadline: Nanos,
    /// GENEVE header of the flow's first held packet (for the RST to the server).
    head: Vec<u8>,
    node: Ipv4Addr,
    /// (stream offset, packet) in release order.
    held: Vec<(u64, HeldPacket)>,
    held_bytes: u64,
    stream: Assembler,
    /// No more bytes will be waited for (FIN, limit).
    last: bool,
    quic: Option<quic::InitialKeys>,
    /// The DCID `quic` was derived from.
    dcid: Option<Dcid>,
}

impl Pending {
    /// What the engine needs to decide this flow, whose first payload is `classified`.
    fn decide(&self, id: FlowId, classified: Classified) -> Decide {
        Decide {
            id,
            key: self.key,
            tenant: self.tenant,
            rule: self.rule,
            rule_index: self.rule_index,
            classified,
        }
    }
}

#[derive(Debug)]
enum Gate {
    Pending(Box<Pending>),
    /// Matched; this many released packets have not come back through the engine yet. A UDP
    /// flow then becomes [`Gate::Checked`].
    Releasing(u32, Option<Box<Checked>>),
    /// A UDP flow that passed, watched for new QUIC connections (see the module doc).
    Checked(Box<Checked>),
    /// Mismatched: every further packet of the job is refused / dropped with this reason.
    Rejected(Reason),
}

/// What the engine does with a packet of a flow in [`NameChecks`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Not held: the packet goes on (pure ACK, the released packets themselves, …).
    Pass,
    /// Copied into the flow's held packets (or already there): the packet is done for now.
    Held,
    /// The flow's first payload is classified from held packets (the one in hand among them):
    /// the engine decides with [`check`] and calls [`NameChecks::pass`] (the held packets are
    /// released) or [`NameChecks::reject`].
    Decide(Decide),
    /// The packet in hand carries the flow's whole first payload and nothing of the flow is
    /// held: the engine decides with [`check`] at once. On a match it calls
    /// [`NameChecks::pass`] and the packet goes on in the same call; on a mismatch it calls
    /// [`NameChecks::reject`] with the packet's node and GENEVE header (for the RST to the
    /// server) and refuses the packet.
    DecideInPlace(Decide),
    /// Dropped (counted by the engine): over a hold bound, or not part of the stream.
    Drop(Reason),
    /// The flow was rejected earlier: refuse (TCP) or drop (UDP) with this reason.
    Rejected(Reason),
}

/// A flow whose first payload classified, to be decided by the engine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decide {
    /// The flow.
    pub id: FlowId,
    /// Its key.
    pub key: FlowKey,
    /// Its tenant.
    pub tenant: TenantId,
    /// The check of the rule that allowed it.
    pub rule: NameCheck,
    /// That rule's index.
    pub rule_index: usize,
    /// What its first payload is.
    pub classified: Classified,
}

/// A fast, deterministic hasher for [`FlowId`]s (slab indices, not chosen by senders).
#[derive(Debug, Default, Clone, Copy)]
struct IdHasher(u64);

impl Hasher for IdHasher {
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_u64(u64::from(b));
        }
    }
    fn write_u32(&mut self, n: u32) {
        self.write_u64(u64::from(n));
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0 ^ n)
            .rotate_left(29)
            .wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
    fn finish(&self) -> u64 {
        self.0
    }
}

/// The name checks in progress of one engine. See the module documentation.
#[derive(Debug)]
pub struct NameChecks {
    cfg: NameCheckConfig,
    flows: HashMap<FlowId, Gate, BuildHasherDefault<IdHasher>>,
    job_bytes: HashMap<JobKey, u64>,
    total_bytes: u64,
    released: VecDeque<HeldPacket>,
    scratch: Vec<u8>,
    stats: NameStats,
}

impl NameChecks {
    /// An empty table.
    pub fn new(cfg: NameCheckConfig) -> NameChecks {
        NameChecks {
            cfg,
            flows: HashMap::default(),
            job_bytes: HashMap::new(),
            total_bytes: 0,
            released: VecDeque::new(),
            scratch: Vec::new(),
            stats: NameStats::default(),
        }
    }

    /// The bounds.
    pub fn config(&self) -> NameCheckConfig {
        self.cfg
    }

    /// Whether no flow is being checked (the engine's per-packet test).
    pub fn is_empty(&self) -> bool {
        self.flows.is_empty()
    }

    /// Whether `id` is pending, releasing or rejected: such a flow is not eligible for a fast
    /// path that bypasses the engine.
    pub fn involves(&self, id: FlowId) -> bool {
        self.flows.contains_key(&id)
    }

    /// Counters.
    pub fn stats(&self) -> NameStats {
        self.stats
    }

    /// Bytes held now (all flows).
    pub fn held_bytes(&self) -> u64 {
        self.total_bytes
    }

    /// Starts checking flow `id` (just admitted under rule `rule_index`, whose check is `rule`)
    /// at `now`. `syn_seq`: the ISN of a TCP flow (`None` for UDP).
    #[allow(clippy::too_many_arguments)]
    pub fn start(
        &mut self,
        id: FlowId,
        key: FlowKey,
        tenant: TenantId,
        rule: NameCheck,
        rule_index: usize,
        syn_seq: Option<u32>,
        now: Nanos,
    ) {
        let p = Pending {
            key,
            tenant,
            rule,
            rule_index,
            base: syn_seq.map_or(0, |s| s.wrapping_add(1)),
            ack: 0,
            deadline: now.saturating_add(self.cfg.max_wait),
            head: Vec::new(),
            node: Ipv4Addr::UNSPECIFIED,
            held: Vec::new(),
            held_bytes: 0,
            stream: Assembler::new(self.cfg.flow_bytes),
            last: false,
            quic: None,
            dcid: None,
        };
        self.flows.insert(id, Gate::Pending(Box::new(p)));
    }

    /// A packet of flow `id` from the job at `now`: `head` is its GENEVE header, `inner` the IP
    /// packet (not yet NATed), `released`: it comes back from [`NameChecks::take_released`].
    pub fn on_packet(
        &mut self,
        id: FlowId,
        node: Ipv4Addr,
        head: &[u8],
        inner: &[u8],
        released: bool,
        now: Nanos,
    ) -> Step {
        let Some(gate) = self.flows.get_mut(&id) else {
            return Step::Pass;
        };
        let p = match gate {
            Gate::Checked(c) => {
                if released {
                    return Step::Pass;
                }
                let Ok(ip) = IpPacket::parse(inner) else {
                    return Step::Pass;
                };
                if !c.is_of(&ip) {
                    self.flows.remove(&id);
                    return Step::Pass;
                }
                let Ok(L4View::Udp(u)) = ip.transport() else {
                    return Step::Pass;
                };
                let datagram = u.payload();
                // Short header (the established connection's packets): nothing to look at.
                if datagram.first().is_none_or(|b| b & 0x80 == 0) {
                    return Step::Pass;
                }
                let Some(dcid) = new_connection(datagram, c) else {
                    return Step::Pass;
                };
                let c = c.clone();
                self.recheck(id, &c, dcid, now);
                return self.on_packet(id, node, head, inner, false, now);
            }
            Gate::Releasing(left, checked) => {
                if released {
                    *left = left.saturating_sub(1);
                    if *left == 0 {
                        match checked.take() {
                            Some(c) => {
                                self.flows.insert(id, Gate::Checked(c));
                            }
                            None => {
                                self.flows.remove(&id);
                            }
                        }
                    }
                    return Step::Pass;
                }
                // A new QUIC connection while the first one's packets are on their way out
                // cannot be checked without reordering them: dropped, the client sends its
                // Initial again (after its probe timeout) and it is checked then.
                if let Some(c) = checked {
                    let new = IpPacket::parse(inner)
                        .ok()
                        .and_then(|ip| match ip.transport() {
                            Ok(L4View::Udp(u)) if c.is_of(&ip) => new_connection(u.payload(), c),
                            _ => None,
                        });
                    if new.is_some() {
                        return Step::Drop(Reason::HoldQueueFull);
                    }
                }
                // Behind the released ones: the flow's packets never overtake each other.
                let mut payload = Vec::with_capacity(head.len() + inner.len());
                payload.extend_from_slice(head);
                payload.extend_from_slice(inner);
                self.released.push_back(HeldPacket { node, payload });
                *left += 1;
                return Step::Held;
            }
            // Our own RST to the server goes through; nothing else does.
            Gate::Rejected(_) if released => return Step::Pass,
            Gate::Rejected(r) => return Step::Rejected(*r),
            Gate::Pending(p) => p,
        };
        if released {
            return Step::Pass;
        }
        let Ok(ip) = IpPacket::parse(inner) else {
            return Step::Drop(Reason::Malformed);
        };
        let (offset, data, fin) = match ip.transport() {
            Ok(L4View::Tcp(t)) => {
                let f = t.flags();
                if f.contains(TcpFlags::RST) {
                    // The client gives up: nothing of its first payload will be needed.
                    let held = p.held_bytes;
                    let job = p.key.job;
                    self.flows.remove(&id);
                    self.unhold(job, held);
                    return Step::Pass;
                }
                if f.contains(TcpFlags::ACK) {
                    p.ack = t.ack();
                }
                let syn = f.contains(TcpFlags::SYN);
                let fin = f.contains(TcpFlags::FIN);
                if t.payload().is_empty() && !fin {
                    // Pure ACKs (and the SYN itself) carry nothing to check.
                    return Step::Pass;
                }
                let first = t.seq().wrapping_add(u32::from(syn));
                let rel = first.wrapping_sub(p.base);
                if rel >= 1 << 31 {
                    return Step::Drop(Reason::Malformed);
                }
                (u64::from(rel), sub_range(inner, t.payload()), fin)
            }
            Ok(L4View::Udp(u)) => (u64::MAX, sub_range(inner, u.payload()), false),
            _ => return Step::Drop(Reason::Malformed),
        };
        let data = &inner[data];
        let len = data.len() as u64;
        let quic = offset == u64::MAX;
        if !quic && !fin && p.stream.covers(offset, offset + len) {
            // A retransmission of held bytes: the first copy is what gets released.
            return Step::Held;
        }
        // In place: the flow's first payload packet while nothing of it is held (TCP: at the
        // first payload byte; a later segment that came first is held, and so is the rest).
        let dcid_before = p.dcid;
        let mut fed = false;
        let mut incomplete = false;
        if p.held.is_empty() {
            let classified = if quic {
                fed = true;
                quic_feed(p, data, self.cfg, 1)
            } else if offset == 0 {
                let c = classify_first_packet(
                    data,
                    p.last || fin,
                    &mut self.scratch,
                    self.cfg.flow_bytes,
                );
                incomplete = c.is_none();
                c
            } else {
                None
            };
            if let Some(classified) = classified {
                self.stats.inspected += 1;
                return Step::DecideInPlace(p.decide(id, classified));
            }
        }
        let size = (head.len() + inner.len()) as u64;
        let job_held = self.job_bytes.get(&p.key.job).copied().unwrap_or(0);
        if job_held + size > self.cfg.job_bytes || self.total_bytes + size > self.cfg.total_bytes {
            if fed {
                // Not held, so not in the stream either: the client sends it again and it is
                // read then, as if for the first time.
                p.stream = Assembler::new(self.cfg.flow_bytes);
                p.quic = None;
                p.dcid = dcid_before;
                p.last = false;
            }
            return Step::Drop(Reason::HoldQueueFull);
        }
        if p.held.is_empty() {
            self.stats.held += 1;
        }
        if p.head.is_empty() {
            p.head.extend_from_slice(head);
            p.node = node;
        }
        let mut payload = Vec::with_capacity(head.len() + inner.len());
        payload.extend_from_slice(head);
        payload.extend_from_slice(inner);
        let packet = HeldPacket { node, payload };
        let classified = if quic {
            let order = p.held.len() as u64;
            p.held.push((order, packet));
            if fed {
                // Read above: not complete.
                None
            } else {
                let count = p.held.len() as u32;
                quic_feed(p, data, self.cfg, count)
            }
        } else {
            let pos = p.held.partition_point(|(o, _)| *o <= offset);
            p.held.insert(pos, (offset, packet));
            if p.stream.add(offset, data) == Feed::Overflow || fin {
                p.last = true;
            }
            let last = p.last || p.stream.full();
            if incomplete {
                // Classified above from the same bytes: not complete.
                None
            } else {
                classify_tcp(
                    p.stream.prefix(),
                    last,
                    &mut self.scratch,
                    self.cfg.flow_bytes,
                )
            }
        };
        p.held_bytes += size;
        *self.job_bytes.entry(p.key.job).or_insert(0) += size;
        self.total_bytes += size;
        match classified {
            None => Step::Held,
            Some(classified) => {
                self.stats.inspected += 1;
                Step::Decide(p.decide(id, classified))
            }
        }
    }

    fn unhold(&mut self, job: JobKey, bytes: u64) {
        self.total_bytes = self.total_bytes.saturating_sub(bytes);
        if let Some(b) = self.job_bytes.get_mut(&job) {
            *b = b.saturating_sub(bytes);
            if *b == 0 {
                self.job_bytes.remove(&job);
            }
        }
    }

    fn take_pending(&mut self, id: FlowId) -> Option<Box<Pending>> {
        match self.flows.remove(&id) {
            Some(Gate::Pending(p)) => {
                self.unhold(p.key.job, p.held_bytes);
                Some(p)
            }
            Some(other) => {
                self.flows.insert(id, other);
                None
            }
            None => None,
        }
    }

    /// The first payload of `id` matched: its held packets are queued for release (in order)
    /// and the flow is not inspected again.
    pub fn pass(&mut self, id: FlowId, other: bool) {
        let Some(p) = self.take_pending(id) else {
            return;
        };
        self.stats.passed += 1;
        if other {
            self.stats.other += 1;
        }
        let n = p.held.len() as u32;
        let checked = (p.key.proto == snas_wire::L4Proto::Udp).then(|| {
            let mut c = Checked {
                key: p.key,
                tenant: p.tenant,
                rule: p.rule,
                rule_index: p.rule_index,
                known: [None; KNOWN_DCIDS],
                next: 0,
            };
            if let Some(d) = p.dcid {
                c.remember(d.as_slice());
            }
            Box::new(c)
        });
        self.released.extend(p.held.into_iter().map(|(_, h)| h));
        match (n, checked) {
            (0, Some(c)) => {
                self.flows.insert(id, Gate::Checked(c));
            }
            (0, None) => {}
            (n, checked) => {
                self.flows.insert(id, Gate::Releasing(n, checked));
            }
        }
    }

    /// Flow `id`, checked before as `c`, starts a new QUIC connection (`dcid`): its check
    /// starts again, from nothing held, under the same rule.
    fn recheck(&mut self, id: FlowId, c: &Checked, dcid: Dcid, now: Nanos) {
        self.start(id, c.key, c.tenant, c.rule, c.rule_index, None, now);
        if let Some(Gate::Pending(p)) = self.flows.get_mut(&id) {
            p.dcid = Some(dcid);
        }
    }

    /// The first payload of `id` mismatched: its held packets are discarded (returns how many)
    /// and every later packet of the job is [`Step::Rejected`]. A TCP flow also gets a RST
    /// toward the server queued for release (it leaves through the flow's NAT), behind the
    /// GENEVE header of its first held packet, or of `in_hand` (node, header: the packet
    /// decided in place) when nothing was held.
    pub fn reject(
        &mut self,
        id: FlowId,
        reason: Reason,
        in_hand: Option<(Ipv4Addr, &[u8])>,
    ) -> u32 {
        let Some(mut p) = self.take_pending(id) else {
            return 0;
        };
        self.stats.mismatched += 1;
        let n = p.held.len() as u32;
        if let (true, Some((node, head))) = (p.head.is_empty(), in_hand) {
            p.head.extend_from_slice(head);
            p.node = node;
        }
        if p.key.proto == snas_wire::L4Proto::Tcp && !p.head.is_empty() {
            if let Some(rst) = rst_to_server(&p) {
                self.released.push_back(rst);
            }
        }
        self.flows.insert(id, Gate::Rejected(reason));
        n
    }

    /// Flows whose wait ended by `now`, each with what its first payload is (decided as if no
    /// more bytes will come). The engine decides them as [`Step::Decide`].
    pub fn due(&mut self, now: Nanos) -> Vec<Decide> {
        let mut out = Vec::new();
        for (id, gate) in &mut self.flows {
            let Gate::Pending(p) = gate else { continue };
            if p.deadline > now {
                continue;
            }
            let c = if p.key.proto == snas_wire::L4Proto::Udp {
                quic_verdict(p, true)
            } else if p.held.is_empty() {
                // Nothing sent yet: keep waiting (the check starts with the first payload).
                p.deadline = now.saturating_add(self.cfg.max_wait);
                continue;
            } else {
                classify_tcp(
                    p.stream.prefix(),
                    true,
                    &mut self.scratch,
                    self.cfg.flow_bytes,
                )
                .unwrap_or(Classified::Malformed(Wire::Tls, "unfinished"))
            };
            out.push(p.decide(*id, c));
        }
        self.stats.timed_out += out.len() as u64;
        self.stats.inspected += out.len() as u64;
        out
    }

    /// Forgets the flows `live` says are gone (their held packets are discarded); returns the
    /// packets discarded.
    pub fn sweep(&mut self, mut live: impl FnMut(FlowId) -> bool) -> u32 {
        let gone: Vec<FlowId> = self.flows.keys().copied().filter(|id| !live(*id)).collect();
        let mut n = 0;
        for id in gone {
            if let Some(Gate::Pending(p)) = self.flows.remove(&id) {
                n += p.held.len() as u32;
                self.unhold(p.key.job, p.held_bytes);
            }
        }
        n
    }

    /// Forgets flow `id` at once (the engine removed it): its held packets are discarded and
    /// their bytes no longer count against the job. Returns the packets discarded. Packets it
    /// released before come back to an engine that no longer knows the flow.
    pub fn forget(&mut self, id: FlowId) -> u32 {
        match self.flows.remove(&id) {
            Some(Gate::Pending(p)) => {
                self.unhold(p.key.job, p.held_bytes);
                p.held.len() as u32
            }
            _ => 0,
        }
    }

    /// Whether released packets wait to be taken.
    pub fn has_released(&self) -> bool {
        !self.released.is_empty()
    }

    /// Moves up to `limit` released packets into `out`; returns how many.
    pub fn take_released(&mut self, out: &mut Vec<HeldPacket>, limit: usize) -> usize {
        let n = limit.min(self.released.len());
        out.extend(self.released.drain(..n));
        n
    }
}

/// Where `part` (a subslice of `whole`) lies in `whole`.
fn sub_range(whole: &[u8], part: &[u8]) -> std::ops::Range<usize> {
    let start = (part.as_ptr() as usize).saturating_sub(whole.as_ptr() as usize);
    let start = start.min(whole.len());
    start..(start + part.len()).min(whole.len())
}

/// Feeds one datagram of a QUIC flow; returns the classification once there is one.
/// `count`: the flow's datagrams so far, this one included.
fn quic_feed(
    p: &mut Pending,
    datagram: &[u8],
    cfg: NameCheckConfig,
    count: u32,
) -> Option<Classified> {
    let mut rest = datagram;
    let mut any = false;
    while !rest.is_empty() {
        let h = match quic::initial_header(rest) {
            Ok(h) => h,
            Err(quic::QuicError::NotInitial) => break,
            Err(_) => return Some(Classified::Malformed(Wire::Quic, "Initial header")),
        };
        let keys = match &p.quic {
            Some(k) if k.version() == h.version => k,
            Some(_) => return Some(Classified::Malformed(Wire::Quic, "version changed")),
            None => match quic::InitialKeys::client(h.version, h.dcid) {
                Ok(k) => {
                    p.dcid = Some(Dcid::of(h.dcid));
                    p.quic.insert(k)
                }
                Err(_) => return Some(Classified::Malformed(Wire::Quic, "Initial keys")),
            },
        };
        let mut packet = rest[..h.packet_len].to_vec();
        let frames = match quic::open_initial(keys, &mut packet, h.pn_offset) {
            Ok(f) => f,
            Err(_) => return Some(Classified::Malformed(Wire::Quic, "Initial does not open")),
        };
        let mut overflow = false;
        let stream = &mut p.stream;
        if quic::crypto_frames(frames, |off, data| {
            overflow |= stream.add(off, data) == Feed::Overflow;
        })
        .is_err()
        {
            return Some(Classified::Malformed(Wire::Quic, "Initial frames"));
        }
        if overflow {
            p.last = true;
        }
        any = true;
        rest = &rest[h.packet_len..];
    }
    if !any && p.quic.is_none() {
        // The flow's first datagram is not a QUIC Initial.
        return Some(Classified::Other);
    }
    let last = p.last || count >= cfg.quic_packets;
    let c = quic_verdict(p, last);
    match c {
        Classified::Malformed(_, "unfinished ClientHello") if !last => None,
        c => Some(c),
    }
}

/// What the CRYPTO stream of a QUIC flow says (`last`: decide an unfinished one).
fn quic_verdict(p: &Pending, last: bool) -> Classified {
    if p.quic.is_none() {
        return Classified::Other;
    }
    match tls::client_hello_message(p.stream.prefix(), p.stream.max) {
        tls::Hello::Incomplete if last => {
            Classified::Malformed(Wire::Quic, "unfinished ClientHello (too long or lost)")
        }
        tls::Hello::Incomplete => Classified::Malformed(Wire::Quic, "unfinished ClientHello"),
        tls::Hello::NotTls => Classified::Malformed(Wire::Quic, "CRYPTO is not a ClientHello"),
        tls::Hello::Malformed(why) => Classified::Malformed(Wire::Quic, why),
        tls::Hello::ClientHello { sni: Some(n) } => Classified::Names(Wire::Quic, vec![n]),
        tls::Hello::ClientHello { sni: None } => Classified::NoName(Wire::Quic),
    }
}

/// A RST from the job's end toward the server at the first payload byte (the server's
/// `rcv_nxt`: nothing of the payload reached it), behind the flow's GENEVE header, for the
/// engine to NAT and send like any packet of the flow.
fn rst_to_server(p: &Pending) -> Option<HeldPacket> {
    let spec = TcpSpec {
        src: SocketAddr::new(p.key.src_ip, p.key.src_port),
        dst: SocketAddr::new(p.key.dst_ip, p.key.dst_port),
        seq: p.base,
        ack: p.ack,
        flags: TcpFlags::RST | TcpFlags::ACK,
        window: 0,
        payload: &[],
    };
    let mut buf = vec![0u8; p.head.len() + 60];
    buf[..p.head.len()].copy_from_slice(&p.head);
    let n = tcp_into(&mut buf[p.head.len()..], &spec).ok()?;
    buf.truncate(p.head.len() + n);
    Some(HeldPacket {
        node: p.node,
        payload: buf,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn assembler_keeps_the_first_copy_remembers_ranges_and_bounds_what_it_keeps() {
        let mut s = Assembler::new(16);
        assert_eq!(s.add(4, b"efgh"), Feed::Stored);
        assert_eq!(s.prefix(), b"");
        assert_eq!(s.add(0, b"abcdXXXXij"), Feed::Stored);
        assert_eq!(s.prefix(), b"abcdefghij");
        assert!(s.covers(2, 9));
        assert!(!s.covers(8, 12));
        assert_eq!(s.add(10, b"0123456789"), Feed::Overflow);
        assert_eq!(s.prefix(), b"abcdefghij012345");
        assert!(s.full());
        assert!(s.covers(12, 20));
    }

    #[test]
    fn classification_of_tcp_first_bytes() {
        let mut sc = Vec::new();
        let hello = tls::build::records(
            &tls::build::client_hello_message(Some("a.example.com"), 0),
            9999,
        );
        assert_eq!(
            classify_tcp(&hello, false, &mut sc, 4096),
            Some(Classified::Names(Wire::Tls, vec!["a.example.com".into()]))
        );
        assert_eq!(classify_tcp(&hello[..10], false, &mut sc, 4096), None);
        assert!(matches!(
            classify_tcp(&hello[..10], true, &mut sc, 4096),
            Some(Classified::Malformed(Wire::Tls, _))
        ));
        assert_eq!(
            classify_tcp(
                b"GET / HTTP/1.1\r\nHost: b.example.com\r\n\r\n",
                false,
                &mut sc,
                4096
            ),
            Some(Classified::Names(Wire::Http, vec!["b.example.com".into()]))
        );
        assert_eq!(
            classify_tcp(b"SSH-2.0-x\r\n", false, &mut sc, 4096),
            Some(Classified::Other)
        );
        assert_eq!(
            classify_tcp(b"\x00\x00\x00\x08\x04\xd2\x16\x2f", false, &mut sc, 4096),
            Some(Classified::Other)
        );
    }

    #[test]
    fn other_payloads_pass_unless_the_rule_requires_a_name() {
        let lax = NameCheck::default();
        let strict = NameCheck {
            require_name: true,
            ..NameCheck::default()
        };
        assert_eq!(
            check(&Classified::Other, lax, false, |_| false),
            Check::Pass
        );
        assert!(matches!(
            check(&Classified::Other, strict, false, |_| true),
            Check::Mismatch {
                reason: Reason::HostMismatch,
                ..
            }
        ));
        assert!(matches!(
            check(&Classified::NoName(Wire::Tls), lax, false, |_| true),
            Check::Mismatch {
                reason: Reason::SniMismatch,
                ..
            }
        ));
        let two = Classified::Names(
            Wire::Http,
            vec!["a.example.com".into(), "b.example.com".into()],
        );
        assert_eq!(
            check(&two, lax, false, |n| n == "a.example.com"),
            Check::Mismatch {
                reason: Reason::HostMismatch,
                wire: "b.example.com".into()
            }
        );
    }

    proptest! {
        #[test]
        fn assembler_prefix_is_the_stream_whatever_the_order_and_overlap(
            data in proptest::collection::vec(any::<u8>(), 1..600),
            cuts in proptest::collection::vec((0usize..600, 0usize..600), 1..12),
        ) {
            let mut s = Assembler::new(4096);
            for (a, b) in cuts {
                let (a, b) = (a % data.len(), b % data.len());
                let (a, b) = (a.min(b), a.max(b));
                s.add(a as u64, &data[a..b]);
            }
            s.add(0, &data);
            prop_assert_eq!(s.prefix(), &data[..]);
        }

        /// The decision in place sees what the hold would have: for the first payload packet
        /// (whole or cut anywhere, a byte changed or not, with or without FIN, under any limit)
        /// it classifies exactly as the assembled stream would after that packet.
        #[test]
        fn classifying_the_first_packet_in_place_equals_classifying_it_held(
            kind in 0u8..3,
            pad in 0usize..3000,
            cut in any::<prop::sample::Index>(),
            flip in proptest::option::of((any::<prop::sample::Index>(), any::<u8>())),
            fin in any::<bool>(),
            max in 16usize..5000,
        ) {
            let mut data = match kind {
                0 => tls::build::records(
                    &tls::build::client_hello_message(Some("api.example.com"), pad),
                    16384,
                ),
                1 => format!(
                    "GET /{} HTTP/1.1\r\nHost: api.example.com\r\n\r\n",
                    "a".repeat(pad)
                )
                .into_bytes(),
                _ => (0..pad).map(|i| (i * 7) as u8).collect(),
            };
            data.truncate(cut.index(data.len() + 1));
            if let (Some((at, b)), false) = (flip, data.is_empty()) {
                let i = at.index(data.len());
                data[i] = b;
            }
            let in_place = classify_first_packet(&data, fin, &mut Vec::new(), max);
            let mut stream = Assembler::new(max);
            let overflow = stream.add(0, &data) == Feed::Overflow;
            let last = fin || overflow || stream.full();
            let held = classify_tcp(stream.prefix(), last, &mut Vec::new(), max);
            prop_assert_eq!(in_place, held);
        }

        #[test]
        fn classify_tcp_never_panics(b in proptest::collection::vec(any::<u8>(), 0..2000), last in any::<bool>()) {
            let _ = classify_tcp(&b, last, &mut Vec::new(), 4096);
        }
    }
}
