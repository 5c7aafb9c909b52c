//! What `snas agent` and `snas proxy` do for their service manager: reopen the audit logs on
//! SIGHUP (logrotate's `postrotate`), and systemd's readiness and watchdog notifications.
//!
//! # systemd
//! Only when `NOTIFY_SOCKET` is set (a unit with `Type=notify`); otherwise nothing is sent.
//! `READY=1` is sent once the daemon serves (the agent's library sends its own, with its fd
//! store; the proxy's is sent here). With `WatchdogSec=` (systemd sets `WATCHDOG_USEC`, and
//! `WATCHDOG_PID` naming us), [`watchdog`] sends `WATCHDOG=1` every half period — but only
//! after a health check through the daemon's own endpoint succeeded, so a daemon whose runtime
//! is wedged or whose API stopped answering is restarted by systemd instead of kept alive by a
//! thread that pings regardless.

use std::future::Future;
use std::time::Duration;

/// systemd's notification socket and watchdog period, from the environment.
#[derive(Debug, Clone)]
pub(crate) struct Notifier {
    socket: String,
    watchdog: Option<Duration>,
}

impl Notifier {
    /// `None` unless `NOTIFY_SOCKET` is set. The watchdog period is set when `WATCHDOG_USEC`
    /// is, and `WATCHDOG_PID` (if set) is this process.
    pub(crate) fn from_env() -> Option<Notifier> {
        let socket = std::env::var("NOTIFY_SOCKET")
            .ok()
            .filter(|s| !s.is_empty())?;
        let ours = std::env::var("WATCHDOG_PID")
            .ok()
            .and_then(|p| p.parse::<u32>().ok())
            .is_none_or(|p| p == std::process::id());
        let watchdog = std::env::var("WATCHDOG_USEC")
            .ok()
            .and_then(|u| u.parse::<u64>().ok())
            .filter(|u| *u > 0 && ours)
            .map(Duration::from_micros);
        Some(Notifier { socket, watchdog })
    }

    /// Sends `state` (`READY=1`, `STOPPING=1`, `WATCHDOG=1`); a failure is logged.
    pub(crate) fn send(&self, state: &str) {
        if let Err(e) = snas_agent::handover::notify(&self.socket, state, &[]) {
            tracing::warn!(socket = %self.socket, state, error = %e, "systemd notification not sent");
        }
    }

    /// Sends `WATCHDOG=1` every half period while `healthy()` answers true; a failed check is
    /// logged (once per failure run) and no ping is sent, so systemd restarts a daemon that
    /// stays unhealthy for the whole period. Never returns when a watchdog is configured.
    pub(crate) async fn watchdog<F, Fut>(&self, mut healthy: F)
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<(), String>>,
    {
        let Some(period) = self.watchdog else {
            return;
        };
        let every = period / 2;
        let mut failing = false;
        loop {
            // The check may take at most the interval: a hung endpoint counts as a failure.
            match tokio::time::timeout(every, healthy()).await {
                Ok(Ok(())) => {
                    if failing {
                        tracing::info!("health check passes again; watchdog pings resume");
                    }
                    failing = false;
                    self.send("WATCHDOG=1");
                }
                Ok(Err(e)) if !failing => {
                    tracing::warn!(error = %e, "health check failed; no watchdog ping");
                    failing = true;
                }
                Err(_) if !failing => {
                    tracing::warn!("health check timed out; no watchdog ping");
                    failing = true;
                }
                _ => {}
            }
            tokio::time::sleep(every).await;
        }
    }
}

/// Reopens the agent's and the proxy's audit logs at their paths on every SIGHUP (after
/// logrotate moved them away). Never returns (runs until the runtime stops).
pub(crate) async fn reopen_audit_logs_on_hangup(who: &'static str) {
    use tokio::signal::unix::{signal, SignalKind};
    let mut hup = match signal(SignalKind::hangup()) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "{who}: cannot watch SIGHUP; audit logs are not reopened");
            return std::future::pending().await;
        }
    };
    while hup.recv().await.is_some() {
        snas_agent::audit::reopen();
        snas_proxy::audit_log::reopen();
        tracing::info!("{who}: SIGHUP: audit log reopened");
    }
    std::future::pending().await
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::os::unix::net::UnixDatagram;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    fn received(sock: &UnixDatagram) -> Vec<String> {
        let mut out = Vec::new();
        let mut buf = [0u8; 256];
        while let Ok(n) = sock.recv(&mut buf) {
            out.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
        out
    }

    #[test]
    fn the_watchdog_pings_only_while_the_health_check_passes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let sock = UnixDatagram::bind(&path).unwrap();
        sock.set_nonblocking(true).unwrap();
        let n = Notifier {
            socket: path.display().to_string(),
            watchdog: Some(Duration::from_millis(40)),
        };
        let healthy = Arc::new(AtomicBool::new(true));
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let h = Arc::clone(&healthy);
        let run = |d: Duration| {
            let h = Arc::clone(&h);
            let n = n.clone();
            rt.block_on(async move {
                let _ = tokio::time::timeout(
                    d,
                    n.watchdog(|| {
                        let ok = h.load(Ordering::SeqCst);
                        async move {
                            if ok {
                                Ok(())
                            } else {
                                Err("down".to_owned())
                            }
                        }
                    }),
                )
                .await;
            });
        };
        run(Duration::from_millis(200));
        let pings = received(&sock);
        assert!(
            !pings.is_empty() && pings.iter().all(|p| p == "WATCHDOG=1"),
            "{pings:?}"
        );
        healthy.store(false, Ordering::SeqCst);
        run(Duration::from_millis(200));
        assert_eq!(received(&sock), Vec::<String>::new());
    }
}
