//! `snas agent --config agent.toml`: runs the node agent until SIGINT/SIGTERM.
//!
//! SIGHUP reopens the audit log at its path (logrotate's `postrotate`). Under systemd
//! (`Type=notify`), the agent says `READY=1` itself once it serves; with `WatchdogSec=`, this
//! command sends `WATCHDOG=1` while the agent's API socket answers (`GET /v1/proxies`), see
//! [`super::service`].
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
    let api_socket = config.api_socket.clone();
    let served = runtime.block_on(async move {
        tokio::spawn(super::service::reopen_audit_logs_on_hangup("snas agent"));
        if let Some(n) = super::service::Notifier::from_env() {
            tokio::spawn(async move {
                let client = snas_agent::api::AgentClient::new(api_socket)
                    .with_timeout(std::time::Duration::from_secs(5));
                n.watchdog(|| {
                    let c = client.clone();
                    async move { c.proxies().await.map(drop).map_err(|e| e.to_string()) }
                })
                .await;
            });
        }
        snas_agent::serve(config, super::shutdown_signal("snas agent")).await
    });
    match served {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("snas agent: {e}");
            ExitCode::from(1)
        }
    }
}
