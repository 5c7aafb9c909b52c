//! Helpers for the privileged tests: unique names per run, a cleanup guard, a stub verifier and
//! a raw HTTP/1.1 client.
#![allow(dead_code, clippy::unwrap_used)] // test helpers: a failed step is a failed test

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, SystemTime};

use snas_agent::jobnet::{self, run_in_netns};
use snas_agent::naming::JobNames;
use snas_agent::netlink::Rtnl;
use snas_agent::seams::{PolicyVerifier, VerifiedPolicy, VerifyError};
use snas_wire::Reason;

/// Fails the test, saying why, unless it runs as root: a privileged test that cannot run must
/// never pass (these binaries are `privileged_*`; `cargo nextest run --profile unprivileged`
/// leaves them out and lists them as skipped).
pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert!(
        euid == 0,
        "privileged test: needs root (network namespaces, netlink, bpffs, eBPF); run it as root, \
         or run the unprivileged tests only: cargo nextest run --profile unprivileged"
    );
}

/// Per-test unique prefixes and the cleanup of everything they name.
pub struct Scope {
    pub netns_prefix: String,
    pub veth_prefix: String,
    pub netns_dir: PathBuf,
    pub state: tempfile::TempDir,
    pub extra_links: Vec<String>,
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

impl Scope {
    pub fn new(tag: &str) -> Scope {
        require_root();
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let nanos = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos();
        Scope {
            netns_prefix: format!(
                "snt{}-{tag}{n}-{:05x}-",
                std::process::id(),
                nanos & 0xfffff
            ),
            veth_prefix: "snt".into(),
            netns_dir: PathBuf::from("/run/netns"),
            state: tempfile::tempdir().unwrap(),
            extra_links: Vec::new(),
        }
    }

    pub fn names(&self, job_key: impl Into<snas_wire::JobKey>) -> JobNames {
        JobNames::derive(&self.netns_prefix, &self.veth_prefix, job_key.into())
    }

    /// Namespaces under our prefix that exist now.
    pub fn leftover_netns(&self) -> Vec<String> {
        std::fs::read_dir(&self.netns_dir)
            .map(|rd| {
                rd.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| n.starts_with(&self.netns_prefix))
                    .collect()
            })
            .unwrap_or_default()
    }
}

impl Drop for Scope {
    fn drop(&mut self) {
        // Host veths of our namespaces: ask each namespace for nothing, just delete by the
        // names derived from what is left; deleting the namespace destroys its veth pair too.
        for name in self.leftover_netns() {
            let path = self.netns_dir.join(&name);
            let short = name.trim_start_matches(&self.netns_prefix).to_owned();
            if let Ok(mut r) = Rtnl::open() {
                let _ = r.delete_link(&format!("{}{short}", self.veth_prefix));
            }
            let _ = jobnet::remove_netns(&path);
        }
        if let Ok(mut r) = Rtnl::open() {
            for l in &self.extra_links {
                let _ = r.delete_link(l);
            }
        }
    }
}

pub use snas_policy::identity::{job_key, tenant_id};

/// Accepts tokens `stub.<tenant>.<job>.<jti>.<serial>[.<node>]`; anything else is invalid, and
/// the tenant `expired` is refused as expired.
#[derive(Debug, Default)]
pub struct StubVerifier;

impl PolicyVerifier for StubVerifier {
    fn verify(&self, token: &str, now: SystemTime) -> Result<VerifiedPolicy, VerifyError> {
        let parts: Vec<&str> = token.split('.').collect();
        let invalid = |d: &str| VerifyError {
            reason: Reason::PolicyInvalid,
            detail: d.to_owned(),
        };
        if parts.len() < 5 || parts[0] != "stub" {
            return Err(invalid("not a stub token"));
        }
        if parts[1] == "expired" {
            return Err(VerifyError {
                reason: Reason::PolicyExpired,
                detail: "exp: policy expired".into(),
            });
        }
        let serial = parts[4]
            .parse()
            .map_err(|_| invalid("serial: not a number"))?;
        let node = parts
            .get(5)
            .map(|n| n.replace('_', ".").parse::<IpAddr>())
            .transpose()
            .map_err(|_| invalid("node: not an address"))?;
        Ok(VerifiedPolicy {
            jti: parts[3].into(),
            tenant: parts[1].into(),
            job: parts[2].into(),
            serial,
            node,
            expires_at_unix: (now + Duration::from_secs(600))
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap()
                .as_secs(),
            job_key: job_key(parts[3]),
            tenant_id: tenant_id(parts[1]),
            claims: None,
        })
    }
}

/// One HTTP/1.1 exchange over a Unix socket or TCP; returns (status, body).
pub fn http<S: Read + Write>(mut s: S, method: &str, path: &str, body: &str) -> (u16, String) {
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: agent\r\nConnection: close\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).unwrap();
    let mut resp = Vec::new();
    s.read_to_end(&mut resp).unwrap();
    let text = String::from_utf8(resp).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    (status, body.to_owned())
}

pub fn unix_http(sock: &Path, method: &str, path: &str, body: &str) -> (u16, serde_json::Value) {
    let s = std::os::unix::net::UnixStream::connect(sock).unwrap();
    let (status, body) = http(s, method, path, body);
    let v = if body.is_empty() {
        serde_json::Value::Null
    } else {
        serde_json::from_str(&body).unwrap_or(serde_json::Value::String(body))
    };
    (status, v)
}

/// Sends one ICMP echo from inside the namespace at `netns` to `dst` and waits for the reply.
pub fn ping_from_netns(netns: &Path, dst: Ipv4Addr) -> std::io::Result<bool> {
    run_in_netns(netns, move || icmp_echo(dst)).and_then(|r| r)
}

fn icmp_echo(dst: Ipv4Addr) -> std::io::Result<bool> {
    // SAFETY: plain socket(2); checked below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_ICMP) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let tv = libc::timeval {
        tv_sec: 2,
        tv_usec: 0,
    };
    // SAFETY: valid fd and option buffer.
    unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&tv as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as u32,
        )
    };
    let id: u16 = (std::process::id() & 0xffff) as u16;
    let mut pkt = [
        8u8,
        0,
        0,
        0,
        (id >> 8) as u8,
        id as u8,
        0,
        1,
        b's',
        b'n',
        b'a',
        b's',
    ];
    let sum = checksum(&pkt);
    pkt[2..4].copy_from_slice(&sum.to_be_bytes());
    let addr = libc::sockaddr_in {
        sin_family: libc::AF_INET as u16,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from(dst).to_be(),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: valid fd, buffer and address.
    let sent = unsafe {
        libc::sendto(
            fd,
            pkt.as_ptr().cast(),
            pkt.len(),
            0,
            (&addr as *const libc::sockaddr_in).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as u32,
        )
    };
    let mut ok = false;
    if sent == pkt.len() as isize {
        let mut buf = [0u8; 1500];
        for _ in 0..10 {
            // SAFETY: valid fd and buffer.
            let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n <= 0 {
                break;
            }
            let n = n as usize;
            let ihl = usize::from(buf[0] & 0xf) * 4;
            let src = Ipv4Addr::new(buf[12], buf[13], buf[14], buf[15]);
            if n >= ihl + 8 && buf[ihl] == 0 && src == dst && buf[ihl + 4..ihl + 6] == pkt[4..6] {
                ok = true;
                break;
            }
        }
    }
    // SAFETY: fd is ours.
    unsafe { libc::close(fd) };
    Ok(ok)
}

fn checksum(b: &[u8]) -> u16 {
    let mut s: u32 = 0;
    for c in b.chunks(2) {
        s += u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
    }
    while s > 0xffff {
        s = (s & 0xffff) + (s >> 16);
    }
    !(s as u16)
}

/// `ethtool -k eth0` inside the namespace, as text.
pub fn ethtool_k(netns_name: &str) -> String {
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", netns_name, "ethtool", "-k", "eth0"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// An agent configuration using the scope's unique names and `pool`.
pub fn agent_config(scope: &Scope, pool: &str) -> snas_agent::config::AgentConfig {
    let text = format!(
        r#"
node_name = "test-node"
underlay_interface = "lo"
underlay_address = "192.0.2.7"
underlay_mtu = 1500
trust_bundle = "/nonexistent/trust.json"
job_pool = "{pool}"
api_socket = "{}/agent.sock"
api_socket_mode = 0o600
policy_listen = "127.0.0.1:0"
state_dir = "{}/state"
netns_prefix = "{}"
host_veth_prefix = "{}"
"#,
        scope.state.path().display(),
        scope.state.path().display(),
        scope.netns_prefix,
        scope.veth_prefix
    );
    snas_agent::config::AgentConfig::from_toml_str(&text, std::path::Path::new("test.toml"))
        .unwrap()
}

/// An agent (`snas_agent::node::run` with the in-memory dataplane) on its own thread and
/// runtime, in the network namespace of the thread that starts it. Stopped when dropped.
pub struct AgentThread {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<Result<(), snas_agent::RunError>>>,
}

impl AgentThread {
    pub fn start(
        config: snas_agent::AgentConfig,
        verifier: std::sync::Arc<dyn PolicyVerifier>,
        opts: snas_agent::node::RunOptions,
    ) -> AgentThread {
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(snas_agent::node::run(
                config,
                verifier,
                std::sync::Arc::new(snas_agent::RecordingDataplane::default()),
                async move {
                    let _ = rx.await;
                },
                opts,
            ))
        });
        AgentThread {
            stop: Some(tx),
            thread: Some(thread),
        }
    }

    /// Waits (at most `limit`) for the agent to exit by itself (after a hand-over).
    pub fn exits_by_itself(&mut self, limit: Duration) -> Result<(), snas_agent::RunError> {
        let deadline = std::time::Instant::now() + limit;
        let t = self.thread.take().unwrap();
        while !t.is_finished() {
            assert!(
                std::time::Instant::now() < deadline,
                "the agent did not exit by itself"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        t.join().unwrap()
    }

    /// Stops the agent (as SIGTERM does) and returns how it ended.
    pub fn stop(mut self) -> Result<(), snas_agent::RunError> {
        let _ = self.stop.take().unwrap().send(());
        self.thread.take().unwrap().join().unwrap()
    }
}

impl Drop for AgentThread {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A DNS server on loopback answering A queries with `addrs` (None: SERVFAIL).
pub async fn service_dns(
    addrs: std::sync::Arc<std::sync::Mutex<Option<Vec<Ipv4Addr>>>>,
) -> std::net::SocketAddr {
    use hickory_proto::op::{Message, MessageType, ResponseCode};
    use hickory_proto::rr::{rdata::A, RData, Record};
    let udp = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = udp.local_addr().unwrap();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 2048];
        while let Ok((n, from)) = udp.recv_from(&mut buf).await {
            let q = Message::from_vec(&buf[..n]).unwrap();
            let mut a = Message::new();
            a.set_id(q.id()).set_message_type(MessageType::Response);
            for x in q.queries() {
                a.add_query(x.clone());
            }
            match addrs.lock().unwrap().clone() {
                Some(list) => {
                    for ip in list {
                        a.add_answer(Record::from_rdata(
                            q.queries()[0].name().clone(),
                            30,
                            RData::A(A(ip)),
                        ));
                    }
                }
                None => {
                    a.set_response_code(ResponseCode::ServFail);
                }
            }
            udp.send_to(&a.to_vec().unwrap(), from).await.unwrap();
        }
    });
    addr
}
