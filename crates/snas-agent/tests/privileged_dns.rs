//! PRIVILEGED (root): DNS through real tier 1. A job created by the agent (real verifier, real
//! tier 1) asks `dig` inside its namespace for names at a resolver address that is not the
//! stub: tier 1 captures the query, the stub refuses or forwards it to a fake proxy resolver on
//! 127.0.0.1, installs the answer into tier 1, and the answer comes back from the address the
//! sandbox asked; the repeat over TCP is answered from the stub's cache. Before resolution a connection to the address is denied by tier 1
//! (`destination_denied`); after, it is not. Nothing leaves the machine: the resolver address
//! is captured and the allowed address has no proxy to go to.
#![allow(clippy::unwrap_used)]

mod common;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::time::SystemTime;

use common::Scope;
use hickory_proto::op::{Message, MessageType};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{RData, Record};
use snas_agent::audit::AuditSink;
use snas_agent::dataplane::Tier1Dataplane;
use snas_agent::proxies::Proxies;
use snas_agent::seams::BundleVerifier;
use snas_agent::stub::{DnsStub, StubConfig};
use snas_agent::{Agent, Dataplane};
use snas_bpf::{NodeConfig, Tier1};
use snas_policy::{parse_policy, sign, PolicyKey, TrustBundle};
use snas_wire::Reason;

struct Pins(PathBuf);

impl Drop for Pins {
    fn drop(&mut self) {
        let _ = snas_bpf::remove_pins(&self.0);
    }
}

const RESOLVED: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);

async fn fake_resolver() -> u16 {
    let udp = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let port = udp.local_addr().unwrap().port();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 4096];
        while let Ok((n, from)) = udp.recv_from(&mut buf).await {
            let q = Message::from_vec(&buf[..n]).unwrap();
            let mut a = Message::new();
            a.set_id(q.id())
                .set_message_type(MessageType::Response)
                .set_recursion_desired(true)
                .set_recursion_available(true);
            for x in q.queries() {
                a.add_query(x.clone());
            }
            let name = q.queries()[0].name().clone();
            a.add_answer(Record::from_rdata(name, 60, RData::A(A(RESOLVED))));
            udp.send_to(&a.to_vec().unwrap(), from).await.unwrap();
        }
    });
    port
}

fn dig(netns: &str, args: &[&str]) -> String {
    let out = Command::new("ip")
        .args(["netns", "exec", netns, "dig", "+time=3", "+tries=1"])
        .args(args)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A TCP connection attempt from the sandbox (1 s); the result does not matter, tier 1's
/// counters do.
fn connect_from(netns: &str, dst: Ipv4Addr, port: u16) {
    let code = format!(
        "import socket\ns=socket.socket()\ns.settimeout(1)\ntry:\n s.connect(('{dst}',{port}))\nexcept Exception:\n pass\n"
    );
    let _ = Command::new("ip")
        .args(["netns", "exec", netns, "python3", "-c", &code])
        .output();
}

#[test]
fn privileged_dns_through_tier1_refuses_forwards_and_installs_before_answering() {
    let scope = Scope::new("dns");
    let pins = Pins(PathBuf::from(format!(
        "/sys/fs/bpf/{}",
        scope.netns_prefix.trim_end_matches('-')
    )));
    let key = PolicyKey::from_seed("k1", [9; 32]).unwrap();
    let bundle = TrustBundle::from_keys([("k1", key.public_pem().unwrap())]).unwrap();
    let mut draft =
        parse_policy("tenant = \"acme\"\njob = \"web\"\n[[egress]]\nhost = \"api.example.com\"\n")
            .unwrap();
    draft.node = Some(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 7)));
    let jti = format!("jti-{}", scope.netns_prefix);
    let token = sign(
        &draft.to_claims(&jti, snas_wire::PolicySerial(1), SystemTime::now()),
        &key,
    )
    .unwrap();
    let config = common::agent_config(&scope, "10.254.30.0/24");

    snas_bpf::ensure_bpffs().unwrap();
    let mut node = NodeConfig::new("test", 1, Ipv4Addr::new(192, 0, 2, 7), 1500);
    node.attach_uplink = false;
    node.pin_dir = pins.0.clone();
    let dp: Arc<dyn Dataplane> = Arc::new(Tier1Dataplane::from_tier1(Tier1::load(&node).unwrap()));
    let (agent, _) =
        Agent::start(config, Arc::new(BundleVerifier::new(bundle)), dp.clone()).unwrap();
    let agent = Arc::new(agent);
    let view = agent.create_job(&token).unwrap();
    let job_key = snas_policy::identity::job_key(&jti);

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let (sink, mut audit) = AuditSink::channel();
    let (stop, rx) = tokio::sync::watch::channel(false);
    let stub = rt.block_on(async {
        let port = fake_resolver().await;
        let proxies = Arc::new(Proxies::new(&[Ipv4Addr::LOCALHOST], 9, port));
        let stub = Arc::new(DnsStub::new(
            agent.clone(),
            dp.clone(),
            proxies,
            sink,
            StubConfig::from_agent(agent.config()),
        ));
        let (udp, tcp) = snas_agent::stub::bind(SocketAddr::new(view.gateway_ip, 53))
            .await
            .unwrap();
        tokio::spawn(stub.clone().serve_udp(udp, rx.clone()));
        tokio::spawn(stub.clone().serve_tcp(tcp, rx));
        stub
    });

    // Tier-1 ring-buffer events into an audit sink, as the agent does.
    let (t1_sink, mut t1_audit) = AuditSink::channel();
    let t1_stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let t1_thread = {
        let (dp, stop, agent) = (dp.clone(), t1_stop.clone(), agent.clone());
        std::thread::spawn(move || {
            dp.run_audit(
                Box::new(move |ev| {
                    use snas_agent::stub::JobDirectory;
                    let p = agent.policy(ev.job_key);
                    let host = agent.bound_name(ev.job_key, ev.dst.ip());
                    t1_sink.emit(snas_agent::audit::tier1_record(
                        &ev,
                        p.as_ref(),
                        host,
                        SystemTime::now(),
                        snas_bpf::mono_now().unwrap(),
                    ));
                }),
                &stop,
            )
            .unwrap();
        })
    };

    let denied = |a: &Agent| a.counters(job_key).unwrap()[&Reason::DestinationDenied];
    connect_from(&view.netns, RESOLVED, 443);
    let denied_before = denied(&agent);
    assert!(denied_before >= 1, "tier 1 denies the unresolved address");

    // A name outside the policy: REFUSED, from the address the sandbox asked.
    let out = dig(&view.netns, &["@198.51.100.53", "evil.example.org", "A"]);
    assert!(out.contains("status: REFUSED"), "{out}");
    assert!(out.contains("SERVER: 198.51.100.53#53"), "{out}");

    // An allowed name over UDP and over TCP.
    let short = dig(
        &view.netns,
        &["+short", "@198.51.100.53", "api.example.com", "A"],
    );
    assert_eq!(short.trim(), RESOLVED.to_string());
    let tcp = dig(
        &view.netns,
        &["+tcp", "@198.51.100.53", "api.example.com", "A"],
    );
    assert!(tcp.contains("status: NOERROR"), "{tcp}");
    assert!(tcp.contains(&RESOLVED.to_string()), "{tcp}");

    // Installed: the same connection is no longer denied by destination.
    connect_from(&view.netns, RESOLVED, 443);
    assert_eq!(denied(&agent), denied_before);

    let mut reasons = Vec::new();
    while let Ok(r) = audit.try_recv() {
        reasons.push(r.reason);
    }
    // The TCP repeat was answered from the stub's cache: not forwarded, not installed again.
    assert_eq!(reasons, vec!["dns_refused", "allowed"]);
    assert_eq!(stub.view().installed_addrs, 1);
    assert_eq!(stub.view().cached, 1);

    // The denied connection is in the audit log, attributed to the job.
    t1_stop.store(true, std::sync::atomic::Ordering::Relaxed);
    t1_thread.join().unwrap();
    let mut deny = None;
    while let Ok(r) = t1_audit.try_recv() {
        if r.reason == "destination_denied" {
            deny = Some(r);
        }
    }
    let deny = deny.expect("a destination_denied audit record");
    assert_eq!(deny.job, "web");
    assert_eq!(deny.tenant, "acme");
    assert_eq!(deny.dst, Some(IpAddr::V4(RESOLVED)));
    assert_eq!(deny.port, 443);
    assert_eq!(deny.proto, "tcp");

    stop.send(true).unwrap();
    drop(rt);
    agent.delete_job(job_key).unwrap();
    assert!(scope.leftover_netns().is_empty());
}
