//! The agent's job table: create, adopt, list and delete jobs.
//!
//! Owns the set of running jobs, the address pool and the job records, and sequences each job's
//! life: verify the signed policy → allocate a subnet → create the network → attach tier 1 →
//! write the record. Every failure on the way undoes the steps before it (the [`JobNetwork`]
//! guard tears the network down when dropped).
//!
//! # Invariants
//! - A job key is in at most one of `jobs` (running) and `pending` (being created/deleted).
//! - A subnet is released only after the job's network is gone.
//! - [`Agent::start`] adopts complete jobs without touching their interfaces or maps; it finishes
//!   the teardown of partial ones and removes namespaces with the agent's prefix that no record
//!   names (left by a crash mid-create).
//! - Methods block (netlink, file I/O); the API calls them from blocking threads.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::SystemTime;

use prometheus_client::metrics::histogram::Histogram;
use serde::Serialize;
use snas_wire::{JobKey, Reason};

pub use crate::api::types::{JobState, JobView};
use crate::config::AgentConfig;
use crate::jobnet::{self, JobNetError, JobNetInfo, JobNetwork};
use crate::naming::{job_key_hex, parse_job_key_hex, JobNames};
use crate::netlink::Rtnl;
use crate::pool::{PoolError, SubnetPool};
use crate::seams::{
    Dataplane, DataplaneError, JobAttachment, PolicyVerifier, VerifiedPolicy, VerifyError,
};
use crate::state::{JobRecord, StateError, StateStore, RECORD_VERSION};

/// Errors of job operations. The API maps each to an HTTP status.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    /// The signed policy was refused.
    #[error("policy refused: {0}")]
    Policy(#[from] VerifyError),
    /// The policy names another node.
    #[error("policy is for node {policy_node}, this node is {this_node}")]
    WrongNode {
        policy_node: IpAddr,
        this_node: IpAddr,
    },
    /// A job with this key is running or being created.
    #[error("job {0} already exists")]
    Exists(String),
    /// No such job.
    #[error("no job {0}")]
    NotFound(String),
    /// A job name that several running jobs share.
    #[error("job name {0} is ambiguous; use the job key")]
    Ambiguous(String),
    /// No free subnet.
    #[error(transparent)]
    Pool(#[from] PoolError),
    /// Creating or removing the network failed.
    #[error(transparent)]
    Network(#[from] JobNetError),
    /// Tier-1 programming failed.
    #[error(transparent)]
    Dataplane(#[from] DataplaneError),
    /// Writing the job record failed.
    #[error(transparent)]
    State(#[from] StateError),
    /// A blocking task did not complete.
    #[error("internal: {0}")]
    Internal(String),
}

/// Errors that stop the agent from starting.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The state directory is unusable.
    #[error(transparent)]
    State(#[from] StateError),
    /// The netns directory could not be prepared, or the kernel could not be asked.
    #[error(transparent)]
    Network(#[from] JobNetError),
    /// Reading existing namespaces failed.
    #[error("{dir}: {source}")]
    NetnsDir {
        dir: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// What happened to existing state at start.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize)]
pub struct StartReport {
    /// Jobs adopted intact.
    pub adopted: Vec<String>,
    /// Records whose network was partly gone: the rest was torn down.
    pub cleaned: Vec<String>,
    /// Namespaces with the agent's prefix and no record: removed.
    pub orphans_removed: Vec<String>,
    /// Problems that did not stop the start (corrupt records, failed cleanups).
    pub problems: Vec<String>,
}

impl JobState {
    /// The state of a job with `policy` at `now`: expired from `exp` on (the policy's validity
    /// ends at `exp`, RFC 7519 §4.1.4).
    pub fn of(policy: &VerifiedPolicy, now: SystemTime) -> JobState {
        if now >= policy.expires_at() {
            JobState::Expired
        } else {
            JobState::Running
        }
    }
}

impl JobView {
    /// The view of a job record at `now`.
    pub fn of(r: &JobRecord, now: SystemTime) -> JobView {
        JobView {
            job: r.policy.job.clone(),
            tenant: r.policy.tenant.clone(),
            job_key: r.policy.job_key,
            tenant_id: r.policy.tenant_id,
            jti: r.policy.jti.clone(),
            serial: r.policy.serial,
            expires_at: r.policy.expires_at_unix,
            state: JobState::of(&r.policy, now),
            netns: r.net.netns.clone(),
            netns_path: r.net.netns_path.clone(),
            sandbox_ip: r.net.sandbox.into(),
            gateway_ip: r.net.gateway.into(),
            dns_ip: r.net.gateway.into(),
            prefix_len: r.net.prefix_len,
            veth: r.net.host_veth.clone(),
            sandbox_ifname: r.net.sandbox_ifname.clone(),
            mtu: r.net.mtu,
        }
    }
}

struct Inner {
    jobs: BTreeMap<JobKey, JobRecord>,
    /// Sandbox address → job key of `jobs` (the DNS stub looks jobs up per query).
    by_sandbox: HashMap<Ipv4Addr, JobKey>,
    /// Jobs whose expiry [`Agent::newly_expired`] has reported.
    noticed_expired: HashSet<JobKey>,
    pending: HashSet<JobKey>,
    pool: SubnetPool,
    /// Deleted jobs whose host veth the kernel is still destroying; their subnets are reused
    /// only once it is gone (see [`Agent::delete_job`]).
    releasing: Vec<Releasing>,
}

impl Inner {
    fn insert(&mut self, rec: JobRecord) {
        self.by_sandbox.insert(rec.net.sandbox, rec.policy.job_key);
        self.jobs.insert(rec.policy.job_key, rec);
    }

    fn remove(&mut self, job_key: JobKey) -> Option<JobRecord> {
        let rec = self.jobs.remove(&job_key)?;
        self.by_sandbox.remove(&rec.net.sandbox);
        self.noticed_expired.remove(&job_key);
        Some(rec)
    }
}

/// A deleted job's subnet, held until its host veth has disappeared.
#[derive(Debug)]
struct Releasing {
    slot: u32,
    host_veth: String,
    since: std::time::Instant,
}

/// How long a deleted job's host veth may linger before the agent deletes it itself (a process
/// still holding the job's namespace keeps it, and its veth, alive).
const VETH_LINGER: std::time::Duration = std::time::Duration::from_secs(2);

/// Upper bounds (seconds) of the job set-up latency histogram's buckets.
pub const SETUP_BUCKETS: [f64; 10] = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0];

/// A wall clock, injectable for tests.
pub type Clock = Arc<dyn Fn() -> SystemTime + Send + Sync>;

/// The node agent's job table.
pub struct Agent {
    config: AgentConfig,
    verifier: Arc<dyn PolicyVerifier>,
    dataplane: Arc<dyn Dataplane>,
    store: StateStore,
    clock: Clock,
    inner: Mutex<Inner>,
    setup_latency: Histogram,
}

impl std::fmt::Debug for Agent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agent")
            .field("node", &self.config.node_name)
            .field("jobs", &self.lock().jobs.len())
            .finish()
    }
}

impl Agent {
    /// Starts the agent over existing state: adopts intact jobs, cleans up partial ones and
    /// orphaned namespaces. Must run in the host network namespace.
    pub fn start(
        config: AgentConfig,
        verifier: Arc<dyn PolicyVerifier>,
        dataplane: Arc<dyn Dataplane>,
    ) -> Result<(Agent, StartReport), StartError> {
        Agent::start_with_clock(config, verifier, dataplane, Arc::new(SystemTime::now))
    }

    /// [`Agent::start`] with an injected clock.
    pub fn start_with_clock(
        config: AgentConfig,
        verifier: Arc<dyn PolicyVerifier>,
        dataplane: Arc<dyn Dataplane>,
        clock: Clock,
    ) -> Result<(Agent, StartReport), StartError> {
        let store = StateStore::open(&config.state_dir)?;
        jobnet::prepare_netns_dir(&config.netns_dir)?;
        let mut report = StartReport::default();
        let mut pool = SubnetPool::new(config.job_pool, config.job_prefix_len);
        let mut jobs = BTreeMap::new();
        let (records, bad) = store.load_all()?;
        report.problems.extend(bad.iter().map(|e| e.to_string()));
        let mut rtnl = Rtnl::open().map_err(JobNetError::from)?;
        for mut rec in records {
            let key = job_key_hex(rec.policy.job_key);
            let presence = jobnet::inspect(&rec.net, &mut rtnl)?;
            let reserved = pool.reserve(rec.net.slot);
            match (presence.complete(), presence.host_ifindex, reserved) {
                (true, Some(ifindex), Ok(_)) => {
                    rec.net.host_ifindex = ifindex;
                    let attach = JobAttachment {
                        policy: &rec.policy,
                        token: &rec.token,
                        net: &rec.net,
                    };
                    if let Err(e) = dataplane.adopt_job(&attach) {
                        report.problems.push(format!("job {key}: adopt: {e}"));
                    }
                    report.adopted.push(key);
                    jobs.insert(rec.policy.job_key, rec);
                }
                (_, _, reserved) => {
                    if let Err(e) = &reserved {
                        report.problems.push(format!("job {key}: {e}"));
                    }
                    if let Err(e) = dataplane.detach_job(rec.policy.job_key, &rec.net) {
                        report.problems.push(format!("job {key}: detach: {e}"));
                    }
                    match jobnet::teardown_network(&rec.net) {
                        Ok(()) => {
                            if let Err(e) = store.remove(rec.policy.job_key) {
                                report.problems.push(e.to_string());
                            }
                            if reserved.is_ok() {
                                pool.release(rec.net.slot);
                            }
                            report.cleaned.push(key);
                        }
                        Err(e) => report.problems.push(format!("job {key}: {e}")),
                    }
                }
            }
        }
        let known: HashSet<&str> = jobs.values().map(|r| r.net.netns.as_str()).collect();
        let rd = std::fs::read_dir(&config.netns_dir).map_err(|source| StartError::NetnsDir {
            dir: config.netns_dir.clone(),
            source,
        })?;
        for entry in rd.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with(&config.netns_prefix) && !known.contains(name.as_str()) {
                match jobnet::remove_netns(&entry.path()) {
                    Ok(()) => report.orphans_removed.push(name),
                    Err(e) => report.problems.push(e.to_string()),
                }
            }
        }
        for p in &report.problems {
            tracing::warn!(problem = %p, "agent start");
        }
        tracing::info!(
            adopted = report.adopted.len(),
            cleaned = report.cleaned.len(),
            orphans = report.orphans_removed.len(),
            "agent started"
        );
        let agent = Agent {
            config,
            verifier,
            dataplane,
            store,
            clock,
            inner: Mutex::new(Inner {
                by_sandbox: jobs
                    .values()
                    .map(|r| (r.net.sandbox, r.policy.job_key))
                    .collect(),
                jobs,
                noticed_expired: HashSet::new(),
                pending: HashSet::new(),
                pool,
                releasing: Vec::new(),
            }),
            setup_latency: Histogram::new(SETUP_BUCKETS),
        };
        Ok((agent, report))
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Job set-up latency in seconds (successful creates; buckets [`SETUP_BUCKETS`]).
    pub fn setup_latency(&self) -> &Histogram {
        &self.setup_latency
    }

    /// The tier-1 dataplane.
    pub fn dataplane(&self) -> &Arc<dyn Dataplane> {
        &self.dataplane
    }

    /// The configuration the agent runs with.
    pub fn config(&self) -> &AgentConfig {
        &self.config
    }

    /// Verifies `token` and creates the job's network and tier-1 state.
    pub fn create_job(&self, token: &str) -> Result<JobView, JobError> {
        let started = std::time::Instant::now();
        let now = (self.clock)();
        let policy = self.verifier.verify(token, now)?;
        if let Some(node) = policy.node {
            let this = IpAddr::V4(self.config.underlay_address);
            if node != this {
                return Err(JobError::WrongNode {
                    policy_node: node,
                    this_node: this,
                });
            }
        }
        let key = policy.job_key;
        let host_veth = JobNames::derive(
            &self.config.netns_prefix,
            &self.config.host_veth_prefix,
            key,
        )
        .host_veth;
        let addrs = {
            let mut inner = self.lock();
            if inner.jobs.contains_key(&key) || inner.pending.contains(&key) {
                return Err(JobError::Exists(job_key_hex(key)));
            }
            reclaim(&mut inner, Some(&host_veth));
            if inner.pool.is_full() && !inner.releasing.is_empty() {
                reclaim_all(&mut inner);
            }
            let addrs = inner.pool.allocate()?;
            inner.pending.insert(key);
            addrs
        };
        let result = self.build_job(&policy, token, addrs, now);
        let mut inner = self.lock();
        inner.pending.remove(&key);
        match result {
            Ok(record) => {
                let view = JobView::of(&record, now);
                inner.insert(record);
                self.setup_latency.observe(started.elapsed().as_secs_f64());
                tracing::info!(job = %view.job, job_key = %view.job_key, netns = %view.netns, "job created");
                Ok(view)
            }
            Err(e) => {
                inner.pool.release(addrs.slot);
                Err(e)
            }
        }
    }

    fn build_job(
        &self,
        policy: &VerifiedPolicy,
        token: &str,
        addrs: crate::pool::JobAddrs,
        now: SystemTime,
    ) -> Result<JobRecord, JobError> {
        let names = JobNames::derive(
            &self.config.netns_prefix,
            &self.config.host_veth_prefix,
            policy.job_key,
        );
        let mut info = JobNetInfo::new(
            &names,
            addrs,
            self.config.sandbox_mtu(),
            &self.config.netns_dir,
        );
        if let Some(c) = &policy.claims {
            info.gso_max_size = crate::jobnet::sandbox_gso_max_size(
                c.limits.egress_bps.get(),
                snas_bpf::config::DEFAULT_HORIZON,
                info.mtu,
            );
        }
        let network = JobNetwork::create(info)?;
        let record = JobRecord {
            version: RECORD_VERSION,
            policy: policy.clone(),
            token: token.to_owned(),
            net: network.info().clone(),
            created_at_unix: now
                .duration_since(SystemTime::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
        };
        let attach = JobAttachment {
            policy,
            token,
            net: network.info(),
        };
        self.dataplane.attach_job(&attach)?;
        if let Err(e) = self.store.save(&record) {
            let _ = self.dataplane.detach_job(policy.job_key, network.info());
            return Err(e.into());
        }
        // The record exists: from now on the agent owns the network.
        let _ = network.into_info();
        Ok(record)
    }

    /// Resolves an API job identifier: 16 hex digits (job key) or a unique job name.
    pub fn resolve(&self, id: &str) -> Result<JobKey, JobError> {
        let inner = self.lock();
        if let Some(key) = parse_job_key_hex(id) {
            if inner.jobs.contains_key(&key) {
                return Ok(key);
            }
        }
        let mut matches = inner.jobs.values().filter(|r| r.policy.job == id);
        match (matches.next(), matches.next()) {
            (Some(r), None) => Ok(r.policy.job_key),
            (Some(_), Some(_)) => Err(JobError::Ambiguous(id.to_owned())),
            _ => Err(JobError::NotFound(id.to_owned())),
        }
    }

    /// Tears down a job: tier 1, network, record. On failure the job stays listed so that the
    /// delete can be retried.
    pub fn delete_job(&self, job_key: JobKey) -> Result<(), JobError> {
        let record = {
            let mut inner = self.lock();
            let record = inner
                .remove(job_key)
                .ok_or_else(|| JobError::NotFound(job_key_hex(job_key)))?;
            inner.pending.insert(job_key);
            record
        };
        // Detaching tier 1 and unmounting the namespace end the job's traffic at once. The
        // kernel then destroys the namespace and the veth pair in the background (~10 ms);
        // deleting the veth here instead costs a synchronous ~20 ms of RCU grace periods on
        // every job end, the larger part of SNAS's share of a sandbox's cold start. The subnet
        // is reused only once the veth is gone.
        let result = self
            .dataplane
            .detach_job(job_key, &record.net)
            .map_err(JobError::from)
            .and_then(|()| jobnet::remove_netns(&record.net.netns_path).map_err(JobError::from))
            .and_then(|()| self.store.remove(job_key).map_err(JobError::from));
        let mut inner = self.lock();
        inner.pending.remove(&job_key);
        match result {
            Ok(()) => {
                inner.releasing.push(Releasing {
                    slot: record.net.slot,
                    host_veth: record.net.host_veth.clone(),
                    since: std::time::Instant::now(),
                });
                reclaim(&mut inner, None);
                tracing::info!(job_key = %job_key_hex(job_key), "job deleted");
                Ok(())
            }
            Err(e) => {
                inner.insert(record);
                Err(e)
            }
        }
    }

    /// All jobs (running and expired), by job key.
    pub fn jobs(&self) -> Vec<JobView> {
        let now = (self.clock)();
        self.lock()
            .jobs
            .values()
            .map(|r| JobView::of(r, now))
            .collect()
    }

    /// One job.
    pub fn job(&self, job_key: JobKey) -> Option<JobView> {
        let now = (self.clock)();
        self.lock().jobs.get(&job_key).map(|r| JobView::of(r, now))
    }

    /// Jobs that have expired since the previous call (each is reported once; the periodic
    /// expiry check logs and counts them).
    pub fn newly_expired(&self) -> Vec<JobView> {
        let now = (self.clock)();
        let mut inner = self.lock();
        let inner = &mut *inner;
        let mut out = Vec::new();
        for r in inner.jobs.values() {
            if JobState::of(&r.policy, now) == JobState::Expired
                && inner.noticed_expired.insert(r.policy.job_key)
            {
                out.push(JobView::of(r, now));
            }
        }
        out
    }

    /// The job's per-reason drop counters from the dataplane.
    pub fn counters(&self, job_key: JobKey) -> Result<BTreeMap<Reason, u64>, JobError> {
        if !self.lock().jobs.contains_key(&job_key) {
            return Err(JobError::NotFound(job_key_hex(job_key)));
        }
        Ok(self.dataplane.counters(job_key)?)
    }

    /// The signed policy token of a running job (what proxies fetch).
    pub fn signed_policy(&self, job_key: JobKey) -> Option<String> {
        self.lock().jobs.get(&job_key).map(|r| r.token.clone())
    }
}

impl crate::stub::JobDirectory for Agent {
    fn job_at(&self, ip: IpAddr) -> Option<crate::stub::JobEntry> {
        let IpAddr::V4(ip) = ip else {
            return None;
        };
        let now = (self.clock)();
        let inner = self.lock();
        let r = inner.jobs.get(inner.by_sandbox.get(&ip)?)?;
        Some(crate::stub::JobEntry {
            job_key: r.policy.job_key,
            serial: r.policy.serial,
            expired: JobState::of(&r.policy, now) == JobState::Expired,
            ipv6_route: r.net.has_ipv6_route(),
        })
    }

    fn policy(&self, job_key: JobKey) -> Option<VerifiedPolicy> {
        self.lock().jobs.get(&job_key).map(|r| r.policy.clone())
    }

    fn contains(&self, job_key: JobKey) -> bool {
        self.lock().jobs.contains_key(&job_key)
    }
}

/// Releases the subnets of deleted jobs whose host veth has gone. The veth named `force` (a job
/// being created again under the same key) and veths lingering beyond [`VETH_LINGER`] are
/// deleted here and now.
fn reclaim(inner: &mut Inner, force: Option<&str>) {
    if inner.releasing.is_empty() {
        return;
    }
    let Ok(mut rtnl) = Rtnl::open() else {
        return;
    };
    let pool = &mut inner.pool;
    inner.releasing.retain(|r| {
        let gone = match rtnl.link_index(&r.host_veth) {
            Ok(None) => true,
            Ok(Some(_))
                if force == Some(r.host_veth.as_str()) || r.since.elapsed() > VETH_LINGER =>
            {
                rtnl.delete_link(&r.host_veth).is_ok()
            }
            Ok(Some(_)) | Err(_) => false,
        };
        if gone {
            pool.release(r.slot);
        }
        !gone
    });
}

/// Releases every held subnet, deleting veths the kernel has not removed yet (pool exhausted).
fn reclaim_all(inner: &mut Inner) {
    let names: Vec<String> = inner
        .releasing
        .iter()
        .map(|r| r.host_veth.clone())
        .collect();
    for n in names {
        reclaim(inner, Some(&n));
    }
}
