//! One benchmark run: brings up a private testbed and the baseline paths, runs the chosen
//! scenarios, writes each scenario's JSON and charts as soon as it is done (so a later failure
//! loses nothing), and tears everything down.
//!
//! Invariants: the testbed prefix is unique per run (`snasbn` + 4 hex digits); the testbed
//! guard and the baselines guard remove every namespace, process and pin this run made, also
//! when a scenario fails; Ctrl-C stops the run between two measurements and still cleans up.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use snas_testbed::{Testbed, TestbedOptions};

use crate::paths::{Baselines, PathKind, Paths};
use crate::results::{RunReport, ScenarioResult};
use crate::scenarios::{Plan, Scenarios};

/// Errors of a run.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// Needs root (namespaces, eBPF, runsc).
    #[error("snas-bench run needs root (network namespaces, eBPF, gVisor); run it with sudo")]
    NotRoot,
    /// The `snas` binary is missing.
    #[error("{0}: not found; build it first (`cargo build --release -p snas`) or pass --snas-bin")]
    NoSnasBinary(PathBuf),
    /// The testbed could not be built.
    #[error("testbed: {0}")]
    Testbed(String),
    /// The baseline paths could not be built.
    #[error(transparent)]
    Paths(#[from] crate::paths::PathError),
    /// Results could not be written.
    #[error("writing results: {0}")]
    Report(String),
    /// The machine could not be described.
    #[error("machine: {0}")]
    Machine(String),
    /// A scale scenario failed.
    #[error("{scenario}: {detail}")]
    Scenario { scenario: String, detail: String },
    /// Interrupted with Ctrl-C.
    #[error("interrupted")]
    Interrupted,
}

/// A scenario that can be chosen with `--scenarios`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScenarioId {
    TcpRr,
    TcpCrr,
    FirstPayload,
    Bulk,
    Ipv6,
    ProxyPps,
    EdtAccuracy,
    Tier1Edt,
    Fairness,
    NoisyNeighbour,
    NoisyUdp,
    Workload,
    FirstConnection,
    JobSetup,
    ProxyMemory,
    Policy10k,
}

impl ScenarioId {
    /// Every scenario, in run order.
    pub const ALL: [ScenarioId; 16] = [
        ScenarioId::TcpRr,
        ScenarioId::TcpCrr,
        ScenarioId::FirstPayload,
        ScenarioId::Bulk,
        ScenarioId::Ipv6,
        ScenarioId::ProxyPps,
        ScenarioId::EdtAccuracy,
        ScenarioId::Tier1Edt,
        ScenarioId::Fairness,
        ScenarioId::NoisyNeighbour,
        ScenarioId::NoisyUdp,
        ScenarioId::Workload,
        ScenarioId::FirstConnection,
        ScenarioId::JobSetup,
        ScenarioId::ProxyMemory,
        ScenarioId::Policy10k,
    ];

    /// Its name on the command line and in file names.
    pub fn id(self) -> &'static str {
        match self {
            ScenarioId::TcpRr => "tcp_rr",
            ScenarioId::TcpCrr => "tcp_crr",
            ScenarioId::FirstPayload => "first_payload",
            ScenarioId::Bulk => "bulk",
            ScenarioId::Ipv6 => "ipv6",
            ScenarioId::ProxyPps => "proxy_pps",
            ScenarioId::EdtAccuracy => "edt_accuracy",
            ScenarioId::Tier1Edt => "tier1_edt",
            ScenarioId::Fairness => "fairness",
            ScenarioId::NoisyNeighbour => "noisy_neighbour",
            ScenarioId::NoisyUdp => "noisy_udp",
            ScenarioId::Workload => "workload",
            ScenarioId::FirstConnection => "first_connection",
            ScenarioId::JobSetup => "job_setup",
            ScenarioId::ProxyMemory => "proxy_memory",
            ScenarioId::Policy10k => "policy_10k",
        }
    }

    /// Parses [`ScenarioId::id`].
    pub fn from_id(s: &str) -> Option<ScenarioId> {
        ScenarioId::ALL.into_iter().find(|x| x.id() == s)
    }

    /// Whether it needs the testbed (the scale scenarios do not).
    pub fn needs_testbed(self) -> bool {
        !matches!(
            self,
            ScenarioId::JobSetup
                | ScenarioId::ProxyMemory
                | ScenarioId::Policy10k
                | ScenarioId::Tier1Edt
        )
    }
}

/// How big the workload scenarios are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WorkloadSizes {
    /// Jobs looping at once in `workload`.
    pub jobs: usize,
    /// Connections each of them makes.
    pub connections_per_job: u64,
    /// Fresh jobs in `first_connection`.
    pub fresh_jobs: usize,
}

impl WorkloadSizes {
    /// The full run: 16 jobs × 1,250 = 20,000 connections; 100 fresh jobs.
    pub const FULL: WorkloadSizes = WorkloadSizes {
        jobs: 16,
        connections_per_job: 1250,
        fresh_jobs: 100,
    };
    /// The smoke run.
    pub const QUICK: WorkloadSizes = WorkloadSizes {
        jobs: 2,
        connections_per_job: 40,
        fresh_jobs: 6,
    };
}

/// What to run.
#[derive(Debug, Clone)]
pub struct RunOptions {
    pub out_dir: PathBuf,
    pub snas_bin: PathBuf,
    pub scenarios: Vec<ScenarioId>,
    /// Sizes of the workload scenarios.
    pub workload: WorkloadSizes,
    pub plan: Plan,
    /// Job counts of the set-up scenario.
    pub job_counts: Vec<usize>,
    /// Flow counts of the memory scenario.
    pub flow_counts: Vec<usize>,
    /// The command line, for the report.
    pub command: String,
    /// Hold `/dev/cpu_dma_latency` at 0 µs during the run (idle CPUs poll instead of halting).
    pub cpu_latency_qos: bool,
}

/// Holds a PM QoS CPU latency request of 0 µs while alive, so that idle CPUs poll instead of
/// halting: on a VM a wake-up from halt costs tens of µs, which would otherwise land on
/// whichever path happens to wake a sleeping CPU (and a busy-polling proxy keeps one awake,
/// flattering its path). The request ends when the file is closed. It acts through the
/// cpuidle driver: on a machine without one the CPUs halt anyway (the run's conditions say so).
#[derive(Debug)]
struct CpuLatencyQos(#[allow(dead_code)] std::fs::File);

fn hold_cpu_latency_qos() -> std::io::Result<CpuLatencyQos> {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/cpu_dma_latency")?;
    f.write_all(&0i32.to_ne_bytes())?;
    Ok(CpuLatencyQos(f))
}

/// The machine's cpuidle driver (`none` when it has none), if the kernel says.
fn cpuidle_driver() -> Option<String> {
    std::fs::read_to_string("/sys/devices/system/cpu/cpuidle/current_driver")
        .ok()
        .map(|s| s.trim().to_owned())
}

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_interrupt(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::Relaxed);
}

/// Whether Ctrl-C was pressed.
pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::Relaxed)
}

fn catch_interrupts() {
    let handler: extern "C" fn(libc::c_int) = on_interrupt;
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe {
        libc::signal(libc::SIGINT, handler as libc::sighandler_t);
        libc::signal(libc::SIGTERM, handler as libc::sighandler_t);
    }
}

fn unique_prefix() -> String {
    format!("snasbn{:04x}", rand::random::<u16>())
}

/// Removes the run's scratch directory on drop.
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
        // /run/snas-bench itself, unless another run still uses it (then it is not empty).
        if let Some(parent) = self.0.parent() {
            let _ = std::fs::remove_dir(parent);
        }
    }
}

fn finish(out: &Path, report: &mut RunReport, r: ScenarioResult) -> Result<(), RunError> {
    println!(
        "\n== {} ==\n{}",
        r.title,
        crate::report::text_table(&r.table)
    );
    for g in &r.goals {
        let met = match g.met {
            Some(true) => "met",
            Some(false) => "NOT met",
            None => "n/a",
        };
        println!("  goal: {} — {} ({met})", g.goal, g.measured);
    }
    for n in &r.notes {
        println!("  note: {n}");
    }
    let written = crate::report::write_scenario(out, &r);
    report.scenarios.push(r);
    match written {
        Ok(files) => {
            for f in files {
                eprintln!("[bench] wrote {}", f.display());
            }
            Ok(())
        }
        // A chart that could not be drawn must not stop the run; the JSON is written.
        Err(e) => {
            eprintln!("[bench] warning: {e}");
            Ok(())
        }
    }
}

/// Runs the benchmark; returns the report (also written to `out_dir/run.json`).
pub fn run(opts: &RunOptions) -> Result<RunReport, RunError> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err(RunError::NotRoot);
    }
    catch_interrupts();
    std::fs::create_dir_all(&opts.out_dir)
        .map_err(|e| RunError::Report(format!("{}: {e}", opts.out_dir.display())))?;
    let machine = crate::machine::probe().map_err(|e| RunError::Machine(e.to_string()))?;
    let mut conditions = Vec::new();
    let _qos = if opts.cpu_latency_qos {
        match hold_cpu_latency_qos() {
            Ok(q) => {
                conditions.push(match cpuidle_driver().as_deref() {
                    // The request acts through the cpuidle governor; without a driver the idle
                    // loop halts whatever it says.
                    Some("none") | None => "CPU idle: a PM QoS request of 0 µs (/dev/cpu_dma_latency) was held for the whole run, but this machine has no cpuidle driver (/sys/devices/system/cpu/cpuidle/current_driver), so it had no effect: idle CPUs halted, and latencies include wake-ups from halt.".to_owned(),
                    Some(d) => format!("CPU idle: a PM QoS request of 0 µs (/dev/cpu_dma_latency) was held for the whole run (cpuidle driver {d}), so idle CPUs polled instead of halting and no path paid for waking a halted CPU (`--no-cpu-latency-qos` turns it off)."),
                });
                Some(q)
            }
            Err(e) => {
                conditions.push(format!("CPU idle: the PM QoS request failed ({e}); idle CPUs could halt, and latencies include wake-ups."));
                None
            }
        }
    } else {
        conditions.push(
            "CPU idle: default policy (CPUs may halt when idle; latencies include wake-ups)."
                .to_owned(),
        );
        None
    };
    conditions.push("SNAS proxies: the testbed's configuration (1 worker each, `busy_poll_us = 100`); agents and proxies run on the same 2 cores as clients and servers.".to_owned());
    let mut report = RunReport {
        machine,
        command: opts.command.clone(),
        repetitions: opts.plan.reps,
        conditions,
        scenarios: Vec::new(),
    };
    let network: Vec<ScenarioId> = opts
        .scenarios
        .iter()
        .copied()
        .filter(|s| s.needs_testbed())
        .collect();
    if !network.is_empty() {
        run_network(opts, &network, &mut report)?;
    }
    for &s in opts.scenarios.iter().filter(|s| !s.needs_testbed()) {
        if interrupted() {
            break;
        }
        eprintln!("[bench] {} …", s.id());
        let r = match s {
            ScenarioId::JobSetup => {
                crate::scale::job_setup(&opts.job_counts, opts.plan.reps).map_err(|e| e.to_string())
            }
            ScenarioId::ProxyMemory => {
                crate::scale::proxy_memory(&opts.flow_counts).map_err(|e| e.to_string())
            }
            ScenarioId::Tier1Edt => crate::tier1_edt::tier1_edt(
                opts.plan.reps,
                std::time::Duration::from_secs_f64(opts.plan.duration_s.min(1.0) * 0.3),
            )
            .map_err(|e| e.to_string()),
            _ => crate::scale::policy_10k(opts.plan.reps.max(3)).map_err(|e| e.to_string()),
        };
        match r {
            Ok(r) => finish(&opts.out_dir, &mut report, r)?,
            Err(detail) => eprintln!("[bench] {} failed: {detail}", s.id()),
        }
    }
    report.machine.load_end = crate::machine::load_average().unwrap_or(report.machine.load_start);
    match crate::report::write_run(&opts.out_dir, &report) {
        Ok(_) => {}
        // The JSON and markdown are written; only charts are missing.
        Err(e @ crate::report::ReportError::Charts { .. }) => eprintln!("[bench] warning: {e}"),
        Err(e) => return Err(RunError::Report(e.to_string())),
    }
    if interrupted() {
        return Err(RunError::Interrupted);
    }
    Ok(report)
}

fn run_network(
    opts: &RunOptions,
    scenarios: &[ScenarioId],
    report: &mut RunReport,
) -> Result<(), RunError> {
    if !opts.snas_bin.is_file() {
        return Err(RunError::NoSnasBinary(opts.snas_bin.clone()));
    }
    let prefix = unique_prefix();
    let scratch = Scratch(PathBuf::from("/run/snas-bench").join(&prefix));
    std::fs::create_dir_all(&scratch.0)
        .map_err(|e| RunError::Report(format!("{}: {e}", scratch.0.display())))?;
    eprintln!("[bench] testbed {prefix} …");
    let tb = Testbed::up(TestbedOptions::new(&prefix, &opts.snas_bin))
        .map_err(|e| RunError::Testbed(e.to_string()))?;
    let baselines = Baselines::build(&tb, &scratch.0.join("baselines"))?;
    let paths = Paths::new(tb, baselines, opts.snas_bin.clone(), &scratch.0)?;
    let sc = Scenarios::new(&paths, opts.plan.clone());
    for &s in scenarios {
        if interrupted() {
            break;
        }
        eprintln!(
            "[bench] {} on {} …",
            s.id(),
            opts.plan
                .paths
                .iter()
                .map(|p| p.label())
                .collect::<Vec<_>>()
                .join(", ")
        );
        let r = match s {
            ScenarioId::TcpRr => sc.tcp_rr(),
            ScenarioId::TcpCrr => sc.tcp_crr(),
            ScenarioId::FirstPayload => crate::first_payload::first_payload(&paths, &opts.plan),
            ScenarioId::Bulk => sc.bulk(),
            ScenarioId::Ipv6 => crate::ipv6::ipv6(&paths, &opts.plan),
            ScenarioId::ProxyPps => sc.proxy_pps(),
            ScenarioId::EdtAccuracy => sc.edt_accuracy(),
            ScenarioId::Fairness => sc.fairness(),
            ScenarioId::NoisyNeighbour => sc.noisy_neighbour(),
            ScenarioId::NoisyUdp => sc.noisy_udp(),
            ScenarioId::Workload => crate::workload::workload(
                &paths,
                &opts.plan,
                opts.workload.jobs,
                opts.workload.connections_per_job,
            ),
            ScenarioId::FirstConnection => {
                crate::workload::first_connection(&paths, &opts.plan, opts.workload.fresh_jobs)
            }
            _ => continue,
        };
        finish(&opts.out_dir, report, r)?;
    }
    // Paths (testbed, baselines) and the scratch directory are removed here.
    drop(paths);
    Ok(())
}

/// The default paths: all five.
pub fn default_paths() -> Vec<PathKind> {
    PathKind::ALL.to_vec()
}
