//! Policy lifecycle duties of the running agent that nothing on the data path triggers:
//! trust bundle reloads, the revocations directory, and the teardown of jobs that lose their
//! trust.
//!
//! - **Trust bundle**: every [`POLL`] (500 ms; at once on SIGHUP) the trust bundle is reloaded
//!   from `trust_bundle` ([`crate::PolicyVerifier::reload`]). A poll rather than inotify:
//!   trust directories are often projected (Kubernetes ConfigMaps and Secrets swap a `..data`
//!   symlink, which inotify reports on the symlink, not the files), on network file systems,
//!   or replaced by configuration management with rename tricks; reading a handful of small
//!   files twice a second costs nothing, needs no watcher state, and bounds the delay to half
//!   a second, well within the 2 s promised. A bad file is reported (path, reason) once per change of
//!   the set of problems and leaves the good keys in place; a directory with no good key keeps
//!   the previous bundle. When a key is removed (or its public key replaced), every running job
//!   whose token no longer verifies is torn down, audited `key_untrusted`.
//! - **Revocations directory** (`revocations_dir`): every [`POLL`] new or changed files are read
//!   (one signed revocation per file, at most 8 KiB; names starting with `.` are ignored) and
//!   applied like `POST /v1/revocations`: covered jobs are torn down, audited `revoked`. A bad
//!   file is logged once per version of the file.
//! - Every [`POLL`], DNS bindings and revocations that have ended are forgotten.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use snas_policy::audit::Kind;
use snas_wire::JobKey;
use tokio::sync::{watch, Notify};

use crate::api::Ops;
use crate::audit::{Action, AuditRecord};
use crate::naming::job_key_hex;

/// Time between trust bundle reloads and revocation directory scans: 500 ms, so that a
/// revocation written into `revocations_dir` tears its job down within 1 s with margin.
pub const POLL: Duration = snas_policy::revocation_fs::SCAN_INTERVAL;

/// Why the agent tore a job down by itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Teardown {
    /// A revocation covers the job's policy.
    Revoked,
    /// The key that signed the job's policy is no longer trusted.
    KeyUntrusted,
}

impl Teardown {
    /// The audit reason.
    pub fn name(self) -> &'static str {
        match self {
            Teardown::Revoked => "revoked",
            Teardown::KeyUntrusted => "key_untrusted",
        }
    }
}

/// Tears a job down (as `DELETE /v1/jobs/{job}`: tier 1, network, record, DNS state, proxies
/// told), audited with `why`. Returns whether the job was removed.
pub async fn tear_down(ops: &Arc<Ops>, job_key: JobKey, why: Teardown, detail: &str) -> bool {
    let policy = ops.agent.policy_of(job_key);
    let agent = ops.agent.clone();
    let r = tokio::task::spawn_blocking(move || agent.delete_job(job_key)).await;
    match r {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            tracing::error!(job_key = %job_key_hex(job_key), why = why.name(), error = %e, "job teardown failed");
            return false;
        }
        Err(e) => {
            tracing::error!(job_key = %job_key_hex(job_key), error = %e, "job teardown task failed");
            return false;
        }
    }
    ops.stub.forget(job_key);
    tokio::spawn(crate::proxies::announce_job_ended(
        ops.proxies.clone(),
        job_key,
        ops.ended.clone(),
        crate::api::END_NOTICE_TIMEOUT,
    ));
    let (tenant, job) = policy.map(|p| (p.tenant, p.job)).unwrap_or_default();
    tracing::warn!(job_key = %job_key_hex(job_key), %tenant, %job, why = why.name(), detail, "job torn down");
    ops.audit.emit(AuditRecord {
        time: crate::audit::rfc3339(SystemTime::now()),
        tier: 1,
        kind: Some(Kind::Job),
        action: Action::End,
        tenant,
        job,
        job_key,
        proto: String::new(),
        src: None,
        dst: None,
        port: 0,
        hostname: None,
        rule: None,
        reason: why.name().to_owned(),
        bytes: 0,
        qtype: None,
        addrs: Vec::new(),
        suppressed: 0,
    });
    true
}

/// Applies a revocation token (API or directory): records it and tears down the jobs it
/// covers. Returns the revocation's job key and how many jobs were torn down.
pub async fn apply_revocation(
    ops: &Arc<Ops>,
    token: &str,
) -> Result<(JobKey, usize), crate::agent::JobError> {
    let agent = ops.agent.clone();
    let t = token.to_owned();
    let (r, covered, new) = tokio::task::spawn_blocking(move || agent.revoke(&t))
        .await
        .map_err(|e| crate::agent::JobError::Internal(e.to_string()))??;
    if new {
        tracing::info!(job_key = %r.job_key(), tenant = %r.tenant, job = %r.job, serial_min = r.serial_min, serial_max = r.serial_max, exp = r.exp, "revocation recorded");
    }
    let mut n = 0;
    for k in covered {
        let detail = format!("serials {}..={}", r.serial_min, r.serial_max);
        if tear_down(ops, k, Teardown::Revoked, &detail).await {
            n += 1;
        }
    }
    Ok((r.job_key(), n))
}

/// Reloads the trust bundle and tears down jobs it no longer trusts. `last_problems` keeps the
/// previous set of problems so that each change is logged once.
pub async fn reload_trust(ops: &Arc<Ops>, last_problems: &mut BTreeSet<(PathBuf, String)>) {
    let agent = ops.agent.clone();
    let reload = tokio::task::spawn_blocking(move || {
        let r = agent.verifier().reload();
        let untrusted = match &r {
            Some(r) if !r.diff.removed.is_empty() || !r.diff.replaced.is_empty() => {
                agent.untrusted_jobs()
            }
            _ => Vec::new(),
        };
        (r, untrusted)
    })
    .await;
    let Ok((Some(r), untrusted)) = reload else {
        return;
    };
    let problems: BTreeSet<(PathBuf, String)> = r.problems.iter().cloned().collect();
    if &problems != last_problems {
        for (path, reason) in problems.difference(last_problems) {
            tracing::warn!(file = %path.display(), %reason, kept_previous = r.kept_previous, "trust bundle: file not loaded");
        }
        *last_problems = problems;
    }
    if !r.diff.is_empty() {
        tracing::info!(added = ?r.diff.added, removed = ?r.diff.removed, replaced = ?r.diff.replaced, "trust bundle reloaded");
    }
    for (k, e) in untrusted {
        if e.reason == snas_wire::Reason::KeyUntrusted {
            tear_down(ops, k, Teardown::KeyUntrusted, &e.detail).await;
        }
    }
}

pub use snas_policy::revocation_fs::{read_revocation, DirScan};

/// Runs the duties of the module docs until `stop` is set. `hup` is notified on SIGHUP.
pub async fn run(
    ops: Arc<Ops>,
    revocations_dir: Option<PathBuf>,
    hup: Arc<Notify>,
    mut stop: watch::Receiver<bool>,
) {
    let mut problems = BTreeSet::new();
    let mut scan = DirScan::default();
    let mut tick = tokio::time::interval(POLL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = hup.notified() => tracing::info!("SIGHUP: reloading the trust bundle"),
            _ = stop.changed() => return,
        }
        if *stop.borrow() {
            return;
        }
        reload_trust(&ops, &mut problems).await;
        if let Some(dir) = &revocations_dir {
            for path in scan.changed(dir) {
                let applied = match read_revocation(&path) {
                    Ok(t) => apply_revocation(&ops, &t).await.map_err(|e| e.to_string()),
                    Err(e) => Err(e),
                };
                if let Err(e) = applied {
                    tracing::warn!(file = %path.display(), error = %e, "revocations_dir: file not applied");
                }
            }
        }
        let agent = ops.agent.clone();
        let _ = tokio::task::spawn_blocking(move || agent.sweep_bindings()).await;
    }
}
