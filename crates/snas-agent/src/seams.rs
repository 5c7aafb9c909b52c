//! The agent's seams to policy verification and to the tier-1 dataplane.
//!
//! Owns two small traits so that job network set-up and the API are testable without the real
//! implementations: [`PolicyVerifier`] (signed policy → identity of the job) and [`Dataplane`]
//! (attach/detach tier-1 programs for a job, fill its maps, read its counters). The real
//! implementations wrap `snas_policy::verify` and `snas_bpf`; [`RecordingDataplane`] is the
//! in-memory stand-in for tests (its counters are all zero; it records DNS-installed addresses
//! and proxy sets).
//!
//! # Invariants
//! - Implementations are called from blocking threads (never on the async executor).
//! - `detach_job` is idempotent.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};
use snas_bpf::{PortRule, ProxyEntry};
use snas_wire::{JobKey, PolicySerial, Reason, TenantId};

use crate::jobnet::JobNetInfo;

/// The parts of a verified policy the agent needs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerifiedPolicy {
    /// Policy id (`jti`).
    pub jti: String,
    /// Tenant name.
    pub tenant: String,
    /// Job name.
    pub job: String,
    /// Policy serial (increases on live update).
    pub serial: PolicySerial,
    /// The node the job is scheduled on, if the policy names one.
    pub node: Option<IpAddr>,
    /// Expiry (`exp`), seconds since the Unix epoch.
    pub expires_at_unix: u64,
    /// `identity::job_key(jti)`.
    pub job_key: JobKey,
    /// `identity::tenant_id(tenant)`.
    pub tenant_id: TenantId,
    /// The full signed claims (rules, limits), when the verifier is the real one. Kept in the
    /// job record so that a restarted agent can reprogram tier 1 without re-verifying an
    /// ephemeral (possibly since expired) token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub claims: Option<snas_policy::PolicyClaims>,
}

impl VerifiedPolicy {
    /// Expiry as a `SystemTime`.
    pub fn expires_at(&self) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(self.expires_at_unix)
    }
}

/// Why a policy was refused. `reason` is [`Reason::PolicyExpired`] or [`Reason::PolicyInvalid`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{reason}: {detail}")]
pub struct VerifyError {
    /// The drop reason this refusal is counted under.
    pub reason: Reason,
    /// Human-readable detail naming the field and the problem.
    pub detail: String,
}

/// What a trust bundle reload found (see [`PolicyVerifier::reload`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TrustReload {
    /// What changed (empty when nothing did, or the reload kept the old bundle).
    pub diff: snas_policy::bundle::BundleDiff,
    /// Bad files (path, reason); their keys are not loaded, the good keys stay.
    pub problems: Vec<(std::path::PathBuf, String)>,
    /// No good key was found: the previous bundle is kept.
    pub kept_previous: bool,
}

/// Verifies signed policy tokens.
pub trait PolicyVerifier: Send + Sync + 'static {
    /// Verifies `token` at time `now`.
    fn verify(&self, token: &str, now: SystemTime) -> Result<VerifiedPolicy, VerifyError>;

    /// Verifies a signed revocation ([`snas_policy::revocation`]) at `now`. The default refuses
    /// every revocation (a verifier without trust keys cannot check one).
    fn verify_revocation(
        &self,
        token: &str,
        now: SystemTime,
    ) -> Result<snas_policy::revocation::RevocationClaims, VerifyError> {
        let _ = (token, now);
        Err(VerifyError {
            reason: Reason::PolicyInvalid,
            detail: "this verifier does not check revocations".into(),
        })
    }

    /// Whether the signature of a token accepted earlier still verifies against the current
    /// trust bundle (its times are not checked): `Err` with reason `key_untrusted` once its key
    /// has been removed. The default accepts every token.
    fn recheck(&self, token: &str) -> Result<(), VerifyError> {
        let _ = token;
        Ok(())
    }

    /// Reloads the trust bundle from where it was loaded. `None` when the verifier has no
    /// source to reload from (the default).
    fn reload(&self) -> Option<TrustReload> {
        None
    }
}

/// A dataplane failure (message from the implementation).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("dataplane: {0}")]
pub struct DataplaneError(pub String);

/// What the dataplane needs to attach a job.
#[derive(Debug, Clone, Copy)]
pub struct JobAttachment<'a> {
    /// The job's verified policy (identity, serial).
    pub policy: &'a VerifiedPolicy,
    /// The raw signed token (for implementations that compile rules themselves).
    pub token: &'a str,
    /// The job's network.
    pub net: &'a JobNetInfo,
}

/// Tier-1 programming for jobs.
pub trait Dataplane: Send + Sync + 'static {
    /// Attaches programs to the job's host veth and fills its maps (new job).
    fn attach_job(&self, job: &JobAttachment<'_>) -> Result<(), DataplaneError>;
    /// Takes over a job found at agent start: programs and pinned maps exist already and must
    /// not be disturbed.
    fn adopt_job(&self, job: &JobAttachment<'_>) -> Result<(), DataplaneError>;
    /// Detaches programs and removes pinned per-job state. Idempotent.
    fn detach_job(&self, job_key: JobKey, net: &JobNetInfo) -> Result<(), DataplaneError>;
    /// Reprograms a running job for a new policy of the same job (live update): identity,
    /// serial, limits and expiry, and the CIDR rules (added, changed and removed ones); the
    /// job's state (pacing, buckets, flows) is kept. The default refuses (a dataplane that
    /// cannot update jobs in place).
    fn update_job(
        &self,
        old: &JobAttachment<'_>,
        new: &JobAttachment<'_>,
    ) -> Result<(), DataplaneError> {
        let _ = new;
        Err(DataplaneError(format!(
            "this dataplane cannot update job {} in place",
            old.policy.job_key
        )))
    }
    /// Deletes the job's entry for `ip` learnt from DNS (every name's rules on it; flows to it
    /// are cut). The default refuses.
    fn revoke_resolved(&self, job_key: JobKey, ip: IpAddr) -> Result<(), DataplaneError> {
        Err(DataplaneError(format!(
            "this dataplane cannot withdraw {ip} of job {job_key}"
        )))
    }
    /// Per-reason drop counters of the job.
    fn counters(&self, job_key: JobKey) -> Result<BTreeMap<Reason, u64>, DataplaneError>;
    /// Allows `ip` for the job on `rules` for `ttl` from now (an address from a DNS answer).
    fn allow_resolved(
        &self,
        job_key: JobKey,
        ip: IpAddr,
        rules: &[PortRule],
        ttl: Duration,
    ) -> Result<(), DataplaneError>;
    /// Replaces the proxy set (positions are stable) and rebuilds proxy selection.
    fn set_proxies(&self, proxies: &[ProxyEntry]) -> Result<(), DataplaneError>;
    /// Replaces the node-wide infrastructure set: destinations refused for every job whatever
    /// its policy says (`infrastructure_denied`).
    fn set_infrastructure(&self, nets: &[ipnet::IpNet]) -> Result<(), DataplaneError>;
    /// Ages the tier-1 flow table: forgets closed and idle flows and recounts each job's open
    /// connections, so that drift in the `max_connections` estimate is corrected. The agent
    /// calls it periodically.
    fn age_flows(&self) -> Result<(), DataplaneError>;
    /// Delivers tier-1 audit events to `on_event` until `stop` is set (blocks; run it on its
    /// own thread). The default has no events and returns at once.
    fn run_audit(
        &self,
        on_event: Box<dyn FnMut(snas_bpf::AuditEvent) + Send>,
        stop: &std::sync::atomic::AtomicBool,
    ) -> Result<(), DataplaneError> {
        let _ = (on_event, stop);
        Ok(())
    }
}

/// One address [`RecordingDataplane`] was asked to allow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllowedAddr {
    /// Job key.
    pub job_key: JobKey,
    /// Address.
    pub ip: IpAddr,
    /// Port rules.
    pub rules: Vec<PortRule>,
    /// Lifetime from the moment of the call.
    pub ttl: Duration,
}

/// In-memory dataplane: remembers attached jobs, reports zero counters. Used until tier 1 is
/// wired in, and in tests.
#[derive(Debug, Default)]
pub struct RecordingDataplane {
    jobs: Mutex<BTreeMap<JobKey, (String, PolicySerial)>>,
    allowed: Mutex<Vec<AllowedAddr>>,
    proxy_sets: Mutex<Vec<Vec<ProxyEntry>>>,
    infrastructure: Mutex<Vec<ipnet::IpNet>>,
    agings: std::sync::atomic::AtomicU64,
    revoked: Mutex<Vec<(JobKey, IpAddr)>>,
}

impl RecordingDataplane {
    /// Job keys currently attached, with their host veth and serial.
    pub fn attached(&self) -> BTreeMap<JobKey, (String, PolicySerial)> {
        self.jobs.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Every `allow_resolved` call so far, in order.
    pub fn allowed(&self) -> Vec<AllowedAddr> {
        self.allowed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Every proxy set installed so far, in order.
    pub fn proxy_sets(&self) -> Vec<Vec<ProxyEntry>> {
        self.proxy_sets
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The infrastructure set last installed.
    pub fn infrastructure(&self) -> Vec<ipnet::IpNet> {
        self.infrastructure
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Every `revoke_resolved` call so far, in order.
    pub fn revoked(&self) -> Vec<(JobKey, IpAddr)> {
        self.revoked
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// How many times [`Dataplane::age_flows`] ran.
    pub fn agings(&self) -> u64 {
        self.agings.load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl Dataplane for RecordingDataplane {
    fn attach_job(&self, job: &JobAttachment<'_>) -> Result<(), DataplaneError> {
        self.jobs.lock().unwrap_or_else(|p| p.into_inner()).insert(
            job.policy.job_key,
            (job.net.host_veth.clone(), job.policy.serial),
        );
        Ok(())
    }

    fn adopt_job(&self, job: &JobAttachment<'_>) -> Result<(), DataplaneError> {
        self.attach_job(job)
    }

    fn detach_job(&self, job_key: JobKey, _net: &JobNetInfo) -> Result<(), DataplaneError> {
        self.jobs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&job_key);
        Ok(())
    }

    fn update_job(
        &self,
        old: &JobAttachment<'_>,
        new: &JobAttachment<'_>,
    ) -> Result<(), DataplaneError> {
        let mut jobs = self.jobs.lock().unwrap_or_else(|p| p.into_inner());
        let Some(j) = jobs.get_mut(&old.policy.job_key) else {
            return Err(DataplaneError(format!(
                "job {} is not attached",
                old.policy.job_key
            )));
        };
        j.1 = new.policy.serial;
        Ok(())
    }

    fn revoke_resolved(&self, job_key: JobKey, ip: IpAddr) -> Result<(), DataplaneError> {
        self.revoked
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((job_key, ip));
        Ok(())
    }

    fn counters(&self, job_key: JobKey) -> Result<BTreeMap<Reason, u64>, DataplaneError> {
        if !self
            .jobs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains_key(&job_key)
        {
            return Err(DataplaneError(format!("job {job_key} is not attached")));
        }
        Ok(Reason::ALL.iter().map(|r| (*r, 0)).collect())
    }

    fn allow_resolved(
        &self,
        job_key: JobKey,
        ip: IpAddr,
        rules: &[PortRule],
        ttl: Duration,
    ) -> Result<(), DataplaneError> {
        self.allowed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(AllowedAddr {
                job_key,
                ip,
                rules: rules.to_vec(),
                ttl,
            });
        Ok(())
    }

    fn set_proxies(&self, proxies: &[ProxyEntry]) -> Result<(), DataplaneError> {
        self.proxy_sets
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(proxies.to_vec());
        Ok(())
    }

    fn set_infrastructure(&self, nets: &[ipnet::IpNet]) -> Result<(), DataplaneError> {
        *self
            .infrastructure
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = nets.to_vec();
        Ok(())
    }

    fn age_flows(&self) -> Result<(), DataplaneError> {
        self.agings
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }
}

/// The production verifier: `snas_policy::verify` against the configured trust bundle, which
/// [`PolicyVerifier::reload`] replaces (the agent polls its trust directory and reloads on
/// SIGHUP).
#[derive(Debug)]
pub struct BundleVerifier {
    bundle: std::sync::RwLock<std::sync::Arc<snas_policy::TrustBundle>>,
    source: Option<std::path::PathBuf>,
}

impl BundleVerifier {
    /// A verifier over `bundle` (nothing to reload from).
    pub fn new(bundle: snas_policy::TrustBundle) -> BundleVerifier {
        BundleVerifier {
            bundle: std::sync::RwLock::new(std::sync::Arc::new(bundle)),
            source: None,
        }
    }

    /// Loads the trust bundle (a key file or a directory of `*.pub` files); at start every
    /// file must be good.
    pub fn load(
        path: &std::path::Path,
    ) -> Result<BundleVerifier, snas_policy::bundle_fs::BundleFsError> {
        Ok(BundleVerifier {
            source: Some(path.to_owned()),
            ..BundleVerifier::new(snas_policy::bundle_fs::load_trust_bundle(path)?)
        })
    }

    /// The current bundle.
    pub fn bundle(&self) -> std::sync::Arc<snas_policy::TrustBundle> {
        self.bundle
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

fn refused(e: snas_policy::VerifyError) -> VerifyError {
    VerifyError {
        reason: e.reason(),
        detail: e.to_string(),
    }
}

impl PolicyVerifier for BundleVerifier {
    fn verify(&self, token: &str, now: SystemTime) -> Result<VerifiedPolicy, VerifyError> {
        let v = snas_policy::verify(token, &self.bundle(), now).map_err(refused)?;
        // A serial the overlay cannot carry was already refused by `verify` (claims reading).
        let (job_key, tenant_id, serial) = (v.job_key(), v.tenant_id(), v.claims().serial);
        let c = v.into_claims();
        Ok(VerifiedPolicy {
            jti: c.jti.clone(),
            tenant: c.tenant.clone(),
            job: c.job.clone(),
            serial,
            node: c.node,
            expires_at_unix: c.exp,
            job_key,
            tenant_id,
            claims: Some(c),
        })
    }

    fn verify_revocation(
        &self,
        token: &str,
        now: SystemTime,
    ) -> Result<snas_policy::revocation::RevocationClaims, VerifyError> {
        snas_policy::revocation::verify_revocation(token, &self.bundle(), now)
            .map(|v| v.claims().clone())
            .map_err(refused)
    }

    fn recheck(&self, token: &str) -> Result<(), VerifyError> {
        match snas_policy::jws::verify_ignoring_time(token, &self.bundle()) {
            Ok(_) => Ok(()),
            // A key id whose public key was replaced: the old signature no longer verifies,
            // which is the same loss of trust as a removed key.
            Err(snas_policy::VerifyError::BadSignature(kid)) => Err(VerifyError {
                reason: Reason::KeyUntrusted,
                detail: format!("key `{kid}` was replaced in the trust bundle"),
            }),
            Err(e) => Err(refused(e)),
        }
    }

    fn reload(&self) -> Option<TrustReload> {
        let path = self.source.as_ref()?;
        let r = snas_policy::bundle_fs::reload_trust_bundle(path);
        let Some(next) = r.bundle else {
            return Some(TrustReload {
                problems: r.problems,
                kept_previous: true,
                ..TrustReload::default()
            });
        };
        let mut cur = self.bundle.write().unwrap_or_else(|p| p.into_inner());
        let diff = cur.diff(&next);
        if !diff.is_empty() {
            *cur = std::sync::Arc::new(next);
        }
        Some(TrustReload {
            diff,
            problems: r.problems,
            kept_previous: false,
        })
    }
}
