//! Privileged (root): the nftables guard the daemon installs in its namespace. Packets are
//! written straight into the proxy's TUN device (an extra queue of the multi-queue device), as
//! a tier-2 bug letting a job's packet through would: to the proxy's underlay address, to its
//! management address (a non-loopback one here, and loopback), and to a node across the
//! underlay. None is delivered — no socket sees it — and the guard counts them. After the
//! daemon stops, the table is gone and the same packets are delivered (loopback excepted: the
//! kernel drops those as martians itself), so the test sees the path the guard closes. Every
//! name is unique per run; a guard object deletes the namespaces.
#![allow(clippy::unwrap_used)]

mod common;

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::netns::{in_ns, sh, topology};
use common::Keys;
use snas_proxy::config::ProxyConfig;
use snas_proxy::daemon::Daemon;
use snas_proxy::tun::TunQueue;
use snas_wire::build::{udp, UdpSpec};

const PROXY: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 21);
const NODE: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 11);
/// An egress pool address: what a job's packet carries as source after SNAT.
const EGRESS: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 70);
/// A management address of the proxy's namespace (on `lo`), where the control endpoint listens.
const MGMT: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 121);

fn packet(dst: SocketAddr) -> Vec<u8> {
    udp(&UdpSpec {
        src: SocketAddr::from((EGRESS, 40000)),
        dst,
        payload: b"must not arrive",
    })
    .unwrap()
}

/// Datagrams `sock` receives within `within`.
fn received(sock: &UdpSocket, within: Duration) -> usize {
    sock.set_read_timeout(Some(Duration::from_millis(20)))
        .unwrap();
    let deadline = Instant::now() + within;
    let mut n = 0;
    let mut buf = [0u8; 2048];
    while Instant::now() < deadline {
        if sock.recv_from(&mut buf).is_ok() {
            n += 1;
        }
    }
    n
}

fn table_exists(ns: &str, table: &str) -> bool {
    Command::new("ip")
        .args(["netns", "exec", ns, "nft", "list", "table", "inet", table])
        .output()
        .unwrap()
        .status
        .success()
}

fn metrics(ns: &str) -> String {
    in_ns(ns, || {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect((MGMT, 9090)).unwrap();
        write!(
            s,
            "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    })
}

#[test]
fn packets_from_the_tun_device_never_reach_the_namespace_or_the_underlay() {
    let p = format!("pxg{}", std::process::id() % 100_000);
    let (_guard, [node, proxy, _inet]) = topology(&p);
    sh(&[
        "ip",
        "-n",
        &proxy,
        "addr",
        "add",
        "192.0.2.121/32",
        "dev",
        "lo",
    ]);
    let keys = Keys::new();
    let tun = format!("{p}t");
    let text = format!(
        r#"
name = "proxy-guard"
underlay_addr = "192.0.2.21"
nodes = ["192.0.2.11"]
trust = "{trust}"
egress_pool = ["198.51.100.64/28"]
tun_name = "{tun}"
workers = 2
resolver_listen = "192.0.2.21:5353"
upstream_dns = ["203.0.113.53:53"]
control_listen = "192.0.2.121:9090"
audit_log = "{audit}"
state_dir = "{state}"
"#,
        trust = keys.trust().display(),
        audit = keys.dir.path().join("audit.jsonl").display(),
        state = keys.dir.path().join("state").display(),
    );
    let cfg = ProxyConfig::parse(&text, Path::new("proxy.toml")).unwrap();
    let daemon = in_ns(&proxy, move || Daemon::start(cfg).unwrap());
    let table = snas_proxy::guard::table_name(&tun);
    assert!(table_exists(&proxy, &table));

    // Listeners on the proxy's underlay, management and loopback addresses, and on a node.
    let t = tun.clone();
    let (underlay, mgmt, lo, injector) = in_ns(&proxy, move || {
        let u = UdpSocket::bind((PROXY, 0)).unwrap();
        let m = UdpSocket::bind((MGMT, 0)).unwrap();
        let l = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        // The daemon uses two queues (multi-queue device): a third one writes like a worker.
        let q = TunQueue::open(&t, true).unwrap();
        (u, m, l, q)
    });
    let at_node = in_ns(&node, || UdpSocket::bind((NODE, 0)).unwrap());
    let socks = [&underlay, &mgmt, &lo, &at_node];
    let inject = |q: &TunQueue| {
        for s in socks {
            for _ in 0..3 {
                q.write(
                    &snas_proxy::vnet::VnetHdr::default(),
                    &packet(s.local_addr().unwrap()),
                )
                .unwrap();
            }
        }
    };
    let window = Duration::from_millis(300);
    let deliveries = || socks.map(|s| received(s, window));

    inject(&injector);
    assert_eq!(
        deliveries(),
        [0, 0, 0, 0],
        "underlay, management, loopback, node: nothing arrives"
    );
    let m = metrics(&proxy);
    for line in [
        "snas_proxy_guard_drops_total{hook=\"input\"} 9",
        "snas_proxy_guard_drops_total{hook=\"forward\"} 3",
    ] {
        assert!(m.contains(line), "{line}:\n{m}");
    }

    // The daemon removes its table at exit; the device lives on while our queue is open, and
    // the very same packets now arrive: the guard was what stopped them (loopback excepted, a
    // martian the kernel drops itself).
    daemon.stop();
    assert!(!table_exists(&proxy, &table), "the guard's table is gone");
    inject(&injector);
    assert_eq!(deliveries(), [3, 3, 0, 3]);
}

#[test]
fn without_nft_start_up_fails_saying_what_is_missing() {
    let p = format!("pxn{}", std::process::id() % 100_000);
    let (_guard, [_node, proxy, _inet]) = topology(&p);
    let keys = Keys::new();
    // A PATH with `ip` but no `nft` (this test runs in its own process).
    let bin = keys.dir.path().join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    std::os::unix::fs::symlink("/usr/sbin/ip", bin.join("ip")).unwrap();
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::set_var("PATH", &bin);
    let text = format!(
        r#"
name = "proxy-nonft"
underlay_addr = "192.0.2.21"
nodes = ["192.0.2.11"]
trust = "{trust}"
egress_pool = ["198.51.100.64/28"]
tun_name = "{p}t"
resolver_listen = "192.0.2.21:5353"
upstream_dns = ["203.0.113.53:53"]
audit_log = "{audit}"
state_dir = "{state}"
"#,
        trust = keys.trust().display(),
        audit = keys.dir.path().join("audit.jsonl").display(),
        state = keys.dir.path().join("state").display(),
    );
    let cfg = ProxyConfig::parse(&text, Path::new("proxy.toml")).unwrap();
    let err = in_ns(&proxy, move || Daemon::start(cfg).map(drop));
    // Before anything can panic: the namespace guard needs `ip` to clean up.
    std::env::set_var("PATH", path);
    let err = err.unwrap_err().to_string();
    assert!(
        err.contains("nftables guard") && err.contains("nft binary"),
        "{err}"
    );
}
