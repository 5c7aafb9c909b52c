//! End-to-end (root; `cargo build -p snas` first): connection limits. `max_connections` and
//! `new_connections_per_sec` admit exactly their number; a job that has used up its ports
//! toward a destination does not stop another tenant's job from reaching it.
//!
//! Tier 1 enforces the same numbers first (its `max_connections` is an estimate, its bucket
//! exact), so these tests check the end result a job sees plus the proxy's own flow table.
//! Tests named `tier2_alone_…` lift tier 1's limits on purpose (what a compromised node could
//! do) to show that the proxy enforces them by itself; every other test runs both tiers as
//! deployed.
#![allow(clippy::unwrap_used)]

mod e2e_support;

use e2e_support::*;

/// Opens up to N TCP connections to (host, port), holding them; checks each with an echo.
/// Prints `ok <n> failed <m>` then waits for a line on stdin before closing.
const PY_HOLD: &str = r#"
import socket, sys, time
host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
ip = socket.getaddrinfo(host, port, socket.AF_INET, socket.SOCK_STREAM)[0][4][0]
held, failed = [], 0
for i in range(n):
    s = socket.socket()
    s.settimeout(1.5)
    try:
        s.connect((ip, port))
        s.sendall(b"x%d" % i)
        if s.recv(16) != b"x%d" % i:
            raise OSError("bad echo")
        held.append(s)
    except OSError:
        failed += 1
        s.close()
print("ok", len(held), "failed", failed, " ".join(str(s.getsockname()[1]) for s in held))
# `close-one`: close the first connection cleanly (FIN both ways), then try one new one.
while sys.stdin.readline().strip() == "close-one":
    c = held.pop(0); c.shutdown(socket.SHUT_WR)
    while c.recv(64):
        pass
    c.close()
    time.sleep(0.3)
    s = socket.socket(); s.settimeout(1.5)
    try:
        s.connect((ip, port)); s.sendall(b"n"); ok = s.recv(4) == b"n"
    except OSError:
        ok = False
    if ok:
        held.append(s)
    print("new", "ok" if ok else "failed")
"#;

#[test]
fn max_connections_admits_exactly_the_limit() {
    let _s = serial();
    let tb = testbed_with_proxies();
    let _logs = LogsOnFailure(&tb);
    let job = Job::start(
        &tb,
        1,
        &policy(
            "acme",
            "[[egress]]\nhost = \"api.example.com:7\"\n[limits]\nmax_connections = 5\n",
        ),
    );
    // Both tiers as deployed: the job gets exactly its five connections wherever they land.
    let mut d = Driver::new(job.spawn_python(PY_HOLD, &["api.example.com", "7", "8"]));
    let line = d.read_line();
    let f: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(&f[..4], &["ok", "5", "failed", "3"], "{line}");
    assert!(
        tier1_drops(&tb, &job, "connection_limit") >= 3,
        "tier 1 did not refuse the connections beyond the limit"
    );
    d.send("done");
}

#[test]
fn tier2_alone_with_tier1_limits_lifted_max_connections_admits_exactly_the_limit() {
    let _s = serial();
    let tb = testbed_with_proxies();
    let _logs = LogsOnFailure(&tb);
    let job = Job::start(
        &tb,
        1,
        &policy(
            "acme",
            "[[egress]]\nhost = \"api.example.com:7\"\n[limits]\nmax_connections = 5\n",
        ),
    );
    // The proxy alone decides: one proxy (limits are per proxy) and tier 1's limits lifted.
    only_proxy_1(&tb);
    widen_tier1_limits(&tb, &job);
    let mut d = Driver::new(job.spawn_python(PY_HOLD, &["api.example.com", "7", "8"]));
    let line = d.read_line();
    let f: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(&f[..4], &["ok", "5", "failed", "3"], "{line}");
    // The proxy holds exactly those five flows of the job, and it refused the rest itself.
    let key = job.info().job_key;
    let live = proxy_flows(&tb, 1)
        .iter()
        .filter(|fl| flow_is(fl, key, None) && fl.dst.port() == 7)
        .count();
    assert_eq!(live, 5, "flows of the job at the proxy");
    assert_eq!(
        tier1_drops(&tb, &job, "connection_limit"),
        0,
        "tier 1 was not widened"
    );
    assert!(
        proxy_drops(&tb, 1, "connection_limit") >= 3.0,
        "the proxy did not count its refusals"
    );
    d.send("done");
}

#[test]
fn a_cleanly_closed_connection_frees_its_max_connections_slot() {
    let _s = serial();
    let tb = testbed_with_proxies();
    let _logs = LogsOnFailure(&tb);
    let job = Job::start(
        &tb,
        1,
        &policy(
            "acme",
            "[[egress]]\nhost = \"api.example.com:7\"\n[limits]\nmax_connections = 5\n",
        ),
    );
    only_proxy_1(&tb);
    let mut d = Driver::new(job.spawn_python(PY_HOLD, &["api.example.com", "7", "5"]));
    let line = d.read_line();
    assert!(line.starts_with("ok 5 failed 0"), "{line}");
    // max_connections bounds concurrent connections: once one is closed (FIN both ways), both
    // tiers free its slot and the next one is admitted, twice in a row.
    assert_eq!(d.ask("close-one"), "new ok");
    assert_eq!(d.ask("close-one"), "new ok");
    d.send("done");
}

/// Fires N non-blocking connects at once, waits 0.5 s, counts the connected ones and closes all
/// with RST (so no connection stays), sleeps `pause` seconds, and repeats once. Prints
/// `a b dt d1 d2`: connected in each burst, seconds between the bursts' first SYNs, and how
/// long each burst took to send.
const PY_BURST: &str = r#"
import socket, sys, time, struct, select
host, port, n, pause = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
ip = socket.getaddrinfo(host, port, socket.AF_INET, socket.SOCK_STREAM)[0][4][0]
def burst():
    socks = []
    t0 = time.monotonic()
    for _ in range(n):
        s = socket.socket(); s.setblocking(False)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.connect_ex((ip, port)); socks.append(s)
    d = time.monotonic() - t0
    time.sleep(0.5)
    ok = sum(1 for s in socks if s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0 and select.select([], [s], [], 0)[1])
    for s in socks: s.close()
    return ok, t0, d
a, t1, d1 = burst()
time.sleep(pause)
b, t2, d2 = burst()
print(a, b, t2 - t1, d1, d2)
"#;

#[test]
fn tier2_alone_with_tier1_limits_lifted_new_connections_per_sec_admits_the_burst_then_the_rate() {
    let _s = serial();
    let tb = testbed_with_proxies();
    let _logs = LogsOnFailure(&tb);
    let job = Job::start(
        &tb,
        1,
        &policy(
            "acme",
            "[[egress]]\nhost = \"api.example.com:7\"\n[limits]\nnew_connections_per_sec = 4\nnew_connections_burst = 6\n",
        ),
    );
    only_proxy_1(&tb);
    widen_tier1_limits(&tb, &job);
    // Warm up: one connection makes the proxy fetch the policy (its first SYN waits for that);
    // then 2 s refill the bucket (6 tokens at 4/s take 1.5 s).
    let out = job.python(PY_HOLD, &["api.example.com", "7", "1"]);
    assert!(out.starts_with("ok 1 "), "{out}");
    std::thread::sleep(std::time::Duration::from_secs(2));
    // A burst of 12 at once gets exactly the 6 of the bucket. The second burst starts
    // 0.5 + 0.625 s later: 4.5 tokens refilled, so exactly 4 more.
    // A burst of 12 at once gets the 6 of the bucket (plus what refills while it is sent).
    // The second gets what refilled since the first emptied the bucket: 4/s over the measured
    // time between the bursts (about 1.125 s: 4.5 tokens, so 4), never more than the burst.
    let out = job.python(PY_BURST, &["api.example.com", "7", "12", "0.625"]);
    let f: Vec<f64> = out.split_whitespace().map(|x| x.parse().unwrap()).collect();
    let (a, b, dt, d1, d2) = (f[0], f[1], f[2], f[3], f[4]);
    let tokens = |secs: f64| (4.0 * secs).floor().min(6.0);
    assert_eq!(a, 6.0 + (4.0 * d1).floor(), "first burst: {out}");
    let (lo, hi) = (tokens(dt - d1 - 0.005), tokens(dt + d2 + 0.005));
    assert!(
        (lo..=hi).contains(&b),
        "second burst {b} after {dt:.3} s, expected {lo}..={hi}: {out}"
    );
    assert!(b < a, "the rate did not bite: {out}");
    assert_eq!(
        tier1_drops(&tb, &job, "new_connection_rate"),
        0,
        "tier 1 was not widened"
    );
    assert!(proxy_drops(&tb, 1, "new_connection_rate") >= 14.0);
}

/// Opens N connected UDP sockets to (host, port) and counts echo answers.
const PY_UDP_N: &str = r#"
import socket, sys
host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
ip = socket.getaddrinfo(host, port, socket.AF_INET, socket.SOCK_DGRAM)[0][4][0]
socks, answered = [], 0
for i in range(n):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(1.0)
    s.connect((ip, port)); socks.append(s)
    try:
        s.send(b"u%d" % i)
        if s.recv(64) == b"u%d" % i:
            answered += 1
    except OSError:
        pass
print(answered)
"#;

#[test]
fn a_job_at_its_port_cap_does_not_stop_another_tenant() {
    let _s = serial();
    let tb = testbed_with_proxies();
    let _logs = LogsOnFailure(&tb);
    let rule = "[[egress]]\nhost = \"api.example.com:7\"\nprotocol = \"udp\"\n";
    let greedy = Job::start(
        &tb,
        1,
        &policy(
            "tenant-a",
            &format!("{rule}[limits]\nmax_ports_per_destination = 3\n"),
        ),
    );
    let other = Job::start(&tb, 2, &policy("tenant-b", rule));
    // Caps are per proxy: use one.
    only_proxy_1(&tb);
    let out = greedy.python(PY_UDP_N, &["api.example.com", "7", "6"]);
    assert_eq!(
        out.trim(),
        "3",
        "tenant-a got more than its ports toward the destination"
    );
    let out = other.python(PY_UDP_N, &["api.example.com", "7", "6"]);
    assert_eq!(out.trim(), "6", "tenant-b was affected by tenant-a");
    let capped = proxy_drops(&tb, 1, "destination_port_cap");
    assert!(
        capped >= 3.0,
        "the cap refusals were not counted ({capped})"
    );
}

#[test]
fn one_tenant_exhausting_its_port_quota_does_not_stop_another_tenant() {
    let _s = serial();
    let tb = testbed_with_proxies();
    let _logs = LogsOnFailure(&tb);
    // Proxy 1 with a quota of 8 ports for tenant-a only; proxy 2 out of the way.
    std::fs::write(
        snas_testbed::daemons::proxy_extra_config(tb.topology(), 1),
        "[tenant_quotas]\ntenant-a = 8\n",
    )
    .unwrap();
    tb.stop_proxy(1);
    tb.start_proxy(1).unwrap();
    wait_until(
        std::time::Duration::from_secs(10),
        "proxy 1 /healthz after restart",
        || proxy_health(&tb, 1).is_ok_and(|h| h == ProxyHealth::Ok),
    );
    only_proxy_1(&tb);
    for n in 1..=2 {
        wait_until(
            std::time::Duration::from_secs(5),
            "agents see proxy 1 alive",
            || agent_proxy_health(&tb, n, 1) == Some(Health::Alive),
        );
    }
    let rule = "[[egress]]\nhost = \"api.example.com:7\"\nprotocol = \"udp\"\n";
    let a1 = Job::start(&tb, 1, &policy("tenant-a", rule));
    let a2 = Job::start(&tb, 2, &policy("tenant-a", rule));
    let b = Job::start(&tb, 1, &policy("tenant-b", rule));
    let out = a1.python(PY_UDP_N, &["api.example.com", "7", "10"]);
    assert_eq!(out.trim(), "8", "tenant-a's first job");
    // The tenant's ports are used up (live or quarantined): its other job gets none ...
    let out = a2.python(PY_UDP_N, &["api.example.com", "7", "4"]);
    assert_eq!(out.trim(), "0", "tenant-a's second job");
    // ... and another tenant is unaffected.
    let out = b.python(PY_UDP_N, &["api.example.com", "7", "10"]);
    assert_eq!(out.trim(), "10", "tenant-b");
    assert!(proxy_drops(&tb, 1, "tenant_port_quota") >= 6.0);
}
