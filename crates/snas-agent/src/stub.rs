//! The per-job DNS stub: one UDP socket and one TCP listener for every job on the node.
//!
//! Tier 1 rewrites every DNS packet a sandbox sends (UDP/TCP 53, TCP 853, to any address) to
//! its job's gateway address and port 53, so one socket bound to `dns_listen:53` (default
//! `0.0.0.0`) serves all jobs; the job is identified by the query's source address (tier 1 drops
//! spoofed sources). Per query, in order ([`crate::dns`] decides, this module does the I/O):
//! 1. unparsable → dropped; not a job's sandbox → REFUSED;
//! 2. the job's token bucket (`dns_queries_per_sec`, `dns_query_burst`) → REFUSED, audited
//!    `dns_rate` (this is what contains tunnelling through random subdomains of a wildcard);
//! 3. not a single A/AAAA/CNAME question → REFUSED, audited `dns_qtype`;
//! 4. no host rule matches the name → REFUSED, audited `dns_refused`;
//! 5. more than `dns_max_inflight_per_job` of the job's queries outstanding → REFUSED;
//! 6. forwarded with the job's identity (EDNS option 65053) to the proxies in
//!    [`crate::proxies::ProxyTable::dns_order`] order, [`FORWARD_TIMEOUT`] each, over UDP, then
//!    TCP to the same proxy if the answer is truncated;
//! 7. each A/AAAA answer is installed into tier 1 with the ports of the matching rules and the
//!    (clamped) TTL as expiry — BEFORE the answer is relayed, so the first connection is never
//!    dropped; if tier 1 cannot be programmed the sandbox gets SERVFAIL;
//! 8. the answer is relayed (the sandbox's ID and question; truncated if it exceeds the
//!    sandbox's UDP size) and audited `allow`.
//!
//! # Limits
//! - [`MAX_UDP_TASKS`] queries in progress node-wide (beyond: dropped and counted), and
//!   [`MAX_TCP_CONNS`] TCP connections, each closed after [`TCP_IDLE`] without a query.
//! - Refusals are audited at most [`REFUSAL_AUDIT_PER_SEC`] per job and second; the rest are
//!   counted and the next line carries how many were left out (`suppressed`). The audit queue
//!   is bounded too (see [`crate::audit`]).

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use hickory_proto::op::{Message, MessageType, ResponseCode};
use hickory_proto::rr::RData;
use serde::Serialize;
use snas_policy::Matcher;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::{watch, Semaphore};

use crate::audit::{rfc3339, Action, AuditRecord, AuditSink};
use crate::dns::{self, Question, Refusal, TokenBucket};
use crate::naming::job_key_hex;
use crate::proxies::Proxies;
use crate::seams::{Dataplane, VerifiedPolicy};

/// Time to wait for one proxy's answer before trying the next.
pub const FORWARD_TIMEOUT: Duration = Duration::from_secs(1);
/// UDP queries being handled at once, node-wide.
pub const MAX_UDP_TASKS: usize = 1024;
/// TCP connections open at once, node-wide.
pub const MAX_TCP_CONNS: usize = 256;
/// A TCP connection with no query for this long is closed.
pub const TCP_IDLE: Duration = Duration::from_secs(10);

/// Finds jobs by sandbox address (implemented by [`crate::Agent`]).
pub trait JobDirectory: Send + Sync + 'static {
    /// Job key and policy serial of the job whose sandbox has address `ip`. Called per query:
    /// must be cheap.
    fn job_at(&self, ip: IpAddr) -> Option<(u64, u32)>;
    /// The job's verified policy (with claims); called when a job or serial is first seen.
    fn policy(&self, job_key: u64) -> Option<VerifiedPolicy>;
}

/// The stub's limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StubConfig {
    /// Per-job queries per second.
    pub queries_per_sec: u32,
    /// Per-job burst.
    pub burst: u32,
    /// Per-job outstanding forwarded queries.
    pub max_inflight: u32,
    /// Per-proxy forward timeout.
    pub forward_timeout: Duration,
}

impl StubConfig {
    /// The limits from `agent.toml`.
    pub fn from_agent(c: &crate::AgentConfig) -> StubConfig {
        StubConfig {
            queries_per_sec: c.dns_queries_per_sec,
            burst: c.dns_query_burst,
            max_inflight: c.dns_max_inflight_per_job,
            forward_timeout: FORWARD_TIMEOUT,
        }
    }
}

/// Counters of the stub's outcomes.
#[derive(Debug, Default)]
pub struct DnsStats {
    queries: AtomicU64,
    malformed: AtomicU64,
    overload: AtomicU64,
    refused: [AtomicU64; 5],
    forwarded: AtomicU64,
    noerror: AtomicU64,
    nxdomain: AtomicU64,
    other_rcode: AtomicU64,
    servfail: AtomicU64,
    proxy_failures: AtomicU64,
    installed: AtomicU64,
    audit_suppressed: AtomicU64,
}

fn refusal_slot(r: Refusal) -> usize {
    match r {
        Refusal::UnknownJob => 0,
        Refusal::Rate => 1,
        Refusal::InFlight => 2,
        Refusal::QueryType => 3,
        Refusal::Name => 4,
    }
}

const REFUSALS: [Refusal; 5] = [
    Refusal::UnknownJob,
    Refusal::Rate,
    Refusal::InFlight,
    Refusal::QueryType,
    Refusal::Name,
];

impl DnsStats {
    fn inc(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }

    /// Query outcomes by label (`refused_<reason>`, `noerror`, `nxdomain`, `servfail`, ...).
    pub fn outcomes(&self) -> BTreeMap<String, u64> {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let mut m = BTreeMap::new();
        for r in REFUSALS {
            m.insert(
                format!("refused_{}", r.name()),
                g(&self.refused[refusal_slot(r)]),
            );
        }
        m.insert("malformed".into(), g(&self.malformed));
        m.insert("overload".into(), g(&self.overload));
        m.insert("noerror".into(), g(&self.noerror));
        m.insert("nxdomain".into(), g(&self.nxdomain));
        m.insert("other_rcode".into(), g(&self.other_rcode));
        m.insert("servfail".into(), g(&self.servfail));
        m
    }

    /// Refusal audit lines left out by the per-job audit limit.
    pub fn audit_suppressed(&self) -> u64 {
        self.audit_suppressed.load(Ordering::Relaxed)
    }
}

/// A JSON view of the stub (`GET /v1/dns`).
#[derive(Debug, Clone, Serialize)]
pub struct DnsView {
    /// Queries received (parsed).
    pub queries: u64,
    /// Queries forwarded to a proxy.
    pub forwarded: u64,
    /// Forward attempts that timed out or failed (each moves to the next proxy).
    pub proxy_failures: u64,
    /// Addresses installed into tier 1.
    pub installed_addrs: u64,
    /// Refusal audit lines left out by the per-job audit limit.
    pub audit_suppressed: u64,
    /// Outcomes by label.
    pub outcomes: BTreeMap<String, u64>,
    /// Jobs with stub state.
    pub jobs: usize,
}

struct JobSlot {
    serial: u32,
    policy: Arc<VerifiedPolicy>,
    matcher: Arc<Matcher>,
    bucket: TokenBucket,
    inflight: u32,
    /// Refusal audit lines: at most [`REFUSAL_AUDIT_PER_SEC`] per job.
    audit_bucket: TokenBucket,
    /// Refusals not audited since the last refusal line.
    suppressed: u64,
}

/// Refusal audit lines per job and second (burst twice that); the rest are counted and the next
/// line carries the count (`suppressed`), so a flooding job cannot fill the disk.
pub const REFUSAL_AUDIT_PER_SEC: u32 = 10;

/// The DNS stub (shared by the UDP and TCP servers).
pub struct DnsStub {
    dir: Arc<dyn JobDirectory>,
    dataplane: Arc<dyn Dataplane>,
    proxies: Arc<Proxies>,
    audit: AuditSink,
    cfg: StubConfig,
    jobs: Mutex<HashMap<u64, JobSlot>>,
    epoch: Instant,
    stats: DnsStats,
}

impl std::fmt::Debug for DnsStub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DnsStub").field("cfg", &self.cfg).finish()
    }
}

struct InflightGuard<'a> {
    stub: &'a DnsStub,
    job_key: u64,
}

impl Drop for InflightGuard<'_> {
    fn drop(&mut self) {
        if let Some(s) = self.stub.lock_jobs().get_mut(&self.job_key) {
            s.inflight = s.inflight.saturating_sub(1);
        }
    }
}

/// Why forwarding failed.
#[derive(Debug, thiserror::Error)]
enum ForwardError {
    #[error("{0}: {1}")]
    Io(SocketAddr, io::Error),
    #[error("{0}: timed out")]
    Timeout(SocketAddr),
    #[error("{0}: unusable answer: {1}")]
    BadAnswer(SocketAddr, String),
}

fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

impl DnsStub {
    /// A stub over the given job directory, tier 1, proxy table and audit sink.
    pub fn new(
        dir: Arc<dyn JobDirectory>,
        dataplane: Arc<dyn Dataplane>,
        proxies: Arc<Proxies>,
        audit: AuditSink,
        cfg: StubConfig,
    ) -> DnsStub {
        DnsStub {
            dir,
            dataplane,
            proxies,
            audit,
            cfg,
            jobs: Mutex::new(HashMap::new()),
            epoch: Instant::now(),
            stats: DnsStats::default(),
        }
    }

    fn lock_jobs(&self) -> std::sync::MutexGuard<'_, HashMap<u64, JobSlot>> {
        self.jobs.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The stub's counters.
    pub fn stats(&self) -> &DnsStats {
        &self.stats
    }

    /// The JSON view.
    pub fn view(&self) -> DnsView {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        DnsView {
            queries: g(&self.stats.queries),
            forwarded: g(&self.stats.forwarded),
            proxy_failures: g(&self.stats.proxy_failures),
            installed_addrs: g(&self.stats.installed),
            audit_suppressed: g(&self.stats.audit_suppressed),
            outcomes: self.stats.outcomes(),
            jobs: self.lock_jobs().len(),
        }
    }

    /// Takes a rate token for the job and returns its policy and matcher; builds or refreshes
    /// the job's state when the job or its serial is new. `None` if the job vanished.
    #[allow(clippy::type_complexity)]
    fn admit(
        &self,
        job_key: u64,
        serial: u32,
    ) -> Option<(Arc<VerifiedPolicy>, Arc<Matcher>, bool)> {
        let now = self.epoch.elapsed();
        let fresh = {
            let jobs = self.lock_jobs();
            jobs.get(&job_key).is_some_and(|s| s.serial == serial)
        };
        if !fresh {
            let policy = self.dir.policy(job_key)?;
            // A policy without claims has no rules: every name is refused.
            let matcher = Arc::new(match &policy.claims {
                Some(c) => snas_policy::compile(c),
                None => snas_policy::matcher::compile_rules(&[], &[]),
            });
            let mut jobs = self.lock_jobs();
            // Forget jobs that are gone (only on this rare path, so the cost is bounded).
            jobs.retain(|k, _| *k == job_key || self.dir.policy(*k).is_some());
            let bucket = jobs.get(&job_key).map_or_else(
                || TokenBucket::new(self.cfg.queries_per_sec, self.cfg.burst, now),
                |s| s.bucket.clone(),
            );
            let inflight = jobs.get(&job_key).map_or(0, |s| s.inflight);
            let audit_bucket = jobs.get(&job_key).map_or_else(
                || TokenBucket::new(REFUSAL_AUDIT_PER_SEC, 2 * REFUSAL_AUDIT_PER_SEC, now),
                |s| s.audit_bucket.clone(),
            );
            let suppressed = jobs.get(&job_key).map_or(0, |s| s.suppressed);
            jobs.insert(
                job_key,
                JobSlot {
                    serial,
                    policy: Arc::new(policy),
                    matcher,
                    bucket,
                    inflight,
                    audit_bucket,
                    suppressed,
                },
            );
        }
        let mut jobs = self.lock_jobs();
        let slot = jobs.get_mut(&job_key)?;
        let ok = slot.bucket.take(now);
        Some((slot.policy.clone(), slot.matcher.clone(), ok))
    }

    fn try_inflight(&self, job_key: u64) -> Option<InflightGuard<'_>> {
        let mut jobs = self.lock_jobs();
        let slot = jobs.get_mut(&job_key)?;
        if slot.inflight >= self.cfg.max_inflight {
            return None;
        }
        slot.inflight += 1;
        Some(InflightGuard {
            stub: self,
            job_key,
        })
    }

    /// Whether a refusal of the job may be audited now; `Some(n)`: yes, with `n` refusals
    /// suppressed before it.
    fn refusal_audit_slot(&self, job_key: u64) -> Option<u64> {
        let now = self.epoch.elapsed();
        let mut jobs = self.lock_jobs();
        let slot = jobs.get_mut(&job_key)?;
        if slot.audit_bucket.take(now) {
            Some(std::mem::take(&mut slot.suppressed))
        } else {
            slot.suppressed += 1;
            DnsStats::inc(&self.stats.audit_suppressed);
            None
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn audit(
        &self,
        policy: &VerifiedPolicy,
        action: Action,
        reason: &str,
        src: SocketAddr,
        local: Option<IpAddr>,
        tcp: bool,
        q: Option<&Question>,
        rule: Option<usize>,
        addrs: Vec<IpAddr>,
        bytes: usize,
        suppressed: u64,
    ) {
        self.audit.emit(AuditRecord {
            time: rfc3339(SystemTime::now()),
            tier: 1,
            kind: Some("dns"),
            action,
            tenant: policy.tenant.clone(),
            job: policy.job.clone(),
            job_key: job_key_hex(policy.job_key),
            proto: if tcp { "tcp" } else { "udp" }.into(),
            src: Some(canonical(src.ip())),
            dst: local,
            port: 53,
            hostname: q.map(|q| q.name.clone()),
            rule,
            reason: reason.to_owned(),
            bytes: bytes as u64,
            qtype: q.map(|q| q.qtype.to_string()),
            addrs,
            suppressed,
        });
    }

    fn refuse(&self, query: &Message, why: Refusal) -> Option<Vec<u8>> {
        DnsStats::inc(&self.stats.refused[refusal_slot(why)]);
        dns::empty_answer(query, ResponseCode::Refused)
            .to_vec()
            .ok()
    }

    fn servfail(&self, query: &Message) -> Option<Vec<u8>> {
        DnsStats::inc(&self.stats.servfail);
        dns::empty_answer(query, ResponseCode::ServFail)
            .to_vec()
            .ok()
    }

    /// Handles one query from `src` (received on `local`, if known); returns the bytes to send
    /// back, or `None` to stay silent (unparsable input, a response).
    pub async fn handle(
        &self,
        bytes: &[u8],
        src: SocketAddr,
        local: Option<IpAddr>,
        tcp: bool,
    ) -> Option<Vec<u8>> {
        let Ok(query) = Message::from_vec(bytes) else {
            DnsStats::inc(&self.stats.malformed);
            return None;
        };
        if query.message_type() != MessageType::Query {
            DnsStats::inc(&self.stats.malformed);
            return None;
        }
        DnsStats::inc(&self.stats.queries);
        let Some((job_key, serial)) = self.dir.job_at(canonical(src.ip())) else {
            return self.refuse(&query, Refusal::UnknownJob);
        };
        let Some((policy, matcher, rate_ok)) = self.admit(job_key, serial) else {
            return self.refuse(&query, Refusal::UnknownJob);
        };
        let audit_refusal = |why: Refusal, q: Option<&Question>| {
            if let Some(suppressed) = self.refusal_audit_slot(job_key) {
                self.audit(
                    &policy,
                    Action::Refuse,
                    why.name(),
                    src,
                    local,
                    tcp,
                    q,
                    None,
                    Vec::new(),
                    bytes.len(),
                    suppressed,
                );
            }
            self.refuse(&query, why)
        };
        let shape = dns::question_of(&query);
        if !rate_ok {
            let q = shape.as_ref().ok().cloned();
            return audit_refusal(Refusal::Rate, q.as_ref());
        }
        let question = match shape {
            Ok(q) => q,
            Err((why, q)) => return audit_refusal(why, q.as_ref()),
        };
        let rules = match dns::rules_for_name(&matcher, &question.name) {
            Ok(r) => r,
            Err(why) => return audit_refusal(why, Some(&question)),
        };
        let Some(_guard) = self.try_inflight(job_key) else {
            return audit_refusal(Refusal::InFlight, Some(&question));
        };
        let id: u16 = rand::random();
        let fq = dns::forward_query(&query, id, policy.tenant_id, job_key, policy.serial);
        DnsStats::inc(&self.stats.forwarded);
        let Some(answer) = self.forward(&fq, self.proxies.resolvers_for(job_key)).await else {
            return self.servfail(&query);
        };
        let mut installed = Vec::new();
        if answer.response_code() == ResponseCode::NoError {
            let claims = policy.claims.as_ref();
            let ports = claims
                .map(|c| dns::port_rules(c, &matcher, &rules))
                .unwrap_or_default();
            let addrs: Vec<(IpAddr, Duration)> = answer
                .answers()
                .iter()
                .filter_map(|r| match r.data() {
                    RData::A(a) => Some((IpAddr::V4(a.0), dns::clamp_ttl(r.ttl()))),
                    RData::AAAA(a) => Some((IpAddr::V6(a.0), dns::clamp_ttl(r.ttl()))),
                    _ => None,
                })
                .collect();
            if !addrs.is_empty() {
                let dp = self.dataplane.clone();
                let (ports2, addrs2) = (ports.clone(), addrs.clone());
                let res = tokio::task::spawn_blocking(move || {
                    for (ip, ttl) in &addrs2 {
                        dp.allow_resolved(job_key, *ip, &ports2, *ttl)?;
                    }
                    Ok::<(), crate::seams::DataplaneError>(())
                })
                .await;
                match res {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => {
                        tracing::warn!(job = %job_key_hex(job_key), error = %e, "DNS answer not installed");
                        return self.servfail(&query);
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "DNS install task failed");
                        return self.servfail(&query);
                    }
                }
                self.stats
                    .installed
                    .fetch_add(addrs.len() as u64, Ordering::Relaxed);
                installed = addrs.into_iter().map(|(ip, _)| ip).collect();
            }
        }
        let rcode = answer.response_code();
        let counter = match rcode {
            ResponseCode::NoError => &self.stats.noerror,
            ResponseCode::NXDomain => &self.stats.nxdomain,
            ResponseCode::ServFail => &self.stats.servfail,
            _ => &self.stats.other_rcode,
        };
        DnsStats::inc(counter);
        let reason = if rcode == ResponseCode::NoError {
            "allowed".to_owned()
        } else {
            rcode.to_string().to_ascii_lowercase()
        };
        self.audit(
            &policy,
            Action::Allow,
            &reason,
            src,
            local,
            tcp,
            Some(&question),
            rules.first().copied(),
            installed,
            bytes.len(),
            0,
        );
        let relayed = dns::relay_answer(&query, answer);
        let out = relayed.to_vec().ok()?;
        if !tcp && out.len() > dns::client_udp_limit(&query) {
            let mut t = dns::empty_answer(&query, relayed.response_code());
            t.set_truncated(true);
            return t.to_vec().ok();
        }
        Some(out)
    }

    async fn forward(&self, fq: &Message, targets: Vec<SocketAddr>) -> Option<Message> {
        let bytes = fq.to_vec().ok()?;
        for t in targets {
            let attempt = async {
                let a = exchange_udp(t, fq, &bytes).await?;
                if a.truncated() {
                    exchange_tcp(t, fq, &bytes).await
                } else {
                    Ok(a)
                }
            };
            match tokio::time::timeout(self.cfg.forward_timeout, attempt).await {
                Ok(Ok(a)) => return Some(a),
                Ok(Err(e)) => {
                    DnsStats::inc(&self.stats.proxy_failures);
                    tracing::debug!(error = %e, "DNS forward failed; trying the next proxy");
                }
                Err(_) => {
                    DnsStats::inc(&self.stats.proxy_failures);
                    tracing::debug!(error = %ForwardError::Timeout(t), "DNS forward failed");
                }
            }
        }
        None
    }

    /// Serves UDP queries on `sock` until `shutdown` turns true.
    pub async fn serve_udp(self: Arc<Self>, sock: UdpSocket, shutdown: watch::Receiver<bool>) {
        let stop = stopped(shutdown);
        tokio::pin!(stop);
        let sock = Arc::new(sock);
        let local = sock
            .local_addr()
            .ok()
            .map(|a| a.ip())
            .filter(|ip| !ip.is_unspecified());
        let tasks = Arc::new(Semaphore::new(MAX_UDP_TASKS));
        let mut buf = vec![0u8; 4096];
        loop {
            let (n, src) = tokio::select! {
                r = sock.recv_from(&mut buf) => match r {
                    Ok(x) => x,
                    Err(e) => {
                        tracing::debug!(error = %e, "DNS stub recv");
                        continue;
                    }
                },
                () = &mut stop => return,
            };
            let Ok(permit) = tasks.clone().try_acquire_owned() else {
                DnsStats::inc(&self.stats.overload);
                continue;
            };
            let msg = buf[..n].to_vec();
            let (stub, sock) = (self.clone(), sock.clone());
            tokio::spawn(async move {
                if let Some(out) = stub.handle(&msg, src, local, false).await {
                    let _ = sock.send_to(&out, src).await;
                }
                drop(permit);
            });
        }
    }

    /// Serves TCP (length-prefixed) queries on `listener` until `shutdown` turns true.
    pub async fn serve_tcp(
        self: Arc<Self>,
        listener: TcpListener,
        shutdown: watch::Receiver<bool>,
    ) {
        let stop = stopped(shutdown);
        tokio::pin!(stop);
        let conns = Arc::new(Semaphore::new(MAX_TCP_CONNS));
        loop {
            let (stream, src) = tokio::select! {
                r = listener.accept() => match r {
                    Ok(x) => x,
                    Err(e) => {
                        tracing::debug!(error = %e, "DNS stub accept");
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    }
                },
                () = &mut stop => return,
            };
            let Ok(permit) = conns.clone().try_acquire_owned() else {
                DnsStats::inc(&self.stats.overload);
                continue;
            };
            let stub = self.clone();
            tokio::spawn(async move {
                let _ = stub.tcp_conn(stream, src).await;
                drop(permit);
            });
        }
    }

    async fn tcp_conn(&self, mut s: TcpStream, src: SocketAddr) -> io::Result<()> {
        let local = s.local_addr().ok().map(|a| a.ip());
        loop {
            let len = match tokio::time::timeout(TCP_IDLE, s.read_u16()).await {
                Ok(Ok(n)) => usize::from(n),
                _ => return Ok(()),
            };
            let mut msg = vec![0u8; len];
            tokio::time::timeout(TCP_IDLE, s.read_exact(&mut msg))
                .await
                .map_err(|_| io::Error::from(io::ErrorKind::TimedOut))??;
            let Some(out) = self.handle(&msg, src, local, true).await else {
                return Ok(());
            };
            let n = u16::try_from(out.len()).map_err(|_| io::Error::other("answer too long"))?;
            let mut framed = Vec::with_capacity(out.len() + 2);
            framed.extend_from_slice(&n.to_be_bytes());
            framed.extend_from_slice(&out);
            s.write_all(&framed).await?;
        }
    }
}

async fn exchange_udp(
    to: SocketAddr,
    query: &Message,
    bytes: &[u8],
) -> Result<Message, ForwardError> {
    let io_err = |e| ForwardError::Io(to, e);
    let bind: SocketAddr = if to.is_ipv4() {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let sock = UdpSocket::bind(bind).await.map_err(io_err)?;
    sock.connect(to).await.map_err(io_err)?;
    sock.send(bytes).await.map_err(io_err)?;
    let mut buf = vec![0u8; usize::from(dns::EDNS_PAYLOAD).max(4096)];
    loop {
        let n = sock.recv(&mut buf).await.map_err(io_err)?;
        if let Ok(m) = Message::from_vec(&buf[..n]) {
            if dns::answers_query(query, &m) {
                return Ok(m);
            }
        }
    }
}

async fn exchange_tcp(
    to: SocketAddr,
    query: &Message,
    bytes: &[u8],
) -> Result<Message, ForwardError> {
    let io_err = |e| ForwardError::Io(to, e);
    let mut s = TcpStream::connect(to).await.map_err(io_err)?;
    let n = u16::try_from(bytes.len())
        .map_err(|_| ForwardError::BadAnswer(to, "query too long".into()))?;
    let mut framed = Vec::with_capacity(bytes.len() + 2);
    framed.extend_from_slice(&n.to_be_bytes());
    framed.extend_from_slice(bytes);
    s.write_all(&framed).await.map_err(io_err)?;
    let len = s.read_u16().await.map_err(io_err)?;
    let mut buf = vec![0u8; usize::from(len)];
    s.read_exact(&mut buf).await.map_err(io_err)?;
    let m = Message::from_vec(&buf).map_err(|e| ForwardError::BadAnswer(to, e.to_string()))?;
    if !dns::answers_query(query, &m) {
        return Err(ForwardError::BadAnswer(
            to,
            "ID or question does not match".into(),
        ));
    }
    Ok(m)
}

/// Completes when `rx` turns true (or its sender is gone).
pub async fn stopped(mut rx: watch::Receiver<bool>) {
    let _ = rx.wait_for(|v| *v).await;
}

/// Binds the stub's UDP socket and TCP listener on `addr`.
pub async fn bind(addr: SocketAddr) -> io::Result<(UdpSocket, TcpListener)> {
    let udp = UdpSocket::bind(addr).await?;
    let tcp = TcpListener::bind(addr).await?;
    Ok((udp, tcp))
}
