//! The SNAS overlay: GENEVE (RFC 8926) over IPv4/UDP with one critical SNAS option.
//!
//! Owns the overlay wire format shared by tier 1 (C, `snas-bpf`), the proxy and the tests; the
//! operator-facing description with the header diagram is `docs/overlay.md`.
//!
//! ```text
//! outer IPv4 (20, no options, DF, TTL 64, proto 17)
//! UDP (8, dst 6081, src 0xC000 | (flow_hash & 0x3FFF), checksum 0)
//! GENEVE base (8): ver 0 | opt_len 5 | O=0 C=1 | protocol 0x0800/0x86DD | VNI 0
//! SNAS option (20): class 0xFF53 | type 0x81 | len 4 | tenant_id u32 | job_key u64 | serial u32
//! inner IPv4/IPv6 packet (no Ethernet)
//! ```
//!
//! # Receive rules (what [`parse_payload`] enforces, each drop with a reason)
//! - Version 0, O bit clear, VNI 0, protocol type IPv4 or IPv6, and the inner packet's version
//!   nibble agreeing with it: else `geneve_malformed`.
//! - Options are walked within `opt_len`; one overrunning the area is `geneve_malformed`.
//!   Unknown options with the critical bit (type & 0x80) are `geneve_option` (RFC 8926 §3.5.1);
//!   unknown non-critical options are skipped, so `opt_len` may exceed 5 words.
//! - Exactly one SNAS option of length 4 words: missing, repeated or mis-sized is
//!   `geneve_option`. Since it is critical, the C bit must be set: else `geneve_malformed`.
//!
//! [`decapsulate`] additionally checks the outer IPv4 header (no options, no fragment, valid
//! header checksum, exact lengths) and UDP (destination port 6081; a non-zero checksum must be
//! valid; the contract sends 0).
//!
//! # Limits
//! The outer header is IPv4 only (as the contract fixes). Builders write into caller buffers and
//! never allocate; the `Vec` wrappers are for tests.

use crate::checksum;
use crate::error::{BuildError, Layer, ParseError};
use crate::ip::{be16, be32, proto, put16, put32, Ipv4Packet};
use crate::transport::UdpPacket;
use crate::types::{JobKey, PolicySerial, TenantId};
use std::net::Ipv4Addr;
use std::ops::Range;

/// UDP destination port of GENEVE (IANA).
pub const GENEVE_PORT: u16 = 6081;
/// Option class of the SNAS option (experimental range).
pub const SNAS_OPTION_CLASS: u16 = 0xFF53;
/// Option type of the SNAS option: critical bit 0x80 | type 1.
pub const SNAS_OPTION_TYPE: u8 = 0x81;
/// Length of the SNAS option's data in 4-byte words.
pub const SNAS_OPTION_WORDS: u8 = 4;
/// GENEVE base header length.
pub const GENEVE_BASE_LEN: usize = 8;
/// SNAS option length, option header included.
pub const SNAS_OPTION_LEN: usize = 4 + 4 * SNAS_OPTION_WORDS as usize;
/// GENEVE header as we send it: base header plus the SNAS option.
pub const GENEVE_HEADER_LEN: usize = GENEVE_BASE_LEN + SNAS_OPTION_LEN;
/// Outer IPv4 header length (no options).
pub const OUTER_IPV4_LEN: usize = 20;
/// Outer UDP header length.
pub const OUTER_UDP_LEN: usize = 8;
/// Total overlay overhead: outer IPv4 + UDP + GENEVE + SNAS option.
pub const OVERLAY_OVERHEAD: usize = OUTER_IPV4_LEN + OUTER_UDP_LEN + GENEVE_HEADER_LEN;
/// Outer TTL.
pub const OUTER_TTL: u8 = 64;
/// Largest inner packet the outer IPv4 total length can carry.
pub const MAX_INNER_LEN: usize = u16::MAX as usize - OVERLAY_OVERHEAD;

const _: () = assert!(OVERLAY_OVERHEAD == 56);

/// The sandbox MTU for an underlay MTU: `underlay − 56`, or `None` if the underlay is smaller than
/// the overhead.
pub fn sandbox_mtu(underlay_mtu: u32) -> Option<u32> {
    underlay_mtu.checked_sub(OVERLAY_OVERHEAD as u32)
}

/// The data of the SNAS option: who sent the inner packet, under which policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SnasOption {
    /// `snas_policy::identity::tenant_id` of the job's tenant.
    pub tenant_id: TenantId,
    /// `snas_policy::identity::job_key` of the job's policy id.
    pub job_key: JobKey,
    /// Serial of the policy the sender enforces (a newer one makes the proxy refetch).
    pub policy_serial: PolicySerial,
}

impl SnasOption {
    /// The option as it appears on the wire (option header included), e.g. for BPF map values
    /// and test vectors.
    pub fn to_bytes(&self) -> [u8; SNAS_OPTION_LEN] {
        let mut b = [0u8; SNAS_OPTION_LEN];
        self.write(&mut b);
        b
    }
    fn read(data: &[u8]) -> SnasOption {
        let hi = u64::from(be32(data, 4));
        let lo = u64::from(be32(data, 8));
        SnasOption {
            tenant_id: TenantId(be32(data, 0)),
            job_key: JobKey(hi << 32 | lo),
            policy_serial: PolicySerial(be32(data, 12)),
        }
    }
    fn write(&self, out: &mut [u8]) {
        put16(out, 0, SNAS_OPTION_CLASS);
        out[2] = SNAS_OPTION_TYPE;
        out[3] = SNAS_OPTION_WORDS;
        put32(out, 4, self.tenant_id.get());
        out[8..16].copy_from_slice(&self.job_key.get().to_be_bytes());
        put32(out, 16, self.policy_serial.get());
    }
}

/// The inner packet's network protocol (GENEVE protocol type; no inner Ethernet).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum InnerProto {
    /// IPv4 (0x0800).
    Ipv4,
    /// IPv6 (0x86DD).
    Ipv6,
}

impl InnerProto {
    /// The GENEVE protocol type (an EtherType).
    pub fn ethertype(self) -> u16 {
        match self {
            InnerProto::Ipv4 => 0x0800,
            InnerProto::Ipv6 => 0x86DD,
        }
    }
    /// From a GENEVE protocol type.
    pub fn from_ethertype(ethertype: u16) -> Option<InnerProto> {
        match ethertype {
            0x0800 => Some(InnerProto::Ipv4),
            0x86DD => Some(InnerProto::Ipv6),
            _ => None,
        }
    }
    /// From the version nibble of an IP packet's first byte.
    pub fn of_packet(packet: &[u8]) -> Option<InnerProto> {
        match packet.first().map(|b| b >> 4) {
            Some(4) => Some(InnerProto::Ipv4),
            Some(6) => Some(InnerProto::Ipv6),
            _ => None,
        }
    }
    fn version(self) -> u8 {
        match self {
            InnerProto::Ipv4 => 4,
            InnerProto::Ipv6 => 6,
        }
    }
    fn layer(self) -> Layer {
        match self {
            InnerProto::Ipv4 => Layer::Ipv4,
            InnerProto::Ipv6 => Layer::Ipv6,
        }
    }
}

/// One GENEVE option TLV.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GeneveOption<'a> {
    /// Option class.
    pub class: u16,
    /// Option type (0x80 = critical).
    pub ty: u8,
    /// Option data (length field × 4 bytes).
    pub data: &'a [u8],
}

impl GeneveOption<'_> {
    /// Whether the critical bit is set.
    pub fn is_critical(&self) -> bool {
        self.ty & 0x80 != 0
    }
}

/// A GENEVE header view: version 0 and the option area within the buffer. Semantic rules (O, C,
/// VNI, protocol type, options) are checked by [`parse_payload`], not here.
#[derive(Debug, Clone)]
pub struct GeneveHeader<T> {
    buf: T,
}

impl<T: AsRef<[u8]>> GeneveHeader<T> {
    /// Validates the base header length, version and that the option area fits.
    pub fn parse(buf: T) -> Result<Self, ParseError> {
        let b = buf.as_ref();
        if b.len() < GENEVE_BASE_LEN {
            return Err(ParseError::Truncated {
                layer: Layer::Geneve,
                need: GENEVE_BASE_LEN,
                have: b.len(),
            });
        }
        let version = b[0] >> 6;
        if version != 0 {
            return Err(ParseError::GeneveVersion { version });
        }
        let need = GENEVE_BASE_LEN + usize::from(b[0] & 0x3F) * 4;
        if need > b.len() {
            return Err(ParseError::Truncated {
                layer: Layer::Geneve,
                need,
                have: b.len(),
            });
        }
        Ok(GeneveHeader { buf })
    }
    fn b(&self) -> &[u8] {
        self.buf.as_ref()
    }
    /// Length of the option area in bytes.
    pub fn options_len(&self) -> usize {
        usize::from(self.b()[0] & 0x3F) * 4
    }
    /// O bit (OAM / control packet).
    pub fn oam(&self) -> bool {
        self.b()[1] & 0x80 != 0
    }
    /// C bit (critical options present).
    pub fn critical(&self) -> bool {
        self.b()[1] & 0x40 != 0
    }
    /// Protocol type of the payload.
    pub fn protocol_type(&self) -> u16 {
        be16(self.b(), 2)
    }
    /// Virtual network identifier (24 bits).
    pub fn vni(&self) -> u32 {
        be32(self.b(), 4) >> 8
    }
    /// Offset of the payload (inner packet) from the start of the header.
    pub fn payload_offset(&self) -> usize {
        GENEVE_BASE_LEN + self.options_len()
    }
    /// The payload (inner packet).
    pub fn payload(&self) -> &[u8] {
        &self.b()[self.payload_offset()..]
    }
    /// The options, in order; an option overrunning the area ends the walk with an error.
    pub fn options(&self) -> Options<'_> {
        Options {
            area: &self.b()[GENEVE_BASE_LEN..self.payload_offset()],
            offset: 0,
        }
    }
}

/// Iterator over GENEVE options, from [`GeneveHeader::options`].
#[derive(Debug, Clone)]
pub struct Options<'a> {
    area: &'a [u8],
    offset: usize,
}

impl<'a> Iterator for Options<'a> {
    type Item = Result<GeneveOption<'a>, ParseError>;
    fn next(&mut self) -> Option<Self::Item> {
        let area = self.area;
        let off = self.offset;
        if off >= area.len() {
            return None;
        }
        let overrun = ParseError::GeneveOptionOverrun {
            offset: off,
            opt_len: area.len(),
        };
        if off + 4 > area.len() {
            self.offset = area.len();
            return Some(Err(overrun));
        }
        let end = off + 4 + usize::from(area[off + 3] & 0x1F) * 4;
        if end > area.len() {
            self.offset = area.len();
            return Some(Err(overrun));
        }
        self.offset = end;
        Some(Ok(GeneveOption {
            class: be16(area, off),
            ty: area[off + 2],
            data: &area[off + 4..end],
        }))
    }
}

/// A GENEVE UDP payload that passed every receive rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GenevePayload {
    /// The SNAS option.
    pub option: SnasOption,
    /// Network protocol of the inner packet.
    pub inner_proto: InnerProto,
    /// Offset of the inner packet within the UDP payload (28 when only our option is present).
    pub inner_offset: usize,
}

/// Parses a GENEVE header at the start of a UDP payload and applies the receive rules of the
/// module docs. The inner packet is `payload[inner_offset..]`; it is not parsed beyond its
/// version nibble.
pub fn parse_payload(payload: &[u8]) -> Result<GenevePayload, ParseError> {
    let h = GeneveHeader::parse(payload)?;
    if h.oam() {
        return Err(ParseError::GeneveOam);
    }
    if h.vni() != 0 {
        return Err(ParseError::GeneveVni { vni: h.vni() });
    }
    let ethertype = h.protocol_type();
    let inner_proto =
        InnerProto::from_ethertype(ethertype).ok_or(ParseError::GeneveProtocol { ethertype })?;
    let mut found = None;
    for opt in h.options() {
        let opt = opt?;
        if opt.class == SNAS_OPTION_CLASS && opt.ty == SNAS_OPTION_TYPE {
            if opt.data.len() != usize::from(SNAS_OPTION_WORDS) * 4 {
                // The data length is a multiple of 4 below 128 bytes, so this fits in a u8.
                return Err(ParseError::BadSnasOptionLength {
                    words: (opt.data.len() / 4) as u8,
                });
            }
            if found.is_some() {
                return Err(ParseError::DuplicateSnasOption);
            }
            found = Some(SnasOption::read(opt.data));
        } else if opt.is_critical() {
            return Err(ParseError::UnknownCriticalOption {
                class: opt.class,
                ty: opt.ty,
            });
        }
    }
    let option = found.ok_or(ParseError::MissingSnasOption)?;
    if !h.critical() {
        return Err(ParseError::GeneveCriticalFlag);
    }
    let inner_offset = h.payload_offset();
    let found_version = payload.get(inner_offset).map_or(0, |b| b >> 4);
    if found_version != inner_proto.version() {
        return Err(ParseError::GeneveInnerMismatch {
            expected: inner_proto.layer(),
            found: found_version,
        });
    }
    Ok(GenevePayload {
        option,
        inner_proto,
        inner_offset,
    })
}

/// A fully decapsulated overlay packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decapsulated<'a> {
    /// Outer source address (the sending node or proxy).
    pub outer_src: Ipv4Addr,
    /// Outer destination address.
    pub outer_dst: Ipv4Addr,
    /// Outer UDP source port (carries the flow hash).
    pub outer_src_port: u16,
    /// The SNAS option.
    pub option: SnasOption,
    /// Network protocol of the inner packet.
    pub inner_proto: InnerProto,
    /// Where the inner packet lies in the input.
    pub inner_range: Range<usize>,
    /// The inner packet (`input[inner_range]`).
    pub inner: &'a [u8],
}

/// Parses outer IPv4 + UDP + GENEVE (see the module docs for the checks).
pub fn decapsulate(packet: &[u8]) -> Result<Decapsulated<'_>, ParseError> {
    let ip = Ipv4Packet::parse(packet)?;
    if ip.has_options() {
        return Err(ParseError::Ipv4Options);
    }
    if ip.is_fragment() {
        return Err(ParseError::Fragment);
    }
    if !ip.header_checksum_ok() {
        return Err(ParseError::BadChecksum { layer: Layer::Ipv4 });
    }
    if ip.protocol() != proto::UDP {
        return Err(ParseError::NotGeneve {
            protocol: ip.protocol(),
            port: 0,
        });
    }
    let udp = UdpPacket::parse(ip.payload())?;
    if udp.dst_port() != GENEVE_PORT {
        return Err(ParseError::NotGeneve {
            protocol: proto::UDP,
            port: udp.dst_port(),
        });
    }
    if udp.checksum() != 0 && !udp.checksum_ok(ip.src().into(), ip.dst().into()) {
        return Err(ParseError::BadChecksum { layer: Layer::Udp });
    }
    let g = parse_payload(udp.payload())?;
    let start = OUTER_IPV4_LEN + OUTER_UDP_LEN + g.inner_offset;
    Ok(Decapsulated {
        outer_src: ip.src(),
        outer_dst: ip.dst(),
        outer_src_port: udp.src_port(),
        option: g.option,
        inner_proto: g.inner_proto,
        inner_range: start..packet.len(),
        inner: &packet[start..],
    })
}

/// Outer header parameters for [`encapsulate_into`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OuterParams {
    /// Outer source (this node or proxy).
    pub src: Ipv4Addr,
    /// Outer destination (the proxy or node).
    pub dst: Ipv4Addr,
    /// Outer UDP source port; use [`OuterParams::source_port_for_hash`].
    pub src_port: u16,
}

impl OuterParams {
    /// The contract's outer source port for a flow hash: `0xC000 | (hash & 0x3FFF)`.
    pub fn source_port_for_hash(flow_hash: u32) -> u16 {
        // Masked to 14 bits, so the cast is lossless.
        0xC000 | (flow_hash & 0x3FFF) as u16
    }
}

fn need(buf: &[u8], need: usize) -> Result<(), BuildError> {
    if buf.len() < need {
        return Err(BuildError::BufferTooSmall {
            need,
            have: buf.len(),
        });
    }
    Ok(())
}

/// Writes the 28-byte GENEVE header with the SNAS option into `buf[..28]` (for senders whose
/// socket supplies the outer IPv4/UDP). Returns 28.
pub fn write_geneve_header(
    buf: &mut [u8],
    option: &SnasOption,
    inner_proto: InnerProto,
) -> Result<usize, BuildError> {
    need(buf, GENEVE_HEADER_LEN)?;
    // Version 0, opt_len 5 words; C set because our option is critical.
    buf[0] = (SNAS_OPTION_LEN / 4) as u8;
    buf[1] = 0x40;
    put16(buf, 2, inner_proto.ethertype());
    put32(buf, 4, 0);
    option.write(&mut buf[GENEVE_BASE_LEN..GENEVE_HEADER_LEN]);
    Ok(GENEVE_HEADER_LEN)
}

/// Writes the 56 bytes of outer IPv4 + UDP + GENEVE headers into `buf[..56]` for an inner packet
/// of `inner_len` bytes that the caller has placed (or will place) at `buf[56..]`: in-place
/// encapsulation without a copy. Returns 56.
pub fn write_overlay_headers(
    buf: &mut [u8],
    outer: &OuterParams,
    option: &SnasOption,
    inner_proto: InnerProto,
    inner_len: usize,
) -> Result<usize, BuildError> {
    if inner_len > MAX_INNER_LEN {
        return Err(BuildError::TooLong {
            len: inner_len + OVERLAY_OVERHEAD,
            max: u16::MAX.into(),
        });
    }
    need(buf, OVERLAY_OVERHEAD)?;
    // Both fit in u16: checked against MAX_INNER_LEN above.
    let total = (OVERLAY_OVERHEAD + inner_len) as u16;
    let udp_len = total - OUTER_IPV4_LEN as u16;
    let ip = &mut buf[..OUTER_IPV4_LEN];
    ip[0] = 0x45;
    ip[1] = 0;
    put16(ip, 2, total);
    put16(ip, 4, 0); // ID 0: atomic datagram with DF (RFC 6864).
    put16(ip, 6, 0x4000);
    ip[8] = OUTER_TTL;
    ip[9] = proto::UDP;
    put16(ip, 10, 0);
    ip[12..16].copy_from_slice(&outer.src.octets());
    ip[16..20].copy_from_slice(&outer.dst.octets());
    let c = checksum::checksum(ip);
    put16(ip, 10, c);
    let udp = &mut buf[OUTER_IPV4_LEN..OUTER_IPV4_LEN + OUTER_UDP_LEN];
    put16(udp, 0, outer.src_port);
    put16(udp, 2, GENEVE_PORT);
    put16(udp, 4, udp_len);
    put16(udp, 6, 0);
    write_geneve_header(
        &mut buf[OUTER_IPV4_LEN + OUTER_UDP_LEN..],
        option,
        inner_proto,
    )?;
    Ok(OVERLAY_OVERHEAD)
}

/// Copies `inner` behind freshly written outer IPv4 + UDP + GENEVE headers in `buf`. The inner
/// protocol is taken from `inner`'s version nibble. Returns the total length.
pub fn encapsulate_into(
    buf: &mut [u8],
    outer: &OuterParams,
    option: &SnasOption,
    inner: &[u8],
) -> Result<usize, BuildError> {
    let proto = InnerProto::of_packet(inner).ok_or(BuildError::NotIp {
        first_byte: inner.first().copied().unwrap_or(0),
    })?;
    if inner.len() > MAX_INNER_LEN {
        return Err(BuildError::TooLong {
            len: inner.len() + OVERLAY_OVERHEAD,
            max: u16::MAX.into(),
        });
    }
    let total = OVERLAY_OVERHEAD + inner.len();
    need(buf, total)?;
    buf[OVERLAY_OVERHEAD..total].copy_from_slice(inner);
    write_overlay_headers(buf, outer, option, proto, inner.len())?;
    Ok(total)
}

/// [`encapsulate_into`] into a new `Vec` (tests, refusal paths off the hot path).
pub fn encapsulate(
    outer: &OuterParams,
    option: &SnasOption,
    inner: &[u8],
) -> Result<Vec<u8>, BuildError> {
    let mut v = vec![0u8; OVERLAY_OVERHEAD + inner.len()];
    let n = encapsulate_into(&mut v, outer, option, inner)?;
    v.truncate(n);
    Ok(v)
}
