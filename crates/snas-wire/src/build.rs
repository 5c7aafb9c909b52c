//! Builders for test packets and refusals (TCP RST, ICMP/ICMPv6 unreachable).
//!
//! Owns how SNAS answers a flow it refuses and how tests make input packets. Every builder writes
//! into a caller buffer (`*_into`, no allocation); the `Vec`-returning twins are for tests. The
//! proxy's refusal path writes the refusal at `buf[28..]` and then the GENEVE header in front of
//! it with [`crate::geneve::write_geneve_header`] (or at `buf[56..]` and
//! [`crate::geneve::write_overlay_headers`] for a raw sender).
//!
//! # Invariants
//! - Output packets carry correct IP, TCP, UDP and ICMP checksums, TTL/hop limit 64, IPv4 DF set
//!   and ID 0 (atomic datagrams, RFC 6864).
//! - Refusals answer *as the destination*: source and destination are swapped, so the sandbox's
//!   stack matches them to its socket.
//! - TCP RST follows RFC 793 ("Reset Generation"): if the offending segment has ACK, the RST has
//!   `seq = SEG.ACK` and only RST; otherwise `seq = 0`, `ack = SEG.SEQ + SEG.LEN` (SYN and FIN
//!   count one each) and RST|ACK. A RST is never answered.
//! - ICMP errors quote as much of the offending packet as fits in 576 bytes (IPv4, RFC 1812 §4.3.2.3;
//!   at least the IP header and 8 bytes, RFC 792) or 1280 bytes (IPv6, RFC 4443 §2.4(c)). Never
//!   in answer to an ICMP error, a non-first fragment, or a multicast/unspecified source (RFC 1122
//!   §3.2.2, RFC 4443 §2.4(e)).

use crate::checksum;
use crate::error::{BuildError, Layer, ParseError};
use crate::ip::{proto, put16, put32, IpPacket, Transport, IPV4_MIN_HEADER_LEN, IPV6_HEADER_LEN};
use crate::transport::ICMP_HEADER_LEN;
use crate::transport::{icmp, icmpv6, IcmpPacket, TcpFlags, TCP_MIN_HEADER_LEN, UDP_HEADER_LEN};
use std::net::{IpAddr, SocketAddr};

/// TTL / hop limit of built packets.
pub const DEFAULT_TTL: u8 = 64;
/// Largest IPv4 ICMP error (RFC 1812).
pub const ICMPV4_ERROR_MAX: usize = 576;
/// Largest ICMPv6 error (IPv6 minimum MTU, RFC 4443).
pub const ICMPV6_ERROR_MAX: usize = 1280;

/// A TCP segment to build.
#[derive(Debug, Clone, Copy)]
pub struct TcpSpec<'a> {
    /// Source address and port.
    pub src: SocketAddr,
    /// Destination address and port (same family as `src`).
    pub dst: SocketAddr,
    /// Sequence number.
    pub seq: u32,
    /// Acknowledgement number.
    pub ack: u32,
    /// Control flags.
    pub flags: TcpFlags,
    /// Receive window.
    pub window: u16,
    /// Payload.
    pub payload: &'a [u8],
}

/// A UDP datagram to build.
#[derive(Debug, Clone, Copy)]
pub struct UdpSpec<'a> {
    /// Source address and port.
    pub src: SocketAddr,
    /// Destination address and port (same family as `src`).
    pub dst: SocketAddr,
    /// Payload.
    pub payload: &'a [u8],
}

/// An ICMP or ICMPv6 echo message to build (the family follows the addresses).
#[derive(Debug, Clone, Copy)]
pub struct EchoSpec<'a> {
    /// Source address.
    pub src: IpAddr,
    /// Destination address (same family as `src`).
    pub dst: IpAddr,
    /// Reply rather than request.
    pub reply: bool,
    /// Identifier.
    pub ident: u16,
    /// Sequence number.
    pub seq: u16,
    /// Payload.
    pub payload: &'a [u8],
}

/// Which refusal an ICMP unreachable says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unreachable {
    /// Port unreachable (ICMP 3/3, ICMPv6 1/4): "nothing listens here".
    Port,
    /// Administratively prohibited (ICMP 3/13, ICMPv6 1/1): "policy forbids this".
    AdminProhibited,
}

/// Writes an IP header for `l4_len` bytes of `protocol` payload; returns the header length.
fn write_ip(
    buf: &mut [u8],
    src: IpAddr,
    dst: IpAddr,
    protocol: u8,
    l4_len: usize,
) -> Result<usize, BuildError> {
    let hlen = match (src, dst) {
        (IpAddr::V4(_), IpAddr::V4(_)) => IPV4_MIN_HEADER_LEN,
        (IpAddr::V6(_), IpAddr::V6(_)) => IPV6_HEADER_LEN,
        _ => return Err(BuildError::MixedFamilies),
    };
    let field = if src.is_ipv4() { hlen + l4_len } else { l4_len };
    let max = usize::from(u16::MAX);
    if field > max {
        return Err(BuildError::TooLong {
            len: hlen + l4_len,
            max: if src.is_ipv4() { max } else { max + hlen },
        });
    }
    if buf.len() < hlen + l4_len {
        return Err(BuildError::BufferTooSmall {
            need: hlen + l4_len,
            have: buf.len(),
        });
    }
    // Checked against u16::MAX above.
    let field = field as u16;
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            let h = &mut buf[..hlen];
            h[0] = 0x45;
            h[1] = 0;
            put16(h, 2, field);
            put16(h, 4, 0);
            put16(h, 6, 0x4000);
            h[8] = DEFAULT_TTL;
            h[9] = protocol;
            put16(h, 10, 0);
            h[12..16].copy_from_slice(&s.octets());
            h[16..20].copy_from_slice(&d.octets());
            let c = checksum::checksum(h);
            put16(h, 10, c);
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            let h = &mut buf[..hlen];
            put32(h, 0, 0x6000_0000);
            put16(h, 4, field);
            h[6] = protocol;
            h[7] = DEFAULT_TTL;
            h[8..24].copy_from_slice(&s.octets());
            h[24..40].copy_from_slice(&d.octets());
        }
        _ => return Err(BuildError::MixedFamilies),
    }
    Ok(hlen)
}

/// Builds an IPv4/IPv6 + TCP segment (no TCP options) into `buf`; returns its length.
pub fn tcp_into(buf: &mut [u8], spec: &TcpSpec<'_>) -> Result<usize, BuildError> {
    let l4_len = TCP_MIN_HEADER_LEN + spec.payload.len();
    let h = write_ip(buf, spec.src.ip(), spec.dst.ip(), proto::TCP, l4_len)?;
    let t = &mut buf[h..h + l4_len];
    put16(t, 0, spec.src.port());
    put16(t, 2, spec.dst.port());
    put32(t, 4, spec.seq);
    put32(t, 8, spec.ack);
    t[12] = 5 << 4;
    t[13] = spec.flags.0;
    put16(t, 14, spec.window);
    put16(t, 16, 0);
    put16(t, 18, 0);
    t[TCP_MIN_HEADER_LEN..].copy_from_slice(spec.payload);
    let c = checksum::transport(spec.src.ip(), spec.dst.ip(), proto::TCP, t);
    put16(t, 16, c);
    Ok(h + l4_len)
}

/// Builds an IPv4/IPv6 + UDP datagram (checksum always present) into `buf`; returns its length.
pub fn udp_into(buf: &mut [u8], spec: &UdpSpec<'_>) -> Result<usize, BuildError> {
    let l4_len = UDP_HEADER_LEN + spec.payload.len();
    let h = write_ip(buf, spec.src.ip(), spec.dst.ip(), proto::UDP, l4_len)?;
    let u = &mut buf[h..h + l4_len];
    put16(u, 0, spec.src.port());
    put16(u, 2, spec.dst.port());
    // write_ip checked that the whole packet fits in 64 KiB, so the UDP length does too.
    put16(u, 4, l4_len as u16);
    put16(u, 6, 0);
    u[UDP_HEADER_LEN..].copy_from_slice(spec.payload);
    let c = checksum::udp_field(checksum::transport(
        spec.src.ip(),
        spec.dst.ip(),
        proto::UDP,
        u,
    ));
    put16(u, 6, c);
    Ok(h + l4_len)
}

/// Builds an ICMP (IPv4) or ICMPv6 (IPv6) echo request/reply into `buf`; returns its length.
pub fn icmp_echo_into(buf: &mut [u8], spec: &EchoSpec<'_>) -> Result<usize, BuildError> {
    let v6 = spec.src.is_ipv6();
    let (protocol, ty) = match (v6, spec.reply) {
        (false, false) => (proto::ICMP, icmp::ECHO_REQUEST),
        (false, true) => (proto::ICMP, icmp::ECHO_REPLY),
        (true, false) => (proto::ICMPV6, icmpv6::ECHO_REQUEST),
        (true, true) => (proto::ICMPV6, icmpv6::ECHO_REPLY),
    };
    let l4_len = ICMP_HEADER_LEN + spec.payload.len();
    let h = write_ip(buf, spec.src, spec.dst, protocol, l4_len)?;
    let m = &mut buf[h..h + l4_len];
    m[0] = ty;
    m[1] = 0;
    put16(m, 2, 0);
    put16(m, 4, spec.ident);
    put16(m, 6, spec.seq);
    m[ICMP_HEADER_LEN..].copy_from_slice(spec.payload);
    let c = if v6 {
        checksum::transport(spec.src, spec.dst, protocol, m)
    } else {
        checksum::checksum(m)
    };
    put16(m, 2, c);
    Ok(h + l4_len)
}

/// Builds the TCP RST that refuses `offending` (an IPv4/IPv6 + TCP packet) into `buf`.
pub fn tcp_rst_into(buf: &mut [u8], offending: &[u8]) -> Result<usize, BuildError> {
    let ip = IpPacket::parse(offending)?;
    let Transport::Tcp(t) = ip.transport()? else {
        return Err(ParseError::UnsupportedProtocol {
            protocol: ip.protocol(),
        }
        .into());
    };
    let f = t.flags();
    if f.contains(TcpFlags::RST) {
        return Err(BuildError::MustNotAnswer {
            why: "the offending segment is a RST",
        });
    }
    let (seq, ack, flags) = if f.contains(TcpFlags::ACK) {
        (t.ack(), 0, TcpFlags::RST)
    } else {
        (
            0,
            t.seq().wrapping_add(t.segment_len()),
            TcpFlags::RST | TcpFlags::ACK,
        )
    };
    let spec = TcpSpec {
        src: SocketAddr::new(ip.dst(), t.dst_port()),
        dst: SocketAddr::new(ip.src(), t.src_port()),
        seq,
        ack,
        flags,
        window: 0,
        payload: &[],
    };
    tcp_into(buf, &spec)
}

/// Builds the ICMP (IPv4) or ICMPv6 (IPv6) destination-unreachable message that refuses
/// `offending` into `buf`.
pub fn icmp_unreachable_into(
    buf: &mut [u8],
    offending: &[u8],
    why: Unreachable,
) -> Result<usize, BuildError> {
    let ip = IpPacket::parse(offending)?;
    let src = ip.src();
    if src.is_multicast() || src.is_unspecified() || ip.dst().is_multicast() {
        return Err(BuildError::MustNotAnswer {
            why: "multicast or unspecified address",
        });
    }
    match &ip {
        IpPacket::V4(p) if p.fragment_offset() != 0 => {
            return Err(BuildError::MustNotAnswer {
                why: "non-first fragment",
            });
        }
        IpPacket::V4(p) if p.protocol() == proto::ICMP && !p.is_fragment() => {
            if let Ok(m) = IcmpPacket::parse(p.payload(), Layer::Icmp) {
                if m.is_error() {
                    return Err(BuildError::MustNotAnswer {
                        why: "the offending packet is an ICMP error",
                    });
                }
            }
        }
        IpPacket::V6(p) if p.next_header() == proto::ICMPV6 => {
            if let Ok(m) = IcmpPacket::parse(p.payload(), Layer::Icmpv6) {
                if m.is_error() {
                    return Err(BuildError::MustNotAnswer {
                        why: "the offending packet is an ICMPv6 error",
                    });
                }
            }
        }
        _ => {}
    }
    let (protocol, ty, code, max) = match (ip.is_ipv6(), why) {
        (false, Unreachable::Port) => (
            proto::ICMP,
            icmp::DEST_UNREACHABLE,
            icmp::CODE_PORT_UNREACHABLE,
            ICMPV4_ERROR_MAX,
        ),
        (false, Unreachable::AdminProhibited) => (
            proto::ICMP,
            icmp::DEST_UNREACHABLE,
            icmp::CODE_ADMIN_PROHIBITED,
            ICMPV4_ERROR_MAX,
        ),
        (true, Unreachable::Port) => (
            proto::ICMPV6,
            icmpv6::DEST_UNREACHABLE,
            icmpv6::CODE_PORT_UNREACHABLE,
            ICMPV6_ERROR_MAX,
        ),
        (true, Unreachable::AdminProhibited) => (
            proto::ICMPV6,
            icmpv6::DEST_UNREACHABLE,
            icmpv6::CODE_ADMIN_PROHIBITED,
            ICMPV6_ERROR_MAX,
        ),
    };
    let ip_hlen = if ip.is_ipv6() {
        IPV6_HEADER_LEN
    } else {
        IPV4_MIN_HEADER_LEN
    };
    let quote_len = offending.len().min(max - ip_hlen - ICMP_HEADER_LEN);
    let l4_len = ICMP_HEADER_LEN + quote_len;
    // Answer as the destination the sandbox tried to reach.
    let (from, to) = (ip.dst(), src);
    let h = write_ip(buf, from, to, protocol, l4_len)?;
    let m = &mut buf[h..h + l4_len];
    m[0] = ty;
    m[1] = code;
    put16(m, 2, 0);
    put32(m, 4, 0);
    m[ICMP_HEADER_LEN..].copy_from_slice(&offending[..quote_len]);
    let c = if ip.is_ipv6() {
        checksum::transport(from, to, protocol, m)
    } else {
        checksum::checksum(m)
    };
    put16(m, 2, c);
    Ok(h + l4_len)
}

fn into_vec(
    cap: usize,
    f: impl FnOnce(&mut [u8]) -> Result<usize, BuildError>,
) -> Result<Vec<u8>, BuildError> {
    let mut v = vec![0u8; cap];
    let n = f(&mut v)?;
    v.truncate(n);
    Ok(v)
}

/// [`tcp_into`] into a new `Vec`.
pub fn tcp(spec: &TcpSpec<'_>) -> Result<Vec<u8>, BuildError> {
    into_vec(
        IPV6_HEADER_LEN + TCP_MIN_HEADER_LEN + spec.payload.len(),
        |b| tcp_into(b, spec),
    )
}

/// [`udp_into`] into a new `Vec`.
pub fn udp(spec: &UdpSpec<'_>) -> Result<Vec<u8>, BuildError> {
    into_vec(IPV6_HEADER_LEN + UDP_HEADER_LEN + spec.payload.len(), |b| {
        udp_into(b, spec)
    })
}

/// [`icmp_echo_into`] into a new `Vec`.
pub fn icmp_echo(spec: &EchoSpec<'_>) -> Result<Vec<u8>, BuildError> {
    into_vec(
        IPV6_HEADER_LEN + ICMP_HEADER_LEN + spec.payload.len(),
        |b| icmp_echo_into(b, spec),
    )
}

/// [`tcp_rst_into`] into a new `Vec`.
pub fn tcp_rst(offending: &[u8]) -> Result<Vec<u8>, BuildError> {
    into_vec(IPV6_HEADER_LEN + TCP_MIN_HEADER_LEN, |b| {
        tcp_rst_into(b, offending)
    })
}

/// [`icmp_unreachable_into`] into a new `Vec`.
pub fn icmp_unreachable(offending: &[u8], why: Unreachable) -> Result<Vec<u8>, BuildError> {
    into_vec(ICMPV6_ERROR_MAX, |b| {
        icmp_unreachable_into(b, offending, why)
    })
}
