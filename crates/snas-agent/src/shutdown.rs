//! The agent's stop signal inside the process: one `watch` channel whose value turns true when
//! the serving tasks must stop. Every long-running task (API servers, DNS stub, health checks,
//! discovery, periodic work) waits on [`stopped`]; only [`crate::node`] sends.

use tokio::sync::watch;

/// Completes when `rx` turns true (or its sender is gone).
pub async fn stopped(mut rx: watch::Receiver<bool>) {
    let _ = rx.wait_for(|v| *v).await;
}
