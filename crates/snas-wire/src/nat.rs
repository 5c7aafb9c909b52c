//! In-place NAT rewrites with incremental checksum updates (RFC 1624).
//!
//! Owns the one operation the proxy does to every forwarded packet: replace the source (SNAT,
//! sandbox → internet) or destination (reverse NAT, internet → sandbox) address and port, keeping
//! the IPv4 header checksum and the transport checksum (whose pseudo-header covers the addresses)
//! correct without a pass over the payload. The cost is the same for 64 bytes and 64 KiB.
//!
//! [`rewrite_icmp_error`] translates ICMP errors from the internet (port unreachable, fragmentation
//! needed, …) back toward the sandbox: the outer destination and the quoted packet's source, with
//! the checksums inside the quote kept consistent too; [`crate::quoted_flow_tuple`] gives the
//! conntrack key to look up first.
//!
//! # Invariants
//! - The packet is validated exactly as [`crate::flow_tuple`] does (no fragments, no IPv6
//!   extension headers, TCP/UDP/ICMP echo only) before any byte is written: on error, the packet
//!   is unchanged.
//! - The address family cannot change (that is NAT64, not an incremental rewrite).
//! - UDP over IPv4 with checksum 0 keeps checksum 0; a UDP checksum that becomes 0 is written as
//!   0xFFFF. For ICMP echo "port" means the identifier.

use crate::checksum;
use crate::error::ParseError;
use crate::flow::{FiveTuple, L4Proto};
use crate::ip::{be16, put16, IpPacket};
use crate::Reason;
use std::net::IpAddr;

/// Which end of the packet a rewrite replaces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    /// Source address and port (SNAT).
    Source,
    /// Destination address and port (reverse NAT).
    Destination,
}

/// A rewrite was refused; the packet is unchanged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum NatError {
    /// The packet failed validation.
    #[error("cannot rewrite: {0}")]
    Parse(#[from] ParseError),
    /// The new address is of the other IP family.
    #[error("cannot rewrite an IPv{packet} packet with an address of the other family")]
    FamilyMismatch {
        /// IP version of the packet.
        packet: u8,
    },
}

impl NatError {
    /// The drop reason under which the caller counts this packet.
    pub fn reason(&self) -> Reason {
        match self {
            NatError::Parse(e) => e.reason(),
            NatError::FamilyMismatch { .. } => Reason::Malformed,
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum Kind {
    Tcp,
    Udp,
    Icmp,
}

/// A packet validated for NAT, with its flow key. The proxy parses once, looks up conntrack with
/// [`NatPacket::tuple`], then rewrites, instead of validating twice.
#[derive(Debug)]
pub struct NatPacket<'a> {
    buf: &'a mut [u8],
    v6: bool,
    l4_off: usize,
    kind: Kind,
    tuple: FiveTuple,
}

impl<'a> NatPacket<'a> {
    /// Validates `buf` as [`crate::flow_tuple`] does.
    pub fn parse(buf: &'a mut [u8]) -> Result<Self, ParseError> {
        let (v6, l4_off, tuple) = {
            let ip = IpPacket::parse(&*buf)?;
            (ip.is_ipv6(), ip.header_len(), ip.flow_tuple()?)
        };
        let kind = match tuple.proto {
            L4Proto::Tcp => Kind::Tcp,
            L4Proto::Udp => Kind::Udp,
            L4Proto::Icmp | L4Proto::Icmpv6 => Kind::Icmp,
        };
        Ok(NatPacket {
            buf,
            v6,
            l4_off,
            kind,
            tuple,
        })
    }

    /// The flow key as the packet is now.
    pub fn tuple(&self) -> FiveTuple {
        self.tuple
    }

    /// The packet bytes.
    pub fn as_bytes(&self) -> &[u8] {
        self.buf
    }

    /// Replaces the source or destination address and port (ICMP echo: identifier) in place,
    /// updating every affected checksum incrementally.
    pub fn rewrite(&mut self, which: Endpoint, addr: IpAddr, port: u16) -> Result<(), NatError> {
        let (v6, l4_off, kind) = (self.v6, self.l4_off, self.kind);
        if addr.is_ipv6() != v6 {
            return Err(NatError::FamilyMismatch {
                packet: if v6 { 6 } else { 4 },
            });
        }
        let packet = &mut *self.buf;
        // Address.
        let old_addr = match (addr, which) {
            (IpAddr::V4(new), _) => {
                let at = if which == Endpoint::Source { 12 } else { 16 };
                let mut o = [0u8; 4];
                o.copy_from_slice(&packet[at..at + 4]);
                let old = std::net::Ipv4Addr::from(o);
                let c = checksum::update_u32(be16(packet, 10), old.to_bits(), new.to_bits());
                packet[at..at + 4].copy_from_slice(&new.octets());
                put16(packet, 10, c);
                IpAddr::V4(old)
            }
            (IpAddr::V6(new), _) => {
                let at = if which == Endpoint::Source { 8 } else { 24 };
                let mut o = [0u8; 16];
                o.copy_from_slice(&packet[at..at + 16]);
                packet[at..at + 16].copy_from_slice(&new.octets());
                IpAddr::V6(std::net::Ipv6Addr::from(o))
            }
        };

        // Transport: pseudo-header address and the port field.
        let l4 = &mut packet[l4_off..];
        let (csum_at, port_at) = match (kind, which) {
            (Kind::Tcp, Endpoint::Source) => (16, 0),
            (Kind::Tcp, Endpoint::Destination) => (16, 2),
            (Kind::Udp, Endpoint::Source) => (6, 0),
            (Kind::Udp, Endpoint::Destination) => (6, 2),
            (Kind::Icmp, _) => (2, 4),
        };
        let old_port = be16(l4, port_at);
        let mut c = be16(l4, csum_at);
        match kind {
            Kind::Udp if c == 0 => {}
            Kind::Icmp if !v6 => c = checksum::update_u16(c, old_port, port),
            _ => {
                c = checksum::update_addr(c, old_addr, addr);
                c = checksum::update_u16(c, old_port, port);
                if matches!(kind, Kind::Udp) {
                    c = checksum::udp_field(c);
                }
            }
        }
        put16(l4, port_at, port);
        put16(l4, csum_at, c);
        match (which, kind) {
            (_, Kind::Icmp) => {
                self.tuple.src_port = port;
                self.tuple.dst_port = port;
            }
            (Endpoint::Source, _) => self.tuple.src_port = port,
            (Endpoint::Destination, _) => self.tuple.dst_port = port,
        }
        match which {
            Endpoint::Source => self.tuple.src = addr,
            Endpoint::Destination => self.tuple.dst = addr,
        }
        Ok(())
    }
}

/// Validates `packet` and rewrites it in place (see [`NatPacket::rewrite`]); on error the packet
/// is unchanged.
pub fn rewrite(
    packet: &mut [u8],
    which: Endpoint,
    addr: IpAddr,
    port: u16,
) -> Result<(), NatError> {
    NatPacket::parse(packet)?.rewrite(which, addr, port)
}

/// Translates an ICMP/ICMPv6 error that arrived for a NATed flow (reverse NAT of, for example,
/// "fragmentation needed" or "port unreachable" sent by the internet to the egress address): the
/// outer destination becomes `outer_dst` (the sandbox) and the quoted packet's source address and
/// port (ICMP echo: identifier) become `quoted_src` / `quoted_src_port` (the sandbox's own).
/// The outer IPv4 checksum, the ICMP checksum and, where the quote holds them, the quoted IPv4
/// header checksum and transport checksum are updated incrementally. On error the packet is
/// unchanged.
pub fn rewrite_icmp_error(
    packet: &mut [u8],
    outer_dst: IpAddr,
    quoted_src: IpAddr,
    quoted_src_port: u16,
) -> Result<(), NatError> {
    let q = crate::flow::parse_quote(packet)?;
    if outer_dst.is_ipv6() != q.v6 || quoted_src.is_ipv6() != q.v6 {
        return Err(NatError::FamilyMismatch {
            packet: if q.v6 { 6 } else { 4 },
        });
    }
    let old_outer = replace_addr(packet, 0, q.v6, Endpoint::Destination, outer_dst);
    let icmp_csum_at = q.icmp_off + 2;
    let mut c = be16(packet, icmp_csum_at);
    if q.v6 {
        c = checksum::update_addr(c, old_outer, outer_dst);
    }
    // The quoted source address, and the quoted IPv4 header checksum that covers it. Every field
    // below lies at an even offset from the ICMP header, so 16-bit updates of `c` are exact.
    let old_qc = be16(packet, q.ip_off + 10);
    let old_src = replace_addr(packet, q.ip_off, q.v6, Endpoint::Source, quoted_src);
    c = checksum::update_addr(c, old_src, quoted_src);
    if !q.v6 {
        // replace_addr updated the quoted header checksum, which the ICMP checksum covers too.
        c = checksum::update_u16(c, old_qc, be16(packet, q.ip_off + 10));
    }
    // The quoted port (or echo identifier) and the quoted transport checksum, if quoted.
    let (port_at, l4_csum_at) = match q.tuple.proto {
        L4Proto::Tcp => (q.l4_off, q.l4_off + 16),
        L4Proto::Udp => (q.l4_off, q.l4_off + 6),
        L4Proto::Icmp | L4Proto::Icmpv6 => (q.l4_off + 4, q.l4_off + 2),
    };
    let old_port = be16(packet, port_at);
    put16(packet, port_at, quoted_src_port);
    c = checksum::update_u16(c, old_port, quoted_src_port);
    if l4_csum_at + 2 <= packet.len() {
        let old_l4c = be16(packet, l4_csum_at);
        let mut l4c = old_l4c;
        match q.tuple.proto {
            L4Proto::Udp if l4c == 0 => {}
            L4Proto::Icmp => l4c = checksum::update_u16(l4c, old_port, quoted_src_port),
            proto => {
                l4c = checksum::update_addr(l4c, old_src, quoted_src);
                l4c = checksum::update_u16(l4c, old_port, quoted_src_port);
                if proto == L4Proto::Udp {
                    l4c = checksum::udp_field(l4c);
                }
            }
        }
        put16(packet, l4_csum_at, l4c);
        c = checksum::update_u16(c, old_l4c, l4c);
    }
    put16(packet, icmp_csum_at, c);
    Ok(())
}

/// Writes `new` as the source or destination address of the IP header at `ip_off`, updating the
/// IPv4 header checksum; returns the old address. The header must have been validated.
fn replace_addr(
    packet: &mut [u8],
    ip_off: usize,
    v6: bool,
    which: Endpoint,
    new: IpAddr,
) -> IpAddr {
    let h = &mut packet[ip_off..];
    match new {
        IpAddr::V4(n) if !v6 => {
            let at = if which == Endpoint::Source { 12 } else { 16 };
            let old = std::net::Ipv4Addr::new(h[at], h[at + 1], h[at + 2], h[at + 3]);
            let c = checksum::update_u32(be16(h, 10), old.to_bits(), n.to_bits());
            h[at..at + 4].copy_from_slice(&n.octets());
            put16(h, 10, c);
            IpAddr::V4(old)
        }
        IpAddr::V6(n) if v6 => {
            let at = if which == Endpoint::Source { 8 } else { 24 };
            let mut o = [0u8; 16];
            o.copy_from_slice(&h[at..at + 16]);
            h[at..at + 16].copy_from_slice(&n.octets());
            IpAddr::V6(std::net::Ipv6Addr::from(o))
        }
        // Callers check the family first; a mismatch changes nothing.
        other => other,
    }
}
