//! ICMP and ICMPv6 errors from the internet translated back to the job (issue 18): IPv4
//! "fragmentation needed" and ICMPv6 "packet too big" (path-MTU discovery), port unreachable,
//! errors quoting no flow, error floods. Pure: a manual clock, no sockets.
#![allow(clippy::unwrap_used)]

use std::net::{IpAddr, SocketAddr};
use std::ops::{Deref, DerefMut};
use std::time::Duration;

use snas_proxy::tier2::{Tier2Config, Verdict, ICMP_ERRORS_PER_SEC};
use snas_wire::build::{tcp, udp, TcpSpec, UdpSpec};
use snas_wire::checksum;
use snas_wire::geneve::{parse_payload, InnerProto, SnasOption};
use snas_wire::{IpPacket, Reason, TcpFlags, Transport};

mod engine;
use engine::{Engine, NODE, PROXY};

const EGRESS: &str = "198.51.100.1";
const EGRESS6: &str = "2001:db8:e::1";
const SANDBOX: &str = "10.255.0.2";
const SANDBOX6: &str = "2001:db8:5::2";
const SERVER: &str = "203.0.113.10";
const SERVER6: &str = "2001:db8:10::10";
/// A router on the narrow path (it sends the errors).
const ROUTER: &str = "203.0.113.254";
const ROUTER6: &str = "2001:db8:10::fe";

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

const POLICY: &str = r#"
tenant = "acme"
job = "job-1"
node = "192.0.2.7"
[[egress]]
cidr = "203.0.113.0/24"
ports = "443"
[[egress]]
cidr = "203.0.113.0/24"
ports = "9999"
protocol = "udp"
[[egress]]
cidr = "2001:db8:10::/48"
ports = "443"
[[egress]]
cidr = "2001:db8:10::/48"
ports = "9999"
protocol = "udp"
[limits]
max_connections = 5000
new_connections_per_sec = 10000
new_connections_burst = 10000
"#;

/// Two jobs of tenant acme on an engine with an IPv4 and an IPv6 egress address.
struct Fixture(Engine);

impl Deref for Fixture {
    type Target = Engine;
    fn deref(&self) -> &Engine {
        &self.0
    }
}

impl DerefMut for Fixture {
    fn deref_mut(&mut self) -> &mut Engine {
        &mut self.0
    }
}

fn option(jti: &str) -> SnasOption {
    engine::option(jti, 1)
}

impl Fixture {
    fn new() -> Fixture {
        let cfg = Tier2Config::new(PROXY, vec![NODE], vec![ip(EGRESS), ip(EGRESS6)]);
        let mut e = Engine::new(cfg);
        e.hold_policy(POLICY, "jti-job-a-0000001", 1);
        e.hold_policy(POLICY, "jti-job-b-0000001", 1);
        Fixture(e)
    }

    /// Sends the job's `inner` packet from its node; returns the SNATed packet.
    fn egress(&mut self, jti: &str, inner: &[u8]) -> Vec<u8> {
        self.egress_within(jti, inner).0
    }

    /// Like [`Fixture::egress`], with the path MTU the packet must be segmented for.
    fn egress_within(&mut self, jti: &str, inner: &[u8]) -> (Vec<u8>, Option<u16>) {
        let proto = if inner[0] >> 4 == 6 {
            InnerProto::Ipv6
        } else {
            InnerProto::Ipv4
        };
        let r = self.packet_from_node_proto(NODE, &option(jti), proto, inner);
        let Verdict::ToInternet {
            range, path_mtu, ..
        } = r.verdict
        else {
            panic!("expected ToInternet, got {:?}", r.verdict)
        };
        (r.payload[range].to_vec(), path_mtu)
    }

    /// Hands a packet from the internet to the engine.
    fn receive(&mut self, inner: &[u8]) -> (Verdict, Vec<u8>) {
        self.packet_from_internet(inner)
    }

    /// The inner packet of a `ToNode` verdict, checked to be for NODE with the job's option.
    fn translated_for(&mut self, jti: &str, error: &[u8]) -> Vec<u8> {
        let (v, buf) = self.receive(error);
        let Verdict::ToNode { node, range, .. } = v else {
            panic!("expected ToNode, got {v:?}")
        };
        assert_eq!(node, NODE);
        let g = parse_payload(&buf[range.clone()]).unwrap();
        assert_eq!(g.option, option(jti));
        buf[range.start + g.inner_offset..range.end].to_vec()
    }

    fn dropped(&self, r: Reason) -> u64 {
        self.tier2.drops()[r.code() as usize]
    }
}

/// The SYN the proxy would have sent from egress port `egress_port` to `dst`:443: what an error
/// from the internet quotes.
fn quoted_syn(egress_port: u16, dst: &str) -> Vec<u8> {
    tcp(&TcpSpec {
        src: SocketAddr::new(ip(EGRESS), egress_port),
        dst: SocketAddr::new(ip(dst), 443),
        seq: 1,
        ack: 0,
        flags: TcpFlags::SYN,
        window: 1,
        payload: &[],
    })
    .unwrap()
}

fn syn(src: &str, sport: u16, dst: &str, payload: &[u8]) -> Vec<u8> {
    tcp(&TcpSpec {
        src: SocketAddr::new(ip(src), sport),
        dst: SocketAddr::new(ip(dst), 443),
        seq: 1000,
        ack: 0,
        flags: TcpFlags::SYN,
        window: 65535,
        payload,
    })
    .unwrap()
}

fn datagram(src: &str, sport: u16, dst: &str) -> Vec<u8> {
    udp(&UdpSpec {
        src: SocketAddr::new(ip(src), sport),
        dst: SocketAddr::new(ip(dst), 9999),
        payload: b"are you there?",
    })
    .unwrap()
}

/// An ICMP (IPv4) or ICMPv6 error from `from` to the quoted packet's source, quoting as much of
/// `quoted` as fits in 576 / 1280 bytes, with `rest` as bytes 4..8 of the ICMP header (the MTU).
fn icmp_error(from: &str, ty: u8, code: u8, rest: [u8; 4], quoted: &[u8]) -> Vec<u8> {
    let q = IpPacket::parse(quoted).unwrap();
    let (src, dst) = (ip(from), q.src());
    let v6 = dst.is_ipv6();
    let hdr = if v6 { 40 } else { 20 };
    let limit = if v6 { 1280 } else { 576 };
    let qlen = quoted.len().min(limit - hdr - 8);
    let mut msg = vec![ty, code, 0, 0];
    msg.extend_from_slice(&rest);
    msg.extend_from_slice(&quoted[..qlen]);
    let mut p = Vec::new();
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            let total = u16::try_from(hdr + msg.len()).unwrap();
            p.extend_from_slice(&[0x45, 0]);
            p.extend_from_slice(&total.to_be_bytes());
            p.extend_from_slice(&[0, 0, 0, 0, 64, 1, 0, 0]);
            p.extend_from_slice(&s.octets());
            p.extend_from_slice(&d.octets());
            let c = checksum::checksum(&p);
            p[10..12].copy_from_slice(&c.to_be_bytes());
            let c = checksum::checksum(&msg);
            msg[2..4].copy_from_slice(&c.to_be_bytes());
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            let plen = u16::try_from(msg.len()).unwrap();
            p.extend_from_slice(&[0x60, 0, 0, 0]);
            p.extend_from_slice(&plen.to_be_bytes());
            p.extend_from_slice(&[58, 64]);
            p.extend_from_slice(&s.octets());
            p.extend_from_slice(&d.octets());
            let c = checksum::transport(src, dst, 58, &msg);
            msg[2..4].copy_from_slice(&c.to_be_bytes());
        }
        _ => panic!("mixed families"),
    }
    p.extend_from_slice(&msg);
    p
}

/// Checks a translated error: to the job, from the router, the type/code/rest unchanged, every
/// checksum valid, and the quote is the job's own packet (source = the job's address and port).
fn assert_translated(
    err: &[u8],
    router: &str,
    job: &str,
    job_port: u16,
    server: &str,
    kind: (u8, u8, [u8; 4]),
) {
    let p = IpPacket::parse(err).unwrap();
    assert_eq!((p.src(), p.dst()), (ip(router), ip(job)));
    if let IpPacket::V4(_) = &p {
        assert_eq!(
            checksum::checksum(&err[..20]),
            0,
            "outer IPv4 header checksum"
        );
    }
    let Ok(Transport::Icmp(m) | Transport::Icmpv6(m)) = p.transport() else {
        panic!("not ICMP")
    };
    assert_eq!((m.msg_type(), m.code()), (kind.0, kind.1));
    assert_eq!(
        m.as_bytes()[4..8],
        kind.2,
        "MTU / unused bytes passed on unchanged"
    );
    assert!(m.checksum_ok(p.src(), p.dst()), "ICMP checksum");
    let quote = m.payload();
    if quote[0] >> 4 == 4 {
        assert_eq!(
            checksum::checksum(&quote[..20]),
            0,
            "quoted IPv4 header checksum"
        );
    }
    let t = snas_wire::quoted_flow_tuple(err).unwrap();
    assert_eq!(
        (t.src, t.src_port),
        (ip(job), job_port),
        "quote is the job's packet"
    );
    assert_eq!(t.dst, ip(server));
    // A whole quote: its transport checksum is valid too (a cut one cannot be checked).
    if let Ok(q) = IpPacket::parse(quote) {
        match q.transport().unwrap() {
            Transport::Tcp(s) => assert!(s.checksum_ok(q.src(), q.dst()), "quoted TCP checksum"),
            Transport::Udp(d) => assert!(d.checksum_ok(q.src(), q.dst()), "quoted UDP checksum"),
            other => panic!("unexpected quote {other:?}"),
        }
    } else {
        assert_eq!(
            err.len(),
            if t.src.is_ipv6() { 1280 } else { 576 },
            "only cut quotes"
        );
    }
}

const JOB_A: &str = "jti-job-a-0000001";
const JOB_B: &str = "jti-job-b-0000001";

#[test]
fn ipv4_fragmentation_needed_reaches_the_job_with_its_own_tuple_and_the_mtu_unchanged() {
    let mut f = Fixture::new();
    let out = f.egress(JOB_A, &syn(SANDBOX, 40000, SERVER, &[0x5a; 1400]));
    let mtu = [0, 0, 0x05, 0x00]; // next-hop MTU 1280
    let err = icmp_error(ROUTER, 3, 4, mtu, &out);
    assert_eq!(err.len(), 576, "the quote is cut");
    let back = f.translated_for(JOB_A, &err);
    assert_translated(&back, ROUTER, SANDBOX, 40000, SERVER, (3, 4, mtu));
    // A whole quote keeps the quoted TCP checksum valid.
    let out = f.egress(JOB_A, &syn(SANDBOX, 40001, SERVER, &[0x5a; 100]));
    let back = f.translated_for(JOB_A, &icmp_error(ROUTER, 3, 4, mtu, &out));
    assert_translated(&back, ROUTER, SANDBOX, 40001, SERVER, (3, 4, mtu));
}

#[test]
fn ipv6_packet_too_big_reaches_the_job_with_its_own_tuple_and_the_mtu_unchanged() {
    let mut f = Fixture::new();
    let out = f.egress(JOB_A, &syn(SANDBOX6, 40000, SERVER6, &[0x5a; 1400]));
    // The quote is cut to fit 1280 bytes: the quoted TCP checksum field is still in it.
    let mtu = 1300u32.to_be_bytes();
    let err = icmp_error(ROUTER6, 2, 0, mtu, &out);
    assert_eq!(err.len(), 1280);
    let (v, buf) = f.receive(&err);
    let Verdict::ToNode { range, .. } = v else {
        panic!("expected ToNode, got {v:?}")
    };
    let g = parse_payload(&buf[range.clone()]).unwrap();
    let back = &buf[range.start + g.inner_offset..range.end];
    let p = IpPacket::parse(back).unwrap();
    assert_eq!((p.src(), p.dst()), (ip(ROUTER6), ip(SANDBOX6)));
    let Ok(Transport::Icmpv6(m)) = p.transport() else {
        panic!("not ICMPv6")
    };
    assert_eq!((m.msg_type(), m.code()), (2, 0));
    assert_eq!(m.as_bytes()[4..8], mtu);
    assert!(m.checksum_ok(p.src(), p.dst()), "ICMPv6 checksum");
    let t = snas_wire::quoted_flow_tuple(back).unwrap();
    assert_eq!((t.src, t.src_port), (ip(SANDBOX6), 40000));
    assert_eq!((t.dst, t.dst_port), (ip(SERVER6), 443));
    // A whole quote (short packet) keeps the quoted TCP checksum valid too.
    let out = f.egress(JOB_A, &syn(SANDBOX6, 40001, SERVER6, &[]));
    let back = f.translated_for(JOB_A, &icmp_error(ROUTER6, 2, 0, mtu, &out));
    assert_translated(&back, ROUTER6, SANDBOX6, 40001, SERVER6, (2, 0, mtu));
}

#[test]
fn port_unreachable_for_a_udp_flow_reaches_the_job_over_ipv4_and_ipv6() {
    let mut f = Fixture::new();
    for (job, server) in [(SANDBOX, SERVER), (SANDBOX6, SERVER6)] {
        for sport in 50000..50050u16 {
            let out = f.egress(JOB_A, &datagram(job, sport, server));
            // Sent by the server itself: ICMP port unreachable / ICMPv6 code 4.
            let (ty, code) = if ip(job).is_ipv6() { (1, 4) } else { (3, 3) };
            let back = f.translated_for(JOB_A, &icmp_error(server, ty, code, [0; 4], &out));
            assert_translated(&back, server, job, sport, server, (ty, code, [0; 4]));
        }
    }
}

#[test]
fn time_exceeded_for_a_tcp_flow_is_translated() {
    let mut f = Fixture::new();
    let out = f.egress(JOB_A, &syn(SANDBOX, 40000, SERVER, &[]));
    let back = f.translated_for(JOB_A, &icmp_error(ROUTER, 11, 0, [0; 4], &out));
    assert_translated(&back, ROUTER, SANDBOX, 40000, SERVER, (11, 0, [0; 4]));
}

#[test]
fn errors_quoting_no_live_flow_are_dropped_as_no_conntrack() {
    let mut f = Fixture::new();
    let out = f.egress(JOB_A, &syn(SANDBOX, 40000, SERVER, &[]));
    let egress_port = IpPacket::parse(&out)
        .unwrap()
        .flow_tuple()
        .unwrap()
        .src_port;
    let mut forged = 0;
    // Every other egress port, a wrong remote port, a wrong remote address: no flow.
    for port in (1024..=65535u16).filter(|p| *p != egress_port).step_by(7) {
        let other = quoted_syn(port, SERVER);
        let (v, _) = f.receive(&icmp_error(ROUTER, 3, 4, [0, 0, 5, 0], &other));
        assert_eq!(v, Verdict::Drop(Reason::NoConntrack), "port {port}");
        forged += 1;
    }
    let wrong_remote = quoted_syn(egress_port, "203.0.113.11");
    let (v, _) = f.receive(&icmp_error(ROUTER, 3, 4, [0, 0, 5, 0], &wrong_remote));
    assert_eq!(v, Verdict::Drop(Reason::NoConntrack));
    // The real flow's quote, but the error is addressed elsewhere than the quoted source.
    let mut misaddressed = icmp_error(ROUTER, 3, 4, [0, 0, 5, 0], &out);
    misaddressed[16..20].copy_from_slice(&[198, 51, 100, 2]);
    let c = checksum::update_u16(
        u16::from_be_bytes([misaddressed[10], misaddressed[11]]),
        0x6401,
        0x6402,
    );
    misaddressed[10..12].copy_from_slice(&c.to_be_bytes());
    let (v, _) = f.receive(&misaddressed);
    assert_eq!(v, Verdict::Drop(Reason::NoConntrack));
    assert_eq!(f.dropped(Reason::NoConntrack), forged + 2);
    // The genuine error still passes.
    let back = f.translated_for(JOB_A, &icmp_error(ROUTER, 3, 4, [0, 0, 5, 0], &out));
    assert_translated(&back, ROUTER, SANDBOX, 40000, SERVER, (3, 4, [0, 0, 5, 0]));
}

#[test]
fn errors_of_an_ended_flow_are_dropped_as_no_conntrack() {
    let mut f = Fixture::new();
    let out = f.egress(JOB_A, &syn(SANDBOX, 40000, SERVER, &[]));
    let now = f.now();
    f.tier2.remove_job(
        option(JOB_A).job_key,
        snas_proxy::tier2::FlowEnd::JobEnded,
        now,
    );
    let (v, _) = f.receive(&icmp_error(ROUTER, 3, 4, [0, 0, 5, 0], &out));
    assert_eq!(v, Verdict::Drop(Reason::NoConntrack));
}

#[test]
fn non_error_icmp_from_the_internet_is_not_translated() {
    let mut f = Fixture::new();
    let out = f.egress(JOB_A, &syn(SANDBOX, 40000, SERVER, &[]));
    // A redirect (type 5) quoting a live flow: NATs do not forward it.
    let (v, _) = f.receive(&icmp_error(ROUTER, 5, 1, [203, 0, 113, 1], &out));
    assert!(matches!(v, Verdict::Drop(_)), "{v:?}");
    // A truncated quote (IP header only, no ports).
    let mut cut = icmp_error(ROUTER, 3, 4, [0, 0, 5, 0], &out);
    cut.truncate(20 + 8 + 20 + 4);
    cut[2..4].copy_from_slice(&52u16.to_be_bytes());
    let (v, _) = f.receive(&cut);
    assert!(matches!(v, Verdict::Drop(_)), "{v:?}");
}

#[test]
fn an_error_flood_is_limited_per_job_and_the_rest_is_counted() {
    let mut f = Fixture::new();
    let out = f.egress(JOB_A, &datagram(SANDBOX, 50000, SERVER));
    let other = f.egress(JOB_B, &datagram(SANDBOX, 50000, SERVER));
    let err = icmp_error(SERVER, 3, 3, [0; 4], &out);
    let mut passed = 0u64;
    for _ in 0..10_000 {
        match f.receive(&err).0 {
            Verdict::ToNode { .. } => passed += 1,
            Verdict::Drop(Reason::PacingHorizon) => {}
            v => panic!("{v:?}"),
        }
    }
    assert_eq!(passed, ICMP_ERRORS_PER_SEC);
    assert_eq!(
        f.dropped(Reason::PacingHorizon),
        10_000 - ICMP_ERRORS_PER_SEC
    );
    // Another job's errors are not affected by the first job's flood.
    f.translated_for(JOB_B, &icmp_error(SERVER, 3, 3, [0; 4], &other));
    // A second later the job's budget is back.
    f.mono = f.mono.saturating_add(Duration::from_secs(1));
    let mut passed = 0u64;
    for _ in 0..1_000 {
        if let Verdict::ToNode { .. } = f.receive(&err).0 {
            passed += 1;
        }
    }
    assert_eq!(passed, ICMP_ERRORS_PER_SEC);
}

#[test]
fn a_reported_path_mtu_makes_later_packets_to_that_destination_leave_in_segments_that_fit() {
    let mut f = Fixture::new();
    for (job, server, router, err_type, reported, held) in [
        (SANDBOX, SERVER, ROUTER, 3u8, 1280u16, 1280u16),
        // Below IPv6's minimum link MTU: the job hears what the router said, the proxy keeps
        // 1280 (RFC 8201).
        (SANDBOX6, SERVER6, ROUTER6, 2, 1000, 1280),
    ] {
        let (out, before) = f.egress_within(JOB_A, &syn(job, 40000, server, &[0x5a; 1400]));
        assert_eq!(before, None, "nothing reported yet");
        let rest = if err_type == 3 {
            [0, 0, (reported >> 8) as u8, reported as u8]
        } else {
            u32::from(reported).to_be_bytes()
        };
        let code = if err_type == 3 { 4 } else { 0 };
        let back = f.translated_for(JOB_A, &icmp_error(router, err_type, code, rest, &out));
        assert_translated(&back, router, job, 40000, server, (err_type, code, rest));
        // The flow's retransmission, a new flow and another job's flow to the destination are
        // all segmented for the path.
        for (jti, sport) in [(JOB_A, 40000), (JOB_A, 40001), (JOB_B, 40002)] {
            let (_, mtu) = f.egress_within(jti, &syn(job, sport, server, &[0x5a; 100]));
            assert_eq!(mtu, Some(held), "{jti} {sport} to {server}");
        }
    }
    // Another destination is not affected.
    let (_, mtu) = f.egress_within(JOB_A, &syn(SANDBOX, 40003, "203.0.113.11", &[]));
    assert_eq!(mtu, None);
}

#[test]
fn only_fragmentation_needed_for_a_live_flow_teaches_a_path_mtu() {
    let mut f = Fixture::new();
    let out = f.egress(JOB_A, &syn(SANDBOX, 40000, SERVER, &[]));
    // Other errors for the live flow teach nothing.
    f.translated_for(JOB_A, &icmp_error(ROUTER, 11, 0, [0, 0, 5, 0], &out));
    f.translated_for(JOB_A, &icmp_error(ROUTER, 3, 1, [0, 0, 5, 0], &out));
    let (_, mtu) = f.egress_within(JOB_A, &syn(SANDBOX, 40001, SERVER, &[]));
    assert_eq!(mtu, None);
    // "Fragmentation needed" quoting a flow nobody has to another address is dropped and
    // teaches nothing: a stranger cannot shrink the segments to a destination.
    let egress_port = IpPacket::parse(&out)
        .unwrap()
        .flow_tuple()
        .unwrap()
        .src_port;
    let forged = quoted_syn(egress_port, "203.0.113.12");
    let (v, _) = f.receive(&icmp_error(ROUTER, 3, 4, [0, 0, 2, 0x28], &forged));
    assert_eq!(v, Verdict::Drop(Reason::NoConntrack));
    let (_, mtu) = f.egress_within(JOB_A, &syn(SANDBOX, 40002, "203.0.113.12", &[]));
    assert_eq!(mtu, None);
}
