//! `snas testbed up|down|status|exec`: the local namespace testbed (see docs/testbed.md).
//!
//! Exit codes: `up`/`down` 0 ok, 1 error; `status` 0 complete, 1 partial, 3 absent;
//! `exec` the command's status (128 + signal when it was killed), 125 when the job could not
//! be created or the command not started.

use std::path::PathBuf;
use std::process::{Command, ExitCode};

use clap::{Args, Subcommand};
use snas_agent::api::blocking::AgentClient;
use snas_testbed::exec::{exit_code, read_token};
use snas_testbed::{JobGuard, Status, Testbed, TestbedOptions, Topology, DEFAULT_PREFIX};

/// `snas testbed` subcommands.
#[derive(Debug, Subcommand)]
pub enum TestbedCmd {
    /// Build (or complete) the testbed and start its daemons; idempotent.
    Up(UpArgs),
    /// Stop every testbed process and remove namespaces, pins, state and logs.
    Down(PrefixArg),
    /// Show namespaces, addresses, processes, DNS names, keys and logs.
    Status(PrefixArg),
    /// Run a command as a job on a node (no gVisor): create, run, delete.
    Exec(ExecArgs),
    /// Serve the internet's DNS and test servers (started by `up` inside <prefix>-inet).
    #[command(hide = true)]
    ServeInternet(PrefixArg),
}

/// The testbed's name prefix.
#[derive(Debug, Args)]
pub struct PrefixArg {
    /// Name prefix of namespaces and the state directory (1-10 of [a-z0-9]).
    #[arg(long, default_value = DEFAULT_PREFIX)]
    prefix: String,
}

/// `snas testbed up`.
#[derive(Debug, Args)]
pub struct UpArgs {
    #[command(flatten)]
    prefix: PrefixArg,
    /// Trust the public keys (*.pub) in DIR instead of generating a key pair.
    #[arg(long, value_name = "DIR")]
    trust: Option<PathBuf>,
    /// Do not start the agents.
    #[arg(long)]
    no_agents: bool,
    /// Do not start the proxies (their configs are still written).
    #[arg(long)]
    no_proxies: bool,
}

/// `snas testbed exec`.
#[derive(Debug, Args)]
pub struct ExecArgs {
    #[command(flatten)]
    prefix: PrefixArg,
    /// Node whose agent creates the job (1 or 2).
    #[arg(long, default_value_t = 1)]
    node: u8,
    /// Signed policy: the token itself, `@FILE`, or the path of a file holding it.
    #[arg(long)]
    policy: String,
    /// Command and arguments to run inside the job.
    #[arg(last = true, required = true)]
    command: Vec<String>,
}

/// Runs one subcommand.
pub fn run(cmd: TestbedCmd) -> ExitCode {
    let r = match cmd {
        TestbedCmd::Up(a) => up(&a),
        TestbedCmd::Down(a) => down(&a.prefix),
        TestbedCmd::Status(a) => status(&a.prefix),
        TestbedCmd::Exec(a) => exec(&a),
        TestbedCmd::ServeInternet(a) => snas_testbed::serve_internet_daemon(&a.prefix)
            .map(|()| 0)
            .map_err(|e| (1, e.to_string())),
    };
    match r {
        Ok(code) => ExitCode::from(code),
        Err((code, msg)) => {
            eprintln!("snas testbed: {msg}");
            ExitCode::from(code)
        }
    }
}

type CmdResult = Result<u8, (u8, String)>;

/// Writes to stdout; a closed pipe (`status | head`) is not an error worth a panic.
fn out(text: &str) {
    use std::io::Write;
    let _ = std::io::stdout().lock().write_all(text.as_bytes());
}

fn up(a: &UpArgs) -> CmdResult {
    let binary =
        std::env::current_exe().map_err(|e| (1, format!("cannot find own binary: {e}")))?;
    let opts = TestbedOptions {
        prefix: a.prefix.prefix.clone(),
        trust_dir: a.trust.clone(),
        binary,
        start_agents: !a.no_agents,
        start_proxies: !a.no_proxies,
    };
    // Unlike the library guard, a failed `up` leaves what it built for inspection;
    // `status` shows it and `down` removes it.
    snas_testbed::up_unguarded(&opts).map_err(|e| {
        (
            1,
            format!("{e}\n(see `snas testbed status --prefix {p}`; `snas testbed down --prefix {p}` cleans up)", p = opts.prefix),
        )
    })?;
    let st = Testbed::status_of(&opts.prefix).map_err(|e| (1, e.to_string()))?;
    out(&st.to_string());
    Ok(0)
}

fn down(prefix: &str) -> CmdResult {
    let r = Testbed::down(prefix).map_err(|e| (1, e.to_string()))?;
    for (pid, cmd) in &r.killed {
        out(&format!("stopped pid {pid}: {cmd}\n"));
    }
    for n in &r.namespaces {
        out(&format!("removed namespace {n}\n"));
    }
    for d in &r.dirs {
        out(&format!("removed {}\n", d.display()));
    }
    if r.killed.is_empty() && r.namespaces.is_empty() && r.dirs.is_empty() {
        out(&format!("testbed {prefix}: nothing to remove\n"));
    }
    Ok(0)
}

fn status(prefix: &str) -> CmdResult {
    let st: Status = Testbed::status_of(prefix).map_err(|e| (1, e.to_string()))?;
    out(&st.to_string());
    Ok(st.completeness().exit_code())
}

fn exec(a: &ExecArgs) -> CmdResult {
    let t = Topology::new(&a.prefix.prefix).map_err(|e| (125, e.to_string()))?;
    if !(1..=snas_testbed::topology::NODES).contains(&a.node) {
        return Err((
            125,
            format!("--node {}: the testbed has nodes 1 and 2", a.node),
        ));
    }
    let token = read_token(&a.policy).map_err(|e| (125, e.to_string()))?;
    let client = AgentClient::new(t.agent_socket(a.node));
    let job = JobGuard::create(client, &token, &t.state_dir().join("exec"))
        .map_err(|e| (125, e.to_string()))?;
    let Some((program, args)) = a.command.split_first() else {
        return Err((125, "no command given".into()));
    };
    let mut cmd = Command::new(program);
    cmd.args(args);
    job.prepare(&mut cmd).map_err(|e| (125, e.to_string()))?;
    // Ctrl-C ends the command, not us: the job must still be deleted.
    snas_testbed::netns::shield_terminal_signals();
    let status = cmd
        .status()
        .map_err(|e| (125, format!("cannot run {program}: {e}")))?;
    if let Err(e) = job.delete() {
        eprintln!("snas testbed: deleting the job failed: {e}");
    }
    let code = exit_code(status);
    Ok(u8::try_from(code).unwrap_or(1))
}
