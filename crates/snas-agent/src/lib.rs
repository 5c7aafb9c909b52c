//! `snas-agent`: the node agent.
//!
//! Per job it verifies the signed policy, creates the job's network namespace and veth, hands
//! the job to tier 1 (eBPF), serves the job's DNS (a stub that answers repeats from a per-job
//! cache and forwards allowed names to a proxy resolver, installing the answers into tier 1),
//! serves the job's signed policy to the proxies, and tells them when the job ends. Node-wide
//! it health-checks the proxies, keeps tier 1's proxy table and infrastructure set current, and
//! ages tier 1's flow table. State that matters across restarts lives in the kernel
//! (namespaces, veths, pinned maps, and the listening sockets, which a new agent takes over
//! from the running one) and in one small record per job under the state directory; a
//! restarted agent adopts running jobs without touching their traffic or their DNS.
//!
//! # Layout
//! - [`config`]: `agent.toml` parsing and validation (errors name the field).
//! - [`naming`]: job key → namespace and veth names.
//! - [`pool`]: the per-node job subnet allocator (pure).
//! - [`netlink`]: a small blocking rtnetlink client.
//! - [`ethtool`]: turning tx offloads off (SIOCETHTOOL).
//! - [`jobnet`]: one job's namespace + veth + addresses + route; the [`JobNetwork`] guard.
//! - [`seams`]: [`PolicyVerifier`] and [`Dataplane`] traits (real ones wrap snas-policy and
//!   snas-bpf) and in-memory stand-ins.
//! - [`dataplane`]: the production [`Dataplane`] over `snas_bpf::Tier1`.
//! - [`state`]: job records on disk.
//! - [`agent`]: the job table ([`Agent`]): create, adopt at start, live update, delete,
//!   counters, revocations.
//! - [`bindings`]: the ledger of DNS-installed addresses by name (withdrawn on update).
//! - [`lifecycle`]: trust bundle reloads (500 ms poll and SIGHUP) and the revocations directory:
//!   jobs whose key was removed or whose policy is revoked are torn down.
//! - [`dns`]: the DNS stub's decisions (pure): query shape, names, rate bucket, identity option.
//! - [`dns_cache`]: the stub's per-job answer cache (pure, bounded per job and per node).
//! - [`stub`]: the DNS stub's UDP/TCP servers and forwarding to proxy resolvers.
//! - [`proxies`]: the proxy table, health checks, drain, DNS resolver choice.
//! - [`audit`]: the JSON-lines audit log.
//! - [`metrics`]: Prometheus text.
//! - [`upkeep`]: periodic work: flow ageing, job expiry, tier 1's infrastructure set.
//! - [`shutdown`]: the in-process stop signal every serving task waits on.
//! - [`api`]: the HTTP/JSON APIs (Unix socket and the underlay policy endpoint).
//! - [`handover`]: passing the listening sockets to the next agent (hand-over protocol,
//!   systemd's `LISTEN_FDS` and fd store).
//! - [`node`]: the running agent: start-up order, the serving tasks, restart and exit.
//!
//! Operator documentation: `docs/agent.md`.

pub mod agent;
pub mod api;
pub mod audit;
pub mod bindings;
pub mod config;
pub mod dataplane;
pub mod dns;
pub mod dns_cache;
pub mod ethtool;
pub mod handover;
pub mod jobnet;
pub mod lifecycle;
pub mod metrics;
pub mod naming;
pub mod netlink;
pub mod node;
pub mod pool;
pub mod proxies;
pub mod seams;
pub mod shutdown;
pub mod state;
pub mod stub;
pub mod upkeep;

use std::future::Future;
use std::path::Path;
use std::sync::Arc;

pub use agent::{Agent, JobError, JobView, StartError, StartReport};
pub use config::{AgentConfig, ConfigError};
pub use jobnet::{JobNetInfo, JobNetwork};
pub use node::RunError;
pub use seams::{Dataplane, PolicyVerifier, RecordingDataplane, VerifiedPolicy, VerifyError};

/// The verifier and dataplane the agent runs with in production.
pub fn production_components(config: &AgentConfig) -> Result<Components, RunError> {
    let verifier =
        seams::BundleVerifier::load(&config.trust_bundle).map_err(|e| RunError::TrustBundle {
            path: config.trust_bundle.clone(),
            detail: e.to_string(),
        })?;
    let dataplane = dataplane::Tier1Dataplane::load(config).map_err(RunError::Dataplane)?;
    Ok(Components {
        verifier: Arc::new(verifier),
        dataplane: Arc::new(dataplane),
    })
}

/// The agent's replaceable parts.
#[derive(Clone)]
pub struct Components {
    /// Policy verification.
    pub verifier: Arc<dyn PolicyVerifier>,
    /// Tier-1 programming.
    pub dataplane: Arc<dyn Dataplane>,
}

impl std::fmt::Debug for Components {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Components")
    }
}

/// Runs the agent with production components until `shutdown` completes (or it has handed
/// its sockets to a new agent, see [`handover`]); takes systemd's sockets and notification
/// socket from the environment.
pub async fn serve(
    config: AgentConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), RunError> {
    let opts = node::RunOptions::from_env()?;
    let cfg = config.clone();
    let c = tokio::task::spawn_blocking(move || production_components(&cfg))
        .await
        .map_err(|e| RunError::Runtime(std::io::Error::other(e.to_string())))??;
    node::run(config, c.verifier, c.dataplane, shutdown, opts).await
}

/// Runs the agent with the given components until `shutdown` completes: the job API, the
/// policy endpoint, the DNS stub (UDP and TCP on `dns_listen:53`), the proxy health checker,
/// the periodic work, the audit log writer and, if configured, the metrics listener. Takes the
/// sockets over from an agent running with the same `state_dir`, if there is one.
pub async fn serve_with(
    config: AgentConfig,
    verifier: Arc<dyn PolicyVerifier>,
    dataplane: Arc<dyn Dataplane>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), RunError> {
    node::run(
        config,
        verifier,
        dataplane,
        shutdown,
        node::RunOptions::default(),
    )
    .await
}

/// `snas agent --config <path>`: loads the configuration and serves until SIGINT or SIGTERM.
/// Running jobs survive the agent's exit and are adopted by the next start.
pub fn run(config_path: &Path) -> Result<(), RunError> {
    let config = AgentConfig::from_toml_file(config_path)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(RunError::Runtime)?;
    rt.block_on(serve(config, shutdown_signal()))
}

/// Completes on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let term = signal(SignalKind::terminate());
    let int = signal(SignalKind::interrupt());
    match (term, int) {
        (Ok(mut t), Ok(mut i)) => {
            tokio::select! {
                _ = t.recv() => {}
                _ = i.recv() => {}
            }
        }
        _ => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_reports_the_bad_field_before_touching_the_system() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.toml");
        std::fs::write(
            &path,
            "underlay_interface = \"eth0\"\nunderlay_address = \"192.0.2.7\"\ntrust_bundle = \"/t\"\njob_prefix_len = 24\n",
        )
        .unwrap();
        let err = run(&path).unwrap_err();
        assert!(
            matches!(&err, RunError::Config(c) if c.field() == Some("job_prefix_len")),
            "{err}"
        );
        assert!(err.to_string().contains("agent.toml"), "{err}");
    }

    #[test]
    fn missing_trust_bundle_is_named() {
        let config = AgentConfig::from_toml_str(
            "underlay_interface = \"eth0\"\nunderlay_address = \"192.0.2.7\"\ntrust_bundle = \"/nonexistent/snas-trust\"\n",
            Path::new("agent.toml"),
        )
        .unwrap();
        let err = production_components(&config).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("trust_bundle /nonexistent/snas-trust"),
            "{err}"
        );
    }
}
