//! IPv4 and IPv6 header views.
//!
//! Owns validation of the network layer. A view is only constructed by `parse`, which checks every
//! length the accessors later rely on, so accessors index without further checks and never panic.
//!
//! # Invariants and limits
//! - Lengths are strict: the IPv4 total length (IPv6: 40 + payload length) must equal the buffer
//!   length exactly. Trailing bytes are rejected rather than ignored, because a packet whose parts
//!   disagree on where it ends is how filters get bypassed; callers that strip link-layer padding
//!   slice the buffer first (see [`ipv4_total_len`]).
//! - IPv4 options and fragments are *parsed* (the view is valid) and exposed through
//!   [`Ipv4Packet::has_options`] and [`Ipv4Packet::is_fragment`]: the policy layer decides.
//!   [`IpPacket::transport`] refuses fragments, because their transport header is absent or
//!   partial.
//! - IPv6 extension headers are not walked. The view exposes `next_header()`;
//!   [`IpPacket::transport`] treats the fragment header (44) as [`ParseError::Fragment`] and any
//!   other extension header (hop-by-hop, routing, destination options, AH, ESP, mobility, HIP,
//!   shim6, experimental) as [`ParseError::Ipv6Extension`] (drop reason `ip_options`). Sandboxes
//!   have no business sending them, and tier 1 drops them too.
//! - IPv6 jumbograms (payload length 0) are rejected.
//! - In-place setters keep the IPv4 header checksum correct with RFC 1624 updates. Changing an
//!   address does *not* touch the transport checksum here; [`crate::nat`] does both.

use crate::checksum;
use crate::error::{Layer, ParseError};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// IP protocol numbers used by this crate.
pub mod proto {
    /// Hop-by-hop options (IPv6 extension header).
    pub const HOPOPT: u8 = 0;
    /// ICMP for IPv4.
    pub const ICMP: u8 = 1;
    /// TCP.
    pub const TCP: u8 = 6;
    /// UDP.
    pub const UDP: u8 = 17;
    /// IPv6 routing header.
    pub const IPV6_ROUTE: u8 = 43;
    /// IPv6 fragment header.
    pub const IPV6_FRAG: u8 = 44;
    /// Encapsulating security payload.
    pub const ESP: u8 = 50;
    /// Authentication header.
    pub const AH: u8 = 51;
    /// ICMP for IPv6.
    pub const ICMPV6: u8 = 58;
    /// IPv6 "no next header".
    pub const IPV6_NONXT: u8 = 59;
    /// IPv6 destination options.
    pub const IPV6_OPTS: u8 = 60;

    /// Whether `n` is an IPv6 extension header (RFC 8200 §4, IANA "IPv6 Extension Header Types").
    pub fn is_ipv6_extension(n: u8) -> bool {
        matches!(
            n,
            HOPOPT | IPV6_ROUTE | IPV6_FRAG | ESP | AH | IPV6_OPTS | 135 | 139 | 140 | 253 | 254
        )
    }
}

/// Length of an IPv4 header without options.
pub const IPV4_MIN_HEADER_LEN: usize = 20;
/// Length of the IPv6 fixed header.
pub const IPV6_HEADER_LEN: usize = 40;

pub(crate) fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

pub(crate) fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

pub(crate) fn put16(b: &mut [u8], at: usize, v: u16) {
    b[at..at + 2].copy_from_slice(&v.to_be_bytes());
}

pub(crate) fn put32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_be_bytes());
}

/// The total length an IPv4 header declares, if `buf` starts with at least 4 bytes of one. For
/// callers that must strip link-layer padding before [`Ipv4Packet::parse`].
pub fn ipv4_total_len(buf: &[u8]) -> Option<usize> {
    (buf.len() >= 4 && buf[0] >> 4 == 4).then(|| usize::from(be16(buf, 2)))
}

/// A validated IPv4 packet over `T` (`&[u8]`, `&mut [u8]`, `Vec<u8>`, ...).
#[derive(Debug, Clone)]
pub struct Ipv4Packet<T> {
    buf: T,
}

impl<T: AsRef<[u8]>> Ipv4Packet<T> {
    /// Validates version, IHL and total length (which must equal the buffer length).
    pub fn parse(buf: T) -> Result<Self, ParseError> {
        let b = buf.as_ref();
        if b.len() < IPV4_MIN_HEADER_LEN {
            return Err(ParseError::Truncated {
                layer: Layer::Ipv4,
                need: IPV4_MIN_HEADER_LEN,
                have: b.len(),
            });
        }
        let version = b[0] >> 4;
        if version != 4 {
            return Err(ParseError::BadVersion {
                found: version,
                expected: Layer::Ipv4,
            });
        }
        let ihl = b[0] & 0x0F;
        if ihl < 5 {
            return Err(ParseError::BadIhl { ihl });
        }
        let header_len = usize::from(ihl) * 4;
        if header_len > b.len() {
            return Err(ParseError::Truncated {
                layer: Layer::Ipv4,
                need: header_len,
                have: b.len(),
            });
        }
        let total = usize::from(be16(b, 2));
        if total < header_len || total != b.len() {
            return Err(ParseError::LengthMismatch {
                layer: Layer::Ipv4,
                declared: total,
                actual: b.len(),
            });
        }
        Ok(Ipv4Packet { buf })
    }

    fn b(&self) -> &[u8] {
        self.buf.as_ref()
    }

    /// Header length in bytes (IHL × 4).
    pub fn header_len(&self) -> usize {
        usize::from(self.b()[0] & 0x0F) * 4
    }
    /// Whether the header carries options (IHL > 5).
    pub fn has_options(&self) -> bool {
        self.header_len() > IPV4_MIN_HEADER_LEN
    }
    /// DSCP and ECN byte.
    pub fn tos(&self) -> u8 {
        self.b()[1]
    }
    /// Total length in bytes (equals the buffer length).
    pub fn total_len(&self) -> usize {
        usize::from(be16(self.b(), 2))
    }
    /// Identification field.
    pub fn identification(&self) -> u16 {
        be16(self.b(), 4)
    }
    /// DF flag.
    pub fn dont_fragment(&self) -> bool {
        self.b()[6] & 0x40 != 0
    }
    /// MF flag.
    pub fn more_fragments(&self) -> bool {
        self.b()[6] & 0x20 != 0
    }
    /// Fragment offset in bytes.
    pub fn fragment_offset(&self) -> usize {
        usize::from(be16(self.b(), 6) & 0x1FFF) * 8
    }
    /// Whether this is a fragment (first or later): MF set or offset non-zero.
    pub fn is_fragment(&self) -> bool {
        self.more_fragments() || self.fragment_offset() != 0
    }
    /// Time to live.
    pub fn ttl(&self) -> u8 {
        self.b()[8]
    }
    /// Protocol of the payload.
    pub fn protocol(&self) -> u8 {
        self.b()[9]
    }
    /// Header checksum field.
    pub fn header_checksum(&self) -> u16 {
        be16(self.b(), 10)
    }
    /// Source address.
    pub fn src(&self) -> Ipv4Addr {
        Ipv4Addr::from(be32(self.b(), 12))
    }
    /// Destination address.
    pub fn dst(&self) -> Ipv4Addr {
        Ipv4Addr::from(be32(self.b(), 16))
    }
    /// Option bytes (empty without options).
    pub fn options(&self) -> &[u8] {
        &self.b()[IPV4_MIN_HEADER_LEN..self.header_len()]
    }
    /// The header, options included.
    pub fn header(&self) -> &[u8] {
        &self.b()[..self.header_len()]
    }
    /// The payload (after the header, up to the total length).
    pub fn payload(&self) -> &[u8] {
        &self.b()[self.header_len()..]
    }
    /// Whether the header checksum is correct.
    pub fn header_checksum_ok(&self) -> bool {
        checksum::checksum(self.header()) == 0
    }
    /// The whole packet.
    pub fn as_bytes(&self) -> &[u8] {
        self.b()
    }
    /// Gives the buffer back.
    pub fn into_inner(self) -> T {
        self.buf
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Ipv4Packet<T> {
    fn bm(&mut self) -> &mut [u8] {
        self.buf.as_mut()
    }
    fn patch_u16(&mut self, at: usize, new: u16) {
        let old = be16(self.b(), at);
        let c = checksum::update_u16(self.header_checksum(), old, new);
        put16(self.bm(), at, new);
        put16(self.bm(), 10, c);
    }
    /// Sets the TTL, updating the header checksum incrementally.
    pub fn set_ttl(&mut self, ttl: u8) {
        let word = u16::from_be_bytes([ttl, self.protocol()]);
        self.patch_u16(8, word);
    }
    /// Sets the source address, updating the header checksum (not the transport checksum).
    pub fn set_src(&mut self, addr: Ipv4Addr) {
        let c = checksum::update_u32(self.header_checksum(), be32(self.b(), 12), addr.to_bits());
        put32(self.bm(), 12, addr.to_bits());
        put16(self.bm(), 10, c);
    }
    /// Sets the destination address, updating the header checksum (not the transport checksum).
    pub fn set_dst(&mut self, addr: Ipv4Addr) {
        let c = checksum::update_u32(self.header_checksum(), be32(self.b(), 16), addr.to_bits());
        put32(self.bm(), 16, addr.to_bits());
        put16(self.bm(), 10, c);
    }
    /// Recomputes the header checksum from scratch.
    pub fn fill_header_checksum(&mut self) {
        put16(self.bm(), 10, 0);
        let c = checksum::checksum(self.header());
        put16(self.bm(), 10, c);
    }
    /// Mutable payload.
    pub fn payload_mut(&mut self) -> &mut [u8] {
        let h = self.header_len();
        &mut self.bm()[h..]
    }
}

/// A validated IPv6 packet (fixed header only) over `T`.
#[derive(Debug, Clone)]
pub struct Ipv6Packet<T> {
    buf: T,
}

impl<T: AsRef<[u8]>> Ipv6Packet<T> {
    /// Validates version and payload length (40 + payload length must equal the buffer length).
    pub fn parse(buf: T) -> Result<Self, ParseError> {
        let b = buf.as_ref();
        if b.len() < IPV6_HEADER_LEN {
            return Err(ParseError::Truncated {
                layer: Layer::Ipv6,
                need: IPV6_HEADER_LEN,
                have: b.len(),
            });
        }
        let version = b[0] >> 4;
        if version != 6 {
            return Err(ParseError::BadVersion {
                found: version,
                expected: Layer::Ipv6,
            });
        }
        let declared = usize::from(be16(b, 4));
        if declared + IPV6_HEADER_LEN != b.len() {
            return Err(ParseError::LengthMismatch {
                layer: Layer::Ipv6,
                declared: declared + IPV6_HEADER_LEN,
                actual: b.len(),
            });
        }
        Ok(Ipv6Packet { buf })
    }

    fn b(&self) -> &[u8] {
        self.buf.as_ref()
    }
    /// Traffic class.
    pub fn traffic_class(&self) -> u8 {
        ((be16(self.b(), 0) >> 4) & 0xFF) as u8
    }
    /// Flow label (20 bits).
    pub fn flow_label(&self) -> u32 {
        be32(self.b(), 0) & 0x000F_FFFF
    }
    /// Payload length field (equals the buffer length minus 40).
    pub fn payload_len(&self) -> usize {
        usize::from(be16(self.b(), 4))
    }
    /// Next header (transport protocol or first extension header).
    pub fn next_header(&self) -> u8 {
        self.b()[6]
    }
    /// Hop limit.
    pub fn hop_limit(&self) -> u8 {
        self.b()[7]
    }
    /// Source address.
    pub fn src(&self) -> Ipv6Addr {
        let mut a = [0u8; 16];
        a.copy_from_slice(&self.b()[8..24]);
        Ipv6Addr::from(a)
    }
    /// Destination address.
    pub fn dst(&self) -> Ipv6Addr {
        let mut a = [0u8; 16];
        a.copy_from_slice(&self.b()[24..40]);
        Ipv6Addr::from(a)
    }
    /// The fixed header.
    pub fn header(&self) -> &[u8] {
        &self.b()[..IPV6_HEADER_LEN]
    }
    /// Everything after the fixed header.
    pub fn payload(&self) -> &[u8] {
        &self.b()[IPV6_HEADER_LEN..]
    }
    /// The whole packet.
    pub fn as_bytes(&self) -> &[u8] {
        self.b()
    }
    /// Gives the buffer back.
    pub fn into_inner(self) -> T {
        self.buf
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Ipv6Packet<T> {
    /// Sets the hop limit (IPv6 has no header checksum).
    pub fn set_hop_limit(&mut self, hops: u8) {
        self.buf.as_mut()[7] = hops;
    }
    /// Sets the source address (the transport checksum is not updated; see [`crate::nat`]).
    pub fn set_src(&mut self, addr: Ipv6Addr) {
        self.buf.as_mut()[8..24].copy_from_slice(&addr.octets());
    }
    /// Sets the destination address (the transport checksum is not updated; see [`crate::nat`]).
    pub fn set_dst(&mut self, addr: Ipv6Addr) {
        self.buf.as_mut()[24..40].copy_from_slice(&addr.octets());
    }
    /// Mutable payload.
    pub fn payload_mut(&mut self) -> &mut [u8] {
        &mut self.buf.as_mut()[IPV6_HEADER_LEN..]
    }
}

/// An IPv4 or IPv6 packet, chosen by the version nibble.
#[derive(Debug, Clone)]
pub enum IpPacket<T> {
    /// IPv4.
    V4(Ipv4Packet<T>),
    /// IPv6.
    V6(Ipv6Packet<T>),
}

/// The transport header of an [`IpPacket`], validated.
#[derive(Debug, Clone)]
pub enum Transport<'a> {
    /// TCP segment.
    Tcp(crate::transport::TcpPacket<&'a [u8]>),
    /// UDP datagram.
    Udp(crate::transport::UdpPacket<&'a [u8]>),
    /// ICMPv4 message.
    Icmp(crate::transport::IcmpPacket<&'a [u8]>),
    /// ICMPv6 message.
    Icmpv6(crate::transport::IcmpPacket<&'a [u8]>),
}

impl<T: AsRef<[u8]>> IpPacket<T> {
    /// Parses an IPv4 or IPv6 packet by its version nibble.
    pub fn parse(buf: T) -> Result<Self, ParseError> {
        match buf.as_ref().first().map(|b| b >> 4) {
            Some(4) => Ipv4Packet::parse(buf).map(IpPacket::V4),
            Some(6) => Ipv6Packet::parse(buf).map(IpPacket::V6),
            Some(found) => Err(ParseError::BadVersion {
                found,
                expected: Layer::Ipv4,
            }),
            None => Err(ParseError::Truncated {
                layer: Layer::Ipv4,
                need: 1,
                have: 0,
            }),
        }
    }
    /// Source address.
    pub fn src(&self) -> IpAddr {
        match self {
            IpPacket::V4(p) => p.src().into(),
            IpPacket::V6(p) => p.src().into(),
        }
    }
    /// Destination address.
    pub fn dst(&self) -> IpAddr {
        match self {
            IpPacket::V4(p) => p.dst().into(),
            IpPacket::V6(p) => p.dst().into(),
        }
    }
    /// IPv4 protocol or IPv6 next header.
    pub fn protocol(&self) -> u8 {
        match self {
            IpPacket::V4(p) => p.protocol(),
            IpPacket::V6(p) => p.next_header(),
        }
    }
    /// Length of the IP header (IPv6: the fixed header).
    pub fn header_len(&self) -> usize {
        match self {
            IpPacket::V4(p) => p.header_len(),
            IpPacket::V6(_) => IPV6_HEADER_LEN,
        }
    }
    /// The bytes after the IP header.
    pub fn payload(&self) -> &[u8] {
        match self {
            IpPacket::V4(p) => p.payload(),
            IpPacket::V6(p) => p.payload(),
        }
    }
    /// The whole packet.
    pub fn as_bytes(&self) -> &[u8] {
        match self {
            IpPacket::V4(p) => p.as_bytes(),
            IpPacket::V6(p) => p.as_bytes(),
        }
    }
    /// Whether this is IPv6.
    pub fn is_ipv6(&self) -> bool {
        matches!(self, IpPacket::V6(_))
    }

    /// Validates and returns the transport header. Refuses fragments, IPv6 extension headers
    /// and protocols other than TCP, UDP, ICMP (over IPv4) and ICMPv6 (over IPv6).
    pub fn transport(&self) -> Result<Transport<'_>, ParseError> {
        use crate::transport::{IcmpPacket, TcpPacket, UdpPacket};
        let protocol = match self {
            IpPacket::V4(p) => {
                if p.is_fragment() {
                    return Err(ParseError::Fragment);
                }
                p.protocol()
            }
            IpPacket::V6(p) => {
                let nh = p.next_header();
                if nh == proto::IPV6_FRAG {
                    return Err(ParseError::Fragment);
                }
                if proto::is_ipv6_extension(nh) {
                    return Err(ParseError::Ipv6Extension { next_header: nh });
                }
                nh
            }
        };
        let payload = self.payload();
        match (protocol, self.is_ipv6()) {
            (proto::TCP, _) => TcpPacket::parse(payload).map(Transport::Tcp),
            (proto::UDP, _) => UdpPacket::parse(payload).map(Transport::Udp),
            (proto::ICMP, false) => IcmpPacket::parse(payload, Layer::Icmp).map(Transport::Icmp),
            (proto::ICMPV6, true) => {
                IcmpPacket::parse(payload, Layer::Icmpv6).map(Transport::Icmpv6)
            }
            (protocol, _) => Err(ParseError::UnsupportedProtocol { protocol }),
        }
    }
}
