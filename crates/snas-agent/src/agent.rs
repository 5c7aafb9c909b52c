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
use crate::bindings::BindingLedger;
use crate::config::AgentConfig;
use crate::jobnet::{self, JobNetError, JobNetInfo, JobNetwork};
use crate::naming::{job_key_hex, parse_job_key_hex, JobNames};
use crate::netlink::Rtnl;
use crate::pool::{PoolError, SubnetPool};
use crate::seams::{
    Dataplane, DataplaneError, JobAttachment, PolicyVerifier, VerifiedPolicy, VerifyError,
};
use crate::state::{JobRecord, StateError, StateStore, RECORD_VERSION};
use snas_policy::revocation::{Inserted, RevocationClaims, RevocationStore};

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
    /// The new policy is not the next one of the job (another job, tenant or job name, or a
    /// serial that does not increase).
    #[error("policy update refused: {0}")]
    Lineage(#[from] snas_policy::LineageError),
    /// A revocation covers the policy: the job is cut off until the revocation expires.
    #[error("policy of job {job_key} serial {serial} is revoked")]
    Revoked { job_key: String, serial: u32 },
    /// The revocation store is full.
    #[error(transparent)]
    RevocationStore(#[from] snas_policy::revocation::StoreError),
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
            sandbox_ip6: r.net.sandbox6,
            gateway_ip6: r.net.sandbox6.map(|_| crate::jobnet::GATEWAY6),
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
    /// Addresses the DNS stub installed, by job and name (withdrawn on update).
    bindings: BindingLedger,
    /// Revocations received (API or directory), until their `exp`.
    revocations: RevocationStore,
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
    /// Serialises policy updates (each reads the running policy and replaces it).
    updates: Mutex<()>,
    /// Origin of the monotonic times of the binding ledger.
    origin: std::time::Instant,
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
                bindings: BindingLedger::default(),
                revocations: RevocationStore::default(),
            }),
            setup_latency: Histogram::new(SETUP_BUCKETS),
            updates: Mutex::new(()),
            origin: std::time::Instant::now(),
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
        self.check_not_revoked(&policy, now)?;
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
        info.sandbox6 = self.config.sandbox_ip6(addrs.sandbox);
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
            inner.bindings.forget_job(job_key);
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

    fn check_not_revoked(&self, policy: &VerifiedPolicy, now: SystemTime) -> Result<(), JobError> {
        let now = snas_policy::claims::unix_secs(now);
        if self
            .lock()
            .revocations
            .covers(policy.job_key, policy.serial, now)
        {
            return Err(JobError::Revoked {
                job_key: job_key_hex(policy.job_key),
                serial: policy.serial.0,
            });
        }
        Ok(())
    }

    /// Replaces a running job's policy with `token`, the next policy of the same job (live
    /// update or renewal): verified like a new job's, then the lineage rules
    /// ([`snas_policy::check_lineage`]: same `jti`, tenant and job, a higher serial) against
    /// the running policy; then tier 1 is reprogrammed (configuration, CIDR rules), the
    /// bindings of names the new policy no longer allows are withdrawn from tier 1, and the
    /// record is replaced. The DNS stub follows at its next query (it sees the new serial).
    /// Returns the job's new view.
    pub fn update_job(&self, job_key: JobKey, token: &str) -> Result<JobView, JobError> {
        let _one_at_a_time = self.updates.lock().unwrap_or_else(|p| p.into_inner());
        let now = (self.clock)();
        let new = self.verifier.verify(token, now)?;
        if let Some(node) = new.node {
            let this = IpAddr::V4(self.config.underlay_address);
            if node != this {
                return Err(JobError::WrongNode {
                    policy_node: node,
                    this_node: this,
                });
            }
        }
        let old = {
            let inner = self.lock();
            if inner.pending.contains(&job_key) {
                return Err(JobError::NotFound(job_key_hex(job_key)));
            }
            inner
                .jobs
                .get(&job_key)
                .cloned()
                .ok_or_else(|| JobError::NotFound(job_key_hex(job_key)))?
        };
        lineage(&old.policy, &new)?;
        self.check_not_revoked(&new, now)?;
        let old_attach = JobAttachment {
            policy: &old.policy,
            token: &old.token,
            net: &old.net,
        };
        let new_attach = JobAttachment {
            policy: &new,
            token,
            net: &old.net,
        };
        let record = JobRecord {
            policy: new.clone(),
            token: token.to_owned(),
            ..old.clone()
        };
        self.store.save(&record)?;
        // The new token is served (policy endpoint, DNS stub) before tier 1 stamps the new
        // serial on the job's packets: a proxy that refetches on seeing the serial gets it.
        {
            let mut inner = self.lock();
            inner.insert(record.clone());
        }
        if let Err(e) = self.dataplane.update_job(&old_attach, &new_attach) {
            // Back to the running policy: record, table and tier 1 agree again.
            if let Err(back) = self.store.save(&old) {
                tracing::error!(job_key = %job_key_hex(job_key), error = %back, "policy update: restoring the job record failed");
            }
            let _ = self.dataplane.update_job(&new_attach, &old_attach);
            self.lock().insert(old.clone());
            return Err(e.into());
        }
        let withdrawn = self.rebind(&record);
        let view = {
            let mut inner = self.lock();
            inner.noticed_expired.remove(&job_key);
            inner.jobs.get(&job_key).map(|r| JobView::of(r, now))
        };
        tracing::info!(
            job_key = %job_key_hex(job_key),
            old_serial = old.policy.serial.0,
            serial = new.serial.0,
            withdrawn,
            "job policy updated"
        );
        view.ok_or_else(|| JobError::NotFound(job_key_hex(job_key)))
    }

    /// Withdraws from tier 1 the DNS bindings the job's new policy no longer allows (and
    /// narrows those whose ports changed). Returns how many addresses changed.
    fn rebind(&self, record: &JobRecord) -> usize {
        let Some(claims) = record.policy.claims.as_ref() else {
            return 0;
        };
        let matcher = snas_policy::compile(claims);
        let now = self.origin.elapsed();
        let changes = self
            .lock()
            .bindings
            .rebind(record.policy.job_key, now, |name| {
                // The ports the new policy leaves the name (deny rules taken out); an audit-mode
                // `would_deny` name is bound nowhere, as the stub does.
                crate::dns::name_decision(&matcher, name)
                    .map(|d| d.ports)
                    .unwrap_or_default()
            });
        let key = record.policy.job_key;
        for c in &changes {
            let mut result = self.dataplane.revoke_resolved(key, c.ip);
            for (rules, ttl) in &c.install {
                if result.is_ok() && !rules.is_empty() && !ttl.is_zero() {
                    result = self.dataplane.allow_resolved(key, c.ip, rules, *ttl);
                }
            }
            if let Err(e) = result {
                tracing::warn!(job_key = %job_key_hex(key), ip = %c.ip, error = %e, "policy update: DNS binding not rebound");
            }
        }
        changes.len()
    }

    /// Records a binding the DNS stub installed under the job's policy `serial` (see
    /// [`crate::bindings`]). False when the job's policy is no longer that serial (or the job
    /// is gone): the caller withdraws the binding.
    pub fn record_binding(
        &self,
        job_key: JobKey,
        serial: snas_wire::PolicySerial,
        name: &str,
        ip: IpAddr,
        rules: &[snas_bpf::PortRule],
        lifetime: std::time::Duration,
    ) -> bool {
        let until = self.origin.elapsed().saturating_add(lifetime);
        let mut inner = self.lock();
        match inner.jobs.get(&job_key) {
            Some(r) if r.policy.serial == serial => {
                inner.bindings.record(job_key, name, ip, rules, until);
                true
            }
            _ => false,
        }
    }

    /// The name the job's DNS answers bound to `ip` (or, in audit mode, let through), if one
    /// is live: tier-1 audit lines carry it ([`crate::bindings::BindingLedger::name_of`]).
    pub fn bound_name(&self, job_key: JobKey, ip: IpAddr) -> Option<String> {
        let now = self.origin.elapsed();
        self.lock()
            .bindings
            .name_of(job_key, ip, now)
            .map(str::to_owned)
    }

    /// Forgets bindings that have ended (periodic).
    pub fn sweep_bindings(&self) {
        let now = self.origin.elapsed();
        let mut inner = self.lock();
        inner.bindings.sweep(now);
        let now_unix = snas_policy::claims::unix_secs((self.clock)());
        inner.revocations.sweep(now_unix);
    }

    /// Verifies and records a revocation; returns it with the running jobs it covers (the
    /// caller tears them down) and whether it was new.
    pub fn revoke(&self, token: &str) -> Result<(RevocationClaims, Vec<JobKey>, bool), JobError> {
        let now = (self.clock)();
        let r = self.verifier.verify_revocation(token, now)?;
        let now_unix = snas_policy::claims::unix_secs(now);
        let mut inner = self.lock();
        let new = inner.revocations.insert(&r, now_unix)? == Inserted::New;
        let covered = inner
            .jobs
            .values()
            .filter(|j| j.policy.job_key == r.job_key() && r.covers(j.policy.serial))
            .map(|j| j.policy.job_key)
            .collect();
        Ok((r, covered, new))
    }

    /// Running jobs whose token no longer verifies against the (reloaded) trust bundle, with
    /// the reason.
    pub fn untrusted_jobs(&self) -> Vec<(JobKey, crate::seams::VerifyError)> {
        let tokens: Vec<(JobKey, String)> = self
            .lock()
            .jobs
            .values()
            .map(|r| (r.policy.job_key, r.token.clone()))
            .collect();
        tokens
            .into_iter()
            .filter_map(|(k, t)| self.verifier.recheck(&t).err().map(|e| (k, e)))
            .collect()
    }

    /// The verifier (trust bundle reloads).
    pub fn verifier(&self) -> &Arc<dyn PolicyVerifier> {
        &self.verifier
    }

    /// The verified policy of a running job.
    pub fn policy_of(&self, job_key: JobKey) -> Option<VerifiedPolicy> {
        self.lock().jobs.get(&job_key).map(|r| r.policy.clone())
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

    fn bound(
        &self,
        job_key: JobKey,
        serial: snas_wire::PolicySerial,
        name: &str,
        ip: IpAddr,
        rules: &[snas_bpf::PortRule],
        lifetime: std::time::Duration,
    ) {
        if !self.record_binding(job_key, serial, name, ip, rules, lifetime) {
            // The policy changed while the answer was installed under the old one: withdraw
            // it (the job resolves the name again under the new policy).
            let _ = self.dataplane.revoke_resolved(job_key, ip);
        }
    }
}

/// The lineage rules of [`snas_policy::check_lineage`] on the agent's view of two policies.
fn lineage(old: &VerifiedPolicy, new: &VerifiedPolicy) -> Result<(), snas_policy::LineageError> {
    use snas_policy::LineageError as L;
    if old.jti != new.jti {
        return Err(L::Jti {
            old: old.jti.clone(),
            new: new.jti.clone(),
        });
    }
    if old.tenant != new.tenant {
        return Err(L::Tenant {
            old: old.tenant.clone(),
            new: new.tenant.clone(),
        });
    }
    if old.job != new.job {
        return Err(L::Job {
            old: old.job.clone(),
            new: new.job.clone(),
        });
    }
    if new.serial <= old.serial {
        return Err(L::Serial {
            old: old.serial,
            new: new.serial,
        });
    }
    Ok(())
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
