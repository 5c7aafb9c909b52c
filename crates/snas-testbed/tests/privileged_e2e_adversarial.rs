//! End-to-end (root; `cargo build --release -p snas`, `SNAS_BIN`): the adversarial suite of
//! issue 11. A job whose validly signed policy is as wide as a policy can be (`0.0.0.0/0`, every
//! port, both protocols, `allow_private`) tries every infrastructure address and port of the
//! testbed — agents, the proxies' control, service, resolver and GENEVE ports, the underlay, the
//! transit links and gateways, the egress pools, other nodes' sandboxes, metadata — natively and
//! from gVisor, while packet captures on the underlay switch and in the internet prove that none
//! of its packets arrived there. A hostile tenant then holds the DNS stub's TCP slots and floods
//! UDP while a victim on the same node keeps resolving and talking without a single failure.
#![allow(clippy::unwrap_used)]

mod e2e_support;

use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use e2e_support::*;
use snas_proxy::api::blocking::ProxyClient;
use snas_testbed::capture::{Capture, Recording};
use snas_testbed::Testbed;

/// The widest policy a control plane can sign, plus a name rule so that DNS works.
const WIDE: &str = r#"
[[egress]]
cidr = "0.0.0.0/0"
ports = "0"
protocol = "any"
allow_private = true
[[egress]]
host = "api.example.com:80"
"#;

/// Every address of the testbed's infrastructure a job could aim at (node 1's job: its own
/// gateway is 10.255.1.1).
fn infrastructure_targets() -> Vec<Ipv4Addr> {
    let a = Ipv4Addr::new;
    vec![
        a(192, 0, 2, 11),      // node 1 (the job's own node)
        a(192, 0, 2, 12),      // node 2
        a(192, 0, 2, 21),      // proxy 1
        a(192, 0, 2, 22),      // proxy 2
        a(192, 0, 2, 1),       // unused underlay address
        a(198, 51, 100, 1),    // gateway of proxy 1 (internet side)
        a(198, 51, 100, 2),    // proxy 1's transit address
        a(198, 51, 100, 5),    // gateway of proxy 2
        a(198, 51, 100, 6),    // proxy 2's transit address
        a(198, 51, 100, 65),   // egress pool of proxy 1
        a(198, 51, 100, 70),   // egress pool of proxy 1
        a(198, 51, 100, 81),   // egress pool of proxy 2
        a(203, 0, 113, 53),    // the proxies' upstream DNS server
        a(10, 255, 1, 1),      // the job's own gateway (node 1 itself)
        a(10, 255, 2, 1),      // node 2's first job gateway
        a(10, 255, 2, 2),      // node 2's first sandbox
        a(169, 254, 169, 254), // cloud metadata
    ]
}

/// TCP ports of SNAS and of ordinary services (DNS 53/853 are captured to the job's own stub).
const TCP_PORTS: [u16; 9] = [22, 80, 443, 5353, 6081, 7070, 9090, 9091, 8080];
/// UDP ports (53 is captured to the stub).
const UDP_PORTS: [u16; 5] = [123, 5353, 6081, 7070, 9090];

/// Tries every (address, port) over TCP and UDP; prints one line per attempt:
/// `tcp|udp ADDR PORT OUTCOME` where OUTCOME is CONNECTED/ANSWER (a breach) or how it failed.
/// A connected TCP socket also sends the control API's state-changing request, as an
/// attacker would.
const PY_PROBE: &str = r#"
import socket, sys, errno
addrs = sys.argv[1].split(",")
tcp_ports = [int(p) for p in sys.argv[2].split(",")]
udp_ports = [int(p) for p in sys.argv[3].split(",")]
def name(e):
    return errno.errorcode.get(e.errno, str(e.errno)) if e.errno else type(e).__name__
for a in addrs:
    for p in tcp_ports:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.settimeout(0.4)
        try:
            s.connect((a, p))
            try:
                s.sendall(b"POST /v1/drain HTTP/1.0\r\n\r\nGET /v1/flows HTTP/1.0\r\n\r\n")
                s.recv(64)
            except OSError:
                pass
            r = "CONNECTED"
        except socket.timeout:
            r = "TIMEOUT"
        except OSError as e:
            r = name(e)
        s.close()
        print("tcp", a, p, r, flush=True)
    for p in udp_ports:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.settimeout(0.3)
        try:
            s.connect((a, p))
            s.send(b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x03api\x07example\x03com\x00\x00\x01\x00\x01")
            s.recv(512)
            r = "ANSWER"
        except socket.timeout:
            r = "TIMEOUT"
        except OSError as e:
            r = name(e)
        s.close()
        print("udp", a, p, r, flush=True)
"#;

fn probe_args() -> [String; 3] {
    let join = |v: Vec<String>| v.join(",");
    [
        join(
            infrastructure_targets()
                .iter()
                .map(|a| a.to_string())
                .collect(),
        ),
        join(TCP_PORTS.iter().map(|p| p.to_string()).collect()),
        join(UDP_PORTS.iter().map(|p| p.to_string()).collect()),
    ]
}

/// Checks the probe's output: every attempt was made and none reached anything.
fn assert_no_breach(out: &str, where_: &str) {
    let lines: Vec<&str> = out
        .lines()
        .filter(|l| l.starts_with("tcp ") || l.starts_with("udp "))
        .collect();
    let n = infrastructure_targets().len();
    assert_eq!(
        lines.len(),
        n * (TCP_PORTS.len() + UDP_PORTS.len()),
        "{where_}: the probe did not finish:\n{out}"
    );
    let breaches: Vec<&&str> = lines
        .iter()
        .filter(|l| l.ends_with(" CONNECTED") || l.ends_with(" ANSWER"))
        .collect();
    assert!(
        breaches.is_empty(),
        "{where_}: the wide-policy job reached infrastructure:\n{}",
        breaches
            .iter()
            .map(|l| l.to_string())
            .collect::<Vec<_>>()
            .join("\n")
    );
}

fn in_net(ip: IpAddr, net: &str) -> bool {
    net.parse::<ipnet::IpNet>().unwrap().contains(&ip)
}

/// The captures' verdict: no packet of a job (translated to an egress-pool source) travelled to
/// infrastructure in the internet, and nothing but underlay-to-underlay IPv4 crossed the
/// underlay switch.
fn assert_captures_clean(tb: &Testbed, underlay: &Recording, inet: &Recording) {
    let infra = tb.topology().infrastructure();
    let pools = ["198.51.100.64/28", "198.51.100.80/28"];
    let leaked: Vec<String> = inet
        .packets
        .iter()
        .filter(|p| pools.iter().any(|n| in_net(p.src, n)))
        .filter(|p| infra.iter().any(|n| n.contains(&p.dst)))
        .map(|p| format!("{p:?}"))
        .collect();
    assert!(
        leaked.is_empty(),
        "job packets reached infrastructure in the internet:\n{}",
        leaked.join("\n")
    );
    let foreign: Vec<String> = underlay
        .packets
        .iter()
        .filter(|p| p.src.is_ipv4() || p.dst.is_ipv4())
        .filter(|p| !in_net(p.src, "192.0.2.0/24") || !in_net(p.dst, "192.0.2.0/24"))
        .map(|p| format!("{p:?}"))
        .collect();
    assert!(
        foreign.is_empty(),
        "non-underlay packets crossed the underlay:\n{}",
        foreign.join("\n")
    );
    assert!(
        !underlay.packets.is_empty(),
        "the underlay capture saw nothing at all (GENEVE, DNS forwards and health checks cross it)"
    );
}

/// Both proxies still serve new flows and nobody drained them.
fn assert_proxies_in_service(tb: &Testbed) {
    for n in 1..=2 {
        let health = proxy_health(tb, n);
        assert!(
            matches!(health, Ok(ProxyHealth::Ok)),
            "proxy {n} is not in service: {health:?}"
        );
    }
}

#[test]
fn a_wide_policy_job_reaches_no_infrastructure_natively() {
    let _s = serial();
    let tb = testbed_with_proxies();
    let _logs = LogsOnFailure(&tb);
    let job = Job::start(&tb, 1, &policy("mallory", WIDE));
    // The policy is live and wide: a public address by name and by raw address.
    let (code, body) = job.curl("http://api.example.com/");
    assert_eq!(code, 0, "{body}");
    let (code, body) = job.curl("http://203.0.113.20/");
    assert_eq!(code, 0, "a raw public address under 0.0.0.0/0: {body}");

    let ul = Capture::start(&tb.topology().underlay_ns()).unwrap();
    let inet = Capture::start(&tb.topology().inet_ns()).unwrap();
    let [addrs, tcp, udp] = probe_args();
    let out = job.python(PY_PROBE, &[&addrs, &tcp, &udp]);
    std::thread::sleep(Duration::from_millis(300));
    let (ul, inet) = (ul.stop().unwrap(), inet.stop().unwrap());

    assert_no_breach(&out, "native job");
    assert_captures_clean(&tb, &ul, &inet);
    assert_proxies_in_service(&tb);
    assert!(
        tier1_drops(&tb, &job, "infrastructure_denied") > 0,
        "tier 1 counted no infrastructure_denied"
    );
    // The policy still works after the attack.
    let (code, body) = job.curl("http://api.example.com/");
    assert_eq!(code, 0, "{body}");
}

#[test]
fn a_wide_policy_job_reaches_no_infrastructure_from_gvisor() {
    let _s = serial();
    let tb = testbed_with_proxies();
    let _logs = LogsOnFailure(&tb);
    let token = tb.sign_policy(&policy("mallory", WIDE)).unwrap();
    let ul = Capture::start(&tb.topology().underlay_ns()).unwrap();
    let inet = Capture::start(&tb.topology().inet_ns()).unwrap();
    let [addrs, tcp, udp] = probe_args();
    let out = run_python_in_gvisor(&tb, &token, "240s", PY_PROBE, &[&addrs, &tcp, &udp]);
    std::thread::sleep(Duration::from_millis(300));
    let (ul, inet) = (ul.stop().unwrap(), inet.stop().unwrap());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "snas run failed ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert_no_breach(&stdout, "gVisor job");
    assert_captures_clean(&tb, &ul, &inet);
    assert_proxies_in_service(&tb);
}

#[test]
fn tier2_alone_with_tier1_infrastructure_cleared_still_refuses_infrastructure() {
    // What a compromised node could do: tier 1 forgets the infrastructure set. The proxies must
    // refuse on their own, and their namespace guard must keep anything from reaching their
    // local addresses or the underlay.
    let _s = serial();
    let tb = testbed_with_proxies();
    let _logs = LogsOnFailure(&tb);
    let job = Job::start(&tb, 1, &policy("mallory", WIDE));
    let t1 = snas_bpf::Tier1::open_pinned(&tb.topology().bpf_pin_dir(1)).unwrap();
    t1.set_infrastructure(&[]).unwrap();

    let ul = Capture::start(&tb.topology().underlay_ns()).unwrap();
    let inet = Capture::start(&tb.topology().inet_ns()).unwrap();
    let [addrs, tcp, udp] = probe_args();
    let out = job.python(PY_PROBE, &[&addrs, &tcp, &udp]);
    std::thread::sleep(Duration::from_millis(300));
    let (ul, inet) = (ul.stop().unwrap(), inet.stop().unwrap());

    assert_no_breach(&out, "native job, tier 1 infrastructure cleared");
    assert_captures_clean(&tb, &ul, &inet);
    assert_proxies_in_service(&tb);
    let refused: f64 = (1..=2)
        .map(|n| proxy_drops(&tb, n, "infrastructure_denied"))
        .sum();
    assert!(refused > 0.0, "the proxies refused nothing themselves");
}

/// A hostile tenant's load for `secs` seconds: 300 TCP connections held open to the DNS stub,
/// a DNS-over-UDP flood of names under its wildcard, and a UDP flood to its allowed echo
/// server, each from its own thread. Prints what it managed.
const PY_HOSTILE: &str = r#"
import socket, sys, threading, time, random
secs = float(sys.argv[1])
end = time.monotonic() + secs
held = []
def hold_dns_tcp():
    for _ in range(300):
        try:
            s = socket.create_connection(("10.255.1.1", 53), timeout=1)
            held.append(s)
        except OSError:
            pass
    while time.monotonic() < end:
        time.sleep(0.05)
sent = {"dns": 0, "udp": 0}
def flood_dns():
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setblocking(False)
    while time.monotonic() < end:
        name = b"x%08x" % random.getrandbits(32)
        q = b"\xab\xcd\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00" + bytes([len(name)]) + name + b"\x03svc\x07example\x03com\x00\x00\x01\x00\x01"
        try:
            s.sendto(q, ("10.255.1.1", 53)); sent["dns"] += 1
        except OSError:
            pass
        try:
            while True: s.recv(2048)
        except OSError:
            pass
def flood_udp():
    ip = socket.getaddrinfo("api.example.com", 7, socket.AF_INET, socket.SOCK_DGRAM)[0][4][0]
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setblocking(False)
    s.connect((ip, 7))
    payload = b"f" * 64
    while time.monotonic() < end:
        try:
            s.send(payload); sent["udp"] += 1
        except OSError:
            pass
        try:
            while True: s.recv(2048)
        except OSError:
            pass
ts = [threading.Thread(target=f) for f in (hold_dns_tcp, flood_dns, flood_udp)]
for t in ts: t.start()
for t in ts: t.join()
print("held", len(held), "dns", sent["dns"], "udp", sent["udp"], flush=True)
"#;

/// The victim's ordinary work: `n` lookups over UDP (getaddrinfo) and `n / 4` over TCP (a
/// hand-made query to the stub), and `n` TCP echo round trips on one connection. Prints
/// `lookups_failed tcp_lookups_failed echo_failed p50_us p99_us`.
const PY_VICTIM: &str = r#"
import socket, sys, time, struct
n = int(sys.argv[1])
fails = tfails = efails = 0
for i in range(n):
    try:
        socket.getaddrinfo("api.example.com", 7, socket.AF_INET, socket.SOCK_STREAM)
    except OSError:
        fails += 1
def tcp_lookup():
    q = b"\x55\x66\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x03api\x07example\x03com\x00\x00\x01\x00\x01"
    s = socket.create_connection(("10.255.1.5", 53), timeout=3)
    s.sendall(struct.pack("!H", len(q)) + q)
    hdr = s.recv(2)
    s.close()
    return len(hdr) == 2
for i in range(n // 4):
    try:
        if not tcp_lookup():
            tfails += 1
    except OSError:
        tfails += 1
ip = socket.getaddrinfo("api.example.com", 7, socket.AF_INET, socket.SOCK_STREAM)[0][4][0]
c = socket.create_connection((ip, 7), timeout=3)
c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
lat = []
for i in range(n):
    t = time.monotonic()
    try:
        c.sendall(b"r%06d" % i)
        got = b""
        while len(got) < 7:
            chunk = c.recv(64)
            if not chunk: raise OSError("closed")
            got += chunk
        lat.append(time.monotonic() - t)
    except OSError:
        efails += 1
lat.sort()
q = lambda f: lat[min(len(lat) - 1, int(f * len(lat)))] * 1e6 if lat else -1
print(fails, tfails, efails, "%.0f" % q(0.5), "%.0f" % q(0.99), flush=True)
"#;

#[test]
fn a_hostile_tenant_holding_dns_slots_and_flooding_udp_does_not_fail_a_victim() {
    let _s = serial();
    let tb = testbed_with_proxies();
    let _logs = LogsOnFailure(&tb);
    let hostile = Job::start(
        &tb,
        1,
        &policy(
            "mallory",
            "[[egress]]\nhost = \"*.svc.example.com:80\"\n[[egress]]\nhost = \"api.example.com:7\"\nprotocol = \"udp\"\n[limits]\negress_bps = \"1Gbit\"\n",
        ),
    );
    let victim = Job::acme(&tb, "[[egress]]\nhost = \"api.example.com:7\"\n");
    // The victim's stub address is its own gateway: tier 1 captures DNS sent anywhere, so a
    // query to 10.255.1.5 (not its gateway) reaches the stub just the same.
    let idle = victim.python(PY_VICTIM, &["400"]);
    let mut flood = start_hostile_load(&hostile);
    std::thread::sleep(Duration::from_secs(2));
    let loaded = victim.python(PY_VICTIM, &["400"]);
    let hostile_out = {
        use std::io::Read;
        let mut s = String::new();
        flood.stdout.take().unwrap().read_to_string(&mut s).unwrap();
        let _ = flood.wait();
        s
    };
    let f: Vec<&str> = loaded.split_whitespace().collect();
    assert_eq!(
        &f[..3],
        &["0", "0", "0"],
        "the victim failed under the hostile load (lookups, TCP lookups, echoes): {loaded}\nidle: {idle}\nhostile: {hostile_out}"
    );
    let h: Vec<&str> = hostile_out.split_whitespace().collect();
    assert!(
        h.len() == 6 && h[1].parse::<u32>().unwrap_or(0) >= 200,
        "the hostile job did not hold the stub's TCP slots: {hostile_out}"
    );
    eprintln!("victim idle (fails, tcp fails, echo fails, p50 us, p99 us): {idle}");
    eprintln!("victim under load: {loaded}; hostile: {hostile_out}");
}

/// Starts the hostile load for 20 s in the background.
fn start_hostile_load(hostile: &Job) -> std::process::Child {
    hostile
        .command("python3", &["-u", "-c", PY_HOSTILE, "20"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::inherit())
        .spawn()
        .unwrap()
}

#[test]
fn management_is_off_the_underlay_and_state_changes_need_the_token() {
    let _s = serial();
    let tb = testbed_with_proxies();
    let _logs = LogsOnFailure(&tb);
    let t = tb.topology();
    for n in 1..=2u8 {
        // From a node (where an escaped job would be), the proxy's underlay port serves health
        // and nothing of the management plane.
        let service = t.proxy_service(n);
        let from_node = |call: fn(&ProxyClient) -> Option<u16>| {
            tb.in_netns(&t.node_ns(1), move || call(&ProxyClient::new(service)))
                .unwrap()
        };
        assert_eq!(
            from_node(|c| c.flows().err().and_then(|e| e.status())),
            Some(404),
            "flows"
        );
        assert_eq!(
            from_node(|c| c.metrics().err().and_then(|e| e.status())),
            Some(404),
            "metrics"
        );
        assert_eq!(
            from_node(|c| c.drops().err().and_then(|e| e.status())),
            Some(404),
            "drops"
        );
        assert_eq!(
            from_node(|c| c.drain().err().and_then(|e| e.status())),
            Some(404),
            "drain"
        );
        let health = tb
            .in_netns(&t.node_ns(1), move || ProxyClient::new(service).health())
            .unwrap();
        assert!(
            matches!(health, Ok(ProxyHealth::Ok)),
            "health on the service port: {health:?}"
        );
        // On the management endpoint, drain without or with a wrong token is refused.
        let control = t.proxy_control(n);
        for token in [None, Some("not-the-token-at-all")] {
            let e = tb
                .in_netns(&t.proxy_ns(n), move || {
                    let c = ProxyClient::new(control);
                    match token {
                        Some(tk) => c.with_token(tk).drain(),
                        None => c.drain(),
                    }
                })
                .unwrap()
                .unwrap_err();
            assert_eq!(e.status(), Some(401), "drain with {token:?}: {e}");
        }
    }
    assert_proxies_in_service(&tb);
}
