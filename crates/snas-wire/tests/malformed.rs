//! Every malformed class is rejected with the right drop reason.
#![allow(clippy::unwrap_used)] // helpers outside #[test] fns build known-good packets

use snas_wire::build::{self, TcpSpec, UdpSpec};
use snas_wire::geneve::{self, GENEVE_HEADER_LEN, OVERLAY_OVERHEAD};
use snas_wire::{
    decapsulate, flow_tuple, parse_payload, InnerProto, IpPacket, Ipv4Packet, OuterParams,
    ParseError, Reason, SnasOption, TcpFlags,
};
use std::net::Ipv4Addr;

fn tcp4() -> Vec<u8> {
    build::tcp(&TcpSpec {
        src: "192.0.2.10:40000".parse().unwrap(),
        dst: "203.0.113.7:443".parse().unwrap(),
        seq: 100,
        ack: 0,
        flags: TcpFlags::SYN,
        window: 1000,
        payload: b"hello",
    })
    .unwrap()
}

fn udp6() -> Vec<u8> {
    build::udp(&UdpSpec {
        src: "[2001:db8::10]:40000".parse().unwrap(),
        dst: "[2001:db8:1::7]:53".parse().unwrap(),
        payload: b"query",
    })
    .unwrap()
}

fn reason(p: &[u8]) -> Reason {
    flow_tuple(p).unwrap_err().reason()
}

fn refix_ipv4(p: &mut [u8]) {
    if let Ok(mut ip) = Ipv4Packet::parse(&mut p[..]) {
        ip.fill_header_checksum();
    }
}

#[test]
fn truncated_ipv4_is_malformed() {
    let p = tcp4();
    for len in [0, 1, 19] {
        assert_eq!(reason(&p[..len]), Reason::Malformed, "len {len}");
    }
    // Shorter than its total length.
    assert!(matches!(
        Ipv4Packet::parse(&p[..p.len() - 1]),
        Err(ParseError::LengthMismatch { .. })
    ));
}

#[test]
fn trailing_bytes_after_total_length_are_malformed() {
    let mut p = tcp4();
    p.push(0);
    assert_eq!(reason(&p), Reason::Malformed);
    let mut q = udp6();
    q.extend_from_slice(&[0, 0]);
    assert_eq!(reason(&q), Reason::Malformed);
}

#[test]
fn bad_ihl_is_malformed() {
    let mut p = tcp4();
    p[0] = 0x44;
    assert_eq!(
        Ipv4Packet::parse(&p[..]).unwrap_err(),
        ParseError::BadIhl { ihl: 4 }
    );
    assert_eq!(reason(&p), Reason::Malformed);
    // IHL pointing beyond the buffer.
    p[0] = 0x4F;
    let short = &p[..40];
    assert_eq!(reason(short), Reason::Malformed);
}

#[test]
fn total_length_below_header_length_is_malformed() {
    let mut p = tcp4();
    p[2..4].copy_from_slice(&10u16.to_be_bytes());
    assert_eq!(reason(&p), Reason::Malformed);
}

#[test]
fn wrong_ip_version_is_malformed() {
    let mut p = tcp4();
    p[0] = 0x55;
    assert!(matches!(
        IpPacket::parse(&p[..]),
        Err(ParseError::BadVersion { found: 5, .. })
    ));
    assert_eq!(reason(&p), Reason::Malformed);
}

#[test]
fn ipv4_fragments_are_detected_first_and_later() {
    let mut first = tcp4();
    first[6] |= 0x20; // MF
    refix_ipv4(&mut first);
    let ip = Ipv4Packet::parse(&first[..]).unwrap();
    assert!(ip.is_fragment() && ip.more_fragments());
    assert_eq!(reason(&first), Reason::Fragment);

    let mut later = tcp4();
    later[6..8].copy_from_slice(&(0x4000u16 | 3).to_be_bytes()); // DF + offset 24 bytes
    refix_ipv4(&mut later);
    assert_eq!(Ipv4Packet::parse(&later[..]).unwrap().fragment_offset(), 24);
    assert_eq!(reason(&later), Reason::Fragment);
}

#[test]
fn ipv6_fragment_header_is_a_fragment_and_other_extensions_are_options() {
    let mut p = udp6();
    p[6] = 44;
    assert_eq!(reason(&p), Reason::Fragment);
    for nh in [0u8, 43, 60, 51, 50] {
        p[6] = nh;
        assert_eq!(
            flow_tuple(&p).unwrap_err(),
            ParseError::Ipv6Extension { next_header: nh }
        );
        assert_eq!(reason(&p), Reason::IpOptions);
    }
}

#[test]
fn ipv4_options_parse_and_are_exposed() {
    // Insert one 4-byte option (NOP NOP NOP EOL) after the fixed header.
    let p = tcp4();
    let mut o = p[..20].to_vec();
    o.extend_from_slice(&[1, 1, 1, 0]);
    o.extend_from_slice(&p[20..]);
    o[0] = 0x46;
    let total = o.len() as u16;
    o[2..4].copy_from_slice(&total.to_be_bytes());
    refix_ipv4(&mut o);
    let ip = Ipv4Packet::parse(&o[..]).unwrap();
    assert!(ip.has_options());
    assert_eq!(ip.options(), &[1, 1, 1, 0]);
    assert!(ip.header_checksum_ok());
    // The flow key is still available; the policy layer decides about options.
    assert_eq!(flow_tuple(&o).unwrap(), flow_tuple(&p).unwrap());
    assert_eq!(ParseError::Ipv4Options.reason(), Reason::IpOptions);
}

#[test]
fn bad_tcp_data_offset_is_malformed() {
    let mut p = tcp4();
    p[20 + 12] = 4 << 4;
    assert!(matches!(
        flow_tuple(&p),
        Err(ParseError::BadDataOffset { offset: 4, .. })
    ));
    p[20 + 12] = 15 << 4; // 60 bytes > 25-byte segment
    assert_eq!(reason(&p), Reason::Malformed);
    assert_eq!(reason(&p[..]), Reason::Malformed);
}

#[test]
fn udp_length_disagreeing_with_ip_length_is_malformed() {
    let mut p = udp6();
    p[40 + 4..40 + 6].copy_from_slice(&9u16.to_be_bytes());
    assert!(matches!(
        flow_tuple(&p),
        Err(ParseError::LengthMismatch { .. })
    ));
    p[40 + 4..40 + 6].copy_from_slice(&7u16.to_be_bytes());
    assert_eq!(reason(&p), Reason::Malformed);
}

#[test]
fn unsupported_protocols_and_non_echo_icmp_have_no_flow() {
    let mut p = tcp4();
    p[9] = 47; // GRE
    refix_ipv4(&mut p);
    assert_eq!(
        flow_tuple(&p).unwrap_err(),
        ParseError::UnsupportedProtocol { protocol: 47 }
    );
    assert_eq!(reason(&p), Reason::PortDenied);
    // ICMP (IPv4 number) inside IPv6 is not ICMPv6.
    let mut q = udp6();
    q[6] = 1;
    assert_eq!(reason(&q), Reason::PortDenied);
    // An ICMP redirect carries no flow.
    let mut icmp = tcp4();
    icmp[9] = 1;
    icmp[20] = 5;
    refix_ipv4(&mut icmp);
    assert!(matches!(
        flow_tuple(&icmp),
        Err(ParseError::NotAFlow { ty: 5, .. })
    ));
}

// ---------------------------------------------------------------------------------------------
// GENEVE

fn option() -> SnasOption {
    SnasOption {
        tenant_id: snas_wire::TenantId(0xAABB_CCDD),
        job_key: snas_wire::JobKey(0x0102_0304_0506_0708),
        policy_serial: snas_wire::PolicySerial(42),
    }
}

fn geneve_payload() -> Vec<u8> {
    let inner = tcp4();
    let mut buf = vec![0u8; GENEVE_HEADER_LEN + inner.len()];
    geneve::write_geneve_header(&mut buf, &option(), InnerProto::Ipv4).unwrap();
    buf[GENEVE_HEADER_LEN..].copy_from_slice(&inner);
    buf
}

/// A payload whose option area is `opts` (the SNAS option is not added).
fn with_options(opts: &[u8]) -> Vec<u8> {
    assert_eq!(opts.len() % 4, 0);
    let mut buf = vec![(opts.len() / 4) as u8, 0x40, 0x08, 0x00, 0, 0, 0, 0];
    buf.extend_from_slice(opts);
    buf.extend_from_slice(&tcp4());
    buf
}

fn snas_opt_bytes() -> Vec<u8> {
    geneve_payload()[8..GENEVE_HEADER_LEN].to_vec()
}

fn geneve_reason(p: &[u8]) -> Reason {
    parse_payload(p).unwrap_err().reason()
}

#[test]
fn geneve_wrong_version_is_malformed() {
    let mut p = geneve_payload();
    p[0] |= 0x40;
    assert_eq!(
        parse_payload(&p).unwrap_err(),
        ParseError::GeneveVersion { version: 1 }
    );
    assert_eq!(geneve_reason(&p), Reason::GeneveMalformed);
}

#[test]
fn geneve_truncated_base_or_option_area_is_malformed() {
    let p = geneve_payload();
    assert_eq!(geneve_reason(&p[..7]), Reason::GeneveMalformed);
    assert_eq!(geneve_reason(&p[..20]), Reason::GeneveMalformed);
}

#[test]
fn geneve_oam_vni_and_protocol_type_are_checked() {
    let mut oam = geneve_payload();
    oam[1] |= 0x80;
    assert_eq!(parse_payload(&oam).unwrap_err(), ParseError::GeneveOam);
    let mut vni = geneve_payload();
    vni[4] = 1;
    assert_eq!(
        parse_payload(&vni).unwrap_err(),
        ParseError::GeneveVni { vni: 0x01_0000 }
    );
    // The reserved byte after the VNI is ignored on receipt (RFC 8926 §3.4).
    let mut reserved = geneve_payload();
    reserved[7] = 0xFF;
    assert!(parse_payload(&reserved).is_ok());
    let mut eth = geneve_payload();
    eth[2..4].copy_from_slice(&0x6558u16.to_be_bytes()); // inner Ethernet
    assert_eq!(
        parse_payload(&eth).unwrap_err(),
        ParseError::GeneveProtocol { ethertype: 0x6558 }
    );
    for p in [oam, vni, eth] {
        assert_eq!(geneve_reason(&p), Reason::GeneveMalformed);
    }
}

#[test]
fn geneve_clear_c_bit_with_our_critical_option_is_malformed() {
    let mut p = geneve_payload();
    p[1] &= !0x40;
    assert_eq!(
        parse_payload(&p).unwrap_err(),
        ParseError::GeneveCriticalFlag
    );
    assert_eq!(geneve_reason(&p), Reason::GeneveMalformed);
}

#[test]
fn geneve_inner_version_must_match_protocol_type() {
    let mut p = geneve_payload();
    p[2..4].copy_from_slice(&0x86DDu16.to_be_bytes());
    assert!(matches!(
        parse_payload(&p),
        Err(ParseError::GeneveInnerMismatch { found: 4, .. })
    ));
    let header_only = &geneve_payload()[..GENEVE_HEADER_LEN];
    assert!(matches!(
        parse_payload(header_only),
        Err(ParseError::GeneveInnerMismatch { found: 0, .. })
    ));
    assert_eq!(geneve_reason(&p), Reason::GeneveMalformed);
}

#[test]
fn geneve_option_overrunning_the_area_is_malformed() {
    let mut opts = snas_opt_bytes();
    // A second option claiming 8 words with only 1 present.
    opts.extend_from_slice(&[0x01, 0x02, 0x03, 0x08, 0, 0, 0, 0]);
    let p = with_options(&opts);
    assert!(matches!(
        parse_payload(&p),
        Err(ParseError::GeneveOptionOverrun { offset: 20, .. })
    ));
    assert_eq!(geneve_reason(&p), Reason::GeneveMalformed);
}

#[test]
fn geneve_unknown_critical_option_is_dropped() {
    let mut opts = snas_opt_bytes();
    opts.extend_from_slice(&[0x01, 0x02, 0x83, 0x01, 9, 9, 9, 9]);
    let p = with_options(&opts);
    assert_eq!(
        parse_payload(&p).unwrap_err(),
        ParseError::UnknownCriticalOption {
            class: 0x0102,
            ty: 0x83
        }
    );
    assert_eq!(geneve_reason(&p), Reason::GeneveOption);
}

#[test]
fn geneve_unknown_non_critical_options_are_skipped() {
    let mut opts = vec![0x01, 0x02, 0x03, 0x01, 9, 9, 9, 9];
    opts.extend_from_slice(&snas_opt_bytes());
    opts.extend_from_slice(&[0xFF, 0x53, 0x01, 0x00]); // our class, non-critical type: not ours
    let p = with_options(&opts);
    let g = parse_payload(&p).unwrap();
    assert_eq!(g.option, option());
    assert_eq!(g.inner_offset, 8 + opts.len());
    assert_eq!(&p[g.inner_offset..], &tcp4()[..]);
}

#[test]
fn geneve_missing_duplicate_or_missized_snas_option_is_dropped() {
    let missing = with_options(&[0x01, 0x02, 0x03, 0x00]);
    assert_eq!(
        parse_payload(&missing).unwrap_err(),
        ParseError::MissingSnasOption
    );
    let none = with_options(&[]);
    assert_eq!(
        parse_payload(&none).unwrap_err(),
        ParseError::MissingSnasOption
    );
    let mut twice = snas_opt_bytes();
    twice.extend_from_slice(&snas_opt_bytes());
    assert_eq!(
        parse_payload(&with_options(&twice)).unwrap_err(),
        ParseError::DuplicateSnasOption
    );
    let mut short = snas_opt_bytes();
    short[3] = 3;
    short.truncate(16);
    assert_eq!(
        parse_payload(&with_options(&short)).unwrap_err(),
        ParseError::BadSnasOptionLength { words: 3 }
    );
    for p in [missing, none, with_options(&twice), with_options(&short)] {
        assert_eq!(geneve_reason(&p), Reason::GeneveOption);
    }
}

fn overlay() -> Vec<u8> {
    let outer = OuterParams {
        src: Ipv4Addr::new(198, 51, 100, 1),
        dst: Ipv4Addr::new(198, 51, 100, 2),
        src_port: 0xC001,
    };
    geneve::encapsulate(&outer, &option(), &tcp4()).unwrap()
}

#[test]
fn decapsulate_rejects_outer_options_fragments_and_bad_checksum() {
    let p = overlay();
    let mut o = p[..20].to_vec();
    o.extend_from_slice(&[1, 1, 1, 0]);
    o.extend_from_slice(&p[20..]);
    o[0] = 0x46;
    let total = o.len() as u16;
    o[2..4].copy_from_slice(&total.to_be_bytes());
    refix_ipv4(&mut o);
    assert_eq!(decapsulate(&o).unwrap_err().reason(), Reason::IpOptions);

    let mut frag = overlay();
    frag[6] |= 0x20;
    refix_ipv4(&mut frag);
    assert_eq!(decapsulate(&frag).unwrap_err().reason(), Reason::Fragment);

    let mut bad = overlay();
    bad[10] ^= 0xFF;
    assert_eq!(
        decapsulate(&bad).unwrap_err(),
        ParseError::BadChecksum {
            layer: snas_wire::Layer::Ipv4
        }
    );
    assert_eq!(decapsulate(&bad).unwrap_err().reason(), Reason::Malformed);
}

#[test]
fn decapsulate_rejects_non_udp_and_other_ports() {
    let mut tcp = overlay();
    tcp[9] = 6;
    refix_ipv4(&mut tcp);
    assert!(matches!(
        decapsulate(&tcp),
        Err(ParseError::NotGeneve { protocol: 6, .. })
    ));
    let mut port = overlay();
    port[22..24].copy_from_slice(&4789u16.to_be_bytes());
    assert!(matches!(
        decapsulate(&port),
        Err(ParseError::NotGeneve { port: 4789, .. })
    ));
}

#[test]
fn decapsulate_checks_a_non_zero_udp_checksum() {
    let mut p = overlay();
    let (src, dst) = (
        Ipv4Addr::new(198, 51, 100, 1).into(),
        Ipv4Addr::new(198, 51, 100, 2).into(),
    );
    {
        let mut udp = snas_wire::UdpPacket::parse(&mut p[20..]).unwrap();
        udp.fill_checksum(src, dst);
    }
    assert!(decapsulate(&p).is_ok());
    p[26] ^= 0x01;
    assert_eq!(
        decapsulate(&p).unwrap_err(),
        ParseError::BadChecksum {
            layer: snas_wire::Layer::Udp
        }
    );
}

#[test]
fn decapsulate_rejects_inconsistent_udp_length() {
    let mut p = overlay();
    let l = u16::from_be_bytes([p[24], p[25]]) - 1;
    p[24..26].copy_from_slice(&l.to_be_bytes());
    assert_eq!(decapsulate(&p).unwrap_err().reason(), Reason::Malformed);
}

#[test]
fn encapsulation_reports_small_buffers_oversized_and_non_ip_inner() {
    let outer = OuterParams {
        src: Ipv4Addr::new(192, 0, 2, 1),
        dst: Ipv4Addr::new(192, 0, 2, 2),
        src_port: 0xC000,
    };
    let inner = tcp4();
    let mut small = vec![0u8; OVERLAY_OVERHEAD + inner.len() - 1];
    assert!(matches!(
        geneve::encapsulate_into(&mut small, &outer, &option(), &inner),
        Err(snas_wire::BuildError::BufferTooSmall { .. })
    ));
    let huge = vec![0x45u8; geneve::MAX_INNER_LEN + 1];
    assert!(matches!(
        geneve::encapsulate(&outer, &option(), &huge),
        Err(snas_wire::BuildError::TooLong { .. })
    ));
    assert!(matches!(
        geneve::encapsulate(&outer, &option(), &[0x12]),
        Err(snas_wire::BuildError::NotIp { .. })
    ));
    let mut hdr = [0u8; 27];
    assert!(geneve::write_geneve_header(&mut hdr, &option(), InnerProto::Ipv4).is_err());
}
