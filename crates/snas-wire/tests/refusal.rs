//! Refusals: TCP RST (RFC 793) and ICMP/ICMPv6 unreachable (RFC 792/1812/4443).
#![allow(clippy::unwrap_used)] // helpers outside #[test] fns build known-good packets

use proptest::prelude::*;
use snas_wire::build::{self, EchoSpec, TcpSpec, UdpSpec, Unreachable};
use snas_wire::{BuildError, IpPacket, TcpFlags, Transport};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

fn seg(src: &str, dst: &str, seq: u32, ack: u32, flags: TcpFlags, payload: &[u8]) -> Vec<u8> {
    build::tcp(&TcpSpec {
        src: src.parse().unwrap(),
        dst: dst.parse().unwrap(),
        seq,
        ack,
        flags,
        window: 1000,
        payload,
    })
    .unwrap()
}

fn rst_fields(rst: &[u8]) -> (SocketAddr, SocketAddr, u32, u32, TcpFlags) {
    let ip = IpPacket::parse(rst).unwrap();
    let Transport::Tcp(t) = ip.transport().unwrap() else {
        panic!("not TCP")
    };
    assert!(t.checksum_ok(ip.src(), ip.dst()));
    if let IpPacket::V4(v4) = &ip {
        assert!(v4.header_checksum_ok());
    }
    assert!(t.payload().is_empty());
    (
        SocketAddr::new(ip.src(), t.src_port()),
        SocketAddr::new(ip.dst(), t.dst_port()),
        t.seq(),
        t.ack(),
        t.flags(),
    )
}

#[test]
fn rst_for_syn_acknowledges_it_and_swaps_endpoints() {
    let syn = seg(
        "192.0.2.10:40000",
        "203.0.113.7:443",
        1000,
        0,
        TcpFlags::SYN,
        &[],
    );
    let (src, dst, seq, ack, flags) = rst_fields(&build::tcp_rst(&syn).unwrap());
    assert_eq!(src, "203.0.113.7:443".parse().unwrap());
    assert_eq!(dst, "192.0.2.10:40000".parse().unwrap());
    assert_eq!((seq, ack, flags), (0, 1001, TcpFlags::RST | TcpFlags::ACK));
}

#[test]
fn rst_for_segment_with_ack_takes_its_ack_as_sequence() {
    let data = seg(
        "[2001:db8::10]:40000",
        "[2001:db8:1::7]:443",
        5,
        0xFFFF_FFF0,
        TcpFlags::ACK | TcpFlags::PSH,
        b"abc",
    );
    let (src, _, seq, _, flags) = rst_fields(&build::tcp_rst(&data).unwrap());
    assert_eq!(src, "[2001:db8:1::7]:443".parse().unwrap());
    assert_eq!((seq, flags), (0xFFFF_FFF0, TcpFlags::RST));
}

#[test]
fn rst_for_fin_without_ack_counts_payload_and_fin_with_wraparound() {
    let fin = seg(
        "192.0.2.10:40000",
        "203.0.113.7:80",
        u32::MAX - 1,
        0,
        TcpFlags::FIN,
        b"xyz",
    );
    let (_, _, _, ack, _) = rst_fields(&build::tcp_rst(&fin).unwrap());
    assert_eq!(ack, (u32::MAX - 1).wrapping_add(4));
}

#[test]
fn rst_is_never_answered_and_non_tcp_gets_no_rst() {
    let rst = seg(
        "192.0.2.10:40000",
        "203.0.113.7:80",
        1,
        0,
        TcpFlags::RST,
        &[],
    );
    assert!(matches!(
        build::tcp_rst(&rst),
        Err(BuildError::MustNotAnswer { .. })
    ));
    let udp = build::udp(&UdpSpec {
        src: "192.0.2.1:1".parse().unwrap(),
        dst: "192.0.2.2:2".parse().unwrap(),
        payload: &[],
    })
    .unwrap();
    assert!(matches!(
        build::tcp_rst(&udp),
        Err(BuildError::Offending(_))
    ));
}

fn icmp_fields(msg: &[u8]) -> (IpAddr, IpAddr, u8, u8, Vec<u8>) {
    let ip = IpPacket::parse(msg).unwrap();
    let m = match ip.transport().unwrap() {
        Transport::Icmp(m) | Transport::Icmpv6(m) => m,
        other => panic!("not ICMP: {other:?}"),
    };
    assert!(m.checksum_ok(ip.src(), ip.dst()));
    assert!(m.is_error());
    (
        ip.src(),
        ip.dst(),
        m.msg_type(),
        m.code(),
        m.payload().to_vec(),
    )
}

#[test]
fn icmpv4_unreachable_quotes_the_offending_packet_from_its_destination() {
    let off = build::udp(&UdpSpec {
        src: "192.0.2.10:5000".parse().unwrap(),
        dst: "203.0.113.7:9999".parse().unwrap(),
        payload: b"data",
    })
    .unwrap();
    let (src, dst, ty, code, quote) =
        icmp_fields(&build::icmp_unreachable(&off, Unreachable::Port).unwrap());
    assert_eq!(
        (src, dst),
        (
            "203.0.113.7".parse().unwrap(),
            "192.0.2.10".parse().unwrap()
        )
    );
    assert_eq!((ty, code), (3, 3));
    assert_eq!(quote, off);
    let (_, _, ty, code, _) =
        icmp_fields(&build::icmp_unreachable(&off, Unreachable::AdminProhibited).unwrap());
    assert_eq!((ty, code), (3, 13));
}

#[test]
fn icmpv6_unreachable_uses_v6_codes_and_pseudo_header_checksum() {
    let off = seg(
        "[2001:db8::10]:40000",
        "[2001:db8:1::7]:25",
        1,
        0,
        TcpFlags::SYN,
        &[],
    );
    let (src, dst, ty, code, quote) =
        icmp_fields(&build::icmp_unreachable(&off, Unreachable::Port).unwrap());
    assert_eq!(
        (src, dst),
        (
            "2001:db8:1::7".parse().unwrap(),
            "2001:db8::10".parse().unwrap()
        )
    );
    assert_eq!((ty, code, quote), (1, 4, off.clone()));
    let (_, _, ty, code, _) =
        icmp_fields(&build::icmp_unreachable(&off, Unreachable::AdminProhibited).unwrap());
    assert_eq!((ty, code), (1, 1));
}

#[test]
fn icmp_errors_are_capped_at_576_and_1280_bytes() {
    let big = vec![7u8; 3000];
    let v4 = build::udp(&UdpSpec {
        src: "192.0.2.10:1".parse().unwrap(),
        dst: "203.0.113.7:2".parse().unwrap(),
        payload: &big,
    })
    .unwrap();
    let e4 = build::icmp_unreachable(&v4, Unreachable::Port).unwrap();
    assert_eq!(e4.len(), 576);
    assert_eq!(&e4[28..], &v4[..548]);
    let v6 = build::udp(&UdpSpec {
        src: "[2001:db8::1]:1".parse().unwrap(),
        dst: "[2001:db8::2]:2".parse().unwrap(),
        payload: &big,
    })
    .unwrap();
    let e6 = build::icmp_unreachable(&v6, Unreachable::Port).unwrap();
    assert_eq!(e6.len(), 1280);
    icmp_fields(&e6);
}

#[test]
fn icmp_errors_are_not_answered_with_icmp_errors() {
    let off = build::udp(&UdpSpec {
        src: "192.0.2.10:1".parse().unwrap(),
        dst: "203.0.113.7:2".parse().unwrap(),
        payload: b"x",
    })
    .unwrap();
    let err = build::icmp_unreachable(&off, Unreachable::Port).unwrap();
    assert!(matches!(
        build::icmp_unreachable(&err, Unreachable::Port),
        Err(BuildError::MustNotAnswer { .. })
    ));
    // But an echo request may be refused.
    let echo = build::icmp_echo(&EchoSpec {
        src: "2001:db8::1".parse().unwrap(),
        dst: "2001:db8::2".parse().unwrap(),
        reply: false,
        ident: 1,
        seq: 1,
        payload: b"ping",
    })
    .unwrap();
    assert!(build::icmp_unreachable(&echo, Unreachable::AdminProhibited).is_ok());
}

#[test]
fn non_first_fragments_and_multicast_sources_get_no_icmp_error() {
    let mut frag = build::udp(&UdpSpec {
        src: "192.0.2.10:1".parse().unwrap(),
        dst: "203.0.113.7:2".parse().unwrap(),
        payload: b"x",
    })
    .unwrap();
    frag[6..8].copy_from_slice(&1u16.to_be_bytes());
    assert!(matches!(
        build::icmp_unreachable(&frag, Unreachable::Port),
        Err(BuildError::MustNotAnswer { .. })
    ));
    let mc = build::udp(&UdpSpec {
        src: "224.0.0.1:1".parse().unwrap(),
        dst: "203.0.113.7:2".parse().unwrap(),
        payload: b"x",
    })
    .unwrap();
    assert!(matches!(
        build::icmp_unreachable(&mc, Unreachable::Port),
        Err(BuildError::MustNotAnswer { .. })
    ));
}

proptest! {
    #[test]
    fn refusals_of_any_tcp_segment_are_valid_packets(
        a in any::<u32>(), b in any::<u32>(), sp in any::<u16>(), dp in any::<u16>(),
        seq in any::<u32>(), ack in any::<u32>(), flags in any::<u8>(),
        data in proptest::collection::vec(any::<u8>(), 0..800),
    ) {
        let off = build::tcp(&TcpSpec {
            src: SocketAddr::new(Ipv4Addr::from(a).into(), sp), dst: SocketAddr::new(Ipv4Addr::from(b).into(), dp),
            seq, ack, flags: TcpFlags(flags), window: 0, payload: &data,
        }).unwrap();
        match build::tcp_rst(&off) {
            Ok(rst) => { rst_fields(&rst); }
            Err(BuildError::MustNotAnswer { .. }) => prop_assert!(TcpFlags(flags).contains(TcpFlags::RST)),
            Err(e) => prop_assert!(false, "unexpected {e}"),
        }
        match build::icmp_unreachable(&off, Unreachable::AdminProhibited) {
            Ok(e) => { prop_assert!(e.len() <= 576); icmp_fields(&e); }
            Err(BuildError::MustNotAnswer { .. }) => {
                let src = Ipv4Addr::from(a);
                let dst = Ipv4Addr::from(b);
                prop_assert!(src.is_multicast() || src.is_unspecified() || dst.is_multicast());
            }
            Err(e) => prop_assert!(false, "unexpected {e}"),
        }
    }
}
