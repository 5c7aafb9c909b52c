//! The workload programs every path runs: the same code, started as `snas-bench client …` inside
//! the path's environment (a plain namespace, a SNAS job namespace, or a gVisor sandbox), prints
//! one result line on stdout that the orchestrator parses.
//!
//! Owns the client side of the four measurements: request/response latency over one
//! connection (like netperf TCP_RR), connect + request + close (TCP_CRR), bulk transfer with one
//! or more flows, and a UDP echo flood for the proxy's packet rate. Each resolves its target
//! once before the clock starts (through the environment's resolver), or asks an HTTP CONNECT
//! proxy (squid) for a tunnel by name, as an application configured with proxy settings would.
//!
//! Invariants: timing uses the monotonic clock only; the warm-up is never counted; a failed
//! transaction is counted in `errors`, never silently skipped. Limits: IPv4/IPv6 as the resolver
//! answers; one client thread per flow.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream, ToSocketAddrs, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::stats::Summary;

/// Prefix of the one stdout line that carries the result as JSON.
pub const RESULT_MARKER: &str = "SNAS-BENCH-RESULT ";

/// Errors of the client.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The target name did not resolve.
    #[error("resolving {target}: {detail}")]
    Resolve { target: String, detail: String },
    /// A socket operation failed before any measurement could be made.
    #[error("{what} {target}: {source}")]
    Io {
        what: &'static str,
        target: String,
        #[source]
        source: std::io::Error,
    },
    /// The proxy refused the tunnel.
    #[error("proxy {proxy} refused CONNECT {target}: {status_line}")]
    ProxyRefused {
        proxy: SocketAddr,
        target: String,
        status_line: String,
    },
    /// The server answered something unexpected.
    #[error("{target}: unexpected answer: {detail}")]
    Protocol { target: String, detail: String },
    /// Every transaction failed: nothing to report.
    #[error("{target}: all {errors} transactions failed; last error: {last}")]
    NothingMeasured {
        target: String,
        errors: u64,
        last: String,
    },
}

/// Where the client connects: `host:port`, optionally through an HTTP CONNECT proxy.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Target {
    pub host: String,
    pub port: u16,
    /// HTTP CONNECT proxy; the client then never resolves `host` itself.
    pub proxy: Option<SocketAddr>,
}

impl Target {
    pub(crate) fn label(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }
}

/// Which measurement to run.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum Workload {
    /// One connection, 1-byte request and 1-byte answer, back to back (echo server).
    Rr { duration_s: f64, warmup_s: f64 },
    /// New connection per transaction: connect, HTTP GET, read to EOF, close.
    Crr { duration_s: f64, warmup_s: f64 },
    /// Bulk transfer against the bulk server (`SEND n` / `RECV`).
    Bulk {
        duration_s: f64,
        warmup_s: f64,
        flows: usize,
        download: bool,
    },
    /// `Rr`, while a second thread resolves `names` in turn through the environment's
    /// resolver (getaddrinfo), one lookup every `lookup_interval_s`, counting failed and
    /// retried lookups.
    RrLookups {
        duration_s: f64,
        warmup_s: f64,
        names: Vec<String>,
        lookup_interval_s: f64,
    },
    /// An ordinary program's loop: `count` short connections, each resolving its name again
    /// (the environment's resolver, as `getaddrinfo` in a loop does), then connect, HTTP GET,
    /// read to EOF, close; names taken in turn from `names` (port from the target); started at
    /// most `per_sec` per second (0: back to back). The latency is lookup + connect.
    Connections {
        count: u64,
        per_sec: f64,
        names: Vec<String>,
    },
    /// New connection per transaction: connect, a full TLS handshake (rustls, verifying the
    /// server against `ca_pem`, the testbed CA), close_notify, close
    /// ([`crate::first_payload`]).
    TlsHandshake {
        duration_s: f64,
        warmup_s: f64,
        ca_pem: String,
    },
    /// UDP echo flood from `flows` sockets (one thread each) with `payload` bytes per
    /// datagram, sent as `pace` says.
    UdpFlood {
        duration_s: f64,
        flows: usize,
        payload: usize,
        pace: Pace,
    },
}

/// How a UDP flood sends.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Pace {
    /// At most this many datagrams unanswered per socket: a new one as each answer arrives
    /// (and a new window after a 10 ms silence, so losses do not stall it). Measures what a
    /// path forwards without overrunning it.
    Window(usize),
    /// As fast as the socket takes them, never waiting for answers (answers are read and
    /// counted whenever there are some): a hostile job's flood.
    OpenLoop,
    /// Open loop at this many datagrams per second per socket (what reaches a proxy when the
    /// node sheds everything above a per-job packet budget).
    Rate(u64),
}

/// What one client run measured.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct ClientResult {
    /// Completed transactions (RR/CRR), datagrams answered (UDP).
    pub transactions: u64,
    /// Failed transactions (timeouts, resets, refusals).
    pub errors: u64,
    /// Length of the measured window.
    pub elapsed_s: f64,
    /// Per-transaction latency in µs (RR/CRR).
    pub latency_us: Option<Summary>,
    /// Payload bytes counted in the window (bulk: received or confirmed; UDP: sent + received).
    pub bytes: u64,
    /// Payload rate in bit/s over the window (bulk).
    pub rate_bps: f64,
    /// Datagrams sent (UDP flood).
    pub sent: u64,
    /// The address the target resolved to (empty through a proxy).
    pub resolved: String,
    /// Name lookups completed in the window (`RrLookups`).
    #[serde(default)]
    pub lookups: u64,
    /// Lookups that failed (no answer, SERVFAIL, REFUSED, timeout).
    #[serde(default)]
    pub lookup_failures: u64,
    /// Lookups that succeeded only after [`LOOKUP_RETRIED`] or more: the resolver's first
    /// query (or its answer) was lost and it asked again.
    #[serde(default)]
    pub lookups_retried: u64,
    /// Per-lookup latency in µs (`RrLookups`).
    #[serde(default)]
    pub lookup_latency_us: Option<Summary>,
}

/// A lookup that took this long was retried by the resolver (glibc waits 5 s before asking
/// again; an answer from the stub or the proxy takes milliseconds at most).
pub const LOOKUP_RETRIED: Duration = Duration::from_secs(1);

pub(crate) fn io_err<'a>(
    what: &'static str,
    t: &'a Target,
) -> impl FnOnce(std::io::Error) -> ClientError + 'a {
    move |source| ClientError::Io {
        what,
        target: t.label(),
        source,
    }
}

fn resolve(t: &Target) -> Result<SocketAddr, ClientError> {
    (t.host.as_str(), t.port)
        .to_socket_addrs()
        .map_err(|e| ClientError::Resolve {
            target: t.label(),
            detail: e.to_string(),
        })?
        .next()
        .ok_or_else(|| ClientError::Resolve {
            target: t.label(),
            detail: "no address".into(),
        })
}

const IO_TIMEOUT: Duration = Duration::from_secs(5);

/// Opens a TCP connection to the target: straight to `addr`, or a CONNECT tunnel by name.
pub(crate) fn connect(t: &Target, addr: Option<SocketAddr>) -> Result<TcpStream, ClientError> {
    let to = t.proxy.or(addr).ok_or_else(|| ClientError::Resolve {
        target: t.label(),
        detail: "no address and no proxy".into(),
    })?;
    let mut s = TcpStream::connect_timeout(&to, IO_TIMEOUT).map_err(io_err("connecting to", t))?;
    s.set_read_timeout(Some(IO_TIMEOUT))
        .map_err(io_err("configuring", t))?;
    s.set_write_timeout(Some(IO_TIMEOUT))
        .map_err(io_err("configuring", t))?;
    if let Some(proxy) = t.proxy {
        let req = format!(
            "CONNECT {h}:{p} HTTP/1.1\r\nHost: {h}:{p}\r\n\r\n",
            h = t.host,
            p = t.port
        );
        s.write_all(req.as_bytes())
            .map_err(io_err("sending CONNECT for", t))?;
        // Read the answer's head byte by byte so that no tunnelled byte is consumed.
        let mut head = Vec::with_capacity(128);
        let mut b = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            let n = s
                .read(&mut b)
                .map_err(io_err("reading CONNECT answer for", t))?;
            if n == 0 || head.len() > 8192 {
                break;
            }
            head.push(b[0]);
        }
        let text = String::from_utf8_lossy(&head);
        let status_line = text.lines().next().unwrap_or("").to_owned();
        if status_line.split_whitespace().nth(1) != Some("200") {
            return Err(ClientError::ProxyRefused {
                proxy,
                target: t.label(),
                status_line,
            });
        }
    }
    Ok(s)
}

/// The target's address, or `None` through a proxy.
pub(crate) fn address_for(t: &Target) -> Result<Option<SocketAddr>, ClientError> {
    if t.proxy.is_some() {
        Ok(None)
    } else {
        resolve(t).map(Some)
    }
}

/// Runs the workload against the target.
pub fn run(w: &Workload, t: &Target) -> Result<ClientResult, ClientError> {
    match *w {
        Workload::Rr {
            duration_s,
            warmup_s,
        } => rr(t, secs(duration_s), secs(warmup_s)),
        Workload::Crr {
            duration_s,
            warmup_s,
        } => crr(t, secs(duration_s), secs(warmup_s)),
        Workload::Bulk {
            duration_s,
            warmup_s,
            flows,
            download,
        } => bulk(t, secs(duration_s), secs(warmup_s), flows.max(1), download),
        Workload::RrLookups {
            duration_s,
            warmup_s,
            ref names,
            lookup_interval_s,
        } => rr_lookups(
            t,
            secs(duration_s),
            secs(warmup_s),
            names,
            secs(lookup_interval_s),
        ),
        Workload::TlsHandshake {
            duration_s,
            warmup_s,
            ref ca_pem,
        } => crate::first_payload::tls_handshakes(t, secs(duration_s), secs(warmup_s), ca_pem),
        Workload::UdpFlood {
            duration_s,
            flows,
            payload,
            pace,
        } => udp_flood(t, secs(duration_s), flows.max(1), payload, pace),
        Workload::Connections {
            count,
            per_sec,
            ref names,
        } => connections(t, count, per_sec, names),
    }
}

/// [`Workload::Connections`]: a lookup each time, then one HTTP exchange per connection.
fn connections(
    t: &Target,
    count: u64,
    per_sec: f64,
    names: &[String],
) -> Result<ClientResult, ClientError> {
    let names: Vec<&str> = if names.is_empty() {
        vec![t.host.as_str()]
    } else {
        names.iter().map(String::as_str).collect()
    };
    let mut lat = Vec::with_capacity(usize::try_from(count).unwrap_or(0));
    let (mut errors, mut last_error) = (0u64, String::new());
    let start = Instant::now();
    for i in 0..count {
        if per_sec > 0.0 {
            let due = start + Duration::from_secs_f64(i as f64 / per_sec);
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
        }
        let name = names[usize::try_from(i).unwrap_or(0) % names.len()];
        let one = Target {
            host: name.to_owned(),
            port: t.port,
            proxy: t.proxy,
        };
        let t0 = Instant::now();
        let r = address_for(&one).and_then(|a| {
            let s = connect(&one, a)?;
            let connected = t0.elapsed();
            http_exchange(&one, s)?;
            Ok(connected)
        });
        match r {
            Ok(d) => lat.push(d.as_secs_f64() * 1e6),
            Err(e) => {
                errors += 1;
                last_error = e.to_string();
            }
        }
    }
    if lat.is_empty() {
        return Err(ClientError::NothingMeasured {
            target: t.label(),
            errors,
            last: last_error,
        });
    }
    if errors > 0 {
        eprintln!("snas-bench client: {errors} of {count} connections failed; last: {last_error}");
    }
    Ok(ClientResult {
        transactions: lat.len() as u64,
        errors,
        elapsed_s: start.elapsed().as_secs_f64(),
        latency_us: Summary::of(&lat),
        ..ClientResult::default()
    })
}

fn secs(s: f64) -> Duration {
    Duration::from_secs_f64(s.clamp(0.0, 3600.0))
}

fn rr(t: &Target, duration: Duration, warmup: Duration) -> Result<ClientResult, ClientError> {
    let addr = address_for(t)?;
    let mut s = connect(t, addr)?;
    s.set_nodelay(true).map_err(io_err("configuring", t))?;
    let mut lat = Vec::with_capacity(200_000);
    let mut b = [0u8; 1];
    let start = Instant::now();
    let mut window_start = None;
    loop {
        let t0 = Instant::now();
        if t0 - start >= warmup + duration {
            break;
        }
        s.write_all(b"x").map_err(io_err("writing to", t))?;
        s.read_exact(&mut b).map_err(io_err("reading from", t))?;
        let t1 = Instant::now();
        if t0 - start >= warmup {
            window_start.get_or_insert(t0);
            lat.push((t1 - t0).as_secs_f64() * 1e6);
        }
    }
    let elapsed = window_start
        .map(|w| w.elapsed().as_secs_f64())
        .unwrap_or(0.0);
    Ok(ClientResult {
        transactions: lat.len() as u64,
        elapsed_s: elapsed,
        latency_us: Summary::of(&lat),
        resolved: addr.map(|a| a.to_string()).unwrap_or_default(),
        ..ClientResult::default()
    })
}

/// What the lookup thread of [`rr_lookups`] counted.
#[derive(Debug, Default)]
struct Lookups {
    done: u64,
    failed: u64,
    retried: u64,
    latency_us: Vec<f64>,
}

/// Resolves `names` in turn, one lookup every `interval`, until `stop`. Counts every lookup
/// started after `warmup`, also the one still running when `stop` is set (it is waited for: a
/// lookup lost at the end of the window is still a lost lookup).
fn lookup_loop(
    names: &[String],
    warmup: Duration,
    interval: Duration,
    stop: &AtomicBool,
) -> Lookups {
    let mut l = Lookups::default();
    let start = Instant::now();
    let mut next = start;
    for name in names.iter().cycle() {
        if stop.load(Ordering::Relaxed) {
            break;
        }
        let now = Instant::now();
        if next > now {
            std::thread::sleep(next - now);
            if stop.load(Ordering::Relaxed) {
                break;
            }
        }
        next = next.max(now) + interval;
        let t0 = Instant::now();
        let ok = (name.as_str(), 0u16)
            .to_socket_addrs()
            .is_ok_and(|mut a| a.next().is_some());
        let took = t0.elapsed();
        if t0 - start < warmup {
            continue;
        }
        l.done += 1;
        if !ok {
            l.failed += 1;
        } else if took >= LOOKUP_RETRIED {
            l.retried += 1;
        }
        l.latency_us.push(took.as_secs_f64() * 1e6);
    }
    l
}

/// TCP_RR while another thread resolves names.
fn rr_lookups(
    t: &Target,
    duration: Duration,
    warmup: Duration,
    names: &[String],
    interval: Duration,
) -> Result<ClientResult, ClientError> {
    let stop = Arc::new(AtomicBool::new(false));
    let lookups = {
        let (names, stop) = (names.to_vec(), Arc::clone(&stop));
        std::thread::spawn(move || lookup_loop(&names, warmup, interval, &stop))
    };
    let r = rr(t, duration, warmup);
    stop.store(true, Ordering::Relaxed);
    let l = lookups.join().map_err(|_| ClientError::Protocol {
        target: t.label(),
        detail: "the lookup thread panicked".into(),
    })?;
    let mut r = r?;
    r.lookups = l.done;
    r.lookup_failures = l.failed;
    r.lookups_retried = l.retried;
    r.lookup_latency_us = Summary::of(&l.latency_us);
    Ok(r)
}

fn crr_once(t: &Target, addr: Option<SocketAddr>) -> Result<(), ClientError> {
    http_exchange(t, connect(t, addr)?)
}

/// One HTTP GET on a fresh connection, read to EOF (the server closes).
fn http_exchange(t: &Target, mut s: TcpStream) -> Result<(), ClientError> {
    let req = format!(
        "GET / HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
        t.host
    );
    s.write_all(req.as_bytes())
        .map_err(io_err("writing to", t))?;
    let mut resp = Vec::with_capacity(256);
    s.read_to_end(&mut resp)
        .map_err(io_err("reading from", t))?;
    if !resp.starts_with(b"HTTP/1.1 200") {
        return Err(ClientError::Protocol {
            target: t.label(),
            detail: String::from_utf8_lossy(&resp[..resp.len().min(60)]).into_owned(),
        });
    }
    Ok(())
}

fn crr(t: &Target, duration: Duration, warmup: Duration) -> Result<ClientResult, ClientError> {
    let addr = address_for(t)?;
    let mut lat = Vec::with_capacity(100_000);
    let (mut errors, mut last_error) = (0u64, String::new());
    let start = Instant::now();
    let mut window_start = None;
    loop {
        let t0 = Instant::now();
        if t0 - start >= warmup + duration {
            break;
        }
        let r = crr_once(t, addr);
        let t1 = Instant::now();
        let counted = t0 - start >= warmup;
        if counted {
            window_start.get_or_insert(t0);
        }
        match r {
            Ok(()) if counted => lat.push((t1 - t0).as_secs_f64() * 1e6),
            Ok(()) => {}
            Err(e) => {
                if counted {
                    errors += 1;
                }
                last_error = e.to_string();
            }
        }
    }
    if lat.is_empty() {
        return Err(ClientError::NothingMeasured {
            target: t.label(),
            errors,
            last: last_error,
        });
    }
    let elapsed = window_start
        .map(|w| w.elapsed().as_secs_f64())
        .unwrap_or(0.0);
    Ok(ClientResult {
        transactions: lat.len() as u64,
        errors,
        elapsed_s: elapsed,
        latency_us: Summary::of(&lat),
        resolved: addr.map(|a| a.to_string()).unwrap_or_default(),
        ..ClientResult::default()
    })
}

/// One bulk flow. Downloads count payload bytes into `counter` until `stop` and return `None`;
/// uploads ask the server to time a window of `warmup` + `window` itself (`RECV <ms> <ms>`)
/// and return its answer (bytes, seconds), then stop sending.
fn bulk_flow(
    t: &Target,
    addr: Option<SocketAddr>,
    download: bool,
    timing: (Duration, Duration),
    counter: &AtomicU64,
    stop: &AtomicBool,
) -> Result<Option<(u64, f64)>, ClientError> {
    let mut s = connect(t, addr)?;
    let mut buf = vec![0x5a_u8; 64 * 1024];
    if download {
        s.write_all(b"SEND 1099511627776\n")
            .map_err(io_err("writing to", t))?;
        while !stop.load(Ordering::Relaxed) {
            let n = s.read(&mut buf).map_err(io_err("reading from", t))?;
            if n == 0 {
                return Err(ClientError::Protocol {
                    target: t.label(),
                    detail: "server closed the download early".into(),
                });
            }
            counter.fetch_add(n as u64, Ordering::Relaxed);
        }
        // Closing with unread data resets the connection: the server sees it and stops.
        return Ok(None);
    }
    let (warmup, window) = timing;
    let req = format!(
        "RECV {} {}\n",
        warmup.as_millis(),
        window.as_millis().max(1)
    );
    s.write_all(req.as_bytes())
        .map_err(io_err("writing to", t))?;
    s.set_read_timeout(Some(warmup + window + Duration::from_secs(30)))
        .map_err(io_err("configuring", t))?;
    let mut reader = s.try_clone().map_err(io_err("configuring", t))?;
    let done = Arc::new(AtomicBool::new(false));
    let writer = {
        let done = Arc::clone(&done);
        std::thread::spawn(move || {
            while !done.load(Ordering::Relaxed) {
                if s.write_all(&buf).is_err() {
                    break;
                }
            }
        })
    };
    let mut answer = Vec::new();
    let mut b = [0u8; 1];
    let read = loop {
        match reader.read(&mut b) {
            Ok(0) => break Ok(()),
            Ok(_) if b[0] == b'\n' => break Ok(()),
            Ok(_) => answer.push(b[0]),
            Err(e) => break Err(e),
        }
    };
    done.store(true, Ordering::Relaxed);
    // The writer may be blocked on a full buffer; shutting the socket down releases it.
    let _ = reader.shutdown(Shutdown::Both);
    let _ = writer.join();
    read.map_err(io_err("reading the server's count from", t))?;
    let text = String::from_utf8_lossy(&answer).into_owned();
    let mut it = text.split_whitespace().map(str::parse::<u64>);
    match (it.next(), it.next()) {
        (Some(Ok(bytes)), Some(Ok(nanos))) if nanos > 0 => Ok(Some((bytes, nanos as f64 / 1e9))),
        _ => Err(ClientError::Protocol {
            target: t.label(),
            detail: format!("upload count {text:?}"),
        }),
    }
}

/// Bulk transfer. Downloads: bytes received between the end of the warm-up and the end of the
/// window, all flows summed, by the client's clock. Uploads: each flow's bytes as the server
/// counted them in its own window (so nothing still queued in socket buffers is counted),
/// summed over flows.
fn bulk(
    t: &Target,
    duration: Duration,
    warmup: Duration,
    flows: usize,
    download: bool,
) -> Result<ClientResult, ClientError> {
    let addr = address_for(t)?;
    let counter = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let handles: Vec<_> = (0..flows)
        .map(|_| {
            let (t, c, s) = (t.clone(), Arc::clone(&counter), Arc::clone(&stop));
            std::thread::spawn(move || bulk_flow(&t, addr, download, (warmup, duration), &c, &s))
        })
        .collect();
    let mut window = None;
    if download {
        std::thread::sleep(warmup);
        let (a_time, a_bytes) = (Instant::now(), counter.load(Ordering::Relaxed));
        std::thread::sleep(duration);
        let (b_time, b_bytes) = (Instant::now(), counter.load(Ordering::Relaxed));
        window = Some((b_bytes - a_bytes, (b_time - a_time).as_secs_f64()));
        stop.store(true, Ordering::Relaxed);
    }
    let (mut up_bytes, mut up_rate, mut up_secs) = (0u64, 0.0f64, 0.0f64);
    let mut errors = 0u64;
    let mut last_error = None;
    for h in handles {
        match h.join() {
            Ok(Ok(Some((bytes, secs)))) => {
                up_bytes += bytes;
                up_rate += bytes as f64 * 8.0 / secs;
                up_secs = up_secs.max(secs);
            }
            Ok(Ok(None)) => {}
            Ok(Err(e)) => {
                errors += 1;
                last_error = Some(e);
            }
            Err(_) => errors += 1,
        }
    }
    if let Some(e) = last_error.filter(|_| errors as usize == flows) {
        return Err(e);
    }
    let (bytes, elapsed, rate_bps) = match window {
        Some((bytes, secs)) if secs > 0.0 => (bytes, secs, bytes as f64 * 8.0 / secs),
        Some((bytes, secs)) => (bytes, secs, 0.0),
        None => (up_bytes, up_secs, up_rate),
    };
    Ok(ClientResult {
        transactions: flows as u64 - errors,
        errors,
        elapsed_s: elapsed,
        bytes,
        rate_bps,
        resolved: addr.map(|a| a.to_string()).unwrap_or_default(),
        ..ClientResult::default()
    })
}

/// UDP echo flood, each socket on its own thread (see [`Pace`]).
fn udp_flood(
    t: &Target,
    duration: Duration,
    flows: usize,
    payload: usize,
    pace: Pace,
) -> Result<ClientResult, ClientError> {
    let addr = resolve(t)?;
    let sent = Arc::new(AtomicU64::new(0));
    let received = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + duration;
    let started = Instant::now();
    let mut handles = Vec::new();
    for _ in 0..flows {
        let bind: SocketAddr = if addr.is_ipv4() {
            SocketAddr::from(([0, 0, 0, 0], 0))
        } else {
            SocketAddr::from(([0u16; 8], 0))
        };
        let s = UdpSocket::bind(bind).map_err(io_err("binding for", t))?;
        s.connect(addr).map_err(io_err("connecting to", t))?;
        match pace {
            Pace::Window(_) => s.set_read_timeout(Some(Duration::from_millis(10))),
            Pace::OpenLoop | Pace::Rate(_) => s.set_nonblocking(true),
        }
        .map_err(io_err("configuring", t))?;
        let (sent, received) = (Arc::clone(&sent), Arc::clone(&received));
        handles.push(std::thread::spawn(move || {
            let out = vec![0x42_u8; payload];
            let mut inb = vec![0u8; payload.max(1) + 64];
            let (mut n_sent, mut n_received) = (0u64, 0u64);
            match pace {
                Pace::Window(window) => {
                    let window = window.max(1);
                    let mut outstanding = 0usize;
                    while Instant::now() < deadline {
                        while outstanding < window {
                            if s.send(&out).is_ok() {
                                n_sent += 1;
                            }
                            outstanding += 1;
                        }
                        match s.recv(&mut inb) {
                            Ok(_) => {
                                n_received += 1;
                                outstanding = outstanding.saturating_sub(1);
                            }
                            // Silence: assume the window was lost and start a new one.
                            Err(_) => outstanding = 0,
                        }
                    }
                }
                Pace::Rate(per_sec) => {
                    let gap =
                        Duration::from_secs(1) / u32::try_from(per_sec.max(1)).unwrap_or(u32::MAX);
                    let mut next = Instant::now();
                    loop {
                        let now = Instant::now();
                        if now >= deadline {
                            break;
                        }
                        if now < next {
                            std::thread::sleep((next - now).min(Duration::from_millis(1)));
                            while s.recv(&mut inb).is_ok() {
                                n_received += 1;
                            }
                            continue;
                        }
                        // Catch up in bursts after a late wake-up, as a token bucket with a
                        // 10 ms burst would.
                        next = next.max(now - Duration::from_millis(10).min(now - started));
                        while next <= now {
                            if s.send(&out).is_ok() {
                                n_sent += 1;
                            }
                            next += gap;
                        }
                        while s.recv(&mut inb).is_ok() {
                            n_received += 1;
                        }
                    }
                }
                Pace::OpenLoop => {
                    let mut i = 0u32;
                    loop {
                        // The clock is read once per 64 datagrams: reading it costs about as
                        // much as a send here.
                        if i % 64 == 0 && Instant::now() >= deadline {
                            break;
                        }
                        i = i.wrapping_add(1);
                        if s.send(&out).is_ok() {
                            n_sent += 1;
                        }
                        while s.recv(&mut inb).is_ok() {
                            n_received += 1;
                        }
                    }
                }
            }
            sent.fetch_add(n_sent, Ordering::Relaxed);
            received.fetch_add(n_received, Ordering::Relaxed);
        }));
    }
    for h in handles {
        let _ = h.join();
    }
    let elapsed = started.elapsed().as_secs_f64();
    let (sent, received) = (
        sent.load(Ordering::Relaxed),
        received.load(Ordering::Relaxed),
    );
    Ok(ClientResult {
        transactions: received,
        elapsed_s: elapsed,
        bytes: (sent + received) * payload as u64,
        sent,
        resolved: addr.to_string(),
        ..ClientResult::default()
    })
}

/// Parses the result line out of a client's stdout.
pub fn parse_output(stdout: &str) -> Option<ClientResult> {
    stdout
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix(RESULT_MARKER))
        .and_then(|j| serde_json::from_str(j).ok())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::net::TcpListener;

    fn echo_server() -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let a = l.local_addr().unwrap();
        std::thread::spawn(move || {
            for s in l.incoming() {
                let Ok(mut s) = s else { continue };
                std::thread::spawn(move || {
                    let mut b = [0u8; 512];
                    while let Ok(n) = s.read(&mut b) {
                        if n == 0 || s.write_all(&b[..n]).is_err() {
                            break;
                        }
                    }
                });
            }
        });
        a
    }

    #[test]
    fn rr_counts_round_trips_after_the_warm_up() {
        let a = echo_server();
        let t = Target {
            host: a.ip().to_string(),
            port: a.port(),
            proxy: None,
        };
        let r = run(
            &Workload::Rr {
                duration_s: 0.2,
                warmup_s: 0.05,
            },
            &t,
        )
        .unwrap();
        let lat = r.latency_us.unwrap();
        assert!(r.transactions > 10, "{r:?}");
        assert_eq!(lat.n as u64, r.transactions);
        assert!(lat.p50 > 0.0 && lat.p50 <= lat.p99);
        assert!((0.15..0.5).contains(&r.elapsed_s), "{}", r.elapsed_s);
    }

    #[test]
    fn connect_through_a_proxy_reports_its_refusal() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let proxy = l.local_addr().unwrap();
        std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            let mut b = [0u8; 256];
            let _ = s.read(&mut b);
            s.write_all(b"HTTP/1.1 403 Forbidden\r\n\r\n").unwrap();
        });
        let t = Target {
            host: "denied.example.com".into(),
            port: 7,
            proxy: Some(proxy),
        };
        match connect(&t, None) {
            Err(ClientError::ProxyRefused { status_line, .. }) => {
                assert!(status_line.contains("403"))
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn result_line_is_found_among_other_output() {
        let r = ClientResult {
            transactions: 7,
            ..ClientResult::default()
        };
        let out = format!(
            "noise\n{RESULT_MARKER}{}\nmore noise\n",
            serde_json::to_string(&r).unwrap()
        );
        assert_eq!(parse_output(&out), Some(r));
        assert_eq!(parse_output("nothing here"), None);
    }
}
