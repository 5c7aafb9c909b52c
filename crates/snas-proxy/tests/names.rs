//! Names on the wire at tier 2: the first payload of a flow a host rule allowed is checked by
//! its TLS SNI / HTTP Host / QUIC SNI. Complete in the flow's first payload packet, it is decided
//! in place (a match goes on in the same call); otherwise it is held until it classifies and a
//! match releases it unchanged and in order. A mismatch resets the flow both ways and audits
//! it. Pure: a manual clock, no sockets.
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

fn sent(v: &Verdict) -> bool {
    matches!(v, Verdict::ToInternet { .. })
}

/// The inner packet a `ToInternet` verdict sends (panics on any other verdict).
fn sent_packet(v: &Verdict, payload: &[u8]) -> Vec<u8> {
    let Verdict::ToInternet { range, .. } = v else {
        panic!("expected ToInternet, got {v:?}")
    };
    payload[range.clone()].to_vec()
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
    let st = f.tier2.name_stats();
    assert_eq!((st.inspected, st.passed, st.held), (1, 1, 1));
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
    assert!(sent(&v), "decided in place: {v:?}");
    assert!(!f.tier2.has_released());
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
    assert_eq!(f.tier2.name_stats().held, 0, "decided in place");
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
    assert!(sent(&v), "{v:?}");
    assert!(!f.tier2.has_released());
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
    assert!(sent(&v), "{v:?}");
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
    assert!(sent(&v), "{v:?}");
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
    let segs = segments(40017, API, 443, &tls("api.example.com", 1500), 1400);
    for s in &segs {
        let (v, _, _) = f.send(s);
        assert!(is_held(&v), "{v:?}");
    }
    assert!(
        f.tier2.name_check_pending(id),
        "released packets not through yet"
    );
    f.release();
    assert!(!f.tier2.name_check_pending(id));
}

#[test]
fn the_offload_predicate_sees_no_check_once_a_first_payload_passed_in_place() {
    let mut f = Fixture::new();
    f.open(40018, API, 443);
    let id = first_flow(&f);
    assert!(f.tier2.name_check_pending(id), "pending from the SYN on");
    let (v, _, _) = f.send(&segments(40018, API, 443, &tls("api.example.com", 0), 1400)[0]);
    assert!(sent(&v), "{v:?}");
    assert!(!f.tier2.name_check_pending(id), "nothing is on its way");
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

// ---- Decided in place: the whole first payload in the flow's first payload packet. ----

/// The TCP payload and sequence number of an outgoing (NATed) packet, checked as it leaves.
fn tcp_out(pkt: &[u8]) -> (u32, Vec<u8>) {
    tcp_payloads(&[pkt.to_vec()]).remove(0)
}

#[test]
fn a_whole_client_hello_in_one_segment_goes_on_in_the_same_call_unchanged_and_nothing_is_held() {
    let mut f = Fixture::new();
    f.open(40300, API, 443);
    let hello = tls("api.example.com", 0);
    assert!(hello.len() < 1400);
    let (v, payload, _) = f.send(&segments(40300, API, 443, &hello, 1400)[0]);
    let (seq, data) = tcp_out(&sent_packet(&v, &payload));
    assert_eq!((seq, data), (ISN + 1, hello), "NATed, bytes unchanged");
    assert!(!f.tier2.has_released(), "no second pass");
    assert_eq!(f.tier2.name_held_bytes(), 0);
    let st = f.tier2.name_stats();
    assert_eq!(
        (st.inspected, st.passed, st.mismatched, st.held),
        (1, 1, 0, 0)
    );
    assert!(f.mismatches().is_empty());
}

#[test]
fn a_whole_request_head_with_its_body_in_one_segment_goes_on_in_the_same_call() {
    let mut f = Fixture::new();
    f.open(40301, API, 80);
    let req = b"POST /upload HTTP/1.1\r\nHost: api.example.com\r\nContent-Length: 5\r\n\r\nhello";
    let (v, payload, _) = f.send(&segments(40301, API, 80, req, 1400)[0]);
    assert_eq!(tcp_out(&sent_packet(&v, &payload)).1, req);
    assert!(!f.tier2.has_released());
    assert_eq!(f.tier2.name_stats().held, 0);
}

#[test]
fn a_retransmitted_first_segment_after_a_pass_in_place_goes_on_like_any_later_segment() {
    let mut f = Fixture::new();
    f.open(40302, API, 443);
    let first = segments(40302, API, 443, &tls("api.example.com", 0), 1400).remove(0);
    for i in 0..3 {
        let (v, payload, _) = f.send(&first);
        assert_eq!(tcp_out(&sent_packet(&v, &payload)).0, ISN + 1, "copy {i}");
    }
    let st = f.tier2.name_stats();
    assert_eq!(
        (st.inspected, st.passed, st.held),
        (1, 1, 0),
        "checked once"
    );
    assert!(f.mismatches().is_empty());
}

#[test]
fn a_retransmitted_first_segment_after_a_mismatch_in_place_is_refused_again() {
    let mut f = Fixture::new();
    f.open(40303, API, 443);
    let evil = segments(40303, API, 443, &tls("evil.example.net", 0), 1400).remove(0);
    for i in 0..3 {
        let (v, _, _) = f.send(&evil);
        assert!(
            matches!(
                v,
                Verdict::Refuse {
                    reason: Reason::SniMismatch,
                    ..
                }
            ),
            "copy {i}: {v:?}"
        );
    }
    assert_eq!(f.mismatches().len(), 1, "audited once");
    assert_eq!(
        f.drops(Reason::SniMismatch),
        3,
        "every refused packet counts"
    );
    assert_eq!(f.release().0.len(), 1, "one RST to the server");
}

/// The first two data segments of the job's connection from `sport` to API:80: `head` at the
/// stream's start, then `body` right after it.
fn head_then_body(sport: u16, head: &[u8], body: &[u8]) -> (Vec<u8>, Vec<u8>) {
    let body_seq = ISN + 1 + head.len() as u32;
    (
        seg(sport, API, 80, ISN + 1, 5001, engine::DATA, head),
        seg(sport, API, 80, body_seq, 5001, engine::DATA, body),
    )
}

#[test]
fn a_first_payload_followed_at_once_by_a_second_data_segment_leaves_in_order_neither_held() {
    let mut f = Fixture::new();
    f.open(40304, API, 80);
    let head = b"POST / HTTP/1.1\r\nHost: api.example.com\r\nContent-Length: 1400\r\n\r\n";
    let body = vec![0x42u8; 1400];
    let (s1, s2) = head_then_body(40304, head, &body);
    let (v1, p1, _) = f.send(&s1);
    let (v2, p2, _) = f.send(&s2);
    let a = tcp_out(&sent_packet(&v1, &p1));
    let b = tcp_out(&sent_packet(&v2, &p2));
    assert_eq!((a.0, &a.1[..]), (ISN + 1, &head[..]));
    assert_eq!((b.0, b.1), (ISN + 1 + head.len() as u32, body));
    assert!(!f.tier2.has_released());
}

#[test]
fn a_later_segment_that_arrives_first_keeps_the_hold_even_when_the_first_one_is_complete() {
    // Later packets never overtake held ones: the body segment is held, so the complete head
    // that follows is held behind it and both leave in sequence order.
    let mut f = Fixture::new();
    f.open(40305, API, 80);
    let head = b"POST / HTTP/1.1\r\nHost: api.example.com\r\nContent-Length: 100\r\n\r\n";
    let body = vec![0x42u8; 100];
    let (s1, s2) = head_then_body(40305, head, &body);
    let (v, _, _) = f.send(&s2);
    assert!(is_held(&v), "{v:?}");
    let (v, _, _) = f.send(&s1);
    assert!(is_held(&v), "{v:?}");
    let (out, other) = f.release();
    assert!(other.is_empty(), "{other:?}");
    let seqs: Vec<u32> = tcp_payloads(&out).iter().map(|(s, _)| *s).collect();
    assert_eq!(seqs, [ISN + 1, ISN + 1 + head.len() as u32]);
    assert_eq!(f.tier2.name_stats().held, 1);
}

#[test]
fn a_first_packet_beyond_the_inspection_limit_is_decided_in_place_by_its_first_bytes() {
    // Tier 1 forwards GSO super-packets whole: one packet may carry more than the 4 KiB the
    // check reads. A request head within them passes; a ClientHello longer than them does not.
    let mut f = Fixture::new();
    f.open(40306, API, 80);
    let mut req =
        b"POST / HTTP/1.1\r\nHost: api.example.com\r\nContent-Length: 20000\r\n\r\n".to_vec();
    req.resize(req.len() + 20000, 0x61);
    let (v, payload, _) = f.send(&seg(40306, API, 80, ISN + 1, 5001, engine::DATA, &req));
    assert_eq!(tcp_out(&sent_packet(&v, &payload)).1, req);
    f.open(40307, API, 443);
    let long = tls("api.example.com", 6000);
    let (v, _, _) = f.send(&seg(40307, API, 443, ISN + 1, 5001, engine::DATA, &long));
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
    assert!(f.mismatches()[0].wire_name.starts_with("(malformed"));
    assert_eq!(f.tier2.name_stats().held, 0);
}

#[test]
fn a_whole_first_payload_needs_no_hold_space_and_passes_while_the_job_s_hold_is_full() {
    let mut cfg = Tier2Config::new(PROXY, vec![NODE], vec![EGRESS]);
    cfg.names.job_bytes = 4 * 1500;
    let mut f = Fixture::with(cfg);
    let split = tls("api.example.com", 1800);
    let mut full = false;
    for i in 0..10u16 {
        f.open(41100 + i, API, 443);
        let (v, _, _) = f.send(&segments(41100 + i, API, 443, &split, 1400)[0]);
        full |= v == Verdict::Drop(Reason::HoldQueueFull);
    }
    assert!(full, "the job's hold is full");
    let held = f.tier2.name_held_bytes();
    f.open(41200, API, 443);
    let (v, _, _) = f.send(&segments(41200, API, 443, &tls("api.example.com", 0), 1400)[0]);
    assert!(sent(&v), "{v:?}");
    f.open(41201, API, 443);
    let (v, _, _) = f.send(&segments(41201, API, 443, &tls("evil.example.net", 0), 1400)[0]);
    assert!(matches!(v, Verdict::Refuse { .. }), "{v:?}");
    assert_eq!(f.tier2.name_held_bytes(), held);
}

#[test]
fn thousands_of_connections_checked_in_place_all_pass_with_nothing_held_or_released() {
    let mut f = Fixture::new();
    let req = b"GET / HTTP/1.1\r\nHost: api.example.com\r\nUser-Agent: crr\r\n\r\n";
    for i in 0..3000u16 {
        let sport = 10000 + i;
        f.mono = f.mono.saturating_add(Duration::from_millis(1));
        f.open(sport, API, 80);
        let (v, _, _) = f.send(&segments(sport, API, 80, req, 1400)[0]);
        assert!(sent(&v), "connection {i}: {v:?}");
        let fin = seg(
            sport,
            API,
            80,
            ISN + 1 + req.len() as u32,
            5001,
            TcpFlags::FIN | TcpFlags::ACK,
            &[],
        );
        assert!(sent(&f.send(&fin).0), "connection {i}: FIN");
        assert!(!f.tier2.has_released(), "connection {i}");
    }
    let st = f.tier2.name_stats();
    assert_eq!(
        (st.inspected, st.passed, st.mismatched, st.held),
        (3000, 3000, 0, 0)
    );
    assert_eq!(f.tier2.name_held_bytes(), 0);
}

#[test]
fn a_quic_initial_refused_for_hold_space_leaves_nothing_of_itself_in_the_check() {
    let mut cfg = Tier2Config::new(PROXY, vec![NODE], vec![EGRESS]);
    cfg.names.job_bytes = 1000;
    let mut f = Fixture::with(cfg);
    let hello = client_hello_message(Some("api.example.com"), 1500);
    let part = client_initial(V1, &[1; 8], 0, &crypto_frame(0, &hello[..1000]), 1200);
    let (v, _, _) = f.send(&quic(50020, API, &part));
    assert_eq!(v, Verdict::Drop(Reason::HoldQueueFull));
    // The client starts over (here with another DCID): read from nothing, decided in place.
    let (v, _, _) = f.send(&quic(
        50020,
        API,
        &initial_with_sni(&[3; 8], "api.example.com"),
    ));
    assert!(sent(&v), "{v:?}");
    assert!(f.mismatches().is_empty());
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
    assert_eq!(
        f.tier2.name_stats().held,
        1,
        "only the split ClientHello was held"
    );
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
    assert!(sent(&v), "{v:?}");
    assert_eq!(f.tier2.name_stats().other, 1);
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
        let (v, payload, _) = f.send(&segments(sport, API, 80, good, 1400)[0]);
        assert!(
            sent(&v),
            "round {round}: the allowed request goes out: {v:?}"
        );
        let first_port = egress_port(&sent_packet(&v, &payload));
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
    assert!(sent(&v), "{v:?}");
}

/// A plain-HTTP download under a checked host rule: the request is the flow's only client
/// payload, checked in place (one segment) or held (split over two); after it the client sends
/// nothing but ACKs. The flow must still reach the fast path (a bulk download is what it is
/// for), with or without the proxy's packet threshold.
#[test]
fn a_download_whose_only_request_was_checked_in_place_or_held_still_reaches_the_fast_path() {
    let thresholds = [0, snas_proxy::offload::FAST_AFTER_PACKETS];
    for (threshold, mss) in thresholds.into_iter().flat_map(|t| [(t, 1400), (t, 20)]) {
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
        let segs = segments(40200, API, 80, get, mss);
        let mut out = Vec::new();
        for s in &segs {
            let (v, payload, _) = f.send(s);
            if segs.len() == 1 {
                out.push(sent_packet(&v, &payload));
            } else {
                assert!(is_held(&v), "{v:?}");
            }
        }
        out.extend(f.release().0);
        assert_eq!(out.len(), segs.len(), "the request goes out");
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
        assert_eq!(
            installed, 1,
            "threshold {threshold}, mss {mss}: installed once"
        );
    }
}

fn initial_with_sni(dcid: &[u8], sni: &str) -> Vec<u8> {
    let hello = client_hello_message(Some(sni), 0);
    client_initial(V1, dcid, 0, &crypto_frame(0, &hello), 1200)
}

#[test]
fn a_second_quic_connection_on_a_reused_socket_with_another_sni_is_dropped_and_audited() {
    let mut f = Fixture::new();
    let (v, _, _) = f.send(&quic(
        50010,
        API,
        &initial_with_sni(&[1; 8], "api.example.com"),
    ));
    assert!(sent(&v), "{v:?}");
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
    assert!(sent(&v), "{v:?}");
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
    assert!(sent(&v), "{v:?}");
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
        assert!(sent(&v), "connection {i}, decided in place: {v:?}");
        assert!(!f.tier2.has_released(), "connection {i}");
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
