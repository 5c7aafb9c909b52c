//! The testbed "internet" services: the authoritative DNS server and, on every host address,
//! HTTP on 80, HTTPS on 443 (when given the TLS material: [`crate::tls`]), TCP and UDP echo on 7
//! and a TCP bulk source/sink on 5201 — on the IPv4 host addresses, and HTTP, echo and bulk on
//! the IPv6 address of `v6.example.com` / `dual.example.com` (2001:db8::10).
//!
//! Owns the sockets and the tokio tasks. [`Internet::bind`] binds everything first (so a
//! caller learns about a missing address before detaching), then [`Internet::run`] serves until
//! the shutdown future completes. It runs in whatever network namespace the calling thread is
//! in: `snas testbed serve-internet` is started inside `<prefix>-inet`, tests may run it on a
//! thread that entered a namespace.
//!
//! HTTP is a small hand-written HTTP/1.1 responder, not hyper: every request gets `200 OK` with
//! a body naming the host (`hello from api.example.com (203.0.113.10)`) and `Connection:
//! close`. Tests only need a fixed answer per host; a full server would add a dependency tree
//! and behaviour (keep-alive, pipelining) nobody here checks.
//!
//! Bulk protocol on 5201 (text first line, usable with `nc`): `SEND <bytes>\n` → the server
//! writes that many bytes and closes; `RECV\n` → the server reads until EOF and answers
//! `<bytes>\n`; `RECV <warmup_ms> <window_ms>\n` → the server measures the upload itself: it
//! answers `<bytes> <nanoseconds>\n` — what it read between the end of the warm-up (counted
//! from the request) and the end of the window — as soon as the window ends, then reads on until
//! EOF. The timed form needs no half-close, so it also works through proxies that close a
//! tunnel when the client shuts down its sending side (squid). Requests are capped at
//! [`BULK_MAX`] bytes.
//!
//! Limits: each connection is its own task; no connection limit (the testbed's clients are the
//! tests themselves).

use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::task::JoinSet;

use crate::dns::{Transport, Zones};
use crate::topology::{BULK_PORT, DNS_SERVER, ECHO_PORT, HOSTS, HOST_V6, HTTP_PORT};

/// Largest transfer one bulk request may ask for (1 TiB: effectively unbounded for tests,
/// but the count always parses).
pub const BULK_MAX: u64 = 1 << 40;

/// Errors while binding the internet services.
#[derive(Debug, thiserror::Error)]
pub enum InternetError {
    /// A listening socket could not be bound (address not configured in this namespace?).
    #[error("cannot bind {proto} {addr}: {source}")]
    Bind {
        proto: &'static str,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    /// The TLS material for HTTPS could not be loaded.
    #[error("HTTPS: {0}")]
    Tls(#[from] crate::tls::TlsError),
}

/// What to serve where.
#[derive(Debug, Clone)]
pub struct InternetOptions {
    /// Host names and addresses; each gets HTTP, echo and bulk.
    pub hosts: Vec<(String, Ipv4Addr)>,
    /// Address of the authoritative DNS server (UDP and TCP).
    pub dns: SocketAddr,
    /// Ports (overridable so unprivileged unit tests could use high ports).
    pub http_port: u16,
    /// TCP/UDP echo port.
    pub echo_port: u16,
    /// Bulk port.
    pub bulk_port: u16,
    /// HTTPS on [`crate::tls::HTTPS_PORT`] with the material in this directory
    /// ([`crate::tls::ensure`]); `None`: no HTTPS.
    pub tls_dir: Option<std::path::PathBuf>,
}

impl Default for InternetOptions {
    fn default() -> Self {
        InternetOptions {
            hosts: HOSTS.iter().map(|(n, a)| ((*n).to_owned(), *a)).collect(),
            dns: SocketAddr::new(IpAddr::V4(DNS_SERVER), 53),
            http_port: HTTP_PORT,
            echo_port: ECHO_PORT,
            bulk_port: BULK_PORT,
            tls_dir: None,
        }
    }
}

/// Bound sockets, ready to serve.
#[derive(Debug)]
pub struct Internet {
    zones: Arc<Zones>,
    dns_udp: UdpSocket,
    dns_tcp: TcpListener,
    http: Vec<(Arc<str>, TcpListener)>,
    echo_tcp: Vec<TcpListener>,
    echo_udp: Vec<UdpSocket>,
    bulk: Vec<TcpListener>,
    https: Vec<crate::tls::HttpsListener>,
}

pub(crate) async fn tcp(addr: SocketAddr) -> Result<TcpListener, InternetError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| InternetError::Bind {
            proto: "tcp",
            addr,
            source,
        })
}

async fn udp(addr: SocketAddr) -> Result<UdpSocket, InternetError> {
    UdpSocket::bind(addr)
        .await
        .map_err(|source| InternetError::Bind {
            proto: "udp",
            addr,
            source,
        })
}

impl Internet {
    /// Binds every socket. Must be called inside a tokio runtime.
    pub async fn bind(opts: &InternetOptions) -> Result<Internet, InternetError> {
        let mut me = Internet {
            zones: Arc::new(Zones::default()),
            dns_udp: udp(opts.dns).await?,
            dns_tcp: tcp(opts.dns).await?,
            http: Vec::new(),
            echo_tcp: Vec::new(),
            echo_udp: Vec::new(),
            bulk: Vec::new(),
            https: Vec::new(),
        };
        if let Some(dir) = &opts.tls_dir {
            me.https = crate::tls::bind(dir, &opts.hosts).await?;
        }
        for (name, ip) in &opts.hosts {
            let at = |port| SocketAddr::new(IpAddr::V4(*ip), port);
            let label: Arc<str> = Arc::from(format!("{name} ({ip})"));
            me.http.push((label, tcp(at(opts.http_port)).await?));
            me.echo_tcp.push(tcp(at(opts.echo_port)).await?);
            me.echo_udp.push(udp(at(opts.echo_port)).await?);
            me.bulk.push(tcp(at(opts.bulk_port)).await?);
        }
        me.bind_ipv6(opts).await?;
        Ok(me)
    }

    /// The IPv6 side of the internet: HTTP, TCP/UDP echo and bulk on [`HOST_V6`] (the address
    /// of `v6.example.com` and `dual.example.com`), on the same ports as the IPv4 hosts. The
    /// HTTP body names the address, so a client sees which family it reached.
    async fn bind_ipv6(&mut self, opts: &InternetOptions) -> Result<(), InternetError> {
        let at = |port| SocketAddr::new(IpAddr::V6(HOST_V6), port);
        let label: Arc<str> = Arc::from(format!("v6.example.com ([{HOST_V6}])"));
        self.http.push((label, tcp(at(opts.http_port)).await?));
        self.echo_tcp.push(tcp(at(opts.echo_port)).await?);
        self.echo_udp.push(udp(at(opts.echo_port)).await?);
        self.bulk.push(tcp(at(opts.bulk_port)).await?);
        Ok(())
    }

    /// Serves until `shutdown` completes; then every task is aborted.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        let mut tasks = JoinSet::new();
        let zones = Arc::clone(&self.zones);
        tasks.spawn(dns_udp(self.dns_udp, zones));
        tasks.spawn(dns_tcp(self.dns_tcp, Arc::clone(&self.zones)));
        for (label, l) in self.http {
            tasks.spawn(accept_loop(l, move |s| http(s, Arc::clone(&label))));
        }
        for l in self.echo_tcp {
            tasks.spawn(accept_loop(l, echo_tcp));
        }
        for s in self.echo_udp {
            tasks.spawn(echo_udp(s));
        }
        for l in self.bulk {
            tasks.spawn(accept_loop(l, bulk));
        }
        for h in self.https {
            tasks.spawn(crate::tls::serve_https(h));
        }
        shutdown.await;
        tasks.abort_all();
        while tasks.join_next().await.is_some() {}
    }
}

/// Binds and serves with the given options until `shutdown` completes.
pub async fn serve(
    opts: &InternetOptions,
    shutdown: impl Future<Output = ()>,
) -> Result<(), InternetError> {
    Internet::bind(opts).await?.run(shutdown).await;
    Ok(())
}

pub(crate) async fn accept_loop<F, Fut>(l: TcpListener, handler: F)
where
    F: Fn(TcpStream) -> Fut,
    Fut: Future<Output = std::io::Result<()>> + Send + 'static,
{
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            r = l.accept() => match r {
                Ok((s, _)) => {
                    conns.spawn(handler(s));
                }
                // Transient (EMFILE, ECONNABORTED): back off briefly, keep serving.
                Err(_) => tokio::time::sleep(std::time::Duration::from_millis(10)).await,
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
}

async fn dns_udp(s: UdpSocket, zones: Arc<Zones>) {
    let mut buf = vec![0u8; 4096];
    loop {
        let Ok((n, peer)) = s.recv_from(&mut buf).await else {
            continue;
        };
        if let Some(resp) = zones.answer(&buf[..n], Transport::Udp) {
            let _ = s.send_to(&resp, peer).await;
        }
    }
}

async fn dns_tcp(l: TcpListener, zones: Arc<Zones>) {
    accept_loop(l, move |mut s| {
        let zones = Arc::clone(&zones);
        async move {
            loop {
                let len = match s.read_u16().await {
                    Ok(l) => usize::from(l),
                    Err(_) => return Ok(()),
                };
                let mut q = vec![0u8; len];
                s.read_exact(&mut q).await?;
                let Some(resp) = zones.answer(&q, Transport::Tcp) else {
                    return Ok(());
                };
                let Ok(rlen) = u16::try_from(resp.len()) else {
                    return Ok(());
                };
                s.write_u16(rlen).await?;
                s.write_all(&resp).await?;
            }
        }
    })
    .await;
}

/// Body of the HTTP answer of a host.
pub fn http_body(label: &str) -> String {
    format!("hello from {label}\n")
}

/// The HTTP/1.1 responder of port 80 (and, behind TLS, of 443).
pub(crate) async fn http<S>(mut s: S, label: Arc<str>) -> std::io::Result<()>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let mut head = Vec::with_capacity(1024);
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 16 * 1024 {
        let n = s.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    let body = http_body(&label);
    let resp = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(resp.as_bytes()).await?;
    s.shutdown().await
}

async fn echo_tcp(mut s: TcpStream) -> std::io::Result<()> {
    let (mut r, mut w) = s.split();
    tokio::io::copy(&mut r, &mut w).await?;
    w.shutdown().await
}

async fn echo_udp(s: UdpSocket) {
    let mut buf = vec![0u8; 65_536];
    loop {
        let Ok((n, peer)) = s.recv_from(&mut buf).await else {
            continue;
        };
        let _ = s.send_to(&buf[..n], peer).await;
    }
}

/// `RECV <warmup_ms> <window_ms>`: counts what arrives in the window by the server's own clock.
async fn timed_upload(
    mut s: BufReader<TcpStream>,
    warmup: std::time::Duration,
    window: std::time::Duration,
) -> std::io::Result<()> {
    let start = tokio::time::Instant::now();
    let mut rbuf = vec![0u8; 64 * 1024];
    let mut total: u64 = 0;
    let mut mark: Option<(tokio::time::Instant, u64)> = None;
    let mut answered = false;
    loop {
        let n = s.read(&mut rbuf).await?;
        let now = tokio::time::Instant::now();
        if n == 0 {
            break;
        }
        total += n as u64;
        if mark.is_none() && now - start >= warmup {
            mark = Some((now, total));
        }
        if let Some((t0, b0)) = mark.filter(|(t0, _)| !answered && now - *t0 >= window) {
            let answer = format!("{} {}\n", total - b0, (now - t0).as_nanos());
            s.get_mut().write_all(answer.as_bytes()).await?;
            answered = true;
        }
    }
    if !answered {
        // The client stopped early: report what there is (0 ns: no window).
        let (bytes, nanos) = mark.map_or((0, 0), |(t0, b0)| {
            (total - b0, (tokio::time::Instant::now() - t0).as_nanos())
        });
        s.get_mut()
            .write_all(format!("{bytes} {nanos}\n").as_bytes())
            .await?;
    }
    s.get_mut().shutdown().await
}

async fn bulk(s: TcpStream) -> std::io::Result<()> {
    let mut s = BufReader::new(s);
    let mut line = String::new();
    s.read_line(&mut line).await?;
    let line = line.trim();
    let buf = vec![0x5a_u8; 64 * 1024];
    if let Some(n) = line.strip_prefix("SEND ") {
        let Ok(mut left) = n.trim().parse::<u64>() else {
            return Ok(());
        };
        left = left.min(BULK_MAX);
        while left > 0 {
            let k = usize::try_from(left.min(buf.len() as u64)).unwrap_or(buf.len());
            s.get_mut().write_all(&buf[..k]).await?;
            left -= k as u64;
        }
        s.get_mut().shutdown().await
    } else if let Some(spec) = line.strip_prefix("RECV ") {
        let mut it = spec.split_whitespace().map(|x| x.parse::<u64>());
        let (Some(Ok(warm)), Some(Ok(window)), None) = (it.next(), it.next(), it.next()) else {
            return Ok(());
        };
        timed_upload(
            s,
            std::time::Duration::from_millis(warm),
            std::time::Duration::from_millis(window),
        )
        .await
    } else if line == "RECV" {
        let mut total: u64 = 0;
        let mut rbuf = vec![0u8; 64 * 1024];
        loop {
            let n = s.read(&mut rbuf).await?;
            if n == 0 {
                break;
            }
            total += n as u64;
        }
        s.get_mut()
            .write_all(format!("{total}\n").as_bytes())
            .await?;
        s.get_mut().shutdown().await
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod bulk_tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn timed_upload_answers_with_the_window_while_the_client_still_sends() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let l = rt.block_on(TcpListener::bind("127.0.0.1:0")).unwrap();
        let addr = l.local_addr().unwrap();
        let server = std::thread::spawn(move || {
            rt.block_on(async move {
                let (s, _) = l.accept().await.unwrap();
                bulk(s).await.unwrap();
            })
        });
        let mut c = std::net::TcpStream::connect(addr).unwrap();
        use std::io::{BufRead, Write};
        c.write_all(b"RECV 50 200\n").unwrap();
        let mut w = c.try_clone().unwrap();
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stop2 = Arc::clone(&stop);
        let writer = std::thread::spawn(move || {
            let buf = [1u8; 16384];
            while !stop2.load(std::sync::atomic::Ordering::Relaxed) {
                std::thread::sleep(std::time::Duration::from_millis(1));
                if w.write_all(&buf).is_err() {
                    break;
                }
            }
        });
        let mut line = String::new();
        std::io::BufReader::new(&c).read_line(&mut line).unwrap();
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        writer.join().unwrap();
        c.shutdown(std::net::Shutdown::Write).unwrap();
        server.join().unwrap();
        let mut it = line.split_whitespace().map(|x| x.parse::<u64>().unwrap());
        let (bytes, nanos) = (it.next().unwrap(), it.next().unwrap());
        assert!(bytes > 16384, "{line}");
        assert!((200_000_000..2_000_000_000).contains(&nanos), "{line}");
    }
}
