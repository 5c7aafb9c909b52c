//! The real [`PolicyCache`]: verified job policies fetched from the sending node's agent.
//!
//! # What it owns
//! - [`PolicyStore`]: a copy-on-write map `job_key → Arc<JobPolicy>` plus a negative cache
//!   `job_key → (reason, until)`. Workers take an `Arc<Snapshot>` once per batch (a read lock held
//!   for a pointer copy) and look policies up in it without further locking; writers (the
//!   fetcher, expiry) build a new snapshot and swap it in.
//! - [`Fetcher`]: asks `http://<node>:<agent_policy_port>/v1/jobs/{job_key}/policy`,
//!   verifies the token (`snas_policy::jws::verify`: signature, key id, expiry, lifetime),
//!   checks that the policy is the one asked for (`job_key`) and, if it names a `node`, that
//!   it is the node that sent the traffic; then compiles it ([`JobPolicy::from_verified`], with
//!   the proxy's infrastructure set).
//!   Requests from the data path are queued without blocking, de-duplicated while in flight
//!   (so a job has at most one fetch queued or running: the queue is bounded per job), and a
//!   failure is remembered for `negative_cache` (the job's packets are dropped with the
//!   failure's reason meanwhile instead of triggering a fetch each). The end of every fetch is
//!   reported to the hook set with [`Fetcher::set_notify`] (the daemon releases or drops the
//!   job's held packets there).
//!
//! # Invariants
//! - Only a policy with a higher serial replaces a cached one (refetch on a newer serial in the
//!   option never downgrades).
//! - A failed refetch of a cached job keeps the cached policy.
//! - Expired policies stay [`EXPIRED_KEEP`] past their `exp` (so tier 2 keeps refusing the job's
//!   packets with RST/ICMP instead of fetching the expired token again), then
//!   [`PolicyStore::evict_expired`] drops them (the daemon calls it every second).
//!
//! # Limits
//! Writers copy the map (O(jobs)); fine for the hundreds to thousands of jobs a proxy serves
//! and rare writes (one per job start or update).

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant, SystemTime};

use hyper::Method;
use ipnet::IpNet;
use snas_policy::bundle::TrustBundle;
use snas_policy::jws;
use snas_wire::{JobKey, Reason};
use tokio::sync::mpsc;

use crate::api::client::{exchange, Call, ClientError};
use crate::api::paths;
use crate::tier2::{JobPolicy, PolicyCache, PolicyLookup};

/// Fetch requests queued from the data path before new ones are dropped (and counted).
pub const FETCH_QUEUE: usize = 1024;

/// How long an expired policy stays cached after its `exp` (tier 2 refuses its packets).
pub const EXPIRED_KEEP: Duration = Duration::from_secs(600);

/// Largest policy answer read: a signed policy is at most 1 MiB.
pub const MAX_POLICY_ANSWER: usize = 1 << 20;

/// Called when a fetch of a job ends: `Ok` when a policy is cached for it, `Err(reason)`
/// otherwise.
pub type FetchNotify = Arc<dyn Fn(JobKey, Result<(), Reason>) + Send + Sync>;

#[derive(Default)]
struct Notify(std::sync::OnceLock<FetchNotify>);

impl std::fmt::Debug for Notify {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.get().is_some() {
            "Notify(set)"
        } else {
            "Notify(unset)"
        })
    }
}

/// One immutable generation of the cache.
#[derive(Debug, Default, Clone)]
pub struct Snapshot {
    ready: HashMap<JobKey, Arc<JobPolicy>>,
    rejected: HashMap<JobKey, (Reason, Instant)>,
}

impl Snapshot {
    /// A view at time `now` (negative entries older than their deadline read as missing).
    pub fn at(&self, now: Instant) -> SnapshotView<'_> {
        SnapshotView { snap: self, now }
    }

    /// Verified policies held.
    pub fn len(&self) -> usize {
        self.ready.len()
    }

    /// Whether no policy is held.
    pub fn is_empty(&self) -> bool {
        self.ready.is_empty()
    }

    /// The policy of `job_key`, if verified and held.
    pub fn get(&self, job_key: JobKey) -> Option<&Arc<JobPolicy>> {
        self.ready.get(&job_key)
    }
}

/// A [`Snapshot`] at a point in time; implements [`PolicyCache`].
#[derive(Debug, Clone, Copy)]
pub struct SnapshotView<'a> {
    snap: &'a Snapshot,
    now: Instant,
}

impl PolicyCache for SnapshotView<'_> {
    fn lookup(&self, job_key: JobKey) -> PolicyLookup<'_> {
        if let Some(p) = self.snap.ready.get(&job_key) {
            return PolicyLookup::Ready(p);
        }
        match self.snap.rejected.get(&job_key) {
            Some((r, until)) if self.now < *until => PolicyLookup::Rejected(*r),
            _ => PolicyLookup::Missing,
        }
    }
}

/// The shared, read-mostly policy cache.
#[derive(Debug, Default)]
pub struct PolicyStore {
    snap: RwLock<Arc<Snapshot>>,
    writer: Mutex<()>,
}

impl PolicyStore {
    /// An empty store.
    pub fn new() -> PolicyStore {
        PolicyStore::default()
    }

    /// The current generation (cheap: one `Arc` clone).
    pub fn snapshot(&self) -> Arc<Snapshot> {
        Arc::clone(&self.snap.read().unwrap_or_else(PoisonError::into_inner))
    }

    fn update(&self, f: impl FnOnce(&mut Snapshot) -> bool) -> bool {
        let _w = self.writer.lock().unwrap_or_else(PoisonError::into_inner);
        let mut next = (*self.snapshot()).clone();
        let changed = f(&mut next);
        if changed {
            *self.snap.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(next);
        }
        changed
    }

    /// Stores a verified policy unless one with the same or a higher serial is held. Returns
    /// whether it was stored.
    pub fn insert(&self, p: JobPolicy) -> bool {
        let p = Arc::new(p);
        self.update(|s| {
            if s.ready
                .get(&p.job_key)
                .is_some_and(|old| old.serial >= p.serial)
            {
                return false;
            }
            s.rejected.remove(&p.job_key);
            s.ready.insert(p.job_key, Arc::clone(&p));
            true
        })
    }

    /// Remembers a failure for `job_key` until `until`, unless a verified policy is held.
    pub fn reject(&self, job_key: JobKey, reason: Reason, until: Instant) {
        self.update(|s| {
            if s.ready.contains_key(&job_key) {
                return false;
            }
            s.rejected.insert(job_key, (reason, until));
            true
        });
    }

    /// Drops policies expired for [`EXPIRED_KEEP`] at `unix_secs` and stale negative entries.
    /// Returns how many policies were evicted.
    pub fn evict_expired(&self, unix_secs: u64, now: Instant) -> usize {
        let mut evicted = 0;
        self.update(|s| {
            let before = s.ready.len() + s.rejected.len();
            s.ready.retain(|_, p| {
                p.expires_at_unix.saturating_add(EXPIRED_KEEP.as_secs()) > unix_secs
            });
            evicted = before - s.rejected.len() - s.ready.len();
            s.rejected.retain(|_, (_, until)| now < *until);
            before != s.ready.len() + s.rejected.len()
        });
        evicted
    }

    /// Forgets a job (tests, operator).
    pub fn remove(&self, job_key: JobKey) {
        self.update(|s| s.ready.remove(&job_key).is_some() | s.rejected.remove(&job_key).is_some());
    }
}

/// Fetcher settings.
#[derive(Debug, Clone)]
pub struct FetchConfig {
    /// Agents' policy port.
    pub agent_port: u16,
    /// Whole-exchange timeout.
    pub timeout: Duration,
    /// Negative-cache lifetime.
    pub negative: Duration,
    /// Infrastructure prefixes every policy is compiled with (denied whatever its rules say).
    pub infrastructure: Arc<[IpNet]>,
}

/// Fetch counters (metrics).
#[derive(Debug, Default)]
pub struct FetchStats {
    /// Policies fetched and stored.
    pub ok: AtomicU64,
    /// Fetches that failed (transport, status, verification, identity).
    pub failed: AtomicU64,
    /// Requests dropped because the queue was full.
    pub queue_full: AtomicU64,
}

/// Fetches and verifies policies; see the module documentation.
#[derive(Debug)]
pub struct Fetcher {
    store: Arc<PolicyStore>,
    trust: TrustBundle,
    cfg: FetchConfig,
    inflight: Mutex<HashSet<JobKey>>,
    refetched: Mutex<HashMap<JobKey, Instant>>,
    tx: mpsc::Sender<(JobKey, Ipv4Addr)>,
    notify: Notify,
    /// Counters.
    pub stats: FetchStats,
}

/// The receiving end of the data path's fetch requests; hand it to [`Fetcher::run`].
#[derive(Debug)]
pub struct FetchQueue(mpsc::Receiver<(JobKey, Ipv4Addr)>);

/// Why a fetch failed (logged; the negative cache keeps the [`Reason`]).
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// the agent could not be reached or answered badly
    #[error("policy of job {job_key} from {node}: {source}")]
    Http {
        /// Job.
        job_key: JobKey,
        /// Node asked.
        node: Ipv4Addr,
        /// Transport error.
        source: ClientError,
    },
    /// the agent answered with a non-200 status
    #[error("policy of job {job_key} from {node}: HTTP status {status}")]
    Status {
        /// Job.
        job_key: JobKey,
        /// Node asked.
        node: Ipv4Addr,
        /// Status.
        status: u16,
    },
    /// the token did not verify
    #[error("policy of job {job_key} from {node}: {source}")]
    Verify {
        /// Job.
        job_key: JobKey,
        /// Node asked.
        node: Ipv4Addr,
        /// Verification error.
        source: jws::VerifyError,
    },
    /// the token is valid but for another job
    #[error("policy from {node} for job {job_key} is the policy of job {got}")]
    WrongJob {
        /// Job asked.
        job_key: JobKey,
        /// Node asked.
        node: Ipv4Addr,
        /// Job in the token.
        got: JobKey,
    },
    /// the token pins the job to another node
    #[error("policy of job {job_key} from {node} is pinned to node {pinned}")]
    WrongNode {
        /// Job.
        job_key: JobKey,
        /// Node asked.
        node: Ipv4Addr,
        /// Node in the token.
        pinned: IpAddr,
    },
}

impl FetchError {
    /// The drop reason recorded in the negative cache.
    pub fn reason(&self) -> Reason {
        match self {
            FetchError::Http { .. } => Reason::UnknownJob,
            FetchError::Status { status: 404, .. } => Reason::UnknownJob,
            FetchError::Status { .. } => Reason::PolicyInvalid,
            FetchError::Verify { source, .. } => source.reason(),
            FetchError::WrongJob { .. } => Reason::PolicyInvalid,
            FetchError::WrongNode { .. } => Reason::NodeMismatch,
        }
    }
}

impl Fetcher {
    /// A fetcher over `store` and the queue its [`Fetcher::run`] loop consumes.
    pub fn new(
        store: Arc<PolicyStore>,
        trust: TrustBundle,
        cfg: FetchConfig,
    ) -> (Arc<Fetcher>, FetchQueue) {
        let (tx, rx) = mpsc::channel(FETCH_QUEUE);
        let f = Fetcher {
            store,
            trust,
            cfg,
            inflight: Mutex::new(HashSet::new()),
            refetched: Mutex::new(HashMap::new()),
            tx,
            notify: Notify::default(),
            stats: FetchStats::default(),
        };
        (Arc::new(f), FetchQueue(rx))
    }

    /// The store this fetcher fills.
    pub fn store(&self) -> &Arc<PolicyStore> {
        &self.store
    }

    /// Sets the hook told about the end of every fetch (once; later calls are ignored).
    pub fn set_notify(&self, f: FetchNotify) {
        let _ = self.notify.0.set(f);
    }

    fn notify(&self, job_key: JobKey, outcome: Result<(), Reason>) {
        if let Some(f) = self.notify.0.get() {
            f(job_key, outcome);
        }
    }

    /// Queues a fetch of `job_key` from `node` (data path: never blocks). Requests for a job
    /// already being fetched are ignored.
    pub fn request(&self, job_key: JobKey, node: Ipv4Addr) {
        {
            let mut inflight = self.inflight.lock().unwrap_or_else(PoisonError::into_inner);
            if !inflight.insert(job_key) {
                return;
            }
        }
        if self.tx.try_send((job_key, node)).is_err() {
            self.stats.queue_full.fetch_add(1, Ordering::Relaxed);
            self.inflight
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .remove(&job_key);
        }
    }

    /// Queues a refetch of a cached job whose traffic carries a newer serial, at most once per
    /// negative-cache period per job (a node that keeps announcing a serial its agent does not
    /// serve must not cause a fetch per batch).
    pub fn request_refetch(&self, job_key: JobKey, node: Ipv4Addr) {
        let now = Instant::now();
        {
            let mut last = self
                .refetched
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if last
                .get(&job_key)
                .is_some_and(|t| now.saturating_duration_since(*t) < self.cfg.negative)
            {
                return;
            }
            if last.len() >= FETCH_QUEUE * 16 {
                let keep = self.cfg.negative;
                last.retain(|_, t| now.saturating_duration_since(*t) < keep);
            }
            last.insert(job_key, now);
        }
        self.request(job_key, node);
    }

    /// Serves queued requests until the queue closes (spawn on the control runtime).
    pub async fn run(self: Arc<Self>, mut queue: FetchQueue) {
        while let Some((job_key, node)) = queue.0.recv().await {
            let me = Arc::clone(&self);
            tokio::spawn(async move {
                let _ = me.fetch_and_store(job_key, node).await;
                me.inflight
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .remove(&job_key);
            });
        }
    }

    /// The job's policy: from the cache, or fetched now. A negative entry answers with its
    /// reason without a fetch.
    pub async fn ensure(&self, job_key: JobKey, node: Ipv4Addr) -> Result<Arc<JobPolicy>, Reason> {
        let snap = self.store.snapshot();
        match snap.at(Instant::now()).lookup(job_key) {
            PolicyLookup::Ready(_) => {
                if let Some(p) = snap.get(job_key) {
                    return Ok(Arc::clone(p));
                }
            }
            PolicyLookup::Rejected(r) => return Err(r),
            PolicyLookup::Missing => {}
        }
        self.fetch_and_store(job_key, node)
            .await
            .map_err(|e| e.reason())
    }

    /// Fetches, verifies and stores; on failure records the negative entry.
    pub async fn fetch_and_store(
        &self,
        job_key: JobKey,
        node: Ipv4Addr,
    ) -> Result<Arc<JobPolicy>, FetchError> {
        match self.fetch(job_key, node).await {
            Ok(p) => {
                self.stats.ok.fetch_add(1, Ordering::Relaxed);
                self.store.insert(p);
                let r = match self.store.snapshot().get(job_key) {
                    Some(p) => Ok(Arc::clone(p)),
                    None => Err(FetchError::Status {
                        job_key,
                        node,
                        status: 404,
                    }),
                };
                self.notify(job_key, r.as_ref().map(|_| ()).map_err(FetchError::reason));
                r
            }
            Err(e) => {
                self.stats.failed.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(error = %e, "policy fetch failed");
                self.store
                    .reject(job_key, e.reason(), Instant::now() + self.cfg.negative);
                // A failed refetch keeps the cached policy: that is still a success for
                // whoever waits for the job.
                let held = self.store.snapshot().get(job_key).is_some();
                self.notify(job_key, if held { Ok(()) } else { Err(e.reason()) });
                Err(e)
            }
        }
    }

    async fn fetch(&self, job_key: JobKey, node: Ipv4Addr) -> Result<JobPolicy, FetchError> {
        let addr = SocketAddr::from((node, self.cfg.agent_port));
        let call = Call {
            timeout: self.cfg.timeout,
            max_answer: MAX_POLICY_ANSWER,
            ..Call::new(Method::GET, paths::agent_policy(job_key))
        };
        let resp = exchange(addr, call)
            .await
            .map_err(|source| FetchError::Http {
                job_key,
                node,
                source,
            })?;
        if resp.status != 200 {
            return Err(FetchError::Status {
                job_key,
                node,
                status: resp.status,
            });
        }
        let token = String::from_utf8_lossy(&resp.body);
        let v = jws::verify(&token, &self.trust, SystemTime::now()).map_err(|source| {
            FetchError::Verify {
                job_key,
                node,
                source,
            }
        })?;
        if v.job_key() != job_key {
            return Err(FetchError::WrongJob {
                job_key,
                node,
                got: v.job_key(),
            });
        }
        if let Some(pinned) = v.claims().node {
            if pinned != IpAddr::V4(node) {
                return Err(FetchError::WrongNode {
                    job_key,
                    node,
                    pinned,
                });
            }
        }
        let mut p = JobPolicy::from_verified(&v, &self.cfg.infrastructure);
        p.fetched_from = Some(node);
        Ok(p)
    }
}
