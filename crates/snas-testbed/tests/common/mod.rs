//! Shared helpers of the privileged testbed tests: blocking clients for every internet service
//! and a check that nothing of a testbed is left.
#![allow(dead_code)]
#![allow(clippy::unwrap_used)] // test helpers outside #[test] fns: a failed step is a failed test

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream, UdpSocket};
use std::path::PathBuf;
use std::time::Duration;

use hickory_proto::op::{Message, ResponseCode};
use hickory_proto::rr::{RData, RecordType};
use snas_testbed::dns::build_query;
use snas_testbed::topology::{Topology, BULK_PORT, DNS_SERVER, ECHO_PORT, HOSTS, HTTP_PORT};

const T: Duration = Duration::from_secs(5);

/// Fails the test, saying why, unless it runs as root: the testbed is made of network
/// namespaces (`cargo nextest run --profile unprivileged` leaves these `privileged_*` binaries
/// out and lists them as skipped).
pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    assert!(
        root,
        "privileged test: the testbed needs root (network namespaces, mounts); run it as root, \
         or run the unprivileged tests only: cargo nextest run --profile unprivileged"
    );
}

/// The `snas` binary: `$SNAS_BIN`, or `target/debug/snas` of this workspace.
pub fn snas_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("SNAS_BIN") {
        return PathBuf::from(p);
    }
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target/debug/snas");
    assert!(
        p.exists(),
        "{} missing: run `cargo build -p snas` first or set SNAS_BIN",
        p.display()
    );
    p
}

pub fn dns_udp(name: &str, qtype: RecordType) -> Message {
    let s = UdpSocket::bind("0.0.0.0:0").unwrap();
    s.set_read_timeout(Some(T)).unwrap();
    let q = build_query(0x1234, name, qtype).unwrap();
    s.send_to(&q, SocketAddr::new(IpAddr::V4(DNS_SERVER), 53))
        .unwrap();
    let mut buf = [0u8; 4096];
    let (n, _) = s.recv_from(&mut buf).unwrap();
    let m = Message::from_vec(&buf[..n]).unwrap();
    assert_eq!(m.id(), 0x1234);
    m
}

pub fn dns_tcp(name: &str, qtype: RecordType) -> Message {
    let mut s =
        TcpStream::connect_timeout(&SocketAddr::new(IpAddr::V4(DNS_SERVER), 53), T).unwrap();
    s.set_read_timeout(Some(T)).unwrap();
    let q = build_query(0x4321, name, qtype).unwrap();
    s.write_all(&(q.len() as u16).to_be_bytes()).unwrap();
    s.write_all(&q).unwrap();
    let mut len = [0u8; 2];
    s.read_exact(&mut len).unwrap();
    let mut buf = vec![0u8; usize::from(u16::from_be_bytes(len))];
    s.read_exact(&mut buf).unwrap();
    Message::from_vec(&buf).unwrap()
}

pub fn v4_answers(m: &Message) -> Vec<Ipv4Addr> {
    m.answers()
        .iter()
        .filter_map(|r| match r.data() {
            RData::A(a) => Some(a.0),
            _ => None,
        })
        .collect()
}

fn tcp(ip: Ipv4Addr, port: u16) -> TcpStream {
    let s = TcpStream::connect_timeout(&SocketAddr::new(IpAddr::V4(ip), port), T)
        .unwrap_or_else(|e| panic!("connect {ip}:{port}: {e}"));
    s.set_read_timeout(Some(T)).unwrap();
    s
}

pub fn http_get(ip: Ipv4Addr) -> String {
    let mut s = tcp(ip, HTTP_PORT);
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

/// Checks DNS (A, CNAME, AAAA, NXDOMAIN, UDP truncation + TCP fallback) and, on every host,
/// HTTP, TCP and UDP echo and bulk in both directions. Runs in the caller's namespace.
pub fn check_internet_services() {
    let m = dns_udp("api.example.com", RecordType::A);
    assert_eq!(v4_answers(&m), vec![Ipv4Addr::new(203, 0, 113, 10)]);
    let m = dns_udp("cdn.example.com", RecordType::A);
    assert_eq!(m.answers()[0].record_type(), RecordType::CNAME);
    assert_eq!(v4_answers(&m), vec![Ipv4Addr::new(203, 0, 113, 30)]);
    let m = dns_udp("v6.example.com", RecordType::AAAA);
    assert!(matches!(m.answers()[0].data(), RData::AAAA(_)));
    assert_eq!(
        dns_udp("missing.example.net", RecordType::A).response_code(),
        ResponseCode::NXDomain
    );
    let m = dns_udp("many.example.com", RecordType::A);
    assert!(
        m.truncated(),
        "40 A records must not fit a 512-byte UDP answer"
    );
    let m = dns_tcp("many.example.com", RecordType::A);
    assert!(!m.truncated());
    assert_eq!(v4_answers(&m).len(), 40);

    for (name, ip) in HOSTS {
        let resp = http_get(ip);
        assert!(resp.starts_with("HTTP/1.1 200 OK\r\n"), "{resp}");
        assert!(
            resp.contains(&format!("hello from {name} ({ip})")),
            "{resp}"
        );

        let mut s = tcp(ip, ECHO_PORT);
        s.write_all(b"ping tcp").unwrap();
        let mut buf = [0u8; 8];
        s.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"ping tcp");

        let u = UdpSocket::bind("0.0.0.0:0").unwrap();
        u.set_read_timeout(Some(T)).unwrap();
        u.send_to(b"ping udp", SocketAddr::new(IpAddr::V4(ip), ECHO_PORT))
            .unwrap();
        let mut ubuf = [0u8; 64];
        let (n, from) = u.recv_from(&mut ubuf).unwrap();
        assert_eq!(&ubuf[..n], b"ping udp");
        assert_eq!(
            from.ip(),
            IpAddr::V4(ip),
            "UDP echo answers from the host address"
        );

        let mut s = tcp(ip, BULK_PORT);
        s.write_all(b"SEND 1000000\n").unwrap();
        let mut got = Vec::new();
        s.read_to_end(&mut got).unwrap();
        assert_eq!(got.len(), 1_000_000);

        let mut s = tcp(ip, BULK_PORT);
        s.write_all(b"RECV\n").unwrap();
        s.write_all(&vec![7u8; 300_000]).unwrap();
        s.shutdown(std::net::Shutdown::Write).unwrap();
        let mut ack = String::new();
        s.read_to_string(&mut ack).unwrap();
        assert_eq!(ack.trim(), "300000");
    }
}

/// Asserts that nothing of the testbed exists: namespaces, processes, state dir, pins.
pub fn assert_nothing_left(t: &Topology) {
    let left: Vec<String> = snas_testbed::netns::list_netns()
        .into_iter()
        .filter(|n| n.starts_with(&format!("{}-", t.prefix())))
        .collect();
    assert!(left.is_empty(), "namespaces left: {left:?}");
    assert!(!t.state_dir().exists(), "{} left", t.state_dir().display());
    for n in 1..=2 {
        assert!(
            !t.bpf_pin_dir(n).exists(),
            "{} left",
            t.bpf_pin_dir(n).display()
        );
    }
    let marker = format!("{}/", t.state_dir().display());
    let inet = format!("serve-internet --prefix {}", t.prefix());
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        if !snas_testbed::netns::pid_alive(pid) {
            continue;
        }
        let cmd = snas_testbed::netns::pid_cmdline(pid);
        assert!(
            !cmd.contains(&marker) && !cmd.ends_with(&inet),
            "process {pid} left: {cmd}"
        );
    }
}
