//! Subcommand implementations, one module per command group.

pub mod agent;
pub mod observe;
pub mod oci;
pub mod policy;
pub mod proxy;
pub mod run;
pub mod service;
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

/// Bytes for a person: `812 B`, `12.4 kB`, `3.1 MB`, `2.0 GB` (decimal units).
pub(crate) fn human_bytes(b: u64) -> String {
    const UNITS: [&str; 4] = ["kB", "MB", "GB", "TB"];
    if b < 1000 {
        return format!("{b} B");
    }
    let mut v = b as f64 / 1000.0;
    let mut unit = UNITS[0];
    for u in &UNITS[1..] {
        if v < 1000.0 {
            break;
        }
        v /= 1000.0;
        unit = u;
    }
    format!("{v:.1} {unit}")
}
