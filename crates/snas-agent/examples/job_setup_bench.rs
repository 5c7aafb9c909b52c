//! Job network set-up latency: creates N jobs (default 200), keeps them all up, then tears them
//! down, and prints p50/p99/max for create and teardown — once for the bare network
//! (`JobNetwork::create`) and once through the agent (`Agent::create_job`: stand-in verifier,
//! subnet allocation, network, in-memory dataplane, fsync'd job record).
//!
//! Run as root: `cargo run -p snas-agent --release --example job_setup_bench [-- N]`.
//! Uses a unique namespace prefix and the pool 10.253.0.0/16; removes everything it made, also
//! when interrupted by a panic.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use snas_agent::config::AgentConfig;
use snas_agent::jobnet::{self, JobNetInfo, JobNetwork};
use snas_agent::naming::JobNames;
use snas_agent::pool::SubnetPool;
use snas_agent::seams::{PolicyVerifier, RecordingDataplane, VerifiedPolicy, VerifyError};
use snas_agent::Agent;

struct Cleanup {
    prefix: String,
    pins: std::path::PathBuf,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = snas_bpf::remove_pins(&self.pins);
        if let Ok(rd) = std::fs::read_dir("/run/netns") {
            for e in rd.flatten() {
                if e.file_name().to_string_lossy().starts_with(&self.prefix) {
                    let _ = jobnet::remove_netns(&e.path());
                }
            }
        }
    }
}

/// Accepts tokens `bench-<n>`.
struct BenchVerifier;

impl PolicyVerifier for BenchVerifier {
    fn verify(&self, token: &str, now: SystemTime) -> Result<VerifiedPolicy, VerifyError> {
        let n: u64 = token
            .strip_prefix("bench-")
            .and_then(|n| n.parse().ok())
            .ok_or_else(|| VerifyError {
                reason: snas_wire::Reason::PolicyInvalid,
                detail: "not a bench token".into(),
            })?;
        Ok(VerifiedPolicy {
            jti: token.into(),
            tenant: "bench".into(),
            job: token.into(),
            serial: 1,
            node: None,
            expires_at_unix: now
                .duration_since(SystemTime::UNIX_EPOCH)
                .map(|d| d.as_secs() + 600)
                .unwrap_or(0),
            job_key: 0xbe00_0000_0000_0000 | n,
            tenant_id: 1,
            claims: Some(snas_policy::PolicyDraft::new("bench", token).to_claims(token, 1, now)),
        })
    }
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    let idx = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[idx]
}

fn print(label: &str, mut d: Vec<Duration>) {
    d.sort();
    let ms = |x: Duration| x.as_secs_f64() * 1e3;
    println!(
        "{label:<28} n={:<4} p50={:>7.2} ms  p99={:>7.2} ms  max={:>7.2} ms",
        d.len(),
        ms(pct(&d, 0.50)),
        ms(pct(&d, 0.99)),
        ms(*d.last().unwrap_or(&Duration::ZERO)),
    );
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let n: u32 = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(200);
    let prefix = format!("snb{}-", std::process::id());
    let pins = std::path::PathBuf::from(format!("/sys/fs/bpf/snb{}", std::process::id()));
    let _cleanup = Cleanup {
        prefix: prefix.clone(),
        pins: pins.clone(),
    };

    // 1. Bare job network.
    let pool = SubnetPool::new("10.253.0.0/16".parse()?, 30);
    let mut nets = Vec::new();
    let mut create = Vec::new();
    for i in 0..n {
        let names = JobNames::derive(&prefix, "snb", u64::from(i));
        let info = JobNetInfo::new(
            &names,
            pool.addrs(i)?,
            1444,
            std::path::Path::new("/run/netns"),
        );
        let t = Instant::now();
        nets.push(JobNetwork::create(info)?);
        create.push(t.elapsed());
    }
    let mut teardown = Vec::new();
    for net in nets {
        let t = Instant::now();
        net.teardown()?;
        teardown.push(t.elapsed());
    }
    print("network create", create);
    print("network teardown", teardown);

    // 2. Through the agent, with the in-memory dataplane and with real tier 1 (the policy is a
    // stand-in with default limits and no rules: tier 1 gets the job configuration and attachment).
    agent_phase(
        &prefix,
        "a-",
        "agent",
        Arc::new(RecordingDataplane::default()),
        n,
    )?;
    snas_bpf::ensure_bpffs()?;
    let mut node =
        snas_bpf::NodeConfig::new("bench", 1, std::net::Ipv4Addr::new(192, 0, 2, 7), 1500);
    node.attach_uplink = false;
    node.pin_dir = pins;
    let tier1 = snas_agent::dataplane::Tier1Dataplane::from_tier1(snas_bpf::Tier1::load(&node)?);
    agent_phase(&prefix, "t-", "agent+tier1", Arc::new(tier1), n)?;
    Ok(())
}

fn agent_phase(
    prefix: &str,
    sub: &str,
    label: &str,
    dataplane: Arc<dyn snas_agent::Dataplane>,
    n: u32,
) -> Result<(), Box<dyn std::error::Error>> {
    let state = std::env::temp_dir().join(format!("snas-bench-{}{sub}", std::process::id()));
    let config = AgentConfig::from_toml_str(
        &format!(
            r#"
underlay_interface = "lo"
underlay_address = "192.0.2.7"
trust_bundle = "/nonexistent"
job_pool = "10.253.0.0/16"
state_dir = "{}"
netns_prefix = "{prefix}{sub}"
host_veth_prefix = "snb"
"#,
            state.display()
        ),
        std::path::Path::new("bench.toml"),
    )?;
    let (agent, _) = Agent::start(config, Arc::new(BenchVerifier), dataplane)?;
    let mut create = Vec::new();
    let mut keys = Vec::new();
    for i in 0..n {
        let t = Instant::now();
        let view = agent.create_job(&format!("bench-{i}"))?;
        create.push(t.elapsed());
        keys.push(agent.resolve(&view.job_key)?);
    }
    let mut delete = Vec::new();
    for k in keys {
        let t = Instant::now();
        agent.delete_job(k)?;
        delete.push(t.elapsed());
    }
    let _ = std::fs::remove_dir_all(&state);
    print(&format!("{label} create_job"), create);
    print(&format!("{label} delete_job"), delete);
    Ok(())
}
