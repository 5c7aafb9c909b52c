//! End-to-end (root; `cargo build -p snas` first): dual stack. A job reaches IPv6 destinations by
//! name through both tiers (tier 1 on the node, SNAT66 on a proxy's IPv6 egress pool), over TCP
//! and UDP, natively and under gVisor; a dual-stack name works from Python's
//! `socket.create_connection` in gVisor; a forbidden IPv6 destination is refused with a RST, not
//! a timeout; audit lines carry the IPv6 addresses and names.
//!
//! The internet serves HTTP, echo and bulk on 2001:db8::10 (`v6.example.com`, and
//! `dual.example.com` next to 203.0.113.10). Each test builds its own testbed; the tests of this
//! file run one at a time.
#![allow(clippy::unwrap_used)]

mod e2e_support;

use std::time::Duration;

use e2e_support::*;
use serde_json::Value;

/// TCP (an HTTP GET) and UDP (echo) to `host` over IPv6 only (`AF_INET6`): prints the HTTP
/// status line and body's last line, the local address of the TCP connection, then the echo
/// answer and the address it came from.
const PY_V6: &str = r#"
import socket, sys
host = sys.argv[1]
ip = socket.getaddrinfo(host, 80, socket.AF_INET6, socket.SOCK_STREAM)[0][4][0]
s = socket.create_connection((ip, 80), timeout=5)
s.sendall(b"GET / HTTP/1.1\r\nHost: " + host.encode() + b"\r\nConnection: close\r\n\r\n")
data = b""
while True:
    b = s.recv(4096)
    if not b:
        break
    data += b
print("TCP", data.decode().splitlines()[0], "|", data.decode().splitlines()[-1])
print("LOCAL", s.getsockname()[0])
s.close()
u = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
u.settimeout(2.0)
for i in range(3):
    u.sendto(b"ping udp6 %d" % i, (ip, 7))
    try:
        d, frm = u.recvfrom(2048)
        print("UDP", d.decode(), frm[0])
        break
    except socket.timeout:
        pass
else:
    print("UDP NO-ANSWER")
"#;

/// Python's own dual-stack client: `socket.create_connection((name, 80))` tries every address
/// `getaddrinfo` returns, in order (RFC 6724), until one connects. Prints the peer address and
/// the body's last line.
const PY_DUAL: &str = r#"
import socket, sys
host = sys.argv[1]
s = socket.create_connection((host, 80), timeout=5)
s.sendall(b"GET / HTTP/1.1\r\nHost: " + host.encode() + b"\r\nConnection: close\r\n\r\n")
data = b""
while True:
    b = s.recv(4096)
    if not b:
        break
    data += b
print("PEER", s.getpeername()[0])
print("BODY", data.decode().splitlines()[-1])
"#;

const V6_RULES: &str = r#"
[[egress]]
host = "v6.example.com:80"
[[egress]]
host = "v6.example.com:7"
protocol = "udp"
"#;

/// Checks the output of [`PY_V6`]: HTTP 200 from the IPv6 server, a source address from the
/// node's job prefix (fd73:6e61:7300::/64), and the UDP echo from 2001:db8::10.
fn assert_v6_exchange(out: &str, who: &str) {
    assert!(
        out.contains("TCP HTTP/1.1 200") && out.contains("v6.example.com ([2001:db8::10])"),
        "{who}: no HTTP answer over IPv6:\n{out}"
    );
    assert!(
        out.lines().any(|l| l.starts_with("LOCAL fd73:6e61:7300::")),
        "{who}: the job's IPv6 source is not its /128:\n{out}"
    );
    assert!(
        out.lines()
            .any(|l| l.starts_with("UDP ping udp6 ") && l.ends_with(" 2001:db8::10")),
        "{who}: no UDP echo over IPv6:\n{out}"
    );
}

/// `snas run` under gVisor on node 1 of `tb`: (exit status success, stdout, stderr).
fn gvisor(
    tb: &snas_testbed::Testbed,
    token: &str,
    code: &str,
    args: &[&str],
) -> (bool, String, String) {
    let mut a = vec![
        "run",
        "--prefix",
        tb.topology().prefix(),
        "--node",
        "1",
        "--policy",
        token,
        "--timeout",
        "120s",
        "--",
        "python3",
        "-c",
        code,
    ];
    a.extend_from_slice(args);
    let out = std::process::Command::new(snas_binary())
        .args(&a)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn a_job_reaches_an_ipv6_only_name_over_tcp_and_udp_natively() {
    let _s = serial();
    let tb = testbed_with_proxies();
    let _logs = LogsOnFailure(&tb);
    let job = Job::acme(&tb, V6_RULES);
    let addrs = job.run("ip", &["-6", "-o", "addr", "show", "dev", "eth0"]);
    let addrs = String::from_utf8_lossy(&addrs.stdout).into_owned();
    assert!(
        addrs.contains("inet6 fd73:6e61:7300::aff:") && addrs.contains("/128"),
        "the job's eth0 has no IPv6 /128: {addrs}"
    );
    // Many exchanges, not one: each is a new flow through tier 1, SNAT66 and back.
    for i in 0..20 {
        let out = job.python(PY_V6, &["v6.example.com"]);
        assert_v6_exchange(&out, &format!("native, round {i}"));
    }
    let (code, body) = job.curl("http://v6.example.com/");
    assert_eq!(code, 0, "curl: {body}");
    assert!(body.contains("[2001:db8::10]"), "{body}");
}

#[test]
fn a_gvisor_job_reaches_an_ipv6_only_name_over_tcp_and_udp() {
    let _s = serial();
    let tb = testbed_with_proxies();
    let _logs = LogsOnFailure(&tb);
    let token = tb.sign_policy(&policy("acme", V6_RULES)).unwrap();
    let (ok, out, err) = gvisor(&tb, &token, PY_V6, &["v6.example.com"]);
    assert!(ok, "snas run failed:\nstdout:\n{out}\nstderr:\n{err}");
    assert_v6_exchange(&out, "gVisor");
}

#[test]
fn a_dual_stack_name_works_from_python_create_connection_in_gvisor_and_both_families_work() {
    let _s = serial();
    let tb = testbed_with_proxies();
    let _logs = LogsOnFailure(&tb);
    let rules = "[[egress]]\nhost = \"dual.example.com:80\"\n";
    let token = tb.sign_policy(&policy("acme", rules)).unwrap();
    let (ok, out, err) = gvisor(&tb, &token, PY_DUAL, &["dual.example.com"]);
    assert!(ok, "snas run failed:\nstdout:\n{out}\nstderr:\n{err}");
    assert!(
        out.contains("BODY hello from"),
        "no answer from dual.example.com:\n{out}\n{err}"
    );
    println!("gVisor create_connection(dual.example.com) went to: {out}");

    // Natively, each family on its own (curl -4 / -6): both tiers carry either.
    let job = Job::acme(&tb, rules);
    for (flag, want) in [("-4", "(203.0.113.10)"), ("-6", "([2001:db8::10])")] {
        let out = job.run(
            "curl",
            &["-sS", "--max-time", "5", flag, "http://dual.example.com/"],
        );
        let body = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && body.contains(want),
            "curl {flag}: {body}{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn a_forbidden_ipv6_destination_is_refused_with_a_reset_not_a_timeout() {
    let _s = serial();
    let tb = testbed_with_proxies();
    let _logs = LogsOnFailure(&tb);
    let job = Job::acme(&tb, V6_RULES);
    // Bind the name first: its address is allowed on port 80 only.
    let (code, body) = job.curl("http://v6.example.com/");
    assert_eq!(code, 0, "curl: {body}");
    for (ip, port, what) in [
        ("2001:db8::10", 81, "a port no rule allows"),
        ("2001:db8::99", 80, "an address no name is bound to"),
    ] {
        assert_refused6(&job, ip, port, what);
    }
}

/// Checks that `[ip]:port` from `job` is refused ([`PY_FAIL_FAST`] over IPv6), and prints how.
fn assert_refused6(job: &Job, ip: &str, port: u16, what: &str) {
    let (r, ms) = fail_fast_over(job, ip, port, 6);
    println!("[{ip}]:{port} ({what}): {r} after {ms:.3} ms");
    assert!(
        [
            "ECONNREFUSED",
            "ECONNRESET",
            "EHOSTUNREACH",
            "ENETUNREACH",
            "EACCES"
        ]
        .contains(&r.as_str()),
        "[{ip}]:{port} ({what}): expected a refusal, got {r} after {ms:.3} ms"
    );
}

#[test]
fn the_widest_ipv6_policy_reaches_the_internet_but_no_ipv6_infrastructure() {
    let _s = serial();
    let tb = testbed_with_proxies();
    let _logs = LogsOnFailure(&tb);
    let job = Job::acme(
        &tb,
        "[[egress]]\ncidr = \"::/0\"\nports = \"0\"\nprotocol = \"any\"\nallow_private = true\n",
    );
    let (r, ms) = fail_fast_over(&job, "2001:db8::10", 80, 6);
    assert_eq!(r, "CONNECTED", "the internet is not reachable ({ms:.3} ms)");
    for (ip, what) in [
        ("2001:db8:e9::101", "proxy 1's IPv6 egress address"),
        ("2001:db8:e9::201", "proxy 2's IPv6 egress address"),
        (
            "2001:db8:ff01::1",
            "the internet end of proxy 1's IPv6 transit",
        ),
        ("2001:db8:ff02::2", "proxy 2's IPv6 transit address"),
        (
            "fd73:6e61:7300::aff:106",
            "another job's address on the node",
        ),
    ] {
        assert_refused6(&job, ip, 80, what);
    }
    // The node through the job's own link-local gateway: never reached. The kernel sends to a
    // link-local destination from the job's link-local address, not its /128, so tier 1 drops
    // the SYN as `spoofed_source` and, as for every spoofed packet, answers nothing (the
    // client times out); see docs/tier1.md.
    let spoofed = tier1_drops(&tb, &job, "spoofed_source");
    let (r, ms) = fail_fast_over(&job, "fe80::1%eth0", 80, 6);
    println!("[fe80::1%eth0]:80 (the job's own IPv6 gateway, the node): {r} after {ms:.3} ms");
    assert_ne!(
        r, "CONNECTED",
        "the node answered on its link-local gateway"
    );
    assert!(
        tier1_drops(&tb, &job, "spoofed_source") > spoofed,
        "the SYN to fe80::1 was not dropped as spoofed_source"
    );
}

#[test]
fn audit_lines_carry_the_ipv6_addresses_and_names() {
    let _s = serial();
    let tb = testbed_with_proxies();
    let _logs = LogsOnFailure(&tb);
    let job = Job::acme(&tb, V6_RULES);
    let key = job.info().job_key.to_string();
    let (code, body) = job.curl("http://v6.example.com/");
    assert_eq!(code, 0, "curl: {body}");
    let (r, ms) = fail_fast_over(&job, "2001:db8::10", 81, 6);
    assert_ne!(r, "CONNECTED", "port 81 is not allowed ({ms:.3} ms)");

    let agent = tb.topology().node_dir(1).join("state").join("audit.log");
    let proxies: Vec<_> = (1..=2)
        .map(|n| tb.topology().proxy_dir(n).join("audit.jsonl"))
        .collect();
    let find = |paths: &[std::path::PathBuf], pred: &dyn Fn(&Value) -> bool| {
        paths
            .iter()
            .flat_map(|p| audit_lines(p))
            .any(|v| v["job_key"] == key.as_str() && pred(&v))
    };
    wait_until(Duration::from_secs(5), "proxy: allowed IPv6 flow", || {
        find(&proxies, &|v| {
            v["tier"] == 2
                && v["action"] == "allow"
                && v["dst"] == "2001:db8::10"
                && v["port"] == 80
                && v["hostname"] == "v6.example.com"
        })
    });
    wait_until(Duration::from_secs(5), "agent: tier-1 IPv6 deny", || {
        find(std::slice::from_ref(&agent), &|v| {
            v["tier"] == 1 && v["dst"] == "2001:db8::10" && v["port"] == 81
        })
    });
    wait_until(Duration::from_secs(5), "agent: AAAA answer", || {
        find(std::slice::from_ref(&agent), &|v| {
            v["hostname"] == "v6.example.com" && v.to_string().contains("2001:db8::10")
        })
    });
}
