//! The engine's offload decisions (which flows the in-kernel fast path carries): install after
//! the handshake and the first client payload, never before; removal on FIN/RST, expiry, job
//! end and policy loss; counters credited back. Pure: a manual clock, no sockets.
#![allow(clippy::unwrap_used)]

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, SystemTime};

use snas_policy::authoring::parse_policy;
use snas_policy::bundle::TrustBundle;
use snas_policy::jws::{sign, verify};
use snas_policy::keys::PolicyKey;
use snas_proxy::clock::Nanos;
use snas_proxy::conntrack::FlowKey;
use snas_proxy::offload::{FastFlow, OffloadEvent};
use snas_proxy::pacer::PaceRate;
use snas_proxy::tier2::{
    AuditEvent, FlowEnd, JobPolicy, Now, StaticPolicies, Tier2, Tier2Config, Verdict,
    GENEVE_HEADER_LEN,
};
use snas_wire::build::{tcp, udp, TcpSpec, UdpSpec};
use snas_wire::geneve::{write_geneve_header, InnerProto, SnasOption};
use snas_wire::{IpPacket, L4Proto, PolicySerial, TcpFlags};

const NODE: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 7);
const PROXY: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 100);
const EGRESS: IpAddr = IpAddr::V4(Ipv4Addr::new(198, 51, 100, 1));
const SANDBOX: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 255, 0, 2));
const API: IpAddr = IpAddr::V4(Ipv4Addr::new(203, 0, 113, 10));
const T0: u64 = 1_800_000_000;
const JTI: &str = "jti-offload-0001";

const POLICY: &str = r#"
tenant = "acme"
job = "job-1"
node = "192.0.2.7"
[[egress]]
cidr = "203.0.113.0/24"
ports = "443"
[[egress]]
cidr = "203.0.113.0/24"
ports = "53"
protocol = "udp"
[limits]
max_connections = 4096
new_connections_per_sec = 100000
new_connections_burst = 100000
egress_bps = "2Gbit"
ingress_bps = "3Gbit"
"#;

struct Fixture {
    policies: StaticPolicies,
    tier2: Tier2,
    key: PolicyKey,
    bundle: TrustBundle,
    mono: Nanos,
}

fn signed(serial: u32, key: &PolicyKey, bundle: &TrustBundle) -> JobPolicy {
    let now = SystemTime::UNIX_EPOCH + Duration::from_secs(T0);
    let draft = parse_policy(POLICY).unwrap();
    let token = sign(&draft.to_claims(JTI, PolicySerial(serial), now), key).unwrap();
    JobPolicy::from_verified(&verify(&token, bundle, now).unwrap(), &[])
}

impl Fixture {
    fn new() -> Fixture {
        let key = PolicyKey::from_seed("test-key", [7; 32]).unwrap();
        let bundle = TrustBundle::from_keys([("test-key", key.public_pem().unwrap())]).unwrap();
        let mut policies = StaticPolicies::default();
        policies.insert(signed(1, &key, &bundle));
        let cfg = Tier2Config::new(PROXY, vec![NODE], vec![EGRESS]);
        let mut tier2 = Tier2::new(cfg, Nanos::ZERO).unwrap();
        tier2.set_offload(true);
        Fixture {
            policies,
            tier2,
            key,
            bundle,
            mono: Nanos::from_nanos(1_000_000_000),
        }
    }

    fn now(&self) -> Now {
        Now {
            mono: self.mono,
            unix_secs: T0 + self.mono.as_nanos() / 1_000_000_000,
        }
    }

    fn opt(&self, serial: u32) -> SnasOption {
        SnasOption {
            tenant_id: snas_policy::identity::tenant_id("acme"),
            job_key: snas_policy::identity::job_key(JTI),
            policy_serial: PolicySerial(serial),
        }
    }

    fn send_serial(&mut self, inner: &[u8], serial: u32) -> Verdict {
        let mut payload = vec![0u8; GENEVE_HEADER_LEN + inner.len()];
        write_geneve_header(&mut payload, &self.opt(serial), InnerProto::Ipv4).unwrap();
        payload[GENEVE_HEADER_LEN..].copy_from_slice(inner);
        let mut refusal = vec![0u8; 2048];
        let now = self.now();
        self.tier2
            .from_node(&self.policies, NODE, &mut payload, &mut refusal, now)
    }

    fn send(&mut self, inner: &[u8]) -> Verdict {
        self.send_serial(inner, 1)
    }

    /// The egress port of the flow a SYN from `sport` opens.
    fn open(&mut self, sport: u16) -> u16 {
        let mut payload = vec![0u8; GENEVE_HEADER_LEN + 60];
        let syn = seg(sport, TcpFlags::SYN, b"");
        write_geneve_header(&mut payload, &self.opt(1), InnerProto::Ipv4).unwrap();
        payload.truncate(GENEVE_HEADER_LEN + syn.len());
        payload[GENEVE_HEADER_LEN..].copy_from_slice(&syn);
        let mut refusal = vec![0u8; 2048];
        let now = self.now();
        let v = self
            .tier2
            .from_node(&self.policies, NODE, &mut payload, &mut refusal, now);
        let Verdict::ToInternet { range, .. } = v else {
            panic!("SYN not admitted: {v:?}")
        };
        IpPacket::parse(&payload[range])
            .unwrap()
            .flow_tuple()
            .unwrap()
            .src_port
    }

    fn receive(&mut self, inner: &[u8]) -> Verdict {
        let mut buf = vec![0u8; GENEVE_HEADER_LEN + inner.len()];
        buf[GENEVE_HEADER_LEN..].copy_from_slice(inner);
        let n = buf.len();
        let now = self.now();
        self.tier2
            .from_internet(&mut buf, GENEVE_HEADER_LEN..n, now)
    }

    fn events(&mut self) -> Vec<OffloadEvent> {
        self.tier2.drain_offload_events().collect()
    }

    /// A TCP flow from `sport` through its handshake.
    fn established(&mut self, sport: u16) -> u16 {
        let port = self.open(sport);
        self.receive(&reply(port, TcpFlags::SYN | TcpFlags::ACK, b""));
        port
    }
}

fn seg(sport: u16, flags: TcpFlags, payload: &[u8]) -> Vec<u8> {
    tcp(&TcpSpec {
        src: SocketAddr::new(SANDBOX, sport),
        dst: SocketAddr::new(API, 443),
        seq: 1000,
        ack: 5001,
        flags,
        window: 65535,
        payload,
    })
    .unwrap()
}

fn reply(egress_port: u16, flags: TcpFlags, payload: &[u8]) -> Vec<u8> {
    tcp(&TcpSpec {
        src: SocketAddr::new(API, 443),
        dst: SocketAddr::new(EGRESS, egress_port),
        seq: 5000,
        ack: 1001,
        flags,
        window: 65535,
        payload,
    })
    .unwrap()
}

fn key(sport: u16) -> FlowKey {
    FlowKey {
        job: snas_policy::identity::job_key(JTI),
        proto: L4Proto::Tcp,
        src_ip: SANDBOX,
        src_port: sport,
        dst_ip: API,
        dst_port: 443,
    }
}

fn installed(ev: &[OffloadEvent]) -> Vec<FastFlow> {
    ev.iter()
        .filter_map(|e| match e {
            OffloadEvent::Install(f) => Some(*f),
            OffloadEvent::Remove(_) => None,
        })
        .collect()
}

fn removed(ev: &[OffloadEvent]) -> Vec<FlowKey> {
    ev.iter()
        .filter_map(|e| match e {
            OffloadEvent::Remove(f) => Some(f.key),
            OffloadEvent::Install(_) => None,
        })
        .collect()
}

const DATA: TcpFlags = TcpFlags(0x18);

#[test]
fn a_flow_is_installed_after_its_handshake_and_first_client_payload_not_before() {
    let mut f = Fixture::new();
    let port = f.open(40000);
    assert!(f.events().is_empty(), "a SYN is never fast");
    f.receive(&reply(port, TcpFlags::SYN | TcpFlags::ACK, b""));
    f.send(&seg(40000, TcpFlags::ACK, b""));
    assert!(
        f.events().is_empty(),
        "a bare ACK after the handshake is not yet"
    );
    f.send(&seg(40000, DATA, b"GET / HTTP/1.1\r\n\r\n"));
    let ev = f.events();
    let fast = installed(&ev);
    assert_eq!(fast.len(), 1, "{ev:?}");
    let fl = fast[0];
    assert_eq!(fl.key, key(40000));
    assert_eq!((IpAddr::V4(fl.egress_ip), fl.egress_port), (EGRESS, port));
    assert_eq!(fl.node, NODE);
    assert_eq!(fl.serial, PolicySerial(1));
    assert_eq!(fl.tenant, snas_policy::identity::tenant_id("acme"));
    assert_eq!(fl.rates.job_egress, PaceRate::mbit(2000));
    assert_eq!(fl.rates.job_ingress, PaceRate::mbit(3000));
    assert_eq!(f.tier2.offloaded_flows(), 1);
    f.send(&seg(40000, DATA, b"more"));
    assert!(f.events().is_empty(), "installed once");
}

#[test]
fn a_fin_or_rst_either_way_removes_the_flow_from_the_fast_path() {
    let mut f = Fixture::new();
    f.established(40001);
    let b = f.established(40002);
    for sport in [40001, 40002] {
        f.send(&seg(sport, DATA, b"x"));
    }
    assert_eq!(installed(&f.events()).len(), 2);
    f.send(&seg(40001, TcpFlags::FIN | TcpFlags::ACK, b""));
    assert_eq!(removed(&f.events()), vec![key(40001)]);
    f.receive(&reply(b, TcpFlags::RST, b""));
    assert_eq!(removed(&f.events()), vec![key(40002)]);
    assert_eq!(f.tier2.offloaded_flows(), 0);
    f.send(&seg(40001, DATA, b"late"));
    assert!(
        installed(&f.events()).is_empty(),
        "a closing flow is never fast again"
    );
}

#[test]
fn a_udp_flow_is_installed_once_answered() {
    let mut f = Fixture::new();
    let q = |p: &[u8]| {
        udp(&UdpSpec {
            src: SocketAddr::new(SANDBOX, 5353),
            dst: SocketAddr::new(API, 53),
            payload: p,
        })
        .unwrap()
    };
    let Verdict::ToInternet { .. } = f.send(&q(b"query")) else {
        panic!("not admitted")
    };
    assert!(f.events().is_empty(), "no reply yet");
    let port = f
        .tier2
        .conntrack()
        .iter()
        .next()
        .map(|(_, i)| i.egress_port)
        .unwrap();
    let answer = udp(&UdpSpec {
        src: SocketAddr::new(API, 53),
        dst: SocketAddr::new(EGRESS, port),
        payload: b"answer",
    })
    .unwrap();
    f.receive(&answer);
    f.send(&q(b"query 2"));
    let fast = installed(&f.events());
    assert_eq!(fast.len(), 1);
    assert_eq!(fast[0].key.proto, L4Proto::Udp);
}

#[test]
fn a_job_end_removes_every_fast_flow_of_the_job_with_its_flows() {
    let mut f = Fixture::new();
    for sport in 41000..41200 {
        f.established(sport);
        f.send(&seg(sport, DATA, b"x"));
    }
    assert_eq!(installed(&f.events()).len(), 200);
    let job = snas_policy::identity::job_key(JTI);
    let now = f.now();
    let n = f.tier2.remove_job(job, FlowEnd::JobEnded, now);
    assert_eq!(n, 200);
    let mut gone = removed(&f.events());
    gone.sort_by_key(|k| k.src_port);
    assert_eq!(gone, (41000..41200).map(key).collect::<Vec<_>>());
    assert_eq!(f.tier2.offloaded_flows(), 0);
}

#[test]
fn a_policy_that_is_no_longer_held_removes_the_fast_flows_at_the_next_scan() {
    let mut f = Fixture::new();
    f.established(40010);
    f.send(&seg(40010, DATA, b"x"));
    f.events();
    let empty = StaticPolicies::default();
    f.mono = f.mono.saturating_add(Duration::from_secs(2));
    assert!(f.tier2.ends_flows_at(f.mono));
    let now = f.now();
    f.tier2.tick(&empty, now);
    assert_eq!(removed(&f.events()), vec![key(40010)]);
}

#[test]
fn an_idle_fast_flow_expires_unless_its_fast_traffic_is_credited() {
    let mut f = Fixture::new();
    // UDP replied flows idle out after 120 s.
    let q = udp(&UdpSpec {
        src: SocketAddr::new(SANDBOX, 6000),
        dst: SocketAddr::new(API, 53),
        payload: b"q",
    })
    .unwrap();
    f.send(&q);
    let port = f
        .tier2
        .conntrack()
        .iter()
        .next()
        .map(|(_, i)| i.egress_port)
        .unwrap();
    f.receive(
        &udp(&UdpSpec {
            src: SocketAddr::new(API, 53),
            dst: SocketAddr::new(EGRESS, port),
            payload: b"a",
        })
        .unwrap(),
    );
    f.send(&q);
    let fast = installed(&f.events());
    assert_eq!(fast.len(), 1);
    let k = fast[0].key;
    // The fast path carries it for 10 minutes: each minute its counters are credited.
    for _ in 0..10 {
        f.mono = f.mono.saturating_add(Duration::from_secs(60));
        assert!(f
            .tier2
            .credit_offloaded(&k, (100, 6_400), (100, 12_800), Some(f.mono)));
        let now = f.now();
        f.tier2.tick(&f.policies, now);
        assert!(
            removed(&f.events()).is_empty(),
            "credited traffic keeps it alive"
        );
    }
    let (_, info) = f.tier2.conntrack().iter().next().unwrap();
    assert_eq!(info.counters.packets_out, 2 + 1000);
    assert_eq!(info.counters.packets_in, 1 + 1000);
    assert!(info.counters.bytes_in >= 128_000);
    // Then it stops: idle timeout, flow_end with everything counted, entry removed.
    f.mono = f.mono.saturating_add(Duration::from_secs(200));
    let now = f.now();
    f.tier2.tick(&f.policies, now);
    assert_eq!(removed(&f.events()), vec![k]);
    let ends: Vec<_> = f
        .tier2
        .drain_audit()
        .filter_map(|e| match e {
            AuditEvent::FlowEnd(r) => Some(r),
            _ => None,
        })
        .collect();
    assert_eq!(ends.len(), 1);
    assert_eq!(ends[0].counters.packets_out, 1002);
    assert!(ends[0].counters.bytes_out >= 64_000);
}

#[test]
fn a_renewed_policy_reinstalls_the_flow_with_its_serial_without_new_payload() {
    let mut f = Fixture::new();
    f.established(40020);
    f.send(&seg(40020, DATA, b"x"));
    f.events();
    let renewed = signed(2, &f.key, &f.bundle);
    f.policies.insert(renewed);
    // The node now sends serial 2; the fast path diverts those (serial), the engine sees an ACK.
    f.send_serial(&seg(40020, TcpFlags::ACK, b""), 2);
    let fast = installed(&f.events());
    assert_eq!(fast.len(), 1);
    assert_eq!(fast[0].serial, PolicySerial(2));
}

#[test]
fn nothing_is_installed_while_draining_or_with_offload_off() {
    let mut f = Fixture::new();
    f.established(40030);
    f.tier2.set_draining(true);
    f.send(&seg(40030, DATA, b"x"));
    assert!(f.events().is_empty());
    f.tier2.set_draining(false);
    f.tier2.set_offload(false);
    f.send(&seg(40030, DATA, b"x"));
    assert!(f.events().is_empty());
    f.tier2.set_offload(true);
    f.send(&seg(40030, DATA, b"x"));
    assert_eq!(installed(&f.events()).len(), 1);
    f.tier2.set_offload(false);
    assert_eq!(removed(&f.events()), vec![key(40030)]);
}

#[test]
fn a_job_limited_below_a_gigabit_stays_with_the_userspace_pacer() {
    let mut f = Fixture::new();
    let slow = POLICY.replace("2Gbit", "20Mbit");
    let draft = parse_policy(&slow).unwrap();
    let now = SystemTime::UNIX_EPOCH + Duration::from_secs(T0);
    let token = sign(&draft.to_claims(JTI, PolicySerial(1), now), &f.key).unwrap();
    f.policies.insert(JobPolicy::from_verified(
        &verify(&token, &f.bundle, now).unwrap(),
        &[],
    ));
    f.established(40040);
    f.send(&seg(40040, DATA, b"x"));
    assert!(f.events().is_empty());
}

/// A connect-request-response-close connection as a TCP_CRR client makes it (the server
/// closes first).
fn short_connection(f: &mut Fixture, sport: u16) {
    let port = f.established(sport);
    f.send(&seg(sport, TcpFlags::ACK, b""));
    f.send(&seg(sport, DATA, b"GET / HTTP/1.1\r\n\r\n"));
    f.receive(&reply(port, DATA, b"HTTP/1.1 200 OK\r\n\r\n"));
    f.receive(&reply(port, TcpFlags::FIN | TcpFlags::ACK, b""));
    f.send(&seg(sport, TcpFlags::FIN | TcpFlags::ACK, b""));
    f.receive(&reply(port, TcpFlags::ACK, b""));
}

fn with_threshold() -> Fixture {
    let mut f = Fixture::new();
    f.tier2
        .set_offload_min_packets(snas_proxy::offload::FAST_AFTER_PACKETS);
    f
}

#[test]
fn with_the_proxys_threshold_a_thousand_short_connections_never_touch_the_fast_path() {
    // 1,000: the policy's per-destination port cap bounds how many may be open at once.
    let mut f = with_threshold();
    for i in 0..1000u16 {
        short_connection(&mut f, 20000 + i);
        assert!(f.events().is_empty(), "connection {i} was offloaded");
    }
    assert_eq!(f.tier2.offloaded_flows(), 0);
}

#[test]
fn short_connections_that_reuse_one_5_tuple_never_add_up_to_a_long_flow() {
    let mut f = with_threshold();
    for i in 0..500 {
        short_connection(&mut f, 20000);
        assert!(f.events().is_empty(), "connection {i} was offloaded");
        // The client's port comes round again once the closed flow is gone or reusable.
        f.mono = f.mono.saturating_add(Duration::from_secs(1));
        let now = f.now();
        f.tier2.tick(&f.policies, now);
    }
    assert_eq!(f.tier2.offloaded_flows(), 0);
}

#[test]
fn without_a_threshold_a_short_connection_is_installed_and_removed() {
    let mut f = Fixture::new();
    short_connection(&mut f, 20000);
    let ev = f.events();
    assert_eq!(installed(&ev).len(), 1, "{ev:?}");
    assert_eq!(removed(&ev), vec![key(20000)]);
}

#[test]
fn a_flow_is_installed_at_the_client_packet_that_reaches_the_threshold() {
    let mut f = with_threshold();
    let n = snas_proxy::offload::FAST_AFTER_PACKETS;
    let port = f.established(40000);
    // Request/response exchanges, 2 packets each, counted from the first request on.
    f.send(&seg(40000, DATA, b"ping"));
    let mut after = 0;
    loop {
        f.receive(&reply(port, DATA, b"pong"));
        after += 1;
        assert!(f.events().is_empty(), "a reply never installs");
        f.send(&seg(40000, DATA, b"ping"));
        after += 1;
        if after >= n {
            break;
        }
        assert!(
            f.events().is_empty(),
            "installed {after} packets after the first payload"
        );
    }
    let fast = installed(&f.events());
    assert_eq!(fast.len(), 1);
    assert_eq!(fast[0].key, key(40000));
    assert_eq!(f.tier2.offloaded_flows(), 1);
}

#[test]
fn a_download_is_installed_at_the_first_client_ack_past_the_threshold() {
    let mut f = with_threshold();
    let n = snas_proxy::offload::FAST_AFTER_PACKETS;
    let port = f.established(40000);
    f.send(&seg(40000, DATA, b"GET /big HTTP/1.1\r\n\r\n"));
    assert!(f.events().is_empty());
    let chunk = vec![0x5a; 1400];
    for _ in 0..n {
        f.receive(&reply(port, DATA, &chunk));
    }
    assert!(f.events().is_empty(), "only a client packet installs");
    f.send(&seg(40000, TcpFlags::ACK, b""));
    assert_eq!(installed(&f.events()).len(), 1, "the ACK of a proven flow");
}

#[test]
fn a_flow_that_never_sent_payload_is_not_installed_however_long() {
    // A server-first protocol: the name check sees the client's first payload when it comes,
    // so nothing may bypass the engine before it.
    let mut f = with_threshold();
    let port = f.established(40000);
    for _ in 0..100 {
        f.receive(&reply(port, DATA, b"220 smtp.example ready"));
        f.send(&seg(40000, TcpFlags::ACK, b""));
    }
    assert!(f.events().is_empty());
    f.send(&seg(40000, DATA, b"EHLO client"));
    assert!(
        f.events().is_empty(),
        "the count starts at the first payload"
    );
}
