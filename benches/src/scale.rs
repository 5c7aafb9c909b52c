//! Scale scenarios: job network set-up with 1, 100 and 1,000 jobs up at once on one node,
//! proxy conntrack + NAT memory at 100k and 1M tracked flows, and a 10,000-rule policy
//! (compile, lookups, parse and verify of the signed token).
//!
//! Owns the measurement loops and their statistics; the workloads come from the crates
//! (`snas_proxy::synthetic` flow fleets, `snas_policy::synthetic` policy), so the criterion
//! benches and these scenarios measure the same thing. Library code: prints only `[scale]`
//! progress lines on stderr; the caller renders the [`ScenarioResult`]s.
//!
//! # Invariants
//! - [`job_setup`] leaves nothing behind: every namespace it makes is named
//!   `snsc<pid>r<run>-…`, its BPF pins live under `/sys/fs/bpf/snsc<pid>r<run>` and its agent
//!   state under the temp directory; a guard removes all three when the function returns or
//!   unwinds (host veths go with their namespaces). A run killed by a signal cannot run its
//!   guard, so each run first removes what runs of dead processes left (`snsc<dead pid>…`).
//! - Job subnets come from `10.252.0.0/20` (agent) and `10.252.16.0/20` (bare network): 1,024
//!   /30 subnets each, apart from the testbed's `10.255.0.0/16`, the agent tests' `10.254.0.0/16`
//!   and the old example's `10.253.0.0/16`.
//!
//! # Limits
//! - [`job_setup`] needs root and at most 1,024 jobs at once; the policy is a stand-in (default
//!   limits, no rules), so tier 1 gets a job configuration and attachment but no rule maps.
//! - Percentiles are nearest-rank; with one sample (1 job) p50 = p99 = max.
//! - [`proxy_memory`] RSS growth is read from `/proc/self/status` and includes allocator slack;
//!   the computed figure is the tables' capacities.

use std::collections::BTreeMap;
use std::hint::black_box;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use serde_json::json;
use snas_agent::config::AgentConfig;
use snas_agent::jobnet::{self, JobNetInfo, JobNetwork};
use snas_agent::naming::JobNames;
use snas_agent::pool::SubnetPool;
use snas_agent::seams::{PolicyVerifier, VerifiedPolicy, VerifyError};
use snas_agent::Agent;
use snas_policy::matcher::compile_rules;
use snas_policy::{synthetic as policy_synth, PolicyDraft, PolicyKey, Transport, TrustBundle};
use snas_proxy::synthetic as flow_synth;

use crate::results::{BarChart, BarSeries, BarValue, GoalCheck, ScenarioResult, Table};
use crate::stats::{self, Summary};

/// Errors of the scale scenarios; each names the scenario, the step and the reason.
#[derive(Debug, thiserror::Error)]
pub enum ScaleError {
    /// job_setup creates namespaces, veths and BPF programs.
    #[error("job_setup: needs root (effective uid {uid} in /proc/self/status)")]
    NotRoot { uid: u32 },
    /// More jobs than the subnet pool holds.
    #[error("job_setup: {count} jobs do not fit the pool {pool} ({slots} /30 subnets)")]
    PoolTooSmall {
        count: usize,
        pool: &'static str,
        slots: usize,
    },
    /// Nothing to measure.
    #[error("{scenario}: {what} is empty or zero")]
    Empty {
        scenario: &'static str,
        what: &'static str,
    },
    /// A step of the job set-up failed.
    #[error("job_setup: {step}: {reason}")]
    JobSetup { step: String, reason: String },
    /// Building or filling the synthetic conntrack failed.
    #[error("proxy_memory: {flows} flows: {reason}")]
    ProxyMemory { flows: usize, reason: String },
    /// Building the synthetic policy or its token failed.
    #[error("policy_10k: {step}: {reason}")]
    Policy { step: &'static str, reason: String },
}

fn job_err(step: impl Into<String>, e: impl std::fmt::Display) -> ScaleError {
    ScaleError::JobSetup {
        step: step.into(),
        reason: e.to_string(),
    }
}

fn policy_err(step: &'static str, e: impl std::fmt::Display) -> ScaleError {
    ScaleError::Policy {
        step,
        reason: e.to_string(),
    }
}

// ---------------------------------------------------------------------------------------------
// Statistics (pure)

/// Median with min and max of per-repetition values, as a bar with whiskers.
/// `None` when there are no values (a series that never ran shows as missing, not as 0).
fn spread(values: &[f64]) -> Option<BarValue> {
    let (lo, hi) = stats::min_max(values)?;
    Some(BarValue::spread(stats::median(values)?, lo, hi))
}

/// `median [min–max]` with `prec` decimals (the whiskers only when the reps differ); `n/a`
/// when nothing was measured.
fn cell(v: Option<BarValue>, prec: usize) -> String {
    match v {
        None => "n/a".into(),
        Some(BarValue {
            value,
            low: Some(lo),
            high: Some(hi),
        }) if hi > lo => format!("{value:.prec$} [{lo:.prec$}–{hi:.prec$}]"),
        Some(v) => format!("{:.prec$}", v.value),
    }
}

/// `x` with `prec` decimals, or `n/a`.
fn num(x: Option<f64>, prec: usize) -> String {
    x.map_or_else(|| "n/a".into(), |x| format!("{x:.prec$}"))
}

/// The order of the job series: all counts once per repetition (1, 100, 1000, 1, 100, …), so
/// slow drift of the machine spreads over every count instead of biasing one.
fn series_order(counts: &[usize], reps: usize) -> Vec<(usize, usize)> {
    (0..reps)
        .flat_map(|r| counts.iter().map(move |&c| (r, c)))
        .collect()
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

// ---------------------------------------------------------------------------------------------
// Job set-up

/// Agent job subnets (1,024 /30s).
const AGENT_POOL: &str = "10.252.0.0/20";
/// Bare-network subnets (1,024 /30s), apart from the agent's so lingering veths never overlap.
const BARE_POOL: &str = "10.252.16.0/20";
const POOL_SLOTS: usize = 1024;
const NETNS_DIR: &str = "/run/netns";
const BPFFS: &str = "/sys/fs/bpf";
/// Prefix of everything job_setup names; followed by `<pid>r<run>-`.
const PREFIX: &str = "snsc";

/// Distinguishes runs within one process, so a second call never meets the first's names.
static RUN: AtomicU32 = AtomicU32::new(0);

/// Removes every object of one run when dropped, also while unwinding from a panic.
struct RunGuard {
    /// `snsc<pid>r<run>-`: namespaces of this run start with it.
    prefix: String,
    pins: PathBuf,
    state: PathBuf,
}

impl Drop for RunGuard {
    fn drop(&mut self) {
        remove_run_objects(&self.prefix, &self.pins, &self.state);
    }
}

/// Best effort: this runs from `Drop`, where a failure can only be reported.
fn remove_run_objects(ns_prefix: &str, pins: &Path, state: &Path) {
    if pins.exists() {
        if let Err(e) = snas_bpf::remove_pins(pins) {
            eprintln!("[scale] cleanup: pins {}: {e}", pins.display());
        }
    }
    if let Ok(rd) = std::fs::read_dir(NETNS_DIR) {
        for e in rd.flatten() {
            if e.file_name().to_string_lossy().starts_with(ns_prefix) {
                if let Err(err) = jobnet::remove_netns(&e.path()) {
                    eprintln!("[scale] cleanup: {}: {err}", e.path().display());
                }
            }
        }
    }
    if state.exists() {
        if let Err(e) = std::fs::remove_dir_all(state) {
            eprintln!("[scale] cleanup: {}: {e}", state.display());
        }
    }
}

/// The pid in a name `snsc<pid>r…`, if it is one of ours.
fn owner_pid(name: &str) -> Option<u32> {
    let rest = name.strip_prefix(PREFIX)?;
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    if digits.is_empty() || !rest[digits.len()..].starts_with('r') {
        return None;
    }
    digits.parse().ok()
}

/// Removes namespaces, pins and state left by runs whose process is gone (killed by a signal,
/// so their guard never ran).
fn sweep_dead_runs() {
    let dead =
        |name: &str| owner_pid(name).is_some_and(|p| !Path::new(&format!("/proc/{p}")).exists());
    let mut gone = std::collections::BTreeSet::new();
    for dir in [
        Path::new(NETNS_DIR),
        Path::new(BPFFS),
        &std::env::temp_dir(),
    ] {
        if let Ok(rd) = std::fs::read_dir(dir) {
            for e in rd.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if dead(&name) {
                    if let Some(pid) = owner_pid(&name) {
                        gone.insert(pid);
                    }
                }
            }
        }
    }
    for pid in gone {
        eprintln!("[scale] removing leftovers of dead run pid {pid}");
        let stem = format!("{PREFIX}{pid}r");
        if let Ok(rd) = std::fs::read_dir(BPFFS) {
            for e in rd.flatten() {
                if e.file_name().to_string_lossy().starts_with(&stem) {
                    let _ = snas_bpf::remove_pins(&e.path());
                }
            }
        }
        if let Ok(rd) = std::fs::read_dir(std::env::temp_dir()) {
            for e in rd.flatten() {
                if e.file_name().to_string_lossy().starts_with(&stem) {
                    let _ = std::fs::remove_dir_all(e.path());
                }
            }
        }
        remove_run_objects(&stem, Path::new(""), Path::new(""));
    }
}

fn effective_uid() -> Option<u32> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("Uid:"))?;
    line.split_whitespace().nth(2)?.parse().ok()
}

/// Accepts tokens `bench-<n>` as a policy with default limits and no rules, so the agent path
/// is measured without key material or policy compilation.
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
            serial: snas_wire::PolicySerial(1),
            node: None,
            expires_at_unix: now
                .duration_since(SystemTime::UNIX_EPOCH)
                .map(|d| d.as_secs() + 600)
                .unwrap_or(0),
            job_key: snas_wire::JobKey(0xbe00_0000_0000_0000 | n),
            tenant_id: snas_wire::TenantId(1),
            claims: Some(PolicyDraft::new("bench", token).to_claims(
                token,
                snas_wire::PolicySerial(1),
                now,
            )),
        })
    }
}

/// Per-sample latencies (ms) of one series: one path, one operation, one count, one rep.
#[derive(Debug, Clone)]
struct Series {
    path: &'static str,
    op: &'static str,
    jobs: usize,
    rep: usize,
    samples_ms: Vec<f64>,
}

const AGENT_PATH: &str = "agent+tier1";
const BARE_PATH: &str = "bare network";

/// Job network set-up and removal latency with `counts` jobs up at once, through the agent with
/// tier 1 attached (`Agent::create_job` / `delete_job`) and for the bare network
/// (`JobNetwork::create` / `teardown`). Each series creates N jobs, keeps all up, measures each
/// create, then deletes all and measures each delete; the series repeat `reps` times with the
/// counts alternating. Root only.
pub fn job_setup(counts: &[usize], reps: usize) -> Result<ScenarioResult, ScaleError> {
    if counts.is_empty() || reps == 0 || counts.contains(&0) {
        return Err(ScaleError::Empty {
            scenario: "job_setup",
            what: "counts or reps",
        });
    }
    if let Some(&count) = counts.iter().find(|&&c| c > POOL_SLOTS) {
        return Err(ScaleError::PoolTooSmall {
            count,
            pool: AGENT_POOL,
            slots: POOL_SLOTS,
        });
    }
    let uid = effective_uid().unwrap_or(u32::MAX);
    if uid != 0 {
        return Err(ScaleError::NotRoot { uid });
    }
    sweep_dead_runs();

    let run = RUN.fetch_add(1, Ordering::Relaxed);
    let prefix = format!("{PREFIX}{}r{run}-", std::process::id());
    let tag = prefix.trim_end_matches('-').to_string();
    // Declared first so it is dropped last, after the agent and tier 1 let go of the objects.
    let _guard = RunGuard {
        prefix: prefix.clone(),
        pins: Path::new(BPFFS).join(&tag),
        state: std::env::temp_dir().join(&tag),
    };
    eprintln!("[scale] job_setup: run {tag}, counts {counts:?}, {reps} reps");

    snas_bpf::ensure_bpffs().map_err(|e| job_err("mounting bpffs", e))?;
    let mut node = snas_bpf::NodeConfig::new("bench", 1, Ipv4Addr::new(192, 0, 2, 7), 1500);
    node.attach_uplink = false;
    node.pin_dir = _guard.pins.clone();
    let tier1 = snas_bpf::Tier1::load(&node).map_err(|e| {
        job_err(
            format!("loading tier 1 (pins {})", node.pin_dir.display()),
            e,
        )
    })?;
    let dataplane = Arc::new(snas_agent::dataplane::Tier1Dataplane::from_tier1(tier1));

    let agent_ns = format!("{prefix}t-");
    let config = AgentConfig::from_toml_str(
        &format!(
            r#"
underlay_interface = "lo"
underlay_address = "192.0.2.7"
trust_bundle = "/nonexistent"
job_pool = "{AGENT_POOL}"
state_dir = "{}"
netns_dir = "{NETNS_DIR}"
netns_prefix = "{agent_ns}"
host_veth_prefix = "snsct"
"#,
            _guard.state.display()
        ),
        Path::new("scale-bench-agent.toml"),
    )
    .map_err(|e| job_err("agent configuration", e))?;
    let (agent, _) = Agent::start(config, Arc::new(BenchVerifier), dataplane)
        .map_err(|e| job_err("starting the agent", e))?;
    let bare_pool = SubnetPool::new(
        BARE_POOL
            .parse()
            .map_err(|e| job_err(format!("bare pool {BARE_POOL}"), e))?,
        30,
    );
    let bare_ns = format!("{prefix}b-");

    let mut series = Vec::new();
    let mut next_token = 0u64;
    for (rep, n) in series_order(counts, reps) {
        eprintln!("[scale] job_setup rep {rep}: {n} jobs through {AGENT_PATH}");
        let (create, delete) = agent_series(&agent, n, &mut next_token)?;
        series.push(Series {
            path: AGENT_PATH,
            op: "create",
            jobs: n,
            rep,
            samples_ms: create,
        });
        series.push(Series {
            path: AGENT_PATH,
            op: "delete",
            jobs: n,
            rep,
            samples_ms: delete,
        });
        eprintln!("[scale] job_setup rep {rep}: {n} jobs, {BARE_PATH}");
        let (create, delete) = bare_series(&bare_pool, &bare_ns, n, &mut next_token)?;
        series.push(Series {
            path: BARE_PATH,
            op: "create",
            jobs: n,
            rep,
            samples_ms: create,
        });
        series.push(Series {
            path: BARE_PATH,
            op: "delete",
            jobs: n,
            rep,
            samples_ms: delete,
        });
    }
    drop(agent);
    Ok(job_setup_result(counts, reps, &series))
}

/// Creates `n` jobs through the agent, then deletes them; latencies in ms.
fn agent_series(
    agent: &Agent,
    n: usize,
    next_token: &mut u64,
) -> Result<(Vec<f64>, Vec<f64>), ScaleError> {
    let mut create = Vec::with_capacity(n);
    let mut keys = Vec::with_capacity(n);
    for i in 0..n {
        // Fresh tokens: a job key is never reused within the run, as in production.
        let token = format!("bench-{next_token}");
        *next_token += 1;
        let t = Instant::now();
        let view = agent
            .create_job(&token)
            .map_err(|e| job_err(format!("create_job {i} of {n}"), e))?;
        create.push(ms(t.elapsed()));
        keys.push(
            agent
                .resolve(&view.job_key.to_string())
                .map_err(|e| job_err(format!("resolve job {}", view.job_key), e))?,
        );
    }
    let mut delete = Vec::with_capacity(n);
    for (i, k) in keys.into_iter().enumerate() {
        let t = Instant::now();
        agent
            .delete_job(k)
            .map_err(|e| job_err(format!("delete_job {i} of {n}"), e))?;
        delete.push(ms(t.elapsed()));
    }
    Ok((create, delete))
}

/// Creates `n` bare job networks, then tears them down; latencies in ms.
fn bare_series(
    pool: &SubnetPool,
    ns_prefix: &str,
    n: usize,
    next_key: &mut u64,
) -> Result<(Vec<f64>, Vec<f64>), ScaleError> {
    let mut create = Vec::with_capacity(n);
    let mut nets = Vec::with_capacity(n);
    for i in 0..n {
        let slot = u32::try_from(i).map_err(|e| job_err("bare slot", e))?;
        let addrs = pool
            .addrs(slot)
            .map_err(|e| job_err(format!("bare subnet {i}"), e))?;
        // Fresh names per series, as the agent's fresh job keys give it.
        let names = JobNames::derive(ns_prefix, "snscb", snas_wire::JobKey(*next_key));
        *next_key += 1;
        let info = JobNetInfo::new(&names, addrs, 1444, Path::new(NETNS_DIR));
        let t = Instant::now();
        let net =
            JobNetwork::create(info).map_err(|e| job_err(format!("network {i} of {n}"), e))?;
        create.push(ms(t.elapsed()));
        nets.push(net);
    }
    let mut delete = Vec::with_capacity(n);
    for (i, net) in nets.into_iter().enumerate() {
        let t = Instant::now();
        net.teardown()
            .map_err(|e| job_err(format!("teardown {i} of {n}"), e))?;
        delete.push(ms(t.elapsed()));
    }
    Ok((create, delete))
}

/// Per (path, op, jobs): the per-rep summaries.
fn group_series(series: &[Series]) -> BTreeMap<(&'static str, &'static str, usize), Vec<Summary>> {
    let mut g: BTreeMap<_, Vec<Summary>> = BTreeMap::new();
    for s in series {
        if let Some(sum) = Summary::of(&s.samples_ms) {
            g.entry((s.path, s.op, s.jobs)).or_default().push(sum);
        }
    }
    g
}

fn job_setup_result(counts: &[usize], reps: usize, series: &[Series]) -> ScenarioResult {
    let groups = group_series(series);
    let mut table = Table {
        columns: [
            "path",
            "operation",
            "jobs up",
            "p50 ms",
            "p99 ms",
            "max ms",
            "reps",
        ]
        .map(String::from)
        .to_vec(),
        rows: Vec::new(),
    };
    let stat = |path, op, n: usize, f: fn(&Summary) -> f64| {
        groups
            .get(&(path, op, n))
            .and_then(|v| spread(&v.iter().map(f).collect::<Vec<_>>()))
    };
    for path in [AGENT_PATH, BARE_PATH] {
        for op in ["create", "delete"] {
            for &n in counts {
                let (Some(p50), Some(p99), Some(max)) = (
                    stat(path, op, n, |s| s.p50),
                    stat(path, op, n, |s| s.p99),
                    stat(path, op, n, |s| s.max),
                ) else {
                    continue;
                };
                table.rows.push(vec![
                    path.to_string(),
                    op.to_string(),
                    n.to_string(),
                    cell(Some(p50), 2),
                    cell(Some(p99), 2),
                    format!("{:.2}", max.high.unwrap_or(max.value)),
                    reps.to_string(),
                ]);
            }
        }
    }
    let categories: Vec<String> = counts.iter().map(|n| format!("{n} jobs up")).collect();
    let chart = |op: &'static str, title: &str| BarChart {
        title: title.to_string(),
        y_label: "ms (median of reps, whiskers min–max)".into(),
        categories: categories.clone(),
        series: [AGENT_PATH, BARE_PATH]
            .into_iter()
            .flat_map(|path| {
                [
                    ("p50", (|s: &Summary| s.p50) as fn(&Summary) -> f64),
                    ("p99", |s| s.p99),
                ]
                .into_iter()
                .map(move |(label, f)| (path, label, f))
            })
            .map(|(path, label, f)| BarSeries {
                name: format!("{path} {label}"),
                values: counts.iter().map(|&n| stat(path, op, n, f)).collect(),
            })
            .collect(),
        reference_lines: if op == "create" {
            vec![
                ("goal p50 20 ms".into(), 20.0),
                ("goal p99 50 ms".into(), 50.0),
            ]
        } else {
            Vec::new()
        },
        log_y: true,
    };
    let worst = |f: fn(&Summary) -> f64| -> (String, f64) {
        let vals: Vec<(usize, f64)> = counts
            .iter()
            .filter_map(|&n| stat(AGENT_PATH, "create", n, f).map(|v| (n, v.value)))
            .collect();
        let text = vals
            .iter()
            .map(|(n, v)| format!("{v:.2} ms at {n}"))
            .collect::<Vec<_>>()
            .join(", ");
        (text, vals.iter().map(|v| v.1).fold(0.0, f64::max))
    };
    let (p50_text, p50_worst) = worst(|s| s.p50);
    let (p99_text, p99_worst) = worst(|s| s.p99);
    let raw = json!(series
        .iter()
        .map(|s| json!({
            "path": s.path, "op": s.op, "jobs": s.jobs, "rep": s.rep, "samples_ms": s.samples_ms,
        }))
        .collect::<Vec<_>>());
    ScenarioResult {
        id: "scale_job_setup".into(),
        title: "Job network set-up with 1–1,000 jobs up on one node".into(),
        method: format!(
            "For N in {counts:?}: create N jobs and keep them all up, timing each create, then \
             delete them all, timing each delete; through the agent with tier 1 attached \
             (create_job/delete_job, stand-in policy, fsync'd records) and for the bare network \
             (JobNetwork::create/teardown). {reps} repetitions with the counts alternating; \
             cells are the median of the per-repetition percentiles [min–max]."
        ),
        table,
        charts: vec![
            chart("create", "Job set-up latency by jobs up"),
            chart("delete", "Job removal latency by jobs up"),
        ],
        goals: vec![
            GoalCheck {
                goal: "job set-up p50 ≤ 20 ms (agent + tier 1)".into(),
                measured: p50_text,
                met: Some(p50_worst <= 20.0),
            },
            GoalCheck {
                goal: "job set-up p99 ≤ 50 ms (agent + tier 1)".into(),
                measured: p99_text,
                met: Some(p99_worst <= 50.0),
            },
        ],
        notes: vec![
            "The agent's delete_job does not wait for the kernel to destroy the veth; the bare \
             teardown does (RCU grace periods), hence the gap between the two delete rows."
                .into(),
            "The kernel destroys namespaces asynchronously (cleanup_net); set-up right after a \
             mass teardown competes with it for the cores."
                .into(),
            "The policy is a stand-in with default limits and no rules: tier 1 receives the job \
             configuration and attachment, not rule maps."
                .into(),
        ],
        raw,
    }
}

// ---------------------------------------------------------------------------------------------
// Proxy memory

/// Goal of the issue: at most this many bytes of proxy state per tracked flow.
const FLOW_BYTES_GOAL: f64 = 256.0;

fn rss_bytes() -> usize {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<usize>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

/// Memory of `flows` established flows in the proxy's conntrack + NAT, for two destination mixes
/// (400 destinations; every flow to its own destination): computed from the tables' capacities,
/// and the process RSS growth while filling.
pub fn proxy_memory(flows: &[usize]) -> Result<ScenarioResult, ScaleError> {
    if flows.is_empty() || flows.contains(&0) {
        return Err(ScaleError::Empty {
            scenario: "proxy_memory",
            what: "flows",
        });
    }
    let mixes = [("400 destinations", false), ("distinct destinations", true)];
    let mut table = Table {
        columns: [
            "flows",
            "destinations",
            "computed MiB",
            "computed B/flow",
            "slab / fwd / rev / expiry / nat B/flow",
            "RSS growth MiB",
            "RSS B/flow",
        ]
        .map(String::from)
        .to_vec(),
        rows: Vec::new(),
    };
    let mut categories = Vec::new();
    let (mut computed, mut rss) = (Vec::new(), Vec::new());
    let mut raw = Vec::new();
    let mut goal_parts = Vec::new();
    let mut worst = 0.0f64;
    for &n in flows {
        let n32 = u32::try_from(n).map_err(|e| ScaleError::ProxyMemory {
            flows: n,
            reason: e.to_string(),
        })?;
        for (mix, distinct) in mixes {
            eprintln!("[scale] proxy_memory: {n} flows, {mix}");
            let before = rss_bytes();
            let mut ct = flow_synth::tracker(n32.saturating_mul(2)).map_err(|e| {
                ScaleError::ProxyMemory {
                    flows: n,
                    reason: e.to_string(),
                }
            })?;
            flow_synth::fill(&mut ct, n32, distinct).map_err(|e| ScaleError::ProxyMemory {
                flows: n,
                reason: e.to_string(),
            })?;
            let grown = rss_bytes().saturating_sub(before);
            let m = ct.memory();
            drop(black_box(ct));
            let per = |b: usize| b as f64 / n as f64;
            let mib = |b: usize| b as f64 / f64::from(1 << 20);
            table.rows.push(vec![
                n.to_string(),
                mix.to_string(),
                format!("{:.1}", mib(m.total())),
                format!("{:.0}", per(m.total())),
                format!(
                    "{:.0} / {:.0} / {:.0} / {:.0} / {:.0}",
                    per(m.slab),
                    per(m.forward_table),
                    per(m.reply_table),
                    per(m.expiry),
                    per(m.nat)
                ),
                format!("{:.1}", mib(grown)),
                format!("{:.0}", per(grown)),
            ]);
            categories.push(format!("{}, {mix}", human_count(n)));
            computed.push(Some(BarValue::plain(per(m.total()))));
            rss.push(Some(BarValue::plain(per(grown))));
            worst = worst.max(per(m.total())).max(per(grown));
            goal_parts.push(format!(
                "{} {mix}: {:.0} computed, {:.0} RSS",
                human_count(n),
                per(m.total()),
                per(grown)
            ));
            raw.push(json!({
                "flows": n, "mix": mix, "rss_growth_bytes": grown, "computed_bytes": m.total(),
                "slab": m.slab, "forward_table": m.forward_table, "reply_table": m.reply_table,
                "expiry": m.expiry, "nat": m.nat,
            }));
        }
    }
    Ok(ScenarioResult {
        id: "scale_proxy_memory".into(),
        title: "Proxy memory per tracked flow".into(),
        method: format!(
            "Fill the proxy's conntrack + NAT with {flows:?} established TCP flows from 1,000 jobs \
             (10 tenants, one egress address), to 400 destinations or each to its own; memory \
             computed from the tables' capacities and measured as the RSS growth while filling."
        ),
        table,
        charts: vec![BarChart {
            title: "Proxy memory per flow".into(),
            y_label: "bytes per flow".into(),
            categories,
            series: vec![
                BarSeries {
                    name: "computed".into(),
                    values: computed,
                },
                BarSeries {
                    name: "RSS growth".into(),
                    values: rss,
                },
            ],
            reference_lines: vec![("goal 256 B/flow".into(), FLOW_BYTES_GOAL)],
            log_y: false,
        }],
        goals: vec![GoalCheck {
            goal: "≤ 256 B per tracked flow".into(),
            measured: goal_parts.join("; "),
            met: Some(worst <= FLOW_BYTES_GOAL),
        }],
        notes: vec![format!(
            "Flow slab entry: {} B. Tables grow with the flows by doubling (nothing is \
             preallocated for max_flows), so a slab share above the entry size is spare capacity \
             (100k flows sit in 131,072 slots). RSS growth also includes allocator slack.",
            snas_proxy::conntrack::Conntrack::FLOW_ENTRY_BYTES
        )],
        raw: json!(raw),
    })
}

fn human_count(n: usize) -> String {
    match n {
        n if n >= 1_000_000 && n % 1_000_000 == 0 => format!("{}M", n / 1_000_000),
        n if n >= 1_000 && n % 1_000 == 0 => format!("{}k", n / 1_000),
        n => n.to_string(),
    }
}

// ---------------------------------------------------------------------------------------------
// 10k-rule policy

/// Goal: compile a 10,000-rule policy in under this.
const COMPILE_GOAL_MS: f64 = 50.0;
/// Goal: one lookup in under this.
const LOOKUP_GOAL_NS: f64 = 1_000.0;
/// Timed batches per probe and repetition, and lookups per batch: a batch lasts microseconds,
/// long against the clock read, short enough that a preemption spoils only one batch.
const BATCHES: usize = 500;
const PER_BATCH: usize = 200;

/// Per-lookup ns of each batch.
fn time_batches(mut f: impl FnMut()) -> Vec<f64> {
    (0..BATCHES)
        .map(|_| {
            let t = Instant::now();
            for _ in 0..PER_BATCH {
                f();
            }
            t.elapsed().as_nanos() as f64 / PER_BATCH as f64
        })
        .collect()
}

/// Milliseconds of each of `reps` runs of `f`.
fn time_reps<T>(reps: usize, mut f: impl FnMut() -> T) -> Vec<f64> {
    (0..reps)
        .map(|_| {
            let t = Instant::now();
            black_box(f());
            ms(t.elapsed())
        })
        .collect()
}

/// A 10,000-rule policy (`snas_policy::synthetic`): compile time, lookup latency per kind of
/// lookup (median of the per-repetition medians of batch means, p99 over all batches), TOML
/// parse, and verify of the signed token; each repeated `reps` times.
pub fn policy_10k(reps: usize) -> Result<ScenarioResult, ScaleError> {
    if reps == 0 {
        return Err(ScaleError::Empty {
            scenario: "policy_10k",
            what: "reps",
        });
    }
    let rules = policy_synth::mixed_rules().map_err(|e| policy_err("synthetic rules", e))?;
    let toml = policy_synth::to_toml(&rules);
    let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
    let key = PolicyKey::from_seed("bench", [9; 32]).map_err(|e| policy_err("signing key", e))?;
    let mut draft = PolicyDraft::new("bench", "bench");
    draft.egress = rules.clone();
    let token = snas_policy::sign(
        &draft.to_claims("benchbenchbenchbench", snas_wire::PolicySerial(1), now),
        &key,
    )
    .map_err(|e| policy_err("signing the policy", e))?;
    let pem = key.public_pem().map_err(|e| policy_err("public key", e))?;
    let bundle =
        TrustBundle::from_keys([("bench", pem)]).map_err(|e| policy_err("trust bundle", e))?;
    // Fail before timing if the workload is broken, rather than time errors.
    snas_policy::parse_policy(&toml).map_err(|e| policy_err("parsing the TOML", e))?;
    snas_policy::verify(&token, &bundle, now).map_err(|e| policy_err("verifying the token", e))?;

    eprintln!("[scale] policy_10k: compile, parse, verify × {reps}");
    let compile = time_reps(reps, || compile_rules(black_box(&rules), &[]));
    let parse = time_reps(reps, || snas_policy::parse_policy(black_box(&toml)));
    let verify = time_reps(reps, || {
        snas_policy::verify(black_box(&token), &bundle, now)
    });

    let m = compile_rules(&rules, &[]);
    type Probe<'a> = (&'static str, Box<dyn Fn() + 'a>);
    let host = |name: &'static str, port: u16| {
        let m = &m;
        Box::new(move || {
            black_box(m.check_host(black_box(name), port, Transport::Tcp));
        }) as Box<dyn Fn() + '_>
    };
    let ip = |addr: std::net::IpAddr, port: u16| {
        let m = &m;
        Box::new(move || {
            black_box(m.check_ip(black_box(addr), port, Transport::Tcp));
        }) as Box<dyn Fn() + '_>
    };
    let probes: Vec<Probe<'_>> = vec![
        ("exact hit", host(policy_synth::EXACT_HIT, 443)),
        (
            "exact hit, mixed case",
            host(policy_synth::EXACT_HIT_MIXED_CASE, 443),
        ),
        ("wildcard hit", host(policy_synth::WILDCARD_HIT, 8443)),
        ("name miss", host(policy_synth::NAME_MISS, 443)),
        ("CIDR v4 hit", ip(policy_synth::CIDR_V4_HIT, 443)),
        ("CIDR v4 miss", ip(policy_synth::CIDR_V4_MISS, 443)),
        ("CIDR v6 hit", ip(policy_synth::CIDR_V6_HIT, 443)),
        ("always denied", ip(policy_synth::ALWAYS_DENIED, 80)),
    ];
    // Per probe: per rep the median batch mean; all batch means pooled for the p99.
    let mut lookups: Vec<(&'static str, Vec<f64>, Vec<f64>)> = probes
        .iter()
        .map(|(name, _)| (*name, Vec::new(), Vec::new()))
        .collect();
    for rep in 0..reps {
        eprintln!("[scale] policy_10k: lookups, rep {rep}");
        // Probes interleave within a rep so drift of the machine hits them all alike.
        for ((_, f), (_, medians, all)) in probes.iter().zip(lookups.iter_mut()) {
            let batches = time_batches(f);
            medians.extend(stats::median(&batches));
            all.extend(batches);
        }
    }

    let mut table = Table {
        columns: ["operation", "median [min–max]", "p99", "unit"]
            .map(String::from)
            .to_vec(),
        rows: Vec::new(),
    };
    let mut once_rows = Vec::new();
    for (name, samples) in [
        ("compile 10k rules", &compile),
        ("parse TOML", &parse),
        ("verify signed token (JWS)", &verify),
    ] {
        let v = spread(samples);
        table.rows.push(vec![
            name.into(),
            cell(v, 2),
            num(Summary::of(samples).map(|s| s.p99), 2),
            "ms".into(),
        ]);
        once_rows.push((name, v));
    }
    let mut lookup_bars = Vec::new();
    let mut lookup_p99 = Vec::new();
    for (name, medians, all) in &lookups {
        let v = spread(medians);
        let p99 = Summary::of(all).map(|s| s.p99);
        table.rows.push(vec![
            format!("lookup: {name}"),
            cell(v, 0),
            num(p99, 0),
            "ns".into(),
        ]);
        lookup_bars.push(v);
        lookup_p99.push(p99.map(BarValue::plain));
    }
    let compile_median = stats::median(&compile);
    let (slowest, slowest_ns) = lookups
        .iter()
        .filter_map(|(n, med, _)| Some((*n, stats::median(med)?)))
        .fold(("", 0.0f64), |a, b| if b.1 > a.1 { b } else { a });
    let worst_p99 = lookup_p99
        .iter()
        .flatten()
        .map(|v| v.value)
        .fold(0.0f64, f64::max);
    let raw = json!({
        "compile_ms": compile, "parse_toml_ms": parse, "verify_jws_ms": verify,
        "toml_bytes": toml.len(), "jws_bytes": token.len(),
        "batches": BATCHES, "lookups_per_batch": PER_BATCH,
        "lookup_batch_ns": lookups.iter().map(|(n, _, all)| (n.to_string(), json!(all)))
            .collect::<serde_json::Map<_, _>>(),
    });
    Ok(ScenarioResult {
        id: "scale_policy_10k".into(),
        title: "A 10,000-rule policy: compile, lookups, parse and verify".into(),
        method: format!(
            "Policy of 4,000 exact names, 2,000 wildcards, 3,000 IPv4 and 1,000 IPv6 CIDRs. \
             Compile, TOML parse and token verify timed once per repetition ({reps}); each \
             lookup timed in {BATCHES} batches of {PER_BATCH} per repetition: median of the \
             per-repetition medians of batch means [min–max], p99 over all batch means."
        ),
        table,
        charts: vec![
            BarChart {
                title: "Lookup latency, 10,000-rule policy".into(),
                y_label: "ns per lookup".into(),
                categories: lookups.iter().map(|(n, _, _)| n.to_string()).collect(),
                series: vec![
                    BarSeries {
                        name: "median".into(),
                        values: lookup_bars,
                    },
                    BarSeries {
                        name: "p99 of batches".into(),
                        values: lookup_p99,
                    },
                ],
                reference_lines: vec![("goal 1 µs".into(), LOOKUP_GOAL_NS)],
                log_y: false,
            },
            BarChart {
                title: "Compile, parse and verify a 10,000-rule policy".into(),
                y_label: "ms".into(),
                categories: once_rows.iter().map(|(n, _)| n.to_string()).collect(),
                series: vec![BarSeries {
                    name: "median".into(),
                    values: once_rows.iter().map(|(_, v)| *v).collect(),
                }],
                reference_lines: vec![("compile goal 50 ms".into(), COMPILE_GOAL_MS)],
                log_y: false,
            },
        ],
        goals: vec![
            GoalCheck {
                goal: "compile a 10,000-rule policy < 50 ms".into(),
                measured: format!("{} ms (median of {reps})", num(compile_median, 2)),
                met: compile_median.map(|m| m < COMPILE_GOAL_MS),
            },
            GoalCheck {
                goal: "lookup < 1 µs".into(),
                measured: format!(
                    "slowest median {slowest_ns:.0} ns ({slowest}); worst p99 of batch means \
                     {worst_p99:.0} ns"
                ),
                met: Some(slowest_ns < LOOKUP_GOAL_NS),
            },
        ],
        notes: vec![format!(
            "TOML {} bytes, signed token {} bytes. Verify covers signature check, JSON decode \
             and rule validation, not compilation.",
            toml.len(),
            token.len()
        )],
        raw,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spread_is_median_with_min_and_max_or_none() {
        assert_eq!(spread(&[]), None);
        assert_eq!(
            spread(&[5.0, 1.0, 9.0]),
            Some(BarValue::spread(5.0, 1.0, 9.0))
        );
    }

    #[test]
    fn cell_shows_whiskers_only_when_reps_differ() {
        assert_eq!(
            cell(Some(BarValue::spread(1.234, 1.0, 2.0)), 2),
            "1.23 [1.00–2.00]"
        );
        assert_eq!(cell(Some(BarValue::spread(1.0, 1.0, 1.0)), 1), "1.0");
        assert_eq!(cell(None, 1), "n/a");
    }

    #[test]
    fn series_alternate_counts_within_each_rep() {
        assert_eq!(
            series_order(&[1, 100, 1000], 2),
            vec![(0, 1), (0, 100), (0, 1000), (1, 1), (1, 100), (1, 1000)]
        );
    }

    #[test]
    fn owner_pid_reads_only_our_names() {
        assert_eq!(owner_pid("snsc1234r0-t-abcdef01"), Some(1234));
        assert_eq!(owner_pid("snsc1234r7"), Some(1234));
        assert_eq!(owner_pid("snsct0abcdef"), None);
        assert_eq!(owner_pid("snb1234-"), None);
        assert_eq!(owner_pid("snsc12x"), None);
    }

    #[test]
    fn human_count_abbreviates_round_numbers() {
        assert_eq!(human_count(100_000), "100k");
        assert_eq!(human_count(1_000_000), "1M");
        assert_eq!(human_count(1_500), "1500");
    }

    #[test]
    fn job_setup_rejects_more_jobs_than_the_pool_holds() {
        let err = job_setup(&[1, 2000], 1).unwrap_err();
        assert!(
            matches!(err, ScaleError::PoolTooSmall { count: 2000, .. }),
            "{err}"
        );
    }
}
