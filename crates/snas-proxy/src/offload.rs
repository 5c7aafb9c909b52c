//! Which flows the engine hands to the in-kernel fast path, and the events that say so
//! (sans-IO: the daemon mirrors the events into the BPF maps, `crate::fast_path`).
//!
//! # What it owns
//! - [`FastFlow`]: everything the fast path needs to carry one flow both ways — its keys, the
//!   NAT tuple, the job's node and GENEVE identity, the policy's expiry and the four rates of
//!   the pacer clocks it must respect.
//! - [`OffloadEvent`]: `Install` (also a re-install with a new serial or rates) and `Remove`.
//! - [`Offloads`]: the set of installed flows and the queue of events, owned by
//!   [`crate::tier2::Tier2`] (which decides; see `Tier2::offload_eligible`).
//!
//! # Invariants
//! - A flow is installed only while the engine holds it (a live conntrack entry): every path
//!   that removes a flow from the conntrack (expiry, job end, policy expiry or loss) queues its
//!   `Remove` in the same call, so the daemon deletes the entry before the flow's NAT port can
//!   leave quarantine and be reused.
//! - A flow leaves the fast path when its state leaves "established" (FIN or RST seen — the
//!   fast path never carries those) before the packet that changed it is forwarded.
//! - Nothing is queued while offload is disabled (the daemon has no fast path).
//! - A flow is installed only once it has carried [`Offloads::set_min_packets`] packets
//!   through the engine after its first client payload (the proxy uses
//!   [`FAST_AFTER_PACKETS`]): short connections never touch the maps. The count restarts
//!   with each connection on a reused 5-tuple.
//!
//! # Limits
//! - IPv4 TCP and UDP flows only (the fast path's programs parse nothing else).

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr};

use snas_wire::{L4Proto, PolicySerial, TenantId};

use crate::conntrack::{FlowCounters, FlowId, FlowKey, FlowState};
use crate::pacer::PaceRate;

/// The rates of the four pacer clocks a fast flow's packets are charged to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FastRates {
    /// The job's `egress_bps`.
    pub job_egress: PaceRate,
    /// The job's `ingress_bps`.
    pub job_ingress: PaceRate,
    /// The tenant's egress cap.
    pub tenant_egress: PaceRate,
    /// The tenant's ingress cap.
    pub tenant_ingress: PaceRate,
}

/// A flow for the fast path (IPv4 TCP or UDP).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FastFlow {
    /// The flow's forward key (job, protocol, sandbox, remote).
    pub key: FlowKey,
    /// The job's tenant (the GENEVE option must name it).
    pub tenant: TenantId,
    /// The policy serial the option must carry.
    pub serial: PolicySerial,
    /// The job's node (where replies go).
    pub node: Ipv4Addr,
    /// SNAT address.
    pub egress_ip: Ipv4Addr,
    /// SNAT port.
    pub egress_port: u16,
    /// The policy's `exp` (Unix seconds): from then on packets take the userspace path.
    pub expires_unix: u64,
    /// The pacer clocks' rates.
    pub rates: FastRates,
}

/// What the daemon must do to the fast path's maps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OffloadEvent {
    /// Install the flow (replacing an entry with an older serial or other rates).
    Install(FastFlow),
    /// Remove the flow's entries (the flow as it was installed).
    Remove(FastFlow),
}

/// Installed flows and pending events. See the module documentation.
#[derive(Debug, Default)]
pub struct Offloads {
    enabled: bool,
    /// Packets (both ways) a flow must have carried through the engine before it may be
    /// installed ([`Offloads::set_min_packets`]).
    min_packets: u64,
    /// Flows whose first client payload has passed the engine, with their packet count (both
    /// ways) at that packet: the threshold counts from there (a download's later client
    /// packets are bare ACKs: the flow is installed at one of those).
    payload_seen: HashMap<FlowId, u64>,
    prune_at: usize,
    installed: HashMap<FlowKey, FastFlow>,
    events: Vec<OffloadEvent>,
}

impl Offloads {
    /// Whether flows are offloaded at all.
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// Turns offload on or off; turning it off removes every installed flow.
    pub fn set_enabled(&mut self, on: bool) {
        self.enabled = on;
        if !on {
            self.payload_seen = HashMap::new();
            for (_, f) in self.installed.drain() {
                self.events.push(OffloadEvent::Remove(f));
            }
        }
    }

    /// A flow becomes eligible only once it has carried `n` packets (either way) through the
    /// engine after its first client payload: a short connection then costs the fast path's
    /// maps nothing (see [`FAST_AFTER_PACKETS`]). 0: at its first client payload.
    pub fn set_min_packets(&mut self, n: u64) {
        self.min_packets = n;
    }

    /// Whether flow `id`, whose counters are `c`, has carried the threshold's packets since its
    /// first client payload. A packet that carries client payload (`client_payload`) starts the
    /// count when none runs for `id`; `live` says which remembered handles are still live
    /// flows (handles are pruned when the set has doubled since its last pruning: amortised
    /// O(1), and at most twice the live flows being counted are remembered).
    pub fn proven(
        &mut self,
        id: FlowId,
        c: &FlowCounters,
        client_payload: bool,
        live: impl Fn(FlowId) -> bool,
    ) -> bool {
        if self.min_packets == 0 {
            return true;
        }
        let total = u64::from(c.packets_out) + u64::from(c.packets_in);
        if let Some(&base) = self.payload_seen.get(&id) {
            return total.saturating_sub(base) >= self.min_packets;
        }
        if self.enabled && client_payload {
            self.payload_seen.insert(id, total);
            if self.payload_seen.len() >= self.prune_at.max(PRUNE_MIN) {
                self.payload_seen.retain(|&x, _| live(x));
                self.prune_at = self.payload_seen.len() * 2;
            }
        }
        false
    }

    /// Whether a count runs for `id` (its first client payload has passed the engine).
    pub fn payload_seen(&self, id: FlowId) -> bool {
        !self.payload_seen.is_empty() && self.payload_seen.contains_key(&id)
    }

    /// Ends the count of `id` (installed, or its connection is closing: a new connection on
    /// the same 5-tuple starts from its own first payload).
    pub fn forget_payload(&mut self, id: FlowId) {
        if !self.payload_seen.is_empty() {
            self.payload_seen.remove(&id);
        }
    }

    /// Flows being counted (live or not yet pruned).
    pub fn payload_seen_len(&self) -> usize {
        self.payload_seen.len()
    }

    /// The installed flow of `key`, if any.
    pub fn get(&self, key: &FlowKey) -> Option<&FastFlow> {
        if self.installed.is_empty() {
            return None;
        }
        self.installed.get(key)
    }

    /// Number of installed flows.
    pub fn len(&self) -> usize {
        self.installed.len()
    }

    /// Whether no flow is installed.
    pub fn is_empty(&self) -> bool {
        self.installed.is_empty()
    }

    /// Installs `f` unless it is installed exactly so already.
    pub fn install(&mut self, f: FastFlow) {
        if !self.enabled || self.installed.get(&f.key) == Some(&f) {
            return;
        }
        self.installed.insert(f.key, f);
        self.events.push(OffloadEvent::Install(f));
    }

    /// Removes the flow of `key` if it is installed.
    pub fn remove(&mut self, key: &FlowKey) {
        if self.installed.is_empty() {
            return;
        }
        if let Some(f) = self.installed.remove(key) {
            self.events.push(OffloadEvent::Remove(f));
        }
    }

    /// Takes the pending events, oldest first.
    pub fn drain(&mut self) -> std::vec::Drain<'_, OffloadEvent> {
        self.events.drain(..)
    }

    /// Whether events are pending.
    pub fn has_events(&self) -> bool {
        !self.events.is_empty()
    }
}

/// The proxy's threshold for [`Offloads::set_min_packets`]: a flow goes to the fast path
/// after 16 packets (either way) through the engine following its first client payload.
/// Installing and removing a flow costs about a dozen map system calls (flow entries,
/// counters, the job's and tenant's clocks) on the packets' own path, which a
/// connect-request-close connection (about 5 packets from its request on) would pay in full
/// and gain nothing from; a bulk transfer passes 16 packets within its first round trips, and
/// a request/response connection within its first 8 exchanges. Measured in docs/benchmarks.md ("TCP_CRR and
/// the fast path").
pub const FAST_AFTER_PACKETS: u64 = 16;

/// [`Offloads::note_payload`] prunes its set no earlier than at this size.
const PRUNE_MIN: usize = 1024;

/// Jobs limited at or below this (either way) are never offloaded: their pacing stays in the
/// userspace pacer, which delays packets (the fast path can only divert them). A job whose
/// limit binds on the fast path does not get its limit: measured at exactly 1 Gbit/s, offloaded
/// (the fast path's clocks, then the pacer once they bound), 0.86-0.96 of the limit in every
/// run, with the clocks' hysteresis (`fast_path::BOUND_HOLD`) and with the programs charging
/// every packet of a fast flow atomically; the same job on the userspace pacer alone,
/// 0.98-1.00 (docs/benchmarks.md, "Issue 15: a limit that binds"). Below, uploads under 10 and
/// 100 Mbit/s limits collapsed to 0.14-0.45 of the limit in some repetitions when offloaded.
/// The cause is not found; a job limited above this still meets it when its limit binds.
pub const MIN_FAST_RATE_BPS: u64 = 1_000_000_000;

/// Whether a job with these limits may have fast flows: both above [`MIN_FAST_RATE_BPS`].
pub fn fast_rates(egress: snas_wire::Bps, ingress: snas_wire::Bps) -> bool {
    egress.get() > MIN_FAST_RATE_BPS && ingress.get() > MIN_FAST_RATE_BPS
}

/// Whether a conntrack state is one the fast path may carry: established TCP (handshake
/// answered, no FIN or RST yet) or UDP with replies.
pub fn fast_state(s: FlowState) -> bool {
    matches!(s, FlowState::TcpEstablished | FlowState::UdpReplied)
}

/// Whether `key` names a flow the fast path can parse (IPv4 TCP or UDP).
pub fn fast_shape(key: &FlowKey) -> bool {
    matches!(key.proto, L4Proto::Tcp | L4Proto::Udp)
        && matches!((key.src_ip, key.dst_ip), (IpAddr::V4(_), IpAddr::V4(_)))
}

/// Whether the inner IPv4 packet `ip` (TCP or UDP) carries payload: the client's data, as
/// opposed to a bare ACK. Anything that does not parse carries none.
pub fn carries_payload(ip: &[u8]) -> bool {
    let Some(&vihl) = ip.first() else {
        return false;
    };
    if vihl >> 4 != 4 || ip.len() < 20 {
        return false;
    }
    let ihl = usize::from(vihl & 0x0f) * 4;
    let total = usize::from(u16::from_be_bytes([ip[2], ip[3]])).min(ip.len());
    let l4 = match ip.get(ihl..total) {
        Some(l4) => l4,
        None => return false,
    };
    match ip[9] {
        6 => l4
            .get(12)
            .is_some_and(|&off| l4.len() > usize::from(off >> 4) * 4),
        17 => l4.len() > 8,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use snas_wire::JobKey;

    fn key(port: u16) -> FlowKey {
        FlowKey {
            job: JobKey(7),
            proto: L4Proto::Tcp,
            src_ip: IpAddr::V4(Ipv4Addr::new(10, 255, 1, 2)),
            src_port: port,
            dst_ip: IpAddr::V4(Ipv4Addr::new(203, 0, 113, 10)),
            dst_port: 443,
        }
    }

    fn flow(port: u16, serial: u32) -> FastFlow {
        FastFlow {
            key: key(port),
            tenant: TenantId(1),
            serial: PolicySerial(serial),
            node: Ipv4Addr::new(192, 0, 2, 11),
            egress_ip: Ipv4Addr::new(198, 51, 100, 70),
            egress_port: 30000 + port,
            expires_unix: 2_000_000_000,
            rates: FastRates {
                job_egress: PaceRate::mbit(100),
                job_ingress: PaceRate::mbit(100),
                tenant_egress: PaceRate::Unlimited,
                tenant_ingress: PaceRate::Unlimited,
            },
        }
    }

    #[test]
    fn nothing_is_queued_while_disabled() {
        let mut o = Offloads::default();
        o.install(flow(1, 1));
        assert!(o.is_empty());
        assert!(!o.has_events());
    }

    #[test]
    fn an_install_is_queued_once_and_a_new_serial_installs_again() {
        let mut o = Offloads::default();
        o.set_enabled(true);
        o.install(flow(1, 1));
        o.install(flow(1, 1));
        o.install(flow(1, 2));
        let ev: Vec<_> = o.drain().collect();
        assert_eq!(
            ev,
            vec![
                OffloadEvent::Install(flow(1, 1)),
                OffloadEvent::Install(flow(1, 2))
            ]
        );
    }

    #[test]
    fn disabling_removes_every_installed_flow() {
        let mut o = Offloads::default();
        o.set_enabled(true);
        for p in 0..1000 {
            o.install(flow(p, 1));
        }
        o.drain().for_each(drop);
        o.set_enabled(false);
        let removed = o
            .drain()
            .filter(|e| matches!(e, OffloadEvent::Remove(_)))
            .count();
        assert_eq!(removed, 1000);
        assert!(o.is_empty());
    }

    #[test]
    fn only_established_tcp_and_answered_udp_are_fast_states() {
        use FlowState::*;
        for s in [
            TcpSynSent,
            TcpEstablished,
            TcpClosing,
            TcpClosed,
            UdpUnreplied,
            UdpReplied,
            Icmp,
        ] {
            assert_eq!(fast_state(s), matches!(s, TcpEstablished | UdpReplied));
        }
    }

    fn tcp(payload: usize, doff: u8) -> Vec<u8> {
        let thl = usize::from(doff) * 4;
        let mut p = vec![0u8; 20 + thl + payload];
        p[0] = 0x45;
        let tot = u16::try_from(p.len()).unwrap();
        p[2..4].copy_from_slice(&tot.to_be_bytes());
        p[9] = 6;
        p[20 + 12] = doff << 4;
        p
    }

    #[test]
    fn a_bare_ack_carries_no_payload_and_data_does() {
        assert!(!carries_payload(&tcp(0, 5)));
        assert!(!carries_payload(&tcp(0, 8)), "options are not payload");
        assert!(carries_payload(&tcp(1, 5)));
        assert!(carries_payload(&tcp(1, 8)));
    }

    proptest! {
        #[test]
        fn any_bytes_are_judged_without_panicking(b in proptest::collection::vec(any::<u8>(), 0..128)) {
            let _ = carries_payload(&b);
        }

        #[test]
        fn tcp_payload_is_what_follows_the_header(payload in 0usize..1500, doff in 5u8..=15) {
            prop_assert_eq!(carries_payload(&tcp(payload, doff)), payload > 0);
        }
    }
}
