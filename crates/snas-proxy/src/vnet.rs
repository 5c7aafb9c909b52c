//! The virtio-net header that the TUN device puts before every packet (`IFF_VNET_HDR`): what a
//! packet still needs (a checksum, segmentation) when it crosses between the kernel and the
//! proxy. Pure: no I/O.
//!
//! # What it owns
//! - [`VnetHdr`]: the 10-byte legacy header (`struct virtio_net_hdr`), in the host's byte order
//!   as the kernel reads and writes it for TUN devices (no `TUNSETVNETLE`/`BE`).
//! - [`prepare_to_kernel`]: the header for a packet the proxy writes to the internet side. A
//!   TCP or UDP packet always leaves with `NEEDS_CSUM` and a fresh pseudo-header sum in its
//!   checksum field, so the kernel (or the NIC) finishes the checksum over the payload; a TCP
//!   packet longer than the MTU leaves as one TSO super-packet that the kernel segments.
//! - [`finish_from_kernel`]: what a packet read from the TUN device needs before it can go to a
//!   node inside GENEVE (where no virtio header travels): its checksum finished here, or a
//!   segmentation into `gso_size` pieces ([`crate::gso`]) which finishes each piece's checksum.
//!
//! # Why
//! With offloads on (`TUNSETOFFLOAD`), the kernel hands the proxy 64 KiB TCP super-packets and
//! takes them back: one read, one NAT rewrite and one write per ~45 segments instead of one of
//! each per segment (issue 15). A job's veth with tx checksum and segmentation offload on sends
//! super-packets with unfinished checksums (only the pseudo-header summed); recomputing the
//! pseudo-header on the way out makes the received checksum state irrelevant, and the NAT's
//! incremental update of that field harmless.
//!
//! # Invariants
//! - [`prepare_to_kernel`] never changes a packet's length, addresses or ports; it writes only
//!   the TCP/UDP checksum field. An IPv4 UDP packet whose checksum is 0 ("none") keeps it.
//! - A packet this module cannot describe (truncated headers, IPv6 extension headers, IPv4
//!   fragments) gets the empty header and is written as it is, as without offloads.
//!
//! # Limits
//! UDP above the MTU is not segmented (no `UDP_L4` GSO towards the internet): the kernel
//! fragments it as before. IPv6 extension headers are not walked.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use snas_wire::checksum;

/// Length of the legacy virtio-net header (`struct virtio_net_hdr`).
pub const VNET_HDR_LEN: usize = 10;

/// `VIRTIO_NET_HDR_F_NEEDS_CSUM`: the checksum at `csum_start + csum_offset` holds the
/// pseudo-header sum; the rest is to be added from `csum_start` on.
pub const F_NEEDS_CSUM: u8 = 1;
/// `VIRTIO_NET_HDR_F_DATA_VALID`: the checksum was verified.
pub const F_DATA_VALID: u8 = 2;

/// `VIRTIO_NET_HDR_GSO_NONE`.
pub const GSO_NONE: u8 = 0;
/// `VIRTIO_NET_HDR_GSO_TCPV4`.
pub const GSO_TCPV4: u8 = 1;
/// `VIRTIO_NET_HDR_GSO_UDP` (UFO, obsolete).
pub const GSO_UDP: u8 = 3;
/// `VIRTIO_NET_HDR_GSO_TCPV6`.
pub const GSO_TCPV6: u8 = 4;
/// `VIRTIO_NET_HDR_GSO_UDP_L4` (USO).
pub const GSO_UDP_L4: u8 = 5;
/// `VIRTIO_NET_HDR_GSO_ECN`: the super-packet carries CWR on its first segment.
pub const GSO_ECN: u8 = 0x80;
/// `VIRTIO_NET_HDR_GSO_UDP_TUNNEL_IPV4`: the super-packet is inside UDP over IPv4 (Linux 6.17+).
pub const GSO_UDP_TUNNEL_IPV4: u8 = 0x20;

/// Length of `struct virtio_net_hdr_v1_hash_tunnel`: the header a TUN/TAP device takes when it
/// is to accept UDP-tunnelled super-packets (`TUNSETVNETHDRSZ` ≥ this).
pub const VNET_TNL_HDR_LEN: usize = 24;

const TCP: u8 = 6;
const UDP: u8 = 17;
const TCP_CWR: u8 = 0x80;

/// The legacy virtio-net header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct VnetHdr {
    /// `F_*` bits.
    pub flags: u8,
    /// `GSO_*` type, possibly with [`GSO_ECN`].
    pub gso_type: u8,
    /// Length of the headers (a hint).
    pub hdr_len: u16,
    /// Payload bytes per segment.
    pub gso_size: u16,
    /// Where checksumming starts (the transport header).
    pub csum_start: u16,
    /// Offset of the checksum field from `csum_start`.
    pub csum_offset: u16,
}

/// Why a packet read from the kernel cannot be finished.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum VnetError {
    /// `csum_start + csum_offset` lies outside the packet
    #[error("checksum offsets {start}+{offset} outside a {len}-byte packet")]
    CsumOutOfRange {
        /// `csum_start`.
        start: u16,
        /// `csum_offset`.
        offset: u16,
        /// The packet length.
        len: usize,
    },
    /// a GSO type the proxy does not ask for (it offers TSO only)
    #[error("unexpected GSO type {0:#x}")]
    GsoType(u8),
}

impl VnetHdr {
    /// Decodes the header from the first [`VNET_HDR_LEN`] bytes of `b`.
    pub fn decode(b: &[u8; VNET_HDR_LEN]) -> VnetHdr {
        let u = |i: usize| u16::from_ne_bytes([b[i], b[i + 1]]);
        VnetHdr {
            flags: b[0],
            gso_type: b[1],
            hdr_len: u(2),
            gso_size: u(4),
            csum_start: u(6),
            csum_offset: u(8),
        }
    }

    /// The header's bytes.
    pub fn encode(&self) -> [u8; VNET_HDR_LEN] {
        let mut b = [0u8; VNET_HDR_LEN];
        b[0] = self.flags;
        b[1] = self.gso_type;
        b[2..4].copy_from_slice(&self.hdr_len.to_ne_bytes());
        b[4..6].copy_from_slice(&self.gso_size.to_ne_bytes());
        b[6..8].copy_from_slice(&self.csum_start.to_ne_bytes());
        b[8..10].copy_from_slice(&self.csum_offset.to_ne_bytes());
        b
    }

    /// Whether the packet is a super-packet to be segmented.
    pub fn is_gso(&self) -> bool {
        self.gso_type & !GSO_ECN != GSO_NONE
    }
}

/// Where a TCP/UDP packet's headers are.
struct L4 {
    src: IpAddr,
    dst: IpAddr,
    proto: u8,
    /// Offset of the transport header.
    l4: usize,
    /// Transport header length (TCP with options; 8 for UDP).
    l4_hdr: usize,
    /// Length of the IP packet as its header says.
    total: usize,
    v6: bool,
}

fn l4_layout(p: &[u8]) -> Option<L4> {
    let (v6, l4, total, proto, src, dst) = match p.first()? >> 4 {
        4 => {
            let ihl = usize::from(p.first()? & 0x0f) * 4;
            let total = usize::from(u16::from_be_bytes([*p.get(2)?, *p.get(3)?]));
            // A fragment's transport header is not where a checksum could be finished.
            if u16::from_be_bytes([*p.get(6)?, *p.get(7)?]) & 0x3fff != 0 || ihl < 20 {
                return None;
            }
            let s: [u8; 4] = p.get(12..16)?.try_into().ok()?;
            let d: [u8; 4] = p.get(16..20)?.try_into().ok()?;
            (
                false,
                ihl,
                total,
                *p.get(9)?,
                IpAddr::from(Ipv4Addr::from(s)),
                IpAddr::from(Ipv4Addr::from(d)),
            )
        }
        6 => {
            let plen = usize::from(u16::from_be_bytes([*p.get(4)?, *p.get(5)?]));
            let s: [u8; 16] = p.get(8..24)?.try_into().ok()?;
            let d: [u8; 16] = p.get(24..40)?.try_into().ok()?;
            (
                true,
                40,
                40 + plen,
                *p.get(6)?,
                IpAddr::from(Ipv6Addr::from(s)),
                IpAddr::from(Ipv6Addr::from(d)),
            )
        }
        _ => return None,
    };
    if total != p.len() || total < l4 {
        return None;
    }
    let l4_hdr = match proto {
        TCP => usize::from(p.get(l4 + 12)? >> 4) * 4,
        UDP => 8,
        _ => return None,
    };
    if l4_hdr < 8 || l4 + l4_hdr > total {
        return None;
    }
    Some(L4 {
        src,
        dst,
        proto,
        l4,
        l4_hdr,
        total,
        v6,
    })
}

fn csum_field(proto: u8) -> usize {
    if proto == TCP {
        16
    } else {
        6
    }
}

/// Prepares `packet` for the kernel and returns its header (see the module doc): a TCP or UDP
/// packet gets `NEEDS_CSUM` and its pseudo-header sum; a TCP packet longer than `mtu` becomes a
/// TSO super-packet of `mtu`-sized segments.
pub fn prepare_to_kernel(packet: &mut [u8], mtu: usize) -> VnetHdr {
    let Some(l) = l4_layout(packet) else {
        return VnetHdr::default();
    };
    let field = l.l4 + csum_field(l.proto);
    if l.proto == UDP && !l.v6 && packet[field..field + 2] == [0, 0] {
        // UDP over IPv4 without a checksum stays without one.
        return VnetHdr::default();
    }
    let l4_len = u32::try_from(l.total - l.l4).unwrap_or(u32::MAX);
    let pseudo = checksum::fold(checksum::pseudo_header(l.src, l.dst, l.proto, l4_len));
    packet[field..field + 2].copy_from_slice(&pseudo.to_be_bytes());
    let hdr_len = l.l4 + l.l4_hdr;
    let mut h = VnetHdr {
        flags: F_NEEDS_CSUM,
        gso_type: GSO_NONE,
        hdr_len: u16::try_from(hdr_len).unwrap_or(u16::MAX),
        gso_size: 0,
        csum_start: u16::try_from(l.l4).unwrap_or(u16::MAX),
        csum_offset: u16::try_from(csum_field(l.proto)).unwrap_or(0),
    };
    if l.proto == TCP && l.total > mtu && mtu > hdr_len {
        h.gso_type = if l.v6 { GSO_TCPV6 } else { GSO_TCPV4 };
        if packet[l.l4 + 13] & TCP_CWR != 0 {
            h.gso_type |= GSO_ECN;
        }
        h.gso_size = u16::try_from(mtu - hdr_len).unwrap_or(u16::MAX);
    }
    h
}

/// The header for a UDP-tunnelled TCP super-packet written to a TAP device: `frame[..inner]`
/// is Ethernet, outer IPv4 (at 14) and UDP (at `udp`) and the tunnel header; `frame[inner..]`
/// the inner IP packet, which [`prepare_to_kernel`] has prepared for segments of at most
/// `inner_hdr.gso_size` payload bytes. The kernel segments the inner packet and repeats the
/// outer headers on every segment (outer UDP checksum 0, as SNAS sends).
pub fn tunnel_header(inner_hdr: &VnetHdr, udp: usize, inner: usize) -> [u8; VNET_TNL_HDR_LEN] {
    let shift = |v: u16| v.saturating_add(u16::try_from(inner).unwrap_or(u16::MAX));
    let h = VnetHdr {
        flags: inner_hdr.flags,
        gso_type: inner_hdr.gso_type | GSO_UDP_TUNNEL_IPV4,
        hdr_len: shift(inner_hdr.hdr_len),
        gso_size: inner_hdr.gso_size,
        csum_start: shift(inner_hdr.csum_start),
        csum_offset: inner_hdr.csum_offset,
    };
    let mut b = [0u8; VNET_TNL_HDR_LEN];
    b[..VNET_HDR_LEN].copy_from_slice(&h.encode());
    // num_buffers (2), hash_value (4), hash_report (2), padding (2): zero. The tunnel offsets
    // are little-endian whatever the host (virtio 1.x fields).
    b[20..22].copy_from_slice(&u16::try_from(udp).unwrap_or(u16::MAX).to_le_bytes());
    b[22..24].copy_from_slice(&u16::try_from(inner).unwrap_or(u16::MAX).to_le_bytes());
    b
}

/// What a packet read from the kernel needs before it goes to a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finished {
    /// Ready as it is (its checksum complete).
    Whole,
    /// A TCP super-packet: segment it into IP packets of at most this many bytes
    /// ([`crate::gso::segment_tcp`] computes each segment's checksums).
    Segment {
        /// The largest segment, headers included.
        mtu: usize,
    },
}

/// Finishes a packet read from the kernel with header `h`: completes a pending checksum in
/// place, or says how to segment a super-packet.
pub fn finish_from_kernel(h: &VnetHdr, packet: &mut [u8]) -> Result<Finished, VnetError> {
    if h.is_gso() {
        match h.gso_type & !GSO_ECN {
            GSO_TCPV4 | GSO_TCPV6 => {}
            other => return Err(VnetError::GsoType(other)),
        }
        // The kernel's gso_size is the sender's MSS; the headers are the packet's own.
        let hdr = l4_layout(packet).map(|l| l.l4 + l.l4_hdr);
        return match hdr {
            Some(hdr) if h.gso_size > 0 => Ok(Finished::Segment {
                mtu: hdr + usize::from(h.gso_size),
            }),
            _ => Ok(Finished::Whole),
        };
    }
    if h.flags & F_NEEDS_CSUM == 0 {
        return Ok(Finished::Whole);
    }
    let start = usize::from(h.csum_start);
    let field = start + usize::from(h.csum_offset);
    if field + 2 > packet.len() || start > packet.len() {
        return Err(VnetError::CsumOutOfRange {
            start: h.csum_start,
            offset: h.csum_offset,
            len: packet.len(),
        });
    }
    // The field holds the pseudo-header sum: adding the transport bytes (field included)
    // gives the complete sum.
    let mut c = checksum::finish(checksum::add(0, &packet[start..]));
    if c == 0 && is_udp_at(packet, start) {
        c = 0xffff;
    }
    packet[field..field + 2].copy_from_slice(&c.to_be_bytes());
    Ok(Finished::Whole)
}

fn is_udp_at(packet: &[u8], start: usize) -> bool {
    l4_layout(packet).is_some_and(|l| l.proto == UDP && l.l4 == start)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::gso::tests::big as tcp_pkt;
    use proptest::prelude::*;
    use snas_wire::build::{udp, UdpSpec};
    use snas_wire::TcpFlags;

    fn valid_l4(p: &[u8]) -> bool {
        let l = l4_layout(p).unwrap();
        checksum::transport(l.src, l.dst, l.proto, &p[l.l4..]) == 0
    }

    /// What the kernel does with NEEDS_CSUM: sum from csum_start and store the result.
    fn kernel_finish(h: &VnetHdr, p: &mut [u8]) {
        assert_eq!(h.flags & F_NEEDS_CSUM, F_NEEDS_CSUM);
        let s = usize::from(h.csum_start);
        let f = s + usize::from(h.csum_offset);
        let c = checksum::finish(checksum::add(0, &p[s..]));
        p[f..f + 2].copy_from_slice(&c.to_be_bytes());
    }

    #[test]
    fn header_round_trips() {
        let h = VnetHdr {
            flags: F_NEEDS_CSUM,
            gso_type: GSO_TCPV4 | GSO_ECN,
            hdr_len: 52,
            gso_size: 1404,
            csum_start: 20,
            csum_offset: 16,
        };
        assert_eq!(VnetHdr::decode(&h.encode()), h);
        assert!(h.is_gso());
        assert!(!VnetHdr::default().is_gso());
    }

    #[test]
    fn a_small_tcp_packet_leaves_with_its_pseudo_header_and_no_gso() {
        let mut p = tcp_pkt(100, TcpFlags::ACK);
        // A job's veth with checksum offload sends a garbage-looking (partial) field.
        p[36] ^= 0x5a;
        let h = prepare_to_kernel(&mut p, 1500);
        assert_eq!(h.gso_type, GSO_NONE);
        assert_eq!((h.csum_start, h.csum_offset), (20, 16));
        kernel_finish(&h, &mut p);
        assert!(valid_l4(&p));
    }

    #[test]
    fn a_tcp_super_packet_becomes_tso_with_mtu_sized_segments() {
        let mut p = tcp_pkt(60_000, TcpFlags(TcpFlags::ACK.0 | TCP_CWR));
        let h = prepare_to_kernel(&mut p, 1500);
        assert_eq!(h.gso_type, GSO_TCPV4 | GSO_ECN);
        assert_eq!(h.gso_size, 1460);
        assert_eq!(h.hdr_len, 40);
        kernel_finish(&h, &mut p);
        assert!(valid_l4(&p));
    }

    #[test]
    fn ipv4_udp_without_checksum_keeps_none() {
        let mut p = udp(&UdpSpec {
            src: "192.0.2.1:5000".parse().unwrap(),
            dst: "203.0.113.10:53".parse().unwrap(),
            payload: b"hello",
        })
        .unwrap();
        p[26..28].copy_from_slice(&[0, 0]);
        let before = p.clone();
        assert_eq!(prepare_to_kernel(&mut p, 1500), VnetHdr::default());
        assert_eq!(p, before);
    }

    #[test]
    fn a_pending_udp_checksum_is_finished_from_the_kernel() {
        let mut p = udp(&UdpSpec {
            src: "203.0.113.10:53".parse().unwrap(),
            dst: "198.51.100.64:5000".parse().unwrap(),
            payload: b"an answer",
        })
        .unwrap();
        let h = prepare_to_kernel(&mut p, 1500);
        assert!(!valid_l4(&p));
        assert_eq!(finish_from_kernel(&h, &mut p), Ok(Finished::Whole));
        assert!(valid_l4(&p));
    }

    #[test]
    fn a_super_packet_from_the_kernel_is_segmented_by_its_mss() {
        let mut p = tcp_pkt(10_000, TcpFlags::ACK);
        let h = VnetHdr {
            flags: F_NEEDS_CSUM,
            gso_type: GSO_TCPV4,
            hdr_len: 40,
            gso_size: 1404,
            csum_start: 20,
            csum_offset: 16,
        };
        assert_eq!(
            finish_from_kernel(&h, &mut p),
            Ok(Finished::Segment { mtu: 1444 })
        );
        let udp_gso = VnetHdr {
            gso_type: GSO_UDP_L4,
            ..h
        };
        assert_eq!(
            finish_from_kernel(&udp_gso, &mut p),
            Err(VnetError::GsoType(GSO_UDP_L4))
        );
    }

    #[test]
    fn checksum_offsets_outside_the_packet_are_refused() {
        let mut p = tcp_pkt(10, TcpFlags::ACK);
        let h = VnetHdr {
            flags: F_NEEDS_CSUM,
            csum_start: 45,
            csum_offset: 16,
            ..VnetHdr::default()
        };
        assert!(matches!(
            finish_from_kernel(&h, &mut p),
            Err(VnetError::CsumOutOfRange { .. })
        ));
    }

    #[test]
    fn a_tunnel_header_shifts_the_inner_offsets_behind_the_outer_headers() {
        let mut p = tcp_pkt(10_000, TcpFlags::ACK);
        let inner = prepare_to_kernel(&mut p, 1444);
        let b = tunnel_header(&inner, 34, 70);
        let h = VnetHdr::decode(b[..VNET_HDR_LEN].try_into().unwrap());
        assert_eq!(h.gso_type, GSO_TCPV4 | GSO_UDP_TUNNEL_IPV4);
        assert_eq!(h.gso_size, 1404);
        assert_eq!((h.csum_start, h.csum_offset), (90, 16));
        assert_eq!(h.hdr_len, 110);
        assert_eq!(&b[20..24], &[34, 0, 70, 0]);
    }

    proptest! {
        /// Whatever the bytes, neither direction panics, and prepare keeps the length.
        #[test]
        fn never_panics(mut p in proptest::collection::vec(any::<u8>(), 0..200),
                        hdr in any::<[u8; VNET_HDR_LEN]>(), mtu in 0usize..2000) {
            let len = p.len();
            let _ = prepare_to_kernel(&mut p, mtu);
            prop_assert_eq!(p.len(), len);
            let _ = finish_from_kernel(&VnetHdr::decode(&hdr), &mut p);
        }

        /// A TCP packet of any size with any checksum field leaves the proxy so that the
        /// kernel's completion gives a valid checksum.
        #[test]
        fn prepared_tcp_checksums_complete_to_valid(len in 0usize..3000, junk in any::<u16>()) {
            let mut p = tcp_pkt(len, TcpFlags::ACK);
            p[36..38].copy_from_slice(&junk.to_be_bytes());
            let h = prepare_to_kernel(&mut p, 1500);
            prop_assert_eq!(h.is_gso(), p.len() > 1500);
            kernel_finish(&h, &mut p);
            prop_assert!(valid_l4(&p));
        }
    }
}
