//! The agent's periodic work: flow ageing, job expiry, tier 1's infrastructure set.
//!
//! Owns three duties that nothing else triggers:
//! - every [`AGE_INTERVAL`] tier 1's flow table is aged (`Dataplane::age_flows`, on a blocking
//!   thread): closed and idle flows are forgotten and each job's connection count is
//!   recounted, so a job is never locked out by a count that only ever grew;
//! - every [`EXPIRY_INTERVAL`] the jobs whose policy `exp` has passed are noticed (logged once,
//!   counted; `snas jobs` shows them `expired`, the DNS stub refuses their queries as
//!   `policy_expired`, tier 1 refuses their packets by itself) and the DNS stub forgets the
//!   state of jobs that are gone;
//! - tier 1's node-wide infrastructure set ([`infrastructure`]: `infrastructure_set()` of the
//!   configuration plus every proxy address ever seen) is installed at start — a failure
//!   there stops the agent (fail closed) — and again whenever proxy discovery adds an
//!   address; a later failure is logged and counted, and retried at the next ageing tick.
//!
//! Failures are logged at most once per [`FAILURE_LOG_EVERY`] per duty, and counted.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::agent::Agent;
use crate::config::AgentConfig;
use crate::proxies::Proxies;
use crate::seams::{Dataplane, DataplaneError};
use crate::stub::DnsStub;

/// Time between flow-table agings.
pub const AGE_INTERVAL: Duration = Duration::from_secs(5);
/// Time between expiry checks.
pub const EXPIRY_INTERVAL: Duration = Duration::from_secs(1);
/// A failing duty is logged at most this often.
pub const FAILURE_LOG_EVERY: Duration = Duration::from_secs(60);

/// Lets a log line through at most once per period.
#[derive(Debug, Default)]
pub struct LogLimiter {
    last: Mutex<Option<Instant>>,
}

impl LogLimiter {
    /// True if nothing was let through in the last `every`.
    pub fn allow(&self, every: Duration) -> bool {
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        if last.is_some_and(|t| now.duration_since(t) < every) {
            return false;
        }
        *last = Some(now);
        true
    }
}

/// Counters of the periodic work.
#[derive(Debug, Default)]
pub struct UpkeepStats {
    ageing_runs: AtomicU64,
    ageing_failures: AtomicU64,
    infra_updates: AtomicU64,
    infra_failures: AtomicU64,
    jobs_expired: AtomicU64,
    ageing_log: LogLimiter,
    infra_log: LogLimiter,
    /// The last infrastructure update failed: try again at the next ageing tick.
    infra_stale: AtomicBool,
}

/// A copy of [`UpkeepStats`] for metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UpkeepCounts {
    /// Flow-table agings run.
    pub ageing_runs: u64,
    /// Of which failed.
    pub ageing_failures: u64,
    /// Infrastructure sets installed.
    pub infra_updates: u64,
    /// Infrastructure installs that failed.
    pub infra_failures: u64,
    /// Jobs noticed expired.
    pub jobs_expired: u64,
}

impl UpkeepStats {
    /// The counters now.
    pub fn counts(&self) -> UpkeepCounts {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        UpkeepCounts {
            ageing_runs: g(&self.ageing_runs),
            ageing_failures: g(&self.ageing_failures),
            infra_updates: g(&self.infra_updates),
            infra_failures: g(&self.infra_failures),
            jobs_expired: g(&self.jobs_expired),
        }
    }
}

/// Tier 1's infrastructure set: the configuration's (configured prefixes and what the agent
/// knows: its own address, configured proxies, the job pool, metadata) plus `proxies`.
pub fn infrastructure(config: &AgentConfig, proxies: &[Ipv4Addr]) -> Vec<ipnet::IpNet> {
    let mut out = config.infrastructure_set();
    out.extend(proxies.iter().map(|ip| ipnet::IpNet::from(IpAddr::V4(*ip))));
    out.sort();
    out.dedup();
    out
}

/// Installs the infrastructure set in tier 1 (on a blocking thread); counts the outcome.
pub async fn install_infrastructure(
    dp: &Arc<dyn Dataplane>,
    nets: Vec<ipnet::IpNet>,
    stats: &UpkeepStats,
) -> Result<(), DataplaneError> {
    let dp = dp.clone();
    let r = tokio::task::spawn_blocking(move || dp.set_infrastructure(&nets))
        .await
        .unwrap_or_else(|e| Err(DataplaneError(format!("infrastructure task: {e}"))));
    let c = if r.is_ok() {
        &stats.infra_updates
    } else {
        &stats.infra_failures
    };
    c.fetch_add(1, Ordering::Relaxed);
    stats.infra_stale.store(r.is_err(), Ordering::Relaxed);
    r
}

async fn refresh_infrastructure(
    config: &AgentConfig,
    proxies: &Proxies,
    dp: &Arc<dyn Dataplane>,
    stats: &UpkeepStats,
) {
    let nets = infrastructure(config, &proxies.snapshot().addresses());
    if let Err(e) = install_infrastructure(dp, nets, stats).await {
        if stats.infra_log.allow(FAILURE_LOG_EVERY) {
            tracing::warn!(error = %e, "tier 1 infrastructure set not updated; retrying");
        }
    }
}

async fn age(dp: &Arc<dyn Dataplane>, stats: &UpkeepStats) {
    let d = dp.clone();
    let r = tokio::task::spawn_blocking(move || d.age_flows())
        .await
        .unwrap_or_else(|e| Err(DataplaneError(format!("ageing task: {e}"))));
    stats.ageing_runs.fetch_add(1, Ordering::Relaxed);
    if let Err(e) = r {
        stats.ageing_failures.fetch_add(1, Ordering::Relaxed);
        if stats.ageing_log.allow(FAILURE_LOG_EVERY) {
            tracing::warn!(error = %e, "tier 1 flow table not aged");
        }
    }
}

fn notice_expiries(agent: &Agent, stub: &DnsStub, stats: &UpkeepStats) {
    for j in agent.newly_expired() {
        stats.jobs_expired.fetch_add(1, Ordering::Relaxed);
        tracing::info!(job = %j.job, job_key = %j.job_key, expires_at = j.expires_at, "job expired: its DNS and packets are refused until it is deleted");
    }
    stub.forget_gone();
}

/// The periodic work until `shutdown` turns true.
pub async fn run(
    config: AgentConfig,
    agent: Arc<Agent>,
    stub: Arc<DnsStub>,
    proxies: Arc<Proxies>,
    dp: Arc<dyn Dataplane>,
    stats: Arc<UpkeepStats>,
    shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let stop = crate::shutdown::stopped(shutdown);
    tokio::pin!(stop);
    let mut members = proxies.watch_members();
    members.mark_unchanged();
    let mut ageing = tokio::time::interval(AGE_INTERVAL);
    ageing.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut expiry = tokio::time::interval(EXPIRY_INTERVAL);
    expiry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = &mut stop => return,
            _ = ageing.tick() => {
                age(&dp, &stats).await;
                if stats.infra_stale.load(Ordering::Relaxed) {
                    refresh_infrastructure(&config, &proxies, &dp, &stats).await;
                }
            }
            _ = expiry.tick() => notice_expiries(&agent, &stub, &stats),
            r = members.changed() => {
                if r.is_err() {
                    return;
                }
                refresh_infrastructure(&config, &proxies, &dp, &stats).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn infrastructure_adds_every_proxy_to_the_configured_set() {
        let c = AgentConfig::from_toml_str(
            "underlay_interface = \"eth0\"\nunderlay_address = \"192.0.2.7\"\ntrust_bundle = \"/t\"\nproxies = [\"198.51.100.1\"]\n",
            std::path::Path::new("agent.toml"),
        )
        .unwrap();
        let nets = infrastructure(
            &c,
            &[
                "198.51.100.1".parse().unwrap(),
                "198.51.100.9".parse().unwrap(),
            ],
        );
        let shown: Vec<String> = nets.iter().map(|n| n.to_string()).collect();
        assert!(shown.contains(&"198.51.100.9/32".to_owned()), "{shown:?}");
        assert_eq!(
            shown.iter().filter(|s| *s == "198.51.100.1/32").count(),
            1,
            "no duplicates"
        );
        assert!(shown.contains(&"192.0.2.7/32".to_owned()));
    }

    #[test]
    fn the_log_limiter_lets_one_line_through_per_period() {
        let l = LogLimiter::default();
        assert!(l.allow(Duration::from_secs(60)));
        assert!(!l.allow(Duration::from_secs(60)));
        assert!(l.allow(Duration::ZERO));
    }
}
