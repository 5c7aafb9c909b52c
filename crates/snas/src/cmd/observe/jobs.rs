//! `snas jobs`: the jobs the agents run, with their tier-1 drop totals; `snas jobs update`:
//! a running job's next policy (live update or renewal).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Subcommand};
use snas_testbed::{Topology, DEFAULT_PREFIX};

use serde_json::{json, Value};
use snas_agent::api::{JobState, JobView};

use super::sources::{sources, Sources};
use super::table::{human_secs, now_unix, print_json, table, JsonRow};
use super::{fail, finish, ObserveArgs};

/// One row of `snas jobs`: a job as its agent shows it.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct JobRow {
    /// The agent's label (`node-N`, or its socket).
    pub node: String,
    pub job: JobView,
    /// Total tier-1 drops (read only by `snas jobs`).
    pub tier1_drops: Option<u64>,
}

fn state_name(s: JobState) -> &'static str {
    match s {
        JobState::Running => "running",
        JobState::Expired => "expired",
    }
}

impl JsonRow for JobRow {
    fn to_json(&self) -> Value {
        let j = &self.job;
        json!({
            "node": self.node, "job": j.job, "tenant": j.tenant, "job_key": j.job_key.to_string(),
            "serial": j.serial, "sandbox_ip": j.sandbox_ip.to_string(), "netns": j.netns,
            "expires_at": j.expires_at, "state": state_name(j.state),
            "tier1_drops": self.tier1_drops,
        })
    }
}

/// Collects jobs from every agent (with failures), and their drop totals if `with_counters`.
pub(super) fn collect_jobs(s: &Sources, with_counters: bool) -> (Vec<JobRow>, Vec<String>) {
    let mut rows = Vec::new();
    let mut errors = Vec::new();
    for a in &s.agents {
        let client = a.client();
        match client.list_jobs() {
            Ok(list) => {
                for job in list {
                    let mut row = JobRow {
                        node: a.label.clone(),
                        job,
                        tier1_drops: None,
                    };
                    if with_counters {
                        match client.counters(&row.job.job_key.to_string()) {
                            Ok(c) => row.tier1_drops = Some(c.total),
                            Err(e) => errors.push(format!("{}: {e:#}", a.label)),
                        }
                    }
                    rows.push(row);
                }
            }
            Err(e) => errors.push(format!("{} ({}): {e:#}", a.label, a.socket.display())),
        }
    }
    (rows, errors)
}

/// `snas jobs [update …]`.
#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct JobsArgs {
    #[command(subcommand)]
    cmd: Option<JobsCmd>,
    #[command(flatten)]
    src: ObserveArgs,
}

/// `snas jobs` subcommands.
#[derive(Debug, Subcommand)]
pub enum JobsCmd {
    /// Replace a running job's policy with its next one (`snas policy sign --update-of`): both
    /// tiers enforce it within a second, without restarting the job.
    Update(UpdateArgs),
}

/// `snas jobs update`.
#[derive(Debug, Args)]
pub struct UpdateArgs {
    /// Testbed whose node agent is asked (with --node).
    #[arg(long, default_value = DEFAULT_PREFIX)]
    prefix: String,
    /// Testbed node whose agent runs the job (1 or 2).
    #[arg(long, required_unless_present = "agent_socket")]
    node: Option<u8>,
    /// A node agent's API socket (instead of --prefix/--node).
    #[arg(long = "agent-socket", value_name = "PATH", conflicts_with = "node")]
    agent_socket: Option<PathBuf>,
    /// The new signed policy: the token itself, or @FILE (`@-` for stdin).
    #[arg(long, value_name = "TOKEN|@FILE")]
    policy: String,
    /// The job (key or unique name). Default: the job key the token names.
    job: Option<String>,
}

/// Runs `snas jobs` or its subcommand.
pub fn jobs_cmd(a: &JobsArgs) -> ExitCode {
    match &a.cmd {
        None => jobs(&a.src),
        Some(JobsCmd::Update(u)) => update(u),
    }
}

fn read_policy_arg(arg: &str) -> anyhow::Result<String> {
    use anyhow::Context;
    use std::io::Read;
    let Some(path) = arg.strip_prefix('@') else {
        return Ok(arg.trim().to_owned());
    };
    let mut text = String::new();
    if path == "-" {
        std::io::stdin()
            .take(1 << 20)
            .read_to_string(&mut text)
            .context("stdin")?;
    } else {
        std::fs::File::open(path)
            .and_then(|f| f.take(1 << 20).read_to_string(&mut text))
            .with_context(|| path.to_owned())?;
    }
    Ok(text.trim().to_owned())
}

/// `snas jobs update`: exit 0 updated, 1 refused by the agent (its code and detail on stderr),
/// 2 bad arguments or no agent.
fn update(u: &UpdateArgs) -> ExitCode {
    let token = match read_policy_arg(&u.policy) {
        Ok(t) => t,
        Err(e) => return fail(&e),
    };
    let socket = match (&u.agent_socket, u.node) {
        (Some(s), _) => s.clone(),
        (None, Some(n)) => match Topology::new(&u.prefix) {
            Ok(t) => t.agent_socket(n),
            Err(e) => return fail(&anyhow::anyhow!("--prefix {}: {e}", u.prefix)),
        },
        (None, None) => return fail(&anyhow::anyhow!("give --node N or --agent-socket PATH")),
    };
    let job = match &u.job {
        Some(j) => j.clone(),
        None => match snas_policy::jws::decode_unverified(&token) {
            Ok(c) => c.job_key().to_string(),
            Err(e) => return fail(&anyhow::anyhow!("--policy: {e}")),
        },
    };
    match snas_agent::api::blocking::AgentClient::new(&socket).update_policy(&job, &token) {
        Ok(v) => {
            println!(
                "updated {} ({}) of tenant {}: serial {}, expires at {}",
                v.job, v.job_key, v.tenant, v.serial, v.expires_at
            );
            ExitCode::SUCCESS
        }
        Err(e) if e.status().is_some() => {
            eprintln!(
                "snas: {} ({}): {e:#}",
                socket.display(),
                e.code().unwrap_or("refused")
            );
            ExitCode::from(1)
        }
        Err(e) => fail(&anyhow::anyhow!("{}: {e:#}", socket.display())),
    }
}

/// `snas jobs`.
pub fn jobs(a: &ObserveArgs) -> ExitCode {
    let s = match sources(a) {
        Ok(s) => s,
        Err(e) => return fail(&e),
    };
    let (rows, errors) = collect_jobs(&s, true);
    if a.json {
        if let Err(e) = print_json(&rows) {
            return fail(&e);
        }
    } else {
        let now = now_unix();
        let cells: Vec<Vec<String>> = rows
            .iter()
            .map(|r| {
                let j = &r.job;
                let left = j.expires_at as f64 - now;
                vec![
                    r.node.clone(),
                    j.tenant.clone(),
                    j.job.clone(),
                    j.job_key.to_string(),
                    j.serial.to_string(),
                    j.sandbox_ip.to_string(),
                    j.netns.clone(),
                    state_name(j.state).to_owned(),
                    if left > 0.0 {
                        human_secs(left)
                    } else {
                        format!("{} ago", human_secs(-left))
                    },
                    r.tier1_drops.map_or("-".into(), |d| d.to_string()),
                ]
            })
            .collect();
        print!(
            "{}",
            table(
                &[
                    "NODE",
                    "TENANT",
                    "JOB",
                    "JOB KEY",
                    "SERIAL",
                    "SANDBOX",
                    "NETNS",
                    "STATE",
                    "EXPIRES IN",
                    "DROPS"
                ],
                &cells
            )
        );
    }
    finish(&errors)
}
