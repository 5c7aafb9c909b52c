//! `snas-bench`: parses the command line and hands it to the library. See `snas-bench --help`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use snas_bench::client::{self, Target, Workload, RESULT_MARKER};
use snas_bench::orchestrate::{self, RunOptions, ScenarioId};
use snas_bench::paths::PathKind;
use snas_bench::scenarios::Plan;

/// SNAS benchmarks: SNAS against the direct path, nftables + NAT and squid on the local
/// testbed, side by side, plus scale figures. Writes JSON and PNG charts per scenario and a
/// markdown summary; prints the tables.
#[derive(Debug, Parser)]
#[command(name = "snas-bench", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the benchmarks (root). Builds a private testbed (prefix snasbn<hex>) and removes it.
    Run(RunArgs),
    /// Put a run's tables and charts into the docs (between marker comments; charts copied).
    Publish {
        /// Results folder of a run (holds run.json and the PNGs).
        results: PathBuf,
        /// The document to update.
        #[arg(long, default_value = "docs/benchmarks.md")]
        doc: PathBuf,
        /// Where the charts go.
        #[arg(long, default_value = "docs/benchmarks")]
        images: PathBuf,
        /// How the document refers to that folder.
        #[arg(long, default_value = "benchmarks")]
        image_ref: String,
    },
    /// Internal: gvisor-direct's sandbox (the launcher `snas run` uses, without SNAS) running
    /// COMMAND in the namespace NETNS.
    #[command(hide = true)]
    Sandbox {
        #[arg(long)]
        netns: PathBuf,
        /// The sandbox's address with its prefix length, e.g. 10.254.4.2/30.
        #[arg(long)]
        addr: String,
        #[arg(long)]
        gateway: std::net::Ipv4Addr,
        #[arg(long)]
        nameserver: std::net::Ipv4Addr,
        #[arg(long)]
        app: PathBuf,
        #[arg(long)]
        state_dir: PathBuf,
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// Internal: the workload program each path runs (prints one result line).
    #[command(hide = true)]
    Client {
        /// The workload as JSON.
        #[arg(long)]
        workload: String,
        /// The target as JSON.
        #[arg(long)]
        target: String,
    },
}

#[derive(Debug, clap::Args)]
struct RunArgs {
    /// Results folder (JSON, PNG, summary.md). Default: bench-results/<UTC time>.
    #[arg(long, value_name = "DIR")]
    out: Option<PathBuf>,
    /// Repetitions of every measurement (paths alternate within each).
    #[arg(long, default_value_t = 3)]
    reps: usize,
    /// Seconds each measurement runs after its warm-up.
    #[arg(long, default_value_t = 3.0)]
    duration: f64,
    /// Seconds of warm-up not counted.
    #[arg(long, default_value_t = 0.5)]
    warmup: f64,
    /// Short run for a smoke test: 1 repetition, 1 s, 0.2 s warm-up, 1 and 100 jobs, 100k flows,
    /// 2 × 40 workload connections, 6 fresh jobs.
    #[arg(long)]
    quick: bool,
    /// Comma-separated scenarios: tcp_rr, tcp_crr, first_payload, bulk, ipv6, proxy_pps,
    /// edt_accuracy, tier1_edt, fairness, noisy_neighbour, noisy_udp, workload, first_connection, job_setup,
    /// proxy_memory, policy_10k. Default: all.
    #[arg(long, value_delimiter = ',')]
    scenarios: Vec<String>,
    /// Comma-separated paths: direct, nftables, squid, snas, gvisor-direct, gvisor. Default:
    /// all.
    #[arg(long, value_delimiter = ',')]
    paths: Vec<String>,
    /// The snas binary that runs agents, proxies and `snas run`.
    #[arg(long, default_value = "target/release/snas", env = "SNAS_BIN")]
    snas_bin: PathBuf,
    /// Job counts of job_setup.
    #[arg(long, value_delimiter = ',', default_value = "1,100,1000")]
    jobs: Vec<usize>,
    /// Let idle CPUs halt (default: hold a 0 µs PM QoS latency request so that they poll, as
    /// latency benchmarks usually do, where a cpuidle driver honours it; see
    /// docs/benchmarks.md).
    #[arg(long)]
    no_cpu_latency_qos: bool,
    /// Flow counts of proxy_memory.
    #[arg(long, value_delimiter = ',', default_value = "100000,1000000")]
    flows: Vec<usize>,
}

fn client_main(workload: &str, target: &str) -> ExitCode {
    let parsed = serde_json::from_str::<Workload>(workload)
        .map_err(|e| format!("--workload: {e}"))
        .and_then(|w| {
            serde_json::from_str::<Target>(target)
                .map(|t| (w, t))
                .map_err(|e| format!("--target: {e}"))
        });
    let (w, t) = match parsed {
        Ok(x) => x,
        Err(e) => {
            eprintln!("snas-bench client: {e}");
            return ExitCode::from(2);
        }
    };
    match client::run(&w, &t) {
        Ok(r) => match serde_json::to_string(&r) {
            Ok(j) => {
                println!("{RESULT_MARKER}{j}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("snas-bench client: encoding the result: {e}");
                ExitCode::FAILURE
            }
        },
        Err(e) => {
            eprintln!("snas-bench client: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run_main(a: RunArgs) -> ExitCode {
    let scenarios = if a.scenarios.is_empty() {
        ScenarioId::ALL.to_vec()
    } else {
        let mut v = Vec::new();
        for s in &a.scenarios {
            match ScenarioId::from_id(s.trim()) {
                Some(x) => v.push(x),
                None => {
                    eprintln!(
                        "snas-bench: --scenarios: unknown scenario `{s}`; known: {}",
                        ScenarioId::ALL.map(|x| x.id()).join(", ")
                    );
                    return ExitCode::from(2);
                }
            }
        }
        v
    };
    let mut paths = Vec::new();
    for p in &a.paths {
        match PathKind::from_id(p.trim()) {
            Some(x) => paths.push(x),
            None => {
                eprintln!(
                    "snas-bench: --paths: unknown path `{p}`; known: {}",
                    PathKind::ALL.map(|x| x.id()).join(", ")
                );
                return ExitCode::from(2);
            }
        }
    }
    if paths.is_empty() {
        paths = orchestrate::default_paths();
    }
    if !paths.contains(&PathKind::Direct) {
        eprintln!("snas-bench: note: without the direct path no ratio to direct is computed");
    }
    let (reps, duration, warmup, jobs, flows, workload) = if a.quick {
        (
            1,
            1.0,
            0.2,
            vec![1, 100],
            vec![100_000],
            orchestrate::WorkloadSizes::QUICK,
        )
    } else {
        (
            a.reps,
            a.duration,
            a.warmup,
            a.jobs,
            a.flows,
            orchestrate::WorkloadSizes::FULL,
        )
    };
    if reps == 0 || !(duration > 0.0 && duration <= 600.0) || !(0.0..=60.0).contains(&warmup) {
        eprintln!(
            "snas-bench: --reps must be ≥ 1, --duration in (0, 600] s, --warmup in [0, 60] s"
        );
        return ExitCode::from(2);
    }
    let out = a.out.unwrap_or_else(|| {
        let now = humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string();
        PathBuf::from("bench-results").join(now.replace(':', ""))
    });
    let opts = RunOptions {
        out_dir: out.clone(),
        snas_bin: a.snas_bin,
        scenarios,
        workload,
        plan: Plan {
            paths,
            reps,
            duration_s: duration,
            warmup_s: warmup,
        },
        job_counts: jobs,
        flow_counts: flows,
        command: std::env::args().collect::<Vec<_>>().join(" "),
        cpu_latency_qos: !a.no_cpu_latency_qos,
    };
    match orchestrate::run(&opts) {
        Ok(_) => {
            println!("\nresults: {}", out.display());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("snas-bench: {e}");
            ExitCode::FAILURE
        }
    }
}

fn sandbox_main(
    netns: PathBuf,
    addr: &str,
    gateway: std::net::Ipv4Addr,
    nameserver: std::net::Ipv4Addr,
    app: PathBuf,
    state_dir: PathBuf,
    command: Vec<String>,
) -> ExitCode {
    let parsed = addr.split_once('/').and_then(|(a, p)| {
        Some((
            a.parse::<std::net::Ipv4Addr>().ok()?,
            p.parse::<u8>().ok().filter(|p| *p <= 32)?,
        ))
    });
    let Some((addr, prefix_len)) = parsed else {
        eprintln!("snas-bench sandbox: --addr {addr:?}: expected ADDRESS/PREFIX");
        return ExitCode::from(2);
    };
    let spec = snas_bench::sandbox::SandboxSpec {
        netns,
        addr,
        prefix_len,
        gateway,
        nameserver,
        app,
        state_dir,
        command,
    };
    match snas_bench::sandbox::run(&spec) {
        Ok(code) => ExitCode::from(u8::try_from(code).unwrap_or(1)),
        Err(e) => {
            eprintln!("snas-bench sandbox: {e}");
            ExitCode::from(125)
        }
    }
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Sandbox {
            netns,
            addr,
            gateway,
            nameserver,
            app,
            state_dir,
            command,
        } => sandbox_main(netns, &addr, gateway, nameserver, app, state_dir, command),
        Command::Run(a) => run_main(a),
        Command::Client { workload, target } => client_main(&workload, &target),
        Command::Publish {
            results,
            doc,
            images,
            image_ref,
        } => match snas_bench::publish::publish(&results, &doc, &images, &image_ref) {
            Ok(files) => {
                for f in files {
                    println!("wrote {}", f.display());
                }
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("snas-bench publish: {e}");
                ExitCode::FAILURE
            }
        },
    }
}
