//! `snas proxy --config proxy.toml`: runs the egress proxy (tier 2) until SIGINT/SIGTERM.
//!
//! SIGHUP reopens the audit log at its path (logrotate's `postrotate`). Under systemd
//! (`Type=notify`): `READY=1` once the daemon serves, `WATCHDOG=1` while its management
//! endpoint answers `GET /healthz` (`ok` or `draining`), `STOPPING=1` on the way out; see
//! [`super::service`].
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
    let notifier = super::service::Notifier::from_env();
    let control = daemon.control_addr();
    signals.block_on(async {
        if let Some(n) = &notifier {
            n.send("READY=1");
        }
        let health = snas_proxy::api::ProxyClient::new(control)
            .with_timeout(std::time::Duration::from_secs(5));
        let watchdog = async {
            if let Some(n) = &notifier {
                n.watchdog(|| {
                    let c = health.clone();
                    async move { c.health().await.map(drop).map_err(|e| e.to_string()) }
                })
                .await;
            }
            std::future::pending::<()>().await;
        };
        tokio::select! {
            () = super::shutdown_signal("snas proxy") => {}
            () = super::service::reopen_audit_logs_on_hangup("snas proxy") => {}
            () = watchdog => {}
        }
    });
    if let Some(n) = &notifier {
        n.send("STOPPING=1");
    }
    daemon.stop();
    eprintln!("snas proxy: {name} stopped");
    ExitCode::SUCCESS
}
