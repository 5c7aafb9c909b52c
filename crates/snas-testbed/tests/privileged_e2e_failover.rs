//! End-to-end (root; `cargo build -p snas` first): proxy failover and drain, and an agent
//! restart under a running job.
//!
//! A long-lived python client in the job holds TCP echo connections to api.example.com:7 and
//! answers commands on stdin (`open N`, `echo PORT…`, `until K`), so the test can stop a
//! proxy or the agent between two exchanges on the same connections.
#![allow(clippy::unwrap_used)]

mod e2e_support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use e2e_support::*;
use snas_testbed::Testbed;

const PY_CLIENT: &str = r#"
import socket, sys, time
ip = socket.getaddrinfo("api.example.com", 7, socket.AF_INET, socket.SOCK_STREAM)[0][4][0]
conns = {}
def new(timeout):
    s = socket.socket(); s.settimeout(timeout)
    try:
        s.connect((ip, 7)); s.sendall(b"hi")
        if s.recv(16) != b"hi":
            raise OSError("bad echo")
    except OSError:
        s.close(); raise
    s.settimeout(2.0)
    return s
for line in sys.stdin:
    cmd = line.split()
    if cmd[0] == "open":
        ports = []
        for _ in range(int(cmd[1])):
            s = new(3.0); p = s.getsockname()[1]; conns[p] = s; ports.append(p)
        print(" ".join(map(str, ports)))
    elif cmd[0] == "echo":
        res = []
        for p in map(int, cmd[1:]):
            s = conns[p]
            try:
                s.sendall(b"e%d" % p); ok = s.recv(32) == b"e%d" % p
            except OSError:
                ok = False
            res.append("ok" if ok else "fail")
        print(" ".join(res))
    elif cmd[0] == "until":
        # New connections (0.3 s connect timeout) every 50 ms until K in a row succeed; prints
        # the seconds from the command to the first of them.
        k, t0, streak, first = int(cmd[1]), time.monotonic(), 0, None
        while time.monotonic() - t0 < 20:
            try:
                new(0.3).close()
                if streak == 0:
                    first = time.monotonic()
                streak += 1
                if streak >= k:
                    break
            except OSError:
                streak = 0
                time.sleep(0.05)
        print("%.3f" % (first - t0) if streak >= k else "never")
"#;

/// Which running proxy (1 or 2) holds each of the job's connections, by sandbox port.
fn proxy_of(tb: &Testbed, job: &Job, ports: &[u16]) -> BTreeMap<u16, u8> {
    let mut m = BTreeMap::new();
    for n in (1..=2).filter(|&n| running(tb, snas_testbed::Daemon::Proxy(n))) {
        for f in proxy_flows(tb, n) {
            if f.job_key != job.info().job_key {
                continue;
            }
            let p = f.src.port();
            if ports.contains(&p) {
                m.insert(p, n);
            }
        }
    }
    m
}

fn ports(line: &str) -> Vec<u16> {
    line.split_whitespace()
        .map(|p| p.parse().unwrap())
        .collect()
}

fn join(ports: &[u16]) -> String {
    ports
        .iter()
        .map(u16::to_string)
        .collect::<Vec<_>>()
        .join(" ")
}

/// Opens connections (in rounds of 6, at most 48) until each proxy holds at least `min`.
fn open_on_both(tb: &Testbed, job: &Job, d: &mut Driver, min: usize) -> BTreeMap<u16, u8> {
    let mut all = Vec::new();
    for _ in 0..8 {
        all.extend(ports(&d.ask("open 6")));
        let m = proxy_of(tb, job, &all);
        assert_eq!(
            m.len(),
            all.len(),
            "a connection is on no proxy: {m:?} {all:?}"
        );
        if (1..=2).all(|n| m.values().filter(|&&p| p == n).count() >= min) {
            return m;
        }
    }
    panic!("48 connections did not spread over both proxies");
}

fn on(m: &BTreeMap<u16, u8>, n: u8) -> Vec<u16> {
    m.iter()
        .filter(|(_, &p)| p == n)
        .map(|(&port, _)| port)
        .collect()
}

#[test]
fn stopping_a_proxy_moves_new_connections_within_3s_and_spares_the_other_proxys_flows() {
    let _s = serial();
    let tb = testbed_with_proxies();
    let _logs = LogsOnFailure(&tb);
    let job = Job::acme(&tb, "[[egress]]\nhost = \"api.example.com:7\"\n");
    let mut d = Driver::new(job.spawn_python(PY_CLIENT, &[]));
    let m = open_on_both(&tb, &job, &mut d, 3);
    let survivors = on(&m, 1);

    let t_stop = Instant::now();
    tb.stop_proxy(2);
    let sent = t_stop.elapsed();
    let answer = d.ask("until 5");
    assert_ne!(
        answer, "never",
        "new connections never succeeded after proxy 2 stopped"
    );
    let to_success = sent + Duration::from_secs_f64(answer.parse().unwrap());
    eprintln!("new connections succeed {to_success:?} after proxy 2 was stopped");
    assert!(
        to_success <= Duration::from_secs(3),
        "new connections succeeded only {to_success:?} after the stop"
    );
    // Every connection through proxy 1 still works, on the same sockets.
    let echo = d.ask(&format!("echo {}", join(&survivors)));
    assert!(
        echo.split_whitespace().all(|r| r == "ok"),
        "flows on the surviving proxy were disturbed: {echo}"
    );
    let now_on = proxy_of(&tb, &job, &survivors);
    assert!(now_on.values().all(|&p| p == 1), "{now_on:?}");
}

#[test]
fn a_drained_proxy_gets_no_new_flows_and_keeps_its_own() {
    let _s = serial();
    let tb = testbed_with_proxies();
    let _logs = LogsOnFailure(&tb);
    let job = Job::acme(&tb, "[[egress]]\nhost = \"api.example.com:7\"\n");
    let mut d = Driver::new(job.spawn_python(PY_CLIENT, &[]));
    let m = open_on_both(&tb, &job, &mut d, 2);
    let on_2 = on(&m, 2);

    // The answer is the new health: 503 "draining".
    let health = on_proxy(&tb, 2, |c| c.drain()).unwrap();
    assert_eq!(health, ProxyHealth::Draining);
    wait_until(
        Duration::from_secs(5),
        "agent 1 sees proxy 2 draining",
        || agent_proxy_health(&tb, 1, 2) == Some(Health::Draining),
    );
    let fresh = ports(&d.ask("open 20"));
    let where_ = proxy_of(&tb, &job, &fresh);
    assert_eq!(where_.len(), fresh.len(), "{where_:?}");
    assert!(
        where_.values().all(|&p| p == 1),
        "new flows went to the drained proxy: {where_:?}"
    );
    let echo = d.ask(&format!("echo {}", join(&on_2)));
    assert!(
        echo.split_whitespace().all(|r| r == "ok"),
        "the drained proxy's own flows broke: {echo}"
    );
    assert_eq!(on_proxy(&tb, 2, |c| c.undrain()).unwrap(), ProxyHealth::Ok);
}

#[test]
fn restarting_the_agent_keeps_an_established_flow() {
    let _s = serial();
    let tb = testbed_with_proxies();
    let _logs = LogsOnFailure(&tb);
    let job = Job::acme(&tb, "[[egress]]\nhost = \"api.example.com:7\"\n");
    let mut d = Driver::new(job.spawn_python(PY_CLIENT, &[]));
    let held = ports(&d.ask("open 4"));
    let all_ok = |s: &str| {
        s.split_whitespace().count() == held.len() && s.split_whitespace().all(|r| r == "ok")
    };
    let echo = d.ask(&format!("echo {}", join(&held)));
    assert!(all_ok(&echo), "{echo}");

    tb.stop_agent(1);
    assert!(!running(&tb, snas_testbed::Daemon::Agent(1)));
    let echo = d.ask(&format!("echo {}", join(&held)));
    assert!(all_ok(&echo), "while the agent is down: {echo}");

    tb.start_agent(1).unwrap();
    let echo = d.ask(&format!("echo {}", join(&held)));
    assert!(all_ok(&echo), "after the restart: {echo}");
    // The restarted agent still knows the job, and new connections work.
    let jobs = tb.agent(1).list_jobs().unwrap();
    assert!(
        jobs.iter().any(|j| j.job_key == job.info().job_key),
        "{jobs:?}"
    );
    assert_ne!(d.ask("until 2"), "never");
    // And the restarted agent's DNS stub answers the job again.
    let out = job.run(
        "dig",
        &["+time=2", "+tries=2", "+short", "api.example.com", "A"],
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "203.0.113.10");
}

/// Looks up names through the job's stub every 5 ms for `secs` seconds, over UDP
/// (getaddrinfo, A and AAAA) and every 10th time over TCP; prints `lookups failed`.
const PY_DNS_LOOP: &str = r#"
import socket, struct, sys, time
secs = float(sys.argv[1])
names = ["api.example.com", "www.example.org"]
q = b"\x77\x01\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x03api\x07example\x03com\x00\x00\x01\x00\x01"
n = failed = 0
end = time.monotonic() + secs
while time.monotonic() < end:
    n += 1
    try:
        if n % 10 == 0:
            s = socket.create_connection(("10.255.1.1", 53), timeout=3)
            s.sendall(struct.pack("!H", len(q)) + q)
            if len(s.recv(2)) != 2:
                raise OSError("no answer")
            s.close()
        else:
            socket.getaddrinfo(names[n % 2], 80, 0, socket.SOCK_STREAM)
    except OSError:
        failed += 1
    time.sleep(0.005)
print(n, failed)
"#;

#[test]
fn dns_keeps_answering_while_the_agent_is_replaced() {
    let _s = serial();
    let tb = testbed_with_proxies();
    let _logs = LogsOnFailure(&tb);
    let job = Job::start(
        &tb,
        1,
        &policy(
            "acme",
            "[[egress]]\nhost = \"api.example.com:80\"\n[[egress]]\nhost = \"www.example.org:80\"\n",
        ),
    );
    let mut lookups = job
        .command("python3", &["-u", "-c", PY_DNS_LOOP, "8"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut pids = Vec::new();
    for _ in 0..2 {
        std::thread::sleep(Duration::from_secs(2));
        pids.push(tb.restart_agent(1).unwrap());
    }
    let out = {
        use std::io::Read;
        let mut s = String::new();
        lookups
            .stdout
            .take()
            .unwrap()
            .read_to_string(&mut s)
            .unwrap();
        let _ = lookups.wait();
        s
    };
    let f: Vec<u64> = out.split_whitespace().map(|x| x.parse().unwrap()).collect();
    assert!(f[0] > 200, "too few lookups: {out}");
    assert_eq!(
        f[1], 0,
        "lookups failed across two agent replacements: {out}"
    );
    assert_ne!(pids[0], pids[1], "the agent was not replaced");
    // The replaced agent still knows the job.
    let jobs = tb.agent(1).list_jobs().unwrap();
    assert!(
        jobs.iter().any(|j| j.job_key == job.info().job_key),
        "{jobs:?}"
    );
}
