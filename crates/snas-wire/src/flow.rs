//! Flow keys extracted from inner packets (the proxy's conntrack key).
//!
//! # Design
//! [`FiveTuple`] uses [`IpAddr`] for both families rather than a separate IPv4 fast path: one
//! type keeps conntrack code simple, and hashing 40 bytes is small next to the rest of the per-
//! packet work. ICMP echo (request and reply, v4 and v6) uses its identifier as *both* ports, so
//! the tuple of a reply equals [`FiveTuple::reversed`] of the request's, as for TCP and UDP; a NAT
//! that rewrites "the port" of an echo rewrites the identifier. Other ICMP messages have no flow
//! and are refused with [`ParseError::NotAFlow`]; for ICMP *errors* arriving from the internet,
//! [`quoted_flow_tuple`] gives the key of the packet they quote.

use crate::error::{Layer, ParseError};
use crate::ip::{be16, proto, IpPacket, Transport, IPV4_MIN_HEADER_LEN, IPV6_HEADER_LEN};
use std::fmt;
use std::net::IpAddr;

pub use crate::types::L4Proto;

/// A flow key: protocol, source and destination address and port (ICMP echo: identifier).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FiveTuple {
    /// Transport protocol.
    pub proto: L4Proto,
    /// Source address.
    pub src: IpAddr,
    /// Source port (ICMP echo: identifier).
    pub src_port: u16,
    /// Destination address (same family as `src`).
    pub dst: IpAddr,
    /// Destination port (ICMP echo: identifier).
    pub dst_port: u16,
}

impl FiveTuple {
    /// The tuple of the reply direction.
    pub fn reversed(&self) -> FiveTuple {
        FiveTuple {
            proto: self.proto,
            src: self.dst,
            src_port: self.dst_port,
            dst: self.src,
            dst_port: self.src_port,
        }
    }
}

impl fmt::Display for FiveTuple {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let p = self.proto.name();
        let ep = |a: &IpAddr, port: u16| match a {
            IpAddr::V4(a) => format!("{a}:{port}"),
            IpAddr::V6(a) => format!("[{a}]:{port}"),
        };
        write!(
            f,
            "{p} {} -> {}",
            ep(&self.src, self.src_port),
            ep(&self.dst, self.dst_port)
        )
    }
}

impl<T: AsRef<[u8]>> IpPacket<T> {
    /// The flow key of this packet (see the module docs for ICMP).
    pub fn flow_tuple(&self) -> Result<FiveTuple, ParseError> {
        let (proto, src_port, dst_port) = match self.transport()? {
            Transport::Tcp(t) => (L4Proto::Tcp, t.src_port(), t.dst_port()),
            Transport::Udp(u) => (L4Proto::Udp, u.src_port(), u.dst_port()),
            Transport::Icmp(i) | Transport::Icmpv6(i) => {
                let layer = if i.is_v6() {
                    Layer::Icmpv6
                } else {
                    Layer::Icmp
                };
                if !i.is_echo() {
                    return Err(ParseError::NotAFlow {
                        layer,
                        ty: i.msg_type(),
                    });
                }
                let p = if i.is_v6() {
                    L4Proto::Icmpv6
                } else {
                    L4Proto::Icmp
                };
                (p, i.ident(), i.ident())
            }
        };
        Ok(FiveTuple {
            proto,
            src: self.src(),
            src_port,
            dst: self.dst(),
            dst_port,
        })
    }
}

/// Parses an IPv4 or IPv6 packet and returns its flow key.
pub fn flow_tuple(packet: &[u8]) -> Result<FiveTuple, ParseError> {
    IpPacket::parse(packet)?.flow_tuple()
}

/// Where the parts of an ICMP error's quoted packet lie, as offsets into the whole packet.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Quote {
    /// IPv6 (outer and quoted have the same family).
    pub v6: bool,
    /// Offset of the ICMP header.
    pub icmp_off: usize,
    /// Offset of the quoted IP header.
    pub ip_off: usize,
    /// Offset of the quoted transport header.
    pub l4_off: usize,
    /// Flow key of the quoted packet.
    pub tuple: FiveTuple,
}

/// Validates an ICMP/ICMPv6 error and the packet it quotes. The quote is usually truncated, so
/// only the quoted IP header and the first 8 bytes of its transport header must be present.
pub(crate) fn parse_quote(packet: &[u8]) -> Result<Quote, ParseError> {
    let ip = IpPacket::parse(packet)?;
    let v6 = ip.is_ipv6();
    let (m, layer) = match ip.transport()? {
        Transport::Icmp(m) => (m, Layer::Icmp),
        Transport::Icmpv6(m) => (m, Layer::Icmpv6),
        Transport::Tcp(_) | Transport::Udp(_) => {
            return Err(ParseError::UnsupportedProtocol {
                protocol: ip.protocol(),
            })
        }
    };
    // Destination unreachable, time exceeded, parameter problem (and ICMPv6 packet too big):
    // the errors a NAT must translate. Redirects and source quench are not forwarded.
    let ty = m.msg_type();
    let translatable = if v6 {
        matches!(ty, 1..=4)
    } else {
        matches!(ty, 3 | 11 | 12)
    };
    if !translatable {
        return Err(ParseError::NotAFlow { layer, ty });
    }
    let icmp_off = ip.header_len();
    let ip_off = icmp_off + crate::transport::ICMP_HEADER_LEN;
    let q = &packet[ip_off..];
    let truncated = |need: usize| ParseError::Truncated {
        layer,
        need,
        have: q.len(),
    };
    let (q_hlen, protocol, src, dst) = if v6 {
        if q.len() < IPV6_HEADER_LEN {
            return Err(truncated(IPV6_HEADER_LEN));
        }
        if q[0] >> 4 != 6 {
            return Err(ParseError::BadVersion {
                found: q[0] >> 4,
                expected: Layer::Ipv6,
            });
        }
        let nh = q[6];
        if nh == proto::IPV6_FRAG {
            return Err(ParseError::Fragment);
        }
        if proto::is_ipv6_extension(nh) {
            return Err(ParseError::Ipv6Extension { next_header: nh });
        }
        let mut s = [0u8; 16];
        let mut d = [0u8; 16];
        s.copy_from_slice(&q[8..24]);
        d.copy_from_slice(&q[24..40]);
        (IPV6_HEADER_LEN, nh, IpAddr::from(s), IpAddr::from(d))
    } else {
        if q.len() < IPV4_MIN_HEADER_LEN {
            return Err(truncated(IPV4_MIN_HEADER_LEN));
        }
        if q[0] >> 4 != 4 {
            return Err(ParseError::BadVersion {
                found: q[0] >> 4,
                expected: Layer::Ipv4,
            });
        }
        let ihl = q[0] & 0x0F;
        if ihl < 5 {
            return Err(ParseError::BadIhl { ihl });
        }
        if be16(q, 6) & 0x1FFF != 0 {
            return Err(ParseError::Fragment);
        }
        let s = [q[12], q[13], q[14], q[15]];
        let d = [q[16], q[17], q[18], q[19]];
        (usize::from(ihl) * 4, q[9], IpAddr::from(s), IpAddr::from(d))
    };
    if q.len() < q_hlen + 8 {
        return Err(truncated(q_hlen + 8));
    }
    let l4 = &q[q_hlen..];
    let (l4proto, src_port, dst_port) = match (protocol, v6) {
        (proto::TCP, _) => (L4Proto::Tcp, be16(l4, 0), be16(l4, 2)),
        (proto::UDP, _) => (L4Proto::Udp, be16(l4, 0), be16(l4, 2)),
        (proto::ICMP, false) if matches!(l4[0], 0 | 8) => (L4Proto::Icmp, be16(l4, 4), be16(l4, 4)),
        (proto::ICMPV6, true) if matches!(l4[0], 128 | 129) => {
            (L4Proto::Icmpv6, be16(l4, 4), be16(l4, 4))
        }
        (proto::ICMP, false) => {
            return Err(ParseError::NotAFlow {
                layer: Layer::Icmp,
                ty: l4[0],
            })
        }
        (proto::ICMPV6, true) => {
            return Err(ParseError::NotAFlow {
                layer: Layer::Icmpv6,
                ty: l4[0],
            })
        }
        (protocol, _) => return Err(ParseError::UnsupportedProtocol { protocol }),
    };
    let tuple = FiveTuple {
        proto: l4proto,
        src,
        src_port,
        dst,
        dst_port,
    };
    Ok(Quote {
        v6,
        icmp_off,
        ip_off,
        l4_off: ip_off + q_hlen,
        tuple,
    })
}

/// For an ICMP error (destination unreachable, time exceeded, parameter problem; ICMPv6 also
/// packet too big), the flow key of the packet it quotes. A proxy receiving such an error from
/// the internet looks up conntrack with it (it is the key of the proxy's own outgoing packet) and
/// translates the error with [`crate::nat::rewrite_icmp_error`]. The quote may be truncated:
/// only its IP header and the first 8 transport bytes are required.
pub fn quoted_flow_tuple(packet: &[u8]) -> Result<FiveTuple, ParseError> {
    parse_quote(packet).map(|q| q.tuple)
}
