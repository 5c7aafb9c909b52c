//! Subcommand implementations, one module per command group.

pub mod agent;
pub mod observe;
pub mod policy;
pub mod proxy;
pub mod run;
pub mod testbed;

/// Resolves when the process receives SIGINT or SIGTERM (the daemons' stop signals). `who`
/// prefixes the message printed when SIGTERM cannot be watched.
pub(crate) async fn shutdown_signal(who: &str) {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("{who}: cannot watch SIGTERM ({e}); stopping on SIGINT only");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
