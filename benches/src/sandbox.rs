//! gvisor-direct's sandbox: the benchmark client in gVisor on a plain veth, no SNAS.
//!
//! Started as this program's hidden `sandbox` subcommand (one process per run, as `snas run`
//! is), it hands the client to the same launcher with the same options `snas run` gives it
//! (`crates/snas/src/cmd/run.rs`): the default platform, runsc's flags from
//! [`snas_sandbox::launch::runsc_flags`] (netstack GSO on), the limits the SNAS (gVisor) path
//! asks for ([`GVISOR_CPUS`], default memory and pids), `/app`, a resolver, forwarded
//! signals and the release memo. What it leaves out is exactly SNAS: the agent's job, tier 1,
//! the overlay and the proxy. The workload's exit status is this process's.

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::Stdio;

use snas_sandbox::bundle::BundleSpec;
use snas_sandbox::launch::{self, RunOptions, Stdio3};
use snas_sandbox::limits::{Limits, MilliCpus};
use snas_sandbox::netcfg::NetConfig;

/// CPU share of a benchmark sandbox on both gVisor paths (`snas run --cpus`): the machine's
/// two cores, so that the limit does not decide the figures.
pub const GVISOR_CPUS: &str = "2";
/// Deadline of a benchmark sandbox on both gVisor paths (`snas run --timeout`).
pub const GVISOR_TIMEOUT: &str = "300s";

/// One gvisor-direct run.
#[derive(Debug, Clone)]
pub struct SandboxSpec {
    /// The client namespace (its veth is `eth0`).
    pub netns: PathBuf,
    /// The sandbox's address, its prefix length and the gateway.
    pub addr: Ipv4Addr,
    pub prefix_len: u8,
    pub gateway: Ipv4Addr,
    /// The resolver the sandbox's `/etc/resolv.conf` names.
    pub nameserver: Ipv4Addr,
    /// Host folder at `/app` (the working directory).
    pub app: PathBuf,
    /// Per-run state of the launcher (and its runsc release memo).
    pub state_dir: PathBuf,
    /// The command inside the sandbox.
    pub command: Vec<String>,
}

/// Errors before the sandbox ran.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// A constant of this module does not parse (a programming error, reported not panicked).
    #[error("{what} {value:?}: {detail}")]
    Setting {
        what: &'static str,
        value: &'static str,
        detail: String,
    },
    /// The launcher could not run the sandbox.
    #[error("sandbox: {0}")]
    Launch(#[from] launch::LaunchError),
    /// Signals could not be blocked.
    #[error("signal mask: {0}")]
    Signals(std::io::Error),
}

/// Runs the sandbox to completion; returns the exit status `snas run` would give.
pub fn run(spec: &SandboxSpec) -> Result<i32, SandboxError> {
    // As `snas run` does, before any thread exists.
    snas_sandbox::process::block_forwarded_signals().map_err(SandboxError::Signals)?;
    let cpus = MilliCpus::parse(GVISOR_CPUS).map_err(|e| SandboxError::Setting {
        what: "cpus",
        value: GVISOR_CPUS,
        detail: e.to_string(),
    })?;
    let timeout = humantime::parse_duration(GVISOR_TIMEOUT).map_err(|e| SandboxError::Setting {
        what: "timeout",
        value: GVISOR_TIMEOUT,
        detail: e.to_string(),
    })?;
    let mut b = BundleSpec::new(spec.command.clone(), spec.netns.clone(), String::new());
    b.hostname = "gvisor-direct".into();
    b.nameservers = vec![spec.nameserver];
    b.limits = Limits {
        cpus,
        ..Limits::default()
    };
    b.app_dir = Some(spec.app.clone());
    b.cwd = "/app".into();
    let mut o = RunOptions::new(b);
    o.state_dir = spec.state_dir.join("runs");
    o.runsc_memo = Some(spec.state_dir.join("runsc-release"));
    o.timeout = Some(timeout);
    o.forward_signals = true;
    o.net = Some(NetConfig {
        netns: spec.netns.clone(),
        iface: "eth0".into(),
        addr: spec.addr,
        prefix_len: spec.prefix_len,
        gateway: spec.gateway,
        // gVisor direct is the IPv4 baseline (the `ipv6` scenario does not run it).
        ipv6: None,
    });
    snas_sandbox::process::shield_terminal_signals();
    let stdio = Stdio3 {
        stdin: Stdio::null(),
        stdout: Stdio::inherit(),
        stderr: Stdio::inherit(),
    };
    let report = launch::run(&o, stdio, &mut |_| {})?;
    if !matches!(report.termination, launch::Termination::Exited(_)) {
        eprintln!("snas-bench sandbox: {}", report.termination);
    }
    for l in &report.leftovers {
        eprintln!("snas-bench sandbox: cleanup could not remove {l}");
    }
    Ok(report.termination.exit_code())
}
