//! TCP, UDP and ICMP/ICMPv6 views.
//!
//! Owns validation of the transport layer. Like the IP views, a view exists only after `parse`
//! checked every length its accessors use.
//!
//! # Invariants and limits
//! - UDP: the length field must equal the datagram length exactly.
//! - TCP: the data offset must be at least 5 words and within the segment.
//! - ICMP/ICMPv6: at least the 8-byte header (type, code, checksum, 4 bytes of "rest").
//! - Checksums are not verified by `parse` (that would cost a pass over every payload byte on the
//!   hot path); callers that need it call `checksum_ok`. Port and identifier setters update the
//!   checksum incrementally (RFC 1624). A UDP checksum of 0 ("none", IPv4 only) is left at 0, and
//!   an update that yields 0 is written as 0xFFFF.

use crate::checksum;
use crate::error::{Layer, ParseError};
use crate::ip::{be16, be32, proto, put16, put32};
use std::net::IpAddr;

/// TCP header length without options.
pub const TCP_MIN_HEADER_LEN: usize = 20;
/// UDP header length.
pub const UDP_HEADER_LEN: usize = 8;
/// ICMP/ICMPv6 header length (type, code, checksum, 4 bytes of message-specific data).
pub const ICMP_HEADER_LEN: usize = 8;

/// TCP control flags (the low byte of the flags field).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct TcpFlags(pub u8);

impl TcpFlags {
    /// No flags (also what a UDP or ICMP packet "carries" for connection tracking).
    pub const NONE: TcpFlags = TcpFlags(0);
    /// FIN.
    pub const FIN: TcpFlags = TcpFlags(0x01);
    /// SYN.
    pub const SYN: TcpFlags = TcpFlags(0x02);
    /// RST.
    pub const RST: TcpFlags = TcpFlags(0x04);
    /// PSH.
    pub const PSH: TcpFlags = TcpFlags(0x08);
    /// ACK.
    pub const ACK: TcpFlags = TcpFlags(0x10);
    /// URG.
    pub const URG: TcpFlags = TcpFlags(0x20);
    /// ECE.
    pub const ECE: TcpFlags = TcpFlags(0x40);
    /// CWR.
    pub const CWR: TcpFlags = TcpFlags(0x80);

    /// Whether every flag of `other` is set.
    pub fn contains(self, other: TcpFlags) -> bool {
        self.0 & other.0 == other.0
    }
}

impl std::ops::BitOr for TcpFlags {
    type Output = TcpFlags;
    fn bitor(self, rhs: TcpFlags) -> TcpFlags {
        TcpFlags(self.0 | rhs.0)
    }
}

/// A validated TCP segment over `T`.
#[derive(Debug, Clone)]
pub struct TcpPacket<T> {
    buf: T,
}

impl<T: AsRef<[u8]>> TcpPacket<T> {
    /// Validates the header length.
    pub fn parse(buf: T) -> Result<Self, ParseError> {
        let b = buf.as_ref();
        if b.len() < TCP_MIN_HEADER_LEN {
            return Err(ParseError::Truncated {
                layer: Layer::Tcp,
                need: TCP_MIN_HEADER_LEN,
                have: b.len(),
            });
        }
        let offset = b[12] >> 4;
        if offset < 5 || usize::from(offset) * 4 > b.len() {
            return Err(ParseError::BadDataOffset {
                offset,
                len: b.len(),
            });
        }
        Ok(TcpPacket { buf })
    }
    fn b(&self) -> &[u8] {
        self.buf.as_ref()
    }
    /// Source port.
    pub fn src_port(&self) -> u16 {
        be16(self.b(), 0)
    }
    /// Destination port.
    pub fn dst_port(&self) -> u16 {
        be16(self.b(), 2)
    }
    /// Sequence number.
    pub fn seq(&self) -> u32 {
        be32(self.b(), 4)
    }
    /// Acknowledgement number.
    pub fn ack(&self) -> u32 {
        be32(self.b(), 8)
    }
    /// Header length in bytes (data offset × 4).
    pub fn header_len(&self) -> usize {
        usize::from(self.b()[12] >> 4) * 4
    }
    /// Control flags.
    pub fn flags(&self) -> TcpFlags {
        TcpFlags(self.b()[13])
    }
    /// Receive window.
    pub fn window(&self) -> u16 {
        be16(self.b(), 14)
    }
    /// Checksum field.
    pub fn checksum(&self) -> u16 {
        be16(self.b(), 16)
    }
    /// Urgent pointer.
    pub fn urgent(&self) -> u16 {
        be16(self.b(), 18)
    }
    /// Option bytes.
    pub fn options(&self) -> &[u8] {
        &self.b()[TCP_MIN_HEADER_LEN..self.header_len()]
    }
    /// Payload bytes.
    pub fn payload(&self) -> &[u8] {
        &self.b()[self.header_len()..]
    }
    /// Sequence space the segment occupies: payload length, plus one each for SYN and FIN.
    pub fn segment_len(&self) -> u32 {
        let f = self.flags();
        // At most 64 KiB of payload: the cast cannot truncate.
        self.payload().len() as u32
            + u32::from(f.contains(TcpFlags::SYN))
            + u32::from(f.contains(TcpFlags::FIN))
    }
    /// Whether the checksum is correct for these pseudo-header addresses.
    pub fn checksum_ok(&self, src: IpAddr, dst: IpAddr) -> bool {
        checksum::transport(src, dst, proto::TCP, self.b()) == 0
    }
    /// The whole segment.
    pub fn as_bytes(&self) -> &[u8] {
        self.b()
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> TcpPacket<T> {
    fn patch16(&mut self, at: usize, new: u16) {
        let c = checksum::update_u16(self.checksum(), be16(self.b(), at), new);
        put16(self.buf.as_mut(), at, new);
        put16(self.buf.as_mut(), 16, c);
    }
    fn patch32(&mut self, at: usize, new: u32) {
        let c = checksum::update_u32(self.checksum(), be32(self.b(), at), new);
        put32(self.buf.as_mut(), at, new);
        put16(self.buf.as_mut(), 16, c);
    }
    /// Sets the source port, updating the checksum.
    pub fn set_src_port(&mut self, port: u16) {
        self.patch16(0, port);
    }
    /// Sets the destination port, updating the checksum.
    pub fn set_dst_port(&mut self, port: u16) {
        self.patch16(2, port);
    }
    /// Sets the sequence number, updating the checksum.
    pub fn set_seq(&mut self, seq: u32) {
        self.patch32(4, seq);
    }
    /// Sets the acknowledgement number, updating the checksum.
    pub fn set_ack(&mut self, ack: u32) {
        self.patch32(8, ack);
    }
    /// Updates the checksum for a pseudo-header address change (after a NAT rewrite of the IP
    /// header).
    pub fn update_checksum_for_addr(&mut self, old: IpAddr, new: IpAddr) {
        let c = checksum::update_addr(self.checksum(), old, new);
        put16(self.buf.as_mut(), 16, c);
    }
    /// Recomputes the checksum from scratch.
    pub fn fill_checksum(&mut self, src: IpAddr, dst: IpAddr) {
        put16(self.buf.as_mut(), 16, 0);
        let c = checksum::transport(src, dst, proto::TCP, self.b());
        put16(self.buf.as_mut(), 16, c);
    }
}

/// A validated UDP datagram over `T`.
#[derive(Debug, Clone)]
pub struct UdpPacket<T> {
    buf: T,
}

impl<T: AsRef<[u8]>> UdpPacket<T> {
    /// Validates the length field against the datagram length.
    pub fn parse(buf: T) -> Result<Self, ParseError> {
        let b = buf.as_ref();
        if b.len() < UDP_HEADER_LEN {
            return Err(ParseError::Truncated {
                layer: Layer::Udp,
                need: UDP_HEADER_LEN,
                have: b.len(),
            });
        }
        let declared = usize::from(be16(b, 4));
        if declared != b.len() {
            return Err(ParseError::LengthMismatch {
                layer: Layer::Udp,
                declared,
                actual: b.len(),
            });
        }
        Ok(UdpPacket { buf })
    }
    fn b(&self) -> &[u8] {
        self.buf.as_ref()
    }
    /// Source port.
    pub fn src_port(&self) -> u16 {
        be16(self.b(), 0)
    }
    /// Destination port.
    pub fn dst_port(&self) -> u16 {
        be16(self.b(), 2)
    }
    /// Length field (equals the datagram length).
    pub fn len(&self) -> usize {
        usize::from(be16(self.b(), 4))
    }
    /// Whether the payload is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == UDP_HEADER_LEN
    }
    /// Checksum field (0: none, IPv4 only).
    pub fn checksum(&self) -> u16 {
        be16(self.b(), 6)
    }
    /// Payload bytes.
    pub fn payload(&self) -> &[u8] {
        &self.b()[UDP_HEADER_LEN..]
    }
    /// Whether the checksum is acceptable: correct, or 0 ("none") over IPv4. Over IPv6 a zero
    /// checksum is invalid (RFC 8200 §8.1).
    pub fn checksum_ok(&self, src: IpAddr, dst: IpAddr) -> bool {
        if self.checksum() == 0 {
            return src.is_ipv4();
        }
        checksum::transport(src, dst, proto::UDP, self.b()) == 0
    }
    /// The whole datagram.
    pub fn as_bytes(&self) -> &[u8] {
        self.b()
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> UdpPacket<T> {
    fn set_checksum_if_present(&mut self, c: impl FnOnce(u16) -> u16) {
        let old = self.checksum();
        if old != 0 {
            put16(self.buf.as_mut(), 6, checksum::udp_field(c(old)));
        }
    }
    /// Sets the source port, updating a present checksum.
    pub fn set_src_port(&mut self, port: u16) {
        let old = self.src_port();
        self.set_checksum_if_present(|c| checksum::update_u16(c, old, port));
        put16(self.buf.as_mut(), 0, port);
    }
    /// Sets the destination port, updating a present checksum.
    pub fn set_dst_port(&mut self, port: u16) {
        let old = self.dst_port();
        self.set_checksum_if_present(|c| checksum::update_u16(c, old, port));
        put16(self.buf.as_mut(), 2, port);
    }
    /// Updates a present checksum for a pseudo-header address change.
    pub fn update_checksum_for_addr(&mut self, old: IpAddr, new: IpAddr) {
        self.set_checksum_if_present(|c| checksum::update_addr(c, old, new));
    }
    /// Recomputes the checksum from scratch (always present afterwards).
    pub fn fill_checksum(&mut self, src: IpAddr, dst: IpAddr) {
        put16(self.buf.as_mut(), 6, 0);
        let c = checksum::udp_field(checksum::transport(src, dst, proto::UDP, self.b()));
        put16(self.buf.as_mut(), 6, c);
    }
    /// Mutable payload.
    pub fn payload_mut(&mut self) -> &mut [u8] {
        &mut self.buf.as_mut()[UDP_HEADER_LEN..]
    }
}

/// ICMPv4 message types used here.
pub mod icmp {
    /// Echo reply.
    pub const ECHO_REPLY: u8 = 0;
    /// Destination unreachable.
    pub const DEST_UNREACHABLE: u8 = 3;
    /// Echo request.
    pub const ECHO_REQUEST: u8 = 8;
    /// Time exceeded.
    pub const TIME_EXCEEDED: u8 = 11;
    /// Parameter problem.
    pub const PARAMETER_PROBLEM: u8 = 12;
    /// Code: port unreachable.
    pub const CODE_PORT_UNREACHABLE: u8 = 3;
    /// Code: communication administratively prohibited (RFC 1812).
    pub const CODE_ADMIN_PROHIBITED: u8 = 13;
}

/// ICMPv6 message types used here.
pub mod icmpv6 {
    /// Destination unreachable.
    pub const DEST_UNREACHABLE: u8 = 1;
    /// Echo request.
    pub const ECHO_REQUEST: u8 = 128;
    /// Echo reply.
    pub const ECHO_REPLY: u8 = 129;
    /// Code: administratively prohibited.
    pub const CODE_ADMIN_PROHIBITED: u8 = 1;
    /// Code: port unreachable.
    pub const CODE_PORT_UNREACHABLE: u8 = 4;
}

/// A validated ICMP or ICMPv6 message over `T`. Both share the layout type, code, checksum,
/// 4 bytes of message-specific data; they differ in the checksum (ICMPv6 covers a pseudo-header).
#[derive(Debug, Clone)]
pub struct IcmpPacket<T> {
    buf: T,
    v6: bool,
}

impl<T: AsRef<[u8]>> IcmpPacket<T> {
    /// Validates the minimum length. `layer` is [`Layer::Icmp`] or [`Layer::Icmpv6`].
    pub fn parse(buf: T, layer: Layer) -> Result<Self, ParseError> {
        let b = buf.as_ref();
        if b.len() < ICMP_HEADER_LEN {
            return Err(ParseError::Truncated {
                layer,
                need: ICMP_HEADER_LEN,
                have: b.len(),
            });
        }
        Ok(IcmpPacket {
            buf,
            v6: layer == Layer::Icmpv6,
        })
    }
    fn b(&self) -> &[u8] {
        self.buf.as_ref()
    }
    /// Whether this is ICMPv6.
    pub fn is_v6(&self) -> bool {
        self.v6
    }
    /// Message type.
    pub fn msg_type(&self) -> u8 {
        self.b()[0]
    }
    /// Message code.
    pub fn code(&self) -> u8 {
        self.b()[1]
    }
    /// Checksum field.
    pub fn checksum(&self) -> u16 {
        be16(self.b(), 2)
    }
    /// Whether this is an echo request or reply (which carry an identifier used as a flow port).
    pub fn is_echo(&self) -> bool {
        let t = self.msg_type();
        if self.v6 {
            t == icmpv6::ECHO_REQUEST || t == icmpv6::ECHO_REPLY
        } else {
            t == icmp::ECHO_REQUEST || t == icmp::ECHO_REPLY
        }
    }
    /// Whether this is an error message (never answered with another error, RFC 1122/4443).
    pub fn is_error(&self) -> bool {
        let t = self.msg_type();
        if self.v6 {
            t < 128
        } else {
            matches!(t, 3 | 4 | 5 | 11 | 12)
        }
    }
    /// Echo identifier (bytes 4–5; meaningful for echo messages only).
    pub fn ident(&self) -> u16 {
        be16(self.b(), 4)
    }
    /// Echo sequence number (bytes 6–7).
    pub fn seq(&self) -> u16 {
        be16(self.b(), 6)
    }
    /// Bytes after the 8-byte header.
    pub fn payload(&self) -> &[u8] {
        &self.b()[ICMP_HEADER_LEN..]
    }
    /// Whether the checksum is correct (`src`/`dst` are used for ICMPv6 only).
    pub fn checksum_ok(&self, src: IpAddr, dst: IpAddr) -> bool {
        if self.v6 {
            checksum::transport(src, dst, proto::ICMPV6, self.b()) == 0
        } else {
            checksum::checksum(self.b()) == 0
        }
    }
    /// The whole message.
    pub fn as_bytes(&self) -> &[u8] {
        self.b()
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> IcmpPacket<T> {
    /// Sets the echo identifier, updating the checksum.
    pub fn set_ident(&mut self, ident: u16) {
        let c = checksum::update_u16(self.checksum(), self.ident(), ident);
        put16(self.buf.as_mut(), 4, ident);
        put16(self.buf.as_mut(), 2, c);
    }
    /// Updates the checksum for a pseudo-header address change (ICMPv6 only; ICMPv4 has no
    /// pseudo-header, so this does nothing there).
    pub fn update_checksum_for_addr(&mut self, old: IpAddr, new: IpAddr) {
        if self.v6 {
            let c = checksum::update_addr(self.checksum(), old, new);
            put16(self.buf.as_mut(), 2, c);
        }
    }
    /// Recomputes the checksum (`src`/`dst` are used for ICMPv6 only).
    pub fn fill_checksum(&mut self, src: IpAddr, dst: IpAddr) {
        put16(self.buf.as_mut(), 2, 0);
        let c = if self.v6 {
            checksum::transport(src, dst, proto::ICMPV6, self.b())
        } else {
            checksum::checksum(self.b())
        };
        put16(self.buf.as_mut(), 2, c);
    }
}
