//! Resets for the TCP flows the proxy ends on its own — a live policy update
//! (`policy_updated`), a revocation (`revoked`), a key removed from the trust bundle
//! (`key_untrusted`): both ends learn of it at once, with a RST each accepts.
//!
//! **What it owns.** The table of *closing* flows (ended in conntrack, not yet reset both ways),
//! the probes sent to each end, and the RSTs built from their answers. Sans-IO: the engine
//! hands it the flows that end and the packets that miss conntrack; it produces [`Control`]
//! packets (to a node behind a GENEVE header, or to the internet from the flow's SNAT address)
//! that the daemon sends.
//!
//! **Why probes.** Receivers that follow RFC 5961 §3 (Linux, gVisor's netstack) accept a RST only
//! when its sequence number is exactly RCV.NXT; any other in the window is answered by a
//! challenge ACK, one outside it is ignored. The engine does not track sequence numbers, and an
//! established flow may be carried by the in-kernel fast path, which it never sees; a number
//! tracked from the packets it does see would be stale exactly for the long, busy flows. So it
//! asks each end: an ACK whose sequence number lies outside the receiver's window is answered by
//! a duplicate ACK (RFC 793 §3.9, RFC 5961 §5) that carries the answerer's SND.NXT (`seq`) and
//! RCV.NXT (`ack`). Each answer becomes exact RSTs:
//! - to its sender, `seq` = its `ack` (RFC 793 "Reset Generation", [`tcp_rst_into`]);
//! - to the other end, as the answerer, `seq` = its `seq`: that is the other end's RCV.NXT once
//!   nothing the answerer sent is still on its way (an idle flow, or one whose last segments
//!   arrived); when it is not, the other end answers that RST with a challenge ACK, which is an
//!   answer like any other and is reset exactly.
//!
//! Each end gets two probes at once whose sequence numbers are 2^31 apart: a receive window is
//! at most 2^30 bytes (RFC 7323 §2.3), so at least one lies outside it whatever RCV.NXT is; an
//! ACK inside the window changes nothing that matters on a connection about to be reset. An end
//! that has not answered after [`RETRY`] is probed again once (Linux answers at most one
//! out-of-window segment per socket per `tcp_invalid_ratelimit`, 500 ms by default).
//!
//! **Limits.** At most [`MAX_CLOSING`] flows close at once (beyond, a flow ends without RSTs, as
//! before this module: counted in [`ResetStats::skipped`]); an entry lives [`LINGER`], then a
//! segment of the flow is handled as any segment without a flow. At most [`MAX_PENDING`]
//! control packets wait for the daemon (beyond, counted in [`ResetStats::dropped`]). An end the
//! proxy cannot reach (tier 1 drops the sandbox's segments to a destination the update removed,
//! so the sandbox's answers never arrive) is reset from the other end's answer alone. A SYN
//! without ACK on a closing flow's tuple is a new connection: the entry goes and the segment is
//! decided as usual.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use snas_wire::build::{tcp_into, tcp_rst_into, TcpSpec};
use snas_wire::geneve::{write_geneve_header, InnerProto, SnasOption, GENEVE_HEADER_LEN};
use snas_wire::{IpPacket, L4Proto, TcpFlags, Transport};

use crate::clock::Nanos;
use crate::conntrack::{FlowInfo, FlowKey, ReplyKey};

/// Closing flows at once.
pub const MAX_CLOSING: usize = 16_384;
/// Control packets waiting for the daemon at once.
pub const MAX_PENDING: usize = 4 * MAX_CLOSING;
/// When an end that has not answered is probed again (above Linux's default
/// `tcp_invalid_ratelimit` of 500 ms).
pub const RETRY: Duration = Duration::from_millis(550);
/// How long a closing flow waits for answers.
pub const LINGER: Duration = Duration::from_secs(2);
/// The largest control packet: GENEVE header, IPv6 header, TCP header without options.
pub const CONTROL_MAX: usize = GENEVE_HEADER_LEN + 40 + 20;
/// How many segments of each end a closing flow answers (a RST each way per answer).
const MAX_ANSWERS: u8 = 4;
/// The distance between the two probes of an end (see the module docs).
const PROBE_SPREAD: u32 = 1 << 31;

/// Where a [`Control`] packet goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ControlTo {
    /// A UDP payload (GENEVE header + inner packet) for this node's GENEVE port.
    Node(Ipv4Addr),
    /// An IP packet for the internet side (the TUN device).
    Internet,
}

/// A segment the proxy sends of its own accord (a probe or a RST).
#[derive(Clone, Copy)]
pub struct Control {
    /// Where it goes.
    pub to: ControlTo,
    len: u8,
    bytes: [u8; CONTROL_MAX],
}

impl std::fmt::Debug for Control {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Control")
            .field("to", &self.to)
            .field("len", &self.len)
            .finish()
    }
}

impl Control {
    /// The packet (for [`ControlTo::Node`], the GENEVE header and the inner packet).
    pub fn bytes(&self) -> &[u8] {
        &self.bytes[..usize::from(self.len)]
    }

    /// The packet, writable (the TUN writer prepares checksum offload in place).
    pub fn bytes_mut(&mut self) -> &mut [u8] {
        &mut self.bytes[..usize::from(self.len)]
    }

    /// The inner IP packet (without the GENEVE header of a node-bound packet).
    pub fn inner(&self) -> &[u8] {
        match self.to {
            ControlTo::Node(_) => &self.bytes()[GENEVE_HEADER_LEN..],
            ControlTo::Internet => self.bytes(),
        }
    }
}

/// Counters of the resets.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ResetStats {
    /// Flows that started closing.
    pub flows: u64,
    /// Probes sent (both ends).
    pub probes: u64,
    /// RSTs sent to sandboxes.
    pub resets_to_job: u64,
    /// RSTs sent to remotes.
    pub resets_to_remote: u64,
    /// Ends that never answered within [`LINGER`].
    pub unanswered: u64,
    /// Flows that ended without RSTs: the table was full.
    pub skipped: u64,
    /// Control packets dropped: the queue was full.
    pub dropped: u64,
}

/// How the sandbox end of a closing flow is reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JobPath {
    /// The job's node.
    pub node: Ipv4Addr,
    /// The overlay option its packets carry.
    pub option: SnasOption,
    /// The inner protocol of the overlay.
    pub inner: InnerProto,
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    path: JobPath,
    egress: SocketAddr,
    started: Nanos,
    retried: bool,
    job_answers: u8,
    remote_answers: u8,
}

impl Entry {
    fn remote(key: &FlowKey) -> SocketAddr {
        SocketAddr::new(key.dst_ip, key.dst_port)
    }
    fn sandbox(key: &FlowKey) -> SocketAddr {
        SocketAddr::new(key.src_ip, key.src_port)
    }
}

/// What a segment of a closing flow is to the engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Intercept {
    /// Not a closing flow's (or a new connection on its tuple): decide it as usual.
    NotClosing,
    /// A closing flow's: not forwarded (answered already if it deserved an answer).
    Consumed,
    /// A closing flow's segment from the sandbox that deserves a RST back (the engine's
    /// refusal, RFC 793 "Reset Generation", through this path); the RST to the remote is queued.
    ResetJob(JobPath),
}

/// The closing flows (see the module docs).
#[derive(Debug, Default)]
pub struct Closings {
    flows: HashMap<FlowKey, Entry>,
    by_reply: HashMap<ReplyKey, FlowKey>,
    out: Vec<Control>,
    stats: ResetStats,
}

/// The TCP fields of `packet` that matter here (`None`: not TCP or malformed).
fn tcp_fields(packet: &[u8]) -> Option<(u32, u32, TcpFlags)> {
    let ip = IpPacket::parse(packet).ok()?;
    match ip.transport().ok()? {
        Transport::Tcp(t) => Some((t.seq(), t.ack(), t.flags())),
        _ => None,
    }
}

fn reply_key(key: &FlowKey, egress: SocketAddr) -> ReplyKey {
    ReplyKey {
        proto: key.proto,
        remote_ip: key.dst_ip,
        remote_port: key.dst_port,
        egress_ip: egress.ip(),
        egress_port: egress.port(),
    }
}

impl Closings {
    /// Whether no flow is closing (the engine skips the lookups).
    pub fn is_empty(&self) -> bool {
        self.flows.is_empty()
    }

    /// Closing flows now.
    pub fn len(&self) -> usize {
        self.flows.len()
    }

    /// Counters so far.
    pub fn stats(&self) -> ResetStats {
        self.stats
    }

    /// Whether control packets wait.
    pub fn has_control(&self) -> bool {
        !self.out.is_empty()
    }

    /// Moves up to `limit` waiting control packets into `out`, oldest first; returns how many.
    pub fn take_control(&mut self, out: &mut Vec<Control>, limit: usize) -> usize {
        let n = limit.min(self.out.len());
        out.extend(self.out.drain(..n));
        n
    }

    /// Flow `f` just ended (removed from conntrack): if it is TCP, it starts closing and both
    /// ends are probed. UDP and ICMP flows just end (nothing to reset).
    pub fn start(&mut self, f: &FlowInfo, path: JobPath, now: Nanos) {
        if f.key.proto != L4Proto::Tcp {
            return;
        }
        if self.flows.len() >= MAX_CLOSING && !self.flows.contains_key(&f.key) {
            self.stats.skipped += 1;
            return;
        }
        let egress = SocketAddr::new(f.egress_ip, f.egress_port);
        let e = Entry {
            path,
            egress,
            started: now,
            retried: false,
            job_answers: 0,
            remote_answers: 0,
        };
        if let Some(old) = self.flows.insert(f.key, e) {
            self.by_reply.remove(&reply_key(&f.key, old.egress));
        }
        self.by_reply.insert(reply_key(&f.key, egress), f.key);
        self.stats.flows += 1;
        // Any number will do (see the module docs); the clock's low bits vary it per flow.
        let seq = now.as_nanos() as u32;
        self.probe(&f.key, &e, seq, true, true);
    }

    fn probe(&mut self, key: &FlowKey, e: &Entry, seq: u32, job: bool, remote: bool) {
        for s in [seq, seq.wrapping_add(PROBE_SPREAD)] {
            if remote {
                let spec = ack_spec(e.egress, Entry::remote(key), s);
                self.push_internet(&spec, false);
            }
            if job {
                let spec = ack_spec(Entry::remote(key), Entry::sandbox(key), s);
                self.push_node(e.path, &spec, false);
            }
        }
    }

    fn push(&mut self, c: Control) -> bool {
        if self.out.len() >= MAX_PENDING {
            self.stats.dropped += 1;
            return false;
        }
        self.out.push(c);
        true
    }

    fn count(&mut self, rst: Option<bool>) {
        match rst {
            None => self.stats.probes += 1,
            Some(true) => self.stats.resets_to_job += 1,
            Some(false) => self.stats.resets_to_remote += 1,
        }
    }

    fn push_internet(&mut self, spec: &TcpSpec<'_>, rst: bool) {
        let mut c = Control {
            to: ControlTo::Internet,
            len: 0,
            bytes: [0; CONTROL_MAX],
        };
        let Ok(n) = tcp_into(&mut c.bytes, spec) else {
            return;
        };
        c.len = n as u8;
        if self.push(c) {
            self.count(rst.then_some(false));
        }
    }

    fn push_node(&mut self, path: JobPath, spec: &TcpSpec<'_>, rst: bool) {
        let mut c = Control {
            to: ControlTo::Node(path.node),
            len: 0,
            bytes: [0; CONTROL_MAX],
        };
        let (head, body) = c.bytes.split_at_mut(GENEVE_HEADER_LEN);
        let Ok(n) = tcp_into(body, spec) else {
            return;
        };
        if write_geneve_header(head, &path.option, path.inner).is_err() {
            return;
        }
        c.len = (GENEVE_HEADER_LEN + n) as u8;
        if self.push(c) {
            self.count(rst.then_some(true));
        }
    }

    /// A segment from the sandbox (inner packet `inner`, from `node`) whose flow key is `key`.
    pub fn from_job(&mut self, node: Ipv4Addr, key: &FlowKey, inner: &[u8]) -> Intercept {
        let Some(e) = self.flows.get(key).copied() else {
            return Intercept::NotClosing;
        };
        if e.path.node != node {
            return Intercept::NotClosing;
        }
        let Some((seq, _, flags)) = tcp_fields(inner) else {
            return Intercept::NotClosing;
        };
        if flags.contains(TcpFlags::SYN) && !flags.contains(TcpFlags::ACK) {
            self.forget(key);
            return Intercept::NotClosing;
        }
        if flags.contains(TcpFlags::RST) || e.job_answers >= MAX_ANSWERS {
            return Intercept::Consumed;
        }
        if let Some(x) = self.flows.get_mut(key) {
            x.job_answers += 1;
        }
        // To the remote, as the sandbox: seq = the sandbox's SND.NXT.
        let spec = rst_spec(e.egress, Entry::remote(key), seq);
        self.push_internet(&spec, true);
        // To the sandbox (seq = its RCV.NXT, its SEG.ACK): the engine's refusal.
        self.stats.resets_to_job += 1;
        Intercept::ResetJob(e.path)
    }

    /// A segment from the internet (IP packet `packet`) whose reply key is `rkey`.
    pub fn from_remote(&mut self, rkey: &ReplyKey, packet: &[u8]) -> Intercept {
        let Some(key) = self.by_reply.get(rkey).copied() else {
            return Intercept::NotClosing;
        };
        let Some(e) = self.flows.get(&key).copied() else {
            return Intercept::NotClosing;
        };
        let Some((seq, _, flags)) = tcp_fields(packet) else {
            return Intercept::NotClosing;
        };
        if flags.contains(TcpFlags::RST) || e.remote_answers >= MAX_ANSWERS {
            return Intercept::Consumed;
        }
        if let Some(x) = self.flows.get_mut(&key) {
            x.remote_answers += 1;
        }
        // To the remote: seq = its RCV.NXT (its SEG.ACK); the builder swaps the addresses, so
        // it leaves from the flow's SNAT address.
        let mut c = Control {
            to: ControlTo::Internet,
            len: 0,
            bytes: [0; CONTROL_MAX],
        };
        if let Ok(n) = tcp_rst_into(&mut c.bytes, packet) {
            c.len = n as u8;
            if self.push(c) {
                self.count(Some(false));
            }
        }
        // To the sandbox, as the remote: seq = the remote's SND.NXT.
        let spec = rst_spec(Entry::remote(&key), Entry::sandbox(&key), seq);
        self.push_node(e.path, &spec, true);
        Intercept::Consumed
    }

    fn forget(&mut self, key: &FlowKey) {
        if let Some(e) = self.flows.remove(key) {
            self.by_reply.remove(&reply_key(key, e.egress));
        }
    }

    /// Housekeeping: probes again the ends that have not answered after [`RETRY`]; forgets the
    /// flows that closed [`LINGER`] ago.
    pub fn tick(&mut self, now: Nanos) {
        if self.flows.is_empty() {
            return;
        }
        let mut retry = Vec::new();
        let mut gone = Vec::new();
        for (k, e) in &mut self.flows {
            let age = now.saturating_duration_since(e.started);
            if age >= LINGER {
                gone.push(*k);
            } else if age >= RETRY && !e.retried {
                e.retried = true;
                retry.push((*k, *e));
            }
        }
        for (k, e) in retry {
            let seq = (now.as_nanos() as u32) ^ 0x5a5a_5a5a;
            self.probe(&k, &e, seq, e.job_answers == 0, e.remote_answers == 0);
        }
        for k in gone {
            if let Some(e) = self.flows.get(&k) {
                self.stats.unanswered +=
                    u64::from(e.job_answers == 0) + u64::from(e.remote_answers == 0);
            }
            self.forget(&k);
        }
    }
}

/// An ACK probe from `src` to `dst` at sequence number `seq` (see the module docs).
fn ack_spec(src: SocketAddr, dst: SocketAddr, seq: u32) -> TcpSpec<'static> {
    TcpSpec {
        src,
        dst,
        seq,
        ack: seq,
        flags: TcpFlags::ACK,
        window: 0,
        payload: &[],
    }
}

/// A RST from `src` to `dst` at sequence number `seq`.
fn rst_spec(src: SocketAddr, dst: SocketAddr, seq: u32) -> TcpSpec<'static> {
    TcpSpec {
        src,
        dst,
        seq,
        ack: 0,
        flags: TcpFlags::RST,
        window: 0,
        payload: &[],
    }
}

/// The job's overlay path for an address family.
pub fn inner_proto(v6: bool, sandbox: IpAddr) -> InnerProto {
    if v6 || sandbox.is_ipv6() {
        InnerProto::Ipv6
    } else {
        InnerProto::Ipv4
    }
}
