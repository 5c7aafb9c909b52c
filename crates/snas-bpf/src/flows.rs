//! Flow states of tier 1's flow table and how long each may stay idle.
//!
//! Owns: the reading of a flow entry's state bits (`FLOW_F_*` in `bpf/lib/maps.h`, set by
//! `bpf/lib/conntrack.h` from both directions) as a [`FlowState`], the idle timeouts of
//! [`FlowTimeouts`] (defaults equal to tier 2's conntrack, `snas_proxy::conntrack::Timeouts`,
//! so both tiers forget a flow at about the same time), and the ageing decision of one entry.
//! Pure: the ageing pass itself ([`crate::Tier1::age_flows`]) does the map I/O.
//!
//! Invariant: only entries that are open (not closed) and were admitted before the pass read
//! the job's counter are counted (see `conntrack.h`); a count that is too low only lets the job
//! open a few connections more until the next pass (tier 2 is exact), a count that is too high
//! would lock it out, so every race resolves downward.
#![forbid(unsafe_code)]

use std::time::Duration;

/// `FLOW_F_REPLIED` in maps.h.
pub(crate) const FLOW_F_REPLIED: u32 = 1;
/// `FLOW_F_FIN_OUT`.
pub(crate) const FLOW_F_FIN_OUT: u32 = 2;
/// `FLOW_F_FIN_IN`.
pub(crate) const FLOW_F_FIN_IN: u32 = 4;
/// `FLOW_F_RST` (implied by CLOSED for the ageing pass).
#[cfg(test)]
pub(crate) const FLOW_F_RST: u32 = 8;
/// `FLOW_F_CLOSED`: FIN both ways or a RST; the job's slot was given back.
pub(crate) const FLOW_F_CLOSED: u32 = 16;

const IPPROTO_TCP: u8 = 6;

/// What tier 1 knows about a flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FlowState {
    /// TCP, nothing came back yet (a SYN, or a packet of a flow tier 1 picked up midway).
    TcpSynSent,
    /// TCP with replies, no FIN yet.
    TcpEstablished,
    /// TCP with a FIN in one direction.
    TcpClosing,
    /// TCP after FINs both ways or a RST (the slot is free; the entry lingers).
    TcpClosed,
    /// UDP with no reply seen.
    UdpUnreplied,
    /// UDP with replies.
    UdpReplied,
}

impl FlowState {
    /// The state of an entry of protocol `proto` with state bits `flags`.
    pub(crate) fn of(proto: u8, flags: u32) -> FlowState {
        if proto != IPPROTO_TCP {
            return if flags & FLOW_F_REPLIED != 0 {
                FlowState::UdpReplied
            } else {
                FlowState::UdpUnreplied
            };
        }
        if flags & FLOW_F_CLOSED != 0 {
            FlowState::TcpClosed
        } else if flags & (FLOW_F_FIN_OUT | FLOW_F_FIN_IN) != 0 {
            FlowState::TcpClosing
        } else if flags & FLOW_F_REPLIED != 0 {
            FlowState::TcpEstablished
        } else {
            FlowState::TcpSynSent
        }
    }

    /// Whether the flow holds one of its job's `max_connections` slots.
    pub fn is_open(self) -> bool {
        self != FlowState::TcpClosed
    }
}

/// Idle time after which the ageing pass removes a flow entry, by state. The defaults are
/// tier 2's conntrack defaults.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlowTimeouts {
    /// TCP before any reply (default 30 s).
    pub tcp_syn_sent: Duration,
    /// TCP established (default 1 h).
    pub tcp_established: Duration,
    /// TCP after a FIN in one direction (default 60 s).
    pub tcp_closing: Duration,
    /// TCP after FINs both ways or a RST: how long late ACKs and FIN retransmits still pass
    /// without admission (default 30 s).
    pub tcp_closed: Duration,
    /// UDP with no reply seen (default 30 s).
    pub udp_unreplied: Duration,
    /// UDP with replies (default 120 s).
    pub udp_replied: Duration,
}

impl Default for FlowTimeouts {
    fn default() -> Self {
        FlowTimeouts {
            tcp_syn_sent: Duration::from_secs(30),
            tcp_established: Duration::from_secs(3600),
            tcp_closing: Duration::from_secs(60),
            tcp_closed: Duration::from_secs(30),
            udp_unreplied: Duration::from_secs(30),
            udp_replied: Duration::from_secs(120),
        }
    }
}

impl FlowTimeouts {
    /// The idle timeout of a flow in `state`.
    pub fn of(&self, state: FlowState) -> Duration {
        match state {
            FlowState::TcpSynSent => self.tcp_syn_sent,
            FlowState::TcpEstablished => self.tcp_established,
            FlowState::TcpClosing => self.tcp_closing,
            FlowState::TcpClosed => self.tcp_closed,
            FlowState::UdpUnreplied => self.udp_unreplied,
            FlowState::UdpReplied => self.udp_replied,
        }
    }
}

/// What the ageing pass does with one entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Ageing {
    /// Idle beyond its state's timeout: delete it.
    Remove,
    /// Keep; it counts as one of its job's open connections.
    KeepOpen,
    /// Keep without counting it (closed, or admitted after the pass read the counter: that
    /// admission is in the counter's later movement already).
    Keep,
}

/// The decision for an entry of protocol `proto` with state bits `flags`, last seen at
/// `last_seen_ns` and admitted at `admitted_ns` (CLOCK_MONOTONIC), in a pass that started at
/// `now_ns` and counts admissions before `count_before_ns`.
pub(crate) fn age_entry(
    timeouts: &FlowTimeouts,
    proto: u8,
    flags: u32,
    last_seen_ns: u64,
    admitted_ns: u64,
    now_ns: u64,
    count_before_ns: u64,
) -> Ageing {
    let state = FlowState::of(proto, flags);
    let idle = Duration::from_nanos(now_ns.saturating_sub(last_seen_ns));
    if idle > timeouts.of(state) {
        Ageing::Remove
    } else if state.is_open() && admitted_ns < count_before_ns {
        Ageing::KeepOpen
    } else {
        Ageing::Keep
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const UDP: u8 = 17;
    const S: u64 = 1_000_000_000;

    #[test]
    fn state_bits_equal_the_c_header() {
        let maps_h = include_str!("../bpf/lib/maps.h");
        for (name, v) in [
            ("FLOW_F_REPLIED", FLOW_F_REPLIED),
            ("FLOW_F_FIN_OUT", FLOW_F_FIN_OUT),
            ("FLOW_F_FIN_IN", FLOW_F_FIN_IN),
            ("FLOW_F_RST", FLOW_F_RST),
            ("FLOW_F_CLOSED", FLOW_F_CLOSED),
        ] {
            let line = maps_h
                .lines()
                .find(|l| l.starts_with(&format!("#define {name} ")))
                .unwrap_or_else(|| panic!("{name} in maps.h"));
            let c: u32 = line
                .split_whitespace()
                .nth(2)
                .and_then(|x| x.parse().ok())
                .unwrap_or_else(|| panic!("value of {name}"));
            assert_eq!(c, v, "{name}");
        }
    }

    #[test]
    fn states_follow_the_bits_both_directions_set() {
        assert_eq!(FlowState::of(IPPROTO_TCP, 0), FlowState::TcpSynSent);
        assert_eq!(
            FlowState::of(IPPROTO_TCP, FLOW_F_REPLIED),
            FlowState::TcpEstablished
        );
        assert_eq!(
            FlowState::of(IPPROTO_TCP, FLOW_F_REPLIED | FLOW_F_FIN_OUT),
            FlowState::TcpClosing
        );
        assert_eq!(
            FlowState::of(IPPROTO_TCP, FLOW_F_FIN_IN),
            FlowState::TcpClosing
        );
        assert_eq!(
            FlowState::of(IPPROTO_TCP, FLOW_F_RST | FLOW_F_CLOSED),
            FlowState::TcpClosed
        );
        assert_eq!(FlowState::of(UDP, 0), FlowState::UdpUnreplied);
        assert_eq!(FlowState::of(UDP, FLOW_F_REPLIED), FlowState::UdpReplied);
        assert!(!FlowState::TcpClosed.is_open());
        assert!(FlowState::TcpClosing.is_open());
    }

    #[test]
    fn defaults_equal_tier_2s_conntrack() {
        let t = FlowTimeouts::default();
        assert_eq!(t.of(FlowState::TcpSynSent), Duration::from_secs(30));
        assert_eq!(t.of(FlowState::TcpEstablished), Duration::from_secs(3600));
        assert_eq!(t.of(FlowState::TcpClosing), Duration::from_secs(60));
        assert_eq!(t.of(FlowState::TcpClosed), Duration::from_secs(30));
        assert_eq!(t.of(FlowState::UdpUnreplied), Duration::from_secs(30));
        assert_eq!(t.of(FlowState::UdpReplied), Duration::from_secs(120));
    }

    #[test]
    fn an_entry_is_removed_only_beyond_its_states_idle_time() {
        let t = FlowTimeouts::default();
        let now = 10_000 * S;
        let age = |proto, flags, idle_s| age_entry(&t, proto, flags, now - idle_s * S, 0, now, now);
        assert_eq!(age(IPPROTO_TCP, 0, 30), Ageing::KeepOpen);
        assert_eq!(age(IPPROTO_TCP, 0, 31), Ageing::Remove, "unanswered SYN");
        assert_eq!(age(IPPROTO_TCP, FLOW_F_REPLIED, 3599), Ageing::KeepOpen);
        assert_eq!(age(IPPROTO_TCP, FLOW_F_REPLIED, 3601), Ageing::Remove);
        assert_eq!(age(IPPROTO_TCP, FLOW_F_FIN_OUT, 59), Ageing::KeepOpen);
        assert_eq!(age(IPPROTO_TCP, FLOW_F_FIN_OUT, 61), Ageing::Remove);
        assert_eq!(
            age(IPPROTO_TCP, FLOW_F_CLOSED, 29),
            Ageing::Keep,
            "closed lingers"
        );
        assert_eq!(age(IPPROTO_TCP, FLOW_F_CLOSED, 31), Ageing::Remove);
        assert_eq!(age(UDP, 0, 31), Ageing::Remove);
        assert_eq!(age(UDP, FLOW_F_REPLIED, 119), Ageing::KeepOpen);
        assert_eq!(age(UDP, FLOW_F_REPLIED, 121), Ageing::Remove);
    }

    #[test]
    fn admissions_after_the_counter_was_read_are_left_to_the_counter() {
        let t = FlowTimeouts::default();
        let now = 10_000 * S;
        assert_eq!(
            age_entry(&t, IPPROTO_TCP, 0, now, now - 1, now, now - 1),
            Ageing::Keep
        );
        assert_eq!(
            age_entry(&t, IPPROTO_TCP, 0, now, now - 2, now, now - 1),
            Ageing::KeepOpen
        );
    }

    #[test]
    fn a_last_seen_in_the_future_is_not_idle() {
        let t = FlowTimeouts::default();
        assert_eq!(
            age_entry(&t, IPPROTO_TCP, 0, 5 * S, 0, 4 * S, 4 * S),
            Ageing::KeepOpen
        );
    }
}
