//! Policy lifecycle at the proxy: live updates, revocations from the control plane, and trust
//! bundle reloads — the duties that let an operator change or cut off a job without trusting
//! its node and without restarting the proxy.
//!
//! - **Live update**: when the fetcher replaces a held policy with a higher serial (the node's
//!   traffic announced it in the overlay option), [`install`]'s hook re-decides the job's flows
//!   under the new policy ([`crate::tier2::Tier2::reevaluate_job`]): flows it no longer allows
//!   end at once (`flow_end` `policy_updated`); new connections to them are refused by the new
//!   policy.
//! - **Revocations** ([`apply_revocation`]): from the management API (`POST /v1/revocations`,
//!   bearer token) or the `revocations_dir` directory (scanned every [`POLL`]). Verified against
//!   the trust bundle, kept in the policy store until the revoked token's `exp`; the job's
//!   packets are dropped as `policy_revoked` from the moment it is recorded and its flows end
//!   (`flow_end` `revoked`) at the engine's next housekeeping tick. The job's node is never
//!   asked: a node that does not cooperate is cut off all the same.
//! - **Trust bundle** ([`reload_trust`]): reloaded every [`POLL`] (500 ms), on SIGHUP, and at
//!   once when a fetched policy names a key id the bundle does not hold (the fetch waits for
//!   that reload and verifies again: `Fetcher::reload_trust_now`). A
//!   poll, not inotify: trust directories are often projected volumes (a `..data` symlink
//!   swap), network file systems or rewritten by configuration management, where file events
//!   are unreliable; reading a few small files twice a second is free and bounds the delay. A key
//!   added is used for the next fetch; a key removed (or replaced) drops the policies it
//!   signed: their jobs' packets are dropped as `key_untrusted` and their flows end
//!   (`flow_end` `key_untrusted`). A bad file is logged (file, reason) once per change and
//!   leaves the good keys in place; a directory without any good key keeps the previous
//!   bundle.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use snas_wire::JobKey;

use crate::shared::Shared;
use crate::tier2::FlowEnd;

/// Time between trust bundle reloads and revocation directory scans: 500 ms, so that a
/// revocation written into `revocations_dir` cuts its job off within 1 s with margin.
pub const POLL: Duration = snas_policy::revocation_fs::SCAN_INTERVAL;

/// Why a revocation was not applied.
#[derive(Debug, thiserror::Error)]
pub enum RevocationError {
    /// It does not verify (signature, key, claims, expired).
    #[error("revocation refused: {0}")]
    Verify(#[from] snas_policy::VerifyError),
    /// The store is full.
    #[error(transparent)]
    Store(#[from] snas_policy::revocation::StoreError),
}

/// Verifies and records a revocation; if it covers the held policy of its job, the job's
/// flows are queued to end. Returns the job key and whether a held policy was covered.
pub fn apply_revocation(shared: &Shared, token: &str) -> Result<(JobKey, bool), RevocationError> {
    let now = SystemTime::now();
    let r = shared.fetcher.verify_revocation(token, now)?;
    let job = r.job_key();
    let names = shared
        .store
        .snapshot()
        .get(job)
        .map(|p| (Arc::clone(&p.tenant), Arc::clone(&p.job)));
    let covered = shared
        .store
        .revoke(&r, snas_policy::claims::unix_secs(now), Instant::now())?;
    if covered {
        shared.engine().end_job(job, FlowEnd::Revoked, names);
    }
    tracing::warn!(job_key = %job, tenant = %r.tenant, job = %r.job, serial_min = r.serial_min, serial_max = r.serial_max, exp = r.exp, covered, "revocation recorded");
    Ok((job, covered))
}

/// Reloads the trust bundle (see the module docs). `last_problems` holds the problems logged
/// last time, so each change is logged once.
pub fn reload_trust(shared: &Shared, last_problems: &mut BTreeSet<(PathBuf, String)>) {
    let r = shared.fetcher.reload_trust(&shared.cfg.trust);
    let problems: BTreeSet<(PathBuf, String)> = r.problems.iter().cloned().collect();
    if &problems != last_problems {
        for (path, reason) in problems.difference(last_problems) {
            tracing::warn!(file = %path.display(), %reason, kept_previous = r.kept_previous, "trust bundle: file not loaded");
        }
        *last_problems = problems;
    }
    if !r.diff.is_empty() {
        tracing::info!(added = ?r.diff.added, removed = ?r.diff.removed, replaced = ?r.diff.replaced, jobs_cut_off = r.untrusted.len(), "trust bundle reloaded");
    }
    if !r.untrusted.is_empty() {
        let mut eng = shared.engine();
        for job in r.untrusted {
            eng.end_job(job, FlowEnd::KeyUntrusted, None);
        }
    }
}

/// Registers the live-update hook on the fetcher (see the module docs).
pub fn install(shared: &Arc<Shared>) {
    let weak = Arc::downgrade(shared);
    shared.fetcher.set_on_replace(Arc::new(move |policy| {
        let Some(s) = weak.upgrade() else {
            return;
        };
        let now = s.now();
        let ended = {
            let mut eng = s.engine();
            let n = eng.reevaluate_job(&policy, now);
            s.flush_audit(&mut eng);
            n
        };
        tracing::info!(job_key = %policy.job_key, serial = policy.serial.0, flows_ended = ended, "job policy updated");
    }));
}

pub use snas_policy::revocation_fs::{read_revocation, DirScan};

/// Reloads the trust bundle and scans `revocations_dir` every [`POLL`], and reloads the trust
/// bundle on SIGHUP, until the daemon stops.
pub async fn run(shared: Arc<Shared>) {
    use tokio::signal::unix::{signal, SignalKind};
    let mut hup = match signal(SignalKind::hangup()) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!(error = %e, "SIGHUP cannot be caught: the trust bundle is reloaded by the 500 ms poll only");
            None
        }
    };
    let mut problems = BTreeSet::new();
    let mut scan = DirScan::default();
    let mut tick = tokio::time::interval(POLL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            Some(()) = async { match hup.as_mut() { Some(h) => h.recv().await, None => std::future::pending().await } } => {
                tracing::info!("SIGHUP: reloading the trust bundle");
            }
            () = shared.fetcher.trust_reload_wanted() => {
                tracing::debug!("a policy names a key id not in the trust bundle: reloading it now");
            }
        }
        if shared.stop.load(std::sync::atomic::Ordering::Relaxed) {
            return;
        }
        let s = Arc::clone(&shared);
        let dir = shared.cfg.revocations_dir.clone();
        let mut p = std::mem::take(&mut problems);
        let mut sc = std::mem::take(&mut scan);
        // File reads and verification off the async threads.
        let back = tokio::task::spawn_blocking(move || {
            let seq = s.fetcher.trust_reload_starting();
            reload_trust(&s, &mut p);
            s.fetcher.trust_reloaded(seq);
            if let Some(dir) = &dir {
                for path in sc.changed(dir) {
                    let applied = read_revocation(&path)
                        .and_then(|t| apply_revocation(&s, &t).map_err(|e| e.to_string()));
                    if let Err(e) = applied {
                        tracing::warn!(file = %path.display(), error = %e, "revocations_dir: file not applied");
                    }
                }
            }
            (p, sc)
        })
        .await;
        match back {
            Ok((p, sc)) => {
                problems = p;
                scan = sc;
            }
            Err(e) => tracing::error!(error = %e, "trust and revocation upkeep task failed"),
        }
    }
}
