//! Helpers shared by the daemon tests: a signing key with its trust directory, signed tokens,
//! and a tiny in-process HTTP server standing in for an agent's policy endpoint.
#![allow(dead_code, clippy::unwrap_used)]

pub mod netns;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener};
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
