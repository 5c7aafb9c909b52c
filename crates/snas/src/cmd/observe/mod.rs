//! `snas jobs`, `snas flows`, `snas drops`: what the agents and proxies know, for a person.
//!
//! # What it owns
//! Reading the node agents' API (Unix socket, through its typed client
//! `snas_agent::api::blocking::AgentClient`: jobs and their tier-1 counters) and the proxies'
//! management endpoint (TCP, through its typed client `snas_proxy::api::blocking::ProxyClient`:
//! `GET /v1/flows`, `GET /v1/drops`), joining them by job key, and printing aligned tables (or
//! `--json` rows with the same fields, for machines). See `docs/observability.md`.
//!
//! # Layout
//! - `sources`: where to read from (arguments, testbed defaults, the local agent), and calling
//!   a proxy from inside its namespace when needed.
//! - `table`: aligned tables, human durations, `--json` rows.
//! - `jobs`, `flows`, `drops`: the three commands and their rows.
//!
//! # Sources
//! `--agent SOCKET` (also spelt `--agent-socket`) and `--proxy ADDR:PORT` are repeatable; when
//! any is given, only those are read (and `--prefix` is refused). When none is given, the testbed named by `--prefix` (default `snastb`) supplies
//! them: the agent sockets of its nodes that exist, and its proxies' control addresses, which
//! live inside the proxies' namespaces and are therefore read from a thread that entered that
//! namespace. Without a testbed, the agent default is `/run/snas/agent.sock` if it exists.
//!
//! # Invariants
//! - A source that cannot be read is named on stderr and makes the exit status 1; the rows of
//!   the other sources are still printed (an operator chasing an outage wants what there is).
//! - The rows are pure functions of the typed answers (tested in `flows`, `drops`); the
//!   answers' fields are the proxy's and agent's API types, so reader and writer cannot drift.
//!
//! # Limits
//! Plain HTTP/1.1, one request per connection, 3 s per exchange with a proxy
//! (`snas_proxy::api::client::DEFAULT_TIMEOUT`); no TLS (the management endpoint is on a
//! management network).

mod drops;
mod flows;
mod jobs;
mod sources;
mod table;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;
use snas_testbed::DEFAULT_PREFIX;

pub use drops::drops;
pub use flows::flows;
pub use jobs::{jobs_cmd, JobsArgs};

/// Where to read from, and how to print.
#[derive(Debug, Args)]
#[command(
    after_help = "Sources: `--agent SOCKET` and `--proxy ADDR:PORT` (repeatable) read \
    those only: real nodes and proxies, no testbed. Without them, the testbed named by \
    `--prefix` supplies its agents and proxies; without a testbed, /run/snas/agent.sock."
)]
pub struct ObserveArgs {
    /// Testbed supplying default sources (its agent sockets and proxies); not with
    /// --agent/--proxy.
    #[arg(long, default_value = DEFAULT_PREFIX, conflicts_with_all = ["agent_sockets", "proxies"])]
    prefix: String,
    /// A node agent's API socket, e.g. /run/snas/agent.sock (repeatable). Default: the
    /// testbed's agents.
    #[arg(long = "agent", visible_alias = "agent-socket", value_name = "SOCKET")]
    agent_sockets: Vec<PathBuf>,
    /// A proxy's management address (`control_listen`; repeatable). Default: the testbed's
    /// proxies.
    #[arg(long = "proxy", value_name = "ADDR:PORT")]
    proxies: Vec<SocketAddr>,
    /// Print one JSON array of rows instead of a table.
    #[arg(long)]
    json: bool,
}

/// `snas drops` arguments.
#[derive(Debug, Args)]
pub struct DropsArgs {
    #[command(flatten)]
    src: ObserveArgs,
    /// Also list reasons whose count is zero.
    #[arg(long)]
    all: bool,
}

/// Prints the errors of unreadable sources; exit status 1 if there were any.
fn finish(errors: &[String]) -> ExitCode {
    for e in errors {
        eprintln!("snas: {e}");
    }
    if errors.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

/// A command that could not run at all: exit status 2.
fn fail(e: &anyhow::Error) -> ExitCode {
    eprintln!("snas: {e:#}");
    ExitCode::from(2)
}
