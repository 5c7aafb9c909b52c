//! Packet views and builders shared by the proxy, the agent, the BPF tests and the testbed. No I/O.
//!
//! This is the protocol SNAS owns and the proxy's hot path (decap → conntrack → NAT → encap at
//! millions of packets per second per core), so the views are hand-written and zero-copy, in the
//! style of smoltcp's and etherparse's, rather than a general packet library: a view borrows the
//! caller's buffer, is constructed only by a checked `parse` that validates every length its
//! accessors rely on, and never allocates. Malformed input is an `Err(ParseError)` whose
//! [`ParseError::reason`] names the drop [`Reason`]; no input makes a parser panic (property tests
//! and the `wire_packet` / `wire_geneve` fuzz targets check this).
//!
//! # Layout
//! - [`checksum`]: RFC 1071 sums and RFC 1624 incremental updates.
//! - [`ip`]: IPv4 / IPv6 views, [`IpPacket`] dispatch and transport validation.
//! - [`transport`]: TCP, UDP, ICMP/ICMPv6 views with checksum-preserving setters.
//! - [`flow`]: [`FiveTuple`], the conntrack key, from an inner packet.
//! - [`nat`]: in-place address/port rewrites with incremental checksums.
//! - [`geneve`]: the overlay: GENEVE + SNAS option parse, decap, encap.
//! - [`build`]: test packets and refusals (TCP RST, ICMP/ICMPv6 unreachable).
//! - [`error`]: [`ParseError`] (→ [`Reason`]) and [`BuildError`].
//! - [`reason`]: the stable drop-reason list shared with the BPF programs.
//! - [`types`]: the shared vocabulary: [`JobKey`], [`TenantId`], [`PolicySerial`], [`Bps`], [`L4Proto`],
//!   [`RuleProtocol`] (serde behind the `serde` feature).
#![forbid(unsafe_code)]

pub mod build;
pub mod checksum;
pub mod error;
pub mod flow;
pub mod geneve;
pub mod ip;
pub mod nat;
pub mod reason;
pub mod transport;
pub mod types;

pub use error::{BuildError, Layer, ParseError};
pub use flow::{flow_tuple, quoted_flow_tuple, FiveTuple, L4Proto};
pub use geneve::{
    decapsulate, encapsulate_into, parse_payload, write_geneve_header, write_overlay_headers,
    Decapsulated, GenevePayload, InnerProto, OuterParams, SnasOption, OVERLAY_OVERHEAD,
};
pub use ip::{IpPacket, Ipv4Packet, Ipv6Packet, Transport};
pub use nat::{rewrite, rewrite_icmp_error, Endpoint, NatError, NatPacket};
pub use reason::Reason;
pub use transport::{IcmpPacket, TcpFlags, TcpPacket, UdpPacket};
pub use types::{
    Bps, BpsError, JobKey, JobKeyError, PolicySerial, PolicySerialError, RuleProtocol, TenantId,
};
