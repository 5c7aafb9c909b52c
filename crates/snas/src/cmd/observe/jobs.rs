//! `snas jobs`: the jobs the agents run, with their tier-1 drop totals.

use std::process::ExitCode;

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
