//! Proxy hot path per packet: GENEVE `parse_payload` → inner parse and flow key → SNAT rewrite
//! (address + port, incremental checksums) → GENEVE header write, in place, at three inner sizes.
//! Also times each part alone at 1400 bytes. Prints ns/packet via criterion
//! (`cargo bench -p snas-wire --bench wire`).

use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use snas_wire::build::{self, TcpSpec};
use snas_wire::geneve::{self, GENEVE_HEADER_LEN, MAX_INNER_LEN};
use snas_wire::{Endpoint, NatPacket, SnasOption, TcpFlags};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

fn payload_with_inner(inner_len: usize) -> Vec<u8> {
    let payload = vec![0xA5u8; inner_len - 40];
    let spec = TcpSpec {
        src: SocketAddr::new(Ipv4Addr::new(192, 0, 2, 10).into(), 40000),
        dst: SocketAddr::new(Ipv4Addr::new(203, 0, 113, 7).into(), 443),
        seq: 1,
        ack: 2,
        flags: TcpFlags::ACK | TcpFlags::PSH,
        window: 65535,
        payload: &payload,
    };
    let inner = build::tcp(&spec).unwrap_or_default();
    let option = SnasOption {
        tenant_id: snas_wire::TenantId(1),
        job_key: snas_wire::JobKey(2),
        policy_serial: snas_wire::PolicySerial(3),
    };
    let mut buf = vec![0u8; GENEVE_HEADER_LEN + inner.len()];
    let _ = geneve::write_geneve_header(&mut buf, &option, snas_wire::InnerProto::Ipv4);
    buf[GENEVE_HEADER_LEN..].copy_from_slice(&inner);
    buf
}

fn hot_path(c: &mut Criterion) {
    let mut group = c.benchmark_group("decap_nat_encap");
    let egress = IpAddr::V4(Ipv4Addr::new(198, 51, 100, 1));
    for size in [64usize, 1400, MAX_INNER_LEN] {
        let mut buf = payload_with_inner(size);
        // The timed loop bails out on a parse failure; make sure it cannot.
        let g = geneve::parse_payload(&buf).expect("bench packet parses");
        snas_wire::flow_tuple(&buf[g.inner_offset..]).expect("bench inner packet has a flow");
        group.throughput(Throughput::Elements(1));
        group.bench_with_input(BenchmarkId::from_parameter(size), &size, |b, _| {
            let mut port = 1024u16;
            b.iter(|| {
                let Ok(g) = geneve::parse_payload(black_box(&buf)) else {
                    return;
                };
                // Parse once: the tuple keys conntrack, then the same view rewrites.
                let Ok(mut nat) = NatPacket::parse(&mut buf[g.inner_offset..]) else {
                    return;
                };
                let tuple = nat.tuple();
                port = port.wrapping_add(1) | 1024;
                let _ = nat.rewrite(Endpoint::Source, egress, port);
                let _ = geneve::write_geneve_header(&mut buf, &g.option, g.inner_proto);
                black_box(tuple);
            });
        });
    }
    group.finish();
}

/// The parts of the hot path on their own, at 1400 bytes.
fn parts(c: &mut Criterion) {
    let mut group = c.benchmark_group("parts_1400");
    let mut buf = payload_with_inner(1400);
    let off = geneve::parse_payload(&buf)
        .expect("bench packet parses")
        .inner_offset;
    let option = SnasOption {
        tenant_id: snas_wire::TenantId(1),
        job_key: snas_wire::JobKey(2),
        policy_serial: snas_wire::PolicySerial(3),
    };
    group.bench_function("parse_payload", |b| {
        b.iter(|| geneve::parse_payload(black_box(&buf)))
    });
    group.bench_function("flow_tuple", |b| {
        b.iter(|| snas_wire::flow_tuple(black_box(&buf[off..])))
    });
    let egress = IpAddr::V4(Ipv4Addr::new(198, 51, 100, 1));
    group.bench_function("rewrite", |b| {
        let mut port = 1024u16;
        b.iter(|| {
            port = port.wrapping_add(1) | 1024;
            snas_wire::rewrite(black_box(&mut buf[off..]), Endpoint::Source, egress, port)
        })
    });
    group.bench_function("write_geneve_header", |b| {
        b.iter(|| {
            geneve::write_geneve_header(black_box(&mut buf), &option, snas_wire::InnerProto::Ipv4)
        })
    });
    group.finish();
}

criterion_group!(benches, hot_path, parts);
criterion_main!(benches);
