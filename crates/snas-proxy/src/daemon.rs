//! The proxy daemon: wiring of the tier-2 engine to sockets, the TUN device, the policy
//! fetcher, the control endpoint, the resolver and the audit log.
//!
//! # Threads
//! - `workers` data-path threads (plain threads + `poll`): each owns a GENEVE socket bound to
//!   `underlay:6081` with `SO_REUSEPORT` and one TUN queue, and runs every packet through the
//!   shared [`Tier2`] engine, in turns (below); it holds early packets in a departure-ordered
//!   queue until due.
//! - one tokio runtime (2 threads) for everything that is not per packet: policy fetches,
//!   policy expiry, the management and service endpoints and the resolver.
//! - the audit writer thread ([`crate::audit_log`]).
//!
//! # A worker's turn: read everything, then serve a little, fairly
//! A packet that waits in a kernel queue (the socket's receive queue, the TUN device's) cannot
//! be scheduled: it waits behind whatever arrived before it, and is lost with them when the
//! queue overflows. So each turn a worker first *ingests*: it drains the GENEVE socket
//! (`recvmmsg`, up to [`INGEST_PER_TURN`] datagrams) into a fair queue keyed by the tenant and
//! job of each datagram's GENEVE option — a copy into a pooled buffer, no tier-2 work — and
//! drains the TUN device the same way (there the engine runs at once: reverse NAT names the
//! job, and ingress pacing needs the arrival time), queueing the datagrams for nodes in a
//! second fair queue. Then it *serves* both queues, a small pass of each at a time
//! ([`SERVE_FROM_NODES`] packets, one `sendmmsg`), until they are empty or [`SERVE_PER_TURN`]
//! (50 µs) has passed, in deficit-round-robin order ([`crate::fair`]): tier 2 and the TUN write
//! for packets from nodes, one `sendmmsg` for packets to nodes — the expensive part, measured at ~6 µs per
//! TUN write and ~4 µs per datagram sent against ~1.7 µs per datagram read on the 2-core
//! testbed. Tenants that send now and then are served first, a flooding tenant gets one
//! quantum per round, and what exceeds a tenant's bound is dropped from the head of its
//! fattest job's queue (`tenant_queue_full`, counted by the engine).
//!
//! # Busy polling
//! With `busy_poll_us` set, a worker that moved a packet keeps polling (`ppoll` with no timeout)
//! for that long before it blocks. A spin reads the socket and the TUN queue only when `ppoll`
//! reported them ready, and a spin that found nothing yields the CPU (`sched_yield`) first: a
//! spinning worker must not keep a runnable thread — the other proxy's worker, the client or
//! the server on a shared machine — off its CPU (measured: one new flow's SYN in five waited
//! ~120 µs in the proxy, a whole busy-poll window of the other worker, without the yield).
//!
//! # Multi-worker consistency
//! One [`Tier2`] engine behind a `Mutex`, locked once per batch and never across a system call:
//! a worker receives a batch, locks, decides every packet, unlocks, then does the I/O. Any
//! worker may therefore handle either direction of any flow (the TUN queue that receives a
//! reply need not belong to the worker whose socket received the request). The cost is lock
//! contention between workers, which is small at batch granularity on this 2-core machine.
//!
//! # Pacing
//! Tier 2 stamps each packet with a departure time. A packet due now is written at once; a
//! later one is copied into a recycled buffer and queued; `ppoll` wakes at the earliest
//! departure (microsecond-scale resolution) or every [`TICK`] for housekeeping. What one job
//! may have queued in a worker (packets, bytes) and the worker's total are bounded
//! ([`crate::budget::QueueBudget`]); beyond, the packet is dropped as `pacing_horizon`.
//!
//! # First packets
//! A packet of a job whose policy is not cached is held by the engine ([`crate::hold`]) and a
//! fetch is queued. When the fetch ends, the fetcher's hook marks the job ready (or drops its
//! packets with the fetch's reason) and writes the workers' eventfd ([`crate::wake`]): a worker
//! wakes at once and runs the held packets through the engine again, in order.
//!
//! # Invariants
//! - No allocation per packet on the established path (receive buffers, refusal buffers, send
//!   batches and the pacing pool are reused; the pool grows only under a pacing backlog).
//! - Drops are counted (engine drop counters, metrics), never errors.
//! - Draining: the flag is copied into the engine before each batch; new flows are refused
//!   with `draining`, existing ones continue.

use std::cmp::Ordering as CmpOrdering;
use std::collections::BinaryHeap;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ipnet::IpNet;
use snas_policy::bundle_fs::load_trust_bundle;
use snas_wire::geneve::parse_payload;
use snas_wire::{JobKey, Reason, TenantId};

use crate::audit_log;
use crate::budget::QueueBudget;
use crate::clock::{Clock, MonotonicClock, Nanos};
use crate::config::ProxyConfig;
use crate::fair::{FairQueue, Size};
use crate::fast_path::{self, FastPathIo, Mirror};
use crate::gso;
use crate::guard::Guard;
use crate::hold::HeldPacket;
use crate::metrics::{add, Metrics};
use crate::offload::OffloadEvent;
use crate::pacer::PacerConfig;
use crate::policy_fetch::{FetchConfig, Fetcher, PolicyStore};
use crate::tier2::{Tier2, Tier2Config, Verdict, GENEVE_HEADER_LEN};
use crate::tun::{self, TunQueue, UnderlayTap};
use crate::udp::{self, GeneveSocket, RecvBatch, SendBatch};
use crate::vnet::{self, Finished, VnetHdr, VNET_HDR_LEN};
use crate::wake::Wake;
use snas_bpf::fastpath::ClockDir;
use snas_wire::geneve::GENEVE_PORT;

use crate::shared::{Shared, WorkerGauges};

/// Housekeeping period (conntrack expiry, drain flag) and longest `poll` sleep.
pub const TICK: Duration = Duration::from_millis(5);
/// Probes and RSTs of ended flows ([`crate::resets`]) a worker sends per [`TICK`] at most.
const CONTROL_PER_TICK: usize = 1024;

/// A packet whose departure is at most this far ahead is sent now rather than queued: less
/// than a wake-up costs, and the pacer's clocks do not depend on when a packet really left, so
/// long-run rates are unchanged (at 1 Gbit/s it is about two full-sized packets of burst).
pub const PACING_SLACK: Duration = Duration::from_micros(25);

/// Whether a packet departing at `depart` goes out now: due within [`PACING_SLACK`] and not
/// behind anything already queued (`floor`: the earliest queued departure, including packets
/// queued earlier in the same batch), so that a job's packets never overtake each other.
fn send_now(depart: Nanos, now: Nanos, floor: &mut Option<Nanos>) -> bool {
    if depart <= now.saturating_add(PACING_SLACK) && floor.is_none_or(|f| f > depart) {
        return true;
    }
    *floor = Some(floor.map_or(depart, |f| f.min(depart)));
    false
}

/// Size of a refusal buffer (GENEVE header + RST or ICMP quoting up to 1280 bytes).
const REFUSAL_LEN: usize = GENEVE_HEADER_LEN + 1400;

/// A start-up failure.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// the trust bundle cannot be loaded
    #[error("trust bundle: {0}")]
    Trust(#[from] snas_policy::bundle_fs::BundleFsError),
    /// the engine configuration is invalid
    #[error("tier 2: {0}")]
    Engine(#[from] crate::tier2::Tier2Error),
    /// the fair-queue configuration is invalid
    #[error("fair queues: {0}")]
    Fair(#[from] crate::fair::FairConfigError),
    /// the TUN device cannot be set up
    #[error(transparent)]
    Tun(#[from] tun::TunError),
    /// the nftables guard cannot be installed
    #[error(transparent)]
    Guard(#[from] crate::guard::GuardError),
    /// a socket cannot be bound
    #[error("bind {what} {addr}: {source}")]
    Bind {
        /// Which socket.
        what: &'static str,
        /// Address.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
    /// the audit log cannot be opened
    #[error(transparent)]
    Audit(#[from] audit_log::AuditError),
    /// the state directory, runtime or a thread cannot be created
    #[error("{what}: {source}")]
    Io {
        /// What.
        what: &'static str,
        /// The error.
        source: std::io::Error,
    },
    /// a secret file (`peer_secret_file`, `control_token_file`) cannot be used
    #[error("{field} {path}: {detail}")]
    Secret {
        /// The configuration field naming the file.
        field: &'static str,
        /// File.
        path: String,
        /// Why.
        detail: String,
    },
}

/// A running proxy. Dropping it stops the workers and the runtime.
#[derive(Debug)]
pub struct Daemon {
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
    runtime: Option<tokio::runtime::Runtime>,
    guard: Option<Arc<Guard>>,
    /// The in-kernel fast path, when attached (detached when the last worker let go of it).
    fast: Option<Arc<FastPathIo>>,
    control_addr: SocketAddr,
    service_addr: SocketAddr,
    resolver_addr: SocketAddr,
}

fn engine_config(
    cfg: &ProxyConfig,
    infrastructure: Vec<IpNet>,
    clock_horizon: Duration,
) -> Tier2Config {
    let mut t = Tier2Config::new(cfg.underlay_addr, cfg.nodes.clone(), cfg.egress_ips());
    t.infrastructure = infrastructure;
    t.hold = cfg.hold_config();
    t.audit_lines_per_sec = cfg.audit_lines_per_job_per_sec;
    t.segment_mtu = cfg.tun_mtu as usize;
    let cap = crate::pacer::PaceRate::Limited(cfg.tenant_cap_rate());
    t.default_tenant_cap = (cap, cap);
    t.pacer = PacerConfig {
        horizon: clock_horizon,
        ..PacerConfig::default()
    };
    let nat = &mut t.conntrack.nat;
    nat.max_ports_per_job = cfg.max_ports_per_job;
    nat.max_ports_per_tenant = cfg.max_ports_per_tenant;
    nat.tenant_quotas = cfg
        .tenant_quotas
        .iter()
        .map(|(name, quota)| (snas_policy::identity::tenant_id(name), *quota))
        .collect();
    t
}

impl Daemon {
    /// Sets everything up on the calling thread's network namespace and starts the threads.
    pub fn start(cfg: ProxyConfig) -> Result<Daemon, DaemonError> {
        Daemon::start_with(cfg, true)
    }

    /// Starts the control plane only (policy fetcher, endpoints, resolver, audit log, the
    /// engine's housekeeping): no TUN device, no guard, no GENEVE sockets, no workers. For
    /// tests of the resolver and the endpoints without privileges.
    pub fn start_control_plane(cfg: ProxyConfig) -> Result<Daemon, DaemonError> {
        Daemon::start_with(cfg, false)
    }

    fn start_with(cfg: ProxyConfig, data_path: bool) -> Result<Daemon, DaemonError> {
        let io = |what| move |source| DaemonError::Io { what, source };
        std::fs::create_dir_all(&cfg.state_dir).map_err(io("create state_dir"))?;
        let trust = load_trust_bundle(&cfg.trust)?;
        let secrets = crate::api::server::Secrets {
            peer_secret: match &cfg.peer_secret_file {
                Some(p) => Some(read_secret("peer_secret_file", p)?),
                None => None,
            },
            control_token: match &cfg.control_token_file {
                Some(p) => Some(read_secret("control_token_file", p)?),
                None => None,
            },
        };
        let clock = MonotonicClock::new();
        // The infrastructure set: the configuration's, plus the underlay's on-link network.
        let mut infrastructure = cfg.infrastructure_set();
        if data_path {
            let onlink = tun::onlink_prefixes(cfg.underlay_addr)?;
            infrastructure.extend(onlink.into_iter().map(IpNet::V4));
        }
        let mut engine = Tier2::new(
            engine_config(&cfg, infrastructure.clone(), cfg.pacing_horizon()),
            clock.now(),
        )?;

        // The data path: TUN queues and GENEVE sockets, bound here so errors surface.
        let multi = cfg.workers > 1;
        let n = if data_path { cfg.workers } else { 0 };
        let mut queues = Vec::with_capacity(n);
        for _ in 0..n {
            queues.push(TunQueue::open(&cfg.tun_name, multi)?);
        }
        let taps = if data_path && cfg.overlay_gso {
            open_overlay_gso(&cfg.overlay_gso_device(), n)
        } else {
            Vec::new()
        };
        let mut guard = None;
        if data_path {
            tun::configure(&cfg.tun_name, cfg.tun_mtu, &cfg.egress_pool)?;
            tun::configure6(&cfg.tun_name, &cfg.egress_pool6)?;
            // Before any packet can reach the device from a worker.
            guard = Some(Arc::new(Guard::install(
                &cfg.tun_name,
                engine.infrastructure(),
            )?));
        }
        let fast = if data_path && cfg.fast_path {
            start_fast_path(&cfg)
        } else {
            None
        };
        engine.set_offload(fast.is_some());
        // Short connections stay in userspace: installing and removing them would cost more
        // map system calls on their own packets' path than the fast path saves them.
        engine.set_offload_min_packets(crate::offload::FAST_AFTER_PACKETS);
        let gaddr = SocketAddrV4::new(cfg.underlay_addr, GENEVE_PORT);
        let mut socks = Vec::with_capacity(n);
        for _ in 0..n {
            socks.push(
                GeneveSocket::bind(gaddr).map_err(|source| DaemonError::Bind {
                    what: "GENEVE",
                    addr: gaddr.into(),
                    source,
                })?,
            );
        }
        let http_listener = |what: &'static str, addr: SocketAddr| {
            let l = std::net::TcpListener::bind(addr).map_err(|source| DaemonError::Bind {
                what,
                addr,
                source,
            })?;
            l.set_nonblocking(true).map_err(io(what))?;
            let local = l.local_addr().map_err(io(what))?;
            Ok::<_, DaemonError>((l, local))
        };
        let (control, control_addr) = http_listener("control", cfg.control_listen)?;
        let (service, service_addr) = http_listener("service", cfg.service_addr())?;
        let resolver_sockets =
            crate::resolver::bind(cfg.resolver_listen).map_err(|source| DaemonError::Bind {
                what: "resolver",
                addr: cfg.resolver_listen,
                source,
            })?;
        let resolver_addr = resolver_sockets
            .local_addr()
            .map_err(io("resolver sockets"))?;

        let (audit, _audit_thread) = audit_log::start(&cfg.audit_log)?;
        let store = Arc::new(PolicyStore::new());
        let (fetcher, queue) = Fetcher::new(
            Arc::clone(&store),
            trust,
            FetchConfig {
                agent_port: cfg.agent_policy_port,
                timeout: cfg.fetch_timeout(),
                negative: cfg.negative_cache(),
                infrastructure: infrastructure.into(),
            },
        );
        let shared = Arc::new(Shared {
            cfg,
            engine: Mutex::new(engine),
            store,
            fetcher: Arc::clone(&fetcher),
            draining: AtomicBool::new(false),
            metrics: Metrics::default(),
            audit,
            clock,
            wake: Wake::new().map_err(io("wake eventfd"))?,
            worker_gauges: (0..n).map(|_| WorkerGauges::default()).collect(),
            guard: guard.clone(),
            stop: AtomicBool::new(false),
        });
        // The end of a fetch releases or drops the job's held packets, at once.
        let weak = Arc::downgrade(&shared);
        shared.fetcher.set_notify(Arc::new(move |job, outcome| {
            let Some(s) = weak.upgrade() else {
                return;
            };
            let wake = {
                let mut eng = s.engine();
                match outcome {
                    Ok(()) => eng.policy_ready(job),
                    Err(reason) => {
                        eng.policy_failed(job, reason);
                    }
                }
                eng.has_released()
            };
            if wake {
                s.wake.notify();
            }
        }));

        // Live updates re-decide the job's flows (crate::lifecycle).
        crate::lifecycle::install(&shared);

        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("snas-proxy-ctl")
            .enable_all()
            .build()
            .map_err(io("tokio runtime"))?;
        {
            let _enter = runtime.enter();
            let control =
                tokio::net::TcpListener::from_std(control).map_err(io("control listener"))?;
            let service =
                tokio::net::TcpListener::from_std(service).map_err(io("service listener"))?;
            runtime.spawn(fetcher.run(queue));
            runtime.spawn(expire_policies(Arc::clone(&shared)));
            runtime.spawn(crate::lifecycle::run(Arc::clone(&shared)));
            if !data_path {
                // No worker runs the engine's housekeeping: a task does.
                runtime.spawn(housekeeping(Arc::clone(&shared)));
            }
            runtime.spawn(crate::api::server::serve(
                control,
                crate::api::server::management_router(Arc::clone(&shared), secrets.clone()),
                "control",
            ));
            runtime.spawn(crate::api::server::serve(
                service,
                crate::api::server::service_router(Arc::clone(&shared), secrets.clone()),
                "service",
            ));
            crate::resolver::spawn(resolver_sockets, Arc::clone(&shared), secrets.peer_secret)
                .map_err(io("resolver sockets"))?;
        }

        let mut workers = Vec::with_capacity(socks.len());
        let mut taps = taps.into_iter();
        for (i, (sock, q)) in socks.into_iter().zip(queues).enumerate() {
            let s = Arc::clone(&shared);
            let fair = shared.cfg.fair_config();
            let queues = (FairQueue::new(fair)?, FairQueue::new(fair)?);
            let tap = taps.next();
            let fast = fast.clone();
            let h = std::thread::Builder::new()
                .name(format!("snas-proxy-w{i}"))
                .spawn(move || Worker::new(s, i, sock, q, tap, queues, fast).run())
                .map_err(io("worker thread"))?;
            workers.push(h);
        }
        tracing::info!(
            name = %shared.cfg.name,
            workers = shared.cfg.workers,
            "proxy started"
        );
        Ok(Daemon {
            shared,
            workers,
            runtime: Some(runtime),
            guard,
            fast,
            control_addr,
            service_addr,
            resolver_addr,
        })
    }

    /// Where the management endpoint listens (useful with port 0).
    pub fn control_addr(&self) -> SocketAddr {
        self.control_addr
    }

    /// Where the service endpoint listens (useful with port 0).
    pub fn service_addr(&self) -> SocketAddr {
        self.service_addr
    }

    /// Where the resolver listens, UDP and TCP (useful with port 0).
    pub fn resolver_addr(&self) -> SocketAddr {
        self.resolver_addr
    }

    /// The shared state (tests, the CLI).
    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// Stops the threads and waits for the workers.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
        // The workers are gone: the last reference detaches the programs.
        self.fast = None;
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_timeout(Duration::from_secs(1));
        }
        // Last: no worker writes into the TUN device any more.
        if let Some(g) = self.guard.take() {
            if let Err(e) = g.remove() {
                tracing::warn!(error = %e, "could not remove the nftables guard");
            }
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Loads and attaches the in-kernel fast path; on failure logs why and returns none (every
/// packet then takes the userspace path; `snas_proxy_fastpath_available` stays 0).
fn start_fast_path(cfg: &ProxyConfig) -> Option<Arc<FastPathIo>> {
    match FastPathIo::start(
        cfg.underlay_addr,
        &cfg.nodes,
        cfg.fast_path_interface.as_deref(),
        cfg.pacing_horizon(),
    ) {
        Ok(f) => Some(Arc::new(f)),
        Err(e) => {
            tracing::warn!(
                error = %e,
                "fast path unavailable: every packet takes the userspace path"
            );
            None
        }
    }
}

/// Reads a secret file named by configuration `field` (surrounding whitespace ignored, at
/// least 16 characters).
fn read_secret(field: &'static str, p: &std::path::Path) -> Result<Arc<str>, DaemonError> {
    let err = |detail: String| DaemonError::Secret {
        field,
        path: p.display().to_string(),
        detail,
    };
    let s = std::fs::read_to_string(p).map_err(|e| err(e.to_string()))?;
    let s = s.trim();
    if s.len() < 16 {
        return Err(err("shorter than 16 characters".into()));
    }
    Ok(Arc::from(s))
}

async fn expire_policies(shared: Arc<Shared>) {
    let mut t = tokio::time::interval(Duration::from_secs(1));
    loop {
        t.tick().await;
        let n = shared.now();
        shared.store.evict_expired(n.unix_secs, Instant::now());
    }
}

/// The engine's housekeeping when no worker runs (control plane only).
async fn housekeeping(shared: Arc<Shared>) {
    let mut t = tokio::time::interval(TICK);
    loop {
        t.tick().await;
        let snap = shared.store.snapshot();
        let view = snap.at(Instant::now());
        let now = shared.now();
        let mut eng = shared.engine();
        eng.tick(&view, now);
        shared.flush_audit(&mut eng);
    }
}

/// A packet waiting in a worker's pacing queue.
#[derive(Debug)]
struct Held {
    depart: Nanos,
    seq: u64,
    to: Option<SocketAddrV4>,
    job: JobKey,
    /// For the internet: the path MTU the segments must fit ([`Verdict::ToInternet`]).
    path_mtu: Option<u16>,
    data: Vec<u8>,
}

impl PartialEq for Held {
    fn eq(&self, o: &Self) -> bool {
        (self.depart, self.seq) == (o.depart, o.seq)
    }
}
impl Eq for Held {}
impl PartialOrd for Held {
    fn partial_cmp(&self, o: &Self) -> Option<CmpOrdering> {
        Some(self.cmp(o))
    }
}
impl Ord for Held {
    // Reversed: BinaryHeap is a max-heap and the earliest departure must come out first.
    fn cmp(&self, o: &Self) -> CmpOrdering {
        (o.depart, o.seq).cmp(&(self.depart, self.seq))
    }
}

/// What to do with slot `i` of a batch once the engine lock is released.
#[derive(Debug, Clone)]
enum Out {
    Nothing,
    /// To the internet now, within the path MTU if one is known.
    Internet(std::ops::Range<usize>, Option<u16>),
    Refuse(Ipv4Addr, usize),
    /// Into the pacing queue until the departure: to a node, or (`None`) to the internet
    /// within the path MTU if one is known.
    Hold(
        Nanos,
        Option<SocketAddrV4>,
        std::ops::Range<usize>,
        JobKey,
        Option<u16>,
    ),
}

/// Where the buffers of a batch of packets from nodes are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum NodeBufs {
    /// Packets popped from the node-side fair queue.
    Served,
    /// Held packets whose policy arrived.
    Released,
}

/// The tenant a datagram from a node is queued under: the tenant id its GENEVE option claims,
/// or `None` when it has no valid SNAS option (the engine drops it with the reason when its
/// turn comes; such datagrams share one queue, so a node sending garbage cannot take more
/// than one tenant's share either).
type NodeTenant = Option<TenantId>;

/// A GENEVE datagram from a node waiting for its turn: its buffer (`buf[..len]`; `buf` is a
/// small pool buffer, or a whole receive buffer for TCP super-packets), and where it came from.
#[derive(Debug)]
struct NodePkt {
    buf: Vec<u8>,
    len: usize,
    src: Ipv4Addr,
}

/// A GENEVE datagram for a node (a reply from the internet, decided and NATed) waiting for its
/// turn to be sent.
#[derive(Debug)]
struct NodeBound {
    data: Vec<u8>,
    to: SocketAddrV4,
    /// A TCP super-packet to leave whole through the overlay-GSO device, in segments of at
    /// most this many bytes of inner packet.
    whole: Option<usize>,
}

/// Pacing-queue and fair-queue buffers up to this size come from the small pool (most
/// packets), larger ones from the large pool: a queued 100-byte packet never pins 64 KiB.
const SMALL_BUF: usize = 2048;
/// Buffers kept for reuse per pool after a backlog drained.
const POOL_KEEP: usize = 4096;

/// Datagrams (and TUN packets) a worker reads per turn before it serves its fair queues
/// again: reading is cheap and must keep the kernel's queues short, since a packet waiting
/// there cannot be scheduled (and is lost when they overflow).
const INGEST_PER_TURN: usize = 64;

/// How long a worker serves its fair queues per turn before it reads its socket and TUN queue
/// again: short, so that a packet waits little in the kernel before it is read and queued
/// fairly; long enough that the per-turn reads (one `recvmmsg`, one TUN read, mostly finding
/// nothing under load in one direction) cost a few percent.
const SERVE_PER_TURN: Duration = Duration::from_micros(50);

/// Packets from nodes served per engine pass (one lock; TUN writes after it), and the bytes
/// after which a pass stops early (a TCP super-packet is served alone: it becomes ~45 TUN
/// writes).
const SERVE_FROM_NODES: usize = 8;
/// See [`SERVE_FROM_NODES`].
const SERVE_FROM_NODES_BYTES: usize = 16 * 1024;

/// Turns a worker takes per wake-up before it runs its pacing queue, held packets and
/// housekeeping checks again.
const TURNS_PER_WAKE: usize = 64;

/// Reusable buffers of a worker.
#[derive(Debug, Default)]
struct Pools {
    /// Empty buffers of capacity ≥ [`SMALL_BUF`].
    small: Vec<Vec<u8>>,
    /// Empty buffers of larger capacity.
    large: Vec<Vec<u8>>,
    /// Receive buffers ([`udp::RECV_BUF_LEN`] long) swapped out of the receive batch with a
    /// TCP super-packet in them.
    rx: Vec<Vec<u8>>,
}

impl Pools {
    /// An empty buffer with room for `len` bytes.
    fn take(&mut self, len: usize) -> Vec<u8> {
        let pool = if len <= SMALL_BUF {
            &mut self.small
        } else {
            &mut self.large
        };
        let mut b = pool
            .pop()
            .unwrap_or_else(|| Vec::with_capacity(len.max(SMALL_BUF)));
        b.clear();
        b
    }

    /// Returns a buffer. A receive buffer is recognised by its length, [`udp::RECV_BUF_LEN`],
    /// which no packet buffer has (a UDP payload is at most 65,507 bytes), and goes back to the
    /// receive pool.
    fn give(&mut self, b: Vec<u8>) {
        let pool = if b.len() == udp::RECV_BUF_LEN {
            &mut self.rx
        } else if b.capacity() <= SMALL_BUF {
            &mut self.small
        } else {
            &mut self.large
        };
        if pool.len() < POOL_KEEP {
            pool.push(b);
        }
    }

    /// A receive buffer to swap into the receive batch.
    fn take_rx(&mut self) -> Vec<u8> {
        self.rx
            .pop()
            .unwrap_or_else(|| vec![0u8; udp::RECV_BUF_LEN])
    }
}

struct Worker {
    s: Arc<Shared>,
    index: usize,
    sock: GeneveSocket,
    tun: TunQueue,
    /// The overlay-GSO device's queue of this worker, if the kernel has it.
    tap: Option<UnderlayTap>,
    rx: RecvBatch,
    tx: SendBatch,
    refusals: Vec<Vec<u8>>,
    tunbufs: Vec<Vec<u8>>,
    tunlens: Vec<usize>,
    /// What each packet of the TUN batch needs before it goes to a node.
    tunhow: Vec<Finished>,
    /// The segments' departures of the super-packet being sent to a node.
    departs: Vec<Option<Nanos>>,
    outs: Vec<Out>,
    /// Datagrams from nodes waiting for tier-2 processing and the TUN write.
    from_nodes: FairQueue<NodeTenant, JobKey, NodePkt>,
    /// Replies for nodes waiting to be sent.
    to_nodes: FairQueue<NodeTenant, JobKey, NodeBound>,
    /// The packets of the current turn (popped from `from_nodes`).
    serving: Vec<NodePkt>,
    /// The datagrams of the current turn (popped from `to_nodes`).
    sending: Vec<NodeBound>,
    /// Fair-queue drops not yet added to the engine's counters (counted without its lock), by
    /// the tenant their datagram's option claimed (a handful of tenants between two passes).
    unreported_drops: Vec<(NodeTenant, u64)>,
    held: BinaryHeap<Held>,
    budget: QueueBudget,
    due: Vec<Held>,
    pools: Pools,
    released: Vec<HeldPacket>,
    seq: u64,
    scratch: Vec<u8>,
    mtu: usize,
    last_tick: Nanos,
    /// When this worker last moved a packet (for busy polling).
    last_active: Nanos,
    /// The in-kernel fast path, when attached.
    fast: Option<Arc<FastPathIo>>,
    /// Offload events taken from the engine, to mirror once its lock is released.
    offload_events: Vec<OffloadEvent>,
    /// (job, bytes, last departure) of this pass's packets sent through userspace, for the
    /// fast path's clocks.
    charges: Vec<(JobKey, u64, Nanos)>,
}

impl std::fmt::Debug for Worker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker").finish_non_exhaustive()
    }
}

/// The tenant and job a datagram from a node is queued under (see [`NodeTenant`]).
fn classify(payload: &[u8]) -> (NodeTenant, JobKey) {
    match parse_payload(payload) {
        Ok(g) => (Some(g.option.tenant_id), g.option.job_key),
        Err(_) => (None, JobKey(0)),
    }
}

impl Worker {
    fn new(
        s: Arc<Shared>,
        index: usize,
        sock: GeneveSocket,
        tun: TunQueue,
        tap: Option<UnderlayTap>,
        (from_nodes, to_nodes): (
            FairQueue<NodeTenant, JobKey, NodePkt>,
            FairQueue<NodeTenant, JobKey, NodeBound>,
        ),
        fast: Option<Arc<FastPathIo>>,
    ) -> Worker {
        let batch = s.cfg.batch;
        let mtu = s.cfg.tun_mtu as usize;
        Worker {
            index,
            rx: RecvBatch::new(batch),
            tx: SendBatch::with_capacity(batch * 2),
            refusals: (0..batch).map(|_| vec![0u8; REFUSAL_LEN]).collect(),
            tunbufs: (0..batch)
                .map(|_| vec![0u8; GENEVE_HEADER_LEN + 65535])
                .collect(),
            tunlens: vec![0; batch],
            tunhow: vec![Finished::Whole; batch],
            departs: Vec::with_capacity(64),
            outs: vec![Out::Nothing; batch],
            from_nodes,
            to_nodes,
            serving: Vec::with_capacity(batch),
            sending: Vec::with_capacity(batch),
            unreported_drops: Vec::new(),
            held: BinaryHeap::with_capacity(1024),
            budget: QueueBudget::new(s.cfg.pacing_queue_limits()),
            due: Vec::with_capacity(batch),
            pools: Pools::default(),
            released: Vec::with_capacity(batch),
            seq: 0,
            scratch: vec![0u8; mtu],
            mtu,
            last_tick: Nanos::ZERO,
            last_active: Nanos::ZERO,
            fast,
            offload_events: Vec::new(),
            charges: Vec::with_capacity(batch),
            s,
            sock,
            tun,
            tap,
        }
    }

    fn run(mut self) {
        let mut fds = [
            libc::pollfd {
                fd: self.sock.raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: self.tun.raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: self.s.wake.raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        let busy = Duration::from_micros(self.s.cfg.busy_poll_us);
        // Whether the previous wake-up found nothing to do while busy polling.
        let mut spun_empty = false;
        while !self.s.stop.load(Ordering::Relaxed) {
            let now = self.s.clock.now();
            let mut wait = TICK;
            if let Some(h) = self.held.peek() {
                wait = wait.min(
                    h.depart
                        .saturating_duration_since(now)
                        .saturating_sub(PACING_SLACK),
                );
            }
            let queued = !self.from_nodes.is_empty() || !self.to_nodes.is_empty();
            let polling = now.saturating_duration_since(self.last_active) < busy;
            if polling || queued {
                wait = Duration::ZERO;
            }
            if spun_empty && polling && !queued {
                // A spinning worker must not keep a runnable thread off its CPU: on a shared
                // machine that thread is often the other proxy's worker, a client or a server
                // whose next packet this worker is waiting for. Measured on the 2-vCPU
                // testbed: a new flow's SYN waited ~120 µs (another worker's whole busy-poll
                // window) in one TCP_CRR connection of five. Costs one cheap system call
                // per empty spin when nothing else wants the CPU.
                udp::yield_cpu();
            }
            if let Err(e) = udp::poll(&mut fds, wait) {
                tracing::error!(error = %e, "poll failed; worker stops");
                return;
            }
            let replay = fds[2].revents & libc::POLLIN != 0;
            if replay {
                // A policy arrived (or failed): held packets may be released.
                self.s.wake.clear();
            }
            // What `poll` saw ready: a spin that found nothing costs one system call instead
            // of three (the receive and the TUN read would only say "nothing"). Any error
            // condition counts as ready, so that the read reports it.
            let mut from_nodes_ready = fds[0].revents != 0;
            let mut from_internet_ready = fds[1].revents != 0;
            // Each turn reads what the kernel has queued (cheap: a copy into the fair queues)
            // and then serves in fair order for at most SERVE_PER_TURN (the expensive part:
            // tier 2, the TUN write, the send to the node), so that no packet waits long in a
            // kernel queue behind another tenant's flood. A time budget rather than a packet
            // count: 8 packets per turn held a single bulk download to ~3/4 of the rate
            // without fair queueing (a read per 8 packets).
            let mut moved = false;
            for _ in 0..TURNS_PER_WAKE {
                let a = if from_nodes_ready {
                    self.ingest_from_nodes()
                } else {
                    0
                };
                let b = if from_internet_ready {
                    self.ingest_from_internet()
                } else {
                    0
                };
                let c = self.serve();
                self.release_due();
                if a + b + c == 0 {
                    break;
                }
                moved = true;
                // Packets may have arrived while this turn served: later turns read both.
                from_nodes_ready = true;
                from_internet_ready = true;
                self.last_active = self.s.clock.now();
            }
            spun_empty = !moved && !replay;
            self.publish_queues();
            if replay {
                self.replay_released();
            }
            self.release_due();
            self.housekeeping();
        }
    }

    /// Turns a verdict about a packet from a node into what to do once the lock is released
    /// (under the engine lock: drops are counted there).
    fn node_out(
        &mut self,
        eng: &mut Tier2,
        v: Verdict,
        now: Nanos,
        floor: &mut Option<Nanos>,
    ) -> Out {
        if let (
            Some(_),
            Verdict::ToInternet {
                range, job, depart, ..
            },
        ) = (&self.fast, &v)
        {
            charge(&mut self.charges, *job, range.len(), *depart);
        }
        match v {
            Verdict::ToInternet {
                range,
                depart,
                path_mtu,
                ..
            } if send_now(depart, now, floor) => Out::Internet(range, path_mtu),
            Verdict::ToInternet {
                range,
                depart,
                job,
                path_mtu,
            } => {
                if self.budget.try_add(job, range.len() as u64) {
                    Out::Hold(depart, None, range, job, path_mtu)
                } else {
                    eng.count_drop(Reason::PacingHorizon);
                    Out::Nothing
                }
            }
            Verdict::Refuse {
                node, reply_len, ..
            } => Out::Refuse(node, reply_len),
            Verdict::Held {
                job_key,
                node,
                fetch,
            } => {
                add(&self.s.metrics.held_packets, 1);
                if fetch {
                    self.s.fetcher.request(job_key, node);
                }
                Out::Nothing
            }
            Verdict::Drop(_) | Verdict::ToNode { .. } => Out::Nothing,
        }
    }

    /// Reads what the GENEVE socket holds (up to [`INGEST_PER_TURN`] datagrams) into the
    /// node-side fair queue; returns how many datagrams.
    fn ingest_from_nodes(&mut self) -> usize {
        let mut total = 0;
        let batch = self.rx.bufs.len();
        while total < INGEST_PER_TURN {
            let n = match self.rx.recv(&self.sock) {
                Ok(n) => n,
                Err(e) => {
                    tracing::warn!(error = %e, "recvmmsg failed");
                    break;
                }
            };
            if n == 0 {
                break;
            }
            let now = self.s.clock.now();
            let mut bytes = 0u64;
            for i in 0..n {
                let meta = self.rx.meta[i];
                let len = meta.len;
                bytes += len as u64;
                let (tenant, job) = classify(&self.rx.bufs[i][..len]);
                let buf = if len <= SMALL_BUF {
                    let mut b = self.pools.take(len);
                    b.extend_from_slice(&self.rx.bufs[i][..len]);
                    b
                } else {
                    // A super-packet keeps its receive buffer (no 64 KiB copy); the batch
                    // gets a spare one.
                    std::mem::replace(&mut self.rx.bufs[i], self.pools.take_rx())
                };
                // Fair in packet bytes; bounded in the memory the buffer holds.
                let size = Size::in_buffer(len as u32, buf.capacity());
                let pkt = NodePkt {
                    buf,
                    len,
                    src: *meta.src.ip(),
                };
                let (pools, drops) = (&mut self.pools, &mut self.unreported_drops);
                self.from_nodes.push(tenant, job, size, pkt, now, |e| {
                    match drops.iter_mut().find(|(t, _)| *t == e.tenant) {
                        Some((_, n)) => *n += 1,
                        None => drops.push((e.tenant, 1)),
                    }
                    pools.give(e.item.buf);
                });
            }
            add(&self.s.metrics.node_rx_packets, n as u64);
            add(&self.s.metrics.node_rx_bytes, bytes);
            total += n;
            if n < batch {
                break;
            }
        }
        total
    }

    /// Serves both fair queues in turn, a pass of each at a time, until both are empty or
    /// [`SERVE_PER_TURN`] has passed; returns how many packets.
    fn serve(&mut self) -> usize {
        let start = self.s.clock.now();
        let mut total = 0;
        loop {
            let n = self.serve_from_nodes() + self.serve_to_nodes();
            total += n;
            if n == 0 || self.s.clock.now().saturating_duration_since(start) >= SERVE_PER_TURN {
                return total;
            }
        }
    }

    /// Processes up to [`SERVE_FROM_NODES`] datagrams from the node-side fair queue (tier 2,
    /// then the TUN write or the refusal), and held packets that became ready for release;
    /// returns how many datagrams.
    fn serve_from_nodes(&mut self) -> usize {
        let now = self.s.now();
        let max = SERVE_FROM_NODES.min(self.refusals.len());
        let mut bytes = 0;
        self.serving.clear();
        while self.serving.len() < max && bytes < SERVE_FROM_NODES_BYTES {
            let Some(e) = self.from_nodes.pop(now.mono) else {
                break;
            };
            bytes += e.item.len;
            self.serving.push(e.item);
        }
        let n = self.serving.len();
        if n == 0 && self.unreported_drops.is_empty() {
            return 0;
        }
        let snap = self.s.store.snapshot();
        let view = snap.at(Instant::now());
        let released;
        let fast = self.fast.clone();
        let mirror;
        {
            let s = Arc::clone(&self.s);
            let mut eng = s.engine();
            self.report_drops(&mut eng);
            let draining = s.draining.load(Ordering::Relaxed);
            if eng.is_draining() != draining {
                eng.set_draining(draining);
            }
            let mut floor = self.held.peek().map(|h| h.depart);
            for i in 0..n {
                let p = &mut self.serving[i];
                let v = eng.from_node(
                    &view,
                    p.src,
                    &mut p.buf[..p.len],
                    &mut self.refusals[i],
                    now,
                );
                self.outs[i] = self.node_out(&mut eng, v, now.mono, &mut floor);
            }
            s.flush_audit(&mut eng);
            let refetch: Vec<_> = eng.drain_refetch().collect();
            for (job, node) in refetch {
                if !s.fetcher.request_refetch(job, node) {
                    eng.refetch_declined(job);
                }
            }
            released = eng.has_released();
            mirror = self.offload_handoff(&mut eng, fast.as_deref());
        }
        if let (Some(f), Some(mut m)) = (fast.as_deref(), mirror) {
            self.mirror_batch(f, &mut m, ClockDir::Egress);
        }
        self.emit_node_outs(n, NodeBufs::Served);
        for p in self.serving.drain(..) {
            self.pools.give(p.buf);
        }
        if released {
            self.replay_released();
        }
        n
    }

    /// Adds the fair-queue drops counted since the last call to the engine's counters.
    fn report_drops(&mut self, eng: &mut Tier2) {
        for (tenant, n) in self.unreported_drops.drain(..) {
            for _ in 0..n {
                eng.count_drop_claimed(tenant, Reason::TenantQueueFull);
            }
        }
    }

    /// Runs held packets whose policy arrived through the engine again, in order.
    fn replay_released(&mut self) {
        loop {
            self.released.clear();
            // The snapshot is taken after the fetcher stored the policy it notified about.
            let snap = self.s.store.snapshot();
            let view = snap.at(Instant::now());
            let now = self.s.now();
            let n = {
                let s = Arc::clone(&self.s);
                let mut eng = s.engine();
                let n = eng.take_released(&mut self.released, self.refusals.len());
                let mut floor = self.held.peek().map(|h| h.depart);
                for i in 0..n {
                    let h = &mut self.released[i];
                    let v = eng.from_node_released(&view, h, &mut self.refusals[i], now);
                    self.outs[i] = self.node_out(&mut eng, v, now.mono, &mut floor);
                }
                s.flush_audit(&mut eng);
                let refetch: Vec<_> = eng.drain_refetch().collect();
                for (job, node) in refetch {
                    if !s.fetcher.request_refetch(job, node) {
                        eng.refetch_declined(job);
                    }
                }
                n
            };
            if n == 0 {
                return;
            }
            add(&self.s.metrics.held_released, n as u64);
            self.emit_node_outs(n, NodeBufs::Released);
        }
    }

    fn packet(&self, bufs: NodeBufs, i: usize, r: std::ops::Range<usize>) -> &[u8] {
        match bufs {
            NodeBufs::Served => &self.serving[i].buf[r],
            NodeBufs::Released => &self.released[i].payload[r],
        }
    }

    /// Does what `outs[..n]` say with the packets of `bufs` (after the engine lock is gone).
    fn emit_node_outs(&mut self, n: usize, bufs: NodeBufs) {
        let mut refusals = 0;
        for i in 0..n {
            let out = self.outs[i].clone();
            match out {
                Out::Internet(r, path_mtu) => {
                    let pkt = match bufs {
                        NodeBufs::Served => &mut self.serving[i].buf[r],
                        NodeBufs::Released => &mut self.released[i].payload[r],
                    };
                    write_internet(&self.s, &self.tun, pkt, segment_mtu(self.mtu, path_mtu));
                }
                Out::Hold(depart, to, r, job, path_mtu) => {
                    let mut buf = self.pools.take(r.len());
                    buf.extend_from_slice(self.packet(bufs, i, r));
                    self.seq += 1;
                    self.held.push(Held {
                        depart,
                        seq: self.seq,
                        to,
                        job,
                        path_mtu,
                        data: buf,
                    });
                }
                Out::Refuse(..) => refusals += 1,
                Out::Nothing => {}
            }
        }
        if refusals > 0 {
            let mut bytes = 0u64;
            let msgs = (0..n).filter_map(|i| match self.outs[i] {
                Out::Refuse(node, len) => Some((
                    SocketAddrV4::new(node, GENEVE_PORT),
                    &self.refusals[i][..len],
                )),
                _ => None,
            });
            let (sent, failed) = self
                .tx
                .send(&self.sock, msgs.inspect(|(_, d)| bytes += d.len() as u64));
            add(&self.s.metrics.node_send_failures, failed as u64);
            add(&self.s.metrics.refusals, sent as u64);
            add(&self.s.metrics.node_tx_packets, sent as u64);
            add(&self.s.metrics.node_tx_bytes, bytes);
        }
    }

    /// Reads what the TUN queue holds (up to [`INGEST_PER_TURN`] packets), runs it through the
    /// engine (reverse NAT, ingress pacing: cheap, and it names the job) and queues the
    /// datagrams for nodes in the node-bound fair queue (or the pacing queue); returns how
    /// many packets.
    fn ingest_from_internet(&mut self) -> usize {
        let mut total = 0;
        while total < INGEST_PER_TURN {
            let n = self.internet_batch();
            total += n;
            if n < self.tunbufs.len() {
                break;
            }
        }
        total
    }

    /// One batch of [`Worker::ingest_from_internet`].
    fn internet_batch(&mut self) -> usize {
        let mut n = 0;
        let mut bytes = 0u64;
        while n < self.tunbufs.len() {
            let mut hdr = [0u8; VNET_HDR_LEN];
            match self
                .tun
                .read(&mut hdr, &mut self.tunbufs[n][GENEVE_HEADER_LEN..])
            {
                Ok(Some(len)) => {
                    // Checksums are finished before NAT rewrites the packet: the incremental
                    // update is only right on a complete checksum.
                    let pkt = &mut self.tunbufs[n][GENEVE_HEADER_LEN..GENEVE_HEADER_LEN + len];
                    match vnet::finish_from_kernel(&VnetHdr::decode(&hdr), pkt) {
                        Ok(how) => {
                            self.tunlens[n] = len;
                            self.tunhow[n] = how;
                            bytes += len as u64;
                            n += 1;
                        }
                        Err(e) => {
                            tracing::debug!(error = %e, "TUN packet refused");
                            add(&self.s.metrics.tun_read_refused, 1);
                        }
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    tracing::warn!(error = %e, "TUN read failed");
                    break;
                }
            }
        }
        if n == 0 {
            return 0;
        }
        add(&self.s.metrics.internet_rx_packets, n as u64);
        add(&self.s.metrics.internet_rx_bytes, bytes);
        let now = self.s.now();
        let s = Arc::clone(&self.s);
        let mut eng = s.engine();
        self.report_drops(&mut eng);
        let mut floor = self.held.peek().map(|h| h.depart);
        for i in 0..n {
            let inner = GENEVE_HEADER_LEN..GENEVE_HEADER_LEN + self.tunlens[i];
            // A super-packet is split for the overlay at the sender's MSS (never beyond the
            // TUN MTU), and the pacer stamps each of its segments.
            let segment_mtu = match self.tunhow[i] {
                Finished::Segment { mtu } => Some(mtu.min(self.mtu)),
                Finished::Whole => None,
            };
            let Verdict::ToNode {
                node, range, job, ..
            } = eng.from_internet_segmented(&mut self.tunbufs[i], inner, segment_mtu, now)
            else {
                continue;
            };
            self.departs.clear();
            self.departs.extend_from_slice(eng.segment_departs());
            if self.fast.is_some() {
                let last = self.departs.iter().flatten().max().copied();
                charge(
                    &mut self.charges,
                    job,
                    range.len(),
                    last.unwrap_or(now.mono),
                );
            }
            let to = SocketAddrV4::new(node, GENEVE_PORT);
            let data = &self.tunbufs[i][range];
            // The engine wrote the job's GENEVE header: its option names the tenant.
            let tenant = classify(data).0;
            if segment_mtu.is_some() {
                add(&s.metrics.gso_segmented, 1);
            }
            // A super-packet whose segments are all due within WHOLE_BURST leaves whole, unless
            // it would overtake a packet in the pacing queue.
            let first = self.departs.first().copied().flatten();
            let last = self.departs.last().copied().flatten();
            if let (Some(mtu), Some(first), Some(last), true) =
                (segment_mtu, first, last, self.tap.is_some())
            {
                if self.departs.iter().all(Option::is_some)
                    && last <= now.mono.saturating_add(WHOLE_BURST)
                    && floor.is_none_or(|f| f > first)
                {
                    let mut buf = self.pools.take(data.len());
                    buf.extend_from_slice(data);
                    let size = Size::in_buffer(buf.len() as u32, buf.capacity());
                    let pkt = NodeBound {
                        data: buf,
                        to,
                        whole: Some(mtu),
                    };
                    let pools = &mut self.pools;
                    self.to_nodes.push(tenant, job, size, pkt, now.mono, |e| {
                        eng.count_drop_claimed(e.tenant, Reason::TenantQueueFull);
                        pools.give(e.item.data);
                    });
                    continue;
                }
            }
            let (pools, to_nodes) = (&mut self.pools, &mut self.to_nodes);
            let (held, budget, seq) = (&mut self.held, &mut self.budget, &mut self.seq);
            let mut departs = self.departs.iter();
            let r = node_datagrams(data, segment_mtu, &mut self.scratch, |geneve, inner| {
                // A segment beyond the horizon was dropped (and counted) by the engine.
                let Some(Some(depart)) = departs.next().copied() else {
                    return;
                };
                let len = geneve.len() + inner.len();
                if send_now(depart, now.mono, &mut floor) {
                    let mut buf = pools.take(len);
                    buf.extend_from_slice(geneve);
                    buf.extend_from_slice(inner);
                    let size = Size::in_buffer(buf.len() as u32, buf.capacity());
                    let pkt = NodeBound {
                        data: buf,
                        to,
                        whole: None,
                    };
                    to_nodes.push(tenant, job, size, pkt, now.mono, |e| {
                        eng.count_drop_claimed(e.tenant, Reason::TenantQueueFull);
                        pools.give(e.item.data);
                    });
                } else if budget.try_add(job, len as u64) {
                    let mut buf = pools.take(len);
                    buf.extend_from_slice(geneve);
                    buf.extend_from_slice(inner);
                    *seq += 1;
                    held.push(Held {
                        depart,
                        seq: *seq,
                        to: Some(to),
                        job,
                        path_mtu: None,
                        data: buf,
                    });
                } else {
                    eng.count_drop(Reason::PacingHorizon);
                }
            });
            if r.is_err() {
                eng.count_drop(Reason::Malformed);
            }
        }
        let fast = self.fast.clone();
        let mirror = self.offload_handoff(&mut eng, fast.as_deref());
        drop(eng);
        if let (Some(f), Some(mut m)) = (fast.as_deref(), mirror) {
            self.mirror_batch(f, &mut m, ClockDir::Ingress);
        }
        n
    }

    /// Under the engine lock: takes the engine's offload events and, if there is anything to
    /// mirror (events, clock charges), locks the fast path's mirror before the engine lock is
    /// released, so that events reach the maps in the order the engine queued them.
    fn offload_handoff<'f>(
        &mut self,
        eng: &mut Tier2,
        fast: Option<&'f FastPathIo>,
    ) -> Option<std::sync::MutexGuard<'f, Mirror>> {
        let f = fast?;
        if eng.has_offload_events() {
            self.offload_events.extend(eng.drain_offload_events());
        }
        if self.offload_events.is_empty() && self.charges.is_empty() {
            return None;
        }
        Some(f.lock())
    }

    /// With the engine lock released: writes the events taken by
    /// [`Worker::offload_handoff`] into the fast path's maps and charges its clocks for
    /// this pass's packets (direction `dir`).
    fn mirror_batch(&mut self, f: &FastPathIo, m: &mut Mirror, dir: ClockDir) {
        let mono = fast_path::mono_now();
        let engine_now = self.s.clock.now();
        if !self.offload_events.is_empty() {
            let unix = self.s.now().unix_secs;
            f.apply(m, self.offload_events.drain(..), unix, mono);
        }
        if !self.charges.is_empty() {
            f.charge(m, dir, &self.charges, mono, engine_now);
            self.charges.clear();
        }
    }

    /// Sends up to a batch of datagrams of the node-bound fair queue: runs of datagrams in one
    /// `sendmmsg`, super-packets whole through the overlay-GSO device, in queue order;
    /// returns how many.
    fn serve_to_nodes(&mut self) -> usize {
        let now = self.s.clock.now();
        let max = self.rx.bufs.len();
        self.sending.clear();
        while self.sending.len() < max {
            let Some(e) = self.to_nodes.pop(now) else {
                break;
            };
            self.sending.push(e.item);
        }
        let n = self.sending.len();
        if n == 0 {
            return 0;
        }
        let mut start = 0;
        for i in 0..=n {
            let whole = self.sending.get(i).and_then(|p| p.whole);
            if i < n && whole.is_none() {
                continue;
            }
            self.send_datagrams(start, i);
            start = i + 1;
            if let (Some(mtu), Some(tap)) = (whole, &self.tap) {
                let p = &mut self.sending[i];
                let m = &self.s.metrics;
                match write_whole(tap, self.s.cfg.underlay_addr, p.to, &mut p.data, mtu) {
                    Some(Ok(())) => {
                        add(&m.node_tx_packets, 1);
                        add(&m.node_tx_bytes, p.data.len() as u64);
                        add(&m.gso_whole_to_nodes, 1);
                    }
                    Some(Err(_)) => add(&m.node_send_failures, 1),
                    None => {
                        // Cannot go whole: split it here, each segment sent now.
                        let (data, to) = (std::mem::take(&mut p.data), p.to);
                        self.send_split(&data, to, mtu);
                        self.pools.give(data);
                    }
                }
            }
        }
        for p in self.sending.drain(..) {
            self.pools.give(p.data);
        }
        n
    }

    /// Sends `sending[from..to]` (plain datagrams) in one `sendmmsg`.
    fn send_datagrams(&mut self, from: usize, to: usize) {
        if from >= to {
            return;
        }
        let batch = &self.sending[from..to];
        let bytes: usize = batch.iter().map(|p| p.data.len()).sum();
        let msgs = batch.iter().map(|p| (p.to, p.data.as_slice()));
        let (sent, failed) = self.tx.send(&self.sock, msgs);
        add(&self.s.metrics.node_send_failures, failed as u64);
        add(&self.s.metrics.node_tx_packets, sent as u64);
        add(&self.s.metrics.node_tx_bytes, bytes as u64);
    }

    /// Splits the GENEVE datagram `data` into one datagram per segment and sends them now.
    fn send_split(&mut self, data: &[u8], to: SocketAddrV4, mtu: usize) {
        let mut segs: Vec<Vec<u8>> = Vec::new();
        let pools = &mut self.pools;
        let r = node_datagrams(data, Some(mtu), &mut self.scratch, |geneve, inner| {
            let mut b = pools.take(geneve.len() + inner.len());
            b.extend_from_slice(geneve);
            b.extend_from_slice(inner);
            segs.push(b);
        });
        if r.is_err() {
            add(&self.s.metrics.node_send_failures, 1);
        }
        let bytes: usize = segs.iter().map(Vec::len).sum();
        let (sent, failed) = self
            .tx
            .send(&self.sock, segs.iter().map(|b| (to, b.as_slice())));
        add(&self.s.metrics.node_send_failures, failed as u64);
        add(&self.s.metrics.node_tx_packets, sent as u64);
        add(&self.s.metrics.node_tx_bytes, bytes as u64);
        for b in segs {
            self.pools.give(b);
        }
    }

    fn release_due(&mut self) {
        if self.held.is_empty() {
            return;
        }
        let now = self.s.clock.now();
        self.due.clear();
        let due_by = now.saturating_add(PACING_SLACK);
        while self.held.peek().is_some_and(|h| h.depart <= due_by) {
            let Some(h) = self.held.pop() else { break };
            self.budget.remove(h.job, h.data.len() as u64);
            match h.to {
                None => {
                    let mut data = h.data;
                    let mtu = segment_mtu(self.mtu, h.path_mtu);
                    write_internet(&self.s, &self.tun, &mut data, mtu);
                    self.pools.give(data);
                }
                Some(_) => self.due.push(h),
            }
        }
        if !self.due.is_empty() {
            let bytes: u64 = self.due.iter().map(|h| h.data.len() as u64).sum();
            let msgs = self
                .due
                .iter()
                .filter_map(|h| h.to.map(|to| (to, h.data.as_slice())));
            let (sent, failed) = self.tx.send(&self.sock, msgs);
            add(&self.s.metrics.node_send_failures, failed as u64);
            add(&self.s.metrics.node_tx_packets, sent as u64);
            add(&self.s.metrics.node_tx_bytes, bytes);
            let mut due = std::mem::take(&mut self.due);
            for h in due.drain(..) {
                self.pools.give(h.data);
            }
            self.due = due;
        }
    }

    /// Publishes this worker's pacing-queue and fair-queue occupancy and wait counters
    /// (metrics).
    fn publish_queues(&self) {
        let Some(g) = self.s.worker_gauges.get(self.index) else {
            return;
        };
        let (packets, bytes) = self.budget.total();
        g.pacing_packets
            .store(u64::from(packets), Ordering::Relaxed);
        g.pacing_bytes.store(bytes, Ordering::Relaxed);
        let (a, b) = (&self.from_nodes, &self.to_nodes);
        g.fair_packets
            .store((a.len() + b.len()) as u64, Ordering::Relaxed);
        g.fair_bytes.store(a.bytes() + b.bytes(), Ordering::Relaxed);
        g.fair_tenants
            .store((a.tenants() + b.tenants()) as u64, Ordering::Relaxed);
        let (sa, sb) = (a.stats(), b.stats());
        g.fair_served
            .store(sa.popped + sb.popped, Ordering::Relaxed);
        g.fair_waited_ns
            .store(sa.waited_ns.saturating_add(sb.waited_ns), Ordering::Relaxed);
        g.fair_dropped_from_nodes
            .store(sa.dropped, Ordering::Relaxed);
        g.fair_dropped_to_nodes.store(sb.dropped, Ordering::Relaxed);
    }

    fn housekeeping(&mut self) {
        // The monotonic clock alone first: this runs on every spin of a busy-polling worker.
        if self.s.clock.now().saturating_duration_since(self.last_tick) < TICK {
            return;
        }
        let now = self.s.now();
        self.last_tick = now.mono;
        let snap = self.s.store.snapshot();
        let view = snap.at(Instant::now());
        let s = Arc::clone(&self.s);
        let fast = self.fast.clone();
        // The fast path's counters reach the engine before a tick that may end flows (once
        // a second, or when job ends are queued), so flow_end lines and expiry see them.
        let credits = match fast.as_deref() {
            Some(f) if s.engine().ends_flows_at(now.mono) => {
                f.publish(&s.metrics);
                f.sync()
            }
            _ => Vec::new(),
        };
        let mut eng = s.engine();
        if !credits.is_empty() {
            let mono = fast_path::mono_now();
            for c in &credits {
                let last = c.last_seen.map(|t| fast_path::to_engine(t, mono, now.mono));
                eng.credit_offloaded(&c.key, c.out, c.inbound, last);
            }
        }
        self.report_drops(&mut eng);
        let draining = s.draining.load(Ordering::Relaxed);
        if eng.is_draining() != draining {
            eng.set_draining(draining);
        }
        eng.tick(&view, now);
        s.flush_audit(&mut eng);
        let released = eng.has_released();
        // Probes and RSTs of flows the proxy ended (crate::resets): rare, so a local buffer.
        let mut control = Vec::new();
        if eng.has_control() {
            eng.take_control(&mut control, CONTROL_PER_TICK);
        }
        let mirror = self.offload_handoff(&mut eng, fast.as_deref());
        drop(eng);
        let pending = (fast.as_deref(), mirror);
        if let (Some(f), Some(mut m)) = pending {
            self.mirror_batch(f, &mut m, ClockDir::Egress);
        }
        // After the mirror: the fast path no longer carries the ended flows, so their answers
        // come to the engine.
        if !control.is_empty() {
            self.send_control(&mut control);
        }
        // A name check the tick decided (its wait ended) releases packets — the held payload or
        // the RST to the server — that must not wait for the job's next packet.
        if released {
            self.replay_released();
        }
    }
}

impl Worker {
    /// Sends the engine's own segments ([`crate::resets`]): to nodes in one batch, to the
    /// internet through the TUN device.
    fn send_control(&mut self, control: &mut [crate::resets::Control]) {
        use crate::resets::ControlTo;
        for c in control.iter_mut() {
            if c.to == ControlTo::Internet {
                write_internet(&self.s, &self.tun, c.bytes_mut(), self.mtu);
            }
        }
        let msgs = control.iter().filter_map(|c| match c.to {
            ControlTo::Node(node) => Some((SocketAddrV4::new(node, GENEVE_PORT), c.bytes())),
            ControlTo::Internet => None,
        });
        let (sent, failed) = self.tx.send(&self.sock, msgs);
        add(&self.s.metrics.node_send_failures, failed as u64);
        add(&self.s.metrics.node_tx_packets, sent as u64);
    }
}

/// Adds `bytes` of `job` leaving at `depart` to a pass's charges (a handful of jobs per pass:
/// a linear scan).
fn charge(charges: &mut Vec<(JobKey, u64, Nanos)>, job: JobKey, bytes: usize, depart: Nanos) {
    match charges.iter_mut().find(|(j, _, _)| *j == job) {
        Some((_, b, d)) => {
            *b += bytes as u64;
            *d = (*d).max(depart);
        }
        None => charges.push((job, bytes as u64, depart)),
    }
}

/// Opens `n` queues of the overlay-GSO TAP device `name` and configures it; on any failure
/// (a kernel before 6.17 refuses `TUN_F_UDP_TUNNEL_GSO`) logs why and returns none: the
/// workers then split super-packets themselves.
fn open_overlay_gso(name: &str, n: usize) -> Vec<UnderlayTap> {
    let opened: Result<Vec<_>, _> = (0..n).map(|_| UnderlayTap::open(name, n > 1)).collect();
    match opened.and_then(|taps| UnderlayTap::configure(name).map(|()| taps)) {
        Ok(taps) => {
            tracing::info!(
                device = name,
                "overlay GSO: super-packets go to nodes whole"
            );
            taps
        }
        Err(e) => {
            tracing::warn!(error = %e, "overlay GSO unavailable: super-packets for nodes are split by the proxy");
            Vec::new()
        }
    }
}

/// How far ahead of now the last segment of a super-packet may be due for the super-packet to
/// leave whole through the overlay-GSO device: a job may run this much ahead of its pacer's
/// clock (at 1 Gbit/s, 125 KB; at 0.5 Gbit/s and more a 64 KiB read is that burst anyway, and
/// the node's policer admits one 64 KiB burst). Otherwise — slower jobs, or a job whose clock
/// is already ahead — the segments are sent one by one, each at its departure.
const WHOLE_BURST: Duration = Duration::from_millis(1);

/// Outer headers of a frame written to the overlay-GSO device: Ethernet, IPv4, UDP.
const OUTER_LEN: usize = 14 + 20 + 8;

/// Writes the GENEVE datagram `data` (header + inner TCP super-packet) for `to` through `tap`
/// as one UDP-tunnelled super-packet whose segments carry at most `segment_mtu` bytes of inner
/// packet. Returns false when the packet cannot go whole (not a super-packet for that MTU, or
/// too long for one outer IPv4 packet); the caller splits it then.
fn write_whole(
    tap: &UnderlayTap,
    from: Ipv4Addr,
    to: SocketAddrV4,
    data: &mut [u8],
    segment_mtu: usize,
) -> Option<std::io::Result<()>> {
    let udp_len = 8 + data.len();
    let total = u16::try_from(20 + udp_len).ok()?;
    let (_, inner) = data.split_at_mut(GENEVE_HEADER_LEN.min(data.len()));
    let inner_hdr = vnet::prepare_to_kernel(inner, segment_mtu);
    if !inner_hdr.is_gso() {
        return None;
    }
    let mut outer = [0u8; OUTER_LEN];
    outer[..6].copy_from_slice(&tap.mac());
    // A locally administered source MAC: nothing answers it, nothing needs to.
    outer[6..12].copy_from_slice(&[0x02, 0, 0, 0, 0, 0x01]);
    outer[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
    let ip = &mut outer[14..34];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&total.to_be_bytes());
    ip[6] = 0x40; // DF, as tier 1 sends
    ip[8] = 64;
    ip[9] = 17;
    ip[12..16].copy_from_slice(&from.octets());
    ip[16..20].copy_from_slice(&to.ip().octets());
    let c = snas_wire::checksum::checksum(ip);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    let udp = &mut outer[34..42];
    udp[..2].copy_from_slice(&GENEVE_PORT.to_be_bytes());
    udp[2..4].copy_from_slice(&to.port().to_be_bytes());
    udp[4..6].copy_from_slice(&u16::try_from(udp_len).ok()?.to_be_bytes());
    let hdr = vnet::tunnel_header(&inner_hdr, 34, OUTER_LEN + GENEVE_HEADER_LEN);
    Some(tap.write(&hdr, [&outer, data]))
}

/// Hands `f` the GENEVE header and inner packet of each datagram for a node that the datagram
/// `data` (GENEVE header + inner packet, as the engine left it) becomes: itself, or, with
/// `segment_mtu`, one per segment of a TCP super-packet, each no longer than that (so that it
/// fits the overlay), in the order [`gso::segment_lens`] gives.
fn node_datagrams(
    data: &[u8],
    segment_mtu: Option<usize>,
    scratch: &mut [u8],
    mut f: impl FnMut(&[u8], &[u8]),
) -> Result<(), gso::GsoError> {
    let (geneve, inner) = data.split_at(GENEVE_HEADER_LEN.min(data.len()));
    match segment_mtu {
        Some(mtu) if gso::needs_segmenting(inner, mtu) => {
            gso::segment_tcp(inner, mtu, scratch, |s| f(geneve, s)).map(|_| ())
        }
        _ => {
            f(geneve, inner);
            Ok(())
        }
    }
}

/// The MTU a packet to the internet is segmented for: the TUN device's, or the path's when the
/// internet reported a narrower one ([`crate::pmtu`]).
fn segment_mtu(tun_mtu: usize, path_mtu: Option<u16>) -> usize {
    path_mtu.map_or(tun_mtu, |p| tun_mtu.min(usize::from(p)))
}

/// Writes a packet from a node to the TUN device: TCP and UDP leave with their checksum for
/// the kernel to finish, a TCP super-packet leaves whole for the kernel to segment
/// ([`vnet::prepare_to_kernel`]).
fn write_internet(s: &Shared, tun: &TunQueue, pkt: &mut [u8], mtu: usize) {
    let m = &s.metrics;
    let hdr = vnet::prepare_to_kernel(pkt, mtu);
    if hdr.is_gso() {
        add(&m.tso_to_kernel, 1);
    }
    match tun.write(&hdr, pkt) {
        Ok(()) => {
            add(&m.internet_tx_packets, 1);
            add(&m.internet_tx_bytes, pkt.len() as u64);
        }
        Err(_) => add(&m.tun_write_errors, 1),
    }
}
