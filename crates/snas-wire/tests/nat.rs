//! NAT rewrites: incremental checksum updates equal full recomputation.
#![allow(clippy::unwrap_used)] // helpers outside #[test] fns build known-good packets

use proptest::prelude::*;
use snas_wire::build::{self, EchoSpec, TcpSpec, UdpSpec};
use snas_wire::checksum;
use snas_wire::{
    flow_tuple, quoted_flow_tuple, rewrite, rewrite_icmp_error, Endpoint, IpPacket, NatError,
    NatPacket, TcpFlags, Transport,
};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

fn addr(v6: bool, bits: u128) -> IpAddr {
    if v6 {
        IpAddr::V6(Ipv6Addr::from(bits))
    } else {
        IpAddr::V4(Ipv4Addr::from(bits as u32))
    }
}

/// A random TCP, UDP or ICMP echo packet of either family with correct checksums.
fn packet() -> impl Strategy<Value = Vec<u8>> {
    (
        any::<bool>(),
        0u8..3,
        any::<u128>(),
        any::<u128>(),
        any::<u16>(),
        any::<u16>(),
        any::<u32>(),
        proptest::collection::vec(any::<u8>(), 0..600),
    )
        .prop_map(|(v6, kind, a, b, p, q, seq, data)| {
            let (src, dst) = (addr(v6, a), addr(v6, b));
            match kind {
                0 => build::tcp(&TcpSpec {
                    src: SocketAddr::new(src, p),
                    dst: SocketAddr::new(dst, q),
                    seq,
                    ack: !seq,
                    flags: TcpFlags::ACK,
                    window: 1000,
                    payload: &data,
                }),
                1 => build::udp(&UdpSpec {
                    src: SocketAddr::new(src, p),
                    dst: SocketAddr::new(dst, q),
                    payload: &data,
                }),
                _ => build::icmp_echo(&EchoSpec {
                    src,
                    dst,
                    reply: false,
                    ident: p,
                    seq: q,
                    payload: &data,
                }),
            }
            .unwrap()
        })
}

/// Checksum fields as stored and as a full recomputation gives them.
fn stored_and_recomputed(p: &[u8]) -> Vec<(u16, u16)> {
    let ip = IpPacket::parse(p).unwrap();
    let (src, dst) = (ip.src(), ip.dst());
    let mut out = Vec::new();
    if let IpPacket::V4(v4) = &ip {
        let mut h = v4.header().to_vec();
        h[10..12].fill(0);
        out.push((v4.header_checksum(), checksum::checksum(&h)));
    }
    let mut l4 = ip.payload().to_vec();
    let (at, proto) = match ip.transport().unwrap() {
        Transport::Tcp(_) => (16, 6),
        Transport::Udp(_) => (6, 17),
        Transport::Icmp(_) => (2, 1),
        Transport::Icmpv6(_) => (2, 58),
    };
    let stored = u16::from_be_bytes([l4[at], l4[at + 1]]);
    l4[at..at + 2].fill(0);
    let full = match proto {
        1 => checksum::checksum(&l4),
        17 => checksum::udp_field(checksum::transport(src, dst, proto, &l4)),
        _ => checksum::transport(src, dst, proto, &l4),
    };
    out.push((stored, full));
    out
}

proptest! {
    #[test]
    fn translated_icmp_error_equals_the_error_for_the_original_packet(
        p in packet(), nat_bits in any::<u128>(), nat_port in any::<u16>(), admin in any::<bool>(),
    ) {
        // Sandbox packet p is SNATed; the internet answers the NATed packet with an ICMP error;
        // reverse translation must give exactly the error the sandbox would have got directly.
        let why = if admin { build::Unreachable::AdminProhibited } else { build::Unreachable::Port };
        let orig = flow_tuple(&p).unwrap();
        let mut snat = p.clone();
        rewrite(&mut snat, Endpoint::Source, addr(orig.src.is_ipv6(), nat_bits), nat_port).unwrap();
        let (Ok(from_internet), Ok(expected)) =
            (build::icmp_unreachable(&snat, why), build::icmp_unreachable(&p, why))
        else {
            // Multicast or unspecified addresses get no ICMP error at all.
            return Ok(());
        };
        prop_assert_eq!(quoted_flow_tuple(&from_internet).unwrap(), flow_tuple(&snat).unwrap());
        let mut translated = from_internet.clone();
        rewrite_icmp_error(&mut translated, orig.src, orig.src, orig.src_port).unwrap();
        prop_assert_eq!(translated, expected);
    }

    #[test]
    fn incremental_rewrite_equals_full_recomputation(
        mut p in packet(), new_bits in any::<u128>(), new_port in any::<u16>(), src in any::<bool>(),
    ) {
        let before = flow_tuple(&p).unwrap();
        let new_addr = addr(before.src.is_ipv6(), new_bits);
        let which = if src { Endpoint::Source } else { Endpoint::Destination };
        let mut nat = NatPacket::parse(&mut p).unwrap();
        prop_assert_eq!(nat.tuple(), before);
        nat.rewrite(which, new_addr, new_port).unwrap();
        let tracked = nat.tuple();
        prop_assert_eq!(tracked, flow_tuple(&p).unwrap());
        for (stored, full) in stored_and_recomputed(&p) {
            prop_assert_eq!(stored, full);
        }
        let after = flow_tuple(&p).unwrap();
        let icmp = matches!(before.proto, snas_wire::L4Proto::Icmp | snas_wire::L4Proto::Icmpv6);
        if src {
            prop_assert_eq!((after.src, after.src_port), (new_addr, new_port));
            prop_assert_eq!(after.dst, before.dst);
            if !icmp { prop_assert_eq!(after.dst_port, before.dst_port); }
        } else {
            prop_assert_eq!((after.dst, after.dst_port), (new_addr, new_port));
            prop_assert_eq!(after.src, before.src);
            if !icmp { prop_assert_eq!(after.src_port, before.src_port); }
        }
    }

    #[test]
    fn rewrite_there_and_back_restores_the_packet(
        p in packet(), new_bits in any::<u128>(), new_port in any::<u16>(),
    ) {
        let t = flow_tuple(&p).unwrap();
        let mut q = p.clone();
        rewrite(&mut q, Endpoint::Source, addr(t.src.is_ipv6(), new_bits), new_port).unwrap();
        rewrite(&mut q, Endpoint::Source, t.src, t.src_port).unwrap();
        // Checksums may legitimately differ only in the 0x0000/0xFFFF representation; ours never do.
        prop_assert_eq!(q, p);
    }

    #[test]
    fn ipv4_udp_without_checksum_keeps_it_absent(
        a in any::<u32>(), b in any::<u32>(), new in any::<u32>(), port in any::<u16>(),
        data in proptest::collection::vec(any::<u8>(), 0..100),
    ) {
        let mut p = build::udp(&UdpSpec {
            src: SocketAddr::new(Ipv4Addr::from(a).into(), 1), dst: SocketAddr::new(Ipv4Addr::from(b).into(), 2),
            payload: &data,
        }).unwrap();
        p[26..28].fill(0);
        rewrite(&mut p, Endpoint::Source, Ipv4Addr::from(new).into(), port).unwrap();
        prop_assert_eq!(&p[26..28], &[0, 0]);
        prop_assert_eq!(stored_and_recomputed(&p)[0].0, stored_and_recomputed(&p)[0].1);
    }

    #[test]
    fn port_and_sequence_setters_keep_tcp_checksum_valid(
        p in packet(), port in any::<u16>(), seq in any::<u32>(), ttl in any::<u8>(),
    ) {
        let mut p = p;
        let ip = IpPacket::parse(&p[..]).unwrap();
        let (src, dst, hlen, is_tcp) = (ip.src(), ip.dst(), ip.header_len(), matches!(ip.transport(), Ok(Transport::Tcp(_))));
        if let IpPacket::V4(_) = ip {
            let mut v4 = snas_wire::Ipv4Packet::parse(&mut p[..]).unwrap();
            v4.set_ttl(ttl);
            prop_assert!(v4.header_checksum_ok());
        }
        if is_tcp {
            let mut t = snas_wire::TcpPacket::parse(&mut p[hlen..]).unwrap();
            t.set_dst_port(port);
            t.set_seq(seq);
            t.set_ack(seq ^ 0x5555_5555);
            prop_assert!(t.checksum_ok(src, dst));
        }
    }
}

#[test]
fn rewrite_refuses_a_family_change_and_leaves_the_packet_unchanged() {
    let p = build::tcp(&TcpSpec {
        src: "192.0.2.10:40000".parse().unwrap(),
        dst: "203.0.113.7:443".parse().unwrap(),
        seq: 1,
        ack: 0,
        flags: TcpFlags::SYN,
        window: 1,
        payload: &[],
    })
    .unwrap();
    let mut q = p.clone();
    let err = rewrite(&mut q, Endpoint::Source, "2001:db8::1".parse().unwrap(), 1).unwrap_err();
    assert_eq!(err, NatError::FamilyMismatch { packet: 4 });
    assert_eq!(q, p);
}

#[test]
fn rewrite_refuses_fragments_and_leaves_them_unchanged() {
    let mut p = build::udp(&UdpSpec {
        src: "192.0.2.10:4000".parse().unwrap(),
        dst: "203.0.113.7:53".parse().unwrap(),
        payload: b"x",
    })
    .unwrap();
    p[6] |= 0x20;
    let before = p.clone();
    let err = rewrite(&mut p, Endpoint::Source, "198.51.100.1".parse().unwrap(), 1).unwrap_err();
    assert_eq!(err.reason(), snas_wire::Reason::Fragment);
    assert_eq!(p, before);
}

#[test]
fn only_icmp_errors_quoting_a_flow_are_translated() {
    let echo = build::icmp_echo(&EchoSpec {
        src: "203.0.113.7".parse().unwrap(),
        dst: "198.51.100.1".parse().unwrap(),
        reply: false,
        ident: 1,
        seq: 1,
        payload: b"x",
    })
    .unwrap();
    assert!(matches!(
        quoted_flow_tuple(&echo),
        Err(snas_wire::ParseError::NotAFlow { ty: 8, .. })
    ));
    let mut e = echo.clone();
    assert!(rewrite_icmp_error(
        &mut e,
        "192.0.2.10".parse().unwrap(),
        "192.0.2.10".parse().unwrap(),
        1
    )
    .is_err());
    assert_eq!(e, echo);
    // A redirect (type 5) quoting a UDP packet is not translated either.
    let udp = build::udp(&UdpSpec {
        src: "198.51.100.1:40000".parse().unwrap(),
        dst: "203.0.113.7:53".parse().unwrap(),
        payload: b"q",
    })
    .unwrap();
    let mut redirect = build::icmp_unreachable(&udp, build::Unreachable::Port).unwrap();
    redirect[20] = 5;
    assert!(matches!(
        quoted_flow_tuple(&redirect),
        Err(snas_wire::ParseError::NotAFlow { ty: 5, .. })
    ));
}

#[test]
fn icmp_error_quoting_too_little_is_rejected() {
    let udp = build::udp(&UdpSpec {
        src: "198.51.100.1:40000".parse().unwrap(),
        dst: "203.0.113.7:53".parse().unwrap(),
        payload: b"q",
    })
    .unwrap();
    let err = build::icmp_unreachable(&udp, build::Unreachable::Port).unwrap();
    // Cut the quote to the IP header plus 4 transport bytes, and fix the outer lengths.
    let mut short = err[..20 + 8 + 20 + 4].to_vec();
    let total = short.len() as u16;
    short[2..4].copy_from_slice(&total.to_be_bytes());
    snas_wire::Ipv4Packet::parse(&mut short[..])
        .unwrap()
        .fill_header_checksum();
    assert_eq!(
        quoted_flow_tuple(&short).unwrap_err().reason(),
        snas_wire::Reason::Malformed
    );
}
