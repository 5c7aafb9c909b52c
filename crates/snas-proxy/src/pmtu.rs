//! Path MTUs the internet reported for destinations, so that the proxy segments a job's TCP
//! super-packets to fit the path (path-MTU discovery through the proxy).
//!
//! # Why the proxy needs its own
//! Tier 1 carries a job's TCP super-packet whole and the proxy writes it to the TUN device for
//! its kernel to segment (`vnet::prepare_to_kernel`). The job's segment size does not survive
//! the overlay (a UDP socket reports no `gso_size` for a UDP-tunnelled super-packet), so the
//! proxy segments at its TUN MTU. When a hop beyond the proxy is narrower, the hop answers
//! "fragmentation needed" / "packet too big"; tier 2 translates the error to the job (which
//! lowers its MSS) — and must itself stop sending segments that cannot pass, or every
//! super-packet is refused again however small the job's segments became. This module is the
//! proxy's counterpart of the kernel's per-destination PMTU exceptions (RFC 1191, RFC 8201).
//!
//! # What it owns
//! A bounded map destination → (MTU, expiry). Pure: the caller passes the time.
//!
//! # Invariants
//! - Only errors that quote a live flow of a job get here (the engine checks that first), so a
//!   stranger cannot shrink the MTU of a destination no job talks to.
//! - A reported MTU is clamped up to [`MIN_PATH_MTU_V4`] / [`MIN_PATH_MTU_V6`] (an attacker on
//!   the path cannot force tiny segments) and never raises a known, unexpired MTU.
//! - An entry expires [`PATH_MTU_EXPIRY`] after it was learnt (the kernel's `mtu_expires`), so
//!   a path that widens again is used again.
//! - At most [`MAX_PATH_MTUS`] entries: when full, expired entries go first, then the one that
//!   would expire soonest.
//!
//! # Limits
//! Keyed by destination address only (not by the proxy's egress address or route), like the
//! kernel's exceptions.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::Duration;

use snas_wire::{IpPacket, Transport};

use crate::clock::Nanos;

/// How long a learnt path MTU holds (Linux `net.ipv4.route.mtu_expires`).
pub const PATH_MTU_EXPIRY: Duration = Duration::from_secs(600);
/// Destinations remembered at most.
pub const MAX_PATH_MTUS: usize = 4096;
/// Smallest IPv4 path MTU accepted (Linux `min_pmtu`); smaller reports are raised to it.
pub const MIN_PATH_MTU_V4: u16 = 552;
/// Smallest IPv6 path MTU (RFC 8200: every link carries 1280 bytes).
pub const MIN_PATH_MTU_V6: u16 = 1280;

const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_FRAG_NEEDED: u8 = 4;
const ICMPV6_PACKET_TOO_BIG: u8 = 2;

/// The MTU an ICMP "fragmentation needed" or ICMPv6 "packet too big" message reports, or
/// `None` for any other packet (other messages, not ICMP, malformed, or an IPv4 report of 0 —
/// an RFC 1191 pre-PMTU router that does not say).
pub fn reported_path_mtu(packet: &[u8]) -> Option<u32> {
    let ip = IpPacket::parse(packet).ok()?;
    match ip.transport().ok()? {
        Transport::Icmp(m) if m.msg_type() == ICMP_DEST_UNREACH && m.code() == ICMP_FRAG_NEEDED => {
            // Bytes 6–7 of the header: the next-hop MTU (RFC 1191).
            Some(u32::from(m.seq())).filter(|&mtu| mtu > 0)
        }
        Transport::Icmpv6(m) if m.msg_type() == ICMPV6_PACKET_TOO_BIG => {
            let b = m.as_bytes();
            Some(u32::from_be_bytes([b[4], b[5], b[6], b[7]]))
        }
        _ => None,
    }
}

#[derive(Debug, Clone, Copy)]
struct Learnt {
    mtu: u16,
    expires: Nanos,
}

/// Path MTUs by destination (see the module docs).
#[derive(Debug, Default)]
pub struct PathMtus {
    by_dst: HashMap<IpAddr, Learnt>,
}

impl PathMtus {
    /// An empty map.
    pub fn new() -> PathMtus {
        PathMtus::default()
    }

    /// Records that the path to `dst` carries at most `reported` bytes, learnt at `now`; returns
    /// the MTU now held for `dst` (the report clamped, or a smaller one already known).
    pub fn learn(&mut self, dst: IpAddr, reported: u32, now: Nanos) -> u16 {
        let floor = if dst.is_ipv6() {
            MIN_PATH_MTU_V6
        } else {
            MIN_PATH_MTU_V4
        };
        let mtu = u16::try_from(reported).unwrap_or(u16::MAX).max(floor);
        let expires = now.saturating_add(PATH_MTU_EXPIRY);
        if let Some(known) = self.by_dst.get_mut(&dst) {
            if known.expires > now && known.mtu <= mtu {
                return known.mtu;
            }
            *known = Learnt { mtu, expires };
            return mtu;
        }
        if self.by_dst.len() >= MAX_PATH_MTUS {
            self.make_room(now);
        }
        self.by_dst.insert(dst, Learnt { mtu, expires });
        mtu
    }

    /// The path MTU known for `dst` at `now`, if any.
    pub fn get(&self, dst: IpAddr, now: Nanos) -> Option<u16> {
        if self.by_dst.is_empty() {
            return None;
        }
        self.by_dst
            .get(&dst)
            .filter(|l| l.expires > now)
            .map(|l| l.mtu)
    }

    /// Destinations held (expired ones included until they are evicted).
    pub fn len(&self) -> usize {
        self.by_dst.len()
    }

    /// Whether nothing is held.
    pub fn is_empty(&self) -> bool {
        self.by_dst.is_empty()
    }

    /// Drops the expired entries; if none had expired, the one that would expire soonest.
    fn make_room(&mut self, now: Nanos) {
        let before = self.by_dst.len();
        self.by_dst.retain(|_, l| l.expires > now);
        if self.by_dst.len() < before {
            return;
        }
        let soonest = self
            .by_dst
            .iter()
            .min_by_key(|(_, l)| l.expires)
            .map(|(dst, _)| *dst);
        if let Some(dst) = soonest {
            self.by_dst.remove(&dst);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    const V4: IpAddr = IpAddr::V4(Ipv4Addr::new(203, 0, 113, 10));
    const V6: IpAddr = IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x10));

    fn at(secs: u64) -> Nanos {
        Nanos::from_nanos(secs * 1_000_000_000)
    }

    #[test]
    fn a_learnt_mtu_holds_until_it_expires_then_the_path_is_tried_whole_again() {
        let mut p = PathMtus::new();
        assert_eq!(p.get(V4, at(1)), None);
        assert_eq!(p.learn(V4, 1280, at(1)), 1280);
        assert_eq!(p.get(V4, at(1)), Some(1280));
        assert_eq!(
            p.get(
                V4,
                at(1).saturating_add(PATH_MTU_EXPIRY - Duration::from_nanos(1))
            ),
            Some(1280)
        );
        assert_eq!(p.get(V4, at(1).saturating_add(PATH_MTU_EXPIRY)), None);
        assert_eq!(
            p.get(V6, at(1)),
            None,
            "other destinations are not affected"
        );
    }

    #[test]
    fn a_larger_report_does_not_raise_a_known_mtu_but_a_smaller_one_lowers_it() {
        let mut p = PathMtus::new();
        p.learn(V4, 1400, at(1));
        assert_eq!(p.learn(V4, 1480, at(2)), 1400);
        assert_eq!(p.learn(V4, 1300, at(3)), 1300);
        assert_eq!(p.get(V4, at(3)), Some(1300));
        // Once expired, a larger report is believed.
        let later = at(3).saturating_add(PATH_MTU_EXPIRY);
        assert_eq!(p.learn(V4, 1480, later), 1480);
    }

    #[test]
    fn tiny_reports_are_raised_to_the_protocol_minimum() {
        let mut p = PathMtus::new();
        assert_eq!(p.learn(V4, 68, at(1)), MIN_PATH_MTU_V4);
        assert_eq!(p.learn(V6, 576, at(1)), MIN_PATH_MTU_V6);
        assert_eq!(
            p.learn(V4, 1 << 20, at(600).saturating_add(PATH_MTU_EXPIRY)),
            u16::MAX
        );
    }

    #[test]
    fn the_map_is_bounded_and_evicts_expired_entries_first_then_the_soonest_to_expire() {
        let mut p = PathMtus::new();
        for i in 0..MAX_PATH_MTUS as u32 {
            let dst = IpAddr::V4(Ipv4Addr::from(0xc633_0000 + i));
            p.learn(dst, 1400, at(1 + u64::from(i % 2)));
        }
        assert_eq!(p.len(), MAX_PATH_MTUS);
        // Full, nothing expired: the soonest to expire (learnt at 1 s) makes room.
        p.learn(V4, 1300, at(3));
        assert_eq!(p.len(), MAX_PATH_MTUS);
        assert_eq!(p.get(V4, at(3)), Some(1300));
        // Later every entry learnt at 1 s and 2 s has expired: they all go at the next
        // insertion, the unexpired one stays.
        let later = at(2).saturating_add(PATH_MTU_EXPIRY);
        p.learn(V6, 1280, later);
        assert_eq!(p.len(), 2);
        assert_eq!(p.get(V4, later), Some(1300));
        assert_eq!(p.get(V6, later), Some(1280));
    }

    fn icmp4(ty: u8, code: u8, rest: [u8; 4]) -> Vec<u8> {
        let mut p = vec![0u8; 28];
        p[0] = 0x45;
        p[2..4].copy_from_slice(&28u16.to_be_bytes());
        p[8] = 64;
        p[9] = 1;
        p[12..16].copy_from_slice(&[203, 0, 113, 254]);
        p[16..20].copy_from_slice(&[198, 51, 100, 1]);
        p[20] = ty;
        p[21] = code;
        p[24..28].copy_from_slice(&rest);
        p
    }

    fn icmp6(ty: u8, rest: [u8; 4]) -> Vec<u8> {
        let mut p = vec![0u8; 48];
        p[0] = 0x60;
        p[4..6].copy_from_slice(&8u16.to_be_bytes());
        p[6] = 58;
        p[7] = 64;
        p[8..24].copy_from_slice(&Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0xfe).octets());
        p[24..40].copy_from_slice(&Ipv6Addr::new(0x2001, 0xdb8, 0xe, 0, 0, 0, 0, 1).octets());
        p[40] = ty;
        p[44..48].copy_from_slice(&rest);
        p
    }

    #[test]
    fn the_reported_mtu_is_read_from_fragmentation_needed_and_packet_too_big_only() {
        assert_eq!(reported_path_mtu(&icmp4(3, 4, [0, 0, 5, 0])), Some(1280));
        assert_eq!(reported_path_mtu(&icmp4(3, 4, [0, 0, 0, 0])), None);
        assert_eq!(reported_path_mtu(&icmp4(3, 3, [0, 0, 5, 0])), None);
        assert_eq!(reported_path_mtu(&icmp4(11, 0, [0, 0, 5, 0])), None);
        assert_eq!(reported_path_mtu(&icmp6(2, [0, 0, 5, 0x28])), Some(1320));
        assert_eq!(reported_path_mtu(&icmp6(1, [0, 0, 5, 0x28])), None);
        assert_eq!(reported_path_mtu(&[0x45, 0, 0]), None);
    }
}
