//! The proxy fleet as this node sees it: health, draining, and who answers a job's DNS.
//!
//! Owns the proxy table ([`ProxyTable`], pure: probe outcomes in, changes out), the health
//! checker task ([`run_health_checks`]: `GET /healthz` on each proxy's control port), the
//! choice of resolver for a job ([`ProxyTable::dns_order`]), who may fetch policies
//! ([`Proxies::is_member`]) and the job-ended notice to every proxy
//! ([`announce_job_ended`]: `POST /v1/jobs/<job key>/ended` on the control port). On every
//! change the table is pushed to tier 1 (`Dataplane::set_proxies`), which rebuilds its Maglev
//! table; every address discovery adds is announced to [`Proxies::watch_members`] (tier 1's
//! infrastructure set includes every proxy).
//!
//! # Invariants
//! - Positions are stable: the proxy at index *i* of the configuration is index *i* in tier 1
//!   for the agent's whole life (dead proxies stay in place, marked dead), so pinned flows keep
//!   meaning the same proxy.
//! - A proxy is dead after [`FAILS_TO_DIE`] consecutive failed probes and alive again after one
//!   good one. `200` = alive, `503` = draining (alive: pinned flows stay; no new flows, not used
//!   for DNS while another proxy is available), anything else, a timeout or a refused
//!   connection = failure.
//! - Proxies start alive (as tier 1 is first loaded), so a starting agent does not blackhole
//!   traffic for the first probe rounds.
//!
//! # Limits
//! - Only IPv4 proxies (the underlay is IPv4); IPv6 entries in `proxies` are ignored.
//! - Discovery by DNS ([`run_discovery`], `proxy_service` at `proxy_service_dns` every
//!   [`DISCOVERY_INTERVAL`]): new addresses are appended (positions never move), vanished ones
//!   are unlisted (dead to tier 1) in place, so the table holds every proxy ever seen, up to
//!   `MAX_PROXIES` (64). A failed lookup keeps the current set.
//! - Probes and notices go through the proxy's typed client (`snas_proxy::api::ProxyClient`):
//!   one connection per call.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use snas_bpf::ProxyEntry;
use snas_proxy::api::{ProxyClient, ProxyHealth};
use snas_wire::JobKey;

pub use crate::api::types::{Health, ProxyStatus};
use crate::seams::Dataplane;

/// Consecutive failed probes after which a proxy is dead.
pub const FAILS_TO_DIE: u32 = 2;
/// Time between probe rounds.
pub const PROBE_INTERVAL: Duration = Duration::from_millis(500);
/// Time one probe may take.
pub const PROBE_TIMEOUT: Duration = Duration::from_millis(300);

/// What one probe saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Probe {
    /// `200`.
    Ok,
    /// `503`.
    Draining,
    /// Anything else.
    Failed,
}

/// The proxy table (pure).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyTable {
    proxies: Vec<ProxyStatus>,
    changes: u64,
}

impl ProxyTable {
    /// All proxies alive, in the given order.
    pub fn new(ips: &[Ipv4Addr]) -> ProxyTable {
        ProxyTable {
            proxies: ips
                .iter()
                .enumerate()
                .map(|(index, ip)| ProxyStatus {
                    index,
                    ip: *ip,
                    health: Health::Alive,
                    failures: 0,
                    probes_ok: 0,
                    probes_failed: 0,
                    discovered: false,
                    listed: true,
                })
                .collect(),
            changes: 0,
        }
    }

    /// Applies a discovery answer: new addresses are appended (alive, positions of the others
    /// unchanged; at most `MAX_PROXIES` in all), discovered proxies missing from `found` are
    /// unlisted, listed again when they reappear. Static proxies are never unlisted. True if
    /// tier 1's view changed.
    pub fn reconcile(&mut self, found: &[Ipv4Addr]) -> bool {
        let mut changed = false;
        for p in self.proxies.iter_mut().filter(|p| p.discovered) {
            let listed = found.contains(&p.ip);
            if listed != p.listed {
                p.listed = listed;
                if listed {
                    // Back in the service: trust it until probes say otherwise.
                    p.health = Health::Alive;
                    p.failures = 0;
                }
                changed = true;
            }
        }
        for ip in found {
            if self.proxies.iter().any(|p| p.ip == *ip) {
                continue;
            }
            if self.proxies.len() >= snas_bpf::tier1::MAX_PROXIES {
                tracing::warn!(%ip, "proxy table full; discovered proxy ignored");
                continue;
            }
            self.proxies.push(ProxyStatus {
                index: self.proxies.len(),
                ip: *ip,
                health: Health::Alive,
                failures: 0,
                probes_ok: 0,
                probes_failed: 0,
                discovered: true,
                listed: true,
            });
            changed = true;
        }
        if changed {
            self.changes += 1;
        }
        changed
    }

    /// Applies one probe result; true if the proxy's health changed.
    pub fn observe(&mut self, index: usize, probe: Probe) -> bool {
        let Some(p) = self.proxies.get_mut(index) else {
            return false;
        };
        let before = p.health;
        match probe {
            Probe::Ok | Probe::Draining => {
                p.failures = 0;
                p.probes_ok += 1;
                p.health = if probe == Probe::Ok {
                    Health::Alive
                } else {
                    Health::Draining
                };
            }
            Probe::Failed => {
                p.failures = p.failures.saturating_add(1);
                p.probes_failed += 1;
                if p.failures >= FAILS_TO_DIE {
                    p.health = Health::Dead;
                }
            }
        }
        let changed = before != p.health;
        if changed {
            self.changes += 1;
        }
        changed
    }

    /// The proxies in position order.
    pub fn statuses(&self) -> &[ProxyStatus] {
        &self.proxies
    }

    /// Every address in the table, listed or not, in position order.
    pub fn addresses(&self) -> Vec<Ipv4Addr> {
        self.proxies.iter().map(|p| p.ip).collect()
    }

    /// Health changes so far.
    pub fn changes(&self) -> u64 {
        self.changes
    }

    /// Tier 1's view: same positions, alive = not dead, draining flag.
    pub fn entries(&self) -> Vec<ProxyEntry> {
        self.proxies
            .iter()
            .map(|p| ProxyEntry {
                ip: p.ip,
                alive: p.listed && p.health != Health::Dead,
                draining: p.health == Health::Draining,
            })
            .collect()
    }

    /// The proxies to ask for `job_key`'s DNS, best first: alive ones by rendezvous hash of the
    /// job key (a job keeps its resolver while the set is unchanged, and only jobs of a proxy
    /// that dies move), then draining ones, then dead ones (a last resort: a probe may be stale).
    pub fn dns_order(&self, job_key: JobKey) -> Vec<Ipv4Addr> {
        let rank = |h: Health| match h {
            Health::Alive => 0u8,
            Health::Draining => 1,
            Health::Dead => 2,
        };
        let mut v: Vec<(u8, u64, Ipv4Addr)> = self
            .proxies
            .iter()
            .filter(|p| p.listed)
            .map(|p| (rank(p.health), u64::MAX - rendezvous(job_key, p.ip), p.ip))
            .collect();
        v.sort_unstable();
        v.into_iter().map(|(_, _, ip)| ip).collect()
    }
}

/// Rendezvous (highest random weight) score of (job, proxy): splitmix64 of both.
fn rendezvous(job_key: JobKey, ip: Ipv4Addr) -> u64 {
    let mut z = job_key.get() ^ (u64::from(u32::from(ip))).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The shared proxy table plus the ports to reach each proxy.
#[derive(Debug)]
pub struct Proxies {
    table: RwLock<ProxyTable>,
    push: tokio::sync::Mutex<()>,
    /// Every proxy address ever in the table (discovery only appends).
    members: tokio::sync::watch::Sender<Vec<Ipv4Addr>>,
    /// Port of `GET /healthz`.
    pub control_port: u16,
    /// Port of the DNS resolver.
    pub resolver_port: u16,
}

impl Proxies {
    /// A table of `ips`, all alive.
    pub fn new(ips: &[Ipv4Addr], control_port: u16, resolver_port: u16) -> Proxies {
        let table = ProxyTable::new(ips);
        Proxies {
            members: tokio::sync::watch::Sender::new(table.addresses()),
            table: RwLock::new(table),
            push: tokio::sync::Mutex::new(()),
            control_port,
            resolver_port,
        }
    }

    /// Whether `ip` is a proxy of the current set: configured, or discovered and still listed.
    pub fn is_member(&self, ip: IpAddr) -> bool {
        let IpAddr::V4(ip) = ip else {
            return false;
        };
        self.table
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .statuses()
            .iter()
            .any(|p| p.listed && p.ip == ip)
    }

    /// Every proxy address ever in the table; changes when discovery adds one.
    pub fn watch_members(&self) -> tokio::sync::watch::Receiver<Vec<Ipv4Addr>> {
        self.members.subscribe()
    }

    /// A copy of the table.
    pub fn snapshot(&self) -> ProxyTable {
        self.table.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Resolver addresses for `job_key`'s DNS, best first.
    pub fn resolvers_for(&self, job_key: JobKey) -> Vec<SocketAddr> {
        self.table
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .dns_order(job_key)
            .into_iter()
            .map(|ip| SocketAddr::from((ip, self.resolver_port)))
            .collect()
    }

    /// Pushes the current table to tier 1. Pushes are serialised and each sends the table as
    /// it is when the push starts, so tier 1 never ends on an older view than the table's.
    pub async fn push(&self, dataplane: &Arc<dyn Dataplane>) {
        let _order = self.push.lock().await;
        let entries = self.snapshot().entries();
        let dp = dataplane.clone();
        match tokio::task::spawn_blocking(move || dp.set_proxies(&entries)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "tier 1 proxy update failed"),
            Err(e) => tracing::warn!(error = %e, "tier 1 proxy update task failed"),
        }
    }

    /// Applies a discovery answer; returns the new tier-1 entries if anything changed.
    pub fn reconcile(&self, found: &[Ipv4Addr]) -> Option<Vec<ProxyEntry>> {
        let mut t = self.table.write().unwrap_or_else(|p| p.into_inner());
        let changed = t.reconcile(found);
        let all = t.addresses();
        self.members.send_if_modified(|m| {
            let grew = *m != all;
            *m = all;
            grew
        });
        changed.then(|| t.entries())
    }

    /// Applies a round of probe results; returns the new tier-1 entries if anything changed.
    pub fn apply(&self, results: &[(usize, Probe)]) -> Option<Vec<ProxyEntry>> {
        let mut t = self.table.write().unwrap_or_else(|p| p.into_inner());
        let mut changed = false;
        for (i, probe) in results {
            changed |= t.observe(*i, *probe);
        }
        changed.then(|| t.entries())
    }
}

/// One `GET /healthz` with an overall `timeout`: 200 is alive, 503 draining, anything else
/// (another status, a timeout, a refused connection) a failure.
pub async fn probe(addr: SocketAddr, timeout: Duration) -> Probe {
    match ProxyClient::new(addr).with_timeout(timeout).health().await {
        Ok(ProxyHealth::Ok) => Probe::Ok,
        Ok(ProxyHealth::Draining) => Probe::Draining,
        Err(_) => Probe::Failed,
    }
}

/// Sends one notice to every listed proxy's control port at once, each within `timeout`;
/// the HTTP status each answered (`None`: no answer). Shared by the job-ended and
/// policy-update notices.
async fn notify_listed<F, Fut>(
    proxies: &Proxies,
    timeout: Duration,
    notice: F,
) -> Vec<(SocketAddr, Option<u16>)>
where
    F: Fn(ProxyClient) -> Fut,
    Fut: std::future::Future<Output = Option<u16>> + Send + 'static,
{
    let mut set = tokio::task::JoinSet::new();
    for p in proxies.snapshot().statuses().iter().filter(|p| p.listed) {
        let addr = SocketAddr::from((p.ip, proxies.control_port));
        let answer = notice(ProxyClient::new(addr).with_timeout(timeout));
        set.spawn(async move { (addr, answer.await) });
    }
    let mut out = Vec::new();
    while let Some(r) = set.join_next().await {
        if let Ok(a) = r {
            out.push(a);
        }
    }
    out
}

/// Outcomes of job-ended notices, one per (job, proxy).
#[derive(Debug, Default)]
pub struct EndNotices {
    ended: AtomicU64,
    unknown_job: AtomicU64,
    forbidden: AtomicU64,
    failed: AtomicU64,
}

impl EndNotices {
    /// Notices by outcome: `ended` (204), `unknown_job` (404: the proxy had nothing of the
    /// job), `forbidden` (403: the proxy does not take this node's word for the job), `failed`
    /// (no answer in time, or another status).
    pub fn outcomes(&self) -> BTreeMap<&'static str, u64> {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        BTreeMap::from([
            ("ended", g(&self.ended)),
            ("unknown_job", g(&self.unknown_job)),
            ("forbidden", g(&self.forbidden)),
            ("failed", g(&self.failed)),
        ])
    }
}

/// Tells every listed proxy that the job has ended, so that it frees the job's conntrack
/// entries and SNAT ports at once: `POST /v1/jobs/<16 hex job key>/ended` on its control port,
/// all proxies at once, each within `timeout`. Fire-and-forget: outcomes are counted, failures
/// logged at debug level (a proxy that misses the notice frees the job when its flows idle out).
pub async fn announce_job_ended(
    proxies: Arc<Proxies>,
    job_key: JobKey,
    notices: Arc<EndNotices>,
    timeout: Duration,
) {
    let answers = notify_listed(&proxies, timeout, move |client| async move {
        match client.job_ended(job_key).await {
            Ok(()) => Some(204),
            Err(e) => e.status(),
        }
    });
    for (addr, status) in answers.await {
        let c = match status {
            Some(204) => &notices.ended,
            Some(404) => &notices.unknown_job,
            Some(403) => &notices.forbidden,
            _ => &notices.failed,
        };
        c.fetch_add(1, Ordering::Relaxed);
        if status != Some(204) {
            tracing::debug!(proxy = %addr, ?status, job_key = %job_key, "job-ended notice not taken");
        }
    }
}

/// Outcomes of policy-update notices, one per (job, proxy).
#[derive(Debug, Default)]
pub struct UpdateNotices {
    refetch: AtomicU64,
    current: AtomicU64,
    unknown_job: AtomicU64,
    rate_limited: AtomicU64,
    forbidden: AtomicU64,
    failed: AtomicU64,
}

impl UpdateNotices {
    /// Notices by outcome: `refetch` (202: the proxy fetches the new policy), `current` (204:
    /// it holds that serial already), `unknown_job` (404: it has nothing of the job; its next
    /// packet fetches the new policy), `rate_limited` (429), `forbidden` (403), `failed`.
    pub fn outcomes(&self) -> BTreeMap<&'static str, u64> {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        BTreeMap::from([
            ("refetch", g(&self.refetch)),
            ("current", g(&self.current)),
            ("unknown_job", g(&self.unknown_job)),
            ("rate_limited", g(&self.rate_limited)),
            ("forbidden", g(&self.forbidden)),
            ("failed", g(&self.failed)),
        ])
    }
}

/// Tells every listed proxy that the job's policy was updated to `serial`, so that a proxy
/// holding the job refetches it at once and ends the flows the update removes even when the
/// job sends nothing more (it would otherwise learn the serial from the job's next packet):
/// `POST /v1/jobs/<16 hex job key>/updated/<serial>` on its control port, all proxies at once,
/// each within `timeout`. Fire-and-forget, counted like [`announce_job_ended`].
pub async fn announce_job_updated(
    proxies: Arc<Proxies>,
    job_key: JobKey,
    serial: snas_wire::PolicySerial,
    notices: Arc<UpdateNotices>,
    timeout: Duration,
) {
    let answers = notify_listed(&proxies, timeout, move |client| async move {
        match client.job_updated(job_key, serial).await {
            Ok(s) => Some(s),
            Err(e) => e.status(),
        }
    });
    for (addr, status) in answers.await {
        let c = match status {
            Some(202) => &notices.refetch,
            Some(204) => &notices.current,
            Some(404) => &notices.unknown_job,
            Some(429) => &notices.rate_limited,
            Some(403) => &notices.forbidden,
            _ => &notices.failed,
        };
        c.fetch_add(1, Ordering::Relaxed);
        if !matches!(status, Some(202 | 204 | 404)) {
            tracing::debug!(proxy = %addr, ?status, job_key = %job_key, "policy-update notice not taken");
        }
    }
}

/// Probes every proxy each `interval` until `shutdown` resolves; pushes every change to tier 1.
pub async fn run_health_checks(
    proxies: Arc<Proxies>,
    dataplane: Arc<dyn Dataplane>,
    interval: Duration,
    timeout: Duration,
    shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let stop = crate::shutdown::stopped(shutdown);
    tokio::pin!(stop);
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = &mut stop => return,
        }
        let targets: Vec<(usize, SocketAddr)> = proxies
            .snapshot()
            .statuses()
            .iter()
            .filter(|p| p.listed)
            .map(|p| (p.index, SocketAddr::from((p.ip, proxies.control_port))))
            .collect();
        let mut set = tokio::task::JoinSet::new();
        for (i, addr) in targets {
            set.spawn(async move { (i, probe(addr, timeout).await) });
        }
        let mut results = Vec::new();
        while let Some(r) = set.join_next().await {
            if let Ok(r) = r {
                results.push(r);
            }
        }
        if let Some(entries) = proxies.apply(&results) {
            tracing::info!(?entries, "proxy health changed");
            proxies.push(&dataplane).await;
        }
    }
}

/// Time between `proxy_service` lookups.
pub const DISCOVERY_INTERVAL: Duration = Duration::from_secs(5);

/// Asks `dns` for the A records of `service` (UDP, `timeout`). `None` on any failure (timeout,
/// SERVFAIL, NXDOMAIN, garbage): the caller keeps the current set; NOERROR without addresses
/// is an empty set.
pub async fn lookup_service(
    service: &str,
    dns: SocketAddr,
    timeout: Duration,
) -> Option<Vec<Ipv4Addr>> {
    use hickory_proto::op::{Message, MessageType, Query, ResponseCode};
    use hickory_proto::rr::{Name, RData, RecordType};
    let mut name = Name::from_ascii(service).ok()?;
    // Names from the wire are fully qualified; compare like with like.
    name.set_fqdn(true);
    let mut q = Message::new();
    q.set_id(rand::random())
        .set_recursion_desired(true)
        .add_query(Query::query(name, RecordType::A));
    let bytes = q.to_vec().ok()?;
    let ask = async {
        let bind: SocketAddr = if dns.is_ipv4() {
            (Ipv4Addr::UNSPECIFIED, 0).into()
        } else {
            (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
        };
        let s = tokio::net::UdpSocket::bind(bind).await.ok()?;
        s.connect(dns).await.ok()?;
        s.send(&bytes).await.ok()?;
        let mut buf = vec![0u8; 4096];
        loop {
            let n = s.recv(&mut buf).await.ok()?;
            let Ok(a) = Message::from_vec(&buf[..n]) else {
                continue;
            };
            if a.id() == q.id()
                && a.message_type() == MessageType::Response
                && a.queries() == q.queries()
            {
                return Some(a);
            }
        }
    };
    let a = tokio::time::timeout(timeout, ask).await.ok()??;
    if a.response_code() != ResponseCode::NoError || a.truncated() {
        return None;
    }
    let mut ips: Vec<Ipv4Addr> = a
        .answers()
        .iter()
        .filter_map(|r| match r.data() {
            RData::A(a) => Some(a.0),
            _ => None,
        })
        .collect();
    ips.sort_unstable();
    ips.dedup();
    Some(ips)
}

/// Looks `service` up at `dns` every `interval` until `shutdown`; pushes every change to tier 1.
pub async fn run_discovery(
    proxies: Arc<Proxies>,
    dataplane: Arc<dyn Dataplane>,
    service: String,
    dns: SocketAddr,
    interval: Duration,
    shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let stop = crate::shutdown::stopped(shutdown);
    tokio::pin!(stop);
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = &mut stop => return,
        }
        let Some(found) = lookup_service(&service, dns, Duration::from_secs(1)).await else {
            tracing::debug!(%service, "proxy discovery failed; keeping the current set");
            continue;
        };
        if let Some(entries) = proxies.reconcile(&found) {
            tracing::info!(%service, ?entries, "discovered proxy set changed");
            proxies.push(&dataplane).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ips() -> Vec<Ipv4Addr> {
        vec![
            "192.0.2.21".parse().unwrap(),
            "192.0.2.22".parse().unwrap(),
            "192.0.2.23".parse().unwrap(),
        ]
    }

    #[test]
    fn a_proxy_dies_after_two_failures_and_returns_after_one_success() {
        let mut t = ProxyTable::new(&ips());
        assert!(!t.observe(1, Probe::Failed));
        assert_eq!(t.statuses()[1].health, Health::Alive);
        assert!(t.observe(1, Probe::Failed));
        assert_eq!(t.statuses()[1].health, Health::Dead);
        assert!(!t.entries()[1].alive);
        assert!(t.observe(1, Probe::Ok));
        assert_eq!(t.statuses()[1].health, Health::Alive);
        assert_eq!(t.changes(), 2);
    }

    #[test]
    fn a_success_resets_the_failure_count() {
        let mut t = ProxyTable::new(&ips());
        t.observe(0, Probe::Failed);
        t.observe(0, Probe::Ok);
        assert!(!t.observe(0, Probe::Failed));
        assert_eq!(t.statuses()[0].health, Health::Alive);
    }

    #[test]
    fn draining_keeps_position_and_liveness_but_sets_the_flag() {
        let mut t = ProxyTable::new(&ips());
        assert!(t.observe(2, Probe::Draining));
        let e = t.entries();
        assert_eq!(e.len(), 3);
        assert_eq!(e[2].ip, ips()[2]);
        assert!(e[2].alive && e[2].draining);
        assert!(e[0].alive && !e[0].draining);
    }

    #[test]
    fn dns_order_moves_only_jobs_of_a_dead_proxy() {
        let mut t = ProxyTable::new(&ips());
        let before: Vec<Ipv4Addr> = (0..200u64).map(|k| t.dns_order(JobKey(k))[0]).collect();
        t.observe(1, Probe::Failed);
        t.observe(1, Probe::Failed);
        let mut moved = 0;
        for (k, b) in before.iter().enumerate() {
            let now = t.dns_order(JobKey(k as u64));
            assert_eq!(now.last(), Some(&ips()[1]), "dead proxy is the last resort");
            if *b == ips()[1] {
                moved += 1;
                assert_ne!(now[0], ips()[1]);
            } else {
                assert_eq!(now[0], *b, "job {k} moved although its proxy lives");
            }
        }
        assert!(moved > 20, "hash spreads jobs: {moved} of 200 on one proxy");
    }

    #[test]
    fn draining_proxies_answer_dns_only_after_alive_ones() {
        let mut t = ProxyTable::new(&ips());
        t.observe(0, Probe::Draining);
        t.observe(2, Probe::Draining);
        for k in 0..50 {
            let o = t.dns_order(JobKey(k));
            assert_eq!(o[0], ips()[1]);
            assert_eq!(o.len(), 3);
        }
    }

    /// A stand-in proxy: answers every request on `l` with `status` (no body) and records
    /// the request lines.
    async fn answer_always(
        l: tokio::net::TcpListener,
        status: u16,
        seen: Arc<std::sync::Mutex<Vec<String>>>,
    ) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        while let Ok((mut c, _)) = l.accept().await {
            let mut req = Vec::new();
            let mut buf = [0u8; 1024];
            while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                match c.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => req.extend_from_slice(&buf[..n]),
                }
            }
            let line = String::from_utf8_lossy(&req)
                .lines()
                .next()
                .unwrap_or_default()
                .to_owned();
            seen.lock().unwrap().push(line);
            let resp =
                format!("HTTP/1.1 {status} X\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
            let _ = c.write_all(resp.as_bytes()).await;
        }
    }

    #[tokio::test]
    async fn each_proxys_answer_to_an_update_notice_is_counted_under_its_outcome() {
        // Six proxies on one control port (as in a fleet): five answer 202, 204, 404, 429 and
        // 403; nothing listens at the sixth.
        let first = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = first.local_addr().unwrap().port();
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let mut listeners = vec![(first, 202)];
        for (i, status) in [(2u8, 204u16), (3, 404), (4, 429), (5, 403)] {
            let ip = Ipv4Addr::new(127, 0, 0, i);
            listeners.push((
                tokio::net::TcpListener::bind((ip, port)).await.unwrap(),
                status,
            ));
        }
        for (l, status) in listeners {
            tokio::spawn(answer_always(l, status, Arc::clone(&seen)));
        }
        let ips: Vec<Ipv4Addr> = (1..=6).map(|i| Ipv4Addr::new(127, 0, 0, i)).collect();
        let proxies = Arc::new(Proxies::new(&ips, port, 53));
        let notices = Arc::new(UpdateNotices::default());
        for _ in 0..2 {
            announce_job_updated(
                Arc::clone(&proxies),
                JobKey(0xab),
                snas_wire::PolicySerial(7),
                Arc::clone(&notices),
                Duration::from_secs(2),
            )
            .await;
        }
        assert_eq!(
            notices.outcomes(),
            BTreeMap::from([
                ("refetch", 2),
                ("current", 2),
                ("unknown_job", 2),
                ("rate_limited", 2),
                ("forbidden", 2),
                ("failed", 2),
            ])
        );
        let seen = seen.lock().unwrap();
        assert_eq!(seen.len(), 10, "{seen:?}");
        assert!(
            seen.iter()
                .all(|l| l == "POST /v1/jobs/00000000000000ab/updated/7 HTTP/1.1"),
            "{seen:?}"
        );
    }

    #[test]
    fn discovery_appends_new_proxies_and_unlists_vanished_ones_in_place() {
        let stat: Ipv4Addr = "192.0.2.21".parse().unwrap();
        let a: Ipv4Addr = "192.0.2.31".parse().unwrap();
        let b: Ipv4Addr = "192.0.2.32".parse().unwrap();
        let mut t = ProxyTable::new(&[stat]);
        assert!(t.reconcile(&[a, b]));
        assert_eq!(
            t.entries().iter().map(|e| e.ip).collect::<Vec<_>>(),
            vec![stat, a, b]
        );
        assert!(!t.reconcile(&[b, a]), "same set, other order: no change");
        assert!(t.reconcile(&[b]));
        let e = t.entries();
        assert_eq!(e[1].ip, a);
        assert!(!e[1].alive, "vanished proxy is dead to tier 1, in place");
        assert!(e[0].alive, "static proxies are never unlisted");
        for k in 0..20 {
            assert!(!t.dns_order(JobKey(k)).contains(&a));
        }
        assert!(t.reconcile(&[a, b]));
        assert!(t.entries()[1].alive);
        assert_eq!(t.entries().len(), 3);
    }
}
