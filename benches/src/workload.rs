//! The workload scenarios of issue 12: what ordinary programs do, under the policy defaults.
//!
//! - `workload`: several jobs at once each run a loop of short connections *by name* (a lookup
//!   each, as `requests` or `curl` in a loop do), alternating two names that share one address,
//!   at a steady rate below the default `new_connections_per_sec` (50/s), with every other limit
//!   at its default (`max_connections` 256, DNS budget 20/s). Reports connections, failures and
//!   lookup + connect latency; the direct path runs the same loop as the reference.
//! - `first_connection`: a fresh job's first connection, over many fresh jobs: half by raw
//!   address under a CIDR rule (no DNS query warmed the proxies, so the SYN is the first packet a
//!   proxy sees of the job and must be held while it fetches the policy), half by name (lookup
//!   not timed). Goal: p99 < 20 ms.
//!
//! Each repetition uses new jobs. Limits: all SNAS jobs run on node 1 (the bench's clients live
//! there); the machine's 2 cores carry clients, servers, agents and proxies.

use serde_json::json;

use crate::client::{ClientResult, Workload};
use crate::paths::{JobSpec, PathKind, Paths};
use crate::results::{BarChart, BarSeries, BarValue, GoalCheck, ScenarioResult, Table};
use crate::scenarios::Plan;
use crate::stats::{median, Summary};

/// Names of the loop: both resolve to 203.0.113.10, whose HTTP server answers any host.
const NAMES: [&str; 2] = ["api.example.com", "www.example.org"];
/// Connections per second each job's loop starts: below the default limit of 50/s, as a
/// program that stays within its policy would.
const PER_SEC: f64 = 40.0;

/// A job with the policy defaults and the loop's two names on port 80.
fn workload_policy(n: usize) -> String {
    format!(
        "tenant = \"bench\"\njob = \"bench-workload-{n}\"\nttl = \"2h\"\n\
         [[egress]]\nhost = \"api.example.com:80\"\n[[egress]]\nhost = \"www.example.org:80\"\n"
    )
}

/// A fresh job reaching 203.0.113.0/24:80 by address and api.example.com:80 by name.
fn first_policy(n: usize) -> String {
    format!(
        "tenant = \"bench\"\njob = \"bench-first-{n}\"\nttl = \"1h\"\n\
         [[egress]]\nhost = \"api.example.com:80\"\n\
         [[egress]]\ncidr = \"203.0.113.0/24\"\nports = \"80\"\n"
    )
}

fn fmt(v: Option<f64>, digits: usize) -> String {
    v.map_or("—".into(), |x| format!("{x:.digits$}"))
}

/// Runs the `workload` scenario: `jobs` jobs at once, `per_job` connections each, per
/// repetition; the direct path runs one loop of the same length alongside as a reference.
pub fn workload(paths: &Paths, plan: &Plan, jobs: usize, per_job: u64) -> ScenarioResult {
    let w = Workload::Connections {
        count: per_job,
        per_sec: PER_SEC,
        names: NAMES.iter().map(|s| (*s).to_owned()).collect(),
    };
    let mut notes = Vec::new();
    let mut per_rep: Vec<(Vec<ClientResult>, Option<ClientResult>)> = Vec::new();
    let mut n = 0usize;
    for rep in 0..plan.reps {
        let mut running = Vec::new();
        for _ in 0..jobs {
            n += 1;
            let job = match paths.sign(&workload_policy(n)) {
                Ok(j) => j,
                Err(e) => {
                    notes.push(format!("rep {}: signing: {e}", rep + 1));
                    continue;
                }
            };
            match paths.spawn(PathKind::SnasNs, Some(&job), &w, NAMES[0], 80) {
                Ok(c) => running.push(c),
                Err(e) => notes.push(format!("rep {}: starting a job: {e}", rep + 1)),
            }
        }
        let direct = if plan.paths.contains(&PathKind::Direct) {
            match paths.run(PathKind::Direct, None, &w, NAMES[0], 80) {
                Ok(c) => Some(c),
                Err(e) => {
                    notes.push(format!("rep {}: direct: {e}", rep + 1));
                    None
                }
            }
        } else {
            None
        };
        let mut results = Vec::new();
        for c in running {
            match c.wait() {
                Ok(r) => results.push(r),
                Err(e) => notes.push(format!("rep {}: a job's loop: {e}", rep + 1)),
            }
        }
        per_rep.push((results, direct));
    }
    let total: u64 = per_rep
        .iter()
        .flat_map(|(r, _)| r)
        .map(|r| r.transactions + r.errors)
        .sum();
    let failures: u64 = per_rep.iter().flat_map(|(r, _)| r).map(|r| r.errors).sum();
    // Per repetition: p50 = the median of the jobs' p50s, p99 = the worst job's p99 (a median
    // across jobs would hide one bad job).
    let p50s: Vec<f64> = per_rep
        .iter()
        .filter_map(|(r, _)| {
            let v: Vec<f64> = r
                .iter()
                .filter_map(|x| x.latency_us.as_ref().map(|l| l.p50))
                .collect();
            median(&v)
        })
        .collect();
    let p99s: Vec<f64> = per_rep
        .iter()
        .filter_map(|(r, _)| {
            r.iter()
                .filter_map(|x| x.latency_us.as_ref().map(|l| l.p99))
                .reduce(f64::max)
        })
        .collect();
    let d50: Vec<f64> = per_rep
        .iter()
        .filter_map(|(_, d)| d.as_ref()?.latency_us.as_ref().map(|l| l.p50))
        .collect();
    let d99: Vec<f64> = per_rep
        .iter()
        .filter_map(|(_, d)| d.as_ref()?.latency_us.as_ref().map(|l| l.p99))
        .collect();
    let ms = |v: Option<f64>| v.map(|x| x / 1000.0);
    let rows = vec![
        vec![
            "SNAS (jobs at once, each its own loop)".into(),
            jobs.to_string(),
            total.to_string(),
            failures.to_string(),
            fmt(ms(median(&p50s)), 2),
            fmt(ms(median(&p99s)), 2),
        ],
        vec![
            "direct (one loop, reference)".into(),
            "1".into(),
            per_rep
                .iter()
                .filter_map(|(_, d)| d.as_ref().map(|d| d.transactions + d.errors))
                .sum::<u64>()
                .to_string(),
            per_rep
                .iter()
                .filter_map(|(_, d)| d.as_ref().map(|d| d.errors))
                .sum::<u64>()
                .to_string(),
            fmt(ms(median(&d50)), 2),
            fmt(ms(median(&d99)), 2),
        ],
    ];
    let bar = |v: Option<f64>| v.map(BarValue::plain);
    let chart = BarChart {
        title: "Short connections by name: lookup + connect".into(),
        y_label: "ms".into(),
        categories: vec!["p50".into(), "p99".into()],
        series: vec![
            BarSeries {
                name: "SNAS".into(),
                values: vec![bar(ms(median(&p50s))), bar(ms(median(&p99s)))],
            },
            BarSeries {
                name: "direct".into(),
                values: vec![bar(ms(median(&d50))), bar(ms(median(&d99)))],
            },
        ],
        reference_lines: Vec::new(),
        log_y: false,
    };
    ScenarioResult {
        id: "workload".into(),
        title: "Workload: short connections by name under the policy defaults".into(),
        method: format!(
            "Per repetition, {jobs} SNAS jobs at once (node 1, policy defaults: max_connections 256, \
             new_connections_per_sec 50, DNS budget 20/s) each make {per_job} short connections at \
             {PER_SEC}/s: resolve the name again (getaddrinfo: A and AAAA), connect, HTTP GET, read \
             to EOF, close, alternating {} and {} (one address, two names). Latency = lookup + \
             connect; p50 is the median over jobs, p99 the worst job's; cells are medians over {} \
             repetitions.",
            NAMES[0], NAMES[1], plan.reps
        ),
        table: Table {
            columns: vec![
                "path".into(),
                "jobs".into(),
                "connections".into(),
                "failures".into(),
                "lookup+connect p50 ms".into(),
                "p99 ms".into(),
            ],
            rows,
        },
        charts: vec![chart],
        goals: vec![GoalCheck {
            goal: "0 failures".into(),
            measured: format!("{failures} of {total}"),
            met: (total > 0).then_some(failures == 0),
        }],
        notes,
        raw: json!(per_rep
            .iter()
            .map(|(r, d)| json!({"snas": r, "direct": d}))
            .collect::<Vec<_>>()),
    }
}

/// Runs the `first_connection` scenario over `jobs` fresh jobs per repetition.
pub fn first_connection(paths: &Paths, plan: &Plan, jobs: usize) -> ScenarioResult {
    let w = Workload::Connections {
        count: 1,
        per_sec: 0.0,
        names: Vec::new(),
    };
    let mut notes = Vec::new();
    let (mut by_addr, mut by_name) = (Vec::new(), Vec::new());
    let mut failures = 0u64;
    let mut n = 0usize;
    for rep in 0..plan.reps {
        for i in 0..jobs {
            n += 1;
            let job: JobSpec = match paths.sign(&first_policy(n)) {
                Ok(j) => j,
                Err(e) => {
                    notes.push(format!("rep {}: signing: {e}", rep + 1));
                    continue;
                }
            };
            let (host, into) = if i % 2 == 0 {
                ("203.0.113.10", &mut by_addr)
            } else {
                (NAMES[0], &mut by_name)
            };
            match paths.run(PathKind::SnasNs, Some(&job), &w, host, 80) {
                // One connection: its latency is the whole sample (lookup + connect; an
                // address needs no lookup, a name's lookup is part of it).
                Ok(r) => {
                    failures += r.errors;
                    if let Some(l) = r.latency_us {
                        into.push(l.max / 1000.0);
                    }
                }
                Err(e) => {
                    failures += 1;
                    notes.push(format!("rep {} job {n}: {e}", rep + 1));
                }
            }
        }
    }
    let sa = Summary::of(&by_addr);
    let sn = Summary::of(&by_name);
    let row = |label: &str, s: &Option<Summary>| {
        vec![
            label.to_owned(),
            s.as_ref().map_or("0".into(), |s| s.n.to_string()),
            fmt(s.as_ref().map(|s| s.p50), 2),
            fmt(s.as_ref().map(|s| s.p99), 2),
            fmt(s.as_ref().map(|s| s.max), 2),
        ]
    };
    let p99 = sa.as_ref().map(|s| s.p99);
    let bars = |s: &Option<Summary>| {
        vec![
            s.as_ref().map(|s| BarValue::plain(s.p50)),
            s.as_ref().map(|s| BarValue::plain(s.p99)),
            s.as_ref().map(|s| BarValue::plain(s.max)),
        ]
    };
    let chart = BarChart {
        title: "A fresh job's first connection".into(),
        y_label: "ms".into(),
        categories: vec!["p50".into(), "p99".into(), "max".into()],
        series: vec![
            BarSeries {
                name: "by address".into(),
                values: bars(&sa),
            },
            BarSeries {
                name: "by name".into(),
                values: bars(&sn),
            },
        ],
        reference_lines: vec![("goal p99".into(), 20.0)],
        log_y: false,
    };
    ScenarioResult {
        id: "first_connection".into(),
        title: "A fresh job's first connection".into(),
        method: format!(
            "{} fresh SNAS jobs per repetition ({} repetitions), each making one connection the \
             moment it exists: by raw address 203.0.113.10:80 under a CIDR rule (no DNS query \
             warmed the proxies: the SYN is the first packet a proxy sees of the job and is held \
             while the proxy fetches the job's policy) or by name api.example.com:80 (lookup + \
             connect). Milliseconds.",
            jobs, plan.reps
        ),
        table: Table {
            columns: vec![
                "first connection".into(),
                "jobs".into(),
                "p50 ms".into(),
                "p99 ms".into(),
                "max ms".into(),
            ],
            rows: vec![
                row("by address (SYN held during the policy fetch)", &sa),
                row("by name (lookup + connect)", &sn),
            ],
        },
        charts: vec![chart],
        goals: vec![
            GoalCheck {
                goal: "first connection p99 < 20 ms (by address)".into(),
                measured: fmt(p99, 2) + " ms",
                met: p99.map(|p| p < 20.0),
            },
            GoalCheck {
                goal: "no failed first connection".into(),
                measured: failures.to_string(),
                met: Some(failures == 0),
            },
        ],
        notes,
        raw: json!({"by_address_ms": by_addr, "by_name_ms": by_name}),
    }
}
