//! Helpers shared by the daemon tests: a signing key with its trust directory, signed tokens,
//! and a tiny in-process HTTP server standing in for an agent's policy endpoint.
#![allow(dead_code, clippy::unwrap_used)]

pub mod netns;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use snas_policy::authoring::parse_policy;
use snas_policy::jws::sign;
use snas_policy::keys::PolicyKey;

/// A key and a temporary directory holding `trust/test-key.pub`.
pub struct Keys {
    pub key: PolicyKey,
    pub dir: tempfile::TempDir,
}

impl Keys {
    pub fn new() -> Keys {
        let key = PolicyKey::from_seed("test-key", [5; 32]).unwrap();
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("trust")).unwrap();
        std::fs::write(
            dir.path().join("trust/test-key.pub"),
            key.public_pem().unwrap(),
        )
        .unwrap();
        Keys { key, dir }
    }

    pub fn trust(&self) -> std::path::PathBuf {
        self.dir.path().join("trust")
    }

    /// Signs the policy `toml` as `jti` with `serial`, valid from now.
    pub fn token(&self, toml: &str, jti: &str, serial: u32) -> String {
        let draft = parse_policy(toml).unwrap();
        sign(
            &draft.to_claims(jti, snas_wire::PolicySerial(serial), SystemTime::now()),
            &self.key,
        )
        .unwrap()
    }
}

/// Answers `GET <path>` from a route table (404 otherwise) and counts requests.
pub struct PolicyServer {
    pub addr: SocketAddr,
    pub routes: Arc<Mutex<HashMap<String, (u16, String)>>>,
    pub hits: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
}

impl PolicyServer {
    pub fn start(ip: IpAddr) -> PolicyServer {
        let l = TcpListener::bind((ip, 0)).unwrap();
        l.set_nonblocking(true).unwrap();
        let addr = l.local_addr().unwrap();
        let routes: Arc<Mutex<HashMap<String, (u16, String)>>> = Arc::default();
        let hits = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (r, h, s) = (Arc::clone(&routes), Arc::clone(&hits), Arc::clone(&stop));
        std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                let Ok((mut c, _)) = l.accept() else {
                    std::thread::sleep(Duration::from_millis(5));
                    continue;
                };
                h.fetch_add(1, Ordering::SeqCst);
                c.set_nonblocking(false).unwrap();
                c.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
                let mut buf = [0u8; 4096];
                let n = c.read(&mut buf).unwrap_or(0);
                let req = String::from_utf8_lossy(&buf[..n]).to_string();
                let path = req.split(' ').nth(1).unwrap_or("").to_owned();
                let (status, body) = r
                    .lock()
                    .unwrap()
                    .get(&path)
                    .cloned()
                    .unwrap_or((404, String::new()));
                let resp = format!(
                    "HTTP/1.1 {status} X\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = c.write_all(resp.as_bytes());
            }
        });
        PolicyServer {
            addr,
            routes,
            hits,
            stop,
        }
    }

    pub fn serve(&self, job_key: snas_wire::JobKey, status: u16, body: &str) {
        self.routes.lock().unwrap().insert(
            snas_proxy::api::paths::agent_policy(job_key),
            (status, body.to_owned()),
        );
    }

    pub fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }
}

impl Drop for PolicyServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// A TCP connection from a chosen loopback source address (std cannot bind a client).
pub fn connect_from(from: Ipv4Addr, to: SocketAddr) -> TcpStream {
    use std::os::fd::FromRawFd;
    let sa = |ip: Ipv4Addr, port: u16| libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: port.to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(ip).to_be(),
        },
        sin_zero: [0; 8],
    };
    let IpAddr::V4(dst) = to.ip() else {
        panic!("IPv4 only")
    };
    let (local, remote) = (sa(from, 0), sa(dst, to.port()));
    let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SAFETY: a fresh socket we own; `local` and `remote` live across the calls and `len` is
    // their size; the descriptor is handed to the TcpStream exactly once.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        assert!(fd >= 0);
        let stream = TcpStream::from_raw_fd(fd);
        assert_eq!(
            libc::bind(fd, (&local as *const libc::sockaddr_in).cast(), len),
            0
        );
        assert_eq!(
            libc::connect(fd, (&remote as *const libc::sockaddr_in).cast(), len),
            0
        );
        stream
    }
}

/// One POST from `from`; the status and the body.
pub fn post_from(from: Ipv4Addr, to: SocketAddr, path: &str) -> (u16, String) {
    let mut s = connect_from(from, to);
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(
        s,
        "POST {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let body = out
        .split_once("\r\n\r\n")
        .map(|x| x.1.to_owned())
        .unwrap_or_default();
    (out[9..12].parse().unwrap(), body)
}

/// Runs one UDP datagram of the job named by `option` from `src_port` to `dst`:7, as node
/// `node` would send it, through the daemon's engine, and checks that it opened a flow.
pub fn open_udp_flow(
    d: &snas_proxy::daemon::Daemon,
    option: &snas_wire::geneve::SnasOption,
    node: Ipv4Addr,
    src_port: u16,
    dst: Ipv4Addr,
) {
    use snas_proxy::tier2::{Verdict, GENEVE_HEADER_LEN};
    use snas_wire::build::{udp, UdpSpec};
    use snas_wire::geneve::{write_geneve_header, InnerProto};
    let s = d.shared();
    let snap = s.store.snapshot();
    let view = snap.at(std::time::Instant::now());
    let mut eng = s.engine();
    let inner = udp(&UdpSpec {
        src: SocketAddr::from((Ipv4Addr::new(10, 255, 0, 2), src_port)),
        dst: SocketAddr::from((dst, 7)),
        payload: b"x",
    })
    .unwrap();
    let mut payload = vec![0u8; GENEVE_HEADER_LEN + inner.len()];
    write_geneve_header(&mut payload, option, InnerProto::Ipv4).unwrap();
    payload[GENEVE_HEADER_LEN..].copy_from_slice(&inner);
    let mut refusal = vec![0u8; 2048];
    let v = eng.from_node(&view, node, &mut payload, &mut refusal, s.now());
    assert!(matches!(v, Verdict::ToInternet { .. }), "{v:?}");
}
