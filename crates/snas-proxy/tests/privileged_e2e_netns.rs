//! Privileged (root): the proxy daemon end to end in three network namespaces, without the
//! agent. A "node" namespace sends GENEVE datagrams built with snas_wire to the proxy and
//! serves the job's signed policy on :7070; the "proxy" namespace runs `Daemon` (TUN, routes,
//! workers); an "internet" namespace runs TCP and UDP echo servers reached through the
//! proxy's egress pool. Checks: UDP echo and a TCP handshake come back GENEVE-encapsulated, a
//! denied destination gets an RST, draining refuses new flows but not established ones,
//! healthz/metrics/flows and the audit log. Every name is unique per run; a guard deletes the
//! namespaces (and with them the veths and the TUN device).
#![allow(clippy::unwrap_used)]

mod common;

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use common::netns::{in_ns, spawn_in_ns, topology};
use snas_policy::authoring::parse_policy;
use snas_policy::identity;
use snas_policy::jws::sign;
use snas_policy::keys::PolicyKey;
use snas_proxy::config::ProxyConfig;
use snas_proxy::daemon::Daemon;
use snas_wire::build::{tcp, udp, TcpSpec, UdpSpec};
use snas_wire::geneve::{parse_payload, write_geneve_header, InnerProto, SnasOption, GENEVE_PORT};
use snas_wire::TcpFlags;

const NODE: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 11);
const PROXY: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 21);
const ECHO: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
const DENIED: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 20);
const SANDBOX: Ipv4Addr = Ipv4Addr::new(10, 255, 0, 2);
const JTI: &str = "jti-e2e-proxy-0000001";

const POLICY: &str = r#"
tenant = "acme"
job = "e2e"
node = "192.0.2.11"
[[egress]]
cidr = "203.0.113.10/32"
ports = "7"
protocol = "any"
"#;

/// The token of `policy` for policy id `jti` and its `exp` (Unix seconds).
fn signed_policy(key: &PolicyKey, jti: &str, policy: &str) -> (String, u64) {
    let draft = parse_policy(policy).unwrap();
    let claims = draft.to_claims(jti, snas_wire::PolicySerial(1), SystemTime::now());
    (sign(&claims, key).unwrap(), claims.exp)
}

/// The node's policy endpoint: `GET /v1/jobs/{key}/policy` → the job's token.
fn serve_policy(listener: TcpListener, jobs: Vec<(snas_wire::JobKey, String)>) {
    for s in listener.incoming() {
        let Ok(mut s) = s else { continue };
        let mut buf = [0u8; 2048];
        let n = s.read(&mut buf).unwrap_or(0);
        let req = String::from_utf8_lossy(&buf[..n]);
        let token = jobs.iter().find_map(|(job_key, token)| {
            req.starts_with(&format!(
                "GET {} ",
                snas_proxy::api::paths::agent_policy(*job_key)
            ))
            .then_some(token)
        });
        let resp = if let Some(token) = token {
            format!(
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{token}",
                token.len()
            )
        } else {
            "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".into()
        };
        let _ = s.write_all(resp.as_bytes());
    }
}

/// TCP and UDP echo on `ECHO:7`. The UDP service notes the order in which datagrams whose
/// payload is `flood` (false) or `turn` (true) arrived in `delivered` — the order in which
/// the proxy wrote them to its TUN device, since the kernel delivers a TUN write in the
/// writer's context.
fn echo_servers(stop: Arc<AtomicBool>, delivered: Arc<std::sync::Mutex<Vec<bool>>>) {
    let u = UdpSocket::bind((ECHO, 7)).unwrap();
    u.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let t = TcpListener::bind((ECHO, 7)).unwrap();
    std::thread::spawn(move || {
        for s in t.incoming() {
            let Ok(mut s) = s else { continue };
            // The test never ACKs the echo, so Nagle would hold the sub-MSS tails back.
            s.set_nodelay(true).unwrap();
            std::thread::spawn(move || {
                let mut b = [0u8; 1500];
                while let Ok(n) = s.read(&mut b) {
                    if n == 0 || s.write_all(&b[..n]).is_err() {
                        break;
                    }
                }
            });
        }
    });
    // Room for a burst: the fairness test reads the order in which the proxy delivered.
    big_receive_buffer(&u);
    let mut b = [0u8; 1500];
    while !stop.load(Ordering::Relaxed) {
        if let Ok((n, from)) = u.recv_from(&mut b) {
            match &b[..n] {
                b"flood" => delivered.lock().unwrap().push(false),
                b"turn" => delivered.lock().unwrap().push(true),
                _ => {}
            }
            let _ = u.send_to(&b[..n], from);
        }
    }
}

fn option() -> SnasOption {
    SnasOption {
        tenant_id: identity::tenant_id("acme"),
        job_key: identity::job_key(JTI),
        policy_serial: snas_wire::PolicySerial(1),
    }
}

fn encap(inner: &[u8]) -> Vec<u8> {
    encap_for(&option(), inner)
}

fn encap_for(option: &SnasOption, inner: &[u8]) -> Vec<u8> {
    let mut p = vec![0u8; 28 + inner.len()];
    write_geneve_header(&mut p, option, InnerProto::Ipv4).unwrap();
    p[28..].copy_from_slice(inner);
    p
}

/// A decapsulated reply: (src, dst, protocol, tcp flags, l4 payload).
#[derive(Debug)]
struct Reply {
    src: SocketAddrV4,
    dst: SocketAddrV4,
    proto: u8,
    flags: u8,
    seq: u32,
    payload: Vec<u8>,
}

fn decode(udp_payload: &[u8]) -> Option<Reply> {
    let (opt, r) = decode_any(udp_payload)?;
    assert_eq!(opt, option(), "reply carries the job's option");
    Some(r)
}

/// A decapsulated reply of any job, with the option it carries.
fn decode_any(udp_payload: &[u8]) -> Option<(SnasOption, Reply)> {
    let g = parse_payload(udp_payload).ok()?;
    let ip = &udp_payload[g.inner_offset..];
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    let proto = ip[9];
    let total = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
    let src_ip = Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]);
    let dst_ip = Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]);
    let l4 = &ip[ihl..total];
    let (sp, dp) = (
        u16::from_be_bytes([l4[0], l4[1]]),
        u16::from_be_bytes([l4[2], l4[3]]),
    );
    let (flags, seq, payload) = match proto {
        6 => {
            let doff = usize::from(l4[12] >> 4) * 4;
            let seq = u32::from_be_bytes([l4[4], l4[5], l4[6], l4[7]]);
            (l4[13], seq, l4[doff..].to_vec())
        }
        17 => (0, 0, l4[8..].to_vec()),
        _ => (0, 0, l4.to_vec()),
    };
    Some((
        g.option,
        Reply {
            src: SocketAddrV4::new(src_ip, sp),
            dst: SocketAddrV4::new(dst_ip, dp),
            proto,
            flags,
            seq,
            payload,
        },
    ))
}

/// Sends `inner` (encapsulated) every 200 ms until a reply to `sport` arrives (policy fetch
/// drops the first packets), for at most 5 s.
fn exchange(sock: &UdpSocket, inner: &[u8], sport: u16) -> Reply {
    exchange_via(sock, sock, inner, sport)
}

/// As [`exchange`], sending from `tx` (another outer source port, as tier 1 uses one per flow
/// hash) and receiving on `rx` (port 6081, where the proxy answers).
fn exchange_via(tx: &UdpSocket, sock: &UdpSocket, inner: &[u8], sport: u16) -> Reply {
    let deadline = Instant::now() + Duration::from_secs(5);
    let dg = encap(inner);
    let mut buf = vec![0u8; 65536];
    while Instant::now() < deadline {
        tx.send_to(&dg, (PROXY, GENEVE_PORT)).unwrap();
        let until = Instant::now() + Duration::from_millis(200);
        while Instant::now() < until {
            if let Ok((n, from)) = sock.recv_from(&mut buf) {
                assert_eq!(from, SocketAddr::from((PROXY, GENEVE_PORT)));
                if let Some(r) = decode(&buf[..n]) {
                    if r.dst.port() == sport {
                        return r;
                    }
                }
            }
        }
    }
    panic!("no reply for port {sport}");
}

fn udp_to(dst: Ipv4Addr, sport: u16, data: &[u8]) -> Vec<u8> {
    udp(&UdpSpec {
        src: SocketAddr::from((SANDBOX, sport)),
        dst: SocketAddr::from((dst, 7)),
        payload: data,
    })
    .unwrap()
}

fn syn_to(dst: Ipv4Addr, sport: u16) -> Vec<u8> {
    tcp(&TcpSpec {
        src: SocketAddr::from((SANDBOX, sport)),
        dst: SocketAddr::from((dst, 7)),
        seq: 1000,
        ack: 0,
        flags: TcpFlags::SYN,
        window: 64240,
        payload: &[],
    })
    .unwrap()
}

fn tcp_seg(sport: u16, seq: u32, ack: u32, flags: TcpFlags, payload: &[u8]) -> Vec<u8> {
    tcp(&TcpSpec {
        src: SocketAddr::from((SANDBOX, sport)),
        dst: SocketAddr::from((ECHO, 7)),
        seq,
        ack,
        flags,
        window: 64240,
        payload,
    })
    .unwrap()
}

/// Sends one datagram and gathers the TCP payload echoed to `sport` (by sequence number)
/// until `want` bytes arrived, for at most 5 s.
fn gather_echo(
    proxy_ns: &str,
    sock: &UdpSocket,
    inner: &[u8],
    sport: u16,
    start_seq: u32,
    want: usize,
) -> Vec<u8> {
    sock.send_to(&encap(inner), (PROXY, GENEVE_PORT)).unwrap();
    let mut got = vec![None::<u8>; want];
    let mut buf = vec![0u8; 65536];
    let deadline = Instant::now() + Duration::from_secs(5);
    while got.iter().any(Option::is_none) && Instant::now() < deadline {
        let Ok((n, _)) = sock.recv_from(&mut buf) else {
            continue;
        };
        let Some(r) = decode(&buf[..n]) else { continue };
        if r.dst.port() != sport || r.proto != 6 {
            continue;
        }
        let off = r.seq.wrapping_sub(start_seq) as usize;
        for (i, b) in r.payload.iter().enumerate() {
            if let Some(slot) = got.get_mut(off + i) {
                *slot = Some(*b);
            }
        }
    }
    if got.iter().any(Option::is_none) {
        let have = got.iter().filter(|b| b.is_some()).count();
        panic!(
            "echo incomplete: {have}/{want} bytes; metrics:\n{}",
            mgmt(proxy_ns, "GET", "/metrics").1
        );
    }
    got.into_iter().flatten().collect()
}

/// The management endpoint's bearer token (written to `control_token_file`).
const CONTROL_TOKEN: &str = "e2e-control-token-0123456789";

/// A request to the proxy's service endpoint (underlay :9090), from the calling namespace.
fn http(method: &str, path: &str) -> (u16, String) {
    request(SocketAddr::from((PROXY, 9090)), method, path, None)
}

/// A request to the proxy's management endpoint (127.0.0.1:9090 inside the proxy's namespace)
/// with the control token.
fn mgmt(proxy_ns: &str, method: &'static str, path: &'static str) -> (u16, String) {
    in_ns(proxy_ns, move || {
        request(
            SocketAddr::from((Ipv4Addr::LOCALHOST, 9090)),
            method,
            path,
            Some(CONTROL_TOKEN),
        )
    })
}

fn request(to: SocketAddr, method: &str, path: &str, token: Option<&str>) -> (u16, String) {
    let mut s = TcpStream::connect(to).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: x\r\n{auth}Connection: close\r\nContent-Length: 0\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let status = out[9..12].parse().unwrap();
    let body = out
        .split_once("\r\n\r\n")
        .map(|x| x.1.to_owned())
        .unwrap_or_default();
    (status, body)
}

const SYN: u8 = 0x02;
const RST: u8 = 0x04;
const ACK: u8 = 0x10;

#[test]
fn one_worker_carries_udp_tcp_and_super_packets_refuses_denied_and_drains() {
    run(1);
}

#[test]
fn two_workers_share_one_engine_consistently() {
    run(2);
}

/// A running topology: namespaces (deleted on drop), the proxy daemon, the echo servers and
/// the node's policy server.
struct Env {
    node: String,
    proxy: String,
    dir: tempfile::TempDir,
    audit: std::path::PathBuf,
    daemon: Option<Daemon>,
    stop: Arc<AtomicBool>,
    /// The job policy's `exp`, Unix seconds.
    exp: u64,
    /// The order of `flood` (false) and `turn` (true) datagrams at the UDP echo service.
    delivered: Arc<std::sync::Mutex<Vec<bool>>>,
    // Last: the namespaces go after the daemon has stopped.
    _guard: common::netns::Netns,
}

impl Drop for Env {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(d) = self.daemon.take() {
            d.stop();
        }
    }
}

/// Starts the topology and the daemon; `tag` makes the names unique per test.
fn start(tag: &str, workers: usize) -> Env {
    start_with(tag, workers, POLICY)
}

/// As [`start`], with the job's policy.
fn start_with(tag: &str, workers: usize, policy: &str) -> Env {
    start_jobs(tag, workers, &[(JTI, policy)], "")
}

/// As [`start`], with jobs (policy id, policy) the node serves and `extra` lines of
/// configuration; the first job's `exp` is the environment's.
fn start_jobs(tag: &str, workers: usize, jobs: &[(&str, &str)], extra: &str) -> Env {
    let p = format!("px{}{tag}{workers}", std::process::id() % 100_000);
    let (guard, [node, proxy, inet]) = topology(&p);
    let dir = tempfile::tempdir().unwrap();
    let key = PolicyKey::from_seed("e2e-key", [9; 32]).unwrap();
    std::fs::create_dir_all(dir.path().join("trust")).unwrap();
    std::fs::write(
        dir.path().join("trust/e2e-key.pub"),
        key.public_pem().unwrap(),
    )
    .unwrap();
    let tokens: Vec<(snas_wire::JobKey, String, u64)> = jobs
        .iter()
        .map(|(jti, policy)| {
            let (token, exp) = signed_policy(&key, jti, policy);
            (identity::job_key(jti), token, exp)
        })
        .collect();
    let exp = tokens[0].2;
    let served: Vec<(snas_wire::JobKey, String)> =
        tokens.into_iter().map(|(k, t, _)| (k, t)).collect();

    let stop = Arc::new(AtomicBool::new(false));
    let s2 = Arc::clone(&stop);
    let delivered = Arc::new(std::sync::Mutex::new(Vec::new()));
    let d2 = Arc::clone(&delivered);
    spawn_in_ns(&inet, move || echo_servers(s2, d2));
    let listener = in_ns(&node, || TcpListener::bind((NODE, 7070)).unwrap());
    spawn_in_ns(&node, move || serve_policy(listener, served));

    let audit = dir.path().join("audit.jsonl");
    let token_file = dir.path().join("control.token");
    std::fs::write(&token_file, CONTROL_TOKEN).unwrap();
    let cfg_text = format!(
        r#"
name = "proxy-e2e"
underlay_addr = "192.0.2.21"
nodes = ["192.0.2.11"]
agent_policy_port = 7070
trust = "{trust}"
egress_pool = ["198.51.100.64/28"]
tun_name = "{p}t"
workers = {workers}
resolver_listen = "192.0.2.21:5353"
upstream_dns = ["203.0.113.53:53"]
control_token_file = "{token}"
audit_log = "{audit}"
state_dir = "{state}"
{extra}
"#,
        trust = dir.path().join("trust").display(),
        token = token_file.display(),
        audit = audit.display(),
        state = dir.path().join("state").display(),
    );
    let cfg = ProxyConfig::parse(&cfg_text, std::path::Path::new("proxy.toml")).unwrap();
    let daemon = in_ns(&proxy, move || Daemon::start(cfg).unwrap());
    Env {
        node,
        proxy,
        dir,
        audit,
        daemon: Some(daemon),
        stop,
        exp,
        delivered,
        _guard: guard,
    }
}

fn run(workers: usize) {
    let mut env = start("w", workers);
    let job_key = identity::job_key(JTI);
    let (node, audit) = (env.node.clone(), env.audit.clone());

    let pns = env.proxy.clone();
    in_ns(&node, move || {
        let sock = UdpSocket::bind((NODE, GENEVE_PORT)).unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        assert_eq!(http("GET", "/healthz"), (200, "ok\n".into()));

        // UDP echo.
        let r = exchange(&sock, &udp_to(ECHO, 40000, b"ping"), 40000);
        assert_eq!(
            (r.proto, r.src, r.payload.as_slice()),
            (17, SocketAddrV4::new(ECHO, 7), &b"ping"[..])
        );
        assert_eq!(*r.dst.ip(), SANDBOX);

        // Flows from several outer source ports (spread over the workers by SO_REUSEPORT)
        // all come back to the node's :6081.
        for i in 0..8u16 {
            let tx = UdpSocket::bind((NODE, 0xC000 | (i * 977))).unwrap();
            let r = exchange_via(
                &tx,
                &sock,
                &udp_to(ECHO, 41000 + i, &i.to_be_bytes()),
                41000 + i,
            );
            assert_eq!(r.payload, i.to_be_bytes());
        }

        // TCP handshake.
        let r = exchange(&sock, &syn_to(ECHO, 40001), 40001);
        assert_eq!((r.proto, r.flags & (SYN | ACK)), (6, SYN | ACK), "{r:?}");
        assert_eq!(r.src, SocketAddrV4::new(ECHO, 7));

        // A 4000-byte TCP super-packet (as tier 1 forwards a job's TSO output) with an
        // unfinished checksum (checksum offload on the job's veth) is written whole to the TUN
        // device, which segments it and finishes the checksums; the echo comes back whole.
        let server_seq = r.seq.wrapping_add(1);
        let ack = tcp_seg(40001, 1001, server_seq, TcpFlags::ACK, &[]);
        sock.send_to(&encap(&ack), (PROXY, GENEVE_PORT)).unwrap();
        let data: Vec<u8> = (0..4000u32).map(|i| (i * 7 % 251) as u8).collect();
        let flags = TcpFlags(TcpFlags::ACK.0 | TcpFlags::PSH.0);
        let mut big = tcp_seg(40001, 1001, server_seq, flags, &data);
        big[36] ^= 0xa5;
        assert_eq!(
            gather_echo(&pns, &sock, &big, 40001, server_seq, data.len()),
            data
        );

        // Denied destination: RST from the proxy.
        let r = exchange(&sock, &syn_to(DENIED, 40002), 40002);
        assert_eq!((r.proto, r.flags & RST), (6, RST), "{r:?}");

        // Drain: new flows refused, the established UDP flow continues.
        assert_eq!(
            http("POST", "/v1/drain").0,
            404,
            "not on the service endpoint"
        );
        assert_eq!(mgmt(&pns, "POST", "/v1/drain").0, 503);
        assert_eq!(http("GET", "/healthz"), (503, "draining\n".into()));
        let r = exchange(&sock, &syn_to(ECHO, 40003), 40003);
        assert_eq!(r.flags & RST, RST, "new flow while draining: {r:?}");
        let r = exchange(&sock, &udp_to(ECHO, 40000, b"again"), 40000);
        assert_eq!(r.payload, b"again");
        assert_eq!(mgmt(&pns, "POST", "/v1/undrain").0, 200);

        assert_eq!(
            http("GET", "/metrics").0,
            404,
            "not on the service endpoint"
        );
        let (status, metrics) = mgmt(&pns, "GET", "/metrics");
        assert_eq!(status, 200);
        // The job's refusals are counted under its tenant.
        let acme = identity::tenant_id("acme");
        assert!(
            metrics.contains(&format!(
                "snas_proxy_drops_total{{tenant=\"{acme}\",reason=\"destination_denied\"}} 1"
            )),
            "{metrics}"
        );
        assert!(
            metrics.contains(&format!(
                "snas_proxy_drops_total{{tenant=\"{acme}\",reason=\"draining\"}} 1"
            )),
            "{metrics}"
        );
        assert!(metrics.contains("snas_proxy_policies 1"), "{metrics}");
        assert!(
            metrics.contains("snas_proxy_tso_to_kernel_total 1"),
            "{metrics}"
        );
        assert_eq!(
            http("GET", "/v1/flows").0,
            404,
            "not on the service endpoint"
        );
        let (status, flows) = mgmt(&pns, "GET", "/v1/flows");
        assert_eq!(status, 200);
        assert!(flows.contains("203.0.113.10:7"), "{flows}");
    });

    env.stop.store(true, Ordering::Relaxed);
    if let Some(d) = env.daemon.take() {
        d.stop();
    }
    let log = std::fs::read_to_string(&audit).unwrap();
    let lines: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let actions: Vec<(&str, u64)> = lines
        .iter()
        .map(|l| (l["action"].as_str().unwrap(), l["port"].as_u64().unwrap()))
        .collect();
    assert!(actions.contains(&("allow", 7)), "{log}");
    assert!(actions.contains(&("deny", 7)), "{log}");
    assert!(
        lines
            .iter()
            .any(|l| l["reason"] == "draining" && l["action"] == "refuse"),
        "{log}"
    );
    assert!(lines.iter().all(|l| l["job_key"] == job_key.to_string()));
    // Denied SYNs are 40-byte packets (IPv4 + TCP, no options).
    let denied: Vec<_> = lines
        .iter()
        .filter(|l| l["reason"] == "destination_denied")
        .collect();
    assert_eq!(denied.len(), 1, "{log}");
    assert_eq!(denied[0]["bytes"], 40, "{log}");
}

/// A decapsulated reply to `sport`, waiting at most `within`.
fn reply_to(sock: &UdpSocket, sport: u16, within: Duration) -> Option<Reply> {
    let deadline = Instant::now() + within;
    let mut buf = vec![0u8; 65536];
    while Instant::now() < deadline {
        if let Ok((n, _)) = sock.recv_from(&mut buf) {
            if let Some(r) = decode(&buf[..n]) {
                if r.dst.port() == sport {
                    return Some(r);
                }
            }
        }
    }
    None
}

#[test]
fn a_fresh_jobs_first_syn_is_held_while_its_policy_is_fetched_then_answered() {
    let env = start("h", 1);
    let elapsed = in_ns(&env.node, move || {
        let sock = UdpSocket::bind((NODE, GENEVE_PORT)).unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(20)))
            .unwrap();
        // Sent once: no retransmission covers for a dropped SYN.
        let t0 = Instant::now();
        sock.send_to(&encap(&syn_to(ECHO, 40100)), (PROXY, GENEVE_PORT))
            .unwrap();
        let r = reply_to(&sock, 40100, Duration::from_secs(3))
            .expect("the first SYN of a fresh job is answered without a retransmission");
        let elapsed = t0.elapsed();
        assert_eq!((r.proto, r.flags & (SYN | ACK)), (6, SYN | ACK), "{r:?}");
        elapsed
    });
    // A figure, not an assertion: it includes the policy fetch from the node's agent.
    println!("first SYN of a fresh job answered after {elapsed:?} (policy fetch included)");
    let (status, metrics) = mgmt(&env.proxy, "GET", "/metrics");
    assert_eq!(status, 200);
    for line in [
        "snas_proxy_held_packets_total 1",
        "snas_proxy_held_released_total 1",
        "snas_proxy_hold_queue_packets 0",
        "snas_proxy_policy_fetches_total 1",
    ] {
        assert!(metrics.contains(line), "{line}:\n{metrics}");
    }
    let _ = &env.dir;
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

#[test]
fn at_exp_the_jobs_connection_is_reset_and_its_flow_is_freed() {
    let policy = POLICY.replace("[[egress]]", "ttl = \"3s\"\n[[egress]]");
    let mut env = start_with("x", 1, &policy);
    let exp = env.exp;
    let late = in_ns(&env.node, move || {
        let sock = UdpSocket::bind((NODE, GENEVE_PORT)).unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(20)))
            .unwrap();
        let r = exchange(&sock, &syn_to(ECHO, 40200), 40200);
        let ack = r.seq.wrapping_add(1);
        // Keep talking until the proxy resets the connection.
        let deadline = Instant::now() + Duration::from_secs(8);
        let mut seq = 1001u32;
        while Instant::now() < deadline {
            let data = tcp_seg(
                40200,
                seq,
                ack,
                TcpFlags(TcpFlags::ACK.0 | TcpFlags::PSH.0),
                b"x",
            );
            sock.send_to(&encap(&data), (PROXY, GENEVE_PORT)).unwrap();
            let sent = unix_now();
            let next = Instant::now() + Duration::from_millis(50);
            let reply = reply_to(&sock, 40200, Duration::from_millis(50));
            // One segment per 50 ms, whatever comes back (duplicate ACKs come back at once).
            std::thread::sleep(next.saturating_duration_since(Instant::now()));
            if let Some(r) = reply {
                if r.flags & RST != 0 {
                    assert!(sent >= exp as f64, "reset before exp");
                    assert_eq!(r.seq, ack, "RFC 793: <SEQ=SEG.ACK><CTL=RST>");
                    assert_eq!(r.flags & ACK, 0);
                    return sent - exp as f64;
                }
                if r.flags & ACK != 0 && !r.payload.is_empty() {
                    seq = seq.wrapping_add(1);
                }
            }
        }
        panic!("the connection was never reset after exp");
    });
    println!("first segment after exp reset; sent {late:.3} s after exp");
    // Freed by the worker's next housekeeping tick.
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let (_, flows) = mgmt(&env.proxy, "GET", "/v1/flows");
        let v: serde_json::Value = serde_json::from_str(&flows).unwrap();
        if v["flows"] == serde_json::json!([]) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the job's flow was never freed: {flows}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let audit = env.audit.clone();
    env.stop.store(true, Ordering::Relaxed);
    if let Some(d) = env.daemon.take() {
        d.stop();
    }
    let log = std::fs::read_to_string(audit).unwrap();
    let lines: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let end: Vec<_> = lines.iter().filter(|l| l["kind"] == "flow_end").collect();
    assert_eq!(end.len(), 1, "{log}");
    assert_eq!(end[0]["end"], "policy_expired");
    assert!(end[0]["packets_out"].as_u64().unwrap() >= 2, "{log}");
    assert!(end[0]["packets_in"].as_u64().unwrap() >= 1, "{log}");
    assert!(
        lines
            .iter()
            .any(|l| l["reason"] == "policy_expired" && l["action"] == "refuse"),
        "{log}"
    );
}

/// A second tenant's job for the fairness test.
const FLOOD_JTI: &str = "jti-e2e-flood-0000001";
const FLOOD_POLICY: &str = r#"
tenant = "mallory"
job = "e2e-flood"
node = "192.0.2.11"
[[egress]]
cidr = "203.0.113.10/32"
ports = "7"
protocol = "udp"
[limits]
egress_bps = "10Gbit"
ingress_bps = "10Gbit"
"#;

fn flood_option() -> SnasOption {
    SnasOption {
        tenant_id: identity::tenant_id("mallory"),
        job_key: identity::job_key(FLOOD_JTI),
        policy_serial: snas_wire::PolicySerial(1),
    }
}

/// The value of one sample (`name{labels}` as written) in Prometheus text, 0 when absent.
fn sample(text: &str, series: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse::<f64>().ok())
        .map_or(0, |v| v as u64)
}

/// Sums the samples of `metric` (any labels) in Prometheus text.
fn metric(text: &str, metric: &str) -> u64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.split(['{', ' ']).next() == Some(metric))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .map(|v| v as u64)
        .sum()
}

/// Gives `u` an 8 MiB receive buffer, so that a test's burst is not lost in its own queue.
fn big_receive_buffer(u: &UdpSocket) {
    let big: libc::c_int = 8 << 20;
    // SAFETY: `big` lives across the call and the length passed is its size; the descriptor
    // is the socket's own.
    unsafe {
        libc::setsockopt(
            std::os::fd::AsRawFd::as_raw_fd(u),
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            (&big as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
}

/// One tenant sends a burst far beyond what the worker forwards while it arrives; another
/// tenant's datagram sent right behind it is served in its turn — before the burst's backlog,
/// instead of after all of it — and the part of the burst beyond the tenant's bound is shed in
/// the proxy, counted as `tenant_queue_full`, not lost in the kernel's socket queue. Every
/// datagram read is forwarded or counted.
#[test]
fn a_tenants_burst_is_shed_beyond_its_share_and_another_tenant_is_served_in_its_turn() {
    const BURST: u16 = 5000;
    const TENANT_PACKETS: u64 = 64;
    let env = start_jobs(
        "f",
        1,
        &[(JTI, POLICY), (FLOOD_JTI, FLOOD_POLICY)],
        &format!("fair_tenant_packets = {TENANT_PACKETS}"),
    );
    in_ns(&env.node, move || {
        let sock = UdpSocket::bind((NODE, GENEVE_PORT)).unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(20)))
            .unwrap();
        // The burst's echoes must not push the other tenant's answer out of this queue.
        big_receive_buffer(&sock);
        // Both jobs' policies are fetched, their flows open.
        exchange(&sock, &udp_to(ECHO, 40000, b"warm"), 40000);
        let flood = encap_for(&flood_option(), &udp_to(ECHO, 41000, b"flood"));
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut buf = vec![0u8; 65536];
        loop {
            sock.send_to(&flood, (PROXY, GENEVE_PORT)).unwrap();
            if let Ok((n, _)) = sock.recv_from(&mut buf) {
                if decode_any(&buf[..n])
                    .is_some_and(|(o, r)| o == flood_option() && r.dst.port() == 41000)
                {
                    break;
                }
            }
            assert!(
                Instant::now() < deadline,
                "the flood job never got an answer"
            );
        }
        // The burst, then the other tenant's request right behind it.
        for _ in 0..BURST {
            sock.send_to(&flood, (PROXY, GENEVE_PORT)).unwrap();
        }
        sock.send_to(&encap(&udp_to(ECHO, 40001, b"turn")), (PROXY, GENEVE_PORT))
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(3);
        let answered = loop {
            if let Ok((n, _)) = sock.recv_from(&mut buf) {
                if decode_any(&buf[..n])
                    .is_some_and(|(o, r)| o == option() && r.dst.port() == 40001)
                {
                    break true;
                }
            }
            if Instant::now() > deadline {
                break false;
            }
        };
        assert!(answered, "the other tenant's datagram is answered");
        // Let the burst's backlog drain.
        while sock.recv_from(&mut buf).is_ok() {}
    });
    let delivered = env.delivered.lock().unwrap().clone();
    let at = delivered
        .iter()
        .position(|t| *t)
        .expect("the echo service saw the other tenant's datagram");
    let behind = delivered.len() - 1 - at;
    assert!(
        behind > 0,
        "the other tenant's datagram was delivered after all {} of the burst's: it waited behind the flood",
        delivered.len() - 1
    );
    let (status, m) = mgmt(&env.proxy, "GET", "/metrics");
    assert_eq!(status, 200);
    // Counted by the worker before any check of the job: under the tenant its option claims
    // only if that tenant already has verified drops — the flooding tenant has none here, so
    // `unknown`.
    let shed = sample(
        &m,
        "snas_proxy_drops_total{tenant=\"unknown\",reason=\"tenant_queue_full\"}",
    );
    assert!(
        shed > 0,
        "a burst of {BURST} beyond a bound of {TENANT_PACKETS} shed nothing:\n{m}"
    );
    // Every packet the worker read, from a node or from the internet, was sent on or shed and
    // counted (the echoes of the burst come back in bursts too: some may be shed on their way
    // to the node).
    let dir = |d: &str| {
        sample(
            &m,
            &format!("snas_proxy_packets_total{{direction=\"{d}\"}}"),
        )
    };
    let shed_by_dir = |d: &str| {
        sample(
            &m,
            &format!("snas_proxy_fair_queue_dropped_total{{direction=\"{d}\"}}"),
        )
    };
    assert_eq!(
        metric(&m, "snas_proxy_drops_total"),
        shed,
        "no other drops:\n{m}"
    );
    assert_eq!(
        shed_by_dir("from_nodes") + shed_by_dir("to_nodes"),
        shed,
        "{m}"
    );
    assert_eq!(
        dir("node_rx"),
        dir("internet_tx") + shed_by_dir("from_nodes"),
        "{m}"
    );
    assert_eq!(
        dir("internet_rx"),
        dir("node_tx") + shed_by_dir("to_nodes"),
        "{m}"
    );
    // The kernel dropped none of them in front of the worker.
    let kernel_drops = in_ns(&env.proxy, || {
        let t = std::fs::read_to_string("/proc/thread-self/net/udp").unwrap();
        t.lines()
            .skip(1)
            .filter(|l| {
                l.split_whitespace()
                    .nth(1)
                    .is_some_and(|a| a.ends_with(":17C1"))
            })
            .filter_map(|l| l.split_whitespace().nth(12)?.parse::<u64>().ok())
            .sum::<u64>()
    });
    println!(
        "burst of {BURST}: {shed} shed as tenant_queue_full, {kernel_drops} dropped by the kernel at the proxy's socket; the other tenant's datagram was delivered before {behind} of the burst's {} delivered",
        delivered.len() - 1
    );
}

/// Polls the metrics until `ok` holds for them (the fast path's figures are published about
/// once a second), for at most 5 s; returns the last text.
fn metrics_until(proxy_ns: &str, ok: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (status, text) = mgmt(proxy_ns, "GET", "/metrics");
        assert_eq!(status, 200);
        if ok(&text) || Instant::now() >= deadline {
            return text;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_long_udp_flow_is_carried_by_the_fast_path_counted_at_its_end_and_removed_with_its_job() {
    const N: u64 = 2000;
    const SPORT: u16 = 40300;
    // A ping-pong of 1 KB datagrams through the fast path runs near the default 100 Mbit/s,
    // where the pacer rightly takes over; this job's limit is far above it.
    let policy = format!("{POLICY}\n[limits]\negress_bps = \"2Gbit\"\ningress_bps = \"2Gbit\"\n");
    let mut env = start_with("f", 1, &policy);
    let text = metrics_until(&env.proxy, |t| {
        sample(t, "snas_proxy_fastpath_available ") == 1
    });
    assert_eq!(
        sample(&text, "snas_proxy_fastpath_available "),
        1,
        "the fast path attached: {text}"
    );
    let answered = in_ns(&env.node, move || {
        let sock = UdpSocket::bind((NODE, GENEVE_PORT)).unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(20)))
            .unwrap();
        // Admitted and answered through the workers: from then on the flow may be fast.
        exchange(&sock, &udp_to(ECHO, SPORT, b"first"), SPORT);
        let dg = encap(&udp_to(ECHO, SPORT, &[0x42; 1000]));
        let mut answered = 0u64;
        for _ in 0..N {
            sock.send_to(&dg, (PROXY, GENEVE_PORT)).unwrap();
            if reply_to(&sock, SPORT, Duration::from_millis(200)).is_some() {
                answered += 1;
            }
        }
        answered
    });
    assert!(answered >= N - 5, "{answered} of {N} echoes came back");
    let fast = |t: &str, dir: &str| {
        sample(
            t,
            &format!("snas_proxy_fastpath_packets_total{{direction=\"{dir}\"}} "),
        )
    };
    // The first of the N starts the offload count (its first client payload once answered);
    // the one that brings the count to FAST_AFTER_PACKETS installs the flow: it and its
    // predecessors, and their echoes, went through the worker; every later one is fast.
    let through_worker = 1 + snas_proxy::offload::FAST_AFTER_PACKETS / 2;
    let text = metrics_until(&env.proxy, |t| fast(t, "to_internet") >= N - through_worker);
    assert!(fast(&text, "to_internet") >= N - through_worker, "{text}");
    assert!(fast(&text, "to_nodes") >= N - through_worker - 5, "{text}");
    assert_eq!(sample(&text, "snas_proxy_fastpath_flows "), 1, "{text}");
    assert!(
        sample(
            &text,
            "snas_proxy_packets_total{direction=\"internet_tx\"} "
        ) < 20,
        "the workers carried almost nothing: {text}"
    );

    // The job ends: its flow goes, with everything the fast path carried counted.
    let job = identity::job_key(JTI);
    let path = format!("/v1/jobs/{job}/ended");
    let (status, _) = in_ns(&env.node, move || http("POST", &path));
    assert_eq!(status, 204);
    let text = metrics_until(&env.proxy, |t| sample(t, "snas_proxy_fastpath_flows ") == 0);
    assert_eq!(sample(&text, "snas_proxy_fastpath_flows "), 0, "{text}");
    let carried = fast(&text, "to_internet");
    // Its next datagram is not fast any more: the entry is gone.
    in_ns(&env.node, move || {
        let sock = UdpSocket::bind((NODE, GENEVE_PORT)).unwrap();
        let dg = encap(&udp_to(ECHO, SPORT, &[0x42; 1000]));
        sock.send_to(&dg, (PROXY, GENEVE_PORT)).unwrap();
    });
    let text = metrics_until(&env.proxy, |t| {
        sample(
            t,
            "snas_proxy_fastpath_diverted_total{reason=\"no_entry\"} ",
        ) > 0
    });
    assert_eq!(fast(&text, "to_internet"), carried, "{text}");
    assert_eq!(
        sample(&text, "snas_proxy_fastpath_errors_total "),
        0,
        "{text}"
    );

    let audit = env.audit.clone();
    env.stop.store(true, Ordering::Relaxed);
    if let Some(d) = env.daemon.take() {
        d.stop();
    }
    let log = std::fs::read_to_string(audit).unwrap();
    let ends: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|l| l["kind"] == "flow_end" && l["src"] == format!("{SANDBOX}:{SPORT}"))
        .collect();
    assert!(!ends.is_empty(), "{log}");
    let end = &ends[0];
    assert_eq!(end["end"], "job_ended", "{log}");
    // IP lengths: 20 + 8 + 1000 per datagram, both ways.
    assert!(end["packets_out"].as_u64().unwrap() > N, "{end}");
    assert!(end["bytes_out"].as_u64().unwrap() >= N * 1028, "{end}");
    assert!(end["packets_in"].as_u64().unwrap() >= N - 5, "{end}");
    assert!(end["bytes_in"].as_u64().unwrap() >= (N - 5) * 1028, "{end}");
}
