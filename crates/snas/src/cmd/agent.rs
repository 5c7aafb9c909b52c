//! `snas agent --config agent.toml`: runs the node agent until SIGINT/SIGTERM.
//!
//! Exit codes: 0 after a clean shutdown, 2 for a configuration error (the message names the file,
//! the field and the reason), 1 for any other failure.

use clap::Args;
use std::path::PathBuf;
use std::process::ExitCode;

/// `snas agent`.
#[derive(Debug, Args)]
pub struct AgentArgs {
    /// Agent configuration file (TOML); see docs/agent.md for every field and its default.
    #[arg(long, value_name = "FILE")]
    config: PathBuf,
}

/// Runs `snas agent`.
pub fn run(args: AgentArgs) -> ExitCode {
    let config = match snas_agent::AgentConfig::from_toml_file(&args.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("snas agent: {e}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("snas agent: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(snas_agent::serve(
        config,
        super::shutdown_signal("snas agent"),
    )) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("snas agent: {e}");
            ExitCode::from(1)
        }
    }
}
