//! End-to-end (root; `cargo build --release -p snas`, `SNAS_BIN`): the loops ordinary programs
//! run (issue 12). Nothing here lifts a limit: the jobs run with the policy defaults except
//! where a test sets a limit lower to make it bite sooner.
//! - a job with `max_connections = 32` makes 1,500 short connections by name (a lookup each),
//!   mixes two names that share one address on different ports, reuses an address well after
//!   the proxy's minimum TTL, and sees no failure;
//! - 2,000 lookups of the same names never fail, while random names under a wildcard (the
//!   tunnelling channel) still hit the budget;
//! - 40,000 short connections to one server in well under a minute (more than the two
//!   proxies' per-job NAT port quotas hold, 2 × 16,384, within one port quarantine) never fail:
//!   a tuple the job reuses takes its NAT port back. The policy raises the job's own limits
//!   for such a loop (5,000 new connections per second, 65,535 flows to one destination —
//!   closed flows count until they expire 30 s later): the defaults, 50 per second and 1,024,
//!   keep a job far below the NAT quotas;
//! - a fresh job's first connection is not stalled by the proxies' policy fetch;
//! - an expiring job is refused at once after `exp`, and both tiers forget it;
//! - denied UDP gets an ICMP error at once;
//! - the proxies' flow-end records carry the bytes a flow moved.
#![allow(clippy::unwrap_used)]

mod e2e_support;

use std::time::{Duration, SystemTime};

use e2e_support::*;
use snas_agent::api::JobState;

/// Loops `n` times: a lookup + connect + HTTP GET + close to api.example.com:80; every 50th
/// round also a TCP echo to www.example.org:7 (the same address as api.example.com, another
/// port and another name); then resolves short-ttl.example.com (TTL 1 s, answered as 5 s),
/// waits 8 s and connects to the address without resolving again. Prints one JSON object.
const PY_LOOP: &str = r#"
import socket, sys, time, errno, json
n = int(sys.argv[1])
fails = {}
def bump(k):
    fails[k] = fails.get(k, 0) + 1
def err(e):
    return errno.errorcode.get(e.errno, type(e).__name__) if getattr(e, "errno", None) else type(e).__name__
lat = []
t0 = time.monotonic()
for i in range(n):
    t = time.monotonic()
    try:
        s = socket.create_connection(("api.example.com", 80), timeout=10)
        lat.append(time.monotonic() - t)
        s.sendall(b"GET / HTTP/1.1\r\nHost: api.example.com\r\nConnection: close\r\n\r\n")
        data = b""
        while True:
            c = s.recv(4096)
            if not c:
                break
            data += c
        s.close()
        if b" 200 " not in data.split(b"\r\n", 1)[0]:
            bump("http:bad-answer")
    except OSError as e:
        bump("http:" + err(e))
    if i % 50 == 0:
        try:
            c = socket.create_connection(("www.example.org", 7), timeout=10)
            c.sendall(b"echo%d" % i)
            want = b"echo%d" % i
            got = b""
            while len(got) < len(want):
                chunk = c.recv(64)
                if not chunk:
                    break
                got += chunk
            c.close()
            if got != want:
                bump("echo:bad-answer")
        except OSError as e:
            bump("echo:" + err(e))
try:
    ip = socket.getaddrinfo("short-ttl.example.com", 80, socket.AF_INET, socket.SOCK_STREAM)[0][4][0]
    time.sleep(8)
    s = socket.create_connection((ip, 80), timeout=10)
    s.sendall(b"GET / HTTP/1.1\r\nHost: short-ttl.example.com\r\nConnection: close\r\n\r\n")
    if b" 200 " not in s.recv(4096):
        bump("reuse:bad-answer")
    s.close()
except OSError as e:
    bump("reuse:" + err(e))
lat.sort()
q = lambda f: round(lat[min(len(lat) - 1, int(f * len(lat)))] * 1000, 2) if lat else None
print(json.dumps({"n": n, "fails": fails, "secs": round(time.monotonic() - t0, 1),
                  "connect_p50_ms": q(0.5), "connect_p99_ms": q(0.99)}))
"#;

#[test]
fn fifteen_hundred_short_connections_by_name_with_max_connections_32_never_fail() {
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
host = "www.example.org:7"
[[egress]]
host = "short-ttl.example.com:80"
[limits]
max_connections = 32
"#,
        ),
    );
    let out = job.python(PY_LOOP, &["1500"]);
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(
        v["fails"],
        serde_json::json!({}),
        "the workload saw failures: {out}"
    );
    assert_eq!(
        tier1_drops(&tb, &job, "connection_limit"),
        0,
        "tier 1 refused connections of a job that never held more than two: {out}"
    );
    eprintln!("workload: {out}");
}

/// Loops `n` times, as fast as it can: connect to api.example.com:80 (resolved once), GET,
/// read to EOF (the server closes first), close. Prints one JSON object: `ok`, `fails` (by
/// errno) and `secs`.
const PY_CONNECTION_LOOP: &str = r#"
import socket, sys, time, errno, json
n = int(sys.argv[1])
ip = socket.getaddrinfo("api.example.com", 80, socket.AF_INET, socket.SOCK_STREAM)[0][4][0]
ok, fails = 0, {}
t0 = time.monotonic()
req = b"GET / HTTP/1.1\r\nHost: api.example.com\r\nConnection: close\r\n\r\n"
for i in range(n):
    try:
        s = socket.create_connection((ip, 80), timeout=10)
        s.sendall(req)
        while s.recv(65536):
            pass
        s.close()
        ok += 1
    except OSError as e:
        k = errno.errorcode.get(e.errno, type(e).__name__) if e.errno else type(e).__name__
        fails[k] = fails.get(k, 0) + 1
print(json.dumps({"ok": ok, "fails": fails, "secs": round(time.monotonic() - t0, 1)}))
"#;

#[test]
fn forty_thousand_short_connections_to_one_server_with_policy_limits_raised_for_a_fast_loop_never_run_out_of_nat_ports(
) {
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
[limits]
new_connections_per_sec = 5000
new_connections_burst = 5000
max_ports_per_destination = 65535
"#,
        ),
    );
    let out = job.python(PY_CONNECTION_LOOP, &["40000"]);
    eprintln!("40,000 connections: {out}");
    let tier1 = tb
        .agent(job.node)
        .counters(&job.info().job_key.to_string())
        .unwrap()
        .drops;
    let tier2: Vec<_> = (1..=2)
        .map(|n| on_proxy(&tb, n, |c| c.drops()).unwrap().drops)
        .collect();
    eprintln!("drops: tier 1 {tier1:?}, proxies {tier2:?}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["fails"], serde_json::json!({}), "{out}");
    assert_eq!(v["ok"], 40_000, "{out}");
    let secs = v["secs"].as_f64().unwrap();
    assert!(
        secs < 60.0,
        "the loop took {secs} s, past one port quarantine: it no longer tests the quota"
    );
    for n in 1..=2 {
        assert_eq!(proxy_drops(&tb, n, "port_quota"), 0.0, "proxy {n}");
    }
}

/// `n` lookups of three names with getaddrinfo (A and AAAA each), then `m` random names under
/// `*.svc.example.com` as fast as possible. Prints `failed refused_random answered_random secs`
/// (`secs`: how long the random names took).
const PY_LOOKUPS: &str = r#"
import socket, sys, random
n, m = int(sys.argv[1]), int(sys.argv[2])
failed = 0
names = ["api.example.com", "www.example.org", "a.svc.example.com"]
for i in range(n):
    try:
        socket.getaddrinfo(names[i % 3], 80, 0, socket.SOCK_STREAM)
    except OSError:
        failed += 1
import time
refused = answered = 0
t0 = time.monotonic()
for i in range(m):
    try:
        socket.getaddrinfo("t%08x.svc.example.com" % random.getrandbits(32), 80, socket.AF_INET)
        answered += 1
    except socket.gaierror as e:
        if e.errno == socket.EAI_NONAME:
            answered += 1  # NXDOMAIN: the query went upstream and was answered
        else:
            refused += 1
print(failed, refused, answered, "%.3f" % (time.monotonic() - t0))
"#;

#[test]
fn two_thousand_lookups_never_fail_while_random_names_still_hit_the_budget() {
    let _s = serial();
    let tb = testbed_with_proxies();
    let _logs = LogsOnFailure(&tb);
    let job = Job::start(
        &tb,
        1,
        &policy(
            "acme",
            "[[egress]]\nhost = \"api.example.com:80\"\n[[egress]]\nhost = \"www.example.org:80\"\n[[egress]]\nhost = \"*.svc.example.com:80\"\n",
        ),
    );
    let out = job.python(PY_LOOKUPS, &["2000", "300"]);
    let f: Vec<f64> = out.split_whitespace().map(|x| x.parse().unwrap()).collect();
    let (failed, refused, answered, secs) = (f[0], f[1], f[2], f[3]);
    assert_eq!(failed, 0.0, "lookups of allowed names failed: {out}");
    // New names are the tunnelling channel: the default budget (burst 40, 20/s) bounds what
    // reaches upstream over the time the 300 names took (+2 for a refill at the edges).
    assert!(
        answered <= 40.0 + 20.0 * secs + 2.0,
        "random names under the wildcard were not bounded: {out}"
    );
    assert!(refused > 0.0 && answered >= 20.0, "{out}");
}

/// Prints the milliseconds of the first `connect()` to (host, port): a name is resolved first
/// (not timed), an address is used as is.
const PY_FIRST_CONNECT: &str = r#"
import socket, sys, time
host, port = sys.argv[1], int(sys.argv[2])
ip = socket.getaddrinfo(host, port, socket.AF_INET, socket.SOCK_STREAM)[0][4][0]
s = socket.socket()
s.settimeout(5)
t = time.monotonic()
s.connect((ip, port))
print("%.3f" % ((time.monotonic() - t) * 1000))
"#;

#[test]
fn a_fresh_jobs_first_connection_is_not_stalled_by_the_policy_fetch() {
    let _s = serial();
    let tb = testbed_with_proxies();
    let _logs = LogsOnFailure(&tb);
    let mut times = Vec::new();
    // By name, the connection may land on the proxy that did not resolve the name: it must
    // already hold the binding (the resolver answers once its peers have it).
    for i in 0..16 {
        // By raw address under a CIDR rule the SYN is the very first packet a proxy sees of the
        // job (no DNS query warmed it): the proxy must hold it while it fetches the policy.
        let (dest, body) = if i % 2 == 0 {
            (
                "203.0.113.10",
                "[[egress]]\ncidr = \"203.0.113.0/24\"\nports = \"80\"\n",
            )
        } else {
            (
                "api.example.com",
                "[[egress]]\nhost = \"api.example.com:80\"\n",
            )
        };
        let job = Job::start(&tb, 1 + (i % 2) as u8, &policy("acme", body));
        let ms: f64 = job
            .python(PY_FIRST_CONNECT, &[dest, "80"])
            .trim()
            .parse()
            .unwrap();
        times.push((dest, ms));
    }
    for (dest, ms) in &times {
        assert!(
            *ms < 100.0,
            "a fresh job's first connection to {dest} took {ms:.1} ms: {times:?}"
        );
    }
}

/// Connects to (ip, 80) every 20 ms until `until` (Unix seconds), and sends a UDP datagram to
/// (ip, 7) on one connected socket each round (up to three tries); prints a JSON list of
/// `[unix time, tcp outcome, tcp ms, udp outcome]`.
const PY_UNTIL: &str = r#"
import socket, sys, time, errno, json
until = float(sys.argv[1])
ip = socket.getaddrinfo("api.example.com", 80, socket.AF_INET, socket.SOCK_STREAM)[0][4][0]
res = []
# One UDP socket for the whole run: a new socket per round would open a UDP flow every
# round, and UDP flows hold a connection slot until they idle out, so ~250 rounds would meet
# the policy's default max_connections (256) just before exp.
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
u.settimeout(0.5)
u.connect((ip, 7))
def name(e):
    return errno.errorcode.get(e.errno, type(e).__name__) if getattr(e, "errno", None) else type(e).__name__
while time.time() < until:
    t = time.time()
    m = time.monotonic()
    s = socket.socket()
    s.settimeout(3)
    try:
        s.connect((ip, 80)); r = "ok"
    except socket.timeout:
        r = "timeout"
    except OSError as e:
        r = name(e)
    ms = (time.monotonic() - m) * 1000
    s.close()
    # UDP is lossy: like any client, try a datagram up to three times before calling it lost.
    ru = "timeout"
    try:
        for _ in range(3):
            try:
                u.send(b"x"); u.recv(64); ru = "ok"
                break
            except socket.timeout:
                pass
    except OSError as e:
        ru = name(e)
    res.append([t, r, round(ms, 2), ru])
    time.sleep(0.02)
print(json.dumps(res))
"#;

#[test]
fn an_expiring_job_is_refused_at_once_after_exp_and_both_tiers_forget_it() {
    let _s = serial();
    let tb = testbed_with_proxies();
    let _logs = LogsOnFailure(&tb);
    let token = tb
        .sign_policy(&policy(
            "acme",
            "ttl = \"10s\"\n[[egress]]\nhost = \"api.example.com:80\"\n[[egress]]\nhost = \"api.example.com:7\"\nprotocol = \"udp\"\n",
        ))
        .unwrap();
    let job = Job::start_token(&tb, 1, &token);
    let me = tb.agent(1).job(&job.info().job_key.to_string()).unwrap();
    let exp = me.expires_at as f64;
    let out = job.python(PY_UNTIL, &[&format!("{}", exp + 2.0)]);
    let rounds: Vec<(f64, String, f64, String)> = serde_json::from_str(out.trim()).unwrap();
    let before: Vec<_> = rounds.iter().filter(|r| r.0 < exp - 0.2).collect();
    let after: Vec<_> = rounds.iter().filter(|r| r.0 > exp + 0.5).collect();
    assert!(
        before.len() > 10 && after.len() > 10,
        "too few rounds around exp: {out}"
    );
    for r in &before {
        assert!(
            r.1 == "ok" && r.3 == "ok",
            "refused before exp ({exp}): {r:?}"
        );
    }
    for r in &after {
        assert!(
            r.1 != "ok" && r.1 != "timeout" && r.2 < 100.0,
            "TCP not refused at once 0.5 s after exp ({exp}): {r:?}"
        );
        assert!(
            r.3 != "ok" && r.3 != "timeout",
            "UDP not refused at once 0.5 s after exp ({exp}): {r:?}"
        );
    }
    // The agent shows the job expired; the proxies hold none of its flows any more.
    wait_until(
        Duration::from_secs(5),
        "agent marks the job expired",
        || {
            tb.agent(1)
                .list_jobs()
                .unwrap()
                .iter()
                .any(|j| j.job_key == job.info().job_key && j.state == JobState::Expired)
        },
    );
    let key = job.info().job_key;
    wait_until(
        Duration::from_secs(5),
        "proxies forget the job's flows",
        || (1..=2).all(|n| !proxy_flows(&tb, n).iter().any(|f| flow_is(f, key, None))),
    );
    assert!(SystemTime::now() > SystemTime::UNIX_EPOCH + Duration::from_secs_f64(exp));
}

/// Sends one datagram on a connected UDP socket to (ip, port) and waits for the error; prints
/// `OUTCOME ms`.
const PY_UDP_REFUSED: &str = r#"
import socket, sys, time, errno
ip, port = sys.argv[1], int(sys.argv[2])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(2)
s.connect((ip, port))
t = time.monotonic()
try:
    s.send(b"x"); s.recv(64); r = "ANSWER"
except socket.timeout:
    r = "TIMEOUT"
except OSError as e:
    r = errno.errorcode.get(e.errno, str(e.errno))
print(r, "%.3f" % ((time.monotonic() - t) * 1000))
"#;

#[test]
fn denied_udp_gets_an_icmp_error_at_once() {
    let _s = serial();
    let tb = testbed_with_proxies();
    let _logs = LogsOnFailure(&tb);
    let job = Job::start(
        &tb,
        1,
        &policy(
            "acme",
            "[[egress]]\nhost = \"api.example.com:7\"\nprotocol = \"udp\"\n",
        ),
    );
    // No rule names 203.0.113.20; api.example.com is allowed on UDP 7 but not UDP 9 once bound.
    job.python(
        "import socket; socket.getaddrinfo('api.example.com', 7, socket.AF_INET)",
        &[],
    );
    for (ip, port) in [
        ("203.0.113.20", "7"),
        ("203.0.113.10", "9"),
        ("10.1.2.3", "7"),
    ] {
        let out = job.python(PY_UDP_REFUSED, &[ip, port]);
        let mut it = out.split_whitespace();
        let (r, ms): (&str, f64) = (
            it.next().unwrap_or(""),
            it.next().and_then(|m| m.parse().ok()).unwrap_or(f64::MAX),
        );
        assert!(
            ["ECONNREFUSED", "EHOSTUNREACH", "ENETUNREACH"].contains(&r) && ms < 10.0,
            "UDP to {ip}:{port}: expected an ICMP error at once, got {out}"
        );
    }
}

#[test]
fn a_flow_end_record_carries_the_bytes_the_flow_moved() {
    let _s = serial();
    let tb = testbed_with_proxies();
    let _logs = LogsOnFailure(&tb);
    let job = Job::acme(&tb, "[[egress]]\nhost = \"bulk.example.com:5201\"\n");
    let out = job.python(
        r#"
import socket
s = socket.create_connection(("bulk.example.com", 5201), timeout=10)
s.sendall(b"SEND 1000000\n")
n = 0
while True:
    c = s.recv(65536)
    if not c: break
    n += len(c)
s.close()
print(n)
"#,
        &[],
    );
    assert_eq!(out.trim(), "1000000");
    let key = job.info().job_key.to_string();
    let mut found = None;
    wait_until(
        Duration::from_secs(45),
        "a flow_end line of the job",
        || {
            for n in 1..=2 {
                let log = tb.topology().proxy_dir(n).join("audit.jsonl");
                let text = std::fs::read_to_string(log).unwrap_or_default();
                for line in text.lines() {
                    let v: serde_json::Value = match serde_json::from_str(line) {
                        Ok(v) => v,
                        Err(_) => continue,
                    };
                    if v["kind"] == "flow_end" && v["job_key"].as_str() == Some(key.as_str()) {
                        found = Some(v);
                        return true;
                    }
                }
            }
            false
        },
    );
    let v = found.unwrap();
    let bytes_in = v["bytes_in"].as_u64().unwrap_or(0);
    let bytes_out = v["bytes_out"].as_u64().unwrap_or(0);
    assert!(
        (1_000_000..1_200_000).contains(&bytes_in),
        "bytes toward the job: {v}"
    );
    assert!(
        bytes_out > 0 && bytes_out < 200_000,
        "bytes from the job: {v}"
    );
    // The kernel hands the proxy TCP super-packets (up to 64 KiB, one packet each), so a
    // megabyte is at least 16 packets, and at most one per full-sized segment and ACK.
    let packets_in = v["packets_in"].as_u64().unwrap_or(0);
    assert!((16..1_500).contains(&packets_in), "{v}");
}
