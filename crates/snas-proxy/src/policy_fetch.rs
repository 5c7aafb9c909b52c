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
//!   option never downgrades); the hook set with [`Fetcher::set_on_replace`] is told (the
//!   daemon ends the job's flows the new policy no longer allows).
//! - A policy covered by a held revocation ([`PolicyStore::revoke`]) is never stored, whatever
//!   its serial (unless the revocation's serial range leaves it out); the job is refused as
//!   `policy_revoked` until the revocation ends (the revoked token's `exp` + skew). Revocations
//!   survive refetches and are bounded ([`snas_policy::revocation::MAX_REVOCATIONS`]).
//! - The trust bundle is replaced by [`Fetcher::reload_trust`]; the policies signed by a
//!   removed or replaced key are dropped at once and their jobs refused as `key_untrusted`.
//! - A token signed by a key id the bundle does not hold is verified once more after the
//!   trust upkeep (`lifecycle::run`, the only caller of `reload_trust`) has reloaded the
//!   bundle at this fetch's request ([`Fetcher::reload_trust_now`], waiting at most
//!   [`TRUST_RELOAD_WAIT`]): a key rotation writes the new key to every trust directory before
//!   jobs are signed with it, and a proxy must not refuse such a job for up to one 500 ms
//!   trust poll.
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
use snas_policy::bundle::{BundleDiff, TrustBundle};
use snas_policy::jws;
use snas_policy::revocation::{RevocationClaims, RevocationStore};
use snas_wire::{JobKey, PolicySerial, Reason};
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

/// Called when a fetched policy replaces a held one (live update), with the new policy.
pub type ReplaceHook = Arc<dyn Fn(Arc<JobPolicy>) + Send + Sync>;

#[derive(Default)]
struct Replaced(std::sync::OnceLock<ReplaceHook>);

impl std::fmt::Debug for Replaced {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Replaced")
    }
}

/// How long a fetch whose token names an unknown key id waits for the trust reload it asks
/// for ([`Fetcher::reload_trust_now`]).
pub const TRUST_RELOAD_WAIT: Duration = Duration::from_millis(500);

/// After a refetch that brought a newer policy, the next refetch of the job may follow this
/// soon (see [`Fetcher::request_refetch`]).
pub const REFETCH_AFTER_PROGRESS: Duration = Duration::from_millis(100);

/// How long after a refetch (when the job's serial was `then`, and is `now`) the next may
/// start: [`REFETCH_AFTER_PROGRESS`] when the refetch brought a newer policy, else `negative`.
pub fn refetch_wait(
    then: Option<PolicySerial>,
    now: Option<PolicySerial>,
    negative: Duration,
) -> Duration {
    if now > then {
        REFETCH_AFTER_PROGRESS
    } else {
        negative
    }
}

/// What [`Fetcher::reload_trust`] found and did.
#[derive(Debug, Clone, Default)]
pub struct TrustReload {
    /// What changed (empty when nothing did or the previous bundle was kept).
    pub diff: BundleDiff,
    /// Bad files (path, reason); the good keys were loaded.
    pub problems: Vec<(std::path::PathBuf, String)>,
    /// No good key was found: the previous bundle is kept.
    pub kept_previous: bool,
    /// Jobs whose held policy was signed by a removed or replaced key (now refused).
    pub untrusted: Vec<JobKey>,
}

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
    /// The key id that signed each ready policy (trust bundle reloads).
    kids: HashMap<JobKey, Arc<str>>,
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
    /// Revocations received (management API, directory); taken after `writer`.
    revocations: Mutex<RevocationStore>,
}

/// What [`PolicyStore::insert_signed`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stored {
    /// Stored; `replaced` is the serial of the policy it replaced, if any (a live update).
    New {
        /// The serial replaced.
        replaced: Option<PolicySerial>,
    },
    /// A policy with the same or a higher serial is held.
    NotNewer,
    /// A revocation covers it: not stored; the job is refused as `policy_revoked`.
    Revoked,
}

fn unix_now() -> u64 {
    snas_policy::claims::unix_secs(SystemTime::now())
}

/// The instant a revocation kept until `exp` (+ skew) ends, seen from `now`/`now_unix`.
fn revocation_end(exp: u64, now_unix: u64, now: Instant) -> Instant {
    let left = exp
        .saturating_add(snas_policy::CLOCK_SKEW.as_secs())
        .saturating_sub(now_unix);
    now + Duration::from_secs(left)
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

    /// Stores a verified policy unless one with the same or a higher serial is held, or a
    /// revocation covers it. Returns whether it was stored.
    pub fn insert(&self, p: JobPolicy) -> bool {
        matches!(self.insert_signed(p, ""), Stored::New { .. })
    }

    /// [`PolicyStore::insert`] recording the key id that signed the policy (a trust bundle
    /// reload that removes the key ends the job, [`PolicyStore::untrust`]).
    pub fn insert_signed(&self, p: JobPolicy, kid: &str) -> Stored {
        let p = Arc::new(p);
        let now_unix = unix_now();
        let mut out = Stored::NotNewer;
        self.update(|s| {
            let revs = self
                .revocations
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if revs.covers(p.job_key, p.serial, now_unix) {
                drop(revs);
                s.ready.remove(&p.job_key);
                s.kids.remove(&p.job_key);
                s.rejected.insert(
                    p.job_key,
                    (
                        Reason::PolicyRevoked,
                        revocation_end(p.expires_at_unix, now_unix, Instant::now()),
                    ),
                );
                out = Stored::Revoked;
                return true;
            }
            drop(revs);
            let replaced = s.ready.get(&p.job_key).map(|old| old.serial);
            if replaced.is_some_and(|old| old >= p.serial) {
                return false;
            }
            s.rejected.remove(&p.job_key);
            s.ready.insert(p.job_key, Arc::clone(&p));
            s.kids.insert(p.job_key, Arc::from(kid));
            out = Stored::New { replaced };
            true
        });
        out
    }

    /// Records a verified revocation. A held policy it covers is dropped and the job refused
    /// as `policy_revoked` until the revocation ends (the revoked token's `exp` + skew).
    /// Returns whether a held policy was covered.
    pub fn revoke(
        &self,
        r: &RevocationClaims,
        now_unix: u64,
        now: Instant,
    ) -> Result<bool, snas_policy::revocation::StoreError> {
        let job = r.job_key();
        let mut covered = false;
        let mut result = Ok(());
        self.update(|s| {
            let mut revs = self
                .revocations
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if let Err(e) = revs.insert(r, now_unix) {
                result = Err(e);
                return false;
            }
            drop(revs);
            if s.ready.get(&job).is_some_and(|p| r.covers(p.serial)) {
                covered = true;
                s.ready.remove(&job);
                s.kids.remove(&job);
                s.rejected.insert(
                    job,
                    (Reason::PolicyRevoked, revocation_end(r.exp, now_unix, now)),
                );
                return true;
            }
            false
        });
        result.map(|()| covered)
    }

    /// Drops the held policies signed by keys the reload `diff` untrusts; their jobs are
    /// refused as `key_untrusted` until `until` (then a fetch asks again: a policy re-signed
    /// with a trusted key is accepted). Returns the jobs.
    pub fn untrust(&self, diff: &BundleDiff, until: Instant) -> Vec<JobKey> {
        let mut jobs = Vec::new();
        self.update(|s| {
            jobs = s
                .kids
                .iter()
                .filter(|(_, kid)| diff.untrusts(kid))
                .map(|(j, _)| *j)
                .collect();
            for j in &jobs {
                s.ready.remove(j);
                s.kids.remove(j);
                s.rejected.insert(*j, (Reason::KeyUntrusted, until));
            }
            !jobs.is_empty()
        });
        jobs
    }

    /// Revocations held.
    pub fn revocations(&self) -> usize {
        self.revocations
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    /// Forgets the remembered `key_untrusted` failures (a key was added: the next packet or
    /// query of those jobs fetches again at once instead of waiting out the negative cache).
    /// Returns how many.
    pub fn forgive_untrusted(&self) -> usize {
        let mut n = 0;
        self.update(|s| {
            let before = s.rejected.len();
            s.rejected.retain(|_, (r, _)| *r != Reason::KeyUntrusted);
            n = before - s.rejected.len();
            n > 0
        });
        n
    }

    /// Remembers a failure for `job_key` until `until`, unless a verified policy is held (or
    /// the job is refused as revoked: a failed fetch never shortens that).
    pub fn reject(&self, job_key: JobKey, reason: Reason, until: Instant) {
        self.update(|s| {
            if s.ready.contains_key(&job_key)
                || s.rejected
                    .get(&job_key)
                    .is_some_and(|(r, u)| *r == Reason::PolicyRevoked && *u > until)
            {
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
            let ready = &s.ready;
            s.kids.retain(|j, _| ready.contains_key(j));
            evicted = before - s.rejected.len() - s.ready.len();
            s.rejected.retain(|_, (_, until)| now < *until);
            self.revocations
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .sweep(unix_secs);
            before != s.ready.len() + s.rejected.len()
        });
        evicted
    }

    /// Forgets a job (tests, operator).
    pub fn remove(&self, job_key: JobKey) {
        self.update(|s| {
            s.kids.remove(&job_key);
            s.ready.remove(&job_key).is_some() | s.rejected.remove(&job_key).is_some()
        });
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
    trust: RwLock<Arc<TrustBundle>>,
    /// Asks the trust upkeep for a reload now ([`Fetcher::trust_reload_wanted`]).
    trust_wanted: tokio::sync::Notify,
    /// Told by the trust upkeep after each reload ([`Fetcher::trust_reloaded`]).
    trust_done: tokio::sync::Notify,
    /// Sequence number of the last reload started, and of the last one finished.
    trust_started: AtomicU64,
    trust_finished: AtomicU64,
    cfg: FetchConfig,
    inflight: Mutex<HashSet<JobKey>>,
    /// Per job: when it was last refetched and the serial held then.
    refetched: Mutex<HashMap<JobKey, (Instant, Option<PolicySerial>)>>,
    replaced: Replaced,
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
    /// a revocation covers the policy the agent serves
    #[error("policy of job {job_key} from {node} is revoked")]
    Revoked {
        /// Job.
        job_key: JobKey,
        /// Node asked.
        node: Ipv4Addr,
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
            FetchError::Revoked { .. } => Reason::PolicyRevoked,
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
            trust: RwLock::new(Arc::new(trust)),
            trust_wanted: tokio::sync::Notify::new(),
            trust_done: tokio::sync::Notify::new(),
            trust_started: AtomicU64::new(0),
            trust_finished: AtomicU64::new(0),
            cfg,
            inflight: Mutex::new(HashSet::new()),
            refetched: Mutex::new(HashMap::new()),
            replaced: Replaced::default(),
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

    /// Asks the trust upkeep to reload the bundle now and waits until a reload has finished,
    /// at most [`TRUST_RELOAD_WAIT`]. Returns whether one did (false when no upkeep runs).
    pub async fn reload_trust_now(&self) -> bool {
        // A reload already under way may have read the directory before the key was there:
        // only one that starts after this request counts.
        let wanted = self.trust_started.load(Ordering::Acquire) + 1;
        let deadline = tokio::time::Instant::now() + TRUST_RELOAD_WAIT;
        self.trust_wanted.notify_one();
        loop {
            let done = self.trust_done.notified();
            tokio::pin!(done);
            // Registered before the check, so that a reload finishing in between is not missed.
            done.as_mut().enable();
            if self.trust_finished.load(Ordering::Acquire) >= wanted {
                return true;
            }
            if tokio::time::timeout_at(deadline, done).await.is_err() {
                return false;
            }
        }
    }

    /// Resolves when a fetch asks for a reload of the trust bundle (the trust upkeep waits on
    /// it beside its poll).
    pub async fn trust_reload_wanted(&self) {
        self.trust_wanted.notified().await
    }

    /// The trust upkeep starts a reload: returns its sequence number for
    /// [`Fetcher::trust_reloaded`].
    pub fn trust_reload_starting(&self) -> u64 {
        self.trust_started.fetch_add(1, Ordering::AcqRel) + 1
    }

    /// The trust upkeep finished reload `seq`.
    pub fn trust_reloaded(&self, seq: u64) {
        self.trust_finished.fetch_max(seq, Ordering::AcqRel);
        self.trust_done.notify_waiters();
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
    /// already being fetched are ignored. Returns whether a fetch of the job is queued or
    /// running (its end will be notified), `false` when the queue was full.
    pub fn request(&self, job_key: JobKey, node: Ipv4Addr) -> bool {
        {
            let mut inflight = self.inflight.lock().unwrap_or_else(PoisonError::into_inner);
            if !inflight.insert(job_key) {
                return true;
            }
        }
        if self.tx.try_send((job_key, node)).is_err() {
            self.stats.queue_full.fetch_add(1, Ordering::Relaxed);
            self.inflight
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .remove(&job_key);
            return false;
        }
        true
    }

    /// Queues a refetch of a cached job whose traffic carries a newer serial. Rate limited per
    /// job so that a node that keeps announcing a serial its agent does not serve cannot cause
    /// a fetch per batch: after a refetch that brought a newer policy, the next may follow
    /// [`REFETCH_AFTER_PROGRESS`] later (a second live update within seconds of the first is
    /// not delayed); after one that did not, only once the negative-cache period has passed.
    /// Returns whether a fetch of the job is queued or running (its end will be notified):
    /// `false` when the rate limit or a full queue declined it.
    pub fn request_refetch(&self, job_key: JobKey, node: Ipv4Addr) -> bool {
        if self
            .inflight
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .contains(&job_key)
        {
            // Already under way (started by a packet, a DNS query or a notice): its end is
            // notified, whatever the rate limit would say.
            return true;
        }
        let now = Instant::now();
        let held = self.store.snapshot().get(job_key).map(|p| p.serial);
        {
            let mut last = self
                .refetched
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if let Some((t, serial_then)) = last.get(&job_key) {
                let wait = refetch_wait(*serial_then, held, self.cfg.negative);
                if now.saturating_duration_since(*t) < wait {
                    return false;
                }
            }
            if last.len() >= FETCH_QUEUE * 16 {
                let keep = self.cfg.negative;
                last.retain(|_, (t, _)| now.saturating_duration_since(*t) < keep);
            }
            last.insert(job_key, (now, held));
        }
        self.request(job_key, node)
    }

    /// Sets the hook told when a fetched policy replaces a held one with a higher serial (a
    /// live update: the daemon re-decides the job's flows). Once; later calls are ignored.
    pub fn set_on_replace(&self, f: ReplaceHook) {
        let _ = self.replaced.0.set(f);
    }

    /// The trust bundle policies are verified against.
    pub fn trust(&self) -> Arc<TrustBundle> {
        Arc::clone(&self.trust.read().unwrap_or_else(PoisonError::into_inner))
    }

    /// Reloads the trust bundle from `path` (bad files left out and reported; no good key:
    /// the previous bundle is kept) and drops the held policies of removed or replaced keys
    /// (their jobs are refused `key_untrusted` for the negative-cache period, then asked for
    /// again). Returns what changed, the problems, and the jobs cut off.
    pub fn reload_trust(&self, path: &std::path::Path) -> TrustReload {
        let r = snas_policy::bundle_fs::reload_trust_bundle(path);
        let Some(next) = r.bundle else {
            return TrustReload {
                problems: r.problems,
                kept_previous: true,
                ..TrustReload::default()
            };
        };
        let diff = {
            let mut cur = self.trust.write().unwrap_or_else(PoisonError::into_inner);
            let diff = cur.diff(&next);
            if !diff.is_empty() {
                *cur = Arc::new(next);
            }
            diff
        };
        if !diff.added.is_empty() || !diff.replaced.is_empty() {
            // A job refused because its key was unknown may be signed by the key just added:
            // ask again now (rotation step 3), not after the negative-cache period. Before
            // `untrust`, which refuses the jobs of the keys removed in the same reload.
            self.store.forgive_untrusted();
        }
        let untrusted = if diff.removed.is_empty() && diff.replaced.is_empty() {
            Vec::new()
        } else {
            self.store
                .untrust(&diff, Instant::now() + self.cfg.negative)
        };
        TrustReload {
            diff,
            problems: r.problems,
            kept_previous: false,
            untrusted,
        }
    }

    /// Verifies a signed revocation against the current trust bundle.
    pub fn verify_revocation(
        &self,
        token: &str,
        now: SystemTime,
    ) -> Result<RevocationClaims, jws::VerifyError> {
        snas_policy::revocation::verify_revocation(token, &self.trust(), now)
            .map(|v| v.claims().clone())
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
            Ok((p, kid)) => {
                self.stats.ok.fetch_add(1, Ordering::Relaxed);
                let stored = self.store.insert_signed(p, &kid);
                let held = self.store.snapshot().get(job_key).cloned();
                if let (Stored::New { replaced: Some(_) }, Some(p), Some(hook)) =
                    (stored, &held, self.replaced.0.get())
                {
                    hook(Arc::clone(p));
                }
                let r = match (stored, held) {
                    (Stored::Revoked, _) => Err(FetchError::Revoked { job_key, node }),
                    (_, Some(p)) => Ok(p),
                    (_, None) => Err(FetchError::Status {
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

    async fn fetch(
        &self,
        job_key: JobKey,
        node: Ipv4Addr,
    ) -> Result<(JobPolicy, String), FetchError> {
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
        let mut verified = jws::verify(&token, &self.trust(), SystemTime::now());
        if let Err(jws::VerifyError::UnknownKid(_)) = &verified {
            // Perhaps a key this proxy has not loaded yet (module docs): once more after a
            // reload.
            if self.reload_trust_now().await {
                verified = jws::verify(&token, &self.trust(), SystemTime::now());
            }
        }
        let v = verified.map_err(|source| FetchError::Verify {
            job_key,
            node,
            source,
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
        Ok((p, v.kid().to_owned()))
    }
}
