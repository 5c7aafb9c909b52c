//! End-to-end (root; `cargo build -p snas` first): what a job can and cannot reach, with the
//! tools a user would run inside it — curl, python3 sockets, dig — and no proxy settings.
//! Each test builds its own testbed (about 0.4 s); the tests of this file run one at a time.
#![allow(clippy::unwrap_used)]

mod e2e_support;

use e2e_support::*;

const PY_UDP_ECHO: &str = r#"
import socket, sys
host, port = sys.argv[1], int(sys.argv[2])
ip = socket.getaddrinfo(host, port, socket.AF_INET, socket.SOCK_DGRAM)[0][4][0]
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(2.0)
for i in range(3):
    s.sendto(b"ping udp %d" % i, (ip, port))
    try:
        data, frm = s.recvfrom(2048)
        print(data.decode(), frm[0])
        break
    except socket.timeout:
        pass
else:
    print("NO-ANSWER")
"#;

#[test]
fn allowed_host_port_works_for_tcp_and_udp_without_proxy_settings() {
    let _s = serial();
    let tb = testbed_with_proxies();
    let _logs = LogsOnFailure(&tb);
    let job = Job::start(
        &tb,
        1,
        &policy(
            "acme",
            r#"
[[egress]]
host = "api.example.com:80"
[[egress]]
host = "api.example.com:7"
protocol = "udp"
"#,
        ),
    );
    let (code, body) = job.curl("http://api.example.com/");
    assert_eq!(code, 0, "curl: {body}");
    assert!(
        body.contains("hello from api.example.com (203.0.113.10)"),
        "{body}"
    );
    let out = job.python(PY_UDP_ECHO, &["api.example.com", "7"]);
    // (A first datagram may wait for the proxy's policy fetch and be retried.)
    let answer = out.trim();
    assert!(
        answer.starts_with("ping udp ") && answer.ends_with(" 203.0.113.10"),
        "{out}"
    );
}

#[test]
fn wildcard_rule_admits_one_label_names_and_nothing_else() {
    let _s = serial();
    let tb = testbed_with_proxies();
    let _logs = LogsOnFailure(&tb);
    let job = Job::acme(&tb, "[[egress]]\nhost = \"*.svc.example.com:80\"\n");
    for name in ["a.svc.example.com", "b.svc.example.com"] {
        let (code, body) = job.curl(&format!("http://{name}/"));
        assert_eq!(code, 0, "{name}: {body}");
        assert!(body.contains("hello from"), "{name}: {body}");
    }
    // Same address, but the name is not covered by the rule: no answer, so no connection.
    let (code, body) = job.curl("http://api.example.com/");
    assert_ne!(code, 0, "api.example.com must not be reachable: {body}");
}

#[test]
fn cname_chain_to_an_allowed_name_resolves_and_connects() {
    let _s = serial();
    let tb = testbed_with_proxies();
    let _logs = LogsOnFailure(&tb);
    let job = Job::acme(&tb, "[[egress]]\nhost = \"chain.example.org:80\"\n");
    // chain.example.org → cdn.example.com → edge.example.net → 203.0.113.30
    let (code, body) = job.curl("http://chain.example.org/");
    assert_eq!(code, 0, "{body}");
    assert!(
        body.contains("hello from edge.example.net (203.0.113.30)"),
        "{body}"
    );
}

#[test]
fn name_outside_the_policy_is_refused_by_dns() {
    let _s = serial();
    let tb = testbed_with_proxies();
    let _logs = LogsOnFailure(&tb);
    let job = Job::acme(&tb, "[[egress]]\nhost = \"api.example.com:80\"\n");
    let out = job.run("dig", &["+time=2", "+tries=1", "blocked.example.com", "A"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("status: REFUSED"),
        "dig blocked.example.com:\n{text}"
    );
    // The allowed name resolves through the same resolver.
    let out = job.run(
        "dig",
        &["+time=2", "+tries=1", "+short", "api.example.com", "A"],
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(text.trim(), "203.0.113.10", "dig api.example.com:\n{text}");
    // getent (libc resolver) sees no address either.
    let out = job.run("getent", &["hosts", "blocked.example.com"]);
    assert!(
        !out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[test]
fn allowed_name_on_a_denied_port_is_refused_at_the_first_segment() {
    let _s = serial();
    let tb = testbed_with_proxies();
    let _logs = LogsOnFailure(&tb);
    let job = Job::start(
        &tb,
        1,
        &policy(
            "acme",
            "[[egress]]\nhost = \"api.example.com:80\"\n[[egress]]\nhost = \"metadata.example.com:80\"\n",
        ),
    );
    // The name resolves (the binding exists), port 81 is not allowed.
    assert_refused_fast(&job, "api.example.com", 81);
    // A signed name whose answer is the metadata address stays refused (DNS rebinding).
    let out = job.run("getent", &["ahostsv4", "metadata.example.com"]);
    if out.status.success() {
        assert_refused_fast(&job, "metadata.example.com", 80);
    }
    assert_refused_fast(&job, "169.254.169.254", 80);
}

#[test]
fn unbound_raw_ip_private_and_metadata_addresses_are_refused_at_the_first_segment() {
    let _s = serial();
    let tb = testbed_without_proxies();
    let job = Job::acme(&tb, "[[egress]]\nhost = \"api.example.com:80\"\n");
    // No DNS answer ever bound these addresses for this job.
    assert_refused_fast(&job, "203.0.113.20", 80);
    assert_refused_fast(&job, "203.0.113.10", 80);
    assert_refused_fast(&job, "169.254.169.254", 80);
    assert_refused_fast(&job, "10.1.2.3", 80);
    assert_refused_fast(&job, "127.0.0.1", 22);
    assert!(tier1_drops(&tb, &job, "always_denied") >= 3);
    assert!(tier1_drops(&tb, &job, "destination_denied") >= 3);
}

#[test]
fn a_large_answer_arrives_through_tcp_fallback() {
    let _s = serial();
    let tb = testbed_with_proxies();
    let _logs = LogsOnFailure(&tb);
    let job = Job::acme(&tb, "[[egress]]\nhost = \"many.example.com:80\"\n");
    // 40 A records do not fit 512 bytes: dig (no EDNS) gets TC over UDP and retries over TCP.
    let out = job.run(
        "dig",
        &[
            "+time=3",
            "+tries=1",
            "+noedns",
            "+short",
            "many.example.com",
            "A",
        ],
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let addrs: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("203.0.113."))
        .collect();
    assert_eq!(addrs.len(), 40, "dig many.example.com:\n{text}");
}
