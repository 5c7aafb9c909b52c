//! End-to-end (root; `cargo build -p snas` first): tier 2 holds on its own. With node 1's
//! tier-1 maps deliberately widened, the proxy still refuses what the signed policy forbids;
//! forged GENEVE (from a non-node address, with a job key the node does not own, with a
//! tampered or expired policy) is dropped and counted by the proxy.
#![allow(clippy::unwrap_used)]

mod e2e_support;

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::time::{Duration, SystemTime};

use e2e_support::*;
use snas_bpf::{PortRule, RuleProtocol, Tier1};
use snas_testbed::Testbed;
use snas_wire::build::{tcp as build_tcp, TcpSpec};
use snas_wire::geneve::{encapsulate, OuterParams, SnasOption};
use snas_wire::TcpFlags;

/// Best of 3: a datagram on a connected UDP socket, then `recv` until the ICMP error
/// arrives; prints `ERRNAME ms`.
const PY_UDP_REFUSED: &str = r#"
import socket, sys, time, errno
ip, port = sys.argv[1], int(sys.argv[2])
best = None
for _ in range(3):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(2.0)
    s.connect((ip, port))
    t = time.monotonic()
    try:
        s.send(b"x"); s.recv(64); r = "ANSWERED"
    except socket.timeout:
        r = "TIMEOUT"
    except OSError as e:
        r = errno.errorcode.get(e.errno, str(e.errno))
    ms = (time.monotonic() - t) * 1000.0
    s.close()
    if best is None or (r != "TIMEOUT" and ms < best[1]):
        best = (r, ms)
print(best[0], "%.3f" % best[1])
"#;

const PROXY_1: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 21);

#[test]
fn tier2_refuses_a_destination_that_widened_tier1_lets_through() {
    let _s = serial();
    let tb = testbed_with_proxies();
    let _logs = LogsOnFailure(&tb);
    let job = Job::acme(&tb, "[[egress]]\nhost = \"api.example.com:80\"\n");
    // Before: tier 1 refuses 203.0.113.20 itself.
    assert_refused_fast(&job, "203.0.113.20", 80);
    let tier1_before = tier1_drops(&tb, &job, "destination_denied");
    assert!(tier1_before > 0);

    // The test hook: a compromised node opens the whole /24 on every port for this job.
    let t1 = Tier1::open_pinned(&tb.topology().bpf_pin_dir(1)).unwrap();
    t1.allow_cidr(
        job.key(),
        "203.0.113.0/24".parse().unwrap(),
        &[PortRule::all(RuleProtocol::Any)],
        false,
    )
    .unwrap();
    t1.allow_ip(
        job.key(),
        Ipv4Addr::new(203, 0, 113, 20),
        &[PortRule::all(RuleProtocol::Any)],
        Some(Duration::from_secs(600)),
    )
    .unwrap();

    let denied_before: f64 = (1..=2)
        .map(|n| proxy_drops(&tb, n, "destination_denied"))
        .sum();
    // Now the SYN leaves the node; the proxy refuses it (RST back through the overlay). The
    // first SYN may wait for the proxy's policy fetch, so allow its retransmission here and
    // check the speed of the refusal afterwards.
    let out = job.python(
        r#"
import socket, errno
s = socket.socket(); s.settimeout(5)
try:
    s.connect(("203.0.113.20", 80)); s.sendall(b"GET / HTTP/1.0\r\n\r\n"); print("CONNECTED", s.recv(200))
except OSError as e:
    print(errno.errorcode.get(e.errno, str(e)))
"#,
        &[],
    );
    assert!(
        out.contains("ECONNREFUSED") || out.contains("ECONNRESET"),
        "{out}"
    );
    assert!(!out.contains("hello from"), "{out}");
    assert_refused_fast(&job, "203.0.113.20", 80);
    assert_refused_fast(&job, "203.0.113.10", 7);
    // UDP, which no rule allows at all: the proxy answers with ICMP unreachable.
    let out = job.python(PY_UDP_REFUSED, &["203.0.113.10", "7"]);
    let mut it = out.split_whitespace();
    let (r, ms) = (
        it.next().unwrap_or_default(),
        it.next()
            .and_then(|m| m.parse::<f64>().ok())
            .unwrap_or(f64::MAX),
    );
    // Port unreachable (ECONNREFUSED) or administratively prohibited (EHOSTUNREACH).
    assert!(
        ["ECONNREFUSED", "EHOSTUNREACH"].contains(&r),
        "UDP to a forbidden port: {out}"
    );
    assert!(ms < 10.0, "UDP refused only after {ms:.3} ms");
    let denied_after: f64 = (1..=2)
        .map(|n| proxy_drops(&tb, n, "destination_denied") + proxy_drops(&tb, n, "port_denied"))
        .sum();
    assert!(
        denied_after > denied_before,
        "the proxies counted no refusal"
    );
    // Tier 1 let these through: its destination_denied count did not grow for them.
    assert_eq!(tier1_drops(&tb, &job, "destination_denied"), tier1_before);
}

/// A TCP SYN from the job's sandbox address to `dst`, wrapped in the overlay with `opt`.
fn forged(src: Ipv4Addr, opt: SnasOption, sandbox: Ipv4Addr, dst: SocketAddrV4) -> Vec<u8> {
    let inner = build_tcp(&TcpSpec {
        src: SocketAddr::from((sandbox, 40_000)),
        dst: SocketAddr::V4(dst),
        seq: 1,
        ack: 0,
        flags: TcpFlags::SYN,
        window: 64_240,
        payload: &[],
    })
    .unwrap();
    let mut pkt = encapsulate(
        &OuterParams {
            src,
            dst: PROXY_1,
            src_port: OuterParams::source_port_for_hash(0x1234),
        },
        &opt,
        &inner,
    )
    .unwrap();
    // The kernel supplies outer IPv4 + UDP: send only the GENEVE part.
    pkt.drain(..28);
    pkt
}

/// Sends `payload` to proxy 1's GENEVE port from `bind` inside node 1's namespace, 5 times.
fn send_from_node1(tb: &Testbed, bind: Ipv4Addr, payload: Vec<u8>) {
    tb.in_netns(&tb.topology().node_ns(1), move || {
        let s = UdpSocket::bind((bind, 0)).unwrap();
        for _ in 0..5 {
            s.send_to(&payload, (PROXY_1, 6081)).unwrap();
            std::thread::sleep(Duration::from_millis(20));
        }
    })
    .unwrap();
}

fn internet_tx(tb: &Testbed) -> f64 {
    proxy_metrics(tb, 1)
        .get("snas_proxy_packets_total{direction=\"internet_tx\"}")
        .copied()
        .unwrap_or(0.0)
}

/// Adds 192.0.2.99 to node 1's underlay interface; removes it when dropped.
struct ExtraAddr<'a>(&'a Testbed);
impl<'a> ExtraAddr<'a> {
    fn add(tb: &'a Testbed) -> ExtraAddr<'a> {
        let ns = tb.topology().node_ns(1);
        snas_testbed::netns::ip(&["-n", &ns, "addr", "add", "192.0.2.99/24", "dev", "ul0"])
            .unwrap();
        ExtraAddr(tb)
    }
}
impl Drop for ExtraAddr<'_> {
    fn drop(&mut self) {
        let ns = self.0.topology().node_ns(1);
        let _ = snas_testbed::netns::ip(&["-n", &ns, "addr", "del", "192.0.2.99/24", "dev", "ul0"]);
    }
}

#[test]
fn forged_geneve_from_a_non_node_or_for_a_foreign_job_is_dropped_and_counted() {
    let _s = serial();
    let tb = testbed_with_proxies();
    let _logs = LogsOnFailure(&tb);
    let n1 = tb.topology().node_addr(1);
    let p = |node: &str| {
        policy(
            "acme",
            &format!("node = \"{node}\"\n[[egress]]\nhost = \"api.example.com:80\"\n"),
        )
    };
    let job1 = Job::start(&tb, 1, &p("192.0.2.11"));
    let job2 = Job::start(&tb, 2, &p("192.0.2.12"));
    let opt = |job: &Job| SnasOption {
        tenant_id: snas_policy::identity::tenant_id("acme"),
        job_key: snas_wire::JobKey(job.key().get()),
        policy_serial: snas_wire::PolicySerial(1),
    };
    let sandbox = |job: &Job| match job.info().sandbox_ip {
        std::net::IpAddr::V4(ip) => ip,
        other => panic!("job address {other}"),
    };
    let api = SocketAddrV4::new(Ipv4Addr::new(203, 0, 113, 10), 80);
    let tx0 = internet_tx(&tb);

    // 1. From an address that is not a configured node, with a real job's identity.
    let before = proxy_drops(&tb, 1, "untrusted_source");
    {
        let _a = ExtraAddr::add(&tb);
        let pkt = forged(
            Ipv4Addr::new(192, 0, 2, 99),
            opt(&job1),
            sandbox(&job1),
            api,
        );
        send_from_node1(&tb, Ipv4Addr::new(192, 0, 2, 99), pkt);
    }
    wait_until(Duration::from_secs(3), "untrusted_source counted", || {
        proxy_drops(&tb, 1, "untrusted_source") >= before + 5.0
    });

    // 2. From node 1 with a random job key: node 1's agent knows no such job.
    let mut o = opt(&job1);
    o.job_key.0 ^= 0x5a5a_5a5a_0000_0001;
    // (`unknown_job` or `geneve_unknown_job`: the agent answered 404 for the key.)
    let unknown =
        |tb: &Testbed| proxy_drops(tb, 1, "geneve_unknown_job") + proxy_drops(tb, 1, "unknown_job");
    let before = unknown(&tb);
    send_from_node1(&tb, n1, forged(n1, o, sandbox(&job1), api));
    wait_until(Duration::from_secs(5), "random job key counted", || {
        unknown(&tb) > before
    });

    // 3. From node 1 with the key of a job that runs on node 2.
    let foreign = |tb: &Testbed| unknown(tb) + proxy_drops(tb, 1, "node_mismatch");
    let before = foreign(&tb);
    send_from_node1(&tb, n1, forged(n1, opt(&job2), sandbox(&job2), api));
    wait_until(Duration::from_secs(5), "foreign job key counted", || {
        foreign(&tb) > before
    });

    // Nothing of it reached the internet.
    assert_eq!(internet_tx(&tb), tx0, "forged packets were forwarded");
}

/// Serves `GET /v1/jobs/{key}/policy` on 192.0.2.11:7070 (node 1's policy port, agent 1
/// stopped) with fixed tokens: what a compromised node could hand a proxy.
struct FakeEndpoint {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}
impl Drop for FakeEndpoint {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn fake_policy_endpoint(tb: &Testbed, tokens: Vec<(String, String)>) -> FakeEndpoint {
    let listener = tb
        .in_netns(&tb.topology().node_ns(1), || {
            std::net::TcpListener::bind("192.0.2.11:7070").unwrap()
        })
        .unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = stop.clone();
    let thread = std::thread::spawn(move || {
        use std::io::{Read, Write};
        listener.set_nonblocking(true).unwrap();
        while !flag.load(std::sync::atomic::Ordering::SeqCst) {
            match listener.accept() {
                Ok((mut c, _)) => {
                    c.set_nonblocking(false).unwrap();
                    c.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
                    let mut buf = [0u8; 2048];
                    let n = c.read(&mut buf).unwrap_or(0);
                    let req = String::from_utf8_lossy(&buf[..n]).into_owned();
                    let body = tokens
                        .iter()
                        .find(|(k, _)| req.contains(k.as_str()))
                        .map(|(_, t)| t.clone());
                    let resp = match body {
                        Some(b) => format!("HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{b}", b.len()),
                        None => "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".into(),
                    };
                    let _ = c.write_all(resp.as_bytes());
                }
                Err(_) => std::thread::sleep(Duration::from_millis(10)),
            }
        }
    });
    FakeEndpoint {
        stop,
        thread: Some(thread),
    }
}

#[test]
fn forged_geneve_with_a_tampered_or_expired_policy_is_dropped_and_counted() {
    let _s = serial();
    let tb = testbed_with_proxies();
    let _logs = LogsOnFailure(&tb);
    let key = tb.signing_key().unwrap().unwrap();
    let draft = snas_policy::parse_policy(&policy(
        "acme",
        "node = \"192.0.2.11\"\n[[egress]]\nhost = \"api.example.com:80\"\n",
    ))
    .unwrap();

    // Tampered: a valid token whose claims were edited after signing (signature no longer fits).
    let jti_t = "e2e-tampered-0001";
    let good = snas_policy::sign(
        &draft.to_claims(jti_t, snas_wire::PolicySerial(1), SystemTime::now()),
        &key,
    )
    .unwrap();
    let mut parts: Vec<String> = good.split('.').map(str::to_owned).collect();
    let payload = &mut parts[1];
    let last = payload.pop().unwrap();
    payload.push(if last == 'A' { 'B' } else { 'A' });
    let tampered = parts.join(".");
    // Expired: signed correctly, but two hours ago with a one-hour lifetime.
    let jti_e = "e2e-expired-0001";
    let expired = snas_policy::sign(
        &draft.to_claims(
            jti_e,
            snas_wire::PolicySerial(1),
            SystemTime::now() - Duration::from_secs(7200),
        ),
        &key,
    )
    .unwrap();
    let kt = snas_policy::identity::job_key(jti_t).to_string();
    let ke = snas_policy::identity::job_key(jti_e).to_string();

    tb.stop_agent(1);
    let server = fake_policy_endpoint(&tb, vec![(kt.clone(), tampered), (ke.clone(), expired)]);
    let n1 = tb.topology().node_addr(1);
    let api = SocketAddrV4::new(Ipv4Addr::new(203, 0, 113, 10), 80);
    let sandbox = Ipv4Addr::new(10, 255, 1, 2);
    let tx0 = internet_tx(&tb);
    for (k, reason) in [(&kt, "policy_invalid"), (&ke, "policy_expired")] {
        let opt = SnasOption {
            tenant_id: snas_policy::identity::tenant_id("acme"),
            job_key: snas_wire::JobKey(u64::from_str_radix(k, 16).unwrap()),
            policy_serial: snas_wire::PolicySerial(1),
        };
        let before = proxy_drops(&tb, 1, reason);
        send_from_node1(&tb, n1, forged(n1, opt, sandbox, api));
        wait_until(Duration::from_secs(5), reason, || {
            proxy_drops(&tb, 1, reason) > before
        });
    }
    assert_eq!(
        internet_tx(&tb),
        tx0,
        "packets of an unverifiable job were forwarded"
    );
    drop(server);
    tb.start_agent(1).unwrap();
}

/// A DNS query for `name` (type A) with the job-identity EDNS option (code 65053) when
/// `identity` is given.
fn query(name: &str, identity: Option<SnasOption>) -> Vec<u8> {
    let mut q = vec![0x4a, 0x11, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 1];
    for label in name.split('.') {
        q.push(u8::try_from(label.len()).unwrap());
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]); // root, type A, class IN
                                           // OPT: root name, type 41, UDP size 1232, TTL 0.
    q.extend_from_slice(&[0, 0, 41, 0x04, 0xd0, 0, 0, 0, 0]);
    match identity {
        Some(o) => {
            q.extend_from_slice(&20u16.to_be_bytes());
            q.extend_from_slice(&65053u16.to_be_bytes());
            q.extend_from_slice(&16u16.to_be_bytes());
            q.extend_from_slice(&o.tenant_id.get().to_be_bytes());
            q.extend_from_slice(&o.job_key.get().to_be_bytes());
            q.extend_from_slice(&o.policy_serial.get().to_be_bytes());
        }
        None => q.extend_from_slice(&0u16.to_be_bytes()),
    }
    q
}

/// Sends a query to proxy 1's resolver from `bind` in node 1's namespace; (rcode, answers).
fn ask_resolver(tb: &Testbed, bind: Ipv4Addr, q: Vec<u8>) -> (u8, u16) {
    tb.in_netns(&tb.topology().node_ns(1), move || {
        let s = UdpSocket::bind((bind, 0)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        let mut buf = [0u8; 2048];
        // The first query may wait for the policy fetch; one retry.
        for _ in 0..2 {
            s.send_to(&q, (PROXY_1, 5353)).unwrap();
            if let Ok((n, _)) = s.recv_from(&mut buf) {
                assert!(n >= 12);
                return (buf[3] & 0x0f, u16::from_be_bytes([buf[6], buf[7]]));
            }
        }
        panic!("no answer from the proxy's resolver");
    })
    .unwrap()
}

#[test]
fn the_proxy_resolver_refuses_what_a_compromised_node_asks_outside_the_policy() {
    let _s = serial();
    let tb = testbed_with_proxies();
    let _logs = LogsOnFailure(&tb);
    let job = Job::acme(&tb, "[[egress]]\nhost = \"api.example.com:80\"\n");
    let id = SnasOption {
        tenant_id: snas_policy::identity::tenant_id("acme"),
        job_key: snas_wire::JobKey(job.key().get()),
        policy_serial: snas_wire::PolicySerial(1),
    };
    let n1 = tb.topology().node_addr(1);
    const REFUSED: u8 = 5;
    // The node asks directly, bypassing its own stub: allowed name answered ...
    let (rcode, answers) = ask_resolver(&tb, n1, query("api.example.com", Some(id)));
    assert_eq!((rcode, answers), (0, 1), "api.example.com for the job");
    // ... a name outside the job's policy refused, also with the job's identity ...
    let (rcode, _) = ask_resolver(&tb, n1, query("blocked.example.com", Some(id)));
    assert_eq!(rcode, REFUSED, "blocked.example.com");
    // ... no identity: refused; an identity nobody signed: refused.
    let (rcode, _) = ask_resolver(&tb, n1, query("api.example.com", None));
    assert_eq!(rcode, REFUSED, "query without job identity");
    let mut other = id;
    other.job_key.0 ^= 1;
    let (rcode, _) = ask_resolver(&tb, n1, query("api.example.com", Some(other)));
    assert_eq!(rcode, REFUSED, "unknown job key");
    // From an address that is not a node: refused.
    let _a = ExtraAddr::add(&tb);
    let (rcode, _) = ask_resolver(
        &tb,
        Ipv4Addr::new(192, 0, 2, 99),
        query("api.example.com", Some(id)),
    );
    assert_eq!(rcode, REFUSED, "query from a non-node address");
}
