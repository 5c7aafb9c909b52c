//! The proxy resolver over real sockets on 127.0.0.0/8 high ports (no privileges): an
//! in-process authoritative upstream (hickory-proto messages), an in-process policy endpoint,
//! and the daemon's control plane (`Daemon::start_control_plane`). Checks the REFUSED cases,
//! CNAME chains, TTL clamping, TCP fallback both upstream and toward the client, NXDOMAIN and
//! NODATA pass-through, bindings in the engine, the DNS audit line, and the peer binding push.
#![allow(clippy::unwrap_used)]

mod common;

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream, UdpSocket};
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{Keys, PolicyServer};
use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA, CNAME};
use hickory_proto::rr::{Name, RData, Record, RecordType};
use snas_policy::identity::{job_key, tenant_id};
use snas_proxy::config::ProxyConfig;
use snas_proxy::daemon::Daemon;
use snas_proxy::resolver::{job_option, JobIdentity, BINDING_GRACE, DNS_TTL_MAX, DNS_TTL_MIN};

const LOCAL: Ipv4Addr = Ipv4Addr::LOCALHOST;
const JTI: &str = "jti-resolver-000001";
const BIG: usize = 100;

const POLICY: &str = r#"
tenant = "acme"
job = "dns"
node = "127.0.0.1"
[[egress]]
host = "api.example.com"
[[egress]]
host = "www.example.com"
[[egress]]
host = "short.example.com"
[[egress]]
host = "big.example.com"
[[egress]]
host = "nothere.example.com"
[[egress]]
host = "empty.example.com"
"#;

fn name(s: &str) -> Name {
    Name::from_str(s).unwrap()
}

fn a(n: &str, ttl: u32, ip: Ipv4Addr) -> Record {
    Record::from_rdata(name(n), ttl, RData::A(A(ip)))
}

/// The authoritative answers of the test upstream.
fn zone(q: &Query) -> (ResponseCode, Vec<Record>) {
    let n = q.name().to_ascii().to_ascii_lowercase();
    let api = Ipv4Addr::new(203, 0, 113, 10);
    match (n.as_str(), q.query_type()) {
        ("api.example.com.", RecordType::A) => (ResponseCode::NoError, vec![a(&n, 60, api)]),
        ("api.example.com.", RecordType::AAAA) => (
            ResponseCode::NoError,
            vec![Record::from_rdata(
                name(&n),
                60,
                RData::AAAA(AAAA(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x10))),
            )],
        ),
        ("www.example.com.", RecordType::A) => (
            ResponseCode::NoError,
            vec![
                Record::from_rdata(
                    name(&n),
                    3600,
                    RData::CNAME(CNAME(name("alias.example.com."))),
                ),
                Record::from_rdata(
                    name("alias.example.com."),
                    3600,
                    RData::CNAME(CNAME(name("api.example.com."))),
                ),
                a("api.example.com.", 3600, api),
            ],
        ),
        ("short.example.com.", RecordType::A) => (
            ResponseCode::NoError,
            vec![a(&n, 1, Ipv4Addr::new(203, 0, 113, 11))],
        ),
        ("big.example.com.", RecordType::A) => (
            ResponseCode::NoError,
            (0..BIG)
                .map(|i| a(&n, 120, Ipv4Addr::new(203, 0, 113, i as u8)))
                .collect(),
        ),
        ("empty.example.com.", _) | ("api.example.com.", _) => (ResponseCode::NoError, vec![]),
        _ => (ResponseCode::NXDomain, vec![]),
    }
}

fn respond(q: &Message, udp: bool) -> Vec<u8> {
    let mut m = Message::new();
    m.set_id(q.id())
        .set_message_type(MessageType::Response)
        .set_op_code(OpCode::Query)
        .set_authoritative(true)
        .set_recursion_desired(q.recursion_desired());
    m.add_queries(q.queries().iter().cloned());
    let (code, answers) = zone(&q.queries()[0]);
    m.set_response_code(code);
    m.add_answers(answers);
    let bytes = m.to_vec().unwrap();
    let limit = if q.extensions().is_some() {
        usize::from(q.max_payload().max(512))
    } else {
        512
    };
    if udp && bytes.len() > limit {
        m.answers_mut().clear();
        m.set_truncated(true);
        return m.to_vec().unwrap();
    }
    bytes
}

/// The test upstream: UDP and TCP on one port; counts TCP queries.
struct Upstream {
    addr: SocketAddr,
    tcp_queries: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
}

impl Upstream {
    fn start() -> Upstream {
        // A free UDP port may be taken for TCP by another program: try a few ports.
        let (u, t, addr) = (0..64)
            .find_map(|_| {
                let u = UdpSocket::bind((LOCAL, 0)).unwrap();
                let addr = u.local_addr().unwrap();
                let t = std::net::TcpListener::bind(addr).ok()?;
                Some((u, t, addr))
            })
            .expect("no port free for both UDP and TCP on 127.0.0.1");
        t.set_nonblocking(true).unwrap();
        u.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let tcp_queries = Arc::new(AtomicUsize::new(0));
        let s = Arc::clone(&stop);
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while !s.load(Ordering::Relaxed) {
                if let Ok((n, from)) = u.recv_from(&mut buf) {
                    if let Ok(q) = Message::from_vec(&buf[..n]) {
                        let _ = u.send_to(&respond(&q, true), from);
                    }
                }
            }
        });
        let (s, c) = (Arc::clone(&stop), Arc::clone(&tcp_queries));
        std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                let Ok((mut conn, _)) = t.accept() else {
                    std::thread::sleep(Duration::from_millis(5));
                    continue;
                };
                let c = Arc::clone(&c);
                std::thread::spawn(move || {
                    conn.set_nonblocking(false).unwrap();
                    conn.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
                    loop {
                        let mut len = [0u8; 2];
                        if conn.read_exact(&mut len).is_err() {
                            return;
                        }
                        let mut q = vec![0u8; usize::from(u16::from_be_bytes(len))];
                        if conn.read_exact(&mut q).is_err() {
                            return;
                        }
                        c.fetch_add(1, Ordering::SeqCst);
                        let r = respond(&Message::from_vec(&q).unwrap(), false);
                        let _ = conn.write_all(&(r.len() as u16).to_be_bytes());
                        let _ = conn.write_all(&r);
                    }
                });
            }
        });
        Upstream {
            addr,
            tcp_queries,
            stop,
        }
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

struct Harness {
    daemon: Daemon,
    upstream: Upstream,
    _policy: PolicyServer,
    keys: Keys,
}

fn config(keys: &Keys, policy_port: u16, upstream: SocketAddr, extra: &str) -> ProxyConfig {
    let d = keys.dir.path();
    let text = format!(
        r#"
name = "proxy-dns"
underlay_addr = "127.0.0.1"
nodes = ["127.0.0.1"]
agent_policy_port = {policy_port}
trust = "{trust}"
egress_pool = ["198.51.100.64/28"]
tun_name = "unused0"
resolver_listen = "127.0.0.1:0"
upstream_dns = ["{upstream}"]
control_listen = "127.0.0.1:0"
service_listen = "127.0.0.1:0"
audit_log = "{audit}"
state_dir = "{state}"
{extra}
"#,
        trust = keys.trust().display(),
        audit = d.join("audit.jsonl").display(),
        state = d.join("state").display(),
    );
    ProxyConfig::parse(&text, std::path::Path::new("proxy.toml")).unwrap()
}

fn harness() -> Harness {
    let keys = Keys::new();
    let policy = PolicyServer::start(IpAddr::V4(LOCAL));
    policy.serve(job_key(JTI), 200, &keys.token(POLICY, JTI, 1));
    let upstream = Upstream::start();
    let cfg = config(&keys, policy.addr.port(), upstream.addr, "");
    let daemon = Daemon::start_control_plane(cfg).unwrap();
    Harness {
        daemon,
        upstream,
        _policy: policy,
        keys,
    }
}

fn identity() -> JobIdentity {
    JobIdentity {
        tenant_id: tenant_id("acme"),
        job_key: job_key(JTI),
        serial: snas_wire::PolicySerial(1),
    }
}

fn query(n: &str, t: RecordType, id: Option<JobIdentity>) -> Message {
    let mut m = Message::new();
    m.set_id(0x5353)
        .set_message_type(MessageType::Query)
        .set_op_code(OpCode::Query)
        .set_recursion_desired(true);
    m.add_query(Query::query(name(n), t));
    let mut e = Edns::new();
    e.set_max_payload(1232);
    if let Some(id) = id {
        e.options_mut().insert(job_option(id));
    }
    m.set_edns(e);
    m
}

fn ask_udp_from(from: Ipv4Addr, to: SocketAddr, q: &Message) -> Message {
    let s = UdpSocket::bind((from, 0)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.send_to(&q.to_vec().unwrap(), to).unwrap();
    let mut buf = [0u8; 4096];
    let (n, _) = s.recv_from(&mut buf).unwrap();
    Message::from_vec(&buf[..n]).unwrap()
}

fn ask_tcp(to: SocketAddr, q: &Message) -> Message {
    let mut s = TcpStream::connect(to).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let b = q.to_vec().unwrap();
    s.write_all(&(b.len() as u16).to_be_bytes()).unwrap();
    s.write_all(&b).unwrap();
    let mut len = [0u8; 2];
    s.read_exact(&mut len).unwrap();
    let mut r = vec![0u8; usize::from(u16::from_be_bytes(len))];
    s.read_exact(&mut r).unwrap();
    Message::from_vec(&r).unwrap()
}

fn addrs(m: &Message) -> Vec<IpAddr> {
    m.answers()
        .iter()
        .filter_map(|r| match r.data() {
            RData::A(a) => Some(IpAddr::V4(a.0)),
            RData::AAAA(a) => Some(IpAddr::V6(a.0)),
            _ => None,
        })
        .collect()
}

fn bound_names(d: &Daemon, ip: IpAddr) -> Vec<String> {
    let s = d.shared();
    let now = s.clock_now();
    let mut eng = s.engine();
    eng.bindings_mut()
        .names(job_key(JTI), ip, now)
        .map(|n| n.to_string())
        .collect()
}

#[test]
fn queries_without_a_verified_job_or_for_disallowed_names_are_refused() {
    let h = harness();
    let to = h.daemon.resolver_addr();
    let ok = query("api.example.com.", RecordType::A, Some(identity()));

    let no_option = query("api.example.com.", RecordType::A, None);
    assert_eq!(
        ask_udp_from(LOCAL, to, &no_option).response_code(),
        ResponseCode::Refused
    );

    let unknown = JobIdentity {
        job_key: job_key("jti-nobody-0000001"),
        ..identity()
    };
    let q = query("api.example.com.", RecordType::A, Some(unknown));
    assert_eq!(
        ask_udp_from(LOCAL, to, &q).response_code(),
        ResponseCode::Refused
    );

    let other_tenant = JobIdentity {
        tenant_id: tenant_id("globex"),
        ..identity()
    };
    let q = query("api.example.com.", RecordType::A, Some(other_tenant));
    assert_eq!(
        ask_udp_from(LOCAL, to, &q).response_code(),
        ResponseCode::Refused
    );

    let not_a_node = Ipv4Addr::new(127, 0, 0, 2);
    assert_eq!(
        ask_udp_from(not_a_node, to, &ok).response_code(),
        ResponseCode::Refused
    );

    let q = query("evil.example.net.", RecordType::A, Some(identity()));
    let r = ask_udp_from(LOCAL, to, &q);
    assert_eq!(r.response_code(), ResponseCode::Refused);
    assert!(r.answers().is_empty());

    // The allowed query still answers, so the refusals above were about the query.
    assert_eq!(
        ask_udp_from(LOCAL, to, &ok).response_code(),
        ResponseCode::NoError
    );

    let log = h.keys.dir.path().join("audit.jsonl");
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if let Some(line) = text.lines().find(|l| l.contains("evil.example.net")) {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            assert_eq!(v["kind"], "dns");
            assert_eq!(v["action"], "refuse");
            assert_eq!(v["reason"], "dns_refused");
            assert_eq!(v["tenant"], "acme");
            break;
        }
        assert!(Instant::now() < deadline, "no DNS audit line in {text}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn cname_chains_come_back_with_clamped_ttls_and_bind_the_queried_name() {
    let h = harness();
    let to = h.daemon.resolver_addr();
    let r = ask_udp_from(
        LOCAL,
        to,
        &query("www.example.com.", RecordType::A, Some(identity())),
    );
    assert_eq!(r.response_code(), ResponseCode::NoError);
    let types: Vec<RecordType> = r.answers().iter().map(|r| r.record_type()).collect();
    assert_eq!(types, [RecordType::CNAME, RecordType::CNAME, RecordType::A]);
    for rec in r.answers() {
        assert_eq!(
            rec.ttl(),
            DNS_TTL_MAX.as_secs() as u32,
            "3600 clamps to the maximum"
        );
    }
    let api = IpAddr::V4(Ipv4Addr::new(203, 0, 113, 10));
    assert_eq!(addrs(&r), [api]);
    assert_eq!(bound_names(&h.daemon, api), ["www.example.com"]);

    let r = ask_udp_from(
        LOCAL,
        to,
        &query("short.example.com.", RecordType::A, Some(identity())),
    );
    assert_eq!(
        r.answers()[0].ttl(),
        DNS_TTL_MIN.as_secs() as u32,
        "1 clamps to the minimum"
    );
    assert_eq!(
        bound_names(&h.daemon, IpAddr::V4(Ipv4Addr::new(203, 0, 113, 11))),
        ["short.example.com"]
    );
    assert!(BINDING_GRACE > Duration::ZERO);

    let r = ask_udp_from(
        LOCAL,
        to,
        &query("api.example.com.", RecordType::AAAA, Some(identity())),
    );
    let v6 = IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x10));
    assert_eq!(addrs(&r), [v6]);
    assert_eq!(bound_names(&h.daemon, v6), ["api.example.com"]);
}

#[test]
fn large_answers_use_tcp_upstream_and_are_truncated_toward_udp_clients() {
    let h = harness();
    let to = h.daemon.resolver_addr();
    let q = query("big.example.com.", RecordType::A, Some(identity()));
    let r = ask_udp_from(LOCAL, to, &q);
    assert!(
        r.truncated(),
        "a {BIG}-address answer does not fit 1232 bytes"
    );
    assert!(
        h.upstream.tcp_queries.load(Ordering::SeqCst) >= 1,
        "upstream fell back to TCP"
    );
    let r = ask_tcp(to, &q);
    assert_eq!(r.response_code(), ResponseCode::NoError);
    assert_eq!(addrs(&r).len(), BIG);
    assert_eq!(
        bound_names(&h.daemon, IpAddr::V4(Ipv4Addr::new(203, 0, 113, 42))),
        ["big.example.com"]
    );
}

#[test]
fn nxdomain_and_nodata_pass_through_without_bindings() {
    let h = harness();
    let to = h.daemon.resolver_addr();
    let r = ask_udp_from(
        LOCAL,
        to,
        &query("nothere.example.com.", RecordType::A, Some(identity())),
    );
    assert_eq!(r.response_code(), ResponseCode::NXDomain);
    let r = ask_udp_from(
        LOCAL,
        to,
        &query("empty.example.com.", RecordType::A, Some(identity())),
    );
    assert_eq!(r.response_code(), ResponseCode::NoError);
    assert!(r.answers().is_empty());
}

fn free_port() -> u16 {
    std::net::TcpListener::bind((LOCAL, 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn post(to: SocketAddr, path: &str, auth: &str, body: &str) -> u16 {
    let mut s = TcpStream::connect(to).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(
        s,
        "POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {auth}\r\nContent-Type: application/json\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out[9..12].parse().unwrap()
}

#[test]
fn answers_are_pushed_to_peers_which_recheck_the_policy() {
    let peers = Peers::new();
    let (a, b) = peers.start(Ipv4Addr::new(127, 0, 0, 2), None);

    let q = query("api.example.com.", RecordType::A, Some(identity()));
    assert_eq!(
        ask_udp_from(LOCAL, a.resolver_addr(), &q).response_code(),
        ResponseCode::NoError
    );
    // The answer comes only once the peer holds the binding: a job's first connection may land
    // on the peer the moment the job has the address.
    let api = IpAddr::V4(Ipv4Addr::new(203, 0, 113, 10));
    assert_eq!(bound_names(&b, api), ["api.example.com"]);

    let ctl = b.service_addr();
    let body = |n: &str| binding_body(JTI, n, "203.0.113.77");
    assert_eq!(
        post(
            ctl,
            "/v1/bindings",
            "wrong-secret-wrong-secret-00000",
            &body("api.example.com")
        ),
        401
    );
    assert_eq!(
        post(
            ctl,
            "/v1/bindings",
            "0123456789abcdef0123456789abcdef",
            &body("evil.example.net")
        ),
        403
    );
    assert!(bound_names(&b, IpAddr::V4(Ipv4Addr::new(203, 0, 113, 77))).is_empty());
    assert_eq!(
        post(
            ctl,
            "/v1/bindings",
            "0123456789abcdef0123456789abcdef",
            &body("short.example.com")
        ),
        200
    );
    assert_eq!(
        bound_names(&b, IpAddr::V4(Ipv4Addr::new(203, 0, 113, 77))),
        ["short.example.com"]
    );
}

/// What proxies that push bindings to each other need: keys, a policy server serving `JTI`
/// signed by them, an upstream, and the peer secret file.
struct Peers {
    keys: Keys,
    policy: PolicyServer,
    upstream: Upstream,
    secret: std::path::PathBuf,
}

impl Peers {
    fn new() -> Peers {
        let keys = Keys::new();
        let policy = PolicyServer::start(IpAddr::V4(LOCAL));
        policy.serve(job_key(JTI), 200, &keys.token(POLICY, JTI, 1));
        let upstream = Upstream::start();
        let secret = keys.dir.path().join("peer.secret");
        std::fs::write(&secret, "0123456789abcdef0123456789abcdef\n").unwrap();
        Peers {
            keys,
            policy,
            upstream,
            secret,
        }
    }

    /// A proxy's configuration that accepts peer pushes (`extra`: more lines).
    fn config(&self, extra: &str) -> ProxyConfig {
        let secret = format!("peer_secret_file = \"{}\"\n{extra}", self.secret.display());
        config(
            &self.keys,
            self.policy.addr.port(),
            self.upstream.addr,
            &secret,
        )
    }

    /// Proxy A on 127.0.0.1 pushing to peer B on `peer_ip` (same service port); B reads its
    /// trust bundle from `b_trust` instead of the keys' directory when given.
    fn start(&self, peer_ip: Ipv4Addr, b_trust: Option<&std::path::Path>) -> (Daemon, Daemon) {
        let port = free_port();
        let mut a = self.config(&format!("peers = [\"{peer_ip}\"]"));
        a.service_listen = Some(SocketAddr::from((LOCAL, port)));
        let mut b = self.config("");
        b.service_listen = Some(SocketAddr::from((peer_ip, port)));
        b.audit_log = self.keys.dir.path().join("audit-b.jsonl");
        if let Some(t) = b_trust {
            b.trust = t.to_path_buf();
        }
        (
            Daemon::start_control_plane(a).unwrap(),
            Daemon::start_control_plane(b).unwrap(),
        )
    }

    /// A trust directory that holds only another key (a proxy that does not trust the job's
    /// key yet).
    fn untrusting_trust_dir(&self) -> std::path::PathBuf {
        let trust = self.keys.dir.path().join("trust-other");
        std::fs::create_dir_all(&trust).unwrap();
        let other = snas_policy::keys::PolicyKey::from_seed("other-key", [6; 32]).unwrap();
        std::fs::write(trust.join("other-key.pub"), other.public_pem().unwrap()).unwrap();
        trust
    }
}

/// The body of `POST /v1/bindings` for job `jti` from node 127.0.0.1.
fn binding_body(jti: &str, name: &str, addr: &str) -> String {
    format!(
        r#"{{"job_key":"{}","node":"127.0.0.1","name":"{name}","addrs":["{addr}"],"ttl_secs":60}}"#,
        job_key(jti)
    )
}

#[test]
fn a_peer_that_loads_the_jobs_key_after_the_answer_still_gets_the_binding() {
    // Key rotation: the job is signed by a key proxy A trusts and peer B does not trust yet
    // (it is written to B's trust directory just after the answer; B's trust poll loads it
    // within 500 ms). B answers the push 503 and A tries again.
    let peers = Peers::new();
    let b_trust = peers.untrusting_trust_dir();
    let (a, b) = peers.start(Ipv4Addr::new(127, 0, 0, 3), Some(&b_trust));

    let q = query("api.example.com.", RecordType::A, Some(identity()));
    assert_eq!(
        ask_udp_from(LOCAL, a.resolver_addr(), &q).response_code(),
        ResponseCode::NoError
    );
    let api = IpAddr::V4(Ipv4Addr::new(203, 0, 113, 10));
    assert!(
        bound_names(&b, api).is_empty(),
        "B cannot verify the job yet"
    );
    std::fs::copy(
        peers.keys.trust().join("test-key.pub"),
        b_trust.join("test-key.pub"),
    )
    .unwrap();
    let added = Instant::now();
    while bound_names(&b, api).is_empty() {
        assert!(
            added.elapsed() < Duration::from_secs(6),
            "B never got the binding after it loaded the key"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    eprintln!(
        "binding on B {:?} after its key was written",
        added.elapsed()
    );
    assert_eq!(bound_names(&b, api), ["api.example.com"]);
}

#[test]
fn a_policy_signed_by_a_key_written_just_before_is_verified_without_waiting_for_the_trust_poll() {
    // The key reaches the trust directory a moment before the job's first fetch (a rotation:
    // keys are rolled out before jobs are signed with them). The fetch asks for a reload at
    // once instead of failing until the next 500 ms poll.
    let peers = Peers::new();
    let trust = peers.untrusting_trust_dir();
    let mut cfg = peers.config("");
    cfg.trust = trust.clone();
    let d = Daemon::start_control_plane(cfg).unwrap();
    for round in 0..5 {
        // Each round: a new key file, then at once a policy signed by it.
        let kid = format!("rotated-{round}");
        let rotated = Keys {
            key: snas_policy::keys::PolicyKey::from_seed(&kid, [7 + round; 32]).unwrap(),
            dir: tempfile::tempdir().unwrap(),
        };
        let jti = format!("jti-rotated-00000{round}");
        peers
            .policy
            .serve(job_key(&jti), 200, &rotated.token(POLICY, &jti, 1));
        let pem = rotated.key.public_pem().unwrap();
        std::fs::write(trust.join(format!("{kid}.pub")), pem).unwrap();
        let body = binding_body(&jti, "api.example.com", "203.0.113.10");
        let started = Instant::now();
        assert_eq!(
            post(
                d.service_addr(),
                "/v1/bindings",
                "0123456789abcdef0123456789abcdef",
                &body
            ),
            200,
            "round {round}: verified on the first try"
        );
        eprintln!(
            "round {round}: verified {:?} after the key was written",
            started.elapsed()
        );
    }
}
