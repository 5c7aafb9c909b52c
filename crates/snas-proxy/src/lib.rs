//! Egress proxy (tier 2): a sans-IO core (no sockets, no threads, no clock reads — every call
//! takes the current time as a [`clock::Nanos`] from the caller) and the daemon around it.
//!
//! # Layout
//! - [`clock`]: the injected monotonic time ([`clock::Nanos`], [`clock::Clock`],
//!   [`clock::ManualClock`], [`clock::MonotonicClock`]).
//! - [`conntrack`]: flows ↔ NAT tuples, TCP/UDP/ICMP states and idle expiry; owns the allocator.
//! - [`nat`]: SNAT port allocator with per-job/per-tenant quotas, per-destination caps,
//!   quarantine and gauges.
//! - [`token_bucket`]: pure token bucket (per-job `new_connections_per_sec`).
//! - [`pacer`]: EDT pacing per job and tenant with a bounded horizon, and a queue that releases
//!   packets when due.
//! - [`wheel`]: the hashed timer wheel under conntrack expiry and the pacer queue.
//! - [`bindings`]: (job, address) → names learnt by the proxy's resolver, with expiry.
//! - [`infra`]: the infrastructure set no job may reach, whatever its policy says.
//! - [`hold`]: first packets of jobs whose policy is being fetched.
//! - [`drops`]: drop counters by tenant and reason, with a bounded label set.
//! - [`budget`]: per-job audit-line budget and pacing-queue bounds.
//! - [`fair`]: per-tenant, per-job fair queues (deficit round robin in bytes) of a worker.
//! - [`tier2`]: the per-packet pipeline in both directions — GENEVE receive rules, the job's
//!   verified policy, new-flow admission, NAT, pacing, refusals and audit records.
//! - [`offload`]: which established flows the engine hands to the in-kernel fast path, and
//!   the install/remove events the daemon mirrors into its maps (pure).
//! - [`gso`]: software segmentation of TCP super-packets (pure).
//! - [`vnet`]: the TUN device's virtio-net header: checksum and segmentation offload (pure).
//! - `synthetic` (hidden): the benchmark flow fleets.
//!
//! The daemon (`snas proxy`, operator doc `docs/proxy.md`):
//! - [`config`]: the `proxy.toml` schema.
//! - [`guard`]: the nftables table that keeps jobs' packets out of the proxy's namespace and off
//!   the infrastructure (defence in depth).
//! - [`daemon`]: wiring, data-path workers, pacing queue.
//! - [`fast_path`]: loads and attaches the in-kernel fast path and mirrors the engine's
//!   offload events into its maps.
//! - [`udp`], [`tun`], [`wake`]: batched GENEVE socket I/O, the TUN device and the workers'
//!   wake-up eventfd (with [`guard`]'s `setns`, the only `unsafe`).
//! - [`shared`]: the state the workers, the endpoints and the resolver share.
//! - [`policy_fetch`]: the real policy cache and fetcher.
//! - [`lifecycle`]: live policy updates, revocations and trust bundle reloads.
//! - [`api`]: the management and service endpoints' contract ([`api::types`]), their server
//!   ([`api::server`]) and the typed client ([`api::client`]), which the agents, the CLI, the
//!   testbed and the proxy itself (policy fetch, peer pushes) use.
//! - [`resolver`]: DNS for jobs and (job, address) bindings; [`audit_log`]; [`metrics`].
//!
//! Operator topics (timeouts, quotas, quarantine, horizon, memory): `docs/proxy-core.md`.
#![deny(unsafe_code)]

pub mod api;
pub mod audit_log;
pub mod bindings;
pub mod budget;
pub mod clock;
pub mod config;
pub mod conntrack;
pub mod daemon;
pub mod drops;
pub mod fair;
pub mod fast_path;
pub mod gso;
#[allow(unsafe_code)]
pub mod guard;
pub mod hold;
pub mod infra;
pub mod lifecycle;
pub mod metrics;
pub mod names;
pub mod nat;
pub mod offload;
pub mod pacer;
pub mod pmtu;
pub mod policy_fetch;
pub mod resets;
pub mod resolver;
pub mod shared;
#[doc(hidden)]
pub mod synthetic;
pub mod tier2;
pub mod token_bucket;
#[allow(unsafe_code)]
pub mod tun;
#[allow(unsafe_code)]
pub mod udp;
pub mod vnet;
#[allow(unsafe_code)]
pub mod wake;
pub mod wheel;
