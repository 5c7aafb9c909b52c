//! The state the daemon's parts share: the data-path workers ([`crate::daemon`]), the HTTP
//! endpoints ([`crate::api::server`]) and the resolver ([`crate::resolver`]).
//!
//! Its own module so that those three depend on it and not on each other: the endpoints and
//! the resolver need the engine, the policy store and the counters, not the daemon's wiring.
//!
//! # Invariants
//! - The engine lock is taken once per batch or per request and never held across I/O.
//! - Everything else here is atomics, or `Arc`s of structures with their own locking.

use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::SystemTime;

use crate::audit_log::{event_line, AuditSink};
use crate::clock::{Clock, MonotonicClock, Nanos};
use crate::config::ProxyConfig;
use crate::guard::Guard;
use crate::metrics::Metrics;
use crate::policy_fetch::{Fetcher, PolicyStore};
use crate::tier2::{Now, Tier2};
use crate::wake::Wake;

/// State shared by workers, the control endpoint and the resolver.
#[derive(Debug)]
pub struct Shared {
    /// The configuration.
    pub cfg: ProxyConfig,
    /// The tier-2 engine (one for all workers; see the module docs).
    pub engine: Mutex<Tier2>,
    /// Verified policies.
    pub store: Arc<PolicyStore>,
    /// Policy fetcher.
    pub fetcher: Arc<Fetcher>,
    /// Drain flag (control endpoint).
    pub draining: AtomicBool,
    /// Counters.
    pub metrics: Metrics,
    /// Audit log.
    pub audit: AuditSink,
    /// The monotonic clock of the engine.
    pub clock: MonotonicClock,
    /// Wakes the workers (held packets to release).
    pub wake: Wake,
    /// Per worker: what its pacing and fair queues hold (metrics).
    pub worker_gauges: Vec<WorkerGauges>,
    /// The nftables guard, when the data path runs.
    pub guard: Option<Arc<Guard>>,
    /// Set when the daemon stops (workers and tasks end).
    pub(crate) stop: AtomicBool,
}

impl Shared {
    /// Locks the engine (a poisoned lock is taken over: the engine has no invariant a panic in
    /// a worker could break half-way that is worse than stopping the proxy).
    pub fn engine(&self) -> MutexGuard<'_, Tier2> {
        self.engine.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The engine's monotonic time now.
    pub fn clock_now(&self) -> Nanos {
        self.clock.now()
    }

    /// The engine's time now.
    pub fn now(&self) -> Now {
        Now {
            mono: self.clock.now(),
            unix_secs: SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
        }
    }

    /// Sends the engine's pending audit events to the log (call with the engine locked).
    pub fn flush_audit(&self, engine: &mut Tier2) {
        for e in engine.drain_audit() {
            self.audit.send(event_line(&e));
        }
    }
}

/// What one worker's queues hold, published after each wake-up (metrics).
#[derive(Debug, Default)]
pub struct WorkerGauges {
    /// Packets in its pacing queue.
    pub pacing_packets: AtomicU64,
    /// Their bytes.
    pub pacing_bytes: AtomicU64,
    /// Packets in its two fair queues.
    pub fair_packets: AtomicU64,
    /// Their bytes.
    pub fair_bytes: AtomicU64,
    /// Tenants with something in its fair queues (counted once per queue).
    pub fair_tenants: AtomicU64,
    /// Packets served from its fair queues since start.
    pub fair_served: AtomicU64,
    /// Their summed waits in the fair queues, nanoseconds.
    pub fair_waited_ns: AtomicU64,
    /// Packets its node-side fair queue shed (`tenant_queue_full`) since start.
    pub fair_dropped_from_nodes: AtomicU64,
    /// Packets its node-bound fair queue shed (`tenant_queue_full`) since start.
    pub fair_dropped_to_nodes: AtomicU64,
}
