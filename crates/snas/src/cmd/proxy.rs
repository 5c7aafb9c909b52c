//! `snas proxy --config proxy.toml`: runs the egress proxy (tier 2) until SIGINT/SIGTERM.
//!
//! Exit codes: 0 after a clean shutdown, 2 for a configuration error (the message names the file,
//! the field and the reason), 1 for any other failure (TUN, sockets, trust bundle).

use clap::Args;
use std::path::PathBuf;
use std::process::ExitCode;

/// `snas proxy`.
#[derive(Debug, Args)]
pub struct ProxyArgs {
    /// Proxy configuration file (TOML); see docs/proxy.md for every field and its default.
    #[arg(long, value_name = "FILE")]
    config: PathBuf,
}

/// Runs `snas proxy`.
pub fn run(args: ProxyArgs) -> ExitCode {
    let config = match snas_proxy::config::ProxyConfig::load(&args.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("snas proxy: {e}");
            return ExitCode::from(2);
        }
    };
    let name = config.name.clone();
    let daemon = match snas_proxy::daemon::Daemon::start(config) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("snas proxy: {e}");
            return ExitCode::from(1);
        }
    };
    eprintln!("snas proxy: {name} running");
    let signals = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("snas proxy: cannot start the signal runtime: {e}");
            return ExitCode::from(1);
        }
    };
    signals.block_on(super::shutdown_signal("snas proxy"));
    daemon.stop();
    eprintln!("snas proxy: {name} stopped");
    ExitCode::SUCCESS
}
