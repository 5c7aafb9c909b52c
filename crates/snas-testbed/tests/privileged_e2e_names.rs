//! End-to-end (root; `cargo build -p snas` first): names on the wire. A job allowed
//! `api.example.com:80` gets its page with `Host: api.example.com`; a request with
//! `Host: blocked.example.com` to the same address is reset by the proxy, counted as
//! `host_mismatch`, and the allowed name keeps working afterwards. Native job.
#![allow(clippy::unwrap_used)]

mod e2e_support;

use e2e_support::*;

/// Resolves `api.example.com` through the job's DNS, then sends one request per Host given
/// on the command line, each on its own connection; prints `HOST OK|<errno>|EMPTY` per line.
const PY_HOSTS: &str = r#"
import socket, sys, errno
ip = socket.getaddrinfo("api.example.com", 80, socket.AF_INET, socket.SOCK_STREAM)[0][4][0]
for host in sys.argv[1:]:
    s = socket.socket(); s.settimeout(5)
    try:
        s.connect((ip, 80))
        s.sendall(b"GET / HTTP/1.1\r\nHost: " + host.encode() + b"\r\nConnection: close\r\n\r\n")
        data = b""
        while True:
            b = s.recv(4096)
            if not b:
                break
            data += b
        print(host, "OK" if b"hello from api.example.com" in data else "EMPTY")
    except OSError as e:
        print(host, errno.errorcode.get(e.errno, str(e)))
    finally:
        s.close()
"#;

#[test]
fn a_host_header_naming_another_site_on_an_allowed_address_is_reset_and_counted() {
    let _s = serial();
    let tb = testbed_with_proxies();
    let _logs = LogsOnFailure(&tb);
    let job = Job::acme(&tb, "[[egress]]\nhost = \"api.example.com:80\"\n");
    let before: f64 = (1..=2).map(|n| proxy_drops(&tb, n, "host_mismatch")).sum();
    let out = job.python(
        PY_HOSTS,
        &["api.example.com", "blocked.example.com", "API.Example.com"],
    );
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 3, "{out}");
    assert_eq!(lines[0], "api.example.com OK", "{out}");
    assert!(
        lines[1] == "blocked.example.com ECONNRESET" || lines[1] == "blocked.example.com EMPTY",
        "{out}"
    );
    assert_eq!(lines[2], "API.Example.com OK", "{out}");
    let after: f64 = (1..=2).map(|n| proxy_drops(&tb, n, "host_mismatch")).sum();
    assert!(
        after > before,
        "no host_mismatch counted: {before} -> {after}"
    );
}
