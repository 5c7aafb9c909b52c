//! DNS stub latency and throughput on loopback: the stub with a recording dataplane and an
//! in-process proxy resolver (answers one A record at once). Prints, per case, queries per
//! second with `CLIENTS` concurrent clients and the latency percentiles of a single client.
//!
//! `cargo run --release -p snas-agent --example dns_stub_bench`
//!
//! Cases: `refused` (name outside the policy: no forward), `cached` (the same allowed name again
//! and again: answered from the stub's cache), `forwarded` (a new allowed name each time:
//! forward, tier-1 install, relay), `direct` (the fake resolver asked directly: the floor).
//! The stub's upstream budget is raised for the `forwarded` case: this measures the stub, not
//! the budget.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use hickory_proto::op::{Message, MessageType, Query};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{Name, RData, Record, RecordType};
use snas_agent::audit::AuditSink;
use snas_agent::proxies::Proxies;
use snas_agent::stub::{DnsStub, JobDirectory, JobEntry, StubConfig};
use snas_agent::{RecordingDataplane, VerifiedPolicy};
use snas_policy::{EgressRule, HostPort, PolicyDraft, RuleProtocol};
use snas_wire::{JobKey, PolicySerial};
use tokio::net::UdpSocket;

const QUERIES: usize = 20_000;
const CLIENTS: usize = 8;

struct Dir(HashMap<IpAddr, VerifiedPolicy>);

impl JobDirectory for Dir {
    fn job_at(&self, ip: IpAddr) -> Option<JobEntry> {
        self.0.get(&ip).map(|p| JobEntry {
            job_key: p.job_key,
            serial: p.serial,
            expired: false,
            ipv6_route: false,
        })
    }
    fn policy(&self, job_key: JobKey) -> Option<VerifiedPolicy> {
        self.0.values().find(|p| p.job_key == job_key).cloned()
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

async fn resolver() -> Result<u16, BoxError> {
    let udp = UdpSocket::bind("127.0.0.1:0").await?;
    let port = udp.local_addr()?.port();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 4096];
        while let Ok((n, from)) = udp.recv_from(&mut buf).await {
            let Ok(q) = Message::from_vec(&buf[..n]) else {
                continue;
            };
            let mut a = Message::new();
            a.set_id(q.id()).set_message_type(MessageType::Response);
            for x in q.queries() {
                a.add_query(x.clone());
            }
            if let Some(x) = q.queries().first() {
                a.add_answer(Record::from_rdata(
                    x.name().clone(),
                    60,
                    RData::A(A(Ipv4Addr::new(203, 0, 113, 10))),
                ));
            }
            if let Ok(b) = a.to_vec() {
                let _ = udp.send_to(&b, from).await;
            }
        }
    });
    Ok(port)
}

fn query(name: &str, id: u16) -> Result<Vec<u8>, BoxError> {
    let mut m = Message::new();
    m.set_id(id)
        .set_recursion_desired(true)
        .add_query(Query::query(Name::from_str(name)?, RecordType::A));
    Ok(m.to_vec()?)
}

/// Sends `n` queries one after another from one socket; returns each latency. A `name`
/// starting with `*.` gets a new first label per query.
async fn client(to: SocketAddr, name: String, n: usize) -> Result<Vec<Duration>, BoxError> {
    let s = UdpSocket::bind("127.0.0.1:0").await?;
    s.connect(to).await?;
    let mut buf = vec![0u8; 1500];
    let mut out = Vec::with_capacity(n);
    let tag: u32 = rand::random();
    for i in 0..n {
        let q = match name.strip_prefix("*.") {
            Some(rest) => query(&format!("q{i}-{tag:08x}.{rest}"), i as u16)?,
            None => query(&name, i as u16)?,
        };
        let t = Instant::now();
        s.send(&q).await?;
        tokio::time::timeout(Duration::from_secs(2), s.recv(&mut buf)).await??;
        out.push(t.elapsed());
    }
    Ok(out)
}

fn pct(v: &mut [Duration], p: f64) -> f64 {
    v.sort_unstable();
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i].as_secs_f64() * 1e6
}

async fn case(label: &str, to: SocketAddr, name: &str) -> Result<(), BoxError> {
    let mut single = client(to, name.to_owned(), 2000).await?;
    let t = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..CLIENTS {
        tasks.push(tokio::spawn(client(to, name.to_owned(), QUERIES / CLIENTS)));
    }
    for t in tasks {
        t.await??;
    }
    let qps = QUERIES as f64 / t.elapsed().as_secs_f64();
    println!(
        "{label:<10} {qps:>10.0} {:>9.1} {:>9.1} {:>9.1}",
        pct(&mut single, 0.5),
        pct(&mut single, 0.99),
        pct(&mut single, 0.999)
    );
    Ok(())
}

fn main() -> Result<(), BoxError> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async {
        let mut d = PolicyDraft::new("acme", "bench");
        d.egress.push(EgressRule::host(
            HostPort::parse("*.example.com")?,
            RuleProtocol::Tcp,
        ));
        let c = d.to_claims("jti-bench", PolicySerial(1), SystemTime::now());
        let policy = VerifiedPolicy {
            jti: c.jti.clone(),
            tenant: c.tenant.clone(),
            job: c.job.clone(),
            serial: PolicySerial(1),
            node: None,
            expires_at_unix: c.exp,
            job_key: snas_policy::identity::job_key(&c.jti),
            tenant_id: snas_policy::identity::tenant_id(&c.tenant),
            claims: Some(c),
        };
        let port = resolver().await?;
        let dir = Arc::new(Dir(HashMap::from([(
            IpAddr::V4(Ipv4Addr::LOCALHOST),
            policy,
        )])));
        let (sink, mut rx) = AuditSink::channel();
        tokio::spawn(async move { while rx.recv().await.is_some() {} });
        let cfg = StubConfig {
            queries_per_sec: 1_000_000,
            burst: 1_000_000,
            max_inflight: 64,
            max_tcp_per_job: 8,
            forward_timeout: Duration::from_secs(1),
            cache: Default::default(),
        };
        let stub = Arc::new(DnsStub::new(
            dir,
            Arc::new(RecordingDataplane::default()),
            Arc::new(Proxies::new(&[Ipv4Addr::LOCALHOST], 9, port)),
            sink,
            cfg,
        ));
        let (udp, _tcp) = snas_agent::stub::bind("127.0.0.1:0".parse()?).await?;
        let addr = udp.local_addr()?;
        let (_stop, stop_rx) = tokio::sync::watch::channel(false);
        tokio::spawn(stub.clone().serve_udp(udp, stop_rx));
        println!(
            "{QUERIES} queries, {CLIENTS} clients; latency of one client in µs (2000 queries)"
        );
        println!(
            "{:<10} {:>10} {:>9} {:>9} {:>9}",
            "case", "queries/s", "p50", "p99", "p99.9"
        );
        case("refused", addr, "evil.example.org.").await?;
        case("cached", addr, "api.example.com.").await?;
        case("forwarded", addr, "*.example.com.").await?;
        case(
            "direct",
            SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
            "api.example.com.",
        )
        .await?;
        Ok::<(), BoxError>(())
    })
}
