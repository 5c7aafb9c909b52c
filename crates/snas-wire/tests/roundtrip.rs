//! Build → parse round trips for every header type and the overlay.
#![allow(clippy::unwrap_used)] // helpers outside #[test] fns build known-good packets

use proptest::prelude::*;
use snas_wire::build::{self, EchoSpec, TcpSpec, UdpSpec};
use snas_wire::geneve::{self, GENEVE_HEADER_LEN, OVERLAY_OVERHEAD};
use snas_wire::{
    decapsulate, parse_payload, FiveTuple, InnerProto, IpPacket, L4Proto, OuterParams, SnasOption,
    TcpFlags, Transport,
};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// Address pairs of one family.
fn addr_pair() -> impl Strategy<Value = (IpAddr, IpAddr)> {
    prop_oneof![
        (any::<u32>(), any::<u32>())
            .prop_map(|(a, b)| (IpAddr::V4(Ipv4Addr::from(a)), IpAddr::V4(Ipv4Addr::from(b)))),
        (any::<u128>(), any::<u128>())
            .prop_map(|(a, b)| (IpAddr::V6(Ipv6Addr::from(a)), IpAddr::V6(Ipv6Addr::from(b)))),
    ]
}

fn payload() -> impl Strategy<Value = Vec<u8>> {
    proptest::collection::vec(any::<u8>(), 0..1500)
}

fn snas_option() -> impl Strategy<Value = SnasOption> {
    (any::<u32>(), any::<u64>(), any::<u32>()).prop_map(|(tenant_id, job_key, policy_serial)| {
        SnasOption {
            tenant_id: snas_wire::TenantId(tenant_id),
            job_key: snas_wire::JobKey(job_key),
            policy_serial: snas_wire::PolicySerial(policy_serial),
        }
    })
}

proptest! {
    #[test]
    fn tcp_build_parse_round_trips(
        (src, dst) in addr_pair(), sp in any::<u16>(), dp in any::<u16>(),
        seq in any::<u32>(), ack in any::<u32>(), flags in any::<u8>(), window in any::<u16>(),
        data in payload(),
    ) {
        let spec = TcpSpec {
            src: SocketAddr::new(src, sp), dst: SocketAddr::new(dst, dp), seq, ack,
            flags: TcpFlags(flags), window, payload: &data,
        };
        let bytes = build::tcp(&spec).unwrap();
        let ip = IpPacket::parse(&bytes[..]).unwrap();
        prop_assert_eq!(ip.src(), src);
        prop_assert_eq!(ip.dst(), dst);
        if let IpPacket::V4(v4) = &ip {
            prop_assert!(v4.header_checksum_ok());
            prop_assert!(v4.dont_fragment() && !v4.is_fragment() && !v4.has_options());
        }
        let Transport::Tcp(t) = ip.transport().unwrap() else { panic!("not TCP") };
        prop_assert_eq!((t.src_port(), t.dst_port(), t.seq(), t.ack()), (sp, dp, seq, ack));
        prop_assert_eq!((t.flags(), t.window()), (TcpFlags(flags), window));
        prop_assert_eq!(t.payload(), &data[..]);
        prop_assert!(t.checksum_ok(src, dst));
        prop_assert_eq!(
            ip.flow_tuple().unwrap(),
            FiveTuple { proto: L4Proto::Tcp, src, src_port: sp, dst, dst_port: dp }
        );
    }

    #[test]
    fn udp_build_parse_round_trips(
        (src, dst) in addr_pair(), sp in any::<u16>(), dp in any::<u16>(), data in payload(),
    ) {
        let spec = UdpSpec { src: SocketAddr::new(src, sp), dst: SocketAddr::new(dst, dp), payload: &data };
        let bytes = build::udp(&spec).unwrap();
        let ip = IpPacket::parse(&bytes[..]).unwrap();
        let Transport::Udp(u) = ip.transport().unwrap() else { panic!("not UDP") };
        prop_assert_eq!((u.src_port(), u.dst_port(), u.payload()), (sp, dp, &data[..]));
        prop_assert_ne!(u.checksum(), 0);
        prop_assert!(u.checksum_ok(src, dst));
        let t = ip.flow_tuple().unwrap();
        prop_assert_eq!(t, FiveTuple { proto: L4Proto::Udp, src, src_port: sp, dst, dst_port: dp });
    }

    #[test]
    fn icmp_echo_build_parse_round_trips(
        (src, dst) in addr_pair(), reply in any::<bool>(), ident in any::<u16>(),
        seq in any::<u16>(), data in payload(),
    ) {
        let spec = EchoSpec { src, dst, reply, ident, seq, payload: &data };
        let bytes = build::icmp_echo(&spec).unwrap();
        let ip = IpPacket::parse(&bytes[..]).unwrap();
        let m = match ip.transport().unwrap() {
            Transport::Icmp(m) => { prop_assert!(src.is_ipv4()); m }
            Transport::Icmpv6(m) => { prop_assert!(src.is_ipv6()); m }
            other => panic!("not ICMP: {other:?}"),
        };
        prop_assert!(m.is_echo() && !m.is_error());
        prop_assert_eq!((m.ident(), m.seq(), m.payload()), (ident, seq, &data[..]));
        prop_assert!(m.checksum_ok(src, dst));
        let t = ip.flow_tuple().unwrap();
        prop_assert_eq!((t.src_port, t.dst_port), (ident, ident));
        prop_assert_eq!(t.proto, if src.is_ipv4() { L4Proto::Icmp } else { L4Proto::Icmpv6 });
    }

    #[test]
    fn echo_reply_tuple_is_the_reversed_request_tuple(
        (a, b) in addr_pair(), ident in any::<u16>(), seq in any::<u16>(),
    ) {
        let req = build::icmp_echo(&EchoSpec { src: a, dst: b, reply: false, ident, seq, payload: b"x" }).unwrap();
        let rep = build::icmp_echo(&EchoSpec { src: b, dst: a, reply: true, ident, seq, payload: b"x" }).unwrap();
        prop_assert_eq!(
            snas_wire::flow_tuple(&req).unwrap().reversed(),
            snas_wire::flow_tuple(&rep).unwrap()
        );
    }

    #[test]
    fn overlay_encapsulate_decapsulate_round_trips(
        (src, dst) in addr_pair(), outer_src in any::<u32>(), outer_dst in any::<u32>(),
        hash in any::<u32>(), option in snas_option(), data in payload(),
    ) {
        let inner = build::udp(&UdpSpec {
            src: SocketAddr::new(src, 5353), dst: SocketAddr::new(dst, 53), payload: &data,
        }).unwrap();
        let outer = OuterParams {
            src: Ipv4Addr::from(outer_src),
            dst: Ipv4Addr::from(outer_dst),
            src_port: OuterParams::source_port_for_hash(hash),
        };
        let pkt = geneve::encapsulate(&outer, &option, &inner).unwrap();
        prop_assert_eq!(pkt.len(), inner.len() + OVERLAY_OVERHEAD);
        let d = decapsulate(&pkt).unwrap();
        prop_assert_eq!((d.outer_src, d.outer_dst, d.outer_src_port), (outer.src, outer.dst, outer.src_port));
        prop_assert_eq!(d.outer_src_port & 0xC000, 0xC000);
        prop_assert_eq!(d.option, option);
        prop_assert_eq!(d.inner_proto, if src.is_ipv4() { InnerProto::Ipv4 } else { InnerProto::Ipv6 });
        prop_assert_eq!(d.inner, &inner[..]);
        prop_assert_eq!(&pkt[d.inner_range.clone()], &inner[..]);
        // The UDP-payload entry point agrees with full decapsulation.
        let g = parse_payload(&pkt[28..]).unwrap();
        prop_assert_eq!(g.option, option);
        prop_assert_eq!(g.inner_offset, GENEVE_HEADER_LEN);
    }

    #[test]
    fn geneve_header_write_parse_round_trips(option in snas_option(), v6 in any::<bool>(), data in payload()) {
        let (proto, inner) = if v6 {
            (InnerProto::Ipv6, build::udp(&UdpSpec {
                src: "[2001:db8::1]:1".parse().unwrap(), dst: "[2001:db8::2]:2".parse().unwrap(), payload: &data,
            }).unwrap())
        } else {
            (InnerProto::Ipv4, build::udp(&UdpSpec {
                src: "192.0.2.1:1".parse().unwrap(), dst: "203.0.113.2:2".parse().unwrap(), payload: &data,
            }).unwrap())
        };
        let mut buf = vec![0u8; GENEVE_HEADER_LEN + inner.len()];
        prop_assert_eq!(geneve::write_geneve_header(&mut buf, &option, proto).unwrap(), GENEVE_HEADER_LEN);
        buf[GENEVE_HEADER_LEN..].copy_from_slice(&inner);
        let g = parse_payload(&buf).unwrap();
        prop_assert_eq!((g.option, g.inner_proto, g.inner_offset), (option, proto, GENEVE_HEADER_LEN));
    }
}

#[test]
fn overlay_header_bytes_follow_the_contract() {
    let inner = build::tcp(&TcpSpec {
        src: "192.0.2.10:40000".parse().unwrap(),
        dst: "203.0.113.7:443".parse().unwrap(),
        seq: 1,
        ack: 0,
        flags: TcpFlags::SYN,
        window: 1000,
        payload: &[],
    })
    .unwrap();
    let outer = OuterParams {
        src: Ipv4Addr::new(198, 51, 100, 1),
        dst: Ipv4Addr::new(198, 51, 100, 2),
        src_port: OuterParams::source_port_for_hash(0xFFFF_FFFF),
    };
    let option = SnasOption {
        tenant_id: snas_wire::TenantId(0x0102_0304),
        job_key: snas_wire::JobKey(0x1112_1314_1516_1718),
        policy_serial: snas_wire::PolicySerial(0x2122_2324),
    };
    let p = geneve::encapsulate(&outer, &option, &inner).unwrap();
    // Outer IPv4: no options, DF, TTL 64, UDP.
    assert_eq!(p[0], 0x45);
    assert_eq!(u16::from_be_bytes([p[2], p[3]]) as usize, p.len());
    assert_eq!(p[6] & 0x40, 0x40);
    assert_eq!((p[8], p[9]), (64, 17));
    assert_eq!(snas_wire::checksum::checksum(&p[..20]), 0);
    // UDP: port from the hash's low 14 bits, 6081, checksum 0.
    assert_eq!(u16::from_be_bytes([p[20], p[21]]), 0xC000 | 0x3FFF);
    assert_eq!(u16::from_be_bytes([p[22], p[23]]), 6081);
    assert_eq!(
        usize::from(u16::from_be_bytes([p[24], p[25]])),
        p.len() - 20
    );
    assert_eq!(&p[26..28], &[0, 0]);
    // GENEVE: ver 0 opt_len 5, O=0 C=1, IPv4, VNI 0.
    assert_eq!(&p[28..36], &[0x05, 0x40, 0x08, 0x00, 0, 0, 0, 0]);
    // Option: class FF53, type 81, length 4, then the fields big-endian.
    assert_eq!(&p[36..40], &[0xFF, 0x53, 0x81, 0x04]);
    assert_eq!(&p[40..44], &[1, 2, 3, 4]);
    assert_eq!(
        &p[44..52],
        &[0x11, 0x12, 0x13, 0x14, 0x15, 0x16, 0x17, 0x18]
    );
    assert_eq!(&p[52..56], &[0x21, 0x22, 0x23, 0x24]);
    assert_eq!(&p[36..56], &option.to_bytes()[..]);
    assert_eq!(&p[56..], &inner[..]);
}

#[test]
fn in_place_encapsulation_matches_copying_encapsulation() {
    let inner = build::udp(&UdpSpec {
        src: "[2001:db8::1]:1000".parse().unwrap(),
        dst: "[2001:db8::2]:53".parse().unwrap(),
        payload: b"query",
    })
    .unwrap();
    let outer = OuterParams {
        src: Ipv4Addr::new(192, 0, 2, 1),
        dst: Ipv4Addr::new(192, 0, 2, 2),
        src_port: 0xC123,
    };
    let option = SnasOption {
        tenant_id: snas_wire::TenantId(7),
        job_key: snas_wire::JobKey(8),
        policy_serial: snas_wire::PolicySerial(9),
    };
    let copied = geneve::encapsulate(&outer, &option, &inner).unwrap();
    let mut in_place = vec![0u8; OVERLAY_OVERHEAD + inner.len()];
    in_place[OVERLAY_OVERHEAD..].copy_from_slice(&inner);
    geneve::write_overlay_headers(
        &mut in_place,
        &outer,
        &option,
        InnerProto::Ipv6,
        inner.len(),
    )
    .unwrap();
    assert_eq!(copied, in_place);
}

#[test]
fn sandbox_mtu_is_underlay_minus_56() {
    assert_eq!(geneve::sandbox_mtu(1500), Some(1444));
    assert_eq!(geneve::sandbox_mtu(9000), Some(8944));
    assert_eq!(geneve::sandbox_mtu(40), None);
}
