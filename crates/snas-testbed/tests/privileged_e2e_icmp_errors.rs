//! End-to-end (root; `cargo build -p snas` first): ICMP and ICMPv6 errors from the internet are
//! translated back to the job by the proxy (issue 18). A link narrower than the job's MTU
//! between the proxies and one destination (a route MTU in each proxy's namespace, so the
//! proxy's kernel answers oversized packets with "fragmentation needed" / "packet too big", as a
//! router on the path would): a job's TCP upload to that destination completes over IPv6 and
//! IPv4, which it cannot without path-MTU discovery. A UDP datagram to a closed port gets
//! ECONNREFUSED (port unreachable) instead of silence. Each test builds its own testbed; the
//! tests of this file run one at a time.
#![allow(clippy::unwrap_used)]

mod e2e_support;

use e2e_support::*;

/// Uploads argv[2] bytes to (argv[1], 5201) with the bulk protocol (`RECV`), over the family of
/// the name's first address (argv[3]: 4 or 6): prints `SENT <n> ANSWER <server's count> MSS
/// <the connection's MSS at the end>` or `TIMEOUT <bytes sent>`.
const PY_UPLOAD: &str = r#"
import socket, sys
host, n, fam = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
af = socket.AF_INET6 if fam == 6 else socket.AF_INET
ip = socket.getaddrinfo(host, 5201, af, socket.SOCK_STREAM)[0][4][0]
s = socket.create_connection((ip, 5201), timeout=20)
s.sendall(b"RECV\n")
chunk = b"x" * 65536
sent = 0
try:
    while sent < n:
        sent += s.send(chunk[: min(len(chunk), n - sent)])
    s.shutdown(socket.SHUT_WR)
    answer = s.makefile().readline().strip()
    mss = s.getsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG)
    print("SENT", sent, "ANSWER", answer, "MSS", mss)
except socket.timeout:
    print("TIMEOUT", sent)
"#;

/// Sends a datagram to (argv[1], argv[2]) on a connected UDP socket of family argv[3] and waits
/// for an answer: prints the error name (`ECONNREFUSED` expected) or `SILENCE`.
const PY_UDP_CLOSED: &str = r#"
import socket, sys, errno
host, port, fam = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
af = socket.AF_INET6 if fam == 6 else socket.AF_INET
ip = socket.getaddrinfo(host, port, af, socket.SOCK_DGRAM)[0][4][0]
u = socket.socket(af, socket.SOCK_DGRAM)
u.connect((ip, port))
u.settimeout(1.0)
r = "SILENCE"
for i in range(3):
    try:
        u.send(b"anyone? %d" % i)
        u.recv(2048)
        r = "ANSWERED"
        break
    except socket.timeout:
        pass
    except OSError as e:
        r = errno.errorcode.get(e.errno, str(e.errno))
        break
print(r)
"#;

const RULES: &str = r#"
[[egress]]
host = "bulk.example.com:5201"
[[egress]]
host = "bulk.example.com:9999"
protocol = "udp"
[[egress]]
host = "v6.example.com:5201"
[[egress]]
host = "v6.example.com:9999"
protocol = "udp"
"#;

/// The narrow link: 1280 bytes toward bulk.example.com (IPv4) and v6.example.com (IPv6) in
/// both proxies' namespaces; the jobs' MTU is 1444. Removed on drop, even when the test fails.
struct NarrowRoutes {
    routes: Vec<Vec<String>>,
}

impl NarrowRoutes {
    const MTU: &'static str = "1280";

    fn add(tb: &snas_testbed::Testbed) -> NarrowRoutes {
        let p = tb.prefix().to_owned();
        let mut g = NarrowRoutes { routes: Vec::new() };
        for n in 1..=2u8 {
            let ns = format!("{p}-p{n}");
            for (fam, dst, via) in [
                (
                    "-4",
                    "203.0.113.40/32",
                    format!("198.51.100.{}", 4 * (n - 1) + 1),
                ),
                ("-6", "2001:db8::10/128", format!("2001:db8:ff0{n}::1")),
            ] {
                let spec: Vec<String> = [fam, "route", "add", dst, "via", &via, "dev", "tr0"]
                    .iter()
                    .map(|s| s.to_string())
                    .chain(["mtu", "lock", Self::MTU].map(String::from))
                    .collect();
                let mut args = vec!["-n".to_owned(), ns.clone()];
                args.extend(spec);
                let a: Vec<&str> = args.iter().map(String::as_str).collect();
                snas_testbed::netns::ip(&a).unwrap();
                g.routes.push(vec![
                    "-n".into(),
                    ns.clone(),
                    fam.into(),
                    "route".into(),
                    "del".into(),
                    dst.into(),
                ]);
            }
        }
        g
    }
}

impl Drop for NarrowRoutes {
    fn drop(&mut self) {
        for r in &self.routes {
            let a: Vec<&str> = r.iter().map(String::as_str).collect();
            let _ = snas_testbed::netns::ip(&a);
        }
    }
}

fn assert_upload(job: &Job, host: &str, fam: &str) {
    // 4 MiB: thousands of full-size segments, every one of them too big for the narrow link
    // until the job learns the path MTU.
    let n = 4 * 1024 * 1024;
    let out = job.python(PY_UPLOAD, &[host, &n.to_string(), fam]);
    let words: Vec<&str> = out.split_whitespace().collect();
    assert!(
        words.len() == 6 && words[0] == "SENT" && words[3] == n.to_string(),
        "IPv{fam} upload to {host} over the narrow link did not complete: {out}"
    );
    let mss: u32 = words[5].parse().unwrap();
    assert!(
        mss <= 1280 - 40,
        "IPv{fam}: the job's MSS ({mss}) shows it never learnt the path MTU: {out}"
    );
}

#[test]
#[ignore = "open (issue 18): the upload stalls — the job learns the path MTU (route mtu 1280, MSS 1228; the errors reach it translated) but the proxy re-segments its TSO super-packets at tun_mtu (vnet::prepare_to_kernel), so every one is refused again by the narrow hop; needs the job's segment size carried to the proxy (docs/proxy.md, ICMP errors from the internet)"]
fn a_tcp_upload_over_a_narrower_link_completes_by_path_mtu_discovery_over_ipv6_and_ipv4() {
    let _s = serial();
    let tb = testbed_with_proxies();
    let _logs = LogsOnFailure(&tb);
    let _narrow = NarrowRoutes::add(&tb);
    let job = Job::acme(&tb, RULES);
    assert_upload(&job, "bulk.example.com", "4");
    assert_upload(&job, "v6.example.com", "6");
}

#[test]
fn a_udp_datagram_to_a_closed_port_gets_connection_refused_over_ipv4_and_ipv6() {
    let _s = serial();
    let tb = testbed_with_proxies();
    let _logs = LogsOnFailure(&tb);
    let job = Job::acme(&tb, RULES);
    for (host, fam) in [("bulk.example.com", "4"), ("v6.example.com", "6")] {
        let out = job.python(PY_UDP_CLOSED, &[host, "9999", fam]);
        assert_eq!(
            out.trim(),
            "ECONNREFUSED",
            "IPv{fam} to {host}:9999 (closed)"
        );
    }
}
