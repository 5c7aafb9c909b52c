//! Fuzz the inner-packet parsers: IPv4/IPv6/TCP/UDP/ICMP views, the flow key, the NAT rewrite and
//! the ICMP-error translation and the refusal builders. Any panic is a bug; a refused rewrite must leave the packet unchanged.
#![no_main]

use libfuzzer_sys::fuzz_target;
use snas_wire::build::{self, Unreachable};
use snas_wire::{Endpoint, IpPacket, Transport};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

fuzz_target!(|data: &[u8]| {
    if let Ok(ip) = IpPacket::parse(data) {
        let (src, dst) = (ip.src(), ip.dst());
        match ip.transport() {
            Ok(Transport::Tcp(t)) => {
                let _ = (
                    t.options().len(),
                    t.payload().len(),
                    t.segment_len(),
                    t.checksum_ok(src, dst),
                );
            }
            Ok(Transport::Udp(u)) => {
                let _ = (u.payload().len(), u.checksum_ok(src, dst));
            }
            Ok(Transport::Icmp(m)) | Ok(Transport::Icmpv6(m)) => {
                let _ = (m.is_echo(), m.is_error(), m.checksum_ok(src, dst));
            }
            Err(e) => {
                let _ = e.reason();
            }
        }
        if let Ok(t) = ip.flow_tuple() {
            assert_eq!(t.reversed().reversed(), t);
        }
    }
    let _ = snas_wire::flow_tuple(data);

    let new: IpAddr = if data.first().map_or(false, |b| b >> 4 == 6) {
        Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 9).into()
    } else {
        Ipv4Addr::new(198, 51, 100, 9).into()
    };
    let mut m = data.to_vec();
    match snas_wire::rewrite(&mut m, Endpoint::Source, new, 4242) {
        Ok(()) => {
            let t = snas_wire::flow_tuple(&m).expect("a rewritten packet still parses");
            assert_eq!((t.src, t.src_port), (new, 4242));
        }
        Err(_) => assert_eq!(m, data, "a refused rewrite must not touch the packet"),
    }
    if let Ok(q) = snas_wire::quoted_flow_tuple(data) {
        let mut m = data.to_vec();
        let src: IpAddr = if q.src.is_ipv6() {
            Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 10).into()
        } else {
            Ipv4Addr::new(192, 0, 2, 10).into()
        };
        let port = 5;
        snas_wire::rewrite_icmp_error(&mut m, src, src, port).expect("a parsed quote translates");
        let t = snas_wire::quoted_flow_tuple(&m).expect("a translated error still parses");
        assert_eq!((t.src, t.src_port), (src, port));
    } else {
        let mut m = data.to_vec();
        let a = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 10));
        let _ = snas_wire::rewrite_icmp_error(&mut m, a, a, 5);
        assert_eq!(
            m, data,
            "a refused ICMP translation must not touch the packet"
        );
    }
    let _ = build::tcp_rst(data);
    let _ = build::icmp_unreachable(data, Unreachable::AdminProhibited);
});
