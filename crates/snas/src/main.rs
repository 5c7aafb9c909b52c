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
    /// runc-compatible runtime for containerd: runs the container in gVisor inside the job
    /// network its `snas.dev/policy` annotation asks the node agent for (see docs/oci.md).
    /// Also reached as `snas-oci` (a symlink to `snas`), containerd's `BinaryName`.
    #[command(disable_help_flag = true)]
    Oci {
        /// runc's command line: global flags, command (create, start, state, kill, delete, …)
        /// and its arguments.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<std::ffi::OsString>,
    },
    /// Run a command as a job in a gVisor sandbox on a node (`--agent SOCKET`) or the testbed;
    /// print its egress summary.
    Run(cmd::run::RunArgs),
}

fn main() -> ExitCode {
    // `snas-oci …` and `snas oci …` take runc's command line, whose global flags (`--log`,
    // `--log-format`) would collide with ours: handled before clap sees them.
    let mut argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let invoked_as_oci = argv
        .first()
        .and_then(|a| std::path::Path::new(a).file_name())
        .is_some_and(|n| n == "snas-oci");
    if invoked_as_oci || argv.get(1).is_some_and(|a| a == "oci") {
        let rest = argv.split_off(if invoked_as_oci { 1 } else { 2 });
        logging::init(logging::LogFormat::Text, None, "warn");
        return cmd::oci::run(rest);
    }
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
        Command::Oci { args } => cmd::oci::run(args),
    }
}
