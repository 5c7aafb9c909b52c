//! The DNS stub against an in-process fake proxy resolver, all on loopback (no privileges).
//!
//! The "sandbox" is a client socket on 127.0.0.1 (the directory maps that address to a job);
//! the proxy resolver is a hickory-proto server on 127.0.0.1; tier 1 is a recording dataplane.
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use hickory_proto::op::{Edns, Message, MessageType, Query, ResponseCode};
use hickory_proto::rr::rdata::{A, CNAME};
use hickory_proto::rr::{Name, RData, Record, RecordType};
use snas_agent::audit::{Action, AuditRecord, AuditSink};
use snas_agent::dns;
use snas_agent::proxies::Proxies;
use snas_agent::stub::{DnsStub, JobDirectory, StubConfig};
use snas_agent::{RecordingDataplane, VerifiedPolicy};
use snas_bpf::{PortRule, Proto};
use snas_policy::{EgressRule, HostPort, PolicyDraft, Protocol};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};

const SANDBOX: Ipv4Addr = Ipv4Addr::LOCALHOST;

struct Dir {
    jobs: HashMap<IpAddr, VerifiedPolicy>,
}

impl JobDirectory for Dir {
    fn job_at(&self, ip: IpAddr) -> Option<(u64, u32)> {
        self.jobs.get(&ip).map(|p| (p.job_key, p.serial))
    }
    fn policy(&self, job_key: u64) -> Option<VerifiedPolicy> {
        self.jobs.values().find(|p| p.job_key == job_key).cloned()
    }
}

fn policy(hosts: &[&str]) -> VerifiedPolicy {
    let mut d = PolicyDraft::new("acme", "build");
    for h in hosts {
        d.egress.push(EgressRule::Host {
            host: HostPort::parse(h).unwrap(),
            protocol: Protocol::Tcp,
        });
    }
    let c = d.to_claims("jti-dns-test", 3, SystemTime::now());
    VerifiedPolicy {
        jti: c.jti.clone(),
        tenant: c.tenant.clone(),
        job: c.job.clone(),
        serial: 3,
        node: None,
        expires_at_unix: c.exp,
        job_key: snas_policy::identity::job_key(&c.jti),
        tenant_id: snas_policy::identity::tenant_id(&c.tenant),
        claims: Some(c),
    }
}

/// What the fake resolver saw: (question name, identity option).
type Seen = Arc<Mutex<Vec<(String, Option<(u32, u64, u32)>)>>>;

fn answer_for(q: &Message) -> Message {
    let mut a = Message::new();
    a.set_id(q.id())
        .set_message_type(MessageType::Response)
        .set_recursion_desired(true)
        .set_recursion_available(true);
    for x in q.queries() {
        a.add_query(x.clone());
    }
    let name = q.queries()[0].name().clone();
    let text = name.to_ascii();
    if text.starts_with("nx.") {
        a.set_response_code(ResponseCode::NXDomain);
        return a;
    }
    if q.queries()[0].query_type() != RecordType::A {
        return a;
    }
    let target = Name::from_str("edge.cdn.example.net.").unwrap();
    a.add_answer(Record::from_rdata(
        name,
        600,
        RData::CNAME(CNAME(target.clone())),
    ));
    let n = if text.starts_with("big.") { 80 } else { 1 };
    for i in 0..n {
        a.add_answer(Record::from_rdata(
            target.clone(),
            if text.starts_with("long.") {
                86_400
            } else {
                60
            },
            RData::A(A(Ipv4Addr::new(203, 0, 113, 10 + i as u8))),
        ));
    }
    a
}

/// A fake proxy resolver on `ip` (port 0 = any): answers over UDP (truncating big answers) and
/// TCP; `silent` swallows every UDP query.
async fn fake_resolver(ip: Ipv4Addr, port: u16, silent: bool) -> (u16, Seen) {
    let udp = UdpSocket::bind((ip, port)).await.unwrap();
    let port = udp.local_addr().unwrap().port();
    let tcp = TcpListener::bind((ip, port)).await.unwrap();
    let seen: Seen = Arc::default();
    let s = seen.clone();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 4096];
        loop {
            let Ok((n, from)) = udp.recv_from(&mut buf).await else {
                return;
            };
            let q = Message::from_vec(&buf[..n]).unwrap();
            s.lock()
                .unwrap()
                .push((q.queries()[0].name().to_ascii(), dns::identity_of(&q)));
            if silent {
                continue;
            }
            let mut a = answer_for(&q);
            let mut bytes = a.to_vec().unwrap();
            if bytes.len() > 512 {
                a.take_answers();
                a.set_truncated(true);
                bytes = a.to_vec().unwrap();
            }
            udp.send_to(&bytes, from).await.unwrap();
        }
    });
    let s = seen.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut c, _)) = tcp.accept().await else {
                return;
            };
            let s = s.clone();
            tokio::spawn(async move {
                let len = c.read_u16().await.unwrap();
                let mut b = vec![0u8; usize::from(len)];
                c.read_exact(&mut b).await.unwrap();
                let q = Message::from_vec(&b).unwrap();
                s.lock().unwrap().push((
                    format!("tcp:{}", q.queries()[0].name().to_ascii()),
                    dns::identity_of(&q),
                ));
                let out = answer_for(&q).to_vec().unwrap();
                c.write_all(&(out.len() as u16).to_be_bytes())
                    .await
                    .unwrap();
                c.write_all(&out).await.unwrap();
            });
        }
    });
    (port, seen)
}

struct Harness {
    stub: Arc<DnsStub>,
    dp: Arc<RecordingDataplane>,
    audit: tokio::sync::mpsc::Receiver<AuditRecord>,
    policy: VerifiedPolicy,
    stub_addr: SocketAddr,
    _stop: tokio::sync::watch::Sender<bool>,
}

async fn harness(
    hosts: &[&str],
    proxies: &[Ipv4Addr],
    resolver_port: u16,
    cfg: StubConfig,
) -> Harness {
    let policy = policy(hosts);
    let dir = Arc::new(Dir {
        jobs: HashMap::from([(IpAddr::V4(SANDBOX), policy.clone())]),
    });
    let dp = Arc::new(RecordingDataplane::default());
    let (sink, audit) = AuditSink::channel();
    let table = Arc::new(Proxies::new(proxies, 9, resolver_port));
    let stub = Arc::new(DnsStub::new(dir, dp.clone(), table, sink, cfg));
    let (udp, tcp) = snas_agent::stub::bind("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap_or_else(|_| panic!("bind"));
    let stub_addr = udp.local_addr().unwrap();
    let tcp = {
        drop(tcp);
        TcpListener::bind(stub_addr).await.unwrap()
    };
    let (stop, rx) = tokio::sync::watch::channel(false);
    tokio::spawn(stub.clone().serve_udp(udp, rx.clone()));
    tokio::spawn(stub.clone().serve_tcp(tcp, rx));
    Harness {
        stub,
        dp,
        audit,
        policy,
        stub_addr,
        _stop: stop,
    }
}

fn cfg() -> StubConfig {
    StubConfig {
        queries_per_sec: 20,
        burst: 40,
        max_inflight: 16,
        forward_timeout: Duration::from_millis(300),
    }
}

fn query(name: &str, t: RecordType, id: u16) -> Message {
    let mut m = Message::new();
    m.set_id(id)
        .set_recursion_desired(true)
        .add_query(Query::query(Name::from_str(name).unwrap(), t));
    m
}

async fn ask_udp_from(from: Ipv4Addr, to: SocketAddr, q: &Message) -> Message {
    let s = UdpSocket::bind((from, 0)).await.unwrap();
    s.send_to(&q.to_vec().unwrap(), to).await.unwrap();
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), s.recv(&mut buf))
        .await
        .expect("stub answers")
        .unwrap();
    Message::from_vec(&buf[..n]).unwrap()
}

async fn ask_udp(to: SocketAddr, q: &Message) -> Message {
    ask_udp_from(SANDBOX, to, q).await
}

async fn ask_tcp(to: SocketAddr, q: &Message) -> Message {
    let mut c = TcpStream::connect(to).await.unwrap();
    let b = q.to_vec().unwrap();
    c.write_all(&(b.len() as u16).to_be_bytes()).await.unwrap();
    c.write_all(&b).await.unwrap();
    let len = c.read_u16().await.unwrap();
    let mut out = vec![0u8; usize::from(len)];
    c.read_exact(&mut out).await.unwrap();
    Message::from_vec(&out).unwrap()
}

fn drain(rx: &mut tokio::sync::mpsc::Receiver<AuditRecord>) -> Vec<AuditRecord> {
    let mut v = Vec::new();
    while let Ok(r) = rx.try_recv() {
        v.push(r);
    }
    v
}

#[tokio::test]
async fn name_outside_the_policy_is_refused_audited_and_never_forwarded() {
    let (port, seen) = fake_resolver(Ipv4Addr::LOCALHOST, 0, false).await;
    let mut h = harness(&["api.example.com"], &[Ipv4Addr::LOCALHOST], port, cfg()).await;
    let a = ask_udp(h.stub_addr, &query("evil.example.org.", RecordType::A, 77)).await;
    assert_eq!(a.response_code(), ResponseCode::Refused);
    assert_eq!(a.id(), 77);
    assert_eq!(a.queries()[0].name().to_ascii(), "evil.example.org.");
    assert!(seen.lock().unwrap().is_empty());
    assert!(h.dp.allowed().is_empty());
    let recs = drain(&mut h.audit);
    assert_eq!(recs.len(), 1);
    assert_eq!(recs[0].action, Action::Refuse);
    assert_eq!(recs[0].reason, "dns_refused");
    assert_eq!(recs[0].hostname.as_deref(), Some("evil.example.org"));
    assert_eq!(recs[0].job, "build");
    assert_eq!(recs[0].kind, Some("dns"));
}

#[tokio::test]
async fn allowed_name_is_forwarded_with_identity_and_installed_before_the_answer() {
    let (port, seen) = fake_resolver(Ipv4Addr::LOCALHOST, 0, false).await;
    let mut h = harness(
        &["api.example.com", "api.example.com:8080"],
        &[Ipv4Addr::LOCALHOST],
        port,
        cfg(),
    )
    .await;
    let mut q = query("API.example.com.", RecordType::A, 9);
    q.set_edns(Edns::new());
    let a = ask_udp(h.stub_addr, &q).await;
    assert_eq!(a.response_code(), ResponseCode::NoError);
    assert_eq!(a.id(), 9);
    assert_eq!(a.answers().len(), 2, "CNAME + A");
    // Installed by the time the sandbox has the answer.
    let allowed = h.dp.allowed();
    assert_eq!(allowed.len(), 1);
    assert_eq!(allowed[0].job_key, h.policy.job_key);
    assert_eq!(allowed[0].ip, IpAddr::V4(Ipv4Addr::new(203, 0, 113, 10)));
    assert_eq!(allowed[0].ttl, Duration::from_secs(60));
    assert_eq!(
        allowed[0].rules,
        vec![
            PortRule::port(Proto::Tcp, 443),
            PortRule::port(Proto::Tcp, 8080)
        ]
    );
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 1);
    assert_eq!(
        seen[0].1,
        Some((h.policy.tenant_id, h.policy.job_key, h.policy.serial)),
        "the EDNS option carries the job identity"
    );
    let recs = drain(&mut h.audit);
    assert_eq!(recs.len(), 1);
    assert_eq!(recs[0].action, Action::Allow);
    assert_eq!(recs[0].rule, Some(0));
    assert_eq!(
        recs[0].addrs,
        vec![IpAddr::V4(Ipv4Addr::new(203, 0, 113, 10))]
    );
    assert_eq!(h.stub.view().outcomes["noerror"], 1);
}

#[tokio::test]
async fn ttls_are_clamped_for_tier1_and_for_the_sandbox() {
    let (port, _seen) = fake_resolver(Ipv4Addr::LOCALHOST, 0, false).await;
    let h = harness(&["long.example.com"], &[Ipv4Addr::LOCALHOST], port, cfg()).await;
    let a = ask_udp(h.stub_addr, &query("long.example.com.", RecordType::A, 1)).await;
    assert!(a.answers().iter().all(|r| r.ttl() <= 300), "{a:?}");
    assert_eq!(h.dp.allowed()[0].ttl, dns::DNS_TTL_MAX);
}

#[tokio::test]
async fn tcp_queries_are_answered_and_truncated_proxy_answers_are_refetched_over_tcp() {
    let (port, seen) = fake_resolver(Ipv4Addr::LOCALHOST, 0, false).await;
    let h = harness(&["big.example.com"], &[Ipv4Addr::LOCALHOST], port, cfg()).await;
    let a = ask_tcp(h.stub_addr, &query("big.example.com.", RecordType::A, 5)).await;
    assert_eq!(a.response_code(), ResponseCode::NoError);
    assert_eq!(a.id(), 5);
    assert_eq!(a.answers().len(), 81);
    assert_eq!(h.dp.allowed().len(), 80);
    let names: Vec<String> = seen.lock().unwrap().iter().map(|s| s.0.clone()).collect();
    assert_eq!(names, vec!["big.example.com.", "tcp:big.example.com."]);
    // Over UDP without EDNS the sandbox gets TC and retries over TCP.
    let u = ask_udp(h.stub_addr, &query("big.example.com.", RecordType::A, 6)).await;
    assert!(u.truncated());
    assert!(u.answers().is_empty());
}

#[tokio::test]
async fn tunnelling_beyond_the_query_rate_is_refused_and_audited() {
    let (port, seen) = fake_resolver(Ipv4Addr::LOCALHOST, 0, false).await;
    let c = StubConfig {
        queries_per_sec: 1,
        burst: 5,
        ..cfg()
    };
    let mut h = harness(&["*.example.com"], &[Ipv4Addr::LOCALHOST], port, c).await;
    let mut refused = 0;
    for i in 0..12u16 {
        let name = format!("q{i}x7f3a9c0d2e4b6a8f1c3e5d7b9a0c2e4f6a8b.example.com.");
        let a = ask_udp(h.stub_addr, &query(&name, RecordType::A, i)).await;
        if a.response_code() == ResponseCode::Refused {
            refused += 1;
        }
    }
    // 5 from the burst, at most one or two refilled while the test runs.
    assert!(refused >= 5, "refused {refused}");
    assert!(seen.lock().unwrap().len() <= 7);
    let recs = drain(&mut h.audit);
    let rate: Vec<_> = recs.iter().filter(|r| r.reason == "dns_rate").collect();
    assert_eq!(rate.len(), refused);
    assert!(rate[0]
        .hostname
        .as_deref()
        .unwrap()
        .ends_with(".example.com"));
}

#[tokio::test]
async fn tunnelling_query_types_are_refused() {
    let (port, seen) = fake_resolver(Ipv4Addr::LOCALHOST, 0, false).await;
    let mut h = harness(&["*.example.com"], &[Ipv4Addr::LOCALHOST], port, cfg()).await;
    for t in [RecordType::TXT, RecordType::NULL, RecordType::MX] {
        let a = ask_udp(h.stub_addr, &query("a.example.com.", t, 1)).await;
        assert_eq!(a.response_code(), ResponseCode::Refused, "{t}");
    }
    assert!(seen.lock().unwrap().is_empty());
    assert!(drain(&mut h.audit).iter().all(|r| r.reason == "dns_qtype"));
}

#[tokio::test]
async fn unknown_source_is_refused() {
    let (port, seen) = fake_resolver(Ipv4Addr::LOCALHOST, 0, false).await;
    let h = harness(&["api.example.com"], &[Ipv4Addr::LOCALHOST], port, cfg()).await;
    let a = ask_udp_from(
        Ipv4Addr::new(127, 0, 0, 9),
        h.stub_addr,
        &query("api.example.com.", RecordType::A, 1),
    )
    .await;
    assert_eq!(a.response_code(), ResponseCode::Refused);
    assert!(seen.lock().unwrap().is_empty());
}

#[tokio::test]
async fn nxdomain_passes_through_and_installs_nothing() {
    let (port, _seen) = fake_resolver(Ipv4Addr::LOCALHOST, 0, false).await;
    let h = harness(&["*.example.com"], &[Ipv4Addr::LOCALHOST], port, cfg()).await;
    let a = ask_udp(h.stub_addr, &query("nx.example.com.", RecordType::A, 1)).await;
    assert_eq!(a.response_code(), ResponseCode::NXDomain);
    assert!(h.dp.allowed().is_empty());
}

#[tokio::test]
async fn a_silent_proxy_is_skipped_after_the_timeout() {
    let (port, seen_good) = fake_resolver(Ipv4Addr::LOCALHOST, 0, false).await;
    let (_, seen_bad) = fake_resolver(Ipv4Addr::new(127, 0, 0, 3), port, true).await;
    let h = harness(
        &["*.example.com"],
        &[Ipv4Addr::new(127, 0, 0, 3), Ipv4Addr::LOCALHOST],
        port,
        cfg(),
    )
    .await;
    // Several names: whichever proxy the job hashes to first, every query gets an answer.
    for i in 0..4u16 {
        let a = ask_udp(
            h.stub_addr,
            &query(&format!("n{i}.example.com."), RecordType::A, i),
        )
        .await;
        assert_eq!(a.response_code(), ResponseCode::NoError);
    }
    assert_eq!(seen_good.lock().unwrap().len(), 4);
    let bad = seen_bad.lock().unwrap().len();
    assert!(
        bad == 0 || bad == 4,
        "a job's resolver order is stable: {bad}"
    );
}

#[tokio::test]
async fn no_reachable_proxy_gives_servfail() {
    let (port, _) = fake_resolver(Ipv4Addr::new(127, 0, 0, 4), 0, true).await;
    let h = harness(
        &["*.example.com"],
        &[Ipv4Addr::new(127, 0, 0, 4)],
        port,
        cfg(),
    )
    .await;
    let a = ask_udp(h.stub_addr, &query("a.example.com.", RecordType::A, 1)).await;
    assert_eq!(a.response_code(), ResponseCode::ServFail);
    assert!(h.dp.allowed().is_empty());
    assert_eq!(h.stub.view().proxy_failures, 1);
}

/// A directory whose job's policy can be replaced (live update with a higher serial).
struct SwitchDir(Mutex<VerifiedPolicy>);

impl JobDirectory for SwitchDir {
    fn job_at(&self, ip: IpAddr) -> Option<(u64, u32)> {
        let p = self.0.lock().unwrap();
        (ip == IpAddr::V4(SANDBOX)).then_some((p.job_key, p.serial))
    }
    fn policy(&self, job_key: u64) -> Option<VerifiedPolicy> {
        let p = self.0.lock().unwrap();
        (p.job_key == job_key).then(|| p.clone())
    }
}

#[tokio::test]
async fn a_policy_update_with_a_new_serial_changes_the_allowed_names() {
    let (port, seen) = fake_resolver(Ipv4Addr::LOCALHOST, 0, false).await;
    let dir = Arc::new(SwitchDir(Mutex::new(policy(&["old.example.com"]))));
    let (sink, _audit) = AuditSink::channel();
    let dp = Arc::new(RecordingDataplane::default());
    let stub = DnsStub::new(
        dir.clone(),
        dp,
        Arc::new(Proxies::new(&[Ipv4Addr::LOCALHOST], 9, port)),
        sink,
        cfg(),
    );
    let src = SocketAddr::from((SANDBOX, 40000));
    let ask = |name: &str| query(name, RecordType::A, 1).to_vec().unwrap();
    let rcode = |b: Option<Vec<u8>>| Message::from_vec(&b.unwrap()).unwrap().response_code();
    assert_eq!(
        rcode(
            stub.handle(&ask("old.example.com."), src, None, false)
                .await
        ),
        ResponseCode::NoError
    );
    {
        let mut p = dir.0.lock().unwrap();
        let mut next = policy(&["new.example.com"]);
        next.serial = p.serial + 1;
        *p = next;
    }
    assert_eq!(
        rcode(
            stub.handle(&ask("old.example.com."), src, None, false)
                .await
        ),
        ResponseCode::Refused
    );
    assert_eq!(
        rcode(
            stub.handle(&ask("new.example.com."), src, None, false)
                .await
        ),
        ResponseCode::NoError
    );
    let ids: Vec<_> = seen.lock().unwrap().iter().map(|s| s.1).collect();
    assert_eq!(ids.len(), 2);
    assert_eq!(ids[1].unwrap().2, 4, "the new serial goes to the proxy");
}

#[tokio::test]
async fn a_refusal_flood_is_audited_at_a_bounded_rate_with_the_suppressed_count() {
    let (port, _seen) = fake_resolver(Ipv4Addr::LOCALHOST, 0, false).await;
    let c = StubConfig {
        queries_per_sec: 1,
        burst: 1,
        ..cfg()
    };
    let mut h = harness(&["*.example.com"], &[Ipv4Addr::LOCALHOST], port, c).await;
    let mut refused = 0;
    for i in 0..60u16 {
        let a = ask_udp(h.stub_addr, &query("evil.example.org.", RecordType::A, i)).await;
        if a.response_code() == ResponseCode::Refused {
            refused += 1;
        }
    }
    assert_eq!(refused, 60);
    let lines = drain(&mut h.audit);
    assert!(lines.len() < 30, "{} lines for 60 refusals", lines.len());
    assert_eq!(
        h.stub.view().audit_suppressed,
        (60 - lines.len()) as u64,
        "every refusal is either a line or counted"
    );
    // Once the audit bucket refills, the next line says how many were left out.
    tokio::time::sleep(Duration::from_millis(250)).await;
    ask_udp(h.stub_addr, &query("evil.example.org.", RecordType::A, 99)).await;
    let next = drain(&mut h.audit);
    assert_eq!(next.len(), 1);
    assert_eq!(next[0].suppressed, (60 - lines.len()) as u64);
}
