//! Flow keys extracted from inner packets (the proxy's conntrack key).
//!
//! # Design
//! [`FiveTuple`] uses [`IpAddr`] for both families rather than a separate IPv4 fast path: one
//! type keeps conntrack code simple, and hashing 40 bytes is small next to the rest of the per-
//! packet work. ICMP echo (request and reply, v4 and v6) uses its identifier as *both* ports, so
//! the tuple of a reply equals [`FiveTuple::reversed`] of the request's, as for TCP and UDP; a NAT
//! that rewrites "the port" of an echo rewrites the identifier. Other ICMP messages have no flow
//! and are refused with [`ParseError::NotAFlow`].

use crate::error::{Layer, ParseError};
use crate::ip::{proto, IpPacket, Transport};
use std::fmt;
use std::net::IpAddr;

/// Transport protocol of a flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum L4Proto {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
    /// ICMP echo (IPv4).
    Icmp,
    /// ICMPv6 echo.
    Icmpv6,
}

impl L4Proto {
    /// IP protocol number.
    pub fn number(self) -> u8 {
        match self {
            L4Proto::Tcp => proto::TCP,
            L4Proto::Udp => proto::UDP,
            L4Proto::Icmp => proto::ICMP,
            L4Proto::Icmpv6 => proto::ICMPV6,
        }
    }
}

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
        let p = match self.proto {
            L4Proto::Tcp => "tcp",
            L4Proto::Udp => "udp",
            L4Proto::Icmp => "icmp",
            L4Proto::Icmpv6 => "icmpv6",
        };
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
