//! `snas`: the one binary. It only parses the command line and hands each subcommand to its
//! module under `cmd/`, which wires the library crates together.
#![forbid(unsafe_code)]

mod cmd;
mod logging;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

/// SNAS: policy-driven network egress for gVisor sandboxes.
#[derive(Debug, Parser)]
#[command(name = "snas", version, about)]
struct Cli {
    /// Log filter (`error`, `warn`, `info`, `debug`, `trace`, or per module:
    /// `snas_agent=debug,info`). Default: `SNAS_LOG`, else `RUST_LOG`, else `info` for
    /// `agent` and `proxy` and `warn` for the other commands. Logs go to stderr.
    #[arg(long, global = true, value_name = "FILTER")]
    log_level: Option<String>,
    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value = "text")]
    log_format: logging::LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Author, sign, verify and explain per-job egress policies.
    #[command(subcommand)]
    Policy(cmd::policy::PolicyCmd),
    /// Run the node agent: per-job networks, tier-1 eBPF, the job API and the policy endpoint.
    Agent(cmd::agent::AgentArgs),
    /// Run the egress proxy (tier 2): GENEVE from nodes, NAT to the internet, DNS, control.
    Proxy(cmd::proxy::ProxyArgs),
    /// Local network-namespace testbed: nodes, proxies and a test internet on one machine.
    #[command(subcommand)]
    Testbed(cmd::testbed::TestbedCmd),
    /// List the jobs the node agents run (with their tier-1 drop totals); `update` replaces a
    /// running job's policy.
    Jobs(cmd::observe::JobsArgs),
    /// List live flows at the proxies: job, tenant, source, destination, hostname, egress, state, age.
    Flows(cmd::observe::ObserveArgs),
    /// Drop counters per reason and tier: per job from the agents (tier 1), per tenant from the proxies (tier 2).
    Drops(cmd::observe::DropsArgs),
    /// Run a command as a job in a gVisor sandbox on the testbed; print its egress summary.
    Run(cmd::run::RunArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let default = match cli.command {
        Command::Agent(_) | Command::Proxy(_) => "info",
        _ => "warn",
    };
    logging::init(cli.log_format, cli.log_level.as_deref(), default);
    match cli.command {
        Command::Policy(c) => cmd::policy::run(c),
        Command::Agent(a) => cmd::agent::run(a),
        Command::Proxy(a) => cmd::proxy::run(a),
        Command::Testbed(c) => cmd::testbed::run(c),
        Command::Jobs(a) => cmd::observe::jobs_cmd(&a),
        Command::Flows(a) => cmd::observe::flows(&a),
        Command::Drops(a) => cmd::observe::drops(&a),
        Command::Run(a) => cmd::run::run(a),
    }
}
