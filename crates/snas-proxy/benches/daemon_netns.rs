//! Privileged (root) benchmark program: the proxy daemon's forwarding rate in the three-namespace
//! topology of `tests/privileged_e2e_netns.rs`. A node thread floods GENEVE-encapsulated UDP datagrams
//! over 8 flows (8 outer source ports, as tier 1 spreads flows); a UDP echo server in the
//! "internet" namespace answers; the daemon's own counters give the rates per direction.
//! Prints one table row per (workers, inner payload size). Not a test: it asserts nothing.
//!
//! Run: `cargo bench -p snas-proxy --bench daemon_netns` (as root).
#![allow(clippy::unwrap_used)]

#[path = "../tests/common/mod.rs"]
mod common;

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::netns::{in_ns, spawn_in_ns, topology};
use common::{Keys, PolicyServer};
use snas_policy::identity;
use snas_proxy::config::ProxyConfig;
use snas_proxy::daemon::Daemon;
use snas_wire::build::{udp, UdpSpec};
use snas_wire::geneve::{write_geneve_header, InnerProto, SnasOption, GENEVE_PORT};

const NODE: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 11);
const PROXY: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 21);
const ECHO: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
const SANDBOX: Ipv4Addr = Ipv4Addr::new(10, 255, 0, 2);
const JTI: &str = "jti-bench-proxy-00001";
const FLOWS: u16 = 8;
const RUN: Duration = Duration::from_secs(2);

const POLICY: &str = r#"
tenant = "acme"
job = "bench"
node = "192.0.2.11"
[[egress]]
cidr = "203.0.113.10/32"
ports = "9"
protocol = "udp"
[limits]
max_connections = 1000
egress_bps = "10Gbit"
ingress_bps = "10Gbit"
"#;

fn datagram(flow: u16, size: usize) -> Vec<u8> {
    let payload = vec![0x5a; size];
    let inner = udp(&UdpSpec {
        src: SocketAddr::from((SANDBOX, 42000 + flow)),
        dst: SocketAddr::from((ECHO, 9)),
        payload: &payload,
    })
    .unwrap();
    let opt = SnasOption {
        tenant_id: identity::tenant_id("acme"),
        job_key: identity::job_key(JTI),
        policy_serial: snas_wire::PolicySerial(1),
    };
    let mut p = vec![0u8; 28 + inner.len()];
    write_geneve_header(&mut p, &opt, InnerProto::Ipv4).unwrap();
    p[28..].copy_from_slice(&inner);
    p
}

fn echo(stop: Arc<AtomicBool>) {
    let u = UdpSocket::bind((ECHO, 9)).unwrap();
    u.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let mut b = [0u8; 2048];
    while !stop.load(Ordering::Relaxed) {
        if let Ok((n, from)) = u.recv_from(&mut b) {
            let _ = u.send_to(&b[..n], from);
        }
    }
}

struct Counts {
    node_rx: u64,
    internet_tx: u64,
    internet_rx: u64,
    node_tx: u64,
}

fn counts(d: &Daemon) -> Counts {
    let m = &d.shared().metrics;
    Counts {
        node_rx: m.node_rx_packets.load(Ordering::Relaxed),
        internet_tx: m.internet_tx_packets.load(Ordering::Relaxed),
        internet_rx: m.internet_rx_packets.load(Ordering::Relaxed),
        node_tx: m.node_tx_packets.load(Ordering::Relaxed),
    }
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let p = format!("pxb{}", std::process::id() % 100_000);
    let (_guard, [node, proxy, inet]) = topology(&p);
    let keys = Keys::new();
    let job_key = identity::job_key(JTI);
    let stop = Arc::new(AtomicBool::new(false));
    let s2 = Arc::clone(&stop);
    spawn_in_ns(&inet, move || echo(s2));
    let token = keys.token(POLICY, JTI, 1);
    let server = in_ns(&node, move || {
        let s = PolicyServer::start(NODE.into());
        s.serve(job_key, 200, &token);
        s
    });

    println!("| workers | inner payload | offered (pkt/s) | received by proxy (pkt/s) | to internet (pkt/s) | echo read from TUN (pkt/s) | sent back to node (pkt/s) | to internet, Mbit/s inner |");
    println!("|---|---|---|---|---|---|---|---|");
    for workers in [1usize, 2] {
        for size in [64usize, 1400] {
            let text = format!(
                r#"
name = "proxy-bench"
underlay_addr = "192.0.2.21"
nodes = ["192.0.2.11"]
agent_policy_port = {port}
trust = "{trust}"
egress_pool = ["198.51.100.64/28"]
tun_name = "{p}t"
workers = {workers}
resolver_listen = "192.0.2.21:5353"
upstream_dns = ["203.0.113.53:53"]
audit_log = "{audit}"
state_dir = "{state}"
"#,
                port = server.addr.port(),
                trust = keys.trust().display(),
                audit = keys.dir.path().join("audit.jsonl").display(),
                state = keys.dir.path().join("state").display(),
            );
            let cfg = ProxyConfig::parse(&text, std::path::Path::new("bench.toml")).unwrap();
            let daemon = in_ns(&proxy, move || Daemon::start(cfg).unwrap());
            let offered = Arc::new(AtomicU64::new(0));
            let o2 = Arc::clone(&offered);
            in_ns(&node, move || {
                let rx = UdpSocket::bind((NODE, GENEVE_PORT)).unwrap();
                rx.set_read_timeout(Some(Duration::from_millis(20)))
                    .unwrap();
                let txs: Vec<UdpSocket> = (0..FLOWS)
                    .map(|i| UdpSocket::bind((NODE, 0xC000 | (i * 977))).unwrap())
                    .collect();
                let dgs: Vec<Vec<u8>> = (0..FLOWS).map(|f| datagram(f, size)).collect();
                // Warm up: the policy fetch drops the first datagrams.
                let warm = Instant::now() + Duration::from_secs(3);
                let mut buf = vec![0u8; 65536];
                while Instant::now() < warm {
                    for (tx, d) in txs.iter().zip(&dgs) {
                        tx.send_to(d, (PROXY, GENEVE_PORT)).unwrap();
                    }
                    if rx.recv_from(&mut buf).is_ok() {
                        break;
                    }
                }
                while rx.recv_from(&mut buf).is_ok() {}
                let drain = Arc::new(AtomicBool::new(false));
                let d2 = Arc::clone(&drain);
                let r = std::thread::spawn(move || {
                    while !d2.load(Ordering::Relaxed) {
                        let _ = rx.recv_from(&mut buf);
                    }
                });
                let end = Instant::now() + RUN;
                let mut sent = 0u64;
                while Instant::now() < end {
                    for (tx, d) in txs.iter().zip(&dgs) {
                        if tx.send_to(d, (PROXY, GENEVE_PORT)).is_ok() {
                            sent += 1;
                        }
                    }
                }
                o2.store(sent, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(200));
                drain.store(true, Ordering::Relaxed);
                r.join().unwrap();
            });
            let c = counts(&daemon);
            daemon.stop();
            let secs = RUN.as_secs_f64();
            let out = c.internet_tx as f64 / secs;
            println!(
                "| {workers} | {size} B | {:.0} | {:.0} | {out:.0} | {:.0} | {:.0} | {:.0} |",
                offered.load(Ordering::Relaxed) as f64 / secs,
                c.node_rx as f64 / secs,
                c.internet_rx as f64 / secs,
                c.node_tx as f64 / secs,
                out * (size as f64 + 28.0) * 8.0 / 1e6,
            );
        }
    }
    stop.store(true, Ordering::Relaxed);
}
