//! Shared helpers of the end-to-end tests (`tests/e2e_*.rs`, root only): one testbed per test
//! file, jobs that live as long as a guard, commands run inside a job with plain tools (curl,
//! python3, dig), and readers for the proxies' control endpoints.
//!
//! Every helper fails loudly (panics with the command's output) instead of skipping: a missing
//! prerequisite must never make a test pass vacuously.
#![allow(dead_code)]
#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers: a failed step is a failed test

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub use snas_agent::api::Health;
use snas_agent::api::JobView;
use snas_proxy::api::blocking::ProxyClient;
pub use snas_proxy::api::{ClientError, FlowView, ProxyHealth};
use snas_testbed::daemons::{self, Daemon};

/// The helpers every privileged testbed test shares (root check, the `snas` binary, the
/// internet services' clients), written once in `tests/common`.
#[path = "../common/mod.rs"]
pub mod common;
pub use common::{require_root, snas_binary};
use snas_testbed::{unique_prefix, JobGuard, Testbed, TestbedOptions};

/// Runs `python3 -c CODE ARGS…` as a job of `tb`'s node 1 in a gVisor sandbox (`snas run`)
/// under the signed policy `token`, ending it after `timeout` (e.g. `"120s"`). Returns the
/// command's output; the caller asserts on it.
pub fn run_python_in_gvisor(
    tb: &Testbed,
    token: &str,
    timeout: &str,
    code: &str,
    args: &[&str],
) -> Output {
    Command::new(snas_binary())
        .args(["run", "--prefix", tb.topology().prefix(), "--node", "1"])
        .args(["--policy", token, "--timeout", timeout])
        .args(["--", "python3", "-c", code])
        .args(args)
        .output()
        .unwrap()
}

/// A testbed with agents and proxies; panics unless both proxies answer `/healthz`.
pub fn testbed_with_proxies() -> Testbed {
    require_root();
    let tb = Testbed::up(TestbedOptions::new(&unique_prefix(), snas_binary())).unwrap();
    assert!(
        tb.record().proxy_available,
        "needs snas proxy: `snas proxy --help` fails with {}",
        snas_binary().display()
    );
    for n in 1..=2 {
        wait_until(
            Duration::from_secs(10),
            &format!("proxy {n} /healthz"),
            || proxy_health(&tb, n).is_ok_and(|h| h == ProxyHealth::Ok),
        );
    }
    tb
}

/// A testbed with agents only (what needs no proxy).
pub fn testbed_without_proxies() -> Testbed {
    require_root();
    let mut o = TestbedOptions::new(&unique_prefix(), snas_binary());
    o.start_proxies = false;
    Testbed::up(o).unwrap()
}

/// Polls `f` every 50 ms until it holds; panics after `limit`.
pub fn wait_until(limit: Duration, what: &str, mut f: impl FnMut() -> bool) -> Duration {
    let t0 = Instant::now();
    loop {
        if f() {
            return t0.elapsed();
        }
        assert!(t0.elapsed() < limit, "{what}: not true after {limit:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A policy with unique job name and the given body (rules, limits).
pub fn policy(tenant: &str, body: &str) -> String {
    format!(
        "tenant = \"{tenant}\"\njob = \"e2e-{}\"\n{body}\n",
        rand_hex()
    )
}

fn rand_hex() -> String {
    let mut b = [0u8; 4];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .unwrap();
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// A running job; deleted when dropped.
pub struct Job {
    pub guard: JobGuard,
    pub node: u8,
}

impl Job {
    /// Creates a job on node `n` from a policy (authoring TOML), signed with the testbed key.
    pub fn start(tb: &Testbed, n: u8, policy_toml: &str) -> Job {
        let token = tb.sign_policy(policy_toml).unwrap();
        Job::start_token(tb, n, &token)
    }

    /// A job of tenant `acme` on node 1 whose policy is `body` (its rules and limits).
    pub fn acme(tb: &Testbed, body: &str) -> Job {
        Job::start(tb, 1, &policy("acme", body))
    }

    /// Creates a job from a signed token.
    pub fn start_token(tb: &Testbed, n: u8, token: &str) -> Job {
        let guard =
            JobGuard::create(tb.agent(n), token, &tb.topology().state_dir().join("exec")).unwrap();
        Job { guard, node: n }
    }

    pub fn info(&self) -> &JobView {
        self.guard.info()
    }

    pub fn key(&self) -> snas_wire::JobKey {
        self.info().job_key
    }

    /// A command prepared to run inside the job.
    pub fn command(&self, program: &str, args: &[&str]) -> Command {
        let mut c = Command::new(program);
        c.args(args);
        self.guard.prepare(&mut c).unwrap();
        c
    }

    /// Runs a command in the job, output captured.
    pub fn run(&self, program: &str, args: &[&str]) -> Output {
        self.command(program, args).output().unwrap()
    }

    /// Runs `python3 -c code args...`; panics unless it exits 0; returns stdout.
    pub fn python(&self, code: &str, args: &[&str]) -> String {
        let mut a = vec!["-c", code];
        a.extend_from_slice(args);
        let out = self.run("python3", &a);
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "python in job failed ({}):\nstdout:\n{stdout}\nstderr:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        stdout
    }

    /// Starts `python3 -u -c code` in the job with piped stdin/stdout (long-lived clients).
    pub fn spawn_python(&self, code: &str, args: &[&str]) -> Child {
        let mut a = vec!["-u", "-c", code];
        a.extend_from_slice(args);
        self.command("python3", &a)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap()
    }

    /// `curl -sS --max-time 5 URL`: (exit code, body).
    pub fn curl(&self, url: &str) -> (i32, String) {
        let out = self.run("curl", &["-sS", "--max-time", "5", url]);
        (
            out.status.code().unwrap_or(-1),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    }
}

/// A long-lived python process in a job, driven line by line over stdin/stdout.
pub struct Driver {
    child: Child,
    out: std::io::BufReader<std::process::ChildStdout>,
}

impl Driver {
    pub fn new(mut child: Child) -> Driver {
        let out = std::io::BufReader::new(child.stdout.take().unwrap());
        Driver { child, out }
    }

    /// Sends one command line without waiting for an answer.
    pub fn send(&mut self, line: &str) {
        let stdin = self.child.stdin.as_mut().unwrap();
        writeln!(stdin, "{line}").unwrap();
        stdin.flush().unwrap();
    }

    /// Sends one command line and reads one answer line.
    pub fn ask(&mut self, line: &str) -> String {
        let stdin = self.child.stdin.as_mut().unwrap();
        writeln!(stdin, "{line}").unwrap();
        stdin.flush().unwrap();
        self.read_line()
    }

    pub fn read_line(&mut self) -> String {
        use std::io::BufRead;
        let mut s = String::new();
        self.out.read_line(&mut s).unwrap();
        assert!(!s.is_empty(), "job process ended early");
        s.trim_end().to_owned()
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `call` with a typed client of proxy `n`'s management endpoint (loopback, from inside
/// its namespace), carrying the testbed's management token (drain and undrain need it).
pub fn on_proxy<T: Send + 'static>(
    tb: &Testbed,
    n: u8,
    call: impl FnOnce(&ProxyClient) -> Result<T, ClientError> + Send + 'static,
) -> Result<T, ClientError> {
    let addr = tb.topology().proxy_control(n);
    let token = daemons::control_token(tb.topology()).unwrap();
    tb.in_netns(&tb.topology().proxy_ns(n), move || {
        call(&ProxyClient::new(addr).with_token(token))
    })
    .unwrap()
}

/// Proxy `n`'s health (`GET /healthz`).
pub fn proxy_health(tb: &Testbed, n: u8) -> Result<ProxyHealth, ClientError> {
    on_proxy(tb, n, |c| c.health())
}

/// Proxy `n`'s metrics as Prometheus scrapes them: (name{labels} → value).
pub fn proxy_metrics(tb: &Testbed, n: u8) -> BTreeMap<String, f64> {
    let text = on_proxy(tb, n, |c| c.metrics()).unwrap();
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            Some((k.to_owned(), v.parse().ok()?))
        })
        .collect()
}

/// Proxy `n`'s drops of `reason` (`GET /v1/drops`).
pub fn proxy_drops(tb: &Testbed, n: u8, reason: &str) -> f64 {
    let counts = on_proxy(tb, n, |c| c.drops()).unwrap();
    counts.drops.get(reason).copied().unwrap_or(0) as f64
}

/// Every drop of proxy `n`.
pub fn proxy_drops_all(tb: &Testbed, n: u8) -> f64 {
    on_proxy(tb, n, |c| c.drops()).unwrap().total as f64
}

/// Proxy `n`'s live flows (`GET /v1/flows`).
pub fn proxy_flows(tb: &Testbed, n: u8) -> Vec<FlowView> {
    on_proxy(tb, n, |c| c.flows()).unwrap().flows
}

/// Whether a flow belongs to job key `key` and has sandbox port `port`.
pub fn flow_is(f: &FlowView, key: snas_wire::JobKey, port: Option<u16>) -> bool {
    f.job_key == key && port.is_none_or(|p| f.src.port() == p)
}

/// Tier-1 drop count of a job for a reason (agent counters endpoint).
pub fn tier1_drops(tb: &Testbed, job: &Job, reason: &str) -> u64 {
    let c = tb
        .agent(job.node)
        .counters(&job.info().job_key.to_string())
        .unwrap();
    c.drops.get(reason).copied().unwrap_or(0)
}

/// Whether a daemon of the testbed runs.
pub fn running(tb: &Testbed, d: Daemon) -> bool {
    daemons::running_pid(tb.topology(), d).is_some()
}

/// Python: best-of-3 `connect()` to (host, port) with the error name and elapsed ms; prints
/// `ERRNAME ms` for the fastest attempt. Resolves `host` with getaddrinfo first (the job's DNS),
/// over IPv4, or IPv6 when the third argument is `6`.
pub const PY_FAIL_FAST: &str = r#"
import socket, sys, time, errno
host, port = sys.argv[1], int(sys.argv[2])
fam = socket.AF_INET6 if sys.argv[3:] == ["6"] else socket.AF_INET
# getaddrinfo also turns a scoped link-local address (fe80::1%eth0) into its 4-tuple.
sa = socket.getaddrinfo(host, port, fam, socket.SOCK_STREAM)[0][4]
best = None
for _ in range(3):
    s = socket.socket(fam, socket.SOCK_STREAM)
    s.settimeout(2.0)
    t = time.monotonic()
    try:
        s.connect(sa)
        r = "CONNECTED"
    except socket.timeout:
        r = "TIMEOUT"
    except OSError as e:
        r = errno.errorcode.get(e.errno, str(e.errno))
    ms = (time.monotonic() - t) * 1000.0
    s.close()
    if best is None or ms < best[1]:
        best = (r, ms)
print(best[0], "%.3f" % best[1])
"#;

/// Runs [`PY_FAIL_FAST`] in the job over IPv4; (error name, ms).
pub fn fail_fast(job: &Job, host: &str, port: u16) -> (String, f64) {
    fail_fast_over(job, host, port, 4)
}

/// Runs [`PY_FAIL_FAST`] in the job over IP version `family` (4 or 6); (error name or
/// `CONNECTED`/`TIMEOUT`, ms).
pub fn fail_fast_over(job: &Job, host: &str, port: u16, family: u8) -> (String, f64) {
    let out = job.python(
        PY_FAIL_FAST,
        &[host, &port.to_string(), &family.to_string()],
    );
    let mut it = out.split_whitespace();
    let r = it.next().unwrap_or_default().to_owned();
    let ms = it.next().and_then(|m| m.parse().ok()).unwrap_or(f64::MAX);
    (r, ms)
}

/// Asserts a refusal by RST or ICMP (ECONNREFUSED / ECONNRESET / EHOSTUNREACH / ENETUNREACH)
/// answering the *first* segment: a refusal that took under [`FIRST_SEGMENT_MS`] cannot have
/// come after a retransmission (Linux retransmits a SYN after 1 s). The time is printed, not
/// judged: how fast the refusal is is a benchmark figure (`snas-bench`'s `first_connection`).
pub fn assert_refused_fast(job: &Job, host: &str, port: u16) {
    let (r, ms) = fail_fast(job, host, port);
    println!("{host}:{port}: {r} after {ms:.3} ms");
    assert!(
        ["ECONNREFUSED", "ECONNRESET", "EHOSTUNREACH", "ENETUNREACH"].contains(&r.as_str()),
        "{host}:{port}: expected a refusal, got {r} after {ms:.3} ms"
    );
    assert!(
        ms < FIRST_SEGMENT_MS,
        "{host}:{port}: refused only after {ms:.3} ms: the first segment went unanswered"
    );
}

/// Below the first SYN retransmission (1 s), with room for a loaded CI machine.
pub const FIRST_SEGMENT_MS: f64 = 500.0;

/// Serialises the tests of one file (each builds its own testbed; 2 cores do not carry several
/// at once well). Poisoning is ignored: one failed test must not fail the others.
pub fn serial() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// Health of proxy `p` (1-based) as node `n`'s agent sees it (`GET /v1/proxies`); `None`
/// when the agent does not list it.
pub fn agent_proxy_health(tb: &Testbed, n: u8, p: u8) -> Option<Health> {
    let ip = tb.topology().proxy_addr(p);
    tb.agent(n)
        .proxies()
        .unwrap()
        .into_iter()
        .find(|e| e.ip == ip)
        .map(|e| e.health)
}

/// Stops proxy 2 and waits until both agents have stopped choosing it, so that every new flow
/// and DNS query of a test goes through proxy 1 (per-proxy limits are then the job's limits).
pub fn only_proxy_1(tb: &Testbed) {
    tb.stop_proxy(2);
    for n in 1..=2 {
        wait_until(Duration::from_secs(5), "agents mark proxy 2 dead", || {
            agent_proxy_health(tb, n, 2) == Some(Health::Dead)
        });
    }
}

fn link_json(ns: &str, dev: &str) -> serde_json::Value {
    let out = snas_testbed::netns::ip(&["-n", ns, "-j", "link", "show", "dev", dev]).unwrap();
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v[0].clone()
}

/// The test hook for "tier 1 does not hold": rewrites the job's tier-1 configuration with no
/// connection-rate and no connection-count limit (what a compromised node could do), so that
/// only the proxy enforces them.
pub fn widen_tier1_limits(tb: &Testbed, job: &Job) {
    let me = tb
        .agent(job.node)
        .job(&job.info().job_key.to_string())
        .unwrap();
    let veth = link_json(&tb.topology().node_ns(job.node), &me.veth);
    let eth0 = link_json(&me.netns, &me.sandbox_ifname);
    let mac = |v: &serde_json::Value| -> [u8; 6] {
        let parts: Vec<u8> = v["address"]
            .as_str()
            .unwrap()
            .split(':')
            .map(|h| u8::from_str_radix(h, 16).unwrap())
            .collect();
        parts.try_into().unwrap()
    };
    let cfg = snas_bpf::JobConfig {
        veth_ifindex: u32::try_from(veth["ifindex"].as_u64().unwrap()).unwrap(),
        job_key: job.key(),
        tenant_id: me.tenant_id,
        policy_serial: me.serial,
        sandbox_ip: v4(me.sandbox_ip),
        sandbox_mac: mac(&eth0),
        host_mac: mac(&veth),
        gateway_ip: v4(me.gateway_ip),
        // The point of this hook: no connection-rate and no connection-count limit (the
        // defaults), whatever the policy says.
        ..snas_bpf::JobConfig::default()
    };
    let t1 = snas_bpf::Tier1::open_pinned(&tb.topology().bpf_pin_dir(job.node)).unwrap();
    t1.configure_job(&cfg).unwrap();
}

/// Prints the last lines of every daemon log when the test fails (keep it alive for the test).
pub struct LogsOnFailure<'a>(pub &'a Testbed);
impl Drop for LogsOnFailure<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for d in Daemon::all() {
                let log = d.log_file(self.0.topology());
                eprintln!(
                    "---- {} ({}) ----\n{}",
                    d.name(),
                    log.display(),
                    daemons::log_tail(&log, 25)
                );
            }
        }
    }
}

fn v4(ip: std::net::IpAddr) -> std::net::Ipv4Addr {
    match ip {
        std::net::IpAddr::V4(v4) => v4,
        std::net::IpAddr::V6(v6) => panic!("jobs have IPv4 addresses, not {v6}"),
    }
}

/// Connects to each `host:port` with a 1 s timeout; prints `ok` or the error name per target.
const PY_TRY: &str = r#"
import errno, socket, sys
for target in sys.argv[1:]:
    host, port = target.rsplit(":", 1)
    s = socket.socket(); s.settimeout(1)
    try:
        s.connect((host, int(port)))
        print("ok")
    except socket.timeout:
        print("timeout")
    except OSError as e:
        print(errno.errorcode.get(e.errno, str(e.errno)) if e.errno else type(e).__name__)
    finally:
        s.close()
"#;

/// Connects from `job` to `target` (`host:port`) once: `ok`, `timeout` or the error's name.
pub fn try_connect(job: &Job, target: &str) -> String {
    job.python(PY_TRY, &[target]).trim().to_owned()
}

/// The next policy of `old_token`'s job (same `jti`, serial + 1) with `toml` as its policy,
/// signed with the testbed's key.
pub fn sign_update(tb: &snas_testbed::Testbed, old_token: &str, toml: &str) -> String {
    let old = snas_policy::jws::decode_unverified(old_token).unwrap();
    let key = tb.signing_key().unwrap().unwrap();
    let draft = snas_policy::parse_policy(toml).unwrap();
    let claims = draft.to_claims(
        &old.jti,
        snas_wire::PolicySerial(old.serial.0 + 1),
        std::time::SystemTime::now(),
    );
    snas_policy::sign(&claims, &key).unwrap()
}

/// The next policy of `old_token`'s job (same `jti`, serial + 1) with `body` as its rules.
pub fn sign_update_with(
    tb: &snas_testbed::Testbed,
    old_token: &str,
    old_toml: &str,
    body: &str,
) -> String {
    let job_line = old_toml.lines().find(|l| l.starts_with("job = ")).unwrap();
    sign_update(
        tb,
        old_token,
        &format!("tenant = \"acme\"\n{job_line}\n{body}"),
    )
}

/// `snas jobs update` of node 1's job; returns when the CLI has its answer.
pub fn jobs_update(tb: &snas_testbed::Testbed, token: &str) {
    let out = Command::new(snas_binary())
        .args(["jobs", "update", "--prefix", tb.topology().prefix()])
        .args(["--node", "1", "--policy", token])
        .output()
        .unwrap();
    assert!(out.status.success(), "snas jobs update: {out:?}");
}

/// The lines `child` prints, each with the time it was read (a thread reads its stdout).
pub fn timed_lines(child: &mut Child) -> std::sync::mpsc::Receiver<(String, std::time::Instant)> {
    use std::io::BufRead;
    let (tx, rx) = std::sync::mpsc::channel();
    let stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if tx.send((line, std::time::Instant::now())).is_err() {
                return;
            }
        }
    });
    rx
}

/// Established TCP connections of the internet namespace whose local port is `port`.
pub fn server_connections(tb: &snas_testbed::Testbed, port: u16) -> usize {
    let out = Command::new("ip")
        .args(["netns", "exec", &tb.topology().inet_ns(), "ss", "-Htn"])
        .args(["state", "established", &format!("( sport = :{port} )")])
        .output()
        .unwrap();
    assert!(out.status.success(), "ss: {out:?}");
    String::from_utf8_lossy(&out.stdout).lines().count()
}

/// The JSON lines of an audit log (missing file: none yet).
pub fn audit_lines(path: &std::path::Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// Opens a connection to the echo service of `host`, checks one round trip, prints `ready`,
/// then sends nothing and waits (10 s at most) for what the connection does: `reset`, `eof`,
/// `data` or `timeout`.
pub const PY_IDLE_ECHO: &str = r#"
import socket, sys
s = socket.create_connection((sys.argv[1], 7), timeout=3)
s.sendall(b"ping\n")
assert s.recv(16) == b"ping\n"
print("ready", flush=True)
s.settimeout(10)
try:
    print("eof" if s.recv(16) == b"" else "data", flush=True)
except ConnectionResetError:
    print("reset", flush=True)
except socket.timeout:
    print("timeout", flush=True)
"#;
