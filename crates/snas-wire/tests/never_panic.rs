//! Arbitrary and mutated bytes never panic any parser, rewriter or refusal builder.
#![allow(clippy::unwrap_used)] // helpers outside #[test] fns build known-good packets

use proptest::prelude::*;
use snas_wire::build::{self, TcpSpec, Unreachable};
use snas_wire::geneve::{self, GeneveHeader};
use snas_wire::{Endpoint, IpPacket, OuterParams, SnasOption, TcpFlags};
use std::net::Ipv4Addr;

/// Runs every entry point over `data`; panics are the failure.
fn exercise(data: &[u8]) {
    if let Ok(ip) = IpPacket::parse(data) {
        let _ = (ip.src(), ip.dst(), ip.payload().len());
        let _ = ip.transport();
        let _ = ip.flow_tuple();
    }
    let _ = snas_wire::flow_tuple(data);
    let _ = snas_wire::Ipv4Packet::parse(data).map(|p| (p.options().len(), p.header_checksum_ok()));
    let _ = snas_wire::Ipv6Packet::parse(data).map(|p| p.payload().len());
    if let Ok(d) = geneve::decapsulate(data) {
        assert_eq!(&data[d.inner_range.clone()], d.inner);
    }
    if let Ok(g) = geneve::parse_payload(data) {
        assert!(g.inner_offset < data.len());
    }
    if let Ok(h) = GeneveHeader::parse(data) {
        for o in h.options() {
            let _ = o;
        }
    }
    let mut m = data.to_vec();
    let before = m.clone();
    if snas_wire::rewrite(
        &mut m,
        Endpoint::Source,
        Ipv4Addr::new(198, 51, 100, 9).into(),
        7,
    )
    .is_err()
    {
        assert_eq!(m, before, "a refused rewrite must not touch the packet");
    }
    let _ = snas_wire::quoted_flow_tuple(data);
    let mut m = data.to_vec();
    let a: std::net::IpAddr = Ipv4Addr::new(192, 0, 2, 10).into();
    if snas_wire::rewrite_icmp_error(&mut m, a, a, 5).is_err() {
        assert_eq!(
            m, data,
            "a refused ICMP translation must not touch the packet"
        );
    }
    let _ = build::tcp_rst(data);
    let _ = build::icmp_unreachable(data, Unreachable::Port);
}

fn valid_overlay(icmp_error: bool) -> Vec<u8> {
    let inner = build::tcp(&TcpSpec {
        src: "192.0.2.10:40000".parse().unwrap(),
        dst: "203.0.113.7:443".parse().unwrap(),
        seq: 1,
        ack: 2,
        flags: TcpFlags::SYN,
        window: 3,
        payload: b"0123456789",
    })
    .unwrap();
    // Either the TCP segment or an ICMP error quoting it, so mutations reach the quote parser.
    let inner = if icmp_error {
        build::icmp_unreachable(&inner, Unreachable::Port).unwrap()
    } else {
        inner
    };
    let outer = OuterParams {
        src: Ipv4Addr::new(198, 51, 100, 1),
        dst: Ipv4Addr::new(198, 51, 100, 2),
        src_port: 0xC000,
    };
    geneve::encapsulate(
        &outer,
        &SnasOption {
            tenant_id: snas_wire::TenantId(1),
            job_key: snas_wire::JobKey(2),
            policy_serial: snas_wire::PolicySerial(3),
        },
        &inner,
    )
    .unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn arbitrary_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..200)) {
        exercise(&data);
    }

    #[test]
    fn mutated_valid_packets_never_panic(
        flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6),
        cut in any::<prop::sample::Index>(),
        start in 0usize..3,
        icmp_error in any::<bool>(),
    ) {
        let mut p = valid_overlay(icmp_error);
        for (i, v) in flips {
            let at = i.index(p.len());
            p[at] = v;
        }
        let end = cut.index(p.len() + 1);
        // Start at the outer IPv4, the GENEVE payload or the inner packet.
        let offset = [0, 28, 56][start].min(end);
        exercise(&p[offset..end]);
        exercise(&p[offset..]);
    }
}
