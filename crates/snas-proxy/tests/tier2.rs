//! Tier-2 behaviour over signed policies: admission order, refusals on the wire, forged
//! traffic, limits and reverse NAT. Pure: a manual clock, no sockets.
#![allow(clippy::unwrap_used)]

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, SystemTime};

use snas_policy::authoring::parse_policy;
use snas_policy::bundle::TrustBundle;
use snas_policy::jws::{sign, verify};
use snas_policy::keys::PolicyKey;
use snas_proxy::clock::Nanos;
use snas_proxy::tier2::{
    Action, AuditEvent, AuditRecord, FlowEnd, FlowEndRecord, JobPolicy, Now, PolicyCache,
    PolicyLookup, StaticPolicies, Tier2, Tier2Config, Verdict, GENEVE_HEADER_LEN,
};
use snas_wire::build::{tcp, udp, TcpSpec, UdpSpec};
use snas_wire::geneve::{parse_payload, write_geneve_header, InnerProto, SnasOption, GENEVE_PORT};
use snas_wire::{IpPacket, Reason, TcpFlags, Transport};

const NODE: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 7);
const OTHER_NODE: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 8);
const PROXY: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 100);
const EGRESS: IpAddr = IpAddr::V4(Ipv4Addr::new(198, 51, 100, 1));
const SANDBOX: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 255, 0, 2));
const API: IpAddr = IpAddr::V4(Ipv4Addr::new(203, 0, 113, 10));
const UNBOUND: IpAddr = IpAddr::V4(Ipv4Addr::new(203, 0, 113, 99));
const T0: u64 = 1_800_000_000;

struct Fixture {
    policies: StaticPolicies,
    tier2: Tier2,
    key: PolicyKey,
    bundle: TrustBundle,
    mono: Nanos,
}

fn key() -> (PolicyKey, TrustBundle) {
    let key = PolicyKey::from_seed("test-key", [7; 32]).unwrap();
    let bundle = TrustBundle::from_keys([("test-key", key.public_pem().unwrap())]).unwrap();
    (key, bundle)
}

fn policy(toml: &str, jti: &str, serial: u32, key: &PolicyKey, bundle: &TrustBundle) -> JobPolicy {
    let now = SystemTime::UNIX_EPOCH + Duration::from_secs(T0);
    let draft = parse_policy(toml).unwrap();
    let token = sign(
        &draft.to_claims(jti, snas_wire::PolicySerial(serial), now),
        key,
    )
    .unwrap();
    JobPolicy::from_verified(&verify(&token, bundle, now).unwrap(), &[])
}

// Names on the wire are off here: these tests send payloads that are not TLS or HTTP; the
// name check has its own tests (tests/names.rs).
const ACME: &str = r#"
tenant = "acme"
job = "job-1"
node = "192.0.2.7"
[[egress]]
host = "api.example.com"
names = "off"
[[egress]]
host = "*.example.org:8000-8100"
names = "off"
[[egress]]
cidr = "198.51.100.128/25"
ports = "53"
protocol = "udp"
[limits]
max_connections = 3
new_connections_per_sec = 2
new_connections_burst = 3
"#;

impl Fixture {
    fn new() -> Fixture {
        let (key, bundle) = key();
        let mut policies = StaticPolicies::default();
        policies.insert(policy(ACME, "jti-acme-00000001", 1, &key, &bundle));
        let cfg = Tier2Config::new(PROXY, vec![NODE, OTHER_NODE], vec![EGRESS]);
        let tier2 = Tier2::new(cfg, Nanos::ZERO).unwrap();
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

    fn advance(&mut self, d: Duration) {
        self.mono = self.mono.saturating_add(d);
    }

    fn option(&self, job: &str) -> SnasOption {
        let p = match job {
            "acme" => snas_policy::identity::job_key("jti-acme-00000001"),
            other => snas_policy::identity::job_key(other),
        };
        SnasOption {
            tenant_id: snas_policy::identity::tenant_id("acme"),
            job_key: p,
            policy_serial: snas_wire::PolicySerial(1),
        }
    }

    fn send(
        &mut self,
        from: Ipv4Addr,
        opt: SnasOption,
        inner: &[u8],
    ) -> (Verdict, Vec<u8>, Vec<u8>) {
        self.send_proto(from, opt, inner, InnerProto::Ipv4)
    }

    fn send_v6(
        &mut self,
        from: Ipv4Addr,
        opt: SnasOption,
        inner: &[u8],
    ) -> (Verdict, Vec<u8>, Vec<u8>) {
        self.send_proto(from, opt, inner, InnerProto::Ipv6)
    }

    fn send_proto(
        &mut self,
        from: Ipv4Addr,
        opt: SnasOption,
        inner: &[u8],
        proto: InnerProto,
    ) -> (Verdict, Vec<u8>, Vec<u8>) {
        let mut payload = vec![0u8; GENEVE_HEADER_LEN + inner.len()];
        write_geneve_header(&mut payload, &opt, proto).unwrap();
        payload[GENEVE_HEADER_LEN..].copy_from_slice(inner);
        let mut refusal = vec![0u8; 2048];
        let now = self.now();
        let v = self
            .tier2
            .from_node(&self.policies, from, &mut payload, &mut refusal, now);
        (v, payload, refusal)
    }
}

impl Fixture {
    /// Hands `inner` (a packet from the internet) to tier 2 with room for the GENEVE header in
    /// front; returns the verdict and the buffer it refers to.
    fn receive(&mut self, inner: &[u8]) -> (Verdict, Vec<u8>) {
        let mut buf = vec![0u8; GENEVE_HEADER_LEN + inner.len()];
        buf[GENEVE_HEADER_LEN..].copy_from_slice(inner);
        let n = buf.len();
        let now = self.now();
        let v = self
            .tier2
            .from_internet(&mut buf, GENEVE_HEADER_LEN..n, now);
        (v, buf)
    }
}

/// The SYN-ACK api.example.com:443 sends to the egress tuple of a flow.
fn synack_to(egress_port: u16) -> Vec<u8> {
    tcp(&TcpSpec {
        src: SocketAddr::new(API, 443),
        dst: SocketAddr::new(EGRESS, egress_port),
        seq: 5000,
        ack: 1001,
        flags: TcpFlags::SYN | TcpFlags::ACK,
        window: 65535,
        payload: &[],
    })
    .unwrap()
}

fn syn(src_port: u16, dst: IpAddr, dst_port: u16) -> Vec<u8> {
    tcp(&TcpSpec {
        src: SocketAddr::new(SANDBOX, src_port),
        dst: SocketAddr::new(dst, dst_port),
        seq: 1000,
        ack: 0,
        flags: TcpFlags::SYN,
        window: 65535,
        payload: &[],
    })
    .unwrap()
}

fn udp_to(src_port: u16, dst: IpAddr, dst_port: u16) -> Vec<u8> {
    udp(&UdpSpec {
        src: SocketAddr::new(SANDBOX, src_port),
        dst: SocketAddr::new(dst, dst_port),
        payload: b"hello",
    })
    .unwrap()
}

fn bind_api(f: &mut Fixture) {
    let job = f.option("acme").job_key;
    let exp = f.mono.saturating_add(Duration::from_secs(300));
    f.tier2
        .bindings_mut()
        .bind(job, API, "api.example.com", exp);
}

#[test]
fn allowed_flow_is_snated_and_reply_goes_back_to_its_node() {
    let mut f = Fixture::new();
    bind_api(&mut f);
    let (v, payload, _) = f.send(NODE, f.option("acme"), &syn(40000, API, 443));
    let Verdict::ToInternet { range, .. } = v else {
        panic!("expected ToInternet, got {v:?}")
    };
    let out = IpPacket::parse(&payload[range.clone()]).unwrap();
    let tuple = out.flow_tuple().unwrap();
    assert_eq!(tuple.src, EGRESS, "source rewritten to the egress address");
    assert_eq!((tuple.dst, tuple.dst_port), (API, 443));
    let egress_port = tuple.src_port;
    assert!(egress_port >= 1024);
    // Checksums stay valid after NAT.
    let Ok(Transport::Tcp(t)) = out.transport() else {
        panic!("not tcp")
    };
    assert!(t.checksum_ok(out.src(), out.dst()));

    let audit: Vec<_> = decisions(&mut f);
    assert_eq!(audit.len(), 1);
    assert_eq!(audit[0].action, Action::Allow);
    assert_eq!(audit[0].hostname.as_deref(), Some("api.example.com"));
    assert_eq!(audit[0].rule, Some(0));
    assert_eq!(audit[0].egress, Some((EGRESS, egress_port)));

    // The SYN-ACK from the internet is reverse-NATed and put behind a GENEVE header for NODE.
    let (v, buf) = f.receive(&synack_to(egress_port));
    let Verdict::ToNode { node, range, .. } = v else {
        panic!("expected ToNode, got {v:?}")
    };
    assert_eq!(node, NODE);
    let g = parse_payload(&buf[range.clone()]).unwrap();
    assert_eq!(g.option, f.option("acme"));
    let inner = IpPacket::parse(&buf[range.start + g.inner_offset..range.end]).unwrap();
    let back = inner.flow_tuple().unwrap();
    assert_eq!((back.dst, back.dst_port), (SANDBOX, 40000));
    assert_eq!((back.src, back.src_port), (API, 443));
    let Ok(Transport::Tcp(t)) = inner.transport() else {
        panic!("not tcp")
    };
    assert!(t.checksum_ok(inner.src(), inner.dst()));
}

/// The decision records audited since the last call (flow ends are left out).
fn decisions(f: &mut Fixture) -> Vec<AuditRecord> {
    f.tier2
        .drain_audit()
        .filter_map(|e| match e {
            AuditEvent::Decision(r) => Some(r),
            _ => None,
        })
        .collect()
}

fn refused_rst(v: &Verdict, refusal: &[u8], want: Reason) -> (IpAddr, u16, IpAddr, u16) {
    let Verdict::Refuse {
        reason,
        node,
        reply_len,
    } = v
    else {
        panic!("expected Refuse({want:?}), got {v:?}")
    };
    assert_eq!(*reason, want);
    assert_eq!(*node, NODE);
    let g = parse_payload(&refusal[..*reply_len]).unwrap();
    let inner = IpPacket::parse(&refusal[g.inner_offset..*reply_len]).unwrap();
    let Ok(Transport::Tcp(t)) = inner.transport() else {
        panic!("refusal is not a TCP segment")
    };
    assert!(t.flags().contains(TcpFlags::RST));
    assert!(t.checksum_ok(inner.src(), inner.dst()));
    (inner.src(), t.src_port(), inner.dst(), t.dst_port())
}

#[test]
fn unbound_address_is_refused_with_a_rst_back_to_the_sandbox() {
    let mut f = Fixture::new();
    let (v, _, refusal) = f.send(NODE, f.option("acme"), &syn(40001, UNBOUND, 443));
    let (src, sport, dst, dport) = refused_rst(&v, &refusal, Reason::DestinationDenied);
    assert_eq!(
        (src, sport),
        (UNBOUND, 443),
        "RST appears to come from the destination"
    );
    assert_eq!((dst, dport), (SANDBOX, 40001));
    let audit: Vec<_> = decisions(&mut f);
    assert_eq!(audit[0].action, Action::Deny);
    assert_eq!(audit[0].reason, Some(Reason::DestinationDenied));
    assert_eq!(
        f.tier2.drops()[Reason::DestinationDenied.code() as usize],
        1
    );
}

#[test]
fn bound_name_on_a_denied_port_is_refused_with_port_denied() {
    let mut f = Fixture::new();
    bind_api(&mut f);
    let (v, _, refusal) = f.send(NODE, f.option("acme"), &syn(40002, API, 22));
    refused_rst(&v, &refusal, Reason::PortDenied);
    let audit: Vec<_> = decisions(&mut f);
    assert_eq!(audit[0].hostname.as_deref(), Some("api.example.com"));
}

#[test]
fn denied_udp_gets_icmp_unreachable() {
    let mut f = Fixture::new();
    let (v, _, refusal) = f.send(NODE, f.option("acme"), &udp_to(5000, UNBOUND, 53));
    let Verdict::Refuse { reply_len, .. } = v else {
        panic!("expected refusal, got {v:?}")
    };
    let g = parse_payload(&refusal[..reply_len]).unwrap();
    let inner = IpPacket::parse(&refusal[g.inner_offset..reply_len]).unwrap();
    let Ok(Transport::Icmp(m)) = inner.transport() else {
        panic!("not ICMP")
    };
    assert_eq!(m.msg_type(), 3, "destination unreachable");
    assert_eq!(inner.dst(), SANDBOX);
}

#[test]
fn cidr_rule_admits_udp_without_any_binding() {
    let mut f = Fixture::new();
    let dst = IpAddr::V4(Ipv4Addr::new(198, 51, 100, 200));
    let (v, _, _) = f.send(NODE, f.option("acme"), &udp_to(5000, dst, 53));
    assert!(matches!(v, Verdict::ToInternet { .. }), "{v:?}");
    let (v, _, _) = f.send(NODE, f.option("acme"), &syn(40003, dst, 53));
    assert!(
        matches!(
            v,
            Verdict::Refuse {
                reason: Reason::PortDenied,
                ..
            }
        ),
        "udp-only rule: {v:?}"
    );
}

#[test]
fn forged_and_unverifiable_traffic_is_dropped_and_counted() {
    let mut f = Fixture::new();
    bind_api(&mut f);
    let pkt = syn(40010, API, 443);
    let stranger = Ipv4Addr::new(192, 0, 2, 66);
    let (v, _, _) = f.send(stranger, f.option("acme"), &pkt);
    assert_eq!(v, Verdict::Drop(Reason::UntrustedSource));

    // Policy pinned to NODE: the other (trusted) node cannot use it.
    let (v, _, _) = f.send(OTHER_NODE, f.option("acme"), &pkt);
    assert_eq!(v, Verdict::Drop(Reason::NodeMismatch));

    // Right job key, wrong tenant.
    let mut opt = f.option("acme");
    opt.tenant_id.0 ^= 1;
    let (v, _, _) = f.send(NODE, opt, &pkt);
    assert_eq!(v, Verdict::Drop(Reason::GeneveUnknownJob));

    // A job key nobody has verified: the packet is held and the caller asked to fetch it.
    let opt = f.option("jti-unknown-00001");
    let (v, _, _) = f.send(NODE, opt, &pkt);
    assert_eq!(
        v,
        Verdict::Held {
            job_key: opt.job_key,
            node: NODE,
            fetch: true,
        }
    );
    // ... and once the fetch failed verification, the held packet is dropped with that reason,
    // and so are later ones (negative cache).
    f.policies.reject(opt.job_key, Reason::PolicyInvalid);
    assert_eq!(f.tier2.policy_failed(opt.job_key, Reason::PolicyInvalid), 1);
    assert_eq!(f.tier2.held(), (0, 0));
    let (v, _, _) = f.send(NODE, opt, &pkt);
    assert_eq!(v, Verdict::Drop(Reason::PolicyInvalid));

    // A corrupted GENEVE header.
    let mut payload = vec![0u8; GENEVE_HEADER_LEN + pkt.len()];
    write_geneve_header(&mut payload, &f.option("acme"), InnerProto::Ipv4).unwrap();
    payload[GENEVE_HEADER_LEN..].copy_from_slice(&pkt);
    payload[8] = 0x01; // option class no longer ours, C bit still set
    let mut refusal = [0u8; 64];
    let now = f.now();
    let v = f
        .tier2
        .from_node(&f.policies, NODE, &mut payload, &mut refusal, now);
    assert_eq!(v, Verdict::Drop(Reason::GeneveOption));

    for (r, n) in [
        (Reason::UntrustedSource, 1),
        (Reason::NodeMismatch, 1),
        (Reason::GeneveUnknownJob, 1),
        (Reason::PolicyInvalid, 2),
        (Reason::GeneveOption, 1),
    ] {
        assert_eq!(f.tier2.drops()[r.code() as usize], n, "{r}");
    }
    assert_eq!(f.tier2.conntrack().len(), 0, "no flow was created");
}

#[test]
fn max_connections_is_exact_and_new_connection_rate_refills() {
    let mut f = Fixture::new();
    bind_api(&mut f);
    // burst 3, max_connections 3: three flows pass (and are answered, so they are established),
    // the fourth hits the connection limit.
    for port in 0..3 {
        let (v, payload, _) = f.send(NODE, f.option("acme"), &syn(41000 + port, API, 443));
        let Verdict::ToInternet { range, .. } = v else {
            panic!("flow {port}: {v:?}")
        };
        let egress_port = IpPacket::parse(&payload[range])
            .unwrap()
            .flow_tuple()
            .unwrap()
            .src_port;
        let (v, _) = f.receive(&synack_to(egress_port));
        assert!(matches!(v, Verdict::ToNode { .. }), "{v:?}");
    }
    // A retransmitted SYN of an existing flow is not a new connection.
    let (v, _, _) = f.send(NODE, f.option("acme"), &syn(41000, API, 443));
    assert!(matches!(v, Verdict::ToInternet { .. }));

    // Reset one flow; once its closed state times out there is room again, and the bucket
    // (3 burst, 2/s) has refilled meanwhile.
    let rst = tcp(&TcpSpec {
        src: SocketAddr::new(SANDBOX, 41000),
        dst: SocketAddr::new(API, 443),
        seq: 1001,
        ack: 0,
        flags: TcpFlags::RST,
        window: 0,
        payload: &[],
    })
    .unwrap();
    let (v, _, _) = f.send(NODE, f.option("acme"), &rst);
    assert!(matches!(v, Verdict::ToInternet { .. }));
    f.advance(Duration::from_secs(31));
    let now = f.now();
    assert_eq!(
        f.tier2.tick(&f.policies, now),
        1,
        "only the reset flow expires"
    );
    assert_eq!(
        f.tier2
            .conntrack()
            .live_flows_of_job(f.option("acme").job_key),
        2,
        "the reset flow is gone"
    );

    let (v, _, _) = f.send(NODE, f.option("acme"), &syn(41004, API, 443));
    assert!(matches!(v, Verdict::ToInternet { .. }), "{v:?}");
}

#[test]
fn new_connection_rate_refuses_bursts_beyond_the_bucket() {
    let (key, bundle) = key();
    let toml = r#"
tenant = "acme"
job = "burst"
[[egress]]
host = "api.example.com"
[limits]
max_connections = 100
new_connections_per_sec = 2
new_connections_burst = 2
"#;
    let mut f = Fixture::new();
    f.policies
        .insert(policy(toml, "jti-burst-0000001", 1, &key, &bundle));
    let opt = f.option("jti-burst-0000001");
    let exp = f.mono.saturating_add(Duration::from_secs(300));
    f.tier2
        .bindings_mut()
        .bind(opt.job_key, API, "api.example.com", exp);
    let mut ok = 0;
    let mut refused = 0;
    for port in 0..5 {
        match f.send(NODE, opt, &syn(42000 + port, API, 443)).0 {
            Verdict::ToInternet { .. } => ok += 1,
            Verdict::Refuse {
                reason: Reason::NewConnectionRate,
                ..
            } => refused += 1,
            v => panic!("unexpected {v:?}"),
        }
    }
    assert_eq!((ok, refused), (2, 3));
    f.advance(Duration::from_millis(500));
    assert!(matches!(
        f.send(NODE, opt, &syn(42010, API, 443)).0,
        Verdict::ToInternet { .. }
    ));
    let _ = f.key.kid();
    let _ = f.bundle.len();
}

#[test]
fn mid_stream_segment_without_conntrack_gets_a_rst_and_creates_nothing() {
    let mut f = Fixture::new();
    bind_api(&mut f);
    let ack = tcp(&TcpSpec {
        src: SocketAddr::new(SANDBOX, 43000),
        dst: SocketAddr::new(API, 443),
        seq: 1,
        ack: 77,
        flags: TcpFlags::ACK,
        window: 100,
        payload: b"data",
    })
    .unwrap();
    let (v, _, refusal) = f.send(NODE, f.option("acme"), &ack);
    refused_rst(&v, &refusal, Reason::NoConntrack);
    assert_eq!(f.tier2.conntrack().len(), 0);
}

#[test]
fn draining_refuses_new_flows_but_keeps_established_ones() {
    let mut f = Fixture::new();
    bind_api(&mut f);
    let (v, _, _) = f.send(NODE, f.option("acme"), &syn(44000, API, 443));
    assert!(matches!(v, Verdict::ToInternet { .. }));
    f.tier2.set_draining(true);
    let (v, _, refusal) = f.send(NODE, f.option("acme"), &syn(44001, API, 443));
    refused_rst(&v, &refusal, Reason::Draining);
    let data = tcp(&TcpSpec {
        src: SocketAddr::new(SANDBOX, 44000),
        dst: SocketAddr::new(API, 443),
        seq: 1001,
        ack: 5001,
        flags: TcpFlags::ACK,
        window: 100,
        payload: b"GET /",
    })
    .unwrap();
    let (v, _, _) = f.send(NODE, f.option("acme"), &data);
    assert!(matches!(v, Verdict::ToInternet { .. }), "{v:?}");
}

const ADDED: IpAddr = IpAddr::V4(Ipv4Addr::new(203, 0, 113, 20));

/// ACME's next serial: adds `added.example.net`.
fn acme_v2(f: &Fixture) -> JobPolicy {
    let toml = ACME.replace(
        "[limits]",
        "[[egress]]\nhost = \"added.example.net\"\nnames = \"off\"\n[limits]",
    );
    policy(&toml, "jti-acme-00000001", 2, &f.key, &f.bundle)
}

fn bind_added(f: &mut Fixture) {
    let job = f.option("acme").job_key;
    let exp = f.mono.saturating_add(Duration::from_secs(300));
    f.tier2
        .bindings_mut()
        .bind(job, ADDED, "added.example.net", exp);
}

fn opt_serial(f: &Fixture, serial: u32) -> SnasOption {
    let mut opt = f.option("acme");
    opt.policy_serial = snas_wire::PolicySerial(serial);
    opt
}

/// Runs what the engine released through it again (as the daemon does).
fn replay(f: &mut Fixture) -> Vec<Verdict> {
    let mut out = Vec::new();
    f.tier2.take_released(&mut out, 10_000);
    let mut verdicts = Vec::new();
    for h in &mut out {
        let mut refusal = vec![0u8; 2048];
        let now = f.now();
        verdicts.push(
            f.tier2
                .from_node_released(&f.policies, h, &mut refusal, now),
        );
    }
    verdicts
}

#[test]
fn a_syn_to_a_destination_only_the_newer_serial_allows_is_held_then_admitted_under_it() {
    let mut f = Fixture::new();
    bind_api(&mut f);
    bind_added(&mut f);
    let opt = opt_serial(&f, 2);
    let (v, _, _) = f.send(NODE, opt, &syn(45000, ADDED, 443));
    assert_eq!(
        v,
        Verdict::Held {
            job_key: opt.job_key,
            node: NODE,
            fetch: false
        },
        "not decided by serial 1, which refuses it"
    );
    // The job's next packets, of any serial, wait behind it until the refetch ends.
    let (v, _, _) = f.send(NODE, opt, &syn(45001, API, 443));
    assert!(matches!(v, Verdict::Held { .. }), "{v:?}");
    let (v, _, _) = f.send(NODE, f.option("acme"), &syn(45002, API, 443));
    assert!(matches!(v, Verdict::Held { .. }), "{v:?}");
    assert!(
        !f.tier2.has_released(),
        "nothing leaves before the refetch ends"
    );
    assert_eq!(f.tier2.refetch_waits(), 1);
    let refetch: Vec<_> = f.tier2.drain_refetch().collect();
    assert_eq!(refetch, vec![(opt.job_key, NODE)], "asked once");

    let v2 = acme_v2(&f);
    f.policies.insert(v2);
    f.tier2.policy_ready(opt.job_key);
    let verdicts = replay(&mut f);
    assert_eq!(verdicts.len(), 3);
    assert!(
        verdicts
            .iter()
            .all(|v| matches!(v, Verdict::ToInternet { .. })),
        "{verdicts:?}"
    );
    assert_eq!(f.tier2.refetch_waits(), 0);
    assert_eq!(f.tier2.held(), (0, 0));
    // Serial 2 is cached now: its packets are decided at once (here: its max_connections = 3
    // is reached).
    let (v, _, _) = f.send(NODE, opt, &syn(45003, ADDED, 443));
    assert!(
        matches!(
            v,
            Verdict::Refuse {
                reason: Reason::ConnectionLimit,
                ..
            }
        ),
        "{v:?}"
    );
}

#[test]
fn a_failed_refetch_decides_the_held_packets_under_the_cached_policy_and_holds_no_more() {
    let mut f = Fixture::new();
    bind_api(&mut f);
    bind_added(&mut f);
    let opt = opt_serial(&f, 2);
    assert!(matches!(
        f.send(NODE, opt, &syn(45100, API, 443)).0,
        Verdict::Held { .. }
    ));
    assert!(matches!(
        f.send(NODE, opt, &syn(45101, ADDED, 443)).0,
        Verdict::Held { .. }
    ));
    // The refetch failed: the fetcher keeps serial 1 and reports the job ready.
    f.tier2.policy_ready(opt.job_key);
    let verdicts = replay(&mut f);
    assert!(
        matches!(verdicts[0], Verdict::ToInternet { .. }),
        "{verdicts:?}"
    );
    assert!(
        matches!(
            verdicts[1],
            Verdict::Refuse {
                reason: Reason::DestinationDenied,
                ..
            }
        ),
        "serial 1 does not allow it: {verdicts:?}"
    );
    // The node keeps announcing serial 2: decided under serial 1 at once, refetch still asked
    // (the fetcher rate-limits it).
    let _ = f.tier2.drain_refetch().count();
    let (v, _, _) = f.send(NODE, opt, &syn(45102, API, 443));
    assert!(matches!(v, Verdict::ToInternet { .. }), "{v:?}");
    assert_eq!(f.tier2.drain_refetch().count(), 1);
    assert_eq!(f.tier2.held(), (0, 0));
    // A serial beyond the one that failed is held again.
    let (v, _, _) = f.send(NODE, opt_serial(&f, 3), &syn(45103, API, 443));
    assert!(matches!(v, Verdict::Held { .. }), "{v:?}");
}

#[test]
fn a_declined_refetch_releases_the_held_packets_at_once() {
    let mut f = Fixture::new();
    bind_api(&mut f);
    let opt = opt_serial(&f, 2);
    assert!(matches!(
        f.send(NODE, opt, &syn(45200, API, 443)).0,
        Verdict::Held { .. }
    ));
    let _ = f.tier2.drain_refetch().count();
    f.tier2.refetch_declined(opt.job_key);
    assert!(f.tier2.has_released());
    let verdicts = replay(&mut f);
    assert!(
        matches!(verdicts[..], [Verdict::ToInternet { .. }]),
        "{verdicts:?}"
    );
    let (v, _, _) = f.send(NODE, opt, &syn(45201, API, 443));
    assert!(
        matches!(v, Verdict::ToInternet { .. }),
        "not held again: {v:?}"
    );
}

#[test]
fn a_flood_announcing_a_newer_serial_is_bounded_by_the_hold_queue_and_counted() {
    let mut f = Fixture::new();
    bind_api(&mut f);
    let job_packets = Tier2Config::new(PROXY, vec![NODE], vec![EGRESS])
        .hold
        .job_packets;
    let opt = opt_serial(&f, 2);
    let (mut held, mut full) = (0u32, 0u64);
    for p in 0..5000u16 {
        match f.send(NODE, opt, &syn(10000 + p, API, 443)).0 {
            Verdict::Held { .. } => held += 1,
            Verdict::Drop(Reason::HoldQueueFull) => full += 1,
            v => panic!("{v:?}"),
        }
    }
    assert_eq!(held, job_packets);
    assert_eq!(f.tier2.held().0, job_packets);
    assert_eq!(full, 5000 - u64::from(job_packets));
    assert_eq!(f.tier2.drops()[Reason::HoldQueueFull.code() as usize], full);
    assert_eq!(
        f.tier2.drain_refetch().count(),
        1,
        "one refetch for the flood"
    );
    // Another job of the node is not held behind it.
    let (key, bundle) = key();
    f.policies.insert(policy(
        &ACME.replace("job-1", "job-2"),
        "jti-acme-00000002",
        1,
        &key,
        &bundle,
    ));
    let other = f.option("jti-acme-00000002");
    let exp = f.mono.saturating_add(Duration::from_secs(300));
    f.tier2
        .bindings_mut()
        .bind(other.job_key, API, "api.example.com", exp);
    assert!(matches!(
        f.send(NODE, other, &syn(9000, API, 443)).0,
        Verdict::ToInternet { .. }
    ));
    f.tier2.policy_ready(opt.job_key);
    assert_eq!(replay(&mut f).len(), job_packets as usize);
    assert_eq!(f.tier2.held(), (0, 0));
}

#[test]
fn one_job_hitting_its_destination_cap_does_not_stop_another_tenant() {
    let (key, bundle) = key();
    let capped = r#"
tenant = "acme"
job = "capped"
[[egress]]
host = "api.example.com"
[limits]
max_ports_per_destination = 2
"#;
    let other = r#"
tenant = "globex"
job = "other"
[[egress]]
host = "api.example.com"
"#;
    let mut f = Fixture::new();
    f.policies
        .insert(policy(capped, "jti-capped-000001", 1, &key, &bundle));
    f.policies
        .insert(policy(other, "jti-other-0000001", 1, &key, &bundle));
    let exp = f.mono.saturating_add(Duration::from_secs(300));
    let a = f.option("jti-capped-000001");
    let b = SnasOption {
        tenant_id: snas_policy::identity::tenant_id("globex"),
        job_key: snas_policy::identity::job_key("jti-other-0000001"),
        policy_serial: snas_wire::PolicySerial(1),
    };
    for j in [a.job_key, b.job_key] {
        f.tier2.bindings_mut().bind(j, API, "api.example.com", exp);
    }
    for port in 0..2 {
        assert!(matches!(
            f.send(NODE, a, &syn(46000 + port, API, 443)).0,
            Verdict::ToInternet { .. }
        ));
    }
    let (v, _, refusal) = f.send(NODE, a, &syn(46002, API, 443));
    refused_rst(&v, &refusal, Reason::DestinationPortCap);
    let (v, _, _) = f.send(NODE, b, &syn(46003, API, 443));
    assert!(matches!(v, Verdict::ToInternet { .. }), "{v:?}");
}

#[test]
fn reply_without_a_flow_is_dropped() {
    let mut f = Fixture::new();
    let stray = tcp(&TcpSpec {
        src: SocketAddr::new(API, 443),
        dst: SocketAddr::new(EGRESS, 5555),
        seq: 1,
        ack: 1,
        flags: TcpFlags::ACK,
        window: 1,
        payload: &[],
    })
    .unwrap();
    let (v, mut buf) = f.receive(&stray);
    assert_eq!(v, Verdict::Drop(Reason::NoConntrack));
    // No headroom for the overlay header: refused as malformed, never a panic.
    let (now, n) = (f.now(), buf.len());
    assert_eq!(
        f.tier2.from_internet(&mut buf, 0..n, now),
        Verdict::Drop(Reason::Malformed)
    );
}

/// A "whole internet" policy: every address, every port, both protocols, private ranges too.
const WIDE: &str = r#"
tenant = "acme"
job = "wide"
[[egress]]
cidr = "0.0.0.0/0"
ports = "0"
protocol = "any"
allow_private = true
[[egress]]
cidr = "::/0"
ports = "0"
protocol = "any"
allow_private = true
[[egress]]
host = "api.example.com:0"
protocol = "any"
[limits]
max_connections = 1000
new_connections_per_sec = 1000
new_connections_burst = 1000
"#;

/// A configured management network (in addition to what the engine knows itself).
const MGMT: &str = "198.51.100.192/26";

fn wide_fixture() -> (Fixture, SnasOption) {
    let (key, bundle) = key();
    let mut f = Fixture::new();
    let mut cfg = Tier2Config::new(PROXY, vec![NODE, OTHER_NODE], vec![EGRESS]);
    cfg.infrastructure.push(MGMT.parse().unwrap());
    f.tier2 = Tier2::new(cfg, Nanos::ZERO).unwrap();
    let infra: Vec<ipnet::IpNet> = f.tier2.infrastructure().nets().to_vec();
    let now = SystemTime::UNIX_EPOCH + Duration::from_secs(T0);
    let token = sign(
        &parse_policy(WIDE).unwrap().to_claims(
            "jti-wide-00000001",
            snas_wire::PolicySerial(1),
            now,
        ),
        &key,
    )
    .unwrap();
    f.policies.insert(JobPolicy::from_verified(
        &verify(&token, &bundle, now).unwrap(),
        &infra,
    ));
    let opt = f.option("jti-wide-00000001");
    (f, opt)
}

#[test]
fn a_wide_policy_reaches_no_infrastructure_address() {
    let (mut f, opt) = wide_fixture();
    let job = opt.job_key;
    // The policy really is wide: a public address and a private one are allowed.
    for (i, dst) in [API, IpAddr::V4(Ipv4Addr::new(10, 1, 2, 3))]
        .into_iter()
        .enumerate()
    {
        let (v, _, _) = f.send(NODE, opt, &syn(30000 + i as u16, dst, 9090));
        assert!(matches!(v, Verdict::ToInternet { .. }), "{dst}: {v:?}");
    }
    let before = f.tier2.conntrack().live_flows_of_job(job);
    let infra: [IpAddr; 7] = [
        IpAddr::V4(PROXY),                     // the proxy's underlay address
        IpAddr::V4(NODE),                      // a node
        IpAddr::V4(OTHER_NODE),                // another node
        EGRESS,                                // the egress pool
        "198.51.100.200".parse().unwrap(),     // the configured management network
        "169.254.169.254".parse().unwrap(),    // cloud metadata
        "::ffff:192.0.2.100".parse().unwrap(), // the proxy, IPv4-mapped
    ];
    f.tier2.drain_audit().for_each(drop);
    for (i, dst) in infra.into_iter().enumerate() {
        for port in [9090u16, GENEVE_PORT, 5353, 22] {
            let sport = 31000 + (i as u16) * 10 + port % 10;
            let pkt = if dst.is_ipv6() {
                tcp(&TcpSpec {
                    src: SocketAddr::new("2001:db8:5::2".parse().unwrap(), sport),
                    dst: SocketAddr::new(dst, port),
                    seq: 1000,
                    ack: 0,
                    flags: TcpFlags::SYN,
                    window: 65535,
                    payload: &[],
                })
                .unwrap()
            } else {
                syn(sport, dst, port)
            };
            let (v, _, refusal) = if dst.is_ipv6() {
                f.send_v6(NODE, opt, &pkt)
            } else {
                f.send(NODE, opt, &pkt)
            };
            let Verdict::Refuse {
                reason, reply_len, ..
            } = v
            else {
                panic!("{dst}:{port}: {v:?}")
            };
            assert_eq!(reason, Reason::InfrastructureDenied, "{dst}:{port}");
            let g = parse_payload(&refusal[..reply_len]).unwrap();
            let inner = IpPacket::parse(&refusal[g.inner_offset..reply_len]).unwrap();
            let Ok(Transport::Tcp(t)) = inner.transport() else {
                panic!("{dst}:{port}: refusal is not TCP")
            };
            assert!(t.flags().contains(TcpFlags::RST), "{dst}:{port}");
            assert_eq!((inner.src(), t.src_port()), (dst, port), "as if from {dst}");
        }
    }
    assert_eq!(
        f.tier2.conntrack().live_flows_of_job(job),
        before,
        "no flow was opened to infrastructure"
    );
    let audit: Vec<_> = decisions(&mut f);
    assert_eq!(audit.len(), infra.len() * 4);
    assert!(audit
        .iter()
        .all(|r| r.action == Action::Deny && r.reason == Some(Reason::InfrastructureDenied)));
    assert_eq!(
        f.tier2.drops()[Reason::InfrastructureDenied.code() as usize],
        (infra.len() * 4) as u64
    );
}

#[test]
fn udp_to_infrastructure_gets_admin_prohibited() {
    let (mut f, opt) = wide_fixture();
    let (v, _, refusal) = f.send(NODE, opt, &udp_to(5000, IpAddr::V4(PROXY), 5353));
    let Verdict::Refuse {
        reason, reply_len, ..
    } = v
    else {
        panic!("{v:?}")
    };
    assert_eq!(reason, Reason::InfrastructureDenied);
    let g = parse_payload(&refusal[..reply_len]).unwrap();
    let inner = IpPacket::parse(&refusal[g.inner_offset..reply_len]).unwrap();
    let Ok(Transport::Icmp(m)) = inner.transport() else {
        panic!("not ICMP")
    };
    assert_eq!(
        (m.msg_type(), m.code()),
        (3, 13),
        "administratively prohibited"
    );
}

#[test]
fn a_name_bound_to_an_infrastructure_address_is_refused_too() {
    // DNS rebinding: an allowed name whose answer is the proxy's own address.
    let (mut f, opt) = wide_fixture();
    let exp = f.mono.saturating_add(Duration::from_secs(300));
    f.tier2
        .bindings_mut()
        .bind(opt.job_key, IpAddr::V4(PROXY), "api.example.com", exp);
    let (v, _, _) = f.send(NODE, opt, &syn(32000, IpAddr::V4(PROXY), 9090));
    assert!(
        matches!(
            v,
            Verdict::Refuse {
                reason: Reason::InfrastructureDenied,
                ..
            }
        ),
        "{v:?}"
    );
}

#[test]
fn policies_are_compiled_with_the_infrastructure_set() {
    let (f, opt) = wide_fixture();
    let PolicyLookup::Ready(p) = f.policies.lookup(opt.job_key) else {
        panic!("no policy")
    };
    let mgmt: IpAddr = "198.51.100.200".parse().unwrap();
    assert_eq!(
        p.matcher
            .check_ip(mgmt, 22, snas_policy::rules::Transport::Tcp),
        snas_policy::matcher::Decision::Deny(snas_policy::matcher::DenyReason::Infrastructure),
        "the matcher alone denies it as well, with infrastructure's own reason"
    );
    assert!(p
        .matcher
        .check_ip(API, 22, snas_policy::rules::Transport::Tcp)
        .is_allow());
}

// ---------------------------------------------------------------------------------------------
// Expiry and the end of a job.

fn seg(sport: u16, seq: u32, ack: u32, flags: TcpFlags, payload: &[u8]) -> Vec<u8> {
    tcp(&TcpSpec {
        src: SocketAddr::new(SANDBOX, sport),
        dst: SocketAddr::new(API, 443),
        seq,
        ack,
        flags,
        window: 65535,
        payload,
    })
    .unwrap()
}

/// The RST a refusal carries: (seq, ack, flags).
fn rst_fields(v: &Verdict, refusal: &[u8], want: Reason) -> (u32, u32, TcpFlags) {
    let Verdict::Refuse {
        reason, reply_len, ..
    } = v
    else {
        panic!("expected Refuse({want:?}), got {v:?}")
    };
    assert_eq!(*reason, want);
    let g = parse_payload(&refusal[..*reply_len]).unwrap();
    let inner = IpPacket::parse(&refusal[g.inner_offset..*reply_len]).unwrap();
    assert_eq!((inner.src(), inner.dst()), (API, SANDBOX));
    let Ok(Transport::Tcp(t)) = inner.transport() else {
        panic!("not TCP")
    };
    assert!(t.checksum_ok(inner.src(), inner.dst()));
    (t.seq(), t.ack(), t.flags())
}

/// Opens a TCP flow from `sport` (answered, so established) and returns its egress port.
fn open_tcp(f: &mut Fixture, sport: u16) -> u16 {
    let (v, payload, _) = f.send(NODE, f.option("acme"), &syn(sport, API, 443));
    let Verdict::ToInternet { range, .. } = v else {
        panic!("{v:?}")
    };
    let port = IpPacket::parse(&payload[range])
        .unwrap()
        .flow_tuple()
        .unwrap()
        .src_port;
    assert!(matches!(
        f.receive(&synack_to(port)).0,
        Verdict::ToNode { .. }
    ));
    port
}

fn flow_ends(f: &mut Fixture) -> Vec<FlowEndRecord> {
    f.tier2
        .drain_audit()
        .filter_map(|e| match e {
            AuditEvent::FlowEnd(r) => Some(r),
            _ => None,
        })
        .collect()
}

const TTL: Duration = Duration::from_secs(3600); // the signer's default lifetime

#[test]
fn at_exp_every_segment_gets_an_rfc793_reset_and_udp_an_unreachable() {
    let mut f = Fixture::new();
    bind_api(&mut f);
    let job = f.option("acme").job_key;
    open_tcp(&mut f, 40020);
    // The fixture starts at 1 s: this is `exp`, with the flow just below its idle timeout.
    f.advance(TTL - Duration::from_secs(1));
    let opt = f.option("acme");

    // A segment with ACK: <SEQ=SEG.ACK><CTL=RST>.
    let (v, _, refusal) = f.send(NODE, opt, &seg(40020, 1001, 5001, TcpFlags::ACK, b"GET /"));
    assert_eq!(
        rst_fields(&v, &refusal, Reason::PolicyExpired),
        (5001, 0, TcpFlags::RST)
    );
    // Without ACK: <SEQ=0><ACK=SEG.SEQ+SEG.LEN><CTL=RST,ACK> (a SYN counts one).
    let (v, _, refusal) = f.send(NODE, opt, &syn(40021, API, 443));
    assert_eq!(
        rst_fields(&v, &refusal, Reason::PolicyExpired),
        (0, 1001, TcpFlags::RST | TcpFlags::ACK)
    );
    let (v, _, refusal) = f.send(NODE, opt, &seg(40022, 7000, 0, TcpFlags::PSH, b"abc"));
    assert_eq!(
        rst_fields(&v, &refusal, Reason::PolicyExpired),
        (0, 7003, TcpFlags::RST | TcpFlags::ACK)
    );
    // A RST is never answered, but still not forwarded.
    let (v, _, _) = f.send(NODE, opt, &seg(40020, 1001, 0, TcpFlags::RST, &[]));
    assert_eq!(v, Verdict::Drop(Reason::PolicyExpired));
    // UDP: ICMP administratively prohibited.
    let dst = IpAddr::V4(Ipv4Addr::new(198, 51, 100, 200));
    let (v, _, refusal) = f.send(NODE, opt, &udp_to(5000, dst, 53));
    let Verdict::Refuse {
        reason: Reason::PolicyExpired,
        reply_len,
        ..
    } = v
    else {
        panic!("{v:?}")
    };
    let g = parse_payload(&refusal[..reply_len]).unwrap();
    let inner = IpPacket::parse(&refusal[g.inner_offset..reply_len]).unwrap();
    let Ok(Transport::Icmp(m)) = inner.transport() else {
        panic!("not ICMP")
    };
    assert_eq!((m.msg_type(), m.code(), inner.dst()), (3, 13, SANDBOX));

    // At the next tick the job's flow is gone, its port quarantined (not live), its end
    // audited.
    assert!(f.tier2.is_ending(job));
    let now = f.now();
    assert_eq!(f.tier2.tick(&f.policies, now), 1);
    assert_eq!(f.tier2.conntrack().live_flows_of_job(job), 0);
    let usage = f.tier2.conntrack().nat().job_usage(job);
    assert_eq!((usage.live, usage.held), (0, 1));
    let audit: Vec<AuditEvent> = f.tier2.drain_audit().collect();
    let ends: Vec<_> = audit
        .iter()
        .filter_map(|e| match e {
            AuditEvent::FlowEnd(r) => Some(r),
            _ => None,
        })
        .collect();
    assert_eq!(ends.len(), 1);
    assert_eq!(ends[0].end, FlowEnd::PolicyExpired);
    assert_eq!((ends[0].src.1, &*ends[0].job), (40020, "job-1"));
    let refusals = audit
        .iter()
        .filter(|e| {
            matches!(e, AuditEvent::Decision(r)
                if r.reason == Some(Reason::PolicyExpired) && r.action == Action::Refuse)
        })
        .count();
    assert_eq!(
        refusals, 5,
        "each refused packet is audited (within the job's budget)"
    );
    assert_eq!(f.tier2.drops()[Reason::PolicyExpired.code() as usize], 5);
}

#[test]
fn an_expired_jobs_flows_and_ports_are_freed_within_a_second_without_traffic() {
    let mut f = Fixture::new();
    bind_api(&mut f);
    let job = f.option("acme").job_key;
    for p in 0..3 {
        open_tcp(&mut f, 40030 + p);
    }
    let now = f.now();
    f.tier2.tick(&f.policies, now);
    assert_eq!(f.tier2.conntrack().live_flows_of_job(job), 3);
    // The fixture starts at 1 s, so `exp` is at 3600 s on its clock; the flows (established,
    // idle timeout 1 h) stay below their idle timeout throughout.
    f.advance(TTL - Duration::from_millis(1500));
    let now = f.now();
    f.tier2.tick(&f.policies, now);
    assert_eq!(f.tier2.conntrack().live_flows_of_job(job), 3, "not yet");
    f.advance(Duration::from_secs(1));
    let now = f.now();
    assert_eq!(f.tier2.tick(&f.policies, now), 3);
    assert_eq!(f.tier2.conntrack().live_flows_of_job(job), 0);
    assert_eq!(f.tier2.conntrack().nat().job_usage(job).live, 0);
    let ends = flow_ends(&mut f);
    assert_eq!(ends.len(), 3);
    assert!(ends.iter().all(|e| e.end == FlowEnd::PolicyExpired));
}

#[test]
fn a_renewed_policy_keeps_the_flows_past_the_old_exp() {
    let mut f = Fixture::new();
    bind_api(&mut f);
    let job = f.option("acme").job_key;
    open_tcp(&mut f, 40040);
    // The renewal (same job, serial 2) is signed half an hour later: it expires later.
    f.advance(TTL / 2);
    let toml = ACME;
    let now = SystemTime::UNIX_EPOCH + Duration::from_secs(T0) + TTL / 2;
    let token = sign(
        &parse_policy(toml).unwrap().to_claims(
            "jti-acme-00000001",
            snas_wire::PolicySerial(2),
            now,
        ),
        &f.key,
    )
    .unwrap();
    f.policies.insert(JobPolicy::from_verified(
        &verify(&token, &f.bundle, now).unwrap(),
        &[],
    ));
    let (v, _, _) = f.send(
        NODE,
        f.option("acme"),
        &seg(40040, 1001, 5001, TcpFlags::ACK, b"x"),
    );
    assert!(matches!(v, Verdict::ToInternet { .. }), "{v:?}");
    f.advance(TTL / 2 + Duration::from_secs(5));
    let now = f.now();
    f.tier2.tick(&f.policies, now);
    assert_eq!(f.tier2.conntrack().live_flows_of_job(job), 1);
    let (v, _, _) = f.send(
        NODE,
        f.option("acme"),
        &seg(40040, 1001, 5001, TcpFlags::ACK, b"x"),
    );
    assert!(matches!(v, Verdict::ToInternet { .. }), "{v:?}");
}

#[test]
fn remove_job_ends_flows_frees_ports_and_forgets_the_jobs_state() {
    let mut f = Fixture::new();
    bind_api(&mut f);
    let job = f.option("acme").job_key;
    for p in 0..3 {
        open_tcp(&mut f, 40050 + p);
    }
    assert!(f.tier2.knows_job(job));
    assert_eq!(f.tier2.job_node(job), Some(NODE));
    f.tier2.drain_audit().for_each(drop);
    let now = f.now();
    assert_eq!(f.tier2.remove_job(job, FlowEnd::JobEnded, now), 3);
    assert!(!f.tier2.knows_job(job));
    let usage = f.tier2.conntrack().nat().job_usage(job);
    assert_eq!((usage.live, usage.held), (0, 3), "ports quarantined");
    assert_eq!(f.tier2.conntrack().open_connections_of_job(job), 0);
    let ends = flow_ends(&mut f);
    assert_eq!(ends.len(), 3);
    assert!(ends.iter().all(|e| e.end == FlowEnd::JobEnded));
    // Its bindings went with it: the same SYN is now decided without the name.
    let (v, _, _) = f.send(NODE, f.option("acme"), &syn(40060, API, 443));
    assert!(
        matches!(
            v,
            Verdict::Refuse {
                reason: Reason::DestinationDenied,
                ..
            }
        ),
        "{v:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// Flow ends with real counters.

#[test]
fn a_flow_end_carries_packets_and_bytes_each_way_and_its_duration() {
    let mut f = Fixture::new();
    bind_api(&mut f);
    let opt = f.option("acme");
    let syn_pkt = syn(40070, API, 443);
    let port = open_tcp(&mut f, 40070); // SYN out (40 B), SYN-ACK in (40 B)
    let mut out_bytes = syn_pkt.len() as u64;
    let mut in_bytes = synack_to(port).len() as u64;
    for i in 0..10u32 {
        f.advance(Duration::from_millis(100));
        let up = seg(40070, 1001 + i * 1000, 5001, TcpFlags::ACK, &[7u8; 1000]);
        out_bytes += up.len() as u64;
        assert!(matches!(
            f.send(NODE, opt, &up).0,
            Verdict::ToInternet { .. }
        ));
        let down = tcp(&TcpSpec {
            src: SocketAddr::new(API, 443),
            dst: SocketAddr::new(EGRESS, port),
            seq: 5001,
            ack: 2001 + i * 1000,
            flags: TcpFlags::ACK,
            window: 65535,
            payload: &[1u8; 100],
        })
        .unwrap();
        in_bytes += down.len() as u64;
        assert!(matches!(f.receive(&down).0, Verdict::ToNode { .. }));
    }
    // FIN both ways, then the closed timeout (30 s).
    let fin = seg(40070, 11001, 5101, TcpFlags::FIN | TcpFlags::ACK, &[]);
    out_bytes += fin.len() as u64;
    f.send(NODE, opt, &fin);
    let fin_back = tcp(&TcpSpec {
        src: SocketAddr::new(API, 443),
        dst: SocketAddr::new(EGRESS, port),
        seq: 5101,
        ack: 11002,
        flags: TcpFlags::FIN | TcpFlags::ACK,
        window: 65535,
        payload: &[],
    })
    .unwrap();
    in_bytes += fin_back.len() as u64;
    f.receive(&fin_back);
    let listed = f.tier2.conntrack().iter().next().unwrap().1;
    assert_eq!(listed.counters.bytes_out, out_bytes, "live counters");
    f.tier2.drain_audit().for_each(drop);
    f.advance(Duration::from_secs(32));
    let now = f.now();
    f.tier2.tick(&f.policies, now);
    let ends = flow_ends(&mut f);
    assert_eq!(ends.len(), 1);
    let e = &ends[0];
    assert_eq!(e.end, FlowEnd::Closed);
    assert_eq!(
        (e.counters.packets_out, e.counters.packets_in),
        (12, 12),
        "SYN + 10 data + FIN each way (SYN-ACK and FIN back)"
    );
    assert_eq!(
        (e.counters.bytes_out, e.counters.bytes_in),
        (out_bytes, in_bytes)
    );
    assert_eq!(e.duration, Duration::from_secs(1));
    assert_eq!(e.hostname.as_deref(), Some("api.example.com"));
    assert_eq!(e.egress, (EGRESS, port));
}

#[test]
fn an_idle_udp_flow_ends_as_idle() {
    let mut f = Fixture::new();
    let dst = IpAddr::V4(Ipv4Addr::new(198, 51, 100, 200));
    let pkt = udp_to(5000, dst, 53);
    for _ in 0..3 {
        assert!(matches!(
            f.send(NODE, f.option("acme"), &pkt).0,
            Verdict::ToInternet { .. }
        ));
    }
    f.advance(Duration::from_secs(31));
    let now = f.now();
    f.tier2.tick(&f.policies, now);
    let ends = flow_ends(&mut f);
    assert_eq!(ends.len(), 1);
    assert_eq!(ends[0].end, FlowEnd::Idle);
    assert_eq!(ends[0].counters.packets_out, 3);
    assert_eq!(ends[0].counters.bytes_out, 3 * pkt.len() as u64);
    assert_eq!(ends[0].counters.packets_in, 0);
}

// ---------------------------------------------------------------------------------------------
// First packets are held.

#[test]
fn first_packets_are_held_then_processed_in_order_when_the_policy_arrives() {
    let (key, bundle) = key();
    let mut f = Fixture::new();
    let jti = "jti-fresh-0000001";
    let opt = f.option(jti);
    let exp = f.mono.saturating_add(Duration::from_secs(300));
    f.tier2
        .bindings_mut()
        .bind(opt.job_key, API, "api.example.com", exp);
    // A SYN and a UDP datagram arrive before the policy (which allows 3 connections).
    let first = [
        syn(41000, API, 443),
        udp_to(5000, IpAddr::V4(Ipv4Addr::new(198, 51, 100, 200)), 53),
    ];
    for p in &first {
        let (v, _, _) = f.send(NODE, opt, p);
        assert_eq!(
            v,
            Verdict::Held {
                job_key: opt.job_key,
                node: NODE,
                fetch: true,
            }
        );
    }
    assert_eq!(f.tier2.held().0, 2);
    let mut out = Vec::new();
    assert_eq!(
        f.tier2.take_released(&mut out, 100),
        0,
        "not before the policy"
    );

    // The policy is stored, and a packet arrives before the caller released the held ones:
    // it waits behind them, and asks for no second fetch.
    f.policies.insert(policy(
        &ACME.replace("job-1", "fresh"),
        jti,
        1,
        &key,
        &bundle,
    ));
    let late = udp_to(5002, IpAddr::V4(Ipv4Addr::new(198, 51, 100, 200)), 53);
    assert_eq!(
        f.send(NODE, opt, &late).0,
        Verdict::Held {
            job_key: opt.job_key,
            node: NODE,
            fetch: false,
        }
    );
    assert!(f.tier2.has_released(), "it made the job ready");
    f.tier2.policy_ready(opt.job_key);
    // Released in two rounds (the caller's batch is smaller than what is held): the second
    // round's packets still come out after the first's.
    let mut dports = Vec::new();
    for limit in [2, 100] {
        out.clear();
        f.tier2.take_released(&mut out, limit);
        for h in &mut out {
            assert_eq!(h.node, NODE);
            let mut refusal = vec![0u8; 2048];
            let now = f.now();
            let v = f
                .tier2
                .from_node_released(&f.policies, h, &mut refusal, now);
            let Verdict::ToInternet { range, .. } = v else {
                panic!("{v:?}")
            };
            let t = IpPacket::parse(&h.payload[range])
                .unwrap()
                .flow_tuple()
                .unwrap();
            assert_eq!(t.src, EGRESS, "NATed");
            dports.push(t.dst_port);
        }
    }
    assert_eq!(f.tier2.held(), (0, 0));
    assert_eq!(dports, [443, 53, 53], "in arrival order");
    assert_eq!(f.tier2.conntrack().live_flows_of_job(opt.job_key), 3);
}

#[test]
fn a_failed_fetch_drops_the_held_packets_with_its_reason() {
    let mut f = Fixture::new();
    let opt = f.option("jti-nobody-000001");
    for p in 0..5 {
        assert!(matches!(
            f.send(NODE, opt, &syn(42000 + p, API, 443)).0,
            Verdict::Held { .. }
        ));
    }
    assert_eq!(f.tier2.policy_failed(opt.job_key, Reason::NodeMismatch), 5);
    assert_eq!(f.tier2.drops()[Reason::NodeMismatch.code() as usize], 5);
    assert_eq!(f.tier2.held(), (0, 0));
    assert!(!f.tier2.has_released());
}

#[test]
fn held_packets_never_outlive_the_fetch_timeout() {
    let mut f = Fixture::new();
    let max_wait = Tier2Config::new(PROXY, vec![NODE], vec![EGRESS])
        .hold
        .max_wait;
    let opt = f.option("jti-slow-00000001");
    f.send(NODE, opt, &syn(42100, API, 443));
    f.advance(max_wait - Duration::from_millis(1));
    f.send(NODE, opt, &syn(42101, API, 443));
    let now = f.now();
    f.tier2.tick(&f.policies, now);
    assert_eq!(f.tier2.held().0, 2);
    f.advance(Duration::from_millis(1));
    let now = f.now();
    f.tier2.tick(&f.policies, now);
    assert_eq!(f.tier2.held(), (0, 0));
    assert_eq!(f.tier2.drops()[Reason::UnknownJob.code() as usize], 2);
}

#[test]
fn one_jobs_flood_fills_only_its_share_of_the_hold_queue() {
    let mut f = Fixture::new();
    let flood = f.option("jti-flood-0000001");
    let other = f.option("jti-other-0000002");
    let (mut held, mut full) = (0, 0);
    for p in 0..1000u16 {
        match f.send(NODE, flood, &syn(p + 1024, API, 443)).0 {
            Verdict::Held { .. } => held += 1,
            Verdict::Drop(Reason::HoldQueueFull) => full += 1,
            v => panic!("{v:?}"),
        }
    }
    let per_job = Tier2Config::new(PROXY, vec![NODE], vec![EGRESS])
        .hold
        .job_packets;
    assert_eq!((held, full), (per_job, 1000 - per_job));
    assert_eq!(
        f.tier2.drops()[Reason::HoldQueueFull.code() as usize],
        u64::from(1000 - per_job)
    );
    assert!(matches!(
        f.send(NODE, other, &syn(40000, API, 443)).0,
        Verdict::Held { .. }
    ));
}

// ---------------------------------------------------------------------------------------------
// Audit budget.

#[test]
fn a_jobs_audit_lines_beyond_its_budget_are_suppressed_and_its_next_line_says_how_many() {
    let (key, bundle) = key();
    let mut cfg = Tier2Config::new(PROXY, vec![NODE, OTHER_NODE], vec![EGRESS]);
    cfg.audit_lines_per_sec = 10;
    let mut f = Fixture::new();
    f.tier2 = Tier2::new(cfg, Nanos::ZERO).unwrap();
    f.policies.insert(policy(
        &ACME
            .replace("acme", "globex")
            .replace("node = \"192.0.2.7\"\n", ""),
        "jti-quiet-0000001",
        1,
        &key,
        &bundle,
    ));
    let quiet = SnasOption {
        tenant_id: snas_policy::identity::tenant_id("globex"),
        job_key: snas_policy::identity::job_key("jti-quiet-0000001"),
        policy_serial: snas_wire::PolicySerial(1),
    };
    // 1000 denied SYNs from one job: 20 lines (burst = 2 × rate), 980 suppressed.
    for p in 0..1000u16 {
        f.send(NODE, f.option("acme"), &syn(p + 1024, UNBOUND, 443));
    }
    let lines = decisions(&mut f);
    assert_eq!(lines.len(), 20);
    assert!(lines.iter().all(|r| r.suppressed == 0));
    assert_eq!(f.tier2.audit_suppressed(), 980);
    assert_eq!(
        f.tier2.drops()[Reason::DestinationDenied.code() as usize],
        1000,
        "every refusal is still counted"
    );
    // Another tenant's job is not affected.
    f.send(NODE, quiet, &syn(2000, UNBOUND, 443));
    assert_eq!(decisions(&mut f).len(), 1);
    // A tenth of a second later the job has one line again, carrying the count.
    f.advance(Duration::from_millis(100));
    f.send(NODE, f.option("acme"), &syn(3000, UNBOUND, 443));
    let lines = decisions(&mut f);
    assert_eq!(lines.len(), 1);
    assert_eq!(lines[0].suppressed, 980);
}

#[test]
fn a_jobs_denied_packets_are_counted_under_its_tenant_and_forged_ones_under_unknown() {
    use snas_proxy::drops::DropTenant;
    let mut f = Fixture::new();
    let acme = DropTenant::Tenant(snas_policy::identity::tenant_id("acme"));
    let at =
        |f: &Fixture, who: DropTenant, r: Reason| f.tier2.drop_tally().of(who)[r.code() as usize];
    // A user's job trying a thousand destinations its policy does not allow.
    for i in 0..1000u16 {
        let dst = IpAddr::V4(Ipv4Addr::new(203, 0, 113, 100 + (i % 100) as u8));
        let (v, _, _) = f.send(NODE, f.option("acme"), &syn(20_000 + i, dst, 443));
        assert!(
            matches!(
                v,
                Verdict::Refuse {
                    reason: Reason::DestinationDenied,
                    ..
                }
            ),
            "{v:?}"
        );
    }
    assert_eq!(at(&f, acme, Reason::DestinationDenied), 1000);
    assert_eq!(at(&f, DropTenant::Unknown, Reason::DestinationDenied), 0);

    // Forged traffic naming acme's tenant (and a thousand made-up tenants) before anything is
    // verified: `unknown`, and no series of its own for any made-up tenant.
    let pkt = syn(40010, API, 443);
    for t in 0..1000u32 {
        let mut opt = f.option("acme");
        opt.tenant_id = snas_wire::TenantId(t);
        let (v, _, _) = f.send(Ipv4Addr::new(192, 0, 2, 66), opt, &pkt);
        assert_eq!(v, Verdict::Drop(Reason::UntrustedSource));
        let (v, _, _) = f.send(NODE, opt, &pkt);
        assert_eq!(v, Verdict::Drop(Reason::GeneveUnknownJob), "tenant {t}");
    }
    assert_eq!(at(&f, DropTenant::Unknown, Reason::UntrustedSource), 1000);
    assert_eq!(at(&f, DropTenant::Unknown, Reason::GeneveUnknownJob), 1000);
    assert_eq!(at(&f, acme, Reason::UntrustedSource), 0);
    assert_eq!(
        f.tier2.drop_tally().series().count(),
        3,
        "unknown, other and acme only"
    );
    // The per-reason totals are the sums over tenants.
    assert_eq!(
        f.tier2.drops()[Reason::DestinationDenied.code() as usize],
        1000
    );
}

/// A job with deny rules, in `mode` (`enforce` or `audit`), keyed `jti-deny-0000000N`.
fn deny_fixture(mode: &str) -> (Fixture, SnasOption) {
    let (key, bundle) = key();
    let mut f = Fixture::new();
    let src = format!(
        r#"
mode = "{mode}"
tenant = "acme"
job = "job-deny"
node = "192.0.2.7"
[[egress]]
host = "*.example.com:0"
[[egress]]
cidr = "203.0.113.0/24"
ports = "0"
[[deny]]
host = "tracker.example.com:0"
[[deny]]
cidr = "203.0.113.64/26"
ports = "0"
protocol = "any"
[limits]
max_connections = 2
"#
    );
    let jti = format!("jti-deny-{mode:0>8}");
    f.policies.insert(policy(&src, &jti, 1, &f.key, &f.bundle));
    let _ = (key, bundle);
    let opt = f.option(&jti);
    (f, opt)
}

const DENIED_NET: IpAddr = IpAddr::V4(Ipv4Addr::new(203, 0, 113, 70));
const ELSEWHERE: IpAddr = IpAddr::V4(Ipv4Addr::new(198, 51, 100, 9));

#[test]
fn a_deny_rule_refuses_what_an_allow_rule_covers_and_the_audit_names_it() {
    let (mut f, opt) = deny_fixture("enforce");
    let job = opt.job_key;
    let exp = f.mono.saturating_add(Duration::from_secs(300));
    // Allowed by the cidr rule, denied by deny rule 1 whatever name it is reached through.
    f.tier2
        .bindings_mut()
        .bind(job, DENIED_NET, "www.example.com", exp);
    let (v, _, refusal) = f.send(NODE, opt, &syn(41000, DENIED_NET, 443));
    refused_rst(&v, &refusal, Reason::DenyRule);
    let a = decisions(&mut f);
    assert_eq!(
        (a[0].action, a[0].reason, a[0].rule),
        (Action::Deny, Some(Reason::DenyRule), Some(1))
    );
    // A denied name: deny rule 0. Its address stays open to an allowed name bound to it.
    f.tier2
        .bindings_mut()
        .bind(job, API, "tracker.example.com", exp);
    let (v, _, refusal) = f.send(NODE, opt, &syn(41001, API, 443));
    refused_rst(&v, &refusal, Reason::DenyRule);
    assert_eq!(decisions(&mut f)[0].rule, Some(0));
    f.tier2
        .bindings_mut()
        .bind(job, API, "api.example.com", exp);
    let (v, _, _) = f.send(NODE, opt, &syn(41002, API, 443));
    assert!(matches!(v, Verdict::ToInternet { .. }), "{v:?}");
    assert_eq!(f.tier2.drops()[Reason::DenyRule.code() as usize], 2);
}

#[test]
fn audit_mode_lets_public_destinations_through_as_would_deny_but_not_deny_rules_or_private() {
    let (mut f, opt) = deny_fixture("audit");
    // Outside every rule, public: through, NATed, audited would_deny.
    let (v, _, _) = f.send(NODE, opt, &syn(42000, ELSEWHERE, 8080));
    assert!(matches!(v, Verdict::ToInternet { .. }), "{v:?}");
    let a = decisions(&mut f);
    assert_eq!(
        (a[0].action, a[0].reason),
        (Action::WouldDeny, Some(Reason::DestinationDenied))
    );
    assert!(a[0].egress.is_some());
    // Allowed by a rule: a plain allow.
    let (v, _, _) = f.send(NODE, opt, &syn(42001, API, 22));
    assert!(matches!(v, Verdict::ToInternet { .. }), "{v:?}");
    assert_eq!(decisions(&mut f)[0].action, Action::Allow);
    // Deny rules, private addresses, metadata and infrastructure stay refused.
    let (v, _, refusal) = f.send(NODE, opt, &syn(42002, DENIED_NET, 443));
    refused_rst(&v, &refusal, Reason::DenyRule);
    for (i, (dst, why)) in [
        ("10.0.0.5", Reason::AlwaysDenied),
        ("169.254.169.254", Reason::InfrastructureDenied),
        ("169.254.1.1", Reason::AlwaysDenied),
        ("192.0.2.100", Reason::InfrastructureDenied),
    ]
    .into_iter()
    .enumerate()
    {
        let dst: IpAddr = dst.parse().unwrap();
        let (v, _, refusal) = f.send(NODE, opt, &syn(42010 + i as u16, dst, 80));
        refused_rst(&v, &refusal, why);
    }
    // Limits still apply: max_connections = 2 (two flows are open).
    let (v, _, refusal) = f.send(NODE, opt, &syn(42020, ELSEWHERE, 8081));
    refused_rst(&v, &refusal, Reason::ConnectionLimit);
}
