//! PRIVILEGED (root): an agent is replaced twice while a job resolves names in a loop, and no
//! lookup is lost.
//!
//! Everything runs in a network namespace of its own (the "node", as on the testbed): the agents
//! (`snas_agent::node::run`, the real verifier of a signed policy, in-memory dataplane) bind the DNS stub on `0.0.0.0:53` there,
//! the fake proxy resolver and control endpoint listen on the node's 127.0.0.1. A job's sandbox
//! asks the stub at its gateway address, over UDP and TCP, one lookup after another with a
//! single attempt each; a new agent started with the same configuration takes the sockets over
//! from the running one (the hand-over protocol of `snas_agent::handover`), which then exits by
//! itself. Some names are new (forwarded, answered by the resolver after 100 ms), so forwards
//! are in flight while the sockets change hands.
#![allow(clippy::unwrap_used)]

mod common;

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::Command;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{unix_http, AgentThread, Scope};
use hickory_proto::op::{Message, MessageType, Query, ResponseCode};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{Name, RData, Record, RecordType};
use snas_agent::jobnet::run_in_netns;
use snas_agent::node::RunOptions;
use snas_agent::seams::BundleVerifier;
use snas_agent::AgentConfig;
use snas_policy::{parse_policy, sign, PolicyKey, TrustBundle};

const ANSWER: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);

/// A fake proxy resolver: names starting with `new` are answered after 100 ms.
async fn resolver() -> u16 {
    let udp = Arc::new(tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap());
    let port = udp.local_addr().unwrap().port();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 4096];
        while let Ok((n, from)) = udp.recv_from(&mut buf).await {
            let q = Message::from_vec(&buf[..n]).unwrap();
            let udp = udp.clone();
            tokio::spawn(async move {
                let name = q.queries()[0].name().clone();
                if name.to_ascii().starts_with("new") {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                let mut a = Message::new();
                a.set_id(q.id())
                    .set_message_type(MessageType::Response)
                    .set_recursion_desired(true)
                    .set_recursion_available(true);
                for x in q.queries() {
                    a.add_query(x.clone());
                }
                a.add_answer(Record::from_rdata(name, 60, RData::A(A(ANSWER))));
                let _ = udp.send_to(&a.to_vec().unwrap(), from).await;
            });
        }
    });
    port
}

/// A proxy control endpoint that is always healthy.
async fn control() -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut c, _)) = l.accept().await {
            let mut b = [0u8; 512];
            let _ = c.read(&mut b).await;
            let _ = c.write_all(b"HTTP/1.1 200 OK\r\n\r\nok").await;
        }
    });
    port
}

fn key() -> PolicyKey {
    PolicyKey::from_seed("k1", [7; 32]).unwrap()
}

fn verifier() -> Arc<BundleVerifier> {
    Arc::new(BundleVerifier::new(
        TrustBundle::from_keys([("k1", key().public_pem().unwrap())]).unwrap(),
    ))
}

/// What the sandbox's lookup loop saw.
#[derive(Debug, Default)]
struct Seen {
    done: AtomicUsize,
    lost: Mutex<Vec<(usize, String)>>,
    slowest: Mutex<Duration>,
}

fn query(name: &str, id: u16) -> Vec<u8> {
    let mut m = Message::new();
    m.set_id(id)
        .set_recursion_desired(true)
        .add_query(Query::query(Name::from_str(name).unwrap(), RecordType::A));
    m.to_vec().unwrap()
}

/// One lookup with a single attempt (3 s), UDP or TCP.
fn lookup(server: SocketAddr, name: &str, id: u16, tcp: bool) -> Result<(), String> {
    use std::io::{Read, Write};
    let q = query(name, id);
    let wait = Some(Duration::from_secs(3));
    let answer = if tcp {
        let mut s = std::net::TcpStream::connect_timeout(&server, Duration::from_secs(3))
            .map_err(|e| format!("connect: {e}"))?;
        s.set_read_timeout(wait).unwrap();
        let mut framed = (q.len() as u16).to_be_bytes().to_vec();
        framed.extend_from_slice(&q);
        s.write_all(&framed).map_err(|e| format!("send: {e}"))?;
        let mut len = [0u8; 2];
        s.read_exact(&mut len).map_err(|e| format!("read: {e}"))?;
        let mut b = vec![0u8; usize::from(u16::from_be_bytes(len))];
        s.read_exact(&mut b).map_err(|e| format!("read: {e}"))?;
        b
    } else {
        let s = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
        s.set_read_timeout(wait).unwrap();
        s.send_to(&q, server).map_err(|e| format!("send: {e}"))?;
        let mut b = vec![0u8; 4096];
        let n = s.recv(&mut b).map_err(|e| format!("no answer: {e}"))?;
        b.truncate(n);
        b
    };
    let m = Message::from_vec(&answer).map_err(|e| e.to_string())?;
    let ok = m.id() == id
        && m.response_code() == ResponseCode::NoError
        && m.answers().iter().any(|r| r.data() == &RData::A(A(ANSWER)));
    if ok {
        Ok(())
    } else {
        Err(format!("answer {:?} {:?}", m.response_code(), m.answers()))
    }
}

/// The sandbox's loop: every 5 ms a lookup, alternating UDP and TCP; every 20th a name never
/// asked before (forwarded; 10 new names a second, within the default budget of 20/s).
fn lookup_loop(server: SocketAddr, stop: Arc<AtomicBool>, seen: Arc<Seen>) {
    let names = ["api.example.com.", "www.example.com.", "cdn.example.com."];
    let mut i = 0usize;
    while !stop.load(Ordering::Relaxed) {
        let name = if i % 20 == 0 {
            format!("new{i}.example.com.")
        } else {
            names[i % names.len()].to_owned()
        };
        let t = Instant::now();
        if let Err(e) = lookup(server, &name, i as u16, i % 2 == 1) {
            seen.lost.lock().unwrap().push((i, format!("{name}: {e}")));
        }
        let took = t.elapsed();
        let mut slowest = seen.slowest.lock().unwrap();
        *slowest = (*slowest).max(took);
        drop(slowest);
        seen.done.fetch_add(1, Ordering::Relaxed);
        i += 1;
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn wait_until(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn privileged_a_lookup_loop_loses_nothing_while_the_agent_is_replaced_twice() {
    let scope = Scope::new("rst");
    let node_ns = format!("{}node", scope.netns_prefix);
    let ok = Command::new("ip")
        .args(["netns", "add", &node_ns])
        .status()
        .unwrap()
        .success();
    assert!(ok, "ip netns add {node_ns}");
    let node_path = PathBuf::from("/run/netns").join(&node_ns);
    let base = common::agent_config(&scope, "10.254.60.0/24");
    let jti = format!("jti-{}", scope.netns_prefix);
    let outcome = run_in_netns(&node_path, move || {
        let lo = Command::new("ip")
            .args(["link", "set", "lo", "up"])
            .status()
            .unwrap();
        assert!(lo.success());
        let helpers = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let (resolver_port, control_port) =
            helpers.block_on(async { (resolver().await, control().await) });
        let text = format!(
            "node_name = \"test-node\"\nunderlay_interface = \"lo\"\nunderlay_address = \"192.0.2.7\"\ntrust_bundle = \"/nonexistent/trust.json\"\njob_pool = \"{}\"\napi_socket = \"{}\"\npolicy_listen = \"127.0.0.1:0\"\nstate_dir = \"{}\"\nnetns_prefix = \"{}\"\nhost_veth_prefix = \"{}\"\ndns_listen = \"0.0.0.0\"\nproxies = [\"127.0.0.1\"]\nproxy_control_port = {control_port}\nproxy_resolver_port = {resolver_port}\n",
            base.job_pool,
            base.api_socket.display(),
            base.state_dir.display(),
            base.netns_prefix,
            base.host_veth_prefix,
        );
        let config = AgentConfig::from_toml_str(&text, std::path::Path::new("t.toml")).unwrap();
        let socket = config.api_socket.clone();
        let handover = snas_agent::node::handover_socket(&config);

        let mut first = AgentThread::start(config.clone(), verifier(), RunOptions::default());
        wait_until("the first agent", Duration::from_secs(10), || {
            handover.exists()
        });
        let mut draft = parse_policy(
            "tenant = \"acme\"\njob = \"resolver\"\n[[egress]]\nhost = \"*.example.com\"\n",
        )
        .unwrap();
        draft.node = Some("192.0.2.7".parse().unwrap());
        let token = sign(
            &draft.to_claims(
                &jti,
                snas_wire::PolicySerial(1),
                std::time::SystemTime::now(),
            ),
            &key(),
        )
        .unwrap();
        let (status, job) = unix_http(&socket, "POST", "/v1/jobs", &token);
        assert_eq!(status, 201, "{job}");
        let gateway: Ipv4Addr = job["gateway_ip"].as_str().unwrap().parse().unwrap();
        let job_ns = PathBuf::from(job["netns_path"].as_str().unwrap());
        let server = SocketAddr::from((gateway, 53));

        let stop = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(Seen::default());
        let client = {
            let (stop, seen) = (stop.clone(), seen.clone());
            std::thread::spawn(move || {
                run_in_netns(&job_ns, move || lookup_loop(server, stop, seen)).unwrap()
            })
        };
        let at_least = |n: usize| {
            let seen = seen.clone();
            wait_until(
                &format!("{n} lookups"),
                Duration::from_secs(30),
                move || seen.done.load(Ordering::Relaxed) >= n,
            )
        };
        at_least(200);

        // First replacement: the old agent exits by itself once the new one serves.
        let mut second = AgentThread::start(config.clone(), verifier(), RunOptions::default());
        first
            .exits_by_itself(Duration::from_secs(20))
            .expect("the first agent hands over and exits cleanly");
        let after_first = seen.done.load(Ordering::Relaxed);
        at_least(after_first + 200);
        let (status, list) = unix_http(&socket, "GET", "/v1/jobs", "");
        assert_eq!(status, 200);
        assert_eq!(
            list.as_array().unwrap().len(),
            1,
            "the job was adopted: {list}"
        );

        // Second replacement.
        let third = AgentThread::start(config.clone(), verifier(), RunOptions::default());
        second
            .exits_by_itself(Duration::from_secs(20))
            .expect("the second agent hands over and exits cleanly");
        let after_second = seen.done.load(Ordering::Relaxed);
        at_least(after_second + 200);

        stop.store(true, Ordering::Relaxed);
        client.join().unwrap();
        let (status, m) = unix_http(&socket, "GET", "/metrics", "");
        assert_eq!(status, 200);
        let m = m.as_str().unwrap().to_owned();
        for name in ["dns-udp", "dns-tcp", "policy", "api"] {
            assert!(
                m.contains(&format!(
                    "snas_agent_listen_socket{{socket=\"{name}\",source=\"handover\"}} 1\n"
                )),
                "{name} was not handed over: {m}"
            );
        }
        let (status, _) = unix_http(
            &socket,
            "DELETE",
            &format!("/v1/jobs/{}", job["job_key"].as_str().unwrap()),
            "",
        );
        assert_eq!(status, 204);
        third.stop().unwrap();
        assert!(!socket.exists(), "a stopped agent removes its API socket");
        assert!(!handover.exists(), "and its hand-over socket");
        drop(helpers);
        let lost = seen.lost.lock().unwrap().clone();
        let slowest = *seen.slowest.lock().unwrap();
        (seen.done.load(Ordering::Relaxed), lost, slowest)
    });
    let (done, lost, slowest) = outcome.unwrap();
    println!("{done} lookups across two agent replacements, slowest {slowest:?}");
    assert!(
        lost.is_empty(),
        "{} of {done} lookups lost, first: {:?}",
        lost.len(),
        &lost[..lost.len().min(10)]
    );
    assert!(
        scope.leftover_netns().iter().all(|n| *n == node_ns),
        "only the node is left"
    );
}
