//! Names on the wire at tier 2: the first payload of a flow a host rule allowed is held until
//! its TLS SNI / HTTP Host / QUIC SNI classifies; a match releases it unchanged and in order, a
//! mismatch resets the flow both ways and audits it. Pure: a manual clock, no sockets.
#![allow(clippy::unwrap_used)]

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::ops::{Deref, DerefMut};
use std::time::Duration;

use snas_proxy::hold::HeldPacket;
use snas_proxy::names::quic::build::{client_initial, crypto_frame};
use snas_proxy::names::quic::V1;
use snas_proxy::names::tls::build::{client_hello_message, records};
use snas_proxy::tier2::{
    AuditEvent, FlowEnd, NameMismatchRecord, Tier2Config, Verdict, GENEVE_HEADER_LEN,
};
use snas_wire::build::{tcp, udp, TcpSpec, UdpSpec};
use snas_wire::geneve::SnasOption;
use snas_wire::{IpPacket, Reason, TcpFlags, Transport};

mod engine;
use engine::{Engine, EGRESS, NODE, PROXY, SANDBOX};

/// api.example.com (allowed, bound).
const API: IpAddr = IpAddr::V4(Ipv4Addr::new(203, 0, 113, 10));
/// www.example.com (allowed, bound to this other address).
const WWW: IpAddr = IpAddr::V4(Ipv4Addr::new(203, 0, 113, 20));
/// raw.example.com (allowed with names = "off").
const RAW: IpAddr = IpAddr::V4(Ipv4Addr::new(203, 0, 113, 30));
/// strict.example.com (allowed with require_name = true).
const STRICT: IpAddr = IpAddr::V4(Ipv4Addr::new(203, 0, 113, 40));
/// Inside the cidr rule.
const DB: IpAddr = IpAddr::V4(Ipv4Addr::new(198, 51, 100, 200));
const ISN: u32 = 1000;
const JTI: &str = "jti-names-0000001";

const POLICY: &str = r#"
tenant = "acme"
job = "names"
[[egress]]
host = "api.example.com:0"
protocol = "any"
[[egress]]
host = "www.example.com"
[[egress]]
host = "raw.example.com:443"
names = "off"
[[egress]]
host = "strict.example.com:443"
require_name = true
[[egress]]
cidr = "198.51.100.128/25"
ports = "443"
[limits]
# Above 1 Gbit/s: jobs limited at or below it are never offloaded (offload::MIN_FAST_RATE_BPS).
egress_bps = "2Gbit"
ingress_bps = "2Gbit"
max_connections = 5000
max_ports_per_destination = 4000
new_connections_per_sec = 100000
new_connections_burst = 100000
"#;

/// The job of [`POLICY`] (tenant acme) whose DNS bound the four names, on an engine from
/// `tests/engine`.
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

impl Fixture {
    fn new() -> Fixture {
        Fixture::with(Tier2Config::new(PROXY, vec![NODE], vec![EGRESS]))
    }

    fn with(cfg: Tier2Config) -> Fixture {
        let mut e = Engine::new(cfg);
        e.hold_policy(POLICY, JTI, 1);
        let job = snas_policy::identity::job_key(JTI);
        let exp = e.mono.saturating_add(Duration::from_secs(3600));
        for (ip, name) in [
            (API, "api.example.com"),
            (WWW, "www.example.com"),
            (RAW, "raw.example.com"),
            (STRICT, "strict.example.com"),
        ] {
            e.tier2.bindings_mut().bind(job, ip, name, exp);
        }
        Fixture(e)
    }

    fn option(&self) -> SnasOption {
        engine::option(JTI, 1)
    }

    /// Sends `inner` from the job; returns the verdict, the (NATed) payload and the refusal.
    fn send(&mut self, inner: &[u8]) -> (Verdict, Vec<u8>, Vec<u8>) {
        let opt = self.option();
        let r = self.packet_from_node(NODE, &opt, inner);
        (r.verdict, r.payload, r.refusal)
    }

    /// Runs every released packet through the engine again, as the daemon does; returns the
    /// inner packets that went to the internet, in order, and the other verdicts.
    fn release(&mut self) -> (Vec<Vec<u8>>, Vec<Verdict>) {
        let mut out = Vec::new();
        let mut other = Vec::new();
        let e = &mut self.0;
        while e.tier2.has_released() {
            let mut held: Vec<HeldPacket> = Vec::new();
            e.tier2.take_released(&mut held, 64);
            for mut h in held {
                let mut refusal = vec![0u8; 2048];
                let now = e.now();
                match e
                    .tier2
                    .from_node_released(&e.policies, &mut h, &mut refusal, now)
                {
                    Verdict::ToInternet { range, .. } => out.push(h.payload[range].to_vec()),
                    v => other.push(v),
                }
            }
        }
        (out, other)
    }

    fn mismatches(&mut self) -> Vec<NameMismatchRecord> {
        self.tier2
            .drain_audit()
            .filter_map(|e| match e {
                AuditEvent::NameMismatch(r) => Some(r),
                _ => None,
            })
            .collect()
    }

    /// Opens a TCP flow to `dst:port` (SYN out, pure ACK out); both must pass.
    fn open(&mut self, sport: u16, dst: IpAddr, port: u16) {
        let (v, _, _) = self.send(&seg(sport, dst, port, ISN, 0, TcpFlags::SYN, &[]));
        assert!(matches!(v, Verdict::ToInternet { .. }), "SYN: {v:?}");
        let ack = TcpFlags::ACK;
        let (v, _, _) = self.send(&seg(sport, dst, port, ISN + 1, 5001, ack, &[]));
        assert!(matches!(v, Verdict::ToInternet { .. }), "ACK: {v:?}");
    }

    fn drops(&self, r: Reason) -> u64 {
        self.tier2.drops()[r as usize]
    }

    /// A segment from the internet to the flow's SNAT port.
    fn receive(&mut self, inner: &[u8]) -> Verdict {
        self.packet_from_internet(inner).0
    }
}

fn seg(
    sport: u16,
    dst: IpAddr,
    port: u16,
    seq: u32,
    ack: u32,
    flags: TcpFlags,
    data: &[u8],
) -> Vec<u8> {
    tcp(&TcpSpec {
        src: SocketAddr::new(SANDBOX, sport),
        dst: SocketAddr::new(dst, port),
        seq,
        ack,
        flags,
        window: 65535,
        payload: data,
    })
    .unwrap()
}

/// `data` as segments of at most `mss` bytes from the first payload byte on.
fn segments(sport: u16, dst: IpAddr, port: u16, data: &[u8], mss: usize) -> Vec<Vec<u8>> {
    let mut seq = ISN + 1;
    data.chunks(mss)
        .map(|c| {
            let s = seg(
                sport,
                dst,
                port,
                seq,
                5001,
                TcpFlags::ACK | TcpFlags::PSH,
                c,
            );
            seq += c.len() as u32;
            s
        })
        .collect()
}

fn tls(sni: &str, pad: usize) -> Vec<u8> {
    records(&client_hello_message(Some(sni), pad), 16384)
}

/// The TCP payloads (and sequence numbers) of packets that went to the internet.
fn tcp_payloads(pkts: &[Vec<u8>]) -> Vec<(u32, Vec<u8>)> {
    pkts.iter()
        .map(|p| {
            let ip = IpPacket::parse(&p[..]).unwrap();
            assert_eq!(ip.src(), EGRESS, "released packets leave through the NAT");
            let Ok(Transport::Tcp(t)) = ip.transport() else {
                panic!("not tcp")
            };
            assert!(t.checksum_ok(ip.src(), ip.dst()));
            (t.seq(), t.payload().to_vec())
        })
        .collect()
}

fn is_held(v: &Verdict) -> bool {
    matches!(v, Verdict::Held { fetch: false, .. })
}

#[test]
fn an_allowed_sni_spanning_two_segments_is_released_unchanged_and_in_order() {
    let mut f = Fixture::new();
    f.open(40000, API, 443);
    let hello = tls("api.example.com", 1500);
    assert!(hello.len() > 1500);
    let segs = segments(40000, API, 443, &hello, 1400);
    assert_eq!(segs.len(), 2);
    let (v, _, _) = f.send(&segs[0]);
    assert!(is_held(&v), "{v:?}");
    assert!(!f.tier2.has_released());
    let (v, _, _) = f.send(&segs[1]);
    assert!(is_held(&v), "{v:?}");
    let (out, other) = f.release();
    assert!(other.is_empty(), "{other:?}");
    let got = tcp_payloads(&out);
    assert_eq!(got.len(), 2);
    assert_eq!(got[0].0, ISN + 1);
    let joined: Vec<u8> = got.iter().flat_map(|(_, p)| p.clone()).collect();
    assert_eq!(joined, hello, "the held bytes leave exactly as sent");
    assert!(f.mismatches().is_empty());
    assert_eq!(f.tier2.name_held_bytes(), 0);
}

#[test]
fn segments_out_of_order_are_released_in_sequence_order() {
    let mut f = Fixture::new();
    f.open(40001, API, 443);
    let hello = tls("api.example.com", 2500);
    let segs = segments(40001, API, 443, &hello, 1000);
    assert_eq!(segs.len(), 3);
    for i in [2, 0, 1] {
        let (v, _, _) = f.send(&segs[i]);
        assert!(is_held(&v), "segment {i}: {v:?}");
    }
    let (out, _) = f.release();
    let seqs: Vec<u32> = tcp_payloads(&out).iter().map(|(s, _)| *s).collect();
    assert_eq!(seqs, vec![ISN + 1, ISN + 1001, ISN + 2001]);
}

#[test]
fn a_retransmitted_first_segment_is_absorbed_not_sent_twice() {
    let mut f = Fixture::new();
    f.open(40002, API, 443);
    let hello = tls("api.example.com", 1500);
    let segs = segments(40002, API, 443, &hello, 1400);
    for s in [&segs[0], &segs[0], &segs[0], &segs[1]] {
        let (v, _, _) = f.send(s);
        assert!(is_held(&v), "{v:?}");
    }
    let (out, _) = f.release();
    assert_eq!(out.len(), 2);
}

#[test]
fn after_the_check_the_flow_is_never_inspected_again_even_a_second_keep_alive_request() {
    let mut f = Fixture::new();
    f.open(40003, API, 80);
    let first = b"GET / HTTP/1.1\r\nHost: api.example.com\r\n\r\n";
    let (v, _, _) = f.send(&segments(40003, API, 80, first, 1400)[0]);
    assert!(is_held(&v));
    assert!(f.tier2.has_released());
    let (out, _) = f.release();
    assert_eq!(out.len(), 1);
    let second = b"GET / HTTP/1.1\r\nHost: blocked.example.com\r\n\r\n";
    let seq = ISN + 1 + first.len() as u32;
    let (v, _, _) = f.send(&seg(40003, API, 80, seq, 5001, TcpFlags::ACK, second));
    assert!(
        matches!(v, Verdict::ToInternet { .. }),
        "documented limit: later requests are not checked; got {v:?}"
    );
}

#[test]
fn a_host_header_naming_another_site_on_an_allowed_address_is_reset_both_ways_and_audited() {
    let mut f = Fixture::new();
    f.open(40004, API, 80);
    let req = b"GET / HTTP/1.1\r\nHost: blocked.example.com\r\n\r\n";
    let (v, _, refusal) = f.send(&segments(40004, API, 80, req, 1400)[0]);
    let Verdict::Refuse {
        reason, reply_len, ..
    } = v
    else {
        panic!("expected a refusal, got {v:?}")
    };
    assert_eq!(reason, Reason::HostMismatch);
    // The RST to the job, behind the GENEVE header.
    let rst = IpPacket::parse(&refusal[GENEVE_HEADER_LEN..reply_len]).unwrap();
    let Ok(Transport::Tcp(t)) = rst.transport() else {
        panic!("not tcp")
    };
    assert!(t.flags().contains(TcpFlags::RST));
    assert_eq!((rst.dst(), t.dst_port()), (SANDBOX, 40004));
    // The RST to the server, from the flow's egress tuple, at the first payload byte.
    let (out, _) = f.release();
    assert_eq!(out.len(), 1);
    let ip = IpPacket::parse(&out[0][..]).unwrap();
    let Ok(Transport::Tcp(t)) = ip.transport() else {
        panic!("not tcp")
    };
    assert_eq!((ip.src(), ip.dst(), t.dst_port()), (EGRESS, API, 80));
    assert!(t.flags().contains(TcpFlags::RST));
    assert_eq!(t.seq(), ISN + 1);
    assert!(
        t.payload().is_empty(),
        "nothing of the request reaches the server"
    );
    let m = f.mismatches();
    assert_eq!(m.len(), 1);
    assert_eq!(m[0].reason, Reason::HostMismatch);
    assert_eq!(&*m[0].wire_name, "blocked.example.com");
    assert_eq!(
        m[0].bound.iter().map(|b| &**b).collect::<Vec<_>>(),
        ["api.example.com"]
    );
    assert_eq!(m[0].rule, Some(0));
    assert_eq!(f.drops(Reason::HostMismatch), 1);
    // The job's stack retransmits: refused again, never forwarded.
    let (v, _, _) = f.send(&segments(40004, API, 80, req, 1400)[0]);
    assert!(
        matches!(
            v,
            Verdict::Refuse {
                reason: Reason::HostMismatch,
                ..
            }
        ),
        "{v:?}"
    );
}

#[test]
fn an_sni_for_a_name_outside_the_policy_is_reset_and_audited_with_both_names() {
    let mut f = Fixture::new();
    f.open(40005, API, 443);
    let (v, _, _) = f.send(&segments(40005, API, 443, &tls("evil.example.net", 0), 1400)[0]);
    assert!(
        matches!(
            v,
            Verdict::Refuse {
                reason: Reason::SniMismatch,
                ..
            }
        ),
        "{v:?}"
    );
    let m = f.mismatches();
    assert_eq!(&*m[0].wire_name, "evil.example.net");
    assert_eq!(&*m[0].bound[0], "api.example.com");
    assert_eq!(f.drops(Reason::SniMismatch), 1);
    let per_tenant: u64 = f
        .tier2
        .drop_tally()
        .series()
        .filter(|(t, _)| {
            *t == snas_proxy::drops::DropTenant::Tenant(snas_policy::identity::tenant_id("acme"))
        })
        .map(|(_, c)| c[Reason::SniMismatch as usize])
        .sum();
    assert_eq!(per_tenant, 1, "counted under the job's tenant");
}

#[test]
fn an_allowed_name_bound_to_another_address_is_fronting_and_is_reset() {
    let mut f = Fixture::new();
    f.open(40006, API, 443);
    let (v, _, _) = f.send(&segments(40006, API, 443, &tls("www.example.com", 0), 1400)[0]);
    assert!(
        matches!(
            v,
            Verdict::Refuse {
                reason: Reason::SniMismatch,
                ..
            }
        ),
        "{v:?}"
    );
    assert_eq!(f.release().0.len(), 1, "the RST to the server");
    // The same name to its own address passes.
    f.open(40007, WWW, 443);
    let (v, _, _) = f.send(&segments(40007, WWW, 443, &tls("WWW.Example.com.", 0), 1400)[0]);
    assert!(is_held(&v), "{v:?}");
    assert_eq!(f.release().0.len(), 1);
}

#[test]
fn a_hello_without_sni_or_a_request_without_host_is_a_mismatch() {
    let mut f = Fixture::new();
    f.open(40008, API, 443);
    let no_sni = records(&client_hello_message(None, 0), 16384);
    let (v, _, _) = f.send(&segments(40008, API, 443, &no_sni, 1400)[0]);
    assert!(
        matches!(
            v,
            Verdict::Refuse {
                reason: Reason::SniMismatch,
                ..
            }
        ),
        "{v:?}"
    );
    f.open(40009, API, 80);
    let (v, _, _) = f.send(&segments(40009, API, 80, b"GET / HTTP/1.0\r\n\r\n", 1400)[0]);
    assert!(
        matches!(
            v,
            Verdict::Refuse {
                reason: Reason::HostMismatch,
                ..
            }
        ),
        "{v:?}"
    );
}

#[test]
fn other_protocols_pass_unless_the_rule_requires_a_name() {
    let mut f = Fixture::new();
    f.open(40010, API, 443);
    let ssh = b"SSH-2.0-OpenSSH_9.6\r\n";
    let (v, _, _) = f.send(&segments(40010, API, 443, ssh, 1400)[0]);
    assert!(is_held(&v), "{v:?}");
    assert_eq!(f.release().0.len(), 1);
    assert_eq!(f.tier2.name_stats().other, 1);
    f.open(40011, STRICT, 443);
    let (v, _, _) = f.send(&segments(40011, STRICT, 443, ssh, 1400)[0]);
    assert!(
        matches!(
            v,
            Verdict::Refuse {
                reason: Reason::HostMismatch,
                ..
            }
        ),
        "{v:?}"
    );
    // Allowed TLS to the strict rule passes.
    f.open(40012, STRICT, 443);
    let (v, _, _) = f.send(&segments(40012, STRICT, 443, &tls("strict.example.com", 0), 1400)[0]);
    assert!(is_held(&v), "{v:?}");
}

#[test]
fn names_off_and_cidr_rules_are_not_inspected() {
    let mut f = Fixture::new();
    f.open(40013, RAW, 443);
    let (v, _, _) = f.send(&segments(40013, RAW, 443, &tls("evil.example.net", 0), 1400)[0]);
    assert!(matches!(v, Verdict::ToInternet { .. }), "{v:?}");
    f.open(40014, DB, 443);
    let (v, _, _) = f.send(&segments(40014, DB, 443, &tls("evil.example.net", 0), 1400)[0]);
    assert!(matches!(v, Verdict::ToInternet { .. }), "{v:?}");
    assert!(f.tier2.name_stats().inspected == 0);
}

#[test]
fn a_first_payload_unfinished_when_the_wait_ends_is_a_mismatch_and_the_next_packet_is_reset() {
    let mut f = Fixture::new();
    f.open(40015, API, 80);
    let part = b"GET / HTTP/1.1\r\nHost: api.exa";
    let (v, _, _) = f.send(&segments(40015, API, 80, part, 1400)[0]);
    assert!(is_held(&v));
    f.tick(Duration::from_millis(1500));
    assert!(
        f.tier2.name_check_pending(first_flow(&f)),
        "still within the wait"
    );
    f.tick(Duration::from_millis(600));
    assert_eq!(f.tier2.name_stats().timed_out, 1);
    let m = f.mismatches();
    assert_eq!(m.len(), 1);
    assert_eq!(m[0].reason, Reason::HostMismatch);
    // The RST to the server was queued; the job's next segment is answered with a RST.
    let (out, _) = f.release();
    assert_eq!(out.len(), 1);
    let rest = seg(
        40015,
        API,
        80,
        ISN + 1 + part.len() as u32,
        5001,
        TcpFlags::ACK,
        b"mple.com\r\n\r\n",
    );
    let (v, _, _) = f.send(&rest);
    assert!(
        matches!(
            v,
            Verdict::Refuse {
                reason: Reason::HostMismatch,
                ..
            }
        ),
        "{v:?}"
    );
}

fn first_flow(f: &Fixture) -> snas_proxy::conntrack::FlowId {
    f.tier2.conntrack().iter().next().unwrap().0
}

#[test]
fn a_hello_longer_than_the_inspection_limit_is_a_mismatch() {
    let mut f = Fixture::new();
    f.open(40016, API, 443);
    let hello = tls("api.example.com", 6000);
    let segs = segments(40016, API, 443, &hello, 1400);
    let mut last = None;
    for s in &segs {
        let (v, _, _) = f.send(s);
        if !is_held(&v) {
            last = Some(v);
            break;
        }
    }
    assert!(
        matches!(
            last,
            Some(Verdict::Refuse {
                reason: Reason::SniMismatch,
                ..
            })
        ),
        "{last:?}"
    );
}

#[test]
fn the_offload_predicate_sees_a_pending_check_until_the_released_packets_are_through() {
    let mut f = Fixture::new();
    f.open(40017, API, 443);
    let id = first_flow(&f);
    assert!(f.tier2.name_check_pending(id), "pending from the SYN on");
    let (v, _, _) = f.send(&segments(40017, API, 443, &tls("api.example.com", 0), 1400)[0]);
    assert!(is_held(&v));
    assert!(
        f.tier2.name_check_pending(id),
        "released packets not through yet"
    );
    f.release();
    assert!(!f.tier2.name_check_pending(id));
}

#[test]
fn a_job_holding_too_much_gets_hold_queue_full_and_nothing_leaks() {
    let mut cfg = Tier2Config::new(PROXY, vec![NODE], vec![EGRESS]);
    cfg.names.job_bytes = 4 * 1500;
    let mut f = Fixture::with(cfg);
    let hello = tls("api.example.com", 1800);
    let mut full = 0;
    for i in 0..10u16 {
        f.open(41000 + i, API, 443);
        let (v, _, _) = f.send(&segments(41000 + i, API, 443, &hello, 1400)[0]);
        if v == Verdict::Drop(Reason::HoldQueueFull) {
            full += 1;
        }
    }
    assert!(full >= 5, "{full}");
    assert!(f.tier2.name_held_bytes() <= 4 * 1500);
    // Flows that end give their bytes back.
    f.tick(Duration::from_secs(2));
    f.release();
    f.tick(Duration::from_secs(24 * 3600));
    assert_eq!(f.tier2.name_held_bytes(), 0);
}

#[test]
fn thousands_of_checked_connections_all_pass_and_nothing_stays_held() {
    let mut f = Fixture::new();
    let hello = tls("api.example.com", 1500);
    for i in 0..2000u16 {
        let sport = 20000 + i;
        f.mono = f.mono.saturating_add(Duration::from_millis(1));
        f.open(sport, API, 443);
        for s in segments(sport, API, 443, &hello, 1400) {
            let (v, _, _) = f.send(&s);
            assert!(is_held(&v), "{v:?}");
        }
        let (out, other) = f.release();
        assert_eq!((out.len(), other.len()), (2, 0), "flow {i}: {other:?}");
    }
    assert_eq!(f.tier2.name_stats().passed, 2000);
    assert_eq!(f.tier2.name_held_bytes(), 0);
}

fn quic(sport: u16, dst: IpAddr, datagram: &[u8]) -> Vec<u8> {
    udp(&UdpSpec {
        src: SocketAddr::new(SANDBOX, sport),
        dst: SocketAddr::new(dst, 443),
        payload: datagram,
    })
    .unwrap()
}

#[test]
fn quic_initials_with_an_allowed_sni_are_released_and_a_mismatch_is_dropped_and_audited() {
    let mut f = Fixture::new();
    let hello = client_hello_message(Some("api.example.com"), 1500);
    let (a, b) = hello.split_at(1000);
    let p1 = client_initial(V1, &[1; 8], 0, &crypto_frame(0, a), 1200);
    let p2 = client_initial(V1, &[1; 8], 1, &crypto_frame(1000, b), 1200);
    let (v, _, _) = f.send(&quic(50000, API, &p1));
    assert!(is_held(&v), "{v:?}");
    let (v, _, _) = f.send(&quic(50000, API, &p2));
    assert!(is_held(&v), "{v:?}");
    let (out, _) = f.release();
    assert_eq!(out.len(), 2);

    let evil = client_hello_message(Some("evil.example.net"), 0);
    let p = client_initial(V1, &[2; 8], 0, &crypto_frame(0, &evil), 1200);
    let (v, _, _) = f.send(&quic(50001, API, &p));
    assert_eq!(v, Verdict::Drop(Reason::SniMismatch));
    let m = f.mismatches();
    assert_eq!(&*m[0].wire_name, "evil.example.net");
    // Later datagrams of the flow are dropped too.
    let (v, _, _) = f.send(&quic(50001, API, b"\x40anything"));
    assert_eq!(v, Verdict::Drop(Reason::SniMismatch));
}

#[test]
fn udp_that_is_not_quic_passes_on_443_and_other_ports_are_not_inspected() {
    let mut f = Fixture::new();
    let (v, _, _) = f.send(&quic(50002, API, b"not quic at all"));
    assert!(is_held(&v), "{v:?}");
    assert_eq!(f.release().0.len(), 1);
    let dns = udp(&UdpSpec {
        src: SocketAddr::new(SANDBOX, 50003),
        dst: SocketAddr::new(API, 80),
        payload: b"x",
    })
    .unwrap();
    let (v, _, _) = f.send(&dns);
    assert!(matches!(v, Verdict::ToInternet { .. }), "{v:?}");
}

/// The egress port an outgoing packet (NATed) left from.
fn egress_port(inner: &[u8]) -> u16 {
    let ip = IpPacket::parse(inner).unwrap();
    let Ok(Transport::Tcp(t)) = ip.transport() else {
        panic!("not tcp")
    };
    t.src_port()
}

#[test]
fn a_new_connection_on_the_5_tuple_of_a_checked_and_closed_flow_is_checked_again() {
    // The sandbox chooses its source port: after a connection that passed the check closes,
    // a SYN on the same 5-tuple is a new connection, admitted
    // anew (fresh NAT port, `flow_end` `reused` for the old one) and name-checked again.
    let mut f = Fixture::new();
    let good = b"GET / HTTP/1.1\r\nHost: api.example.com\r\n\r\n";
    let bad = b"GET / HTTP/1.1\r\nHost: blocked.example.com\r\n\r\n";
    let after = ISN + 1 + good.len() as u32;
    // RST (closed) and the job's FIN (closing; the server's FIN would make it closed, the same
    // state as the RST: see the conntrack tests).
    let closes = [TcpFlags::RST, TcpFlags::FIN | TcpFlags::ACK];
    for (round, close) in closes.into_iter().enumerate() {
        let sport = 40200 + round as u16;
        f.open(sport, API, 80);
        let (v, _, _) = f.send(&segments(sport, API, 80, good, 1400)[0]);
        assert!(is_held(&v), "round {round}: {v:?}");
        let (out, _) = f.release();
        assert_eq!(out.len(), 1, "round {round}: the allowed request goes out");
        let first_port = egress_port(&out[0]);
        let (v, _, _) = f.send(&seg(sport, API, 80, after, 5001, close, &[]));
        assert!(matches!(v, Verdict::ToInternet { .. }), "close: {v:?}");
        f.tier2.drain_audit();
        // The same tuple again, at once, with another Host.
        let (v, syn_out, _) = f.send(&seg(sport, API, 80, ISN + 7, 0, TcpFlags::SYN, &[]));
        let Verdict::ToInternet { range, .. } = v else {
            panic!("round {round}: the new SYN is admitted: {v:?}")
        };
        assert_eq!(
            egress_port(&syn_out[range]),
            first_port,
            "a new connection on the same tuple takes its NAT port back out of quarantine"
        );
        let ack = seg(sport, API, 80, ISN + 8, 5001, TcpFlags::ACK, &[]);
        assert!(matches!(f.send(&ack).0, Verdict::ToInternet { .. }));
        let req = seg(sport, API, 80, ISN + 8, 5001, TcpFlags::ACK, bad);
        let (v, _, _) = f.send(&req);
        assert!(
            matches!(
                v,
                Verdict::Refuse {
                    reason: Reason::HostMismatch,
                    ..
                }
            ),
            "round {round}: the reused tuple's request must be checked: {v:?}"
        );
        let events: Vec<AuditEvent> = f.tier2.drain_audit().collect();
        let ended: Vec<u16> = events
            .iter()
            .filter_map(|e| match e {
                AuditEvent::FlowEnd(r) if r.end == FlowEnd::Reused => Some(r.egress.1),
                _ => None,
            })
            .collect();
        assert_eq!(ended, [first_port], "round {round}: the old flow's end");
        let m: Vec<&NameMismatchRecord> = events
            .iter()
            .filter_map(|e| match e {
                AuditEvent::NameMismatch(r) => Some(r),
                _ => None,
            })
            .collect();
        assert_eq!(m.len(), 1, "round {round}");
        assert_eq!(&*m[0].wire_name, "blocked.example.com");
        f.release();
    }
    assert_eq!(f.drops(Reason::HostMismatch), 2);
}

#[test]
fn a_retransmitted_syn_of_a_pending_check_is_the_same_connection() {
    let mut f = Fixture::new();
    f.open(40210, API, 80);
    let (v, _, _) = f.send(&seg(40210, API, 80, ISN, 0, TcpFlags::SYN, &[]));
    assert!(matches!(v, Verdict::ToInternet { .. }), "{v:?}");
    assert_eq!(f.tier2.conntrack().len(), 1, "no second flow");
    let good = b"GET / HTTP/1.1\r\nHost: api.example.com\r\n\r\n";
    let (v, _, _) = f.send(&segments(40210, API, 80, good, 1400)[0]);
    assert!(is_held(&v), "{v:?}");
    assert_eq!(f.release().0.len(), 1);
}

/// A plain-HTTP download under a checked host rule: the request is the flow's only client
/// payload and it was held; after its release the client sends nothing but ACKs. The flow must
/// still reach the fast path (a bulk download is what it is for), with or without the proxy's
/// packet threshold.
#[test]
fn a_download_whose_only_request_was_held_by_the_check_still_reaches_the_fast_path() {
    for threshold in [0, snas_proxy::offload::FAST_AFTER_PACKETS] {
        let mut f = Fixture::new();
        f.tier2.set_offload(true);
        f.tier2.set_offload_min_packets(threshold);
        let (v, syn, _) = f.send(&seg(40200, API, 80, ISN, 0, TcpFlags::SYN, &[]));
        let Verdict::ToInternet { range, .. } = v else {
            panic!("SYN: {v:?}")
        };
        let port = egress_port(&syn[range]);
        f.receive(
            &tcp(&TcpSpec {
                src: SocketAddr::new(API, 80),
                dst: SocketAddr::new(EGRESS, port),
                seq: 5000,
                ack: ISN + 1,
                flags: TcpFlags::SYN | TcpFlags::ACK,
                window: 65535,
                payload: &[],
            })
            .unwrap(),
        );
        f.send(&seg(40200, API, 80, ISN + 1, 5001, TcpFlags::ACK, &[]));
        let get = b"GET /big HTTP/1.1\r\nHost: api.example.com\r\n\r\n";
        let (v, _, _) = f.send(&segments(40200, API, 80, get, 1400)[0]);
        assert!(is_held(&v));
        let (out, _) = f.release();
        assert_eq!(out.len(), 1, "the request goes out");
        let ack = ISN + 1 + get.len() as u32;
        let chunk = vec![0x5a; 1400];
        let mut installed = 0;
        for i in 0..(threshold + 4) as u32 {
            let data = tcp(&TcpSpec {
                src: SocketAddr::new(API, 80),
                dst: SocketAddr::new(EGRESS, port),
                seq: 5001 + i * 1400,
                ack,
                flags: TcpFlags::ACK | TcpFlags::PSH,
                window: 65535,
                payload: &chunk,
            })
            .unwrap();
            f.receive(&data);
            let seg_ack = seg(
                40200,
                API,
                80,
                ack,
                5001 + (i + 1) * 1400,
                TcpFlags::ACK,
                &[],
            );
            let (v, _, _) = f.send(&seg_ack);
            assert!(matches!(v, Verdict::ToInternet { .. }), "{v:?}");
            installed += f
                .tier2
                .drain_offload_events()
                .filter(|e| matches!(e, snas_proxy::offload::OffloadEvent::Install(_)))
                .count();
        }
        assert_eq!(installed, 1, "threshold {threshold}: installed once");
    }
}

fn initial_with_sni(dcid: &[u8], sni: &str) -> Vec<u8> {
    let hello = client_hello_message(Some(sni), 0);
    client_initial(V1, dcid, 0, &crypto_frame(0, &hello), 1200)
}

fn sent(v: &Verdict) -> bool {
    matches!(v, Verdict::ToInternet { .. })
}

#[test]
fn a_second_quic_connection_on_a_reused_socket_with_another_sni_is_dropped_and_audited() {
    let mut f = Fixture::new();
    let (v, _, _) = f.send(&quic(
        50010,
        API,
        &initial_with_sni(&[1; 8], "api.example.com"),
    ));
    assert!(is_held(&v), "{v:?}");
    assert_eq!(f.release().0.len(), 1);
    // The first connection goes on: short-header packets and its own Initials again.
    let (v, _, _) = f.send(&quic(50010, API, b"\x40short header 1-RTT"));
    assert!(sent(&v), "{v:?}");
    let (v, _, _) = f.send(&quic(
        50010,
        API,
        &initial_with_sni(&[1; 8], "api.example.com"),
    ));
    assert!(
        sent(&v),
        "a retransmitted Initial of the checked connection: {v:?}"
    );
    // Same socket, new connection (new DCID), another name: checked, dropped, audited.
    let (v, _, _) = f.send(&quic(
        50010,
        API,
        &initial_with_sni(&[2; 8], "evil.example.net"),
    ));
    assert_eq!(v, Verdict::Drop(Reason::SniMismatch));
    let m = f.mismatches();
    assert_eq!(m.len(), 1);
    assert_eq!(&*m[0].wire_name, "evil.example.net");
    assert_eq!(m[0].reason, Reason::SniMismatch);
    // As for any mismatched flow, nothing more of the 5-tuple goes out.
    let (v, _, _) = f.send(&quic(50010, API, b"\x40short header 1-RTT"));
    assert_eq!(v, Verdict::Drop(Reason::SniMismatch));
    assert_eq!(f.tier2.name_held_bytes(), 0);
}

#[test]
fn a_quic_initial_after_a_first_datagram_that_was_not_quic_is_checked() {
    let mut f = Fixture::new();
    let (v, _, _) = f.send(&quic(50011, API, b"not quic at all"));
    assert!(is_held(&v), "{v:?}");
    assert_eq!(f.release().0.len(), 1);
    let (v, _, _) = f.send(&quic(
        50011,
        API,
        &initial_with_sni(&[5; 8], "evil.example.net"),
    ));
    assert_eq!(v, Verdict::Drop(Reason::SniMismatch));
    assert_eq!(&*f.mismatches()[0].wire_name, "evil.example.net");
}

#[test]
fn initials_that_do_not_open_under_their_own_dcid_belong_to_a_checked_connection_and_pass() {
    let mut f = Fixture::new();
    let (v, _, _) = f.send(&quic(
        50012,
        API,
        &initial_with_sni(&[1; 8], "api.example.com"),
    ));
    assert!(is_held(&v), "{v:?}");
    assert_eq!(f.release().0.len(), 1);
    // The client's later Initials go to the server's chosen CID under the first keys: here a
    // packet of the first connection with another DCID in its header. The server cannot take
    // it for a new connection (it derives the keys from that DCID too), so it passes, and
    // even with an evil name inside nothing is audited.
    for i in 0..100u8 {
        let mut p = initial_with_sni(&[1; 8], "evil.example.net");
        p[6..14].copy_from_slice(&[0xa0, i, 2, 3, 4, 5, 6, 7]);
        let (v, _, _) = f.send(&quic(50012, API, &p));
        assert!(sent(&v), "{i}: {v:?}");
    }
    assert!(f.mismatches().is_empty());
    assert_eq!(f.tier2.name_stats().inspected, 1);
}

#[test]
fn a_thousand_quic_connections_from_one_socket_are_each_checked_and_nothing_stays_held() {
    let mut f = Fixture::new();
    for i in 0..1000u32 {
        let mut dcid = [0u8; 8];
        dcid[..4].copy_from_slice(&i.to_be_bytes());
        let (v, _, _) = f.send(&quic(
            50013,
            API,
            &initial_with_sni(&dcid, "api.example.com"),
        ));
        assert!(is_held(&v), "connection {i}: {v:?}");
        assert_eq!(f.release().0.len(), 1, "connection {i}");
        let (v, _, _) = f.send(&quic(50013, API, b"\x40short header 1-RTT"));
        assert!(sent(&v), "connection {i}: {v:?}");
    }
    let s = f.tier2.name_stats();
    assert_eq!((s.inspected, s.passed, s.mismatched), (1000, 1000, 0));
    assert_eq!(f.tier2.name_held_bytes(), 0);
    // The 1001st, with another name, is still caught.
    let (v, _, _) = f.send(&quic(
        50013,
        API,
        &initial_with_sni(&[9; 8], "evil.example.net"),
    ));
    assert_eq!(v, Verdict::Drop(Reason::SniMismatch));
}
