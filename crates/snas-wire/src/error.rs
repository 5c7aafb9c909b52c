//! Why a packet could not be parsed or built.
//!
//! One [`ParseError`] serves every view in this crate (IP, transport, GENEVE) because callers
//! treat them alike: count the drop under [`ParseError::reason`] and move on. Parse errors are
//! cheap (`Copy`, no allocation) so that the hot path can return them per packet.

use crate::Reason;
use std::fmt;

/// The protocol layer an error refers to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Layer {
    /// IPv4 header.
    Ipv4,
    /// IPv6 fixed header.
    Ipv6,
    /// TCP header.
    Tcp,
    /// UDP header.
    Udp,
    /// ICMPv4 message.
    Icmp,
    /// ICMPv6 message.
    Icmpv6,
    /// GENEVE base header or options.
    Geneve,
}

impl fmt::Display for Layer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Layer::Ipv4 => "IPv4",
            Layer::Ipv6 => "IPv6",
            Layer::Tcp => "TCP",
            Layer::Udp => "UDP",
            Layer::Icmp => "ICMP",
            Layer::Icmpv6 => "ICMPv6",
            Layer::Geneve => "GENEVE",
        })
    }
}

/// A packet was rejected by a parser. Each variant maps to a drop [`Reason`] via
/// [`ParseError::reason`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// The buffer ends before the header does.
    #[error("{layer} truncated: need {need} bytes, have {have}")]
    Truncated {
        /// Layer being parsed.
        layer: Layer,
        /// Bytes the header needs.
        need: usize,
        /// Bytes available.
        have: usize,
    },
    /// A length field disagrees with the bytes present (too short, too long, or trailing bytes).
    #[error("{layer} length field says {declared} bytes, packet holds {actual}")]
    LengthMismatch {
        /// Layer being parsed.
        layer: Layer,
        /// Length the header declares.
        declared: usize,
        /// Length actually present.
        actual: usize,
    },
    /// The IP version nibble is not the one expected (or not 4/6 at all).
    #[error("IP version {found} where {expected} was expected")]
    BadVersion {
        /// Version nibble found.
        found: u8,
        /// Layer expected.
        expected: Layer,
    },
    /// IPv4 IHL below 5 words.
    #[error("IPv4 header length {ihl} words is below the minimum of 5")]
    BadIhl {
        /// IHL found.
        ihl: u8,
    },
    /// TCP data offset below 5 words or beyond the segment.
    #[error("TCP data offset {offset} words is invalid for a {len}-byte segment")]
    BadDataOffset {
        /// Data offset found.
        offset: u8,
        /// Segment length.
        len: usize,
    },
    /// A checksum that must be valid is not.
    #[error("{layer} checksum invalid")]
    BadChecksum {
        /// Layer whose checksum failed.
        layer: Layer,
    },
    /// An IPv4 fragment (MF set or offset non-zero) or an IPv6 fragment header.
    #[error("IP fragment")]
    Fragment,
    /// IPv4 options where none are accepted (the outer header of the overlay).
    #[error("IPv4 options present")]
    Ipv4Options,
    /// An IPv6 extension header; they are not walked (see `ip` module docs).
    #[error("IPv6 extension header (next header {next_header})")]
    Ipv6Extension {
        /// The extension header's protocol number.
        next_header: u8,
    },
    /// A transport protocol that carries no flow we handle.
    #[error("unsupported transport protocol {protocol}")]
    UnsupportedProtocol {
        /// IP protocol / next header number.
        protocol: u8,
    },
    /// An ICMP message that is not an echo request/reply and so has no flow key.
    #[error("{layer} type {ty} carries no flow")]
    NotAFlow {
        /// ICMP or ICMPv6.
        layer: Layer,
        /// Message type.
        ty: u8,
    },
    /// The outer packet is not UDP to the GENEVE port.
    #[error("outer packet is not UDP to port 6081 (protocol {protocol}, port {port})")]
    NotGeneve {
        /// Outer IP protocol.
        protocol: u8,
        /// Outer UDP destination port (0 if not UDP).
        port: u16,
    },
    /// GENEVE version other than 0.
    #[error("GENEVE version {version} is not 0")]
    GeneveVersion {
        /// Version found.
        version: u8,
    },
    /// GENEVE OAM (control) packet: never carries tenant traffic.
    #[error("GENEVE OAM packet")]
    GeneveOam,
    /// GENEVE VNI other than 0.
    #[error("GENEVE VNI {vni} is not 0")]
    GeneveVni {
        /// VNI found.
        vni: u32,
    },
    /// GENEVE protocol type other than IPv4/IPv6.
    #[error("GENEVE protocol type {ethertype:#06x} is not IPv4 or IPv6")]
    GeneveProtocol {
        /// Protocol type found.
        ethertype: u16,
    },
    /// GENEVE C bit clear although a critical option is present.
    #[error("GENEVE critical option present but C bit clear")]
    GeneveCriticalFlag,
    /// A GENEVE option runs past the option area.
    #[error("GENEVE option at byte {offset} overruns the {opt_len}-byte option area")]
    GeneveOptionOverrun {
        /// Offset of the option within the option area.
        offset: usize,
        /// Length of the option area.
        opt_len: usize,
    },
    /// The inner packet's version nibble disagrees with the GENEVE protocol type.
    #[error("GENEVE protocol type says {expected}, inner packet is version {found}")]
    GeneveInnerMismatch {
        /// What the protocol type says.
        expected: Layer,
        /// Version nibble of the inner packet (0 when there is no inner packet).
        found: u8,
    },
    /// An unknown GENEVE option with the critical bit set (RFC 8926 §3.5.1: must drop).
    #[error("unknown critical GENEVE option class {class:#06x} type {ty:#04x}")]
    UnknownCriticalOption {
        /// Option class.
        class: u16,
        /// Option type.
        ty: u8,
    },
    /// The SNAS option is absent.
    #[error("SNAS GENEVE option missing")]
    MissingSnasOption,
    /// The SNAS option appears more than once.
    #[error("SNAS GENEVE option present more than once")]
    DuplicateSnasOption,
    /// The SNAS option has the wrong length.
    #[error("SNAS GENEVE option length {words} words, expected 4")]
    BadSnasOptionLength {
        /// Length field found (4-byte words).
        words: u8,
    },
}

impl ParseError {
    /// The drop reason under which the caller counts this packet.
    pub fn reason(&self) -> Reason {
        match self {
            ParseError::Truncated {
                layer: Layer::Geneve,
                ..
            }
            | ParseError::LengthMismatch {
                layer: Layer::Geneve,
                ..
            }
            | ParseError::GeneveVersion { .. }
            | ParseError::GeneveOam
            | ParseError::GeneveVni { .. }
            | ParseError::GeneveProtocol { .. }
            | ParseError::GeneveCriticalFlag
            | ParseError::GeneveOptionOverrun { .. }
            | ParseError::GeneveInnerMismatch { .. } => Reason::GeneveMalformed,
            ParseError::UnknownCriticalOption { .. }
            | ParseError::MissingSnasOption
            | ParseError::DuplicateSnasOption
            | ParseError::BadSnasOptionLength { .. } => Reason::GeneveOption,
            ParseError::Truncated { .. }
            | ParseError::LengthMismatch { .. }
            | ParseError::BadVersion { .. }
            | ParseError::BadIhl { .. }
            | ParseError::BadDataOffset { .. }
            | ParseError::BadChecksum { .. }
            | ParseError::NotGeneve { .. } => Reason::Malformed,
            ParseError::Fragment => Reason::Fragment,
            ParseError::Ipv4Options | ParseError::Ipv6Extension { .. } => Reason::IpOptions,
            // "Allowed destination, but not on this port/protocol" is the closest stable reason.
            ParseError::UnsupportedProtocol { .. } | ParseError::NotAFlow { .. } => {
                Reason::PortDenied
            }
        }
    }
}

/// A packet could not be built into the caller's buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BuildError {
    /// The output buffer is too small.
    #[error("output buffer holds {have} bytes, packet needs {need}")]
    BufferTooSmall {
        /// Bytes needed.
        need: usize,
        /// Bytes available.
        have: usize,
    },
    /// The packet would exceed the maximum its length fields can express.
    #[error("packet of {len} bytes exceeds the {max}-byte maximum")]
    TooLong {
        /// Length the packet would have.
        len: usize,
        /// Largest length allowed.
        max: usize,
    },
    /// Source and destination addresses are of different families.
    #[error("source and destination addresses are of different IP families")]
    MixedFamilies,
    /// The inner packet to encapsulate is not IPv4 or IPv6.
    #[error("inner packet is not IPv4 or IPv6 (first byte {first_byte:#04x})")]
    NotIp {
        /// First byte of the inner packet (0 when empty).
        first_byte: u8,
    },
    /// The offending packet could not be parsed, so no refusal can answer it.
    #[error("offending packet unparseable: {0}")]
    Offending(#[from] ParseError),
    /// The offending packet must not be answered (a RST, an ICMP error, a non-first fragment).
    #[error("offending packet must not be answered: {why}")]
    MustNotAnswer {
        /// Which rule forbids answering.
        why: &'static str,
    },
}
