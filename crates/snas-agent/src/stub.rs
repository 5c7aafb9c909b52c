//! The per-job DNS stub: one UDP socket and one TCP listener for every job on the node.
//!
//! Tier 1 rewrites every DNS packet a sandbox sends (UDP/TCP 53, TCP 853, to any address) to
//! its job's gateway address and port 53, so one socket bound to `dns_listen:53` (default
//! `0.0.0.0`) serves all jobs; the job is identified by the query's source address (tier 1 drops
//! spoofed sources). Per query, in order ([`crate::dns`] and [`crate::dns_cache`] decide, this
//! module does the I/O):
//! 1. unparsable or a response → dropped; not a job's sandbox → REFUSED;
//! 2. the job's policy has expired → REFUSED, audited `policy_expired`;
//! 3. not a single A/AAAA/CNAME question → REFUSED, audited `dns_qtype`;
//! 4. no allow rule leaves the name a port → REFUSED, audited `dns_refused`; deny rules take
//!    every port it had → REFUSED, audited `deny_rule` with the deny rule's index (audit mode:
//!    every other name goes on, see step 10);
//! 5. AAAA while the job's network has no IPv6 route → NOERROR without records (NODATA), at
//!    once;
//! 6. in the job's answer cache → answered from it with the remaining TTL;
//! 7. more than `dns_max_inflight_per_job` of the job's queries at proxies → REFUSED, audited
//!    `dns_inflight`;
//! 8. the job's upstream budget (`dns_queries_per_sec`, `dns_query_burst`) is empty → REFUSED,
//!    audited `dns_rate` (this is what bounds tunnelling through random subdomains of a
//!    wildcard: only names that are not cached cost budget);
//! 9. forwarded with the job's identity (EDNS option 65053) to the proxies in
//!    [`crate::proxies::ProxyTable::dns_order`] order, [`FORWARD_TIMEOUT`] each, over UDP, then
//!    TCP to the same proxy if the answer is truncated;
//! 10. each A/AAAA answer is installed into tier 1 with the ports the matching rules leave after
//!     the deny rules, for [`crate::dns::binding_lifetime`] of its TTL (the clamped TTL plus the
//!     grace both tiers apply) — BEFORE the answer is relayed, so the first connection is never
//!     dropped; if tier 1 cannot be programmed the sandbox gets SERVFAIL. A name audit mode lets
//!     through (no rule allows it) is bound nowhere: tier 1's audit flag passes public
//!     addresses, and its answer is audited `would_deny` with the addresses it returned;
//! 11. the answer is kept in the cache if cacheable, relayed (the sandbox's ID and question;
//!     truncated if it exceeds the sandbox's UDP size) and audited `allowed` (or `would_deny`).
//!
//! Steps 1–8 are decided inline by the receiving loop (no task, no allocation beyond the answer);
//! only a forward (step 9 on) runs as its own task.
//!
//! # Quotas (one job cannot take what other tenants share)
//! - Forwards: `dns_max_inflight_per_job` per job over UDP and TCP together; they are the only
//!   queries that wait, so this also bounds the job's share of the node-wide [`MAX_UDP_TASKS`].
//! - TCP connections: `dns_max_tcp_connections_per_job` per job (sources that are no job's
//!   sandbox share one such share); beyond it a connection is closed at once, counted and
//!   audited `dns_tcp_limit`. Node-wide at most [`MAX_TCP_CONNS`]; each is closed after
//!   [`TCP_IDLE`] without a query.
//! - Cached answers and refusals cost no budget; what bounds them is tier 1's per-job DNS packet
//!   budget (`dns_packets_per_sec`), which drops a job's excess before it reaches the socket.
//!   The UDP socket gets a [`UDP_RECV_BUFFER`] receive buffer for bursts.
//! - Refusals are audited at most [`REFUSAL_AUDIT_PER_SEC`] per job and second; the rest are
//!   counted and the next line carries how many were left out (`suppressed`). The audit queue
//!   is bounded too (see [`crate::audit`]). Cache hits and local NODATA answers are counted, not
//!   audited (the name's decision was audited when it was forwarded).
//!
//! # Stopping
//! The serving loops stop on their shutdown signal without closing the sockets' other handles:
//! queries that arrive meanwhile wait in the socket for whoever reads next (the agent's restart
//! hands the sockets over, see `docs/agent.md`). Forwards in progress still answer; TCP
//! connections close after the query they are in. [`DnsStub::drain`] waits for both.

use snas_wire::{JobKey, PolicySerial};
use std::collections::{BTreeMap, HashMap};
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use hickory_proto::op::{Message, MessageType, ResponseCode};
use hickory_proto::rr::{RData, RecordType};
use snas_policy::Matcher;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::{watch, Semaphore};

pub use crate::api::types::DnsView;
use crate::audit::{rfc3339, Action, AuditRecord, AuditSink};
use crate::dns::{self, Question, Refusal, TokenBucket};
use crate::dns_cache::{CacheLimits, CachedAnswer, DnsCache};
use crate::naming::job_key_hex;
use crate::proxies::Proxies;
use crate::seams::{Dataplane, VerifiedPolicy};
use crate::shutdown::stopped;

/// Time to wait for one proxy's answer before trying the next.
pub const FORWARD_TIMEOUT: Duration = Duration::from_secs(1);
/// Forwards of UDP queries in progress, node-wide (beyond: dropped and counted `overload`).
pub const MAX_UDP_TASKS: usize = 8192;
/// TCP connections open at once, node-wide (beyond: closed and counted `overload`).
pub const MAX_TCP_CONNS: usize = 4096;
/// A TCP connection with no query for this long is closed.
pub const TCP_IDLE: Duration = Duration::from_secs(10);
/// Receive buffer of the UDP socket: about 8 000 small queries queue here while the stub is
/// busy, or while a restarting agent hands the socket over.
pub const UDP_RECV_BUFFER: usize = 8 * 1024 * 1024;

/// A job as the stub needs it, found by its sandbox address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JobEntry {
    /// Job key.
    pub job_key: JobKey,
    /// Policy serial.
    pub serial: PolicySerial,
    /// The policy's `exp` has passed.
    pub expired: bool,
    /// The job's network routes IPv6 (else AAAA queries are answered NODATA at once).
    pub ipv6_route: bool,
}

/// Finds jobs by sandbox address (implemented by [`crate::Agent`]).
pub trait JobDirectory: Send + Sync + 'static {
    /// The job whose sandbox has address `ip`. Called per query: must be cheap.
    fn job_at(&self, ip: IpAddr) -> Option<JobEntry>;
    /// The job's verified policy (with claims); called when a job or serial is first seen.
    fn policy(&self, job_key: JobKey) -> Option<VerifiedPolicy>;
    /// Whether the job exists (called once a second per job the stub holds state for).
    fn contains(&self, job_key: JobKey) -> bool {
        self.policy(job_key).is_some()
    }
    /// `name` was installed into tier 1 as `ip` with `rules` for `lifetime`, under the job's
    /// policy `serial` (so that a live update can withdraw it, see [`crate::bindings`]).
    /// Called on a blocking thread, right after the install. The default does nothing.
    fn bound(
        &self,
        job_key: JobKey,
        serial: PolicySerial,
        name: &str,
        ip: IpAddr,
        rules: &[snas_bpf::PortRule],
        lifetime: Duration,
    ) {
        let _ = (job_key, serial, name, ip, rules, lifetime);
    }
}

/// The stub's limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StubConfig {
    /// Per-job upstream queries per second (names not in the cache).
    pub queries_per_sec: u32,
    /// Per-job upstream burst.
    pub burst: u32,
    /// Per-job outstanding forwarded queries (UDP and TCP together).
    pub max_inflight: u32,
    /// Per-job TCP connections.
    pub max_tcp_per_job: u32,
    /// Per-proxy forward timeout.
    pub forward_timeout: Duration,
    /// Answer cache bounds.
    pub cache: CacheLimits,
}

impl StubConfig {
    /// The limits from `agent.toml`.
    pub fn from_agent(c: &crate::AgentConfig) -> StubConfig {
        StubConfig {
            queries_per_sec: c.dns_queries_per_sec,
            burst: c.dns_query_burst,
            max_inflight: c.dns_max_inflight_per_job,
            max_tcp_per_job: c.dns_max_tcp_connections_per_job,
            forward_timeout: FORWARD_TIMEOUT,
            cache: CacheLimits::default(),
        }
    }
}

const REFUSALS: [Refusal; 8] = [
    Refusal::UnknownJob,
    Refusal::Rate,
    Refusal::InFlight,
    Refusal::QueryType,
    Refusal::Name,
    Refusal::DenyRule,
    Refusal::Expired,
    Refusal::TcpConnections,
];

fn refusal_slot(r: Refusal) -> usize {
    REFUSALS.iter().position(|x| *x == r).unwrap_or(0)
}

/// Counters of the stub's outcomes.
#[derive(Debug, Default)]
pub struct DnsStats {
    queries: AtomicU64,
    malformed: AtomicU64,
    overload: AtomicU64,
    refused: [AtomicU64; REFUSALS.len()],
    forwarded: AtomicU64,
    cached: AtomicU64,
    aaaa_nodata: AtomicU64,
    noerror: AtomicU64,
    nxdomain: AtomicU64,
    other_rcode: AtomicU64,
    servfail: AtomicU64,
    proxy_failures: AtomicU64,
    installed: AtomicU64,
    audit_suppressed: AtomicU64,
    send_failures: AtomicU64,
}

fn inc(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

fn get(c: &AtomicU64) -> u64 {
    c.load(Ordering::Relaxed)
}

impl DnsStats {
    /// Query outcomes by label (`refused_<reason>`, `noerror`, `nxdomain`, `servfail`,
    /// `cached`, `aaaa_nodata`, ...). Every parsed query is counted under exactly one label,
    /// except `forwarded` ones, which are counted under the rcode of their answer.
    pub fn outcomes(&self) -> BTreeMap<String, u64> {
        let mut m = BTreeMap::new();
        for r in REFUSALS {
            m.insert(
                format!("refused_{}", r.name()),
                get(&self.refused[refusal_slot(r)]),
            );
        }
        for (k, c) in [
            ("malformed", &self.malformed),
            ("overload", &self.overload),
            ("cached", &self.cached),
            ("aaaa_nodata", &self.aaaa_nodata),
            ("noerror", &self.noerror),
            ("nxdomain", &self.nxdomain),
            ("other_rcode", &self.other_rcode),
            ("servfail", &self.servfail),
        ] {
            m.insert(k.to_owned(), get(c));
        }
        m
    }

    /// Refusal audit lines left out by the per-job audit limit.
    pub fn audit_suppressed(&self) -> u64 {
        get(&self.audit_suppressed)
    }
}

struct JobSlot {
    serial: PolicySerial,
    policy: Arc<VerifiedPolicy>,
    matcher: Arc<Matcher>,
    /// Upstream queries (names not in the cache).
    bucket: TokenBucket,
    inflight: u32,
    tcp_conns: u32,
    /// Refusal audit lines: at most [`REFUSAL_AUDIT_PER_SEC`] per job.
    audit_bucket: TokenBucket,
    /// Refusals not audited since the last refusal line.
    suppressed: u64,
}

#[derive(Default)]
struct State {
    jobs: HashMap<JobKey, JobSlot>,
    cache: DnsCache,
    /// TCP connections from sources that are no job's sandbox.
    tcp_unknown: u32,
}

/// Refusal audit lines per job and second (burst twice that); the rest are counted and the next
/// line carries the count (`suppressed`), so a flooding job cannot fill the disk.
pub const REFUSAL_AUDIT_PER_SEC: u32 = 10;

/// A monotonic clock: time since some fixed start.
pub type MonoClock = Arc<dyn Fn() -> Duration + Send + Sync>;

/// The DNS stub (shared by the UDP and TCP servers).
pub struct DnsStub {
    dir: Arc<dyn JobDirectory>,
    dataplane: Arc<dyn Dataplane>,
    proxies: Arc<Proxies>,
    audit: AuditSink,
    cfg: StubConfig,
    state: Arc<Mutex<State>>,
    clock: MonoClock,
    stats: DnsStats,
    udp_tasks: Arc<Semaphore>,
    tcp_conns: Arc<Semaphore>,
}

impl std::fmt::Debug for DnsStub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DnsStub").field("cfg", &self.cfg).finish()
    }
}

fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    state.lock().unwrap_or_else(|p| p.into_inner())
}

/// A job's forward in progress; the slot is given back when dropped.
struct InflightGuard {
    state: Arc<Mutex<State>>,
    job_key: JobKey,
}

impl Drop for InflightGuard {
    fn drop(&mut self) {
        if let Some(s) = lock(&self.state).jobs.get_mut(&self.job_key) {
            s.inflight = s.inflight.saturating_sub(1);
        }
    }
}

/// A job's TCP connection; the slot is given back when dropped.
struct TcpGuard {
    state: Arc<Mutex<State>>,
    job_key: Option<JobKey>,
}

impl Drop for TcpGuard {
    fn drop(&mut self) {
        let mut st = lock(&self.state);
        match self.job_key {
            Some(k) => {
                if let Some(s) = st.jobs.get_mut(&k) {
                    s.tcp_conns = s.tcp_conns.saturating_sub(1);
                }
            }
            None => st.tcp_unknown = st.tcp_unknown.saturating_sub(1),
        }
    }
}

/// A query that goes to a proxy.
struct Pending {
    query: Message,
    question: Question,
    named: dns::NameDecision,
    policy: Arc<VerifiedPolicy>,
    src: SocketAddr,
    local: Option<IpAddr>,
    tcp: bool,
    len: usize,
    _inflight: InflightGuard,
}

/// What to do with one received message.
enum Step {
    /// Send these bytes back.
    Reply(Vec<u8>),
    /// Send nothing.
    Silent,
    /// Forward, then answer.
    Forward(Box<Pending>),
}

/// What the locked part of [`DnsStub::decide`] concluded.
enum Verdict {
    Refuse {
        why: Refusal,
        question: Option<Question>,
        /// The deny rule that refused the name, if one did.
        rule: Option<usize>,
        /// `Some(n)`: audit the refusal, with `n` refusals left out before it.
        audit: Option<u64>,
        policy: Arc<VerifiedPolicy>,
    },
    NoData,
    Cached(CachedAnswer),
    Forward {
        question: Question,
        named: dns::NameDecision,
        policy: Arc<VerifiedPolicy>,
        inflight: InflightGuard,
    },
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

/// Takes a refusal audit slot of the job: `Some(n)` = audit, with `n` refusals suppressed before.
fn audit_slot(slot: &mut JobSlot, now: Duration, stats: &DnsStats) -> Option<u64> {
    if slot.audit_bucket.take(now) {
        Some(std::mem::take(&mut slot.suppressed))
    } else {
        slot.suppressed += 1;
        inc(&stats.audit_suppressed);
        None
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
        let epoch = Instant::now();
        DnsStub {
            dir,
            dataplane,
            proxies,
            audit,
            cfg,
            state: Arc::new(Mutex::new(State {
                cache: DnsCache::new(cfg.cache),
                ..State::default()
            })),
            clock: Arc::new(move || epoch.elapsed()),
            stats: DnsStats::default(),
            udp_tasks: Arc::new(Semaphore::new(MAX_UDP_TASKS)),
            tcp_conns: Arc::new(Semaphore::new(MAX_TCP_CONNS)),
        }
    }

    /// The same stub with another monotonic clock (token buckets, cache lifetimes).
    pub fn with_clock(mut self, clock: MonoClock) -> DnsStub {
        self.clock = clock;
        self
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }

    /// The stub's counters.
    pub fn stats(&self) -> &DnsStats {
        &self.stats
    }

    /// The JSON view.
    pub fn view(&self) -> DnsView {
        let s = &self.stats;
        let (jobs, cache) = {
            let st = self.lock();
            (st.jobs.len(), st.cache.stats())
        };
        DnsView {
            queries: get(&s.queries),
            forwarded: get(&s.forwarded),
            cached: get(&s.cached),
            proxy_failures: get(&s.proxy_failures),
            installed_addrs: get(&s.installed),
            audit_suppressed: get(&s.audit_suppressed),
            send_failures: get(&s.send_failures),
            outcomes: s.outcomes(),
            jobs,
            cache_entries: cache.entries,
            cache_bytes: cache.bytes,
            cache_evictions: cache.evictions,
            tcp_connections: MAX_TCP_CONNS - self.tcp_conns.available_permits(),
        }
    }

    /// Forgets a job (deleted): its budget, counters and cache entries.
    pub fn forget(&self, job_key: JobKey) {
        let mut st = self.lock();
        st.jobs.remove(&job_key);
        st.cache.forget_job(job_key);
    }

    /// Forgets every job the directory no longer has.
    pub fn forget_gone(&self) {
        let held: std::collections::BTreeSet<JobKey> = {
            let st = self.lock();
            st.jobs.keys().copied().chain(st.cache.jobs()).collect()
        };
        for k in held {
            if !self.dir.contains(k) {
                self.forget(k);
            }
        }
    }

    /// Makes sure the stub holds the job's current policy (new job, or a new serial: the
    /// names it may resolve changed, so its cache goes). False if the job vanished.
    fn refresh_job(&self, e: &JobEntry) -> bool {
        if self
            .lock()
            .jobs
            .get(&e.job_key)
            .is_some_and(|s| s.serial == e.serial)
        {
            return true;
        }
        let Some(policy) = self.dir.policy(e.job_key) else {
            return false;
        };
        // A policy without claims has no rules: every name is refused.
        let matcher = Arc::new(match &policy.claims {
            Some(c) => snas_policy::compile(c),
            None => snas_policy::matcher::compile_rules(&[], &[]),
        });
        let now = (self.clock)();
        let mut st = self.lock();
        let st = &mut *st;
        st.cache.forget_job(e.job_key);
        match st.jobs.get_mut(&e.job_key) {
            Some(s) => {
                s.serial = policy.serial;
                s.policy = Arc::new(policy);
                s.matcher = matcher;
            }
            None => {
                st.jobs.insert(
                    e.job_key,
                    JobSlot {
                        serial: policy.serial,
                        policy: Arc::new(policy),
                        matcher,
                        bucket: TokenBucket::new(self.cfg.queries_per_sec, self.cfg.burst, now),
                        inflight: 0,
                        tcp_conns: 0,
                        audit_bucket: TokenBucket::new(
                            REFUSAL_AUDIT_PER_SEC,
                            2 * REFUSAL_AUDIT_PER_SEC,
                            now,
                        ),
                        suppressed: 0,
                    },
                );
            }
        }
        true
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
            kind: Some(snas_policy::audit::Kind::Dns),
            action,
            tenant: policy.tenant.clone(),
            job: policy.job.clone(),
            job_key: policy.job_key,
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

    fn refuse(&self, query: &Message, why: Refusal) -> Step {
        inc(&self.stats.refused[refusal_slot(why)]);
        reply(dns::empty_answer(query, ResponseCode::Refused), query, true)
    }

    fn servfail(&self, query: &Message) -> Option<Vec<u8>> {
        inc(&self.stats.servfail);
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
        match self.decide(bytes, src, local, tcp) {
            Step::Reply(out) => Some(out),
            Step::Silent => None,
            Step::Forward(p) => self.complete(*p).await,
        }
    }

    /// Everything that is decided without waiting: steps 1–8 of the module doc.
    fn decide(&self, bytes: &[u8], src: SocketAddr, local: Option<IpAddr>, tcp: bool) -> Step {
        let Ok(query) = Message::from_vec(bytes) else {
            inc(&self.stats.malformed);
            return Step::Silent;
        };
        if query.message_type() != MessageType::Query {
            inc(&self.stats.malformed);
            return Step::Silent;
        }
        inc(&self.stats.queries);
        let Some(entry) = self.dir.job_at(canonical(src.ip())) else {
            return self.refuse(&query, Refusal::UnknownJob);
        };
        if !self.refresh_job(&entry) {
            return self.refuse(&query, Refusal::UnknownJob);
        }
        let now = (self.clock)();
        let verdict = {
            let mut guard = self.lock();
            let State { jobs, cache, .. } = &mut *guard;
            let Some(slot) = jobs.get_mut(&entry.job_key) else {
                return self.refuse(&query, Refusal::UnknownJob);
            };
            self.verdict(slot, cache, &entry, &query, now)
        };
        match verdict {
            Verdict::Refuse {
                why,
                question,
                rule,
                audit,
                policy,
            } => {
                if let Some(suppressed) = audit {
                    self.audit(
                        &policy,
                        Action::Refuse,
                        why.name(),
                        src,
                        local,
                        tcp,
                        question.as_ref(),
                        rule,
                        Vec::new(),
                        bytes.len(),
                        suppressed,
                    );
                }
                self.refuse(&query, why)
            }
            Verdict::NoData => {
                inc(&self.stats.aaaa_nodata);
                reply(
                    dns::empty_answer(&query, ResponseCode::NoError),
                    &query,
                    tcp,
                )
            }
            Verdict::Cached(hit) => {
                inc(&self.stats.cached);
                reply(crate::dns_cache::cached_answer(&query, hit), &query, tcp)
            }
            Verdict::Forward {
                question,
                named,
                policy,
                inflight,
            } => Step::Forward(Box::new(Pending {
                query,
                question,
                named,
                policy,
                src,
                local,
                tcp,
                len: bytes.len(),
                _inflight: inflight,
            })),
        }
    }

    /// The decision for one query of a job, under the stub's lock.
    fn verdict(
        &self,
        slot: &mut JobSlot,
        cache: &mut DnsCache,
        entry: &JobEntry,
        query: &Message,
        now: Duration,
    ) -> Verdict {
        let refuse_rule = |slot: &mut JobSlot,
                           why: Refusal,
                           question: Option<Question>,
                           rule: Option<usize>| Verdict::Refuse {
            why,
            question,
            rule,
            audit: audit_slot(slot, now, &self.stats),
            policy: slot.policy.clone(),
        };
        let refuse = |slot: &mut JobSlot, why: Refusal, question: Option<Question>| {
            refuse_rule(slot, why, question, None)
        };
        let shape = dns::question_of(query);
        if entry.expired {
            return refuse(slot, Refusal::Expired, shape.ok());
        }
        let question = match shape {
            Ok(q) => q,
            Err((why, q)) => return refuse(slot, why, q),
        };
        let named = match dns::name_decision(&slot.matcher, &question.name) {
            Ok(n) => n,
            Err((why, rule)) => return refuse_rule(slot, why, Some(question), rule),
        };
        if question.qtype == RecordType::AAAA && !entry.ipv6_route {
            return Verdict::NoData;
        }
        if let Some(hit) = cache.lookup(entry.job_key, &question, now) {
            return Verdict::Cached(hit);
        }
        if slot.inflight >= self.cfg.max_inflight {
            return refuse(slot, Refusal::InFlight, Some(question));
        }
        if !slot.bucket.take(now) {
            return refuse(slot, Refusal::Rate, Some(question));
        }
        slot.inflight += 1;
        Verdict::Forward {
            question,
            named,
            policy: slot.policy.clone(),
            inflight: InflightGuard {
                state: self.state.clone(),
                job_key: entry.job_key,
            },
        }
    }

    /// Forwards, installs, caches, audits and relays: steps 9–11 of the module doc.
    async fn complete(&self, p: Pending) -> Option<Vec<u8>> {
        let policy = &p.policy;
        let job_key = policy.job_key;
        let id: u16 = rand::random();
        let fq = dns::forward_query(&p.query, id, policy.tenant_id, job_key, policy.serial);
        inc(&self.stats.forwarded);
        let Some(answer) = self.forward(&fq, self.proxies.resolvers_for(job_key)).await else {
            return self.servfail(&p.query);
        };
        let mut installed = Vec::new();
        let would_deny = p.named.would_deny;
        if answer.response_code() == ResponseCode::NoError {
            let ports = p.named.ports.clone();
            let addrs: Vec<(IpAddr, Duration)> = answer
                .answers()
                .iter()
                .filter_map(|r| match r.data() {
                    RData::A(a) => Some((IpAddr::V4(a.0), dns::binding_lifetime(r.ttl()))),
                    RData::AAAA(a) => Some((IpAddr::V6(a.0), dns::binding_lifetime(r.ttl()))),
                    _ => None,
                })
                .collect();
            if would_deny.is_some() {
                // Audit mode, no rule allows the name: nothing is bound; the line names the
                // addresses the job was given, and the agent remembers the name (no ports) so
                // that tier 1's `would_deny` lines for them carry it.
                for (ip, lifetime) in &addrs {
                    self.dir.bound(
                        job_key,
                        policy.serial,
                        &p.question.name,
                        *ip,
                        &[],
                        *lifetime,
                    );
                }
                installed = addrs.into_iter().map(|(ip, _)| ip).collect();
            } else if !addrs.is_empty() {
                let dp = self.dataplane.clone();
                let to_install = addrs.clone();
                let (dir, name, serial) =
                    (self.dir.clone(), p.question.name.clone(), policy.serial);
                let res = tokio::task::spawn_blocking(move || {
                    for (ip, lifetime) in &to_install {
                        dp.allow_resolved(job_key, *ip, &ports, *lifetime)?;
                        dir.bound(job_key, serial, &name, *ip, &ports, *lifetime);
                    }
                    Ok::<(), crate::seams::DataplaneError>(())
                })
                .await;
                match res {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => {
                        tracing::warn!(job = %job_key_hex(job_key), error = %e, "DNS answer not installed");
                        return self.servfail(&p.query);
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "DNS install task failed");
                        return self.servfail(&p.query);
                    }
                }
                self.stats
                    .installed
                    .fetch_add(addrs.len() as u64, Ordering::Relaxed);
                installed = addrs.into_iter().map(|(ip, _)| ip).collect();
            }
        }
        let rcode = answer.response_code();
        inc(match rcode {
            ResponseCode::NoError => &self.stats.noerror,
            ResponseCode::NXDomain => &self.stats.nxdomain,
            ResponseCode::ServFail => &self.stats.servfail,
            _ => &self.stats.other_rcode,
        });
        let (action, reason) = match would_deny {
            Some(r) => (Action::WouldDeny, r.reason().name().to_owned()),
            None if rcode == ResponseCode::NoError => (Action::Allow, "allowed".to_owned()),
            None => (Action::Allow, rcode.to_string().to_ascii_lowercase()),
        };
        self.audit(
            policy,
            action,
            &reason,
            p.src,
            p.local,
            p.tcp,
            Some(&p.question),
            p.named.rules.first().copied(),
            installed,
            p.len,
            0,
        );
        let relayed = dns::relay_answer(&p.query, answer);
        let out = relayed.to_vec().ok()?;
        // Cached from now: tier 1 holds the addresses for the clamped TTL plus the grace from
        // their install, which was earlier, so the cache never outlives tier 1.
        let now = (self.clock)();
        self.lock()
            .cache
            .insert(JobKey(job_key.get()), &p.question, &relayed, out.len(), now);
        match fit_udp(out, &relayed, &p.query, p.tcp) {
            Step::Reply(b) => Some(b),
            _ => None,
        }
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
                    inc(&self.stats.proxy_failures);
                    tracing::debug!(error = %e, "DNS forward failed; trying the next proxy");
                }
                Err(_) => {
                    inc(&self.stats.proxy_failures);
                    tracing::debug!(error = %ForwardError::Timeout(t), "DNS forward failed");
                }
            }
        }
        None
    }

    /// Serves UDP queries on `sock` until `shutdown` turns true. The socket (this handle) is
    /// dropped then; forwards in progress keep a handle until they have answered.
    pub async fn serve_udp(self: Arc<Self>, sock: UdpSocket, shutdown: watch::Receiver<bool>) {
        let stop = stopped(shutdown);
        tokio::pin!(stop);
        let sock = Arc::new(sock);
        let local = sock
            .local_addr()
            .ok()
            .map(|a| a.ip())
            .filter(|ip| !ip.is_unspecified());
        let mut buf = vec![0u8; 65_535];
        loop {
            let (n, src) = tokio::select! {
                biased;
                () = &mut stop => return,
                r = sock.recv_from(&mut buf) => match r {
                    Ok(x) => x,
                    Err(e) => {
                        tracing::debug!(error = %e, "DNS stub recv");
                        continue;
                    }
                },
            };
            match self.decide(&buf[..n], src, local, false) {
                Step::Reply(out) => {
                    if sock.try_send_to(&out, src).is_err() {
                        inc(&self.stats.send_failures);
                    }
                }
                Step::Silent => {}
                Step::Forward(p) => {
                    let Ok(permit) = self.udp_tasks.clone().try_acquire_owned() else {
                        inc(&self.stats.overload);
                        continue;
                    };
                    let (stub, sock) = (self.clone(), sock.clone());
                    tokio::spawn(async move {
                        if let Some(out) = stub.complete(*p).await {
                            if sock.send_to(&out, src).await.is_err() {
                                inc(&stub.stats.send_failures);
                            }
                        }
                        drop(permit);
                    });
                }
            }
        }
    }

    /// Takes a TCP connection slot for the source `src` (its job's share, or the share of
    /// sources that are no job's sandbox).
    fn tcp_slot(&self, src: SocketAddr, local: Option<IpAddr>) -> Option<TcpGuard> {
        let entry = self
            .dir
            .job_at(canonical(src.ip()))
            .filter(|e| self.refresh_job(e));
        let now = (self.clock)();
        let max = self.cfg.max_tcp_per_job;
        let refused = {
            let mut guard = self.lock();
            let st: &mut State = &mut guard;
            match entry.and_then(|e| st.jobs.get_mut(&e.job_key).map(|s| (e, s))) {
                Some((e, slot)) if slot.tcp_conns < max => {
                    slot.tcp_conns += 1;
                    return Some(TcpGuard {
                        state: self.state.clone(),
                        job_key: Some(e.job_key),
                    });
                }
                Some((_, slot)) => {
                    audit_slot(slot, now, &self.stats).map(|n| (slot.policy.clone(), n))
                }
                None if st.tcp_unknown < max => {
                    st.tcp_unknown += 1;
                    return Some(TcpGuard {
                        state: self.state.clone(),
                        job_key: None,
                    });
                }
                None => None,
            }
        };
        inc(&self.stats.refused[refusal_slot(Refusal::TcpConnections)]);
        if let Some((policy, suppressed)) = refused {
            self.audit(
                &policy,
                Action::Refuse,
                Refusal::TcpConnections.name(),
                src,
                local,
                true,
                None,
                None,
                Vec::new(),
                0,
                suppressed,
            );
        }
        None
    }

    /// Serves TCP (length-prefixed) queries on `listener` until `shutdown` turns true; then the
    /// listener (this handle) is dropped and open connections close after their current query.
    pub async fn serve_tcp(
        self: Arc<Self>,
        listener: TcpListener,
        shutdown: watch::Receiver<bool>,
    ) {
        let stop = stopped(shutdown.clone());
        tokio::pin!(stop);
        loop {
            let (stream, src) = tokio::select! {
                biased;
                () = &mut stop => return,
                r = listener.accept() => match r {
                    Ok(x) => x,
                    Err(e) => {
                        tracing::debug!(error = %e, "DNS stub accept");
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    }
                },
            };
            let Ok(permit) = self.tcp_conns.clone().try_acquire_owned() else {
                inc(&self.stats.overload);
                continue;
            };
            let local = stream.local_addr().ok().map(|a| a.ip());
            let Some(slot) = self.tcp_slot(src, local) else {
                continue;
            };
            let (stub, stop) = (self.clone(), shutdown.clone());
            tokio::spawn(async move {
                let _ = stub.tcp_conn(stream, src, local, stop).await;
                drop((slot, permit));
            });
        }
    }

    async fn tcp_conn(
        &self,
        mut s: TcpStream,
        src: SocketAddr,
        local: Option<IpAddr>,
        shutdown: watch::Receiver<bool>,
    ) -> io::Result<()> {
        let stop = stopped(shutdown);
        tokio::pin!(stop);
        loop {
            let len = tokio::select! {
                biased;
                () = &mut stop => return Ok(()),
                r = tokio::time::timeout(TCP_IDLE, s.read_u16()) => match r {
                    Ok(Ok(n)) => usize::from(n),
                    _ => return Ok(()),
                },
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

    /// Waits (at most `timeout`) until no forward and no TCP connection is in progress;
    /// returns whether they all finished. Call it after the serving loops have stopped.
    pub async fn drain(&self, timeout: Duration) -> bool {
        let all = async {
            let udp = self.udp_tasks.acquire_many(MAX_UDP_TASKS as u32).await;
            let tcp = self.tcp_conns.acquire_many(MAX_TCP_CONNS as u32).await;
            udp.is_ok() && tcp.is_ok()
        };
        tokio::time::timeout(timeout, all).await.unwrap_or(false)
    }
}

/// An answer to the sandbox as bytes.
fn reply(m: Message, query: &Message, tcp: bool) -> Step {
    match m.to_vec() {
        Ok(out) => fit_udp(out, &m, query, tcp),
        Err(_) => Step::Silent,
    }
}

/// `out` (the encoding of `m`), or an empty truncated answer if it exceeds the sandbox's UDP
/// size: the client retries over TCP (and finds it in the cache).
fn fit_udp(out: Vec<u8>, m: &Message, query: &Message, tcp: bool) -> Step {
    if tcp || out.len() <= dns::client_udp_limit(query) {
        return Step::Reply(out);
    }
    let mut t = dns::empty_answer(query, m.response_code());
    t.set_truncated(true);
    t.to_vec().map_or(Step::Silent, Step::Reply)
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

/// Gives a UDP socket the stub's receive buffer ([`UDP_RECV_BUFFER`]): `SO_RCVBUFFORCE` (root
/// may exceed `net.core.rmem_max`), else `SO_RCVBUF` (capped by the sysctl).
pub fn tune_udp(sock: &impl AsRawFd) -> io::Result<()> {
    let size = libc::c_int::try_from(UDP_RECV_BUFFER).unwrap_or(libc::c_int::MAX);
    let set = |opt: libc::c_int| {
        // SAFETY: a valid fd and a c_int option value of the right length.
        let rc = unsafe {
            libc::setsockopt(
                sock.as_raw_fd(),
                libc::SOL_SOCKET,
                opt,
                (&size as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    };
    set(libc::SO_RCVBUFFORCE).or_else(|_| set(libc::SO_RCVBUF))
}

/// Binds the stub's UDP socket (with its receive buffer) and TCP listener on `addr`.
pub async fn bind(addr: SocketAddr) -> io::Result<(UdpSocket, TcpListener)> {
    let udp = UdpSocket::bind(addr).await?;
    tune_udp(&udp)?;
    let tcp = TcpListener::bind(addr).await?;
    Ok((udp, tcp))
}
